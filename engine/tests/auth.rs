//! Accounts and sessions: register, log in by password and by token, the
//! errors for bad credentials and for requests made in the wrong state, and
//! the per-user session limit.

mod common;

use common::*;
use tern_client::{ClientError, ErrorCode};

#[test]
fn register_login_and_login_by_token() {
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("acct{shard}_"), shard);
        let mut client = server.connect();
        let session = client.login(&user.name, PASSWORD).expect("password login");
        assert_eq!(session.user, user.id);
        assert_eq!(session.username, user.name);
        assert_eq!(session.token.len(), tern_proto::limits::TOKEN_LEN);
        assert_eq!(client.user(), Some(user.id));
        // The session works after the move to the home shard.
        client.ping().expect("ping after login");
        assert_eq!(client.resolve_user(&user.name).expect("resolve self"), user.id);

        let mut again = server.connect();
        let by_token = again.login_token(&session.token).expect("token login");
        assert_eq!(by_token.user, user.id);
        assert_eq!(by_token.username, user.name);
        again.ping().expect("ping after token login");

        // Each login issues a new token; both stay valid.
        let mut third = server.connect();
        let other = third.login(&user.name, PASSWORD).expect("second password login");
        assert_ne!(other.token, session.token);
        let mut fourth = server.connect();
        assert_eq!(
            fourth.login_token(&other.token).expect("second token").user,
            user.id
        );
    }
}

#[test]
fn bad_credentials_are_refused_and_the_connection_stays_usable() {
    let server = TestServer::start();
    let mut client = server.connect();
    let alice = client.register("alice", PASSWORD).expect("register");
    assert_eq!(
        code_of(client.login("alice", "wrong password")),
        ErrorCode::AuthFailed
    );
    assert_eq!(code_of(client.login("nobody", PASSWORD)), ErrorCode::AuthFailed);
    assert_eq!(code_of(client.login_token(&[7u8; 32])), ErrorCode::AuthFailed);
    // A token of the wrong length is refused before the store is asked.
    assert_eq!(code_of(client.login_token(&[7u8; 5])), ErrorCode::InvalidArgument);
    // Refusals leave the connection open and anonymous: a correct login works.
    let session = client.login("alice", PASSWORD).expect("login after failures");
    assert_eq!(session.user, alice);
}

#[test]
fn duplicate_username_is_refused() {
    let server = TestServer::start();
    let mut client = server.connect();
    let first = client.register("carol", PASSWORD).expect("register");
    assert_eq!(
        code_of(client.register("carol", "another password")),
        ErrorCode::UsernameTaken
    );
    // Also from another connection.
    let mut other = server.connect();
    assert_eq!(
        code_of(other.register("carol", PASSWORD)),
        ErrorCode::UsernameTaken
    );
    // The original account is intact.
    assert_eq!(other.login("carol", PASSWORD).expect("login").user, first);
    // Distinct names get distinct ids.
    let second = client.register("carol2", PASSWORD).expect("register carol2");
    assert_ne!(first, second);
}

#[test]
fn requests_before_login_are_invalid_state() {
    let server = TestServer::start();
    let mut client = server.connect();
    client.register("dave", PASSWORD).expect("register");
    assert_eq!(code_of(client.friends()), ErrorCode::InvalidState);
    assert_eq!(code_of(client.resolve_user("dave")), ErrorCode::InvalidState);
    assert_eq!(code_of(client.send_text(1, "hi")), ErrorCode::InvalidState);
    assert_eq!(code_of(client.group_create("g")), ErrorCode::InvalidState);
    assert_eq!(code_of(client.group_join(1)), ErrorCode::InvalidState);
    assert_eq!(code_of(client.friend_add("dave")), ErrorCode::InvalidState);
    // Ping is allowed anonymously, and the connection is still usable.
    client.ping().expect("anonymous ping");
    client.login("dave", PASSWORD).expect("login");
    // Once logged in, logging in or registering again is InvalidState.
    assert_eq!(
        code_of(client.register("dave2", PASSWORD)),
        ErrorCode::InvalidState
    );
    assert_eq!(code_of(client.login("dave", PASSWORD)), ErrorCode::InvalidState);
    client.ping().expect("still usable");
}

#[test]
fn third_session_is_limit_exceeded() {
    let server = TestServer::start_with(|c| c.max_sessions_per_user = 2);
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("multi{shard}_"), shard);
        let first = server.login(&user);
        let mut second = server.login(&user);
        let mut third = server.connect();
        match third.login(&user.name, PASSWORD) {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::LimitExceeded),
            other => panic!("third session: {other:?}"),
        }
        // The refused connection is closed.
        assert!(third.ping().is_err(), "refused connection still open");
        // The first two sessions are unaffected.
        second.ping().expect("second session alive");
        // Once a session ends, a new one is allowed (removal is asynchronous).
        drop(first);
        eventually("a free session slot", || {
            let mut next = server.connect();
            next.login(&user.name, PASSWORD).ok().map(|_| next)
        });
    }
}

/// A client may send `Hello` and its login in one write (protocol.md
/// 2.1), and each request gets exactly one answer. When the connection
/// was accepted on the user's home shard and the login was refused there
/// (here: past the session limit), the `HelloOk` held back to go out with
/// the login's answer was dropped, and only the login's error was sent.
#[test]
fn a_pipelined_hello_is_answered_when_the_login_behind_it_is_refused() {
    use rkyv::util::AlignedVec;
    use tern_client::{ClientBody, ClientFrame, ServerBody};
    let server = TestServer::start_with(|c| c.max_sessions_per_user = 1);
    let user = server.user_on_shard("piped_", 0);
    let _held = server.login(&user);
    // Which shard accepts a connection is the kernel's choice: enough
    // attempts that some land on the user's home shard.
    for _ in 0..8 * server.shards() {
        let mut raw = RawConn::connect(server.addr());
        let mut out = AlignedVec::new();
        let hello = ClientBody::Hello {
            version: tern_proto::PROTOCOL_VERSION,
            client_name: "pipelined".into(),
        };
        let login = ClientBody::Login {
            username: user.name.clone(),
            password: PASSWORD.as_bytes().to_vec(),
        };
        for (request_id, body) in [(1, hello), (2, login)] {
            tern_proto::encode_client(&ClientFrame { request_id, body }, &mut out, 1 << 16).expect("encode");
        }
        raw.send_raw(&out).expect("write");
        let frames = raw.expect_closed();
        let answers: Vec<_> = frames.iter().map(|f| (f.request_id, &f.body)).collect();
        assert!(
            matches!(
                answers[..],
                [
                    (1, ServerBody::HelloOk { .. }),
                    (
                        2,
                        ServerBody::Error {
                            code: ErrorCode::LimitExceeded,
                            ..
                        }
                    )
                ]
            ),
            "{frames:?}"
        );
    }
}

/// A device that reconnects with its saved token while its old connection
/// still counts (dead on the network it left, waiting out the idle
/// timeout) is let in at the session limit: its old session is replaced,
/// told why and closed. Logins that issue a token are still refused there,
/// and other devices' sessions are untouched (protocol.md 2.7, "Sessions
/// per user").
#[test]
fn a_device_resuming_with_its_token_at_the_session_limit_replaces_its_old_session() {
    let server = TestServer::start_with(|c| c.max_sessions_per_user = 2);
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("resume{shard}_"), shard);
        let mut phone = server.connect();
        let phone_token = phone.login(&user.name, PASSWORD).expect("login").token;
        let mut laptop = server.connect();
        laptop.login(&user.name, PASSWORD).expect("login");
        assert_eq!(
            code_of(server.connect().login(&user.name, PASSWORD)),
            ErrorCode::LimitExceeded,
            "a third device"
        );
        let mut phone_again = server.connect();
        phone_again
            .login_token(&phone_token)
            .expect("the phone resumes at the limit");
        match expect_push(&mut phone) {
            tern_client::ServerBody::Disconnect {
                code: ErrorCode::LimitExceeded,
                ..
            } => {}
            other => panic!("the replaced session got {other:?}"),
        }
        eventually("the replaced connection to close", || {
            phone.ping().is_err().then_some(())
        });
        laptop.ping().expect("the other device's session is untouched");
        phone_again.ping().expect("the resumed session works");
        // The same token again replaces the session that holds it now.
        let mut phone_third = server.connect();
        phone_third.login_token(&phone_token).expect("resumes again");
        eventually("the second replaced connection to close", || {
            phone_again.ping().is_err().then_some(())
        });
        laptop.ping().expect("still untouched");
        assert_eq!(
            code_of(server.connect().login(&user.name, PASSWORD)),
            ErrorCode::LimitExceeded,
            "still at the limit"
        );
    }
    let replaced: u64 = (0..server.shards())
        .map(|shard| {
            server
                .metrics
                .shard(shard)
                .sessions_replaced
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(replaced, 2 * server.shards() as u64);
}

/// `LogoutOthers` gives the session a new token; the device resumes with
/// that one at the limit too.
#[test]
fn a_token_reissued_by_logout_others_resumes_at_the_session_limit() {
    let server = TestServer::start_with(|c| c.max_sessions_per_user = 1);
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("reissued{shard}_"), shard);
        let mut phone = server.connect();
        phone.login(&user.name, PASSWORD).expect("login");
        let reissued = phone.logout_others().expect("logout others").token;
        let mut phone_again = server.connect();
        phone_again
            .login_token(&reissued)
            .expect("the reissued token resumes at the limit");
        eventually("the replaced connection to close", || {
            phone.ping().is_err().then_some(())
        });
    }
}

/// A login refused for the session limit is told so only after its token
/// was issued: that token is revoked, so refused logins neither leave live
/// tokens nobody holds nor push a device's saved token out of the user's
/// most live tokens (protocol.md 2.7, "Sessions per user").
#[test]
fn a_login_refused_for_too_many_sessions_keeps_the_devices_token() {
    let server = TestServer::start_with(|c| {
        c.max_sessions_per_user = 1;
        c.store.max_tokens_per_user = 2;
    });
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("tokens{shard}_"), shard);
        let mut device = server.connect();
        let saved = device.login(&user.name, PASSWORD).expect("login").token;
        for _ in 0..3 {
            let mut extra = server.connect();
            assert_eq!(
                code_of(extra.login(&user.name, PASSWORD)),
                ErrorCode::LimitExceeded
            );
        }
        drop(device);
        // The device reconnects with its saved token once its session is
        // gone (removal is asynchronous).
        let resumed = eventually("the device's session slot to free up", || {
            match server.connect().login_token(&saved) {
                Err(e) if e.code() == Some(ErrorCode::LimitExceeded) => None,
                other => Some(other.map(|_| ())),
            }
        });
        assert!(
            resumed.is_ok(),
            "refused logins evicted the device's token: {resumed:?}"
        );
    }
}

/// Asserts that `token` no longer logs in.
fn assert_token_refused(server: &TestServer, token: &[u8], why: &str) {
    let refused = server.connect().login_token(token);
    assert!(
        matches!(
            refused,
            Err(ClientError::Server {
                code: ErrorCode::AuthFailed,
                ..
            })
        ),
        "{why}: {refused:?}"
    );
}

#[test]
fn tokens_that_logged_in_before_are_refused_after_logout_and_password_change() {
    // A token that logged in once is answered from memory afterwards;
    // revoking it must reach that memory too.
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("tokc{shard}_"), shard);
        let first = server
            .connect()
            .login(&user.name, PASSWORD)
            .expect("password login");
        for _ in 0..3 {
            let again = server.connect().login_token(&first.token).expect("token login");
            assert_eq!((again.user, again.username), (user.id, user.name.clone()));
        }
        let mut by_token = server.connect();
        by_token.login_token(&first.token).expect("token login");
        by_token.logout().expect("logout");
        assert_token_refused(&server, &first.token, "a logged-out token");

        let second = server
            .connect()
            .login(&user.name, PASSWORD)
            .expect("password login");
        let mut session = server.connect();
        session.login_token(&second.token).expect("token login");
        session
            .change_password(PASSWORD, "a-new-password")
            .expect("change password");
        assert_token_refused(&server, &second.token, "a token from before a password change");
        let third = server
            .connect()
            .login(&user.name, "a-new-password")
            .expect("login with the new password");
        server
            .connect()
            .login_token(&third.token)
            .expect("a new token logs in");
    }
}

/// Asserts that `client` gets `Disconnect { AuthFailed }` (after any
/// messages and presence changes pushed before it) and is closed.
fn assert_logged_out_elsewhere(client: &mut tern_client::Client, why: &str) {
    use tern_client::ServerBody;
    loop {
        match client.next_push(std::time::Duration::from_secs(5)) {
            Ok(Some(ServerBody::Message(_) | ServerBody::Presence { .. })) => continue,
            Ok(Some(ServerBody::Disconnect { code, message, .. })) => {
                assert_eq!(code, ErrorCode::AuthFailed, "{why}: {message}");
                break;
            }
            other => panic!("{why}: expected a Disconnect, got {other:?}"),
        }
    }
    assert!(client.ping().is_err(), "{why}: still open");
}

#[test]
fn logout_others_ends_the_other_sessions_and_keeps_this_one() {
    let server = TestServer::start_with(|config| {
        config.max_sessions_per_user = 5;
        // Loopback is exempt from the limits by default; the interval
        // between two LogoutOthers is one of them.
        config.limits.limits_exempt.clear();
        config.limits.registration_rate_per_ip_per_hour = 0;
    });
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("lo{shard}_"), shard);
        let peer = server.user_on_shard(&format!("lp{shard}_"), (shard + 1) % server.shards());
        let mut mine = server.connect();
        let my_session = mine.login(&user.name, PASSWORD).expect("login");
        let mut by_password = server.connect();
        let other = by_password.login(&user.name, PASSWORD).expect("login");
        let mut by_token = server.connect();
        by_token.login_token(&other.token).expect("token login");
        // A copy of this session's own token, in use elsewhere.
        let mut copy = server.connect();
        copy.login_token(&my_session.token).expect("token login");
        // A token with no session open.
        let unused = server.connect().login(&user.name, PASSWORD).expect("login").token;

        let renewed = mine.logout_others().expect("logout others");
        assert_eq!((renewed.user, &renewed.username), (user.id, &user.name));
        assert_ne!(renewed.token, my_session.token);
        assert_logged_out_elsewhere(&mut by_password, "a password session");
        assert_logged_out_elsewhere(&mut by_token, "a token session");
        assert_logged_out_elsewhere(&mut copy, "a session with this session's token");
        assert_token_refused(&server, &other.token, "another device's token");
        assert_token_refused(&server, &unused, "a token of no open session");
        assert_token_refused(&server, &my_session.token, "this session's old token");

        // This session goes on: it is answered, and messages reach it.
        mine.ping().expect("this session stays");
        let mut sender = server.login(&peer);
        let sent = sender.send_text(user.id, "still here?").expect("send");
        let got = expect_message(&mut mine);
        assert_eq!((got.seq, got.from), (sent.seq, peer.id));
        // Its new token logs in, and a password login starts afresh.
        let mut resumed = server.connect();
        assert_eq!(
            resumed.login_token(&renewed.token).expect("token login").user,
            user.id
        );
        server
            .connect()
            .login(&user.name, PASSWORD)
            .expect("password login");
        // Asking again at once is metered, also from a new connection.
        assert_eq!(code_of(mine.logout_others()), ErrorCode::RateLimited);
        assert_eq!(code_of(resumed.logout_others()), ErrorCode::RateLimited);
        mine.ping().expect("this session stays");
        // A Logout after it revokes the new token: nothing of the user's is left.
        mine.logout().expect("logout");
        assert_token_refused(&server, &renewed.token, "the renewed token after Logout");
    }
}

#[test]
fn a_session_logged_out_by_another_device_cannot_log_that_device_out() {
    let server = TestServer::start();
    let user = server.user_on_shard("duel_", 0);
    for round in 0..10 {
        let mut a = server.connect();
        a.login_unsynced(&user.name, PASSWORD).expect("login");
        let mut b = server.connect();
        b.login_unsynced(&user.name, PASSWORD).expect("login");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let outcomes: Vec<_> = [a, b]
            .into_iter()
            .map(|mut client| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    client.logout_others().map(|session| (session, client))
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let mut winners: Vec<_> = outcomes.into_iter().filter_map(Result::ok).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one device wins");
        let (session, mut winner) = winners.pop().expect("a winner");
        // Once both have their answer, nothing ends the winner or a new login.
        let mut fresh = server.connect();
        fresh.login_unsynced(&user.name, PASSWORD).expect("login");
        std::thread::sleep(std::time::Duration::from_millis(50));
        fresh.ping().expect("a later login stays");
        winner.ping().expect("the winner stays");
        server
            .connect()
            .login_token(&session.token)
            .expect("the winner's token works");
    }
}

#[test]
fn password_changes_are_metered_per_user_before_any_hashing() {
    let server = TestServer::start_with(|config| {
        config.limits.limits_exempt.clear();
        config.limits.registration_rate_per_ip_per_hour = 0;
    });
    let user = server.user_on_shard("pwrate_", 0);
    let mut first = server.connect();
    first.login(&user.name, PASSWORD).expect("login");
    first
        .change_password(PASSWORD, "second-password")
        .expect("change");
    // Again at once, from this session or another: refused, even with the
    // right password, and the password stays the second one.
    assert_eq!(
        code_of(first.change_password("second-password", "third-password")),
        ErrorCode::RateLimited
    );
    let mut other = server.connect();
    other.login(&user.name, "second-password").expect("login");
    assert_eq!(
        code_of(other.change_password("second-password", "third-password")),
        ErrorCode::RateLimited
    );
    // Logging the other devices out has a clock of its own: the documented
    // way to lock someone out (change the password, log in, log out the
    // others) does not wait.
    other.logout_others().expect("logout others right after");
    server
        .connect()
        .login(&user.name, "second-password")
        .expect("login");
}

#[test]
fn logout_others_reaches_parked_sessions() {
    let park_after = std::time::Duration::from_millis(150);
    let server = TestServer::start_with(|config| config.park_after = park_after);
    let user = server.user_on_shard("lopark_", 0);
    let mut mine = server.connect();
    mine.login(&user.name, PASSWORD).expect("login");
    let mut idle = server.connect();
    let idle_session = idle.login(&user.name, PASSWORD).expect("login");
    // Both sessions park; this one's request wakes it, the other's kill
    // must reach it where it waits.
    std::thread::sleep(park_after * 4);
    mine.logout_others().expect("logout others");
    assert_logged_out_elsewhere(&mut idle, "a parked session");
    assert_token_refused(&server, &idle_session.token, "the parked session's token");
    mine.ping().expect("this session stays");
}

#[test]
fn tokens_that_logged_in_before_still_expire() {
    let ttl = std::time::Duration::from_millis(400);
    let server = TestServer::start_with(|config| config.store.token_ttl = ttl);
    let user = server.user_on_shard("tokx_", 0);
    let session = server
        .connect()
        .login(&user.name, PASSWORD)
        .expect("password login");
    server.connect().login_token(&session.token).expect("token login");
    server
        .connect()
        .login_token(&session.token)
        .expect("token login again");
    std::thread::sleep(ttl * 2);
    assert_token_refused(&server, &session.token, "an expired token");
}

#[test]
fn hello_login_token_and_sync_in_one_write_are_answered_in_order() {
    use tern_proto::{encode_client, ClientBody, ClientFrame, ServerBody};

    let server = TestServer::start();
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("pipe{shard}_"), shard);
        let session = server
            .connect()
            .login(&user.name, PASSWORD)
            .expect("password login");
        let mut raw = RawConn::connect(server.addr());
        let mut out = rkyv::util::AlignedVec::new();
        let bodies = [
            ClientBody::Hello {
                version: tern_proto::PROTOCOL_VERSION,
                client_name: "pipelined".into(),
            },
            ClientBody::LoginToken {
                token: session.token.clone(),
            },
            ClientBody::Sync { cursors: Vec::new() },
        ];
        for (request_id, body) in (1..).zip(bodies) {
            encode_client(&ClientFrame { request_id, body }, &mut out, 1 << 20).expect("encode");
        }
        raw.send_raw(&out).expect("write");
        let mut answers = Vec::new();
        while answers.len() < 3 {
            let frame = raw.expect_frame();
            if frame.request_id != 0 {
                answers.push(frame);
            }
        }
        assert!(
            matches!(answers[0].body, ServerBody::HelloOk { .. }),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[1].body, ServerBody::LoggedIn { user: id, .. } if *id == user.id),
            "{answers:?}"
        );
        assert!(
            matches!(answers[2].body, ServerBody::SyncDone { .. }),
            "{answers:?}"
        );
        assert_eq!(
            answers.iter().map(|a| a.request_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }
}

#[test]
fn a_pipelined_login_that_is_refused_refuses_what_follows_it() {
    use tern_proto::{encode_client, ClientBody, ClientFrame, ServerBody};

    let server = TestServer::start();
    let mut raw = RawConn::connect(server.addr());
    let mut out = rkyv::util::AlignedVec::new();
    let bodies = [
        ClientBody::Hello {
            version: tern_proto::PROTOCOL_VERSION,
            client_name: "pipelined".into(),
        },
        ClientBody::LoginToken { token: vec![9; 32] },
        ClientBody::Sync { cursors: Vec::new() },
        ClientBody::Ping { nonce: 7 },
    ];
    for (request_id, body) in (1..).zip(bodies) {
        encode_client(&ClientFrame { request_id, body }, &mut out, 1 << 20).expect("encode");
    }
    raw.send_raw(&out).expect("write");
    let answers: Vec<_> = (0..4).map(|_| raw.expect_frame()).collect();
    assert!(
        matches!(answers[0].body, ServerBody::HelloOk { .. }),
        "{answers:?}"
    );
    assert!(
        matches!(
            answers[1].body,
            ServerBody::Error {
                code: ErrorCode::AuthFailed,
                ..
            }
        ),
        "{answers:?}"
    );
    assert!(
        matches!(
            answers[2].body,
            ServerBody::Error {
                code: ErrorCode::InvalidState,
                ..
            }
        ),
        "{answers:?}"
    );
    assert!(
        matches!(answers[3].body, ServerBody::Pong { nonce: 7 }),
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().map(|a| a.request_id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}
