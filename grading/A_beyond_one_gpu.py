"""Hidden tests for appendix A's exercises."""

from companion.grading import hidden


@hidden("combine_gradients")
def test_combine_gradients_by_hand(combine_gradients):
    import torch
    from companion.grading import expect_same
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -1.0])
    cases = [
        (([a, b], [2, 2]), torch.tensor([2.5, 0.5]), "equal shares of 2 rows: the plain mean"),
        (([a, b], [3, 1]), torch.tensor([7.0 / 4, 5.0 / 4]), "shares of 3 and 1 rows: weights 3/4 and 1/4"),
        (([a], [5]), a, "one process: its own gradient"),
        (([a, torch.full((2,), float("nan")), b], [1, 0, 3]), torch.tensor([13.0 / 4, -1.0 / 4]),
         "a process with no rows reports NaN: it is left out, not multiplied by 0"),
    ]
    for args, expected, case in cases:
        got = combine_gradients(*args)
        if isinstance(got, torch.Tensor) and got.isnan().any():
            raise AssertionError(f"{case}: the result has NaN: {got.tolist()}")
        expect_same(got, expected, case)


@hidden("combine_gradients")
def test_combine_gradients_equals_the_whole_batch(combine_gradients):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(116)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (11,), generator=gen)

    def grad(rows):  # the mean's gradient as a process computes it: the sum's, over the count (NaN for none)
        w.grad = None
        F.cross_entropy(x[rows] @ w.T, y[rows], reduction="sum").backward()
        return w.grad / len(y[rows])

    whole = grad(slice(0, 11))
    for counts in ([5, 6], [1, 10], [0, 11, 0], [3, 3, 3, 2], [11]):
        starts = [sum(counts[:i]) for i in range(len(counts))]
        grads = [grad(slice(s, s + n)) for s, n in zip(starts, counts)]
        expect_same(combine_gradients(grads, counts), whole,
                    f"float64 gradients of 11 rows in shares {counts}: the whole batch's", atol=1e-12)


@hidden("combine_gradients")
def test_combine_gradients_no_rows_and_dtype(combine_gradients):
    import torch
    from companion.grading import expect_same
    nan = torch.full((3,), float("nan"))
    try:
        combine_gradients([nan, nan], [0, 0])
    except ValueError as err:
        if "counts" not in str(err):
            raise AssertionError(f"no rows at all: the ValueError should name counts, it says: {err}") from None
    except NotImplementedError:
        raise
    except Exception as err:
        raise AssertionError(f"no rows at all: expected a ValueError, got {type(err).__name__}: {err}") from None
    else:
        raise AssertionError("counts [0, 0], no rows at all: expected a ValueError")
    g = [torch.ones(2, 2, dtype=torch.float64), 3 * torch.ones(2, 2, dtype=torch.float64)]
    expect_same(combine_gradients(g, [1, 1]), 2 * torch.ones(2, 2, dtype=torch.float64),
                "float64 gradients (2, 2): the result stays float64")
    before = [t.clone() for t in g]
    combine_gradients(g, [2, 5])
    expect_same(g, before, "the gradients passed in must not be changed in place")


@hidden("ring_all_reduce_any")
def test_ring_all_reduce_any_uneven_sizes(ring_all_reduce_any):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(117)
    for numel, n, sent, case in [(10, 4, [15, 16, 15, 14], "10 values on 4 processes: chunks of 3, 3, 2, 2"),
                                 (3, 5, [4, 5, 6, 5, 4], "3 values on 5 processes: two chunks are empty"),
                                 (7, 2, [7, 7], "7 values on 2 processes: chunks of 4 and 3"),
                                 (1, 3, [2, 1, 1], "one value on 3 processes")]:
        tensors = [torch.randn(numel, generator=gen) for _ in range(n)]
        total = torch.stack(tensors).sum(0)
        got = ring_all_reduce_any(tensors)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise AssertionError(f"{case}: expected a tuple (sums, sent)")
        expect_same(list(got[0]), [total] * n, f"{case}: every process holds the sum")
        expect_same(list(got[1]), sent, f"{case}: values sent by each process")


@hidden("ring_all_reduce_any")
def test_ring_all_reduce_any_empty_single_and_shapes(ring_all_reduce_any):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(118)
    got = ring_all_reduce_any([torch.zeros(0), torch.zeros(0)])
    expect_same(list(got[0]), [torch.zeros(0)] * 2, "empty tensors on 2 processes: empty sums")
    expect_same(list(got[1]), [0, 0], "empty tensors on 2 processes: nothing sent")
    alone = torch.randn(2, 3, generator=gen)
    got = ring_all_reduce_any([alone])
    expect_same((list(got[0]), list(got[1])), ([alone], [0]), "one process: its own tensor, nothing sent")
    tensors = [torch.randint(-5, 5, (3, 4), generator=gen) for _ in range(3)]
    kept = [t.clone() for t in tensors]
    got = ring_all_reduce_any(tensors)
    expect_same(list(got[0]), [torch.stack(kept).sum(0)] * 3, "int64 tensors (3, 4) on 3 processes: the shape stays")
    expect_same(list(got[1]), [16, 16, 16], "12 values on 3 processes: 2 x 2 chunks of 4 each")
    expect_same(tensors, kept, "the input tensors must not be changed")


@hidden("ring_all_reduce_any")
def test_ring_all_reduce_any_float64_many(ring_all_reduce_any):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(119)
    tensors = [torch.randn(1001, generator=gen, dtype=torch.float64) for _ in range(8)]
    got = ring_all_reduce_any(tensors)
    expect_same(list(got[0]), [torch.stack(tensors).sum(0)] * 8, "float64, 1001 values on 8 processes", atol=1e-12)
    if sum(got[1]) != 2 * 7 * 1001:
        raise AssertionError(f"1001 values on 8 processes: the processes sent {sum(got[1])} values in all, "
                             f"expected 2 x 7 x 1001 = {2 * 7 * 1001}")


@hidden("zero_gib_per_device")
def test_zero_gib_per_device_stages(zero_gib_per_device):
    from companion.grading import expect_same
    gib = 2**30
    n = 8 * gib  # 8 Gi parameters on 8 devices: shares of exactly 1 Gi
    for stage, per_param, case in [(0, 16, "stage 0, DDP: 16 bytes each"), (1, 4 + 12 / 8, "stage 1: 4 + 12 / 8"),
                                   (2, 2 + 14 / 8, "stage 2: 2 + 14 / 8"), (3, 16 / 8, "stage 3: 16 / 8")]:
        expect_same(zero_gib_per_device(n, 8, stage), n * per_param / gib, f"8 Gi parameters on 8 devices, {case}",
                    atol=0.0, rtol=1e-12)
    for stage in range(4):
        expect_same(zero_gib_per_device(10**9, 1, stage), 16e9 / gib,
                    f"one device, stage {stage}: nothing to share, 16 bytes per parameter", atol=0.0, rtol=1e-12)


@hidden("zero_gib_per_device")
def test_zero_gib_per_device_uneven_shares(zero_gib_per_device):
    from companion.grading import expect_same
    gib = 2**30
    cases = [((10, 4, 3), 3 * 16, "10 parameters on 4 devices, stage 3: the fullest device holds 3"),
             ((10, 4, 1), 10 * 4 + 3 * 12, "10 parameters on 4 devices, stage 1"),
             ((3, 8, 3), 16, "3 parameters on 8 devices, stage 3: one parameter on the fullest"),
             ((0, 4, 2), 0, "no parameters")]
    for args, n_bytes, case in cases:
        expect_same(zero_gib_per_device(*args), n_bytes / gib, case, atol=0.0, rtol=1e-12)


@hidden("zero_gib_per_device")
def test_zero_gib_per_device_refuses_bad_values(zero_gib_per_device):
    for args, name in [((1000, 8, 4), "stage"), ((1000, 8, -1), "stage"), ((1000, 0, 1), "devices")]:
        try:
            zero_gib_per_device(*args)
        except ValueError as err:
            if name not in str(err):
                raise AssertionError(f"zero_gib_per_device{args}: the ValueError should name {name}: {err}") from None
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"zero_gib_per_device{args}: expected a ValueError, got "
                                 f"{type(err).__name__}: {err}") from None
        else:
            raise AssertionError(f"zero_gib_per_device{args}: expected a ValueError that names {name}")
