"""Generating for many prompts of different lengths at once: left padding and per-row positions.

Decoding one prompt reads every weight of the model for every new token; on most hardware
that reading, not the arithmetic, sets the speed. Decoding ``B`` prompts together reads each
weight once per step for all of them, so a batch produces up to ``B`` times more tokens per
second, until the arithmetic becomes the limit. The difficulty is that prompts have
different lengths, and a batch is a rectangle.

**The layout: padding on the left.** Each prompt is padded *on the left* to the length
``T`` of the longest one (row ``r`` gets ``left_pad[r] = T - len(prompt_r)`` padding
tokens), so that every prompt ends in column ``T - 1``::

    row 0:  .  .  a0 a1 a2        left_pad = [2, 0, 4]
    row 1:  b0 b1 b2 b3 b4        every row's next token goes in column 5,
    row 2:  .  .  .  .  c0        then 6, 7, ...

Then one pass over the prompts gives every row's next-token logits in the same (last)
column, and every later step feeds one token per row into the same column. Columns are
the KV cache's slots, so the cache protocol of the models stays as it is: one write
position (``start_pos``), shared by the whole batch, one step of fixed shape ``(B, 1)``.
Padding on the right would leave each row's last token in a different column and each
row's next token in a different slot.

**Exactness: per-row positions and a padding mask.** Padding must change nothing for any
row, so the models take ``left_pad`` (:func:`companion.layers.positions_and_mask`):

* a row's positions count from its first real token, ``position = column - left_pad[r]``:
  row 2's ``c0`` is at position 0, as when it is generated alone. Rotary angles (Llama,
  Mistral, Phi) and learned position embeddings (GPT) are read at these positions;
* the mask is built from these positions row by row: padding has negative positions and no
  query sees it; causality and Mistral's sliding window depend only on *differences* of
  positions, which are the same in columns, so a row's window is exactly its window alone.
  Mistral's :class:`~companion.layers.RollingKVCache` therefore keeps working in columns
  (column ``c`` in slot ``c % window``), with the mask computed from each row's positions.

With those two, each row's attention weights are, up to rounding, those of its prompt
alone: the padding's weights are exactly zero. In float32 with greedy decoding each row
gives the tokens its prompt gives alone (tested for all four families, Mistral past its
window).

The other design, *per-row positions without padding* (each row writes its own cache slot
at its own position), wastes no compute on padding but needs a different write position per
row, a rolling cache whose slots differ per row, and still a rectangular prompt pass (or
one pass per prompt). Left padding keeps the cache simple at the cost of ``T - len(prompt)``
wasted columns per row, which is small when the prompts are of similar lengths (sort them
by length and batch neighbours, if they are not).

**Finished rows.** With ``eos_token_id``, a row that produces it is done: its tokens end
with the eos token, and the row is dropped from the batch (its cache rows with it,
:meth:`companion.layers.KVCache.keep_rows`), so the other rows go on without spending work
on it. The batch stops when every row has stopped or has ``max_new_tokens`` new tokens.

Any model with the cache protocol and a ``left_pad`` argument works:
:class:`~companion.llama.Llama`, :class:`~companion.mistral.Mistral`,
:class:`~companion.phi.Phi` and chapter 7's :class:`~companion.gpt.GPT`.

>>> from companion.llama import Llama, LlamaConfig
>>> model = Llama(LlamaConfig.preset("tiny")).eval()
>>> new = generate_batch(model, [[1, 2, 3], [4], [5, 6]], max_new_tokens=4)
>>> [len(tokens) for tokens in new]
[4, 4, 4]
"""

from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
from torch import Tensor, nn

from companion.generation.sampling import sample_next
from companion.layers import KVCache, RollingKVCache

__all__ = ["check_token_id", "generate_batch", "left_pad_batch"]

PAD_TOKEN_ID = 0  # what fills the padding columns; any valid id does, since no query reads them


def left_pad_batch(prompts: Sequence[Sequence[int]], pad_token_id: int = PAD_TOKEN_ID,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Pad ``prompts`` on the left to one length: token ids ``(B, T)`` and ``left_pad`` ``(B,)``.

    ``T`` is the longest prompt's length, and row ``r`` starts with ``left_pad[r] = T -
    len(prompts[r])`` copies of ``pad_token_id``.

    >>> idx, left_pad = left_pad_batch([[7, 8, 9], [5]])
    >>> idx
    tensor([[7, 8, 9],
            [0, 0, 5]])
    >>> left_pad
    tensor([0, 2])
    """
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        idx[row, T - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
    left_pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return idx.to(device), left_pad.to(device)


def check_token_id(token: object, name: str, vocab_size: int) -> int:
    """``token`` as an int, or a ``ValueError`` naming ``name`` if it is not an id in ``[0, vocab_size)``.

    >>> check_token_id(300, "prompts[0][2]", 256)
    Traceback (most recent call last):
        ...
    ValueError: prompts[0][2]=300 is not a token id: ids are ints in [0, 256)
    """
    if isinstance(token, bool) or not isinstance(token, Integral) or not 0 <= token < vocab_size:
        raise ValueError(f"{name}={token!r} is not a token id: ids are ints in [0, {vocab_size})")
    return int(token)


def _check_arguments(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     temperature: float, eos_token_id: int | None) -> list[list[int]]:
    """Raise ``ValueError`` naming the first bad argument; return the prompts as lists of ints."""
    vocab_size = model.config.vocab_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 is greedy decoding)")
    if eos_token_id is not None:
        check_token_id(eos_token_id, "eos_token_id", vocab_size)
    if isinstance(prompts, Tensor) and prompts.dim() == 2:  # (B, T): prompts of one length
        prompts = prompts.tolist()
    if isinstance(prompts, (str, Tensor)) or len(prompts) == 0:
        raise ValueError(f"prompts={prompts!r} must be a non-empty list of prompts, each a list of token ids")
    checked = []
    for row, prompt in enumerate(prompts):
        prompt = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
        if not prompt:
            raise ValueError(f"prompts[{row}] is empty: every prompt needs at least one token")
        checked.append([check_token_id(token, f"prompts[{row}][{i}]", vocab_size) for i, token in enumerate(prompt)])
    T, context = max(len(p) for p in checked), model.config.max_position_embeddings
    if T + max_new_tokens > context:
        raise ValueError(f"the longest prompt ({T} tokens) plus max_new_tokens={max_new_tokens} needs {T + max_new_tokens} "
                         f"positions, more than the model's context of {context}")
    return checked


def _keep_rows(model: nn.Module, rows: Tensor) -> None:
    """Keep only the batch rows ``rows`` in every KV cache of ``model``."""
    for module in model.modules():
        if isinstance(module, (KVCache, RollingKVCache)):
            module.keep_rows(rows)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens for each prompt, all prompts in one batch.

    ``prompts`` is a list of token-id lists, of any lengths (at least one token each). Returns
    one list per prompt, in order, with its *new* tokens only: ``max_new_tokens`` of them, or
    fewer for a row that produced ``eos_token_id`` (that row's list ends with it).

    ``temperature=0`` (the default) is greedy decoding, and then each row's tokens are the
    tokens its prompt gives alone (with :func:`companion.generation.sampling.generate` or
    :func:`companion.generation.static_cache.decode`). ``temperature > 0`` samples, filtered by ``top_k`` and
    ``top_p`` and drawn from ``generator`` (see :func:`companion.generation.sampling.sample_next`); the
    draws depend on the batch, so a sampled row need not equal a sampled solo run.

    The model must be in eval mode (dropout would make rows differ from solo runs) and
    follow the cache protocol with ``left_pad`` (see the module docstring). The longest prompt
    plus ``max_new_tokens`` must fit the model's context (``config.max_position_embeddings``):
    the padded batch is that long. Errors name the bad value and the rule it breaks.
    """
    prompts = _check_arguments(model, prompts, max_new_tokens, temperature, eos_token_id)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    idx, left_pad = left_pad_batch(prompts, device=device)  # (B, T), (B,)
    B, T = idx.shape
    model.setup_cache(B, T + max_new_tokens)
    new = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)  # -1: not generated
    rows = torch.arange(B, device=device)  # which prompt each row of the running batch is
    logits = model(idx, start_pos=0, last_only=True, left_pad=left_pad)[:, -1]  # (B, V): every prompt's next token
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)  # (b,) for the b running rows
        new[rows, t] = tok
        if t + 1 == max_new_tokens:
            break
        if eos_token_id is not None:
            done = tok == eos_token_id
            if bool(done.any()):  # a device-to-host copy per token, with eos only (as in decode)
                keep = (~done).nonzero().squeeze(1)  # the rows that go on
                if keep.numel() == 0:
                    break
                rows, tok, left_pad = rows[keep], tok[keep], left_pad[keep]
                _keep_rows(model, keep)  # finished rows leave the batch, and their cache rows with them
        logits = model(tok[:, None], start_pos=T + t, last_only=True, left_pad=left_pad)[:, -1]  # (b, V)
    return [[token for token in row if token >= 0] for row in new.tolist()]
