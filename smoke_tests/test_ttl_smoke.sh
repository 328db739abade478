#!/usr/bin/env bash
# Smoke test of the ttl policy (TTL_SECONDS=5) against a running store at STORE_URL.
# Walks: a hit within the window, a sleep past it during which the store's timer sweeps the
# expired entries (no request needed), and a request for an expired model is a miss again.
# The small model C goes first, so the steps
# that must find an entry alive follow only quick requests, even on a slow machine.
set -euo pipefail
# shellcheck source=smoke_tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

smoke_banner ttl
smoke_expect_policy ttl
smoke_use_ttl
smoke_reset
smoke_step "C first request (miss): $MODEL_C" "$MODEL_C" load_from_store
smoke_step "C within the TTL window (hit): $MODEL_C" "$MODEL_C" already_loaded
smoke_step "A while C is fresh, nothing expires: $MODEL_A" "$MODEL_A" load_from_store
smoke_sleep_past_ttl
smoke_check_swept "$MODEL_C" "$MODEL_A"
smoke_step "B after the timer swept expired C and A: $MODEL_B" "$MODEL_B" load_from_store ""
# What B's admission swept is checked above; whether B itself has expired by now depends on
# how long its load took, so this step's evictions are not checked.
smoke_step "C expired, so a miss again: $MODEL_C" "$MODEL_C" load_from_store "*"
smoke_check_cache_agrees subset
smoke_pass ttl
