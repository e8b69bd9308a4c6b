"""companion.generation.batching: a batch of prompts of different lengths gives each prompt's own tokens.

For the four families (Llama, Mistral with a window of 4, shorter than the prompts and the
generations, Phi, and chapter 7's GPT), with small random float32 models and greedy decoding:

* every row of ``generate_batch`` equals its prompt generated alone, by the plain uncached
  loop of :func:`companion.generation.sampling.generate` (which shares no cache or padding code with
  the batch), over lengths drawn by hypothesis (1 included, and past Mistral's window);
* with an eos token, a row that produces it stops there (the eos included), the other rows
  go on, and every row still equals its prompt alone with the same eos;
* below the tokens, the left-padded logits equal each prompt's own, with and without a cache.

Hypothesis draws its examples from a fixed seed (``derandomize=True``): the tokens are compared
exactly, and a fixed set of examples keeps the suite from meeting, one run in many, a step
where two logits tie to within rounding.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import MODELS, VOCAB, WINDOW, random_model
from hypothesis import example, given, settings
from hypothesis import strategies as st

from companion.generation.batching import generate_batch, left_pad_batch
from companion.generation.sampling import generate

FAMILIES = pytest.mark.parametrize("name", MODELS)
EXAMPLES = settings(max_examples=10, deadline=None, derandomize=True)
LENGTHS = st.lists(st.integers(1, 3 * WINDOW), min_size=1, max_size=5)  # prompt lengths, 1 to 3 windows


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def alone(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The new tokens of ``prompt`` generated on its own, greedily, without a cache."""
    out = generate(model, torch.tensor([prompt]), max_new_tokens, temperature=0.0, eos_token_id=eos_token_id)
    return out[0, len(prompt):].tolist()


# ---- each row equals its prompt alone --------------------------------------------------------


@FAMILIES
@EXAMPLES
@given(lengths=LENGTHS, max_new_tokens=st.integers(0, 3 * WINDOW), seed=st.integers(0, 2**16))
@example(lengths=[1], max_new_tokens=3 * WINDOW, seed=0)  # a one-token prompt, generating past the window
@example(lengths=[1, 3 * WINDOW, 2, 1], max_new_tokens=2 * WINDOW + 1, seed=1)  # much padding on some rows
def test_each_row_equals_its_prompt_generated_alone(name, lengths, max_new_tokens, seed):
    model = random_model(name)
    prompts = random_prompts(lengths, seed)
    batch = generate_batch(model, prompts, max_new_tokens)
    assert [len(row) for row in batch] == [max_new_tokens] * len(prompts)
    for prompt, row in zip(prompts, batch):
        assert row == alone(model, prompt, max_new_tokens)


@FAMILIES
def test_the_generations_are_varied_not_one_repeated_token(name):
    """Equal tokens would prove little if every row repeated one token: these models do not."""
    rows = generate_batch(random_model(name), random_prompts([3, 9, 1], seed=2), 3 * WINDOW)
    assert all(len(set(row)) > 3 for row in rows)


# ---- rows that hit eos stop, the others go on -------------------------------------------------


@FAMILIES
@EXAMPLES
@given(lengths=LENGTHS, max_new_tokens=st.integers(2, 3 * WINDOW), seed=st.integers(0, 2**16),
       pick=st.integers(0, 2**16))
@example(lengths=[1, 2 * WINDOW + 1, 3], max_new_tokens=3 * WINDOW, seed=3, pick=1)
def test_rows_that_hit_eos_stop_and_the_others_go_on(name, lengths, max_new_tokens, seed, pick):
    model = random_model(name)
    prompts = random_prompts(lengths, seed)
    free = generate_batch(model, prompts, max_new_tokens)
    row, step = pick % len(prompts), min(pick % 3, max_new_tokens - 1)
    eos = free[row][step]  # a token that `row` produces at `step` (or earlier)
    stopped = generate_batch(model, prompts, max_new_tokens, eos_token_id=eos)
    assert stopped[row][-1] == eos and len(stopped[row]) <= step + 1
    for prompt, free_row, stopped_row in zip(prompts, free, stopped):
        # a row stops at its first eos, eos included; a row without eos keeps all its tokens
        until_eos = free_row[: free_row.index(eos) + 1] if eos in free_row else free_row
        assert stopped_row == until_eos
        assert stopped_row == alone(model, prompt, max_new_tokens, eos_token_id=eos)


@FAMILIES
def test_a_finished_row_leaves_the_batch(name):
    model = random_model(name)
    for seed in range(100):  # prompts for which only row 1 produces the eos token
        prompts = random_prompts([2, 2 * WINDOW + 1, 1], seed=seed)
        free = generate_batch(model, prompts, 10)
        eos = free[1][1]  # row 1 stops at its second token at the latest
        if eos not in free[0] and eos not in free[2]:
            break
    calls = []  # (rows, start_pos) of every forward call, chunks of a prompt included

    def record(module, args, kwargs):
        calls.append((args[0].size(0), kwargs["start_pos"]))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        stopped = generate_batch(model, prompts, 10, eos_token_id=eos)
    finally:
        hook.remove()
    first = free[1].index(eos)
    assert stopped == [free[0], free[1][: first + 1], free[2]]  # row 1 stopped; rows 0 and 2 went on
    # after the prompts (9 columns), one step per token: 3 rows until row 1's eos, then 2
    assert [rows for rows, start in calls if start >= 9] == [3] * first + [2] * (9 - first)


# ---- below the tokens: the logits of a left-padded batch ------------------------------------


@FAMILIES
@pytest.mark.parametrize("cached", [False, True])
def test_left_padded_logits_equal_each_prompts_own(name, cached):
    model = random_model(name)
    prompts = random_prompts([1, 3 * WINDOW, 5, 2], seed=5)
    idx, left_pad = left_pad_batch(prompts)
    T = idx.size(1)
    with torch.no_grad():
        if cached:
            model.setup_cache(len(prompts), T + 1)
            logits = model(idx, start_pos=0, left_pad=left_pad)
        else:
            logits = model(idx, left_pad=left_pad)
        assert not logits.isnan().any()  # padding queries see their own slot: no 0/0 anywhere
        for row, prompt in enumerate(prompts):
            own = model(torch.tensor([prompt]))[0]  # (len, V)
            torch.testing.assert_close(logits[row, T - len(prompt):], own, rtol=0, atol=1e-5)


# ---- sampling and errors ---------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_generator():
    model = random_model("llama")
    prompts = random_prompts([4, 1, 7], seed=6)

    def sample(seed):
        return generate_batch(model, prompts, 8, temperature=0.8, top_k=20, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    assert first == sample(0)
    assert [len(row) for row in first] == [8, 8, 8]
    assert all(0 <= t < VOCAB for row in first for t in row)
    assert first != sample(1)


def test_zero_new_tokens_gives_empty_rows():
    assert generate_batch(random_model("phi"), [[1, 2], [3]], 0) == [[], []]


@pytest.mark.parametrize("prompts,max_new_tokens,kwargs,match", [
    ([], 3, {}, r"prompts=\[\] must be a non-empty list"),
    ([[1, 2], []], 3, {}, r"prompts\[1\] is empty"),
    ([[1, 256]], 3, {}, r"prompts\[0\]\[1\]=256 is not a token id: ids are ints in \[0, 256\)"),
    ([[-1]], 3, {}, r"prompts\[0\]\[0\]=-1 is not a token id"),
    ([[1.5]], 3, {}, r"prompts\[0\]\[0\]=1.5 is not a token id"),
    ([[1]], -1, {}, r"max_new_tokens=-1 must be an int >= 0"),
    ([[1] * 60], 10, {}, r"needs 70 positions, more than the model's context of 64"),
    ([[1]], 3, dict(eos_token_id=256), r"eos_token_id=256 is not a token id"),
    ([[1]], 3, dict(temperature=-1.0), r"temperature=-1.0 must be >= 0"),
])
def test_bad_arguments_are_named(prompts, max_new_tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_batch(random_model("gpt"), prompts, max_new_tokens, **kwargs)


def test_left_pad_must_have_one_entry_per_row():
    model = random_model("llama")
    with pytest.raises(ValueError, match=r"left_pad must have one entry per row, shape \(2,\), got \(3,\)"):
        model(torch.zeros(2, 3, dtype=torch.long), left_pad=torch.zeros(3, dtype=torch.long))
