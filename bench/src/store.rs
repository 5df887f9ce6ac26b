//! Store fixtures for the `store` bench: a throwaway store in a temporary
//! directory and the message writes the engine makes for a 1:1 message
//! (history plus the recipient's inbox, carrying a 100-byte push frame),
//! plus a driver that feeds the group-commit [`Writer`] from several
//! threads and counts acknowledged messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tern_storage::{
    ConvId, InboxTargets, MessageWrite, Store, StoreError, StoreOptions, SubmitError, WriteOp, WriterHandle,
};

/// Bytes of the stored push frame of each message.
pub const FRAME_BYTES: usize = 100;
/// The sender and recipient of every benchmark message.
const FROM: u64 = 1;
const TO: u64 = 2;
/// How long [`drive_writer`] waits for acknowledgements before giving up.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// A store in a directory deleted when this is dropped.
pub struct TempStore {
    pub store: Store,
    // Dropped after `store` (field order), so the files outlive the handle.
    _dir: TempDir,
}

/// Opens an empty store in a fresh temporary directory. Password hashing
/// is set to argon2's minimum cost: no bench registers users, and a
/// default-cost hasher would only slow start-up.
pub fn temp_store() -> Result<TempStore, StoreError> {
    let dir = tempfile::Builder::new()
        .prefix("tern-bench-store")
        .tempdir()
        .map_err(|e| StoreError::Io {
            path: std::env::temp_dir(),
            detail: e.to_string(),
        })?;
    let opts = StoreOptions {
        argon2_memory_kib: 8,
        argon2_iterations: 1,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts)?;
    Ok(TempStore { store, _dir: dir })
}

/// Hands out consecutive sequence numbers in one conversation, so every
/// write is a new key as in a live conversation.
#[derive(Debug, Clone)]
pub struct Messages {
    next_seq: Arc<AtomicU64>,
    frame: Arc<[u8]>,
}

impl Default for Messages {
    fn default() -> Messages {
        Messages {
            next_seq: Arc::new(AtomicU64::new(1)),
            frame: Arc::from(vec![0xA5u8; FRAME_BYTES]),
        }
    }
}

impl Messages {
    /// The write of the next message from user 1 to user 2's inbox.
    pub fn next_op(&self) -> WriteOp {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        WriteOp::Message(MessageWrite {
            conv: ConvId::direct(FROM, TO),
            seq,
            from: FROM,
            client_msg_id: seq,
            timestamp_ms: 1_763_000_000_000 + seq,
            frame: Arc::clone(&self.frame),
            inbox: InboxTargets::One(TO),
            moved_from: None,
        })
    }

    /// The next `count` message writes.
    pub fn batch(&self, count: usize) -> Vec<WriteOp> {
        (0..count).map(|_| self.next_op()).collect()
    }
}

/// How [`drive_writer`]'s threads submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitters {
    /// Each thread submits without waiting, retrying while the queue is
    /// full: the writer's throughput with a full pipeline.
    Pipelined,
    /// Each thread waits for its ack before the next submission, like one
    /// sender with one message in flight.
    ClosedLoop,
}

/// Submits `messages` writes, one op per submission, from `threads`
/// threads to `writer`, and returns the time until the last ack.
pub fn drive_writer(
    writer: &WriterHandle,
    messages: &Messages,
    threads: usize,
    total: u64,
    mode: Submitters,
) -> Result<Duration, StoreError> {
    let threads = threads.max(1);
    let per_thread = total.div_ceil(threads as u64);
    let (ack_tx, ack_rx) = mpsc::channel::<Result<(), StoreError>>();
    let start = Instant::now();
    let outcome = std::thread::scope(|scope| {
        let mut submitters = Vec::with_capacity(threads);
        for t in 0..threads as u64 {
            let count = per_thread.min(total.saturating_sub(t * per_thread));
            let ack_tx = ack_tx.clone();
            submitters.push(scope.spawn(move || submit_all(writer, messages, count, mode, &ack_tx)));
        }
        drop(ack_tx);
        let mut first_error = None;
        for submitter in submitters {
            let result = submitter
                .join()
                .unwrap_or_else(|_| Err(writer_error("a submitting thread panicked")));
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    outcome?;
    // Pipelined submitters return before their acks; collect the rest.
    let mut acked = match mode {
        Submitters::ClosedLoop => total,
        Submitters::Pipelined => 0,
    };
    while acked < total {
        match ack_rx.recv_timeout(ACK_TIMEOUT) {
            Ok(Ok(())) => acked += 1,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(writer_error("acks stopped arriving")),
        }
    }
    Ok(start.elapsed())
}

/// Drives several writers at once, each over its own store: `total`
/// writes split evenly between them, each fed by `threads_each` pipelined
/// threads, as shards would feed a store split into several databases.
/// Returns the time until the last writer's last ack.
pub fn drive_split(
    writers: &[(WriterHandle, Messages)],
    threads_each: usize,
    total: u64,
) -> Result<Duration, StoreError> {
    let count = writers.len().max(1) as u64;
    let per_writer = total.div_ceil(count);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let drives: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(i, (writer, messages))| {
                let share = per_writer.min(total.saturating_sub(i as u64 * per_writer));
                scope
                    .spawn(move || drive_writer(writer, messages, threads_each, share, Submitters::Pipelined))
            })
            .collect();
        for drive in drives {
            drive
                .join()
                .unwrap_or_else(|_| Err(writer_error("a driving thread panicked")))?;
        }
        Ok::<(), StoreError>(())
    })?;
    Ok(start.elapsed())
}

fn submit_all(
    writer: &WriterHandle,
    messages: &Messages,
    count: u64,
    mode: Submitters,
    acks: &mpsc::Sender<Result<(), StoreError>>,
) -> Result<(), StoreError> {
    let (own_tx, own_rx) = mpsc::channel();
    for _ in 0..count {
        let ack = match mode {
            Submitters::Pipelined => acks.clone(),
            Submitters::ClosedLoop => own_tx.clone(),
        };
        let mut ops = vec![messages.next_op()];
        loop {
            let ack = ack.clone();
            let done = Box::new(move |result| {
                let _ = ack.send(result);
            });
            match writer.submit(ops, done) {
                Ok(()) => break,
                Err(SubmitError::Full(back)) => {
                    ops = back;
                    std::thread::yield_now();
                }
                Err(SubmitError::Stopped(_)) => return Err(writer_error("the writer stopped")),
            }
        }
        if mode == Submitters::ClosedLoop {
            match own_rx.recv_timeout(ACK_TIMEOUT) {
                Ok(result) => result?,
                Err(_) => return Err(writer_error("no ack arrived")),
            }
        }
    }
    Ok(())
}

fn writer_error(detail: &str) -> StoreError {
    StoreError::Io {
        path: "tern-bench writer driver".into(),
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_storage::{Durability, Writer};

    #[test]
    fn apply_stores_every_message_in_the_inbox() {
        let temp = temp_store().unwrap();
        let messages = Messages::default();
        temp.store.apply(&messages.batch(100), true).unwrap();
        temp.store.apply(&messages.batch(1), false).unwrap();
        let tail = temp.store.conv_tail(ConvId::direct(FROM, TO), 10).unwrap();
        assert_eq!(tail.last_seq, 101);
        let inbox = temp.store.inbox_after(TO, None, 1000).unwrap();
        assert_eq!(inbox.len(), 101);
    }

    #[test]
    fn split_driver_acks_every_message_on_every_store() {
        let temps: Vec<TempStore> = (0..3).map(|_| temp_store().unwrap()).collect();
        let writers: Vec<Writer> = temps
            .iter()
            .map(|t| Writer::spawn(t.store.clone(), Durability::Sync, 1024).unwrap())
            .collect();
        let fed: Vec<_> = writers
            .iter()
            .map(|w| (w.handle(), Messages::default()))
            .collect();
        drive_split(&fed, 2, 301).unwrap();
        let acked: Vec<u64> = writers.iter().map(|w| w.handle().stats().ops).collect();
        assert_eq!(acked, [101, 101, 99]);
        for writer in writers {
            writer.shutdown().unwrap();
        }
        for (temp, stored) in temps.iter().zip([101, 101, 99]) {
            let tail = temp.store.conv_tail(ConvId::direct(FROM, TO), 1).unwrap();
            assert_eq!(tail.last_seq, stored);
        }
    }

    #[test]
    fn writer_driver_acks_every_message() {
        let temp = temp_store().unwrap();
        let writer = Writer::spawn(temp.store.clone(), Durability::Sync, 1024).unwrap();
        let messages = Messages::default();
        for mode in [Submitters::Pipelined, Submitters::ClosedLoop] {
            drive_writer(&writer.handle(), &messages, 4, 203, mode).unwrap();
        }
        let stats = writer.handle().stats();
        assert_eq!(stats.ops, 406);
        assert_eq!(stats.errors, 0);
        writer.shutdown().unwrap();
        let tail = temp.store.conv_tail(ConvId::direct(FROM, TO), 1).unwrap();
        assert_eq!(tail.last_seq, 406);
    }
}
