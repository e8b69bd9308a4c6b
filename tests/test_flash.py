"""companion.flash: FlashAttention's tiled forward pass with the online softmax, and its
backward pass with recomputation.

Oracle: torch's scaled_dot_product_attention with an explicit boolean mask, built here
from the definition (query i at position i + T_k - T_q sees keys p - window < j <= p), and
keys/values repeated per query head for grouped-query attention; for the gradients, autograd
through it (repeat_interleave's backward sums a key/value head's gradient over its query
heads), and torch.autograd.gradcheck's finite differences. Which tiles are computed is
checked against a brute-force count, and by poisoning tiles with NaN.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from companion.flash import (TileCounts, _query_tiles, flash_attention, flash_attention_backward,
                             flash_attention_forward, tile_counts)
from companion.layers import attention, attention_mask

FAST = settings(max_examples=40, deadline=None)
LENGTHS = st.one_of(st.sampled_from([1, 15, 16, 17, 63, 64, 65, 100]), st.integers(1, 130))


def allowed_mask(T_q, T_k, causal=True, window=None):
    """(T_q, T_k) bool, True where query i may see key j, straight from the definition."""
    p = torch.arange(T_q)[:, None] + (T_k - T_q)  # absolute position of each query
    j = torch.arange(T_k)[None, :]
    allowed = torch.ones(T_q, T_k, dtype=torch.bool)
    if causal:
        allowed &= j <= p
    if window is not None:
        allowed &= j > p - window
    return allowed


def sdpa(q, k, v, causal=True, window=None, scale=None):
    G = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, T_k, D)
    mask = allowed_mask(q.size(2), k.size(2), causal, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def inputs(B, K, G, T_q, T_k, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, K * G, T_q, D, generator=g)
    k, v = torch.randn(B, K, T_k, D, generator=g), torch.randn(B, K, T_k, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def needed_tiles(T_q, T_k, block_q, block_k, causal, window):
    """Brute force: the (query tile, key tile) pairs with at least one allowed entry."""
    mask = allowed_mask(T_q, T_k, causal, window)
    return {(qt, kt)
            for qt in range(math.ceil(T_q / block_q)) for kt in range(math.ceil(T_k / block_k))
            if mask[qt * block_q:(qt + 1) * block_q, kt * block_k:(kt + 1) * block_k].any()}


@st.composite
def cases(draw):
    """Sizes and a mask: T_q <= T_k when causal (the queries are the last positions)."""
    causal = draw(st.booleans())
    T_k = draw(LENGTHS)
    T_q = draw(LENGTHS.filter(lambda t: t <= T_k)) if causal else draw(LENGTHS)
    window = draw(st.one_of(st.none(), st.integers(1, T_k))) if causal else None
    return dict(T_q=T_q, T_k=T_k, causal=causal, window=window,
                block_q=draw(st.sampled_from([16, 32, 64])), block_k=draw(st.sampled_from([16, 32, 64])))


def options(case):
    return {name: case[name] for name in ("causal", "window", "block_q", "block_k")}


# ---- the numbers ---------------------------------------------------------------------------


@FAST
@given(case=cases(), B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(1, 3),
       D=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 10**6))
def test_matches_sdpa(case, B, K, G, D, seed):
    q, k, v = inputs(B, K, G, case["T_q"], case["T_k"], D, seed)
    out = flash_attention(q, k, v, **options(case))
    assert out.shape == q.shape and out.dtype == torch.float32
    expected = sdpa(q, k, v, case["causal"], case["window"])
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


def test_grouped_heads_read_their_own_key_value_head():
    """Query heads 0-2 read key/value head 0, heads 3-5 head 1: swapping the kv heads swaps the outputs."""
    q, k, v = inputs(1, 2, 3, 40, 40, 16, seed=1)
    out = flash_attention(q, k, v, block_q=16, block_k=16)
    swapped = flash_attention(q[:, [3, 4, 5, 0, 1, 2]], k.flip(1), v.flip(1), block_q=16, block_k=16)
    assert torch.allclose(swapped, out[:, [3, 4, 5, 0, 1, 2]], atol=1e-6)
    assert not torch.allclose(out[:, :3], flash_attention(q, k.flip(1), v.flip(1))[:, :3], atol=1e-2)


@pytest.mark.parametrize("window", [None, 1, 16, 50])
@pytest.mark.parametrize("T_q", [1, 7, 64])
def test_decoding_queries_are_the_last_positions(T_q, window):
    """T_q < T_k: the same rows as attending with every query, then keeping the last T_q."""
    q, k, v = inputs(2, 2, 2, 100, 100, 32, seed=2)
    full = flash_attention(q, k, v, window=window, block_q=32, block_k=16)
    last = flash_attention(q[:, :, -T_q:], k, v, window=window, block_q=32, block_k=16)
    assert torch.allclose(last, full[:, :, -T_q:], atol=1e-6)
    assert torch.allclose(last, sdpa(q[:, :, -T_q:], k, v, True, window), atol=1e-5)


def test_window_counts_the_query_itself():
    """window=1: each query sees only its own key, so the output is its own value row."""
    q, k, v = inputs(1, 1, 1, 20, 20, 16, seed=3)
    assert torch.allclose(flash_attention(q, k, v, window=1, block_q=8, block_k=8), v, atol=1e-6)


def test_transposed_inputs_and_a_custom_scale():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 30, 4, 16, generator=g).transpose(1, 2)  # (B, H, T, D), not contiguous, as from a model
    k = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2)
    out = flash_attention(q, k, v, window=9, block_q=16, block_k=16, scale=0.3)
    assert torch.allclose(out, sdpa(q, k, v, True, 9, scale=0.3), atol=1e-5)
    assert not torch.allclose(out, sdpa(q, k, v, True, 9), atol=1e-3)  # the scale matters


def test_large_scores_do_not_overflow():
    """Scores of several thousand would overflow exp() without the running maximum."""
    q, k, v = large_score_inputs()
    check_large_scores(flash_attention(q, k, v, block_q=16, block_k=16), q, k, v)


def large_score_inputs():
    q, k, v = inputs(1, 1, 1, 70, 70, 16, seed=5)
    return q * 30, k * 30, v


def check_large_scores(out, q, k, v):
    """``out`` is finite and within what rounding the largest score to float32 moves the output:
    float32's relative step, 2**-23, times that score (3421 here: 4e-4). Scores this large are
    ill-conditioned, and two correct float32 computations that add in different orders differ
    by up to 1e-4, so float64 is the oracle."""
    assert torch.isfinite(out).all()
    tolerance = (q @ k.transpose(-1, -2) * q.size(-1) ** -0.5).abs().max().item() * 2**-23
    assert torch.allclose(out, sdpa(q.double(), k.double(), v.double()).float(), atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_half_precision_out_accumulated_in_float32(dtype):
    q, k, v = inputs(2, 2, 2, 90, 90, 64, seed=6)
    out = flash_attention(q.to(dtype), k.to(dtype), v.to(dtype), window=40, block_q=32, block_k=32)
    assert out.dtype == dtype
    # Accumulated in float32: exactly the float32 computation on the rounded inputs, rounded once at the end.
    upcast = flash_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), window=40,
                             block_q=32, block_k=32)
    assert torch.equal(out, upcast.to(dtype))
    assert torch.allclose(out.float(), sdpa(q, k, v, True, 40), atol=3e-2, rtol=0)


def test_float64_stays_float64():
    q, k, v = inputs(1, 1, 2, 50, 50, 16, seed=7, dtype=torch.float64)
    out = flash_attention(q, k, v, window=20, block_q=16, block_k=16)
    assert out.dtype == torch.float64
    assert torch.allclose(out, sdpa(q, k, v, True, 20), atol=1e-12)


# ---- which tiles are computed --------------------------------------------------------------


def test_causal_256_in_tiles_of_64_computes_10_of_16():
    assert tile_counts(256, 256, 64, 64) == TileCounts(computed=10, skipped=6)
    assert tile_counts(256, 256, 64, 64, causal=False) == TileCounts(computed=16, skipped=0)
    # One decoding step at position 4095 with a window of 128: keys 3968-4095, tiles 62 and 63.
    assert tile_counts(1, 4096, 64, 64, window=128) == TileCounts(computed=2, skipped=62)
    assert tile_counts(1, 4096, 64, 64, window=129) == TileCounts(computed=3, skipped=61)  # key 3967 too


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_tile_counts_match_a_brute_force_count(case):
    needed = needed_tiles(**case)
    total = math.ceil(case["T_q"] / case["block_q"]) * math.ceil(case["T_k"] / case["block_k"])
    assert tile_counts(**case) == TileCounts(len(needed), total - len(needed))


@FAST
@given(case=cases(), data=st.data())
def test_a_value_tile_is_read_exactly_by_the_query_tiles_that_need_it(case, data):
    """Poison one key tile's values with NaN: 0 * NaN = NaN, so any query tile that computes it
    turns to NaN, even where every entry is masked. Only the tiles that need it may."""
    T_q, T_k, block_q, block_k = case["T_q"], case["T_k"], case["block_q"], case["block_k"]
    q, k, v = inputs(1, 1, 2, T_q, T_k, 16, seed=8)
    kt = data.draw(st.integers(0, math.ceil(T_k / block_k) - 1), label="poisoned key tile")
    poisoned = v.clone()
    poisoned[:, :, kt * block_k:(kt + 1) * block_k] = float("nan")
    out = flash_attention(q, k, poisoned, **options(case))
    clean = flash_attention(q, k, v, **options(case))
    needed = needed_tiles(**case)
    for qt in range(math.ceil(T_q / block_q)):
        rows = out[:, :, qt * block_q:(qt + 1) * block_q]
        if (qt, kt) in needed:
            assert rows.isnan().all()
        else:
            assert torch.equal(rows, clean[:, :, qt * block_q:(qt + 1) * block_q])


def test_keys_no_query_can_see_may_hold_nan():
    """Decoding 64 queries over 256 keys with a window of 64: keys 0-128 are out of every window."""
    q, k, v = inputs(1, 2, 2, 64, 256, 32, seed=9)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, :, :128], bad_v[:, :, :128] = float("nan"), float("nan")  # key tiles 0 and 1: skipped
    out = flash_attention(q, bad_k, bad_v, window=64)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, sdpa(q, k, v, True, 64), atol=1e-5)
    # Key 128 is unseen too, but sits in tile 2, which is computed: the mask alone does not
    # keep NaN out (0 * NaN = NaN), so the finite output above is the skipping's doing.
    bad_v[:, :, 128] = float("nan")
    assert flash_attention(q, bad_k, bad_v, window=64).isnan().all()


def test_causal_rows_never_read_later_tiles():
    q, k, v = inputs(1, 1, 1, 256, 256, 32, seed=10)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, :, 192:], bad_v[:, :, 192:] = float("nan"), float("nan")  # the last key tile
    out = flash_attention(q, bad_k, bad_v)
    assert torch.allclose(out[:, :, :192], sdpa(q, k, v)[:, :, :192], atol=1e-5)
    assert out[:, :, 192:].isnan().all()  # the last query tile needs it, and reads it


# ---- the backward pass ---------------------------------------------------------------------


def grads(fn, q, k, v, dout):
    """(dq, dk, dv) of fn(q, k, v) for the upstream gradient dout, by autograd."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


# Largest |flash - sdpa| gradient entry, as a fraction of max(1, largest |sdpa| entry). Measured
# over 600 drawn cases: 7.9e-6 in float32 (a key gradient that is exactly 0 by cancellation, T_k = 1,
# D = 128, left as rounding residue by both), 5.6e-15 in float64.
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@FAST
@given(case=cases(), B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(1, 3),
       D=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 10**6))
@example(case=dict(T_q=1, T_k=1, causal=True, window=None, block_q=16, block_k=16), B=1, K=1, G=1, D=16, seed=0)
@example(case=dict(T_q=100, T_k=100, causal=True, window=37, block_q=32, block_k=16), B=2, K=2, G=3, D=128, seed=0)
@example(case=dict(T_q=65, T_k=17, causal=False, window=None, block_q=64, block_k=16), B=1, K=1, G=2, D=64, seed=0)
def test_gradients_match_autograd_through_sdpa(dtype, case, B, K, G, D, seed):
    q, k, v = inputs(B, K, G, case["T_q"], case["T_k"], D, seed, dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    mine = grads(lambda q, k, v: flash_attention(q, k, v, **options(case)), q, k, v, dout)
    expected = grads(lambda q, k, v: sdpa(q, k, v, case["causal"], case["window"]), q, k, v, dout)
    for name, got, want in zip(("dq", "dk", "dv"), mine, expected):
        assert got.shape == want.shape and got.dtype == dtype, name
        tol = GRAD_TOL[dtype] * max(1.0, want.abs().max().item())
        assert torch.allclose(got, want, atol=tol, rtol=0), (name, (got - want).abs().max())


@pytest.mark.parametrize("T_q, T_k, G, options", [
    (6, 6, 1, dict(block_q=4, block_k=4)),  # causal, a partial last tile
    (5, 7, 2, dict(window=3, block_q=2, block_k=3)),  # decoding queries, a window, grouped heads
    (7, 3, 3, dict(causal=False, block_q=3, block_k=2, scale=0.7)),  # more queries than keys
    (1, 1, 1, dict()),
])
def test_gradcheck_in_float64(T_q, T_k, G, options):
    """Finite differences, independent of any attention implementation."""
    q, k, v = (x.requires_grad_(True) for x in inputs(1, 2, G, T_q, T_k, 4, seed=12, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, **options), (q, k, v))


def test_gradients_with_transposed_inputs_and_a_custom_scale():
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 30, 4, 16, generator=g).transpose(1, 2)  # (B, H, T, D), not contiguous
    k = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2)
    dout = torch.randn(2, 30, 4, 16, generator=g).transpose(1, 2)  # the upstream gradient too
    mine = grads(lambda q, k, v: flash_attention(q, k, v, window=9, block_q=16, block_k=8, scale=0.3), q, k, v, dout)
    expected = grads(lambda q, k, v: sdpa(q, k, v, True, 9, scale=0.3), q, k, v, dout)
    for got, want in zip(mine, expected):
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_forward_returns_the_log_sum_exp_of_each_row():
    q, k, v = inputs(2, 2, 2, 40, 70, 32, seed=14)
    out, lse = flash_attention_forward(q, k, v, window=25, block_q=16, block_k=16)
    assert torch.equal(out, flash_attention(q, k, v, window=25, block_q=16, block_k=16))
    scores = q.reshape(2, 2, 2, 40, 32) @ k[:, :, None].transpose(-2, -1) / math.sqrt(32)  # (B, K, G, T, S)
    scores = scores.masked_fill(~allowed_mask(40, 70, True, 25), float("-inf")).reshape(2, 4, 40, 70)
    assert lse.shape == (2, 4, 40) and lse.dtype == torch.float32
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)


def saved_shapes(fn, *args):
    """The shapes of the tensors autograd keeps from fn(*args) for the backward pass."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args)
    return shapes


def test_backward_keeps_no_T_by_T_tensor():
    """It keeps q, k, v, the output and one log-sum-exp per row: 4 T D + T numbers per head,
    where autograd through the plain formula keeps the (T, T) probabilities."""
    T, D = 256, 16
    q, k, v = (x.requires_grad_(True) for x in inputs(1, 1, 2, T, T, D, seed=15))
    shapes = saved_shapes(flash_attention, q, k, v)
    assert sorted(shapes) == sorted([(1, 2, T, D), (1, 1, T, D), (1, 1, T, D), (1, 2, T, D), (1, 2, T)])
    assert sum(math.prod(shape) for shape in shapes) == 2 * (2 * T * D + T) + 2 * T * D
    # The check can fail: the book's explicit attention keeps (T, T) tensors for its backward.
    plain = saved_shapes(attention, q, k, v, attention_mask(torch.arange(T), torch.arange(T)))
    assert max(math.prod(shape) for shape in plain) >= 2 * T * T


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_backward_walks_the_tiles_the_forward_walks(case):
    """Key tile by key tile, the backward visits exactly the (query tile, key tile) pairs with an
    allowed entry: those the forward computes."""
    n_key_tiles = math.ceil(case["T_k"] / case["block_k"])
    visited = {(qt, kt) for kt in range(n_key_tiles) for qt in _query_tiles(kt, **case)}
    assert visited == needed_tiles(**case)


def test_backward_skips_tiles_no_query_can_see():
    """As in the forward test: keys 0-127 are out of every window and sit in skipped tiles, so NaN
    there stays out of every gradient, and their own gradients are exactly 0."""
    q, k, v = inputs(1, 2, 2, 64, 256, 32, seed=9)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(16))
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, :, :128], bad_v[:, :, :128] = float("nan"), float("nan")  # key tiles 0 and 1: skipped
    dq, dk, dv = grads(lambda q, k, v: flash_attention(q, k, v, window=64), q, bad_k, bad_v, dout)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert not dk[:, :, :128].any() and not dv[:, :, :128].any()
    expected = grads(lambda q, k, v: sdpa(q, k, v, True, 64), q, k, v, dout)
    for got, want in zip((dq, dk, dv), expected):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # Key 128 is unseen too but sits in tile 2, which is computed: dS = P * (dP - delta) with
    # P = 0 and dP = NaN is NaN, so the finite gradients above are the skipping's doing.
    bad_v[:, :, 128] = float("nan")
    dq, _, _ = grads(lambda q, k, v: flash_attention(q, k, v, window=64), q, bad_k, bad_v, dout)
    assert dq.isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(dtype):
    q, k, v = inputs(2, 2, 2, 90, 90, 64, seed=6)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(17))
    half = grads(lambda q, k, v: flash_attention(q, k, v, window=40, block_q=32, block_k=32),
                 q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype))
    expected = grads(lambda q, k, v: sdpa(q, k, v, True, 40), q, k, v, dout)
    for got, want in zip(half, expected):
        assert got.dtype == dtype
        # Measured: at most 0.33% (bf16) and 0.06% (fp16) of the largest entry; sdpa's own
        # half-precision gradients are off by up to 0.75% and 0.11%.
        assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max(), (got.float() - want).abs().max()


# ---- errors --------------------------------------------------------------------------------


def _qkv(q=(1, 4, 8, 16), k=(1, 2, 8, 16), v=None, dtype=torch.float32):
    return torch.zeros(q, dtype=dtype), torch.zeros(k, dtype=dtype), torch.zeros(v or k, dtype=dtype)


@pytest.mark.parametrize("args, kwargs, message", [
    (_qkv(q=(4, 8, 16)), {}, r"q has shape \(4, 8, 16\): expected 4 dimensions \(B, heads, T, D\)"),
    (_qkv(k=(1, 2, 1, 8, 16)), {}, r"k has shape \(1, 2, 1, 8, 16\): expected 4 dimensions"),
    ((torch.zeros(1, 4, 8, 16, dtype=torch.long),) + _qkv()[1:], {},
     r"q has dtype torch.int64: expected a floating-point dtype"),
    ((torch.zeros(1, 4, 8, 16, dtype=torch.float64),) + _qkv()[1:], {},
     r"q, k, v have dtypes torch.float64, torch.float32, torch.float32: expected one dtype"),
    (_qkv(v=(1, 2, 7, 16)), {}, r"k has shape \(1, 2, 8, 16\) and v \(1, 2, 7, 16\): expected the same shape"),
    (_qkv(k=(2, 2, 8, 16)), {}, r"q has batch size 1 and k 2: expected the same"),
    (_qkv(k=(1, 2, 8, 32)), {}, r"q has head dimension 16 and k 32: expected the same"),
    (_qkv(k=(1, 3, 8, 16)), {}, r"H=4 query heads cannot share K=3 key/value heads evenly: H % K must be 0"),
    (_qkv(k=(1, 0, 8, 16)), {}, r"H=4 query heads cannot share K=0 key/value heads evenly"),
    (_qkv(), {"block_q": 0}, r"block_q=0 must be an int >= 1"),
    (_qkv(), {"block_k": 16.0}, r"block_k=16.0 must be an int >= 1"),
    (_qkv(), {"window": 0}, r"window=0 must be an int >= 1 or None"),
    (_qkv(), {"window": 4, "causal": False}, r"window=4 needs causal=True"),
    (_qkv(q=(1, 4, 9, 16)), {}, r"T_q=9 > T_k=8 with causal=True: .* so T_q <= T_k"),
    (_qkv(k=(1, 2, 0, 16)), {"causal": False}, r"T_k=0: there must be at least one key"),
])
def test_bad_inputs_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(*args, **kwargs)


def test_non_causal_allows_more_queries_than_keys():
    q, k, v = inputs(1, 1, 1, 9, 8, 16, seed=11)
    assert torch.allclose(flash_attention(q, k, v, causal=False, block_q=4, block_k=4),
                          sdpa(q, k, v, causal=False), atol=1e-5)


def test_tile_counts_checks_its_arguments_too():
    with pytest.raises(ValueError, match=r"block_k=-1 must be an int >= 1"):
        tile_counts(8, 8, 4, -1)
    with pytest.raises(ValueError, match=r"T_q=9 > T_k=8 with causal=True"):
        tile_counts(9, 8)


@pytest.mark.parametrize("dout_shape, lse_shape, message", [
    ((1, 4, 8, 8), (1, 4, 8), r"dout has shape \(1, 4, 8, 8\): expected that of q, \(1, 4, 8, 16\)"),
    ((1, 4, 8, 16), (1, 4, 8, 1), r"lse has shape \(1, 4, 8, 1\): expected \(B, H, T_q\) = \(1, 4, 8\)"),
])
def test_backward_names_bad_shapes(dout_shape, lse_shape, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        flash_attention_backward(torch.zeros(dout_shape), q, k, v, torch.zeros(q.shape), torch.zeros(lse_shape))
