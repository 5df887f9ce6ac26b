#!/usr/bin/env bash
# Per-thread CPU use of running processes over one interval: which thread
# is the bottleneck (a shard, the store writer, fjall's workers, a
# load-generator executor, ...). Reads utime+stime of
# /proc/PID/task/*/stat twice and prints each thread's share of one CPU,
# busiest first, with its name and id.
#
# Usage: bench/thread-cpu.sh PID[,PID...] [SECONDS (default 3)]
set -euo pipefail
exec python3 - "$@" <<'PY'
import glob, os, sys, time

pids, secs = sys.argv[1].split(","), float(sys.argv[2]) if len(sys.argv) > 2 else 3.0

def snapshot():
    ticks = {}
    for path in (p for pid in pids if pid for p in glob.glob(f"/proc/{pid}/task/*/stat")):
        try:
            line = open(path).read()
        except OSError:
            continue  # the thread ended
        # The name sits in parentheses and may itself hold ") ".
        name = line[line.index("(") + 1 : line.rindex(")")]
        fields = line[line.rindex(")") + 2 :].split()
        tid = path.split("/")[-2]
        ticks[tid] = (name, int(fields[11]) + int(fields[12]))  # utime + stime
    return ticks

before = snapshot()
time.sleep(secs)
after = snapshot()
hz = os.sysconf("SC_CLK_TCK")
rows = sorted(
    ((100.0 * (t - before.get(tid, (name, t))[1]) / hz / secs, name, tid) for tid, (name, t) in after.items()),
    reverse=True,
)
for share, name, tid in rows:
    print(f"{share:6.1f}%  {name} ({tid})")
PY
