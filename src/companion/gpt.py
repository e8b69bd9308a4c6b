"""A decoder-only GPT, the architecture of GPT-2, written top to bottom.

The model maps token ids ``(B, T)`` to next-token logits ``(B, T, V)``::

    token + position embeddings
    -> n_layer x Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))     (pre-norm)
    -> ln_f -> lm_head (tied to the token embedding)

Module and parameter names are those of Hugging Face's ``GPT2LMHeadModel``
(``transformer.h.0.attn.c_attn.weight``, ...), so a GPT-2 checkpoint maps onto this model
key for key; only GPT-2's ``Conv1D`` weights are stored transposed (:func:`gpt_from_hf`).

``model(idx)`` runs a whole sequence. For generation the model also follows the KV-cache
protocol of Llama, Mistral and Phi (:func:`companion.generation.sampling.generate`,
:func:`companion.generation.static_cache.decode`): after ``model.setup_cache(batch_size, max_seq_len)``,
``model(idx, start_pos=p)`` feeds the tokens at positions ``p, p+1, ...``, keeps their keys
and values in a preallocated :class:`~companion.layers.KVCache` and attends over it. The
positions enter through the learned table ``wpe``, read at each token's own position, so a
token fed at position ``p`` gets the same embedding as in the whole-sequence pass.

Letters used in shape comments: B batch, T time, C channels (``n_embd``), H heads,
D head dimension (``C // H``), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion.layers import KVCache, check_cached_call, positions_and_mask, reuse_or_make_cache

__all__ = [
    "PRESETS",
    "GPT",
    "GPTConfig",
    "Block",
    "CausalSelfAttention",
    "MLP",
    "StateDictError",
    "causal_attention",
    "check_state_dict",
    "config_from_hf",
    "gpt_from_hf",
    "hf_state_dict_to_gpt",
]

# Published GPT-2 sizes (Radford et al., 2019) and small ones for tests and laptops.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(vocab_size=128, n_positions=32, n_layer=2, n_head=4, n_embd=32),
}


@dataclass
class GPTConfig:
    """Sizes of a GPT. Defaults are GPT-2 small; field names follow Hugging Face's ``GPT2Config``.

    ``n_positions`` is the context length (nanoGPT calls it ``block_size``). ``dropout``
    is used for embeddings, attention weights and residual outputs alike (GPT-2 has one
    rate for each: ``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``). ``attn_implementation``
    is ``"sdpa"`` (PyTorch's fused kernel) or ``"explicit"`` (the masked softmax written out).

    >>> GPTConfig.preset("gpt2-medium").n_layer
    24
    >>> GPTConfig.preset("tiny", n_layer=1).n_layer
    1
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.attn_implementation not in ("sdpa", "explicit"):
            raise ValueError(
                f"attn_implementation={self.attn_implementation!r} must be 'sdpa' or 'explicit'"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named size from :data:`PRESETS`, with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def max_position_embeddings(self) -> int:
        """``n_positions`` under the name Llama, Mistral and Phi use for the context length.

        Code written for their configs (:func:`companion.generation.static_cache.decode` sizes its cache with
        it) reads a GPT's too.

        >>> GPTConfig.preset("tiny").max_position_embeddings
        32
        """
        return self.n_positions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- attention -------------------------------------------------------------------------


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, training: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """Causal scaled dot-product attention written out: ``softmax(mask(QK^T / sqrt(D))) V``.

    ``q``, ``k``, ``v`` are ``(B, H, T, D)``; returns ``(B, H, T, D)``. Position ``t`` attends
    to positions ``0..t`` only. This is what ``F.scaled_dot_product_attention(q, k, v,
    is_causal=True)`` computes, without materialising the ``(T, T)`` matrix there.

    A bool ``mask`` (True where allowed, ``(T, S)`` or broadcastable to ``(B, H, T, S)``)
    replaces the causal one, for ``S`` keys that need not be the ``T`` queries' own: the
    slots of a KV cache, or a batch with padding (:func:`companion.layers.positions_and_mask`).

    >>> q = k = v = torch.randn(1, 1, 3, 2)
    >>> out = causal_attention(q, k, v)
    >>> torch.allclose(out[..., 0, :], v[..., 0, :])  # the first position sees only itself
    True
    """
    T, D = q.size(-2), q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, S), S = T without a cache
    if mask is None:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    else:
        future = ~mask  # whatever the mask does not allow
    scores = scores.masked_fill(future, float("-inf"))  # mask *before* the softmax
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v  # (B, H, T, D)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused projection to queries, keys and values."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.dropout = config.dropout
        self.attn_implementation = config.attn_implementation
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.cache: KVCache | None = None  # made by GPT.setup_cache

    def forward(self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """``x`` ``(B, T, C)`` -> ``(B, T, C)``.

        Without ``mask``: causal attention among the ``T`` positions of ``x``. With a bool
        ``mask`` ``(T, S)`` or ``(B, T, S)`` (True where allowed), the queries attend to the
        keys it allows. With ``positions`` ``(T,)`` too, the new keys and values are first
        written into :attr:`cache` there, and the ``S`` keys are the cache's first ``S`` slots
        (every slot, or those up to the call's last token when its ``start_pos`` is an int).
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        p = self.dropout if self.training else 0.0
        if positions is not None:
            if mask is None:
                raise ValueError("positions were given without a mask: the cache's slots need one")
            k, v = self.cache.update(k, v, positions, mask.size(-1))  # (B, H, S, D): the slots the mask covers
        if mask is not None and mask.dim() == 3:  # (B, T, S): one mask per sequence, shared by its heads
            mask = mask[:, None]  # (B, 1, T, S)
        if self.attn_implementation == "sdpa" and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif self.attn_implementation == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = causal_attention(q, k, v, dropout_p=p, training=self.training, mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU (tanh form, as GPT-2), project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C)`` -> ``(B, T, C)``."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block, pre-norm: tokens communicate (attention), then compute (MLP)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, positions)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---- the model -------------------------------------------------------------------------


class GPT(nn.Module):
    """A GPT-2-style language model: ids ``(B, T)`` -> logits ``(B, T, V)``.

    >>> model = GPT(GPTConfig.preset("tiny"))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 128])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation.

        Linear and embedding weights ~ N(0, 0.02), biases 0, LayerNorm 1 and 0. The two
        projections that write into the residual stream (``c_proj``) get std
        ``0.02 / sqrt(2 * n_layer)``: each block adds two outputs to the stream, and the
        smaller scale keeps its variance from growing with depth.
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """A KV cache for ``batch_size`` sequences of up to ``max_seq_len`` positions, emptied.

        Each block's attention gets a :class:`~companion.layers.KVCache` of ``(batch_size,
        n_head, max_seq_len, head_dim)`` keys and values. Buffers of the same shape are reused
        rather than allocated again.
        """
        if max_seq_len > self.config.n_positions:
            raise ValueError(f"max_seq_len={max_seq_len} is longer than the context length "
                             f"n_positions={self.config.n_positions}")
        weight = self.transformer.wte.weight  # the model's dtype and device
        shape = (batch_size, self.config.n_head, max_seq_len, self.config.head_dim)
        for block in self.transformer.h:
            block.attn.cache = reuse_or_make_cache(block.attn.cache, KVCache, shape, weight)

    def forward(self, idx: Tensor, start_pos: int | Tensor | None = None, last_only: bool = False,
                left_pad: Tensor | None = None) -> Tensor:
        """Token ids ``(B, T)`` with ``T <= n_positions`` -> logits ``(B, T, V)``.

        ``start_pos=None`` runs the sequence on its own, at positions ``0 .. T-1``. An int (or
        a 0-d tensor) places the tokens at ``start_pos ..`` and uses the cache made by
        :meth:`setup_cache`. ``last_only=True`` returns logits for the last position only
        ``(B, 1, V)``. ``left_pad`` ``(B,)`` is the number of padding tokens at the start of
        each row of a left-padded batch (:func:`companion.generation.batching.generate_batch`): each row
        reads ``wpe`` from its first real token on, and no query attends to padding
        (:func:`~companion.layers.positions_and_mask`).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        cache = self.transformer.h[0].attn.cache
        use_cache, end = check_cached_call(B, T, start_pos, left_pad, cache,
                                      cache.max_seq_len if cache is not None else None)
        if not use_cache and T > self.config.n_positions:
            raise ValueError(
                f"cannot run a sequence of length {T}: the context length n_positions is "
                f"{self.config.n_positions} (crop the input, e.g. generate(..., context_length="
                f"{self.config.n_positions}))"
            )
        pos = torch.arange(T, device=idx.device) + (start_pos if use_cache else 0)  # (T,)
        if use_cache or left_pad is not None:  # attend over the cache's slots, or around padding
            k_pos = cache.key_positions(pos, end) if use_cache else pos  # (S,): where each key sits
            # Each sequence's own positions (T,) or (B, T), and the mask (T, S) or (B, T, S)
            seq_pos, mask = positions_and_mask(pos, k_pos, left_pad)
        else:  # the whole sequence on its own: plain causal attention
            seq_pos, mask = pos, None
        if left_pad is not None:  # padding sits at negative positions: give it wpe[0], no query reads it
            seq_pos = seq_pos.clamp(min=0)
        x = self.transformer.wte(idx) + self.transformer.wpe(seq_pos)  # (B, T, C) + (T, C) or (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, mask, pos if use_cache else None)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        return self.lm_head(x)  # (B, T, V)

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Number of distinct parameters (the tied matrix counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), the estimate used for MFU.

        ``6 N`` for the matrix multiplies with the ``N`` weights (2 for the forward, 4 for
        the backward), plus ``12 * n_layer * n_embd * T`` for attention's ``QK^T`` and
        ``AV``, with ``N`` excluding position embeddings, which are looked up, not multiplied.
        """
        T = seq_len or self.config.n_positions
        c = self.config
        return 6 * self.num_parameters(exclude_position_embeddings=True) + 12 * c.n_layer * c.n_embd * T


# ---- loading Hugging Face GPT-2 weights -------------------------------------------------

# GPT-2's Conv1D stores weights as (in, out): the transpose of nn.Linear's (out, in).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that older transformers versions saved in GPT-2 state dicts.
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class StateDictError(ValueError):
    """A state dict whose keys or shapes do not match the model; the message lists each problem."""


def check_state_dict(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Tensor]) -> None:
    """Raise :class:`StateDictError` listing missing, unexpected and wrongly shaped keys.

    ``expected`` maps each key to the shape it must have.

    >>> check_state_dict({"w": (2, 3)}, {"w": torch.zeros(2, 3)})  # fine: returns None
    >>> try:
    ...     check_state_dict({"w": (2, 3)}, {"w": torch.zeros(3, 2), "b": torch.zeros(1)})
    ... except StateDictError as err:
    ...     print(err)
    state dict does not fit the model:
      unexpected keys (1): b
      wrongly shaped (1): w has shape (3, 2), expected (2, 3)
    """
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [
        f"{k} has shape {tuple(got[k].shape)}, expected {tuple(expected[k])}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    problems = [
        (f"missing keys ({len(missing)})", missing),
        (f"unexpected keys ({len(unexpected)})", unexpected),
        (f"wrongly shaped ({len(shaped)})", shaped),
    ]
    lines = [f"  {title}: {', '.join(items)}" for title, items in problems if items]
    if lines:
        raise StateDictError("state dict does not fit the model:\n" + "\n".join(lines))


def config_from_hf(hf_config: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a Hugging Face ``GPT2Config``; refuses variants this GPT lacks."""
    act = getattr(hf_config, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={act!r}: this GPT uses the tanh GELU (gelu_new)")
    n_inner = getattr(hf_config, "n_inner", None)
    if n_inner not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"n_inner={n_inner}: this GPT's MLP is 4 * n_embd = {4 * hf_config.n_embd} wide")
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
    if not getattr(hf_config, "scale_attn_weights", True):
        raise ValueError("scale_attn_weights=False is not supported: attention is scaled by 1/sqrt(D)")
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        n_positions=hf_config.n_positions,
        n_embd=hf_config.n_embd,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        dropout=float(getattr(hf_config, "resid_pdrop", 0.0)),
        layer_norm_epsilon=hf_config.layer_norm_epsilon,
        initializer_range=hf_config.initializer_range,
    )


def hf_state_dict_to_gpt(hf_state: Mapping[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Map a GPT-2 state dict (``GPT2LMHeadModel`` or ``GPT2Model`` keys) to this model's keys.

    Conv1D weights are transposed; ``lm_head.weight`` may be absent (it is the token
    embedding) but if present must equal it. Raises :class:`StateDictError` listing every
    missing, unexpected and wrongly shaped key (shapes as GPT-2 stores them).
    """
    state = {k: v for k, v in hf_state.items() if not k.endswith(_HF_BUFFER_SUFFIXES)}
    if "wte.weight" in state and "transformer.wte.weight" not in state:  # GPT2Model: no prefix
        state = {("transformer." + k if k != "lm_head.weight" else k): v for k, v in state.items()}
    head = state.pop("lm_head.weight", None)

    with torch.device("meta"):
        ours = GPT(config).state_dict()
    ours.pop("lm_head.weight")  # tied to transformer.wte.weight
    expected = {
        k: tuple(reversed(v.shape)) if k.endswith(_CONV1D_SUFFIXES) else tuple(v.shape)
        for k, v in ours.items()
    }
    check_state_dict(expected, state)
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise StateDictError("lm_head.weight differs from transformer.wte.weight: this GPT ties them")
    out = {k: v.t().contiguous() if k.endswith(_CONV1D_SUFFIXES) else v for k, v in state.items()}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def gpt_from_hf(hf_model_or_state_dict: Any, config: GPTConfig | None = None) -> GPT:
    """Our :class:`GPT` with the weights of a Hugging Face GPT-2.

    Give either a ``GPT2LMHeadModel`` (its config is read unless ``config`` is given) or
    its ``state_dict()`` together with ``config``. The result is in eval mode and gives the
    same logits as the Hugging Face model.
    """
    if isinstance(hf_model_or_state_dict, Mapping):
        if config is None:
            raise ValueError("a bare state dict needs a config: gpt_from_hf(state_dict, config)")
        state = hf_model_or_state_dict
    else:
        hf = hf_model_or_state_dict
        config = config or config_from_hf(hf.config)
        state = hf.state_dict()
    weights = hf_state_dict_to_gpt(state, config)
    model = GPT(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()
