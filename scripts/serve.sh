#!/usr/bin/env bash
# Set everything up, start the worker and the store with the real models, answer one request to
# prove it works, then keep serving until Ctrl-C or until either service exits.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/serve.sh [--help]

Sets up .venv (the first time this compiles llama-cpp-python), fetches the two real models into
./models, starts the inference worker and the model store, streams a first answer from SmolLM2,
and keeps both running until Ctrl-C. If either service exits, both are stopped.

Environment (any store or worker setting in the README can be exported too):
  STORE_PORT       the store's port (default 8000)
  WORKER_PORT      the worker's port (default 8080)
  MODELS_DIR       the store's models (default ./models)
  MODEL_CACHE_DIR  the worker's cache (default ./model_cache/$STORE_PORT: one per instance)
  RUN_DIR          logs and the first answer's headers (default ./run/$STORE_PORT)
  STORE_API_KEY    if set, the store requires it (Authorization: Bearer ...)

Two instances on other ports keep apart by default:
  STORE_PORT=8001 WORKER_PORT=8081 scripts/serve.sh
USAGE
}

for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    *) printf 'serve.sh: unknown argument %s\n\n' "$arg" >&2; usage >&2; exit 2 ;;
  esac
done

source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
set_up_everything
say() { printf '[serve] %s\n' "$*" >&2; }

WORKER_PORT="${WORKER_PORT:-8080}"
STORE_PORT="${STORE_PORT:-8000}"
export MODELS_DIR="${MODELS_DIR:-$REPO/models}"
export MODELS_CONFIG="${MODELS_CONFIG-$REPO/models.toml}"  # names and per-model settings; MODELS_CONFIG= for none
# One cache and one run folder per instance: two serve.sh on other ports must not share (and
# reconcile away) each other's models.
export MODEL_CACHE_DIR="${MODEL_CACHE_DIR:-$REPO/model_cache/$STORE_PORT}"
export RUN_DIR="${RUN_DIR:-$REPO/run/$STORE_PORT}"  # the store keeps its sessions.db here
export WORKER_URL="${WORKER_URL:-http://127.0.0.1:$WORKER_PORT}"
STORE_URL="http://127.0.0.1:$STORE_PORT"
mkdir -p "$RUN_DIR"
AUTH=()
if [[ -n ${STORE_API_KEY:-} ]]; then AUTH=(-H "Authorization: Bearer $STORE_API_KEY"); fi

port_in_use() {  # PORT: true if something accepts connections there
  "$VENV/bin/python" -c 'import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}
for spec in "worker:$WORKER_PORT:WORKER_PORT" "store:$STORE_PORT:STORE_PORT"; do
  IFS=: read -r name port var <<<"$spec"
  if port_in_use "$port"; then
    say "port $port (the $name's) is already in use, perhaps by another serve.sh; stop that or set $var"
    exit 1
  fi
done

WORKER_PID="" STORE_PID=""
stop_services() {
  local pid
  for pid in $STORE_PID $WORKER_PID; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  say "stopped"
}
trap stop_services EXIT
trap 'exit 130' INT TERM
"$VENV/bin/inference-worker" --port "$WORKER_PORT" >"$RUN_DIR/worker.log" 2>&1 &
WORKER_PID=$!

wait_healthy() {  # URL NAME PID LOG
  for _ in $(seq 1 300); do
    curl -fsS "$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$3" 2>/dev/null || { say "$2 exited; its log:"; tail -n 30 "$4" >&2; exit 1; }
    sleep 0.1
  done
  say "$2 did not become healthy; see $4"; exit 1
}
wait_healthy "http://127.0.0.1:$WORKER_PORT" worker "$WORKER_PID" "$RUN_DIR/worker.log"
"$VENV/bin/model-store-server" --port "$STORE_PORT" >"$RUN_DIR/store.log" 2>&1 &
STORE_PID=$!
wait_healthy "$STORE_URL" store "$STORE_PID" "$RUN_DIR/store.log"

say "worker on :$WORKER_PORT (cache $MODEL_CACHE_DIR), store on :$STORE_PORT (logs in $RUN_DIR); models:"
curl -fsS "${AUTH[@]}" "$STORE_URL/models" | "$VENV/bin/python" -c \
  'import json,sys; [print("   ", m["name"], m["size"], "bytes") for m in json.load(sys.stdin)["models"]]' >&2

# first_request_hint CODE: what to do about a failed first request.
first_request_hint() {
  case "$1" in
    cache_full) echo "the worker's cache is full and CACHE_POLICY=no-evict admits nothing new:" \
                     "curl -X POST $STORE_URL/admin/reset empties it, or start with CACHE_POLICY=lru" ;;
    model_too_large) echo "SmolLM2 (98 MB) is larger than MAX_CACHE_BYTES or the worker's MAX_MODEL_BYTES; raise them" ;;
    insufficient_storage) echo "the worker's disk is full: free space under $MODEL_CACHE_DIR or lower RESERVE_DISK_BYTES" ;;
    model_not_found|invalid_model) echo "MODELS_DIR ($MODELS_DIR) has no usable SmolLM2:" \
                     "run .venv/bin/python -m model_store_server.fetch_models --dest $MODELS_DIR" ;;
    unauthorized) echo "a token is wrong: STORE_API_KEY for the store, WORKER_TOKEN for the worker" ;;
    *) echo "see $RUN_DIR/store.log and $RUN_DIR/worker.log" ;;
  esac
}

say "first request (SmolLM2):"
curl -sN "${AUTH[@]}" -D "$RUN_DIR/first-request.headers" "$STORE_URL/user_request" \
  -H 'Content-Type: application/json' \
  -d '{"prompt": "The three primary colours are", "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "max_tokens": 40}' \
  | tee "$RUN_DIR/first-request.body" || true
echo
status=$(head -n 1 "$RUN_DIR/first-request.headers" 2>/dev/null | cut -d' ' -f2)
if [[ $status == 200 ]]; then
  say "$(grep -i '^x-cache-action' "$RUN_DIR/first-request.headers" | tr -d '\r')"
  cat >&2 <<MSG

Ready. Send your own request:
  curl -N $STORE_URL/user_request -H 'Content-Type: application/json' \\
    -d '{"prompt": "Once upon a time", "model": "gemma-3-270m-q4_k_m.gguf", "max_tokens": 64}'
Ctrl-C stops both services.
MSG
else
  code=$("$VENV/bin/python" -c 'import json,sys
try: print(json.load(open(sys.argv[1]))["error"]["code"])
except Exception: print("none")' "$RUN_DIR/first-request.body")
  say "the first request failed: HTTP ${status:-none} error=$code"
  say "what to do: $(first_request_hint "$code")"
  say "both services are still running (Ctrl-C stops them); the answer is in $RUN_DIR/first-request.body"
fi

# Serve until either service exits; then stop the other and say why.
status=0
wait -n "$WORKER_PID" "$STORE_PID" || status=$?
for spec in "worker:$WORKER_PID:store" "store:$STORE_PID:worker"; do
  IFS=: read -r name pid other <<<"$spec"
  if ! kill -0 "$pid" 2>/dev/null; then
    say "the $name exited (status $status); stopping the $other. Last lines of $RUN_DIR/$name.log:"
    tail -n 20 "$RUN_DIR/$name.log" >&2
    break
  fi
done
exit 1
