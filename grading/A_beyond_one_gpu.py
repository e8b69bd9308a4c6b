"""Hidden tests for appendix A's exercises."""

from companion.grading import hidden


@hidden("my_rows")
def test_my_rows_one_row_each(my_rows):
    import torch
    from companion.grading import expect_same
    batch = torch.arange(40).view(8, 5)
    for rank in range(8):
        expect_same(my_rows(batch, rank, 8), batch[rank:rank + 1],
                    f"batch (8, 5), world_size 8, rank {rank}: one row, still of shape (1, 5)")
    one = torch.arange(7).view(1, 7)
    expect_same(my_rows(one, 0, 1), one, "batch (1, 7), world_size 1: the whole batch")


@hidden("my_rows")
def test_my_rows_consecutive_shares(my_rows):
    import torch
    from companion.grading import expect_same
    batch = torch.arange(30 * 3).view(30, 3)
    for world_size in (5, 6, 10, 15):
        b = 30 // world_size
        for rank in range(world_size):
            expect_same(my_rows(batch, rank, world_size), batch[rank * b:(rank + 1) * b],
                        f"batch (30, 3), world_size {world_size}, rank {rank}: rows {rank * b} to {(rank + 1) * b - 1}")


@hidden("my_rows")
def test_my_rows_other_dtypes_and_shapes(my_rows):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(21)
    batch = torch.randn(6, 4, 2, generator=gen, dtype=torch.float64)
    for rank in range(3):
        expect_same(my_rows(batch, rank, 3), batch[2 * rank:2 * rank + 2],
                    f"float64 batch (6, 4, 2), world_size 3, rank {rank}")
    ids = torch.randint(0, 50_000, (16, 1), generator=gen)
    for rank in range(4):
        expect_same(my_rows(ids, rank, 4), ids[4 * rank:4 * rank + 4],
                    f"token ids (16, 1), world_size 4, rank {rank}")
    together = torch.cat([my_rows(ids, rank, 4) for rank in range(4)])
    expect_same(together, ids, "token ids (16, 1): the 4 ranks' rows, in rank order, are the whole batch")


@hidden("ring_bytes_sent")
def test_ring_bytes_sent_one_process(ring_bytes_sent):
    from companion.grading import expect_same
    for n_bytes in (4, 1000, 4 * 10**6):
        expect_same(ring_bytes_sent(n_bytes, 1), 0.0, f"{n_bytes} bytes, world_size 1: nothing to send")


@hidden("ring_bytes_sent")
def test_ring_bytes_sent_uneven_sizes(ring_bytes_sent):
    from companion.grading import expect_same
    for n_bytes, world_size in [(1000, 3), (10, 4), (7, 7), (1, 2), (999, 8)]:
        expect_same(ring_bytes_sent(n_bytes, world_size), 2 * (world_size - 1) * n_bytes / world_size,
                    f"{n_bytes} bytes, world_size {world_size}: 2 (N - 1) / N of the tensor, no rounding")


@hidden("ring_bytes_sent")
def test_ring_bytes_sent_own_code(ring_bytes_sent):
    from companion.grading import expect_same
    # the chapter's simulation of the ring counts the bytes too: the exercise asks for the formula
    scope = getattr(ring_bytes_sent, "__globals__", {})
    originals = {k: scope[k] for k in ("ring_all_reduce", "counted_by_the_ring") if callable(scope.get(k))}
    if any(ring_bytes_sent is f for f in originals.values()):
        raise AssertionError("ring_bytes_sent is the chapter's simulation of the ring: this exercise asks for the formula")

    def tripwire(*args, **kwargs):
        raise AssertionError("ring_bytes_sent runs the chapter's simulation of the ring: "
                             "this exercise asks for the formula")

    try:
        for name in originals:
            scope[name] = tripwire
        got = [ring_bytes_sent(4 * 2400, n) for n in (2, 5, 8)]
    finally:
        scope.update(originals)
    expect_same(got, [9600.0, 15360.0, 16800.0], "9,600 bytes on 2, 5 and 8 processes, without simulating the ring")


@hidden("devices_needed")
def test_devices_needed_fits_on_one(devices_needed):
    from companion.grading import expect_same
    for n_params, device_gib in [(1, 1), (124_439_808, 80), (2**30 // 16, 1), (10**6, 0.25)]:
        expect_same(devices_needed(n_params, device_gib), 1,
                    f"{n_params:,} parameters on {device_gib} GiB devices: one device is enough")


@hidden("devices_needed")
def test_devices_needed_exact_boundaries(devices_needed):
    from companion.grading import expect_same
    gib = 2**30
    # 16 bytes per parameter: n_params = k * gib / 16 parameters take exactly k GiB
    for state_gib, device_gib, expected in [(320, 80, 4), (321, 80, 8), (160, 80, 2), (2, 1, 2), (3, 1, 4),
                                            (1024, 1, 1024), (1025, 1, 2048)]:
        n_params = state_gib * gib // 16
        expect_same(devices_needed(n_params, device_gib), expected,
                    f"{state_gib} GiB of training state on {device_gib} GiB devices: "
                    f"{expected} devices (a share of exactly {device_gib} GiB fits)")


@hidden("devices_needed")
def test_devices_needed_powers_of_two(devices_needed):
    from companion.grading import expect_same
    for n_params, device_gib in [(6_738_415_616, 80), (6_738_415_616, 24), (68_976_648_192, 80),
                                 (68_976_648_192, 40), (13_015_864_320, 0.5), (500 * 2**30 // 16, 80)]:
        n = 1
        while n_params * 16 > device_gib * 2**30 * n:  # in exact integers where device_gib is one
            n *= 2
        expect_same(devices_needed(n_params, device_gib), n,
                    f"{n_params:,} parameters on {device_gib} GiB devices: the smallest power of two that fits")
