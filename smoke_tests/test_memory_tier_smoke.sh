#!/usr/bin/env bash
# Smoke test of the memory tier against a running store at STORE_URL whose worker holds two models
# in memory (MAX_LOADED_MODELS=2), with the lru policy, MAX_CACHE_SIZE=3 and KEEP_ALIVE_SECONDS
# (default 5; set it for both the store and this script).
# Walks: two models resident, so alternating between them is all hits; a third unloads the least
# recently used one from memory (its file stays on disk, so it comes back without a transfer);
# after a silence longer than the keep-alive the worker's memory is empty.
set -euo pipefail
# shellcheck source=smoke_tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
KEEP_ALIVE_SECONDS=${KEEP_ALIVE_SECONDS:-5}

smoke_banner memory-tier
smoke_expect_policy lru
max_loaded=$(smoke_worker_max_loaded)
if [[ ${max_loaded:-1} -lt 2 ]]; then
    smoke_fail "setup: the worker holds ${max_loaded:-one} model(s) at a time; start it with MAX_LOADED_MODELS=2"
fi
smoke_reset
smoke_step "A first request (miss): $MODEL_A" "$MODEL_A" load_from_store "" ""
smoke_step "B second model, both in memory: $MODEL_B" "$MODEL_B" load_from_store "" ""
smoke_step "A alternation (hit): $MODEL_A" "$MODEL_A" already_loaded "" ""
smoke_step "B alternation (hit): $MODEL_B" "$MODEL_B" already_loaded "" ""
smoke_step "A alternation (hit): $MODEL_A" "$MODEL_A" already_loaded "" ""
smoke_step "C third model unloads LRU B: $MODEL_C" "$MODEL_C" load_from_store "" "$MODEL_B"
smoke_step "B from the worker's disk, unloads LRU A: $MODEL_B" "$MODEL_B" load_from_local_store "" "$MODEL_A"
smoke_check_loaded "$MODEL_C,$MODEL_B"
seconds=$(( ${KEEP_ALIVE_SECONDS%%.*} + 2 ))
echo
echo "--- sleep ${seconds}s: past KEEP_ALIVE_SECONDS=$KEEP_ALIVE_SECONDS, idle models are unloaded ---"
sleep "$seconds"
smoke_check_loaded "" "keep-alive should have unloaded every idle model"
smoke_step "C after the keep-alive, from the worker's disk: $MODEL_C" "$MODEL_C" load_from_local_store "" ""
smoke_check_cache_agrees exact
smoke_pass memory-tier
