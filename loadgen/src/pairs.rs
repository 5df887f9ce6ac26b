//! The `pairs` scenario: P sender→receiver pairs, 1:1 messages.
//!
//! Pair p is users 2p (sender) and 2p+1 (receiver), each on its own
//! connection, both on the same executor so the window (messages sent but
//! not yet delivered) is a plain local semaphore. Closed loop (default):
//! the sender keeps `--window` messages in flight and batches whatever the
//! window allows into one write. Open loop (`--rate`): message k of pair p
//! is due at start + (k + p/P)/rate — the P pairs of an executor are spread
//! evenly over one period, as independent clients would be, instead of all
//! sending at the same instant, and the executors interleave theirs
//! (`open_loop_phase_ns`) — and carries that intended time, so when the server (or
//! the window) holds the sender back the wait counts as latency — no
//! coordinated omission. Sends due inside the window that the sender still
//! has not made when the run closes are counted as `unsent` (and as
//! errors), each timed from its intended time to the close. Receivers
//! check the sender and the order of every message; anything unexpected
//! is an error. Senders time each `Sent` from the same intended time: the
//! acknowledgement latency, reported beside the delivery latency.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::sync::Semaphore;
use tern_proto::{ArchivedServerBody, ClientBody, Content, UserId};

use crate::cli::PairsArgs;
use crate::stats::{ExecOutcome, LiveCounters};
use crate::users::obtain_tokens;
use crate::verify::{StreamCheck, Verdict};
use crate::wire::{
    due_before, due_ns, frame_failure, keep_alive, message_body, now_ns, open_loop_period_ns,
    open_loop_starts_ns, open_session, parse_message_body, read_frames, sleep_until_ns, Writer,
};
use crate::worker::{for_each_bounded, secs_between, wait_until, Ctx, CONNECT_CONCURRENCY};

/// One running pair.
struct Pair {
    sender: Rc<Writer>,
    receiver_user: UserId,
    /// Units = messages that may still be put in flight.
    window: Semaphore,
    sent: Cell<u64>,
    delivered: Cell<u64>,
    check: Rc<RefCell<StreamCheck>>,
    sender_done: Cell<bool>,
    sends: SendTimes,
}

/// The intended send time of each message in flight, by `client_msg_id`,
/// so that its `Sent` can be timed. A fixed ring of four windows: the
/// window bounds what is sent but not yet delivered, and a `Sent` trails
/// its delivery by far less than three windows. A slot already reused
/// (which would take an acknowledgement lagging that far) is not timed
/// rather than timed wrongly.
struct SendTimes {
    slots: RefCell<Vec<(u64, u64)>>,
}

impl SendTimes {
    fn new(window: usize) -> SendTimes {
        let len = window.saturating_mul(4).max(1).next_power_of_two();
        SendTimes {
            slots: RefCell::new(vec![(0, 0); len]),
        }
    }

    fn slot(len: usize, client_msg_id: u64) -> usize {
        (client_msg_id as usize) & (len - 1)
    }

    fn sent(&self, client_msg_id: u64, intended_ns: u64) {
        let mut slots = self.slots.borrow_mut();
        let at = Self::slot(slots.len(), client_msg_id);
        slots[at] = (client_msg_id, intended_ns);
    }

    /// The intended send time of `client_msg_id`, if its slot still holds
    /// it; the slot is emptied, so what is left at the close is what was
    /// sent and never acknowledged.
    fn acked(&self, client_msg_id: u64) -> Option<u64> {
        let mut slots = self.slots.borrow_mut();
        let at = Self::slot(slots.len(), client_msg_id);
        let (id, intended_ns) = slots[at];
        if id != client_msg_id || client_msg_id == 0 {
            return None;
        }
        slots[at] = (0, 0);
        Some(intended_ns)
    }

    /// The intended send times of the sends up to `last_written` (the
    /// highest `client_msg_id` whose batch was written whole) not
    /// acknowledged yet. A slot is filled before its batch is written, so
    /// a batch still being written at the close has slots too; it is
    /// counted as unsent, and must not be timed here as well.
    fn unacked(&self, last_written: u64) -> Vec<u64> {
        let slots = self.slots.borrow();
        slots
            .iter()
            .filter(|&&(id, _)| id != 0 && id <= last_written)
            .map(|&(_, intended_ns)| intended_ns)
            .collect()
    }
}

pub async fn run(ctx: Rc<Ctx>, args: PairsArgs) -> ExecOutcome {
    let pairs = ctx.plan.exec_share(args.pairs, ctx.exec);
    let users = 2 * pairs.start..2 * pairs.end;
    let tokens = Rc::new(obtain_tokens(&ctx, users.clone()).await);
    ctx.setup_done().await;

    let running: Rc<std::cell::RefCell<Vec<Rc<Pair>>>> = Rc::default();
    let tasks: Rc<std::cell::RefCell<Vec<glommio::Task<()>>>> = Rc::default();
    let failed = Rc::new(Cell::new(0u64));
    let window = args.window;
    let start_ns = now_ns();
    let last_done_ns = Rc::new(Cell::new(start_ns));
    {
        let (ctx, tokens, running, tasks, failed, last_done_ns) = (
            ctx.clone(),
            tokens.clone(),
            running.clone(),
            tasks.clone(),
            failed.clone(),
            last_done_ns.clone(),
        );
        let first_pair = pairs.start;
        for_each_bounded(pairs.len(), CONNECT_CONCURRENCY, move |i| {
            let (ctx, tokens, running, tasks, failed, last_done_ns) = (
                ctx.clone(),
                tokens.clone(),
                running.clone(),
                tasks.clone(),
                failed.clone(),
                last_done_ns.clone(),
            );
            async move {
                match connect_pair(&ctx, &tokens, first_pair + i, 2 * i, window).await {
                    Some((pair, pair_tasks)) => {
                        running.borrow_mut().push(pair);
                        tasks.borrow_mut().extend(pair_tasks);
                    }
                    None => failed.set(failed.get() + 1),
                }
                last_done_ns.set(now_ns());
            }
        })
        .await;
    }
    let connect_secs = secs_between(start_ns, last_done_ns.get());
    let pairs_up = running.borrow().clone();
    ctx.connected().await;

    let start_ns = now_ns();
    let end_ns = start_ns + ctx.plan.cli.common.duration().as_nanos() as u64;
    ctx.set_window_end(end_ns);
    ctx.recorder.time_acks();
    let firsts = open_loop_starts_ns(start_ns, args.rate, pairs_up.len(), ctx.slot());
    let senders: Vec<_> = pairs_up
        .iter()
        .zip(&firsts)
        .map(|(pair, &first_ns)| {
            let (ctx, pair, args) = (ctx.clone(), pair.clone(), args.clone());
            glommio::spawn_local(async move {
                let result = send_loop(&pair, &args, ctx.plan.msg_id_base, first_ns, end_ns).await;
                pair.sender_done.set(true);
                if let Err(e) = result {
                    if !ctx.closing.get() {
                        ctx.fail("sending", &e);
                    }
                }
            })
        })
        .collect();
    sleep_until_ns(end_ns).await;
    let all_delivered = || {
        pairs_up
            .iter()
            .all(|p| p.sender_done.get() && p.check.borrow().unique() >= p.sent.get())
    };
    wait_until(ctx.plan.cli.common.drain(), all_delivered).await;
    ctx.closing.set(true);
    let close_ns = now_ns();
    let schedule = firsts.iter().copied().zip(pairs_up.iter().map(|p| p.sent.get()));
    let unsent = ctx
        .recorder
        .record_all_unsent(args.rate, schedule, end_ns, close_ns);
    // Sent and still not acknowledged at the close: at least that late.
    for pair in &pairs_up {
        let last_written = ctx.plan.msg_id_base + pair.sent.get();
        for intended_ns in pair.sends.unacked(last_written) {
            ctx.recorder.record_ack_ns(close_ns.saturating_sub(intended_ns));
        }
    }

    let sent: u64 = pairs_up.iter().map(|p| p.sent.get()).sum();
    let delivered: u64 = pairs_up.iter().map(|p| p.delivered.get()).sum();
    let mut verdict = Verdict::default();
    for p in &pairs_up {
        verdict.add(p.check.borrow().verdict(p.sent.get()));
    }
    let undelivered = verdict.lost;
    let outcome = ExecOutcome {
        users: users.len() as u64,
        connections: 2 * pairs_up.len() as u64,
        connect_failures: failed.get(),
        connect_secs,
        sent,
        delivered,
        delivered_in_window: ctx.in_window.get(),
        undelivered,
        unsent,
        target_send_per_s: args.rate.map_or(0.0, |r| r * pairs.len() as f64),
        window_secs: secs_between(start_ns, end_ns),
        verdict,
        ..ExecOutcome::empty()
    };
    let outcome = crate::worker::finish_outcome(&ctx, outcome);
    drop(senders);
    drop(tasks);
    outcome
}

/// Connects pair `pair_no` (tokens at `token_at` and `token_at + 1`) and
/// starts its reader tasks. `None` when either side failed (counted).
async fn connect_pair(
    ctx: &Rc<Ctx>,
    tokens: &[Option<Vec<u8>>],
    pair_no: usize,
    token_at: usize,
    window: usize,
) -> Option<(Rc<Pair>, Vec<glommio::Task<()>>)> {
    let (Some(Some(sender_token)), Some(Some(receiver_token))) =
        (tokens.get(token_at), tokens.get(token_at + 1))
    else {
        return None;
    };
    let common = &ctx.plan.cli.common;
    let timeout = common.connect_timeout();
    let sender = open_session(common.server, ctx.source(2 * pair_no), sender_token, timeout).await;
    let receiver = open_session(
        common.server,
        ctx.source(2 * pair_no + 1),
        receiver_token,
        timeout,
    )
    .await;
    let ((sender, sender_user), (receiver, receiver_user)) = match (sender, receiver) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            ctx.fail("connecting a pair", &e);
            return None;
        }
    };
    let sender_ping = sender.limits().ping_interval();
    let receiver_ping = receiver.limits().ping_interval();
    let (sender_reader, sender_writer) = sender.into_running();
    let (receiver_reader, receiver_writer) = receiver.into_running();
    let pair = Rc::new(Pair {
        sender: sender_writer.clone(),
        receiver_user,
        window: Semaphore::new(window as u64),
        sent: Cell::new(0),
        delivered: Cell::new(0),
        check: Rc::default(),
        sender_done: Cell::new(false),
        sends: SendTimes::new(window),
    });
    LiveCounters::add(&ctx.live().open_connections, 2);

    // The sender's side: acks, and any error answers.
    let ack_ctx = ctx.clone();
    let ack_pair = pair.clone();
    let acks = read_frames(sender_reader, move |frame| {
        match (&frame.body, frame_failure(frame)) {
            (ArchivedServerBody::Disconnect { .. }, Some(failure)) => return Err(failure),
            (_, Some(failure)) => ack_ctx.fail("a send was refused", &failure),
            (ArchivedServerBody::Sent { client_msg_id, .. }, None) => {
                if let Some(intended_ns) = ack_pair.sends.acked(client_msg_id.to_native()) {
                    ack_ctx
                        .recorder
                        .record_ack_ns(now_ns().saturating_sub(intended_ns));
                }
            }
            _ => {}
        }
        Ok(())
    });
    let sender_task = spawn_connection(ctx.clone(), acks, sender_writer, sender_ping, "sender");

    // The receiver's side: deliveries.
    let recv_pair = pair.clone();
    let on_delivery = deliveries_from(ctx.clone(), sender_user, pair.check.clone(), move || {
        recv_pair.delivered.set(recv_pair.delivered.get() + 1);
        recv_pair.window.signal(1);
    });
    let deliveries = read_frames(receiver_reader, on_delivery);
    let receiver_task = spawn_connection(
        ctx.clone(),
        deliveries,
        receiver_writer,
        receiver_ping,
        "receiver",
    );
    Some((pair, vec![sender_task, receiver_task]))
}

/// A frame handler for a connection that receives the load generator's
/// messages from `sender`: it checks the sender, records each sequence
/// number in `check` (loss, duplicates, reordering), records the latency
/// from the intended send time, counts the delivery (and whether it came
/// inside the measured window), and calls
/// `delivered`. A `Disconnect` ends the connection; other error frames and
/// foreign messages are counted.
pub fn deliveries_from(
    ctx: Rc<Ctx>,
    sender: UserId,
    check: Rc<RefCell<StreamCheck>>,
    delivered: impl Fn() + 'static,
) -> impl FnMut(&tern_proto::ArchivedServerFrame) -> Result<(), crate::wire::WireError> {
    move |frame| {
        match &frame.body {
            ArchivedServerBody::Message(msg) => {
                let now = now_ns();
                let Some((intended_ns, seq)) = parse_message_body(msg.content.body.as_slice()) else {
                    ctx.fail("delivery", &unexpected("a message without a loadgen header"));
                    return Ok(());
                };
                if msg.from.to_native() != sender {
                    ctx.fail("delivery", &unexpected("a message from a stranger"));
                    return Ok(());
                }
                check.borrow_mut().observe(seq);
                ctx.recorder.record_ns(now.saturating_sub(intended_ns));
                delivered();
                LiveCounters::add(&ctx.live().delivered, 1);
                ctx.count_delivery_in_window(now);
            }
            _ => {
                if let Some(failure) = frame_failure(frame) {
                    if matches!(frame.body, ArchivedServerBody::Disconnect { .. }) {
                        return Err(failure);
                    }
                    ctx.fail("receiver got an error", &failure);
                }
            }
        }
        Ok(())
    }
}

fn unexpected(what: &str) -> crate::wire::WireError {
    crate::wire::WireError::Protocol(format!("unexpected {what}"))
}

/// Runs a connection's reader together with its keep-alive pings until
/// either fails; a failure outside shutdown is counted.
pub fn spawn_connection(
    ctx: Rc<Ctx>,
    reading: impl std::future::Future<Output = crate::wire::WireError> + 'static,
    writer: Rc<Writer>,
    ping: Option<Duration>,
    role: &'static str,
) -> glommio::Task<()> {
    glommio::spawn_local(async move {
        let ended = match ping {
            Some(interval) => future::or(reading, keep_alive(writer, interval)).await,
            None => reading.await,
        };
        ctx.live()
            .open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if !ctx.closing.get() {
            ctx.fail(&format!("{role} connection ended"), &ended);
        }
    })
}

/// The open-loop period of one pair's sender (`None`: closed loop). Never
/// 0: above 1e9 msgs/s a 0 period made every message due at the start,
/// and the sender wrote without end (the loop ends at the first message
/// due at or after the window's end).
fn send_period_ns(args: &PairsArgs) -> Option<u64> {
    args.rate.map(open_loop_period_ns)
}

/// Sends until `end_ns`: closed loop, or open loop at `args.rate`.
async fn send_loop(
    pair: &Pair,
    args: &PairsArgs,
    msg_id_base: u64,
    start_ns: u64,
    end_ns: u64,
) -> Result<(), crate::wire::WireError> {
    let period_ns = send_period_ns(args);
    let mut seq = 0u64;
    loop {
        if let Some(period) = period_ns {
            let due = due_ns(start_ns, seq, period);
            if due >= end_ns {
                return Ok(());
            }
            sleep_until_ns(due).await;
        } else if now_ns() >= end_ns {
            return Ok(());
        }
        // Wait for room in the window, then take all the room there is.
        pair.window
            .acquire(1)
            .await
            .map_err(|e| crate::wire::WireError::Protocol(format!("window: {e}")))?;
        let mut batch = 1u64;
        let now = now_ns();
        // Open loop: only messages already due, and due inside the window
        // (the window's count is what the run accounts for), may join.
        let due_count = match period_ns {
            Some(period) => {
                due_before(start_ns, period, now.saturating_add(1).min(end_ns)).saturating_sub(seq)
            }
            None => u64::MAX,
        };
        while batch < due_count.min(args.window as u64) && matches!(pair.window.try_acquire(1), Ok(true)) {
            batch += 1;
        }
        let bodies = (0..batch).map(|i| {
            let this_seq = seq + i;
            // Closed loop: the message is "intended" when it is sent.
            let intended = period_ns.map_or(now, |p| due_ns(start_ns, this_seq, p));
            let client_msg_id = msg_id_base + this_seq + 1;
            pair.sends.sent(client_msg_id, intended);
            ClientBody::SendDirect {
                to: pair.receiver_user,
                client_msg_id,
                content: Content::text(message_body(intended, this_seq, args.payload_bytes)),
            }
        });
        let bodies: Vec<_> = bodies.collect();
        pair.sender.send_batch(bodies).await?;
        seq += batch;
        pair.sent.set(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::{send_period_ns, SendTimes};
    use crate::cli::PairsArgs;

    #[test]
    fn open_loop_period_is_never_zero() {
        let at = |rate| {
            send_period_ns(&PairsArgs {
                pairs: 1,
                window: 1,
                payload_bytes: 64,
                rate,
            })
        };
        assert_eq!(at(None), None, "closed loop");
        assert_eq!(at(Some(1_000.0)), Some(1_000_000));
        // Above one message per ns the period was 0: every send due at
        // the start, and the window's end never reached.
        assert_eq!(at(Some(2e9)), Some(1));
        assert_eq!(at(Some(1e300)), Some(1));
    }

    #[test]
    fn send_times_answer_for_messages_in_flight_only() {
        let times = SendTimes::new(2); // 8 slots
        for id in 1..=8 {
            times.sent(id, 1_000 * id);
        }
        assert_eq!(times.acked(3), Some(3_000));
        assert_eq!(times.acked(9), None, "never sent");
        assert_eq!(times.acked(0), None, "no message has id 0");
        times.sent(11, 11_000);
        assert_eq!(times.acked(3), None, "slot reused: not timed");
        assert_eq!(times.acked(11), Some(11_000));
    }

    #[test]
    fn a_batch_still_being_written_is_not_timed_as_unacknowledged() {
        let times = SendTimes::new(2);
        for id in 1..=6 {
            times.sent(id, 1_000 * id);
        }
        times.acked(1);
        // Batches up to id 4 written; 5 and 6 still being written at the
        // close (counted as unsent instead).
        let mut late = times.unacked(4);
        late.sort_unstable();
        assert_eq!(late, vec![2_000, 3_000, 4_000]);
    }
}
