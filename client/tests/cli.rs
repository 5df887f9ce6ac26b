//! The `tern` binary against a scripted fake server: argument handling,
//! output lines and exit codes.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};

use common::{fake_server, message, Peer};
use tern_client::{
    ChatMessage, ClientBody, Content, ConvId, ErrorCode, Friend, ReceiptKind, ServerBody, ServerFrame,
};

fn tern(addr: SocketAddr, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "--server",
            &addr.to_string(),
            "--user",
            "alice",
            "--password",
            "password1",
        ])
        .args(args)
        .env_remove("TERN_SERVER")
        .env_remove("TERN_JWT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Handshake and password login as alice (id 1).
fn login(peer: &mut Peer) {
    assert!(peer.hello(64 * 1024).starts_with("tern-cli/"));
    let f = peer.recv();
    assert_eq!(
        f.body,
        ClientBody::Login {
            username: "alice".into(),
            password: b"password1".to_vec()
        }
    );
    let answer = ServerBody::LoggedIn {
        user: 1,
        username: "alice".into(),
        token: vec![0; 32],
    };
    peer.send(f.request_id, answer);
    let f = peer.recv();
    assert!(
        matches!(f.body, ClientBody::Sync { .. }),
        "expected Sync, got {:?}",
        f.body
    );
    peer.send(f.request_id, ServerBody::SyncDone { messages: 0 });
}

fn answer_receipt(peer: &mut Peer, conv: ConvId, seq: u64) {
    let f = peer.recv();
    assert_eq!(
        f.body,
        ClientBody::Receipt {
            conv,
            kind: ReceiptKind::Delivered,
            seq
        }
    );
    peer.send(f.request_id, ServerBody::Ok);
}

fn answer_friends(peer: &mut Peer) {
    let f = peer.recv();
    assert_eq!(f.body, ClientBody::FriendList);
    let friends = vec![Friend {
        user: 5,
        username: "bob".into(),
        online: false,
    }];
    peer.send(f.request_id, ServerBody::Friends { friends });
}

#[test]
fn send_prints_the_conversation_and_seq() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        let f = peer.recv();
        assert_eq!(
            f.body,
            ClientBody::ResolveUser {
                username: "bob".into()
            }
        );
        peer.send(
            f.request_id,
            ServerBody::User {
                user: 5,
                username: "bob".into(),
            },
        );
        let f = peer.recv();
        let ClientBody::SendDirect {
            to,
            client_msg_id,
            content,
        } = f.body
        else {
            panic!("{:?}", f.body)
        };
        assert_eq!((to, content), (5, Content::text("hello there")));
        let sent = ServerBody::Sent {
            client_msg_id,
            conv: ConvId::direct(1, 5),
            seq: 4,
            timestamp_ms: 1,
        };
        peer.send(f.request_id, sent);
        peer.wait_closed();
    });
    let out = tern(addr, &["send", "--to", "bob", "hello", "there"], "");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "sent to bob: conv direct:1:5 seq 4\n");
    server.join().unwrap();
}

#[test]
fn listen_prints_pushes_and_stops_after_count() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        answer_friends(&mut peer);
        peer.push(ServerBody::Presence {
            user: 5,
            online: true,
        });
        peer.push(message(5, "hello there"));
        peer.push(ServerBody::Message(ChatMessage {
            conv: ConvId::Group { group: 3 },
            seq: 1,
            from: 6,
            client_msg_id: 1,
            timestamp_ms: 1,
            content: Content::text("hi\x1b[2J"),
        }));
        // Each shown message is acknowledged, so the next login skips it.
        answer_receipt(&mut peer, ConvId::direct(1, 5), 7);
        // User 6 is no friend: the CLI refreshes the friend list once to look for a name.
        answer_friends(&mut peer);
        answer_receipt(&mut peer, ConvId::Group { group: 3 }, 1);
        peer.wait_closed();
    });
    let out = tern(addr, &["listen", "--count", "2", "--timeout-secs", "10"], "");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "* bob is online\n[bob] hello there\n[#group 3 user 6] hi\\u{1b}[2J\n"
    );
    server.join().unwrap();
}

#[test]
fn listen_fails_when_count_is_not_reached_in_time() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        answer_friends(&mut peer);
        peer.wait_closed();
    });
    let out = tern(addr, &["listen", "--count", "1", "--timeout-secs", "1"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0 of 1 messages"),
        "{out:?}"
    );
    server.join().unwrap();
}

#[test]
fn listen_with_a_timeout_too_large_for_a_deadline_waits_without_one() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        answer_friends(&mut peer);
        peer.push(message(5, "hello"));
        answer_receipt(&mut peer, ConvId::direct(1, 5), 7);
        peer.wait_closed();
    });
    // Accepted by clap as a u64, too large for an Instant: it used to panic (exit 101).
    let out = tern(
        addr,
        &["listen", "--count", "1", "--timeout-secs", &u64::MAX.to_string()],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "[bob] hello\n");
    server.join().unwrap();
}

#[test]
fn chat_sends_lines_and_quits() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        answer_friends(&mut peer);
        // bob is known from the friend list, so /msg needs no lookup.
        for text in ["hey", "again"] {
            let f = peer.recv();
            let ClientBody::SendDirect {
                to,
                client_msg_id,
                content,
            } = f.body
            else {
                panic!("{:?}", f.body)
            };
            assert_eq!((to, content), (5, Content::text(text)));
            let sent = ServerBody::Sent {
                client_msg_id,
                conv: ConvId::direct(1, 5),
                seq: 1,
                timestamp_ms: 1,
            };
            peer.send(f.request_id, sent);
        }
        let f = peer.recv();
        assert_eq!(f.body, ClientBody::GroupJoin { group: 9 });
        peer.send(
            f.request_id,
            ServerFrame::error(0, ErrorCode::NotFound, "no such group").body,
        );
        peer.wait_closed();
    });
    let out = tern(addr, &["chat"], "/msg bob hey\nagain\n/bogus\n/join 9\n/quit\n");
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown command /bogus"), "{stderr}");
    assert!(stderr.contains("NotFound: no such group"), "{stderr}");
    server.join().unwrap();
}

#[test]
fn refused_login_exits_1_with_the_reason() {
    let (addr, server) = fake_server(|mut peer| {
        peer.hello(64 * 1024);
        let f = peer.recv();
        peer.send(
            f.request_id,
            ServerFrame::error(0, ErrorCode::AuthFailed, "wrong password").body,
        );
        peer.wait_closed();
    });
    let out = tern(addr, &["friends", "list"], "");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot log in as alice") && stderr.contains("AuthFailed"),
        "{stderr}"
    );
    server.join().unwrap();
}

#[test]
fn missing_user_is_reported_before_connecting() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--server", "127.0.0.1:1", "send", "--to", "bob", "hi"])
        .env_remove("TERN_USER")
        .env_remove("TERN_PASSWORD")
        .env_remove("TERN_JWT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--user is required"));
}

#[test]
fn a_jwt_cannot_register_or_change_a_password() {
    for command in [&["register"][..], &["passwd", "--new-password", "password2"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["--server", "127.0.0.1:1", "--jwt", "a.b.c"])
            .args(command)
            .env_remove("TERN_USER")
            .env_remove("TERN_PASSWORD")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("needs --user and --password, not --jwt"),
            "{stderr}"
        );
    }
}
