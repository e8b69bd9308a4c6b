"""companion.gpt: the config, attention equal to SDPA, GPT-2's init, and logits equal to Hugging Face."""

import math

import pytest
import torch
import torch.nn.functional as F

from companion.gpt import (
    GPT,
    PRESETS,
    CausalSelfAttention,
    GPTConfig,
    StateDictError,
    causal_attention,
    config_from_hf,
    gpt_from_hf,
    hf_state_dict_to_gpt,
)

transformers = pytest.importorskip("transformers")


def tiny_hf(vocab_size=97, n_positions=64, seed=0, attn="sdpa"):
    """A randomly initialised GPT-2 with the tiny sizes of the issue (no downloads)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=n_positions, vocab_size=vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config).eval()


# ---- config --------------------------------------------------------------------------------


def test_config_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)


@pytest.mark.parametrize("field,value", [("n_layer", 0), ("vocab_size", -1), ("n_positions", 2.0),
                                         ("dropout", 1.0), ("attn_implementation", "flash")])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: value})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.preset("gpt3")


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium"])
def test_gpt2_presets_have_as_many_parameters_as_hugging_face(name):
    with torch.device("meta"):  # shapes only: instant, no memory
        ours = GPT(GPTConfig.preset(name)).num_parameters()
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**PRESETS[name])).num_parameters()
    assert ours == theirs


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_presets_have_the_published_sizes(name, count):
    with torch.device("meta"):
        assert GPT(GPTConfig.preset(name)).num_parameters() == count


# ---- attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (2, 3, 7, 8), (3, 2, 33, 16)])
def test_explicit_causal_attention_equals_sdpa(shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v), want, rtol=0, atol=1e-12)


def test_explicit_attention_equals_a_loop_over_positions():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 3, dtype=torch.float64) for _ in range(3))
    out = causal_attention(q, k, v)
    for t in range(5):
        w = torch.softmax(q[0, 0, t] @ k[0, 0, : t + 1].T / math.sqrt(3), dim=-1)
        torch.testing.assert_close(out[0, 0, t], w @ v[0, 0, : t + 1])


def test_both_attention_modules_give_the_same_output_from_the_same_weights():
    torch.manual_seed(0)
    sdpa = CausalSelfAttention(GPTConfig.preset("tiny"))
    explicit = CausalSelfAttention(GPTConfig.preset("tiny", attn_implementation="explicit"))
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(explicit(x), sdpa(x), rtol=0, atol=1e-6)


def test_the_future_does_not_change_the_past():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    a = torch.randint(0, 128, (2, 12))
    b = a.clone()
    b[:, 7:] = torch.randint(0, 128, (2, 5))
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :7], lb[:, :7])
    assert not torch.allclose(la[:, 7:], lb[:, 7:])


# ---- the model ------------------------------------------------------------------------------


def test_forward_shape_and_too_long_input_names_the_context_length():
    model = GPT(GPTConfig.preset("tiny"))
    assert model(torch.zeros(2, 32, dtype=torch.long)).shape == (2, 32, 128)
    with pytest.raises(ValueError, match="length 33.*n_positions is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(33, dtype=torch.long))


def test_embeddings_are_tied():
    model = GPT(GPTConfig.preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, n_positions=256, n_embd=256, n_layer=8, n_head=4)
    model = GPT(config)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 2e-3, name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert torch.equal(p, torch.zeros_like(p)), name


def test_loss_at_initialisation_is_close_to_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    x, y = torch.randint(0, 128, (2, 8, 32))  # targets unrelated to the inputs
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert loss.item() == pytest.approx(math.log(128), abs=0.05)


def test_dropout_acts_only_in_training_mode():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", dropout=0.3))
    x = torch.randint(0, 128, (2, 8))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_no_bias_variant_has_no_biases():
    model = GPT(GPTConfig.preset("tiny", bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


def test_flops_per_token_counts_6n_plus_attention():
    model = GPT(GPTConfig.preset("tiny"))
    n = model.num_parameters() - 32 * 32  # without position embeddings
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16


# ---- the KV cache ---------------------------------------------------------------------------


def varied_gpt(attn="sdpa", n_positions=48):
    """A tiny GPT whose greedy tokens vary (weights larger than at initialisation)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_positions=n_positions, attn_implementation=attn)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if ".ln_" in name and name.endswith("weight") else p.normal_(0.0, 0.2 if p.dim() > 1 else 0.02)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
def test_cached_logits_equal_the_whole_sequence_pass(attn):
    model = varied_gpt(attn)
    idx = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(idx)
        model.setup_cache(2, 24)
        pieces = [model(idx[:, :7], start_pos=0)]  # a prompt, then one token at a time
        pieces += [model(idx[:, t : t + 1], start_pos=t) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
def test_cached_decoding_equals_uncached_generation(attn):
    from companion.generation.static_cache import decode
    from companion.generation.sampling import generate

    model = varied_gpt(attn)
    prompt = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    uncached = generate(model, prompt, 40, temperature=0.0)  # 45 of the 48 positions
    assert torch.equal(decode(model, prompt, 40), uncached)  # a cache of n_positions slots
    assert torch.equal(generate(model, prompt, 40, temperature=0.0, use_cache=True), uncached)
    assert len(set(uncached[0, 5:].tolist())) > 5  # not one repeated token


def test_cached_greedy_tokens_equal_hugging_face_generate():
    from companion.generation.static_cache import decode

    hf = tiny_hf(seed=3)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(5.0)  # larger than GPT-2's initialisation: logits far apart, varied tokens
    ours = gpt_from_hf(hf)
    prompt = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(decode(ours, prompt, 30, eos_token_id=0), want)


def test_cache_errors_name_the_sizes():
    model = GPT(GPTConfig.preset("tiny"))
    with pytest.raises(ValueError, match="max_seq_len=33 is longer than the context length n_positions=32"):
        model.setup_cache(1, 33)
    with pytest.raises(ValueError, match="no cache: call setup_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=0)
    model.setup_cache(2, 8)
    with pytest.raises(ValueError, match="positions 6..8 for batch 2 do not fit the cache of 8 positions"):
        model(torch.zeros(2, 3, dtype=torch.long), start_pos=6)


def test_the_cache_adds_nothing_to_the_state_dict():
    model = GPT(GPTConfig.preset("tiny"))
    keys = set(model.state_dict())
    model.setup_cache(2, 8)
    assert set(model.state_dict()) == keys


# ---- Hugging Face parity --------------------------------------------------------------------


@pytest.mark.parametrize("batch,length", [(1, 1), (1, 64), (3, 17), (4, 40)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_hugging_face_gpt2(batch, length, attn):
    hf = tiny_hf(attn=attn)
    assert hf.config._attn_implementation == attn
    ours = gpt_from_hf(hf)
    idx = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(batch * length))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_explicit_attention_model_also_equals_hugging_face():
    hf = tiny_hf(seed=1)
    ours = gpt_from_hf(hf, config_from_hf(hf.config))
    ours_explicit = gpt_from_hf(hf.state_dict(), GPTConfig(**{**ours.config.to_dict(), "attn_implementation": "explicit"}))
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours_explicit(idx), hf(idx).logits, rtol=0, atol=1e-5)


def test_state_dict_of_the_base_model_without_lm_head_loads_too():
    hf = tiny_hf(seed=2)
    ours = gpt_from_hf(hf.transformer.state_dict(), config_from_hf(hf.config))
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-5)


def test_conv1d_weights_are_transposed():
    hf = tiny_hf()
    ours = gpt_from_hf(hf)
    w_hf = hf.transformer.h[1].mlp.c_fc.weight  # (in, out) = (64, 256)
    assert w_hf.shape == (64, 256)
    assert torch.equal(ours.transformer.h[1].mlp.c_fc.weight, w_hf.T)


def test_bad_state_dict_lists_every_missing_unexpected_and_misshaped_key():
    hf = tiny_hf()
    state = dict(hf.state_dict())
    del state["transformer.h.0.ln_1.bias"], state["transformer.ln_f.weight"]
    state["transformer.h.0.attn.extra"] = torch.zeros(3)
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(256, 64)  # nn.Linear layout, not Conv1D
    with pytest.raises(StateDictError) as info:
        hf_state_dict_to_gpt(state, config_from_hf(hf.config))
    message = str(info.value)
    assert "missing keys (2): transformer.h.0.ln_1.bias, transformer.ln_f.weight" in message
    assert "unexpected keys (1): transformer.h.0.attn.extra" in message
    assert "transformer.h.1.mlp.c_fc.weight has shape (256, 64), expected (64, 256)" in message
    assert isinstance(info.value, ValueError)


def test_state_dict_for_a_different_size_is_refused():
    hf = tiny_hf(vocab_size=97)
    with pytest.raises(StateDictError, match=r"transformer.wte.weight has shape \(97, 64\), expected \(50, 64\)"):
        gpt_from_hf(hf.state_dict(), GPTConfig(vocab_size=50, n_positions=64, n_embd=64, n_layer=2, n_head=4))


def test_untied_lm_head_is_refused():
    hf = tiny_hf()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] += 1.0
    with pytest.raises(StateDictError, match="ties them"):
        hf_state_dict_to_gpt(state, config_from_hf(hf.config))


def test_bare_state_dict_needs_a_config():
    with pytest.raises(ValueError, match="needs a config"):
        gpt_from_hf(tiny_hf().state_dict())


def test_unsupported_hugging_face_variants_are_refused():
    with pytest.raises(ValueError, match="activation_function='relu'"):
        config_from_hf(transformers.GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="n_inner=100"):
        config_from_hf(transformers.GPT2Config(n_inner=100))
