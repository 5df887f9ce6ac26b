//! Idle sessions park and come back, over real sockets: a session silent
//! for `park_after` parks (its tasks end and its socket waits in the
//! shard's epoll set), and it resumes when its client sends a frame, when
//! a message or presence change is sent to it, and when its client goes
//! away; the sweep closes it at its idle timeout, shutdown and kicks reach
//! it, and TLS sessions park and resume with their keys intact.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::{eventually, expect_message, TestServer, PASSWORD};
use tern_client::{Client, ClientOptions, ClientTls, ErrorCode, ServerBody};
use tern_engine::admin::{admin_request, serve_admin, AdminServer};

const PARK_AFTER: Duration = Duration::from_millis(150);

fn parking_server() -> TestServer {
    TestServer::start_with(|config| config.park_after = PARK_AFTER)
}

fn admin(server: &TestServer, dir: &Path) -> AdminServer {
    serve_admin(&dir.join("admin.sock"), server.admin_context()).expect("admin socket")
}

/// A gauge's total over all shards, from the admin socket's `stats`.
fn total(admin: &AdminServer, metric: &str) -> i64 {
    let stats = admin_request(admin.path(), "stats").expect("stats");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(metric)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total for {metric} in {stats}"))
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
    a.friend_add(&bob.name).expect("friend");
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

#[test]
fn tls_sessions_park_and_resume_with_their_keys() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = tern_net::tls::generate_self_signed(certs.path(), &[]).expect("self-signed cert");
    let server = TestServer::start_with(|config| {
        config.park_after = PARK_AFTER;
        config.tls = Some(tern_engine::config::TlsListener {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_chain: cert,
            key,
            allow_tls12: false,
        });
    });
    let admin = admin(&server, certs.path());
    let opts = ClientOptions {
        timeout: Duration::from_secs(10),
        tls: Some(ClientTls::new("localhost").with_ca_file(certs.path().join("cert.pem"))),
        ..ClientOptions::default()
    };
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
