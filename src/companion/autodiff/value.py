"""A scalar automatic-differentiation engine: :class:`Value`.

A ``Value`` holds one number (``data``), the derivative of the final output with
respect to it (``grad``), the values it was computed from (``_prev``), the name of the
operation that made it (``_op``) and a closure (``_backward``) that passes its own
gradient down to its inputs by the chain rule.

``backward()`` orders the graph topologically and runs the closures from the output
back to the inputs. Gradients of leaves *accumulate* over calls (as in PyTorch): reset
them with :func:`zero_grad` or a module's ``zero_grad()`` between training steps.

>>> a, b = Value(2.0), Value(-3.0)
>>> c = a * b + a.exp()          # dc/da = b + e^a, dc/db = a
>>> c.backward()
>>> round(a.grad, 4), b.grad
(4.3891, 2.0)
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Iterable, Union

from companion.autodiff.grad_mode import is_grad_enabled
from companion.autodiff.graph import topological_order

__all__ = ["Value", "zero_grad"]

Number = Union[int, float]


def _noop() -> None:
    return None


class Value:
    """One scalar in a computation graph."""

    __slots__ = ("data", "grad", "_prev", "_op", "_backward", "label")

    def __init__(self, data: Number, _prev: tuple["Value", ...] = (), _op: str = "",
                 label: str = "") -> None:
        if isinstance(data, bool) or not isinstance(data, Real):
            raise TypeError(f"Value holds a real number, got {type(data).__name__}: {data!r}")
        self.data = float(data)
        self.grad = 0.0
        self._prev = _prev
        self._op = _op
        self._backward: Callable[[], None] = _noop
        self.label = label

    def __repr__(self) -> str:
        name = f"{self.label}: " if self.label else ""
        return f"Value({name}data={self.data:.4f}, grad={self.grad:.4f})"

    # -- building the graph -------------------------------------------------------------

    def _result(self, data: float, prev: tuple["Value", ...], op: str,
                backward: Callable[["Value"], Callable[[], None]]) -> "Value":
        """The output of an operation, recorded in the graph unless grad is disabled."""
        if not is_grad_enabled():
            return Value(data)
        out = Value(data, prev, op)
        out._backward = backward(out)
        return out

    @staticmethod
    def _lift(other: object, op: str) -> "Value":
        if isinstance(other, Value):
            return other
        if isinstance(other, Real) and not isinstance(other, bool):
            return Value(other)
        raise TypeError(
            f"unsupported operand for {op}: Value and {type(other).__name__} "
            "(use a Value, an int or a float)"
        )

    # -- arithmetic -----------------------------------------------------------------

    def __add__(self, other: Union["Value", Number]) -> "Value":
        other = self._lift(other, "+")

        def backward(out: Value) -> Callable[[], None]:
            def fn() -> None:
                self.grad += out.grad          # d(a+b)/da = 1
                other.grad += out.grad         # d(a+b)/db = 1
            return fn

        return self._result(self.data + other.data, (self, other), "+", backward)

    def __mul__(self, other: Union["Value", Number]) -> "Value":
        other = self._lift(other, "*")

        def backward(out: Value) -> Callable[[], None]:
            def fn() -> None:
                self.grad += other.data * out.grad   # d(ab)/da = b
                other.grad += self.data * out.grad   # d(ab)/db = a
            return fn

        return self._result(self.data * other.data, (self, other), "*", backward)

    def __pow__(self, exponent: Number) -> "Value":
        if isinstance(exponent, bool) or not isinstance(exponent, Real):
            raise TypeError(
                f"Value ** {type(exponent).__name__}: the exponent must be an int or a float"
            )
        exponent = float(exponent)
        if self.data == 0.0 and exponent < 0:
            raise ZeroDivisionError(f"0.0 ** {exponent} is undefined")
        if self.data < 0 and not exponent.is_integer():
            raise ValueError(f"{self.data} ** {exponent}: a negative base needs an integer exponent")

        def backward(out: Value) -> Callable[[], None]:
            def fn() -> None:
                self.grad += exponent * self.data ** (exponent - 1) * out.grad
            return fn

        return self._result(self.data ** exponent, (self,), f"**{exponent:g}", backward)

    def __neg__(self) -> "Value":
        return self * -1

    def __radd__(self, other: Number) -> "Value":
        return self + other

    def __sub__(self, other: Union["Value", Number]) -> "Value":
        return self + (-self._lift(other, "-"))

    def __rsub__(self, other: Number) -> "Value":
        return self._lift(other, "-") + (-self)

    def __rmul__(self, other: Number) -> "Value":
        return self * other

    def __truediv__(self, other: Union["Value", Number]) -> "Value":
        other = self._lift(other, "/")
        if other.data == 0.0:
            raise ZeroDivisionError("division of a Value by zero")
        return self * other ** -1

    def __rtruediv__(self, other: Number) -> "Value":
        return self._lift(other, "/") / self

    # -- functions ----------------------------------------------------------------------

    def _unary(self, data: float, local_grad: float, op: str) -> "Value":
        """An operation of one input whose derivative at this input is ``local_grad``."""
        def backward(out: Value) -> Callable[[], None]:
            def fn() -> None:
                self.grad += local_grad * out.grad  # chain rule
            return fn

        return self._result(data, (self,), op, backward)

    def exp(self) -> "Value":
        e = math.exp(self.data)
        return self._unary(e, e, "exp")                       # (e^x)' = e^x

    def log(self) -> "Value":
        if self.data <= 0:
            raise ValueError(f"log of a non-positive number: {self.data}")
        return self._unary(math.log(self.data), 1.0 / self.data, "log")

    def tanh(self) -> "Value":
        t = math.tanh(self.data)
        return self._unary(t, 1.0 - t * t, "tanh")            # tanh' = 1 - tanh^2

    def sigmoid(self) -> "Value":
        x = self.data  # two forms, so that exp never overflows
        s = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
        return self._unary(s, s * (1.0 - s), "sigmoid")       # s' = s (1 - s)

    def relu(self) -> "Value":
        positive = self.data > 0
        return self._unary(self.data if positive else 0.0, 1.0 if positive else 0.0, "relu")

    def leaky_relu(self, negative_slope: float = 0.01) -> "Value":
        slope = 1.0 if self.data > 0 else negative_slope
        return self._unary(self.data * slope, slope, "leaky_relu")

    # -- backward -----------------------------------------------------------------------

    def backward(self) -> None:
        """Fill ``grad`` of every node this value depends on with d(self)/d(node).

        Leaves (values not computed from others) accumulate: a second call adds the
        same gradients again. Intermediate nodes are reset first, so their ``grad``
        is always the one of this call.
        """
        order = topological_order(self)
        for node in order:
            if node._prev:
                node.grad = 0.0
        self.grad += 1.0  # d(self)/d(self)
        for node in reversed(order):
            node._backward()


def zero_grad(values: Iterable[Value]) -> None:
    """Set ``grad`` of each value to 0 (call it between training steps)."""
    for v in values:
        v.grad = 0.0
