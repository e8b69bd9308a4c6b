"""Exercises that check themselves.

A chapter's exercise gives the learner a stub to fill in, then calls :func:`check`,
which runs the learner's function and the reference on the same inputs and prints a
verdict a learner can act on: which input failed, what was expected, what came back.
:func:`check` returns nothing, so that a check at the end of a cell shows only its verdict;
:func:`passes` prints the same verdict and returns it as a bool, for code that acts on it.

>>> def square(x): return x * x
>>> check(square, lambda x: x ** 2, [(2,), (3,)], name="square")
✅ square: all 2 checks passed.
>>> passes(lambda x: x + x, lambda x: x ** 2, [(2,), (3,)], name="square")
❌ square: case 2 of 2 failed: expected 9, got 6
   inputs:   tuple of 1: [3]
   expected: 9
   got:      6
False
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["check", "describe", "passes", "same"]


def describe(value: Any, limit: int = 6) -> str:
    """A short, readable description of a value, for a verdict message."""
    if isinstance(value, torch.Tensor):
        shown = value.detach().flatten()[:limit].tolist()
        shown = [round(v, 4) if isinstance(v, float) else v for v in shown]
        more = ", ..." if value.numel() > limit else ""
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}, values {shown}{more}"
    if isinstance(value, np.ndarray):
        return describe(torch.from_numpy(np.ascontiguousarray(value)), limit)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v, limit) for v in value[:limit])
        return f"{type(value).__name__} of {len(value)}: [{inner}]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def same(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """None if ``got`` matches ``expected``, else the reason it does not.

    Tensors (and numpy arrays) must agree in shape and dtype, then in value within the
    tolerances; lists and tuples item by item; floats within the tolerances; anything
    else by ``==``.
    """
    if isinstance(expected, np.ndarray):
        expected = torch.from_numpy(expected)
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}"
        if got.dtype != expected.dtype:
            return f"expected dtype {expected.dtype}, got dtype {got.dtype}"
        g, e = got.detach().double().cpu(), expected.detach().double().cpu()
        if not torch.allclose(g, e, atol=atol, rtol=rtol, equal_nan=True):
            gap = (g - e).abs()
            gap[(g == e) | (g.isnan() & e.isnan())] = 0  # equal infinities and NaN pairs agree
            worst = gap.nan_to_num(float("inf")).flatten().argmax().item()
            index = tuple(int(i) for i in np.unravel_index(worst, tuple(e.shape))) if e.dim() else ()
            return (f"values differ: at index {index} expected {e.flatten()[worst].item():.6g}, "
                    f"got {g.flatten()[worst].item():.6g}")
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"expected {describe(expected)}, got {describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            reason = same(g, e, atol, rtol)
            if reason:
                return f"item {i}: {reason}"
        return None
    if isinstance(expected, float) or isinstance(got, float):
        if not isinstance(got, (int, float)) or not math.isclose(
            got, expected, rel_tol=rtol, abs_tol=atol
        ):
            return f"expected {expected!r}, got {got!r}"
        return None
    if got != expected:
        return f"expected {describe(expected)}, got {describe(got)}"
    return None


def passes(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    cases: Sequence[Sequence[Any]],
    *,
    name: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> bool:
    """Run ``fn`` and ``reference`` on every case of arguments, print a verdict, return it.

    Each case is a tuple of positional arguments. The first failing case is reported
    with its inputs, the expected value and the value ``fn`` returned (or the error it
    raised). Returns True when every case passes.
    """
    name = name or getattr(fn, "__name__", "your function")
    if not cases:
        raise ValueError("cases is empty: give at least one tuple of arguments")
    for i, args in enumerate(cases, start=1):
        args = tuple(args)
        expected = reference(*args)
        try:
            got = fn(*args)
        except NotImplementedError:
            print(f"⏳ {name}: not implemented yet. Write your solution in the exercise cell and run this cell again.")
            return False
        except Exception as err:  # the learner's bug is the message, not a crash
            print(f"❌ {name}: case {i} of {len(cases)} raised {type(err).__name__}: {err}")
            print(f"   inputs: {describe(args)}")
            return False
        reason = same(got, expected, atol, rtol)
        if reason:
            print(f"❌ {name}: case {i} of {len(cases)} failed: {reason}")
            print(f"   inputs:   {describe(args)}")
            print(f"   expected: {describe(expected)}")
            print(f"   got:      {describe(got)}")
            return False
    n = len(cases)
    print(f"✅ {name}: all {n} checks passed." if n > 1 else f"✅ {name}: the check passed.")
    return True


def check(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    cases: Sequence[Sequence[Any]],
    *,
    name: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Print the verdict of :func:`passes` on ``fn`` and return nothing.

    A chapter's check cell ends with this call: returning None keeps the printed verdict
    the cell's only output. Use :func:`passes` where the verdict is needed as a bool.
    """
    passes(fn, reference, cases, name=name, atol=atol, rtol=rtol)
