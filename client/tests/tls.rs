//! The client and the `tern` binary over TLS, against a small Tern server
//! built on `tern_net::tls` (the server side `ternd` uses) with a
//! self-signed certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tern_client::{
    Client, ClientBody, ClientError, ClientFrame, ClientOptions, ClientTls, ServerBody, ServerFrame,
};
use tern_net::frame_io::{fill, write_batch, Filled};
use tern_net::tls::{self, CertStore, TlsSettings, TlsStream};
use tern_proto::{decode_client, encode_server, FrameBuf, PROTOCOL_VERSION};

/// The server closes a connection (with close_notify) after this many pings.
const PINGS_BEFORE_CLOSE: usize = 2;

fn cert_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = tls::generate_self_signed(dir.path(), &[]).unwrap();
    (dir, cert)
}

/// Serves `conns` TLS connections one after another on a glommio executor
/// thread; returns each handshake's outcome.
fn tls_server(dir: &Path, conns: usize) -> (SocketAddr, JoinHandle<Vec<Result<(), String>>>) {
    let store = CertStore::open(TlsSettings {
        cert_chain: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        allow_tls12: false,
    })
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let io_memory =
            tern_net::memlock::io_memory_per_shard(8, tern_net::memlock::GLOMMIO_DEFAULT_RING_DEPTH).unwrap();
        let executor = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(io_memory)
            .make()
            .unwrap();
        executor.run(async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let mut outcomes = Vec::new();
            for _ in 0..conns {
                let stream = listener.accept().await.unwrap();
                match tls::accept(stream, store.current(), Duration::from_secs(5)).await {
                    Ok(tls) => {
                        serve(tls).await;
                        outcomes.push(Ok(()));
                    }
                    Err(e) => outcomes.push(Err(e.to_string())),
                }
            }
            outcomes
        })
    });
    (rx.recv_timeout(Duration::from_secs(10)).unwrap(), handle)
}

/// Answers Hello, Ping and Register until the client leaves or has pinged
/// `PINGS_BEFORE_CLOSE` times.
async fn serve(mut tls: TlsStream<TcpStream>) {
    let mut buf = FrameBuf::new(1 << 20);
    let mut out = AlignedVec::new();
    let mut pings = 0;
    loop {
        let body = match buf.next_body().unwrap() {
            Some(body) => body,
            None => match fill(&mut tls, &mut buf).await {
                Ok(Filled::Bytes(_)) => continue,
                Ok(Filled::Eof) | Err(_) => return,
            },
        };
        let frame: ClientFrame = rkyv::deserialize::<_, BoxedError>(decode_client(body).unwrap()).unwrap();
        let body = match frame.body {
            ClientBody::Hello { .. } => ServerBody::HelloOk {
                version: PROTOCOL_VERSION,
                max_frame_bytes: 1 << 20,
                idle_timeout_ms: 30_000,
            },
            ClientBody::Ping { nonce } => {
                pings += 1;
                ServerBody::Pong { nonce }
            }
            ClientBody::Register { .. } => ServerBody::Registered { user: 1 },
            other => panic!("unexpected {other:?}"),
        };
        out.clear();
        let reply = ServerFrame {
            request_id: frame.request_id,
            body,
        };
        encode_server(&reply, &mut out, 1 << 20).unwrap();
        write_batch(&mut tls, &out).await.unwrap();
        if pings == PINGS_BEFORE_CLOSE {
            let _ = futures_lite::AsyncWriteExt::close(&mut tls).await;
            return;
        }
    }
}

fn opts(tls: ClientTls) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(5),
        tls: Some(tls),
        ..ClientOptions::default()
    }
}

#[test]
fn requests_over_tls_until_the_server_closes() {
    let (dir, cert) = cert_dir();
    let (addr, server) = tls_server(dir.path(), 1);
    let mut client = Client::connect(addr, opts(ClientTls::new("localhost").with_ca_file(&cert))).unwrap();
    assert!(format!("{client:?}").contains("tls: true"));
    for _ in 0..PINGS_BEFORE_CLOSE {
        client.ping().unwrap();
    }
    let err = client.ping().unwrap_err();
    assert!(matches!(err, ClientError::Closed), "{err:?}");
    assert_eq!(server.join().unwrap(), vec![Ok(())]);
}

#[test]
fn certificates_are_verified() {
    let (dir, cert) = cert_dir();
    let (_other_dir, other_cert) = cert_dir();
    let (addr, server) = tls_server(dir.path(), 3);
    let attempts = [
        // Signed by nobody the client trusts.
        ClientTls::new("localhost").with_ca_file(&other_cert),
        // Trusted, but not issued for this name.
        ClientTls::new("chat.example").with_ca_file(&cert),
        // The default: public roots, which a self-signed certificate is not under.
        ClientTls::new("localhost"),
    ];
    for tls in attempts {
        let err = Client::connect(addr, opts(tls.clone())).unwrap_err();
        assert!(
            matches!(err, ClientError::Tls(rustls::Error::InvalidCertificate(_))),
            "{tls:?}: {err:?}"
        );
        assert!(err.is_fatal());
    }
    for outcome in server.join().unwrap() {
        assert!(outcome.unwrap_err().contains("handshake failed"));
    }
}

#[test]
fn a_bad_ca_file_or_name_fails_before_connecting() {
    // Nothing listens here: the error must come from the local setup.
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = Client::connect(addr, opts(ClientTls::new("localhost").with_ca_file(&missing))).unwrap_err();
    assert!(
        matches!(&err, ClientError::TlsSetup(m) if m.contains("missing.pem")),
        "{err:?}"
    );

    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let err = Client::connect(addr, opts(ClientTls::new("localhost").with_ca_file(&not_pem))).unwrap_err();
    assert!(
        matches!(&err, ClientError::TlsSetup(m) if m.contains("no certificate")),
        "{err:?}"
    );

    let err = Client::connect(addr, opts(ClientTls::new("not a name"))).unwrap_err();
    assert!(
        matches!(&err, ClientError::TlsSetup(m) if m.contains("server name")),
        "{err:?}"
    );
}

#[test]
fn a_silent_server_times_out_the_handshake() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (_dir, cert) = cert_dir();
    let options = ClientOptions {
        timeout: Duration::from_millis(300),
        ..opts(ClientTls::new("localhost").with_ca_file(&cert))
    };
    let started = std::time::Instant::now();
    let err = Client::connect(addr, options).unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Runs `tern` as alice against `addr` with `args`, to its end.
fn tern_as_alice(addr: SocketAddr, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "--server",
            &addr.to_string(),
            "--user",
            "alice",
            "--password",
            "password1",
        ])
        .args(args)
        .env_remove("TERN_SERVER")
        .output()
        .unwrap()
}

#[test]
fn cli_registers_over_tls() {
    let (dir, cert) = cert_dir();
    let (addr, server) = tls_server(dir.path(), 1);
    // The certificate names 127.0.0.1, which --tls takes from --server.
    let out = tern_as_alice(addr, &["--tls", "--ca", cert.to_str().unwrap(), "register"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "registered alice (id 1)\n"
    );
    assert_eq!(server.join().unwrap(), vec![Ok(())]);
}

#[test]
fn cli_names_the_missing_ca_of_a_self_signed_server_once() {
    let (dir, _cert) = cert_dir();
    let (addr, server) = tls_server(dir.path(), 1);
    // The public roots do not hold ternd's self-signed certificate.
    let out = tern_as_alice(addr, &["--tls", "register"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("UnknownIssuer").count(), 1, "{stderr}");
    assert!(stderr.contains("--ca FILE"), "{stderr}");
    assert!(server.join().unwrap()[0].is_err());
}
