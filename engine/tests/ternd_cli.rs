//! End to end with the real binaries: `ternd` as a child process, the `tern`
//! CLI for registering, listening and sending, and SIGTERM for a clean stop.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{opts, PASSWORD, TIMEOUT};
use tern_client::{Client, ErrorCode, FriendAdded, ServerBody, UserId};

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Kills the child if the test fails before it exits on its own.
struct Reaped(Option<Child>);

impl Reaped {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child still owned")
    }

    fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child().try_wait().expect("try_wait") {
                self.0 = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit and collects the output (stdout/stderr must be piped).
    fn output_within(&mut self, limit: Duration) -> Output {
        let child = self.0.take().expect("child still owned");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(limit) {
            Ok(output) => output.expect("wait for child"),
            Err(_) => {
                kill(pid, libc::SIGKILL);
                panic!("process {pid} did not exit within {limit:?}");
            }
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn kill(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory effects; pid is a child we spawned and have
    // not yet reaped, so it cannot name an unrelated process.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// The `tern` CLI next to `ternd`, (re)built with cargo so that it matches
/// the sources (`cargo test -p tern-engine` alone does not build it). Falls
/// back to an existing binary if cargo fails; `None` (the test then skips)
/// if there is none.
fn tern_bin() -> Option<PathBuf> {
    let ternd = Path::new(env!("CARGO_BIN_EXE_ternd"));
    let tern = ternd.with_file_name(format!("tern{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--offline", "-p", "tern-client", "--bin", "tern"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if ternd.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        build.arg("--release");
    }
    match build.spawn() {
        // Bounded, in case something holds cargo's build lock.
        Ok(child) => {
            let output = Reaped(Some(child)).output_within(Duration::from_secs(300));
            if !output.status.success() {
                eprintln!(
                    "building tern failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        Err(e) => eprintln!("cannot run cargo to build tern: {e}"),
    }
    tern.exists().then_some(tern)
}

fn cli_env(cmd: &mut Command) -> &mut Command {
    for var in [
        "TERN_SERVER",
        "TERN_USER",
        "TERN_PASSWORD",
        "TERN_JWT",
        "TERN_LISTEN",
        "TERN_DATA_DIR",
        "TERN_SHARDS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info")
}

struct Cli {
    bin: PathBuf,
    server: SocketAddr,
}

impl Cli {
    fn command(&self, user: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cli_env(&mut cmd)
            .arg("--server")
            .arg(self.server.to_string())
            .args(["--user", user, "--password", PASSWORD])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a command to completion; asserts success; returns stdout.
    fn run(&self, user: &str, args: &[&str]) -> String {
        let child = self.command(user, args).spawn().expect("spawn tern");
        let output = Reaped(Some(child)).output_within(Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "tern {args:?} as {user} failed ({}): stdout {stdout:?} stderr {:?}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    fn spawn(&self, user: &str, args: &[&str]) -> Reaped {
        Reaped(Some(self.command(user, args).spawn().expect("spawn tern")))
    }
}

/// Waits for `who` to come online (as a friend of `watcher`); other pushes
/// (echoes of what the CLI sends as the same user, and a `FriendAccepted`
/// that left its conversation's home shard after the accepter's shard
/// reported them offline) are skipped.
fn wait_online(watcher: &mut Client, who: UserId) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "user {who} did not come online");
        match watcher.next_push(left).expect("watcher connection") {
            Some(ServerBody::Presence { user, online: true }) if user == who => return,
            Some(
                ServerBody::Presence { .. }
                | ServerBody::Message(_)
                | ServerBody::Receipt { .. }
                | ServerBody::FriendAccepted { .. },
            )
            | None => {}
            Some(other) => panic!("watcher got {other:?}"),
        }
    }
}

/// A `ternd` child process listening on a free port.
struct Ternd {
    process: Reaped,
    addr: SocketAddr,
    /// Drains stdout (so logging never blocks the server); joins with the
    /// lines once the process is gone.
    log_reader: std::thread::JoinHandle<Vec<String>>,
}

impl Ternd {
    /// Starts `ternd` with two shards and its data under `dir`, plus
    /// `args`, and waits until it listens.
    fn start(dir: &Path, args: &[&str]) -> Ternd {
        let mut ternd = Command::new(env!("CARGO_BIN_EXE_ternd"));
        cli_env(&mut ternd)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--shards",
                "2",
                "--no-pin",
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = Reaped(Some(ternd.spawn().expect("spawn ternd")));
        // Find the address in "ternd listening on ADDR (...)".
        let stdout = process.child().stdout.take().expect("stdout");
        let (addr_tx, addr_rx) = mpsc::channel();
        let log_reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ternd listening on ") {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = addr_tx.send(addr);
                }
                lines.push(line);
            }
            lines
        });
        let addr: SocketAddr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("ternd printed its address")
            .parse()
            .expect("a socket address");
        assert_ne!(addr.port(), 0);
        Ternd {
            process,
            addr,
            log_reader,
        }
    }
}

#[test]
fn ternd_and_the_tern_cli_end_to_end() {
    let Some(tern) = tern_bin() else {
        eprintln!(
            "SKIPPED: the tern CLI binary is not built and could not be built; \
             run `cargo build -p tern-client --bin tern` first"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let Ternd {
        process: mut ternd,
        addr,
        log_reader,
    } = Ternd::start(dir.path(), &[]);
    let pid = ternd.child().id();
    let cli = Cli {
        bin: tern,
        server: addr,
    };

    let out = cli.run("alice", &["register"]);
    assert!(out.contains("registered alice"), "{out}");
    let out = cli.run("bob", &["register"]);
    assert!(out.contains("registered bob"), "{out}");

    // A library client as Alice watches Bob's presence, so that messages are
    // sent only once Bob's listener is connected.
    let mut watcher = Client::connect(addr, opts()).expect("connect");
    let alice = watcher.login("alice", PASSWORD).expect("login").user;
    let FriendAdded::Requested(bob) = watcher.friend_add("bob").expect("ask bob") else {
        panic!("a first FriendAdd only asks");
    };
    // Bob sees the request and accepts with the CLI. Wait until that
    // session is gone, so that the listener's coming online is news to the
    // watcher.
    let out = cli.run("bob", &["friends", "requests"]);
    assert!(
        out.contains(&format!("alice (id {alice}) asks to be your friend"))
            && out.contains("no friend requests from you"),
        "{out}"
    );
    let out = cli.run("bob", &["friends", "add", "alice"]);
    assert!(
        out.contains(&format!("alice (id {alice}) and you are friends")),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match watcher.next_push(left).expect("watcher connection") {
            Some(ServerBody::Presence { user, online: false }) if user == bob => break,
            Some(ServerBody::Presence { .. } | ServerBody::FriendAccepted { .. }) => {}
            other => panic!("watcher got {other:?} before bob's CLI session left"),
        }
    }

    // 1:1.
    let listener = cli.spawn("bob", &["listen", "--count", "1", "--timeout-secs", "20"]);
    wait_online(&mut watcher, bob);
    let out = cli.run("alice", &["send", "--to", "bob", "hello"]);
    assert!(out.contains("sent to bob") && out.contains("seq 1"), "{out}");
    let output = { listener }.output_within(Duration::from_secs(30));
    let heard = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "listen failed: {output:?}");
    assert!(heard.contains("[alice] hello"), "bob heard {heard:?}");

    // `tern listen` acknowledged what it printed, so a new session of
    // Bob's has nothing to catch up on.
    let mut bob_lib = Client::connect(addr, opts()).expect("connect");
    bob_lib.login("bob", PASSWORD).expect("login bob");
    common::expect_no_message(&mut bob_lib);
    drop(bob_lib);

    // What was said stays readable, oldest first, by either side.
    let out = cli.run("bob", &["history", "--to", "alice"]);
    assert_eq!(out, "#1 [alice] hello\n");
    let out = cli.run("bob", &["send", "--to", "alice", "and", "again"]);
    assert!(out.contains("seq 2"), "{out}");
    let out = cli.run("alice", &["history", "--to", "bob"]);
    assert_eq!(out, "#1 [alice] hello\n#2 [bob] and again\n");
    let out = cli.run("alice", &["history", "--to", "bob", "--up-to", "1"]);
    assert_eq!(out, "#1 [alice] hello\n");
    let out = cli.run("bob", &["history", "--to", "alice", "--limit", "1"]);
    assert_eq!(out, "#2 [bob] and again\n");

    // An invite withdrawn before it is used: the join is refused.
    let private = cli.run("alice", &["group", "create", "--invite-only", "private"]);
    let private = private.trim();
    let out = cli.run("alice", &["group", "invite", private, "bob"]);
    assert!(out.contains(&format!("invited bob to group {private}")), "{out}");
    let out = cli.run("alice", &["group", "invites", private]);
    assert!(out.contains(&format!("bob (id {bob}) invited")), "{out}");
    let out = cli.run("bob", &["group", "my-invites"]);
    assert!(out.contains(&format!("invited to group {private}")), "{out}");
    let out = cli.run("alice", &["group", "uninvite", private, "bob"]);
    assert!(
        out.contains(&format!("withdrew any invite of bob to group {private}")),
        "{out}"
    );
    let refused = cli
        .command("bob", &["group", "join", private])
        .output()
        .expect("run tern");
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Forbidden"), "{stderr}");
    let out = cli.run("alice", &["group", "invites", private]);
    assert!(
        out.contains(&format!("no pending invites to group {private}")),
        "{out}"
    );

    // Ownership handed over: alice becomes an admin and may leave.
    let out = cli.run("alice", &["group", "invite", private, "bob"]);
    assert!(out.contains("invited bob"), "{out}");
    cli.run("bob", &["group", "join", private]);
    let out = cli.run("alice", &["group", "transfer", private, "bob"]);
    assert!(out.contains(&format!("bob now owns group {private}")), "{out}");
    let out = cli.run("bob", &["group", "members", private]);
    assert!(out.contains(&format!("bob (id {bob}) owner")), "{out}");
    let out = cli.run("alice", &["group", "leave", private]);
    assert!(out.contains(&format!("left group {private}")), "{out}");

    // A ban, listed and lifted by the new owner.
    let out = cli.run("bob", &["group", "ban", private, "alice"]);
    assert!(
        out.contains(&format!("banned alice from group {private}")),
        "{out}"
    );
    let out = cli.run("bob", &["group", "bans", private]);
    assert!(out.contains("alice (id") && out.contains(") banned"), "{out}");
    let out = cli.run("bob", &["group", "unban", private, "alice"]);
    assert!(out.contains("lifted any ban of alice"), "{out}");
    let out = cli.run("bob", &["group", "bans", private]);
    assert!(
        out.contains(&format!("nobody is banned from group {private}")),
        "{out}"
    );

    // A group round.
    let group = cli.run("alice", &["group", "create", "team"]);
    let group = group.trim();
    group.parse::<u64>().expect("group create prints the id");
    let out = cli.run("bob", &["group", "join", group]);
    assert!(out.contains(&format!("joined group {group}")), "{out}");
    let members = cli.run("bob", &["group", "members", group]);
    assert!(
        members.contains(&format!("alice (id {alice}) owner"))
            || members.contains(&format!("user {alice} owner")),
        "{members}"
    );
    assert!(members.contains(&format!("bob (id {bob}) member")), "{members}");
    let listener = cli.spawn("bob", &["listen", "--count", "1", "--timeout-secs", "20"]);
    wait_online(&mut watcher, bob);
    let out = cli.run("alice", &["send-group", "--group", group, "hi", "team"]);
    assert!(out.contains(&format!("sent to group {group}")), "{out}");
    let output = { listener }.output_within(Duration::from_secs(30));
    let heard = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "listen failed: {output:?}");
    assert!(
        heard.contains(&format!("[#group {group} alice] hi team")),
        "bob heard {heard:?}"
    );
    let out = cli.run("bob", &["history", "--group", group]);
    assert_eq!(out, format!("#1 [#group {group} alice] hi team\n"));
    // The watcher is another session of Alice's: it gets the echo.
    loop {
        match common::expect_push(&mut watcher) {
            ServerBody::Message(msg) if msg.content.body == b"hi team" => {
                assert_eq!(msg.from, alice);
                break;
            }
            // Earlier echoes, and Bob's receipt for "hello".
            ServerBody::Message(_) | ServerBody::Receipt { .. } => {}
            other => panic!("watcher: {other:?}"),
        }
    }

    // A block: bob's messages to alice are refused until she lifts it,
    // and their friendship ends.
    let out = cli.run("alice", &["block", "bob"]);
    assert!(out.contains("blocked bob"), "{out}");
    let out = cli.run("alice", &["blocks"]);
    assert!(
        out.contains(&format!("{bob}")) && out.contains("blocked"),
        "{out}"
    );
    let refused = cli
        .command("bob", &["send", "--to", "alice", "let me in"])
        .output()
        .expect("run tern");
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Forbidden"), "{stderr}");
    let out = cli.run("alice", &["friends", "list"]);
    assert!(!out.contains("bob"), "{out}");
    let out = cli.run("alice", &["unblock", "bob"]);
    assert!(out.contains("unblocked bob"), "{out}");
    let out = cli.run("alice", &["blocks"]);
    assert!(out.contains("you block nobody"), "{out}");
    let out = cli.run("bob", &["send", "--to", "alice", "thanks"]);
    assert!(out.contains("sent to alice"), "{out}");

    // The owner deletes the team group: gone for bob too.
    let out = cli.run("alice", &["group", "delete", group]);
    assert!(out.contains(&format!("deleted group {group}")), "{out}");
    let refused = cli
        .command("bob", &["group", "members", group])
        .output()
        .expect("run tern");
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");

    // Bob logs out everywhere: his open session is closed, its token dead.
    let mut bob_lib = Client::connect(addr, opts()).expect("connect");
    let bob_session = bob_lib.login("bob", PASSWORD).expect("login bob");
    let out = cli.run("bob", &["logout-everywhere"]);
    assert!(out.contains("logged out every session of bob"), "{out}");
    loop {
        match bob_lib.next_push(TIMEOUT) {
            Ok(Some(ServerBody::Presence { .. } | ServerBody::Message(_) | ServerBody::Receipt { .. })) => {}
            Ok(Some(ServerBody::Disconnect { code, .. })) => {
                assert_eq!(code, ErrorCode::AuthFailed);
                break;
            }
            other => panic!("bob's session after logout-everywhere: {other:?}"),
        }
    }
    let mut again = Client::connect(addr, opts()).expect("connect");
    assert!(
        again.login_token(&bob_session.token).is_err(),
        "bob's token still works"
    );

    // SIGTERM: connected clients are told to come back later, and ternd
    // exits 0 promptly.
    kill(pid, libc::SIGTERM);
    loop {
        match watcher.next_push(TIMEOUT) {
            Ok(Some(
                ServerBody::Presence { .. }
                | ServerBody::Message(_)
                | ServerBody::Receipt { .. }
                | ServerBody::GroupDeleted { .. },
            )) => {}
            Ok(Some(ServerBody::Disconnect {
                code, retry_after_ms, ..
            })) => {
                assert_eq!(code, ErrorCode::ShuttingDown);
                assert!(retry_after_ms > 0);
                break;
            }
            other => panic!("watcher after SIGTERM: {other:?}"),
        }
    }
    let status = ternd.wait_timeout(STOP_TIMEOUT);
    drop(ternd); // kills it if it is still running, so its stdout ends
    let logs = log_reader.join().expect("log reader");
    let status =
        status.unwrap_or_else(|| panic!("ternd still running {STOP_TIMEOUT:?} after SIGTERM; log {logs:#?}"));
    assert!(status.success(), "ternd exited with {status}; log {logs:#?}");
}

/// JWT logins configured through `ternd`'s flags (key file, issuer,
/// registration closed) and used from the `tern` CLI (`--jwt`).
#[test]
fn ternd_accepts_jwt_logins_from_the_cli_with_registration_closed() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    let Some(tern) = tern_bin() else {
        eprintln!("SKIPPED: the tern CLI binary is not built and could not be built");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("jwt.secret");
    // As an editor or `echo` writes it: the trailing newline is not part
    // of the secret.
    std::fs::write(&secret_file, "a-shared-secret-of-more-than-32-bytes\n").expect("write secret");
    let ternd = Ternd::start(
        dir.path(),
        &[
            "--jwt-hs256-secret-file",
            secret_file.to_str().expect("utf-8 path"),
            "--jwt-issuer",
            "login.example",
            "--registration",
            "false",
        ],
    );
    let jwt = |sub: &str| {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"sub": sub, "iss": "login.example", "iat": now, "exp": now + 300});
        let key = EncodingKey::from_secret(b"a-shared-secret-of-more-than-32-bytes");
        encode(&Header::new(Algorithm::HS256), &claims, &key).expect("sign")
    };
    let tern = |args: &[&str]| {
        let mut cmd = Command::new(&tern);
        cli_env(&mut cmd)
            .arg("--server")
            .arg(ternd.addr.to_string())
            .args(args)
            .stdin(Stdio::null());
        cmd.output().expect("run tern")
    };

    // Bob's first login creates his account; Alice's message reaches it.
    let mut bob = Client::connect(ternd.addr, opts()).expect("connect");
    let bob_id = bob.login_jwt(&jwt("bob")).expect("bob's JWT login").user;
    let out = tern(&[
        "--jwt",
        &jwt("alice"),
        "send",
        "--to",
        "bob",
        "hello",
        "from",
        "sso",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sent to bob"),
        "{out:?}"
    );
    let message = common::expect_message(&mut bob);
    assert_eq!(message.content.body, b"hello from sso");
    assert_ne!(message.from, bob_id);

    // Registration is closed; a token from another issuer is refused.
    let out = tern(&["--user", "carol", "--password", PASSWORD, "register"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("registration is closed"),
        "{out:?}"
    );
    let forged = {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"sub": "carol", "iss": "elsewhere", "exp": now + 300});
        let key = EncodingKey::from_secret(b"a-shared-secret-of-more-than-32-bytes");
        encode(&Header::new(Algorithm::HS256), &claims, &key).expect("sign")
    };
    let out = tern(&["--jwt", &forged, "friends", "list"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("issuer not accepted"),
        "{out:?}"
    );
    drop(ternd.process);
    let _ = ternd.log_reader.join();
}

/// A JWK Set file (`--jwt-jwks-file`) verifies tokens by key id, and
/// SIGHUP rereads it: the provider's rotated key (saved to the file by the
/// operator's fetch job) logs in without a restart, and the key it dropped
/// no longer does.
#[test]
fn ternd_rereads_its_jwt_key_set_on_sighup() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    const JWKS: &str = include_str!("data/jwt.jwks.json");
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, JWKS).expect("write the key set");
    let ternd = Ternd::start(
        dir.path(),
        &["--jwt-jwks-file", jwks.to_str().expect("utf-8 path")],
    );
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("data/jwt-rs256-private.pem")).expect("RSA key");
    let ec = EncodingKey::from_ec_pem(include_bytes!("data/jwt-es256-private.pem")).expect("P-256 key");
    let jwt = |alg: Algorithm, key: &EncodingKey, kid: &str| {
        let now = jsonwebtoken::get_current_timestamp();
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        let claims = serde_json::json!({"sub": "sso.user", "iat": now, "exp": now + 300});
        encode(&header, &claims, key).expect("sign")
    };
    let login = |token: String| {
        Client::connect(ternd.addr, opts())
            .expect("connect")
            .login_jwt(&token)
    };
    let refusal = |token: String| match login(token) {
        Err(tern_client::ClientError::Server { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let old_key = || jwt(Algorithm::RS256, &rsa, "test-rsa-1");
    let new_key = || jwt(Algorithm::ES256, &ec, "rotated");
    let user = login(old_key()).expect("a login by the set's key").user;
    assert!(refusal(new_key()).contains("kid"), "a kid the set does not have");

    // The provider rotates to a new key (here the P-256 one) under a new kid.
    let set: serde_json::Value = serde_json::from_str(JWKS).expect("the key set");
    let mut rotated = set["keys"][1].clone();
    rotated["kid"] = "rotated".into();
    std::fs::write(&jwks, serde_json::json!({"keys": [rotated]}).to_string()).expect("rotate");
    kill(ternd.process.0.as_ref().expect("running").id(), libc::SIGHUP);
    let session = common::eventually("the rotated key to log in", || login(new_key()).ok());
    assert_eq!(session.user, user, "the same account");
    assert!(refusal(old_key()).contains("kid"), "the dropped key");
    drop(ternd.process);
    let _ = ternd.log_reader.join();
}

/// `tern listen` used to send one `Delivered` receipt per message; ternd
/// meters 1:1 receipts at the message rate (burst 100) on addresses not
/// exempt, so a catch-up of more than about 100 messages got `RateLimited`
/// and listen exited 1 part way through. Loopback is metered here
/// (`limits_exempt = []`), as any client's address would be.
#[test]
fn listen_catches_up_on_more_messages_than_the_receipt_rate_allows() {
    const SENDERS: usize = 3;
    const PER_SENDER: usize = 75; // within one connection's burst of 100
    let Some(tern) = tern_bin() else {
        eprintln!("SKIPPED: the tern CLI binary is not built and could not be built");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ternd.toml");
    // Cheap password hashes: the debug build hashes slowly.
    std::fs::write(
        &config,
        "limits_exempt = []\nargon2_memory_kib = 8\nargon2_iterations = 1\n",
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let ternd = Ternd::start(dir.path(), &["--config", &config]);
    let connect = || Client::connect(ternd.addr, opts()).expect("connect");
    let alice = connect().register("alice", PASSWORD).expect("register alice");
    // One user per sender: a user's next session starts with the message
    // burst their last one left.
    for sender in 0..SENDERS {
        let name = format!("bob{sender}");
        connect().register(&name, PASSWORD).expect("register a sender");
        let mut bob = connect();
        bob.login_unsynced(&name, PASSWORD).expect("login a sender");
        for n in 0..PER_SENDER {
            bob.send_text(alice, &format!("m{sender}-{n}")).expect("send");
        }
    }
    let total = SENDERS * PER_SENDER;
    let cli = Cli {
        bin: tern,
        server: ternd.addr,
    };
    let out = cli.run(
        "alice",
        &["listen", "--count", &total.to_string(), "--timeout-secs", "25"],
    );
    assert_eq!(out.lines().count(), total, "{out}");
    // Everything shown was acknowledged: a fresh session (no cursors) is
    // streamed nothing.
    let mut again = connect();
    again.login_unsynced("alice", PASSWORD).expect("login alice");
    assert_eq!(again.sync().expect("sync"), 0);
}

/// `tern account delete` against the real `ternd`, which is then killed
/// with SIGKILL at once, most likely in the middle of the purge (alice
/// has an inbox of 2,000 messages: two purge steps, after leaving her
/// group). The restarted `ternd` finishes the purge: its gauge reads 0,
/// her group has passed to bob, nothing of her is left in his lists, and
/// carol's history with her is whole.
#[test]
fn an_account_deleted_with_the_cli_is_purged_after_a_sigkill() {
    const MESSAGES: u64 = 2000;
    let Some(tern) = tern_bin() else {
        eprintln!("SKIPPED: the tern CLI binary is not built and could not be built");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ternd.toml");
    // Cheap password hashes (the debug build hashes slowly), and no
    // fsync per message: the store is persisted by the clean stops.
    std::fs::write(
        &config,
        "argon2_memory_kib = 8\nargon2_iterations = 1\ndurability = \"async\"\n",
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let ternd = Ternd::start(dir.path(), &["--config", &config]);
    let connect = |addr| Client::connect(addr, opts()).expect("connect");
    let alice = connect(ternd.addr).register("alice", PASSWORD).expect("register");
    let bob = connect(ternd.addr).register("bob", PASSWORD).expect("register");
    connect(ternd.addr).register("carol", PASSWORD).expect("register");
    let mut a = connect(ternd.addr);
    a.login_unsynced("alice", PASSWORD).expect("login");
    let mut b = connect(ternd.addr);
    b.login_unsynced("bob", PASSWORD).expect("login");
    a.friend_add("bob").expect("ask");
    b.friend_add("alice").expect("accept");
    let group = a.group_create("hers").expect("create");
    b.group_join(group).expect("join");
    let mut c = connect(ternd.addr);
    c.login_unsynced("carol", PASSWORD).expect("login");
    for n in 0..MESSAGES {
        c.send_text(alice, &format!("m{n}")).expect("send");
    }
    drop((a, b, c));

    let cli = Cli {
        bin: tern,
        server: ternd.addr,
    };
    let unconfirmed = cli
        .command("alice", &["account", "delete"])
        .output()
        .expect("run tern");
    assert!(!unconfirmed.status.success());
    assert!(
        String::from_utf8_lossy(&unconfirmed.stderr).contains("add --yes"),
        "{unconfirmed:?}"
    );
    let out = cli.run("alice", &["account", "delete", "--yes"]);
    assert!(out.contains("account alice deleted"), "{out}");
    let Ternd {
        process: mut killed,
        log_reader,
        ..
    } = ternd;
    kill(killed.child().id(), libc::SIGKILL);
    killed.wait_timeout(STOP_TIMEOUT).expect("ternd killed");
    let _ = log_reader.join();

    let ternd = Ternd::start(dir.path(), &["--config", &config]);
    let data = dir.path().join("data");
    let admin = |command: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_ternd"))
            .arg("--data-dir")
            .arg(&data)
            .args(["admin", command])
            .output()
            .expect("ternd admin");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = admin("stats");
        if stats.lines().any(|l| l == "tern_user_purges_running 0") {
            break;
        }
        assert!(Instant::now() < deadline, "the purge did not finish: {stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut fresh = connect(ternd.addr);
    assert_eq!(
        fresh.login("alice", PASSWORD).expect_err("alice is gone").code(),
        Some(ErrorCode::AuthFailed)
    );
    let mut b = connect(ternd.addr);
    b.login_unsynced("bob", PASSWORD).expect("login");
    assert!(b.friends().expect("friends").is_empty());
    let info = b.group_info(group).expect("the group passed to bob");
    assert_eq!(info.members.len(), 1);
    assert_eq!(info.members[0].user, bob);
    let mut c = connect(ternd.addr);
    c.login_unsynced("carol", PASSWORD).expect("login");
    let conv = tern_client::ConvId::direct(alice, c.user().expect("logged in"));
    let newest = c.history(conv, u64::MAX, false, 1).expect("history");
    assert_eq!(newest[0].seq, MESSAGES);
    assert_eq!(c.history(conv, 1, true, 200).expect("history").len(), 200);
    drop((b, c, fresh, ternd));
}

/// `tern listen` is shown messages of a group the user was kicked from,
/// past `max_departures_per_user` (so nothing is owed to them and their
/// `Receipt` for it is refused, though their inbox still streams them):
/// listening goes on and ends well, with a note on stderr, instead of
/// stopping at "cannot acknowledge a message".
#[test]
fn listen_goes_on_when_a_conversation_refuses_its_receipt() {
    let Some(tern) = tern_bin() else {
        eprintln!("SKIPPED: the tern CLI binary is not built and could not be built");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ternd.toml");
    std::fs::write(
        &config,
        "limits_exempt = []\nargon2_memory_kib = 8\nargon2_iterations = 1\nmax_departures_per_user = 1\n",
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let ternd = Ternd::start(dir.path(), &["--config", &config]);
    let connect = || Client::connect(ternd.addr, opts()).expect("connect");
    connect().register("alice", PASSWORD).expect("register alice");
    connect().register("bob", PASSWORD).expect("register bob");
    let mut alice = connect();
    alice.login("alice", PASSWORD).expect("login alice");
    let mut bob = connect();
    bob.login_unsynced("bob", PASSWORD).expect("login bob");
    let bob_id = bob.user().expect("bob's id");
    let (first, second) = (
        alice.group_create("first").expect("create"),
        alice.group_create("second").expect("create"),
    );
    for group in [first, second] {
        bob.group_join(group).expect("join");
        alice.send_group_text(group, "owed").expect("send");
    }
    drop(bob);
    // The first kick is recorded; the second is past the limit.
    alice.group_kick(first, bob_id).expect("kick");
    alice.group_kick(second, bob_id).expect("kick");
    let cli = Cli {
        bin: tern,
        server: ternd.addr,
    };
    let child = cli.spawn("bob", &["listen", "--count", "2", "--timeout-secs", "20"]);
    let output = { child }.output_within(Duration::from_secs(30));
    let heard = String::from_utf8_lossy(&output.stdout);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "listen failed: {output:?}");
    assert_eq!(heard.matches("owed").count(), 2, "{heard}");
    assert!(
        said.contains(&format!("group:{second} no longer takes receipts")),
        "{said}"
    );
}
