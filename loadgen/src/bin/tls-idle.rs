//! `tls-idle`: what idle TLS sessions cost a running `ternd`.
//!
//! Opens `--connections` TLS sessions (16 per user; the users are
//! registered first), leaves them idle for `--settle-secs` (past the
//! server's `park_after_ms`, so they park), then pings every session once
//! per `--ping-interval-secs` for `--hold-secs`, spread evenly over each
//! interval as independent clients would be. With `--server-pid` it reports
//! the server's resident memory per session (before connecting against
//! after settling, and at the end of the hold, when heartbeats have woken
//! every session at least once) and its CPU time per ping over the hold
//! (utime + stime of every thread, from `/proc/PID/stat`). `loadgen`'s
//! own connections are plain TCP; this is its TLS counterpart for idle
//! cost, built on the blocking client library: one thread, every call
//! waits, which suits the few thousand sessions one process may hold here
//! (run several for more).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tern_client::{Client, ClientOptions, ClientTls, ErrorCode};

#[derive(Parser, Debug)]
#[command(about = "Server memory and CPU per idle TLS session with heartbeats")]
struct Args {
    /// The server's TLS listener.
    #[arg(long, default_value = "127.0.0.1:7879")]
    server: String,
    /// The name its certificate carries.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// PEM file of the certificate to trust (`ternd gen-cert` writes cert.pem).
    #[arg(long)]
    ca: std::path::PathBuf,
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Prefix of the usernames registered (must be new to the server).
    #[arg(long, default_value = "tlsidle_")]
    prefix: String,
    #[arg(long, default_value_t = 8.0)]
    settle_secs: f64,
    #[arg(long, default_value_t = 15.0)]
    hold_secs: f64,
    #[arg(long, default_value_t = 1.0)]
    ping_interval_secs: f64,
    /// The server's pid, to read its memory and CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
}

const PASSWORD: &str = "tls-idle-password";
const SESSIONS_PER_USER: usize = 16;

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tls-idle: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.ping_interval_secs <= 0.0 || args.hold_secs < 0.0 || args.settle_secs < 0.0 {
        return Err("intervals must be positive".into());
    }
    let opts = ClientOptions {
        timeout: Duration::from_secs(10),
        tls: Some(ClientTls::new(args.server_name.clone()).with_ca_file(args.ca.clone())),
        ..ClientOptions::default()
    };
    let connect = || Client::connect(args.server.as_str(), opts.clone()).map_err(|e| format!("connect: {e}"));
    let users = args.connections.div_ceil(SESSIONS_PER_USER);
    for u in 0..users {
        let name = format!("{}{u}", args.prefix);
        match connect()?.register(&name, PASSWORD) {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::UsernameTaken) => {}
            Err(e) => return Err(format!("register {name}: {e}")),
        }
    }

    let rss_before = args.server_pid.map(rss_kib).transpose()?;
    let mut clients = Vec::with_capacity(args.connections);
    let connect_start = Instant::now();
    for i in 0..args.connections {
        let name = format!("{}{}", args.prefix, i / SESSIONS_PER_USER);
        let mut client = connect()?;
        client
            .login(&name, PASSWORD)
            .map_err(|e| format!("login {name}: {e}"))?;
        clients.push(client);
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs_f64(args.settle_secs));
    let rss_after = args.server_pid.map(rss_kib).transpose()?;
    let cpu_before = args.server_pid.map(cpu_ticks).transpose()?;

    let mut latencies = Vec::new();
    let mut failures = 0u64;
    if !clients.is_empty() {
        let step = Duration::from_secs_f64(args.ping_interval_secs / clients.len() as f64);
        let start = Instant::now();
        let hold = Duration::from_secs_f64(args.hold_secs);
        let mut due = start;
        'hold: loop {
            for client in &mut clients {
                due += step;
                if due > start + hold {
                    break 'hold;
                }
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                match client.ping() {
                    Ok(rtt) => latencies.push(rtt),
                    Err(_) => failures += 1,
                }
            }
        }
    }
    let cpu_after = args.server_pid.map(cpu_ticks).transpose()?;
    let rss_held = args.server_pid.map(rss_kib).transpose()?;

    latencies.sort_unstable();
    let quantile = |q: f64| {
        let at = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(at).map_or(0, |d| d.as_micros())
    };
    println!(
        "sessions {} (TLS) connected in {connect_secs:.2} s; pings answered {}, failed {failures}; ping p50 {} us, p99 {} us",
        clients.len(),
        latencies.len(),
        quantile(0.5),
        quantile(0.99)
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per = (after as f64 - before as f64) / clients.len().max(1) as f64;
        println!(
            "server RSS {before} KiB before, {after} KiB after {:.0} s idle: {per:.2} KiB/session",
            args.settle_secs
        );
    }
    if let (Some(before), Some(held)) = (rss_before, rss_held) {
        let per = (held as f64 - before as f64) / clients.len().max(1) as f64;
        println!("server RSS {held} KiB at the end of the pinged hold: {per:.2} KiB/session");
    }
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let micros = (after - before) as f64 / hz * 1e6;
        println!(
            "server CPU {:.0} ms over the hold: {:.1} us per ping",
            micros / 1e3,
            micros / latencies.len().max(1) as f64
        );
    }
    if failures > 0 {
        return Err(format!("{failures} pings failed"));
    }
    Ok(())
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("server pid {pid}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no VmRSS for pid {pid}"))
}

/// utime + stime of `pid` (all its threads), clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("server pid {pid}: {e}"))?;
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (tick(11), tick(12)) {
        (Some(utime), Some(stime)) => Ok(utime + stime),
        _ => Err(format!("unreadable /proc/{pid}/stat")),
    }
}
