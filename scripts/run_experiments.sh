#!/usr/bin/env bash
# Run the experiment configs in order and keep each run's report.json under results/<name>/.
#   bash scripts/run_experiments.sh                 # all of them
#   bash scripts/run_experiments.sh sst2_kd_s0 ...  # some of them
# Teachers first: the student configs read runs/exp/<task>_teacher/teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(sst2_teacher sst2_hard_s0 sst2_kd_s0 sst2_hard_s1 sst2_kd_s1 sst2_hard_s2 sst2_kd_s2
         sst2_kd_inter sst2_narrow_hard sst2_narrow_kd mrpc_teacher mrpc_hard mrpc_kd
         sst2_kd_long sst2_hard_long)
fi
for name in "${names[@]}"; do
  echo "== $name $(date -u +%FT%TZ)"
  python train.py --config "configs/experiments/$name.yaml"
  mkdir -p "results/$name"
  cp "runs/exp/$name/report.json" "results/$name/report.json"
done
python scripts/results_table.py
