"""Continuous batching over a paged KV cache: a serving engine in one file.

:func:`companion.generation.batching.generate_batch` decodes a fixed batch: every prompt
starts together, and the batch runs until its longest request is done, with each row's cache
allocated for the longest prompt plus ``max_new_tokens``. A server sees something else:
requests arrive at any time, want different numbers of tokens, and leave when they are done.
Two ideas, both from vLLM (Kwon et al., 2023), make a batch out of that.

**A paged KV cache.** Keys and values live in one pool of fixed-size *blocks* of
``block_size`` positions, shared by all requests, as pages of memory are shared by
processes. Each request has a *block table*, the list of its blocks: position ``p`` of the
request lives in block ``table[p // block_size]`` at offset ``p % block_size``. A request
holds only the blocks for the positions it has written (plus one partly filled block), not
the context length it might reach, and a block freed by a finished request is at once
usable by any other. The memory wasted is less than one block per request.

**Continuous batching.** Each call of :meth:`Engine.step` is one decoding step for every
running request, after *admitting* waiting requests into the batch (Yu et al., 2022, Orca):
a request runs its prompt (the *prefill*) as soon as there is room, and leaves the batch the
step it finishes, so a batch changes membership every step and no request waits for a
longer one to end.

**How a step attends through the block tables.** The models take a cache through the
protocol of :mod:`companion.generation.batching` (one write column ``start_pos`` shared by the
batch, and ``left_pad`` giving each row its own positions), so the engine presents the paged pool
through that protocol: :class:`PagedKVCache` replaces each attention layer's cache. For a
decoding step, row ``r`` has its new token at position ``p_r``; the columns are aligned on
the right, as in a left-padded batch: the new tokens all sit in column ``C - 1`` with
``C = max(p_r) + 1``, and row ``r`` has ``left_pad = C - 1 - p_r``. Each layer writes the
new keys and values into the pool through the block tables, then *gathers* every row's keys
and values, column by column, into a ``(B, K, C, D)`` tensor (a column before a row's first
position reads an arbitrary slot, which the mask hides). Attention then runs as for any
left-padded batch, so each row's logits are those of its request alone. vLLM's
PagedAttention kernel reads the blocks in place instead of gathering them; the gather costs
one copy of the keys and values read, which is what makes this version short.

**The scheduler** (first come, first served, with preemption by recomputation, as vLLM's
default). Blocks are allocated when needed: a prefill takes the blocks of its tokens, and a
running request takes a new block when its next position starts one. A waiting request is
admitted only when the free blocks cover its tokens *and* the blocks the running requests
will need at the next step, and only in arrival order (a long request at the head of the
queue is not overtaken). If a running request still finds no free block (requests grow
while they run), the engine **preempts** the most recently admitted request: its blocks are
freed and it goes back to the head of the queue with the tokens it has generated, which it
will recompute in one prefill when it is admitted again. So the engine never holds more
blocks than it has, never gives one block to two requests, and never waits forever (the
oldest request always keeps its blocks). A request that could not fit even alone
is refused when it is added.

Greedy decoding in float32 then gives each request the tokens it gets alone, whatever runs
beside it, whenever it arrives, and whether or not it was preempted (tested). Sampling draws
from each request's own generator (``seed``), so its draws do not depend on the others either.

>>> from companion.llama import Llama, LlamaConfig
>>> engine = Engine(Llama(LlamaConfig.preset("tiny")).eval(), block_size=4)
>>> a = engine.add_request([1, 2, 3], max_new_tokens=5)
>>> b = engine.add_request([4, 5], max_new_tokens=2)
>>> {rid: len(tokens) for rid, tokens in engine.run().items()}
{0: 5, 1: 2}
>>> engine.blocks_in_use  # every block is back in the pool
0
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from numbers import Integral
from typing import Sequence

import torch
from torch import Tensor, nn

from companion.generation.batching import check_token_id
from companion.generation.sampling import sample_next

__all__ = ["BlockAllocator", "Engine", "block_slots", "PagedKVCache", "ReplayResult", "StepOutput", "TraceRequest", "replay",
           "synthetic_trace"]


@dataclass(frozen=True)
class StepOutput:
    """One new token of one request, as :meth:`Engine.step` reports it.

    ``finish_reason`` is ``"stop"`` when the token is the request's ``eos_token_id``,
    ``"length"`` when it is its ``max_new_tokens``-th token (the names OpenAI's API uses),
    and ``None`` while the request goes on.
    """

    request_id: int
    token: int
    finished: bool
    finish_reason: str | None


class BlockAllocator:
    """The free list of a pool of ``num_blocks`` blocks: which blocks no request holds.

    >>> pool = BlockAllocator(3)
    >>> pool.allocate(2), pool.free_blocks
    ([0, 1], 1)
    >>> pool.free([1]); pool.allocate(2)
    [2, 1]
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))
        self._held: set[int] = set()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks, taken off the free list; ``RuntimeError`` if fewer are free."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} are free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._held.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Give ``blocks`` back; a block that is not held is an error (it would be handed out twice)."""
        for block in blocks:
            if block not in self._held:
                raise RuntimeError(f"block {block} is freed but not held")
            self._held.remove(block)
            self._free.append(block)


def block_slots(block_table: Tensor, positions: Tensor, block_size: int, pad_slot: int = 0) -> Tensor:
    """Where ``positions`` live in the pool, given a request's ``block_table``.

    Position ``p`` is in block ``block_table[p // block_size]``, at offset ``p % block_size``,
    which is row ``block * block_size + offset`` of the pool. ``block_table`` ``(n,)`` with
    ``positions`` ``(C,)``, or one table per row, ``(B, n)`` with ``(B, C)``. A negative
    position (padding) gives ``pad_slot``.

    >>> block_slots(torch.tensor([7, 2]), torch.tensor([0, 1, 2, 3, 4, -1]), block_size=3, pad_slot=99)
    tensor([21, 22, 23,  6,  7, 99])
    """
    valid = positions.clamp(min=0)
    slots = block_table.gather(-1, valid // block_size) * block_size + valid % block_size
    return torch.where(positions >= 0, slots, pad_slot)


class _PagedBatch:
    """Where the current forward pass writes and reads, shared by every layer's cache.

    ``write`` ``(B * T,)``: the pool slot of each new token, row by row. ``read`` ``(B, C)``:
    the pool slot each row reads in each key column.
    """

    def __init__(self) -> None:
        self.write: Tensor | None = None
        self.read: Tensor | None = None


class PagedKVCache(nn.Module):
    """One attention layer's keys and values in a pool of blocks, read through block tables.

    The pool is ``((num_blocks + 1) * block_size, K, D)`` for keys and the same for values:
    block ``b`` is rows ``b * block_size`` to ``(b + 1) * block_size - 1``, and the extra last
    block, which no request ever holds, is where padding is written and read (the mask hides
    it). It is allocated at the first write, when ``K`` and ``D`` are known. What to write and read comes from the
    engine, through a :class:`_PagedBatch` shared by all layers, so that a model sees the
    interface of :class:`~companion.layers.KVCache`: :meth:`key_positions` and
    :meth:`update`.
    """

    def __init__(self, num_blocks: int, block_size: int, batch: _PagedBatch, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.num_blocks, self.block_size, self.batch = num_blocks, block_size, batch
        self.dtype, self.device = dtype, device
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def max_seq_len(self) -> int:
        return self.num_blocks * self.block_size

    def block_nbytes(self) -> int:
        """Bytes of keys and values in one block of this layer (0 before the first write)."""
        return 0 if self.k is None else 2 * self.k[:self.block_size].numel() * self.k.element_size()

    def key_positions(self, positions: Tensor, end: int | None = None) -> Tensor:
        """The columns of the keys :meth:`update` returns: ``0 .. C-1`` (the block tables say
        which rows those are; ``end`` changes nothing)."""
        return torch.arange(self.batch.read.size(1), device=positions.device)

    def update(self, k: Tensor, v: Tensor, positions: Tensor, end: int | None = None) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` ``(B, K, T, D)`` into the pool; return every row's ``(B, K, C, D)``."""
        B, K, T, D = k.shape
        if self.k is None:
            shape = ((self.num_blocks + 1) * self.block_size, K, D)  # + the padding block
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k.index_copy_(0, self.batch.write, k.transpose(1, 2).reshape(B * T, K, D).to(self.dtype))
        self.v.index_copy_(0, self.batch.write, v.transpose(1, 2).reshape(B * T, K, D).to(self.dtype))
        read = self.batch.read  # (B, C)
        keys = self.k[read].permute(0, 2, 1, 3)  # (B, C, K, D) -> (B, K, C, D)
        values = self.v[read].permute(0, 2, 1, 3)
        return keys, values


@dataclass(eq=False)  # requests are compared by identity
class _Request:
    id: int
    tokens: list[int]  # the prompt, then every token generated so far
    prompt_len: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_token_id: int | None
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # positions 0 .. cached-1 are in the cache; the last token is not yet
    preemptions: int = 0
    arrival: float = 0.0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose ``cache`` attribute the model's forward pass writes through."""
    layers = [m for m in model.modules() if "cache" in m.__dict__ or "cache" in getattr(m, "_modules", {})]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no attention layers with a `cache`: the engine "
                        "needs a model with the cache protocol (Llama, Mistral, Phi, GPT)")
    return layers


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise TypeError(f"{type(config).__name__} has neither max_position_embeddings nor n_positions")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return int(value)


class Engine:
    """Serve many generation requests at once, over a paged KV cache, with continuous batching.

    ``model``: a model with the cache protocol (:class:`~companion.llama.Llama`,
    :class:`~companion.mistral.Mistral`, :class:`~companion.phi.Phi`,
    :class:`~companion.gpt.GPT`), in eval mode. ``block_size``: positions per KV block.
    ``num_blocks``: the pool's size; by default enough for 8 requests of the full context.
    ``max_batch``: the most requests running at once; by default as many as the blocks allow.

    :meth:`add_request` queues a request and returns its id; :meth:`step` runs one step and
    returns the tokens it produced; :meth:`run` steps until every request is done. The module
    docstring explains the cache and the scheduler. One thread at a time may use an engine.
    """

    def __init__(self, model: nn.Module, *, block_size: int = 16, num_blocks: int | None = None,
                 max_batch: int | None = None) -> None:
        if model.training:
            raise ValueError("the model is in training mode: call model.eval() first (dropout would "
                             "make each request depend on the batch)")
        self.model = model
        self.block_size = _check_int("block_size", block_size, 1)
        self.max_seq_len = _context_length(model.config)
        self.vocab_size = int(model.config.vocab_size)
        self.blocks_per_sequence = math.ceil(self.max_seq_len / self.block_size)
        self.num_blocks = (8 * self.blocks_per_sequence if num_blocks is None
                           else _check_int("num_blocks", num_blocks, 1))
        self.max_batch = None if max_batch is None else _check_int("max_batch", max_batch, 1)
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.device = weight.device
        self.allocator = BlockAllocator(self.num_blocks)
        self._batch = _PagedBatch()
        self._layers = _attention_layers(model)
        self._caches = [PagedKVCache(self.num_blocks, self.block_size, self._batch, weight.dtype, self.device)
                        for _ in self._layers]
        # Mistral keeps its cache's capacity in an attribute that setup_cache sets: set it once.
        model.setup_cache(1, 1)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.finished: dict[int, list[int]] = {}
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self.peak_blocks_in_use = 0
        self.preemptions = 0

    # ---- the public interface ---------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - self.allocator.free_blocks

    def kv_bytes_per_block(self) -> int:
        """Bytes of keys and values one block holds, over all layers (0 before the first step)."""
        return sum(cache.block_nbytes() for cache in self._caches)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                    seed: int | None = None) -> int:
        """Queue a request; return its id. Errors name the bad value and the rule it breaks.

        ``prompt_ids``: token ids (at least one). ``max_new_tokens`` >= 1. ``temperature=0``
        is greedy; otherwise tokens are sampled (``top_k``, ``top_p``) from a generator seeded
        with ``seed`` (a fresh random seed without one). The request stops after
        ``eos_token_id`` (included) or ``max_new_tokens`` tokens.
        """
        if isinstance(prompt_ids, Tensor) and (prompt_ids.dim() == 1 or (prompt_ids.dim() == 2 and len(prompt_ids) == 1)):
            prompt_ids = prompt_ids.flatten().tolist()  # (T,) or (1, T)
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or len(prompt_ids) == 0:
            raise ValueError(f"prompt_ids={prompt_ids!r} must be a non-empty list of token ids")
        prompt_ids = [check_token_id(token, f"prompt_ids[{i}]", self.vocab_size) for i, token in enumerate(prompt_ids)]
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
        total = len(prompt_ids) + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens={max_new_tokens} needs "
                             f"{total} positions, more than the model's context of {self.max_seq_len}")
        needed = math.ceil((total - 1) / self.block_size)  # the last token is never written to the cache
        if needed > self.num_blocks:
            raise ValueError(f"the prompt plus max_new_tokens needs {needed} blocks of {self.block_size} "
                             f"positions, more than the engine's num_blocks={self.num_blocks}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy decoding)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be None or an int >= 1")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1]")
        if eos_token_id is not None:
            check_token_id(eos_token_id, "eos_token_id", self.vocab_size)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        request = _Request(self._next_id, prompt_ids, len(prompt_ids), max_new_tokens,
                           float(temperature), top_k, top_p, eos_token_id, generator, arrival=time.perf_counter())
        self._next_id += 1
        self._requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Drop a waiting or running request and free its blocks (nothing if it has finished)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def step(self) -> list[StepOutput]:
        """Admit what fits, prefill it, then decode one token for every request that was running.

        Returns one :class:`StepOutput` per token produced, in request order.
        """
        outputs: list[StepOutput] = []
        decoding = list(self.running)  # the requests that were running before this step
        self._admit(outputs)
        decoding = [r for r in decoding if self._make_room(r)]
        if decoding:
            self._decode(decoding, outputs)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        return outputs

    def run(self) -> dict[int, list[int]]:
        """Step until no request is waiting or running; return each finished request's new tokens.

        The result is in request-id order and covers every request that finished since the
        last :meth:`run`; :attr:`finished` is emptied (a server that only calls :meth:`step`
        reads the tokens from its outputs and may ``finished.pop`` them).
        """
        while self.has_unfinished():
            self.step()
        done = {rid: self.finished[rid] for rid in sorted(self.finished)}
        self.finished.clear()
        return done

    # ---- the scheduler ---------------------------------------------------------------------

    def _blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def _needs_block(self, request: _Request) -> bool:
        """Whether writing the request's next position (``cached``) needs a new block."""
        return request.cached == len(request.blocks) * self.block_size

    def _admit(self, outputs: list[StepOutput]) -> None:
        """Admit waiting requests in arrival order while their blocks fit beside the running ones';
        run their prompts in one batched prefill."""
        admitted = []
        reserved = sum(self._needs_block(r) for r in self.running)  # the running ones' next step
        while self.waiting and (self.max_batch is None or len(self.running) < self.max_batch):
            request = self.waiting[0]
            needed = self._blocks_for(len(request.tokens))
            if needed + reserved + (len(request.tokens) % self.block_size == 0) > self.free_blocks:
                break  # it waits: first come, first served, no overtaking
            self.waiting.popleft()
            request.blocks = self.allocator.allocate(needed)
            reserved += len(request.tokens) % self.block_size == 0  # its first decoding step needs a block
            self.running.append(request)
            admitted.append(request)
        if admitted:
            self._prefill(admitted, outputs)

    def _make_room(self, request: _Request) -> bool:
        """Give ``request`` the block for its next position, preempting later requests if needed.

        Returns False when ``request`` itself was preempted (or has left the batch).
        """
        if request not in self.running:
            return False
        while self._needs_block(request) and self.free_blocks == 0:
            victim = self.running[-1]  # the most recently admitted
            self._preempt(victim)
            if victim is request:
                return False
        if self._needs_block(request):
            request.blocks += self.allocator.allocate(1)
        return True

    def _preempt(self, request: _Request) -> None:
        """Free ``request``'s blocks and put it back at the head of the queue, to be recomputed."""
        self.running.remove(request)
        self._release(request)
        request.cached, request.preemptions = 0, request.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: _Request) -> None:
        self.allocator.free(request.blocks)
        request.blocks = []

    def _finish(self, request: _Request, token: int, outputs: list[StepOutput]) -> None:
        """Record ``token``; retire the request if it is its last."""
        request.tokens.append(token)
        reason = None
        if request.eos_token_id is not None and token == request.eos_token_id:
            reason = "stop"
        elif len(request.generated) == request.max_new_tokens:
            reason = "length"
        outputs.append(StepOutput(request.id, token, reason is not None, reason))
        if reason is not None:
            self.running.remove(request)
            self._release(request)
            self.finished[request.id] = request.generated
            del self._requests[request.id]

    # ---- the forward passes ----------------------------------------------------------------

    def _slots(self, requests: list[_Request], positions: Tensor) -> Tensor:
        """Pool slots ``(B, C)`` of ``positions`` ``(B, C)``, row ``r`` of ``requests[r]``.

        A negative position (padding, or a column before a row's first token) is the padding
        block's first slot: written there, it overwrites nothing; read, the mask hides it.
        """
        width = max(len(r.blocks) for r in requests)
        tables = torch.tensor([r.blocks + [self.num_blocks] * (width - len(r.blocks)) for r in requests],
                              dtype=torch.long, device=self.device)  # (B, blocks): the block tables
        return block_slots(tables, positions, self.block_size, pad_slot=self.num_blocks * self.block_size)

    def _forward(self, idx: Tensor, start_pos: int, left_pad: Tensor, write: Tensor, read: Tensor) -> Tensor:
        """Next-token logits ``(B, V)`` of ``idx`` ``(B, T)``, through the paged caches.

        ``write`` ``(B, T)``: the pool slot of each new token; ``read`` ``(B, C)``: the slot
        each row reads in each of the ``C`` key columns (the last ``T`` are the new tokens').
        """
        self._batch.write, self._batch.read = write.reshape(-1), read
        for layer, cache in zip(self._layers, self._caches):
            layer.cache = cache  # installed for every pass: another user of the model may have replaced them
        with torch.no_grad():
            start = torch.tensor(start_pos, device=self.device)  # a tensor: the pool has no fixed batch size
            return self.model(idx, start_pos=start, last_only=True, left_pad=left_pad)[:, -1]

    def _sample(self, request: _Request, logits: Tensor) -> int:
        return int(sample_next(logits[None], request.temperature, request.top_k, request.top_p,
                               request.generator)[0])

    def _prefill(self, requests: list[_Request], outputs: list[StepOutput]) -> None:
        """Run the requests' tokens in one left-padded pass, writing positions 0 .. n-1 of each;
        emit each request's next token."""
        T = max(len(r.tokens) for r in requests)
        left_pad = torch.tensor([T - len(r.tokens) for r in requests], device=self.device)  # (B,)
        positions = torch.arange(T, device=self.device)[None, :] - left_pad[:, None]  # (B, T), < 0: padding
        slots = self._slots(requests, positions)  # each row writes and reads its own positions
        idx = torch.zeros((len(requests), T), dtype=torch.long, device=self.device)
        for row, request in enumerate(requests):
            idx[row, T - len(request.tokens):] = torch.tensor(request.tokens)
        logits = self._forward(idx, 0, left_pad, slots, slots)
        for row, request in enumerate(requests):
            request.cached = len(request.tokens)
            self._finish(request, self._sample(request, logits[row]), outputs)

    def _decode(self, requests: list[_Request], outputs: list[StepOutput]) -> None:
        """One token for each of ``requests``, in one batched pass aligned on the right."""
        new = torch.tensor([r.cached for r in requests], device=self.device)  # (B,): each row's new position
        C = int(new.max()) + 1
        left_pad = (C - 1) - new  # (B,)
        columns = torch.arange(C, device=self.device)[None, :] - left_pad[:, None]  # (B, C): each column's position
        idx = torch.tensor([[r.tokens[-1]] for r in requests], dtype=torch.long, device=self.device)
        logits = self._forward(idx, C - 1, left_pad, self._slots(requests, new[:, None]),
                               self._slots(requests, columns))  # (B, V)
        for row, request in enumerate(requests):
            request.cached += 1
            self._finish(request, self._sample(request, logits[row]), outputs)


# ---- replaying a trace of requests ------------------------------------------------------------


@dataclass(frozen=True)
class TraceRequest:
    """A request of a trace: when it arrives (seconds from the start), its prompt, its length."""

    arrival: float
    prompt: list[int]
    max_new_tokens: int


def synthetic_trace(n: int, *, rate: float, vocab_size: int, prompt_len: tuple[int, int] = (16, 128),
                    new_tokens: tuple[int, int] = (16, 128), seed: int = 0) -> list[TraceRequest]:
    """``n`` requests arriving as a Poisson process of ``rate`` requests per second.

    The gaps between arrivals are exponential with mean ``1 / rate``; prompt lengths and
    output lengths are uniform integers in the inclusive ranges ``prompt_len`` and
    ``new_tokens``; prompt tokens are uniform over the vocabulary. Seeded: the same arguments
    give the same trace on every machine.

    >>> [(round(r.arrival, 3), len(r.prompt), r.max_new_tokens) for r in synthetic_trace(2, rate=4, vocab_size=10)]
    [(0.0, 124, 63), (0.396, 58, 124)]
    """
    if n < 1 or rate <= 0:
        raise ValueError(f"n={n} must be >= 1 and rate={rate} > 0")
    rng = random.Random(seed)  # Python's generator: the same draws on every machine and library version
    trace, at = [], 0.0
    for i in range(n):
        if i:
            at += rng.expovariate(rate)  # the first request arrives at time 0
        length = rng.randint(*prompt_len)
        trace.append(TraceRequest(at, [rng.randrange(vocab_size) for _ in range(length)], rng.randint(*new_tokens)))
    return trace


@dataclass
class ReplayResult:
    """What :func:`replay` measured: per request, per step, and in all.

    Times are seconds on the replay's clock (the sum of the measured step times, jumping over
    idle time to the next arrival). ``ttft[i]``: request ``i``'s time to first token (from
    its arrival); ``tpot[i]``: its time per output token after the first; ``kv_bytes`` and
    ``kv_contiguous_bytes``: after each step, the bytes of the blocks in use, and what a
    contiguous cache with one max-length row per running request would hold.
    """

    policy: str
    tokens: dict[int, list[int]]
    ttft: list[float]
    tpot: list[float]
    makespan: float
    kv_bytes: list[int]
    kv_contiguous_bytes: list[int]
    batch_sizes: list[int]
    preemptions: int

    @property
    def throughput(self) -> float:
        """Generated tokens per second, from the first arrival to the last token."""
        return sum(len(t) for t in self.tokens.values()) / self.makespan

    def summary(self) -> dict[str, float]:
        """Throughput, TTFT and TPOT medians and 99th percentiles, and KV memory (MiB)."""
        q = lambda xs, p: float(torch.tensor(xs, dtype=torch.float64).quantile(p)) if xs else float("nan")
        return {"throughput": self.throughput, "ttft_p50": q(self.ttft, 0.5), "ttft_p99": q(self.ttft, 0.99),
                "tpot_p50": q(self.tpot, 0.5), "tpot_p99": q(self.tpot, 0.99),
                "kv_mib_peak": max(self.kv_bytes) / 2**20, "kv_contiguous_mib_peak": max(self.kv_contiguous_bytes) / 2**20,
                "mean_batch": sum(self.batch_sizes) / len(self.batch_sizes)}


POLICIES = ("one-at-a-time", "static", "continuous")


def replay(model: nn.Module, trace: Sequence[TraceRequest], policy: str, *, max_batch: int = 16,
           block_size: int = 16, num_blocks: int | None = None) -> ReplayResult:
    """Serve ``trace`` with one of three schedules, all on an :class:`Engine`, and measure it.

    * ``"one-at-a-time"``: one request runs, the others queue (``max_batch=1``);
    * ``"static"``: a batch of up to ``max_batch`` queued requests starts only when the
      previous batch has entirely finished (a finished request leaves early, but no new one
      joins a running batch);
    * ``"continuous"``: waiting requests join the running batch at every step.

    The same kernels run in all three, so the differences are the schedule's. The clock is
    the sum of the measured step times; when nothing runs and nothing has arrived, it jumps
    to the next arrival (no sleeping). Requests arrive at step boundaries.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    engine = Engine(model, block_size=block_size, num_blocks=num_blocks,
                    max_batch=1 if policy == "one-at-a-time" else max_batch)
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    queue: deque[int] = deque()  # arrived, not yet given to the engine (static batching only)
    rid_to_index: dict[int, int] = {}
    first, last, counts = {}, {}, {}
    kv, contiguous, batch_sizes = [], [], []
    now, nxt = 0.0, 0
    while nxt < len(order) or queue or engine.has_unfinished():
        while nxt < len(order) and trace[order[nxt]].arrival <= now:
            queue.append(order[nxt])
            nxt += 1
        if policy != "static" or not engine.has_unfinished():
            take = len(queue) if policy != "static" else min(len(queue), max_batch)
            for _ in range(take):
                i = queue.popleft()
                rid_to_index[engine.add_request(trace[i].prompt, trace[i].max_new_tokens)] = i
        if not engine.has_unfinished():
            now = max(now, trace[order[nxt]].arrival)  # idle: jump to the next arrival
            continue
        start = time.perf_counter()
        outputs = engine.step()
        now += time.perf_counter() - start
        for out in outputs:
            i = rid_to_index[out.request_id]
            first.setdefault(i, now)
            last[i], counts[i] = now, counts.get(i, 0) + 1
        per_block = engine.kv_bytes_per_block()
        kv.append(engine.blocks_in_use * per_block)
        contiguous.append(len(engine.running) * engine.max_seq_len * per_block // engine.block_size)
        batch_sizes.append(len(engine.running))
    tokens = {rid_to_index[rid]: t for rid, t in engine.run().items()}
    ttft = [first[i] - trace[i].arrival for i in range(len(trace))]
    tpot = [(last[i] - first[i]) / (counts[i] - 1) for i in range(len(trace)) if counts[i] > 1]
    makespan = max(last.values()) - trace[order[0]].arrival
    return ReplayResult(policy, tokens, ttft, tpot, makespan, kv, contiguous, batch_sizes, engine.preemptions)
