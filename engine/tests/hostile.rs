//! A crowd of hostile connections against one in-process server while
//! well-behaved pairs keep chatting through it.
//!
//! Some 2,000 connections, opened in waves from several threads, send
//! garbage, half frames, huge length prefixes, valid frames then garbage,
//! floods of pings, Hellos with bad versions, or nothing at all. Every one
//! must be closed by the server, with exactly the answer the protocol
//! prescribes (an error frame, or an idle-timeout notice) before the end of
//! the stream. Meanwhile ten pairs of logged-in users exchange messages:
//! none may see an error, every message arrives in order (`Pair::exchange`
//! checks sequence numbers and contents), and the round trip stays bounded.
//! The server runs in this process, so its memory is the process's: VmRSS
//! may grow by no more than a fixed bound across the attack.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rkyv::util::AlignedVec;
use tern_client::{ClientBody, ClientFrame, ErrorCode, ServerBody, ServerFrame};
use tern_proto::{encode_client, PROTOCOL_VERSION};

const HOSTILE_THREADS: usize = 8;
const WAVES: usize = 2;
/// Connections each thread holds open at once.
const WAVE_SIZE: usize = 128;
const PAIRS: usize = 10;
/// Short, so that silent and half-sent connections are closed quickly.
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// A hostile connection must be closed by the server within this long of
/// its last byte (idle timeout plus a generous margin for a loaded box).
const CLOSE_DEADLINE: Duration = Duration::from_secs(8);
const PING_FLOOD: u64 = 500;
/// How often each pair exchanges a message each way: a brisk human chat,
/// and well under the default 50 messages/s per connection.
const CHAT_PACE: Duration = Duration::from_millis(30);
const RTT_P99_MAX: Duration = Duration::from_millis(500);
/// Exchanges slower than this are listed in the output.
const SLOW_EXCHANGE: Duration = Duration::from_millis(50);
const RSS_GROWTH_MAX_KIB: u64 = 200 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    /// Random bytes from the first byte on.
    Garbage,
    /// Part of a frame (a header announcing more), then silence.
    HalfFrame,
    /// A header announcing a 4 GiB body.
    HugeLength,
    /// Hello and Ping, then a frame whose body is not an archive.
    ValidThenGarbage,
    /// Hello, then a burst of Pings sent without waiting for answers.
    PingFlood,
    /// Several Hellos naming versions the server does not speak.
    BadHellos,
    /// Connects and never sends a byte.
    Silent,
}

const MISBEHAVIOURS: [Misbehaviour; 7] = [
    Misbehaviour::Garbage,
    Misbehaviour::HalfFrame,
    Misbehaviour::HugeLength,
    Misbehaviour::ValidThenGarbage,
    Misbehaviour::PingFlood,
    Misbehaviour::BadHellos,
    Misbehaviour::Silent,
];

/// The soft fd limit is often far below the hard one; this test needs
/// two descriptors per connection (both ends live in this process).
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// A `/proc/self/status` figure in KiB (VmRSS, VmHWM).
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn encoded(request_id: u64, body: ClientBody) -> Vec<u8> {
    let mut out = AlignedVec::new();
    encode_client(&ClientFrame { request_id, body }, &mut out, 1 << 20).expect("encode");
    out.to_vec()
}

fn hello(version: u16) -> ClientBody {
    ClientBody::Hello {
        version,
        client_name: "hostile".into(),
    }
}

/// xorshift64: cheap, deterministic garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// What a misbehaving connection sends. Everything goes in one write of at
/// most a few hundred bytes (the flood aside, which the server reads whole
/// while answering). Input the server leaves unread when it closes is
/// drained by its lingering close (bad_input.rs checks that).
fn payload(kind: Misbehaviour, seed: u64) -> Vec<u8> {
    match kind {
        Misbehaviour::Garbage => garbage(seed, 16 + (seed % 180) as usize),
        Misbehaviour::HalfFrame => {
            let mut bytes = encoded(1, hello(PROTOCOL_VERSION));
            bytes.truncate(1 + (seed % (bytes.len() as u64 - 1)) as usize);
            bytes
        }
        Misbehaviour::HugeLength => [u32::MAX.to_le_bytes(), 0u32.to_le_bytes()].concat(),
        Misbehaviour::ValidThenGarbage => {
            let mut bytes = encoded(1, hello(PROTOCOL_VERSION));
            bytes.extend(encoded(2, ClientBody::Ping { nonce: seed }));
            bytes.extend_from_slice(&24u32.to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend(garbage(seed, 24));
            bytes
        }
        Misbehaviour::PingFlood => {
            let mut bytes = encoded(1, hello(PROTOCOL_VERSION));
            for n in 0..PING_FLOOD {
                bytes.extend(encoded(n + 2, ClientBody::Ping { nonce: n }));
            }
            bytes
        }
        Misbehaviour::BadHellos => (0..3u16)
            .flat_map(|n| encoded(u64::from(n) + 1, hello(2 + n + (seed as u16 % 1000))))
            .collect(),
        Misbehaviour::Silent => Vec::new(),
    }
}

fn is_error(frame: &ServerFrame, request_id: u64, codes: &[ErrorCode]) -> bool {
    frame.request_id == request_id
        && matches!(&frame.body, ServerBody::Error { code, .. } if codes.contains(code))
}

fn is_idle_notice(frame: &ServerFrame) -> bool {
    frame.request_id == 0
        && matches!(
            frame.body,
            ServerBody::Disconnect {
                code: ErrorCode::IdleTimeout,
                ..
            }
        )
}

/// Whether `frames`, received before the server closed, are the answer the
/// protocol prescribes to `kind`.
fn answered_as_prescribed(kind: Misbehaviour, frames: &[ServerFrame]) -> bool {
    let hello_ok = |f: &ServerFrame| f.request_id == 1 && matches!(f.body, ServerBody::HelloOk { .. });
    match (kind, frames) {
        // Random header flags are practically never zero: malformed, or
        // too large; a short zero-flag header would wait for its body.
        (Misbehaviour::Garbage, [only]) => {
            is_error(only, 0, &[ErrorCode::MalformedFrame, ErrorCode::FrameTooLarge]) || is_idle_notice(only)
        }
        (Misbehaviour::HalfFrame | Misbehaviour::Silent, [only]) => is_idle_notice(only),
        (Misbehaviour::HugeLength, [only]) => is_error(only, 0, &[ErrorCode::FrameTooLarge]),
        (Misbehaviour::ValidThenGarbage, [ok, pong, error]) => {
            hello_ok(ok)
                && pong.request_id == 2
                && matches!(pong.body, ServerBody::Pong { .. })
                && is_error(error, 0, &[ErrorCode::MalformedFrame])
        }
        (Misbehaviour::PingFlood, [ok, pongs @ .., last]) => {
            hello_ok(ok)
                && pongs.len() == PING_FLOOD as usize
                && pongs
                    .iter()
                    .zip(0..)
                    .all(|(f, n)| f.request_id == n + 2 && f.body == ServerBody::Pong { nonce: n })
                && is_idle_notice(last)
        }
        (Misbehaviour::BadHellos, [only]) => is_error(only, 1, &[ErrorCode::UnsupportedVersion]),
        _ => false,
    }
}

/// Reads `conn` until the server closes it; panics if it stays open past
/// the deadline or answered anything but what `kind` deserves.
fn expect_closed_by_server(kind: Misbehaviour, conn: &mut RawConn) {
    let deadline = Instant::now() + CLOSE_DEADLINE;
    let mut frames = Vec::new();
    loop {
        match conn.read(deadline.saturating_duration_since(Instant::now())) {
            RawRead::Frame(frame) => frames.push(frame),
            RawRead::Closed => break,
            RawRead::Timeout => panic!(
                "{kind:?}: still open {CLOSE_DEADLINE:?} after its last byte; got {} frames",
                frames.len()
            ),
        }
    }
    assert!(
        answered_as_prescribed(kind, &frames),
        "{kind:?}: answered {:?}",
        frames.iter().take(4).collect::<Vec<_>>()
    );
}

/// One thread's share of the attack: waves of connections opened together,
/// each misbehaving, then each watched until the server closes it.
fn attack(addr: std::net::SocketAddr, thread_index: usize) -> usize {
    let mut closed = 0;
    for wave in 0..WAVES {
        let conns: Vec<(Misbehaviour, RawConn)> = (0..WAVE_SIZE)
            .map(|i| {
                let seed = ((thread_index * WAVES + wave) * WAVE_SIZE + i) as u64;
                let kind = MISBEHAVIOURS[(seed % MISBEHAVIOURS.len() as u64) as usize];
                let mut conn = RawConn::connect(addr);
                let bytes = payload(kind, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                if !bytes.is_empty() {
                    conn.send_raw(&bytes)
                        .unwrap_or_else(|e| panic!("{kind:?}: write failed: {e}"));
                }
                (kind, conn)
            })
            .collect();
        for (kind, mut conn) in conns {
            expect_closed_by_server(kind, &mut conn);
            closed += 1;
        }
    }
    closed
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[test]
fn hostile_crowd_harms_no_one_and_is_shown_the_door() {
    let fd_limit = raise_fd_limit();
    let hostile_total = HOSTILE_THREADS * WAVES * WAVE_SIZE;
    let open_at_once = HOSTILE_THREADS * WAVE_SIZE + 2 * PAIRS;
    assert!(
        2 * open_at_once as u64 + 1000 < fd_limit,
        "fd limit {fd_limit} too low for {open_at_once} connections"
    );
    let server = TestServer::start_with(|c| {
        c.idle_timeout = IDLE_TIMEOUT;
        // Chat is not about disk speed here.
        c.durability = tern_engine::config::Durability::Async {
            flush_interval: Duration::from_millis(50),
        };
    });
    let addr = server.addr();
    let mut pairs: Vec<Pair> = (0..PAIRS)
        .map(|n| Pair::new(&server, &format!("calm{n}_")))
        .collect();
    for pair in &mut pairs {
        pair.exchange();
    }
    let rss_before = proc_status_kib("VmRSS");

    let stop = Arc::new(AtomicBool::new(false));
    let chatters: Vec<_> = pairs
        .into_iter()
        .map(|mut pair| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut round_trips = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    pair.exchange();
                    round_trips.push((started, started.elapsed()));
                    thread::sleep(CHAT_PACE);
                }
                (pair, round_trips)
            })
        })
        .collect();

    let started = Instant::now();
    let attackers: Vec<_> = (0..HOSTILE_THREADS)
        .map(|t| thread::spawn(move || attack(addr, t)))
        .collect();
    let mut closed = 0;
    for attacker in attackers {
        closed += attacker.join().expect("an attacking thread failed");
    }
    let attack_took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut exchanges = Vec::new();
    let mut pairs = Vec::new();
    for chatter in chatters {
        let (pair, rtts) = chatter.join().expect("a well-behaved pair saw an error");
        assert!(!rtts.is_empty(), "a pair never completed an exchange");
        exchanges.extend(rtts);
        pairs.push(pair);
    }
    // When the slow exchanges happened, to tell a stall at a wave of
    // connections from general slowness.
    let slow: Vec<String> = exchanges
        .iter()
        .filter(|(_, rtt)| *rtt > SLOW_EXCHANGE)
        .map(|(at, rtt)| {
            let offset = at.saturating_duration_since(started).as_millis();
            format!("{}ms@{offset}ms", rtt.as_millis())
        })
        .collect();
    let mut round_trips: Vec<Duration> = exchanges.iter().map(|(_, rtt)| *rtt).collect();
    let rss_after = proc_status_kib("VmRSS");
    let rss_peak = proc_status_kib("VmHWM");

    round_trips.sort();
    let p50 = percentile(&round_trips, 0.50);
    let p99 = percentile(&round_trips, 0.99);
    let max = round_trips.last().copied().unwrap_or_default();
    let growth_kib = rss_after.saturating_sub(rss_before);
    println!("hostile: exchanges over {SLOW_EXCHANGE:?} (duration@start since the attack began): {slow:?}");
    println!(
        "hostile: {closed} connections ({hostile_total} planned, {} at once) closed by the server in {attack_took:?}; \
         {} chat round trips by {PAIRS} pairs: p50 {p50:?}, p99 {p99:?}, max {max:?}; \
         VmRSS {rss_before} KiB -> {rss_after} KiB (+{growth_kib} KiB), VmHWM {rss_peak} KiB; fd limit {fd_limit}",
        HOSTILE_THREADS * WAVE_SIZE,
        round_trips.len(),
    );
    assert_eq!(closed, hostile_total);
    assert!(p99 < RTT_P99_MAX, "chat round trip p99 {p99:?} under attack");
    assert!(
        growth_kib < RSS_GROWTH_MAX_KIB,
        "VmRSS grew by {growth_kib} KiB across the attack"
    );

    // Everyone carries on afterwards, and newcomers are served.
    for pair in &mut pairs {
        pair.exchange();
    }
    Pair::new(&server, "after_").exchange();
}
