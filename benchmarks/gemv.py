"""One row times a matrix, as a decoding step does it, side by side in one process.

For each matrix shape of Llama-2-7B (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down
4096 x 11008, the output layer 32000 x 4096), on the same random weights:

* ``F.linear``: the float matrix (bf16 on a GPU: cuBLAS's matrix-vector kernel), the reference;
* ``int8 Triton``, ``int4 Triton``: :mod:`companion.quant_triton`'s kernels, for each block
  size asked (``--block-n``, ``--block-k``; int4 reads 512 inputs' worth of groups per step);
* ``int8 Inductor``, ``int4 Inductor``: the layers' ``one_row_forward`` under ``torch.compile``
  (Inductor's own reductions; ``--no-inductor`` skips them).

Each prints the time of one product (on a GPU, replayed from a CUDA graph, as in a compiled
decoding step), the bytes it reads (weights and scales), those bytes per
second and their share of the bandwidth measured by summing a large tensor, and the largest
difference from the product of the same weights (dequantized) in float64, relative to the
largest output. A decoding step reads
matrices that are not in the GPU's cache (60 MB of L2 on an H200, as PyTorch reports it): each product here reads
the next of enough copies of its matrix to fill 256 MB (``--cache-mb``), so the cache cannot
serve it::

    python benchmarks/gemv.py                                   # a GPU
    .venv/bin/python benchmarks/gemv.py --device cpu --shapes 40x96 --block-n 4 --block-k 32 \\
        --no-inductor                                           # checks the script on a CPU

On a CPU the Triton kernels run in Triton's interpreter: the numbers are checked, the times
say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import os

import torch

if not torch.cuda.is_available():  # before anything imports Triton: see companion.flash_triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402

from companion import quant_triton  # noqa: E402
from companion.bench import measure_bandwidth, median_seconds  # noqa: E402
from companion.quantize import Int4Linear, Int8Linear  # noqa: E402

LLAMA_2_7B = ["4096x4096", "11008x4096", "4096x11008", "32000x4096"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shape(text: str) -> tuple[int, int]:
    try:
        N, K = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape N x K such as 4096x11008") from None
    if N < 1 or K < 1 or K % 128:
        raise argparse.ArgumentTypeError(f"{text!r}: N and K must be positive and K a multiple of 128 "
                                         "(int4's largest group)")
    return N, K


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--shapes", type=shape, nargs="+", default=[shape(s) for s in LLAMA_2_7B])
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--block-n", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--block-k", type=int, nargs="+", default=[256, 512, 1024], help="int8's inputs per step")
    parser.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cache-mb", type=float, default=None,
                        help="megabytes of copies each product takes turns over (default: 256 on a GPU, none on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if device.type == "cpu" and dtype == torch.bfloat16:
        parser.error("Triton's interpreter does not compute in bfloat16: use --dtype float32 or float16 on a CPU")
    if args.cache_mb is None:
        args.cache_mb = 256.0 if device.type == "cuda" else 0.0
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    peak = measure_bandwidth(device, megabytes=1024 if device.type == "cuda" else 256)
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}, "
          f"{str(dtype).removeprefix('torch.')}; bandwidth (summing a large tensor) {peak / 1e9:.0f} GB/s; "
          f"int4 groups of {args.group_size}")
    if quant_triton.interpreted():
        print("# Triton runs in its interpreter here: its times are not a kernel's")
    print(f"{'N x K':>12s}  {'method':22s} {'us':>9s} {'MB':>8s} {'GB/s':>7s} {'of bw':>6s} {'rel. diff':>10s}")
    torch.manual_seed(0)
    for N, K in args.shapes:
        linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        x = torch.randn(1, 1, K, device=device, dtype=dtype)
        int8 = Int8Linear.from_linear(linear)
        int4 = Int4Linear.from_linear(linear, group_size=args.group_size)
        # name -> (a function of the layer, the layer): each call reads the layer it is given
        methods: dict = {"F.linear": (lambda layer: layer(x), linear)}
        for bn in args.block_n:
            for bk in args.block_k:
                methods[f"int8 Triton {bn}x{bk}"] = (
                    lambda layer, bn=bn, bk=bk: quant_triton.int8_gemv(layer.qweight, layer.scales, x,
                                                                       block_n=bn, block_k=bk), int8)
            methods[f"int4 Triton {bn}"] = (
                lambda layer, bn=bn: quant_triton.int4_gemv(layer.qweight, layer.scales, layer.mins, x,
                                                            block_n=bn), int4)
        if args.inductor:  # one compilation serves every copy: their tensors are the graph's inputs
            methods["int8 Inductor"] = (torch.compile(lambda layer: layer.one_row_forward(x), fullgraph=True), int8)
            methods["int4 Inductor"] = (torch.compile(lambda layer: layer.one_row_forward(x), fullgraph=True), int4)
        for name, (fn, layer) in methods.items():
            nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
            # enough copies of the layer that they do not fit in the caches, read in turn
            copies = [layer] + [copy.deepcopy(layer) for _ in range(max(0, math.ceil(args.cache_mb * 1e6 / nbytes) - 1))]
            y = fn(layer).reshape(-1)

            def run_all(copies=copies, fn=fn) -> None:
                for c in copies:
                    fn(c)

            seconds = median_seconds(_replayable(run_all, device), device, repeats=args.repeats) / len(copies)
            weight = linear.weight if layer is linear else layer.dequantize_weight()
            reference = x.double().reshape(-1) @ weight.double().t()
            diff = ((y.double() - reference).abs().max() / reference.abs().max()).item()
            print(f"{N:>6d}x{K:<5d}  {name:22s} {seconds * 1e6:9.1f} {nbytes / 1e6:8.1f} "
                  f"{nbytes / seconds / 1e9:7.0f} {nbytes / seconds / peak:6.0%} {diff:10.1e}", flush=True)


def _replayable(fn, device: torch.device):
    """On a GPU, ``fn`` recorded as a CUDA graph, as a compiled decoding step runs: a replay
    launches its kernels without Python in between, so what is timed is the kernels (a few
    microseconds each here), not their launches. Elsewhere, ``fn`` itself."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as PyTorch's documentation does
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


if __name__ == "__main__":
    main()
