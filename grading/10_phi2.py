"""Hidden tests for chapter 10's exercises (Phi-2)."""

from companion.grading import hidden


@hidden("fused_projections")
def test_fused_projections_widths_and_biases(fused_projections):
    import torch
    from torch import nn
    from companion.grading import expect_same
    torch.manual_seed(100)
    cases = [
        ([nn.Linear(10, 3), nn.Linear(10, 1, bias=False), nn.Linear(10, 6), nn.Linear(10, 2, bias=False)],
         (4, 10), "four layers of widths 3, 1, 6, 2, the second and the last without a bias"),
        ([nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False)], (2, 3, 5), "two layers, no biases at all"),
        ([nn.Linear(3, 9)], (3,), "one layer, an input without a batch dimension"),
        ([nn.Linear(4, 2), nn.Linear(4, 2)], (1, 1, 1, 4), "an input (1, 1, 1, 4)"),
    ]
    with torch.no_grad():
        for layers, shape, case in cases:
            for layer in layers:
                for p in layer.parameters():
                    p.normal_()
            h = torch.randn(*shape)
            got = fused_projections(h, layers)
            expect_same(list(got) if isinstance(got, (list, tuple)) else got, [layer(h) for layer in layers], case)


@hidden("fused_projections")
def test_fused_projections_float64_phi_shapes(fused_projections):
    import torch
    from torch import nn
    from companion.grading import expect_same
    torch.manual_seed(101)
    C = 16
    layers = [nn.Linear(C, C, dtype=torch.float64) for _ in range(3)] + [nn.Linear(C, 4 * C, dtype=torch.float64)]
    h = torch.randn(2, 9, C, dtype=torch.float64)
    with torch.no_grad():
        got = fused_projections(h, layers)
        expected = [layer(h) for layer in layers]
    expect_same(list(got) if isinstance(got, (list, tuple)) else got, expected,
                "float64: q, k, v (16 -> 16) and fc1 (16 -> 64) of a Phi block, input (2, 9, 16)", atol=1e-10)


@hidden("fused_projections")
def test_fused_projections_one_product(fused_projections):
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode
    from companion.grading import expect_same

    products = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.mv", "aten.addmv", "aten.dot",
                "aten.vdot", "aten._weight_int8pack_mm")

    class CountProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(products):
                self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(102)
    layers = [nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 32)]
    h = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = [layer(h) for layer in layers]
        with CountProducts() as counter:
            got = fused_projections(h, layers)
    expect_same(list(got) if isinstance(got, (list, tuple)) else got, expected, "Phi's four input projections")
    if len(counter.calls) != 1:
        raise AssertionError(f"four layers took {len(counter.calls)} matrix products ({counter.calls}); "
                             "the exercise asks for one")


@hidden("fold_layernorm")
def test_fold_layernorm_gives_the_same_outputs(fold_layernorm):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(103)
    for C, N, case in [(8, 3, "C=8 into N=3"), (5, 12, "C=5 into N=12, wider than it is tall"), (1, 2, "C=1")]:
        gamma, beta = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
        w, b = torch.randn(N, C, generator=gen), torch.randn(N, generator=gen)
        x = torch.randn(6, C, generator=gen) * 3 + 1
        expected = F.linear(F.layer_norm(x, (C,), gamma, beta), w, b)
        got = fold_layernorm(gamma, beta, w, b)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise AssertionError(f"{case}: expected a (weight, bias) pair, got {type(got).__name__}")
        expect_same(F.linear(F.layer_norm(x, (C,)), got[0], got[1]), expected, f"{case}: the layer's outputs",
                    atol=1e-4)


@hidden("fold_layernorm")
def test_fold_layernorm_by_hand(fold_layernorm):
    import torch
    from companion.grading import expect_same
    gamma, beta = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    w, b = torch.tensor([[1.0, 3.0], [4.0, 0.0]]), torch.tensor([10.0, 20.0])
    got = fold_layernorm(gamma, beta, w, b)
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                (torch.tensor([[2.0, -3.0], [8.0, 0.0]]), torch.tensor([13.5, 22.0])),
                "gamma [2, -1], beta [0.5, 1], W [[1, 3], [4, 0]], b [10, 20]: column c scaled by gamma_c, "
                "b + W beta")
    before = [t.clone() for t in (gamma, beta, w, b)]
    fold_layernorm(gamma, beta, w, b)
    expect_same([gamma, beta, w, b], before, "the inputs must not be changed in place")


@hidden("fold_layernorm")
def test_fold_layernorm_missing_parts(fold_layernorm):
    import torch
    from companion.grading import expect_same
    w = torch.tensor([[1.0, 3.0], [4.0, 0.0]])
    cases = [
        ((torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]), w, None),
         (torch.tensor([[2.0, -3.0], [8.0, 0.0]]), torch.tensor([3.5, 2.0])), "a layer without a bias: W beta"),
        ((None, None, w, torch.tensor([1.0, 2.0])), (w, torch.tensor([1.0, 2.0])),
         "a norm without weight or bias: nothing to fold"),
        ((torch.tensor([2.0, -1.0]), None, w, None), (torch.tensor([[2.0, -3.0], [8.0, 0.0]]), torch.zeros(2)),
         "a norm without a bias and a layer without one: the bias is zeros, not None"),
        ((None, torch.tensor([1.0, 1.0]), w, None), (w, torch.tensor([4.0, 4.0])),
         "a norm with a bias but no weight"),
    ]
    for args, expected, case in cases:
        got = fold_layernorm(*args)
        expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, expected, case)


@hidden("fold_layernorm")
def test_fold_layernorm_float64(fold_layernorm):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(104)
    gamma, beta = (torch.randn(9, generator=gen, dtype=torch.float64) for _ in range(2))
    w, b = torch.randn(4, 9, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    got = fold_layernorm(gamma, beta, w, b)
    expect_same(F.linear(F.layer_norm(x, (9,)), got[0], got[1]), F.linear(F.layer_norm(x, (9,), gamma, beta), w, b),
                "float64 norm and layer: the outputs, in float64", atol=1e-10)


@hidden("gelu_tanh_grad")
def test_gelu_tanh_grad_values(gelu_tanh_grad):
    import math
    import torch
    from companion.grading import expect_same
    c = math.sqrt(2 / math.pi)
    for x in (0.0, 1.0, -1.0, 2.5, -0.3):
        t = math.tanh(c * (x + 0.044715 * x**3))
        expected = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        expect_same(gelu_tanh_grad(torch.tensor([x], dtype=torch.float64)), torch.tensor([expected], dtype=torch.float64),
                    f"x = {x} in float64", atol=1e-12)


@hidden("gelu_tanh_grad")
def test_gelu_tanh_grad_far_out_and_shapes(gelu_tanh_grad):
    import torch
    from companion.grading import expect_same
    far = torch.tensor([50.0, -50.0, 1e3, -1e3, 1e4, -1e4])
    got = gelu_tanh_grad(far)
    if isinstance(got, torch.Tensor) and got.isnan().any():
        raise AssertionError(f"x = {far.tolist()}: the derivative has NaN: {got.tolist()}")
    expect_same(got, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]), "far from 0: 1 on the right, 0 on the left")
    expect_same(gelu_tanh_grad(torch.tensor(0.0)), torch.tensor(0.5), "a 0-dimensional tensor at 0: 0.5")
    expect_same(gelu_tanh_grad(torch.zeros(2, 0)), torch.zeros(2, 0), "an empty (2, 0) tensor")


@hidden("gelu_tanh_grad")
def test_gelu_tanh_grad_against_autograd(gelu_tanh_grad):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(105)
    x = torch.randn(4, 5, 6, generator=gen) * 4
    leaf = x.clone().requires_grad_(True)
    F.gelu(leaf, approximate="tanh").sum().backward()
    expect_same(gelu_tanh_grad(x), leaf.grad, "random (4, 5, 6) inputs against autograd")


@hidden("gelu_tanh_grad")
def test_gelu_tanh_grad_own_code(gelu_tanh_grad):
    import torch
    from companion.grading import expect_same, forbidding
    x = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    torch.nn.functional.gelu(leaf, approximate="tanh").sum().backward()
    with forbidding(gelu_tanh_grad, "torch.autograd.grad", "torch.autograd.backward", "torch.Tensor.backward",
                    "torch.func.grad", "torch.func.vjp", "torch.func.jacrev", "torch.autograd.functional.jacobian",
                    "torch.autograd.functional.vjp"):
        got = gelu_tanh_grad(x)
    expect_same(got, leaf.grad, "x = [-2, 0, 2], without autograd")
