"""Hidden tests for chapter 11's exercises."""

from companion.grading import hidden


@hidden("merge_attention")
def test_merge_attention_by_hand(merge_attention):
    import math
    import torch
    from companion.grading import expect_same
    # One query, one key in each part, scores 0 and log 3: weights 1/4 and 3/4.
    o1, lse1 = torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])
    o2, lse2 = torch.tensor([[0.0, 4.0]]), torch.tensor([math.log(3.0)])
    got = merge_attention(o1, lse1, o2, lse2)
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                (torch.tensor([[0.25, 3.0]]), torch.tensor([math.log(4.0)])),
                "parts with log-sum-exps 0 and log 3: weights 1/4 and 3/4, log-sum-exp log 4")
    got = merge_attention(o2, lse2, o1, lse1)
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                (torch.tensor([[0.25, 3.0]]), torch.tensor([math.log(4.0)])), "the same two parts, swapped")


@hidden("merge_attention")
def test_merge_attention_empty_parts(merge_attention):
    import torch
    from companion.grading import expect_same
    inf = float("inf")
    o = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    lse = torch.tensor([0.5, 2000.0, -inf])
    zeros = torch.zeros(3, 2)
    none = torch.full((3,), -inf)
    got = merge_attention(o, lse, zeros, none)
    if isinstance(got, (tuple, list)) and isinstance(got[0], torch.Tensor) and got[0].isnan().any():
        raise AssertionError(f"a second part with no keys: the output has NaN: {got[0].tolist()}")
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, (o, lse),
                "a second part with no keys at all (-inf, zeros): the first part as it is, row 2 still empty")
    got = merge_attention(zeros, none, zeros, none)
    if isinstance(got, (tuple, list)) and isinstance(got[0], torch.Tensor) and got[0].isnan().any():
        raise AssertionError("two parts with no keys: the output has NaN; expected zeros")
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, (zeros, none),
                "two parts with no keys: zeros and -inf")


@hidden("merge_attention")
def test_merge_attention_large_scores_and_float64(merge_attention):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(106)
    for dtype, scale, case in [(torch.float32, 1000.0, "float32 scores of thousands"),
                               (torch.float64, 1.0, "float64"), (torch.float64, 5000.0, "float64 scores of thousands")]:
        q = torch.randn(2, 3, 5, 4, generator=gen, dtype=dtype) * scale
        k, v = torch.randn(2, 3, 9, 4, generator=gen, dtype=dtype), torch.randn(2, 3, 9, 4, generator=gen, dtype=dtype)
        s = q @ k.transpose(-1, -2)
        full = (torch.softmax(s, -1) @ v, torch.logsumexp(s, -1))
        a, b = s[..., :4], s[..., 4:]
        got = merge_attention(torch.softmax(a, -1) @ v[..., :4, :], torch.logsumexp(a, -1),
                              torch.softmax(b, -1) @ v[..., 4:, :], torch.logsumexp(b, -1))
        if isinstance(got, (tuple, list)) and isinstance(got[0], torch.Tensor) and not torch.isfinite(got[0]).all():
            raise AssertionError(f"{case}: the output has inf or NaN")
        expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, full,
                    f"{case}, shape (2, 3, 5, 4) split into 4 + 5 keys", atol=1e-4, rtol=1e-5)


@hidden("merge_attention")
def test_merge_attention_three_parts(merge_attention):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(107)
    s, v = torch.randn(4, 12, generator=gen) * 3, torch.randn(12, 6, generator=gen)

    def part(lo, hi):
        return torch.softmax(s[:, lo:hi], -1) @ v[lo:hi], torch.logsumexp(s[:, lo:hi], -1)

    left = merge_attention(*part(0, 3), *part(3, 7))
    got = merge_attention(*left, *part(7, 12))
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, part(0, 12),
                "three parts of 3, 4 and 5 keys, merged two at a time")


@hidden("compute_bound_batch")
def test_compute_bound_batch_by_hand(compute_bound_batch):
    from companion.bench import ModelShape, Peak
    from companion.grading import expect_same
    toy = ModelShape("toy", n_params=1000, matmul_weights=1000, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1)
    # flops per sequence 2000 + 4 c, weights 1000 b bytes, cache 2 c b bytes per sequence (c: context, b: bytes)
    cases = [
        ((toy, 125, 2, Peak("toy", 4.0, 1.0)), 16, "balance 4: intensity exactly 4 at batch 16 (counts)"),
        ((toy, 124, 2, Peak("toy", 4.0, 1.0)), 16, "balance 4, context 124: 15.9 rounds up to 16"),
        ((toy, 1, 1, Peak("toy", 2.0, 1.0)), 1, "balance 2: batch 1 reaches 2004 / 1002 = 2"),
        ((toy, 500, 1, Peak("toy", 4.0, 1.0)), None, "balance 4, context 500: the limit 4000 / 1000 is exactly 4, "
                                                      "never reached"),
        ((toy, 1000, 1, Peak("toy", 4.0, 1.0)), None, "balance 4, context 1000: the limit is 3"),
    ]
    for args, expected, case in cases:
        expect_same(compute_bound_batch(*args), expected, case)


@hidden("compute_bound_batch")
def test_compute_bound_batch_far_away(compute_bound_batch):
    from companion.bench import ModelShape, Peak
    from companion.grading import expect_same
    big = ModelShape("big", n_params=10**9, matmul_weights=10**9, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1)
    # flops 2e9 + 4c, cache 2c per sequence: at balance 10 the margin is 2e9 - 16c = 16 bytes' worth
    expect_same(compute_bound_batch(big, 124_999_999, 1, Peak("toy", 10.0, 1.0)), 625_000_000,
                "a margin so thin that the first compute-bound batch is 625,000,000")


@hidden("compute_bound_batch")
def test_compute_bound_batch_published_models(compute_bound_batch):
    from companion.bench import H100_SXM, ModelShape, Peak, decode_bytes_per_token, forward_flops_per_token
    from companion.grading import expect_same
    from companion.llama import LlamaConfig
    from companion.mistral import MistralConfig
    for config, context, nbytes, peak in [(LlamaConfig.preset("llama-2-7b"), 64, 2, H100_SXM),
                                          (MistralConfig.preset("mistral-7b-v0.1"), 256, 2, H100_SXM),
                                          (MistralConfig.preset("mistral-7b-v0.1"), 512, 1, Peak("A100", 312e12, 2.0e12)),
                                          (LlamaConfig.preset("llama-2-7b"), 4096, 2, H100_SXM)]:
        shape = ModelShape.of(config)
        expected = None
        for batch in range(1, 20_001):
            intensity = batch * forward_flops_per_token(shape, context) / (
                batch * decode_bytes_per_token(shape, context, nbytes, batch))
            if intensity >= peak.balance:
                expected = batch
                break
        expect_same(compute_bound_batch(shape, context, nbytes, peak), expected,
                    f"{shape.name}, context {context}, {nbytes} bytes per value, {peak.name}")


@hidden("tiles_computed")
def test_tiles_computed_against_the_mask(tiles_computed):
    import math
    import torch
    from companion.grading import expect_same
    from companion.layers import attention_mask
    for T_q, T_k, bq, bk, window in [(7, 7, 2, 3, None), (7, 7, 2, 3, 2), (5, 20, 4, 4, None), (5, 20, 4, 4, 6),
                                      (1, 33, 8, 8, 9), (33, 33, 8, 8, 1), (16, 16, 32, 32, None), (9, 40, 3, 7, 100),
                                      (64, 64, 16, 16, 16), (20, 21, 5, 1, 3)]:
        allowed = attention_mask(torch.arange(T_k - T_q, T_k), torch.arange(T_k), window)
        count = sum(bool(allowed[i:i + bq, j:j + bk].any()) for i in range(0, T_q, bq) for j in range(0, T_k, bk))
        expect_same(tiles_computed(T_q, T_k, bq, bk, window), count,
                    f"T_q={T_q}, T_k={T_k}, tiles {bq} x {bk}, window {window} "
                    f"(of {math.ceil(T_q / bq) * math.ceil(T_k / bk)} tiles)")


@hidden("tiles_computed")
def test_tiles_computed_long_contexts(tiles_computed):
    from companion.grading import expect_same
    cases = [
        ((32768, 32768, 128, 128, None), 256 * 257 // 2, "causal, 32768 positions in tiles of 128: the lower half"),
        ((32768, 32768, 128, 128, 4096), 32 * 33 // 2 + 224 * 33,
         "Mistral's window of 4096: each query tile reaches 32 key tiles back, fewer near the start"),
        ((1, 131072, 64, 64, None), 2048, "one query against 131072 keys: every key tile"),
        ((1, 131072, 64, 64, 4096), 64, "one query, window 4096: 64 key tiles"),
        ((1, 131072, 64, 64, 4100), 65, "one query, window 4100, which starts inside a tile: 65 key tiles"),
    ]
    for args, expected, case in cases:
        expect_same(tiles_computed(*args), expected, case)


@hidden("tiles_computed")
def test_tiles_computed_own_code(tiles_computed):
    from companion.grading import expect_same, forbidding
    with forbidding(tiles_computed, "companion.flash.tile_counts", "companion.flash._key_tiles",
                    "companion.flash._query_tiles"):
        got = tiles_computed(300, 300, 64, 64, None)
    expect_same(got, 15, "300 positions in tiles of 64, causal, without companion.flash.tile_counts")
