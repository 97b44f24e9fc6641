//! `stampede-loadgen`: `drill` runs a scenario against one target and
//! checks the invariants (exit 1 if one broke, 2 if it could not run);
//! `compare` runs it against stampede, Redis (relaxed and durable) and
//! PostgreSQL, plus a PING-only run, and prints the ratios.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::json;
use stampede::wal::Durability;
use stampede_loadgen::cluster::LocalCluster;
use stampede_loadgen::drill::{self, DrillConfig, Spike};
use stampede_loadgen::local::{LocalRedis, LocalStampede};
use stampede_loadgen::report::Summary;
use stampede_loadgen::scenario::{Plan, Scenario};
use stampede_loadgen::target::Target;

/// The allocator the server uses (drills usually run it in-process).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "stampede-loadgen", version, about = "Black Friday drills for stampede, with baselines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one scenario against one target and verify the invariants.
    Drill(DrillArgs),
    /// One node of a `drill --cluster` (started by the drill itself).
    #[command(hide = true)]
    Node(stampede_loadgen::cluster::NodeArgs),
    /// Run one scenario against stampede, Redis (everysec and always), PostgreSQL and a PING floor.
    Compare {
        #[command(flatten)]
        args: DrillArgs,
        /// PostgreSQL for the baseline (tables lg_* are created in it).
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
        postgres_url: String,
    },
}

#[derive(ClapArgs, Debug, Clone)]
struct DrillArgs {
    #[arg(long, value_enum, default_value = "flash")]
    scenario: Scenario,
    /// stampede://HOST:PORT (token: STAMPEDE_TOKEN), redis://HOST:PORT or postgres://...;
    /// none: start a stampede server in-process (temporary data dir).
    #[arg(long)]
    target: Option<String>,
    /// Virtual users (one shopping session each).
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    /// Units of the hot sale (of each SKU in `mixed`; split over its six
    /// warehouses in `regional`).
    #[arg(long, default_value_t = 10_000)]
    stock: u64,
    /// Stop after this long even if users remain.
    #[arg(long, default_value_t = 30.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Requests in flight per connection (without --callers; each its own
    /// frame: the server's per-request path).
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// The checkout-service shape: this many concurrent callers, each doing
    /// one operation at a time (reserve, then confirm or release), sharing
    /// one client with --connections sockets. stampede's client coalesces
    /// their calls into BATCH frames; Redis pipelines them over its
    /// multiplexed connections; PostgreSQL queues them on its pool.
    #[arg(long, conflicts_with_all = ["batch", "depth"])]
    callers: Option<usize>,
    /// Reserves per request (RESERVE_BATCH; a pipeline on Redis).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Open loop: virtual users per second (latency from the scheduled time); closed loop if unset.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop spike: ramp to this multiple of --rate within 1 s...
    #[arg(long, requires = "rate")]
    spike: Option<f64>,
    /// ...starting this many seconds in...
    #[arg(long, default_value_t = 5.0)]
    spike_at_secs: f64,
    /// ...and holding it this long.
    #[arg(long, default_value_t = 5.0)]
    spike_secs: f64,
    /// Reservation TTL (checkout abandons expire after it).
    #[arg(long, default_value_t = 600_000)]
    ttl_ms: u64,
    /// Only PING: the protocol and network floor of the target.
    #[arg(long)]
    ping: bool,
    /// Winners do not confirm: every request is a RESERVE (the sell-through shape).
    #[arg(long)]
    reserve_only: bool,
    /// Durability of the in-process server.
    #[arg(long, value_enum, default_value = "fsync")]
    durability: Durability,
    /// Start etcd and this many stampede nodes (child processes; a leader
    /// and synchronous standbys) instead of one in-process server.
    #[arg(long, conflicts_with = "target")]
    cluster: Option<usize>,
    /// With --cluster: kill -9 the leader this many seconds in, and report
    /// how long clients waited for the new one.
    #[arg(long, requires = "cluster")]
    kill_leader_at_secs: Option<f64>,
    /// With --cluster: standbys each acknowledgement waits for (0: asynchronous).
    #[arg(long, requires = "cluster", default_value_t = 1)]
    sync_standbys: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The --target server's process id: report its CPU time per request
    /// over the load phase (from /proc; the server must run on this machine).
    #[arg(long, requires = "target")]
    server_pid: Option<u32>,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

impl DrillArgs {
    fn config(&self, ping_only: bool) -> DrillConfig {
        DrillConfig {
            connections: self.connections.max(1),
            depth: self.depth.max(1),
            callers: self.callers.map(|n| n.max(1)),
            batch: self.batch.max(1),
            duration_secs: self.duration_secs,
            rate: self.rate,
            spike: self.spike.map(|factor| Spike { factor, at_secs: self.spike_at_secs, hold_secs: self.spike_secs }),
            ping_only,
            server_pid: self.server_pid,
            progress: !self.quiet,
        }
    }

    fn plan(&self) -> Arc<Plan> {
        let mut plan = Plan::new(self.scenario, self.users, self.stock, self.ttl_ms, self.seed);
        plan.reserve_only = self.reserve_only;
        Arc::new(plan)
    }
}

async fn drill_on(url: &str, label: &str, args: &DrillArgs, ping_only: bool) -> anyhow::Result<Summary> {
    let target = Arc::new(Target::connect(url, args.connections, args.callers.is_some()).await?);
    drill::run(target, args.plan(), args.config(ping_only), label).await
}

/// A drill against a local cluster (etcd and child processes), the leader
/// killed on schedule if asked.
async fn drill_cluster(args: &DrillArgs, nodes: usize) -> anyhow::Result<Summary> {
    let mut cluster = LocalCluster::start(nodes.max(1), args.durability, args.sync_standbys).await?;
    std::env::set_var("STAMPEDE_TOKEN", &cluster.token);
    let url = format!("stampede://{}", cluster.addrs());
    let target = Arc::new(Target::connect(&url, args.connections, args.callers.is_some()).await?);
    let Target::Stampede(stampede) = &*target else { unreachable!("a stampede url") };
    let watch = stampede.failover.clone();
    let started = std::time::Instant::now();
    let drill = tokio::spawn(drill::run(target.clone(), args.plan(), args.config(false), "stampede cluster"));
    let mut killed = None;
    if let Some(at) = args.kill_leader_at_secs {
        tokio::time::sleep(std::time::Duration::from_secs_f64(at)).await;
        let (addr, when) = cluster.kill_leader().await?;
        watch.arm(addr.clone(), when);
        killed = Some((addr, when.duration_since(started).as_secs_f64()));
    }
    let mut summary = drill.await??;
    if let Some((addr, at_secs)) = killed {
        let Target::Stampede(stampede) = &*target else { unreachable!("a stampede url") };
        let (new_leader, unavailable_ms) = match watch.window() {
            Some((_, node, ms)) => (cluster.node_id(&node), ms),
            None => ("none".to_string(), f64::NAN),
        };
        summary.failover = Some(stampede_loadgen::report::Failover {
            killed: cluster.node_id(&addr),
            killed_at_secs: at_secs,
            new_leader,
            unavailable_ms,
            retried_calls: stampede.failover_retries(),
        });
    }
    drop(target);
    tokio::task::spawn_blocking(move || cluster.stop()).await?;
    Ok(summary)
}

/// A drill against an in-process stampede server.
async fn drill_local(args: &DrillArgs, ping_too: bool) -> anyhow::Result<(Summary, Option<Summary>)> {
    let server = LocalStampede::start(args.durability).await?;
    std::env::set_var("STAMPEDE_TOKEN", &server.token);
    let url = format!("stampede://{}", server.addr());
    let summary = drill_on(&url, "stampede", args, args.ping).await;
    let ping = if ping_too && summary.is_ok() { Some(drill_on(&url, "ping", args, true).await) } else { None };
    server.stop().await?;
    Ok((summary?, ping.transpose()?))
}

fn write_outputs(args: &DrillArgs, json_value: &serde_json::Value, html: Option<String>) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(json_value)?)?;
    }
    if let (Some(path), Some(html)) = (&args.html, html) {
        std::fs::write(path, html)?;
    }
    Ok(())
}

async fn main_async(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Drill(args) => {
            let summary = match (&args.target, args.cluster) {
                (None, Some(nodes)) => drill_cluster(&args, nodes).await?,
                (None, None) => drill_local(&args, false).await?.0,
                (Some(url), _) => drill_on(url, url.split("://").next().unwrap_or("target"), &args, args.ping).await?,
            };
            print!("{}", summary.table());
            write_outputs(&args, &serde_json::to_value(&summary)?, Some(summary.html()))?;
            Ok(if summary.invariants.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Node(_) => unreachable!("run before the runtime"),
        Command::Compare { args, postgres_url } => {
            // Before the stampede run: the baselines would refuse it after.
            stampede_loadgen::target::refuse_locations(args.scenario, "redis and postgres")?;
            let mut runs = serde_json::Map::new();
            let mut ok = true;
            let mut record = |name: &str, summary: &Summary| {
                print!("{}", summary.table());
                println!();
                ok &= summary.invariants.ok;
                runs.insert(name.to_string(), serde_json::to_value(summary).expect("serializable"));
                summary.throughput_rps
            };
            let (stampede, ping) = drill_local(&args, true).await?;
            let stampede_rps = record("stampede", &stampede);
            let ping = ping.expect("ping run");
            let ping_rps = record("ping", &ping);
            let relaxed = LocalRedis::start("everysec")?;
            let redis = drill_on(&relaxed.url, "redis (appendfsync everysec)", &args, false).await?;
            drop(relaxed);
            let redis_rps = record("redis", &redis);
            let durable = LocalRedis::start("always")?;
            let redis_durable = drill_on(&durable.url, "redis (appendfsync always)", &args, false).await?;
            drop(durable);
            let redis_durable_rps = record("redis_durable", &redis_durable);
            let postgres = drill_on(&postgres_url, "postgres", &args, false).await?;
            let postgres_rps = record("postgres", &postgres);
            let ratios = json!({
                "stampede_vs_redis_throughput": stampede_rps / redis_rps,
                "stampede_vs_redis_durable_throughput": stampede_rps / redis_durable_rps,
                "stampede_vs_postgres_throughput": stampede_rps / postgres_rps,
                "stampede_vs_ping_throughput": stampede_rps / ping_rps,
                "stampede_vs_redis_p99": stampede.latency_us.p99 as f64 / redis.latency_us.p99.max(1) as f64,
                "stampede_vs_redis_durable_p99": stampede.latency_us.p99 as f64 / redis_durable.latency_us.p99.max(1) as f64,
                "stampede_vs_postgres_p99": stampede.latency_us.p99 as f64 / postgres.latency_us.p99.max(1) as f64,
            });
            println!("ratios (stampede / other): {}", serde_json::to_string_pretty(&ratios)?);
            // The runs side by side, under the labels their drills used
            // (the PING run's says what it measured).
            let html = stampede_loadgen::report::compare_html(
                &[
                    ("stampede", &stampede),
                    ("stampede, PING only", &ping),
                    (&redis.target, &redis),
                    (&redis_durable.target, &redis_durable),
                    (&postgres.target, &postgres),
                ],
                &ratios,
            );
            write_outputs(&args, &json!({ "runs": runs, "ratios": ratios }), Some(html))?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

fn main() -> ExitCode {
    // The drill's in-process server runs as stampede-server does (see
    // stampede::memory), and the loadgen's own stalls stay out of the
    // target's latency.
    stampede::memory::disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Node(args) = cli.command {
        // A node of a drill's cluster: its own runtime, as a server's.
        return match stampede_loadgen::cluster::run_node(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stampede-loadgen node: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stampede-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stampede-loadgen: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
