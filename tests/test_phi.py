"""companion.phi against Hugging Face's PhiForCausalLM: partial rotary, parallel block, biases."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.activations import NewGELUActivation

from companion import phi
from companion.checkpoint import load_hf_state_dict
from companion.generation.static_cache import decode
from companion.generation.sampling import generate
from companion.phi import Phi, PhiConfig, count_parameters, hf_tensor_shapes



CONFIG = PhiConfig.preset("tiny")  # head_dim 20, partial_rotary_factor 0.4: 8 rotated features


ATTN = pytest.mark.parametrize("attn", ["sdpa", "eager"])  # our two attention paths, both against the same oracle


def pair(config: PhiConfig = CONFIG, seed: int = 0, attn: str = "sdpa"):
    """A Hugging Face model with random weights *and biases* (eager attention), and ours with them."""
    torch.manual_seed(seed)
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf(), attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # Hugging Face starts biases at 0; random ones make them count
            p.normal_(1.0, 0.2) if "layernorm.weight" in name else p.normal_(0.0, 0.1)
    ours = load_hf_state_dict(Phi(replace(config, attn_implementation=attn)).eval(), hf.state_dict(),
                              hf_tensor_shapes(config))
    return hf, ours


def test_the_reference_really_is_partial_rotary_04():
    hf, _ = pair()
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.4
    assert hf.model.layers[0].self_attn.rotary_ndims == CONFIG.rotary_dim == 8


@ATTN
@pytest.mark.parametrize("B,T", [(1, 1), (2, 9), (3, 40)])
def test_logits_match_hugging_face(B, T, attn):
    hf, ours = pair(attn=attn)
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_rotating_every_feature_instead_gives_other_logits():
    hf, _ = pair()
    full = load_hf_state_dict(Phi(PhiConfig.preset("tiny", partial_rotary_factor=1.0)), hf.state_dict(),
                              hf_tensor_shapes(CONFIG))
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert not torch.allclose(full(idx), hf(idx).logits, atol=1e-3)


def test_gelu_tanh_is_hugging_faces_gelu_new():
    x = torch.linspace(-8, 8, 1001)
    assert torch.allclose(F.gelu(x, approximate="tanh"), NewGELUActivation()(x), atol=1e-6)


@ATTN
def test_tied_embeddings_keep_the_output_bias(attn):
    config = PhiConfig.preset("tiny", tie_word_embeddings=True, num_hidden_layers=1)
    hf, ours = pair(config, attn=attn)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    idx = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert torch.allclose(ours(idx), hf(idx).logits, atol=1e-5)


@ATTN
def test_cached_generation_gives_the_uncached_tokens_and_hugging_faces(attn):
    hf, ours = pair(attn=attn)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    uncached = generate(ours, prompt, 25, temperature=0)
    assert torch.equal(generate(ours, prompt, 25, temperature=0, use_cache=True), uncached)
    assert torch.equal(decode(ours, prompt, 25), uncached)
    hf.generation_config.eos_token_id = None
    reference = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False)
    assert torch.equal(uncached, reference)
    assert len(set(uncached[0, 6:].tolist())) > 3


def test_parameter_counts_from_the_config():
    assert count_parameters(PhiConfig.preset("phi-2")) == 2_779_683_840  # published
    for name in ["phi-2", "phi-1_5", "tiny"]:
        config = PhiConfig.preset(name)
        with torch.device("meta"):
            hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf()))
            ours = Phi(config)
        assert count_parameters(config) == sum(p.numel() for p in hf.parameters()) \
            == sum(p.numel() for p in ours.parameters())


def test_attn_implementation_chooses_which_attention_runs(monkeypatch):
    calls = []
    for name in ["attention", "sdpa_attention"]:
        original = getattr(phi, name)
        monkeypatch.setattr(phi, name, lambda *args, f=original, name=name: calls.append(name) or f(*args))
    assert PhiConfig.preset("tiny").attn_implementation == "sdpa"  # the default, as in Hugging Face
    for attn, expected in [("sdpa", "sdpa_attention"), ("eager", "attention")]:
        calls.clear()
        Phi(PhiConfig.preset("tiny", attn_implementation=attn))(torch.zeros(1, 3, dtype=torch.long))
        assert calls == [expected, expected]  # once per layer


def test_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"rotary_dim = int\(20 \* 0.25\) = 5 must be a positive even number"):
        PhiConfig.preset("tiny", partial_rotary_factor=0.25)
    with pytest.raises(ValueError, match="partial_rotary_factor=1.5 must be in"):
        PhiConfig.preset("tiny", partial_rotary_factor=1.5)
    with pytest.raises(ValueError, match="attn_implementation='SDPA' must be 'sdpa' or 'eager'"):
        PhiConfig.preset("tiny", attn_implementation="SDPA")
