//! `ternd`: the Tern server.
//!
//! With no arguments it serves on 127.0.0.1:7878 with its data in
//! `./tern-data` and one shard per CPU but one (the storage writer's).
//! Settings come from defaults, then `--config FILE` (TOML), then `TERN_*`
//! environment variables, then flags (one per config key;
//! `docs/configuration.md`). `ternd check-config FILE`
//! validates a file and prints the effective settings; `ternd gen-cert
//! --out DIR` writes a self-signed certificate for local TLS. With
//! `--metrics-listen ADDR` it serves `/metrics`, `/healthz` and `/readyz`
//! there. SIGINT or SIGTERM stops it cleanly: `/readyz` turns 503, clients
//! are told to reconnect later, queues drain, the store is flushed. SIGHUP
//! reloads the TLS certificate, the content filter word list and the JWT
//! key set (`jwt_jwks_file`) without
//! dropping connections.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use clap::{Arg, ArgAction, ArgMatches, Command};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tern_engine::admin::{admin_request, serve_admin, LogReload, ADMIN_SOCKET};
use tern_engine::config_file::{unrecognised_env_vars, Origin, Settings, KEYS};
use tern_engine::http::serve_http;
use tern_engine::metrics::Metrics;
use tern_engine::Server;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// jemalloc instead of glibc's malloc: glibc keeps one arena per thread
/// and never returns the freed middle of a heap, so the memory of sessions
/// that park (or close) after a login wave stays resident; jemalloc hands
/// it back (see `MALLOC_CONF`). Measured in docs/benchmarks.md ("Memory per
/// connection").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read before `main` (the `_RJEM_MALLOC_CONF`
/// environment variable overrides them). A background thread returns
/// pages freed for a second (`dirty_decay_ms`) to the kernel with
/// `MADV_DONTNEED` (`muzzy_decay_ms:0`: `MADV_FREE`d pages would still
/// count as resident until the kernel is short of memory), so resident
/// memory follows what idle and parked sessions hold, not the peak of the
/// last login wave.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn command() -> Command {
    let mut cmd = Command::new("ternd")
        .version(env!("CARGO_PKG_VERSION"))
        .about("The Tern instant-messaging server.")
        .after_help(
            "Precedence: defaults < --config file < TERN_* environment < flags. \
             Every key is documented in docs/configuration.md.",
        )
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .global(true)
                .help("TOML config file [env: TERN_CONFIG]"),
        )
        .arg(
            Arg::new("idle-timeout-secs")
                .long("idle-timeout-secs")
                .value_name("SECS")
                .value_parser(clap::value_parser!(u64))
                .global(true)
                .hide(true)
                .help("Deprecated: use --idle-timeout-ms"),
        )
        .arg(
            Arg::new("no-pin")
                .long("no-pin")
                .action(ArgAction::SetTrue)
                .global(true)
                .help("Do not pin shards to CPUs (same as --pin-shards false)"),
        )
        .subcommand(
            Command::new("gen-cert")
                .about("Write a self-signed cert.pem and key.pem for local TLS")
                .arg(
                    Arg::new("out")
                        .long("out")
                        .value_name("DIR")
                        .required(true)
                        .value_parser(clap::value_parser!(PathBuf)),
                )
                .arg(
                    Arg::new("name")
                        .long("name")
                        .value_name("DNS_OR_IP")
                        .action(ArgAction::Append)
                        .help("Subject alternative name (repeatable; default: localhost, 127.0.0.1, ::1)"),
                ),
        )
        .subcommand(
            Command::new("admin")
                .about("Send a command to the running server on this data dir (stats, sessions USER, kick USER, revoke USER, delete-user USER, log FILTER)")
                .arg(
                    Arg::new("command")
                        .value_name("COMMAND")
                        .required(true)
                        .num_args(1..)
                        .help("stats | sessions USER | kick USER | revoke USER | delete-user USER | log FILTER"),
                ),
        )
        .subcommand(
            Command::new("check-config")
                .about("Validate a config file and print the effective settings as TOML")
                .arg(
                    Arg::new("file")
                        .value_name("FILE")
                        .required(true)
                        .value_parser(clap::value_parser!(PathBuf)),
                ),
        );
    for key in KEYS {
        // clap keeps `&'static str` names; these few strings live for the
        // whole process anyway.
        let flag: &'static str = Box::leak(key.flag().into_boxed_str());
        cmd = cmd.arg(
            Arg::new(key.name)
                .long(flag)
                .value_name("VALUE")
                .global(true)
                .help(format!("{} [env: {}]", key.help, key.env_var())),
        );
    }
    cmd
}

/// The flags given, as `(key, value, flag as typed)`, legacy spellings
/// first so that the current ones win. The flag as typed is what an error
/// quotes: a legacy flag sets a key of another name and unit.
fn flag_values(matches: &ArgMatches) -> Vec<(&'static str, String, String)> {
    let mut flags = Vec::new();
    if let Some(secs) = matches.get_one::<u64>("idle-timeout-secs") {
        let typed = format!("idle-timeout-secs {secs}");
        flags.push(("idle_timeout_ms", secs.saturating_mul(1000).to_string(), typed));
    }
    if matches.get_flag("no-pin") {
        flags.push(("pin_shards", "false".to_owned(), "no-pin".to_owned()));
    }
    for key in KEYS {
        if let Some(value) = matches.get_one::<String>(key.name) {
            flags.push((key.name, value.clone(), key.name.replace('_', "-")));
        }
    }
    flags
}

fn load(matches: &ArgMatches, file: Option<PathBuf>) -> anyhow::Result<Settings> {
    let file = file.or_else(|| std::env::var_os("TERN_CONFIG").map(PathBuf::from));
    let env_names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for var in unrecognised_env_vars(env_names) {
        eprintln!("ternd: warning: environment variable {var} is not a setting and is ignored (docs/configuration.md lists them)");
    }
    let mut settings = Settings::default();
    if let Some(path) = &file {
        settings.apply_file(path)?;
    }
    settings.apply_env(|var| std::env::var(var).ok())?;
    for (key, value, typed) in flag_values(matches) {
        settings.apply_text(key, &value, Origin::Flag(typed))?;
    }
    Ok(settings.finish()?)
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    let result = match matches.subcommand() {
        Some(("check-config", sub)) => check_config(sub),
        Some(("gen-cert", sub)) => gen_cert(sub),
        Some(("admin", sub)) => admin_command(&matches, sub),
        _ => load(&matches, matches.get_one::<PathBuf>("config").cloned()).and_then(serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ternd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn gen_cert(sub: &ArgMatches) -> anyhow::Result<()> {
    let dir = sub.get_one::<PathBuf>("out").cloned().unwrap_or_default();
    let names: Vec<String> = sub
        .get_many::<String>("name")
        .map(|n| n.cloned().collect())
        .unwrap_or_default();
    let (cert, key) = tern_net::tls::generate_self_signed(&dir, &names)?;
    println!("wrote {} and {}", cert.display(), key.display());
    println!(
        "serve with: ternd --tls-listen 127.0.0.1:7879 --tls-cert {} --tls-key {}",
        cert.display(),
        key.display()
    );
    println!(
        "connect with: tern --server 127.0.0.1:7879 --tls --ca {} ...",
        cert.display()
    );
    Ok(())
}

fn admin_command(matches: &ArgMatches, sub: &ArgMatches) -> anyhow::Result<()> {
    // The same layering as the server, so `--data-dir`, TERN_DATA_DIR or
    // --config find the same directory the server uses.
    let settings = load(matches, matches.get_one::<PathBuf>("config").cloned())?;
    let words: Vec<String> = sub
        .get_many::<String>("command")
        .map(|w| w.cloned().collect())
        .unwrap_or_default();
    let path = settings.config.data_dir.join(ADMIN_SOCKET);
    let answer = admin_request(&path, &words.join(" "))
        .map_err(|e| anyhow::anyhow!("cannot reach the server at {}: {e}", path.display()))?;
    print!("{answer}");
    if answer.starts_with("error:") {
        anyhow::bail!("the server refused the command");
    }
    Ok(())
}

fn check_config(sub: &ArgMatches) -> anyhow::Result<()> {
    let settings = load(sub, sub.get_one::<PathBuf>("file").cloned())?;
    print!("{}", settings.effective_toml());
    Ok(())
}

/// What the signal thread acts on once the server is up.
struct Running {
    stop: Arc<AtomicBool>,
    certs: Option<Arc<tern_net::tls::CertStore>>,
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries only the startup lines that
    // scripts and tests parse, and nobody need drain it afterwards.
    // The filter sits behind a reload handle so `ternd admin log FILTER`
    // can change it without a restart.
    let filter = tracing_subscriber::EnvFilter::builder().parse_lossy(&settings.log);
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_writer(std::io::stderr),
        )
        .init();
    let log_reload: LogReload = Box::new(move |directives: &str| {
        let filter = tracing_subscriber::EnvFilter::builder()
            .parse(directives)
            .map_err(|e| format!("bad log filter {directives:?}: {e}"))?;
        filter_handle.reload(filter).map_err(|e| e.to_string())
    });
    eprint!("ternd: effective configuration:\n{}", settings.effective_toml());
    let config = settings.config;
    let metrics = Arc::new(Metrics::new(config.shards));
    let ready = Arc::new(AtomicBool::new(false));
    // Started before the server so that /healthz answers while the store
    // opens (which can take a while after a crash) and /readyz says 503.
    let http = match settings.metrics_listen {
        Some(addr) => {
            let http = serve_http(addr, metrics.clone(), ready.clone(), None)
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
            println!("ternd metrics on {}", http.local_addr());
            Some(http)
        }
        None => None,
    };
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let data_dir = config.data_dir.clone();
    let content_filter = config.content_filter.clone();
    let jwt = config.jwt.clone();
    let jwt_with_open_registration = config.jwt.is_some() && config.registration;
    // The signal thread starts before the server: opening the store (a
    // recovery after a crash, an index backfill) can take long, and a
    // stop asked for meanwhile must not wait for it. Until the server is
    // up a stop signal exits at once: nothing was acknowledged yet, and
    // the store is crash-safe.
    let running: Arc<OnceLock<Running>> = Arc::default();
    let not_ready = ready.clone();
    let signal_thread_running = running.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            let Some(running) = signal_thread_running.get() else {
                if signal != SIGHUP {
                    eprintln!("ternd: stop signal {signal} while starting: exiting");
                    std::process::exit(1);
                }
                continue;
            };
            if signal == SIGHUP {
                tern_engine::filter::reload_and_log(content_filter.as_ref());
                match jwt.as_ref().map(|jwt| jwt.reload_jwks()) {
                    Some(Ok(Some(keys))) => tracing::info!(keys, "reloaded the JWT key set"),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "JWT key set reload failed; the old keys stay")
                    }
                    Some(Ok(None)) | None => {}
                }
                match running.certs.as_ref().map(|c| c.reload()) {
                    Some(Ok(())) => tracing::info!("reloaded the TLS certificate"),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "TLS reload failed; the old certificate stays")
                    }
                    None => tracing::info!("SIGHUP: no TLS listener to reload"),
                }
                continue;
            }
            if running.stop.load(Ordering::SeqCst) {
                // The operator's second Ctrl-C during a stuck drain: what
                // was acknowledged is in the store's journal already.
                tracing::warn!(signal, "second stop signal: exiting without finishing the drain");
                std::process::exit(1);
            }
            tracing::info!(
                signal,
                "stopping: draining connections (a second signal exits at once)"
            );
            not_ready.store(false, Ordering::SeqCst);
            running.stop.store(true, Ordering::SeqCst);
        }
    });
    let server = Server::start_with_metrics(config, metrics.clone())?;
    if let (Some(http), Some(writer)) = (&http, server.writer_handle()) {
        http.set_writer(writer);
    }
    // Bound before ternd says it is up, so that a server that cannot serve
    // it never announces itself (scripts, /readyz) and then exits.
    let admin_path = data_dir.join(ADMIN_SOCKET);
    let admin = match serve_admin(&admin_path, server.admin_context(Some(log_reload))) {
        Ok(admin) => admin,
        Err(e) => {
            server.stop_handle().store(true, Ordering::SeqCst);
            server.wait()?;
            anyhow::bail!("cannot serve the admin socket {}: {e}", admin_path.display());
        }
    };
    ready.store(true, Ordering::SeqCst);
    println!(
        "ternd listening on {} ({}, data in {})",
        server.addr(),
        tern_engine::admin::counted(server.shards(), "shard"),
        data_dir.display()
    );
    if let Some(addr) = server.tls_addr() {
        println!("ternd TLS listening on {addr}");
    }
    if glommio::coop_taskrun_rings() == Some(false) {
        tracing::warn!(
            "io_uring rings interrupt busy shards for every completion (a kernel before 5.19, \
             or GLOMMIO_COOP_TASKRUN=0): expect about 1.5x the CPU per unbatched message; \
             see docs/operations.md"
        );
    }
    if jwt_with_open_registration {
        tracing::warn!(
            "JWT logins are on and so is Register: anyone may take a name before its owner's \
             first JWT login (which then fails); set registration = false unless users also \
             sign up with passwords (docs/configuration.md)"
        );
    }
    let _ = running.set(Running {
        stop: server.stop_handle(),
        certs: server.tls_certs(),
    });
    server.wait()?;
    drop(admin);
    drop(http);
    tracing::info!("stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_quotes_a_legacy_flag_as_typed() {
        let matches = command()
            .try_get_matches_from(["ternd", "--idle-timeout-secs", "100000"])
            .unwrap();
        let err = load(&matches, None).unwrap_err().to_string();
        assert!(err.contains("from flag --idle-timeout-secs 100000"), "{err}");
    }
}
