#!/usr/bin/env bash
# The ta8-text benchmark for one seed, resumable (issue 36): builds the full zoo (each fine-tuned encoder is kept
# as soon as it is done; a rerun resumes), then waits for RUNDIR/code-ready and runs benchmarks/ta8_stages.sh,
# which adds each stage's rows to benchmarks/results/bench-ta8-seed<SEED>.json as it finishes.
#   usage: benchmarks/ta8.sh SEED [RUNDIR]     (PYTHON defaults to .venv/bin/python; the cache is $NBMERGE_CACHE
#   or ~/.cache/nbmerge)
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-0}
RUN=${2:-$HOME/ta8-run}
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
mkdir -p "$RUN"
echo "$(date -u +%FT%TZ) building the ta8-text zoo, seed $SEED"
"$PYTHON" -c "from nbmerge.workbench.models.ta8zoo import build_ta8_zoo; import json; z = build_ta8_zoo('full', seed=$SEED); print(json.dumps(json.loads((z.root / 'zoo.json').read_text())['fine_tuning'], indent=1))"
echo "$(date -u +%FT%TZ) zoo built"
while [ ! -f "$RUN/code-ready" ]; do sleep 60; done
exec bash benchmarks/ta8_stages.sh "$SEED" "$RUN"
