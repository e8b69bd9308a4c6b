"""companion.checkpoint: our safetensors reader and from_pretrained, on directories save_pretrained wrote."""

import json
import pickle
from dataclasses import replace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from companion import checkpoint
from companion.checkpoint import Checkpoint, CheckpointError, SafetensorsFile
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig
from companion.phi import Phi, PhiConfig



FAMILIES = {
    "llama": (Llama, LlamaConfig.preset("tiny", num_key_value_heads=2), transformers.LlamaForCausalLM,
              transformers.LlamaConfig),
    "mistral": (Mistral, MistralConfig.preset("tiny"), transformers.MistralForCausalLM, transformers.MistralConfig),
    "phi": (Phi, PhiConfig.preset("tiny"), transformers.PhiForCausalLM, transformers.PhiConfig),
}


def save_random(tmp_path, family, name="ckpt", max_shard_size=None, **overrides):
    """save_pretrained a Hugging Face model with random weights; return (directory, model)."""
    _, config, hf_cls, hf_config_cls = FAMILIES[family]
    torch.manual_seed(0)
    hf = hf_cls(hf_config_cls(**{**config.to_hf(), **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / name
    hf.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path, hf


# ---- the safetensors reader ------------------------------------------------------------------


def test_our_reader_agrees_with_the_safetensors_library(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
        "i64": torch.arange(7), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "u8": torch.arange(4, dtype=torch.uint8),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours = SafetensorsFile(tmp_path / "t.safetensors")
    reference = load_file(tmp_path / "t.safetensors")
    assert sorted(ours.names()) == sorted(reference)
    for name, tensor in reference.items():
        got = ours.tensor(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
        assert ours.shape(name) == tuple(tensor.shape)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_from_pretrained_gives_hugging_faces_logits(tmp_path, family, sharded, attn):
    path, hf = save_random(tmp_path, family, max_shard_size="40KB" if sharded else None)
    assert (path / "model.safetensors.index.json").exists() == sharded
    model = FAMILIES[family][0].from_pretrained(path, attn_implementation=attn)
    assert model.config == replace(FAMILIES[family][1], attn_implementation=attn)
    idx = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        assert torch.allclose(model(idx), hf(idx).logits, atol=1e-5, rtol=0)


def test_tied_checkpoint_has_no_lm_head_and_loads_tied(tmp_path):
    path, hf = save_random(tmp_path, "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in SafetensorsFile(path / "model.safetensors").names()
    model = Llama.from_pretrained(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    idx = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.allclose(model(idx), hf(idx).logits, atol=1e-5)


def test_loads_in_another_dtype(tmp_path):
    path, hf = save_random(tmp_path, "phi")
    model = Phi.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = hf.model.layers[1].mlp.fc1.weight.to(torch.bfloat16)
    assert torch.equal(model.layers[1].mlp.fc1.weight, expected)


def test_older_config_files_with_top_level_rope_fields(tmp_path):
    path, _ = save_random(tmp_path, "phi")
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")  # how config.json files written before transformers 5 look
    config["rope_theta"], config["partial_rotary_factor"] = 500.0, rope["partial_rotary_factor"]
    (path / "config.json").write_text(json.dumps(config))
    assert Phi.from_pretrained(path).config == PhiConfig.preset("tiny", rope_theta=500.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_hugging_faces_own_attn_implementation_keys_are_ignored(tmp_path, family):
    """config.json may name Hugging Face's attention kernels; ours is chosen by from_pretrained."""
    path, _ = save_random(tmp_path, family)
    config = json.loads((path / "config.json").read_text())
    assert "attn_implementation" not in config  # not needed: Hugging Face does not write it
    config |= {"attn_implementation": "flash_attention_2", "_attn_implementation": "flash_attention_2"}
    (path / "config.json").write_text(json.dumps(config))
    model_cls, expected = FAMILIES[family][:2]
    assert model_cls.from_pretrained(path).config == expected  # attn_implementation="sdpa", the default
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' must be 'sdpa' or 'eager'"):
        model_cls.from_pretrained(path, attn_implementation="flash_attention_2")


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    path, _ = save_random(tmp_path, "mistral", max_shard_size="40KB")

    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    Mistral.from_pretrained(path)


# ---- errors that say which -------------------------------------------------------------------


def rewrite(path, edit):
    """Apply ``edit`` to the tensors of ``path/model.safetensors`` and save them back."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    path, _ = save_random(tmp_path, "llama")
    rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path, _ = save_random(tmp_path, "llama")
    rewrite(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias"):
        Llama.from_pretrained(path)


def test_wrongly_shaped_tensor_is_named_with_both_shapes(tmp_path):
    path, _ = save_random(tmp_path, "phi")
    rewrite(path, lambda t: t.update({"model.layers.0.mlp.fc1.weight": t["model.layers.0.mlp.fc1.weight"].T.contiguous()}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: model\.layers\.0\.mlp\.fc1\.weight is "
                                              r"\(80, 320\), expected \(320, 80\)"):
        Phi.from_pretrained(path)


def test_config_of_another_family_says_which(tmp_path):
    path, _ = save_random(tmp_path, "mistral")
    with pytest.raises(CheckpointError, match="describes a 'mistral' model .* not a 'llama' model; "
                                              "load it with companion.mistral.Mistral"):
        Llama.from_pretrained(path)
    path, _ = save_random(tmp_path, "llama", name="llama")
    with pytest.raises(CheckpointError, match="describes a 'llama' model"):
        Phi.from_pretrained(path)


def test_unsupported_config_fields_are_refused(tmp_path):
    path, _ = save_random(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    for field, value, message in [("attention_bias", True, "attention_bias=True"),
                                  ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "RoPE scaling of type 'linear'")]:
        (path / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointError, match=message):
            Llama.from_pretrained(path)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:5], "only 5 bytes, too short"),
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length says 1000000000 bytes"),
    (lambda b: b[:8] + b"\xff" * 20 + b[28:], "header is not valid JSON"),
    (lambda b: b"hello, world! this is not a model", "header length says"),
])
def test_corrupt_file_is_named(tmp_path, damage, message):
    path, _ = save_random(tmp_path, "llama")
    file = path / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(CheckpointError, match=f"model.safetensors: .*{message}"):
        Llama.from_pretrained(path)


def test_wrong_byte_count_in_the_header_is_named(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    file = tmp_path / "bad.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(CheckpointError, match=r"tensor 'w' of shape \[4\] and dtype F32 needs 16 bytes"):
        SafetensorsFile(file)


def test_missing_shard_and_inconsistent_index_are_named(tmp_path):
    path, _ = save_random(tmp_path, "llama", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists the shard {shard.name}, which is not in"):
        Llama.from_pretrained(path)
    shard.write_bytes(data)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    wrong = index["weight_map"]["model.embed_tokens.weight"]  # a 64 KB shard of its own
    assert wrong != index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = wrong
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"says 'model.norm.weight' is in {wrong}, which does not contain it"):
        Checkpoint(path)


def test_pickled_checkpoints_are_refused_not_opened(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.preset("tiny").to_hf() | {"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin, pickled checkpoints .* reads safetensors only"):
        Llama.from_pretrained(tmp_path)


def test_not_a_directory_or_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        Llama.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no config.json"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json in .* is not valid JSON"):
        Llama.from_pretrained(tmp_path)


def test_name_maps_are_inverse():
    for name in ["model.embed_tokens.weight", "model.layers.3.self_attn.dense.bias", "lm_head.weight"]:
        assert checkpoint.ours_to_hf(checkpoint.hf_to_ours(name)) == name


@pytest.mark.parametrize("family", ["llama", "mistral", "phi"])
def test_save_pretrained_round_trips_through_ours_and_transformers(family, tmp_path):
    """A float model saved by save_pretrained loads back in ours and in transformers with the same logits."""
    from transformers import AutoModelForCausalLM

    from companion.checkpoint import save_pretrained
    from companion.llama import Llama, LlamaConfig
    from companion.mistral import Mistral, MistralConfig
    from companion.phi import Phi, PhiConfig

    cls, config = {"llama": (Llama, LlamaConfig), "mistral": (Mistral, MistralConfig), "phi": (Phi, PhiConfig)}[family]
    torch.manual_seed(0)
    model = cls(config.preset("tiny")).eval()
    save_pretrained(model, tmp_path / family)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    again = cls.from_pretrained(tmp_path / family).eval()
    assert torch.equal(again(idx), model(idx))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx), atol=1e-5)
    with pytest.raises(ValueError, match="saves Llama, Mistral or Phi models, not Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "bad")
