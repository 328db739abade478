#!/usr/bin/env bash
# Run the smoke tests (four disk policies and the memory tier), each against its own fresh worker
# and store on free loopback ports.
#
# Usage: smoke_tests/run_all.sh [OUTPUT_DIR]
#   OUTPUT_DIR   if given, each script's output is saved there as <policy>.txt
# Environment:
#   MODELS_DIR   the store's models (default: models/ in the repository)
#   MODEL_A, MODEL_B, MODEL_C   file names in MODELS_DIR (defaults: the two real models and
#                tiny-smoke.gguf); MODEL_C is generated with the tiny GGUF generator if missing
#   POLICIES     which to run, space-separated (default: "lru no-evict ttl lru-ttl memory"); "memory"
#                is the memory tier (lru, two models in the worker's memory); it is skipped, and says
#                so, when the worker holds one model at a time
#   TTL_SECONDS  for ttl and lru-ttl (default 5); MAX_TOKENS, PROMPT are passed to the scripts
#   KEEP_ALIVE_SECONDS  for the memory run (default 15: longer than a slow generation of the other model)
#   WARMUP       1 (default): one untimed request for MODEL_C before each script, so llama.cpp's
#                one-off start-up in a fresh worker is not charged to step 1; 0 to skip
#   STARTUP_TIMEOUT  seconds to wait for a service's /health (default 120)
#   LOG_DIR      keep the services' logs there as <policy>-worker.log, <policy>-store.log
#                (default: a temporary directory, removed on exit; tails are shown on failure)
# Exits 0 only when every policy passed. Services are stopped on every exit path.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
OUT_DIR=${1:-}
if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
MODELS_DIR=${MODELS_DIR:-$ROOT/models}
export MODEL_A=${MODEL_A:-SmolLM2-135M-Instruct.Q4_1.gguf}
export MODEL_B=${MODEL_B:-gemma-3-270m-q4_k_m.gguf}
export MODEL_C=${MODEL_C:-tiny-smoke.gguf}
export TTL_SECONDS=${TTL_SECONDS:-5}
export KEEP_ALIVE_SECONDS=${KEEP_ALIVE_SECONDS:-15}
POLICIES=${POLICIES:-lru no-evict ttl lru-ttl memory}
SKIPPED=3  # run_policy's status for a run the worker cannot do
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-120}
TINY_SEED=${TINY_SEED:-20240605}
WARMUP=${WARMUP:-1}
# Services import the packages from this checkout even where the venv is not used.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/smoke-run.XXXXXX")
LOG_DIR=${LOG_DIR:-$WORK}
mkdir -p "$LOG_DIR"
PIDS=()

log() { echo "[run_all] $*" >&2; }

stop_services() {
    # TERM each service we started (gunicorn shuts down gracefully), KILL what outlives 15 s.
    local pid waited
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        waited=0
        while kill -0 "$pid" 2>/dev/null && (( waited < 150 )); do
            sleep 0.1
            waited=$(( waited + 1 ))
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop after SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

cleanup() {
    stop_services
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

script_for() {
    case $1 in
        lru) echo test_cache_smoke.sh ;;
        no-evict) echo test_no_evict_smoke.sh ;;
        ttl) echo test_ttl_smoke.sh ;;
        lru-ttl) echo test_lru_ttl_smoke.sh ;;
        memory) echo test_memory_tier_smoke.sh ;;
        *) return 1 ;;
    esac
}

free_ports() {
    # Two distinct free loopback ports (both held open while chosen, so they differ).
    "$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

wait_healthy() {
    # wait_healthy NAME URL PID LOG: poll URL/health until 200, or fail if the process died.
    local name=$1 url=$2 pid=$3 logfile=$4 deadline=$(( SECONDS + STARTUP_TIMEOUT ))
    until curl -sf -o /dev/null --max-time 2 "$url/health"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during start-up; its log:"
            tail -n 30 "$logfile" >&2 || true
            return 1
        fi
        if (( SECONDS >= deadline )); then
            log "$name not healthy at $url after ${STARTUP_TIMEOUT}s; its log:"
            tail -n 30 "$logfile" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

start_services() {
    # start_services POLICY: a worker with an empty cache and a store in front of it; sets STORE_URL.
    # The four disk-policy scripts walk the disk tier: a worker that can hold several models holds
    # one there (a worker that holds one model at a time ignores the setting). The memory run
    # holds two, with a disk for three and a short keep-alive.
    local policy=$1 worker_port store_port max_loaded=1 cache_policy=$1 cache_size=2
    local -a extra=()
    if [[ $policy == memory ]]; then
        max_loaded=2 cache_policy=lru cache_size=3
        extra=(--keep-alive-seconds "$KEEP_ALIVE_SECONDS")
    fi
    read -r worker_port store_port < <(free_ports)
    mkdir -p "$WORK/$policy-cache"
    MAX_LOADED_MODELS=$max_loaded "$PY" -m inference_worker --cache-dir "$WORK/$policy-cache" --host 127.0.0.1 \
        --port "$worker_port" > "$LOG_DIR/$policy-worker.log" 2>&1 &
    PIDS+=("$!")
    wait_healthy "worker ($policy)" "http://127.0.0.1:$worker_port" "$!" "$LOG_DIR/$policy-worker.log" || return 1
    if [[ $policy == memory ]] && ! curl -sf --max-time 10 "http://127.0.0.1:$worker_port/models" | grep -q '"memory"'; then
        log "memory: the worker holds one model at a time (no memory budget in its GET /models); skipped"
        return "$SKIPPED"
    fi
    "$PY" -m model_store_server --models-dir "$MODELS_DIR" --worker-url "http://127.0.0.1:$worker_port" \
        --host 127.0.0.1 --port "$store_port" --cache-policy "$cache_policy" --max-cache-size "$cache_size" \
        --ttl-seconds "$TTL_SECONDS" "${extra[@]}" > "$LOG_DIR/$policy-store.log" 2>&1 &
    PIDS+=("$!")
    STORE_URL="http://127.0.0.1:$store_port"
    wait_healthy "store ($policy)" "$STORE_URL" "$!" "$LOG_DIR/$policy-store.log" || return 1
    log "$policy: worker on :$worker_port, store on :$store_port"
}

warm_up() {
    # One request for the small model through the store; the script's reset then empties the cache.
    local status
    status=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 120 -X POST "$STORE_URL/user_request" \
        -H 'Content-Type: application/json' \
        --data-binary "{\"prompt\":\"warm up\",\"model\":\"$MODEL_C\",\"max_tokens\":4}") || true
    [[ $status == 200 ]] || log "warm-up request for $MODEL_C answered http ${status:-none} (continuing)"
}

show_logs() {
    local policy=$1 which
    for which in store worker; do
        log "last lines of the $policy $which log:"
        tail -n 20 "$LOG_DIR/$policy-$which.log" >&2 || true
    done
}

run_policy() {
    # run_policy POLICY: start services, run the policy's script (saving its output), stop services.
    local policy=$1 script out status=0
    script=$(script_for "$policy") || { log "unknown policy $policy"; return 1; }
    start_services "$policy" || { status=$?; stop_services; return "$status"; }
    [[ $WARMUP == 0 ]] || warm_up
    out=${OUT_DIR:+$OUT_DIR/$policy.txt}
    out=${out:-$WORK/$policy.txt}
    STORE_URL=$STORE_URL bash "$HERE/$script" 2>&1 | tee "$out" || status=$?
    (( status == 0 )) || show_logs "$policy"
    stop_services
    return "$status"
}

prepare_models() {
    mkdir -p "$MODELS_DIR"
    MODELS_DIR=$(cd "$MODELS_DIR" && pwd)
    local name
    for name in "$MODEL_A" "$MODEL_B"; do
        if [[ ! -f $MODELS_DIR/$name ]]; then
            log "$name is not in $MODELS_DIR; put it there first, e.g." \
                "'$PY -m model_store_server.fetch_models --dest $MODELS_DIR'"
            return 1
        fi
    done
    if [[ ! -f $MODELS_DIR/$MODEL_C ]]; then
        log "generating the tiny third model $MODELS_DIR/$MODEL_C"
        "$PY" -m inference_worker.testing.tiny_gguf "$MODELS_DIR/$MODEL_C" --seed "$TINY_SEED" >/dev/null
    fi
}

main() {
    local policy started took failed=0 status
    local -a summary=()
    [[ -z $OUT_DIR ]] || { mkdir -p "$OUT_DIR"; OUT_DIR=$(cd "$OUT_DIR" && pwd); }
    prepare_models || exit 2
    log "models in $MODELS_DIR: A=$MODEL_A B=$MODEL_B C=$MODEL_C; python $PY"
    for policy in $POLICIES; do
        started=$SECONDS
        status=0
        run_policy "$policy" || status=$?
        if (( status == 0 )); then
            summary+=("PASS  $policy ($(( SECONDS - started ))s)")
        elif (( status == SKIPPED )); then
            summary+=("SKIP  $policy (the worker holds one model at a time)")
        else
            summary+=("FAIL  $policy ($(( SECONDS - started ))s)")
            failed=$(( failed + 1 ))
        fi
    done
    echo
    echo "=== smoke test summary ==="
    printf '%s\n' "${summary[@]}"
    took=$SECONDS
    if (( failed )); then
        echo "$failed of ${#summary[@]} policies FAILED (${took}s)"
        return 1
    fi
    echo "all policies passed (${took}s)"
}

main
