"""companion.generation.sampling: greedy, temperature, top-k, top-p, stopping, seeding, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.generation.sampling import generate, sample_next, top_k_filter, top_p_filter
from companion.gpt import GPT, GPTConfig


class Bigram(torch.nn.Module):
    """Logits of the next token depend only on the current one: a fixed (V, V) table."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.calls = []

    def forward(self, idx):
        self.calls.append(idx.shape[1])
        return self.table[idx]  # (B, T, V)


def random_table(V=11, seed=0):
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3


def nucleus(probs, p):
    """The smallest set of most likely tokens whose probability reaches p (brute force)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, total = set(), 0.0
    for i in order:
        kept.add(i)
        total += probs[i]
        if total >= p:
            break
    return kept


# ---- greedy and temperature ------------------------------------------------------------------


def test_greedy_follows_the_argmax_chain():
    table = random_table()
    out = generate(Bigram(table), torch.tensor([[3]]), 6, temperature=0.0)
    chain = [3]
    for _ in range(6):
        chain.append(int(table[chain[-1]].argmax()))
    assert out[0].tolist() == chain


@pytest.mark.parametrize("temperature", [1e-3, 1e-5])
def test_temperature_to_zero_equals_greedy(temperature):
    table = random_table(V=50, seed=1)
    prompt = torch.arange(8)[:, None]
    greedy = generate(Bigram(table), prompt, 20, temperature=0.0)
    cold = generate(Bigram(table), prompt, 20, temperature=temperature,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)


def test_high_temperature_flattens_the_distribution():
    logits = torch.tensor([[2.0, 0.0, -2.0]]).repeat(20_000, 1)
    g = torch.Generator().manual_seed(0)
    hot = torch.bincount(sample_next(logits, 100.0, generator=g), minlength=3) / 20_000
    warm = torch.bincount(sample_next(logits, 1.0, generator=g), minlength=3) / 20_000
    assert (hot - 1 / 3).abs().max() < 0.02
    torch.testing.assert_close(warm, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


# ---- top-k ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_never_samples_outside_the_k_most_likely(k):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(k))
    allowed = [set(torch.topk(row, k).indices.tolist()) for row in logits]
    g = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(4)]
    for _ in range(400):
        tokens = sample_next(logits, 1.5, top_k=k, generator=g)
        for row, t in enumerate(tokens.tolist()):
            assert t in allowed[row]
            seen[row].add(t)
    assert seen == allowed  # and each of the k is reachable


def test_top_k_filter_values_and_large_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert top_k_filter(logits, 2).tolist() == [[float("-inf"), 3.0, 2.0, float("-inf")]]
    assert torch.equal(top_k_filter(logits, 10), logits)


# ---- top-p ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=12, unique=True),
    p=st.floats(0.05, 0.99),
)
def test_top_p_keeps_exactly_the_smallest_nucleus(probs, p):
    probs = torch.tensor(probs, dtype=torch.float64)
    probs = probs / probs.sum()
    kept = torch.isfinite(top_p_filter(probs.log()[None], p))[0]
    want = nucleus(probs.tolist(), p)
    # float rounding can only matter when a cumulative sum sits on p itself
    cums = probs.sort(descending=True).values.cumsum(0)
    if (cums - p).abs().min() > 1e-9:
        assert set(torch.nonzero(kept).flatten().tolist()) == want


def test_top_p_never_samples_outside_the_nucleus_and_renormalises():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().repeat(30_000, 1)
    tokens = sample_next(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 3, 4}  # 0.4 + 0.3 = 0.7 < 0.8, so 0.15 is needed
    freq = torch.bincount(tokens, minlength=5).float() / 30_000
    torch.testing.assert_close(freq[[1, 3, 4]], torch.tensor([0.4, 0.3, 0.15]) / 0.85, atol=0.01, rtol=0)


def test_top_p_one_keeps_everything_and_tiny_p_keeps_the_argmax():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    kept = torch.isfinite(top_p_filter(logits, 1e-9))
    assert kept.sum(-1).tolist() == [1, 1, 1]
    assert torch.equal(kept.float().argmax(-1), logits.argmax(-1))


def test_top_k_and_top_p_together_keep_the_intersection():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    tokens = sample_next(probs.log().repeat(5000, 1), 1.0, top_k=2, top_p=0.99,
                         generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}


# ---- seeding, stopping, cropping -------------------------------------------------------------


def test_seeded_runs_repeat_and_other_seeds_differ():
    model = Bigram(random_table(V=40, seed=2) / 3)
    prompt = torch.zeros(2, 1, dtype=torch.long)

    def run(seed):
        return generate(model, prompt, 30, temperature=1.0, top_k=20, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_stops_at_max_new_tokens():
    out = generate(Bigram(random_table()), torch.tensor([[1, 2], [3, 4]]), 9, temperature=0.0)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :2], torch.tensor([[1, 2], [3, 4]]))
    assert generate(Bigram(random_table()), torch.tensor([[1]]), 0).tolist() == [[1]]


def test_stops_at_end_of_text_and_pads_finished_rows():
    V, eos = 6, 5
    table = torch.full((V, V), -10.0)
    for a, b in [(0, 1), (1, eos), (2, 3), (3, 4), (4, eos), (eos, 0)]:  # 0 -> 1 -> eos; 2 -> 3 -> 4 -> eos
        table[a, b] = 10.0
    out = generate(Bigram(table), torch.tensor([[0], [2]]), 50, temperature=0.0, eos_token_id=eos)
    assert out.tolist() == [[0, 1, eos, eos], [2, 3, 4, eos]]  # stopped once every row ended
    alone = generate(Bigram(table), torch.tensor([[0]]), 50, temperature=0.0, eos_token_id=eos)
    assert alone.tolist() == [[0, 1, eos]]


def test_context_length_crops_the_model_input():
    model = Bigram(random_table())
    generate(model, torch.zeros(1, 3, dtype=torch.long), 10, temperature=0.0, context_length=5)
    assert model.calls == [3, 4, 5, 5, 5, 5, 5, 5, 5, 5]


def test_gpt_generates_past_its_context_when_cropped():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_positions=8)).eval()
    prompt = torch.randint(0, 128, (2, 5))
    out = generate(model, prompt, 12, temperature=0.0, context_length=8)
    assert out.shape == (2, 17)
    manual = prompt
    for _ in range(12):
        nxt = model(manual[:, -8:])[:, -1].argmax(-1, keepdim=True)
        manual = torch.cat([manual, nxt], 1)
    assert torch.equal(out, manual)
    with pytest.raises(ValueError, match="n_positions"):
        generate(model, prompt, 12, temperature=0.0)  # without cropping the model says why


def test_gpt_returns_a_tuple_or_logits_either_way():
    class TupleModel(Bigram):
        def forward(self, idx):
            return super().forward(idx), None

    table = random_table()
    a = generate(TupleModel(table), torch.tensor([[2]]), 5, temperature=0.0)
    b = generate(Bigram(table), torch.tensor([[2]]), 5, temperature=0.0)
    assert torch.equal(a, b)


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
])
def test_bad_sampling_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_next(torch.randn(2, 5), **{"temperature": 1.0, **kwargs})


def test_bad_generate_arguments_are_named():
    model = Bigram(random_table())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        generate(model, torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, torch.tensor([[1.0]]), 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, torch.tensor([[1]]), -1)
    with pytest.raises(ValueError, match="context_length=0"):
        generate(model, torch.tensor([[1]]), 2, context_length=0)
    with pytest.raises(ValueError, match="setup_cache"):
        generate(model, torch.tensor([[1]]), 2, use_cache=True)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_next(torch.randn(1, 2, 5))
