#!/usr/bin/env bash
# The GPU scale study (bench/gpu_study.py) on a lent device machine, in one call; docs/benchmarks.md, "GPU study".
#   device run: command "bash bench/gpu_run.sh", carry ["data/fashion-mnist"], timeout_s 570; then give_back
# Installs nothing (the machine's python3 with CUDA torch). No new unit starts after BUDGET_S seconds (default 330);
# the study is killed after HARD_S (default 480: whole seeds are kept, a cut unit resumes on the next call); then
# SCALE.md is rewritten from what is stored and STUDY_DIR (default docs/results/gpu_study) is packed into $OUT:
# study.tgz (all but the per-example CSVs), study_csv.tgz (those), study.log, gpu_util.csv.
# Extra arguments go to the study (e.g. --stages=[2,3]); `--smoke=True --smoke_dir=DIR STUDY_DIR=DIR/results` on a CPU.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}; BUDGET_S=${BUDGET_S:-330}; HARD_S=${HARD_S:-480}; STUDY_DIR=${STUDY_DIR:-docs/results/gpu_study}
export PYTHONUNBUFFERED=1
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() or '--smoke=True' in sys.argv else 2)" "$@" \
  || { echo "error: no CUDA torch in python3 here (pass --smoke=True for a CPU run); nothing ran" >&2; exit 2; }
stages=()
if [ ! -f data/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "warning: no Fashion-MNIST files (carry data/fashion-mnist): stage 1 left out" | tee "$OUT/study.log"
  stages=(--stages=[2,3])
fi
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv \
  -l 5 > "$OUT/gpu_util.csv" 2>&1 & }
timeout -k 20 "$HARD_S" python3 bench/gpu_study.py --budget_s="$BUDGET_S" "${stages[@]}" "$@" 2>&1 | tee -a "$OUT/study.log"
echo "study exit status ${PIPESTATUS[0]} (124: stopped at HARD_S=$HARD_S s)" | tee -a "$OUT/study.log"
python3 bench/gpu_study.py --report_only=True "${stages[@]}" "$@" 2>&1 | tail -3 | tee -a "$OUT/study.log"
tar czf "$OUT/study.tgz" --exclude='*.csv' "$STUDY_DIR"
find "$STUDY_DIR" -name '*.csv' -print0 | tar czf "$OUT/study_csv.tgz" --null -T -
ls -l "$OUT" | tee -a "$OUT/study.log"
find "$OUT" -type f -size +16M -exec echo "warning: {} is over 16 MiB and will not come back" \; | tee -a "$OUT/study.log"
