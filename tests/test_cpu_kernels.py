"""The C decoding kernels (companion.cpu_kernels) against float64, across CPU variants, and in the layers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import cpu_kernels
from companion.device import plan_device
from companion.layers import sdpa_attention
from companion.quantize import Int4Linear, Int8Linear, quantize_, quantize_int4, quantize_int8, unpack_int4

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels are not available here")
CPU_PLAN = plan_device("cpu", verbose=False)
needs_compile = pytest.mark.skipif(not CPU_PLAN.compile, reason="; ".join(CPU_PLAN.reasons))


def make_int4(N, K, group_size, seed=0):
    """A quantized random matrix: (q unpacked, scales, mins) and the float64 weight it stands for."""
    g = torch.Generator().manual_seed(seed)
    packed, scales, mins = quantize_int4(torch.randn(N, K, generator=g) * 0.05, group_size)
    q = unpack_int4(packed)
    # the kernel reads scales and minimums as float16: the exact reference uses those values
    s16, m16 = scales.half().double(), mins.half().double()
    w = (q.double().view(N, -1, group_size) * s16[..., None] + m16[..., None]).view(N, K)
    return q, scales, mins, w


def make_int8(N, K, seed=0):
    qweight, scales = quantize_int8(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return qweight, scales, qweight.double() * scales.double()[:, None]


def rounding_bound(w, x, group_size, levels):
    """What rounding x to ``levels`` steps per group (127 for int8, 32767 for int16) can cost."""
    xg = x.double().view(-1, group_size)
    step = xg.abs().amax(-1, keepdim=True) / levels
    return w.abs() @ (0.501 * step).expand_as(xg).reshape(-1)


def int4_bound(w, x, scales, mins, group_size):
    """Rounding x to int8, plus float32 sums: the scale and minimum terms are summed separately."""
    G = scales.size(1)
    terms = (15 * scales.double().abs() + mins.double().abs()) * x.double().abs().view(G, -1).sum(-1)  # (N, G)
    return rounding_bound(w, x, group_size, 127) + 4e-6 * terms.sum(-1) + 1e-30


def int8_bound(w, x):
    return rounding_bound(w, x, cpu_kernels.INT8_GROUP, 32767) + 1e-6 * (w.abs() @ x.double().abs()) + 1e-30


def x_with_uneven_groups(K, seed, group_size):
    x = torch.randn(K, generator=torch.Generator().manual_seed(seed)) * (10.0 ** (seed - 1))
    x[:group_size] *= 1e-3  # groups with very different ranges
    return x


@pytest.mark.parametrize("N,K,group_size", [(16, 64, 64), (48, 96, 32), (64, 256, 128), (2816, 1024, 64),
                                            (1024, 2816, 64), (32, 384, 128)])
def test_int4_matches_float64_within_the_rounding_of_x(N, K, group_size):
    q, scales, mins, w = make_int4(N, K, group_size, seed=N + K)
    packed = cpu_kernels.pack_int4(q, scales, mins, group_size)
    assert packed.shape == (N // 16, K // group_size, group_size * 8 + 64)
    for seed in range(3):
        x = x_with_uneven_groups(K, seed, group_size)
        y = cpu_kernels.int4_gemv(packed, x, N, group_size)
        assert y.dtype == torch.float32 and y.shape == (N,)
        err, bound = (y.double() - w @ x.double()).abs(), int4_bound(w, x, scales, mins, group_size)
        assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
        assert err.max() > 0  # x was rounded: an exact result would mean it was not


@pytest.mark.parametrize("N,K", [(1, 256), (4, 512), (7, 256), (33, 768), (1024, 2816), (2816, 1024)])
def test_int8_matches_float64_within_the_rounding_of_x(N, K):
    qweight, scales, w = make_int8(N, K, seed=N + K)
    for seed in range(3):
        x = x_with_uneven_groups(K, seed, cpu_kernels.INT8_GROUP)
        y = cpu_kernels.int8_gemv(qweight, scales, x)
        assert y.dtype == torch.float32 and y.shape == (N,)
        err, bound = (y.double() - w @ x.double()).abs(), int8_bound(w, x)
        assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_the_kernels_compute_what_their_pytorch_references_say(group_size):
    """The same integers as the readable versions (chapter 12 writes them): only float sums differ."""
    q, scales, mins, _ = make_int4(96, 512, group_size, seed=group_size)
    packed = cpu_kernels.pack_int4(q, scales, mins, group_size)
    qweight, scales8, w8 = make_int8(96, 512, seed=group_size)
    for seed in range(3):
        x = x_with_uneven_groups(512, seed, group_size)
        y = cpu_kernels.int4_gemv(packed, x, 96, group_size)
        reference = cpu_kernels.int4_gemv_reference(q, scales, mins, x, group_size)
        size = (15 * scales.double().abs() + mins.double().abs()) @ x.double().abs().view(-1, group_size).sum(-1)
        # 1e-6 of the sum of the terms' sizes: about 1e-4 here, ten times less than what one
        # input rounded to the neighbouring integer would move a row
        assert ((y.double() - reference.double()).abs() <= 1e-6 * size).all()
        y8, reference8 = cpu_kernels.int8_gemv(qweight, scales8, x), cpu_kernels.int8_gemv_reference(qweight, scales8, x)
        assert ((y8.double() - reference8.double()).abs() <= 1e-6 * (w8.abs() @ x.double().abs())).all()


@pytest.mark.parametrize("group_size", [16, 48, 80])
def test_int4_group_sizes_outside_the_quantizers_choices(group_size):
    """The layout takes any multiple of 16 (quantize_int4 offers 32, 64 and 128): a group whose
    chunks are not a multiple of four must still stop at its own end, in every variant."""
    N, K = 32, 4 * group_size
    g = torch.Generator().manual_seed(group_size)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = (0.005 + 0.01 * torch.rand(N, K // group_size, generator=g)).half().float()  # as float16 holds them
    mins = (0.05 * torch.randn(N, K // group_size, generator=g)).half().float()
    packed = cpu_kernels.pack_int4(q, scales, mins, group_size)
    x = x_with_uneven_groups(K, 1, group_size)
    reference = cpu_kernels.int4_gemv_reference(q, scales, mins, x, group_size)
    size = (15 * scales.double().abs() + mins.double().abs()) @ x.double().abs().view(-1, group_size).sum(-1)
    for name in cpu_kernels.variants_here():
        y = cpu_kernels.run_variant(name, "int4", packed, x, N, group_size)
        assert ((y.double() - reference.double()).abs() <= 1e-6 * size).all(), name


def test_int4_rows_and_inputs_land_in_their_place():
    """One nonzero weight at a time: the layout puts every (row, input) where the kernel reads it."""
    N, K, gs = 32, 64, 32
    scales, mins = torch.ones(N, K // gs), torch.zeros(N, K // gs)
    for n, k in [(0, 0), (5, 7), (15, 33), (16, 1), (31, 63), (20, 36), (9, 12), (3, 4), (3, 3)]:
        q = torch.zeros(N, K, dtype=torch.uint8)
        q[n, k] = 3
        packed = cpu_kernels.pack_int4(q, scales, mins, gs)
        x = torch.zeros(K)
        x[k] = 2.0
        y = cpu_kernels.int4_gemv(packed, x, N, gs)
        assert y.nonzero().flatten().tolist() == [n], (n, k, y.nonzero())
        assert y[n].item() == 6.0  # 3 * 2: x's group holds one value, which int8 keeps exactly


def test_int8_rows_and_inputs_land_in_their_place():
    N, K = 9, 512  # rows in fours and a tail of one
    for n, k in [(0, 0), (3, 255), (4, 256), (8, 511), (5, 17)]:
        qweight = torch.zeros(N, K, dtype=torch.int8)
        qweight[n, k] = -3
        x = torch.zeros(K)
        x[k] = 2.0
        y = cpu_kernels.int8_gemv(qweight, torch.full((N,), 0.5), x)
        assert y.nonzero().flatten().tolist() == [n] and y[n].item() == -3.0, (n, k, y)


@pytest.mark.parametrize("kernel", ["int4", "int8"])
def test_nan_comes_out_as_nan_and_tiny_groups_as_small_numbers(kernel):
    """A NaN must reach the output (max_ps alone drops it); a group too small for 127 / max|x|
    in float32 rounds to zeros, not to a wrong sign."""
    q, scales, mins, w4 = make_int4(32, 512, 64)
    qweight, scales8, w8 = make_int8(32, 512)
    w = w4 if kernel == "int4" else w8

    def run(x):
        if kernel == "int4":
            return cpu_kernels.int4_gemv(cpu_kernels.pack_int4(q, scales, mins, 64), x, 32, 64)
        return cpu_kernels.int8_gemv(qweight, scales8, x)

    x = torch.randn(512)
    x[300] = float("nan")
    assert torch.isnan(run(x)).all()
    tiny = torch.randn(512)
    tiny[256:] *= 1e-37  # 127 / max|x| overflows float32 in these groups
    y = run(tiny)
    assert torch.isfinite(y).all()
    bound = int8_bound(w, tiny) if kernel == "int8" else int4_bound(w, tiny, scales, mins, 64)
    assert ((y.double() - w @ tiny.double()).abs() <= bound + 1e-36).all()


def test_int4_zero_input_and_minimums():
    q, scales, mins, w = make_int4(32, 128, 64, seed=3)
    packed = cpu_kernels.pack_int4(q, scales, mins, 64)
    assert torch.equal(cpu_kernels.int4_gemv(packed, torch.zeros(128), 32, 64), torch.zeros(32))
    x = torch.ones(128)  # rounds exactly: the result is the float64 one up to float32 sums
    torch.testing.assert_close(cpu_kernels.int4_gemv(packed, x, 32, 64).double(), w @ x.double(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 48, 64, 128])
def test_int4_largest_products_sum_without_overflow(group_size):
    """Every weight 15 and every input rounded to +-127: the largest partial sums the kernel
    keeps (in int16 on AVX2, then int32) must still be exact."""
    N, K = 32, 8 * group_size
    q = torch.full((N, K), 15, dtype=torch.uint8)
    packed = cpu_kernels.pack_int4(q, torch.ones(N, K // group_size), torch.zeros(N, K // group_size), group_size)
    for name in cpu_kernels.variants_here():
        for sign in (1.0, -1.0):
            y = cpu_kernels.run_variant(name, "int4", packed, torch.full((2, K), sign), N, group_size)
            assert torch.equal(y, torch.full((2, N), sign * 15 * K)), (name, sign)


@pytest.mark.parametrize("kernel", ["int4", "int8", "attend"])
def test_every_variant_gives_the_same_bits(kernel):
    """AVX2 and AVX-512 (with and without VNNI) do the same operations in the same order."""
    names = cpu_kernels.variants_here()
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(5))  # rows at three offsets
    if kernel == "int4":
        q, scales, mins, _ = make_int4(2816, 1024, 64, seed=1)
        args = (cpu_kernels.pack_int4(q, scales, mins, 64), x, 2816, 64)
        through_the_operator = cpu_kernels.int4_gemv(*args)
    elif kernel == "attend":
        q, k, v = attention_inputs(2, 8, 2, 300, 64, seed=5)
        args = (q, k, v, torch.rand(2, 1, 300, generator=torch.Generator().manual_seed(5)) < 0.7)
        through_the_operator = cpu_kernels.attend_one(*args)
    else:
        qweight, scales, _ = make_int8(2817, 1024, seed=1)
        args = (qweight, scales, x)
        through_the_operator = cpu_kernels.int8_gemv(*args)
    results = {name: cpu_kernels.run_variant(name, kernel, *args) for name in names}
    for name in names:
        assert torch.equal(results[name], results["avx2"]), name
    assert torch.equal(results[cpu_kernels.variant()], through_the_operator)


def test_bad_layouts_are_refused():
    q, scales, mins, _ = make_int4(32, 128, 64)
    with pytest.raises(ValueError, match="out_features=24 must be a multiple of 16"):
        cpu_kernels.pack_int4(q[:24], scales[:24], mins[:24], 64)
    with pytest.raises(ValueError, match="group_size=48"):
        cpu_kernels.pack_int4(q, scales, mins, 48)
    with pytest.raises(ValueError, match=r"scales and mins must be \(32, 2\)"):
        cpu_kernels.pack_int4(q, scales[:, :1], mins, 64)
    with pytest.raises(ValueError, match="0 .. 15, got 0 .. 16"):
        cpu_kernels.pack_int4(q.clone().fill_(16).index_fill_(0, torch.tensor([0]), 0), scales, mins, 64)
    with pytest.raises(ValueError, match="scales do not fit float16"):
        cpu_kernels.pack_int4(q, scales * 1e-4, mins, 64)  # subnormal in float16
    with pytest.raises(ValueError, match="mins do not fit float16"):
        cpu_kernels.pack_int4(q, scales, mins * 1e6, 64)  # overflows float16
    packed = cpu_kernels.pack_int4(q, scales, mins, 64)
    with pytest.raises(RuntimeError, match="packed must be contiguous uint8"):
        cpu_kernels.int4_gemv(packed, torch.zeros(128), 48, 64)
    with pytest.raises(RuntimeError, match="x has 96 inputs per row; the matrix has 128"):
        cpu_kernels.int4_gemv(packed, torch.zeros(2, 96), 32, 64)
    qweight, scales8, _ = make_int8(8, 512)
    with pytest.raises(RuntimeError, match="in a multiple of 256"):
        cpu_kernels.int8_gemv(qweight[:, :128].contiguous(), scales8, torch.zeros(128))
    with pytest.raises(RuntimeError, match="scales has 7 elements for 8 rows"):
        cpu_kernels.int8_gemv(qweight, scales8[:7], torch.zeros(512))
    with pytest.raises(RuntimeError, match="x has 256 inputs per row; the matrix has 512"):
        cpu_kernels.int8_gemv(qweight, scales8, torch.zeros(2, 256))
    with pytest.raises(RuntimeError, match="the matrix has 0"):  # not a division by zero
        cpu_kernels.int8_gemv(torch.zeros(16, 0, dtype=torch.int8), torch.ones(16), torch.zeros(0))
    with pytest.raises(ValueError, match="must be one of"):
        cpu_kernels.compile_kernels("sse2")


@needs_compile
def test_compiled_graph_calls_the_operators():
    """torch.compile traces through the operators (their fakes) and gives the eager results exactly."""
    q, scales, mins, _ = make_int4(64, 256, 32)
    packed = cpu_kernels.pack_int4(q, scales, mins, 32)
    qweight, scales8, _ = make_int8(64, 256)

    def f(x):
        h = torch.ops.companion.int4_gemv(packed, x * 2, 64, 32)
        return torch.ops.companion.int8_gemv(qweight, scales8, torch.cat([h, h, h, h])) + 1

    x = torch.randn(256)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def relative_error(out, exact):
    return ((out.double().flatten() - exact).norm() / exact.norm()).item()


def test_int4_linear_decodes_with_the_kernel():
    layer = Int4Linear.from_linear(torch.nn.Linear(256, 96), group_size=64)
    assert layer.gemv_weight is not None
    x = torch.randn(1, 1, 256)
    y = layer(x)
    assert torch.equal(y, cpu_kernels.int4_gemv(layer.gemv_weight, x, 96, 64).view(1, 1, 96) + layer.bias)
    # against the layer's own float32 weights: int8 rounding of x costs about 0.5% (PyTorch's
    # kernel, with bfloat16 x, about 0.3%); int4 itself costs several percent of the float layer
    exact = layer.dequantize_weight().double() @ x.view(256).double() + layer.bias.double()
    assert relative_error(y, exact) < 1.5e-2
    copy_, layer.gemv_weight = layer.gemv_weight, None
    pytorch_kernel = layer(x)
    layer.gemv_weight = copy_
    assert relative_error(pytorch_kernel, exact) < 1.5e-2 and not torch.equal(pytorch_kernel, y)
    cpu_kernels.enabled = False  # the switch the benchmark uses
    try:
        assert torch.equal(layer(x), pytorch_kernel)
    finally:
        cpu_kernels.enabled = True
    # more than MAX_ROWS rows, and float64 (which asks for more than float32 sums), keep PyTorch's kernel
    rows, x64 = torch.randn(cpu_kernels.MAX_ROWS + 1, 256), torch.randn(1, 256, dtype=torch.float64)
    layer64 = Int4Linear.from_linear(torch.nn.Linear(256, 96).double(), group_size=64)
    assert layer64.gemv_weight is not None
    with_c = [layer(rows), layer64(x64)]
    layer.gemv_weight = layer64.gemv_weight = None
    assert torch.equal(with_c[0], layer(rows)) and torch.equal(with_c[1], layer64(x64))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_up_to_max_rows_each_row_gives_what_it_gives_alone(scheme):
    """A short prompt goes through the C kernels in one call; each row is rounded on its own."""
    linear = torch.nn.Linear(512, 48)
    layer = Int4Linear.from_linear(linear, group_size=32) if scheme == "int4" else Int8Linear.from_linear(linear)
    x = torch.randn(2, cpu_kernels.MAX_ROWS // 2, 512)
    y = layer(x)
    assert y.shape == (2, cpu_kernels.MAX_ROWS // 2, 48)
    for b, t in [(0, 0), (0, 17), (1, 5), (1, cpu_kernels.MAX_ROWS // 2 - 1)]:
        assert torch.equal(y[b, t], layer(x[b, t][None])[0])
    exact = x.double() @ layer.dequantize_weight().double().T + layer.bias.double()
    assert ((y.double() - exact).norm() / exact.norm()).item() < (1.5e-2 if scheme == "int4" else 1e-4)


def test_int8_linear_decodes_with_the_kernel():
    layer = Int8Linear.from_linear(torch.nn.Linear(512, 80))
    assert layer.c_kernel
    x = torch.randn(1, 1, 512)
    y = layer(x)
    assert torch.equal(y, cpu_kernels.int8_gemv(layer.qweight, layer.scales, x).view(1, 1, 80) + layer.bias)
    # int16 x: float32 accuracy, far better than PyTorch's kernel with bfloat16 x
    exact = layer.dequantize_weight().double() @ x.view(512).double() + layer.bias.double()
    layer.c_kernel = False
    pytorch_kernel = layer(x)
    layer.c_kernel = True
    assert relative_error(y, exact) < 1e-4 < relative_error(pytorch_kernel, exact) / 10
    assert not Int8Linear.from_linear(torch.nn.Linear(128, 16)).c_kernel  # 128 is not a multiple of 256
    layer64 = Int8Linear.from_linear(torch.nn.Linear(512, 80).double())  # float64: not the C kernel
    x64 = torch.randn(1, 512, dtype=torch.float64)
    with_c = layer64(x64)
    layer64.c_kernel = False
    assert layer64(x64).dtype == torch.float64 and torch.equal(with_c, layer64(x64))


def test_layers_without_the_kernels(monkeypatch):
    """Scales float16 cannot hold, or no kernels at all: the layers keep PyTorch's kernels."""
    tiny = Int4Linear.from_linear(torch.nn.Linear(128, 32), group_size=32)
    tiny.scales.mul_(1e-4)
    tiny.pack_for_kernel()
    assert tiny.gemv_weight is None and tiny.kernel_weight is not None
    with_kernels = [Int4Linear.from_linear(torch.nn.Linear(128, 32), group_size=32),
                    Int8Linear.from_linear(torch.nn.Linear(256, 16))]
    monkeypatch.setattr(cpu_kernels, "_load", lambda: (False, "no compiler"))
    assert not cpu_kernels.available() and cpu_kernels.unavailable_reason() == "no compiler"
    # a copy unpickled where the kernels do not run (here: deepcopy, which unpickles) drops them
    int4_copy, int8_copy = (copy.deepcopy(m) for m in with_kernels)
    assert int4_copy.gemv_weight is None and not int8_copy.c_kernel
    assert int4_copy(torch.randn(1, 128)).shape == (1, 32) and int8_copy(torch.randn(1, 256)).shape == (1, 16)
    layer = Int4Linear.from_linear(torch.nn.Linear(128, 32), group_size=32)
    assert layer.gemv_weight is None and not Int8Linear.from_linear(torch.nn.Linear(256, 16)).c_kernel
    x = torch.randn(1, 128)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="not available: no compiler"):
        cpu_kernels.int4_gemv(torch.zeros(2, 4, 320, dtype=torch.uint8), torch.zeros(128), 32, 32)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_decodes_with_the_kernels_eager_and_compiled(scheme):
    """A Llama whose widths the kernels take: every projection and the output layer use them
    token by token; the compiled step gives the eager tokens; the logits of one token at a time
    stay within the kernels' rounding of the same model's reference path over the whole sequence."""
    from companion.generation.static_cache import compile_step, decode
    from companion.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = quantize_(Llama(config).eval(), scheme, group_size=64)
    using = [m for m in model.modules() if getattr(m, "gemv_weight", None) is not None or getattr(m, "c_kernel", False)]
    assert len(using) == 2 * 7 + 1
    prompt = torch.randint(0, 512, (1, 5))
    eager = decode(model, prompt, 6, max_seq_len=16)
    if CPU_PLAN.compile:
        assert torch.equal(decode(model, prompt, 6, max_seq_len=16, step=compile_step(model)), eager)
    ids = eager[:, :10]
    with torch.no_grad():
        model.setup_cache(1, 16)
        one_at_a_time = torch.cat([model(ids[:, t:t + 1], start_pos=t) for t in range(10)], dim=1)
        cpu_kernels.enabled = False
        try:
            reference = copy.deepcopy(model)
            for m in reference.modules():
                if hasattr(m, "reference_forward"):
                    m.forward = m.reference_forward
            exact = reference(ids)
        finally:
            cpu_kernels.enabled = True
    error = ((one_at_a_time - exact).abs().max() / exact.abs().max()).item()
    assert error < (1e-4 if scheme == "int8" else 5e-2), error


# ---- one query per head over a KV cache ------------------------------------------------------


def attention_inputs(B, H, KV, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, 1, D, generator=g), torch.randn(B, KV, S, D, generator=g),
            torch.randn(B, KV, S, D, generator=g))


def exact_attention(q, k, v, mask):
    """float64 from the definition: softmax over the allowed slots, zeros where none is allowed."""
    G, S = q.size(1) // k.size(1), k.size(2)
    k, v = k.double().repeat_interleave(G, dim=1), v.double().repeat_interleave(G, dim=1)  # (B, H, S, D)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, 1, S)
    allowed = mask.reshape(-1, 1, 1, S)
    weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    return weights @ v


def some_mask(kind, B, S, seed):
    g = torch.Generator().manual_seed(seed)
    p = int(torch.randint(0, S, (1,), generator=g))  # the query's position
    j = torch.arange(S)
    if kind == "prefix":  # a cache allocated for S positions, written up to p
        return (j <= p)[None]  # (1, S)
    if kind == "window":  # sliding window of 7 over a rolling cache
        return ((j <= p) & (j > p - 7))[None]
    return torch.rand(B, 1, S, generator=g) < 0.5  # (B, 1, S): one row per sequence (left padding), some empty


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), KV=st.integers(1, 4), G=st.integers(1, 4), S=st.integers(1, 300),
       D=st.sampled_from([8, 16, 64, 80, 128]), kind=st.sampled_from(["prefix", "window", "random"]),
       seed=st.integers(0, 2 ** 16))
def test_attend_one_matches_float64_attention(B, KV, G, S, D, kind, seed):
    """Grouped heads, any cache length, masks of one row or one per sequence, rows with no allowed slot."""
    q, k, v = attention_inputs(B, KV * G, KV, S, D, seed)
    mask = some_mask(kind, B, S, seed)
    out = cpu_kernels.attend_one(q, k, v, mask)
    exact = exact_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == torch.float32
    # float32's rounding of sums of at most 300 terms of unit size, and of the exponentials
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6)
    sdpa_mask = mask if mask.dim() == 2 else mask[:, None]
    by_pytorch = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True)
    torch.testing.assert_close(out, by_pytorch.nan_to_num(0.0), rtol=0, atol=2e-6)  # NaN for no slot before 2.13


def test_attend_one_leaves_out_the_slots_the_mask_hides():
    """NaN in every hidden slot changes no bit: those keys and values take no part."""
    q, k, v = attention_inputs(2, 8, 4, 100, 64, seed=3)
    mask = some_mask("random", 2, 100, seed=3)
    clean = cpu_kernels.attend_one(q, k, v, mask)
    hidden = ~mask.view(2, 1, 100, 1).expand(2, 4, 100, 64)
    poisoned = cpu_kernels.attend_one(q, k.masked_fill(hidden, math.nan), v.masked_fill(hidden, math.nan), mask)
    assert torch.equal(poisoned, clean) and clean.isfinite().all()
    # and a NaN in an allowed slot reaches the output of its heads only (key/value head 0: query heads 0, 1)
    k[0, 0, int(mask[0, 0].nonzero()[0])] = math.nan
    out = cpu_kernels.attend_one(q, k, v, mask)
    assert out[0, :2].isnan().all() and out[0, 2:].isfinite().all() and torch.equal(out[1], clean[1])


def test_attend_one_gives_the_same_bits_for_any_cache_length():
    """The written slots of a cache of 16 positions or of 4096 give the same bits, whatever the
    mask's shape: (S,), (1, S) or (1, 1, S)."""
    q, k, v = attention_inputs(1, 4, 2, 16, 32, seed=4)
    big_k, big_v = torch.randn(1, 2, 4096, 32), torch.randn(1, 2, 4096, 32)
    big_k[:, :, :16], big_v[:, :, :16] = k, v
    small = cpu_kernels.attend_one(q, k, v, torch.arange(16)[None] <= 9)
    for mask in (torch.arange(4096) <= 9, torch.arange(4096)[None] <= 9, torch.arange(4096)[None, None] <= 9):
        assert torch.equal(cpu_kernels.attend_one(q, big_k, big_v, mask), small)


def test_attend_one_reads_a_slice_of_a_cache_where_it_lies():
    """The first S slots of a longer cache (what ``KVCache.update`` returns for an int
    ``start_pos``), read in place, give the bits of the same slots copied out; so do keys whose
    rows are not contiguous (copied by the operator)."""
    q, k, v = attention_inputs(3, 6, 3, 40, 16, seed=6)
    big_k, big_v = torch.full((3, 3, 512, 16), math.nan), torch.full((3, 3, 512, 16), math.nan)
    big_k[:, :, :40], big_v[:, :, :40] = k, v
    mask = (torch.rand(3, 1, 40, generator=torch.Generator().manual_seed(1)) < 0.6) | (torch.arange(40) == 0)
    expected = cpu_kernels.attend_one(q, k, v, mask)
    assert expected.isfinite().all()
    assert torch.equal(cpu_kernels.attend_one(q, big_k[:, :, :40], big_v[:, :, :40], mask), expected)
    k_rows_apart = k.transpose(2, 3).contiguous().transpose(2, 3)  # (B, KV, S, D), each row strided
    assert torch.equal(cpu_kernels.attend_one(q, k_rows_apart, v, mask), expected)
    shared = mask[0]  # (1, S): one mask row for every sequence of the batch
    assert torch.equal(cpu_kernels.attend_one(q, big_k[:, :, :40], big_v[:, :, :40], shared),
                       cpu_kernels.attend_one(q, k, v, shared))

def test_bad_attention_inputs_are_refused():
    q, k, v = attention_inputs(2, 6, 3, 10, 16, seed=0)
    mask = torch.ones(1, 10, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"q must be \(B, H, 1, D\): one query per head"):
        cpu_kernels.attend_one(torch.randn(2, 6, 2, 16), k, v, mask)
    with pytest.raises(RuntimeError, match="H=6 query heads must be a multiple of KV=4"):
        cpu_kernels.attend_one(q, torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16), mask)
    with pytest.raises(RuntimeError, match="head dimension D=12 must be a positive multiple of 8"):
        cpu_kernels.attend_one(q[..., :12], k[..., :12], v[..., :12], mask)
    with pytest.raises(RuntimeError, match="k and v must be"):
        cpu_kernels.attend_one(q, k, v[:, :, :9], mask)
    with pytest.raises(RuntimeError, match="must be float32 on the CPU; got Double"):
        cpu_kernels.attend_one(q.double(), k.double(), v.double(), mask)
    with pytest.raises(RuntimeError, match=r"with S=10 entries; got Bool \[1, 9\]"):
        cpu_kernels.attend_one(q, k, v, torch.ones(1, 9, dtype=torch.bool))
    for bad in [torch.ones(3, 1, 10), torch.ones(2, 10), torch.ones(1, 6, 1, 10), torch.ones(2, 6, 10)]:
        with pytest.raises(RuntimeError, match=r"mask must be bool \(S,\), \(1, S\), or \(1 or B, 1, S\)"):
            cpu_kernels.attend_one(q, k, v, bad.bool())  # another batch, a row per head, a row per query
    with pytest.raises(RuntimeError, match="mask must be bool"):
        cpu_kernels.attend_one(q, k, v, torch.zeros(1, 10))  # an additive float mask
    with pytest.raises(ValueError, match="'int4', 'int8' or 'attend'"):
        cpu_kernels.run_variant("avx2", "attention", q, k, v, mask)


def test_sdpa_attention_sends_a_decoding_step_to_the_kernel(monkeypatch):
    """One query, float32, no gradient: the kernel's bits; with a gradient to compute, or the
    switch off, PyTorch's kernel."""
    q, k, v = attention_inputs(1, 8, 2, 50, 64, seed=6)
    mask = torch.arange(50)[None] <= 30
    with torch.no_grad():
        assert torch.equal(sdpa_attention(q, k, v, mask), cpu_kernels.attend_one(q, k, v, mask))
        monkeypatch.setattr(cpu_kernels, "attention_enabled", False)
        by_pytorch = sdpa_attention(q, k, v, mask)
        assert torch.equal(by_pytorch, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        monkeypatch.setattr(cpu_kernels, "attention_enabled", True)
    q.requires_grad_(True)
    y = sdpa_attention(q, k, v, mask)
    assert y.grad_fn is not None and torch.equal(y.detach(), by_pytorch)
    assert not cpu_kernels.takes_attention(torch.randn(1, 8, 2, 64), k, v, mask)  # a prompt: several queries
    assert not cpu_kernels.takes_attention(q.detach().double(), k.double(), v.double(), mask)
    assert not cpu_kernels.takes_attention(q.detach(), k, v.bfloat16(), mask)
    additive = torch.zeros(1, 50).masked_fill(~mask, -math.inf)  # a float mask: PyTorch's kernel takes it
    with torch.no_grad():
        assert not cpu_kernels.takes_attention(q, k, v, additive)
        torch.testing.assert_close(sdpa_attention(q, k, v, additive), by_pytorch, rtol=0, atol=1e-6)


def test_a_decoding_step_reads_only_the_written_slots_of_its_cache():
    """A Llama decoding with a cache of 16 positions, or of 1024 whose unwritten slots hold NaN:
    the same logits to the bit, eager and compiled (PyTorch's kernel would read the NaN)."""
    from companion.generation.static_cache import compile_step
    from companion.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = Llama(config).eval()
    prompt = torch.randint(0, 128, (1, 6))
    steps = [lambda tok, pos: model(tok, start_pos=pos, last_only=True)]
    if CPU_PLAN.compile:
        steps.append(compile_step(model))
    with torch.no_grad():
        for step in steps:
            logits = {}
            for length in (16, 1024):
                model.setup_cache(1, length)
                model(prompt, start_pos=0)
                for block in model.layers:  # slots 7 and later are written by no step below
                    block.self_attn.cache.k[:, :, 7:] = math.nan
                    block.self_attn.cache.v[:, :, 7:] = math.nan
                logits[length] = step(torch.tensor([[7]]), torch.tensor(6))
            assert logits[1024].isfinite().all() and torch.equal(logits[16], logits[1024])
