"""companion.llama against Hugging Face's LlamaForCausalLM: same weights, same logits, same tokens."""

from dataclasses import replace

import pytest
import torch
import transformers

from companion.checkpoint import hf_state_dict, load_hf_state_dict
from companion.generation.static_cache import decode
from companion import llama
from companion.generation.sampling import generate
from companion.llama import Llama, LlamaConfig, count_parameters, hf_tensor_shapes




ATTN = pytest.mark.parametrize("attn", ["sdpa", "eager"])  # our two attention paths, both against the same oracle


def pair(config: LlamaConfig, seed: int = 0, attn: str = "sdpa"):
    """A Hugging Face model with random weights (eager attention) and ours with the same weights."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**config.to_hf(), attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms away from 1, larger weights: differences would show
            p.normal_(0.0, 0.1 if p.dim() > 1 else 1.0)
    ours = load_hf_state_dict(Llama(replace(config, attn_implementation=attn)).eval(), hf.state_dict(),
                              hf_tensor_shapes(config))
    return hf, ours


CONFIGS = {
    "mha": LlamaConfig.preset("tiny"),
    "gqa": LlamaConfig.preset("tiny", num_key_value_heads=2, rope_theta=500.0),
    "tied": LlamaConfig.preset("tiny", tie_word_embeddings=True, num_hidden_layers=1),
}


@ATTN
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 33)])
def test_logits_match_hugging_face(name, B, T, attn):
    hf, ours = pair(CONFIGS[name], attn=attn)
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == (B, T, 256)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_the_test_can_fail_a_changed_rope_theta_changes_the_logits():
    hf, ours = pair(CONFIGS["mha"])
    other = load_hf_state_dict(Llama(LlamaConfig.preset("tiny", rope_theta=500.0)), hf.state_dict(),
                               hf_tensor_shapes(CONFIGS["mha"]))
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert not torch.allclose(other(idx), hf(idx).logits, atol=1e-3)


def test_state_dict_names_and_shapes_are_those_of_hugging_face():
    for config in CONFIGS.values():
        hf, ours = pair(config)
        expected = {n: tuple(t.shape) for n, t in hf.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        assert hf_tensor_shapes(config) == expected
        assert {n: tuple(t.shape) for n, t in hf_state_dict(ours).items()} == expected


@ATTN
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_cached_prefill_in_chunks_gives_the_full_logits(name, attn):
    _, ours = pair(CONFIGS[name], attn=attn)
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = ours(idx)
        ours.setup_cache(2, 16)
        pieces = [ours(idx[:, a:b], start_pos=a) for a, b in [(0, 5), (5, 6), (6, 12)]]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@ATTN
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_cached_generation_gives_the_uncached_tokens_and_hugging_faces(name, attn):
    hf, ours = pair(CONFIGS[name], attn=attn)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    uncached = generate(ours, prompt, 25, temperature=0)
    cached = generate(ours, prompt, 25, temperature=0, use_cache=True)
    assert torch.equal(cached, uncached)
    assert torch.equal(decode(ours, prompt, 25), uncached)
    hf.generation_config.eos_token_id = None
    reference = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False)
    assert torch.equal(uncached, reference)
    assert len(set(uncached[0, 6:].tolist())) > 3  # not a degenerate run of one token


def test_parameter_counts_from_the_config():
    assert count_parameters(LlamaConfig.preset("llama-2-7b")) == 6_738_415_616  # published
    for name in ["llama-2-7b", "llama-2-70b", "tiny"]:
        config = LlamaConfig.preset(name)
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
            ours = Llama(config)
        n = sum(p.numel() for p in hf.parameters())
        assert count_parameters(config) == n == sum(p.numel() for p in ours.parameters())


def test_attn_implementation_chooses_which_attention_runs(monkeypatch):
    calls = []
    for name in ["attention", "sdpa_attention"]:
        original = getattr(llama, name)
        monkeypatch.setattr(llama, name, lambda *args, f=original, name=name: calls.append(name) or f(*args))
    assert LlamaConfig.preset("tiny").attn_implementation == "sdpa"  # the default, as in Hugging Face
    for attn, expected in [("sdpa", "sdpa_attention"), ("eager", "attention")]:
        calls.clear()
        Llama(LlamaConfig.preset("tiny", attn_implementation=attn))(torch.zeros(1, 3, dtype=torch.long))
        assert calls == [expected, expected]  # once per layer


def test_config_and_cache_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="hidden_size=60 is not divisible by num_attention_heads=8"):
        LlamaConfig.preset("tiny", hidden_size=60, num_attention_heads=8)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by num_key_value_heads=3"):
        LlamaConfig.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown preset 'llama-3'"):
        LlamaConfig.preset("llama-3")
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' must be 'sdpa' or 'eager'"):
        LlamaConfig.preset("tiny", attn_implementation="flash_attention_2")
    model = Llama(LlamaConfig.preset("tiny"))
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no cache: call setup_cache"):
        model(idx, start_pos=0)
    model.setup_cache(1, 6)
    with pytest.raises(ValueError, match="positions 4..7 for batch 1 do not fit the cache of 6 positions"):
        model(idx, start_pos=4)
    with pytest.raises(ValueError, match="longer than max_position_embeddings=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_setup_cache_reuses_buffers_of_the_same_shape():
    _, ours = pair(CONFIGS["gqa"])
    ours.setup_cache(2, 10)
    k = ours.layers[0].self_attn.cache.k
    ours.setup_cache(2, 10)
    assert ours.layers[0].self_attn.cache.k is k
    ours.setup_cache(2, 11)
    assert ours.layers[0].self_attn.cache.k.shape == (2, 2, 11, 16)
