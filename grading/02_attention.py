"""Hidden tests for chapter 2's exercises."""

from companion.grading import hidden


@hidden("stable_softmax")
def test_stable_softmax_huge_scores(stable_softmax):
    import torch
    from companion.grading import expect_same
    s = torch.tensor([[1e4, 1e4], [-1e4, 0.0]])
    expect_same(stable_softmax(s), torch.tensor([[0.5, 0.5], [0.0, 1.0]]), "scores of 1e4 and -1e4",
                atol=1e-3)


@hidden("stable_softmax")
def test_stable_softmax_own_code(stable_softmax):
    import torch
    from companion.grading import expect_same, forbidding
    s = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with forbidding(stable_softmax, "torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax", "torch.special.softmax"):
        got = stable_softmax(s)
    expect_same(got, torch.softmax(s, -1), "random scores, without torch's softmax")


@hidden("stable_softmax")
def test_stable_softmax_shapes_and_rows(stable_softmax):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, 5, generator=gen) * 5
    expect_same(stable_softmax(s), torch.softmax(s, -1), "scores of shape (2, 3, 4, 5): softmax over the last dimension")
    s = torch.randn(4, 1, generator=gen)
    expect_same(stable_softmax(s), torch.ones(4, 1), "rows of one score each, shape (4, 1): every weight is 1")
    s = torch.full((2, 3), -1e4)
    expect_same(stable_softmax(s), torch.full((2, 3), 1 / 3), "three equal scores of -1e4 in a row: weights 1/3 each")


@hidden("stable_softmax")
def test_stable_softmax_float64(stable_softmax):
    import torch
    from companion.grading import expect_same
    s = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3 + 1000
    expect_same(stable_softmax(s), torch.softmax(s, -1), "float64 scores around 1000, shape (3, 6): keep float64")


@hidden("causal_weights")
def test_causal_weights_shapes(causal_weights):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(5)
    for shape in [(1, 1), (3, 1, 1), (5, 5), (2, 2, 3, 6, 6)]:
        s = torch.randn(*shape, generator=gen)
        T = shape[-1]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        expected = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        expect_same(causal_weights(s), expected, f"scores of shape {shape}")


@hidden("causal_weights")
def test_causal_weights_ignore_the_future(causal_weights):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 5, generator=gen)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    loud = s.masked_fill(future, 50.0)  # large scores above the diagonal must still get weight 0
    expected = torch.softmax(s.masked_fill(future, float("-inf")), -1)
    expect_same(causal_weights(loud), expected, "scores of 50 above the diagonal, shape (2, 5, 5)")
    expect_same(causal_weights(-loud), torch.softmax((-s).masked_fill(future, float("-inf")), -1),
                "scores of -50 above the diagonal, shape (2, 5, 5)")


@hidden("causal_weights")
def test_causal_weights_float64(causal_weights):
    import torch
    from companion.grading import expect_same
    s = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 10
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    expected = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    expect_same(causal_weights(s), expected, "float64 scores of shape (3, 4, 4): keep float64")


@hidden("to_heads")
def test_to_heads_one_head_and_one_channel_per_head(to_heads):
    import torch
    from companion.grading import expect_same
    x = torch.arange(30.0).view(2, 3, 5)
    expect_same(to_heads(x, 1), x.unsqueeze(1), "(2, 3, 5) with 1 head: (2, 1, 3, 5)")
    expect_same(to_heads(x, 5), x.transpose(1, 2).unsqueeze(-1), "(2, 3, 5) with 5 heads of 1 channel: (2, 5, 3, 1)")


@hidden("to_heads")
def test_to_heads_channel_order(to_heads):
    import torch
    from companion.grading import expect_same
    x = torch.arange(1 * 4 * 12, dtype=torch.float64).view(1, 4, 12)
    expected = torch.stack([x[:, :, h * 4:(h + 1) * 4] for h in range(3)], dim=1)
    expect_same(to_heads(x, 3), expected, "float64 (1, 4, 12) with 3 heads: head h owns channels 4h..4h+3")
    x = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(8))
    expected = torch.stack([x[:, :, h * 2:(h + 1) * 2] for h in range(4)], dim=1)
    expect_same(to_heads(x, 4), expected, "(3, 1, 8) with 4 heads: one position")


@hidden("to_heads")
def test_to_heads_own_code(to_heads):
    import sys

    import torch
    from companion.attention import split_heads
    from companion.grading import expect_same, forbidding
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(9))
    reached = []

    def watch(frame, event, arg):  # also sees the reference called under any alias
        if event == "call" and frame.f_code is split_heads.__code__:
            reached.append(event)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(to_heads, "companion.attention.split_heads"):
            got = to_heads(x, 6)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError("to_heads runs companion.attention.split_heads: this exercise asks for your own code")
    expected = torch.stack([x[:, :, h * 2:(h + 1) * 2] for h in range(6)], dim=1)
    expect_same(got, expected, "(2, 5, 12) with 6 heads, without companion.attention.split_heads")


@hidden("positions")
def test_positions_small(positions):
    import math

    import torch
    from companion.grading import expect_same
    got = positions(1, 2)
    if isinstance(got, torch.Tensor) and got.is_floating_point():
        got = got.float()
    expect_same(got, torch.tensor([[0.0, 1.0]]), "T=1, d_model=2: sin(0), cos(0)")
    got = positions(3, 2)
    if isinstance(got, torch.Tensor) and got.is_floating_point():
        got = got.float()
    expected = torch.tensor([[math.sin(p), math.cos(p)] for p in range(3)])
    expect_same(got, expected, "T=3, d_model=2: one pair of channels, angle = position")
    got = positions(1, 10)
    if isinstance(got, torch.Tensor) and got.is_floating_point():
        got = got.float()
    expect_same(got, torch.tensor([[0.0, 1.0] * 5]), "T=1, d_model=10: position 0 is sin 0, cos 1 in every pair")


@hidden("positions")
def test_positions_frequencies(positions):
    import torch
    from companion.attention import sinusoidal_positions
    from companion.grading import expect_same
    for T, d_model in [(4, 6), (7, 2), (100, 64)]:
        got = positions(T, d_model)
        if isinstance(got, torch.Tensor) and got.is_floating_point():
            got = got.float()
        expect_same(got, sinusoidal_positions(T, d_model).float(), f"T={T}, d_model={d_model}", atol=5e-5)


@hidden("positions")
def test_positions_own_code(positions):
    import sys

    import torch
    from companion.attention import sinusoidal_positions
    from companion.grading import expect_same, forbidding
    expected = sinusoidal_positions(12, 8).float()
    reached = []

    def watch(frame, event, arg):  # also sees the reference called under any alias
        if event == "call" and frame.f_code is sinusoidal_positions.__code__:
            reached.append(event)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(positions, "companion.attention.sinusoidal_positions"):
            got = positions(12, 8)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError("positions runs companion.attention.sinusoidal_positions: "
                             "this exercise asks for your own code")
    if isinstance(got, torch.Tensor) and got.is_floating_point():
        got = got.float()
    expect_same(got, expected, "T=12, d_model=8, without companion.attention.sinusoidal_positions")
