//! `stampede-reconciler`: settle the stampede log into PostgreSQL exactly
//! once (`run`), and check that the two agree (`report`).
//!
//! The replication token comes from `STAMPEDE_REPLICATION_TOKEN` (never a
//! flag: `ps` would show it); the database from `--database-url` or
//! `DATABASE_URL`.
//!
//! Exit codes: 0 success (for `report`: clean), 1 `report` found a
//! disagreement, 2 could not run (auth, schema, a log record that does not
//! fit the database; for `report` and `migrate` also an unreachable
//! database). `run` rides out an unreachable or restarting server or
//! database: it retries with backoff, logging each attempt.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use stampede_reconciler::db;
use stampede_reconciler::report::{self, ReportConfig};
use stampede_reconciler::settle::{self, RunConfig, RunState};

#[derive(Parser, Debug)]
#[command(
    name = "stampede-reconciler",
    version,
    about = "Settle the stampede log into PostgreSQL; reconciliation reports"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Follow the server's log and settle it into PostgreSQL (migrates the schema first).
    Run {
        /// The stampede server, or a cluster's nodes comma-separated: the
        /// leader is found (CLUSTER) and followed across failovers.
        #[arg(long, default_value = "127.0.0.1:7070")]
        server: String,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Exit once everything that was durable at start has settled (scripts, cron).
        #[arg(long)]
        until_caught_up: bool,
        /// Do not apply pending schema migrations; fail if the schema is not current.
        #[arg(long)]
        no_migrate: bool,
        /// Serve Prometheus metrics (/metrics: watermark, lag, which peer is
        /// reachable, reconnections) and /healthz, /readyz here (e.g. 127.0.0.1:9091).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Compare the engine with PostgreSQL at the same LSN; exit 1 on any disagreement.
    Report {
        /// The stampede server, or a cluster's nodes comma-separated (the leader is asked).
        #[arg(long, default_value = "127.0.0.1:7070")]
        server: String,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Create or upgrade the schema in PostgreSQL.
    Migrate {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

fn token() -> anyhow::Result<String> {
    match std::env::var("STAMPEDE_REPLICATION_TOKEN") {
        Ok(token) if !token.is_empty() => Ok(token),
        _ => bail!("set STAMPEDE_REPLICATION_TOKEN to the server's replication (or admin) token"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn main_async(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Run { server, database_url, until_caught_up, no_migrate, metrics_listen } => {
            let config = RunConfig { server, token: token()?, until_caught_up };
            let state = RunState::default();
            if let Some(addr) = &metrics_listen {
                let bound = stampede_protocol::metrics_http::start(addr, state.registry(), state.ready.clone())
                    .await
                    .with_context(|| format!("binding the metrics listener {addr}"))?;
                // Scripts and tests read this line to learn the port.
                println!("stampede-reconciler metrics on {bound}");
            }
            // Stopping between or inside transactions is always safe: an
            // uncommitted group is rolled back and settled again next run.
            let work = async {
                let pool = settle::prepare_database(&database_url, !no_migrate, &state).await?;
                settle::run(&pool, &config, &state).await
            };
            tokio::select! {
                summary = work => {
                    let summary = summary?;
                    tracing::info!(
                        settled_lsn = summary.settled_lsn, records_settled = summary.records_settled,
                        transactions = summary.transactions, "caught up"
                    );
                    println!("settled up to LSN {} ({} records in {} transactions)",
                        summary.settled_lsn, summary.records_settled, summary.transactions);
                }
                _ = shutdown_signal() => tracing::info!("stopping"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { server, database_url, json } => {
            let pool = db::connect(&database_url).await?;
            let config = ReportConfig { server, token: token()? };
            let report = report::report(&pool, &config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).context("encoding the report")?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Migrate { database_url } => {
            let pool = db::connect(&database_url).await?;
            db::migrate(&pool).await?;
            db::check_schema(&pool).await?;
            println!("schema is current");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stampede-reconciler: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(main_async(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stampede-reconciler: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
