"""Turning a model's next-token logits into text, from one prompt to a server's stream of requests.

Every model in the book maps token ids ``(B, T)`` to logits ``(B, T, V)``; the modules here
choose the next tokens. In the order the book reads them:

* :mod:`~companion.generation.sampling` (chapter 7; chapters 8 to 10 use it with a KV cache):
  :func:`generate`, the general loop for any model, with or without a cache, and the
  samplers it calls: greedy, temperature, top-k and top-p (:func:`sample_next`,
  ``top_k_filter``, ``top_p_filter``). Chapter 5 writes its own loop for its NumPy model.
* :mod:`~companion.generation.static_cache` (chapter 11): :func:`decode`, the fastest loop,
  over a KV cache allocated once at a fixed maximum length so that every step has the same
  shapes, and :func:`compile_step`, which compiles that step (a CUDA graph on a GPU).
* :mod:`~companion.generation.beam` (chapter 1): :func:`beam_search` and ``greedy_search``
  for a step function that gives next-token log-probabilities, and ``sequence_log_prob``.
* :mod:`~companion.generation.batching` (chapter 13): :func:`generate_batch`, many prompts of
  different lengths in one batch, padded on the left (``left_pad_batch``).
* :mod:`~companion.generation.speculative` (chapter 13): :func:`speculative_generate`, a small
  draft model proposes tokens and the large target model checks them in one pass.
* :mod:`~companion.generation.engine` (chapter 13): :class:`Engine`, continuous batching over
  a paged KV cache, and ``replay`` and ``synthetic_trace`` to serve a trace of requests.
  ``python -m companion.serve`` puts an HTTP endpoint in front of it.

The main function of each module is importable from here
(``from companion.generation import decode``); everything else from its module.
"""

from companion.generation.sampling import generate, sample_next
from companion.generation.static_cache import compile_step, decode
from companion.generation.beam import beam_search
from companion.generation.batching import generate_batch
from companion.generation.speculative import speculative_generate
from companion.generation.engine import Engine

__all__ = ["Engine", "beam_search", "compile_step", "decode", "generate", "generate_batch", "sample_next",
           "speculative_generate"]
