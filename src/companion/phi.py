"""Phi-2 (Microsoft, 2023; the Phi series of Gunasekar et al. and Li et al., 2023), top to bottom.

Phi-2 is closer to GPT-2 than to Llama, with two ideas from GPT-J::

    token embedding (no position embedding)
    -> n_layers x Block:  h = layer_norm(x);  x = x + attn(h) + mlp(h)   (parallel, one norm)
    -> layer_norm -> lm_head (with a bias)

* attention and MLP read the *same* normalised input and their outputs are added together:
  one LayerNorm per block instead of two, and the two branches can run at the same time;
* partial rotary embeddings: only the first ``rotary_dim = head_dim * partial_rotary_factor``
  features of each head (32 of 80 in Phi-2) are rotated; the rest carry no position;
* LayerNorm with biases, biases in every linear layer and in ``lm_head``, and the tanh
  approximation of GELU (Hugging Face's ``gelu_new``) in a two-matrix MLP.

Module names are those of Hugging Face's ``PhiForCausalLM`` without its ``model.`` prefix.
``model(idx)`` runs a whole sequence; after ``setup_cache``, ``model(idx, start_pos=p)``
decodes with a preallocated KV cache (the protocol of :func:`companion.generation.sampling.generate`).

Letters used in shape comments: B batch, T time, C channels, H heads, D head dimension,
R rotary dimension, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion import checkpoint
from companion.layers import (KVCache, Linear, apply_rope, attention, check_cached_call, positions_and_mask,
                              project_qkv, reuse_or_make_cache, rope_cos_sin, sdpa_attention)

__all__ = ["PRESETS", "Attention", "Block", "MLP", "Phi", "PhiConfig", "count_parameters", "hf_tensor_shapes"]

# Published sizes (the config.json files of microsoft/phi-2 and microsoft/phi-1_5) and a tiny one.
PRESETS: dict[str, dict[str, Any]] = {
    "phi-2": dict(),
    "phi-1_5": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, partial_rotary_factor=0.5),
    "tiny": dict(vocab_size=256, hidden_size=80, intermediate_size=320, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128),
}


@dataclass
class PhiConfig:
    """Sizes of a Phi model. Defaults are Phi-2; names follow Hugging Face's ``PhiConfig``.

    ``attn_implementation`` is how attention is computed, with Hugging Face's names for the two
    ways: ``"sdpa"`` (PyTorch's fused kernel, :func:`~companion.layers.sdpa_attention`) or
    ``"eager"`` (the masked softmax written out, :func:`~companion.layers.attention`).

    >>> c = PhiConfig.preset("phi-2")
    >>> c.head_dim, c.rotary_dim
    (80, 32)
    """

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Not a size of the model: left out of the repr and of to_hf().
    attn_implementation: str = field(default="sdpa", repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim = int({self.head_dim} * {self.partial_rotary_factor}) = "
                             f"{self.rotary_dim} must be a positive even number")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation={self.attn_implementation!r} must be 'sdpa' or 'eager'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """How many features of each head RoPE rotates (Hugging Face rounds down the same way)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PhiConfig":
        """A named size from :data:`PRESETS`, with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "PhiConfig":
        """Read a Hugging Face ``config.json`` (as a dict) of model_type ``"phi"``."""
        checkpoint.check_model_type(hf, "phi")
        checkpoint.check_unsupported(hf, {"hidden_act": "gelu_new", "qk_layernorm": False})
        checkpoint.check_head_dim(hf)
        heads = hf["num_attention_heads"]
        if hf.get("num_key_value_heads") not in (None, heads):
            raise checkpoint.CheckpointError(f"config.json has num_key_value_heads={hf['num_key_value_heads']}; "
                                             f"Phi here has one key/value head per query head ({heads})")
        skip = ("rope_theta", "partial_rotary_factor", "attn_implementation")  # read below; ours to choose
        ours = {f.name: hf[f.name] for f in fields(cls) if f.name in hf and f.name not in skip}
        ours["rope_theta"] = checkpoint.rope_theta_of(hf)
        ours["partial_rotary_factor"] = checkpoint.partial_rotary_factor_of(hf, default=0.5)
        return cls(**ours)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.PhiConfig``: the same model, Hugging Face's way.

        >>> import transformers
        >>> hf = transformers.PhiConfig(**PhiConfig.preset("tiny").to_hf())
        >>> hf.hidden_size
        80
        """
        return {k: v for k, v in asdict(self).items() if k != "attn_implementation"}


def hf_tensor_shapes(config: PhiConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Phi checkpoint, by name, with its shape.

    >>> shapes = hf_tensor_shapes(PhiConfig.preset("phi-2"))
    >>> shapes["model.layers.0.mlp.fc1.weight"], shapes["lm_head.bias"]
    ((10240, 2560), (51200,))
    """
    C, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (C,), p + "input_layernorm.bias": (C,),
            p + "self_attn.q_proj.weight": (C, C), p + "self_attn.q_proj.bias": (C,),
            p + "self_attn.k_proj.weight": (C, C), p + "self_attn.k_proj.bias": (C,),
            p + "self_attn.v_proj.weight": (C, C), p + "self_attn.v_proj.bias": (C,),
            p + "self_attn.dense.weight": (C, C), p + "self_attn.dense.bias": (C,),
            p + "mlp.fc1.weight": (F, C), p + "mlp.fc1.bias": (F,),
            p + "mlp.fc2.weight": (C, F), p + "mlp.fc2.bias": (C,),
        }
    shapes |= {"model.final_layernorm.weight": (C,), "model.final_layernorm.bias": (C,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    shapes["lm_head.bias"] = (V,)
    return shapes


def count_parameters(config: PhiConfig) -> int:
    """Number of parameters, from the config alone.

    >>> f"{count_parameters(PhiConfig.preset('phi-2')):,}"
    '2,779,683,840'
    """
    return sum(math.prod(shape) for shape in hf_tensor_shapes(config).values())


class Attention(nn.Module):
    """Multi-head causal self-attention with biases and partial rotary positions."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        C = config.hidden_size
        self.q_proj = Linear(C, C)
        self.k_proj = Linear(C, C)
        self.v_proj = Linear(C, C)
        self.dense = Linear(C, C)
        self.attn_implementation = config.attn_implementation
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = project_qkv(self, x)  # (B, T, C) each
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos, sin are (T, R): first R features only
        if positions is not None:  # decoding with the cache: store k, v; read the slots the mask covers
            k, v = self.cache.update(k, v, positions, mask.size(-1))  # (B, H, S, D)
        attend = sdpa_attention if self.attn_implementation == "sdpa" else attention
        y = attend(q, k, v, mask)  # (B, H, T, D)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``, the GPT-2 feed-forward network with 4x hidden size."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Parallel block: ``x + attn(h) + mlp(h)`` with ``h = layer_norm(x)``, one norm for both."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor | None) -> Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, cos, sin, mask, positions) + self.mlp(h)


class Phi(nn.Module):
    """A Phi language model: ids ``(B, T)`` -> logits ``(B, T, V)``.

    >>> model = Phi(PhiConfig.preset("tiny"))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 256])
    """

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, initializer_range), biases 0, LayerNorms 1 and 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """A KV cache for ``batch_size`` sequences of up to ``max_seq_len`` positions, emptied.

        Buffers of the same shape are reused rather than allocated again.
        """
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        weight = self.final_layernorm.weight  # the model's dtype and device (lm_head may be quantized)
        shape = (batch_size, self.config.num_attention_heads, max_seq_len, self.config.head_dim)
        for block in self.layers:
            block.self_attn.cache = reuse_or_make_cache(block.self_attn.cache, KVCache, shape, weight)

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
                                      cache.max_seq_len if cache is not None else None)
        if not use_cache and T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of length {T} is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(T, device=idx.device) + (start_pos if use_cache else 0)  # (T,): cache slots
        k_pos = cache.key_positions(positions, end) if use_cache else positions  # (S,): where each key sits
        # Each sequence's own positions (T,) or (B, T), and the mask (T, S) or (B, T, S), the same for every layer
        seq_pos, mask = positions_and_mask(positions, k_pos, left_pad)
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(seq_pos, self.config.rotary_dim, self.config.rope_theta, x.dtype)  # (T, R) or (B, T, R)
        for block in self.layers:
            x = block(x, cos, sin, mask, positions if use_cache else None)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_layernorm(x))  # (B, T, V)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", attn_implementation: str = "sdpa"
                        ) -> "Phi":
        """Load a Hugging Face checkpoint directory (``config.json`` and ``*.safetensors``).

        ``attn_implementation`` (``"sdpa"`` or ``"eager"``) is chosen here, as in Hugging Face's
        ``from_pretrained``; a setting of it inside ``config.json`` is ignored.
        """
        config = replace(PhiConfig.from_hf(checkpoint.read_config(path)),
                         attn_implementation=attn_implementation)
        return checkpoint.load_model(cls, config, path, hf_tensor_shapes(config), dtype=dtype, device=device)
