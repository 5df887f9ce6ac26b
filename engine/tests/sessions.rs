//! Sessions under attack, over real sockets and a real store: the idle
//! deadline of a session whose request takes longer to serve than the idle
//! timeout while its client keeps sending heartbeats, and of one whose
//! frames the rate meters refuse (protocol.md 2.5); one session token
//! resumed on two connections at once (protocol.md 2.3); two devices of a
//! user and their peer sending in one conversation at once.

mod common;

use std::time::{Duration, Instant};

use common::{assert_disconnected, code_of, RawConn, RawRead, TestServer, User, PASSWORD};
use rkyv::util::AlignedVec;
use tern_client::{ClientBody, Content, ErrorCode, ServerBody, UserId};
use tern_proto::{encode_client, ClientFrame};

const IDLE: Duration = Duration::from_secs(1);

/// A server whose idle timeout is [`IDLE`], with small frames and a small
/// outbound queue: a catch-up stalls as soon as the client stops reading.
fn stalling_catch_up_server() -> TestServer {
    TestServer::start_with(|config| {
        config.idle_timeout = IDLE;
        config.max_frame_bytes = 4096;
        config.max_message_bytes = 2048;
        config.outbound_queue_bytes = 8192;
    })
}

/// A catch-up paced to a client that reads slowly can take longer than
/// the idle timeout; the client's heartbeats sent meanwhile wait in the
/// socket until the `Sync` is served. They arrived in time: the session
/// must stay open (protocol.md 2.5: it closes when no frame *arrived*).
#[test]
fn heartbeats_sent_during_a_long_catch_up_keep_the_session() {
    let server = stalling_catch_up_server();
    let alice = server.user_on_shard("idle_sync_a", 0);
    let bob = server.user_on_shard("idle_sync_b", 1 % server.shards());
    // More than the kernel's socket buffers hold (up to 4 MiB on loopback).
    const BACKLOG: u64 = 4000;
    send_big_backlog(&server, &alice, bob.id, BACKLOG);

    let mut b = RawConn::connect_small_rcvbuf(server.addr(), 4096);
    b.login(&bob);
    let sync = b.send(ClientBody::Sync { cursors: Vec::new() });
    // Not reading for twice the idle timeout, but pinging well within it.
    let mut pings = Vec::new();
    let paused = Instant::now();
    while paused.elapsed() < 2 * IDLE + IDLE / 2 {
        std::thread::sleep(IDLE / 5);
        pings.push(b.send(ClientBody::Ping {
            nonce: pings.len() as u64,
        }));
    }
    let (mut streamed, mut done, mut pongs) = (0u64, None, 0usize);
    while done.is_none() || pongs < pings.len() {
        match b.read(Duration::from_secs(10)) {
            RawRead::Frame(f) => match f.body {
                ServerBody::Message(_) => streamed += 1,
                ServerBody::SyncDone { messages } if f.request_id == sync => done = Some(messages),
                ServerBody::Pong { .. } => pongs += 1,
                ServerBody::Presence { .. } => {}
                ServerBody::Disconnect { code, message, .. } => panic!(
                    "disconnected after {streamed} of {BACKLOG} messages, {pongs} of {} pongs \
                     (SyncDone: {done:?}): {code:?}: {message}",
                    pings.len()
                ),
                other => panic!("unexpected {other:?}"),
            },
            other => panic!(
                "after {streamed} of {BACKLOG} messages, {pongs} of {} pongs (SyncDone: {done:?}): {other:?}",
                pings.len()
            ),
        }
    }
    assert_eq!(done, Some(BACKLOG));
    assert_eq!(streamed, BACKLOG);
    // The session goes on as long as its client pings.
    for nonce in 0..5u64 {
        std::thread::sleep(IDLE / 4);
        let id = b.send(ClientBody::Ping { nonce });
        let frame = b.expect_frame();
        assert_eq!(frame.request_id, id, "{frame:?}");
        assert_eq!(frame.body, ServerBody::Pong { nonce });
    }
    // And silence still closes it.
    let frames = b.expect_closed();
    assert_disconnected(&frames, ErrorCode::IdleTimeout);
}

/// The same, twice in a row: the read that finds the heartbeats sent
/// during the first catch-up also brings a second `Sync`, which the
/// client again reads too slowly for longer than the idle timeout while
/// pinging. Its heartbeats count as well (one rescued overdue session
/// must not leave the next long request without the same read).
#[test]
fn heartbeats_during_two_long_catch_ups_in_a_row_keep_the_session() {
    let server = stalling_catch_up_server();
    let alice = server.user_on_shard("idle_twice_a", 0);
    let bob = server.user_on_shard("idle_twice_b", 1 % server.shards());
    const BACKLOG: u64 = 4000;
    send_big_backlog(&server, &alice, bob.id, BACKLOG);

    let mut b = RawConn::connect_small_rcvbuf(server.addr(), 4096);
    b.login(&bob);
    let mut pings = 0u64;
    // Two heartbeats (at 0.6 and 1.2 idle timeouts) per pause: few enough
    // that they and the second `Sync` (76 bytes each) come in one read
    // (a quiet stream's read slot is 256 bytes).
    let mut ping_without_reading = |b: &mut RawConn| {
        let paused = Instant::now();
        while paused.elapsed() < IDLE + IDLE / 10 {
            std::thread::sleep(IDLE * 3 / 5);
            b.send(ClientBody::Ping { nonce: pings });
            pings += 1;
        }
    };
    let first = b.send(ClientBody::Sync { cursors: Vec::new() });
    ping_without_reading(&mut b);
    // Queued behind the heartbeats: the same catch-up again.
    let second = b.send(ClientBody::Sync { cursors: Vec::new() });
    let (mut streamed, mut done, mut pongs) = (0u64, Vec::new(), 0u64);
    let mut read_until = |b: &mut RawConn, done: &mut Vec<u64>, until: u64| loop {
        if done.contains(&until) {
            return;
        }
        match b.read(Duration::from_secs(10)) {
            RawRead::Frame(f) => match f.body {
                ServerBody::Message(_) => streamed += 1,
                ServerBody::SyncDone { .. } => done.push(f.request_id),
                ServerBody::Pong { .. } => pongs += 1,
                ServerBody::Presence { .. } => {}
                ServerBody::Disconnect { code, message, .. } => panic!(
                    "disconnected after {streamed} messages, {pongs} pongs (SyncDone of {done:?}): \
                     {code:?}: {message}"
                ),
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("after {streamed} messages, {pongs} pongs (SyncDone of {done:?}): {other:?}"),
        }
    };
    read_until(&mut b, &mut done, first);
    // The second catch-up is under way and stalls as the first did.
    ping_without_reading(&mut b);
    read_until(&mut b, &mut done, second);
    assert_eq!(done, vec![first, second]);
    assert_eq!(streamed, 2 * BACKLOG);
    // Every heartbeat is answered, then silence closes the session.
    let frames = b.expect_closed();
    let late_pongs = frames
        .iter()
        .filter(|f| matches!(f.body, ServerBody::Pong { .. }))
        .count() as u64;
    assert_eq!(pongs + late_pongs, pings, "{frames:?}");
    assert_disconnected(&frames, ErrorCode::IdleTimeout);
}

/// Frames refused by the connection's rate meters count as activity too
/// (protocol.md 2.5: "Every frame counts as activity, including frames
/// that are refused with an error"): a client whose requests are all
/// answered `RateLimited` for longer than the idle timeout is not closed
/// as idle.
#[test]
fn frames_refused_by_the_rate_limit_count_as_activity() {
    let idle = Duration::from_millis(400);
    let server = TestServer::start_with(|config| {
        config.idle_timeout = idle;
        config.limits.limits_exempt.clear();
        config.limits.registration_rate_per_ip_per_hour = 0;
        config.limits.message_rate_per_sec = 1;
        config.limits.message_burst = 1;
    });
    let alice = server.user_on_shard("meter_a", 0);
    let bob = server.user_on_shard("meter_b", 1 % server.shards());
    let mut a = RawConn::connect(server.addr());
    a.login(&alice);
    let conv = tern_client::ConvId::direct(alice.id, bob.id);
    // One typing hint a second is served; the ones between are refused,
    // and none of them is the silence the idle timeout is for.
    let started = Instant::now();
    let (mut served, mut refused) = (0, 0);
    while started.elapsed() < 3 * idle {
        let id = a.send(ClientBody::Typing { conv });
        let frame = a.expect_frame();
        assert_eq!(frame.request_id, id, "{frame:?}");
        match frame.body {
            ServerBody::Ok => served += 1,
            ServerBody::Error {
                code: ErrorCode::RateLimited,
                ..
            } => refused += 1,
            other => panic!(
                "after {served} served and {refused} refused in {:?}: {other:?}",
                started.elapsed()
            ),
        }
        std::thread::sleep(idle / 8);
    }
    assert!(refused > 0 && served > 0, "{served} served, {refused} refused");
}

/// Two devices of one user and their peer all send at once in one 1:1
/// conversation: every session sees the whole conversation, its own
/// messages as `Sent` and everyone else's (the other device's as echoes)
/// as pushes, each seq exactly once and the pushes in seq order.
#[test]
fn two_devices_and_their_peer_sending_at_once_each_see_the_whole_conversation_in_order() {
    const EACH: u64 = 150;
    let server = TestServer::start();
    let alice = server.user_on_shard("multi_a", 0);
    let bob = server.user_on_shard("multi_b", 1 % server.shards());
    let sessions = vec![
        (server.login(&alice), bob.id, "alice's first device"),
        (server.login(&alice), bob.id, "alice's second device"),
        (server.login(&bob), alice.id, "bob"),
    ];
    let results: Vec<(tern_client::Client, Vec<u64>, &str)> = std::thread::scope(|s| {
        let handles: Vec<_> = sessions
            .into_iter()
            .map(|(mut client, to, name)| {
                s.spawn(move || {
                    let sent: Vec<u64> = (0..EACH)
                        .map(|n| client.send_text(to, &format!("{name} {n}")).expect("send").seq)
                        .collect();
                    (client, sent, name)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("sender")).collect()
    });
    let total = 3 * EACH;
    for (mut client, sent, name) in results {
        let mut pushed = Vec::new();
        while let Ok(Some(frame)) = client.read_frame(Duration::from_millis(300)) {
            if let ServerBody::Message(m) = frame.body {
                pushed.push(m.seq);
            }
        }
        assert!(
            pushed.windows(2).all(|w| w[0] < w[1]),
            "{name}: pushes out of order or twice: {pushed:?}"
        );
        let mut all: Vec<u64> = pushed.iter().chain(&sent).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=total).collect::<Vec<_>>(),
            "{name}: not each of 1..={total} once (sent {sent:?}, pushed {pushed:?})"
        );
    }
}

/// A token resumes as itself (`LoginToken` answers the same token, it
/// does not issue one), on any number of connections at once, each a
/// session of its own; a `Logout` on one of them revokes it for every
/// later resume, while the other sessions stay open.
#[test]
fn one_token_resumes_two_sessions_and_a_logout_ends_its_resumes_not_its_sessions() {
    let server = TestServer::start();
    let alice = server.user_on_shard("tok_a", 0);
    let bob = server.user_on_shard("tok_b", 1 % server.shards());
    let token = server
        .connect()
        .login(&alice.name, PASSWORD)
        .expect("password login")
        .token;
    let mut one = server.connect();
    let mut two = server.connect();
    for device in [&mut one, &mut two] {
        let resumed = device.login_token(&token).expect("resume");
        assert_eq!(resumed.user, alice.id);
        assert_eq!(resumed.token, token, "LoginToken answers the token it was given");
    }
    // Both sessions are live: a message reaches each.
    let mut b = server.login(&bob);
    b.send_text(alice.id, "to both").expect("send");
    for device in [&mut one, &mut two] {
        assert_eq!(common::expect_message(device).content.body, b"to both");
    }
    one.logout().expect("logout");
    assert_eq!(
        code_of(server.connect().login_token(&token)),
        tern_client::ErrorCode::AuthFailed
    );
    // The other session of that token goes on.
    two.ping().expect("the other session stays open");
    b.send_text(alice.id, "still here").expect("send");
    assert_eq!(common::expect_message(&mut two).content.body, b"still here");
}

/// Sends `count` messages of 1,800 bytes from `from` to `to`, 50 at a
/// time, each acknowledged.
fn send_big_backlog(server: &TestServer, from: &User, to: UserId, count: u64) {
    let mut raw = RawConn::connect(server.addr());
    raw.login(from);
    let body = "x".repeat(1800);
    let mut sent = 0;
    while sent < count {
        let window = (count - sent).min(50);
        let mut out = AlignedVec::new();
        for n in 0..window {
            let frame = ClientFrame {
                request_id: 1000 + sent + n,
                body: ClientBody::SendDirect {
                    to,
                    client_msg_id: 1 + sent + n,
                    content: Content::text(body.clone()),
                },
            };
            encode_client(&frame, &mut out, 1 << 20).expect("encode");
        }
        raw.send_raw(&out).expect("send");
        let mut acked = 0;
        while acked < window {
            let frame = raw.expect_frame();
            match frame.body {
                ServerBody::Sent { .. } => acked += 1,
                ServerBody::Presence { .. } => {}
                other => panic!("expected Sent, got {other:?}"),
            }
        }
        sent += window;
    }
}
