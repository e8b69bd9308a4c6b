"""A character-level transformer language model on our own tensor engine (chapter 5).

Everything here runs on :class:`~companion.autodiff.Tensor`. A character tokenizer
(:class:`companion.char_tokenizer.CharTokenizer`) turns text into integers; token and
position embeddings turn integers into vectors, blocks of
causal multi-head attention and a feed-forward network (each behind a LayerNorm and
inside a residual connection) mix them, and a linear head turns each position's vector
into logits over the next character. :func:`train` fits it with AdamW; :func:`generate`
samples from it.

:class:`TorchTinyLM` is the same architecture written with ``torch.nn``, with the same
parameter names. :func:`to_torch` copies our weights into it, so both can be fed the
same batches and compared step by step.

Shapes: ``B`` batch, ``T`` time (context), ``C`` channels (``n_embd``), ``H`` heads,
``D`` head size (``C / H``), ``V`` vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as tF

from companion.autodiff import functional as F
from companion.autodiff.grad_mode import no_grad
from companion.autodiff.nn import Dropout, Embedding, LayerNorm, Linear, Module
from companion.autodiff.optim import Optimizer
from companion.autodiff.tensor import Tensor

__all__ = [
    "Block",
    "TorchBlock",
    "TorchCausalSelfAttention",
    "TorchFeedForward",
    "CausalSelfAttention",
    "FeedForward",
    "TinyLM",
    "TinyLMConfig",
    "TorchTinyLM",
    "estimate_loss",
    "generate",
    "get_batch",
    "named_modules",
    "split_data",
    "to_torch",
    "train",
    "unigram_loss",
]


# -- data ----------------------------------------------------------------------------------


def split_data(ids: np.ndarray, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The first ``train_fraction`` of the tokens for training, the rest for validation."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction!r} must be in (0, 1)")
    n = int(train_fraction * len(ids))
    return ids[:n], ids[n:]


def get_batch(data: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows of ``block_size`` tokens and the same windows shifted by one.

    Returns ``x, y`` of shape ``(B, T)``: ``y[b, t]`` is the token that follows ``x[b, t]``.
    """
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}")
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    window = starts[:, None] + np.arange(block_size)                # (B, T)
    return data[window], data[window + 1]


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per token) on ``val`` of a model that ignores the context.

    It predicts every token with its frequency in ``train`` (add-one smoothed so that a
    character unseen in training costs a finite amount). Any model that reads its
    context must do better than this.
    """
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val].mean())


# -- the model -----------------------------------------------------------------------------


@dataclass
class TinyLMConfig:
    """Sizes of the model. ``block_size`` is the longest context it reads."""

    vocab_size: int = 65
    block_size: int = 64
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 2
    dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'float64'")


class CausalSelfAttention(Module):
    """Multi-head attention in which position ``t`` sees only positions ``<= t``."""

    def __init__(self, cfg: TinyLMConfig, rng: np.random.Generator) -> None:
        c, dt = cfg.n_embd, cfg.dtype
        self.query = Linear(c, c, dtype=dt, rng=rng)
        self.key = Linear(c, c, dtype=dt, rng=rng)
        self.value = Linear(c, c, dtype=dt, rng=rng)
        self.proj = Linear(c, c, dtype=dt, rng=rng)
        self.attn_drop = Dropout(cfg.dropout, rng)
        self.resid_drop = Dropout(cfg.dropout, rng)
        self.n_head = cfg.n_head
        # True above the diagonal: the future, which a position may not attend to.
        self.future = np.triu(np.ones((cfg.block_size, cfg.block_size), dtype=bool), k=1)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q = self.query(x).reshape(B, T, H, D).transpose(1, 2)       # (B, H, T, D)
        k = self.key(x).reshape(B, T, H, D).transpose(1, 2)         # (B, H, T, D)
        v = self.value(x).reshape(B, T, H, D).transpose(1, 2)       # (B, H, T, D)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))   # (B, H, T, T)
        weights = F.softmax(scores.masked_fill(self.future[:T, :T], -np.inf), axis=-1)
        y = self.attn_drop(weights) @ v                              # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)                       # (B, T, C)
        return self.resid_drop(self.proj(y))


class FeedForward(Module):
    """Linear to ``4 C``, GELU, linear back to ``C``: computation on each position alone."""

    def __init__(self, cfg: TinyLMConfig, rng: np.random.Generator) -> None:
        c, dt = cfg.n_embd, cfg.dtype
        self.fc = Linear(c, 4 * c, dtype=dt, rng=rng)
        self.proj = Linear(4 * c, c, dtype=dt, rng=rng)
        self.drop = Dropout(cfg.dropout, rng)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + ffwd(ln2(x))``."""

    def __init__(self, cfg: TinyLMConfig, rng: np.random.Generator) -> None:
        self.ln1 = LayerNorm(cfg.n_embd, dtype=cfg.dtype)
        self.attn = CausalSelfAttention(cfg, rng)
        self.ln2 = LayerNorm(cfg.n_embd, dtype=cfg.dtype)
        self.ffwd = FeedForward(cfg, rng)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class TinyLM(Module):
    """Token + position embeddings, ``n_layer`` blocks, a final LayerNorm and the head.

    ``model(idx)`` with ``idx`` integer ``(B, T)`` returns ``(logits, None)``, logits
    ``(B, T, V)``; ``model(idx, targets)`` returns ``(logits, loss)``.

    Weights start as in GPT-2: normal with standard deviation 0.02, biases zero, and the
    projections that write into the residual stream scaled down by ``sqrt(2 n_layer)``.
    """

    def __init__(self, cfg: TinyLMConfig, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.config = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, rng=rng)
        self.pos_emb = Embedding(cfg.block_size, cfg.n_embd, dtype=cfg.dtype, rng=rng)
        self.drop = Dropout(cfg.dropout, rng)
        self.blocks = [Block(cfg, rng) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.n_embd, dtype=cfg.dtype)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, dtype=cfg.dtype, rng=rng)
        for name, m in named_modules(self):
            if isinstance(m, (Linear, Embedding)):
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(".proj") else 0.02
                m.weight.data[...] = rng.normal(0.0, std, m.weight.shape)
            if isinstance(m, Linear) and m.bias is not None:
                m.bias.data[...] = 0.0

    def forward(self, idx: np.ndarray, targets: np.ndarray | None = None
                ) -> tuple[Tensor, Tensor | None]:
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (B, T), got {idx.shape}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        x = self.tok_emb(idx) + self.pos_emb.weight[:T]              # (B, T, C) + (T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))                             # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss


def named_modules(module: Module, prefix: str = "") -> Iterator[tuple[str, Module]]:
    """Every sub-module of ``module`` (itself included, with name ``""``), dotted names."""
    yield prefix.rstrip("."), module
    for name, child in module.children():
        yield from named_modules(child, f"{prefix}{name}.")


# -- training and sampling -----------------------------------------------------------------


def estimate_loss(model: TinyLM, data: np.ndarray, batch_size: int = 32, n_batches: int = 20,
                  seed: int = 1234) -> float:
    """Mean loss over ``n_batches`` fixed random batches of ``data`` (eval mode, no graph)."""
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    losses = []
    with no_grad():
        for _ in range(n_batches):
            x, y = get_batch(data, batch_size, model.config.block_size, rng)
            losses.append(model(x, y)[1].item())
    model.train(was_training)
    return float(np.mean(losses))


def train(model: TinyLM, optimizer: Optimizer, train_data: np.ndarray, val_data: np.ndarray,
          steps: int, batch_size: int = 32, eval_every: int = 100, eval_batches: int = 20,
          seed: int = 0, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> dict[str, list]:
    """Train for ``steps`` steps; return the loss history.

    Returns ``{"step": [...], "train": [...], "eval_step": [...], "val": [...]}``:
    the training loss of every step, and the validation loss every ``eval_every``
    steps and after the last one. A tqdm progress bar goes to stderr.
    """
    from tqdm import tqdm  # plain text on stderr, also in notebooks (not a widget)

    rng = np.random.default_rng(seed)
    history: dict[str, list] = {"step": [], "train": [], "eval_step": [], "val": []}
    model.train()
    bar = tqdm(range(1, steps + 1), disable=not progress, desc="training", mininterval=5.0)
    for step in bar:
        x, y = get_batch(train_data, batch_size, model.config.block_size, rng)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history["step"].append(step)
        history["train"].append(loss.item())
        if on_step is not None:
            on_step(step, loss.item())
        if step % eval_every == 0 or step == steps:
            history["eval_step"].append(step)
            history["val"].append(estimate_loss(model, val_data, batch_size, eval_batches))
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{history['val'][-1]:.3f}")
    return history


def generate(model: TinyLM, idx: np.ndarray, max_new_tokens: int, temperature: float = 1.0,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """Append ``max_new_tokens`` sampled tokens to each row of ``idx`` ``(B, T0)``.

    The model reads at most its last ``block_size`` tokens. ``temperature=0`` picks the
    most likely token (greedy); otherwise each token is drawn from
    ``softmax(logits / temperature)``.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    rng = rng if rng is not None else np.random.default_rng(0)
    idx = np.array(idx, dtype=np.int64)
    was_training = model.training
    model.eval()
    with no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])
            last = logits.data[:, -1, :].astype(np.float64)            # (B, V)
            if temperature == 0:
                nxt = last.argmax(axis=-1)
            else:
                p = np.exp((last - last.max(axis=-1, keepdims=True)) / temperature)
                cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
                u = rng.random((len(idx), 1))
                nxt = np.minimum((cdf < u).sum(axis=-1), last.shape[-1] - 1)
            idx = np.concatenate([idx, nxt[:, None]], axis=1)
    model.train(was_training)
    return idx


# -- the same model in PyTorch -------------------------------------------------------------


class TorchCausalSelfAttention(nn.Module):
    """:class:`CausalSelfAttention` in ``torch.nn``."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        c = cfg.n_embd
        self.query, self.key = nn.Linear(c, c), nn.Linear(c, c)
        self.value, self.proj = nn.Linear(c, c), nn.Linear(c, c)
        self.attn_drop, self.resid_drop = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        future = torch.triu(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool), 1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q = self.query(x).view(B, T, H, D).transpose(1, 2)        # (B, H, T, D)
        k = self.key(x).view(B, T, H, D).transpose(1, 2)          # (B, H, T, D)
        v = self.value(x).view(B, T, H, D).transpose(1, 2)        # (B, H, T, D)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, T)
        weights = scores.masked_fill(self.future[:T, :T], float("-inf")).softmax(-1)
        y = self.attn_drop(weights) @ v                            # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)                     # (B, T, C)
        return self.resid_drop(self.proj(y))


class TorchFeedForward(nn.Module):
    """:class:`FeedForward` in ``torch.nn``."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(tF.gelu(self.fc(x), approximate="tanh")))


class TorchBlock(nn.Module):
    """:class:`Block` in ``torch.nn``."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.n_embd), TorchCausalSelfAttention(cfg)
        self.ln2, self.ffwd = nn.LayerNorm(cfg.n_embd), TorchFeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class TorchTinyLM(nn.Module):
    """The architecture of :class:`TinyLM` in ``torch.nn``, with the same parameter names."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([TorchBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.to(getattr(torch, cfg.dtype))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        x = self.drop(self.tok_emb(idx) + self.pos_emb.weight[:T])  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))                            # (B, T, V)
        loss = None
        if targets is not None:
            loss = tF.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss


def to_torch(model: TinyLM):
    """A :class:`TorchTinyLM` holding a copy of ``model``'s weights (Linear weights transposed)."""
    torch_model = TorchTinyLM(model.config)
    linear_weights = {f"{name}.weight" for name, m in named_modules(model) if isinstance(m, Linear)}
    params = dict(torch_model.named_parameters())
    ours = dict(model.named_parameters())
    if set(params) != set(ours):
        raise RuntimeError(f"parameter names differ: {sorted(set(params) ^ set(ours))}")
    with torch.no_grad():
        for name, p in ours.items():
            value = p.data.T if name in linear_weights else p.data
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return torch_model
