#!/usr/bin/env bash
# The GPU check of issue 23, one run of at most TOTAL_S (default 470) seconds:
#
#   experiments/benchmarks/gpu_check.sh            # on the GPU: bf16, gpt2_124m and qwen3_0p6b
#   experiments/benchmarks/gpu_check.sh --quick    # (or QUICK=1) on the CPU: tiny shapes, f32
#
# Per shape (experiments/benchmarks/shapes.py), each in its own process so each peak is its
# own: `python -m instructrl.plan --json` (predicted memory per stage on an H200; analytic,
# PLAN_COMPILE=1 for XLA's compile of the same programs); the suite's train-step and sampling
# rows (MFU against the measured matmul peak, sampling against the measured copy bandwidth and
# against torch `generate`), with the plan's SFT/RM peaks beside the measured ones; the PPO
# iteration row alone (episodes/s, rollout share, measured vs planned peak). --quick runs all
# rows in one suite process per shape (a CPU has no device peak to keep apart).
# Writes into ${OUT:-out}/: plan_SHAPE.json, suite_SHAPE.{json,md}, ppo_SHAPE.{json,md},
# sections.json (each section's status and seconds; a section past its time box is killed
# and marked "timeout") and summary.md. Needs only jax (with CUDA on a GPU), flax, optax,
# orbax, ml_collections, numpy, torch and transformers; runs from the checkout (no install).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT_DIR=${OUT:-out}
QUICK=${QUICK:-0}
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (only --quick)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
START=$(date +%s)
TOTAL_S=${TOTAL_S:-470}

if [[ "$QUICK" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  SHAPES=${SHAPES:-"tiny tiny_qwen3"}
  DTYPE=float32; REPS=1; ROW_BUDGET_S=5
  PLAN_S=60; SUITE_S=240; PPO_S=0
  # One suite process per shape with every row: the CPU has no device peak to isolate.
  SUITE_ROWS=sft,rm,sample,ppo; QUICK_ARG=(--quick)
else
  # Leave the GPU's memory to both libraries: XLA takes at most half, torch the rest.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
  SHAPES=${SHAPES:-"gpt2_124m qwen3_0p6b"}
  DTYPE=bfloat16; REPS=7; ROW_BUDGET_S=10
  PLAN_S=30; SUITE_S=120; PPO_S=80
  SUITE_ROWS=sft,rm,sample; QUICK_ARG=()
fi
PLAN_MODE=--analytic
[[ "${PLAN_COMPILE:-0}" == 1 ]] && PLAN_MODE=--compile

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" >&2; }
SECTIONS=()

# section NAME BUDGET_S OUTFILE CMD...: runs CMD under `timeout` (capped by the time left),
# stdout to OUTFILE (if not -), records the status; a failure does not stop later sections.
section() {
  local name=$1 budget=$2 outfile=$3; shift 3
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then
    log "$name: skipped, ${left}s left of TOTAL_S=$TOTAL_S"
    SECTIONS+=("{\"section\": \"$name\", \"status\": \"skipped_no_time\", \"seconds\": 0}")
    return 0
  fi
  log "$name (time box ${budget}s) ..."
  local t0 status rc=0
  t0=$(date +%s)
  if [[ "$outfile" == - ]]; then
    timeout --kill-after=10 "$budget" "$@" || rc=$?
  else
    timeout --kill-after=10 "$budget" "$@" > "$outfile" || rc=$?
  fi
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="failed_rc_$rc" ;;
  esac
  log "$name: $status in $(( $(date +%s) - t0 ))s"
  SECTIONS+=("{\"section\": \"$name\", \"status\": \"$status\", \"seconds\": $(( $(date +%s) - t0 )), \"time_box_s\": $budget}")
}

log "environment: $("$PY" -c 'import importlib.metadata as m
print(", ".join(f"{p} {m.version(p)}" for p in ("jax", "flax", "optax", "orbax-checkpoint",
      "ml_collections", "numpy", "torch", "transformers")))')"

for shape in $SHAPES; do
  cfg="experiments/benchmarks/shapes.py:shape=$shape,dtype=$DTYPE"
  plan="$OUT_DIR/plan_$shape.json"
  section "plan_$shape" "$PLAN_S" "$plan" \
    "$PY" -m instructrl.plan --config="$cfg" --mesh=data:1 --chip=h200 --json $PLAN_MODE
  plan_arg=()
  [[ -s "$plan" ]] && plan_arg=(--plan-json "$plan")
  common=(--shape "$shape" --dtype "$DTYPE" --reps "$REPS" --budget-s "$ROW_BUDGET_S" "${plan_arg[@]}" "${QUICK_ARG[@]}")
  section "suite_$shape" "$SUITE_S" - \
    "$PY" -m experiments.benchmarks.suite "${common[@]}" --rows "$SUITE_ROWS" --device-report \
    --json "$OUT_DIR/suite_$shape.json" --markdown "$OUT_DIR/suite_$shape.md"
  [[ "$SUITE_ROWS" == *ppo* ]] && continue
  # No torch in the PPO row: jax may take most of the GPU.
  section "ppo_$shape" "$PPO_S" - env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    "$PY" -m experiments.benchmarks.suite "${common[@]}" --rows ppo \
    --json "$OUT_DIR/ppo_$shape.json" --markdown "$OUT_DIR/ppo_$shape.md"
done

{
  echo "["
  for i in "${!SECTIONS[@]}"; do
    sep=","; (( i == ${#SECTIONS[@]} - 1 )) && sep=""
    echo "  ${SECTIONS[$i]}$sep"
  done
  echo "]"
} > "$OUT_DIR/sections.json"
{
  echo "# gpu_check ($(date -u +%Y-%m-%dT%H:%M:%SZ), quick=$QUICK, $(( $(date +%s) - START ))s)"
  echo
  for shape in $SHAPES; do
    for f in "$OUT_DIR/suite_$shape.md" "$OUT_DIR/ppo_$shape.md"; do
      [[ -s "$f" ]] && { cat "$f"; echo; }
    done
  done
  echo "Sections: see sections.json"
} > "$OUT_DIR/summary.md"
log "done: $OUT_DIR/summary.md"
if grep -q '"status": "\(failed\|timeout\)' "$OUT_DIR/sections.json"; then
  log "some sections failed or timed out (sections.json)"
  exit 1
fi
