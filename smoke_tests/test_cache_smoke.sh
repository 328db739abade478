#!/usr/bin/env bash
# Smoke test of the lru policy (MAX_CACHE_SIZE=2) against a running store at STORE_URL.
# Walks: miss, hit, second model, third model evicts the least recently used, re-load of it.
set -euo pipefail
# shellcheck source=smoke_tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

smoke_banner lru
smoke_expect_policy lru
smoke_reset
smoke_step "A first request (miss): $MODEL_A" "$MODEL_A" load_from_store
smoke_step "A repeated (hit): $MODEL_A" "$MODEL_A" already_loaded
smoke_step "B second model: $MODEL_B" "$MODEL_B" load_from_store
smoke_step "C third model evicts LRU A: $MODEL_C" "$MODEL_C" load_from_store "$MODEL_A"
smoke_step "A re-loaded, evicts LRU B: $MODEL_A" "$MODEL_A" load_from_store "$MODEL_B"
smoke_check_cache_agrees exact
smoke_pass lru
