"""Hidden tests for chapter 4's exercises."""

from companion.grading import hidden


@hidden("tensor_max")
def test_tensor_max_ties_on_every_axis(tensor_max, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    x = np.random.default_rng(401).integers(0, 3, (3, 4, 5)).astype(float)  # many ties
    for axis in (0, 1, 2, -1, -2, -3):
        for keepdims in (False, True):
            t = Tensor(x, requires_grad=True)
            out = tensor_max(t, axis=axis, keepdims=keepdims)
            g = np.linspace(-2.0, 3.0, out.data.size).reshape(out.data.shape)
            out.backward(g)
            tt = torch.tensor(x, requires_grad=True)
            ref = torch.amax(tt, dim=axis, keepdim=keepdims)
            ref.backward(torch.from_numpy(g))
            case = f"integers 0..2 of shape (3, 4, 5) (many ties), axis={axis}, keepdims={keepdims}"
            expect_same(np.asarray(out.data), ref.detach().numpy(), case + ": the maxima")
            expect_same(t.grad, tt.grad.numpy(), case + ": the gradient, split equally among ties")


@hidden("tensor_max")
def test_tensor_max_infinities_vectors_and_size_one(tensor_max, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    inf = np.inf
    cases = [(np.array([[-inf, -inf, -inf], [inf, 1.0, inf]]), -1, "a row of -inf (three-way tie) and two tied +inf"),
             (np.array([2.0, 7.0, 7.0, 7.0]), 0, "a vector with a three-way tie: a single number out"),
             (np.array([[5.0], [-1.0]]), 1, "an axis of size 1: each entry is its own maximum"),
             (np.array([[0.0, -0.0]]), -1, "0.0 and -0.0 are equal: a tie")]
    for x, axis, case in cases:
        t = Tensor(x, requires_grad=True)
        out = tensor_max(t, axis=axis)
        g = np.linspace(1.0, 2.0, out.data.size).reshape(out.data.shape)
        out.backward(g)
        tt = torch.tensor(x, requires_grad=True)
        torch.amax(tt, dim=axis).backward(torch.from_numpy(g))
        expect_same(t.grad, tt.grad.numpy(), case)


@hidden("tensor_max")
def test_tensor_max_inside_a_graph(tensor_max, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(402)
    x = np.round(rng.standard_normal((4, 6)), 1)
    x[1, 2] = x[1, 4] = x[1].max() + 1.0   # a tie in row 1
    w = rng.standard_normal(4)
    t = Tensor(x, requires_grad=True)
    ((tensor_max(t, axis=1) * Tensor(w)).sum() + (t * t).sum()).backward()
    tt = torch.tensor(x, requires_grad=True)
    ((torch.amax(tt, dim=1) * torch.from_numpy(w)).sum() + (tt * tt).sum()).backward()
    expect_same(t.grad, tt.grad.numpy(), "x used by tensor_max and again by x * x: both gradients add up")
    constant = tensor_max(Tensor(x), axis=0)
    if constant.requires_grad:
        raise AssertionError("the maximum of a constant (requires_grad=False) must not require a gradient: use Tensor._make")


@hidden("concatenate")
def test_concatenate_repeats_and_constants(concatenate, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(403)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 2))
    ta, tb = Tensor(a, requires_grad=True), Tensor(b)
    out = concatenate([ta, tb, ta, ta], axis=1)
    g = rng.standard_normal((2, 11))
    out.backward(g)
    pa, pb = torch.tensor(a, requires_grad=True), torch.tensor(b)
    torch.cat([pa, pb, pa, pa], dim=1).backward(torch.from_numpy(g))
    expect_same(np.asarray(out.data), torch.cat([pa, pb, pa, pa], dim=1).detach().numpy(), "[a, b, a, a] along axis 1: the values")
    expect_same(ta.grad, pa.grad.numpy(), "[a, b, a, a] along axis 1: a appears three times, its three slices add up")
    if tb.grad is not None:
        raise AssertionError("[a, b, a, a] with b a constant: b.grad must stay None")


@hidden("concatenate")
def test_concatenate_empty_pieces_negative_axis_float32(concatenate, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(404)
    cases = [([(2, 0, 4), (2, 3, 4), (2, 0, 4), (2, 1, 4)], -2, np.float64, "empty pieces along axis -2 of 3-D tensors"),
             ([(0, 5), (0, 5)], 0, np.float64, "only empty pieces: an empty result"),
             ([(3, 2), (3, 1)], -1, np.float32, "float32 pieces: float32 values and gradients")]
    for shapes, axis, dtype, case in cases:
        arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
        ts = [Tensor(a, requires_grad=True) for a in arrays]
        out = concatenate(ts, axis=axis)
        g = np.linspace(-1.0, 1.0, out.data.size).reshape(out.data.shape).astype(dtype)
        out.backward(g)
        ps = [torch.tensor(a, requires_grad=True) for a in arrays]
        ref = torch.cat(ps, dim=axis)
        ref.backward(torch.from_numpy(g))
        expect_same(np.asarray(out.data), ref.detach().numpy(), case + ": the values")
        for i, (t, p) in enumerate(zip(ts, ps)):
            expect_same(t.grad, p.grad.numpy(), f"{case}: the gradient of piece {i}")


@hidden("concatenate")
def test_concatenate_inside_a_graph(concatenate, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(405)
    x, y = rng.standard_normal((3, 2)), rng.standard_normal((1, 2))
    tx, ty = Tensor(x, requires_grad=True), Tensor(y, requires_grad=True)
    ((concatenate([tx * 2.0, ty, tx]) ** 2).sum()).backward()
    px, py = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    ((torch.cat([px * 2.0, py, px]) ** 2).sum()).backward()
    expect_same(tx.grad, px.grad.numpy(), "concatenate([2x, y, x]) squared and summed: the gradient of x")
    expect_same(ty.grad, py.grad.numpy(), "concatenate([2x, y, x]) squared and summed: the gradient of y")


@hidden("log_softmax")
def test_log_softmax_extreme_scores(log_softmax, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    inf = np.inf
    cases = [(np.array([[1e4, 1e4 + 1.0, 1e4 - 3.0]]), "scores near 10,000"),
             (np.array([[-1e4, -1e4 - 2.0, -1e4 + 0.5]]), "scores near -10,000"),
             (np.array([[-inf, 2.0, -inf, 0.0], [1.0, 1.0, 1.0, 1.0]]), "masked scores (-inf) and a row of equal scores"),
             (np.array([[3.0], [-7.0]]), "rows of one score: log-probability 0, gradient 0")]
    for x, case in cases:
        t = Tensor(x, requires_grad=True)
        out = log_softmax(t, axis=-1)
        g = np.linspace(-1.0, 2.0, x.size).reshape(x.shape)
        out.backward(g)
        p = torch.tensor(x, requires_grad=True)
        ref = torch.log_softmax(p, dim=-1)
        ref.backward(torch.from_numpy(g))
        expect_same(np.asarray(out.data), ref.detach().numpy(), case + ": the values")
        expect_same(t.grad, p.grad.numpy(), case + ": the gradient")


@hidden("log_softmax")
def test_log_softmax_axes_and_float32(log_softmax, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(406)
    for dtype in (np.float64, np.float32):
        x = (3 * rng.standard_normal((2, 3, 4, 5))).astype(dtype)
        for axis in (0, 1, 2, 3, -1, -3):
            t = Tensor(x, requires_grad=True)
            out = log_softmax(t, axis=axis)
            g = rng.standard_normal(x.shape).astype(dtype)
            out.backward(g)
            p = torch.tensor(x, requires_grad=True)
            ref = torch.log_softmax(p, dim=axis)
            ref.backward(torch.from_numpy(g))
            case = f"shape (2, 3, 4, 5), {np.dtype(dtype).name}, axis={axis}"
            expect_same(np.asarray(out.data), ref.detach().numpy(), case + ": the values (and their dtype)")
            expect_same(t.grad, p.grad.numpy(), case + ": the gradient")


@hidden("log_softmax")
def test_log_softmax_is_one_node_of_its_own(log_softmax, Tensor):
    import numpy as np
    import torch
    from companion.grading import expect_same, forbidding
    x = np.random.default_rng(407).standard_normal((3, 4))
    t = Tensor(x, requires_grad=True)
    with forbidding(log_softmax, "companion.autodiff.functional.log_softmax", "torch.log_softmax",
                    "torch.nn.functional.log_softmax", "torch.Tensor.log_softmax", "torch.special.log_softmax"):
        out = log_softmax(t, axis=-1)
    if len(out._prev) != 1 or out._prev[0] is not t:
        raise AssertionError("log_softmax must be one node whose only input is x (one Tensor._make with its own "
                             f"backward), but the result was computed from {len(out._prev)} intermediate tensors")
    out.backward(np.ones((3, 4)))
    p = torch.tensor(x, requires_grad=True)
    torch.log_softmax(p, dim=-1).backward(torch.ones(3, 4, dtype=torch.float64))
    expect_same(t.grad, p.grad.numpy(), "an upstream gradient of ones, through your own backward")


@hidden("directional_check")
def test_directional_check_catches_planted_bugs(directional_check, Tensor, softmax):
    import numpy as np
    rng = np.random.default_rng(408)

    def sum_rows_broadcast_along_the_wrong_axis(x):   # right for symmetric matrices only
        def backward(g):
            x._accumulate(np.broadcast_to(g[:, None], x.data.shape))
        return Tensor._make(x.data.sum(axis=0), (x,), backward)

    def cube_slightly_off(x):                           # 0.1% too large
        def backward(g):
            x._accumulate(g * 3.0 * x.data ** 2 * 1.001)
        return Tensor._make(x.data ** 3, (x,), backward)

    def softmax_plus_a_term_that_sums_to_zero(x):       # invisible along a direction of all ones
        p = softmax(x).data

        def backward(g):
            right = p * (g - (g * p).sum(axis=-1, keepdims=True))
            x._accumulate(right + 0.1 * (g - g.mean(axis=-1, keepdims=True)))
        return Tensor._make(p, (x,), backward)

    for fn, x, case in [(sum_rows_broadcast_along_the_wrong_axis, rng.standard_normal((5, 5)),
                         "a column sum whose backward broadcasts along the wrong axis (square input)"),
                        (cube_slightly_off, rng.standard_normal(30), "x^3 with a gradient 0.1% too large"),
                        (softmax_plus_a_term_that_sums_to_zero, rng.standard_normal((4, 7)),
                         "softmax with a wrong term that sums to 0 in every row")]:
        for seed in (0, 1, 2):
            if directional_check(fn, x, seed=seed):
                raise AssertionError(f"{case}, seed={seed}: directional_check returned True for a wrong backward")


@hidden("directional_check")
def test_directional_check_passes_correct_ops(directional_check, Tensor, softmax, layer_norm, cross_entropy):
    import numpy as np
    rng = np.random.default_rng(409)
    w, b = Tensor(rng.standard_normal(8)), Tensor(rng.standard_normal(8))
    W = Tensor(rng.standard_normal((8, 3)))
    cases = [(lambda t: layer_norm(t, w, b), rng.standard_normal((3, 5, 8)), "LayerNorm on (3, 5, 8)"),
             (lambda t: (t @ W).sum(axis=1), rng.standard_normal((2, 4, 8)), "a batch times a matrix, summed"),
             (lambda t: cross_entropy(t, np.array([1, 1, 0])), 5 * rng.standard_normal((3, 4)), "cross-entropy"),
             (lambda t: t * t * 3.0, np.array(1.5), "a 0-d input (one number)"),
             (lambda t: softmax(t), (5 * rng.standard_normal((16, 64))).astype(np.float32), "float32 softmax of (16, 64)"),
             (lambda t: layer_norm(t, w, b), np.zeros((0, 8)), "an empty input (0 rows)"),
             (lambda t: t * 0.0, rng.standard_normal(4), "an output that does not depend on x: gradient 0")]
    for fn, x, case in cases:
        for seed in (0, 3):
            if not directional_check(fn, x, seed=seed):
                raise AssertionError(f"{case}, seed={seed}: directional_check returned False for a correct backward")


@hidden("directional_check")
def test_directional_check_costs_a_few_evaluations(directional_check, Tensor, softmax):
    import numpy as np
    calls = [0]

    def counted_softmax(t):
        calls[0] += 1
        return softmax(t)

    x = np.random.default_rng(410).standard_normal((100, 100))
    ok = directional_check(counted_softmax, x)
    if calls[0] > 5:
        raise AssertionError(f"an input of 10,000 entries cost {calls[0]} calls of fn: the point of a direction is "
                             "two evaluations (plus one for backward), whatever the size of x")
    if not ok:
        raise AssertionError("softmax of a (100, 100) input: directional_check returned False for a correct backward")
