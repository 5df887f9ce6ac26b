//! Message appends to the fjall store: `Store::apply` of 1, 100 and 1000
//! 1:1 message writes (history + one inbox, 100-byte frames) as one atomic
//! batch, with and without `fdatasync`, which shows what a durable ack
//! costs and how much batching amortises it; then the group-commit
//! `Writer` fed by 4 threads, one message per submission, which is how
//! the shards use it (acked messages per second, pipelined and with one
//! message in flight per thread). Results are per message. Each variant
//! writes into its own fresh store in a temporary directory.
//!
//! `store/inbox_after` reads one page of a user's inbox: `dense`, 1,000
//! consecutive messages of one conversation; `every_16th`, 1,000 with 15
//! of the user's own after each; `sparse`, 2 messages with
//! 100,000 of the user's own between them (their own are not in their
//! inbox), which is what a user who chats a lot and rarely acknowledges
//! leaves behind.
//!
//! `store/split_writers` asks whether a node's durable ingest would grow
//! with a store split into several databases: 1, 2, 4 or 8 stores, each with
//! its own group-commit writer fed by two pipelined threads, all at once
//! (one store is what a node runs today: fjall commits one batch at a
//! time under its journal lock, whatever the number of shards).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::Arc;
use tern_bench::store::{drive_split, drive_writer, temp_store, Messages, Submitters, TempStore};

use tern_storage::{ConvId, Durability, InboxTargets, MessageWrite, WriteOp, Writer};

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

/// Stores messages `seqs` of the 1:1 between users 1 and 2, each into
/// `inbox`'s inbox, in batches of 1,000.
fn fill(temp: &TempStore, seqs: std::ops::RangeInclusive<u64>, from: u64, inbox: u64) {
    let frame: Arc<[u8]> = Arc::from(vec![0xA5u8; 100]);
    let ops: Vec<WriteOp> = seqs
        .map(|seq| {
            WriteOp::Message(MessageWrite {
                conv: ConvId::direct(1, 2),
                seq,
                from,
                client_msg_id: seq,
                timestamp_ms: 1_763_000_000_000 + seq,
                frame: Arc::clone(&frame),
                inbox: InboxTargets::One(inbox),
                moved_from: None,
            })
        })
        .collect();
    for chunk in ops.chunks(1000) {
        if let Err(e) = temp.store.apply(chunk, false) {
            panic!("apply failed: {e}");
        }
    }
}

fn inbox_after(c: &mut Criterion) {
    const GAP: u64 = 100_000;
    let mut group = c.benchmark_group("store/inbox_after");
    let dense = open();
    fill(&dense, 1..=1000, 1, 2);
    group.bench_function("dense_1000", |b| {
        b.iter(|| match dense.store.inbox_after(2, None, 1000) {
            Ok(page) => assert_eq!(page.len(), 1000),
            Err(e) => panic!("inbox_after failed: {e}"),
        })
    });
    // 1,000 wanted among 16,000: past the store's sparse factor (5), so
    // read one by one; against a range read of all 16,000.
    let interleaved = open();
    for k in 0..1000u64 {
        fill(&interleaved, k * 16 + 1..=k * 16 + 1, 1, 2);
        fill(&interleaved, k * 16 + 2..=k * 16 + 16, 2, 1);
    }
    group.bench_function("every_16th_1000", |b| {
        b.iter(|| match interleaved.store.inbox_after(2, None, 1000) {
            Ok(page) => assert_eq!(page.len(), 1000),
            Err(e) => panic!("inbox_after failed: {e}"),
        })
    });
    let sparse = open();
    fill(&sparse, 1..=1, 1, 2);
    fill(&sparse, 2..=GAP + 1, 2, 1);
    fill(&sparse, GAP + 2..=GAP + 2, 1, 2);
    group.bench_function("sparse_2_across_100000", |b| {
        b.iter(|| match sparse.store.inbox_after(2, None, 1000) {
            Ok(page) => assert_eq!(page.len(), 2),
            Err(e) => panic!("inbox_after failed: {e}"),
        })
    });
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
    targets = apply, writer, split_writers, inbox_after
}
criterion_main!(benches);
