#!/usr/bin/env bash
# A burst of password registrations and logins beside steady chat: how long
# the burst takes and what it does to chat latency, for two variants of
# ternd side by side in alternating rounds. ternd runs on its defaults
# (pinned shards, OWASP argon2: the hashing is the point) but for SHARDS
# (default one per CPU, as the recorded runs had before the default became
# one per CPU but one), a
# fresh data dir each run. Each run: a chat load (`pairs`, open loop,
# CHAT_PAIRS x CHAT_RATE msgs/s, CHAT_SECS s) starts; after WARMUP s,
# USERS users register and log in, SETUP_CONCURRENCY at a time. Prints per
# run the burst's wall time and the chat run's p50 / p99 / p99.9 / max
# (which spans the burst), then the medians per variant.
#
# Usage: A_BIN=DIR [B_BIN=DIR] bench/login-storm.sh [RESULTS_DIR]
# Environment: A_BIN, B_BIN (folders holding `ternd` and `loadgen`; default
# for B: a release build of this working tree), A_NAME (a), B_NAME (b),
# A_ARGS, B_ARGS (extra ternd flags, e.g. "--hash-idle-priority false"),
# ROUNDS (2), USERS (200), SETUP_CONCURRENCY (32), CHAT_PAIRS (50),
# CHAT_RATE (100 per pair), CHAT_SECS (20), WARMUP (8), PORT (7885), SHARDS
# (nproc). Both
# variants' runs use B's loadgen. Needs jq.
set -euo pipefail

BENCH=login-storm
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_results "${1:-}"
ROUNDS=${ROUNDS:-2}
USERS=${USERS:-200}
SETUP_CONCURRENCY=${SETUP_CONCURRENCY:-32}
CHAT_PAIRS=${CHAT_PAIRS:-50}
CHAT_RATE=${CHAT_RATE:-100}
CHAT_SECS=${CHAT_SECS:-20}
WARMUP=${WARMUP:-8}
PORT=${PORT:-7885}
A_NAME=${A_NAME:-a}
B_NAME=${B_NAME:-b}
if [[ -z ${A_BIN:-} ]]; then
    echo "usage: A_BIN=DIR [B_BIN=DIR] bench/login-storm.sh [RESULTS_DIR]" >&2
    exit 2
fi
if [[ -z ${B_BIN:-} ]]; then
    bench_binaries
    B_BIN=$BIN
fi
LOADGEN=$B_BIN/loadgen

SERVER_PID="" CHAT_PID=""
trap 'stop_pids "$CHAT_PID" "$SERVER_PID"' EXIT
trap 'exit 130' INT TERM

run_one() { # $1 variant name, $2 its binaries, $3 extra ternd flags, $4 round
    local name=$1 bin=$2 extra=$3 round=$4
    local tag="$name-r$round" data="$RESULTS/data"
    local -a flags
    read -r -a flags <<<"$extra"
    rm -rf "$data"
    "$bin/ternd" --listen "127.0.0.1:$PORT" --metrics-listen off --data-dir "$data" \
        --shards "${SHARDS:-$(nproc)}" "${flags[@]}" \
        >"$RESULTS/$tag.ternd.out" 2>"$RESULTS/$tag.ternd.err" &
    SERVER_PID=$!
    wait_listening "$RESULTS/$tag.ternd.out" "$SERVER_PID" "$RESULTS/$tag.ternd.err"
    "$LOADGEN" --quiet --server "127.0.0.1:$PORT" --json "$RESULTS/$tag.chat.json" \
        --duration-secs "$CHAT_SECS" pairs --pairs "$CHAT_PAIRS" --window 1 \
        --rate "$CHAT_RATE" --payload-bytes 64 >"$RESULTS/$tag.chat.txt" 2>&1 &
    CHAT_PID=$!
    sleep "$WARMUP"
    local start end
    start=$(date +%s.%N)
    "$LOADGEN" --quiet --server "127.0.0.1:$PORT" --json "$RESULTS/$tag.storm.json" \
        --setup-concurrency "$SETUP_CONCURRENCY" --duration-secs 1 \
        connect --connections "$USERS" --hold-secs 0 >"$RESULTS/$tag.storm.txt" 2>&1 \
        || log "$tag: the burst's loadgen failed; see $RESULTS/$tag.storm.txt"
    end=$(date +%s.%N)
    wait "$CHAT_PID" || log "$tag: the chat loadgen failed; see $RESULTS/$tag.chat.txt"
    CHAT_PID=""
    stop_pids "$SERVER_PID"
    SERVER_PID=""
    jq -r --arg tag "$tag" --arg secs "$(echo "$end - $start" | bc)" \
        --slurpfile storm "$RESULTS/$tag.storm.json" '
        [$tag, ($secs | tonumber * 100 | round / 100), .latency_us.p50, .latency_us.p99,
         .latency_us.p999, .latency_us.max, (.errors + $storm[0].errors)] | @tsv' \
        "$RESULTS/$tag.chat.json" >>"$RESULTS/rows.tsv" \
        || log "$tag: no result; see $RESULTS/$tag.chat.txt"
}

: >"$RESULTS/rows.tsv"
for round in $(seq 1 "$ROUNDS"); do
    run_one "$A_NAME" "$A_BIN" "${A_ARGS:-}" "$round"
    run_one "$B_NAME" "$B_BIN" "${B_ARGS:-}" "$round"
done

{
    echo "# $USERS users register + log in ($SETUP_CONCURRENCY at once) beside $CHAT_PAIRS pairs x $CHAT_RATE msgs/s"
    echo "# $A_NAME: $A_BIN ${A_ARGS:-}"
    echo "# $B_NAME: $B_BIN ${B_ARGS:-}"
    printf 'run\tburst s\tchat p50 us\tp99 us\tp99.9 us\tmax us\terrors\n'
    cat "$RESULTS/rows.tsv"
    for name in "$A_NAME" "$B_NAME"; do
        printf 'median %s\t%s\t%s\t%s\t%s\n' "$name" "$(variant_median "$name" 2)" "$(variant_median "$name" 3)" \
            "$(variant_median "$name" 4)" "$(variant_median "$name" 5)"
    done
} | tee "$RESULTS/summary.tsv"
