//! `tern_net::tls` over real loopback sockets: a glommio server against
//! blocking and nonblocking rustls clients.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, StreamOwned, SupportedProtocolVersion,
};
use tern_net::handoff;
use tern_net::tls::{self, CertStore, TlsError, TlsSettings, TlsStream};

const HANDSHAKE: Duration = Duration::from_secs(5);
const CLIENT_WAIT: Duration = Duration::from_secs(10);

fn run_executor<T>(name: &str, fut: impl Future<Output = T>) -> T {
    let io_memory =
        tern_net::memlock::io_memory_per_shard(8, tern_net::memlock::GLOMMIO_DEFAULT_RING_DEPTH).unwrap();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name(name)
        .io_memory(io_memory)
        .make()
        .unwrap()
        .run(fut)
}

/// Runs `serve` on a glommio executor in its own thread with a fresh listener.
fn server<T, F, Fut>(serve: F) -> (SocketAddr, JoinHandle<T>)
where
    T: Send + 'static,
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        run_executor("tls-test-server", async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            serve(listener).await
        })
    });
    (rx.recv_timeout(CLIENT_WAIT).unwrap(), handle)
}

fn settings(dir: &Path, allow_tls12: bool) -> TlsSettings {
    TlsSettings {
        cert_chain: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        allow_tls12,
    }
}

fn new_cert_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tls::generate_self_signed(dir.path(), &[]).unwrap();
    dir
}

fn client_config(ca_pem: &[u8], versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn trusting(cert: &Path) -> Arc<ClientConfig> {
    client_config(&std::fs::read(cert).unwrap(), rustls::DEFAULT_VERSIONS)
}

type Client = StreamOwned<ClientConnection, StdTcpStream>;

/// Connects and completes the handshake.
fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Client> {
    let sock = StdTcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(CLIENT_WAIT))?;
    sock.set_write_timeout(Some(CLIENT_WAIT))?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = StreamOwned::new(ClientConnection::new(config, name).unwrap(), sock);
    while client.conn.is_handshaking() {
        client.conn.complete_io(&mut client.sock)?;
    }
    Ok(client)
}

fn round_trip(client: &mut Client, msg: &[u8]) {
    client.write_all(msg).unwrap();
    client.flush().unwrap();
    let mut back = vec![0; msg.len()];
    client.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// Echoes until the peer closes; returns the bytes echoed.
async fn echo(stream: &mut TlsStream<TcpStream>) -> io::Result<usize> {
    let mut buf = vec![0; 4096];
    let mut total = 0;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n]).await?;
        stream.flush().await?;
        total += n;
    }
}

/// Accepts `n` connections with the store's current config, echoes on each
/// concurrently, and returns each connection's outcome in accept order.
async fn echo_server(
    listener: TcpListener,
    store: Arc<CertStore>,
    n: usize,
) -> Vec<Result<(bool, usize), String>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let stream = listener.accept().await.unwrap();
        let config = store.current();
        tasks.push(glommio::spawn_local(async move {
            let mut tls = tls::accept(stream, config, HANDSHAKE)
                .await
                .map_err(|e| e.to_string())?;
            let resumed = tls.session().is_resumed();
            let echoed = echo(&mut tls).await.map_err(|e| e.to_string())?;
            let _ = tls.close().await;
            Ok((resumed, echoed))
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await);
    }
    outcomes
}

#[test]
fn echo_and_resume() {
    let dir = new_cert_dir();
    let store = Arc::new(CertStore::open(settings(dir.path(), false)).unwrap());
    let (addr, server) = server(move |l| echo_server(l, store, 2));
    let config = trusting(&dir.path().join("cert.pem"));

    let mut first = connect(addr, config.clone()).unwrap();
    assert_eq!(first.conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    for size in [1, 100, 16 * 1024, 40 * 1024] {
        round_trip(&mut first, &vec![size as u8; size]);
    }
    first.conn.send_close_notify();
    first.flush().unwrap();
    // The server answers our close_notify with its own after its echo loop ends.
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // The same client config holds the ticket from the first connection.
    let mut second = connect(addr, config).unwrap();
    round_trip(&mut second, b"again");
    drop(second);

    let outcomes = server.join().unwrap();
    assert_eq!(
        outcomes[0].as_ref().unwrap(),
        &(false, 1 + 100 + 16 * 1024 + 40 * 1024)
    );
    assert_eq!(outcomes[1].as_ref().unwrap(), &(true, 5));
}

/// Sends `data` while reading the echo, over a nonblocking socket so neither
/// direction waits for the other. Reading pauses for the first `stall`, so
/// every buffer on the way fills and the server's writer must wait for the
/// socket while its reader keeps going. Asks for a key update (which the
/// server must answer) once `key_update_at` bytes are out.
fn pump_echo(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    data: &[u8],
    stall: Duration,
    key_update_at: usize,
) {
    let mut sock = StdTcpStream::connect(addr).unwrap();
    sock.set_nonblocking(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(config, name).unwrap();
    let started = Instant::now();
    let (mut sent, mut received) = (0, Vec::with_capacity(data.len()));
    let mut updated = false;
    let mut buf = vec![0; 64 * 1024];
    while received.len() < data.len() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "echo stalled at {} bytes",
            received.len()
        );
        let mut progress = false;
        if sent < data.len() {
            let n = conn
                .writer()
                .write(&data[sent..(sent + 16 * 1024).min(data.len())])
                .unwrap();
            sent += n;
            progress |= n > 0;
            if sent >= key_update_at && !updated && !conn.is_handshaking() {
                conn.refresh_traffic_keys().unwrap();
                updated = true;
            }
        }
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("client write: {e}"),
            }
        }
        if started.elapsed() >= stall || conn.is_handshaking() {
            match conn.read_tls(&mut sock) {
                Ok(0) => panic!("server closed after {} bytes", received.len()),
                Ok(_) => {
                    progress = true;
                    conn.process_new_packets().unwrap();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("client read: {e}"),
            }
            loop {
                match conn.reader().read(&mut buf) {
                    Ok(0) => panic!("server closed after {} bytes", received.len()),
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client plaintext: {e}"),
                }
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert!(received == data, "echo differs from what was sent");
    // Close cleanly: our close_notify, then the server's, so neither side
    // sees a reset.
    conn.send_close_notify();
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(CLIENT_WAIT)).unwrap();
    while conn.wants_write() {
        conn.write_tls(&mut sock).unwrap();
    }
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("{n} bytes after the echo"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("waiting for the server's close_notify: {e}"),
        }
        conn.read_tls(&mut sock).unwrap();
        conn.process_new_packets().unwrap();
    }
}

#[test]
fn split_halves_carry_bulk_both_ways_under_backpressure() {
    use tern_net::split::split;
    let dir = new_cert_dir();
    let store = CertStore::open(settings(dir.path(), false)).unwrap();
    let config = store.current();
    let (addr, server) = server(move |listener| async move {
        let stream = listener.accept().await.unwrap();
        let tls = tls::accept(stream, config, HANDSHAKE).await.unwrap();
        let (mut reader, mut writer) = split(tls);
        let (tx, rx) = glommio::channels::local_channel::new_bounded::<Vec<u8>>(4);
        let writer_task = glommio::spawn_local(async move {
            let mut total = 0;
            while let Some(chunk) = rx.recv().await {
                writer.write_all(&chunk).await.unwrap();
                writer.flush().await.unwrap();
                total += chunk.len();
            }
            writer.close().await.unwrap();
            total
        });
        let mut buf = vec![0; 8192];
        let mut read = 0;
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    read += n;
                    tx.send(buf[..n].to_vec()).await.unwrap();
                }
                Err(e) => panic!("server read after {read} bytes: {e}"),
            }
        }
        drop(tx);
        (read, writer_task.await)
    });
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    pump_echo(
        addr,
        trusting(&dir.path().join("cert.pem")),
        &data,
        Duration::from_millis(300),
        1 << 20,
    );
    let (read, written) = server.join().unwrap();
    assert_eq!((read, written), (data.len(), data.len()));
}

#[test]
fn session_moves_to_another_executor_mid_conversation() {
    let dir = new_cert_dir();
    let store = CertStore::open(settings(dir.path(), false)).unwrap();
    let config = store.current();
    let (handoff_tx, handoff_rx) = mpsc::channel::<(handoff::DetachedSocket, tls::TlsSession)>();
    let (addr, first_shard) = server(move |listener| async move {
        let stream = listener.accept().await.unwrap();
        let mut tls = tls::accept(stream, config, HANDSHAKE).await.unwrap();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        tls.write_all(b"hello").await.unwrap();
        tls.flush().await.unwrap();
        // "onetwo" arrives in one record: take only "one", leaving "two"
        // decrypted inside the session when it moves.
        let mut one = [0u8; 3];
        tls.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"one");
        tls.write_all(b"one").await.unwrap();
        tls.flush().await.unwrap();
        let (socket, session) = tls.into_parts();
        handoff_tx
            .send((handoff::detach(socket).unwrap(), session))
            .unwrap();
    });
    let second_shard = std::thread::spawn(move || {
        let (socket, session) = handoff_rx.recv_timeout(CLIENT_WAIT).unwrap();
        run_executor("tls-test-home", async move {
            let mut tls = TlsStream::from_parts(handoff::attach(socket), session);
            let mut two = [0u8; 3];
            tls.read_exact(&mut two).await.unwrap();
            assert_eq!(&two, b"two");
            tls.write_all(b"two").await.unwrap();
            tls.flush().await.unwrap();
            echo(&mut tls).await.unwrap()
        })
    });

    let mut client = connect(addr, trusting(&dir.path().join("cert.pem"))).unwrap();
    round_trip(&mut client, b"hello");
    // Nothing more is sent until "two" comes back, so the second shard can
    // only have found it in the session that moved.
    round_trip(&mut client, b"onetwo");
    for msg in [&b"after the move"[..], &[7u8; 30_000]] {
        round_trip(&mut client, msg);
    }
    drop(client);
    first_shard.join().unwrap();
    assert_eq!(second_shard.join().unwrap(), 14 + 30_000);
}

#[test]
fn the_client_side_runs_on_glommio_too() {
    let dir = new_cert_dir();
    let store = Arc::new(CertStore::open(settings(dir.path(), false)).unwrap());
    let (addr, echoing) = server(move |l| echo_server(l, store, 1));
    let config = trusting(&dir.path().join("cert.pem"));
    let echoed = run_executor("tls-test-client", async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tls::connect(tcp, config, name, HANDSHAKE).await.unwrap();
        assert_eq!(tls.session().protocol_version(), Some(ProtocolVersion::TLSv1_3));
        let msg = vec![9u8; 40 * 1024];
        tls.write_all(&msg).await.unwrap();
        tls.flush().await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
        tls.close().await.unwrap();
        back.len()
    });
    assert_eq!(echoed, 40 * 1024);
    let outcomes = echoing.join().unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap(), &(false, 40 * 1024));

    // A client that does not trust the server's certificate fails its handshake.
    let other = new_cert_dir();
    let store = Arc::new(CertStore::open(settings(dir.path(), false)).unwrap());
    let (addr, _server) = server(move |l| echo_server(l, store, 1));
    let distrust = trusting(&other.path().join("cert.pem"));
    let refused = run_executor("tls-test-client", async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        tls::connect(tcp, distrust, name, HANDSHAKE).await.err()
    });
    assert!(matches!(refused, Some(TlsError::Handshake(_))), "{refused:?}");
}

/// Polls `step` on a detached session until it gives a value, sleeping
/// between tries (the socket is nobody's: no reactor wakes us).
fn poll_detached<T>(mut step: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CLIENT_WAIT;
    loop {
        if let Some(value) = step() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "nothing arrived on the detached session"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_detached_session_reads_and_answers_records_without_an_executor() {
    use std::os::fd::AsRawFd;
    let dir = new_cert_dir();
    let store = CertStore::open(settings(dir.path(), false)).unwrap();
    let config = store.current();
    let (parked_tx, parked_rx) = mpsc::channel::<(handoff::DetachedSocket, tls::TlsSession)>();
    let (addr, server) = server(move |listener| async move {
        let stream = listener.accept().await.unwrap();
        let tls = tls::accept(stream, config, HANDSHAKE).await.unwrap();
        let (socket, session) = tls.into_parts();
        parked_tx
            .send((handoff::detach(socket).unwrap(), session))
            .unwrap();
    });
    let mut client = connect(addr, trusting(&dir.path().join("cert.pem"))).unwrap();
    server.join().unwrap();
    let (socket, mut session) = parked_rx.recv_timeout(CLIENT_WAIT).unwrap();
    let fd = socket.as_raw_fd();

    // Nothing sent yet: nothing to read, nothing decrypted.
    let idle = session.recv_detached(fd).unwrap_err();
    assert_eq!(idle.kind(), io::ErrorKind::WouldBlock);
    assert_eq!(
        session.first_plaintext().unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );

    // Two records: each is one chunk, taken one at a time.
    client.write_all(b"ping").unwrap();
    client.flush().unwrap();
    client.write_all(b"request").unwrap();
    client.flush().unwrap();
    let mut chunks = Vec::new();
    poll_detached(|| {
        match session.recv_detached(fd) {
            Ok(n) => assert!(n > 0, "the client is still there"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
        }
        while let Ok(chunk) = session.first_plaintext() {
            let chunk = chunk.to_vec();
            session.consume_plaintext(chunk.len());
            chunks.push(chunk);
        }
        (chunks.concat() == b"pingrequest").then_some(())
    });
    assert_eq!(chunks.first().map(Vec::as_slice), Some(&b"ping"[..]));

    // An answer goes out encrypted, without an executor.
    assert!(session.send_detached(fd, b"pong").unwrap());
    let mut back = [0u8; 4];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"pong");

    // close_notify with the TCP connection still open reads as a clean end.
    client.conn.send_close_notify();
    client.flush().unwrap();
    poll_detached(|| {
        let _ = session.recv_detached(fd);
        match session.first_plaintext() {
            Ok(chunk) => {
                assert!(chunk.is_empty(), "no data after close_notify");
                Some(())
            }
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                None
            }
        }
    });
}

#[test]
fn handshake_timeout_closes_a_silent_peer() {
    let dir = new_cert_dir();
    let store = CertStore::open(settings(dir.path(), false)).unwrap();
    let config = store.current();
    let timeout = Duration::from_millis(300);
    let (addr, server) = server(move |listener| async move {
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let stream = listener.accept().await.unwrap();
            let started = Instant::now();
            let result = tls::accept(stream, config.clone(), timeout).await;
            outcomes.push((result.err(), started.elapsed()));
        }
        outcomes
    });
    // One peer sends nothing, the other the first bytes of a record header.
    let silent = StdTcpStream::connect(addr).unwrap();
    let mut partial = StdTcpStream::connect(addr).unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).unwrap();
    for (err, elapsed) in server.join().unwrap() {
        assert!(
            matches!(err, Some(TlsError::HandshakeTimeout(t)) if t == timeout),
            "{err:?}"
        );
        assert!(
            elapsed >= timeout && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
    }
    for mut peer in [silent, partial] {
        peer.set_read_timeout(Some(CLIENT_WAIT)).unwrap();
        let mut byte = [0u8; 1];
        // The server dropped the socket: EOF (or a reset), not a timeout.
        match peer.read(&mut byte) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
    }
}

#[test]
fn tls12_only_when_enabled() {
    let dir = new_cert_dir();
    let strict = CertStore::open(settings(dir.path(), false)).unwrap().current();
    let lenient = CertStore::open(settings(dir.path(), true)).unwrap().current();
    let (addr, server) = server(move |listener| async move {
        let mut outcomes = Vec::new();
        for config in [strict, lenient] {
            let stream = listener.accept().await.unwrap();
            outcomes.push(match tls::accept(stream, config, HANDSHAKE).await {
                Ok(mut tls) => {
                    let version = tls.session().protocol_version();
                    echo(&mut tls).await.unwrap();
                    Ok(version)
                }
                Err(e) => Err(e),
            });
        }
        outcomes
    });
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    let tls12_only = client_config(&cert, &[&rustls::version::TLS12]);
    let refused = connect(addr, tls12_only.clone()).expect_err("TLS 1.2 must be refused by default");
    assert!(refused.to_string().contains("ProtocolVersion"), "{refused}");
    let mut accepted = connect(addr, tls12_only).unwrap();
    round_trip(&mut accepted, b"old but allowed");
    drop(accepted);
    let outcomes = server.join().unwrap();
    assert!(
        matches!(&outcomes[0], Err(TlsError::Handshake(_))),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(outcomes[1].as_ref().unwrap(), &Some(ProtocolVersion::TLSv1_2));
}

#[test]
fn reload_serves_new_certificate_to_new_connections_only() {
    let dir = new_cert_dir();
    let cert_path: PathBuf = dir.path().join("cert.pem");
    let store = Arc::new(CertStore::open(settings(dir.path(), false)).unwrap());
    let (addr, server) = server({
        let store = store.clone();
        move |l| echo_server(l, store, 4)
    });
    let old_pem = std::fs::read(&cert_path).unwrap();
    let mut old = connect(addr, client_config(&old_pem, rustls::DEFAULT_VERSIONS)).unwrap();
    round_trip(&mut old, b"before");

    tls::generate_self_signed(dir.path(), &[]).unwrap();
    store.reload().unwrap();
    let new_trust = trusting(&cert_path);

    // A fresh client that knows only the old certificate no longer gets in
    // (a client config of its own, so it cannot resume a session instead).
    let stale = client_config(&old_pem, rustls::DEFAULT_VERSIONS);
    let err = connect(addr, stale).expect_err("old certificate must no longer be served");
    assert!(err.to_string().contains("invalid peer certificate"), "{err}");
    let mut new = connect(addr, new_trust.clone()).unwrap();
    round_trip(&mut new, b"new cert");
    // The connection from before the reload carries on.
    round_trip(&mut old, b"still here");

    // A broken file fails the reload and leaves the new certificate in service.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    assert!(matches!(store.reload(), Err(TlsError::NoCertificate { .. })));
    let mut after_failed_reload = connect(addr, new_trust).unwrap();
    round_trip(&mut after_failed_reload, b"ok");

    drop((old, new, after_failed_reload));
    let outcomes = server.join().unwrap();
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes[1].is_err());
    for i in [0, 2, 3] {
        assert!(outcomes[i].is_ok(), "connection {i}: {:?}", outcomes[i]);
    }
}

/// Full and resumed handshakes per second against one server executor on
/// loopback, and the server thread's CPU time per handshake.
///
/// `cargo test -p tern-net --release --test tls -- --ignored --nocapture handshake_rate`
#[test]
#[ignore]
fn handshake_rate() {
    const N: usize = 2000;
    let dir = new_cert_dir();
    let store = Arc::new(CertStore::open(settings(dir.path(), false)).unwrap());
    let (addr, server) = server({
        let store = store.clone();
        move |listener| async move {
            let mut phases = Vec::new();
            // The resuming phase starts with one full handshake that gets its first ticket.
            for conns in [N, N + 1] {
                let cpu_start = thread_cpu();
                let mut resumed = 0;
                for _ in 0..conns {
                    let stream = listener.accept().await.unwrap();
                    // As ternd does: without it Nagle delays the small flights.
                    stream.set_nodelay(true).unwrap();
                    let mut tls = tls::accept(stream, store.current(), HANDSHAKE).await.unwrap();
                    resumed += usize::from(tls.session().is_resumed());
                    let mut byte = [0u8; 1];
                    tls.read_exact(&mut byte).await.unwrap();
                    tls.write_all(&byte).await.unwrap();
                    tls.flush().await.unwrap();
                }
                phases.push((thread_cpu() - cpu_start, resumed));
            }
            phases
        }
    });
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    let resuming = client_config(&cert, rustls::DEFAULT_VERSIONS);
    let mut report = Vec::new();
    for resume in [false, true] {
        if resume {
            round_trip(&mut connect(addr, resuming.clone()).unwrap(), b"x");
        }
        let started = Instant::now();
        for _ in 0..N {
            let config = if resume {
                resuming.clone()
            } else {
                client_config(&cert, rustls::DEFAULT_VERSIONS)
            };
            let mut client = connect(addr, config).unwrap();
            round_trip(&mut client, b"x");
        }
        let elapsed = started.elapsed();
        report.push((resume, N as f64 / elapsed.as_secs_f64()));
    }
    let server_cpu = server.join().unwrap();
    assert_eq!(server_cpu[0].1, 0);
    assert_eq!(
        server_cpu[1].1, N,
        "every connection after the first should resume"
    );
    for ((resume, rate), (cpu, _)) in report.into_iter().zip(server_cpu) {
        let kind = if resume { "resumed" } else { "full" };
        let per = cpu.as_secs_f64() / N as f64;
        println!(
            "{kind}: {rate:.0} handshakes/s end to end (one client, sequential); server CPU {:.0} us each = {:.0} handshakes/s per server core",
            per * 1e6,
            1.0 / per
        );
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The cost of TLS against plain TCP for bulk data: the server thread's
/// CPU time per MiB received, plain then TLS 1.3 (AES-GCM from ring), with
/// the client on another thread sending 256 MiB in 16 KiB writes.
///
/// `cargo test -p tern-net --release --test tls -- --ignored --nocapture throughput_cost`
#[test]
#[ignore]
fn throughput_cost() {
    const TOTAL: usize = 256 << 20;
    const CHUNK: usize = 16 << 10;
    let dir = new_cert_dir();
    let store = Arc::new(CertStore::open(settings(dir.path(), false)).unwrap());
    let (addr, server) = server({
        let store = store.clone();
        move |listener| async move {
            let mut costs = Vec::new();
            for use_tls in [false, true] {
                let stream = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                let mut buf = vec![0u8; 64 << 10];
                let mut received = 0;
                let cpu_start = thread_cpu();
                if use_tls {
                    let mut tls = tls::accept(stream, store.current(), HANDSHAKE).await.unwrap();
                    while received < TOTAL {
                        received += tls.read(&mut buf).await.unwrap();
                    }
                    tls.write_all(b"k").await.unwrap();
                    tls.flush().await.unwrap();
                } else {
                    let mut stream = stream;
                    while received < TOTAL {
                        received += stream.read(&mut buf).await.unwrap();
                    }
                    stream.write_all(b"k").await.unwrap();
                }
                costs.push(thread_cpu() - cpu_start);
            }
            costs
        }
    });
    let chunk = vec![7u8; CHUNK];
    let mut wall = Vec::new();
    // Plain.
    let started = Instant::now();
    let mut plain = StdTcpStream::connect(addr).unwrap();
    plain.set_nodelay(true).unwrap();
    for _ in 0..TOTAL / CHUNK {
        plain.write_all(&chunk).unwrap();
    }
    let mut ack = [0u8; 1];
    plain.read_exact(&mut ack).unwrap();
    wall.push(started.elapsed());
    // TLS.
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    let started = Instant::now();
    let mut client = connect(addr, client_config(&cert, rustls::DEFAULT_VERSIONS)).unwrap();
    for _ in 0..TOTAL / CHUNK {
        client.write_all(&chunk).unwrap();
    }
    client.flush().unwrap();
    client.read_exact(&mut ack).unwrap();
    wall.push(started.elapsed());
    let costs = server.join().unwrap();
    let mib = (TOTAL >> 20) as f64;
    for (kind, (cpu, elapsed)) in ["plain", "tls"].iter().zip(costs.iter().zip(&wall)) {
        println!(
            "{kind}: {:.0} MiB/s end to end; server CPU {:.2} ms per MiB",
            mib / elapsed.as_secs_f64(),
            cpu.as_secs_f64() * 1e3 / mib
        );
    }
    println!(
        "TLS / plain server CPU per byte: {:.2}x",
        costs[1].as_secs_f64() / costs[0].as_secs_f64()
    );
}
