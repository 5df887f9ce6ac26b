//! Results: the JSON a run produces, merging the results of several worker
//! processes, the human summary, and the histogram log.
//!
//! A worker sends its [`RunResult`] to the coordinator with its latency
//! histogram attached in HdrHistogram's V2 serialised form (hex), so the
//! coordinator can merge histograms exactly rather than averaging
//! percentiles. The merged result drops the attachment.

use std::io::Write;
use std::path::Path;

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::new_histogram;

/// Latency percentiles in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The figures of one run (one worker's, or all workers' merged).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    /// Authenticated connections established.
    pub connections: u64,
    /// Messages delivered to receivers (for groups: deliveries, one per member).
    pub messages: u64,
    /// Deliveries per second inside the measured window.
    pub msgs_per_s: f64,
    /// The deliveries `msgs_per_s` counts (those inside the window): rates
    /// of workers whose windows differ (`offline` ends each at its own
    /// last drain) do not add, counts do.
    #[serde(default)]
    pub delivered_in_window: u64,
    /// What `latency_us` measures: "delivery" (intended send time to
    /// receipt) or "session_setup" (intended connect time to LoggedIn).
    pub latency_of: String,
    pub latency_us: Latency,
    /// `pairs` against Tern: intended send time to the sender's `Sent`
    /// (the message is stored, and fsynced in sync durability). Absent
    /// where nothing acknowledges a send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_latency_us: Option<Latency>,
    /// Everything that went wrong: failed connections and setups, server
    /// error answers, disconnects, invalid frames, lost deliveries.
    pub errors: u64,
    /// (server RSS once the connections are up − RSS before) / the
    /// connections open when it was read; absent for `offline` (its server
    /// then holds the whole backlog too).
    pub server_rss_kib_per_conn: Option<f64>,
    pub server_rss_kib_before: Option<u64>,
    pub server_rss_kib_after: Option<u64>,
    /// Length of the measured window (connect: the hold).
    pub duration_s: f64,
    pub users: u64,
    pub sent: u64,
    /// Deliveries that did not arrive within the drain time (counted in `errors` too).
    pub undelivered: u64,
    /// Open loops (`pairs --rate`, `groups`): messages due inside the
    /// window that the senders never got to send before the run closed
    /// (counted in `errors` too; each timed from its intended send time to
    /// the close, so a sender that fell behind shows in the latency).
    #[serde(default)]
    pub unsent: u64,
    pub connect_failures: u64,
    pub connect_secs: f64,
    pub connect_rate_per_s: f64,
    /// `connect`: the attempt rate asked for (`--rate`, all processes).
    /// Attempts are paced at it, so `connect_rate_per_s` reaches it and no
    /// more: only a run that falls behind it measures the server. `None`
    /// from an older loadgen.
    #[serde(default)]
    pub connect_offered_per_s: Option<f64>,
    pub procs: usize,
    pub threads: usize,
    /// The server protocol driven: "tern", "nats" or "mqtt".
    #[serde(default)]
    pub protocol: String,
    /// Messages sent that never arrived (per stream: sent − distinct received).
    #[serde(default)]
    pub lost: u64,
    /// Messages received more than once (each extra copy counts).
    #[serde(default)]
    pub duplicated: u64,
    /// Messages that arrived after a later message of the same stream.
    #[serde(default)]
    pub reordered: u64,
    /// `churn`: sessions dropped and resumed, and resumes that failed.
    #[serde(default)]
    pub reconnects: u64,
    #[serde(default)]
    pub reconnect_failures: u64,
    #[serde(default)]
    pub reconnects_per_s: f64,
    /// `offline`: how fast the backlog was accepted (acked) while the
    /// recipients were offline, msgs/s.
    #[serde(default)]
    pub backlog_msgs_per_s: f64,
    /// `offline`: the backlog messages accepted and the seconds it took
    /// (`backlog_msgs_per_s` is their quotient; kept so workers merge).
    #[serde(default)]
    pub backlog_sent: u64,
    #[serde(default)]
    pub backlog_s: f64,
    /// Open loops (`mix`, `pairs --rate`, `groups`): the send rate asked
    /// for, sends/s (`sent / duration_s` is the rate achieved).
    #[serde(default)]
    pub target_send_per_s: f64,
    /// `mix`: offline users who caught up by `Sync` at the end (verified).
    #[serde(default)]
    pub offline_synced: u64,
    /// `churn` through a server restart: `Disconnect { ShuttingDown }`
    /// frames received, the first unplanned loss and the moment every
    /// session was live again (unix µs; the end is `None` when some never
    /// came back), the seconds between them, and trickle messages left
    /// unacknowledged at the end, and sends written again after a
    /// reconnect because their `Sent` had not arrived (deduplicated by
    /// the server by `client_msg_id`).
    #[serde(default)]
    pub shutdown_disconnects: u64,
    /// `churn --server-crashes`: live sessions lost without a `Disconnect`
    /// (the server was killed), resumed like the others.
    #[serde(default)]
    pub abrupt_losses: u64,
    #[serde(default)]
    pub outage_start_unix_us: Option<u64>,
    #[serde(default)]
    pub outage_end_unix_us: Option<u64>,
    #[serde(default)]
    pub recovery_s: Option<f64>,
    #[serde(default)]
    pub unacked: u64,
    #[serde(default)]
    pub resent: u64,
    /// `presence`: pushes owed and received, and the checks at the end
    /// (`latency_us` then runs from a login to a friend's push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<crate::stats::PresenceTally>,
    /// Whether every loadgen process's io_uring rings skip the interrupt
    /// per completion (`IORING_SETUP_COOP_TASKRUN`, Linux 5.19+). Without
    /// it each delivery costs the *server's* core an extra interrupt over
    /// loopback, so runs compare only when this matches (docs/benchmarks.md,
    /// "Completions without interrupts"). `None` from an older loadgen.
    #[serde(default)]
    pub io_uring_coop_taskrun: Option<bool>,
    /// The latency histogram, V2 serialised, hex: from each worker to the
    /// coordinator, and in the `--json` file so `loadgen report` can plot it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdr_v2_hex: Option<String>,
    /// The acknowledgement histogram, the same way, from each worker to
    /// the coordinator (not written to the `--json` file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_hdr_v2_hex: Option<String>,
}

/// How close to the offered `--rate` a connect run must come to count as
/// paced by it: the ramp's last setup adds its latency to the time, so a
/// server that keeps up reads a little under the offer, never above.
pub const PACED_SHARE: f64 = 0.9;

impl RunResult {
    /// Whether this `connect` run's setup rate is only the `--rate` it was
    /// paced at (the server kept up), not what the server can do. `None`
    /// when not a connect run or the offered rate was not recorded.
    pub fn connect_paced_by_rate(&self) -> Option<bool> {
        let offered = self
            .connect_offered_per_s
            .filter(|_| self.scenario == "connect")?;
        Some(self.connect_rate_per_s >= PACED_SHARE * offered)
    }
}

/// Serialises a histogram for the coordinator.
pub fn histogram_to_hex(h: &Histogram<u64>) -> Result<String, String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| format!("cannot serialise histogram: {e:?}"))?;
    Ok(hex::encode(bytes))
}

/// Reads a histogram written by [`histogram_to_hex`].
pub fn histogram_from_hex(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = hex::decode(text).map_err(|e| format!("histogram is not hex: {e}"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("cannot deserialise histogram: {e:?}"))
}

/// Merges worker results into one, with the merged histogram.
pub fn merge(parts: &[RunResult]) -> Result<(RunResult, Histogram<u64>), String> {
    let mut hist = new_histogram();
    let mut acks = new_histogram();
    let mut out = RunResult::default();
    // A worker that saw a loss but not every session back.
    let mut incomplete = false;
    for part in parts {
        if let Some(hex) = &part.hdr_v2_hex {
            hist.add(histogram_from_hex(hex)?)
                .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
        }
        if let Some(hex) = &part.ack_hdr_v2_hex {
            acks.add(histogram_from_hex(hex)?)
                .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
        }
        out.scenario.clone_from(&part.scenario);
        out.latency_of.clone_from(&part.latency_of);
        out.connections += part.connections;
        out.messages += part.messages;
        out.delivered_in_window += part.delivered_in_window;
        out.errors += part.errors;
        out.users += part.users;
        out.sent += part.sent;
        out.undelivered += part.undelivered;
        out.unsent += part.unsent;
        out.connect_failures += part.connect_failures;
        out.duration_s = out.duration_s.max(part.duration_s);
        out.connect_secs = out.connect_secs.max(part.connect_secs);
        out.connect_offered_per_s = out.connect_offered_per_s.or(part.connect_offered_per_s);
        out.threads = out.threads.max(part.threads);
        out.protocol.clone_from(&part.protocol);
        out.lost += part.lost;
        out.duplicated += part.duplicated;
        out.reordered += part.reordered;
        out.reconnects += part.reconnects;
        out.reconnect_failures += part.reconnect_failures;
        out.backlog_sent += part.backlog_sent;
        out.backlog_s = out.backlog_s.max(part.backlog_s);
        out.target_send_per_s += part.target_send_per_s;
        out.offline_synced += part.offline_synced;
        out.shutdown_disconnects += part.shutdown_disconnects;
        out.abrupt_losses += part.abrupt_losses;
        out.unacked += part.unacked;
        out.resent += part.resent;
        crate::stats::merge_presence(&mut out.presence, part.presence.as_ref());
        // One process with interrupting rings makes the run one of those.
        out.io_uring_coop_taskrun = match (out.io_uring_coop_taskrun, part.io_uring_coop_taskrun) {
            (None, mode) | (mode, None) => mode,
            (Some(a), Some(b)) => Some(a && b),
        };
        if let Some(start) = part.outage_start_unix_us {
            out.outage_start_unix_us = Some(out.outage_start_unix_us.map_or(start, |s| s.min(start)));
            incomplete |= part.outage_end_unix_us.is_none();
        }
        if let Some(end) = part.outage_end_unix_us {
            out.outage_end_unix_us = Some(out.outage_end_unix_us.map_or(end, |e| e.max(end)));
        }
    }
    if incomplete {
        out.outage_end_unix_us = None;
    }
    out.recovery_s = recovery_secs(out.outage_start_unix_us, out.outage_end_unix_us);
    out.procs = parts.len();
    // Totals over the longest window, as a worker does over its executors:
    // windows differ between workers (`offline` ends each one's when its
    // last recipient has its backlog), and a sum of rates measured over
    // different windows is no rate at all.
    out.msgs_per_s = rate(out.delivered_in_window, out.duration_s);
    out.backlog_msgs_per_s = rate(out.backlog_sent, out.backlog_s);
    out.reconnects_per_s = rate(out.reconnects, out.duration_s);
    out.connect_rate_per_s = rate(out.connections, out.connect_secs);
    out.latency_us = Latency::of(&hist);
    out.ack_latency_us = (!acks.is_empty()).then(|| Latency::of(&acks));
    Ok((out, hist))
}

/// Seconds from the first unplanned loss until every session was live
/// again, if both happened.
pub fn recovery_secs(start_unix_us: Option<u64>, end_unix_us: Option<u64>) -> Option<f64> {
    match (start_unix_us, end_unix_us) {
        (Some(start), Some(end)) => Some(end.saturating_sub(start) as f64 / 1e6),
        _ => None,
    }
}

/// `count / secs`, 0 when no time passed.
pub fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// The human summary printed at the end.
pub fn summary(r: &RunResult) -> String {
    let mut s = String::new();
    let l = &r.latency_us;
    s.push_str(&format!(
        "scenario {} ({}): {} procs x {} threads, {} users\n",
        r.scenario, r.protocol, r.procs, r.threads, r.users
    ));
    if r.io_uring_coop_taskrun == Some(false) {
        s.push_str(
            "  note         loadgen's io_uring rings interrupt for every completion (kernel before 5.19, \
             or GLOMMIO_COOP_TASKRUN=0): the server pays more per delivery than with 5.19+ rings\n",
        );
    }
    s.push_str(&format!(
        "  connections  {} established, {} failed, in {:.2} s ({:.0}/s)\n",
        r.connections, r.connect_failures, r.connect_secs, r.connect_rate_per_s
    ));
    match (r.connect_paced_by_rate(), r.connect_offered_per_s) {
        (Some(true), Some(offered)) => s.push_str(&format!(
            "  connect rate offered {offered:.0}/s: limited by --rate (not a capacity); \
             raise --rate until setups fall behind it\n"
        )),
        (Some(false), Some(offered)) => s.push_str(&format!(
            "  connect rate offered {offered:.0}/s, achieved {:.0}/s: setups fell behind the offer \
             (the server's limit, or --max-pending's)\n",
            r.connect_rate_per_s
        )),
        _ => {}
    }
    if r.scenario != "connect" {
        s.push_str(&format!(
            "  messages     {} sent, {} delivered, {} undelivered; {:.0} msgs/s over {:.2} s\n",
            r.sent, r.messages, r.undelivered, r.msgs_per_s, r.duration_s
        ));
    } else {
        s.push_str(&format!("  held         {:.2} s\n", r.duration_s));
    }
    s.push_str(&format!(
        "  latency ({})  p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us\n",
        r.latency_of, l.p50, l.p90, l.p99, l.p999, l.max
    ));
    if let Some(a) = &r.ack_latency_us {
        s.push_str(&format!(
            "  latency (ack)  p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us\n",
            a.p50, a.p90, a.p99, a.p999, a.max
        ));
    }
    if let (Some(before), Some(after)) = (r.server_rss_kib_before, r.server_rss_kib_after) {
        s.push_str(&format!(
            "  server RSS   {before} KiB before, {after} KiB with connections open: {} KiB/conn\n",
            r.server_rss_kib_per_conn
                .map_or_else(|| "n/a".to_string(), |k| format!("{k:.2}"))
        ));
    }
    if r.scenario != "connect" {
        s.push_str(&format!(
            "  verify       {} lost, {} duplicated, {} reordered\n",
            r.lost, r.duplicated, r.reordered
        ));
    }
    if r.scenario == "churn" {
        s.push_str(&format!(
            "  churn        {} resumes ({:.0}/s), {} failed\n",
            r.reconnects, r.reconnects_per_s, r.reconnect_failures
        ));
        if r.shutdown_disconnects > 0 || r.outage_start_unix_us.is_some() {
            let recovery = r.recovery_s.map_or_else(
                || "NOT all sessions came back".to_string(),
                |s| format!("all sessions live again {s:.2} s after the first loss"),
            );
            s.push_str(&format!(
                "  restart      {} ShuttingDown disconnects, {} lost without one; {recovery}; {} sends resent, {} unacknowledged\n",
                r.shutdown_disconnects, r.abrupt_losses, r.resent, r.unacked
            ));
        }
    }
    if let Some(p) = &r.presence {
        s.push_str(&format!(
            "  presence     {} logins timed at a friend ({:.0}/s); {} owed, {} arrived, {} missing, \
             {} superseded, {} called off; {} online + {} offline pushes; settled in {:.2} s\n",
            p.timed,
            r.msgs_per_s,
            p.expected,
            p.met,
            p.missing,
            p.superseded,
            p.cancelled,
            p.online_pushes,
            p.offline_pushes,
            p.settle_s
        ));
        s.push_str(&format!(
            "  presence ok  {} pushes of a non-friend, {} friends seen in the wrong state at the end, \
             {} users down at the end\n",
            p.foreign, p.stale, p.down
        ));
    }
    if r.scenario == "mix" {
        s.push_str(&format!(
            "  mix          target {:.0} sends/s, sent {:.0}/s; {} offline users synced at the end\n",
            r.target_send_per_s,
            rate(r.sent, r.duration_s),
            r.offline_synced
        ));
    }
    if r.target_send_per_s > 0.0 && r.scenario != "mix" {
        s.push_str(&format!(
            "  open loop    target {:.0} sends/s, sent {:.0}/s; {} due in the window never sent \
             (counted in errors, timed until the run closed)\n",
            r.target_send_per_s,
            rate(r.sent, r.duration_s),
            r.unsent
        ));
    }
    if r.scenario == "offline" {
        s.push_str(&format!(
            "  backlog      accepted at {:.0} msgs/s while recipients were offline\n",
            r.backlog_msgs_per_s
        ));
    }
    s.push_str(&format!("  errors       {}\n", r.errors));
    s
}

/// Writes the result as pretty JSON, with the merged histogram attached.
pub fn write_json(path: &Path, r: &RunResult, h: &Histogram<u64>) -> Result<(), String> {
    let with_histogram = RunResult {
        hdr_v2_hex: Some(histogram_to_hex(h)?),
        ..r.clone()
    };
    let text = serde_json::to_string_pretty(&with_histogram).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes the histogram as a one-interval HdrHistogram log (readable by
/// HdrHistogram's plotting tools).
pub fn write_hdr_log(path: &Path, h: &Histogram<u64>, duration_s: f64) -> Result<(), String> {
    let mut file =
        std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut serializer = V2DeflateSerializer::new();
    {
        let mut log = IntervalLogWriterBuilder::new()
            .with_base_time(std::time::SystemTime::now())
            .add_comment("loadgen latency histogram, values in microseconds")
            .begin_log_with(&mut file, &mut serializer)
            .map_err(|e| format!("cannot write log header: {e}"))?;
        log.write_histogram(
            h,
            std::time::Duration::ZERO,
            std::time::Duration::from_secs_f64(duration_s.max(0.0)),
            None,
        )
        .map_err(|e| format!("cannot write histogram: {e:?}"))?;
    }
    file.flush().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(values: &[u64], messages: u64, rate: f64, connections: u64, secs: f64) -> RunResult {
        let mut h = new_histogram();
        for v in values {
            h.record(*v).unwrap();
        }
        RunResult {
            scenario: "pairs".into(),
            latency_of: "delivery".into(),
            connections,
            messages,
            msgs_per_s: rate,
            delivered_in_window: (rate * 2.0).round() as u64,
            connect_secs: secs,
            errors: 1,
            duration_s: 2.0,
            threads: 1,
            latency_us: Latency::of(&h),
            hdr_v2_hex: Some(histogram_to_hex(&h).unwrap()),
            ..RunResult::default()
        }
    }

    #[test]
    fn merging_sums_counts_and_merges_histograms_exactly() {
        let a = part(&[100; 99], 99, 49.5, 10, 1.0);
        let b = part(&[10_000], 1, 0.5, 30, 2.0);
        let (merged, hist) = merge(&[a, b]).unwrap();
        assert_eq!(merged.messages, 100);
        assert_eq!(merged.msgs_per_s, 50.0);
        assert_eq!(merged.connections, 40);
        assert_eq!(merged.errors, 2);
        assert_eq!(merged.procs, 2);
        assert_eq!(merged.connect_secs, 2.0);
        assert_eq!(merged.connect_rate_per_s, 20.0);
        assert_eq!(hist.len(), 100);
        assert_eq!(merged.latency_us.p50, 100);
        assert!(merged.latency_us.max >= 10_000 && merged.latency_us.max < 10_010);
        assert!(merged.hdr_v2_hex.is_none());
    }

    /// `offline` ends each worker's window when its own last recipient
    /// holds its backlog, so windows differ between processes: one drained
    /// 1,000 messages in 1 s, the other 1,000 in 10 s. Summing their rates
    /// said 1,100 msgs/s; 2,000 messages over the 10 s are 200/s.
    #[test]
    fn merged_rates_divide_the_totals_by_the_longest_window() {
        let offline = |secs: f64, backlog_s: f64, reconnects: u64| RunResult {
            scenario: "offline".into(),
            messages: 1_000,
            delivered_in_window: 1_000,
            duration_s: secs,
            msgs_per_s: rate(1_000, secs),
            backlog_sent: 1_000,
            backlog_s,
            backlog_msgs_per_s: rate(1_000, backlog_s),
            reconnects,
            reconnects_per_s: rate(reconnects, secs),
            ..RunResult::default()
        };
        let (m, _) = merge(&[offline(1.0, 0.5, 10), offline(10.0, 5.0, 30)]).unwrap();
        assert_eq!(
            (m.messages, m.delivered_in_window, m.duration_s),
            (2_000, 2_000, 10.0)
        );
        assert_eq!(m.msgs_per_s, 200.0);
        assert_eq!(
            (m.backlog_sent, m.backlog_s, m.backlog_msgs_per_s),
            (2_000, 5.0, 400.0)
        );
        assert_eq!(m.reconnects_per_s, 4.0);

        // Equal windows (every scenario but offline): the same as adding.
        let (m, _) = merge(&[offline(2.0, 1.0, 0), offline(2.0, 1.0, 0)]).unwrap();
        assert_eq!(m.msgs_per_s, 1_000.0);
        assert_eq!(m.backlog_msgs_per_s, 2_000.0);

        // A result file from before the counts existed still reads.
        let mut old = serde_json::to_value(&m).unwrap();
        for key in ["delivered_in_window", "backlog_sent", "backlog_s"] {
            old.as_object_mut().unwrap().remove(key);
        }
        let back: RunResult = serde_json::from_value(old).unwrap();
        assert_eq!((back.msgs_per_s, back.delivered_in_window), (1_000.0, 0));
    }

    #[test]
    fn connect_rates_at_the_offered_rate_are_labelled_as_such() {
        let connect = |offered, achieved| RunResult {
            scenario: "connect".into(),
            connect_offered_per_s: offered,
            connect_rate_per_s: achieved,
            ..RunResult::default()
        };
        assert_eq!(connect(Some(100.0), 101.8).connect_paced_by_rate(), Some(true));
        assert_eq!(connect(Some(100.0), 90.0).connect_paced_by_rate(), Some(true));
        assert_eq!(connect(Some(2_000.0), 640.0).connect_paced_by_rate(), Some(false));
        assert_eq!(connect(None, 640.0).connect_paced_by_rate(), None, "older result");
        let pairs = RunResult {
            scenario: "pairs".into(),
            ..connect(Some(100.0), 100.0)
        };
        assert_eq!(
            pairs.connect_paced_by_rate(),
            None,
            "a setup burst, not a connect run"
        );

        let text = summary(&connect(Some(100.0), 99.0));
        assert!(
            text.contains("offered 100/s: limited by --rate (not a capacity)"),
            "{text}"
        );
        let text = summary(&connect(Some(2_000.0), 640.0));
        assert!(
            text.contains("offered 2000/s, achieved 640/s: setups fell behind"),
            "{text}"
        );

        // Every worker carries the same offer; the merge keeps it.
        let (m, _) = merge(&[connect(Some(100.0), 50.0), connect(Some(100.0), 50.0)]).unwrap();
        assert_eq!(m.connect_offered_per_s, Some(100.0));
    }

    #[test]
    fn open_loop_runs_show_target_achieved_and_unsent_sends() {
        let open = |sent, unsent| RunResult {
            sent,
            unsent,
            errors: unsent,
            duration_s: 1.0,
            target_send_per_s: 50_000.0,
            ..part(&[100], 1, 1.0, 2, 1.0)
        };
        let (m, _) = merge(&[open(1_000, 49_000), open(807, 49_193)]).unwrap();
        assert_eq!((m.sent, m.unsent, m.errors), (1_807, 98_193, 98_193));
        assert_eq!(m.target_send_per_s, 100_000.0);
        let text = summary(&m);
        assert!(
            text.contains(
                "open loop    target 100000 sends/s, sent 1807/s; 98193 due in the window never sent"
            ),
            "{text}"
        );
        let value: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(value["unsent"], 98_193);

        // Closed loop: no target, no line.
        let (closed, _) = merge(&[part(&[100], 1, 1.0, 2, 1.0)]).unwrap();
        assert!(!summary(&closed).contains("open loop"));
        // A result written before `unsent` existed still reads.
        let mut old = serde_json::to_value(&closed).unwrap();
        old.as_object_mut().unwrap().remove("unsent");
        let back: RunResult = serde_json::from_value(old).unwrap();
        assert_eq!(back.unsent, 0);
    }

    #[test]
    fn one_process_with_interrupting_rings_marks_the_merged_run() {
        let with = |mode| RunResult {
            io_uring_coop_taskrun: mode,
            ..part(&[100], 1, 1.0, 1, 1.0)
        };
        let merged = |modes: &[Option<bool>]| {
            let parts: Vec<_> = modes.iter().map(|m| with(*m)).collect();
            merge(&parts).unwrap().0.io_uring_coop_taskrun
        };
        assert_eq!(merged(&[Some(true), Some(true)]), Some(true));
        assert_eq!(merged(&[Some(true), Some(false)]), Some(false));
        assert_eq!(merged(&[None, Some(true)]), Some(true));
        assert_eq!(merged(&[None, None]), None);
        assert!(summary(&with(Some(false))).contains("interrupt for every completion"));
        assert!(!summary(&with(Some(true))).contains("interrupt"));
    }

    #[test]
    fn ack_histograms_merge_apart_from_delivery_latency() {
        let mut acks = new_histogram();
        acks.record(7).unwrap();
        let mut a = part(&[100], 1, 1.0, 2, 1.0);
        a.ack_hdr_v2_hex = Some(histogram_to_hex(&acks).unwrap());
        let b = part(&[200], 1, 1.0, 2, 1.0);
        let (merged, hist) = merge(&[a, b.clone()]).unwrap();
        assert_eq!(hist.len(), 2, "acks stay out of the delivery histogram");
        assert_eq!(merged.ack_latency_us.map(|l| l.max), Some(7));
        assert!(summary(&merged).contains("latency (ack)  p50 7 us"));
        let value: serde_json::Value = serde_json::to_value(&merged).unwrap();
        assert_eq!(value["ack_latency_us"]["p99"], 7);
        assert!(value.get("ack_hdr_v2_hex").is_none());

        let (merged, _) = merge(&[b]).unwrap();
        assert_eq!(merged.ack_latency_us, None, "no acks, no figure");
        assert!(!summary(&merged).contains("(ack)"));
    }

    #[test]
    fn json_has_the_documented_fields() {
        let (merged, _) = merge(&[part(&[5], 1, 1.0, 2, 1.0)]).unwrap();
        let value: serde_json::Value = serde_json::to_value(&merged).unwrap();
        for key in [
            "scenario",
            "connections",
            "messages",
            "msgs_per_s",
            "latency_us",
            "errors",
            "server_rss_kib_per_conn",
            "duration_s",
            "lost",
            "duplicated",
            "reordered",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        assert!(value["server_rss_kib_per_conn"].is_null());
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(value["latency_us"].get(key).is_some(), "missing latency {key}");
        }
        let back: RunResult = serde_json::from_value(value).unwrap();
        assert_eq!(back, merged);
    }

    #[test]
    fn bad_histograms_are_errors_not_panics() {
        assert!(histogram_from_hex("zz").is_err());
        assert!(histogram_from_hex("00ff").is_err());
        let mut p = part(&[1], 1, 1.0, 1, 1.0);
        p.hdr_v2_hex = Some("abcd".into());
        assert!(merge(&[p]).is_err());
    }

    #[test]
    fn hdr_log_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lat.hlog");
        let mut h = new_histogram();
        h.record(42).unwrap();
        write_hdr_log(&path, &h, 1.5).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("loadgen latency histogram"));
        assert!(text.lines().any(|l| l.starts_with("0.000,1.500,")), "{text}");
    }
}
