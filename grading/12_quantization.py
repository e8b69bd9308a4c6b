"""Hidden tests for chapter 12's exercises (quantization)."""

from companion.grading import hidden


@hidden("int4_zero_point")
def test_int4_zero_point_by_hand(int4_zero_point):
    import torch
    from companion.grading import expect_same
    cases = [
        ([-1.0, 0.0, 2.75, 0.5], [0, 4, 15, 6], 0.25, 4, "range -1 to 2.75: scale 0.25, zero point 4"),
        ([0.5, 1.0, 1.5, 3.75], [2, 4, 6, 15], 0.25, 0, "all positive: the range starts at 0, zero point 0"),
        ([-3.75, -1.0, -0.5, -0.25], [0, 11, 13, 14], 0.25, 15, "all negative: the range ends at 0, zero point 15"),
        ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 0.0, 0, "all zeros: scale 0, zero point 0, levels 0"),
    ]
    for weights, levels, scale, zero, case in cases:
        got = int4_zero_point(torch.tensor([weights]), 4)
        expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                    (torch.tensor([levels], dtype=torch.uint8), torch.tensor([[scale]]),
                     torch.tensor([[zero]], dtype=torch.uint8)), f"one group {weights}: {case}")


@hidden("int4_zero_point")
def test_int4_zero_point_ragged_groups(int4_zero_point):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(108)

    def by_loops(w, g):
        N, K = w.shape
        starts = list(range(0, K, g))
        q = torch.zeros(N, K, dtype=torch.uint8)
        s = torch.zeros(N, len(starts), dtype=w.dtype)
        z = torch.zeros(N, len(starts), dtype=torch.uint8)
        for n in range(N):
            for j, a in enumerate(starts):
                grp = w[n, a:a + g]
                lo, hi = min(grp.min(), 0), max(grp.max(), 0)
                if hi - lo == 0:
                    continue
                sc = (hi - lo) / 15
                zp = torch.round(-lo / sc)
                q[n, a:a + g] = (torch.round(grp / sc) + zp).clamp(0, 15).to(torch.uint8)
                s[n, j], z[n, j] = sc, zp
        return q, s, z

    for N, K, g, case in [(2, 10, 4, "K=10, groups of 4: the last has 2"), (3, 7, 7, "one group the size of the row"),
                          (2, 7, 100, "group_size 100 > K=7: one short group"), (4, 9, 1, "groups of one weight"),
                          (1, 130, 32, "K=130, groups of 32: the last has 2")]:
        w = torch.randn(N, K, generator=gen)
        try:
            got = int4_zero_point(w, g)
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"({N}, {K}), {case}: int4_zero_point raised {type(err).__name__}: {err}") from None
        expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, by_loops(w, g), f"({N}, {K}), {case}")


@hidden("int4_zero_point")
def test_int4_zero_point_zeros_come_back_exactly(int4_zero_point):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(109)
    w = torch.randn(5, 48, generator=gen) * 0.05
    w[w.abs() < 0.02] = 0.0  # pruned weights
    q, scale, zero = int4_zero_point(w, 16)
    back = (q.float().reshape(5, 3, 16) - zero.float()[..., None]) * scale[..., None]  # (N, G, g)
    back = back.reshape(5, 48)
    expect_same(back[w == 0], torch.zeros(int((w == 0).sum())), "pruned weights (exactly 0) dequantize to exactly 0",
                atol=0.0, rtol=0.0)
    step = scale.repeat_interleave(16, dim=1)
    worst = ((back - w).abs() - step / 2 * (1 + 1e-5)).max().item()
    if worst > 1e-7:
        raise AssertionError(f"a weight is more than half a step from its level (by {worst:.3g})")


@hidden("int4_zero_point")
def test_int4_zero_point_dtypes(int4_zero_point):
    import torch
    gen = torch.Generator().manual_seed(110)
    for dtype in (torch.float32, torch.float64):
        try:
            q, scale, zero = int4_zero_point(torch.randn(3, 20, generator=gen, dtype=dtype), 8)
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"{dtype} weights (3, 20), groups of 8 (the last has 4): int4_zero_point raised "
                                 f"{type(err).__name__}: {err}") from None
        for name, t, want, shape in [("q", q, torch.uint8, (3, 20)), ("scales", scale, dtype, (3, 3)),
                                     ("zero points", zero, torch.uint8, (3, 3))]:
            if t.dtype != want or tuple(t.shape) != shape:
                raise AssertionError(f"{dtype} weights (3, 20), groups of 8: {name} should be {want} of shape {shape}, "
                                     f"got {t.dtype} of shape {tuple(t.shape)}")
        if int(q.max()) > 15 or int(zero.max()) > 15:
            raise AssertionError(f"{dtype}: levels and zero points must lie in 0..15")


@hidden("w8a8_linear")
def test_w8a8_linear_by_hand(w8a8_linear):
    import torch
    from companion.grading import expect_same
    x = torch.tensor([[1.0, -0.25]])  # levels 127 and round(-31.75) = -32, scale 1/127
    w = torch.tensor([[2.0, 2.0], [0.0, -4.0]])  # levels [127, 127] scale 2/127; [0, -127] scale 4/127
    sums = torch.tensor([[127.0 * 127 - 32 * 127, 32.0 * 127]])
    expected = sums * (1 / 127) * torch.tensor([[2 / 127, 4 / 127]])
    expect_same(w8a8_linear(x, w), expected, "x [[1, -0.25]], w [[2, 2], [0, -4]]: integer sums 12065 and 4064")


@hidden("w8a8_linear")
def test_w8a8_linear_sums_in_the_millions(w8a8_linear):
    import torch
    from companion.grading import expect_same
    x = torch.ones(2, 8192)
    w = torch.cat([torch.ones(1, 8192), -torch.ones(1, 8192)])
    expect_same(w8a8_linear(x, w), torch.tensor([[8192.0, -8192.0], [8192.0, -8192.0]]),
                "rows of 8192 ones: integer sums of 8192 x 127 x 127 = 132 million (int8 or int16 sums overflow)")
    x = torch.full((1, 3000), -2.0)
    x[0, ::2] = 2.0
    expect_same(w8a8_linear(x, torch.ones(1, 3000)), torch.tensor([[0.0]]), "alternating +2 and -2: the sum is 0")


@hidden("w8a8_linear")
def test_w8a8_linear_shapes_zero_rows_float64(w8a8_linear):
    import torch
    from companion.grading import expect_same
    from companion.quantize import dequantize_int8, quantize_int8
    gen = torch.Generator().manual_seed(111)

    def reference(x, w):
        rows = x.reshape(-1, x.size(-1)).double()
        sx = rows.abs().amax(-1) / 127
        qx = torch.round(rows / torch.where(sx == 0, 1.0, sx)[:, None])
        return ((qx * sx[:, None]) @ dequantize_int8(*quantize_int8(w)).double().T).to(x.dtype).reshape(
            *x.shape[:-1], w.size(0))

    x = torch.randn(2, 3, 4, 24, generator=gen)
    x[1, 2, 0] = 0.0
    w = torch.randn(5, 24, generator=gen)
    got = w8a8_linear(x, w)
    if isinstance(got, torch.Tensor) and got.isnan().any():
        raise AssertionError("an input with a row of zeros: the output has NaN; that row's outputs are 0")
    expect_same(got, reference(x, w), "x (2, 3, 4, 24) with one row of zeros, w (5, 24)")
    x64, w64 = torch.randn(3, 10, generator=gen, dtype=torch.float64), torch.randn(2, 10, generator=gen, dtype=torch.float64)
    expect_same(w8a8_linear(x64, w64), reference(x64, w64), "float64 x and w (the output stays float64)")
    outlier = torch.tensor([[50.0, 0.1, -0.1, 0.15]])
    expect_same(w8a8_linear(outlier, torch.ones(1, 4)), torch.tensor([[50.0]]),
                "x [[50, 0.1, -0.1, 0.15]]: the outlier sets the step (50/127), the small entries round to 0")


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
