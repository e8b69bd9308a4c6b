"""Hidden tests for chapter 7's exercises."""

from companion.grading import hidden


@hidden("repetition_penalty")
def test_repetition_penalty_signs_and_repeats(repetition_penalty):
    import torch
    from companion.grading import expect_same
    logits = torch.tensor([[4.0, -2.0, 0.0, 1.0, -0.5],
                           [4.0, -2.0, 0.0, 1.0, -0.5]])
    history = torch.tensor([[0, 0, 0, 1, 2],    # token 0 three times, 1 (negative) and 2 (zero) once
                            [4, 4, 4, 4, 4]])   # only token 4, five times
    expected = torch.tensor([[2.0, -4.0, 0.0, 1.0, -0.5],
                             [4.0, -2.0, 0.0, 1.0, -1.0]])
    expect_same(repetition_penalty(logits, history, 2.0), expected,
                "penalty 2: a positive logit seen three times is halved once, a negative one doubled, 0 stays 0")


@hidden("repetition_penalty")
def test_repetition_penalty_rows_empty_and_one(repetition_penalty):
    import torch
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(77)
    logits = torch.randn(3, 7, generator=g)
    expect_same(repetition_penalty(logits, torch.zeros(3, 0, dtype=torch.long), 1.7), logits,
                "an empty history, shape (3, 0): nothing changes")
    history = torch.tensor([[1, 2], [5, 6], [0, 0]])
    expect_same(repetition_penalty(logits, history, 1.0), logits, "penalty 1.0: nothing changes")
    got = repetition_penalty(logits, torch.tensor([[3], [3], [3]]), 1.5)
    expected = logits.clone()
    expected[:, 3] = torch.where(logits[:, 3] > 0, logits[:, 3] / 1.5, logits[:, 3] * 1.5)
    expect_same(got, expected, "history [[3], [3], [3]]: only column 3 changes, in every row")
    got = repetition_penalty(logits, torch.tensor([[0], [1], [2]]), 1.5)
    for r, j in enumerate((0, 1, 2)):
        untouched = [c for c in range(7) if c != j]
        expect_same(got[r, untouched], logits[r, untouched],
                    f"row {r} has history [{j}]: its other tokens, and other rows' histories, leave it alone")


@hidden("repetition_penalty")
def test_repetition_penalty_float64_against_hugging_face(repetition_penalty):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(78)
    logits = torch.randn(4, 50, generator=g, dtype=torch.float64) * 5
    history = torch.randint(0, 50, (4, 30), generator=g)
    for penalty in (1.3, 0.8):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        expect_same(repetition_penalty(logits, history, penalty), expected,
                    f"float64 logits (4, 50), histories of 30 ids with repeats, penalty {penalty}")


@hidden("repetition_penalty")
def test_repetition_penalty_own_code(repetition_penalty):
    import torch
    from companion.grading import expect_same, forbidding
    logits = torch.tensor([[3.0, -3.0, 1.0]])
    with forbidding(repetition_penalty,
                    "transformers.generation.logits_process.RepetitionPenaltyLogitsProcessor.__call__"):
        got = repetition_penalty(logits, torch.tensor([[0, 1]]), 3.0)
    expect_same(got, torch.tensor([[1.0, -9.0, 1.0]]), "penalty 3, without Hugging Face's processor")


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


@hidden("clip_global_norm")
def test_clip_global_norm_not_per_tensor(clip_global_norm):
    import torch
    from companion.grading import expect_same
    grads = [torch.tensor([3.0]), torch.tensor([[4.0]])]
    got = clip_global_norm(grads, 1.0)
    scale = 1.0 / (5.0 + 1e-6)
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                ([torch.tensor([3.0 * scale]), torch.tensor([[4.0 * scale]])], 5.0),
                "gradients [3] and [[4]], max_norm 1: the global norm is 5, both shrink by the same factor")
    big = [torch.full((10,), 100.0), torch.tensor([0.01, -0.01])]
    clipped, norm = clip_global_norm(big, 2.0)
    expect_same(clipped[1], big[1] * 2.0 / (norm + 1e-6),
                "one huge tensor and one tiny one: the tiny one shrinks with it")


@hidden("clip_global_norm")
def test_clip_global_norm_zero_and_below(clip_global_norm):
    import torch
    from companion.grading import expect_same
    zeros = [torch.zeros(3), torch.zeros(2, 2)]
    clipped, norm = clip_global_norm(zeros, 1.0)
    expect_same(clipped, [torch.zeros(3), torch.zeros(2, 2)], "all gradients zero: zeros again, no NaN")
    expect_same(norm, 0.0, "all gradients zero: the norm is 0")
    g = torch.Generator().manual_seed(79)
    small = [torch.randn(4, 3, generator=g) * 0.01, torch.randn(5, generator=g) * 0.01]
    before = [s.clone() for s in small]
    clipped, _ = clip_global_norm(small, 1.0)
    expect_same(clipped, before, "a norm far below max_norm: the gradients come back unchanged (not scaled up)")
    large = [s * 1000 for s in small]
    kept = [s.clone() for s in large]
    clip_global_norm(large, 1.0)
    expect_same(large, kept, "a norm above max_norm: the input tensors must not be changed in place")


@hidden("clip_global_norm")
def test_clip_global_norm_none_scalar_float64_empty(clip_global_norm):
    import torch
    from torch import nn
    from companion.grading import expect_same
    g = torch.Generator().manual_seed(80)
    grads = [torch.randn(3, generator=g, dtype=torch.float64) * 10, None, torch.tensor(7.0, dtype=torch.float64)]
    params = [nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2)),
              nn.Parameter(torch.zeros((), dtype=torch.float64))]
    for p, gr in zip(params, grads):
        p.grad = None if gr is None else gr.clone()
    norm = nn.utils.clip_grad_norm_(params, 3.0).item()
    expect_same(clip_global_norm(grads, 3.0), ([params[0].grad, None, params[2].grad], norm),
                "float64 gradients, a None in the middle and a 0-dimensional gradient, max_norm 3")
    got = clip_global_norm([], 1.0)
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got, ([], 0.0), "an empty list: ([], 0.0)")


@hidden("clip_global_norm")
def test_clip_global_norm_own_code(clip_global_norm):
    import torch
    from companion.grading import expect_same, forbidding
    grads = [torch.tensor([6.0, 8.0])]
    with forbidding(clip_global_norm, "torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad.clip_grad_norm_",
                    "torch.nn.utils.get_total_norm", "torch.nn.utils.clip_grads_with_norm_"):
        got = clip_global_norm(grads, 5.0)
    scale = 5.0 / (10.0 + 1e-6)
    expect_same(tuple(got) if isinstance(got, (tuple, list)) else got,
                ([torch.tensor([6.0 * scale, 8.0 * scale])], 10.0),
                "gradient [6, 8], max_norm 5, without torch's clip_grad_norm_")


@hidden("my_top_p")
def test_top_p_ties_are_kept(my_top_p):
    import torch
    from companion.grading import expect_same
    inf = float("-inf")
    for p in (0.2, 0.3, 0.5, 0.9):
        expect_same(my_top_p(torch.zeros(2, 4), p, 1.0), torch.zeros(2, 4),
                    f"four equal logits, p={p}: every token is tied with the one that reaches p, all stay")
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])  # probabilities 0.69, 0.09, 0.09, 0.09, 0.03
    expect_same(my_top_p(logits, 0.75, 1.0), torch.tensor([[3.0, 1.0, 1.0, 1.0, inf]]),
                "logits [3, 1, 1, 1, 0], p=0.75: the token that reaches p has two equal rivals, all three stay")
    expect_same(my_top_p(logits, 0.6, 1.0), torch.tensor([[3.0, inf, inf, inf, inf]]),
                "logits [3, 1, 1, 1, 0], p=0.6: the first token alone reaches p")


@hidden("my_top_p")
def test_top_p_temperature(my_top_p):
    import torch
    from companion.grading import expect_same
    inf = float("-inf")
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    expect_same(my_top_p(logits, 0.75, 1.0), torch.cat([logits[:, :2], torch.tensor([[inf]])], 1),
                "probabilities [0.6, 0.3, 0.1], p=0.75, temperature 1: two tokens")
    expect_same(my_top_p(logits, 0.75, 0.5), torch.cat([logits[:, :1] / 0.5, torch.tensor([[inf, inf]])], 1),
                "the same at temperature 0.5 (probabilities 0.78, 0.20, 0.02): one token, logits divided by 0.5")
    expect_same(my_top_p(logits, 0.75, 4.0), logits / 4.0,
                "the same at temperature 4 (probabilities 0.40, 0.34, 0.26): all three, logits divided by 4")


@hidden("my_top_p")
def test_top_p_edges(my_top_p):
    import torch
    from companion.grading import expect_same
    inf = float("-inf")
    one = torch.tensor([[1.5], [-3.0]])
    expect_same(my_top_p(one, 0.3, 1.0), one, "a vocabulary of one token, shape (2, 1): it always stays")
    spread = torch.tensor([[30.0, 0.0, -10.0, inf], [0.0, 1.0, 2.0, 3.0]])
    expect_same(my_top_p(spread, 1.0, 1.0), spread,
                "p=1: every token stays, even where the sum rounds to 1 after the first token; -inf stays -inf")
    g = torch.Generator().manual_seed(81)
    x = torch.randn(4, 40, generator=g, dtype=torch.float64) * 2
    got = my_top_p(x, 0.7, 1.5)
    if isinstance(got, torch.Tensor) and got.dtype != torch.float64:
        raise AssertionError(f"float64 logits: expected float64 back, got {got.dtype}")
    scaled = x / 1.5
    for r in range(4):
        probs = torch.softmax(scaled[r], -1)
        order = probs.argsort(descending=True)
        n = int((probs[order].cumsum(0) < 0.7).sum()) + 1
        expected = scaled[r].masked_fill(scaled[r] < scaled[r, order[n - 1]], inf)
        expect_same(got[r], expected, f"float64 logits (4, 40), p=0.7, temperature 1.5: row {r}")


@hidden("my_top_p")
def test_top_p_own_code(my_top_p):
    import torch
    import companion.generation.sampling
    from companion.grading import expect_same, forbidding
    if my_top_p is companion.generation.sampling.top_p_filter:
        raise AssertionError("my_top_p is companion's top_p_filter itself: this exercise asks for your own code")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, -1.0]])
    with forbidding(my_top_p, "companion.generation.sampling.top_p_filter",
                    "companion.generation.sampling.sample_next"):
        got = my_top_p(logits, 0.3, 1.0)
    expect_same(got, torch.tensor([[0.0, 0.0, 0.0, 0.0, float("-inf")]]),
                "four equal logits and a lower one, p=0.3, without companion's top_p_filter")
