"""Fused projections: the matrices that read the same input, stacked into one.

Each block of Llama, Mistral and Phi-2 multiplies the same normalized input by three matrices
for attention (queries, keys and values) and, in Llama and Mistral, by two more in its
feed-forward network (the gate and the up projection). Stacking the rows of the matrices that
read the same input gives one taller matrix, and one product instead of three (or two):

    [q; k; v] = [W_q; W_k; W_v] x

Decoding a token makes one call per matrix, and on a CPU each call pays a fixed cost (a call
through PyTorch, starting the threads, rounding ``x`` for the integer kernels of
:mod:`companion.cpu_kernels`) that small matrices do not hide. The stacked matrix reads the
same weights, with fewer calls. On a 2-core CPU, timed side by side in one process, the int4
model of ``benchmarks/decode.py`` decoded 6% faster fused (119 tokens/s against 113), less
than the spread between separate runs. The float32 step was slower fused where Inductor's
multiply-and-sum loops run its products (21.3 against 24.5), and 2% faster, within the noise,
where MKL does (30.3 against 29.7): measure before fusing.

* :func:`fuse_projections` stacks, in every attention of a Llama, Mistral or Phi model,
  ``q_proj``, ``k_proj`` and ``v_proj`` into ``qkv_proj`` (the output split at
  ``qkv_widths``), and in every :class:`~companion.layers.SwiGLU` ``gate_proj`` and
  ``up_proj`` into ``gate_up_proj``. :func:`companion.layers.project_qkv` and
  ``SwiGLU.forward`` use the fused matrices where they exist.
* :func:`unfuse_projections` splits them back, exactly.
* It works on float layers and on the quantized layers of :mod:`companion.quantize` alike:
  int8 has one scale per row and int4 a scale and a minimum per group of weights within a
  row, so stacking quantized rows is the same as quantizing stacked rows.

Each output is one row of the matrix times ``x``: the fused model computes what the separate
matrices compute (bit for bit with the C kernels, which compute each row the same way whatever
the others; within float rounding elsewhere, where a matrix product may group its sums
differently for a different shape). Checkpoints keep Hugging Face's separate matrices:
:func:`companion.checkpoint.save_pretrained` refuses a fused model, so call
:func:`unfuse_projections` before saving.

>>> from companion.llama import Llama, LlamaConfig
>>> model = fuse_projections(Llama(LlamaConfig.preset("tiny")))
>>> attn = model.layers[0].self_attn
>>> hasattr(attn, "q_proj"), attn.qkv_widths, model.layers[0].mlp.gate_up_proj.out_features
(False, (64, 64, 64), 344)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from companion import llama, mistral, phi
from companion.checkpoint import fused_module
from companion.layers import Linear, SwiGLU
from companion.quantize import Int4Linear, Int8Linear

__all__ = ["concat_linears", "fuse_projections", "is_fused", "split_linear", "unfuse_projections"]

ATTENTIONS = (llama.Attention, mistral.Attention, phi.Attention)  # their forward calls project_qkv
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
# the tensors each kind of layer holds one row per output in (bias aside)
ROWS = {Linear: ("weight",), Int8Linear: ("qweight", "scales"), Int4Linear: ("qweight", "scales", "mins")}


def _kind(layer: nn.Module) -> type:
    """``Linear`` (for ``nn.Linear`` too), ``Int8Linear`` or ``Int4Linear``; a TypeError for anything else,
    subclasses included: their own behaviour would be lost in the stack."""
    kinds = {nn.Linear: Linear, Linear: Linear, Int8Linear: Int8Linear, Int4Linear: Int4Linear}
    if type(layer) not in kinds:
        raise TypeError(f"cannot stack a {type(layer).__name__}: only Linear (or nn.Linear), Int8Linear and "
                        "Int4Linear layers")
    return kinds[type(layer)]


def _uses_c_kernel(layer: nn.Module) -> bool:
    """Whether a quantized layer may send rows to :mod:`companion.cpu_kernels` (a switch its owner can turn off)."""
    return getattr(layer, "c_kernel", False) or getattr(layer, "gemv_weight", None) is not None


def _empty_like(layer: nn.Module, kind: type, out_features: int) -> nn.Module:
    """A layer of ``layer``'s kind, width, bias and dtype with ``out_features`` rows (its tensors to be set)."""
    bias = layer.bias is not None
    if kind is Linear:
        return Linear(layer.in_features, out_features, bias=bias, device="meta")
    dtype = layer.scales.dtype
    if kind is Int8Linear:
        return Int8Linear(layer.in_features, out_features, bias=bias, dtype=dtype, device="meta")
    return Int4Linear(layer.in_features, out_features, bias=bias, group_size=layer.group_size, dtype=dtype,
                      device="meta")


def _set_rows(layer: nn.Module, kind: type, tensors: dict[str, Tensor], bias: Tensor | None, like: nn.Module,
              c_kernel: bool) -> nn.Module:
    """Give ``layer`` its tensors; parameters are trainable where ``like``'s are, and the C kernels
    stay off where ``c_kernel`` is False (a layer whose kernels were switched off)."""
    for name, t in tensors.items():
        if kind is Linear:
            setattr(layer, name, nn.Parameter(t, requires_grad=like.weight.requires_grad))
        else:
            setattr(layer, name, t)
    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=like.bias.requires_grad)
    if kind is Int4Linear:
        layer.pack_for_kernel()  # the kernels' copies, for the new rows
        if not c_kernel:
            layer.gemv_weight = None
    elif kind is Int8Linear:
        layer.c_kernel = layer.c_kernel and c_kernel
    return layer


def concat_linears(layers: list[nn.Module] | tuple[nn.Module, ...]) -> nn.Module:
    """One layer whose output is the outputs of ``layers`` side by side (their rows stacked).

    The layers must be of one kind (:class:`~companion.layers.Linear` or ``nn.Linear``,
    :class:`~companion.quantize.Int8Linear`, :class:`~companion.quantize.Int4Linear` with one
    group size), with the same input width, dtype and device, all with a bias or none.

    >>> a, b = Linear(4, 2), Linear(4, 3)
    >>> ab = concat_linears([a, b])
    >>> x = torch.randn(5, 4)
    >>> ab.out_features, torch.allclose(ab(x), torch.cat([a(x), b(x)], -1))
    (5, True)
    """
    if len(layers) < 2:
        raise ValueError(f"concat_linears takes at least 2 layers, got {len(layers)}")
    first = layers[0]
    kind = _kind(first)
    for i, layer in enumerate(layers[1:], start=1):
        if _kind(layer) is not kind:
            raise TypeError(f"layers[{i}] is a {type(layer).__name__}, layers[0] a {type(first).__name__}: "
                            "only layers of one kind stack")
        if layer.in_features != first.in_features:
            raise ValueError(f"layers[{i}] has in_features={layer.in_features}, layers[0] {first.in_features}: "
                             "stacked layers read the same input")
        if (layer.bias is None) != (first.bias is None):
            raise ValueError(f"layers[{i}] {'has no' if layer.bias is None else 'has a'} bias and layers[0] "
                             f"{'has no' if first.bias is None else 'has a'} bias: all or none must have one")
        if getattr(layer, "group_size", None) != getattr(first, "group_size", None):
            raise ValueError(f"layers[{i}] has group_size={layer.group_size}, layers[0] {first.group_size}")
        for name in ("weight", "bias") if kind is Linear else ("bias",):
            a, b = getattr(first, name), getattr(layer, name)
            if a is not None and a.requires_grad != b.requires_grad:
                raise ValueError(f"layers[{i}].{name}.requires_grad={b.requires_grad}, layers[0]'s "
                                 f"{a.requires_grad}: one stacked tensor is trained or frozen as a whole")
        for name in ROWS[kind]:
            a, b = getattr(first, name), getattr(layer, name)
            if (a.dtype, a.device) != (b.dtype, b.device):
                raise ValueError(f"layers[{i}].{name} is {b.dtype} on {b.device}, layers[0].{name} {a.dtype} "
                                 f"on {a.device}")
    out = sum(layer.out_features for layer in layers)
    tensors = {name: torch.cat([getattr(layer, name).detach() for layer in layers]) for name in ROWS[kind]}
    bias = None if first.bias is None else torch.cat([layer.bias.detach() for layer in layers])
    c_kernel = all(_uses_c_kernel(layer) for layer in layers)
    return _set_rows(_empty_like(first, kind, out), kind, tensors, bias, first, c_kernel)


def split_linear(layer: nn.Module, widths: list[int] | tuple[int, ...]) -> list[nn.Module]:
    """The layers :func:`concat_linears` stacked into ``layer``, ``widths`` their output sizes.

    >>> a, b = split_linear(concat_linears([Linear(4, 2), Linear(4, 3)]), (2, 3))
    >>> a.out_features, b.out_features
    (2, 3)
    """
    kind = _kind(layer)
    widths = tuple(widths)
    if any(not isinstance(w, int) or w <= 0 for w in widths) or sum(widths) != layer.out_features:
        raise ValueError(f"widths={widths} must be positive integers that add up to out_features={layer.out_features}")
    parts = []
    for i, width in enumerate(widths):
        start = sum(widths[:i])
        tensors = {name: getattr(layer, name).detach()[start:start + width].clone() for name in ROWS[kind]}
        bias = None if layer.bias is None else layer.bias.detach()[start:start + width].clone()
        parts.append(_set_rows(_empty_like(layer, kind, width), kind, tensors, bias, layer, _uses_c_kernel(layer)))
    return parts


def _replace_children(module: nn.Module, old: tuple[str, ...], new: dict[str, nn.Module]) -> None:
    """Put the ``new`` children where the first of the ``old`` ones was (state dicts keep their order)."""
    children = list(module._modules.items())
    module._modules.clear()
    for name, child in children:
        if name == old[0]:
            module._modules.update(new)
        elif name not in old:
            module._modules[name] = child


def is_fused(model: nn.Module) -> bool:
    """Whether any module of ``model`` holds projections stacked by :func:`fuse_projections`."""
    return fused_module(model) is not None


def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack ``q_proj``, ``k_proj``, ``v_proj`` and ``gate_proj``, ``up_proj`` into one matrix each, in place.

    Every attention of a Llama, Mistral or Phi model gets ``qkv_proj`` and ``qkv_widths``, and
    every :class:`~companion.layers.SwiGLU` ``gate_up_proj``; the separate layers are removed.
    Modules already fused are left as they are. Quantize before or after: the result is the
    same. Every stack is built before any module changes, so an error (layers that do not
    stack) leaves the model as it was. Returns ``model``; a ValueError if it has nothing to fuse.
    """
    found, plan = False, []
    for module in model.modules():
        if isinstance(module, ATTENTIONS):
            found = True
            if not hasattr(module, "qkv_proj"):
                parts = [getattr(module, name) for name in QKV]
                plan.append((module, QKV, "qkv_proj", concat_linears(parts), tuple(p.out_features for p in parts)))
        elif isinstance(module, SwiGLU):
            found = True
            if not hasattr(module, "gate_up_proj"):
                plan.append((module, GATE_UP, "gate_up_proj", concat_linears([module.gate_proj, module.up_proj]), None))
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention of Llama, Mistral or Phi and no SwiGLU: "
                         "nothing to fuse")
    for module, old, name, fused, widths in plan:
        _replace_children(module, old, {name: fused})
        if widths is not None:
            module.qkv_widths = widths
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_projections` in place: the separate layers again, with the same tensors
    (float layers come back as :class:`~companion.layers.Linear`)."""
    plan = []
    for module in model.modules():
        if isinstance(module, ATTENTIONS) and hasattr(module, "qkv_proj"):
            plan.append((module, "qkv_proj", dict(zip(QKV, split_linear(module.qkv_proj, module.qkv_widths)))))
        elif isinstance(module, SwiGLU) and hasattr(module, "gate_up_proj"):
            width = module.gate_up_proj.out_features // 2
            plan.append((module, "gate_up_proj", dict(zip(GATE_UP, split_linear(module.gate_up_proj, (width, width))))))
    for module, name, parts in plan:
        _replace_children(module, (name,), parts)
        if name == "qkv_proj":
            del module.qkv_widths
    return model
