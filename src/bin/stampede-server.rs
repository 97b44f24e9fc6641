//! `stampede-server`: the flash-sale inventory server.
//!
//! Tokens come from the environment (`STAMPEDE_ADMIN_TOKEN`,
//! `STAMPEDE_CHECKOUT_TOKEN`, `STAMPEDE_REPLICATION_TOKEN` for the
//! reconciler), never from flags; with neither set the server
//! refuses to start unless `--insecure` is given.
//!
//! Start-up: lock the data dir, recover (snapshot + WAL replay), start the
//! log writer and shards, then listen. SIGTERM/SIGINT: stop accepting, let
//! shards finish what is queued, flush and fsync the log, write a final
//! snapshot, exit 0.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use stampede::node::{Node, NodeConfig};
use stampede::recovery::Retention;
use stampede::server::Tokens;
use stampede::wal::writer::FailingSync;
use stampede::wal::{Durability, WalConfig};

#[derive(Parser, Debug)]
#[command(name = "stampede-server", version, about = "Flash-sale inventory server")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Directory for the write-ahead log and snapshots (created if missing; one server per dir).
    #[arg(long)]
    data_dir: PathBuf,
    /// Shards for ordinary SKUs; each hot SKU gets a pinned shard of its own.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Tokio I/O worker threads (default: one per core).
    #[arg(long)]
    io_threads: Option<usize>,
    /// Do not pin hot shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Run with no tokens: every connection gets the admin role. Local experiments only.
    #[arg(long)]
    insecure: bool,
    /// `fsync`: acknowledge after fdatasync (no loss window). `async`: acknowledge
    /// after write(2), fsync every --wal-async-sync-ms (that is the loss window on power loss).
    #[arg(long, value_enum, default_value = "fsync")]
    durability: Durability,
    /// Group commit: flush once this many bytes of records are waiting...
    #[arg(long, default_value_t = stampede::limits::WAL_FLUSH_BYTES_DEFAULT)]
    wal_flush_bytes: usize,
    /// ...or once the oldest waiting record has waited this long, whichever comes first.
    #[arg(long, default_value_t = stampede::limits::WAL_FLUSH_INTERVAL_US_DEFAULT)]
    wal_flush_interval_us: u64,
    /// fsync cadence in async mode.
    #[arg(long, default_value_t = stampede::limits::WAL_ASYNC_SYNC_INTERVAL_MS_DEFAULT)]
    wal_async_sync_ms: u64,
    /// Write a snapshot (and apply the retention rule) this often.
    #[arg(long, default_value_t = 300)]
    snapshot_interval_secs: u64,
    /// When old log segments may go: `consumer` (once a snapshot covers them and the
    /// reconciler has settled past them) or `snapshot` (no reconciler: once a snapshot covers them).
    #[arg(long, value_enum, default_value = "consumer")]
    wal_retention: Retention,
    /// On mid-log corruption, cut the log there instead of refusing to start (records after it are lost).
    #[arg(long)]
    wal_truncate_corrupt: bool,
    /// Serve Prometheus metrics (/metrics) and health (/healthz, /readyz) on this address
    /// (e.g. 127.0.0.1:9090). Off by default.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Test seam: the log's fsync fails after this many successful calls.
    #[arg(long, hide = true)]
    fail_fsync_after: Option<u64>,
}

/// mimalloc: the engine allocates and frees many small records; glibc's
/// allocator spent a quarter of replay time consolidating free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn token_from_env(name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    match std::env::var(name) {
        Ok(v) if v.is_empty() => bail!("{name} is set but empty"),
        Ok(v) => Ok(Some(v.into_bytes())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("{name}: {e}"),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // A panic anywhere (an engine invariant assertion, a bug in the log
    // writer) means this process can no longer be trusted to acknowledge
    // anything: stop at once and let a restart recover from disk.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("stampede-server: fatal: a thread panicked; exiting (restart to recover from the data dir)");
        std::process::exit(70);
    }));
    let args = Args::parse();
    let admin = token_from_env("STAMPEDE_ADMIN_TOKEN")?;
    let checkout = token_from_env("STAMPEDE_CHECKOUT_TOKEN")?;
    let replication = token_from_env("STAMPEDE_REPLICATION_TOKEN")?;
    let configured = admin.is_some() || checkout.is_some() || replication.is_some();
    if !configured && !args.insecure {
        bail!(
            "no token configured: set STAMPEDE_ADMIN_TOKEN, STAMPEDE_CHECKOUT_TOKEN and/or \
             STAMPEDE_REPLICATION_TOKEN, or pass --insecure for a local experiment (every connection is then admin)"
        );
    }
    if args.insecure && configured {
        bail!("--insecure cannot be combined with configured tokens");
    }
    if args.insecure {
        tracing::warn!("running with --insecure: every connection has the admin role");
    }

    let mut wal = WalConfig::new(&args.data_dir);
    wal.durability = args.durability;
    wal.flush_bytes = args.wal_flush_bytes.max(1);
    wal.flush_interval = Duration::from_micros(args.wal_flush_interval_us);
    wal.async_sync_interval = Duration::from_millis(args.wal_async_sync_ms.max(1));
    let tokens = Tokens { admin, checkout, replication, insecure: args.insecure };
    let mut config = NodeConfig::new(&args.data_dir, &args.listen, tokens);
    config.pool_shards = args.shards.max(1);
    config.pin_hot_shards = !args.no_pin;
    config.wal = wal;
    config.snapshot_interval = Duration::from_secs(args.snapshot_interval_secs.max(1));
    config.retention = args.wal_retention;
    config.truncate_corrupt = args.wal_truncate_corrupt;
    config.metrics_listen = args.metrics_listen.clone();
    if let Some(ok_syncs) = args.fail_fsync_after {
        config.syncer = Box::new(FailingSync { ok_syncs });
    }
    // A log that cannot be written must not acknowledge anything more:
    // exit at once, non-zero. Never retry an fsync.
    config.fatal = Arc::new(|message: &str| {
        tracing::error!("{message}; exiting");
        eprintln!("stampede-server: fatal: {message}");
        std::process::exit(70);
    });

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("stampede-io");
    if let Some(n) = args.io_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.build().context("building the tokio runtime")?;
    let node = runtime.block_on(Node::start(config))?;
    // Scripts and tests read this line to learn the port.
    println!("stampede-server listening on {}", node.addr());
    tracing::info!(addr = %node.addr(), durability = ?args.durability, data_dir = %args.data_dir.display(), "serving");
    runtime.block_on(shutdown_signal());
    node.shutdown()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
