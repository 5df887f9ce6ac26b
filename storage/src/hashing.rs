//! Where argon2 runs. A password hash costs tens of milliseconds of CPU
//! and `argon2_memory_kib` of memory, so the store can hand hashing to a
//! fixed pool of threads (`tern-hash-N`, [`StoreOptions::hash_threads`])
//! instead of running it on the calling thread. The caller (a shard's
//! blocking thread) then waits without holding any lock, and the pool
//! bounds both at once: at most `hash_threads` hashes run, using at most
//! `hash_threads × argon2_memory_kib`. Its threads can run at a lower
//! priority than everything else ([`StoreOptions::hash_thread_start`])
//! without slowing the store calls that other threads make, which a
//! lowered blocking thread would (it holds fjall's journal lock while it
//! writes).

use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use crate::{StoreError, StoreOptions};

type Job = Box<dyn FnOnce() + Send>;

/// Hashes waiting per pool thread before callers block on the hand-off.
const QUEUE_PER_THREAD: usize = 64;

/// The hashing threads of one store; dropping it lets them finish the
/// hashes in hand and joins them.
pub(crate) struct HashPool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl HashPool {
    /// Starts `opts.hash_threads` threads, each running
    /// `opts.hash_thread_start` first; `None` for zero threads (hash on the
    /// caller).
    pub(crate) fn start(opts: &StoreOptions) -> Result<Option<HashPool>, StoreError> {
        if opts.hash_threads == 0 {
            return Ok(None);
        }
        let (tx, rx) = crossbeam_channel::bounded::<Job>(opts.hash_threads * QUEUE_PER_THREAD);
        let mut pool = HashPool {
            tx: Some(tx),
            threads: Vec::with_capacity(opts.hash_threads),
        };
        for n in 0..opts.hash_threads {
            let rx = rx.clone();
            let on_start = opts.hash_thread_start;
            let thread = std::thread::Builder::new()
                .name(format!("tern-hash-{n}"))
                .spawn(move || {
                    if let Some(on_start) = on_start {
                        on_start();
                    }
                    for job in rx {
                        // A panicking hash drops its answer (the caller sees
                        // an error) and the thread keeps serving.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .map_err(|e| StoreError::Io {
                    path: "tern-hash thread".into(),
                    detail: e.to_string(),
                })?;
            pool.threads.push(thread);
        }
        Ok(Some(pool))
    }

    /// Runs `f` on a pool thread and returns its result; blocks the caller
    /// until then.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let stopped = || StoreError::Crypto("the password hashing threads have stopped".into());
        let (answer, result) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = answer.send(f());
        });
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        result.recv().map_err(|_| stopped())
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        self.tx = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
