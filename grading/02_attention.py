"""Hidden tests for chapter 2's exercises."""

from companion.grading import hidden


@hidden("stable_softmax")
def test_stable_softmax_huge_scores(stable_softmax):
    import torch
    from companion.grading import expect_same
    s = torch.tensor([[1e4, 1e4], [-1e4, 0.0]])
    expect_same(stable_softmax(s), torch.tensor([[0.5, 0.5], [0.0, 1.0]]), "scores of 1e4 and -1e4",
                atol=1e-3)
    s = torch.full((2, 3), -1e4)
    expect_same(stable_softmax(s), torch.full((2, 3), 1 / 3), "three equal scores of -1e4 in a row: weights 1/3 each")


@hidden("stable_softmax")
def test_stable_softmax_masked_rows(stable_softmax):
    import torch
    from companion.grading import expect_same
    inf = float("inf")
    s = torch.tensor([[[-inf, 3.0, -inf, 1.0], [-inf, -inf, -inf, -inf]],
                      [[-inf, -inf, -inf, 5e3], [2.0, 2.0, -inf, 2.0]]])
    e = torch.exp(torch.tensor(2.0))
    expected = torch.tensor([[[0.0, e / (e + 1), 0.0, 1 / (e + 1)], [0.0, 0.0, 0.0, 0.0]],
                             [[0.0, 0.0, 0.0, 1.0], [1 / 3, 1 / 3, 0.0, 1 / 3]]])
    expect_same(stable_softmax(s), expected,
                "shape (2, 2, 4) with -inf scores: masked entries get 0, a row of all -inf gets zeros (not NaN)")
    expect_same(stable_softmax(torch.full((3,), -inf)), torch.zeros(3), "one row of three -inf scores: zeros")


@hidden("stable_softmax")
def test_stable_softmax_shapes_and_float64(stable_softmax):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, 5, generator=gen) * 5
    expect_same(stable_softmax(s), torch.softmax(s, -1), "scores of shape (2, 3, 4, 5): softmax over the last dimension")
    s = torch.randn(4, 1, generator=gen)
    expect_same(stable_softmax(s), torch.ones(4, 1), "rows of one score each, shape (4, 1): every weight is 1")
    s = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 3 + 1000
    expect_same(stable_softmax(s), torch.softmax(s, -1), "float64 scores around 1000, shape (3, 6): keep float64")


@hidden("stable_softmax")
def test_stable_softmax_own_code(stable_softmax):
    import torch
    from companion.grading import expect_same, forbidding
    s = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with forbidding(stable_softmax, "torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax",
                    "torch.special.softmax", "torch.nn.functional.log_softmax", "torch.log_softmax",
                    "torch.Tensor.log_softmax"):
        got = stable_softmax(s)
    expect_same(got, torch.softmax(s, -1), "random scores, without torch's softmax")


@hidden("padded_weights")
def test_padded_weights_no_padding_and_length_one(padded_weights):
    import torch
    from companion.grading import expect_same
    s = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    expect_same(padded_weights(s, torch.tensor([5, 5])), torch.softmax(s, -1),
                "lengths [5, 5] with T=5: no padding, a plain softmax over all keys")
    expected = torch.zeros(2, 3, 5, 5)
    expected[:, :, 0, 0] = 1.0
    expect_same(padded_weights(s, torch.tensor([1, 1])), expected,
                "lengths [1, 1]: query 0 puts weight 1 on key 0, every other row is zeros")


@hidden("padded_weights")
def test_padded_weights_empty_sequence(padded_weights):
    import torch
    from companion.grading import expect_same
    s = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    got = padded_weights(s, torch.tensor([0, 3, 0]))
    if isinstance(got, torch.Tensor) and got.isnan().any():
        raise AssertionError("lengths [0, 3, 0]: the weights contain NaN; an empty sequence gets zeros")
    expected = torch.zeros(3, 2, 4, 4)
    expected[1, :, :3, :3] = torch.softmax(s[1, :, :3, :3], -1)
    expect_same(got, expected, "lengths [0, 3, 0]: the empty sequences get zeros, the other ignores position 3")


@hidden("padded_weights")
def test_padded_weights_loud_padding_float64(padded_weights):
    import torch
    from companion.grading import expect_same
    s = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    s[0, :, :, 2:] = 1e4   # huge scores on the padding keys of sequence 0
    s[1, :, :, 4:] = -1e4  # and very negative ones on those of sequence 1
    expected = torch.zeros_like(s)
    expected[0, :, :2, :2] = torch.softmax(s[0, :, :2, :2], -1)
    expected[1, :, :4, :4] = torch.softmax(s[1, :, :4, :4], -1)
    expect_same(padded_weights(s, torch.tensor([2, 4])), expected,
                "float64, lengths [2, 4], scores of +1e4 and -1e4 on the padding keys: weight 0 whatever the score")


@hidden("alibi_bias")
def test_alibi_bias_values(alibi_bias):
    import torch
    from companion.grading import expect_same
    inf = float("-inf")
    expect_same(alibi_bias(1, 4), torch.zeros(4, 1, 1), "T=1, 4 heads: a single position has bias 0")
    expect_same(alibi_bias(3, 1), torch.tensor([[[0.0, inf, inf], [-1 / 256, 0.0, inf], [-2 / 256, -1 / 256, 0.0]]]),
                "T=3, one head: slope 2^-8, -inf above the diagonal")
    got = alibi_bias(2, 8)
    expected = torch.tensor([[[0.0, inf], [-(2.0 ** -(h + 1)), 0.0]] for h in range(8)])
    expect_same(got, expected, "T=2, 8 heads: slopes 1/2, 1/4, ..., 1/256 in head order")


@hidden("alibi_bias")
def test_alibi_bias_large(alibi_bias):
    import torch
    from companion.grading import expect_same
    T, H = 40, 4
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    expected = torch.stack([-(2.0 ** (-2 * (h + 1))) * (i - j).float() for h in range(H)])
    expected = expected.masked_fill(j > i, float("-inf"))
    expect_same(alibi_bias(T, H), expected, "T=40, 4 heads (slopes 1/4, 1/16, 1/64, 1/256), float32")


@hidden("alibi_bias")
def test_alibi_bias_rejects_other_head_counts(alibi_bias):
    for bad in (3, 6, 12, 0):
        try:
            alibi_bias(4, bad)
        except ValueError as err:
            if str(bad) not in str(err):
                raise AssertionError(f"num_heads={bad}: the ValueError must name the value, got {err}") from err
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"num_heads={bad}: expected a ValueError, got {type(err).__name__}: {err}") from err
        else:
            raise AssertionError(f"num_heads={bad} is not a power of two: expected a ValueError")


@hidden("advance")
def test_advance_matches_later_positions(advance):
    import torch
    from companion.attention import sinusoidal_positions
    from companion.grading import expect_same
    for T, d_model, k in [(6, 8, 3), (1, 2, 5), (10, 2, 1), (20, 64, 100)]:
        pe = sinusoidal_positions(T, d_model)
        expect_same(advance(pe, k), sinusoidal_positions(T + k, d_model)[k:],
                    f"T={T}, d_model={d_model}, k={k}: the encodings of positions {k} to {T + k - 1}", atol=1e-4)


@hidden("advance")
def test_advance_zero_negative_float64(advance):
    import torch
    from companion.grading import expect_same
    pos = torch.arange(12, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)  # (12, 8)
    pe = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(1)  # (12, 16), float64 throughout
    expect_same(advance(pe, 0), pe, "k=0, float64: unchanged, dtype kept", atol=1e-10)
    expect_same(advance(pe[7:], -7), pe[:5], "k=-7 from positions 7..11, float64: positions 0..4", atol=1e-10)
    expect_same(advance(advance(pe, 9), -9), pe, "float64: advancing by 9 then by -9 gives pe back", atol=1e-10)


@hidden("advance")
def test_advance_positions_not_given(advance):
    import sys

    import torch
    from companion.attention import sinusoidal_positions
    from companion.grading import expect_same, forbidding
    table = sinusoidal_positions(40, 8)
    rows = [30, 2, 17, 17, 0]
    expected = table[[r + 6 for r in rows]]
    reached = []

    def watch(frame, event, arg):  # also sees the reference called under any alias
        if event == "call" and frame.f_code is sinusoidal_positions.__code__:
            reached.append(event)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(advance, "companion.attention.sinusoidal_positions"):
            got = advance(table[rows], 6)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError("advance runs companion.attention.sinusoidal_positions: "
                             "compute the result from pe and k alone")
    expect_same(got, expected, "rows for positions [30, 2, 17, 17, 0] (out of order, one repeated), k=6",
                atol=1e-4)
