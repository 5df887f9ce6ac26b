//! Server-side TLS on glommio sockets: certificates, handshakes, and a
//! stream that can move between shards.
//!
//! This module owns everything TLS the server needs and nothing of the
//! protocol above it. [`CertStore`] loads a certificate chain and key from
//! PEM files into a rustls `ServerConfig` (TLS 1.3 only unless 1.2 is asked
//! for, session resumption on) and swaps in a fresh one on
//! [`CertStore::reload`], so a renewed certificate is served to new
//! connections while old ones keep the config they started with.
//! [`accept`] runs the handshake under a deadline, so a peer that never
//! finishes it cannot hold a socket. [`TlsStream`] drives a
//! `rustls::ServerConnection` over any futures-io stream itself (rather than
//! through futures-rustls) so that [`TlsStream::into_parts`] can hand the
//! whole TLS state, a `Send` [`TlsSession`], to another shard together with
//! the socket's descriptor (see [`crate::handoff`]), and so that a parked
//! session can read and answer records with no executor at all
//! ([`TlsSession::recv_detached`]). The same stream drives the client side
//! ([`connect`]) for glommio clients such as the load generator.
//! [`generate_self_signed`] writes a certificate for local use.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
/// The rustls this module is built on, so callers can name its types
/// without depending on it separately.
pub use rustls;
use rustls::client::ClientConnectionData;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ServerConnectionData;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, HandshakeKind, ServerConfig, ServerConnection,
};

/// A reasonable bound on a handshake; a peer still handshaking after this
/// is either hostile or too slow to serve.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bytes rustls queues per connection for sending (records not yet
/// taken by the socket). A writer that fills it waits for the socket.
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// TLS 1.2 session ids the server remembers for resumption (TLS 1.3
/// resumes from stateless tickets and needs no server memory). Shared by
/// every shard; each entry is a few hundred bytes.
const TLS12_SESSION_CACHE_ENTRIES: usize = 4096;

/// Why loading certificates, generating them or completing a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read. The cause is part of
    /// the message, not a `source()` as well, so a chain printed whole
    /// (`anyhow`'s `{:#}`) says it once.
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// A certificate or key file holds more than any such file would (or
    /// is a device that never ends).
    #[error("{}: more than {max} bytes, too large for a certificate or key file", path.display())]
    TooLarge { path: PathBuf, max: u64 },
    /// A file is not valid PEM.
    #[error("{}: not valid PEM: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    /// The certificate file holds no certificate.
    #[error("{}: no certificate found (expected PEM `BEGIN CERTIFICATE` blocks)", path.display())]
    NoCertificate { path: PathBuf },
    /// The key file holds no private key.
    #[error("{}: no private key found (expected a PEM PKCS#8, PKCS#1 or SEC1 private key)", path.display())]
    NoKey { path: PathBuf },
    /// The key is unusable or does not belong to the certificate.
    #[error("certificate {} with key {}: {error}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
    /// The session-ticket key could not be created.
    #[error("cannot set up TLS session tickets: {0}")]
    Tickets(rustls::Error),
    /// A generated certificate or key could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
    /// rcgen refused to build a certificate (e.g. an invalid name).
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The peer did not finish the handshake in time.
    #[error("TLS handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer broke the TLS protocol or offered nothing acceptable
    /// (e.g. only TLS 1.2 when it is not enabled).
    #[error("TLS handshake failed: {0}")]
    Handshake(rustls::Error),
    /// The peer closed the connection before the handshake finished.
    #[error("connection closed during the TLS handshake")]
    HandshakeEof,
    /// The socket failed during the handshake.
    #[error("socket error during the TLS handshake: {0}")]
    Io(#[from] io::Error),
}

/// Where a server's certificate and key live, and which TLS versions it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file with the certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Also accept TLS 1.2 (TLS 1.3 is always on).
    pub allow_tls12: bool,
}

/// Session-resumption state that outlives certificate reloads, so a reload
/// does not turn every reconnect into a full handshake.
#[derive(Debug, Clone)]
struct Resumption {
    tickets: Arc<dyn ProducesTickets>,
    tls12_sessions: Arc<dyn StoresServerSessions>,
}

impl Resumption {
    fn new() -> Result<Resumption, TlsError> {
        Ok(Resumption {
            // Rotates its ticket key every few hours by itself.
            tickets: rustls::crypto::ring::Ticketer::new().map_err(TlsError::Tickets)?,
            tls12_sessions: ServerSessionMemoryCache::new(TLS12_SESSION_CACHE_ENTRIES),
        })
    }
}

/// One immutable server TLS configuration.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    server: Arc<ServerConfig>,
}

impl TlsConfig {
    /// Loads `cert_chain` and `key` (PEM) into a configuration with
    /// resumption enabled; errors name the file at fault.
    pub fn from_pem_files(cert_chain: &Path, key: &Path, allow_tls12: bool) -> Result<TlsConfig, TlsError> {
        let settings = TlsSettings {
            cert_chain: cert_chain.to_owned(),
            key: key.to_owned(),
            allow_tls12,
        };
        Ok(TlsConfig {
            server: build_server_config(&settings, &Resumption::new()?)?,
        })
    }

    /// The rustls configuration, for [`accept`].
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }
}

fn build_server_config(
    settings: &TlsSettings,
    resumption: &Resumption,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_cert_chain(&settings.cert_chain)?;
    let key = read_key(&settings.key)?;
    let versions: &[&rustls::SupportedProtocolVersion] = if settings.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let identity_error = |error| TlsError::Identity {
        cert: settings.cert_chain.clone(),
        key: settings.key.clone(),
        error,
    };
    // An explicit provider, so nothing depends on a process-wide default.
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .map_err(identity_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(identity_error)?;
    config.ticketer = resumption.tickets.clone();
    config.session_storage = resumption.tls12_sessions.clone();
    // One ticket per handshake: a client reconnects with one connection at
    // a time, and each ticket costs an encryption and a record on the wire.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// The most bytes a certificate or key file may have: a chain of a few
/// certificates is a few KiB.
pub const TLS_FILE_MAX_BYTES: u64 = 1 << 20;

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    match crate::files::read_at_most(path, TLS_FILE_MAX_BYTES) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(TlsError::TooLarge {
            path: path.to_owned(),
            max: TLS_FILE_MAX_BYTES,
        }),
        Err(error) => Err(TlsError::Read {
            path: path.to_owned(),
            error,
        }),
    }
}

fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => TlsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        },
    })
}

/// The server's current TLS configuration, shared by every shard and
/// replaceable while the server runs.
///
/// Each new connection reads the current config once (an uncontended
/// read lock, tens of nanoseconds, next to a handshake's tens of
/// microseconds), so a plain `RwLock` serves here without an extra
/// dependency such as `arc-swap`. Connections keep the `Arc` they started
/// with; a reload never touches them.
#[derive(Debug)]
pub struct CertStore {
    settings: TlsSettings,
    resumption: Resumption,
    current: RwLock<Arc<ServerConfig>>,
}

impl CertStore {
    /// Loads the files named in `settings`.
    pub fn open(settings: TlsSettings) -> Result<CertStore, TlsError> {
        let resumption = Resumption::new()?;
        let config = build_server_config(&settings, &resumption)?;
        Ok(CertStore {
            settings,
            resumption,
            current: RwLock::new(config),
        })
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the same files and serves them to new connections. On an
    /// error the previous certificate stays in service. Tickets issued
    /// before the reload still resume.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build_server_config(&self.settings, &self.resumption)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// The files and versions this store serves.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }
}

/// Writes a fresh self-signed certificate for `names` (DNS names or IP
/// addresses; `localhost`, `127.0.0.1` and `::1` when empty) to
/// `dir/cert.pem` and `dir/key.pem`, creating `dir`. The key file is
/// readable by its owner only. Each file is written beside its final name
/// and renamed over it, so a server reloading meanwhile never reads half a file.
pub fn generate_self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let names = if names.is_empty() {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()]
    } else {
        names.to_vec()
    };
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    fs::create_dir_all(dir).map_err(|error| TlsError::Write {
        path: dir.to_owned(),
        error,
    })?;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    write_atomically(&key_path, signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(".tmp");
    let staging = PathBuf::from(staging);
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staging)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&staging, path)
    };
    write().map_err(|error| {
        let _ = fs::remove_file(&staging);
        TlsError::Write {
            path: path.to_owned(),
            error,
        }
    })
}

/// The side of a TLS connection a [`TlsStream`] drives: rustls's server
/// connection (what `ternd` accepts) or its client connection (what the
/// load generator opens). Both are a `ConnectionCommon` underneath, which
/// is all the stream uses.
pub trait Side: std::ops::DerefMut<Target = ConnectionCommon<Self::Data>> + Unpin {
    /// rustls's per-side state.
    type Data;
}

impl Side for ServerConnection {
    type Data = ServerConnectionData;
}

impl Side for ClientConnection {
    type Data = ClientConnectionData;
}

/// A client configuration that trusts exactly the certificates in
/// `ca_file` (PEM, e.g. the `cert.pem` that `ternd gen-cert` writes), for
/// glommio clients such as the load generator; errors name the file.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_cert_chain(ca_file)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: ca_file.to_owned(),
            message: e.to_string(),
        })?;
    }
    // An explicit provider, so nothing depends on a process-wide default.
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Handshake)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The TLS state of one connection, detached from its socket: keys,
/// sequence numbers and any bytes rustls still holds in either direction
/// (records not yet sent, plaintext not yet read). `Send`, so it can travel
/// to another shard beside the socket's descriptor.
#[derive(Debug)]
pub struct TlsSession<C = ServerConnection> {
    conn: C,
    /// `close_notify` is queued; nothing more may be written.
    close_sent: bool,
}

impl<C: Side> TlsSession<C> {
    /// The rustls connection, for inspection (negotiated version, SNI, ...).
    pub fn connection(&self) -> &C {
        &self.conn
    }

    /// Whether this connection resumed an earlier session instead of a full handshake.
    pub fn is_resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(HandshakeKind::Resumed)
    }

    /// The negotiated TLS version.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// For a session whose socket is detached from any executor (a parked
    /// session): reads once from `fd` without blocking and decrypts what
    /// arrived. `Ok(0)` when the peer closed, `WouldBlock` when nothing
    /// waits, any other error (a bad record among them) when the session
    /// is over. What is decrypted waits in the session: take it with
    /// [`TlsSession::first_plaintext`] here, or read it from the stream
    /// rebuilt by [`TlsStream::from_parts`], which reads buffered plaintext
    /// before the socket.
    pub fn recv_detached(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.conn.read_tls(&mut FdIo(fd))?;
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert saying why; the live stream sends it.
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(n)
    }

    /// The first decrypted chunk not yet read (one record's plaintext),
    /// left in place. With nothing decrypted: `WouldBlock` while the
    /// session goes on, `Ok` of an empty slice once the peer sent
    /// `close_notify`, `UnexpectedEof` once the socket closed without it.
    pub fn first_plaintext(&mut self) -> io::Result<&[u8]> {
        self.conn.reader().into_first_chunk()
    }

    /// Takes the first `n` bytes of [`TlsSession::first_plaintext`].
    pub fn consume_plaintext(&mut self, n: usize) {
        use std::io::BufRead;
        self.conn.reader().consume(n);
    }

    /// Encrypts `plain` (when not empty) and sends what `fd` takes without
    /// blocking, together with any record already queued (a key-update
    /// reply, say). `Ok(true)` when nothing is left queued; `Ok(false)`
    /// when the socket is full, and the rest goes out first once the
    /// stream is rebuilt and read or written.
    pub fn send_detached(&mut self, fd: RawFd, plain: &[u8]) -> io::Result<bool> {
        if self.close_sent {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS session already closed for writing",
            ));
        }
        if !plain.is_empty() {
            self.conn.writer().write_all(plain)?;
        }
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut FdIo(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// `Read`/`Write` on a raw socket descriptor that never blocks, for
/// [`TlsSession`]s whose socket no executor owns.
struct FdIo(RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::send(
                self.0,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS connection over `S`, with the handshake done: the server side by
/// default ([`accept`]), or the client side ([`connect`]).
///
/// Reading and writing may happen from two tasks of one executor (through
/// [`crate::split`]): a read never waits for the socket to accept writes,
/// and records that reading produces (alerts, key-update replies) are sent
/// with the writer's waker when a writer is waiting, so neither side can
/// steal the other's wake-up.
#[derive(Debug)]
pub struct TlsStream<S, C = ServerConnection> {
    io: S,
    session: TlsSession<C>,
    /// The writer's waker while a write or flush waits for the socket.
    write_waker: Option<Waker>,
}

/// Runs the server side of a TLS handshake on `io`, giving up after `timeout`.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<TlsStream<S>, TlsError> {
    let conn = ServerConnection::new(config).map_err(TlsError::Handshake)?;
    handshake(io, conn, timeout).await
}

/// Runs the client side of a TLS handshake with `server_name` on `io`,
/// giving up after `timeout`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
) -> Result<TlsStream<S, ClientConnection>, TlsError> {
    let conn = ClientConnection::new(config, server_name).map_err(TlsError::Handshake)?;
    handshake(io, conn, timeout).await
}

/// Runs `conn`'s handshake on `io` under `timeout`, for either side.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin, C: Side>(
    io: S,
    mut conn: C,
    timeout: Duration,
) -> Result<TlsStream<S, C>, TlsError> {
    conn.set_buffer_limit(Some(BUFFER_LIMIT));
    let mut stream = TlsStream::from_parts(
        io,
        TlsSession {
            conn,
            close_sent: false,
        },
    );
    let handshake = futures_lite::future::poll_fn(|cx| stream.poll_handshake(cx));
    let deadline = async {
        glommio::timer::sleep(timeout).await;
        Err(TlsError::HandshakeTimeout(timeout))
    };
    futures_lite::future::or(handshake, deadline).await?;
    Ok(stream)
}

impl<S, C> TlsStream<S, C> {
    /// Reassembles a stream from a socket and the session that was running on it.
    pub fn from_parts(io: S, session: TlsSession<C>) -> TlsStream<S, C> {
        TlsStream {
            io,
            session,
            write_waker: None,
        }
    }

    /// Splits the stream into its socket and its TLS state, e.g. to move the
    /// connection to another shard. No read or write may be in flight. Records
    /// not yet sent stay in the session and go out on the next write or flush
    /// after [`TlsStream::from_parts`]; flush first to send them now.
    pub fn into_parts(self) -> (S, TlsSession<C>) {
        (self.io, self.session)
    }

    /// The socket underneath.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The socket underneath; reading or writing it directly corrupts the TLS stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The TLS state.
    pub fn session(&self) -> &TlsSession<C> {
        &self.session
    }
}

impl<S: AsRawFd, C> AsRawFd for TlsStream<S, C> {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

/// A blocking-style view of an async stream for rustls's `read_tls` and
/// `write_tls`: `Pending` becomes `WouldBlock`, with the waker registered.
struct SyncIo<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> Read for SyncIo<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_read(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for SyncIo<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, C: Side> TlsStream<S, C> {
    /// Sends queued records until none are left, the socket is full
    /// (`Pending`, with `cx` registered) or it fails.
    fn poll_send_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.conn.wants_write() {
            let mut io = SyncIo { io: &mut self.io, cx };
            match self.session.conn.write_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends records that reading produced (or that a waiting writer
    /// queued), without making the reader wait for the socket. A waiting
    /// writer's waker is used when there is one: glommio keeps one waker per
    /// direction, and the writer must not lose its wake-up to the reader.
    /// When that send goes through, the writer is woken here: glommio drops
    /// its pending readiness poll, and the writer's waker with it, as soon
    /// as a send succeeds, so nothing else would wake a writer waiting in
    /// `poll_flush` for bytes the reader has just sent (a TLS echo under
    /// backpressure stalled that way, once in about a hundred runs).
    /// Errors resurface on the writer's next call.
    fn send_for_reader(&mut self, cx: &mut Context<'_>) {
        if !self.session.conn.wants_write() {
            return;
        }
        match self.write_waker.clone() {
            Some(waker) => {
                if self.poll_send_tls(&mut Context::from_waker(&waker)).is_ready() {
                    waker.wake();
                }
            }
            None => {
                let _ = self.poll_send_tls(cx);
            }
        }
    }

    /// Reads once from the socket and decrypts what arrived; `Ok(0)` at EOF.
    fn poll_recv_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut io = SyncIo { io: &mut self.io, cx };
        let n = match self.session.conn.read_tls(&mut io) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Err(e) = self.session.conn.process_new_packets() {
            // rustls queued an alert telling the peer why; send it if the
            // socket takes it now, the connection is over anyway.
            self.send_for_reader(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TlsError>> {
        loop {
            // Flights, then session tickets once the handshake is done.
            ready!(self.poll_send_tls(cx))?;
            if !self.session.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            let mut io = SyncIo { io: &mut self.io, cx };
            match self.session.conn.read_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(TlsError::HandshakeEof)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(TlsError::Io(e))),
            }
            if let Err(e) = self.session.conn.process_new_packets() {
                let _ = self.poll_send_tls(cx);
                return Poll::Ready(Err(TlsError::Handshake(e)));
            }
        }
    }

    /// Sends everything queued, remembering the writer's waker if it must wait.
    fn poll_send_for_writer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_send_tls(cx) {
            Poll::Pending => {
                self.write_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, C: Side> AsyncRead for TlsStream<S, C> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            // Ok(0) after the peer's close_notify; UnexpectedEof after a
            // bare TCP close; WouldBlock while nothing is decrypted.
            match this.session.conn.reader().read(buf) {
                Ok(n) => {
                    this.send_for_reader(cx);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            this.send_for_reader(cx);
            ready!(this.poll_recv_tls(cx))?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, C: Side> AsyncWrite for TlsStream<S, C> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.write_waker = None;
        if this.session.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS session already closed for writing",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let taken = this.session.conn.writer().write(buf)?;
            if taken > 0 {
                // Start sending now rather than at the flush. Whatever the
                // socket does not take stays queued, and a failure shows up
                // again on the next write or flush; reporting it here would
                // hide that `taken` bytes were accepted.
                let _ = this.poll_send_tls(cx);
                return Poll::Ready(Ok(taken));
            }
            // The send queue is at BUFFER_LIMIT: drain it before taking more.
            ready!(this.poll_send_for_writer(cx))?;
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.write_waker = None;
        ready!(this.poll_send_for_writer(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Sends `close_notify`, flushes, and shuts the socket's write side.
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.write_waker = None;
        if !this.session.close_sent {
            this.session.conn.send_close_notify();
            this.session.close_sent = true;
        }
        ready!(this.poll_send_for_writer(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn session_and_store_cross_threads() {
        assert_send::<TlsSession>();
        assert_send_sync::<CertStore>();
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = generate_self_signed(dir.path(), &[]).unwrap();
        let missing = dir.path().join("missing.pem");
        let err = TlsConfig::from_pem_files(&missing, &key, false).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = TlsConfig::from_pem_files(&empty, &key, false).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = TlsConfig::from_pem_files(&cert, &empty, false).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");
        // A device named by mistake is refused after the bound.
        let err = TlsConfig::from_pem_files(Path::new("/dev/zero"), &key, false).unwrap_err();
        assert!(matches!(err, TlsError::TooLarge { .. }), "{err}");

        // The certificate file holds no key.
        let err = TlsConfig::from_pem_files(&cert, &cert, false).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");

        // A key that belongs to another certificate.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = generate_self_signed(other.path(), &[]).unwrap();
        let err = TlsConfig::from_pem_files(&cert, &other_key, false).unwrap_err();
        assert!(matches!(err, TlsError::Identity { .. }), "{err}");

        TlsConfig::from_pem_files(&cert, &key, true).unwrap();
    }

    #[test]
    fn generated_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/certs");
        let (cert, key) = generate_self_signed(&out, &["chat.example".to_owned()]).unwrap();
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(fs::read_to_string(&cert).unwrap().contains("BEGIN CERTIFICATE"));
        assert!(!out.join("key.pem.tmp").exists());
        let err = generate_self_signed(&out, &["caf\u{e9}.example".to_owned()]);
        assert!(err.is_err());
    }
}
