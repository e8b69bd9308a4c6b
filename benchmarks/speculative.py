"""Speculative decoding: acceptance rate and tokens/s against k, for a target and a draft checkpoint.

Speculative decoding pays off only when the draft agrees with the target often, which random
weights never do: this script needs two trained checkpoints of one vocabulary (Hugging Face
directories of Llama, Mistral or Phi models, e.g. a 1B and a 7B model of one family)::

    .venv/bin/python benchmarks/speculative.py --target DIR --draft DIR --k 1 2 4 8 \\
        --prompt "The capital of France is"

For each ``k`` it runs :func:`companion.speculative.speculative_generate` (greedy) and prints
the fraction of proposals accepted, the tokens per target pass, tokens/s and the speed-up over
the target alone (:func:`companion.decode.decode`), and whether the tokens are the target's
own (they must be). With ``--hf`` (the default when ``transformers`` is installed) it also
times Hugging Face ``generate(..., assistant_model=...)`` with ``k`` candidate tokens per round
(``num_assistant_tokens_schedule="constant"``, no confidence threshold), loaded from the same
directories. ``--prompt`` needs the target directory's tokenizer; without it the prompt is
``--prompt-len`` random token ids, on which drafts agree less than on text.

Timings on a shared machine are noisy: run it twice and compare the ratios, not the digits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

from companion.bench import synchronize
from companion.checkpoint import read_config
from companion.decode import decode
from companion.llama import Llama
from companion.mistral import Mistral
from companion.phi import Phi
from companion.speculative import SpeculativeStats, speculative_generate

FAMILIES = {"llama": Llama, "mistral": Mistral, "phi": Phi}


def load(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Our model of the family named by ``config.json``'s ``model_type``."""
    model_type = read_config(path).get("model_type")
    if model_type not in FAMILIES:
        raise SystemExit(f"{path}: model_type={model_type!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[model_type].from_pretrained(path, dtype=dtype, device=device).eval()


def median_time(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[torch.Tensor, float]:
    """The output of ``fn`` and its median time over ``repeats`` runs, after one warm-up run."""
    out, times = fn(), []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="checkpoint directory of the large model")
    parser.add_argument("--draft", required=True, help="checkpoint directory of the small model")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="draft tokens per round")
    parser.add_argument("--prompt", default=None, help="text, tokenized with the target directory's tokenizer")
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt length without --prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                        help="also time transformers generate with assistant_model (default: if installed)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    target, draft = load(args.target, device, dtype), load(args.draft, device, dtype)
    if args.prompt is not None:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.target)(args.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.randint(0, target.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt, n = ids.to(device), args.new_tokens
    print(f"target: {Path(args.target).name} ({sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters), "
          f"draft: {Path(args.draft).name} ({sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M), "
          f"{dtype} on {device}; greedy, {n} new tokens after {prompt.size(1)} prompt tokens, median of {args.repeats}")

    reference, base = median_time(lambda: decode(target, prompt, n), device, args.repeats)
    header = f"{'':<32} {'accepted':>9} {'tokens/pass':>12} {'tokens/s':>9} {'speed-up':>9}  same tokens"
    print(header)
    print(f"{'target alone (decode)':<32} {'':>9} {1.0:>12.2f} {n / base:>9.1f} {1.0:>8.2f}x  True")
    for k in args.k:
        stats = SpeculativeStats()
        out, seconds = median_time(lambda: speculative_generate(target, draft, prompt, n, k=k, stats=stats),
                                   device, args.repeats)
        print(f"{f'speculative, k={k}':<32} {stats.acceptance_rate:>9.1%} {stats.tokens_per_round:>12.2f} "
              f"{n / seconds:>9.1f} {base / seconds:>8.2f}x  {torch.equal(out, reference)}")

    if args.hf is False:
        return
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        if args.hf:
            raise
        return
    hf_target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(device).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(device).eval()
    for model in (hf_target, hf_draft):  # exactly n new tokens, as above
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = None
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_draft.generation_config.assistant_confidence_threshold = 0.0  # propose k tokens every round

    def hf_generate(**kwargs) -> Callable[[], torch.Tensor]:
        return lambda: hf_target.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)

    with torch.no_grad():
        hf_out, hf_base = median_time(hf_generate(), device, args.repeats)
        print(f"{'transformers generate':<32} {'':>9} {1.0:>12.2f} {n / hf_base:>9.1f} {base / hf_base:>8.2f}x  "
              f"{torch.equal(hf_out, reference)}")
        for k in args.k:
            hf_draft.generation_config.num_assistant_tokens = k
            out, seconds = median_time(hf_generate(assistant_model=hf_draft), device, args.repeats)
            print(f"{f'generate, assistant_model, k={k}':<32} {'':>9} {'':>12} {n / seconds:>9.1f} "
                  f"{base / seconds:>8.2f}x  {torch.equal(out, reference)}")


if __name__ == "__main__":
    main()
