//! One client connection, from accept to close.
//!
//! A connection starts on whichever shard accepted it and speaks the
//! pre-login protocol there (`Hello`, `Register`, `Login`, `Ping`), one
//! request at a time. Once its user is known, the socket moves to the
//! user's home shard (see [`tern_net::handoff`]) together with any bytes
//! already buffered, so that every session of a user lives on one shard and
//! deliveries to it never cross a core. There it runs as two tasks: a
//! reader that validates frames in place and dispatches them, and a writer
//! that drains the connection's [`Outbox`] in batches. A malformed frame
//! gets an error frame and closes only this connection, with a lingering
//! close ([`tern_net::linger`]) so that what the client pipelined behind it
//! does not turn the close into a reset; silence past the
//! idle timeout closes it with `IdleTimeout`, and so does a connection that
//! has not logged in within the login deadline, however it trickles bytes.
//! Every frame passes the connection's rate meters ([`crate::limits`])
//! before it is served, logins are refused before any password is hashed
//! while their account or address is backing off, and text messages pass
//! the content filter ([`crate::filter`]).

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncWrite;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tern_net::frame_io::{fill_shared, write_batch, Filled, ReadError};
use tern_net::handoff::DetachedSocket;
use tern_net::linger::{discard_queued, linger, LINGER_BYTES, LINGER_TIME};
use tern_net::split::{split, ReadHalf, WriteHalf};
use tern_net::tls::{self, rustls::ServerConfig};
use tern_net::transport::{DetachedTransport, Transport};
use tern_proto::session::{Refusal, Session};
use tern_proto::{
    decode_client, encode_server, limits::TOKEN_LEN, ArchivedClientBody, Content, ContentKind, ConvId,
    Cursor, ErrorCode, FrameBuf, FrameError, Friend, ReceiptKind, ServerBody, ServerFrame, UserId,
    PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
use tern_storage::{ExternalLogin, FriendOutcome};

use crate::jwt::JwtRefusal;

use crate::catchup::{self, SyncError};
use crate::filter::{FilterCache, Outcome};
use crate::limits::{self, ConnLimiter, ConnectionPermit, Refused, Verdict};
use crate::mesh::{ConnKey, Event, GroupAnswer, GroupOp, Handoff, Recipients, Request};
use crate::outbox::{Next, Outbox};
use crate::shard::{encode_shared, now_ms, store_error_frame, SessionToken, Shard, ACCOUNT_DELETED};

/// What the pre-login loop must do after parsing a frame.
enum PreLogin {
    Reply(ServerFrame),
    ReplyAndClose(ServerFrame),
    Register {
        request_id: u64,
        username: String,
        password: Vec<u8>,
    },
    Login {
        request_id: u64,
        username: String,
        password: Vec<u8>,
    },
    LoginToken {
        request_id: u64,
        token: Vec<u8>,
    },
    LoginJwt {
        request_id: u64,
        token: String,
    },
}

fn error(request_id: u64, refusal: &Refusal) -> ServerFrame {
    let mut frame = ServerFrame::error(request_id, refusal.code, refusal.message);
    if refusal.code == ErrorCode::UnsupportedVersion {
        if let ServerBody::Error {
            supported_versions, ..
        } = &mut frame.body
        {
            supported_versions.extend_from_slice(SUPPORTED_VERSIONS);
        }
    }
    frame
}

fn rate_limited(request_id: u64, what: &str, retry_after_ms: u32) -> ServerFrame {
    ServerFrame::rate_limited(
        request_id,
        format!("{what}; retry after {retry_after_ms} ms"),
        retry_after_ms,
    )
}

fn disconnect(code: ErrorCode, message: &str, retry_after_ms: u32) -> ServerFrame {
    ServerFrame {
        request_id: 0,
        body: ServerBody::Disconnect {
            code,
            message: message.into(),
            retry_after_ms,
        },
    }
}

/// The connection meters' answer to a frame, if it is not to be served.
fn metered(limiter: &mut ConnLimiter, request_id: u64, is_message: bool) -> Option<PreLogin> {
    match limiter.check(is_message, limits::monotonic_us()) {
        Verdict::Allow => None,
        Verdict::Refuse { retry_after_ms } => Some(PreLogin::Reply(rate_limited(
            request_id,
            "too many requests",
            retry_after_ms,
        ))),
        Verdict::Disconnect { retry_after_ms } => Some(PreLogin::ReplyAndClose(disconnect(
            ErrorCode::RateLimited,
            "too many requests past the rate limit",
            retry_after_ms,
        ))),
    }
}

fn frame_error_reply(e: &FrameError) -> ServerFrame {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        _ => ErrorCode::MalformedFrame,
    };
    ServerFrame::error(0, code, e.to_string())
}

fn configure(stream: &TcpStream, shard: &Shard) {
    // Failing to set an option leaves a working socket with OS defaults;
    // the idle sweep still bounds its life.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(shard.config.idle_timeout));
    let _ = stream.set_write_timeout(Some(shard.config.write_timeout));
}

/// What a connection holds on its shard for as long as its socket is
/// there: its per-address permit and its place in the open-connection count.
struct Guards {
    _permit: ConnectionPermit,
    _open: OpenConnection,
}

/// Counts a connection's socket as open on a shard for as long as it lives.
struct OpenConnection {
    shard: Rc<Shard>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        // Closed, or handed to another shard (which counts it there).
        self.shard.m().connection_gone();
    }
}

/// Serves a freshly accepted connection; `tls` is the TLS configuration
/// of the listener it came from, if that listener speaks TLS.
pub async fn serve(shard: Rc<Shard>, tcp: TcpStream, tls: Option<Arc<ServerConfig>>) {
    let login_deadline = Instant::now() + shard.config.login_timeout;
    let peer = tcp.peer_addr().ok().map(|addr| addr.ip());
    // Checked before anything is read or a TLS handshake is spent on it.
    // Counted on this shard while the socket is here (until it closes or
    // moves to its user's home shard, which counts it there).
    let permit = match limits::admit_connection(&shard.config, peer) {
        Ok(permit) => permit,
        Err(refused) => return refuse_connection(&shard, tcp, tls.is_some(), refused).await,
    };
    shard.m().connection_accepted();
    let guards = Guards {
        _permit: permit,
        _open: OpenConnection { shard: shard.clone() },
    };
    configure(&tcp, &shard);
    let mut stream = match tls {
        None => Transport::Plain(tcp),
        // The handshake has its own deadline: a client that never finishes
        // it (slowloris) is dropped without ever reaching the protocol.
        // Boxed: the handshake's state is large and plain connections
        // should not reserve room for it.
        Some(config) => match Box::pin(tls::accept(tcp, config, shard.config.handshake_timeout)).await {
            Ok(tls) => Transport::Tls(Box::new(tls)),
            Err(e) => return tracing::debug!(error = %e, "TLS handshake failed"),
        },
    };
    let config = shard.config.clone();
    let mut buf = FrameBuf::new(config.max_frame_bytes);
    let idle_ms = config.idle_timeout.as_millis() as u64;
    let mut session = Session::new(now_ms(), idle_ms, config.content_limits());
    let mut limiter = ConnLimiter::new(&config.limits, peer);
    let mut out = AlignedVec::new();
    // Answers not written yet because more of the client's frames were
    // already buffered (a client that sends Hello, LoginToken and Sync in
    // one write): they go out together, in one write, or ahead of the
    // session's first frames if one of those frames logs in.
    let mut deferred: Vec<ServerFrame> = Vec::new();
    loop {
        let action = match next_pre_login(&mut buf, &mut session, &mut limiter, &shard) {
            Some(action) => action,
            None => {
                // Nothing deferred may wait on the client.
                if !deferred.is_empty()
                    && write_frames(&mut stream, &mut out, &shard, &mut deferred)
                        .await
                        .is_err()
                {
                    return;
                }
                // Not yet a session the shard tracks, so watch for shutdown
                // here, and for the login deadline: the idle timeout alone
                // lets a client that trickles a byte now and then stay.
                let remaining = login_deadline.saturating_duration_since(Instant::now());
                let read = futures_lite::future::or(
                    futures_lite::future::or(
                        async { PreLoginWake::Read(fill_shared(&mut stream, &mut buf).await) },
                        async {
                            shard.stop.wait().await;
                            PreLoginWake::Stop
                        },
                    ),
                    async {
                        glommio::timer::sleep(remaining).await;
                        PreLoginWake::Deadline
                    },
                )
                .await;
                match read {
                    PreLoginWake::Read(Ok(Filled::Bytes(_))) => continue,
                    PreLoginWake::Read(Ok(Filled::Eof)) => return,
                    PreLoginWake::Read(Err(e)) => {
                        return close_after_read_error(&mut stream, &mut out, &shard, e).await
                    }
                    PreLoginWake::Deadline => {
                        shard.m().idle_timeout();
                        let bye = disconnect(ErrorCode::IdleTimeout, "no login within the login timeout", 0);
                        return reply_and_close(&mut stream, &mut out, &shard, &bye).await;
                    }
                    PreLoginWake::Stop => {
                        let retry_after_ms = shard
                            .config
                            .shutdown_retry_after
                            .as_millis()
                            .min(u32::MAX as u128);
                        let bye = ServerFrame {
                            request_id: 0,
                            body: ServerBody::Disconnect {
                                code: ErrorCode::ShuttingDown,
                                message: "server is shutting down".into(),
                                retry_after_ms: retry_after_ms as u32,
                            },
                        };
                        return reply_and_close(&mut stream, &mut out, &shard, &bye).await;
                    }
                }
            }
        };
        // A frame to answer with, or a login accepted (handed off below).
        let answer: Result<LoggedIn, ServerFrame> = match action {
            PreLogin::Reply(frame) => Err(frame),
            PreLogin::ReplyAndClose(frame) => {
                deferred.push(frame);
                let _ = write_frames(&mut stream, &mut out, &shard, &mut deferred).await;
                return close_lingering(&mut stream, &shard).await;
            }
            PreLogin::Register {
                request_id,
                username,
                password,
            } => Err('register: {
                if !config.registration {
                    break 'register ServerFrame::error(
                        request_id,
                        ErrorCode::Forbidden,
                        "registration is closed on this server",
                    );
                }
                // Metered before argon2 runs, like logins: a flood of
                // registrations costs neither hashing nor accounts.
                if let Err(wait) = limits::registration_allowed(&config, peer) {
                    break 'register rate_limited(
                        request_id,
                        "too many registrations from this address",
                        wait,
                    );
                }
                match shard
                    .blocking(move |store| store.register(&username, &password))
                    .await
                {
                    Ok(user) => ServerFrame {
                        request_id,
                        body: ServerBody::Registered { user },
                    },
                    Err(e) => store_error_frame(request_id, &e),
                }
            }),
            PreLogin::Login {
                request_id,
                username,
                password,
            } => 'login: {
                // Refused before argon2 runs: a guessing flood costs no CPU.
                // The check counts against the back-off until its outcome
                // is recorded, at the end of this block.
                let _attempt = match limits::login_allowed(&config, peer, Some(&username)) {
                    Ok(attempt) => attempt,
                    Err(wait) => break 'login Err(rate_limited(request_id, "too many failed logins", wait)),
                };
                let account = username.clone();
                let revocations = shard.store.revocations();
                let login = shard
                    .blocking(move |store| {
                        let (user, token) = store.login(&username, &password)?;
                        Ok((user, username, token.to_vec()))
                    })
                    .await;
                match login {
                    Ok((user, username, token)) => {
                        limits::login_succeeded(&username);
                        Ok(LoggedIn::new(
                            user,
                            username,
                            token,
                            request_id,
                            revocations,
                            true,
                        ))
                    }
                    Err(e) => Err(refused_login(&shard, peer, Some(&account), request_id, &e)),
                }
            }
            PreLogin::LoginToken { request_id, token } => 'login: {
                if let Err(wait) = limits::login_allowed(&config, peer, None) {
                    break 'login Err(rate_limited(request_id, "too many failed logins", wait));
                }
                // A reconnect with a token this server verified before is
                // answered from memory on this thread; only a miss costs a
                // hand-off to the blocking pool (two context switches on a
                // shared core) and a store read.
                let revocations = shard.store.revocations();
                let login = match shard.store.cached_token_login(&token) {
                    Some((user, username)) => Ok((user, username, token)),
                    None => {
                        shard
                            .blocking(move |store| {
                                let (user, username) = store.token_login(&token)?;
                                Ok((user, username, token))
                            })
                            .await
                    }
                };
                match login {
                    Ok((user, username, token)) => Ok(LoggedIn::new(
                        user,
                        username,
                        token,
                        request_id,
                        revocations,
                        false,
                    )),
                    Err(e) => Err(refused_login(&shard, peer, None, request_id, &e)),
                }
            }
            PreLogin::LoginJwt { request_id, token } => 'login: {
                let Some(verifier) = config.jwt.clone() else {
                    shard.m().login(false);
                    break 'login Err(ServerFrame::error(
                        request_id,
                        ErrorCode::AuthFailed,
                        "this server does not accept JWT logins",
                    ));
                };
                if let Err(wait) = limits::login_allowed(&config, peer, None) {
                    break 'login Err(rate_limited(request_id, "too many failed logins", wait));
                }
                let revocations = shard.store.revocations();
                let login = shard
                    .blocking(move |store| {
                        let claims = match verifier.verify(&token) {
                            Ok(claims) => claims,
                            Err(refused) => return Ok(Err(refused)),
                        };
                        let outcome =
                            store.external_login(&claims.username, claims.issued_at_ms, verifier.policy)?;
                        Ok(match outcome {
                            ExternalLogin::LoggedIn { user, token, created } => {
                                Ok((claims.username, user, token, created))
                            }
                            ExternalLogin::NoAccount => {
                                Err(JwtRefusal::signed("no account has the JWT's sub"))
                            }
                            ExternalLogin::PasswordAccount => Err(JwtRefusal::signed(
                                "the JWT's sub names a password account, which JWT logins may not use here",
                            )),
                            ExternalLogin::IssuedBeforeRevocation => Err(JwtRefusal::signed(
                                "JWT issued before the account's sessions were revoked (iat)",
                            )),
                        })
                    })
                    .await;
                match login {
                    Ok(Ok((username, user, token, created))) => {
                        if created {
                            tracing::info!(user, username = %username, "account created by a JWT login");
                        }
                        Ok(LoggedIn::new(
                            user,
                            username,
                            token.to_vec(),
                            request_id,
                            revocations,
                            true,
                        ))
                    }
                    Ok(Err(refused)) => {
                        shard.m().login(false);
                        // Only tokens the server could not verify count
                        // as guesses; see `JwtRefusal::signed`.
                        if !refused.signed {
                            limits::login_failed(&config, peer, None);
                        }
                        Err(ServerFrame::error(request_id, ErrorCode::AuthFailed, refused.why))
                    }
                    Err(e) => Err(refused_login(&shard, peer, None, request_id, &e)),
                }
            }
        };
        let reply = match answer {
            Ok(mut login) => {
                shard.m().login(true);
                session.logged_in(login.user);
                login.answered = std::mem::take(&mut deferred);
                return move_to_home(shard, stream, buf, login, guards).await;
            }
            Err(frame) => frame,
        };
        deferred.push(reply);
        let more = buf.buffered() > 0 && deferred.len() < DEFERRED_MAX;
        if !more
            && write_frames(&mut stream, &mut out, &shard, &mut deferred)
                .await
                .is_err()
        {
            return;
        }
    }
}

/// Most pre-login answers held back for one write (see `deferred` in
/// [`serve`]): enough for Hello + LoginToken + Sync with room to spare,
/// few enough that a client pipelining pings cannot make a large batch.
const DEFERRED_MAX: usize = 8;

/// How many of a `Sync`'s cursors cost one message of the connection's
/// message rate (each cursor is a receipt write on the node's one storage
/// writer): a resume with 1,000 conversations costs 16, and a client
/// cannot make the writer store thousands of cursors per frame at the
/// frame rate.
const SYNC_CURSORS_PER_MESSAGE: u64 = 64;

/// Writes `frames` (in order) in one write and empties it.
async fn write_frames(
    stream: &mut Transport,
    out: &mut AlignedVec,
    shard: &Shard,
    frames: &mut Vec<ServerFrame>,
) -> io::Result<()> {
    out.clear();
    let count = frames.len() as u64;
    for frame in frames.drain(..) {
        encode_server(&frame, out, shard.config.max_frame_bytes).map_err(io::Error::other)?;
        if let ServerBody::Error { code, .. } | ServerBody::Disconnect { code, .. } = &frame.body {
            shard.m().error(*code);
        }
    }
    shard.m().frames_out(count, out.len());
    write_batch(stream, out).await
}

/// What ended a pre-login wait.
enum PreLoginWake {
    Read(Result<Filled, ReadError>),
    Stop,
    Deadline,
}

/// Closes a connection refused at accept: plain TCP gets a `Disconnect`
/// first (one small write into an empty socket buffer), TLS nothing, since
/// a handshake is what the refusal saves.
async fn refuse_connection(shard: &Shard, tcp: TcpStream, tls: bool, refused: Refused) {
    tracing::debug!(code = %refused.code, "connection refused at accept");
    if tls {
        shard.m().error(refused.code);
        return;
    }
    let _ = tcp.set_write_timeout(Some(Duration::from_millis(100)));
    let mut stream = Transport::Plain(tcp);
    let mut out = AlignedVec::new();
    let bye = disconnect(refused.code, refused.message, refused.retry_after_ms);
    reply_and_drop(&mut stream, &mut out, shard, &bye).await;
}

/// The answer to a refused login; wrong credentials count towards the
/// address's (and the account's) backoff.
fn refused_login(
    shard: &Shard,
    peer: Option<std::net::IpAddr>,
    account: Option<&str>,
    request_id: u64,
    e: &tern_storage::StoreError,
) -> ServerFrame {
    shard.m().login(false);
    if matches!(e, tern_storage::StoreError::AuthFailed) {
        limits::login_failed(&shard.config, peer, account);
    }
    store_error_frame(request_id, e)
}

/// Parses the next buffered frame of a connection that has not logged in;
/// `None` when no complete frame is buffered.
fn next_pre_login(
    buf: &mut FrameBuf,
    session: &mut Session,
    limiter: &mut ConnLimiter,
    shard: &Shard,
) -> Option<PreLogin> {
    let body = match buf.next_body() {
        Ok(Some(body)) => {
            shard.m().frame_in(body.len() + tern_proto::HEADER_LEN);
            body
        }
        Ok(None) => return None,
        Err(e) => return Some(PreLogin::ReplyAndClose(frame_error_reply(&e))),
    };
    let frame = match decode_client(body) {
        Ok(frame) => frame,
        Err(e) => return Some(PreLogin::ReplyAndClose(frame_error_reply(&e))),
    };
    let request_id = frame.request_id.to_native();
    if let Some(refused) = metered(limiter, request_id, false) {
        return Some(refused);
    }
    if let Err(refusal) = session.admit(now_ms(), &frame.body) {
        let reply = error(request_id, &refusal);
        return Some(if refusal.close {
            PreLogin::ReplyAndClose(reply)
        } else {
            PreLogin::Reply(reply)
        });
    }
    let action = match &frame.body {
        ArchivedClientBody::Hello { .. } => {
            session.hello_accepted();
            PreLogin::Reply(ServerFrame {
                request_id,
                body: ServerBody::HelloOk {
                    version: PROTOCOL_VERSION,
                    max_frame_bytes: shard.config.max_frame_bytes,
                    idle_timeout_ms: shard.config.idle_timeout.as_millis().min(u32::MAX as u128) as u32,
                },
            })
        }
        ArchivedClientBody::Ping { nonce } => PreLogin::Reply(ServerFrame {
            request_id,
            body: ServerBody::Pong {
                nonce: nonce.to_native(),
            },
        }),
        ArchivedClientBody::Register { username, password } => PreLogin::Register {
            request_id,
            username: username.as_str().to_owned(),
            password: password.as_slice().to_vec(),
        },
        ArchivedClientBody::Login { username, password } => PreLogin::Login {
            request_id,
            username: username.as_str().to_owned(),
            password: password.as_slice().to_vec(),
        },
        ArchivedClientBody::LoginToken { token } => PreLogin::LoginToken {
            request_id,
            token: token.as_slice().to_vec(),
        },
        ArchivedClientBody::LoginJwt { token } => PreLogin::LoginJwt {
            request_id,
            token: token.as_str().to_owned(),
        },
        // `admit` refuses everything else before login.
        _ => PreLogin::Reply(ServerFrame::error(
            request_id,
            ErrorCode::InvalidState,
            "log in first",
        )),
    };
    Some(action)
}

async fn write_frame(
    stream: &mut Transport,
    out: &mut AlignedVec,
    shard: &Shard,
    frame: &ServerFrame,
) -> io::Result<()> {
    out.clear();
    encode_server(frame, out, shard.config.max_frame_bytes).map_err(io::Error::other)?;
    shard.m().frames_out(1, out.len());
    if let ServerBody::Error { code, .. } | ServerBody::Disconnect { code, .. } = &frame.body {
        shard.m().error(*code);
    }
    write_batch(stream, out).await
}

async fn reply_and_close(stream: &mut Transport, out: &mut AlignedVec, shard: &Shard, frame: &ServerFrame) {
    let _ = write_frame(stream, out, shard, frame).await;
    close_lingering(stream, shard).await;
}

/// Closes a connection the server ends first without resetting it: our
/// direction ends after everything written, then what the peer still
/// sends (frames pipelined behind the one refused) is read and dropped
/// until it closes too, within [`LINGER_TIME`] and [`LINGER_BYTES`].
async fn close_lingering(stream: &mut Transport, shard: &Shard) {
    stream.close_write().await;
    let _ = stream.tcp().set_read_timeout(Some(LINGER_TIME));
    let fd = stream.as_raw_fd();
    linger_unless_stopping(shard, stream, fd).await;
}

/// Lingers on a closing connection's socket `fd` through `reader`
/// ([`linger`]), but not past the shard's stop: a stopping server waits
/// for the tasks that hold its shard, so what it still lingers on is
/// dropped then, after discarding what has arrived.
async fn linger_unless_stopping<R: futures_lite::AsyncRead + Unpin>(
    shard: &Shard,
    reader: &mut R,
    fd: RawFd,
) {
    let lingered = futures_lite::future::or(
        async { Some(linger(reader, LINGER_TIME, LINGER_BYTES).await) },
        async {
            shard.stop.wait().await;
            None
        },
    )
    .await;
    match lingered {
        Some(lingered) => {
            shard.m().lingered(lingered);
            tracing::trace!(?lingered, "connection closed");
        }
        None => {
            discard_queued(fd, LINGER_BYTES);
        }
    }
}

/// Sends `frame` on a connection refused for a limit (it holds no
/// connection permit), and closes it at once: it may not linger, since it
/// counts against no limit, but what it already sent is discarded first,
/// so that its pipelined first frames do not turn the close into a reset.
async fn reply_and_drop(stream: &mut Transport, out: &mut AlignedVec, shard: &Shard, frame: &ServerFrame) {
    let _ = write_frame(stream, out, shard, frame).await;
    stream.close_write().await;
    discard_queued(stream.as_raw_fd(), LINGER_BYTES);
}

/// Sends `reply` on a connection the shard will not serve, and closes it.
/// With `guards` (its permit) it lingers, still counted; without, it is
/// dropped.
async fn refuse(shard: &Shard, mut stream: Transport, reply: &ServerFrame, guards: Option<Guards>) {
    let mut out = AlignedVec::new();
    match guards {
        Some(guards) => {
            reply_and_close(&mut stream, &mut out, shard, reply).await;
            drop(guards);
        }
        None => reply_and_drop(&mut stream, &mut out, shard, reply).await,
    }
}

async fn close_after_read_error(stream: &mut Transport, out: &mut AlignedVec, shard: &Shard, e: ReadError) {
    let frame = match &e {
        ReadError::Frame(e) => frame_error_reply(e),
        ReadError::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
            shard.m().idle_timeout();
            ServerFrame {
                request_id: 0,
                body: ServerBody::Disconnect {
                    code: ErrorCode::IdleTimeout,
                    message: "no frame within the idle timeout".into(),
                    retry_after_ms: 0,
                },
            }
        }
        _ => return,
    };
    reply_and_close(stream, out, shard, &frame).await;
}

/// A successful login, to be answered on the user's home shard.
struct LoggedIn {
    user: UserId,
    username: String,
    token: Vec<u8>,
    request_id: u64,
    /// Answers to earlier pre-login frames not written yet; they go out
    /// before `LoggedIn`.
    answered: Vec<ServerFrame>,
    /// [`tern_storage::Store::revocations`] before the credentials were
    /// checked.
    revocations: u64,
    /// Whether this login issued `token` (a password or JWT login) rather
    /// than presenting it (`LoginToken`).
    minted: bool,
}

impl LoggedIn {
    /// A login the credentials were just accepted for; `answered` is
    /// filled when it is handed off.
    fn new(
        user: UserId,
        username: String,
        token: Vec<u8>,
        request_id: u64,
        revocations: u64,
        minted: bool,
    ) -> LoggedIn {
        LoggedIn {
            user,
            username,
            token,
            request_id,
            answered: Vec::new(),
            revocations,
            minted,
        }
    }

    /// This login's session will not start, so its `LoggedIn` never
    /// reaches the client: a token it issued is revoked. Otherwise that
    /// token would stay live with nobody holding it, and each refused
    /// login (say, one past `max_sessions_per_user`) would count towards
    /// `max_tokens_per_user`, whose overflow drops a device's saved token.
    async fn abandon(self, shard: &Shard) {
        if !self.minted {
            return;
        }
        let token = self.token;
        if let Err(e) = shard.blocking(move |store| store.revoke_token(&token)).await {
            tracing::warn!(error = %e, "cannot revoke the token of a login that was refused");
        }
    }

    /// Refuses this login with `reply` and closes, once a token it issued
    /// is revoked: a client that retries on the answer cannot have its
    /// next login issued while this token still counts. The answers held
    /// back for the login (a pipelined `Hello`'s `HelloOk`) go out first:
    /// every request gets its answer.
    fn refuse(mut self, shard: Rc<Shard>, mut stream: Transport, reply: ServerFrame, guards: Option<Guards>) {
        glommio::spawn_local(async move {
            let mut answered = std::mem::take(&mut self.answered);
            self.abandon(&shard).await;
            if !answered.is_empty() {
                let mut out = AlignedVec::new();
                if write_frames(&mut stream, &mut out, &shard, &mut answered)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            refuse(&shard, stream, &reply, guards).await;
        })
        .detach();
    }
}

/// Continues a logged-in connection on its user's home shard.
///
/// The session runs in a task of its own, so the pre-login task (and its
/// larger future) is freed once the user is known: a connection costs only
/// what its session needs for the rest of its life.
async fn move_to_home(
    shard: Rc<Shard>,
    mut stream: Transport,
    mut buf: FrameBuf,
    mut login: LoggedIn,
    guards: Guards,
) {
    let home = shard.home_of(login.user);
    if home == shard.index {
        return start_session(shard, stream, buf, login, guards);
    }
    // Written here rather than carried along: the other shard answers
    // only the login.
    if !login.answered.is_empty() {
        let mut out = AlignedVec::new();
        if write_frames(&mut stream, &mut out, &shard, &mut login.answered)
            .await
            .is_err()
        {
            return login.abandon(&shard).await;
        }
    }
    // Uncounted here (the guards go with this task); the home shard
    // counts the socket when it adopts it.
    drop(guards);
    let leftover = buf.take_buffered();
    let transport = match stream.into_parts() {
        Ok(parts) => parts,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand a connection to its home shard");
            return login.abandon(&shard).await;
        }
    };
    let handoff = Handoff {
        transport,
        user: login.user,
        username: login.username,
        token: login.token,
        request_id: login.request_id,
        leftover,
        revocations: login.revocations,
        minted: login.minted,
    };
    shard.send_event(home, Event::Handoff(Box::new(handoff))).await;
}

/// Takes over a connection handed to this shard: its session starts in a
/// task of its own (see [`move_to_home`]).
pub fn adopt(shard: Rc<Shard>, handoff: Handoff) {
    let stream = Transport::from_parts(handoff.transport);
    let peer = stream.tcp().peer_addr().ok().map(|addr| addr.ip());
    // The home shard owns the socket from now on, so it counts it against
    // its address here (the accepting shard has uncounted it).
    let login = LoggedIn {
        user: handoff.user,
        username: handoff.username,
        token: handoff.token,
        request_id: handoff.request_id,
        answered: Vec::new(),
        revocations: handoff.revocations,
        minted: handoff.minted,
    };
    let permit = match limits::adopt_connection(&shard.config, peer) {
        Ok(permit) => permit,
        Err(refused) => {
            let reply = ServerFrame::error(login.request_id, refused.code, refused.message);
            return login.refuse(shard, stream, reply, None);
        }
    };
    shard.m().connection_adopted();
    let guards = Guards {
        _permit: permit,
        _open: OpenConnection { shard: shard.clone() },
    };
    configure(stream.tcp(), &shard);
    let mut buf = FrameBuf::new(shard.config.max_frame_bytes);
    buf.push_bytes(&handoff.leftover);
    start_session(shard, stream, buf, login, guards);
}

/// Checks again, on the blocking pool, the token of a login that a
/// revocation may have overtaken (see [`tern_storage::Store::revocations`]),
/// then starts its session or refuses it.
fn recheck_then_start(
    shard: Rc<Shard>,
    stream: Transport,
    buf: FrameBuf,
    mut login: LoggedIn,
    guards: Guards,
) {
    glommio::spawn_local(async move {
        login.revocations = shard.store.revocations();
        let token = login.token.clone();
        let owner = shard.blocking(move |store| store.verify_token(&token)).await;
        if owner.is_ok_and(|owner| owner == login.user) {
            start_session(shard, stream, buf, login, guards);
        } else {
            let reply = ServerFrame::error(
                login.request_id,
                ErrorCode::AuthFailed,
                "this session's token was revoked while it logged in",
            );
            // Also revokes a token this login issued: when the check
            // failed on a store error rather than a revocation, that
            // token is still live and would never reach its client.
            login.refuse(shard, stream, reply, Some(guards));
        }
    })
    .detach();
}

/// Registers an authenticated session on its user's home shard, queues
/// its `LoggedIn` and starts it (see [`run_session`]).
fn start_session(shard: Rc<Shard>, stream: Transport, buf: FrameBuf, login: LoggedIn, guards: Guards) {
    // Compared with no yield before the session is registered: a kick that
    // follows a revocation either finds the session here or was preceded
    // by a change of the count.
    if shard.store.revocations() != login.revocations {
        return recheck_then_start(shard, stream, buf, login, guards);
    }
    let config = shard.config.clone();
    let user = login.user;
    let outbox = new_outbox(&shard);
    let fd = stream.as_raw_fd();
    let token = SessionToken::new(&login.token, !login.minted);
    let (key, first_session) = match shard.add_conn(user, fd, outbox.clone(), token) {
        Ok(added) => added,
        Err(refusal) => {
            let reply = error(login.request_id, &refusal);
            return login.refuse(shard, stream, reply, Some(guards));
        }
    };
    shard.m().session_opened();
    tracing::debug!(user, shard = shard.index, "session opened");
    let peer = stream.tcp().peer_addr().ok().map(|addr| addr.ip());
    // Kept for `Logout`; a token that verified has exactly this length.
    let token = <[u8; TOKEN_LEN]>::try_from(login.token.as_slice()).unwrap_or([0; TOKEN_LEN]);
    let logged_in = ServerFrame {
        request_id: login.request_id,
        body: ServerBody::LoggedIn {
            user,
            username: login.username,
            token: login.token,
        },
    };
    for answer in &login.answered {
        let _ = outbox.push(answer);
    }
    let _ = outbox.push(&logged_in);
    if first_session {
        shard.presence_changed(user);
    }
    let idle_ms = config.idle_timeout.as_millis() as u64;
    let session = Session::authenticated(user, now_ms(), idle_ms, config.content_limits());
    let mut limiter = ConnLimiter::new(&config.limits, peer);
    limiter.resume_messages(user);
    let conn = Conn {
        shard,
        user,
        token,
        peer,
        key,
        outbox,
        session,
        limiter,
        filter: FilterCache::default(),
    };
    run_session(conn, stream, buf, guards);
}

/// A session's outbound queue, counting into `shard`'s metrics.
pub fn new_outbox(shard: &Shard) -> Rc<Outbox> {
    Rc::new(Outbox::with_metrics(
        shard.config.outbound_queue_bytes,
        shard.config.max_frame_bytes,
        shard.metrics().clone(),
        shard.index,
    ))
}

/// Starts a session's reader and writer tasks. Synchronous setup, then
/// small tasks: the reader's future is what an idle connection keeps until
/// it parks, so it holds only the session's state.
fn run_session(conn: Conn, stream: Transport, buf: FrameBuf, guards: Guards) {
    let config = &conn.shard.config;
    let _ = stream.tcp().set_write_timeout(Some(config.write_timeout));
    let _ = stream.tcp().set_read_timeout(Some(conn.read_timeout()));
    let (reader, writer) = split(stream);
    let writer = glommio::spawn_local(write_loop(writer, conn.outbox.clone()));
    glommio::spawn_local(serve_session(conn, reader, buf, writer, guards)).detach();
}

/// Why a session's read loop returned.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    /// The connection is closing.
    Closed,
    /// Nothing arrived within the read timeout, short of the idle timeout:
    /// the session may park.
    Quiet,
}

/// Reads and serves a session's frames until it closes or parks, then
/// cleans up if it closed.
///
/// Not an `async fn`: that would move its arguments into locals, and a
/// future keeps room for both the arguments and the locals. The block
/// below uses its captures in place.
#[allow(clippy::manual_async_fn)]
fn serve_session(
    mut conn: Conn,
    mut reader: ReadHalf<Transport>,
    mut buf: FrameBuf,
    writer: glommio::Task<Option<WriteHalf<Transport>>>,
    mut guards: Guards,
) -> impl std::future::Future<Output = ()> {
    async move {
        let mut writer = Some(writer);
        while conn.read_loop(&mut reader, &mut buf).await == ReadEnd::Quiet {
            let may_park = buf.buffered() == 0 && conn.shard.park_set().is_some();
            if !may_park || !conn.outbox.request_park() {
                conn.keep_reading(&reader);
                continue;
            }
            // The writer stops once the queue is drained; if it closed the
            // connection instead (a write failed, or a kick), so do we.
            let Some(task) = writer.take() else { break };
            let Some(write_half) = task.await else { break };
            let (stream, parked) = match reader.reunite(write_half) {
                // Something was queued while the writer stopped: stay live.
                Ok(stream) if !conn.outbox.is_idle() => (stream, false),
                Ok(stream) => match park(conn, stream, guards) {
                    Ok(()) => return,
                    Err((back, stream, back_guards)) => {
                        (conn, guards) = (back, back_guards);
                        (stream, true)
                    }
                },
                // Unreachable: both halves come from one split.
                Err((read_half, write_half)) => {
                    reader = read_half;
                    writer = Some(glommio::spawn_local(write_loop(write_half, conn.outbox.clone())));
                    conn.outbox.cancel_park();
                    continue;
                }
            };
            tracing::trace!(user = conn.user, tried = parked, "session stays live");
            conn.outbox.cancel_park();
            let (read_half, write_half) = split(stream);
            reader = read_half;
            writer = Some(glommio::spawn_local(write_loop(write_half, conn.outbox.clone())));
            conn.keep_reading(&reader);
        }
        conn.outbox.close();
        if let Some(writer) = writer {
            writer.await;
        }
        let last_session = conn.shard.remove_conn(conn.key);
        conn.limiter
            .leave_messages(&conn.shard.config.limits, conn.user, limits::monotonic_us());
        conn.shard.m().session_closed();
        tracing::debug!(user = conn.user, shard = conn.shard.index, "session closed");
        if last_session {
            conn.shard.presence_changed(conn.user);
        }
        // The session is gone; its socket lingers until the peer closes
        // too (the guards, held meanwhile, keep counting it against the
        // connection limits). Boxed: every live session's future would
        // otherwise keep room for it.
        let fd = reader.with_stream(|stream| {
            let _ = stream.tcp().set_read_timeout(Some(LINGER_TIME));
            stream.as_raw_fd()
        });
        Box::pin(linger_unless_stopping(&conn.shard, &mut reader, fd)).await;
        drop((reader, guards));
    }
}

/// Writes whatever the outbox holds, batch by batch. When the outbox
/// closes, ends the socket's writing direction (the reader, woken by the
/// same close, lingers on the other) and returns `None`; when its session
/// parks, returns its half of the socket intact.
async fn write_loop<S: AsyncWrite + AsRawFd + Unpin>(
    mut writer: WriteHalf<S>,
    outbox: Rc<Outbox>,
) -> Option<WriteHalf<S>> {
    let mut batch = AlignedVec::new();
    loop {
        match outbox.next_batch(&mut batch).await {
            Next::Write => {}
            Next::Park => return Some(writer),
            Next::Closed => break,
        }
        if write_batch(&mut writer, &batch).await.is_err() {
            outbox.close();
            break;
        }
        batch.clear();
        if batch.capacity() > 64 * 1024 {
            batch = AlignedVec::new();
        }
    }
    // A TLS close_notify (bounded by the write timeout), then a shutdown of
    // writing: the peer gets everything written, then a FIN. Reading stays
    // open: the reader, woken by the closing queue (`Outbox::closing`),
    // lingers on what the peer still sends (see `serve_session`), since a
    // socket whose reading is shut down answers more input with a reset.
    let _ = writer.close().await;
    let fd = writer.with_stream(|s| s.as_raw_fd());
    // Again, in case the close_notify failed before its shutdown.
    // SAFETY: shutdown has no memory effects; the descriptor is still owned
    // by the stream, which outlives this call.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    None
}

/// A session parked while idle (see [`crate::park`]): everything it needs
/// to resume, held in its shard's connection table instead of in tasks.
pub struct Parked {
    shard: Rc<Shard>,
    socket: ParkedSocket,
    user: UserId,
    token: [u8; TOKEN_LEN],
    peer: Option<IpAddr>,
    key: ConnKey,
    session: Session,
    limiter: ConnLimiter,
    filter: FilterCache,
    guards: Guards,
}

/// A parked session's socket. TLS state is large and boxed, so that plain
/// connections do not reserve room for it.
enum ParkedSocket {
    Plain(DetachedSocket),
    Tls(Box<DetachedTransport>),
}

impl Parked {
    /// The shard the session belongs to.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// When the session passes its idle timeout.
    pub fn idle_deadline_ms(&self) -> u64 {
        self.session.idle_deadline_ms()
    }

    fn fd(&self) -> RawFd {
        match &self.socket {
            ParkedSocket::Plain(socket) => socket.as_raw_fd(),
            ParkedSocket::Tls(parts) => parts.socket.as_raw_fd(),
        }
    }

    /// Back on this executor, as a live session's parts.
    fn into_live(self, outbox: Rc<Outbox>) -> (Conn, Transport, Guards) {
        let parts = match self.socket {
            ParkedSocket::Plain(socket) => DetachedTransport { socket, tls: None },
            ParkedSocket::Tls(parts) => *parts,
        };
        let conn = Conn {
            shard: self.shard,
            user: self.user,
            token: self.token,
            peer: self.peer,
            key: self.key,
            outbox,
            session: self.session,
            limiter: self.limiter,
            filter: self.filter,
        };
        (conn, Transport::from_parts(parts), self.guards)
    }
}

/// Parks a quiet session, whose writer has stopped: its socket leaves
/// glommio for the shard's epoll set and its state waits in the shard's
/// connection table, so no task, buffer or pending read is left. Gives
/// everything back if the session cannot park.
// The error hands the live session back; it is consumed at once, never
// held across an await, so it adds nothing to the session future.
#[allow(clippy::result_large_err)]
fn park(conn: Conn, stream: Transport, guards: Guards) -> Result<(), (Conn, Transport, Guards)> {
    let parts = match stream.try_into_parts() {
        Ok(parts) => parts,
        Err((e, stream)) => {
            tracing::debug!(error = %e, "cannot detach a session's socket to park it");
            return Err((conn, stream, guards));
        }
    };
    let socket = match parts.tls {
        None => ParkedSocket::Plain(parts.socket),
        Some(tls) => ParkedSocket::Tls(Box::new(DetachedTransport {
            socket: parts.socket,
            tls: Some(tls),
        })),
    };
    let Conn {
        shard,
        user,
        token,
        peer,
        key,
        outbox,
        session,
        limiter,
        filter,
    } = conn;
    let parked = Box::new(Parked {
        shard: shard.clone(),
        socket,
        user,
        token,
        peer,
        key,
        session,
        limiter,
        filter,
        guards,
    });
    let fd = parked.fd();
    shard
        .park(key, fd, parked)
        .map_err(|parked| parked.into_live(outbox))
}

/// What a parked session's wake-up held.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Nothing (a spurious wake-up) or only heartbeats, answered: the
    /// session stays parked.
    Answered,
    /// Something only the live session can serve: a request, part of a
    /// frame, a frame the meters refuse, the client's close. Resume it, and
    /// queue `unsent` (plain-TCP answers that did not fit the socket)
    /// before anything else.
    Resume { unsent: Vec<u8> },
}

/// Bytes of a parked session's socket looked at for heartbeats: a few
/// `Ping`s. Anything longer is left to the live session.
const PARKED_PEEK_BYTES: usize = 256;

/// Frame bodies are validated in place, so they must be aligned.
#[repr(align(16))]
struct PeekBuf([u8; PARKED_PEEK_BYTES]);

thread_local! {
    /// The shard's reused buffer for answers to parked sessions' pings.
    static PONGS: RefCell<AlignedVec> = RefCell::new(AlignedVec::new());
}

/// Answers a parked session's heartbeats in place, so that the most common
/// wake-up of an idle session (its client's `Ping`) costs a few syscalls
/// and no resume and park (two task spawns, a `dup`, two epoll changes).
/// Only when every byte waiting is a whole `Ping` that the meters and the
/// session admit, checked on copies before anything is taken; otherwise
/// the session resumes with nothing lost: plain TCP leaves the bytes on the
/// socket, TLS leaves the decrypted ones in the session, where the live
/// stream reads them first.
pub fn answer_while_parked(parked: &mut Parked) -> Heard {
    match &parked.socket {
        ParkedSocket::Plain(socket) => {
            let fd = socket.as_raw_fd();
            answer_plain_while_parked(parked, fd)
        }
        ParkedSocket::Tls(_) => answer_tls_while_parked(parked),
    }
}

fn answer_plain_while_parked(parked: &mut Parked, fd: std::os::fd::RawFd) -> Heard {
    let resume = Heard::Resume { unsent: Vec::new() };
    let mut peek = PeekBuf([0; PARKED_PEEK_BYTES]);
    // SAFETY: the buffer is valid for its length; MSG_PEEK leaves the
    // bytes queued on the socket.
    let peeked = unsafe {
        libc::recv(
            fd,
            peek.0.as_mut_ptr().cast(),
            PARKED_PEEK_BYTES,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let Ok(peeked) = usize::try_from(peeked) else {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::WouldBlock {
            Heard::Answered
        } else {
            resume
        };
    };
    // Zero bytes: the client closed; the live session sees it too.
    let Some(bytes) = peek.0.get(..peeked).filter(|b| !b.is_empty()) else {
        return resume;
    };
    let shard = parked.shard.clone();
    let mut limiter = parked.limiter.clone();
    let mut session = parked.session.clone();
    PONGS.with(|pongs| {
        let mut pongs = pongs.borrow_mut();
        pongs.clear();
        let Some(pings) = answer_pings(&shard, bytes, &mut limiter, &mut session, &mut pongs) else {
            return resume;
        };
        // SAFETY: with MSG_TRUNC a TCP socket discards the bytes without
        // writing anywhere. This takes exactly the pings just peeked at,
        // which nothing else reads while the session is parked.
        let taken = unsafe {
            libc::recv(
                fd,
                std::ptr::null_mut(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        debug_assert_eq!(usize::try_from(taken).ok(), Some(bytes.len()));
        parked.limiter = limiter;
        parked.session = session;
        shard.m().frames_in(pings, bytes.len());
        shard.m().frames_out(pings, pongs.len());
        shard.m().parked_pings_answered(pings);
        // SAFETY: the buffer is valid for its length.
        let sent = unsafe {
            libc::send(
                fd,
                pongs.as_ptr().cast(),
                pongs.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        let sent = usize::try_from(sent).unwrap_or(0);
        match pongs.get(sent..) {
            Some([]) => Heard::Answered,
            rest => Heard::Resume {
                unsent: rest.unwrap_or_default().to_vec(),
            },
        }
    })
}

/// The TLS side of [`answer_while_parked`]: one read into the session's
/// rustls state, then record by record (a client's heartbeat is one record)
/// each decrypted chunk that is nothing but admitted `Ping`s is taken and
/// answered; the first other chunk stops the walk and resumes the session,
/// which reads it from the TLS state.
fn answer_tls_while_parked(parked: &mut Parked) -> Heard {
    let resume = Heard::Resume { unsent: Vec::new() };
    let ParkedSocket::Tls(transport) = &mut parked.socket else {
        return resume;
    };
    let fd = transport.socket.as_raw_fd();
    let Some(tls) = transport.tls.as_mut() else {
        return resume;
    };
    match tls.recv_detached(fd) {
        // The client closed: the live session sees it too.
        Ok(0) => return resume,
        Ok(_) => {}
        // Nothing new; nothing can be buffered either, as a parked
        // session's plaintext is always empty or resumed on.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Heard::Answered,
        // A bad record: the live session reads the same error and closes.
        Err(_) => return resume,
    }
    let shard = parked.shard.clone();
    let mut pings = 0u64;
    let mut ping_bytes = 0usize;
    let mut rest_is_pings = true;
    PONGS.with(|pongs| {
        let mut pongs = pongs.borrow_mut();
        pongs.clear();
        loop {
            let chunk = match tls.first_plaintext() {
                Ok(chunk) if !chunk.is_empty() => chunk,
                // Nothing more decrypted yet.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The client's close_notify (or a close without one): the
                // live session reads the end and closes.
                Ok(_) | Err(_) => {
                    rest_is_pings = false;
                    break;
                }
            };
            // Bodies are validated in place, so the chunk is copied to an
            // aligned buffer; a chunk too long for it is no heartbeat.
            let mut copy = PeekBuf([0; PARKED_PEEK_BYTES]);
            let Some(slot) = copy.0.get_mut(..chunk.len()) else {
                rest_is_pings = false;
                break;
            };
            slot.copy_from_slice(chunk);
            let len = chunk.len();
            let mut limiter = parked.limiter.clone();
            let mut session = parked.session.clone();
            let answered = pongs.len();
            let Some(n) = answer_pings(&shard, &copy.0[..len], &mut limiter, &mut session, &mut pongs) else {
                pongs.resize(answered, 0); // shrinking: drops the partial answers
                rest_is_pings = false;
                break;
            };
            tls.consume_plaintext(len);
            parked.limiter = limiter;
            parked.session = session;
            pings += n;
            ping_bytes += len;
        }
        if pings > 0 {
            shard.m().frames_in(pings, ping_bytes);
            shard.m().frames_out(pings, pongs.len());
            shard.m().parked_pings_answered(pings);
        }
        // Also sends what reading queued (a key-update reply, say).
        match tls.send_detached(fd, &pongs) {
            Ok(true) if rest_is_pings => Heard::Answered,
            // Not all sent, or a request waits: the live session goes on,
            // sending what is queued in the TLS state first.
            Ok(_) | Err(_) => resume,
        }
    })
}

/// Appends to `pongs` the answers to `bytes` when it holds nothing but
/// whole `Ping`s that `limiter` and `session` admit, charging both, and
/// returns how many; `None` otherwise, with `limiter`, `session` and
/// `pongs` possibly changed (callers pass copies and cut `pongs` back).
fn answer_pings(
    shard: &Shard,
    bytes: &[u8],
    limiter: &mut ConnLimiter,
    session: &mut Session,
    pongs: &mut AlignedVec,
) -> Option<u64> {
    let max_body = shard.config.max_frame_bytes;
    let (now, now_us) = (now_ms(), limits::monotonic_us());
    let mut offset = 0;
    let mut pings = 0u64;
    while offset < bytes.len() {
        let mut raw = [0u8; tern_proto::HEADER_LEN];
        raw.copy_from_slice(bytes.get(offset..offset + tern_proto::HEADER_LEN)?);
        let header = tern_proto::FrameHeader::parse(raw, max_body).ok()?;
        let body_start = offset + tern_proto::HEADER_LEN;
        let end = offset + header.frame_len();
        if end > bytes.len() {
            return None;
        }
        let body = bytes.get(body_start..body_start + header.body_len as usize)?;
        let frame = decode_client(body).ok()?;
        let ArchivedClientBody::Ping { nonce } = &frame.body else {
            return None;
        };
        if limiter.check(false, now_us) != Verdict::Allow || session.admit(now, &frame.body).is_err() {
            return None;
        }
        let pong = ServerFrame {
            request_id: frame.request_id.to_native(),
            body: ServerBody::Pong {
                nonce: nonce.to_native(),
            },
        };
        encode_server(&pong, pongs, max_body).ok()?;
        pings += 1;
        offset = end;
    }
    Some(pings)
}

/// Resumes a parked session with the outbox its shard entry now holds:
/// its tasks start again and read whatever woke it.
pub fn resume(parked: Parked, outbox: Rc<Outbox>) {
    if let Some(set) = parked.shard.park_set() {
        set.unwatch(parked.fd());
    }
    parked.shard.m().session_resumed();
    let max_frame_bytes = parked.shard.config.max_frame_bytes;
    let (conn, stream, guards) = parked.into_live(outbox);
    run_session(conn, stream, FrameBuf::new(max_frame_bytes), guards);
}

/// The reading side of an authenticated session.
struct Conn {
    shard: Rc<Shard>,
    user: UserId,
    /// The token this session logged in with (or was issued), for `Logout`.
    token: [u8; TOKEN_LEN],
    peer: Option<IpAddr>,
    key: ConnKey,
    outbox: Rc<Outbox>,
    session: Session,
    limiter: ConnLimiter,
    filter: FilterCache,
}

impl Conn {
    async fn read_loop(&mut self, reader: &mut ReadHalf<Transport>, buf: &mut FrameBuf) -> ReadEnd {
        // Whether the last read was the one more read of a session found
        // past its idle deadline, and whether a whole frame was taken since
        // that read: see the check before `fill_shared`.
        let mut rescued = false;
        let mut served = false;
        loop {
            loop {
                let body = match buf.next_body() {
                    Ok(Some(body)) => {
                        self.shard.m().frame_in(body.len() + tern_proto::HEADER_LEN);
                        served = true;
                        body
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.close_with(&frame_error_reply(&e));
                        return ReadEnd::Closed;
                    }
                };
                let frame = match decode_client(body) {
                    Ok(frame) => frame,
                    Err(e) => {
                        self.close_with(&frame_error_reply(&e));
                        return ReadEnd::Closed;
                    }
                };
                let request_id = frame.request_id.to_native();
                // Typing hints share the message rate: as frequent, and
                // each fans out like one. So do 1:1 receipts, each a store
                // write and a push to the peer (group receipts push nothing),
                // and the rare requests that are each a synced write or a
                // read of many keys (a membership change also rebuilds the
                // group's cached roster): a client needs them now and then,
                // and must not repeat them at the frame rate.
                let is_message = matches!(
                    frame.body,
                    ArchivedClientBody::SendDirect { .. }
                        | ArchivedClientBody::SendGroup { .. }
                        | ArchivedClientBody::Typing { .. }
                        | ArchivedClientBody::Receipt {
                            conv: tern_proto::ArchivedConvId::Direct { .. },
                            ..
                        }
                        | ArchivedClientBody::FriendAdd { .. }
                        | ArchivedClientBody::FriendRemove { .. }
                        | ArchivedClientBody::FriendList
                        | ArchivedClientBody::FriendRequestsPage { .. }
                        | ArchivedClientBody::FriendsPage { .. }
                        | ArchivedClientBody::UserBlock { .. }
                        | ArchivedClientBody::UserUnblock { .. }
                        | ArchivedClientBody::GroupCreate { .. }
                        | ArchivedClientBody::GroupCreateWith { .. }
                        | ArchivedClientBody::GroupDelete { .. }
                        | ArchivedClientBody::GroupJoin { .. }
                        | ArchivedClientBody::GroupLeave { .. }
                        | ArchivedClientBody::GroupKick { .. }
                        | ArchivedClientBody::GroupSetRole { .. }
                        | ArchivedClientBody::GroupTransferOwnership { .. }
                        | ArchivedClientBody::GroupInvite { .. }
                        | ArchivedClientBody::GroupUninvite { .. }
                        | ArchivedClientBody::GroupBan { .. }
                        | ArchivedClientBody::GroupUnban { .. }
                        | ArchivedClientBody::Conversations { .. }
                        // Reads every group of the user and the inbox, and
                        // stores its cursors (charged on top, below).
                        | ArchivedClientBody::Sync { .. }
                );
                match self.limiter.check(is_message, limits::monotonic_us()) {
                    Verdict::Allow => {}
                    Verdict::Refuse { retry_after_ms } => {
                        // Refused, but it arrived: not the silence the idle
                        // timeout is for (protocol.md 2.5).
                        self.session.touch(now_ms());
                        self.push(&rate_limited(request_id, "too many requests", retry_after_ms));
                        continue;
                    }
                    // The verdict's own wait: at least a second, more while
                    // a Sync's cursors are paid off.
                    Verdict::Disconnect { retry_after_ms } => {
                        let message = "too many requests past the rate limit";
                        self.outbox
                            .finish(ErrorCode::RateLimited, message, retry_after_ms);
                        return ReadEnd::Closed;
                    }
                }
                if let Err(refusal) = self.session.admit(now_ms(), &frame.body) {
                    let reply = error(request_id, &refusal);
                    if refusal.close {
                        self.close_with(&reply);
                        return ReadEnd::Closed;
                    }
                    self.push(&reply);
                    continue;
                }
                // Boxed: the session's future, which every idle
                // connection keeps, holds no room for a request in flight.
                Box::pin(self.dispatch(request_id, &frame.body)).await;
                if self.outbox.is_closing() {
                    return ReadEnd::Closed;
                }
            }
            // Only whole frames are activity. A read times out only when no
            // byte comes, so a client trickling a frame it never finishes
            // (or, over TLS, records that carry no plaintext) would never
            // reach the timeout below: its deadline is checked here too.
            // Nothing is read while a request is served, though, and one
            // can take longer than the idle timeout (a catch-up paced to a
            // slow reader, a stalled disk): the client's frames sent
            // meanwhile wait in the socket. So a session found past its
            // deadline reads once more, at once (`keep_reading` sets the
            // shortest wait), and is closed only if that read brings no
            // whole frame. A read that did bring frames may bring
            // another long request too: past it the session gets the same
            // one more read.
            let idle = self.session.is_idle(now_ms());
            if idle && rescued && !served {
                return self.close_idle();
            }
            if idle || rescued {
                // The shortest wait for the one more read, or back to the
                // usual one after it.
                self.keep_reading(reader);
            }
            rescued = idle;
            served = false;
            // A close decided elsewhere (a kick, a slow consumer, shutdown)
            // ends the wait for the peer: the writer shuts down only its
            // own direction, and the session lingers on what still comes.
            let read = futures_lite::future::or(async { Some(fill_shared(reader, buf).await) }, async {
                self.outbox.closing().await;
                None
            })
            .await;
            let Some(read) = read else {
                return ReadEnd::Closed;
            };
            match read {
                Ok(Filled::Bytes(_)) => {}
                Ok(Filled::Eof) => return ReadEnd::Closed,
                Err(ReadError::Frame(e)) => {
                    self.close_with(&frame_error_reply(&e));
                    return ReadEnd::Closed;
                }
                Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                    if now_ms() < self.session.idle_deadline_ms() {
                        return ReadEnd::Quiet;
                    }
                    return self.close_idle();
                }
                Err(_) => return ReadEnd::Closed,
            }
            if self.outbox.is_closing() {
                return ReadEnd::Closed;
            }
        }
    }

    /// Closes a session past its idle deadline with `IdleTimeout`.
    fn close_idle(&self) -> ReadEnd {
        self.shard.m().idle_timeout();
        self.outbox
            .finish(ErrorCode::IdleTimeout, "no frame within the idle timeout", 0);
        ReadEnd::Closed
    }

    /// Goes on reading after a quiet spell that did not end in parking:
    /// the next read waits no longer than the session may stay silent.
    fn keep_reading(&self, reader: &ReadHalf<Transport>) {
        let timeout = self.read_timeout();
        let _ = reader.with_stream(|stream| stream.tcp().set_read_timeout(Some(timeout)));
    }

    /// How long the session's next read may wait: until it should park if
    /// sessions park, and never past its idle deadline.
    fn read_timeout(&self) -> Duration {
        let idle_left = Duration::from_millis(self.session.idle_deadline_ms().saturating_sub(now_ms()));
        let wait = self
            .shard
            .config
            .parks_after()
            .map_or(idle_left, |park| park.min(idle_left));
        // A zero timeout would mean none at all.
        wait.max(Duration::from_millis(1))
    }

    fn push(&self, frame: &ServerFrame) {
        // A refused push means the connection is already closing.
        let _ = self.outbox.push(frame);
    }

    fn close_with(&self, frame: &ServerFrame) {
        self.push(frame);
        self.outbox.close();
    }

    /// Serves one admitted request. Pings and chat messages, which every
    /// connection sends all the time, are served by `dispatch_hot`;
    /// everything else runs boxed, so that the session's future, which
    /// every idle connection keeps, is only as large as the hot path needs.
    async fn dispatch(&mut self, request_id: u64, body: &ArchivedClientBody) {
        match body {
            ArchivedClientBody::Ping { .. }
            | ArchivedClientBody::SendDirect { .. }
            | ArchivedClientBody::SendGroup { .. }
            | ArchivedClientBody::Typing { .. } => self.dispatch_hot(request_id, body).await,
            _ => Box::pin(self.dispatch_cold(request_id, body)).await,
        }
    }

    /// Pings and chat messages.
    async fn dispatch_hot(&mut self, request_id: u64, body: &ArchivedClientBody) {
        let user = self.user;
        let shard = self.shard.clone();
        let reply = match body {
            ArchivedClientBody::Ping { nonce } => ServerFrame {
                request_id,
                body: ServerBody::Pong {
                    nonce: nonce.to_native(),
                },
            },
            ArchivedClientBody::SendDirect {
                to,
                client_msg_id,
                content,
            } => {
                let to = to.to_native();
                if to == user {
                    ServerFrame::error(
                        request_id,
                        ErrorCode::InvalidArgument,
                        "cannot send a message to yourself",
                    )
                } else if !shard.user_live(to) {
                    ServerFrame::error(request_id, ErrorCode::NotFound, "no such user")
                } else {
                    let Ok(mut content) = rkyv::deserialize::<_, BoxedError>(content) else {
                        return self.push(&ServerFrame::error(
                            request_id,
                            ErrorCode::MalformedFrame,
                            "bad content",
                        ));
                    };
                    if let Some(reply) = self.filter_content(request_id, &mut content) {
                        return self.push(&reply);
                    }
                    let home = shard.home_of(ConvId::direct(user, to).placement_key());
                    let request = Request::Direct {
                        from: user,
                        conn: self.key,
                        request_id,
                        to,
                        client_msg_id: client_msg_id.to_native(),
                        content,
                    };
                    // Waits while the owner's queue is full: this stops
                    // reading the socket, pushing back on the sender.
                    return shard.send_request(home, request).await;
                }
            }
            ArchivedClientBody::SendGroup {
                group,
                client_msg_id,
                content,
            } => {
                let group = group.to_native();
                let Ok(mut content) = rkyv::deserialize::<_, BoxedError>(content) else {
                    return self.push(&ServerFrame::error(
                        request_id,
                        ErrorCode::MalformedFrame,
                        "bad content",
                    ));
                };
                if let Some(reply) = self.filter_content(request_id, &mut content) {
                    return self.push(&reply);
                }
                let request = Request::Group {
                    from: user,
                    conn: self.key,
                    request_id,
                    group,
                    client_msg_id: client_msg_id.to_native(),
                    content,
                };
                return shard.send_request(shard.home_of(group), request).await;
            }
            ArchivedClientBody::Typing { conv } => {
                let conv = conv.to_native();
                let home = match conv {
                    ConvId::Direct { .. } => match conv.peer_of(user) {
                        None => {
                            return self.push(&ServerFrame::error(
                                request_id,
                                ErrorCode::Forbidden,
                                "not a participant of this conversation",
                            ))
                        }
                        Some(peer) if peer == user => {
                            return self.push(&ServerFrame::error(
                                request_id,
                                ErrorCode::InvalidArgument,
                                "a conversation with yourself has no one to tell",
                            ))
                        }
                        Some(peer) if !shard.user_live(peer) => {
                            return self.push(&ServerFrame::error(
                                request_id,
                                ErrorCode::NotFound,
                                "no such user",
                            ))
                        }
                        Some(_) if !is_canonical(conv) => {
                            // The conversation cache and block state are
                            // keyed by the canonical id (smaller user
                            // first); a reversed one would slip past them.
                            return self.push(&ServerFrame::error(
                                request_id,
                                ErrorCode::InvalidArgument,
                                "a 1:1 conversation id names the smaller user id first",
                            ));
                        }
                        Some(_) => shard.home_of(conv.placement_key()),
                    },
                    ConvId::Group { group } => shard.home_of(group),
                };
                let request = Request::Typing {
                    from: user,
                    conn: self.key,
                    request_id,
                    conv,
                };
                return shard.send_request(home, request).await;
            }
            _ => return,
        };
        self.push(&reply);
    }

    /// Every other request (account, friends, groups, sync, history...).
    async fn dispatch_cold(&mut self, request_id: u64, body: &ArchivedClientBody) {
        let user = self.user;
        let shard = self.shard.clone();
        let max_frame_bytes = shard.config.max_frame_bytes;
        let reply = match body {
            ArchivedClientBody::ResolveUser { username } => {
                let name = username.as_str().to_owned();
                match shard
                    .blocking(move |store| store.user_id(&name).map(|id| (id, name)))
                    .await
                {
                    Ok((Some(id), username)) => ServerFrame {
                        request_id,
                        body: ServerBody::User { user: id, username },
                    },
                    Ok((None, username)) => no_user_named(request_id, &username),
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::FriendAdd { username } => {
                let name = username.as_str().to_owned();
                let asked = name.clone();
                let added = shard
                    .blocking(move |store| {
                        let friend = store.user_id(&name)?.ok_or(tern_storage::StoreError::NotFound)?;
                        // The pushes name the caller, as the other user may
                        // know them by nothing else. Read before the write:
                        // a failed read must not turn a stored request into
                        // an error answer.
                        let own_name = store.username(user)?.unwrap_or_default();
                        let outcome = store.add_friend(user, friend)?;
                        Ok((friend, name, outcome, own_name))
                    })
                    .await;
                match added {
                    Ok((friend, username, outcome, own_name)) => {
                        self.friend_added(request_id, friend, username, outcome, own_name)
                            .await
                    }
                    // The store's NotFound names no kind of thing; here the
                    // only thing looked up is the name.
                    Err(tern_storage::StoreError::NotFound) => no_user_named(request_id, &asked),
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::FriendRemove { user: friend } => {
                // Ended on the home shard of the two users' conversation,
                // where presence pushes between them go out: none of the
                // ex-friend's follows the Ok.
                let friend = friend.to_native();
                let (tx, rx) = futures_channel::oneshot::channel();
                let request = Request::Unfriend {
                    user,
                    peer: friend,
                    reply: tx,
                };
                let home = shard.home_of(ConvId::direct(user, friend).placement_key());
                shard.send_request(home, request).await;
                match rx.await {
                    Ok(Ok(())) => ServerFrame {
                        request_id,
                        body: ServerBody::Ok,
                    },
                    Ok(Err(e)) => store_error_frame(request_id, &e),
                    Err(_) => {
                        ServerFrame::error(request_id, ErrorCode::ShuttingDown, "server is shutting down")
                    }
                }
            }
            ArchivedClientBody::FriendList => self.friend_list(request_id).await,
            ArchivedClientBody::FriendsPage { after, limit } => {
                self.friends_page(request_id, after.to_native(), limit.to_native())
                    .await
            }
            ArchivedClientBody::FriendRequestsPage {
                incoming,
                after,
                limit,
            } => {
                let (incoming, after) = (*incoming, after.to_native());
                let take = catchup::ids_per_page(limit.to_native(), max_frame_bytes, FRIEND_ENTRY_BYTES_MAX);
                match shard
                    .blocking(move |store| {
                        let (ids, more) = store.friend_requests_after(user, incoming, after, take)?;
                        let users = with_names(store, ids)?
                            .into_iter()
                            .map(|(user, username)| Friend {
                                user,
                                username,
                                online: false,
                            })
                            .collect();
                        Ok((users, more))
                    })
                    .await
                {
                    Ok((users, more)) => ServerFrame {
                        request_id,
                        body: ServerBody::FriendRequests { users, more },
                    },
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::Ping { .. }
            | ArchivedClientBody::SendDirect { .. }
            | ArchivedClientBody::SendGroup { .. }
            | ArchivedClientBody::Typing { .. } => return self.dispatch_hot(request_id, body).await,
            ArchivedClientBody::GroupCreate { name } => {
                self.group_create(request_id, name.as_str(), true).await
            }
            ArchivedClientBody::GroupCreateWith { name, open } => {
                self.group_create(request_id, name.as_str(), *open).await
            }
            ArchivedClientBody::GroupJoin { group } => {
                self.group_admin(request_id, group.to_native(), GroupOp::Join)
                    .await
            }
            ArchivedClientBody::GroupLeave { group } => {
                self.group_admin(request_id, group.to_native(), GroupOp::Leave)
                    .await
            }
            ArchivedClientBody::GroupDelete { group } => {
                self.group_admin(request_id, group.to_native(), GroupOp::Delete)
                    .await
            }
            ArchivedClientBody::GroupMembers { group } => {
                self.group_admin(request_id, group.to_native(), GroupOp::Members)
                    .await
            }
            ArchivedClientBody::GroupMembersPage { group, after, limit } => {
                let op = GroupOp::MembersPage {
                    after: after.to_native(),
                    limit: limit.to_native(),
                };
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupInvitesPage { group, after, limit } => {
                let op = GroupOp::InvitesPage {
                    after: after.to_native(),
                    limit: limit.to_native(),
                };
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupBan { group, user: target } => {
                let op = GroupOp::Ban(target.to_native());
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupUnban { group, user: target } => {
                let op = GroupOp::Unban(target.to_native());
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupBansPage { group, after, limit } => {
                let op = GroupOp::BansPage {
                    after: after.to_native(),
                    limit: limit.to_native(),
                };
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupTransferOwnership { group, user: target } => {
                let op = GroupOp::TransferOwnership(target.to_native());
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupInfo { group } => {
                self.group_admin(request_id, group.to_native(), GroupOp::Info)
                    .await
            }
            ArchivedClientBody::GroupInvite { group, user: target } => {
                let op = GroupOp::Invite(target.to_native());
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupKick { group, user: target } => {
                let op = GroupOp::Kick(target.to_native());
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupUninvite { group, user: target } => {
                let op = GroupOp::Uninvite(target.to_native());
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::GroupSetRole {
                group,
                user: target,
                role,
            } => {
                let op = GroupOp::SetRole(target.to_native(), role.to_native());
                self.group_admin(request_id, group.to_native(), op).await
            }
            ArchivedClientBody::Sync { cursors } => {
                // Each cursor above 0 is a receipt write: beyond the one
                // message every Sync is metered as, it pays for them, one
                // per SYNC_CURSORS_PER_MESSAGE or part of it, as a debt
                // the next metered request waits out.
                let stored = cursors.iter().filter(|c| c.seq.to_native() > 0).count() as u64;
                let cost = stored.div_ceil(SYNC_CURSORS_PER_MESSAGE);
                self.limiter.charge_messages(cost, limits::monotonic_us());
                let cursors = cursors
                    .iter()
                    .map(|c| Cursor {
                        conv: c.conv.to_native(),
                        seq: c.seq.to_native(),
                    })
                    .collect();
                match catchup::sync(&shard, user, self.key, &self.outbox, cursors).await {
                    Ok(messages) => ServerFrame {
                        request_id,
                        body: ServerBody::SyncDone { messages },
                    },
                    Err(SyncError::Closed) => return,
                    Err(SyncError::TooBusy) => {
                        let message = "live traffic kept outrunning the catch-up; reconnect and sync again";
                        return self.outbox.kill(ErrorCode::SlowConsumer, message, 1000);
                    }
                    Err(SyncError::Store(e)) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::Receipt { conv, kind, seq } => {
                self.receipt(request_id, conv.to_native(), kind.to_native(), seq.to_native())
                    .await
            }
            ArchivedClientBody::History {
                conv,
                from_seq,
                forward,
                limit,
            } => {
                let (conv, from_seq, forward, limit) = (
                    conv.to_native(),
                    from_seq.to_native(),
                    *forward,
                    limit.to_native(),
                );
                let page = shard
                    .blocking(move |store| {
                        catchup::history(store, user, conv, from_seq, forward, limit, max_frame_bytes)
                    })
                    .await;
                match page {
                    Ok(Some(messages)) => ServerFrame {
                        request_id,
                        body: ServerBody::HistoryPage { conv, messages },
                    },
                    Ok(None) => ServerFrame::error(
                        request_id,
                        ErrorCode::Forbidden,
                        "not a participant of this conversation",
                    ),
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::Conversations { offset, limit } => {
                let (offset, limit) = (offset.to_native(), limit.to_native());
                match shard
                    .blocking(move |store| {
                        catchup::conversations(store, user, offset, limit, max_frame_bytes)
                    })
                    .await
                {
                    Ok(conversations) => ServerFrame {
                        request_id,
                        body: ServerBody::Conversations { conversations },
                    },
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::UserBlock { user: peer } => {
                self.block(request_id, peer.to_native(), true).await
            }
            ArchivedClientBody::UserUnblock { user: peer } => {
                self.block(request_id, peer.to_native(), false).await
            }
            ArchivedClientBody::BlocksPage { after, limit } => {
                let after = after.to_native();
                let take = catchup::ids_per_page(limit.to_native(), max_frame_bytes, size_of::<u64>());
                match shard
                    .blocking(move |store| store.blocks_after(user, after, take))
                    .await
                {
                    Ok((users, more)) => ServerFrame {
                        request_id,
                        body: ServerBody::Blocks { users, more },
                    },
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::MyInvitesPage { after, limit } => {
                let after = after.to_native();
                let take = catchup::ids_per_page(limit.to_native(), max_frame_bytes, size_of::<u64>());
                match shard
                    .blocking(move |store| store.user_invites_after(user, after, take))
                    .await
                {
                    Ok((groups, more)) => ServerFrame {
                        request_id,
                        body: ServerBody::MyInvites { groups, more },
                    },
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::Logout => {
                let token = self.token;
                match shard.blocking(move |store| store.revoke_token(&token)).await {
                    Ok(_) => {
                        tracing::debug!(user, "logged out");
                        return self.close_with(&ServerFrame {
                            request_id,
                            body: ServerBody::Ok,
                        });
                    }
                    Err(e) => store_error_frame(request_id, &e),
                }
            }
            ArchivedClientBody::LogoutOthers => self.logout_others(request_id).await,
            ArchivedClientBody::ChangePassword {
                old_password,
                new_password,
            } => {
                self.change_password(
                    request_id,
                    old_password.as_slice().to_vec(),
                    new_password.as_slice().to_vec(),
                )
                .await
            }
            ArchivedClientBody::AccountDelete { password } => {
                let password = password.as_slice().to_vec();
                if let Some(reply) = self.delete_account(request_id, password).await {
                    return self.push(&reply);
                }
                // Deleted: this session's `Ok` is queued, then its
                // `Disconnect` with every other session's.
                return;
            }
            ArchivedClientBody::Hello { .. }
            | ArchivedClientBody::Register { .. }
            | ArchivedClientBody::Login { .. }
            | ArchivedClientBody::LoginToken { .. }
            | ArchivedClientBody::LoginJwt { .. } => {
                ServerFrame::error(request_id, ErrorCode::InvalidState, "already logged in")
            }
        };
        self.push(&reply);
    }

    /// Runs a text message through the content filter, if one is
    /// configured; `Some` is the answer refusing it.
    fn filter_content(&mut self, request_id: u64, content: &mut Content) -> Option<ServerFrame> {
        let filter = self.shard.config.content_filter.as_ref()?;
        if !matches!(content.kind, ContentKind::Text) {
            return None;
        }
        match self.filter.apply(filter, &mut content.body) {
            Outcome::Clean | Outcome::Masked => None,
            Outcome::Rejected => Some(ServerFrame::error(
                request_id,
                ErrorCode::ContentRejected,
                "the message contains a filtered word",
            )),
        }
    }

    /// Checks the old password (under the account's login back-off), sets
    /// the new one and revokes every token of the user.
    async fn change_password(&self, request_id: u64, old: Vec<u8>, new: Vec<u8>) -> ServerFrame {
        let config = &self.shard.config;
        let user = self.user;
        if let Err(wait) =
            limits::account_change_allowed(config, self.peer, user, limits::AccountChange::Password)
        {
            return rate_limited(request_id, "changing the password again so soon", wait);
        }
        // Looked up here rather than kept by every session for this rare request.
        let username = match self.shard.blocking(move |store| store.username(user)).await {
            Ok(Some(username)) => username,
            Ok(None) => return store_error_frame(request_id, &tern_storage::StoreError::NotFound),
            Err(e) => return store_error_frame(request_id, &e),
        };
        // Held until the outcome is recorded (the end of this function).
        let _attempt = match limits::login_allowed(config, self.peer, Some(&username)) {
            Ok(attempt) => attempt,
            Err(wait) => return rate_limited(request_id, "too many failed password checks", wait),
        };
        let changed = self
            .shard
            .blocking(move |store| store.change_password(user, &old, &new))
            .await;
        match changed {
            Ok(revoked) => {
                limits::login_succeeded(&username);
                tracing::debug!(user, revoked, "password changed");
                ServerFrame {
                    request_id,
                    body: ServerBody::Ok,
                }
            }
            Err(e) => {
                if matches!(e, tern_storage::StoreError::AuthFailed) {
                    limits::login_failed(config, self.peer, Some(&username));
                }
                store_error_frame(request_id, &e)
            }
        }
    }

    /// `AccountDelete`: checks the password (under the account's login
    /// back-off, hashing off the reactor as `ChangePassword` does),
    /// deletes the account in the store, answers `Ok` and has the home
    /// shard (this one) close every session of the user and purge the
    /// rest. `None` once deleted (the `Ok` is queued), else the refusal.
    async fn delete_account(&self, request_id: u64, password: Vec<u8>) -> Option<ServerFrame> {
        let config = &self.shard.config;
        let user = self.user;
        if let Err(wait) =
            limits::account_change_allowed(config, self.peer, user, limits::AccountChange::Delete)
        {
            return Some(rate_limited(
                request_id,
                "deleting the account again so soon",
                wait,
            ));
        }
        let username = match self.shard.blocking(move |store| store.username(user)).await {
            Ok(Some(username)) => username,
            Ok(None) => return Some(store_error_frame(request_id, &tern_storage::StoreError::NotFound)),
            Err(e) => return Some(store_error_frame(request_id, &e)),
        };
        // Held until the outcome is recorded (the end of this function).
        let _attempt = match limits::login_allowed(config, self.peer, Some(&username)) {
            Ok(attempt) => attempt,
            Err(wait) => return Some(rate_limited(request_id, "too many failed password checks", wait)),
        };
        let deleted = self
            .shard
            .blocking(move |store| store.delete_own_account(user, &password))
            .await;
        match deleted {
            Ok(_) => {}
            Err(tern_storage::StoreError::AuthFailed) => {
                limits::login_failed(config, self.peer, Some(&username));
                return Some(ServerFrame::error(
                    request_id,
                    ErrorCode::AuthFailed,
                    "wrong password",
                ));
            }
            Err(tern_storage::StoreError::Forbidden(why)) => {
                return Some(ServerFrame::error(request_id, ErrorCode::Forbidden, why));
            }
            Err(tern_storage::StoreError::NotFound) => {
                // Another device (or the operator) got there first: this
                // session's `Disconnect` is on its way.
                return Some(ServerFrame::error(
                    request_id,
                    ErrorCode::NotFound,
                    ACCOUNT_DELETED,
                ));
            }
            Err(e) if !self.shard.store.is_deleted(user) => return Some(store_error_frame(request_id, &e)),
            Err(e) => {
                // The sync failed but the deletion is visible: it happened,
                // and the rest of it must follow.
                tracing::error!(error = %e, user, "account deletion failed to sync but is visible; completing it");
            }
        }
        limits::login_succeeded(&username);
        tracing::info!(user, "account deleted by its user");
        self.push(&ServerFrame {
            request_id,
            body: ServerBody::Ok,
        });
        self.shard.account_deleted(user);
        None
    }

    /// `LogoutOthers`: if this session's token is still live, replaces
    /// every token of the user with one new token for this session (on
    /// disk before anything else happens), then ends the user's other
    /// sessions, which all live on this shard, the user's home. A session
    /// whose token is gone (logged out by another device a moment ago,
    /// say) gets `AuthFailed` and logs no one out.
    async fn logout_others(&mut self, request_id: u64) -> ServerFrame {
        let user = self.user;
        let change = limits::AccountChange::LogoutOthers;
        if let Err(wait) = limits::account_change_allowed(&self.shard.config, self.peer, user, change) {
            return rate_limited(request_id, "logging out other devices again so soon", wait);
        }
        let current = self.token;
        let reissued = self
            .shard
            .blocking(move |store| {
                let username = store.username(user)?.ok_or(tern_storage::StoreError::NotFound)?;
                let (token, revoked) = store.reissue_sole_token(user, &current)?;
                Ok((username, token, revoked))
            })
            .await;
        match reissued {
            Ok((username, token, revoked)) => {
                self.token = token;
                self.shard.retag_session(self.key, SessionToken::new(&token, true));
                let ended = self.shard.end_other_sessions(user, self.key);
                tracing::debug!(user, revoked, ended, "logged out other devices");
                ServerFrame {
                    request_id,
                    body: ServerBody::LoggedIn {
                        user,
                        username,
                        token: token.to_vec(),
                    },
                }
            }
            Err(tern_storage::StoreError::AuthFailed) => ServerFrame::error(
                request_id,
                ErrorCode::AuthFailed,
                "this session's token was revoked (logged out elsewhere, or a password change): log in again first",
            ),
            Err(e) => store_error_frame(request_id, &e),
        }
    }

    /// Creates a group owned by this user (no home-shard state exists yet).
    async fn group_create(&self, request_id: u64, name: &str, open: bool) -> ServerFrame {
        let user = self.user;
        let name = name.to_owned();
        match self
            .shard
            .blocking(move |store| store.create_group_with(user, &name, open))
            .await
        {
            Ok(group) => ServerFrame {
                request_id,
                body: ServerBody::GroupCreated { group },
            },
            Err(e) => store_error_frame(request_id, &e),
        }
    }

    /// `UserBlock` (`block`) or `UserUnblock` of `peer`, changed on the
    /// home shard of the two users' conversation, which enforces it.
    async fn block(&self, request_id: u64, peer: UserId, block: bool) -> ServerFrame {
        if peer == self.user {
            let why = if block {
                "you cannot block yourself"
            } else {
                "you cannot unblock yourself"
            };
            return ServerFrame::error(request_id, ErrorCode::InvalidArgument, why);
        }
        if !self.shard.user_live(peer) {
            return ServerFrame::error(request_id, ErrorCode::NotFound, "no such user");
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let request = Request::Block {
            user: self.user,
            peer,
            block,
            reply: tx,
        };
        let home = self
            .shard
            .home_of(ConvId::direct(self.user, peer).placement_key());
        self.shard.send_request(home, request).await;
        match rx.await {
            Ok(Ok(())) => ServerFrame {
                request_id,
                body: ServerBody::Ok,
            },
            Ok(Err(refusal)) => error(request_id, &refusal),
            Err(_) => ServerFrame::error(request_id, ErrorCode::ShuttingDown, "server is shutting down"),
        }
    }

    async fn group_admin(&self, request_id: u64, group: u64, op: GroupOp) -> ServerFrame {
        let (tx, rx) = futures_channel::oneshot::channel();
        let request = Request::GroupAdmin {
            user: self.user,
            group,
            op,
            reply: tx,
        };
        self.shard.send_request(self.shard.home_of(group), request).await;
        match rx.await {
            Ok(Ok(GroupAnswer::Members(members))) => ServerFrame {
                request_id,
                body: ServerBody::Members { group, members },
            },
            Ok(Ok(GroupAnswer::Info { name, open, members })) => ServerFrame {
                request_id,
                body: ServerBody::GroupInfo {
                    group,
                    name,
                    open,
                    members,
                },
            },
            Ok(Ok(GroupAnswer::MembersPage { members, more })) => ServerFrame {
                request_id,
                body: ServerBody::MembersPage { group, members, more },
            },
            Ok(Ok(GroupAnswer::InvitesPage { users, more })) => ServerFrame {
                request_id,
                body: ServerBody::InvitesPage { group, users, more },
            },
            Ok(Ok(GroupAnswer::BansPage { users, more })) => ServerFrame {
                request_id,
                body: ServerBody::BansPage { group, users, more },
            },
            Ok(Ok(GroupAnswer::Done)) => ServerFrame {
                request_id,
                body: ServerBody::Ok,
            },
            Ok(Err(refusal)) => error(request_id, &refusal),
            Err(_) => ServerFrame::error(request_id, ErrorCode::ShuttingDown, "server is shutting down"),
        }
    }

    /// Stores a receipt and forwards it to the peer of a 1:1 conversation.
    async fn receipt(&self, request_id: u64, conv: ConvId, kind: ReceiptKind, seq: u64) -> ServerFrame {
        let user = self.user;
        // A group receipt is capped at the group's last stored seq, as a
        // 1:1 one is at its conversation's (below): a cursor past it
        // would hide the messages still to come from the user's syncs. A
        // former member still owed the messages of their membership (a
        // departure record, which their catch-up streams) acknowledges
        // them like a member, up to the record's end: that is what drops
        // the record and their inbox entries of the group.
        //
        // A receipt at or past the end of a departure record acknowledges
        // it (protocol.md 2.8.8), and the records it settles go once the
        // receipt is stored. The latest record of a user not in the group
        // again stays until their next `Sync` (which drops it: their stored
        // cursor now covers it), so that their receipts are still accepted
        // until then; that cursor cannot tell for the others, which a join
        // moved it past without the user acknowledging anything.
        let (allowed, group_last, settled) = match conv {
            ConvId::Direct { .. } => (
                crate::catchup::in_direct(&self.shard.store, user, conv),
                0,
                Vec::new(),
            ),
            ConvId::Group { group } => match self
                .shard
                .blocking(move |store| {
                    let last = store.conv_tail(conv, 0)?.last_seq;
                    let member = store.is_member(group, user)?;
                    let mut departures = store.departures_from(user, group)?;
                    let owed_until = departures.iter().map(|d| d.until).max();
                    let cap = match (member, owed_until) {
                        (true, _) => last,
                        (false, Some(end)) => last.min(end),
                        (false, None) => return Ok((false, 0, Vec::new())),
                    };
                    if !member {
                        departures.pop();
                    }
                    departures.retain(|d| d.until <= seq.min(cap));
                    Ok::<_, tern_storage::StoreError>((true, cap, departures))
                })
                .await
            {
                Ok(read) => read,
                Err(e) => return store_error_frame(request_id, &e),
            },
        };
        if !allowed {
            return ServerFrame::error(
                request_id,
                ErrorCode::Forbidden,
                "not a participant of this conversation",
            );
        }
        // A 1:1 receipt is checked by the conversation's home shard: its
        // seq may not pass the last one stored, and it is not pushed between
        // two users one of whom blocks the other.
        let (seq, push) = match conv {
            ConvId::Direct { .. } => {
                let (tx, rx) = futures_channel::oneshot::channel();
                let check = Request::DirectReceiptCheck {
                    user,
                    conv,
                    reply: tx,
                };
                let home = self.shard.home_of(conv.placement_key());
                self.shard.send_request(home, check).await;
                match rx.await {
                    // Nothing stored yet: nothing to acknowledge.
                    Ok(Ok(check)) if check.stored_seq == 0 => {
                        return ServerFrame {
                            request_id,
                            body: ServerBody::Ok,
                        }
                    }
                    Ok(Ok(check)) => (seq.min(check.stored_seq), check.push),
                    Ok(Err(e)) => return store_error_frame(request_id, &e),
                    Err(_) => {
                        return ServerFrame::error(
                            request_id,
                            ErrorCode::ShuttingDown,
                            "server is shutting down",
                        )
                    }
                }
            }
            // Nothing stored yet: nothing to acknowledge.
            ConvId::Group { .. } if group_last == 0 => {
                return ServerFrame {
                    request_id,
                    body: ServerBody::Ok,
                }
            }
            ConvId::Group { .. } => (seq.min(group_last), false),
        };
        let notify = conv.peer_of(user).filter(|_| push).map(|peer| {
            let push = ServerFrame {
                request_id: 0,
                body: ServerBody::Receipt {
                    conv,
                    user,
                    kind,
                    seq,
                },
            };
            let frame = encode_shared(&push, self.shard.config.max_frame_bytes);
            (
                self.shard.home_of(peer),
                Event::Notify {
                    to: Recipients::One(peer),
                    frame,
                },
            )
        });
        let (tx, rx) = futures_channel::oneshot::channel();
        self.shard.stage_receipt(user, conv, kind, seq, Some(tx), notify);
        if rx.await != Ok(true) {
            return ServerFrame::error(request_id, ErrorCode::Internal, "receipt not stored; retry");
        }
        if !settled.is_empty() {
            // Unsynced, as a catch-up's drops are: a record a crash brings
            // back is streamed once more, never lost.
            let dropped = self
                .shard
                .blocking(move |store| store.drop_departures(user, &settled))
                .await;
            if let Err(e) = dropped {
                tracing::warn!(user, error = %e, "could not drop acknowledged departure records");
            }
        }
        ServerFrame {
            request_id,
            body: ServerBody::Ok,
        }
    }

    /// The answer to a `FriendAdd` of `friend` that the store took as
    /// `outcome`, after telling `friend`'s live sessions of a new request
    /// or of the acceptance of theirs. The push is best effort, like
    /// `Invited`: the store already holds the change, and `friend` finds
    /// it by listing requests or friends.
    async fn friend_added(
        &self,
        request_id: u64,
        friend: UserId,
        username: String,
        outcome: FriendOutcome,
        own_name: String,
    ) -> ServerFrame {
        let user = self.user;
        let (push, body) = match outcome {
            FriendOutcome::AlreadyFriends => (
                None,
                ServerBody::User {
                    user: friend,
                    username,
                },
            ),
            FriendOutcome::Accepted => (
                Some(ServerBody::FriendAccepted {
                    by: user,
                    username: own_name,
                }),
                ServerBody::User {
                    user: friend,
                    username,
                },
            ),
            FriendOutcome::Requested { new } => (
                new.then_some(ServerBody::FriendRequest {
                    from: user,
                    username: own_name,
                }),
                ServerBody::FriendRequestSent {
                    user: friend,
                    username,
                },
            ),
        };
        if let Some(body) = push {
            // A block answered before the push goes out stops it (section 2.8.10).
            self.shard.send_pair_notice(user, friend, body).await;
        }
        ServerFrame { request_id, body }
    }

    /// `FriendList`: every friend in one frame, for clients from before
    /// `FriendsPage`. A list that cannot fit is refused before the
    /// presence of each is asked for.
    async fn friend_list(&self, request_id: u64) -> ServerFrame {
        let user = self.user;
        let named = self
            .shard
            .blocking(move |store| with_names(store, store.friends(user)?))
            .await;
        let named = match named {
            Ok(named) => named,
            Err(e) => return store_error_frame(request_id, &e),
        };
        // A name of up to 8 bytes lies inline in its `Friend`; a longer
        // one out of line, unpadded. The array's alignment is in the
        // page's overhead.
        let bytes: usize = named
            .iter()
            .map(|(_, name)| {
                let out_of_line = if name.len() > INLINE_NAME_BYTES_MAX {
                    name.len()
                } else {
                    0
                };
                size_of::<tern_proto::ArchivedFriend>() + out_of_line
            })
            .sum();
        if bytes > catchup::page_budget(self.shard.config.max_frame_bytes) {
            return ServerFrame::error(
                request_id,
                ErrorCode::LimitExceeded,
                "too many friends to list in one frame; use FriendsPage",
            );
        }
        let friends = self.with_presence(named).await;
        ServerFrame {
            request_id,
            body: ServerBody::Friends { friends },
        }
    }

    /// `FriendsPage`: the friends with ids above `after`, as many as
    /// `limit` asks and one frame holds, with their presence.
    async fn friends_page(&self, request_id: u64, after: UserId, limit: u32) -> ServerFrame {
        let user = self.user;
        let take = catchup::ids_per_page(limit, self.shard.config.max_frame_bytes, FRIEND_ENTRY_BYTES_MAX);
        let page = self
            .shard
            .blocking(move |store| {
                let (ids, more) = store.friends_after(user, after, take)?;
                Ok((with_names(store, ids)?, more))
            })
            .await;
        match page {
            Ok((named, more)) => ServerFrame {
                request_id,
                body: ServerBody::FriendsPage {
                    friends: self.with_presence(named).await,
                    more,
                },
            },
            Err(e) => store_error_frame(request_id, &e),
        }
    }

    /// `named` friends as `Friend`s, each `online` if a session of theirs
    /// is live now (asked of their home shards).
    async fn with_presence(&self, named: Vec<(UserId, String)>) -> Vec<Friend> {
        let online = self
            .shard
            .online_among(named.iter().map(|(id, _)| *id).collect())
            .await;
        named
            .into_iter()
            .map(|(user, username)| Friend {
                online: online.contains(&user),
                user,
                username,
            })
            .collect()
    }
}

/// The longest name an archived `Friend` holds inline, in its own 8
/// bytes; a longer one is written out of line (docs/protocol.md 4.6).
const INLINE_NAME_BYTES_MAX: usize = rkyv::string::repr::INLINE_CAPACITY;

/// The most bytes one `Friend` takes in a page: the archived struct and
/// its name, at most USERNAME_LEN_MAX bytes out of line.
const FRIEND_ENTRY_BYTES_MAX: usize =
    size_of::<tern_proto::ArchivedFriend>() + tern_proto::limits::USERNAME_LEN_MAX;

/// `users` with their names, in the same order (a user deleted meanwhile
/// gets an empty name). One point read each, on a blocking thread.
fn with_names(
    store: &tern_storage::Store,
    users: Vec<UserId>,
) -> Result<Vec<(UserId, String)>, tern_storage::StoreError> {
    users
        .into_iter()
        .map(|user| Ok((user, store.username(user)?.unwrap_or_default())))
        .collect()
}

/// The `NotFound` answer to a request naming a user by `name` (already
/// checked as a username: short, and plain ASCII) that no user has.
fn no_user_named(request_id: u64, name: &str) -> ServerFrame {
    ServerFrame::error(
        request_id,
        ErrorCode::NotFound,
        format!("no user has the name {name:?}"),
    )
}

/// How long a shard waits between checks of the server-wide stop flag.
pub const STOP_POLL: Duration = Duration::from_millis(50);

/// Whether a 1:1 conversation id is in its one canonical form (smaller
/// user id first), as every id the server hands out is.
fn is_canonical(conv: ConvId) -> bool {
    match conv {
        ConvId::Direct { low, high } => conv == ConvId::direct(low, high),
        ConvId::Group { .. } => true,
    }
}
