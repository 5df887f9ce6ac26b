#!/usr/bin/env bash
# Side-by-side: the same loadgen scenarios against ternd, nats-server and
# mosquitto on this box, servers pinned to one CPU and loadgen to another.
# Prints a markdown table with Tern/peer ratios; JSON results go to the
# results directory. See bench/compare.md.
#
# Usage: bench/compare.sh [RESULTS_DIR]
# Environment: DURATION (s per scenario, default 10), CONNECTIONS (idle
# connections for the memory/connect test, default 10000), SETTLE (s the
# connections sit idle before the server's memory is read, default 12: past
# ternd's 5 s park_after_ms, the same wait for every server), SERVER_CPU (0),
# CLIENT_CPU (1: a taskset list such as 1-8 gives loadgen several CPUs),
# CLIENT_THREADS (loadgen executors, default 1; give one per CPU of
# CLIENT_CPU when it has several), NO_INSTALL=1 (never apt-get), PEERS ("nats mqtt"),
# PREBUILT_BIN (see lib.sh), TERNS (the Tern variants: "tern-async
# tern-sync").
set -euo pipefail

BENCH=compare
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_results "${1:-}"
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-10000}
SETTLE=${SETTLE:-12}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
CLIENT_THREADS=${CLIENT_THREADS:-1}
PEERS=${PEERS:-nats mqtt}
TERN_PORT=7881 NATS_PORT=4223 MQTT_PORT=1884

# ---- servers we start are stopped however the script ends ----
SERVER_PID=""
stop_server() {
    stop_pids "$SERVER_PID"
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# ---- peers: install from Debian's packages when absent ----
declare -A HAVE=()
install_peer() { # $1 package, $2 binary
    if install_package "$1" "$2"; then HAVE[$1]=1; else log "skipping $1"; fi
}
for peer in $PEERS; do
    case $peer in
        nats) install_peer nats-server nats-server ;;
        mqtt) install_peer mosquitto mosquitto ;;
    esac
done

bench_binaries

wait_port() { # $1 port
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "nothing listens on 127.0.0.1:$1"; return 1
}

start_server() { # $1 target name
    local target=$1
    stop_server
    case $target in
        tern-*)
            local durability=${target#tern-} data="$RESULTS/data-$target"
            rm -rf "$data"
            local extra=()
            # --durability arrived with the config work; older ternd lacks it.
            if "$BIN/ternd" --help 2>/dev/null | grep -q -- '--durability'; then
                extra+=(--durability "$durability")
            fi
            # Cheap password hashing: only setup logs in with passwords;
            # measured sessions use LoginToken.
            taskset -c "$SERVER_CPU" "$BIN/ternd" --listen "127.0.0.1:$TERN_PORT" --data-dir "$data" \
                --shards 1 --no-pin --argon2-memory-kib 64 --argon2-iterations 1 "${extra[@]}" \
                >"$RESULTS/$target.out" 2>"$RESULTS/$target.err" &
            SERVER_PID=$!; PORT=$TERN_PORT; PROTO=tern ;;
        nats)
            taskset -c "$SERVER_CPU" nats-server -a 127.0.0.1 -p "$NATS_PORT" \
                >"$RESULTS/nats.log" 2>&1 &
            SERVER_PID=$!; PORT=$NATS_PORT; PROTO=nats ;;
        mqtt)
            cat >"$RESULTS/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
max_connections -1
EOF
            taskset -c "$SERVER_CPU" mosquitto -c "$RESULTS/mosquitto.conf" >"$RESULTS/mosquitto.log" 2>&1 &
            SERVER_PID=$!; PORT=$MQTT_PORT; PROTO=mqtt ;;
    esac
    wait_port "$PORT"
}

loadgen() { # $1 target, $2 result name, rest: loadgen arguments
    local target=$1 name=$2
    shift 2
    log "$target: $name"
    if ! taskset -c "$CLIENT_CPU" "$BIN/loadgen" --quiet --threads "$CLIENT_THREADS" \
        --protocol "$PROTO" --server "127.0.0.1:$PORT" \
        --duration-secs "$DURATION" --json "$RESULTS/$target-$name.json" "$@" \
        >"$RESULTS/$target-$name.txt" 2>&1; then
        log "$target $name failed; see $RESULTS/$target-$name.txt"
    fi
}

read -r -a TARGETS <<<"${TERNS:-tern-async tern-sync}"
for peer in $PEERS; do
    case $peer in
        nats) [[ -n "${HAVE[nats-server]:-}" ]] && TARGETS+=(nats) ;;
        mqtt) [[ -n "${HAVE[mosquitto]:-}" ]] && TARGETS+=(mqtt) ;;
    esac
done

for target in "${TARGETS[@]}"; do
    start_server "$target"
    per_user=()
    [[ $PROTO == tern ]] && per_user=(--sessions-per-user 16)
    # A fresh server for the memory figure: nothing else has run on it yet.
    loadgen "$target" connect --server-pid "$SERVER_PID" --rss-settle-secs "$SETTLE" \
        connect --connections "$CONNECTIONS" --rate 100000 --hold-secs 3 "${per_user[@]}"
    start_server "$target"
    loadgen "$target" pairs-w64 pairs --pairs 100 --window 64 --payload-bytes 64
    loadgen "$target" pairs-w1 pairs --pairs 100 --window 1 --payload-bytes 64
    loadgen "$target" groups groups --groups 1 --members 1000 --rate 1000 --payload-bytes 64
    # 10,000 members: 10 msgs/s is already 100,000 deliveries/s to 10,000
    # sockets, each delivery its own send (no batching at this rate).
    loadgen "$target" groups-10k groups --groups 1 --members 10000 --rate 10 --payload-bytes 64
    stop_server
done

{
    echo "# compare: $(date -u +%FT%TZ) on $(nproc) CPUs, $(uname -r)"
    nats_version=$(nats-server --version 2>/dev/null || true)
    # mosquitto -h prints its version and exits 1.
    mosquitto_version=$(mosquitto -h 2>/dev/null | head -1 || true)
    echo "# ternd $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (working tree), ${nats_version:-no nats-server}, ${mosquitto_version:-no mosquitto}"
    echo "# command: DURATION=$DURATION CONNECTIONS=$CONNECTIONS SETTLE=$SETTLE SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU CLIENT_THREADS=$CLIENT_THREADS bench/compare.sh $RESULTS"
} >"$RESULTS/versions.txt"

python3 - "$RESULTS" "${TARGETS[@]}" <<'EOF' | tee "$RESULTS/table.md"
import json, os, sys

results, targets = sys.argv[1], sys.argv[2:]
names = {"tern-async": "Tern (async)", "tern-sync": "Tern (sync)", "nats": "nats-server", "mqtt": "mosquitto"}

def load(target, name):
    try:
        with open(os.path.join(results, f"{target}-{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

# (label, result name, extract, unit, higher is better)
rows = [
    ("memory per idle connection", "connect", lambda r: r.get("server_rss_kib_per_conn"), "KiB", False),
    ("connect rate", "connect", lambda r: r["connect_rate_per_s"], "conn/s", True),
    ("1:1 throughput (100 pairs x 64 in flight)", "pairs-w64", lambda r: r["msgs_per_s"], "msgs/s", True),
    ("1:1 p99 (100 pairs x 64 in flight)", "pairs-w64", lambda r: r["latency_us"]["p99"] / 1000, "ms", False),
    ("1:1 p99 (100 pairs x 1 in flight)", "pairs-w1", lambda r: r["latency_us"]["p99"] / 1000, "ms", False),
    ("fan-out deliveries (1 x 1000 members, 1000 msgs/s)", "groups", lambda r: r["msgs_per_s"], "deliv/s", True),
    ("fan-out p99", "groups", lambda r: r["latency_us"]["p99"] / 1000, "ms", False),
    ("fan-out delivered in drain", "groups", lambda r: 100.0 * (r["messages"] - r["duplicated"]) / max(1, r["sent"] * 999), "%", True),
    ("fan-out deliveries (1 x 10,000 members, 10 msgs/s)", "groups-10k", lambda r: r["msgs_per_s"], "deliv/s", True),
    ("fan-out p99 (10,000 members)", "groups-10k", lambda r: r["latency_us"]["p99"] / 1000, "ms", False),
    ("fan-out delivered in drain (10,000 members)", "groups-10k", lambda r: 100.0 * (r["messages"] - r["duplicated"]) / max(1, r["sent"] * 9999), "%", True),
]

def fmt(v):
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"

terns = [t for t in targets if t.startswith("tern")]
peers = [t for t in targets if not t.startswith("tern")]
ratio_cols = [(t, p) for t in terns for p in peers]
header = ["metric", "unit"] + [names.get(t, t) for t in targets] + [f"{names[t]} / {names[p]}" for t, p in ratio_cols]
print("| " + " | ".join(header) + " |")
print("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
for label, name, get, unit, _ in rows:
    values = {}
    for t in targets:
        r = load(t, name)
        try:
            values[t] = None if r is None else get(r)
        except (KeyError, TypeError):
            values[t] = None
    cells = [label, unit] + [fmt(values[t]) for t in targets]
    for t, p in ratio_cols:
        a, b = values.get(t), values.get(p)
        cells.append(f"{a / b:.2f}x" if a is not None and b not in (None, 0) else "n/a")
    print("| " + " | ".join(cells) + " |")
print()
problems = []
for t in targets:
    for name in ["connect", "pairs-w64", "pairs-w1", "groups", "groups-10k"]:
        r = load(t, name)
        if r is None:
            problems.append(f"{t} {name}: no result")
        elif r.get("errors") or r.get("lost") or r.get("duplicated") or r.get("reordered"):
            problems.append(f"{t} {name}: errors {r.get('errors')}, lost {r.get('lost')}, duplicated {r.get('duplicated')}, reordered {r.get('reordered')}, connect failures {r.get('connect_failures')}")
print("Errors / loss: " + ("none" if not problems else "; ".join(problems)))
EOF
cat "$RESULTS/versions.txt"
log "results in $RESULTS"
