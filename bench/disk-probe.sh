#!/usr/bin/env bash
# What a disk's fdatasync tail does to sync-mode acks, without ternd. In
# `durability = "sync"` every ack waits for a group commit: a buffered
# write to fjall's journal and one fdatasync of it. So the ack p99 can be
# no better than the journal's fdatasync p99 on that disk, and that tail
# grows when fjall writes a flushed memtable out as a new table file and
# fsyncs it (every `max_memtable_size` of writes, 64 MiB by default).
#
# Two fio runs in DIR (put it on the disk the data dir will live on):
#   journal alone    JOURNAL_BS writes, each followed by fdatasync, at up to
#                    JOURNAL_RATE, into a file extended with ftruncate (a
#                    sparse file, as fjall creates its journals)
#   beside a flush   the same, while a second job writes new files of each
#                    size in FLUSH_FILES at FLUSH_RATE and fsyncs each at its
#                    end (a size of 1m stands for a table written with an
#                    fdatasync every MiB)
# and prints per run the fdatasyncs per second and their p50 / p99 / p99.9 /
# max latency, ROUNDS times alternating.
#
# Usage: bench/disk-probe.sh [DIR] [RESULTS_DIR]
# Environment: SECS (8 per run), ROUNDS (2), JOURNAL_BS (128k: a group
# commit of ~256 messages), JOURNAL_RATE (128m: ~250k msgs/s of ~500
# bytes), FLUSH_FILES ("64m": sizes, space-separated), FLUSH_RATE (100m), JOURNAL_OPTS (extra fio
# options for the journal job, e.g. "--fallocate=native"), NO_INSTALL=1
# (never apt-get fio). Needs fio (installed from Debian's packages when
# absent) and jq. Writes up to SECS x JOURNAL_RATE plus two flush files per
# run into DIR and removes it after each run.
set -euo pipefail

BENCH=disk-probe
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
DIR=${1:-$ROOT/target/disk-probe-files}
bench_results "${2:-}"
SECS=${SECS:-8}
ROUNDS=${ROUNDS:-2}
JOURNAL_BS=${JOURNAL_BS:-128k}
JOURNAL_RATE=${JOURNAL_RATE:-128m}
FLUSH_FILES=${FLUSH_FILES:-64m}
FLUSH_RATE=${FLUSH_RATE:-100m}
JOURNAL_OPTS=${JOURNAL_OPTS:-}

if ! install_package fio fio; then
    log "fio is needed; install it (Debian: apt-get install fio)"
    exit 1
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
trap 'rm -rf "$DIR/probe"' EXIT

run_one() { # $1 tag, $2 the flush job's file size, or "none"
    local tag=$1 flush_file=$2
    local -a journal_opts flush_job=()
    read -r -a journal_opts <<<"$JOURNAL_OPTS"
    rm -rf "$DIR/probe"
    mkdir -p "$DIR/probe"
    if [[ $flush_file != none ]]; then
        # New files each loop (fjall writes each flush to a new table),
        # fsynced at the end of each. Enough loops to outlast the journal.
        flush_job=(--name=flush --rw=write --bs=1m --size="$flush_file" --end_fsync=1
            --unlink_each_loop=1 --loops=100000 --rate="$FLUSH_RATE"
            --runtime="$SECS" --time_based=0)
    fi
    # A sparse journal twice the size one run can write, so the job never
    # wraps around into blocks it already wrote.
    fio --output-format=json --directory="$DIR/probe" --ioengine=psync --fallocate=truncate \
        --name=journal --rw=write --bs="$JOURNAL_BS" --size=4g --fdatasync=1 \
        --rate="$JOURNAL_RATE" --runtime="$SECS" --time_based=1 "${journal_opts[@]}" \
        "${flush_job[@]}" >"$RESULTS/$tag.json" 2>"$RESULTS/$tag.err" \
        || { log "$tag: fio failed; see $RESULTS/$tag.err"; return; }
    jq -r --arg tag "$tag" '.jobs[] | select(.jobname == "journal") | .sync.lat_ns as $s |
        [$tag, ($s.N / (.job_runtime / 1000) | round),
         ($s.percentile["50.000000"] / 1000 | round),
         ($s.percentile["99.000000"] / 1000 | round),
         ($s.percentile["99.900000"] / 1000 | round),
         ($s.max / 1000 | round)] | @tsv' "$RESULTS/$tag.json" >>"$RESULTS/rows.tsv"
}

{
    echo "# journal: $JOURNAL_BS + fdatasync at up to $JOURNAL_RATE/s in $DIR $JOURNAL_OPTS"
    echo "# flush-SIZE: new SIZE files at $FLUSH_RATE/s, fsync at the end of each"
    printf 'run\tfdatasyncs/s\tp50 us\tp99 us\tp99.9 us\tmax us\n'
} >"$RESULTS/table.tsv"
: >"$RESULTS/rows.tsv"
for round in $(seq 1 "$ROUNDS"); do
    run_one "alone-r$round" none
    for size in $FLUSH_FILES; do
        run_one "flush-$size-r$round" "$size"
    done
done
cat "$RESULTS/rows.tsv" >>"$RESULTS/table.tsv"
for name in alone $(printf 'flush-%s ' $FLUSH_FILES); do
    printf 'median %s\t%s\t%s\t%s\t%s\t%s\n' "$name" \
        "$(variant_median "$name" 2)" "$(variant_median "$name" 3)" "$(variant_median "$name" 4)" \
        "$(variant_median "$name" 5)" "$(variant_median "$name" 6)" >>"$RESULTS/table.tsv"
done
cat "$RESULTS/table.tsv"
