"""Train a target and a draft Llama on Tiny Shakespeare, for speculative decoding.

Speculative decoding needs two models of one vocabulary: a large *target* and a much smaller
*draft* that agrees with it often. This script trains both, seeded, on Tiny Shakespeare with
the character-level tokenizer (:mod:`companion.char_tokenizer`) and :class:`companion.train.Trainer`,
with chapter 12's recipe (AdamW, warmup and cosine decay, ``beta2=0.99``), and writes each as a
Hugging Face checkpoint directory that both ``companion.llama.Llama.from_pretrained`` and
``transformers.AutoModelForCausalLM.from_pretrained`` load::

    .venv/bin/python benchmarks/train_pair.py --out /tmp/shakespeare_pair   # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/speculative.py --target /tmp/shakespeare_pair/target \\
        --draft /tmp/shakespeare_pair/draft --shakespeare-prompts 8 --prompt-len 64 --new-tokens 128 \\
        --k 1 2 3 4 6 8 --repeats 5 --threads 1

``OUT/target`` and ``OUT/draft`` each hold ``config.json``, ``model.safetensors`` and
``char_tokenizer.json`` (the 65 characters, in id order), which ``speculative.py`` uses to
encode its prompts. ``--recipe notebook`` trains a smaller pair in under a minute, the size a
notebook chapter can afford.

At the end it prints, on the same held-out text, the validation loss of each model and of the
bigram baseline (next-character counts), and how often the draft's greedy choice is the
target's at each position of that text: the per-token agreement that sets the acceptance rate
of greedy speculative decoding on text like it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from companion.char_tokenizer import CharTokenizer
from companion.checkpoint import save_pretrained
from companion.data import load_tiny_shakespeare, train_val_split
from companion.device import seed_everything
from companion.evaluate import score
from companion.llama import Llama, LlamaConfig
from companion.train import TrainConfig, Trainer

# name -> {"target" | "draft": (LlamaConfig fields, TrainConfig fields)}. Context 256 for both,
# so that a prompt and 128 new tokens stay within the positions the models were trained on.
RECIPES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    # For benchmarks/speculative.py: a 3.2M-parameter target, one pass of which costs about five of
    # the draft's on a CPU (the draft has 1/24 of its parameters, but a pass has a fixed cost too).
    # 164 s + 16 s on 2 idle cores; validation losses 1.76 and 1.92. The target trains better at
    # 1.5e-3 than at 3e-3 or more in so few steps.
    "benchmark": {
        "target": (dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4),
                   dict(max_steps=500, batch_size=8, learning_rate=1.5e-3, min_lr=1.5e-4)),
        "draft": (dict(hidden_size=96, intermediate_size=288, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4),
                  dict(max_steps=600, batch_size=8, learning_rate=6e-3, min_lr=6e-4)),
    },
    # Small enough for a notebook chapter: 40 s + 5 s on 2 idle cores; validation losses 1.90 and
    # 2.07, and about half of the proposals accepted at k = 4 when sampling at temperature 1.
    "notebook": {
        "target": (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2),
                   dict(max_steps=350, batch_size=8, learning_rate=3e-3, min_lr=3e-4)),
        "draft": (dict(hidden_size=64, intermediate_size=192, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4),
                  dict(max_steps=300, batch_size=8, learning_rate=6e-3, min_lr=6e-4)),
    },
}
CONTEXT = 256
COMMON_TRAIN = dict(context_length=CONTEXT, warmup_steps=50, beta2=0.99, eval_batches=8, progress=False)
TOKENIZER_FILE = "char_tokenizer.json"


def train_llama(model_kw: dict[str, Any], train_kw: dict[str, Any], vocab_size: int, train_ids: torch.Tensor,
                val_ids: torch.Tensor, seed: int) -> tuple[Llama, float, float]:
    """A Llama trained on ``train_ids``; returns it (in eval mode), its last validation loss and the seconds."""
    seed_everything(seed)
    model = Llama(LlamaConfig(vocab_size=vocab_size, max_position_embeddings=CONTEXT, **model_kw))
    config = TrainConfig(**{**COMMON_TRAIN, "eval_interval": train_kw["max_steps"], "seed": seed, **train_kw})
    history = Trainer(model, train_ids, val_ids, config).run()
    return model.eval(), history.eval_val_loss[-1], history.seconds


def save_llama(model: Llama, tokenizer: CharTokenizer, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory, and the tokenizer's characters beside it."""
    no_special_tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "dtype": "float32"}
    directory = save_pretrained(model, directory, extra_config=no_special_tokens)
    (directory / TOKENIZER_FILE).write_text(json.dumps({"chars": tokenizer.itos}) + "\n", encoding="utf-8")
    return directory


def bigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy on ``val_ids`` of next-character counts in ``train_ids`` (add-one smoothed)."""
    counts = torch.ones(vocab_size, vocab_size, dtype=torch.float64)
    counts.index_put_((train_ids[:-1], train_ids[1:]), torch.ones(len(train_ids) - 1, dtype=torch.float64),
                      accumulate=True)
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return float(-log_p[val_ids[:-1], val_ids[1:]].mean())


@torch.no_grad()
def greedy_agreement(target: Llama, draft: Llama, ids: torch.Tensor) -> float:
    """Fraction of positions of ``ids`` (disjoint windows of the context) where both argmaxes agree."""
    n = len(ids) // CONTEXT * CONTEXT
    x = ids[:n].view(-1, CONTEXT)
    same = [(target(rows).argmax(-1) == draft(rows).argmax(-1)).float().mean() for rows in x.split(16)]
    return float(torch.stack(same).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="writes OUT/target and OUT/draft")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument("--eval-chars", type=int, default=32768,
                        help="held-out characters for the final losses and the agreement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    text = load_tiny_shakespeare()
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(torch.tensor(tokenizer.encode(text)))
    held_out = val_ids[: args.eval_chars]
    print(f"recipe {args.recipe!r}, seed {args.seed}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(train_ids):,} training and {len(val_ids):,} validation characters, vocabulary {tokenizer.vocab_size}")
    models, total = {}, 0.0
    for role, (model_kw, train_kw) in RECIPES[args.recipe].items():
        model, val, seconds = train_llama(model_kw, train_kw, tokenizer.vocab_size, train_ids, val_ids, args.seed)
        total += seconds
        held = score(model, held_out, context=CONTEXT, batch_size=16)
        c = model.config
        layers = f"{c.num_hidden_layers} layer" + ("s" if c.num_hidden_layers > 1 else "")
        print(f"{role}: {sum(p.numel() for p in model.parameters()):,} parameters ({layers}, "
              f"width {c.hidden_size}), {train_kw['max_steps']} steps of {train_kw['batch_size']} x {CONTEXT} "
              f"characters in {seconds:.1f} s; validation loss {val:.3f} (trainer), "
              f"{math.log(held.perplexity):.3f} on the first {len(held_out):,} held-out characters", flush=True)
        models[role] = save_llama(model, tokenizer, args.out / role), model
    bigram = bigram_loss(train_ids, held_out, tokenizer.vocab_size)
    agreement = greedy_agreement(models["target"][1], models["draft"][1], held_out)
    print(f"bigram baseline {bigram:.3f} on the same characters; training took {total:.1f} s in all")
    print(f"the draft's greedy choice is the target's at {agreement:.1%} of the held-out positions")
    print(f"wrote {models['target'][0]} and {models['draft'][0]}")


if __name__ == "__main__":
    main()
