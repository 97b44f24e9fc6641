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
use stampede::cluster::{ClusterConfig, SyncDegrade};
use stampede::node::{Node, NodeConfig};
use stampede::recovery::Retention;
use stampede::server::Tokens;
use stampede::wal::writer::FailingSync;
use stampede::wal::{Durability, WalConfig};

#[derive(clap::Parser, Debug)]
#[command(name = "stampede-server", version, about = "Flash-sale inventory server")]
struct Args {
    /// A TOML file with any of the settings below (same names, snake_case) and a
    /// [tokens] table (admin, checkout, replication). Command-line flags override it;
    /// token environment variables override its tokens. Unknown keys are refused.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log format: `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Directory for the write-ahead log and snapshots (created if missing; one server per dir).
    /// Required, here or in the config file.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shards for ordinary SKUs; each hot SKU gets a pinned shard of its own.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Tokio I/O worker threads (default: one per core).
    #[arg(long)]
    io_threads: Option<usize>,
    /// Do not pin hot shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Do not move sales by demand (admins can still move them: stampede-ctl sale move).
    #[arg(long)]
    no_auto_placement: bool,
    /// A pool sale deciding this many requests a second gets a shard of its own
    /// (so does one taking half of a saturated pool shard's requests).
    #[arg(long, default_value_t = stampede::limits::PROMOTE_OPS_PER_S_DEFAULT)]
    promote_ops_per_s: u64,
    /// A sale the server promoted goes back to the pool below this rate...
    #[arg(long, default_value_t = stampede::limits::DEMOTE_OPS_PER_S_DEFAULT)]
    demote_ops_per_s: u64,
    /// ...held this long.
    #[arg(long, default_value_t = stampede::limits::DEMOTE_AFTER_MS_DEFAULT)]
    demote_after_ms: u64,
    /// Dedicated shards the server may run for sales it promotes (default: half the cores, at least 1).
    #[arg(long)]
    dedicated_max: Option<usize>,
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
    /// RESERVE operations per second allowed per user id, across all connections
    /// (above it: `rate_limited` with a retry-after). 0 turns the limit off.
    #[arg(long, default_value_t = stampede::limits::USER_RESERVES_PER_S_DEFAULT)]
    user_reserve_rate: u32,
    /// Burst of the per-user rate.
    #[arg(long, default_value_t = stampede::limits::USER_RESERVES_BURST_DEFAULT)]
    user_reserve_burst: u32,
    /// Serve clients over TLS with this certificate chain (PEM)...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Join a cluster whose leader etcd decides: etcd client endpoints,
    /// comma-separated (host:port). Needs --cluster, --node-id, --advertise
    /// and STAMPEDE_REPLICATION_TOKEN (the same on every node: nodes follow
    /// each other with it).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The cluster's name (its keys in etcd live under /stampede/NAME/).
    #[arg(long)]
    cluster: Option<String>,
    /// This node's id, unique in the cluster.
    #[arg(long)]
    node_id: Option<String>,
    /// Where clients and the other nodes reach this node (host:port);
    /// default: the listen address.
    #[arg(long)]
    advertise: Option<String>,
    /// Standbys that must hold a record durably before its reply leaves (0: asynchronous).
    #[arg(long, default_value_t = 1)]
    sync_standbys: usize,
    /// A synchronous standby that makes no progress this long is replaced; with none to
    /// replace it, --sync-degrade decides.
    #[arg(long, default_value_t = stampede::limits::SYNC_STANDBY_TIMEOUT_MS_DEFAULT)]
    sync_timeout_ms: u64,
    /// Without enough synchronous standbys: `never` (the default) refuses new requests
    /// and holds replies rather than acknowledge a record that exists on one disk;
    /// `async` goes on alone after --sync-timeout-ms (its loss window: what it
    /// acknowledges alone is lost with its disk).
    #[arg(long, value_enum, default_value = "never")]
    sync_degrade: SyncDegrade,
    /// The leader's etcd lease: how long a lost leader keeps the cluster waiting.
    #[arg(long, default_value_t = stampede::limits::LEADER_LEASE_TTL_MS_DEFAULT)]
    lease_ttl_ms: u64,
    /// Test seam: the log's fsync fails after this many successful calls.
    #[arg(long, hide = true)]
    fail_fsync_after: Option<u64>,
    /// Test seam: close log segments at this size instead of
    /// WAL_SEGMENT_BYTES_MAX (fault-injection tests need many segments).
    #[arg(long, hide = true)]
    wal_segment_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

/// The `--config` file: every setting optional, unknown keys refused.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    shards: Option<usize>,
    io_threads: Option<usize>,
    no_pin: Option<bool>,
    no_auto_placement: Option<bool>,
    promote_ops_per_s: Option<u64>,
    demote_ops_per_s: Option<u64>,
    demote_after_ms: Option<u64>,
    dedicated_max: Option<usize>,
    insecure: Option<bool>,
    durability: Option<Durability>,
    wal_flush_bytes: Option<usize>,
    wal_flush_interval_us: Option<u64>,
    wal_async_sync_ms: Option<u64>,
    snapshot_interval_secs: Option<u64>,
    wal_retention: Option<Retention>,
    wal_truncate_corrupt: Option<bool>,
    metrics_listen: Option<String>,
    log_format: Option<LogFormat>,
    user_reserve_rate: Option<u32>,
    user_reserve_burst: Option<u32>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    etcd: Option<Vec<String>>,
    cluster: Option<String>,
    node_id: Option<String>,
    advertise: Option<String>,
    sync_standbys: Option<usize>,
    sync_timeout_ms: Option<u64>,
    sync_degrade: Option<SyncDegrade>,
    lease_ttl_ms: Option<u64>,
    tokens: Option<FileTokens>,
}

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTokens {
    admin: Option<String>,
    checkout: Option<String>,
    replication: Option<String>,
}

impl std::fmt::Debug for FileTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileTokens(<redacted>)")
    }
}

/// Read `--config` (if any) and fill every setting not given on the command
/// line from it. Returns the file's tokens.
fn apply_config_file(args: &mut Args, matches: &clap::ArgMatches) -> anyhow::Result<FileTokens> {
    let Some(path) = args.config.clone() else {
        return Ok(FileTokens::default());
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config file {}", path.display()))?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
    let from_cli = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    macro_rules! take {
        ($field:ident) => {
            if !from_cli(stringify!($field)) {
                if let Some(v) = file.$field {
                    args.$field = v;
                }
            }
        };
        ($field:ident, optional) => {
            if !from_cli(stringify!($field)) && file.$field.is_some() {
                args.$field = file.$field;
            }
        };
    }
    take!(listen);
    take!(data_dir, optional);
    take!(shards);
    take!(io_threads, optional);
    take!(no_pin);
    take!(no_auto_placement);
    take!(promote_ops_per_s);
    take!(demote_ops_per_s);
    take!(demote_after_ms);
    take!(dedicated_max, optional);
    take!(insecure);
    take!(durability);
    take!(wal_flush_bytes);
    take!(wal_flush_interval_us);
    take!(wal_async_sync_ms);
    take!(snapshot_interval_secs);
    take!(wal_retention);
    take!(wal_truncate_corrupt);
    take!(metrics_listen, optional);
    take!(log_format);
    take!(user_reserve_rate);
    take!(user_reserve_burst);
    take!(tls_cert, optional);
    take!(tls_key, optional);
    take!(etcd);
    take!(cluster, optional);
    take!(node_id, optional);
    take!(advertise, optional);
    take!(sync_standbys);
    take!(sync_timeout_ms);
    take!(sync_degrade);
    take!(lease_ttl_ms);
    Ok(file.tokens.unwrap_or_default())
}

/// mimalloc: the engine allocates and frees many small records; glibc's
/// allocator spent a quarter of replay time consolidating free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A token from the environment, else from the config file.
fn token(name: &str, from_file: Option<String>) -> anyhow::Result<Option<Vec<u8>>> {
    match std::env::var(name) {
        Ok(v) if v.is_empty() => bail!("{name} is set but empty"),
        Ok(v) => Ok(Some(v.into_bytes())),
        Err(std::env::VarError::NotPresent) => match from_file {
            Some(v) if v.is_empty() => bail!("the config file's token for {name} is empty"),
            other => Ok(other.map(String::into_bytes)),
        },
        Err(e) => bail!("{name}: {e}"),
    }
}

fn main() -> anyhow::Result<()> {
    // Before the runtime and the tables exist: applies to every mapping.
    let thp_off = stampede::memory::disable_transparent_huge_pages();
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let mut args = <Args as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Config errors are reported before logging is set up: straight to stderr.
    let file_tokens = apply_config_file(&mut args, &matches)?;
    let filter = || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).init(),
        LogFormat::Json => {
            tracing_subscriber::fmt().json().with_env_filter(filter()).with_writer(std::io::stderr).init()
        }
    }
    // A panic anywhere (an engine invariant assertion, a bug in the log
    // writer) means this process can no longer be trusted to acknowledge
    // anything: stop at once and let a restart recover from disk. Recovery
    // catches its own (a snapshot or record that breaks an invariant) and
    // falls back or refuses to start with the file named, so those pass.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if stampede::recovery::panic_is_caught() {
            return;
        }
        eprintln!("stampede-server: fatal: a thread panicked; exiting (restart to recover from the data dir)");
        std::process::exit(70);
    }));
    let Some(data_dir) = args.data_dir.clone() else {
        bail!("no data dir: pass --data-dir DIR or set data_dir in the --config file");
    };
    tracing::info!(config = ?args, "effective configuration (tokens not shown)");
    tracing::info!(transparent_huge_pages_off = thp_off, "memory policy");
    let admin = token("STAMPEDE_ADMIN_TOKEN", file_tokens.admin)?;
    let checkout = token("STAMPEDE_CHECKOUT_TOKEN", file_tokens.checkout)?;
    let replication = token("STAMPEDE_REPLICATION_TOKEN", file_tokens.replication)?;
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

    let mut wal = WalConfig::new(&data_dir);
    wal.durability = args.durability;
    wal.flush_bytes = args.wal_flush_bytes.max(1);
    wal.flush_interval = Duration::from_micros(args.wal_flush_interval_us);
    wal.async_sync_interval = Duration::from_millis(args.wal_async_sync_ms.max(1));
    if let Some(bytes) = args.wal_segment_bytes {
        wal.segment_bytes_max = bytes.max(4096);
    }
    let tokens = Tokens { admin, checkout, replication: replication.clone(), insecure: args.insecure };
    let mut config = NodeConfig::new(&data_dir, &args.listen, tokens);
    config.pool_shards = args.shards.max(1);
    config.pin_hot_shards = !args.no_pin;
    let mut placement = stampede::placement::PlacementConfig::defaults(stampede::placement::cores());
    placement.auto = !args.no_auto_placement;
    placement.promote_ops_per_s = args.promote_ops_per_s.max(1);
    placement.demote_ops_per_s = args.demote_ops_per_s.min(placement.promote_ops_per_s);
    placement.demote_after = Duration::from_millis(args.demote_after_ms);
    if let Some(max) = args.dedicated_max {
        placement.dedicated_max = max.min(stampede::limits::HOT_SHARDS_MAX);
    }
    config.placement = placement;
    config.wal = wal;
    config.snapshot_interval = Duration::from_secs(args.snapshot_interval_secs.max(1));
    config.retention = args.wal_retention;
    config.truncate_corrupt = args.wal_truncate_corrupt;
    config.metrics_listen = args.metrics_listen.clone();
    config.user_rate = (args.user_reserve_rate > 0).then_some((args.user_reserve_rate, args.user_reserve_burst.max(1)));
    config.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(stampede_protocol::tls::server_config(cert, key).context("loading TLS certificate")?)
        }
        (None, None) => None,
        _ => bail!("TLS needs both tls_cert and tls_key"),
    };
    if let Some(ok_syncs) = args.fail_fsync_after {
        config.syncer = Box::new(FailingSync { ok_syncs });
    }
    if !args.etcd.is_empty() {
        let (Some(cluster), Some(node_id)) = (args.cluster.clone(), args.node_id.clone()) else {
            bail!("--etcd needs --cluster and --node-id");
        };
        let Some(peer_token) = replication.clone() else {
            bail!("a cluster node needs STAMPEDE_REPLICATION_TOKEN (the same on every node)");
        };
        let advertise = args.advertise.clone().unwrap_or_else(|| args.listen.clone());
        if advertise.ends_with(":0") {
            bail!("--advertise must name a fixed port: the other nodes and the clients dial it");
        }
        config.cluster = Some(ClusterConfig {
            etcd: args.etcd.clone(),
            cluster,
            node_id,
            advertise,
            sync_standbys: args.sync_standbys,
            degrade: args.sync_degrade,
            sync_timeout: Duration::from_millis(args.sync_timeout_ms.max(100)),
            lease_ttl: Duration::from_millis(args.lease_ttl_ms.max(1_000)),
            peer_token: String::from_utf8(peer_token).context("STAMPEDE_REPLICATION_TOKEN must be UTF-8")?,
        });
        // A node that must rejoin (a leader that lost its lease, a standby
        // whose log must be cut) exits for its supervisor to restart it.
        config.rejoin = Arc::new(|reason: &str| {
            tracing::warn!(%reason, "exiting to rejoin the cluster (restart me)");
            eprintln!("stampede-server: rejoin: {reason}");
            std::process::exit(stampede::limits::EXIT_REJOIN);
        });
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
    tracing::info!(addr = %node.addr(), durability = ?args.durability, data_dir = %data_dir.display(), "serving");
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
