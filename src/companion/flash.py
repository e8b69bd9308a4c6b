"""FlashAttention's forward and backward passes (Dao et al., 2022; Dao, 2023), in plain PyTorch.

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

The backward pass needs the attention probabilities ``P`` again, but keeping them from the
forward pass would cost the ``(T_q, T_k)`` memory the forward avoided. So the forward keeps
only its output ``O`` and one number per query row, the *log-sum-exp*
``L = m + log(l) = log(sum_j exp(score_j))``, and the backward *recomputes* each tile's
probabilities exactly as ``P = exp(score - L)``: no running maximum is needed the second
time, because ``L`` already is the final normaliser. Recomputing costs one more ``Q K^T``
per tile; it saves the memory of the whole matrix (FlashAttention-2, Algorithm 2).

* :func:`flash_attention`: tiled attention with grouped key/value heads, differentiable.
* :func:`flash_attention_forward`: the forward pass alone, returning ``O`` and ``L``.
* :func:`flash_attention_backward`: the gradients of ``q``, ``k``, ``v`` from ``O``, ``L``
  and the gradient of the output, tile by tile.
* :func:`tile_counts`: how many tiles they compute and how many they skip.

The mask follows :func:`companion.layers.attention_mask`. Letters used in shape comments:
B batch, H query heads, K key/value heads, G query heads per key/value head (``H // K``),
T query positions, S key positions, D head dimension; ``Tq`` and ``Sk`` are the sizes of
one query tile and one key tile.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from companion.layers import attention_mask

__all__ = ["TileCounts", "flash_attention", "flash_attention_backward", "flash_attention_forward", "tile_counts"]


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


def _query_tiles(
    kt: int, T_q: int, T_k: int, block_q: int, block_k: int, causal: bool, window: int | None
) -> list[int]:
    """The query tiles that need key tile ``kt``: exactly those whose :func:`_key_tiles` hold it.

    The backward pass walks the same tiles as the forward pass, key tile by key tile.
    """
    return [q0 // block_q for q0 in range(0, T_q, block_q)
            if kt in _key_tiles(q0, min(q0 + block_q, T_q), T_q, T_k, block_k, causal, window)]


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


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, block_q: int, block_k: int
) -> None:
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


def flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward pass of :func:`flash_attention`, returning the output and the log-sum-exp.

    Same inputs as :func:`flash_attention`. Returns ``out`` ``(B, H, T_q, D)`` in the dtype
    of ``q``, and ``lse`` ``(B, H, T_q)`` in the accumulation dtype (float32, or float64 for
    float64 inputs): ``lse[b, h, i] = log(sum_j exp(score_ij))`` over the keys query ``i``
    may see, with ``score = scale * q . k``. That one number per row is all the backward pass
    needs to rebuild the softmax: ``P_ij = exp(score_ij - lse_i)``.

    >>> q = k = v = torch.zeros(1, 1, 3, 4)  # all scores 0: query i sees i + 1 equal keys
    >>> out, lse = flash_attention_forward(q, k, v)
    >>> lse.exp()  # the softmax denominators
    tensor([[[1., 2., 3.]]])
    """
    _check_inputs(q, k, v, causal, window, block_q, block_k)
    B, H, T_q, D = q.shape
    _, K, T_k, _ = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = H // K
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # float32 for bf16/fp16/fp32

    out = torch.empty(B, K, G, T_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, K, G, T_q, 1, dtype=acc_dtype, device=q.device)
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
        # log(sum_j exp(score_j)) = m + log(sum_j exp(score_j - m)) = m + log(l)
        lse[:, :, :, q0:q1] = m + torch.log(l)  # (B, K, G, Tq, 1)
    return out.view(B, H, T_q, D), lse.view(B, H, T_q)


def flash_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`flash_attention` with respect to ``q``, ``k`` and ``v``.

    ``dout`` is the gradient of the loss with respect to the output, ``(B, H, T_q, D)``;
    ``q``, ``k``, ``v`` and the options are those of the forward call, and ``out`` and
    ``lse`` what :func:`flash_attention_forward` returned for them. Returns ``dq``
    ``(B, H, T_q, D)``, ``dk`` and ``dv`` ``(B, K, T_k, D)``, in the dtypes of ``q``, ``k``
    and ``v``; the gradient of a key/value head is the sum over the ``G`` query heads that
    read it.

    FlashAttention-2's Algorithm 2: key/value tiles form the outer loop, so each tile's
    ``dk`` and ``dv`` are summed in a small buffer and written once, while ``dq`` is added
    to tile by tile (atomic adds on a GPU). For each computed tile, with ``S`` the scaled
    scores, ``P = exp(S - lse)`` and ``delta = rowsum(dout * out)``::

        dv += P^T dout              dP = dout v^T              dS = P * (dP - delta)
        dq += scale * dS k          dk += scale * dS^T q

    Tiles in which every entry is masked are skipped, as in the forward pass, and no
    ``(T_q, T_k)`` tensor is ever built.

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> q, k, v = (torch.randn(1, 2, 50, 8, requires_grad=True) for _ in range(3))
    >>> out, lse = flash_attention_forward(q, k, v, window=20, block_q=16, block_k=16)
    >>> dout = torch.randn_like(out)
    >>> dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, window=20, block_q=16, block_k=16)
    >>> from companion.layers import attention
    >>> mask = attention_mask(torch.arange(50), torch.arange(50), window=20)
    >>> expected = torch.autograd.grad(attention(q, k, v, mask), (q, k, v), dout)  # autograd, via the 50 x 50 P
    >>> all(torch.allclose(mine, theirs, atol=1e-5) for mine, theirs in zip((dq, dk, dv), expected))
    True
    """
    _check_inputs(q, k, v, causal, window, block_q, block_k)
    B, H, T_q, D = q.shape
    _, K, T_k, _ = k.shape
    for name, x in (("dout", dout), ("out", out)):
        if x.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected that of q, {tuple(q.shape)}")
    if lse.shape != (B, H, T_q):
        raise ValueError(f"lse has shape {tuple(lse.shape)}: expected (B, H, T_q) = {(B, H, T_q)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = H // K
    acc_dtype = torch.promote_types(q.dtype, torch.float32)

    qg = q.reshape(B, K, G, T_q, D)  # (B, K, G, T, D), grouped as in the forward pass
    dout = dout.reshape(B, K, G, T_q, D).to(acc_dtype)  # (B, K, G, T, D)
    lse = lse.reshape(B, K, G, T_q, 1).to(acc_dtype)  # (B, K, G, T, 1)
    # The softmax's gradient needs, for each row i, sum_j P_ij dP_ij. Since dP_ij = dout_i . v_j,
    # that sum is dout_i . (sum_j P_ij v_j) = dout_i . out_i: one number per row, computed once
    # here from the saved output instead of from P. (The paper calls it D; here D is the head dim.)
    delta = (dout * out.reshape(B, K, G, T_q, D).to(acc_dtype)).sum(-1, keepdim=True)  # (B, K, G, T, 1)

    dq = torch.zeros(B, K, G, T_q, D, dtype=acc_dtype, device=q.device)  # added to by every key tile
    dk = torch.empty(B, K, T_k, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, K, T_k, D, dtype=v.dtype, device=v.device)
    k_pos = torch.arange(T_k, device=q.device)
    q_pos = k_pos[T_k - T_q:]  # (T,): the queries are the last T_q positions
    for k0 in range(0, T_k, block_k):
        k1 = min(k0 + block_k, T_k)
        k_tile = k[:, :, None, k0:k1].to(acc_dtype)  # (B, K, 1, Sk, D): shared by the G heads of a group
        v_tile = v[:, :, None, k0:k1].to(acc_dtype)
        dk_tile = torch.zeros(B, K, k1 - k0, D, dtype=acc_dtype, device=q.device)  # stays 0 if no query sees it
        dv_tile = torch.zeros(B, K, k1 - k0, D, dtype=acc_dtype, device=q.device)
        for qt in _query_tiles(k0 // block_k, T_q, T_k, block_q, block_k, causal, window):  # the rest are all masked
            q0, q1 = qt * block_q, min((qt + 1) * block_q, T_q)
            q_tile = qg[:, :, :, q0:q1].to(acc_dtype) * scale  # (B, K, G, Tq, D)
            dout_tile = dout[:, :, :, q0:q1]  # (B, K, G, Tq, D)
            # Recompute the forward's probabilities: the same scores, normalised by the saved lse.
            scores = q_tile @ k_tile.transpose(-2, -1)  # (B, K, G, Tq, Sk)
            if causal:
                allowed = attention_mask(q_pos[q0:q1], k_pos[k0:k1], window)  # (Tq, Sk)
                scores = scores.masked_fill(~allowed, float("-inf"))
            p = torch.exp(scores - lse[:, :, :, q0:q1])  # (B, K, G, Tq, Sk): 0 where masked
            # out = P v, so dv = P^T dout, summed over the G query heads that read this value head.
            dv_tile += (p.transpose(-2, -1) @ dout_tile).sum(2)  # (B, K, Sk, D)
            dp = dout_tile @ v_tile.transpose(-2, -1)  # (B, K, G, Tq, Sk)
            # Through the softmax: dS_ij = P_ij * (dP_ij - sum_k P_ik dP_ik) = P_ij * (dP_ij - delta_i).
            ds = p * (dp - delta[:, :, :, q0:q1])  # (B, K, G, Tq, Sk): 0 where masked
            # S = scale * q k^T: dq = scale * dS k, and dk = scale * dS^T q (q_tile carries the scale).
            dq[:, :, :, q0:q1] += scale * (ds @ k_tile)  # (B, K, G, Tq, D)
            dk_tile += (ds.transpose(-2, -1) @ q_tile).sum(2)  # (B, K, Sk, D)
        dk[:, :, k0:k1] = dk_tile
        dv[:, :, k0:k1] = dv_tile
    return dq.view(B, H, T_q, D).to(q.dtype), dk, dv


class _FlashAttention(torch.autograd.Function):
    """Connects the two passes to autograd. Between them it keeps ``q, k, v, out`` and
    ``lse``: memory linear in ``T``, where autograd through the plain formula would keep the
    ``(T_q, T_k)`` probabilities."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None,
                block_q: int, block_k: int, scale: float | None) -> Tensor:
        out, lse = flash_attention_forward(q, k, v, causal=causal, window=window,
                                           block_q=block_q, block_k=block_k, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(causal=causal, window=window, block_q=block_q, block_k=block_k, scale=scale)
        return out

    @staticmethod
    @once_differentiable  # the backward is not itself differentiated (no second derivatives)
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        dq, dk, dv = flash_attention_backward(dout, *ctx.saved_tensors, **ctx.options)
        return dq, dk, dv, None, None, None, None, None  # the five options get no gradient


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
    """Softmax attention computed tile by tile with the online softmax, forward and backward.

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

    The result is differentiable: :func:`flash_attention_forward` computes it and keeps the
    log-sum-exp of each row, and :func:`flash_attention_backward` computes the gradients
    from that, tile by tile, without the ``(T_q, T_k)`` matrix.

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
    return _FlashAttention.apply(q, k, v, causal, window, block_q, block_k, scale)
