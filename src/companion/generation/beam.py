"""Searching for a likely output sequence: greedy search and beam search.

A model that predicts the next token gives ``log p(token | prefix)`` for every token of
the vocabulary. The probability of a whole sequence is the product of those next-token
probabilities, so its log-probability is their sum. Finding the most probable sequence
exactly would mean scoring every sequence, ``V ** max_len`` of them. Two cheap searches:

* **greedy**: at each step take the single most probable next token;
* **beam search**: keep the ``beam_width`` most probable prefixes at each step, extend
  each by every token, and keep the best ``beam_width`` of the extensions.

Both functions here take the model as ``step_fn(prefix) -> log_probs``: ``prefix`` is a
tuple of token ids (starting with the ``start`` tokens) and ``log_probs`` a 1-D tensor of
``V`` next-token log-probabilities. A sequence ends when it emits ``eos_id`` (which is
kept as its last token) or when it has ``max_len`` new tokens. Both return
``(tokens, log_prob)``: the new tokens (without ``start``) and their total log-probability.

Beam search with ``beam_width=1`` is greedy search, and with a beam wide enough to hold
every prefix it is exhaustive. In between it is a heuristic: it usually finds a sequence
at least as probable as greedy's, but not always, because the prefix greedy follows can
fall out of the beam and every prefix kept can end badly (a test shows such a case).

A total log-probability can only fall as a sequence grows, so ranking whole sequences by
it favours short ones. ``beam_search(..., length_penalty=alpha)`` ranks them by
``total / length ** alpha`` instead (``length`` counts the new tokens, EOS included), as
Hugging Face's ``length_penalty`` does; ``alpha=0`` is the plain total.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["beam_search", "greedy_search", "sequence_log_prob"]

StepFn = Callable[[tuple[int, ...]], Tensor]


def _check_args(start: Sequence[int], max_len: int, eos_id: int | None) -> tuple[int, ...]:
    start = tuple(int(t) for t in start)
    if not start:
        raise ValueError("start is empty: give at least one token to start from (a BOS id)")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len={max_len!r} must be an int >= 1")
    if eos_id is not None and (not isinstance(eos_id, int) or eos_id < 0):
        raise ValueError(f"eos_id={eos_id!r} must be a non-negative int or None")
    return start


def _log_probs(step_fn: StepFn, prefix: tuple[int, ...], eos_id: int | None) -> Tensor:
    """Call the model and check what it returns: a 1-D tensor of ``V`` log-probabilities."""
    out = step_fn(prefix)
    if not isinstance(out, Tensor) or out.dim() != 1 or out.numel() == 0:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"step_fn must return a 1-D tensor of V log-probabilities, got {shape}")
    if eos_id is not None and eos_id >= out.numel():
        raise ValueError(f"eos_id={eos_id} is not a token of a vocabulary of V={out.numel()}")
    return out.detach().double().cpu()


def greedy_search(
    step_fn: StepFn, start: Sequence[int], max_len: int, eos_id: int | None = None
) -> tuple[list[int], float]:
    """Append the most probable next token until ``eos_id`` or ``max_len`` new tokens.

    Returns ``(tokens, log_prob)``. Ties go to the lowest token id.

    A bigram "model" over the tokens EOS=0, A=1, B=2 and BOS=3: row ``t`` of the table
    holds the next-token probabilities after token ``t``.

    >>> table = torch.tensor([[1.0, 0.0, 0.0, 0.0],   # after EOS (never used)
    ...                       [0.4, 0.3, 0.3, 0.0],   # after A
    ...                       [0.9, 0.05, 0.05, 0.0], # after B
    ...                       [0.1, 0.5, 0.4, 0.0]]).log()  # after BOS
    >>> tokens, lp = greedy_search(lambda prefix: table[prefix[-1]], start=[3], max_len=5, eos_id=0)
    >>> tokens, round(lp, 4)  # A then EOS: 0.5 * 0.4 = 0.2
    ([1, 0], -1.6094)
    """
    prefix = _check_args(start, max_len, eos_id)
    total = 0.0
    for _ in range(max_len):
        log_probs = _log_probs(step_fn, prefix, eos_id)
        token = int(log_probs.argmax())
        total += float(log_probs[token])
        prefix += (token,)
        if token == eos_id:
            break
    return list(prefix[len(start):]), total


def beam_search(
    step_fn: StepFn,
    start: Sequence[int],
    beam_width: int,
    max_len: int,
    eos_id: int | None = None,
    length_penalty: float = 0.0,
) -> tuple[list[int], float]:
    """Keep the ``beam_width`` most probable prefixes at every step; return the best sequence.

    At each step every live prefix is extended by every token; the ``beam_width`` most
    probable extensions survive. An extension that ends in ``eos_id`` is finished and
    leaves the beam (so the beam may shrink); the others stay live. The search stops when
    nothing is live, when ``max_len`` new tokens have been added, or when the best finished
    sequence scores at least as well as every live prefix still could (a prefix can only
    lose probability as it grows, so nothing live could still win).
    Ties go to the earlier prefix, then to its likelier token, then to the lower token id,
    so that ``beam_width=1`` picks exactly what :func:`greedy_search` picks.

    The prefixes in the beam are always ranked by total log-probability. Whole sequences
    (finished, or cut at ``max_len``) are ranked by ``total / length ** length_penalty``,
    ``length`` being the number of new tokens, EOS included. With the default
    ``length_penalty=0`` that is the total itself, which favours short sequences: every
    extra token can only lower it. A positive ``length_penalty`` divides a negative total
    by a larger number for a longer sequence, which offsets that bias. A live prefix with
    total ``s`` can then still reach at most ``s / max_len ** length_penalty``, and the
    search stops early only when the best finished sequence scores at least that.

    Returns ``(tokens, log_prob)`` of the best finished or length-limited sequence;
    ``log_prob`` is its total log-probability, whatever ranked it.

    The table of :func:`greedy_search`'s example: greedy takes A (0.5) and ends with
    probability 0.5 * 0.4 = 0.2; a beam of two also keeps B (0.4), which ends with
    probability 0.4 * 0.9 = 0.36.

    >>> table = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.4, 0.3, 0.3, 0.0],
    ...                       [0.9, 0.05, 0.05, 0.0], [0.1, 0.5, 0.4, 0.0]]).log()
    >>> tokens, lp = beam_search(lambda p: table[p[-1]], start=[3], beam_width=2, max_len=5, eos_id=0)
    >>> tokens, round(lp, 4)  # B then EOS: log 0.36
    ([2, 0], -1.0217)
    """
    if not isinstance(beam_width, int) or isinstance(beam_width, bool) or beam_width < 1:
        raise ValueError(f"beam_width={beam_width!r} must be an int >= 1")
    if (not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool)
            or not 0 <= length_penalty < float("inf")):
        raise ValueError(f"length_penalty={length_penalty!r} must be a finite number >= 0")
    start = _check_args(start, max_len, eos_id)

    def final_score(score: float, prefix: tuple[int, ...]) -> float:
        return score / (len(prefix) - len(start)) ** length_penalty

    live: list[tuple[float, tuple[int, ...]]] = [(0.0, start)]  # (log-prob, prefix), best first
    finished: list[tuple[float, tuple[int, ...]]] = []
    for _ in range(max_len):
        candidates = []  # (log-prob, beam rank, next-token log-prob, token, prefix)
        for rank, (score, prefix) in enumerate(live):
            log_probs = _log_probs(step_fn, prefix, eos_id)
            for token, lp in enumerate(log_probs.tolist()):
                candidates.append((score + lp, rank, lp, token, prefix + (token,)))
        # Best first; on equal totals the earlier prefix, its likelier token, the lower id.
        candidates.sort(key=lambda c: (-c[0], c[1], -c[2], c[3]))
        live = []
        for score, _, _, token, prefix in candidates[:beam_width]:
            (finished if token == eos_id else live).append((score, prefix))
        if not live or (finished and max(final_score(*f) for f in finished)
                        >= live[0][0] / max_len ** length_penalty):
            break
    # Live prefixes cut at max_len count as sequences too; max() keeps the first of equal
    # scores, so finished sequences win ties.
    best_score, best = max(finished + live, key=lambda c: final_score(*c))
    return list(best[len(start):]), best_score


def sequence_log_prob(
    step_fn: StepFn, start: Sequence[int], tokens: Sequence[int]
) -> float:
    """The total log-probability the model gives ``tokens`` after ``start``.

    >>> table = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    >>> round(sequence_log_prob(lambda p: table[p[-1]], [0], [1, 1]), 4)  # log(0.5 * 0.75)
    -0.9808
    """
    prefix = _check_args(start, 1, None)
    total = 0.0
    for token in tokens:
        log_probs = _log_probs(step_fn, prefix, None)
        if not 0 <= int(token) < log_probs.numel():
            raise ValueError(f"token {token} is not in a vocabulary of V={log_probs.numel()}")
        total += float(log_probs[int(token)])
        prefix += (int(token),)
    return total
