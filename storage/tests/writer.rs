//! The group-commit writer on a real store: concurrent submitters, order
//! and exactly-once callbacks, back-pressure, async flushing, and a
//! SIGKILL crash test that re-runs this test binary as a child process.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::open;
use tern_storage::{ConvId, Durability, InboxTargets, MessageWrite, Store, SubmitError, WriteOp, Writer};

fn msg(conv: ConvId, seq: u64, from: u64, to: u64) -> WriteOp {
    WriteOp::Message(MessageWrite {
        conv,
        seq,
        from,
        client_msg_id: seq,
        timestamp_ms: seq,
        frame: vec![0xab; 100].into(),
        inbox: InboxTargets::One(to),
        moved_from: None,
    })
}

/// Submits, retrying while the queue is full.
fn submit_retry(
    handle: &tern_storage::WriterHandle,
    mut ops: Vec<WriteOp>,
    done: impl FnOnce(Result<(), tern_storage::StoreError>) + Send + Clone + 'static,
) {
    loop {
        match handle.submit(ops, Box::new(done.clone())) {
            Ok(()) => return,
            Err(SubmitError::Full(back)) => {
                ops = back;
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn concurrent_submitters_get_every_callback_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let threads = 8u64;
    let per_thread = 300u64;
    {
        let store = open(dir.path());
        let writer = Writer::spawn(store, Durability::Sync, 64).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for t in 0..threads {
                let handle = writer.handle();
                let calls = Arc::clone(&calls);
                s.spawn(move || {
                    let conv = ConvId::direct(t + 1, 100);
                    let last_done = Arc::new(AtomicU64::new(0));
                    for seq in 1..=per_thread {
                        let last = Arc::clone(&last_done);
                        let calls = Arc::clone(&calls);
                        let called = Arc::new(AtomicUsize::new(0));
                        submit_retry(&handle, vec![msg(conv, seq, t + 1, 100)], move |r| {
                            r.unwrap();
                            assert_eq!(called.fetch_add(1, Ordering::SeqCst), 0);
                            // In order per submitter.
                            assert_eq!(last.swap(seq, Ordering::SeqCst), seq - 1);
                            calls.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                });
            }
        });
        let handle = writer.handle();
        writer.shutdown().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst) as u64, threads * per_thread);
        let stats = handle.stats();
        assert_eq!(stats.submissions, threads * per_thread);
        assert_eq!(stats.ops, threads * per_thread);
        assert_eq!(stats.errors, 0);
        assert!(stats.batches <= stats.submissions);
        // Every group commit (no retries here) was timed.
        assert_eq!(stats.commit_micros_counts.iter().sum::<u64>(), stats.batches);
        assert!(stats.commit_micros_sum > 0, "{stats:?}");
        eprintln!("{stats:?}");
        // Submitting after shutdown is refused with the ops back.
        match handle.submit(vec![msg(ConvId::direct(1, 2), 1, 1, 2)], Box::new(|_| panic!())) {
            Err(SubmitError::Stopped(ops)) => assert_eq!(ops.len(), 1),
            other => panic!("{other:?}"),
        }
    }
    let store = open(dir.path());
    for t in 0..threads {
        let conv = ConvId::direct(t + 1, 100);
        assert_eq!(store.conv_tail(conv, 0).unwrap().last_seq, per_thread);
        assert_eq!(
            store.history(conv, 0, true, 1000).unwrap().len() as u64,
            per_thread
        );
    }
    assert_eq!(
        store.inbox_after(100, None, usize::MAX).unwrap().len() as u64,
        threads * per_thread
    );
}

#[test]
fn a_full_queue_is_refused_with_the_ops_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = Writer::spawn(store, Durability::Sync, 2).unwrap();
    let handle = writer.handle();
    // Park the writer thread inside a callback, then fill the queue.
    let (entered_tx, entered_rx) = mpsc::channel();
    let gate = Arc::new(Mutex::new(()));
    let held = gate.lock().unwrap();
    let g = Arc::clone(&gate);
    handle
        .submit(
            vec![msg(ConvId::direct(1, 2), 1, 1, 2)],
            Box::new(move |_| {
                entered_tx.send(()).unwrap();
                drop(g.lock().unwrap());
            }),
        )
        .unwrap();
    entered_rx.recv().unwrap();
    let done_count = Arc::new(AtomicUsize::new(0));
    for seq in 2..=3 {
        let c = Arc::clone(&done_count);
        handle
            .submit(
                vec![msg(ConvId::direct(1, 2), seq, 1, 2)],
                Box::new(move |r| {
                    r.unwrap();
                    c.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
    }
    assert_eq!(handle.queued(), 2);
    match handle.submit(vec![msg(ConvId::direct(1, 2), 4, 1, 2)], Box::new(|_| panic!())) {
        Err(SubmitError::Full(ops)) => assert_eq!(ops, vec![msg(ConvId::direct(1, 2), 4, 1, 2)]),
        other => panic!("{other:?}"),
    }
    drop(held);
    writer.shutdown().unwrap();
    assert_eq!(done_count.load(Ordering::SeqCst), 2);
}

#[test]
fn async_mode_acks_before_syncing_and_flushes_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = Writer::spawn(
        store.clone(),
        Durability::Async {
            flush_interval: Duration::from_millis(50),
        },
        16,
    )
    .unwrap();
    let handle = writer.handle();
    let (tx, rx) = mpsc::channel();
    for seq in 1..=10 {
        let tx = tx.clone();
        submit_retry(&handle, vec![msg(ConvId::direct(1, 2), seq, 1, 2)], move |r| {
            tx.send(r.is_ok()).unwrap()
        });
    }
    for _ in 0..10 {
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    // Acked: readable right away (in the journal), though not yet synced.
    assert_eq!(store.conv_tail(ConvId::direct(1, 2), 0).unwrap().last_seq, 10);
    // A quiet writer still syncs within the interval.
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.stats().fsyncs == 0 {
        assert!(Instant::now() < deadline, "async writer never flushed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = handle.stats();
    assert!(stats.fsyncs <= stats.batches, "{stats:?}");
    // Idle: no more flushes without new commits.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(handle.stats().fsyncs, stats.fsyncs);
    writer.shutdown().unwrap();
}

/// Under steady load the queue is never empty when a flush falls due: the
/// writer must still sync every `flush_interval`, or async mode's bound on
/// what an OS crash loses (docs/storage.md) holds only when traffic stops.
#[test]
fn async_mode_flushes_while_load_lasts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = Writer::spawn(
        store,
        Durability::Async {
            flush_interval: Duration::from_millis(10),
        },
        100_000,
    )
    .unwrap();
    let handle = writer.handle();
    let acked = Arc::new(AtomicU64::new(0));
    let conv = ConvId::direct(1, 2);
    let load = Duration::from_millis(600);
    let started = Instant::now();
    let mut seq = 0;
    // Keep the queue full for `load`; the first acks arrive meanwhile.
    while started.elapsed() < load {
        seq += 1;
        let acked = Arc::clone(&acked);
        submit_retry(&handle, vec![msg(conv, seq, 1, 2)], move |r| {
            assert!(r.is_ok());
            acked.fetch_add(1, Ordering::Relaxed);
        });
    }
    let fsyncs_under_load = handle.stats().fsyncs;
    let acked_under_load = acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < seq {
        assert!(Instant::now() < deadline, "writer too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    // About 600 / (10 + one fsync) ms worth of flushes are due; demand a
    // few, so a slow disk cannot fail the test but "none" does.
    assert!(
        acked_under_load > 0 && seq > acked_under_load,
        "the queue emptied under load"
    );
    assert!(
        fsyncs_under_load >= 3,
        "{fsyncs_under_load} fsyncs in {load:?} of load ({acked_under_load} of {seq} acked)"
    );
    writer.shutdown().unwrap();
}

#[test]
fn a_failing_submission_does_not_fail_its_group() {
    // A corrupt receipt record fails the submission that reads it; the
    // others committed in the same group still succeed.
    let dir = tempfile::tempdir().unwrap();
    let conv = ConvId::direct(1, 2);
    drop(open(dir.path()));
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let ks = db
            .keyspace("receipts", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let key = [
            &2u64.to_be_bytes()[..],
            &[1],
            &1u64.to_be_bytes(),
            &2u64.to_be_bytes(),
        ]
        .concat();
        ks.insert(key, b"\x01bad").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = open(dir.path());
    let writer = Writer::spawn(store.clone(), Durability::Sync, 16).unwrap();
    let handle = writer.handle();
    let (tx, rx) = mpsc::channel();
    let results = Arc::new(Mutex::new(Vec::new()));
    // Hold the writer in a callback so the next three land in one group.
    let gate = Arc::new(Mutex::new(()));
    let held = gate.lock().unwrap();
    let g = Arc::clone(&gate);
    handle
        .submit(
            vec![msg(ConvId::direct(5, 6), 1, 5, 6)],
            Box::new(move |_| {
                tx.send(()).unwrap();
                drop(g.lock().unwrap());
            }),
        )
        .unwrap();
    rx.recv().unwrap();
    let ops = [
        vec![msg(conv, 1, 1, 2)],
        vec![WriteOp::Receipt {
            user: 2,
            conv,
            kind: tern_storage::ReceiptKind::Read,
            seq: 1,
        }],
        vec![msg(conv, 2, 1, 2)],
    ];
    for (i, ops) in ops.into_iter().enumerate() {
        let results = Arc::clone(&results);
        handle
            .submit(
                ops,
                Box::new(move |r| results.lock().unwrap().push((i, r.is_ok()))),
            )
            .unwrap();
    }
    drop(held);
    writer.shutdown().unwrap();
    assert_eq!(*results.lock().unwrap(), vec![(0, true), (1, false), (2, true)]);
    assert_eq!(store.conv_tail(conv, 0).unwrap().last_seq, 2);
    assert_eq!(handle_stats_errors(&handle), 1);
}

fn handle_stats_errors(h: &tern_storage::WriterHandle) -> u64 {
    h.stats().errors
}

const CHILD_ENV: &str = "TERN_WRITER_CRASH_CHILD";
const CRASH_SENDERS: u64 = 4;

/// The child half of the crash test: does nothing unless started by
/// `writer_acks_survive_sigkill` with the environment variable set. It
/// submits messages from several threads until killed and prints
/// `ACK <conv> <seq>` to stdout for each acknowledged one.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, dir) = spec.split_once(':').unwrap();
    let durability = match mode {
        "sync" => Durability::Sync,
        _ => Durability::Async {
            flush_interval: Duration::from_secs(3600),
        },
    };
    let store = Store::open(std::path::Path::new(dir), common::fast_opts()).unwrap();
    let writer = Writer::spawn(store, durability, 256).unwrap();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    std::thread::scope(|s| {
        for t in 1..=CRASH_SENDERS {
            let handle = writer.handle();
            let out = Arc::clone(&out);
            s.spawn(move || {
                let conv = ConvId::direct(t, 1000);
                for seq in 1.. {
                    let out = Arc::clone(&out);
                    submit_retry(&handle, vec![msg(conv, seq, t, 1000)], move |r| {
                        if r.is_ok() {
                            let mut o = out.lock().unwrap();
                            writeln!(o, "ACK {t} {seq}").unwrap();
                            o.flush().unwrap();
                        }
                    });
                }
            });
        }
    });
}

fn crash_round(mode: &str, kill_after_acks: usize) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}:{}", dir.path().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acked = vec![0u64; CRASH_SENDERS as usize + 1];
        let mut count = 0usize;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may have printed "test crash_child ... " on the
            // same line before the first ack.
            let Some((_, rest)) = line.split_once("ACK ") else {
                continue;
            };
            let (t, seq) = rest.split_once(' ').unwrap();
            let (t, seq): (usize, u64) = (t.parse().unwrap(), seq.parse().unwrap());
            assert_eq!(seq, acked[t] + 1, "acks out of order");
            acked[t] = seq;
            count += 1;
            if count == kill_after_acks {
                let _ = tx.send(());
            }
        }
        acked
    });
    // Kill at the chosen point (or after a timeout: the ack count is
    // what matters, not the moment).
    let _ = rx.recv_timeout(Duration::from_secs(60));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let acked = reader.join().unwrap();
    let total: u64 = acked.iter().sum();
    assert!(total > 0, "child acknowledged nothing");

    let store = open(dir.path());
    for t in 1..=CRASH_SENDERS {
        let conv = ConvId::direct(t, 1000);
        let tail = store.conv_tail(conv, 0).unwrap();
        let got = acked[t as usize];
        assert!(
            tail.last_seq >= got,
            "{mode}: sender {t} acked {got}, store has {}",
            tail.last_seq
        );
        // Committed batches form a prefix of each sender's submissions:
        // history is exactly 1..=last_seq, no holes.
        let history = store.history(conv, 0, true, usize::MAX).unwrap();
        let seqs: Vec<u64> = history.iter().map(|f| f.seq).collect();
        assert_eq!(
            seqs,
            (1..=tail.last_seq).collect::<Vec<_>>(),
            "{mode}: holes in history"
        );
        let inbox: Vec<u64> = store
            .inbox_after(1000, None, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|f| f.conv == conv)
            .map(|f| f.seq)
            .collect();
        assert_eq!(inbox, seqs, "{mode}: inbox differs from history");
    }
    eprintln!("{mode}: killed after {total} acks: {acked:?}");
}

#[test]
fn writer_acks_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    // Sync promises acked => fsynced; Async promises acked => in the OS,
    // which a process kill cannot take back. Vary the moment.
    for (mode, after) in [("sync", 50), ("async", 400), ("sync", 1500), ("async", 3000)] {
        crash_round(mode, after);
    }
}
