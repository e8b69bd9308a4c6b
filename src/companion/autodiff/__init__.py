"""Automatic differentiation from scratch: a scalar engine and a numpy tensor engine.

* :class:`Value` (``value.py``): one number, its gradient and the closure that passes
  the gradient on; :mod:`scalar_nn` builds neurons, layers and MLPs from it and
  :func:`draw_graph` draws its graph.
* :class:`Tensor` (``tensor.py``): the same idea on numpy arrays, with broadcasting;
  :mod:`functional` adds softmax, cross-entropy, GELU, LayerNorm, ...; :mod:`nn` the
  layers; :mod:`optim` SGD, Adam and AdamW.
* :mod:`lm`: a character-level transformer language model on the tensor engine, and the
  same model in PyTorch for comparison (chapter 5).

``no_grad`` switches graph recording off for both engines.
"""

from companion.autodiff import functional, nn, optim
from companion.autodiff.draw import draw_graph
from companion.autodiff.grad_mode import is_grad_enabled, no_grad
from companion.autodiff.graph import topological_order
from companion.autodiff.scalar_nn import MLP, Layer, Neuron
from companion.autodiff.tensor import Tensor, unbroadcast
from companion.autodiff.value import Value, zero_grad

__all__ = [
    "MLP",
    "Layer",
    "Neuron",
    "Tensor",
    "Value",
    "draw_graph",
    "functional",
    "is_grad_enabled",
    "nn",
    "no_grad",
    "optim",
    "topological_order",
    "unbroadcast",
    "zero_grad",
]
