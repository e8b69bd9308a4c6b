#!/usr/bin/env bash
# Everything GPU-side, in one run, for a GPU lent for a few minutes:
#  1. attention: SDPA against FlashAttention written out (companion.flash_triton's Triton
#     kernels, companion.flash's tiles), forward and backward, T = 1k to 8k, Llama-2-7B heads;
#  2. decoding speed of the quantized models: bf16 (ours compiled, generate), our int8 and int4
#     (compiled: one_row_forward as a Triton reduction), torchao int8; with the bandwidth
#     measured on the device. On a Llama-2-7B shape (13.5 GB in bf16) most of the time is
#     compiling four models.
# The tiny size checks the whole script on a CPU in about a minute and a half:
#
#   bash benchmarks/gpu.sh                 # cuda, llama-2-7b
#   bash benchmarks/gpu.sh cpu tiny        # a check of the script itself
#
# The tables go to standard output and, when OUT is set, to $OUT/attention_gpu.txt and
# $OUT/decode_quant_gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
size="${2:-llama-2-7b}"
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
out="${OUT:-}"
if [ "$size" = tiny ]; then
  attention=(--lengths 128 200 --heads 4 --kv-heads 2 --head-dim 64 --repeats 1)
else
  attention=(--lengths 1024 2048 4096 8192 --tiles-max 2048 --repeats 5)
fi
# The attention step first, but not fatal: its Triton kernels have not yet been compiled on a
# GPU, and a failure there must not cost the decoding measurements that follow.
if ! "$python" benchmarks/attention.py --device "$device" "${attention[@]}" | tee ${out:+"$out/attention_gpu.txt"}; then
  echo "attention.py failed (exit status above); going on with decoding" >&2
fi
{
  "$python" - <<'PY'
import platform, torch
print(f"# torch {torch.__version__}, python {platform.python_version()}", end="")
print(f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
PY
  "$python" benchmarks/decode.py --device "$device" --size "$size" --quant int8 int4 --repeats 3 --no-llama-cpp
} | tee ${out:+"$out/decode_quant_gpu.txt"}
