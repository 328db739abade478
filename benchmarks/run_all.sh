#!/usr/bin/env bash
# Run every smoke test with the real models (the four disk policies and the memory tier) and chart each run.
#
# Usage: benchmarks/run_all.sh [RESULTS_DIR]   (default: benchmarks/results)
# Writes RESULTS_DIR/<policy>.txt (the smoke-test output) and RESULTS_DIR/<policy>.png.
# MODELS_DIR (default: models/ in the repository) must hold the two real models; if they are
# missing they are fetched with model_store_server.fetch_models. Other settings (MODEL_A/B/C,
# POLICIES, TTL_SECONDS, MAX_TOKENS) pass through to smoke_tests/run_all.sh.
# Exits non-zero if a smoke test failed or a chart could not be drawn; charts are drawn for
# every run that produced output, failed or not.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
RESULTS_DIR=${1:-$HERE/results}
if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
export MODELS_DIR=${MODELS_DIR:-$ROOT/models}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
POLICIES=${POLICIES:-lru no-evict ttl lru-ttl memory}
export POLICIES

mkdir -p "$RESULTS_DIR" "$MODELS_DIR"
if [[ -z ${MODEL_A:-}${MODEL_B:-} ]]; then
    # The default models: fetch_models is idempotent (verifies what is there, fetches what is not).
    "$PY" -m model_store_server.fetch_models --dest "$MODELS_DIR"
fi

status=0
started=$SECONDS
"$ROOT/smoke_tests/run_all.sh" "$RESULTS_DIR" || status=$?
echo "[benchmarks] smoke tests took $(( SECONDS - started ))s (exit $status)" >&2

for policy in $POLICIES; do
    txt=$RESULTS_DIR/$policy.txt
    if [[ ! -s $txt ]]; then
        if [[ $policy == memory ]]; then
            echo "[benchmarks] no output for memory (skipped: the worker holds one model at a time)" >&2
            continue
        fi
        echo "[benchmarks] no output for $policy; no chart" >&2
        status=1
        continue
    fi
    what="$policy policy"
    [[ $policy != memory ]] || what="memory tier (lru, two models in memory)"
    "$PY" "$HERE/plot_run.py" "$txt" -o "$RESULTS_DIR/$policy.png" \
        --title "model-swap smoke test: $what (real models, $(uname -m), $(date +%Y-%m-%d))" || status=1
done
exit "$status"
