# Shared functions for the smoke tests; source it, do not run it.
#
# Each smoke test resets the store, then calls smoke_step once per request. A step prints
#   === N. label -> expect: <action> ===
#   <the streamed text>
#   actual: action=<action> evicted=[a,b] transport=http decision_ms=.. worker_ms=.. error=none
#   [http 200 | tcp_connect=0.000s  time_to_first_byte=0.208s  generation=0.030s  total=0.238s | throughput=~933 bytes/s]
# and the script exits non-zero, naming the step, when the action or evictions differ.
# benchmarks/plot_run.py parses this output: keep the formats in step with its regexes.
# Needs bash 5 and curl 7.63+ (for %{stderr} in --write-out); no jq, bc or awk.

STORE_URL=${STORE_URL:-http://localhost:8000}
STORE_URL=${STORE_URL%/}
MODEL_A=${MODEL_A:-SmolLM2-135M-Instruct.Q4_1.gguf}
MODEL_B=${MODEL_B:-gemma-3-270m-q4_k_m.gguf}
MODEL_C=${MODEL_C:-tiny-smoke.gguf}
PROMPT=${PROMPT:-Name three colours of the rainbow.}
MAX_TOKENS=${MAX_TOKENS:-24}
CURL_MAX_TIME=${CURL_MAX_TIME:-600}

SMOKE_TMP=$(mktemp -d "${TMPDIR:-/tmp}/smoke.XXXXXX")
trap 'rm -rf "$SMOKE_TMP"' EXIT
SMOKE_STEPS=0
SMOKE_TTL=""       # set by smoke_use_ttl in the timed policies' scripts
SMOKE_TIMINGS=()   # "step N: 1.234s" per step, shown when a timed script fails

# Values of the last response, set by smoke_request.
LAST_HTTP=""
LAST_ACTION=""
LAST_EVICTED=""
LAST_ERROR_CODE=""

smoke_fail() {
    # Name what failed on stderr and stop the script.
    echo "FAIL: $*" >&2
    if [[ -n $SMOKE_TTL && ${#SMOKE_TIMINGS[@]} -gt 0 ]]; then
        echo "note: an entry expires TTL_SECONDS=$SMOKE_TTL s after its last request ended; step times:" \
            "${SMOKE_TIMINGS[*]}. If they are long next to the TTL (a slow or busy machine)," \
            "rerun with a larger TTL_SECONDS for both the store and this script." >&2
    fi
    exit 1
}

smoke_banner() {
    # smoke_banner POLICY: the first lines of the output (plot_run.py reads the policy and models).
    echo "### model-swap smoke test: policy=$1 store=$STORE_URL"
    echo "### models: A=$MODEL_A B=$MODEL_B C=$MODEL_C max_tokens=$MAX_TOKENS"
}

json_escape() {
    # Escape a string for a JSON string literal (quotes, backslashes, control characters).
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '%s' "$s"
}

us_from_seconds() {
    # curl's seconds with six decimals ("0.190574") to integer microseconds, without floats.
    local s=${1/,/.} whole frac
    whole=${s%%.*}
    frac=000000
    [[ $s == *.* ]] && frac="${s#*.}000000"
    frac=${frac:0:6}
    printf '%d' $(( 10#${whole:-0} * 1000000 + 10#$frac ))
}

seconds_from_us() {
    # Microseconds (integer) to seconds with three decimals, rounded.
    local ms=$(( ($1 + 500) / 1000 ))
    printf '%d.%03d' $(( ms / 1000 )) $(( ms % 1000 ))
}

header_value() {
    # header_value FILE NAME: the last value of header NAME (case-insensitive) in a curl -D dump.
    local file=$1 want=${2,,} line name value=""
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ $line == *:* ]] || continue
        name=${line%%:*}
        if [[ ${name,,} == "$want" ]]; then
            value=${line#*:}
            value=${value# }
        fi
    done < "$file"
    printf '%s' "$value"
}

error_code_of() {
    # The "code" of a JSON error envelope {"error":{"code":"...",...}}, or empty.
    local body=$1
    [[ $body == *'"code"'* ]] || return 0
    body=${body#*\"code\"}
    body=${body#*\"}
    printf '%s' "${body%%\"*}"
}

# A store started with STORE_API_KEY wants it on every call but /health.
STORE_AUTH=()
if [[ -n ${STORE_API_KEY:-} ]]; then STORE_AUTH=(-H "Authorization: Bearer $STORE_API_KEY"); fi

store_models_json() {
    # GET /models of the store (compact JSON, keys sorted by Flask).
    curl -sS --max-time 30 "${STORE_AUTH[@]}" "$STORE_URL/models"
}

json_names_after() {
    # json_names_after JSON OBJECT_KEY: the "cached" list inside {"OBJECT_KEY": {...}}, comma-separated.
    local json=$1 key=$2
    [[ $json == *"\"$key\":{"*'"cached":['* ]] || return 1
    json=${json#*\""$key"\":\{}
    json=${json#*\"cached\":[}
    json=${json%%]*}
    json=${json//\"/}
    printf '%s' "${json// /}"
}

store_setting() {
    # store_setting KEY: a scalar from the "policy" object of GET /models (e.g. name, ttl_seconds).
    local json key=$1
    json=$(store_models_json 2>/dev/null) || return 0
    [[ $json == *'"policy":{'* ]] || return 0
    json=${json#*\"policy\":\{}
    json=${json%%\}*}
    [[ $json == *"\"$key\":"* ]] || return 0
    json=${json#*\""$key"\":}
    json=${json%%,*}
    printf '%s' "${json//\"/}"
}

smoke_expect_policy() {
    # smoke_expect_policy POLICY: warn (the steps will then fail) when the store runs another policy.
    local actual
    actual=$(store_setting name)
    if [[ -n $actual && $actual != "$1" ]]; then
        echo "WARNING: the store reports policy=$actual; this script expects policy=$1" >&2
    fi
}

smoke_use_ttl() {
    # Set SMOKE_TTL: TTL_SECONDS if set, else the store's ttl_seconds, else 5.
    local ttl=${TTL_SECONDS:-}
    [[ -n $ttl ]] || ttl=$(store_setting ttl_seconds)
    [[ -n $ttl && $ttl != null ]] || ttl=5
    SMOKE_TTL=$ttl
}

smoke_reset() {
    # POST /admin/reset; a store that does not answer 200 ends the test.
    local status
    echo "=== reset: POST $STORE_URL/admin/reset ==="
    status=$(curl -sS -o "$SMOKE_TMP/reset.json" -w '%{http_code}' -X POST --max-time 60 \
        "${STORE_AUTH[@]}" "$STORE_URL/admin/reset" 2>"$SMOKE_TMP/reset.err") || true
    if [[ $status != 200 ]]; then
        cat "$SMOKE_TMP/reset.json" "$SMOKE_TMP/reset.err" 2>/dev/null >&2 || true
        smoke_fail "reset: POST $STORE_URL/admin/reset answered http ${status:-none} (is the store running?)"
    fi
    cat "$SMOKE_TMP/reset.json"
}

smoke_request() {
    # smoke_request MODEL: stream one /user_request to stdout, print the action and the timing line.
    local model=$1 body metrics line status connect_us ttfb_us total_us size gen_us rate
    body=$(printf '{"prompt":"%s","model":"%s","max_tokens":%d}' \
        "$(json_escape "$PROMPT")" "$(json_escape "$model")" "$MAX_TOKENS")
    # The body streams to the terminal through tee; the -w line goes to stderr, captured apart.
    local curl_ok=1
    if ! curl -N -sS --max-time "$CURL_MAX_TIME" -X POST "$STORE_URL/user_request" "${STORE_AUTH[@]}" \
            -H 'Content-Type: application/json' --data-binary "$body" \
            -D "$SMOKE_TMP/headers" \
            -w '%{stderr}SMOKE_W %{http_code} %{time_connect} %{time_starttransfer} %{time_total} %{size_download}\n' \
            2>"$SMOKE_TMP/curl.err" | tee "$SMOKE_TMP/body"; then
        curl_ok=0
    fi
    echo
    metrics=""
    while IFS= read -r line; do  # curl's own messages go to stderr; the SMOKE_W line is ours
        if [[ $line == "SMOKE_W "* ]]; then metrics=${line#SMOKE_W }; else echo "$line" >&2; fi
    done < "$SMOKE_TMP/curl.err"
    [[ $curl_ok == 1 && -n $metrics ]] || return 1
    read -r status connect_us ttfb_us total_us size <<< "$metrics"
    connect_us=$(us_from_seconds "$connect_us")
    ttfb_us=$(us_from_seconds "$ttfb_us")
    total_us=$(us_from_seconds "$total_us")
    gen_us=$(( total_us - ttfb_us ))
    rate=0
    if (( total_us > 0 )); then rate=$(( size * 1000000 / total_us )); fi
    LAST_HTTP=$status
    LAST_ACTION=$(header_value "$SMOKE_TMP/headers" x-cache-action)
    LAST_EVICTED=$(header_value "$SMOKE_TMP/headers" x-cache-evicted)
    LAST_ERROR_CODE=""
    if [[ $status != 200 ]]; then
        LAST_ERROR_CODE=$(error_code_of "$(< "$SMOKE_TMP/body")")
        # A refused admission transfers nothing; the chart shows it as "rejected".
        [[ -n $LAST_ACTION ]] || LAST_ACTION=rejected
    fi
    SMOKE_TIMINGS+=("step $SMOKE_STEPS: $(seconds_from_us "$total_us")s")
    echo "actual: action=${LAST_ACTION:-none} evicted=[$LAST_EVICTED]" \
        "transport=$(header_value "$SMOKE_TMP/headers" x-transport)" \
        "decision_ms=$(header_value "$SMOKE_TMP/headers" x-decision-ms)" \
        "worker_ms=$(header_value "$SMOKE_TMP/headers" x-worker-ms)" \
        "error=${LAST_ERROR_CODE:-none}"
    echo "[http $status | tcp_connect=$(seconds_from_us "$connect_us")s" \
        " time_to_first_byte=$(seconds_from_us "$ttfb_us")s" \
        " generation=$(seconds_from_us "$gen_us")s" \
        " total=$(seconds_from_us "$total_us")s | throughput=~$rate bytes/s]"
}

same_names() {
    # same_names "a,b" "b,a": whether two comma-separated lists hold the same names (any order).
    local -a left right
    local name
    IFS=, read -r -a left <<< "$1"
    IFS=, read -r -a right <<< "$2"
    (( ${#left[@]} == ${#right[@]} )) || return 1
    for name in "${left[@]}"; do
        [[ ",$2," == *",$name,"* ]] || return 1
    done
}

smoke_step() {
    # smoke_step LABEL MODEL EXPECTED_ACTION [EXPECTED_EVICTED]
    # EXPECTED_EVICTED: comma-separated names in any order; "" (the default) means none, "*" unchecked.
    # EXPECTED_ACTION "rejected" means HTTP 503 with error code cache_full.
    local label=$1 model=$2 want_action=$3 want_evicted=${4-}
    SMOKE_STEPS=$(( SMOKE_STEPS + 1 ))
    local step="step $SMOKE_STEPS ($label)"
    echo
    echo "=== $SMOKE_STEPS. $label -> expect: $want_action ==="
    smoke_request "$model" || smoke_fail "$step: request for $model to $STORE_URL failed"
    if [[ $want_action == rejected ]]; then
        if [[ $LAST_HTTP != 503 || $LAST_ERROR_CODE != cache_full ]]; then
            smoke_fail "$step: expected http 503 cache_full, got http $LAST_HTTP" \
                "action=${LAST_ACTION:-none} error=${LAST_ERROR_CODE:-none}"
        fi
    elif [[ $LAST_HTTP != 200 ]]; then
        smoke_fail "$step: expected http 200 action=$want_action, got http $LAST_HTTP error=${LAST_ERROR_CODE:-none}"
    elif [[ $LAST_ACTION != "$want_action" ]]; then
        smoke_fail "$step: expected action=$want_action, got action=${LAST_ACTION:-none} evicted=[$LAST_EVICTED]"
    fi
    if [[ $want_evicted != "*" ]] && ! same_names "$LAST_EVICTED" "$want_evicted"; then
        smoke_fail "$step: expected evicted=[$want_evicted], got evicted=[$LAST_EVICTED]"
    fi
    echo "ok: step $SMOKE_STEPS"
}

smoke_check_not_on_worker() {
    # smoke_check_not_on_worker MODEL: fail (naming the last step) if the worker holds MODEL.
    local model=$1 json cached
    json=$(store_models_json) || smoke_fail "step $SMOKE_STEPS: could not read GET $STORE_URL/models"
    cached=$(json_names_after "$json" worker) || smoke_fail "step $SMOKE_STEPS: no worker cache in GET /models"
    echo "worker cache: [$cached]"
    if [[ ",$cached," == *",$model,"* ]]; then
        smoke_fail "step $SMOKE_STEPS: $model was transferred to the worker although it was refused"
    fi
}

smoke_check_cache_agrees() {
    # smoke_check_cache_agrees exact|subset: the worker's disk against the policy's entries.
    # exact: the same names. subset: every policy entry is on the worker (timed policies hide
    # expired entries that stay on disk until the next admission sweeps them).
    local mode=$1 json policy worker name
    local -a names
    json=$(store_models_json) || smoke_fail "after step $SMOKE_STEPS: could not read GET $STORE_URL/models"
    policy=$(json_names_after "$json" policy) || smoke_fail "after step $SMOKE_STEPS: no policy cache in GET /models"
    worker=$(json_names_after "$json" worker) || smoke_fail "after step $SMOKE_STEPS: no worker cache in GET /models"
    echo
    echo "cache check ($mode): policy=[$policy] worker=[$worker]"
    if [[ $mode == exact ]]; then
        same_names "$policy" "$worker" || smoke_fail "after step $SMOKE_STEPS: the worker holds [$worker]" \
            "but the policy tracks [$policy]"
        return 0
    fi
    IFS=, read -r -a names <<< "$policy"
    for name in "${names[@]}"; do
        [[ ",$worker," == *",$name,"* ]] || smoke_fail "after step $SMOKE_STEPS: the policy tracks $name" \
            "but the worker does not hold it (worker=[$worker])"
    done
}

smoke_sleep_past_ttl() {
    # Sleep one second more than SMOKE_TTL (rounded up), so every untouched entry has expired.
    local ttl=$SMOKE_TTL whole seconds
    whole=${ttl%%.*}
    seconds=$(( ${whole:-0} + 1 ))
    if [[ $ttl == *.* && ${ttl#*.} =~ [1-9] ]]; then seconds=$(( seconds + 1 )); fi
    echo
    echo "--- sleep ${seconds}s: past TTL_SECONDS=$ttl, untouched entries expire ---"
    sleep "$seconds"
}

smoke_pass() {
    # smoke_pass POLICY: the last line of a passing run.
    echo
    echo "PASS: $1 smoke test ($SMOKE_STEPS steps)"
}
