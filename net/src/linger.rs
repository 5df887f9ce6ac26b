//! Closing a connection without resetting it: the "lingering close".
//!
//! When a server closes a socket whose receive queue still holds bytes
//! the peer sent (frames pipelined behind one it refused), Linux does not
//! send a FIN but a reset, and discards whatever is still queued for the
//! peer: the error frame that explains the close may be lost with it, and
//! a peer's stack that takes the reset first may drop even what it had
//! received. So a server that closes first shuts down only its own
//! direction (the FIN follows everything written), then [`linger`] reads
//! and throws away what the peer still sends until the peer closes its
//! side too, and only then drops the socket. A peer that neither stops
//! nor closes is cut off after [`LINGER_TIME`] or [`LINGER_BYTES`]: the
//! same reset as before, once the peer has had time to read the answer.
//! A connection refused because the server is at a limit cannot hold its
//! socket that long: [`discard_queued`] drops only what has already
//! arrived (a client's pipelined first frames, typically) and waits for
//! nothing.

use std::os::fd::RawFd;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt};

/// The longest a closing connection keeps reading: enough for a peer a
/// continent away to read the last frame and close (a few round trips),
/// short enough that a peer that never closes holds its socket briefly.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// The most a closing connection reads and discards: a client's pipeline
/// in flight when the close came (tens of KiB); past it the peer is
/// flooding, not finishing.
pub const LINGER_BYTES: usize = 1 << 20;

/// Bytes read per call while lingering.
const CHUNK: usize = 4096;

/// How [`linger`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lingered {
    /// The peer closed its side (end of stream): nothing is left unread,
    /// so dropping the socket ends the connection with a FIN.
    PeerClosed,
    /// The peer was still open at the time bound and had sent nothing
    /// more (a dead peer, or one that ignores the close): dropping the
    /// socket then resets nothing unless more arrives.
    QuietTimeout,
    /// The peer was still open at the time bound and still sending.
    SendingTimeout,
    /// The peer sent more than the byte bound.
    TooMuch,
    /// A read failed (the peer reset the connection, or TLS could not read
    /// what came): the connection is gone already.
    Failed,
}

/// Reads and discards from `reader`, whose writing side the caller has
/// already shut down, until the peer closes its side, a read fails,
/// `max_time` passes or more than `max_bytes` arrive. Set the socket's read
/// timeout to `max_time` or longer first. A read timeout that fires anyway
/// is read past: glommio arms a stream's timer when a read starts to wait
/// and keeps it when that read is abandoned (a session's read that lost
/// the race against its closing queue), so the first wait here may end at
/// the old deadline; the next read arms a new timer. Allocates its buffer
/// only when called, so a caller that may linger keeps no room for it.
pub async fn linger<R: AsyncRead + Unpin>(reader: &mut R, max_time: Duration, max_bytes: usize) -> Lingered {
    let mut scratch = vec![0u8; CHUNK];
    let discarded = std::cell::Cell::new(0usize);
    let drain = async {
        loop {
            match reader.read(&mut scratch).await {
                Ok(0) => return Lingered::PeerClosed,
                Ok(n) => {
                    discarded.set(discarded.get().saturating_add(n));
                    if discarded.get() > max_bytes {
                        return Lingered::TooMuch;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Our own deadline below decides when to stop.
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Lingered::Failed,
            }
        }
    };
    let deadline = async {
        glommio::timer::sleep(max_time).await;
        timed_out(discarded.get())
    };
    futures_lite::future::or(drain, deadline).await
}

fn timed_out(discarded: usize) -> Lingered {
    match discarded {
        0 => Lingered::QuietTimeout,
        _ => Lingered::SendingTimeout,
    }
}

/// Reads and discards what is already queued on socket `fd`, without
/// waiting, at most `max_bytes`; returns how much. A socket closed right
/// after has nothing unread, and so ends with a FIN, unless more arrives
/// in between.
pub fn discard_queued(fd: RawFd, max_bytes: usize) -> usize {
    let mut scratch = [0u8; CHUNK];
    let mut discarded = 0usize;
    while discarded < max_bytes {
        // SAFETY: recv writes at most `scratch.len()` bytes into `scratch`,
        // which lives across the call; a bad descriptor is an error return.
        let n = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            discarded += n as usize;
            continue;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // 0: the peer closed; < 0: nothing queued (EAGAIN) or an error.
        break;
    }
    discarded
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn discard_queued_takes_what_arrived_and_does_not_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(
            discard_queued(server.as_raw_fd(), LINGER_BYTES),
            0,
            "nothing sent yet"
        );
        client.write_all(&[7u8; 10_000]).unwrap();
        let mut taken = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while taken < 10_000 && std::time::Instant::now() < deadline {
            taken += discard_queued(server.as_raw_fd(), LINGER_BYTES);
        }
        assert_eq!(taken, 10_000);
        client.write_all(&[7u8; 10_000]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            discard_queued(server.as_raw_fd(), 5_000),
            8_192,
            "stops past the bound, a read at a time"
        );
    }
}
