"""companion.flash_triton: FlashAttention's forward and backward passes as Triton kernels.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton), so the same kernel code is checked here
that a GPU compiles. Oracles: torch's scaled_dot_product_attention with an explicit mask
from the definition (test_flash.sdpa), autograd through it for the gradients, and
companion.flash, the same algorithm in plain PyTorch, for the log-sum-exp and the tiles.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from companion.flash import flash_attention_forward, tile_counts  # noqa: E402
from companion.flash_triton import (flash_attention_triton, flash_attention_triton_backward,  # noqa: E402
                                    flash_attention_triton_forward, interpreted)
from test_flash import (allowed_mask, cases, check_large_scores, inputs, large_score_inputs,  # noqa: E402
                        needed_tiles, options, sdpa)

FEW = settings(max_examples=20, deadline=None)  # the interpreter runs each program in Python


def test_without_a_gpu_the_kernels_run_in_the_interpreter():
    assert interpreted() == (not torch.cuda.is_available())


@FEW
@given(case=cases(), B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(1, 3),
       D=st.sampled_from([16, 24, 64, 80, 128]), seed=st.integers(0, 10**6))
def test_forward_and_gradients_match_sdpa(case, B, K, G, D, seed):
    """Any lengths (not multiples of the blocks, T = 1), head dims that are not powers of two."""
    q, k, v = inputs(B, K, G, case["T_q"], case["T_k"], D, seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = flash_attention_triton(q, k, v, **options(case))
    expected = sdpa(q, k, v, case["causal"], case["window"])
    assert out.shape == q.shape and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(expected, (q, k, v), dout)  # through repeat_interleave: kv grads summed over G
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (name, (a - b).abs().max())


@pytest.mark.parametrize("T_q, T_k, block_q, block_k, window", [
    (16, 17, 16, 16, None), (32, 49, 16, 16, None), (64, 65, 16, 16, None), (32, 49, 32, 16, None),
    (32, 49, 16, 32, 17), (64, 65, 16, 16, 16), (64, 65, 16, 16, 1), (64, 64, 16, 16, 2), (64, 65, 16, 16, 3),
    (1, 100, 16, 16, None), (1, 100, 16, 16, 7)])
def test_queries_at_the_end_of_a_longer_key_sequence(T_q, T_k, block_q, block_k, window):
    """Fixed causal cases where a query tile's newest key is the first key of the next key
    tile (T_k - T_q = 1 modulo the block) or a window edge falls on a tile edge: a last key
    tile one short, or a first one one late, changes the output by 1e-2 or more here."""
    q, k, v = inputs(1, 1, 2, T_q, T_k, 16, seed=T_q + T_k)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = flash_attention_triton(q, k, v, causal=True, window=window, block_q=block_q, block_k=block_k)
    expected = sdpa(q, k, v, True, window)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(T_k))
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(expected, (q, k, v), dout)):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (name, (a - b).abs().max())


def test_log_sum_exp_is_that_of_the_plain_version():
    q, k, v = inputs(2, 2, 2, 45, 70, 32, seed=1)
    out, lse = flash_attention_triton_forward(q, k, v, window=25, block_q=16, block_k=32)
    out_plain, lse_plain = flash_attention_forward(q, k, v, window=25, block_q=16, block_k=32)
    assert lse.shape == (2, 4, 45) and lse.dtype == torch.float32
    assert torch.allclose(lse, lse_plain, atol=1e-5)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-2, -1)) / 32 ** 0.5
    scores = scores.masked_fill(~allowed_mask(45, 70, True, 25), float("-inf"))
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)  # from the definition


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # other query tiles do read the poisoned keys
@pytest.mark.parametrize("causal, window", [(True, None), (True, 16), (True, 40), (False, None)])
def test_skipped_tiles_are_never_read(causal, window):
    """NaN in every key/value tile that no query needs: the kernels must not touch them, forward
    or backward, and the tiles they skip are exactly those tile_counts counts as skipped."""
    T, block = 96, 16
    q, k, v = inputs(1, 1, 1, T, T, 16, seed=2)
    needed = needed_tiles(T, T, block, block, causal, window)
    assert len(needed) == tile_counts(T, T, block, block, causal, window).computed
    # Poison each key tile in the positions of the queries that do not need it: a tile is read
    # by query tile qt only if (qt, kt) is needed, so a NaN there reaches the output otherwise.
    for qt in range(T // block):
        k_poisoned, v_poisoned = k.clone(), v.clone()
        for kt in range(T // block):
            if (qt, kt) not in needed:
                k_poisoned[..., kt * block:(kt + 1) * block, :] = float("nan")
                v_poisoned[..., kt * block:(kt + 1) * block, :] = float("nan")
        rows = slice(qt * block, (qt + 1) * block)
        q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k_poisoned, v_poisoned))
        out = flash_attention_triton(q_, k_, v_, causal=causal, window=window, block_q=block, block_k=block)
        assert torch.allclose(out[..., rows, :], sdpa(q, k, v, causal, window)[..., rows, :], atol=1e-5), qt
        dout = torch.zeros_like(out)
        dout[..., rows, :] = 1.0  # only this query tile's rows matter
        dq, _, _ = torch.autograd.grad(out, (q_, k_, v_), dout)
        assert torch.isfinite(dq[..., rows, :]).all(), qt


def test_non_contiguous_inputs_and_a_custom_scale():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 30, 4, 16, generator=g).transpose(1, 2).requires_grad_()  # (B, H, T, D) as from a model
    k = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    out = flash_attention_triton(q, k, v, window=9, block_q=16, block_k=16, scale=0.3)
    expected = sdpa(q, k, v, True, 9, scale=0.3)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, sdpa(q, k, v, True, 9), atol=1e-3)  # the scale matters
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, want))


def test_large_scores_do_not_overflow():
    q, k, v = large_score_inputs()
    check_large_scores(flash_attention_triton(q, k, v, block_q=16, block_k=16), q, k, v)


def test_float16_in_float16_out():
    q, k, v = inputs(1, 2, 2, 70, 70, 32, seed=6)
    half = [x.half().requires_grad_() for x in (q, k, v)]
    out = flash_attention_triton(*half, window=30, block_q=32, block_k=16)
    assert out.dtype == torch.float16
    expected = sdpa(*(x.detach().float() for x in half), True, 30)
    assert torch.allclose(out.float(), expected, atol=3e-3, rtol=0)  # P rounded to float16 before P @ V
    grads = torch.autograd.grad(out.float().sum(), half)
    assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)


def test_clear_errors():
    q, k, v = inputs(1, 2, 2, 20, 20, 16, seed=7)
    with pytest.raises(ValueError, match="block_q=24 must be a power of two >= 16"):
        flash_attention_triton(q, k, v, block_q=24)
    with pytest.raises(ValueError, match="block_k=8 must be a power of two >= 16"):
        flash_attention_triton(q, k, v, block_k=8)
    with pytest.raises(ValueError, match="float64"):
        flash_attention_triton(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="H=4 query heads cannot share K=3"):
        flash_attention_triton(q, torch.randn(1, 3, 20, 16), torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match="lse has shape"):
        flash_attention_triton_backward(q, q, k, v, q, torch.zeros(1, 4, 19))
    if interpreted():
        with pytest.raises(ValueError, match="bfloat16"):
            flash_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16())


def test_the_benchmark_checks_every_method_against_sdpa(capsys, monkeypatch):
    """benchmarks/attention.py, as gpu.sh runs it on a CPU: a row per method and length, and
    each method's max |difference| from SDPA (which a GPU run prints beside its timings)
    within 1e-5 here."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import attention as bench  # noqa: PLC0415

    monkeypatch.setattr(sys, "argv", ["attention.py", "--device", "cpu", "--lengths", "40", "70",
                                      "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                                      "--block-q", "16", "--block-k", "32", "--repeats", "1"])
    bench.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:6].strip().isdigit()]
    assert [(row[0], row[1]) for row in rows] == [(T, m) for T in ("40", "70") for m in ("SDPA", "triton", "tiles")]
    assert all(float(row[6]) < 1e-5 for row in rows), rows


def test_without_triton_or_without_the_interpreter_the_error_says_what_to_do(monkeypatch):
    import companion.flash_triton as module

    q, k, v = inputs(1, 1, 1, 20, 20, 16, seed=8)
    monkeypatch.setattr(module, "interpreted", lambda: False)  # as if Triton had been imported for a GPU
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before anything imports triton"):
        module.flash_attention_triton(q, k, v)
    monkeypatch.setattr(module, "triton", None)  # as if Triton were not installed
    with pytest.raises(ImportError, match="pip install triton"):
        module.flash_attention_triton(q, k, v)
