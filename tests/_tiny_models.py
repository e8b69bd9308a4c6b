"""Tiny random models of the four families, shared by the batching and engine tests.

Mistral's window (``WINDOW = 4``) is shorter than most prompts and generations in those
tests, so its sliding window is exercised; every model has a vocabulary of ``VOCAB`` ids.
"""

from __future__ import annotations

import functools

import torch

from companion.gpt import GPT, GPTConfig
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig
from companion.phi import Phi, PhiConfig

WINDOW = 4
VOCAB = 256
MODELS = {
    "llama": lambda: Llama(LlamaConfig.preset("tiny", num_key_value_heads=2)),
    "mistral": lambda: Mistral(MistralConfig.preset("tiny", sliding_window=WINDOW)),
    "phi": lambda: Phi(PhiConfig.preset("tiny")),
    "gpt": lambda: GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, n_positions=64)),
}


@functools.cache
def random_model(name: str) -> torch.nn.Module:
    """A tiny model whose greedy tokens are varied: larger weights than at initialisation,
    norm weights away from 1, small random biases (large ones make every row repeat a token)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ("norm" in pname or ".ln_" in pname) and pname.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.02)
    return model
