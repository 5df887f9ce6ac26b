//! Connection and server lifecycle: the idle timeout, restarting on the same
//! store, and clean shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_client::{Client, ClientError, ErrorCode, Friend, ServerBody};

const IDLE: Duration = Duration::from_millis(300);

/// Waits for the idle `Disconnect` on a silent client and checks the close.
fn expect_idle_disconnect(client: &mut Client, silent_since: Instant) {
    match client.next_push(Duration::from_secs(3)) {
        Ok(Some(ServerBody::Disconnect { code, .. })) => assert_eq!(code, ErrorCode::IdleTimeout),
        other => panic!("expected Disconnect(IdleTimeout), got {other:?}"),
    }
    let waited = silent_since.elapsed();
    assert!(
        waited >= IDLE - Duration::from_millis(50),
        "closed after only {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "closed only after {waited:?}");
    match client.next_push(TIMEOUT) {
        Err(ClientError::Closed) => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

#[test]
fn silent_connections_are_closed_with_idle_timeout() {
    let server = TestServer::start_with(|c| c.idle_timeout = IDLE);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);

    // Before Hello: nothing at all is sent.
    let started = Instant::now();
    let mut raw = RawConn::connect(server.addr());
    let frames = raw.expect_closed();
    assert!(
        matches!(
            frames.as_slice(),
            [] | [tern_client::ServerFrame {
                body: ServerBody::Disconnect {
                    code: ErrorCode::IdleTimeout,
                    ..
                },
                ..
            }]
        ),
        "{frames:?}"
    );
    assert!(started.elapsed() >= IDLE - Duration::from_millis(50));

    // After Hello, anonymous.
    let mut anonymous = server.connect();
    assert_eq!(anonymous.idle_timeout(), IDLE);
    expect_idle_disconnect(&mut anonymous, Instant::now());

    // Logged in, on each home shard.
    for user in [&alice, &bob] {
        let mut client = server.login(user);
        expect_idle_disconnect(&mut client, Instant::now());
    }
}

#[test]
fn pinging_keeps_a_connection_alive() {
    let server = TestServer::start_with(|c| c.idle_timeout = IDLE);
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut anonymous = server.connect();
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        for client in [&mut anonymous, &mut a, &mut b] {
            client.ping().expect("ping");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for client in [&mut anonymous, &mut a, &mut b] {
        match client.next_push(Duration::from_millis(1)) {
            Ok(None) | Ok(Some(ServerBody::Presence { .. })) => {}
            other => panic!("unexpected push on a pinging connection: {other:?}"),
        }
    }
    // Still fully usable.
    a.send_text(bob.id, "still here").expect("send");
    assert_eq!(expect_message(&mut b).content.body, b"still here");
}

/// Shuts `server` down and starts a new one on the same data directory.
fn restart_in_place(server: TestServer) -> TestServer {
    let dir = server.shutdown();
    TestServer::start_in(dir, |_| {})
}

fn accounts_friends_and_groups_survive(restart: fn(TestServer) -> TestServer) {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let carol = server.user_on_shard("carol", 1);
    let (token, group) = {
        let mut a = server.login(&alice);
        let mut b = server.login(&bob);
        let mut c = server.login(&carol);
        befriend(&mut a, &alice, &mut b, &bob);
        let group = a.group_create("survivors").expect("group");
        b.group_join(group).expect("join");
        c.group_join(group).expect("join");
        c.group_leave(group).expect("leave");
        a.send_group_text(group, "before").expect("send");
        assert_eq!(expect_message(&mut b).content.body, b"before");
        let token = server
            .connect()
            .login(&alice.name, PASSWORD)
            .expect("login")
            .token;
        (token, group)
    };
    let server = restart(server);

    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let mut by_token = server.connect();
    assert_eq!(
        by_token.login_token(&token).expect("token survives").user,
        alice.id
    );
    assert_eq!(
        a.friends().expect("friends"),
        vec![Friend {
            user: bob.id,
            username: bob.name.clone(),
            online: true
        }]
    );
    assert_eq!(b.friends().expect("friends").len(), 1);
    let mut expected = vec![alice.id, bob.id];
    expected.sort_unstable();
    assert_eq!(b.group_members(group).expect("members"), expected);
    // Bob never acknowledged "before": his new session's sync streams it
    // again from the store, then live delivery follows.
    a.send_group_text(group, "after").expect("send after restart");
    let before = expect_message(&mut b);
    assert_eq!((before.seq, before.content.body.as_slice()), (1, &b"before"[..]));
    let after = expect_message(&mut b);
    assert_eq!((after.seq, after.content.body.as_slice()), (2, &b"after"[..]));
    let mut c = server.login(&carol);
    assert_eq!(code_of(c.send_group_text(group, "hi")), ErrorCode::Forbidden);
    // New registrations do not reuse ids, and names stay taken.
    let dave = server.user_on_shard("dave", 0);
    assert!(dave.id > carol.id);
    assert_eq!(
        code_of(server.connect().register(&alice.name, PASSWORD)),
        ErrorCode::UsernameTaken
    );
}

#[test]
fn accounts_friends_groups_and_unread_messages_survive_a_restart() {
    accounts_friends_and_groups_survive(restart_in_place);
}

#[test]
fn sequence_numbers_continue_after_a_restart() {
    let server = TestServer::start();
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let last = {
        let mut a = server.login(&alice);
        let mut last = 0;
        for _ in 0..3 {
            last = a.send_text(bob.id, "before").expect("send").seq;
        }
        last
    };
    let server = restart_in_place(server);
    let mut a = server.login(&alice);
    let seq = a.send_text(bob.id, "after").expect("send").seq;
    assert!(
        seq > last,
        "seq {seq} after the restart repeats a seq handed out before it (last was {last})"
    );
}

#[test]
fn shutdown_tells_clients_to_come_back_later() {
    let server = TestServer::start_with(|c| c.shutdown_retry_after = Duration::from_millis(1500));
    let alice = server.user_on_shard("alice", 0);
    let bob = server.user_on_shard("bob", 1);
    let mut a = server.login(&alice);
    let mut a2 = server.login(&alice);
    let mut b = server.login(&bob);
    let addr = server.addr();

    let started = Instant::now();
    let stopper = std::thread::spawn(move || server.shutdown());
    for client in [&mut a, &mut a2, &mut b] {
        match client.next_push(TIMEOUT) {
            Ok(Some(ServerBody::Disconnect {
                code, retry_after_ms, ..
            })) => {
                assert_eq!(code, ErrorCode::ShuttingDown);
                assert_eq!(retry_after_ms, 1500);
            }
            other => panic!("expected Disconnect(ShuttingDown), got {other:?}"),
        }
        match client.next_push(TIMEOUT) {
            Err(ClientError::Closed) => {}
            other => panic!("expected the connection to be closed, got {other:?}"),
        }
    }
    stopper.join().expect("shutdown thread");
    // Clients that leave promptly let shutdown finish well within the grace period.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(
        Client::connect(addr, opts()).is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn shutdown_closes_connections_that_never_logged_in() {
    let server = TestServer::start();
    let mut anonymous = server.connect();
    let mut raw = RawConn::connect(server.addr());
    // Let the server accept the raw connection before it stops accepting.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let _dir = server.shutdown();
    // Closed, with or without a notice.
    match anonymous.next_push(TIMEOUT) {
        Err(ClientError::Closed) => {}
        Ok(Some(ServerBody::Disconnect { code, .. })) => assert_eq!(code, ErrorCode::ShuttingDown),
        other => panic!("anonymous connection after shutdown: {other:?}"),
    }
    raw.expect_closed();
}
