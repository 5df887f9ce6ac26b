#!/usr/bin/env bash
# Server memory per idle authenticated session, parking on and off, side
# by side: for each round, ternd (one shard, on SERVER_CPU) is started on a
# fresh data dir with `park_after_ms` = 0 (sessions never park) and then
# with PARK_AFTER_MS, and `loadgen connect` (on CLIENT_CPU, PROCS
# processes) opens SESSIONS sessions at RATE/s and reads the server's RSS
# before connecting and SETTLE s after the last session is up (past
# `park_after_ms`, so that idle sessions have parked and the allocator has
# returned what they freed). Prints KiB per session for each run and the
# medians. See docs/benchmarks.md "Memory per connection".
#
# With RATE at about SESSIONS / 20 the connect ramp lasts as long as the
# clients' heartbeat interval (a third of the 60 s idle timeout), so
# heartbeats arrive spread out, as from real clients, and each resumes its
# session for `park_after_ms`: the figure then includes the sessions a
# heartbeat keeps live.
#
# Usage: bench/idle-memory.sh [RESULTS_DIR]
# Environment: SESSIONS (19000, what one process may hold under the 20,000
# fd cap here), ROUNDS (3), RATE (20000), SETTLE (12), PARK_AFTER_MS (5000),
# PROCS (2), SERVER_CPU (0), CLIENT_CPU (1), PORT (7883).
set -euo pipefail

BENCH=idle-memory
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_results "${1:-}"
SESSIONS=${SESSIONS:-19000}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-20000}
SETTLE=${SETTLE:-12}
PARK_AFTER_MS=${PARK_AFTER_MS:-5000}
PROCS=${PROCS:-2}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT=${PORT:-7883}

SERVER_PID=""
trap 'stop_pids "$SERVER_PID"' EXIT
trap 'exit 130' INT TERM

bench_binaries
if ((SESSIONS + 100 > $(ulimit -n))); then
    log "SESSIONS=$SESSIONS does not fit under $(ulimit -n) fds in one server process"; exit 2
fi

run() { # $1: park_after_ms, $2: round; prints KiB per session
    local park=$1 round=$2 tag="park$1-round$2"
    local data="$RESULTS/data"
    rm -rf "$data"
    TERN_PARK_AFTER_MS=$park taskset -c "$SERVER_CPU" "$BIN/ternd" --listen "127.0.0.1:$PORT" \
        --data-dir "$data" --shards 1 --no-pin --argon2-memory-kib 64 --argon2-iterations 1 \
        >"$RESULTS/ternd-$tag.out" 2>&1 &
    SERVER_PID=$!
    wait_listening "$RESULTS/ternd-$tag.out" "$SERVER_PID"
    taskset -c "$CLIENT_CPU" "$BIN/loadgen" --server "127.0.0.1:$PORT" --prefix "m${round}_" \
        --procs "$PROCS" --server-pid "$SERVER_PID" --rss-settle-secs "$SETTLE" --quiet \
        --json "$RESULTS/$tag.json" \
        connect --connections "$SESSIONS" --sessions-per-user 16 --rate "$RATE" --hold-secs 1 \
        >"$RESULTS/loadgen-$tag.out" 2>&1
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    rm -rf "$data"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["server_rss_kib_per_conn"], r["connections"])' \
        "$RESULTS/$tag.json"
}

log "$SESSIONS sessions at $RATE/s, RSS read $SETTLE s after the last; $ROUNDS rounds"
declare -a OFF ON
for round in $(seq 1 "$ROUNDS"); do
    read -r off conns_off < <(run 0 "$round")
    read -r on conns_on < <(run "$PARK_AFTER_MS" "$round")
    echo "round $round: never parking $off KiB/session ($conns_off sessions), parking after ${PARK_AFTER_MS} ms $on KiB/session ($conns_on sessions)"
    OFF+=("$off")
    ON+=("$on")
done
python3 - "${OFF[*]}" "${ON[*]}" <<'PY'
import statistics, sys
off = [float(x) for x in sys.argv[1].split()]
on = [float(x) for x in sys.argv[2].split()]
print(f"median: never parking {statistics.median(off):.2f} KiB/session, "
      f"parking {statistics.median(on):.2f} KiB/session "
      f"({statistics.median(on) / statistics.median(off):.2f}x)")
PY
