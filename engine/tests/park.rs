//! Idle sessions park and come back, over real sockets: a session silent
//! for `park_after` parks (its tasks end and its socket waits in the
//! shard's epoll set), and it resumes when its client sends a frame, when
//! a message or presence change is sent to it, and when its client goes
//! away; the sweep closes it at its idle timeout, shutdown and kicks reach
//! it, and TLS sessions park and resume with their keys intact. Heartbeats
//! alone are answered without resuming, over plain TCP and TLS; anything
//! else that arrives with them (a request, half a frame) resumes the
//! session with nothing lost.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::{admin, befriend_offline, eventually, expect_message, total, TestServer, PASSWORD};
use rkyv::util::AlignedVec;
use tern_client::ClientBody;
use tern_client::{Client, ClientOptions, ClientTls, ErrorCode, ServerBody};
use tern_engine::admin::{admin_request, AdminServer};
use tern_proto::{encode_client, ClientFrame};

const PARK_AFTER: Duration = Duration::from_millis(150);

fn parking_server() -> TestServer {
    TestServer::start_with(|config| config.park_after = PARK_AFTER)
}

fn wait_parked(admin: &AdminServer, sessions: i64) {
    eventually(&format!("{sessions} parked sessions"), || {
        (total(admin, "tern_sessions_parked") == sessions).then_some(())
    });
}

#[test]
fn a_parked_session_resumes_on_its_own_frame_and_on_a_delivery() {
    let server = parking_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("park_a", 0);
    let bob = server.user_on_shard("park_b", 1 % server.shards());
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    wait_parked(&admin, 2);

    // Alice's frame wakes her session; the delivery wakes Bob's.
    a.send_text(bob.id, "wake up")
        .expect("send from a parked session");
    assert_eq!(expect_message(&mut b).content.body, b"wake up");

    // Sessions park again and again, and answer every time.
    for round in 0..3 {
        wait_parked(&admin, 2);
        a.ping()
            .unwrap_or_else(|e| panic!("ping after parking, round {round}: {e}"));
        b.send_text(alice.id, &format!("round {round}")).expect("reply");
        assert_eq!(
            expect_message(&mut a).content.body,
            format!("round {round}").into_bytes()
        );
    }
    assert_eq!(total(&admin, "tern_sessions_open"), 2);
}

#[test]
fn a_presence_change_reaches_a_parked_friend() {
    let server = parking_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parkp_a", 0);
    let bob = server.user_on_shard("parkp_b", 1 % server.shards());
    let mut a = server.login(&alice);
    befriend_offline(&server, &mut a, &alice, &bob);
    wait_parked(&admin, 1);

    let b = server.login(&bob);
    let online = eventually("bob's presence", || {
        match a.next_push(Duration::from_millis(50)) {
            Ok(Some(ServerBody::Presence { user, online })) if user == bob.id => Some(online),
            _ => None,
        }
    });
    assert!(online);
    drop(b);
}

#[test]
fn a_parked_session_whose_client_leaves_is_closed() {
    let server = parking_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parkc_a", 0);
    let a = server.login(&alice);
    wait_parked(&admin, 1);
    drop(a);
    eventually("the session to close", || {
        (total(&admin, "tern_sessions_open") == 0).then_some(())
    });
    assert_eq!(total(&admin, "tern_sessions_parked"), 0);
}

#[test]
fn the_sweep_closes_a_parked_session_at_its_idle_timeout() {
    let server = TestServer::start_with(|config| {
        config.park_after = PARK_AFTER;
        config.idle_timeout = Duration::from_millis(900);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parki_a", 0);
    let mut a = server.login(&alice);
    wait_parked(&admin, 1);
    match a.next_push(Duration::from_secs(5)) {
        Ok(Some(ServerBody::Disconnect { code, .. })) => assert_eq!(code, ErrorCode::IdleTimeout),
        other => panic!("expected Disconnect(IdleTimeout), got {other:?}"),
    }
    eventually("the session to close", || {
        (total(&admin, "tern_sessions_open") == 0).then_some(())
    });
}

#[test]
fn kicks_and_shutdown_reach_parked_sessions() {
    let server = parking_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parkk_a", 0);
    let bob = server.user_on_shard("parkk_b", 1 % server.shards());
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    wait_parked(&admin, 2);

    let answer = admin_request(admin.path(), &format!("kick {}", alice.name)).expect("kick");
    assert!(answer.contains("kicked 1 session"), "{answer}");
    match a.next_push(Duration::from_secs(5)) {
        Ok(Some(ServerBody::Disconnect { code, .. })) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("expected Disconnect(Forbidden), got {other:?}"),
    }

    wait_parked(&admin, 1);
    drop(admin);
    let stopping = std::thread::spawn(move || server.shutdown());
    match b.next_push(Duration::from_secs(5)) {
        Ok(Some(ServerBody::Disconnect { code, .. })) => assert_eq!(code, ErrorCode::ShuttingDown),
        other => panic!("expected Disconnect(ShuttingDown), got {other:?}"),
    }
    stopping.join().expect("shutdown");
}

/// A parking server with a TLS listener, its admin socket, and options for
/// clients that trust its self-signed certificate.
fn tls_parking_server(certs: &Path) -> (TestServer, AdminServer, ClientOptions) {
    let (cert, key) = tern_net::tls::generate_self_signed(certs, &[]).expect("self-signed cert");
    let server = TestServer::start_with(|config| {
        config.park_after = PARK_AFTER;
        config.tls = Some(tern_engine::config::TlsListener {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_chain: cert,
            key,
            allow_tls12: false,
        });
    });
    let admin = admin(&server, certs);
    let opts = ClientOptions {
        timeout: Duration::from_secs(10),
        tls: Some(ClientTls::new("localhost").with_ca_file(certs.join("cert.pem"))),
        ..ClientOptions::default()
    };
    (server, admin, opts)
}

#[test]
fn tls_sessions_park_and_resume_with_their_keys() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (server, admin, opts) = tls_parking_server(certs.path());
    let tls_addr = server.tls_addr().expect("TLS listener");
    let alice = server.user_on_shard("parkt_a", 0);
    let bob = server.user_on_shard("parkt_b", 1 % server.shards());
    let mut a = Client::connect(tls_addr, opts.clone()).expect("TLS connect");
    a.login(&alice.name, PASSWORD).expect("login over TLS");
    let mut b = Client::connect(tls_addr, opts).expect("TLS connect");
    b.login(&bob.name, PASSWORD).expect("login over TLS");
    for round in 0..3 {
        wait_parked(&admin, 2);
        a.send_text(bob.id, &format!("secret {round}"))
            .expect("send over TLS");
        assert_eq!(
            expect_message(&mut b).content.body,
            format!("secret {round}").into_bytes()
        );
    }
}

#[test]
fn tls_heartbeats_are_answered_without_resuming_and_requests_still_resume() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (server, admin, opts) = tls_parking_server(certs.path());
    let tls_addr = server.tls_addr().expect("TLS listener");
    let alice = server.user_on_shard("parktp_a", 0);
    let mut a = Client::connect(tls_addr, opts).expect("TLS connect");
    a.login(&alice.name, PASSWORD).expect("login over TLS");
    wait_parked(&admin, 1);
    for round in 0..3 {
        a.ping()
            .unwrap_or_else(|e| panic!("TLS ping {round} while parked: {e}"));
        assert_eq!(total(&admin, "tern_sessions_parked"), 1, "round {round}");
    }
    assert_eq!(total(&admin, "tern_parked_pings_total"), 3);

    // A ping record then a request record, sent back to back: the ping is
    // answered in place, the request resumes the session, which finds it
    // decrypted in the TLS state; the answers keep their order.
    let ping = frames(vec![(200, ClientBody::Ping { nonce: 9 })]);
    let request = frames(vec![(
        201,
        ClientBody::ResolveUser {
            username: alice.name.clone(),
        },
    )]);
    a.send_raw(&ping).expect("send");
    a.send_raw(&request).expect("send");
    let timeout = Duration::from_secs(10);
    let pong = a.read_frame(timeout).expect("read").expect("pong");
    assert_eq!(pong.request_id, 200);
    assert!(matches!(pong.body, ServerBody::Pong { nonce: 9 }), "{pong:?}");
    let user = a.read_frame(timeout).expect("read").expect("answer");
    assert_eq!(user.request_id, 201);
    assert!(
        matches!(user.body, ServerBody::User { user, .. } if user == alice.id),
        "{user:?}"
    );

    // Half a ping in its own record: the session resumes and waits for
    // the rest.
    wait_parked(&admin, 1);
    let ping = frames(vec![(202, ClientBody::Ping { nonce: 10 })]);
    let (head, tail) = ping.split_at(5);
    a.send_raw(head).expect("send");
    eventually("the session to resume", || {
        (total(&admin, "tern_sessions_parked") == 0).then_some(())
    });
    a.send_raw(tail).expect("send");
    let pong = a.read_frame(timeout).expect("read").expect("pong");
    assert_eq!(pong.request_id, 202);
    assert!(matches!(pong.body, ServerBody::Pong { nonce: 10 }), "{pong:?}");
}

#[test]
fn a_half_sent_frame_keeps_a_session_from_parking_until_its_idle_timeout() {
    let server = TestServer::start_with(|config| {
        config.park_after = PARK_AFTER;
        config.idle_timeout = Duration::from_millis(1200);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parkh_a", 0);
    let mut raw = common::RawConn::connect(server.addr());
    raw.login(&alice);
    // The first bytes of a frame header, and nothing more.
    raw.send_raw(&[0x00, 0x00]).expect("send");
    std::thread::sleep(PARK_AFTER * 4);
    assert_eq!(total(&admin, "tern_sessions_parked"), 0);
    let mut socket: TcpStream = raw.stream;
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = socket.read_to_end(&mut rest);
    eventually("the session to close", || {
        (total(&admin, "tern_sessions_open") == 0).then_some(())
    });
}

#[test]
fn heartbeats_are_answered_without_resuming_the_session() {
    let server = parking_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parkhb_a", 0);
    let mut a = server.login(&alice);
    wait_parked(&admin, 1);
    for round in 0..3 {
        a.ping()
            .unwrap_or_else(|e| panic!("ping {round} while parked: {e}"));
        // A resumed session would stay live for PARK_AFTER.
        assert_eq!(total(&admin, "tern_sessions_parked"), 1, "round {round}");
    }
    assert_eq!(total(&admin, "tern_parked_pings_total"), 3);
    // Still a working session: a message from Bob reaches it.
    let bob = server.user_on_shard("parkhb_b", 1 % server.shards());
    let mut b = server.login_unsynced(&bob);
    b.send_text(alice.id, "after the heartbeats").expect("send");
    assert_eq!(expect_message(&mut a).content.body, b"after the heartbeats");
}

/// Frames encoded back to back, to arrive in one segment.
fn frames(bodies: Vec<(u64, ClientBody)>) -> AlignedVec {
    let mut out = AlignedVec::new();
    for (request_id, body) in bodies {
        encode_client(&ClientFrame { request_id, body }, &mut out, 1 << 20).expect("encode");
    }
    out
}

#[test]
fn a_request_or_half_a_frame_behind_a_heartbeat_resumes_the_session_in_order() {
    let server = parking_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parkrq_a", 0);
    let mut raw = common::RawConn::connect(server.addr());
    raw.login(&alice);
    wait_parked(&admin, 1);

    // A ping and a request in one segment: both answered, in order.
    let both = frames(vec![
        (100, ClientBody::Ping { nonce: 7 }),
        (
            101,
            ClientBody::ResolveUser {
                username: alice.name.clone(),
            },
        ),
    ]);
    raw.send_raw(&both).expect("send");
    let pong = raw.expect_frame();
    assert_eq!(pong.request_id, 100);
    assert!(matches!(pong.body, ServerBody::Pong { nonce: 7 }), "{pong:?}");
    let user = raw.expect_frame();
    assert_eq!(user.request_id, 101);
    assert!(
        matches!(user.body, ServerBody::User { user, .. } if user == alice.id),
        "{user:?}"
    );
    assert_eq!(total(&admin, "tern_parked_pings_total"), 0);

    // Half a ping: the session resumes and waits for the rest.
    wait_parked(&admin, 1);
    let ping = frames(vec![(102, ClientBody::Ping { nonce: 8 })]);
    let (head, tail) = ping.split_at(5);
    raw.send_raw(head).expect("send");
    eventually("the session to resume", || {
        (total(&admin, "tern_sessions_parked") == 0).then_some(())
    });
    raw.send_raw(tail).expect("send");
    let pong = raw.expect_frame();
    assert_eq!(pong.request_id, 102);
    assert!(matches!(pong.body, ServerBody::Pong { nonce: 8 }), "{pong:?}");
}

#[test]
fn heartbeats_answered_while_parked_keep_the_session_past_its_idle_timeout() {
    let server = TestServer::start_with(|config| {
        config.park_after = PARK_AFTER;
        config.idle_timeout = Duration::from_millis(900);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = admin(&server, dir.path());
    let alice = server.user_on_shard("parkka_a", 0);
    let mut a = server.login(&alice);
    wait_parked(&admin, 1);
    // Three idle timeouts' worth of heartbeats, each a third of it apart.
    for beat in 0..9 {
        std::thread::sleep(Duration::from_millis(300));
        a.ping().unwrap_or_else(|e| panic!("heartbeat {beat}: {e}"));
    }
    assert!(total(&admin, "tern_parked_pings_total") >= 6);
    assert_eq!(total(&admin, "tern_sessions_open"), 1);
}
