//! Typical frames and a socket-like stream feeder for the `frame` bench.
//!
//! The frames are the two that dominate a chat server's traffic: a client's
//! `SendDirect` with a 64-byte text body and the server's `Message` push
//! that delivers it. [`cut_stream`] drives [`FrameBuf`] the way
//! `tern_net::frame_io::fill` does (read into the buffer's own slot, then
//! drain every complete frame), with the bytes arriving in fixed-size
//! segments as a socket would hand them over.

use rkyv::util::AlignedVec;
use tern_proto::{
    decode_client, encode_client, ChatMessage, ClientBody, ClientFrame, Content, ConvId, FrameBuf,
    FrameError, ServerBody, ServerFrame, HEADER_LEN,
};

/// Bytes of text in the benchmark messages.
pub const TEXT_BYTES: usize = 64;

/// A body limit far above the benchmark frames, as the server configures.
pub const MAX_BODY: u32 = tern_proto::limits::DEFAULT_MAX_FRAME_BYTES;

/// A client's 1:1 send of [`TEXT_BYTES`] of text.
pub fn send_direct(request_id: u64) -> ClientFrame {
    ClientFrame {
        request_id,
        body: ClientBody::SendDirect {
            to: 42,
            client_msg_id: request_id,
            content: Content::text(vec![b'x'; TEXT_BYTES]),
        },
    }
}

/// The server's push delivering such a message.
pub fn message_push(seq: u64) -> ServerFrame {
    ServerFrame {
        request_id: 0,
        body: ServerBody::Message(ChatMessage {
            conv: ConvId::direct(7, 42),
            seq,
            from: 7,
            client_msg_id: seq,
            timestamp_ms: 1_763_000_000_000,
            content: Content::text(vec![b'x'; TEXT_BYTES]),
        }),
    }
}

/// `count` encoded [`send_direct`] frames back to back, as a client
/// pipelining sends would write them.
pub fn client_stream(count: u64) -> Result<AlignedVec, FrameError> {
    let mut out = AlignedVec::new();
    for i in 1..=count {
        encode_client(&send_direct(i), &mut out, MAX_BODY)?;
    }
    Ok(out)
}

/// The body (archive) of the single frame encoded in `encoded`.
pub fn body_of(encoded: &[u8]) -> &[u8] {
    encoded.get(HEADER_LEN..).unwrap_or_default()
}

/// What [`cut_stream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CutStats {
    /// Complete frames cut out of the stream.
    pub frames: u64,
    /// Copies into the buffer's read slot: the `read` calls a socket
    /// would have needed.
    pub reads: u64,
}

/// Feeds `stream` to `buf` in segments of `segment` bytes (what one
/// socket read could return), copying into the buffer's read slot and
/// draining complete frames after each copy. With `validate`, each body
/// is also checked with [`decode_client`].
pub fn cut_stream(
    buf: &mut FrameBuf,
    stream: &[u8],
    segment: usize,
    validate: bool,
) -> Result<CutStats, FrameError> {
    let mut stats = CutStats::default();
    for chunk in stream.chunks(segment.max(1)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let slot = buf.read_slot()?;
            let n = slot.len().min(rest.len());
            let (now, later) = rest.split_at(n);
            if let Some(dst) = slot.get_mut(..n) {
                dst.copy_from_slice(now);
            }
            buf.commit(n);
            stats.reads += 1;
            rest = later;
            while let Some(body) = buf.next_body()? {
                if validate {
                    decode_client(body)?;
                }
                stats.frames += 1;
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{decode_server, encode_server, ArchivedClientBody, ArchivedServerBody};

    #[test]
    fn fixtures_round_trip() {
        let mut out = AlignedVec::new();
        encode_client(&send_direct(5), &mut out, MAX_BODY).unwrap();
        let frame = decode_client(body_of(&out)).unwrap();
        assert_eq!(frame.request_id, 5);
        match &frame.body {
            ArchivedClientBody::SendDirect { content, .. } => assert_eq!(content.body.len(), TEXT_BYTES),
            other => panic!("unexpected body {other:?}"),
        }

        out.clear();
        encode_server(&message_push(9), &mut out, MAX_BODY).unwrap();
        let frame = decode_server(body_of(&out)).unwrap();
        match &frame.body {
            ArchivedServerBody::Message(m) => assert_eq!(m.seq, 9),
            other => panic!("unexpected body {other:?}"),
        }
    }

    #[test]
    fn cut_stream_yields_every_frame() {
        let stream = client_stream(1000).unwrap();
        let mut buf = FrameBuf::new(MAX_BODY);
        let stats = cut_stream(&mut buf, &stream, 4096, true).unwrap();
        assert_eq!(stats.frames, 1000);
        assert!(stats.reads >= (stream.len() / 4096) as u64);
        assert_eq!(buf.buffered(), 0);
        // A reused buffer behaves the same on the next stream.
        assert_eq!(cut_stream(&mut buf, &stream, 4096, false).unwrap(), stats);
    }
}
