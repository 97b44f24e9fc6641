//! Settlement benchmarks (custom harness; `cargo bench -p stampede-reconciler
//! --bench settle`), against a real durable server on 127.0.0.1 and the
//! local PostgreSQL:
//!
//! 1. **throughput**: a log of N events (reserve, confirm, release in a
//!    checkout mix) is written first, then `run --until-caught-up` settles
//!    all of it: events/s into PostgreSQL.
//! 2. **lag under load**: the reconciler follows live while a drill writes
//!    events at a fixed rate (open loop, one batch every 10 ms); the lag
//!    (durable LSN minus settled LSN, and the age of the oldest unsettled
//!    event) is sampled every 100 ms: p50, p99 and max.
//!
//! Under `cargo test --benches` (no `--bench` flag) it runs tiny sizes once
//! so it cannot rot. Needs PostgreSQL on 127.0.0.1:5432 (bash .ci/run starts it).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgPoolOptions;
use stampede::node::{Node, NodeConfig};
use stampede::recovery::Retention;
use stampede::server::Tokens;
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::{Reserve, SaleCreate};
use stampede_protocol::Status;
use stampede_reconciler::settle::{self, RunConfig};

const TOKEN: &str = "bench-token";

struct Sizes {
    throughput_events: u64,
    drill_rate_per_s: u64,
    drill_secs: u64,
}

async fn fresh_db(name: &str) -> (String, sqlx::PgPool) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (start it: bash .ci/run does)");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let pool = stampede_reconciler::db::connect(&url).await.unwrap();
    stampede_reconciler::db::migrate(&pool).await.unwrap();
    (url, pool)
}

async fn start_node(tag: &str) -> (Node, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("stampede-bench-settle-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tokens = Tokens { admin: Some(TOKEN.into()), checkout: None, replication: None, insecure: false };
    let mut config = NodeConfig::new(&dir, "127.0.0.1:0", tokens);
    config.pool_shards = 1;
    config.pin_hot_shards = false;
    config.retention = Retention::Consumer;
    (Node::start(config).await.unwrap(), dir)
}

/// Checkout traffic: reserve batches, then confirm 60% and release 10% of
/// what was reserved (one log record each).
struct Drill {
    client: Client,
    rng: SmallRng,
    next_id: u128,
}

impl Drill {
    async fn new(addr: &str) -> Drill {
        let mut config = ClientConfig::new(addr, TOKEN);
        config.connections = 4;
        let client = Client::connect(config).await.unwrap();
        for sku in 1..=2 {
            let sale =
                SaleCreate { sku, stock: 1 << 40, limit_per_user: 1_000, ttl_ms: 600_000, hot: sku == 1, queue: None };
            assert_eq!(client.create_sale(sale).await.unwrap().status, Status::Ok);
        }
        Drill { client, rng: SmallRng::seed_from_u64(7), next_id: 1 }
    }

    /// One step: `reserves` reserves, then confirm ~60% and release ~10%
    /// of them: ~1.7 events per reserve.
    async fn step(&mut self, reserves: usize) -> u64 {
        let ops: Vec<Reserve> = (0..reserves)
            .map(|_| {
                self.next_id += 1;
                Reserve {
                    sku: self.rng.gen_range(1..=2),
                    user: self.rng.gen_range(0..1_000_000),
                    qty: 1,
                    reservation_id: self.next_id,
                }
            })
            .collect();
        let outcomes = self.client.reserve_batch(&ops).await.unwrap();
        let mut settles = Vec::new();
        for (op, outcome) in ops.iter().zip(outcomes) {
            assert_eq!(outcome.status, Status::Reserved);
            let roll = self.rng.gen_range(0..10);
            if roll < 6 {
                settles.push((op.reservation_id, true));
            } else if roll < 7 {
                settles.push((op.reservation_id, false));
            }
        }
        let calls = settles.iter().map(|&(id, confirm)| {
            let client = &self.client;
            async move {
                let status = if confirm {
                    client.confirm(id, b"pi_bench_0001").await.unwrap().status
                } else {
                    client.release(id).await.unwrap().status
                };
                assert!(matches!(status, Status::Confirmed | Status::Released), "{status}");
            }
        });
        futures_util::future::join_all(calls).await;
        (reserves + settles.len()) as u64
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn throughput(sizes: &Sizes) {
    let (node, dir) = start_node("throughput").await;
    let addr = node.addr().to_string();
    let mut drill = Drill::new(&addr).await;
    let mut written = 0;
    let started = Instant::now();
    while written < sizes.throughput_events {
        written += drill.step(1000).await;
    }
    let lsn = node.wal_stats.synced_lsn.load(Ordering::Acquire);
    println!("settle/throughput: wrote {lsn} log records in {:.1} s", started.elapsed().as_secs_f64());
    let (_url, pool) = fresh_db("stampede_bench_settle").await;
    let config = RunConfig { server: addr.clone(), token: TOKEN.into(), until_caught_up: true };
    let started = Instant::now();
    let summary = settle::run(&pool, &config, &Default::default()).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(summary.settled_lsn, lsn);
    println!(
        "settle/throughput: settled {} records in {:.2} s = {:.0} events/s ({} transactions)",
        summary.records_settled,
        secs,
        summary.records_settled as f64 / secs,
        summary.transactions
    );
    drop(drill);
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    pool.close().await;
}

async fn lag_under_drill(sizes: &Sizes) {
    let (node, dir) = start_node("lag").await;
    let addr = node.addr().to_string();
    let (_url, pool) = fresh_db("stampede_bench_settle_lag").await;
    let config = RunConfig { server: addr.clone(), token: TOKEN.into(), until_caught_up: false };
    let follower = {
        let pool = pool.clone();
        tokio::spawn(async move { settle::run(&pool, &config, &Default::default()).await })
    };
    let stats = node.wal_stats.clone();
    let sampler = {
        let (pool, stats) = (pool.clone(), stats.clone());
        tokio::spawn(async move {
            let mut lags_records = Vec::new();
            let mut lags_secs = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let durable = stats.synced_lsn.load(Ordering::Acquire);
                let row: (i64, Option<f64>) = sqlx::query_as(
                    "SELECT settled_lsn, extract(epoch FROM now() - settled_event_at)::float8 FROM stampede.watermark",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                let behind = durable.saturating_sub(row.0 as u64);
                lags_records.push(behind as f64);
                // Age of the newest settled event while behind: an upper
                // bound on how long the oldest unsettled one has waited.
                lags_secs.push(if behind == 0 { 0.0 } else { row.1.unwrap_or(0.0) });
                // Sample until the drill is over and everything is settled
                // (bounded: at most 10 minutes of samples).
                if (DONE.load(Ordering::Acquire) && behind == 0) || lags_records.len() > 6_000 {
                    break;
                }
            }
            (lags_records, lags_secs)
        })
    };
    let mut drill = Drill::new(&addr).await;
    let ticks = sizes.drill_secs * 100;
    let events_per_tick = sizes.drill_rate_per_s / 100;
    // ~1.7 events per reserve (see `Drill::step`).
    let reserves_per_tick = (events_per_tick * 10 / 17).max(1) as usize;
    let started = Instant::now();
    let mut written = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..ticks {
        tick.tick().await;
        written += drill.step(reserves_per_tick).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    DONE.store(true, Ordering::Release);
    let (mut records, mut secs) = sampler.await.unwrap();
    follower.abort();
    records.sort_by(f64::total_cmp);
    secs.sort_by(f64::total_cmp);
    println!(
        "settle/lag: drill wrote {written} events in {elapsed:.1} s ({:.0}/s offered {}/s); lag records p50 {:.0} p99 {:.0} max {:.0}; \
         lag seconds p50 {:.2} p99 {:.2} max {:.2}",
        written as f64 / elapsed,
        sizes.drill_rate_per_s,
        percentile(&records, 0.5),
        percentile(&records, 0.99),
        records.last().unwrap(),
        percentile(&secs, 0.5),
        percentile(&secs, 0.99),
        secs.last().unwrap(),
    );
    drop(drill);
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    pool.close().await;
}

/// Set when the drill has stopped writing.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes { throughput_events: 1_000_000, drill_rate_per_s: 100_000, drill_secs: 20 }
    } else {
        Sizes { throughput_events: 5_000, drill_rate_per_s: 10_000, drill_secs: 1 }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        throughput(&sizes).await;
        lag_under_drill(&sizes).await;
    });
}
