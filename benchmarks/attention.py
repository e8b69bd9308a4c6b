"""Causal attention, side by side in one process: SDPA against FlashAttention written out.

Methods, on the same inputs at each length ``T``:

* ``SDPA``: ``F.scaled_dot_product_attention(..., is_causal=True)``, the reference (on a GPU
  its FlashAttention or memory-efficient kernel; keys and values repeated per query head
  where the installed torch lacks ``enable_gqa``);
* ``triton``: :func:`companion.flash_triton.flash_attention_triton`, forward and backward;
* ``tiles``: :func:`companion.flash.flash_attention`, the same algorithm as PyTorch calls per
  tile (up to ``--tiles-max`` positions: it is slow by design).

For each it prints the forward time, the forward + backward time, both as a ratio to SDPA,
the largest difference from SDPA's output, and on a GPU the peak memory the call allocated.
The methods are timed in turns (one run of each per round, the median over ``--repeats``
rounds), so a slow spell of a shared machine falls on all of them alike::

    .venv/bin/python benchmarks/attention.py                   # a GPU: bf16, Llama-2-7B heads
    .venv/bin/python benchmarks/attention.py --device cpu --dtype float32 --lengths 128 200 \\
        --heads 4 --kv-heads 2 --head-dim 64 --repeats 1       # checks the script on a CPU

On a CPU the Triton kernels run in Triton's interpreter, one program after another in NumPy:
the check of the numbers holds, the times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

if not torch.cuda.is_available():  # before anything imports Triton: see companion.flash_triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from companion.bench import synchronize  # noqa: E402
from companion.flash import flash_attention  # noqa: E402
from companion.flash_triton import available, flash_attention_triton, interpreted  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    G = q.size(1) // k.size(1)
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
    except TypeError:  # torch < 2.5: no enable_gqa
        return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-q", type=int, default=64)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--tiles-max", type=int, default=4096, help="longest T for the per-tile PyTorch version")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if not available():
        parser.error("Triton is not installed: pip install triton (Linux)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"# torch {torch.__version__}, {where}; B={args.batch}, {args.heads} query heads, {args.kv_heads} "
          f"key/value heads, D={args.head_dim}, {dtype}, causal; blocks {args.block_q}x{args.block_k}")
    if interpreted():
        print("# Triton runs in its interpreter here: its times are not a kernel's")
    print(f"{'T':>6s} {'method':>7s} {'fwd ms':>9s} {'x SDPA':>7s} {'fwd+bwd ms':>11s} {'x SDPA':>7s} "
          f"{'max |diff|':>10s} {'peak MiB':>9s}")

    for T in args.lengths:
        g = torch.Generator(device="cpu").manual_seed(T)
        q = torch.randn(args.batch, args.heads, T, args.head_dim, generator=g).to(device, dtype)
        k = torch.randn(args.batch, args.kv_heads, T, args.head_dim, generator=g).to(device, dtype)
        v = torch.randn(args.batch, args.kv_heads, T, args.head_dim, generator=g).to(device, dtype)
        dout = torch.randn(q.shape, generator=g).to(device, dtype)
        blocks = dict(block_q=args.block_q, block_k=args.block_k)
        methods = {"SDPA": sdpa, "triton": lambda q, k, v: flash_attention_triton(q, k, v, **blocks)}
        if T <= args.tiles_max:
            methods["tiles"] = lambda q, k, v: flash_attention(q, k, v, **blocks)

        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def forward(fn=None):
            with torch.no_grad():
                return fn(q, k, v)

        def both(fn=None):
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves, dout)

        reference = forward(sdpa).float()
        times = {(name, kind): [] for name in methods for kind in ("fwd", "both")}
        for name, fn in methods.items():  # warm up: compile the kernels, fill the caches
            forward(fn), both(fn)
        for _ in range(args.repeats):
            for name, fn in methods.items():
                for kind, run in (("fwd", forward), ("both", both)):
                    synchronize(device)
                    start = time.perf_counter()
                    run(fn)
                    synchronize(device)
                    times[name, kind].append(time.perf_counter() - start)
        median = {key: statistics.median(value) for key, value in times.items()}
        for name, fn in methods.items():
            diff = (forward(fn).float() - reference).abs().max().item()
            peak = peak_mib(lambda: both(fn), device)
            fwd, bwd = median[name, "fwd"], median[name, "both"]
            print(f"{T:6d} {name:>7s} {fwd * 1e3:9.3f} {fwd / median['SDPA', 'fwd']:7.2f} {bwd * 1e3:11.3f} "
                  f"{bwd / median['SDPA', 'both']:7.2f} {diff:10.2e} {'-' if peak is None else f'{peak:9.0f}':>9s}")


if __name__ == "__main__":
    main()
