"""Outputs that every reader sees, and outputs that vary from machine to machine.

The test suite re-runs every chapter and compares every printed output with the one
saved in the notebook, character for character. That only works for what comes out the
same on every computer: shapes, counts, exact equalities, token ids of exact
computations, values rounded to where they are stable, and verdicts. Anything that
depends on the order in which floating-point numbers are added (which differs between
CPUs with AVX2 or AVX-512, between MKL and OpenBLAS, between a CPU and a GPU) is not:
a loss after hundreds of training steps, a sampled text, a difference of 3e-7, an argmax
over a near-tie, a timing.

This module is the one way the book handles the second kind.

* :func:`close` prints a verdict against a tolerance the text states,
  ``max |difference| < 1e-05: True``, instead of the raw difference.
* A cell whose output varies starts with a comment line ``# varies: <why>``. Its output
  is shown to the reader but not compared. The same cell or the next code cell calls
  :func:`within`, which asserts that the quantity lies in a stated band and prints the
  verdict, so a broken model still fails the suite on any machine.
* A cell that only reports the machine (a device name, a version, a timing, a speed)
  starts with ``# machine: <what>``. It is not compared, and there is nothing to bound.

``conftest.py`` hands both markers to nbval as "do not compare this output", and
``tests/test_portability.py`` checks that every ``# varies:`` cell is followed by an
executed :func:`within` and that no compared output prints a raw float below 1e-3.

>>> within(1.95, 1.90, 2.00, "validation loss")
validation loss in [1.9, 2.0]: True
>>> close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 3e-7]), 1e-5)
max |difference| < 1e-05: True
>>> exemption("# varies: the loss after training\\nprint(loss)")
'varies'
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["MARKERS", "OutOfBand", "close", "exemption", "max_abs_difference", "within"]

# The first line of a cell whose output is not compared, and the kind of exemption.
MARKERS = {"# varies:": "varies", "# machine:": "machine"}


class OutOfBand(AssertionError):
    """A varying quantity fell outside the band the chapter states for it."""


def exemption(source: str) -> str | None:
    """``"varies"`` or ``"machine"`` if the cell ``source`` opens with an exemption marker.

    >>> exemption("# machine: time per step\\nprint(seconds)")
    'machine'
    >>> exemption("print(1)") is None
    True
    """
    first = source.lstrip().split("\n", 1)[0].strip() if source.strip() else ""
    for marker, kind in MARKERS.items():
        if first.startswith(marker) and first[len(marker):].strip():
            return kind
    return None


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what}: expected one number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{what}: expected one number, got an array of shape {value.shape}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what}: expected a number, got {type(value).__name__}")
    return float(value)


def within(value: Any, low: float, high: float, what: str, *, quiet: bool = False) -> None:
    """Assert ``low <= value <= high`` and print ``<what> in [low, high]: True``.

    ``value`` is a Python number, a NumPy scalar or a one-element tensor. Raises
    :class:`OutOfBand` (an ``AssertionError``) naming the value and the band when it lies
    outside, so a notebook that runs it stops there and the test suite fails. It returns
    None, so that a call at the end of a cell adds no stray output.

    >>> within(3, 0, 2, "steps")
    Traceback (most recent call last):
    ...
    companion.varies.OutOfBand: steps = 3 lies outside the stated band [0, 2]
    """
    if not isinstance(what, str) or not what:
        raise ValueError("within() needs a name for the quantity, what='...'")
    low_f, high_f = _as_float(low, "low"), _as_float(high, "high")
    if not low_f <= high_f:
        raise ValueError(f"band [{low}, {high}] for {what} is empty: low must be <= high")
    x = _as_float(value, what)
    if math.isnan(x) or not low_f <= x <= high_f:
        raise OutOfBand(f"{what} = {x:.6g} lies outside the stated band [{low}, {high}]")
    if not quiet:
        print(f"{what} in [{low}, {high}]: True")


def max_abs_difference(actual: Any, expected: Any) -> float:
    """The largest ``|actual - expected|`` over all elements (tensors, arrays or numbers).

    Shapes must be equal: a difference computed through broadcasting would hide a bug.

    >>> max_abs_difference([1.0, 2.0], [1.0, 2.5])
    0.5
    """
    a = torch.as_tensor(np.asarray(actual) if isinstance(actual, (list, tuple)) else actual)
    b = torch.as_tensor(np.asarray(expected) if isinstance(expected, (list, tuple)) else expected)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}: they must be equal")
    if a.numel() == 0:
        return 0.0
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def close(actual: Any, expected: Any, tol: float, what: str = "max |difference|") -> None:
    """Print ``<what> < tol: True`` (or ``False``) for the largest absolute difference.

    The raw difference (3.6e-07 on one CPU, 2.4e-07 on another) is not printed: the
    verdict against the stated tolerance is what every machine agrees on. A NaN anywhere
    gives False. It returns None (the verdict is printed, and nbval compares it), so that a
    call at the end of a cell adds no stray output.
    """
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be a positive number")
    diff = max_abs_difference(actual, expected)
    ok = bool(diff < tol)  # False for NaN
    print(f"{what} < {tol:.0e}: {ok}")
