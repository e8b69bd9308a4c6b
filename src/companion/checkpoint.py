"""Reading a Hugging Face checkpoint directory with our own code.

A directory written by ``save_pretrained`` holds:

* ``config.json``: the sizes of the model, as JSON;
* ``model.safetensors``, or several shards ``model-00001-of-00003.safetensors`` ... plus
  ``model.safetensors.index.json``, whose ``weight_map`` says which shard holds which tensor.

A safetensors file is deliberately simple: 8 bytes giving the length ``n`` of a header
(little-endian), ``n`` bytes of JSON describing every tensor (dtype, shape, byte range), then
the raw bytes of all tensors. There is no code in it, so reading one cannot run anything,
unlike a pickled ``pytorch_model.bin``. Nothing here unpickles anything.

:class:`SafetensorsFile` parses a file and returns tensors that are views into a
memory-mapped copy of it, so a 14 GB checkpoint is read piece by piece as its tensors are
copied into the model. :class:`Checkpoint` puts the shards of a directory together.
:func:`load_model` builds a model without allocating random weights (on PyTorch's ``meta``
device), checks every name and shape against the list the model family gives, and copies the
tensors in. Every problem raises :class:`CheckpointError` with a message that names the file,
the tensor or the config field at fault.

Our models use Hugging Face's module names without the ``model.`` prefix
(:func:`hf_to_ours`), so the map from checkpoint names to ours is one line, and the list of
expected names and shapes, written out per family (``hf_tensor_shapes``), is the explicit part.
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "SafetensorsFile",
    "check_head_dim",
    "check_model_type",
    "check_tensors",
    "check_unsupported",
    "fused_module",
    "MODEL_TYPES",
    "hf_state_dict",
    "save_pretrained",
    "tied_embeddings",
    "hf_to_ours",
    "load_hf_state_dict",
    "load_model",
    "ours_to_hf",
    "partial_rotary_factor_of",
    "read_config",
    "rope_theta_of",
]

# safetensors dtype names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
# Where to load each family, for the message when a config.json belongs to another one.
FAMILIES = {"llama": "companion.llama.Llama", "mistral": "companion.mistral.Mistral",
            "phi": "companion.phi.Phi", "gpt2": "companion.gpt"}
# Tensors some older checkpoints carry that are not weights (RoPE frequencies, recomputed).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_HEADER_BYTES = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that does not fit: the message says which file, tensor or field."""


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- one safetensors file --------------------------------------------------------------------


class SafetensorsFile:
    """A safetensors file: its header parsed and checked, its tensors read on demand.

    >>> import tempfile, os
    >>> header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> _ = open(path, "wb").write(len(header).to_bytes(8, "little") + header
    ...                            + torch.tensor([1.5, -2.0]).numpy().tobytes())
    >>> SafetensorsFile(path).tensor("w")
    tensor([ 1.5000, -2.0000])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries, self.data_start = self._read_header()
        self._mmap: mmap.mmap | None = None

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path.name}: {why}")

    def _read_header(self) -> tuple[dict[str, dict[str, Any]], int]:
        size = self.path.stat().st_size
        if size < 8:
            raise self._fail(f"only {size} bytes, too short for a safetensors file "
                             "(it starts with an 8-byte header length)")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise self._fail(f"the header length says {n} bytes but the file has {size - 8} after it: "
                                 "the file is truncated or not safetensors")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._fail(f"the header is not valid JSON ({err}): the file is corrupt or not safetensors") from None
        if not isinstance(header, dict):
            raise self._fail("the header is not a JSON object: the file is corrupt or not safetensors")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        for name, entry in header.items():
            self._check_entry(name, entry, data_size)
        return header, 8 + n

    def _check_entry(self, name: str, entry: Any, data_size: int) -> None:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._fail(f"tensor {name!r} has a malformed header entry {entry!r}")
        if entry["dtype"] not in DTYPES:
            raise self._fail(f"tensor {name!r} has dtype {entry['dtype']!r}; "
                             f"this reader knows {sorted(DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[entry["dtype"]].itemsize
        if not 0 <= begin <= end <= data_size:
            raise self._fail(f"tensor {name!r} claims bytes {begin}..{end} but the data section has "
                             f"{data_size} bytes: the file is truncated or corrupt")
        if end - begin != expected:
            raise self._fail(f"tensor {name!r} of shape {shape} and dtype {entry['dtype']} needs "
                             f"{expected} bytes but its byte range holds {end - begin}")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def tensor(self, name: str) -> Tensor:
        """The tensor ``name``, a view into the memory-mapped file (no copy yet)."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path.name} has no tensor {name!r}")
        entry = self.entries[name]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        if self._mmap is None:
            with open(self.path, "rb") as f:
                # Copy-on-write: pages are read from disk only when touched, and the file
                # itself can never be modified through this map.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (end - begin) // dtype.itemsize
        return torch.frombuffer(self._mmap, dtype=dtype, count=count, offset=self.data_start + begin).view(shape)


# ---- a checkpoint directory ------------------------------------------------------------------


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: give the folder that holds config.json "
                              "and the .safetensors files")
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"config.json in {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"config.json in {path} is not a JSON object")
    return config


class Checkpoint:
    """All tensors of a checkpoint directory, one file or sharded, by name.

    ``shapes()`` gives every tensor's shape from the headers alone; ``tensor(name)`` reads one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory")
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.exists():
            files = self._files_from_index(index)
        elif single.exists():
            files = [SafetensorsFile(single)]
        else:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            why = (f"it has only {_listing(pickles)}, pickled checkpoints that can run code when loaded; "
                   "this loader reads safetensors only (save with safe_serialization=True)") if pickles else \
                  "it has neither model.safetensors nor model.safetensors.index.json"
            raise CheckpointError(f"no safetensors checkpoint in {self.path}: {why}")
        self.where: dict[str, SafetensorsFile] = {}
        for file in files:
            for name in file.names():
                if name in self.where:
                    raise CheckpointError(f"tensor {name!r} is in both {self.where[name].path.name} "
                                          f"and {file.path.name}")
                self.where[name] = file

    def _files_from_index(self, index: Path) -> list[SafetensorsFile]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index.name} is not a valid index (no weight_map): {err!r}") from None
        files = {}
        for name, file_name in weight_map.items():
            if file_name not in files:
                if not (self.path / file_name).exists():
                    raise CheckpointError(f"{index.name} lists the shard {file_name}, which is not in {self.path}")
                files[file_name] = SafetensorsFile(self.path / file_name)
            if name not in files[file_name].entries:
                raise CheckpointError(f"{index.name} says {name!r} is in {file_name}, which does not contain it")
        return list(files.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: file.shape(name) for name, file in self.where.items()}

    def tensor(self, name: str) -> Tensor:
        if name not in self.where:
            raise CheckpointError(f"the checkpoint in {self.path} has no tensor {name!r}")
        return self.where[name].tensor(name)


# ---- reading config.json ---------------------------------------------------------------------


def check_model_type(hf: Mapping[str, Any], expected: str) -> None:
    """Raise unless ``config.json`` describes a model of family ``expected``."""
    found = hf.get("model_type")
    if found != expected:
        hint = f"; load it with {FAMILIES[found]}" if found in FAMILIES else ""
        raise CheckpointError(f"config.json describes a {found!r} model (architectures "
                              f"{hf.get('architectures')}), not a {expected!r} model{hint}")


def check_unsupported(hf: Mapping[str, Any], required: Mapping[str, Any]) -> None:
    """Raise if ``config.json`` sets a field to a value this implementation does not have."""
    for key, value in required.items():
        if hf.get(key) is not None and hf[key] != value:
            raise CheckpointError(f"config.json has {key}={hf[key]!r}; this implementation supports "
                                  f"only {key}={value!r}")


def check_head_dim(hf: Mapping[str, Any]) -> None:
    """Raise if ``config.json`` sets a ``head_dim`` other than ``hidden_size // num_attention_heads``."""
    derived = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, derived):
        raise CheckpointError(f"config.json has head_dim={hf['head_dim']}, but this implementation "
                              f"uses hidden_size // num_attention_heads = {derived}")


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings: ``rope_parameters`` (transformers 5) or top-level fields (older files)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", params.get("type"))
    if rope_type not in (None, "default"):
        raise CheckpointError(f"config.json asks for RoPE scaling of type {rope_type!r}; "
                              "this implementation has plain RoPE only")
    return params


def rope_theta_of(hf: Mapping[str, Any], default: float = 10000.0) -> float:
    """The RoPE base ``theta`` of a ``config.json``."""
    return float(_rope(hf).get("rope_theta", hf.get("rope_theta", default)))


def partial_rotary_factor_of(hf: Mapping[str, Any], default: float = 1.0) -> float:
    """The fraction of each head's features that RoPE rotates."""
    return float(_rope(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", default)))


# ---- names and shapes ------------------------------------------------------------------------


def hf_to_ours(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``layers.0.mlp.up_proj.weight``.

    >>> hf_to_ours("model.norm.weight"), hf_to_ours("lm_head.weight")
    ('norm.weight', 'lm_head.weight')
    """
    return name.removeprefix("model.")


def ours_to_hf(name: str) -> str:
    """The inverse of :func:`hf_to_ours`.

    >>> ours_to_hf("norm.weight"), ours_to_hf("lm_head.bias")
    ('model.norm.weight', 'lm_head.bias')
    """
    return name if name.startswith("lm_head.") else "model." + name


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                  where: str = "the checkpoint") -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and wrongly shaped tensors.

    >>> check_tensors({"w": (2, 3)}, {"w": (2, 3)})  # fine
    >>> check_tensors({"w": (2, 3)}, {"w": (3, 2), "b": (1,)})
    Traceback (most recent call last):
    ...
    companion.checkpoint.CheckpointError: the checkpoint does not fit the model: unexpected tensors: b; wrong shapes: w is (3, 2), expected (2, 3)
    """
    found = {n: s for n, s in found.items() if not n.endswith(IGNORED_SUFFIXES)}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n} is {tuple(found[n])}, expected {tuple(expected[n])}"
             for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    problems = [f"{what}: {_listing(names)}" for what, names in
                [("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)] if names]
    if problems:
        raise CheckpointError(f"{where} does not fit the model: " + "; ".join(problems))


def _copy_into(model: nn.Module, expected: Mapping[str, tuple[int, ...]], get: Callable[[str], Tensor]) -> None:
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens.weight
    ours = {hf_to_ours(n) for n in expected}
    if ours != set(params):
        raise RuntimeError(f"the shape list and the model disagree: {sorted(ours ^ set(params))}")
    with torch.no_grad():
        for name in expected:
            params[hf_to_ours(name)].copy_(get(name))


def load_model(model_cls: Callable[[Any], nn.Module], config: Any, path: str | Path,
               expected: Mapping[str, tuple[int, ...]], *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> nn.Module:
    """Build ``model_cls(config)`` and fill it from the checkpoint directory ``path``.

    Names and shapes are checked from the headers before any weight is read. The model is
    built on the ``meta`` device (shapes, no memory), then given empty memory on ``device``,
    so only one copy of the weights ever exists. Returns the model in eval mode.

    A directory whose ``config.json`` has a ``quantization_config`` (written by
    :func:`companion.quantize.save_quantized`) is loaded by :func:`companion.quantize.load_quantized`.
    """
    quantization = read_config(path).get("quantization_config")
    if quantization is not None:
        from companion.quantize import load_quantized  # imported here: quantize imports this module

        return load_quantized(model_cls, config, path, expected, quantization, dtype=dtype, device=device)
    ckpt = Checkpoint(path)
    check_tensors(expected, ckpt.shapes(), where=f"the checkpoint in {ckpt.path}")
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype).to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight  # to_empty made two tensors of one
    _copy_into(model, expected, ckpt.tensor)
    return model.eval()


def load_hf_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor],
                       expected: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """Copy a Hugging Face state dict (e.g. ``LlamaForCausalLM(...).state_dict()``) into ``model``.

    For a tied model, Hugging Face's state dict also lists ``lm_head.weight``; it is the
    embedding, so it is skipped.
    """
    _refuse_fused(model)
    shapes = {n: tuple(t.shape) for n, t in state_dict.items()}
    if "lm_head.weight" not in expected:
        shapes.pop("lm_head.weight", None)
    check_tensors(expected, shapes, where="the state dict")
    _copy_into(model, expected, state_dict.__getitem__)
    return model


def fused_module(model: nn.Module) -> str | None:
    """The name of the first module of ``model`` whose projections
    :func:`companion.fusion.fuse_projections` stacked (``qkv_proj``, ``gate_up_proj``), or None."""
    for name, module in model.named_modules():
        if hasattr(module, "qkv_proj") or hasattr(module, "gate_up_proj"):
            return name
    return None


def _refuse_fused(model: nn.Module) -> None:
    """Checkpoints keep Hugging Face's separate matrices: a ValueError for a model whose projections are stacked."""
    name = fused_module(model)
    if name is not None:
        raise ValueError(f"{name} holds fused projections (companion.fusion.fuse_projections), which Hugging "
                         "Face's names do not describe: call companion.fusion.unfuse_projections(model) first")


def hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our model's weights under Hugging Face's names (the tensors are shared, not copied)."""
    _refuse_fused(model)
    return {ours_to_hf(n): p for n, p in model.named_parameters()}


# Our model classes, and the model_type and architecture Hugging Face gives them in config.json.
MODEL_TYPES = {"Llama": ("llama", "LlamaForCausalLM"), "Mistral": ("mistral", "MistralForCausalLM"),
               "Phi": ("phi", "PhiForCausalLM")}


def tied_embeddings(model: nn.Module) -> bool:
    """Does the output layer share the embedding's weight (``tie_word_embeddings``)?"""
    head, embed = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    return isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding) and head.weight is embed.weight


def save_pretrained(model: nn.Module, directory: str | Path, *, extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write a Llama, Mistral or Phi as a Hugging Face directory: ``config.json`` and ``model.safetensors``.

    ``config.json`` is the model's config in Hugging Face's names (``config.to_hf()``, with
    ``model_type`` and ``architectures``) plus ``extra_config``; the tensors are stored under
    Hugging Face's names, a tied output layer once, as the embedding. Our ``from_pretrained``,
    ``transformers``' ``AutoModelForCausalLM.from_pretrained`` and ``python -m companion.serve
    --model DIR`` all read the directory. Nothing in it is code. Returns the directory.
    """
    from safetensors.torch import save_file

    kind = type(model).__name__
    if kind not in MODEL_TYPES or not hasattr(model, "config"):
        raise ValueError(f"save_pretrained saves Llama, Mistral or Phi models, not {kind}")
    _refuse_fused(model)
    model_type, architecture = MODEL_TYPES[kind]
    config = {"architectures": [architecture], "model_type": model_type, **model.config.to_hf(), **(extra_config or {})}
    tensors = {ours_to_hf(name): t.detach().contiguous() for name, t in model.state_dict().items()}
    if tied_embeddings(model):  # stored once, as the embedding, as Hugging Face does
        tensors.pop("lm_head.weight")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory
