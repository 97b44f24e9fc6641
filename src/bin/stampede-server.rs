//! `stampede-server`: the flash-sale inventory server.
//!
//! Tokens come from the environment (`STAMPEDE_ADMIN_TOKEN`,
//! `STAMPEDE_CHECKOUT_TOKEN`), never from flags; with neither set the server
//! refuses to start unless `--insecure` is given.
//!
//! Start-up: lock the data dir, recover (snapshot + WAL replay), start the
//! log writer and shards, then listen. SIGTERM/SIGINT: stop accepting, let
//! shards finish what is queued, flush and fsync the log, write a final
//! snapshot, exit 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use stampede::clock::SystemClock;
use stampede::recovery::{self, RecoverOptions, Retention};
use stampede::server::{self, ServerConfig, Tokens};
use stampede::wal::writer::{self as wal_writer, DataSync, FailingSync, Syncer};
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
    if admin.is_none() && checkout.is_none() && !args.insecure {
        bail!(
            "no token configured: set STAMPEDE_ADMIN_TOKEN and/or STAMPEDE_CHECKOUT_TOKEN, \
             or pass --insecure for a local experiment (every connection is then admin)"
        );
    }
    if args.insecure && (admin.is_some() || checkout.is_some()) {
        bail!("--insecure cannot be combined with configured tokens");
    }
    if args.insecure {
        tracing::warn!("running with --insecure: every connection has the admin role");
    }

    // --- data dir: lock, recover -------------------------------------------
    let dir = args.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join("LOCK")).context("creating the data dir lock file")?;
    if lock.try_lock().is_err() {
        bail!("data dir {} is in use by another stampede-server", dir.display());
    }
    let options = RecoverOptions { pool_shards: args.shards.max(1), truncate_corrupt: args.wal_truncate_corrupt };
    let recovered = recovery::recover(&dir, options).context("recovering from the data dir")?;
    if args.wal_retention == Retention::Consumer && !dir.join(recovery::CONSUMER_LSN_FILE).exists() {
        tracing::warn!(
            "no downstream consumer has reported a settled LSN ({}): log segments are kept until one does; \
             pass --wal-retention snapshot if no reconciler will run",
            recovery::CONSUMER_LSN_FILE
        );
    }
    let report = &recovered.report;
    tracing::info!(
        snapshot_lsn = ?report.snapshot_lsn, records_replayed = report.records_replayed,
        segments = report.segments_scanned, torn_bytes_dropped = report.torn_bytes_dropped,
        next_lsn = recovered.next_lsn, elapsed_ms = report.elapsed.as_millis() as u64,
        "recovered"
    );

    // --- log writer -----------------------------------------------------------
    let wal_config = WalConfig {
        durability: args.durability,
        flush_bytes: args.wal_flush_bytes.max(1),
        flush_interval: Duration::from_micros(args.wal_flush_interval_us),
        async_sync_interval: Duration::from_millis(args.wal_async_sync_ms.max(1)),
        ..WalConfig::new(&dir)
    };
    let syncer: Box<dyn Syncer> = match args.fail_fsync_after {
        Some(ok_syncs) => Box::new(FailingSync { ok_syncs }),
        None => Box::new(DataSync),
    };
    // A log that cannot be written must not acknowledge anything more:
    // exit at once, non-zero. Never retry an fsync.
    let fatal = Arc::new(|message: &str| {
        tracing::error!("{message}; exiting");
        eprintln!("stampede-server: fatal: {message}");
        std::process::exit(70);
    });
    let wal = wal_writer::start(wal_config, recovered.next_lsn, syncer, fatal).context("starting the log writer")?;

    // --- serve ----------------------------------------------------------------
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("stampede-io");
    if let Some(n) = args.io_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.build().context("building the tokio runtime")?;
    let mut config = ServerConfig::new(Tokens { admin, checkout, insecure: args.insecure });
    config.engines = Some(recovered.engines);
    config.pin_hot_shards = !args.no_pin;
    config.clock = Arc::new(SystemClock);
    config.sinks = wal.sink_factory();
    let handle = runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        anyhow::Ok(server::start(listener, config)?)
    })?;

    // Periodic checkpoints in the background (closed segments only).
    let stopping = Arc::new(AtomicBool::new(false));
    let checkpointer = {
        let (dir, stopping, stats) = (dir.clone(), stopping.clone(), wal.stats.clone());
        let (interval, retention) = (Duration::from_secs(args.snapshot_interval_secs.max(1)), args.wal_retention);
        std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
            let mut waited = Duration::ZERO;
            while !stopping.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                waited += Duration::from_millis(100);
                if waited < interval {
                    continue;
                }
                waited = Duration::ZERO;
                let active = stats.active_segment_first_lsn.load(Ordering::Acquire);
                match recovery::checkpoint(&dir, Some(active), retention) {
                    Ok(done) => tracing::info!(snapshot_lsn = ?done.snapshot_lsn, segments_deleted = done.segments_deleted, "checkpoint"),
                    Err(e) => tracing::error!(error = %e, "checkpoint failed"),
                }
            }
        })?
    };

    // Scripts and tests read this line to learn the port.
    println!("stampede-server listening on {}", handle.addr);
    tracing::info!(addr = %handle.addr, durability = ?args.durability, data_dir = %dir.display(), "serving");
    runtime.block_on(shutdown_signal());

    // --- graceful shutdown ------------------------------------------------------
    tracing::info!("shutting down: no new connections, draining shards");
    handle.stop_accepting();
    handle.shared.router.shutdown();
    wal.close().context("closing the write-ahead log")?;
    // Give connection writers a moment to send the last replies.
    std::thread::sleep(Duration::from_millis(100));
    stopping.store(true, Ordering::Relaxed);
    let _ = checkpointer.join();
    let done = recovery::checkpoint(&dir, None, args.wal_retention).context("final snapshot")?;
    tracing::info!(snapshot_lsn = ?done.snapshot_lsn, elapsed_ms = done.elapsed.as_millis() as u64, "final snapshot written; bye");
    drop(lock);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
