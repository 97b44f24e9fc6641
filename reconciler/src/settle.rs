//! `stampede-reconciler run`: follow the server's log and settle it into
//! PostgreSQL exactly once.
//!
//! ```text
//! server --REPLICATE(from watermark+1)--> stream task --batches--> settle loop
//!                                                               |  one transaction per group:
//!                                                               |  lock watermark, skip what it covers,
//!                                                               |  load touched rows, apply, write rows +
//!                                                               |  ledger + new watermark, commit
//! server <--SETTLED(new watermark)---------------------------------+
//! ```
//!
//! Exactly once: the watermark row is locked and advanced in the same
//! transaction as the rows and ledger entries of the records it covers, and
//! records at or below it are skipped. A crash anywhere either commits the
//! whole group with its watermark or nothing; the next run streams from the
//! committed watermark. The ledger's primary key (the LSN) makes a repeated
//! record fail loudly rather than count twice.
//!
//! Errors: a lost server connection or database connection (a restart, a
//! failover, a network blip; `db::is_transient` decides) is retried with
//! backoff, resuming from the watermark, each attempt logged and counted
//! in [`RunState`]; a record that does not fit the settled state, or a
//! refused stream (`lsn_unavailable`), stops the reconciler with an error:
//! that needs a person, not a retry.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::postgres::PgPool;
use stampede_protocol::client::ClientError;
use stampede_protocol::event::Event;
use stampede_protocol::message::LogBatch;
use stampede_protocol::replication::ReplicationClient;
use stampede_protocol::Status;
use tokio::sync::mpsc;

use crate::db;
use crate::model::{settled_reservation, ApplyError, Model};

/// Records settled in one transaction at most. Large enough that the
/// per-transaction cost (commit fsync, round trips) is small per record;
/// small enough that one transaction stays well under a second.
pub const SETTLE_BATCH_RECORDS_MAX: usize = 20_000;

/// LOG_BATCH frames buffered between the stream and the settle loop
/// (~64 KiB each): lets the network run ahead while a transaction commits.
const STREAM_FRAMES_BUFFERED: usize = 256;

/// No frame at all for this long (heartbeats included) means the
/// connection is dead: reconnect.
const STREAM_SILENCE_MAX: Duration = Duration::from_millis(5 * stampede_protocol::limits::REPLICATION_HEARTBEAT_MS);

/// Longest wait between reconnection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How often `run` logs its progress.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub server: String,
    pub token: String,
    /// Exit once everything durable when the reconciler started is settled.
    pub until_caught_up: bool,
}

/// What a `run` did (returned when it stops).
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub settled_lsn: u64,
    pub records_settled: u64,
    pub transactions: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(
        "the log continues at LSN {first} but the database has settled only up to {watermark}: records are missing"
    )]
    Gap { watermark: u64, first: u64 },
    #[error(transparent)]
    Write(#[from] db::WriteError),
}

impl SettleError {
    /// Worth retrying: the database connection failed, not the data.
    fn is_transient(&self) -> bool {
        match self {
            SettleError::Write(db::WriteError::Db(e)) => db::is_transient(e),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for SettleError {
    fn from(e: sqlx::Error) -> Self {
        SettleError::Write(db::WriteError::Db(e))
    }
}

/// Settle `records` (consecutive LSNs) in one transaction. Records the
/// database already holds are skipped. Returns the watermark after commit.
pub async fn settle_batch(pool: &PgPool, records: &[(u64, Event)]) -> Result<u64, SettleError> {
    let mut tx = pool.begin().await?;
    let (watermark, _) = db::watermark(&mut tx, true).await?;
    let fresh = records.partition_point(|(lsn, _)| *lsn <= watermark);
    let records = &records[fresh..];
    let Some((first, _)) = records.first() else {
        tx.commit().await?;
        return Ok(watermark);
    };
    if *first != watermark + 1 {
        return Err(SettleError::Gap { watermark, first: *first });
    }
    let mut skus: Vec<u64> = records.iter().filter_map(|(_, e)| e.sku()).collect();
    skus.sort_unstable();
    skus.dedup();
    let created: HashSet<u128> = records
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Reserved { reservation_id, .. } => Some(*reservation_id),
            _ => None,
        })
        .collect();
    let mut settled: Vec<u128> =
        records.iter().filter_map(|(_, e)| settled_reservation(e)).filter(|id| !created.contains(id)).collect();
    settled.sort_unstable();
    settled.dedup();
    let mut model = Model::default();
    db::load_touched(&mut tx, &skus, &settled, &mut model).await?;
    for (lsn, event) in records {
        model.apply(*lsn, event)?;
    }
    db::write_batch(&mut tx, &model, records).await?;
    tx.commit().await?;
    Ok(records.last().expect("non-empty").0)
}

/// Why one connection's worth of following ended.
enum Ended {
    CaughtUp,
    /// Retry from the watermark after a pause: what failed, and how.
    Retry(Peer, String),
}

/// Retries start this soon and double up to `RECONNECT_BACKOFF_MAX`.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Connect to PostgreSQL and bring the schema up (`migrate`) or check it,
/// retrying while the database is unavailable (down, restarting, failing
/// over), with backoff and a log line per attempt. Errors that a retry
/// cannot fix (credentials, a missing database, a schema from another
/// version) are returned at once.
pub async fn prepare_database(url: &str, migrate: bool, state: &RunState) -> anyhow::Result<PgPool> {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    for attempt in 1u64.. {
        let ready = async {
            let pool = db::connect(url).await?;
            if migrate {
                db::migrate(&pool).await?;
            }
            db::check_schema(&pool).await?;
            anyhow::Ok(pool)
        };
        match ready.await {
            Ok(pool) => {
                state.database_up(true);
                return Ok(pool);
            }
            Err(e) if db::is_transient_anyhow(&e) => {
                state.reconnecting(Peer::Database);
                tracing::warn!(
                    attempt, error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64,
                    "PostgreSQL unavailable; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

/// Follow the log and settle it until stopped (or caught up, if asked).
/// A lost server or database connection is retried from the watermark,
/// with backoff, logging every attempt; `state` shows which is down.
pub async fn run(pool: &PgPool, config: &RunConfig, state: &RunState) -> anyhow::Result<RunSummary> {
    let mut summary = RunSummary::default();
    let mut target: Option<u64> = None;
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut attempt = 0u64;
    loop {
        let settled_before = summary.transactions;
        match follow(pool, config, &mut target, &mut summary, state).await? {
            Ended::CaughtUp => return Ok(summary),
            Ended::Retry(peer, why) => {
                if summary.transactions > settled_before {
                    // It worked for a while: this is a new outage.
                    backoff = RECONNECT_BACKOFF_MIN;
                    attempt = 0;
                }
                attempt += 1;
                state.reconnecting(peer);
                tracing::warn!(
                    peer = peer.name(), attempt, reason = %why, settled_lsn = summary.settled_lsn,
                    retry_in_ms = backoff.as_millis() as u64, "reconnecting; will resume from the watermark"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }
}

/// What a connection was lost to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Server,
    Database,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Server => "server",
            Peer::Database => "database",
        }
    }
}

/// What `run` is doing, as metrics (`--metrics-listen`): which peer is
/// reachable, how far it has settled, how often it reconnected. Cheap
/// atomics, updated once per transaction or reconnection.
#[derive(Clone, Debug, Default)]
pub struct RunState {
    pub settled_lsn: Gauge,
    pub durable_lsn: Gauge,
    pub server_up: Gauge,
    pub database_up: Gauge,
    pub reconnects: Family<PeerLabel, Counter>,
    pub records_settled: Counter,
    pub transactions: Counter,
    /// /readyz: following the log with both peers reachable.
    pub ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PeerLabel {
    peer: &'static str,
}

impl RunState {
    /// A registry exposing this state under `stampede_reconciler_*`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("stampede_reconciler");
        registry.register("settled_lsn", "Last LSN settled into PostgreSQL (the watermark)", self.settled_lsn.clone());
        registry.register("durable_lsn", "Last durable LSN the server reported", self.durable_lsn.clone());
        registry.register("server_up", "1 while the log stream is connected", self.server_up.clone());
        registry.register("database_up", "1 while PostgreSQL answers", self.database_up.clone());
        registry.register("reconnects", "Connections lost and retried, by peer", self.reconnects.clone());
        registry.register("records_settled", "Log records settled by this process", self.records_settled.clone());
        registry.register("transactions", "Settle transactions committed", self.transactions.clone());
        registry
    }

    fn reconnecting(&self, peer: Peer) {
        self.ready.store(false, std::sync::atomic::Ordering::Release);
        self.reconnects.get_or_create(&PeerLabel { peer: peer.name() }).inc();
        match peer {
            Peer::Server => self.server_up.set(0),
            Peer::Database => self.database_up.set(0),
        };
    }

    fn database_up(&self, up: bool) {
        self.database_up.set(i64::from(up));
    }

    fn following(&self, durable_lsn: u64) {
        self.server_up.set(1);
        self.durable_lsn.set(durable_lsn as i64);
        let up = self.database_up.get() == 1;
        self.ready.store(up, std::sync::atomic::Ordering::Release);
    }

    fn settled(&self, settled_lsn: u64, records: u64) {
        self.database_up.set(1);
        self.settled_lsn.set(settled_lsn as i64);
        self.records_settled.inc_by(records);
        self.transactions.inc();
    }
}

fn stream_error(e: ClientError) -> anyhow::Result<Ended> {
    match e {
        ClientError::Server { status: Status::LsnUnavailable, message } => bail!(
            "the server no longer holds the log after this database's watermark ({message}); \
             were segments deleted with --wal-retention snapshot? the database cannot be caught up from this log"
        ),
        ClientError::Server { status: status @ (Status::NoLog | Status::Forbidden), message } => {
            bail!("the server refused replication: {status}: {message}")
        }
        ClientError::Auth(status) => bail!("the server refused the replication token: {status}"),
        other => Ok(Ended::Retry(Peer::Server, other.to_string())),
    }
}

async fn follow(
    pool: &PgPool,
    config: &RunConfig,
    target: &mut Option<u64>,
    summary: &mut RunSummary,
    state: &RunState,
) -> anyhow::Result<Ended> {
    let read = async {
        let mut conn = pool.acquire().await?;
        db::watermark(&mut conn, false).await
    };
    let (watermark, _) = match read.await {
        Ok(watermark) => watermark,
        Err(e) if db::is_transient(&e) => return Ok(Ended::Retry(Peer::Database, e.to_string())),
        Err(e) => return Err(e).context("reading the settled watermark"),
    };
    state.database_up(true);
    state.settled_lsn.set(watermark as i64);
    summary.settled_lsn = watermark;
    if target.is_some_and(|t| watermark >= t) {
        return Ok(Ended::CaughtUp);
    }
    let client = match ReplicationClient::connect_leader(&config.server, &config.token).await {
        Ok(client) => client,
        Err(e) => return stream_error(e),
    };
    let (mut stream, settler) = match client.replicate(watermark + 1).await {
        Ok(pair) => pair,
        Err(e) => return stream_error(e),
    };
    tracing::info!(server = %config.server, from_lsn = watermark + 1, "following the log");
    let (tx, mut rx) = mpsc::channel::<Result<LogBatch, ClientError>>(STREAM_FRAMES_BUFFERED);
    let reader = tokio::spawn(async move {
        loop {
            // The server sends a heartbeat every REPLICATION_HEARTBEAT_MS:
            // silence far beyond that is a dead (half-open) connection.
            let next = match tokio::time::timeout(STREAM_SILENCE_MAX, stream.next_batch()).await {
                Ok(next) => next,
                Err(_) => Err(ClientError::Timeout(STREAM_SILENCE_MAX)),
            };
            let failed = next.is_err();
            if tx.send(next).await.is_err() || failed {
                return;
            }
        }
    });
    // Aborts the stream task however this function returns.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _reader = AbortOnDrop(reader);

    let mut records: Vec<(u64, Event)> = Vec::with_capacity(SETTLE_BATCH_RECORDS_MAX + 1024);
    let mut durable_lsn = watermark;
    let mut last_progress = Instant::now();
    loop {
        // Wait for one frame, then take whatever else is already here.
        let first = match rx.recv().await {
            Some(Ok(batch)) => batch,
            Some(Err(e)) => return stream_error(e),
            None => return Ok(Ended::Retry(Peer::Server, "log stream ended".into())),
        };
        durable_lsn = durable_lsn.max(first.durable_lsn);
        state.following(durable_lsn);
        records.extend(first.records);
        while records.len() < SETTLE_BATCH_RECORDS_MAX {
            match rx.try_recv() {
                Ok(Ok(batch)) => {
                    durable_lsn = durable_lsn.max(batch.durable_lsn);
                    records.extend(batch.records);
                }
                Ok(Err(e)) => return stream_error(e),
                Err(_) => break,
            }
        }
        if config.until_caught_up && target.is_none() {
            // What was durable when we started is what we must settle.
            *target = Some(durable_lsn);
            tracing::info!(target_lsn = durable_lsn, "settling until caught up");
        }
        if !records.is_empty() {
            match settle_batch(pool, &records).await {
                Ok(settled) => {
                    let fresh = records.iter().filter(|(lsn, _)| *lsn > summary.settled_lsn).count() as u64;
                    summary.records_settled += fresh;
                    summary.settled_lsn = settled;
                    summary.transactions += 1;
                    state.settled(settled, fresh);
                    if let Err(e) = settler.settled(settled).await {
                        return Ok(Ended::Retry(Peer::Server, format!("reporting the settled LSN: {e}")));
                    }
                }
                Err(e) if e.is_transient() => return Ok(Ended::Retry(Peer::Database, e.to_string())),
                Err(e) => return Err(e).context("settling the log into PostgreSQL"),
            }
            records.clear();
        }
        if last_progress.elapsed() >= PROGRESS_LOG_INTERVAL {
            last_progress = Instant::now();
            tracing::info!(
                settled_lsn = summary.settled_lsn,
                durable_lsn,
                lag_records = durable_lsn.saturating_sub(summary.settled_lsn),
                records_settled = summary.records_settled,
                "progress"
            );
        }
        if target.is_some_and(|t| summary.settled_lsn >= t) {
            return Ok(Ended::CaughtUp);
        }
    }
}
