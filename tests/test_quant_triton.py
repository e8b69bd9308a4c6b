"""companion.quant_triton: one row times an int8 or int4 matrix, as Triton kernels.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton): the same kernel code a GPU compiles.
Oracle: the dequantized matrix (companion.quantize's formats) times the row, in float64.
Tolerance: the rounding a float32 sum of K products can reach, K * 2**-24 * sum_i |w_i x_i|
per output (and the output dtype's own rounding); a wrong nibble, group or scale is off by
orders of magnitude more.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from companion import quant_triton  # noqa: E402
from companion.quantize import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8,  # noqa: E402
                                quantize_int4, quantize_int8)

FEW = settings(max_examples=15, deadline=None)  # the interpreter runs each program in Python
# The tests build their tensors on the CPU, where the kernels run in the interpreter only.
pytestmark = pytest.mark.skipif(not quant_triton.interpreted(), reason="Triton compiles for a GPU here")


def check(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor, terms: torch.Tensor | None = None) -> None:
    """``y`` against ``w @ x`` in float64, within float32's summing error and ``y``'s own rounding.

    ``terms``: the magnitudes of what the kernel adds, where they are not ``|w|`` (int4 adds
    ``|scale q|`` and ``|min|`` separately, each larger than ``|scale q + min|`` can be).
    """
    exact = w.double() @ x.double().reshape(-1)
    magnitude = (w if terms is None else terms).double().abs() @ x.double().abs().reshape(-1)
    K = w.size(1)
    bound = K * 2**-24 * magnitude + torch.finfo(y.dtype).eps * exact.abs() + 1e-30
    err = (y.double() - exact).abs()
    assert y.shape == exact.shape and y.dtype == x.dtype
    assert (err <= bound).all(), f"largest error {err.max():.3g}, its bound {bound[err.argmax()]:.3g}"


def test_without_a_gpu_the_kernels_run_in_the_interpreter():
    assert quant_triton.interpreted() == (not torch.cuda.is_available())


@FEW
@given(N=st.integers(1, 70), K=st.integers(1, 700), block_n=st.sampled_from([1, 4, 16]),
       block_k=st.sampled_from([16, 64, 256]), seed=st.integers(0, 10**6))
def test_int8_gemv_equals_the_dequantized_product(N, K, block_n, block_k, seed):
    """Any N and K: rows and inputs that do not fill the last block are masked."""
    g = torch.Generator().manual_seed(seed)
    q, scales = quantize_int8(torch.randn(N, K, generator=g))
    x = torch.randn(1, 1, K, generator=g)
    check(quant_triton.int8_gemv(q, scales, x, block_n=block_n, block_k=block_k), dequantize_int8(q, scales), x)


@FEW
@given(N=st.integers(1, 70), group_size=st.sampled_from([32, 64, 128]), groups=st.integers(1, 9),
       block_n=st.sampled_from([1, 4, 16]), block_g=st.sampled_from([1, 2, 4, None]), seed=st.integers(0, 10**6))
def test_int4_gemv_equals_the_dequantized_product(N, group_size, groups, block_n, block_g, seed):
    """Group counts that are not a multiple of the groups read per step are masked."""
    g = torch.Generator().manual_seed(seed)
    packed, scales, mins = quantize_int4(torch.randn(N, group_size * groups, generator=g), group_size)
    x = torch.randn(group_size * groups, generator=g)
    y = quant_triton.int4_gemv(packed, scales, mins, x, block_n=block_n, block_g=block_g)
    check(y, dequantize_int4(packed, scales, mins), x, int4_terms(packed, scales, mins))


def int4_terms(packed, scales, mins):
    """``|scale q| + |min|`` per weight: the sizes of the two products the int4 kernel adds."""
    return dequantize_int4(packed, scales.abs(), torch.zeros_like(mins)) + dequantize_int4(
        torch.zeros_like(packed), torch.zeros_like(scales), mins.abs())


def test_float16_in_float16_out():
    """Scales in float16 too; the oracle dequantizes in float64, the kernels multiply in float32."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g)
    x = torch.randn(256, generator=g).half()
    q, scales = quantize_int8(w.half())
    check(quant_triton.int8_gemv(q, scales, x), dequantize_int8(q, scales.double()), x)
    packed, s4, m4 = quantize_int4(w.half(), 64)
    check(quant_triton.int4_gemv(packed, s4, m4, x), dequantize_int4(packed, s4.double(), m4.double()), x,
          int4_terms(packed, s4.double(), m4.double()))


def test_the_kernels_agree_with_the_layers_one_row_forward():
    """The layers' own one-row sums (what Inductor compiles without the kernels), same weights."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(320, 40)
    x = torch.randn(1, 1, 320)
    int8, int4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group_size=32)
    y8 = quant_triton.int8_gemv(int8.qweight, int8.scales, x) + int8.bias
    y4 = quant_triton.int4_gemv(int4.qweight, int4.scales, int4.mins, x) + int4.bias
    # each against the float64 oracle (the bias added and taken off again rounds below the bound)
    for y, layer, terms in ((y8, int8, None), (y4, int4, int4_terms(int4.qweight, int4.scales, int4.mins))):
        check(y - layer.bias, layer.dequantize_weight(), x, terms)
        check(layer.one_row_forward(x).reshape(-1) - layer.bias, layer.dequantize_weight(), x, terms)
        assert not quant_triton.takes(x)  # on a CPU the layers keep their own paths


def test_bad_input_is_named():
    q, scales = quantize_int8(torch.randn(8, 64))
    packed, s4, m4 = quantize_int4(torch.randn(8, 64), 32)
    x = torch.randn(64)
    with pytest.raises(ValueError, match="one row of 64 inputs"):
        quant_triton.int8_gemv(q, scales, torch.randn(2, 64))
    with pytest.raises(ValueError, match="int8"):
        quant_triton.int8_gemv(q.to(torch.int16), scales, x)
    with pytest.raises(ValueError, match=r"expected \(8,\)"):
        quant_triton.int8_gemv(q, scales[:4], x)
    with pytest.raises(ValueError, match="block_k=48 must be a power of two"):
        quant_triton.int8_gemv(q, scales, x, block_k=48)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quant_triton.int8_gemv(q, scales, x.double())
    with pytest.raises(ValueError, match="must both be"):
        quant_triton.int4_gemv(packed, s4, m4[:, :1], x)
    with pytest.raises(ValueError, match="group size must be 32, 64 or 128"):
        quant_triton.int4_gemv(packed, s4.repeat(1, 2), m4.repeat(1, 2), x)  # 4 groups of 16
    with pytest.raises(ValueError, match="uint8"):
        quant_triton.int4_gemv(packed.to(torch.int8), s4, m4, x)
    if quant_triton.interpreted():
        with pytest.raises(ValueError, match="does not compute in bfloat16"):
            quant_triton.int8_gemv(q, scales, x.bfloat16())


def test_without_triton_or_without_the_interpreter_the_error_says_what_to_do(monkeypatch):
    q, scales = quantize_int8(torch.randn(8, 64))
    monkeypatch.setattr(quant_triton, "interpreted", lambda: False)  # as if Triton had been imported for a GPU
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before anything imports triton"):
        quant_triton.int8_gemv(q, scales, torch.randn(64))
    monkeypatch.setattr(quant_triton, "triton", None)  # as if Triton were not installed
    with pytest.raises(ImportError, match="pip install triton"):
        quant_triton.int8_gemv(q, scales, torch.randn(64))


def test_the_benchmark_checks_every_method(capsys, monkeypatch):
    """benchmarks/gemv.py, as gpu.sh runs it on a CPU: a row per method and shape, each with its
    relative difference from the float64 product of its own weights (a GPU run prints it beside
    the times), within float32's rounding here."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gemv as bench  # noqa: PLC0415

    monkeypatch.setattr(sys, "argv", ["gemv.py", "--device", "cpu", "--shapes", "40x256", "24x384",
                                      "--block-n", "4", "--block-k", "64", "128", "--no-inductor", "--repeats", "1"])
    bench.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:6].strip().isdigit()]
    methods = ["F.linear", "int8 Triton 4x64", "int8 Triton 4x128", "int4 Triton 4"]
    assert [(row[0], " ".join(row[1:-5])) for row in rows] == [(s, m) for s in ("40x256", "24x384") for m in methods]
    assert all(float(row[-1]) < 1e-5 for row in rows), rows
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["gemv.py", "--device", "cpu", "--shapes", "40x100"])
        bench.main()
    assert "K a multiple of 128" in capsys.readouterr().err
