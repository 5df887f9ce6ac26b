#!/usr/bin/env bash
# Two (or three) variants of ternd + loadgen side by side, in alternating rounds: the
# way every before/after figure in docs/benchmarks.md is meant to be taken
# on these shared, noisy machines. Each run starts ternd (SHARDS shards, one by default, on
# SERVER_CPU, fresh data dir, DURABILITY) and runs one loadgen scenario
# against it on CLIENT_CPU; the variants differ by environment (A_ENV,
# B_ENV: space-separated NAME=VALUE pairs given to both ternd and loadgen)
# and/or binaries (A_BIN, B_BIN: folders holding `ternd` and `loadgen`,
# default: a release build of this working tree) and/or loadgen arguments
# (A_ARGS, B_ARGS: appended to the scenario's, e.g. B_ARGS="--login jwt"). Prints one row per run
# (msgs/s, sessions set up per second before the measured phase, joins
# included for `groups`, p50, p99, server CPU per message; for `connect`,
# sessions/s, setup latency and CPU per session) and the medians per variant.
#
# Usage: bench/ab.sh [RESULTS_DIR] -- LOADGEN_SCENARIO_ARGS...
#   e.g. A_ENV=GLOMMIO_COOP_TASKRUN=0 bench/ab.sh -- pairs --pairs 100 --window 1
# Environment: A_ENV, B_ENV, A_ARGS, B_ARGS (empty), A_BIN, B_BIN (this tree), A_NAME (a),
# B_NAME (b), ROUNDS (2), DURATION (8 s), DURABILITY (sync), SERVER_CPU (0),
# CLIENT_CPU (1), PORT (7884), SHARDS (1; with more, give SERVER_CPU as
# many CPUs, e.g. SHARDS=2 SERVER_CPU=0,1 CLIENT_CPU=2: cross-shard work
# such as presence's pair shards only shows then). Setting C_NAME adds a third variant (C_ENV,
# C_ARGS, C_BIN) to each round. Needs jq (Debian package jq) to read the results.
set -euo pipefail

BENCH=ab
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
results_arg=""
if [[ $# -gt 0 && $1 != -- ]]; then results_arg=$1; shift; fi
[[ ${1:-} == -- ]] && shift
if [[ $# -eq 0 ]]; then
    echo "usage: bench/ab.sh [RESULTS_DIR] -- LOADGEN_SCENARIO_ARGS..." >&2
    exit 2
fi
bench_results "$results_arg"
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8}
DURABILITY=${DURABILITY:-sync}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT=${PORT:-7884}
SHARDS=${SHARDS:-1}
A_NAME=${A_NAME:-a}
B_NAME=${B_NAME:-b}

SERVER_PID=""
trap 'stop_pids "$SERVER_PID"' EXIT
trap 'exit 130' INT TERM

VARIANTS=(A B)
[[ -n ${C_NAME:-} ]] && VARIANTS+=(C)
for v in "${VARIANTS[@]}"; do
    bin_var=${v}_BIN
    if [[ -z ${!bin_var:-} ]]; then
        [[ -n ${BIN:-} ]] || bench_binaries
        printf -v "$bin_var" '%s' "$BIN"
    fi
done
CLK_TCK=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() { # $1 variant name, $2 its binaries, $3 its environment, $4 its loadgen args, $5 round, rest: scenario
    local name=$1 bin=$2 vars=$3 extra=$4 round=$5
    shift 5
    local tag="$name-r$round" data="$RESULTS/data"
    local -a env_vars extra_args
    read -r -a env_vars <<<"$vars"
    read -r -a extra_args <<<"$extra"
    rm -rf "$data"
    env "${env_vars[@]}" taskset -c "$SERVER_CPU" "$bin/ternd" --listen "127.0.0.1:$PORT" \
        --data-dir "$data" --shards "$SHARDS" --no-pin --durability "$DURABILITY" \
        --argon2-memory-kib 64 --argon2-iterations 1 \
        >"$RESULTS/$tag.ternd.out" 2>"$RESULTS/$tag.ternd.err" &
    SERVER_PID=$!
    wait_listening "$RESULTS/$tag.ternd.out" "$SERVER_PID" "$RESULTS/$tag.ternd.err"
    local before after
    before=$(cpu_ticks "$SERVER_PID")
    if ! env "${env_vars[@]}" taskset -c "$CLIENT_CPU" "$bin/loadgen" --quiet \
        --server "127.0.0.1:$PORT" --duration-secs "$DURATION" --json "$RESULTS/$tag.json" \
        "$@" "${extra_args[@]}" >"$RESULTS/$tag.txt" 2>&1; then
        log "$tag: loadgen failed; see $RESULTS/$tag.txt"
    fi
    after=$(cpu_ticks "$SERVER_PID")
    stop_pids "$SERVER_PID"
    SERVER_PID=""
    # Server CPU covers set-up (logins) too: compare it between variants
    # of the same scenario, not across scenarios.
    # `connect` reports sessions, not messages: its rate and CPU are per
    # session (and its latency is session setup).
    jq -r --arg tag "$tag" --argjson ticks "$((after - before))" --argjson hz "$CLK_TCK" '
        (if .scenario == "connect" then [.connect_rate_per_s, .connections]
         else [.msgs_per_s, .messages] end) as [$rate, $count]
        | [$tag, ($rate | floor), (.connect_rate_per_s // 0 | floor), .latency_us.p50, .latency_us.p99,
           (if $count > 0 then ($ticks / $hz * 1e6 / $count * 10 | round / 10) else "-" end),
           .errors, (.lost // 0)] | @tsv' "$RESULTS/$tag.json" >>"$RESULTS/rows.tsv" \
        || log "$tag: no result; see $RESULTS/$tag.txt"
}

: >"$RESULTS/rows.tsv"
for round in $(seq 1 "$ROUNDS"); do
    for v in "${VARIANTS[@]}"; do
        name_var=${v}_NAME bin_var=${v}_BIN env_var=${v}_ENV args_var=${v}_ARGS
        run_one "${!name_var}" "${!bin_var}" "${!env_var:-}" "${!args_var:-}" "$round" "$@"
    done
done

{
    echo "# loadgen $* (durability $DURABILITY, ${DURATION} s, ternd ($SHARDS shards) on CPU $SERVER_CPU, loadgen on CPU $CLIENT_CPU)"
    for v in "${VARIANTS[@]}"; do
        name_var=${v}_NAME bin_var=${v}_BIN env_var=${v}_ENV args_var=${v}_ARGS
        echo "# ${!name_var}: ${!env_var:-} ${!bin_var} ${!args_var:-}"
    done
    printf 'run\tmsgs/s\tsetup/s\tp50 us\tp99 us\tserver CPU us/msg\terrors\tlost\n'
    cat "$RESULTS/rows.tsv"
    for v in "${VARIANTS[@]}"; do
        name_var=${v}_NAME
        name=${!name_var}
        printf 'median %s\t%s\t%s\t\t%s\n' "$name" "$(variant_median "$name" 2)" "$(variant_median "$name" 3)" \
            "$(variant_median "$name" 5)"
    done
} | tee "$RESULTS/summary.tsv"
