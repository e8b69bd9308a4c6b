#!/usr/bin/env bash
# Everything GPU-side, in one run, for a GPU lent for a few minutes:
#  1. decoding speed of the quantized models: bf16 (ours compiled, apart and fused; generate
#     with its dynamic and its static cache), our int8 and int4 (compiled: companion.quant_triton's
#     kernels, and Inductor's reductions of one_row_forward), torchao int8; with the bandwidth
#     measured on the device. Llama-2-7B's matrices, 4 of its 32 layers (LAYERS=32 for all
#     of them: eight compilations of 160-200 s each, more than one call to a lent GPU may
#     take); most of the time is compiling the models;
#  2. one row times each of Llama-2-7B's matrices (benchmarks/gemv.py): the Triton kernels at
#     several block sizes, Inductor's reductions and bf16 F.linear, in GB/s;
#  3. attention: SDPA against FlashAttention written out (companion.flash_triton's Triton
#     kernels, companion.flash's tiles), forward and backward, T = 1k to 8k, Llama-2-7B heads.
# Decoding comes first: its figures are the targets. Each step prints as it goes, so a run cut
# short keeps what it measured. The tiny size checks the whole script on a CPU in about a
# minute and a half:
#
#   bash benchmarks/gpu.sh                 # cuda, llama-2-7b
#   bash benchmarks/gpu.sh cpu tiny        # a check of the script itself
#
# The tables go to standard output and, when OUT is set, to $OUT/decode_quant_gpu.txt,
# $OUT/gemv_gpu.txt and $OUT/attention_gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
size="${2:-llama-2-7b}"
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
out="${OUT:-}"
if [ "$size" = tiny ]; then
  attention=(--lengths 128 200 --heads 4 --kv-heads 2 --head-dim 64 --repeats 1)
  layers=()
else
  attention=(--lengths 1024 2048 4096 8192 --tiles-max 2048 --repeats 5)
  # 4 of Llama-2-7B's 32 layers, the same matrices: on an H200 compiling the whole model took
  # 160-200 s per model, and this run compiles eight
  layers=(--layers "${LAYERS:-4}")
fi
{
  "$python" - <<'PY'
import platform, torch
print(f"# torch {torch.__version__}, python {platform.python_version()}", end="")
print(f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
if torch.cuda.is_available():  # the ceiling decoding is measured against, two ways
    from companion.bench import measure_bandwidth, median_seconds
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() / median_seconds(lambda: y.copy_(x), "cuda", repeats=10)
    print(f"# copying 1 GiB on the device: {copy / 1e9:.0f} GB/s (bytes read + written); "
          f"summing 1 GiB: {measure_bandwidth('cuda', megabytes=1024, repeats=10) / 1e9:.0f} GB/s")
PY
  "$python" benchmarks/decode.py --device "$device" --size "$size" ${layers[@]+"${layers[@]}"} --quant int8 int4 --repeats 3 --no-llama-cpp
} | tee ${out:+"$out/decode_quant_gpu.txt"} || echo "decode.py failed (exit status above); going on" >&2
# Not fatal, as the other steps: a failure of one must not cost the figures of the others.
if [ "$size" = tiny ]; then gemv=(--shapes 40x256 --block-n 4 --block-k 64 --repeats 1); else gemv=(); fi
if ! "$python" benchmarks/gemv.py --device "$device" ${gemv[@]+"${gemv[@]}"} | tee ${out:+"$out/gemv_gpu.txt"}; then
  echo "gemv.py failed (exit status above)" >&2
fi
# Not fatal: the Triton kernels' first compilation on a GPU must not cost the figures above.
if ! "$python" benchmarks/attention.py --device "$device" "${attention[@]}" | tee ${out:+"$out/attention_gpu.txt"}; then
  echo "attention.py failed (exit status above)" >&2
fi
