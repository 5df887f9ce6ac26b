#!/usr/bin/env bash
# The runs a 2-vCPU VM cannot make, for a bigger box (issue 5's 16-core
# run), each step bounded in time so that one hang leaves the others'
# results:
#
#   limits   what the box is (CPUs, kernel, memory, fd and memlock limits,
#            sysctls) into env.txt; with TUNE=1 (a dedicated bench box
#            only) it first raises fs.nr_open, the listen backlogs, the
#            local port range and conntrack's table for a million sockets
#   connect  the largest idle-connection test the limits allow (at most
#            CONNECT_COUNT, default 1,000,000): ternd on SERVER_CPUS, one
#            loadgen worker process per CPU of CLIENT_CPUS, users created by
#            JWT logins (no password hashing), 16 sessions per user; connect
#            rate, server memory per connection, and the kernel's socket
#            memory while they are held
#   compare  bench/compare.sh with the server on one CPU and loadgen on
#            CLIENT_CPUS with one executor per CPU, so the per-core server
#            figures are not capped by a one-core client
#   scale    shard scaling: 100 pairs × 64 in flight per shard (the offered
#            load grows with the shards) at each of SCALE_SHARDS, `sync` and
#            `async`; msgs/s, per shard, and p99, and each server thread's
#            CPU share mid-run (bench/thread-cpu.sh) in scale-*.threads
#   ack      issue 4's open-loop target: ACK_RATE messages/s in total
#            (default 200,000), due evenly spread over the senders, from
#            100 senders at each of ACK_SHARDS (sync), then at the last of
#            ACK_SHARDS from 1 sender, from 100 async, and from ACK_MANY
#            senders (default 9,000: two sockets each must fit the server's
#            fd limit); ack and delivery latency from the intended send
#            time, and the sends still due at the end (unsent)
#   latency  issue 5's 100 pairs × 1 in flight (closed loop) at each of
#            SCALE_SHARDS, sync and async
#   fanout   issue 5's fan-out: one group of 10,000 members at 10 msgs/s
#            and one of 1,000 at 1,000 msgs/s, sync, at each of
#            FANOUT_SHARDS (default: 1 and the default shard count, one per
#            server CPU but one); deliveries/s, share delivered, p50/p99/max;
#            each group's members spread over loadgen's executors unless
#            FANOUT_SPREAD=0 (one executor then reads the whole group)
#
# Then summary.md in the results directory holds every table.
#
# Usage: bench/big-box.sh [RESULTS_DIR]
# Environment: STEPS ("limits connect compare scale"), SERVER_CPUS and
# CLIENT_CPUS (taskset lists; default the first and second half of the
# CPUs), CONNECT_COUNT (1000000), CONNECT_RATE (200000), SCALE_SHARDS
# (1 2 4 ... up to SERVER_CPUS' count), ACK_SHARDS (SCALE_SHARDS), ACK_RATE
# (200000), ACK_MANY (9000), ACK_EXTRA (1; 0: only the 100-sender rows),
# LATENCY_DURABILITY ("sync async"), FANOUT_SHARDS (1 and one per server CPU
# but one), FANOUT_SPREAD (1), TERND_FLAGS (more ternd flags for every
# start, e.g. "--pin-store-writer false"), DURATION (s per measured phase,
# default 5), COMPARE_CONNECTIONS (50000), TUNE (0), PREBUILT_BIN (lib.sh:
# use these ternd and loadgen binaries, for a box without cargo), PEERS
# ("nats": nats-server must be on PATH; nothing is installed), TERNS (the
# Tern variants compare runs: "tern-sync").
set -euo pipefail

BENCH=big-box
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_results "${1:-}"

cpu_count() { # $1 taskset list such as 0-7,9 → how many CPUs it names
    python3 -c '
import sys
n = 0
for part in sys.argv[1].split(","):
    lo, _, hi = part.partition("-")
    n += int(hi or lo) - int(lo) + 1
print(n)' "$1"
}

CPUS=$(nproc)
HALF=$((CPUS / 2 > 0 ? CPUS / 2 : 1))
SERVER_CPUS=${SERVER_CPUS:-0-$((HALF - 1))}
CLIENT_CPUS=${CLIENT_CPUS:-$((HALF < CPUS ? HALF : 0))-$((CPUS - 1))}
SERVER_N=$(cpu_count "$SERVER_CPUS")
CLIENT_N=$(cpu_count "$CLIENT_CPUS")
STEPS=${STEPS:-limits connect compare scale ack latency fanout}
CONNECT_COUNT=${CONNECT_COUNT:-1000000}
CONNECT_RATE=${CONNECT_RATE:-200000}
DURATION=${DURATION:-5}
COMPARE_CONNECTIONS=${COMPARE_CONNECTIONS:-50000}
TUNE=${TUNE:-0}
PEERS=${PEERS:-nats}
PORT=${PORT:-7885}
if [[ -z "${SCALE_SHARDS:-}" ]]; then
    SCALE_SHARDS=""
    for ((s = 1; s <= SERVER_N; s *= 2)); do SCALE_SHARDS+="$s "; done
fi

ACK_SHARDS=${ACK_SHARDS:-$SCALE_SHARDS}
if [[ -z "${FANOUT_SHARDS:-}" ]]; then
    FANOUT_SHARDS=1
    if ((SERVER_N > 2)); then FANOUT_SHARDS+=" $((SERVER_N - 1))"; fi
fi
ACK_RATE=${ACK_RATE:-200000}
ACK_MANY=${ACK_MANY:-9000}

SERVER_PID=""
CLIENT_PID=""
trap 'stop_pids "$SERVER_PID" "$CLIENT_PID"' EXIT
trap 'exit 130' INT TERM

bench_binaries
SUMMARY="$RESULTS/summary.md"
: >"$SUMMARY"

# ---- limits: what the box is, and what it allows ----
set_sysctl() { # $1 key, $2 value: only with TUNE=1; failures are noted
    [[ "$TUNE" == 1 ]] || return 0
    if sysctl -q -w "$1=$2" 2>>"$RESULTS/env.txt"; then
        echo "set $1 = $2" >>"$RESULTS/env.txt"
    else
        echo "could not set $1 = $2" >>"$RESULTS/env.txt"
    fi
}

if [[ " $STEPS " == *" limits "* ]]; then
    set_sysctl fs.nr_open 4194304
    set_sysctl fs.file-max 8388608
    set_sysctl net.core.somaxconn 65535
    set_sysctl net.ipv4.tcp_max_syn_backlog 65535
    set_sysctl net.ipv4.ip_local_port_range "1024 65535"
    if [[ -e /proc/sys/net/netfilter/nf_conntrack_max ]]; then
        set_sysctl net.netfilter.nf_conntrack_max 4194304
    fi
fi
# A root shell may raise its hard limit up to fs.nr_open; others keep theirs.
ulimit -Hn "$(cat /proc/sys/fs/nr_open)" 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
ulimit -l unlimited 2>/dev/null || true
{
    echo "# big-box: $(date -u +%FT%TZ), ternd $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "${TERN_COMMIT:-?}")"
    echo "cpus: $CPUS ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'))"
    echo "kernel: $(uname -r)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "open files: soft $(ulimit -n), hard $(ulimit -Hn), fs.nr_open $(cat /proc/sys/fs/nr_open)"
    echo "locked memory: $(ulimit -l) KiB"
    echo "somaxconn: $(cat /proc/sys/net/core/somaxconn), port range: $(tr '\t' ' ' </proc/sys/net/ipv4/ip_local_port_range)"
    echo "conntrack max: $(cat /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null || echo 'not loaded')"
    echo "server CPUs: $SERVER_CPUS ($SERVER_N), client CPUs: $CLIENT_CPUS ($CLIENT_N)"
    echo "data dir on: $(df -T "$RESULTS" | awk 'NR == 2 {print $2, $1}')"
} >>"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2
{ echo '## Box'; echo; echo '```'; cat "$RESULTS/env.txt"; echo '```'; echo; } >>"$SUMMARY"

start_ternd() { # $1 tag, $2 taskset list, $3 shards, rest: more ternd flags
    local tag=$1 cpus=$2 shards=$3
    shift 3
    rm -rf "$RESULTS/data-$tag"
    taskset -c "$cpus" "$BIN/ternd" --listen "127.0.0.1:$PORT" --data-dir "$RESULTS/data-$tag" \
        --shards "$shards" --argon2-memory-kib 64 --argon2-iterations 1 "$@" ${TERND_FLAGS:-} \
        >"$RESULTS/ternd-$tag.out" 2>&1 &
    SERVER_PID=$!
    # Not wait_listening: a start that fails only fails its step, and the
    # other steps still run and report.
    listening "$RESULTS/ternd-$tag.out" "$SERVER_PID" && return 0
    log "ternd ($tag) did not start; see $RESULTS/ternd-$tag.out"
    stop_ternd
    return 1
}

stop_ternd() {
    stop_pids "$SERVER_PID"
    SERVER_PID=""
}

json_field() { # $1 file, $2 python expression over r
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2" 2>/dev/null \
        || echo "n/a"
}

# ---- connect: as many idle sessions as the limits allow ----
if [[ " $STEPS " == *" connect "* ]]; then
    fds=$(ulimit -n)
    count=$CONNECT_COUNT
    # ternd holds one socket per session plus its own files.
    ((count > fds - 1000)) && count=$((fds - 1000))
    procs=$CLIENT_N
    # Each loadgen process must hold its share under the same limit.
    while ((count / procs > fds - 1000)); do procs=$((procs + 1)); done
    secret="$RESULTS/jwt.secret"
    head -c 48 /dev/urandom | base64 >"$secret"
    log "connect: $count sessions from $procs loadgen processes on CPUs $CLIENT_CPUS to $SERVER_N shards"
    if start_ternd connect "$SERVER_CPUS" "$SERVER_N" --jwt-hs256-secret-file "$secret"; then
        connected="$RESULTS/connect.connected"
        rm -f "$connected"
        # loadgen creates the file after its RSS settle and then holds the
        # sessions for --hold-secs: sample at once.
        (
            for _ in $(seq 1 600); do [[ -e "$connected" ]] && break; sleep 0.25; done
            {
                echo "## while $count sessions are held"
                grep -E 'VmRSS|VmHWM|Threads' "/proc/$SERVER_PID/status" 2>/dev/null || true
                cat /proc/net/sockstat
                grep -E 'MemTotal|MemAvailable|Slab|SUnreclaim' /proc/meminfo
            } >"$RESULTS/connect-held.txt" 2>&1
        ) &
        sampler=$!
        if ! timeout 200 taskset -c "$CLIENT_CPUS" "$BIN/loadgen" --quiet --server "127.0.0.1:$PORT" \
            --procs "$procs" --jwt-secret-file "$secret" --setup-concurrency 256 \
            --server-pid "$SERVER_PID" --rss-settle-secs 7 --connected-file "$connected" \
            --json "$RESULTS/connect.json" \
            connect --connections "$count" --sessions-per-user 16 --rate "$CONNECT_RATE" \
            --max-pending $((SERVER_N * 512)) --hold-secs 5 \
            >"$RESULTS/connect.txt" 2>&1; then
            log "connect failed or timed out; see $RESULTS/connect.txt"
        fi
        wait "$sampler" 2>/dev/null || true
        stop_ternd
    fi
    rm -rf "$RESULTS/data-connect"
    {
        echo "## Largest idle-connection test"
        echo
        echo "ternd --shards $SERVER_N on CPUs $SERVER_CPUS; loadgen --procs $procs on CPUs $CLIENT_CPUS;"
        echo "connect --connections $count --sessions-per-user 16 --rate $CONNECT_RATE (JWT-created users, token logins)"
        echo
        echo "| connections | failed | connect rate (sessions/s) | server KiB per session |"
        echo "|---|---|---|---|"
        echo "| $(json_field "$RESULTS/connect.json" 'r["connections"]') | $(json_field "$RESULTS/connect.json" 'r["errors"]') | $(json_field "$RESULTS/connect.json" 'round(r["connect_rate_per_s"])') | $(json_field "$RESULTS/connect.json" 'round(r["server_rss_kib_per_conn"], 2)') |"
        echo
        echo '```'
        cat "$RESULTS/connect-held.txt" 2>/dev/null || echo "no sample taken"
        echo '```'
        echo
    } >>"$SUMMARY"
fi

# ---- compare: one server CPU, a client with several ----
if [[ " $STEPS " == *" compare "* ]]; then
    first_server_cpu=${SERVER_CPUS%%[-,]*}
    # compare.sh's servers hold every connection in one process.
    if ((COMPARE_CONNECTIONS > $(ulimit -n) - 1000)); then
        COMPARE_CONNECTIONS=$(($(ulimit -n) - 1000))
    fi
    log "compare: servers on CPU $first_server_cpu, loadgen on $CLIENT_CPUS ($CLIENT_N executors)"
    if ! PREBUILT_BIN="$BIN" NO_INSTALL=1 PEERS="$PEERS" TERNS="${TERNS:-tern-sync}" DURATION="$DURATION" SETTLE=7 \
        CONNECTIONS="$COMPARE_CONNECTIONS" SERVER_CPU="$first_server_cpu" CLIENT_CPU="$CLIENT_CPUS" \
        CLIENT_THREADS="$CLIENT_N" timeout 420 "$ROOT/bench/compare.sh" "$RESULTS/compare" \
        >"$RESULTS/compare.txt" 2>&1; then
        log "compare failed or timed out; see $RESULTS/compare.txt"
    fi
    rm -rf "$RESULTS"/compare/data-*
    {
        echo "## Side by side, server on one CPU, loadgen on $CLIENT_N"
        echo
        cat "$RESULTS/compare/versions.txt" 2>/dev/null || true
        echo
        cat "$RESULTS/compare/table.md" 2>/dev/null || echo "no table; see compare.txt"
        echo
    } >>"$SUMMARY"
fi

# ---- scale: throughput against shards ----
if [[ " $STEPS " == *" scale "* ]]; then
    {
        echo "## Shard scaling: 100 pairs × 64 in flight per shard, 64-byte payloads"
        echo
        echo "| durability | shards | pairs | msgs/s | msgs/s per shard | p50 ms | p99 ms |"
        echo "|---|---|---|---|---|---|---|"
    } >>"$SUMMARY"
    for durability in sync async; do
        for shards in $SCALE_SHARDS; do
            tag="scale-$durability-$shards"
            pairs=$((100 * shards))
            log "scale: $durability, $shards shards, $pairs pairs"
            if ! start_ternd "$tag" "$SERVER_CPUS" "$shards" --durability "$durability"; then
                echo "| $durability | $shards | $pairs | n/a (ternd did not start) | | | |" >>"$SUMMARY"
                continue
            fi
            timeout 120 taskset -c "$CLIENT_CPUS" "$BIN/loadgen" --quiet --threads "$CLIENT_N" \
                --server "127.0.0.1:$PORT" --duration-secs "$DURATION" --json "$RESULTS/$tag.json" \
                pairs --pairs "$pairs" --window 64 --payload-bytes 64 >"$RESULTS/$tag.txt" 2>&1 &
            CLIENT_PID=$!
            # Which server thread is the bottleneck, sampled mid-run.
            sleep $((DURATION / 2 + 1))
            "$ROOT/bench/thread-cpu.sh" "$SERVER_PID" 2 >"$RESULTS/$tag.threads" 2>&1 || true
            if ! wait "$CLIENT_PID"; then
                log "$tag failed or timed out; see $RESULTS/$tag.txt"
            fi
            CLIENT_PID=""
            stop_ternd
            rm -rf "$RESULTS/data-$tag"
            j="$RESULTS/$tag.json"
            echo "| $durability | $shards | $pairs | $(json_field "$j" 'round(r["msgs_per_s"])') | $(json_field "$j" "round(r['msgs_per_s'] / $shards)") | $(json_field "$j" 'r["latency_us"]["p50"] / 1000') | $(json_field "$j" 'r["latency_us"]["p99"] / 1000') |" >>"$SUMMARY"
        done
    done
    echo >>"$SUMMARY"
    for tag in "$RESULTS"/scale-*.threads; do
        [[ -e "$tag" ]] || continue # none when no ternd started
        { echo "Busiest server threads, $(basename "$tag" .threads):"; echo '```'; head -8 "$tag"; echo '```'; echo; } >>"$SUMMARY"
    done
fi

# One `pairs` run against a fresh ternd, a row of the table in $SUMMARY:
# $1 tag, $2 shards, $3 durability, $4 senders, $5 window, $6 rate per pair
# or "" (closed loop), $7 loadgen processes, $8 "jwt" to create the users by
# JWT (no password hashing for thousands of users). The CPU share of each
# thread of ternd and of loadgen is sampled mid-run into $tag.threads.
pairs_row() {
    local tag=$1 shards=$2 durability=$3 senders=$4 window=$5 rate=$6 procs=$7 jwt=${8:-}
    local server_auth=() client_auth=() rate_arg=()
    if [[ "$jwt" == jwt ]]; then
        head -c 48 /dev/urandom | base64 >"$RESULTS/jwt.secret"
        server_auth=(--jwt-hs256-secret-file "$RESULTS/jwt.secret")
        client_auth=(--jwt-secret-file "$RESULTS/jwt.secret")
    fi
    [[ -n "$rate" ]] && rate_arg=(--rate "$rate")
    log "$tag: $durability, $shards shards, $senders senders × $window, rate per pair ${rate:-closed loop}"
    if ! start_ternd "$tag" "$SERVER_CPUS" "$shards" --durability "$durability" \
        --metrics-listen "127.0.0.1:$((PORT + 1))" "${server_auth[@]}"; then
        echo "| $durability | $shards | $senders × $window | ${rate:-closed} | n/a (ternd did not start) | | | | | | |" >>"$SUMMARY"
        return 0
    fi
    local connected="$RESULTS/$tag.connected"
    rm -f "$connected"
    # Each process holds its share of the 2 × senders sockets.
    timeout 150 taskset -c "$CLIENT_CPUS" "$BIN/loadgen" --quiet --procs "$procs" \
        --threads $((CLIENT_N / procs > 0 ? CLIENT_N / procs : 1)) "${client_auth[@]}" \
        --server "127.0.0.1:$PORT" --duration-secs "$DURATION" --json "$RESULTS/$tag.json" \
        --connected-file "$connected" pairs --pairs "$senders" --window "$window" --payload-bytes 64 "${rate_arg[@]}" \
        >"$RESULTS/$tag.txt" 2>&1 &
    CLIENT_PID=$!
    # The measured phase starts once the sessions are set up: sample its middle.
    for _ in $(seq 1 1200); do
        [[ -e "$connected" ]] && break
        kill -0 "$CLIENT_PID" 2>/dev/null || break
        sleep 0.1
    done
    sleep "$(python3 -c "print($DURATION / 2 - 1 if $DURATION > 2 else 0.2)")"
    # loadgen's coordinator and its worker processes alike.
    local clients
    clients=$(pgrep -d, -f "^$BIN/loadgen" || true)
    "$ROOT/bench/thread-cpu.sh" "$SERVER_PID,$clients" 2 >"$RESULTS/$tag.threads" 2>&1 || true
    if ! wait "$CLIENT_PID"; then
        log "$tag failed or timed out; see $RESULTS/$tag.txt"
    fi
    CLIENT_PID=""
    # The writer's commit times: a serial path's slow commits are what a
    # whole second of messages queues behind.
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
        "http://127.0.0.1:$((PORT + 1))/metrics" >"$RESULTS/$tag.metrics" 2>/dev/null || true
    stop_ternd
    rm -rf "$RESULTS/data-$tag"
    local j="$RESULTS/$tag.json"
    local ack="r.get('ack_latency_us') or {}"
    echo "| $durability | $shards | $senders × $window | ${rate:-closed} | $(json_field "$j" 'round(r["msgs_per_s"])') | $(json_field "$j" "($ack).get('p50', 0) / 1000") | $(json_field "$j" "($ack).get('p99', 0) / 1000") | $(json_field "$j" "($ack).get('p999', 0) / 1000") | $(json_field "$j" 'r["latency_us"]["p99"] / 1000') | $(json_field "$j" 'r.get("unsent", 0)') | $(slow_commits "$RESULTS/$tag.metrics") |" >>"$SUMMARY"
}

slow_commits() { # $1 a /metrics dump → "commits: over 10 ms, over 50 ms"
    python3 - "$1" <<'PY' 2>/dev/null || echo "n/a"
import re, sys
buckets = {}
for line in open(sys.argv[1]):
    m = re.match(r'tern_store_writer_commit_seconds_bucket\{le="([^"]+)"\} (\d+)', line)
    if m:
        buckets[m.group(1)] = int(m.group(2))
total = buckets["+Inf"]
print(f"{total}: {total - buckets['0.01']}, {total - buckets['0.05']}")
PY
}

pairs_table_head() { # $1 title
    {
        echo "## $1"
        echo
        echo "| durability | shards | senders × in flight | msgs/s per sender | msgs/s | ack p50 ms | ack p99 ms | ack p99.9 ms | delivery p99 ms | unsent | writer commits: > 10 ms, > 50 ms |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|"
    } >>"$SUMMARY"
}

# ---- ack: issue 4's 200,000 acked msgs/s at p99 < 5 ms ----
if [[ " $STEPS " == *" ack "* ]]; then
    # ACK_MANY senders hold two sockets each on the server.
    if ((2 * ACK_MANY > $(ulimit -n) - 1000)); then
        ACK_MANY=$((($(ulimit -n) - 1000) / 2))
    fi
    pairs_table_head "Open loop at $ACK_RATE msgs/s in total (issue 4), 64-byte payloads"
    last=""
    for shards in $ACK_SHARDS; do
        pairs_row "ack-sync-$shards-100" "$shards" sync 100 64 "$(python3 -c "print($ACK_RATE / 100)")" 1
        last=$shards
    done
    if [[ "${ACK_EXTRA:-1}" == 1 ]]; then
        # One sender needs room for a few milliseconds of its rate in flight.
        pairs_row "ack-sync-$last-1" "$last" sync 1 1024 "$ACK_RATE" 1
        pairs_row "ack-async-$last-100" "$last" async 100 64 "$(python3 -c "print($ACK_RATE / 100)")" 1
        procs=$(((2 * ACK_MANY + 18000) / 18000))
        pairs_row "ack-sync-$last-$ACK_MANY" "$last" sync "$ACK_MANY" 8 \
            "$(python3 -c "print($ACK_RATE / $ACK_MANY)")" "$procs" jwt
    fi
    echo >>"$SUMMARY"
fi

# ---- latency: issue 5's window-1 p99 against shards ----
if [[ " $STEPS " == *" latency "* ]]; then
    pairs_table_head "100 pairs × 1 in flight, closed loop (issue 5's window-1 p99)"
    for durability in ${LATENCY_DURABILITY:-sync async}; do
        for shards in $SCALE_SHARDS; do
            pairs_row "w1-$durability-$shards" "$shards" "$durability" 100 1 "" 1
        done
    done
    echo >>"$SUMMARY"
fi

# ---- fanout: one group's message to every member ----
if [[ " $STEPS " == *" fanout "* ]]; then
    {
        echo "## Fan-out, sync, 64-byte payloads, one publisher, members spread over loadgen's executors: ${FANOUT_SPREAD:-1}"
        echo
        echo "| shards | members | msgs/s published | deliveries/s | delivered | p50 ms | p99 ms | max ms |"
        echo "|---|---|---|---|---|---|---|---|"
    } >>"$SUMMARY"
    head -c 48 /dev/urandom | base64 >"$RESULTS/jwt.secret"
    for shards in $FANOUT_SHARDS; do
        for spec in "10000 10" "1000 1000"; do
            read -r members rate <<<"$spec"
            tag="fanout-$shards-$members"
            log "$tag: $shards shards, 1 group of $members members at $rate msgs/s"
            if ! start_ternd "$tag" "$SERVER_CPUS" "$shards" --durability sync \
                --jwt-hs256-secret-file "$RESULTS/jwt.secret"; then
                echo "| $shards | $members | $rate | n/a (ternd did not start) | | | | |" >>"$SUMMARY"
                continue
            fi
            if ! timeout 150 taskset -c "$CLIENT_CPUS" "$BIN/loadgen" --quiet --threads "$CLIENT_N" \
                --jwt-secret-file "$RESULTS/jwt.secret" --server "127.0.0.1:$PORT" \
                --duration-secs "$DURATION" --json "$RESULTS/$tag.json" \
                groups --groups 1 --members "$members" --rate "$rate" --payload-bytes 64 \
                $([[ "${FANOUT_SPREAD:-1}" == 1 ]] && echo --spread-members) \
                >"$RESULTS/$tag.txt" 2>&1; then
                log "$tag failed or timed out; see $RESULTS/$tag.txt"
            fi
            stop_ternd
            rm -rf "$RESULTS/data-$tag"
            j="$RESULTS/$tag.json"
            echo "| $shards | $members | $rate | $(json_field "$j" 'round(r["msgs_per_s"])') | $(json_field "$j" "'%.1f%%' % (100.0 * (r['messages'] - r['duplicated']) / max(1, r['sent'] * ($members - 1)))") | $(json_field "$j" 'r["latency_us"]["p50"] / 1000') | $(json_field "$j" 'r["latency_us"]["p99"] / 1000') | $(json_field "$j" 'r["latency_us"]["max"] / 1000') |" >>"$SUMMARY"
        done
    done
    echo >>"$SUMMARY"
fi

for tag in "$RESULTS"/ack-*.threads "$RESULTS"/w1-*.threads; do
    [[ -e "$tag" ]] || continue
    { echo "Busiest threads (ternd, loadgen), $(basename "$tag" .threads):"; echo '```'; head -14 "$tag"; echo '```'; echo; } >>"$SUMMARY"
done

cat "$SUMMARY"
