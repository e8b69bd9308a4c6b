"""Held-out perplexity of a language model, with a sliding window.

Perplexity is ``exp`` of the mean negative log-likelihood (cross-entropy, in nats) of each
token given the tokens before it: a model that spreads its bet evenly over ``V`` tokens has
perplexity ``V``, a perfect one has 1. It is how quantized, pruned or distilled models are
compared with the original on the same text.

A model sees at most ``context`` tokens at a time, and a text is longer. Cutting it into
disjoint windows of ``context`` tokens is fast, but the first tokens of every window are
predicted with almost no history, which makes the perplexity worse than the model is. The
sliding window of Hugging Face's "perplexity of fixed-length models" recipe moves windows of
``context`` tokens by ``stride`` and scores in each only the tokens no earlier window scored
(the last ``stride`` ones), so every scored token after the first window has at least
``context - stride`` tokens of history. ``stride == context`` is the disjoint cut;
``stride = context // 2`` is a common compromise, each window costing one forward pass.

:func:`windows` lists the windows (a pure function), :func:`score` runs the model over them
and returns the total negative log-likelihood and the number of tokens scored, and
:func:`perplexity` is ``exp(nll / tokens)``. The model is any module mapping token ids
``(B, T)`` to logits ``(B, T, V)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Score", "perplexity", "score", "windows"]


@dataclass(frozen=True)
class Score:
    """The total negative log-likelihood ``nll`` (nats) of ``tokens`` scored tokens.

    >>> Score(nll=2 * math.log(4), tokens=2).perplexity  # two tokens, each at probability 1/4
    4.0
    """

    nll: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        """Cross-entropy per token, in nats."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def windows(n: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows of a text of ``n`` tokens: ``(begin, end, scored)`` for each.

    The window holds tokens ``begin .. end - 1`` (at most ``context``); its last ``scored``
    tokens are the ones it scores, each predicted from the tokens before it in the window.
    Windows start every ``stride`` tokens (default ``context``) until one reaches the end.
    Token 0 is never scored (nothing comes before it); with ``stride < context`` every other
    token is scored exactly once. Windows that would score nothing are left out.

    >>> windows(10, context=4, stride=2)  # tokens 1-3, then 4-5, 6-7, 8-9
    [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    >>> windows(10, context=4)  # disjoint: the first token of each window is not scored
    [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    """
    stride = context if stride is None else stride
    _check_int("context", context, 2)
    _check_int("stride", stride, 1)
    if stride > context:
        raise ValueError(f"stride={stride} is larger than context={context}: tokens between windows "
                         "would never be scored")
    out, scored_until = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        scored = min(end - scored_until, end - begin - 1)  # new tokens that have a token before them
        if scored > 0:
            out.append((begin, end, scored))
        scored_until = end
        if end == n:
            break
    return out


@torch.no_grad()
def score(model: nn.Module, ids: Tensor, context: int, stride: int | None = None, batch_size: int = 1) -> Score:
    """Run ``model`` over the sliding :func:`windows` of ``ids`` and add up the scored tokens' losses.

    ``ids`` is a 1-D tensor of token ids (at least 2); ``model`` maps ``(B, T)`` ids to
    ``(B, T, V)`` logits. Windows of equal length are run ``batch_size`` at a time (the
    logits of a batch take ``batch_size * context * V`` floats). The model is put in eval
    mode for the run and then back in the mode it was in. Log-probabilities are computed in
    float32 and added up in float64.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a 1-D tensor of token ids, got {shape}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() < 2:
        raise ValueError(f"ids has {ids.numel()} token(s); perplexity needs at least 2 (one to predict from)")
    _check_int("batch_size", batch_size, 1)
    spans = windows(ids.numel(), context, stride)
    device = next(iter(model.parameters()), ids).device
    ids = ids.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        nll, tokens, i = 0.0, 0, 0
        while i < len(spans):
            length = spans[i][1] - spans[i][0]
            batch = [spans[i]]
            while len(batch) < batch_size and i + len(batch) < len(spans) and \
                    spans[i + len(batch)][1] - spans[i + len(batch)][0] == length:
                batch.append(spans[i + len(batch)])
            i += len(batch)
            x = torch.stack([ids[b:e] for b, e, _ in batch])  # (B, L)
            logits = model(x)
            if logits.dim() != 3 or logits.shape[:2] != x.shape:
                raise ValueError(f"the model returned shape {tuple(logits.shape)} for ids of shape "
                                 f"{tuple(x.shape)}; expected (B, T, V) logits")
            for row, (_, _, n) in enumerate(batch):
                # logits at position t predict token t + 1: the last n tokens need positions -n-1 .. -2
                predicted = logits[row, -n - 1 : -1].float()  # (n, V)
                nll += F.cross_entropy(predicted, x[row, -n:], reduction="sum").double().item()
                tokens += n
    finally:
        model.train(was_training)
    return Score(nll=nll, tokens=tokens)


def perplexity(model: nn.Module, ids: Tensor, context: int, stride: int | None = None,
               batch_size: int = 1) -> float:
    """Held-out perplexity of ``model`` on the token ids ``ids`` (1-D), with a sliding window.

    ``exp`` of the mean cross-entropy of the tokens :func:`score` scores: windows of
    ``context`` tokens moving by ``stride`` (default ``context``, disjoint windows).

    >>> class Uniform(nn.Module):  # the same logit for every token: perplexity = vocabulary size
    ...     def forward(self, idx):
    ...         return torch.zeros(*idx.shape, 50)
    >>> round(perplexity(Uniform(), torch.arange(20) % 50, context=8, stride=4), 3)
    50.0
    """
    return score(model, ids, context, stride, batch_size).perplexity
