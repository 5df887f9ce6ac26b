//! The admin socket against a running in-process server: live stats,
//! counting and kicking a user's sessions across shards, revoking tokens,
//! and refusing what it does not know.

mod common;

use std::time::Duration;

use common::{register_on_shard, TestServer, PASSWORD};
use tern_client::{ClientError, ErrorCode, ServerBody};
use tern_engine::admin::{admin_request, serve_admin};

#[test]
fn sessions_kick_revoke_and_stats() {
    let server = TestServer::start();
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let path = socket_dir.path().join("admin.sock");
    let admin = serve_admin(&path, server.admin_context()).expect("admin socket");

    let mut setup = server.connect();
    // A user homed on each shard: requests reach the right one.
    for shard in 0..server.shards() {
        let user = register_on_shard(&mut setup, &format!("adm{shard}_"), shard, server.shards());
        let mut first = server.connect();
        let session = first.login(&user.name, PASSWORD).expect("login");
        let mut second = server.connect();
        second.login(&user.name, PASSWORD).expect("login");

        let answer = admin_request(admin.path(), &format!("sessions {}", user.name)).expect("sessions");
        assert!(answer.contains(": 2 sessions"), "{answer}");

        let answer = admin_request(admin.path(), &format!("revoke {}", user.name)).expect("revoke");
        assert!(answer.contains("kicked 2 sessions"), "{answer}");
        for client in [&mut first, &mut second] {
            match client.next_push(Duration::from_secs(5)) {
                Ok(Some(ServerBody::Disconnect { code, .. })) => assert_eq!(code, ErrorCode::Forbidden),
                other => panic!("expected a Disconnect, got {other:?}"),
            }
        }
        let refused = server.connect().login_token(&session.token);
        assert!(
            matches!(
                refused,
                Err(ClientError::Server {
                    code: ErrorCode::AuthFailed,
                    ..
                })
            ),
            "a revoked token must not log in: {refused:?}"
        );
        // The password still works.
        server
            .connect()
            .login(&user.name, PASSWORD)
            .expect("password login after revoke");
    }

    let stats = admin_request(admin.path(), "stats").expect("stats");
    assert!(stats.contains("tern_sessions_open{shard=\"0\"}"), "{stats}");
    assert!(stats.contains("tern_connections_open"), "{stats}");

    let unknown = admin_request(admin.path(), "sessions nobody_at_all").expect("answer");
    assert!(unknown.starts_with("error:"), "{unknown}");
    let bogus = admin_request(admin.path(), "format-disk").expect("answer");
    assert!(bogus.starts_with("error: unknown command"), "{bogus}");

    drop(admin);
    assert!(!path.exists(), "the socket file is removed on drop");
}

#[test]
fn stopping_does_not_hang_or_remove_a_socket_file_that_is_not_ours() {
    let server = TestServer::start();
    let socket_dir = tempfile::tempdir().unwrap();
    let path = socket_dir.path().join("admin.sock");
    let admin = serve_admin(&path, server.admin_context()).expect("admin socket");
    // Someone removes the file and another listener takes the path: the
    // first server can no longer be woken through it.
    std::fs::remove_file(&path).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let started = std::time::Instant::now();
    drop(admin);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        started.elapsed()
    );
    assert!(path.exists(), "the other listener's socket file is left alone");
    drop(other);
}

/// `revoke` while the user's token logs in again and again from several
/// threads: once it has answered, and the logins under way have settled,
/// no session of the user is left, and the token opens none.
#[test]
fn a_revoke_leaves_no_session_that_was_logging_in_meanwhile() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let server = TestServer::start();
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let admin = serve_admin(&socket_dir.path().join("admin.sock"), server.admin_context()).expect("admin");
    let mut setup = server.connect();
    let user = register_on_shard(&mut setup, "racer", 1, server.shards());
    let token = server.connect().login(&user.name, PASSWORD).expect("login").token;
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.addr();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, token) = (stop.clone(), token.clone());
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut client = common::connect(addr);
                    if client.login_token(&token).is_ok() {
                        kept.push(client); // held open: the revoke must end it
                    }
                }
                kept
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let answer = admin_request(admin.path(), &format!("revoke {}", user.name)).expect("revoke");
    assert!(answer.contains("revoked"), "{answer}");
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let kept: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    assert!(!kept.is_empty(), "no login got in before the revoke");
    common::eventually("every session of the user to be gone", || {
        let answer = admin_request(admin.path(), &format!("sessions {}", user.name)).expect("sessions");
        answer.contains(": 0 sessions").then_some(())
    });
    assert!(server.connect().login_token(&token).is_err());
}
