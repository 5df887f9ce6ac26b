//! `loadgen report`: capacity planning from `--json` results.
//!
//! It prints markdown: a table of what was measured (connections held,
//! server KiB per connection, msgs/s and msgs/s per server core, latency
//! percentiles) and a projection for a target node using the arithmetic of
//! docs/capacity-planning.md section 3: memory for sessions is the node's
//! memory less a reserve, divided by the per-session cost (server RSS as
//! measured plus the kernel's socket memory, plus the buffers of the share
//! of sessions busy at once); shards are the node's cores less those kept
//! for the writer, the store and IRQs; per-core rates times shards. Every
//! projected figure is labelled as such. With `--svg` it also writes the
//! percentile plot ([`crate::plot`]).

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

use crate::cli::ReportArgs;
use crate::report::{histogram_from_hex, RunResult};

const KIB_PER_GIB: f64 = 1024.0 * 1024.0;
/// The reconnect storm the projection times.
const STORM_SESSIONS: f64 = 1_000_000.0;

/// One result and where it came from.
pub struct Input {
    pub label: String,
    pub result: RunResult,
    pub histogram: Option<Histogram<u64>>,
}

/// The node projection's figures (all derived, none measured).
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub server_kib_per_conn: f64,
    pub usable_gib: f64,
    pub idle_kib_per_session: f64,
    pub busy_kib_per_session: f64,
    pub idle_sessions: f64,
    pub busy_sessions: f64,
    pub shards: usize,
}

/// The node projection for a server that holds `server_kib_per_conn` of
/// RSS per idle session.
pub fn project(args: &ReportArgs, server_kib_per_conn: f64) -> Projection {
    let usable_gib = args.node_mem_gib * (1.0 - args.reserve_share);
    let idle = server_kib_per_conn + args.kernel_kib_per_conn;
    let busy = idle + args.active_share * args.active_kib;
    let sessions = |per: f64| {
        if per > 0.0 {
            usable_gib * KIB_PER_GIB / per
        } else {
            0.0
        }
    };
    Projection {
        server_kib_per_conn,
        usable_gib,
        idle_kib_per_session: idle,
        busy_kib_per_session: busy,
        idle_sessions: sessions(idle),
        busy_sessions: sessions(busy),
        shards: args.node_cores.saturating_sub(args.reserved_cores).max(1),
    }
}

/// `x` per server core.
pub fn per_core(x: f64, server_cores: f64) -> f64 {
    if server_cores > 0.0 {
        x / server_cores
    } else {
        0.0
    }
}

/// Seconds `shards` shards take to resume a million sessions at
/// `per_core_rate` each; `None` without a rate.
pub fn storm_secs(per_core_rate: f64, shards: usize) -> Option<f64> {
    let rate = per_core_rate * shards as f64;
    (rate > 0.0).then(|| STORM_SESSIONS / rate)
}

/// An integer with thousands separators: 19,173,961.
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

fn millions(x: f64) -> String {
    format!("{:.1} million", x / 1e6)
}

/// Loads `--json` results with their histograms (the n-th `--hdr` log
/// belongs to the n-th file; else the histogram the file carries).
pub fn load(args: &ReportArgs) -> Result<Vec<Input>, String> {
    args.files
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let text = read(path)?;
            let result: RunResult = serde_json::from_str(&text)
                .map_err(|e| format!("{} is not a loadgen result: {e}", path.display()))?;
            let histogram = match (args.hdr.get(i), &result.hdr_v2_hex) {
                (Some(log), _) => Some(
                    crate::plot::histogram_from_log(&read(log)?)
                        .map_err(|e| format!("{}: {e}", log.display()))?,
                ),
                (None, Some(hex)) => {
                    Some(histogram_from_hex(hex).map_err(|e| format!("{}: {e}", path.display()))?)
                }
                (None, None) => None,
            };
            let stem = path
                .file_stem()
                .map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into());
            Ok(Input {
                label: stem,
                result,
                histogram,
            })
        })
        .collect()
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Runs `loadgen report`: returns the markdown, writes the SVG if asked.
pub fn run(args: &ReportArgs) -> Result<String, String> {
    args.validate()?;
    let inputs = load(args)?;
    if let Some(path) = &args.svg {
        let lines: Vec<(String, Histogram<u64>)> = inputs
            .iter()
            .filter_map(|i| {
                let h = i.histogram.clone()?;
                Some((format!("{} ({})", i.label, i.result.scenario), h))
            })
            .collect();
        let doc = crate::plot::svg("latency by percentile", &lines)
            .ok_or("--svg: no result carries a latency histogram (pass --hdr logs)")?;
        std::fs::write(path, doc).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(markdown(args, &inputs))
}

/// The capacity-planning summary.
pub fn markdown(args: &ReportArgs, inputs: &[Input]) -> String {
    let cores = args.server_cores;
    let mut s = String::new();
    let _ = writeln!(s, "# Capacity plan from {} loadgen result(s)\n", inputs.len());
    let _ = writeln!(
        s,
        "## Measured (server on {cores} core(s), `--server-cores`)\n\n\
         | result | scenario | connections | server KiB/conn | msgs/s | msgs/s per core | \
         connects/s per core | latency of | p50 µs | p99 µs | p99.9 µs | max µs | errors | lost/dup/reord |\n\
         |---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"
    );
    for i in inputs {
        let r = &i.result;
        let l = &r.latency_us;
        let kib = r
            .server_rss_kib_per_conn
            .map_or("—".into(), |k| format!("{k:.2}"));
        // Connect rates are capacity figures only where connecting is the
        // scenario; elsewhere they time a setup burst.
        let (msgs, msgs_core, connects) = if r.scenario == "connect" {
            let rate = thousands(per_core(r.connect_rate_per_s, cores));
            let connects = match r.connect_paced_by_rate() {
                Some(true) => format!("{rate} (limited by --rate, not a capacity)"),
                _ => rate,
            };
            ("—".into(), "—".into(), connects)
        } else {
            (
                thousands(r.msgs_per_s),
                thousands(per_core(r.msgs_per_s, cores)),
                "—".into(),
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} | {kib} | {msgs} | {msgs_core} | {connects} | {} | {} | {} | {} | {} | {} | {}/{}/{} |",
            i.label,
            r.scenario,
            r.protocol,
            thousands(r.connections as f64),
            r.latency_of,
            thousands(l.p50 as f64),
            thousands(l.p99 as f64),
            thousands(l.p999 as f64),
            thousands(l.max as f64),
            thousands(r.errors as f64),
            r.lost,
            r.duplicated,
            r.reordered
        );
    }
    let acked: Vec<_> = inputs
        .iter()
        .filter_map(|i| i.result.ack_latency_us.map(|a| (i, a)))
        .collect();
    if !acked.is_empty() {
        let _ = writeln!(
            s,
            "\nAcknowledgement latency, from the intended send time to the sender's `Sent` \
             (the message is stored; fsynced in `sync` durability):\n"
        );
        for (i, a) in acked {
            let _ = writeln!(
                s,
                "* `{}`: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
                i.label,
                thousands(a.p50 as f64),
                thousands(a.p99 as f64),
                thousands(a.p999 as f64),
                thousands(a.max as f64)
            );
        }
    }
    for i in inputs.iter().filter(|i| i.result.scenario == "mix") {
        let r = &i.result;
        let _ = writeln!(
            s,
            "\n`{}`: target {} sends/s, sent {} sends/s, {} deliveries ({} msgs/s live in the window), \
             {} offline users caught up by Sync.",
            i.label,
            thousands(r.target_send_per_s),
            thousands(crate::report::rate(r.sent, r.duration_s)),
            thousands(r.messages as f64),
            thousands(r.msgs_per_s),
            thousands(r.offline_synced as f64)
        );
    }

    // The memory figure: the largest measured, else the assumption.
    let measured = inputs
        .iter()
        .filter_map(|i| i.result.server_rss_kib_per_conn.map(|k| (k, i.label.as_str())))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let (kib, kib_source) = match measured {
        Some((k, label)) => (k, format!("measured in `{label}` (the largest measured)")),
        None => (
            args.assumed_server_kib_per_conn,
            "assumed (`--assumed-server-kib-per-conn`; no result measured it)".to_string(),
        ),
    };
    let p = project(args, kib);
    let _ = writeln!(
        s,
        "\n## Projection for a {}-core, {} GiB node (projected, not measured)\n",
        args.node_cores, args.node_mem_gib
    );
    let _ = writeln!(
        s,
        "Arithmetic of docs/capacity-planning.md §3; every figure in this section is a projection.\n\n\
         * Memory for sessions: {} GiB × (1 − {}) reserve = **{:.0} GiB**.\n\
         * Idle session: {:.2} KiB server RSS, {kib_source}, + {} KiB kernel socket memory (assumed) \
         = {:.2} KiB → **{} idle sessions** ({}).\n\
         * With {}% of sessions busy at once, each holding {} KiB of buffers: {:.2} KiB per session \
         on average → **{} sessions** ({}).\n\
         * Shards: {} cores − {} kept for the storage writer, the store's workers, IRQs and the \
         blocking pool = **{} shards**.",
        args.node_mem_gib,
        args.reserve_share,
        p.usable_gib,
        p.server_kib_per_conn,
        args.kernel_kib_per_conn,
        p.idle_kib_per_session,
        thousands(p.idle_sessions),
        millions(p.idle_sessions),
        args.active_share * 100.0,
        args.active_kib,
        p.busy_kib_per_session,
        thousands(p.busy_sessions),
        millions(p.busy_sessions),
        args.node_cores,
        args.reserved_cores,
        p.shards
    );
    for i in inputs {
        let r = &i.result;
        let connect_core = per_core(r.connect_rate_per_s, cores);
        if r.scenario == "connect" && r.connect_paced_by_rate() == Some(true) {
            let _ = writeln!(
                s,
                "* `{}`: {} session setups/s is the offered `--rate` (limited by --rate, not a capacity): \
                 no reconnect storm projected from it; raise `--rate` until setups fall behind it.",
                i.label,
                thousands(r.connect_rate_per_s)
            );
        } else if r.scenario == "connect" {
            // Without the offered rate (an older result) this may still be
            // the `--rate` typed, so say so beside the projection.
            let caveat = if r.connect_offered_per_s.is_none() {
                " The offered `--rate` was not recorded: if it was about this figure, it is not a capacity."
            } else {
                ""
            };
            if let Some(secs) = storm_secs(connect_core, p.shards) {
                let _ = writeln!(
                    s,
                    "* `{}`: {} session setups/s per core × {} shards = {} /s: a million sessions \
                     resume in **{secs:.1} s** (token logins; p99 setup {} µs as measured).{caveat}",
                    i.label,
                    thousands(connect_core),
                    p.shards,
                    thousands(connect_core * p.shards as f64),
                    thousands(r.latency_us.p99 as f64)
                );
            }
        } else if r.scenario == "mix" {
            let _ = writeln!(
                s,
                "* `{}` (mix): an open-loop day at a set rate, so its {} msgs/s is the load offered, \
                 not a capacity; raise `rate_multiplier` until p99 or `lost` breaks to find one.",
                i.label,
                thousands(r.msgs_per_s)
            );
        } else if r.msgs_per_s > 0.0 {
            let core = per_core(r.msgs_per_s, cores);
            let _ = writeln!(
                s,
                "* `{}` ({}): {} msgs/s per core × {} shards = **{} msgs/s** at the measured p99 of {} µs, \
                 if shards scaled linearly; durable messages are bounded by the storage writer \
                 and the store (§3), so measure with all shards on the node before relying on it.",
                i.label,
                r.scenario,
                thousands(core),
                p.shards,
                thousands(core * p.shards as f64),
                thousands(r.latency_us.p99 as f64)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Scenario};
    use crate::report::{histogram_to_hex, write_json, Latency};
    use crate::stats::new_histogram;

    fn args(extra: &[&str]) -> ReportArgs {
        let mut argv = vec!["loadgen", "report", "x.json"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().scenario {
            Scenario::Report(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn projection_matches_capacity_planning_section_3() {
        // §3: 256 GiB less 25% ≈ 190 GiB; 6.5 KiB server + 4 KiB kernel =
        // 10.5 KiB per idle session ≈ 19 million sessions; 64 − 8 = 56
        // shards; 11,000 resumes/s per core ≈ 1.6 s for a million.
        let p = project(&args(&[]), 6.5);
        assert_eq!(p.usable_gib, 192.0);
        assert_eq!(p.idle_kib_per_session, 10.5);
        assert_eq!(
            p.idle_sessions.round(),
            (192.0 * 1024.0 * 1024.0 / 10.5_f64).round()
        );
        assert!((19.0e6..19.3e6).contains(&p.idle_sessions));
        // 5% busy at 64 KiB adds 3.2 KiB per session on average.
        assert!((p.busy_kib_per_session - 13.7).abs() < 1e-9);
        assert_eq!(p.shards, 56);
        let secs = storm_secs(11_000.0, p.shards).unwrap();
        assert!((secs - 1_000_000.0 / 616_000.0).abs() < 1e-9);
        assert!(storm_secs(0.0, 56).is_none());

        let small = project(
            &args(&[
                "--node-cores",
                "4",
                "--node-mem-gib",
                "8",
                "--reserve-share",
                "0.5",
            ]),
            1.0,
        );
        assert_eq!(small.usable_gib, 4.0);
        assert_eq!(small.shards, 1, "never fewer than one shard");
        assert_eq!(per_core(100.0, 4.0), 25.0);
    }

    #[test]
    fn connect_runs_paced_by_their_rate_are_not_projected() {
        let input = |label: &str, offered: Option<f64>, achieved: f64| Input {
            label: label.into(),
            result: RunResult {
                scenario: "connect".into(),
                connections: 200,
                connect_offered_per_s: offered,
                connect_rate_per_s: achieved,
                ..RunResult::default()
            },
            histogram: None,
        };
        let md = markdown(&args(&[]), &[input("paced", Some(100.0), 98.0)]);
        assert!(md.contains("| 98 (limited by --rate, not a capacity) |"), "{md}");
        assert!(
            md.contains("`paced`: 98 session setups/s is the offered `--rate` (limited by --rate"),
            "{md}"
        );
        assert!(!md.contains("resume in"), "projected from the knob: {md}");

        // Fell behind 20,000/s offered: the server's figure, projected.
        let md = markdown(&args(&[]), &[input("saturated", Some(20_000.0), 11_000.0)]);
        assert!(md.contains("| 11,000 |"), "{md}");
        assert!(
            md.contains("11,000 session setups/s per core × 56 shards"),
            "{md}"
        );
        assert!(md.contains("resume in **1.6 s**"), "{md}");
        assert!(!md.contains("not recorded"), "{md}");

        // An older result: projected, with the caveat.
        let md = markdown(&args(&[]), &[input("old", None, 11_000.0)]);
        assert!(md.contains("resume in **1.6 s**"), "{md}");
        assert!(md.contains("The offered `--rate` was not recorded"), "{md}");
    }

    #[test]
    fn numbers_get_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(19_173_961.14), "19,173,961");
        assert_eq!(thousands(-1234.0), "-1,234");
        assert_eq!(thousands(f64::NAN), "n/a");
    }

    #[test]
    fn report_reads_results_and_plots_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = new_histogram();
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let pairs = RunResult {
            scenario: "pairs".into(),
            protocol: "tern".into(),
            latency_of: "delivery".into(),
            connections: 200,
            msgs_per_s: 100_000.0,
            latency_us: Latency::of(&h),
            ack_latency_us: Some(Latency {
                p50: 1_200,
                p90: 1_500,
                p99: 4_100,
                p999: 9_000,
                max: 12_000,
            }),
            ..RunResult::default()
        };
        let connect = RunResult {
            scenario: "connect".into(),
            connections: 19_000,
            connect_rate_per_s: 11_000.0,
            server_rss_kib_per_conn: Some(5.5),
            ..RunResult::default()
        };
        let (p1, p2) = (dir.path().join("pairs.json"), dir.path().join("connect.json"));
        write_json(&p1, &pairs, &h).unwrap();
        write_json(&p2, &connect, &new_histogram()).unwrap();
        let svg = dir.path().join("plot.svg");
        let mut a = args(&["--server-cores", "2"]);
        a.svg = Some(svg.clone());
        a.files = vec![p1.clone(), p2];
        let md = run(&a).unwrap();
        assert!(
            md.contains("| pairs | pairs (tern) | 200 | — | 100,000 | 50,000 |"),
            "{md}"
        );
        assert!(md.contains("| 5.50 |"), "{md}");
        assert!(
            md.contains("* `pairs`: p50 1,200 µs, p99 4,100 µs, p99.9 9,000 µs, max 12,000 µs"),
            "{md}"
        );
        assert!(md.contains("5.50 KiB server RSS, measured in `connect`"), "{md}");
        assert!(md.contains("(projected, not measured)"), "{md}");
        // 50,000 per core × 56 shards.
        assert!(md.contains("**2,800,000 msgs/s**"), "{md}");
        // 5,500 setups/s per core × 56 = 308,000/s.
        assert!(md.contains("308,000 /s"), "{md}");
        let doc = std::fs::read_to_string(&svg).unwrap();
        crate::plot::tests::check_xml(&doc).unwrap();
        // The connect result's histogram is empty: one line only.
        assert_eq!(doc.matches("<polyline").count(), 1);

        // A result with no histogram at all plots nothing.
        let bare = dir.path().join("bare.json");
        std::fs::write(&bare, serde_json::to_string(&pairs).unwrap()).unwrap();
        a.files = vec![bare];
        assert!(run(&a).unwrap_err().contains("histogram"));
        a.files = vec![dir.path().join("missing.json")];
        assert!(run(&a).unwrap_err().contains("cannot read"));
        let _ = histogram_to_hex(&h).unwrap();
    }
}
