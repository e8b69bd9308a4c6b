"""Hidden tests for chapter 7's exercises."""

from companion.grading import hidden


@hidden("my_causal_attention")
def test_causal_attention_float64_other_shape(my_causal_attention):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(70)
    # as in the model: (B, T, H, D) transposed to (B, H, T, D), so not contiguous
    q, k, v = (torch.randn(2, 9, 3, 4, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expect_same(my_causal_attention(q, k, v), expected, "float64 inputs of shape (2, 3, 9, 4), T > D",
                atol=1e-10, rtol=1e-8)


@hidden("my_causal_attention")
def test_causal_attention_huge_scores(my_causal_attention):
    import torch
    import torch.nn.functional as F
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(71)
    q = torch.randn(1, 2, 6, 8, generator=g) * 30
    k = torch.randn(1, 2, 6, 8, generator=g) * 30
    v = torch.randn(1, 2, 6, 8, generator=g)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True).float()
    got = my_causal_attention(q, k, v)
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
        raise AssertionError("scores in the hundreds (q and k scaled by 30): the output contains nan or inf")
    expect_same(got, expected, "scores in the hundreds (q and k scaled by 30), float32", atol=1e-4, rtol=1e-4)


@hidden("my_causal_attention")
def test_causal_attention_equal_keys_and_causality(my_causal_attention):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(72)
    B, H, T, D = 2, 2, 5, 3
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.ones(B, H, T, D)  # every key the same: each position averages the values it may see
    v = torch.randn(B, H, T, D, generator=g)
    running_mean = v.cumsum(dim=-2) / torch.arange(1, T + 1, dtype=v.dtype)[:, None]
    expect_same(my_causal_attention(q, k, v), running_mean,
                "all keys equal: position t must be the mean of the values 0..t")
    k2 = torch.randn(B, H, T, D, generator=g)
    before = my_causal_attention(q, k2, v)
    k3, v3 = k2.clone(), v.clone()
    k3[..., -1, :] += 5.0
    v3[..., -1, :] -= 7.0
    after = my_causal_attention(q, k3, v3)
    expect_same(after[..., :-1, :], before[..., :-1, :],
                "changing the last position's key and value must not change the earlier positions' outputs")


@hidden("my_causal_attention")
def test_causal_attention_own_code(my_causal_attention):
    import torch
    import torch.nn.functional as F
    import companion.gpt
    from companion.grading import expect_same, forbidding
    if my_causal_attention is companion.gpt.causal_attention:
        raise AssertionError("my_causal_attention is companion's causal_attention itself: "
                             "this exercise asks for your own code")
    g = torch.Generator().manual_seed(73)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=g) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with forbidding(my_causal_attention, "torch.nn.functional.scaled_dot_product_attention",
                    "companion.gpt.causal_attention"):
        got = my_causal_attention(q, k, v)
    expect_same(got, expected, "random (2, 2, 7, 4) inputs, without scaled_dot_product_attention")


@hidden("my_lr")
def test_lr_boundaries(my_lr):
    import math
    from companion.grading import expect_same
    mx, mn, w, d = 6e-4, 6e-5, 10, 50
    cases = [
        (0, mx / w, "step 0: the first warmup step is max_lr * 1 / warmup_steps"),
        (4, mx * 5 / w, "step 4, inside the warmup"),
        (9, mx, "step 9, the last warmup step reaches max_lr"),
        (10, mx, "step 10 = warmup_steps: the cosine starts at max_lr"),
        (30, (mx + mn) / 2, "step 30, halfway through the decay: (max_lr + min_lr) / 2"),
        (49, mn + (mx - mn) * (1 + math.cos(math.pi * 39 / 40)) / 2, "step 49, the last decay step"),
        (50, mn, "step 50 = decay_steps: min_lr"),
        (10 ** 6, mn, "step 1000000, long after decay_steps: min_lr"),
    ]
    for step, expected, case in cases:
        try:
            got = my_lr(step, mx, mn, w, d)
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"my_lr({step}, {mx}, {mn}, {w}, {d}) raised {type(err).__name__}: {err}") from err
        expect_same(got, expected, f"{case} (max_lr={mx}, min_lr={mn}, warmup_steps={w}, decay_steps={d})",
                    atol=1e-15, rtol=1e-9)


@hidden("my_lr")
def test_lr_whole_schedule(my_lr):
    from companion.grading import expect_same
    from companion.train import lr_at
    mx, mn, w, d = 1.0, 0.1, 7, 113
    for step in range(0, 131):
        expect_same(my_lr(step, mx, mn, w, d), lr_at(step, mx, mn, w, d),
                    f"step {step} of max_lr={mx}, min_lr={mn}, warmup_steps={w}, decay_steps={d}",
                    atol=1e-12, rtol=1e-9)


@hidden("my_lr")
def test_lr_edge_settings(my_lr):
    from companion.grading import expect_same
    cases = [
        ((0, 2e-3, 2e-4, 1, 20), 2e-3, "warmup_steps=1: step 0 is already max_lr"),
        ((3, 5e-4, 5e-4, 2, 9), 5e-4, "min_lr = max_lr: the rate is flat after warmup"),
        ((4, 1e-3, 1e-4, 5, 5), 1e-3, "warmup_steps = decay_steps = 5, step 4: the end of warmup"),
        ((5, 1e-3, 1e-4, 5, 5), 1e-4, "warmup_steps = decay_steps = 5, step 5: no decay phase, min_lr"),
        ((0, 3e-4, 0.0, 0, 1), 3e-4, "no warmup, decay_steps=1: step 0 is max_lr"),
    ]
    for args, expected, case in cases:
        try:
            got = my_lr(*args)
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"{case}: my_lr{args} raised {type(err).__name__}: {err}") from err
        expect_same(got, expected, f"{case}: my_lr{args}", atol=1e-15, rtol=1e-9)


@hidden("my_lr")
def test_lr_own_code(my_lr):
    import math
    import companion.train
    from companion.grading import expect_same, forbidding
    if my_lr is companion.train.lr_at:
        raise AssertionError("my_lr is companion's lr_at itself: this exercise asks for your own code")
    mx, mn, w, d = 3e-3, 3e-4, 20, 220
    expected = mn + (mx - mn) * (1 + math.cos(math.pi * 0.25)) / 2
    with forbidding(my_lr, "companion.train.lr_at"):
        got = my_lr(70, mx, mn, w, d)
    expect_same(got, expected, "step 70 of a 20-step warmup and 220-step decay, without companion's lr_at",
                atol=1e-15, rtol=1e-9)


@hidden("decay_split")
def test_decay_split_mixed_module(decay_split):
    import torch
    from torch import nn
    from companion.grading import expect_same

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)         # 66 decayed
            self.norm = nn.LayerNorm(6)            # 6 + 6 not decayed
            self.conv = nn.Conv1d(6, 4, 3)         # weight (4, 6, 3): 72 decayed; bias 4 not
            self.head = nn.Linear(6, 11)           # weight tied to emb (counted once); bias 11 not
            self.head.weight = self.emb.weight
            self.scale = nn.Parameter(torch.tensor(2.0))   # 0-dimensional: 1 not decayed
            self.register_buffer("mask", torch.ones(5, 5))  # a buffer, not a parameter

    expect_same(tuple(decay_split(Mixed())), (138, 28),
                "embedding tied to a linear head, LayerNorm, Conv1d (3-D weight), a 0-d parameter and a buffer")


@hidden("decay_split")
def test_decay_split_small_modules(decay_split):
    from torch import nn
    from companion.grading import expect_same
    expect_same(tuple(decay_split(nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3, bias=False)))),
                (56, 21), "Linear(5, 7), LayerNorm(7), Linear(7, 3, bias=False)")
    expect_same(tuple(decay_split(nn.LayerNorm(8))), (0, 16), "LayerNorm(8) alone: nothing to decay")
    expect_same(tuple(decay_split(nn.ReLU())), (0, 0), "a module without parameters")


@hidden("decay_split")
def test_decay_split_other_gpt(decay_split):
    import torch
    from companion.grading import expect_same
    from companion.gpt import GPT, GPTConfig
    torch.manual_seed(74)
    model = GPT(GPTConfig(vocab_size=37, n_positions=16, n_embd=24, n_layer=3, n_head=4, bias=False))
    seen, decayed, other = set(), 0, 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2:
            decayed += p.numel()
        else:
            other += p.numel()
    expect_same(tuple(decay_split(model)), (decayed, other),
                "a GPT with vocab 37, 16 positions, 24 channels, 3 layers, no biases (tied head counted once)")


@hidden("decay_split")
def test_decay_split_own_code(decay_split):
    from torch import nn
    from companion.grading import expect_same, forbidding
    model = nn.Sequential(nn.Embedding(9, 4), nn.LayerNorm(4), nn.Linear(4, 9))
    with forbidding(decay_split, "companion.train.configure_optimizer"):
        got = decay_split(model)
    expect_same(tuple(got), (72, 17), "Embedding(9, 4), LayerNorm(4), Linear(4, 9), without configure_optimizer")


@hidden("my_top_p")
def test_top_p_small_cases(my_top_p):
    import torch
    from companion.grading import expect_same
    inf = float("-inf")
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    for p, keep in ((0.45, [False, True, False]), (0.79, [False, True, True]), (0.81, [True, True, True])):
        expected = logits.masked_fill(~torch.tensor([keep]), inf)
        case = f"probabilities [0.2, 0.5, 0.3], p={p}: the smallest set reaching p (the crossing token is kept)"
        got = my_top_p(logits, p)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:  # name the kept tokens first
            for r in range(expected.shape[0]):
                g_keep = torch.isfinite(got[r]).nonzero().flatten().tolist()
                e_keep = torch.isfinite(expected[r]).nonzero().flatten().tolist()
                if g_keep != e_keep:
                    raise AssertionError(f"{case}: row {r} keeps tokens {g_keep}, expected {e_keep}")
        expect_same(got, expected, case)
    one = torch.tensor([[1.5], [-3.0]])
    expect_same(my_top_p(one, 0.5), one, "a vocabulary of one token (shape (2, 1)): it is always kept")


@hidden("my_top_p")
def test_top_p_rows_and_ties(my_top_p):
    import torch
    from companion.grading import expect_same
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0, 0.0],   # one token has 0.9997: it alone reaches 0.9
                           [0.0, 0.0, 0.0, 0.0, 0.0],    # five equal tokens: all five needed for 0.9
                           [0.0, 2.0, 4.0, 1.0, 3.0]])
    got = my_top_p(logits, 0.9)
    # row 2: sorted probabilities 0.636, 0.234, 0.086, 0.032, 0.012: the first three reach 0.9
    inf = float("-inf")
    expected = torch.tensor([[10.0, inf, inf, inf, inf],
                             [0.0, 0.0, 0.0, 0.0, 0.0],
                             [inf, 2.0, 4.0, inf, 3.0]])
    case = "a batch of three rows (peaked, flat, spread), p=0.9: each row on its own"
    if isinstance(got, torch.Tensor) and got.shape == expected.shape:  # name the kept tokens first
        for r in range(expected.shape[0]):
            g_keep = torch.isfinite(got[r]).nonzero().flatten().tolist()
            e_keep = torch.isfinite(expected[r]).nonzero().flatten().tolist()
            if g_keep != e_keep:
                raise AssertionError(f"{case}: row {r} keeps tokens {g_keep}, expected {e_keep}")
    expect_same(got, expected, case)
    for p, n in ((0.2, 1), (0.3, 2), (0.5, 2)):
        kept = int(torch.isfinite(my_top_p(torch.zeros(1, 4), p)).sum())
        if kept != n:
            raise AssertionError(f"four tied tokens of probability 0.25, p={p}: expected {n} kept, got {kept}")


@hidden("my_top_p")
def test_top_p_float64_and_large_logits(my_top_p):
    import torch
    from companion.generation.sampling import top_p_filter
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(75)
    logits = torch.randn(5, 50, generator=g, dtype=torch.float64) * 2
    big = torch.randn(4, 30, generator=g) * 100
    for x, p, case in ((logits, 0.6, "float64 logits of shape (5, 50), p=0.6"),
                       (logits, 1.0, "float64 logits of shape (5, 50), p=1.0: every token is kept"),
                       (big, 0.95, "logits in the hundreds, shape (4, 30), p=0.95")):
        expected = top_p_filter(x, p)
        got = my_top_p(x, p)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:  # name the kept tokens first
            for r in range(expected.shape[0]):
                g_keep = torch.isfinite(got[r]).nonzero().flatten().tolist()
                e_keep = torch.isfinite(expected[r]).nonzero().flatten().tolist()
                if g_keep != e_keep:
                    raise AssertionError(f"{case}: row {r} keeps tokens {g_keep}, expected {e_keep}")
        expect_same(got, expected, case)


@hidden("my_top_p")
def test_top_p_own_code(my_top_p):
    import torch
    import companion.generation.sampling
    from companion.grading import expect_same, forbidding
    if my_top_p is companion.generation.sampling.top_p_filter:
        raise AssertionError("my_top_p is companion's top_p_filter itself: this exercise asks for your own code")
    g = torch.Generator().manual_seed(76)
    logits = torch.randn(3, 40, generator=g) * 2
    expected = companion.generation.sampling.top_p_filter(logits, 0.7)
    with forbidding(my_top_p, "companion.generation.sampling.top_p_filter"):
        got = my_top_p(logits, 0.7)
    case = "random (3, 40) logits, p=0.7, without companion's top_p_filter"
    if isinstance(got, torch.Tensor) and got.shape == expected.shape:  # name the kept tokens first
        for r in range(expected.shape[0]):
            g_keep = torch.isfinite(got[r]).nonzero().flatten().tolist()
            e_keep = torch.isfinite(expected[r]).nonzero().flatten().tolist()
            if g_keep != e_keep:
                raise AssertionError(f"{case}: row {r} keeps tokens {g_keep}, expected {e_keep}")
    expect_same(got, expected, case)
