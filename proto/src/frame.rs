//! Framing: how messages are cut out of a byte stream and put into one.
//!
//! A frame is an 8-byte header, then the body, then zero padding up to the
//! next multiple of 8:
//!
//! ```text
//! offset 0  u32 LE  body_len   bytes of rkyv archive that follow the header
//! offset 4  u32 LE  flags      reserved, must be 0
//! offset 8  [u8; body_len]     rkyv archive of a ClientFrame or ServerFrame
//!           [0u8; pad]         pad = (8 - body_len % 8) % 8
//! ```
//!
//! The 8-byte header and the padding keep every body at an 8-aligned
//! offset, which rkyv needs to read an archive in place. [`FrameBuf`] is the
//! receive buffer: it is 16-aligned, hands out the space to read into, checks
//! each header against the configured maximum *before* growing for the body
//! (so a hostile length prefix never causes a large allocation), and yields
//! complete bodies that [`decode_client`] / [`decode_server`] validate with
//! bytecheck and return as archived references, without copying.

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;

use crate::message::{ArchivedClientFrame, ArchivedServerFrame, ClientFrame, ServerFrame};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;
/// Frame bodies start (and frames are padded) on this boundary.
pub const FRAME_ALIGN: usize = 8;
/// The receive buffer's size while no large frame is in flight.
const IDLE_BUF_BYTES: usize = 256;
/// The largest read offered to a connection that keeps filling its reads,
/// so a busy connection costs one syscall per many frames.
const BUSY_READ_BYTES: usize = 16 * 1024;

/// Why bytes could not be turned into a frame, or a frame into bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The header announced a body above the limit.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    /// The header's reserved flags were not zero.
    #[error("reserved header flags {0:#x} are set")]
    ReservedFlags(u32),
    /// The body is not a valid archive of the expected type.
    #[error("frame body failed validation: {0}")]
    Invalid(String),
    /// The frame could not be serialised.
    #[error("frame could not be encoded: {0}")]
    Encode(String),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of archive after the header (padding excluded).
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses and checks a header against `max_body`.
    pub fn parse(bytes: [u8; HEADER_LEN], max_body: u32) -> Result<FrameHeader, FrameError> {
        let [a, b, c, d, e, f, g, h] = bytes;
        let body_len = u32::from_le_bytes([a, b, c, d]);
        let flags = u32::from_le_bytes([e, f, g, h]);
        if flags != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        if body_len > max_body {
            return Err(FrameError::TooLarge {
                len: body_len,
                max: max_body,
            });
        }
        Ok(FrameHeader { body_len })
    }

    /// Bytes the whole frame occupies on the wire: header, body, padding.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + padded(self.body_len as usize)
    }
}

fn padded(len: usize) -> usize {
    len.div_ceil(FRAME_ALIGN) * FRAME_ALIGN
}

/// Appends one client frame to `out` (header, archive, padding).
///
/// `out.len()` must be a multiple of 8, which holds for any buffer that only
/// ever had frames appended. Fails if the body would exceed `max_body`.
pub fn encode_client(frame: &ClientFrame, out: &mut AlignedVec, max_body: u32) -> Result<(), FrameError> {
    encode_with(out, max_body, |buf| {
        rkyv::api::high::to_bytes_in::<_, BoxedError>(frame, buf)
    })
}

/// Appends one server frame to `out`; see [`encode_client`].
pub fn encode_server(frame: &ServerFrame, out: &mut AlignedVec, max_body: u32) -> Result<(), FrameError> {
    encode_with(out, max_body, |buf| {
        rkyv::api::high::to_bytes_in::<_, BoxedError>(frame, buf)
    })
}

fn encode_with(
    out: &mut AlignedVec,
    max_body: u32,
    serialize: impl FnOnce(AlignedVec) -> Result<AlignedVec, BoxedError>,
) -> Result<(), FrameError> {
    assert_eq!(out.len() % FRAME_ALIGN, 0, "frames must start 8-aligned");
    let frame_start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let body_start = out.len();
    // rkyv takes the writer by value and does not hand it back on error.
    // Serialisation of these types fails only for a string or vector over
    // 2^30 bytes, far beyond any frame limit, so that loss is accepted.
    let mut buf = match serialize(std::mem::take(out)) {
        Ok(buf) => buf,
        Err(e) => return Err(FrameError::Encode(e.to_string())),
    };
    let body_len = buf.len() - body_start;
    let body_len_u32 = u32::try_from(body_len).unwrap_or(u32::MAX);
    if body_len_u32 > max_body {
        buf.resize(frame_start, 0);
        *out = buf;
        return Err(FrameError::TooLarge {
            len: body_len_u32,
            max: max_body,
        });
    }
    if let Some(header) = buf.get_mut(frame_start..body_start) {
        header.copy_from_slice(&[&body_len_u32.to_le_bytes()[..], &[0u8; 4][..]].concat());
    }
    let padded_len = body_start + padded(body_len);
    buf.resize(padded_len, 0);
    *out = buf;
    Ok(())
}

/// Validates a client frame body in place and returns its archived view.
pub fn decode_client(body: &[u8]) -> Result<&ArchivedClientFrame, FrameError> {
    rkyv::access::<ArchivedClientFrame, BoxedError>(body)
        .map_err(|e| FrameError::Invalid(without_addresses(&e.to_string(), body)))
}

/// Validates a server frame body in place and returns its archived view.
pub fn decode_server(body: &[u8]) -> Result<&ArchivedServerFrame, FrameError> {
    rkyv::access::<ArchivedServerFrame, BoxedError>(body)
        .map_err(|e| FrameError::Invalid(without_addresses(&e.to_string(), body)))
}

/// How many `ServerBody` variants this crate knows: tags 0 to this − 1.
pub const SERVER_BODY_TAGS: u8 = 32;

/// The archived size of a `ServerFrame` root, which ends every server body
/// (docs/protocol.md 5.5).
const SERVER_ROOT_BYTES: usize = 112;

/// The tag of a push (`request_id` 0) whose `ServerBody` variant this crate
/// does not know, read without validating anything else; `None` for any
/// other body, including one too short to hold the root ([`decode_server`]
/// refuses those). Until version 1 is frozen the server may add pushes
/// (docs/protocol.md, "Stability"), and a client skips one it does not
/// know instead of failing the connection; an unknown tag in an *answer*
/// stays an error.
pub fn unknown_push_tag(body: &[u8]) -> Option<u8> {
    let root = body.len().checked_sub(SERVER_ROOT_BYTES)?;
    let request_id = body.get(root..root + 8)?;
    let tag = *body.get(root + 8)?;
    (request_id == [0; 8] && tag >= SERVER_BODY_TAGS).then_some(tag)
}

/// rkyv's validation errors name memory addresses (`ptr 0x00007fa4…`).
/// The error text goes back to the peer that sent the frame, and a heap
/// address given to anyone who connects would help them defeat address
/// randomisation; an offset into the body is what a client writer needs
/// anyway. So every `0x…` number inside `body` becomes `body+N`, and any
/// other (a range end just past it, or an address elsewhere) becomes
/// `<addr>`. Hexadecimal numbers too short to be addresses are kept.
fn without_addresses(text: &str, body: &[u8]) -> String {
    const ADDRESS_DIGITS_MIN: usize = 8;
    let start = body.as_ptr() as usize;
    let end = start.saturating_add(body.len());
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("0x") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let digits = from[2..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(from.len() - 2);
        let number = &from[..2 + digits];
        match usize::from_str_radix(&number[2..], 16) {
            Ok(value) if digits >= ADDRESS_DIGITS_MIN && (start..=end).contains(&value) => {
                out.push_str(&format!("body+{}", value - start));
            }
            _ if digits >= ADDRESS_DIGITS_MIN => out.push_str("<addr>"),
            _ => out.push_str(number),
        }
        rest = &from[2 + digits..];
    }
    out.push_str(rest);
    out
}

/// An aligned receive buffer that cuts a byte stream into frame bodies.
///
/// Use: [`FrameBuf::read_slot`] for the space to read into, then
/// [`FrameBuf::commit`] with the bytes read, then [`FrameBuf::next_body`]
/// until it returns `None`. Memory use is [`IDLE_BUF_BYTES`] while the
/// peer is quiet. Reads that fill their slot mean more is waiting in the
/// socket, so the next slot is four times larger (up to
/// [`BUSY_READ_BYTES`]); the first read that does not fill its slot drops
/// back to the idle size, and the large buffer is released once drained. A
/// frame larger than that is read whole: the buffer grows to the frame in
/// flight, which the header check bounds by `max_body`.
pub struct FrameBuf {
    buf: AlignedVec,
    /// First unconsumed byte; always a multiple of 8.
    start: usize,
    /// One past the last received byte.
    end: usize,
    max_body: u32,
    /// The size of read to offer next (see the type's doc).
    read_bytes: usize,
    /// The length of the slot last handed out.
    last_slot: usize,
}

impl FrameBuf {
    /// An empty buffer refusing bodies above `max_body` bytes.
    pub fn new(max_body: u32) -> FrameBuf {
        FrameBuf {
            buf: AlignedVec::new(),
            start: 0,
            end: 0,
            max_body,
            read_bytes: IDLE_BUF_BYTES,
            last_slot: 0,
        }
    }

    /// The body limit this buffer enforces.
    pub fn max_body(&self) -> u32 {
        self.max_body
    }

    /// Changes the body limit, for a peer that announced its own (a client
    /// learns the server's in `HelloOk`). Applies from the next header
    /// checked; a frame already accepted stays accepted.
    pub fn set_max_body(&mut self, max_body: u32) {
        self.max_body = max_body;
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The space the next read should fill. Never empty.
    ///
    /// Fails if the buffered header announces a frame over the limit: the
    /// connection must then be closed, and nothing was allocated for it.
    pub fn read_slot(&mut self) -> Result<&mut [u8], FrameError> {
        let needed = match self.pending_header()? {
            Some(header) => header.frame_len(),
            None => HEADER_LEN,
        };
        if self.start == self.end || (self.start > 0 && self.start + needed > self.buf.len()) {
            self.compact();
        }
        // Room for the whole pending frame and for a read of the current
        // size; never an empty slot, so a caller that reads again before
        // draining complete frames gets more space rather than an error.
        let target = (self.start + needed).max(self.end + self.read_bytes);
        if self.buf.len() < target {
            // Exactly what is needed: `resize` alone may round the capacity
            // up to a power of two (128 KiB for a 64 KiB frame).
            self.buf.reserve_exact(target - self.buf.len());
            self.buf.resize(target, 0);
        }
        let (start, end) = (self.end, self.buf.len());
        self.last_slot = end - start;
        match self.buf.get_mut(start..end) {
            Some(slot) if !slot.is_empty() => Ok(slot),
            _ => unreachable_slot(),
        }
    }

    /// How many bytes the next read should ask for: what
    /// [`FrameBuf::read_slot`] would offer, without allocating it. For
    /// reading through a buffer shared by many connections (see
    /// [`FrameBuf::append_read`]).
    ///
    /// Fails like `read_slot` if the buffered header announces a frame over
    /// the limit.
    pub fn wanted(&self) -> Result<usize, FrameError> {
        let needed = match self.pending_header()? {
            Some(header) => header.frame_len(),
            None => HEADER_LEN,
        };
        Ok(needed.saturating_sub(self.buffered()).max(self.read_bytes))
    }

    /// Adds `bytes`, the result of a read that asked for `wanted` bytes,
    /// growing the buffer only by what arrived (or to the pending frame's
    /// size once its header is in). Same bookkeeping as
    /// [`FrameBuf::commit`]: a read that filled its request makes the next
    /// one larger.
    pub fn append_read(&mut self, bytes: &[u8], wanted: usize) {
        if self.start == self.end || self.start > 0 {
            self.compact();
        }
        let end = self.end + bytes.len();
        if self.buf.len() < end {
            self.buf.reserve_exact(end - self.buf.len());
            self.buf.resize(end, 0);
        }
        if let Some(slot) = self.buf.get_mut(self.end..end) {
            slot.copy_from_slice(bytes);
        }
        self.end = end;
        self.read_bytes = if bytes.len() == wanted {
            (self.read_bytes * 4).min(BUSY_READ_BYTES)
        } else {
            IDLE_BUF_BYTES
        };
        // The rest of a frame whose header is in arrives into one
        // allocation, not one per read. The header was checked against the
        // limit before anything was reserved for its body.
        if let Ok(Some(header)) = self.pending_header() {
            let frame_end = self.start + header.frame_len();
            if self.buf.capacity() < frame_end {
                self.buf.reserve_exact(frame_end - self.buf.len());
            }
        }
    }

    /// Frees the buffer if it holds nothing and the stream has gone quiet
    /// (its last read did not fill its request), so that a connection
    /// waiting for its next frame holds no receive memory. A busy stream
    /// keeps its buffer for the next read.
    pub fn release_if_idle(&mut self) {
        if self.start == self.end && self.read_bytes == IDLE_BUF_BYTES && self.buf.capacity() > 0 {
            self.buf = AlignedVec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    /// Records that `n` bytes were read into the last [`FrameBuf::read_slot`].
    pub fn commit(&mut self, n: usize) {
        assert!(
            self.end + n <= self.buf.len(),
            "committed more than the read slot"
        );
        self.end += n;
        self.read_bytes = if n == self.last_slot {
            (self.read_bytes * 4).min(BUSY_READ_BYTES)
        } else {
            IDLE_BUF_BYTES
        };
    }

    /// The next complete frame body, if one is buffered. The frame counts as
    /// consumed; the slice stays valid until the next `read_slot`.
    pub fn next_body(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let Some(header) = self.pending_header()? else {
            return Ok(None);
        };
        let frame_len = header.frame_len();
        if self.end - self.start < frame_len {
            return Ok(None);
        }
        let body_start = self.start + HEADER_LEN;
        let body_end = body_start + header.body_len as usize;
        self.start += frame_len;
        debug_assert_eq!(self.start % FRAME_ALIGN, 0);
        Ok(self.buf.get(body_start..body_end))
    }

    /// Takes the unconsumed bytes out (used to hand a connection, with what
    /// it already sent, to another shard).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self
            .buf
            .get(self.start..self.end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        self.start = 0;
        self.end = 0;
        rest
    }

    /// Puts bytes received elsewhere in front of anything read later.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.resize(self.end, 0);
        self.buf.extend_from_slice(bytes);
        self.end += bytes.len();
    }

    fn pending_header(&self) -> Result<Option<FrameHeader>, FrameError> {
        match self.buf.get(self.start..self.start + HEADER_LEN) {
            Some(bytes) if self.end - self.start >= HEADER_LEN => {
                let mut header = [0u8; HEADER_LEN];
                header.copy_from_slice(bytes);
                FrameHeader::parse(header, self.max_body).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Moves unconsumed bytes to offset 0 and drops a large idle buffer.
    fn compact(&mut self) {
        let live = self.end - self.start;
        if live == 0 && self.read_bytes == IDLE_BUF_BYTES && self.buf.len() > 4 * IDLE_BUF_BYTES {
            self.buf = AlignedVec::new();
        } else if live > 0 {
            self.buf.copy_within(self.start..self.end, 0);
        }
        self.start = 0;
        self.end = live;
    }
}

#[cold]
fn unreachable_slot() -> Result<&'static mut [u8], FrameError> {
    Err(FrameError::Invalid("receive buffer invariant broken".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ClientBody, Content};

    fn sample(i: u64) -> ClientFrame {
        ClientFrame {
            request_id: i,
            body: ClientBody::SendDirect {
                to: 7,
                client_msg_id: i,
                content: Content::text(vec![b'x'; i as usize]),
            },
        }
    }

    #[test]
    fn roundtrip_many_frames_through_small_reads() {
        let mut wire = AlignedVec::new();
        for i in 0..50 {
            encode_client(&sample(i), &mut wire, 1 << 20).unwrap();
        }
        let mut fb = FrameBuf::new(1 << 20);
        let mut seen = 0;
        for chunk in wire.chunks(13) {
            let slot = fb.read_slot().unwrap();
            slot[..chunk.len()].copy_from_slice(chunk);
            fb.commit(chunk.len());
            while let Some(body) = fb.next_body().unwrap() {
                let frame = decode_client(body).unwrap();
                assert_eq!(frame.request_id, seen);
                seen += 1;
            }
        }
        assert_eq!(seen, 50);
        assert_eq!(fb.buffered(), 0);
    }

    #[test]
    fn oversized_header_is_refused_before_allocation() {
        let mut fb = FrameBuf::new(1024);
        let slot = fb.read_slot().unwrap();
        slot[..8].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
        fb.commit(8);
        assert_eq!(
            fb.next_body(),
            Err(FrameError::TooLarge {
                len: 0x7fff_ffff,
                max: 1024
            })
        );
        assert!(fb.read_slot().is_err());
        assert!(fb.buf.len() <= IDLE_BUF_BYTES);
    }

    /// The body of `frame` as encoded, in an aligned buffer of its own.
    fn server_body(frame: &ServerFrame) -> AlignedVec {
        let mut wire = AlignedVec::new();
        encode_server(frame, &mut wire, 1 << 20).unwrap();
        let len = u32::from_le_bytes(wire[..4].try_into().unwrap()) as usize;
        let mut body = AlignedVec::new();
        body.extend_from_slice(&wire[HEADER_LEN..HEADER_LEN + len]);
        body
    }

    #[test]
    fn only_a_push_with_a_tag_past_the_known_ones_is_unknown() {
        use crate::message::ServerBody;
        // FriendsPage is the last variant: its tag is the highest known.
        let push = ServerFrame {
            request_id: 0,
            body: ServerBody::FriendsPage {
                friends: Vec::new(),
                more: false,
            },
        };
        let mut body = server_body(&push);
        let tag_at = body.len() - SERVER_ROOT_BYTES + 8;
        assert_eq!(body[tag_at], SERVER_BODY_TAGS - 1);
        assert_eq!(unknown_push_tag(&body), None);
        assert!(decode_server(&body).is_ok());

        body[tag_at] = SERVER_BODY_TAGS;
        assert!(decode_server(&body).is_err(), "rkyv refuses the tag");
        assert_eq!(unknown_push_tag(&body), Some(SERVER_BODY_TAGS));

        // An answer with an unknown tag is not skipped, nor is a short body.
        let mut answer = server_body(&ServerFrame {
            request_id: 7,
            ..push
        });
        answer[tag_at] = 200;
        assert_eq!(unknown_push_tag(&answer), None);
        assert_eq!(unknown_push_tag(&body[..SERVER_ROOT_BYTES - 1]), None);
    }

    #[test]
    fn a_raised_limit_admits_the_header_the_old_one_refused() {
        let mut fb = FrameBuf::new(1024);
        let slot = fb.read_slot().unwrap();
        slot[..8].copy_from_slice(&[0x00, 0x08, 0, 0, 0, 0, 0, 0]);
        fb.commit(8);
        assert_eq!(fb.next_body(), Err(FrameError::TooLarge { len: 2048, max: 1024 }));
        fb.set_max_body(4096);
        assert_eq!(fb.max_body(), 4096);
        assert_eq!(fb.next_body(), Ok(None));
        assert!(fb.read_slot().unwrap().len() >= 2048);
    }

    #[test]
    fn reading_before_draining_grows_instead_of_failing() {
        let mut wire = AlignedVec::new();
        while wire.len() < 600 {
            encode_client(&sample(1), &mut wire, 1 << 20).unwrap();
        }
        let mut fb = FrameBuf::new(1 << 20);
        let mut off = 0;
        while off < wire.len() {
            let slot = fb.read_slot().unwrap();
            assert!(!slot.is_empty());
            let n = slot.len().min(wire.len() - off);
            slot[..n].copy_from_slice(&wire[off..off + n]);
            fb.commit(n);
            off += n;
        }
        let mut frames = 0;
        while fb.next_body().unwrap().is_some() {
            frames += 1;
        }
        assert!(frames > 2);
    }

    #[test]
    fn busy_streams_are_read_in_large_slots() {
        let mut wire = AlignedVec::new();
        for i in 0..1000 {
            encode_client(&sample(i % 64), &mut wire, 1 << 20).unwrap();
        }
        let mut fb = FrameBuf::new(1 << 20);
        let (mut off, mut reads, mut frames) = (0, 0, 0);
        while off < wire.len() {
            let slot = fb.read_slot().unwrap();
            let n = slot.len().min(wire.len() - off);
            slot[..n].copy_from_slice(&wire[off..off + n]);
            fb.commit(n);
            off += n;
            reads += 1;
            while fb.next_body().unwrap().is_some() {
                frames += 1;
            }
        }
        assert_eq!(frames, 1000);
        assert!(reads * 20 < frames, "{reads} reads for {frames} frames");
        // The stream went quiet (the last read did not fill its slot):
        // the large buffer goes once drained.
        fb.read_slot().unwrap();
        assert!(
            fb.buf.len() <= IDLE_BUF_BYTES,
            "buffer stayed at {}",
            fb.buf.len()
        );
    }

    #[test]
    fn frames_appended_from_a_shared_buffer_hold_nothing_when_idle() {
        let mut wire = AlignedVec::new();
        for i in 0..40 {
            encode_client(&sample(i * 7), &mut wire, 1 << 20).unwrap();
        }
        let mut fb = FrameBuf::new(1 << 20);
        let (mut off, mut seen, mut step) = (0, 0, 1);
        while off < wire.len() {
            // Reads of every size from 1 byte to a few frames at once.
            let n = fb.wanted().unwrap().min(step).min(wire.len() - off);
            fb.append_read(&wire[off..off + n], n.max(1) + 1);
            off += n;
            step = step % 300 + 13;
            while let Some(body) = fb.next_body().unwrap() {
                assert_eq!(decode_client(body).unwrap().request_id, seen * 7);
                seen += 1;
            }
            fb.release_if_idle();
            if fb.buffered() == 0 {
                assert_eq!(fb.buf.capacity(), 0, "an idle buffer keeps no memory");
            }
        }
        assert_eq!(seen, 40);
    }

    #[test]
    fn appended_oversized_header_is_refused_before_allocation() {
        let mut fb = FrameBuf::new(1024);
        fb.append_read(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0], 256);
        assert!(fb.wanted().is_err());
        assert!(fb.next_body().is_err());
        assert!(fb.buf.capacity() < 64, "reserved {}", fb.buf.capacity());
    }

    #[test]
    fn reserved_flags_are_refused() {
        assert_eq!(
            FrameHeader::parse([0, 0, 0, 0, 1, 0, 0, 0], 10),
            Err(FrameError::ReservedFlags(1))
        );
    }

    #[test]
    fn encode_refuses_over_limit_and_leaves_buffer_intact() {
        let mut out = AlignedVec::new();
        encode_client(&sample(1), &mut out, 1 << 20).unwrap();
        let before = out.len();
        assert!(matches!(
            encode_client(&sample(200), &mut out, 64),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(out.len(), before);
    }

    #[test]
    fn garbage_body_is_invalid_not_a_panic() {
        let mut aligned = AlignedVec::<16>::new();
        aligned.extend_from_slice(&[0xAB; 64]);
        assert!(decode_client(&aligned).is_err());
        assert!(decode_client(&[]).is_err());
    }

    /// The text of a validation error goes to the peer: it names offsets
    /// into the body, never an address of the server's memory.
    #[test]
    fn validation_errors_carry_no_addresses() {
        let mut wire = AlignedVec::new();
        encode_client(&sample(3), &mut wire, 1 << 20).unwrap();
        let body = &wire[HEADER_LEN..];
        // Three bytes in front misalign every pointer of the archive; a
        // pointer aimed past the end overruns it.
        let mut shifted = AlignedVec::<16>::new();
        shifted.extend_from_slice(&[0; 3]);
        shifted.extend_from_slice(body);
        let mut overrun = AlignedVec::<16>::new();
        overrun.extend_from_slice(body);
        let len = overrun.len();
        overrun[len - 8..len - 4].copy_from_slice(&0x7fff_0000i32.to_le_bytes());
        for bad in [&shifted[..], &overrun[..], &[0xAB; 64][..]] {
            let Err(FrameError::Invalid(text)) = decode_client(bad) else {
                panic!("expected a validation error")
            };
            let hex_run = text
                .split("0x")
                .skip(1)
                .map(|s| s.chars().take_while(char::is_ascii_hexdigit).count())
                .max()
                .unwrap_or(0);
            assert!(hex_run < 8, "an address in {text:?}");
        }
    }

    #[test]
    fn addresses_become_body_offsets() {
        let body = [0u8; 16];
        let base = body.as_ptr() as usize;
        let text = format!(
            "ptr {:#018x} size 8 in range {:#x}..{:#x}, tag 0x1f",
            base + 4,
            base,
            base + 64
        );
        assert_eq!(
            without_addresses(&text, &body),
            "ptr body+4 size 8 in range body+0..<addr>, tag 0x1f"
        );
        assert_eq!(without_addresses("0x", &body), "0x");
        assert_eq!(without_addresses("end 0x", &body), "end 0x");
    }

    #[test]
    fn large_frame_buffer_shrinks_when_idle() {
        let mut wire = AlignedVec::new();
        encode_client(&sample(10_000), &mut wire, 1 << 20).unwrap();
        let mut fb = FrameBuf::new(1 << 20);
        let mut off = 0;
        while off < wire.len() {
            let slot = fb.read_slot().unwrap();
            let n = slot.len().min(wire.len() - off);
            slot[..n].copy_from_slice(&wire[off..off + n]);
            fb.commit(n);
            off += n;
        }
        assert!(fb.next_body().unwrap().is_some());
        // The stream goes quiet: a read that does not fill its slot.
        let slot = fb.read_slot().unwrap().len();
        assert!(slot > 0);
        fb.commit(0);
        fb.read_slot().unwrap();
        assert!(
            fb.buf.len() <= IDLE_BUF_BYTES,
            "buffer stayed at {}",
            fb.buf.len()
        );
    }
}
