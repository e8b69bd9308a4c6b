"""companion.mistral against Hugging Face's MistralForCausalLM, with a window shorter than the sequence."""

from dataclasses import replace

import pytest
import torch
import transformers

from companion import mistral
from companion.checkpoint import load_hf_state_dict
from companion.generation.static_cache import decode
from companion.generation.sampling import generate
from companion.layers import RollingKVCache
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig, count_parameters, hf_tensor_shapes




WINDOW = 8
CONFIG = MistralConfig.preset("tiny", sliding_window=WINDOW)


ATTN = pytest.mark.parametrize("attn", ["sdpa", "eager"])  # our two attention paths, both against the same oracle


def pair(config: MistralConfig = CONFIG, seed: int = 0, attn: str = "sdpa"):
    """A Hugging Face model with random weights (eager attention) and ours with the same weights."""
    torch.manual_seed(seed)
    hf = transformers.MistralForCausalLM(
        transformers.MistralConfig(**config.to_hf(), attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 1.0)
    ours = load_hf_state_dict(Mistral(replace(config, attn_implementation=attn)).eval(), hf.state_dict(),
                              hf_tensor_shapes(config))
    return hf, ours


@ATTN
@pytest.mark.parametrize("B,T", [(1, 3), (2, WINDOW), (2, WINDOW + 1), (3, 3 * WINDOW + 5)])
def test_logits_match_hugging_face_with_a_window_shorter_than_the_sequence(B, T, attn):
    hf, ours = pair(attn=attn)
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_the_window_matters_a_llama_with_the_same_weights_differs_after_it():
    hf, ours = pair()
    full_attention = load_hf_state_dict(
        Llama(LlamaConfig(**{k: v for k, v in CONFIG.to_hf().items() if k != "sliding_window"})),
        hf.state_dict(), hf_tensor_shapes(CONFIG))
    idx = torch.randint(0, 256, (1, 2 * WINDOW))
    with torch.no_grad():
        a, b = ours(idx), full_attention(idx)
    assert torch.allclose(a[:, :WINDOW], b[:, :WINDOW], atol=1e-5)  # inside the window: the same
    assert not torch.allclose(a[:, WINDOW:], b[:, WINDOW:], atol=1e-3)  # beyond it: not


@ATTN
def test_generation_past_the_window_rolling_cache_equals_uncached_and_hugging_face(attn):
    hf, ours = pair(attn=attn)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    n = 4 * WINDOW  # far past the end of the window
    uncached = generate(ours, prompt, n, temperature=0)
    cached = generate(ours, prompt, n, temperature=0, use_cache=True)
    assert all(isinstance(b.self_attn.cache, RollingKVCache) for b in ours.layers)
    assert ours.layers[0].self_attn.cache.k.shape[2] == WINDOW  # the cache never grew
    assert torch.equal(cached, uncached)
    assert torch.equal(decode(ours, prompt, n), uncached)
    hf.generation_config.eos_token_id = None
    reference = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    assert torch.equal(uncached, reference)
    assert len(set(uncached[0, 5:].tolist())) > 3


@ATTN
def test_rolling_cache_gives_the_full_logits_at_every_step_and_for_a_long_prompt(attn):
    _, ours = pair(attn=attn)
    idx = torch.randint(0, 256, (2, 3 * WINDOW))
    with torch.no_grad():
        full = ours(idx)
        ours.setup_cache(2, 3 * WINDOW)
        prompt = 2 * WINDOW - 3  # a prompt longer than the window, in one chunk
        steps = [ours(idx[:, :prompt], start_pos=0)]
        steps += [ours(idx[:, t:t + 1], start_pos=t) for t in range(prompt, 3 * WINDOW)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@ATTN
def test_a_plain_cache_with_the_window_mask_is_exact_too_but_grows(attn):
    _, ours = pair(attn=attn)
    prompt = torch.randint(0, 256, (1, 4))
    rolling = decode(ours, prompt, 3 * WINDOW)
    ours.setup_cache(1, 4 + 3 * WINDOW, rolling=False)
    assert ours.layers[0].self_attn.cache.k.shape[2] == 4 + 3 * WINDOW
    assert torch.equal(generate(ours, prompt, 3 * WINDOW, temperature=0), rolling)


@ATTN
def test_no_window_is_full_attention_like_llama(attn):
    config = MistralConfig.preset("tiny", sliding_window=None)
    hf, ours = pair(config, attn=attn)
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(idx), hf(idx).logits, atol=1e-5)
    prompt = idx[:, :4]
    assert torch.equal(generate(ours, prompt, 12, temperature=0, use_cache=True),
                       generate(ours, prompt, 12, temperature=0))


def test_parameter_counts_from_the_config():
    assert count_parameters(MistralConfig.preset("mistral-7b-v0.1")) == 7_241_732_096  # published
    for name in ["mistral-7b-v0.1", "tiny"]:
        config = MistralConfig.preset(name)
        with torch.device("meta"):
            hf = transformers.MistralForCausalLM(transformers.MistralConfig(**config.to_hf()))
            ours = Mistral(config)
        assert count_parameters(config) == sum(p.numel() for p in hf.parameters()) \
            == sum(p.numel() for p in ours.parameters())


def test_attn_implementation_chooses_which_attention_runs(monkeypatch):
    calls = []
    for name in ["attention", "sdpa_attention"]:
        original = getattr(mistral, name)
        monkeypatch.setattr(mistral, name, lambda *args, f=original, name=name: calls.append(name) or f(*args))
    assert MistralConfig.preset("tiny").attn_implementation == "sdpa"  # the default, as in Hugging Face
    for attn, expected in [("sdpa", "sdpa_attention"), ("eager", "attention")]:
        calls.clear()
        Mistral(MistralConfig.preset("tiny", attn_implementation=attn))(torch.zeros(1, 3, dtype=torch.long))
        assert calls == [expected, expected]  # once per layer


def test_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="sliding_window=0 must be a positive int or None"):
        MistralConfig.preset("tiny", sliding_window=0)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by num_key_value_heads=3"):
        MistralConfig.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="attn_implementation='explicit' must be 'sdpa' or 'eager'"):
        MistralConfig.preset("tiny", attn_implementation="explicit")


def test_setup_cache_reuses_buffers_of_the_same_shape_and_forgets_the_last_sequence():
    _, ours = pair()
    first, second = torch.randint(0, 256, (2, 1, 5), generator=torch.Generator().manual_seed(4))
    decode(ours, first, 3 * WINDOW)
    buffers = [b.self_attn.cache.k for b in ours.layers]
    again = decode(ours, second, 3 * WINDOW)
    assert all(b.self_attn.cache.k is k for b, k in zip(ours.layers, buffers))  # same memory: compiled steps stay valid
    assert torch.equal(again, generate(ours, second, 3 * WINDOW, temperature=0))
    ours.setup_cache(1, 3 * WINDOW)
    assert (ours.layers[0].self_attn.cache.slot_pos == -1).all()


@ATTN
@pytest.mark.parametrize("prompt", [WINDOW + 1, 2 * WINDOW, 3 * WINDOW + 5])
def test_a_long_prompt_is_prefilled_in_chunks_of_the_window(prompt, attn, monkeypatch):
    hf, ours = pair(attn=attn)
    idx = torch.randint(0, 256, (2, prompt + WINDOW), generator=torch.Generator().manual_seed(prompt))
    key_lengths = []
    original = mistral.sdpa_attention if attn == "sdpa" else mistral.attention

    def spy(q, k, v, mask):
        key_lengths.append(k.size(2))
        return original(q, k, v, mask)

    monkeypatch.setattr(mistral, "sdpa_attention" if attn == "sdpa" else "attention", spy)
    with torch.no_grad():
        expected = hf(idx).logits
        ours.setup_cache(2, idx.size(1))
        prefill = ours(idx[:, :prompt], start_pos=0)  # (2, prompt, V) from ceil(prompt / W) chunks
        steps = [ours(idx[:, t:t + 1], start_pos=t) for t in range(prompt, idx.size(1))]
    assert torch.allclose(torch.cat([prefill, *steps], dim=1), expected, atol=1e-5, rtol=0)
    n_chunks = -(-prompt // WINDOW)
    assert len(key_lengths) == (n_chunks + WINDOW) * CONFIG.num_hidden_layers
    assert max(key_lengths) <= 2 * WINDOW  # a chunk sees the window's slots and itself, never the prompt
    assert key_lengths[-1] == WINDOW  # a decoding step attends over the slots alone


def test_a_decoding_step_writes_its_slot_and_attends_over_the_buffer_without_copying():
    cache = RollingKVCache(1, 2, window=4, head_dim=3)
    for p in range(6):
        k = torch.full((1, 2, 1, 3), float(p))
        key_pos = cache.key_positions(torch.tensor([p]))
        keys, values = cache.update(k, k, torch.tensor([p]))
        assert keys is cache.k and values is cache.v  # the buffers themselves, not a concatenation
        assert torch.equal(keys[0, 0, :, 0], key_pos.clamp(min=0).float() * (key_pos >= 0))
    assert cache.slot_pos.tolist() == [4, 5, 2, 3]
