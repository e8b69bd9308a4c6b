"""Mistral 7B (Jiang et al., 2023), written top to bottom.

Mistral keeps Llama 2's block (RMSNorm, rotary positions, SwiGLU, no biases) and changes
attention in two ways:

* grouped-query attention: 32 query heads share 8 key/value heads (query head ``h`` reads
  key/value head ``h // 4``), so the KV cache is 4 times smaller;
* sliding-window attention: a token attends only to the last ``sliding_window`` positions
  (itself included). Information still travels further, one window per layer, so after
  ``L`` layers a token can depend on about ``L * sliding_window`` earlier positions.

The window bounds the KV cache too: :class:`~companion.layers.RollingKVCache` keeps
``sliding_window`` slots and stores position ``p`` in slot ``p % sliding_window``.

Module names are those of Hugging Face's ``MistralForCausalLM`` without its ``model.``
prefix. ``model(idx)`` runs a whole sequence; after ``setup_cache``, ``model(idx,
start_pos=p)`` decodes with the cache (the protocol of :func:`companion.generation.sampling.generate`).

Letters used in shape comments: B batch, T time, S key positions, C channels, H query heads,
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
from companion.layers import (KVCache, Linear, RMSNorm, RollingKVCache, SwiGLU, apply_rope, attention,
                              check_cached_call, positions_and_mask, project_qkv, reuse_or_make_cache, rope_cos_sin,
                              sdpa_attention)

__all__ = ["PRESETS", "Attention", "Block", "Mistral", "MistralConfig", "count_parameters", "hf_tensor_shapes"]

# Published size (the config.json of mistralai/Mistral-7B-v0.1) and a tiny one for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "mistral-7b-v0.1": dict(),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 sliding_window=8),
}


@dataclass
class MistralConfig:
    """Sizes of a Mistral model. Defaults are Mistral-7B-v0.1; names follow Hugging Face's.

    ``sliding_window=None`` is full causal attention (later Mistral versions).

    ``attn_implementation`` is how attention is computed, with Hugging Face's names for the two
    ways: ``"sdpa"`` (PyTorch's fused kernel, :func:`~companion.layers.sdpa_attention`) or
    ``"eager"`` (the masked softmax written out, :func:`~companion.layers.attention`).

    >>> c = MistralConfig.preset("mistral-7b-v0.1")
    >>> c.num_attention_heads // c.num_key_value_heads, c.sliding_window
    (4, 4096)
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
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
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be a positive int or None")
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
    def preset(cls, name: str, **overrides: Any) -> "MistralConfig":
        """A named size from :data:`PRESETS`, with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "MistralConfig":
        """Read a Hugging Face ``config.json`` (as a dict) of model_type ``"mistral"``."""
        checkpoint.check_model_type(hf, "mistral")
        checkpoint.check_unsupported(hf, {"hidden_act": "silu"})
        checkpoint.check_head_dim(hf)
        if "layer_types" in hf and len(set(hf["layer_types"])) > 1:
            raise checkpoint.CheckpointError("config.json mixes layer types "
                                             f"{sorted(set(hf['layer_types']))}; Mistral here has one kind")
        skip = ("rope_theta", "attn_implementation")  # read below; ours to choose
        ours = {f.name: hf[f.name] for f in fields(cls) if f.name in hf and f.name not in skip}
        ours["sliding_window"] = hf.get("sliding_window")  # null in config.json: full attention
        ours["rope_theta"] = checkpoint.rope_theta_of(hf)
        return cls(**ours)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.MistralConfig``: the same model, Hugging Face's way.

        >>> import transformers
        >>> hf = transformers.MistralConfig(**MistralConfig.preset("tiny").to_hf())
        >>> hf.hidden_size
        64
        """
        return {k: v for k, v in asdict(self).items() if k != "attn_implementation"}


def hf_tensor_shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Mistral checkpoint, by name, with its shape.

    The key and value projections are ``num_key_value_heads * head_dim`` wide, a quarter of
    the query projection in Mistral 7B.

    >>> shapes = hf_tensor_shapes(MistralConfig.preset("mistral-7b-v0.1"))
    >>> shapes["model.layers.0.self_attn.q_proj.weight"], shapes["model.layers.0.self_attn.k_proj.weight"]
    ((4096, 4096), (1024, 4096))
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


def count_parameters(config: MistralConfig) -> int:
    """Number of parameters, from the config alone.

    >>> f"{count_parameters(MistralConfig.preset('mistral-7b-v0.1')):,}"
    '7,241,732,096'
    """
    return sum(math.prod(shape) for shape in hf_tensor_shapes(config).values())


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary positions and a sliding window."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        C, D = config.hidden_size, config.head_dim
        self.q_proj = Linear(C, self.n_heads * D, bias=False)
        self.k_proj = Linear(C, self.n_kv_heads * D, bias=False)  # K < H: fewer key heads
        self.v_proj = Linear(C, self.n_kv_heads * D, bias=False)
        self.o_proj = Linear(self.n_heads * D, C, bias=False)
        self.attn_implementation = config.attn_implementation
        self.cache: KVCache | RollingKVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = project_qkv(self, x)  # (B, T, H * D), (B, T, K * D), (B, T, K * D)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if positions is not None:  # decoding with the cache: store k, v; read the slots the mask covers
            k, v = self.cache.update(k, v, positions, mask.size(-1))  # (B, K, S, D)
        attend = sdpa_attention if self.attn_implementation == "sdpa" else attention
        y = attend(q, k, v, mask)  # (B, H, T, D); query head h reads key/value head h // (H // K)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm residual block, as in Llama: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Mistral(nn.Module):
    """A Mistral language model: ids ``(B, T)`` -> logits ``(B, T, V)``.

    >>> model = Mistral(MistralConfig.preset("tiny"))
    >>> model(torch.zeros(2, 20, dtype=torch.long)).shape  # longer than the window of 8: fine
    torch.Size([2, 20, 256])
    """

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_seq_len = 0  # positions the cache can take; set by setup_cache
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, initializer_range), norms 1, as Hugging Face initialises Mistral."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def setup_cache(self, batch_size: int, max_seq_len: int, rolling: bool = True) -> None:
        """A KV cache for ``batch_size`` sequences of up to ``max_seq_len`` positions, emptied.

        With a sliding window (and ``rolling=True``) each layer gets a
        :class:`~companion.layers.RollingKVCache` of ``min(sliding_window, max_seq_len)``
        slots, however long the sequence; otherwise a :class:`~companion.layers.KVCache` of
        ``max_seq_len`` slots. Buffers of the same shape are reused rather than allocated again.
        """
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        c, weight = self.config, self.norm.weight  # the model's dtype and device (lm_head may be quantized)
        self.max_seq_len = max_seq_len
        kind = RollingKVCache if rolling and c.sliding_window is not None else KVCache
        slots = min(c.sliding_window, max_seq_len) if kind is RollingKVCache else max_seq_len
        shape = (batch_size, c.num_key_value_heads, slots, c.head_dim)
        for block in self.layers:
            block.self_attn.cache = reuse_or_make_cache(block.self_attn.cache, kind, shape, weight)

    def forward(self, idx: Tensor, start_pos: int | Tensor | None = None, last_only: bool = False,
                left_pad: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, V)`` for token ids ``idx`` ``(B, T)``.

        ``start_pos=None`` runs the sequence on its own, at positions ``0 .. T-1``. An int (or
        a 0-d tensor) places the tokens at ``start_pos ..`` and uses the cache made by
        :meth:`setup_cache`. ``last_only=True`` returns logits for the last position only.
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
                                      self.max_seq_len if cache is not None else None)
        if not use_cache and T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of length {T} is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if use_cache and isinstance(cache, RollingKVCache) and T > cache.window:
            return self._prefill_in_chunks(idx, start_pos, last_only, cache.window, left_pad)
        positions = torch.arange(T, device=idx.device) + (start_pos if use_cache else 0)  # (T,): cache slots
        # with an int start_pos, a KVCache leaves out the empty slots from `end` on (a RollingKVCache
        # holds the window and nothing else, and ignores end)
        k_pos = cache.key_positions(positions, end) if use_cache else positions  # (S,): where each key sits
        # Each sequence's own positions (T,) or (B, T), and the mask (T, S) or (B, T, S), the same for every layer
        seq_pos, mask = positions_and_mask(positions, k_pos, left_pad, window=self.config.sliding_window)
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(seq_pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, mask, positions if use_cache else None)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _prefill_in_chunks(self, idx: Tensor, start_pos: int | Tensor, last_only: bool, window: int,
                           left_pad: Tensor | None = None) -> Tensor:
        """Feed ``idx`` ``(B, T)`` through the rolling cache in chunks of ``window`` tokens.

        Each chunk attends over at most ``2 * window`` keys (the slots, then itself), so the
        memory of a prefill grows with ``T`` only through its inputs and outputs, not ``T x T``.
        """
        logits = [self(idx[:, i : i + window], start_pos=start_pos + i, last_only=last_only, left_pad=left_pad)
                  for i in range(0, idx.size(1), window)]
        return logits[-1] if last_only else torch.cat(logits, dim=1)  # (B, 1, V) or (B, T, V)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", attn_implementation: str = "sdpa"
                        ) -> "Mistral":
        """Load a Hugging Face checkpoint directory (``config.json`` and ``*.safetensors``).

        ``attn_implementation`` (``"sdpa"`` or ``"eager"``) is chosen here, as in Hugging Face's
        ``from_pretrained``; a setting of it inside ``config.json`` is ignored.
        """
        config = replace(MistralConfig.from_hf(checkpoint.read_config(path)),
                         attn_implementation=attn_implementation)
        return checkpoint.load_model(cls, config, path, hf_tensor_shapes(config), dtype=dtype, device=device)
