"""Greedy decoding speed: our Llama against Hugging Face ``generate`` on the same weights.

Both run in this process, one after the other, on the same random weights and the same
prompt; we print whether they produce the same tokens (in float32 they must). We report tokens
per second for each, their ratio, and the memory bandwidth decoding achieves: every new token
reads every weight once (except the embedding table, of which it reads one row), so
``weight bytes x tokens/s`` is the bandwidth used, which cannot exceed what the memory delivers
(``--peak-gbps``).

    # CPU (default): a Llama-shaped model of about 220M parameters in float32
    .venv/bin/python benchmarks/decode.py
    # GPU: a Llama-2-7B-shaped model in bfloat16
    python benchmarks/decode.py --device cuda

Each run times Hugging Face ``generate``, our eager loop and our loop with the step compiled
by :func:`companion.decode.compile_step` (on a CPU, tens of seconds of compilation first, not
counted; ``--no-compile`` skips it).

Timings on a shared machine are noisy: run it twice and compare the ratios, not the digits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from companion.bench import synchronize
from companion.checkpoint import hf_state_dict
from companion.decode import compile_step, decode
from companion.llama import Llama, LlamaConfig, count_parameters

SIZES = {
    # about 220M parameters: 12 layers of width 1024, a 32000-token vocabulary.
    "cpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    "llama-2-7b": dict(),
    # for checking that the script runs, in seconds
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def build(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> tuple[Llama, torch.nn.Module]:
    """Our model with random weights, and Hugging Face's ``LlamaForCausalLM`` sharing them."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of a 7B model
    try:
        with torch.device(device):
            ours = Llama(config).eval()
            hf = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    # assign=True: the Hugging Face model takes our tensors, so both run on the same weights.
    hf.load_state_dict(hf_state_dict(ours), strict=True, assign=True)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    return ours, hf.eval()


def interleaved(runners: dict, device: torch.device, repeats: int) -> dict:
    """Time each runner ``repeats`` times, taking turns, after one warm-up run of each.

    Taking turns spreads the load of a shared machine evenly over the runners; each runner's
    median time is kept. Returns ``{name: (output, seconds)}``.
    """
    outputs = {name: fn() for name, fn in runners.items()}  # warm-up (and compilation)
    times: dict = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            synchronize(device)
            start = time.perf_counter()
            outputs[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (outputs[name], statistics.median(times[name])) for name in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", choices=sorted(SIZES), help="default: cpu on CPU, llama-2-7b on CUDA")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our decoding step under torch.compile (CUDA graphs on a GPU); "
                             "--no-compile skips it")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's memory bandwidth in GB/s (default: 3350 for CUDA, an H100 SXM)")
    args = parser.parse_args()

    device = torch.device(args.device)
    size = args.size or ("cpu" if device.type == "cpu" else "llama-2-7b")
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    peak = args.peak_gbps or (3350.0 if device.type == "cuda" else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = LlamaConfig(**SIZES[size])
    n_params = count_parameters(config)
    # Bytes a new token must read: every weight except the embedding table, of which it reads one row.
    weight_bytes = (n_params - config.vocab_size * config.hidden_size) * dtype.itemsize
    ours, hf = build(config, device, dtype)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device)
    n = args.new_tokens
    print(f"model: Llama-shaped '{size}', {n_params / 1e6:.1f}M parameters, {dtype}, "
          f"{weight_bytes / 1e9:.2f} GB of weights read per token, on {device} ({torch.get_num_threads()} CPU threads)")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"greedy decoding of {n} new tokens after a {args.prompt_len}-token prompt, median of {args.repeats}")

    runners = {
        "transformers generate": lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                                     do_sample=False, use_cache=True),
        "ours, eager": lambda: decode(ours, prompt, n),
    }
    if args.compile:
        step = compile_step(ours)
        runners["ours, torch.compile"] = lambda: decode(ours, prompt, n, step=step)
    runs = interleaved(runners, device, args.repeats)

    reference_tokens, reference_seconds = runs["transformers generate"]
    print(f"\n{'':24s} {'tokens/s':>9s} {'vs HF':>7s} {'GB/s':>8s}" + (f" {'of peak':>8s}" if peak else "")
          + "  same tokens as HF")
    for name, (tokens, seconds) in runs.items():
        rate = n / seconds
        gbps = weight_bytes * rate / 1e9
        same = torch.equal(tokens.cpu(), reference_tokens.cpu())
        line = f"{name:24s} {rate:9.1f} {reference_seconds / seconds:6.2f}x {gbps:8.1f}"
        if peak:
            line += f" {gbps / peak:8.1%}"
        print(line + f"  {same}")
    print("\nGB/s = weight bytes x tokens/s: each new token reads every weight once (the embedding "
          "table excepted); the prompt's single pass is included in the time.")


if __name__ == "__main__":
    main()
