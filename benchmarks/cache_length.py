"""What a static KV cache allocated for the model's whole length costs a decoding step on a CPU.

:func:`companion.generation.static_cache.decode` allocates the cache once, for a maximum
length, so that one compiled step serves every request. Attention then sees every slot of it,
written or not, behind a mask. PyTorch's ``scaled_dot_product_attention`` reads them all;
:func:`companion.cpu_kernels.attend_one`, which :func:`companion.layers.sdpa_attention` uses
for a decoding step on a CPU, reads only the slots the mask allows. This script decodes with
caches of several lengths (``--lengths``; the benchmark model's own is 2048), our compiled
float32 model and our compiled int4 model (fused projections, the C kernels), with the
attention kernel and with PyTorch's, taking turns in one process on the same weights:

    .venv/bin/python benchmarks/cache_length.py

Each row gives tokens/s (median of ``--repeats``), the ratio of the two attention kernels, the
bytes of keys and values one step reads with PyTorch's kernel (every slot of every layer),
and whether the tokens are those of PyTorch's kernel (in float32 they must be, up to
near-ties; int4's rounding of each row to int8 can turn a last-bit difference into another
token of a random-weight model). Last, how far one step's logits move between the kernels, and
between PyTorch's kernel and the explicit softmax, for scale. It needs the C kernels (an x86
CPU with AVX2 and a C compiler).
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys

import torch

from companion import cpu_kernels
from companion.fusion import fuse_projections
from companion.generation.static_cache import compile_step, decode
from companion.llama import LlamaConfig
from companion.quantize import quantize_
from decode import SIZES, build, interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[80, 512, 2048],
                        help="cache lengths to allocate (at least prompt + new tokens)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"the C kernels are not available here: {cpu_kernels.unavailable_reason()}")
    if min(args.lengths) < args.prompt_len + args.new_tokens:
        parser.error(f"every length must hold the prompt and the new tokens ({args.prompt_len + args.new_tokens})")
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[args.size])
    ours, _ = build(config, torch.device("cpu"), torch.float32)
    int4 = fuse_projections(quantize_(copy.deepcopy(ours), "int4", group_size=64))
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    print(f"model: Llama-shaped '{args.size}', float32 and int4 g64 (fused, C kernels), compiled, "
          f"{torch.get_num_threads()} CPU threads; greedy decoding of {n} tokens after a "
          f"{args.prompt_len}-token prompt, median of {args.repeats}")
    print(f"\n{'model':6s} {'cache':>6s} {'kernel tok/s':>13s} {'PyTorch tok/s':>14s} {'ratio':>6s} "
          f"{'KV MB/step, PyTorch':>20s}  same tokens")
    for name, model in (("fp32", ours), ("int4", int4)):
        for length in args.lengths:
            torch._dynamo.reset()  # a step compiled for this cache's shape, with each attention kernel
            step = compile_step(model)

            def run(kernel: str, length=length, model=model, step=step) -> torch.Tensor:
                cpu_kernels.attention_enabled = kernel == "attend_one"
                return decode(model, prompt, n, max_seq_len=length, step=step)

            # the first run of each compiles the step with that kernel; then they take turns
            runs = interleaved({f"{name}, cache {length}, {kernel}": functools.partial(run, kernel)
                                for kernel in ("attend_one", "sdpa")}, torch.device("cpu"), args.repeats)
            (tokens, seconds), (tokens_sdpa, seconds_sdpa) = runs.values()
            kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * length * config.head_dim * 4
            print(f"{name:6s} {length:6d} {n / seconds:13.1f} {n / seconds_sdpa:14.1f} {seconds_sdpa / seconds:5.2f}x "
                  f"{kv_bytes / 1e6:20.1f}  {torch.equal(tokens, tokens_sdpa)}", flush=True)
    print()
    for name, model in (("fp32", ours), ("int4", int4)):
        logit_differences(name, model, prompt)


@torch.no_grad()
def logit_differences(name: str, model: torch.nn.Module, prompt: torch.Tensor) -> None:
    """How far one step's logits move between attention kernels: ``attend_one`` against PyTorch's
    SDPA, and PyTorch's SDPA against the explicit softmax (``companion.layers.attention``)."""
    attention_modules = [m for m in model.modules() if hasattr(m, "attn_implementation")]
    logits = {}
    for label, on, implementation in (("attend_one", True, "sdpa"), ("sdpa", False, "sdpa"), ("explicit", False, "eager")):
        cpu_kernels.attention_enabled = on
        for module in attention_modules:
            module.attn_implementation = implementation
        model.setup_cache(1, prompt.size(1) + 1)
        model(prompt, start_pos=0)
        logits[label] = model(prompt[:, -1:], start_pos=prompt.size(1))[0, -1]
    for module in attention_modules:
        module.attn_implementation = "sdpa"
    cpu_kernels.attention_enabled = True
    print(f"{name}: one step's logits (std {logits['sdpa'].std():.2f}) move by at most "
          f"{(logits['attend_one'] - logits['sdpa']).abs().max():.2g} between attend_one and PyTorch's SDPA, "
          f"{(logits['sdpa'] - logits['explicit']).abs().max():.2g} between PyTorch's SDPA and the explicit softmax")


if __name__ == "__main__":
    sys.exit(main())
