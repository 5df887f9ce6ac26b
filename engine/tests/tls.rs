//! TLS end to end: chat between users on different home shards over TLS
//! (so the TLS session moves with its socket), plain clients refused on the
//! TLS port, certificate reload without dropping connections, and the
//! handshake deadline against clients that never finish one.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{expect_message, register_on_shard, TestServer, PASSWORD};
use tern_client::{Client, ClientError, ClientOptions, ClientTls, ErrorCode, ServerBody};
use tern_engine::config::TlsListener;

fn tls_server(cert_dir: &Path) -> TestServer {
    let (cert, key) = tern_net::tls::generate_self_signed(cert_dir, &[]).expect("self-signed cert");
    TestServer::start_with(|config| {
        config.tls = Some(TlsListener {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_chain: cert,
            key,
            allow_tls12: false,
        });
        config.handshake_timeout = Duration::from_millis(500);
    })
}

fn tls_opts(ca: &Path) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        tls: Some(ClientTls::new("localhost").with_ca_file(ca)),
        ..ClientOptions::default()
    }
}

fn tls_addr(server: &TestServer) -> SocketAddr {
    server.tls_addr().expect("TLS listener")
}

#[test]
fn users_on_different_shards_chat_over_tls() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = tls_server(certs.path());
    let ca = certs.path().join("cert.pem");
    let mut setup = Client::connect(tls_addr(&server), tls_opts(&ca)).expect("TLS connect");
    let alice = register_on_shard(&mut setup, "tlsalice", 0, server.shards());
    let bob = register_on_shard(&mut setup, "tlsbob", 1, server.shards());

    // Both logins move their TLS sessions to the users' home shards
    // (at least one of them differs from the accepting shard).
    let mut a = Client::connect(tls_addr(&server), tls_opts(&ca)).expect("TLS connect");
    a.login(&alice.name, PASSWORD).expect("login over TLS");
    let mut b = Client::connect(tls_addr(&server), tls_opts(&ca)).expect("TLS connect");
    b.login(&bob.name, PASSWORD).expect("login over TLS");
    for i in 0..20 {
        a.send_text(bob.id, &format!("secret {i}"))
            .expect("send over TLS");
    }
    for i in 0..20 {
        assert_eq!(
            expect_message(&mut b).content.body,
            format!("secret {i}").into_bytes()
        );
    }
    b.send_text(alice.id, "ack").expect("reply over TLS");
    assert_eq!(expect_message(&mut a).content.body, b"ack");

    // The plain listener keeps working beside the TLS one.
    let mut plain = server.connect();
    plain.login(&alice.name, PASSWORD).expect("plain login");
    plain.ping().expect("plain ping");
}

/// Over TLS too, a refused frame with more pipelined behind it ends with
/// the server's `close_notify` and FIN while the server goes on reading
/// (its lingering close, protocol.md 2.6): the client may still write
/// until it closes, where a reset would have failed the write and could
/// have destroyed the error frame.
#[test]
fn a_refused_frame_over_tls_closes_without_a_reset() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = tls_server(certs.path());
    let ca = certs.path().join("cert.pem");
    let mut client = Client::connect(tls_addr(&server), tls_opts(&ca)).expect("TLS connect");
    // A frame header (24-byte body, no flags), a body that is no archive,
    // then 64 KiB the server will never parse.
    let mut bytes = 24u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&[0xAB; 24]);
    bytes.extend(std::iter::repeat_n(0x5a, 64 * 1024));
    client.send_raw(&bytes).expect("write");
    // The server refuses and closes first, with the rest unread.
    std::thread::sleep(Duration::from_millis(200));
    let frame = client
        .read_frame(Duration::from_secs(10))
        .expect("read")
        .expect("an answer");
    assert!(
        matches!(
            frame.body,
            ServerBody::Error {
                code: ErrorCode::MalformedFrame,
                ..
            }
        ),
        "{frame:?}"
    );
    assert!(
        matches!(
            client.read_frame(Duration::from_secs(10)),
            Err(ClientError::Closed)
        ),
        "the stream ends after the error"
    );
    std::thread::sleep(Duration::from_millis(100));
    client
        .send_raw(&[0x5a; 512])
        .expect("the server still reads: no reset");
}

#[test]
fn a_plain_client_gets_nowhere_on_the_tls_port() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = tls_server(certs.path());
    let plain = ClientOptions {
        timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    assert!(Client::connect(tls_addr(&server), plain).is_err());
    // The server is still fine.
    server.connect().ping().expect("ping");
}

#[test]
fn an_unfinished_handshake_is_dropped_at_its_deadline() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = tls_server(certs.path());
    let mut silent = TcpStream::connect(tls_addr(&server)).expect("tcp connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    let mut byte = [0u8; 1];
    // The server closes the socket (EOF or reset) once the deadline passes.
    let closed = matches!(silent.read(&mut byte), Ok(0) | Err(_));
    assert!(closed);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed after {waited:?}, before the deadline"
    );
    assert!(
        waited < Duration::from_secs(4),
        "not closed at the deadline ({waited:?})"
    );
}

#[test]
fn reloading_the_certificate_keeps_open_connections() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = tls_server(certs.path());
    let old_ca = certs.path().join("old-ca.pem");
    std::fs::copy(certs.path().join("cert.pem"), &old_ca).expect("keep old cert");
    let mut setup = Client::connect(tls_addr(&server), tls_opts(&old_ca)).expect("TLS connect");
    let user = register_on_shard(&mut setup, "reload", 0, server.shards());
    let mut open = Client::connect(tls_addr(&server), tls_opts(&old_ca)).expect("TLS connect");
    open.login(&user.name, PASSWORD).expect("login");

    // A new key pair in place of the old files, then a reload.
    tern_net::tls::generate_self_signed(certs.path(), &[]).expect("new cert");
    server
        .tls_certs()
        .expect("TLS configured")
        .reload()
        .expect("reload");
    let new_ca = certs.path().join("cert.pem");

    open.ping().expect("the open connection survives the reload");
    let mut fresh = Client::connect(tls_addr(&server), tls_opts(&new_ca)).expect("new cert in service");
    fresh.ping().expect("ping");
    assert!(
        Client::connect(tls_addr(&server), tls_opts(&old_ca)).is_err(),
        "new connections must no longer see the old certificate"
    );
}
