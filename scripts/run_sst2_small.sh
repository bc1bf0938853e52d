#!/usr/bin/env bash
# Transfer-data experiments (issue 14); run from anywhere, runs in the repository root.
#   bash scripts/run_sst2_small.sh          # SST-2 with 1,000 labels, then MRPC with augmentation
#   bash scripts/run_sst2_small.sh sst2     # only SST-2
#   bash scripts/run_sst2_small.sh mrpc     # only MRPC
#   bash scripts/run_sst2_small.sh long     # SST-2's l3 (1,200 steps) and narrow (2,400 steps)
#                                           # hard and kd_augment
#   bash scripts/run_sst2_small.sh long_l3 | long_narrow   # one student of `long`
# SST-2: scripts/split_sst2_small.py draws 1,000 labelled sentences of ../shared/data/sst2/train.tsv
# (seed 0) and keeps the rest as unlabelled text; the MiniLM-L6 teacher is fine-tuned on the 1,000;
# students l3 (teacher layers [0, 2, 4]) and narrow (random 4 x 256) x variants hard, kd,
# kd_unlabeled, kd_augment x seeds 0 1 2 are reported on glue_dev.tsv.
# MRPC: the teacher and the l3 student x hard, kd, kd_augment x seeds 0 1 2 on the train file, model
# selection on its seeded held-out tenth (data.eval_fraction), reported on the test file.
# Each run's report.json is copied to results/<experiment>/<student>_<variant>_s<seed>/report.json.
# An interrupted run resumes when the script is run again (train.py skips finished stages).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python}
SEEDS=(0 1 2)

# train EXPERIMENT NAME [overrides...]: configs/experiments/EXPERIMENT/NAME.yaml
train() {
  local experiment=$1 name=$2
  shift 2
  echo "== $experiment/$name $* $(date -u +%FT%TZ)"
  "$PYTHON" train.py --config "configs/experiments/$experiment/$name.yaml" "$@"
}

# students EXPERIMENT "STUDENTS" "VARIANTS" [NAME [overrides...]]: every student x variant x
# seed of configs/experiments/EXPERIMENT, with the overrides, as runs/exp/NAME/<run> (NAME
# defaults to EXPERIMENT); each report copied to results/NAME/<run>/report.json
students() {
  local experiment=$1 students=$2 variants=$3 name=${4:-$1} student variant seed run
  shift $(( $# < 4 ? $# : 4 ))
  for student in $students; do
    for variant in $variants; do
      for seed in "${SEEDS[@]}"; do
        run="${student}_${variant}_s${seed}"
        train "$experiment" "${student}_${variant}" "seed=$seed" "workdir=runs/exp/$name/$run" "$@"
        mkdir -p "results/$name/$run"
        cp "runs/exp/$name/$run/report.json" "results/$name/$run/report.json"
      done
    done
  done
}

sst2() {
  "$PYTHON" scripts/split_sst2_small.py ../shared/data/sst2/train.tsv runs/exp/sst2_small/data
  train sst2_small teacher
  mkdir -p results/sst2_small/teacher
  cp runs/exp/sst2_small/teacher/report.json results/sst2_small/teacher/report.json
  students sst2_small "l3 narrow" "hard kd kd_unlabeled kd_augment"
}

mrpc() {
  train mrpc_augment teacher
  mkdir -p results/mrpc_augment/teacher
  cp runs/exp/mrpc_augment/teacher/report.json results/mrpc_augment/teacher/report.json
  students mrpc_augment l3 "hard kd kd_augment"
}

# Both students with three times their steps: l3 1,200 (the augmented rows it sees cover the
# 20,000 about once), narrow 2,400 (about twice); needs the teacher and the split of sst2.
long_l3() {
  students sst2_small l3 "hard kd_augment" sst2_small_long distill.steps=1200
}
long_narrow() {
  students sst2_small narrow "hard kd_augment" sst2_small_long distill.steps=2400
}

case "${1:-all}" in
  sst2) sst2 ;;
  mrpc) mrpc ;;
  long) long_l3; long_narrow ;;
  long_l3) long_l3 ;;
  long_narrow) long_narrow ;;
  all) sst2; mrpc; long_l3; long_narrow ;;
  *) echo "usage: bash scripts/run_sst2_small.sh [sst2|mrpc|long|long_l3|long_narrow|all]" >&2; exit 2 ;;
esac
