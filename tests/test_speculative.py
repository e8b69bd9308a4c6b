"""companion.generation.speculative: the target's own tokens (greedy) and the target's own distribution (sampling).

Oracles: greedy speculative decoding must give exactly ``decode(target, ...)``, whatever the
draft; the rejection step must emit a token distributed exactly as the target's softmax
(checked analytically on arbitrary distributions, and empirically with a chi-square test
over seeded runs of the whole loop on a vocabulary of 8 tokens).
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.generation.static_cache import decode
from companion.generation.sampling import generate
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig
from companion.phi import Phi, PhiConfig
from companion.generation.speculative import (SpeculativeStats, accept_or_resample, acceptance_probability,
                                   residual_distribution, speculative_generate)

WINDOW = 8
FAMILIES = {
    "llama": lambda: Llama(LlamaConfig.preset("tiny", num_key_value_heads=2)),
    "mistral": lambda: Mistral(MistralConfig.preset("tiny", sliding_window=WINDOW)),
    "phi": lambda: Phi(PhiConfig.preset("tiny")),
}
PROMPT = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
T = PROMPT.size(1)
N = 23  # new tokens: prime, so not a multiple of k + 1 for any k in 1..8; past the end of Mistral's window


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that the model's greedy tokens vary (norms away from 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = (1.0, 0.2) if "norm" in name and name.endswith("weight") else (0.0, 0.1)
            p.copy_(mean + std * torch.randn(p.shape, generator=gen))
    return model.eval()


def random_model(family: str, seed: int) -> torch.nn.Module:
    return randomize(FAMILIES[family](), seed)


def noisy_copy(model: torch.nn.Module, sigma: float = 0.01, seed: int = 1) -> torch.nn.Module:
    """The same model with a little noise on every weight: it agrees with ``model`` part of the time."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * sigma)
    return draft


def constant_draft(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose output layer is zero: every logit ties, so it always proposes token 0."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.lm_head.parameters():
            p.zero_()
    return draft


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """A target, four drafts and the target's own greedy tokens, built once per family."""
    target = random_model(request.param, seed=0)
    reference = decode(target, PROMPT, N)
    assert len(set(reference[0, T:].tolist())) > 5  # not a degenerate run of one token
    drafts = {"noisy copy": noisy_copy(target), "other model": random_model(request.param, seed=1),
              "itself": target, "constant": constant_draft(target)}
    return request.param, target, drafts, reference


# ---- greedy: exactly the target's tokens -----------------------------------------------------

@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_gives_the_targets_own_tokens_whatever_the_draft(family, k):
    name, target, drafts, reference = family
    stats = {}
    for label, draft in drafts.items():
        s = stats[label] = SpeculativeStats()
        out = speculative_generate(target, draft, PROMPT, N, k=k, stats=s)
        assert torch.equal(out, reference), f"{name}, k={k}, draft: {label}"
        assert s.new_tokens == N and s.target_calls == s.rounds + 1  # the prompt, then one pass per round
    # The target as its own draft is always right: every round yields all its proposals and the
    # bonus token, k + 1 tokens (fewer in the last round, which never goes past N).
    s = stats["itself"]
    assert s.accepted == s.proposed == N - s.rounds and s.rounds == math.ceil(N / (k + 1))
    # The constant draft proposes token 0, which the target never picks: every round is rejected
    # at its first proposal and yields the target's token alone.
    assert 0 not in reference[0, T:].tolist()
    s = stats["constant"]
    assert s.accepted == 0 and s.rounds == N
    assert s.proposed == sum(min(k, N - 1 - i) for i in range(N))  # the last round proposes nothing
    # The noisy copy is right part of the time: rounds accept some proposals and rewind after others.
    s = stats["noisy copy"]
    assert 0 < s.accepted < s.proposed


@pytest.mark.parametrize("name", ["llama", "phi"])
def test_eos_stops_exactly_as_decode_and_generate_do(name):
    target = random_model(name, seed=0)
    free = decode(target, PROMPT, N)
    eos = int(free[0, T + 6])  # produced at the seventh step, or earlier
    first = free[0, T:].tolist().index(eos)
    expected = decode(target, PROMPT, N, eos_token_id=eos)
    assert torch.equal(expected, free[:, : T + first + 1])
    assert torch.equal(generate(target, PROMPT, N, temperature=0, eos_token_id=eos, use_cache=True), expected)
    # eos as an accepted proposal in the middle of a round (the target as its own draft, k = 8),
    # and as the target's correction of a rejected one (the constant draft)
    for draft in (target, noisy_copy(target), constant_draft(target)):
        for k in (1, 3, 8):
            stats = SpeculativeStats()
            out = speculative_generate(target, draft, PROMPT, N, k=k, eos_token_id=eos, stats=stats)
            assert torch.equal(out, expected), f"k={k}"
            assert stats.new_tokens == first + 1


def test_the_end_of_generation_and_the_cache_length():
    """A round never produces more than asked, and the caches never need more than T + n positions."""
    target = randomize(Llama(LlamaConfig.preset("tiny", max_position_embeddings=16)), seed=0)
    draft = noisy_copy(target)
    prompt = PROMPT[:, :3]
    for n in (0, 1, 2, 13):  # 13: prompt plus new tokens fill max_position_embeddings exactly
        out = speculative_generate(target, target, prompt, n, k=8)
        assert out.shape == (1, 3 + n)
        if n:
            assert torch.equal(out, decode(target, prompt, n))
            assert torch.equal(speculative_generate(target, draft, prompt, n, k=8), out)
    assert target.layers[0].self_attn.cache.max_seq_len == 16
    with pytest.raises(ValueError, match="needs 17 positions.*max_position_embeddings=16"):
        speculative_generate(target, draft, prompt, 14)


def test_a_one_token_prompt_has_nothing_to_prefill():
    target = random_model("llama", seed=0)
    prompt = PROMPT[:, :1]
    stats = SpeculativeStats()
    out = speculative_generate(target, noisy_copy(target), prompt, 12, k=3, stats=stats)
    assert torch.equal(out, decode(target, prompt, 12))
    assert stats.target_calls == stats.rounds


def test_stats_add_up_over_calls():
    target = random_model("llama", seed=0)
    stats = SpeculativeStats()
    for _ in range(2):
        speculative_generate(target, target, PROMPT, 9, k=4, stats=stats)
    # Per call: the prompt (one pass of each model); a round of 4 proposals (4 draft passes) that
    # yields 5 tokens; a last round of 3 proposals, the draft first catching up on 2 tokens in one
    # pass (its 4th proposal and the bonus), that yields 4 tokens.
    assert stats == SpeculativeStats(rounds=4, proposed=14, accepted=14, target_calls=6, draft_calls=16,
                                     new_tokens=18)
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_round == 4.5


# ---- the caches: rewinding by position ------------------------------------------------------

def test_a_rolling_cache_cannot_be_rewound_so_mistral_gets_a_full_one():
    """Why ``rolling=False``: rejected positions in a rolling cache overwrite keys still needed."""
    model = random_model("mistral", seed=0)  # window of 8
    seq = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    rejected = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        truth = model(seq)[0, -1]
        results = {}
        for rolling in (True, False):
            model.setup_cache(1, 16, rolling=rolling)
            model(seq[:, :10], start_pos=0)
            model(rejected, start_pos=10)  # a verification pass whose proposals are all rejected
            model(seq[:, 10:11], start_pos=10)  # the correction, then the next token, at their positions
            results[rolling] = model(seq[:, 11:12], start_pos=11)[0, -1]
    assert torch.allclose(results[False], truth, atol=1e-5)
    assert not torch.allclose(results[True], truth, atol=1e-3)


def test_a_model_that_keeps_a_rolling_cache_is_refused():
    class RollingOnly(Mistral):
        def setup_cache(self, batch_size, max_seq_len):
            super().setup_cache(batch_size, max_seq_len, rolling=True)

    model = RollingOnly(MistralConfig.preset("tiny", sliding_window=WINDOW)).eval()
    with pytest.raises(ValueError, match="RollingOnly.*rolling KV cache"):
        speculative_generate(model, model, PROMPT, 4)


# ---- sampling: exactly the target's distribution --------------------------------------------

def distributions(max_vocab=6):
    """Pairs (p, q) of distributions over 1..max_vocab tokens, with zeros and ties allowed."""
    weights = st.lists(st.sampled_from([0.0, 0.0, 0.1, 0.25, 0.5, 1.0, 3.0]) | st.floats(0.0, 5.0),
                       min_size=1, max_size=max_vocab)

    def pair(w):
        return st.tuples(st.just(w), st.lists(st.floats(0.0, 5.0) | st.just(0.0), min_size=len(w),
                                              max_size=len(w)))

    def normalise(w):
        t = torch.tensor(w, dtype=torch.float64)
        return t / t.sum() if t.sum() > 0 else None

    return (weights.flatmap(pair)
            .map(lambda pq: (normalise(pq[0]), normalise(pq[1])))
            .filter(lambda pq: pq[0] is not None and pq[1] is not None))


@settings(max_examples=200, deadline=None, database=None)
@given(distributions())
def test_the_emitted_token_is_distributed_as_the_target_exactly(pq):
    """Sum over the draft's proposal x: q(x) [a(x) one_hot(x) + (1 - a(x)) residual] equals p."""
    p, q = pq
    V = p.numel()
    residual = residual_distribution(p, q)
    emitted = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        if q[x] == 0:  # the draft never proposes x
            continue
        a = acceptance_probability(p, q, torch.tensor(x))
        emitted += q[x] * (a * torch.nn.functional.one_hot(torch.tensor(x), V) + (1 - a) * residual)
    assert torch.allclose(emitted, p, atol=1e-12), (p, q, emitted)
    if not torch.equal(p, q):
        assert torch.isclose(residual.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_accept_or_resample_accepts_exactly_below_the_acceptance_probability():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.5, 0.25, 0.25]])
    a = float(acceptance_probability(p[0], q[0], torch.tensor(0)))  # p/q = 0.2
    assert a == pytest.approx(0.2)
    # u uniform in [0, 1) is below a with probability a
    assert accept_or_resample(p, q, torch.tensor([0]), torch.tensor([a - 1e-6]))[0] == 1
    n, token = accept_or_resample(p, q, torch.tensor([0]), torch.tensor([a]))
    assert n == 0 and token in (1, 2)  # redrawn from max(0, p - q) = [0, 0.35, 0.05], never 0
    # a token the target likes more than the draft is always kept (p/q >= 1)
    assert accept_or_resample(p, q, torch.tensor([1]), torch.tensor([0.999]))[0] == 1


def test_accept_or_resample_draws_from_the_residual_or_the_bonus_position():
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    p = torch.softmax(torch.randn(4, 8, generator=gen()), -1)
    q = torch.softmax(torch.randn(3, 8, generator=gen()), -1)
    drafts = torch.tensor([1, 2, 3])
    a = acceptance_probability(p[:3], q, drafts)
    # accept the first, reject the second: the third is not looked at, the token comes from the residual
    u = torch.stack([a[0] * 0.5, a[1] + (1 - a[1]) * 0.5, torch.tensor(0.0)])
    n, token = accept_or_resample(p, q, drafts, u, gen())
    assert n == 1
    assert token == int(torch.multinomial(residual_distribution(p[1], q[1]), 1, generator=gen()))
    # accept all three: the bonus token comes from the target's last position
    n, token = accept_or_resample(p, q, drafts, torch.zeros(3), gen())
    assert n == 3 and token == int(torch.multinomial(p[3], 1, generator=gen()))
    with pytest.raises(ValueError, match="k=3 proposals"):
        accept_or_resample(p[:3], q, drafts, torch.zeros(3))


@settings(max_examples=50, deadline=None, database=None)
@given(st.integers(1, 6), st.integers(2, 5), st.data())
def test_greedy_is_the_one_hot_case_of_accept_or_resample(k, V, data):
    """With one-hot p and q, the rule is: keep proposals while they are the target's argmax."""
    choice = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=k + 1, max_size=k + 1)))
    drafts = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=k, max_size=k)))
    u = torch.tensor(data.draw(st.lists(st.floats(0.0, 0.999), min_size=k, max_size=k)))
    one_hot = lambda t: torch.nn.functional.one_hot(t, V).double()  # noqa: E731
    n, token = accept_or_resample(one_hot(choice), one_hot(drafts), drafts, u)
    agree = (drafts == choice[:k]).tolist() + [False]
    assert n == agree.index(False) and token == int(choice[n])


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's test; cells expected fewer than 5 times are pooled into one."""
    expected = expected_probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def vocab8_model(seed: int) -> Llama:
    return randomize(Llama(LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)),
                     seed)


@pytest.mark.parametrize("k", [1, 2])
def test_sampling_follows_the_targets_distribution(k):
    """Over 1500 seeded runs, the first two tokens follow the target's softmax: p-value > 1e-3.

    k = 1: the second token is the bonus token, or comes from a second round after a rejection;
    k = 2: it is the second proposal, accepted or redrawn from the residual. The seed is fixed,
    so the test is deterministic; under the null hypothesis a seed fails with probability 1e-3.
    """
    target, draft, temperature, runs = vocab8_model(0), vocab8_model(1), 0.8, 1500
    prompt = torch.tensor([[3]])
    with torch.no_grad():
        p1 = torch.softmax(target(prompt)[0, -1] / temperature, -1)  # (8,)
        q1 = torch.softmax(draft(prompt)[0, -1] / temperature, -1)
        after = torch.cat([prompt.expand(8, 1), torch.arange(8)[:, None]], dim=1)  # every first token
        p2 = torch.softmax(target(after)[:, -1] / temperature, -1)  # (8, 8): p(second | first)
    assert (p1 - q1).abs().sum() / 2 > 0.3  # the draft is far from the target: rejections happen
    gen = torch.Generator().manual_seed(1234)
    first, pairs = torch.zeros(8), torch.zeros(64)
    stats = SpeculativeStats()
    for _ in range(runs):
        out = speculative_generate(target, draft, prompt, 3, k=k, temperature=temperature, generator=gen,
                                   stats=stats)
        a, b = out[0, 1:3].tolist()
        first[a] += 1
        pairs[8 * a + b] += 1
    assert 0.2 < stats.acceptance_rate < 0.9
    assert chi_square_p_value(first, p1) > 1e-3
    assert chi_square_p_value(pairs, (p1[:, None] * p2).flatten()) > 1e-3
    # the test has power: the draft's own distribution is rejected outright
    assert chi_square_p_value(first, q1) < 1e-6


def test_sampling_is_reproducible_with_a_generator():
    target, draft = vocab8_model(0), vocab8_model(1)
    runs = [speculative_generate(target, draft, torch.tensor([[3]]), 6, k=3, temperature=1.0,
                                 generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*runs)


# ---- bad input ------------------------------------------------------------------------------

def test_bad_input_is_refused_with_the_value_and_the_rule():
    target = random_model("llama", seed=0)
    draft = noisy_copy(target)
    with pytest.raises(ValueError, match=r"idx must be a \(1, T\).*\(2, 5\)"):
        speculative_generate(target, draft, PROMPT.repeat(2, 1), 4)
    with pytest.raises(ValueError, match=r"idx must be a \(1, T\).*\(5,\)"):
        speculative_generate(target, draft, PROMPT[0], 4)
    with pytest.raises(ValueError, match=r"idx must be a \(1, T\).*torch.float32"):
        speculative_generate(target, draft, PROMPT.float(), 4)
    with pytest.raises(ValueError, match="idx is empty"):
        speculative_generate(target, draft, PROMPT[:, :0], 4)
    for k in (0, -1, 2.0):
        with pytest.raises(ValueError, match=rf"k={k!r} must be an int >= 1"):
            speculative_generate(target, draft, PROMPT, 4, k=k)
    with pytest.raises(ValueError, match=r"max_new_tokens=-1 must be an int >= 0"):
        speculative_generate(target, draft, PROMPT, -1)
    with pytest.raises(ValueError, match=r"temperature=-0.5 must be >= 0"):
        speculative_generate(target, draft, PROMPT, 4, temperature=-0.5)
    small = Llama(LlamaConfig.preset("tiny", vocab_size=128))
    with pytest.raises(ValueError, match="target's vocab_size=256 and the draft's vocab_size=128 differ"):
        speculative_generate(target, small, PROMPT, 4)

    class NoCache(torch.nn.Module):  # a model that can only run whole sequences
        config = target.config

    with pytest.raises(ValueError, match="draft model, a NoCache, has no setup_cache"):
        speculative_generate(target, NoCache(), PROMPT, 4)
