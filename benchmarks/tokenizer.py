"""Our byte-level BPE (pure Python) against Hugging Face `tokenizers` (Rust), side by side.

Both train on the same Tiny Shakespeare text (the first 90%) with the same split pattern,
byte alphabet and vocabulary size, then encode the held-out last 10%. Printed: training
and encoding times, their ratios, and the number of tokens each produces on the held-out
text. A second table times the naive trainer (full recount per merge) against the
incremental one on a small slice.

    python benchmarks/tokenizer.py                      # full corpus, vocab 4096
    python benchmarks/tokenizer.py --vocab-size 1024 --train-chars 250000

Tokenizers run on the CPU; there is no GPU variant. Times are the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

from companion.data import load_tiny_shakespeare
from companion.tokenizers import (
    BPETokenizer,
    train_bpe,
    train_bpe_naive,
    train_huggingface,
)


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--train-chars", type=int, default=0, help="0 = the whole 90%% training split")
    parser.add_argument("--naive-chars", type=int, default=20_000, help="slice for naive vs incremental")
    parser.add_argument("--naive-merges", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    text = load_tiny_shakespeare()
    cut = int(0.9 * len(text))
    train, held_out = text[:cut], text[cut:]
    if args.train_chars:
        train = train[: args.train_chars]
    n_bytes = len(held_out.encode("utf-8"))

    t_ours, ours = best_time(lambda: BPETokenizer.train(train, args.vocab_size), args.repeats)
    t_hf, hf = best_time(lambda: train_huggingface(train, args.vocab_size), args.repeats)

    def ours_cold() -> list[int]:
        ours._cache.clear()  # first-time encoding: no pre-token seen before
        return ours.encode(held_out)

    def hf_cold() -> list[int]:
        getattr(hf.model, "_clear_cache", lambda: None)()  # private API; absent in old versions
        return hf.encode(held_out).ids

    e_ours_cold, ids_ours = best_time(ours_cold, args.repeats)
    e_hf_cold, ids_hf = best_time(hf_cold, args.repeats)
    e_ours_warm, _ = best_time(lambda: ours.encode(held_out), args.repeats)
    e_hf_warm, _ = best_time(lambda: hf.encode(held_out).ids, args.repeats)

    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs; best of {args.repeats} runs")
    print(f"train on {len(train):,} characters, vocabulary {args.vocab_size}; "
          f"encode {len(held_out):,} held-out characters ({n_bytes:,} bytes)\n")
    print(f"{'':28}{'ours':>12}{'tokenizers':>12}{'ours/theirs':>13}")
    rows = [
        ("train (s)", t_ours, t_hf),
        ("encode, cold cache (s)", e_ours_cold, e_hf_cold),
        ("encode, warm cache (s)", e_ours_warm, e_hf_warm),
    ]
    for name, a, b in rows:
        print(f"{name:28}{a:12.3f}{b:12.3f}{a / b:12.1f}x")
    print(f"{'encode (MB/s, cold)':28}{n_bytes / e_ours_cold / 1e6:12.2f}{n_bytes / e_hf_cold / 1e6:12.2f}")
    n_ours, n_hf = len(ids_ours), len(ids_hf)
    print(f"{'held-out tokens':28}{n_ours:12d}{n_hf:12d}{n_ours / n_hf - 1:+12.2%}")
    print(f"{'bytes per token':28}{n_bytes / n_ours:12.3f}{n_bytes / n_hf:12.3f}")

    small = train[: args.naive_chars]
    t_naive, m_naive = best_time(lambda: train_bpe_naive(small, args.naive_merges), 1)
    t_inc, m_inc = best_time(lambda: train_bpe(small, args.naive_merges), args.repeats)
    print(f"\nnaive vs incremental training: {args.naive_merges} merges on {len(small):,} characters")
    print(f"{'':28}{'naive':>12}{'incremental':>12}{'naive/incr':>13}")
    print(f"{'train (s)':28}{t_naive:12.3f}{t_inc:12.3f}{t_naive / t_inc:12.1f}x")
    print(f"same merges: {m_naive == m_inc}")


if __name__ == "__main__":
    main()
