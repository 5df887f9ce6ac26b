//! A worker process: its glommio executors and the phases they step
//! through together.
//!
//! The coordinator starts each worker with the same command line plus
//! `--child N`. The worker takes its share of the scenario, runs one
//! executor per `--threads` over it, and talks to the coordinator in lines
//! on stdout (`ready`, `connected`, `progress {json}`, `result {json}`,
//! `fatal msg`) and stdin (`go`, `start`). The phases are: setup (users,
//! tokens) → wait for `go` → connect → wait for `start` → measure → drain.
//! The two waits let the coordinator read the server's memory before and
//! after the connections exist and start every worker's measured window at
//! the same moment. This module also owns [`Ctx`], the per-executor view
//! of the plan that scenarios use.

use std::cell::Cell;
use std::future::Future;
use std::io::BufRead;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use serde::{Deserialize, Serialize};

use crate::cli::Protocol;
use crate::cli::{parse_source_ips, share, sub_share, Cli, Scenario};
use crate::report::{histogram_to_hex, rate, recovery_secs, Latency, RunResult};
use crate::stats::{new_histogram, ExecOutcome, LiveCounters, Recorder};
use crate::sys::{raise_nofile, SPARE_FDS};
use crate::wire::WireError;
use crate::{churn, connect, groups, mix, offline, pairs, peer_load, presence};

/// Connections one executor opens at once while connecting (pairs, groups).
pub const CONNECT_CONCURRENCY: usize = 64;
/// How many failures each executor describes on stderr (all are counted).
const LOGGED_FAILURES: u64 = 5;

/// Phase flags shared by the executors of a worker and its main thread.
#[derive(Default)]
pub struct Flags {
    setup_done: AtomicUsize,
    go: AtomicBool,
    connected: AtomicUsize,
    start: AtomicBool,
    finished: AtomicUsize,
}

/// Everything a worker's executors share (immutable but for atomics).
pub struct Plan {
    pub cli: Cli,
    pub child: usize,
    pub sources: Vec<Ipv4Addr>,
    pub prefix: String,
    pub reuse: bool,
    /// Added to every `client_msg_id` this run sends (see [`msg_id_base`]).
    pub msg_id_base: u64,
    pub flags: Flags,
    pub live: Vec<LiveCounters>,
    /// Mints JWTs when `--jwt-secret-file` is given.
    pub jwt: Option<crate::jwt::JwtMinter>,
    /// The `groups` scenario's groups of this worker, as its executors see them.
    pub groups: crate::groups::SharedGroups,
}

impl Plan {
    /// Whether a message with this `client_msg_id` was sent by this run
    /// (see [`msg_id_base`]): users reused from an earlier run (`--prefix`)
    /// get that run's unacknowledged messages again in their catch-ups,
    /// and those are not this run's to count.
    pub fn sent_by_this_run(&self, client_msg_id: u64) -> bool {
        client_msg_id >> 32 == self.msg_id_base >> 32
    }

    fn threads(&self) -> usize {
        self.cli.common.threads
    }

    /// Executors in the whole run: every thread of every process.
    pub fn slots(&self) -> usize {
        self.cli.common.procs * self.threads()
    }

    /// The `exec`-th executor's share of `total` items, after this
    /// worker's share of them.
    pub fn exec_share(&self, total: usize, exec: usize) -> std::ops::Range<usize> {
        let mine = share(total, self.cli.common.procs, self.child);
        sub_share(&mine, self.threads(), exec)
    }

    /// The population a `mix` profile describes (0 if unreadable: the
    /// executors then report the error).
    fn mix_users(&self) -> usize {
        match &self.cli.scenario {
            Scenario::Mix(a) => crate::profile::Profile::load(&a.profile).map_or(0, |p| p.users),
            _ => 0,
        }
    }

    /// File descriptors this worker will hold at its peak.
    fn fds_needed(&self) -> u64 {
        let held = match &self.cli.scenario {
            Scenario::Connect(a) => share(a.connections, self.cli.common.procs, self.child).len(),
            Scenario::Pairs(a) => 2 * share(a.pairs, self.cli.common.procs, self.child).len(),
            Scenario::Groups(a) => a.members * share(a.groups, self.cli.common.procs, self.child).len(),
            Scenario::Offline(a) => 2 * share(a.users, self.cli.common.procs, self.child).len(),
            Scenario::Churn(a) => {
                share(a.connections, self.cli.common.procs, self.child).len()
                    + churn::SENDERS * self.threads()
            }
            // Online users, then the syncing offline ones, all at most.
            Scenario::Mix(_) => share(self.mix_users(), self.cli.common.procs, self.child).len(),
            Scenario::Presence(a) => share(a.users, self.cli.common.procs, self.child).len(),
            Scenario::Report(_) => 0,
        };
        held as u64 + self.cli.common.setup_concurrency as u64 + SPARE_FDS
    }
}

/// One executor's view: the plan, its index, its recorder.
pub struct Ctx {
    pub plan: Arc<Plan>,
    pub exec: usize,
    pub recorder: Recorder,
    /// Setup workers on this executor (its share of `--setup-concurrency`).
    pub setup_workers: usize,
    /// Set once the run is over: connections closing now are not failures.
    pub closing: Cell<bool>,
    /// Deliveries received before the measured window's end.
    pub in_window: Cell<u64>,
    /// End of the measured window; u64::MAX until the scenario starts it,
    /// so deliveries after it (the drain) stay out of msgs/s.
    window_end_ns: Cell<u64>,
    failures_logged: Cell<u64>,
}

impl Ctx {
    fn new(plan: Arc<Plan>, exec: usize) -> Ctx {
        let setup_workers = plan.cli.common.setup_concurrency.div_ceil(plan.slots()).max(1);
        Ctx {
            plan,
            exec,
            recorder: Recorder::new(),
            setup_workers,
            closing: Cell::new(false),
            in_window: Cell::new(0),
            window_end_ns: Cell::new(u64::MAX),
            failures_logged: Cell::new(0),
        }
    }

    /// This executor's place among every executor of the run, and how
    /// many there are: (slot, slots).
    pub fn slot(&self) -> (usize, usize) {
        (
            self.plan.child * self.plan.threads() + self.exec,
            self.plan.slots(),
        )
    }

    /// The measured window ends at `end_ns`.
    pub fn set_window_end(&self, end_ns: u64) {
        self.window_end_ns.set(end_ns);
    }

    /// Counts a delivery received at `now_ns` in `in_window` if it came
    /// before the measured window's end.
    pub fn count_delivery_in_window(&self, now_ns: u64) {
        if now_ns <= self.window_end_ns.get() {
            self.in_window.set(self.in_window.get() + 1);
        }
    }

    pub fn live(&self) -> &LiveCounters {
        &self.plan.live[self.exec]
    }

    pub fn username(&self, n: usize) -> String {
        format!("{}{n}", self.plan.prefix)
    }

    /// The source address for the `n`-th connection (rotating), if any.
    pub fn source(&self, n: usize) -> Option<Ipv4Addr> {
        match self.plan.sources.len() {
            0 => None,
            len => self.plan.sources.get(n % len).copied(),
        }
    }

    /// Counts a failure, and describes the first few on stderr.
    pub fn fail(&self, what: &str, e: &WireError) {
        self.live().error();
        let logged = self.failures_logged.get();
        if logged < LOGGED_FAILURES {
            self.failures_logged.set(logged + 1);
            eprintln!("loadgen[{}.{}]: {what}: {e}", self.plan.child, self.exec);
        }
    }

    /// Setup is done here: wait until the coordinator says go.
    pub async fn setup_done(&self) {
        self.plan.flags.setup_done.fetch_add(1, Ordering::SeqCst);
        wait_flag(&self.plan.flags.go).await;
    }

    /// Connections are up here: wait until the coordinator says start.
    pub async fn connected(&self) {
        self.plan.flags.connected.fetch_add(1, Ordering::SeqCst);
        wait_flag(&self.plan.flags.start).await;
    }
}

async fn wait_flag(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls `done` every millisecond until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs `job(i)` for every `i < count` with at most `workers` at once.
pub async fn for_each_bounded<F, Fut>(count: usize, workers: usize, job: F)
where
    F: Fn(usize) -> Fut + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let next = Rc::new(Cell::new(0usize));
    let tasks: Vec<_> = (0..workers.clamp(1, count.max(1)))
        .map(|_| {
            let next = next.clone();
            let job = job.clone();
            glommio::spawn_local(async move {
                loop {
                    let i = next.get();
                    if i >= count {
                        break;
                    }
                    next.set(i + 1);
                    job(i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
}

/// Spawns a task that publishes the executor's last-second p99 for the
/// progress line.
fn spawn_p99_ticker(ctx: Rc<Ctx>) -> glommio::Task<()> {
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            let p99 = ctx.recorder.take_interval_p99();
            ctx.live().interval_p99_us.store(p99, Ordering::Relaxed);
        }
    })
}

async fn run_executor(plan: Arc<Plan>, exec: usize) -> ExecOutcome {
    let ctx = Rc::new(Ctx::new(plan, exec));
    let ticker = spawn_p99_ticker(ctx.clone());
    let peer = ctx.plan.cli.common.protocol != Protocol::Tern;
    let outcome = match ctx.plan.cli.scenario.clone() {
        Scenario::Connect(args) if peer => peer_load::connect(ctx.clone(), args).await,
        Scenario::Pairs(args) if peer => peer_load::pairs(ctx.clone(), args).await,
        Scenario::Groups(args) if peer => peer_load::groups(ctx.clone(), args).await,
        Scenario::Connect(args) => connect::run(ctx.clone(), args).await,
        Scenario::Pairs(args) => pairs::run(ctx.clone(), args).await,
        Scenario::Groups(args) => groups::run(ctx.clone(), args).await,
        Scenario::Offline(args) => offline::run(ctx.clone(), args).await,
        Scenario::Churn(args) => churn::run(ctx.clone(), args).await,
        Scenario::Mix(args) => mix::run(ctx.clone(), args).await,
        Scenario::Presence(args) => presence::run(ctx.clone(), args).await,
        Scenario::Report(_) => ExecOutcome::empty(),
    };
    drop(ticker);
    ctx.plan.flags.finished.fetch_add(1, Ordering::SeqCst);
    outcome
}

/// One progress sample a worker sends to the coordinator.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub users: u64,
    pub open: u64,
    pub delivered: u64,
    pub errors: u64,
    pub p99_us: u64,
}

fn sample(plan: &Plan) -> Progress {
    let mut p = Progress::default();
    for live in &plan.live {
        p.users += LiveCounters::get(&live.users_ready);
        p.open += LiveCounters::get(&live.open_connections);
        p.delivered += LiveCounters::get(&live.delivered);
        p.errors += LiveCounters::get(&live.errors);
        p.p99_us = p.p99_us.max(LiveCounters::get(&live.interval_p99_us));
    }
    p
}

/// Waits on the main thread until `done`, sending progress once a second.
fn wait_reporting(plan: &Plan, last: &mut Instant, done: impl Fn() -> bool) {
    while !done() {
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            if let Ok(json) = serde_json::to_string(&sample(plan)) {
                println!("progress {json}");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The base of this run's `client_msg_id`s: the run id's FNV-1a hash in
/// the high 32 bits. Senders count from 1 within a run; users reused from an
/// earlier run (`--prefix`) would otherwise send the ids that run sent,
/// and the server answers an id still in its dedup window with the earlier
/// message's `Sent` without delivering the new one, which `--verify` then
/// reports as lost. Every worker of a run gets the same run id, so the
/// same base.
pub fn msg_id_base(run_id: &str) -> u64 {
    let hash = run_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    u64::from(hash) << 32
}

/// Runs worker number `child`; prints its result on stdout.
pub fn run(cli: Cli, child: usize) -> Result<(), String> {
    let run_id = cli
        .common
        .run_id
        .clone()
        .ok_or("a worker needs --run-id from the coordinator")?;
    let (prefix, reuse) = cli.common.user_prefix(&run_id);
    if let Some(ca) = &cli.common.tls_ca {
        let config = tern_net::tls::client_config(ca).map_err(|e| e.to_string())?;
        crate::wire::use_tls(config, &cli.common.tls_server_name)?;
    }
    let threads = cli.common.threads;
    let jwt = match &cli.common.jwt_secret_file {
        Some(path) => Some(crate::jwt::JwtMinter::from_file(
            path,
            cli.common.jwt_issuer.clone(),
            cli.common.jwt_audience.clone(),
        )?),
        None => None,
    };
    let groups = crate::groups::SharedGroups::for_scenario(&cli.scenario, cli.common.procs, child);
    let plan = Arc::new(Plan {
        groups,
        jwt,
        sources: parse_source_ips(&cli.common.source_ips, cli.common.server)?,
        prefix,
        reuse,
        msg_id_base: msg_id_base(&run_id),
        child,
        flags: Flags::default(),
        live: (0..threads).map(|_| LiveCounters::default()).collect(),
        cli,
    });
    raise_nofile(plan.fds_needed())?;
    // The worker does no file I/O through glommio: keep registered memory
    // small so several workers fit in a non-root memlock limit.
    let io_memory =
        tern_net::memlock::io_memory_per_shard(threads, tern_net::memlock::GLOMMIO_DEFAULT_RING_DEPTH)?
            .min(1 << 20);

    let stdin_plan = plan.clone();
    std::thread::spawn(move || follow_coordinator(&stdin_plan));

    let counter = Arc::new(AtomicUsize::new(0));
    let exec_plan = plan.clone();
    // Unbound placement keeps the CPU affinity the worker was started with
    // (e.g. `taskset -c 1`), so it never lands on the server's core.
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(threads))
        .name("loadgen")
        .io_memory(io_memory)
        .on_all_shards(move || {
            let exec = counter.fetch_add(1, Ordering::SeqCst);
            run_executor(exec_plan, exec)
        })
        .map_err(|e| format!("cannot start executors: {e}"))?;

    let flags = &plan.flags;
    let mut last = Instant::now();
    let all = |counter: &AtomicUsize| counter.load(Ordering::SeqCst) >= threads;
    wait_reporting(&plan, &mut last, || {
        all(&flags.setup_done) || all(&flags.finished)
    });
    println!("ready");
    wait_reporting(&plan, &mut last, || all(&flags.connected) || all(&flags.finished));
    // With the connections open now: the server's memory is read at this
    // point, and a scenario may open more later (recipients coming online).
    println!("connected {}", sample(&plan).open);
    wait_reporting(&plan, &mut last, || all(&flags.finished));

    let mut outcomes = Vec::new();
    for joined in handles.join_all() {
        outcomes.push(joined.map_err(|e| format!("executor failed: {e}"))?);
    }
    let result = worker_result(&plan, &outcomes)?;
    let json = serde_json::to_string(&result).map_err(|e| e.to_string())?;
    println!("result {json}");
    Ok(())
}

/// Reads `go` and `start` from the coordinator. If the coordinator goes
/// away, the run is pointless: exit.
fn follow_coordinator(plan: &Plan) {
    for line in std::io::stdin().lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("go") => plan.flags.go.store(true, Ordering::SeqCst),
            Ok("start") => plan.flags.start.store(true, Ordering::SeqCst),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if plan.flags.finished.load(Ordering::SeqCst) < plan.threads() {
        eprintln!("loadgen[{}]: coordinator went away; exiting", plan.child);
    }
    std::process::exit(3);
}

fn worker_result(plan: &Plan, outcomes: &[ExecOutcome]) -> Result<RunResult, String> {
    let mut hist = new_histogram();
    let mut acks = new_histogram();
    let mut r = RunResult {
        scenario: plan.cli.scenario_name().into(),
        latency_of: match plan.cli.scenario {
            Scenario::Connect(_) => "session_setup".into(),
            Scenario::Offline(_) => "time_to_first_message".into(),
            Scenario::Churn(_) => "resume".into(),
            Scenario::Presence(_) => "presence".into(),
            _ => "delivery".into(),
        },
        protocol: plan.cli.common.protocol.name().into(),
        procs: 1,
        threads: plan.threads(),
        connect_offered_per_s: match &plan.cli.scenario {
            Scenario::Connect(a) => Some(a.rate),
            _ => None,
        },
        io_uring_coop_taskrun: glommio::coop_taskrun_rings(),
        ..RunResult::default()
    };
    let mut delivered_in_window = 0;
    let mut backlog_sent = 0;
    let mut backlog_secs: f64 = 0.0;
    let mut outage_incomplete = false;
    for o in outcomes {
        hist.add(&o.latency)
            .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
        acks.add(&o.ack_latency)
            .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
        r.users += o.users;
        r.connections += o.connections;
        r.connect_failures += o.connect_failures;
        r.connect_secs = r.connect_secs.max(o.connect_secs);
        r.sent += o.sent;
        r.messages += o.delivered;
        delivered_in_window += o.delivered_in_window;
        r.undelivered += o.undelivered;
        r.unsent += o.unsent;
        r.errors += o.errors;
        r.duration_s = r.duration_s.max(o.window_secs);
        r.lost += o.verdict.lost;
        r.duplicated += o.verdict.duplicated;
        r.reordered += o.verdict.reordered;
        r.reconnects += o.reconnects;
        r.reconnect_failures += o.reconnect_failures;
        r.target_send_per_s += o.target_send_per_s;
        r.offline_synced += o.synced;
        r.shutdown_disconnects += o.shutdown_disconnects;
        r.abrupt_losses += o.abrupt_losses;
        r.unacked += o.unacked;
        r.resent += o.resent;
        crate::stats::merge_presence(&mut r.presence, o.presence.as_ref());
        if let Some(start) = o.outage_start_unix_us {
            r.outage_start_unix_us = Some(r.outage_start_unix_us.map_or(start, |s| s.min(start)));
            outage_incomplete |= o.outage_end_unix_us.is_none();
        }
        if let Some(end) = o.outage_end_unix_us {
            r.outage_end_unix_us = Some(r.outage_end_unix_us.map_or(end, |e| e.max(end)));
        }
        if o.backlog_secs > 0.0 {
            backlog_sent += o.sent;
            backlog_secs = backlog_secs.max(o.backlog_secs);
        }
    }
    if outage_incomplete {
        r.outage_end_unix_us = None;
    }
    r.recovery_s = recovery_secs(r.outage_start_unix_us, r.outage_end_unix_us);
    r.backlog_sent = backlog_sent;
    r.backlog_s = backlog_secs;
    r.delivered_in_window = delivered_in_window;
    r.backlog_msgs_per_s = rate(backlog_sent, backlog_secs);
    r.reconnects_per_s = rate(r.reconnects, r.duration_s);
    r.msgs_per_s = rate(delivered_in_window, r.duration_s);
    r.connect_rate_per_s = rate(r.connections, r.connect_secs);
    r.latency_us = Latency::of(&hist);
    r.hdr_v2_hex = Some(histogram_to_hex(&hist)?);
    if !acks.is_empty() {
        r.ack_latency_us = Some(Latency::of(&acks));
        r.ack_hdr_v2_hex = Some(histogram_to_hex(&acks)?);
    }
    Ok(r)
}

/// Builds an executor's outcome from the counters every scenario keeps.
pub fn finish_outcome(ctx: &Ctx, mut outcome: ExecOutcome) -> ExecOutcome {
    outcome.latency = ctx.recorder.total.borrow().clone();
    outcome.ack_latency = ctx.recorder.acks.borrow().clone();
    // Lost messages are in `undelivered`; copies, reorders and sends the
    // open loop never made count too.
    outcome.errors = LiveCounters::get(&ctx.live().errors)
        + outcome.undelivered
        + outcome.unsent
        + outcome.verdict.duplicated
        + outcome.verdict.reordered;
    outcome
}

/// Nanoseconds between two readings of [`crate::wire::now_ns`], as seconds.
pub fn secs_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::msg_id_base;

    #[test]
    fn each_run_id_gets_its_own_msg_id_base_above_any_runs_count() {
        let base = msg_id_base("k3x9q2");
        assert_eq!(base, msg_id_base("k3x9q2"), "every worker of a run agrees");
        assert_ne!(base, msg_id_base("k3x9q3"));
        assert_eq!(base & u64::from(u32::MAX), 0, "a run counts in the low 32 bits");
        assert_ne!(base, 0);
    }
}
