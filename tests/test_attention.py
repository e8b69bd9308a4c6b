"""Tests of companion.attention: the four variants, cross-attention and positions.

Oracles: the numbers of the six-word example, computations written out in float64,
``torch.nn.MultiheadAttention`` with copied weights and ``F.scaled_dot_product_attention``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.attention import (
    CausalAttention,
    CrossAttention,
    MultiHeadAttention,
    MultiHeadAttentionLoop,
    SelfAttention,
    attention,
    causal_mask,
    check_mask,
    merge_heads,
    simple_attention,
    sinusoidal_positions,
    split_heads,
    to_torch_mha,
)

# "Your journey starts with one step": one 3-d embedding per word.
INPUTS = torch.tensor(
    [
        [0.43, 0.15, 0.89],  # Your
        [0.55, 0.87, 0.66],  # journey
        [0.57, 0.85, 0.64],  # starts
        [0.22, 0.58, 0.33],  # with
        [0.77, 0.25, 0.10],  # one
        [0.05, 0.80, 0.55],  # step
    ]
)

FAST = settings(max_examples=25, deadline=None)


def close(a, b, atol=1e-6):
    return torch.allclose(a, b, atol=atol, rtol=0)


# ---- 1. simplified self-attention ----------------------------------------------------------


def test_six_word_scores_for_journey():
    scores = INPUTS @ INPUTS[1]
    expected = torch.tensor([0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865])
    assert close(scores, expected, atol=5e-5)


def test_six_word_normalisations():
    scores = INPUTS @ INPUTS[1]
    by_sum = scores / scores.sum()
    by_softmax = torch.softmax(scores, dim=0)
    assert close(by_sum, torch.tensor([0.1455, 0.2278, 0.2249, 0.1285, 0.1077, 0.1656]), atol=5e-5)
    assert close(by_softmax, torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]), atol=5e-5)
    context, weights = simple_attention(INPUTS, return_weights=True)
    assert close(weights[1], by_softmax)
    assert close(context[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=5e-5)


def test_simple_attention_is_the_written_out_sum():
    context, weights = simple_attention(INPUTS.double(), return_weights=True)
    x = INPUTS.double()
    for i in range(6):
        scores = torch.stack([torch.dot(x[i], x[j]) for j in range(6)])
        w = scores.exp() / scores.exp().sum()
        assert close(weights[i], w, atol=1e-12)
        assert close(context[i], sum(w[j] * x[j] for j in range(6)), atol=1e-12)


def test_simple_attention_batched_equals_one_by_one():
    x = torch.randn(3, 5, 4)
    batched = simple_attention(x)
    assert batched.shape == (3, 5, 4)
    for b in range(3):
        assert close(batched[b], simple_attention(x[b]))


# ---- 2. trainable self-attention -----------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_matches_manual_computation(bias):
    torch.manual_seed(0)
    sa = SelfAttention(3, 2, qkv_bias=bias).double()
    x = INPUTS.double()
    Wq, Wk, Wv = (p.weight.T for p in (sa.q_proj, sa.k_proj, sa.v_proj))  # (d_in, d_out)
    q, k, v = x @ Wq, x @ Wk, x @ Wv
    if bias:
        q, k, v = q + sa.q_proj.bias, k + sa.k_proj.bias, v + sa.v_proj.bias
    out = torch.empty(6, 2, dtype=torch.float64)
    for i in range(6):
        scores = torch.stack([q[i] @ k[j] for j in range(6)]) / math.sqrt(2)
        w = scores.exp() / scores.exp().sum()
        out[i] = (w[:, None] * v).sum(0)
    got, weights = sa(x, return_weights=True)
    assert close(got, out, atol=1e-12)
    assert close(weights.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    # batched input gives the same rows
    assert close(sa(x.unsqueeze(0))[0], out, atol=1e-12)


@FAST
@given(
    B=st.integers(1, 3), H=st.integers(1, 3), Tq=st.integers(1, 6), Tk=st.integers(1, 6),
    D=st.integers(1, 5), masked=st.booleans(), seed=st.integers(0, 2**16),
)
def test_attention_function_equals_sdpa(B, H, Tq, Tk, D, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, t, D, generator=g, dtype=torch.float64) for t in (Tq, Tk, Tk))
    mask = None
    if masked:
        mask = torch.rand(B, 1, Tq, Tk, generator=g) < 0.6
        mask[..., 0] = True  # every query sees at least one key
    out, weights = attention(q, k, v, mask=mask)
    assert close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-10)
    assert close(weights.sum(-1), torch.ones(B, H, Tq, dtype=torch.float64), atol=1e-10)
    if masked:
        assert torch.all(weights.masked_select(~mask.expand_as(weights)) == 0)


# ---- 3. causal attention -------------------------------------------------------------------


def test_causal_weights_are_lower_triangular_and_normalised():
    torch.manual_seed(0)
    ca = CausalAttention(3, 2, context_length=6)
    _, weights = ca(INPUTS.unsqueeze(0), return_weights=True)
    assert torch.all(weights[0].triu(diagonal=1) == 0)
    assert close(weights.sum(-1), torch.ones(1, 6))
    assert weights[0, 0, 0].item() == 1.0  # the first token can only attend to itself


def test_changing_future_tokens_does_not_change_the_past():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 8, context_length=10, num_heads=2).eval()
    x = torch.randn(2, 10, 8)
    for t in range(9):
        y = x.clone()
        y[:, t + 1:] = torch.randn(2, 9 - t, 8)
        a, b = mha(x), mha(y)
        assert close(a[:, : t + 1], b[:, : t + 1])
        assert not close(a[:, t + 1:], b[:, t + 1:])


def test_mask_before_softmax_equals_renormalising_after():
    scores = torch.randn(2, 7, 7, dtype=torch.float64)
    mask = causal_mask(7)
    before = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    after = torch.softmax(scores, dim=-1) * mask
    after = after / after.sum(-1, keepdim=True)
    assert close(before, after, atol=1e-12)


def test_dropout_is_identity_in_eval_mode_and_scales_in_training():
    torch.manual_seed(0)
    with_dropout = CausalAttention(4, 4, context_length=8, dropout=0.5)
    without = CausalAttention(4, 4, context_length=8, dropout=0.0)
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(2, 8, 4)
    assert torch.equal(with_dropout.eval()(x), without.eval()(x))
    _, clean = without(x, return_weights=True)
    _, dropped = with_dropout.train()(x, return_weights=True)
    kept = dropped != 0
    assert (clean[~kept] != 0).any()  # something that was attended to was dropped
    assert close(dropped[kept], 2 * clean[kept])  # the survivors scaled by 1 / (1 - 0.5)


# ---- 4. multi-head attention ---------------------------------------------------------------


@FAST
@given(
    B=st.integers(1, 3), T=st.integers(1, 7), H=st.integers(1, 4), D=st.integers(1, 4),
    d_in=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_batched_heads_equal_the_loop_of_heads(B, T, H, D, d_in, bias, seed):
    torch.manual_seed(seed)
    loop = MultiHeadAttentionLoop(d_in, H * D, context_length=7, num_heads=H, qkv_bias=bias).double()
    batched = MultiHeadAttention.from_loop(loop)
    x = torch.randn(B, T, d_in, dtype=torch.float64)
    expected = loop(x)
    assert close(batched(x), expected, atol=1e-12)
    assert close(MultiHeadAttention.from_loop(loop, use_sdpa=True)(x), expected, atol=1e-12)
    # the weights of head h are the loop's head h
    _, weights = batched(x, return_weights=True)
    for h, head in enumerate(loop.heads):
        assert close(weights[:, h], head(x, return_weights=True)[1], atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_torch_multihead_attention(causal, bias):
    torch.manual_seed(1)
    mha = MultiHeadAttention(12, 12, context_length=9, num_heads=3, qkv_bias=bias, causal=causal)
    mha = mha.double().eval()
    ref = to_torch_mha(mha)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    blocked = ~causal_mask(9) if causal else None
    expected, ref_weights = ref(x, x, x, attn_mask=blocked, average_attn_weights=False)
    got, weights = mha(x, return_weights=True)
    assert close(got, expected, atol=1e-12)
    assert close(weights, ref_weights, atol=1e-12)
    # with a padding mask on top: the second sequence's last two positions are padding
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 7:] = False
    expected = ref(x, x, x, attn_mask=blocked, key_padding_mask=~keep[:, 0, 0], need_weights=False)[0]
    assert close(mha(x, mask=keep), expected, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_path_equals_written_out_path(causal):
    torch.manual_seed(2)
    explicit = MultiHeadAttention(8, 16, context_length=6, num_heads=4, qkv_bias=True, causal=causal)
    fused = MultiHeadAttention(8, 16, context_length=6, num_heads=4, qkv_bias=True, causal=causal, use_sdpa=True)
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(3, 6, 8)
    assert close(fused(x), explicit(x), atol=1e-5)
    keep = torch.rand(3, 4, 6, 6) < 0.7
    keep[..., 0] = True
    assert close(fused(x, mask=keep), explicit(x, mask=keep), atol=1e-5)


def test_multihead_attention_is_a_module_with_fixed_trainable_weights():
    # The naive version built new nn.Linear layers inside the function, on every call:
    # two calls disagreed and there was nothing for an optimizer to train.
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 8, context_length=4, num_heads=2)
    x = torch.randn(1, 4, 8)
    assert torch.equal(mha(x), mha(x))
    mha(x).sum().backward()
    assert len(list(mha.parameters())) == 5  # q, k, v, out weights and the out bias
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mha.parameters())


@FAST
@given(B=st.integers(1, 3), T=st.integers(1, 5), H=st.integers(1, 4), D=st.integers(1, 4))
def test_split_and_merge_heads(B, T, H, D):
    x = torch.randn(B, T, H * D)
    heads = split_heads(x, H)
    assert heads.shape == (B, H, T, D)
    assert torch.equal(heads[:, 0], x[..., :D])  # head 0 owns the first D channels
    assert torch.equal(merge_heads(heads), x)


# ---- cross-attention -----------------------------------------------------------------------


def test_cross_attention_shapes_and_reference():
    torch.manual_seed(3)
    cross = CrossAttention(d_q=8, d_kv=5, d_out=8, num_heads=2, qkv_bias=True).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)  # 3 queries (the decoder)
    ctx = torch.randn(2, 7, 5, dtype=torch.float64)  # 7 keys and values (the encoder)
    out, weights = cross(x, ctx, return_weights=True)
    assert out.shape == (2, 3, 8) and weights.shape == (2, 2, 3, 7)
    # written out for head 1 of the first sequence
    q = (x[0] @ cross.q_proj.weight.T + cross.q_proj.bias)[:, 4:]
    k = (ctx[0] @ cross.k_proj.weight.T + cross.k_proj.bias)[:, 4:]
    w = torch.softmax(q @ k.T / 2.0, dim=-1)
    assert close(weights[0, 1], w, atol=1e-12)
    # against PyTorch, with different query and key widths (kdim/vdim)
    expected, ref_weights = to_torch_mha(cross)(x, ctx, ctx, average_attn_weights=False)
    assert close(out, expected, atol=1e-12)
    assert close(weights, ref_weights, atol=1e-12)
    # a mask hides context positions 5 and 6 from every query
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[..., 5:] = False
    _, weights = cross(x, ctx, mask=keep, return_weights=True)
    assert torch.all(weights[..., 5:] == 0)


# ---- positions -----------------------------------------------------------------------------


def test_attention_without_positions_is_permutation_equivariant():
    torch.manual_seed(4)
    mha = MultiHeadAttention(8, 8, context_length=6, num_heads=2, causal=False).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    perm = torch.randperm(6)
    assert close(mha(x[:, perm]), mha(x)[:, perm], atol=1e-12)
    # with sinusoidal positions added, a shuffled sentence is no longer the same sentence
    pe = sinusoidal_positions(6, 8).double()
    assert not close(mha(x[:, perm] + pe), mha(x + pe)[:, perm], atol=1e-3)


def test_sinusoidal_positions_known_values():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16)
    assert torch.equal(pe[0, 0::2], torch.zeros(8)) and torch.equal(pe[0, 1::2], torch.ones(8))
    for pos in (1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)
    # each (sin, cos) pair has norm 1; the dot product depends only on the distance
    assert close(pe.norm(dim=1), torch.full((50,), math.sqrt(8)), atol=1e-5)
    assert math.isclose((pe[3] @ pe[8]).item(), (pe[20] @ pe[25]).item(), abs_tol=1e-5)


# ---- errors a learner can act on -----------------------------------------------------------


def test_d_out_not_divisible_by_num_heads():
    with pytest.raises(ValueError, match=r"d_out=10 is not divisible by num_heads=3"):
        MultiHeadAttention(8, 10, context_length=4, num_heads=3)
    with pytest.raises(ValueError, match=r"d_out=10 is not divisible by num_heads=4"):
        MultiHeadAttentionLoop(8, 10, context_length=4, num_heads=4)
    with pytest.raises(ValueError, match=r"d_out=6 is not divisible by num_heads=4"):
        CrossAttention(6, 6, 6, num_heads=4)


def test_sequence_longer_than_context_length():
    mha = MultiHeadAttention(4, 4, context_length=5, num_heads=2)
    with pytest.raises(ValueError, match=r"sequence length T=6 is longer than context_length=5"):
        mha(torch.randn(1, 6, 4))
    with pytest.raises(ValueError, match=r"T=9 is longer than context_length=5"):
        CausalAttention(4, 4, context_length=5)(torch.randn(2, 9, 4))


def test_mask_of_the_wrong_shape_or_dtype():
    mha = MultiHeadAttention(4, 4, context_length=5, num_heads=2)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"mask has shape \(5, 4\), which does not broadcast "
                                         r"to \(B, H, T_q, T_k\) = \(2, 2, 5, 5\)"):
        mha(x, mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 1, 5, 5\)"):
        mha(x, mask=torch.ones(3, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor .* got torch.float32"):
        mha(x, mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match=r"mask has shape \(1, 2, 1, 3, 7\)"):
        CrossAttention(4, 4, 4, num_heads=1)(torch.randn(2, 3, 4), torch.randn(2, 7, 4),
                                            mask=torch.ones(1, 2, 1, 3, 7, dtype=torch.bool))
    check_mask(torch.ones(2, 1, 1, 5, dtype=torch.bool), (2, 2, 5, 5))  # a padding mask is fine


def test_wrong_input_rank_and_width():
    mha = MultiHeadAttention(4, 4, context_length=5, num_heads=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, C\), got shape \(5, 4\)"):
        mha(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"x has 3 channels in its last dimension, expected 4"):
        mha(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(T, C\) or \(B, T, C\)"):
        simple_attention(torch.randn(6))
    with pytest.raises(ValueError, match=r"context must have shape \(B, T, C\)"):
        CrossAttention(4, 4, 4)(torch.randn(1, 2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x has batch size 1 but context has batch size 2"):
        CrossAttention(4, 4, 4)(torch.randn(1, 2, 4), torch.randn(2, 3, 4))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"d_model=5 must be even"):
        sinusoidal_positions(4, 5)
    with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
        CausalAttention(4, 4, context_length=4, dropout=1.0)
    with pytest.raises(ValueError, match=r"num_heads=0 must be a positive int"):
        MultiHeadAttention(4, 4, context_length=4, num_heads=0)
    with pytest.raises(ValueError, match=r"query width \(4\) to equal d_out=8"):
        to_torch_mha(MultiHeadAttention(4, 8, context_length=4, num_heads=2))
