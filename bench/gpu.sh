#!/usr/bin/env bash
# The training-step benchmark on a GPU, as one script for a lent device machine (issue 16's
# GPU lever). Plan on under 10 minutes on one H200; the step times are milliseconds there, so
# the compiles are most of it. It reads the repository in place (no install: the benchmark
# puts the repository root on sys.path) with the machine's own torch, transformers and peft.
#
#   bash bench/gpu.sh [results folder]   # default bench/results; on the device tool, "$OUT"
#
# Writes train_step_suite_cuda.json (contenders a b k l m at vocab 2000 and 32000, peak
# allocated memory per contender), train_step_bf16_32k_cuda.json (k l m under bf16 autocast
# at vocab 32000) and train_step_cuda.json (a b d e f: the floor and DoRA) and a log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  "$python" bench/train_step.py --device cuda --suite --rounds 20 --json "$out/train_step_suite_cuda.json"
  "$python" bench/train_step.py --device cuda --contenders klm --vocab 32000 --bf16 --rounds 20 \
    --json "$out/train_step_bf16_32k_cuda.json"
  "$python" bench/train_step.py --device cuda --contenders abdef --rounds 20 \
    --json "$out/train_step_cuda.json"
} 2>&1 | tee "$out/gpu_train_step.log"
