//! The PostgreSQL baseline: the textbook design. RESERVE is one
//! transaction: a conditional `UPDATE ... SET available = available - qty
//! WHERE available >= qty` on the SKU's row (the hot row every buyer
//! locks), the per-user row upserted only while under the limit, and the
//! reservation row. Durable by default (`synchronous_commit = on`).
//! Concurrency is one transaction per pooled connection: PostgreSQL cannot
//! pipeline transactions on one connection.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use stampede_protocol::Status;
use uuid::Uuid;

use stampede_protocol::message::HoldState;

use super::SkuState;
use crate::audit::{TargetReservation, TargetState};
use crate::scenario::{Plan, Session};

pub struct PgTarget {
    pool: PgPool,
}

impl PgTarget {
    pub async fn connect(url: &str, connections: usize) -> anyhow::Result<PgTarget> {
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(1) as u32)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach PostgreSQL at {url}: {e}"))?;
        Ok(PgTarget { pool })
    }

    pub async fn prepare(&self, plan: &Plan) -> anyhow::Result<()> {
        for sql in [
            "DROP TABLE IF EXISTS lg_reservations, lg_user_units, lg_stock",
            "CREATE TABLE lg_stock (sku bigint PRIMARY KEY, total bigint NOT NULL, available bigint NOT NULL \
             CHECK (available >= 0), sold bigint NOT NULL, limit_per_user int NOT NULL, ttl_ms bigint NOT NULL)",
            "CREATE TABLE lg_user_units (sku bigint, user_id bigint, units int NOT NULL, PRIMARY KEY (sku, user_id))",
            "CREATE TABLE lg_reservations (id uuid PRIMARY KEY, sku bigint NOT NULL, user_id bigint NOT NULL, \
             qty int NOT NULL, state text NOT NULL, expires_at timestamptz NOT NULL)",
        ] {
            sqlx::query(sql).execute(&self.pool).await?;
        }
        for s in &plan.sales {
            sqlx::query("INSERT INTO lg_stock VALUES ($1, $2, $2, 0, $3, $4)")
                .bind(s.sku as i64)
                .bind(s.stock as i64)
                .bind(s.limit_per_user as i32)
                .bind(s.ttl_ms as i64)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    async fn reserve_one(&self, plan: &Plan, s: &Session) -> anyhow::Result<Status> {
        let id = Uuid::from_u128(s.reservation_id);
        let mut tx = self.pool.begin().await?;
        let existing =
            sqlx::query("SELECT 1 FROM lg_reservations WHERE id = $1").bind(id).fetch_optional(&mut *tx).await?;
        if existing.is_some() {
            return Ok(Status::Reserved); // a retry of a success
        }
        let updated = sqlx::query(
            "UPDATE lg_stock SET available = available - 1 WHERE sku = $1 AND available >= 1 RETURNING ttl_ms",
        )
        .bind(s.sku as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = updated else {
            return Ok(Status::SoldOut); // the transaction rolls back on drop
        };
        let ttl_ms: i64 = row.get(0);
        let within_limit = sqlx::query(
            "INSERT INTO lg_user_units VALUES ($1, $2, 1) ON CONFLICT (sku, user_id) \
             DO UPDATE SET units = lg_user_units.units + 1 WHERE lg_user_units.units + 1 <= $3 RETURNING units",
        )
        .bind(s.sku as i64)
        .bind(s.user as i64)
        .bind(plan.limit_of(s.sku) as i32)
        .fetch_optional(&mut *tx)
        .await?;
        if within_limit.is_none() {
            return Ok(Status::LimitExceeded);
        }
        sqlx::query(
            "INSERT INTO lg_reservations VALUES ($1, $2, $3, 1, 'held', now() + $4 * interval '1 millisecond')",
        )
        .bind(id)
        .bind(s.sku as i64)
        .bind(s.user as i64)
        .bind(ttl_ms as f64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Status::Reserved)
    }

    pub async fn reserve(&self, plan: &Plan, sessions: &[Session]) -> anyhow::Result<Vec<(Status, u64)>> {
        let mut out = Vec::with_capacity(sessions.len());
        for s in sessions {
            out.push((self.reserve_one(plan, s).await?, 0));
        }
        Ok(out)
    }

    async fn settle(&self, s: &Session, confirm: bool) -> anyhow::Result<Status> {
        let mut tx = self.pool.begin().await?;
        let state = if confirm { "confirmed" } else { "released" };
        let row = sqlx::query(
            "UPDATE lg_reservations SET state = $2 WHERE id = $1 AND state = 'held' AND expires_at > now() RETURNING qty",
        )
        .bind(Uuid::from_u128(s.reservation_id))
        .bind(state)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            // Not held any more (or never): answer as stampede would.
            let row = sqlx::query("SELECT state, expires_at <= now() FROM lg_reservations WHERE id = $1")
                .bind(Uuid::from_u128(s.reservation_id))
                .fetch_optional(&mut *tx)
                .await?;
            return Ok(match row.as_ref().map(|r| (r.get::<String, _>(0), r.get::<bool, _>(1))) {
                None => Status::UnknownReservation,
                Some((held, true)) if held == "held" => Status::Expired,
                Some((settled, _)) if settled == state => {
                    if confirm {
                        Status::Confirmed
                    } else {
                        Status::Released
                    }
                }
                Some((_, _)) if confirm => Status::AlreadyReleased,
                Some((_, _)) => Status::AlreadyConfirmed,
            });
        };
        let qty: i32 = row.get(0);
        if confirm {
            sqlx::query("UPDATE lg_stock SET sold = sold + $2 WHERE sku = $1")
                .bind(s.sku as i64)
                .bind(i64::from(qty))
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("UPDATE lg_stock SET available = available + $2 WHERE sku = $1")
                .bind(s.sku as i64)
                .bind(i64::from(qty))
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE lg_user_units SET units = units - $3 WHERE sku = $1 AND user_id = $2")
                .bind(s.sku as i64)
                .bind(s.user as i64)
                .bind(qty)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(if confirm { Status::Confirmed } else { Status::Released })
    }

    pub async fn confirm(&self, s: &Session) -> anyhow::Result<Status> {
        self.settle(s, true).await
    }

    pub async fn release(&self, s: &Session) -> anyhow::Result<Status> {
        self.settle(s, false).await
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Counters and every reservation row (an expired hold stays `held`
    /// with its expiry in the past: nothing sweeps it).
    pub async fn state(&self, plan: &Plan) -> anyhow::Result<TargetState> {
        let rows = sqlx::query(
            "SELECT id, sku, user_id, qty, state, (extract(epoch FROM expires_at) * 1000)::bigint FROM lg_reservations",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut reservations = Vec::with_capacity(rows.len());
        for r in &rows {
            let state = match r.get::<&str, _>(4) {
                "held" => HoldState::Held,
                "confirmed" => HoldState::Confirmed,
                "released" => HoldState::Released,
                other => anyhow::bail!("unexpected reservation state {other:?} in lg_reservations"),
            };
            reservations.push(TargetReservation {
                id: r.get::<Uuid, _>(0).as_u128(),
                sku: r.get::<i64, _>(1) as u64,
                user: r.get::<i64, _>(2) as u64,
                qty: r.get::<i32, _>(3) as u32,
                state,
                expires_at_ms: r.get::<i64, _>(5) as u64,
                location: 0,
            });
        }
        Ok(TargetState { sales: self.audit(plan).await?, locations: Vec::new(), reservations })
    }

    pub async fn audit(&self, _plan: &Plan) -> anyhow::Result<Vec<SkuState>> {
        let rows =
            sqlx::query("SELECT sku, total, available, sold FROM lg_stock ORDER BY sku").fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let (total, available, sold) =
                    (r.get::<i64, _>(1) as u64, r.get::<i64, _>(2) as u64, r.get::<i64, _>(3) as u64);
                SkuState { sku: r.get::<i64, _>(0) as u64, total, available, reserved: total - available - sold, sold }
            })
            .collect())
    }
}
