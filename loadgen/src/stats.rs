//! Counting and latency recording inside one worker process.
//!
//! Each executor records latencies into its own histograms (no sharing on
//! the hot path) and bumps a few relaxed atomic counters that the process's
//! main thread reads once a second for the progress line. At the end each
//! executor hands back an [`ExecOutcome`]; the worker merges them into one
//! result for the coordinator.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

use crate::verify::Verdict;
use crate::wire::{due_before, due_ns, open_loop_period_ns};

/// Highest latency recorded, in µs (larger values saturate here): 10 min.
pub const MAX_LATENCY_US: u64 = 600_000_000;

/// A latency histogram in µs with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants well inside what hdrhistogram supports.
    match Histogram::new_with_bounds(1, MAX_LATENCY_US, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds rejected: {e}"),
    }
}

/// Counters the progress line reads; written by one executor, read by the
/// process's main thread.
#[derive(Default)]
pub struct LiveCounters {
    /// Users whose token is ready (setup progress).
    pub users_ready: AtomicU64,
    /// Authenticated connections currently open.
    pub open_connections: AtomicU64,
    /// Messages (deliveries) received so far.
    pub delivered: AtomicU64,
    /// Everything that went wrong so far.
    pub errors: AtomicU64,
    /// p99 of the last second's latencies, µs.
    pub interval_p99_us: AtomicU64,
}

impl LiveCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn error(&self) {
        Self::add(&self.errors, 1);
    }
}

/// One executor's latency histograms: the whole run and the current second,
/// and (`pairs`) the senders' acknowledgement latency over the whole run.
pub struct Recorder {
    pub total: RefCell<Histogram<u64>>,
    interval: RefCell<Histogram<u64>>,
    pub acks: RefCell<Histogram<u64>>,
    /// The run times acknowledgements ([`Recorder::time_acks`]): a message
    /// never sent is then as late in `acks` as in `total`.
    acks_timed: Cell<bool>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            total: RefCell::new(new_histogram()),
            interval: RefCell::new(new_histogram()),
            acks: RefCell::new(new_histogram()),
            acks_timed: Cell::new(false),
        }
    }

    /// Says this run times each send's acknowledgement into `acks`, so
    /// that [`Recorder::record_unsent`] counts the messages never sent
    /// there too: an ack latency left without them would be measured
    /// over the messages that got through, exactly the coordinated
    /// omission the open loop avoids for deliveries.
    pub fn time_acks(&self) {
        self.acks_timed.set(true);
    }

    /// Records one latency in nanoseconds (rounded up to whole µs).
    pub fn record_ns(&self, latency_ns: u64) {
        let us = as_recorded_us(latency_ns);
        self.total.borrow_mut().saturating_record(us);
        self.interval.borrow_mut().saturating_record(us);
    }

    /// Records one acknowledgement latency (intended send time to the
    /// sender's `Sent`) in nanoseconds.
    pub fn record_ack_ns(&self, latency_ns: u64) {
        self.acks
            .borrow_mut()
            .saturating_record(as_recorded_us(latency_ns));
    }

    /// Accounts for an open-loop sender whose messages start at
    /// `first_ns`, one per `period_ns`, and have been sent up to `sent`
    /// when the run closes at `close_ns`: every message due before
    /// `end_ns` but never sent is recorded as late by close − intended
    /// (it was at least that late; leaving it out is coordinated
    /// omission: a sender that falls behind would hide exactly the
    /// latency it failed to measure). Each message weighs `deliveries`
    /// samples (1 for a 1:1 message; a group's members but the publisher),
    /// as each delivered copy of one is a sample. Returns how many
    /// messages there were.
    pub fn record_unsent(
        &self,
        first_ns: u64,
        period_ns: u64,
        end_ns: u64,
        sent: u64,
        close_ns: u64,
        deliveries: u64,
    ) -> u64 {
        let deliveries = deliveries.max(1);
        let period = period_ns.max(1);
        let due = due_before(first_ns, period, end_ns);
        let unsent = due.saturating_sub(sent);
        let mut total = self.total.borrow_mut();
        let mut acks = self.acks_timed.get().then(|| self.acks.borrow_mut());
        // Up to rate × duration messages: each run of them that rounds to
        // the same µs is one record, so a sender far behind at a high
        // rate costs at most one record per µs of the window.
        let mut k = sent.min(due);
        while k < due {
            let latency_ns = close_ns.saturating_sub(due_ns(first_ns, k, period));
            let us = as_recorded_us(latency_ns);
            // Later messages wait less; those still above `floor_ns`
            // round to `us` too (1 µs takes everything below).
            let last = if us <= 1 {
                due - 1
            } else {
                let floor_ns = (us - 1) * 1000 + 1;
                let room = close_ns.saturating_sub(first_ns).saturating_sub(floor_ns);
                (room / period).clamp(k, due - 1)
            };
            total.saturating_record_n(us, (last - k + 1).saturating_mul(deliveries));
            if let Some(acks) = acks.as_mut() {
                acks.saturating_record_n(us, last - k + 1);
            }
            k = last + 1;
        }
        unsent
    }

    /// [`Recorder::record_unsent`] for each sender, given as (first_ns,
    /// sent), of an open loop at `rate`; returns their total. A closed
    /// loop (`None`) has no schedule, so nothing is ever due unsent.
    pub fn record_all_unsent(
        &self,
        rate: Option<f64>,
        senders: impl IntoIterator<Item = (u64, u64)>,
        end_ns: u64,
        close_ns: u64,
    ) -> u64 {
        self.record_all_unsent_to(rate, senders, end_ns, close_ns, 1)
    }

    /// [`Recorder::record_all_unsent`] for messages of `deliveries`
    /// receivers each (a group of `deliveries + 1` members): every
    /// receiver of a delivered message is a sample, so an unsent message
    /// weighs as much as `deliveries` late ones. Returns the unsent
    /// messages (not their deliveries).
    pub fn record_all_unsent_to(
        &self,
        rate: Option<f64>,
        senders: impl IntoIterator<Item = (u64, u64)>,
        end_ns: u64,
        close_ns: u64,
        deliveries: u64,
    ) -> u64 {
        let Some(rate) = rate else {
            return 0;
        };
        let period = open_loop_period_ns(rate);
        senders
            .into_iter()
            .map(|(first_ns, sent)| self.record_unsent(first_ns, period, end_ns, sent, close_ns, deliveries))
            .sum()
    }

    /// The p99 of what was recorded since the last call (0 if nothing), and
    /// starts a new interval.
    pub fn take_interval_p99(&self) -> u64 {
        let mut interval = self.interval.borrow_mut();
        let p99 = if interval.is_empty() {
            0
        } else {
            interval.value_at_quantile(0.99)
        };
        interval.reset();
        p99
    }
}

/// Nanoseconds as recorded: whole µs rounded up, within the histogram's range.
fn as_recorded_us(latency_ns: u64) -> u64 {
    latency_ns.div_ceil(1000).clamp(1, MAX_LATENCY_US)
}

/// What one executor measured.
pub struct ExecOutcome {
    pub latency: Histogram<u64>,
    /// `pairs`: intended send time to the sender's `Sent` (empty elsewhere).
    pub ack_latency: Histogram<u64>,
    pub users: u64,
    pub connections: u64,
    pub connect_failures: u64,
    /// Seconds from the first connection attempt to the last one finishing.
    pub connect_secs: f64,
    pub sent: u64,
    /// Deliveries received at any time.
    pub delivered: u64,
    /// Deliveries received inside the measured window (throughput basis).
    pub delivered_in_window: u64,
    /// Deliveries that never arrived within the drain time.
    pub undelivered: u64,
    /// Open loops: messages due inside the window that the senders never
    /// got to send before the run closed (timed up to the close).
    pub unsent: u64,
    pub errors: u64,
    /// Length of the measured window, seconds.
    pub window_secs: f64,
    /// Loss, duplication and reordering over every stream received.
    pub verdict: Verdict,
    pub reconnects: u64,
    pub reconnect_failures: u64,
    /// `offline`: seconds the backlog took to be acknowledged.
    pub backlog_secs: f64,
    /// Open loops (`mix`, `pairs --rate`, `groups`): the send rate asked
    /// of this executor; `mix`: offline users who caught up by `Sync`.
    pub target_send_per_s: f64,
    pub synced: u64,
    /// `churn`: `Disconnect { ShuttingDown }` frames received; when the
    /// first unplanned loss happened and when every session was live
    /// again (unix µs; `None`: no loss, or not all came back); trickle
    /// messages never acknowledged.
    pub shutdown_disconnects: u64,
    /// `churn --server-crashes`: live sessions lost without a `Disconnect`.
    pub abrupt_losses: u64,
    pub outage_start_unix_us: Option<u64>,
    pub outage_end_unix_us: Option<u64>,
    pub unacked: u64,
    pub resent: u64,
    /// `presence`: what the friends heard.
    pub presence: Option<PresenceTally>,
}

/// What the `presence` scenario counted ([`crate::presence`]): pushes
/// owed and received, and what was wrong at the end.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PresenceTally {
    /// Online pushes owed: a friend was logged in when a user's login began.
    pub expected: u64,
    /// Owed pushes that arrived.
    pub met: u64,
    /// Online pushes timed: the first per login of a user at each friend.
    pub timed: u64,
    /// Owed pushes a later login of the same user replaced.
    pub superseded: u64,
    /// Owed pushes a drop of either side called off.
    pub cancelled: u64,
    /// Owed pushes that never arrived.
    pub missing: u64,
    pub online_pushes: u64,
    pub offline_pushes: u64,
    /// Pushes naming someone who is not a friend of the receiver.
    pub foreign: u64,
    /// At the end, with every user online: friends a session did not see
    /// online (its `FriendList` answer and the pushes after it).
    pub stale: u64,
    /// Users not logged in at the end.
    pub down: u64,
    /// From the first login (storm) or the window's start (churn) to the
    /// last online push.
    pub settle_s: f64,
}

impl PresenceTally {
    /// Adds another executor's or worker's counts (the longest settle).
    pub fn merge(&mut self, o: &PresenceTally) {
        self.expected += o.expected;
        self.met += o.met;
        self.timed += o.timed;
        self.superseded += o.superseded;
        self.cancelled += o.cancelled;
        self.missing += o.missing;
        self.online_pushes += o.online_pushes;
        self.offline_pushes += o.offline_pushes;
        self.foreign += o.foreign;
        self.stale += o.stale;
        self.down += o.down;
        self.settle_s = self.settle_s.max(o.settle_s);
    }

    /// Whatever breaks the guarantees (`--verify` fails on it).
    pub fn violations(&self) -> u64 {
        self.foreign + self.stale
    }
}

/// Merges `part` into `into`, either of which may be absent.
pub fn merge_presence(into: &mut Option<PresenceTally>, part: Option<&PresenceTally>) {
    if let Some(part) = part {
        into.get_or_insert_with(PresenceTally::default).merge(part);
    }
}

impl ExecOutcome {
    pub fn empty() -> ExecOutcome {
        ExecOutcome {
            latency: new_histogram(),
            ack_latency: new_histogram(),
            users: 0,
            connections: 0,
            connect_failures: 0,
            connect_secs: 0.0,
            sent: 0,
            delivered: 0,
            delivered_in_window: 0,
            undelivered: 0,
            unsent: 0,
            errors: 0,
            window_secs: 0.0,
            verdict: Verdict::default(),
            reconnects: 0,
            reconnect_failures: 0,
            backlog_secs: 0.0,
            target_send_per_s: 0.0,
            synced: 0,
            shutdown_disconnects: 0,
            abrupt_losses: 0,
            outage_start_unix_us: None,
            outage_end_unix_us: None,
            unacked: 0,
            resent: 0,
            presence: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_rounds_up_and_resets_intervals() {
        let rec = Recorder::new();
        rec.record_ns(1);
        rec.record_ns(1_500);
        rec.record_ns(u64::MAX);
        assert_eq!(rec.total.borrow().len(), 3);
        assert_eq!(rec.total.borrow().min(), 1);
        assert!(rec.total.borrow().max() >= MAX_LATENCY_US);
        assert!(rec.take_interval_p99() >= MAX_LATENCY_US);
        assert_eq!(rec.take_interval_p99(), 0);
        assert_eq!(rec.total.borrow().len(), 3);
        assert!(rec.acks.borrow().is_empty(), "acks are kept apart");
        rec.record_ack_ns(2_001);
        assert_eq!(rec.acks.borrow().max(), 3);
        assert_eq!(rec.total.borrow().len(), 3);
    }

    /// What recording each unsent message on its own would give.
    fn one_by_one(first: u64, period: u64, end: u64, sent: u64, close: u64) -> Histogram<u64> {
        let rec = Recorder::new();
        let mut k = sent;
        while first + k * period < end {
            rec.record_ns(close.saturating_sub(first + k * period));
            k += 1;
        }
        rec.total.into_inner()
    }

    #[test]
    fn unsent_messages_are_counted_and_timed_from_their_intended_time() {
        // The review's run: 100,000/s for 1 s, drain 0.5 s, 1,807 sent.
        let (first, period, end, close) = (0, 10_000, 1_000_000_000, 1_500_000_000);
        let rec = Recorder::new();
        assert_eq!(rec.record_unsent(first, period, end, 1_807, close, 1), 98_193);
        let total = rec.total.borrow();
        assert_eq!(total.len(), 98_193);
        // The first one unsent was due at 18.07 ms, the last at 999.99 ms.
        assert_eq!(total.max(), total.highest_equivalent(1_481_930));
        assert_eq!(total.min(), total.lowest_equivalent(500_010));
        assert_eq!(*total, one_by_one(first, period, end, 1_807, close));
    }

    #[test]
    fn unsent_messages_count_as_acks_too_where_acks_are_timed() {
        let (first, period, end, close) = (0, 10_000, 1_000_000_000, 1_500_000_000);
        let untimed = Recorder::new();
        untimed.record_unsent(first, period, end, 1_807, close, 1);
        assert!(untimed.acks.borrow().is_empty(), "no acks in this run");
        let rec = Recorder::new();
        rec.time_acks();
        assert_eq!(rec.record_unsent(first, period, end, 1_807, close, 1), 98_193);
        assert_eq!(*rec.acks.borrow(), *rec.total.borrow());
    }

    #[test]
    fn an_unsent_group_message_weighs_as_much_as_its_deliveries() {
        let senders = [(0, 3), (2_500_000, 0)];
        let one = Recorder::new();
        let unsent = one.record_all_unsent(Some(100.0), senders, 1_000_000_000, 1_500_000_000);
        let members = Recorder::new();
        assert_eq!(
            members.record_all_unsent_to(Some(100.0), senders, 1_000_000_000, 1_500_000_000, 999),
            unsent,
            "counts messages, not deliveries"
        );
        assert_eq!(members.total.borrow().len(), 999 * one.total.borrow().len());
        assert_eq!(
            members.total.borrow().value_at_quantile(0.5),
            one.total.borrow().value_at_quantile(0.5)
        );
    }

    #[test]
    fn unsent_runs_sharing_a_microsecond_match_recording_one_by_one() {
        for (first, period, end, sent, close) in [
            (5, 1, 20_000, 0, 30_000),          // 1 ns apart: 1,000 a µs
            (0, 333, 1_000_000, 17, 1_000_000), // closing at the end
            (100, 7, 5_000, 3, 4_000),          // intended after the close: 1 µs
            (0, 1_000, 10_000, 10, 20_000),     // all sent
            (0, 1_000, 10_000, 99, 20_000),     // more sent than due
        ] {
            let rec = Recorder::new();
            let unsent = rec.record_unsent(first, period, end, sent, close, 1);
            let expected = one_by_one(first, period, end, sent, close);
            assert_eq!(unsent, expected.len(), "{first} {period} {end} {sent} {close}");
            assert_eq!(
                *rec.total.borrow(),
                expected,
                "{first} {period} {end} {sent} {close}"
            );
        }
        // Beyond the histogram's range: saturated, still counted.
        let rec = Recorder::new();
        assert_eq!(
            rec.record_unsent(0, 1_000_000_000, 3_000_000_000, 0, u64::MAX, 1),
            3
        );
        assert_eq!(rec.total.borrow().len(), 3);
        let total = rec.total.borrow();
        assert!(total.equivalent(total.min(), MAX_LATENCY_US));
    }

    #[test]
    fn all_unsent_is_the_sum_over_senders_and_nothing_for_a_closed_loop() {
        let senders = [(0, 3), (2_500_000, 0), (5_000_000, 100)];
        let rec = Recorder::new();
        assert_eq!(
            rec.record_all_unsent(None, senders, 1_000_000_000, 1_500_000_000),
            0
        );
        assert_eq!(rec.total.borrow().len(), 0);

        let one_each = Recorder::new();
        let period = crate::wire::open_loop_period_ns(100.0);
        let expected: u64 = senders
            .iter()
            .map(|&(first, sent)| {
                one_each.record_unsent(first, period, 1_000_000_000, sent, 1_500_000_000, 1)
            })
            .sum();
        assert_eq!(expected, 97 + 100);
        assert_eq!(
            rec.record_all_unsent(Some(100.0), senders, 1_000_000_000, 1_500_000_000),
            expected
        );
        assert_eq!(*rec.total.borrow(), *one_each.total.borrow());
    }
}
