//! A two-shard hand-off harness for the `queue` bench.
//!
//! [`HandOff::start`] pins a producer executor to CPU 0 and a consumer
//! executor to CPU 1 (unbound where the machine has fewer cores) and joins
//! them with one bounded queue of [`QUEUE_SLOTS`] entries: glommio's
//! `shared_channel` (the consumer sleeps when the queue is empty and the
//! first push wakes it), crossbeam's `ArrayQueue` or a disruptor 4.4 ring
//! read by an `EventPoller` (neither can wake a sleeping shard, so both
//! consumers poll, yielding to their executor between empty polls). Each
//! [`HandOff::run`] moves a given number of 64-byte [`Msg64`]s end to end,
//! one per send or [`BATCH`] per send, and returns the wall time from the
//! order to the consumer's last receipt; the consumer checks that every
//! message arrived once and in order. The executors live as long as the
//! `HandOff`, so their start-up is never timed.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use disruptor::{BusySpin, EventPoller, Polling, Producer as _, SingleConsumerBarrier, SingleProducer};
use futures_lite::future::yield_now;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

/// Entries each queue holds (a message, or a batch in the batched shape).
pub const QUEUE_SLOTS: usize = 1024;
/// Messages per send in [`Shape::Batched`].
pub const BATCH: usize = 64;
/// Locked I/O memory per executor: the harness does no I/O, and a small
/// registration fits the default `RLIMIT_MEMLOCK` for non-root users.
const IO_MEMORY: usize = 1 << 20;
/// How long [`HandOff::run`] waits for a run before declaring it stuck.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A 64-byte message: a sequence number and payload, about the size of an
/// engine request without its text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Msg64 {
    pub seq: u64,
    pub payload: [u64; 7],
}

impl Msg64 {
    fn new(seq: u64) -> Msg64 {
        Msg64 {
            seq,
            payload: [seq; 7],
        }
    }
}

/// Which queue joins the two shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// glommio `shared_channel::new_bounded`: the consumer may sleep.
    SharedChannel,
    /// crossbeam `ArrayQueue`, polled by the consumer.
    ArrayQueue,
    /// disruptor 4.4 single-producer ring, `try_publish` and an `EventPoller`.
    Disruptor,
}

impl Queue {
    /// All queues, in the order the bench reports them.
    pub const ALL: [Queue; 3] = [Queue::SharedChannel, Queue::ArrayQueue, Queue::Disruptor];

    /// A short name for bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Queue::SharedChannel => "shared_channel",
            Queue::ArrayQueue => "crossbeam_array_queue",
            Queue::Disruptor => "disruptor",
        }
    }
}

/// How messages are grouped into sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One message per send.
    Single,
    /// [`BATCH`] messages per send: a `Vec` for the channel and the
    /// `ArrayQueue`, a batch publish for the disruptor.
    Batched,
}

impl Shape {
    /// Both shapes, in report order.
    pub const ALL: [Shape; 2] = [Shape::Single, Shape::Batched];

    /// A short name for bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Single => "single",
            Shape::Batched => "batch64",
        }
    }

    fn chunk(self) -> u64 {
        match self {
            Shape::Single => 1,
            Shape::Batched => BATCH as u64,
        }
    }
}

/// Why the harness could not start or finish a run.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("could not start an executor: {0}")]
    Executor(String),
    #[error("the other end of the queue went away")]
    Closed,
    #[error("the harness has stopped")]
    Stopped,
    #[error("a run of {0} messages did not finish within {RUN_TIMEOUT:?}")]
    Stuck(u64),
    #[error("message {got} arrived where {expected} was due")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("{extra} messages arrived beyond the {expected} sent")]
    TooMany { expected: u64, extra: u64 },
}

/// Two pinned executors joined by one queue, ready to time runs.
pub struct HandOff {
    to_producer: Option<mpsc::Sender<u64>>,
    to_consumer: Option<mpsc::Sender<u64>>,
    done: mpsc::Receiver<Result<(), QueueError>>,
    abort: Arc<AtomicBool>,
    executors: Vec<ExecutorJoinHandle<Result<(), QueueError>>>,
}

impl HandOff {
    /// Starts both executors and connects the queue.
    pub fn start(queue: Queue, shape: Shape) -> Result<HandOff, QueueError> {
        let (to_producer, producer_orders) = mpsc::channel();
        let (to_consumer, consumer_orders) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let abort = Arc::new(AtomicBool::new(false));
        let mut handoff = HandOff {
            to_producer: Some(to_producer),
            to_consumer: Some(to_consumer),
            done,
            abort: Arc::clone(&abort),
            executors: Vec::with_capacity(2),
        };
        let chunk = shape.chunk();
        let sides = Sides {
            producer_orders,
            consumer_orders,
            done: done_tx,
            abort,
            chunk,
        };
        match (queue, shape) {
            (Queue::SharedChannel, Shape::Single) => {
                let (tx, rx) = shared_channel::new_bounded::<Msg64>(QUEUE_SLOTS);
                handoff.spawn(sides, move || tx.connect(), move || rx.connect())?;
            }
            (Queue::SharedChannel, Shape::Batched) => {
                let (tx, rx) = shared_channel::new_bounded::<Vec<Msg64>>(QUEUE_SLOTS);
                handoff.spawn(sides, move || tx.connect(), move || rx.connect())?;
            }
            (Queue::ArrayQueue, Shape::Single) => {
                let q = Arc::new(ArrayQueue::<Msg64>::new(QUEUE_SLOTS));
                let (tx, rx) = polled_pair(q, &sides.abort);
                handoff.spawn(sides, move || async { tx }, move || async { rx })?;
            }
            (Queue::ArrayQueue, Shape::Batched) => {
                let q = Arc::new(ArrayQueue::<Vec<Msg64>>::new(QUEUE_SLOTS));
                let (tx, rx) = polled_pair(q, &sides.abort);
                handoff.spawn(sides, move || async { tx }, move || async { rx })?;
            }
            (Queue::Disruptor, _) => {
                let (poller, builder) =
                    disruptor::build_single_producer(QUEUE_SLOTS, Msg64::default, BusySpin)
                        .new_event_poller();
                let tx = RingTx {
                    producer: builder.build(),
                    abort: Arc::clone(&sides.abort),
                };
                let rx = RingRx {
                    poller,
                    abort: Arc::clone(&sides.abort),
                };
                handoff.spawn(sides, move || async { tx }, move || async { rx })?;
            }
        }
        Ok(handoff)
    }

    /// Moves `messages` messages from producer to consumer and returns the
    /// time from the order to the consumer's receipt of the last one.
    pub fn run(&mut self, messages: u64) -> Result<Duration, QueueError> {
        let (Some(to_producer), Some(to_consumer)) = (&self.to_producer, &self.to_consumer) else {
            return Err(QueueError::Stopped);
        };
        let start = Instant::now();
        to_consumer.send(messages).map_err(|_| QueueError::Stopped)?;
        to_producer.send(messages).map_err(|_| QueueError::Stopped)?;
        match self.done.recv_timeout(RUN_TIMEOUT) {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(QueueError::Stuck(messages)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(QueueError::Stopped),
        }
    }

    /// Stops both executors and reports the first error either had.
    pub fn stop(mut self) -> Result<(), QueueError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), QueueError> {
        // Closing the order channels ends both drive loops between runs;
        // the abort flag ends a polling loop stuck mid-run.
        self.to_producer = None;
        self.to_consumer = None;
        self.abort.store(true, Ordering::Relaxed);
        let mut first = Ok(());
        for executor in self.executors.drain(..) {
            let result = match executor.join() {
                Ok(result) => result,
                Err(e) => Err(QueueError::Executor(e.to_string())),
            };
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    fn spawn<TX, RX, TF, RF>(
        &mut self,
        sides: Sides,
        producer: impl FnOnce() -> TF + Send + 'static,
        consumer: impl FnOnce() -> RF + Send + 'static,
    ) -> Result<(), QueueError>
    where
        TX: Send_,
        RX: Recv,
        TF: Future<Output = TX> + 'static,
        RF: Future<Output = RX> + 'static,
    {
        let Sides {
            producer_orders,
            consumer_orders,
            done,
            abort,
            chunk,
        } = sides;
        let producer_abort = Arc::clone(&abort);
        // Both sides connect on their own executor at the same time: a
        // shared_channel sender's connect waits for the receiver's.
        let producer = executor(0, "bench-producer")
            .spawn(move || async move {
                let tx = producer().await;
                let result = drive_producer(tx, &producer_orders, chunk).await;
                if result.is_err() {
                    producer_abort.store(true, Ordering::Relaxed);
                }
                result
            })
            .map_err(|e| QueueError::Executor(e.to_string()))?;
        self.executors.push(producer);
        let consumer = executor(1, "bench-consumer")
            .spawn(move || async move {
                let rx = consumer().await;
                let result = drive_consumer(rx, &consumer_orders, &done).await;
                if result.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                result
            })
            .map_err(|e| QueueError::Executor(e.to_string()))?;
        self.executors.push(consumer);
        Ok(())
    }
}

impl Drop for HandOff {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// What both executors need besides their queue end.
struct Sides {
    producer_orders: mpsc::Receiver<u64>,
    consumer_orders: mpsc::Receiver<u64>,
    done: mpsc::Sender<Result<(), QueueError>>,
    abort: Arc<AtomicBool>,
    chunk: u64,
}

fn executor(cpu: usize, name: &str) -> LocalExecutorBuilder {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let placement = if cores >= 2 {
        Placement::Fixed(cpu)
    } else {
        Placement::Unbound
    };
    LocalExecutorBuilder::new(placement)
        .name(name)
        .io_memory(IO_MEMORY)
}

/// Waits for orders (blocking the executor thread is fine: nothing else
/// runs on it) and sends each run's messages in chunks.
async fn drive_producer(
    mut tx: impl Send_,
    orders: &mpsc::Receiver<u64>,
    chunk: u64,
) -> Result<(), QueueError> {
    while let Ok(messages) = orders.recv() {
        let mut next = 0;
        while next < messages {
            let end = next.saturating_add(chunk).min(messages);
            tx.send(next..end).await?;
            next = end;
        }
    }
    Ok(())
}

/// Receives each run's messages, checks them, and reports the run done.
async fn drive_consumer(
    mut rx: impl Recv,
    orders: &mpsc::Receiver<u64>,
    done: &mpsc::Sender<Result<(), QueueError>>,
) -> Result<(), QueueError> {
    while let Ok(messages) = orders.recv() {
        let mut check = Check {
            expected: messages,
            next: 0,
            error: None,
        };
        while check.next < messages {
            if let Err(e) = rx.recv(&mut check).await {
                let _ = done.send(Err(QueueError::Closed));
                return Err(e);
            }
        }
        let outcome = match check.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if done.send(outcome).is_err() {
            break;
        }
    }
    Ok(())
}

/// Counts a run's messages and records the first one out of place.
struct Check {
    expected: u64,
    next: u64,
    error: Option<QueueError>,
}

impl Check {
    fn see(&mut self, msg: &Msg64) {
        if self.error.is_none() {
            if self.next >= self.expected {
                self.error = Some(QueueError::TooMany {
                    expected: self.expected,
                    extra: 1,
                });
            } else if msg.seq != self.next {
                self.error = Some(QueueError::OutOfOrder {
                    got: msg.seq,
                    expected: self.next,
                });
            }
        }
        self.next += 1;
    }
}

/// The producer end of a queue: sends the messages `seqs` as one send.
/// (`Send_`, not `Send`, to keep clear of the marker trait.)
#[allow(async_fn_in_trait)]
trait Send_ {
    async fn send(&mut self, seqs: Range<u64>) -> Result<(), QueueError>;
}

/// The consumer end: receives at least one message into `check`.
#[allow(async_fn_in_trait)]
trait Recv {
    async fn recv(&mut self, check: &mut Check) -> Result<(), QueueError>;
}

impl Send_ for ConnectedSender<Msg64> {
    async fn send(&mut self, seqs: Range<u64>) -> Result<(), QueueError> {
        for seq in seqs {
            ConnectedSender::send(self, Msg64::new(seq))
                .await
                .map_err(|_| QueueError::Closed)?;
        }
        Ok(())
    }
}

impl Send_ for ConnectedSender<Vec<Msg64>> {
    async fn send(&mut self, seqs: Range<u64>) -> Result<(), QueueError> {
        let batch = seqs.map(Msg64::new).collect();
        ConnectedSender::send(self, batch)
            .await
            .map_err(|_| QueueError::Closed)
    }
}

impl Recv for ConnectedReceiver<Msg64> {
    async fn recv(&mut self, check: &mut Check) -> Result<(), QueueError> {
        let msg = ConnectedReceiver::recv(self).await.ok_or(QueueError::Closed)?;
        check.see(&msg);
        Ok(())
    }
}

impl Recv for ConnectedReceiver<Vec<Msg64>> {
    async fn recv(&mut self, check: &mut Check) -> Result<(), QueueError> {
        let batch = ConnectedReceiver::recv(self).await.ok_or(QueueError::Closed)?;
        batch.iter().for_each(|msg| check.see(msg));
        Ok(())
    }
}

/// One end of a polled `ArrayQueue`; both ends yield to their executor
/// while the queue is full or empty.
struct Polled<T> {
    queue: Arc<ArrayQueue<T>>,
    abort: Arc<AtomicBool>,
}

fn polled_pair<T>(queue: Arc<ArrayQueue<T>>, abort: &Arc<AtomicBool>) -> (Polled<T>, Polled<T>) {
    let tx = Polled {
        queue: Arc::clone(&queue),
        abort: Arc::clone(abort),
    };
    let rx = Polled {
        queue,
        abort: Arc::clone(abort),
    };
    (tx, rx)
}

impl<T> Polled<T> {
    async fn push(&self, mut item: T) -> Result<(), QueueError> {
        loop {
            match self.queue.push(item) {
                Ok(()) => return Ok(()),
                Err(back) => item = back,
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(QueueError::Closed);
            }
            yield_now().await;
        }
    }

    async fn pop(&self) -> Result<T, QueueError> {
        loop {
            if let Some(item) = self.queue.pop() {
                return Ok(item);
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(QueueError::Closed);
            }
            yield_now().await;
        }
    }
}

impl Send_ for Polled<Msg64> {
    async fn send(&mut self, seqs: Range<u64>) -> Result<(), QueueError> {
        for seq in seqs {
            self.push(Msg64::new(seq)).await?;
        }
        Ok(())
    }
}

impl Send_ for Polled<Vec<Msg64>> {
    async fn send(&mut self, seqs: Range<u64>) -> Result<(), QueueError> {
        self.push(seqs.map(Msg64::new).collect()).await
    }
}

impl Recv for Polled<Msg64> {
    async fn recv(&mut self, check: &mut Check) -> Result<(), QueueError> {
        let msg = self.pop().await?;
        check.see(&msg);
        Ok(())
    }
}

impl Recv for Polled<Vec<Msg64>> {
    async fn recv(&mut self, check: &mut Check) -> Result<(), QueueError> {
        let batch = self.pop().await?;
        batch.iter().for_each(|msg| check.see(msg));
        Ok(())
    }
}

/// The disruptor's producer: never the spinning `publish`, which would
/// hold the shard's core while the ring is full.
struct RingTx {
    producer: SingleProducer<Msg64, SingleConsumerBarrier>,
    abort: Arc<AtomicBool>,
}

impl Send_ for RingTx {
    async fn send(&mut self, seqs: Range<u64>) -> Result<(), QueueError> {
        let count = usize::try_from(seqs.end - seqs.start).unwrap_or(usize::MAX);
        loop {
            let published = if count == 1 {
                let seq = seqs.start;
                self.producer.try_publish(|e| *e = Msg64::new(seq)).is_ok()
            } else {
                let first = seqs.start;
                self.producer
                    .try_batch_publish(count, |events| {
                        for (seq, e) in (first..).zip(events) {
                            *e = Msg64::new(seq);
                        }
                    })
                    .is_ok()
            };
            if published {
                return Ok(());
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(QueueError::Closed);
            }
            yield_now().await;
        }
    }
}

struct RingRx {
    poller: EventPoller<Msg64, disruptor::SingleProducerBarrier>,
    abort: Arc<AtomicBool>,
}

impl Recv for RingRx {
    async fn recv(&mut self, check: &mut Check) -> Result<(), QueueError> {
        loop {
            match self.poller.poll() {
                Ok(mut events) => {
                    for msg in &mut events {
                        check.see(msg);
                    }
                    return Ok(());
                }
                Err(Polling::Shutdown) => return Err(QueueError::Closed),
                Err(Polling::NoEvents) => {}
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(QueueError::Closed);
            }
            yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_moves_every_message_in_order() {
        for queue in Queue::ALL {
            for shape in Shape::ALL {
                let mut handoff = HandOff::start(queue, shape).unwrap();
                // Several runs, with odd sizes, so partial batches and
                // reuse of a connected pair are covered.
                for messages in [1, 63, 1000, 10_000 + 7] {
                    handoff
                        .run(messages)
                        .unwrap_or_else(|e| panic!("{queue:?}/{shape:?}/{messages}: {e}"));
                }
                handoff.stop().unwrap();
            }
        }
    }

    #[test]
    fn dropping_a_started_handoff_does_not_hang() {
        for queue in Queue::ALL {
            drop(HandOff::start(queue, Shape::Single).unwrap());
        }
    }
}
