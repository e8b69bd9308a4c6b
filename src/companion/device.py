"""Picking a device, choosing how to compute on it, and seeding every random number generator.

The book runs on a laptop CPU, on Apple silicon, on Colab and on Kaggle. Kaggle still
offers a P100 (compute capability 6.0), which recent PyTorch builds no longer ship
kernels for: ``torch.cuda.is_available()`` says True and the first kernel launch fails.
``pick_device`` checks the architecture before it trusts CUDA.

Once the device is chosen, ``plan_device`` decides, in one place, how to compute on it:
which autocast dtype (bfloat16 needs compute capability 8.0, so a T4 gets float16 with a
gradient scaler), whether ``torch.compile`` can work (Triton needs 7.0, Inductor on a CPU
needs a C++ compiler) and which attention kernel to expect. ``describe_device`` reads the
machine; ``choose_plan`` is a pure function of what it read, so every rule is testable
without the hardware.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DeviceInfo",
    "DevicePlan",
    "choose_plan",
    "cpu_info",
    "cuda_arch_supported",
    "describe_device",
    "pick_device",
    "plan_device",
    "seed_everything",
]


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


# ---- how to compute on the chosen device ------------------------------------------------

DEVICE_TYPES = ("cpu", "cuda", "mps")
ATTENTION_BACKENDS = ("flash", "efficient", "math")  # torch.nn.attention.SDPBackend, lower-cased


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is: its ``type`` ("cpu", "cuda", "mps"), its ``name``, the CUDA compute
    ``capability`` (``(major, minor)``, ``None`` off CUDA), whether a C++ compiler for
    Inductor's CPU kernels is on the PATH, the CUDA device ``index`` (``None``: the current
    one), and for a CPU whether Inductor generates code for its own vector instruction set
    (``cpu_vector_isa``).

    >>> DeviceInfo("cuda", "Tesla T4", (7, 5), has_cxx_compiler=True).capability
    (7, 5)
    >>> DeviceInfo("cuda", "Tesla T4", None, has_cxx_compiler=True)
    Traceback (most recent call last):
    ValueError: capability=None must be a (major, minor) pair of ints for a cuda device
    """

    type: str
    name: str
    capability: tuple[int, int] | None
    has_cxx_compiler: bool
    index: int | None = None
    cpu_vector_isa: bool = True

    def __post_init__(self) -> None:
        if self.type not in DEVICE_TYPES:
            raise ValueError(f"type={self.type!r} must be one of {', '.join(map(repr, DEVICE_TYPES))}")
        if self.type == "cuda":
            cap = self.capability
            if not (isinstance(cap, tuple) and len(cap) == 2 and all(isinstance(c, int) for c in cap)):
                raise ValueError(f"capability={cap!r} must be a (major, minor) pair of ints for a cuda device")
        elif self.capability is not None:
            raise ValueError(f"capability={self.capability!r} must be None for a {self.type} device")


def cpu_info(field: str, path: str = "/proc/cpuinfo") -> str:
    """The value of ``field`` (``"vendor_id"``, ``"flags"``) for the first processor in
    ``/proc/cpuinfo``, or ``""`` where there is no such file (macOS, Windows) or field."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cxx_compiler() -> str | None:
    """Path of the C++ compiler Inductor would use for CPU kernels, or None if none is on the PATH."""
    try:
        from torch._inductor import config  # private: may be missing or changed in another torch

        cxx = config.cpp.cxx  # (None, $CXX or "g++"); None means "fetch gcc from conda if asked to"
        candidates = list(cxx) if isinstance(cxx, (list, tuple)) else [cxx]
    except Exception:
        candidates = ["g++", "c++", "clang++"]
    for name in candidates:
        if isinstance(name, str) and name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_vector_isa() -> bool:
    """Does Inductor generate code for this CPU's own vector instruction set?

    Not on a CPU without AVX2 (or NEON), nor when PyTorch is told to use its portable kernels
    (``ATEN_CPU_CAPABILITY=default``): the scalar fallback then fails to build in torch 2.13
    (the generated reductions still name ``at::vec``). Nor when it is told to use a lower
    one than the CPU has (``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU): with one thread,
    the compiled one-row products then come out wrong in torch 2.13. The plan runs such a
    CPU eagerly.
    """
    try:  # private: may move in another torch
        from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

        isa, best = pick_vec_isa(), valid_vec_isa_list()
        return bool(isa) and (not best or str(isa) == str(best[0]))
    except Exception:
        return True  # cannot tell: let torch.compile try


def describe_device(device: torch.device | str) -> DeviceInfo:
    """Read what ``device`` is on this machine: name, compute capability, C++ compiler.

    >>> info = describe_device(torch.device("cpu"))
    >>> info.type, info.capability
    ('cpu', None)
    """
    device = torch.device(device)
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device={str(device)!r} must be of type {', '.join(map(repr, DEVICE_TYPES))}")
    has_cxx = _cxx_compiler() is not None
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return DeviceInfo("cuda", torch.cuda.get_device_name(index),
                          tuple(torch.cuda.get_device_capability(index)), has_cxx, index)
    if device.type == "mps":
        return DeviceInfo("mps", f"Apple {platform.machine() or 'silicon'} (MPS)", None, has_cxx)
    return DeviceInfo("cpu", platform.processor() or platform.machine() or "CPU", None, has_cxx,
                      cpu_vector_isa=_cpu_vector_isa())


_DTYPE_NAMES = {None: "float32", torch.bfloat16: "bfloat16 autocast",
                torch.float16: "float16 autocast with a gradient scaler"}


@dataclass(frozen=True)
class DevicePlan:
    """How to compute on ``device``: the autocast dtype (``None``: plain float32), whether a
    gradient scaler guards the backward pass (exactly when the dtype is float16), whether to
    ``torch.compile``, the scaled-dot-product attention kernel to expect ("flash",
    "efficient" or "math"), and one line per fallback saying why it was taken.

    >>> plan = DevicePlan(torch.device("cpu"), None, False, True, "flash")
    >>> plan.summary()
    'cpu: float32, torch.compile, flash attention'
    >>> with plan.autocast():
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    >>> DevicePlan(torch.device("cuda"), torch.float16, False, True, "efficient")
    Traceback (most recent call last):
    ValueError: grad_scaler=False must be True exactly when autocast_dtype is torch.float16 (got torch.float16)
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    grad_scaler: bool
    compile: bool
    attention: str
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.autocast_dtype not in _DTYPE_NAMES:
            raise ValueError(f"autocast_dtype={self.autocast_dtype!r} must be None, torch.bfloat16 or torch.float16")
        if self.grad_scaler != (self.autocast_dtype is torch.float16):
            raise ValueError(f"grad_scaler={self.grad_scaler!r} must be True exactly when autocast_dtype is "
                             f"torch.float16 (got {self.autocast_dtype})")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} must be one of {', '.join(map(repr, ATTENTION_BACKENDS))}")

    def autocast(self) -> torch.autocast:
        """A ``torch.autocast`` context for the forward pass and loss (disabled for float32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled only under float16 autocast (a no-op pass-through otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.grad_scaler)

    def summary(self) -> str:
        """One line: device, precision, compilation, attention kernel."""
        compiled = "torch.compile" if self.compile else "eager"
        return f"{self.device}: {_DTYPE_NAMES[self.autocast_dtype]}, {compiled}, {self.attention} attention"


def choose_plan(info: DeviceInfo) -> DevicePlan:
    """The plan for a device described by ``info``; a pure function, one rule per branch.

    =============  ==========================  =======================  ===========
    device         autocast                    torch.compile            attention
    =============  ==========================  =======================  ===========
    CUDA >= 8.0    bfloat16                    yes                      flash
    CUDA 7.x       float16 + gradient scaler   yes                      efficient
    CUDA < 7.0     float16 + gradient scaler   no (Triton needs 7.0)    efficient
    MPS            none (float32)              no                       math
    CPU            none (float32)              if a C++ compiler and    flash
                                               a vector ISA
    =============  ==========================  =======================  ===========

    >>> plan = choose_plan(DeviceInfo("cuda", "Tesla T4", (7, 5), has_cxx_compiler=True))
    >>> plan.autocast_dtype, plan.grad_scaler, plan.compile, plan.attention
    (torch.float16, True, True, 'efficient')
    >>> print(plan.reasons[0])
    float16 autocast with a gradient scaler: Tesla T4 (compute capability 7.5) has no native bfloat16 (it needs 8.0)
    >>> choose_plan(DeviceInfo("cuda", "NVIDIA H100", (9, 0), True)).summary()
    'cuda: bfloat16 autocast, torch.compile, flash attention'
    """
    device = torch.device(info.type, info.index) if info.index is not None else torch.device(info.type)
    reasons: list[str] = []
    if info.type == "cuda":
        major, minor = info.capability
        gpu = f"{info.name} (compute capability {major}.{minor})"
        if info.capability >= (8, 0):
            return DevicePlan(device, torch.bfloat16, False, True, "flash")
        reasons.append(f"float16 autocast with a gradient scaler: {gpu} has no native bfloat16 (it needs 8.0)")
        # PyTorch's FlashAttention kernels are built for sm_80 and newer; the memory-efficient
        # (xFormers/CUTLASS) kernel runs from sm_50 on; below that only the math path is left.
        attention = "efficient" if info.capability >= (5, 0) else "math"
        reasons.append(f"{attention} attention: {gpu} is too old for FlashAttention (it needs 8.0)")
        compiles = info.capability >= (7, 0)  # Triton does not generate code for older GPUs
        if not compiles:
            reasons.append(f"Inductor's Triton kernels need compute capability 7.0; {info.name} has "
                           f"{major}.{minor}: running eagerly")
        return DevicePlan(device, torch.float16, True, compiles, attention, tuple(reasons))
    if info.type == "mps":
        # On MPS scaled_dot_product_attention takes the math route (SDPBackend.MATH), which
        # torch sends to its own Metal kernel rather than decomposing it op by op.
        reasons.append(f"float32 on {info.name}: autocast on MPS covers fewer operations than on CUDA "
                       "and the book's models fit in float32")
        reasons.append(f"eager on {info.name}: Inductor's Metal backend is still a prototype")
        return DevicePlan(device, None, False, False, "math", tuple(reasons))
    # On a CPU, SDPA dispatches to SDPBackend.FLASH_ATTENTION, a tiled CPU kernel
    # (aten::_scaled_dot_product_flash_attention_for_cpu); only dropout sends it to math.
    if not info.has_cxx_compiler:
        reasons.append("eager on the CPU: Inductor compiles CPU kernels with a C++ compiler (g++ or clang++) "
                       "and none is on the PATH; install g++ or set CXX to use torch.compile")
    elif not info.cpu_vector_isa:
        reasons.append("eager on the CPU: Inductor would not generate code for this CPU's own vector "
                       "instructions (a CPU without AVX2, or ATEN_CPU_CAPABILITY set below what the CPU "
                       "has), and in that case its code fails to build or computes wrong results")
    compiles = info.has_cxx_compiler and info.cpu_vector_isa
    return DevicePlan(device, None, False, compiles, "flash", tuple(reasons))


def plan_device(device: torch.device | str | None = None, *, verbose: bool = True) -> DevicePlan:
    """The plan for ``device`` (default: ``pick_device()``), printing each fallback's reason.

    >>> plan_device("cpu", verbose=False).autocast_dtype is None
    True
    """
    device = torch.device(device) if device is not None else pick_device(verbose=False)
    plan = choose_plan(describe_device(device))
    if verbose:
        for reason in plan.reasons:
            print(reason)
    return plan
