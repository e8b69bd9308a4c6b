"""Training a language model: AdamW, warmup + cosine schedule, clipping, evaluation, checkpoints.

Works for any model that maps token ids ``(B, T)`` to logits ``(B, T, V)``. One step::

    x, y = batch(step)                              # random windows (companion.data)
    lr = lr_at(step)                                # linear warmup, then cosine decay
    loss = cross_entropy(model(x), y)               # under bf16 or fp16 autocast if asked
    loss.backward(); clip_grad_norm_(..., 1.0); optimizer.step()

In float16 a gradient scaler multiplies the loss before ``backward`` (small gradients
would otherwise round to 0), divides the gradients back before clipping, and skips the
step (and halves its scale) when a gradient overflowed to inf or nan.

Everything a step depends on is a function of the step number (the batch, the learning
rate) or is saved in the checkpoint (weights, AdamW moments, the random number
generator that drives dropout). So a run stopped at step ``s`` and resumed from its
checkpoint computes exactly what the uninterrupted run computes: on a CPU, bit for bit.

Command line (the larger Tiny Shakespeare run, for a GPU)::

    COMPANION_DATA=/path/to/folder python -m companion.train --preset shakespeare-char-gpu \\
        --device cuda --out shakespeare_gpu.json

Under ``torchrun`` the same command trains with DistributedDataParallel (data parallelism):
each of the ``world_size`` processes holds the whole model, takes its own ``batch_size``
rows of one global batch of ``batch_size * world_size`` windows, and the gradients are
averaged across processes during the backward pass, so every process takes the same
optimizer step. On a CPU the processes talk over ``gloo``, on GPUs over ``nccl``::

    torchrun --standalone --nproc_per_node 2 -m companion.train --max-steps 100
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from tqdm import tqdm

from companion.data import RandomWindows
from companion.device import plan_device

__all__ = [
    "TRAIN_PRESETS",
    "History",
    "TrainConfig",
    "Trainer",
    "configure_optimizer",
    "lm_loss",
    "lr_at",
    "plot_losses",
    "rank_and_world_size",
]

# TrainConfig.dtype -> autocast dtype (None: plain float32); "auto" asks companion.device.
DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """How to train. ``context_length=None`` takes the model's ``config.n_positions``.

    ``lr_decay_steps=None`` decays over the whole run (``max_steps``). ``grad_clip=0``
    turns clipping off. ``dtype="bfloat16"`` runs forward and loss under bf16 autocast
    (weights and optimizer stay in float32); ``dtype="float16"`` under fp16 autocast with a
    gradient scaler; ``dtype="auto"`` lets ``companion.device.choose_plan`` pick for the
    device (bf16 from compute capability 8.0, fp16 on older GPUs, float32 on CPU and MPS).
    ``checkpoint_interval=0`` saves only at the end
    (when ``checkpoint_dir`` is set). ``save_best=True`` also keeps, in ``checkpoint_dir/best``,
    the checkpoint with the lowest validation loss seen so far: a model that starts to overfit
    is best taken from there, not from the last step.
    """

    max_steps: int = 1000
    batch_size: int = 32
    context_length: int | None = None
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    progress: bool = True
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 0
    save_best: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_interval", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.warmup_steps < 0 or self.checkpoint_interval < 0:
            raise ValueError("warmup_steps and checkpoint_interval must be >= 0")
        if not 0.0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            allowed = ", ".join(repr(d) for d in ("auto", *DTYPES))
            raise ValueError(f"dtype={self.dtype!r} must be one of {allowed}")


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless ``torch.distributed`` is set up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- the pieces of one step -------------------------------------------------------------


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate at ``step`` (counted from 0): linear warmup, cosine decay, then flat.

    Warmup climbs to ``max_lr`` over the first ``warmup_steps`` steps: early gradients
    are large and Adam's moment estimates still poor, so big steps would throw the model
    far off. The cosine then falls smoothly to ``min_lr`` at ``decay_steps``.

    >>> [round(lr_at(s, 1.0, 0.1, warmup_steps=2, decay_steps=6), 3) for s in range(8)]
    [0.5, 1.0, 1.0, 0.868, 0.55, 0.232, 0.1, 0.1]
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (Loshchilov and Hutter's decoupled decay).

    Matrices (2-D and up: linear layers, embeddings) are decayed; biases and LayerNorm
    gains are not: shrinking a gain towards 0 would switch a feature off rather than
    regularise it. A tied matrix is one parameter and appears once. The fused CUDA kernel
    is used when the device is a GPU and this PyTorch has it.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of logits ``(B, T, V)`` against targets ``(B, T)``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ---- the trainer -------------------------------------------------------------------------


@dataclass
class History:
    """What a run measured: per-step training loss and lr, and periodic evaluations."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_train_loss: list[float] = field(default_factory=list)
    eval_val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of run(), evaluations (and compilation) included
    eval_seconds: float = 0.0  # the part of it spent evaluating
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Trains ``model`` on ``train_tokens`` and evaluates on ``val_tokens``.

    ``run()`` trains from the current step to ``until`` (default: ``max_steps``) and can be
    called again to continue. ``save(dir)`` writes a checkpoint; a new Trainer built the
    same way and given ``load(dir)`` continues as if never stopped.

    If ``torch.distributed`` is initialised (``torchrun``), the model is wrapped in
    DistributedDataParallel and this process trains on rows ``rank * batch_size`` to
    ``(rank + 1) * batch_size`` of a global batch of ``batch_size * world_size`` windows: the
    same steps as one process with the whole global batch. Every process evaluates the same
    global-batch windows, so all report the numbers of that one process; only rank 0 shows
    progress and writes checkpoints.
    """

    def __init__(self, model: nn.Module, train_tokens, val_tokens, config: TrainConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        T = config.context_length or model.config.n_positions
        self.context_length = T
        self.rank, self.world_size = rank_and_world_size()
        # One global batch per step, the same on every process; each process takes its rows.
        global_batch = config.batch_size * self.world_size
        self.train_batches = RandomWindows(train_tokens, global_batch, T, config.seed, self.device)
        # Evaluation always uses the same windows, so successive evaluations are comparable.
        # With several processes, each evaluates the whole global batch: the numbers of one process.
        self.eval_sets = {
            "train": RandomWindows(train_tokens, global_batch, T, config.seed + 1, self.device),
            "val": RandomWindows(val_tokens, global_batch, T, config.seed + 2, self.device),
        }
        self.optimizer = configure_optimizer(
            self.model, config.learning_rate, config.weight_decay,
            (config.beta1, config.beta2), self.device.type,
        )
        if config.dtype == "auto":
            self.autocast_dtype = plan_device(self.device, verbose=False).autocast_dtype
        else:
            self.autocast_dtype = DTYPES[config.dtype]
        # Disabled (every call a pass-through) unless float16: bf16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype is torch.float16)
        # The (compiled, distributed) wrapper runs the steps; self.model (the same weights) is saved.
        train_model = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.forward_fn = torch.compile(train_model) if config.compile else train_model
        # Evaluation needs no gradient averaging: the plain model, on every process alike.
        self.eval_fn = self.forward_fn if self.world_size == 1 else self.model
        self.step = 0
        self.history = History()
        self._pending: list[tuple[int, Tensor]] = []  # losses not yet copied to the CPU

    # -- one step and evaluation --

    def autocast(self) -> torch.autocast:
        """The autocast context of forward and loss (disabled in float32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def lr(self, step: int) -> float:
        c = self.config
        return lr_at(step, c.learning_rate, c.min_lr, c.warmup_steps, c.lr_decay_steps or c.max_steps)

    def train_step(self) -> Tensor:
        """One optimisation step on batch number ``self.step``; returns the loss (on device)."""
        self.model.train()
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = next(self.train_batches)  # batch number self.step
        if self.world_size > 1:  # this process's rows of the global batch
            rows = slice(self.rank * self.config.batch_size, (self.rank + 1) * self.config.batch_size)
            x, y = x[rows], y[rows]
        with self.autocast():
            loss = lm_loss(self.forward_fn(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # loss * scale in float16; loss itself otherwise
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)  # skipped if a gradient is inf or nan
        self.scaler.update()  # halve the scale after an overflow, double it after 2000 clean steps
        self._pending.append((self.step, loss.detach()))
        self.history.lr.append(lr)
        self.step += 1
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed evaluation windows of each split."""
        self.model.eval()
        out = {}
        for split, batches in self.eval_sets.items():
            losses = torch.zeros(self.config.eval_batches, device=self.device)
            for i in range(self.config.eval_batches):
                x, y = batches.batch(i)
                with self.autocast():
                    losses[i] = lm_loss(self.eval_fn(x), y)
            out[split] = losses.mean().item()
        self.model.train()
        return out

    def _flush(self) -> None:
        if self._pending:
            values = torch.stack([loss for _, loss in self._pending]).float().cpu().tolist()
            self.history.steps += [s for s, _ in self._pending]
            self.history.train_loss += values
            self._pending.clear()

    def _record_eval(self) -> dict[str, float]:
        start = time.perf_counter()
        losses = self.evaluate()  # ends with .item(), so the GPU has finished
        self.history.eval_seconds += time.perf_counter() - start
        self.history.eval_steps.append(self.step)
        self.history.eval_train_loss.append(losses["train"])
        self.history.eval_val_loss.append(losses["val"])
        return losses

    def run(self, until: int | None = None) -> History:
        """Train until step ``until`` (default ``max_steps``), evaluating every ``eval_interval``
        steps and at the end of the run, checkpointing if ``checkpoint_dir`` is set."""
        c = self.config
        until = c.max_steps if until is None else until
        if not self.step <= until <= c.max_steps:
            raise ValueError(f"until={until} must be between the current step {self.step} and max_steps={c.max_steps}")
        bar = tqdm(total=c.max_steps, initial=self.step, file=sys.stderr, disable=not c.progress or self.rank > 0,
                   desc="training", unit="step", mininterval=1.0)
        writer = bool(c.checkpoint_dir) and self.rank == 0  # one process writes checkpoints
        start = time.perf_counter()
        while self.step < until:
            self.train_step()
            self.history.tokens += c.batch_size * self.world_size * self.context_length
            bar.update(1)
            if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                self._flush()
                losses = self._record_eval()
                bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
                if writer and c.save_best and losses["val"] <= min(self.history.eval_val_loss):
                    self.save(Path(c.checkpoint_dir) / "best")
            if writer and c.checkpoint_interval and self.step % c.checkpoint_interval == 0:
                self.save(c.checkpoint_dir)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.history.seconds += time.perf_counter() - start
        bar.close()
        self._flush()
        if writer and until == c.max_steps:
            self.save(c.checkpoint_dir)
        return self.history

    # -- checkpoints --

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors``, ``optimizer.pt`` and ``trainer.json`` into ``directory``.

        ``optimizer.pt`` holds only tensors, numbers and containers, so it loads with
        ``torch.load(weights_only=True)``: loading it cannot run code. In float16 it also
        holds the gradient scaler's state (its scale and growth counter).
        """
        self._flush()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(directory / "model.safetensors"))  # tied weights stored once
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rest = {"optimizer": self.optimizer.state_dict(), "rng": rng}
        if self.scaler.is_enabled():
            rest["scaler"] = self.scaler.state_dict()
        torch.save(rest, directory / "optimizer.pt")
        state = {
            "step": self.step,
            "train_batches": self.train_batches.state_dict(),
            "history": self.history.to_dict(),
            "train_config": asdict(self.config),
            "model_config": _config_dict(self.model),
        }
        (directory / "trainer.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        return directory

    def load(self, directory: str | Path) -> None:
        """Restore weights, optimizer, random state, data position and history from ``directory``."""
        directory = Path(directory)
        state = json.loads((directory / "trainer.json").read_text(encoding="utf-8"))
        if state["model_config"] != _config_dict(self.model):
            raise ValueError(
                f"checkpoint in {directory} is for a model with config {state['model_config']}, "
                f"not {_config_dict(self.model)}"
            )
        load_model(self.model, str(directory / "model.safetensors"), device=str(self.device))
        rest = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(rest["optimizer"])
        if self.scaler.is_enabled() and "scaler" in rest:  # else a fresh scale, as at step 0
            self.scaler.load_state_dict(rest["scaler"])
        torch.set_rng_state(rest["rng"]["cpu"].cpu())
        if "cuda" in rest["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(rest["rng"]["cuda"].cpu(), self.device)
        self.step = int(state["step"])
        self.train_batches.load_state_dict(state["train_batches"])
        self.history = History(**state["history"])
        self._pending.clear()


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    return asdict(config) if config is not None and hasattr(config, "__dataclass_fields__") else None


# ---- plots --------------------------------------------------------------------------------


def plot_losses(history: History, title: str = "Training and validation loss", ax=None):
    """Training loss per step (faint), and the periodic evaluations on both splits."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(history.steps, history.train_loss, color="C0", alpha=0.3, lw=0.8, label="train (batch)")
    ax.plot(history.eval_steps, history.eval_train_loss, "o-", color="C0", ms=3, label="train (eval)")
    ax.plot(history.eval_steps, history.eval_val_loss, "o-", color="C1", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.legend()
    return ax


# ---- Tiny Shakespeare, character level, from the command line --------------------------

# name -> (GPTConfig fields, TrainConfig fields)
TRAIN_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # The run of chapter 7 on a laptop CPU: about 1.95 validation loss in a minute or two.
    "shakespeare-char-cpu": (
        dict(n_layer=4, n_head=4, n_embd=64, n_positions=64, dropout=0.0),
        dict(max_steps=800, batch_size=32, learning_rate=6e-3, min_lr=6e-4, warmup_steps=50,
             beta2=0.99, eval_interval=100, eval_batches=8,
             compile=False),  # too short a run: compiling on a CPU takes longer than it saves
    ),
    # nanoGPT's Shakespeare-char configuration (about 1.47 validation loss in 5000 steps).
    # dtype and compile come from companion.device.plan_device: bf16 and compiled on an A100/H100.
    "shakespeare-char-gpu": (
        dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, dropout=0.2, bias=False),
        dict(max_steps=5000, batch_size=64, learning_rate=1e-3, min_lr=1e-4, warmup_steps=100,
             beta2=0.99, eval_interval=250, eval_batches=200,
             save_best=True),  # it overfits after about 2000 steps: keep the best checkpoint
    ),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Train a character-level GPT on Tiny Shakespeare.")
    parser.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="shakespeare-char-cpu")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--max-steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size (per process under torchrun)")
    parser.add_argument("--eval-batches", type=int, help="override the batches per evaluation")
    parser.add_argument("--dtype", choices=["auto", *DTYPES],
                        help="autocast dtype (default: what companion.device.plan_device chooses for the device)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: what plan_device chooses)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the initial weights and the sample")
    parser.add_argument("--checkpoint-dir", help="save a checkpoint here at the end (and the best in best/)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--sample-length", type=int, default=300, help="characters to generate at the end")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one process per device
        return _main_distributed(args)
    return _main(args)


def _main_distributed(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if cuda:
            local_rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local_rank)
            args.device = f"cuda:{local_rank}"
        return _main(args)
    finally:
        dist.destroy_process_group()


def _main(args: argparse.Namespace) -> dict[str, Any]:
    from companion.char_tokenizer import CharTokenizer
    from companion.data import load_tiny_shakespeare, train_val_split
    from companion.device import seed_everything
    from companion.generation.sampling import generate
    from companion.gpt import GPT, GPTConfig

    rank, world_size = rank_and_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)  # one process speaks for all
    model_kw, train_kw = TRAIN_PRESETS[args.preset]
    train_kw = {**train_kw, "device": args.device, "progress": not args.no_progress,
                "checkpoint_dir": args.checkpoint_dir}
    if args.max_steps is not None:
        train_kw["max_steps"] = args.max_steps
    if args.batch_size is not None:
        train_kw["batch_size"] = args.batch_size
    if args.eval_batches is not None:
        train_kw["eval_batches"] = args.eval_batches
    # The device's plan decides what neither the command line nor the preset fixes.
    plan = plan_device(args.device, verbose=False)
    for reason in plan.reasons:  # once, from rank 0
        say(reason)
    plan_dtype = next(name for name, dtype in DTYPES.items() if dtype == plan.autocast_dtype)
    train_kw.setdefault("dtype", plan_dtype)
    train_kw.setdefault("compile", plan.compile)
    if args.dtype is not None:
        train_kw["dtype"] = plan_dtype if args.dtype == "auto" else args.dtype
    if args.compile is not None:
        train_kw["compile"] = args.compile
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    text = load_tiny_shakespeare()
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(torch.tensor(tok.encode(text)), 0.1)
    seed_everything(args.seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **model_kw))
    config = TrainConfig(**train_kw)
    trainer = Trainer(model, train_ids, val_ids, config)
    processes = f" x {world_size} processes" if world_size > 1 else ""
    say(f"{args.preset}: {model.num_parameters() / 1e6:.2f}M parameters, {config.max_steps} steps "
        f"of {config.batch_size}{processes} x {trainer.context_length} tokens on {args.device}", flush=True)
    history = trainer.run()
    val = history.eval_val_loss[-1]
    best = min(history.eval_val_loss)
    best_step = history.eval_steps[history.eval_val_loss.index(best)]
    tokens_per_s = history.tokens / history.seconds
    say(f"final validation loss {val:.4f} (best {best:.4f} at step {best_step}), "
        f"train loss {history.eval_train_loss[-1]:.4f}")
    say(f"wall time {history.seconds:.1f} s, of which evaluation {history.eval_seconds:.1f} s "
        f"({tokens_per_s:,.0f} training tokens/s overall)")
    prompt = torch.tensor([tok.encode("\n")], device=trainer.device)
    gen = torch.Generator(device=trainer.device).manual_seed(args.seed)
    sample = tok.decode(generate(model.eval(), prompt, args.sample_length, temperature=0.8, top_k=None, generator=gen,
                                 context_length=model.config.n_positions)[0].tolist())
    say("sample:\n" + sample)
    result = {
        "preset": args.preset,
        "device": args.device,
        "world_size": world_size,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "plan": plan.summary(),
        "torch": torch.__version__,
        "parameters": model.num_parameters(),
        "final_val_loss": val,
        "best_val_loss": best,
        "best_step": best_step,
        "final_train_loss": history.eval_train_loss[-1],
        "seconds": history.seconds,
        "eval_seconds": history.eval_seconds,
        "tokens_per_s": tokens_per_s,
        "model_config": asdict(model.config),
        "train_config": asdict(config),
        "history": {k: v for k, v in history.to_dict().items() if k not in ("steps", "train_loss", "lr")},
        "sample": sample,
    }
    if args.out and rank == 0:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        say(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
