#!/usr/bin/env bash
# Smoke test of the no-evict policy (MAX_CACHE_SIZE=2) against a running store at STORE_URL.
# Walks: the cache fills with A and B; C is refused with HTTP 503 cache_full and never transferred.
set -euo pipefail
# shellcheck source=smoke_tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

smoke_banner no-evict
smoke_expect_policy no-evict
smoke_reset
smoke_step "A first request (miss): $MODEL_A" "$MODEL_A" load_from_store
smoke_step "A repeated (hit): $MODEL_A" "$MODEL_A" already_loaded
smoke_step "B fills the cache: $MODEL_B" "$MODEL_B" load_from_store
smoke_step "C refused, cache full: $MODEL_C" "$MODEL_C" rejected
smoke_check_not_on_worker "$MODEL_C"
smoke_step "A still cached, nothing evicted: $MODEL_A" "$MODEL_A" load_from_local_store
smoke_check_cache_agrees exact
smoke_pass no-evict
