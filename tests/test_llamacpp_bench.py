"""benchmarks/llamacpp_bench.py: the GGUF file llama.cpp is timed on computes our model's logits.

The oracle is ``transformers``' own GGUF loader, which undoes llama.cpp's RoPE layout when it
reads a Llama file: if our permutation of the query and key rows were wrong, its logits would
not be ours.
"""

import sys
from pathlib import Path

import pytest
import torch

from companion.llama import Llama, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llamacpp_bench  # noqa: E402

pytest.importorskip("gguf")  # installed with the reference extra; skipped only outside `make test`


def tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
                            **overrides})
    return Llama(config).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gguf_file_gives_our_logits_through_transformers_loader(tmp_path, kv_heads):
    import transformers

    model = tiny(num_key_value_heads=kv_heads, rope_theta=500.0)  # not the default: the file must carry it
    llamacpp_bench.write_gguf(model, tmp_path / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    assert theirs.config.num_key_value_heads == kv_heads
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=0, atol=1e-5)


def test_rope_rows_move_from_halves_to_pairs():
    # one head of 6 rows: rows 0, 1, 2 pair with 3, 4, 5; llama.cpp wants 0, 3, 1, 4, 2, 5
    w = torch.arange(12.0).reshape(6, 2)
    out = llamacpp_bench.interleave_rope_halves(w, n_heads=1)
    assert out[:, 0].tolist() == [0, 6, 2, 8, 4, 10]
    two_heads = llamacpp_bench.interleave_rope_halves(torch.arange(8.0)[:, None], n_heads=2)
    assert two_heads[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ValueError, match="6 rows cannot be 2 heads of an even size"):
        llamacpp_bench.interleave_rope_halves(w, n_heads=2)


def test_bytes_per_token_counts_every_weight_once_and_one_embedding_row(tmp_path):
    model = tiny()
    path = llamacpp_bench.write_gguf(model, tmp_path / "m.gguf")
    weights = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    assert llamacpp_bench.bytes_per_token(path) == 4 * (weights + model.config.hidden_size)


def test_tied_model_and_missing_tools_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="ties it to the embedding"):
        llamacpp_bench.write_gguf(tiny(tie_word_embeddings=True), tmp_path / "m.gguf")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert llamacpp_bench.available() == "llama-bench and llama-quantize not on PATH"
