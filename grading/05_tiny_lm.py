"""Hidden tests for chapter 5's exercises."""

from companion.grading import hidden


@hidden("causal_mask")
def test_causal_mask_sizes_and_dtype(causal_mask):
    import numpy as np
    from companion.grading import expect_same
    for T in (1, 3, 7, 100):
        got = causal_mask(T)
        if not isinstance(got, np.ndarray):
            raise AssertionError(f"T={T}: expected a numpy array, got {type(got).__name__}")
        if got.dtype != np.bool_:
            raise AssertionError(f"T={T}: expected a boolean array, got dtype {got.dtype}")
        rows, cols = np.indices((T, T))
        expect_same(got, cols > rows, f"T={T}")


@hidden("causal_mask")
def test_causal_mask_orientation(causal_mask):
    import numpy as np
    got = np.asarray(causal_mask(4))
    if got.shape != (4, 4):
        raise AssertionError(f"T=4: expected shape (4, 4), got {got.shape}")
    if got.diagonal().any():
        raise AssertionError("T=4: the diagonal must be False (a position may look at itself)")
    if not got[0, 1:].all():
        raise AssertionError("T=4: row 0 (the first position) must be True at every later column 1..3")
    if got[3].any():
        raise AssertionError("T=4: row 3 (the last position) has no future, it must be all False")
    if got[1:, 0].any():
        raise AssertionError("T=4: column 0 is never in the future of a row, it must be all False")


@hidden("attention_weights")
def test_attention_weights_other_shape_float64(attention_weights):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(50)
    q = rng.standard_normal((3, 2, 7, 5))
    k = rng.standard_normal((3, 2, 7, 5))
    got = attention_weights(q, k)
    if not isinstance(got, np.ndarray):
        raise AssertionError(f"B=3, H=2, T=7, D=5: expected a numpy array, got {type(got).__name__}")
    if got.dtype != np.float64:
        raise AssertionError(f"B=3, H=2, T=7, D=5 in float64: expected dtype float64, got {got.dtype}")
    tq, tk = torch.from_numpy(q), torch.from_numpy(k)
    scores = tq @ tk.transpose(-2, -1) / 5 ** 0.5
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    expected = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).numpy()
    expect_same(got, expected, "B=3, H=2, T=7, D=5 (T differs from D)")
    if not (got[..., future.numpy()] == 0).all():
        raise AssertionError("B=3, H=2, T=7, D=5: the weights above the diagonal must be exactly 0")


@hidden("attention_weights")
def test_attention_weights_huge_scores(attention_weights):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(51)
    q = rng.standard_normal((2, 2, 6, 4)) * 100.0
    k = rng.standard_normal((2, 2, 6, 4)) * 100.0
    with np.errstate(all="ignore"):
        got = attention_weights(q, k)
    got = np.asarray(got)
    if not np.isfinite(got).all():
        raise AssertionError("scores in the thousands: the weights contain nan or inf (subtract the row maximum)")
    tq, tk = torch.from_numpy(q), torch.from_numpy(k)
    scores = tq @ tk.transpose(-2, -1) / 2.0
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    expected = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).numpy()
    expect_same(got, expected, "scores in the thousands (q and k scaled by 100)")


@hidden("attention_weights")
def test_attention_weights_ties_and_length_one(attention_weights):
    import numpy as np
    from companion.grading import expect_same
    T = 5
    q = np.zeros((2, 3, T, 4))
    k = np.random.default_rng(52).standard_normal((2, 3, T, 4))
    expected = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    expect_same(attention_weights(q, k), np.broadcast_to(expected, (2, 3, T, T)).copy(),
                "zero queries (all scores tied): row t must be 1/(t+1) on columns 0..t")
    q1 = np.random.default_rng(53).standard_normal((4, 2, 1, 3))
    k1 = np.random.default_rng(54).standard_normal((4, 2, 1, 3))
    expect_same(attention_weights(q1, k1), np.ones((4, 2, 1, 1)), "T=1: the only position gets weight 1")


@hidden("attention_weights")
def test_attention_weights_own_code(attention_weights):
    import numpy as np
    import torch
    from companion.grading import expect_same, forbidding
    rng = np.random.default_rng(55)
    q = rng.standard_normal((2, 2, 5, 3))
    k = rng.standard_normal((2, 2, 5, 3))
    with forbidding(attention_weights, "companion.autodiff.functional.softmax", "companion.autodiff.Tensor",
                    "torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax"):
        got = attention_weights(q, k)
    tq, tk = torch.from_numpy(q), torch.from_numpy(k)
    scores = tq @ tk.transpose(-2, -1) / 3 ** 0.5
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).numpy()
    expect_same(got, expected, "random (2, 2, 5, 3) inputs, in plain numpy (without the engine's or torch's softmax)")


@hidden("unigram_cross_entropy")
def test_unigram_unseen_ids(unigram_cross_entropy):
    import math
    import numpy as np
    from companion.grading import expect_same
    train = np.array([0, 0, 0, 1])
    val = np.array([4, 3, 0])
    # counts + 1 = [4, 2, 1, 1, 1], total 9
    expected = -(math.log(1 / 9) + math.log(1 / 9) + math.log(4 / 9)) / 3
    expect_same(unigram_cross_entropy(train, val, 5), expected,
                "train=[0, 0, 0, 1], val=[4, 3, 0], vocab_size=5 (ids 3 and 4 never seen in training)",
                atol=1e-9, rtol=1e-9)


@hidden("unigram_cross_entropy")
def test_unigram_empty_train_and_single_val(unigram_cross_entropy):
    import math
    import numpy as np
    from companion.grading import expect_same
    expect_same(unigram_cross_entropy(np.array([], dtype=np.int64), np.array([0, 2, 1]), 3), math.log(3),
                "empty train, vocab_size=3: every count is the added 1, so the loss is ln 3", atol=1e-9, rtol=1e-9)
    expect_same(unigram_cross_entropy(np.array([2, 2, 1]), np.array([2]), 4), -math.log(3 / 7),
                "train=[2, 2, 1], val of length 1 [2], vocab_size=4", atol=1e-9, rtol=1e-9)


@hidden("unigram_cross_entropy")
def test_unigram_random(unigram_cross_entropy):
    import numpy as np
    from companion.grading import expect_same
    rng = np.random.default_rng(56)
    train = rng.choice(10, size=3000, p=np.linspace(1, 10, 10) / 55)
    val = rng.integers(0, 12, size=700)
    ids, n = np.unique(train, return_counts=True)
    counts = np.ones(12)
    counts[ids] += n
    expected = float(np.mean([-np.log(counts[i] / counts.sum()) for i in val]))
    got = unigram_cross_entropy(train, val, 12)
    expect_same(got, expected, "3000 skewed train ids in 0..9, 700 val ids in 0..11, vocab_size=12",
                atol=1e-9, rtol=1e-9)


@hidden("unigram_cross_entropy")
def test_unigram_own_code(unigram_cross_entropy):
    import numpy as np
    import companion.autodiff.lm as lm
    from companion.grading import expect_same, forbidding
    if unigram_cross_entropy is lm.unigram_loss:
        raise AssertionError("unigram_cross_entropy is companion's unigram_loss itself: this exercise asks for your own code")
    rng = np.random.default_rng(57)
    train = rng.integers(0, 6, size=500)
    val = rng.integers(0, 8, size=200)
    counts = np.ones(8)
    np.add.at(counts, train, 1.0)
    expected = float(-np.log(counts[val] / counts.sum()).mean())
    with forbidding(unigram_cross_entropy, "companion.autodiff.lm.unigram_loss"):
        got = unigram_cross_entropy(train, val, 8)
    expect_same(got, expected, "random ids, without companion's unigram_loss", atol=1e-9, rtol=1e-9)
