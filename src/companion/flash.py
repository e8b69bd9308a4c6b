"""FlashAttention's forward pass (Dao et al., 2022; Dao, 2023), written out in plain PyTorch.

Ordinary attention builds the whole ``(T_q, T_k)`` matrix of scores, then takes a softmax
over each row. FlashAttention never holds that matrix: it walks over *tiles*, a block of
``block_q`` queries against a block of ``block_k`` keys at a time, and keeps three running
quantities per query row:

* ``m``: the largest score seen so far (for a numerically safe ``exp``),
* ``l``: the sum of ``exp(score - m)`` over the keys seen so far,
* ``acc``: the sum of ``exp(score - m) * value`` over the same keys.

When a new tile raises the row maximum from ``m_old`` to ``m_new``, everything summed so
far was measured against the old maximum, so ``l`` and ``acc`` are multiplied by
``exp(m_old - m_new)``; after the last tile, ``acc / l`` is exactly the softmax-weighted sum
of the values (the *online softmax*, Milakov and Gimelshein, 2018). As in FlashAttention-2,
query tiles form the outer loop and key/value tiles the inner one, and under a causal or
sliding-window mask the tiles in which every entry is masked are skipped, not computed:
about half of them for causal attention, most of them for a short window.

* :func:`flash_attention`: the tiled forward pass, with grouped key/value heads.
* :func:`tile_counts`: how many tiles it computes and how many it skips.

The mask follows :func:`companion.layers.attention_mask`. Letters used in shape comments:
B batch, H query heads, K key/value heads, G query heads per key/value head (``H // K``),
T query positions, S key positions, D head dimension; ``Tq`` and ``Sk`` are the sizes of
one query tile and one key tile.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from companion.layers import attention_mask

__all__ = ["TileCounts", "flash_attention", "tile_counts"]


class TileCounts(NamedTuple):
    """How many ``(query tile, key tile)`` pairs :func:`flash_attention` computes and skips."""

    computed: int
    skipped: int


def _check_blocks(block_q: int, block_k: int, causal: bool, window: int | None) -> None:
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"{name}={block!r} must be an int >= 1")
    if window is not None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be an int >= 1 or None")
        if not causal:
            raise ValueError(f"window={window} needs causal=True: a sliding window is the last "
                             "`window` keys up to the query itself")


def _check_lengths(T_q: int, T_k: int, causal: bool) -> None:
    if T_k < 1:
        raise ValueError(f"T_k={T_k}: there must be at least one key")
    if causal and T_q > T_k:
        raise ValueError(f"T_q={T_q} > T_k={T_k} with causal=True: the queries are the last "
                         "T_q of the T_k positions, so T_q <= T_k")


def _key_tiles(q0: int, q1: int, T_q: int, T_k: int, block_k: int, causal: bool, window: int | None) -> range:
    """The key tiles that queries ``q0 .. q1 - 1`` need: those with at least one allowed key.

    Query ``i`` sits at position ``i + T_k - T_q`` and sees the keys from
    ``position - window + 1`` to ``position`` (causal), so the tile's queries together see
    one unbroken run of keys; every key tile that overlaps it has an allowed entry.
    """
    n_tiles = math.ceil(T_k / block_k)
    if not causal:
        return range(n_tiles)
    offset = T_k - T_q
    last_key = q1 - 1 + offset  # the newest key the tile's last query sees
    first_key = 0 if window is None else max(0, q0 + offset - window + 1)  # the oldest, for its first query
    return range(first_key // block_k, last_key // block_k + 1)


def tile_counts(
    T_q: int, T_k: int, block_q: int = 64, block_k: int = 64, causal: bool = True, window: int | None = None
) -> TileCounts:
    """How many tiles :func:`flash_attention` computes and skips for these sizes.

    The ``ceil(T_q / block_q) * ceil(T_k / block_k)`` tiles split into those with at least
    one allowed (query, key) pair, which are computed, and those entirely masked, which are
    skipped. Causal attention over 256 positions in tiles of 64 needs the 4 tiles on the
    diagonal and the 6 below it; a window of 64 keeps only the diagonal and the one below.

    >>> tile_counts(256, 256, 64, 64)
    TileCounts(computed=10, skipped=6)
    >>> tile_counts(256, 256, 64, 64, window=64)
    TileCounts(computed=7, skipped=9)
    >>> tile_counts(256, 256, 64, 64, causal=False)
    TileCounts(computed=16, skipped=0)
    """
    _check_blocks(block_q, block_k, causal, window)
    _check_lengths(T_q, T_k, causal)
    computed = sum(len(_key_tiles(q0, min(q0 + block_q, T_q), T_q, T_k, block_k, causal, window))
                   for q0 in range(0, T_q, block_q))
    total = math.ceil(T_q / block_q) * math.ceil(T_k / block_k)
    return TileCounts(computed, total - computed)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention computed tile by tile with the online softmax; forward pass only.

    ``q`` is ``(B, H, T_q, D)``; ``k`` and ``v`` are ``(B, K, T_k, D)`` with ``H`` a multiple
    of ``K``: query head ``h`` reads key/value head ``h // (H // K)`` (grouped-query
    attention), and the keys are not copied per query head. Returns ``(B, H, T_q, D)`` in
    the dtype of ``q``. Scores are ``scale * q . k`` with ``scale = 1 / sqrt(D)`` by default;
    the running max, running sum and the output are accumulated in float32 (float64 inputs
    stay in float64).

    Masking is that of :func:`companion.layers.attention_mask` (and of Mistral): the queries
    are the last ``T_q`` of the ``T_k`` positions, so query ``i`` is at position
    ``p = i + T_k - T_q``, as when decoding with a cache. With ``causal=True`` it sees keys
    ``j <= p``; a ``window`` further keeps only ``j > p - window``, the last ``window`` keys,
    itself included (``p - j < window``). A window needs ``causal=True``, and a causal call
    needs ``T_q <= T_k``, so every query sees at least one key. ``causal=False`` lets every
    query see every key.

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> q, k, v = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    >>> out = flash_attention(q, k, v, window=30, block_q=32, block_k=32)
    >>> out.shape
    torch.Size([1, 4, 100, 16])
    >>> from companion.layers import attention
    >>> mask = attention_mask(torch.arange(100), torch.arange(100), window=30)
    >>> torch.allclose(out, attention(q, k, v, mask), atol=1e-5)  # same numbers, never a 100 x 100 matrix
    True
    >>> tile_counts(100, 100, 32, 32, window=30)
    TileCounts(computed=7, skipped=9)
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected 4 dimensions (B, heads, T, D)")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} has dtype {x.dtype}: expected a floating-point dtype")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one dtype")
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} and v {tuple(v.shape)}: expected the same shape")
    B, H, T_q, D = q.shape
    _, K, T_k, _ = k.shape
    if k.size(0) != B:
        raise ValueError(f"q has batch size {B} and k {k.size(0)}: expected the same")
    if k.size(3) != D:
        raise ValueError(f"q has head dimension {D} and k {k.size(3)}: expected the same")
    if K < 1 or H % K:
        raise ValueError(f"H={H} query heads cannot share K={K} key/value heads evenly: H % K must be 0")
    _check_blocks(block_q, block_k, causal, window)
    _check_lengths(T_q, T_k, causal)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = H // K
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # float32 for bf16/fp16/fp32

    out = torch.empty(B, K, G, T_q, D, dtype=q.dtype, device=q.device)
    qg = q.reshape(B, K, G, T_q, D)  # (B, K, G, T, D): query head h = group h // G, member h % G
    k_pos = torch.arange(T_k, device=q.device)
    q_pos = k_pos[T_k - T_q:]  # (T,): the queries are the last T_q positions
    for q0 in range(0, T_q, block_q):
        q1 = min(q0 + block_q, T_q)
        q_tile = qg[:, :, :, q0:q1].to(acc_dtype) * scale  # (B, K, G, Tq, D)
        m = torch.full((B, K, G, q1 - q0, 1), float("-inf"), dtype=acc_dtype, device=q.device)  # running row max
        l = torch.zeros(B, K, G, q1 - q0, 1, dtype=acc_dtype, device=q.device)  # running sum of exp(score - m)
        acc = torch.zeros(B, K, G, q1 - q0, D, dtype=acc_dtype, device=q.device)  # running sum of exp(score - m) * v
        for kt in _key_tiles(q0, q1, T_q, T_k, block_k, causal, window):  # the rest are all masked
            k0, k1 = kt * block_k, min((kt + 1) * block_k, T_k)
            k_tile = k[:, :, None, k0:k1].to(acc_dtype)  # (B, K, 1, Sk, D): shared by the G heads of a group
            v_tile = v[:, :, None, k0:k1].to(acc_dtype)
            scores = q_tile @ k_tile.transpose(-2, -1)  # (B, K, G, Tq, Sk)
            if causal:
                allowed = attention_mask(q_pos[q0:q1], k_pos[k0:k1], window)  # (Tq, Sk)
                scores = scores.masked_fill(~allowed, float("-inf"))
            m_new = torch.maximum(m, scores.amax(-1, keepdim=True))  # (B, K, G, Tq, 1)
            # A row with no allowed key yet has m_new = -inf; subtract 0 there, so that
            # exp(-inf - 0) = 0 instead of exp(-inf + inf) = nan.
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp(scores - m_safe)  # (B, K, G, Tq, Sk): 0 where masked
            alpha = torch.exp(m - m_safe)  # rescales what was summed against the old max
            l = alpha * l + p.sum(-1, keepdim=True)
            acc = alpha * acc + p @ v_tile  # (B, K, G, Tq, D)
            m = m_new
        # Every row sees a key when the inputs pass the checks above; a row that saw none
        # would have l = 0 and acc = 0, so divide it by 1 (NaN in the inputs still shows).
        out[:, :, :, q0:q1] = acc / torch.where(l == 0, 1.0, l)
    return out.view(B, H, T_q, D)
