"""Hidden tests for chapter 10's exercises (Phi-2)."""

from companion.grading import hidden


@hidden("parallel_residual")
def test_parallel_residual_distinct_branches(parallel_residual):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(100)
    x = torch.randn(2, 3, 4, generator=gen)

    def norm(t):
        return 2 * t - 1

    def attn(h):
        return h.pow(2)

    def mlp(h):
        return 3 * h + 0.5

    h = 2 * x - 1
    expected = x + h.pow(2) + (3 * h + 0.5)
    expect_same(parallel_residual(x, norm, attn, mlp), expected,
                "norm(t) = 2t - 1, attn(h) = h**2, mlp(h) = 3h + 0.5 (both branches read norm(x), not x)")
    expect_same(parallel_residual(x, norm, attn, lambda h: torch.zeros_like(h)), x + h.pow(2),
                "an MLP branch that returns zeros")
    expect_same(parallel_residual(x, norm, lambda h: torch.zeros_like(h), mlp), x + 3 * h + 0.5,
                "an attention branch that returns zeros")


@hidden("parallel_residual")
def test_parallel_residual_float64_layer_norm(parallel_residual):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(101)
    x = torch.randn(1, 1, 6, generator=gen, dtype=torch.float64)  # one token
    w_a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    w_m = torch.randn(6, 6, generator=gen, dtype=torch.float64)

    def norm(t):
        return F.layer_norm(t, (6,))

    def attn(h):
        return h @ w_a

    def mlp(h):
        return torch.tanh(h @ w_m)

    h = F.layer_norm(x, (6,))
    expected = x + h @ w_a + torch.tanh(h @ w_m)
    expect_same(parallel_residual(x, norm, attn, mlp), expected,
                "float64, one token, LayerNorm and two different linear branches")


@hidden("parallel_residual")
def test_parallel_residual_phi_block_float64(parallel_residual):
    import torch
    from companion.grading import expect_same
    from companion.layers import rope_cos_sin
    from companion.phi import Block, PhiConfig
    config = PhiConfig.preset("tiny", hidden_size=48, intermediate_size=100, num_attention_heads=3)
    torch.manual_seed(102)
    blk = Block(config).eval().double()
    gen = torch.Generator().manual_seed(103)
    for T in [1, 5]:
        x = torch.randn(2, T, config.hidden_size, generator=gen, dtype=torch.float64)
        cos, sin = rope_cos_sin(torch.arange(T), config.rotary_dim, dtype=torch.float64)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        with torch.no_grad():
            expected = blk(x, cos, sin, mask, None)
            got = parallel_residual(x, blk.input_layernorm, lambda h: blk.self_attn(h, cos, sin, mask, None), blk.mlp)
        expect_same(got, expected, f"a Phi block in float64, batch 2, T={T}")


@hidden("rope_partial")
def test_rope_partial_other_splits(rope_partial):
    import torch
    from companion.grading import expect_same
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(104)
    cases = [
        ("rotary_dim = 2 (one pair), D = 6", torch.randn(2, 1, 3, 6, generator=gen), torch.arange(3), 2),
        ("one token (T = 1) at position 7, D = 12, rotary_dim = 4", torch.randn(1, 3, 1, 12, generator=gen),
         torch.tensor([7]), 4),
        ("Phi-2's head: D = 80, rotary_dim = 32, positions 20..23", torch.randn(1, 2, 4, 80, generator=gen),
         torch.arange(20, 24), 32),
        ("Phi-1.5's head: D = 64, rotary_dim = 32", torch.randn(2, 2, 3, 64, generator=gen), torch.arange(3), 32),
        ("an odd number of features left alone: D = 11, rotary_dim = 8", torch.randn(1, 1, 5, 11, generator=gen),
         torch.arange(5), 8),
    ]
    for case, x, positions, R in cases:
        expected = apply_rope(x, *rope_cos_sin(positions, R))
        expect_same(rope_partial(x, positions, R), expected, case)


@hidden("rope_partial")
def test_rope_partial_pass_through_and_float64(rope_partial):
    import torch
    from companion.grading import expect_same
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(105)
    x = torch.randn(2, 2, 6, 20, generator=gen, dtype=torch.float64)
    positions = torch.tensor([3, 1, 4, 1, 5, 9])
    got = rope_partial(x, positions, 8)
    if (isinstance(got, torch.Tensor) and got.shape == x.shape and got.dtype == x.dtype
            and not torch.equal(got[..., 8:], x[..., 8:])):
        raise AssertionError("D = 20, rotary_dim = 8: features 8..19 must come back unchanged")
    expected = apply_rope(x, *rope_cos_sin(positions, 8))  # float64: x times float32 angles
    expect_same(got, expected, "float64 input, D = 20, rotary_dim = 8 (the output stays float64)")


@hidden("rope_partial")
def test_rope_partial_own_code(rope_partial):
    import torch
    from companion.grading import expect_same, forbidding
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(106)
    x, positions = torch.randn(1, 2, 4, 20, generator=gen), torch.arange(4)
    expected = apply_rope(x, *rope_cos_sin(positions, 8))
    names = ["companion.layers.apply_rope", "companion.layers.rope_cos_sin", "companion.layers.rope_inv_freq",
             "companion.layers.rotate_half"]
    try:
        import transformers.models.phi.modeling_phi as hf_phi
        names += [f"transformers.models.phi.modeling_phi.{n}" for n in ("apply_rotary_pos_emb", "rotate_half")
                  if hasattr(hf_phi, n)]
    except ImportError:
        pass
    with forbidding(rope_partial, *names):
        got = rope_partial(x, positions, 8)
    expect_same(got, expected, "D = 20, rotary_dim = 8, without companion's rope helpers")


@hidden("gelu_approx")
def test_gelu_approx_shapes_and_tails(gelu_approx):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(107)
    cases = [
        ("a 0-d tensor 0.5", torch.tensor(0.5)),
        ("a (2, 3, 4) batch", torch.randn(2, 3, 4, generator=gen) * 3),
        ("large magnitudes -30, -12, 12, 30", torch.tensor([-30.0, -12.0, 12.0, 30.0])),
        ("a fine grid on [-3, 3] (where tanh and erf GELU differ most)", torch.linspace(-3, 3, 601)),
    ]
    for case, x in cases:
        expect_same(gelu_approx(x), F.gelu(x, approximate="tanh"), case)


@hidden("gelu_approx")
def test_gelu_approx_float64(gelu_approx):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    x = torch.linspace(-6, 6, 241, dtype=torch.float64).reshape(1, 241)
    expect_same(gelu_approx(x), F.gelu(x, approximate="tanh"), "float64 input on [-6, 6] (the output stays float64)",
                atol=1e-9, rtol=1e-7)


@hidden("gelu_approx")
def test_gelu_approx_own_code(gelu_approx):
    import importlib
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same, forbidding
    gen = torch.Generator().manual_seed(108)
    x = torch.randn(5, 7, generator=gen) * 2
    expected = F.gelu(x, approximate="tanh")
    names = ["torch.nn.functional.gelu", "torch._C._nn.gelu", "torch.nn.GELU.forward"]
    try:
        act = importlib.import_module("transformers.activations")
        for cls in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "GELUActivation"):
            if hasattr(act, cls):
                names.append(f"transformers.activations.{cls}.forward")
        if hasattr(act, "gelu_new"):
            names.append("transformers.activations.gelu_new")
    except ImportError:
        pass
    with forbidding(gelu_approx, *names):
        got = gelu_approx(x)
    expect_same(got, expected, "random (5, 7) input, without torch's or transformers' GELU")


@hidden("phi_parameters")
def test_phi_parameters_other_sizes(phi_parameters):
    import torch
    from companion.grading import expect_same
    from companion.phi import Phi, PhiConfig
    cases = [
        ("MLP width not 4 x C: hidden 48, intermediate 100, 3 layers, vocab 1000",
         PhiConfig.preset("tiny", hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=3,
                          vocab_size=1000)),
        ("one layer, hidden 32, intermediate 24, vocab 77",
         PhiConfig.preset("tiny", hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=77)),
    ]
    for case, config in cases:
        with torch.device("meta"):  # shapes only: count the parameters of the real module
            expected = sum(p.numel() for p in Phi(config).parameters())
        expect_same(phi_parameters(config), expected, case)


@hidden("phi_parameters")
def test_phi_parameters_formula(phi_parameters):
    from companion.grading import expect_same
    from companion.phi import PhiConfig
    # Worked out by hand: V*C (embedding) + L*(4*(C*C + C) + C*F + F + F*C + C + 2*C) + 2*C + V*C + V
    config = PhiConfig.preset("phi-2", intermediate_size=6912, num_hidden_layers=20, vocab_size=50000)
    C, F_, V, L = 2560, 6912, 50000, 20
    expected = V * C + L * (4 * (C * C + C) + C * F_ + F_ + F_ * C + C + 2 * C) + 2 * C + V * C + V
    expect_same(phi_parameters(config), expected, "phi-2 widths with intermediate 6912, 20 layers, vocab 50000")


@hidden("phi_parameters")
def test_phi_parameters_own_code(phi_parameters):
    from companion.grading import expect_same, forbidding
    from companion.phi import PhiConfig
    config = PhiConfig.preset("tiny", intermediate_size=200, num_hidden_layers=4)
    C, F_, V, L = 80, 200, 256, 4
    expected = V * C + L * (4 * (C * C + C) + C * F_ + F_ + F_ * C + C + 2 * C) + 2 * C + V * C + V
    with forbidding(phi_parameters, "companion.phi.count_parameters", "companion.phi.hf_tensor_shapes"):
        got = phi_parameters(config)
    expect_same(got, expected, "tiny with intermediate 200 and 4 layers, without companion.phi.count_parameters")
