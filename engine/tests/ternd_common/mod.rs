//! A real `ternd` process for the crash tests (`crash.rs`,
//! `deletion_crash.rs`, `join_crash.rs`, `threshold.rs`): started on a data directory with
//! its output appended to a log file, killed with SIGKILL or stopped with
//! SIGTERM, and restarted on the same directory.
#![allow(dead_code)] // not every test binary uses every helper

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A `ternd` process.
pub struct Ternd {
    child: Child,
    pub addr: SocketAddr,
}

impl Ternd {
    /// Starts `ternd` on `data_dir` with two shards, its output appended
    /// to `log`, and waits for the address it listens on.
    pub fn start(data_dir: &Path, log: &Path) -> Ternd {
        Ternd::start_with(data_dir, log, &[])
    }

    /// [`Ternd::start`] with more command-line flags.
    pub fn start_with(data_dir: &Path, log: &Path, flags: &[&str]) -> Ternd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ternd"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--shards", "2", "--no-pin"])
            .args(flags)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ternd");
        let (tx, rx) = mpsc::channel();
        // Logs go to stdout too: keep both pipes drained for the
        // process's whole life, or it would block on a full pipe.
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, tx) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, Some(tx)),
            (Box::new(stderr), None),
        ] {
            let log = log.to_owned();
            thread::spawn(move || {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log file");
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(file, "{line}");
                    if let (Some(tx), Some(rest)) = (&tx, line.strip_prefix("ternd listening on ")) {
                        if let Some(addr) = rest.split_whitespace().next() {
                            let _ = tx.send(addr.to_owned());
                        }
                    }
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "ternd did not start ({status:?}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        Ternd { child, addr }
    }

    pub fn kill9(mut self) {
        // SAFETY: sending a signal to our own child process has no memory effects.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 ternd");
        let status = self.child.wait().expect("reap ternd");
        assert!(
            !status.success(),
            "ternd exited cleanly before the kill: {status:?}"
        );
    }

    /// Stops it with SIGTERM (a clean shutdown) and waits.
    pub fn stop(mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("ternd did not stop within 15 s of SIGTERM");
    }
}

impl Drop for Ternd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment variable `name` parsed as a `T`, or `default` when it
/// is unset or does not parse: the knobs that make a test run bigger.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seed of a randomised run: the variable `name` if set (to repeat a
/// run), else the clock. Printed as `name=seed`, so that a failing run can
/// be repeated.
pub fn seed(name: &str) -> u64 {
    let seed = std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{name}={seed}");
    seed
}

/// The seed of a randomised crash run (`TERN_CRASH_SEED`, see [`seed`]).
pub fn crash_seed() -> u64 {
    seed("TERN_CRASH_SEED")
}
