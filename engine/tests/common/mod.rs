//! Shared helpers for the engine's integration tests: a real in-process
//! server on a real store in a temporary directory, clients over TCP, users
//! placed on chosen home shards, and a raw framed connection for feeding the
//! server bad input.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tempfile::TempDir;
use tern_client::{
    ChatMessage, Client, ClientBody, ClientError, ClientOptions, FriendAdded, GroupId, ServerBody,
    ServerFrame, UserId,
};
use tern_engine::metrics::Metrics;
use tern_engine::{Config, Server};
use tern_proto::{decode_server, encode_client, shard_of, ClientFrame, FrameBuf, PROTOCOL_VERSION};

/// How long any single request or expected push may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long to watch for a push that must *not* arrive.
pub const QUIET: Duration = Duration::from_millis(250);
/// Every test user's password.
pub const PASSWORD: &str = "correct horse";

/// A running server and the directory its store lives in.
pub struct TestServer {
    server: Option<Server>,
    dir: TempDir,
    pub config: Config,
    /// The server's counters (a restart starts them over).
    pub metrics: Arc<Metrics>,
}

impl TestServer {
    /// A server with [`Config::for_tests`].
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    /// A server with [`Config::for_tests`] adjusted by `tweak`.
    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        TestServer::start_in(dir, tweak)
    }

    /// A server on an existing data directory (for restarts).
    pub fn start_in(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::for_tests(dir.path().join("data"));
        tweak(&mut config);
        let metrics = Arc::new(Metrics::new(config.shards));
        let server = Server::start_with_metrics(config.clone(), metrics.clone()).expect("server starts");
        TestServer {
            server: Some(server),
            dir,
            config,
            metrics,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().expect("server running").addr()
    }

    pub fn admin_context(&self) -> tern_engine::admin::AdminContext {
        self.server.as_ref().expect("server running").admin_context(None)
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().expect("server running").tls_addr()
    }

    pub fn tls_certs(&self) -> Option<std::sync::Arc<tern_net::tls::CertStore>> {
        self.server.as_ref().expect("server running").tls_certs()
    }

    pub fn shards(&self) -> usize {
        self.config.shards
    }

    /// A connected (Hello done), anonymous client.
    pub fn connect(&self) -> Client {
        connect(self.addr())
    }

    /// A client logged in as `user`.
    pub fn login(&self, user: &User) -> Client {
        let mut client = self.connect();
        let session = client.login(&user.name, PASSWORD).expect("login");
        assert_eq!(session.user, user.id);
        client
    }

    /// A client logged in as `user` but not synced: it receives no
    /// messages (no deliveries, no echoes). For senders.
    pub fn login_unsynced(&self, user: &User) -> Client {
        let mut client = self.connect();
        let session = client.login_unsynced(&user.name, PASSWORD).expect("login");
        assert_eq!(session.user, user.id);
        client
    }

    /// Registers a fresh user whose home shard is `shard`.
    pub fn user_on_shard(&self, prefix: &str, shard: usize) -> User {
        let mut client = self.connect();
        register_on_shard(&mut client, prefix, shard, self.shards())
    }

    /// Registers `{prefix}{n}` for n = 0, 1, … until one satisfies `pred`.
    pub fn user_where(&self, prefix: &str, pred: impl Fn(&User) -> bool) -> User {
        let mut client = self.connect();
        for n in 0..64 {
            let name = format!("{prefix}{n}");
            let id = match client.register(&name, PASSWORD) {
                Ok(id) => id,
                Err(e) if e.code() == Some(tern_client::ErrorCode::UsernameTaken) => continue,
                Err(e) => panic!("register {name}: {e}"),
            };
            let user = User { id, name };
            if pred(&user) {
                return user;
            }
        }
        panic!("64 registrations named {prefix}… and none fits");
    }

    /// Stops the server cleanly and starts a new one on the same store and
    /// config (the port changes).
    pub fn restart(&mut self) {
        let server = self.server.take().expect("server running");
        let started = Instant::now();
        server.shutdown().expect("clean shutdown");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "shutdown took {:?}",
            started.elapsed()
        );
        self.metrics = Arc::new(Metrics::new(self.config.shards));
        let server = Server::start_with_metrics(self.config.clone(), self.metrics.clone());
        self.server = Some(server.expect("server restarts on its store"));
    }

    /// Stops the server (waiting for it to drain) and hands back its directory.
    pub fn shutdown(mut self) -> TempDir {
        let server = self.server.take().expect("server running");
        let started = Instant::now();
        server.shutdown().expect("clean shutdown");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "shutdown took {:?}",
            started.elapsed()
        );
        self.dir
    }
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub name: String,
}

impl User {
    pub fn home(&self, shards: usize) -> usize {
        shard_of(self.id, shards)
    }
}

/// Client options with a short per-request timeout.
pub fn opts() -> ClientOptions {
    ClientOptions {
        timeout: TIMEOUT,
        client_name: "engine-tests".into(),
        ..ClientOptions::default()
    }
}

pub fn connect(addr: SocketAddr) -> Client {
    Client::connect(addr, opts()).expect("connect")
}

/// Registers `{prefix}{n}` for n = 0, 1, … until one lands on `shard`.
/// Users that land elsewhere stay registered (and unused); names already
/// taken are skipped, so the same prefix can be used again.
pub fn register_on_shard(client: &mut Client, prefix: &str, shard: usize, shards: usize) -> User {
    assert!(shard < shards);
    for n in 0..64 {
        let name = format!("{prefix}{n}");
        let id = match client.register(&name, PASSWORD) {
            Ok(id) => id,
            // Taken by an earlier call with the same prefix.
            Err(e) if e.code() == Some(tern_client::ErrorCode::UsernameTaken) => continue,
            Err(e) => panic!("register {name}: {e}"),
        };
        if shard_of(id, shards) == shard {
            return User { id, name };
        }
    }
    panic!("64 registrations and none homed on shard {shard} of {shards}");
}

/// Creates groups owned by `owner` (open or invite-only) until one is
/// homed on `shard`; the others stay.
pub fn group_on_shard(owner: &mut Client, shard: usize, shards: usize, open: bool) -> GroupId {
    for n in 0..64 {
        let group = owner
            .group_create_with(&format!("group {n} on {shard}"), open)
            .expect("create group");
        if shard_of(group, shards) == shard {
            return group;
        }
    }
    panic!("no group homed on shard {shard}");
}

/// The next frame pushed to `client` (request id 0), read raw so that the
/// client library's duplicate filtering cannot hide what the server sent.
/// Panics if none arrives in time or the connection fails.
pub fn next_raw_push(client: &mut Client, timeout: Duration) -> Option<ServerBody> {
    match client.read_frame(timeout) {
        Ok(Some(frame)) => {
            assert_eq!(frame.request_id, 0, "an unexpected answer arrived: {frame:?}");
            Some(frame.body)
        }
        Ok(None) => None,
        Err(e) => panic!("connection failed while waiting for a push: {e}"),
    }
}

/// The next push that is not a `Presence` change; panics if none comes in time.
pub fn expect_push(client: &mut Client) -> ServerBody {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_raw_push(client, left) {
            Some(ServerBody::Presence { .. }) => continue,
            Some(body) => return body,
            None => panic!("no push within {TIMEOUT:?}"),
        }
    }
}

/// The next push, `Presence` included; panics if none comes in time.
pub fn expect_any_push(client: &mut Client) -> ServerBody {
    match next_raw_push(client, TIMEOUT) {
        Some(body) => body,
        None => panic!("no push within {TIMEOUT:?}"),
    }
}

/// The next chat message pushed (presence skipped).
pub fn expect_message(client: &mut Client) -> ChatMessage {
    match expect_push(client) {
        ServerBody::Message(msg) => msg,
        other => panic!("expected a Message push, got {other:?}"),
    }
}

/// Asserts that none of `clients` gets a chat message (or any other push
/// but `Presence`) within [`QUIET`]. All are watched during the same window.
pub fn expect_quiet(clients: &mut [&mut Client]) {
    std::thread::sleep(QUIET);
    for (i, client) in clients.iter_mut().enumerate() {
        loop {
            match client.read_frame(Duration::from_millis(1)) {
                Ok(Some(ServerFrame {
                    body: ServerBody::Presence { .. },
                    ..
                })) => continue,
                Ok(Some(other)) => panic!("client #{i}: expected no push, got {other:?}"),
                Ok(None) => break,
                Err(e) => panic!("client #{i}: connection failed while checking for silence: {e}"),
            }
        }
    }
}

/// [`expect_quiet`] for one client.
pub fn expect_no_message(client: &mut Client) {
    expect_quiet(&mut [client]);
}

/// The next presence change pushed to `client`.
pub fn expect_presence(client: &mut Client) -> (UserId, bool) {
    match expect_any_push(client) {
        ServerBody::Presence { user, online } => (user, online),
        other => panic!("expected a Presence push, got {other:?}"),
    }
}

/// Makes two users friends as users do: `a` asks `b` by name, `b`
/// accepts by adding `a` back. Both must be logged in on these clients
/// (their only sessions); consumes the `FriendRequest` and
/// `FriendAccepted` pushes that this causes.
pub fn befriend(a: &mut Client, a_user: &User, b: &mut Client, b_user: &User) {
    assert_eq!(
        a.friend_add(&b_user.name).expect("ask"),
        FriendAdded::Requested(b_user.id)
    );
    match expect_push(b) {
        ServerBody::FriendRequest { from, username } if from == a_user.id && username == a_user.name => {}
        other => panic!("expected FriendRequest from {}, got {other:?}", a_user.id),
    }
    assert_eq!(
        b.friend_add(&a_user.name).expect("accept"),
        FriendAdded::Friends(a_user.id)
    );
    match expect_push(a) {
        ServerBody::FriendAccepted { by, username } if by == b_user.id && username == b_user.name => {}
        other => panic!("expected FriendAccepted by {}, got {other:?}", b_user.id),
    }
}

/// [`befriend`] for a `b` that is not logged in: a session of `b` logs in
/// to accept and leaves again; waits until `a` has seen it go (the
/// `FriendAccepted` push, then `b`'s presence going offline), so nothing
/// of it reaches `a` later. `a` must have no other friend coming or going.
pub fn befriend_offline(server: &TestServer, a: &mut Client, a_user: &User, b_user: &User) {
    let mut b = server.login(b_user);
    befriend(a, a_user, &mut b, b_user);
    drop(b);
    // Its coming online may have been published after the acceptance.
    loop {
        match expect_presence(a) {
            (user, false) if user == b_user.id => break,
            (user, true) if user == b_user.id => continue,
            other => panic!("expected {}'s presence, got {other:?}", b_user.id),
        }
    }
}

/// The server code of a failed request; panics on success or a non-server error.
pub fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> tern_client::ErrorCode {
    match result {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("expected a server error, got {e:?}")),
        Ok(v) => panic!("expected a server error, got success: {v:?}"),
    }
}

/// Retries `f` every 20 ms until it returns `Some`, for at most [`TIMEOUT`].
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a raw read produced.
#[derive(Debug)]
pub enum RawRead {
    Frame(ServerFrame),
    /// The server closed (EOF or reset; [`RawConn::was_reset`] says which).
    Closed,
    /// Nothing within the timeout.
    Timeout,
}

/// Asserts that the frames a connection got before its close include the
/// server's `Disconnect` with `code`.
pub fn assert_disconnected(frames: &[ServerFrame], code: tern_client::ErrorCode) {
    assert!(
        frames
            .iter()
            .any(|f| matches!(&f.body, ServerBody::Disconnect { code: got, .. } if *got == code)),
        "no Disconnect({code:?}) in {frames:?}"
    );
}

/// A framed connection with no client logic: sends what it is told, reads
/// frames as they come. For handshake and bad-input tests.
pub struct RawConn {
    pub stream: TcpStream,
    rx: FrameBuf,
    next_request_id: u64,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
        RawConn::from_stream(stream)
    }

    /// Connects with a small, fixed receive buffer (no autotuning), so that
    /// a peer that does not read fills up quickly.
    pub fn connect_small_rcvbuf(addr: SocketAddr, bytes: usize) -> RawConn {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        socket.connect_timeout(&addr.into(), TIMEOUT).expect("connect");
        RawConn::from_stream(socket.into())
    }

    fn from_stream(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).expect("nodelay");
        stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        RawConn {
            stream,
            rx: FrameBuf::new(1 << 20),
            next_request_id: 1,
        }
    }

    /// Sends a well-formed frame; returns its request id.
    pub fn send(&mut self, body: ClientBody) -> u64 {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let mut out = AlignedVec::new();
        encode_client(&ClientFrame { request_id, body }, &mut out, 1 << 24).expect("encode");
        self.stream.write_all(&out).expect("write");
        request_id
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends `Hello` and checks the `HelloOk`.
    pub fn hello(&mut self) {
        let id = self.send(ClientBody::Hello {
            version: PROTOCOL_VERSION,
            client_name: "raw".into(),
        });
        let frame = self.expect_frame();
        assert_eq!(frame.request_id, id);
        assert!(matches!(frame.body, ServerBody::HelloOk { .. }), "{frame:?}");
    }

    /// Hello, then log in (without `Sync`: the session gets no messages yet);
    /// pushes that arrive before `LoggedIn` are dropped.
    pub fn login(&mut self, user: &User) {
        self.hello();
        let id = self.send(ClientBody::Login {
            username: user.name.clone(),
            password: PASSWORD.as_bytes().to_vec(),
        });
        loop {
            let frame = self.expect_frame();
            if frame.request_id == id {
                assert!(matches!(frame.body, ServerBody::LoggedIn { .. }), "{frame:?}");
                break;
            }
        }
    }

    /// [`RawConn::login`], then `Sync` with no cursors so that the session
    /// goes live; returns the catch-up messages streamed before `SyncDone`.
    pub fn login_and_sync(&mut self, user: &User) -> Vec<ChatMessage> {
        self.login(user);
        let id = self.send(ClientBody::Sync { cursors: Vec::new() });
        let mut streamed = Vec::new();
        loop {
            let frame = self.expect_frame();
            match frame.body {
                ServerBody::SyncDone { messages } if frame.request_id == id => {
                    assert_eq!(messages, streamed.len() as u64);
                    return streamed;
                }
                ServerBody::Message(msg) => streamed.push(msg),
                ServerBody::Presence { .. } => {}
                other => panic!("during sync: {other:?}"),
            }
        }
    }

    pub fn read(&mut self, timeout: Duration) -> RawRead {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(body) = self.rx.next_body().expect("server frame header") {
                let archived = decode_server(body).expect("valid server frame");
                let frame = rkyv::deserialize::<ServerFrame, BoxedError>(archived).expect("deserialize");
                return RawRead::Frame(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return RawRead::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).expect("read timeout");
            let slot = self.rx.read_slot().expect("read slot");
            match self.stream.read(slot) {
                Ok(0) => return RawRead::Closed,
                Ok(n) => self.rx.commit(n),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return RawRead::Closed;
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Whether the server reset the connection rather than end it with a
    /// FIN. Reads cannot tell once a FIN came first (they report the end of
    /// the stream either way), so this asks the kernel for the socket's
    /// TCP state: a reset moves a socket we have not closed to `CLOSE`, a
    /// FIN to `CLOSE_WAIT`.
    pub fn was_reset(&self) -> bool {
        // SAFETY: tcp_info is plain data (zeroed is valid), and getsockopt
        // writes at most `len` bytes of it on a descriptor we own.
        let state = unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let rc = libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            );
            assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
            info.tcpi_state
        };
        // TCP_CLOSE in the kernel's include/net/tcp_states.h (libc does not
        // name the states).
        const TCP_CLOSE: u8 = 7;
        state == TCP_CLOSE
    }

    pub fn expect_frame(&mut self) -> ServerFrame {
        match self.read(TIMEOUT) {
            RawRead::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Asserts the next frame is an `Error` with `code`; returns the frame.
    pub fn expect_error(&mut self, code: tern_client::ErrorCode) -> ServerFrame {
        let frame = self.expect_frame();
        match &frame.body {
            ServerBody::Error { code: got, .. } => assert_eq!(*got, code, "{frame:?}"),
            other => panic!("expected Error({code:?}), got {other:?}"),
        }
        frame
    }

    /// Asserts the server closes the connection (after any frames, which are returned).
    pub fn expect_closed(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        loop {
            match self.read(TIMEOUT) {
                RawRead::Frame(frame) => frames.push(frame),
                RawRead::Closed => return frames,
                RawRead::Timeout => panic!("connection still open after {TIMEOUT:?}; got {frames:?}"),
            }
        }
    }
}

/// Whether a push that `from_peer` recognises as `peer`'s reaches `raw`'s
/// session after the `Ok` to its `UserBlock` of `peer`, sent `delay` after
/// `act` starts on another thread (`act` makes `peer` push, racing the
/// block). `raw` must hear of nothing else meanwhile.
pub fn push_after_block(
    raw: &mut RawConn,
    peer: UserId,
    delay: Duration,
    from_peer: impl Fn(&ServerBody) -> bool,
    act: impl FnOnce() + Send,
) -> bool {
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            barrier.wait();
            act();
        });
        barrier.wait();
        std::thread::sleep(delay);
        let id = raw.send(ClientBody::UserBlock { user: peer });
        let mut blocked = false;
        loop {
            // After the Ok, long enough for a push already on its way.
            let wait = if blocked {
                Duration::from_millis(50)
            } else {
                TIMEOUT
            };
            match raw.read(wait) {
                RawRead::Frame(f) if f.request_id == id => {
                    assert_eq!(f.body, ServerBody::Ok);
                    blocked = true;
                }
                RawRead::Frame(f) if from_peer(&f.body) => {
                    if blocked {
                        return true;
                    }
                }
                RawRead::Frame(f) => panic!("unexpected {f:?}"),
                RawRead::Timeout if blocked => return false,
                other => panic!("{other:?}"),
            }
        }
    })
}

/// Two users on different home shards, logged in, who check that chat
/// between them still works (used while other connections misbehave).
pub struct Pair {
    pub a: Client,
    pub b: Client,
    pub a_user: User,
    pub b_user: User,
    sent: u64,
}

impl Pair {
    pub fn new(server: &TestServer, prefix: &str) -> Pair {
        let a_user = server.user_on_shard(&format!("{prefix}a"), 0);
        let b_user = server.user_on_shard(&format!("{prefix}b"), 1 % server.shards());
        Pair {
            a: server.login(&a_user),
            b: server.login(&b_user),
            a_user,
            b_user,
            sent: 0,
        }
    }

    /// One message each way; checks content and sequence numbers.
    pub fn exchange(&mut self) {
        self.sent += 1;
        let text = format!("ping {}", self.sent);
        let sent = self.a.send_text(self.b_user.id, &text).expect("a sends");
        assert_eq!(sent.seq, 2 * self.sent - 1);
        let msg = expect_message(&mut self.b);
        assert_eq!(msg.content.body, text.as_bytes());
        assert_eq!(msg.from, self.a_user.id);
        let text = format!("pong {}", self.sent);
        let sent = self.b.send_text(self.a_user.id, &text).expect("b sends");
        assert_eq!(sent.seq, 2 * self.sent);
        let msg = expect_message(&mut self.a);
        assert_eq!(msg.content.body, text.as_bytes());
        assert_eq!(msg.from, self.b_user.id);
    }
}

/// An admin socket for `server` in `dir`.
pub fn admin(server: &TestServer, dir: &std::path::Path) -> tern_engine::admin::AdminServer {
    tern_engine::admin::serve_admin(&dir.join("admin.sock"), server.admin_context()).expect("admin socket")
}

/// A gauge's total over all shards, from the admin socket's `stats`.
pub fn total(admin: &tern_engine::admin::AdminServer, metric: &str) -> i64 {
    let stats = tern_engine::admin::admin_request(admin.path(), "stats").expect("stats");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(metric)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total for {metric} in {stats}"))
}

/// Settings under which a client that stops reading stalls its catch-up
/// after a few messages: small frames and outbound queue, writes that
/// wait a minute rather than closing, and async durability so that the
/// backlog that stalls it is quick to send.
pub fn stall_catch_ups(c: &mut tern_engine::config::Config) {
    c.max_frame_bytes = 4096;
    c.max_message_bytes = 2048;
    c.outbound_queue_bytes = 8192;
    c.write_timeout = Duration::from_secs(60);
    c.durability = tern_engine::config::Durability::Async {
        flush_interval: Duration::from_millis(100),
    };
}

/// The body of the ~1.9 KB messages a stalling backlog is made of.
pub const STALL_BODY_BYTES: usize = 1900;

/// Sends `count` messages of [`STALL_BODY_BYTES`] to `group`, a group
/// with none yet: their seqs are 1..=count.
pub fn send_stall_backlog(sender: &mut Client, group: GroupId, count: u64) {
    let body = "b".repeat(STALL_BODY_BYTES);
    for seq in 1..=count {
        assert_eq!(sender.send_group_text(group, &body).expect("send").seq, seq);
    }
}

/// `user`'s `Sync` with `cursors` on a connection that does not read (a
/// small fixed receive buffer), `settle` after it was sent, so that its
/// catch-up is stalled in a backlog; returns the connection and the
/// `Sync`'s request id.
pub fn stalled_sync(
    server: &TestServer,
    user: &User,
    cursors: Vec<tern_client::Cursor>,
    settle: Duration,
) -> (RawConn, u64) {
    let mut slow = RawConn::connect_small_rcvbuf(server.addr(), 4096);
    slow.login(user);
    let sync_id = slow.send(ClientBody::Sync { cursors });
    std::thread::sleep(settle);
    (slow, sync_id)
}
