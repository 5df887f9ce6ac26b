//! A blocking client for the Tern messaging server, and the `tern` CLI built on it.
//!
//! This library owns one TCP connection to `ternd` (plain or TLS, see
//! [`ClientTls`]) and everything needed to use it synchronously: the
//! `Hello` handshake, request ids, matching each answer to its request
//! while queueing the pushes (deliveries, presence, friend requests,
//! disconnect notices)
//! that arrive in between, per-request timeouts, and typed helpers for every request in the protocol. Framing, validation and
//! the message types come from [`tern_proto`] (re-exported as [`proto`]);
//! this crate adds only the socket and the request/answer bookkeeping. It
//! is meant for the CLI, for end-to-end tests and for tools, not for
//! high-throughput load generation: one request is in flight at a time.
//!
//! ```no_run
//! use tern_client::{Client, ClientOptions};
//! let mut client = Client::connect("127.0.0.1:7878", ClientOptions::default())?;
//! client.login("alice", "correct horse")?;
//! let bob = client.resolve_user("bob")?;
//! client.send_text(bob, "hi")?;
//! # Ok::<(), tern_client::ClientError>(())
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

mod conn;
mod error;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

pub use tern_proto as proto;
pub use tern_proto::{
    ChatMessage, ClientBody, ClientFrame, Content, ContentKind, ConvId, ConversationSummary, Cursor,
    ErrorCode, Friend, GroupId, GroupMember, GroupRole, ReceiptKind, ServerBody, ServerFrame, UserId,
};

use conn::{Conn, TlsSetup};
pub use error::ClientError;
use rkyv::util::AlignedVec;
use tern_proto::limits::{
    ABSOLUTE_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_BYTES, MEMBERS_PAGE_LIMIT_MAX, SYNC_CURSORS_MAX,
};
use tern_proto::{encode_client, FrameError};

/// The bytes one `Cursor` takes in an encoded frame (docs/protocol.md 5.11).
const CURSOR_WIRE_BYTES: usize = 32;

/// How a [`Client`] behaves; [`ClientOptions::default`] suits most uses.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long one request (and the TCP connect) may take. Default 10 s.
    pub timeout: Duration,
    /// The frame body limit, both ways, until the server announces its own
    /// in `HelloOk`; from then on the announced limit applies both ways,
    /// since the server may send any frame up to it (a message as large as
    /// it accepts) and a client that refused one could never sync past it.
    pub max_frame_bytes: u32,
    /// Sent in `Hello`; shows up in server logs. At most 64 bytes.
    pub client_name: String,
    /// Speak TLS (verifying the server's certificate); `None`, the default,
    /// is plain TCP.
    pub tls: Option<ClientTls>,
    /// The most bytes of pushes (counted as their size on the wire plus a
    /// fixed per-frame cost) held for [`Client::next_push`] while requests
    /// wait for their answers; past it a request fails with
    /// [`ClientError::PushQueueFull`] and the connection is closed. A
    /// `Sync` queues its whole catch-up, so this also bounds the backlog a
    /// login can take in. Default [`DEFAULT_MAX_QUEUED_PUSH_BYTES`].
    pub max_queued_push_bytes: usize,
}

/// The default [`ClientOptions::max_queued_push_bytes`]: 64 MiB, a catch-up
/// of a few hundred thousand short messages.
pub const DEFAULT_MAX_QUEUED_PUSH_BYTES: usize = 64 * 1024 * 1024;

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            timeout: Duration::from_secs(10),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client_name: concat!("tern-client/", env!("CARGO_PKG_VERSION")).to_string(),
            tls: None,
            max_queued_push_bytes: DEFAULT_MAX_QUEUED_PUSH_BYTES,
        }
    }
}

/// How to verify the server over TLS.
///
/// Certificates are always verified. Without `ca_file` the server's chain
/// must lead to one of the public web roots (Mozilla's set, compiled in
/// from `webpki-roots`, so verification behaves the same on every machine);
/// with it, to a certificate in that file and nothing else, which is how a
/// self-signed server certificate (`ternd gen-cert`) is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM file of the certificates to trust instead of the public roots.
    pub ca_file: Option<PathBuf>,
    /// The name the certificate must carry: a DNS name or an IP address.
    pub server_name: String,
}

impl ClientTls {
    /// Verifies `server_name` against the public roots.
    pub fn new(server_name: impl Into<String>) -> ClientTls {
        ClientTls {
            ca_file: None,
            server_name: server_name.into(),
        }
    }

    /// Trusts exactly the certificates in `ca_file`.
    pub fn with_ca_file(mut self, ca_file: impl Into<PathBuf>) -> ClientTls {
        self.ca_file = Some(ca_file.into());
        self
    }

    fn setup(&self) -> Result<TlsSetup, ClientError> {
        let server_name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| ClientError::TlsSetup(format!("invalid server name {:?}: {e}", self.server_name)))?;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let bad_file = |message: String| {
                    ClientError::TlsSetup(format!("cannot use CA file {}: {message}", path.display()))
                };
                let pem = std::fs::read(path).map_err(|e| bad_file(e.to_string()))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| bad_file(e.to_string()))?;
                    roots.add(cert).map_err(|e| bad_file(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(bad_file("no certificate in it".into()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsSetup {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// A logged-in session, as returned by [`Client::login`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: UserId,
    pub username: String,
    /// Pass to [`Client::login_token`] on a later connection.
    pub token: Vec<u8>,
}

/// A group as `GroupInfo` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub group: GroupId,
    pub name: String,
    /// Anyone may join; otherwise joining needs an invite.
    pub open: bool,
    /// Members ascending by user id, with their roles.
    pub members: Vec<GroupMember>,
}

/// One page of a group's members, as `MembersPage` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersPage {
    /// Members ascending by user id, with their roles.
    pub members: Vec<GroupMember>,
    /// Members with larger ids exist: ask again after the last one listed.
    pub more: bool,
}

/// What a [`Client::friend_add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FriendAdded {
    /// The two are friends (already, or now: the other had asked first and
    /// this accepted their request). Their id.
    Friends(UserId),
    /// The caller's request waits for the other to add the caller back
    /// (also when it was pending already). Their id.
    Requested(UserId),
}

impl FriendAdded {
    /// The other user's id, either way.
    pub fn user(self) -> UserId {
        match self {
            FriendAdded::Friends(user) | FriendAdded::Requested(user) => user,
        }
    }
}

/// The server's acknowledgement of a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub client_msg_id: u64,
    pub conv: ConvId,
    pub seq: u64,
    pub timestamp_ms: u64,
}

/// One connection to a Tern server.
pub struct Client {
    conn: Conn,
    opts: ClientOptions,
    /// The id the next request gets; 0 is reserved for pushes, so this starts at 1.
    next_request_id: u64,
    /// Source of `client_msg_id`s and ping nonces.
    next_msg_id: u64,
    /// Pushes that arrived while a request waited for its answer, oldest
    /// first, each with the bytes it counts against
    /// `opts.max_queued_push_bytes`.
    queued: VecDeque<(ServerFrame, usize)>,
    /// The sum of the sizes in `queued`.
    queued_bytes: usize,
    /// Per conversation with a message in `queued`, the highest seq queued:
    /// a message at or below it (or below the cursor) is a duplicate and
    /// is not queued. Never more entries than `queued` has frames.
    queued_high: HashMap<ConvId, u64>,
    idle_timeout: Duration,
    server_max_frame_bytes: u32,
    user: Option<UserId>,
    /// Per conversation, the highest seq handed to the caller (or set):
    /// presented on `Sync`, and used to drop anything at or below it.
    cursors: HashMap<ConvId, Held>,
    /// Counts cursor advances, to order the cursors by recency.
    advances: u64,
}

/// A conversation's cursor and when it last moved.
#[derive(Debug, Clone, Copy)]
struct Held {
    seq: u64,
    /// The value of `Client::advances` when `seq` last rose.
    advanced: u64,
}

impl Client {
    /// Connects, sends `Hello` and waits for `HelloOk`.
    ///
    /// Every address `addr` resolves to is tried in turn, each within
    /// `opts.timeout`. A server that refuses the version answers with
    /// [`ClientError::Server`] carrying [`ErrorCode::UnsupportedVersion`].
    pub fn connect(addr: impl ToSocketAddrs, opts: ClientOptions) -> Result<Client, ClientError> {
        // A bad CA file or name fails before anything touches the network.
        let tls = opts.tls.as_ref().map(ClientTls::setup).transpose()?;
        let stream = connect_any(addr, opts.timeout)?;
        let conn = Conn::new(stream, tls, opts.max_frame_bytes, opts.timeout)?;
        let mut client = Client {
            conn,
            next_request_id: 1,
            next_msg_id: initial_msg_id(),
            queued: VecDeque::new(),
            queued_bytes: 0,
            queued_high: HashMap::new(),
            idle_timeout: Duration::ZERO,
            server_max_frame_bytes: opts.max_frame_bytes,
            user: None,
            cursors: HashMap::new(),
            advances: 0,
            opts,
        };
        let hello = ClientBody::Hello {
            version: tern_proto::PROTOCOL_VERSION,
            client_name: client.opts.client_name.clone(),
        };
        match client.request(hello)? {
            ServerBody::HelloOk {
                version,
                max_frame_bytes,
                idle_timeout_ms,
            } => {
                if version != tern_proto::PROTOCOL_VERSION {
                    return Err(ClientError::Protocol(format!(
                        "server chose protocol version {version}, this client speaks {}",
                        tern_proto::PROTOCOL_VERSION
                    )));
                }
                if max_frame_bytes > ABSOLUTE_MAX_FRAME_BYTES {
                    return Err(ClientError::Protocol(format!(
                        "server announced a frame limit of {max_frame_bytes} bytes, over the \
                         protocol's {ABSOLUTE_MAX_FRAME_BYTES}"
                    )));
                }
                client.idle_timeout = Duration::from_millis(u64::from(idle_timeout_ms));
                client.server_max_frame_bytes = max_frame_bytes;
                client.conn.set_max_send(max_frame_bytes);
                client.conn.set_max_recv(max_frame_bytes);
                Ok(client)
            }
            other => Err(unexpected("HelloOk", &other)),
        }
    }

    /// Sends one request and waits for its answer.
    ///
    /// Pushes (frames with `request_id` 0) that arrive first are queued for
    /// [`Client::next_push`] / [`Client::read_frame`], except messages at or
    /// below one already returned or queued for their conversation; late
    /// answers to earlier requests that timed out are dropped. The queue is
    /// bounded by [`ClientOptions::max_queued_push_bytes`]: an application
    /// that sends requests must also take pushes with `next_push`, or a
    /// request fails with [`ClientError::PushQueueFull`]. An `Error` answer
    /// becomes [`ClientError::Server`]; a `Disconnect` push while waiting
    /// becomes [`ClientError::Disconnected`], and so does an `Error` with
    /// request id 0 (the server could not read a frame and closes).
    pub fn request(&mut self, body: ClientBody) -> Result<ServerBody, ClientError> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.conn.send(&ClientFrame { request_id, body })?;
        let deadline = deadline_after(self.opts.timeout);
        loop {
            let Some(frame) = self.conn.recv(deadline)? else {
                return Err(ClientError::Timeout);
            };
            if frame.request_id == request_id {
                return match frame.body {
                    ServerBody::Error {
                        code,
                        message,
                        retry_after_ms,
                        ..
                    } => Err(ClientError::Server {
                        code,
                        message,
                        retry_after_ms,
                    }),
                    body => Ok(body),
                };
            }
            if frame.request_id != 0 {
                // The answer to a request whose caller already got Timeout.
                continue;
            }
            // An `Error` nobody asked for answers a frame the server could
            // not read (request id unknown to it), and it closes next:
            // like `Disconnect`, it ends the wait with the server's reason.
            if let ServerBody::Disconnect {
                code,
                message,
                retry_after_ms,
            }
            | ServerBody::Error {
                code,
                message,
                retry_after_ms,
                ..
            } = frame.body
            {
                return Err(ClientError::Disconnected {
                    code,
                    message,
                    retry_after_ms,
                });
            }
            self.enqueue(frame)?;
        }
    }

    /// Queues a push that arrived while a request waited, unless it is a
    /// message this client already returned or queued.
    fn enqueue(&mut self, frame: ServerFrame) -> Result<(), ClientError> {
        if let ServerBody::Message(message) = &frame.body {
            let returned = self.cursors.get(&message.conv).map_or(0, |held| held.seq);
            let queued = self.queued_high.get(&message.conv).copied().unwrap_or(0);
            if message.seq <= returned.max(queued) {
                return Ok(());
            }
        }
        // The body's size on the wire stands in for the heap its strings and
        // vectors take once decoded; the struct itself is the fixed part.
        let size = std::mem::size_of::<ServerFrame>() + self.conn.last_body_len();
        let limit = self.opts.max_queued_push_bytes;
        if self.queued_bytes.saturating_add(size) > limit {
            // Dropping the push would leave a hole the caller cannot see;
            // closing makes the server stream the unacknowledged rest again.
            self.conn.shutdown();
            return Err(ClientError::PushQueueFull { limit });
        }
        if let ServerBody::Message(message) = &frame.body {
            self.queued_high.insert(message.conv, message.seq);
        }
        self.queued_bytes += size;
        self.queued.push_back((frame, size));
        Ok(())
    }

    /// The oldest queued push, keeping the queue's accounting.
    fn pop_queued(&mut self) -> Option<ServerFrame> {
        let (frame, size) = self.queued.pop_front()?;
        self.queued_bytes -= size;
        if let ServerBody::Message(message) = &frame.body {
            // Queued seqs rise per conversation, so this was its last one.
            if self.queued_high.get(&message.conv) == Some(&message.seq) {
                self.queued_high.remove(&message.conv);
            }
        }
        Some(frame)
    }

    /// How many pushes wait to be taken with [`Client::next_push`].
    pub fn queued_pushes(&self) -> usize {
        self.queued.len()
    }

    /// Creates an account; returns its user id. Does not log in.
    pub fn register(&mut self, username: &str, password: &str) -> Result<UserId, ClientError> {
        let body = ClientBody::Register {
            username: username.to_owned(),
            password: password.as_bytes().to_vec(),
        };
        match self.request(body)? {
            ServerBody::Registered { user } => Ok(user),
            other => Err(unexpected("Registered", &other)),
        }
    }

    /// Logs in with a password, then syncs (see [`Client::sync`]): missed
    /// messages are queued for [`Client::next_push`] and new ones arrive live.
    pub fn login(&mut self, username: &str, password: &str) -> Result<Session, ClientError> {
        let session = self.login_unsynced(username, password)?;
        self.sync()?;
        Ok(session)
    }

    /// Logs in with a password without syncing: the session receives no
    /// messages until [`Client::sync`]. For a session that only makes
    /// requests (sends, lists, changes settings): it neither waits for nor
    /// queues the user's backlog, however large.
    pub fn login_unsynced(&mut self, username: &str, password: &str) -> Result<Session, ClientError> {
        let body = ClientBody::Login {
            username: username.to_owned(),
            password: password.as_bytes().to_vec(),
        };
        self.logged_in(body)
    }

    /// Logs in with a token from an earlier [`Session`] (session resume),
    /// then syncs from this client's cursors.
    pub fn login_token(&mut self, token: &[u8]) -> Result<Session, ClientError> {
        let session = self.login_token_unsynced(token)?;
        self.sync()?;
        Ok(session)
    }

    /// Logs in with a token without syncing, like
    /// [`Client::login_unsynced`].
    pub fn login_token_unsynced(&mut self, token: &[u8]) -> Result<Session, ClientError> {
        self.logged_in(ClientBody::LoginToken {
            token: token.to_vec(),
        })
    }

    /// Logs in with a JSON Web Token from the operator's login system (on
    /// a server configured for it; docs/protocol.md 2.3), then syncs. The
    /// session's `username` is the token's `sub`; its `token` resumes the
    /// session with [`Client::login_token`] like any other.
    pub fn login_jwt(&mut self, jwt: &str) -> Result<Session, ClientError> {
        let session = self.login_jwt_unsynced(jwt)?;
        self.sync()?;
        Ok(session)
    }

    /// Logs in with a JSON Web Token without syncing, like
    /// [`Client::login_unsynced`].
    pub fn login_jwt_unsynced(&mut self, jwt: &str) -> Result<Session, ClientError> {
        self.logged_in(ClientBody::LoginJwt {
            token: jwt.to_owned(),
        })
    }

    /// Ends this session: the server revokes the session's token (a later
    /// [`Client::login_token`] with it fails), answers and closes the
    /// connection. Other sessions of the user are not affected.
    pub fn logout(&mut self) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::Logout)
    }

    /// Logs the user out of every other device: every token of the user
    /// is revoked (this session's too, so a copy of it elsewhere stops
    /// working), the user's other sessions get `Disconnect`
    /// ([`ErrorCode::AuthFailed`]) and are closed, and this session goes
    /// on with the new token the returned [`Session`] holds (save it for
    /// [`Client::login_token`]). [`ErrorCode::AuthFailed`] if this
    /// session's token was already revoked; [`ErrorCode::RateLimited`]
    /// if asked again within a few seconds.
    pub fn logout_others(&mut self) -> Result<Session, ClientError> {
        self.logged_in(ClientBody::LogoutOthers)
    }

    /// Changes the logged-in user's password. Every token of the user is
    /// revoked (this session's too); open sessions stay connected, but the
    /// next login needs the new password. A wrong `old_password` is
    /// [`ErrorCode::AuthFailed`].
    pub fn change_password(&mut self, old_password: &str, new_password: &str) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::ChangePassword {
            old_password: old_password.as_bytes().to_vec(),
            new_password: new_password.as_bytes().to_vec(),
        })
    }

    /// Deletes the logged-in user's account, proving it with `password`.
    /// On success every session of the user, this one included, is closed
    /// by the server (`Disconnect` with [`ErrorCode::AccountDeleted`]); no
    /// login reaches the account again. A wrong password is
    /// [`ErrorCode::AuthFailed`]; an account without a password (made by
    /// a JWT login) is [`ErrorCode::Forbidden`]: the operator deletes those.
    pub fn delete_account(&mut self, password: &str) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::AccountDelete {
            password: password.as_bytes().to_vec(),
        })
    }

    /// Catches up: presents this client's cursors, queues every message
    /// after them for [`Client::next_push`], and makes the session live.
    /// Returns how many messages the server streamed.
    ///
    /// One `Sync` carries at most [`SYNC_CURSORS_MAX`] cursors and must fit
    /// in one frame (about 2,000 at the default 64 KiB), so a client that
    /// holds more presents the ones that advanced most recently (see
    /// [`Client::set_cursor`]) and leaves the rest out. That costs no
    /// message and no login: for a conversation left out the server
    /// streams after the delivered cursor it stored, and anything at or
    /// below this client's own cursor is dropped here as a duplicate. A
    /// presented cursor matters where the client holds messages the server
    /// has not yet stored as delivered, and those are in the conversations
    /// that moved last; one that moved long ago has been acknowledged by a
    /// receipt or an earlier `Sync` in all likelihood.
    pub fn sync(&mut self) -> Result<u64, ClientError> {
        let cursors = self.sync_cursors();
        match self.request(ClientBody::Sync { cursors })? {
            ServerBody::SyncDone { messages } => Ok(messages),
            other => Err(unexpected("SyncDone", &other)),
        }
    }

    /// The cursors `sync` presents: those above 0 (0 acknowledges and
    /// bounds nothing), most recently advanced first, as many as the
    /// protocol allows and the server's frame limit takes.
    fn sync_cursors(&self) -> Vec<Cursor> {
        let mut held: Vec<(ConvId, Held)> = self
            .cursors
            .iter()
            .filter(|(_, held)| held.seq > 0)
            .map(|(conv, held)| (*conv, *held))
            .collect();
        // `advanced` is unique per cursor, so the order is total.
        held.sort_unstable_by_key(|(_, held)| std::cmp::Reverse(held.advanced));
        held.truncate(SYNC_CURSORS_MAX);
        let cursors: Vec<Cursor> = held
            .into_iter()
            .map(|(conv, held)| Cursor { conv, seq: held.seq })
            .collect();
        // Encode to measure rather than trust a per-cursor size: each try
        // drops at least the excess, so this ends within a few tries.
        let mut fits = cursors.len();
        let mut probe = AlignedVec::new();
        while fits > 0 {
            probe.clear();
            let frame = ClientFrame {
                request_id: self.next_request_id,
                body: ClientBody::Sync {
                    cursors: cursors[..fits].to_vec(),
                },
            };
            match encode_client(&frame, &mut probe, self.server_max_frame_bytes) {
                Err(FrameError::TooLarge { len, max }) => {
                    let excess = (len.saturating_sub(max) as usize).div_ceil(CURSOR_WIRE_BYTES);
                    fits -= excess.clamp(1, fits);
                }
                // Anything else fails the same way on the real send.
                _ => break,
            }
        }
        let mut cursors = cursors;
        cursors.truncate(fits);
        cursors
    }

    /// The highest seq this client has returned (or was set) per conversation.
    pub fn cursors(&self) -> impl Iterator<Item = Cursor> + '_ {
        self.cursors.iter().map(|(conv, held)| Cursor {
            conv: *conv,
            seq: held.seq,
        })
    }

    /// Sets a cursor (e.g. restored from the app's own storage): messages
    /// of `conv` at or below `seq` are no longer returned or re-sent.
    /// Raising a cursor counts as its most recent advance, which decides
    /// which cursors [`Client::sync`] presents when they are too many for
    /// one `Sync`: restore them least recently used first.
    pub fn set_cursor(&mut self, conv: ConvId, seq: u64) {
        self.advance(conv, seq);
    }

    /// Raises `conv`'s cursor to `seq`; false (and nothing changes) if it
    /// already was at or above it.
    fn advance(&mut self, conv: ConvId, seq: u64) -> bool {
        let held = self.cursors.entry(conv).or_insert(Held { seq: 0, advanced: 0 });
        if seq <= held.seq {
            return false;
        }
        self.advances += 1;
        *held = Held {
            seq,
            advanced: self.advances,
        };
        true
    }

    /// Sends a cumulative receipt for `conv` up to `seq`.
    pub fn receipt(&mut self, conv: ConvId, kind: ReceiptKind, seq: u64) -> Result<(), ClientError> {
        match self.request(ClientBody::Receipt { conv, kind, seq })? {
            ServerBody::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }

    /// Tells the other participants of `conv` that this user is typing
    /// (their live sessions get a `Typing` push; nothing is stored). Send
    /// it at most every few seconds while the user types.
    pub fn typing(&mut self, conv: ConvId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::Typing { conv })
    }

    /// Acknowledges every message returned so far as delivered.
    pub fn ack_all(&mut self) -> Result<(), ClientError> {
        let cursors: Vec<Cursor> = self.cursors().collect();
        for cursor in cursors {
            self.receipt(cursor.conv, ReceiptKind::Delivered, cursor.seq)?;
        }
        Ok(())
    }

    /// A page of history: from `from_seq` forwards, or backwards (use
    /// `u64::MAX` for the newest), at most `limit` (the server caps at 200).
    pub fn history(
        &mut self,
        conv: ConvId,
        from_seq: u64,
        forward: bool,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, ClientError> {
        match self.request(ClientBody::History {
            conv,
            from_seq,
            forward,
            limit,
        })? {
            ServerBody::HistoryPage { messages, .. } => Ok(messages),
            other => Err(unexpected("HistoryPage", &other)),
        }
    }

    /// The caller's conversations, most recent first.
    pub fn conversations(
        &mut self,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<ConversationSummary>, ClientError> {
        match self.request(ClientBody::Conversations { offset, limit })? {
            ServerBody::Conversations { conversations } => Ok(conversations),
            other => Err(unexpected("Conversations", &other)),
        }
    }

    /// Whether a pushed message is new to this client; advances its cursor.
    fn is_new(&mut self, body: &ServerBody) -> bool {
        let ServerBody::Message(message) = body else {
            return true;
        };
        self.advance(message.conv, message.seq)
    }

    fn logged_in(&mut self, body: ClientBody) -> Result<Session, ClientError> {
        match self.request(body)? {
            ServerBody::LoggedIn {
                user,
                username,
                token,
            } => {
                self.user = Some(user);
                Ok(Session {
                    user,
                    username,
                    token,
                })
            }
            other => Err(unexpected("LoggedIn", &other)),
        }
    }

    /// Pings the server; returns the round-trip time.
    pub fn ping(&mut self) -> Result<Duration, ClientError> {
        let nonce = self.fresh_id();
        let start = Instant::now();
        match self.request(ClientBody::Ping { nonce })? {
            ServerBody::Pong { nonce: echoed } if echoed == nonce => Ok(start.elapsed()),
            ServerBody::Pong { nonce: echoed } => Err(ClientError::Protocol(format!(
                "Pong echoed nonce {echoed}, expected {nonce}"
            ))),
            other => Err(unexpected("Pong", &other)),
        }
    }

    /// Looks up a user id by name.
    pub fn resolve_user(&mut self, username: &str) -> Result<UserId, ClientError> {
        let body = ClientBody::ResolveUser {
            username: username.to_owned(),
        };
        match self.request(body)? {
            ServerBody::User { user, .. } => Ok(user),
            other => Err(unexpected("User", &other)),
        }
    }

    /// Asks a user, by name, to be friends, or accepts their pending
    /// request: [`FriendAdded::Friends`] once the two are friends (their
    /// sessions get a `FriendAccepted` push if this accepted), or
    /// [`FriendAdded::Requested`] while the request waits for them to add
    /// the caller back (their sessions get a `FriendRequest` push when it
    /// is new).
    pub fn friend_add(&mut self, username: &str) -> Result<FriendAdded, ClientError> {
        let body = ClientBody::FriendAdd {
            username: username.to_owned(),
        };
        match self.request(body)? {
            ServerBody::User { user, .. } => Ok(FriendAdded::Friends(user)),
            ServerBody::FriendRequestSent { user, .. } => Ok(FriendAdded::Requested(user)),
            other => Err(unexpected("User or FriendRequestSent", &other)),
        }
    }

    /// Ends a friendship, and drops any pending friend request between the
    /// two, either way: declines theirs, cancels one's own. `Ok` also if
    /// there was nothing.
    pub fn friend_remove(&mut self, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::FriendRemove { user })
    }

    /// A page of the caller's pending friend requests: the users who asked
    /// the caller (`incoming`), or whom the caller asked, with ids above
    /// `after`, ascending, at most `limit` (clamped to 1..=1000 and cut to
    /// fit a frame), each with its name (`online` is always false: a
    /// pending request shares no presence), and whether more follow.
    pub fn friend_requests_page(
        &mut self,
        incoming: bool,
        after: UserId,
        limit: u32,
    ) -> Result<(Vec<Friend>, bool), ClientError> {
        match self.request(ClientBody::FriendRequestsPage {
            incoming,
            after,
            limit,
        })? {
            ServerBody::FriendRequests { users, more } => Ok((users, more)),
            other => Err(unexpected("FriendRequests", &other)),
        }
    }

    /// Every pending friend request of the caller, incoming or outgoing
    /// (see [`Client::friend_requests_page`]), ascending by user id, asked
    /// a page at a time. Stops with [`ClientError::Protocol`] if the
    /// server's pages do not move forward.
    pub fn friend_requests_all(&mut self, incoming: bool) -> Result<Vec<Friend>, ClientError> {
        self.every_page(
            "FriendRequests",
            |client, after| client.friend_requests_page(incoming, after, MEMBERS_PAGE_LIMIT_MAX),
            |request| request.user,
        )
    }

    /// Asks `fetch` for pages of users ascending by id, each after the last
    /// id of the one before, until one says no more follow. A page that
    /// does not move forward (`more` with nothing listed, or an id at or
    /// below the last) is [`ClientError::Protocol`], naming `answer`: a
    /// server must not make this loop forever.
    fn every_page<T>(
        &mut self,
        answer: &str,
        mut fetch: impl FnMut(&mut Client, UserId) -> Result<(Vec<T>, bool), ClientError>,
        user_of: impl Fn(&T) -> UserId,
    ) -> Result<Vec<T>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let (items, more) = fetch(self, after)?;
            if more && items.is_empty() {
                return Err(ClientError::Protocol(format!(
                    "{answer} said more but listed none"
                )));
            }
            for item in items {
                let user = user_of(&item);
                if user <= after {
                    return Err(ClientError::Protocol(format!(
                        "{answer} listed user {user} after {after}"
                    )));
                }
                after = user;
                all.push(item);
            }
            if !more {
                return Ok(all);
            }
        }
    }

    /// A page of the caller's friends: ids above `after`, ascending, at
    /// most `limit` (clamped to 1..=1000 and cut to fit a frame), each
    /// with its name and whether a session of theirs is live now, and
    /// whether more follow.
    pub fn friends_page(&mut self, after: UserId, limit: u32) -> Result<(Vec<Friend>, bool), ClientError> {
        match self.request(ClientBody::FriendsPage { after, limit })? {
            ServerBody::FriendsPage { friends, more } => Ok((friends, more)),
            other => Err(unexpected("FriendsPage", &other)),
        }
    }

    /// Every friend of the caller with their presence, ascending by user
    /// id, asked a page at a time (see [`Client::friends_page`]), so that
    /// a list of any length arrives. Stops with [`ClientError::Protocol`]
    /// if the server's pages do not move forward.
    pub fn friends(&mut self) -> Result<Vec<Friend>, ClientError> {
        self.every_page(
            "FriendsPage",
            |client, after| client.friends_page(after, MEMBERS_PAGE_LIMIT_MAX),
            |friend| friend.user,
        )
    }

    /// Sends a 1:1 text message with a fresh `client_msg_id`.
    pub fn send_text(&mut self, to: UserId, text: &str) -> Result<Sent, ClientError> {
        let client_msg_id = self.fresh_id();
        self.send_direct(to, client_msg_id, Content::text(text))
    }

    /// Withdraws this user's message `seq` of `conv` for everyone ("delete
    /// for everyone"; docs/protocol.md 2.8.12): the server erases its
    /// content and delivers a `Recall` message that tells clients to hide
    /// it. Answered like a send.
    pub fn recall(&mut self, conv: ConvId, seq: u64) -> Result<Sent, ClientError> {
        let client_msg_id = self.fresh_id();
        let content = Content {
            kind: ContentKind::Recall { seq },
            body: Vec::new(),
        };
        match conv {
            ConvId::Group { group } => self.send_group(group, client_msg_id, content),
            ConvId::Direct { .. } => {
                let to = conv
                    .peer_of(self.user().unwrap_or(0))
                    .ok_or(ClientError::Protocol(
                        "recall: not logged in as a participant of that conversation".into(),
                    ))?;
                self.send_direct(to, client_msg_id, content)
            }
        }
    }

    /// Sends a 1:1 message. Resending with the same `client_msg_id` lets the
    /// server recognise a retry.
    pub fn send_direct(
        &mut self,
        to: UserId,
        client_msg_id: u64,
        content: Content,
    ) -> Result<Sent, ClientError> {
        let body = ClientBody::SendDirect {
            to,
            client_msg_id,
            content,
        };
        self.expect_sent(body)
    }

    /// Creates a group (the caller joins it); returns its id.
    pub fn group_create(&mut self, name: &str) -> Result<GroupId, ClientError> {
        match self.request(ClientBody::GroupCreate {
            name: name.to_owned(),
        })? {
            ServerBody::GroupCreated { group } => Ok(group),
            other => Err(unexpected("GroupCreated", &other)),
        }
    }

    /// Joins a group.
    pub fn group_join(&mut self, group: GroupId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupJoin { group })
    }

    /// Leaves a group.
    pub fn group_leave(&mut self, group: GroupId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupLeave { group })
    }

    /// Deletes a group (the caller must own it): from the `Ok` on it is
    /// gone for everyone, and its members' live sessions get the push
    /// `GroupDeleted`.
    pub fn group_delete(&mut self, group: GroupId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupDelete { group })
    }

    /// Creates a group (the caller joins it as owner); `open` lets anyone
    /// join, otherwise joining needs an invite. Returns its id.
    pub fn group_create_with(&mut self, name: &str, open: bool) -> Result<GroupId, ClientError> {
        match self.request(ClientBody::GroupCreateWith {
            name: name.to_owned(),
            open,
        })? {
            ServerBody::GroupCreated { group } => Ok(group),
            other => Err(unexpected("GroupCreated", &other)),
        }
    }

    /// Invites a user to a group (the caller must be its owner or an admin).
    pub fn group_invite(&mut self, group: GroupId, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupInvite { group, user })
    }

    /// Withdraws a user's pending invite to a group (the caller must be its
    /// owner or an admin, or `user` themself: that declines the invite);
    /// `Ok` also when there was none.
    pub fn group_uninvite(&mut self, group: GroupId, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupUninvite { group, user })
    }

    /// Removes a user from a group (the caller must be its owner, or an
    /// admin kicking a plain member).
    pub fn group_kick(&mut self, group: GroupId, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupKick { group, user })
    }

    /// Makes a member an admin or a plain member (the caller must be the
    /// group's owner).
    pub fn group_set_role(
        &mut self,
        group: GroupId,
        user: UserId,
        role: GroupRole,
    ) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupSetRole { group, user, role })
    }

    /// A page of the groups whose invites to the caller are pending: ids
    /// above `after`, ascending, at most `limit` (clamped to 1..=1000 and
    /// cut to fit a frame), and whether more follow.
    pub fn my_invites_page(
        &mut self,
        after: GroupId,
        limit: u32,
    ) -> Result<(Vec<GroupId>, bool), ClientError> {
        match self.request(ClientBody::MyInvitesPage { after, limit })? {
            ServerBody::MyInvites { groups, more } => Ok((groups, more)),
            other => Err(unexpected("MyInvites", &other)),
        }
    }

    /// Blocks a user: from the `Ok` on, no 1:1 message passes between the
    /// two in either direction, and neither can befriend the other (an
    /// existing friendship ends). Groups are not affected.
    pub fn block_user(&mut self, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::UserBlock { user })
    }

    /// Lifts the caller's block of a user (the friendship the block ended
    /// does not come back).
    pub fn unblock_user(&mut self, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::UserUnblock { user })
    }

    /// A page of the users the caller blocks: ids above `after`,
    /// ascending, at most `limit` (clamped to 1..=1000 and cut to fit a
    /// frame), and whether more follow.
    pub fn blocks_page(&mut self, after: UserId, limit: u32) -> Result<(Vec<UserId>, bool), ClientError> {
        match self.request(ClientBody::BlocksPage { after, limit })? {
            ServerBody::Blocks { users, more } => Ok((users, more)),
            other => Err(unexpected("Blocks", &other)),
        }
    }

    /// Bans a user from a group (the caller must be its owner, or an admin
    /// banning anyone but admins): removes them if a member, withdraws
    /// their invite, and refuses their joins until [`Client::group_unban`].
    pub fn group_ban(&mut self, group: GroupId, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupBan { group, user })
    }

    /// Lifts a user's ban from a group (owner or admin).
    pub fn group_unban(&mut self, group: GroupId, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupUnban { group, user })
    }

    /// A page of the users banned from a group (owner or admin), as
    /// [`Client::group_invites_page`] pages invites.
    pub fn group_bans_page(
        &mut self,
        group: GroupId,
        after: UserId,
        limit: u32,
    ) -> Result<(Vec<UserId>, bool), ClientError> {
        match self.request(ClientBody::GroupBansPage { group, after, limit })? {
            ServerBody::BansPage { users, more, .. } => Ok((users, more)),
            other => Err(unexpected("BansPage", &other)),
        }
    }

    /// Hands a group over to one of its members (the caller must be its
    /// owner, and becomes an admin, free to leave).
    pub fn group_transfer_ownership(&mut self, group: GroupId, user: UserId) -> Result<(), ClientError> {
        self.expect_ok(ClientBody::GroupTransferOwnership { group, user })
    }

    /// A group's name, openness and members with their roles (the caller
    /// must be a member).
    pub fn group_info(&mut self, group: GroupId) -> Result<GroupInfo, ClientError> {
        match self.request(ClientBody::GroupInfo { group })? {
            ServerBody::GroupInfo {
                group,
                name,
                open,
                members,
            } => Ok(GroupInfo {
                group,
                name,
                open,
                members,
            }),
            other => Err(unexpected("GroupInfo", &other)),
        }
    }

    /// A page of a group's members with their roles (the caller must be
    /// one): those with ids above `after`, ascending, at most `limit` (the
    /// server clamps it to 1..=1000 and may cut the page to fit a frame).
    pub fn group_members_page(
        &mut self,
        group: GroupId,
        after: UserId,
        limit: u32,
    ) -> Result<MembersPage, ClientError> {
        match self.request(ClientBody::GroupMembersPage { group, after, limit })? {
            ServerBody::MembersPage { members, more, .. } => Ok(MembersPage { members, more }),
            other => Err(unexpected("MembersPage", &other)),
        }
    }

    /// A page of a group's pending invites (the caller must be its owner
    /// or an admin): the invited users with ids above `after`, ascending,
    /// at most `limit` (clamped to 1..=1000 and cut to fit a frame), and
    /// whether more follow.
    pub fn group_invites_page(
        &mut self,
        group: GroupId,
        after: UserId,
        limit: u32,
    ) -> Result<(Vec<UserId>, bool), ClientError> {
        match self.request(ClientBody::GroupInvitesPage { group, after, limit })? {
            ServerBody::InvitesPage { users, more, .. } => Ok((users, more)),
            other => Err(unexpected("InvitesPage", &other)),
        }
    }

    /// Every member of a group with their role, ascending by id, asked a
    /// page at a time so that groups of any size can be listed. Stops with
    /// [`ClientError::Protocol`] if the server's pages do not move forward.
    pub fn group_members_all(&mut self, group: GroupId) -> Result<Vec<GroupMember>, ClientError> {
        self.every_page(
            "MembersPage",
            |client, after| {
                let page = client.group_members_page(group, after, MEMBERS_PAGE_LIMIT_MAX)?;
                Ok((page.members, page.more))
            },
            |member| member.user,
        )
    }

    /// Lists a group's members (the caller must be one). A group too large
    /// for one frame is refused with `LimitExceeded`; see
    /// [`Client::group_members_all`].
    pub fn group_members(&mut self, group: GroupId) -> Result<Vec<UserId>, ClientError> {
        match self.request(ClientBody::GroupMembers { group })? {
            ServerBody::Members { members, .. } => Ok(members),
            other => Err(unexpected("Members", &other)),
        }
    }

    /// Sends a text message to a group with a fresh `client_msg_id`.
    pub fn send_group_text(&mut self, group: GroupId, text: &str) -> Result<Sent, ClientError> {
        let client_msg_id = self.fresh_id();
        self.send_group(group, client_msg_id, Content::text(text))
    }

    /// Sends a message to a group.
    pub fn send_group(
        &mut self,
        group: GroupId,
        client_msg_id: u64,
        content: Content,
    ) -> Result<Sent, ClientError> {
        let body = ClientBody::SendGroup {
            group,
            client_msg_id,
            content,
        };
        self.expect_sent(body)
    }

    /// The next push: a queued one, or the next to arrive within `timeout`
    /// (`Ok(None)` if none does). A `Disconnect` push is returned like any
    /// other; the call after it normally fails with [`ClientError::Closed`].
    pub fn next_push(&mut self, timeout: Duration) -> Result<Option<ServerBody>, ClientError> {
        // Only pushes are ever queued (see `request`).
        while let Some(frame) = self.pop_queued() {
            if self.is_new(&frame.body) {
                return Ok(Some(frame.body));
            }
        }
        let deadline = deadline_after(timeout);
        loop {
            match self.conn.recv(deadline)? {
                None => return Ok(None),
                Some(frame) if frame.request_id == 0 => {
                    // Messages at or below the cursor were already returned.
                    if self.is_new(&frame.body) {
                        return Ok(Some(frame.body));
                    }
                }
                // A late answer to a request that timed out; nobody waits for it.
                Some(_) => {}
            }
        }
    }

    /// Writes bytes as they are: for tests that send malformed frames.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.conn.send_raw(bytes)
    }

    /// The next frame of any kind (queued ones first), or `Ok(None)` after
    /// `timeout`. Nothing is interpreted, so `Error` frames come back as
    /// frames: this is for tests that check how the server reacts to bad input.
    pub fn read_frame(&mut self, timeout: Duration) -> Result<Option<ServerFrame>, ClientError> {
        if let Some(frame) = self.pop_queued() {
            return Ok(Some(frame));
        }
        self.conn.recv(deadline_after(timeout))
    }

    /// The server's idle timeout from `HelloOk` (zero if it announced none):
    /// the connection must send something more often than this.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The largest frame body the server accepts, from `HelloOk`.
    pub fn server_max_frame_bytes(&self) -> u32 {
        self.server_max_frame_bytes
    }

    /// The logged-in user, once [`Client::login`] or [`Client::login_token`] succeeded.
    pub fn user(&self) -> Option<UserId> {
        self.user
    }

    /// The local end of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.conn.local_addr()
    }

    /// The server's end of the connection.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.conn.peer_addr()
    }

    fn expect_ok(&mut self, body: ClientBody) -> Result<(), ClientError> {
        match self.request(body)? {
            ServerBody::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }

    fn expect_sent(&mut self, body: ClientBody) -> Result<Sent, ClientError> {
        match self.request(body)? {
            ServerBody::Sent {
                client_msg_id,
                conv,
                seq,
                timestamp_ms,
            } => Ok(Sent {
                client_msg_id,
                conv,
                seq,
                timestamp_ms,
            }),
            other => Err(unexpected("Sent", &other)),
        }
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_msg_id;
        self.next_msg_id = self.next_msg_id.wrapping_add(1);
        id
    }

    /// A `client_msg_id` no earlier send of this client used, for
    /// [`Client::send_direct`] / [`Client::send_group`]. A send that failed
    /// with [`ClientError::Timeout`] (or on a connection that broke) may
    /// still have been stored: resend it with the same id, and the server
    /// answers with the original `Sent` instead of storing it twice
    /// (docs/protocol.md 2.8.4). `send_text` picks a fresh id each call, so
    /// its caller cannot do that.
    pub fn new_client_msg_id(&mut self) -> u64 {
        self.fresh_id()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.conn.peer_addr().ok())
            .field("tls", &self.conn.is_tls())
            .field("user", &self.user)
            .field("next_request_id", &self.next_request_id)
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

/// The instant `timeout` from now; `None` (no deadline) when that is past
/// what `Instant` can represent, so that `Duration::MAX` means "wait as
/// long as it takes" instead of a panic.
pub(crate) fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

fn connect_any(addr: impl ToSocketAddrs, timeout: Duration) -> Result<TcpStream, ClientError> {
    let mut last_err = None;
    for addr in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1))) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = Some(e),
        }
    }
    Err(match last_err {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => ClientError::Timeout,
        Some(e) => ClientError::Io(e),
        None => ClientError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "address resolved to nothing",
        )),
    })
}

/// A starting point for `client_msg_id`s that differs between runs and
/// between clients started in the same process, so that a restarted client
/// does not reuse ids the server may still deduplicate against.
fn initial_msg_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let nth = STARTED.fetch_add(1, Ordering::Relaxed);
    let seed =
        nanos ^ u64::from(std::process::id()).rotate_left(32) ^ nth.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // Keep the top bit clear so counting up from here does not wrap in practice.
    tern_proto::ids::mix64(seed) >> 1
}

fn unexpected(expected: &str, got: &ServerBody) -> ClientError {
    ClientError::Protocol(format!("expected {expected}, server answered {got:?}"))
}
