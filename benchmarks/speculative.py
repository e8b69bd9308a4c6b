"""Speculative decoding: acceptance rate and tokens/s against k, for a target and a draft checkpoint.

Speculative decoding pays off only when the draft agrees with the target often, which random
weights never do: this script needs two trained checkpoints of one vocabulary (Hugging Face
directories of Llama, Mistral or Phi models, e.g. a 1B and a 7B model of one family)::

    .venv/bin/python benchmarks/speculative.py --target DIR --draft DIR --k 1 2 4 8 \\
        --prompt "The capital of France is"

or the character-level pair that ``benchmarks/train_pair.py`` trains on Tiny Shakespeare in a
few minutes, prompted with slices of Tiny Shakespeare's validation text::

    .venv/bin/python benchmarks/train_pair.py --out /tmp/shakespeare_pair
    .venv/bin/python benchmarks/speculative.py --target /tmp/shakespeare_pair/target \\
        --draft /tmp/shakespeare_pair/draft --shakespeare-prompts 8 --prompt-len 64 --new-tokens 128 \\
        --k 1 2 3 4 6 8 --repeats 5 --threads 1

For each ``k`` it runs :func:`companion.generation.speculative.speculative_generate` (greedy)
and prints the fraction of proposals accepted, the tokens per target pass, tokens/s and the
speed-up over the target alone (:func:`companion.generation.static_cache.decode`), and whether
the tokens are the target's own (they must be). ``--temperature T`` samples instead, every
method at temperature ``T`` with no top-k or top-p: the methods then draw different tokens
(each from the target's distribution), which are not compared. Greedy text from a small model
soon repeats itself, where a draft agrees more than on fresh text; sampled text does not. With ``--hf`` (the default when ``transformers`` is installed) it also
times Hugging Face ``generate(..., assistant_model=...)`` with ``k`` candidate tokens per round
(``num_assistant_tokens_schedule="constant"``, no confidence threshold), loaded from the same
directories. ``--prompt`` needs the target directory's tokenizer: ``char_tokenizer.json`` (the
characters, in id order, as ``train_pair.py`` writes it) if there is one, else Hugging Face's
``AutoTokenizer``. ``--shakespeare-prompts P`` takes ``P`` prompts of ``--prompt-len`` characters
from Tiny Shakespeare's validation split (the last 10%, which the pair never trained on), at
evenly spaced line starts, encoded with ``char_tokenizer.json``; every method then generates for
each prompt in turn and the rates are over all of them. Without either, the prompt is
``--prompt-len`` random token ids, on which drafts agree less than on text.

The methods are timed in turns (one run of each per round, the median over ``--repeats``
rounds), so that a slow spell of a shared machine falls on all of them alike. Timings on a
shared machine are still noisy: run it twice and compare the ratios, not the digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from companion.bench import synchronize
from companion.char_tokenizer import CharTokenizer
from companion.checkpoint import read_config
from companion.generation.speculative import SpeculativeStats, speculative_generate
from companion.generation.static_cache import decode
from companion.llama import Llama
from companion.mistral import Mistral
from companion.phi import Phi

FAMILIES = {"llama": Llama, "mistral": Mistral, "phi": Phi}


def load(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Our model of the family named by ``config.json``'s ``model_type``."""
    model_type = read_config(path).get("model_type")
    if model_type not in FAMILIES:
        raise SystemExit(f"{path}: model_type={model_type!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[model_type].from_pretrained(path, dtype=dtype, device=device).eval()


def char_tokenizer(path: str) -> CharTokenizer | None:
    """The character-level tokenizer saved in ``path/char_tokenizer.json`` (by train_pair.py), or None."""
    file = Path(path) / "char_tokenizer.json"
    return CharTokenizer(json.loads(file.read_text(encoding="utf-8"))["chars"]) if file.is_file() else None


def shakespeare_prompts(count: int, length: int) -> list[str]:
    """``count`` slices of ``length`` characters of Tiny Shakespeare's validation split, at line starts."""
    from companion.data import load_tiny_shakespeare

    text = load_tiny_shakespeare()
    val = text[int(round(len(text) * 0.9)):]  # as companion.data.train_val_split cuts it
    starts = [val.index("\n", i * len(val) // count) + 1 for i in range(count)]
    return [val[start : start + length] for start in starts]


def median_times(fns: list[Callable[[], list[torch.Tensor]]], device: torch.device,
                 repeats: int) -> list[tuple[list[torch.Tensor], float]]:
    """The output of each of ``fns`` and its median time over ``repeats`` rounds, after one warm-up round.

    Each round runs every function once, in turn, so that a slow spell of a shared machine
    falls on all of them alike rather than on whichever was being timed then.
    """
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            synchronize(device)
            start = time.perf_counter()
            outs[i] = fn()
            synchronize(device)
            times[i].append(time.perf_counter() - start)
    return [(out, sorted(t)[len(t) // 2]) for out, t in zip(outs, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="checkpoint directory of the large model")
    parser.add_argument("--draft", required=True, help="checkpoint directory of the small model")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="draft tokens per round")
    parser.add_argument("--prompt", default=None, help="text, tokenized with the target directory's tokenizer")
    parser.add_argument("--shakespeare-prompts", type=int, metavar="P",
                        help="P prompts of --prompt-len characters of Tiny Shakespeare's validation text "
                             "(needs char_tokenizer.json in the target directory)")
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="random prompt length without --prompt; characters with --shakespeare-prompts")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (the default); above 0: sampling, where tokens are not compared")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                        help="also time transformers generate with assistant_model (default: if installed)")
    args = parser.parse_args()
    if args.prompt is not None and args.shakespeare_prompts:
        parser.error("give --prompt or --shakespeare-prompts, not both")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    target, draft = load(args.target, device, dtype), load(args.draft, device, dtype)
    chars = char_tokenizer(args.target)
    if args.shakespeare_prompts:
        if chars is None:
            raise SystemExit(f"{args.target} has no char_tokenizer.json: --shakespeare-prompts needs the "
                             "character-level models of benchmarks/train_pair.py")
        texts = shakespeare_prompts(args.shakespeare_prompts, args.prompt_len)
        ids = [torch.tensor([chars.encode(t)]) for t in texts]
        source = f"{len(texts)} prompts of Tiny Shakespeare's validation text"
    elif args.prompt is not None and chars is not None:
        ids, source = [torch.tensor([chars.encode(args.prompt)])], "--prompt (char_tokenizer.json)"
    elif args.prompt is not None:
        from transformers import AutoTokenizer

        ids = [AutoTokenizer.from_pretrained(args.target)(args.prompt, return_tensors="pt").input_ids]
        source = "--prompt"
    else:
        ids = [torch.randint(0, target.config.vocab_size, (1, args.prompt_len),
                             generator=torch.Generator().manual_seed(0))]
        source = "random token ids"
    prompts, n = [p.to(device) for p in ids], args.new_tokens
    temperature = args.temperature
    mode = f"sampling at temperature {temperature}" if temperature > 0 else "greedy"
    total = n * len(prompts)  # new tokens per timed run
    print(f"target: {Path(args.target).name} ({sum(p.numel() for p in target.parameters()) / 1e6:.2f}M parameters), "
          f"draft: {Path(args.draft).name} ({sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M), "
          f"{dtype} on {device}, {torch.get_num_threads()} threads; {mode}, {n} new tokens after each of "
          f"{len(prompts)} x {prompts[0].size(1)} prompt tokens ({source}), median of {args.repeats}")

    def seeded() -> list[torch.Generator]:  # one generator per prompt, the same numbers in every run
        return [torch.Generator(device).manual_seed(i) for i in range(len(prompts))]

    def target_alone() -> list[torch.Tensor]:
        return [decode(target, p, n, temperature=temperature, generator=g) for p, g in zip(prompts, seeded())]

    def speculative(k: int, stats: SpeculativeStats) -> Callable[[], list[torch.Tensor]]:
        return lambda: [speculative_generate(target, draft, p, n, k=k, temperature=temperature, generator=g,
                                             stats=stats) for p, g in zip(prompts, seeded())]

    # (label, function, stats): timed together, in turns
    runs: list[tuple[str, Callable[[], list[torch.Tensor]], SpeculativeStats | None]] = [
        ("target alone (decode)", target_alone, None)]
    for k in args.k:
        stats = SpeculativeStats()
        runs.append((f"speculative, k={k}", speculative(k, stats), stats))
    runs += hf_runs(args, dtype, device, prompts, n, temperature)

    with torch.no_grad():
        results = median_times([fn for _, fn, _ in runs], device, args.repeats)
    reference, base = results[0]
    print(f"{'':<32} {'accepted':>9} {'tokens/pass':>12} {'tokens/s':>9} {'speed-up':>9}  same tokens")
    for (label, _, stats), (out, seconds) in zip(runs, results):
        if stats is not None:
            counts = f"{stats.acceptance_rate:>9.1%} {stats.tokens_per_round:>12.2f}"
        else:  # one token per target pass; assisted generate's counts are not read
            counts = f"{'':>9} {'' if 'assistant' in label else '1.00':>12}"
        same = "sampled" if temperature > 0 else all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))
        print(f"{label:<32} {counts} {total / seconds:>9.1f} {base / seconds:>8.2f}x  {same}")


def hf_runs(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, prompts: list[torch.Tensor], n: int,
            temperature: float) -> list[tuple[str, Callable[[], list[torch.Tensor]], None]]:
    """``transformers`` generate alone and with ``assistant_model`` at each k, if asked and installed."""
    if args.hf is False:
        return []
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        if args.hf:
            raise
        return []
    hf_target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(device).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(device).eval()
    for model in (hf_target, hf_draft):  # exactly n new tokens, as above
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = None
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_draft.generation_config.assistant_confidence_threshold = 0.0  # propose k tokens every round
    # Sampling: the plain softmax at the temperature, as ours (no top-k: generate's default is 50).
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)

    def hf_generate(k: int | None = None) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            extra = {}
            if k is not None:
                hf_draft.generation_config.num_assistant_tokens = k
                extra["assistant_model"] = hf_draft
            return [hf_target.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                                       **sampling, **extra) for p in prompts]
        return run

    return [("transformers generate", hf_generate(), None)] + [
        (f"generate, assistant_model, k={k}", hf_generate(k), None) for k in args.k]

if __name__ == "__main__":
    main()
