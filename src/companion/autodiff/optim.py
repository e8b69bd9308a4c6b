"""Optimizers for the tensor engine: SGD with momentum, Adam and AdamW.

Each follows the update PyTorch's optimizer of the same name performs, in the same
order of floating-point operations where it matters, so that the same gradients give
the same parameters (tested in float64). Updates are written in place into
``param.data`` and into the optimizer's own state arrays.

SGD with momentum ``mu``:   ``b = mu * b + g``,   ``p -= lr * b``.

Adam (Kingma and Ba, 2015):  ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with the bias corrections
``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``. Adam's ``weight_decay`` adds
``wd * p`` to the gradient; AdamW (Loshchilov and Hutter, 2019) instead shrinks the
parameter directly, ``p -= lr * wd * p``, which is what "weight decay" should mean.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from companion.autodiff.tensor import Tensor

__all__ = ["SGD", "Adam", "AdamW", "Optimizer"]


class Optimizer:
    """Holds the parameters; ``zero_grad()`` forgets their gradients."""

    def __init__(self, params: Iterable[Tensor], lr: float) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("the optimizer got an empty list of parameters")
        if lr <= 0:
            raise ValueError(f"lr={lr!r} must be positive")
        for p in self.params:
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise TypeError("every parameter must be a Tensor with requires_grad=True")
        self.lr = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum and L2 weight decay."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.buffers: list[np.ndarray | None] = [None] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.momentum:
                if self.buffers[i] is None:
                    self.buffers[i] = np.array(g)  # first step: the buffer is the gradient
                else:
                    self.buffers[i] *= self.momentum
                    self.buffers[i] += g
                g = self.buffers[i]
            p.data -= self.lr * g


class Adam(Optimizer):
    """Adam; ``weight_decay`` is L2 regularisation added to the gradient (as torch.optim.Adam)."""

    decoupled = False

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]

    def step(self) -> None:
        self.t += 1
        b1, b2, lr = self.beta1, self.beta2, self.lr
        step_size = lr / (1 - b1 ** self.t)
        sqrt_bc2 = math.sqrt(1 - b2 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                if self.decoupled:
                    p.data *= 1 - lr * self.weight_decay
                else:
                    g = g + self.weight_decay * p.data
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            denom = np.sqrt(v)
            denom /= sqrt_bc2
            denom += self.eps
            p.data -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01, as torch.optim.AdamW)."""

    decoupled = True

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)
