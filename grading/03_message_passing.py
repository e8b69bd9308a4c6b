"""Hidden tests for chapter 3's exercises."""

from companion.grading import hidden


@hidden("mean_round")
def test_mean_round_in_degree_zero(mean_round):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(31)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w_value = torch.randn(3, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[False, False, False, False],   # node 0 reads nobody
                         [True, False, True, False],     # node 1 reads 0 and 2
                         [False, False, False, False],   # node 2 reads nobody
                         [False, True, False, False]])   # node 3 reads 1
    v = x @ w_value.T
    expected = x.clone()
    expected[1] += (v[0] + v[2]) / 2
    expected[3] += v[1]
    got = mean_round(x, mask, w_value)
    if isinstance(got, torch.Tensor) and got.isnan().any():
        raise AssertionError("nodes 0 and 2 read nobody: the result contains NaN (in-degree 0)")
    expect_same(got, expected, "nodes 0 and 2 read nobody, float64: they keep their vectors")
    expect_same(mean_round(x, torch.zeros(4, 4, dtype=torch.bool), w_value), x,
                "a graph without edges: every node keeps its vector")


@hidden("mean_round")
def test_mean_round_uneven_degrees_float32(mean_round):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(32)
    x = torch.randn(5, 4, generator=g, dtype=torch.float32)
    w_value = torch.randn(4, 4, generator=g, dtype=torch.float32)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()  # node i reads 0..i: in-degrees 1 to 5
    v = x @ w_value.T
    expected = x + v.cumsum(0) / torch.arange(1, 6, dtype=torch.float32)[:, None]
    expect_same(mean_round(x, mask, w_value), expected,
                "float32, causal graph: node i averages the values of nodes 0..i (in-degrees 1 to 5)")


@hidden("mean_round")
def test_mean_round_self_loops_only(mean_round):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(33)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w_value = torch.randn(6, 6, generator=g, dtype=torch.float64)
    expect_same(mean_round(x, torch.eye(3, dtype=torch.bool), w_value), x + x @ w_value.T,
                "only self-loops: each node adds its own value")
    expect_same(mean_round(x[:1], torch.zeros(1, 1, dtype=torch.bool), w_value), x[:1],
                "one node that reads nobody")


@hidden("multigraph_round")
def test_multigraph_round_copies_count(multigraph_round):
    import math

    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(34)
    N, C, D = 3, 4, 2
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w_query = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_key = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    q, k, v = x @ w_query.T, x @ w_key.T, x @ w_value.T
    s = k @ q[2] / math.sqrt(D)
    w0 = 3 * torch.exp(s[0]) / (3 * torch.exp(s[0]) + torch.exp(s[1]))  # node 0 sends three times
    expected = x.clone()
    expected[2] += w0 * v[0] + (1 - w0) * v[1]
    expected[1] += v[2]
    edges = [(0, 2), (1, 2), (0, 2), (2, 1), (0, 2)]
    expect_same(multigraph_round(x, edges, w_query, w_key, w_value), expected,
                "edges [(0, 2), (1, 2), (0, 2), (2, 1), (0, 2)]: node 0 sends to 2 three times, node 0 reads nobody")


@hidden("multigraph_round")
def test_multigraph_round_nobody_sends(multigraph_round):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(35)
    N, C, D = 4, 3, 3
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w_query = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_key = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    got = multigraph_round(x, [], w_query, w_key, w_value)
    if isinstance(got, torch.Tensor) and got.isnan().any():
        raise AssertionError("no edges at all: the result contains NaN")
    expect_same(got, x, "no edges at all: every node keeps its vector")
    got = multigraph_round(x, [(3, 3), (3, 3)], w_query, w_key, w_value)
    expected = x.clone()
    expected[3] += x[3] @ w_value.T
    expect_same(got, expected, "one self-loop drawn twice on node 3: its only sender has weight 1")


@hidden("multigraph_round")
def test_multigraph_round_large_scores(multigraph_round):
    import math

    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(36)
    N, C, D = 4, 5, 4
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w_query = 40 * torch.randn(D, C, generator=g, dtype=torch.float64)  # scores in the thousands
    w_key = 40 * torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    edges = [(0, 1), (2, 1), (2, 1), (3, 1), (1, 1)]
    q, k, v = x @ w_query.T, x @ w_key.T, x @ w_value.T
    counts = torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    s = k @ q[1] / math.sqrt(D) + counts.log()
    expected = x.clone()
    expected[1] += torch.softmax(s, 0) @ v
    got = multigraph_round(x, edges, w_query, w_key, w_value)
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
        raise AssertionError("scores in the thousands: the result contains inf or NaN")
    expect_same(got, expected, f"scores as large as {s.abs().max().item():.0f}, node 2 sending to 1 twice")


@hidden("multigraph_round")
def test_multigraph_round_own_code(multigraph_round):
    import math

    import torch
    from companion.grading import expect_same, forbidding
    g = torch.Generator().manual_seed(37)
    N, C, D = 3, 4, 2
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w_query = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_key = torch.randn(D, C, generator=g, dtype=torch.float64)
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64)
    with forbidding(multigraph_round, "one_round", "companion.message_passing.message_passing_round"):
        got = multigraph_round(x, [(1, 0), (1, 0)], w_query, w_key, w_value)
    expected = x.clone()
    expected[0] += x[1] @ w_value.T
    expect_same(got, expected, "edge (1, 0) twice, without the loop one_round or mp.message_passing_round")


@hidden("heard_from")
def test_heard_from_residual(heard_from):
    import torch
    from companion.grading import expect_same
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 0] = mask[2, 1] = mask[3, 2] = True  # i reads i - 1, no self-loops
    expect_same(heard_from(mask, 0), torch.eye(4, dtype=torch.bool), "0 blocks: each node has heard only itself")
    expected = torch.eye(4, dtype=torch.bool) | mask
    expect_same(heard_from(mask, 1), expected,
                "1 block, i reads i - 1 and no self-loops: itself (the residual) and i - 1")
    expect_same(heard_from(mask, 2), expected | torch.diag(torch.ones(2, dtype=torch.bool), -2),
                "2 blocks on the same chain: i, i - 1 and i - 2 (row = receiver)")


@hidden("heard_from")
def test_heard_from_many_blocks(heard_from):
    import torch
    from companion.grading import expect_same
    expect_same(heard_from(torch.ones(8, 8, dtype=torch.bool), 30), torch.ones(8, 8, dtype=torch.bool),
                "complete graph of 8 nodes, 30 blocks: 8^30 paths per pair, everyone has heard everyone")
    star = torch.zeros(5, 5, dtype=torch.bool)
    star[0, 1:] = True  # node 0 reads the others; nobody reads node 0
    expected = torch.eye(5, dtype=torch.bool)
    expected[0] = True
    expect_same(heard_from(star, 40), expected, "node 0 reads nodes 1-4, 40 blocks: the others hear only themselves")


@hidden("heard_from")
def test_heard_from_agrees_with_autograd(heard_from):
    import torch
    from companion import message_passing as mp
    from companion.grading import expect_same
    torch.manual_seed(38)
    N, C = 6, 4
    mask = torch.zeros(N, N, dtype=torch.bool)
    for src, dst in [(0, 1), (1, 2), (2, 2), (4, 3), (3, 5), (5, 0)]:
        mask[dst, src] = True
    block = mp.Block(C).double()
    h = torch.randn(N, C, dtype=torch.float64)
    for n_blocks in (1, 2, 3):
        def run(h):
            for _ in range(n_blocks):
                h = block(h, mask)
            return h
        jac = torch.autograd.functional.jacobian(run, h)  # (N, C, N, C)
        expected = jac.abs().sum(dim=(1, 3)) > 0
        expect_same(heard_from(mask, n_blocks), expected,
                    f"a 6-node directed graph (node 4 reads nobody), {n_blocks} block(s) of mp.Block")
