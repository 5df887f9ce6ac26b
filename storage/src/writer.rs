//! The group-commit writer: one dedicated thread that owns message writes.
//! Shards (any thread) [`WriterHandle::submit`] batches of [`WriteOp`]s
//! into a bounded crossbeam channel without blocking and ring its
//! [`Doorbell`]; the writer thread parks while idle (it never spins or
//! yields), then drains whatever else
//! is queued, applies all of it as ONE fjall batch with ONE `fdatasync`
//! (in [`Durability::Sync`]) and only then runs each submission's `done`
//! callback, in submission order. So the fsync cost (~200 µs) is shared by
//! every message that arrived while the previous one ran, across all
//! shards. In [`Durability::Async`] the batch is written to the OS
//! without an fsync and the journal is synced at most `flush_interval`
//! after the first unsynced commit.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use fjall::PersistMode;

use crate::messages::WriteOp;
use crate::{Store, StoreError};

/// Most op weight (keys, see [`WriteOp::weight`]) drained into one commit.
/// A single submission heavier than this is still committed whole.
const MAX_BATCH_WEIGHT: usize = 4096;

/// When a submission counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `done(Ok)` only after the batch is fsynced (`fdatasync`): it
    /// survives power loss.
    Sync,
    /// `done(Ok)` after the batch is written to the OS (survives a crash
    /// of the process, not of the machine); the journal is fsynced at
    /// most `flush_interval` after a commit.
    Async { flush_interval: Duration },
}

/// Callback run on the writer thread with the commit's result.
pub type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Why [`WriterHandle::submit`] did not queue a submission. The ops come
/// back; `done` is dropped without being called.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds `queue_depth` submissions: push back and retry.
    Full(Vec<WriteOp>),
    /// The writer is shutting down or gone.
    Stopped(Vec<WriteOp>),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Full(_) => f.write_str("storage writer queue is full"),
            SubmitError::Stopped(_) => f.write_str("storage writer has stopped"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// Upper bounds of the latency buckets the writer and its callers count
/// in, microseconds (50 µs to 2.5 s: an fsync on NVMe is ~200 µs, a
/// stalled disk is seconds). Values above the last bound go to one more
/// bucket.
pub const LATENCY_MICROS_BUCKETS: [u64; 15] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];
const LATENCY_SLOTS: usize = LATENCY_MICROS_BUCKETS.len() + 1;

/// Counters of a writer, read with [`WriterHandle::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// fjall batches committed (one per group commit, plus retries).
    pub batches: u64,
    /// Submissions whose `done` has run.
    pub submissions: u64,
    /// Ops committed successfully.
    pub ops: u64,
    /// fsyncs issued (one per batch in `Sync`, one per flush in `Async`).
    pub fsyncs: u64,
    /// Submissions completed with an error.
    pub errors: u64,
    /// Largest number of submissions in one group commit.
    pub max_group: u64,
    /// How long each group commit took the writer thread (the fjall batch
    /// write plus, in `Sync`, its `fdatasync`), counted per bucket of
    /// [`LATENCY_MICROS_BUCKETS`] (not cumulative; the last slot is above
    /// every bound). Set apart from the time a submission waited in the
    /// queue, this tells a slow disk from a writer that cannot keep up.
    pub commit_micros_counts: [u64; LATENCY_SLOTS],
    /// The sum of those times, µs.
    pub commit_micros_sum: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    submissions: AtomicU64,
    ops: AtomicU64,
    fsyncs: AtomicU64,
    errors: AtomicU64,
    max_group: AtomicU64,
    commit_micros_counts: [AtomicU64; LATENCY_SLOTS],
    commit_micros_sum: AtomicU64,
}

impl Counters {
    /// Counts one group commit that took `elapsed`.
    fn commit_took(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let slot = LATENCY_MICROS_BUCKETS.partition_point(|&bound| bound < micros);
        if let Some(count) = self.commit_micros_counts.get(slot) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.commit_micros_sum.fetch_add(micros, Ordering::Relaxed);
    }
}

enum Msg {
    Job(Vec<WriteOp>, Done),
    Shutdown,
}

struct Shared {
    /// `true` once shutdown began. Submitters hold the read lock across
    /// their `try_send`, so every accepted job is queued before the
    /// shutdown marker and gets its `done`.
    stopped: RwLock<bool>,
    counters: Counters,
    /// The store written to, for [`WriterHandle::store_sync_stats`].
    store: Store,
    bell: Doorbell,
}

/// How a submitter wakes the writer thread. The writer parks as soon as
/// its queue is empty; crossbeam's blocking `recv` would first spin and
/// `sched_yield` several times (~3,000 yields/s under `pairs 1 × 256`),
/// and on a CPU the writer shares, each yield hands the CPU to the
/// neighbour for the rest of its slice instead of sleeping until the next
/// submission wakes it.
#[derive(Default)]
struct Doorbell {
    /// Set by the writer before its last look at the queue and its park.
    sleeping: AtomicBool,
    /// The writer thread, set by itself before it first sleeps.
    thread: OnceLock<Thread>,
}

impl Doorbell {
    /// After a message was queued: wakes the writer if it is (about to be)
    /// parked. The fence pairs with the writer's, after `sleeping` is set:
    /// either the writer's last look sees the message, or this sees
    /// `sleeping` (and a wake before its park makes the park return).
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            if let Some(thread) = self.thread.get() {
                thread.unpark();
            }
        }
    }
}

/// What [`next_message`] found.
enum Next {
    Message(Msg),
    /// The deadline passed with the queue empty.
    Timeout,
    /// Every sender is gone.
    Disconnected,
}

/// The longest a writer with nothing due parks before it looks at its
/// queue again: a channel whose senders all vanished without the shutdown
/// message wakes nobody, so the writer notices that by looking.
const IDLE_PARK: Duration = Duration::from_secs(1);

/// The next queued message, parking (never spinning or yielding) while the
/// queue is empty, until `deadline` if one is given.
fn next_message(rx: &Receiver<Msg>, bell: &Doorbell, deadline: Option<Instant>) -> Next {
    loop {
        if let Some(next) = taken(rx.try_recv()) {
            return next;
        }
        bell.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // The last look, after saying so: a submission that raced the
        // flag is seen here, or its ring sees the flag.
        let outcome = taken(rx.try_recv()).or_else(|| {
            let now = Instant::now();
            let wait = match deadline {
                Some(due) if due <= now => return Some(Next::Timeout),
                Some(due) => (due - now).min(IDLE_PARK),
                None => IDLE_PARK,
            };
            std::thread::park_timeout(wait);
            None
        });
        bell.sleeping.store(false, Ordering::Relaxed);
        if let Some(next) = outcome {
            return next;
        }
    }
}

/// What one `try_recv` means to [`next_message`]: `None` for an empty queue.
fn taken(found: Result<Msg, TryRecvError>) -> Option<Next> {
    match found {
        Ok(msg) => Some(Next::Message(msg)),
        Err(TryRecvError::Disconnected) => Some(Next::Disconnected),
        Err(TryRecvError::Empty) => None,
    }
}

/// Owns the writer thread. Dropping it shuts down like [`Writer::shutdown`].
pub struct Writer {
    thread: Option<JoinHandle<Result<(), StoreError>>>,
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

/// A cheap `Clone + Send + Sync` handle to submit to a [`Writer`].
#[derive(Clone)]
pub struct WriterHandle {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterHandle")
            .field("queued", &self.tx.len())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the writer thread (`tern-store-writer`) over `store`, with a
    /// queue of at most `queue_depth` submissions (at least 1).
    pub fn spawn(store: Store, durability: Durability, queue_depth: usize) -> Result<Writer, StoreError> {
        let (tx, rx) = crossbeam_channel::bounded(queue_depth.max(1));
        let shared = Arc::new(Shared {
            stopped: RwLock::new(false),
            counters: Counters::default(),
            store: store.clone(),
            bell: Doorbell::default(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tern-store-writer".to_owned())
            .spawn(move || {
                let _ = thread_shared.bell.thread.set(std::thread::current());
                run(
                    &store,
                    durability,
                    &rx,
                    &thread_shared.bell,
                    &thread_shared.counters,
                )
            })
            .map_err(|e| StoreError::Io {
                path: "tern-store-writer thread".into(),
                detail: e.to_string(),
            })?;
        Ok(Writer {
            thread: Some(thread),
            tx,
            shared,
        })
    }

    /// A handle for submitting.
    pub fn handle(&self) -> WriterHandle {
        WriterHandle {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops accepting submissions, commits everything already queued
    /// (running its callbacks), syncs the store (`SyncAll`) and joins the
    /// thread. Returns the final sync's error, if any.
    pub fn shutdown(mut self) -> Result<(), StoreError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), StoreError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        *self
            .shared
            .stopped
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        // Blocks while the queue is full; the writer is draining it. Fails
        // only if the thread is already gone (it panicked).
        let _ = self.tx.send(Msg::Shutdown);
        self.shared.bell.ring();
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err(StoreError::Fjall("storage writer thread panicked".to_owned())),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl WriterHandle {
    /// Queues `ops` without blocking; `done` runs on the writer thread
    /// once they are committed (fsynced in `Sync` mode) or failed.
    /// Submissions from one thread are committed, and their callbacks
    /// run, in submission order. The ops of one submission are always in
    /// one atomic batch.
    pub fn submit(&self, ops: Vec<WriteOp>, done: Done) -> Result<(), SubmitError> {
        let stopped = self
            .shared
            .stopped
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *stopped {
            return Err(SubmitError::Stopped(ops));
        }
        match self.tx.try_send(Msg::Job(ops, done)) {
            Ok(()) => {
                // Queued ahead of any shutdown marker: the lock has done its
                // job, and the wake below need not lengthen it.
                drop(stopped);
                self.shared.bell.ring();
                Ok(())
            }
            Err(TrySendError::Full(Msg::Job(ops, _))) => Err(SubmitError::Full(ops)),
            Err(TrySendError::Disconnected(Msg::Job(ops, _))) => Err(SubmitError::Stopped(ops)),
            Err(_) => Err(SubmitError::Stopped(Vec::new())),
        }
    }

    /// Submissions waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// How the store's durable changes made outside this writer (accounts,
    /// friendships, groups) shared their fdatasyncs: [`Store::sync_stats`],
    /// here so that whoever watches the writer sees both.
    pub fn store_sync_stats(&self) -> crate::SyncStats {
        self.shared.store.sync_stats()
    }

    /// A snapshot of the writer's counters.
    pub fn stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        WriterStats {
            batches: c.batches.load(Ordering::Relaxed),
            submissions: c.submissions.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            max_group: c.max_group.load(Ordering::Relaxed),
            commit_micros_counts: c
                .commit_micros_counts
                .each_ref()
                .map(|n| n.load(Ordering::Relaxed)),
            commit_micros_sum: c.commit_micros_sum.load(Ordering::Relaxed),
        }
    }
}

/// The writer thread's loop.
fn run(
    store: &Store,
    durability: Durability,
    rx: &Receiver<Msg>,
    bell: &Doorbell,
    counters: &Counters,
) -> Result<(), StoreError> {
    let sync = durability == Durability::Sync;
    // Async: when the oldest unsynced commit must be fsynced by.
    let mut flush_due: Option<Instant> = None;
    let mut group: Vec<(Vec<WriteOp>, Done)> = Vec::new();
    let mut stopping = false;
    while !stopping {
        // A due flush comes first: under steady load the queue is never
        // empty, and `recv_timeout` hands out a queued message before it
        // reports a timeout, so the timeout alone would never sync.
        if flush_due.is_some_and(|due| Instant::now() >= due) {
            flush(store, counters);
            flush_due = None;
        }
        let first = match next_message(rx, bell, flush_due) {
            Next::Message(msg) => Some(msg),
            // Due now: the check at the top of the loop flushes.
            Next::Timeout => continue,
            Next::Disconnected => None,
        };
        let mut weight = 0;
        match first {
            Some(Msg::Job(ops, done)) => {
                weight += ops.iter().map(WriteOp::weight).sum::<usize>();
                group.push((ops, done));
            }
            Some(Msg::Shutdown) | None => stopping = true,
        }
        // Drain what else is queued, up to the weight bound. Shutdown is
        // always the last message: `stop` sets `stopped` (which submitters
        // check under the read lock) before sending it.
        while !stopping && weight < MAX_BATCH_WEIGHT {
            match rx.try_recv() {
                Ok(Msg::Job(ops, done)) => {
                    weight += ops.iter().map(WriteOp::weight).sum::<usize>();
                    group.push((ops, done));
                }
                Ok(Msg::Shutdown) => stopping = true,
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            commit_group(store, sync, &mut group, counters);
            if flush_due.is_none() {
                if let Durability::Async { flush_interval } = durability {
                    flush_due = Some(Instant::now() + flush_interval);
                }
            }
        }
    }
    store.inner.db.persist(PersistMode::SyncAll)?;
    counters.fsyncs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Async mode's periodic journal sync. A failure here poisons fjall, so
/// the next commit reports it to its submitters.
fn flush(store: &Store, counters: &Counters) {
    if store.inner.db.persist(PersistMode::SyncData).is_ok() {
        counters.fsyncs.fetch_add(1, Ordering::Relaxed);
    }
}

/// Commits `group` as one batch and runs every callback in order. If the
/// group batch fails and holds more than one submission, each is retried
/// alone, so one bad submission (say, a corrupt receipt record) does not
/// fail the other shards' messages.
fn commit_group(store: &Store, sync: bool, group: &mut Vec<(Vec<WriteOp>, Done)>, counters: &Counters) {
    let inner = &*store.inner;
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters
        .max_group
        .fetch_max(group.len() as u64, Ordering::Relaxed);
    let started = Instant::now();
    let result = inner.apply_all(group.iter().map(|(ops, _)| ops.as_slice()), sync);
    counters.commit_took(started.elapsed());
    if sync {
        counters.fsyncs.fetch_add(1, Ordering::Relaxed);
    }
    match result {
        Ok(()) => {
            for (ops, done) in group.drain(..) {
                counters.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
                finish(done, Ok(()), counters);
            }
        }
        Err(err) if group.len() == 1 => {
            for (_, done) in group.drain(..) {
                finish(done, Err(err.clone()), counters);
            }
        }
        Err(_) => {
            for (ops, done) in group.drain(..) {
                counters.batches.fetch_add(1, Ordering::Relaxed);
                let result = inner.apply_all([ops.as_slice()], sync);
                if sync {
                    counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                if result.is_ok() {
                    counters.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
                }
                finish(done, result, counters);
            }
        }
    }
}

/// Runs one callback; a panicking callback is contained so the writer
/// keeps serving the others.
fn finish(done: Done, result: Result<(), StoreError>, counters: &Counters) {
    if result.is_err() {
        counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    counters.submissions.fetch_add(1, Ordering::Relaxed);
    let _ = std::panic::catch_unwind(AssertUnwindSafe(move || done(result)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A doorbell whose writer is this (test) thread, and a queue into it.
    fn parked_writer() -> (Arc<Doorbell>, Sender<Msg>, Receiver<Msg>) {
        let bell = Arc::new(Doorbell::default());
        let _ = bell.thread.set(std::thread::current());
        let (tx, rx) = crossbeam_channel::bounded(4);
        (bell, tx, rx)
    }

    #[test]
    fn every_ring_wakes_the_writer_that_said_it_sleeps() {
        const ROUNDS: usize = 200;
        let (bell, tx, rx) = parked_writer();
        // Each round the ringer waits until the writer has announced it is
        // going to sleep (so the park, or the last look before it, is what
        // is tested), then queues one message and rings.
        let ringer = {
            let bell = Arc::clone(&bell);
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    while !bell.sleeping.load(Ordering::Relaxed) {
                        std::thread::yield_now();
                    }
                    assert!(tx.try_send(Msg::Shutdown).is_ok());
                    bell.ring();
                    // Wait for the writer to take it before the next round.
                    while !tx.is_empty() {
                        std::thread::yield_now();
                    }
                }
                tx
            })
        };
        for round in 0..ROUNDS {
            let started = Instant::now();
            let next = next_message(&rx, &bell, None);
            assert!(matches!(next, Next::Message(Msg::Shutdown)), "round {round}");
            // A missed ring would end only with IDLE_PARK (1 s).
            let took = started.elapsed();
            assert!(took < IDLE_PARK * 9 / 10, "round {round} took {took:?}");
        }
        assert!(!bell.sleeping.load(Ordering::Relaxed));
        drop(ringer.join());
    }

    #[test]
    fn an_empty_queue_times_out_at_the_deadline_and_a_dropped_one_disconnects() {
        let (bell, tx, rx) = parked_writer();
        let due = Instant::now() + Duration::from_millis(20);
        assert!(matches!(next_message(&rx, &bell, Some(due)), Next::Timeout));
        assert!(Instant::now() >= due);
        drop(tx);
        assert!(matches!(next_message(&rx, &bell, None), Next::Disconnected));
    }

    #[test]
    fn a_queued_message_is_taken_without_parking() {
        let (bell, tx, rx) = parked_writer();
        assert!(tx.try_send(Msg::Shutdown).is_ok());
        let past = Instant::now();
        assert!(matches!(
            next_message(&rx, &bell, Some(past)),
            Next::Message(Msg::Shutdown)
        ));
    }
}
