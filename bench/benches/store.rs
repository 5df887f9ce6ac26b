//! Message appends to the fjall store: `Store::apply` of 1, 100 and 1000
//! 1:1 message writes (history + one inbox, 100-byte frames) as one atomic
//! batch, with and without `fdatasync`, which shows what a durable ack
//! costs and how much batching amortises it; then the group-commit
//! `Writer` fed by 4 threads, one message per submission, which is how
//! the shards use it (acked messages per second, pipelined and with one
//! message in flight per thread). Results are per message. Each variant
//! writes into its own fresh store in a temporary directory.
//!
//! `store/split_writers` asks whether a node's durable ingest would grow
//! with a store split into several databases: 1, 2, 4 or 8 stores, each with
//! its own group-commit writer fed by two pipelined threads, all at once
//! (one store is what a node runs today: fjall commits one batch at a
//! time under its journal lock, whatever the number of shards).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tern_bench::store::{drive_split, drive_writer, temp_store, Messages, Submitters, TempStore};
use tern_storage::{Durability, Writer};

/// Threads submitting to the writer, as several shards would.
const SUBMITTERS: usize = 4;
/// The writer's queue depth (submissions), as the engine configures it.
const WRITER_QUEUE: usize = 1024;

fn open() -> TempStore {
    match temp_store() {
        Ok(temp) => temp,
        Err(e) => panic!("cannot open a temporary store: {e}"),
    }
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/apply");
    for sync in [false, true] {
        for batch in [1usize, 100, 1000] {
            let temp = open();
            let messages = Messages::default();
            group.throughput(Throughput::Elements(batch as u64));
            let id = format!("{}/batch_{batch}", if sync { "sync" } else { "nosync" });
            group.bench_function(&id, |b| {
                b.iter_batched(
                    || messages.batch(batch),
                    |ops| {
                        if let Err(e) = temp.store.apply(&ops, sync) {
                            panic!("apply failed: {e}");
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

fn writer(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/writer_sync_4_threads");
    group.throughput(Throughput::Elements(1));
    for mode in [Submitters::Pipelined, Submitters::ClosedLoop] {
        let temp = open();
        let writer = match Writer::spawn(temp.store.clone(), Durability::Sync, WRITER_QUEUE) {
            Ok(writer) => writer,
            Err(e) => panic!("cannot start the writer: {e}"),
        };
        let handle = writer.handle();
        let messages = Messages::default();
        let id = match mode {
            Submitters::Pipelined => "pipelined",
            Submitters::ClosedLoop => "one_in_flight_per_thread",
        };
        group.bench_function(id, |b| {
            b.iter_custom(
                |total| match drive_writer(&handle, &messages, SUBMITTERS, total, mode) {
                    Ok(elapsed) => elapsed,
                    Err(e) => panic!("{id}: {e}"),
                },
            )
        });
        if let Err(e) = writer.shutdown() {
            panic!("writer shutdown failed: {e}");
        }
    }
    group.finish();
}

fn split_writers(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/split_writers");
    group.throughput(Throughput::Elements(1));
    let durabilities = [
        ("sync", Durability::Sync),
        (
            "async",
            Durability::Async {
                flush_interval: Duration::from_millis(10),
            },
        ),
    ];
    for (name, durability) in durabilities {
        for stores in [1usize, 2, 4, 8] {
            let temps: Vec<TempStore> = (0..stores).map(|_| open()).collect();
            let writers: Vec<Writer> = temps
                .iter()
                .map(
                    |t| match Writer::spawn(t.store.clone(), durability, WRITER_QUEUE) {
                        Ok(writer) => writer,
                        Err(e) => panic!("cannot start a writer: {e}"),
                    },
                )
                .collect();
            let fed: Vec<_> = writers
                .iter()
                .map(|w| (w.handle(), Messages::default()))
                .collect();
            let id = format!("{name}/stores_{stores}");
            group.bench_function(&id, |b| {
                b.iter_custom(|total| match drive_split(&fed, 2, total) {
                    Ok(elapsed) => elapsed,
                    Err(e) => panic!("{id}: {e}"),
                })
            });
            for writer in writers {
                if let Err(e) = writer.shutdown() {
                    panic!("writer shutdown failed: {e}");
                }
            }
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = apply, writer, split_writers
}
criterion_main!(benches);
