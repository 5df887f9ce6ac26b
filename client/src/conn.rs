//! The framed byte stream under [`crate::Client`]: one TCP socket, one
//! receive [`FrameBuf`] and one reusable encode buffer.
//!
//! This layer knows frames but not requests: it writes one [`ClientFrame`]
//! (or raw bytes) and reads the next [`ServerFrame`] before a deadline. A
//! read that times out mid-frame leaves the partial bytes in the
//! `FrameBuf`, so a later read resumes the same frame and the stream never
//! desynchronises because of a short timeout.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tern_proto::{decode_server, encode_client, ClientFrame, FrameBuf, FrameError, ServerFrame};

use crate::ClientError;

/// Reads never block for less than this: `set_read_timeout(Some(ZERO))` is
/// an error, and a sub-millisecond wait is indistinguishable from a poll.
const MIN_READ_WAIT: Duration = Duration::from_millis(1);

pub(crate) struct Conn {
    stream: TcpStream,
    rx: FrameBuf,
    /// Reused for every outgoing frame so steady-state sends do not allocate.
    tx: AlignedVec,
    /// The largest body the peer accepts; checked before anything is written.
    max_send: u32,
    /// The read timeout currently set on the socket, to skip redundant syscalls.
    read_timeout: Option<Duration>,
}

impl Conn {
    pub(crate) fn new(
        stream: TcpStream,
        max_recv: u32,
        write_timeout: Duration,
    ) -> Result<Conn, ClientError> {
        // Requests are small and latency-bound; Nagle would hold each one
        // back waiting for the previous ack.
        stream.set_nodelay(true)?;
        // A server that stops reading must not block a sender forever.
        stream.set_write_timeout(Some(write_timeout.max(MIN_READ_WAIT)))?;
        Ok(Conn {
            stream,
            rx: FrameBuf::new(max_recv),
            tx: AlignedVec::new(),
            max_send: max_recv,
            read_timeout: None,
        })
    }

    pub(crate) fn set_max_send(&mut self, max_send: u32) {
        self.max_send = max_send;
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    pub(crate) fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// Encodes and writes one frame. Nothing is written if it is over the limit.
    pub(crate) fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.tx.clear();
        encode_client(frame, &mut self.tx, self.max_send).map_err(|e| match e {
            FrameError::TooLarge { len, max } => ClientError::Protocol(format!(
                "request of {len} bytes exceeds the server's frame limit of {max} bytes"
            )),
            other => ClientError::Protocol(other.to_string()),
        })?;
        let Conn { stream, tx, .. } = self;
        Self::write_all(stream, tx)
    }

    /// Writes bytes as they are, framed or not.
    pub(crate) fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        Self::write_all(&mut self.stream, bytes)
    }

    fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), ClientError> {
        match stream.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Part of a frame may be on the wire; anything written after
                // it would be misparsed, so the connection is unusable.
                let _ = stream.shutdown(Shutdown::Both);
                Err(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
                    _ => map_io(e),
                })
            }
        }
    }

    /// The next frame, or `Ok(None)` once `deadline` passes without one.
    /// `None` as deadline waits indefinitely.
    pub(crate) fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<ServerFrame>, ClientError> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(Some(frame));
            }
            let wait = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(left.max(MIN_READ_WAIT))
                }
                None => None,
            };
            if self.read_timeout != wait {
                self.stream.set_read_timeout(wait)?;
                self.read_timeout = wait;
            }
            let slot = self
                .rx
                .read_slot()
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            match self.stream.read(slot) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.rx.commit(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Unix reports an expired read timeout as WouldBlock, Windows as TimedOut;
                // the loop head then sees the deadline has passed.
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(map_io(e)),
            }
        }
    }

    /// Decodes a frame already in the buffer, without reading.
    fn buffered_frame(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        let body = match self.rx.next_body() {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(None),
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        let archived = decode_server(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        rkyv::deserialize::<ServerFrame, BoxedError>(archived)
            .map(Some)
            .map_err(|e| ClientError::Protocol(format!("frame could not be deserialised: {e}")))
    }
}

/// A peer that went away is [`ClientError::Closed`] whether it closed
/// cleanly (EOF) or with a reset, so callers need to match only one variant.
fn map_io(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
            ClientError::Closed
        }
        _ => ClientError::Io(e),
    }
}
