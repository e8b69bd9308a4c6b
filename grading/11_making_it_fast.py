"""Hidden tests for chapter 11's exercises."""

from companion.grading import hidden


@hidden("bytes_per_token")
def test_bytes_per_token_grouped_query_shape(bytes_per_token):
    from companion.bench import ModelShape, decode_bytes_per_token
    from companion.grading import expect_same
    # 12 query heads sharing 3 key-value heads of 48 channels: head_dim is not hidden size / heads
    shape = ModelShape("toy GQA", n_params=5_000_000, matmul_weights=4_000_000, n_layers=6, n_heads=12,
                       n_kv_heads=3, head_dim=48)
    for context, bytes_per_value, batch_size in [(1, 4, 1), (300, 2, 1), (1000, 1, 5)]:
        expect_same(bytes_per_token(shape, context, bytes_per_value, batch_size),
                    decode_bytes_per_token(shape, context, bytes_per_value, batch_size),
                    f"n_layers=6, n_kv_heads=3 of 12 heads, head_dim=48, context={context}, "
                    f"bytes_per_value={bytes_per_value}, batch_size={batch_size}")


@hidden("bytes_per_token")
def test_bytes_per_token_batch_shares_only_weights(bytes_per_token):
    from companion.bench import ModelShape
    from companion.grading import expect_same
    shape = ModelShape("toy", n_params=1_100_000, matmul_weights=1_000_000, n_layers=2, n_heads=4,
                       n_kv_heads=4, head_dim=16)
    cache = 2 * 2 * 4 * 16 * 100 * 2  # keys and values of 100 positions, 2 bytes each: 25,600 bytes
    for batch_size in (1, 4, 1000):
        expect_same(bytes_per_token(shape, 100, 2, batch_size), 2_000_000 / batch_size + cache,
                    f"1,000,000 weights of 2 bytes, context 100, batch_size={batch_size}: "
                    "the weights are shared by the batch, each sequence's cache is not")


@hidden("bytes_per_token")
def test_bytes_per_token_int4_and_long_context(bytes_per_token):
    from companion.bench import ModelShape, decode_bytes_per_token
    from companion.grading import expect_same
    shape = ModelShape("7B-like", n_params=6_738_415_616, matmul_weights=6_607_077_376, n_layers=32, n_heads=32,
                       n_kv_heads=8, head_dim=128)
    for context, bytes_per_value, batch_size in [(32768, 0.5, 16), (1, 0.5, 1), (131072, 2, 64)]:
        expect_same(bytes_per_token(shape, context, bytes_per_value, batch_size),
                    decode_bytes_per_token(shape, context, bytes_per_value, batch_size),
                    f"7B-like shape with 8 kv heads, context={context}, bytes_per_value={bytes_per_value}, "
                    f"batch_size={batch_size}")


@hidden("bytes_per_token")
def test_bytes_per_token_own_code(bytes_per_token):
    import sys

    from companion.bench import ModelShape, decode_bytes_per_token
    from companion.grading import expect_same, forbidding
    shape = ModelShape("toy", n_params=900_000, matmul_weights=800_000, n_layers=3, n_heads=8, n_kv_heads=2,
                       head_dim=32)
    expected = decode_bytes_per_token(shape, 64, 2, 8)
    reached = []

    def watch(frame, event, arg):  # also sees the reference called under any alias
        if event == "call" and frame.f_code is decode_bytes_per_token.__code__:
            reached.append(event)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(bytes_per_token, "companion.bench.decode_bytes_per_token"):
            got = bytes_per_token(shape, 64, 2, 8)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError("bytes_per_token runs companion.bench.decode_bytes_per_token: "
                             "this exercise asks for your own code")
    expect_same(got, expected, "context 64, 2 bytes, batch 8, without companion.bench.decode_bytes_per_token")


@hidden("attainable_flops")
def test_attainable_flops_both_sides_of_the_ridge(attainable_flops):
    from companion.grading import expect_same
    peak, bandwidth = 2e14, 1e12  # ridge point at 200 FLOP/byte
    for intensity, expected in [(1e-3, 1e9), (0.25, 2.5e11), (199.0, 1.99e14), (200.0, 2e14), (201.0, 2e14),
                                (1e9, 2e14)]:
        expect_same(attainable_flops(intensity, peak, bandwidth), expected,
                    f"intensity {intensity:g} FLOP/byte, peak 2e14 FLOP/s, bandwidth 1e12 bytes/s")


@hidden("attainable_flops")
def test_attainable_flops_other_machines(attainable_flops):
    from companion.bench import Peak, roofline_seconds
    from companion.grading import expect_same
    for peak in [Peak("laptop CPU", 5e11, 5e10), Peak("slow memory", 1e12, 1e9), Peak("fast memory", 1e9, 1e12)]:
        for intensity in (0.001, 0.5, 1.0, 10.0, 500.0, 1000.0, 1e6):
            flops = 1e12
            expected = flops / roofline_seconds(flops, flops / intensity, peak)
            expect_same(attainable_flops(intensity, peak.flops, peak.bandwidth), expected,
                        f"intensity {intensity:g}, peak {peak.flops:g} FLOP/s, bandwidth {peak.bandwidth:g} bytes/s")


@hidden("attainable_flops")
def test_attainable_flops_own_code(attainable_flops):
    import sys

    from companion.bench import roofline_seconds
    from companion.grading import expect_same, forbidding
    reached = []

    def watch(frame, event, arg):  # also sees the reference called under any alias
        if event == "call" and frame.f_code is roofline_seconds.__code__:
            reached.append(event)

    before = sys.getprofile()
    sys.setprofile(watch)
    try:
        with forbidding(attainable_flops, "companion.bench.roofline_seconds"):
            low, high = attainable_flops(3.0, 1e12, 1e11), attainable_flops(30.0, 1e12, 1e11)
    finally:
        sys.setprofile(before)
    if reached:
        raise AssertionError("attainable_flops runs companion.bench.roofline_seconds: "
                             "this exercise asks for your own code")
    expect_same(low, 3e11, "intensity 3, peak 1e12, bandwidth 1e11, without companion.bench.roofline_seconds")
    expect_same(high, 1e12, "intensity 30, peak 1e12, bandwidth 1e11, without companion.bench.roofline_seconds")


@hidden("score_bytes")
def test_score_bytes_one_of_everything(score_bytes):
    from companion.grading import expect_same
    expect_same(score_bytes(1, 1, 1, 4), 4, "batch 1, 1 head, T=1, 4 bytes: one float32 score")
    expect_same(score_bytes(1, 1, 1, 2), 2, "batch 1, 1 head, T=1, 2 bytes: one bf16 score")
    expect_same(score_bytes(5, 1, 3, 1), 45, "batch 5, 1 head, T=3, 1 byte: 5 * 3 * 3 scores")


@hidden("score_bytes")
def test_score_bytes_long_contexts(score_bytes):
    import torch
    from companion.grading import expect_same
    for batch, heads, T, dtype in [(8, 32, 4096, torch.bfloat16), (1, 64, 131072, torch.float32),
                                   (16, 12, 1024, torch.float16), (2, 3, 7, torch.float64)]:
        bytes_per_value = torch.empty((), dtype=dtype).element_size()
        expected = torch.empty(batch, heads, T, T, dtype=dtype, device="meta").nbytes  # shapes only, no memory
        expect_same(score_bytes(batch, heads, T, bytes_per_value), expected,
                    f"batch {batch}, {heads} heads, T={T}, {bytes_per_value} bytes per value")
