//! End to end: the `tls-idle` tool against a real `ternd` with a TLS
//! listener: it registers users, holds TLS sessions while they park, pings
//! them, and reports the server's memory and CPU per session and ping.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ternd_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_tls-idle")).with_file_name("ternd");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "tern-engine", "--bin", "ternd"])
            .status()
            .expect("cargo build ternd");
        assert!(status.success(), "building ternd failed");
    }
    path
}

#[test]
fn tls_idle_reports_memory_and_cpu_of_parked_tls_sessions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let made = Command::new(ternd_binary())
        .args(["gen-cert", "--out"])
        .arg(&certs)
        .output()
        .expect("gen-cert");
    assert!(made.status.success(), "{made:?}");
    let mut child = Command::new(ternd_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--no-pin",
        ])
        .args([
            "--park-after-ms",
            "200",
            "--argon2-memory-kib",
            "64",
            "--argon2-iterations",
            "1",
        ])
        .arg("--tls-cert")
        .arg(certs.join("cert.pem"))
        .arg("--tls-key")
        .arg(certs.join("key.pem"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ternd");
    let pid = child.id();
    let stdout = child.stdout.take().expect("ternd stdout");
    let server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let tls_addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("ternd TLS listening on ").map(str::to_owned))
        .expect("ternd printed its TLS address");
    // Keep reading, so that ternd never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));

    let output = Command::new(env!("CARGO_BIN_EXE_tls-idle"))
        .args(["--server", &tls_addr, "--connections", "40", "--prefix", "ti_"])
        .args([
            "--settle-secs",
            "1",
            "--hold-secs",
            "2",
            "--ping-interval-secs",
            "0.5",
        ])
        .args(["--server-pid", &pid.to_string(), "--ca"])
        .arg(certs.join("cert.pem"))
        .output()
        .expect("run tls-idle");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("sessions 40 (TLS)"), "{text}");
    assert!(text.contains("failed 0"), "{text}");
    assert!(!text.contains("pings answered 0,"), "{text}");
    assert!(text.contains("KiB/session"), "{text}");
    assert!(text.contains("us per ping"), "{text}");
    drop(server);
}
