"""Switching graph recording off: ``no_grad``, shared by the scalar and the tensor engine.

Every operation of :class:`~companion.autodiff.Value` and
:class:`~companion.autodiff.Tensor` asks :func:`is_grad_enabled` before it records its
inputs and its backward function. Inside ``with no_grad():`` nothing is recorded, so
evaluation and sampling cost only the forward computation and build no graph.

>>> is_grad_enabled()
True
>>> with no_grad():
...     is_grad_enabled()
False
>>> is_grad_enabled()
True
"""

from __future__ import annotations

import contextlib

__all__ = ["is_grad_enabled", "no_grad"]

_grad_enabled = True


def is_grad_enabled() -> bool:
    """True unless we are inside a ``no_grad`` block."""
    return _grad_enabled


class no_grad(contextlib.ContextDecorator):
    """Context manager (and decorator) inside which no graph is recorded.

    Blocks nest: leaving the inner one restores what the outer one set.
    """

    def _recreate_cm(self) -> "no_grad":  # a fresh instance per decorated call
        return type(self)()

    def __enter__(self) -> "no_grad":
        global _grad_enabled
        self._previous = _grad_enabled
        _grad_enabled = False
        return self

    def __exit__(self, *exc: object) -> None:
        global _grad_enabled
        _grad_enabled = self._previous
