"""Hidden tests for chapter 3's exercises."""

from companion.grading import hidden


@hidden("my_causal_mask")
def test_my_causal_mask_bool_other_sizes(my_causal_mask):
    import torch
    from companion.grading import expect_same
    for n in (2, 3, 16, 33):
        expected = torch.ones(n, n, dtype=torch.bool).tril()
        expect_same(my_causal_mask(n), expected, f"n={n} (a torch.bool tensor, True where column <= row)")


@hidden("my_causal_mask")
def test_my_causal_mask_own_code(my_causal_mask):
    import torch
    from companion import message_passing as mp
    from companion.grading import expect_same, forbidding
    if my_causal_mask is mp.causal_mask:
        raise AssertionError("my_causal_mask is mp.causal_mask itself: this exercise asks for your own code")
    with forbidding(my_causal_mask, "companion.message_passing.causal_mask", "companion.attention.causal_mask"):
        got = my_causal_mask(9)
    expect_same(got, torch.ones(9, 9, dtype=torch.bool).tril(), "n=9, without the companion's causal_mask")


@hidden("message_to")
def test_message_to_float64_other_graph(message_to):
    import math
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(41)
    N, C, D = 5, 3, 2
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w_query = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_key = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    # (src, dst): node 2 reads 0, 1 and 4; node 3 reads only itself; node 4 reads 0 and 3;
    # node 1 reads 2; node 0 only sends.
    edges = [(0, 2), (1, 2), (4, 2), (3, 3), (0, 4), (3, 4), (2, 1)]
    for i in (1, 2, 3, 4):
        senders = [s for s, d in edges if d == i]
        q = x[i] @ w_query.T
        k = x[senders] @ w_key.T
        v = x[senders] @ w_value.T
        expected = torch.softmax(k @ q / math.sqrt(D), dim=0) @ v
        expect_same(message_to(i, x, edges, w_query, w_key, w_value), expected,
                    f"node {i} of a 5-node graph, float64 (C=3, D=2), in-neighbours {senders}")


@hidden("message_to")
def test_message_to_no_in_edges(message_to):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(42)
    N, C, D = 4, 7, 3
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w_query = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_key = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    edges = [(0, 1), (0, 2), (2, 2), (3, 1)]
    for i, edges_, case in [(0, edges, "node 0 sends to 1 and 2 but no edge points into it"),
                            (3, edges, "node 3 sends to 1 but no edge points into it"),
                            (2, [], "a graph with no edges at all")]:
        got = message_to(i, x, edges_, w_query, w_key, w_value)
        if isinstance(got, torch.Tensor):
            got = got.double()  # the zero vector's dtype is not what is tested here
        expect_same(got, torch.zeros(C, dtype=torch.float64), f"{case}: a zero vector of shape (C,)=(7,)")


@hidden("message_to")
def test_message_to_large_scores(message_to):
    import math
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(43)
    N, C, D = 4, 6, 4
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w_query = 30 * torch.randn(D, C, generator=g, dtype=torch.float64)  # scores in the thousands: exp overflows
    w_key = 30 * torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    edges = [(0, 1), (1, 1), (2, 1), (3, 1)]
    scores = (x @ w_key.T) @ (w_query @ x[1]) / math.sqrt(D)
    expected = torch.softmax(scores, dim=0) @ (x @ w_value.T)
    expect_same(message_to(1, x, edges, w_query, w_key, w_value), expected,
                f"node 1 reads all 4 nodes, scores as large as {scores.abs().max().item():.0f} (no inf or NaN)")


@hidden("message_to")
def test_message_to_own_code(message_to):
    import torch
    from companion import message_passing as mp
    from companion.grading import expect_same, forbidding
    g = torch.Generator().manual_seed(44)
    N, C, D = 5, 4, 2
    f32 = torch.float32
    x = torch.randn(N, C, generator=g, dtype=f32)
    w_query, w_key = torch.randn(D, C, generator=g, dtype=f32), torch.randn(D, C, generator=g, dtype=f32)
    w_value = torch.randn(C, C, generator=g, dtype=f32)
    edges = [(0, 3), (1, 3), (3, 3), (4, 0)]
    with forbidding(message_to, "companion.message_passing.attention_round",
                    "companion.message_passing.message_passing_round", "companion.message_passing.masked_attention",
                    "torch.nn.functional.scaled_dot_product_attention", "companion.attention.attention"):
        got = message_to(3, x, edges, w_query, w_key, w_value)
    expected = mp.attention_round(x, mp.adjacency_mask(N, edges), w_query, w_key, w_value)[3] - x[3]
    expect_same(got, expected, "node 3 reads 0, 1 and itself, float32, without the companion's attention rounds")


@hidden("cross_attention_round")
def test_cross_attention_round_other_shapes(cross_attention_round):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(51)
    for N, S, C, D in [(5, 2, 6, 3), (2, 7, 4, 5), (1, 1, 3, 2)]:
        x_dec = torch.randn(N, C, generator=g, dtype=torch.float64)
        x_enc = torch.randn(S, C, generator=g, dtype=torch.float64)
        w_query = torch.randn(D, C, generator=g, dtype=torch.float64)
        w_key = torch.randn(D, C, generator=g, dtype=torch.float64)
        w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
        q, k, v = x_dec @ w_query.T, x_enc @ w_key.T, x_enc @ w_value.T
        expected = x_dec + F.scaled_dot_product_attention(q, k, v)
        expect_same(cross_attention_round(x_dec, x_enc, w_query, w_key, w_value), expected,
                    f"N={N} decoder and S={S} encoder nodes, C={C}, D={D}, float64")


@hidden("cross_attention_round")
def test_cross_attention_round_one_encoder_node(cross_attention_round):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(52)
    N, C, D = 4, 5, 3
    f32 = torch.float32
    x_dec, x_enc = torch.randn(N, C, generator=g, dtype=f32), torch.randn(1, C, generator=g, dtype=f32)
    w_query, w_key = torch.randn(D, C, generator=g, dtype=f32), torch.randn(D, C, generator=g, dtype=f32)
    w_value = torch.randn(C, C, generator=g, dtype=f32)
    expected = x_dec + x_enc @ w_value.T  # one sender: its weight is 1 for every decoder node
    expect_same(cross_attention_round(x_dec, x_enc, w_query, w_key, w_value), expected,
                "one encoder node, float32: every decoder node adds its whole value")


@hidden("cross_attention_round")
def test_cross_attention_round_large_scores(cross_attention_round):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(53)
    N, S, C, D = 3, 6, 4, 4
    x_dec = torch.randn(N, C, generator=g, dtype=torch.float64)
    x_enc = torch.randn(S, C, generator=g, dtype=torch.float64)
    w_query = 30 * torch.randn(D, C, generator=g, dtype=torch.float64)  # scores in the thousands: exp overflows
    w_key = 30 * torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    q, k, v = x_dec @ w_query.T, x_enc @ w_key.T, x_enc @ w_value.T
    expected = x_dec + F.scaled_dot_product_attention(q, k, v)
    biggest = (q @ k.T).abs().max().item() / 2
    expect_same(cross_attention_round(x_dec, x_enc, w_query, w_key, w_value), expected,
                f"scores as large as {biggest:.0f} (no inf or NaN)")


@hidden("cross_attention_round")
def test_cross_attention_round_own_code(cross_attention_round):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same, forbidding
    g = torch.Generator().manual_seed(54)
    N, S, C, D = 3, 5, 4, 2
    f64 = torch.float64
    x_dec, x_enc = torch.randn(N, C, generator=g, dtype=f64), torch.randn(S, C, generator=g, dtype=f64)
    w_query, w_key = torch.randn(D, C, generator=g, dtype=f64), torch.randn(D, C, generator=g, dtype=f64)
    w_value = torch.randn(C, C, generator=g, dtype=f64)
    with forbidding(cross_attention_round, "companion.message_passing.masked_attention",
                    "companion.message_passing.attention_round", "torch.nn.functional.scaled_dot_product_attention",
                    "companion.attention.attention", "companion.layers.attention", "companion.layers.sdpa_attention",
                    "torch.nn.MultiheadAttention.forward"):
        got = cross_attention_round(x_dec, x_enc, w_query, w_key, w_value)
    q, k, v = x_dec @ w_query.T, x_enc @ w_key.T, x_enc @ w_value.T
    expect_same(got, x_dec + F.scaled_dot_product_attention(q, k, v),
                "3 decoder and 5 encoder nodes, without a library attention function")
