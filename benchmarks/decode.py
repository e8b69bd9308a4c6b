"""Greedy decoding speed: our Llama against Hugging Face ``generate`` on the same weights.

Both run in this process, one after the other, on the same random weights and the same
prompt; we print whether they produce the same tokens (in float32 they must). We report tokens
per second for each, their ratio, and the memory bandwidth decoding achieves: every new token
reads every weight once (except the embedding table, of which it reads one row), so
``weight bytes x tokens/s`` is the bandwidth used, which cannot exceed what the memory delivers
(``--peak-gbps``).

    # CPU (default): a Llama-shaped model of about 220M parameters in float32
    .venv/bin/python benchmarks/decode.py
    # GPU: a Llama-2-7B-shaped model in bfloat16
    python benchmarks/decode.py --device cuda

Each run times Hugging Face ``generate`` (with its dynamic cache, and with
``cache_implementation="static"``), our eager loop and our loop with the step compiled by
:func:`companion.generation.static_cache.compile_step` (on a CPU, tens of seconds of compilation first, not
counted; ``--no-compile`` skips it). Where the C kernels of :mod:`companion.cpu_kernels` run, our
quantized models run with their projections fused (:func:`companion.fusion.fuse_projections`:
q, k, v in one matrix, gate and up in another; ``--no-fuse`` keeps them apart), which saves
calls to the kernels. The float32 model and the "no C kernel" rows keep them apart: Inductor's
loops (float32 where :class:`companion.layers.Linear` uses them, int8) were slower on the
stacked matrices (float32 compiled: 21.3 tokens/s fused against 24.5 apart on the 2-core Xeon
of ``results/``, its products as Inductor's loops; through MKL, 30.3 against 29.7, within
the noise), and PyTorch's int4 kernel gained nothing. ``--quant int8 int4`` adds our weight-only quantized
models (:mod:`companion.quantize`, compiled) and torchao's int8 weight-only quantization of
the Hugging Face model (bf16 activations, compiled, static cache), all on the same weights.
On a CPU where the C kernels of :mod:`companion.cpu_kernels` run, each of our quantized
models is timed twice: with them, and with what the layers use without them ("no C kernel":
PyTorch's int4 kernel; for int8, Inductor's loop over the int8 matrix):

    .venv/bin/python benchmarks/decode.py --quant int8 int4

On a GPU our bf16 model is timed twice, with its projections apart and fused (``--no-fuse``:
apart only); our quantized models run fused, each timed with the Triton kernels of
:mod:`companion.quant_triton` and with Inductor's reductions of ``one_row_forward``
("Inductor's loop"); ``generate`` compiles the models with a static cache itself. Compiling
takes most of the run: on an H200 160-200 s per Llama-2-7B-shaped model, so ``--layers 4``
keeps its matrices with 4 of its 32 layers (``benchmarks/gpu.sh`` does). In ``results/decode_quant_gpu_h200.txt``, measured before the
Triton kernels existed, "compiled" alone is Inductor's loop::

    python benchmarks/decode.py --device cuda --layers 4 --quant int8 int4

When ``llama-bench`` and ``llama-quantize`` (from a build of llama.cpp) are on ``PATH`` and the
``gguf`` package is installed, the same weights are also written as a GGUF file and llama.cpp
is timed in F32, Q8_0 and Q4_0 (:mod:`llamacpp_bench`; ``--no-llama-cpp`` skips it). llama-bench
runs in its own process after ours and times generation without a prompt.

Timings on a shared machine are noisy: run it twice and compare the ratios, not the digits.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from companion import cpu_kernels
from companion.bench import measure_bandwidth, synchronize
from companion.checkpoint import hf_state_dict
from companion.fusion import fuse_projections, is_fused, unfuse_projections
from companion.generation.static_cache import compile_step, decode
from companion.llama import Llama, LlamaConfig, count_parameters
from companion.quantize import quantize_

SIZES = {
    # about 220M parameters: 12 layers of width 1024, a 32000-token vocabulary.
    "cpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    "llama-2-7b": dict(),
    # for checking that the script runs, in seconds
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def build(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> tuple[Llama, torch.nn.Module]:
    """Our model with random weights, and Hugging Face's ``LlamaForCausalLM`` sharing them."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of a 7B model
    try:
        with torch.device(device):
            ours = Llama(config).eval()
            hf = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    # assign=True: the Hugging Face model takes our tensors, so both run on the same weights.
    hf.load_state_dict(hf_state_dict(ours), strict=True, assign=True)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    return ours, hf.eval()


def interleaved(runners: dict, device: torch.device, repeats: int) -> dict:
    """Time each runner ``repeats`` times, taking turns, after one warm-up run of each.

    Each runner's warm-up (its compilation) is followed by its first timed run, and both are
    reported on standard error as they end, so that a run cut short (a GPU lent for minutes)
    still says how far it got; the other runs take turns, which spreads the load of a shared
    machine evenly over the runners. Each runner's median time is kept. Returns ``{name:
    (output, seconds)}``.
    """
    def timed(fn) -> tuple:
        synchronize(device)
        start = time.perf_counter()
        output = fn()
        synchronize(device)
        return output, time.perf_counter() - start

    outputs: dict = {}
    times: dict = {name: [] for name in runners}
    for name, fn in runners.items():
        _, warm_up = timed(fn)  # and compilation
        outputs[name], seconds = timed(fn)
        times[name].append(seconds)
        print(f"# {name}: warm-up {warm_up:.1f} s, then {seconds:.3f} s", file=sys.stderr, flush=True)
    for _ in range(repeats - 1):
        for name, fn in runners.items():
            outputs[name], seconds = timed(fn)
            times[name].append(seconds)
    return {name: (outputs[name], statistics.median(times[name])) for name in runners}


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes a new token reads: every weight and quantization scale, but one row of the embedding table."""
    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao): count what it stores
            return sum(nbytes(getattr(t, inner)) for inner in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for module_name, module in model.named_modules():
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        # Int4Linear: a step reads the copy of the kernel it uses (C, else PyTorch's), not the others
        if getattr(module, "gemv_weight", None) is not None:
            skip = ("qweight", "scales", "mins", "kernel_weight", "kernel_scales_and_zeros")
            tensors = {k: v for k, v in tensors.items() if k not in skip}
        elif getattr(module, "kernel_weight", None) is not None:
            tensors = {k: v for k, v in tensors.items() if k not in ("qweight", "scales", "mins")}
        for name, t in tensors.items():
            if t is None or id(t) in seen or "cache" in module_name or name in ("k", "v", "slot_pos"):
                continue  # tied weights count once; the KV cache is not a weight
            seen.add(id(t))
            total += nbytes(t) // (t.size(0) if "embed" in module_name else 1)
    return total


def without_c_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a quantized model whose layers use PyTorch's kernels, not :mod:`companion.cpu_kernels`.

    Its projections are apart (:func:`companion.fusion.unfuse_projections`): Inductor's int8
    loop was slower on the stacked matrices, and PyTorch's int4 kernel gained nothing.
    """
    model = unfuse_projections(copy.deepcopy(model))
    for module in model.modules():
        if hasattr(module, "gemv_weight"):
            module.gemv_weight = None
        if hasattr(module, "c_kernel"):
            module.c_kernel = False
    return model


def without_triton_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a quantized model whose layers, on a GPU, leave one row to Inductor (``one_row_forward``)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "gpu_kernel"):
            module.gpu_kernel = False
    return model


def torchao_int8(hf: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of the Hugging Face model with torchao's int8 weight-only linears."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)  # a warning per GPU library missing on a CPU
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as torchao_quantize_

    model = copy.deepcopy(hf).to(torch.bfloat16)
    torchao_quantize_(model, Int8WeightOnlyConfig())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", choices=sorted(SIZES), help="default: cpu on CPU, llama-2-7b on CUDA")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the size's number of layers (a shorter compilation, the same matrices)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our decoding step under torch.compile (CUDA graphs on a GPU); "
                             "--no-compile skips it")
    parser.add_argument("--static", action=argparse.BooleanOptionalAction, default=True,
                        help="also time generate with cache_implementation='static'")
    parser.add_argument("--quant", nargs="+", choices=["int8", "int4"], default=[],
                        help="also time our weight-only int8 and/or int4 models (compiled), and "
                             "torchao's int8 weight-only (bf16 activations, compiled) when int8 is asked")
    parser.add_argument("--torchao", action=argparse.BooleanOptionalAction, default=True,
                        help="with --quant int8, also time torchao's int8 weight-only; --no-torchao skips it")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="run our quantized models with fused projections (companion.fusion); "
                             "--no-fuse keeps them apart")
    parser.add_argument("--group-size", type=int, default=64, help="group size of int4 (32, 64 or 128)")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                        help="also time llama.cpp (F32, Q8_0, Q4_0) on the same weights; default: when "
                             "llama-bench, llama-quantize and the gguf package are there (CPU only)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's memory bandwidth in GB/s (default: measured by summing a large tensor)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    device = torch.device(args.device)
    size = args.size or ("cpu" if device.type == "cpu" else "llama-2-7b")
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = args.peak_gbps or measure_bandwidth(device, megabytes=1024 if device.type == "cuda" else 512) / 1e9
    torch.manual_seed(0)

    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    config = LlamaConfig(**SIZES[size] | ({"num_hidden_layers": args.layers} if args.layers else {}))
    n_params = count_parameters(config)
    ours, hf = build(config, device, dtype)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device)
    n = args.new_tokens
    max_len = args.prompt_len + n
    print(f"model: Llama-shaped '{size}', {n_params / 1e6:.1f}M parameters, {dtype}, on {device} "
          f"({torch.get_num_threads()} CPU threads); measured memory bandwidth {peak:.1f} GB/s")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"greedy decoding of {n} new tokens after a {args.prompt_len}-token prompt, median of {args.repeats}")

    def hf_generate(model, **kwargs):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      use_cache=True, **kwargs)

    models = {"transformers generate": hf, "ours, eager": ours}
    runners = {"transformers generate": hf_generate(hf),
               "ours, eager": lambda: decode(ours, prompt, n, max_seq_len=max_len)}
    # Ours first, then the other references: a run cut short (a GPU lent for minutes) has ours.
    if args.compile:
        step = compile_step(ours)
        models["ours, torch.compile"] = ours
        runners["ours, torch.compile"] = lambda: decode(ours, prompt, n, max_seq_len=max_len, step=step)
    if args.compile and args.fuse and device.type == "cuda":  # fewer, larger products per layer
        fused = fuse_projections(copy.deepcopy(ours))
        fused_step = compile_step(fused)
        models["ours, compiled, fused"] = fused
        runners["ours, compiled, fused"] = lambda: decode(fused, prompt, n, max_seq_len=max_len, step=fused_step)
    for scheme in args.quant:
        quantized = quantize_(copy.deepcopy(ours), scheme, group_size=args.group_size)
        # fewer calls to the C kernels on a CPU; fewer, larger reductions on a GPU
        if args.fuse and (device.type == "cuda" or cpu_kernels.available()):
            fuse_projections(quantized)
        label = f"ours, {scheme}" + (f" g{args.group_size}" if scheme == "int4" else "")
        variants = {f"{label}, compiled" + (", Triton" if device.type == "cuda" else ""): quantized}
        if device.type == "cpu" and cpu_kernels.available():  # ours with PyTorch's kernels, side by side
            variants[f"{label}, no C kernel"] = without_c_kernels(quantized)
        if device.type == "cuda":  # our Triton kernels against Inductor's reductions of one_row_forward
            variants[f"{label}, Inductor's loop"] = without_triton_kernels(quantized)
        for name, model in variants.items():
            qstep = compile_step(model)
            models[name] = model
            runners[name] = lambda m=model, s=qstep: decode(m, prompt, n, max_seq_len=max_len, step=s)
    if args.static:
        models["generate, static cache"] = hf
        runners["generate, static cache"] = hf_generate(hf, cache_implementation="static")
    if "int8" in args.quant and args.torchao:
        ao = torchao_int8(hf)
        if device.type == "cpu":  # on a GPU, generate compiles a model with a static cache itself
            ao.forward = torch.compile(ao.forward, fullgraph=True)
        models["torchao int8, compiled"] = ao
        runners["torchao int8, compiled"] = hf_generate(ao, cache_implementation="static")
    runs = interleaved(runners, device, args.repeats)

    reference_tokens, reference_seconds = runs["transformers generate"]
    print(f"\n{'':28s} {'tokens/s':>9s} {'vs HF':>7s} {'GB/token':>9s} {'GB/s':>7s} {'of bw':>6s}"
          f"  tokens as HF {str(dtype).removeprefix('torch.')}")
    for name, (tokens, seconds) in runs.items():
        rate = n / seconds
        per_token = weight_bytes_read(models[name])
        gbps = per_token * rate / 1e9
        same = (tokens.cpu()[:, args.prompt_len:] == reference_tokens.cpu()[:, args.prompt_len:]).float().mean()
        print(f"{name:28s} {rate:9.1f} {reference_seconds / seconds:6.2f}x {per_token / 1e9:9.3f} "
              f"{gbps:7.1f} {gbps / peak:6.0%}  {same:.0%} the same")
    if device.type == "cpu" and args.llama_cpp is not False:
        time_llama_cpp_rows(ours, args, reference_seconds, peak)
    fused = [name for name, model in models.items() if is_fused(model)]
    print("\nGB/token: weights and scales a new token reads (one row of the embedding table); GB/s = that x "
          "tokens/s, beside the bandwidth measured by summing a large tensor ('of bw'). The prompt's "
          "single pass is included in the time. Quantized models are other models: their tokens may "
          "differ from the float32 ones." + (f" With fused projections (q, k, v in one matrix; gate and up "
                                              f"in another): {'; '.join(fused)}." if fused else ""))


def time_llama_cpp_rows(model: Llama, args: argparse.Namespace, reference_seconds: float, peak: float) -> None:
    """Print llama.cpp's rows of the table (:mod:`llamacpp_bench`), or why there are none."""
    import tempfile

    import llamacpp_bench

    reason = llamacpp_bench.available()
    if reason is not None:
        if args.llama_cpp:
            raise SystemExit(f"--llama-cpp: {reason}")
        print(f"llama.cpp: not timed ({reason})")
        return
    with tempfile.TemporaryDirectory() as directory:
        rates = llamacpp_bench.time_llama_cpp(model, directory, new_tokens=args.new_tokens,
                                              threads=torch.get_num_threads(), repeats=args.repeats)
    for fmt, (rate, per_token) in rates.items():
        gbps = per_token * rate / 1e9
        print(f"{'llama.cpp ' + fmt + ' (bench)':28s} {rate:9.1f} {rate * reference_seconds / args.new_tokens:6.2f}x "
              f"{per_token / 1e9:9.3f} {gbps:7.1f} {gbps / peak:6.0%}  (no prompt; its own process)")


if __name__ == "__main__":
    main()
