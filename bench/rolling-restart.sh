#!/usr/bin/env bash
# One node's turn in a rolling restart, under held load: ternd (one shard,
# pinned to SERVER_CPU) holds SESSIONS sessions from `loadgen churn
# --percent 0` (on CLIENT_CPU) with a trickle of messages; once all are
# live, ternd gets SIGTERM, must exit 0, and is started again on the same
# data dir and port. Every session resumes (LoginToken + Sync from its
# cursors) after the Disconnect{ShuttingDown, retry_after_ms} hint plus
# jitter; senders resend what was not acknowledged (deduplicated by
# client_msg_id). loadgen then verifies exactly-once, in-order delivery and
# prints the summary: reconnects, per-session resume time (p50/p99/max),
# the total from the first loss until every session was live again, and
# failures. See docs/operations.md "Rolling restarts".
#
# With SIGNAL=KILL it is the crash test at scale instead: ternd is
# SIGKILLed (no drain, no hint) RESTARTS times at random moments 1-4 s
# apart and restarted each time; every message loadgen was told is stored
# must still arrive exactly once, in order (`--verify` fails the run
# otherwise), and what was not acknowledged is resent and deduplicated.
#
# Usage: bench/rolling-restart.sh [RESULTS_DIR]
# Environment: SESSIONS (10000), TRICKLE (msgs/s, 200), DURATION (loadgen's
# window in s, 20; the restart happens HOLD s into it), HOLD (3),
# SIGNAL (TERM: graceful restart; KILL: crash), RESTARTS (1),
# RETRY_AFTER_MS (the server's hint, 1000), PROCS (loadgen processes: 1, 2
# above 9000 sessions), SERVER_CPU (0), CLIENT_CPU (1), PORT (7882).
set -euo pipefail

BENCH=rolling-restart
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_results "${1:-}"
SESSIONS=${SESSIONS:-10000}
TRICKLE=${TRICKLE:-200}
DURATION=${DURATION:-20}
HOLD=${HOLD:-3}
RETRY_AFTER_MS=${RETRY_AFTER_MS:-1000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT=${PORT:-7882}
SIGNAL=${SIGNAL:-TERM}
RESTARTS=${RESTARTS:-1}
case "$SIGNAL" in TERM | KILL) ;; *) echo "SIGNAL must be TERM or KILL" >&2; exit 2 ;; esac
CRASHES=()
[[ $SIGNAL == KILL ]] && CRASHES=(--server-crashes)
if [[ -z "${PROCS:-}" ]]; then
    PROCS=1
    ((SESSIONS > 9000)) && PROCS=2
fi

# ---- everything started here is stopped however the script ends ----
SERVER_PID="" LOADGEN_PID=""
trap 'stop_pids "$LOADGEN_PID" "$SERVER_PID"' EXIT
trap 'exit 130' INT TERM

bench_binaries
FD_LIMIT=$(ulimit -n)
log "this box caps a process at $FD_LIMIT file descriptors: one ternd holds at most" \
    "~$((FD_LIMIT - 100)) sessions here ($SESSIONS asked, plus 2 trickle senders per loadgen executor)"
if ((SESSIONS + 2 * PROCS + 100 > FD_LIMIT)); then
    log "SESSIONS=$SESSIONS does not fit under $FD_LIMIT fds in one server process"; exit 2
fi

DATA="$RESULTS/data"
rm -rf "$DATA"
start_ternd() { # $1: log suffix; sets SERVER_PID, waits until it listens
    local out="$RESULTS/ternd-$1.out"
    # Cheap password hashing: only setup logs in with passwords; sessions
    # resume with LoginToken.
    taskset -c "$SERVER_CPU" "$BIN/ternd" --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
        --shards 1 --no-pin --argon2-memory-kib 64 --argon2-iterations 1 \
        --shutdown-retry-after-ms "$RETRY_AFTER_MS" >"$out" 2>"$RESULTS/ternd-$1.err" &
    SERVER_PID=$!
    wait_listening "$out" "$SERVER_PID" "$RESULTS/ternd-$1.err"
}
now() { date +%s.%N; }

start_ternd 1
log "ternd on 127.0.0.1:$PORT (pid $SERVER_PID, CPU $SERVER_CPU); loadgen: $SESSIONS sessions, $PROCS procs, CPU $CLIENT_CPU"
taskset -c "$CLIENT_CPU" "$BIN/loadgen" --server "127.0.0.1:$PORT" --procs "$PROCS" --verify \
    --json "$RESULTS/churn.json" --connected-file "$RESULTS/connected" --duration-secs "$DURATION" \
    --setup-concurrency 32 \
    churn --connections "$SESSIONS" --percent 0 --trickle-rate "$TRICKLE" "${CRASHES[@]}" \
    >"$RESULTS/loadgen.out" 2>"$RESULTS/loadgen.err" &
LOADGEN_PID=$!
for _ in $(seq 1 6000); do
    [[ -e "$RESULTS/connected" ]] && break
    if ! kill -0 "$LOADGEN_PID" 2>/dev/null; then
        log "loadgen ended before connecting"; tail -5 "$RESULTS/loadgen.err" >&2; exit 1
    fi
    sleep 0.1
done
[[ -e "$RESULTS/connected" ]] || { log "loadgen did not connect within 10 minutes"; exit 1; }
log "all sessions connected; restarting in $HOLD s"
sleep "$HOLD"

for round in $(seq 1 "$RESTARTS"); do
    if ((round > 1)); then
        # Crash at a random moment of the load, not on a fixed beat.
        sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 1 + 3 * r / 32767 }')"
    fi
    t_term=$(now)
    kill "-$SIGNAL" "$SERVER_PID"
    status=0
    wait "$SERVER_PID" || status=$?
    t_exit=$(now)
    SERVER_PID=""
    if [[ $SIGNAL == TERM ]] && ((status != 0)); then
        log "ternd exited with status $status after SIGTERM; see $RESULTS/ternd-$round.err"; exit 1
    fi
    start_ternd "$((round + 1))"
    t_up=$(now)
    log "$(awk -v a="$t_term" -v b="$t_exit" -v c="$t_up" -v s="$SIGNAL" -v n="$round" \
        'BEGIN { printf "restart %d: SIG%s -> exited in %.2f s; start -> listening in %.2f s (down %.2f s)", n, s, b-a, c-b, c-a }')"
done

lg_status=0
wait "$LOADGEN_PID" || lg_status=$?
LOADGEN_PID=""
echo "# rolling restart: $SESSIONS sessions, trickle $TRICKLE msgs/s, hint ${RETRY_AFTER_MS} ms, $RESTARTS x SIG$SIGNAL," \
     "ternd $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (working tree)"
cat "$RESULTS/loadgen.out"
echo "# results in $RESULTS (churn.json, loadgen.err, ternd-*.err)"
exit "$lg_status"
