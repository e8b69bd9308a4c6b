"""FlashAttention as Triton kernels: the tiles of :mod:`companion.flash`, one program per tile row.

:mod:`companion.flash` walks the tiles in Python loops. Here the same algorithm is written
in Triton (Tillet et al., 2019), a language for GPU kernels embedded in Python: a kernel
describes what *one program* does with blocks of numbers (``tl.load`` a tile, ``tl.dot``
two tiles, ``tl.store`` the result), and a launch runs one program per cell of a grid, in
parallel. The outer loop of the plain version becomes the grid; the inner loop stays a
loop inside each program.

* Forward: one program per (query tile, batch x query head). It loads its ``block_q``
  queries once, walks the key tiles they need with the online softmax (running maximum
  ``m``, running sum ``l``, rescaled accumulator), and writes ``out`` and the log-sum-exp.
* Backward (FlashAttention-2, Algorithm 2, with recomputation): one kernel has a program
  per (key tile, batch x key/value head) that sums ``dk`` and ``dv`` over the query tiles
  and the ``G`` query heads that read it; a second has a program per (query tile, batch x
  query head) that sums ``dq`` over the key tiles. Two kernels instead of one with atomic
  adds: every gradient is written once, by one program, so the result does not depend on
  the order in which programs finish.

Tiles in which every entry is masked are skipped, exactly those that
:func:`companion.flash.tile_counts` counts as skipped.

On a GPU the kernels are compiled. Without one, they run in Triton's *interpreter*
(``TRITON_INTERPRET=1``, see :func:`interpreted`), which executes each program in turn with
NumPy: slow, but the same kernel code, so the tests check it on any machine. Triton is an
optional dependency (Linux wheels; it comes with PyTorch's CUDA builds); :func:`available`
says whether it is installed.

Letters as in :mod:`companion.flash`: B batch, H query heads, K key/value heads,
G = H // K, T query positions, S key positions, D head dimension.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from companion.flash import _check_inputs

try:  # optional: without it the kernels stay plain functions, and calling them says what to install
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["available", "flash_attention_triton", "flash_attention_triton_backward",
           "flash_attention_triton_forward", "interpreted"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _jit(fn: Any) -> Any:
    return fn if triton is None else triton.jit(fn)


def available() -> bool:
    """Whether Triton is installed, so that the functions of this module can run."""
    return triton is not None


@_jit
def _forward_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    so_b, so_h, so_t, so_d, sl_b, sl_h, sl_t,
    H, G, T_q, T_k, D, scale, window,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)  # which query tile
    # int64: b * stride_b overflows 32 bits once B * H * T * D reaches 2**31
    pid_bh = tl.program_id(1).to(tl.int64)  # which (batch, query head)
    b = pid_bh // H
    h = pid_bh % H
    kv = h // G  # the key/value head this query head reads: no copy per query head
    offset = T_k - T_q  # query i sits at position i + offset

    q0 = pid_q * BLOCK_Q
    rows = q0 + tl.arange(0, BLOCK_Q)  # (Tq,) query indices
    cols = tl.arange(0, BLOCK_D)  # (D,), padded to a power of two
    row_ok = rows < T_q
    col_ok = cols < D
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + cols[None, :] * sq_d,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (Tq, D)

    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running row max
    l = tl.zeros([BLOCK_Q], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)  # running sum of exp(score - m) * v

    # The key tiles these queries need (the rest are all masked), as in companion.flash._key_tiles.
    lo = 0
    hi = T_k
    if CAUSAL:
        hi = tl.minimum(q0 + BLOCK_Q - 1 + offset + 1, T_k)  # past the newest key the last query sees
        if WINDOWED:
            lo = tl.maximum(q0 + offset - window + 1, 0) // BLOCK_K * BLOCK_K  # the oldest, for the first query
    pos = rows + offset  # (Tq,) absolute positions
    for k0 in range(lo, hi, BLOCK_K):
        keys = k0 + tl.arange(0, BLOCK_K)  # (Sk,)
        key_ok = keys < T_k
        k = tl.load(K + b * sk_b + kv * sk_h + keys[:, None] * sk_t + cols[None, :] * sk_d,
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (Sk, D)
        v = tl.load(V + b * sv_b + kv * sv_h + keys[:, None] * sv_t + cols[None, :] * sv_d,
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (Sk, D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (Tq, Sk), float32
        allowed = key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= pos[:, None])
            if WINDOWED:
                allowed = allowed & (keys[None, :] > pos[:, None] - window)
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))  # (Tq,)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp(-inf) = 0, not nan
        p = tl.exp(scores - m_safe[:, None])  # (Tq, Sk), 0 where masked
        alpha = tl.exp(m - m_safe)  # rescales what was summed against the old max
        l = alpha * l + tl.sum(p, 1)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    l = tl.where(l == 0.0, 1.0, l)  # only padding rows past T_q see no key; they are not stored
    out = acc / l[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None] * so_t + cols[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    tl.store(LSE + b * sl_b + h * sl_h + rows * sl_t, m + tl.log(l), mask=row_ok)


@_jit
def _backward_dk_dv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sdo_b, sdo_h, sdo_t, sdo_d, sl_b, sl_h, sl_t, sdk_b, sdk_h, sdk_t, sdk_d,
    KH, G, T_q, T_k, D, scale, window,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0)  # which key tile
    pid_bk = tl.program_id(1).to(tl.int64)  # which (batch, key/value head); int64 as above
    b = pid_bk // KH
    kv = pid_bk % KH
    offset = T_k - T_q

    k0 = pid_k * BLOCK_K
    keys = k0 + tl.arange(0, BLOCK_K)  # (Sk,)
    cols = tl.arange(0, BLOCK_D)
    key_ok = keys < T_k
    col_ok = cols < D
    k = tl.load(K + b * sk_b + kv * sk_h + keys[:, None] * sk_t + cols[None, :] * sk_d,
                mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (Sk, D)
    v = tl.load(V + b * sv_b + kv * sv_h + keys[:, None] * sv_t + cols[None, :] * sv_d,
                mask=key_ok[:, None] & col_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)  # stays 0 if no query sees these keys
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)

    # The query tiles that see at least one of these keys: positions p >= k0 (causal), and
    # p - window < the tile's last key (window).
    lo = 0
    hi = T_q
    if CAUSAL:
        lo = tl.maximum(k0 - offset, 0) // BLOCK_Q * BLOCK_Q
        if WINDOWED:
            hi = tl.minimum(k0 + BLOCK_K - 1 + window - offset, T_q)
    for g in range(0, G):  # the query heads that read this key/value head
        h = kv * G + g
        for q0 in range(lo, hi, BLOCK_Q):
            rows = q0 + tl.arange(0, BLOCK_Q)  # (Tq,)
            row_ok = rows < T_q
            q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + cols[None, :] * sq_d,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (Tq, D)
            do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_t + cols[None, :] * sdo_d,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (Tq, D)
            lse = tl.load(LSE + b * sl_b + h * sl_h + rows * sl_t, mask=row_ok, other=0.0)  # (Tq,)
            delta = tl.load(DELTA + b * sl_b + h * sl_h + rows * sl_t, mask=row_ok, other=0.0)
            # Recompute the forward's probabilities from the saved log-sum-exp.
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (Tq, Sk)
            allowed = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                pos = rows + offset
                allowed = allowed & (keys[None, :] <= pos[:, None])
                if WINDOWED:
                    allowed = allowed & (keys[None, :] > pos[:, None] - window)
            p = tl.where(allowed, tl.exp(scores - lse[:, None]), 0.0)  # (Tq, Sk)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)  # P^T dout
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (Tq, Sk)
            ds = p * (dp - delta[:, None])  # through the softmax
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
    tl.store(DK + b * sdk_b + kv * sdk_h + keys[:, None] * sdk_t + cols[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & col_ok[None, :])
    tl.store(DV + b * sdk_b + kv * sdk_h + keys[:, None] * sdk_t + cols[None, :] * sdk_d,
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & col_ok[None, :])


@_jit
def _backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sdo_b, sdo_h, sdo_t, sdo_d, sl_b, sl_h, sl_t, sdq_b, sdq_h, sdq_t, sdq_d,
    H, G, T_q, T_k, D, scale, window,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    kv = h // G
    offset = T_k - T_q

    q0 = pid_q * BLOCK_Q
    rows = q0 + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T_q
    col_ok = cols < D
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + cols[None, :] * sq_d,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_t + cols[None, :] * sdo_d,
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    lse = tl.load(LSE + b * sl_b + h * sl_h + rows * sl_t, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * sl_b + h * sl_h + rows * sl_t, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)

    lo = 0
    hi = T_k
    if CAUSAL:
        hi = tl.minimum(q0 + BLOCK_Q - 1 + offset + 1, T_k)
        if WINDOWED:
            lo = tl.maximum(q0 + offset - window + 1, 0) // BLOCK_K * BLOCK_K
    pos = rows + offset
    for k0 in range(lo, hi, BLOCK_K):
        keys = k0 + tl.arange(0, BLOCK_K)
        key_ok = keys < T_k
        k = tl.load(K + b * sk_b + kv * sk_h + keys[:, None] * sk_t + cols[None, :] * sk_d,
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(V + b * sv_b + kv * sv_h + keys[:, None] * sv_t + cols[None, :] * sv_d,
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        allowed = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= pos[:, None])
            if WINDOWED:
                allowed = allowed & (keys[None, :] > pos[:, None] - window)
        p = tl.where(allowed, tl.exp(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_t + cols[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (on NumPy, any device) rather than compiled.

    Triton decides when it is imported, from the environment variable ``TRITON_INTERPRET``:
    on a machine without a GPU, set ``TRITON_INTERPRET=1`` before anything imports Triton
    (``transformers`` and ``torchao`` do), as the book's chapter and ``tests/conftest.py`` do.
    """
    return type(_forward_kernel).__name__ == "InterpretedFunction"


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, block_q: int, block_k: int) -> None:
    if not available():
        raise ImportError("companion.flash_triton needs Triton: pip install triton (Linux), or use "
                          "companion.flash.flash_attention, the same algorithm in plain PyTorch")
    _check_inputs(q, k, v, causal, window, block_q, block_k)
    if q.dtype not in _DTYPES:
        raise ValueError(f"q has dtype {q.dtype}: the Triton kernels take float32, float16 or bfloat16")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}={block} must be a power of two >= 16: tl.arange needs a power "
                             "of two, and tl.dot tiles of at least 16")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on {q.device}, {k.device}, {v.device}: expected one device")
    if interpreted() and q.dtype == torch.bfloat16:
        raise ValueError("q has dtype torch.bfloat16, which Triton's interpreter does not compute with "
                         "(it stores bfloat16 as raw 16-bit integers; see Triton's debugging guide): "
                         "check the kernels in float32 or float16, run bfloat16 on a GPU")
    if q.device.type == "cpu" and not interpreted():
        raise RuntimeError("the tensors are on the CPU, where Triton kernels run only in Triton's "
                           "interpreter: set TRITON_INTERPRET=1 before anything imports triton "
                           "(transformers and torchao do), or move the tensors to a GPU")


def _options(q: Tensor, causal: bool, window: int | None, block_q: int, block_k: int) -> dict[str, Any]:
    return dict(CAUSAL=causal, WINDOWED=window is not None,
                # float32 inputs multiply in full float32; a GPU would otherwise round them to TF32
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=max(16, 1 << (q.size(3) - 1).bit_length()))


def flash_attention_triton_forward(
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
    """The forward kernel: ``out`` ``(B, H, T_q, D)`` and the log-sum-exp ``(B, H, T_q)``, float32.

    Same contract as :func:`companion.flash.flash_attention_forward`, for float32, float16
    and bfloat16 inputs (bfloat16 compiled only: the interpreter does not compute with it);
    ``block_q`` and ``block_k`` are powers of two, at least 16.

    >>> import torch
    >>> from companion.flash import flash_attention_forward
    >>> q = k = v = torch.zeros(1, 1, 3, 4)  # all scores 0: query i sees i + 1 equal keys
    >>> out, lse = flash_attention_triton_forward(q, k, v, block_q=16, block_k=16)
    >>> lse.exp()
    tensor([[[1., 2., 3.]]])
    """
    _check(q, k, v, causal, window, block_q, block_k)
    B, H, T_q, D = q.shape
    _, KH, T_k, _ = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T_q, dtype=torch.float32, device=q.device)
    grid = (math.ceil(T_q / block_q), B * H)
    _forward_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                  H, H // KH, T_q, T_k, D, scale, window or 0,
                  **_options(q, causal, window, block_q, block_k))
    return out, lse


def flash_attention_triton_backward(
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
    """The backward kernels: ``dq``, ``dk``, ``dv``, as
    :func:`companion.flash.flash_attention_backward` returns them.

    ``delta = rowsum(dout * out)``, one number per query row, is computed first in
    PyTorch; then one kernel sums ``dk`` and ``dv`` per key tile and another ``dq`` per
    query tile, each recomputing ``P = exp(score - lse)`` for the tiles it needs.
    """
    _check(q, k, v, causal, window, block_q, block_k)
    B, H, T_q, D = q.shape
    _, KH, T_k, _ = k.shape
    for name, x in (("dout", dout), ("out", out)):
        if x.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected that of q, {tuple(q.shape)}")
    if lse.shape != (B, H, T_q):
        raise ValueError(f"lse has shape {tuple(lse.shape)}: expected (B, H, T_q) = {(B, H, T_q)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dout = dout.to(q.dtype)
    lse = lse.float().contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, H, T), strides equal to lse's
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # contiguous, so dk's strides are dv's
    options = _options(q, causal, window, block_q, block_k)
    _backward_dk_dv_kernel[(math.ceil(T_k / block_k), B * KH)](
        q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *lse.stride(), *dk.stride(), KH, H // KH, T_q, T_k, D, scale, window or 0, **options)
    _backward_dq_kernel[(math.ceil(T_q / block_q), B * H)](
        q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *lse.stride(), *dq.stride(), H, H // KH, T_q, T_k, D, scale, window or 0, **options)
    return dq, dk, dv


class _FlashAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None,
                block_q: int, block_k: int, scale: float | None) -> Tensor:
        out, lse = flash_attention_triton_forward(q, k, v, causal=causal, window=window,
                                                  block_q=block_q, block_k=block_k, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(causal=causal, window=window, block_q=block_q, block_k=block_k, scale=scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        dq, dk, dv = flash_attention_triton_backward(dout, *ctx.saved_tensors, **ctx.options)
        return dq, dk, dv, None, None, None, None, None


def flash_attention_triton(
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
    """:func:`companion.flash.flash_attention` as Triton kernels, forward and backward.

    ``q`` ``(B, H, T_q, D)``, ``k`` and ``v`` ``(B, K, T_k, D)`` with ``H`` a multiple of
    ``K``, in float32, float16 or bfloat16; the masks, the scale and the result are those of
    :func:`companion.flash.flash_attention`. Compiled on a GPU; on a CPU, run by Triton's
    interpreter (for checking, not for speed).

    >>> import torch
    >>> from companion.flash import flash_attention
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    >>> out = flash_attention_triton(q, k, v, window=20, block_q=16, block_k=16)
    >>> torch.allclose(out, flash_attention(q, k, v, window=20, block_q=16, block_k=16), atol=1e-5)
    True
    """
    return _FlashAttentionTriton.apply(q, k, v, causal, window, block_q, block_k, scale)
