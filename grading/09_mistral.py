"""Hidden tests for chapter 9's exercises (Mistral)."""

from companion.grading import hidden


@hidden("kv_head")
def test_kv_head_every_head_of_grouped_configs(kv_head):
    from companion.grading import expect_same
    # (n_heads, n_kv_heads): group sizes that differ from the number of key/value heads.
    for H, K in [(8, 2), (6, 3), (12, 4), (32, 8), (10, 5), (16, 2)]:
        owner = [k for k in range(K) for _ in range(H // K)]  # consecutive query heads share
        for h in range(H):
            expect_same(kv_head(h, H, K), owner[h], f"query head {h} of {H}, {K} key/value heads")


@hidden("kv_head")
def test_kv_head_multi_query_and_multi_head(kv_head):
    from companion.grading import expect_same
    for h in range(7):
        expect_same(kv_head(h, 7, 1), 0, f"query head {h} of 7, one key/value head (multi-query)")
        expect_same(kv_head(h, 7, 7), h, f"query head {h} of 7, 7 key/value heads (multi-head)")
    expect_same(kv_head(0, 1, 1), 0, "a single head")


@hidden("kv_head")
def test_kv_head_own_code(kv_head):
    from companion.grading import expect_same, forbidding
    with forbidding(kv_head, "companion.layers.kv_head_of"):
        got = [kv_head(h, 12, 3) for h in range(12)]
    expect_same(got, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], "12 query heads, 3 key/value heads, without kv_head_of")


@hidden("sliding_window_mask")
def test_sliding_window_mask_edges(sliding_window_mask):
    import torch
    from companion.grading import expect_same
    cases = [(1, 1, "T = 1, W = 1"), (1, 5, "T = 1, window larger than the sequence"),
             (7, 1, "W = 1: each query sees only itself"), (6, 6, "W = T: plain causal"),
             (6, 5, "W = T - 1: only the first key drops out of the last row"),
             (3, 100, "window much larger than the sequence")]
    for T, W, case in cases:
        expected = torch.tensor([[i - W < j <= i for j in range(T)] for i in range(T)], dtype=torch.bool)
        expect_same(sliding_window_mask(T, W), expected, f"T={T}, W={W} ({case})")


@hidden("sliding_window_mask")
def test_sliding_window_mask_long(sliding_window_mask):
    import torch
    from companion.grading import expect_same
    for T, W in [(40, 7), (33, 16), (64, 2)]:
        expected = torch.tensor([[i - W < j <= i for j in range(T)] for i in range(T)], dtype=torch.bool)
        got = sliding_window_mask(T, W)
        expect_same(got, expected, f"T={T}, W={W}")
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            keys = got.sum(-1).tolist()
            want = [min(i + 1, W) for i in range(T)]
            if keys != want:
                raise AssertionError(f"T={T}, W={W}: keys per query {keys}, expected {want}")


@hidden("sliding_window_mask")
def test_sliding_window_mask_own_code(sliding_window_mask):
    import torch
    from companion.grading import expect_same, forbidding
    T, W = 8, 3
    expected = torch.tensor([[i - W < j <= i for j in range(T)] for i in range(T)], dtype=torch.bool)
    with forbidding(sliding_window_mask, "companion.layers.attention_mask"):
        got = sliding_window_mask(T, W)
    expect_same(got, expected, "T=8, W=3, without companion.layers.attention_mask")


@hidden("buffer_positions")
def test_buffer_positions_small_buffers(buffer_positions):
    from companion.grading import expect_same
    for n, W in [(0, 1), (1, 1), (5, 1), (1, 5), (4, 5), (5, 5), (6, 5), (10, 5), (17, 5), (3, 2)]:
        slots = [-1] * W
        for p in range(n):  # write every position in turn, slot p % W
            slots[p % W] = p
        expect_same(buffer_positions(n, W), slots, f"n={n}, W={W}")


@hidden("buffer_positions")
def test_buffer_positions_long_sequences(buffer_positions):
    from companion.grading import expect_same
    # After n >= W writes the slots hold the last W positions, position p in slot p % W.
    for n, W in [(1000, 7), (8192, 4096), (12345, 10)]:
        expected = [0] * W
        for p in range(n - W, n):
            expected[p % W] = p
        expect_same(buffer_positions(n, W), expected, f"n={n}, W={W}")


@hidden("buffer_positions")
def test_buffer_positions_own_code(buffer_positions):
    from companion.grading import expect_same, forbidding
    with forbidding(buffer_positions, "companion.layers.RollingKVCache.update", "companion.layers.RollingKVCache"):
        got = buffer_positions(9, 4)
    expect_same(got, [8, 5, 6, 7], "n=9, W=4, without companion.layers.RollingKVCache")


@hidden("receptive_field")
def test_receptive_field_against_reachability(receptive_field):
    from companion.grading import expect_same
    for L, W, T in [(1, 1, 5), (3, 1, 5), (2, 5, 1), (1, 5, 3), (3, 4, 9), (3, 4, 10), (3, 4, 11),
                    (4, 2, 30), (2, 8, 12), (6, 3, 40)]:
        reach = {T - 1}  # input positions that can influence the last position, layer by layer
        for _ in range(L):
            reach = {j for p in reach for j in range(max(0, p - W + 1), p + 1)}
        expect_same(receptive_field(L, W, T), len(reach), f"n_layers={L}, W={W}, T={T}")


@hidden("receptive_field")
def test_receptive_field_mistral_sizes(receptive_field):
    from companion.grading import expect_same
    # Mistral 7B: 32 layers, window 4096. 32 * 4095 + 1 = 131,041.
    expect_same(receptive_field(32, 4096, 200_000), 131_041, "32 layers, W=4096, T=200000")
    expect_same(receptive_field(32, 4096, 100_000), 100_000, "32 layers, W=4096, T=100000 (all positions)")
    expect_same(receptive_field(32, 4096, 131_041), 131_041, "32 layers, W=4096, T=131041 (exactly reached)")
    expect_same(receptive_field(1, 4096, 4096), 4096, "1 layer, W=4096, T=4096")
