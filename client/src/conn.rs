//! The framed byte stream under [`crate::Client`]: one TCP socket (plain or
//! carrying TLS), one receive [`FrameBuf`] and one reusable encode buffer.
//!
//! This layer knows frames but not requests: it writes one [`ClientFrame`]
//! (or raw bytes) and reads the next [`ServerFrame`] before a deadline. A
//! read that times out mid-frame leaves the partial bytes in the
//! `FrameBuf`, so a later read resumes the same frame and the stream never
//! desynchronises because of a short timeout. TLS is driven through
//! rustls's sans-I/O calls rather than `rustls::StreamOwned`, so that every
//! socket read is one read under the caller's deadline (a partial TLS
//! record returns to the deadline check like a partial frame does) and a
//! write that times out never turns into a blocking read.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use tern_proto::{
    decode_server, encode_client, unknown_push_tag, ClientFrame, FrameBuf, FrameError, ServerFrame,
};

use crate::ClientError;

/// Reads never block for less than this: `set_read_timeout(Some(ZERO))` is
/// an error, and a sub-millisecond wait is indistinguishable from a poll.
const MIN_READ_WAIT: Duration = Duration::from_millis(1);

/// The socket, bare or with a TLS session on it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

struct TlsConn {
    tls: ClientConnection,
    tcp: TcpStream,
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(conn) => &conn.tcp,
        }
    }

    /// One read from the socket at most. With TLS, `WouldBlock` also means
    /// "a record is still incomplete": the caller re-checks its deadline
    /// and calls again.
    fn read_once(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(conn) => {
                let TlsConn { tls, tcp } = &mut **conn;
                match tls.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Ok(0) after the server's close_notify, UnexpectedEof after a bare close.
                    done => return done,
                }
                // Anything rustls owes the server (e.g. a key-update reply) goes first.
                send_pending(tls, tcp)?;
                tls.read_tls(tcp)?;
                if let Err(e) = tls.process_new_packets() {
                    // The alert rustls queued tells the server why; the error is what matters.
                    let _ = tls.write_tls(tcp);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                tls.reader().read(buf)
            }
        }
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.write_all(bytes),
            Stream::Tls(conn) => {
                let TlsConn { tls, tcp } = &mut **conn;
                while !bytes.is_empty() {
                    // rustls takes at most its buffer limit at once.
                    let taken = tls.writer().write(bytes)?;
                    bytes = &bytes[taken..];
                    send_pending(tls, tcp)?;
                }
                Ok(())
            }
        }
    }
}

/// Writes every queued TLS record, each write bounded by the socket's write timeout.
fn send_pending(tls: &mut ClientConnection, tcp: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        if tls.write_tls(tcp)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// What a TLS connection needs besides the socket.
pub(crate) struct TlsSetup {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
}

pub(crate) struct Conn {
    stream: Stream,
    rx: FrameBuf,
    /// Reused for every outgoing frame so steady-state sends do not allocate.
    tx: AlignedVec,
    /// The largest body the peer accepts; checked before anything is written.
    max_send: u32,
    /// The read timeout currently set on the socket, to skip redundant syscalls.
    read_timeout: Option<Duration>,
    /// The body length of the frame `recv` returned last, so the caller
    /// can account for what it keeps.
    last_body_len: usize,
    /// Set by `shutdown`: frames still buffered are discarded, since the
    /// caller dropped one before them and must not see a hole.
    shut_down: bool,
}

impl Conn {
    /// Wraps a connected socket; with `tls`, completes the TLS handshake
    /// (certificate verification included) within `timeout`.
    pub(crate) fn new(
        stream: TcpStream,
        tls: Option<TlsSetup>,
        max_recv: u32,
        timeout: Duration,
    ) -> Result<Conn, ClientError> {
        // Requests are small and latency-bound; Nagle would hold each one
        // back waiting for the previous ack.
        stream.set_nodelay(true)?;
        // A server that stops reading must not block a sender forever.
        stream.set_write_timeout(Some(timeout.max(MIN_READ_WAIT)))?;
        let stream = match tls {
            None => Stream::Plain(stream),
            Some(setup) => Stream::Tls(Box::new(TlsConn {
                tls: ClientConnection::new(setup.config, setup.server_name).map_err(ClientError::Tls)?,
                tcp: stream,
            })),
        };
        let mut conn = Conn {
            stream,
            rx: FrameBuf::new(max_recv),
            tx: AlignedVec::new(),
            max_send: max_recv,
            read_timeout: None,
            last_body_len: 0,
            shut_down: false,
        };
        conn.handshake(crate::deadline_after(timeout))?;
        Ok(conn)
    }

    /// Completes the TLS handshake, if any, by `deadline` (`None`: no deadline).
    fn handshake(&mut self, deadline: Option<Instant>) -> Result<(), ClientError> {
        let Stream::Tls(conn) = &mut self.stream else {
            return Ok(());
        };
        let TlsConn { tls, tcp } = &mut **conn;
        let result = (|| {
            while tls.is_handshaking() {
                send_pending(tls, tcp).map_err(map_write)?;
                let wait = match deadline {
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(ClientError::Timeout);
                        }
                        Some(left.max(MIN_READ_WAIT))
                    }
                    None => None,
                };
                if self.read_timeout != wait {
                    tcp.set_read_timeout(wait)?;
                    self.read_timeout = wait;
                }
                match tls.read_tls(tcp) {
                    Ok(0) => return Err(ClientError::Closed),
                    Ok(_) => {}
                    // An expired read timeout: the deadline check above decides.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err(map_io(e)),
                }
                if let Err(e) = tls.process_new_packets() {
                    let _ = tls.write_tls(tcp);
                    return Err(ClientError::Tls(e));
                }
            }
            // Our Finished, and anything after it.
            send_pending(tls, tcp).map_err(map_write)
        })();
        if result.is_err() {
            let _ = tcp.shutdown(Shutdown::Both);
        }
        result
    }

    pub(crate) fn set_max_send(&mut self, max_send: u32) {
        self.max_send = max_send;
    }

    /// Sets the largest frame body accepted from the peer.
    pub(crate) fn set_max_recv(&mut self, max_recv: u32) {
        self.rx.set_max_body(max_recv);
    }

    /// The body length, on the wire, of the frame `recv` returned last.
    pub(crate) fn last_body_len(&self) -> usize {
        self.last_body_len
    }

    /// Shuts the socket down: every later read, of frames already
    /// buffered too, sees the connection closed.
    pub(crate) fn shutdown(&mut self) {
        self.shut_down = true;
        let _ = self.stream.tcp().shutdown(Shutdown::Both);
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.tcp().local_addr()
    }

    pub(crate) fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.tcp().peer_addr()
    }

    /// Whether the connection runs over TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
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

    fn write_all(stream: &mut Stream, bytes: &[u8]) -> Result<(), ClientError> {
        match stream.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Part of a frame may be on the wire; anything written after
                // it would be misparsed, so the connection is unusable.
                let _ = stream.tcp().shutdown(Shutdown::Both);
                Err(map_write(e))
            }
        }
    }

    /// The next frame, or `Ok(None)` once `deadline` passes without one.
    /// `None` as deadline waits indefinitely.
    pub(crate) fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<ServerFrame>, ClientError> {
        if self.shut_down {
            return Err(ClientError::Closed);
        }
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
                self.stream.tcp().set_read_timeout(wait)?;
                self.read_timeout = wait;
            }
            let slot = self
                .rx
                .read_slot()
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            match self.stream.read_once(slot) {
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

    /// Decodes a frame already in the buffer, without reading. A push of a
    /// kind this build does not know is skipped (docs/protocol.md,
    /// "Stability"): a newer server may send one.
    fn buffered_frame(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        let body = loop {
            match self.rx.next_body() {
                Ok(Some(body)) if unknown_push_tag(body).is_some() => continue,
                Ok(Some(body)) => break body,
                Ok(None) => return Ok(None),
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        };
        self.last_body_len = body.len();
        let archived = decode_server(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        rkyv::deserialize::<ServerFrame, BoxedError>(archived)
            .map(Some)
            .map_err(|e| ClientError::Protocol(format!("frame could not be deserialised: {e}")))
    }
}

/// A write that hit the socket's write timeout is [`ClientError::WriteTimeout`],
/// not the recoverable [`ClientError::Timeout`]: the caller shuts the
/// socket down after any failed write (part of a frame may be out), so
/// the connection is gone.
fn map_write(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::WriteTimeout,
        _ => map_io(e),
    }
}

/// A peer that went away is [`ClientError::Closed`] whether it closed
/// cleanly (EOF) or with a reset, or closed a TLS connection without
/// `close_notify`, so callers need to match only one variant. A TLS
/// failure while reading surfaces as [`ClientError::Tls`].
fn map_io(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => ClientError::Closed,
        io::ErrorKind::InvalidData => match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => ClientError::Tls(tls.clone()),
            None => ClientError::Io(e),
        },
        _ => ClientError::Io(e),
    }
}
