"""The scalar engine (Value), its MLP and its graph drawing, against torch.autograd in float64."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from companion.autodiff import MLP, Value, draw_graph, no_grad, zero_grad  # noqa: E402
from companion.toy_data import make_circles, make_moons, make_spirals  # noqa: E402

OPS = settings(max_examples=200, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
reals = st.floats(-3.0, 3.0, allow_nan=False)
away_from_zero = st.one_of(st.floats(-3.0, -0.2), st.floats(0.2, 3.0))
positive = st.floats(0.1, 3.0)




def both(fn, *xs):
    """fn on Values and on float64 torch scalars; returns (ours, theirs) after backward."""
    vs = [Value(x) for x in xs]
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    out, t_out = fn(*vs), fn(*ts)
    out.backward()
    t_out.backward()
    assert math.isclose(out.data, t_out.item(), rel_tol=1e-12, abs_tol=1e-12)
    for v, t in zip(vs, ts):
        expected = 0.0 if t.grad is None else t.grad.item()
        assert math.isclose(v.grad, expected, rel_tol=1e-10, abs_tol=1e-12), (v.grad, expected)
    return vs, ts


BINARY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "mixed": lambda a, b: (a * b + a) / (b * b + 1) - 2.0 * a,
}


@pytest.mark.parametrize("name", sorted(BINARY))
@OPS
@given(reals, away_from_zero)
def test_binary_ops_like_torch(name, a, b):
    both(BINARY[name], a, b)


UNARY = {
    "exp": (lambda x: x.exp(), reals),
    "log": (lambda x: x.log(), positive),
    "tanh": (lambda x: x.tanh(), reals),
    "sigmoid": (lambda x: x.sigmoid(), st.floats(-30.0, 30.0)),
    "relu": (lambda x: x.relu(), away_from_zero),
    "leaky_relu": (lambda x: x.leaky_relu(0.1), away_from_zero),
}
LEAKY_TORCH = {"leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, 0.1)}


@pytest.mark.parametrize("name", sorted(UNARY))
@OPS
@given(st.data())
def test_unary_functions_like_torch(name, data):
    ours, values = UNARY[name]
    x = data.draw(values)
    v = Value(x)
    out = ours(v)
    out.backward()
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    t_out = LEAKY_TORCH[name](t) if name in LEAKY_TORCH else ours(t)
    t_out.backward()
    assert math.isclose(out.data, t_out.item(), rel_tol=1e-12, abs_tol=1e-14)
    assert math.isclose(v.grad, t.grad.item(), rel_tol=1e-10, abs_tol=1e-14)


@OPS
@given(positive, st.sampled_from([-2, -1, -0.5, 0, 0.5, 1, 2, 3, 1.5]))
def test_pow_with_a_number_like_torch(a, exponent):
    both(lambda x: x ** exponent, a)


@pytest.mark.parametrize("name", ["radd", "rsub", "rmul", "rdiv"])
@OPS
@given(reals, away_from_zero)
def test_numbers_on_the_left_like_torch(name, c, b):
    fn = {"radd": lambda x: c + x, "rsub": lambda x: c - x,
          "rmul": lambda x: c * x, "rdiv": lambda x: c / x}[name]
    both(fn, b)


@st.composite
def programs(draw):
    """A random straight-line program over three inputs: each step reads earlier results."""
    steps = []
    for i in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(["+", "*", "-", "tanh", "sigmoid", "sq"]))
        steps.append((op, draw(st.integers(0, 2 + i)), draw(st.integers(0, 2 + i))))
    return steps


def run_program(steps, x, y, z):
    pool = [x, y, z]
    for op, i, j in steps:
        a, b = pool[i], pool[j]
        pool.append({"+": lambda: a + b, "*": lambda: a * b, "-": lambda: a - b,
                     "tanh": lambda: a.tanh(), "sigmoid": lambda: a.sigmoid(),
                     "sq": lambda: a ** 2}[op]())
    return pool[-1] + pool[-2] * 0.5


@OPS
@given(programs(), reals, reals, reals)
def test_random_expressions_with_shared_nodes_like_torch(steps, x, y, z):
    """Values reused many times: their gradients must add up along every path."""
    pool = [Value(v) for v in (x, y, z)]
    if max(abs(v.data) for v in pool) > 1.5:  # keep products of many steps moderate
        pool = [Value(v.data / 2) for v in pool]
    try:
        out = run_program(steps, *pool)
    except OverflowError:  # Python floats raise where torch returns inf
        assume(False)
    out.backward()
    # Repeated squaring can overflow; such programs test the floating point, not the engine.
    assume(all(math.isfinite(v) and abs(v) < 1e6 for v in [out.data] + [p.grad for p in pool]))
    ts = [torch.tensor(v.data, dtype=torch.float64, requires_grad=True) for v in pool]
    t_out = run_program(steps, *ts)
    t_out.backward()
    assert math.isclose(out.data, t_out.item(), rel_tol=1e-9, abs_tol=1e-9)
    for v, t in zip(pool, ts):
        expected = 0.0 if t.grad is None else t.grad.item()
        assert math.isclose(v.grad, expected, rel_tol=1e-8, abs_tol=1e-9)


def test_the_worked_example_of_the_chapter():
    a, b = Value(2.0), Value(-3.0)
    c = a * b + a.exp()
    c.backward()
    assert b.grad == 2.0 and math.isclose(a.grad, -3.0 + math.exp(2.0))


def test_gradients_accumulate_and_zero_grad_resets_them():
    x = Value(3.0)
    y = x * x
    y.backward()
    y.backward()  # leaves accumulate, like torch; the intermediate nodes do not
    assert x.grad == 12.0
    zero_grad([x])
    assert x.grad == 0.0
    y.backward()
    assert x.grad == 6.0


def test_no_grad_records_no_graph():
    x = Value(2.0)
    with no_grad():
        y = (x * x).exp() + 1
    assert y._prev == () and y._op == ""
    y.backward()
    assert x.grad == 0.0
    assert (x * x)._prev  # recording is back after the block


def test_no_grad_works_as_a_decorator_and_nests():
    from companion.autodiff import is_grad_enabled

    @no_grad()
    def inner():
        with no_grad():
            pass
        return is_grad_enabled()

    assert inner() is False
    assert is_grad_enabled()


def test_backward_handles_a_chain_of_100k_additions():
    x = Value(1.0)
    y = x
    for _ in range(100_000):
        y = y + x
    y.backward()
    assert y.data == 100_001.0 and x.grad == 100_001.0


@pytest.mark.parametrize("bad", ["1.0", None, [1.0], True, 1 + 2j])
def test_unsupported_types_raise_clear_errors(bad):
    with pytest.raises(TypeError):
        Value(bad)
    with pytest.raises(TypeError, match="unsupported operand"):
        Value(1.0) + bad
    with pytest.raises(TypeError, match="unsupported operand"):
        Value(1.0) * bad


def test_bad_arithmetic_raises_clear_errors():
    with pytest.raises(TypeError, match="exponent must be an int or a float"):
        Value(2.0) ** Value(2.0)
    with pytest.raises(ValueError, match="log of a non-positive number"):
        Value(0.0).log()
    with pytest.raises(ZeroDivisionError):
        Value(1.0) / 0
    with pytest.raises(ValueError, match="negative base"):
        Value(-2.0) ** 0.5


# -- the MLP -----------------------------------------------------------------------------


def torch_mlp_from(mlp):
    """A torch MLP holding the same weights as a scalar MLP."""
    layers = []
    for layer in mlp.layers:
        w = torch.tensor([[p.data for p in n.w] for n in layer.neurons], dtype=torch.float64)
        b = torch.tensor([n.b.data for n in layer.neurons], dtype=torch.float64)
        layers.append((w.requires_grad_(), b.requires_grad_(), layer.neurons[0].activation))
    return layers


def test_mlp_output_and_gradients_equal_torch():
    mlp = MLP(2, [5, 4, 1], activation="tanh", seed=3)
    X, y = make_moons(8, seed=1)
    labels = 2 * y - 1
    loss = sum(((1 + (-int(t) * mlp(list(x))).exp()).log() for x, t in zip(X, labels)), Value(0.0))
    loss.backward()

    layers = torch_mlp_from(mlp)
    h = torch.tensor(X)
    for w, b, act in layers:
        h = h @ w.T + b
        h = torch.tanh(h) if act == "tanh" else h
    t_loss = torch.log(1 + torch.exp(-torch.tensor(labels, dtype=torch.float64) * h[:, 0])).sum()
    t_loss.backward()
    assert math.isclose(loss.data, t_loss.item(), rel_tol=1e-12)
    ours = [p.grad for p in mlp.parameters()]
    theirs = []
    for w, b, _ in layers:
        for i in range(w.shape[0]):
            theirs += [*w.grad[i].tolist(), b.grad[i].item()]
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_mlp_training_lowers_the_loss():
    mlp = MLP(2, [8, 1], activation="tanh", seed=0)
    X, y = make_moons(20, noise=0.1, seed=0)
    labels = 2 * y - 1

    def loss_fn():
        return sum(((1 + (-int(t) * mlp(list(x))).exp()).log() for x, t in zip(X, labels)),
                   Value(0.0)) / len(X)

    first = loss_fn()
    for _ in range(30):
        loss = loss_fn()
        mlp.zero_grad()
        loss.backward()
        for p in mlp.parameters():
            p.data -= 0.5 * p.grad
    assert loss_fn().data < 0.7 * first.data


def test_mlp_sizes_and_errors():
    mlp = MLP(3, [4, 2], seed=0)
    assert len(mlp.parameters()) == 4 * (3 + 1) + 2 * (4 + 1)
    assert len(mlp([1.0, 2.0, 3.0])) == 2
    with pytest.raises(ValueError, match="takes 3 inputs, got 2"):
        mlp([1.0, 2.0])
    with pytest.raises(ValueError, match="activation"):
        MLP(2, [1], activation="swish")


# -- drawing and toy data ------------------------------------------------------------------


def test_draw_graph_shows_every_node_with_its_gradient():
    a, b = Value(2.0, label="a"), Value(-3.0, label="b")
    c = a * b
    c.label = "c"
    c.backward()
    ax = draw_graph(c)
    texts = [t.get_text() for t in ax.texts]
    assert "a\ndata 2.0000\ngrad -3.0000" in texts
    assert "c\ndata -6.0000\ngrad 1.0000" in texts
    assert "*" in texts
    matplotlib.pyplot.close(ax.figure)


@pytest.mark.parametrize("make", [make_moons, make_circles, make_spirals])
def test_toy_data_sets_are_balanced_and_repeatable(make):
    X, y = make(51, seed=7)
    assert X.shape == (51, 2) and X.dtype == np.float64
    assert y.dtype == np.int64 and y.sum() == 26
    X2, y2 = make(51, seed=7)
    np.testing.assert_array_equal(X, X2)
    assert not np.array_equal(X, make(51, seed=8)[0])
    with pytest.raises(ValueError, match="n=1"):
        make(1)
