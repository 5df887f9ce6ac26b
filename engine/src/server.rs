//! Starting and stopping a whole server: store, mesh, shards, listeners.
//!
//! [`Server::start`] opens the store, reserves the port, creates every
//! cross-shard queue, then starts one glommio executor per shard on a pool
//! thread and returns once every shard is accepting. [`Server::shutdown`]
//! asks the shards to stop: each stops accepting, tells its clients to
//! reconnect later (a `Disconnect(ShuttingDown)` with a retry hint), waits a
//! grace period for them to flush, closes what is left, and exits; the store
//! is then persisted.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_lite::future;
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender, SharedSender};
use glommio::net::TcpListener;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use tern_net::listen::PortReservation;
use tern_net::memlock;
use tern_net::tls::{CertStore, TlsSettings};
use tern_storage::{Store, StoreError, Writer, WriterHandle};

use crate::admin::{AdminContext, AdminQueues, LogReload};
use crate::config::Config;
use crate::conn::{self, STOP_POLL};
use crate::mesh::{Endpoints, Event, Mesh, Request};
use crate::metrics::Metrics;
use crate::shard::Shard;

/// How long `start` waits for every shard to report that it accepts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Submission-queue entries of each shard's io_uring rings (glommio's
/// default is 128). The kernel sizes a ring's cancel hash table from its
/// completion queue: 2^(log2(2 x depth) - 5) buckets, at most 256. Every
/// readable-wait of an idle connection sits in that table, and every cancel
/// (glommio cancels its preemption timer each time the shard parks) walks
/// one bucket: at 128 entries that is 8 buckets, ~2,000 entries each at
/// 16,000 connections, ~0.5 ms per park. 4,096 gives the full 256 buckets
/// for about 1.2 MiB of ring memory per shard (three rings), which kernels
/// before 5.12 charge to RLIMIT_MEMLOCK; `memlock::io_memory_per_shard`
/// leaves room for it there.
const RING_DEPTH: usize = 4096;

/// Shared by the starting thread and every shard during startup.
struct Startup {
    config: Arc<Config>,
    store: Store,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    mesh: Mesh,
    addr: SocketAddr,
    /// The TLS listener's address and certificates, if configured.
    tls: Option<(SocketAddr, Arc<CertStore>)>,
    admin: Arc<AdminQueues>,
    next_index: AtomicUsize,
    stop: Arc<AtomicBool>,
    ready: std::sync::Mutex<mpsc::Sender<Result<usize, String>>>,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    tls: Option<(SocketAddr, Arc<CertStore>)>,
    admin: Arc<AdminQueues>,
    metrics: Arc<Metrics>,
    shards: usize,
    stop: Arc<AtomicBool>,
    pool: Option<JoinHandle<()>>,
    writer: Option<Writer>,
    store: Store,
}

impl Server {
    /// Starts a server and returns once every shard accepts connections.
    pub fn start(config: Config) -> anyhow::Result<Server> {
        let metrics = Arc::new(Metrics::new(config.shards));
        Server::start_with_metrics(config, metrics)
    }

    /// Starts a server that counts into `metrics` (one entry per shard),
    /// so that an HTTP endpoint started beforehand can serve them.
    pub fn start_with_metrics(config: Config, metrics: Arc<Metrics>) -> anyhow::Result<Server> {
        if metrics.shards() != config.shards {
            bail!(
                "metrics hold {} shards, the config asks for {}",
                metrics.shards(),
                config.shards
            );
        }
        config
            .validate()
            .map_err(|e| anyhow!("invalid configuration: {e}"))?;
        limit_allocator_retention();
        let io_memory = memlock::io_memory_per_shard(config.shards, RING_DEPTH).map_err(|e| anyhow!(e))?;
        let mut store_opts = config.store.clone();
        if config.hash_idle_priority {
            store_opts.hash_thread_start = Some(idle_priority);
        }
        // Ports and certificates first: a port in use or a bad certificate
        // fails the start before the store is opened, so a mistyped flag
        // leaves no new store behind (and no backfill is run for nothing).
        // A reservation binds without listening: nobody can connect yet.
        let reservation = PortReservation::bind(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = reservation.addr();
        let tls_reservation = match &config.tls {
            None => None,
            Some(listener) => {
                let settings = TlsSettings {
                    cert_chain: listener.cert_chain.clone(),
                    key: listener.key.clone(),
                    allow_tls12: listener.allow_tls12,
                };
                let certs = CertStore::open(settings).context("cannot load the TLS certificate")?;
                let reservation = PortReservation::bind(listener.listen)
                    .with_context(|| format!("cannot listen on {}", listener.listen))?;
                Some((reservation, Arc::new(certs)))
            }
        };
        let store = with_background_priority(|| Store::open(&config.data_dir, store_opts))
            .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
        // Read here, before any executor pins itself: this thread keeps
        // the CPU set the process was started with (taskset, a cgroup).
        let cpus = process_cpu_set();
        let shards = config.shards;
        let pin_shards = config.pin_shards && shards <= available_cpus();
        let spawn_writer = || Writer::spawn(store.clone(), config.durability, config.writer_queue_depth);
        // The writer's CPU leaves the shards' set only once it is pinned.
        let (writer, writer_cpu) = match store_writer_cpu(&config, pin_shards, cpus.as_ref()) {
            Some(cpu) => {
                let (writer, pinned) = on_cpu(cpu, spawn_writer);
                (writer, pinned.then_some(cpu))
            }
            None => (spawn_writer(), None),
        };
        let writer = writer.context("cannot start the storage writer")?;
        let tls = tls_reservation
            .as_ref()
            .map(|(r, certs)| (r.addr(), certs.clone()));
        let admin = Arc::new(AdminQueues::new(shards));
        let shard_cpus = match (&cpus, writer_cpu) {
            (Some(set), Some(writer_cpu)) => Some(set.clone().filter(|location| location.cpu != writer_cpu)),
            _ => cpus.clone(),
        };
        let placement = if pin_shards {
            PoolPlacement::MaxSpread(shards, shard_cpus)
        } else {
            PoolPlacement::Unbound(shards)
        };
        let blocking_placement = match cpus {
            Some(cpus) => PoolPlacement::Fenced(config.blocking_threads, cpus),
            // Unbound threads inherit their shard's CPU set: pinned with
            // the shard, but never all on one CPU.
            None => PoolPlacement::Unbound(config.blocking_threads),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let startup = Arc::new(Startup {
            mesh: Mesh::new(shards, config.cross_shard_queue_depth),
            config: Arc::new(config),
            store: store.clone(),
            writer: writer.handle(),
            metrics: metrics.clone(),
            addr,
            tls: tls.clone(),
            admin: admin.clone(),
            next_index: AtomicUsize::new(0),
            stop: stop.clone(),
            ready: std::sync::Mutex::new(ready_tx.clone()),
        });
        let pool = std::thread::Builder::new()
            .name("tern-pool".into())
            .spawn(move || {
                let handles = LocalExecutorPoolBuilder::new(placement)
                    .name("tern-shard")
                    .io_memory(io_memory)
                    .ring_depth(RING_DEPTH)
                    .blocking_thread_pool_placement(blocking_placement)
                    .on_all_shards(move || run_shard(startup));
                match handles {
                    Ok(handles) => {
                        for result in handles.join_all() {
                            if let Err(e) = result {
                                tracing::error!(error = ?e, "shard executor failed");
                            }
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start shard executors: {e}")));
                    }
                }
            })?;
        let mut server = Server {
            addr,
            tls,
            admin,
            metrics,
            shards,
            stop,
            pool: Some(pool),
            writer: Some(writer),
            store,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for _ in 0..shards {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(remaining) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    server.stop_and_join();
                    bail!(e);
                }
                Err(_) => {
                    server.stop_and_join();
                    bail!("shards did not start within {STARTUP_TIMEOUT:?}");
                }
            }
        }
        reservation.release();
        if let Some((reservation, _)) = tls_reservation {
            reservation.release();
        }
        Ok(server)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS listener's address, if one is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(addr, _)| *addr)
    }

    /// The TLS certificates in service, if a TLS listener is configured.
    /// [`CertStore::reload`] re-reads them (SIGHUP in `ternd`): new
    /// connections use the new ones, open connections keep theirs, and on
    /// error the old ones stay in service.
    pub fn tls_certs(&self) -> Option<Arc<CertStore>> {
        self.tls.as_ref().map(|(_, certs)| certs.clone())
    }

    /// What an admin socket needs to serve this server
    /// ([`crate::admin::serve_admin`]).
    pub fn admin_context(&self, log_reload: Option<LogReload>) -> AdminContext {
        AdminContext {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            queues: self.admin.clone(),
            log_reload,
        }
    }

    /// A handle on the storage writer (for its metrics).
    pub fn writer_handle(&self) -> Option<WriterHandle> {
        self.writer.as_ref().map(Writer::handle)
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// A handle that can request shutdown from another thread (a signal handler).
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Blocks until the shards have stopped (after a stop request), then
    /// persists the store.
    pub fn wait(mut self) -> anyhow::Result<()> {
        if let Some(pool) = self.pool.take() {
            pool.join().map_err(|_| anyhow!("shard pool thread panicked"))?;
        }
        if let Some(writer) = self.writer.take() {
            writer.shutdown().context("cannot flush the storage writer")?;
        }
        self.store.persist().context("cannot persist the store")?;
        Ok(())
    }

    /// Stops accepting, drains every connection and persists the store.
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.wait()
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(pool) = self.pool.take() {
            let _ = pool.join();
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.shutdown();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Makes glibc return large freed blocks to the OS at once.
///
/// Every password hash (argon2id, 19 MiB by default) allocates and frees
/// one large block on a blocking-pool thread. glibc raises its mmap
/// threshold after the first such free, so later blocks come from that
/// thread's arena and stay resident: measured at ~16 MiB of RSS per login
/// that never came back (640 MB after 40 registrations). A fixed 1 MiB
/// threshold keeps every large block mmapped, so freeing it unmaps it.
fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is safe to call at
    // any time, and a failure (return 0) leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// How much lower than the server's the priority (nice value) of the
/// store's flush and compaction threads is. They are background work: on a
/// core shared with a shard or the storage writer, at equal priority a
/// memtable flush holds the core for whole scheduler slices while acks
/// wait. Everything on one core, 100 pairs at 50k msgs/s: p99 469 ms at
/// +0, 26 ms at +10; flat out 174k -> 202k msgs/s (docs/benchmarks.md).
const STORE_BACKGROUND_NICE: i32 = 10;

/// Runs `open` on a short-lived thread whose nice value is
/// [`STORE_BACKGROUND_NICE`] above this thread's: the threads fjall spawns
/// while opening (its flush and compaction workers) inherit that lower
/// priority, and every other thread keeps the server's. Lowering a
/// priority needs no privilege; if it fails the workers keep ours.
fn with_background_priority<T: Send>(
    open: impl FnOnce() -> Result<T, StoreError> + Send,
) -> Result<T, StoreError> {
    std::thread::scope(|scope| {
        let opener = std::thread::Builder::new()
            .name("tern-store-open".into())
            .spawn_scoped(scope, || {
                lower_thread_priority(STORE_BACKGROUND_NICE);
                open()
            })
            .map_err(|e| StoreError::Fjall(format!("cannot start a thread to open the store: {e}")))?;
        opener
            .join()
            .unwrap_or_else(|_| Err(StoreError::Fjall("opening the store panicked".into())))
    })
}

/// How long each of a shard's blocking threads waits at start for the
/// others to take their naming task ([`name_blocking_threads`]).
const BLOCKING_NAME_WAIT: Duration = Duration::from_secs(2);

/// Names the calling executor's `threads` blocking threads
/// `tern-blk-{shard}`. glommio starts them unnamed, so they carried the
/// executor's name and `top -H`, `perf` and `/proc` could not tell a
/// reactor from the threads running its store calls. One task per thread
/// names the thread it runs on and then waits until every task has
/// started: a thread runs one task at a time, so the tasks land on
/// distinct threads. The wait is bounded, so a pool smaller than `threads`
/// would leave threads unnamed, not hang the shard.
async fn name_blocking_threads(shard: usize, threads: usize) {
    let name = format!("tern-blk-{shard}");
    let started = Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
    let tasks: Vec<_> = (0..threads)
        .map(|_| {
            let name = name.clone();
            let started = started.clone();
            glommio::spawn_local(glommio::executor().spawn_blocking(move || {
                name_this_thread(&name);
                let (count, all_started) = &*started;
                let mut count = count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                *count += 1;
                all_started.notify_all();
                let deadline = Instant::now() + BLOCKING_NAME_WAIT;
                while *count < threads {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    count = all_started
                        .wait_timeout(count, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }))
        })
        .collect();
    for task in tasks {
        task.await;
    }
}

/// Sets the calling thread's name as `/proc`, `top -H` and `perf` show it
/// (the kernel keeps 15 bytes; a longer name is cut).
fn name_this_thread(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from the pointer and renames the calling thread only; `bytes`
    // is NUL-terminated and outlives the call. A failure keeps the name.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, bytes.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// Raises the calling thread's nice value by `increment` (at most to 19).
fn lower_thread_priority(increment: i32) {
    // SAFETY: getpriority/setpriority only read and set a nice value; on
    // Linux PRIO_PROCESS with who = 0 applies to the calling thread alone.
    // A failure leaves the priority as it was.
    unsafe {
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, (nice + increment).min(19));
    }
}

/// The CPUs this thread may run on, as glommio places executors and
/// threads: `None` if unknown. Shards are pinned within it (glommio's
/// `MaxSpread` without a set would pick from every online CPU, ignoring a
/// `taskset` or cpuset), and each shard's blocking threads float over all
/// of it: glommio's default, one thread placed like the executor pool
/// shrunk to one, puts every shard's blocking thread on the *same* CPU when
/// shards are pinned, so all password hashing and store reads of the node
/// would run on one core, beside that core's shard.
fn process_cpu_set() -> Option<glommio::CpuSet> {
    let allowed = process_cpus();
    let set = glommio::CpuSet::online()
        .ok()?
        .filter(|location| allowed.contains(&location.cpu));
    (!set.is_empty()).then_some(set)
}

/// Moves the calling thread to `SCHED_IDLE`, run first on each of the
/// store's password-hashing threads: they then get only CPU time no shard,
/// writer or other normal thread wants, so a burst of password logins
/// (tens of ms of CPU and 19 MiB of memory traffic each) never takes a
/// reactor's turn. Only hashing runs there: the store calls, which hold
/// fjall's locks, stay on normal-priority blocking threads. Measured on two
/// cores with 200 users registering at once beside 5,000 chat messages/s:
/// chat p99 3.5-5.6 s with hashing at normal priority, 31-42 ms at nice 19,
/// 12-32 ms under SCHED_IDLE (docs/benchmarks.md). Lowering a policy needs
/// no privilege; if it fails the thread keeps the nice value it inherited.
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's policy (pid 0), reading `param`.
    let set = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
    if !set {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot move a password-hashing thread to SCHED_IDLE"
        );
    }
}

/// The CPUs the calling thread may run on (`sched_getaffinity`).
fn process_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data, zeroed is a valid empty set, and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        set
    };
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads one bit of a set we own, index in range.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// The CPU the storage writer runs on, where no shard does: the last of the
/// process's set, when shards are pinned (`pin_shards`: the config asks
/// and a CPU quota leaves room) and leave at least one CPU free. Every
/// durable message of the node passes that one thread (group commit), so a
/// writer that waits for a CPU behind a busy shard delays every ack. On a
/// 16-vCPU box, 8 shards pinned to 8 CPUs with the writer floating among
/// them did 31.8k msgs/s at window 1, against 118.8k with 4 more CPUs
/// beside them (docs/benchmarks.md, "A 16-core box").
fn store_writer_cpu(config: &Config, pin_shards: bool, cpus: Option<&glommio::CpuSet>) -> Option<usize> {
    if !pin_shards || !config.pin_store_writer {
        return None;
    }
    let cpus = cpus?;
    if config.shards >= cpus.len() {
        return None;
    }
    cpus.iter().map(|location| location.cpu).max()
}

/// Runs `spawn` on a short-lived thread confined to `cpu`: the threads it
/// starts inherit that CPU set, and the caller keeps its own. If the CPU
/// cannot be set, `spawn` still runs and its threads float; the flag says
/// whether they were pinned.
fn on_cpu<T: Send>(cpu: usize, spawn: impl FnOnce() -> T + Send) -> (T, bool) {
    std::thread::scope(|scope| {
        let pinned = scope.spawn(|| {
            // SAFETY: cpu_set_t is plain data, zeroed is a valid empty
            // set, CPU_SET writes one bit of it (cpu < CPU_SETSIZE, checked),
            // and sched_setaffinity(0, ...) only reads it.
            let set = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                if cpu < libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(cpu, &mut set);
                }
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
            };
            // Read at once: logging may change errno.
            let error = (!set).then(std::io::Error::last_os_error);
            match error {
                None => tracing::info!(cpu, "storage writer pinned to a CPU no shard uses"),
                Some(error) => tracing::warn!(cpu, %error, "cannot pin the storage writer; it floats"),
            }
            (spawn(), set)
        });
        match pinned.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn run_shard(startup: Arc<Startup>) {
    let index = startup.next_index.fetch_add(1, Ordering::SeqCst);
    // Every thread of this shard carries its index, as its metrics and logs
    // do (`shard="0"`): glommio names the executor after its own id.
    name_this_thread(&format!("tern-shard-{index}"));
    name_blocking_threads(index, startup.config.blocking_threads).await;
    let report = |result: Result<usize, String>| {
        if let Ok(tx) = startup.ready.lock() {
            let _ = tx.send(result);
        }
    };
    let Some(ends) = startup.mesh.take(index) else {
        return report(Err(format!("shard {index} found no queue endpoints")));
    };
    // Connecting a channel end waits for its peer end on the other shard,
    // which never comes if that shard's executor failed to start. The
    // start-up then times out and stops the server, and this shard must
    // see the stop rather than wait for its peers forever: the server's
    // threads are joined before the error is reported.
    let connected = future::or(async { Some(connect_mesh(ends).await) }, async {
        while !startup.stop.load(Ordering::SeqCst) {
            glommio::timer::sleep(STOP_POLL).await;
        }
        None
    })
    .await;
    let Some((connected_requests_out, connected_events_out, requests_in, events_in)) = connected else {
        return report(Err(format!("shard {index} stopped before its queues connected")));
    };
    let shard = Rc::new(Shard::new(
        index,
        startup.config.clone(),
        startup.store.clone(),
        connected_requests_out,
        connected_events_out,
        startup.writer.clone(),
        startup.metrics.clone(),
    ));
    glommio::spawn_local(shard.clone().run_committer()).detach();
    shard.resume_group_purges();
    shard.resume_user_purges();
    glommio::spawn_local(crate::park::serve(shard.clone())).detach();
    if index == 0 {
        glommio::spawn_local(expire_old_messages(shard.clone())).detach();
    }
    for rx in requests_in {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(request) = rx.recv().await {
                shard.m().cross_shard_receive();
                shard.handle_request(request).await;
            }
        })
        .detach();
    }
    for rx in events_in {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(event) = rx.recv().await {
                shard.m().cross_shard_receive();
                shard.handle_event(event);
            }
        })
        .detach();
    }
    let listener = match TcpListener::bind(startup.addr) {
        Ok(listener) => listener,
        Err(e) => {
            return report(Err(format!(
                "shard {index} cannot listen on {}: {e}",
                startup.addr
            )))
        }
    };
    let watcher = {
        let shard = shard.clone();
        let stop = startup.stop.clone();
        let admin = startup.admin.clone();
        glommio::spawn_local(async move {
            while !stop.load(Ordering::SeqCst) {
                glommio::timer::sleep(STOP_POLL).await;
                for request in admin.take(shard.index) {
                    shard.admin(request);
                }
            }
            shard.stop.fire();
        })
    };
    let tls_accepting = match &startup.tls {
        None => None,
        Some((addr, certs)) => match TcpListener::bind(addr) {
            Ok(listener) => {
                let (shard, certs) = (shard.clone(), certs.clone());
                Some(glommio::spawn_local(async move {
                    accept_loop(&shard, &listener, Some(certs)).await
                }))
            }
            Err(e) => return report(Err(format!("shard {index} cannot listen on {addr} (TLS): {e}"))),
        },
    };
    report(Ok(index));
    tracing::debug!(shard = index, addr = %startup.addr, "shard accepting");
    accept_loop(&shard, &listener, None).await;
    drop(listener);
    if let Some(tls_accepting) = tls_accepting {
        tls_accepting.await;
    }
    watcher.await;
    let config = &startup.config;
    shard.drain_connections(config.shutdown_retry_after.as_millis().min(u32::MAX as u128) as u32);
    let deadline = Instant::now() + config.shutdown_grace;
    while shard.conn_count() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    shard.abort_connections();
    let deadline = Instant::now() + Duration::from_millis(500);
    while shard.conn_count() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // Everything acknowledged is already durable; finish what is staged
    // so that nothing sequenced is left half-done.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !shard.writes_idle() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Let every task that holds this shard end (consumers end once the
    // other shards drop their queue ends), so that the store is released
    // when the server returns: a restart in the same process can reopen it.
    shard.close_queues();
    shard.wake_committer();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Rc::strong_count(&shard) > 1 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    tracing::debug!(shard = index, "shard stopped");
}

/// Deletes expired inbox entries (and history, if a retention is set),
/// every `expiry_interval`, for the life of the shard.
async fn expire_old_messages(shard: Rc<Shard>) {
    let config = shard.config.clone();
    while !shard.stop.sleep_unless_fired(config.expiry_interval).await {
        let now = crate::shard::now_ms();
        let inbox_cutoff = now.saturating_sub(config.inbox_ttl.as_millis() as u64);
        let history_cutoff = history_cutoff(now, inbox_cutoff, config.history_retention);
        let swept = shard
            .blocking(move |store| {
                let inbox = store.expire_inbox(inbox_cutoff)?;
                let history = match history_cutoff {
                    Some(cutoff) => store.expire_history(cutoff)?,
                    None => 0,
                };
                Ok::<_, tern_storage::StoreError>((inbox, history))
            })
            .await;
        match swept {
            Ok((inbox, history)) => tracing::debug!(inbox, history, "expired old messages"),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
    }
}

/// Where the history sweep cuts: `retention` before `now`, but never
/// after the inbox's cutoff, because an inbox entry reads its message from
/// the history record (history is kept at least as long as the inbox).
fn history_cutoff(now: u64, inbox_cutoff: u64, retention: Option<Duration>) -> Option<u64> {
    retention.map(|keep| now.saturating_sub(keep.as_millis() as u64).min(inbox_cutoff))
}

/// This shard's ends of the mesh, connected: senders to each shard
/// (`None` at its own index), receivers from each other shard.
type ConnectedMesh = (
    Vec<Option<ConnectedSender<Request>>>,
    Vec<Option<ConnectedSender<Event>>>,
    Vec<ConnectedReceiver<Request>>,
    Vec<ConnectedReceiver<Event>>,
);

/// Connects every end of `ends`. Each end waits for its peer end on the
/// other shard, so all of them connect at once, each in its own task.
async fn connect_mesh(ends: Endpoints) -> ConnectedMesh {
    let requests_out = connect_senders(ends.requests_out);
    let events_out = connect_senders(ends.events_out);
    let requests_in: Vec<_> = ends
        .requests_in
        .into_iter()
        .map(|rx| glommio::spawn_local(rx.connect()))
        .collect();
    let events_in: Vec<_> = ends
        .events_in
        .into_iter()
        .map(|rx| glommio::spawn_local(rx.connect()))
        .collect();
    let mut connected_requests_out = Vec::with_capacity(requests_out.len());
    for task in requests_out {
        connected_requests_out.push(match task {
            Some(task) => Some(task.await),
            None => None,
        });
    }
    let mut connected_events_out = Vec::with_capacity(events_out.len());
    for task in events_out {
        connected_events_out.push(match task {
            Some(task) => Some(task.await),
            None => None,
        });
    }
    let mut connected_requests_in = Vec::with_capacity(requests_in.len());
    for task in requests_in {
        connected_requests_in.push(task.await);
    }
    let mut connected_events_in = Vec::with_capacity(events_in.len());
    for task in events_in {
        connected_events_in.push(task.await);
    }
    (
        connected_requests_out,
        connected_events_out,
        connected_requests_in,
        connected_events_in,
    )
}

/// Starts connecting each sender end in its own task.
fn connect_senders<T: Send + 'static>(
    ends: Vec<Option<SharedSender<T>>>,
) -> Vec<Option<glommio::Task<ConnectedSender<T>>>> {
    ends.into_iter()
        .map(|tx| tx.map(|tx| glommio::spawn_local(tx.connect())))
        .collect()
}

/// Accepts until the shard stops; `tls` makes every connection start with
/// a TLS handshake under the current certificate.
async fn accept_loop(shard: &Rc<Shard>, listener: &TcpListener, tls: Option<Arc<CertStore>>) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            shard.stop.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                let config = tls.as_ref().map(|certs| certs.current());
                glommio::spawn_local(conn::serve(shard.clone(), stream, config)).detach();
            }
            Some(Err(e)) => {
                // Typically EMFILE/ENFILE: back off instead of spinning, and
                // keep serving the connections we have.
                tracing::warn!(error = %e, shard = shard.index, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of thread `tid` of this process (field 19 of stat).
    fn nice_of(tid: &str) -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The command name may hold spaces: fields count from its ')'.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(16).unwrap().parse().unwrap()
    }

    fn this_thread_id() -> String {
        // SAFETY: gettid has no preconditions and cannot fail.
        unsafe { libc::gettid() }.to_string()
    }

    #[test]
    fn store_background_threads_run_at_a_lower_priority() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_background_priority(|| Store::open(dir.path(), Default::default())).unwrap();
        let me = nice_of(&this_thread_id());
        let mut workers = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let tid = task.unwrap().file_name().into_string().unwrap();
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
            if comm.trim() == "fjall:worker" {
                workers.push(nice_of(&tid));
            }
        }
        // Other tests of this binary may have stores open too: at least ours.
        assert!(!workers.is_empty());
        let expected = (me + i64::from(STORE_BACKGROUND_NICE)).min(19);
        assert!(
            workers.contains(&expected),
            "workers {workers:?}, test thread {me}"
        );
        assert_eq!(
            nice_of(&this_thread_id()),
            me,
            "the caller's priority is unchanged"
        );
        drop(store);
    }

    #[test]
    fn history_is_kept_at_least_as_long_as_the_inbox() {
        let day = Duration::from_secs(86_400);
        let now = 100 * 86_400_000;
        let inbox_cutoff = now - 7 * 86_400_000;
        assert_eq!(history_cutoff(now, inbox_cutoff, None), None);
        assert_eq!(
            history_cutoff(now, inbox_cutoff, Some(30 * day)),
            Some(now - 30 * 86_400_000)
        );
        // One day of history under a seven-day inbox keeps seven days.
        assert_eq!(history_cutoff(now, inbox_cutoff, Some(day)), Some(inbox_cutoff));
    }
}
