"""Attention from scratch: four variants, each built on the last, then cross-attention and positions.

1. :func:`simple_attention`: no weights; the scores are dot products of the inputs themselves.
2. :class:`SelfAttention`: trainable query, key and value projections; scores scaled by
   ``1/sqrt(d_k)``.
3. :class:`CausalAttention`: a token attends only to itself and to earlier tokens; dropout on
   the attention weights.
4. :class:`MultiHeadAttentionLoop`, then :class:`MultiHeadAttention`: several causal heads, first
   as a list of modules, then batched into one set of matrix multiplications with
   ``view``/``transpose``. :meth:`MultiHeadAttention.from_loop` copies the loop's weights into
   the batched version, so the two can be shown equal.

Then :class:`CrossAttention` (queries from one sequence, keys and values from another),
:func:`sinusoidal_positions` (Vaswani et al., 2017) and :func:`to_torch_mha`, which copies a
module's weights into ``torch.nn.MultiheadAttention`` to check it against PyTorch.

Letters used in shape comments: B batch, T time (sequence length), C channels, H heads,
D head dimension (``C = H * D``).

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a bool tensor that is
True where a query may attend to a key. (``torch.nn.MultiheadAttention`` uses the opposite
convention, True where attention is *blocked*; pass it ``~mask``.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CausalAttention",
    "CrossAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionLoop",
    "SelfAttention",
    "attention",
    "causal_mask",
    "check_mask",
    "merge_heads",
    "simple_attention",
    "sinusoidal_positions",
    "split_heads",
    "to_torch_mha",
]


# ---- checks at the door ------------------------------------------------------------------


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout={p!r} must be in [0, 1)")


def _check_heads(d_out: int, num_heads: int) -> None:
    _check_positive_int("num_heads", num_heads)
    if d_out % num_heads != 0:
        raise ValueError(
            f"d_out={d_out} is not divisible by num_heads={num_heads}: "
            f"each head gets d_out // num_heads channels"
        )


def _check_input(
    x: Tensor, d_in: int | None, name: str = "x", ranks: tuple[int, ...] = (3,)
) -> None:
    if x.dim() not in ranks:
        want = " or ".join({2: "(T, C)", 3: "(B, T, C)"}[r] for r in ranks)
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(x.shape)}")
    if d_in is not None and x.size(-1) != d_in:
        raise ValueError(f"{name} has {x.size(-1)} channels in its last dimension, expected {d_in}")


def _check_length(T: int, context_length: int) -> None:
    if T > context_length:
        raise ValueError(
            f"sequence length T={T} is longer than context_length={context_length}"
        )


def check_mask(mask: Tensor, shape: tuple[int, int, int, int]) -> None:
    """Raise a ValueError unless ``mask`` is a bool tensor that broadcasts to ``shape``.

    ``shape`` is ``(B, H, T_q, T_k)``. Masks of shape ``(T_q, T_k)``, ``(B, 1, T_q, T_k)``
    or ``(B, 1, 1, T_k)`` (padding) all broadcast; the broadcast may not grow the mask's
    own dimensions beyond ``shape``.

    >>> check_mask(torch.ones(3, 3, dtype=torch.bool), (2, 4, 3, 3))
    >>> check_mask(torch.ones(3, 4, dtype=torch.bool), (2, 4, 3, 3))
    Traceback (most recent call last):
    ...
    ValueError: mask has shape (3, 4), which does not broadcast to (B, H, T_q, T_k) = (2, 4, 3, 3)
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True where a query may attend), got {got}")
    try:
        fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, shape) == torch.Size(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, which does not broadcast to "
            f"(B, H, T_q, T_k) = {tuple(shape)}"
        )


# ---- the pieces every variant shares -----------------------------------------------------


def causal_mask(T: int, device: torch.device | str | None = None) -> Tensor:
    """The ``(T, T)`` bool mask that lets position ``i`` attend to positions ``0..i``.

    >>> causal_mask(3).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    _check_positive_int("T", T)
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention, ``softmax(q k^T * scale) v``, written out.

    ``q`` is ``(..., T_q, D)``, ``k`` is ``(..., T_k, D)`` and ``v`` is ``(..., T_k, D_v)``.
    ``mask`` (bool, True where a query may attend) broadcasts to ``(..., T_q, T_k)``; blocked
    scores become -inf before the softmax, so their weights are exactly zero. ``scale``
    defaults to ``1/sqrt(D)``. Dropout (when ``training``) zeroes attention weights after the
    softmax and scales the rest by ``1/(1 - dropout_p)``.

    Returns ``(out, weights)``: ``out`` is ``(..., T_q, D_v)``, ``weights`` is
    ``(..., T_q, T_k)`` (after dropout, i.e. the weights ``out`` was computed with).

    >>> q = k = v = torch.eye(2)
    >>> out, w = attention(q, k, v, mask=causal_mask(2))
    >>> w
    tensor([[1.0000, 0.0000],
            [0.3302, 0.6698]])
    """
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (..., T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v, weights  # (..., T_q, D_v), (..., T_q, T_k)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(B, T, C)`` -> ``(B, H, T, D)`` with ``D = C // H``: each head gets D channels.

    >>> split_heads(torch.arange(8.0).view(1, 2, 4), 2)[0, 1]  # head 1: channels 2 and 3
    tensor([[2., 3.],
            [6., 7.]])
    """
    B, T, C = x.shape
    _check_heads(C, num_heads)
    return x.view(B, T, num_heads, C // num_heads).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, H, T, D)`` -> ``(B, T, H * D)``: the heads' outputs side by side; undoes :func:`split_heads`.

    >>> x = torch.randn(2, 5, 6)
    >>> torch.equal(merge_heads(split_heads(x, 3)), x)
    True
    """
    B, H, T, D = x.shape
    return x.transpose(1, 2).contiguous().view(B, T, H * D)  # (B, T, C)


# ---- 1. simplified self-attention: no trainable weights -----------------------------------


def simple_attention(x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Self-attention without weights: scores ``x x^T``, softmax, weighted sum of the inputs.

    ``x`` is ``(T, C)`` or ``(B, T, C)``; the result has the same shape. With
    ``return_weights`` also returns the ``(..., T, T)`` attention weights.

    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> simple_attention(x, return_weights=True)[1]
    tensor([[0.7311, 0.2689],
            [0.2689, 0.7311]])
    """
    _check_input(x, None, ranks=(2, 3))
    scores = x @ x.transpose(-2, -1)  # (..., T, T)
    weights = torch.softmax(scores, dim=-1)
    context = weights @ x  # (..., T, C)
    return (context, weights) if return_weights else context


# ---- 2. self-attention with trainable query, key and value projections --------------------


class SelfAttention(nn.Module):
    """Self-attention with trainable projections: ``softmax(Q K^T / sqrt(d_out)) V``.

    ``Q = x W_q^T``, ``K = x W_k^T``, ``V = x W_v^T`` (``nn.Linear`` stores each ``W`` as
    ``(d_out, d_in)``). Input ``(T, d_in)`` or ``(B, T, d_in)``, output ``(..., T, d_out)``.
    Every token attends to every token, earlier or later.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        _check_positive_int("d_in", d_in)
        _check_positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.q_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.k_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.v_proj = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        _check_input(x, self.d_in, ranks=(2, 3))
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (..., T, d_out) each
        out, weights = attention(q, k, v)  # (..., T, d_out), (..., T, T)
        return (out, weights) if return_weights else out


# ---- 3. causal attention: no peeking at later tokens --------------------------------------


class CausalAttention(nn.Module):
    """Self-attention in which token ``t`` attends only to tokens ``0..t``, with dropout.

    Input ``(B, T, d_in)`` with ``T <= context_length``, output ``(B, T, d_out)``. Dropout
    (probability ``dropout``, training mode only) zeroes attention weights after the softmax.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float = 0.0, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        _check_positive_int("d_in", d_in)
        _check_positive_int("d_out", d_out)
        _check_positive_int("context_length", context_length)
        _check_dropout(dropout)
        self.d_in, self.d_out, self.context_length, self.dropout = d_in, d_out, context_length, dropout
        self.q_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.k_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.v_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        # A buffer moves with .to(device) but is not a parameter; not saved in the state dict.
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        _check_input(x, self.d_in)
        B, T, _ = x.shape
        _check_length(T, self.context_length)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, d_out) each
        out, weights = attention(
            q, k, v, mask=self.mask[:T, :T], dropout_p=self.dropout, training=self.training
        )  # (B, T, d_out), (B, T, T)
        return (out, weights) if return_weights else out


# ---- 4. multi-head attention: a loop of heads, then one batched module --------------------


class MultiHeadAttentionLoop(nn.Module):
    """``num_heads`` causal heads run one after another, concatenated, then projected.

    Each head is a :class:`CausalAttention` with ``d_out // num_heads`` output channels, so
    the concatenation has ``d_out`` channels; ``out_proj`` mixes the heads. Input
    ``(B, T, d_in)``, output ``(B, T, d_out)``. Clear but slow: one small matmul per head.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float = 0.0,
        num_heads: int = 1,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("d_out", d_out)
        _check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads = d_in, d_out, num_heads
        self.context_length, self.dropout = context_length, dropout
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out // num_heads, context_length, dropout, qkv_bias)
            for _ in range(num_heads)
        )
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        heads = [head(x) for head in self.heads]  # H tensors of (B, T, D)
        return self.out_proj(torch.cat(heads, dim=-1))  # (B, T, H * D) -> (B, T, d_out)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with all heads in one batch: ``(B, T, C)`` -> ``(B, H, T, D)``.

    One projection of width ``d_out`` makes the queries of every head at once; ``view`` and
    ``transpose`` put the heads in a batch dimension, one matmul attends in all heads, and
    the heads are put back side by side and mixed by ``out_proj``.

    ``causal`` (default True) masks later tokens; ``forward`` also takes an extra bool
    ``mask`` (True where a query may attend) that broadcasts to ``(B, H, T, T)``.
    ``use_sdpa`` runs ``F.scaled_dot_product_attention`` (fused kernels on a GPU) instead of
    the written-out :func:`attention`; the two agree.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float = 0.0,
        num_heads: int = 1,
        qkv_bias: bool = False,
        causal: bool = True,
        use_sdpa: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("d_in", d_in)
        _check_positive_int("d_out", d_out)
        _check_positive_int("context_length", context_length)
        _check_heads(d_out, num_heads)
        _check_dropout(dropout)
        self.d_in, self.d_out, self.num_heads, self.head_dim = d_in, d_out, num_heads, d_out // num_heads
        self.context_length, self.dropout = context_length, dropout
        self.causal, self.use_sdpa = causal, use_sdpa
        self.q_proj = nn.Linear(d_in, d_out, bias=qkv_bias)  # the queries of all heads at once
        self.k_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.v_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x`` ``(B, T, d_in)`` -> ``(B, T, d_out)``; with ``return_weights`` also ``(B, H, T, T)``.

        Asking for the weights always takes the written-out path: the fused kernels of
        ``F.scaled_dot_product_attention`` never build the ``(T, T)`` weight matrix.
        """
        _check_input(x, self.d_in)
        B, T, _ = x.shape
        _check_length(T, self.context_length)
        H = self.num_heads
        if mask is not None:
            check_mask(mask, (B, H, T, T))
        only_causal = self.causal and mask is None  # SDPA has fused kernels for this case
        if self.causal:
            causal = self.mask[:T, :T]  # (T, T)
            mask = causal if mask is None else mask & causal
        q = split_heads(self.q_proj(x), H)  # (B, H, T, D)
        k = split_heads(self.k_proj(x), H)  # (B, H, T, D)
        v = split_heads(self.v_proj(x), H)  # (B, H, T, D)
        p = self.dropout if self.training else 0.0
        weights = None
        if self.use_sdpa and not return_weights:
            if only_causal:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            out, weights = attention(q, k, v, mask=mask, dropout_p=p, training=self.training)
        out = self.out_proj(merge_heads(out))  # (B, H, T, D) -> (B, T, d_out)
        return (out, weights) if return_weights else out

    @classmethod
    def from_loop(cls, loop: MultiHeadAttentionLoop, use_sdpa: bool = False) -> MultiHeadAttention:
        """The batched module with exactly the weights of ``loop``.

        Head ``h`` of the loop owns rows ``h*D .. (h+1)*D`` of each batched projection:
        stacking the heads' ``(D, d_in)`` weights along the rows gives the ``(d_out, d_in)``
        weight whose output :func:`split_heads` cuts back into the same heads.
        """
        first = loop.heads[0]
        mha = cls(
            loop.d_in, loop.d_out, loop.context_length, loop.dropout, loop.num_heads,
            qkv_bias=first.q_proj.bias is not None, causal=True, use_sdpa=use_sdpa,
        ).to(device=first.q_proj.weight.device, dtype=first.q_proj.weight.dtype)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                target = getattr(mha, name)
                target.weight.copy_(torch.cat([getattr(h, name).weight for h in loop.heads]))
                if target.bias is not None:
                    target.bias.copy_(torch.cat([getattr(h, name).bias for h in loop.heads]))
            mha.out_proj.load_state_dict(loop.out_proj.state_dict())
        return mha.train(loop.training)


# ---- cross-attention: queries from one sequence, keys and values from another -------------


class CrossAttention(nn.Module):
    """Multi-head attention from a sequence ``x`` to another sequence ``context``.

    Queries come from ``x`` ``(B, T_q, d_q)``; keys and values from ``context``
    ``(B, T_k, d_kv)`` (in an encoder-decoder, the encoder's output). Nothing is causal: every
    query may see every context position unless ``mask`` (bool, broadcasting to
    ``(B, H, T_q, T_k)``) says otherwise. Output ``(B, T_q, d_out)``.
    """

    def __init__(
        self,
        d_q: int,
        d_kv: int,
        d_out: int,
        num_heads: int = 1,
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("d_q", d_q), ("d_kv", d_kv), ("d_out", d_out)):
            _check_positive_int(name, value)
        _check_heads(d_out, num_heads)
        _check_dropout(dropout)
        self.d_q, self.d_kv, self.d_out, self.num_heads = d_q, d_kv, d_out, num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_q, d_out, bias=qkv_bias)
        self.k_proj = nn.Linear(d_kv, d_out, bias=qkv_bias)
        self.v_proj = nn.Linear(d_kv, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(
        self, x: Tensor, context: Tensor, mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x`` ``(B, T_q, d_q)``, ``context`` ``(B, T_k, d_kv)`` -> ``(B, T_q, d_out)``."""
        _check_input(x, self.d_q, name="x")
        _check_input(context, self.d_kv, name="context")
        (B, T_q, _), (B_kv, T_k, _) = x.shape, context.shape
        if B_kv != B:
            raise ValueError(f"x has batch size {B} but context has batch size {B_kv}")
        H = self.num_heads
        if mask is not None:
            check_mask(mask, (B, H, T_q, T_k))
        q = split_heads(self.q_proj(x), H)  # (B, H, T_q, D)
        k = split_heads(self.k_proj(context), H)  # (B, H, T_k, D)
        v = split_heads(self.v_proj(context), H)  # (B, H, T_k, D)
        out, weights = attention(q, k, v, mask=mask, dropout_p=self.dropout, training=self.training)
        out = self.out_proj(merge_heads(out))  # (B, H, T_q, D) -> (B, T_q, d_out)
        return (out, weights) if return_weights else out  # weights: (B, H, T_q, T_k)


# ---- positions ----------------------------------------------------------------------------


def sinusoidal_positions(T: int, d_model: int, base: float = 10000.0) -> Tensor:
    """The sinusoidal position encodings of Vaswani et al. (2017), shape ``(T, d_model)``.

    ``PE[pos, 2i] = sin(pos / base^(2i/d_model))`` and ``PE[pos, 2i+1] = cos(same angle)``:
    each pair of channels turns at its own frequency, from one radian per position down to
    one turn every ``2 pi base`` positions.

    >>> sinusoidal_positions(2, 4)
    tensor([[0.0000, 1.0000, 0.0000, 1.0000],
            [0.8415, 0.5403, 0.0100, 0.9999]])
    """
    _check_positive_int("T", T)
    _check_positive_int("d_model", d_model)
    if d_model % 2:
        raise ValueError(f"d_model={d_model} must be even: channels come in (sin, cos) pairs")
    pos = torch.arange(T, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d_model / 2,)
    angle = pos / base ** (two_i / d_model)  # (T, d_model / 2)
    pe = torch.empty(T, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.to(torch.get_default_dtype())


# ---- checking against PyTorch -------------------------------------------------------------


def to_torch_mha(module: MultiHeadAttention | CrossAttention) -> nn.MultiheadAttention:
    """A ``torch.nn.MultiheadAttention`` (``batch_first=True``) with ``module``'s weights.

    PyTorch's module keeps the query, key and value weights packed as one
    ``in_proj_weight`` = ``[W_q; W_k; W_v]`` of shape ``(3 C, C)`` when queries, keys and
    values have the same width, and separately (``q_proj_weight`` ...) when they do not.
    It has one ``bias`` switch for the input and output projections; without ``qkv_bias``
    its input bias is set to zero. Its masks are the opposite of ours: call it with
    ``attn_mask=~mask`` (True = blocked). The causal mask is not built in: pass
    ``attn_mask=~causal_mask(T)``.
    """
    if isinstance(module, MultiHeadAttention):
        d_q = d_kv = module.d_in
    elif isinstance(module, CrossAttention):
        d_q, d_kv = module.d_q, module.d_kv
    else:
        raise ValueError(f"expected MultiHeadAttention or CrossAttention, got {type(module).__name__}")
    if d_q != module.d_out:
        raise ValueError(
            f"nn.MultiheadAttention needs the query width ({d_q}) to equal d_out={module.d_out}"
        )
    ref = nn.MultiheadAttention(
        module.d_out, module.num_heads, dropout=module.dropout, bias=True,
        kdim=d_kv, vdim=d_kv, batch_first=True,
    )
    ref = ref.to(device=module.q_proj.weight.device, dtype=module.q_proj.weight.dtype)
    with torch.no_grad():
        projections = (module.q_proj, module.k_proj, module.v_proj)
        if d_kv == module.d_out:  # PyTorch packs the three projections only in this case
            ref.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))  # (3C, C)
        else:
            ref.q_proj_weight.copy_(module.q_proj.weight)
            ref.k_proj_weight.copy_(module.k_proj.weight)
            ref.v_proj_weight.copy_(module.v_proj.weight)
        biases = [p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in projections]
        ref.in_proj_bias.copy_(torch.cat(biases))  # (3C,)
        ref.out_proj.load_state_dict(module.out_proj.state_dict())
    return ref.train(module.training)
