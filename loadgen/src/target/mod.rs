//! Where a drill sends its traffic: stampede, or the same job done by a
//! Redis Lua script or by PostgreSQL rows (the baselines). All three speak
//! the same outcome vocabulary (stampede's status codes), so one drill
//! loop, one tally and one set of invariants serve them all.

pub mod postgres;
pub mod redis;
pub mod stampede;

use stampede_protocol::message::QueueTicket;
use stampede_protocol::Status;

use crate::audit::TargetState;
use crate::scenario::{Plan, Scenario, Session};

/// One SKU's counters as the target reports them after a drill.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SkuState {
    pub sku: u64,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

/// One location's (warehouse's) counters of a sale with locations, as the
/// target reports them after a drill (stampede's LOCATION dump entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LocationState {
    pub sku: u64,
    pub location: u16,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

/// What a RESERVE was answered: the status, `detail` (the expiry for
/// `reserved`) and, for a reservation taken at a location (RESERVE_AT),
/// the location its units are held at (0 otherwise).
pub type ReserveResult = (Status, u64, u16);

pub enum Target {
    Stampede(stampede::StampedeTarget),
    Redis(redis::RedisTarget),
    Postgres(postgres::PgTarget),
}

impl Target {
    /// `stampede://host:port` (token from `STAMPEDE_TOKEN`, admin role),
    /// `redis://host:port`, `postgres://...`. `coalesce`: stampede's client
    /// packs concurrent calls into BATCH frames (the checkout-service shape).
    pub async fn connect(url: &str, connections: usize, coalesce: bool) -> anyhow::Result<Target> {
        if let Some(addr) = url.strip_prefix("stampede://") {
            let token = std::env::var("STAMPEDE_TOKEN")
                .map_err(|_| anyhow::anyhow!("set STAMPEDE_TOKEN to an admin token of {addr}"))?;
            return Ok(Target::Stampede(stampede::StampedeTarget::connect(addr, &token, connections, coalesce).await?));
        }
        if url.starts_with("redis://") {
            return Ok(Target::Redis(redis::RedisTarget::connect(url, connections).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target::Postgres(postgres::PgTarget::connect(url, connections).await?));
        }
        anyhow::bail!("unknown target {url:?}: use stampede://HOST:PORT, redis://HOST:PORT or postgres://...")
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::Stampede(_) => "stampede",
            Target::Redis(_) => "redis",
            Target::Postgres(_) => "postgres",
        }
    }

    /// Create the scenario's sales (fresh state). The baselines have one
    /// stock counter per SKU: a scenario whose sales have their stock in
    /// several locations (`regional`) is refused.
    pub async fn prepare(&self, plan: &Plan) -> anyhow::Result<()> {
        if !matches!(self, Target::Stampede(_)) {
            refuse_locations(plan.scenario, self.kind())?;
        }
        match self {
            Target::Stampede(t) => t.prepare(plan).await,
            Target::Redis(t) => t.prepare(plan).await,
            Target::Postgres(t) => t.prepare(plan).await,
        }
    }

    /// Reserve one unit for each session (one frame, pipeline or
    /// transaction each, as the target does it best). Per session:
    /// `(status, detail, location)`; `detail` is the expiry for `reserved`,
    /// `location` where the units are (sessions with `at`: RESERVE_AT).
    pub async fn reserve(&self, plan: &Plan, sessions: &[Session]) -> anyhow::Result<Vec<ReserveResult>> {
        let plain = |results: Vec<(Status, u64)>| results.into_iter().map(|(s, d)| (s, d, 0)).collect();
        match self {
            Target::Stampede(t) => t.reserve(sessions).await,
            Target::Redis(t) => Ok(plain(t.reserve(plan, sessions).await?)),
            Target::Postgres(t) => Ok(plain(t.reserve(plan, sessions).await?)),
        }
    }

    pub async fn confirm(&self, session: &Session) -> anyhow::Result<Status> {
        match self {
            Target::Stampede(t) => t.confirm(session).await,
            Target::Redis(t) => t.confirm(session).await,
            Target::Postgres(t) => t.confirm(session).await,
        }
    }

    pub async fn release(&self, session: &Session) -> anyhow::Result<Status> {
        match self {
            Target::Stampede(t) => t.release(session).await,
            Target::Redis(t) => t.release(session).await,
            Target::Postgres(t) => t.release(session).await,
        }
    }

    /// JOIN (`join` true) or POLL of a queued sale (stampede only).
    pub async fn ticket(&self, session: &Session, join: bool) -> anyhow::Result<QueueTicket> {
        match self {
            Target::Stampede(t) => t.ticket(session, join).await,
            _ => anyhow::bail!("the queue scenario needs a stampede target"),
        }
    }

    /// The protocol's and the network's floor: one round trip, no work.
    pub async fn ping(&self) -> anyhow::Result<()> {
        match self {
            Target::Stampede(t) => t.ping().await,
            Target::Redis(t) => t.ping().await,
            Target::Postgres(t) => t.ping().await,
        }
    }

    /// Whether `sku` runs on a shard of its own now (`None`: the target
    /// has no such notion).
    pub async fn dedicated(&self, sku: u64) -> Option<bool> {
        match self {
            Target::Stampede(t) => t.dedicated(sku).await.ok(),
            Target::Redis(_) | Target::Postgres(_) => None,
        }
    }

    /// Counters per SKU of the plan's sales, as the target has them now.
    pub async fn audit(&self, plan: &Plan) -> anyhow::Result<Vec<SkuState>> {
        match self {
            Target::Stampede(t) => t.audit(plan).await,
            Target::Redis(t) => t.audit(plan).await,
            Target::Postgres(t) => t.audit(plan).await,
        }
    }

    /// The counters and every reservation the target has for the plan's
    /// sales (the end-of-drill audit).
    pub async fn state(&self, plan: &Plan) -> anyhow::Result<TargetState> {
        match self {
            Target::Stampede(t) => t.state(plan).await,
            Target::Redis(t) => t.state(plan).await,
            Target::Postgres(t) => t.state(plan).await,
        }
    }
}

/// The scenarios only stampede can run: stock in several locations
/// (`regional`) has no counterpart in the Redis and PostgreSQL baselines
/// (one stock counter, or row, per SKU). `kind`: the target asked for.
pub fn refuse_locations(scenario: Scenario, kind: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        scenario != Scenario::Regional,
        "the regional scenario needs a stampede target, not {kind}: its sale's stock sits in several locations \
         (warehouses) chosen per reservation by RESERVE_AT, which the Redis and PostgreSQL baselines do not model \
         (one stock counter per SKU)"
    );
    Ok(())
}
