//! stampede through its own client library (pipelined, several
//! connections, RESERVE_BATCH for batches, concurrent callers' calls
//! coalesced into BATCH frames in the checkout-service shape).

use std::time::Duration;

use stampede_protocol::client::{Client, ClientConfig, ClientError};
use stampede_protocol::message::{DumpEntry, QueueTicket, Reserve, SaleCreate};
use stampede_protocol::replication::{ReplicationClient, StateDump};
use stampede_protocol::Status;

use super::{LocationState, ReserveResult, SkuState};
use crate::audit::{TargetReservation, TargetState};
use crate::scenario::{Plan, Session};

/// How long the audit waits for a state dump that covers every
/// acknowledged change (see `state`).
const DUMP_SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
const DUMP_RETRY_INTERVAL: Duration = Duration::from_millis(50);

pub struct StampedeTarget {
    client: Client,
    addr: String,
    token: String,
    /// Records the first reservation a new leader acknowledges after a kill.
    pub failover: std::sync::Arc<crate::cluster::FailoverWatch>,
}

impl StampedeTarget {
    pub async fn connect(
        addr: &str,
        token: &str,
        connections: usize,
        coalesce: bool,
    ) -> anyhow::Result<StampedeTarget> {
        let mut config = ClientConfig::new(addr, token);
        config.connections = connections.max(1);
        config.coalesce = coalesce;
        // A drill measures the server: report busy as an outcome instead of
        // hiding it in client retries.
        config.max_attempts = 1;
        Ok(StampedeTarget {
            client: Client::connect(config).await?,
            addr: addr.to_string(),
            token: token.to_string(),
            failover: Default::default(),
        })
    }

    /// Calls that found a new leader and were sent again there.
    pub fn failover_retries(&self) -> u64 {
        self.client.failover_retries()
    }

    pub async fn prepare(&self, plan: &Plan) -> anyhow::Result<()> {
        for s in &plan.sales {
            let sale = SaleCreate {
                sku: s.sku,
                stock: s.stock,
                limit_per_user: s.limit_per_user,
                ttl_ms: s.ttl_ms,
                hot: s.hot,
                queue: s.queue,
            };
            let outcome = match &s.locations {
                Some(locations) => self.client.create_sale_at(sale, locations.clone()).await?.status,
                None => self_create(&self.client, sale).await?,
            };
            anyhow::ensure!(outcome == Status::Ok, "creating sale {} on the server: {outcome}", s.sku);
        }
        Ok(())
    }

    pub async fn reserve(&self, sessions: &[Session]) -> anyhow::Result<Vec<ReserveResult>> {
        let results: Vec<ReserveResult> = if sessions.iter().any(|s| s.at.is_some()) {
            // RESERVE_AT has no batch form: a batch's reservations go as
            // concurrent calls (pipelined on the connections).
            let calls = sessions.iter().map(|s| async move {
                let o = match s.at {
                    Some(at) => self.client.reserve_at(s.sku, s.user, 1, s.reservation_id, at).await?,
                    None => self.client.reserve(s.sku, s.user, 1, s.reservation_id).await?,
                };
                Ok::<_, ClientError>((o.status, o.detail, o.location))
            });
            futures_util::future::join_all(calls).await.into_iter().collect::<Result<_, _>>()?
        } else if let [s] = sessions {
            let o = self.client.reserve(s.sku, s.user, 1, s.reservation_id).await?;
            vec![(o.status, o.detail, 0)]
        } else {
            let ops: Vec<Reserve> = sessions
                .iter()
                .map(|s| Reserve { sku: s.sku, user: s.user, qty: 1, reservation_id: s.reservation_id })
                .collect();
            self.client.reserve_batch(&ops).await?.into_iter().map(|o| (o.status, o.detail, 0)).collect()
        };
        if results.iter().any(|(status, ..)| *status == Status::Reserved) {
            self.failover.acknowledged_by(&self.client.current_node());
        }
        Ok(results)
    }

    pub async fn confirm(&self, s: &Session) -> anyhow::Result<Status> {
        Ok(self.client.confirm(s.reservation_id, b"pi_loadgen").await?.status)
    }

    pub async fn release(&self, s: &Session) -> anyhow::Result<Status> {
        Ok(self.client.release(s.reservation_id).await?.status)
    }

    pub async fn ticket(&self, s: &Session, join: bool) -> anyhow::Result<QueueTicket> {
        Ok(if join { self.client.join(s.sku, s.user).await? } else { self.client.poll(s.sku, s.user).await? })
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        self.client.ping().await?;
        Ok(())
    }

    /// Whether `sku` runs on a shard of its own now (STATUS's hot flag).
    pub async fn dedicated(&self, sku: u64) -> anyhow::Result<bool> {
        Ok(self.client.status(sku).await?.sale.hot)
    }

    pub async fn audit(&self, plan: &Plan) -> anyhow::Result<Vec<SkuState>> {
        let mut out = Vec::new();
        for s in &plan.sales {
            let status = self.client.status(s.sku).await?;
            let sale = status.sale;
            out.push(SkuState {
                sku: s.sku,
                total: sale.total,
                available: sale.available,
                reserved: sale.reserved,
                sold: sale.sold,
            });
        }
        Ok(out)
    }
}

impl StampedeTarget {
    /// Every reservation, from a STATE_DUMP (the admin token may take one).
    /// A dump shows the state at the log's synced position; in `async`
    /// durability the last acknowledged changes may not be synced yet, so
    /// the dump is taken again until its counters match the live ones
    /// (STATUS). Nothing else changes them once the drill's load is over
    /// but expiries, which the retry absorbs.
    ///
    /// Fails if no dump covered the live counters within
    /// `DUMP_SETTLE_TIMEOUT`: an audit of a stale dump would report the
    /// lag as lost acknowledgements.
    pub async fn state(&self, plan: &Plan) -> anyhow::Result<TargetState> {
        let deadline = tokio::time::Instant::now() + DUMP_SETTLE_TIMEOUT;
        loop {
            let live = self.audit(plan).await?;
            let state = state_of(plan, self.dump(deadline).await?);
            let covered = live.iter().all(|l| {
                state
                    .sales
                    .iter()
                    .any(|s| (s.sku, s.available, s.reserved, s.sold) == (l.sku, l.available, l.reserved, l.sold))
            });
            if covered {
                return Ok(state);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the server's state dumps did not catch up with its live counters within {DUMP_SETTLE_TIMEOUT:?}"
            );
            tokio::time::sleep(DUMP_RETRY_INTERVAL).await;
        }
    }

    /// One STATE_DUMP, waiting (until `deadline`) while another one runs.
    async fn dump(&self, deadline: tokio::time::Instant) -> anyhow::Result<StateDump> {
        loop {
            let mut log = ReplicationClient::connect_leader(&self.addr, &self.token).await?;
            match log.state_dump().await {
                Err(ClientError::Server { status: Status::Busy, .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(DUMP_RETRY_INTERVAL).await
                }
                other => return Ok(other?),
            }
        }
    }
}

/// The plan's sales and their reservations out of a dump.
fn state_of(plan: &Plan, dump: StateDump) -> TargetState {
    let ours = |sku: u64| plan.sales.iter().any(|s| s.sku == sku);
    let mut state = TargetState::default();
    for entry in dump.entries {
        match entry {
            DumpEntry::Sale(s) if ours(s.sku) => state.sales.push(SkuState {
                sku: s.sku,
                total: s.total,
                available: s.available,
                reserved: s.reserved,
                sold: s.sold,
            }),
            DumpEntry::Location(l) if ours(l.sku) => state.locations.push(LocationState {
                sku: l.sku,
                location: l.location,
                total: l.total,
                available: l.available,
                reserved: l.reserved,
                sold: l.sold,
            }),
            DumpEntry::Reservation(r) if ours(r.sku) => state.reservations.push(TargetReservation {
                id: r.reservation_id,
                sku: r.sku,
                user: r.user,
                qty: r.qty,
                state: r.state,
                expires_at_ms: r.expires_at_ms,
                location: r.location,
            }),
            _ => {}
        }
    }
    state
}

async fn self_create(client: &Client, sale: SaleCreate) -> anyhow::Result<Status> {
    Ok(client.create_sale(sale).await?.status)
}
