//! Parked sessions: what an idle connection keeps, and what wakes it.
//!
//! Most of a chat server's connections are idle most of the time, so their
//! cost at rest is what decides how many a box holds. A live session keeps
//! a reader and a writer task, a read registered with io_uring, glommio's
//! two per-stream timers and its outbound queue. After `park_after` of
//! silence a session parks instead ([`crate::conn`] does the parking): its
//! tasks end, its socket leaves glommio and joins this shard's epoll set,
//! and what is left is its state in the shard's connection table. Three
//! things bring it back, and each finds the session through its
//! [`ConnKey`]: the socket turning readable (a frame or a close from the
//! client), anything queued for it (a delivery, a receipt, a kick,
//! shutdown), and the idle sweep, which resumes it so that its read finds
//! the idle deadline passed and closes it.
//!
//! Most wake-ups of an idle session are its client's heartbeats, so a
//! readable socket that holds only whole `Ping`s is answered in place and
//! stays parked ([`crate::conn::answer_while_parked`]); for TLS the bytes
//! are decrypted with the session's parked rustls state and the answers
//! encrypted with it.
//!
//! The epoll set is watched by one thread per shard that sleeps in
//! `epoll_wait` and hands the keys of readable sockets to the shard over a
//! socketpair, which the shard reads like any other socket. Registrations
//! are one-shot: a socket reports once and is then re-armed (heartbeats
//! answered) or removed (session resumed) by the shard, so a key that
//! arrives late (its session already resumed by a delivery) is recognised
//! as stale and ignored.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::AsyncReadExt;

use crate::mesh::ConnKey;
use crate::shard::{now_ms, Shard};

/// Bounds on how often the idle sweep looks for parked sessions past their
/// idle deadline (an eighth of the idle timeout in between): a parked
/// session is closed at most one interval late, and a shard with many
/// parked sessions scans them at most once a second.
const SWEEP_INTERVAL_MIN: Duration = Duration::from_millis(50);
const SWEEP_INTERVAL_MAX: Duration = Duration::from_secs(1);

/// Readiness events the watcher takes from the kernel per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;

/// The key the watcher's own end of the socketpair is registered under:
/// it reports only when the shard's end closes, which ends the thread.
/// No connection can have it (it would be slot `u32::MAX`).
const SHARD_GONE: u64 = u64::MAX;

/// One shard's set of parked sockets.
pub struct ParkSet {
    epoll: Arc<OwnedFd>,
    /// The shard's end of the socketpair the watcher writes keys to; taken
    /// by the task that reads it ([`ParkSet::take_wakes`]).
    wakes: RefCell<Option<glommio::net::UnixStream>>,
    /// The watcher is gone: nothing may park any more.
    broken: Cell<bool>,
}

/// The shard's end of the watcher's socketpair: keys of parked sessions
/// whose socket turned readable.
pub struct Wakes {
    stream: glommio::net::UnixStream,
    bytes: Vec<u8>,
}

impl ParkSet {
    /// Creates the epoll set and starts its watcher thread. Must run on the
    /// shard's executor, which the returned set belongs to.
    pub fn new(shard: usize) -> io::Result<ParkSet> {
        // SAFETY: no memory-safety preconditions; the result is checked.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(epoll) });
        let (watcher_end, shard_end) = StdUnixStream::pair()?;
        register(
            epoll.as_raw_fd(),
            watcher_end.as_raw_fd(),
            libc::EPOLLRDHUP as u32,
            SHARD_GONE,
        )?;
        // SAFETY: the descriptor is an open, connected Unix stream socket
        // whose ownership moves into the glommio stream.
        let shard_end = unsafe { glommio::net::UnixStream::from_raw_fd(shard_end.into_raw_fd()) };
        let thread_epoll = epoll.clone();
        std::thread::Builder::new()
            .name(format!("tern-park-{shard}"))
            .spawn(move || watch(&thread_epoll, watcher_end))?;
        Ok(ParkSet {
            epoll,
            wakes: RefCell::new(Some(shard_end)),
            broken: Cell::new(false),
        })
    }

    /// Watches `fd` (a parked session's socket) for data or a close, once.
    pub fn watch(&self, fd: RawFd, key: ConnKey) -> io::Result<()> {
        if self.broken.get() {
            return Err(io::Error::other("the parked-session watcher is gone"));
        }
        let events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT;
        register(self.epoll.as_raw_fd(), fd, events as u32, key_bits(key))
    }

    /// Watches `fd` again after a one-shot report that was served without
    /// resuming its session (heartbeats answered in place).
    pub fn rewatch(&self, fd: RawFd, key: ConnKey) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT;
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: key_bits(key),
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (its session resumed).
    pub fn unwatch(&self, fd: RawFd) {
        // The registration may already be gone (never an error that
        // matters: a stale report is ignored by key).
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer; both
        // descriptors are open.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// The stream of wake-ups, for the one task that serves them.
    pub fn take_wakes(&self) -> Option<Wakes> {
        self.wakes.borrow_mut().take().map(|stream| Wakes {
            stream,
            bytes: Vec::new(),
        })
    }
}

impl Wakes {
    /// Waits for the next keys and appends them to `keys`. An error means
    /// the watcher is gone (parked sessions then wake only by being sent
    /// something, or by the sweep).
    pub async fn next(&mut self, keys: &mut Vec<ConnKey>) -> io::Result<()> {
        let mut chunk = [0u8; 8 * 64];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.bytes.extend_from_slice(&chunk[..n]);
        let whole = self.bytes.len() / 8 * 8;
        for record in self.bytes[..whole].chunks_exact(8) {
            let mut bits = [0u8; 8];
            bits.copy_from_slice(record);
            keys.push(key_from_bits(u64::from_le_bytes(bits)));
        }
        self.bytes.drain(..whole);
        Ok(())
    }
}

/// Serves a shard's parked sessions until the shard stops: resumes those
/// whose socket turned readable and closes those past their idle timeout.
/// Returns at once if sessions do not park on this shard.
pub async fn serve(shard: Rc<Shard>) {
    let Some(mut wakes) = shard.park_set().and_then(ParkSet::take_wakes) else {
        return;
    };
    let sweeping = glommio::spawn_local(sweep(shard.clone()));
    let mut keys = Vec::new();
    loop {
        let woke = futures_lite::future::or(async { Some(wakes.next(&mut keys).await) }, async {
            shard.stop.wait().await;
            None
        })
        .await;
        match woke {
            Some(Ok(())) => keys.drain(..).for_each(|key| shard.wake_parked(key)),
            Some(Err(error)) => {
                // Nothing would wake a parked session that has something
                // to say, so none may stay parked.
                tracing::error!(shard = shard.index, %error, "parked-session watcher lost; sessions stop parking");
                if let Some(set) = shard.park_set() {
                    set.broken.set(true);
                }
                shard.resume_all_parked();
                break;
            }
            None => break,
        }
    }
    sweeping.await;
}

/// Closes parked sessions past their idle timeout, until the shard stops.
async fn sweep(shard: Rc<Shard>) {
    let interval = (shard.config.idle_timeout / 8).clamp(SWEEP_INTERVAL_MIN, SWEEP_INTERVAL_MAX);
    while !shard.stop.sleep_unless_fired(interval).await {
        shard.sweep_parked(now_ms());
    }
}

fn key_bits(key: ConnKey) -> u64 {
    u64::from(key.slot) | u64::from(key.generation) << 32
}

fn key_from_bits(bits: u64) -> ConnKey {
    ConnKey {
        slot: bits as u32,
        generation: (bits >> 32) as u32,
    }
}

fn register(epoll: RawFd, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: `event` is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The watcher thread: sleeps until parked sockets turn readable and
/// sends their keys to the shard, until the shard's end closes.
fn watch(epoll: &OwnedFd, mut to_shard: StdUnixStream) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut out = Vec::with_capacity(EVENTS_PER_WAIT * 8);
    loop {
        // SAFETY: `events` has room for EVENTS_PER_WAIT entries.
        let n =
            unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), EVENTS_PER_WAIT as i32, -1) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return tracing::error!(%error, "parked-session watcher stopped");
        }
        out.clear();
        for event in events.iter().take(n as usize) {
            let data = event.u64;
            if data == SHARD_GONE {
                return;
            }
            out.extend_from_slice(&data.to_le_bytes());
        }
        // Blocks while the shard is behind: its socket buffer is the queue.
        if to_shard.write_all(&out).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_wire_form() {
        for key in [
            ConnKey {
                slot: 0,
                generation: 0,
            },
            ConnKey {
                slot: 7,
                generation: u32::MAX,
            },
            ConnKey {
                slot: u32::MAX - 1,
                generation: 3,
            },
        ] {
            assert_eq!(key_from_bits(key_bits(key)), key);
            assert_ne!(key_bits(key), SHARD_GONE);
        }
    }
}
