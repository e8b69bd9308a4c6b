"""Hidden tests for chapter 1's exercises."""

from companion.grading import hidden


@hidden("my_gru_step")
def test_my_gru_step_other_sizes(my_gru_step):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(11)
    for B, I, H in [(1, 1, 5), (7, 6, 2), (3, 2, 9)]:
        x = torch.randn(B, I, generator=g, dtype=torch.float64)
        h = torch.randn(B, H, generator=g, dtype=torch.float64)
        w_ih = torch.randn(3 * H, I, generator=g, dtype=torch.float64)
        w_hh = torch.randn(3 * H, H, generator=g, dtype=torch.float64)
        b_ih = torch.randn(3 * H, generator=g, dtype=torch.float64)
        b_hh = 2 * torch.randn(3 * H, generator=g, dtype=torch.float64)  # large b_hn: where r acts shows
        expected = torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
        got = my_gru_step(x, h, w_ih, w_hh, b_ih, b_hh)
        expect_same(got, expected, f"batch {B}, input size {I}, hidden size {H}, float64, biases of size ~1-2")


@hidden("my_gru_step")
def test_my_gru_step_float32_and_zero_state(my_gru_step):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(12)
    B, I, H = 4, 3, 5
    x = torch.randn(B, I, generator=g)
    w_ih = torch.randn(3 * H, I, generator=g)
    w_hh = torch.randn(3 * H, H, generator=g)
    b_ih = torch.randn(3 * H, generator=g)
    b_hh = torch.randn(3 * H, generator=g)
    h0 = torch.zeros(B, H)
    expect_same(my_gru_step(x, h0, w_ih, w_hh, b_ih, b_hh), torch.gru_cell(x, h0, w_ih, w_hh, b_ih, b_hh),
                "float32 inputs (the output stays float32), zero hidden state")
    h = torch.randn(B, H, generator=g)
    zero_b = torch.zeros(3 * H)
    expect_same(my_gru_step(x, h, w_ih, w_hh, zero_b, zero_b), torch.gru_cell(x, h, w_ih, w_hh, zero_b, zero_b),
                "float32 inputs, zero biases")


@hidden("my_gru_step")
def test_my_gru_step_own_code(my_gru_step):
    import torch
    from companion.grading import expect_same, forbidding
    g = torch.Generator().manual_seed(13)
    B, I, H = 2, 4, 3
    x = torch.randn(B, I, generator=g, dtype=torch.float64)
    h = torch.randn(B, H, generator=g, dtype=torch.float64)
    w_ih = torch.randn(3 * H, I, generator=g, dtype=torch.float64)
    w_hh = torch.randn(3 * H, H, generator=g, dtype=torch.float64)
    b_ih = torch.randn(3 * H, generator=g, dtype=torch.float64)
    b_hh = torch.randn(3 * H, generator=g, dtype=torch.float64)
    if my_gru_step is torch.gru_cell:
        raise AssertionError("my_gru_step is torch.gru_cell itself: this exercise asks for your own code")
    with forbidding(my_gru_step, "torch.gru_cell", "torch._VF.gru_cell", "torch.nn.GRUCell.forward",
                    "torch.nn.GRU.forward", "companion.rnn.GRUCell.forward"):
        got = my_gru_step(x, h, w_ih, w_hh, b_ih, b_hh)
    expect_same(got, torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), "random step, without PyTorch's or the companion's GRU")


@hidden("bidirectional_gru")
def test_bidirectional_gru_other_sizes(bidirectional_gru):
    import torch
    from companion import rnn
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(41)
    for B, T, I, H in [(1, 1, 2, 5), (4, 9, 6, 3), (2, 30, 1, 2)]:
        torch.manual_seed(B * 100 + T)
        fwd, bwd = rnn.GRUCell(I, H).double(), rnn.GRUCell(I, H).double()
        x = torch.randn(B, T, I, generator=g, dtype=torch.float64)
        torch_gru = torch.nn.GRU(I, H, batch_first=True, bidirectional=True).double()
        with torch.no_grad():
            for suffix, cell in [("_l0", fwd), ("_l0_reverse", bwd)]:
                for name, p in cell.named_parameters():
                    getattr(torch_gru, name + suffix).copy_(p)
            states, h = torch_gru(x)
        got = bidirectional_gru(x, fwd, bwd)
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError("return a pair (states, final)")
        expect_same(got[0], states, f"states, batch {B}, {T} positions, input size {I}, hidden size {H}, float64")
        expect_same(got[1], torch.cat([h[0], h[1]], dim=-1),
                    f"final state, batch {B}, {T} positions: forward's last state, then backward's last state")


@hidden("bidirectional_gru")
def test_bidirectional_gru_backward_half_lines_up(bidirectional_gru):
    import torch
    from companion import rnn
    from companion.grading import expect_same
    # The backward cell's state at position t has read positions T-1 down to t only: changing
    # position 0 must leave the backward half at every other position unchanged.
    torch.manual_seed(42)
    fwd, bwd = rnn.GRUCell(3, 4).double(), rnn.GRUCell(3, 4).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    changed = x.clone()
    changed[:, 0] += 5.0
    a, _ = bidirectional_gru(x, fwd, bwd)
    b, _ = bidirectional_gru(changed, fwd, bwd)
    expect_same(b[:, 1:, 4:], a[:, 1:, 4:], "the backward half at positions 1-5 when only position 0 changes")
    expect_same(b[:, :, :4].shape, a[:, :, :4].shape, "states of shape (B, T, 2H)")
    if torch.allclose(b[:, 0, 4:], a[:, 0, 4:]):
        raise AssertionError("the backward half at position 0 must change when position 0 does")


@hidden("bidirectional_gru")
def test_bidirectional_gru_torch_cells_float32(bidirectional_gru):
    import torch
    from companion.grading import expect_same
    # Any cell with PyTorch's step interface works: here torch.nn.GRUCell, in float32.
    torch.manual_seed(43)
    fwd, bwd = torch.nn.GRUCell(5, 3), torch.nn.GRUCell(5, 3)
    x = torch.randn(3, 4, 5)
    torch_gru = torch.nn.GRU(5, 3, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for suffix, cell in [("_l0", fwd), ("_l0_reverse", bwd)]:
            for name, p in cell.named_parameters():
                getattr(torch_gru, name + suffix).copy_(p)
        states, h = torch_gru(x)
    got_states, got_final = bidirectional_gru(x, fwd, bwd)
    expect_same(got_states, states, "cells given as torch.nn.GRUCell, float32 (the output stays float32)")
    expect_same(got_final, torch.cat([h[0], h[1]], dim=-1), "final state with torch.nn.GRUCell cells, float32")


@hidden("bidirectional_gru")
def test_bidirectional_gru_own_code(bidirectional_gru):
    import torch
    from companion import rnn
    from companion.grading import expect_same, forbidding
    torch.manual_seed(44)
    fwd, bwd = rnn.GRUCell(2, 3).double(), rnn.GRUCell(2, 3).double()
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    torch_gru = torch.nn.GRU(2, 3, batch_first=True, bidirectional=True).double()
    with torch.no_grad():
        for suffix, cell in [("_l0", fwd), ("_l0_reverse", bwd)]:
            for name, p in cell.named_parameters():
                getattr(torch_gru, name + suffix).copy_(p)
        states, _ = torch_gru(x)
    with forbidding(bidirectional_gru, "torch.nn.GRU.forward", "torch._VF.gru", "companion.rnn.RecurrentLayer.forward"):
        got, _ = bidirectional_gru(x, fwd, bwd)
    expect_same(got, states, "random input, without torch.nn.GRU")


@hidden("additive_attention")
def test_additive_attention_other_sizes(additive_attention):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(51)
    for B, S, H, M, A, dtype in [(1, 7, 2, 3, 5, torch.float64), (5, 2, 6, 1, 4, torch.float64), (3, 9, 3, 4, 2, torch.float32)]:
        s = torch.randn(B, H, generator=g, dtype=dtype)
        memory = torch.randn(B, S, M, generator=g, dtype=dtype)
        W_s = torch.randn(A, H, generator=g, dtype=dtype)
        W_m = torch.randn(A, M, generator=g, dtype=dtype)
        v = torch.randn(A, generator=g, dtype=dtype)
        scores = torch.tanh((s @ W_s.T)[:, None, :] + memory @ W_m.T) @ v  # (B, S)
        weights = scores.double().softmax(dim=-1).to(dtype)
        context = torch.einsum("bs,bsm->bm", weights.double(), memory.double()).to(dtype)
        got = additive_attention(s, memory, W_s, W_m, v)
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError("return a pair (context, weights)")
        case = f"batch {B}, {S} memory vectors, H={H}, M={M}, A={A}, {dtype}"
        expect_same(got[1], weights, f"weights, {case}")
        expect_same(got[0], context, f"context, {case}")


@hidden("additive_attention")
def test_additive_attention_huge_scores(additive_attention):
    import torch
    from companion.grading import expect_same
    # v of size 1e4: scores in the thousands (about 2020, 7616 and -7616); exp() of them overflows.
    s = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    W = torch.eye(2, dtype=torch.float64)
    v = torch.tensor([1e4, 1e4], dtype=torch.float64)
    context, weights = additive_attention(s, memory, W, W, v)
    expect_same(weights, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), "scores in the thousands: the weights, no nan")
    expect_same(context, torch.tensor([[0.0, 1.0]], dtype=torch.float64), "scores in the thousands: the context, no nan")


@hidden("additive_attention")
def test_additive_attention_rows_are_independent(additive_attention):
    import torch
    from companion.grading import expect_same
    # Each example's weights sum to 1 over its own memory; changing example 1 leaves example 0 alone.
    g = torch.Generator().manual_seed(53)
    s = torch.randn(2, 3, generator=g, dtype=torch.float64)
    memory = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    W_s = torch.randn(6, 3, generator=g, dtype=torch.float64)
    W_m = torch.randn(6, 5, generator=g, dtype=torch.float64)
    v = torch.randn(6, generator=g, dtype=torch.float64)
    context, weights = additive_attention(s, memory, W_s, W_m, v)
    expect_same(weights.sum(dim=-1), torch.ones(2, dtype=torch.float64), "every example's weights sum to 1 over its S positions")
    changed = memory.clone()
    changed[1] *= 3
    context2, weights2 = additive_attention(s, changed, W_s, W_m, v)
    expect_same(weights2[0], weights[0], "example 0's weights when only example 1's memory changes")
    expect_same(context2[0], context[0], "example 0's context when only example 1's memory changes")


@hidden("gnmt_score")
def test_gnmt_score_sums_over_output_steps(gnmt_score):
    import math
    import torch
    from companion.grading import expect_same
    # Rows (output steps) sum to 1; columns (source positions) do not: they receive 0.4, 0.9 and 0.7.
    weights = torch.tensor([[0.3, 0.7, 0.0], [0.1, 0.2, 0.7]], dtype=torch.float64)
    expected = -2.0 / (7 / 6) ** 1.0 + 0.5 * (math.log(0.4) + math.log(0.9) + math.log(0.7))
    got = gnmt_score(-2.0, weights, 1.0, 0.5)
    if not isinstance(got, float):
        raise AssertionError(f"return a Python float, got {type(got).__name__}")
    expect_same(got, expected, "2 output steps, 3 source positions: coverage sums each source position over the output steps")


@hidden("gnmt_score")
def test_gnmt_score_beta_zero_and_unread(gnmt_score):
    import math
    import torch
    from companion.grading import expect_same
    unread = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = gnmt_score(-3.0, unread, 0.5, 0.0)
    expect_same(got, -3.0 / (7 / 6) ** 0.5, "beta=0 with a source position never read: no penalty (not nan)")
    got = gnmt_score(-3.0, unread, 0.5, 1.0)
    if not (isinstance(got, float) and got == -math.inf):
        raise AssertionError(f"beta=1 with a source position never read: expected -inf, got {got!r}")


@hidden("gnmt_score")
def test_gnmt_score_length_penalty_and_cap(gnmt_score):
    import math
    import torch
    from companion.grading import expect_same
    one_step = torch.tensor([[0.25, 0.75]], dtype=torch.float32)
    expect_same(gnmt_score(-1.25, one_step, 3.0, 0.0), -1.25, "one output step: lp = ((5 + 1) / 6) ** alpha = 1")
    heavy = torch.full((6, 2), 0.5, dtype=torch.float32)  # each source position receives 3.0
    expect_same(gnmt_score(-6.0, heavy, 0.8, 2.0), -6.0 / (11 / 6) ** 0.8,
                "6 output steps, every source position over-read: capped at 1, a penalty of 0, never a bonus")
    g = torch.Generator().manual_seed(61)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64).softmax(dim=-1)
    received = [min(float(c), 1.0) for c in w.sum(dim=0)]
    expect_same(gnmt_score(-7.5, w, 0.6, 0.3), -7.5 / (10 / 6) ** 0.6 + 0.3 * sum(math.log(r) for r in received),
                "5 output steps, 8 source positions, alpha=0.6, beta=0.3")
