//! The client's frame handling against a scripted fake server (see `common`).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{connected, fake_server, message, opts, Peer, IDLE_MS};
use rkyv::util::AlignedVec;
use tern_client::{
    Client, ClientBody, ClientError, ClientOptions, Content, ConvId, ErrorCode, Friend, ServerBody,
    ServerFrame,
};
use tern_proto::{encode_server, PROTOCOL_VERSION};

#[test]
fn hello_records_server_limits_and_ping_measures_rtt() {
    let (mut client, server) = connected(|mut peer| {
        let frame = peer.recv();
        assert_eq!(frame.request_id, 2, "ids count up from Hello's 1");
        let ClientBody::Ping { nonce } = frame.body else {
            panic!("expected Ping, got {:?}", frame.body)
        };
        peer.send(2, ServerBody::Pong { nonce });
        peer.wait_closed();
    });
    assert_eq!(client.idle_timeout(), Duration::from_millis(u64::from(IDLE_MS)));
    assert_eq!(client.server_max_frame_bytes(), 64 * 1024);
    assert!(client.local_addr().unwrap().ip().is_loopback());
    let rtt = client.ping().unwrap();
    assert!(rtt < Duration::from_secs(2));
    drop(client);
    server.join().unwrap();
}

#[test]
fn pushes_before_the_answer_are_queued_in_order() {
    let (mut client, server) = connected(|mut peer| {
        let frame = peer.recv();
        assert!(matches!(frame.body, ClientBody::FriendsPage { after: 0, .. }));
        peer.push(message(5, "first"));
        peer.push(ServerBody::Presence {
            user: 5,
            online: true,
        });
        // A late answer to some earlier request: must be dropped, not queued.
        peer.send(77, ServerBody::Ok);
        let friends = vec![Friend {
            user: 5,
            username: "bob".into(),
            online: true,
        }];
        peer.send(frame.request_id, ServerBody::FriendsPage { friends, more: false });
        peer.push(ServerBody::Presence {
            user: 5,
            online: false,
        });
        peer.wait_closed();
    });
    let friends = client.friends().unwrap();
    assert_eq!(friends.len(), 1);
    assert_eq!(friends[0].username, "bob");
    let wait = Duration::from_secs(2);
    assert_eq!(client.next_push(wait).unwrap(), Some(message(5, "first")));
    assert_eq!(
        client.next_push(wait).unwrap(),
        Some(ServerBody::Presence {
            user: 5,
            online: true
        })
    );
    assert_eq!(
        client.next_push(wait).unwrap(),
        Some(ServerBody::Presence {
            user: 5,
            online: false
        })
    );
    let start = Instant::now();
    assert_eq!(client.next_push(Duration::from_millis(100)).unwrap(), None);
    assert!(start.elapsed() >= Duration::from_millis(100));
    drop(client);
    server.join().unwrap();
}

#[test]
fn error_answer_is_a_server_error_and_the_connection_lives_on() {
    let (mut client, server) = connected(|mut peer| {
        let frame = peer.recv();
        peer.send(
            frame.request_id,
            ServerFrame::error(0, ErrorCode::UsernameTaken, "taken").body,
        );
        let frame = peer.recv();
        assert_eq!(
            frame.body,
            ClientBody::ResolveUser {
                username: "bob".into()
            }
        );
        peer.send(
            frame.request_id,
            ServerBody::User {
                user: 5,
                username: "bob".into(),
            },
        );
        peer.wait_closed();
    });
    match client.register("alice", "password1") {
        Err(e @ ClientError::Server { .. }) => {
            assert_eq!(e.retry_after(), None);
            let ClientError::Server { code, message, .. } = e else {
                unreachable!()
            };
            assert_eq!(code, ErrorCode::UsernameTaken);
            assert_eq!(message, "taken");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(client.resolve_user("bob").unwrap(), 5);
    drop(client);
    server.join().unwrap();
}

#[test]
fn disconnect_push_while_waiting_is_disconnected_then_closed() {
    let (mut client, server) = connected(|mut peer| {
        peer.recv();
        peer.push(ServerBody::Disconnect {
            code: ErrorCode::ShuttingDown,
            message: "bye".into(),
            retry_after_ms: 1000,
        });
        // Dropping the peer closes the socket.
    });
    match client.send_text(5, "hi") {
        Err(ClientError::Disconnected {
            code,
            message,
            retry_after_ms,
        }) => {
            assert_eq!(code, ErrorCode::ShuttingDown);
            assert_eq!(message, "bye");
            assert_eq!(retry_after_ms, 1000);
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    server.join().unwrap();
    assert!(matches!(
        client.next_push(Duration::from_secs(2)),
        Err(ClientError::Closed)
    ));
}

/// A push of a kind this client does not know (a newer server's) is
/// skipped, as protocol.md's "Stability" asks: it used to fail the
/// validation of the whole frame and close the connection, so a server
/// that added a push would lock older clients out.
#[test]
fn a_push_of_an_unknown_kind_is_skipped() {
    let (mut client, server) = connected(|mut peer| {
        let frame = peer.recv();
        let mut wire = AlignedVec::new();
        let push = ServerFrame {
            request_id: 0,
            body: ServerBody::Pong { nonce: 1 },
        };
        encode_server(&push, &mut wire, 1 << 20).unwrap();
        // The tag is the byte 8 into the 112-byte root that ends the body.
        let body_len = u32::from_le_bytes(wire[..4].try_into().unwrap()) as usize;
        let tag_at = 8 + body_len - 112 + 8;
        wire[tag_at] = tern_proto::SERVER_BODY_TAGS + 3;
        peer.stream.write_all(&wire).unwrap();
        peer.push(message(5, "after it"));
        peer.send(frame.request_id, ServerBody::Pong { nonce: 2 });
        peer.wait_closed();
    });
    let answer = client
        .request(ClientBody::Ping { nonce: 2 })
        .expect("the answer after an unknown push");
    assert_eq!(answer, ServerBody::Pong { nonce: 2 });
    assert_eq!(
        client.next_push(Duration::from_secs(2)).unwrap(),
        Some(message(5, "after it"))
    );
    drop(client);
    server.join().unwrap();
}

/// The server answers a frame it could not read with an `Error` of
/// request id 0 and closes (protocol.md 2.7). A request waiting then used
/// to queue that error as a push and fail with a bare `Closed`, hiding
/// the server's reason unless the caller drained its pushes.
#[test]
fn an_error_with_request_id_0_while_waiting_is_disconnected_with_its_reason() {
    let (mut client, server) = connected(|mut peer| {
        peer.recv();
        peer.push(ServerBody::Error {
            code: ErrorCode::MalformedFrame,
            message: "the frame is not a valid archive".into(),
            supported_versions: Vec::new(),
            retry_after_ms: 0,
        });
    });
    match client.send_text(5, "hi") {
        Err(error @ ClientError::Disconnected { .. }) => {
            assert_eq!(error.code(), Some(ErrorCode::MalformedFrame));
            assert!(error.to_string().contains("not a valid archive"), "{error}");
            assert!(error.is_fatal());
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn server_closing_is_closed() {
    let (mut client, server) = connected(|mut peer| {
        peer.recv();
    });
    assert!(matches!(client.friends(), Err(ClientError::Closed)));
    server.join().unwrap();
    assert!(matches!(
        client.next_push(Duration::from_secs(1)),
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        client.read_frame(Duration::from_secs(1)),
        Err(ClientError::Closed)
    ));
}

#[test]
fn unanswered_request_times_out_and_its_late_answer_is_dropped() {
    let (addr, server) = fake_server(|mut peer| {
        peer.hello(64 * 1024);
        let slow = peer.recv();
        // Answer only after the client gave up and asked again.
        let next = peer.recv();
        peer.send(slow.request_id, ServerBody::GroupCreated { group: 1 });
        peer.send(next.request_id, ServerBody::GroupCreated { group: 2 });
        peer.wait_closed();
    });
    let mut client = Client::connect(addr, opts(Duration::from_millis(200))).unwrap();
    let start = Instant::now();
    assert!(matches!(client.group_create("slow"), Err(ClientError::Timeout)));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(client.group_create("next").unwrap(), 2);
    assert_eq!(client.next_push(Duration::from_millis(50)).unwrap(), None);
    drop(client);
    server.join().unwrap();
}

#[test]
fn refused_version_fails_connect() {
    let (addr, server) = fake_server(|mut peer| {
        let frame = peer.recv();
        peer.send(
            frame.request_id,
            ServerBody::Error {
                code: ErrorCode::UnsupportedVersion,
                message: "no".into(),
                supported_versions: vec![2],
                retry_after_ms: 0,
            },
        );
    });
    match Client::connect(addr, opts(Duration::from_secs(2))) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::UnsupportedVersion),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn frames_split_into_single_bytes_are_reassembled() {
    let (addr, server) = fake_server(|mut peer| {
        peer.recv();
        let mut out = AlignedVec::new();
        let hello_ok = ServerFrame {
            request_id: 1,
            body: ServerBody::HelloOk {
                version: PROTOCOL_VERSION,
                max_frame_bytes: 1000,
                idle_timeout_ms: 9000,
            },
        };
        encode_server(&hello_ok, &mut out, 1 << 20).unwrap();
        encode_server(
            &ServerFrame {
                request_id: 0,
                body: message(3, "split"),
            },
            &mut out,
            1 << 20,
        )
        .unwrap();
        for byte in out.iter() {
            peer.stream.write_all(&[*byte]).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        peer.wait_closed();
    });
    let mut client = Client::connect(addr, opts(Duration::from_secs(5))).unwrap();
    assert_eq!(client.idle_timeout(), Duration::from_secs(9));
    assert_eq!(client.server_max_frame_bytes(), 1000);
    assert_eq!(
        client.next_push(Duration::from_secs(5)).unwrap(),
        Some(message(3, "split"))
    );
    drop(client);
    server.join().unwrap();
}

#[test]
fn garbage_from_the_server_is_a_protocol_error() {
    // Reserved flags set.
    let (mut client, server) = connected(|mut peer| {
        peer.recv();
        peer.stream
            .write_all(&[8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        peer.wait_closed();
    });
    assert!(
        matches!(client.ping(), Err(ClientError::Protocol(_))),
        "reserved flags"
    );
    drop(client);
    server.join().unwrap();

    // A length above the client's limit is refused before anything is allocated for it.
    let (mut client, server) = connected(|mut peer| {
        peer.recv();
        peer.stream
            .write_all(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0])
            .unwrap();
        peer.wait_closed();
    });
    assert!(
        matches!(client.ping(), Err(ClientError::Protocol(_))),
        "oversized"
    );
    drop(client);
    server.join().unwrap();

    // A well-framed body that is not a valid archive.
    let (mut client, server) = connected(|mut peer| {
        peer.recv();
        let mut frame = vec![16, 0, 0, 0, 0, 0, 0, 0];
        frame.extend_from_slice(&[0xab; 16]);
        peer.stream.write_all(&frame).unwrap();
        peer.wait_closed();
    });
    assert!(
        matches!(client.ping(), Err(ClientError::Protocol(_))),
        "invalid archive"
    );
    drop(client);
    server.join().unwrap();
}

#[test]
fn send_raw_and_read_frame_expose_the_wire() {
    let garbage = [
        0x10, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    ];
    let (mut client, server) = connected(move |mut peer| {
        let mut got = [0u8; 24];
        peer.stream.read_exact(&mut got).unwrap();
        assert_eq!(got, garbage);
        peer.push(ServerFrame::error(0, ErrorCode::MalformedFrame, "bad frame").body);
        peer.push(ServerBody::Disconnect {
            code: ErrorCode::MalformedFrame,
            message: "bad frame".into(),
            retry_after_ms: 0,
        });
    });
    client.send_raw(&garbage).unwrap();
    let wait = Duration::from_secs(2);
    let first = client.read_frame(wait).unwrap().unwrap();
    assert_eq!(first.request_id, 0);
    assert!(matches!(
        first.body,
        ServerBody::Error {
            code: ErrorCode::MalformedFrame,
            ..
        }
    ));
    let second = client.read_frame(wait).unwrap().unwrap();
    assert!(matches!(second.body, ServerBody::Disconnect { .. }));
    server.join().unwrap();
    assert!(matches!(client.read_frame(wait), Err(ClientError::Closed)));
}

#[test]
fn typed_helpers_send_the_right_requests() {
    let (mut client, server) = connected(|mut peer| {
        let mut expected_id = 2;
        let mut next = |peer: &mut Peer| {
            let frame = peer.recv();
            assert_eq!(frame.request_id, expected_id);
            expected_id += 1;
            frame
        };
        let f = next(&mut peer);
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
            token: vec![7; 32],
        };
        peer.send(f.request_id, answer);
        let f = next(&mut peer);
        assert!(matches!(f.body, ClientBody::Sync { .. }));
        peer.send(f.request_id, ServerBody::SyncDone { messages: 0 });
        let mut msg_ids = Vec::new();
        for _ in 0..2 {
            let f = next(&mut peer);
            let ClientBody::SendDirect {
                to,
                client_msg_id,
                content,
            } = f.body
            else {
                panic!("expected SendDirect")
            };
            assert_eq!((to, content), (5, Content::text("hi")));
            msg_ids.push(client_msg_id);
            let sent = ServerBody::Sent {
                client_msg_id,
                conv: ConvId::direct(1, 5),
                seq: msg_ids.len() as u64,
                timestamp_ms: 42,
            };
            peer.send(f.request_id, sent);
        }
        assert_eq!(msg_ids[1], msg_ids[0].wrapping_add(1), "client_msg_ids count up");
        let f = next(&mut peer);
        assert_eq!(f.body, ClientBody::GroupCreate { name: "rust".into() });
        peer.send(f.request_id, ServerBody::GroupCreated { group: 9 });
        let f = next(&mut peer);
        assert_eq!(f.body, ClientBody::GroupJoin { group: 9 });
        peer.send(f.request_id, ServerBody::Ok);
        let f = next(&mut peer);
        assert_eq!(f.body, ClientBody::GroupMembers { group: 9 });
        peer.send(
            f.request_id,
            ServerBody::Members {
                group: 9,
                members: vec![1, 5],
            },
        );
        let f = next(&mut peer);
        let ClientBody::SendGroup {
            group, client_msg_id, ..
        } = f.body
        else {
            panic!("expected SendGroup")
        };
        assert_eq!(group, 9);
        let sent = ServerBody::Sent {
            client_msg_id,
            conv: ConvId::Group { group: 9 },
            seq: 1,
            timestamp_ms: 43,
        };
        peer.send(f.request_id, sent);
        let f = next(&mut peer);
        assert_eq!(f.body, ClientBody::FriendRemove { user: 5 });
        // The wrong answer type must not be taken for success.
        peer.send(f.request_id, ServerBody::Pong { nonce: 0 });
        peer.wait_closed();
    });
    let session = client.login("alice", "password1").unwrap();
    assert_eq!(session.user, 1);
    assert_eq!(session.token, vec![7; 32]);
    assert_eq!(client.user(), Some(1));
    let a = client.send_text(5, "hi").unwrap();
    let b = client.send_text(5, "hi").unwrap();
    assert_eq!((a.seq, b.seq), (1, 2));
    assert_eq!(a.conv, ConvId::direct(5, 1));
    assert_ne!(a.client_msg_id, b.client_msg_id);
    assert_eq!(client.group_create("rust").unwrap(), 9);
    client.group_join(9).unwrap();
    assert_eq!(client.group_members(9).unwrap(), vec![1, 5]);
    let sent = client.send_group_text(9, "hello group").unwrap();
    assert_eq!(sent.conv, ConvId::Group { group: 9 });
    assert!(matches!(client.friend_remove(5), Err(ClientError::Protocol(_))));
    drop(client);
    server.join().unwrap();
}

#[test]
fn members_all_pages_on_and_refuses_pages_that_do_not_move_forward() {
    use tern_client::{GroupMember, GroupRole};
    let member = |user| GroupMember {
        user,
        role: GroupRole::Member,
    };
    let (mut client, server) = connected(move |mut peer| {
        let page = |peer: &mut Peer, after, members: Vec<GroupMember>, more| {
            let f = peer.recv();
            assert_eq!(
                f.body,
                ClientBody::GroupMembersPage {
                    group: 9,
                    after,
                    limit: 1000
                }
            );
            peer.send(
                f.request_id,
                ServerBody::MembersPage {
                    group: 9,
                    members,
                    more,
                },
            );
        };
        // A well-behaved listing in two pages.
        page(&mut peer, 0, vec![member(2), member(5)], true);
        page(&mut peer, 5, vec![member(8)], false);
        // "More" with an empty page would loop forever.
        page(&mut peer, 0, vec![], true);
        // A page that goes backwards.
        page(&mut peer, 0, vec![member(4)], true);
        page(&mut peer, 4, vec![member(3)], false);
        peer.wait_closed();
    });
    assert_eq!(
        client.group_members_all(9).unwrap(),
        vec![member(2), member(5), member(8)]
    );
    assert!(matches!(
        client.group_members_all(9),
        Err(ClientError::Protocol(_))
    ));
    assert!(matches!(
        client.group_members_all(9),
        Err(ClientError::Protocol(_))
    ));
    drop(client);
    server.join().unwrap();
}

#[test]
fn request_over_the_servers_frame_limit_is_refused_locally() {
    let (addr, server) = fake_server(|mut peer| {
        peer.hello(256);
        let frame = peer.recv();
        assert!(
            matches!(frame.body, ClientBody::Ping { .. }),
            "the big frame must not be sent"
        );
        let ClientBody::Ping { nonce } = frame.body else {
            unreachable!()
        };
        peer.send(frame.request_id, ServerBody::Pong { nonce });
        peer.wait_closed();
    });
    let mut client = Client::connect(addr, opts(Duration::from_secs(2))).unwrap();
    let big = "x".repeat(1000);
    assert!(matches!(client.send_text(5, &big), Err(ClientError::Protocol(_))));
    client.ping().unwrap();
    drop(client);
    server.join().unwrap();
}

#[test]
fn connecting_to_a_closed_port_is_an_io_error() {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    match Client::connect(addr, opts(Duration::from_secs(2))) {
        Err(ClientError::Io(_)) => {}
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn a_timeout_too_large_for_a_deadline_means_no_deadline() {
    let (addr, server) = fake_server(|mut peer| {
        peer.hello(64 * 1024);
        let frame = peer.recv();
        let ClientBody::Ping { nonce } = frame.body else {
            panic!("expected Ping, got {:?}", frame.body)
        };
        peer.send(frame.request_id, ServerBody::Pong { nonce });
        peer.push(message(5, "later"));
        peer.wait_closed();
    });
    // Instant::now() + Duration::MAX overflows; it must not panic.
    let mut client = Client::connect(addr, opts(Duration::MAX)).unwrap();
    client.ping().unwrap();
    assert_eq!(
        client.next_push(Duration::MAX).unwrap(),
        Some(message(5, "later"))
    );
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_write_that_times_out_is_fatal_and_the_connection_is_closed() {
    let (unblock, blocked) = std::sync::mpsc::channel::<()>();
    let (addr, server) = fake_server(move |mut peer| {
        peer.hello(16 * 1024 * 1024);
        // Read nothing until the client gave up writing, so its socket
        // buffers fill and the write times out.
        let _ = blocked.recv();
        // Drain raw bytes: the last frame is cut short.
        let mut sink = [0u8; 64 * 1024];
        while matches!(peer.stream.read(&mut sink), Ok(n) if n > 0) {}
    });
    let mut client = Client::connect(addr, opts(Duration::from_millis(300))).unwrap();
    let big = "x".repeat(15 * 1024 * 1024);
    // Socket buffers may swallow a frame or two whole; each of those then
    // only waits for an answer that does not come (a recoverable Timeout).
    let mut err = None;
    for _ in 0..20 {
        match client.send_text(5, &big) {
            Err(ClientError::Timeout) => continue,
            Err(e) => {
                err = Some(e);
                break;
            }
            Ok(sent) => panic!("nobody answered, yet {sent:?}"),
        }
    }
    let err = err.expect("the socket buffers never filled");
    assert!(matches!(err, ClientError::WriteTimeout), "{err:?}");
    assert!(err.is_fatal());
    let next = client.ping().unwrap_err();
    assert!(next.is_fatal(), "{next:?}");
    unblock.send(()).unwrap();
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_message_already_queued_is_not_queued_again() {
    const COPIES: usize = 10_000;
    let (mut client, server) = connected(|mut peer| {
        let frame = peer.recv();
        let ClientBody::Ping { nonce } = frame.body else {
            panic!("{:?}", frame.body)
        };
        // The same message (conv 1:5, seq 7) over and over, then seq 8.
        let mut burst = AlignedVec::<16>::new();
        let mut later = message(5, "later");
        if let ServerBody::Message(m) = &mut later {
            m.seq = 8;
        }
        let same = ServerFrame {
            request_id: 0,
            body: message(5, "same"),
        };
        for _ in 0..COPIES {
            encode_server(&same, &mut burst, 1 << 20).unwrap();
        }
        let later = ServerFrame {
            request_id: 0,
            body: later,
        };
        encode_server(&later, &mut burst, 1 << 20).unwrap();
        encode_server(&same, &mut burst, 1 << 20).unwrap();
        peer.stream.write_all(&burst).unwrap();
        peer.send(frame.request_id, ServerBody::Pong { nonce });
        peer.wait_closed();
    });
    client.ping().unwrap();
    assert_eq!(client.queued_pushes(), 2);
    let wait = Duration::from_secs(1);
    assert_eq!(client.next_push(wait).unwrap(), Some(message(5, "same")));
    let Some(ServerBody::Message(m)) = client.next_push(wait).unwrap() else {
        panic!("expected the message with seq 8")
    };
    assert_eq!(m.seq, 8);
    assert_eq!(client.next_push(Duration::from_millis(50)).unwrap(), None);
    drop(client);
    server.join().unwrap();
}

#[test]
fn too_many_queued_pushes_close_the_connection_with_push_queue_full() {
    const LIMIT: usize = 16 * 1024;
    const PUSHES: usize = 1_000;
    let (addr, server) = fake_server(|mut peer| {
        peer.hello(64 * 1024);
        let frame = peer.recv();
        let ClientBody::Ping { nonce } = frame.body else {
            panic!("{:?}", frame.body)
        };
        let mut burst = AlignedVec::<16>::new();
        for n in 0..PUSHES {
            let presence = ServerFrame {
                request_id: 0,
                body: ServerBody::Presence {
                    user: n as u64,
                    online: true,
                },
            };
            encode_server(&presence, &mut burst, 1 << 20).unwrap();
        }
        let pong = ServerFrame {
            request_id: frame.request_id,
            body: ServerBody::Pong { nonce },
        };
        encode_server(&pong, &mut burst, 1 << 20).unwrap();
        // The client hangs up part way; its reset may fail these.
        let _ = peer.stream.write_all(&burst);
        let mut sink = [0u8; 4096];
        while matches!(peer.stream.read(&mut sink), Ok(n) if n > 0) {}
    });
    let options = ClientOptions {
        max_queued_push_bytes: LIMIT,
        ..opts(Duration::from_secs(2))
    };
    let mut client = Client::connect(addr, options).unwrap();
    let err = client.ping().unwrap_err();
    assert!(
        matches!(err, ClientError::PushQueueFull { limit: LIMIT }),
        "{err:?}"
    );
    assert!(err.is_fatal());
    // What was queued is still handed out, in order; then the connection is gone.
    let queued = client.queued_pushes();
    assert!(queued > 0 && queued < PUSHES, "{queued}");
    for n in 0..queued {
        let push = client.next_push(Duration::from_secs(1)).unwrap();
        assert_eq!(
            push,
            Some(ServerBody::Presence {
                user: n as u64,
                online: true
            })
        );
    }
    assert!(matches!(
        client.next_push(Duration::from_secs(1)),
        Err(ClientError::Closed)
    ));
    drop(client);
    server.join().unwrap();
}

/// The groups a `Sync` presented, checking each cursor's seq is its group id.
fn synced_groups(frame: &tern_client::ClientFrame) -> Vec<u64> {
    let ClientBody::Sync { cursors } = &frame.body else {
        panic!("expected Sync, got {:?}", frame.body)
    };
    cursors
        .iter()
        .map(|c| {
            let ConvId::Group { group } = c.conv else {
                panic!("{c:?}")
            };
            assert_eq!(c.seq, group);
            group
        })
        .collect()
}

#[test]
fn login_with_more_cursors_than_a_frame_holds_presents_the_most_recent() {
    const HELD: u64 = 2_100;
    let (mut client, server) = connected(|mut peer| {
        let f = peer.recv();
        assert!(matches!(f.body, ClientBody::Login { .. }), "{:?}", f.body);
        let answer = ServerBody::LoggedIn {
            user: 1,
            username: "alice".into(),
            token: vec![0; 32],
        };
        peer.send(f.request_id, answer);
        let f = peer.recv();
        let groups = synced_groups(&f);
        // As many as fit in 64 KiB, the most recently advanced first.
        assert!(groups.len() > 1_900 && groups.len() < 2_100, "{}", groups.len());
        let expected: Vec<u64> = (1..=HELD).rev().take(groups.len()).collect();
        assert_eq!(groups, expected);
        peer.send(f.request_id, ServerBody::SyncDone { messages: 0 });
        peer.wait_closed();
    });
    // E.g. restored from the app's storage, least recently used first.
    for group in 1..=HELD {
        client.set_cursor(ConvId::Group { group }, group);
    }
    let session = client.login("alice", "password1").unwrap();
    assert_eq!(session.user, 1);
    drop(client);
    server.join().unwrap();
}

#[test]
fn sync_presents_at_most_the_protocol_limit_of_cursors() {
    const HELD: u64 = 5_000;
    let (addr, server) = fake_server(|mut peer| {
        peer.hello(1 << 20);
        let f = peer.recv();
        let groups = synced_groups(&f);
        let expected: Vec<u64> = (1..=HELD)
            .rev()
            .take(tern_proto::limits::SYNC_CURSORS_MAX)
            .collect();
        assert_eq!(groups, expected);
        peer.send(f.request_id, ServerBody::SyncDone { messages: 3 });
        peer.wait_closed();
    });
    let mut client = Client::connect(addr, opts(Duration::from_secs(2))).unwrap();
    for group in 1..=HELD {
        client.set_cursor(ConvId::Group { group }, group);
    }
    // A cursor at 0 acknowledges and bounds nothing: it is not presented.
    client.set_cursor(ConvId::direct(1, 5), 0);
    assert_eq!(client.sync().unwrap(), 3);
    drop(client);
    server.join().unwrap();
}
