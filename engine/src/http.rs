//! The operator's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
//!
//! This module owns a tiny, bounded HTTP/1.1 server on its own threads,
//! off the shards and off the chat port: one thread accepts (polling a
//! stop flag so that dropping the [`HttpServer`] ends it promptly), and
//! each request is answered on a short-lived thread, at most
//! [`MAX_CONCURRENT`] at once (more get `503` at once). A request head may
//! be at most [`MAX_REQUEST_BYTES`] and must arrive within
//! [`READ_TIMEOUT`]; every answer closes the connection. Only `GET` and
//! `HEAD` are served. It is plain `std::net` because three fixed routes
//! read by Prometheus and a load balancer need no framework.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_storage::WriterHandle;

use crate::metrics::{Metrics, ProcessStats, Scrape, StoreSnapshot};

/// Requests answered at once; more are refused with `503`.
pub const MAX_CONCURRENT: usize = 16;
/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its whole request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept thread looks at the stop flag.
const STOP_POLL_MS: i32 = 100;

/// What the request threads share.
struct State {
    metrics: Arc<Metrics>,
    readiness: Arc<AtomicBool>,
    writer: Mutex<Option<WriterHandle>>,
    active: AtomicUsize,
}

/// A running endpoint. Dropping it stops accepting (within ~100 ms);
/// requests already being answered finish on their own threads.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

/// Starts serving on `addr` (port 0 picks a free one). `readiness` is
/// what `/readyz` and `tern_ready` report; `writer`, if given, adds the
/// storage writer's figures to `/metrics` (or set it later with
/// [`HttpServer::set_writer`]).
pub fn serve_http(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<AtomicBool>,
    writer: Option<WriterHandle>,
) -> io::Result<HttpServer> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let state = Arc::new(State {
        metrics,
        readiness,
        writer: Mutex::new(writer),
        active: AtomicUsize::new(0),
    });
    let thread = {
        let stop = stop.clone();
        let state = state.clone();
        std::thread::Builder::new()
            .name("tern-http".into())
            .spawn(move || accept_loop(&listener, &stop, &state))?
    };
    Ok(HttpServer {
        addr,
        stop,
        state,
        thread: Some(thread),
    })
}

impl HttpServer {
    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reports this storage writer's figures from now on.
    pub fn set_writer(&self, writer: WriterHandle) {
        *self.state.writer.lock().unwrap_or_else(PoisonError::into_inner) = Some(writer);
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether the listener has a connection waiting, within the poll period.
fn readable(listener: &TcpListener) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes only the one pollfd we pass.
    unsafe { libc::poll(&mut fd, 1, STOP_POLL_MS) > 0 }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, state: &Arc<State>) {
    while !stop.load(Ordering::SeqCst) {
        if !readable(listener) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: the chat side is out of descriptors
                // too; back off rather than spin.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if state.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT {
            state.active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = respond(&stream, 503, "text/plain", b"too many requests\n", true);
            continue;
        }
        let worker = state.clone();
        let spawned = std::thread::Builder::new()
            .name("tern-http-req".into())
            .spawn(move || {
                if let Err(e) = answer(&stream, &worker) {
                    tracing::debug!(error = %e, "metrics endpoint: request failed");
                }
                worker.active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            state.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads the request head: up to the blank line, within the size and time
/// limits. `None`: the client sent too much, too slowly, or nothing.
fn read_head(mut stream: &TcpStream) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&chunk[..n]);
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
    }
}

fn answer(stream: &TcpStream, state: &State) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let Some(head) = read_head(stream)? else {
        return respond(stream, 400, "text/plain", b"bad or incomplete request\n", true);
    };
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let with_body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return respond(stream, 405, "text/plain", b"only GET and HEAD\n", true),
    };
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let store = state
                .writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map(StoreSnapshot::of);
            let text = state.metrics.render(&Scrape {
                store,
                process: ProcessStats::collect(),
                ready: state.readiness.load(Ordering::SeqCst),
            });
            respond(
                stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                text.as_bytes(),
                with_body,
            )
        }
        "/healthz" => respond(stream, 200, "text/plain", b"ok\n", with_body),
        "/readyz" if state.readiness.load(Ordering::SeqCst) => {
            respond(stream, 200, "text/plain", b"ready\n", with_body)
        }
        "/readyz" => respond(stream, 503, "text/plain", b"not ready\n", with_body),
        _ => respond(stream, 404, "text/plain", b"not found\n", with_body),
    }
}

fn respond(
    mut stream: &TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body)?;
    }
    stream.flush()?;
    // Half-close so the client sees EOF after the body even if it keeps
    // the socket open; the drop then closes it fully.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}
