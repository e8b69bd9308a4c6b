"""What a token costs, and what a machine can deliver: chapter 11's measuring tools.

A decoder-only model does two kinds of work per token. It multiplies every weight matrix by
the token's vector (2 FLOPs per weight, a multiply and an add), and it reads every weight
from memory to do so. Which of the two sets the speed depends on the ratio between them, the
*arithmetic intensity* (FLOPs per byte), compared with the machine's own ratio of peak FLOP/s
to memory bandwidth: the *roofline* model (Williams, Waterman and Patterson, 2009).

* :class:`ModelShape`: the sizes that enter the counts, read from any config of the book
  (GPT-2, Llama 2, Mistral, Phi-2) by building the model on the ``meta`` device.
* :func:`forward_flops_per_token`, :func:`training_flops_per_token`,
  :func:`decode_bytes_per_token`: the counts, checked against
  ``torch.utils.flop_counter.FlopCounterMode`` and the models' own parameters in the tests.
* :func:`roofline_seconds`: the lower bound on the time of a piece of work.
* :func:`measure_bandwidth`, :func:`measure_matmul_flops`, :func:`median_seconds`: the
  reader's own machine, measured; :func:`synchronize` waits for a GPU before a clock is read.
* :func:`peak_memory_mib`: the most memory a piece of code takes beyond what its process
  held before, measured in a fresh Python process.
* :data:`H100_SXM`: the data-centre reference the book's GPU results were taken on.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "H100_SXM",
    "ModelShape",
    "Peak",
    "decode_bytes_per_token",
    "forward_flops_per_token",
    "measure_bandwidth",
    "measure_matmul_flops",
    "median_seconds",
    "peak_memory_mib",
    "roofline_seconds",
    "synchronize",
    "training_flops_per_token",
]


@dataclass(frozen=True)
class Peak:
    """A machine's peak dense matrix-multiply rate (FLOP/s) and memory bandwidth (bytes/s)."""

    name: str
    flops: float
    bandwidth: float

    @property
    def balance(self) -> float:
        """FLOPs the machine can do in the time it reads one byte: the roofline's ridge point."""
        return self.flops / self.bandwidth


# NVIDIA H100 SXM5 80GB: 989 dense bf16 TFLOP/s (tensor cores, no sparsity), 3.35 TB/s HBM3.
H100_SXM = Peak("NVIDIA H100 SXM (bf16)", flops=989e12, bandwidth=3.35e12)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only model that its FLOP and byte counts depend on.

    ``matmul_weights`` counts the weights of every matrix a token is multiplied by: the
    projections of each layer and the output layer (also when it is tied to the embedding
    table). Embedding tables are looked up, one row per token, not multiplied; norm weights
    and biases are too few to count.

    >>> from companion.llama import LlamaConfig
    >>> shape = ModelShape.of(LlamaConfig.preset("llama-2-7b"))
    >>> shape.n_layers, shape.n_kv_heads, shape.head_dim, f"{shape.matmul_weights:,}"
    (32, 32, 128, '6,607,077,376')
    """

    name: str
    n_params: int
    matmul_weights: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any, name: str | None = None) -> "ModelShape":
        """Read a ``GPTConfig``, ``LlamaConfig``, ``MistralConfig`` or ``PhiConfig``."""
        model = _build_on_meta(config)
        n_layers = _first(config, "num_hidden_layers", "n_layer")
        n_heads = _first(config, "num_attention_heads", "n_head")
        n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or _first(config, "hidden_size", "n_embd") // n_heads
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        n_params = sum(p.numel() for p in model.parameters())
        return cls(name or type(config).__name__.removesuffix("Config"), n_params, matmul,
                   n_layers, n_heads, n_kv_heads, head_dim)


def _first(config: Any, *names: str) -> int:
    for name in names:
        if hasattr(config, name):
            return getattr(config, name)
    raise TypeError(f"{type(config).__name__} has none of the fields {names}")


def _build_on_meta(config: Any) -> nn.Module:
    """The model of ``config``, with shapes but no memory (tensors on the ``meta`` device)."""
    from companion import gpt, llama, mistral, phi

    families = {gpt.GPTConfig: gpt.GPT, llama.LlamaConfig: llama.Llama,
                mistral.MistralConfig: mistral.Mistral, phi.PhiConfig: phi.Phi}
    if type(config) not in families:
        raise TypeError(f"no model family for {type(config).__name__}; expected one of "
                        f"{sorted(c.__name__ for c in families)}")
    with torch.device("meta"):
        return families[type(config)](config)


def forward_flops_per_token(shape: ModelShape, context: int) -> int:
    """FLOPs of one token's forward pass when it attends to ``context`` keys.

    ``2 * matmul_weights`` for the projections, plus, in each layer and for each query head,
    ``2 * head_dim * context`` for the scores ``q k^T`` and as many for the weighted sum of
    the values. Elementwise work (norms, softmax, activations) is left out: it is a small
    fraction, and it is not where the time goes.

    >>> from companion.llama import LlamaConfig
    >>> flops = forward_flops_per_token(ModelShape.of(LlamaConfig.preset("llama-2-7b")), context=4096)
    >>> f"{flops / 1e9:.1f} GFLOP"
    '15.4 GFLOP'
    """
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    attention = 4 * shape.n_layers * shape.n_heads * shape.head_dim * context
    return 2 * shape.matmul_weights + attention


def training_flops_per_token(shape: ModelShape, context: int) -> int:
    """Forward plus backward: three times the forward (the backward computes two products
    per forward product: the gradient of the input and that of the weight). This is the
    ``6N`` estimate of Kaplan et al. (2020), with attention, used for MFU."""
    return 3 * forward_flops_per_token(shape, context)


def decode_bytes_per_token(shape: ModelShape, context: int, bytes_per_value: float = 2.0,
                           batch_size: int = 1) -> float:
    """Bytes read from memory per generated token, decoding ``batch_size`` sequences at once.

    Each step reads every matrix once, shared by the whole batch, and each sequence's keys
    and values for ``context`` positions: ``2 * n_layers * n_kv_heads * head_dim * context``
    numbers. Per token: ``(weights + batch_size * cache) / batch_size``. Larger batches
    share the weight reads; nothing shares the cache.

    >>> from companion.llama import LlamaConfig
    >>> shape = ModelShape.of(LlamaConfig.preset("llama-2-7b"))
    >>> f"{decode_bytes_per_token(shape, context=1) / 1e9:.2f} GB"
    '13.21 GB'
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    weights = shape.matmul_weights * bytes_per_value
    cache = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * context * bytes_per_value
    return weights / batch_size + cache


def roofline_seconds(flops: float, bytes_moved: float, peak: Peak) -> float:
    """The least time ``flops`` of arithmetic on ``bytes_moved`` of memory traffic can take:
    the larger of the two times, if the machine overlaps reading and computing perfectly.

    >>> roofline_seconds(1e12, 1e9, Peak("toy", flops=1e12, bandwidth=1e9))
    1.0
    """
    return max(flops / peak.flops, bytes_moved / peak.bandwidth)


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` has finished (GPUs run it asynchronously)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 5,
                   warmup: int = 1) -> float:
    """The median wall-clock time of ``fn()`` over ``repeats`` runs, after ``warmup`` runs.

    On a GPU, work is queued and runs later: the clock is read only after waiting for it.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(device: torch.device | str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s, measured by summing a float32 tensor of ``megabytes``.

    A sum reads each byte once and does one addition per 4 bytes, so memory is its limit.
    The tensor must be much larger than the caches, or the caches are what gets measured.
    """
    device = torch.device(device)
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    return x.numel() * 4 / median_seconds(lambda: x.sum(), device, repeats)


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         n: int = 1024, repeats: int = 5) -> float:
    """Matrix-multiply FLOP/s: ``2 n^3`` FLOPs for an ``(n, n) @ (n, n)`` product, timed."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats)


# Run in the fresh process before the caller's script: measure(fn) prints fn's extra peak.
_PEAK_PRELUDE = """
import resource, sys

def _mib(field):  # resident memory now (VmRSS) or at its peak (VmHWM), from Linux's /proc
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024

def measure(fn):
    if sys.platform.startswith("linux"):
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
        before = _mib("VmRSS:")
        fn()
        print("PEAK_MIB", _mib("VmHWM:") - before)
    else:  # macOS: the lifetime peak only, in bytes
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        print("PEAK_MIB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""


def peak_memory_mib(script: str, *args: Any) -> float:
    """Extra peak memory, in MiB, of the call that ``script`` passes to ``measure(fn)``.

    ``script`` runs in a fresh Python process (``args`` in its ``sys.argv[1:]``), so nothing
    allocated before counts: it builds what it needs, then calls ``measure(fn)``, which
    reads the resident memory, runs ``fn()`` and reports the most the process held during
    the call beyond it. These are the operating system's figures (on Linux, ``VmRSS`` and
    ``VmHWM`` in ``/proc/self/status``, the peak reset just before the call; on macOS the
    process's lifetime peak, which hides allocations smaller than what came before), so they
    vary a little from run to run.

    >>> peak_memory_mib("import numpy; measure(lambda: numpy.ones(2**25))") > 200  # 256 MiB
    True
    """
    done = subprocess.run([sys.executable, "-c", _PEAK_PRELUDE + script, *map(str, args)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the measured script failed:\n{done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_MIB ")]
    if len(lines) != 1:
        raise ValueError(f"the script must call measure(fn) exactly once; it called it {len(lines)} times")
    return float(lines[0].split()[1])
