//! The properties that hostile input must never break in `tern-proto`,
//! written once and driven three ways: by the cargo-fuzz targets
//! (`proto/fuzz/fuzz_targets`), by `proto/tests/corpus.rs` over every saved
//! input of `proto/tests/corpus/` (so plain `cargo test` replays what the
//! fuzzer found), and by the proptests in that same file.
//!
//! [`check_frame_decoder`] cuts an arbitrary byte stream into frames through
//! [`FrameBuf`] in input-chosen read sizes, as a shard does, and checks that
//! it cuts exactly where the headers say, that every body is 8-aligned and
//! within the limit, that decoding never panics and that whatever decodes
//! survives a re-encode, and that the receive buffer never holds more than
//! one frame plus one read. [`check_session`] runs a sequence of client
//! frames through [`Session::admit`] with the phase changes a server makes,
//! and compares every decision with an independent model of
//! `docs/protocol.md` sections 6.1 and 6.2. The input formats are private to
//! this file; the corpus must be regenerated if they change.
#![allow(dead_code)] // each fuzz target and test uses part of it

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tern_proto::limits::{
    ABSOLUTE_MAX_FRAME_BYTES, CLIENT_NAME_LEN_MAX, GROUP_NAME_LEN_MAX, JWT_LEN_MAX, MEDIA_MIME_LEN_MAX,
    MEDIA_URL_LEN_MAX, PASSWORD_LEN_MAX, PASSWORD_LEN_MIN, SYNC_CURSORS_MAX, TOKEN_LEN, USERNAME_LEN_MAX,
    USERNAME_LEN_MIN,
};
use tern_proto::session::{ContentLimits, Phase, Session};
use tern_proto::{
    decode_client, decode_server, encode_client, encode_server, ClientBody, ClientFrame, Content,
    ContentKind, ConvId, Cursor, ErrorCode, FrameBuf, FrameError, GroupRole, ReceiptKind, ServerFrame,
    HEADER_LEN, SUPPORTED_VERSIONS,
};

// ---------------------------------------------------------------------------
// Memory accounting

/// Counts the bytes each thread has allocated and not freed, so a check can
/// see the receive buffer's real footprint (capacity, not length) from
/// outside. Per thread, because the test harness runs checks in parallel.
pub struct CountingAlloc;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: allocations during thread teardown are simply not counted.
    let _ = LIVE_BYTES.try_with(|live| live.set(live.get() + delta));
}

fn live_bytes() -> isize {
    LIVE_BYTES.try_with(Cell::get).unwrap_or(0)
}

// SAFETY: every call is forwarded to `System` unchanged; the counter is a
// `const`-initialised thread-local `Cell` that never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            track(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            track(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// Frame decoder

/// Body limits the decoder check picks from (first input byte).
pub const FRAME_MAX_BODIES: [u32; 5] = [16, 256, 1024, 4096, 64 * 1024];
/// The largest read `FrameBuf` offers beyond the frame in flight
/// (`BUSY_READ_BYTES` in `proto/src/frame.rs`).
const BUSY_READ_BYTES: usize = 16 * 1024;

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// The most heap a `FrameBuf` limited to `max_body` may hold: one whole
/// frame plus one busy read, rounded up to the power of two that rkyv's
/// `AlignedVec` allocates.
pub fn frame_buf_bound(max_body: u32) -> usize {
    (HEADER_LEN + padded(max_body as usize) + BUSY_READ_BYTES).next_power_of_two()
}

/// Read sizes chosen by input: a tiny PRNG seeded from the input picks each
/// read's size within a scale that is itself chosen by the input.
struct Reads {
    state: u32,
    scale: u8,
}

impl Reads {
    fn new(seed: u8) -> Reads {
        Reads {
            state: u32::from(seed).wrapping_mul(0x9E37_79B9) | 1,
            scale: seed % 6,
        }
    }

    /// The next read size; `usize::MAX` means "as much as the slot takes",
    /// which is what a busy socket does.
    fn next(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        let r = self.state as usize;
        match self.scale {
            0 => 1,
            1 => 1 + r % 8,
            2 => 1 + r % 64,
            3 => 1 + r % 4096,
            4 => usize::MAX,
            _ if r.is_multiple_of(3) => usize::MAX,
            _ => 1 + r % 512,
        }
    }
}

/// Input: `[mode, read_seed, stream...]`. `mode` picks the body limit and
/// whether the buffered bytes are handed to a fresh `FrameBuf` (as a shard
/// does when a connection moves to its home shard) after every frame.
/// Panics if any property breaks; returns how many bodies decoded as
/// client frames.
pub fn check_frame_decoder(data: &[u8]) -> usize {
    let [mode, read_seed, stream @ ..] = data else {
        return 0;
    };
    let max_body = FRAME_MAX_BODIES[usize::from(mode & 0x7f) % FRAME_MAX_BODIES.len()];
    let hand_over = mode & 0x80 != 0;
    let bound = frame_buf_bound(max_body) as isize;
    let mut reads = Reads::new(*read_seed);
    let baseline = live_bytes();
    let mut buf = FrameBuf::new(max_body);
    let mut sent = 0;
    // Where the next frame starts in `stream`, by the headers' own account.
    let mut next_frame = 0;
    let mut decoded = 0;
    while sent < stream.len() {
        let slot = match buf.read_slot() {
            Ok(slot) => slot,
            Err(e) => {
                refused_for_good(&mut buf, stream, next_frame, max_body, &e);
                return decoded;
            }
        };
        assert!(!slot.is_empty(), "read_slot handed out an empty slot");
        let n = reads.next().min(slot.len()).min(stream.len() - sent);
        slot[..n].copy_from_slice(&stream[sent..sent + n]);
        buf.commit(n);
        sent += n;
        let held = live_bytes() - baseline;
        assert!(
            held <= bound,
            "FrameBuf(max_body {max_body}) holds {held} bytes, over its bound of {bound}"
        );
        loop {
            let body = match buf.next_body() {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(e) => {
                    refused_for_good(&mut buf, stream, next_frame, max_body, &e);
                    return decoded;
                }
            };
            let body_len = header_at(stream, next_frame).0 as usize;
            let expected = &stream[next_frame + HEADER_LEN..next_frame + HEADER_LEN + body_len];
            assert_eq!(
                body, expected,
                "body cut at the wrong place (frame at {next_frame})"
            );
            assert_eq!(body.as_ptr() as usize % 8, 0, "body not 8-aligned");
            assert!(body.len() <= max_body as usize);
            next_frame += HEADER_LEN + padded(body_len);
            decoded += usize::from(check_body(body));
            if hand_over {
                let rest = buf.take_buffered();
                assert_eq!(
                    &rest[..],
                    &stream[next_frame..sent],
                    "take_buffered lost or added bytes"
                );
                buf = FrameBuf::new(max_body);
                buf.push_bytes(&rest);
            }
        }
        assert_eq!(
            buf.buffered(),
            sent - next_frame,
            "buffered bytes disagree with the stream"
        );
    }
    decoded
}

fn header_at(stream: &[u8], at: usize) -> (u32, u32) {
    let word = |i: usize| u32::from_le_bytes([stream[i], stream[i + 1], stream[i + 2], stream[i + 3]]);
    (word(at), word(at + 4))
}

/// A refused header must be the one at `next_frame`, refused for the right
/// reason, and refused again on every later call (the connection closes).
fn refused_for_good(buf: &mut FrameBuf, stream: &[u8], next_frame: usize, max_body: u32, e: &FrameError) {
    let (len, flags) = header_at(stream, next_frame);
    let expected = if flags != 0 {
        FrameError::ReservedFlags(flags)
    } else {
        FrameError::TooLarge { len, max: max_body }
    };
    assert_eq!(
        *e, expected,
        "refused the header at {next_frame} for the wrong reason"
    );
    assert!(len > max_body || flags != 0, "a valid header was refused: {e}");
    assert!(
        buf.read_slot().is_err(),
        "read_slot succeeded after a refused header"
    );
    assert!(
        buf.next_body().is_err(),
        "next_body succeeded after a refused header"
    );
}

/// Decodes `body` both ways; whatever validates must deserialise and
/// survive an encode/decode round trip unchanged. Returns whether it was
/// a client frame.
pub fn check_body(body: &[u8]) -> bool {
    let client = decode_client(body).ok();
    if let Some(archived) = client {
        let frame = rkyv::deserialize::<ClientFrame, BoxedError>(archived)
            .unwrap_or_else(|e| panic!("a validated client archive failed to deserialise: {e}"));
        assert_eq!(roundtrip_client(&frame), frame);
    }
    if let Ok(archived) = decode_server(body) {
        let frame = rkyv::deserialize::<ServerFrame, BoxedError>(archived)
            .unwrap_or_else(|e| panic!("a validated server archive failed to deserialise: {e}"));
        let mut out = AlignedVec::new();
        encode_server(&frame, &mut out, ABSOLUTE_MAX_FRAME_BYTES).expect("re-encode server frame");
        let again = decode_server(&out[HEADER_LEN..]).expect("re-encoded server frame decodes");
        let again = rkyv::deserialize::<ServerFrame, BoxedError>(again).expect("deserialise again");
        assert_eq!(again, frame);
    }
    client.is_some()
}

fn roundtrip_client(frame: &ClientFrame) -> ClientFrame {
    let mut out = AlignedVec::new();
    encode_client(frame, &mut out, ABSOLUTE_MAX_FRAME_BYTES).expect("re-encode client frame");
    let body_len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) as usize;
    let archived =
        decode_client(&out[HEADER_LEN..HEADER_LEN + body_len]).expect("re-encoded client frame decodes");
    rkyv::deserialize::<ClientFrame, BoxedError>(archived).expect("deserialise again")
}

/// Concatenated frames, ready to be prefixed with `[mode, read_seed]`.
pub fn encode_stream(frames: &[ClientFrame]) -> Vec<u8> {
    let mut out = AlignedVec::new();
    for frame in frames {
        encode_client(frame, &mut out, ABSOLUTE_MAX_FRAME_BYTES).expect("encode seed frame");
    }
    out.to_vec()
}

// ---------------------------------------------------------------------------
// Session state machine

/// A cursor over the fuzz input; reads past the end yield zeros, so every
/// input is a valid program.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Input<'a> {
        Input { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.bytes.len());
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u64(&mut self) -> u64 {
        let mut word = [0u8; 8];
        let bytes = self.take(8);
        word[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(word)
    }

    /// A small id, often 0, 1 or 2, sometimes anything.
    fn id(&mut self) -> u64 {
        match self.u8() {
            b @ 0..=0xef => u64::from(b % 4),
            _ => self.u64(),
        }
    }

    /// A length, usually at or beside one of the protocol's limits.
    fn len(&mut self) -> usize {
        const EDGES: [usize; 16] = [0, 1, 2, 3, 7, 8, 31, 32, 33, 64, 65, 128, 129, 256, 257, 2049];
        match self.u8() {
            b @ 0..=0x7f => usize::from(b % 40),
            b @ 0x80..=0xfd => EDGES[usize::from(b) % EDGES.len()],
            0xfe => 2048,
            0xff => 4097,
        }
    }

    fn bytes(&mut self) -> Vec<u8> {
        let n = self.len();
        let fill = self.u8();
        vec![fill; n]
    }

    /// A string of a chosen length from a chosen alphabet, with a chosen
    /// first character, so names both valid and invalid come up often.
    fn text(&mut self) -> String {
        const CHARS: [char; 12] = ['a', 'z', '0', '9', '_', '.', '-', 'A', ' ', '\n', 'é', '\u{7f}'];
        let n = self.len();
        let first = CHARS[usize::from(self.u8()) % CHARS.len()];
        let rest = CHARS[usize::from(self.u8()) % CHARS.len()];
        std::iter::once(first)
            .chain(std::iter::repeat(rest))
            .take(n)
            .collect()
    }

    fn conv(&mut self) -> ConvId {
        if self.u8() & 1 == 0 {
            ConvId::direct(self.id(), self.id())
        } else {
            ConvId::Group { group: self.id() }
        }
    }

    fn content(&mut self) -> Content {
        let kind = match self.u8() % 6 {
            0 | 1 => ContentKind::Text,
            2 | 3 => ContentKind::Media {
                url: self.text(),
                mime: self.text(),
                size: self.u64(),
            },
            4 => ContentKind::Recall { seq: self.u64() % 3 },
            _ => ContentKind::Recalled,
        };
        Content {
            kind,
            body: self.bytes(),
        }
    }

    /// One client request, any variant, with fields near their limits.
    pub fn body(&mut self) -> ClientBody {
        match self.u8() % 43 {
            0 => ClientBody::Hello {
                version: match self.u8() % 5 {
                    0 | 1 => 1,
                    2 => 0,
                    3 => 2,
                    _ => u16::from_le_bytes([self.u8(), self.u8()]),
                },
                client_name: self.text(),
            },
            1 => ClientBody::Register {
                username: self.text(),
                password: self.bytes(),
            },
            2 => ClientBody::Login {
                username: self.text(),
                password: self.bytes(),
            },
            3 => ClientBody::LoginToken { token: self.bytes() },
            4 => ClientBody::Ping { nonce: self.u64() },
            5 => ClientBody::ResolveUser {
                username: self.text(),
            },
            6 => ClientBody::FriendAdd {
                username: self.text(),
            },
            7 => ClientBody::FriendRemove { user: self.id() },
            8 => ClientBody::FriendList,
            9 => ClientBody::SendDirect {
                to: self.id(),
                client_msg_id: self.u64(),
                content: self.content(),
            },
            10 => ClientBody::GroupCreate { name: self.text() },
            11 => ClientBody::GroupJoin { group: self.id() },
            12 => ClientBody::GroupLeave { group: self.id() },
            13 => ClientBody::GroupMembers { group: self.id() },
            14 => ClientBody::SendGroup {
                group: self.id(),
                client_msg_id: self.u64(),
                content: self.content(),
            },
            15 => {
                let n = self.len();
                let cursor = Cursor {
                    conv: self.conv(),
                    seq: self.id(),
                };
                ClientBody::Sync {
                    cursors: vec![cursor; n],
                }
            }
            16 => ClientBody::Receipt {
                conv: self.conv(),
                kind: if self.u8() & 1 == 0 {
                    ReceiptKind::Delivered
                } else {
                    ReceiptKind::Read
                },
                seq: self.id(),
            },
            17 => ClientBody::History {
                conv: self.conv(),
                from_seq: self.id(),
                forward: self.u8() & 1 == 0,
                limit: self.u8().into(),
            },
            18 => ClientBody::Conversations {
                offset: self.u8().into(),
                limit: self.u8().into(),
            },
            19 => ClientBody::Logout,
            20 => ClientBody::ChangePassword {
                old_password: self.bytes(),
                new_password: self.bytes(),
            },
            21 => ClientBody::GroupCreateWith {
                name: self.text(),
                open: self.u8() & 1 == 0,
            },
            22 => ClientBody::GroupInvite {
                group: self.id(),
                user: self.id(),
            },
            23 => ClientBody::GroupKick {
                group: self.id(),
                user: self.id(),
            },
            24 => ClientBody::GroupSetRole {
                group: self.id(),
                user: self.id(),
                role: match self.u8() % 3 {
                    0 => GroupRole::Owner,
                    1 => GroupRole::Admin,
                    _ => GroupRole::Member,
                },
            },
            25 => ClientBody::GroupInfo { group: self.id() },
            26 => ClientBody::GroupUninvite {
                group: self.id(),
                user: self.id(),
            },
            27 => ClientBody::GroupMembersPage {
                group: self.id(),
                after: self.id(),
                limit: self.u64() as u32,
            },
            28 => ClientBody::GroupInvitesPage {
                group: self.id(),
                after: self.id(),
                limit: self.u64() as u32,
            },
            29 => ClientBody::GroupTransferOwnership {
                group: self.id(),
                user: self.id(),
            },
            30 => ClientBody::MyInvitesPage {
                after: self.id(),
                limit: self.u64() as u32,
            },
            31 => ClientBody::GroupBan {
                group: self.id(),
                user: self.id(),
            },
            32 => ClientBody::GroupUnban {
                group: self.id(),
                user: self.id(),
            },
            33 => ClientBody::GroupBansPage {
                group: self.id(),
                after: self.id(),
                limit: self.u64() as u32,
            },
            34 => ClientBody::UserBlock { user: self.id() },
            35 => ClientBody::UserUnblock { user: self.id() },
            36 => ClientBody::BlocksPage {
                after: self.id(),
                limit: self.u64() as u32,
            },
            37 => ClientBody::GroupDelete { group: self.id() },
            38 => ClientBody::LoginJwt { token: self.text() },
            39 => ClientBody::Typing { conv: self.conv() },
            40 => ClientBody::LogoutOthers,
            41 => ClientBody::FriendRequestsPage {
                incoming: self.u8() & 1 == 1,
                after: self.id(),
                limit: self.u64() as u32,
            },
            _ => ClientBody::AccountDelete {
                password: self.bytes(),
            },
        }
    }
}

/// What the protocol document says `admit` must answer.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Admit,
    Refuse { code: ErrorCode, close: bool },
}

use Verdict::{Admit, Refuse};

fn keep(code: ErrorCode) -> Verdict {
    Refuse { code, close: false }
}

fn valid_username(name: &str) -> bool {
    let b = name.as_bytes();
    (USERNAME_LEN_MIN..=USERNAME_LEN_MAX).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(c))
}

fn valid_password(password: &[u8]) -> bool {
    (PASSWORD_LEN_MIN..=PASSWORD_LEN_MAX).contains(&password.len())
}

fn content_verdict(content: &Content, limits: ContentLimits) -> Verdict {
    let media_ok = match &content.kind {
        ContentKind::Text => true,
        ContentKind::Media { url, mime, .. } => {
            (1..=MEDIA_URL_LEN_MAX).contains(&url.len())
                && (1..=MEDIA_MIME_LEN_MAX).contains(&mime.len())
                && content.body.len() + url.len() + mime.len() <= limits.total
        }
        ContentKind::Recall { seq } => *seq != 0 && content.body.is_empty(),
        ContentKind::Recalled => false,
    };
    if content.body.len() <= limits.body && media_ok {
        Admit
    } else {
        keep(ErrorCode::InvalidArgument)
    }
}

fn admit_if(ok: bool) -> Verdict {
    if ok {
        Admit
    } else {
        keep(ErrorCode::InvalidArgument)
    }
}

/// docs/protocol.md 6.1 and 6.2, written out independently of `admit`.
/// `None` for a request this model does not know (added after it).
fn expected(phase: Phase, body: &ClientBody, limits: ContentLimits) -> Option<Verdict> {
    use ClientBody as B;
    let pre_login = matches!(
        body,
        B::Ping { .. } | B::Register { .. } | B::Login { .. } | B::LoginToken { .. } | B::LoginJwt { .. }
    );
    Some(match (phase, body) {
        (Phase::AwaitingHello, B::Hello { version, client_name }) => {
            if !SUPPORTED_VERSIONS.contains(version) {
                Refuse {
                    code: ErrorCode::UnsupportedVersion,
                    close: true,
                }
            } else if client_name.len() > CLIENT_NAME_LEN_MAX {
                Refuse {
                    code: ErrorCode::InvalidArgument,
                    close: true,
                }
            } else {
                Admit
            }
        }
        (Phase::AwaitingHello, _) => Refuse {
            code: ErrorCode::InvalidState,
            close: true,
        },
        (_, B::Hello { .. }) => keep(ErrorCode::InvalidState),
        (_, B::Ping { .. }) => Admit,
        (Phase::Anonymous, B::Register { username, password } | B::Login { username, password }) => {
            admit_if(valid_username(username) && valid_password(password))
        }
        (Phase::Anonymous, B::LoginToken { token }) => admit_if(token.len() == TOKEN_LEN),
        (Phase::Anonymous, B::LoginJwt { token }) => {
            admit_if(!token.is_empty() && token.len() <= JWT_LEN_MAX)
        }
        (Phase::Anonymous, _) if !pre_login => keep(ErrorCode::InvalidState),
        (Phase::Authenticated(_), _) if pre_login => keep(ErrorCode::InvalidState),
        (Phase::Authenticated(_), B::ResolveUser { username } | B::FriendAdd { username }) => {
            admit_if(valid_username(username))
        }
        (Phase::Authenticated(_), B::GroupCreate { name } | B::GroupCreateWith { name, .. }) => admit_if(
            !name.is_empty() && name.len() <= GROUP_NAME_LEN_MAX && !name.chars().any(char::is_control),
        ),
        (Phase::Authenticated(_), B::SendDirect { to: 0, .. }) => keep(ErrorCode::InvalidArgument),
        (Phase::Authenticated(_), B::SendDirect { content, .. } | B::SendGroup { content, .. }) => {
            content_verdict(content, limits)
        }
        (Phase::Authenticated(_), B::Sync { cursors }) => admit_if(cursors.len() <= SYNC_CURSORS_MAX),
        (Phase::Authenticated(_), B::Receipt { seq, .. }) => admit_if(*seq != 0),
        (
            Phase::Authenticated(_),
            B::FriendRemove { .. }
            | B::FriendList
            | B::GroupJoin { .. }
            | B::GroupLeave { .. }
            | B::GroupMembers { .. }
            | B::History { .. }
            | B::Conversations { .. },
        ) => Admit,
        (
            Phase::Authenticated(_),
            B::GroupSetRole {
                role: GroupRole::Owner,
                ..
            },
        ) => keep(ErrorCode::InvalidArgument),
        (
            Phase::Authenticated(_),
            B::ChangePassword {
                old_password,
                new_password,
            },
        ) => admit_if(valid_password(old_password) && valid_password(new_password)),
        // Only the upper bound: an account without a password has its
        // own answer, from the server.
        (Phase::Authenticated(_), B::AccountDelete { password }) => {
            admit_if(password.len() <= PASSWORD_LEN_MAX)
        }
        (
            Phase::Authenticated(_),
            B::GroupSetRole { .. }
            | B::GroupInvite { .. }
            | B::GroupUninvite { .. }
            | B::GroupKick { .. }
            | B::GroupInfo { .. }
            | B::GroupMembersPage { .. }
            | B::GroupInvitesPage { .. }
            | B::GroupTransferOwnership { .. }
            | B::MyInvitesPage { .. }
            | B::GroupBan { .. }
            | B::GroupUnban { .. }
            | B::GroupBansPage { .. }
            | B::UserBlock { .. }
            | B::UserUnblock { .. }
            | B::BlocksPage { .. }
            | B::FriendRequestsPage { .. }
            | B::GroupDelete { .. }
            | B::Typing { .. }
            | B::Logout
            | B::LogoutOthers,
        ) => Admit,
        #[allow(unreachable_patterns)] // requests added after this model
        _ => return None,
    })
}

/// Message-body limits the session check picks from.
pub const SESSION_MAX_MESSAGE_BYTES: [usize; 3] = [0, 16, 16 * 1024];

/// How much more than the body the content as a whole (body, media URL,
/// MIME type) may hold in the session check: less than a full-size URL,
/// so both limits are reached.
pub const SESSION_CONTENT_EXTRA_BYTES: usize = 64;

/// Input: `[setup, then per frame: clock, kind, ...]`. `setup` picks the
/// message limit and whether the session starts fresh or already
/// authenticated (handed over from another shard). Each frame is either
/// generated ([`Input::body`]) and sent through encode and decode, or raw
/// bytes taken as a body. After an admitted Hello the server accepts it;
/// after an admitted Login or LoginToken the input decides whether the
/// credentials were right. Panics if `admit` disagrees with the protocol
/// document or the session's own bookkeeping goes wrong.
pub fn check_session(data: &[u8]) -> SessionRun {
    let mut run = SessionRun::default();
    let mut input = Input::new(data);
    let setup = input.u8();
    let max_message_bytes = SESSION_MAX_MESSAGE_BYTES[usize::from(setup) % SESSION_MAX_MESSAGE_BYTES.len()];
    let idle_timeout_ms = 1_000 + u64::from(setup >> 4) * 60_000;
    let mut now_ms: u64 = 1_000_000;
    let limits = ContentLimits {
        body: max_message_bytes,
        total: max_message_bytes + SESSION_CONTENT_EXTRA_BYTES,
    };
    let mut session = if setup & 0x08 != 0 {
        Session::authenticated(7, now_ms, idle_timeout_ms, limits)
    } else {
        Session::new(now_ms, idle_timeout_ms, limits)
    };
    let mut latest_ms = now_ms;
    let mut hellos_accepted = 0;
    for _ in 0..256 {
        if input.is_empty() {
            return run;
        }
        // Clocks on different shards may disagree a little: time mostly
        // moves on, sometimes steps back.
        match input.u8() {
            b @ 0..=0xbf => now_ms += u64::from(b) * 50,
            b => now_ms = now_ms.saturating_sub(u64::from(b & 0x3f) * 10),
        }
        let kind = input.u8();
        let mut wire = AlignedVec::new();
        let (generated, body_range) = if kind & 7 == 0 {
            let len = usize::from(input.u8()) * 2;
            wire.extend_from_slice(input.take(len));
            (None, 0..wire.len())
        } else {
            let frame = ClientFrame {
                request_id: input.id(),
                body: input.body(),
            };
            if encode_client(&frame, &mut wire, ABSOLUTE_MAX_FRAME_BYTES).is_err() {
                continue;
            }
            let body_len = u32::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
            (Some(frame), HEADER_LEN..HEADER_LEN + body_len)
        };
        let archived = match decode_client(&wire[body_range]) {
            Ok(archived) => archived,
            Err(e) => {
                assert!(generated.is_none(), "an encoded frame failed to decode: {e}");
                continue;
            }
        };
        let frame = rkyv::deserialize::<ClientFrame, BoxedError>(archived)
            .unwrap_or_else(|e| panic!("a validated archive failed to deserialise: {e}"));
        if let Some(sent) = &generated {
            assert_eq!(&frame, sent, "encode/decode changed the frame");
        }

        let phase = session.phase();
        let verdict = session.admit(now_ms, &archived.body);
        latest_ms = latest_ms.max(now_ms);
        assert_eq!(session.phase(), phase, "admit changed the phase");
        assert_eq!(
            session.idle_deadline_ms(),
            latest_ms.saturating_add(idle_timeout_ms)
        );
        assert!(!session.is_idle(latest_ms));
        assert!(session.is_idle(session.idle_deadline_ms()));
        let got = match &verdict {
            Ok(()) => Admit,
            Err(refusal) => {
                assert!(!refusal.message.is_empty(), "a refusal without a message");
                Refuse {
                    code: refusal.code,
                    close: refusal.close,
                }
            }
        };
        match expected(phase, &frame.body, limits) {
            Some(want) => assert_eq!(got, want, "in {phase:?}: {:?}", frame.body),
            // A request this model does not know: nothing but the
            // pre-login requests may pass before login.
            None if !matches!(phase, Phase::Authenticated(_)) => {
                assert_ne!(
                    got, Admit,
                    "unknown request admitted in {phase:?}: {:?}",
                    frame.body
                )
            }
            None => {}
        }
        match got {
            Admit => run.admitted += 1,
            Refuse { .. } => run.refused += 1,
        }
        match (got, phase, &frame.body) {
            (Refuse { close: true, .. }, ..) => {
                run.closed = true;
                return run;
            }
            (Admit, Phase::AwaitingHello, _) => {
                session.hello_accepted();
                hellos_accepted += 1;
                assert_eq!(session.phase(), Phase::Anonymous);
            }
            // Right or wrong credentials: the store's answer, read from
            // the input whenever a login is admitted.
            (
                Admit,
                Phase::Anonymous,
                ClientBody::Login { .. } | ClientBody::LoginToken { .. } | ClientBody::LoginJwt { .. },
            ) if input.u8() & 1 == 0 => {
                let user = input.id().max(1);
                session.logged_in(user);
                assert_eq!(session.user(), Some(user));
            }
            _ => {}
        }
        assert!(hellos_accepted <= 1);
        assert_eq!(
            session.user().is_some(),
            matches!(session.phase(), Phase::Authenticated(_))
        );
        run.logged_in |= session.user().is_some();
    }
    run
}

/// What a session run got through, so tests can tell that their inputs
/// reach past the first frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionRun {
    pub admitted: usize,
    pub refused: usize,
    pub logged_in: bool,
    pub closed: bool,
}

// ---------------------------------------------------------------------------
// Seeds: hand-made starting points for the fuzzer, kept in the corpus.

/// One step of a session seed: a request and, for a login, whether the
/// credentials were right (and as whom).
pub struct Step {
    pub body: ClientBody,
    pub login_as: Option<u64>,
}

/// A session input that sends `steps` as raw bodies (so it does not depend
/// on the generator's byte layout), one second apart.
pub fn session_seed(setup: u8, steps: Vec<Step>) -> Vec<u8> {
    let mut out = vec![setup];
    for (n, step) in steps.into_iter().enumerate() {
        let mut wire = AlignedVec::new();
        let frame = ClientFrame {
            request_id: n as u64 + 1,
            body: step.body,
        };
        encode_client(&frame, &mut wire, ABSOLUTE_MAX_FRAME_BYTES).expect("encode seed");
        let body_len = u32::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
        assert!(
            body_len.is_multiple_of(2) && body_len <= 510,
            "seed frame of {body_len} bytes"
        );
        out.extend_from_slice(&[20, 0, (body_len / 2) as u8]);
        out.extend_from_slice(&wire[HEADER_LEN..HEADER_LEN + body_len]);
        if matches!(
            frame.body,
            ClientBody::Login { .. } | ClientBody::LoginToken { .. } | ClientBody::LoginJwt { .. }
        ) {
            match step.login_as {
                Some(user) => {
                    out.extend_from_slice(&[0, 0xff]);
                    out.extend_from_slice(&user.to_le_bytes());
                }
                None => out.push(1),
            }
        }
    }
    out
}

fn step(body: ClientBody) -> Step {
    Step { body, login_as: None }
}

/// One request of every kind, valid, for a logged-in session.
pub fn every_request() -> Vec<ClientBody> {
    let conv = ConvId::direct(1, 2);
    vec![
        ClientBody::Ping { nonce: 9 },
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
            client_msg_id: 1,
            content: Content::text("hi"),
        },
        ClientBody::GroupCreate {
            name: "rust fans".into(),
        },
        ClientBody::GroupJoin { group: 1 },
        ClientBody::GroupLeave { group: 1 },
        ClientBody::GroupMembers { group: 1 },
        ClientBody::SendGroup {
            group: 1,
            client_msg_id: 2,
            content: Content {
                kind: ContentKind::Media {
                    url: "https://x/y.png".into(),
                    mime: "image/png".into(),
                    size: 100,
                },
                body: b"caption".to_vec(),
            },
        },
        ClientBody::Sync {
            cursors: vec![Cursor { conv, seq: 3 }],
        },
        ClientBody::Receipt {
            conv,
            kind: ReceiptKind::Read,
            seq: 3,
        },
        ClientBody::History {
            conv,
            from_seq: 1,
            forward: true,
            limit: 50,
        },
        ClientBody::Conversations { offset: 0, limit: 20 },
    ]
}

fn hello(version: u16, name: &str) -> ClientBody {
    ClientBody::Hello {
        version,
        client_name: name.into(),
    }
}

fn login(name: &str) -> ClientBody {
    ClientBody::Login {
        username: name.into(),
        password: b"correct horse".to_vec(),
    }
}

/// Seeds for the session target, by name.
pub fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut happy = vec![
        step(hello(1, "seed")),
        step(ClientBody::Ping { nonce: 1 }),
        step(ClientBody::Register {
            username: "alice".into(),
            password: b"correct horse".to_vec(),
        }),
        step(ClientBody::FriendList),
        Step {
            body: login("alice"),
            login_as: Some(5),
        },
    ];
    happy.extend(every_request().into_iter().map(step));
    happy.extend([step(hello(1, "again")), step(login("alice"))]);
    let mut retry = vec![
        step(hello(1, "seed")),
        step(login("alice")),
        Step {
            body: ClientBody::LoginToken { token: vec![7; 32] },
            login_as: Some(u64::MAX),
        },
    ];
    retry.extend(every_request().into_iter().rev().map(step));
    vec![
        ("seed-happy-path", session_seed(2, happy)),
        ("seed-failed-login-then-token", session_seed(0x12, retry)),
        (
            "seed-handed-over",
            session_seed(0x0a, every_request().into_iter().map(step).collect()),
        ),
        (
            "seed-not-hello-first",
            session_seed(1, vec![step(ClientBody::FriendList)]),
        ),
        (
            "seed-bad-version",
            session_seed(1, vec![step(hello(2, "future"))]),
        ),
        (
            "seed-long-client-name",
            session_seed(1, vec![step(hello(1, &"n".repeat(65)))]),
        ),
    ]
}

/// Seeds for the frame decoder target, by name.
pub fn frame_decoder_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut frames = vec![
        ClientFrame {
            request_id: 1,
            body: hello(1, "seed"),
        },
        ClientFrame {
            request_id: 2,
            body: login("alice"),
        },
    ];
    frames.extend(
        every_request()
            .into_iter()
            .enumerate()
            .map(|(n, body)| ClientFrame {
                request_id: n as u64 + 3,
                body,
            }),
    );
    let stream = encode_stream(&frames);
    let with = |mode: u8, seed: u8, stream: &[u8]| [&[mode, seed][..], stream].concat();
    let mut server = AlignedVec::new();
    let pushed = ServerFrame::error(0, ErrorCode::UnsupportedVersion, "protocol version not supported");
    encode_server(&pushed, &mut server, ABSOLUTE_MAX_FRAME_BYTES).expect("encode seed");
    let too_large = [&stream[..64], &[0xff, 0xff, 0, 0, 0, 0, 0, 0][..]].concat();
    let flags = [&stream[..64], &[8, 0, 0, 0, 1, 0, 0, 0][..]].concat();
    vec![
        ("seed-every-request-bytewise", with(4, 0, &stream)),
        ("seed-every-request-busy", with(4, 4, &stream)),
        ("seed-every-request-handed-over", with(0x83, 5, &stream)),
        ("seed-server-frame", with(2, 2, &server)),
        ("seed-too-large", with(2, 3, &too_large)),
        ("seed-reserved-flags", with(3, 1, &flags)),
    ]
}
