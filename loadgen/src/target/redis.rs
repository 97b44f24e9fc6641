//! The Redis baseline: the same semantics as stampede's RESERVE in one Lua
//! script (`reserve.lua`: per-user limit, stock decrement, reservation
//! with a TTL), called with EVALSHA; a batch is one pipeline. Several
//! multiplexed connections, each pipelining whatever its callers send, so
//! the client concurrency matches stampede's.
//!
//! Known weaknesses of this design, which the comparison is about: an
//! expired reservation's key disappears but its units never return to
//! stock, and with anything but `appendfsync always` an acknowledged
//! reservation can be lost in a crash.

use std::sync::atomic::{AtomicUsize, Ordering};

use redis::aio::MultiplexedConnection;
use redis::Script;
use stampede_protocol::Status;

use stampede_protocol::message::HoldState;

use super::SkuState;
use crate::audit::{TargetReservation, TargetState};
use crate::scenario::{Plan, Session};

/// Keys per SCAN step, UNLINK, and GET/PTTL pipeline of the audit.
const AUDIT_KEYS_PER_STEP: usize = 10_000;

pub struct RedisTarget {
    connections: Vec<MultiplexedConnection>,
    next: AtomicUsize,
    reserve: Script,
    settle: Script,
}

fn status_of(code: i64) -> Status {
    u16::try_from(code).ok().and_then(Status::from_code).unwrap_or(Status::InternalError)
}

impl RedisTarget {
    pub async fn connect(url: &str, connections: usize) -> anyhow::Result<RedisTarget> {
        let client = redis::Client::open(url)?;
        let mut conns = Vec::new();
        for _ in 0..connections.max(1) {
            conns.push(client.get_multiplexed_async_connection().await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach Redis at {url}: {e} (start one: redis-server --daemonize yes --bind 127.0.0.1 --port 6379)"
                )
            })?);
        }
        Ok(RedisTarget {
            connections: conns,
            next: AtomicUsize::new(0),
            reserve: Script::new(include_str!("reserve.lua")),
            settle: Script::new(include_str!("settle.lua")),
        })
    }

    fn conn(&self) -> MultiplexedConnection {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }

    pub async fn prepare(&self, plan: &Plan) -> anyhow::Result<()> {
        let mut con = self.conn();
        // Start clean, touching only the drill's own keys (prefix `lg:`).
        for keys in self.keys("lg:*").await?.chunks(AUDIT_KEYS_PER_STEP) {
            redis::cmd("UNLINK").arg(keys).query_async::<()>(&mut con).await?;
        }
        for s in &plan.sales {
            redis::cmd("SET").arg(format!("lg:stock:{}", s.sku)).arg(s.stock).query_async::<()>(&mut con).await?;
            redis::cmd("SET").arg(format!("lg:sold:{}", s.sku)).arg(0).query_async::<()>(&mut con).await?;
        }
        // Load both scripts so EVALSHA finds them.
        self.reserve.prepare_invoke().load_async(&mut con).await?;
        self.settle.prepare_invoke().load_async(&mut con).await?;
        Ok(())
    }

    pub async fn reserve(&self, plan: &Plan, sessions: &[Session]) -> anyhow::Result<Vec<(Status, u64)>> {
        let mut pipe = redis::pipe();
        for s in sessions {
            let ttl_ms = plan.sales.iter().find(|x| x.sku == s.sku).map_or(600_000, |x| x.ttl_ms);
            pipe.cmd("EVALSHA")
                .arg(self.reserve.get_hash())
                .arg(2)
                .arg(format!("lg:stock:{}", s.sku))
                .arg(format!("lg:users:{}", s.sku))
                .arg(s.user)
                .arg(1)
                .arg(plan.limit_of(s.sku))
                .arg(s.reservation_id.to_string())
                .arg(ttl_ms)
                .arg(s.sku);
        }
        let codes: Vec<i64> = pipe.query_async(&mut self.conn()).await?;
        Ok(codes.into_iter().map(|c| (status_of(c), 0)).collect())
    }

    async fn settle(&self, s: &Session, action: &str) -> anyhow::Result<Status> {
        let code: i64 = redis::cmd("EVALSHA")
            .arg(self.settle.get_hash())
            .arg(3)
            .arg(format!("lg:stock:{}", s.sku))
            .arg(format!("lg:users:{}", s.sku))
            .arg(format!("lg:sold:{}", s.sku))
            .arg(s.reservation_id.to_string())
            .arg(action)
            .query_async(&mut self.conn())
            .await?;
        Ok(status_of(code))
    }

    pub async fn confirm(&self, s: &Session) -> anyhow::Result<Status> {
        self.settle(s, "confirm").await
    }

    pub async fn release(&self, s: &Session) -> anyhow::Result<Status> {
        self.settle(s, "release").await
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        redis::cmd("PING").query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// Counters, plus every reservation key (held ones with their TTL;
    /// an expired hold is gone, as Redis forgets it).
    pub async fn state(&self, plan: &Plan) -> anyhow::Result<TargetState> {
        let mut con = self.conn();
        let mut state = TargetState { sales: self.audit(plan).await?, ..TargetState::default() };
        for keys in self.keys("lg:res:*").await?.chunks(AUDIT_KEYS_PER_STEP) {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
            }
            let values: Vec<(Option<String>, i64)> = pipe.query_async(&mut con).await?;
            // The TTLs were read just now (not when the scan began: at
            // millions of keys the audit itself takes seconds).
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            for (key, (value, pttl_ms)) in keys.iter().zip(values) {
                // Expired between SCAN and GET: gone, like any expired hold.
                let Some(value) = value else { continue };
                state.reservations.push(parse_reservation(key, &value, now_ms, pttl_ms)?);
            }
        }
        Ok(state)
    }

    /// Every key matching `pattern` (SCAN, so Redis is never blocked).
    async fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let mut con = self.conn();
        let mut all = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(AUDIT_KEYS_PER_STEP)
                .query_async(&mut con)
                .await?;
            all.extend(keys);
            if next == 0 {
                return Ok(all);
            }
            cursor = next;
        }
    }

    pub async fn audit(&self, plan: &Plan) -> anyhow::Result<Vec<SkuState>> {
        let mut con = self.conn();
        let mut out = Vec::new();
        for s in &plan.sales {
            let available: u64 = redis::cmd("GET").arg(format!("lg:stock:{}", s.sku)).query_async(&mut con).await?;
            let sold: u64 = redis::cmd("GET").arg(format!("lg:sold:{}", s.sku)).query_async(&mut con).await?;
            let reserved = s.stock.saturating_sub(available + sold);
            out.push(SkuState { sku: s.sku, total: s.stock, available, reserved, sold });
        }
        Ok(out)
    }
}

/// `lg:res:{id}` = `{h|c|r}:{sku}:{user}:{qty}` (see reserve.lua).
fn parse_reservation(key: &str, value: &str, now_ms: u64, pttl_ms: i64) -> anyhow::Result<TargetReservation> {
    let bad = || anyhow::anyhow!("unexpected reservation {key} = {value:?} in Redis");
    let id = key.strip_prefix("lg:res:").and_then(|id| id.parse().ok()).ok_or_else(bad)?;
    let mut fields = value.split(':');
    let state = match fields.next() {
        Some("h") => HoldState::Held,
        Some("c") => HoldState::Confirmed,
        Some("r") => HoldState::Released,
        _ => return Err(bad()),
    };
    let mut number = || fields.next().and_then(|n| n.parse::<u64>().ok()).ok_or_else(bad);
    let (sku, user, qty) = (number()?, number()?, number()?);
    Ok(TargetReservation {
        id,
        sku,
        user,
        qty: u32::try_from(qty)?,
        state,
        // A settled reservation has no TTL (-1): it never expires.
        expires_at_ms: if pttl_ms >= 0 { now_ms + pttl_ms as u64 } else { u64::MAX },
        location: 0,
    })
}
