//! End to end: a real `ternd` process, driven by the `loadgen` binary over
//! TCP with the `pairs`, `connect`, `offline` and `churn` scenarios; each
//! must deliver every message exactly once, in order (`--verify`), and
//! report no errors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ternd_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_loadgen")).with_file_name("ternd");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "tern-engine", "--bin", "ternd"])
            .status()
            .expect("cargo build ternd");
        assert!(status.success(), "building ternd failed");
    }
    path
}

fn start_server(data_dir: &Path) -> (Server, String) {
    let mut child = Command::new(ternd_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--no-pin",
            "--data-dir",
        ])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ternd");
    let stdout = child.stdout.take().expect("ternd stdout");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("ternd output");
        if let Some(rest) = line.strip_prefix("ternd listening on ") {
            let addr = rest.split_whitespace().next().expect("address").to_string();
            return (server, addr);
        }
        assert!(Instant::now() < deadline, "ternd did not start");
    }
    panic!("ternd exited before listening");
}

fn loadgen(addr: &str, json: &Path, args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--quiet", "--server", addr, "--json"])
        .arg(json)
        .args(args)
        .output()
        .expect("run loadgen");
    assert!(
        output.status.success(),
        "loadgen {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(json).expect("json written");
    serde_json::from_str(&text).expect("valid json")
}

#[test]
fn pairs_and_connect_against_a_real_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (server, addr) = start_server(&data);
    let pid = server.0.id().to_string();

    let pairs = loadgen(
        &addr,
        &dir.path().join("pairs.json"),
        &[
            "--verify",
            "pairs",
            "--pairs",
            "4",
            "--window",
            "4",
            "--duration-secs",
            "2",
        ],
    );
    assert_eq!(pairs["scenario"], "pairs");
    assert!(pairs["messages"].as_u64().expect("messages") > 0, "{pairs}");
    assert_eq!(pairs["errors"].as_u64(), Some(0), "{pairs}");
    assert_eq!(pairs["connections"].as_u64(), Some(8), "{pairs}");
    assert!(pairs["latency_us"]["p99"].as_u64().expect("p99") > 0, "{pairs}");
    for key in ["lost", "duplicated", "reordered"] {
        assert_eq!(pairs[key].as_u64(), Some(0), "{key}: {pairs}");
    }

    let connect = loadgen(
        &addr,
        &dir.path().join("connect.json"),
        &[
            "--procs",
            "2",
            "--server-pid",
            &pid,
            "connect",
            "--connections",
            "50",
            "--hold-secs",
            "1",
        ],
    );
    assert_eq!(connect["connections"].as_u64(), Some(50), "{connect}");
    assert_eq!(connect["errors"].as_u64(), Some(0), "{connect}");
    assert!(connect["server_rss_kib_per_conn"].is_number(), "{connect}");
}

#[test]
fn offline_backlog_drains_exactly_once_and_churn_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, addr) = start_server(&dir.path().join("data"));

    let offline = loadgen(
        &addr,
        &dir.path().join("offline.json"),
        &[
            "--verify",
            "offline",
            "--users",
            "5",
            "--backlog",
            "600",
            "--send-window",
            "16",
        ],
    );
    assert_eq!(offline["scenario"], "offline");
    assert_eq!(offline["sent"].as_u64(), Some(600), "{offline}");
    assert_eq!(offline["messages"].as_u64(), Some(600), "{offline}");
    assert_eq!(offline["connections"].as_u64(), Some(10), "{offline}");
    assert_eq!(offline["errors"].as_u64(), Some(0), "{offline}");
    for key in ["lost", "duplicated", "reordered"] {
        assert_eq!(offline[key].as_u64(), Some(0), "{key}: {offline}");
    }
    assert!(
        offline["msgs_per_s"].as_f64().expect("drain rate") > 0.0,
        "{offline}"
    );
    assert!(
        offline["backlog_msgs_per_s"].as_f64().expect("fill rate") > 0.0,
        "{offline}"
    );
    // One time-to-first-message per recipient.
    assert!(
        offline["latency_us"]["max"].as_u64().expect("max") > 0,
        "{offline}"
    );

    let churn = loadgen(
        &addr,
        &dir.path().join("churn.json"),
        &[
            "--verify",
            "--duration-secs",
            "3",
            "churn",
            "--connections",
            "20",
            "--percent",
            "25",
            "--trickle-rate",
            "100",
        ],
    );
    assert_eq!(churn["scenario"], "churn");
    // Ticks at 1 s and 2 s, 5 sessions each.
    assert_eq!(churn["reconnects"].as_u64(), Some(10), "{churn}");
    assert_eq!(churn["reconnect_failures"].as_u64(), Some(0), "{churn}");
    assert_eq!(churn["errors"].as_u64(), Some(0), "{churn}");
    assert!(churn["sent"].as_u64().expect("sent") > 0, "{churn}");
    assert_eq!(churn["messages"], churn["sent"], "{churn}");
}
