"""Hidden tests for chapter 12's exercises."""

from companion.grading import hidden


@hidden("int8_per_group")
def test_int8_per_group_each_group_its_own_scale(int8_per_group):
    import torch
    from companion.grading import expect_same
    from companion.quantize import dequantize_int8, quantize_int8
    gen = torch.Generator().manual_seed(11)
    # four groups of 32 per row, each 10 times larger than the one before: one scale per row would flatten the small ones
    w = torch.randn(3, 128, generator=gen) * torch.tensor([0.001, 0.01, 0.1, 1.0]).repeat_interleave(32)
    for g in (32, 64, 128):
        expected = dequantize_int8(*quantize_int8(w.reshape(-1, g))).reshape(w.shape)
        expect_same(int8_per_group(w, g), expected,
                    f"(3, 128) weights whose groups of 32 grow tenfold, group_size={g}")
    w = torch.randn(2, 6, generator=gen)
    expect_same(int8_per_group(w, 1), w, "(2, 6), group_size=1: every weight is its own group's absmax")
    expect_same(int8_per_group(w, 2), dequantize_int8(*quantize_int8(w.reshape(-1, 2))).reshape(w.shape),
                "(2, 6), group_size=2")


@hidden("int8_per_group")
def test_int8_per_group_zeros_and_negative_extremes(int8_per_group):
    import torch
    from companion.grading import expect_same
    from companion.quantize import dequantize_int8, quantize_int8
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(3, 96, generator=gen)
    w[0, 32:64] = 0.0  # a group of zeros between two others
    w[1] = 0.0  # a whole row of zeros
    w[2, :32] = -w[2, :32].abs()
    w[2, 5] = -4.0  # the largest magnitude of this group is negative
    got = int8_per_group(w, 32)
    expected = dequantize_int8(*quantize_int8(w.reshape(-1, 32))).reshape(w.shape)
    expect_same(got, expected, "(3, 96), group_size=32, with a group of zeros, a row of zeros "
                               "and a group whose largest magnitude is negative")
    expect_same(got[0, 32:64], torch.zeros(32), "the group of zeros in row 0 (must come back as zeros, not nan)")
    expect_same(got[2, 5], torch.tensor(-4.0), "the weight -4.0 that sets its group's scale")
    one = torch.randn(1, 32, generator=gen)
    expect_same(int8_per_group(one, 32), dequantize_int8(*quantize_int8(one)), "(1, 32), one group: per-row int8")


@hidden("int8_per_group")
def test_int8_per_group_float64(int8_per_group):
    import torch
    from companion.grading import expect_same
    from companion.quantize import dequantize_int8, quantize_int8
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    expected = dequantize_int8(*quantize_int8(w.reshape(-1, 8))).reshape(w.shape)
    expect_same(int8_per_group(w, 8), expected, "float64 (4, 16), group_size=8: the approximation keeps w's dtype")


@hidden("int8_per_group")
def test_int8_per_group_own_code(int8_per_group):
    import sys

    import torch
    from companion.grading import expect_same, forbidding
    from companion.quantize import dequantize_int8, quantize_int8
    w = torch.randn(2, 64, generator=torch.Generator().manual_seed(14))
    expected = dequantize_int8(*quantize_int8(w.reshape(-1, 32))).reshape(w.shape)
    codes = (quantize_int8.__code__, dequantize_int8.__code__)
    reached = []

    def watch(frame, event, arg):  # also sees the references called under any alias
        if event == "call" and frame.f_code in codes:
            reached.append(frame.f_code.co_name)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(int8_per_group, "companion.quantize.quantize_int8", "companion.quantize.dequantize_int8"):
            got = int8_per_group(w, 32)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError(f"int8_per_group runs companion.quantize.{reached[0]}: this exercise asks for your own code")
    expect_same(got, expected, "(2, 64), group_size=32, without companion.quantize's int8 functions")


@hidden("perplexity_windows")
def test_perplexity_windows_short_texts(perplexity_windows):
    from companion.evaluate import windows
    from companion.grading import expect_same
    for n, context, stride in [(1, 4, 2), (2, 2, 1), (2, 8, 8), (3, 2, 2), (8, 8, 4), (9, 8, 8), (9, 8, 1)]:
        expect_same(perplexity_windows(n, context, stride), windows(n, context, stride),
                    f"n={n}, context={context}, stride={stride}")


@hidden("perplexity_windows")
def test_perplexity_windows_overlaps(perplexity_windows):
    from companion.evaluate import windows
    from companion.grading import expect_same
    for n, context, stride in [(10, 4, 1), (17, 5, 2), (33, 8, 3), (24, 6, 5), (50, 7, 7), (31, 10, 9)]:
        expect_same(perplexity_windows(n, context, stride), windows(n, context, stride),
                    f"n={n}, context={context}, stride={stride}")


@hidden("perplexity_windows")
def test_perplexity_windows_score_every_token_once(perplexity_windows):
    from companion.evaluate import windows
    from companion.grading import expect_same
    for n, context, stride in [(1000, 64, 48), (1025, 128, 127), (777, 100, 1)]:  # stride < context
        got = perplexity_windows(n, context, stride)
        scored = [0] * n
        for begin, end, k in got:
            if not (0 <= begin < end <= n and end - begin <= context and 0 < k <= end - begin - 1):
                raise AssertionError(f"n={n}, context={context}, stride={stride}: {(begin, end, k)} is not a window "
                                     f"of at most {context} tokens of the text that scores 1 to its length - 1 tokens")
            for t in range(end - k, end):
                scored[t] += 1
        expect_same(scored, [0] + [1] * (n - 1),
                    f"n={n}, context={context}, stride={stride}: how often each token is scored")
        begins = [b for b, _, _ in got]
        expect_same(begins, list(range(0, stride * len(got), stride)),
                    f"n={n}, context={context}, stride={stride}: windows start every {stride} tokens")
        expect_same(got, windows(n, context, stride), f"n={n}, context={context}, stride={stride}")


@hidden("perplexity_windows")
def test_perplexity_windows_own_code(perplexity_windows):
    import sys

    from companion.evaluate import windows
    from companion.grading import expect_same, forbidding
    expected = windows(20, 6, 4)
    reached = []

    def watch(frame, event, arg):  # also sees the reference called under any alias
        if event == "call" and frame.f_code is windows.__code__:
            reached.append(event)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(perplexity_windows, "companion.evaluate.windows"):
            got = perplexity_windows(20, 6, 4)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError("perplexity_windows runs companion.evaluate.windows: this exercise asks for your own code")
    expect_same(got, expected, "n=20, context=6, stride=4, without companion.evaluate.windows")


@hidden("int4_dequantize")
def test_int4_dequantize_nibble_order(int4_dequantize):
    import torch
    from companion.grading import expect_same
    packed = torch.tensor([[0x1F, 0x20]], dtype=torch.uint8)  # low nibble first: weights 15, 1, 0, 2
    got = int4_dequantize(packed, torch.tensor([[1.0]]), torch.tensor([[0.0]]))
    expect_same(got, torch.tensor([[15.0, 1.0, 0.0, 2.0]]),
                "bytes 0x1F, 0x20 with scale 1 and min 0: weight 2j is the low four bits of byte j")
    got = int4_dequantize(packed, torch.tensor([[0.5]]), torch.tensor([[-1.0]]))
    expect_same(got, torch.tensor([[6.5, -0.5, -1.0, 0.0]]), "bytes 0x1F, 0x20 with scale 0.5 and min -1")


@hidden("int4_dequantize")
def test_int4_dequantize_groups(int4_dequantize):
    import torch
    from companion.grading import expect_same
    from companion.quantize import dequantize_int4
    gen = torch.Generator().manual_seed(15)
    for N, K, G in [(1, 2, 1), (2, 8, 2), (3, 12, 3), (2, 8, 4), (4, 16, 1)]:
        packed = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
        scales = torch.rand(N, G, generator=gen) + 0.1
        mins = torch.randn(N, G, generator=gen)
        expect_same(int4_dequantize(packed, scales, mins), dequantize_int4(packed, scales, mins),
                    f"N={N}, K={K}, {G} groups of {K // G}")


@hidden("int4_dequantize")
def test_int4_dequantize_float64(int4_dequantize):
    import torch
    from companion.grading import expect_same
    from companion.quantize import dequantize_int4, quantize_int4
    gen = torch.Generator().manual_seed(16)
    packed, scales, mins = quantize_int4(torch.randn(3, 128, generator=gen, dtype=torch.float64), 32)
    expect_same(int4_dequantize(packed, scales, mins), dequantize_int4(packed, scales, mins),
                "float64 (3, 128) weights quantized in groups of 32: return float64")
    packed, scales, mins = quantize_int4(torch.randn(1, 64, generator=gen), 64)
    expect_same(int4_dequantize(packed, scales, mins), dequantize_int4(packed, scales, mins),
                "(1, 64) weights quantized in one group of 64")


@hidden("int4_dequantize")
def test_int4_dequantize_own_code(int4_dequantize):
    import sys

    import torch
    from companion.grading import expect_same, forbidding
    from companion.quantize import dequantize_int4, quantize_int4
    packed, scales, mins = quantize_int4(torch.randn(2, 64, generator=torch.Generator().manual_seed(17)), 32)
    expected = dequantize_int4(packed, scales, mins)
    reached = []

    def watch(frame, event, arg):  # also sees the reference called under any alias
        if event == "call" and frame.f_code is dequantize_int4.__code__:
            reached.append(event)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(int4_dequantize, "companion.quantize.dequantize_int4"):
            got = int4_dequantize(packed, scales, mins)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError("int4_dequantize runs companion.quantize.dequantize_int4: "
                             "this exercise asks for your own code")
    expect_same(got, expected, "(2, 64) in groups of 32, without companion.quantize.dequantize_int4")
