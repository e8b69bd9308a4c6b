"""Greedy and beam search, against brute force over all sequences and against each other."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.generation.beam import beam_search, greedy_search, sequence_log_prob


def bigram_model(table: torch.Tensor):
    """A model whose next-token log-probabilities depend only on the last token."""
    log_table = table.log_softmax(dim=-1)
    return lambda prefix: log_table[prefix[-1]]


def random_model(seed: int, vocab: int, context: int = 2, sharpness: float = 3.0):
    """A random model that looks at the last ``context`` tokens (a lookup of hashed contexts)."""
    g = torch.Generator().manual_seed(seed)
    table = (sharpness * torch.randn(vocab ** context, vocab, generator=g, dtype=torch.float64)).log_softmax(-1)

    def step(prefix):
        last = (prefix[-context:] if len(prefix) >= context else (0,) * (context - len(prefix)) + prefix)
        return table[sum(t * vocab ** i for i, t in enumerate(last))]

    return step


def brute_force(step_fn, start, max_len, eos_id, vocab):
    """The most probable sequence of all: every sequence up to ``max_len`` tokens, scored."""
    best = (-math.inf, None)
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if eos_id in seq[:-1] or (n < max_len and seq[-1] != eos_id):
                continue  # EOS only at the end; shorter sequences must end with EOS
            score = sequence_log_prob(step_fn, start, seq)
            if score > best[0]:
                best = (score, list(seq))
    return best[1], best[0]


# The chapter's example: EOS=0, A=1, B=2, BOS=3.
TABLE = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0], [0.4, 0.3, 0.3, 0.0], [0.9, 0.05, 0.05, 0.0], [0.1, 0.5, 0.4, 0.0]],
    dtype=torch.float64,
)
EXAMPLE = lambda prefix: TABLE.log()[prefix[-1]]  # noqa: E731


def test_beam_finds_a_more_probable_sequence_than_greedy():
    assert greedy_search(EXAMPLE, [3], max_len=5, eos_id=0) == ([1, 0], pytest.approx(math.log(0.2)))
    tokens, lp = beam_search(EXAMPLE, [3], beam_width=2, max_len=5, eos_id=0)
    assert tokens == [2, 0] and lp == pytest.approx(math.log(0.36))


models = st.builds(random_model, seed=st.integers(0, 10_000), vocab=st.integers(2, 5),
                   context=st.integers(1, 2), sharpness=st.sampled_from([0.5, 2.0, 5.0]))


@settings(max_examples=60, deadline=None)
@given(model=models, max_len=st.integers(1, 6), eos=st.booleans())
def test_width_one_is_greedy(model, max_len, eos):
    eos_id = 0 if eos else None
    assert beam_search(model, [1], 1, max_len, eos_id) == greedy_search(model, [1], max_len, eos_id)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 4), max_len=st.integers(1, 4),
       context=st.integers(1, 2))
def test_exhaustive_beam_finds_the_most_probable_sequence(seed, vocab, max_len, context):
    model = random_model(seed, vocab, context)
    tokens, lp = beam_search(model, [1], beam_width=vocab ** max_len, max_len=max_len, eos_id=0)
    best_tokens, best_lp = brute_force(model, (1,), max_len, 0, vocab)
    assert lp == pytest.approx(best_lp, abs=1e-12)
    assert sequence_log_prob(model, [1], tokens) == pytest.approx(best_lp, abs=1e-12)
    g_tokens, g_lp = greedy_search(model, [1], max_len, eos_id=0)
    assert lp >= g_lp - 1e-12  # the optimum is never less probable than greedy's


@settings(max_examples=60, deadline=None)
@given(model=models, width=st.integers(1, 4), max_len=st.integers(1, 2))
def test_beam_never_less_probable_than_greedy_within_two_steps(model, width, max_len):
    # Within two steps the greedy prefix is the best one-token prefix, so it is always in
    # the beam at step 2 and beam search can only match or beat greedy.
    assert beam_search(model, [1], width, max_len, 0)[1] >= greedy_search(model, [1], max_len, 0)[1] - 1e-12


@settings(max_examples=60, deadline=None)
@given(model=models, width=st.integers(1, 4), max_len=st.integers(1, 6), eos=st.booleans())
def test_results_are_well_formed(model, width, max_len, eos):
    eos_id = 0 if eos else None
    for tokens, lp in (beam_search(model, [1], width, max_len, eos_id), greedy_search(model, [1], max_len, eos_id)):
        assert 1 <= len(tokens) <= max_len
        if eos_id is not None:
            assert eos_id not in tokens[:-1]  # nothing after EOS
            if len(tokens) < max_len:
                assert tokens[-1] == eos_id  # only EOS ends a sequence early
        else:
            assert len(tokens) == max_len
        assert lp == pytest.approx(sequence_log_prob(model, [1], tokens), abs=1e-9)


def test_beam_search_is_a_heuristic_it_can_lose_to_greedy():
    # Greedy: A (0.40) then A->X (0.40) then X->EOS (1.0): probability 0.16.
    # Width 2 keeps A and B; at step 2, B->Y and B->Z (0.175 each) push A->X (0.16) out of
    # the beam, and from Y and Z every continuation is spread thin.
    EOS, A, B, C, X, Y, Z, BOS = range(8)
    probs = {
        (BOS,): {A: 0.40, B: 0.35, C: 0.25},
        (BOS, A): {X: 0.40, Y: 0.30, Z: 0.30},
        (BOS, B): {Y: 0.50, Z: 0.50},
        (BOS, A, X): {EOS: 1.0},
    }

    def step(prefix):
        dist = probs.get(tuple(prefix), {t: 1 / 7 for t in range(7)})
        return torch.tensor([dist.get(t, 0.0) for t in range(8)], dtype=torch.float64).log()

    assert greedy_search(step, [BOS], 3, EOS) == ([A, X, EOS], pytest.approx(math.log(0.16)))
    tokens, lp = beam_search(step, [BOS], 2, 3, EOS)
    assert tokens[:2] in ([B, Y], [B, Z]) and lp < math.log(0.16)


def test_length_limit_without_eos_and_early_stop_at_eos():
    model = bigram_model(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]]))
    # 0 -> 1 -> 2 -> 0 -> ...: without EOS the sequences are cut at max_len
    assert greedy_search(model, [0], 4)[0] == [1, 2, 0, 1]
    assert beam_search(model, [0], 3, 4)[0] == [1, 2, 0, 1]
    # with EOS = 0, both stop after emitting it
    assert greedy_search(model, [0], 10, eos_id=0)[0] == [1, 2, 0]
    assert beam_search(model, [0], 3, 10, eos_id=0)[0] == [1, 2, 0]


def test_step_fn_sees_the_whole_prefix():
    seen = []

    def step(prefix):
        seen.append(prefix)
        return torch.tensor([0.0, -1.0]).log_softmax(-1)

    greedy_search(step, [5, 6], 2)
    assert seen == [(5, 6), (5, 6, 0)]


def test_clear_errors():
    model = bigram_model(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="beam_width=0"):
        beam_search(model, [0], 0, 5)
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(model, [0], 1.5, 5)
    with pytest.raises(ValueError, match="start is empty"):
        greedy_search(model, [], 5)
    with pytest.raises(ValueError, match="max_len=0"):
        beam_search(model, [0], 2, 0)
    with pytest.raises(ValueError, match="eos_id=7"):
        greedy_search(model, [0], 5, eos_id=7)
    with pytest.raises(ValueError, match="1-D tensor"):
        greedy_search(lambda p: torch.zeros(2, 3), [0], 5)
    with pytest.raises(ValueError, match="token 9"):
        sequence_log_prob(model, [0], [9])


# ---- length normalisation ------------------------------------------------------------------


def brute_force_normalised(step_fn, start, max_len, eos_id, vocab, alpha):
    """The sequence with the best total / length ** alpha over every sequence up to max_len."""
    best = (-math.inf, None)
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if eos_id in seq[:-1] or (n < max_len and seq[-1] != eos_id):
                continue
            score = sequence_log_prob(step_fn, start, seq) / n ** alpha
            if score > best[0]:
                best = (score, list(seq))
    return best[1], best[0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 4), max_len=st.integers(1, 4),
       alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
def test_exhaustive_beam_with_length_penalty_finds_the_best_normalised_sequence(seed, vocab, max_len, alpha):
    # The early stop must not cut off a live prefix that could still win once normalised.
    model = random_model(seed, vocab)
    tokens, lp = beam_search(model, [1], vocab ** max_len, max_len, eos_id=0, length_penalty=alpha)
    best_tokens, best_score = brute_force_normalised(model, (1,), max_len, 0, vocab, alpha)
    assert lp / len(tokens) ** alpha == pytest.approx(best_score, abs=1e-12)
    assert lp == pytest.approx(sequence_log_prob(model, [1], tokens), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(model=models, width=st.integers(1, 4), max_len=st.integers(1, 6), eos=st.booleans())
def test_zero_length_penalty_is_the_plain_search(model, width, max_len, eos):
    eos_id = 0 if eos else None
    plain = beam_search(model, [1], width, max_len, eos_id)
    assert beam_search(model, [1], width, max_len, eos_id, length_penalty=0.0) == plain
    assert beam_search(model, [1], width, max_len, eos_id, length_penalty=0) == plain


@settings(max_examples=60, deadline=None)
@given(model=models, width=st.integers(1, 4), max_len=st.integers(1, 6), alpha=st.floats(0.1, 3.0))
def test_length_penalty_results_are_well_formed(model, width, max_len, alpha):
    tokens, lp = beam_search(model, [1], width, max_len, 0, length_penalty=alpha)
    assert 1 <= len(tokens) <= max_len and 0 not in tokens[:-1]
    assert len(tokens) == max_len or tokens[-1] == 0
    assert lp == pytest.approx(sequence_log_prob(model, [1], tokens), abs=1e-9)  # the raw total


def test_length_penalty_undoes_the_short_output_bias():
    # The chapter's model: it should answer with three letters. The empty answer (EOS at
    # once) has probability 0.4; the best three-letter answer, A A A EOS, has
    # 0.35 * 0.5 * 0.6 * 0.9 = 0.0945, although the eight of them together have 0.4374.
    EOS, A, B, BOS = range(4)
    rows = {0: [0.40, 0.35, 0.25, 0.0], 1: [0.10, 0.50, 0.40, 0.0], 2: [0.10, 0.60, 0.30, 0.0]}

    def model(prefix):
        probs = rows.get(len(prefix) - 1, [0.90, 0.05, 0.05, 0.0])
        return torch.tensor(probs, dtype=torch.float64).log()

    # The plain total prefers the empty answer, even with a beam that holds every prefix:
    # the bias is in the score, not in the search.
    for width in (2, 4 ** 6):
        assert beam_search(model, [BOS], width, 6, EOS) == ([EOS], pytest.approx(math.log(0.4)))
        assert beam_search(model, [BOS], width, 6, EOS, length_penalty=0.5)[0] == [EOS]
    # Divided by the length, -0.92 for the empty answer against log(0.0945) / 4 = -0.59.
    tokens, lp = beam_search(model, [BOS], 2, 6, EOS, length_penalty=1.0)
    assert tokens == [A, A, A, EOS] and lp == pytest.approx(math.log(0.0945))


def test_length_penalty_errors():
    model = bigram_model(torch.zeros(3, 3))
    for bad in (-0.5, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="length_penalty"):
            beam_search(model, [0], 2, 3, 0, length_penalty=bad)
