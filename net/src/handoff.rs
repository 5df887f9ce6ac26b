//! Moving an accepted TCP connection from one shard to another.
//!
//! A connection is accepted by whichever shard the kernel picked, but once
//! its user is known it should live on the user's home shard, so that the
//! user's sessions, presence and deliveries are all local there. glommio
//! streams are bound to their executor, so the socket travels as a plain
//! file descriptor: [`detach`] duplicates the descriptor and drops the
//! glommio stream (closing only the original descriptor), and [`attach`]
//! wraps the duplicate in a new stream on the receiving executor. The
//! caller must not have a read or write in flight on the stream.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use glommio::net::TcpStream;

/// A socket in transit between shards.
#[derive(Debug)]
pub struct DetachedSocket {
    fd: OwnedFd,
}

impl AsRawFd for DetachedSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Detaches `stream` from its executor.
pub fn detach(stream: TcpStream) -> io::Result<DetachedSocket> {
    try_detach(stream).map_err(|(error, _)| error)
}

/// Detaches `stream` from its executor, or gives it back untouched if the
/// descriptor cannot be duplicated (the process is out of descriptors).
// The error hands the stream back whole; it is rare and moved once.
#[allow(clippy::result_large_err)]
pub fn try_detach(stream: TcpStream) -> Result<DetachedSocket, (io::Error, TcpStream)> {
    // SAFETY: `dup` has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        return Err((io::Error::last_os_error(), stream));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(stream);
    Ok(DetachedSocket { fd })
}

/// Attaches a detached socket to the current executor.
pub fn attach(socket: DetachedSocket) -> TcpStream {
    let raw = socket.fd.into_raw_fd();
    // SAFETY: `raw` is an owned, open TCP socket descriptor whose ownership
    // moves into the stream.
    unsafe { TcpStream::from_raw_fd(raw) }
}
