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
}

/// [`login`], then the catch-up `listen` and `chat` start with (empty).
/// Other commands send no `Sync`: the next frame those tests expect is
/// their request.
fn login_and_sync(peer: &mut Peer) {
    login(peer);
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

/// Answers friend lists and `Delivered` receipts until the client hangs
/// up; returns the receipts in order. With `refuse`, the receipts it
/// names (by position, from 0) are refused as rate-limited for 5 ms.
fn answer_until_closed(peer: &mut Peer, refuse: Option<&[usize]>) -> Vec<(ConvId, u64)> {
    let mut receipts = Vec::new();
    let mut asked = 0;
    while let Some(f) = peer.try_recv() {
        match f.body {
            ClientBody::FriendsPage { after: 0, .. } => {
                let friends = vec![Friend {
                    user: 5,
                    username: "bob".into(),
                    online: false,
                }];
                peer.send(f.request_id, ServerBody::FriendsPage { friends, more: false });
            }
            ClientBody::Receipt { conv, kind, seq } => {
                assert_eq!(kind, ReceiptKind::Delivered);
                let nth = asked;
                asked += 1;
                if refuse.is_some_and(|r| r.contains(&nth)) {
                    // As ternd refuses a receipt over the message rate.
                    let mut error =
                        ServerFrame::error(0, ErrorCode::RateLimited, "too many requests; retry after 5 ms")
                            .body;
                    if let ServerBody::Error { retry_after_ms, .. } = &mut error {
                        *retry_after_ms = 5;
                    }
                    peer.send(f.request_id, error);
                } else {
                    receipts.push((conv, seq));
                    peer.send(f.request_id, ServerBody::Ok);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    receipts
}

fn answer_friends(peer: &mut Peer) {
    let f = peer.recv();
    assert!(
        matches!(f.body, ClientBody::FriendsPage { after: 0, .. }),
        "expected FriendsPage, got {:?}",
        f.body
    );
    let friends = vec![Friend {
        user: 5,
        username: "bob".into(),
        online: false,
    }];
    peer.send(f.request_id, ServerBody::FriendsPage { friends, more: false });
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

/// A send that gets no answer in time may have been stored: the CLI sends
/// it again with the same message id (which the server answers with the
/// original `Sent`), instead of failing with "timed out" and leaving the
/// user to type it again as a new message the peer would get twice.
#[test]
fn a_send_without_an_answer_in_time_is_resent_with_the_same_id() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        let f = peer.recv();
        assert!(matches!(f.body, ClientBody::ResolveUser { .. }), "{:?}", f.body);
        let bob = ServerBody::User {
            user: 5,
            username: "bob".into(),
        };
        peer.send(f.request_id, bob);
        let first = peer.recv();
        let ClientBody::SendDirect { client_msg_id, .. } = first.body else {
            panic!("{:?}", first.body)
        };
        // No answer to the first: the CLI times out and resends.
        let again = peer.recv();
        match again.body {
            ClientBody::SendDirect {
                client_msg_id: resent,
                ..
            } => assert_eq!(resent, client_msg_id, "a resend keeps the id"),
            other => panic!("{other:?}"),
        }
        let sent = ServerBody::Sent {
            client_msg_id,
            conv: ConvId::direct(1, 5),
            seq: 4,
            timestamp_ms: 1,
        };
        peer.send(again.request_id, sent);
        peer.wait_closed();
    });
    let out = tern(
        addr,
        &["--request-timeout", "0.3", "send", "--to", "bob", "hi"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "sent to bob: conv direct:1:5 seq 4\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sending again"),
        "{out:?}"
    );
    server.join().unwrap();
}

#[test]
fn listen_prints_pushes_and_stops_after_count() {
    let (addr, server) = fake_server(|mut peer| {
        login_and_sync(&mut peer);
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
        // User 6 is no friend: the CLI refreshes the friend list once to
        // look for a name. Each shown message is acknowledged, so the next
        // login skips it; when depends on how the pushes arrive.
        let mut receipts = answer_until_closed(&mut peer, None);
        receipts.sort_by_key(|(conv, _)| matches!(conv, ConvId::Group { .. }));
        assert_eq!(
            receipts,
            [(ConvId::direct(1, 5), 7), (ConvId::Group { group: 3 }, 1)]
        );
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
fn listen_prints_friend_requests_and_acceptances() {
    let (addr, server) = fake_server(|mut peer| {
        login_and_sync(&mut peer);
        answer_friends(&mut peer);
        // The pushes name the user: a stranger's name is known from them.
        peer.push(ServerBody::FriendRequest {
            from: 7,
            username: "carol".into(),
        });
        peer.push(ServerBody::FriendAccepted {
            by: 5,
            username: "bob".into(),
        });
        peer.push(message(5, "hi"));
        answer_until_closed(&mut peer, None);
    });
    let out = tern(addr, &["listen", "--count", "1", "--timeout-secs", "10"], "");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "* carol asks to be your friend (accept: tern friends add carol)\n\
         * bob accepted your friend request: you are friends now\n\
         [bob] hi\n"
    );
    server.join().unwrap();
}

#[test]
fn friends_add_says_whether_it_asked_or_accepted() {
    for (answer, said) in [
        (
            ServerBody::FriendRequestSent {
                user: 5,
                username: "bob".into(),
            },
            "asked bob (id 5) to be friends; you are friends once they add you too\n",
        ),
        (
            ServerBody::User {
                user: 5,
                username: "bob".into(),
            },
            "bob (id 5) and you are friends\n",
        ),
    ] {
        let (addr, server) = fake_server(move |mut peer| {
            login(&mut peer);
            let f = peer.recv();
            assert_eq!(
                f.body,
                ClientBody::FriendAdd {
                    username: "bob".into()
                }
            );
            peer.send(f.request_id, answer);
            peer.wait_closed();
        });
        let out = tern(addr, &["friends", "add", "bob"], "");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout(&out), said);
        server.join().unwrap();
    }
}

#[test]
fn friends_requests_lists_both_directions() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        let named = |user: u64, username: &str| Friend {
            user,
            username: username.into(),
            online: false,
        };
        let mut pages = 0;
        while let Some(f) = peer.try_recv() {
            let users = match f.body {
                ClientBody::FriendRequestsPage {
                    incoming: true,
                    after: 0,
                    ..
                } => vec![named(5, "bob"), named(7, "carol")],
                ClientBody::FriendRequestsPage {
                    incoming: false,
                    after: 0,
                    ..
                } => vec![named(9, "dave")],
                other => panic!("unexpected {other:?}"),
            };
            pages += 1;
            peer.send(f.request_id, ServerBody::FriendRequests { users, more: false });
        }
        assert_eq!(pages, 2);
    });
    let out = tern(addr, &["friends", "requests"], "");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "bob (id 5) asks to be your friend\ncarol (id 7) asks to be your friend\ndave (id 9) was asked by you\n"
    );
    server.join().unwrap();
}

/// `tern friends list` asks for the list a page at a time, each after the
/// last id of the one before, and prints every page's friends.
#[test]
fn friends_list_pages_through_the_whole_list() {
    let (addr, server) = fake_server(|mut peer| {
        login(&mut peer);
        let friend = |user: u64, username: &str, online: bool| Friend {
            user,
            username: username.into(),
            online,
        };
        let mut pages = 0;
        while let Some(f) = peer.try_recv() {
            let (friends, more) = match f.body {
                ClientBody::FriendsPage { after: 0, .. } => {
                    (vec![friend(5, "bob", true), friend(7, "carol", false)], true)
                }
                ClientBody::FriendsPage { after: 7, .. } => (vec![friend(9, "dave", false)], false),
                other => panic!("unexpected {other:?}"),
            };
            pages += 1;
            peer.send(f.request_id, ServerBody::FriendsPage { friends, more });
        }
        assert_eq!(pages, 2);
    });
    let out = tern(addr, &["friends", "list"], "");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "bob (id 5) online\ncarol (id 7) offline\ndave (id 9) offline\n"
    );
    server.join().unwrap();
}

/// ternd meters 1:1 receipts at the message rate; `listen` used to send
/// one per message and exit 1 on the first `RateLimited`.
#[test]
fn listen_acknowledges_cumulatively_and_waits_out_a_rate_limited_receipt() {
    const MESSAGES: u64 = 150;
    let (addr, server) = fake_server(|mut peer| {
        login_and_sync(&mut peer);
        answer_friends(&mut peer);
        let mut burst = rkyv::util::AlignedVec::<16>::new();
        for seq in 1..=MESSAGES {
            let frame = ServerFrame {
                request_id: 0,
                body: ServerBody::Message(ChatMessage {
                    conv: ConvId::direct(1, 5),
                    seq,
                    from: 5,
                    client_msg_id: seq,
                    timestamp_ms: 1,
                    content: Content::text(format!("m{seq}")),
                }),
            };
            tern_proto::encode_server(&frame, &mut burst, 1 << 20).unwrap();
        }
        peer.stream.write_all(&burst).unwrap();
        let receipts = answer_until_closed(&mut peer, Some(&[0, 1]));
        // Cumulative: fewer receipts than messages, rising, ending at the last.
        assert!(receipts.len() < MESSAGES as usize, "{receipts:?}");
        assert!(receipts.windows(2).all(|w| w[0].1 < w[1].1), "{receipts:?}");
        assert_eq!(receipts.last(), Some(&(ConvId::direct(1, 5), MESSAGES)));
    });
    let count = MESSAGES.to_string();
    let out = tern(addr, &["listen", "--count", &count, "--timeout-secs", "30"], "");
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<String> = (1..=MESSAGES).map(|seq| format!("[bob] m{seq}\n")).collect();
    assert_eq!(stdout(&out), lines.concat());
    server.join().unwrap();
}

#[test]
fn listen_fails_when_count_is_not_reached_in_time() {
    let (addr, server) = fake_server(|mut peer| {
        login_and_sync(&mut peer);
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
        login_and_sync(&mut peer);
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
        login_and_sync(&mut peer);
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

#[test]
fn history_pages_back_until_the_limit_and_prints_oldest_first() {
    let group = ConvId::Group { group: 3 };
    let page = move |seqs: &[u64]| ServerBody::HistoryPage {
        conv: group,
        messages: seqs
            .iter()
            .map(|&seq| ChatMessage {
                conv: group,
                seq,
                from: 1,
                client_msg_id: seq,
                timestamp_ms: 1,
                content: Content::text(format!("m{seq}")),
            })
            .collect(),
    };
    let (addr, server) = fake_server(move |mut peer| {
        login(&mut peer);
        // A page cut short (to fit a frame): the CLI asks for the rest
        // below the oldest seq it got, newest first each time.
        let f = peer.recv();
        assert_eq!(
            f.body,
            ClientBody::History {
                conv: group,
                from_seq: 9,
                forward: false,
                limit: 3
            }
        );
        peer.send(f.request_id, page(&[9, 8]));
        let f = peer.recv();
        assert_eq!(
            f.body,
            ClientBody::History {
                conv: group,
                from_seq: 7,
                forward: false,
                limit: 1
            }
        );
        peer.send(f.request_id, page(&[7]));
        peer.wait_closed();
    });
    let out = tern(
        addr,
        &["history", "--group", "3", "--up-to", "9", "--limit", "3"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "#7 [#group 3 alice] m7\n#8 [#group 3 alice] m8\n#9 [#group 3 alice] m9\n"
    );
    server.join().unwrap();
}
