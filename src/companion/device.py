"""Picking a device and seeding every random number generator.

The book runs on a laptop CPU, on Apple silicon, on Colab and on Kaggle. Kaggle still
offers a P100 (compute capability 6.0), which recent PyTorch builds no longer ship
kernels for: ``torch.cuda.is_available()`` says True and the first kernel launch fails.
``pick_device`` checks the architecture before it trusts CUDA.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["cuda_arch_supported", "pick_device", "seed_everything"]


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and every GPU) with ``seed``.

    >>> seed_everything(1); a = torch.rand(1)
    >>> seed_everything(1); bool(torch.equal(a, torch.rand(1)))
    True
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)


def cuda_arch_supported(
    capability: tuple[int, int], arch_list: list[str]
) -> tuple[bool, str]:
    """Can a torch build compiled for ``arch_list`` run on a GPU of ``capability``?

    A build runs natively on every ``sm_XY`` it lists, and through PTX just-in-time
    compilation on any newer GPU when it lists ``compute_XY`` for an older one.

    >>> cuda_arch_supported((8, 0), ["sm_75", "sm_80", "sm_90"])
    (True, 'sm_80 is in the build')
    >>> cuda_arch_supported((6, 0), ["sm_75", "sm_80"])[0]
    False
    """
    major, minor = capability
    here = major * 10 + minor
    if f"sm_{here}" in arch_list:
        return True, f"sm_{here} is in the build"
    ptx = [int(a[len("compute_"):]) for a in arch_list if a.startswith("compute_")]
    if any(p <= here for p in ptx):
        return True, f"sm_{here} runs through PTX compute_{max(p for p in ptx if p <= here)}"
    built = ", ".join(arch_list) or "no GPU architectures"
    return False, f"this PyTorch build supports {built}, not sm_{here}"


def pick_device(prefer: str | None = None, verbose: bool = True) -> torch.device:
    """Return the best device this machine can actually run: cuda, then mps, then cpu.

    ``prefer`` forces one ("cpu", "cuda", "mps"); it is checked like the default order
    and falls back to cpu with a printed reason when it cannot run. The environment
    variable ``COMPANION_DEVICE`` does the same as ``prefer``.
    """
    prefer = prefer or os.environ.get("COMPANION_DEVICE") or None
    if prefer not in (None, "cpu", "cuda", "mps"):
        raise ValueError(f"prefer={prefer!r} must be one of None, 'cpu', 'cuda', 'mps'")

    def say(msg: str) -> None:
        if verbose:
            print(msg)

    if prefer == "cpu":
        return torch.device("cpu")
    if prefer in (None, "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        ok, why = cuda_arch_supported(
            torch.cuda.get_device_capability(0), torch.cuda.get_arch_list()
        )
        if ok:
            return torch.device("cuda")
        say(f"Not using the GPU {name}: {why}. Falling back to the CPU.")
    elif prefer == "cuda":
        say("CUDA was asked for but is not available. Falling back to the CPU.")
    mps = getattr(torch.backends, "mps", None)
    if prefer in (None, "mps") and mps is not None and mps.is_available():
        return torch.device("mps")
    if prefer == "mps":
        say("MPS was asked for but is not available. Falling back to the CPU.")
    return torch.device("cpu")
