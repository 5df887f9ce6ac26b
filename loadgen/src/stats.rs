//! Counting and latency recording inside one worker process.
//!
//! Each executor records latencies into its own histograms (no sharing on
//! the hot path) and bumps a few relaxed atomic counters that the process's
//! main thread reads once a second for the progress line. At the end each
//! executor hands back an [`ExecOutcome`]; the worker merges them into one
//! result for the coordinator.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

use crate::verify::Verdict;

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
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            total: RefCell::new(new_histogram()),
            interval: RefCell::new(new_histogram()),
            acks: RefCell::new(new_histogram()),
        }
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
    pub errors: u64,
    /// Length of the measured window, seconds.
    pub window_secs: f64,
    /// Loss, duplication and reordering over every stream received.
    pub verdict: Verdict,
    pub reconnects: u64,
    pub reconnect_failures: u64,
    /// `offline`: seconds the backlog took to be acknowledged.
    pub backlog_secs: f64,
    /// `mix`: the open-loop send rate asked of this executor, and offline
    /// users who caught up by `Sync`.
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
}
