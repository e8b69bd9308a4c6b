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


@hidden("my_layer_norm")
def test_my_layer_norm_float64_4d(my_layer_norm):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(21)
    x = 3 * torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) + 7
    expect_same(my_layer_norm(x), F.layer_norm(x, x.shape[-1:]), "float64 input of shape (2, 3, 4, 5) (the output stays float64)")
    v = torch.randn(6, generator=g)
    expect_same(my_layer_norm(v), F.layer_norm(v, v.shape[-1:]), "a 1-D input of shape (6,)")


@hidden("my_layer_norm")
def test_my_layer_norm_eps(my_layer_norm):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(22)
    small = 1e-3 * torch.randn(4, 8, generator=g, dtype=torch.float64)  # variance ~1e-6, below eps
    expect_same(my_layer_norm(small), F.layer_norm(small, (8,)),
                "rows with variance ~1e-6, default eps=1e-5 (eps goes inside the square root)")
    expect_same(my_layer_norm(small, eps=0.1), F.layer_norm(small, (8,), eps=0.1), "the same rows with eps=0.1")
    x = torch.randn(3, 5, generator=g)
    expect_same(my_layer_norm(x, 0.5), F.layer_norm(x, (5,), eps=0.5), "random rows, eps=0.5 passed by position")


@hidden("my_layer_norm")
def test_my_layer_norm_constant_rows(my_layer_norm):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    expect_same(my_layer_norm(x), F.layer_norm(x, (4,)), "constant rows normalize to zeros, not NaN")
    one = torch.tensor([[5.0], [-3.0]])
    expect_same(my_layer_norm(one), F.layer_norm(one, (1,)), "a last dimension of size 1 (all zeros)")


@hidden("my_layer_norm")
def test_my_layer_norm_own_code(my_layer_norm):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same, forbidding
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(23))
    with forbidding(my_layer_norm, "torch.nn.functional.layer_norm", "torch.layer_norm", "torch.native_layer_norm",
                    "torch.nn.LayerNorm.forward"):
        got = my_layer_norm(x)
    expect_same(got, F.layer_norm(x, (7,)), "random rows, without PyTorch's layer norm")


@hidden("my_sequence_log_prob")
def test_my_sequence_log_prob_empty_and_one(my_sequence_log_prob):
    import math
    import torch
    from companion.grading import expect_same
    table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=torch.float64).log()

    def step_fn(prefix):
        return table[prefix[-1]]

    expect_same(my_sequence_log_prob(step_fn, [2], []), 0.0, "no tokens at all: an empty sum, 0.0")
    expect_same(my_sequence_log_prob(step_fn, [2], [1]), math.log(0.2), "one token")
    expect_same(my_sequence_log_prob(step_fn, [0], [1, 1, 2]), math.log(0.25 * 0.6 * 0.3), "three tokens from start [0]")


@hidden("my_sequence_log_prob")
def test_my_sequence_log_prob_whole_prefix(my_sequence_log_prob):
    import torch
    from companion.generation import beam
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(31)
    V = 5
    # The next-token distribution depends on the first token, the length and the last token
    # of the prefix, so a function that drops start, or never extends the prefix, is off.
    log_table = torch.randn(V, 12, V, V, generator=g, dtype=torch.float64).log_softmax(dim=-1)

    def step_fn(prefix):
        return log_table[prefix[0], len(prefix) % 12, prefix[-1]]

    tokens = torch.randint(0, V, (9,), generator=g).tolist()
    for start in ([3], [4, 0, 2]):
        expect_same(my_sequence_log_prob(step_fn, start, tokens), beam.sequence_log_prob(step_fn, start, tokens),
                    f"a model that reads the whole prefix, start={start}, 9 tokens")


@hidden("my_sequence_log_prob")
def test_my_sequence_log_prob_own_code(my_sequence_log_prob):
    import torch
    from companion.generation import beam
    from companion.grading import expect_same, forbidding
    g = torch.Generator().manual_seed(32)
    log_table = torch.randn(4, 4, generator=g).log_softmax(dim=-1)  # float32 model

    def step_fn(prefix):
        return log_table[prefix[-1]]

    tokens = torch.randint(0, 4, (40,), generator=g).tolist()
    if my_sequence_log_prob is beam.sequence_log_prob:
        raise AssertionError("my_sequence_log_prob is beam.sequence_log_prob itself: this exercise asks for your own code")
    with forbidding(my_sequence_log_prob, "companion.generation.beam.sequence_log_prob"):
        got = my_sequence_log_prob(step_fn, [1], tokens)
    expect_same(got, beam.sequence_log_prob(step_fn, [1], tokens),
                "40 tokens from a float32 model, without beam.sequence_log_prob")


@hidden("one_hot_distances")
def test_one_hot_distances_one_token(one_hot_distances):
    from companion.grading import expect_same
    expect_same(one_hot_distances(1), set(), "V=1: one token, no pair of distinct tokens, so the empty set")


@hidden("one_hot_distances")
def test_one_hot_distances_other_sizes(one_hot_distances):
    import math
    from companion.grading import expect_same
    for V in (3, 4, 31, 200):
        got = one_hot_distances(V)
        if not isinstance(got, (set, frozenset)):
            raise AssertionError(f"V={V}: expected a set, got {type(got).__name__}")
        expect_same(got, {round(math.sqrt(2), 6)}, f"V={V}")
