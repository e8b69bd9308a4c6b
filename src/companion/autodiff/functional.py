"""Neural-network operations on :class:`Tensor`, each with a hand-written backward.

Each of these could be composed from the primitive operations of ``Tensor`` (exp,
sum, division, ...), and backward would still be right. Writing the backward by hand
instead ("fusing" the operation) does two things: the graph holds one node instead of
five to ten, and the gradient formula is the short one from the derivation, which is
both faster and numerically better (softmax's backward never divides, cross-entropy's
gradient is just ``(P - Y) / N``).

Shapes use the book's letters: ``N`` rows, ``C`` channels (features), ``V`` classes.
"""

from __future__ import annotations

import math

import numpy as np

from companion.autodiff.tensor import Array, Tensor, _normalize_axes

__all__ = [
    "cross_entropy",
    "dropout",
    "embedding",
    "gelu",
    "layer_norm",
    "leaky_relu",
    "linear",
    "log_softmax",
    "relu",
    "softmax",
]


def _single_axis(axis: int, ndim: int) -> int:
    return _normalize_axes(axis, ndim)[0]


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``exp(x) / sum(exp(x))`` along ``axis``, computed as ``exp(x - max)`` (no overflow).

    Backward, with ``P`` the output and ``G`` its gradient: ``P * (G - sum(G * P))``,
    the sum taken along ``axis``.

    >>> softmax(Tensor([[10.0, 11.0], [5.0, 2.0]])).data.round(2)
    array([[0.27, 0.73],
           [0.95, 0.05]])
    """
    axis = _single_axis(axis, x.ndim)
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=axis, keepdims=True)

    def backward(g: Array) -> None:
        x._accumulate(p * (g - (g * p).sum(axis=axis, keepdims=True)))

    return Tensor._make(p, (x,), "softmax", backward)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``log(softmax(x))`` along ``axis``, as ``x - max - log(sum(exp(x - max)))``.

    Backward: ``G - softmax(x) * sum(G)``, the sum taken along ``axis``.
    """
    axis = _single_axis(axis, x.ndim)
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(g: Array) -> None:
        x._accumulate(g - np.exp(out) * g.sum(axis=axis, keepdims=True))

    return Tensor._make(out, (x,), "log_softmax", backward)


def cross_entropy(logits: Tensor, targets: Array) -> Tensor:
    """Mean of ``-log softmax(logits)[i, targets[i]]`` over the rows: the language-model loss.

    ``logits``: ``(..., V)``; ``targets``: integers in ``[0, V)`` of shape ``(...)``.
    The probability of each row's target is picked with one vectorised index,
    ``logp[np.arange(N), targets]``, not a Python loop. The gradient is
    ``(P - Y) / N`` with ``P`` the softmax and ``Y`` the one-hot targets.

    >>> round(cross_entropy(Tensor([[0.0, 0.0]]), np.array([1])).item(), 4)  # log 2
    0.6931
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets of shape {targets.shape} do not match logits of shape {logits.shape}: "
            f"expected targets of shape {logits.shape[:-1]}"
        )
    n_classes = logits.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= n_classes):
        bad = targets[(targets < 0) | (targets >= n_classes)].flat[0]
        raise ValueError(f"target {bad} is out of range for {n_classes} classes")
    z = logits.data.reshape(-1, n_classes)                      # (N, V)
    t = targets.reshape(-1)                                     # (N,)
    n = z.shape[0]
    rows = np.arange(n)
    shifted = z - z.max(axis=1, keepdims=True)
    exps = np.exp(shifted)
    sums = exps.sum(axis=1, keepdims=True)
    loss = np.log(sums[:, 0]).sum() - shifted[rows, t].sum()    # sum of -log p[i, t_i]
    loss = np.asarray(loss / n, dtype=z.dtype)

    def backward(g: Array) -> None:
        grad = exps / sums                                      # P
        grad[rows, t] -= 1.0                                    # P - Y
        grad *= g / n
        logits._accumulate(grad.reshape(logits.shape))

    return Tensor._make(loss, (logits,), "cross_entropy", backward)


def relu(x: Tensor) -> Tensor:
    """``max(x, 0)``."""
    return x.relu()


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """``x`` where positive, ``negative_slope * x`` elsewhere."""
    slope = np.where(x.data > 0, 1.0, negative_slope).astype(x.dtype)

    def backward(g: Array) -> None:
        x._accumulate(g * slope)

    return Tensor._make(x.data * slope, (x,), "leaky_relu", backward)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh form: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    Equal to ``torch.nn.functional.gelu(x, approximate="tanh")``, the form GPT-2 uses.
    """
    a = x.data
    inner = a * a                       # written in place, step by step, to save memory passes
    inner *= 0.044715
    inner += 1.0
    inner *= a
    inner *= _GELU_C                    # sqrt(2/pi) (x + 0.044715 x^3)
    t = np.tanh(inner)
    half_a = 0.5 * a
    out = t + 1.0
    out *= half_a

    def backward(g: Array) -> None:
        # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        d_inner = a * a
        d_inner *= 3 * 0.044715 * _GELU_C
        d_inner += _GELU_C
        grad = 1.0 - t * t
        grad *= half_a
        grad *= d_inner
        grad += 0.5
        grad += 0.5 * t
        grad *= g
        x._accumulate(grad)

    return Tensor._make(out, (x,), "gelu", backward)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise the last axis to mean 0 and variance 1, then scale and shift.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance (as
    PyTorch). ``x``: ``(..., C)``; ``weight``, ``bias``: ``(C,)``.

    Backward, with ``xhat`` the normalised input and ``d = G * weight``:
    ``dx = (d - mean(d) - xhat * mean(d * xhat)) / sqrt(var + eps)``.
    """
    n_ch = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (n_ch,):
            raise ValueError(f"layer_norm {name} has shape {p.shape}, expected ({n_ch},)")
    a = x.data
    mu = a.mean(axis=-1, keepdims=True)
    centred = a - mu
    var = (centred * centred).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = centred * rstd
    out = xhat * weight.data if weight is not None else xhat
    if bias is not None:
        out = out + bias.data

    def backward(g: Array) -> None:
        lead = tuple(range(g.ndim - 1))
        if weight is not None and weight.requires_grad:
            weight._accumulate((g * xhat).sum(axis=lead))
        if bias is not None and bias.requires_grad:
            bias._accumulate(g.sum(axis=lead))
        if x.requires_grad:
            d = g * weight.data if weight is not None else g
            x._accumulate(rstd * (d - d.mean(axis=-1, keepdims=True)
                                  - xhat * (d * xhat).mean(axis=-1, keepdims=True)))

    parents = tuple(p for p in (x, weight, bias) if p is not None)
    return Tensor._make(out, parents, "layer_norm", backward)


def embedding(indices: Array, weight: Tensor) -> Tensor:
    """Rows of ``weight`` ``(V, C)`` picked by integer ``indices`` of any shape ``(...)``.

    Output ``(..., C)``. A row picked several times receives the sum of the gradients.
    """
    idx = np.asarray(indices.data if isinstance(indices, Tensor) else indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding indices must be integers, got dtype {idx.dtype}")
    n_rows = weight.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        bad = idx[(idx < 0) | (idx >= n_rows)].flat[0]
        raise ValueError(f"index {bad} is out of range for an embedding of {n_rows} rows")

    def backward(g: Array) -> None:
        grad = np.zeros_like(weight.data)
        np.add.at(grad, idx.reshape(-1), g.reshape(-1, weight.shape[1]))
        weight._accumulate(grad)

    return Tensor._make(weight.data[idx], (weight,), "embedding", backward)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight + bias`` with ``weight`` ``(C_in, C_out)``; ``x`` ``(..., C_in)``.

    The leading axes are flattened so that forward and backward are single matrix
    products: ``dW = X^T G``, ``dX = G W^T``, ``db = sum of G over rows``.
    """
    c_in, c_out = weight.shape
    if x.shape[-1] != c_in:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight expects {c_in}")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"linear: bias has shape {bias.shape}, expected ({c_out},)")
    x2 = x.data.reshape(-1, c_in)                                # (N, C_in)
    out = x2 @ weight.data
    if bias is not None:
        out += bias.data
    out = out.reshape(*x.shape[:-1], c_out)                      # (..., C_out)

    def backward(g: Array) -> None:
        g2 = g.reshape(-1, c_out)                                # (N, C_out)
        if weight.requires_grad:
            weight._accumulate(x2.T @ g2)
        if bias is not None and bias.requires_grad:
            bias._accumulate(g2.sum(axis=0))
        if x.requires_grad:
            x._accumulate((g2 @ weight.data.T).reshape(x.shape))

    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._make(out, parents, "linear", backward)


def dropout(x: Tensor, p: float, training: bool = True,
            rng: np.random.Generator | None = None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Identity when ``training`` is False or ``p`` is 0, so evaluation needs no rescaling.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r} must be in [0, 1)")
    if not training or p == 0.0:
        return x
    # Without a generator, numpy's global one (seeded by seed_everything) keeps runs repeatable.
    uniform = rng.random(x.shape) if rng is not None else np.random.random_sample(x.shape)
    mask = (uniform >= p).astype(x.dtype) / x.dtype.type(1.0 - p)

    def backward(g: Array) -> None:
        x._accumulate(g * mask)

    return Tensor._make(x.data * mask, (x,), "dropout", backward)
