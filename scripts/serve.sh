#!/usr/bin/env bash
# Set everything up, start the worker (:8080) and the store (:8000) with the real models,
# answer one request to prove it works, then keep serving until Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

set_up_everything

WORKER_PORT="${WORKER_PORT:-8080}"
STORE_PORT="${STORE_PORT:-8000}"
export MODELS_DIR="${MODELS_DIR:-$REPO/models}"
export MODELS_CONFIG="${MODELS_CONFIG-$REPO/models.toml}"  # names and per-model settings; MODELS_CONFIG= for none
export MODEL_CACHE_DIR="${MODEL_CACHE_DIR:-$REPO/model_cache}"
export WORKER_URL="${WORKER_URL:-http://127.0.0.1:$WORKER_PORT}"
mkdir -p "$REPO/run"

port_in_use() {  # PORT: true if something accepts connections there
  "$VENV/bin/python" -c 'import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}
for spec in "worker:$WORKER_PORT:WORKER_PORT" "store:$STORE_PORT:STORE_PORT"; do
  IFS=: read -r name port var <<<"$spec"
  if port_in_use "$port"; then
    log "port $port (the $name's) is already in use, perhaps by another serve.sh; stop that or set $var"
    exit 1
  fi
done

stop_services() {
  kill "$WORKER_PID" ${STORE_PID:+"$STORE_PID"} 2>/dev/null || true
  wait 2>/dev/null || true
  log "stopped"
}
"$VENV/bin/inference-worker" --port "$WORKER_PORT" >"$REPO/run/worker.log" 2>&1 &
WORKER_PID=$!
trap stop_services EXIT
trap 'exit 130' INT TERM

wait_healthy() {  # URL NAME PID LOG
  for _ in $(seq 1 300); do
    curl -fsS "$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$3" 2>/dev/null || { log "$2 exited; its log:"; tail -n 30 "$4" >&2; exit 1; }
    sleep 0.1
  done
  log "$2 did not become healthy; see $4"; exit 1
}
wait_healthy "http://127.0.0.1:$WORKER_PORT" worker "$WORKER_PID" "$REPO/run/worker.log"
"$VENV/bin/model-store-server" --port "$STORE_PORT" >"$REPO/run/store.log" 2>&1 &
STORE_PID=$!
wait_healthy "http://127.0.0.1:$STORE_PORT" store "$STORE_PID" "$REPO/run/store.log"

log "worker on :$WORKER_PORT, store on :$STORE_PORT (logs in run/); models:"
curl -fsS "http://127.0.0.1:$STORE_PORT/models" | "$VENV/bin/python" -c \
  'import json,sys; [print("   ", m["name"], m["size"], "bytes") for m in json.load(sys.stdin)["models"]]' >&2
log "first request (SmolLM2):"
curl -sN -D "$REPO/run/first-request.headers" "http://127.0.0.1:$STORE_PORT/user_request" \
  -H 'Content-Type: application/json' \
  -d '{"prompt": "The three primary colours are", "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "max_tokens": 40}'
echo
log "$(grep -i '^x-cache-action' "$REPO/run/first-request.headers" | tr -d '\r')"
cat >&2 <<MSG

Ready. Send your own request:
  curl -N http://127.0.0.1:$STORE_PORT/user_request -H 'Content-Type: application/json' \\
    -d '{"prompt": "Once upon a time", "model": "gemma-3-270m-q4_k_m.gguf", "max_tokens": 64}'
Ctrl-C stops both services.
MSG
wait "$STORE_PID" || true
