"""Batched generation: tokens per second against batch size, for a small Llama on a CPU.

:func:`companion.generation.batching.generate_batch` generates for a batch of prompts of different
lengths at once (left padding, per-row positions). Every decoding step reads every weight
once, whether for one row or for 64, so more rows per step give more tokens per second,
until the arithmetic, not the reading of weights, becomes the limit. This script measures
that: prompts of random lengths (8 to 64 tokens by default), 32 new tokens each, greedy,
at batch sizes 1, 2, 4, ..., 64, and prints for each the tokens generated, the wall time,
tokens per second, the speed-up over batch size 1, and the share of the padded prompt
columns that are padding (work spent on nothing). It also times the prompts' pass alone
(``max_new_tokens=1``) and prints the rate of the decoding steps without it: the prompts'
pass is compute-bound from the start, the decoding steps become so only at large batches.

    .venv/bin/python benchmarks/batching.py                # about 34M parameters, float32
    .venv/bin/python benchmarks/batching.py --size tiny    # checks that the script runs

Small batch sizes are run on several batches of different prompts (at least 8 prompts in
all), so that batch size 1 is not the time of one prompt's length. The prompts' pass is
included in the wall time, as a user waiting for the answers sees it. Every
batch also checks that its first row's tokens are those of that prompt generated alone.
Timings on a shared machine are noisy: run it twice and compare the ratios.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from companion.device import cpu_info
from companion.generation.batching import generate_batch
from companion.generation.static_cache import decode
from companion.llama import Llama, LlamaConfig, count_parameters

SIZES = {
    # about 34M parameters: 8 layers of width 512, an 8192-token vocabulary
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def cpu_name() -> str:
    return cpu_info("model name") or platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--min-prompts", type=int, default=8,
                        help="run small batch sizes on several batches, this many prompts in all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = LlamaConfig(**SIZES[args.size])
    model = Llama(config).eval()
    rng = random.Random(args.seed)
    n_prompts = max(max(args.batch_sizes), args.min_prompts)
    pool = [[rng.randrange(config.vocab_size) for _ in range(rng.randint(args.min_len, args.max_len))]
            for _ in range(n_prompts)]

    print(f"Llama ({args.size}): {count_parameters(config) / 1e6:.1f}M parameters, float32, "
          f"{config.num_hidden_layers} layers, width {config.hidden_size}, vocabulary {config.vocab_size}")
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"prompts of {args.min_len} to {args.max_len} tokens (random), {args.new_tokens} new tokens each, "
          f"greedy, generate_batch")
    generate_batch(model, pool[:2], 4)  # warm-up: first calls allocate and pick kernels

    header = (f"{'batch':>5} {'prompts':>7} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'vs batch 1':>10} "
              f"{'padding':>8} {'prompts s':>9} {'steps tokens/s':>14}")
    print(header)
    print("-" * len(header))
    base = None
    for b in args.batch_sizes:
        repeats = max(1, args.min_prompts // b)
        batches = [pool[i * b : (i + 1) * b] for i in range(repeats)]
        tokens, wall, prefill, pad, columns = 0, 0.0, 0.0, 0, 0
        for batch in batches:
            start = time.perf_counter()
            generate_batch(model, batch, 1)  # the prompts' pass and one token
            prefill += time.perf_counter() - start
            start = time.perf_counter()
            rows = generate_batch(model, batch, args.new_tokens)
            wall += time.perf_counter() - start
            tokens += sum(len(r) for r in rows)
            T = max(len(p) for p in batch)
            pad += sum(T - len(p) for p in batch)
            columns += T * len(batch)
            alone = decode(model, torch.tensor([batch[0]]), args.new_tokens)[0, len(batch[0]):].tolist()
            assert rows[0] == alone, f"batch size {b}: the first row differs from its prompt generated alone"
        rate = tokens / wall
        base = base or rate
        steps_rate = (tokens - len(batches) * b) / max(wall - prefill, 1e-9)  # the tokens after the first
        print(f"{b:>5} {len(batches) * b:>7} {tokens:>7} {wall:>7.2f} {rate:>9.1f} {rate / base:>9.2f}x "
              f"{pad / columns:>8.0%} {prefill:>9.2f} {steps_rate:>14.1f}")
    print("Every batch's first row equals its prompt generated alone (companion.generation.static_cache.decode).")


if __name__ == "__main__":
    main()
