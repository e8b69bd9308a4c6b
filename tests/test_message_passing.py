"""Message passing on a graph equals masked attention; the block's two halves."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.message_passing import (
    Block,
    Node,
    adjacency_mask,
    attention_round,
    bipartite_mask,
    causal_mask,
    complete_mask,
    draw_graph,
    edges_of,
    make_nodes,
    masked_attention,
    message_passing_round,
    random_edges,
)




def random_maps(C, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, C, generator=g, dtype=torch.float64)
    w = [torch.randn(D, C, generator=g, dtype=torch.float64) / math.sqrt(C) for _ in range(2)]
    w_value = torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C)
    return x, w[0], w[1], w_value


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 8), density=st.floats(0.0, 1.0), seed=st.integers(0, 1000),
       scale=st.booleans())
def test_loop_equals_masked_attention(n, density, seed, scale):
    x, wq, wk, wv = random_maps(6, 4, seed)
    x = x[:n]
    edges = random_edges(n, round(density * n * n), torch.Generator().manual_seed(seed))
    loop = torch.stack(message_passing_round(make_nodes(x, wq, wk, wv), edges, scale=scale))
    matrix = attention_round(x, adjacency_mask(n, edges), wq, wk, wv, scale=scale)
    torch.testing.assert_close(loop, matrix, atol=1e-12, rtol=1e-12)


def test_nodes_without_in_edges_keep_their_vector_in_both_forms():
    x, wq, wk, wv = random_maps(6, 4)
    x = x[:4]
    edges = [(0, 1), (2, 1), (1, 3)]  # nodes 0 and 2 receive nothing
    loop = message_passing_round(make_nodes(x, wq, wk, wv), edges)
    matrix = attention_round(x, adjacency_mask(4, edges), wq, wk, wv)
    for i in (0, 2):
        assert torch.equal(loop[i], x[i]) and torch.equal(matrix[i], x[i])
    assert not torch.equal(loop[1], x[1]) and not torch.equal(loop[3], x[3])
    # node 3 has a single in-neighbour: softmax weight 1, so it receives exactly node 1's value
    torch.testing.assert_close(loop[3], x[3] + wv @ x[1])


def test_no_edges_at_all_and_huge_scores_stay_finite():
    x, wq, wk, wv = random_maps(6, 4)
    x = x[:3]
    assert torch.equal(attention_round(x, adjacency_mask(3, []), wq, wk, wv), x)
    big = 1e4 * x  # scores around 1e8: a softmax without the max-shift would overflow
    loop = torch.stack(message_passing_round(make_nodes(big, wq, wk, wv), [(0, 1), (2, 1)]))
    assert torch.isfinite(loop).all()
    torch.testing.assert_close(loop, attention_round(big, adjacency_mask(3, [(0, 1), (2, 1)]), wq, wk, wv))


def test_round_is_synchronous_and_leaves_nodes_unchanged():
    x, wq, wk, wv = random_maps(6, 4)
    nodes = make_nodes(x[:3].clone(), wq, wk, wv)
    before = [node.data.clone() for node in nodes]
    edges = [(0, 1), (1, 2), (2, 0)]
    out = message_passing_round(nodes, edges)
    assert all(torch.equal(a, n.data) for a, n in zip(before, nodes))
    # node 2's update uses node 1's old vector, not node 1's new one
    torch.testing.assert_close(out[2], before[2] + wv @ before[1])


def test_masked_attention_equals_torch_sdpa_with_a_boolean_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for mask in (complete_mask(5), causal_mask(5), adjacency_mask(5, random_edges(5, 12, g)) | torch.eye(5, dtype=torch.bool)):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(masked_attention(q, k, v, mask), expected)


def test_cross_attention_reads_the_other_set():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64)
    k, v = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    out = masked_attention(q, k, v, bipartite_mask(3, 5))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert out.shape == (3, 6)


def test_masks_and_edges():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert complete_mask(2).all() and bipartite_mask(2, 3).shape == (2, 3)
    edges = random_edges(6, 20, torch.Generator().manual_seed(3))
    assert len(set(edges)) == 20
    assert edges_of(adjacency_mask(6, edges)) == sorted(edges)
    assert adjacency_mask(3, [(0, 2)])[2, 0] and not adjacency_mask(3, [(0, 2)])[0, 2]


def test_block_attention_equals_torch_multihead_attention():
    torch.manual_seed(4)
    block = Block(8).double()
    mha = torch.nn.MultiheadAttention(8, num_heads=1, bias=False, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.query.weight, block.key.weight, block.value.weight]))
        mha.out_proj.weight.copy_(block.proj.weight)
        mha.out_proj.bias = torch.nn.Parameter(block.proj.bias.clone())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = causal_mask(5)
    expected, _ = mha(x, x, x, attn_mask=~mask)  # torch's boolean mask: True = blocked
    torch.testing.assert_close(block.communicate(x, mask), expected)


def test_only_communication_mixes_nodes():
    torch.manual_seed(5)
    block = Block(8).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    edges = [(0, 0), (1, 1), (2, 2), (3, 3), (0, 2)]  # self-loops and one edge 0 -> 2
    mask = adjacency_mask(4, edges)
    jac = torch.autograd.functional.jacobian(lambda x: block(x, mask), x, vectorize=True)  # (4, 8, 4, 8)
    depends = jac.abs().sum(dim=(1, 3)) > 0  # [i, j]: does output i depend on input j?
    assert torch.equal(depends, mask)
    # the MLP alone acts on each node separately
    mlp_jac = torch.autograd.functional.jacobian(block.mlp, x, vectorize=True)
    assert torch.equal(mlp_jac.abs().sum(dim=(1, 3)) > 0, torch.eye(4, dtype=torch.bool))


def test_draw_graph_draws_one_arrow_per_edge():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3)
    assert draw_graph(axes[0], complete_mask(3)) == 9
    assert draw_graph(axes[1], causal_mask(4)) == 10
    assert draw_graph(axes[2], bipartite_mask(2, 3), receivers=["a", "b"], senders=["x", "y", "z"]) == 6
    plt.close(fig)


def test_clear_errors():
    x, wq, wk, wv = random_maps(6, 4)
    with pytest.raises(ValueError, match="w_value has shape"):
        attention_round(x[:3], complete_mask(3), wq, wk, wv[:, :5])
    with pytest.raises(ValueError, match="must both be"):
        make_nodes(x[:3], wq[:, :5], wk, wv)
    with pytest.raises(ValueError, match="at least one node"):
        make_nodes(x[:0], wq, wk, wv)
    with pytest.raises(ValueError, match="boolean"):
        masked_attention(x[:3, :4], x[:3, :4], x[:3], torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"\(N, S\) = \(3, 3\)"):
        masked_attention(x[:3, :4], x[:3, :4], x[:3], complete_mask(4))
    with pytest.raises(ValueError, match="do not fit"):
        masked_attention(x[:3, :4], x[:3, :5], x[:3], complete_mask(3))
    with pytest.raises(ValueError, match="edge"):
        adjacency_mask(3, [(0, 3)])
    with pytest.raises(ValueError, match="repeats"):
        adjacency_mask(3, [(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="n_edges=10"):
        random_edges(3, 10)
    with pytest.raises(ValueError, match="nodes is empty"):
        message_passing_round([], [])
    with pytest.raises(ValueError, match="C=8"):
        Block(8)(torch.zeros(3, 5), complete_mask(3))
    assert isinstance(make_nodes(x[:1], wq, wk, wv)[0], Node)
