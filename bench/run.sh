#!/usr/bin/env bash
# Runs Tern's criterion benches and prints a markdown table of the medians.
#
#   bench/run.sh                 # every bench (a few minutes on 2 cores)
#   bench/run.sh queue           # only ids matching a criterion filter
#
# Extra arguments go to criterion. The table lists only results written by
# this run (estimates.json newer than its start), so stale results of
# benches filtered out are never mixed in. Needs python3 for the table.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
stamp="$(mktemp)"
trap 'rm -f "$stamp"' EXIT

cd "$root"
# criterion's own report goes to stderr so stdout carries only the table.
cargo bench -p tern-bench -- --noplot "$@" >&2

python3 - "$target/criterion" "$stamp" <<'PY'
import json, os, sys

root, stamp = sys.argv[1], sys.argv[2]
since = os.path.getmtime(stamp)

def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.1f} ns"

def fmt_rate(per_s):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if per_s >= scale:
            return f"{per_s / scale:.2f} {unit}"
    return f"{per_s:.0f}"

rows = []
for dirpath, _, files in os.walk(root):
    if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
        continue
    est_path = os.path.join(dirpath, "estimates.json")
    if os.path.getmtime(est_path) < since:
        continue
    with open(est_path) as f:
        median_ns = json.load(f)["median"]["point_estimate"]
    with open(os.path.join(dirpath, "benchmark.json")) as f:
        meta = json.load(f)
    elements = (meta.get("throughput") or {}).get("Elements") or 1
    per_elem = median_ns / elements
    rows.append((meta["full_id"], fmt_time(per_elem), fmt_rate(1e9 / per_elem) + "/s", fmt_time(median_ns), elements))

if not rows:
    sys.exit("no criterion results were written by this run")
rows.sort()
print("| benchmark | median per element | elements/s | median per iteration | elements per iteration |")
print("|---|---:|---:|---:|---:|")
for row in rows:
    print("| `%s` | %s | %s | %s | %d |" % row)
PY
