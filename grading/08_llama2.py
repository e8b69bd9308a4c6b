"""Hidden tests for chapter 8's exercises (Llama 2)."""

from companion.grading import hidden


@hidden("my_rms_norm")
def test_rms_norm_shapes_and_eps(my_rms_norm):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(80)
    cases = [
        ("a single vector (C,) = (8,)", torch.randn(8, generator=gen), torch.randn(8, generator=gen), 1e-5),
        ("a single feature, C = 1", torch.randn(3, 1, generator=gen), torch.randn(1, generator=gen), 1e-6),
        ("4-d input (2, 3, 4, 12)", torch.randn(2, 3, 4, 12, generator=gen), torch.randn(12, generator=gen), 1e-5),
        ("a large eps = 0.5 (inside the square root)", torch.randn(4, 6, generator=gen) * 0.3,
         torch.randn(6, generator=gen), 0.5),
        ("an all-zero row (the output is zero, not NaN)", torch.zeros(2, 5), torch.randn(5, generator=gen), 1e-5),
    ]
    for case, x, w, eps in cases:
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        expect_same(my_rms_norm(x, w, eps), expected, case)


@hidden("my_rms_norm")
def test_rms_norm_float16_statistic_in_float32(my_rms_norm):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(81)
    # Entries of about 300: their squares (about 90,000) overflow float16 (largest 65,504), so the
    # mean of the squares must be computed in float32, as the exercise asks.
    x = (300 + 50 * torch.randn(2, 3, 16, generator=gen)).to(torch.float16)
    w = torch.randn(16, generator=gen).to(torch.float16)
    x32 = x.float()
    expected = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.float16)
    got = my_rms_norm(x, w, 1e-5)
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
        raise AssertionError("float16 input with entries near 300: the output has inf or NaN; "
                             "compute the mean of the squares in float32")
    if isinstance(got, torch.Tensor) and got.dtype == torch.float32:
        expected = expected.float()  # the exercise does not say which dtype to return: float32 is accepted too
    expect_same(got, expected, "float16 input and weight, entries near 300", atol=1e-2, rtol=1e-2)


@hidden("my_rms_norm")
def test_rms_norm_float64_keeps_dtype(my_rms_norm):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(82)
    x = torch.randn(3, 5, 10, generator=gen, dtype=torch.float64)
    w = torch.randn(10, generator=gen, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    expect_same(my_rms_norm(x, w, 1e-6), expected, "float64 input and weight (the output stays float64)")


@hidden("my_rms_norm")
def test_rms_norm_own_code(my_rms_norm):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same, forbidding
    gen = torch.Generator().manual_seed(83)
    x, w = torch.randn(4, 32, generator=gen), torch.randn(32, generator=gen)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    names = ["companion.layers.RMSNorm.forward", "companion.layers.RMSNorm"]
    if hasattr(F, "rms_norm"):
        names.append("torch.nn.functional.rms_norm")
    if hasattr(torch.nn, "RMSNorm"):
        names += ["torch.nn.RMSNorm.forward", "torch.nn.RMSNorm"]
    try:
        import transformers.models.llama.modeling_llama as hf_llama
        if hasattr(hf_llama, "LlamaRMSNorm"):
            names.append("transformers.models.llama.modeling_llama.LlamaRMSNorm.forward")
    except ImportError:
        pass
    with forbidding(my_rms_norm, *names):
        got = my_rms_norm(x, w, 1e-5)
    expect_same(got, expected, "random (4, 32) input, without companion's or torch's RMSNorm")


@hidden("my_rope")
def test_rope_other_sizes_and_bases(my_rope):
    import torch
    from companion.grading import expect_same
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(84)
    cases = [
        ("D = 2 (one pair), B = 3, H = 1, T = 4", torch.randn(3, 1, 4, 2, generator=gen), torch.arange(4), 10000.0),
        ("one token (T = 1) at position 9, D = 8", torch.randn(1, 2, 1, 8, generator=gen), torch.tensor([9]), 10000.0),
        ("D = 32, base 100, positions 5..10", torch.randn(2, 3, 6, 32, generator=gen), torch.arange(5, 11), 100.0),
        ("positions not in order [4, 0, 2], D = 12", torch.randn(1, 2, 3, 12, generator=gen),
         torch.tensor([4, 0, 2]), 10000.0),
    ]
    for case, x, positions, base in cases:
        expected = apply_rope(x, *rope_cos_sin(positions, x.size(-1), base))
        expect_same(my_rope(x, positions, base), expected, case)


@hidden("my_rope")
def test_rope_far_positions(my_rope):
    import torch
    from companion.grading import expect_same
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(85)
    x = torch.randn(1, 4, 3, 64, generator=gen)
    positions = torch.tensor([1000, 2000, 4095])
    expected = apply_rope(x, *rope_cos_sin(positions, 64, 10000.0))
    # An angle of thousands of radians carries a float32 rounding error of about 1e-4.
    expect_same(my_rope(x, positions, 10000.0), expected, "positions 1000, 2000, 4095 with D = 64",
                atol=2e-3, rtol=1e-3)


@hidden("my_rope")
def test_rope_float64_keeps_dtype(my_rope):
    import torch
    from companion.grading import expect_same
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(86)
    x = torch.randn(2, 2, 5, 16, generator=gen, dtype=torch.float64)
    positions = torch.arange(5)
    expected = apply_rope(x, *rope_cos_sin(positions, 16, 10000.0))  # float64: x times float32 angles
    expect_same(my_rope(x, positions, 10000.0), expected, "float64 input (the output stays float64)")


@hidden("my_rope")
def test_rope_own_code(my_rope):
    import torch
    from companion.grading import expect_same, forbidding
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(87)
    x, positions = torch.randn(1, 2, 4, 8, generator=gen), torch.arange(4)
    expected = apply_rope(x, *rope_cos_sin(positions, 8, 10000.0))
    names = ["companion.layers.apply_rope", "companion.layers.rope_cos_sin", "companion.layers.rope_inv_freq",
             "companion.layers.rotate_half", "companion.layers.apply_rope_interleaved"]
    try:
        import transformers.models.llama.modeling_llama as hf_llama
        names += [f"transformers.models.llama.modeling_llama.{n}" for n in ("apply_rotary_pos_emb", "rotate_half")
                  if hasattr(hf_llama, n)]
    except ImportError:
        pass
    with forbidding(my_rope, *names):
        got = my_rope(x, positions, 10000.0)
    expect_same(got, expected, "random (1, 2, 4, 8) input, without companion's rope helpers")


@hidden("swiglu_hidden_size")
def test_swiglu_hidden_size_no_rounding_needed(swiglu_hidden_size):
    from companion.grading import expect_same
    # (C, multiple_of, expected): int(8 C / 3), rounded up to the multiple, worked out by hand.
    cases = [
        (96, 256, 256),  # 8 * 96 / 3 = 256 exactly: already a multiple, not 512
        (3, 8, 8),  # 8 exactly
        (100, 1, 266),  # 266.67 rounds DOWN to 266; multiple_of = 1 changes nothing
        (1, 1, 2),  # 2.67 -> 2
    ]
    for C, m, expected in cases:
        expect_same(swiglu_hidden_size(C, m), expected, f"C={C}, multiple_of={m}")


@hidden("swiglu_hidden_size")
def test_swiglu_hidden_size_rounding(swiglu_hidden_size):
    from companion.grading import expect_same
    cases = [
        (100, 2, 266),  # 266 is already even
        (100, 4, 268),  # 266 -> 268
        (1, 4, 4),  # 2 -> 4
        (2560, 64, 6848),  # 6826 -> 6848
        (8192, 256, 22016),  # 21845 -> 22016
        (768, 100, 2100),  # 2048 -> 2100: a multiple that is not a power of two
    ]
    for C, m, expected in cases:
        expect_same(swiglu_hidden_size(C, m), expected, f"C={C}, multiple_of={m}")


@hidden("kv_cache_gib")
def test_kv_cache_gib_grouped_heads(kv_cache_gib):
    from companion.grading import expect_same
    from companion.llama import LlamaConfig
    cases = [
        # (config, seq_len, batch, bytes, what): expected worked out from the sizes
        (LlamaConfig.preset("tiny", hidden_size=96, num_attention_heads=4, num_key_value_heads=1),
         1, 1, 1, "tiny with head_dim 24 and 1 key/value head, one token, 1 byte"),
        (LlamaConfig.preset("tiny", num_hidden_layers=3, num_key_value_heads=2), 37, 5, 4,
         "tiny with 3 layers and 2 key/value heads, 37 tokens, batch 5, 4 bytes"),
        (LlamaConfig.preset("llama-2-13b"), 4096, 2, 2, "llama-2-13b, 4096 tokens, batch 2, 2 bytes"),
        (LlamaConfig.preset("llama-2-70b"), 1000, 3, 1, "llama-2-70b, 1000 tokens, batch 3, 1 byte"),
    ]
    for config, T, B, nbytes, case in cases:
        n = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        expected = n * T * B * nbytes / 2**30
        expect_same(kv_cache_gib(config, T, B, nbytes), expected, case, atol=0.0, rtol=1e-9)


@hidden("kv_cache_gib")
def test_kv_cache_gib_edges(kv_cache_gib):
    from companion.grading import expect_same
    from companion.llama import LlamaConfig
    expect_same(kv_cache_gib(LlamaConfig.preset("llama-2-7b"), 0, 4, 2), 0.0, "seq_len 0", atol=0.0, rtol=1e-9)
    expect_same(kv_cache_gib(LlamaConfig.preset("llama-2-7b"), 1, 1, 2), 0.5 / 1024,
                "llama-2-7b, one token, 16-bit: 512 KiB", atol=0.0, rtol=1e-9)
    expect_same(kv_cache_gib(LlamaConfig.preset("tiny"), 1, 1, 2), 2 * 2 * 4 * 16 * 2 / 2**30,
                "tiny, one token (a fraction of a GiB, not rounded to 0)", atol=0.0, rtol=1e-9)


@hidden("kv_cache_gib")
def test_kv_cache_gib_own_code(kv_cache_gib):
    from companion.grading import expect_same, forbidding
    from companion.llama import LlamaConfig
    config = LlamaConfig.preset("tiny", num_key_value_heads=2)
    expected = 2 * 2 * 2 * 16 * 50 * 3 * 2 / 2**30
    with forbidding(kv_cache_gib, "companion.layers.kv_cache_bytes"):
        got = kv_cache_gib(config, 50, 3, 2)
    expect_same(got, expected, "tiny with 2 key/value heads, without companion.layers.kv_cache_bytes",
                atol=0.0, rtol=1e-9)
