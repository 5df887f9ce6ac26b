//! Operations: `ternd`'s config layering and errors, the HTTP endpoint over
//! real sockets (metrics, health, readiness, limits), graceful SIGTERM, and
//! that every metric the Grafana dashboard queries is exported.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_engine::config_file::KEYS;
use tern_engine::http::{serve_http, MAX_CONCURRENT, MAX_REQUEST_BYTES};
use tern_engine::metrics::{parse_exposition, Metrics};
use tern_engine::{Config, Server};
use tern_net::memlock::{kernel_release, kernel_version};
use tern_storage::{Durability, Store, StoreOptions, Writer};

mod common;
use common::eventually;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A `ternd` child process, killed if the test ends early.
struct Ternd {
    child: Child,
    metrics: Option<SocketAddr>,
    chat: SocketAddr,
    banner: String,
}

impl Drop for Ternd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ternd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ternd"));
    // Only what each test sets: a developer's TERN_* must not leak in.
    for (var, _) in std::env::vars() {
        if var.starts_with("TERN_") || var == "RUST_LOG" || var == "GLOMMIO_COOP_TASKRUN" {
            cmd.env_remove(var);
        }
    }
    cmd
}

/// Starts `ternd` and waits for its startup lines.
fn start(mut cmd: Command) -> Ternd {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ternd");
    // Owned by the guard from here on, so every early return kills it.
    let mut server = Ternd {
        child,
        metrics: None,
        chat: SocketAddr::from(([0, 0, 0, 0], 0)),
        banner: String::new(),
    };
    let stdout = server.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("ternd printed its listening line");
        if let Some(addr) = line.strip_prefix("ternd metrics on ") {
            server.metrics = Some(addr.parse().expect("metrics address"));
        }
        if let Some(rest) = line.strip_prefix("ternd listening on ") {
            let chat = rest.split(' ').next().expect("address");
            server.chat = chat.parse().expect("chat address");
            server.banner = line;
            return server;
        }
    }
}

/// One HTTP/1.1 request; returns (status, body).
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: tern\r\n\r\n"))
}

/// The value of an unlabelled sample, e.g. `tern_shards`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn check_config_layers_file_env_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ternd.toml");
    std::fs::write(
        &file,
        "shards = 3\nsync_page = 9\nlisten = \"127.0.0.1:1000\"\ndurability = \"async\"\n",
    )
    .unwrap();
    let output = ternd()
        .args(["check-config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:3000", "--flush-interval-ms", "40"])
        .env("TERN_SHARDS", "2")
        .env("TERN_LISTEN", "127.0.0.1:2000")
        .output()
        .expect("run ternd check-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for line in [
        "sync_page = 9",               // file over default
        "shards = 2",                  // env over file
        "listen = \"127.0.0.1:3000\"", // flag over env
        "durability = \"async\"",
        "flush_interval_ms = 40",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?} in\n{stdout}");
    }
    assert_eq!(stdout.lines().count(), KEYS.len());
    // The printed settings are themselves a valid config file.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, stdout.as_bytes()).unwrap();
    let again = ternd().arg("check-config").arg(&printed).output().unwrap();
    assert!(again.status.success(), "{again:?}");
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
}

#[test]
fn bad_config_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "durability = \"fast\"\n",
            "config key `durability`: expected \"sync\" or \"async\", got \"fast\"",
        ),
        ("lsiten = \"127.0.0.1:1\"\n", "unknown config key `lsiten`"),
        (
            "shards = 0\n",
            "config key `shards`: expected an integer in 1..=1024, got 0",
        ),
        (
            "blocking_threads = 65\n",
            "config key `blocking_threads`: expected an integer in 1..=64, got 65",
        ),
        // Files a key names are read before anything starts, and a
        // failure names the key.
        (
            "content_filter_file = \"/nonexistent/words.txt\"\n",
            "content_filter_file: cannot read /nonexistent/words.txt",
        ),
        (
            "tls_listen = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n",
            "tls_cert: cannot read /nonexistent/cert.pem",
        ),
        // A check across keys says what it found and what it needs.
        (
            "outbound_queue_bytes = 100000\n",
            "outbound_queue_bytes (100000) must hold at least two maximal frames (2 × max_frame_bytes = 131072)",
        ),
        (
            "max_message_bytes = 65536\n",
            "max_message_bytes (65536) must leave 512 bytes of frame overhead below max_frame_bytes (65536): at most 65024",
        ),
    ];
    for (text, want) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        // check-config refuses what startup refuses.
        let checked = ternd()
            .arg("check-config")
            .arg(&file)
            .output()
            .expect("run ternd check-config");
        let stderr = String::from_utf8_lossy(&checked.stderr);
        assert!(!checked.status.success(), "{text}: check-config passed it");
        assert!(stderr.contains(want), "{text}: check-config said {stderr}");
        // Serving, not just checking: the process must refuse to start.
        let output = ternd()
            .arg("--config")
            .arg(&file)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .output()
            .expect("run ternd");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text}: started anyway");
        assert!(stderr.contains(want), "{text}: stderr was {stderr}");
        assert!(!dir.path().join("data").exists(), "{text}: touched the store");
        // Each cause is said once, not once more as its own source.
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            !first.contains("(os error 2): No such file"),
            "{text}: said twice: {first}"
        );
    }
    let output = ternd()
        .args(["check-config", "/nonexistent/ternd.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read config file"));
}

#[test]
fn ternd_serves_metrics_health_and_readiness_then_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ternd.toml");
    std::fs::write(
        &file,
        "shards = 2\npin_shards = false\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut cmd = ternd();
    cmd.arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    cmd.env("TERN_SHARDS", "1");
    let server = start(cmd);
    assert!(
        server.banner.ends_with(&format!(
            "(1 shard, data in {})",
            dir.path().join("data").display()
        )),
        "{}",
        server.banner
    );
    let metrics = server.metrics.expect("ternd printed its metrics address");
    assert_ne!(metrics, server.chat);

    assert_eq!(get(metrics, "/healthz").0, 200);
    assert_eq!(get(metrics, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(get(metrics, "/nope").0, 404);
    assert_eq!(http(metrics, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0, 405);
    let (head_status, head_body) = http(metrics, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((head_status, head_body.as_str()), (200, ""));

    let (status, text) = get(metrics, "/metrics?x=1");
    assert_eq!(status, 200);
    parse_exposition(&text).expect("well-formed exposition");
    assert_eq!(sample(&text, "tern_shards"), Some(1.0));
    assert_eq!(sample(&text, "tern_ready"), Some(1.0));
    // The vendored glommio sets its rings up with COOP_TASKRUN wherever
    // the kernel knows the flag (vendor/README.md).
    assert_eq!(
        sample(&text, "tern_io_uring_coop_taskrun"),
        Some(if kernel_version(&kernel_release()) >= Some((5, 19)) {
            1.0
        } else {
            0.0
        }),
        "{text}"
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 1e6);
    assert!(sample(&text, "process_open_fds").unwrap_or(0.0) >= 3.0, "{text}");
    assert!(
        sample(&text, "tern_store_writer_commit_seconds_count").is_some(),
        "{text}"
    );

    // The chat port is real: a client can connect.
    TcpStream::connect_timeout(&server.chat, TIMEOUT).expect("chat port accepts");

    // jemalloc runs with the compiled-in settings (its background thread
    // returns freed memory), and idle sessions park by default.
    let threads = thread_names(server.child.id());
    assert!(threads.iter().any(|t| t == "jemalloc_bg_thd"), "{threads:?}");
    assert!(threads.iter().any(|t| t == "tern-park-0"), "{threads:?}");

    let mut server = server;
    // SAFETY: kill has no memory effects; the pid is our live child's.
    let sent = unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ternd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "ternd exited with {status}");
    assert!(
        TcpStream::connect_timeout(&metrics, Duration::from_secs(1)).is_err(),
        "the metrics endpoint stopped with the process"
    );
}

#[test]
fn ternd_reports_rings_that_interrupt_when_coop_taskrun_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = ternd();
    cmd.args(["--shards", "1", "--no-pin", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("GLOMMIO_COOP_TASKRUN", "0");
    let server = start(cmd);
    let metrics = server.metrics.expect("ternd printed its metrics address");
    let (status, text) = get(metrics, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "tern_io_uring_coop_taskrun"), Some(0.0), "{text}");
}

#[test]
fn blocking_threads_float_over_the_servers_cpus_and_hashing_runs_idle() {
    let cpus = cpus_allowed(&format!("/proc/{}/status", std::process::id()));
    let shards = cpus.len().min(2);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = ternd();
    cmd.args(["--shards", &shards.to_string(), "--blocking-threads", "3"])
        .args(["--hash-threads", "2", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "off", "--data-dir"])
        .arg(dir.path().join("data"));
    let server = start(cmd);
    let pid = server.child.id();
    let executors = shard_threads_settled(pid, shards);
    // Each shard's threads carry its index (tern-shard-0, its blocking
    // threads tern-blk-0, ...), all named before the shard serves.
    let mut blocking_names = thread_names(pid);
    blocking_names.retain(|name| name.starts_with("tern-blk-"));
    blocking_names.sort();
    let mut expected: Vec<String> = thread_names(pid)
        .into_iter()
        .filter_map(|name| Some(format!("tern-blk-{}", name.strip_prefix("tern-shard-")?)))
        .flat_map(|name| std::iter::repeat_n(name, 3))
        .collect();
    expected.sort();
    assert_eq!(blocking_names, expected);
    let mut executor_names = thread_names(pid);
    executor_names.retain(|name| name.starts_with("tern-shard-"));
    executor_names.sort();
    let indices: Vec<String> = (0..shards).map(|i| format!("tern-shard-{i}")).collect();
    assert_eq!(executor_names, indices);
    // Executors and blocking threads run at normal priority; every
    // blocking thread runs on the process's whole CPU set.
    let blocking = threads_named(pid, "tern-blk-");
    assert!(
        executors
            .iter()
            .chain(&blocking)
            .all(|(_, policy)| *policy == libc::SCHED_OTHER),
        "{executors:?} {blocking:?}"
    );
    assert!(
        blocking.iter().all(|(set, _)| *set == cpus),
        "{blocking:?}, process {cpus:?}"
    );
    if cpus.len() >= 2 {
        // Each executor on a CPU of its own (glommio's default put every
        // blocking thread on one CPU too).
        let mut pinned: Vec<_> = executors.iter().filter(|(set, _)| set.len() == 1).collect();
        assert_eq!(pinned.len(), shards, "{executors:?}");
        pinned.dedup();
        assert_eq!(pinned.len(), shards, "executors share a CPU: {executors:?}");
    }
    // Password hashing runs on its own threads, under SCHED_IDLE. They
    // set their policy as they start, so give them a moment.
    let hashers = eventually("two idle hashing threads", || {
        let hashers = threads_named(pid, "tern-hash-");
        (hashers.len() == 2 && hashers.iter().all(|(_, policy)| *policy == libc::SCHED_IDLE))
            .then_some(hashers)
    });
    assert!(hashers.iter().all(|(set, _)| *set == cpus), "{hashers:?}");
}

#[test]
fn the_store_writer_gets_a_cpu_no_shard_uses() {
    let cpus = cpus_allowed(&format!("/proc/{}/status", std::process::id()));
    // One CPU leaves nothing to give the writer (CI and the dev box have two).
    if cpus.len() < 2 {
        eprintln!("skipped: this process may use one CPU only");
        return;
    }
    // The server gets two CPUs (as under `taskset`), however many this box has.
    let given = [cpus[0], cpus[1]];
    let last = given[1];
    // The defaults: one shard per CPU but the writer's, the writer pinned.
    let shards = 1;
    let start_with = |flags: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = ternd();
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls sched_setaffinity on a set it built on its stack.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for cpu in given {
                    libc::CPU_SET(cpu, &mut set);
                }
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.args(flags)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data-dir"])
            .arg(dir.path().join("data"));
        (dir, start(cmd))
    };

    let (_dir, server) = start_with(&[]);
    let pid = server.child.id();
    let executors = shard_threads_settled(pid, shards);
    let writer = threads_named(pid, "tern-store-writ");
    assert_eq!(
        writer,
        vec![(vec![last], libc::SCHED_OTHER)],
        "the writer alone on the last CPU"
    );
    assert!(
        executors.iter().all(|(set, _)| set.len() == 1 && set[0] != last),
        "a shard on the writer's CPU: {executors:?}"
    );
    // lsm-tree's reaper, which frees every flushed memtable, starts with the
    // store (on its opener thread, at fjall's workers' priority), not with
    // the first thread to retire a version, which may be the pinned writer
    // rotating a memtable inline: it floats over the server's CPUs.
    let reaper = threads_named(pid, "lsm-reaper");
    assert_eq!(reaper, vec![(given.to_vec(), libc::SCHED_OTHER)], "the reaper");
    let workers = thread_nices(pid, "fjall:worker");
    assert!(!workers.is_empty());
    let reaper_nice = thread_nices(pid, "lsm-reaper");
    assert!(
        workers.iter().all(|nice| reaper_nice == [*nice]),
        "reaper {reaper_nice:?}, workers {workers:?}"
    );
    // Not above where the server already runs at nice 19.
    assert!(reaper_nice[0] >= thread_nices(pid, "ternd")[0]);
    drop(server);

    // Turned off, the writer floats over every CPU the server may use.
    let (_dir, server) = start_with(&["--pin-store-writer", "false"]);
    let pid = server.child.id();
    shard_threads_settled(pid, shards);
    let writer = threads_named(pid, "tern-store-writ");
    assert_eq!(writer, vec![(given.to_vec(), libc::SCHED_OTHER)]);
}

#[test]
fn hashing_keeps_normal_priority_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = ternd();
    cmd.args(["--shards", "1", "--no-pin", "--blocking-threads", "2"])
        .args(["--hash-threads", "3", "--hash-idle-priority", "false"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data-dir"])
        .arg(dir.path().join("data"));
    let server = start(cmd);
    let pid = server.child.id();
    shard_threads_settled(pid, 1);
    // The hashing threads name themselves once started: on a loaded box
    // that can come after the shards (this failed once beside a build).
    let hashers = eventually("3 tern-hash threads", || {
        let hashers = threads_named(pid, "tern-hash-");
        (hashers.len() == 3).then_some(hashers)
    });
    assert!(
        hashers.iter().all(|(_, policy)| *policy == libc::SCHED_OTHER),
        "{hashers:?}"
    );
}

/// The `tern-shard` threads of `pid` once there are `expected`: a thread
/// a shard spawns (`tern-park-N`) carries the shard's name until it has
/// named itself.
fn shard_threads_settled(pid: u32, expected: usize) -> Vec<(Vec<usize>, i32)> {
    eventually(&format!("{expected} tern-shard threads"), || {
        let threads = threads_named(pid, "tern-shard");
        (threads.len() == expected).then_some(threads)
    })
}

/// (CPU set, scheduling policy) of each thread of process `pid` whose name
/// starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> Vec<(Vec<usize>, i32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.starts_with(prefix) {
            let status = path.join("status").display().to_string();
            let stat = path.join("stat").display().to_string();
            threads.push((cpus_allowed(&status), sched_policy(&stat)));
        }
    }
    threads
}

/// The nice value of each thread of process `pid` whose name starts with
/// `prefix`.
fn thread_nices(pid: u32, prefix: &str) -> Vec<i64> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.starts_with(prefix) {
            nices.push(stat_field(&path.join("stat").display().to_string(), 19));
        }
    }
    nices
}

/// The scheduling policy in a `/proc/.../stat` file.
fn sched_policy(stat: &str) -> i32 {
    stat_field(stat, 41) as i32
}

/// Field `field` (numbered from 1, as proc(5) does) of a `/proc/.../stat`
/// file.
fn stat_field(stat: &str, field: usize) -> i64 {
    let text = std::fs::read_to_string(stat).expect("stat");
    // The command name (field 2) may hold spaces: fields count from its ')'.
    let after_name = &text[text.rfind(')').expect("comm") + 2..];
    after_name
        .split(' ')
        .nth(field - 3)
        .expect("a stat field")
        .parse()
        .expect("a number")
}

/// The CPUs in the `Cpus_allowed_list` of a `/proc/.../status` file.
fn cpus_allowed(status: &str) -> Vec<usize> {
    let text = std::fs::read_to_string(status).expect("status");
    let list = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc task list");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Starts an in-process server with the HTTP endpoint beside it and a real
/// storage writer, as `ternd` will once the engine hands it its writer.
fn in_process() -> (
    tempfile::TempDir,
    Server,
    tern_engine::http::HttpServer,
    Writer,
    Arc<AtomicBool>,
) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::for_tests(dir.path().join("data"));
    let metrics = Arc::new(Metrics::new(config.shards));
    let ready = Arc::new(AtomicBool::new(false));
    let server = Server::start(config).expect("server starts");
    let store = Store::open(&dir.path().join("writer-store"), StoreOptions::default()).unwrap();
    let writer = Writer::spawn(store, Durability::Sync, 16).unwrap();
    let http = serve_http("127.0.0.1:0".parse().unwrap(), metrics, ready.clone(), None).unwrap();
    http.set_writer(writer.handle());
    (dir, server, http, writer, ready)
}

#[test]
fn readiness_follows_its_flag() {
    let (_dir, server, http, _writer, ready) = in_process();
    let addr = http.local_addr();
    assert_eq!(get(addr, "/readyz").0, 503);
    assert_eq!(get(addr, "/healthz").0, 200, "live while not ready");
    assert_eq!(sample(&get(addr, "/metrics").1, "tern_ready"), Some(0.0));
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(addr, "/readyz").0, 200);
    assert_eq!(sample(&get(addr, "/metrics").1, "tern_ready"), Some(1.0));
    server.shutdown().unwrap();
    drop(http);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

#[test]
fn the_endpoint_bounds_requests() {
    let (_dir, server, http, _writer, _ready) = in_process();
    let addr = http.local_addr();
    // An oversized request head is refused, not buffered.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_REQUEST_BYTES)
    );
    assert_eq!(http_lossy(addr, &huge), 400);
    // Fill every worker with a client that sends nothing; the next one is
    // turned away with a 503 instead of queueing behind them. (Queued, it
    // would get a 200 once READ_TIMEOUT freed a worker.) The listener
    // accepts in order, so the probe is accepted after every idle client
    // without a sleep; no clock is asserted, the status tells the two apart.
    let idle: Vec<TcpStream> = (0..MAX_CONCURRENT)
        .map(|_| TcpStream::connect_timeout(&addr, TIMEOUT).unwrap())
        .collect();
    assert_eq!(get(addr, "/healthz").0, 503);
    drop(idle);
    // Once the silent clients are dropped, their workers are freed.
    let deadline = Instant::now() + TIMEOUT;
    while get(addr, "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "workers were not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.shutdown().unwrap();
}

/// Like [`http`], for a request the server may answer before reading all
/// of it (then writing the rest can fail with a reset).
fn http_lossy(addr: SocketAddr, request: &str) -> u16 {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let _ = stream.write_all(request.as_bytes());
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Metric names in the dashboard's queries (`tern_*` and `process_*`).
fn dashboard_metrics(dashboard: &str) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 10, "found only {} queries", exprs.len());
    let mut names = Vec::new();
    for expr in exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let rest = &expr[i..];
            let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            if starts_word && (rest.starts_with("tern_") || rest.starts_with("process_")) {
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                names.push(rest[..len].to_owned());
                i += len;
            } else {
                i += 1;
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana-dashboard.json"),
    )
    .expect("read packaging/grafana-dashboard.json");
    let queried = dashboard_metrics(&dashboard);
    let (_dir, server, http, _writer, _ready) = in_process();
    let (status, text) = get(http.local_addr(), "/metrics");
    assert_eq!(status, 200);
    let exported = parse_exposition(&text).expect("well-formed exposition");
    let missing: Vec<&String> = queried.iter().filter(|name| !exported.contains(name)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics lacks: {missing:?}"
    );
    // And the operator's guide documents every metric family.
    let guide = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"))
        .expect("read docs/operations.md");
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let undocumented: Vec<&&str> = families
        .iter()
        .filter(|f| !guide.contains(&format!("`{f}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/operations.md lacks {undocumented:?}"
    );
    // And documents none that is not exported (a renamed or removed one).
    let stale: Vec<&str> = guide
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|name| {
            (name.starts_with("tern_") || name.starts_with("process_"))
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .filter(|name| !families.contains(name))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/operations.md names metrics /metrics does not export: {stale:?}"
    );
    server.shutdown().unwrap();
}

/// `ternd` with one unpinned shard listening on `listen`, its store in
/// `data`.
fn one_shard(listen: &str, data: &Path) -> Command {
    let mut cmd = ternd();
    cmd.args(["--shards", "1", "--no-pin", "--listen", listen, "--data-dir"])
        .arg(data);
    cmd
}

/// Waits up to `limit` for `child` to exit; `None` if it is still running.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `cmd` and waits for it to exit by itself (a refused start).
fn refused_start(mut cmd: Command) -> (Option<std::process::ExitStatus>, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ternd");
    let mut server = Ternd {
        child,
        metrics: None,
        chat: "127.0.0.1:0".parse().expect("addr"),
        banner: String::new(),
    };
    let status = exit_within(&mut server.child, Duration::from_secs(15));
    let mut output = String::new();
    if status.is_some() {
        for pipe in [
            server.child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
            server.child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
        ]
        .into_iter()
        .flatten()
        {
            let mut pipe = pipe;
            let _ = pipe.read_to_string(&mut output);
        }
    }
    (status, output)
}

/// Every listener binds with SO_REUSEPORT among the shards, which would
/// also let a second ternd of the same user share a port already served,
/// and take half the new clients to its own store: it must refuse to start.
#[test]
fn a_second_ternd_on_a_port_already_served_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start(one_shard("127.0.0.1:0", &dir.path().join("a")));
    let second = one_shard(&first.chat.to_string(), &dir.path().join("b"));
    let (status, output) = refused_start(second);
    assert!(
        matches!(status, Some(s) if !s.success()),
        "a second ternd serves {} beside the first ({status:?}): {output}",
        first.chat
    );
    assert!(
        output.contains("cannot listen on") && !output.contains("ternd listening"),
        "{output}"
    );
}

/// `tls_listen` on the plain listener's port is refused before anything
/// is bound (both would otherwise share it).
#[test]
fn tls_listen_on_the_plain_port_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = "127.0.0.1:7999";
    let mut cmd = one_shard(addr, &dir.path().join("data"));
    cmd.args([
        "--tls-listen",
        addr,
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "key.pem",
    ]);
    let (status, output) = refused_start(cmd);
    assert!(matches!(status, Some(s) if !s.success()), "{status:?}: {output}");
    assert!(
        output.contains("tls_listen") && output.contains("share a port"),
        "{output}"
    );
}

/// A data directory too long for its admin socket is refused before the
/// server says it is listening (it used to announce itself, then exit 1).
#[test]
fn a_data_dir_too_long_for_the_admin_socket_is_refused_before_listening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmd = one_shard("127.0.0.1:0", &dir.path().join("d".repeat(110)));
    let (status, output) = refused_start(cmd);
    assert!(matches!(status, Some(s) if !s.success()), "{status:?}: {output}");
    assert!(
        output.contains("data_dir is too long") && !output.contains("ternd listening"),
        "{output}"
    );
}

/// A port another process listens on is refused before the store is
/// opened: a mistyped port leaves no empty store behind in a new data
/// directory.
#[test]
fn a_port_in_use_is_refused_before_the_store_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let data = dir.path().join("new-data");
    let (status, output) = refused_start(one_shard(&addr, &data));
    assert!(matches!(status, Some(s) if !s.success()), "{status:?}: {output}");
    assert!(output.contains("cannot listen on"), "{output}");
    assert!(!data.exists(), "the store was created anyway: {output}");
}

/// Connects to a running ternd's admin socket, which it serves just
/// after its listening line.
fn admin_connection(data: &Path) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match std::os::unix::net::UnixStream::connect(data.join("admin.sock")) {
            Ok(admin) => return admin,
            Err(e) => assert!(Instant::now() < deadline, "admin socket: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a space to `admin` every second, never a newline, until told
/// to stop: a local client sending its command a byte at a time.
fn drip(mut admin: std::os::unix::net::UnixStream, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if admin.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    })
}

fn signal(server: &Ternd, signal: libc::c_int) {
    // SAFETY: kill has no memory effects; the pid is our live child's.
    assert_eq!(unsafe { libc::kill(server.child.id() as libc::pid_t, signal) }, 0);
}

/// The admin socket gives a command 5 s in all, not 5 s per read, and
/// gives up when the server stops: a client dripping bytes cannot hold
/// SIGTERM's shutdown.
#[test]
fn a_slow_admin_client_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut cmd = one_shard("127.0.0.1:0", &data);
    cmd.args(["--shutdown-grace-ms", "100"]);
    let mut server = start(cmd);
    let stop = Arc::new(AtomicBool::new(false));
    let dripping = drip(admin_connection(&data), stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    signal(&server, libc::SIGTERM);
    let status = exit_within(&mut server.child, Duration::from_secs(15));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    dripping.join().expect("drip");
    assert!(
        matches!(status, Some(s) if s.success()),
        "not stopped cleanly: {status:?}"
    );
}

/// A second SIGINT or SIGTERM during a drain ends ternd at once (status
/// 1), for an operator whose first one is taking too long. The second
/// follows the first at once: a drain takes at least one tick of the
/// shards' stop watchers (50 ms), so it always lands inside one.
#[test]
fn a_second_signal_ends_a_drain_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = start(one_shard("127.0.0.1:0", &dir.path().join("data")));
    signal(&server, libc::SIGTERM);
    signal(&server, libc::SIGINT);
    let status = exit_within(&mut server.child, Duration::from_secs(10));
    assert!(matches!(status, Some(s) if s.code() == Some(1)), "{status:?}");
}
