//! The coordinator: the process the user starts.
//!
//! It re-runs its own command line `--procs` times as worker processes
//! (`--child N` and a shared `--run-id` added), steps them through the
//! phases together (`go` once all finished setup, `start` once all are
//! connected), reads the server's resident memory at those two points,
//! prints one live progress line for all of them, and merges their
//! results. Workers' free-form diagnostics go straight to stderr.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::cli::Cli;
use crate::report::{merge, RunResult};
use crate::sys::rss_kib;
use crate::worker::Progress;

/// What a worker said.
enum Said {
    Ready,
    /// Its connections are up; how many are open.
    Connected(u64),
    Progress(Progress),
    Result(Box<RunResult>),
    Fatal(String),
    /// Its stdout closed (it exited).
    Gone,
}

fn parse_line(line: &str) -> Option<Said> {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    match word {
        "ready" => Some(Said::Ready),
        "connected" => rest.trim().parse().ok().map(Said::Connected),
        "progress" => serde_json::from_str(rest).ok().map(Said::Progress),
        "result" => serde_json::from_str(rest).ok().map(|r| Said::Result(Box::new(r))),
        "fatal" => Some(Said::Fatal(rest.to_string())),
        _ => None,
    }
}

/// A short id for usernames: base 36 of the time and pid, lowercase.
pub fn fresh_run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut n = (secs % 100_000_000) * 100_000 + u64::from(std::process::id() % 100_000);
    let mut out = Vec::new();
    while n > 0 {
        let digit = (n % 36) as u8;
        out.push(if digit < 10 {
            b'0' + digit
        } else {
            b'a' + digit - 10
        });
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_else(|_| "0".into())
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Worker {
    fn tell(&mut self, word: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            // A worker that cannot hear us has exited; its stdout says so.
            let _ = writeln!(stdin, "{word}").and_then(|()| stdin.flush());
        }
    }
}

/// Runs the whole load test; returns the merged result and histogram.
pub fn run(cli: &Cli) -> Result<(RunResult, Histogram<u64>), String> {
    if let crate::cli::Scenario::Connect(args) = &cli.scenario {
        if args.login == crate::cli::LoginKind::Jwt && cli.common.jwt_secret_file.is_none() {
            return Err("connect --login jwt needs --jwt-secret-file (the server's HS256 secret)".into());
        }
    }
    let procs = cli.common.procs;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let mut base_args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if cli.common.run_id.is_none() {
        base_args.push("--run-id".into());
        base_args.push(fresh_run_id().into());
    }
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::with_capacity(procs);
    for index in 0..procs {
        let mut args = base_args.clone();
        args.push("--child".into());
        args.push(index.to_string().into());
        let mut child = Command::new(&exe)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start worker {index}: {e}"))?;
        let stdout = child.stdout.take().ok_or("worker has no stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(said) = parse_line(&line) {
                    if tx.send((index, said)).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send((index, Said::Gone));
        });
        let stdin = child.stdin.take();
        workers.push(Worker { child, stdin });
    }
    drop(tx);

    let outcome = supervise(cli, &mut workers, &rx);
    if outcome.is_err() {
        for w in &mut workers {
            // Only our own children, by handle.
            let _ = w.child.kill();
        }
    }
    for (index, w) in workers.iter_mut().enumerate() {
        w.stdin.take();
        match w.child.wait() {
            Ok(status) if !status.success() && outcome.is_ok() => {
                return Err(format!("worker {index} exited with {status}"));
            }
            _ => {}
        }
    }
    outcome
}

fn supervise(
    cli: &Cli,
    workers: &mut [Worker],
    rx: &mpsc::Receiver<(usize, Said)>,
) -> Result<(RunResult, Histogram<u64>), String> {
    let procs = workers.len();
    let server_pid = cli.common.server_pid;
    let mut progress = vec![Progress::default(); procs];
    let mut results: Vec<Option<RunResult>> = vec![None; procs];
    let (mut ready, mut connected, mut gone) = (0, 0, 0);
    let (mut rss_before, mut rss_after) = (None, None);
    // Connections open when `rss_after` is read, all workers together.
    let mut open_when_measured = 0u64;
    let began = Instant::now();
    let mut last_line = Instant::now();
    let mut last_delivered = 0u64;
    while gone < procs {
        let said = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(said) => Some(said),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match said {
            Some((_, Said::Ready)) => {
                ready += 1;
                if ready == procs {
                    if let Some(pid) = server_pid {
                        rss_before = Some(rss_kib(pid)?);
                    }
                    workers.iter_mut().for_each(|w| w.tell("go"));
                }
            }
            Some((_, Said::Connected(open))) => {
                connected += 1;
                open_when_measured += open;
                if connected == procs {
                    if let Some(pid) = server_pid {
                        // Let the server settle (lazy allocations, deferred
                        // frees, parking) before reading its memory.
                        std::thread::sleep(
                            Duration::try_from_secs_f64(cli.common.rss_settle_secs)
                                .unwrap_or(Duration::from_secs(1)),
                        );
                        rss_after = Some(rss_kib(pid)?);
                    }
                    if let Some(path) = &cli.common.connected_file {
                        std::fs::write(path, "connected\n")
                            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    }
                    workers.iter_mut().for_each(|w| w.tell("start"));
                }
            }
            Some((index, Said::Progress(p))) => {
                if let Some(slot) = progress.get_mut(index) {
                    *slot = p;
                }
            }
            Some((index, Said::Result(r))) => {
                if let Some(slot) = results.get_mut(index) {
                    *slot = Some(*r);
                }
            }
            Some((index, Said::Fatal(msg))) => return Err(format!("worker {index}: {msg}")),
            Some((index, Said::Gone)) => {
                gone += 1;
                if results.get(index).is_some_and(Option::is_none) {
                    return Err(format!("worker {index} exited without a result"));
                }
            }
            None => {}
        }
        if !cli.common.quiet && last_line.elapsed() >= Duration::from_secs(1) {
            let secs = last_line.elapsed().as_secs_f64();
            last_line = Instant::now();
            let total = sum_progress(&progress);
            let rate = (total.delivered.saturating_sub(last_delivered)) as f64 / secs;
            last_delivered = total.delivered;
            eprintln!(
                "[{:6.1}s] users {:>7}  conns {:>7}  msgs/s {:>9.0}  p99 {:>8} us  errors {}",
                began.elapsed().as_secs_f64(),
                total.users,
                total.open,
                rate,
                total.p99_us,
                total.errors
            );
        }
    }
    let parts: Vec<RunResult> = results.into_iter().flatten().collect();
    if parts.len() != procs {
        return Err(format!("only {} of {procs} workers reported", parts.len()));
    }
    let (mut merged, hist) = merge(&parts)?;
    merged.server_rss_kib_before = rss_before;
    merged.server_rss_kib_after = rss_after;
    // Divided by the connections open when the memory was read, not by
    // every connection of the run. `offline` reads it with only its
    // senders connected and the whole backlog stored: no per-connection
    // figure (a planner would take it for one).
    merged.server_rss_kib_per_conn = match (rss_before, rss_after) {
        (Some(before), Some(after)) if open_when_measured > 0 && merged.scenario != "offline" => {
            Some((after as f64 - before as f64) / open_when_measured as f64)
        }
        _ => None,
    };
    Ok((merged, hist))
}

fn sum_progress(parts: &[Progress]) -> Progress {
    parts.iter().fold(Progress::default(), |mut acc, p| {
        acc.users += p.users;
        acc.open += p.open;
        acc.delivered += p.delivered;
        acc.errors += p.errors;
        acc.p99_us = acc.p99_us.max(p.p99_us);
        acc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_lines_parse() {
        assert!(matches!(parse_line("ready"), Some(Said::Ready)));
        assert!(matches!(parse_line("connected 7"), Some(Said::Connected(7))));
        assert!(parse_line("connected").is_none(), "the count is part of the line");
        match parse_line(r#"progress {"users":1,"open":2,"delivered":3,"errors":4,"p99_us":5}"#) {
            Some(Said::Progress(p)) => assert_eq!(
                (p.users, p.open, p.delivered, p.errors, p.p99_us),
                (1, 2, 3, 4, 5)
            ),
            _ => panic!("progress line not parsed"),
        }
        assert!(matches!(parse_line("fatal boom"), Some(Said::Fatal(m)) if m == "boom"));
        assert!(parse_line("progress {broken").is_none());
        assert!(parse_line("chatter").is_none());
    }

    #[test]
    fn run_ids_are_valid_username_parts() {
        let id = fresh_run_id();
        assert!(!id.is_empty() && id.len() <= 12, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert!(tern_proto::limits::check_username(&format!("lg{id}_999999")).is_ok());
    }

    #[test]
    fn progress_sums() {
        let a = Progress {
            users: 1,
            open: 2,
            delivered: 3,
            errors: 0,
            p99_us: 10,
        };
        let b = Progress {
            users: 1,
            open: 5,
            delivered: 1,
            errors: 2,
            p99_us: 7,
        };
        let s = sum_progress(&[a, b]);
        assert_eq!(
            (s.users, s.open, s.delivered, s.errors, s.p99_us),
            (2, 7, 4, 2, 10)
        );
    }
}
