//! A connection's bounded queue of frames waiting to be written.
//!
//! Producers (the connection's own reader, deliveries from other
//! connections and shards) encode frames straight into one byte buffer;
//! the writer task swaps that buffer out and writes it in one call, so
//! there is no per-frame allocation or syscall once buffers have grown.
//! The queue is bounded in bytes: a push that would cross the bound means
//! the peer is not reading fast enough, so the queue is emptied, a
//! `Disconnect(SlowConsumer)` frame takes its place, and the connection
//! closes once that is written. Memory per connection is thus capped at
//! the bound, never at what others send.

use std::cell::RefCell;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};

use rkyv::util::AlignedVec;
use tern_proto::{encode_server, ErrorCode, ServerBody, ServerFrame};

use crate::metrics::{Metrics, ShardMetrics};

/// A pending buffer larger than this is released when it drains, so that a
/// burst does not pin memory on an idle connection.
const RETAIN_BYTES: usize = 16 * 1024;

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The queue overflowed; the connection is now closing as a slow consumer.
    SlowConsumer,
    /// The connection is already closing.
    Closing,
}

/// What a connection's writer is to do after [`Outbox::next_batch`].
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Write the batch it was given.
    Write,
    /// The queue is closing and drained: close the connection.
    Closed,
    /// The queue is drained and its session is parking: hand the socket
    /// back without closing it.
    Park,
}

/// The outbound queue of one connection.
pub struct Outbox {
    inner: RefCell<Inner>,
    /// The owning shard's counters (absent in unit tests).
    metrics: Option<(Arc<Metrics>, usize)>,
}

struct Inner {
    pending: AlignedVec,
    limit_bytes: usize,
    max_frame_bytes: u32,
    closing: bool,
    /// The session asked its writer to stop, keeping the socket open.
    parking: bool,
    /// The session's reader stopped reading before the queue closed (it
    /// closed it, or saw the peer close): see [`Outbox::close_from_reader`].
    reader_stopped: bool,
    waker: Option<Waker>,
    /// A producer waiting for the queue to drain (sync catch-up).
    room_waker: Option<Waker>,
}

impl Outbox {
    /// An empty queue bounded at `limit_bytes`, counting into shard
    /// `shard`'s metrics.
    pub fn with_metrics(
        limit_bytes: usize,
        max_frame_bytes: u32,
        metrics: Arc<Metrics>,
        shard: usize,
    ) -> Outbox {
        let mut outbox = Outbox::new(limit_bytes, max_frame_bytes);
        outbox.metrics = Some((metrics, shard));
        outbox
    }

    /// An empty queue bounded at `limit_bytes`, counting nothing.
    pub fn new(limit_bytes: usize, max_frame_bytes: u32) -> Outbox {
        Outbox {
            metrics: None,
            inner: RefCell::new(Inner {
                pending: AlignedVec::new(),
                limit_bytes,
                max_frame_bytes,
                closing: false,
                parking: false,
                reader_stopped: false,
                waker: None,
                room_waker: None,
            }),
        }
    }

    /// Encodes and queues `frame`.
    pub fn push(&self, frame: &ServerFrame) -> Result<(), PushError> {
        let mut inner = self.inner.borrow_mut();
        if inner.closing {
            return Err(PushError::Closing);
        }
        let before = inner.pending.len();
        let max = inner.max_frame_bytes;
        let mut frame = frame;
        let refusal;
        if encode_server(frame, &mut inner.pending, max).is_err() {
            // An answer larger than a frame (pages are cut to fit, but a
            // group listed whole is not): the request gets a typed refusal
            // rather than no answer, and the connection carries on.
            refusal = ServerFrame::error(
                frame.request_id,
                ErrorCode::LimitExceeded,
                "the answer is larger than the server's max_frame_bytes",
            );
            frame = &refusal;
            if encode_server(frame, &mut inner.pending, max).is_err() {
                debug_assert!(false, "an error frame is always small enough");
                return Ok(());
            }
        }
        if inner.pending.len() > inner.limit_bytes {
            inner.pending.resize(before, 0);
            drop(inner);
            self.kill(
                ErrorCode::SlowConsumer,
                "outbound queue overflowed: the client reads too slowly",
                0,
            );
            return Err(PushError::SlowConsumer);
        }
        let (added, queued) = (inner.pending.len() - before, inner.pending.len());
        inner.wake();
        drop(inner);
        if let Some(m) = self.m() {
            m.frames_out(1, added);
            m.outbound_enqueued(added, queued);
            if let ServerBody::Error { code, .. } = &frame.body {
                m.error(*code);
            }
        }
        Ok(())
    }

    /// Queues one already-encoded frame (a shared delivery).
    pub fn push_encoded(&self, frames: &[u8]) -> Result<(), PushError> {
        let mut inner = self.inner.borrow_mut();
        if inner.closing {
            return Err(PushError::Closing);
        }
        if inner.pending.len() + frames.len() > inner.limit_bytes {
            drop(inner);
            self.kill(
                ErrorCode::SlowConsumer,
                "outbound queue overflowed: the client reads too slowly",
                0,
            );
            return Err(PushError::SlowConsumer);
        }
        inner.pending.extend_from_slice(frames);
        let queued = inner.pending.len();
        inner.wake();
        drop(inner);
        if let Some(m) = self.m() {
            m.frames_out(1, frames.len());
            m.outbound_enqueued(frames.len(), queued);
        }
        Ok(())
    }

    /// Drops everything queued, queues a `Disconnect` and closes.
    pub fn kill(&self, code: ErrorCode, message: &str, retry_after_ms: u32) {
        let mut inner = self.inner.borrow_mut();
        if inner.closing {
            return;
        }
        let dropped = inner.pending.len();
        inner.pending.clear();
        inner.append_disconnect(code, message, retry_after_ms);
        let queued = inner.pending.len();
        drop(inner);
        if let Some(m) = self.m() {
            m.outbound_dequeued(dropped);
            m.outbound_enqueued(queued, queued);
            m.error(code);
            if code == ErrorCode::SlowConsumer {
                m.slow_consumer();
            }
        }
    }

    /// Queues a `Disconnect` after what is already queued, then closes.
    pub fn finish(&self, code: ErrorCode, message: &str, retry_after_ms: u32) {
        let mut inner = self.inner.borrow_mut();
        if inner.closing {
            return;
        }
        let before = inner.pending.len();
        inner.append_disconnect(code, message, retry_after_ms);
        let queued = inner.pending.len();
        drop(inner);
        if let Some(m) = self.m() {
            m.outbound_enqueued(queued - before, queued);
            m.error(code);
        }
    }

    fn m(&self) -> Option<&ShardMetrics> {
        self.metrics
            .as_ref()
            .map(|(metrics, shard)| metrics.shard(*shard))
    }

    /// Closes without a final frame (the peer is gone).
    pub fn close(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.closing = true;
        inner.wake();
    }

    /// Closes, saying that the connection's reader has stopped reading: its
    /// writer then shuts down only its own direction, since no read waits
    /// to be ended, and the reader lingers on what the peer still sends
    /// ([`tern_net::linger`]). Without this, the writer of a closing queue
    /// also shuts down reading, which ends a read still waiting.
    pub fn close_from_reader(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.reader_stopped = true;
        inner.closing = true;
        inner.wake();
    }

    /// Whether [`Outbox::close_from_reader`] was called.
    pub fn reader_stopped(&self) -> bool {
        self.inner.borrow().reader_stopped
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.inner.borrow().closing
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued_bytes(&self) -> usize {
        self.inner.borrow().pending.len()
    }

    /// Waits until at most `bytes` are queued (or the queue is closing), so
    /// a producer with a large backlog (sync catch-up) paces itself to the
    /// client instead of overflowing the queue. Returns `false` if closing.
    pub async fn wait_room(&self, bytes: usize) -> bool {
        poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if inner.closing {
                return Poll::Ready(false);
            }
            if inner.pending.len() <= bytes {
                return Poll::Ready(true);
            }
            inner.room_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The byte bound of this queue.
    pub fn limit_bytes(&self) -> usize {
        self.inner.borrow().limit_bytes
    }

    /// Asks the writer to stop once the queue is drained, leaving the
    /// socket open, so that an idle session can park. Refused (`false`) if
    /// anything is queued or the queue is closing.
    pub fn request_park(&self) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.closing || !inner.pending.is_empty() {
            return false;
        }
        inner.parking = true;
        inner.wake();
        true
    }

    /// Whether nothing is queued and the queue is open: a parking session
    /// checks this once its writer has stopped, since a delivery may have
    /// arrived meanwhile.
    pub fn is_idle(&self) -> bool {
        let inner = self.inner.borrow();
        !inner.closing && inner.pending.is_empty()
    }

    /// Withdraws [`Outbox::request_park`] (the session stays live).
    pub fn cancel_park(&self) {
        self.inner.borrow_mut().parking = false;
    }

    /// Waits for queued bytes and swaps them into `out` (which must be
    /// empty), or says the writer is done ([`Next`]). While it waits,
    /// neither the queue nor `out` keeps any capacity.
    pub async fn next_batch(&self, out: &mut AlignedVec) -> Next {
        debug_assert!(out.is_empty());
        poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if !inner.pending.is_empty() {
                if let Some(m) = self.m() {
                    m.outbound_dequeued(inner.pending.len());
                }
                std::mem::swap(&mut inner.pending, out);
                if inner.pending.capacity() > RETAIN_BYTES {
                    inner.pending = AlignedVec::new();
                }
                if let Some(waker) = inner.room_waker.take() {
                    waker.wake();
                }
                return Poll::Ready(Next::Write);
            }
            if inner.closing {
                return Poll::Ready(Next::Closed);
            }
            // Going idle: an empty buffer is not worth its capacity on
            // every quiet connection, and neither is the writer's batch
            // buffer, which holds the last batch's capacity once written.
            if inner.pending.capacity() > 0 {
                inner.pending = AlignedVec::new();
            }
            if out.capacity() > 0 {
                *out = AlignedVec::new();
            }
            if inner.parking {
                inner.parking = false;
                return Poll::Ready(Next::Park);
            }
            inner.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Bytes never taken by the writer (the connection died) leave the
        // queued-bytes gauge here.
        let left = self.inner.borrow().pending.len();
        if let Some(m) = self.m() {
            m.outbound_dequeued(left);
        }
    }
}

impl Inner {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
        if self.closing {
            if let Some(waker) = self.room_waker.take() {
                waker.wake();
            }
        }
    }

    fn append_disconnect(&mut self, code: ErrorCode, message: &str, retry_after_ms: u32) {
        let frame = ServerFrame {
            request_id: 0,
            body: ServerBody::Disconnect {
                code,
                message: message.to_owned(),
                retry_after_ms,
            },
        };
        let max = self.max_frame_bytes;
        let _ = encode_server(&frame, &mut self.pending, max);
        self.closing = true;
        self.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::FrameBuf;

    fn pong(n: u64) -> ServerFrame {
        ServerFrame {
            request_id: n,
            body: ServerBody::Pong { nonce: n },
        }
    }

    fn decode_all(bytes: &[u8]) -> Vec<ServerFrame> {
        let mut fb = FrameBuf::new(1 << 20);
        let mut out = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let slot = fb.read_slot().unwrap();
            let n = slot.len().min(bytes.len() - off);
            slot[..n].copy_from_slice(&bytes[off..off + n]);
            fb.commit(n);
            off += n;
            while let Some(body) = fb.next_body().unwrap() {
                let archived = tern_proto::decode_server(body).unwrap();
                out.push(rkyv::deserialize::<ServerFrame, rkyv::rancor::BoxedError>(archived).unwrap());
            }
        }
        out
    }

    #[test]
    fn overflow_replaces_queue_with_slow_consumer_notice() {
        let outbox = Outbox::new(1024, 1 << 16);
        let mut pushed = 0;
        while outbox.push(&pong(pushed + 1)).is_ok() {
            pushed += 1;
        }
        assert!(pushed > 2);
        assert!(outbox.is_closing());
        assert_eq!(outbox.push(&pong(99)), Err(PushError::Closing));
        let frames = decode_all(&outbox.inner.borrow().pending);
        assert_eq!(frames.len(), 1);
        assert!(matches!(
            frames[0].body,
            ServerBody::Disconnect {
                code: ErrorCode::SlowConsumer,
                ..
            }
        ));
    }

    #[test]
    fn batches_swap_out_everything_queued() {
        let outbox = Outbox::new(1 << 16, 1 << 16);
        for i in 1..=3 {
            outbox.push(&pong(i)).unwrap();
        }
        outbox.finish(ErrorCode::ShuttingDown, "bye", 500);
        let mut out = AlignedVec::new();
        assert_eq!(
            futures_lite::future::block_on(outbox.next_batch(&mut out)),
            Next::Write
        );
        let frames = decode_all(&out);
        assert_eq!(frames.len(), 4);
        assert!(matches!(
            frames[3].body,
            ServerBody::Disconnect {
                retry_after_ms: 500,
                ..
            }
        ));
        out.clear();
        assert_eq!(
            futures_lite::future::block_on(outbox.next_batch(&mut out)),
            Next::Closed
        );
    }

    #[test]
    fn an_idle_queue_and_its_writer_hold_no_buffer() {
        let outbox = Outbox::new(1 << 16, 1 << 16);
        outbox.push(&pong(1)).unwrap();
        let mut out = AlignedVec::new();
        assert_eq!(
            futures_lite::future::block_on(outbox.next_batch(&mut out)),
            Next::Write
        );
        out.clear();
        assert!(out.capacity() > 0);
        let waiting =
            futures_lite::future::block_on(futures_lite::future::poll_once(outbox.next_batch(&mut out)));
        assert_eq!(waiting, None);
        assert_eq!(out.capacity(), 0);
        assert_eq!(outbox.inner.borrow().pending.capacity(), 0);
    }

    #[test]
    fn a_parking_writer_drains_first_and_a_busy_queue_refuses_to_park() {
        let outbox = Outbox::new(1 << 16, 1 << 16);
        outbox.push(&pong(1)).unwrap();
        assert!(!outbox.request_park(), "something is queued");
        let mut out = AlignedVec::new();
        assert_eq!(
            futures_lite::future::block_on(outbox.next_batch(&mut out)),
            Next::Write
        );
        out.clear();
        assert!(outbox.request_park());
        // A delivery racing the park is written before the writer stops.
        outbox.push(&pong(2)).unwrap();
        assert_eq!(
            futures_lite::future::block_on(outbox.next_batch(&mut out)),
            Next::Write
        );
        out.clear();
        assert_eq!(
            futures_lite::future::block_on(outbox.next_batch(&mut out)),
            Next::Park
        );
        assert!(outbox.is_idle());
        // The request is used up: a new writer waits again.
        let waiting =
            futures_lite::future::block_on(futures_lite::future::poll_once(outbox.next_batch(&mut out)));
        assert_eq!(waiting, None);
        outbox.close();
        assert!(!outbox.is_idle());
        assert!(!outbox.request_park());
    }
}
