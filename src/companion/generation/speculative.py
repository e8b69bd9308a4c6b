"""Speculative decoding: a small model guesses, the large model checks several guesses at once.

Generating one token with a large model reads every one of its weights, and on most hardware
that reading, not the arithmetic, sets the speed (see :mod:`companion.generation.static_cache`).
Feeding the model ``k + 1`` tokens in one pass reads the weights once too, and costs little
more than feeding one. Speculative decoding (Leviathan et al., 2023; Chen et al., 2023) turns
that into fewer passes of the large model:

1. a small **draft** model proposes ``k`` tokens, one after the other, cheaply;
2. the large **target** model scores the last accepted token and the ``k`` proposals in a
   single pass over ``k + 1`` positions, which gives its next-token distribution after every
   prefix of the proposals;
3. the proposals are checked from left to right: the accepted ones are kept, the first
   rejected one is replaced by a token of the target's choosing, and when all ``k`` are
   accepted the target's last position gives one more token for free (the *bonus* token).

Each round costs one target pass and yields between 1 and ``k + 1`` tokens. How many depends
on how often the draft agrees with the target; :class:`SpeculativeStats` counts it.

**The output does not depend on the draft.** With ``temperature=0`` the check is "is the
proposal the target's argmax?": every kept token is one the target would have chosen, so
the tokens are exactly those of the target's own greedy decoding. With ``temperature > 0``
a proposal ``x`` drawn from the draft's distribution ``q`` is kept with probability
``min(1, p(x) / q(x))``, where ``p`` is the target's distribution, and otherwise replaced by
a sample of the *residual* ``max(0, p - q)``, normalised. The emitted token is then
distributed exactly as ``p``: a token ``x`` is emitted by acceptance with probability
``q(x) min(1, p(x)/q(x)) = min(p(x), q(x))``, and by the residual with probability
``max(0, p(x) - q(x))`` (the total rejected mass equals the residual's total mass), and the
two add up to ``p(x)``. :func:`accept_or_resample` is that step on its own, as a pure
function. Greedy decoding is its special case where ``p`` and ``q`` are one-hot: a proposal is
accepted with probability 1 if it is the target's argmax and 0 otherwise, and the residual
is the one-hot of the target's argmax.

**Rewinding the caches.** Both models keep keys and values in a preallocated
:class:`~companion.layers.KVCache` indexed by position. After a rejection, the slots of the
rejected positions hold keys of tokens that are not part of the sequence. Nothing has to be
erased: the attention mask lets a query at position ``p`` see only slots ``<= p``, and the
next round writes its tokens into those slots (at their positions) before attending. So a
cache is rewound by remembering how many of its positions are valid, and feeding from there.
Two counters are kept: the target's cache always holds every token but the last one; the
draft's may lag by one more (after a round where all ``k`` were accepted, the draft never
fed its own last proposal), so each round first feeds the draft the one or two tokens it is
missing, in one pass.

A Mistral model with a sliding window normally keeps a
:class:`~companion.layers.RollingKVCache`, where position ``p`` overwrites position
``p - window``. A rejected position has then overwritten a key that the sequence still needs,
so that cache cannot be rewound: here Mistral gets a full-length cache instead
(``setup_cache(..., rolling=False)``), whose mask applies the window.

The end of generation: a round proposes at most ``max_new_tokens - n - 1`` tokens when ``n``
are already generated, so a round never produces more than asked, and no model ever writes
past position ``T + max_new_tokens - 2``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from companion.layers import RollingKVCache

__all__ = [
    "SpeculativeStats",
    "accept_or_resample",
    "acceptance_probability",
    "residual_distribution",
    "speculative_generate",
]


@dataclass
class SpeculativeStats:
    """Counts of one or more calls of :func:`speculative_generate`.

    Pass an instance as ``stats=``: the counts of the call are *added* to it, so one instance
    can sum several calls (a benchmark's repetitions).

    * ``rounds``: draft-then-verify rounds (one target pass each);
    * ``proposed``: tokens the draft proposed; ``accepted``: those the target kept;
    * ``target_calls``, ``draft_calls``: forward passes of each model, the prompt's included;
    * ``new_tokens``: tokens appended to the prompt.

    >>> stats = SpeculativeStats(rounds=4, proposed=16, accepted=12, new_tokens=16)
    >>> stats.acceptance_rate, stats.tokens_per_round
    (0.75, 4.0)
    """

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the proposed tokens that the target accepted (0 if none was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target pass of verification: 1 for a useless draft, ``k + 1`` at best."""
        return self.new_tokens / self.rounds if self.rounds else 0.0


def acceptance_probability(p: Tensor, q: Tensor, tokens: Tensor) -> Tensor:
    """``min(1, p(x) / q(x))`` for each proposed token ``x``.

    ``p`` and ``q`` are ``(..., V)`` distributions of the target and of the draft; ``tokens``
    ``(...)`` are the draft's proposals, drawn from ``q`` (so ``q(x) > 0``). A token the
    target finds at least as likely as the draft did is always kept.

    >>> acceptance_probability(torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5]), torch.tensor(0))
    tensor(0.4000)
    """
    p_x = p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (p_x / q_x).clamp(max=1.0)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """``max(0, p - q)``, normalised over the last dimension: where a rejected token is redrawn.

    It puts mass only where the target wants more than the draft offered, exactly the mass
    that rejections leave missing. If ``p == q`` it is all zeros; a rejection then has
    probability 0, and ``p`` itself is returned so the result is always a distribution.

    >>> residual_distribution(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.25, 0.25, 0.5]))
    tensor([0.8333, 0.1667, 0.0000])
    """
    residual = (p - q).clamp(min=0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / torch.where(total > 0, total, 1.0), p)


def accept_or_resample(p: Tensor, q: Tensor, draft_tokens: Tensor, u: Tensor,
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """Check ``k`` proposals against the target; returns ``(n_accepted, next_token)``.

    ``p`` ``(k + 1, V)``: the target's distribution at the position of each proposal and at the
    position after the last one. ``q`` ``(k, V)``: the draft's distribution each proposal was
    drawn from. ``draft_tokens`` ``(k,)``: the proposals. ``u`` ``(k,)``: uniform numbers in
    ``[0, 1)``, given by the caller so that this step is a pure function of its inputs.

    Proposal ``i`` is accepted when ``u[i] < min(1, p_i(x) / q_i(x))``, which happens with
    probability ``min(1, p_i(x) / q_i(x))``. ``n_accepted`` is the length of the leading run
    of acceptances. The next token is drawn (with ``generator``) from
    :func:`residual_distribution` at the first rejection, or from ``p[k]`` (the bonus token)
    when all ``k`` are accepted. The tokens emitted are then distributed as the target's.

    >>> p = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    >>> q = torch.tensor([[0.3, 0.7, 0.0]])
    >>> accept_or_resample(p, q, torch.tensor([0]), torch.tensor([0.99]))  # p/q = 2: kept, then the bonus
    (1, 2)
    >>> accept_or_resample(p, q, torch.tensor([1]), torch.tensor([0.6]))  # 0.6 >= 4/7: redrawn from [1, 0, 0]
    (0, 0)
    """
    k = draft_tokens.numel()
    if p.shape[0] != k + 1 or q.shape[0] != k or u.numel() != k:
        raise ValueError(f"for k={k} proposals, p must have k + 1 rows, q and u k rows; got p "
                         f"{tuple(p.shape)}, q {tuple(q.shape)}, u {tuple(u.shape)}")
    accepted = u < acceptance_probability(p[:k], q, draft_tokens)  # (k,)
    n = int(accepted.long().cumprod(0).sum())  # the leading run: everything after a rejection is dropped
    dist = residual_distribution(p[n], q[n]) if n < k else p[k]
    return n, int(torch.multinomial(dist, 1, generator=generator))


def _check_model(model: nn.Module, role: str, needed: int) -> None:
    if not hasattr(model, "setup_cache"):
        raise ValueError(f"the {role} model, a {type(model).__name__}, has no setup_cache: speculative "
                         "decoding needs models with a KV cache (Llama, Mistral, Phi)")
    longest = model.config.max_position_embeddings
    if needed > longest:
        raise ValueError(f"a prompt plus max_new_tokens needs {needed} positions, more than the {role} "
                         f"model's max_position_embeddings={longest}")


def _setup_rewindable_cache(model: nn.Module, role: str, max_seq_len: int) -> None:
    """A cache for one sequence in which positions can be overwritten out of order (see the module)."""
    if "rolling" in inspect.signature(model.setup_cache).parameters:
        model.setup_cache(1, max_seq_len, rolling=False)  # Mistral: full length, the mask applies the window
    else:
        model.setup_cache(1, max_seq_len)
    if any(isinstance(m, RollingKVCache) for m in model.modules()):
        raise ValueError(f"the {role} model, a {type(model).__name__}, keeps a rolling KV cache, whose "
                         "rejected positions overwrite keys still needed: it cannot be rewound")


def _probabilities(logits: Tensor, temperature: float) -> Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    k: int = 4,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Tensor:
    """Append up to ``max_new_tokens`` tokens of ``target`` to ``idx`` ``(1, T)``; returns ``(1, T + n)``.

    ``draft`` proposes ``k`` tokens per round and ``target`` checks them in one pass (see the
    module docstring). Both follow the cache protocol of
    :mod:`companion.generation.static_cache` and share a vocabulary; their caches are set up
    here, for ``T + max_new_tokens`` positions.
    ``draft`` may be ``target`` itself: every proposal is then accepted.

    ``temperature=0`` (the default) gives exactly the tokens of
    ``decode(target, idx, max_new_tokens)``; a positive temperature samples from the target's
    softmax at that temperature (the draft samples at the same temperature), using
    ``generator``. With ``eos_token_id``, generation stops right after that token, so
    ``n <= max_new_tokens``. ``stats``, a :class:`SpeculativeStats`, receives the counts of
    this call.
    """
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.size(0) != 1 or idx.dtype != torch.long:
        shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a (1, T) tensor of token ids (one sequence), got {shape}"
                         + (f" {idx.dtype}" if isinstance(idx, Tensor) else ""))
    T = idx.size(1)
    if T == 0:
        raise ValueError("idx is empty: give at least one prompt token")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an int >= 1: the number of tokens the draft proposes per round")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"the target's vocab_size={target.config.vocab_size} and the draft's "
                         f"vocab_size={draft.config.vocab_size} differ: the draft must propose the target's tokens")
    total = T + max_new_tokens
    _check_model(target, "target", total)
    _check_model(draft, "draft", total)
    stats = stats if stats is not None else SpeculativeStats()
    if max_new_tokens == 0:
        return idx.clone()

    greedy = temperature == 0
    out = torch.empty(1, total, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    _setup_rewindable_cache(target, "target", total)
    _setup_rewindable_cache(draft, "draft", total)
    # Both caches take the prompt but its last token, which the first round feeds.
    if T > 1:
        for model in (target, draft):
            model(idx[:, :-1], start_pos=0, last_only=True)
        stats.target_calls += 1
        stats.draft_calls += 1
    length = T  # tokens in the sequence; the target's cache holds the first length - 1
    draft_len = T - 1  # positions held in the draft's cache: length - 1 or length - 2

    while length < total:
        k_now = min(k, total - length - 1)  # the last round may propose fewer, or none
        # 1. The draft proposes k_now tokens, after feeding the one or two tokens it lacks.
        proposals, q_rows = [], []
        if k_now > 0:
            logits = draft(out[:, draft_len:length], start_pos=draft_len, last_only=True)[0, -1]
            draft_len = length
            stats.draft_calls += 1
            for i in range(k_now):
                if greedy:
                    token = logits.argmax(-1)
                else:
                    q = _probabilities(logits, temperature)
                    token = torch.multinomial(q, 1, generator=generator)[0]
                    q_rows.append(q)
                proposals.append(token)
                if i + 1 < k_now:  # the last proposal is fed only if accepted, next round
                    logits = draft(token.view(1, 1), start_pos=draft_len, last_only=True)[0, -1]
                    draft_len += 1
                    stats.draft_calls += 1
        drafted = torch.stack(proposals) if proposals else out.new_empty(0)  # (k_now,)

        # 2. The target scores the last token and the proposals in one pass: k_now + 1 positions.
        chunk = torch.cat([out[0, length - 1 : length], drafted]).view(1, -1)
        target_logits = target(chunk, start_pos=length - 1)[0]  # (k_now + 1, V)
        stats.target_calls += 1

        # 3. Keep the leading run of accepted proposals, then one token of the target's.
        if greedy:
            choice = target_logits.argmax(-1)  # (k_now + 1,)
            n = int((drafted == choice[:k_now]).long().cumprod(0).sum())
            next_token = int(choice[n])
        else:
            p = _probabilities(target_logits, temperature)
            q = torch.stack(q_rows) if q_rows else p[:0]
            u = torch.rand(k_now, generator=generator, device=p.device)
            n, next_token = accept_or_resample(p, q, drafted, u, generator)
        stats.rounds += 1
        stats.proposed += k_now
        stats.accepted += n

        new = drafted[:n].tolist() + [next_token]
        if eos_token_id is not None and eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
        out[0, length : length + len(new)] = torch.tensor(new, device=out.device)
        length += len(new)
        if eos_token_id is not None and new[-1] == eos_token_id:
            break
        # Rewind: the draft's positions past the accepted tokens hold rejected ones.
        draft_len = min(draft_len, length - 1)

    stats.new_tokens += length - T
    return out[:, :length]
