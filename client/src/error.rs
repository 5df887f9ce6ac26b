//! The one error type every client call returns.
//!
//! The variants separate what a caller reacts to differently: the server
//! refused one request but the connection lives on ([`ClientError::Server`]),
//! the server announced it is closing the connection
//! ([`ClientError::Disconnected`]), the connection is simply gone
//! ([`ClientError::Closed`]), the server was too slow to answer
//! ([`ClientError::Timeout`]) or to take a request ([`ClientError::WriteTimeout`],
//! which ends the connection),
//! the application left too many pushes queued ([`ClientError::PushQueueFull`]),
//! the bytes made no sense ([`ClientError::Protocol`]), or TLS failed
//! ([`ClientError::Tls`], [`ClientError::TlsSetup`]).

use tern_proto::ErrorCode;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed (connect refused, an unreachable address, ...).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The server answered the request with an error; the connection is still usable
    /// unless the code says otherwise (e.g. [`ErrorCode::UnsupportedVersion`]).
    /// `retry_after_ms` is the server's hint for [`ErrorCode::RateLimited`]
    /// (0: none); see [`ClientError::retry_after`].
    #[error("server refused the request: {code}: {message}")]
    Server {
        code: ErrorCode,
        message: String,
        retry_after_ms: u32,
    },
    /// The server pushed `Disconnect` while a request was waiting for its
    /// answer, or an `Error` with request id 0 (a frame it could not read,
    /// docs/protocol.md 2.7), after which it closes too; `retry_after_ms`
    /// is how long it asks the client to wait before reconnecting (0: no
    /// hint).
    #[error("server is closing the connection: {code}: {message}")]
    Disconnected {
        code: ErrorCode,
        message: String,
        retry_after_ms: u32,
    },
    /// The server closed (or reset) the connection.
    #[error("connection closed by the server")]
    Closed,
    /// TLS failed: the server's certificate did not verify, no common TLS
    /// version, a bad record, or an alert from the server. The cause is
    /// in the message and not a `source()` too, so that a chain printed
    /// whole (`anyhow`'s `{:#}`) says it once.
    #[error("TLS with the server failed: {0}")]
    Tls(rustls::Error),
    /// TLS could not be set up locally: an unreadable CA file or an invalid server name.
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    /// No answer arrived within the configured time. The connection lives
    /// on (a late answer is dropped when it comes).
    #[error("timed out waiting for the server")]
    Timeout,
    /// A request could not be written within the configured time (the
    /// server stopped reading). Part of it may be on the wire, so the
    /// connection was shut down: unlike [`ClientError::Timeout`] this is
    /// fatal; reconnect.
    #[error("timed out sending to the server; the connection is closed")]
    WriteTimeout,
    /// Pushes that arrived while requests waited for their answers, and
    /// that the application has not taken with `Client::next_push`, passed
    /// `ClientOptions::max_queued_push_bytes`. The client stopped reading
    /// and shut the connection down (the pushes already queued can still
    /// be taken): messages it never returned are not acknowledged, so the
    /// next connection's `Sync` streams them again. Call `next_push`
    /// between requests, or raise the limit for a long catch-up.
    #[error("more than {limit} bytes of pushes queued without next_push; the connection is closed")]
    PushQueueFull { limit: usize },
    /// The server sent something this client cannot make sense of, or a
    /// request could not be encoded within the frame limit.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's error code, for [`ClientError::Server`] and [`ClientError::Disconnected`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::Disconnected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// How long the server asked the client to wait before trying again:
    /// before resending a rate-limited request ([`ClientError::Server`]) or
    /// reconnecting ([`ClientError::Disconnected`]). `None` when the server
    /// gave no hint.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ClientError::Server { retry_after_ms, .. } | ClientError::Disconnected { retry_after_ms, .. }
                if *retry_after_ms > 0 =>
            {
                Some(std::time::Duration::from_millis(u64::from(*retry_after_ms)))
            }
            _ => None,
        }
    }

    /// Whether the connection can no longer be used after this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ClientError::Server { .. } | ClientError::Timeout)
    }
}
