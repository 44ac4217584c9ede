#!/usr/bin/env bash
# One call on a lent GPU machine for the evidence the CPU cannot give in a session (docs/benchmarks.md, "Seeds on a
# lent GPU"), in priority order, all at once (16 cores, the processes share the card):
#   1. more seeds of the default reproduction (SEEDS, default 3-9) into docs/results/default/, in fp32 (amp off, TF32
#      off through NVIDIA_TF32_OVERRIDE) so that they are the CPU seeds' configuration: the report adds them up
#      (no variants: seed 0 holds them);
#   2. the five experiments on memorized=atypical (no label noise) and memorized=both, seed 0, as named
#      reproductions (docs/results/atypical_<value>/);
#   3. localization_methods.py at the issue's size (50 targets of each kind) for seed 0, as far as it gets: its
#      per-target records resume, and its timings are the GPU cost per target.
#   device run: command "bash bench/gpu_seeds.sh", timeout_s 540; then give_back
# No new work starts after HARD_S (default 450) seconds: everything still running is stopped (finished experiments
# are stored), and docs/results/{default,atypical_*}/ and the localization JSONs are packed into $OUT/results.tgz
# (each reproduction also into its own .tgz the moment it ends).
# On a CPU: SMOKE=1 bash bench/gpu_seeds.sh (tiny sizes, into a temporary directory; nothing committed is touched).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}; HARD_S=${HARD_S:-450}; SEEDS=${SEEDS:-[3,4,5,6,7,8,9]}; JOBS=${JOBS:-8}
export PYTHONUNBUFFERED=1 NVIDIA_TF32_OVERRIDE=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=python3
if [ "${SMOKE:-0}" = 1 ]; then
  S=$(mktemp -d); echo "smoke: everything under $S"
  RES="$S/results"; RUNS="$S/runs"; REP="$S/reports"
  SIZES=(--model=cnn --width=0.25 --epochs=2 --batch_size=64 --lr=0.05 --device=cpu --runs_dir="$RUNS" --etd_epochs=1
         --collateral_n=50 --ref_batch=7)
  EXP=(--rewind_epochs=[0,1] --retrain_epochs=1 --max_units=5 --n_eot=1 --gallery_size=2)
  SEEDS=[3]; LOC=(--n_examples=2 --mask_max_steps=30 --max_k=5 --collateral_k=[1,5]); FLIP=--n_examples=2; TYPICAL=--n_examples=2
else
  python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)" \
    || { echo "error: no CUDA torch in python3 here (SMOKE=1 for a CPU run); nothing ran" >&2; exit 2; }
  RES=docs/results; RUNS=runs; REP=reports; SIZES=(--device=cuda); EXP=(); LOC=(--n_examples=50); FLIP=--n_examples=50; TYPICAL=--n_examples=15
  command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv \
    -l 5 > "$OUT/gpu_util.csv" 2>&1 & }
fi
COMMON=(--amp=False "${SIZES[@]}")  # localization_methods.py takes these; the reproductions also EXP
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/session.log"; }
stamp "start: seeds $SEEDS, jobs $JOBS, hard stop $HARD_S s; $(nproc --all) cores"

# 1. the default reproduction's seeds (its per-seed store is docs/results/default)
# Each part packs its results into $OUT as soon as it ends (a call cut at its limit keeps what had ended).
($PY reproduce.py --seeds="$SEEDS" --variant_seeds=0 --jobs="$JOBS" --threads=1 --results_dir="$RES" --reports_dir="$REP" \
  "${COMMON[@]}" "${EXP[@]}" $FLIP > "$OUT/default.log" 2>&1; tar czf "$OUT/default.tgz" "$RES/default") &
pids=($!)
# 2. atypical examples: the five experiments per value of `memorized`, seed 0 (15 targets of each kind in flipping:
#    seed 0 has 57 atypical clean examples)
for mem in atypical both; do
  noise=(); [ "$mem" = atypical ] && noise=(--noise=0)
  ($PY reproduce.py --name="atypical_$mem" --memorized="$mem" "${noise[@]}" --seeds=[0] --variant_seeds=0 --jobs=4 \
    --threads=1 --results_dir="$RES" --reports_dir="$REP" "${COMMON[@]}" "${EXP[@]}" $TYPICAL --matched=False \
    > "$OUT/atypical_$mem.log" 2>&1; tar czf "$OUT/atypical_$mem.tgz" "$RES/atypical_$mem") &
  pids+=($!)
done
# 3. localization methods, seed 0, as far as the time allows (resumable records)
$PY localization_methods.py "${COMMON[@]}" "${LOC[@]}" > "$OUT/localization.log" 2>&1 &
pids+=($!)

while [ $(( $(date +%s) - start )) -lt "$HARD_S" ]; do
  alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
  [ "$alive" = 0 ] && break; sleep 5
done
pkill -TERM -f "(reproduce|localization_methods|gradient_accounting|layer_rewinding|layer_retraining|neuron_flipping|example_tied_dropout)\.py" 2>/dev/null
pkill nvidia-smi 2>/dev/null
wait "${pids[@]}" 2>/dev/null  # not a bare wait: that would wait for nvidia-smi's endless loop too
stamp "stopped; stored seeds: $(ls -d "$RES"/default/seed* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
for f in default atypical_atypical atypical_both localization; do tail -4 "$OUT/$f.log" | sed "s/^/$f| /" >> "$OUT/session.log"; done
loc=$(find "$RUNS" -name 'localization_methods*.json' 2>/dev/null)
tar czf "$OUT/results.tgz" "$RES"/default "$RES"/atypical_atypical "$RES"/atypical_both $loc 2>>"$OUT/session.log"
ls -l "$OUT" | tee -a "$OUT/session.log"
