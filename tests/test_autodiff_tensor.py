"""The numpy Tensor engine against torch.autograd, in float64, on property-based inputs.

Every operation is run by both engines on the same random inputs (shapes drawn by
hypothesis so that they broadcast, values from a seeded generator); the outputs must
agree, and so must the gradients of every input for a random upstream gradient
(``out.backward(G)``: the whole vector-Jacobian product is checked, not just a sum).
Each test runs 200 examples.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from companion.autodiff import Tensor, no_grad, unbroadcast
from companion.autodiff import functional as F

OPS = settings(max_examples=200, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RTOL, ATOL = 1e-9, 1e-11
seeds = st.integers(0, 2**32 - 1)
pairs = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4)
shapes = array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)
shapes_1d = array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4)




def compare(ours_fn, torch_fn, arrays, rng, grads=None):
    """Run both engines on ``arrays`` (float64) and compare outputs and input gradients."""
    grads = [True] * len(arrays) if grads is None else grads
    ours_in = [Tensor(a, requires_grad=g) for a, g in zip(arrays, grads)]
    torch_in = [torch.tensor(a, requires_grad=g) for a, g in zip(arrays, grads)]
    out, t_out = ours_fn(*ours_in), torch_fn(*torch_in)
    assert out.shape == tuple(t_out.shape)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.data, t_out.detach().numpy(), rtol=RTOL, atol=ATOL)
    upstream = rng.standard_normal(out.shape)
    out.backward(upstream)
    t_out.backward(torch.from_numpy(np.asarray(upstream)))
    for x, tx in zip(ours_in, torch_in):
        if tx.requires_grad:
            assert x.grad is not None and x.grad.shape == x.shape
            np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=RTOL, atol=ATOL)
    return out


def away_from_zero(rng, shape):
    """Values in [0.5, 2] with random signs: safe denominators."""
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


# -- un-broadcasting: the two cases of the notes and leading dimensions -------------------


def test_unbroadcast_row_vector_sums_columns():
    g = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(unbroadcast(g, (2,)), [4.0, 6.0])  # case 1: Y of shape (2,)


def test_unbroadcast_column_vector_sums_rows():
    g = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(unbroadcast(g, (2, 1)), [[3.0], [7.0]])  # case 2: (2, 1)


def test_unbroadcast_leading_and_inner_axes():
    g = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    np.testing.assert_array_equal(unbroadcast(g, (1, 4)), g.sum(axis=(0, 1))[None, :])
    np.testing.assert_array_equal(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2))[:, None])
    np.testing.assert_array_equal(unbroadcast(g, ()), g.sum())


# -- elementwise arithmetic with broadcasting ----------------------------------------------


@pytest.mark.parametrize("op", ["+", "-", "*", "/"])
@OPS
@given(pairs, seeds)
def test_binary_ops_broadcast_like_torch(op, shapes_, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shapes_.input_shapes[0])
    shape_b = shapes_.input_shapes[1]
    b = away_from_zero(rng, shape_b) if op == "/" else rng.standard_normal(shape_b)
    fn = {"+": lambda x, y: x + y, "-": lambda x, y: x - y,
          "*": lambda x, y: x * y, "/": lambda x, y: x / y}[op]
    out = compare(fn, fn, [a, b], rng)
    assert out.shape == shapes_.result_shape


@pytest.mark.parametrize("op", ["radd", "rsub", "rmul", "rdiv", "neg"])
@OPS
@given(shapes, seeds, st.floats(-3, 3))
def test_ops_with_python_numbers_like_torch(op, shape, seed, c):
    rng = np.random.default_rng(seed)
    a = away_from_zero(rng, shape)
    fn = {"radd": lambda x: c + x, "rsub": lambda x: c - x, "rmul": lambda x: c * x,
          "rdiv": lambda x: c / x, "neg": lambda x: -x}[op]
    compare(fn, fn, [a], rng)


@OPS
@given(shapes, seeds, st.sampled_from([-2, -1, -0.5, 0, 0.5, 1, 2, 3, 2.5]))
def test_pow_with_a_number_like_torch(shape, seed, exponent):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, shape)
    compare(lambda x: x ** exponent, lambda x: x ** exponent, [a], rng)


# -- matrix multiplication ---------------------------------------------------------------


@st.composite
def matmul_shapes(draw):
    """Left and right shapes for matmul: vectors or batched matrices with broadcast batches."""
    batch = draw(mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3))
    n, k, m = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    left = (k,) if draw(st.integers(0, 5)) == 0 else (*batch.input_shapes[0], n, k)
    right = (k,) if draw(st.integers(0, 5)) == 0 else (*batch.input_shapes[1], k, m)
    return left, right


@OPS
@given(matmul_shapes(), seeds)
def test_matmul_batched_and_broadcast_like_torch(shapes_, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(s) for s in shapes_)
    compare(lambda x, y: x @ y, lambda x, y: x @ y, [a, b], rng)


@OPS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), seeds)
def test_matmul_shared_weight_like_torch(b, t, k, m, seed):
    rng = np.random.default_rng(seed)  # (B, T, K) @ (K, M): the fast path for the weight
    x, w = rng.standard_normal((b, t, k)), rng.standard_normal((k, m))
    compare(lambda x_, w_: x_ @ w_, lambda x_, w_: x_ @ w_, [x, w], rng)


# -- reductions and shapes ---------------------------------------------------------------


@st.composite
def shape_and_axes(draw):
    shape = draw(shapes_1d)
    axes = draw(st.lists(st.integers(-len(shape), len(shape) - 1), unique_by=lambda a: a % len(shape),
                         max_size=len(shape)))
    axis = None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))
    return shape, axis, draw(st.booleans())


@pytest.mark.parametrize("op", ["sum", "mean"])
@OPS
@given(shape_and_axes(), seeds)
def test_sum_and_mean_over_axes_like_torch(op, case, seed):
    shape, axis, keepdims = case
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    dim = list(range(len(shape))) if axis is None else axis

    def ours(x):
        return getattr(x, op)(axis=axis, keepdims=keepdims)

    def theirs(x):
        return getattr(x, op)(dim=dim, keepdim=keepdims)

    compare(ours, theirs, [a], rng)


@OPS
@given(shapes, seeds, st.data())
def test_reshape_like_torch(shape, seed, data):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    size = a.size
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    first = data.draw(st.sampled_from(divisors))
    new_shape = data.draw(st.sampled_from([(size,), (first, size // first), (first, -1), (-1, 1, first)]))
    if -1 in new_shape and size % first:
        return
    compare(lambda x: x.reshape(new_shape), lambda x: x.reshape(new_shape), [a], rng)


@OPS
@given(shapes_1d, seeds, st.data())
def test_permute_and_transpose_like_torch(shape, seed, data):  # both ops in every example
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    perm = data.draw(st.permutations(range(len(shape))))
    compare(lambda x: x.permute(*perm), lambda x: x.permute(*perm), [a], rng)
    d0 = data.draw(st.integers(-len(shape), len(shape) - 1))
    d1 = data.draw(st.integers(-len(shape), len(shape) - 1))
    compare(lambda x: x.transpose(d0, d1), lambda x: x.transpose(d0, d1), [a], rng)


@OPS
@given(shapes_1d, seeds, st.data())
def test_indexing_basic_and_advanced_like_torch(shape, seed, data):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    n = shape[0]
    kind = data.draw(st.sampled_from(["int", "slice", "array", "rows_cols", "ellipsis"]))
    if kind == "int":
        index = data.draw(st.integers(-n, n - 1))
    elif kind == "slice":
        index = slice(data.draw(st.integers(0, n)), None, data.draw(st.integers(1, 2)))
    elif kind == "array":  # repeats allowed: their gradients must add up
        index = rng.integers(-n, n, size=data.draw(st.integers(1, 6)))
    elif kind == "rows_cols" and len(shape) >= 2:
        k = data.draw(st.integers(1, 5))
        index = (rng.integers(0, n, k), rng.integers(0, shape[1], k))
    else:
        index = (Ellipsis, data.draw(st.integers(0, shape[-1] - 1)))

    def theirs(x):
        if isinstance(index, np.ndarray):
            return x[torch.from_numpy(index)]
        if isinstance(index, tuple) and isinstance(index[0], np.ndarray):
            return x[tuple(torch.from_numpy(i) for i in index)]
        return x[index]

    compare(lambda x: x[index], theirs, [a], rng)


@OPS
@given(shapes, seeds)
def test_masked_fill_like_torch(shape, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    mask = np.asarray(rng.random(shape[-1:]) < 0.5)  # broadcast over the leading axes
    compare(lambda x: x.masked_fill(mask, -7.0),
            lambda x: x.masked_fill(torch.from_numpy(mask), -7.0), [a], rng)


# -- elementwise functions -----------------------------------------------------------------


UNARY = {
    "exp": (lambda x: x.exp(), torch.exp),
    "log": (lambda x: x.log(), torch.log),
    "tanh": (lambda x: x.tanh(), torch.tanh),
    "sigmoid": (lambda x: x.sigmoid(), torch.sigmoid),
    "relu": (F.relu, torch.relu),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), lambda x: torch.nn.functional.leaky_relu(x, 0.1)),
    "gelu": (F.gelu, lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@OPS
@given(shapes, seeds)
def test_elementwise_functions_like_torch(name, shape, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.1, 3.0, shape) if name == "log" else 3 * rng.standard_normal(shape)
    compare(*UNARY[name], [a], rng)


# -- softmax, log-softmax, cross-entropy ---------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@OPS
@given(shapes_1d, seeds, st.data())
def test_softmax_and_log_softmax_like_torch(name, shape, seed, data):
    rng = np.random.default_rng(seed)
    a = 5 * rng.standard_normal(shape) + data.draw(st.sampled_from([0.0, 500.0]))  # no overflow
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    compare(lambda x: getattr(F, name)(x, axis=axis),
            lambda x: getattr(torch, name)(x, dim=axis), [a], rng)


@OPS
@given(array_shapes(min_dims=0, max_dims=2, max_side=5), st.integers(1, 7), seeds)
def test_cross_entropy_with_integer_targets_like_torch(lead, n_classes, seed):
    rng = np.random.default_rng(seed)
    logits = 3 * rng.standard_normal((*lead, n_classes))
    targets = rng.integers(0, n_classes, lead)
    t_targets = torch.from_numpy(targets)

    def theirs(z):
        return torch.nn.functional.cross_entropy(z.reshape(-1, n_classes), t_targets.reshape(-1))

    compare(lambda z: F.cross_entropy(z, targets), theirs, [logits], rng)


def test_cross_entropy_gradient_is_p_minus_y_over_n():
    z = Tensor(np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]), requires_grad=True)
    F.cross_entropy(z, np.array([1, 2])).backward()
    p = np.exp(z.data) / np.exp(z.data).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(z.grad, (p - np.eye(3)[[1, 2]]) / 2)


def test_softmax_of_huge_logits_is_finite():
    p = F.softmax(Tensor([1000.0, 1001.0]))
    np.testing.assert_allclose(p.data, [1 / (1 + np.e), np.e / (1 + np.e)])


# -- layers as functions -----------------------------------------------------------------


@OPS
@given(array_shapes(min_dims=1, max_dims=3, max_side=4), st.integers(2, 6), seeds)
def test_layer_norm_like_torch(lead, n_ch, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n_ch)) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)
    w, b = rng.standard_normal(n_ch), rng.standard_normal(n_ch)
    compare(lambda x_, w_, b_: F.layer_norm(x_, w_, b_),
            lambda x_, w_, b_: torch.nn.functional.layer_norm(x_, (n_ch,), w_, b_), [x, w, b], rng)


@OPS
@given(array_shapes(min_dims=0, max_dims=3, max_side=4), st.integers(1, 5), st.integers(1, 4), seeds)
def test_linear_like_torch(lead, c_in, c_out, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, c_in))
    w, b = rng.standard_normal((c_in, c_out)), rng.standard_normal(c_out)
    compare(F.linear, lambda x_, w_, b_: torch.nn.functional.linear(x_, w_.T, b_), [x, w, b], rng)


@OPS
@given(array_shapes(min_dims=0, max_dims=3, max_side=5), st.integers(1, 6), st.integers(1, 4), seeds)
def test_embedding_with_repeated_indices_like_torch(idx_shape, n_rows, dim, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_rows, idx_shape)
    weight = rng.standard_normal((n_rows, dim))
    compare(lambda w: F.embedding(idx, w),
            lambda w: torch.nn.functional.embedding(torch.from_numpy(idx), w), [weight], rng)


@OPS
@given(shapes, seeds, st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout_scales_kept_elements_and_their_gradients(shape, seed, p):
    rng = np.random.default_rng(seed)
    x = Tensor(rng.uniform(1.0, 2.0, shape), requires_grad=True)
    out = F.dropout(x, p, training=True, rng=np.random.default_rng(seed))
    kept = out.data != 0
    np.testing.assert_allclose(out.data[kept], x.data[kept] / (1 - p))
    out.backward(np.ones(shape))
    np.testing.assert_allclose(x.grad, kept / (1 - p))
    # the same mask applied in torch gives the same gradient
    tx = torch.tensor(x.data, requires_grad=True)
    (tx * torch.tensor(kept / (1 - p))).sum().backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy())


def test_dropout_is_identity_in_eval_mode_and_drops_about_p():
    x = Tensor(np.ones(10_000), requires_grad=True)
    assert F.dropout(x, 0.3, training=False) is x
    out = F.dropout(x, 0.3, rng=np.random.default_rng(0))
    assert abs((out.data == 0).mean() - 0.3) < 0.02


# -- composite graphs and the backward machinery -------------------------------------------


@OPS
@given(pairs, seeds)
def test_composite_expression_with_shared_inputs_like_torch(shapes_, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(s) for s in shapes_.input_shapes)

    def fn(x, y):  # x and y each used several times: their gradients must add up
        z = (x * y).tanh() + x.exp() * 0.5 - y * y
        return (z * x).sigmoid() + z

    compare(fn, fn, [a, b], rng)


def test_gradients_accumulate_over_backward_calls_like_torch():
    x = Tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * x.data)  # 2 x, twice
    x.zero_grad()
    assert x.grad is None


def test_inputs_without_requires_grad_get_no_gradient():
    x, w = Tensor(np.ones((2, 3))), Tensor(np.ones((3, 1)), requires_grad=True)
    (x @ w).sum().backward()
    assert x.grad is None and w.grad is not None


def test_no_grad_records_no_graph():
    x = Tensor([1.0, 2.0], requires_grad=True)
    with no_grad():
        y = (x * 2).exp().sum()
    assert not y.requires_grad and y._prev == ()
    z = x.sum()  # recording is back after the block
    assert z.requires_grad


def test_backward_works_on_a_chain_of_100k_tensor_operations():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x
    for _ in range(100_000):  # 100k nodes, each depending on the previous one
        y = -y
    (y * Tensor([3.0, 5.0])).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 5.0])  # an even number of sign flips
    np.testing.assert_array_equal(y.data, [1.0, 2.0])


def test_float32_stays_float32_through_ops_and_gradients():
    x = Tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    w = Tensor(np.ones((3, 4), dtype=np.float32), requires_grad=True)
    out = F.gelu(F.layer_norm(x @ w * 0.5 + 1.0))
    loss = F.cross_entropy(out, np.array([0, 3]))
    loss.backward()
    assert out.dtype == np.float32 and loss.dtype == np.float32
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


# -- bad input ---------------------------------------------------------------------------


def test_shapes_that_cannot_broadcast_raise_a_clear_error():
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(4,\) cannot be broadcast"):
        Tensor(np.ones((2, 3))) + Tensor(np.ones(4))


def test_matmul_with_mismatched_shapes_raises_a_clear_error():
    with pytest.raises(ValueError, match=r"matmul shapes \(2, 3\) @ \(4, 5\) do not match"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match="batch dimensions"):
        Tensor(np.ones((2, 2, 3))) @ Tensor(np.ones((3, 3, 1)))


def test_backward_on_a_non_scalar_without_gradient_raises():
    y = Tensor(np.ones((2, 3)), requires_grad=True) * 2
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\) needs a gradient"):
        y.backward()
    with pytest.raises(ValueError, match="gradient has shape"):
        y.backward(np.ones(3))


def test_backward_without_any_graph_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (Tensor([1.0]) * 2).sum().backward()


@pytest.mark.parametrize("bad", ["abc", None, {"a": 1}, [1 + 2j]])
def test_tensors_of_unsupported_types_raise_type_error(bad):
    with pytest.raises(TypeError, match="Tensor needs numbers"):
        Tensor(bad)


@pytest.mark.parametrize("bad", ["abc", [1.0, 2.0], None])
def test_ops_with_unsupported_operands_raise_type_error(bad):
    with pytest.raises(TypeError, match="unsupported operand"):
        Tensor([1.0, 2.0]) + bad
    with pytest.raises(TypeError, match="unsupported operand"):
        Tensor([1.0, 2.0]) * bad


def test_other_bad_inputs_raise_clear_errors():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(TypeError, match="exponent must be"):
        x ** x
    with pytest.raises(ValueError, match="cannot reshape"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        x.sum(axis=2)
    with pytest.raises(TypeError, match="integer class indices"):
        F.cross_entropy(x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="target 3 is out of range for 3 classes"):
        F.cross_entropy(x, np.array([0, 3]))
    with pytest.raises(ValueError, match="targets of shape"):
        F.cross_entropy(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="index 5 is out of range"):
        F.embedding(np.array([5]), x)
    with pytest.raises(TypeError, match="only floating tensors"):
        Tensor(np.array([1, 2]), requires_grad=True, dtype=np.int64)
    with pytest.raises(ValueError, match="does not broadcast"):
        x.masked_fill(np.ones(4, dtype=bool), 0.0)
    with pytest.raises(ValueError, match="dropout p"):
        F.dropout(x, 1.0)
