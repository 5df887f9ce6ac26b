//! `tern_net::linger` over real loopback sockets: a glommio server that
//! closes its side and lingers, against a std client that behaves in each
//! of the ways [`Lingered`] tells apart.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream as StdStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use tern_net::linger::{linger, Lingered};

const MAX_TIME: Duration = Duration::from_millis(600);
const MAX_BYTES: usize = 64 * 1024;
/// The read timeout the server's abandoned read leaves armed.
const SERVING_TIMEOUT: Duration = Duration::from_millis(50);

/// Runs one server connection on a glommio executor in its own thread: it
/// starts a read and abandons it while it waits (as a session whose read
/// loses the race against its closing queue), shuts down writing, then
/// lingers. Returns how the linger ended and how long it took.
fn lingering_server() -> (SocketAddr, JoinHandle<(Lingered, Duration)>) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        run_executor(async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let mut stream = listener.accept().await.unwrap();
            stream.set_read_timeout(Some(SERVING_TIMEOUT)).unwrap();
            let mut byte = [0u8; 1];
            let abandoned = futures_lite::future::or(async { Some(stream.read(&mut byte).await) }, async {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                None
            })
            .await;
            assert!(abandoned.is_none(), "the client sent nothing yet");
            stream.shutdown(Shutdown::Write).await.unwrap();
            stream.set_read_timeout(Some(MAX_TIME)).unwrap();
            let started = Instant::now();
            let lingered = linger(&mut stream, MAX_TIME, MAX_BYTES).await;
            (lingered, started.elapsed())
        })
    });
    (rx.recv_timeout(Duration::from_secs(10)).unwrap(), handle)
}

fn run_executor<T>(fut: impl Future<Output = T>) -> T {
    let io_memory =
        tern_net::memlock::io_memory_per_shard(8, tern_net::memlock::GLOMMIO_DEFAULT_RING_DEPTH).unwrap();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("linger-test")
        .io_memory(io_memory)
        .make()
        .unwrap()
        .run(fut)
}

/// Connects and waits for the server's FIN.
fn client(addr: SocketAddr) -> StdStream {
    let mut client = StdStream::connect(addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(client.read(&mut byte).unwrap(), 0, "the server's FIN");
    client
}

#[test]
fn a_peer_that_sends_after_a_pause_then_closes_is_read_to_the_end() {
    // The pause outlasts the abandoned read's timeout: the linger reads on.
    let (addr, server) = lingering_server();
    let mut client = client(addr);
    std::thread::sleep(SERVING_TIMEOUT * 3);
    client.write_all(&[7u8; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(client);
    let (lingered, took) = server.join().unwrap();
    assert_eq!(lingered, Lingered::PeerClosed, "after {took:?}");
}

#[test]
fn a_silent_peer_and_a_peer_still_sending_are_told_apart_at_the_time_bound() {
    let (addr, server) = lingering_server();
    let silent = client(addr);
    let (lingered, took) = server.join().unwrap();
    assert_eq!(lingered, Lingered::QuietTimeout);
    assert!(took >= MAX_TIME - Duration::from_millis(50), "{took:?}");
    drop(silent);

    let (addr, server) = lingering_server();
    let mut sending = client(addr);
    let deadline = Instant::now() + MAX_TIME * 3;
    while Instant::now() < deadline && !server.is_finished() {
        // Ignored: the server may be gone already.
        let _ = sending.write_all(&[7u8; 100]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (lingered, _) = server.join().unwrap();
    assert_eq!(lingered, Lingered::SendingTimeout);
}

#[test]
fn a_flooding_peer_is_cut_off_at_the_byte_bound() {
    let (addr, server) = lingering_server();
    let mut flooding = client(addr);
    let flood = std::thread::spawn(move || {
        let chunk = [7u8; 16 * 1024];
        for _ in 0..(4 * MAX_BYTES / chunk.len()) {
            if flooding.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (lingered, took) = server.join().unwrap();
    assert_eq!(lingered, Lingered::TooMuch, "after {took:?}");
    flood.join().unwrap();
}
