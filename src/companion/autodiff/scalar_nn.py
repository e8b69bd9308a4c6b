"""Neurons, layers and multi-layer perceptrons made of scalar :class:`Value` objects.

A neuron computes ``act(w . x + b)``; a layer is a list of neurons that read the same
input; an MLP is a list of layers. Every weight is a ``Value``, so ``loss.backward()``
reaches all of them and a gradient-descent update is one line per parameter.

>>> mlp = MLP(2, [4, 1], seed=0)
>>> out = mlp([1.0, -2.0])
>>> len(mlp.parameters()), type(out).__name__
(17, 'Value')
"""

from __future__ import annotations

import random
from typing import Sequence, Union

from companion.autodiff.value import Value

__all__ = ["Layer", "MLP", "Neuron"]

ACTIVATIONS = ("tanh", "relu", "sigmoid", "linear")
Scalar = Union[Value, float]


class ScalarModule:
    """What neurons, layers and MLPs share: their parameters and ``zero_grad``."""

    def parameters(self) -> list[Value]:
        return []

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = 0.0


class Neuron(ScalarModule):
    """``act(sum_i w_i x_i + b)`` with weights drawn uniformly from [-1/sqrt(n), 1/sqrt(n)]."""

    def __init__(self, n_in: int, activation: str = "tanh", rng: random.Random | None = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
        rng = rng or random.Random(0)
        bound = n_in ** -0.5
        self.w = [Value(rng.uniform(-bound, bound)) for _ in range(n_in)]
        self.b = Value(0.0)
        self.activation = activation

    def __call__(self, x: Sequence[Scalar]) -> Value:
        if len(x) != len(self.w):
            raise ValueError(f"this neuron takes {len(self.w)} inputs, got {len(x)}")
        z = self.b
        for wi, xi in zip(self.w, x):
            z = z + wi * xi
        if self.activation == "linear":
            return z
        return getattr(z, self.activation)()

    def parameters(self) -> list[Value]:
        return [*self.w, self.b]


class Layer(ScalarModule):
    """``n_out`` neurons reading the same ``n_in`` inputs."""

    def __init__(self, n_in: int, n_out: int, activation: str = "tanh",
                 rng: random.Random | None = None):
        rng = rng or random.Random(0)
        self.neurons = [Neuron(n_in, activation, rng) for _ in range(n_out)]

    def __call__(self, x: Sequence[Scalar]) -> list[Value]:
        return [n(x) for n in self.neurons]

    def parameters(self) -> list[Value]:
        return [p for n in self.neurons for p in n.parameters()]


class MLP(ScalarModule):
    """Layers of sizes ``sizes``; hidden layers use ``activation``, the last is linear.

    With one output neuron, calling the MLP returns a ``Value``; otherwise a list.
    """

    def __init__(self, n_in: int, sizes: Sequence[int], activation: str = "tanh", seed: int = 0):
        if not sizes:
            raise ValueError("sizes is empty: give at least the output layer's size")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
        rng = random.Random(seed)
        dims = [n_in, *sizes]
        self.layers = [
            Layer(dims[i], dims[i + 1], activation if i < len(sizes) - 1 else "linear", rng)
            for i in range(len(sizes))
        ]

    def __call__(self, x: Sequence[Scalar]) -> Union[Value, list[Value]]:
        out: list = list(x)
        for layer in self.layers:
            out = layer(out)
        return out[0] if len(out) == 1 else out

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer.parameters()]
