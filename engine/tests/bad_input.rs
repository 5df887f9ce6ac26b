//! Hostile and sloppy clients: each misbehaves on its own connection while
//! a well-behaved pair on different home shards keeps chatting, so every
//! case also checks that one bad connection harms nobody else.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use rkyv::util::AlignedVec;
use tern_client::{ClientBody, ClientFrame, Content, ContentKind, ErrorCode, ServerBody};
use tern_proto::{encode_client, PROTOCOL_VERSION};

/// A frame header: body length, flags.
fn header(body_len: u32, flags: u32) -> Vec<u8> {
    let mut bytes = body_len.to_le_bytes().to_vec();
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes
}

/// A frame with a well-formed header and a body that is not an archive.
fn garbage_frame() -> Vec<u8> {
    let mut bytes = header(24, 0);
    bytes.extend_from_slice(&[0xAB; 24]);
    bytes
}

fn encoded(request_id: u64, body: ClientBody) -> Vec<u8> {
    let mut out = AlignedVec::new();
    encode_client(&ClientFrame { request_id, body }, &mut out, 1 << 24).expect("encode");
    out.to_vec()
}

fn hello() -> ClientBody {
    ClientBody::Hello {
        version: PROTOCOL_VERSION,
        client_name: "bad-input".into(),
    }
}

/// Asserts the connection answers exactly one error with `code` and
/// `request_id`, then closes.
fn expect_error_then_close(conn: &mut RawConn, code: ErrorCode, request_id: u64) -> ServerBody {
    let frames = conn.expect_closed();
    match frames.as_slice() {
        [frame] => {
            assert_eq!(frame.request_id, request_id, "{frame:?}");
            match &frame.body {
                ServerBody::Error { code: got, .. } => assert_eq!(*got, code, "{frame:?}"),
                other => panic!("expected Error({code:?}), got {other:?}"),
            }
            frame.body.clone()
        }
        other => panic!("expected one Error({code:?}) before the close, got {other:?}"),
    }
}

/// Runs `misbehave` for a raw connection in each connection state (before
/// Hello, anonymous, logged in on each home shard), with the pair chatting
/// in between.
fn in_every_state(server: &TestServer, pair: &mut Pair, misbehave: impl Fn(&mut RawConn)) {
    pair.exchange();
    let mut fresh = RawConn::connect(server.addr());
    misbehave(&mut fresh);
    pair.exchange();
    let mut anonymous = RawConn::connect(server.addr());
    anonymous.hello();
    misbehave(&mut anonymous);
    pair.exchange();
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("bad{shard}_"), shard);
        let mut logged_in = RawConn::connect(server.addr());
        logged_in.login(&user);
        misbehave(&mut logged_in);
        pair.exchange();
    }
}

#[test]
fn garbage_body_is_malformed_frame_and_closes() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    in_every_state(&server, &mut pair, |conn| {
        conn.send_raw(&garbage_frame()).expect("write");
        expect_error_then_close(conn, ErrorCode::MalformedFrame, 0);
    });
}

/// A connection the server closes after refusing a frame ends with a FIN,
/// even when the client pipelined more behind that frame: a socket closed
/// with unread input makes the kernel reset the connection, and a reset
/// can drop the error frame still queued for the client.
#[test]
fn a_refused_frame_with_more_pipelined_behind_it_ends_in_a_fin_not_a_reset() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    in_every_state(&server, &mut pair, |conn| {
        let mut bytes = garbage_frame();
        bytes.extend(std::iter::repeat_n(0x5a, 64 * 1024));
        conn.send_raw(&bytes).expect("write");
        // The server refuses and closes first, with the rest unread.
        std::thread::sleep(Duration::from_millis(200));
        expect_error_then_close(conn, ErrorCode::MalformedFrame, 0);
        assert!(!conn.was_reset(), "the server reset the connection");
    });
}

/// A session the server ends on its own (here: logged out from another
/// device) while its client is still sending ends in a FIN too: the server
/// stops serving it but does not shut down reading, which would answer the
/// client's next bytes with a reset that can drop the `Disconnect`.
#[test]
fn a_session_ended_by_the_server_while_its_client_sends_ends_in_a_fin() {
    let server = TestServer::start();
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("out{shard}_"), shard);
        let mut kicked = RawConn::connect(server.addr());
        kicked.login(&user);
        let mut other = RawConn::connect(server.addr());
        other.login(&user);
        let id = other.send(ClientBody::LogoutOthers);
        loop {
            let frame = other.expect_frame();
            if frame.request_id == id {
                assert!(matches!(frame.body, ServerBody::LoggedIn { .. }), "{frame:?}");
                break;
            }
        }
        // A client that has not read its Disconnect yet goes on sending.
        for nonce in 0..20 {
            let _ = kicked.send_raw(&encoded(100 + nonce, ClientBody::Ping { nonce }));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_disconnected(&kicked.expect_closed(), ErrorCode::AuthFailed);
        assert!(!kicked.was_reset(), "the server reset the connection");
    }
}

/// The server's lingering close is bounded: a peer that goes on sending
/// after the server closed and never closes itself is cut off (reset) after
/// the linger time, 2 s, and not before.
#[test]
fn a_peer_that_never_closes_is_cut_off_after_the_linger_time() {
    let server = TestServer::start();
    let user = server.user_on_shard("linger", 0);
    for logged_in in [false, true] {
        let mut conn = RawConn::connect(server.addr());
        if logged_in {
            conn.login(&user);
        }
        // Taken before the server can start lingering, so that a stall of
        // this thread cannot shorten what it measures.
        let refused = Instant::now();
        conn.send_raw(&garbage_frame()).expect("write");
        expect_error_then_close(&mut conn, ErrorCode::MalformedFrame, 0);
        let cut_off = loop {
            if let Err(e) = conn.send_raw(&[0x5a; 512]) {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ),
                    "{e}"
                );
                break refused.elapsed();
            }
            assert!(
                refused.elapsed() < Duration::from_secs(20),
                "the server still reads a closed connection after 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            cut_off >= Duration::from_millis(1500),
            "cut off {cut_off:?} after the refused frame (logged in: {logged_in})"
        );
    }
    let cut_short: u64 = (0..server.shards())
        .map(|shard| {
            server
                .metrics
                .shard(shard)
                .lingers_cut_short
                .load(Ordering::Relaxed)
        })
        .sum();
    assert_eq!(cut_short, 2, "tern_lingers_cut_short_total counts both");
}

#[test]
fn oversized_header_is_frame_too_large_and_closes_without_waiting_for_the_body() {
    let server = TestServer::start();
    let max = server.config.max_frame_bytes;
    let mut pair = Pair::new(&server, "p");
    for body_len in [max + 1, 0x7fff_ffff, u32::MAX] {
        in_every_state(&server, &mut pair, |conn| {
            // Only the header is sent: the answer must not wait for a body
            // (the server never reads or allocates for it).
            conn.send_raw(&header(body_len, 0)).expect("write");
            expect_error_then_close(conn, ErrorCode::FrameTooLarge, 0);
        });
    }
}

/// The error's text goes to whoever connected: it may say where in the
/// body the archive is wrong, never where the server's heap is.
#[test]
fn malformed_frame_errors_name_no_server_addresses() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    in_every_state(&server, &mut pair, |conn| {
        // A valid Hello body behind three extra bytes: every pointer of
        // the archive is now misaligned, and rkyv's error names it.
        let valid = encoded(1, hello());
        let body_len = u32::from_le_bytes([valid[0], valid[1], valid[2], valid[3]]) as usize;
        let mut frame = header(body_len as u32 + 3, 0);
        frame.extend_from_slice(&[0; 3]);
        frame.extend_from_slice(&valid[8..8 + body_len]);
        frame.resize(frame.len().next_multiple_of(8), 0);
        conn.send_raw(&frame).expect("write");
        let ServerBody::Error { message, .. } = expect_error_then_close(conn, ErrorCode::MalformedFrame, 0)
        else {
            unreachable!("expect_error_then_close returns the Error")
        };
        let longest_hex = message
            .split("0x")
            .skip(1)
            .map(|s| s.chars().take_while(char::is_ascii_hexdigit).count())
            .max()
            .unwrap_or(0);
        assert!(longest_hex < 8, "a memory address in {message:?}");
        assert!(message.contains("body+"), "no body offset in {message:?}");
    });
}

#[test]
fn reserved_flags_are_malformed_and_close() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    for flags in [1, 0x8000_0000] {
        in_every_state(&server, &mut pair, |conn| {
            conn.send_raw(&header(0, flags)).expect("write");
            expect_error_then_close(conn, ErrorCode::MalformedFrame, 0);
        });
    }
    // A valid body behind bad flags is refused just the same.
    let mut conn = RawConn::connect(server.addr());
    let mut frame = encoded(1, hello());
    frame[4] = 2;
    conn.send_raw(&frame).expect("write");
    expect_error_then_close(&mut conn, ErrorCode::MalformedFrame, 0);
    pair.exchange();
}

#[test]
fn first_frame_must_be_hello() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    pair.exchange();
    for body in [
        ClientBody::Ping { nonce: 1 },
        ClientBody::Login {
            username: pair.a_user.name.clone(),
            password: PASSWORD.as_bytes().to_vec(),
        },
        ClientBody::Register {
            username: "early".into(),
            password: PASSWORD.as_bytes().to_vec(),
        },
        ClientBody::FriendList,
    ] {
        let mut conn = RawConn::connect(server.addr());
        conn.send_raw(&encoded(41, body)).expect("write");
        expect_error_then_close(&mut conn, ErrorCode::InvalidState, 41);
        pair.exchange();
    }
    // The refused Register did not create the account.
    let mut client = server.connect();
    client.register("early", PASSWORD).expect("name still free");
}

#[test]
fn unsupported_version_lists_supported_versions_and_closes() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    pair.exchange();
    for version in [0, 2, 99, u16::MAX] {
        let mut conn = RawConn::connect(server.addr());
        let body = ClientBody::Hello {
            version,
            client_name: "future".into(),
        };
        conn.send_raw(&encoded(7, body)).expect("write");
        match expect_error_then_close(&mut conn, ErrorCode::UnsupportedVersion, 7) {
            ServerBody::Error {
                supported_versions, ..
            } => assert_eq!(supported_versions, vec![1]),
            other => unreachable!("{other:?}"),
        }
        pair.exchange();
    }
    // An over-long client name in Hello also closes the connection.
    let mut conn = RawConn::connect(server.addr());
    let name = "x".repeat(65);
    conn.send_raw(&encoded(
        3,
        ClientBody::Hello {
            version: 1,
            client_name: name,
        },
    ))
    .expect("write");
    expect_error_then_close(&mut conn, ErrorCode::InvalidArgument, 3);
    pair.exchange();
}

#[test]
fn second_hello_is_invalid_state_but_keeps_the_connection() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    let user = server.user_on_shard("twice", 1);
    let mut conn = RawConn::connect(server.addr());
    conn.hello();
    let id = conn.send(hello());
    let frame = conn.expect_error(ErrorCode::InvalidState);
    assert_eq!(frame.request_id, id);
    let id = conn.send(ClientBody::Ping { nonce: 5 });
    let frame = conn.expect_frame();
    assert_eq!(
        (frame.request_id, frame.body),
        (id, ServerBody::Pong { nonce: 5 })
    );
    // Also once logged in.
    let mut client = server.login(&user);
    assert_eq!(
        code_of(client.request(hello()).map(|_| ())),
        ErrorCode::InvalidState
    );
    client.ping().expect("still open");
    pair.exchange();
}

#[test]
fn truncated_frames_then_eof_do_not_hurt_the_server() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    in_every_state(&server, &mut pair, |conn| {
        // Half a header.
        let mut bytes = encoded(9, ClientBody::Ping { nonce: 9 });
        bytes.truncate(5);
        conn.send_raw(&bytes).expect("write");
        conn.stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
        conn.expect_closed();
    });
    in_every_state(&server, &mut pair, |conn| {
        // A whole header, part of the body.
        let mut bytes = encoded(9, ClientBody::Ping { nonce: 9 });
        bytes.truncate(bytes.len() - 3);
        conn.send_raw(&bytes).expect("write");
        conn.stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
        conn.expect_closed();
    });
}

#[test]
fn frames_split_into_single_bytes_are_reassembled() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    let user = server.user_on_shard("dribble", 0);
    let mut conn = RawConn::connect(server.addr());
    conn.login(&user);
    let bytes = encoded(100, ClientBody::Ping { nonce: 77 });
    for byte in &bytes {
        conn.send_raw(&[*byte]).expect("write");
        std::thread::sleep(Duration::from_millis(2));
    }
    let frame = conn.expect_frame();
    assert_eq!(
        (frame.request_id, frame.body),
        (100, ServerBody::Pong { nonce: 77 })
    );
    pair.exchange();
}

/// The server reads through a buffer shared by all connections and keeps
/// only partial frames per connection: frames that straddle reads, several
/// in one read, and a frame larger than one read must all come out whole.
#[test]
fn frames_straddling_reads_and_larger_than_one_read_are_reassembled() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("straddle{shard}_"), shard);
        let mut conn = RawConn::connect(server.addr());
        conn.login(&user);
        let mut bytes = encoded(200, ClientBody::Ping { nonce: 1 });
        bytes.extend(encoded(201, ClientBody::Ping { nonce: 2 }));
        bytes.extend(encoded(
            202,
            ClientBody::ResolveUser {
                username: "n".repeat(40_000),
            },
        ));
        bytes.extend(encoded(203, ClientBody::Ping { nonce: 3 }));
        let mut rest = bytes.as_slice();
        for piece in [5, 30, 4_000, 17_000, 19_000] {
            let (now, later) = rest.split_at(piece.min(rest.len()));
            conn.send_raw(now).expect("write");
            rest = later;
            std::thread::sleep(Duration::from_millis(20));
        }
        conn.send_raw(rest).expect("write");
        for request_id in 200..=203 {
            let frame = conn.expect_frame();
            assert_eq!(frame.request_id, request_id, "{frame:?}");
            if request_id == 202 {
                // Any answer but a framing error: the frame arrived whole.
                assert!(
                    !matches!(
                        frame.body,
                        ServerBody::Error {
                            code: ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge,
                            ..
                        }
                    ),
                    "{frame:?}"
                );
            } else {
                assert!(matches!(frame.body, ServerBody::Pong { .. }), "{frame:?}");
            }
        }
        pair.exchange();
    }
}

#[test]
fn requests_pipelined_behind_login_survive_the_move_to_the_home_shard() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    for shard in 0..server.shards() {
        let user = server.user_on_shard(&format!("pipe{shard}_"), shard);
        let mut conn = RawConn::connect(server.addr());
        let mut bytes = encoded(1, hello());
        bytes.extend(encoded(
            2,
            ClientBody::Login {
                username: user.name.clone(),
                password: PASSWORD.as_bytes().to_vec(),
            },
        ));
        for n in 3..=6 {
            bytes.extend(encoded(n, ClientBody::Ping { nonce: n * 10 }));
        }
        bytes.extend(encoded(
            7,
            ClientBody::SendDirect {
                to: pair.b_user.id,
                client_msg_id: 555,
                content: Content::text("pipelined"),
            },
        ));
        conn.send_raw(&bytes).expect("write all at once");
        assert!(matches!(conn.expect_frame().body, ServerBody::HelloOk { .. }));
        let frame = conn.expect_frame();
        assert_eq!(frame.request_id, 2);
        assert!(matches!(frame.body, ServerBody::LoggedIn { user: id, .. } if id == user.id));
        for n in 3..=6 {
            let frame = conn.expect_frame();
            assert_eq!(
                (frame.request_id, frame.body),
                (n, ServerBody::Pong { nonce: n * 10 })
            );
        }
        let frame = conn.expect_frame();
        assert_eq!(frame.request_id, 7);
        assert!(
            matches!(
                frame.body,
                ServerBody::Sent {
                    client_msg_id: 555,
                    ..
                }
            ),
            "{frame:?}"
        );
        let msg = expect_message(&mut pair.b);
        assert_eq!(
            (msg.from, msg.content.body.as_slice()),
            (user.id, &b"pipelined"[..])
        );
        pair.exchange();
    }
}

#[test]
fn invalid_registration_fields_are_invalid_argument_and_keep_the_connection() {
    let server = TestServer::start();
    let mut pair = Pair::new(&server, "p");
    let mut client = server.connect();
    for name in ["", "ab", "Alice", "_alice", "al ice", "ålice", &"a".repeat(33)] {
        assert_eq!(
            code_of(client.register(name, PASSWORD)),
            ErrorCode::InvalidArgument,
            "username {name:?}"
        );
    }
    assert_eq!(
        code_of(client.register("shortpw", "1234567")),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(client.register("longpw", &"p".repeat(257))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(client.login("Bad Name", PASSWORD)),
        ErrorCode::InvalidArgument
    );
    // Still open and anonymous.
    let id = client.register("valid.name-1", PASSWORD).expect("valid register");
    assert_eq!(client.login("valid.name-1", PASSWORD).expect("login").user, id);
    pair.exchange();
}

#[test]
fn invalid_messages_are_refused_and_keep_the_connection() {
    let server = TestServer::start();
    let max = server.config.max_message_bytes;
    let mut pair = Pair::new(&server, "p");
    pair.exchange();
    let me = pair.a_user.id;
    let peer = pair.b_user.id;
    let a = &mut pair.a;

    // Over the message size limit (the frame itself is within limits).
    let big = Content::text(vec![b'x'; max + 1]);
    assert_eq!(
        code_of(a.send_direct(peer, 1, big.clone())),
        ErrorCode::InvalidArgument
    );
    // Exactly at the limit is fine.
    let ack = a
        .send_direct(peer, 2, Content::text(vec![b'y'; max]))
        .expect("max-size message");
    let msg = expect_message(&mut pair.b);
    assert_eq!((msg.seq, msg.content.body.len()), (ack.seq, max));

    let a = &mut pair.a;
    // To nobody, to id 0, to oneself.
    assert_eq!(code_of(a.send_text(9_999_999, "hello?")), ErrorCode::NotFound);
    assert_eq!(code_of(a.send_text(u64::MAX, "hello?")), ErrorCode::NotFound);
    assert_eq!(code_of(a.send_text(0, "hello?")), ErrorCode::InvalidArgument);
    assert_eq!(
        code_of(a.send_text(me, "note to self")),
        ErrorCode::InvalidArgument
    );
    // Broken media references.
    for (url, mime) in [
        ("", "image/png"),
        ("https://x", ""),
        (&*"u".repeat(2049), "image/png"),
    ] {
        let content = Content {
            kind: ContentKind::Media {
                url: url.to_owned(),
                mime: mime.to_owned(),
                size: 1,
            },
            body: Vec::new(),
        };
        assert_eq!(
            code_of(a.send_direct(peer, 3, content)),
            ErrorCode::InvalidArgument
        );
    }
    // Group messages are checked the same way.
    let group = a.group_create("checks").expect("group");
    assert_eq!(code_of(a.send_group(group, 4, big)), ErrorCode::InvalidArgument);
    assert_eq!(code_of(a.group_create("")), ErrorCode::InvalidArgument);
    assert_eq!(
        code_of(a.group_create(&"g".repeat(65))),
        ErrorCode::InvalidArgument
    );

    // None of it was delivered, and the refused sends used up no sequence
    // numbers: the pair's next messages continue where they left off.
    a.ping().expect("still open");
    let next = a.send_text(peer, "after").expect("send");
    assert_eq!(next.seq, ack.seq + 1);
    let msg = expect_message(&mut pair.b);
    assert_eq!((msg.seq, msg.content.body.as_slice()), (next.seq, &b"after"[..]));
}

/// A logged-in connection that trickles the bytes of a frame it never
/// finishes is closed at its idle timeout: only whole frames are activity
/// (protocol.md 2.5), and a read that brings a byte never times out.
#[test]
fn a_frame_trickled_past_the_idle_timeout_is_closed() {
    let idle = Duration::from_secs(1);
    let server = TestServer::start_with(|c| c.idle_timeout = idle);
    let user = server.user_on_shard("trickler", 0);
    let mut conn = RawConn::connect(server.addr());
    conn.login(&user);
    // A header announcing a 4 KiB body, then one byte of it every 200 ms.
    let mut header = [0u8; tern_proto::HEADER_LEN];
    header[..4].copy_from_slice(&4096u32.to_le_bytes());
    conn.send_raw(&header).expect("header");
    let started = std::time::Instant::now();
    while started.elapsed() < idle * 3 {
        std::thread::sleep(Duration::from_millis(200));
        if conn.send_raw(&[0]).is_err() {
            break;
        }
    }
    // Closed while the bytes still came, not once they stopped: the
    // notice is already here.
    match conn.read(Duration::from_millis(300)) {
        RawRead::Frame(frame) => assert!(
            matches!(
                frame.body,
                ServerBody::Disconnect {
                    code: ErrorCode::IdleTimeout,
                    ..
                }
            ),
            "{frame:?}"
        ),
        other => panic!("still open after {:?} of trickling: {other:?}", started.elapsed()),
    }
    conn.expect_closed();
}
