"""companion.generation.engine: continuous batching over a paged KV cache.

For the four families (Llama with grouped KV heads, Mistral with a window of 4, shorter than
the prompts and generations, Phi, and chapter 7's GPT), with small random float32 models and
greedy decoding:

* **exact**: every request's tokens equal its prompt generated alone by the plain uncached
  loop of :func:`companion.generation.sampling.generate` (which shares no cache code with the engine),
  whatever runs beside it, with requests arriving while others run and leaving when done,
  over schedules drawn by hypothesis, and under a pool so small that requests are preempted
  and recomputed;
* **bounded**: after every step, the blocks held by the running requests are distinct, their
  number is what the engine reports and never more than the pool, each request holds exactly
  the blocks of its cached positions, waiting requests hold none, and the batch never
  exceeds ``max_batch``; admission is first come, first served;
* cancellation frees the blocks; eos stops a request with ``"stop"``; a sampled request's
  tokens depend on its seed, not on the batch; bad requests are refused with a named error.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _tiny_models import MODELS, VOCAB, WINDOW, random_model
from hypothesis import example, given, settings
from hypothesis import strategies as st

from companion.generation.engine import BlockAllocator, Engine
from companion.generation.sampling import generate

FAMILIES = pytest.mark.parametrize("name", MODELS)
EXAMPLES = settings(max_examples=8, deadline=None, derandomize=True)


@functools.cache
def alone(name: str, prompt: tuple[int, ...], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The new tokens of ``prompt`` generated on its own, greedily, without any cache."""
    out = generate(random_model(name), torch.tensor([prompt]), max_new_tokens, temperature=0.0,
                   eos_token_id=eos_token_id)
    return out[0, len(prompt):].tolist()


def check_invariants(engine: Engine) -> None:
    """What must hold between any two steps."""
    held = [b for r in engine.running for b in r.blocks]
    assert len(held) == len(set(held)), f"a block is held twice: {sorted(held)}"
    assert len(held) == engine.blocks_in_use <= engine.num_blocks
    for r in engine.running:  # exactly the blocks of its cached positions
        assert len(r.blocks) == math.ceil(r.cached / engine.block_size), (r.cached, r.blocks)
    assert all(not r.blocks for r in engine.waiting)
    assert engine.max_batch is None or len(engine.running) <= engine.max_batch


def run_schedule(engine: Engine, schedule: list[tuple[int, list[int], int]]) -> tuple[dict[int, list[int]], dict]:
    """Add each ``(step, prompt, n)`` request at its step; step to the end, checking the invariants.

    Returns the request ids of the schedule's entries and what each request emitted, with
    the finish reasons.
    """
    ids, emitted, reasons, step = {}, {}, {}, 0
    pending = sorted(enumerate(schedule), key=lambda e: e[1][0])
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, n) = pending.pop(0)
            ids[i] = engine.add_request(prompt, n)
        for out in engine.step():
            assert out.request_id not in reasons, "a finished request emitted again"
            emitted.setdefault(out.request_id, []).append(out.token)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        check_invariants(engine)
        step += 1
    assert engine.blocks_in_use == 0
    return {i: emitted[rid] for i, rid in ids.items()}, {i: reasons[rid] for i, rid in ids.items()}


REQUESTS = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3 * WINDOW), st.integers(1, 3 * WINDOW)),
                    min_size=1, max_size=6)  # (arrival step, prompt length, new tokens)


@FAMILIES
@EXAMPLES
@given(requests=REQUESTS, block_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16))
@example(requests=[(0, 12, 12), (1, 1, 5), (1, 7, 1), (3, 4, 9)], block_size=4, seed=0)
def test_each_request_equals_its_generation_alone(name, requests, block_size, seed):
    """Requests arriving at different steps, of different lengths, each get their solo tokens."""
    gen = torch.Generator().manual_seed(seed)
    schedule = [(at, torch.randint(0, VOCAB, (n,), generator=gen).tolist(), new) for at, n, new in requests]
    engine = Engine(random_model(name), block_size=block_size, max_batch=4)
    got, reasons = run_schedule(engine, schedule)
    for i, (_, prompt, n) in enumerate(schedule):
        assert got[i] == alone(name, tuple(prompt), n), f"request {i} (prompt {len(prompt)}, {n} new)"
        assert reasons[i] == "length"
    assert engine.preemptions == 0  # the default pool holds 8 full contexts


@FAMILIES
@settings(max_examples=5, deadline=None, derandomize=True)
@given(requests=REQUESTS, seed=st.integers(0, 2**16))
def test_exact_under_preemption(name, requests, seed):
    """A pool too small for the batch: requests are preempted, recomputed, and still exact."""
    gen = torch.Generator().manual_seed(seed)
    schedule = [(at, torch.randint(0, VOCAB, (n,), generator=gen).tolist(), new) for at, n, new in requests]
    longest = max(math.ceil((len(p) + n - 1) / 2) for _, p, n in schedule)
    engine = Engine(random_model(name), block_size=2, num_blocks=max(longest, 6))
    got, _ = run_schedule(engine, schedule)
    for i, (_, prompt, n) in enumerate(schedule):
        assert got[i] == alone(name, tuple(prompt), n), f"request {i} (prompt {len(prompt)}, {n} new)"


def test_preemption_happens_and_is_exact():
    """A deterministic case where the pool runs out mid-flight (so the test above is not vacuous)."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (6, 5, 7, 3)]
    engine = Engine(random_model("llama"), block_size=2, num_blocks=12)
    got, _ = run_schedule(engine, [(0, p, 12) for p in prompts])
    assert engine.preemptions > 0
    assert engine.peak_blocks_in_use == 12
    assert [got[i] for i in range(4)] == [alone("llama", tuple(p), 12) for p in prompts]


def test_admission_is_first_come_first_served():
    """A large request at the head of the queue waits for room, and the small ones behind it wait too."""
    engine = Engine(random_model("llama"), block_size=4, num_blocks=6)
    first = engine.add_request(list(range(1, 17)), 4)  # 16 + 3 positions: 5 blocks
    engine.step()
    big = engine.add_request(list(range(1, 13)), 4)  # 3 blocks: does not fit beside the first
    small = engine.add_request([1], 2)  # 1 block: would fit, but may not overtake
    engine.step()
    assert [r.id for r in engine.running] == [first]
    assert [r.id for r in engine.waiting] == [big, small]
    out = engine.run()
    assert len(out[first]) == len(out[big]) == 4 and len(out[small]) == 2


def test_max_batch_and_membership_changing_every_step():
    engine = Engine(random_model("phi"), block_size=4, max_batch=2)
    ids = [engine.add_request([i + 1], n) for i, n in enumerate([1, 3, 2, 4])]
    running = []
    while engine.has_unfinished():
        engine.step()
        check_invariants(engine)
        running.append([r.id for r in engine.running])
    assert max(len(r) for r in running) == 2
    # Step 1: the first two are admitted, and the first finishes in its prefill. Step 2: the
    # third is admitted at once. Step 3: the second and third finish. Step 4: the fourth is
    # admitted, and decodes its last three tokens alone.
    assert running == [[ids[1]], [ids[1], ids[2]], [], [ids[3]], [ids[3]], [ids[3]], []]


def test_cancel_frees_blocks_and_stops_the_request():
    engine = Engine(random_model("mistral"), block_size=2)
    a = engine.add_request(list(range(1, 10)), 20)
    b = engine.add_request([5, 6], 5)
    c = engine.add_request([7], 5)
    engine.step()
    held = engine.blocks_in_use
    engine.cancel(a)  # running
    assert engine.blocks_in_use == held - math.ceil(9 / 2) and engine.free_blocks == engine.num_blocks - engine.blocks_in_use
    engine.cancel(c)  # running (admitted in the same step) or waiting: either way gone
    engine.cancel(12345)  # unknown: nothing happens
    out = engine.run()
    assert set(out) == {b} and engine.blocks_in_use == 0
    assert out[b] == alone("mistral", (5, 6), 5)


@FAMILIES
def test_eos_stops_a_request_with_stop(name):
    prompt = [3, 1, 4, 1, 5]
    full = alone(name, tuple(prompt), 10)
    eos = full[4]
    engine = Engine(random_model(name), block_size=4)
    rid = engine.add_request(prompt, 10, eos_token_id=eos)
    other = engine.add_request([9, 2], 10)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    ends = {o.request_id: o.finish_reason for o in outputs if o.finished}
    got = [o.token for o in outputs if o.request_id == rid]
    assert got == alone(name, tuple(prompt), 10, eos_token_id=eos) and got[-1] == eos
    assert ends == {rid: "stop", other: "length"}


def test_sampling_depends_on_the_seed_not_on_the_batch():
    model = random_model("llama")
    solo = Engine(model, block_size=4)
    rid = solo.add_request([1, 2, 3], 12, temperature=1.0, seed=7)
    alone_tokens = solo.run()[rid]
    crowd = Engine(model, block_size=4)
    crowd.add_request([9, 9, 9, 9, 9], 20, temperature=0.8, seed=1)
    rid = crowd.add_request([1, 2, 3], 12, temperature=1.0, seed=7)
    crowd.add_request([4], 3)
    assert crowd.run()[rid] == alone_tokens
    other = Engine(model, block_size=4)
    rid = other.add_request([1, 2, 3], 12, temperature=1.0, seed=8)
    assert other.run()[rid] != alone_tokens


def test_memory_is_what_the_requests_hold():
    """Blocks in use are the requests' positions rounded up to blocks, far below max-length rows."""
    model = random_model("llama")
    engine = Engine(model, block_size=4)
    for n in (3, 9, 1):
        engine.add_request(list(range(1, n + 1)), 2)
    engine.step()  # the three prefills
    assert engine.blocks_in_use == 1 + 3 + 1
    per_block = engine.kv_bytes_per_block()
    c = model.config
    assert per_block == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * 4  # k and v, fp32


def test_allocator_refuses_double_free_and_overdraw():
    pool = BlockAllocator(2)
    blocks = pool.allocate(2)
    with pytest.raises(RuntimeError, match="only 0 are free"):
        pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="block 0 is freed but not held"):
        pool.free([0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=[], max_new_tokens=3), "non-empty list of token ids"),
    (dict(prompt_ids="hello", max_new_tokens=3), "non-empty list of token ids"),
    (dict(prompt_ids=[1, 256], max_new_tokens=3), r"prompt_ids\[1\]=256 is not a token id"),
    (dict(prompt_ids=[1, -1], max_new_tokens=3), r"prompt_ids\[1\]=-1"),
    (dict(prompt_ids=[1, 2], max_new_tokens=0), "max_new_tokens=0 must be an int >= 1"),
    (dict(prompt_ids=[1, 2], max_new_tokens=True), "max_new_tokens=True"),
    (dict(prompt_ids=list(range(60)), max_new_tokens=10), "needs 70 positions, more than the model's context of 64"),
    (dict(prompt_ids=[1], max_new_tokens=2, temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
    (dict(prompt_ids=[1], max_new_tokens=2, temperature=float("nan")), "temperature=nan"),
    (dict(prompt_ids=[1], max_new_tokens=2, temperature=1.0, top_k=0), "top_k=0 must be None or an int >= 1"),
    (dict(prompt_ids=[1], max_new_tokens=2, temperature=1.0, top_p=1.5), r"top_p=1.5 must be None or a number in \(0, 1\]"),
    (dict(prompt_ids=[1], max_new_tokens=2, eos_token_id=999), "eos_token_id=999 is not a token id"),
])
def test_bad_requests_are_refused_with_the_rule(kwargs, message):
    engine = Engine(random_model("gpt"), block_size=4)
    with pytest.raises(ValueError, match=message):
        engine.add_request(**kwargs)
    assert not engine.has_unfinished()


def test_bad_engines_are_refused():
    model = random_model("llama")
    with pytest.raises(ValueError, match="block_size=0 must be an int >= 1"):
        Engine(model, block_size=0)
    with pytest.raises(ValueError, match="max_batch=0"):
        Engine(model, max_batch=0)
    engine = Engine(model, block_size=4, num_blocks=2)
    with pytest.raises(ValueError, match="needs 3 blocks of 4 positions, more than the engine's num_blocks=2"):
        engine.add_request(list(range(1, 10)), 2)
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            Engine(model)
    finally:
        model.eval()


def test_the_model_still_decodes_alone_after_serving():
    """The engine installs its caches for its own passes; decode sets up its own afterwards."""
    from companion.generation.static_cache import decode

    model = random_model("mistral")
    engine = Engine(model, block_size=4)
    engine.add_request([1, 2, 3], 6)
    engine.run()
    out = decode(model, torch.tensor([[1, 2, 3]]), 6)[0, 3:].tolist()
    assert out == alone("mistral", (1, 2, 3), 6)


def test_trace_is_seeded_and_replay_policies_agree():
    """The trace is reproducible; the three schedules give every request the same tokens, and
    their batches are what the policy says (1; at most max_batch; at most max_batch)."""
    from companion.generation.engine import replay, synthetic_trace

    trace = synthetic_trace(6, rate=50.0, vocab_size=VOCAB, prompt_len=(1, 8), new_tokens=(1, 8), seed=1)
    assert trace == synthetic_trace(6, rate=50.0, vocab_size=VOCAB, prompt_len=(1, 8), new_tokens=(1, 8), seed=1)
    assert trace[0].arrival == 0 and all(a.arrival <= b.arrival for a, b in zip(trace, trace[1:]))
    assert all(1 <= len(r.prompt) <= 8 and 1 <= r.max_new_tokens <= 8 for r in trace)
    model = random_model("llama")
    results = {p: replay(model, trace, p, max_batch=3, block_size=4) for p in ("one-at-a-time", "static", "continuous")}
    solo = {i: alone("llama", tuple(r.prompt), r.max_new_tokens) for i, r in enumerate(trace)}
    for policy, result in results.items():
        assert result.tokens == solo, policy
        assert len(result.ttft) == 6 and all(t >= 0 for t in result.ttft)
        assert max(result.batch_sizes) <= (1 if policy == "one-at-a-time" else 3)
        assert all(used <= contiguous for used, contiguous in zip(result.kv_bytes, result.kv_contiguous_bytes))
    with pytest.raises(ValueError, match="policy='fifo' is not one of"):
        replay(model, trace, "fifo")
