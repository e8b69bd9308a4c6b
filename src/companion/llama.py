"""Llama 2 (Touvron et al., 2023), written top to bottom.

What changes from GPT-2 (chapter 7)::

    token embedding (no position embedding: positions enter as rotations of q and k)
    -> n_layers x Block:  x = x + attn(rms_norm(x));  x = x + swiglu(rms_norm(x))
    -> rms_norm -> lm_head (not tied to the embedding)

RMSNorm instead of LayerNorm, rotary position embeddings, a SwiGLU feed-forward network and
no biases anywhere. Module names are those of Hugging Face's ``LlamaForCausalLM`` without its
``model.`` prefix, so :func:`hf_tensor_shapes` maps a checkpoint onto this model name by name.

The model runs in two ways: ``model(idx)`` is a plain forward pass over the whole sequence;
after ``model.setup_cache(batch_size, max_seq_len)``, ``model(idx, start_pos=p)`` feeds the
tokens at positions ``p, p+1, ...`` and keeps their keys and values in a preallocated
:class:`~companion.layers.KVCache` (the protocol of :func:`companion.generation.sampling.generate`).

Letters used in shape comments: B batch, T time, C channels (``hidden_size``), H query heads,
K key/value heads, D head dimension, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from companion import checkpoint
from companion.layers import (KVCache, Linear, RMSNorm, SwiGLU, apply_rope, attention, check_cached_call,
                              positions_and_mask, project_qkv, reuse_or_make_cache, rope_cos_sin, sdpa_attention)

__all__ = ["PRESETS", "Attention", "Block", "Llama", "LlamaConfig", "count_parameters", "hf_tensor_shapes"]

# Published sizes (Touvron et al., 2023; the config.json files of meta-llama/Llama-2-*-hf)
# and a tiny one for tests and laptops.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
}


@dataclass
class LlamaConfig:
    """Sizes of a Llama model. Defaults are Llama-2-7B; names follow Hugging Face's ``LlamaConfig``.

    ``num_key_value_heads < num_attention_heads`` gives grouped-query attention (Llama-2-70B
    uses 8 key/value heads for 64 query heads). ``rope_theta`` is the base of the rotary
    frequencies.

    ``attn_implementation`` is how attention is computed, with Hugging Face's names for the two
    ways: ``"sdpa"`` (PyTorch's fused kernel, :func:`~companion.layers.sdpa_attention`) or
    ``"eager"`` (the masked softmax written out, :func:`~companion.layers.attention`).

    >>> LlamaConfig.preset("llama-2-13b").num_hidden_layers
    40
    >>> LlamaConfig.preset("tiny").head_dim
    16
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Not a size of the model: left out of the repr and of to_hf().
    attn_implementation: str = field(default="sdpa", repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of features")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation={self.attn_implementation!r} must be 'sdpa' or 'eager'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named size from :data:`PRESETS`, with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Read a Hugging Face ``config.json`` (as a dict) of model_type ``"llama"``."""
        checkpoint.check_model_type(hf, "llama")
        checkpoint.check_unsupported(hf, {"attention_bias": False, "mlp_bias": False,
                                          "hidden_act": "silu", "pretraining_tp": 1})
        checkpoint.check_head_dim(hf)
        skip = ("rope_theta", "attn_implementation")  # read below; ours to choose
        ours = {f.name: hf[f.name] for f in fields(cls) if f.name in hf and f.name not in skip}
        ours.setdefault("num_key_value_heads", hf["num_attention_heads"])
        ours["rope_theta"] = checkpoint.rope_theta_of(hf)
        return cls(**ours)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.LlamaConfig``: the same model, Hugging Face's way.

        >>> import transformers
        >>> hf = transformers.LlamaConfig(**LlamaConfig.preset("tiny").to_hf())
        >>> hf.hidden_size
        64
        """
        return {k: v for k, v in asdict(self).items() if k != "attn_implementation"}


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Llama checkpoint, by name, with the shape it must have.

    ``nn.Linear`` weights are ``(out_features, in_features)``. A tied model has no
    ``lm_head.weight``: the output layer reuses the embedding.

    >>> shapes = hf_tensor_shapes(LlamaConfig.preset("tiny"))
    >>> shapes["model.layers.0.self_attn.k_proj.weight"], len(shapes)
    ((64, 64), 21)
    """
    C, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (q_out, C),
            p + "self_attn.k_proj.weight": (kv_out, C),
            p + "self_attn.v_proj.weight": (kv_out, C),
            p + "self_attn.o_proj.weight": (C, q_out),
            p + "post_attention_layernorm.weight": (C,),
            p + "mlp.gate_proj.weight": (F, C),
            p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F),
        }
    shapes["model.norm.weight"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def count_parameters(config: LlamaConfig) -> int:
    """Number of parameters, from the config alone (no weights are allocated).

    >>> f"{count_parameters(LlamaConfig.preset('llama-2-7b')):,}"
    '6,738,415,616'
    """
    return sum(math.prod(shape) for shape in hf_tensor_shapes(config).values())


class Attention(nn.Module):
    """Causal self-attention with rotary positions and (optionally) grouped key/value heads."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        C, D = config.hidden_size, config.head_dim
        self.q_proj = Linear(C, self.n_heads * D, bias=False)
        self.k_proj = Linear(C, self.n_kv_heads * D, bias=False)
        self.v_proj = Linear(C, self.n_kv_heads * D, bias=False)
        self.o_proj = Linear(self.n_heads * D, C, bias=False)
        self.attn_implementation = config.attn_implementation
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = project_qkv(self, x)  # (B, T, H * D), (B, T, K * D), (B, T, K * D)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # positions enter here, and only here
        if positions is not None:  # decoding with the cache: store k, v; read the slots the mask covers
            k, v = self.cache.update(k, v, positions, mask.size(-1))  # (B, K, S, D)
        attend = sdpa_attention if self.attn_implementation == "sdpa" else attention
        y = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A Llama language model: ids ``(B, T)`` -> logits ``(B, T, V)``.

    >>> model = Llama(LlamaConfig.preset("tiny"))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 256])
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, initializer_range), norms 1, as Hugging Face initialises Llama."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """A KV cache for ``batch_size`` sequences of up to ``max_seq_len`` positions, emptied.

        Buffers of the same shape are reused rather than allocated again.
        """
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        weight = self.norm.weight  # the model's dtype and device (lm_head may be quantized)
        shape = (batch_size, self.config.num_key_value_heads, max_seq_len, self.config.head_dim)
        for block in self.layers:
            block.self_attn.cache = reuse_or_make_cache(block.self_attn.cache, KVCache, shape, weight)

    def forward(self, idx: Tensor, start_pos: int | Tensor | None = None, last_only: bool = False,
                left_pad: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, V)`` for token ids ``idx`` ``(B, T)``.

        ``start_pos=None`` runs the sequence on its own, at positions ``0 .. T-1``. An int (or
        a 0-d tensor, which ``torch.compile`` can keep symbolic) says the tokens sit at
        positions ``start_pos ..`` and uses the cache made by :meth:`setup_cache`.
        ``last_only=True`` computes logits for the last position only ``(B, 1, V)``.
        ``left_pad`` ``(B,)``, for a batch of prompts padded on the left to one length (as
        :func:`companion.generation.batching.generate_batch` makes it), is the number of padding tokens
        at the start of each row. Each row's positions then count from its first real token,
        and no query attends to padding (:func:`~companion.layers.positions_and_mask`), so
        each row's logits are those of its tokens alone. ``start_pos`` still counts columns
        (cache slots), shared by every row.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        cache = self.layers[0].self_attn.cache
        use_cache, end = check_cached_call(B, T, start_pos, left_pad, cache,
                                      cache.max_seq_len if cache is not None else None)
        if not use_cache and T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of length {T} is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(T, device=idx.device) + (start_pos if use_cache else 0)  # (T,): cache slots
        k_pos = cache.key_positions(positions, end) if use_cache else positions  # (S,): where each key sits
        # Each sequence's own positions (T,) or (B, T), and the mask (T, S) or (B, T, S), the same for every layer
        seq_pos, mask = positions_and_mask(positions, k_pos, left_pad)
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(seq_pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, mask, positions if use_cache else None)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, T, V)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", attn_implementation: str = "sdpa"
                        ) -> "Llama":
        """Load a Hugging Face checkpoint directory (``config.json`` and ``*.safetensors``).

        Reads the files with :mod:`companion.checkpoint` (nothing is unpickled), checks
        every tensor's name and shape against :func:`hf_tensor_shapes`, and copies the
        weights in, converted to ``dtype``, on ``device``. ``attn_implementation`` (``"sdpa"`` or
        ``"eager"``) is chosen here, as in Hugging Face's ``from_pretrained``; a setting of it
        inside ``config.json`` is ignored.
        """
        config = replace(LlamaConfig.from_hf(checkpoint.read_config(path)),
                         attn_implementation=attn_implementation)
        return checkpoint.load_model(cls, config, path, hf_tensor_shapes(config), dtype=dtype, device=device)
