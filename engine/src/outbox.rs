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
//! twice the bound (the queue, and the batch the writer swapped out of it
//! and is still writing to a slow but steady reader), never at what
//! others send.

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
    /// The session's reader, waiting for the peer, to end its read when the
    /// queue closes ([`Outbox::closing`]).
    reader_waker: Option<Waker>,
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
                reader_waker: None,
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

    /// Completes once the queue is closing. The session's reader races its
    /// socket reads against it, so a close decided elsewhere (a kick, a
    /// slow consumer, shutdown) ends a read still waiting without shutting
    /// down reading, which would make the kernel reset the connection
    /// should the peer still send, dropping the closing frame.
    pub async fn closing(&self) {
        poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if inner.closing {
                return Poll::Ready(());
            }
            match &inner.reader_waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => inner.reader_waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
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
            if let Some(waker) = self.reader_waker.take() {
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

    /// Whether `closing` has completed, polled once with a waker that
    /// records being woken.
    fn closing_done(outbox: &Outbox, woken: &Arc<std::sync::atomic::AtomicBool>) -> bool {
        use std::future::Future as _;
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let waker = Waker::from(Arc::new(Flag(woken.clone())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut closing = std::pin::pin!(outbox.closing());
        closing.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn the_reader_waiting_on_closing_is_woken_by_every_way_of_closing() {
        type Close = fn(&Outbox);
        let closes: [(&str, Close); 4] = [
            ("close", |o| o.close()),
            ("finish", |o| o.finish(ErrorCode::ShuttingDown, "bye", 0)),
            ("kill", |o| o.kill(ErrorCode::AuthFailed, "out", 0)),
            ("overflow", |o| while o.push(&pong(1)).is_ok() {}),
        ];
        for (how, close) in closes {
            let outbox = Outbox::new(1024, 1 << 16);
            let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
            outbox.push(&pong(1)).unwrap();
            assert!(!closing_done(&outbox, &woken), "{how}: open");
            close(&outbox);
            assert!(woken.load(std::sync::atomic::Ordering::SeqCst), "{how}: woken");
            assert!(closing_done(&outbox, &woken), "{how}: done");
        }
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
