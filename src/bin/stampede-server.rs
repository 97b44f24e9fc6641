//! `stampede-server`: the flash-sale inventory server.
//!
//! Tokens come from the environment (`STAMPEDE_ADMIN_TOKEN`,
//! `STAMPEDE_CHECKOUT_TOKEN`), never from flags; with neither set the server
//! refuses to start unless `--insecure` is given.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use stampede::clock::SystemClock;
use stampede::server::{self, ServerConfig, Tokens};

#[derive(Parser, Debug)]
#[command(name = "stampede-server", version, about = "Flash-sale inventory server")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Directory for the write-ahead log and snapshots (created if missing).
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
}

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
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("stampede-io");
    if let Some(n) = args.io_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.build().context("building the tokio runtime")?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let mut config = ServerConfig::new(Tokens { admin, checkout, insecure: args.insecure });
        config.pool_shards = args.shards.max(1);
        config.pin_hot_shards = !args.no_pin;
        config.clock = Arc::new(SystemClock);
        let handle = server::start(listener, config)?;
        // Scripts and tests read this line to learn the port.
        println!("stampede-server listening on {}", handle.addr);
        tracing::info!(addr = %handle.addr, shards = args.shards, data_dir = %args.data_dir.display(), "serving");
        shutdown_signal().await;
        tracing::info!("shutdown signal received; no longer accepting connections");
        handle.stop_accepting();
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
