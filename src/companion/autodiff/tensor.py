"""A numpy tensor engine: :class:`Tensor`, the scalar ``Value`` made array-wide.

Each ``Tensor`` wraps one ``numpy.ndarray`` (``data``). An operation on tensors that
require gradients records its inputs (``_prev``) and a closure (``_backward``) that
receives the gradient of the output, of the output's shape, and adds each input's
share to that input's ``grad``. ``backward()`` runs the closures in reverse
topological order, exactly as the scalar engine does, but each closure now moves a
whole array with a few vectorised numpy calls.

Broadcasting is the one new idea. When numpy stretches an input to the output's shape
in the forward pass, the input was *used several times*, so its gradient is the *sum*
of the stretched gradient over the stretched axes (:func:`unbroadcast`).

>>> x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
>>> y = Tensor([10.0, 20.0], requires_grad=True)     # broadcast over the rows of x
>>> (x * y).sum().backward()
>>> y.grad                                           # column sums of x
array([4., 6.])
"""

from __future__ import annotations

from numbers import Real
from typing import Any, Callable, Sequence, Union

import numpy as np

from companion.autodiff.grad_mode import is_grad_enabled
from companion.autodiff.graph import topological_order

__all__ = ["Tensor", "as_tensor", "unbroadcast"]

Array = np.ndarray
Operand = Union["Tensor", Array, int, float]


def unbroadcast(grad: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``grad`` down to ``shape``: the gradient of an input that was broadcast.

    Two things can have happened to the input in the forward pass, and both are
    undone by a sum:

    * it had fewer dimensions, so numpy added leading ones (a bias of shape ``(C,)``
      added to ``(B, T, C)``): sum over the extra leading axes;
    * it had size 1 on an axis that the other input had larger (``(N, 1)`` against
      ``(N, M)``): sum over that axis, keeping it with size 1.

    >>> g = np.ones((2, 3))
    >>> unbroadcast(g, (3,)), unbroadcast(g, (2, 1))
    (array([2., 2., 2.]), array([[3.],
           [3.]]))
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _normalize_axes(axis: Union[int, Sequence[int], None], ndim: int) -> tuple[int, ...]:
    """``axis`` as a sorted tuple of non-negative axes, checked against ``ndim``."""
    if axis is None or (ndim == 0 and axis in (0, -1, (), (0,), (-1,))):
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(int(a) % max(ndim, 1))
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis} repeats an axis")
    return tuple(sorted(out))


def _is_basic_index(index: Any) -> bool:
    """True for indexes made only of ints, slices, None and Ellipsis (no repeats possible)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(
        isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in items
    )


class Tensor:
    """An n-dimensional array that can record the operations applied to it.

    ``Tensor(data, requires_grad=False, dtype=None)``: ``data`` is anything
    ``numpy.asarray`` accepts that holds numbers. Floating arrays keep their dtype;
    other numbers become float64 unless ``dtype`` says otherwise.
    """

    __slots__ = ("data", "grad", "requires_grad", "_prev", "_backward", "_op", "name")
    __array_ufunc__ = None  # `ndarray + Tensor` calls Tensor.__radd__, not numpy

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None,
                 name: str = "") -> None:
        if isinstance(data, Tensor):
            raise TypeError("Tensor(Tensor) is ambiguous: use t.detach() or Tensor(t.data)")
        array = np.asarray(data)
        if array.dtype.kind not in "biuf":
            raise TypeError(
                f"Tensor needs numbers, got dtype {array.dtype} from {type(data).__name__}"
            )
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        elif array.dtype.kind != "f":
            array = array.astype(np.float64)
        if requires_grad:
            if array.dtype.kind != "f":
                raise TypeError(f"only floating tensors can require gradients, not {array.dtype}")
            array = np.array(array)  # a parameter owns its data: optimizers write into it
        self.data: Array = array
        self.grad: Array | None = None
        self.requires_grad = bool(requires_grad)
        self._prev: tuple[Tensor, ...] = ()
        self._backward: Callable[[Array], None] | None = None
        self._op = ""
        self.name = name

    # -- small conveniences -------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        body = np.array2string(self.data, precision=4, separator=", ", threshold=20)
        extra = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({body}{extra})"

    def item(self) -> float:
        return self.data.item()

    def numpy(self) -> Array:
        return self.data

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    # -- recording operations ---------------------------------------------------------

    @staticmethod
    def _make(data: Array, parents: tuple["Tensor", ...], op: str,
              backward: Callable[[Array], None]) -> "Tensor":
        """The result of an operation; recorded only if an input needs a gradient."""
        out = Tensor.__new__(Tensor)
        if type(data) is not np.ndarray:  # numpy returns scalars from 0-d arithmetic
            data = np.asarray(data)
        out.data, out.grad, out.name, out._op = data, None, "", op
        if is_grad_enabled() and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._prev = tuple(p for p in parents if p.requires_grad)
            out._backward = backward
        else:
            out.requires_grad, out._prev, out._backward = False, (), None
        return out

    def _accumulate(self, grad: Array) -> None:
        """Add ``grad`` (already of this tensor's shape) to ``self.grad``."""
        if grad.dtype != self.data.dtype:
            grad = grad.astype(self.data.dtype)
        if self.grad is None:
            # A leaf keeps its own copy: the same array may be handed to several inputs.
            self.grad = grad if self._prev else np.array(grad)
        else:
            self.grad = self.grad + grad

    def _lift(self, other: Operand, op: str) -> "Tensor":
        if isinstance(other, Tensor):
            return other
        if isinstance(other, Real) and not isinstance(other, bool):
            return Tensor(np.asarray(other, dtype=self.data.dtype))
        if isinstance(other, np.ndarray) and other.dtype.kind in "biuf":
            return Tensor(other, dtype=self.data.dtype if other.dtype.kind != "f" else None)
        raise TypeError(
            f"unsupported operand for {op}: Tensor and {type(other).__name__} "
            "(use a Tensor, a numpy array or a Python number)"
        )

    def _broadcast_shape(self, other: "Tensor", op: str) -> tuple[int, ...]:
        try:
            return np.broadcast_shapes(self.shape, other.shape)
        except ValueError:
            raise ValueError(
                f"shapes {self.shape} and {other.shape} cannot be broadcast together for {op}: "
                "aligned from the right, each pair of sizes must be equal or contain a 1"
            ) from None

    # -- elementwise arithmetic with broadcasting ---------------------------------------

    def __add__(self, other: Operand) -> "Tensor":
        other = self._lift(other, "+")
        self._broadcast_shape(other, "+")
        a, b = self, other

        def backward(g: Array) -> None:
            if a.requires_grad:
                a._accumulate(unbroadcast(g, a.shape))
            if b.requires_grad:
                b._accumulate(unbroadcast(g, b.shape))

        return Tensor._make(a.data + b.data, (a, b), "+", backward)

    def __sub__(self, other: Operand) -> "Tensor":
        other = self._lift(other, "-")
        self._broadcast_shape(other, "-")
        a, b = self, other

        def backward(g: Array) -> None:
            if a.requires_grad:
                a._accumulate(unbroadcast(g, a.shape))
            if b.requires_grad:
                b._accumulate(unbroadcast(-g, b.shape))

        return Tensor._make(a.data - b.data, (a, b), "-", backward)

    def __mul__(self, other: Operand) -> "Tensor":
        other = self._lift(other, "*")
        self._broadcast_shape(other, "*")
        a, b = self, other

        def backward(g: Array) -> None:
            if a.requires_grad:
                a._accumulate(unbroadcast(g * b.data, a.shape))
            if b.requires_grad:
                b._accumulate(unbroadcast(g * a.data, b.shape))

        return Tensor._make(a.data * b.data, (a, b), "*", backward)

    def __truediv__(self, other: Operand) -> "Tensor":
        other = self._lift(other, "/")
        self._broadcast_shape(other, "/")
        a, b = self, other
        out_data = a.data / b.data

        def backward(g: Array) -> None:
            if a.requires_grad:
                a._accumulate(unbroadcast(g / b.data, a.shape))
            if b.requires_grad:  # d(a/b)/db = -a/b^2 = -(a/b)/b
                b._accumulate(unbroadcast(-g * out_data / b.data, b.shape))

        return Tensor._make(out_data, (a, b), "/", backward)

    def __radd__(self, other: Operand) -> "Tensor":
        return self._lift(other, "+") + self

    def __rsub__(self, other: Operand) -> "Tensor":
        return self._lift(other, "-") - self

    def __rmul__(self, other: Operand) -> "Tensor":
        return self._lift(other, "*") * self

    def __rtruediv__(self, other: Operand) -> "Tensor":
        return self._lift(other, "/") / self

    def __neg__(self) -> "Tensor":
        a = self

        def backward(g: Array) -> None:
            a._accumulate(-g)

        return Tensor._make(-a.data, (a,), "neg", backward)

    def __pow__(self, exponent: Union[int, float]) -> "Tensor":
        if isinstance(exponent, bool) or not isinstance(exponent, Real):
            raise TypeError(
                f"Tensor ** {type(exponent).__name__}: the exponent must be a Python int or float"
            )
        a, p = self, float(exponent)

        def backward(g: Array) -> None:
            a._accumulate(g * p * a.data ** (p - 1))

        return Tensor._make(a.data ** p, (a,), f"**{p:g}", backward)

    # -- matrix multiplication ------------------------------------------------------------

    def __matmul__(self, other: "Tensor") -> "Tensor":
        other = self._lift(other, "@")
        a, b = self, other
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul needs tensors with at least 1 dimension, got {a.shape} @ {b.shape}")
        k_b = b.shape[-2] if b.ndim > 1 else b.shape[0]
        if a.shape[-1] != k_b:
            raise ValueError(
                f"matmul shapes {a.shape} @ {b.shape} do not match: "
                f"the last size of the left ({a.shape[-1]}) must equal the "
                f"{'second-to-last' if b.ndim > 1 else 'only'} size of the right ({k_b})"
            )
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(
                f"matmul batch dimensions {a.shape[:-2]} and {b.shape[:-2]} cannot be broadcast"
            ) from None

        def backward(g: Array) -> None:
            # Work with matrices: a vector on the left is a row, on the right a column.
            a2 = a.data if a.ndim > 1 else a.data[None, :]            # (..., N, K)
            b2 = b.data if b.ndim > 1 else b.data[:, None]            # (..., K, M)
            batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
            g2 = g.reshape(*batch, a2.shape[-2], b2.shape[-1])        # (..., N, M)
            if a.requires_grad:                                       # dA = G @ B^T
                ga = g2 @ np.swapaxes(b2, -1, -2)
                a._accumulate(unbroadcast(ga, a2.shape).reshape(a.shape))
            if b.requires_grad:                                       # dB = A^T @ G
                if b.ndim == 2 and a2.ndim > 2:  # one weight shared by a batch: one product
                    gb = a2.reshape(-1, a2.shape[-1]).T @ g2.reshape(-1, g2.shape[-1])
                else:
                    gb = np.swapaxes(a2, -1, -2) @ g2
                b._accumulate(unbroadcast(gb, b2.shape).reshape(b.shape))

        return Tensor._make(a.data @ b.data, (a, b), "@", backward)

    def __rmatmul__(self, other: Operand) -> "Tensor":
        return self._lift(other, "@") @ self

    # -- reductions -----------------------------------------------------------------------

    def sum(self, axis: Union[int, Sequence[int], None] = None, keepdims: bool = False) -> "Tensor":
        a, axes = self, _normalize_axes(axis, self.ndim)

        def backward(g: Array) -> None:
            if not keepdims:
                g = np.expand_dims(g, axes)
            a._accumulate(np.broadcast_to(g, a.shape))  # every summed element gets g

        return Tensor._make(a.data.sum(axis=axes, keepdims=keepdims), (a,), "sum", backward)

    def mean(self, axis: Union[int, Sequence[int], None] = None, keepdims: bool = False) -> "Tensor":
        axes = _normalize_axes(axis, self.ndim)
        count = int(np.prod([self.shape[i] for i in axes]))
        return self.sum(axes, keepdims) * (1.0 / max(count, 1))

    # -- shapes ---------------------------------------------------------------------------

    def reshape(self, *shape: Union[int, Sequence[int]]) -> "Tensor":
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        a = self
        try:
            out = a.data.reshape(shape)
        except ValueError:
            raise ValueError(f"cannot reshape a tensor of shape {a.shape} ({a.size} elements) "
                             f"into shape {tuple(shape)}") from None

        def backward(g: Array) -> None:
            a._accumulate(g.reshape(a.shape))

        return Tensor._make(out, (a,), "reshape", backward)

    def permute(self, *axes: int) -> "Tensor":
        """Reorder the axes (numpy's ``transpose(axes)``)."""
        if len(axes) == 1 and not isinstance(axes[0], (int, np.integer)):
            axes = tuple(axes[0])
        if sorted(int(x) % max(self.ndim, 1) for x in axes) != list(range(self.ndim)):
            raise ValueError(f"permute{tuple(axes)} is not a permutation of the {self.ndim} axes")
        a, inverse = self, np.argsort([int(x) % self.ndim for x in axes])

        def backward(g: Array) -> None:
            a._accumulate(g.transpose(inverse))

        return Tensor._make(a.data.transpose(axes), (a,), "permute", backward)

    def transpose(self, dim0: int = -2, dim1: int = -1) -> "Tensor":
        """Swap two axes (PyTorch's ``transpose``): ``(B, T, H, D) -> (B, H, T, D)`` for 1, 2."""
        axes = list(range(self.ndim))
        d0, d1 = (_normalize_axes(d, self.ndim)[0] for d in (dim0, dim1))
        axes[d0], axes[d1] = axes[d1], axes[d0]
        return self.permute(*axes)

    @property
    def T(self) -> "Tensor":
        return self.permute(*reversed(range(self.ndim)))

    def __getitem__(self, index: Any) -> "Tensor":
        if isinstance(index, Tensor):
            index = index.data
        elif isinstance(index, tuple):
            index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
        a, basic = self, _is_basic_index(index)

        def backward(g: Array) -> None:
            grad = np.zeros_like(a.data)
            if basic:
                grad[index] = g
            else:  # advanced indexes may repeat an element: its gradients add up
                np.add.at(grad, index, g)
            a._accumulate(grad)

        return Tensor._make(a.data[index], (a,), "getitem", backward)

    def masked_fill(self, mask: Array, value: float) -> "Tensor":
        """Put ``value`` where the boolean ``mask`` (broadcastable to self) is True."""
        mask = np.asarray(mask.data if isinstance(mask, Tensor) else mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
        try:
            if np.broadcast_shapes(mask.shape, self.shape) != self.shape:
                raise ValueError
        except ValueError:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to {self.shape}") from None
        a = self

        def backward(g: Array) -> None:
            a._accumulate(np.where(mask, 0, g))  # filled places no longer depend on a

        return Tensor._make(np.where(mask, a.data.dtype.type(value), a.data), (a,),
                            "masked_fill", backward)

    # -- elementwise functions ------------------------------------------------------------

    def exp(self) -> "Tensor":
        a, out = self, np.exp(self.data)

        def backward(g: Array) -> None:
            a._accumulate(g * out)

        return Tensor._make(out, (a,), "exp", backward)

    def log(self) -> "Tensor":
        a = self

        def backward(g: Array) -> None:
            a._accumulate(g / a.data)

        return Tensor._make(np.log(a.data), (a,), "log", backward)

    def tanh(self) -> "Tensor":
        a, out = self, np.tanh(self.data)

        def backward(g: Array) -> None:
            a._accumulate(g * (1 - out * out))

        return Tensor._make(out, (a,), "tanh", backward)

    def sigmoid(self) -> "Tensor":
        a = self
        e = np.exp(-np.abs(a.data))  # never overflows; two forms of 1 / (1 + e^-x)
        out = np.where(a.data >= 0, 1 / (1 + e), e / (1 + e))

        def backward(g: Array) -> None:
            a._accumulate(g * out * (1 - out))

        return Tensor._make(out, (a,), "sigmoid", backward)

    def relu(self) -> "Tensor":
        a, positive = self, self.data > 0

        def backward(g: Array) -> None:
            a._accumulate(g * positive)

        return Tensor._make(a.data * positive, (a,), "relu", backward)

    # -- backward -------------------------------------------------------------------------

    def backward(self, gradient: Union[Array, float, None] = None) -> None:
        """Add d(self)/d(leaf) to ``grad`` of every leaf that requires a gradient.

        ``self`` must be a single number unless ``gradient`` (the gradient of some
        scalar with respect to ``self``, of ``self``'s shape) is given. Leaves
        accumulate over calls; intermediate results are reset first.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no input of the "
                "computation had requires_grad=True, or it ran inside no_grad()"
            )
        if gradient is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() on a tensor of shape {self.shape} needs a gradient: only a "
                    "single number has an implicit gradient of 1; call .sum() first or pass "
                    "backward(gradient) of the same shape"
                )
            gradient = np.ones_like(self.data)
        else:
            gradient = np.asarray(gradient, dtype=self.dtype)
            if gradient.shape != self.shape:
                raise ValueError(
                    f"gradient has shape {gradient.shape}, but the tensor has shape {self.shape}"
                )
        order = topological_order(self)
        for node in order:
            if node._prev:
                node.grad = None
        self._accumulate(gradient)
        for node in reversed(order):
            if node._backward is not None and node.grad is not None:
                node._backward(node.grad)


def as_tensor(x: Any, dtype: Any = None) -> Tensor:
    """``x`` if it is already a Tensor, else a new constant Tensor of it."""
    return x if isinstance(x, Tensor) else Tensor(x, dtype=dtype)
