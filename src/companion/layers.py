"""Building blocks shared by Llama 2, Mistral and Phi-2 (and, for caching, chapter 7's GPT).

* :class:`Linear`: ``nn.Linear`` with a decoding fast path for ``torch.compile`` on a CPU.
* :class:`RMSNorm`: LayerNorm without the mean and the bias (Zhang and Sennrich, 2019).
* Rotary position embeddings (Su et al., 2021): :func:`rope_cos_sin` makes the angles,
  :func:`apply_rope` rotates queries and keys in the *half-split* layout that Hugging Face
  checkpoints use (feature ``i`` pairs with feature ``i + d/2``), optionally only the first
  ``rotary_dim`` features (partial rotary, Phi-2). :func:`apply_rope_interleaved` is the
  layout of Meta's original code (feature ``2i`` pairs with ``2i + 1``);
  :func:`interleaved_to_half_split` permutes projection weights from one to the other.
* :class:`SwiGLU`: the gated feed-forward network of Llama and Mistral (Shazeer, 2020).
* :func:`attention`: masked softmax attention with grouped key/value heads (Ainslie et al.,
  2023): query head ``h`` reads key/value head ``h // (H // H_kv)``, the "eager" path written
  out. :func:`sdpa_attention`: the same through PyTorch's fused
  ``F.scaled_dot_product_attention``.
* :func:`attention_mask`: which key positions each query position may see, causal and
  optionally inside a sliding window, built from positions so it works with or without a
  cache. :func:`positions_and_mask`: the positions and the mask of a *left-padded* batch,
  where each row counts its own positions from its first real token
  (:mod:`companion.generation.batching`).
* :class:`KVCache`: preallocated keys and values, written at a position index (fixed shapes,
  so ``torch.compile`` and CUDA graphs can capture the decoding step).
  :class:`RollingKVCache`: the same for sliding-window attention, with ``window`` slots and
  position ``p`` stored in slot ``p % window`` (Jiang et al., 2023). Both can drop rows of
  the batch (:meth:`KVCache.keep_rows`) when some sequences are finished.

Letters used in shape comments: B batch, T time (new tokens), S key positions, C channels,
H query heads, K key/value heads (``H_kv``), G query heads per key/value head (``H // K``),
D head dimension, R rotary dimension.
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion import cpu_kernels
from companion.device import cpu_info

__all__ = [
    "KVCache",
    "Linear",
    "RMSNorm",
    "RollingKVCache",
    "SwiGLU",
    "apply_rope",
    "apply_rope_interleaved",
    "attention",
    "attention_mask",
    "blas_splits_one_row",
    "half_split_to_interleaved",
    "interleaved_to_half_split",
    "kv_cache_bytes",
    "kv_head_of",
    "check_cached_call",
    "positions_and_mask",
    "project_qkv",
    "reuse_or_make_cache",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_half",
    "sdpa_attention",
]



# ---- linear layers -------------------------------------------------------------------------


def _compiling() -> bool:
    """True while ``torch.compile`` traces the code (``torch.compiler.is_compiling``, torch >= 2.3)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def blas_splits_one_row() -> bool:
    """Whether PyTorch's own CPU matrix multiply is taken to read a one-row product with every
    core: where it is MKL on an Intel CPU (as ``/proc/cpuinfo`` on Linux, or
    ``platform.processor()`` elsewhere, names the vendor).

    Measured with torch 2.13 on three 2-core machines (``benchmarks/README.md``): on an Intel
    Xeon, one row times a 131 MB float32 matrix read 26 GB/s through MKL (14 on one thread)
    and 19 through Inductor's multiply-and-sum loop; on an AMD EPYC, eager decoding through
    MKL read 8.7 GB/s whether one or two threads were allowed, and the compiled step with the
    loops decoded 1.7 times as fast; on an AMD EPYC Zen 2, the compiled step decoded 22.4
    tokens/s with the loops against 12.3 through MKL.
    """
    vendor = cpu_info("vendor_id") or platform.processor()
    return torch.backends.mkl.is_available() and "GenuineIntel" in vendor


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same ``state_dict``), plus a fast path for decoding.

    Generating one token multiplies every weight matrix by a single row ``x``: a
    matrix-vector product, whose speed is set by how fast the weights stream from memory,
    not by arithmetic. A general matrix-multiply routine built for many rows may run it on
    one core's share of the bandwidth. Where it may (:func:`blas_splits_one_row` is False:
    any CPU but an Intel one with MKL), this layer, under ``torch.compile`` on a CPU, writes
    the product as ``(weight * x).sum(-1)``: Inductor then generates one loop per matrix that
    reads each weight once, vectorised and split across the cores, fused with the small
    operations around it. ``Linear.one_row_loop`` holds the choice; set it before compiling
    (or after ``torch._dynamo.reset()``) to compare the two. Everywhere else (eager mode,
    several rows, a GPU) it is exactly ``nn.Linear``.

    >>> layer = Linear(3, 2)
    >>> isinstance(layer, nn.Linear), sorted(layer.state_dict())
    (True, ['bias', 'weight'])
    """

    # Compiled on a CPU with one row: True, the multiply-and-sum loop; False, F.linear.
    one_row_loop: bool = not blas_splits_one_row()

    def forward(self, x: Tensor) -> Tensor:
        if self.one_row_loop and _compiling() and x.device.type == "cpu" and x.numel() == x.size(-1):
            y = (self.weight * x.reshape(1, -1)).sum(-1)  # (out,): one pass over the weights
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)

# ---- RMSNorm -------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension.

    LayerNorm subtracts the mean, divides by the standard deviation, then scales and shifts.
    RMSNorm only divides by the root mean square and scales: one statistic instead of two, no
    bias, and in practice the same quality. The statistic is computed in float32 even for
    half-precision inputs, as Hugging Face's ``LlamaRMSNorm`` does.

    >>> norm = RMSNorm(2)
    >>> norm(torch.tensor([[3.0, 4.0]]))  # rms = sqrt((9 + 16) / 2) = 3.5355
    tensor([[0.8485, 1.1314]], grad_fn=<MulBackward0>)
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


# ---- rotary position embeddings -------------------------------------------------------------


def rope_inv_freq(rotary_dim: int, theta: float = 10000.0) -> Tensor:
    """The ``R/2`` rotation frequencies ``theta ** (-2i / R)``, ``i = 0 .. R/2 - 1``, in float32.

    Pair ``i`` turns by ``position * inv_freq[i]`` radians: the first pair once per token,
    the last about once per ``theta`` tokens.

    >>> rope_inv_freq(4, theta=100.0)
    tensor([1.0000, 0.1000])
    """
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim={rotary_dim} must be a positive even number")
    # The same float32 expression as Hugging Face, so the angles agree to the last bit.
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


def rope_cos_sin(
    positions: Tensor, rotary_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the rotation angles, ``(T, R)`` each, in the half-split layout.

    ``positions`` ``(T,)`` holds integer positions. Angle ``positions[t] * inv_freq[i]``
    appears twice in each row, at ``i`` and at ``i + R/2``, because feature ``i`` is rotated
    together with feature ``i + R/2``. Angles are computed in float32 and then cast to
    ``dtype``. Positions ``(B, T)``, one row per sequence (a left-padded batch, where each
    sequence has its own positions), give ``(B, T, R)``.

    >>> cos, sin = rope_cos_sin(torch.arange(3), rotary_dim=4, theta=100.0)
    >>> sin[1]  # position 1: angles 1.0 and 0.1 radians, each twice
    tensor([0.8415, 0.0998, 0.8415, 0.0998])
    >>> rope_cos_sin(torch.tensor([[0, 1, 2], [-1, 0, 1]]), rotary_dim=4)[0].shape
    torch.Size([2, 3, 4])
    """
    inv_freq = rope_inv_freq(rotary_dim, theta).to(positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (T, R/2) or (B, T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, R) or (B, T, R)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` where ``x1`` and ``x2`` are the two halves of the last dim.

    With ``cos`` and ``sin`` from :func:`rope_cos_sin`, ``x * cos + rotate_half(x) * sin``
    turns every pair ``(x[i], x[i + R/2])`` by its angle.

    >>> rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    tensor([-3., -4.,  1.,  2.])
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys ``x`` ``(B, H, T, D)`` by the angles ``cos``, ``sin`` ``(T, R)``.

    Only the first ``R`` features of each head are rotated (partial rotary when ``R < D``,
    as in Phi-2); the other ``D - R`` carry no position. Half-split layout: feature ``i``
    turns together with feature ``i + R/2``. Angles ``(B, T, R)`` give each sequence of the
    batch its own positions; every head of a sequence turns by the same angles.

    >>> x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])  # (B=1, H=1, T=1, D=4)
    >>> cos, sin = rope_cos_sin(torch.tensor([1]), rotary_dim=2)
    >>> apply_rope(x, cos, sin)  # (x0, x1) turned by 1 radian, x2 and x3 left alone
    tensor([[[[0.5403, 0.8415, 0.0000, 0.0000]]]])
    """
    R = cos.size(-1)
    if R > x.size(-1):
        raise ValueError(f"rotary dimension {R} is larger than the head dimension {x.size(-1)}")
    if cos.dim() == 3:  # (B, T, R): one set of angles per sequence, shared by its heads
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, R)
    if R == x.size(-1):
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :R], x[..., R:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def apply_rope_interleaved(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """RoPE in the layout of Meta's original Llama code: feature ``2i`` pairs with ``2i + 1``.

    Each pair is read as a complex number and multiplied by ``exp(1j * angle)``. ``x`` is
    ``(B, H, T, D)`` and ``positions`` ``(T,)``. This gives the same attention scores as
    :func:`apply_rope` once the query and key projections are permuted with
    :func:`interleaved_to_half_split`.

    >>> x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    >>> apply_rope_interleaved(x, torch.tensor([1]))  # (x0, x1) turned by 1 radian
    tensor([[[[0.5403, 0.8415, 0.0000, 0.0000]]]])
    """
    D = x.size(-1)
    angles = positions.float()[:, None] * rope_inv_freq(D, theta).to(x.device)  # (T, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (T, D/2) complex, |z| = 1
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], D // 2, 2))  # (B, H, T, D/2)
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)  # (B, H, T, D)


def interleaved_to_half_split(weight: Tensor, n_heads: int) -> Tensor:
    """Permute the rows of a query or key projection from Meta's layout to Hugging Face's.

    ``weight`` is ``(n_heads * D, C)``. Within each head, output rows ``0, 2, 4, ...`` (the
    first member of each pair) move to the first half and rows ``1, 3, 5, ...`` to the second:
    this is the permutation Hugging Face's conversion script applies to Meta's checkpoints.

    >>> interleaved_to_half_split(torch.arange(4.0)[:, None], n_heads=1).flatten()
    tensor([0., 2., 1., 3.])
    """
    out, C = weight.shape[0], weight.shape[1:]
    D = out // n_heads
    w = weight.reshape(n_heads, D // 2, 2, *C)  # (H, D/2, 2, C): pair index, member
    return w.transpose(1, 2).reshape(out, *C)  # (H, 2, D/2, C) -> (H * D, C)


def half_split_to_interleaved(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of :func:`interleaved_to_half_split`.

    >>> half_split_to_interleaved(torch.tensor([[0.0], [2.0], [1.0], [3.0]]), n_heads=1).flatten()
    tensor([0., 1., 2., 3.])
    """
    out, C = weight.shape[0], weight.shape[1:]
    D = out // n_heads
    w = weight.reshape(n_heads, 2, D // 2, *C)  # (H, member, pair index, C)
    return w.transpose(1, 2).reshape(out, *C)


# ---- the feed-forward network ------------------------------------------------------------


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: a gated feed-forward network.

    The ``gate`` branch, passed through SiLU (``x * sigmoid(x)``, also called Swish), decides
    feature by feature how much of the ``up`` branch goes through. Three matrices instead of
    two, so the hidden size is about 2/3 of the usual 4x to keep the parameter count.
    Names follow Hugging Face's ``LlamaMLP``.

    >>> SwiGLU(8, 16)(torch.zeros(2, 3, 8)).shape
    torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=bias)
        self.up_proj = Linear(dim, hidden_dim, bias=bias)
        self.down_proj = Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        fused = getattr(self, "gate_up_proj", None)  # companion.fusion.fuse_projections: both in one matrix
        if fused is not None:
            gate, up = fused(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


# ---- attention -------------------------------------------------------------------------------


def project_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)``: the queries, keys and values of ``x``.

    Where :func:`companion.fusion.fuse_projections` has merged the three matrices into one
    ``attn.qkv_proj``, one product gives all three (split at ``attn.qkv_widths``): decoding
    then makes one call per layer instead of three, and reads ``x`` once.
    """
    fused = getattr(attn, "qkv_proj", None)
    if fused is None:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = fused(x).split(attn.qkv_widths, dim=-1)
    return q, k, v


def kv_head_of(query_head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head that query head ``query_head`` reads under grouped-query attention.

    Consecutive query heads share a key/value head: with 8 query heads and 2 key/value heads,
    heads 0-3 read head 0 and heads 4-7 read head 1.

    >>> [kv_head_of(h, 8, 2) for h in range(8)]
    [0, 0, 0, 0, 1, 1, 1, 1]
    """
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    return query_head // (n_heads // n_kv_heads)


def attention_mask(
    q_pos: Tensor, k_pos: Tensor, window: int | None = None
) -> Tensor:
    """Which keys each query may attend to: a bool ``(T, S)``, True where allowed.

    ``q_pos`` ``(T,)`` and ``k_pos`` ``(S,)`` are the positions of the queries and of the keys.
    A query sees keys at its own position and before (causal); with a ``window``, only the
    last ``window`` of them (itself included), as in Mistral. Keys at negative positions are
    empty cache slots (or padding) and are never seen. Positions ``(B, T)`` and ``(B, S)``,
    one row per sequence, give one mask per sequence, ``(B, T, S)``.

    >>> attention_mask(torch.arange(4), torch.arange(4), window=2).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    q, k = q_pos[..., :, None], k_pos[..., None, :]  # (..., T, 1), (..., 1, S)
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed  # (T, S) or (B, T, S)


def positions_and_mask(
    slots: Tensor, key_slots: Tensor, left_pad: Tensor | None = None, window: int | None = None
) -> tuple[Tensor, Tensor]:
    """The positions of the queries, and the attention mask, for a batch that may be left-padded.

    A batch of prompts of different lengths is made rectangular by padding each on the left,
    so that every prompt ends in the same column and every new token goes into the same
    column (the same cache slot) for all of them. ``slots`` ``(T,)`` are the columns of the
    new tokens and ``key_slots`` ``(S,)`` those of the keys (``key_positions`` of a cache;
    negative for an empty slot). ``left_pad`` ``(B,)`` says how many columns of each row are
    padding. A row's own positions start at its first real token::

        position = slot - left_pad[row]

    so a prompt sees the rotary angles (or position embeddings) it would see alone. The mask
    is :func:`attention_mask` of those positions, row by row: padding has negative positions
    and no query ever sees it, and causality and the sliding window, which depend only on
    differences of positions, are those of the prompt alone. A padding query sees no real
    key, and a softmax over nothing is NaN (0/0), which would flow into the padding's values
    and, multiplied by a weight of 0, still into every real query (0 * NaN is NaN); so every
    query may also see its own slot. For a real query that slot is allowed anyway.

    Returns positions ``(B, T)`` and a mask ``(B, T, S)``; without ``left_pad``, the plain
    ``slots`` ``(T,)`` and :func:`attention_mask` ``(T, S)``.

    >>> pos, mask = positions_and_mask(torch.arange(3), torch.arange(3), torch.tensor([0, 2]))
    >>> pos  # the second row is 2 columns of padding, then its first token at position 0
    tensor([[ 0,  1,  2],
            [-2, -1,  0]])
    >>> mask[1].int()  # its real token sees only itself; each padding query only its own slot
    tensor([[1, 0, 0],
            [0, 1, 0],
            [0, 0, 1]], dtype=torch.int32)
    """
    if left_pad is None:
        return slots, attention_mask(slots, key_slots, window)
    positions = slots[None, :] - left_pad[:, None]  # (B, T): each row counts from its first token
    key_positions = key_slots[None, :] - left_pad[:, None]  # (B, S); padding and empty slots < 0
    own_slot = slots[:, None] == key_slots[None, :]  # (T, S): no query is left without a key
    return positions, attention_mask(positions, key_positions, window) | own_slot


def _group_size(n_heads: int, n_kv_heads: int) -> int:
    """``G = H // K``, the number of query heads that share one key/value head."""
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly")
    return n_heads // n_kv_heads


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Masked softmax attention with grouped key/value heads.

    ``q`` is ``(B, H, T, D)``, ``k`` and ``v`` are ``(B, K, S, D)`` with ``H`` a multiple of
    ``K``, and ``mask`` a bool ``(T, S)`` (True where allowed). Query head ``h`` reads
    key/value head ``h // (H // K)``: the ``G = H // K`` query heads of a group are stacked
    as the rows of one ``(G * T, D)`` matrix, and each group is a single matrix product with
    its own key/value head, so the keys and values are never copied ``G`` times.
    ``K == H`` is ordinary multi-head attention, ``K == 1`` multi-query attention.
    The softmax runs in float32, as in Hugging Face's eager attention. A mask ``(B, T, S)``
    gives each sequence its own (a left-padded batch, :func:`positions_and_mask`).

    >>> q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    >>> attention(q, k, k, attention_mask(torch.arange(3), torch.arange(3))).shape
    torch.Size([1, 4, 3, 8])
    """
    B, H, T, D = q.shape
    K, S = k.size(1), k.size(2)
    G = _group_size(H, K)
    # In group j, row g * T + t is query head j * G + g at time t. (reshape copies q when its
    # heads are not adjacent in memory, as after the projection: one copy of the queries.)
    q = q.reshape(B, K, G * T, D)  # (B, K, G*T, D)
    # Both operands have batch dims (B, K): no broadcasting, so matmul expands nothing.
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, K, G*T, S)
    if mask.dim() == 3:  # (B, T, S): one mask per sequence, shared by its heads
        mask = mask[:, None, None]  # (B, 1, 1, T, S)
    scores = scores.view(B, K, G, T, S).masked_fill(~mask, float("-inf"))  # one (T, S) mask for every head
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, K, G, T, S)
    out = torch.matmul(weights.view(B, K, G * T, S), v)  # (B, K, G*T, D)
    return out.view(B, H, T, D)


# F.scaled_dot_product_attention has enable_gqa (grouped key/value heads) from torch 2.5 on.
_SDPA_HAS_GQA = torch.__version__ >= "2.5"


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """:func:`attention` through PyTorch's fused ``F.scaled_dot_product_attention``.

    Same inputs, output and mask convention: ``q`` ``(B, H, T, D)``, ``k`` and ``v``
    ``(B, K, S, D)``, ``mask`` a bool ``(T, S)`` or ``(B, T, S)``, True where allowed (every
    row needs at least one allowed key: a row without one gives NaN in :func:`attention`, and
    zeros here with torch 2.13). PyTorch picks a fused kernel for the
    device and dtype, which need not write the ``(T, S)`` weights to memory. With ``K < H``
    it reads grouped key/value heads itself (``enable_gqa=True``); on torch older than 2.5,
    which lacks that option, this falls back to :func:`attention`, which copies nothing either.
    PyTorch's kernels read every slot of ``k`` and ``v``, the hidden ones too; a decoding step
    on a CPU (one query per head, float32, no gradient) goes instead to
    :func:`companion.cpu_kernels.attend_one`, which reads only the slots the mask allows, where
    the C kernels run (:func:`companion.cpu_kernels.takes_attention`).

    >>> q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    >>> mask = attention_mask(torch.arange(3), torch.arange(3))
    >>> torch.allclose(sdpa_attention(q, k, k, mask), attention(q, k, k, mask), atol=1e-5)
    True
    """
    G = _group_size(q.size(1), k.size(1))
    if cpu_kernels.takes_attention(q, k, v, mask):  # one query per head on a CPU: read only the allowed slots
        return torch.ops.companion.attend_one(q, k, v, mask)  # (B, H, 1, D)
    if not _SDPA_HAS_GQA and G > 1:  # torch < 2.5: no enable_gqa, so the grouped explicit path
        return attention(q, k, v, mask)
    if mask.dim() == 3:  # (B, T, S): one mask per sequence, broadcast over its heads
        mask = mask[:, None]  # (B, 1, T, S)
    # The mask is always passed, never is_causal=True: telling that a mask is the plain causal
    # one means reading its values, a sync on a GPU and a graph break under torch.compile.
    if G == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, D)


# ---- KV caches -----------------------------------------------------------------------------


def check_cached_call(B: int, T: int, start_pos: int | Tensor | None, left_pad: Tensor | None,
                      cache: nn.Module | None, capacity: int | None) -> tuple[bool, int | None]:
    """Validate a model call's cache arguments where they enter; return whether the cache is
    used, and ``end``, where its written slots end when that is known on the host.

    ``left_pad`` needs one entry per row; ``start_pos`` needs a cache (from ``setup_cache``);
    with an int ``start_pos`` the tokens must fit the cache's ``capacity`` positions and its
    batch, and ``end = start_pos + T``: the slots from there on are empty, and
    :meth:`KVCache.key_positions` and :meth:`KVCache.update` leave them out. (A tensor
    ``start_pos`` is not read on the host, so it is not checked, and ``end`` is None.)
    """
    if left_pad is not None and tuple(left_pad.shape) != (B,):
        raise ValueError(f"left_pad must have one entry per row, shape ({B},), got {tuple(left_pad.shape)}")
    if start_pos is None:
        return False, None
    if cache is None:
        raise ValueError("start_pos was given but there is no cache: call setup_cache(batch_size, max_seq_len)")
    if not isinstance(start_pos, int):
        return True, None
    if start_pos + T > capacity or B != cache.k.size(0):
        raise ValueError(f"tokens at positions {start_pos}..{start_pos + T - 1} for batch {B} do not fit "
                         f"the cache of {capacity} positions for batch {cache.k.size(0)}")
    return True, start_pos + T


def reuse_or_make_cache(old: nn.Module | None, kind: type, shape: tuple[int, ...], like: Tensor) -> nn.Module:
    """A cache of class ``kind`` and ``shape``, in ``like``'s dtype and device.

    ``old``, the layer's current cache, is emptied and returned when it already fits: the
    same buffers then serve the next request, so a compiled decoding step that captured
    them is reused. Otherwise a new cache is allocated.
    """
    if (type(old) is kind and old.k.shape == shape and old.k.dtype == like.dtype
            and old.k.device == like.device):
        old.reset()
        return old
    return kind(*shape, dtype=like.dtype, device=like.device)


class KVCache(nn.Module):
    """Keys and values of every position so far, in buffers allocated once.

    ``k`` and ``v`` are ``(B, K, max_seq_len, D)``. :meth:`update` writes the new keys and
    values at their positions with ``index_copy_`` and returns the buffers;
    :meth:`key_positions` gives the position of each slot, from which :func:`attention_mask`
    builds the mask. Slots not yet written hold positions later than any query, so the causal
    mask hides them: shapes never change, which is what ``torch.compile`` and CUDA graphs need.
    A caller that knows on the host where the written slots end (a prompt's pass, with an int
    ``start_pos``) passes ``end`` to both, and gets the first ``end`` slots instead of all.

    >>> cache = KVCache(1, 2, 8, 4)
    >>> cache.key_positions(torch.arange(3)).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> k, v = cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), torch.arange(3))
    >>> k.shape, k[0, 0, :, 0].tolist()
    (torch.Size([1, 2, 8, 4]), [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    >>> cache.key_positions(torch.arange(3, 5), end=5).tolist()
    [0, 1, 2, 3, 4]
    >>> cache.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), torch.arange(3, 5), end=5)[0].shape
    torch.Size([1, 2, 5, 4])
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slot_pos", torch.arange(max_seq_len, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(2)

    def reset(self) -> None:
        """Forget every position, keeping the buffers (a compiled step keeps pointing at them)."""
        self.k.zero_()
        self.v.zero_()

    def key_positions(self, positions: Tensor, end: int | None = None) -> Tensor:
        """Positions ``(S,)`` of the keys :meth:`update` returns, for new tokens at ``positions``.

        ``end``, when the caller knows it on the host (an int ``start_pos``: ``start_pos +
        T``), is one past the last new position: the slots from ``end`` on are still empty, so
        only the first ``end`` are returned, and :meth:`update` with the same ``end`` returns
        only those keys. A prompt's pass then costs what the prompt costs, however long the
        cache was allocated for.
        """
        return self.slot_pos if end is None else self.slot_pos[:end]

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows`` (indices into the batch), in that order.

        Finished sequences stop costing work: the next step runs on a smaller batch. The
        buffers are new (smaller) tensors, so a step compiled for the old shape recompiles.
        """
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)

    def update(self, k: Tensor, v: Tensor, positions: Tensor, end: int | None = None) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` ``(B, K, T, D)`` at ``positions`` ``(T,)``; return the slots ``(B, K, S, D)``.

        All ``max_seq_len`` slots, or the first ``end`` (views of the buffers, nothing copied);
        see :meth:`key_positions`.
        """
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        if end is None or end == self.max_seq_len:
            return self.k, self.v
        return self.k[:, :, :end], self.v[:, :, :end]


class RollingKVCache(nn.Module):
    """A KV cache for sliding-window attention: ``window`` slots, reused in a circle.

    A query at position ``p`` sees only positions ``p - window + 1 .. p``, so older keys are
    never read again. Position ``p`` is stored in slot ``p % window``, overwriting position
    ``p - window``, which has just fallen out of every later query's window. Memory stays at
    ``window`` positions however long the sequence grows.

    A decoding step (one new token at position ``p``) writes its key and value into slot
    ``p % window`` and attends over the ``window`` slots as they are: nothing is concatenated
    or copied, whatever the length of the sequence. A chunk of several new tokens (a prompt)
    cannot do that, because its first queries still need the keys its last ones overwrite:
    :meth:`update` then returns the slots as they were *before* the chunk, followed by the
    chunk's keys, and only then writes the chunk's last ``window`` positions into their
    slots. Feeding a long prompt in chunks of at most ``window`` tokens (as
    :class:`~companion.mistral.Mistral` does) keeps that at ``2 * window`` keys.
    ``slot_pos`` records the position in each slot (-1 while empty); :meth:`key_positions`,
    called before :meth:`update`, gives the positions of the keys it will return.

    >>> cache = RollingKVCache(1, 1, window=3, head_dim=1)
    >>> for p in range(5):
    ...     _ = cache.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([p]))
    >>> cache.slot_pos.tolist()  # positions 3 and 4 overwrote 0 and 1
    [3, 4, 2]
    >>> cache.key_positions(torch.tensor([5])).tolist()  # position 5 goes to slot 2, with 3 and 4
    [3, 4, 5]
    >>> cache.key_positions(torch.tensor([5, 6])).tolist()  # a chunk sees the old slots, then itself
    [3, 4, 2, 5, 6]
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.window = window
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slot_pos", torch.full((window,), -1, device=device), persistent=False)

    def reset(self) -> None:
        """Empty every slot, keeping the buffers."""
        self.k.zero_()
        self.v.zero_()
        self.slot_pos.fill_(-1)

    def key_positions(self, positions: Tensor, end: int | None = None) -> Tensor:
        """Positions of the keys :meth:`update` will return for new ``positions`` ``(T,)``.

        ``(W,)`` for one new token (the slots after it is written), ``(W + T,)`` for a chunk.
        ``end`` (see :meth:`KVCache.key_positions`) changes nothing: the window is all there is.
        """
        if positions.size(0) == 1:  # a decoding step: the slot p % W now holds p
            slots = torch.arange(self.window, device=positions.device)
            return torch.where(slots == positions % self.window, positions, self.slot_pos)
        return torch.cat((self.slot_pos, positions))

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows``, in that order (see :meth:`KVCache.keep_rows`).

        ``slot_pos`` is shared by the whole batch (every row writes the same slot at each
        step), so it stays as it is.
        """
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)

    def update(self, k: Tensor, v: Tensor, positions: Tensor, end: int | None = None) -> tuple[Tensor, Tensor]:
        """Store the new ``k``, ``v`` ``(B, K, T, D)``; return the keys and values to attend over.

        One new token: written into its slot first, then the ``(B, K, W, D)`` buffers are
        returned as they are. A chunk: the earlier slots followed by the chunk,
        ``(B, K, W + T, D)``, after which the chunk's last ``W`` positions are stored. Both in the
        order of :meth:`key_positions`, which ``end`` does not change.
        """
        if k.size(2) == 1:  # overwrites position p - W, which no query from p on can see
            slot = positions % self.window
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            self.slot_pos.index_copy_(0, slot, positions)
            return self.k, self.v
        keys = torch.cat((self.k, k), dim=2)  # (B, K, W + T, D)
        values = torch.cat((self.v, v), dim=2)
        n = min(k.size(2), self.window)  # only the last `window` new positions can be read again
        slots = positions[-n:] % self.window
        self.k.index_copy_(2, slots, k[:, :, -n:])
        self.v.index_copy_(2, slots, v[:, :, -n:])
        self.slot_pos.index_copy_(0, slots, positions[-n:])
        return keys, values


def kv_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch_size: int = 1,
    bytes_per_value: int = 2,
) -> int:
    """Memory of a KV cache: a key and a value vector per layer, KV head and position.

    ``2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * bytes_per_value``.
    Llama-2-7B in 16-bit: 512 KiB per token, 2 GiB for a 4096-token context.

    >>> kv_cache_bytes(32, 32, 128, seq_len=1) // 1024
    512
    >>> kv_cache_bytes(32, 32, 128, seq_len=4096) / 2**30
    2.0
    """
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * bytes_per_value
