//! `ternd`: the Tern server.
//!
//! With no arguments it serves on 127.0.0.1:7878 with its data in
//! `./tern-data` and one shard per CPU. SIGINT or SIGTERM stops it cleanly:
//! clients are told to reconnect later, queues drain, the store is flushed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tern_engine::{Config, Server};

/// The Tern instant-messaging server.
#[derive(Parser, Debug)]
#[command(name = "ternd", version, about)]
struct Args {
    /// Address to accept plain-TCP clients on.
    #[arg(long, env = "TERN_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Directory of the store (created if missing).
    #[arg(long, env = "TERN_DATA_DIR", default_value = "tern-data")]
    data_dir: PathBuf,
    /// Number of shards (default: one per available CPU).
    #[arg(long, env = "TERN_SHARDS")]
    shards: Option<usize>,
    /// Close connections silent for this many seconds.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Largest frame body accepted, in bytes.
    #[arg(long, default_value_t = tern_proto::limits::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: u32,
    /// Bytes queued for one slow client before it is disconnected.
    #[arg(long, default_value_t = 1 << 20)]
    outbound_queue_bytes: usize,
    /// Do not pin shards to CPUs.
    #[arg(long)]
    no_pin: bool,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ternd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config {
        listen: args.listen,
        data_dir: args.data_dir,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        max_frame_bytes: args.max_frame_bytes,
        outbound_queue_bytes: args.outbound_queue_bytes,
        pin_shards: !args.no_pin,
        ..Config::default()
    };
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let data_dir = config.data_dir.clone();
    let server = Server::start(config)?;
    println!(
        "ternd listening on {} ({} shards, data in {})",
        server.addr(),
        server.shards(),
        data_dir.display()
    );
    let stop = server.stop_handle();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            tracing::info!(signal, "stopping: draining connections");
            stop.store(true, Ordering::SeqCst);
        }
    });
    server.wait()?;
    tracing::info!("stopped cleanly");
    Ok(())
}
