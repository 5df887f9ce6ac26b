# Shared set-up of the end-to-end bench scripts (compare.sh, ab.sh,
# idle-memory.sh, login-storm.sh, rolling-restart.sh, disk-probe.sh).
# Source it after `set -euo pipefail` with BENCH set to the script's name:
#
#   bench_results [DIR]      RESULTS: DIR, or target/$BENCH/<UTC time>;
#                            created and made absolute
#   log MESSAGE...           "$BENCH: MESSAGE..." on stderr
#   bench_binaries           BIN: release ternd and loadgen, built and copied
#                            there so a concurrent rebuild cannot swap them;
#                            with PREBUILT_BIN=DIR set, DIR's ternd and
#                            loadgen are used instead and nothing is built
#                            (a box without cargo, e.g. bench/big-box.sh's);
#                            the open-file limit raised to the hard limit
#   listening OUT PID        waits until the ternd writing OUT listens;
#                            fails with 1 if it dies, 2 after 30 s
#   wait_listening OUT PID [ERR]
#                            the same, but exits the script (citing ERR,
#                            default OUT) on failure
#   stop_pids PID...         kills and reaps each PID given (empty ones are
#                            skipped); for the scripts' EXIT traps
#   variant_median NAME COL  the median of column COL of $RESULTS/rows.tsv
#                            over the rows of variant NAME (tagged NAME-rN)
#   install_package PKG BIN  succeeds if BIN is on PATH, installing Debian's
#                            PKG first when absent (not with NO_INSTALL=1);
#                            apt's output goes to $RESULTS/apt-PKG.log

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { echo "$BENCH: $*" >&2; }

bench_results() {
    RESULTS=${1:-$ROOT/target/$BENCH/$(date -u +%Y%m%dT%H%M%SZ)}
    mkdir -p "$RESULTS"
    # Physical: loadgen's workers run from their resolved path, which
    # scripts match with pgrep.
    RESULTS=$(cd "$RESULTS" && pwd -P)
}

bench_binaries() {
    local built="$ROOT/target/release"
    if [[ -n "${PREBUILT_BIN:-}" ]]; then
        built=$PREBUILT_BIN
        log "using ternd and loadgen from $built"
    else
        log "building release ternd and loadgen"
        # Two builds: `--bin ternd` would also narrow `-p loadgen` to no binary.
        (cd "$ROOT" && cargo build --release -q -p tern-engine --bin ternd && cargo build --release -q -p loadgen)
    fi
    BIN="$RESULTS/bin"
    mkdir -p "$BIN"
    cp "$built/ternd" "$built/loadgen" "$BIN/"
    ulimit -n "$(ulimit -Hn)"
}

listening() { # $1: ternd's stdout file, $2: its pid; 1 if it exits, 2 after 30 s
    for _ in $(seq 1 600); do
        if grep -q "ternd listening on" "$1" 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 2
}

wait_listening() { # $1: ternd's stdout file, $2: its pid, $3: file to cite
    local status=0
    listening "$1" "$2" || status=$?
    case $status in
        0) return 0 ;;
        1) log "ternd exited at start; see ${3:-$1}"; exit 1 ;;
        *) log "ternd did not start listening; see ${3:-$1}"; exit 1 ;;
    esac
}

stop_pids() {
    local pid
    for pid in "$@"; do
        [[ -n "$pid" ]] || continue
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

variant_median() { # $1 variant name, $2 column of $RESULTS/rows.tsv
    awk -F'\t' -v n="$1" -v c="$2" 'index($1, n "-r") == 1 { print $c }' "$RESULTS/rows.tsv" \
        | sort -n | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

install_package() { # $1 Debian package, $2 the binary it provides
    if command -v "$2" >/dev/null 2>&1; then return 0; fi
    if [[ "${NO_INSTALL:-}" == 1 ]]; then log "$1 not installed (NO_INSTALL=1)"; return 1; fi
    local candidate
    candidate=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
        log "no Debian package $1 here (apt-cache policy $1 shows no candidate)"
        return 1
    fi
    log "installing $1 $candidate"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    if DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "$1" >"$RESULTS/apt-$1.log" 2>&1; then
        return 0
    fi
    log "installing $1 failed (see $RESULTS/apt-$1.log)"
    return 1
}
