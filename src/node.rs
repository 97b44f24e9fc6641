//! A complete durable server in one value: lock the data dir, recover,
//! start the log writer, the shards, the listener, the log service and the
//! periodic checkpoints; and shut all of it down in the right order.
//!
//! `stampede-server` is this plus flag parsing and signal handling; tests
//! and tools that need a real durable server in-process (the reconciler's
//! tests) start one here, on the same code path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::clock::{Clock, SystemClock};
use crate::cluster::election::{Election, Leadership};
use crate::cluster::manager::{self, Join, JoinLog, Manager, RejoinHandler};
use crate::cluster::{standby, ClusterConfig, ClusterState, History};
use crate::recovery::Replica;
use crate::recovery::{self, RecoverOptions, RecoveryReport, Retention};
use crate::server::log::LogService;
use crate::server::{self, ServerConfig, ServerHandle, Tokens};
use crate::wal::writer::{self as wal_writer, DataSync, FatalHandler, Syncer, WalHandle, WalStats};
use crate::wal::WalConfig;

pub struct NodeConfig {
    pub listen: String,
    pub tokens: Tokens,
    /// Shards for ordinary SKUs.
    pub pool_shards: usize,
    pub pin_hot_shards: bool,
    /// The demand monitor (which sales get a shard of their own).
    pub placement: crate::placement::PlacementConfig,
    /// The data dir, durability mode and group-commit bounds.
    pub wal: WalConfig,
    pub snapshot_interval: Duration,
    pub retention: Retention,
    pub truncate_corrupt: bool,
    pub syncer: Box<dyn Syncer>,
    /// Called from the log writer when the log cannot continue.
    pub fatal: FatalHandler,
    pub clock: Arc<dyn Clock>,
    /// Serve /metrics, /healthz and /readyz here (`None`: off).
    pub metrics_listen: Option<String>,
    /// Per-user RESERVE rate and burst (`None`: off).
    pub user_rate: Option<(u32, u32)>,
    /// TLS on the client port (`None`: plaintext).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Take part in a cluster (`None`: decide alone).
    pub cluster: Option<ClusterConfig>,
    /// Called when a cluster node must restart to rejoin (the server
    /// binary exits with `EXIT_REJOIN`); by default it panics.
    pub rejoin: RejoinHandler,
}

impl NodeConfig {
    /// Defaults for a data dir: fsync durability, one pool shard, snapshots
    /// every 5 minutes, consumer retention. A log failure panics (the server
    /// binary replaces this with an exit).
    pub fn new(data_dir: impl Into<PathBuf>, listen: impl Into<String>, tokens: Tokens) -> NodeConfig {
        NodeConfig {
            listen: listen.into(),
            tokens,
            pool_shards: 1,
            pin_hot_shards: true,
            placement: crate::placement::PlacementConfig::defaults(crate::placement::cores()),
            wal: WalConfig::new(data_dir),
            snapshot_interval: Duration::from_secs(300),
            retention: Retention::Consumer,
            truncate_corrupt: false,
            syncer: Box::new(DataSync),
            fatal: Arc::new(|message: &str| panic!("fatal: {message}")),
            clock: Arc::new(SystemClock),
            metrics_listen: None,
            user_rate: Some((crate::limits::USER_RESERVES_PER_S_DEFAULT, crate::limits::USER_RESERVES_BURST_DEFAULT)),
            tls: None,
            cluster: None,
            rejoin: Arc::new(|reason: &str| panic!("rejoin: {reason}")),
        }
    }
}

/// A running durable server.
pub struct Node {
    pub server: ServerHandle,
    /// Where /metrics is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// /readyz answers 200 while this is set.
    ready: Arc<AtomicBool>,
    pub recovery: RecoveryReport,
    pub wal_stats: Arc<WalStats>,
    wal: WalHandle,
    dir: PathBuf,
    retention: Retention,
    stopping: Arc<AtomicBool>,
    checkpointer: JoinHandle<()>,
    /// The leadership this node holds, if it leads a cluster (given up at a
    /// clean stop, so a standby takes over at once).
    leadership: Arc<parking_lot::Mutex<Option<Leadership>>>,
    election: Option<Election>,
    runtime: tokio::runtime::Handle,
    /// Held (flock) for the node's life: one server per data dir.
    _lock: std::fs::File,
}

impl Node {
    /// Start on the current tokio runtime (multi-threaded). Recovery runs
    /// before the listener binds, so a client never sees a partial state.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let dir = config.wal.dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating data dir {}", dir.display()))?;
        let lock = std::fs::File::create(dir.join("LOCK")).context("creating the data dir lock file")?;
        if lock.try_lock().is_err() {
            bail!("data dir {} is in use by another stampede-server", dir.display());
        }
        let options = RecoverOptions::new(config.pool_shards.max(1), config.truncate_corrupt);
        let (mut recovered, mut history) = recover_with_history(&dir, options).await?;
        // A cluster node first finds its place: follow the leader (fixing
        // its data dir if its log parts from the leader's), or lead.
        let election = config.cluster.as_ref().map(Election::new);
        let start = match (&config.cluster, &election) {
            (Some(cluster), Some(election)) => loop {
                let log = JoinLog { dir: &dir, last_lsn: recovered.next_lsn - 1, history: &history };
                match manager::join(cluster, election, log).await {
                    Join::Start(start) => break Some(start),
                    Join::Truncate(lsn) => {
                        let cut_dir = dir.clone();
                        let kept = tokio::task::spawn_blocking(move || standby::cut_log_after(&cut_dir, lsn))
                            .await
                            .context("cutting the log")??;
                        tracing::warn!(
                            after_lsn = lsn, kept_aside = ?kept,
                            "our log parts from the leader's: cut the records it never acknowledged"
                        );
                    }
                    Join::Snapshot(lsn, term, file) => {
                        let snap_dir = dir.clone();
                        let kept =
                            tokio::task::spawn_blocking(move || standby::install_snapshot(&snap_dir, lsn, term, &file))
                                .await
                                .context("installing the snapshot")??;
                        tracing::warn!(lsn, kept_aside = ?kept, "installed the leader's snapshot");
                    }
                }
                (recovered, history) = recover_with_history(&dir, options).await?;
            },
            _ => None,
        };
        if config.retention == Retention::Consumer && !dir.join(recovery::CONSUMER_LSN_FILE).exists() {
            tracing::warn!(
                "no downstream consumer has reported a settled LSN ({}): log segments are kept until one does; \
                 pass --wal-retention snapshot if no reconciler will run",
                recovery::CONSUMER_LSN_FILE
            );
        }
        let report = recovered.report;
        for rejected in &report.snapshots_rejected {
            tracing::warn!(snapshot = %rejected, "recovered without this snapshot");
        }
        tracing::info!(
            snapshot_lsn = ?report.snapshot_lsn, records_replayed = report.records_replayed,
            segments = report.segments_scanned, torn_bytes_dropped = report.torn_bytes_dropped,
            next_lsn = recovered.next_lsn, elapsed_ms = report.elapsed.as_millis() as u64,
            "recovered"
        );
        let wal_config = WalConfig { replicated: config.cluster.is_some(), ..config.wal.clone() };
        let wal = wal_writer::start(wal_config, recovered.next_lsn, config.syncer, config.fatal)
            .context("starting the log writer")?;
        let cluster = Arc::new(match &config.cluster {
            None => ClusterState::single(),
            Some(c) => {
                // Nothing leaves until this node leads (and renews a lease).
                wal.fence.close();
                ClusterState::clustered(c.clone())
            }
        });
        *cluster.history.lock() = history;
        cluster.durable_lsn.store(recovered.next_lsn - 1, Ordering::Release);
        cluster.applied_lsn.store(recovered.next_lsn - 1, Ordering::Release);
        let log = Arc::new(LogService::new(
            dir.clone(),
            wal.watches.clone(),
            wal.control(),
            cluster.clone(),
            config.clock.clone(),
        ));
        let mut server_config = ServerConfig::new(config.tokens);
        let last_lsn = recovered.next_lsn - 1;
        let (engines, replica) = match start {
            None => (Some(recovered.engines), None),
            Some(_) => (None, Some(Replica::new(recovered.engines, last_lsn))),
        };
        server_config.engines = engines;
        server_config.defer_router = start.is_some();
        server_config.cluster = cluster.clone();
        server_config.pin_hot_shards = config.pin_hot_shards;
        server_config.placement = config.placement;
        server_config.clock = config.clock;
        server_config.sinks = if start.is_some() { Box::new(|_| unreachable_sink()) } else { wal.sink_factory() };
        server_config.log = Some(log);
        server_config.user_rate = config.user_rate;
        server_config.tls = config.tls;
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let server = server::start(listener, server_config)?;
        let leadership = Arc::new(parking_lot::Mutex::new(None));
        if let (Some(start), Some(replica), Some(cluster_config)) = (start, replica, config.cluster.clone()) {
            let manager = Manager {
                election: Election::new(&cluster_config),
                config: cluster_config,
                cluster: cluster.clone(),
                dir: dir.clone(),
                wal: wal.control(),
                watches: wal.watches.clone(),
                stats: wal.stats.clone(),
                fence: wal.fence.clone(),
                shared: server.shared.clone(),
                sinks: Some(wal.sink_factory()),
                rejoin: config.rejoin.clone(),
                leadership: leadership.clone(),
            };
            tokio::spawn(manager.run(start, replica));
        }
        let ready = Arc::new(AtomicBool::new(false));
        let metrics_addr = match &config.metrics_listen {
            Some(addr) => {
                let exporter =
                    crate::server::metrics::Exporter { shared: server.shared.clone(), wal: Some(wal.stats.clone()) };
                let bound = crate::server::metrics::start(addr, exporter, ready.clone())
                    .await
                    .with_context(|| format!("binding the metrics listener {addr}"))?;
                tracing::info!(addr = %bound, "metrics on /metrics, health on /healthz and /readyz");
                Some(bound)
            }
            None => None,
        };

        // Periodic checkpoints in the background (closed segments only).
        let stopping = Arc::new(AtomicBool::new(false));
        let checkpointer = {
            let (dir, stopping, stats) = (dir.clone(), stopping.clone(), wal.stats.clone());
            let (interval, retention) = (config.snapshot_interval.max(Duration::from_millis(100)), config.retention);
            std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
                let mut waited = Duration::ZERO;
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    waited += Duration::from_millis(50);
                    if waited < interval {
                        continue;
                    }
                    waited = Duration::ZERO;
                    let active = stats.active_segment_first_lsn.load(Ordering::Acquire);
                    match recovery::checkpoint(&dir, Some(active), retention) {
                        Ok(done) => tracing::info!(
                            snapshot_lsn = ?done.snapshot_lsn, segments_deleted = done.segments_deleted, "checkpoint"
                        ),
                        Err(e) => tracing::error!(error = %e, "checkpoint failed"),
                    }
                }
            })?
        };
        // Recovered, logging, listening: ready.
        ready.store(true, Ordering::Release);
        Ok(Node {
            server,
            metrics_addr,
            ready,
            recovery: report,
            wal_stats: wal.stats.clone(),
            wal,
            dir,
            retention: config.retention,
            stopping,
            checkpointer,
            leadership,
            election,
            runtime: tokio::runtime::Handle::current(),
            _lock: lock,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Graceful stop: no new connections, shards finish what is queued,
    /// the log is flushed and fsynced, a final snapshot is written. Blocks:
    /// call it off the runtime's worker threads.
    pub fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!("shutting down: no new connections, draining shards");
        self.ready.store(false, Ordering::Release);
        self.server.stop_accepting();
        // Shards decide what is queued; from now on requests are answered
        // `shutting_down`.
        if let Some(router) = self.server.shared.router() {
            router.shutdown();
        }
        // The last group is fsynced and its replies released.
        self.wal.close().context("closing the write-ahead log")?;
        // A leader gives its lease up: a standby (which holds every
        // acknowledged record) takes over at once instead of in a TTL.
        if let (Some(leadership), Some(election)) = (self.leadership.lock().take(), &self.election) {
            self.runtime.block_on(election.resign(&leadership));
            tracing::info!(term = leadership.term, "gave up leadership");
        }
        // Connections stop reading, send every reply they owe, and close.
        let deadline = Duration::from_millis(crate::limits::SHUTDOWN_CONNECTIONS_DRAIN_MS);
        let open = self.server.close_connections(deadline);
        if open > 0 {
            tracing::warn!(connections = open, "connections still open after the drain deadline (clients not reading)");
        }
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.checkpointer.join();
        let done = recovery::checkpoint(&self.dir, None, self.retention).context("final snapshot")?;
        tracing::info!(
            snapshot_lsn = ?done.snapshot_lsn, elapsed_ms = done.elapsed.as_millis() as u64,
            "final snapshot written; bye"
        );
        Ok(())
    }
}

/// Recover `dir` (off the runtime), and the term history that goes with it.
async fn recover_with_history(
    dir: &std::path::Path,
    options: RecoverOptions,
) -> anyhow::Result<(recovery::Recovered, History)> {
    let recover_dir = dir.to_path_buf();
    let recovered = tokio::task::spawn_blocking(move || recovery::recover(&recover_dir, options))
        .await
        .context("recovery thread")?
        .context("recovering from the data dir")?;
    let last_lsn = recovered.next_lsn - 1;
    let history = crate::cluster::history::reconcile(
        crate::cluster::history::load(dir).context("reading the term history")?,
        &recovered.report.terms,
        last_lsn,
    );
    crate::cluster::history::store(dir, &history).context("writing the term history")?;
    Ok((recovered, history))
}

/// The sink of a router a standby never has (its router comes with the
/// promotion, with the log writer's sinks).
fn unreachable_sink() -> Box<dyn crate::sink::LogSink> {
    Box::new(crate::sink::VolatileSink::default())
}
