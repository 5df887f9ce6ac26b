//! One client connection to `ternd` on a glommio executor.
//!
//! This module owns dialing from a chosen source address (over TLS when the
//! process was given `--tls-ca`, see [`use_tls`]), the request/answer
//! exchange used while setting up (Hello, Register, Login, LoginToken,
//! group create/join), and the split a running connection uses afterwards:
//! a [`Writer`] that several tasks of one executor may share (the sender
//! loop and the keep-alive pinger), and a [`read_frames`] loop that
//! validates every byte the server sends with `decode_server` and hands the
//! archived frame to the scenario. Nothing read from the network is
//! unwrapped: every failure becomes a [`WireError`] that the caller counts.
//! It also owns the load generator's message body format, which carries the
//! intended send time so receivers can measure end-to-end latency.

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use socket2::{Domain, Protocol, Socket, Type};
use tern_net::frame_io::{fill, write_batch, Filled, ReadError};
use tern_net::split::{split, ReadHalf, WriteHalf};
use tern_net::tls::rustls::pki_types::ServerName;
use tern_net::tls::rustls::{ClientConfig, ClientConnection};
use tern_net::transport::Transport;
use tern_proto::limits::{ABSOLUTE_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_BYTES};
use tern_proto::{
    decode_server, encode_client, ArchivedServerFrame, ClientBody, ClientFrame, ErrorCode, FrameBuf,
    FrameError, ServerBody, ServerFrame, UserId, PROTOCOL_VERSION,
};

/// Why a connection or one of its requests failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("read: {0}")]
    Read(#[from] ReadError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("server refused: {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("server disconnected us: {code}: {message}")]
    Disconnected { code: ErrorCode, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    #[error("connection closed by the server")]
    Closed,
}

impl WireError {
    /// The server's error code, when the server refused a request.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            WireError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Nanoseconds on a clock shared by every thread of this process. Senders
/// and receivers of one pair or group always live in the same process, so
/// a timestamp written by one is meaningful to the other.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Sleeps until the process clock reads `at_ns`.
pub async fn sleep_until_ns(at_ns: u64) {
    let now = now_ns();
    if at_ns > now {
        glommio::timer::sleep(Duration::from_nanos(at_ns - now)).await;
    }
}

/// The open-loop period at `rate` messages/s, in ns: at least 1, as a
/// period of 0 would make every message due at once, without end.
pub fn open_loop_period_ns(rate: f64) -> u64 {
    ((1e9 / rate) as u64).max(1)
}

/// When message (or attempt) `k` of an open loop that starts at
/// `start_ns` with `period_ns` is due. Saturating: a rate far below one a
/// second makes a period near u64::MAX ns, and the product or the sum
/// would overflow (a panic in debug builds, a due time in the past after
/// wrapping). Saturated, the message is simply due after the run ends.
pub fn due_ns(start_ns: u64, k: u64, period_ns: u64) -> u64 {
    start_ns.saturating_add(k.saturating_mul(period_ns))
}

/// How many messages of an open loop that starts at `start_ns` with
/// `period_ns` are due before `end_ns`.
pub fn due_before(start_ns: u64, period_ns: u64, end_ns: u64) -> u64 {
    match end_ns.checked_sub(start_ns) {
        Some(span) if span > 0 => (span - 1) / period_ns.max(1) + 1,
        _ => 0,
    }
}

/// How late sender `index` of the `count` on one executor starts an open
/// loop at `rate` messages/s; the executor is `slot` of `slots` (every
/// executor of every process). Senders that start together send message k
/// together: the latency would measure that self-made burst, not the
/// server. So each executor spreads its senders evenly over one period, as
/// independent clients would be, and the executors interleave theirs
/// (slot s starts s/slots of a gap later), which with equal shares spreads
/// every sender of the run evenly. Closed loop (`None`): 0.
pub fn open_loop_phase_ns(rate: Option<f64>, index: usize, count: usize, slot: usize, slots: usize) -> u64 {
    let Some(rate) = rate else {
        return 0;
    };
    let slots = slots.max(1) as u128;
    let position = index as u128 * slots + slot as u128 % slots;
    let positions = count.max(1) as u128 * slots;
    // position < positions, so the phase is below one period and fits.
    (open_loop_period_ns(rate) as u128 * position / positions) as u64
}

/// When each of an executor's `count` senders sends its first message, the
/// executor being `slot` of `slots`: spread over one period as
/// [`open_loop_phase_ns`] says; a closed loop (`None`) starts them all at
/// `start_ns`.
pub fn open_loop_starts_ns(
    start_ns: u64,
    rate: Option<f64>,
    count: usize,
    (slot, slots): (usize, usize),
) -> Vec<u64> {
    (0..count)
        .map(|i| start_ns + open_loop_phase_ns(rate, i, count, slot, slots))
        .collect()
}

const BODY_MAGIC: [u8; 4] = *b"lg01";

/// A message body: magic, intended send time (ns, process clock), sequence
/// number, zero padding up to `payload_bytes`.
pub fn message_body(intended_ns: u64, seq: u64, payload_bytes: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload_bytes.max(crate::cli::MIN_PAYLOAD_BYTES));
    body.extend_from_slice(&BODY_MAGIC);
    body.extend_from_slice(&intended_ns.to_le_bytes());
    body.extend_from_slice(&seq.to_le_bytes());
    body.resize(payload_bytes.max(body.len()), 0);
    body
}

/// The intended send time and sequence number of a body written by
/// [`message_body`], or `None` if it is not one.
pub fn parse_message_body(body: &[u8]) -> Option<(u64, u64)> {
    let (magic, rest) = body.split_first_chunk::<4>()?;
    if *magic != BODY_MAGIC {
        return None;
    }
    let (intended, rest) = rest.split_first_chunk::<8>()?;
    let (seq, _) = rest.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*intended), u64::from_le_bytes(*seq)))
}

/// Opens a TCP connection to `server`, bound to `source` when given.
///
/// The connect is non-blocking: the executor never stalls on a full accept
/// backlog. The first write on the returned stream waits until the
/// handshake completes (a send on a connecting socket reports "would
/// block" and glommio then waits for writability), and reports a refused
/// connection as an error.
pub fn dial(server: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(server), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        // Let connect() pick the port from the full 4-tuple instead of
        // reserving one per source address at bind time: without this a
        // source address runs out of ports after ~28k binds.
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddrV4::new(ip, 0).into())?;
    }
    socket.set_nonblocking(true)?;
    match socket.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // glommio 0.9 builds on socket2 0.4, so hand the descriptor over raw.
    // SAFETY: `into_raw_fd` gives up ownership of a valid, open socket, and
    // the stream becomes its only owner.
    Ok(unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) })
}

/// A connection's byte stream: plain TCP, or TLS over it.
type Stream = Transport<ClientConnection>;

/// What every Tern connection of this process dials with over TLS.
struct TlsDial {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

/// Set once, before any executor starts, from `--tls-ca`: connections are
/// plain TCP while it is unset. One setting for the whole process, since a
/// run targets one listener.
static TLS_DIAL: OnceLock<TlsDial> = OnceLock::new();

/// Makes every later Tern connection of this process TLS, trusting
/// `config`'s roots for a certificate naming `server_name`.
pub fn use_tls(config: Arc<ClientConfig>, server_name: &str) -> Result<(), String> {
    let server_name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("invalid --tls-server-name {server_name:?}: {e}"))?;
    TLS_DIAL
        .set(TlsDial { config, server_name })
        .map_err(|_| "TLS is already configured".to_string())
}

/// Dials like [`dial`], then runs the TLS handshake when [`use_tls`] asked
/// for it.
async fn open_stream(server: SocketAddr, source: Option<Ipv4Addr>) -> Result<Stream, WireError> {
    let tcp = dial(server, source)?;
    let Some(tls) = TLS_DIAL.get() else {
        return Ok(Transport::Plain(tcp));
    };
    let stream = tern_net::tls::connect(
        tcp,
        tls.config.clone(),
        tls.server_name.clone(),
        tern_net::tls::DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await
    .map_err(|e| WireError::Protocol(format!("TLS: {e}")))?;
    Ok(Transport::Tls(Box::new(stream)))
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd, a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What `HelloOk` told us.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_frame_bytes: u32,
    pub idle_timeout: Duration,
}

impl ServerLimits {
    /// How often an otherwise silent connection must ping: a third of the
    /// idle timeout, so one lost ping does not get it closed.
    pub fn ping_interval(&self) -> Option<Duration> {
        (!self.idle_timeout.is_zero()).then(|| self.idle_timeout / 3)
    }
}

/// A connection during setup: one request at a time.
pub struct Conn {
    stream: Stream,
    buf: FrameBuf,
    out: AlignedVec,
    next_request_id: u64,
    limits: ServerLimits,
}

/// The `Hello` every connection opens with.
fn hello() -> ClientBody {
    ClientBody::Hello {
        version: PROTOCOL_VERSION,
        client_name: concat!("loadgen/", env!("CARGO_PKG_VERSION")).into(),
    }
}

impl Conn {
    /// A connection that has sent nothing yet.
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            // Setup pipelines Hello, Login and Sync, so catch-up frames can
            // arrive before `HelloOk` is read: accept anything the protocol
            // allows. The buffer only grows to the frames that do arrive.
            buf: FrameBuf::new(ABSOLUTE_MAX_FRAME_BYTES),
            out: AlignedVec::new(),
            next_request_id: 1,
            limits: ServerLimits {
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                idle_timeout: Duration::ZERO,
            },
        }
    }

    /// Dials and completes the Hello exchange.
    pub async fn open(server: SocketAddr, source: Option<Ipv4Addr>) -> Result<Conn, WireError> {
        let mut conn = Conn::new(open_stream(server, source).await?);
        match conn.request(hello()).await? {
            ServerBody::HelloOk {
                version,
                max_frame_bytes,
                idle_timeout_ms,
            } if version == PROTOCOL_VERSION => {
                conn.limits = ServerLimits {
                    max_frame_bytes,
                    idle_timeout: Duration::from_millis(u64::from(idle_timeout_ms)),
                };
                Ok(conn)
            }
            other => Err(unexpected("HelloOk", &other)),
        }
    }

    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// Sends one request and waits for its answer. Pushes that arrive in
    /// between are validated and dropped (setup has no use for them); an
    /// `Error` answer becomes [`WireError::Server`].
    pub async fn request(&mut self, body: ClientBody) -> Result<ServerBody, WireError> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.out.clear();
        encode_client(
            &ClientFrame { request_id, body },
            &mut self.out,
            self.limits.max_frame_bytes,
        )?;
        write_batch(&mut self.stream, &self.out).await?;
        loop {
            let frame = self.recv().await?;
            if frame.request_id == request_id {
                return match frame.body {
                    ServerBody::Error { code, message, .. } => Err(WireError::Server { code, message }),
                    body => Ok(body),
                };
            }
            if let ServerBody::Disconnect { code, message, .. } = frame.body {
                return Err(WireError::Disconnected { code, message });
            }
        }
    }

    /// Reads frames until `on_frame` returns a value, validating each
    /// one in place (nothing is deserialized unless `on_frame` does it).
    async fn recv_with<T>(
        &mut self,
        mut on_frame: impl FnMut(&ArchivedServerFrame) -> Result<Option<T>, WireError>,
    ) -> Result<T, WireError> {
        loop {
            while let Some(body) = self.buf.next_body()? {
                if let Some(done) = on_frame(decode_server(body)?)? {
                    return Ok(done);
                }
            }
            match fill(&mut self.stream, &mut self.buf).await? {
                Filled::Bytes(_) => {}
                Filled::Eof => return Err(WireError::Closed),
            }
        }
    }

    async fn recv(&mut self) -> Result<ServerFrame, WireError> {
        loop {
            if let Some(body) = self.buf.next_body()? {
                let archived = decode_server(body)?;
                return rkyv::deserialize::<ServerFrame, BoxedError>(archived)
                    .map_err(|e| WireError::Protocol(format!("cannot deserialize frame: {e}")));
            }
            match fill(&mut self.stream, &mut self.buf).await? {
                Filled::Bytes(_) => {}
                Filled::Eof => return Err(WireError::Closed),
            }
        }
    }

    /// Logs in with a password; returns the user and the session token.
    pub async fn login(&mut self, username: &str, password: &str) -> Result<(UserId, Vec<u8>), WireError> {
        let body = ClientBody::Login {
            username: username.into(),
            password: password.as_bytes().to_vec(),
        };
        match self.request(body).await? {
            ServerBody::LoggedIn { user, token, .. } => Ok((user, token)),
            other => Err(unexpected("LoggedIn", &other)),
        }
    }

    /// Logs in with a JWT; returns the user and the session token.
    pub async fn login_jwt(&mut self, jwt: &str) -> Result<(UserId, Vec<u8>), WireError> {
        match self.request(ClientBody::LoginJwt { token: jwt.into() }).await? {
            ServerBody::LoggedIn { user, token, .. } => Ok((user, token)),
            other => Err(unexpected("LoggedIn", &other)),
        }
    }

    /// Logs in with a token from an earlier login.
    pub async fn login_token(&mut self, token: &[u8]) -> Result<UserId, WireError> {
        match self
            .request(ClientBody::LoginToken {
                token: token.to_vec(),
            })
            .await?
        {
            ServerBody::LoggedIn { user, .. } => Ok(user),
            other => Err(unexpected("LoggedIn", &other)),
        }
    }

    /// Registers an account.
    pub async fn register(&mut self, username: &str, password: &str) -> Result<UserId, WireError> {
        let body = ClientBody::Register {
            username: username.into(),
            password: password.as_bytes().to_vec(),
        };
        match self.request(body).await? {
            ServerBody::Registered { user } => Ok(user),
            other => Err(unexpected("Registered", &other)),
        }
    }

    /// Turns the connection into its running halves.
    pub fn into_running(self) -> (ReadSide, std::rc::Rc<Writer>) {
        let (reader, writer) = split(self.stream);
        let writer = Writer {
            lock: Semaphore::new(1),
            state: RefCell::new(Some(WriterState {
                half: writer,
                out: AlignedVec::new(),
                next_request_id: self.next_request_id,
            })),
            max_frame_bytes: self.limits.max_frame_bytes,
        };
        (
            ReadSide {
                half: reader,
                buf: self.buf,
            },
            std::rc::Rc::new(writer),
        )
    }
}

fn unexpected(wanted: &str, got: &ServerBody) -> WireError {
    WireError::Protocol(format!("expected {wanted}, got {got:?}"))
}

/// Opens a connection, logs in with a token and syncs, within `timeout`.
///
/// The server sends a session no messages until it has synced, so every
/// session syncs (with no cursors: this client keeps no history). Backlog
/// streamed by the sync (left by an earlier run of reused users) arrives
/// before `SyncDone` and is dropped by [`Conn::request`].
///
/// `Hello`, `LoginToken` and `Sync` go out in one write and their answers
/// are read as they come: the server serves a connection's frames in order
/// (protocol section 2.1), so a client need not wait a round trip between
/// them. That is one write and, usually, one wake-up on each side instead
/// of three; [`open_session_serial`] waits for each answer instead.
pub async fn open_session(
    server: SocketAddr,
    source: Option<Ipv4Addr>,
    token: &[u8],
    timeout: Duration,
) -> Result<(Conn, UserId), WireError> {
    let login = ClientBody::LoginToken {
        token: token.to_vec(),
    };
    open_session_with(server, source, login, timeout).await
}

/// [`open_session`] with any login request (`LoginToken` or `LoginJwt`).
pub async fn open_session_with(
    server: SocketAddr,
    source: Option<Ipv4Addr>,
    login: ClientBody,
    timeout: Duration,
) -> Result<(Conn, UserId), WireError> {
    let attempt = async {
        let mut conn = Conn::new(open_stream(server, source).await?);
        let bodies = [hello(), login, ClientBody::Sync { cursors: Vec::new() }];
        conn.out.clear();
        for (request_id, body) in (1..).zip(bodies) {
            encode_client(
                &ClientFrame { request_id, body },
                &mut conn.out,
                DEFAULT_MAX_FRAME_BYTES,
            )?;
        }
        conn.next_request_id = 4;
        write_batch(&mut conn.stream, &conn.out).await?;
        let mut limits = None;
        let mut user = None;
        conn.recv_with(|frame| {
            use tern_proto::ArchivedServerBody as B;
            let request_id = frame.request_id.to_native();
            if request_id == 0 {
                // A push: only a `Disconnect` matters during setup.
                return match &frame.body {
                    B::Disconnect { .. } => Err(frame_failure(frame).unwrap_or(WireError::Closed)),
                    _ => Ok(None),
                };
            }
            if let Some(failure) = frame_failure(frame) {
                return Err(failure);
            }
            match (request_id, &frame.body) {
                (
                    1,
                    B::HelloOk {
                        version,
                        max_frame_bytes,
                        idle_timeout_ms,
                    },
                ) if *version == PROTOCOL_VERSION => {
                    limits = Some(ServerLimits {
                        max_frame_bytes: max_frame_bytes.to_native(),
                        idle_timeout: Duration::from_millis(u64::from(idle_timeout_ms.to_native())),
                    });
                    Ok(None)
                }
                (2, B::LoggedIn { user: id, .. }) if limits.is_some() => {
                    user = Some(id.to_native());
                    Ok(None)
                }
                (3, B::SyncDone { .. }) => match (limits, user) {
                    (Some(limits), Some(user)) => Ok(Some((limits, user))),
                    _ => Err(WireError::Protocol("SyncDone before HelloOk and LoggedIn".into())),
                },
                (id, _) => Err(WireError::Protocol(format!(
                    "unexpected answer to request {id} while opening a session"
                ))),
            }
        })
        .await
        .map(|(limits, user)| {
            conn.limits = limits;
            (conn, user)
        })
    };
    with_timeout(timeout, attempt).await
}

/// [`open_session`] one round trip at a time: `Hello`, then `LoginToken`,
/// then `Sync`, each sent once the previous answer is in.
pub async fn open_session_serial(
    server: SocketAddr,
    source: Option<Ipv4Addr>,
    login: ClientBody,
    timeout: Duration,
) -> Result<(Conn, UserId), WireError> {
    let attempt = async {
        let mut conn = Conn::open(server, source).await?;
        let user = match conn.request(login).await? {
            ServerBody::LoggedIn { user, .. } => user,
            other => return Err(unexpected("LoggedIn", &other)),
        };
        match conn.request(ClientBody::Sync { cursors: Vec::new() }).await? {
            ServerBody::SyncDone { .. } => Ok((conn, user)),
            other => Err(unexpected("SyncDone", &other)),
        }
    };
    with_timeout(timeout, attempt).await
}

/// Runs `fut`, giving up with [`WireError::Timeout`] after `timeout`.
pub async fn with_timeout<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    future::or(fut, async {
        glommio::timer::sleep(timeout).await;
        Err(WireError::Timeout)
    })
    .await
}

/// The read half of a running connection with its frame buffer.
pub struct ReadSide {
    half: ReadHalf<Stream>,
    buf: FrameBuf,
}

/// Reads frames until the connection ends, handing each validated frame to
/// `on_frame`. Returns why it ended: `Closed` for a clean EOF, the
/// handler's error if it asks to stop, or the read/validation failure.
pub async fn read_frames(
    mut side: ReadSide,
    mut on_frame: impl FnMut(&ArchivedServerFrame) -> Result<(), WireError>,
) -> WireError {
    loop {
        loop {
            let body = match side.buf.next_body() {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(e) => return e.into(),
            };
            let frame = match decode_server(body) {
                Ok(frame) => frame,
                Err(e) => return e.into(),
            };
            if let Err(e) = on_frame(frame) {
                return e;
            }
        }
        match fill(&mut side.half, &mut side.buf).await {
            Ok(Filled::Bytes(_)) => {}
            Ok(Filled::Eof) => return WireError::Closed,
            Err(e) => return e.into(),
        }
    }
}

struct WriterState {
    half: WriteHalf<Stream>,
    out: AlignedVec,
    next_request_id: u64,
}

/// The write side of a running connection, shared by the tasks of one
/// executor that send on it. A one-unit semaphore serialises writers; the
/// state is moved out of its cell while a write is in progress, so no
/// `RefCell` borrow is ever held across an await.
pub struct Writer {
    lock: Semaphore,
    state: RefCell<Option<WriterState>>,
    max_frame_bytes: u32,
}

impl Writer {
    /// Encodes every body and writes them with one syscall. Returns the
    /// request id of the first.
    pub async fn send_batch(&self, bodies: impl IntoIterator<Item = ClientBody>) -> Result<u64, WireError> {
        let _permit = self
            .lock
            .acquire_permit(1)
            .await
            .map_err(|e| WireError::Protocol(format!("writer lock: {e}")))?;
        let Some(mut state) = self.state.borrow_mut().take() else {
            return Err(WireError::Closed);
        };
        state.out.clear();
        let first = state.next_request_id;
        for body in bodies {
            let request_id = state.next_request_id;
            state.next_request_id += 1;
            encode_client(
                &ClientFrame { request_id, body },
                &mut state.out,
                self.max_frame_bytes,
            )?;
        }
        let result = write_batch(&mut state.half, &state.out).await;
        // Put the state back even after a failed write: later writes then
        // fail on the socket too, and the caller counts each failure.
        *self.state.borrow_mut() = Some(state);
        result?;
        Ok(first)
    }

    /// Sends one request.
    pub async fn send(&self, body: ClientBody) -> Result<u64, WireError> {
        self.send_batch(std::iter::once(body)).await
    }
}

/// Pings every `interval` so the server does not close a silent connection.
/// Ends on the first failed write.
pub async fn keep_alive(writer: std::rc::Rc<Writer>, interval: Duration) -> WireError {
    let mut nonce = 0u64;
    loop {
        glommio::timer::sleep(interval).await;
        nonce += 1;
        if let Err(e) = writer.send(ClientBody::Ping { nonce }).await {
            return e;
        }
    }
}

/// The error an archived `Error` or `Disconnect` push/answer stands for, if
/// the frame is one.
pub fn frame_failure(frame: &ArchivedServerFrame) -> Option<WireError> {
    use tern_proto::ArchivedServerBody;
    match &frame.body {
        ArchivedServerBody::Error { code, message, .. } => Some(WireError::Server {
            code: code.to_native(),
            message: message.as_str().to_owned(),
        }),
        ArchivedServerBody::Disconnect { code, message, .. } => Some(WireError::Disconnected {
            code: code.to_native(),
            message: message.as_str().to_owned(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_senders_of_one_executor_are_spread_over_one_period() {
        // 100 msgs/s: a 10 ms period, four senders 2.5 ms apart.
        let phases: Vec<_> = (0..4)
            .map(|p| open_loop_phase_ns(Some(100.0), p, 4, 0, 1))
            .collect();
        assert_eq!(phases, vec![0, 2_500_000, 5_000_000, 7_500_000]);
        assert_eq!(open_loop_phase_ns(None, 3, 4, 1, 2), 0);
        assert_eq!(open_loop_phase_ns(Some(100.0), 0, 0, 0, 0), 0);
    }

    #[test]
    fn open_loop_senders_of_every_executor_interleave() {
        // 2 processes × 2 threads, 3 senders each, at 120 msgs/s: 12
        // senders, one every 1/12 of the 8,333,333 ns period.
        let period = open_loop_period_ns(120.0);
        let mut phases: Vec<u64> = (0..4)
            .flat_map(|slot| (0..3).map(move |i| open_loop_phase_ns(Some(120.0), i, 3, slot, 4)))
            .collect();
        phases.sort_unstable();
        let even: Vec<u64> = (0..12).map(|n| period * n / 12).collect();
        assert_eq!(phases, even);

        // Unequal shares (4, 3, 3 over three executors): each executor's
        // own senders stay evenly spread, none shares an instant, and all
        // start within the first period.
        let counts = [4usize, 3, 3];
        let mut all = Vec::new();
        for (slot, &count) in counts.iter().enumerate() {
            let own: Vec<u64> = (0..count)
                .map(|i| open_loop_phase_ns(Some(120.0), i, count, slot, 3))
                .collect();
            let gaps: Vec<u64> = own.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(
                gaps.iter().all(|g| g.abs_diff(period / count as u64) <= 1),
                "{own:?}"
            );
            all.extend(own);
        }
        assert!(all.iter().all(|&p| p < period));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 10, "two senders share a start");
    }

    /// 50 groups at 10 msgs/s each: message k of every group used to be
    /// due at the same instant, one burst of 50 sends (× members) per
    /// period. Now the 50 first sends are 2 ms apart and so is every later
    /// round, as for one group at 500/s.
    #[test]
    fn publishers_of_one_executor_never_send_together() {
        let start = 1_000_000_000;
        let period = open_loop_period_ns(10.0);
        let starts = open_loop_starts_ns(start, Some(10.0), 50, (0, 1));
        assert_eq!(starts.len(), 50);
        assert_eq!(starts[0], start);
        assert!(starts.windows(2).all(|w| w[1] - w[0] == 2_000_000), "{starts:?}");
        assert!(starts.iter().all(|&s| s < start + period));
        let mut due: Vec<u64> = starts
            .iter()
            .flat_map(|&first| (0..20).map(move |k| first + k * period))
            .collect();
        due.sort_unstable();
        assert!(due.windows(2).all(|w| w[1] - w[0] == 2_000_000), "sends coincide");
    }

    #[test]
    fn publishers_of_different_executors_interleave() {
        // Two processes × one thread, two groups each, at 100/s (10 ms):
        // one first send every 2.5 ms across the whole run.
        let mut starts: Vec<u64> = (0..2)
            .flat_map(|slot| open_loop_starts_ns(0, Some(100.0), 2, (slot, 2)))
            .collect();
        starts.sort_unstable();
        assert_eq!(starts, vec![0, 2_500_000, 5_000_000, 7_500_000]);
    }

    #[test]
    fn open_loop_period_is_never_zero() {
        assert_eq!(open_loop_period_ns(1_000.0), 1_000_000);
        assert_eq!(open_loop_period_ns(2e9), 1);
        assert_eq!(open_loop_period_ns(f64::MAX), 1);
        assert_eq!(open_loop_phase_ns(Some(2e9), 5, 10, 0, 1), 0);
        // A rate far below one a second: the phase saturates, no overflow.
        assert!(open_loop_phase_ns(Some(1e-30), 1, 2, 1, 2) > 0);
    }

    #[test]
    fn due_times_saturate_instead_of_overflowing() {
        assert_eq!(due_ns(1_000, 3, 10), 1_030);
        // `connect --rate 1e-12`: an interval of u64::MAX ns (the cast
        // saturates), attempt 2 due "never", not wrapped into the past.
        let interval = (1e9 / 1e-12) as u64;
        assert_eq!(interval, u64::MAX);
        assert_eq!(due_ns(5_000, 0, interval), 5_000);
        assert_eq!(due_ns(5_000, 1, interval), u64::MAX);
        assert_eq!(due_ns(5_000, 2, interval), u64::MAX);
        assert_eq!(due_ns(u64::MAX - 1, 1, 10), u64::MAX);
    }

    #[test]
    fn due_before_counts_the_messages_of_the_window() {
        // 100,000/s for 1 s: 100,000 due, the last at 999,990,000 ns.
        assert_eq!(due_before(0, 10_000, 1_000_000_000), 100_000);
        assert_eq!(due_before(5, 10, 6), 1);
        assert_eq!(due_before(5, 10, 5), 0);
        assert_eq!(due_before(7, 10, 5), 0, "starts after the end");
        assert_eq!(due_before(0, 10, 21), 3);
        assert_eq!(due_before(0, u64::MAX, u64::MAX), 1);
    }

    #[test]
    fn message_bodies_roundtrip() {
        let body = message_body(123_456_789, 42, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(parse_message_body(&body), Some((123_456_789, 42)));
        // The header is never truncated, whatever size is asked for.
        assert_eq!(message_body(1, 2, 0).len(), 20);
        assert_eq!(parse_message_body(b"hello"), None);
        assert_eq!(parse_message_body(&[0u8; 64]), None);
        assert_eq!(parse_message_body(&body[..19]), None);
    }

    #[test]
    fn ping_interval_is_a_third_of_the_idle_timeout() {
        let limits = ServerLimits {
            max_frame_bytes: 1024,
            idle_timeout: Duration::from_secs(60),
        };
        assert_eq!(limits.ping_interval(), Some(Duration::from_secs(20)));
        let none = ServerLimits {
            idle_timeout: Duration::ZERO,
            ..limits
        };
        assert_eq!(none.ping_interval(), None);
    }
}
