"""companion.evaluate: sliding-window perplexity against cross-entropy computed directly and
against Hugging Face's "perplexity of fixed-length models" recipe."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.checkpoint import load_hf_state_dict
from companion.evaluate import Score, perplexity, score, windows
from companion.llama import Llama, LlamaConfig, hf_tensor_shapes

CONFIG = LlamaConfig.preset("tiny", max_position_embeddings=64)


@pytest.fixture(scope="module")
def pair():
    """Hugging Face's Llama with random weights and ours with the same weights."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG.to_hf(), attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 1.0)
    return hf, load_hf_state_dict(Llama(CONFIG).eval(), hf.state_dict(), hf_tensor_shapes(CONFIG))


IDS = torch.randint(0, 256, (203,), generator=torch.Generator().manual_seed(0))


class Uniform(torch.nn.Module):
    """Zero logits over a vocabulary of ``vocab_size``: every token has probability 1 / vocab_size."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size)


def test_disjoint_windows_give_exp_of_the_mean_cross_entropy(pair):
    _, model = pair
    context = 32
    losses = []
    with torch.no_grad():
        for begin in range(0, len(IDS), context):  # disjoint chunks, each predicting all but its first token
            chunk = IDS[begin : begin + context][None]
            if chunk.size(1) > 1:
                logits = model(chunk)
                losses.append(F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="none"))
    direct = torch.cat(losses)
    result = score(model, IDS, context)
    assert result.tokens == direct.numel() == len(IDS) - math.ceil(len(IDS) / context)
    assert result.perplexity == pytest.approx(math.exp(direct.double().mean().item()), rel=1e-6)
    assert perplexity(model, IDS, context, stride=context) == pytest.approx(result.perplexity, rel=1e-12)


def hugging_face_recipe(model, ids, max_length, stride):
    """The loop of https://huggingface.co/docs/transformers/perplexity with Hugging Face's own loss.

    One change: the page counts ``num_valid_tokens - 1`` loss tokens per window, which is
    right for the first window only; later windows mask their first tokens, so the shift
    inside the model removes no scored label and all ``trg_len`` of them are in the loss.
    Here the count is taken after the shift.
    """
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # the labels are shifted inside the model
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("context, stride", [(32, 8), (32, 16), (64, 33), (16, 15)])
def test_sliding_window_equals_hugging_faces_recipe(pair, context, stride):
    hf, ours = pair
    expected, n_tokens = hugging_face_recipe(hf, IDS[None], context, stride)
    result = score(ours, IDS, context, stride)
    assert result.tokens == n_tokens == len(IDS) - 1  # every token but the first, once
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


class Lookback(torch.nn.Module):
    """For a text that repeats every ``period`` tokens: bets (logit 10) that the next token is the
    one ``period`` tokens back, when the window holds it, and spreads its bet evenly otherwise."""

    def __init__(self, period, vocab_size):
        super().__init__()
        self.period, self.vocab_size = period, vocab_size

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        seen = idx[:, : idx.size(1) + 1 - self.period]  # the tokens period - 1 back from each position
        logits[:, self.period - 1 :] = 10 * F.one_hot(seen, self.vocab_size).float()
        return logits


def test_overlapping_windows_give_every_token_its_history():
    """Disjoint windows of 12 predict their first 4 tokens blind; windows moving by 4 only the
    text's first 4, so the sliding perplexity is lower, and both are exactly what counting says."""
    period, V, n = 5, 11, 60
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:period].repeat(n // period)
    model = Lookback(period, V)
    blind, sure = math.log(V), math.log(1 + (V - 1) * math.exp(-10))  # the loss of each kind of token
    disjoint = score(model, ids, context=12)  # 5 windows, 11 tokens each, 4 of them blind
    assert disjoint.tokens == 55 and disjoint.nll == pytest.approx(20 * blind + 35 * sure)
    sliding = score(model, ids, context=12, stride=4)  # only the text's first 4 tokens are blind
    assert sliding.tokens == 59 and sliding.nll == pytest.approx(4 * blind + 55 * sure)
    assert sliding.perplexity < disjoint.perplexity


def test_batches_give_the_same_result(pair):
    _, model = pair
    one = score(model, IDS, 32, stride=8)
    for batch_size in [3, 64]:
        batched = score(model, IDS, 32, stride=8, batch_size=batch_size)
        assert batched.tokens == one.tokens and batched.nll == pytest.approx(one.nll, rel=1e-6)


@pytest.mark.parametrize("n, context, stride", [(100, 10, 10), (100, 10, 3), (7, 10, 5)])
def test_a_uniform_model_has_the_vocabulary_size_as_perplexity(n, context, stride):
    ids = torch.arange(n) % 37
    assert perplexity(Uniform(37), ids, context, stride) == pytest.approx(37.0, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 300), context=st.integers(2, 40), data=st.data())
def test_windows_score_each_token_once_with_at_most_context_tokens_of_history(n, context, data):
    stride = data.draw(st.integers(1, context))
    spans = windows(n, context, stride)
    scored = [t for begin, end, k in spans for t in range(end - k, end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    if stride < context:
        assert sorted(scored) == list(range(1, n))
    for begin, end, k in spans:
        assert end - begin <= context and 0 < k < end - begin + 1 and end - k > begin  # a token before each
        assert begin % stride == 0


def test_score_reports_the_total_and_the_count():
    result = score(Uniform(5), torch.arange(11) % 5, context=4, stride=2)
    assert isinstance(result, Score) and result.tokens == 10
    assert result.nll == pytest.approx(10 * math.log(5)) and result.mean_nll == pytest.approx(math.log(5))


def test_the_model_is_put_back_in_its_mode(pair):
    _, model = pair
    model.train()
    perplexity(model, IDS[:40], 16)
    assert model.training
    model.eval()


def test_bad_inputs_say_what_is_wrong():
    model = Uniform(5)
    ids = torch.arange(20) % 5
    with pytest.raises(ValueError, match="context=1 must be an int >= 2"):
        perplexity(model, ids, context=1)
    with pytest.raises(ValueError, match="stride=0 must be an int >= 1"):
        perplexity(model, ids, context=4, stride=0)
    with pytest.raises(ValueError, match="stride=5 is larger than context=4"):
        perplexity(model, ids, context=4, stride=5)
    with pytest.raises(ValueError, match=r"ids must be a 1-D tensor of token ids, got \(2, 10\)"):
        perplexity(model, ids.view(2, 10), context=4)
    with pytest.raises(ValueError, match="ids must hold integer token ids, got dtype torch.float32"):
        perplexity(model, ids.float(), context=4)
    with pytest.raises(ValueError, match=r"ids has 1 token\(s\); perplexity needs at least 2"):
        perplexity(model, ids[:1], context=4)
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        perplexity(model, ids, context=4, batch_size=0)

    class Flat(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(idx.size(0), 5)

    with pytest.raises(ValueError, match=r"the model returned shape \(1, 5\) for ids of shape \(1, 4\)"):
        perplexity(Flat(), ids, context=4)
