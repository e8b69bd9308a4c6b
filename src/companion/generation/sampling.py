"""Turning next-token logits into text: greedy, temperature, top-k and top-p sampling.

Every model in the book maps token ids ``(B, T)`` to logits ``(B, T, V)``. Generation
appends one token at a time: take the logits of the last position, pick a token, repeat.

Two ways to run a model:

* without a cache, the whole (cropped) sequence goes through the model at every step;
* with a cache, the model keeps keys and values of earlier positions, so each step feeds
  only the new token. A model that supports this has ``setup_cache(batch_size,
  max_seq_len)`` and accepts ``model(idx, start_pos=p)``, where ``idx`` holds the tokens
  at positions ``p, p+1, ...``. Both ways give the same tokens (tested per model).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["generate", "sample_next", "top_k_filter", "top_p_filter"]


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits in each row, set the rest to -inf.

    >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    tensor([[-inf, 3., 2.]])
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k={k!r} must be an int >= 1")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``.

    The token that crosses ``p`` is kept, so at least one token always survives.

    >>> top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7).exp()
    tensor([[0.5000, 0.3000, 0.0000]])
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p={p!r} must be in (0, 1]")
    if p == 1.0:  # everything: skip the sum, whose rounding could drop the rarest tokens
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` ``(B, V)``; returns ids ``(B,)``.

    ``temperature=0`` is greedy decoding (argmax). Otherwise logits are divided by the
    temperature, filtered by top-k and then top-p, and a token is sampled.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Callable[..., Tensor],
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    context_length: int | None = None,
    use_cache: bool = False,
) -> Tensor:
    """Append up to ``max_new_tokens`` tokens to ``idx`` ``(B, T)``; returns ``(B, T + n)``.

    ``model(idx)`` must return logits ``(B, T, V)`` (or a tuple whose first item is).
    Without a cache, the input is cropped to the last ``context_length`` tokens. A row
    that has produced ``eos_token_id`` keeps producing it; generation stops early once
    every row has. With ``use_cache=True`` the model must provide ``setup_cache`` and
    ``start_pos`` (see the module docstring).
    """
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a (B, T) tensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
    if idx.size(1) == 0:
        raise ValueError("idx is empty: give at least one prompt token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if context_length is not None and context_length < 1:
        raise ValueError(f"context_length={context_length} must be >= 1")

    def logits_of(out):
        return out[0] if isinstance(out, tuple) else out

    B = idx.size(0)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    if use_cache:
        if not hasattr(model, "setup_cache"):
            raise ValueError(f"{type(model).__name__} has no setup_cache: it cannot generate with a KV cache")
        model.setup_cache(B, idx.size(1) + max_new_tokens)
        step_input, pos = idx, 0
    for _ in range(max_new_tokens):
        if use_cache:
            logits = logits_of(model(step_input, start_pos=pos))[:, -1, :]
            pos += step_input.size(1)
        else:
            window = idx if context_length is None else idx[:, -context_length:]
            logits = logits_of(model(window))[:, -1, :]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_token_id is not None and bool(finished.all()):
            break
    return idx
