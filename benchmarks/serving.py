"""Serving a trace of requests: one at a time, static batches, continuous batching.

A seeded synthetic trace (:func:`companion.generation.engine.synthetic_trace`: Poisson arrivals at
``--rate`` requests per second, prompt and output lengths uniform in the given ranges) is
served three ways by :func:`companion.generation.engine.replay`, all on the same
:class:`companion.generation.engine.Engine` and so the same kernels:

* one at a time (``max_batch=1``);
* static batching: up to ``--max-batch`` queued requests start together, and the next batch
  starts when the whole batch has finished;
* continuous batching: requests join the running batch at every step.

For each it prints the throughput (generated tokens per second, from the first arrival to the
last token), the time to first token and the time per output token (median and 99th
percentile), the mean batch size, and the peak KV memory in use against what a contiguous
cache with one max-length row per running request would hold. Every policy must give every
request the same tokens (greedy); the script checks it. ``--plot`` saves the distributions.

    .venv/bin/python benchmarks/serving.py --threads 1              # about 34M parameters, float32
    .venv/bin/python benchmarks/serving.py --size tiny --requests 8 # checks that the script runs

The clock is the sum of the measured step times, jumping over idle time, so the trace takes
no longer than its work. Timings on a shared machine are noisy: run it twice and compare the
ratios.
"""

from __future__ import annotations

import argparse
import platform

import torch

from companion.generation.engine import POLICIES, replay, synthetic_trace
from companion.llama import Llama, LlamaConfig, count_parameters

from batching import SIZES  # the models of benchmarks/batching.py, run from this folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="save a figure of the three runs to this path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[args.size])
    model = Llama(config).eval()
    trace = synthetic_trace(args.requests, rate=args.rate, vocab_size=config.vocab_size,
                            prompt_len=tuple(args.prompt_len), new_tokens=tuple(args.new_tokens), seed=args.seed)
    work = sum(r.max_new_tokens for r in trace)
    print(f"Llama ({args.size}): {count_parameters(config) / 1e6:.1f}M parameters, float32, "
          f"{platform.processor() or platform.machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"trace: {args.requests} requests, Poisson arrivals at {args.rate:g}/s over {trace[-1].arrival:.1f} s, "
          f"prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs {args.new_tokens[0]}-{args.new_tokens[1]} "
          f"({work} tokens in all), greedy; max batch {args.max_batch}, blocks of {args.block_size}")
    header = (f"{'policy':<14} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
              f"{'batch':>6} {'KV MiB':>7} {'contig.':>8}")
    print(header)
    print("-" * len(header))
    results = {}
    for policy in POLICIES:
        result = replay(model, trace, policy, max_batch=args.max_batch, block_size=args.block_size)
        results[policy] = result
        s = result.summary()
        print(f"{policy:<14} {s['throughput']:>9.1f} {s['ttft_p50']:>8.2f}s {s['ttft_p99']:>8.2f}s "
              f"{s['tpot_p50'] * 1e3:>7.1f}ms {s['tpot_p99'] * 1e3:>7.1f}ms {s['mean_batch']:>6.1f} "
              f"{s['kv_mib_peak']:>7.1f} {s['kv_contiguous_mib_peak']:>8.1f}")
    same = all(r.tokens == results["one-at-a-time"].tokens for r in results.values())
    base = results["one-at-a-time"].throughput
    print(f"throughput vs one at a time: " + ", ".join(f"{p} {r.throughput / base:.2f}x" for p, r in results.items()))
    print(f"every request got the same tokens under the three policies: {same}")
    if args.plot:
        plot(results, args.plot)
        print(f"figure: {args.plot}")
    if not same:
        raise SystemExit("the policies disagree on some request's tokens")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for policy, result in results.items():
        for ax, values in ((axes[0], result.ttft), (axes[1], [t * 1e3 for t in result.tpot])):
            xs = sorted(values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=policy)
        axes[2].plot([b / 2**20 for b in result.kv_bytes], label=f"{policy}: blocks in use")
    axes[2].plot([b / 2**20 for b in results["continuous"].kv_contiguous_bytes], "k--", lw=1,
                 label="continuous: max-length rows")
    axes[0].set(xscale="log", xlabel="time to first token (s)", ylabel="fraction of requests")
    axes[1].set(xlabel="time per output token (ms)")
    axes[2].set(xlabel="step", ylabel="KV cache (MiB)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
