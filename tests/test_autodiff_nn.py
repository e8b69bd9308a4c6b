"""Layers and optimizers of the tensor engine against torch.nn and torch.optim (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from companion.autodiff import Tensor, nn, optim

OPS = settings(max_examples=200, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)




def test_module_finds_parameters_with_dotted_names():
    mlp = nn.MLP(3, [4, 2], activation="gelu", rng=np.random.default_rng(0))
    names = [name for name, _ in mlp.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]
    assert mlp.num_parameters() == 3 * 4 + 4 + 4 * 2 + 2


def test_train_and_eval_switch_dropout_everywhere():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5)))
    model.eval()
    assert not model.layers[1].training and not model.layers[2].layers[0].training
    x = Tensor(np.ones((3, 4)))
    np.testing.assert_array_equal(model(x).data, model(x).data)  # deterministic in eval
    model.train()
    assert model.layers[2].layers[0].training


@OPS
@given(array_shapes(min_dims=1, max_dims=3, max_side=4), st.integers(1, 5), st.integers(1, 5), seeds)
def test_linear_layer_equals_torch_linear(lead, c_in, c_out, seed):
    rng = np.random.default_rng(seed)
    layer = nn.Linear(c_in, c_out, rng=rng)
    t_layer = torch.nn.Linear(c_in, c_out, dtype=torch.float64)
    with torch.no_grad():  # torch stores the weight transposed: (C_out, C_in)
        t_layer.weight.copy_(torch.from_numpy(layer.weight.data.T))
        t_layer.bias.copy_(torch.from_numpy(layer.bias.data))
    x = rng.standard_normal((*lead, c_in))
    out, t_out = layer(Tensor(x)), t_layer(torch.from_numpy(x))
    np.testing.assert_allclose(out.data, t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    t_out.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.weight.grad, t_layer.weight.grad.numpy().T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, t_layer.bias.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_layer_norm_and_embedding_modules_equal_torch():
    rng = np.random.default_rng(0)
    emb, ln = nn.Embedding(7, 5, rng=rng), nn.LayerNorm(5)
    t_emb = torch.nn.Embedding(7, 5, dtype=torch.float64)
    t_ln = torch.nn.LayerNorm(5, dtype=torch.float64)
    with torch.no_grad():
        t_emb.weight.copy_(torch.from_numpy(emb.weight.data))
    idx = rng.integers(0, 7, (3, 4))
    out = ln(emb(idx))
    t_out = t_ln(t_emb(torch.from_numpy(idx)))
    np.testing.assert_allclose(out.data, t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    t_out.backward(torch.from_numpy(g))
    np.testing.assert_allclose(emb.weight.grad, t_emb.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ln.weight.grad, t_ln.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ln.bias.grad, t_ln.bias.grad.numpy(), rtol=1e-10, atol=1e-12)


# -- optimizers --------------------------------------------------------------------------


def run_both(make_ours, make_torch, shapes, seed, steps=6):
    """Same parameters and the same gradients each step; the parameters must stay equal."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in shapes]
    ours = [Tensor(a, requires_grad=True) for a in init]
    theirs = [torch.tensor(a, requires_grad=True) for a in init]
    opt, t_opt = make_ours(ours), make_torch(theirs)
    for _ in range(steps):
        for p, t in zip(ours, theirs):
            g = rng.standard_normal(p.shape)
            p.grad, t.grad = g, torch.from_numpy(g.copy())
        opt.step()
        t_opt.step()
        for p, t in zip(ours, theirs):
            np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-13)


param_shapes = st.lists(array_shapes(min_dims=0, max_dims=3, max_side=4), min_size=1, max_size=3)


@OPS
@given(param_shapes, seeds, st.sampled_from([0.0, 0.9]), st.sampled_from([0.0, 0.1]))
def test_sgd_with_momentum_equals_torch(shapes, seed, momentum, wd):
    run_both(lambda ps: optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=wd),
             lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=wd),
             shapes, seed)


@OPS
@given(param_shapes, seeds, st.sampled_from([0.0, 0.1]))
def test_adam_equals_torch(shapes, seed, wd):
    run_both(lambda ps: optim.Adam(ps, lr=0.01, weight_decay=wd),
             lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=wd), shapes, seed)


@OPS
@given(param_shapes, seeds, st.sampled_from([0.0, 0.01, 0.3]), st.sampled_from([(0.9, 0.999), (0.8, 0.95)]))
def test_adamw_equals_torch(shapes, seed, wd, betas):
    run_both(lambda ps: optim.AdamW(ps, lr=0.01, betas=betas, weight_decay=wd),
             lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=betas, weight_decay=wd), shapes, seed)


def test_optimizer_skips_parameters_without_gradient_and_zero_grad_clears():
    a, b = Tensor([1.0], requires_grad=True), Tensor([2.0], requires_grad=True)
    opt = optim.AdamW([a, b], lr=0.1)
    a.grad = np.array([1.0])
    opt.step()
    assert b.data[0] == 2.0 and a.data[0] != 1.0
    opt.zero_grad()
    assert a.grad is None


def test_optimizer_bad_input_raises():
    with pytest.raises(ValueError, match="empty list of parameters"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="lr=-1"):
        optim.Adam([Tensor([1.0], requires_grad=True)], lr=-1)
    with pytest.raises(TypeError, match="requires_grad=True"):
        optim.SGD([Tensor([1.0])], lr=0.1)


def test_parameters_own_their_data():
    source = np.zeros(3)
    p = Tensor(source, requires_grad=True)
    p.grad = np.ones(3)
    optim.SGD([p], lr=1.0).step()
    assert source.tolist() == [0.0, 0.0, 0.0] and p.data.tolist() == [-1.0, -1.0, -1.0]


def test_tensor_mlp_learns_xor():
    rng = np.random.default_rng(0)
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = np.array([0, 1, 1, 0])
    mlp = nn.MLP(2, [8, 2], activation="tanh", rng=rng)
    opt = optim.Adam(mlp.parameters(), lr=0.05)
    from companion.autodiff.functional import cross_entropy

    for _ in range(200):
        loss = cross_entropy(mlp(Tensor(X)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert (mlp(Tensor(X)).data.argmax(axis=1) == y).all()
