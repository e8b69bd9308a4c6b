"""Hidden tests for chapter 9's exercises (Mistral)."""

from companion.grading import hidden


@hidden("grouped_attention")
def test_grouped_attention_against_repeated_heads(grouped_attention):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    from companion.layers import attention_mask
    gen = torch.Generator().manual_seed(95)
    for B, H, K, T, S, D in [(1, 8, 2, 7, 7, 16), (2, 12, 3, 4, 10, 8), (1, 5, 1, 6, 6, 4), (3, 4, 4, 2, 2, 8),
                             (1, 32, 8, 1, 40, 16), (2, 6, 2, 1, 1, 8)]:
        q = torch.randn(B, H, T, D, generator=gen)
        k, v = torch.randn(B, K, S, D, generator=gen), torch.randn(B, K, S, D, generator=gen)
        mask = attention_mask(torch.arange(S - T, S), torch.arange(S))
        expected = F.scaled_dot_product_attention(q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1),
                                                  attn_mask=mask)
        expect_same(grouped_attention(q, k, v), expected,
                    f"B={B}, H={H} query heads, K={K} key/value heads, T={T} queries, S={S} keys, D={D}")


@hidden("grouped_attention")
def test_grouped_attention_heads_read_their_group(grouped_attention):
    import torch
    from companion.grading import expect_same
    # One key per head, T = S = 1: each query head's output is the value of the head it reads.
    H, K = 6, 3
    q = torch.zeros(1, H, 1, 2)
    k = torch.zeros(1, K, 1, 2)
    v = torch.arange(float(K)).view(1, K, 1, 1).expand(1, K, 1, 2).contiguous()  # head j's value is (j, j)
    expected = torch.tensor([0.0, 0, 1, 1, 2, 2]).view(1, H, 1, 1).expand(1, H, 1, 2)
    expect_same(grouped_attention(q, k, v), expected,
                "6 query heads, 3 key/value heads whose values are 0, 1, 2: heads 0-1 read 0, 2-3 read 1, 4-5 read 2")
    # A causal check that only positions can pass: the first query sees only key 0.
    q = torch.zeros(1, 4, 3, 2)
    k = torch.zeros(1, 2, 3, 2)
    v = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1).expand(1, 2, 3, 2).contiguous()
    expected = torch.tensor([1.0, 11 / 2, 111 / 3]).view(1, 1, 3, 1).expand(1, 4, 3, 2)
    expect_same(grouped_attention(q, k, v), expected,
                "equal scores, values 1, 10, 100 at positions 0, 1, 2, groups of 2: query t averages keys 0..t")


@hidden("grouped_attention")
def test_grouped_attention_float64(grouped_attention):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(96)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    expect_same(grouped_attention(q, k, v), expected, "float64 q, k, v (the output stays float64)", atol=1e-10)


@hidden("grouped_attention")
def test_grouped_attention_copies_no_keys(grouped_attention):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same, forbidding
    gen = torch.Generator().manual_seed(97)
    q = torch.randn(1, 4, 3, 8, generator=gen)
    k, v = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    with forbidding(grouped_attention, "torch.repeat_interleave", "torch.Tensor.repeat_interleave",
                    "torch.Tensor.repeat", "torch.nn.functional.scaled_dot_product_attention",
                    "companion.layers.attention", "companion.layers.sdpa_attention"):
        got = grouped_attention(q, k, v)
    expect_same(got, expected, "4 query heads, 2 key/value heads, without repeating them or companion's attention")


@hidden("window_mask")
def test_window_mask_rolling_buffer_slots(window_mask):
    import torch
    from companion.grading import expect_same
    cases = [
        ([12], [8, 9, 10, 11, 12], 5, [[True, True, True, True, True]], "window 5, query 12, keys 8..12"),
        ([12], [12, 9, 10, 11], 4, [[True, True, True, True]], "a wrapped buffer of 4: slots hold 12, 9, 10, 11"),
        ([3], [0, 1, 2, 3, -1, -1], 8, [[True, True, True, True, False, False]], "two empty slots (-1)"),
        ([0], [-1, -1, 0], 2, [[False, False, True]], "the first token, with two empty slots"),
        ([7], [3, 4, 5, 6, 7], 3, [[False, False, True, True, True]], "window 3: keys 3 and 4 are too old"),
    ]
    for q, k, window, expected, case in cases:
        expect_same(window_mask(torch.tensor(q), torch.tensor(k), window), torch.tensor(expected), case)


@hidden("window_mask")
def test_window_mask_against_pairs(window_mask):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(98)
    for T, S, window in [(6, 6, 1), (5, 9, 3), (4, 4, 100), (3, 12, None), (1, 1, 1), (8, 8, 8)]:
        q = torch.randint(0, 10, (T,), generator=gen)
        k = torch.randint(-1, 10, (S,), generator=gen)
        expected = torch.tensor([[bool(0 <= kj <= qi and (window is None or qi - kj < window)) for kj in k.tolist()]
                                 for qi in q.tolist()], dtype=torch.bool)
        expect_same(window_mask(q, k, window), expected,
                    f"{T} queries at {q.tolist()}, {S} keys at {k.tolist()}, window {window}")


@hidden("window_mask")
def test_window_mask_own_code(window_mask):
    import torch
    from companion.grading import expect_same, forbidding
    with forbidding(window_mask, "companion.layers.attention_mask", "companion.layers.positions_and_mask"):
        got = window_mask(torch.tensor([5, 6]), torch.tensor([4, 5, 2, 3, 5, 6]), 3)
    expected = torch.tensor([[True, True, False, True, True, False], [True, True, False, False, True, True]])
    expect_same(got, expected, "a chunk at 5, 6 over slots [4, 5, 2, 3] and itself, window 3, "
                               "without companion.layers.attention_mask")


@hidden("buffer_in_order")
def test_buffer_in_order_wrapped_and_partial(buffer_in_order):
    import torch
    from companion.grading import expect_same
    cases = [
        ([8, 9, 6, 7], [2, 3, 0, 1], "a wrapped buffer of 4 holding 8, 9, 6, 7"),
        ([0, 1, 2, -1, -1], [0, 1, 2], "3 of 5 slots written"),
        ([4, 5, 6], [0, 1, 2], "a full buffer that has wrapped exactly once"),
        ([13], [0], "one slot"),
        ([10, 11, 12, 7, 8, 9], [3, 4, 5, 0, 1, 2], "a buffer of 6 wrapped halfway"),
    ]
    for slot_pos, slots, case in cases:
        W = len(slot_pos)
        k = torch.arange(2 * 3 * W * 2, dtype=torch.float).view(2, 3, W, 2)
        positions = torch.tensor(slot_pos)
        got = buffer_in_order(k, positions)
        expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                    (k[:, :, slots], torch.tensor(sorted(p for p in slot_pos if p >= 0))), case)


@hidden("buffer_in_order")
def test_buffer_in_order_empty_and_dtype(buffer_in_order):
    import torch
    from companion.grading import expect_same
    k = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    got = buffer_in_order(k, torch.full((4,), -1))
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                (torch.zeros(1, 2, 0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long)),
                "an empty buffer: keys of shape (1, 2, 0, 3) and no positions")
    got = buffer_in_order(k, torch.tensor([5, 2, 3, 4]))
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                (k[:, :, [1, 2, 3, 0]], torch.tensor([2, 3, 4, 5])), "float64 keys of a wrapped buffer")


@hidden("buffer_in_order")
def test_buffer_in_order_feeds_attention(buffer_in_order):
    import torch
    from companion.grading import expect_same
    from companion.layers import RollingKVCache
    gen = torch.Generator().manual_seed(99)
    keys = torch.randn(1, 2, 23, 4, generator=gen)
    cache = RollingKVCache(1, 2, window=8, head_dim=4)
    for p in range(23):
        cache.update(keys[:, :, p:p + 1], keys[:, :, p:p + 1], torch.tensor([p]))
    got = buffer_in_order(cache.k, cache.slot_pos)
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, (keys[:, :, 15:], torch.arange(15, 23)),
                "a rolling cache of 8 after 23 positions: the keys of positions 15..22, in order")


@hidden("receptive_field")
def test_receptive_field_against_reachability(receptive_field):
    from companion.grading import expect_same
    cases = [([], 5), ([1, 1, 1], 5), ([3], 1), ([2, None], 9), ([None], 4), ([4, 4, 4], 9), ([4, 4, 4], 10),
             ([4, 4, 4], 11), ([2, 3, 4, 5], 30), ([7, None, 2], 50), ([100, 2], 12), ([8], 8)]
    for windows, T in cases:
        reach = {T - 1}  # input positions that can influence the last position, layer by layer
        for window in windows:
            low = (lambda p: 0) if window is None else (lambda p, w=window: max(0, p - w + 1))
            reach = {j for p in reach for j in range(low(p), p + 1)}
        expect_same(receptive_field(windows, T), len(reach), f"windows {windows}, T={T}")


@hidden("receptive_field")
def test_receptive_field_published_shapes(receptive_field):
    from companion.grading import expect_same
    expect_same(receptive_field([4096] * 32, 200_000), 131_041, "Mistral 7B: 32 layers of 4096, T=200000")
    expect_same(receptive_field([4096] * 32, 100_000), 100_000, "Mistral 7B: 32 layers of 4096, T=100000")
    expect_same(receptive_field([4096, None] * 21, 8192), 8192,
                "alternating windows of 4096 and full attention, T=8192: everything")
    expect_same(receptive_field([4096, 4096], 10_000), 8191, "two layers of 4096, T=10000")
    expect_same(receptive_field([1] * 100, 10), 1, "100 layers with a window of 1: only itself")
