"""Fused projections (companion.fusion): the same outputs, gradients and tokens as the separate matrices."""

import copy

import pytest
import torch
from _tiny_models import random_model

from companion import cpu_kernels
from companion.checkpoint import hf_state_dict, load_hf_state_dict, save_pretrained
from companion.device import plan_device
from companion.fusion import concat_linears, fuse_projections, is_fused, split_linear, unfuse_projections
from companion.generation.static_cache import compile_step, decode
from companion.layers import Linear
from companion.llama import Llama, LlamaConfig
from companion.quantize import Int4Linear, Int8Linear, quantize_

CPU_PLAN = plan_device("cpu", verbose=False)
needs_compile = pytest.mark.skipif(not CPU_PLAN.compile, reason="; ".join(CPU_PLAN.reasons))
FAMILIES = ["llama", "mistral", "phi"]  # llama: grouped key/value heads; phi: biases, no SwiGLU


def fused_copy(model):
    return fuse_projections(copy.deepcopy(model))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_fused_model_computes_what_the_separate_matrices_compute(name):
    model = random_model(name)
    fused = fused_copy(model)
    assert is_fused(fused) and not is_fused(model)
    for attn in (m for m in fused.modules() if hasattr(m, "qkv_proj")):
        assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert sum(attn.qkv_widths) == attn.qkv_proj.out_features
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(decode(fused, ids, 8), decode(model, ids, 8))  # with the KV cache, token by token


@pytest.mark.parametrize("name", FAMILIES)
def test_unfusing_gives_back_the_same_tensors(name):
    model = random_model(name)
    back = unfuse_projections(fused_copy(model))
    assert not is_fused(back)
    original, restored = model.state_dict(), back.state_dict()
    assert list(restored) == list(original)  # the same names, in the same order
    assert all(torch.equal(restored[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["llama", "phi"])  # phi: biases; llama: SwiGLU's gate and up
def test_gradients_of_the_fused_matrices_are_the_separate_ones_stacked(name):
    model = copy.deepcopy(random_model(name))
    fused = fused_copy(model)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    for m in (model, fused):
        m.zero_grad()
        m(ids).logsumexp(-1).mean().backward()
    pairs = []
    for block, fblock in zip(model.layers, fused.layers):
        attn, fattn = block.self_attn, fblock.self_attn
        pairs.append((fattn.qkv_proj, (attn.q_proj, attn.k_proj, attn.v_proj)))
        if name == "llama":
            pairs.append((fblock.mlp.gate_up_proj, (block.mlp.gate_proj, block.mlp.up_proj)))
    for stacked, parts in pairs:
        for what in ("weight", "bias"):
            if getattr(stacked, what) is not None:
                torch.testing.assert_close(getattr(stacked, what).grad,
                                           torch.cat([getattr(p, what).grad for p in parts]), rtol=1e-5, atol=1e-6)


def kernel_llama():
    """A Llama whose widths the C kernels take (int8: multiples of 256; int4: groups of 64)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Llama(config).eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_then_fusing_is_fusing_then_quantizing(scheme):
    model = kernel_llama()
    a = fuse_projections(quantize_(copy.deepcopy(model), scheme, group_size=64))
    b = quantize_(fuse_projections(copy.deepcopy(model)), scheme, group_size=64)
    kind = Int8Linear if scheme == "int8" else Int4Linear
    assert type(a.layers[0].self_attn.qkv_proj) is kind and type(a.layers[0].mlp.gate_up_proj) is kind
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_quantized_layers_give_the_separate_layers_outputs(scheme):
    """With the C kernels, each output row is computed the same way whatever the other rows: the
    same bits; with PyTorch's kernels, within float rounding."""
    model = quantize_(kernel_llama(), scheme, group_size=64)
    fused = fused_copy(model)
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    if cpu_kernels.available():
        kernels = [m for m in fused.modules() if getattr(m, "gemv_weight", None) is not None or getattr(m, "c_kernel", False)]
        assert len(kernels) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the output layer
        assert torch.equal(decode(fused, prompt, 6, max_seq_len=16), decode(model, prompt, 6, max_seq_len=16))
    cpu_kernels.enabled = False
    try:
        with torch.no_grad():
            torch.testing.assert_close(fused(prompt), model(prompt), rtol=1e-4, atol=1e-4)
    finally:
        cpu_kernels.enabled = True


@needs_compile
def test_a_fused_float_model_decodes_the_same_compiled():
    """Linear's compiled one-row path, then split and chunk: the eager tokens."""
    model = fused_copy(random_model("llama"))
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(6))
    eager = decode(model, prompt, 8, max_seq_len=16)
    assert torch.equal(decode(model, prompt, 8, max_seq_len=16, step=compile_step(model)), eager)


def test_a_model_that_does_not_stack_is_left_as_it_was():
    model = copy.deepcopy(random_model("llama"))
    model.layers[1].self_attn.k_proj = Int8Linear.from_linear(model.layers[1].self_attn.k_proj)
    before = model.state_dict()
    with pytest.raises(TypeError, match=r"layers\[1\] is a Int8Linear"):
        fuse_projections(model)
    assert not is_fused(model) and list(model.state_dict()) == list(before)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_switched_off_kernels_stay_off_through_stacking_and_splitting(scheme):
    model = quantize_(kernel_llama(), scheme, group_size=64)
    attn = model.layers[0].self_attn
    if scheme == "int8":
        attn.k_proj.c_kernel = False
    else:
        attn.k_proj.gemv_weight = None
    fuse_projections(model)
    on = [m for m in model.modules() if getattr(m, "gemv_weight", None) is not None or getattr(m, "c_kernel", False)]
    assert model.layers[0].self_attn.qkv_proj not in on  # one part was off: the stack is off
    if cpu_kernels.available():
        assert model.layers[1].self_attn.qkv_proj in on and model.layers[0].mlp.gate_up_proj in on
    unfuse_projections(model)
    assert not any(getattr(m, "gemv_weight", None) is not None or getattr(m, "c_kernel", False)
                   for m in (model.layers[0].self_attn.q_proj, model.layers[0].self_attn.k_proj))


@needs_compile
def test_a_fused_int4_model_decodes_the_same_compiled():
    model = fuse_projections(quantize_(kernel_llama(), "int4", group_size=64))
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(4))
    eager = decode(model, prompt, 6, max_seq_len=16)
    assert torch.equal(decode(model, prompt, 6, max_seq_len=16, step=compile_step(model)), eager)


def test_fusing_twice_changes_nothing():
    model = fused_copy(random_model("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_checkpoints_refuse_a_fused_model(tmp_path):
    model = fused_copy(random_model("mistral"))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn holds fused projections.*unfuse_projections"):
        save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="unfuse_projections"):
        hf_state_dict(model)
    with pytest.raises(ValueError, match="unfuse_projections"):
        load_hf_state_dict(model, {}, {})
    assert not (tmp_path / "config.json").exists()
    save_pretrained(unfuse_projections(model), tmp_path)  # after unfusing it saves
    assert (tmp_path / "model.safetensors").exists()


def test_bad_stacks_are_refused():
    a, b = Linear(4, 2), Linear(4, 3)
    with pytest.raises(ValueError, match="at least 2 layers, got 1"):
        concat_linears([a])
    with pytest.raises(ValueError, match=r"layers\[1\] has in_features=5, layers\[0\] 4"):
        concat_linears([a, Linear(5, 2)])
    with pytest.raises(ValueError, match=r"layers\[1\] has no bias and layers\[0\] has a bias"):
        concat_linears([a, Linear(4, 2, bias=False)])
    with pytest.raises(TypeError, match=r"layers\[1\] is a Int8Linear"):
        concat_linears([a, Int8Linear.from_linear(Linear(4, 2))])
    with pytest.raises(ValueError, match="group_size=32, layers\\[0\\] 64"):
        concat_linears([Int4Linear.from_linear(Linear(64, 16), 64), Int4Linear.from_linear(Linear(64, 16), 32)])
    with pytest.raises(ValueError, match="float64"):
        concat_linears([a, Linear(4, 2).double()])
    with pytest.raises(TypeError, match="cannot stack a ReLU"):
        concat_linears([a, torch.nn.ReLU()])

    class Scaled(torch.nn.Linear):  # a subclass's own forward would be lost in the stack
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="cannot stack a Scaled"):
        concat_linears([a, Scaled(4, 2)])
    frozen = Linear(4, 2)
    frozen.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layers\[1\]\.weight\.requires_grad=False, layers\[0\]'s True"):
        concat_linears([a, frozen])
    with pytest.raises(ValueError, match=r"widths=\(2, 2\) must be positive integers that add up to out_features=5"):
        split_linear(concat_linears([a, b]), (2, 2))
    with pytest.raises(ValueError, match="GPT has no attention of Llama, Mistral or Phi"):
        fuse_projections(copy.deepcopy(random_model("gpt")))


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_stacked_layers_split_back_exactly(kind):
    torch.manual_seed(5)
    layers = [torch.nn.Linear(64, n) for n in (16, 32, 48)]
    if kind == "int8":
        layers = [Int8Linear.from_linear(layer) for layer in layers]
    elif kind == "int4":
        layers = [Int4Linear.from_linear(layer, group_size=32) for layer in layers]
    stacked = concat_linears(layers)
    x = torch.randn(3, 64)
    cpu_kernels.enabled = False  # PyTorch's kernels: the stacked matrix has another shape, so compare within rounding
    try:
        torch.testing.assert_close(stacked(x), torch.cat([layer(x) for layer in layers], -1), rtol=1e-5, atol=1e-5)
    finally:
        cpu_kernels.enabled = True
    for part, layer in zip(split_linear(stacked, (16, 32, 48)), layers):
        assert type(part) is (Linear if kind == "float" else type(layer))
        sp, sl = part.state_dict(), layer.state_dict()
        assert list(sp) == list(sl) and all(torch.equal(sp[k], sl[k]) for k in sl)
