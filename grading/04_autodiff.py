"""Hidden tests for chapter 4's exercises."""

from companion.grading import hidden


@hidden("my_tanh")
def test_my_tanh_more_points(my_tanh):
    import math
    from companion.grading import expect_same
    for x in (1e-3, -0.2, 0.9, 1.7, -2.5, 4.0, -6.0):
        t = math.tanh(x)
        expect_same(my_tanh(x), (t, 1.0 - t * t), f"x={x}: (tanh x, 1 - tanh(x)^2)")


@hidden("my_tanh")
def test_my_tanh_saturated(my_tanh):
    import math
    from companion.grading import expect_same
    for x in (12.0, -12.0, 20.0, -20.0):
        t = math.tanh(x)
        expect_same(my_tanh(x), (t, 1.0 - t * t), f"x={x}: tanh saturates at +-1 and its gradient is ~0 (no NaN)")


@hidden("my_tanh")
def test_my_tanh_own_code(my_tanh):
    import math
    from companion.grading import expect_same, forbidding
    with forbidding(my_tanh, "companion.autodiff.Value.tanh", "companion.autodiff.Value.sigmoid", "math.tanh",
                    "numpy.tanh", "torch.tanh"):
        got = my_tanh(0.8)
    t = math.tanh(0.8)
    expect_same(got, (t, 1.0 - t * t), "x=0.8, with Value's exp and arithmetic only (no tanh or sigmoid)")


@hidden("sum_to_shape")
def test_sum_to_shape_4d(sum_to_shape):
    import numpy as np
    import torch
    from companion.grading import expect_same
    grad = np.random.default_rng(40).standard_normal((2, 3, 4, 5))
    for shape in [(5,), (4, 1), (3, 1, 5), (1, 4, 5), (2, 1, 4, 1), (1, 1, 1, 1), (1,), (2, 3, 4, 5)]:
        y = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        y.expand(grad.shape).backward(torch.from_numpy(grad))
        got = sum_to_shape(grad, shape)
        expect_same(np.asarray(got), y.grad.numpy(), f"grad of shape (2, 3, 4, 5) down to {shape}")


@hidden("sum_to_shape")
def test_sum_to_shape_size_one_axes(sum_to_shape):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(41)
    cases = [((3, 1, 4), (1, 1, 4), "an axis of size 1 in both, another stretched"),
             ((1, 5), (5,), "one extra leading axis of size 1"),
             ((6,), (1,), "a vector down to (1,)"),
             ((3, 1), (3, 1), "nothing stretched: the same shape"),
             ((2, 3), (), "a scalar input stretched to (2, 3): the total, shape ()")]
    for grad_shape, shape, case in cases:
        grad = rng.standard_normal(grad_shape)
        y = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        y.expand(grad_shape).backward(torch.from_numpy(grad))
        expect_same(np.asarray(sum_to_shape(grad, shape)), y.grad.numpy(), f"{grad_shape} down to {shape}: {case}")


@hidden("sum_to_shape")
def test_sum_to_shape_own_code(sum_to_shape):
    import numpy as np
    import torch
    from companion import autodiff
    from companion.grading import expect_same, forbidding
    if sum_to_shape is autodiff.unbroadcast:
        raise AssertionError("sum_to_shape is the companion's unbroadcast itself: this exercise asks for your own code")
    grad = np.random.default_rng(42).standard_normal((4, 2, 3))
    with forbidding(sum_to_shape, "companion.autodiff.unbroadcast", "companion.autodiff.tensor.unbroadcast",
                    "torch.Tensor.sum_to_size", "torch.Tensor.backward", "torch.autograd.backward", "torch.autograd.grad",
                    "companion.autodiff.Tensor.backward"):
        got = sum_to_shape(grad, (2, 1))
    expect_same(np.asarray(got), grad.sum(axis=(0, 2))[:, None], "(4, 2, 3) down to (2, 1), without unbroadcast or autograd")


@hidden("softmax_vjp")
def test_softmax_vjp_length_one_and_ties(softmax_vjp):
    import numpy as np
    from companion.grading import expect_same
    expect_same(np.asarray(softmax_vjp(np.array([0.3]), np.array([2.0]))), np.array([0.0]),
                "one entry: p = [1], so the gradient is [0]")
    g = np.array([1.0, -2.0, 4.0])
    expect_same(np.asarray(softmax_vjp(np.full(3, 5.0), g)), (g - g.mean()) / 3,
                "three equal scores (p uniform): (g - mean(g)) / 3")


@hidden("softmax_vjp")
def test_softmax_vjp_extreme_scores(softmax_vjp):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(43)
    for z, case in [(np.array([-1000.0, 0.0, 1000.0, 999.0]), "scores from -1000 to 1000"),
                    (np.array([-5000.0, -5001.0, -5003.0]), "all scores near -5000 (exp underflows without the shift)"),
                    (50 * rng.standard_normal(6), "six scores of size ~50")]:
        g = rng.standard_normal(len(z))
        zt = torch.tensor(z, requires_grad=True)
        torch.softmax(zt, 0).backward(torch.from_numpy(g))
        expect_same(np.asarray(softmax_vjp(z, g)), zt.grad.numpy(), case)


@hidden("softmax_vjp")
def test_softmax_vjp_own_code(softmax_vjp):
    import numpy as np
    import torch
    from companion.grading import expect_same, forbidding
    rng = np.random.default_rng(44)
    z, g = rng.standard_normal(40), rng.standard_normal(40)
    with forbidding(softmax_vjp, "torch.Tensor.backward", "torch.autograd.backward", "torch.autograd.grad",
                    "torch.autograd.functional.jacobian", "torch.autograd.functional.vjp", "torch.func.vjp",
                    "torch.func.jacrev", "torch._softmax_backward_data", "companion.autodiff.Tensor.backward"):
        got = softmax_vjp(z, g)
    zt = torch.tensor(z, requires_grad=True)
    torch.softmax(zt, 0).backward(torch.from_numpy(g))
    expect_same(np.asarray(got), zt.grad.numpy(), "40 random scores, through your Jacobian and not autograd")


@hidden("cross_entropy_grad")
def test_cross_entropy_grad_edges(cross_entropy_grad):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(45)
    cases = [(np.array([[0.7]]), np.array([0]), "one row, one class: the gradient is 0"),
             (np.zeros((3, 4)), np.array([2, 2, 0]), "equal logits in every row, a repeated target"),
             (rng.standard_normal((5, 2)), np.array([1, 1, 1, 1, 1]), "five rows, two classes, the same target"),
             (rng.standard_normal((1, 30)), np.array([29]), "one row of 30 classes, the last one the target")]
    for logits, targets, case in cases:
        z = torch.tensor(logits, requires_grad=True)
        torch.nn.functional.cross_entropy(z, torch.from_numpy(targets)).backward()
        expect_same(np.asarray(cross_entropy_grad(logits.copy(), targets)), z.grad.numpy(), case)


@hidden("cross_entropy_grad")
def test_cross_entropy_grad_large_logits(cross_entropy_grad):
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(46)
    logits = 1000 * rng.standard_normal((6, 5))
    logits[0] = [-800.0, -800.0, -801.0, -850.0, -900.0]  # every logit very negative
    targets = rng.integers(0, 5, 6)
    z = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(z, torch.from_numpy(targets)).backward()
    expect_same(np.asarray(cross_entropy_grad(logits.copy(), targets)), z.grad.numpy(),
                "logits of size ~1000 (no inf or NaN)")


@hidden("cross_entropy_grad")
def test_cross_entropy_grad_no_row_loop(cross_entropy_grad):
    import sys
    import numpy as np
    import torch
    from companion.grading import expect_same
    rng = np.random.default_rng(47)
    N, V = 3000, 4
    logits, targets = rng.standard_normal((N, V)), rng.integers(0, V, N)
    code = getattr(cross_entropy_grad, "__code__", None)
    where = code.co_filename if code is not None else None
    lines = [0]

    def count_lines(frame, event, arg):
        if event == "line":
            lines[0] += 1
        return count_lines

    def on_call(frame, event, arg):
        return count_lines if frame.f_code.co_filename == where else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        got = cross_entropy_grad(logits.copy(), targets)
    finally:
        sys.settrace(previous)
    if lines[0] > 500:
        raise AssertionError(f"N={N} rows ran {lines[0]} lines of your code: a Python loop over the rows? "
                             "The exercise asks for vectorised numpy (index with [np.arange(N), targets])")
    z = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(z, torch.from_numpy(targets)).backward()
    expect_same(np.asarray(got), z.grad.numpy(), f"N={N} rows of V={V}")


@hidden("cross_entropy_grad")
def test_cross_entropy_grad_own_code(cross_entropy_grad):
    import numpy as np
    import torch
    from companion.grading import expect_same, forbidding
    rng = np.random.default_rng(48)
    logits, targets = rng.standard_normal((8, 6)), rng.integers(0, 6, 8)
    with forbidding(cross_entropy_grad, "torch.nn.functional.cross_entropy", "torch.nn.CrossEntropyLoss.forward",
                    "torch.Tensor.backward", "torch.autograd.backward", "torch.autograd.grad",
                    "companion.autodiff.functional.cross_entropy", "companion.autodiff.Tensor.backward"):
        got = cross_entropy_grad(logits.copy(), targets)
    z = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(z, torch.from_numpy(targets)).backward()
    expect_same(np.asarray(got), z.grad.numpy(), "8 rows of 6 classes, without a library cross-entropy or autograd")
