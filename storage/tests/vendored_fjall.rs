//! What Tern's patch to fjall's worker pool (vendor/README.md) must keep:
//! under a write load that keeps memtables rotating, the store's flush and
//! compaction workers never wait on the channel only they read, so writes
//! keep completing, memtables keep being flushed, and everything written
//! reads back, with one worker as with Tern's two.
//!
//! Upstream 3.1.13 deadlocks here: writers `try_send` a rotation request on
//! every write that finds a memtable over its size, filling the workers'
//! bounded channel, and a worker that rotates then blocks in `send(Flush)`
//! on that full channel; once every worker is there nothing reads it again,
//! the memtables stop flushing and the writers halt behind fjall's write
//! backpressure for good.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use fjall::{Database, KeyspaceCreateOptions};

const KEYSPACES: usize = 4;
const WRITES_PER_KEYSPACE: u32 = 200_000;
/// The test fails once no write has completed for this long. The load
/// takes about two seconds here; a deadlock stops the writers for good, while
/// a slow disk only slows them.
const STALL: Duration = Duration::from_secs(30);

fn value(keyspace: usize, i: u32) -> Vec<u8> {
    let mut v = vec![b'v'; 100];
    v[..4].copy_from_slice(&i.to_be_bytes());
    v[4] = keyspace as u8;
    v
}

/// Runs `load` on a thread of its own, handing it a counter to bump as it
/// makes progress, and returns once it finished; fails the test if the
/// counter stood still for `STALL` (the stuck threads die with the
/// process), so that a deadlock fails the test instead of hanging it.
fn finishes_without_stalling(what: &str, total: u64, load: impl FnOnce(&AtomicU64) + Send + 'static) {
    let progress = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let counter = progress.clone();
    thread::spawn(move || {
        load(&counter);
        done_tx.send(()).unwrap();
    });
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        match done_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => return,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{what}: the load failed (its panic is printed above)")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
        assert!(
            since.elapsed() < STALL,
            "{what}: no write, rotation or close completed for {STALL:?} after {seen} of \
             {total} writes; the worker pool deadlocked"
        );
    }
}

/// `KEYSPACES` threads, one per keyspace, each writing
/// `WRITES_PER_KEYSPACE` keys into 16 KiB memtables (a rotation every ~130
/// writes), against a store with `workers` flush and compaction threads,
/// while another thread keeps asking for rotations. Returns once every
/// write returned, every keyspace flushed and the keys read back; fails
/// the test if the writes stall for `STALL`.
fn write_load_completes(workers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let total = KEYSPACES as u64 * u64::from(WRITES_PER_KEYSPACE);
    let what = format!("{KEYSPACES} writers and {workers} fjall worker(s)");
    finishes_without_stalling(&what, total, move |progress| {
        let db = Database::builder(&path).worker_threads(workers).open().unwrap();
        let keyspaces: Vec<_> = (0..KEYSPACES)
            .map(|k| {
                db.keyspace(&format!("k{k}"), || {
                    KeyspaceCreateOptions::default().max_memtable_size(16 * 1024)
                })
                .unwrap()
            })
            .collect();
        let writing = AtomicUsize::new(KEYSPACES);
        thread::scope(|s| {
            for (k, ks) in keyspaces.iter().enumerate() {
                let writing = &writing;
                s.spawn(move || {
                    // Counted down however the writer ends, so that a
                    // panicking writer fails the test rather than leaving
                    // the rotation loop below spinning.
                    let _done = CountDown(writing);
                    for i in 0..WRITES_PER_KEYSPACE {
                        ks.insert(i.to_be_bytes(), value(k, i)).unwrap();
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            // Rotations asked for from outside the pool too, as a
            // compaction or a test does.
            while writing.load(Ordering::Relaxed) > 0 {
                for ks in &keyspaces {
                    ks.rotate_memtable_and_wait().unwrap();
                }
            }
        });
        for (k, ks) in keyspaces.iter().enumerate() {
            ks.rotate_memtable_and_wait().unwrap();
            assert!(ks.table_count() > 0, "keyspace {k} flushed nothing");
            assert_sampled_keys_read_back(k, ks);
        }
        drop(keyspaces);
        drop(db);
    });
}

fn assert_sampled_keys_read_back(k: usize, ks: &fjall::Keyspace) {
    for i in (0..WRITES_PER_KEYSPACE).step_by(997) {
        assert_eq!(
            ks.get(i.to_be_bytes()).unwrap().as_deref(),
            Some(value(k, i).as_slice()),
            "keyspace {k} key {i}"
        );
    }
}

struct CountDown<'a>(&'a AtomicUsize);

impl Drop for CountDown<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[test]
fn writes_keep_flowing_with_one_worker() {
    write_load_completes(1);
}

#[test]
fn writes_keep_flowing_with_two_workers() {
    write_load_completes(2);
}

#[test]
fn memtables_stay_bounded_while_the_worker_lags() {
    use lsm_tree::AbstractTree;

    // One worker, four writers, 64 KiB memtables: rotation requests wait
    // behind flushes and compactions, and upstream let memtables grow to
    // 40-60 times their size here. The patch rotates on the writing
    // thread at 16 times (fjall's MEMTABLE_HARD_LIMIT_FACTOR); a write
    // adds one item past the check at most.
    const MAX: u64 = 64 * 1024;
    const BOUND: u64 = 16 * MAX + 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let total = KEYSPACES as u64 * u64::from(WRITES_PER_KEYSPACE);
    finishes_without_stalling("memtable bound", total, move |progress| {
        let db = Database::builder(&path).worker_threads(1).open().unwrap();
        let keyspaces: Vec<_> = (0..KEYSPACES)
            .map(|k| {
                db.keyspace(&format!("k{k}"), || {
                    KeyspaceCreateOptions::default().max_memtable_size(MAX)
                })
                .unwrap()
            })
            .collect();
        let largest = AtomicU64::new(0);
        thread::scope(|s| {
            for (k, ks) in keyspaces.iter().enumerate() {
                let largest = &largest;
                s.spawn(move || {
                    for i in 0..WRITES_PER_KEYSPACE {
                        ks.insert(i.to_be_bytes(), value(k, i)).unwrap();
                        largest.fetch_max(ks.tree.active_memtable().size(), Ordering::Relaxed);
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let largest = largest.into_inner();
        assert!(
            largest <= BOUND,
            "a memtable reached {largest} bytes, {:.1} times its {MAX}",
            largest as f64 / MAX as f64
        );
        for (k, ks) in keyspaces.iter().enumerate() {
            assert_sampled_keys_read_back(k, ks);
        }
    });
}
