"""One input row times an int8 or int4 matrix, as Triton kernels: the GPU's decoding step.

Decoding multiplies one row of activations by every weight matrix, so its time is the time to
read the matrices. :mod:`companion.quantize` stores them in fewer bytes; these kernels read
those bytes once and never write a float copy of the matrix:

* :func:`int8_gemv`: ``y = scales * (qweight @ x)``, ``qweight`` int8 ``(N, K)``. One program
  per ``block_n`` rows walks the row in blocks of ``block_k`` inputs, converts each int8 to
  float32 in registers, multiplies by ``x`` and keeps ``block_n x block_k`` partial sums,
  which it adds up once at the end: the scale of a row multiplies one sum, not every weight.
* :func:`int4_gemv`: the packed format of :func:`companion.quantize.pack_int4` (byte ``j``
  holds value ``2j`` in its low 4 bits and ``2j + 1`` in its high 4 bits), with a scale and a
  minimum per group of ``g`` inputs. In a group, ``sum_i (q_i s + m) x_i = s sum_i q_i x_i +
  m sum_i x_i``: each program loads ``block_g`` groups of bytes at a time as a ``(block_n,
  block_g, g/2)`` block, splits every byte into its two values, multiplies them by the even
  and the odd inputs, and sums each group before its scale and minimum touch it.

Both accumulate in float32 and return ``x``'s dtype. Why kernels of our own: with the layers'
``one_row_forward`` (the same sums written as PyTorch operations) compiled by Inductor into
reductions of its own, our int8 and int4 models decoded on an H200 at 25% and 8% of its
bandwidth, slower than the bfloat16 model they should beat, which reached 63-67%
(``benchmarks/results/decode_quant_gpu_h200.txt``). These kernels have been checked in the
interpreter only; ``benchmarks/gemv.py`` and ``benchmarks/gpu.sh`` time them on a GPU.

As in :mod:`companion.flash_triton`, without a GPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them; on a GPU they are registered as
PyTorch operators (``torch.library.triton_op``, torch >= 2.6), which ``torch.compile`` can
keep inside a compiled step and its CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Triton is optional: its import, the decorator that needs it, the dtypes, and whether its
# kernels run in the interpreter, from companion.flash_triton
from companion.flash_triton import _DTYPES, _jit, interpreted, tl, triton

__all__ = ["available", "int4_gemv", "int8_gemv", "interpreted", "takes"]


def available() -> bool:
    """Whether Triton is installed, so that the kernels can run."""
    return triton is not None


@_jit
def _int8_gemv_kernel(q_ptr, scale_ptr, x_ptr, y_ptr, N, K,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        col_ok = cols < K
        w = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * scale
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@_jit
def _int4_gemv_kernel(q_ptr, scale_ptr, min_ptr, x_ptr, y_ptr, N, row_stride, G,
                      HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    # HALF = g / 2: the bytes of one group. Value 2j of a row is the low half of its byte j.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    j = tl.arange(0, HALF)  # byte within a group
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
        group_ok = groups < G
        byte = groups[:, None] * HALF + j[None, :]  # (BLOCK_G, HALF): byte index within a row
        ok = row_ok[:, None, None] & group_ok[None, :, None]
        b = tl.load(q_ptr + rows[:, None, None] * row_stride + byte[None, :, :], mask=ok, other=0)
        low = (b & 15).to(tl.float32)  # values 2j
        high = (b >> 4).to(tl.float32)  # values 2j + 1
        x_even = tl.load(x_ptr + 2 * byte, mask=group_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + 2 * byte + 1, mask=group_ok[:, None], other=0.0).to(tl.float32)
        dots = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)  # (BLOCK_N, BLOCK_G)
        x_sums = tl.sum(x_even + x_odd, axis=1)  # (BLOCK_G,)
        at = rows[:, None] * G + groups[None, :]
        sg_ok = row_ok[:, None] & group_ok[None, :]
        scale = tl.load(scale_ptr + at, mask=sg_ok, other=0.0).to(tl.float32)
        minimum = tl.load(min_ptr + at, mask=sg_ok, other=0.0).to(tl.float32)
        acc += dots * scale + minimum * x_sums[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


_INTERPRETED = interpreted()  # decided when Triton was imported; a constant for torch.compile's tracing


def takes(x: Tensor) -> bool:
    """Whether a quantized layer sends ``x`` to these kernels: one row on a GPU, compiled
    kernels (not the interpreter), a dtype they take. Triton compiles for NVIDIA GPUs of
    compute capability 7.0 and up; on older ones set the layers' ``gpu_kernel`` to False."""
    return (x.device.type == "cuda" and x.numel() == x.size(-1) and available() and not _INTERPRETED
            and x.dtype in _DTYPES)


def _power_of_two(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two (tl.arange's rule)")


def _check_x(x: Tensor, K: int, device: torch.device) -> Tensor:
    if not available():
        raise ImportError("companion.quant_triton needs Triton: pip install triton (Linux), or use "
                          "the layers' one_row_forward, the same sums in plain PyTorch")
    if x.numel() != K or x.size(-1) != K:
        raise ValueError(f"x must be one row of {K} inputs, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}: the kernels take float32, float16 or bfloat16")
    if x.device != device:
        raise ValueError(f"x is on {x.device} and the matrix on {device}: expected one device")
    if device.type == "cpu" and not interpreted():
        raise RuntimeError("the tensors are on the CPU, where Triton kernels run only in Triton's "
                           "interpreter: set TRITON_INTERPRET=1 before anything imports triton, "
                           "or move them to a GPU")
    if interpreted() and x.dtype == torch.bfloat16:
        raise ValueError("Triton's interpreter does not compute in bfloat16: check the kernels in "
                         "float32 or float16, run bfloat16 on a GPU")
    return x.reshape(K).contiguous()


def _int8_gemv(qweight: Tensor, scales: Tensor, x: Tensor, block_n: int, block_k: int) -> Tensor:
    N, K = qweight.shape
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    launch = _wrap(_int8_gemv_kernel)
    launch[(triton.cdiv(N, block_n),)](qweight, scales, x, y, N, K, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def _int4_gemv(qweight: Tensor, scales: Tensor, mins: Tensor, x: Tensor, block_n: int, block_g: int) -> Tensor:
    N, G = scales.shape
    K = 2 * qweight.size(1)
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    launch = _wrap(_int4_gemv_kernel)
    launch[(triton.cdiv(N, block_n),)](qweight, scales, mins, x, y, N, qweight.stride(0), G, HALF=K // G // 2,
                                       BLOCK_N=block_n, BLOCK_G=block_g)
    return y


def _wrap(kernel: object) -> object:
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None or interpreted() else wrap(kernel)


# On a GPU, as operators: torch.compile then calls the kernels inside its graph rather than
# breaking the graph around a Python launch.
if available() and hasattr(torch.library, "triton_op"):
    _int8_op = torch.library.triton_op("companion::int8_gemv_triton", _int8_gemv, mutates_args=())
    _int4_op = torch.library.triton_op("companion::int4_gemv_triton", _int4_gemv, mutates_args=())
else:
    _int8_op, _int4_op = _int8_gemv, _int4_gemv


def int8_gemv(qweight: Tensor, scales: Tensor, x: Tensor, *, block_n: int = 8, block_k: int = 512) -> Tensor:
    """``scales * (qweight @ x)`` for one row ``x`` (``K`` inputs, any shape ``(..., K)`` holding one row).

    ``qweight`` int8 ``(N, K)``, ``scales`` ``(N,)``. Returns ``(N,)`` in ``x``'s dtype,
    summed in float32.
    """
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be an int8 (N, K) matrix, got {qweight.dtype} of shape {tuple(qweight.shape)}")
    N, K = qweight.shape
    if scales.shape != (N,):
        raise ValueError(f"scales has shape {tuple(scales.shape)}; expected ({N},), one per row")
    _power_of_two("block_n", block_n)
    _power_of_two("block_k", block_k)
    x = _check_x(x, K, qweight.device)
    return _int8_op(qweight.contiguous(), scales.contiguous(), x, block_n, block_k)


def int4_gemv(qweight: Tensor, scales: Tensor, mins: Tensor, x: Tensor, *, block_n: int = 8,
              block_g: int | None = None) -> Tensor:
    """``sum over groups of (scale * sum_i q_i x_i + min * sum_i x_i)`` for one row ``x``.

    ``qweight`` uint8 ``(N, K/2)`` (:func:`companion.quantize.pack_int4`), ``scales`` and
    ``mins`` ``(N, G)``; the group size ``K / G`` is 32, 64 or 128. ``block_g`` groups are
    read per step (default: 512 inputs' worth). Returns ``(N,)`` in ``x``'s dtype.
    """
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a uint8 (N, K/2) matrix, got {qweight.dtype} of shape {tuple(qweight.shape)}")
    N, K = qweight.size(0), 2 * qweight.size(1)
    if scales.dim() != 2 or scales.size(0) != N or mins.shape != scales.shape:
        raise ValueError(f"scales {tuple(scales.shape)} and mins {tuple(mins.shape)} must both be ({N}, G)")
    G = scales.size(1)
    if G == 0 or K % G or K // G not in (32, 64, 128):
        raise ValueError(f"{K} inputs in {G} groups: the group size must be 32, 64 or 128")
    block_g = block_g or max(1, 512 // (K // G))
    _power_of_two("block_n", block_n)
    _power_of_two("block_g", block_g)
    x = _check_x(x, K, qweight.device)
    return _int4_op(qweight.contiguous(), scales.contiguous(), mins.contiguous(), x, block_n, block_g)
