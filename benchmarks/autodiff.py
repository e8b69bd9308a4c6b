"""One training step of the chapter-5 language model: our numpy engine against PyTorch.

    .venv/bin/python benchmarks/autodiff.py                  # the chapter's model, float32
    .venv/bin/python benchmarks/autodiff.py --threads 1      # one core for numpy and torch
    .venv/bin/python benchmarks/autodiff.py --device cuda    # PyTorch side on a GPU

A step is forward, loss, backward and an AdamW update, on the same weights and the same
batch for both. The two are timed in alternation (ours, torch, ours, torch, ...) in one
process, so that load from other programs hits both alike; the medians are compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="device of the PyTorch side (cpu or cuda)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=30, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numpy's BLAS and for torch (default: their own defaults)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads is not None:  # must be set before numpy loads its BLAS
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import numpy as np
    import torch

    from companion.autodiff.lm import TinyLM, TinyLMConfig, get_batch, to_torch
    from companion.autodiff.optim import AdamW

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TinyLMConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_embd=args.n_embd,
                       n_head=args.n_head, n_layer=args.n_layer, dtype=args.dtype)
    ours = TinyLM(cfg, seed=0)
    theirs = to_torch(ours).to(device)
    opt = AdamW(ours.parameters(), lr=1e-3)
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    data = rng.integers(0, cfg.vocab_size, 100_000)
    x, y = get_batch(data, args.batch_size, cfg.block_size, rng)
    tx, ty = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def step_ours() -> None:
        _, loss = ours(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def step_torch() -> None:
        _, loss = theirs(tx, ty)
        topt.zero_grad()
        loss.backward()
        topt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step_ours()
        step_torch()
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", step_ours), ("torch", step_torch)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    med = {k: float(np.median(v)) for k, v in times.items()}
    n_params = ours.num_parameters()
    print(f"model: {n_params:,} parameters, n_layer={cfg.n_layer}, n_head={cfg.n_head}, "
          f"n_embd={cfg.n_embd}, block_size={cfg.block_size}, batch {args.batch_size}, {cfg.dtype}")
    print(f"numpy {np.__version__}, torch {torch.__version__} on {device}, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"one training step (median of {args.repeats}, interleaved):")
    print(f"  our tensor engine : {med['ours'] * 1e3:8.2f} ms")
    print(f"  PyTorch           : {med['torch'] * 1e3:8.2f} ms")
    print(f"  ratio ours/PyTorch: {med['ours'] / med['torch']:8.2f}x  (target: within 3x)")


if __name__ == "__main__":
    main(sys.argv[1:])
