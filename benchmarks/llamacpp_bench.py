"""Timing llama.cpp on the weights of our Llama, for ``decode.py``.

llama.cpp reads GGUF files: a header of key-value metadata (sizes, the vocabulary) followed by
the tensors, under its own names (``blk.3.attn_q.weight``). :func:`write_gguf` writes our model
as a float32 GGUF with the ``gguf`` package (``pip install gguf``); ``llama-quantize`` turns it
into ``Q8_0`` and ``Q4_0`` (every matrix in that format: ``--pure``); ``llama-bench`` times
generating tokens with each. Both programs come from a build of llama.cpp
(https://github.com/ggml-org/llama.cpp, ``cmake -B build && cmake --build build --target
llama-bench llama-quantize``) and must be on ``PATH``; nothing else in the book needs them.

The vocabulary written is a placeholder (``<t0>``, ``<t1>``, ...): llama-bench feeds token
ids, never text. The query and key projections are permuted from Hugging Face's layout (the
two halves of each head's dimensions, as ``rotate_half`` pairs them) back to the interleaved
pairs llama.cpp's RoPE expects, as llama.cpp's own converter does, so the file computes what
our model computes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from companion.llama import Llama

TOOLS = ("llama-bench", "llama-quantize")
FORMATS = ("F32", "Q8_0", "Q4_0")


def available() -> str | None:
    """``None`` when llama.cpp can be timed here, else the reason it cannot."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is not installed (pip install gguf)"
    return None


def interleave_rope_halves(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of a query or key projection, from the half-split RoPE layout to interleaved pairs.

    In each head of ``d`` rows, Hugging Face rotates row ``i`` with row ``i + d/2``; llama.cpp
    rotates row ``2i`` with row ``2i + 1``. Row ``i`` moves to ``2i`` and row ``i + d/2`` to
    ``2i + 1``.
    """
    out_features = weight.size(0)
    if out_features % (2 * n_heads):
        raise ValueError(f"{out_features} rows cannot be {n_heads} heads of an even size")
    d = out_features // n_heads
    return weight.reshape(n_heads, 2, d // 2, -1).transpose(1, 2).reshape(weight.shape)


def write_gguf(model: Llama, path: str | Path) -> Path:
    """Write ``model`` (a :class:`companion.llama.Llama`) as a float32 GGUF file at ``path``."""
    import gguf

    config = model.config
    if config.tie_word_embeddings:
        raise ValueError("write_gguf writes an untied output layer; this model ties it to the embedding")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    writer.add_token_scores([0.0] * config.vocab_size)
    writer.add_token_types([gguf.TokenType.NORMAL] * config.vocab_size)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def add(name: str, tensor: Tensor) -> None:
        writer.add_tensor(name, tensor.contiguous().numpy())

    add("token_embd.weight", state["embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            w = state[f"layers.{i}.{ours}.weight"]
            if ours == "self_attn.q_proj":
                w = interleave_rope_halves(w, config.num_attention_heads)
            elif ours == "self_attn.k_proj":
                w = interleave_rope_halves(w, config.num_key_value_heads)
            add(f"blk.{i}.{theirs}.weight", w)
    add("output_norm.weight", state["norm.weight"])
    add("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bytes_per_token(path: str | Path) -> int:
    """Bytes of a GGUF file's tensors a new token reads: all of them but one row of the embedding."""
    import gguf

    total = 0
    for tensor in gguf.GGUFReader(str(path)).tensors:
        rows = int(tensor.shape[-1]) if tensor.name == "token_embd.weight" else 1  # GGUF lists shapes reversed
        total += int(tensor.n_bytes) // rows
    return total


def time_llama_cpp(model: Llama, directory: str | Path, *, new_tokens: int, threads: int,
                   repeats: int, formats: tuple[str, ...] = FORMATS) -> dict[str, tuple[float, int]]:
    """Tokens/s of ``llama-bench`` generating ``new_tokens`` tokens, per format: ``{format: (rate, bytes/token)}``.

    ``llama-bench -p 0 -n new_tokens`` times generation alone (no prompt), ``repeats`` times,
    and reports the mean rate; it runs in its own process, after ours.
    """
    directory = Path(directory)
    f32 = write_gguf(model, directory / "model-F32.gguf")
    results = {}
    for fmt in formats:
        path = f32 if fmt == "F32" else directory / f"model-{fmt}.gguf"
        if fmt != "F32":
            subprocess.run(["llama-quantize", "--pure", str(f32), str(path), fmt, str(threads)],
                           check=True, capture_output=True)
        run = subprocess.run(["llama-bench", "-m", str(path), "-p", "0", "-n", str(new_tokens),
                              "-t", str(threads), "-r", str(repeats), "-o", "json"],
                             check=True, capture_output=True, text=True)
        (row,) = json.loads(run.stdout)
        results[fmt] = (float(row["avg_ts"]), bytes_per_token(path))
    return results
