"""Layers on the tensor engine: ``Module``, ``Linear``, ``Embedding``, ``LayerNorm``, ...

A :class:`Module` finds its parameters by looking at its attributes: every ``Tensor``
with ``requires_grad=True`` is a parameter, every ``Module`` (or list of modules) is a
child whose parameters are included, with dotted names like PyTorch's
(``blocks.0.attn.query.weight``). That is all the machinery there is.

One deliberate difference from PyTorch: ``Linear.weight`` has shape ``(C_in, C_out)``,
so the layer is literally ``x @ W + b``. PyTorch stores the transpose, ``(C_out, C_in)``.

>>> layer = Linear(3, 2, rng=np.random.default_rng(0))
>>> [(name, p.shape) for name, p in layer.named_parameters()]
[('weight', (3, 2)), ('bias', (2,))]
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from companion.autodiff import functional as F
from companion.autodiff.tensor import Tensor

__all__ = [
    "Dropout", "Embedding", "GELU", "LayerNorm", "Linear", "MLP", "Module", "ReLU", "Sequential",
    "Tanh",
]


def generator(rng: np.random.Generator | None) -> np.random.Generator:
    """``rng``, or a new generator drawn from numpy's global state (seeded by seed_everything)."""
    return rng if rng is not None else np.random.default_rng(np.random.randint(0, 2**31 - 1))


class Module:
    """Base class: parameters found by attribute, ``zero_grad``, ``train``/``eval``."""

    training: bool = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def children(self) -> Iterator[tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and value.requires_grad:
                yield prefix + name, value
        for name, child in self.children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> "Module":
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)


class Linear(Module):
    """``y = x @ weight + bias``; weight ``(C_in, C_out)`` drawn from U(-1/sqrt(C_in), 1/sqrt(C_in))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = np.float64, rng: np.random.Generator | None = None) -> None:
        rng, bound = generator(rng), in_features ** -0.5
        self.weight = Tensor(rng.uniform(-bound, bound, (in_features, out_features)),
                             requires_grad=True, dtype=dtype)
        self.bias = (Tensor(rng.uniform(-bound, bound, out_features), requires_grad=True,
                            dtype=dtype) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    """A table of ``num_embeddings`` vectors of size ``embedding_dim``, looked up by index."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Any = np.float64,
                 rng: np.random.Generator | None = None) -> None:
        self.weight = Tensor(generator(rng).standard_normal((num_embeddings, embedding_dim)),
                             requires_grad=True, dtype=dtype)

    def forward(self, indices: np.ndarray) -> Tensor:
        return F.embedding(indices, self.weight)


class LayerNorm(Module):
    """Normalise the last axis, then scale by ``weight`` (ones) and shift by ``bias`` (zeros)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, dtype: Any = np.float64) -> None:
        self.weight = Tensor(np.ones(normalized_shape), requires_grad=True, dtype=dtype)
        self.bias = Tensor(np.zeros(normalized_shape), requires_grad=True, dtype=dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Zero each element with probability ``p`` while training; identity in eval mode."""

    def __init__(self, p: float = 0.1, rng: np.random.Generator | None = None) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p!r} must be in [0, 1)")
        self.p, self.rng = p, rng

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training, self.rng)


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.relu()


class GELU(Module):
    """GELU in its tanh form (as GPT-2 and ``nn.GELU(approximate="tanh")``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.tanh()


class Sequential(Module):
    """Modules applied one after the other."""

    def __init__(self, *layers: Module) -> None:
        self.layers = list(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MLP(Sequential):
    """``Linear`` layers of sizes ``sizes`` with ``activation`` between them (not after the last)."""

    def __init__(self, n_in: int, sizes: Sequence[int], activation: str = "tanh",
                 dtype: Any = np.float64, rng: np.random.Generator | None = None) -> None:
        acts = {"tanh": Tanh, "relu": ReLU, "gelu": GELU}
        if activation not in acts:
            raise ValueError(f"activation={activation!r} must be one of {sorted(acts)}")
        rng, dims, layers = generator(rng), [n_in, *sizes], []
        for i in range(len(sizes)):
            layers.append(Linear(dims[i], dims[i + 1], dtype=dtype, rng=rng))
            if i < len(sizes) - 1:
                layers.append(acts[activation]())
        super().__init__(*layers)
