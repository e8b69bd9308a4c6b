"""Small two-dimensional classification data sets, generated here (no download).

Each function returns ``X`` of shape ``(N, 2)`` (float64) and ``y`` of shape ``(N,)``
with labels 0 and 1 (int64), and is repeatable: the same ``seed`` gives the same points.
They are for watching a tiny network draw a curved decision boundary (chapter 4).

>>> X, y = make_moons(6, seed=0)
>>> X.shape, y.tolist()
((6, 2), [0, 0, 0, 1, 1, 1])
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_circles", "make_moons", "make_spirals"]


def _check(n: int, noise: float) -> None:
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n={n!r} must be an int of at least 2 (one point per class)")
    if noise < 0:
        raise ValueError(f"noise={noise!r} must be >= 0")


def make_moons(n: int = 100, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles: class 0 on top, class 1 shifted below and right.

    Half the points (rounded down) are class 0. Gaussian noise of standard deviation
    ``noise`` is added to both coordinates.
    """
    _check(n, noise)
    rng = np.random.default_rng(seed)
    n0 = n // 2
    n1 = n - n0
    a0 = np.linspace(0.0, np.pi, n0)
    a1 = np.linspace(0.0, np.pi, n1)
    top = np.stack([np.cos(a0), np.sin(a0)], axis=1)
    bottom = np.stack([1.0 - np.cos(a1), 0.5 - np.sin(a1)], axis=1)
    X = np.concatenate([top, bottom]) + noise * rng.standard_normal((n, 2))
    y = np.concatenate([np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)])
    return X, y


def make_circles(n: int = 100, noise: float = 0.05, factor: float = 0.5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric circles: class 0 outside (radius 1), class 1 inside (radius ``factor``)."""
    _check(n, noise)
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor={factor!r} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    n0 = n // 2
    n1 = n - n0
    a0 = np.linspace(0.0, 2 * np.pi, n0, endpoint=False)
    a1 = np.linspace(0.0, 2 * np.pi, n1, endpoint=False)
    outer = np.stack([np.cos(a0), np.sin(a0)], axis=1)
    inner = factor * np.stack([np.cos(a1), np.sin(a1)], axis=1)
    X = np.concatenate([outer, inner]) + noise * rng.standard_normal((n, 2))
    y = np.concatenate([np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)])
    return X, y


def make_spirals(n: int = 100, noise: float = 0.05, turns: float = 1.5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved spirals of ``turns`` turns; class 1 is class 0 rotated by 180 degrees."""
    _check(n, noise)
    rng = np.random.default_rng(seed)
    n0 = n // 2
    n1 = n - n0

    def arm(m: int, phase: float) -> np.ndarray:
        t = np.linspace(0.1, 1.0, m)
        angle = 2 * np.pi * turns * t + phase
        return np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)

    X = np.concatenate([arm(n0, 0.0), arm(n1, np.pi)]) + noise * rng.standard_normal((n, 2))
    y = np.concatenate([np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)])
    return X, y
