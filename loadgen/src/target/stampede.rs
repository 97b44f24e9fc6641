//! stampede through its own client library (pipelined, several
//! connections, RESERVE_BATCH for batches).

use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::{QueueTicket, Reserve, SaleCreate};
use stampede_protocol::Status;

use super::SkuState;
use crate::scenario::{Plan, Session};

pub struct StampedeTarget {
    client: Client,
}

impl StampedeTarget {
    pub async fn connect(addr: &str, token: &str, connections: usize) -> anyhow::Result<StampedeTarget> {
        let mut config = ClientConfig::new(addr, token);
        config.connections = connections.max(1);
        // A drill measures the server: report busy as an outcome instead of
        // hiding it in client retries.
        config.max_attempts = 1;
        Ok(StampedeTarget { client: Client::connect(config).await? })
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
            let outcome = self_create(&self.client, sale).await?;
            anyhow::ensure!(outcome == Status::Ok, "creating sale {} on the server: {outcome}", s.sku);
        }
        Ok(())
    }

    pub async fn reserve(&self, sessions: &[Session]) -> anyhow::Result<Vec<(Status, u64)>> {
        if let [s] = sessions {
            let o = self.client.reserve(s.sku, s.user, 1, s.reservation_id).await?;
            return Ok(vec![(o.status, o.detail)]);
        }
        let ops: Vec<Reserve> = sessions
            .iter()
            .map(|s| Reserve { sku: s.sku, user: s.user, qty: 1, reservation_id: s.reservation_id })
            .collect();
        Ok(self.client.reserve_batch(&ops).await?.into_iter().map(|o| (o.status, o.detail)).collect())
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

async fn self_create(client: &Client, sale: SaleCreate) -> anyhow::Result<Status> {
    Ok(client.create_sale(sale).await?.status)
}
