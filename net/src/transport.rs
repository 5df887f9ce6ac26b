//! A client connection's byte stream: plain TCP or TLS over TCP.
//!
//! The engine serves both listeners with the same code, so it works on a
//! [`Transport`], which forwards reads and writes to whichever stream it
//! holds. [`Transport::into_parts`] and [`Transport::from_parts`] take a
//! connection apart for the move to its user's home shard (or for an idle
//! session to park outside the executor): the TCP socket
//! travels as a descriptor ([`crate::handoff`]) and a TLS session travels
//! with it, keyed and with any plaintext it had already decrypted.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::handoff::{self, DetachedSocket};
use crate::tls::{Side, TlsSession, TlsStream};
use rustls::ServerConnection;

/// A connection's stream: the server's side by default, or (with
/// `rustls::ClientConnection`) a glommio client's.
pub enum Transport<C = ServerConnection> {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream, C>>),
}

/// A connection taken apart to move between shards.
#[derive(Debug)]
pub struct DetachedTransport<C = ServerConnection> {
    pub socket: DetachedSocket,
    pub tls: Option<TlsSession<C>>,
}

impl<C: Side> Transport<C> {
    /// The TCP socket underneath (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => tls.get_ref(),
        }
    }

    /// Whether this connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Takes the connection apart to move it to another executor. No read
    /// or write may be in flight.
    pub fn into_parts(self) -> io::Result<DetachedTransport<C>> {
        self.try_into_parts().map_err(|(error, _)| error)
    }

    /// Like [`Transport::into_parts`], but gives the connection back intact
    /// when it cannot be taken apart (out of descriptors), so that it can
    /// go on where it is.
    // The error hands the stream back whole; it is rare and moved once.
    #[allow(clippy::result_large_err)]
    pub fn try_into_parts(self) -> Result<DetachedTransport<C>, (io::Error, Transport<C>)> {
        match self {
            Transport::Plain(tcp) => match handoff::try_detach(tcp) {
                Ok(socket) => Ok(DetachedTransport { socket, tls: None }),
                Err((error, tcp)) => Err((error, Transport::Plain(tcp))),
            },
            Transport::Tls(tls) => {
                let (tcp, session) = tls.into_parts();
                match handoff::try_detach(tcp) {
                    Ok(socket) => Ok(DetachedTransport {
                        socket,
                        tls: Some(session),
                    }),
                    Err((error, tcp)) => Err((
                        error,
                        Transport::Tls(Box::new(TlsStream::from_parts(tcp, session))),
                    )),
                }
            }
        }
    }

    /// Puts a detached connection back together on the current executor.
    pub fn from_parts(parts: DetachedTransport<C>) -> Transport<C> {
        let tcp = handoff::attach(parts.socket);
        match parts.tls {
            None => Transport::Plain(tcp),
            Some(session) => Transport::Tls(Box::new(TlsStream::from_parts(tcp, session))),
        }
    }

    /// Ends our direction only: a TLS `close_notify` first where there is
    /// one, then a TCP shutdown of writing, so the peer gets everything
    /// written, then a FIN, and may still send. A server follows it with
    /// [`crate::linger::linger`] before it drops the stream.
    pub async fn close_write(&mut self) {
        let _ = AsyncWriteExt::close(self).await;
        // A `close_notify` that could not be sent skips the shutdown above;
        // the FIN must go out anyway, or the peer would never see the end.
        let _ = self.tcp().shutdown(std::net::Shutdown::Write).await;
    }
}

impl<C: Side> AsRawFd for Transport<C> {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl<C: Side> AsyncRead for Transport<C> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<C: Side> AsyncWrite for Transport<C> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}
