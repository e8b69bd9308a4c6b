#!/usr/bin/env bash
# Decoding speed of the quantized models on a GPU, in one run: bf16 (ours compiled, generate),
# our int8 and int4 (compiled: one_row_forward as a Triton reduction), torchao int8; with the
# bandwidth measured on the device. On a Llama-2-7B shape (13.5 GB in bf16) most of the time is
# compiling four models; the tiny size checks the whole script on a CPU in about a minute:
#
#   bash benchmarks/gpu_quant.sh                 # cuda, llama-2-7b
#   bash benchmarks/gpu_quant.sh cpu tiny        # a check of the script itself
#
# The table goes to standard output and, when OUT is set, to $OUT/decode_quant_gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
size="${2:-llama-2-7b}"
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
out="${OUT:-}"
{
  "$python" - <<'PY'
import platform, torch
print(f"# torch {torch.__version__}, python {platform.python_version()}", end="")
print(f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
PY
  "$python" benchmarks/decode.py --device "$device" --size "$size" --quant int8 int4 --repeats 3 --no-llama-cpp
} | tee ${out:+"$out/decode_quant_gpu.txt"}
