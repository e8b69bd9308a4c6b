"""Hidden tests for chapter 5's exercises."""

from companion.grading import hidden


@hidden("top_k_probs")
def test_top_k_ties_and_k_beyond_the_vocabulary(top_k_probs):
    import numpy as np
    from companion.grading import expect_same
    e = np.exp(1.0)
    expect_same(top_k_probs(np.array([[2.0, 1.0, 1.0, 0.0]]), 2, 1.0),
                np.array([[e, 1.0, 1.0, 0.0]]) / (e + 2.0),
                "logits [2, 1, 1, 0], k=2: the two logits tied at the 2nd largest value both stay", atol=1e-12)
    expect_same(top_k_probs(np.array([[3.0, 1.0, 3.0]]), 1, 1.0), np.array([[0.5, 0.0, 0.5]]),
                "logits [3, 1, 3], k=1: a tie for the top keeps both", atol=1e-12)
    z = np.random.default_rng(60).standard_normal((3, 7))
    full = np.exp(z - z.max(axis=1, keepdims=True))
    full /= full.sum(axis=1, keepdims=True)
    expect_same(top_k_probs(z, 7, 1.0), full, "k equal to V=7: a plain softmax", atol=1e-12)
    expect_same(top_k_probs(z, 50, 1.0), full, "k=50 larger than V=7: every token stays", atol=1e-12)


@hidden("top_k_probs")
def test_top_k_temperature(top_k_probs):
    import numpy as np
    from companion.grading import expect_same
    z = np.array([[0.5, 2.0, -1.0, 1.5, 2.0], [4.0, 0.0, 1.0, 3.0, 2.0]])
    expect_same(top_k_probs(z, 3, 0.0), np.array([[0.0, 0.5, 0.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0, 0.0]]),
                "temperature 0: all the probability on the largest logit, shared equally by a tie", atol=1e-12)
    for t in (0.25, 3.0):
        kept = np.array([[False, True, False, True, True], [True, False, False, True, True]])
        p = np.where(kept, np.exp((z - z.max(axis=1, keepdims=True)) / t), 0.0)
        expect_same(top_k_probs(z, 3, t), p / p.sum(axis=1, keepdims=True),
                    f"k=3, temperature {t}: divide the kept logits by the temperature", atol=1e-12)


@hidden("top_k_probs")
def test_top_k_refuses_bad_k_and_negative_temperature(top_k_probs):
    import numpy as np
    z = np.zeros((2, 4))
    for args, bad in (((z, 0, 1.0), "0"), ((z, -3, 1.0), "-3"), ((z, 2, -1.0), "-1"), ((z, 2, -0.01), "-0.01")):
        what = f"k={args[1]}, temperature={args[2]}"
        try:
            top_k_probs(*args)
        except ValueError as err:
            if bad not in str(err):
                raise AssertionError(f"{what}: the ValueError must name the bad value {bad}, got {err!r}") from err
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"{what}: expected a ValueError, got {type(err).__name__}: {err}") from err
        else:
            raise AssertionError(f"{what}: expected a ValueError")


@hidden("top_k_probs")
def test_top_k_dtypes_empty_huge_and_masked(top_k_probs):
    import numpy as np
    from companion.grading import expect_same
    z32 = np.random.default_rng(61).standard_normal((2, 9)).astype(np.float32)
    got = top_k_probs(z32, 4, 1.0)
    if not isinstance(got, np.ndarray) or got.dtype != np.float64:
        raise AssertionError(f"float32 logits: expected a float64 numpy array, got {getattr(got, 'dtype', type(got).__name__)}")
    expect_same(top_k_probs(np.zeros((0, 7)), 3, 1.0), np.zeros((0, 7)), "an empty batch of shape (0, 7)")
    with np.errstate(all="ignore"):
        got = top_k_probs(np.array([[1e4, 0.0, -1e4, 1e4 - 1.0]]), 2, 1.0)
    e = np.exp(-1.0)
    expect_same(got, np.array([[1.0, 0.0, 0.0, e]]) / (1.0 + e), "logits near 1e4 and -1e4, k=2: no overflow",
                atol=1e-12)
    inf = np.inf
    with np.errstate(all="ignore"):
        got = top_k_probs(np.array([[0.0, -inf, 1.0, -inf]]), 3, 1.0)
    expect_same(got, np.array([[1.0, 0.0, np.e, 0.0]]) / (1.0 + np.e),
                "logits [0, -inf, 1, -inf] (two already cut), k=3: the -inf logits get probability 0, no NaN",
                atol=1e-12)


@hidden("tied_grad")
def test_tied_grad_repeated_ids_and_both_roads(tied_grad):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(62)
    weight = rng.standard_normal((6, 3))
    idx = np.array([[2, 2, 5, 2], [0, 2, 2, 1]])
    targets = np.array([[2, 0, 2, 3], [2, 2, 5, 2]])
    W = torch.tensor(weight, requires_grad=True)
    logits = W[torch.from_numpy(idx)] @ W.T
    torch.nn.functional.cross_entropy(logits.reshape(-1, 6), torch.from_numpy(targets).reshape(-1)).backward()
    expected = W.grad.numpy()
    got = np.asarray(tied_grad(weight.copy(), idx, targets))
    if got.shape == expected.shape and not np.allclose(got, expected, atol=1e-9):
        # Name the half-right answers.
        h = weight[idx.reshape(-1)]
        z = h @ weight.T
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(8), targets.reshape(-1)] -= 1
        p /= 8
        head, lookup_rows = p.T @ h, p @ weight
        lookup = np.zeros_like(weight)
        np.add.at(lookup, idx.reshape(-1), lookup_rows)
        overwritten = head.copy()
        overwritten[idx.reshape(-1)] += lookup_rows
        for wrong, why in ((head, "only the head's share: the lookup uses the same matrix, add its gradient"),
                           (lookup, "only the lookup's share: the head multiplies by the same matrix, add its gradient"),
                           (overwritten, "id 2 appears 5 times in idx: its rows' gradients must add up (np.add.at)")):
            if np.allclose(got, wrong, atol=1e-9):
                raise AssertionError(f"W (6, 3), idx with id 2 five times and as a target: {why}")
    expect_same(got, expected, "W (6, 3), idx (2, 4) with id 2 five times, also as a target", atol=1e-9, rtol=1e-7)


@hidden("tied_grad")
def test_tied_grad_shapes_and_dtypes(tied_grad):
    import numpy as np
    import torch
    from companion.grading import expect_same

    def reference(weight, idx, targets):
        W = torch.tensor(weight.astype(np.float64), requires_grad=True)
        logits = W[torch.from_numpy(idx)] @ W.T
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, weight.shape[0]),
                                                 torch.from_numpy(targets).reshape(-1))
        loss.backward()
        return W.grad.numpy().astype(weight.dtype)

    rng = np.random.default_rng(63)
    w32 = (rng.standard_normal((20, 5)) * 0.7).astype(np.float32)
    idx, targets = rng.integers(0, 20, (3, 7)), rng.integers(0, 20, (3, 7))
    expect_same(tied_grad(w32, idx, targets), reference(w32, idx, targets),
                "float32 W (20, 5), idx (3, 7) (the gradient keeps float32)", atol=1e-6, rtol=1e-4)
    w = rng.standard_normal((4, 2))
    for i, t, what in ((np.array([[1]]), np.array([[3]]), "one position, idx (1, 1)"),
                       (np.array([0, 3, 3]), np.array([3, 3, 0]), "1-D idx of shape (3,)"),
                       (rng.integers(0, 4, (2, 2, 3)), rng.integers(0, 4, (2, 2, 3)), "3-D idx of shape (2, 2, 3)")):
        expect_same(tied_grad(w.copy(), i, t), reference(w, i, t), f"W (4, 2) float64, {what}", atol=1e-9, rtol=1e-7)


@hidden("tied_grad")
def test_tied_grad_by_hand(tied_grad):
    import numpy as np
    import torch
    from companion.grading import expect_same, forbidding
    rng = np.random.default_rng(64)
    weight = rng.standard_normal((8, 4))
    idx, targets = rng.integers(0, 8, (2, 5)), rng.integers(0, 8, (2, 5))
    W = torch.tensor(weight, requires_grad=True)
    torch.nn.functional.cross_entropy((W[torch.from_numpy(idx)] @ W.T).reshape(-1, 8),
                                      torch.from_numpy(targets).reshape(-1)).backward()
    expected = W.grad.numpy()
    given = weight.copy()
    with forbidding(tied_grad, "companion.autodiff.Tensor.backward", "torch.Tensor.backward",
                    "torch.autograd.grad", "torch.autograd.backward"):
        got = tied_grad(given, idx, targets)
    expect_same(got, expected, "random W (8, 4), by hand (without the engine's or torch's backward)",
                atol=1e-9, rtol=1e-7)
    if not np.array_equal(given, weight):
        raise AssertionError("random W (8, 4): tied_grad changed the weight it was given; compute on copies")


@hidden("perplexity")
def test_perplexity_window_edges(perplexity):
    import math
    import numpy as np
    from companion.autodiff import no_grad
    from companion.autodiff import functional as F
    from companion.autodiff.lm import TinyLM, TinyLMConfig
    from companion.grading import expect_same
    model = TinyLM(TinyLMConfig(vocab_size=11, block_size=5, n_embd=8, n_head=2, n_layer=1, dtype="float64"), seed=4)
    rng = np.random.default_rng(65)
    for p in model.parameters():  # confident, varied predictions, so that every position counts differently
        p.data[...] = rng.normal(0.0, 0.4, p.shape)

    def reference(ids):
        nll = []
        with no_grad():
            for t in range(len(ids) - 1):
                logp = F.log_softmax(model(np.array([ids[t - t % 5 : t + 1]]))[0], axis=-1).data[0, -1]
                nll.append(-float(logp[ids[t + 1]]))
        return math.exp(sum(nll) / len(nll))

    text = rng.integers(0, 11, 23)
    for n, what in ((2, "one prediction"), (5, "one window, shorter than block_size=5"),
                    (6, "block_size + 1: exactly one full window"),
                    (7, "7 tokens: windows of 5 predictions and of 1 (each prediction counts once, and the context "
                         "restarts at each window)"),
                    (16, "16 tokens: three full windows"), (23, "23 tokens: four full windows and one of 2")):
        expect_same(perplexity(model, text[:n]), reference(list(text[:n])), f"block_size=5, {what}",
                    atol=1e-9, rtol=1e-9)


@hidden("perplexity")
def test_perplexity_short_texts_raise(perplexity):
    import numpy as np
    from companion.autodiff.lm import TinyLM, TinyLMConfig
    model = TinyLM(TinyLMConfig(vocab_size=7, block_size=4, n_embd=8, n_head=2, n_layer=1), seed=5)
    for ids, what in ((np.array([3]), "a text of one token"), (np.array([], dtype=np.int64), "an empty text"),
                      ([], "an empty list")):
        try:
            perplexity(model, ids)
        except ValueError:
            continue
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"{what}: expected a ValueError (nothing to predict), got {type(err).__name__}: {err}") from err
        raise AssertionError(f"{what}: there is nothing to predict, expected a ValueError")


@hidden("perplexity")
def test_perplexity_list_input_float_and_context_restart(perplexity):
    import math
    import numpy as np
    from companion.autodiff import no_grad
    from companion.autodiff.lm import TinyLM, TinyLMConfig
    from companion.grading import expect_same
    model = TinyLM(TinyLMConfig(vocab_size=9, block_size=3, n_embd=8, n_head=2, n_layer=1, dtype="float64"), seed=6)
    rng = np.random.default_rng(66)
    for p in model.parameters():
        p.data[...] = rng.normal(0.0, 0.8, p.shape)
    ids = [int(i) for i in rng.integers(0, 9, 10)]
    with no_grad():  # windows of 3 inputs starting at 0, 3 and 6: 9 predictions in all
        total = 0.0
        for start in (0, 3, 6):
            y = ids[start + 1 : start + 4]
            _, loss = model(np.array([ids[start : start + len(y)]]), np.array([y]))
            total += loss.item() * len(y)
    expected = math.exp(total / 9)
    got = perplexity(model, ids)
    if not isinstance(got, float):
        raise AssertionError(f"a list of 10 ids: expected a Python float, got {type(got).__name__}")
    expect_same(got, expected, "a Python list of 10 ids, block_size=3: the context restarts every 3 tokens",
                atol=1e-9, rtol=1e-9)
