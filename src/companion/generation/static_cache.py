"""A lean decoding loop over a static KV cache: allocated once, at a fixed maximum length.

:func:`companion.generation.sampling.generate` is the general loop of the book (any model,
with or without a cache sized for the request, stopping at an end token). This one does the
least work per token, for models that follow the cache protocol (``setup_cache`` and
``model(idx, start_pos=...)``, as :class:`~companion.llama.Llama`,
:class:`~companion.mistral.Mistral` and :class:`~companion.phi.Phi` do):

* the prompt goes through the model once, and logits are computed for its last position only
  (``last_only=True``): the output layer is one of the largest matrices of a small model;
* the cache is allocated for a maximum length (the model's, or the caller's), not for this
  request, and every later step feeds one token at a position held in a device tensor, so
  each step has exactly the same shapes in every request: the step function is compiled
  once with ``torch.compile`` (and captured as a CUDA graph with
  ``mode="reduce-overhead"``) and serves prompts and generations of any length;
* the position is advanced on the device and the tokens are written into a preallocated
  output tensor, so nothing is copied between host and device per token, except the check
  for the end of the sequence when ``eos_token_id`` is given.

It gives the same tokens as ``generate(model, idx, n, temperature=0, use_cache=True)``
(tested per model). :func:`compile_step` compiles the one-token step: on a GPU as a CUDA
graph, on a CPU with the matrix-vector fast path of :class:`companion.layers.Linear`.
"""

from __future__ import annotations

import platform
from typing import Callable

import torch
from torch import Tensor, nn

from companion.generation.sampling import sample_next

__all__ = ["compile_step", "decode"]


@torch.no_grad()
def decode(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_seq_len: int | None = None,
    step: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Append up to ``max_new_tokens`` tokens to the prompt ``idx`` ``(B, T)``; returns ``(B, T + n)``.

    ``temperature=0`` (the default) is greedy decoding. ``step``, if given, replaces the
    one-token step ``lambda tok, pos: model(tok, start_pos=pos, last_only=True)``; pass
    :func:`compile_step`'s compiled version of it to decode faster.

    The cache is set up for ``max_seq_len`` positions (the model's
    ``max_position_embeddings`` if not given), whatever this request needs: its buffers keep
    their shapes from one request to the next, so one compiled step serves prompts and
    generations of every length up to ``max_seq_len``.
    Attention hides the slots not yet written behind a mask. The prompt's pass (an int
    ``start_pos``) attends over the prompt's slots only (``end`` of
    :meth:`companion.layers.KVCache.update`). On a CPU where the C kernels run
    (:func:`companion.cpu_kernels.takes_attention`: x86 with AVX2 and a C compiler, float32)
    each later step reads only the written slots too
    (:func:`companion.cpu_kernels.attend_one`), so a long ``max_seq_len`` costs little;
    elsewhere PyTorch's kernel reads every slot at every step, and a ``max_seq_len`` close to
    what the requests need keeps each step from reading the whole cache.

    With ``eos_token_id``, a row that produces it is finished: its later tokens are
    ``pad_token_id`` (``eos_token_id`` if not given), and decoding stops as soon as every
    row is finished, so ``n`` may be less than ``max_new_tokens``. Checking that is the one
    device-to-host copy per token; without ``eos_token_id`` there is none.
    """
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a (B, T) tensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
    if idx.size(1) == 0:
        raise ValueError("idx is empty: give at least one prompt token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    B, T = idx.shape
    if max_seq_len is None:
        max_seq_len = model.config.max_position_embeddings
    if T + max_new_tokens > max_seq_len:
        raise ValueError(f"a prompt of {T} tokens plus max_new_tokens={max_new_tokens} is longer than "
                         f"max_seq_len={max_seq_len}")
    if pad_token_id is None:
        pad_token_id = eos_token_id
    model.setup_cache(B, max_seq_len)
    if step is None:
        def step(tok: Tensor, pos: Tensor) -> Tensor:
            return model(tok, start_pos=pos, last_only=True)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    pos = torch.tensor(T, device=idx.device)  # the position of the token being fed, kept on the device
    logits = model(idx, start_pos=0, last_only=True)[:, -1]  # (B, V): the prompt in one pass
    for t in range(T, T + max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            tok = torch.where(finished, pad_token_id, tok)
            finished |= tok == eos_token_id
        out[:, t] = tok
        if eos_token_id is not None and bool(finished.all()):  # the one sync per token, with eos only
            return out[:, : t + 1]
        if t + 1 < T + max_new_tokens:
            logits = step(tok.view(B, 1), pos)[:, -1]  # (B, V); same shapes and strides in every request
            pos += 1  # in place, on the device: no new tensor from the host
    return out


def compile_step(model: nn.Module, *, mode: str | None = None, backend: str | Callable = "inductor",
                 cpp_wrapper: bool | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``model``'s one-token decoding step, compiled with ``torch.compile``; pass it to :func:`decode`.

    On a GPU the default ``mode="reduce-overhead"`` records the whole step as one CUDA graph,
    replayed for every token: no Python and no kernel-launch cost per layer. On a CPU,
    Inductor fuses the step's small operations, and the model's
    :class:`~companion.layers.Linear` layers read their weights with every core (as
    bandwidth-bound loops, or through MKL on an Intel CPU: ``Linear.one_row_loop``);
    ``cpp_wrapper`` (the default on a CPU under Linux with torch >= 2.6; pass
    ``cpp_wrapper=False`` where it fails to build) has Inductor write the code that calls the
    step's hundred or so kernels in C++ rather than Python, which saves a few percent of a
    float32 step and up to a tenth of a quantized one (whose matrices take less time).
    Compiling takes tens of seconds on a CPU (more with ``cpp_wrapper``), once per model and
    batch size: it pays off for long or repeated generations, not for a single short one.
    On a CPU, Inductor needs a C++ compiler (gcc or clang; Colab, Kaggle and most Linux and
    macOS machines have one). ``backend`` is passed to ``torch.compile`` (a counting backend
    in the tests).
    """
    device = next(model.parameters()).device
    if mode is None and device.type == "cuda":
        mode = "reduce-overhead"
    if cpp_wrapper is None:  # where it was tested: Linux (gcc), torch >= 2.6
        cpp_wrapper = (device.type == "cpu" and backend == "inductor" and mode is None
                       and platform.system() == "Linux" and torch.__version__ >= "2.6")
    elif cpp_wrapper and (backend != "inductor" or mode is not None):
        raise ValueError(f"cpp_wrapper=True is an option of the inductor backend without a mode (on a GPU, "
                         f"compile_step uses mode='reduce-overhead'); got backend={backend!r}, mode={mode!r}")
    options = {"cpp_wrapper": True} if cpp_wrapper else None

    def one_token(tok: Tensor, pos: Tensor) -> Tensor:
        return model(tok, start_pos=pos, last_only=True)

    return torch.compile(one_token, mode=mode, fullgraph=True, backend=backend, options=options)
