#!/usr/bin/env bash
# Smoke test of the lru-ttl policy (MAX_CACHE_SIZE=2, TTL_SECONDS=5) against a running store.
# Walks: capacity eviction of the least recently used model (not the first admitted), then
# time eviction of every expired model by the store's timer (two at once, where capacity alone
# would evict one).
# A is re-used right after the small model C, so it is well within its TTL even when loading
# a real model is slow.
set -euo pipefail
# shellcheck source=smoke_tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

smoke_banner lru-ttl
smoke_expect_policy lru-ttl
smoke_use_ttl
smoke_reset
smoke_step "A first request (miss): $MODEL_A" "$MODEL_A" load_from_store
smoke_step "C second model: $MODEL_C" "$MODEL_C" load_from_store
smoke_step "A from the worker's disk, C is now LRU: $MODEL_A" "$MODEL_A" load_from_local_store
smoke_step "B at capacity evicts LRU C: $MODEL_B" "$MODEL_B" load_from_store "$MODEL_C"
smoke_sleep_past_ttl
smoke_check_swept "$MODEL_A" "$MODEL_B"
smoke_step "C after the timer swept expired A and B: $MODEL_C" "$MODEL_C" load_from_store ""
smoke_check_cache_agrees subset
smoke_pass lru-ttl
