//! Abuse limits over real sockets: each limit crossed, with its typed
//! error, while well-behaved clients carry on; logout and password change
//! revoke tokens; the content filter rejects, masks and reloads.
//!
//! Test clients connect from 127.0.0.1, which the default configuration
//! exempts from rate limits, so every server here clears `limits_exempt`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expect_message, RawConn, RawRead, TestServer, PASSWORD, TIMEOUT};
use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tern_client::{ClientBody, ErrorCode, ServerBody, ServerFrame};
use tern_engine::filter::{ContentFilter, FilterMode};
use tern_engine::Config;
use tern_proto::{decode_server, encode_client, ClientFrame, FrameBuf, PROTOCOL_VERSION};

fn encoded(request_id: u64, body: ClientBody) -> Vec<u8> {
    let mut out = rkyv::util::AlignedVec::new();
    tern_proto::encode_client(&tern_proto::ClientFrame { request_id, body }, &mut out, 1 << 20)
        .expect("encode");
    out.to_vec()
}

fn unexempt(config: &mut Config) {
    config.limits.limits_exempt.clear();
    // The helpers register test users from this one address, as many as
    // it takes to land one on a shard; only the registration test meters
    // them.
    config.limits.registration_rate_per_ip_per_hour = 0;
}

fn code_of<T: std::fmt::Debug>(result: Result<T, tern_client::ClientError>) -> ErrorCode {
    common::code_of(result)
}

fn disconnect_code(frames: &[tern_client::ServerFrame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match &f.body {
        ServerBody::Disconnect { code, .. } => Some(*code),
        _ => None,
    })
}

/// A server that meters loopback, with a message rate of 5/s and `burst`
/// at once, disconnecting only after 50 refusals in a row.
fn message_rate_server(burst: u32) -> TestServer {
    TestServer::start_with(|c| {
        unexempt(c);
        c.limits.message_rate_per_sec = 5;
        c.limits.message_burst = burst;
        c.limits.rate_limit_disconnect_after = 50;
    })
}

#[test]
fn message_rate_refuses_over_the_burst_and_disconnects_a_flood() {
    let server = message_rate_server(5);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut pair = common::Pair::new(&server, "calm");

    // Unsynced: a Sync is metered as a message too.
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login(&bob);
    for i in 0..5 {
        a.send_text(bob.id, &format!("hi {i}")).expect("within the burst");
    }
    assert_eq!(
        code_of(a.send_text(bob.id, "one too many")),
        ErrorCode::RateLimited
    );
    // Cheap requests are not messages: a ping still goes through.
    a.ping().expect("ping is not metered as a message");
    for i in 0..5 {
        assert_eq!(expect_message(&mut b).content.body, format!("hi {i}").as_bytes());
    }
    // A token comes back after 1/rate.
    std::thread::sleep(Duration::from_millis(250));
    a.send_text(bob.id, "later").expect("a token came back");
    pair.exchange();

    // A flood: far past the limit without reading, answered by refusals
    // and then a Disconnect(RateLimited).
    let mut flood = RawConn::connect(server.addr());
    flood.login(&alice);
    for i in 0..200 {
        let body = ClientBody::SendDirect {
            to: bob.id,
            client_msg_id: 0,
            content: tern_client::Content::text(format!("flood {i}")),
        };
        if flood.send_raw(&encoded(1000 + i, body)).is_err() {
            break;
        }
    }
    let frames = flood.expect_closed();
    let refused = frames
        .iter()
        .filter(|f| match f.body {
            ServerBody::Error {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            } => {
                // One message's worth of tokens at 5/s comes back within 200 ms.
                assert!((1..=200).contains(&retry_after_ms), "{f:?}");
                true
            }
            _ => false,
        })
        .count();
    assert!(refused >= 40, "only {refused} refusals before the disconnect");
    assert_eq!(
        disconnect_code(&frames),
        Some(ErrorCode::RateLimited),
        "{frames:?}"
    );
    // Everyone else is unaffected.
    pair.exchange();
    a.ping().expect("alice's other session is fine");
}

/// The message rate is per connection, but a session's spent burst
/// carries over to the user's next session: a client used to spend the
/// burst, reconnect with its token and spend a fresh one, reaching a
/// burst per reconnect instead of the message rate.
#[test]
fn a_reconnect_does_not_refill_the_message_burst() {
    let server = TestServer::start_with(|c| {
        unexempt(c);
        c.limits.message_rate_per_sec = 1;
        c.limits.message_burst = 5;
        c.limits.rate_limit_disconnect_after = 50;
    });
    let alice = server.user_on_shard("balice", 0);
    let bob = server.user_on_shard("bbob", 1);
    let mut a = server.login_unsynced(&alice);
    for i in 0..5 {
        a.send_text(bob.id, &format!("burst {i}"))
            .expect("within the burst");
    }
    assert_eq!(code_of(a.send_text(bob.id, "one more")), ErrorCode::RateLimited);
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    let mut again = server.login_unsynced(&alice);
    assert_eq!(
        code_of(again.send_text(bob.id, "a fresh burst?")),
        ErrorCode::RateLimited
    );
    // The rate itself goes on: a token is back within a second.
    std::thread::sleep(Duration::from_millis(1100));
    again.send_text(bob.id, "later").expect("a token came back");
}

#[test]
fn one_to_one_receipts_share_the_message_rate_and_group_receipts_do_not() {
    let server = message_rate_server(5);
    let alice = server.user_on_shard("ralice", 0);
    let bob = server.user_on_shard("rbob", 1);
    // Unsynced: a Sync is metered as a message too.
    let mut a = server.login_unsynced(&alice);
    let mut b = server.login(&bob);
    b.send_text(alice.id, "hello").expect("send");
    let conv = tern_client::ConvId::direct(alice.id, bob.id);
    // Each 1:1 receipt is a store write and a push to the peer: a client
    // cannot send them faster than messages (a blocked one included).
    for _ in 0..5 {
        a.receipt(conv, tern_client::ReceiptKind::Read, 1)
            .expect("within the burst");
    }
    assert_eq!(
        code_of(a.receipt(conv, tern_client::ReceiptKind::Read, 1)),
        ErrorCode::RateLimited
    );
    // Group receipts push nothing and are metered only as frames.
    std::thread::sleep(Duration::from_millis(1100)); // the message bucket refills
    let group = a.group_create("receipts").expect("create");
    let group_conv = tern_client::ConvId::Group { group };
    let sent = a.send_group_text(group, "one").expect("send");
    for _ in 0..20 {
        a.receipt(group_conv, tern_client::ReceiptKind::Read, sent.seq)
            .expect("group receipts are not messages");
    }
}

#[test]
fn rare_costly_requests_share_the_message_rate() {
    let server = message_rate_server(5);
    let alice = server.user_on_shard("calice", 0);
    // Unsynced: a Sync is metered as a message too.
    let mut a = server.login_unsynced(&alice);
    // Each a synced write (and a tombstone kept for ever for a deleted
    // group), or a read of many keys: not at the frame rate.
    for _ in 0..2 {
        let group = a.group_create("churn").expect("within the burst");
        a.group_delete(group).expect("within the burst");
    }
    a.conversations(0, 10).expect("within the burst");
    assert_eq!(code_of(a.group_create("churn")), ErrorCode::RateLimited);
    assert_eq!(code_of(a.conversations(0, 10)), ErrorCode::RateLimited);
    a.ping().expect("cheap requests are not messages");
}

#[test]
fn membership_changes_share_the_message_rate() {
    let server = message_rate_server(4);
    let owner = server.user_on_shard("mowner", 0);
    let joiner = server.user_on_shard("mjoiner", 1);
    let group = server.login(&owner).group_create("open door").expect("create");
    // Unsynced: a Sync is metered as a message too.
    let mut j = server.login_unsynced(&joiner);
    // A join and a leave are each a synced write and a rebuild of the
    // group's cached roster: a join/leave loop is not at the frame rate.
    for _ in 0..2 {
        j.group_join(group).expect("within the burst");
        j.group_leave(group).expect("within the burst");
    }
    assert_eq!(code_of(j.group_join(group)), ErrorCode::RateLimited);
    assert_eq!(code_of(j.group_leave(group)), ErrorCode::RateLimited);
    j.ping().expect("cheap requests are not messages");
}

#[test]
fn a_syncs_cursors_are_paid_for_as_messages() {
    let server = message_rate_server(10);
    let alice = server.user_on_shard("salice", 0);
    let bob = server.user_on_shard("sbob", 1);
    // The login's Sync (one message: it reads every group of the user)
    // and one message.
    let mut a = server.login(&alice);
    a.send_text(bob.id, "before").expect("within the burst");
    // 1,920 cursors, each a receipt write to store: 1,920 / 64 = 30
    // messages more, three bursts of 10. The Sync itself is served...
    let cursors: Vec<tern_client::proto::Cursor> = (1..=1920u64)
        .map(|peer| tern_client::proto::Cursor {
            conv: tern_client::ConvId::direct(alice.id, bob.id + peer),
            seq: 1,
        })
        .collect();
    match a.request(ClientBody::Sync { cursors }) {
        Ok(ServerBody::SyncDone { .. }) => {}
        other => panic!("the Sync is served: {other:?}"),
    }
    // ...and the next message waits out the debt.
    assert_eq!(code_of(a.send_text(bob.id, "after")), ErrorCode::RateLimited);
    // So does the next Sync: Syncs back to back used to be served at the
    // frame rate, each storing up to 4,096 cursors.
    assert_eq!(
        code_of(a.request(ClientBody::Sync { cursors: Vec::new() })),
        ErrorCode::RateLimited
    );
    // Flooding on: the Disconnect carries the time the debt needs (about
    // 4 s at 5/s), not a flat second.
    for n in 0..60 {
        match a.send_text(bob.id, "flood") {
            Err(tern_client::ClientError::Server {
                code: ErrorCode::RateLimited,
                ..
            }) => continue,
            Err(tern_client::ClientError::Disconnected {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) => {
                assert!(retry_after_ms > 1000, "retry after {retry_after_ms} ms");
                return;
            }
            other => panic!("send {n}: {other:?}"),
        }
    }
    panic!("no Disconnect after 60 refusals");
}

#[test]
fn frame_rate_meters_cheap_requests_even_before_login() {
    let server = TestServer::start_with(|c| {
        unexempt(c);
        c.limits.frame_rate_per_sec = 10;
        c.limits.frame_burst = 10;
    });
    let mut conn = RawConn::connect(server.addr());
    conn.hello(); // one token
    for _ in 0..9 {
        let id = conn.send(ClientBody::Ping { nonce: 1 });
        let frame = conn.expect_frame();
        assert_eq!(frame.request_id, id);
        assert!(matches!(frame.body, ServerBody::Pong { .. }), "{frame:?}");
    }
    conn.send(ClientBody::Ping { nonce: 2 });
    conn.expect_error(ErrorCode::RateLimited);
    std::thread::sleep(Duration::from_millis(150));
    conn.send(ClientBody::Ping { nonce: 3 });
    assert!(matches!(conn.expect_frame().body, ServerBody::Pong { nonce: 3 }));
}

/// A server whose password hashing is slow enough to measure (~100 ms in
/// these builds) and one shard, so that every login meets the same table.
fn slow_hash_server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        unexempt(c);
        c.shards = 1;
        c.store.argon2_memory_kib = 64 * 1024;
        c.store.argon2_iterations = 2;
        tweak(c);
    })
}

#[test]
fn password_checks_in_flight_count_against_the_back_off() {
    // The back-off used to count only failures already hashed, so guesses
    // sent at once all passed the check before the first failed: a burst
    // on as many connections as a guesser could open got that many argon2
    // checks per back-off instead of `login_failures_per_account` (and,
    // from one address, `login_failures_per_ip`) in all.
    const GUESSES: usize = 12;
    for per_account in [true, false] {
        let server = slow_hash_server(|c| {
            if per_account {
                c.limits.login_failures_per_account = 3;
                c.limits.login_failures_per_ip = 0;
            } else {
                c.limits.login_failures_per_account = 0;
                c.limits.login_failures_per_ip = 3;
            }
            c.limits.max_connections_per_ip = 100;
        });
        let mut client = server.connect();
        let names: Vec<String> = (0..GUESSES).map(|n| format!("carol{n}")).collect();
        let accounts = if per_account { &names[..1] } else { &names[..] };
        for name in accounts {
            client.register(name, PASSWORD).expect("register");
        }
        let mut conns: Vec<RawConn> = (0..GUESSES)
            .map(|_| {
                let mut raw = RawConn::connect(server.addr());
                raw.hello();
                raw
            })
            .collect();
        for (n, raw) in conns.iter_mut().enumerate() {
            raw.send(ClientBody::Login {
                username: accounts[n % accounts.len()].clone(),
                password: b"wrong password".to_vec(),
            });
        }
        let mut codes = std::collections::BTreeMap::new();
        for raw in &mut conns {
            let frame = raw.expect_frame();
            let code = match frame.body {
                ServerBody::Error { code, .. } => code,
                other => panic!("expected an error, got {other:?}"),
            };
            *codes.entry(format!("{code:?}")).or_insert(0) += 1;
        }
        assert_eq!(
            codes.get("AuthFailed").copied().unwrap_or(0),
            3,
            "per account {per_account}: {codes:?}"
        );
        assert_eq!(
            codes.get("RateLimited").copied().unwrap_or(0),
            GUESSES - 3,
            "per account {per_account}: {codes:?}"
        );
    }
}

#[test]
fn account_backoff_refuses_before_hashing_and_resets_on_success() {
    let server = slow_hash_server(|c| {
        c.limits.login_failures_per_account = 3;
        c.limits.login_failures_per_ip = 0;
        c.limits.login_backoff_base = Duration::from_millis(1500);
    });
    let mut client = server.connect();
    client.register("carol", PASSWORD).expect("register");
    let mut hashed = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(
            code_of(client.login("carol", "wrong password")),
            ErrorCode::AuthFailed
        );
        hashed.push(started.elapsed());
    }
    // Backing off now: refused without hashing, even the right password.
    let mut refused = Vec::new();
    for password in ["wrong password", PASSWORD, "another guess"] {
        let started = Instant::now();
        assert_eq!(code_of(client.login("carol", password)), ErrorCode::RateLimited);
        refused.push(started.elapsed());
    }
    println!("checked attempts: {hashed:?}; refused attempts: {refused:?}");
    for took in &refused {
        assert!(
            *took < Duration::from_millis(50),
            "a refused attempt took {took:?}"
        );
    }
    let slowest_refusal = refused.iter().max().copied().unwrap_or_default();
    let fastest_check = hashed.iter().min().copied().unwrap_or_default();
    assert!(
        fastest_check > slowest_refusal * 2,
        "refusals ({refused:?}) should be far cheaper than checks ({hashed:?})"
    );
    // Another account from the same address is not affected.
    client.register("dave", PASSWORD).expect("register");
    let mut other = server.connect();
    other.login("dave", PASSWORD).expect("dave is not backing off");
    // After the back-off the right password works and resets the count.
    std::thread::sleep(Duration::from_millis(1600));
    let mut ok = server.connect();
    ok.login("carol", PASSWORD).expect("login after the back-off");
    assert_eq!(
        code_of(client.login("carol", "wrong again")),
        ErrorCode::AuthFailed
    );
}

#[test]
fn address_backoff_covers_every_account_from_that_address() {
    let server = slow_hash_server(|c| {
        c.limits.login_failures_per_account = 0;
        c.limits.login_failures_per_ip = 3;
        c.limits.login_backoff_base = Duration::from_secs(30);
    });
    let mut client = server.connect();
    for name in ["erin", "frank", "grace"] {
        client.register(name, PASSWORD).expect("register");
        assert_eq!(
            code_of(client.login(name, "wrong password")),
            ErrorCode::AuthFailed
        );
    }
    let started = Instant::now();
    assert_eq!(code_of(client.login("erin", PASSWORD)), ErrorCode::RateLimited);
    // Tokens are refused too while the address backs off.
    assert_eq!(code_of(client.login_token(&[7; 32])), ErrorCode::RateLimited);
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[test]
fn concurrent_connections_per_address_are_capped() {
    let server = TestServer::start_with(|c| {
        unexempt(c);
        c.shards = 1;
        c.limits.max_connections_per_ip = 3;
        c.limits.connection_rate_per_ip = 0;
    });
    let mut open: Vec<RawConn> = (0..3)
        .map(|_| {
            let mut conn = RawConn::connect(server.addr());
            conn.hello();
            conn
        })
        .collect();
    let mut refused = RawConn::connect(server.addr());
    let frames = refused.expect_closed();
    assert_eq!(
        disconnect_code(&frames),
        Some(ErrorCode::LimitExceeded),
        "{frames:?}"
    );
    // Closing one frees its place.
    drop(open.pop());
    common::eventually("a freed connection slot", || {
        let mut conn = RawConn::connect(server.addr());
        conn.send(ClientBody::Hello {
            version: tern_proto::PROTOCOL_VERSION,
            client_name: "again".into(),
        });
        match conn.read(Duration::from_secs(2)) {
            RawRead::Frame(f) if matches!(f.body, ServerBody::HelloOk { .. }) => Some(()),
            _ => None,
        }
    });
    for conn in &mut open {
        conn.send(ClientBody::Ping { nonce: 9 });
        assert!(matches!(conn.expect_frame().body, ServerBody::Pong { nonce: 9 }));
    }
}

#[test]
fn new_connections_per_address_are_rate_limited() {
    let server = TestServer::start_with(|c| {
        unexempt(c);
        c.shards = 1;
        c.limits.connection_rate_per_ip = 2;
        c.limits.connection_burst_per_ip = 3;
    });
    let mut kept = Vec::new();
    for _ in 0..3 {
        let mut conn = RawConn::connect(server.addr());
        conn.hello();
        kept.push(conn);
    }
    let mut refused = RawConn::connect(server.addr());
    let frames = refused.expect_closed();
    match frames.first().map(|f| &f.body) {
        Some(ServerBody::Disconnect {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) => assert!((1..=500).contains(retry_after_ms), "{retry_after_ms}"),
        other => panic!("expected Disconnect(RateLimited), got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(600));
    let mut later = RawConn::connect(server.addr());
    later.hello();
}

#[test]
fn registrations_per_address_are_rate_limited_before_hashing() {
    let server = slow_hash_server(|c| {
        c.limits.registration_rate_per_ip_per_hour = 1;
        c.limits.registration_burst_per_ip = 2;
    });
    let mut client = server.connect();
    client.register("henry", PASSWORD).expect("first registration");
    client.register("irene", PASSWORD).expect("second registration");
    match client.register("jack", PASSWORD) {
        Err(
            e @ tern_client::ClientError::Server {
                code: ErrorCode::RateLimited,
                ..
            },
        ) => {
            // The wait is machine-readable, and named in the text too.
            let wait = e.retry_after().expect("a retry hint");
            assert!(
                wait > Duration::ZERO && wait <= Duration::from_secs(3600),
                "{wait:?}"
            );
            assert!(e.to_string().contains("retry after"), "{e}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    // Refused before anything was stored: the name is still free, and
    // the connection, logins and the accounts made before carry on.
    assert_eq!(code_of(client.login("jack", PASSWORD)), ErrorCode::AuthFailed);
    let mut other = server.connect();
    assert_eq!(
        code_of(other.register("kate", PASSWORD)),
        ErrorCode::RateLimited,
        "the limit is per address, not per connection"
    );
    client
        .login("henry", PASSWORD)
        .expect("login is not metered as a registration");
}

#[test]
fn login_deadline_closes_a_client_that_trickles_frames() {
    let server = TestServer::start_with(|c| {
        c.login_timeout = Duration::from_millis(800);
    });
    let user = server.user_on_shard("henry", 0);
    let started = Instant::now();
    let mut slow = RawConn::connect(server.addr());
    slow.hello();
    // Pings keep the idle timeout at bay, but not the login deadline.
    let frames = loop {
        slow.send_raw(&encoded(
            7,
            ClientBody::Ping {
                nonce: started.elapsed().as_millis() as u64,
            },
        ))
        .expect("write ping");
        match slow.read(Duration::from_millis(200)) {
            RawRead::Frame(f) if matches!(f.body, ServerBody::Pong { .. }) => {
                std::thread::sleep(Duration::from_millis(150));
            }
            RawRead::Frame(f) => {
                let mut frames = vec![f];
                frames.extend(slow.expect_closed());
                break frames;
            }
            RawRead::Closed => break Vec::new(),
            RawRead::Timeout => {}
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never closed");
    };
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    assert_eq!(
        disconnect_code(&frames),
        Some(ErrorCode::IdleTimeout),
        "{frames:?}"
    );
    // A client that logs in in time stays past the deadline.
    let mut prompt = server.login(&user);
    std::thread::sleep(Duration::from_millis(1000));
    prompt
        .ping()
        .expect("a logged-in session outlives the login deadline");
}

#[test]
fn logout_revokes_only_that_sessions_token() {
    let server = TestServer::start();
    let user = server.user_on_shard("iris", 0);
    let mut first = server.connect();
    let t1 = first.login(&user.name, PASSWORD).expect("login").token;
    let mut second = server.connect();
    let t2 = second.login(&user.name, PASSWORD).expect("login").token;
    first.logout().expect("logout answers Ok");
    assert!(matches!(
        first.ping(),
        Err(tern_client::ClientError::Closed | tern_client::ClientError::Io(_))
    ));
    let mut again = server.connect();
    assert_eq!(code_of(again.login_token(&t1)), ErrorCode::AuthFailed);
    second.ping().expect("the other session lives on");
    let mut third = server.connect();
    third.login_token(&t2).expect("the other token still works");
}

#[test]
fn a_user_keeps_at_most_max_tokens_per_user_and_loses_the_oldest() {
    let server = TestServer::start_with(|c| c.store.max_tokens_per_user = 2);
    let user = server.user_on_shard("ivan", 1);
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let mut client = server.connect();
        tokens.push(client.login(&user.name, PASSWORD).expect("login").token);
        // Tokens are ordered by expiry, in milliseconds.
        std::thread::sleep(Duration::from_millis(3));
    }
    let mut client = server.connect();
    assert_eq!(code_of(client.login_token(&tokens[0])), ErrorCode::AuthFailed);
    for token in &tokens[1..] {
        server
            .connect()
            .login_token(token)
            .expect("the newest tokens still work");
    }
    client
        .login(&user.name, PASSWORD)
        .expect("a password login still works");
}

#[test]
fn password_change_revokes_every_token_and_keeps_sessions_open() {
    let server = TestServer::start();
    let user = server.user_on_shard("jack", 0);
    let peer = server.user_on_shard("kate", 1);
    let mut first = server.connect();
    let t1 = first.login(&user.name, PASSWORD).expect("login").token;
    let mut second = server.connect();
    let t2 = second.login(&user.name, PASSWORD).expect("login").token;
    assert_eq!(
        code_of(first.change_password("not the password", "new password 1")),
        ErrorCode::AuthFailed
    );
    assert_eq!(
        code_of(first.change_password(PASSWORD, "short")),
        ErrorCode::InvalidArgument
    );
    first.change_password(PASSWORD, "new password 1").expect("change");
    // Both sessions stay connected and usable.
    first.ping().expect("this session stays");
    second
        .send_text(peer.id, "still here")
        .expect("the other session stays");
    for token in [&t1, &t2] {
        let mut c = server.connect();
        assert_eq!(code_of(c.login_token(token)), ErrorCode::AuthFailed);
    }
    let mut c = server.connect();
    assert_eq!(code_of(c.login(&user.name, PASSWORD)), ErrorCode::AuthFailed);
    let mut c = server.connect();
    c.login(&user.name, "new password 1")
        .expect("the new password works");
}

fn filter_server(words: &str, mode: FilterMode) -> (TestServer, Arc<ContentFilter>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("words.txt");
    std::fs::write(&path, words).expect("write word list");
    let filter = Arc::new(ContentFilter::open(&path, mode).expect("word list loads"));
    let shared = filter.clone();
    let server = TestServer::start_with(move |c| c.content_filter = Some(shared));
    (server, filter, dir)
}

#[test]
fn content_filter_rejects_and_reloads_without_restart() {
    let (server, filter, dir) = filter_server("darn\n", FilterMode::Reject);
    let alice = server.user_on_shard("lena", 0);
    let bob = server.user_on_shard("mike", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    assert_eq!(
        code_of(a.send_text(bob.id, "well DARN it")),
        ErrorCode::ContentRejected
    );
    a.send_text(bob.id, "darning socks").expect("not a whole word");
    assert_eq!(expect_message(&mut b).content.body, b"darning socks");
    let group = a.group_create("club").expect("group");
    b.group_join(group).expect("join");
    assert_eq!(
        code_of(a.send_group_text(group, "darn")),
        ErrorCode::ContentRejected
    );

    std::fs::write(dir.path().join("words.txt"), "heck\n").expect("rewrite");
    assert_eq!(filter.reload().expect("reload"), 1);
    a.send_text(bob.id, "darn").expect("no longer filtered");
    assert_eq!(expect_message(&mut b).content.body, b"darn");
    assert_eq!(
        code_of(a.send_text(bob.id, "oh heck")),
        ErrorCode::ContentRejected
    );
}

#[test]
fn content_filter_masks_matches() {
    let (server, _filter, _dir) = filter_server("heck\nno way\n", FilterMode::Mask);
    let alice = server.user_on_shard("nora", 0);
    let bob = server.user_on_shard("otto", 1);
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    a.send_text(bob.id, "Heck, NO WAY!").expect("masked, not refused");
    assert_eq!(expect_message(&mut b).content.body, b"****, ******!");
    // History holds the masked text too: the original is never stored.
    a.send_text(bob.id, "fine").expect("send");
    assert_eq!(expect_message(&mut b).content.body, b"fine");
}

/// Logs in `count` times from `from` (a loopback address) with `names(i)`
/// and a wrong password; returns each answer's error code.
fn failed_logins(
    addr: SocketAddr,
    from: [u8; 4],
    names: impl Fn(usize) -> String,
    count: usize,
) -> Vec<ErrorCode> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from((from, 0)).into()).expect("bind");
    socket.connect_timeout(&addr.into(), TIMEOUT).expect("connect");
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut rx = FrameBuf::new(1 << 20);
    let mut call = |id: u64, body: ClientBody| -> ServerFrame {
        let mut out = AlignedVec::new();
        encode_client(&ClientFrame { request_id: id, body }, &mut out, 1 << 20).expect("encode");
        stream.write_all(&out).expect("write");
        loop {
            if let Some(body) = rx.next_body().expect("frame") {
                let archived = decode_server(body).expect("decode");
                let frame = rkyv::deserialize::<ServerFrame, BoxedError>(archived).expect("de");
                if frame.request_id == id {
                    return frame;
                }
                continue;
            }
            let slot = rx.read_slot().expect("slot");
            let n = stream.read(slot).expect("read");
            assert!(n > 0, "closed");
            rx.commit(n);
        }
    };
    let hello = call(
        1,
        ClientBody::Hello {
            version: PROTOCOL_VERSION,
            client_name: "guess".into(),
        },
    );
    assert!(matches!(hello.body, ServerBody::HelloOk { .. }), "{hello:?}");
    (0..count)
        .map(|i| {
            let frame = call(
                2 + i as u64,
                ClientBody::Login {
                    username: names(i),
                    password: b"wrong password".to_vec(),
                },
            );
            match frame.body {
                ServerBody::Error { code, .. } => code,
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

/// Failed logins for made-up account names fill the per-account table
/// (3 per address here, about 20 at the defaults); that must not switch
/// off the per-address limits for addresses seen afterwards, which a
/// shared room check for both tables did.
#[test]
fn junk_account_names_do_not_switch_off_the_limits_on_new_addresses() {
    let server = TestServer::start_with(|c| {
        unexempt(c);
        c.shards = 1;
        c.limits.max_tracked_addresses = 12;
        c.limits.login_failures_per_ip = 3;
        c.limits.login_failures_per_account = 3;
    });
    let victim = server.user_on_shard("victim", 0);
    // Control: a fresh address backs off after 3 failures.
    let control = failed_logins(server.addr(), [127, 0, 0, 2], |i| format!("ctrl{i}"), 6);
    assert_eq!(control[..3], [ErrorCode::AuthFailed; 3]);
    assert_eq!(control[3..], [ErrorCode::RateLimited; 3]);
    // Three more addresses, three junk names each: 12 accounts tracked.
    for host in 3..6u8 {
        let codes = failed_logins(server.addr(), [127, 0, 0, host], |i| format!("junk{host}x{i}"), 3);
        assert_eq!(codes, [ErrorCode::AuthFailed; 3]);
    }
    // The accounts table is full of junk names, the addresses table is
    // not: a new address still backs off after its 3 failures.
    let codes = failed_logins(server.addr(), [127, 0, 0, 9], |_| victim.name.clone(), 6);
    assert_eq!(codes[..3], [ErrorCode::AuthFailed; 3]);
    assert_eq!(codes[3..], [ErrorCode::RateLimited; 3], "{codes:?}");
}
