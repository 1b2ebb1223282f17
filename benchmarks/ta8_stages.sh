#!/usr/bin/env bash
# The ta8-text bench of one seed in stages (run by benchmarks/ta8.sh once the zoo is built; rerunnable): each
# stage adds its rows to benchmarks/results/bench-ta8-seed<SEED>.json as soon as it finishes, and a finished stage
# is skipped on a rerun (a marker in RUNDIR).
#   1. static: zero_shot, individual, simple_average, task_arithmetic (grid 0.1 ... 1.0), ties (k × λ grid),
#      best_static (chosen on validation) — the gate numbers; then oracle_routing (benchmarks/ta8_oracle.py);
#   2. adamerging_layer: FusionBench's layer-wise AdaMerging (one λ per task and tensor), λ₀ 0.3, lr 1e-3;
#   3. we_moe: WE-MoE routed per sample, in adaptation and in use (the paper's);
#   4. we_moe_task_batches: WE-MoE routed by each single-task batch's mean, in adaptation and in use;
#   5. adamerging_task: task-wise AdaMerging;
#   6. "we_moe (validation step)", "adamerging_layer (validation step)": the step chosen on labelled validation.
# Adaptive rows: entropy objective, no labels (select_every=0: the last step is kept), TTA_STEPS steps (default
# 1000, FusionBench's; each step is 8 tasks × 16 inputs forward and backward).
#   usage: benchmarks/ta8_stages.sh SEED [RUNDIR]   (POOL=ta8-text-tiny TTA_STEPS=2 RESULT=/tmp/x.json: a smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-0}
RUN=${2:-$HOME/ta8-run}
STEPS=${TTA_STEPS:-1000}
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
RESULT=${RESULT:-benchmarks/results/bench-ta8-seed$SEED.json}
POOL=${POOL:-ta8-text}
BENCH=("$PYTHON" -m nbmerge.cli bench --pool "$POOL" --seeds "$SEED" --quiet)
mkdir -p "$RUN"

stage() {  # stage NAME ARGS...: run once, then mark done
    local name=$1; shift
    if [ -f "$RUN/seed$SEED-$name.done" ]; then echo "stage $name: done before"; return; fi
    echo "$(date -u +%FT%TZ) stage $name"
    "${BENCH[@]}" "$@"
    touch "$RUN/seed$SEED-$name.done"
    echo "$(date -u +%FT%TZ) stage $name done"
}

stage static --methods simple_average task_arithmetic ties --json "$RESULT"
if [ ! -f "$RUN/seed$SEED-oracle.done" ]; then   # the oracle-routing ceiling row
    "$PYTHON" benchmarks/ta8_oracle.py "$SEED" --pool "$POOL" --json "$RESULT" && touch "$RUN/seed$SEED-oracle.done"
fi
ADAPT=(--no-tune --add-to "$RESULT")
stage adamerging_layer --methods adamerging "${ADAPT[@]}" --label adamerging=adamerging_layer \
    --set adamerging.granularity='"tensor"' --set adamerging.select_every=0 --set adamerging.steps="$STEPS"
stage we_moe --methods we_moe "${ADAPT[@]}" \
    --set we_moe.batch_reduce=false --set we_moe.select_every=0 --set we_moe.steps="$STEPS"
stage we_moe_task_batches --methods we_moe "${ADAPT[@]}" --label we_moe=we_moe_task_batches \
    --set we_moe.batch_reduce=true --set we_moe.select_every=0 --set we_moe.steps="$STEPS"
stage adamerging_task --methods adamerging "${ADAPT[@]}" --label adamerging=adamerging_task \
    --set adamerging.granularity='"task"' --set adamerging.select_every=0 --set adamerging.steps="$STEPS"
# step choice on labelled validation: separate, named rows (the same runs, scored every 100 steps, best step kept)
stage we_moe_validation_step --methods we_moe "${ADAPT[@]}" --label we_moe="we_moe (validation step)" \
    --set we_moe.batch_reduce=false --set we_moe.select_every=100 --set we_moe.steps="$STEPS"
stage adamerging_layer_validation_step --methods adamerging "${ADAPT[@]}" \
    --label adamerging="adamerging_layer (validation step)" \
    --set adamerging.granularity='"tensor"' --set adamerging.select_every=100 --set adamerging.steps="$STEPS"
echo "$(date -u +%FT%TZ) all stages done: $RESULT"
