//! Checks `docs/protocol.md` against the real encoder and decoder.
//!
//! Every `<!-- vector: NAME -->` block in the document must be a frame that
//! [`tern_proto::encode_client`] / [`tern_proto::encode_server`] produce
//! byte for byte from the value this file gives for NAME, and that decodes
//! back (through [`FrameBuf`]) to that value. The sets of names must match.
//! The layout tables of the document are pinned by
//! `archived_layout_is_as_documented`, and `spec_encoder_matches_rkyv` /
//! `spec_decoder_matches_rkyv` implement the document's rules by hand (no
//! rkyv) and compare them with rkyv on arbitrary frames, which is what a
//! client in another language would do.

use std::collections::BTreeSet;

use proptest::prelude::*;
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use tern_proto::ids::{mix64, ArchivedConvId};
use tern_proto::limits::DEFAULT_MAX_FRAME_BYTES;
use tern_proto::*;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
const MAX: u32 = DEFAULT_MAX_FRAME_BYTES;

#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Client(ClientFrame),
    Server(ServerFrame),
}

fn client(request_id: u64, body: ClientBody) -> Frame {
    Frame::Client(ClientFrame { request_id, body })
}

fn server(request_id: u64, body: ServerBody) -> Frame {
    Frame::Server(ServerFrame { request_id, body })
}

/// The values of the document's vectors, by name.
fn vectors() -> Vec<(&'static str, Frame)> {
    let token: Vec<u8> = (0u8..32).collect();
    let hello_bob = Content::text("hello, bob!");
    vec![
        (
            "client-hello",
            client(
                1,
                ClientBody::Hello {
                    version: 1,
                    client_name: "tern-go".into(),
                },
            ),
        ),
        (
            "client-register",
            client(
                2,
                ClientBody::Register {
                    username: "alice".into(),
                    password: b"correct horse".to_vec(),
                },
            ),
        ),
        (
            "client-login",
            client(
                3,
                ClientBody::Login {
                    username: "bob_the_builder".into(),
                    password: b"hunter22".to_vec(),
                },
            ),
        ),
        (
            "client-login-token",
            client(4, ClientBody::LoginToken { token: token.clone() }),
        ),
        ("client-ping", client(5, ClientBody::Ping { nonce: 0xdead_beef })),
        ("client-friend-list", client(6, ClientBody::FriendList)),
        (
            "client-send-direct",
            client(
                7,
                ClientBody::SendDirect {
                    to: 2,
                    client_msg_id: 1,
                    content: hello_bob.clone(),
                },
            ),
        ),
        (
            "client-send-group",
            client(
                8,
                ClientBody::SendGroup {
                    group: 9,
                    client_msg_id: 2,
                    content: Content {
                        kind: ContentKind::Media {
                            url: "https://cdn.example/cat.png".into(),
                            mime: "image/png".into(),
                            size: 48_213,
                        },
                        body: b"look".to_vec(),
                    },
                },
            ),
        ),
        (
            "server-hello-ok",
            server(
                1,
                ServerBody::HelloOk {
                    version: 1,
                    max_frame_bytes: 65_536,
                    idle_timeout_ms: 30_000,
                },
            ),
        ),
        (
            "server-error-unsupported-version",
            server(
                1,
                ServerBody::Error {
                    code: ErrorCode::UnsupportedVersion,
                    message: "protocol version not supported".into(),
                    supported_versions: vec![1],
                    retry_after_ms: 0,
                },
            ),
        ),
        (
            "server-error-auth-failed",
            Frame::Server(ServerFrame::error(3, ErrorCode::AuthFailed, "bad login")),
        ),
        ("server-registered", server(2, ServerBody::Registered { user: 1 })),
        (
            "server-logged-in",
            server(
                3,
                ServerBody::LoggedIn {
                    user: 2,
                    username: "bob_the_builder".into(),
                    token,
                },
            ),
        ),
        ("server-pong", server(5, ServerBody::Pong { nonce: 0xdead_beef })),
        (
            "server-friends",
            server(
                6,
                ServerBody::Friends {
                    friends: vec![
                        Friend {
                            user: 1,
                            username: "alice".into(),
                            online: true,
                        },
                        Friend {
                            user: 3,
                            username: "carol_the_cook".into(),
                            online: false,
                        },
                    ],
                },
            ),
        ),
        (
            "server-sent",
            server(
                7,
                ServerBody::Sent {
                    client_msg_id: 1,
                    conv: ConvId::direct(2, 1),
                    seq: 1,
                    timestamp_ms: 1_700_000_000_000,
                },
            ),
        ),
        (
            "server-members",
            server(
                10,
                ServerBody::Members {
                    group: 9,
                    members: vec![1, 2],
                },
            ),
        ),
        (
            "server-message",
            server(
                0,
                ServerBody::Message(ChatMessage {
                    conv: ConvId::direct(1, 2),
                    seq: 1,
                    from: 1,
                    client_msg_id: 1,
                    timestamp_ms: 1_700_000_000_000,
                    content: hello_bob,
                }),
            ),
        ),
        (
            "server-presence",
            server(
                0,
                ServerBody::Presence {
                    user: 2,
                    online: true,
                },
            ),
        ),
        (
            "server-disconnect",
            server(
                0,
                ServerBody::Disconnect {
                    code: ErrorCode::ShuttingDown,
                    message: "server shutting down".into(),
                    retry_after_ms: 5_000,
                },
            ),
        ),
        (
            "client-sync",
            client(
                11,
                ClientBody::Sync {
                    cursors: vec![
                        Cursor {
                            conv: ConvId::direct(1, 2),
                            seq: 5,
                        },
                        Cursor {
                            conv: ConvId::Group { group: 9 },
                            seq: 12,
                        },
                    ],
                },
            ),
        ),
        (
            "client-receipt",
            client(
                12,
                ClientBody::Receipt {
                    conv: ConvId::direct(1, 2),
                    kind: ReceiptKind::Read,
                    seq: 5,
                },
            ),
        ),
        (
            "client-history",
            client(
                13,
                ClientBody::History {
                    conv: ConvId::Group { group: 9 },
                    from_seq: u64::MAX,
                    forward: false,
                    limit: 50,
                },
            ),
        ),
        (
            "client-conversations",
            client(14, ClientBody::Conversations { offset: 0, limit: 20 }),
        ),
        (
            "server-sync-done",
            server(11, ServerBody::SyncDone { messages: 3 }),
        ),
        (
            "server-receipt",
            server(
                0,
                ServerBody::Receipt {
                    conv: ConvId::direct(1, 2),
                    user: 2,
                    kind: ReceiptKind::Read,
                    seq: 5,
                },
            ),
        ),
        (
            "server-history-page",
            server(
                13,
                ServerBody::HistoryPage {
                    conv: ConvId::Group { group: 9 },
                    messages: vec![
                        ChatMessage {
                            conv: ConvId::Group { group: 9 },
                            seq: 12,
                            from: 3,
                            client_msg_id: 7,
                            timestamp_ms: 1_700_000_060_000,
                            content: Content::text("see you at eight"),
                        },
                        ChatMessage {
                            conv: ConvId::Group { group: 9 },
                            seq: 11,
                            from: 1,
                            client_msg_id: 4,
                            timestamp_ms: 1_700_000_000_000,
                            content: Content::text("hi all"),
                        },
                    ],
                },
            ),
        ),
        (
            "server-conversations",
            server(
                14,
                ServerBody::Conversations {
                    conversations: vec![
                        ConversationSummary {
                            conv: ConvId::direct(1, 2),
                            last_seq: 5,
                            unread: 0,
                            last_message: Some(ChatMessage {
                                conv: ConvId::direct(1, 2),
                                seq: 5,
                                from: 2,
                                client_msg_id: 9,
                                timestamp_ms: 1_700_000_120_000,
                                content: Content::text("ok!"),
                            }),
                            peer_delivered: 5,
                            peer_read: 4,
                        },
                        ConversationSummary {
                            conv: ConvId::Group { group: 9 },
                            last_seq: 12,
                            unread: 2,
                            last_message: None,
                            peer_delivered: 0,
                            peer_read: 0,
                        },
                    ],
                },
            ),
        ),
        ("client-logout", client(15, ClientBody::Logout)),
        ("client-logout-others", client(38, ClientBody::LogoutOthers)),
        (
            "client-change-password",
            client(
                16,
                ClientBody::ChangePassword {
                    old_password: b"hunter22".to_vec(),
                    new_password: b"correct horse".to_vec(),
                },
            ),
        ),
        (
            "server-error-rate-limited",
            Frame::Server(ServerFrame::rate_limited(
                17,
                "rate limited; retry after 250 ms",
                250,
            )),
        ),
        (
            "server-disconnect-rate-limited",
            server(
                0,
                ServerBody::Disconnect {
                    code: ErrorCode::RateLimited,
                    message: "flooding".into(),
                    retry_after_ms: 1000,
                },
            ),
        ),
        (
            "client-group-create-with",
            client(
                18,
                ClientBody::GroupCreateWith {
                    name: "rustaceans".into(),
                    open: false,
                },
            ),
        ),
        (
            "client-group-invite",
            client(19, ClientBody::GroupInvite { group: 9, user: 3 }),
        ),
        (
            "client-group-kick",
            client(20, ClientBody::GroupKick { group: 9, user: 3 }),
        ),
        (
            "client-group-set-role",
            client(
                21,
                ClientBody::GroupSetRole {
                    group: 9,
                    user: 4,
                    role: GroupRole::Admin,
                },
            ),
        ),
        (
            "client-group-info",
            client(22, ClientBody::GroupInfo { group: 9 }),
        ),
        (
            "client-group-uninvite",
            client(23, ClientBody::GroupUninvite { group: 9, user: 3 }),
        ),
        (
            "client-group-members-page",
            client(
                24,
                ClientBody::GroupMembersPage {
                    group: 9,
                    after: 4,
                    limit: 2,
                },
            ),
        ),
        (
            "server-members-page",
            server(
                24,
                ServerBody::MembersPage {
                    group: 9,
                    members: vec![
                        GroupMember {
                            user: 7,
                            role: GroupRole::Member,
                        },
                        GroupMember {
                            user: 12,
                            role: GroupRole::Admin,
                        },
                    ],
                    more: true,
                },
            ),
        ),
        (
            "client-group-invites-page",
            client(
                25,
                ClientBody::GroupInvitesPage {
                    group: 9,
                    after: 0,
                    limit: 100,
                },
            ),
        ),
        (
            "server-invites-page",
            server(
                25,
                ServerBody::InvitesPage {
                    group: 9,
                    users: vec![3, 8],
                    more: false,
                },
            ),
        ),
        (
            "client-group-transfer-ownership",
            client(26, ClientBody::GroupTransferOwnership { group: 9, user: 4 }),
        ),
        (
            "client-my-invites-page",
            client(27, ClientBody::MyInvitesPage { after: 0, limit: 50 }),
        ),
        (
            "server-my-invites",
            server(
                27,
                ServerBody::MyInvites {
                    groups: vec![9],
                    more: false,
                },
            ),
        ),
        (
            "server-invited",
            server(0, ServerBody::Invited { group: 9, by: 1 }),
        ),
        (
            "client-group-ban",
            client(28, ClientBody::GroupBan { group: 9, user: 3 }),
        ),
        (
            "client-group-unban",
            client(29, ClientBody::GroupUnban { group: 9, user: 3 }),
        ),
        (
            "client-group-bans-page",
            client(
                30,
                ClientBody::GroupBansPage {
                    group: 9,
                    after: 0,
                    limit: 10,
                },
            ),
        ),
        (
            "server-bans-page",
            server(
                30,
                ServerBody::BansPage {
                    group: 9,
                    users: vec![3],
                    more: false,
                },
            ),
        ),
        ("client-user-block", client(31, ClientBody::UserBlock { user: 3 })),
        (
            "client-user-unblock",
            client(32, ClientBody::UserUnblock { user: 3 }),
        ),
        (
            "client-blocks-page",
            client(33, ClientBody::BlocksPage { after: 0, limit: 50 }),
        ),
        (
            "server-blocks",
            server(
                33,
                ServerBody::Blocks {
                    users: vec![3],
                    more: false,
                },
            ),
        ),
        (
            "client-group-delete",
            client(34, ClientBody::GroupDelete { group: 9 }),
        ),
        (
            "client-typing",
            client(
                36,
                ClientBody::Typing {
                    conv: ConvId::direct(1, 2),
                },
            ),
        ),
        (
            "server-typing",
            server(
                0,
                ServerBody::Typing {
                    conv: ConvId::Group { group: 9 },
                    user: 1,
                },
            ),
        ),
        (
            "client-send-recall",
            client(
                37,
                ClientBody::SendDirect {
                    to: 2,
                    client_msg_id: 8,
                    content: Content {
                        kind: ContentKind::Recall { seq: 3 },
                        body: Vec::new(),
                    },
                },
            ),
        ),
        (
            "server-message-recalled",
            server(
                0,
                ServerBody::Message(ChatMessage {
                    conv: ConvId::direct(1, 2),
                    seq: 3,
                    from: 1,
                    client_msg_id: 7,
                    timestamp_ms: 1_700_000_000_000,
                    content: Content {
                        kind: ContentKind::Recalled,
                        body: Vec::new(),
                    },
                }),
            ),
        ),
        (
            "client-login-jwt",
            client(
                35,
                ClientBody::LoginJwt {
                    token: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln".into(),
                },
            ),
        ),
        (
            "server-group-deleted",
            server(0, ServerBody::GroupDeleted { group: 9, by: 1 }),
        ),
        (
            "server-group-info",
            server(
                22,
                ServerBody::GroupInfo {
                    group: 9,
                    name: "rustaceans".into(),
                    open: false,
                    members: vec![
                        GroupMember {
                            user: 1,
                            role: GroupRole::Owner,
                        },
                        GroupMember {
                            user: 4,
                            role: GroupRole::Admin,
                        },
                        GroupMember {
                            user: 7,
                            role: GroupRole::Member,
                        },
                    ],
                },
            ),
        ),
        (
            "client-friend-add",
            client(
                38,
                ClientBody::FriendAdd {
                    username: "bob".into(),
                },
            ),
        ),
        (
            "server-friend-request-sent",
            server(
                38,
                ServerBody::FriendRequestSent {
                    user: 2,
                    username: "bob".into(),
                },
            ),
        ),
        (
            "server-friend-request",
            server(
                0,
                ServerBody::FriendRequest {
                    from: 1,
                    username: "alice".into(),
                },
            ),
        ),
        (
            "server-friend-accepted",
            server(
                0,
                ServerBody::FriendAccepted {
                    by: 2,
                    username: "bob".into(),
                },
            ),
        ),
        (
            "client-friend-requests-page",
            client(
                39,
                ClientBody::FriendRequestsPage {
                    incoming: true,
                    after: 0,
                    limit: 50,
                },
            ),
        ),
        (
            "server-friend-requests",
            server(
                39,
                ServerBody::FriendRequests {
                    users: vec![
                        Friend {
                            user: 1,
                            username: "alice".into(),
                            online: false,
                        },
                        Friend {
                            user: 3,
                            username: "carol_the_cook".into(),
                            online: false,
                        },
                    ],
                    more: false,
                },
            ),
        ),
        (
            "client-account-delete",
            client(
                40,
                ClientBody::AccountDelete {
                    password: b"hunter22".to_vec(),
                },
            ),
        ),
        (
            "server-disconnect-account-deleted",
            server(
                0,
                ServerBody::Disconnect {
                    code: ErrorCode::AccountDeleted,
                    message: "account deleted".into(),
                    retry_after_ms: 0,
                },
            ),
        ),
        (
            "client-friends-page",
            client(40, ClientBody::FriendsPage { after: 0, limit: 50 }),
        ),
        (
            "server-friends-page",
            server(
                40,
                ServerBody::FriendsPage {
                    friends: vec![
                        Friend {
                            user: 2,
                            username: "bob".into(),
                            online: true,
                        },
                        Friend {
                            user: 3,
                            username: "carol_the_cook".into(),
                            online: false,
                        },
                    ],
                    more: true,
                },
            ),
        ),
    ]
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = AlignedVec::new();
    match frame {
        Frame::Client(f) => encode_client(f, &mut out, MAX).unwrap(),
        Frame::Server(f) => encode_server(f, &mut out, MAX).unwrap(),
    }
    out.to_vec()
}

/// Feeds `wire` to a [`FrameBuf`] in pieces of the given sizes (cycled) and
/// decodes every frame with the decoder of `side`.
fn decode_stream(wire: &[u8], server_side: bool, chunks: &[usize]) -> Vec<Frame> {
    let mut fb = FrameBuf::new(MAX);
    let mut frames = Vec::new();
    let mut off = 0;
    let mut i = 0;
    loop {
        while let Some(body) = fb.next_body().unwrap() {
            frames.push(if server_side {
                let archived = decode_server(body).unwrap();
                Frame::Server(rkyv::deserialize::<ServerFrame, RkyvError>(archived).unwrap())
            } else {
                let archived = decode_client(body).unwrap();
                Frame::Client(rkyv::deserialize::<ClientFrame, RkyvError>(archived).unwrap())
            });
        }
        if off == wire.len() {
            break;
        }
        let want = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(usize::MAX)
            .max(1);
        i += 1;
        let slot = fb.read_slot().unwrap();
        let n = want.min(slot.len()).min(wire.len() - off);
        slot[..n].copy_from_slice(&wire[off..off + n]);
        fb.commit(n);
        off += n;
    }
    assert_eq!(fb.buffered(), 0, "bytes left over after the last frame");
    frames
}

/// The `<!-- vector: NAME -->` blocks of the document: name and bytes.
fn doc_vectors() -> Vec<(String, Vec<u8>)> {
    let doc = std::fs::read_to_string(DOC).expect("docs/protocol.md is readable");
    let mut found = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix("<!-- vector:") else {
            continue;
        };
        let name = rest
            .trim()
            .strip_suffix("-->")
            .expect("vector marker ends with -->")
            .trim();
        assert_eq!(
            lines.next().map(str::trim),
            Some("```hex"),
            "vector {name}: no ```hex block"
        );
        let mut hex_text = String::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            hex_text.extend(l.chars().filter(|c| !c.is_whitespace()));
        }
        let bytes = hex::decode(&hex_text).unwrap_or_else(|e| panic!("vector {name}: bad hex: {e}"));
        found.push((name.to_string(), bytes));
    }
    found
}

#[test]
fn doc_vectors_match_encoder_and_decoder() {
    let ours = vectors();
    let doc = doc_vectors();
    assert!(doc.len() >= 8, "the document should hold at least 8 vectors");
    for (name, bytes) in &doc {
        let (_, value) = ours
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("vector {name} is in the document but not in vectors.rs"));
        let encoded = encode(value);
        assert_eq!(
            hex::encode(&encoded),
            hex::encode(bytes),
            "vector {name}: the encoder's bytes differ from the document's"
        );
        let server_side = matches!(value, Frame::Server(_));
        for chunks in [&[usize::MAX][..], &[1], &[3, 5, 7]] {
            let decoded = decode_stream(bytes, server_side, chunks);
            assert_eq!(
                decoded,
                vec![value.clone()],
                "vector {name}: decoding gave another value"
            );
        }
    }
}

#[test]
fn doc_and_test_name_the_same_vectors() {
    let doc_names: Vec<String> = doc_vectors().into_iter().map(|(n, _)| n).collect();
    let doc_set: BTreeSet<&str> = doc_names.iter().map(String::as_str).collect();
    assert_eq!(
        doc_set.len(),
        doc_names.len(),
        "a vector name appears twice in the document"
    );
    let test_set: BTreeSet<&str> = vectors().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        doc_set, test_set,
        "vectors in the document and in vectors.rs differ"
    );
}

/// Prints the vectors in the document's format (run with `--ignored
/// --nocapture` after changing a value, then paste).
#[test]
#[ignore]
fn print_vectors() {
    for (name, value) in vectors() {
        let bytes = encode(&value);
        println!("<!-- vector: {name} -->\n```hex");
        for line in bytes.chunks(16) {
            let groups: Vec<String> = line.chunks(4).map(hex::encode).collect();
            println!("{}", groups.join(" "));
        }
        println!("```\n");
    }
}
// ---------------------------------------------------------------------------
// Layout: the numbers of the document's tables.

fn addr<T>(x: &T) -> usize {
    std::ptr::from_ref(x) as usize
}

/// One sample of every `ClientBody` variant, in declaration order.
fn client_samples() -> Vec<ClientBody> {
    let media = Content {
        kind: ContentKind::Media {
            url: "https://cdn.example/x".into(),
            mime: "image/png".into(),
            size: 1,
        },
        body: vec![1, 2, 3],
    };
    vec![
        ClientBody::Hello {
            version: 1,
            client_name: "c".into(),
        },
        ClientBody::Register {
            username: "alice".into(),
            password: b"password".to_vec(),
        },
        ClientBody::Login {
            username: "alice".into(),
            password: b"password".to_vec(),
        },
        ClientBody::LoginToken { token: vec![7; 32] },
        ClientBody::Ping { nonce: 1 },
        ClientBody::ResolveUser {
            username: "bob".into(),
        },
        ClientBody::FriendAdd {
            username: "bob".into(),
        },
        ClientBody::FriendRemove { user: 2 },
        ClientBody::FriendList,
        ClientBody::SendDirect {
            to: 2,
            client_msg_id: 3,
            content: media.clone(),
        },
        ClientBody::GroupCreate { name: "g".into() },
        ClientBody::GroupJoin { group: 1 },
        ClientBody::GroupLeave { group: 1 },
        ClientBody::GroupMembers { group: 1 },
        ClientBody::SendGroup {
            group: 1,
            client_msg_id: 3,
            content: media,
        },
        ClientBody::Sync {
            cursors: vec![Cursor {
                conv: ConvId::Group { group: 4 },
                seq: 2,
            }],
        },
        ClientBody::Receipt {
            conv: ConvId::direct(1, 2),
            kind: ReceiptKind::Delivered,
            seq: 3,
        },
        ClientBody::History {
            conv: ConvId::direct(1, 2),
            from_seq: 1,
            forward: true,
            limit: 200,
        },
        ClientBody::Conversations { offset: 1, limit: 2 },
        ClientBody::Logout,
        ClientBody::ChangePassword {
            old_password: b"password".to_vec(),
            new_password: b"password2".to_vec(),
        },
        ClientBody::GroupCreateWith {
            name: "g".into(),
            open: true,
        },
        ClientBody::GroupInvite { group: 1, user: 2 },
        ClientBody::GroupKick { group: 1, user: 2 },
        ClientBody::GroupSetRole {
            group: 1,
            user: 2,
            role: GroupRole::Member,
        },
        ClientBody::GroupInfo { group: 1 },
        ClientBody::GroupUninvite { group: 1, user: 2 },
        ClientBody::GroupMembersPage {
            group: 1,
            after: 2,
            limit: 3,
        },
        ClientBody::GroupInvitesPage {
            group: 1,
            after: 2,
            limit: 3,
        },
        ClientBody::GroupTransferOwnership { group: 1, user: 2 },
        ClientBody::MyInvitesPage { after: 1, limit: 2 },
        ClientBody::GroupBan { group: 1, user: 2 },
        ClientBody::GroupUnban { group: 1, user: 2 },
        ClientBody::GroupBansPage {
            group: 1,
            after: 2,
            limit: 3,
        },
        ClientBody::UserBlock { user: 2 },
        ClientBody::UserUnblock { user: 2 },
        ClientBody::BlocksPage { after: 1, limit: 2 },
        ClientBody::GroupDelete { group: 1 },
        ClientBody::LoginJwt {
            token: "a.b.c".into(),
        },
        ClientBody::Typing {
            conv: ConvId::Group { group: 1 },
        },
        ClientBody::LogoutOthers,
        ClientBody::FriendRequestsPage {
            incoming: true,
            after: 1,
            limit: 2,
        },
        ClientBody::AccountDelete {
            password: b"password".to_vec(),
        },
        ClientBody::FriendsPage { after: 1, limit: 2 },
    ]
}

/// One sample of every `ServerBody` variant, in declaration order.
fn server_samples() -> Vec<ServerBody> {
    vec![
        ServerBody::HelloOk {
            version: 1,
            max_frame_bytes: 2,
            idle_timeout_ms: 3,
        },
        ServerBody::Error {
            code: ErrorCode::NotFound,
            message: "no".into(),
            supported_versions: vec![],
            retry_after_ms: 4,
        },
        ServerBody::Ok,
        ServerBody::Registered { user: 1 },
        ServerBody::LoggedIn {
            user: 1,
            username: "alice".into(),
            token: vec![0; 32],
        },
        ServerBody::Pong { nonce: 1 },
        ServerBody::User {
            user: 1,
            username: "alice".into(),
        },
        ServerBody::Friends { friends: vec![] },
        ServerBody::Sent {
            client_msg_id: 1,
            conv: ConvId::Group { group: 4 },
            seq: 2,
            timestamp_ms: 3,
        },
        ServerBody::GroupCreated { group: 1 },
        ServerBody::Members {
            group: 1,
            members: vec![1],
        },
        ServerBody::Message(ChatMessage {
            conv: ConvId::direct(1, 2),
            seq: 1,
            from: 1,
            client_msg_id: 1,
            timestamp_ms: 1,
            content: Content::text("x"),
        }),
        ServerBody::Presence {
            user: 1,
            online: true,
        },
        ServerBody::Disconnect {
            code: ErrorCode::IdleTimeout,
            message: "idle".into(),
            retry_after_ms: 0,
        },
        ServerBody::SyncDone { messages: 1 },
        ServerBody::Receipt {
            conv: ConvId::direct(1, 2),
            user: 2,
            kind: ReceiptKind::Read,
            seq: 3,
        },
        ServerBody::HistoryPage {
            conv: ConvId::Group { group: 4 },
            messages: vec![],
        },
        ServerBody::Conversations {
            conversations: vec![],
        },
        ServerBody::GroupInfo {
            group: 1,
            name: "g".into(),
            open: true,
            members: vec![],
        },
        ServerBody::MembersPage {
            group: 1,
            members: vec![],
            more: false,
        },
        ServerBody::InvitesPage {
            group: 1,
            users: vec![],
            more: false,
        },
        ServerBody::MyInvites {
            groups: vec![],
            more: false,
        },
        ServerBody::Invited { group: 1, by: 2 },
        ServerBody::BansPage {
            group: 1,
            users: vec![],
            more: false,
        },
        ServerBody::Blocks {
            users: vec![],
            more: false,
        },
        ServerBody::GroupDeleted { group: 1, by: 2 },
        ServerBody::Typing {
            conv: ConvId::Group { group: 1 },
            user: 2,
        },
        ServerBody::FriendRequestSent {
            user: 1,
            username: "alice".into(),
        },
        ServerBody::FriendRequests {
            users: vec![],
            more: false,
        },
        ServerBody::FriendRequest {
            from: 1,
            username: "alice".into(),
        },
        ServerBody::FriendAccepted {
            by: 2,
            username: "bob".into(),
        },
        ServerBody::FriendsPage {
            friends: vec![],
            more: false,
        },
    ]
}

/// Offsets of a client variant's fields from the start of the body enum.
fn client_field_offsets(b: &ArchivedClientBody) -> Vec<usize> {
    use ArchivedClientBody as B;
    let base = addr(b);
    let o = |a: usize| a - base;
    match b {
        B::Hello { version, client_name } => vec![o(addr(version)), o(addr(client_name))],
        B::Register { username, password } | B::Login { username, password } => {
            vec![o(addr(username)), o(addr(password))]
        }
        B::LoginToken { token } => vec![o(addr(token))],
        B::LoginJwt { token } => vec![o(addr(token))],
        B::Typing { conv } => vec![o(addr(conv))],
        B::Ping { nonce } => vec![o(addr(nonce))],
        B::ResolveUser { username } | B::FriendAdd { username } => vec![o(addr(username))],
        B::GroupCreate { name } => vec![o(addr(name))],
        B::FriendRemove { user } | B::UserBlock { user } | B::UserUnblock { user } => vec![o(addr(user))],
        B::FriendList => vec![],
        B::GroupJoin { group } | B::GroupLeave { group } | B::GroupMembers { group } => vec![o(addr(group))],
        B::SendDirect {
            to: a,
            client_msg_id,
            content,
        }
        | B::SendGroup {
            group: a,
            client_msg_id,
            content,
        } => {
            vec![o(addr(a)), o(addr(client_msg_id)), o(addr(content))]
        }
        B::Sync { cursors } => vec![o(addr(cursors))],
        B::Receipt { conv, kind, seq } => vec![o(addr(conv)), o(addr(kind)), o(addr(seq))],
        B::History {
            conv,
            from_seq,
            forward,
            limit,
        } => vec![o(addr(conv)), o(addr(from_seq)), o(addr(forward)), o(addr(limit))],
        B::Conversations { offset, limit } => vec![o(addr(offset)), o(addr(limit))],
        B::Logout | B::LogoutOthers => vec![],
        B::ChangePassword {
            old_password,
            new_password,
        } => vec![o(addr(old_password)), o(addr(new_password))],
        B::GroupCreateWith { name, open } => vec![o(addr(name)), o(addr(open))],
        B::GroupInvite { group, user }
        | B::GroupKick { group, user }
        | B::GroupUninvite { group, user }
        | B::GroupTransferOwnership { group, user }
        | B::GroupBan { group, user }
        | B::GroupUnban { group, user } => {
            vec![o(addr(group)), o(addr(user))]
        }
        B::GroupSetRole { group, user, role } => vec![o(addr(group)), o(addr(user)), o(addr(role))],
        B::GroupInfo { group } | B::GroupDelete { group } => vec![o(addr(group))],
        B::GroupMembersPage { group, after, limit }
        | B::GroupInvitesPage { group, after, limit }
        | B::GroupBansPage { group, after, limit } => {
            vec![o(addr(group)), o(addr(after)), o(addr(limit))]
        }
        B::MyInvitesPage { after, limit }
        | B::BlocksPage { after, limit }
        | B::FriendsPage { after, limit } => vec![o(addr(after)), o(addr(limit))],
        B::FriendRequestsPage {
            incoming,
            after,
            limit,
        } => vec![o(addr(incoming)), o(addr(after)), o(addr(limit))],
        B::AccountDelete { password } => vec![o(addr(password))],
    }
}

/// Offsets of a server variant's fields from the start of the body enum.
fn server_field_offsets(b: &ArchivedServerBody) -> Vec<usize> {
    use ArchivedServerBody as B;
    let base = addr(b);
    let o = |a: usize| a - base;
    match b {
        B::HelloOk {
            version,
            max_frame_bytes,
            idle_timeout_ms,
        } => vec![
            o(addr(version)),
            o(addr(max_frame_bytes)),
            o(addr(idle_timeout_ms)),
        ],
        B::Error {
            code,
            message,
            supported_versions,
            retry_after_ms,
        } => vec![
            o(addr(code)),
            o(addr(message)),
            o(addr(supported_versions)),
            o(addr(retry_after_ms)),
        ],
        B::Ok => vec![],
        B::Registered { user } => vec![o(addr(user))],
        B::LoggedIn {
            user,
            username,
            token,
        } => vec![o(addr(user)), o(addr(username)), o(addr(token))],
        B::Pong { nonce } => vec![o(addr(nonce))],
        B::User { user, username } => vec![o(addr(user)), o(addr(username))],
        B::Friends { friends } => vec![o(addr(friends))],
        B::Sent {
            client_msg_id,
            conv,
            seq,
            timestamp_ms,
        } => vec![
            o(addr(client_msg_id)),
            o(addr(conv)),
            o(addr(seq)),
            o(addr(timestamp_ms)),
        ],
        B::GroupCreated { group } => vec![o(addr(group))],
        B::Members { group, members } => vec![o(addr(group)), o(addr(members))],
        B::Message(m) => vec![o(addr(m))],
        B::Presence { user, online } => vec![o(addr(user)), o(addr(online))],
        B::Disconnect {
            code,
            message,
            retry_after_ms,
        } => vec![o(addr(code)), o(addr(message)), o(addr(retry_after_ms))],
        B::SyncDone { messages } => vec![o(addr(messages))],
        B::Receipt {
            conv,
            user,
            kind,
            seq,
        } => {
            vec![o(addr(conv)), o(addr(user)), o(addr(kind)), o(addr(seq))]
        }
        B::HistoryPage { conv, messages } => vec![o(addr(conv)), o(addr(messages))],
        B::Typing { conv, user } => vec![o(addr(conv)), o(addr(user))],
        B::Conversations { conversations } => vec![o(addr(conversations))],
        B::GroupInfo {
            group,
            name,
            open,
            members,
        } => vec![o(addr(group)), o(addr(name)), o(addr(open)), o(addr(members))],
        B::MembersPage { group, members, more } => vec![o(addr(group)), o(addr(members)), o(addr(more))],
        B::InvitesPage { group, users, more } | B::BansPage { group, users, more } => {
            vec![o(addr(group)), o(addr(users)), o(addr(more))]
        }
        B::MyInvites { groups, more } => vec![o(addr(groups)), o(addr(more))],
        B::Blocks { users, more } => vec![o(addr(users)), o(addr(more))],
        B::Invited { group, by } | B::GroupDeleted { group, by } => vec![o(addr(group)), o(addr(by))],
        B::FriendRequestSent { user, username } => vec![o(addr(user)), o(addr(username))],
        B::FriendRequests { users, more } => vec![o(addr(users)), o(addr(more))],
        B::FriendRequest { from, username } => vec![o(addr(from)), o(addr(username))],
        B::FriendAccepted { by, username } => vec![o(addr(by)), o(addr(username))],
        B::FriendsPage { friends, more } => vec![o(addr(friends)), o(addr(more))],
    }
}

/// The body of the single frame in `wire`.
fn body_of(wire: &[u8]) -> &[u8] {
    let len = u32::from_le_bytes(wire[..4].try_into().unwrap()) as usize;
    &wire[8..8 + len]
}

#[test]
fn archived_layout_is_as_documented() {
    use rkyv::option::ArchivedOption;
    use rkyv::string::ArchivedString;
    use rkyv::vec::ArchivedVec;
    use std::mem::{align_of, offset_of, size_of};

    // (size, align) of every archived type, as in the document.
    let sizes = [
        (
            "ClientFrame",
            size_of::<ArchivedClientFrame>(),
            align_of::<ArchivedClientFrame>(),
            72,
            8,
        ),
        (
            "ClientBody",
            size_of::<ArchivedClientBody>(),
            align_of::<ArchivedClientBody>(),
            64,
            8,
        ),
        (
            "ServerFrame",
            size_of::<ArchivedServerFrame>(),
            align_of::<ArchivedServerFrame>(),
            112,
            8,
        ),
        (
            "ServerBody",
            size_of::<ArchivedServerBody>(),
            align_of::<ArchivedServerBody>(),
            104,
            8,
        ),
        (
            "Content",
            size_of::<ArchivedContent>(),
            align_of::<ArchivedContent>(),
            40,
            8,
        ),
        (
            "ContentKind",
            size_of::<ArchivedContentKind>(),
            align_of::<ArchivedContentKind>(),
            32,
            8,
        ),
        (
            "ConvId",
            size_of::<ArchivedConvId>(),
            align_of::<ArchivedConvId>(),
            24,
            8,
        ),
        (
            "Friend",
            size_of::<ArchivedFriend>(),
            align_of::<ArchivedFriend>(),
            24,
            8,
        ),
        (
            "ChatMessage",
            size_of::<ArchivedChatMessage>(),
            align_of::<ArchivedChatMessage>(),
            96,
            8,
        ),
        (
            "ErrorCode",
            size_of::<ArchivedErrorCode>(),
            align_of::<ArchivedErrorCode>(),
            1,
            1,
        ),
        (
            "Cursor",
            size_of::<ArchivedCursor>(),
            align_of::<ArchivedCursor>(),
            32,
            8,
        ),
        (
            "ReceiptKind",
            size_of::<ArchivedReceiptKind>(),
            align_of::<ArchivedReceiptKind>(),
            1,
            1,
        ),
        (
            "Option<ChatMessage>",
            size_of::<ArchivedOption<ArchivedChatMessage>>(),
            align_of::<ArchivedOption<ArchivedChatMessage>>(),
            104,
            8,
        ),
        (
            "ConversationSummary",
            size_of::<ArchivedConversationSummary>(),
            align_of::<ArchivedConversationSummary>(),
            160,
            8,
        ),
        (
            "GroupMember",
            size_of::<ArchivedGroupMember>(),
            align_of::<ArchivedGroupMember>(),
            16,
            8,
        ),
        (
            "GroupRole",
            size_of::<ArchivedGroupRole>(),
            align_of::<ArchivedGroupRole>(),
            1,
            1,
        ),
        (
            "String",
            size_of::<ArchivedString>(),
            align_of::<ArchivedString>(),
            8,
            4,
        ),
        (
            "Vec<u8>",
            size_of::<ArchivedVec<u8>>(),
            align_of::<ArchivedVec<u8>>(),
            8,
            4,
        ),
        (
            "Vec<Friend>",
            size_of::<ArchivedVec<ArchivedFriend>>(),
            align_of::<ArchivedVec<ArchivedFriend>>(),
            8,
            4,
        ),
        (
            "u64",
            size_of::<rkyv::Archived<u64>>(),
            align_of::<rkyv::Archived<u64>>(),
            8,
            8,
        ),
        (
            "u32",
            size_of::<rkyv::Archived<u32>>(),
            align_of::<rkyv::Archived<u32>>(),
            4,
            4,
        ),
        (
            "u16",
            size_of::<rkyv::Archived<u16>>(),
            align_of::<rkyv::Archived<u16>>(),
            2,
            2,
        ),
        (
            "bool",
            size_of::<rkyv::Archived<bool>>(),
            align_of::<rkyv::Archived<bool>>(),
            1,
            1,
        ),
    ];
    for (name, size, align, want_size, want_align) in sizes {
        assert_eq!(
            (size, align),
            (want_size, want_align),
            "size/align of archived {name}"
        );
    }

    assert_eq!(offset_of!(ArchivedClientFrame, request_id), 0);
    assert_eq!(offset_of!(ArchivedClientFrame, body), 8);
    assert_eq!(offset_of!(ArchivedServerFrame, request_id), 0);
    assert_eq!(offset_of!(ArchivedServerFrame, body), 8);
    assert_eq!(
        [
            offset_of!(ArchivedContent, kind),
            offset_of!(ArchivedContent, body)
        ],
        [0, 32]
    );
    assert_eq!(
        [
            offset_of!(ArchivedFriend, user),
            offset_of!(ArchivedFriend, username),
            offset_of!(ArchivedFriend, online)
        ],
        [0, 8, 16]
    );
    assert_eq!(
        [
            offset_of!(ArchivedChatMessage, conv),
            offset_of!(ArchivedChatMessage, seq),
            offset_of!(ArchivedChatMessage, from),
            offset_of!(ArchivedChatMessage, client_msg_id),
            offset_of!(ArchivedChatMessage, timestamp_ms),
            offset_of!(ArchivedChatMessage, content),
        ],
        [0, 24, 32, 40, 48, 56]
    );
    assert_eq!(
        [offset_of!(ArchivedCursor, conv), offset_of!(ArchivedCursor, seq)],
        [0, 24]
    );
    assert_eq!(
        [
            offset_of!(ArchivedGroupMember, user),
            offset_of!(ArchivedGroupMember, role)
        ],
        [0, 8]
    );
    assert_eq!(
        [
            offset_of!(ArchivedConversationSummary, conv),
            offset_of!(ArchivedConversationSummary, last_seq),
            offset_of!(ArchivedConversationSummary, unread),
            offset_of!(ArchivedConversationSummary, last_message),
            offset_of!(ArchivedConversationSummary, peer_delivered),
            offset_of!(ArchivedConversationSummary, peer_read),
        ],
        [0, 24, 32, 40, 144, 152]
    );

    // Variant tags (the first byte of the enum) and field offsets.
    let client_expected: [&[usize]; 43] = [
        &[2, 4],          // Hello
        &[4, 12],         // Register
        &[4, 12],         // Login
        &[4],             // LoginToken
        &[8],             // Ping
        &[4],             // ResolveUser
        &[4],             // FriendAdd
        &[8],             // FriendRemove
        &[],              // FriendList
        &[8, 16, 24],     // SendDirect
        &[4],             // GroupCreate
        &[8],             // GroupJoin
        &[8],             // GroupLeave
        &[8],             // GroupMembers
        &[8, 16, 24],     // SendGroup
        &[4],             // Sync
        &[8, 32, 40],     // Receipt
        &[8, 32, 40, 44], // History
        &[4, 8],          // Conversations
        &[],              // Logout
        &[4, 12],         // ChangePassword
        &[4, 12],         // GroupCreateWith
        &[8, 16],         // GroupInvite
        &[8, 16],         // GroupKick
        &[8, 16, 24],     // GroupSetRole
        &[8],             // GroupInfo
        &[8, 16],         // GroupUninvite
        &[8, 16, 24],     // GroupMembersPage
        &[8, 16, 24],     // GroupInvitesPage
        &[8, 16],         // GroupTransferOwnership
        &[8, 16],         // MyInvitesPage
        &[8, 16],         // GroupBan
        &[8, 16],         // GroupUnban
        &[8, 16, 24],     // GroupBansPage
        &[8],             // UserBlock
        &[8],             // UserUnblock
        &[8, 16],         // BlocksPage
        &[8],             // GroupDelete
        &[4],             // LoginJwt
        &[8],             // Typing
        &[],              // LogoutOthers
        &[1, 8, 16],      // FriendRequestsPage
        &[4],             // AccountDelete
    ];
    // Variants whose tag is not their place in the list: (tag, offsets).
    let client_expected_tagged: [(usize, &[usize]); 1] = [
        (43, &[8, 16]), // FriendsPage
    ];
    let client_expected = client_expected
        .into_iter()
        .enumerate()
        .chain(client_expected_tagged);
    let samples = client_samples();
    assert_eq!(samples.len(), client_expected.clone().count());
    for (body, (tag, want)) in samples.into_iter().zip(client_expected) {
        let wire = encode(&client(1, body.clone()));
        let bytes = body_of(&wire);
        let root = bytes.len() - 72;
        assert_eq!(bytes[root + 8] as usize, tag, "tag of {body:?}");
        let archived = decode_client(bytes).unwrap();
        assert_eq!(client_field_offsets(&archived.body), want, "offsets of {body:?}");
        if let ArchivedClientBody::SendDirect { content, .. } = &archived.body {
            let ArchivedContentKind::Media { url, mime, size } = &content.kind else {
                panic!("sample should be media")
            };
            let base = addr(&content.kind);
            assert_eq!(
                [addr(url) - base, addr(mime) - base, addr(size) - base],
                [4, 12, 24]
            );
            assert_eq!(bytes[root + 8 + 24], 1, "ContentKind::Media tag");
        }
    }

    let server_expected: [&[usize]; 32] = [
        &[2, 4, 8],       // HelloOk
        &[1, 4, 12, 20],  // Error
        &[],              // Ok
        &[8],             // Registered
        &[8, 16, 24],     // LoggedIn
        &[8],             // Pong
        &[8, 16],         // User
        &[4],             // Friends
        &[8, 16, 40, 48], // Sent
        &[8],             // GroupCreated
        &[8, 16],         // Members
        &[8],             // Message
        &[8, 16],         // Presence
        &[1, 4, 12],      // Disconnect
        &[8],             // SyncDone
        &[8, 32, 40, 48], // Receipt
        &[8, 32],         // HistoryPage
        &[4],             // Conversations
        &[8, 16, 24, 28], // GroupInfo
        &[8, 16, 24],     // MembersPage
        &[8, 16, 24],     // InvitesPage
        &[4, 12],         // MyInvites
        &[8, 16],         // Invited
        &[8, 16, 24],     // BansPage
        &[4, 12],         // Blocks
        &[8, 16],         // GroupDeleted
        &[8, 32],         // Typing
        &[8, 16],         // FriendRequestSent
        &[4, 12],         // FriendRequests
        &[8, 16],         // FriendRequest
        &[8, 16],         // FriendAccepted
        &[4, 12],         // FriendsPage
    ];
    let samples = server_samples();
    assert_eq!(samples.len(), server_expected.len());
    // A variant past this count would be skipped as a newer server's push.
    assert_eq!(samples.len(), usize::from(tern_proto::SERVER_BODY_TAGS));
    for (tag, (body, want)) in samples.into_iter().zip(server_expected).enumerate() {
        let wire = encode(&server(1, body.clone()));
        let bytes = body_of(&wire);
        let root = bytes.len() - 112;
        assert_eq!(bytes[root + 8] as usize, tag, "tag of {body:?}");
        let archived = decode_server(bytes).unwrap();
        assert_eq!(server_field_offsets(&archived.body), want, "offsets of {body:?}");
    }

    // ConvId: Direct (tag 0) low@8 high@16; Group (tag 1) group@8.
    for (conv, tag, want) in [
        (ConvId::direct(5, 6), 0u8, vec![8, 16]),
        (ConvId::Group { group: 5 }, 1, vec![8]),
    ] {
        let wire = encode(&server(
            1,
            ServerBody::Sent {
                client_msg_id: 1,
                conv,
                seq: 1,
                timestamp_ms: 1,
            },
        ));
        let bytes = body_of(&wire);
        let archived = decode_server(bytes).unwrap();
        let ArchivedServerBody::Sent { conv, .. } = &archived.body else {
            panic!("not Sent")
        };
        let base = addr(conv);
        let got = match conv {
            ArchivedConvId::Direct { low, high } => vec![addr(low) - base, addr(high) - base],
            ArchivedConvId::Group { group } => vec![addr(group) - base],
        };
        assert_eq!(got, want);
        assert_eq!(bytes[base - addr(&bytes[0])], tag);
    }

    // ErrorCode: one byte, declaration order.
    for (i, code) in ErrorCode::ALL.iter().enumerate() {
        let wire = encode(&server(
            1,
            ServerBody::Disconnect {
                code: *code,
                message: String::new(),
                retry_after_ms: 0,
            },
        ));
        let bytes = body_of(&wire);
        assert_eq!(bytes[bytes.len() - 112 + 8 + 1] as usize, i, "{code:?}");
    }

    // ReceiptKind: one byte, declaration order (Receipt push: kind at 40).
    for (i, kind) in [ReceiptKind::Delivered, ReceiptKind::Read]
        .into_iter()
        .enumerate()
    {
        let wire = encode(&server(
            0,
            ServerBody::Receipt {
                conv: ConvId::Group { group: 1 },
                user: 1,
                kind,
                seq: 1,
            },
        ));
        let bytes = body_of(&wire);
        assert_eq!(bytes[bytes.len() - 112 + 8 + 40] as usize, i, "{kind:?}");
    }

    // Option<ChatMessage>: tag byte (0 None, 1 Some), the message at 8,
    // unused bytes zero for None.
    let message = ChatMessage {
        conv: ConvId::Group { group: 1 },
        seq: 2,
        from: 3,
        client_msg_id: 4,
        timestamp_ms: 5,
        content: Content::text("x"),
    };
    for last_message in [None, Some(message)] {
        let summary = ConversationSummary {
            conv: ConvId::Group { group: 1 },
            last_seq: 2,
            unread: 1,
            last_message: last_message.clone(),
            peer_delivered: 0,
            peer_read: 0,
        };
        let wire = encode(&server(
            1,
            ServerBody::Conversations {
                conversations: vec![summary],
            },
        ));
        let bytes = body_of(&wire);
        let archived = decode_server(bytes).unwrap();
        let ArchivedServerBody::Conversations { conversations } = &archived.body else {
            panic!("not Conversations")
        };
        let opt = &conversations[0].last_message;
        let at = addr(opt) - addr(&bytes[0]);
        assert_eq!(addr(opt) - addr(&conversations[0]), 40);
        match opt {
            ArchivedOption::None => {
                assert_eq!(bytes[at], 0);
                assert!(bytes[at + 1..at + 104].iter().all(|&b| b == 0));
            }
            ArchivedOption::Some(m) => {
                assert_eq!(bytes[at], 1);
                assert_eq!(addr(m) - addr(opt), 8);
                assert_eq!(m.seq.to_native(), 2);
            }
        }
        assert!(last_message.is_some() == opt.is_some());
    }
}

// ---------------------------------------------------------------------------
// The document's rules, implemented by hand as a client in another language
// would: no rkyv, only byte arithmetic.

/// Encodes a client frame following `docs/protocol.md` alone.
fn spec_encode_client(frame: &ClientFrame) -> Vec<u8> {
    // Out-of-line data first, in field order, each piece at its own
    // alignment (1 for strings and byte vectors, 8 for arrays of cursors)
    // after zero padding; positions are relative to the start of the body.
    let mut body: Vec<u8> = Vec::new();
    let mut ool = |bytes: &[u8], align: usize| -> usize {
        while !body.len().is_multiple_of(align) {
            body.push(0);
        }
        let pos = body.len();
        body.extend_from_slice(bytes);
        pos
    };
    // A ConvId written in place: tag, then low/high or group (24 bytes).
    fn conv_bytes(conv: &ConvId) -> [u8; 24] {
        let mut c = [0u8; 24];
        match *conv {
            ConvId::Direct { low, high } => {
                c[8..16].copy_from_slice(&low.to_le_bytes());
                c[16..24].copy_from_slice(&high.to_le_bytes());
            }
            ConvId::Group { group } => {
                c[0] = 1;
                c[8..16].copy_from_slice(&group.to_le_bytes());
            }
        }
        c
    }
    // (position in the root, target or None for an inline string, value)
    enum Field<'a> {
        Str(usize, Option<usize>, &'a str),
        Vec(usize, usize, usize),
        U64(usize, u64),
        U32(usize, u32),
        U16(usize, u16),
        U8(usize, u8),
        Raw(usize, [u8; 24]),
    }
    fn string<'a>(at: usize, s: &'a str, ool: &mut dyn FnMut(&[u8], usize) -> usize) -> Field<'a> {
        let target = (s.len() > 8).then(|| ool(s.as_bytes(), 1));
        Field::Str(at, target, s)
    }
    fn content_fields<'a>(
        content: &'a Content,
        at: usize,
        ool: &mut dyn FnMut(&[u8], usize) -> usize,
    ) -> Vec<Field<'a>> {
        let mut f = Vec::new();
        match &content.kind {
            ContentKind::Text => f.push(Field::U8(at, 0)),
            ContentKind::Media { url, mime, size } => {
                f.push(Field::U8(at, 1));
                f.push(string(at + 4, url, ool));
                f.push(string(at + 12, mime, ool));
                f.push(Field::U64(at + 24, *size));
            }
            ContentKind::Recall { seq } => {
                f.push(Field::U8(at, 2));
                f.push(Field::U64(at + 8, *seq));
            }
            ContentKind::Recalled => f.push(Field::U8(at, 3)),
        }
        let b = ool(&content.body, 1);
        f.push(Field::Vec(at + 32, b, content.body.len()));
        f
    }
    let mut fields = Vec::new();
    fields.push(Field::U64(0, frame.request_id));
    const B: usize = 8; // the body enum's offset in the root
    let tag = |t: u8| Field::U8(B, t);
    match &frame.body {
        ClientBody::Hello { version, client_name } => {
            fields.push(tag(0));
            fields.push(Field::U16(B + 2, *version));
            fields.push(string(B + 4, client_name, &mut ool));
        }
        ClientBody::Register { username, password } | ClientBody::Login { username, password } => {
            fields.push(tag(if matches!(frame.body, ClientBody::Register { .. }) {
                1
            } else {
                2
            }));
            fields.push(string(B + 4, username, &mut ool));
            fields.push(Field::Vec(B + 12, ool(password, 1), password.len()));
        }
        ClientBody::LoginToken { token } => {
            fields.push(tag(3));
            fields.push(Field::Vec(B + 4, ool(token, 1), token.len()));
        }
        ClientBody::LoginJwt { token } => {
            fields.push(tag(38));
            fields.push(string(B + 4, token, &mut ool));
        }
        ClientBody::Ping { nonce } => {
            fields.push(tag(4));
            fields.push(Field::U64(B + 8, *nonce));
        }
        ClientBody::ResolveUser { username: s }
        | ClientBody::FriendAdd { username: s }
        | ClientBody::GroupCreate { name: s } => {
            fields.push(tag(match frame.body {
                ClientBody::ResolveUser { .. } => 5,
                ClientBody::FriendAdd { .. } => 6,
                _ => 10,
            }));
            fields.push(string(B + 4, s, &mut ool));
        }
        ClientBody::FriendRemove { user: id }
        | ClientBody::GroupJoin { group: id }
        | ClientBody::GroupLeave { group: id }
        | ClientBody::GroupMembers { group: id }
        | ClientBody::UserBlock { user: id }
        | ClientBody::UserUnblock { user: id } => {
            fields.push(tag(match frame.body {
                ClientBody::FriendRemove { .. } => 7,
                ClientBody::GroupJoin { .. } => 11,
                ClientBody::GroupLeave { .. } => 12,
                ClientBody::GroupMembers { .. } => 13,
                ClientBody::UserBlock { .. } => 34,
                _ => 35,
            }));
            fields.push(Field::U64(B + 8, *id));
        }
        ClientBody::FriendList => fields.push(tag(8)),
        ClientBody::SendDirect {
            to: id,
            client_msg_id,
            content,
        }
        | ClientBody::SendGroup {
            group: id,
            client_msg_id,
            content,
        } => {
            fields.push(tag(if matches!(frame.body, ClientBody::SendDirect { .. }) {
                9
            } else {
                14
            }));
            fields.push(Field::U64(B + 8, *id));
            fields.push(Field::U64(B + 16, *client_msg_id));
            fields.extend(content_fields(content, B + 24, &mut ool));
        }
        ClientBody::Sync { cursors } => {
            // An array of 32-byte cursors at alignment 8 (even when empty).
            let mut array = Vec::new();
            for c in cursors {
                array.extend_from_slice(&conv_bytes(&c.conv));
                array.extend_from_slice(&c.seq.to_le_bytes());
            }
            fields.push(tag(15));
            fields.push(Field::Vec(B + 4, ool(&array, 8), cursors.len()));
        }
        ClientBody::Typing { conv } => {
            fields.push(tag(39));
            fields.push(Field::Raw(B + 8, conv_bytes(conv)));
        }
        ClientBody::Receipt { conv, kind, seq } => {
            fields.push(tag(16));
            fields.push(Field::Raw(B + 8, conv_bytes(conv)));
            fields.push(Field::U8(B + 32, *kind as u8));
            fields.push(Field::U64(B + 40, *seq));
        }
        ClientBody::History {
            conv,
            from_seq,
            forward,
            limit,
        } => {
            fields.push(tag(17));
            fields.push(Field::Raw(B + 8, conv_bytes(conv)));
            fields.push(Field::U64(B + 32, *from_seq));
            fields.push(Field::U8(B + 40, u8::from(*forward)));
            fields.push(Field::U32(B + 44, *limit));
        }
        ClientBody::Conversations { offset, limit } => {
            fields.push(tag(18));
            fields.push(Field::U32(B + 4, *offset));
            fields.push(Field::U32(B + 8, *limit));
        }
        ClientBody::Logout => fields.push(tag(19)),
        ClientBody::LogoutOthers => fields.push(tag(40)),
        ClientBody::ChangePassword {
            old_password,
            new_password,
        } => {
            fields.push(tag(20));
            fields.push(Field::Vec(B + 4, ool(old_password, 1), old_password.len()));
            fields.push(Field::Vec(B + 12, ool(new_password, 1), new_password.len()));
        }
        ClientBody::AccountDelete { password } => {
            fields.push(tag(42));
            fields.push(Field::Vec(B + 4, ool(password, 1), password.len()));
        }
        ClientBody::GroupCreateWith { name, open } => {
            fields.push(tag(21));
            fields.push(string(B + 4, name, &mut ool));
            fields.push(Field::U8(B + 12, u8::from(*open)));
        }
        ClientBody::GroupInvite { group, user }
        | ClientBody::GroupKick { group, user }
        | ClientBody::GroupUninvite { group, user }
        | ClientBody::GroupTransferOwnership { group, user }
        | ClientBody::GroupBan { group, user }
        | ClientBody::GroupUnban { group, user } => {
            fields.push(tag(match frame.body {
                ClientBody::GroupInvite { .. } => 22,
                ClientBody::GroupKick { .. } => 23,
                ClientBody::GroupUninvite { .. } => 26,
                ClientBody::GroupTransferOwnership { .. } => 29,
                ClientBody::GroupBan { .. } => 31,
                _ => 32,
            }));
            fields.push(Field::U64(B + 8, *group));
            fields.push(Field::U64(B + 16, *user));
        }
        ClientBody::GroupSetRole { group, user, role } => {
            fields.push(tag(24));
            fields.push(Field::U64(B + 8, *group));
            fields.push(Field::U64(B + 16, *user));
            fields.push(Field::U8(B + 24, *role as u8));
        }
        ClientBody::GroupInfo { group } | ClientBody::GroupDelete { group } => {
            fields.push(tag(if matches!(frame.body, ClientBody::GroupInfo { .. }) {
                25
            } else {
                37
            }));
            fields.push(Field::U64(B + 8, *group));
        }
        ClientBody::MyInvitesPage { after, limit }
        | ClientBody::BlocksPage { after, limit }
        | ClientBody::FriendsPage { after, limit } => {
            fields.push(tag(match frame.body {
                ClientBody::MyInvitesPage { .. } => 30,
                ClientBody::BlocksPage { .. } => 36,
                _ => 43,
            }));
            fields.push(Field::U64(B + 8, *after));
            fields.push(Field::U32(B + 16, *limit));
        }
        ClientBody::FriendRequestsPage {
            incoming,
            after,
            limit,
        } => {
            fields.push(tag(41));
            fields.push(Field::U8(B + 1, u8::from(*incoming)));
            fields.push(Field::U64(B + 8, *after));
            fields.push(Field::U32(B + 16, *limit));
        }
        ClientBody::GroupMembersPage { group, after, limit }
        | ClientBody::GroupInvitesPage { group, after, limit }
        | ClientBody::GroupBansPage { group, after, limit } => {
            fields.push(tag(match frame.body {
                ClientBody::GroupMembersPage { .. } => 27,
                ClientBody::GroupInvitesPage { .. } => 28,
                _ => 33,
            }));
            fields.push(Field::U64(B + 8, *group));
            fields.push(Field::U64(B + 16, *after));
            fields.push(Field::U32(B + 24, *limit));
        }
    }
    // Then the root, 8-aligned, at the very end: zero padding, 72 bytes.
    while !body.len().is_multiple_of(8) {
        body.push(0);
    }
    let root = body.len();
    let mut r = [0u8; 72];
    let rel = |at: usize, target: usize| (target as i64 - (root + at) as i64) as i32;
    for f in fields {
        match f {
            Field::U8(at, v) => r[at] = v,
            Field::U16(at, v) => r[at..at + 2].copy_from_slice(&v.to_le_bytes()),
            Field::U32(at, v) => r[at..at + 4].copy_from_slice(&v.to_le_bytes()),
            Field::Raw(at, v) => r[at..at + v.len()].copy_from_slice(&v),
            Field::U64(at, v) => r[at..at + 8].copy_from_slice(&v.to_le_bytes()),
            Field::Str(at, None, s) => {
                r[at..at + 8].fill(0xff);
                r[at..at + s.len()].copy_from_slice(s.as_bytes());
            }
            Field::Str(at, Some(target), s) => {
                let n = s.len() as u32;
                let len = (n & 0x3f) | 0x80 | ((n & !0x3f) << 2);
                r[at..at + 4].copy_from_slice(&len.to_le_bytes());
                r[at + 4..at + 8].copy_from_slice(&rel(at, target).to_le_bytes());
            }
            Field::Vec(at, target, n) => {
                r[at..at + 4].copy_from_slice(&rel(at, target).to_le_bytes());
                r[at + 4..at + 8].copy_from_slice(&(n as u32).to_le_bytes());
            }
        }
    }
    body.extend_from_slice(&r);
    let mut wire = Vec::new();
    wire.extend_from_slice(&(body.len() as u32).to_le_bytes());
    wire.extend_from_slice(&[0; 4]);
    wire.extend_from_slice(&body);
    while !wire.len().is_multiple_of(8) {
        wire.push(0);
    }
    wire
}

/// Reads a server frame body following `docs/protocol.md` alone.
fn spec_decode_server(body: &[u8]) -> ServerFrame {
    let u8_at = |at: usize| body[at];
    let u16_at = |at: usize| u16::from_le_bytes(body[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
    let target = |at: usize, off_at: usize| {
        (at as i64 + i32::from_le_bytes(body[off_at..off_at + 4].try_into().unwrap()) as i64) as usize
    };
    let string_at = |at: usize| -> String {
        let bytes = if body[at] & 0xc0 != 0x80 {
            let inline = &body[at..at + 8];
            let len = inline.iter().position(|&b| b == 0xff).unwrap_or(8);
            &inline[..len]
        } else {
            let raw = u32_at(at);
            let len = ((raw & 0x3f) | ((raw & !0xff) >> 2)) as usize;
            let start = target(at, at + 4);
            &body[start..start + len]
        };
        String::from_utf8(bytes.to_vec()).unwrap()
    };
    // (start, len) of a vector.
    let vec_at = |at: usize| (target(at, at), u32_at(at + 4) as usize);
    let bytes_at = |at: usize| {
        let (start, len) = vec_at(at);
        body[start..start + len].to_vec()
    };
    let code_at = |at: usize| ErrorCode::ALL[u8_at(at) as usize];
    let conv_at = |at: usize| match u8_at(at) {
        0 => ConvId::Direct {
            low: u64_at(at + 8),
            high: u64_at(at + 16),
        },
        1 => ConvId::Group {
            group: u64_at(at + 8),
        },
        t => panic!("bad ConvId tag {t}"),
    };
    let content_at = |at: usize| Content {
        kind: match u8_at(at) {
            0 => ContentKind::Text,
            1 => ContentKind::Media {
                url: string_at(at + 4),
                mime: string_at(at + 12),
                size: u64_at(at + 24),
            },
            2 => ContentKind::Recall { seq: u64_at(at + 8) },
            3 => ContentKind::Recalled,
            t => panic!("bad ContentKind tag {t}"),
        },
        body: bytes_at(at + 32),
    };
    let message_at = |m: usize| ChatMessage {
        conv: conv_at(m),
        seq: u64_at(m + 24),
        from: u64_at(m + 32),
        client_msg_id: u64_at(m + 40),
        timestamp_ms: u64_at(m + 48),
        content: content_at(m + 56),
    };
    let bool_at = |at: usize| match u8_at(at) {
        0 => false,
        1 => true,
        v => panic!("bad bool {v}"),
    };
    let kind_at = |at: usize| match u8_at(at) {
        0 => ReceiptKind::Delivered,
        1 => ReceiptKind::Read,
        t => panic!("bad ReceiptKind tag {t}"),
    };
    // A `Vec<Friend>`: 24 bytes each, the name at 8, `online` at 16.
    let friends_at = |at: usize| -> Vec<Friend> {
        let (start, len) = vec_at(at);
        (0..len)
            .map(|i| start + 24 * i)
            .map(|f| Friend {
                user: u64_at(f),
                username: string_at(f + 8),
                online: bool_at(f + 16),
            })
            .collect()
    };
    // A `Vec<GroupMember>`: 16 bytes each, the role byte at 8.
    let members_at = |at: usize| -> Vec<GroupMember> {
        let (start, len) = vec_at(at);
        (0..len)
            .map(|i| start + 16 * i)
            .map(|m| GroupMember {
                user: u64_at(m),
                role: match u8_at(m + 8) {
                    0 => GroupRole::Owner,
                    1 => GroupRole::Admin,
                    2 => GroupRole::Member,
                    t => panic!("bad GroupRole tag {t}"),
                },
            })
            .collect()
    };
    let root = body.len() - 112;
    let b = root + 8;
    let reply = match u8_at(b) {
        0 => ServerBody::HelloOk {
            version: u16_at(b + 2),
            max_frame_bytes: u32_at(b + 4),
            idle_timeout_ms: u32_at(b + 8),
        },
        1 => ServerBody::Error {
            code: code_at(b + 1),
            message: string_at(b + 4),
            supported_versions: {
                let (start, len) = vec_at(b + 12);
                (0..len).map(|i| u16_at(start + 2 * i)).collect()
            },
            retry_after_ms: u32_at(b + 20),
        },
        2 => ServerBody::Ok,
        3 => ServerBody::Registered { user: u64_at(b + 8) },
        4 => ServerBody::LoggedIn {
            user: u64_at(b + 8),
            username: string_at(b + 16),
            token: bytes_at(b + 24),
        },
        5 => ServerBody::Pong { nonce: u64_at(b + 8) },
        6 => ServerBody::User {
            user: u64_at(b + 8),
            username: string_at(b + 16),
        },
        7 => ServerBody::Friends {
            friends: friends_at(b + 4),
        },
        8 => ServerBody::Sent {
            client_msg_id: u64_at(b + 8),
            conv: conv_at(b + 16),
            seq: u64_at(b + 40),
            timestamp_ms: u64_at(b + 48),
        },
        9 => ServerBody::GroupCreated { group: u64_at(b + 8) },
        10 => ServerBody::Members {
            group: u64_at(b + 8),
            members: {
                let (start, len) = vec_at(b + 16);
                (0..len).map(|i| u64_at(start + 8 * i)).collect()
            },
        },
        11 => ServerBody::Message(message_at(b + 8)),
        12 => ServerBody::Presence {
            user: u64_at(b + 8),
            online: bool_at(b + 16),
        },
        13 => ServerBody::Disconnect {
            code: code_at(b + 1),
            message: string_at(b + 4),
            retry_after_ms: u32_at(b + 12),
        },
        14 => ServerBody::SyncDone {
            messages: u64_at(b + 8),
        },
        15 => ServerBody::Receipt {
            conv: conv_at(b + 8),
            user: u64_at(b + 32),
            kind: kind_at(b + 40),
            seq: u64_at(b + 48),
        },
        26 => ServerBody::Typing {
            conv: conv_at(b + 8),
            user: u64_at(b + 32),
        },
        16 => ServerBody::HistoryPage {
            conv: conv_at(b + 8),
            messages: {
                let (start, len) = vec_at(b + 32);
                (0..len).map(|i| message_at(start + 96 * i)).collect()
            },
        },
        17 => {
            let (start, len) = vec_at(b + 4);
            ServerBody::Conversations {
                conversations: (0..len)
                    .map(|i| start + 160 * i)
                    .map(|s| ConversationSummary {
                        conv: conv_at(s),
                        last_seq: u64_at(s + 24),
                        unread: u64_at(s + 32),
                        last_message: match u8_at(s + 40) {
                            0 => None,
                            1 => Some(message_at(s + 48)),
                            t => panic!("bad Option tag {t}"),
                        },
                        peer_delivered: u64_at(s + 144),
                        peer_read: u64_at(s + 152),
                    })
                    .collect(),
            }
        }
        18 => ServerBody::GroupInfo {
            group: u64_at(b + 8),
            name: string_at(b + 16),
            open: bool_at(b + 24),
            members: members_at(b + 28),
        },
        19 => ServerBody::MembersPage {
            group: u64_at(b + 8),
            members: members_at(b + 16),
            more: bool_at(b + 24),
        },
        21 => ServerBody::MyInvites {
            groups: {
                let (start, len) = vec_at(b + 4);
                (0..len).map(|i| u64_at(start + 8 * i)).collect()
            },
            more: bool_at(b + 12),
        },
        24 => ServerBody::Blocks {
            users: {
                let (start, len) = vec_at(b + 4);
                (0..len).map(|i| u64_at(start + 8 * i)).collect()
            },
            more: bool_at(b + 12),
        },
        23 => ServerBody::BansPage {
            group: u64_at(b + 8),
            users: {
                let (start, len) = vec_at(b + 16);
                (0..len).map(|i| u64_at(start + 8 * i)).collect()
            },
            more: bool_at(b + 24),
        },
        22 => ServerBody::Invited {
            group: u64_at(b + 8),
            by: u64_at(b + 16),
        },
        25 => ServerBody::GroupDeleted {
            group: u64_at(b + 8),
            by: u64_at(b + 16),
        },
        20 => ServerBody::InvitesPage {
            group: u64_at(b + 8),
            users: {
                let (start, len) = vec_at(b + 16);
                (0..len).map(|i| u64_at(start + 8 * i)).collect()
            },
            more: bool_at(b + 24),
        },
        27 => ServerBody::FriendRequestSent {
            user: u64_at(b + 8),
            username: string_at(b + 16),
        },
        28 => ServerBody::FriendRequests {
            users: friends_at(b + 4),
            more: bool_at(b + 12),
        },
        29 => ServerBody::FriendRequest {
            from: u64_at(b + 8),
            username: string_at(b + 16),
        },
        30 => ServerBody::FriendAccepted {
            by: u64_at(b + 8),
            username: string_at(b + 16),
        },
        31 => ServerBody::FriendsPage {
            friends: friends_at(b + 4),
            more: bool_at(b + 12),
        },
        t => panic!("bad ServerBody tag {t}"),
    };
    ServerFrame {
        request_id: u64_at(root),
        body: reply,
    }
}

// ---------------------------------------------------------------------------
// Arbitrary frames.

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![".{0,10}", ".{0,80}", "[a-z]{0,300}"]
}

fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..16),
        prop::collection::vec(any::<u8>(), 0..300)
    ]
}

fn arb_content() -> impl Strategy<Value = Content> {
    let kind = prop_oneof![
        Just(ContentKind::Text),
        (arb_string(), arb_string(), any::<u64>()).prop_map(|(url, mime, size)| ContentKind::Media {
            url,
            mime,
            size
        }),
        any::<u64>().prop_map(|seq| ContentKind::Recall { seq }),
        Just(ContentKind::Recalled),
    ];
    (kind, arb_bytes()).prop_map(|(kind, body)| Content { kind, body })
}

fn arb_conv() -> impl Strategy<Value = ConvId> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| ConvId::direct(a, b)),
        any::<u64>().prop_map(|group| ConvId::Group { group }),
    ]
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

fn arb_receipt_kind() -> impl Strategy<Value = ReceiptKind> {
    prop_oneof![Just(ReceiptKind::Delivered), Just(ReceiptKind::Read)]
}

fn arb_chat() -> impl Strategy<Value = ChatMessage> {
    (arb_conv(), any::<[u64; 4]>(), arb_content()).prop_map(|(conv, [seq, from, id, ts], content)| {
        ChatMessage {
            conv,
            seq,
            from,
            client_msg_id: id,
            timestamp_ms: ts,
            content,
        }
    })
}

fn arb_summary() -> impl Strategy<Value = ConversationSummary> {
    (arb_conv(), any::<[u64; 4]>(), prop::option::of(arb_chat())).prop_map(
        |(conv, [last_seq, unread, peer_delivered, peer_read], last_message)| ConversationSummary {
            conv,
            last_seq,
            unread,
            last_message,
            peer_delivered,
            peer_read,
        },
    )
}

fn arb_group_role() -> impl Strategy<Value = GroupRole> {
    prop_oneof![
        Just(GroupRole::Owner),
        Just(GroupRole::Admin),
        Just(GroupRole::Member)
    ]
}

fn arb_client_body() -> impl Strategy<Value = ClientBody> {
    prop_oneof![
        (any::<u16>(), arb_string())
            .prop_map(|(version, client_name)| ClientBody::Hello { version, client_name }),
        (arb_string(), arb_bytes())
            .prop_map(|(username, password)| ClientBody::Register { username, password }),
        (arb_string(), arb_bytes()).prop_map(|(username, password)| ClientBody::Login { username, password }),
        arb_bytes().prop_map(|token| ClientBody::LoginToken { token }),
        any::<u64>().prop_map(|nonce| ClientBody::Ping { nonce }),
        arb_string().prop_map(|username| ClientBody::ResolveUser { username }),
        arb_string().prop_map(|username| ClientBody::FriendAdd { username }),
        any::<u64>().prop_map(|user| ClientBody::FriendRemove { user }),
        Just(ClientBody::FriendList),
        (any::<u64>(), any::<u64>(), arb_content()).prop_map(|(to, client_msg_id, content)| {
            ClientBody::SendDirect {
                to,
                client_msg_id,
                content,
            }
        }),
        arb_string().prop_map(|name| ClientBody::GroupCreate { name }),
        any::<u64>().prop_map(|group| ClientBody::GroupJoin { group }),
        any::<u64>().prop_map(|group| ClientBody::GroupLeave { group }),
        any::<u64>().prop_map(|group| ClientBody::GroupMembers { group }),
        (any::<u64>(), any::<u64>(), arb_content()).prop_map(|(group, client_msg_id, content)| {
            ClientBody::SendGroup {
                group,
                client_msg_id,
                content,
            }
        }),
        prop::collection::vec(
            (arb_conv(), any::<u64>()).prop_map(|(conv, seq)| Cursor { conv, seq }),
            0..6
        )
        .prop_map(|cursors| ClientBody::Sync { cursors }),
        (arb_conv(), arb_receipt_kind(), any::<u64>()).prop_map(|(conv, kind, seq)| ClientBody::Receipt {
            conv,
            kind,
            seq
        }),
        (arb_conv(), any::<u64>(), any::<bool>(), any::<u32>()).prop_map(
            |(conv, from_seq, forward, limit)| {
                ClientBody::History {
                    conv,
                    from_seq,
                    forward,
                    limit,
                }
            }
        ),
        (any::<u32>(), any::<u32>()).prop_map(|(offset, limit)| ClientBody::Conversations { offset, limit }),
        Just(ClientBody::Logout),
        (arb_bytes(), arb_bytes()).prop_map(|(old_password, new_password)| ClientBody::ChangePassword {
            old_password,
            new_password
        }),
        (arb_string(), any::<bool>()).prop_map(|(name, open)| ClientBody::GroupCreateWith { name, open }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, user)| ClientBody::GroupInvite { group, user }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, user)| ClientBody::GroupKick { group, user }),
        (any::<u64>(), any::<u64>(), arb_group_role())
            .prop_map(|(group, user, role)| { ClientBody::GroupSetRole { group, user, role } }),
        any::<u64>().prop_map(|group| ClientBody::GroupInfo { group }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, user)| ClientBody::GroupUninvite { group, user }),
        (any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(group, after, limit)| ClientBody::GroupMembersPage { group, after, limit }),
        (any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(group, after, limit)| ClientBody::GroupInvitesPage { group, after, limit }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(group, user)| ClientBody::GroupTransferOwnership { group, user }),
        (any::<u64>(), any::<u32>()).prop_map(|(after, limit)| ClientBody::MyInvitesPage { after, limit }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, user)| ClientBody::GroupBan { group, user }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, user)| ClientBody::GroupUnban { group, user }),
        (any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(group, after, limit)| ClientBody::GroupBansPage { group, after, limit }),
        any::<u64>().prop_map(|user| ClientBody::UserBlock { user }),
        any::<u64>().prop_map(|user| ClientBody::UserUnblock { user }),
        (any::<u64>(), any::<u32>()).prop_map(|(after, limit)| ClientBody::BlocksPage { after, limit }),
        any::<u64>().prop_map(|group| ClientBody::GroupDelete { group }),
        arb_string().prop_map(|token| ClientBody::LoginJwt { token }),
        arb_conv().prop_map(|conv| ClientBody::Typing { conv }),
        Just(ClientBody::LogoutOthers),
        (any::<bool>(), any::<u64>(), any::<u32>()).prop_map(|(incoming, after, limit)| {
            ClientBody::FriendRequestsPage {
                incoming,
                after,
                limit,
            }
        }),
        arb_bytes().prop_map(|password| ClientBody::AccountDelete { password }),
        (any::<u64>(), any::<u32>()).prop_map(|(after, limit)| ClientBody::FriendsPage { after, limit }),
    ]
}

fn arb_server_body() -> impl Strategy<Value = ServerBody> {
    let friend = || {
        (any::<u64>(), arb_string(), any::<bool>()).prop_map(|(user, username, online)| Friend {
            user,
            username,
            online,
        })
    };
    prop_oneof![
        (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(version, max_frame_bytes, idle_timeout_ms)| {
            ServerBody::HelloOk {
                version,
                max_frame_bytes,
                idle_timeout_ms,
            }
        }),
        (
            arb_code(),
            arb_string(),
            prop::collection::vec(any::<u16>(), 0..5),
            any::<u32>()
        )
            .prop_map(
                |(code, message, supported_versions, retry_after_ms)| ServerBody::Error {
                    code,
                    message,
                    supported_versions,
                    retry_after_ms
                }
            ),
        Just(ServerBody::Ok),
        any::<u64>().prop_map(|user| ServerBody::Registered { user }),
        (any::<u64>(), arb_string(), arb_bytes()).prop_map(|(user, username, token)| ServerBody::LoggedIn {
            user,
            username,
            token
        }),
        any::<u64>().prop_map(|nonce| ServerBody::Pong { nonce }),
        (any::<u64>(), arb_string()).prop_map(|(user, username)| ServerBody::User { user, username }),
        prop::collection::vec(friend(), 0..6).prop_map(|friends| ServerBody::Friends { friends }),
        (any::<u64>(), arb_conv(), any::<u64>(), any::<u64>()).prop_map(
            |(client_msg_id, conv, seq, timestamp_ms)| ServerBody::Sent {
                client_msg_id,
                conv,
                seq,
                timestamp_ms
            }
        ),
        any::<u64>().prop_map(|group| ServerBody::GroupCreated { group }),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 0..20))
            .prop_map(|(group, members)| ServerBody::Members { group, members }),
        arb_chat().prop_map(ServerBody::Message),
        (any::<u64>(), any::<bool>()).prop_map(|(user, online)| ServerBody::Presence { user, online }),
        (arb_code(), arb_string(), any::<u32>()).prop_map(|(code, message, retry_after_ms)| {
            ServerBody::Disconnect {
                code,
                message,
                retry_after_ms,
            }
        }),
        any::<u64>().prop_map(|messages| ServerBody::SyncDone { messages }),
        (arb_conv(), any::<u64>(), arb_receipt_kind(), any::<u64>()).prop_map(|(conv, user, kind, seq)| {
            ServerBody::Receipt {
                conv,
                user,
                kind,
                seq,
            }
        }),
        (arb_conv(), prop::collection::vec(arb_chat(), 0..4))
            .prop_map(|(conv, messages)| ServerBody::HistoryPage { conv, messages }),
        (arb_conv(), any::<u64>()).prop_map(|(conv, user)| ServerBody::Typing { conv, user }),
        prop::collection::vec(arb_summary(), 0..4)
            .prop_map(|conversations| ServerBody::Conversations { conversations }),
        (
            any::<u64>(),
            arb_string(),
            any::<bool>(),
            prop::collection::vec(
                (any::<u64>(), arb_group_role()).prop_map(|(user, role)| GroupMember { user, role }),
                0..6
            )
        )
            .prop_map(|(group, name, open, members)| ServerBody::GroupInfo {
                group,
                name,
                open,
                members
            }),
        (
            any::<u64>(),
            prop::collection::vec(
                (any::<u64>(), arb_group_role()).prop_map(|(user, role)| GroupMember { user, role }),
                0..6
            ),
            any::<bool>()
        )
            .prop_map(|(group, members, more)| ServerBody::MembersPage { group, members, more }),
        (
            any::<u64>(),
            prop::collection::vec(any::<u64>(), 0..20),
            any::<bool>()
        )
            .prop_map(|(group, users, more)| ServerBody::InvitesPage { group, users, more }),
        (prop::collection::vec(any::<u64>(), 0..20), any::<bool>())
            .prop_map(|(groups, more)| ServerBody::MyInvites { groups, more }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, by)| ServerBody::Invited { group, by }),
        (
            any::<u64>(),
            prop::collection::vec(any::<u64>(), 0..20),
            any::<bool>()
        )
            .prop_map(|(group, users, more)| ServerBody::BansPage { group, users, more }),
        (prop::collection::vec(any::<u64>(), 0..20), any::<bool>())
            .prop_map(|(users, more)| ServerBody::Blocks { users, more }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, by)| ServerBody::GroupDeleted { group, by }),
        (any::<u64>(), arb_string())
            .prop_map(|(user, username)| ServerBody::FriendRequestSent { user, username }),
        (prop::collection::vec(friend(), 0..6), any::<bool>())
            .prop_map(|(users, more)| ServerBody::FriendRequests { users, more }),
        (any::<u64>(), arb_string())
            .prop_map(|(from, username)| ServerBody::FriendRequest { from, username }),
        (any::<u64>(), arb_string()).prop_map(|(by, username)| ServerBody::FriendAccepted { by, username }),
        (prop::collection::vec(friend(), 0..6), any::<bool>())
            .prop_map(|(friends, more)| ServerBody::FriendsPage { friends, more }),
    ]
}

fn arb_client_frame() -> impl Strategy<Value = ClientFrame> {
    (any::<u64>(), arb_client_body()).prop_map(|(request_id, body)| ClientFrame { request_id, body })
}

fn arb_server_frame() -> impl Strategy<Value = ServerFrame> {
    (any::<u64>(), arb_server_body()).prop_map(|(request_id, body)| ServerFrame { request_id, body })
}

fn arb_chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..200, 1..16)
}

/// Feeds arbitrary bytes to a [`FrameBuf`] and decodes whatever comes out,
/// stopping where a server would close the connection.
fn feed_garbage(wire: &[u8], chunks: &[usize], max: u32) {
    let mut fb = FrameBuf::new(max);
    let mut off = 0;
    let mut i = 0;
    loop {
        loop {
            match fb.next_body() {
                Ok(Some(body)) => {
                    if let Ok(f) = decode_client(body) {
                        let _ = rkyv::deserialize::<ClientFrame, RkyvError>(f);
                    }
                    if let Ok(f) = decode_server(body) {
                        let _ = rkyv::deserialize::<ServerFrame, RkyvError>(f);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if off == wire.len() {
            return;
        }
        let Ok(slot) = fb.read_slot() else { return };
        let n = chunks[i % chunks.len()].min(slot.len()).min(wire.len() - off);
        i += 1;
        slot[..n].copy_from_slice(&wire[off..off + n]);
        fb.commit(n);
        off += n;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn client_frames_roundtrip(frames in prop::collection::vec(arb_client_frame(), 1..6), chunks in arb_chunks()) {
        let mut wire = AlignedVec::new();
        for f in &frames {
            encode_client(f, &mut wire, MAX).unwrap();
        }
        let want: Vec<Frame> = frames.into_iter().map(Frame::Client).collect();
        prop_assert_eq!(decode_stream(&wire, false, &chunks), want);
    }

    #[test]
    fn server_frames_roundtrip(frames in prop::collection::vec(arb_server_frame(), 1..6), chunks in arb_chunks()) {
        let mut wire = AlignedVec::new();
        for f in &frames {
            encode_server(f, &mut wire, MAX).unwrap();
        }
        let want: Vec<Frame> = frames.into_iter().map(Frame::Server).collect();
        prop_assert_eq!(decode_stream(&wire, true, &chunks), want);
    }

    #[test]
    fn spec_encoder_matches_rkyv(frame in arb_client_frame()) {
        let wire = encode(&Frame::Client(frame.clone()));
        prop_assert_eq!(hex::encode(spec_encode_client(&frame)), hex::encode(&wire));
    }

    #[test]
    fn spec_decoder_matches_rkyv(frame in arb_server_frame()) {
        let wire = encode(&Frame::Server(frame.clone()));
        prop_assert_eq!(spec_decode_server(body_of(&wire)), frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic(wire in prop::collection::vec(any::<u8>(), 0..600), chunks in arb_chunks()) {
        feed_garbage(&wire, &chunks, 1024);
    }

    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..300), chunks in arb_chunks()) {
        // A valid header in front, so the garbage reaches the decoders.
        let mut wire = (body.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&[0; 4]);
        wire.extend_from_slice(&body);
        wire.resize(wire.len().div_ceil(8) * 8, 0);
        feed_garbage(&wire, &chunks, 1024);
    }

    #[test]
    fn corrupted_frames_never_panic(
        frame in arb_server_frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        chunks in arb_chunks(),
    ) {
        let mut wire = encode(&Frame::Server(frame));
        for (at, byte) in flips {
            // Leave the header alone so the corruption reaches the decoders.
            let len = wire.len() - 8;
            wire[8 + at.index(len)] = byte;
        }
        feed_garbage(&wire, &chunks, MAX);
    }
}

// ---------------------------------------------------------------------------
// The worked examples of the placement section.

#[test]
fn placement_examples() {
    assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
    assert_eq!(shard_of(1, 4), 1);
    assert_eq!(mix64(42), 0xa759_ea27_d472_7622);
    assert_eq!(shard_of(42, 4), 2);
    assert_eq!(shard_of(42, 0), 0);
    let conv = ConvId::direct(2, 1);
    assert_eq!(conv, ConvId::Direct { low: 1, high: 2 });
    assert_eq!(mix64(2), 0xdbd2_3897_3a2b_148a);
    assert_eq!(mix64(1 ^ mix64(2)), 0x3ec2_d42f_3a45_cc6e, "even: low");
    assert_eq!(conv.placement_key(), 1);
    assert_eq!(shard_of(conv.placement_key(), 4), 1);
    assert_eq!(shard_of(conv.placement_key(), 8), 5);
    let odd = ConvId::direct(2, 5);
    assert_eq!(mix64(5), 0xb6bf_613d_bebb_45dc);
    assert_eq!(mix64(2 ^ mix64(5)), 0xa46d_6f3a_3f3f_3e99, "odd: high");
    assert_eq!(odd.placement_key(), 5);
    assert_eq!(shard_of(odd.placement_key(), 4), 0);
    assert_eq!(ConvId::Group { group: 9 }.placement_key(), 9);
    assert_eq!(mix64(9), 0x826c_6abf_7fdd_5ad7);
    assert_eq!(shard_of(9, 4), 3);
}

// ---------------------------------------------------------------------------
// What the validating decoder accepts, as the document's rules for other
// encoders state.

fn aligned(bytes: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::new();
    v.extend_from_slice(bytes);
    v
}

#[test]
fn decoder_rules_for_other_encoders() {
    let login = ClientFrame {
        request_id: 3,
        body: ClientBody::Login {
            username: "bob_the_builder".into(),
            password: b"hunter22".to_vec(),
        },
    };
    let wire = encode(&Frame::Client(login.clone()));
    let body = body_of(&wire).to_vec();
    assert!(decode_client(&aligned(&body)).is_ok());

    // Unreferenced bytes in front of the data are allowed...
    let mut front = vec![0xee; 8];
    front.extend_from_slice(&body);
    let front = aligned(&front);
    let decoded = decode_client(&front).unwrap();
    assert_eq!(
        rkyv::deserialize::<ClientFrame, RkyvError>(decoded).unwrap(),
        login
    );
    // ...but the root must be 8-aligned, which here it is no longer.
    let mut shifted = vec![0];
    shifted.extend_from_slice(&body);
    assert!(decode_client(&aligned(&shifted)).is_err());
    // Bytes after the root are not allowed (the root is found from the end).
    let mut tail = body.clone();
    tail.extend_from_slice(&[0; 8]);
    assert!(decode_client(&aligned(&tail)).is_err());

    // Out-of-line data must appear in field order: password before username
    // is refused although every pointer is in bounds.
    let mut swapped = b"hunter22".to_vec();
    swapped.extend_from_slice(b"bob_the_builder");
    swapped.push(0); // pad 23 -> 24
    let root = swapped.len();
    let mut r = [0u8; 72];
    r[0] = 3;
    r[8] = 2; // Login
    r[12..16].copy_from_slice(&(0x80u32 | 15).to_le_bytes());
    r[16..20].copy_from_slice(&(8 - (root as i32 + 12)).to_le_bytes());
    r[20..24].copy_from_slice(&(-(root as i32 + 20)).to_le_bytes());
    r[24..28].copy_from_slice(&8u32.to_le_bytes());
    swapped.extend_from_slice(&r);
    assert!(
        decode_client(&aligned(&swapped)).is_err(),
        "out-of-order data must be refused"
    );

    // Two fields may not share bytes.
    let mut shared = b"bob_the_builder\0".to_vec();
    let root = shared.len();
    let mut r = [0u8; 72];
    r[8] = 2;
    r[12..16].copy_from_slice(&(0x80u32 | 15).to_le_bytes());
    r[16..20].copy_from_slice(&(-(root as i32 + 12)).to_le_bytes());
    r[20..24].copy_from_slice(&(-(root as i32 + 20)).to_le_bytes());
    r[24..28].copy_from_slice(&8u32.to_le_bytes());
    shared.extend_from_slice(&r);
    assert!(
        decode_client(&aligned(&shared)).is_err(),
        "overlapping data must be refused"
    );

    let root = body.len() - 72;
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = body.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        decode_client(&aligned(&b)).map(|_| ())
    };
    // Unknown variant tag (0..=20 are declared).
    assert!(patched(root + 8, &[21]).is_err());
    // Bytes of the body enum past the variant's fields are not checked.
    assert!(patched(root + 8 + 40, &[0xaa; 8]).is_ok());
    // An out-of-line string of 8 bytes or fewer is refused.
    assert!(patched(root + 12, &[0x88]).is_err());
    // Invalid UTF-8 in a string is refused.
    assert!(patched(0, &[0xc3, 0x28]).is_err());
    // A pointer out of the buffer is refused.
    assert!(patched(root + 20, &(-1000i32).to_le_bytes()).is_err());
    // After an inline string's 0xff terminator nothing is checked.
    let hello = encode(&client(
        1,
        ClientBody::Hello {
            version: 1,
            client_name: "ab".into(),
        },
    ));
    let mut h = body_of(&hello).to_vec();
    assert_eq!(&h[12..20], &[b'a', b'b', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    h[15] = 0x00;
    let h = aligned(&h);
    let decoded = decode_client(&h).unwrap();
    let ArchivedClientBody::Hello { client_name, .. } = &decoded.body else {
        panic!()
    };
    assert_eq!(client_name.as_str(), "ab");

    // bool: only 0 and 1.
    let presence = encode(&server(
        0,
        ServerBody::Presence {
            user: 2,
            online: true,
        },
    ));
    let mut p = body_of(&presence).to_vec();
    p[8 + 16] = 2;
    assert!(decode_server(&aligned(&p)).is_err());
    // ErrorCode: only 0..=16.
    let disconnect = encode(&server(
        0,
        ServerBody::Disconnect {
            code: ErrorCode::Internal,
            message: String::new(),
            retry_after_ms: 0,
        },
    ));
    let mut d = body_of(&disconnect).to_vec();
    let r = d.len() - 112;
    d[r + 9] = 17;
    assert!(decode_server(&aligned(&d)).is_err());

    // ReceiptKind: only 0 and 1 (Receipt push: kind at ServerBody 40).
    let receipt = encode(&server(
        0,
        ServerBody::Receipt {
            conv: ConvId::Group { group: 1 },
            user: 2,
            kind: ReceiptKind::Read,
            seq: 3,
        },
    ));
    let mut k = body_of(&receipt).to_vec();
    let r = k.len() - 112;
    k[r + 8 + 40] = 2;
    assert!(decode_server(&aligned(&k)).is_err());

    // History.forward is a bool: only 0 and 1 (ClientBody offset 40).
    let history = encode(&client(
        1,
        ClientBody::History {
            conv: ConvId::Group { group: 1 },
            from_seq: 1,
            forward: true,
            limit: 10,
        },
    ));
    let mut h = body_of(&history).to_vec();
    h[8 + 40] = 2;
    assert!(decode_client(&aligned(&h)).is_err());

    // Option: only tags 0 (None) and 1 (Some); summary at body offset 0,
    // its last_message tag at 40.
    let conversations = encode(&server(
        1,
        ServerBody::Conversations {
            conversations: vec![ConversationSummary {
                conv: ConvId::Group { group: 1 },
                last_seq: 0,
                unread: 0,
                last_message: None,
                peer_delivered: 0,
                peer_read: 0,
            }],
        },
    ));
    let mut c = body_of(&conversations).to_vec();
    assert!(decode_server(&aligned(&c)).is_ok());
    c[40] = 2;
    assert!(decode_server(&aligned(&c)).is_err());

    // GroupRole: only 0 (Owner), 1 (Admin) and 2 (Member); GroupSetRole's
    // role at ClientBody offset 24.
    let set_role = encode(&client(
        1,
        ClientBody::GroupSetRole {
            group: 1,
            user: 2,
            role: GroupRole::Member,
        },
    ));
    let mut r = body_of(&set_role).to_vec();
    assert!(decode_client(&aligned(&r)).is_ok());
    r[8 + 24] = 3;
    assert!(decode_client(&aligned(&r)).is_err());
}
