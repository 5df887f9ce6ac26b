//! The `tern` CLI against a real `ternd` child process, with loopback
//! metered like any other address (`limits_exempt = []`): what a fake
//! server would only imitate, such as the rate limits on receipts.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tern_client::{Client, ClientOptions};

const PASSWORD: &str = "password1";

/// Kills `ternd` when the test ends, however it ends.
struct Ternd {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Ternd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ternd` next to the `tern` under test, (re)built with cargo so that it
/// matches the sources (`cargo test -p tern-client` alone does not build
/// it). Falls back to an existing binary if cargo fails; `None` (the test
/// then skips) if there is none.
fn ternd_bin() -> Option<PathBuf> {
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    let ternd = tern.with_file_name(format!("ternd{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--offline", "-p", "tern-engine", "--bin", "ternd"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if tern.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        build.arg("--release");
    }
    match build.output() {
        Ok(out) if !out.status.success() => {
            eprintln!("building ternd failed: {}", String::from_utf8_lossy(&out.stderr))
        }
        Ok(_) => {}
        Err(e) => eprintln!("cannot run cargo to build ternd: {e}"),
    }
    ternd.exists().then_some(ternd)
}

/// Starts `ternd` (one shard, data and config under `dir`, `config` as its
/// config file) and waits until it listens.
fn start_ternd(bin: &Path, dir: &Path, config: &str) -> Ternd {
    let config_path = dir.join("ternd.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut cmd = Command::new(bin);
    for var in ["TERN_LISTEN", "TERN_DATA_DIR", "TERN_SHARDS", "TERN_CONFIG"] {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .args([
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--no-pin",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = mpsc::channel();
    // Keeps draining stdout so that logging never blocks the server.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ternd listening on ") {
                let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                let _ = addr_tx.send(addr);
            }
        }
    });
    let mut ternd = Ternd {
        child,
        addr: "127.0.0.1:0".parse().unwrap(),
    };
    ternd.addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("ternd printed its address")
        .parse()
        .unwrap();
    ternd
}

fn connect(addr: SocketAddr) -> Client {
    let opts = ClientOptions {
        timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    Client::connect(addr, opts).unwrap()
}

/// `tern listen` used to send one `Delivered` receipt per message; ternd
/// meters 1:1 receipts at the message rate (burst 100), so a catch-up of
/// more than about 100 messages got `RateLimited` and listen exited 1
/// part way through.
#[test]
fn listen_catches_up_on_more_messages_than_the_receipt_rate_allows() {
    const SENDERS: usize = 3;
    const PER_SENDER: usize = 75; // within one connection's burst of 100
    let Some(bin) = ternd_bin() else {
        eprintln!("SKIPPED: ternd is not built and could not be built");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Cheap password hashes: the debug build hashes slowly.
    let config = "limits_exempt = []\nargon2_memory_kib = 8\nargon2_iterations = 1\n";
    let ternd = start_ternd(&bin, dir.path(), config);
    let alice = connect(ternd.addr).register("alice", PASSWORD).unwrap();
    connect(ternd.addr).register("bob", PASSWORD).unwrap();
    for sender in 0..SENDERS {
        let mut bob = connect(ternd.addr);
        bob.login("bob", PASSWORD).unwrap();
        for n in 0..PER_SENDER {
            bob.send_text(alice, &format!("m{sender}-{n}")).unwrap();
        }
    }
    let total = SENDERS * PER_SENDER;
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--server", &ternd.addr.to_string()])
        .args(["--user", "alice", "--password", PASSWORD])
        .args(["listen", "--count", &total.to_string(), "--timeout-secs", "60"])
        .env_remove("TERN_SERVER")
        .env_remove("TERN_JWT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "listen: {}; stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), total, "{stdout}");
    // Everything shown was acknowledged: a fresh session (no cursors) is streamed nothing.
    let mut again = connect(ternd.addr);
    again.login_unsynced("alice", PASSWORD).unwrap();
    assert_eq!(again.sync().unwrap(), 0);
}
