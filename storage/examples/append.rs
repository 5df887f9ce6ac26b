//! Rough throughput of message writes, for docs/storage.md: `Store::apply`
//! with batches of 1, 100 and 1000 messages of 100 bytes (each also
//! written to one inbox), sync on and off; then the group-commit
//! `Writer` fed by several threads submitting one message at a time.
//!
//! `cargo run --release -p tern-storage --example append [DIR]`
//! (DIR defaults to a temporary directory; put it on the disk to measure).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_storage::{
    ConvId, Durability, InboxTargets, MessageWrite, Store, StoreOptions, SubmitError, WriteOp, Writer,
};

const FRAME: usize = 100;

fn message(conv: ConvId, seq: u64, frame: &Arc<[u8]>) -> WriteOp {
    WriteOp::Message(MessageWrite {
        conv,
        seq,
        from: 1,
        client_msg_id: seq,
        timestamp_ms: seq,
        frame: Arc::clone(frame),
        inbox: InboxTargets::One(2),
        moved_from: None,
    })
}

fn open(base: &std::path::Path, name: &str) -> Store {
    Store::open(&base.join(name), StoreOptions::default()).expect("open store")
}

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let frame: Arc<[u8]> = vec![0x5a; FRAME].into();
    println!("apply(): {FRAME} B messages, one inbox each");
    for sync in [true, false] {
        for batch in [1usize, 100, 1000] {
            let store = open(&base, &format!("apply-{sync}-{batch}"));
            // Enough batches for a stable figure, bounded in time.
            let total = if sync && batch == 1 { 5_000 } else { 200_000 };
            let conv = ConvId::direct(1, 2);
            let mut seq = 0u64;
            let start = Instant::now();
            while seq < total as u64 {
                let ops: Vec<_> = (0..batch)
                    .map(|_| {
                        seq += 1;
                        message(conv, seq, &frame)
                    })
                    .collect();
                store.apply(&ops, sync).expect("apply");
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "  sync={sync:<5} batch={batch:<5} {total:>7} msgs in {secs:6.2}s = {:>9.0} msgs/s ({:7.1} µs/batch)",
                total as f64 / secs,
                secs * 1e6 / (total / batch) as f64
            );
        }
    }

    println!("Writer (group commit, Sync): one message per submission");
    for threads in [1u64, 4, 16] {
        let store = open(&base, &format!("writer-{threads}"));
        let writer = Writer::spawn(store, Durability::Sync, 4096).expect("spawn");
        let per_thread = if threads == 1 { 5_000 } else { 50_000 };
        let acked = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let handle = writer.handle();
                let acked = Arc::clone(&acked);
                let frame = Arc::clone(&frame);
                s.spawn(move || {
                    let conv = ConvId::direct(t + 10, 1);
                    // Keep at most 256 in flight per thread, like a shard
                    // with many senders waiting for their acks.
                    let mine = Arc::new(AtomicU64::new(0));
                    for seq in 1..=per_thread {
                        while seq - mine.load(Ordering::Acquire) > 256 {
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        let mut ops = vec![message(conv, seq, &frame)];
                        loop {
                            let mine = Arc::clone(&mine);
                            let acked = Arc::clone(&acked);
                            let done = Box::new(move |r: Result<(), _>| {
                                r.expect("commit");
                                mine.fetch_add(1, Ordering::Release);
                                acked.fetch_add(1, Ordering::Relaxed);
                            });
                            match handle.submit(ops, done) {
                                Ok(()) => break,
                                Err(SubmitError::Full(back)) => {
                                    ops = back;
                                    std::thread::sleep(Duration::from_micros(50));
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    while mine.load(Ordering::Acquire) < per_thread {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                });
            }
        });
        let secs = start.elapsed().as_secs_f64();
        let stats = writer.handle().stats();
        writer.shutdown().expect("shutdown");
        let total = threads * per_thread;
        println!(
            "  threads={threads:<3} {total:>7} msgs in {secs:6.2}s = {:>9.0} msgs/s, {} fsyncs, {:.0} msgs/fsync, largest group {}",
            total as f64 / secs,
            stats.fsyncs,
            total as f64 / stats.fsyncs.max(1) as f64,
            stats.max_group
        );
    }
}
