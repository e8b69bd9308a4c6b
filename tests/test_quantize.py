"""companion.quantize: the error bounds of the formats, the fast paths against the readable one,
torchao's int8 integers against ours, and quantized checkpoints saved and loaded back."""

import copy
import json
import pickle
import platform
import shutil
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from companion import quantize as Q
from companion.checkpoint import CheckpointError
from companion.generation.static_cache import compile_step
from companion.device import plan_device
from companion.layers import Linear
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig
from companion.phi import Phi, PhiConfig
from companion.quantize import (Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, dequantize, dequantize_int4,
                                dequantize_int8, pack_int4, quantize_, quantize_int4, quantize_int8, save_quantized,
                                unpack_int4)

CPU_PLAN = plan_device("cpu", verbose=False)
needs_compile = pytest.mark.skipif(not CPU_PLAN.compile, reason="; ".join(CPU_PLAN.reasons))
needs_int8_kernel = pytest.mark.skipif(not Q.HAS_INT8_KERNEL, reason="no aten._weight_int8pack_mm in this torch")
needs_int4_kernel = pytest.mark.skipif(not Q.HAS_INT4_KERNEL, reason="no aten._weight_int4pack_mm_for_cpu in this torch")

# Sizes every group size divides (the tiny presets' 172, 176 and 80 do not divide by 32).
FAMILIES = {
    "llama": (Llama, LlamaConfig.preset("tiny", intermediate_size=128, num_key_value_heads=2)),
    "mistral": (Mistral, MistralConfig.preset("tiny", intermediate_size=128)),
    "phi": (Phi, PhiConfig.preset("tiny", hidden_size=64, intermediate_size=128)),  # biases everywhere
}
SCHEMES = [("int8", None), ("int4", 32), ("int4", 64)]


def random_model(family="llama", **overrides):
    model_cls, config = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(replace(config, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms away from 1, random biases
            p.normal_(1.0, 0.2) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.1)
    return model


def rows_of(seed, shape, log10_scale):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10.0 ** log10_scale


# ---- the formats: error bounds and packing ------------------------------------------------------

# float32 rounding of q * scale (+ min) adds a few units in the last place of the weights' size.
ROUNDING = 1e-6


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 9), k=st.integers(1, 70), log10_scale=st.floats(-4, 3))
def test_int8_error_is_at_most_half_a_step_per_row(seed, n, k, log10_scale):
    w = rows_of(seed, (n, k), log10_scale)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (n,)
    assert q.abs().max() <= 127  # -128 is never used: the grid is symmetric
    error = (w - dequantize_int8(q, scales)).abs()  # (N, K)
    assert (error <= scales[:, None] / 2 + ROUNDING * w.abs().amax(1, keepdim=True)).all()
    assert torch.equal(q.abs().amax(1), torch.full((n,), 127, dtype=torch.int8))  # each row's largest weight is +-127


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 9), groups=st.integers(1, 3),
       group_size=st.sampled_from([32, 64, 128]), log10_scale=st.floats(-4, 3))
def test_int4_error_is_at_most_half_a_step_per_group(seed, n, groups, group_size, log10_scale):
    w = rows_of(seed, (n, groups * group_size), log10_scale)
    packed, scales, mins = quantize_int4(w, group_size)
    assert packed.shape == (n, groups * group_size // 2) and scales.shape == mins.shape == (n, groups)
    q = unpack_int4(packed).view(n, groups, group_size)
    assert int(q.max()) <= 15
    assert (q.amin(-1) == 0).all() and (q.amax(-1) == 15).all()  # min and max of each group are levels 0 and 15
    error = (w - dequantize_int4(packed, scales, mins)).abs().view(n, groups, group_size)
    bound = scales[..., None] / 2 + ROUNDING * w.abs().view(n, groups, group_size).amax(-1, keepdim=True)
    assert (error <= bound).all()


def test_a_row_or_group_of_equal_weights_is_exact():
    w = torch.zeros(2, 64)
    w[1] = 0.3
    q, scales = quantize_int8(w)
    assert torch.equal(dequantize_int8(q, scales), torch.tensor([[0.0] * 64, [0.3] * 64]))
    assert torch.equal(dequantize_int4(*quantize_int4(w, 32)), w)


def test_every_pair_of_4_bit_values_packs_into_one_byte_and_back():
    a, b = torch.meshgrid(torch.arange(16, dtype=torch.uint8), torch.arange(16, dtype=torch.uint8), indexing="ij")
    pairs = torch.stack((a.flatten(), b.flatten()), dim=-1)  # (256, 2): all 16 x 16 pairs
    packed = pack_int4(pairs)  # (256, 1)
    assert torch.equal(packed.flatten().long(), a.flatten().long() + 16 * b.flatten().long())  # low bits first
    assert sorted(packed.flatten().tolist()) == list(range(256))  # every byte value, once
    assert torch.equal(unpack_int4(packed), pairs)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_packing_round_trips(values):
    q = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    rows = q.repeat(3, 1)  # (3, K): packing runs along the last dimension only
    assert pack_int4(rows).shape == (3, len(values) // 2) and torch.equal(unpack_int4(pack_int4(rows)), rows)


def test_bad_packing_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="q holds 16; 4-bit values are 0 to 15"):
        pack_int4(torch.tensor([16, 0], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"last dimension of q \(3\) must be even"):
        pack_int4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="q must be uint8, got torch.int64"):
        pack_int4(torch.zeros(2, dtype=torch.long))


# ---- torchao's int8 weight-only quantization ----------------------------------------------------


def test_int8_against_torchao():
    """torchao divides by 127.5 and allows -128; we divide by 127 and use [-127, 127].

    Both are checked against their formula on the same weights, the integers differ by at
    most 1, and each dequantizes within half of its own step.
    """
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False))
    w = layer[0].weight.detach().clone()
    ao_quantize_(layer, Int8WeightOnlyConfig())
    theirs = layer[0].weight  # an Int8Tensor: qdata (N, K) int8, scale (N, 1)
    absmax = w.abs().amax(1, keepdim=True)  # (N, 1)
    assert torch.equal(theirs.scale, absmax / 127.5)
    assert torch.equal(theirs.qdata, torch.clamp(torch.round(w * (1.0 / theirs.scale)), -128, 127).to(torch.int8))
    q, scales = quantize_int8(w)
    assert torch.equal(scales, (absmax / 127).flatten())
    assert torch.equal(q, torch.round(w / scales[:, None]).to(torch.int8))
    difference = (q.int() - theirs.qdata.int()).abs()
    assert difference.max() == 1 and difference.sum() > 0  # different grids, neighbouring integers
    assert ((w - theirs.dequantize()).abs() <= theirs.scale / 2 + 1e-7).all()
    assert torch.allclose(theirs.dequantize(), dequantize_int8(q, scales), atol=float(scales.max()), rtol=0)


# ---- the layers: the fast paths against the readable one ----------------------------------------


def layer_pair(scheme, group_size=32, bias=True, out_features=48, in_features=128, seed=0):
    torch.manual_seed(seed)
    linear = Linear(in_features, out_features, bias=bias)
    quantized = Int8Linear.from_linear(linear) if scheme == "int8" else Int4Linear.from_linear(linear, group_size)
    return linear, quantized


def bf16_tolerance(layer, x):
    """bfloat16 keeps 8 significant bits: x, the scales and the output each round by up to 2**-9
    relative, so each output is within 2**-6 of the sum of |weight * x| over its row."""
    return 2**-6 * (x.abs() @ layer.dequantize_weight().abs().T) + 1e-6


@pytest.mark.parametrize("scheme, group_size", SCHEMES)
def test_dequantize_gives_a_float_layer_with_exactly_the_dequantized_weight(scheme, group_size):
    linear, layer = layer_pair(scheme, group_size)
    float_layer = dequantize(layer)
    assert type(float_layer) is Linear and float_layer.bias is layer.bias
    if scheme == "int8":
        expected = layer.scales[:, None] * layer.qweight.float()
    else:
        g = group_size
        q = unpack_int4(layer.qweight).float()
        expected = q * layer.scales.repeat_interleave(g, 1) + layer.mins.repeat_interleave(g, 1)
    assert torch.equal(float_layer.weight, expected)
    x = torch.randn(3, 128)
    assert torch.equal(float_layer(x), layer.reference_forward(x))


@needs_int8_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_int8_kernel_agrees_with_the_reference_within_bfloat16_rounding(bias, monkeypatch):
    monkeypatch.setattr(Q.cpu_kernels, "enabled", False)  # PyTorch's kernel (tests/test_cpu_kernels.py: ours)
    _, layer = layer_pair("int8", bias=bias)
    x = torch.randn(2, 5, 128)
    fast, reference = layer(x), layer.reference_forward(x)
    assert fast.shape == reference.shape == (2, 5, 48) and fast.dtype == torch.float32
    assert ((fast - reference).abs() <= bf16_tolerance(layer, x)).all()
    assert not torch.equal(fast, reference)  # it did take the bfloat16 kernel


@needs_int4_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_kernel_agrees_with_the_reference_within_bfloat16_rounding(group_size, bias, monkeypatch):
    monkeypatch.setattr(Q.cpu_kernels, "enabled", False)  # PyTorch's kernel (tests/test_cpu_kernels.py: ours)
    _, layer = layer_pair("int4", group_size, bias=bias)
    assert layer.kernel_weight is not None
    x = torch.randn(2, 5, 128)
    fast, reference = layer(x), layer.reference_forward(x)
    assert fast.shape == reference.shape == (2, 5, 48)
    assert ((fast - reference).abs() <= bf16_tolerance(layer, x)).all()
    assert not torch.equal(fast, reference)


def test_without_the_kernels_forward_is_the_reference(monkeypatch):
    monkeypatch.setattr(Q, "HAS_INT8_KERNEL", False)
    monkeypatch.setattr(Q, "HAS_INT4_KERNEL", False)
    monkeypatch.setattr(Q.cpu_kernels, "enabled", False)  # nor companion's own
    x = torch.randn(4, 128)
    for scheme in ["int8", "int4"]:
        _, layer = layer_pair(scheme)
        assert torch.equal(layer(x), layer.reference_forward(x))
    assert layer.kernel_weight is None


def test_int8_kernel_is_skipped_when_in_features_is_not_a_multiple_of_16():
    """The kernel would read past the end of each row (in torch 2.13, a crash with several rows)."""
    _, layer = layer_pair("int8", in_features=40)
    x = torch.randn(5, 40)
    assert torch.equal(layer(x), layer.reference_forward(x))


def test_int4_kernel_is_skipped_when_out_features_is_not_a_multiple_of_16():
    _, layer = layer_pair("int4", out_features=40)  # the kernel needs out % 16 == 0
    assert layer.kernel_weight is None
    x = torch.randn(3, 128)
    assert torch.equal(layer(x), layer.reference_forward(x))


@needs_int4_kernel
def test_load_state_dict_repacks_the_kernels_copy():
    _, a = layer_pair("int4", seed=0)
    _, b = layer_pair("int4", seed=1)
    x = torch.randn(1, 128)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert "kernel_weight" not in b.state_dict()  # the kernel's layout depends on the CPU: never saved


@needs_compile
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_layer_agrees_with_the_reference(scheme):
    """One row (decoding) and several (a prompt) under torch.compile."""
    _, layer = layer_pair(scheme)
    compiled = torch.compile(layer, fullgraph=True)
    for x in [torch.randn(1, 1, 128), torch.randn(2, 3, 128)]:
        got, reference = compiled(x), layer.reference_forward(x)
        if scheme == "int8":  # the multiply-and-sum loop and the reference matmul, both in float32
            assert torch.allclose(got, reference, atol=1e-5, rtol=1e-5)
        else:  # the bfloat16 kernel
            assert ((got - reference).abs() <= bf16_tolerance(layer, x)).all()


@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("bias", [True, False])
def test_one_row_forward_is_the_reference_summed_in_another_order(scheme, group_size, bias):
    """The decoding path a GPU compiles: eager and compiled, in float32 and in float64."""
    _, layer = layer_pair(scheme, group_size, bias=bias)
    x = torch.randn(1, 1, 128)
    reference = layer.reference_forward(x)
    assert torch.allclose(layer.one_row_forward(x), reference, atol=1e-5, rtol=1e-5)
    if CPU_PLAN.compile:
        compiled = torch.compile(layer.one_row_forward, fullgraph=True)
        assert torch.allclose(compiled(x), reference, atol=1e-5, rtol=1e-5)
    layer64 = copy.deepcopy(layer).double()  # integers stay integers; scales, minimums and bias in float64
    torch.testing.assert_close(layer64.one_row_forward(x.double()), layer64.reference_forward(x.double()),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"one_row_forward takes one row, got an input of shape \(2, 128\)"):
        layer.one_row_forward(torch.randn(2, 128))


def test_the_c_kernels_are_available_where_they_should_be():
    """On x86 Linux with C and C++ compilers they must build: a silent fallback would hide a bug
    (tests/test_cpu_kernels.py skips itself where they are not available)."""
    compilers = (shutil.which("cc") or shutil.which("gcc")) and (shutil.which("c++") or shutil.which("g++"))
    if platform.system() == "Linux" and compilers and Q.cpu_kernels.variant() is not None:
        assert Q.cpu_kernels.available(), Q.cpu_kernels.unavailable_reason()


# ---- whole models --------------------------------------------------------------------------------


def test_what_is_quantized_by_default():
    model = quantize_(random_model("phi"), "int8")
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, *Q.QUANTIZED))}
    assert kinds["embed_tokens"] == "Embedding"  # a step reads one row of it: quantizing saves no time
    assert kinds["lm_head"] == "Int8Linear"
    assert set(kinds.values()) == {"Embedding", "Int8Linear"} and len(kinds) == 1 + 2 * 6 + 1
    assert model.lm_head.bias is not None and model.layers[0].mlp.fc1.bias is not None  # biases stay float
    kept = quantize_(random_model("llama"), "int4", group_size=32, include_lm_head=False)
    assert type(kept.lm_head) is Linear and type(kept.layers[1].self_attn.o_proj) is Int4Linear
    both = quantize_(random_model("llama"), "int4", group_size=32, include_embedding=True)
    assert type(both.embed_tokens) is Int4Embedding


@pytest.mark.parametrize("scheme, group_size", SCHEMES)
def test_dequantized_model_gives_the_quantized_models_reference_logits(scheme, group_size, monkeypatch):
    model = quantize_(random_model("llama"), scheme, group_size=group_size, include_embedding=True)
    idx = torch.randint(0, 256, (2, 9))
    float_model = dequantize(copy.deepcopy(model))
    assert not any(isinstance(m, Q.QUANTIZED) for m in float_model.modules())
    monkeypatch.setattr(Q, "HAS_INT8_KERNEL", False)  # the quantized model on its reference path
    monkeypatch.setattr(Q.cpu_kernels, "enabled", False)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            monkeypatch.setattr(m, "kernel_weight", None)
    with torch.no_grad():
        assert torch.equal(model(idx), float_model(idx))


def test_int8_moves_the_logits_far_less_than_int4():
    """One int8 step is about 1/12 of an int4 step of 32 Gaussian weights (2 x 2.9 sigma / 254
    against 4.1 sigma / 15), and the logits of a random tiny Llama move accordingly."""
    model = random_model("llama")
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(idx)
        error = {scheme: (quantize_(copy.deepcopy(model), scheme, group_size=g)(idx) - reference).abs().max()
                 for scheme, g in [("int8", None), ("int4", 32)]}
    largest = reference.abs().max()
    assert 0 < error["int8"] < 0.05 * largest
    assert 5 * error["int8"] < error["int4"] < 0.5 * largest


def test_tied_embeddings():
    model = random_model("llama", tie_word_embeddings=True)
    quantize_(model, "int8")
    assert type(model.lm_head) is Int8Linear and type(model.embed_tokens) is torch.nn.Embedding
    model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_head shares the embedding's weight .* pass include_lm_head=True"):
        quantize_(random_model("llama", tie_word_embeddings=True), "int8", include_embedding=True,
                  include_lm_head=False)


@needs_compile
@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32)])
def test_compiled_step_agrees_with_the_eager_step(scheme, group_size):
    """Compiled, int8 runs Inductor's float32 loop and eager the bfloat16 kernel; int4 runs the
    same kernel both ways. Logits (largest about 3) agree within 0.02."""
    torch._dynamo.reset()
    model = quantize_(random_model("llama"), scheme, group_size=group_size)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    step = compile_step(model)
    with torch.no_grad():
        logits = {}
        for name, run in [("compiled", step), ("eager", lambda tok, pos: model(tok, start_pos=pos, last_only=True))]:
            model.setup_cache(1, 16)
            model(prompt, start_pos=0)
            logits[name] = torch.cat([run(prompt[:, i : i + 1], torch.tensor(6 + i)) for i in range(3)], dim=1)
    assert torch.allclose(logits["compiled"], logits["eager"], atol=0.02, rtol=0)


def test_bfloat16_model():
    model = quantize_(random_model("mistral").to(torch.bfloat16), "int4", group_size=64)
    layer = model.layers[0].mlp.up_proj
    assert layer.scales.dtype == layer.mins.dtype == torch.bfloat16
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16


# ---- bad arguments -------------------------------------------------------------------------------


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="scheme='int3' is not one of 'int8', 'int4'"):
        quantize_(random_model(), "int3")
    with pytest.raises(ValueError, match="group_size=48 must be one of 32, 64, 128"):
        quantize_(random_model(), "int4", group_size=48)
    with pytest.raises(ValueError, match="in_features=172 of layers.0.mlp.down_proj is not divisible by group_size=32"):
        quantize_(random_model(intermediate_size=172), "int4", group_size=32)
    with pytest.raises(ValueError, match="in_features=100 is not divisible by group_size=64"):
        Int4Linear.from_linear(torch.nn.Linear(100, 16), group_size=64)
    model = quantize_(random_model(), "int8")
    with pytest.raises(ValueError, match=r"already quantized \(layers.0.self_attn.q_proj is Int8Linear\)"):
        quantize_(model, "int4")
    with pytest.raises(ValueError, match=r"weight must be \(out_features, in_features\), got shape \(4,\)"):
        quantize_int8(torch.zeros(4))


def test_a_failed_quantize_leaves_the_model_as_it_was():
    model = random_model(intermediate_size=172)
    with pytest.raises(ValueError):
        quantize_(model, "int4", group_size=32)
    assert not any(isinstance(m, Q.QUANTIZED) for m in model.modules())


# ---- saving and loading --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32)])
def test_saved_model_loads_back_with_the_same_logits(tmp_path, family, scheme, group_size):
    model = quantize_(random_model(family), scheme, group_size=group_size)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("companion", int(scheme[-1]), group_size)
    assert quant["scheme"] == {"int8": "symmetric-per-channel", "int4": "asymmetric-per-group"}[scheme]
    assert "lm_head" in quant["modules"] and "model.layers.1.self_attn.q_proj" in quant["modules"]
    loaded = type(model).from_pretrained(tmp_path / "q")
    assert loaded.config == model.config
    assert {k: (v.dtype, v.shape) for k, v in loaded.state_dict().items()} == \
           {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    idx = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_tied_model_with_quantized_embedding_round_trips(tmp_path):
    model = quantize_(random_model("llama", tie_word_embeddings=True), "int8", include_embedding=True)
    save_quantized(model, tmp_path / "q")
    loaded = Llama.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    assert type(loaded.embed_tokens) is Int8Embedding and loaded.lm_head.scales.dtype == torch.bfloat16
    assert torch.equal(loaded.embed_tokens.qweight, model.embed_tokens.qweight)
    tied = quantize_(random_model("llama", tie_word_embeddings=True), "int8", include_lm_head=False)
    save_quantized(tied, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")  # stored once
    loaded = Llama.from_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


@pytest.fixture
def saved(tmp_path):
    """An int4 Llama (group size 32) saved to tmp_path / "q"."""
    path = tmp_path / "q"
    save_quantized(quantize_(random_model("llama"), "int4", group_size=32), path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_a_different_group_size_is_named(saved):
    edit_config(saved, group_size=64)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.scales' has 2 groups per row of "
                                              r"64 weights, i.e. group_size=32, but .* says group_size=64"):
        Llama.from_pretrained(saved)


def test_a_different_bit_width_is_named(saved):
    edit_config(saved, bits=8, group_size=None, scheme="symmetric-per-channel")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.qweight' in model.safetensors is "
                                              r"torch.uint8, but .* says bits=8, stored as torch.int8"):
        Llama.from_pretrained(saved)


def test_a_missing_scale_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.down_proj\.scales"):
        Llama.from_pretrained(saved)


@pytest.mark.parametrize("changes, message", [
    (dict(quant_method="gptq"), "quant_method='gptq'; this loader reads only what companion.quantize.save_quantized"),
    (dict(bits=3), "bits=3; this loader knows 8 and 4"),
    (dict(group_size=48), "group_size=48; int4 group sizes are 32, 64, 128"),
    (dict(scheme="symmetric-per-group"), "scheme='symmetric-per-group'; 4-bit weights here are 'asymmetric-per-group'"),
    (dict(modules=["model.layers.7.mlp.up_proj"]), "lists 'model.layers.7.mlp.up_proj', which the model does not have"),
    (dict(modules=["model.norm"]), "lists 'model.norm', a RMSNorm; only linear layers and embeddings"),
])
def test_bad_quantization_config_fields_are_named(saved, changes, message):
    edit_config(saved, **changes)
    with pytest.raises(CheckpointError, match=message):
        Llama.from_pretrained(saved)


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    assert type(Llama.from_pretrained(saved).lm_head) is Int4Linear


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match=r"no quantized layers: call quantize_\(model, 'int8' or 'int4'\) first"):
        save_quantized(random_model(), tmp_path / "q")
