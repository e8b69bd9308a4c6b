"""A lean decoding loop for models with a preallocated KV cache.

:func:`companion.generate.generate` is the general loop of the book (any model, with or
without a cache, stopping at an end token). This one does the least work per token, for
models that follow the cache protocol (``setup_cache`` and ``model(idx, start_pos=...)``,
as :class:`~companion.llama.Llama`, :class:`~companion.mistral.Mistral` and
:class:`~companion.phi.Phi` do):

* the prompt goes through the model once, and logits are computed for its last position only
  (``last_only=True``): the output layer is one of the largest matrices of a small model;
* every later step feeds one token at a position given as a tensor, so each step has
  exactly the same shapes and the step function can be compiled once with
  ``torch.compile`` (and captured as a CUDA graph with ``mode="reduce-overhead"``);
* tokens are written into a preallocated output tensor, not concatenated.

It gives the same tokens as ``generate(model, idx, n, temperature=0, use_cache=True)``
(tested per model). :func:`compile_step` compiles the one-token step: on a GPU as a CUDA
graph, on a CPU with the matrix-vector fast path of :class:`companion.layers.Linear`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from companion.generate import sample_next

__all__ = ["compile_step", "decode"]


@torch.no_grad()
def decode(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    step: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Append ``max_new_tokens`` tokens to the prompt ``idx`` ``(B, T)``; returns ``(B, T + n)``.

    ``temperature=0`` (the default) is greedy decoding. ``step``, if given, replaces the
    one-token step ``lambda tok, pos: model(tok, start_pos=pos, last_only=True)``; pass a
    ``torch.compile``-d version of it to decode faster (see ``benchmarks/decode.py``).
    """
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a (B, T) tensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    B, T = idx.shape
    model.setup_cache(B, T + max_new_tokens)
    if step is None:
        def step(tok: Tensor, pos: Tensor) -> Tensor:
            return model(tok, start_pos=pos, last_only=True)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    logits = model(idx, start_pos=0, last_only=True)[:, -1]  # (B, V): the prompt in one pass
    for t in range(T, T + max_new_tokens):
        out[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
        if t + 1 < T + max_new_tokens:
            pos = torch.tensor(t, device=idx.device)  # a tensor, so a compiled step sees one shape
            logits = step(out[:, t : t + 1], pos)[:, -1]  # (B, V)
    return out


def compile_step(model: nn.Module, *, mode: str | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``model``'s one-token decoding step, compiled with ``torch.compile``; pass it to :func:`decode`.

    On a GPU the default ``mode="reduce-overhead"`` records the whole step as one CUDA graph,
    replayed for every token: no Python and no kernel-launch cost per layer. On a CPU,
    Inductor fuses the step's small operations, and the model's
    :class:`~companion.layers.Linear` layers become bandwidth-bound loops over their
    weights. Compiling takes tens of seconds on a CPU, once per model and batch size: it pays
    off for long or repeated generations, not for a single short one. On a CPU, Inductor
    needs a C++ compiler (gcc or clang; Colab, Kaggle and most Linux and macOS machines have
    one).
    """
    device = next(model.parameters()).device
    if mode is None and device.type == "cuda":
        mode = "reduce-overhead"

    def one_token(tok: Tensor, pos: Tensor) -> Tensor:
        return model(tok, start_pos=pos, last_only=True)

    return torch.compile(one_token, mode=mode, fullgraph=True)
