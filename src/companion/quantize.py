"""Weight-only quantization: int8 and int4 weights for Llama, Mistral and Phi.

Generating one token multiplies every weight matrix by a single row: the time goes into
reading the weights from memory, not into arithmetic (``benchmarks/decode.py`` measures it).
Fewer bytes per weight means more tokens per second. Weight-only quantization stores each
weight as a small integer plus a few floating-point scales, and turns it back into a float
(*dequantizes* it) just before multiplying; the activations stay in floating point.

Two formats, each a pure function pair and a drop-in layer:

* **int8, symmetric, one scale per output row** (:func:`quantize_int8`,
  :class:`Int8Linear`). Row ``n`` gets ``scale[n] = max|w[n, :]| / 127`` and
  ``q = round(w / scale)``, an integer in ``[-127, 127]``; then ``w ~ scale * q``. The grid
  is symmetric around 0 (``-128`` is never used), so the largest weight of a row lands
  exactly on ``+-127`` and nothing is clipped: every weight is off by at most ``scale / 2``.
  This is "absmax" quantization (Dettmers et al., 2022). torchao's ``Int8WeightOnlyConfig``
  divides by 127.5 instead and also uses ``-128`` (a step 0.4% finer, at the price of
  clipping the row's largest positive weight by half a step); ``tests/test_quantize.py``
  checks both its integers and ours against these formulas.
* **int4, asymmetric, one scale and one minimum per group** of ``group_size`` (32, 64 or
  128) consecutive inputs (:func:`quantize_int4`, :class:`Int4Linear`). With only 16 levels,
  wasting any hurts: the group's smallest weight maps to level 0 and its largest to 15,
  ``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, ``w ~ q * scale + min``
  (the ``Q4_1`` format of llama.cpp). A symmetric grid would spend levels on the side of 0
  a group does not reach and give up one level to keep 0 in the middle; the minimum costs
  one more number per group, which the fast kernel reads anyway. Error: at most
  ``scale / 2``. Two 4-bit values share a byte (:func:`pack_int4`): weight ``2j`` in the low
  4 bits, weight ``2j + 1`` in the high 4 bits.

What :func:`quantize_` replaces by default: every projection (``q_proj`` ... ``down_proj``,
``fc1``, ``dense``, ...) and the output layer ``lm_head``, which a step reads in full
(32000 x 4096 for Llama 2). Not the embedding (``include_embedding=False``): a step reads one
of its rows, so quantizing it saves memory but no time. Norms and biases stay in floating
point. :func:`dequantize` turns the layers back into float ones.

Two ways to run each layer, which tests check against each other:

* ``reference_forward``: dequantize the whole matrix, then ``F.linear``. Readable, exact in
  the model's dtype, and slow (it writes a float copy of the matrix every call).
* ``forward``, the fast path, on a CPU. With up to ``cpu_kernels.MAX_ROWS`` (64) rows
  (decoding, a short prompt), eager or compiled: the C kernels of :mod:`companion.cpu_kernels`
  (``torch.ops.companion.int8_gemv`` and ``int4_gemv``), which round each row to integers and
  multiply integers by integers, as llama.cpp does; int8 rounds it to int16 (about 3e-5 of the
  output, relative), int4 to int8 per group (about 0.5%). Where they are not available (no C
  compiler, no x86 with AVX2, ``COMPANION_NO_C_KERNELS`` set, ``cpu_kernels.enabled`` False),
  or for an int8 width that is not a multiple of 256 or a float64 model: :class:`Int8Linear`,
  compiled, the same multiply-and-sum as :class:`companion.layers.Linear`'s one-row loop, on the int8 matrix, which
  Inductor turns into one loop streaming 1 byte per weight; eager, PyTorch's weight-only
  kernel ``aten._weight_int8pack_mm``; :class:`Int4Linear`, ``aten._weight_int4pack_mm_for_cpu``.
  With more rows: those two PyTorch kernels eager, and for int8 the reference path compiled.
  PyTorch's kernels take bfloat16 activations, so their results differ from the reference by
  bfloat16 rounding (2 to 3 significant digits; the tests state the bound).
  Where a kernel is missing (an older PyTorch) or cannot take the shape, ``forward`` is
  ``reference_forward``.
* ``forward`` on a GPU, one row (decoding), eager or compiled: the Triton kernels of
  :mod:`companion.quant_triton` (:func:`~companion.quant_triton.takes` says when), which read
  the integer matrix once and write no float copy of it; checked in Triton's interpreter, not
  yet timed on a GPU. Otherwise, or with ``gpu_kernel`` set to False on a layer: under
  ``torch.compile``, ``one_row_forward``, the multiply-and-sum of each format written out,
  which Inductor compiles into reductions of its own (with them our int8 and int4 models
  decoded at 25% and 8% of an H200's bandwidth, slower than bfloat16); eager,
  ``reference_forward``. More rows (a prompt): ``reference_forward``.

The int4 kernels want the weights in their own layouts, which depend on the CPU's vector
instructions; :class:`Int4Linear` keeps those copies beside the portable packed one
(``state_dict`` holds only the portable one), so in memory an int4 layer takes about 1.6 bytes
per weight, and half a byte in a file. The int8 C kernel reads the layer's own buffers.

Saving: :func:`save_quantized` writes ``config.json`` (with a ``quantization_config``) and
``model.safetensors``; ``Llama.from_pretrained`` (and Mistral's and Phi's) loads such a
directory directly, through :func:`companion.checkpoint.load_model`, which calls
:func:`load_quantized`. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion import cpu_kernels, quant_triton
from companion.checkpoint import (Checkpoint, CheckpointError, check_tensors, hf_to_ours, ours_to_hf, save_pretrained,
                                  tied_embeddings)
from companion.layers import Linear, _compiling

__all__ = [
    "GROUP_SIZES",
    "Int4Embedding",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "dequantize",
    "dequantize_int4",
    "dequantize_int8",
    "load_quantized",
    "pack_int4",
    "quantize_",
    "quantize_int4",
    "quantize_int8",
    "quantization_config",
    "save_quantized",
    "unpack_int4",
]

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# What config.json's quantization_config says for each bit width.
SCHEMES = {8: "symmetric-per-channel", 4: "asymmetric-per-group"}
QUANT_METHOD = "companion"
# PyTorch's weight-only CPU kernels (torch >= 2.6 for int4); forward falls back without them.
HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
HAS_INT4_KERNEL = (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                   and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def _c_kernel_takes(x: Tensor) -> bool:
    """Whether a layer whose weights the C kernels can read sends ``x`` to them (eager and
    compiled): the switch is on, at most ``cpu_kernels.MAX_ROWS`` rows (decoding, a short
    prompt), and not float64, which asks for more than float32 sums."""
    return cpu_kernels.enabled and x.dtype != torch.float64 and x.numel() <= cpu_kernels.MAX_ROWS * x.size(-1)


# ---- the formats, as pure functions --------------------------------------------------------


def _divisor(scales: Tensor) -> Tensor:
    """``scales`` with zeros replaced by 1: a row or group of equal weights has scale 0."""
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row: ``weight (N, K) ~ scales[:, None] * q``.

    Returns ``q`` int8 ``(N, K)`` in ``[-127, 127]`` and ``scales`` ``(N,)`` in the weight's
    dtype, ``scales = max|row| / 127``. Computed in float32 whatever the weight's dtype.

    >>> q, scales = quantize_int8(torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]]))
    >>> q, scales
    (tensor([[  64, -127,   32],
            [   0,    0,    0]], dtype=torch.int8), tensor([0.0079, 0.0000]))
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    w = weight.float()
    scales = (w.abs().amax(dim=-1) / 127).to(weight.dtype)  # (N,), rounded to the stored dtype first
    q = torch.round(w / _divisor(scales.float())[:, None]).clamp(-127, 127)  # (N, K)
    return q.to(torch.int8), scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    """``scales[..., None] * q``: int8 ``(..., K)`` and scales ``(...)`` back to floats ``(..., K)``.

    >>> dequantize_int8(torch.tensor([[64, -127]], dtype=torch.int8), torch.tensor([0.5]))
    tensor([[ 32.0000, -63.5000]])
    """
    return q.to(scales.dtype) * scales[..., None]


def pack_int4(q: Tensor) -> Tensor:
    """Two 4-bit integers per byte: ``q`` uint8 ``(..., K)`` in ``[0, 15]`` -> uint8 ``(..., K/2)``.

    Value ``2j`` goes into the low 4 bits of byte ``j``, value ``2j + 1`` into the high 4 bits.

    >>> pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))  # 1 + 2 * 16, 15 + 0 * 16
    tensor([33, 15], dtype=torch.uint8)
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"q must be uint8, got {q.dtype}")
    if q.size(-1) % 2:
        raise ValueError(f"the last dimension of q ({q.size(-1)}) must be even: values are packed in pairs")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"q holds {int(q.max())}; 4-bit values are 0 to 15")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_int4`: uint8 ``(..., K/2)`` -> uint8 ``(..., K)``.

    >>> unpack_int4(torch.tensor([33, 15], dtype=torch.uint8))
    tensor([ 1,  2, 15,  0], dtype=torch.uint8)
    """
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)  # (..., K/2, 2) -> (..., K)


def _check_group_size(group_size: int, in_features: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} must be one of {', '.join(map(str, GROUP_SIZES))}")
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not divisible by group_size={group_size}: "
                         "every group must be full")


def quantize_int4(weight: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs: ``w ~ q * scale + min`` in each group.

    ``weight`` is ``(N, K)`` with ``K`` a multiple of ``group_size``. Returns the packed
    integers, uint8 ``(N, K/2)`` (:func:`pack_int4`), and ``scales`` and ``mins``, ``(N, K/g)``
    each in the weight's dtype, ``scale = (max - min) / 15`` per group. Computed in float32.

    >>> packed, scales, mins = quantize_int4(torch.linspace(-1.0, 2.0, 32)[None], group_size=32)
    >>> unpack_int4(packed)[0, :6].tolist(), scales, mins  # 32 points over 15 steps of 0.2
    ([0, 0, 1, 1, 2, 2], tensor([[0.2000]]), tensor([[-1.]]))
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    _check_group_size(group_size, K)
    w = weight.float().reshape(N, K // group_size, group_size)  # (N, G, g)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    scales, mins = ((high - low) / 15).to(weight.dtype), low.to(weight.dtype)  # rounded to the stored dtype
    q = torch.round((w - mins.float()[..., None]) / _divisor(scales.float())[..., None]).clamp(0, 15)
    return pack_int4(q.to(torch.uint8).reshape(N, K)), scales, mins


def dequantize_int4(packed: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """``q * scale + min`` per group: packed ``(..., K/2)``, scales and mins ``(..., G)`` -> ``(..., K)``.

    The group size is ``K / G``.

    >>> dequantize_int4(torch.tensor([[33]], dtype=torch.uint8), torch.tensor([[0.5]]), torch.tensor([[-1.0]]))
    tensor([[-0.5000,  0.0000]])
    """
    q = unpack_int4(packed)  # (..., K)
    q = q.reshape(*q.shape[:-1], scales.size(-1), -1)  # (..., G, g)
    return (q.to(scales.dtype) * scales[..., None] + mins[..., None]).flatten(-2)  # (..., K)


# ---- layers ----------------------------------------------------------------------------------


def _bias_like(linear: nn.Module) -> nn.Parameter | None:
    bias = getattr(linear, "bias", None)
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)


def _float_linear(weight: Tensor, bias: Tensor | None) -> Linear:
    """A :class:`companion.layers.Linear` holding ``weight`` and ``bias``."""
    out_features, in_features = weight.shape
    with torch.device("meta"):
        layer = Linear(in_features, out_features, bias=bias is not None)
    layer.weight = nn.Parameter(weight)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return layer


class _QuantizedLinear(nn.Module):
    """What :class:`Int8Linear` and :class:`Int4Linear` share: a float view of the weight and the readable path."""

    # whether one row on a GPU goes to the Triton kernels of companion.quant_triton (False:
    # one_row_forward compiled, or reference_forward eager); a class default, so it costs no state
    gpu_kernel = True

    def dequantize_weight(self) -> Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """:meth:`dequantize_weight`, for code that reads ``layer.weight`` (built anew on every read)."""
        return self.dequantize_weight()

    def reference_forward(self, x: Tensor) -> Tensor:
        """Dequantize the whole matrix, then ``F.linear``: readable, exact in ``x``'s dtype, slow."""
        return F.linear(x, self.dequantize_weight().to(x.dtype), self.bias)


class Int8Linear(_QuantizedLinear):
    """A linear layer with an int8 weight, one scale per output row, and a float bias.

    Buffers: ``qweight`` int8 ``(out, in)``, ``scales`` ``(out,)`` in the model's dtype.
    ``reference_forward`` dequantizes then calls ``F.linear``; ``forward`` takes the fast
    path described in the module's docstring. PyTorch's int8 kernel is used only when ``in``
    is a multiple of 16: with other widths it crashed the process (torch 2.13, several rows).

    >>> layer = Int8Linear.from_linear(nn.Linear(4, 3))
    >>> sorted(layer.state_dict()), layer(torch.zeros(2, 4)).shape
    (['bias', 'qweight', 'scales'], torch.Size([2, 3]))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if bias else None)
        # whether rows on a CPU may go to the C kernel (decided once: forward must stay cheap)
        self.c_kernel = in_features % cpu_kernels.INT8_GROUP == 0 and cpu_kernels.available()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.c_kernel = self.c_kernel and cpu_kernels.available()  # a copy unpickled in another process

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize ``linear``'s weight (:func:`quantize_int8`); the bias is copied as it is."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=False, dtype=w.dtype, device=w.device)
        layer.qweight, layer.scales = quantize_int8(w)
        layer.bias = _bias_like(linear)
        return layer

    def dequantize_weight(self) -> Tensor:
        """The float weight ``(out, in)`` this layer computes with: ``scales[:, None] * qweight``."""
        return dequantize_int8(self.qweight, self.scales)

    def one_row_forward(self, x: Tensor) -> Tensor:
        """One input row (decoding) as a multiply-and-sum over the int8 matrix, on any device.

        Compiled, Inductor turns it into one loop (a C++ loop on a CPU, a Triton reduction on a
        GPU) that converts each int8 to ``x``'s dtype as it reads it: 1 byte per weight read,
        no float copy of the matrix. The scale is the same along a row, so it multiplies the
        sum, not every weight.
        """
        if x.numel() != x.size(-1):
            raise ValueError(f"one_row_forward takes one row, got an input of shape {tuple(x.shape)}")
        y = (self.qweight * x.reshape(1, -1)).sum(-1) * self.scales  # (out,)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

    def forward(self, x: Tensor) -> Tensor:
        if self.c_kernel and x.device.type == "cpu" and _c_kernel_takes(x):
            y = torch.ops.companion.int8_gemv(self.qweight, self.scales, x).to(x.dtype)  # (..., out)
            return y if self.bias is None else y + self.bias
        if self.gpu_kernel and quant_triton.takes(x):
            y = quant_triton.int8_gemv(self.qweight, self.scales, x).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if _compiling() and x.numel() == x.size(-1):
            # Not PyTorch's int8 kernel: on a CPU Inductor's loop reads a matrix faster, and Inductor
            # (torch 2.13) fails to lower the kernel when its scales are computed in the graph.
            return self.one_row_forward(x)
        if x.device.type != "cpu" or _compiling():  # a GPU, or several rows (a prompt) compiled
            return self.reference_forward(x)
        if HAS_INT8_KERNEL and self.in_features % 16 == 0:  # other widths crash the kernel
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (B*T, in)
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales.to(torch.bfloat16))
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (..., out)
            return y if self.bias is None else y + self.bias
        return self.reference_forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(_QuantizedLinear):
    """A linear layer with an int4 weight, a scale and a minimum per group of inputs, and a float bias.

    Buffers: ``qweight`` uint8 ``(out, in/2)`` (:func:`pack_int4`), ``scales`` and ``mins``
    ``(out, in/group_size)`` in the model's dtype. Where PyTorch's int4 CPU kernel exists and
    ``out`` is a multiple of 16 (the kernel's requirement), :meth:`pack_for_kernel` also keeps
    the weight in the kernel's layout, in buffers that are not saved.

    >>> layer = Int4Linear.from_linear(nn.Linear(64, 16), group_size=32)
    >>> {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    {'bias': (16,), 'qweight': (16, 32), 'scales': (16, 2), 'mins': (16, 2)}
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        G = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=dtype, device=device))
        self.register_buffer("mins", torch.zeros(out_features, G, dtype=dtype, device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if bias else None)
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scales_and_zeros", None, persistent=False)
        self.register_buffer("gemv_weight", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> "Int4Linear":
        """Quantize ``linear``'s weight (:func:`quantize_int4`); the bias is copied as it is."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size,
                    dtype=w.dtype, device=w.device)
        layer.qweight, layer.scales, layer.mins = quantize_int4(w, group_size)
        layer.bias = _bias_like(linear)
        layer.pack_for_kernel()
        return layer

    def pack_for_kernel(self) -> None:
        """Rebuild the kernels' copies of the weights; call it after changing the buffers in place.

        ``gemv_weight``: the layout of the C kernel for a few rows (:func:`companion.cpu_kernels.pack_int4`),
        where it is available and float16 holds the scales and minimums. ``kernel_weight``:
        PyTorch's kernel, which computes ``(q - 8) * scale + zero``, so its zero is ``min + 8 *
        scale``, and it reads scales and zeros as bfloat16 ``(in/group_size, out, 2)``.
        """
        self.gemv_weight = None
        if not (self.qweight.device.type == "cpu" and self.out_features % 16 == 0):
            self.kernel_weight = self.kernel_scales_and_zeros = None
            return
        q = unpack_int4(self.qweight)  # (out, in), 0 .. 15
        if (cpu_kernels.available() and cpu_kernels.fits_float16(self.scales)
                and cpu_kernels.fits_float16(self.mins)):
            self.gemv_weight = cpu_kernels.pack_int4(q, self.scales, self.mins, self.group_size)
        if not HAS_INT4_KERNEL:
            self.kernel_weight = self.kernel_scales_and_zeros = None
            return
        q = q.to(torch.int32)
        self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zeros = self.mins.float() + 8 * self.scales.float()
        self.kernel_scales_and_zeros = torch.stack((self.scales.float().t(), zeros.t()), dim=-1).to(torch.bfloat16)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.pack_for_kernel()  # load_state_dict changed the buffers

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.gemv_weight is not None and not cpu_kernels.available():  # unpickled where they do not run
            self.gemv_weight = None

    def dequantize_weight(self) -> Tensor:
        """The float weight ``(out, in)`` this layer computes with: ``q * scale + min`` per group."""
        return dequantize_int4(self.qweight, self.scales, self.mins)

    def one_row_forward(self, x: Tensor) -> Tensor:
        """One input row (decoding) as a multiply-and-sum over the packed matrix, on any device.

        Per group ``g`` of inputs: ``sum_i (q_i * scale + min) * x_i = scale * sum_i q_i x_i +
        min * sum_i x_i``, so the scale multiplies one sum per group and the minimum multiplies
        the group's sum of ``x``. Written as elementwise operations and sums, it leaves Inductor
        free to fuse the unpacking into the reduction that reads the packed bytes (on a GPU, a
        Triton kernel). On a CPU, :meth:`forward` uses PyTorch's int4 kernel instead: Inductor's
        loops for this product were 1.4 to 7 times slower than it there.
        """
        if x.numel() != x.size(-1):
            raise ValueError(f"one_row_forward takes one row, got an input of shape {tuple(x.shape)}")
        G = self.scales.size(-1)
        q = unpack_int4(self.qweight).view(self.out_features, G, -1)  # (out, G, g), 0 .. 15
        xg = x.reshape(G, -1)  # (G, g)
        dots = (q.to(x.dtype) * xg).sum(-1)  # (out, G): sum_i q_i x_i per group
        y = (dots * self.scales).sum(-1) + (self.mins * xg.sum(-1)).sum(-1)  # (out,)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            if self.gpu_kernel and quant_triton.takes(x):
                y = quant_triton.int4_gemv(self.qweight, self.scales, self.mins, x).view(*x.shape[:-1], -1)
                return y if self.bias is None else y + self.bias
            if _compiling() and x.numel() == x.size(-1):
                return self.one_row_forward(x)
            return self.reference_forward(x)
        if self.gemv_weight is not None and _c_kernel_takes(x):
            y = torch.ops.companion.int4_gemv(self.gemv_weight, x, self.out_features, self.group_size).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if self.kernel_weight is None:
            return self.reference_forward(x)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (B*T, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.kernel_weight, self.group_size, self.kernel_scales_and_zeros.to(torch.bfloat16))
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


class Int8Embedding(nn.Module):
    """An embedding table in int8, one scale per row (per token); rows are dequantized when looked up.

    >>> table = Int8Embedding.from_embedding(nn.Embedding(10, 4))
    >>> table(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 4])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        w = embedding.weight.detach()
        table = cls(*w.shape, dtype=w.dtype, device=w.device)
        table.qweight, table.scales = quantize_int8(w)
        return table

    def dequantize_weight(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, idx: Tensor) -> Tensor:
        return dequantize_int8(self.qweight[idx], self.scales[idx])  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int4Embedding(nn.Module):
    """An embedding table in int4, groups of ``group_size`` features per row; rows are dequantized when looked up.

    >>> table = Int4Embedding.from_embedding(nn.Embedding(10, 64), group_size=32)
    >>> table(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 64])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group_size: int = DEFAULT_GROUP_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_group_size(group_size, embedding_dim)
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        G = embedding_dim // group_size
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, G, dtype=dtype, device=device))
        self.register_buffer("mins", torch.zeros(num_embeddings, G, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group_size: int = DEFAULT_GROUP_SIZE) -> "Int4Embedding":
        w = embedding.weight.detach()
        table = cls(*w.shape, group_size=group_size, dtype=w.dtype, device=w.device)
        table.qweight, table.scales, table.mins = quantize_int4(w, group_size)
        return table

    def dequantize_weight(self) -> Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins)

    def forward(self, idx: Tensor) -> Tensor:
        return dequantize_int4(self.qweight[idx], self.scales[idx], self.mins[idx])  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


QUANTIZED = (Int8Linear, Int4Linear, Int8Embedding, Int4Embedding)
BITS = {Int8Linear: 8, Int8Embedding: 8, Int4Linear: 4, Int4Embedding: 4}


# ---- whole models ----------------------------------------------------------------------------


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _targets(model: nn.Module, include_embedding: bool, include_lm_head: bool) -> list[str]:
    """Names of the modules :func:`quantize_` replaces, in the model's order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name != "lm_head" or include_lm_head):
            names.append(name)
        elif isinstance(module, nn.Embedding) and include_embedding:
            names.append(name)
    return names


def _check_scheme(scheme: str, group_size: int | None) -> tuple[int, int | None]:
    """``(bits, group_size)`` for ``scheme``, or a ValueError naming the bad argument."""
    if scheme not in ("int8", "int4"):
        raise ValueError(f"scheme={scheme!r} is not one of 'int8', 'int4'")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} must be one of {', '.join(map(str, GROUP_SIZES))}")
    if scheme == "int8":
        return 8, None  # one scale per output row: no groups
    return 4, DEFAULT_GROUP_SIZE if group_size is None else group_size


def quantize_(model: nn.Module, scheme: str, *, group_size: int | None = None,
              include_embedding: bool = False, include_lm_head: bool = True) -> nn.Module:
    """Replace ``model``'s linear layers by quantized ones, in place; returns ``model``.

    ``scheme`` is ``"int8"`` (:class:`Int8Linear`) or ``"int4"`` (:class:`Int4Linear`, groups
    of ``group_size`` inputs, 32, 64 or 128, default 64; int8 has one scale per row and
    ignores ``group_size``). Every ``nn.Linear`` is replaced,
    the output layer ``lm_head`` too unless ``include_lm_head=False``; the embedding only with
    ``include_embedding=True``. With tied embeddings, a quantized ``lm_head`` gets its own
    quantized copy of the shared matrix, and the float embedding stays for looking up tokens.
    Every layer is checked before any is replaced, so a ValueError leaves the model as it was.

    >>> from companion.llama import Llama, LlamaConfig
    >>> model = quantize_(Llama(LlamaConfig.preset("tiny")), "int8")
    >>> type(model.layers[0].mlp.up_proj).__name__, type(model.embed_tokens).__name__
    ('Int8Linear', 'Embedding')
    """
    bits, group_size = _check_scheme(scheme, group_size)
    found = [name for name, m in model.named_modules() if isinstance(m, QUANTIZED)]
    if found:
        raise ValueError(f"the model is already quantized ({found[0]} is {type(model.get_submodule(found[0])).__name__}); "
                         "call dequantize(model) first")
    names = _targets(model, include_embedding, include_lm_head)
    if include_embedding and not include_lm_head and tied_embeddings(model):
        raise ValueError("lm_head shares the embedding's weight (tie_word_embeddings): quantizing the embedding "
                         "alone would leave lm_head a float copy of it; pass include_lm_head=True")
    if bits == 4:
        for name in names:
            module = model.get_submodule(name)
            width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
            what = "in_features" if isinstance(module, nn.Linear) else "embedding_dim"
            if width % group_size:
                raise ValueError(f"{what}={width} of {name} is not divisible by group_size={group_size}: "
                                 "every group must be full")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            new = Int8Embedding.from_embedding(module) if bits == 8 else Int4Embedding.from_embedding(module, group_size)
        else:
            new = Int8Linear.from_linear(module) if bits == 8 else Int4Linear.from_linear(module, group_size)
        _set_module(model, name, new)
    return model


def dequantize(module: nn.Module) -> nn.Module:
    """Quantized layers back to float ones (:class:`~companion.layers.Linear`, ``nn.Embedding``).

    A single quantized layer gives a new float layer whose weight is exactly its
    ``dequantize_weight()``; any other module has its quantized layers replaced in place and
    is returned.

    >>> layer = Int8Linear.from_linear(nn.Linear(4, 3))
    >>> torch.equal(dequantize(layer).weight, layer.scales[:, None] * layer.qweight)
    True
    """
    if isinstance(module, (Int8Linear, Int4Linear)):
        return _float_linear(module.dequantize_weight(), module.bias)
    if isinstance(module, (Int8Embedding, Int4Embedding)):
        return nn.Embedding.from_pretrained(module.dequantize_weight(), freeze=False)
    for name, child in list(module.named_modules()):
        if name and isinstance(child, QUANTIZED):
            _set_module(module, name, dequantize(child))
    return module


# ---- saving and loading ----------------------------------------------------------------------

# Our model classes and what Hugging Face calls them in config.json.
def _hf_module_name(name: str) -> str:
    """``layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj``; ``lm_head`` stays ``lm_head``."""
    return ours_to_hf(name + ".weight").removesuffix(".weight")


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for a quantized ``model``.

    ``modules`` lists the quantized modules under Hugging Face's names (``model.`` prefix).
    """
    found = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED)}
    if not found:
        raise ValueError("the model has no quantized layers: call quantize_(model, 'int8' or 'int4') first")
    bits = {BITS[type(m)] for m in found.values()}
    group_sizes = {getattr(m, "group_size", None) for m in found.values()}
    if len(bits) > 1 or len(group_sizes) > 1:
        raise ValueError(f"the model mixes formats (bits {sorted(bits)}, group sizes {sorted(group_sizes, key=str)}); "
                         "one quantization_config describes one format")
    (bits,), (group_size,) = bits, group_sizes
    return {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size, "scheme": SCHEMES[bits],
            "modules": [_hf_module_name(name) for name in found]}


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write a quantized Llama, Mistral or Phi to ``directory``: ``config.json`` and ``model.safetensors``.

    ``config.json`` is the model's Hugging Face config plus a ``quantization_config``
    (``{"quant_method": "companion", "bits": 8 or 4, "group_size": ..., "scheme": ...,
    "modules": [...]}``); tensors are stored under Hugging Face's names, the quantized
    layers as ``<module>.qweight``, ``<module>.scales`` (and ``<module>.mins`` for int4)
    (:func:`companion.checkpoint.save_pretrained`). ``Model.from_pretrained(directory)``
    loads it back. Returns the directory.
    """
    return save_pretrained(model, directory, extra_config={"quantization_config": quantization_config(model)})


def _read_quantization_config(quant: Any) -> tuple[int, int | None, list[str]]:
    """``(bits, group_size, modules)`` from config.json's ``quantization_config``, checked."""
    if not isinstance(quant, Mapping):
        raise CheckpointError(f"config.json's quantization_config is {quant!r}, not a JSON object")
    method = quant.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"config.json has quantization_config with quant_method={method!r}; this loader "
                              f"reads only what companion.quantize.save_quantized writes "
                              f"(quant_method={QUANT_METHOD!r})")
    for key in ("bits", "group_size", "scheme", "modules"):
        if key not in quant:
            raise CheckpointError(f"config.json's quantization_config has no {key!r} field")
    bits, group_size, scheme, modules = quant["bits"], quant["group_size"], quant["scheme"], quant["modules"]
    if bits not in SCHEMES:
        raise CheckpointError(f"config.json's quantization_config has bits={bits!r}; this loader knows 8 and 4")
    if scheme != SCHEMES[bits]:
        raise CheckpointError(f"config.json's quantization_config has scheme={scheme!r}; {bits}-bit weights "
                              f"here are {SCHEMES[bits]!r}")
    if bits == 8 and group_size is not None:
        raise CheckpointError(f"config.json's quantization_config has group_size={group_size!r} with bits=8; "
                              "int8 has one scale per row (group_size null)")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise CheckpointError(f"config.json's quantization_config has group_size={group_size!r}; "
                              f"int4 group sizes are {', '.join(map(str, GROUP_SIZES))}")
    if not (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)):
        raise CheckpointError(f"config.json's quantization_config has modules={modules!r}; "
                              "expected a non-empty list of module names")
    return bits, group_size, modules


def _quantized_shapes(model: nn.Module, modules: list[str], bits: int, group_size: int | None,
                      expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``expected`` (the float checkpoint's names and shapes) with each quantized module's weight
    replaced by its quantized tensors."""
    shapes = dict(expected)
    for hf_name in modules:
        name = hf_to_ours(hf_name)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"config.json's quantization_config lists {hf_name!r}, which the model "
                                  "does not have") from None
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise CheckpointError(f"config.json's quantization_config lists {hf_name!r}, a "
                                  f"{type(module).__name__}; only linear layers and embeddings are quantized")
        N, K = module.weight.shape  # (out, in) or (vocab, channels)
        if bits == 4 and K % group_size:
            raise CheckpointError(f"{hf_name} has {K} inputs, not divisible by config.json's group_size={group_size}")
        shapes.pop(hf_name + ".weight", None)  # absent already for a tied lm_head
        if bits == 8:
            shapes |= {hf_name + ".qweight": (N, K), hf_name + ".scales": (N,)}
        else:
            G = K // group_size
            shapes |= {hf_name + ".qweight": (N, K // 2), hf_name + ".scales": (N, G), hf_name + ".mins": (N, G)}
    return shapes


def _check_quantized_tensors(ckpt: Checkpoint, modules: list[str], bits: int, group_size: int | None) -> None:
    """Messages for the two mistakes a shape list would report obscurely: bit width and group size."""
    want = torch.int8 if bits == 8 else torch.uint8
    for hf_name in modules:
        name = hf_name + ".qweight"
        if name in ckpt.where:
            found = ckpt.where[name].dtype(name)
            if found != want:
                raise CheckpointError(
                    f"tensor {name!r} in {ckpt.where[name].path.name} is {found}, but config.json's "
                    f"quantization_config says bits={bits}, stored as {want}"
                    + (" (two 4-bit values per byte)" if bits == 4 else ""))
        scales = hf_name + ".scales"
        if bits == 4 and name in ckpt.where and scales in ckpt.where:
            K, G = 2 * ckpt.where[name].shape(name)[-1], ckpt.where[scales].shape(scales)[-1]
            if G and K % G == 0 and K // G != group_size:
                raise CheckpointError(f"tensor {scales!r} has {G} groups per row of {K} weights, i.e. "
                                      f"group_size={K // G}, but config.json's quantization_config says "
                                      f"group_size={group_size}")


def load_quantized(model_cls: Callable[[Any], nn.Module], config: Any, path: str | Path,
                   expected: Mapping[str, tuple[int, ...]], quant: Any, *,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """Build ``model_cls(config)`` with quantized layers and fill it from the directory ``path``.

    Called by :func:`companion.checkpoint.load_model` when ``config.json`` has a
    ``quantization_config`` (``quant``); ``expected`` is the family's list of float tensor
    names and shapes. As for a float checkpoint: the model is built on the ``meta`` device,
    every name, shape and integer dtype is checked from the headers before any weight is
    read, then memory is given on ``device`` and the tensors are copied in. Floating-point
    tensors (scales, mins, biases, norms) are converted to ``dtype``. Returns the model in
    eval mode.
    """
    bits, group_size, modules = _read_quantization_config(quant)
    ckpt = Checkpoint(path)
    with torch.device("meta"):
        model = model_cls(config)
    tied = tied_embeddings(model)
    if tied and "model.embed_tokens" in modules and "lm_head" not in modules:
        raise CheckpointError("config.json ties lm_head to the embedding, and quantization_config lists the "
                              "embedding but not lm_head; save_quantized never writes that")
    shapes = _quantized_shapes(model, modules, bits, group_size, expected)
    _check_quantized_tensors(ckpt, modules, bits, group_size)
    check_tensors(shapes, ckpt.shapes(), where=f"the checkpoint in {ckpt.path}")
    for hf_name in modules:
        name = hf_to_ours(hf_name)
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            new = (Int8Embedding(*old.weight.shape, device="meta") if bits == 8 else
                   Int4Embedding(*old.weight.shape, group_size=group_size, device="meta"))
        else:
            kwargs = dict(bias=old.bias is not None, device="meta")
            new = (Int8Linear(old.in_features, old.out_features, **kwargs) if bits == 8 else
                   Int4Linear(old.in_features, old.out_features, group_size=group_size, **kwargs))
        _set_module(model, name, new)
    model = model.to(dtype).to_empty(device=device)
    if tied and "lm_head" not in modules:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty made two tensors of one
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name in shapes:
            tensors[hf_to_ours(name)].copy_(ckpt.tensor(name))
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack_for_kernel()
    return model.eval()
