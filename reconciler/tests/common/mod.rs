//! Shared by the reconciler tests: a real PostgreSQL database per test, a
//! real durable stampede server (in-process `Node`, on 127.0.0.1), the
//! reconciler binary, and a load generator that exercises every event kind.
#![allow(dead_code)]

pub mod pg;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use stampede::node::{Node, NodeConfig};
use stampede::recovery::Retention;
use stampede::server::Tokens;
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::{Reserve, SaleCreate};
use stampede_protocol::Status;

pub const ADMIN: &str = "rt-admin-token";
pub const CHECKOUT: &str = "rt-checkout-token";
pub const REPLICATION: &str = "rt-replication-token";

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The seed for this test: `STAMPEDE_SEED` or the clock; printed so a
/// failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("STAMPEDE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: STAMPEDE_SEED={seed}");
    seed
}

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new(tag: &str) -> TestDb {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("stampede_rt_{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(PG_ADMIN_URL)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {PG_ADMIN_URL} ({e}). These tests need it: start it with \
                     `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` (bash .ci/run does)"
                )
            });
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
        admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
        TestDb { name, url, pool }
    }

    /// Close connections and drop the database.
    pub async fn drop_db(self) {
        self.pool.close().await;
        let admin = PgPoolOptions::new().max_connections(1).connect(PG_ADMIN_URL).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&admin).await.unwrap();
        admin.close().await;
    }

    /// Whether the reconciler has created its schema yet (a reconciler
    /// killed within its first moments may not have).
    pub async fn migrated(&self) -> bool {
        let row =
            sqlx::query("SELECT to_regclass('stampede.watermark') IS NOT NULL").fetch_one(&self.pool).await.unwrap();
        row.get::<bool, _>(0)
    }

    pub async fn watermark(&self) -> u64 {
        let row = sqlx::query("SELECT settled_lsn FROM stampede.watermark").fetch_one(&self.pool).await.unwrap();
        row.get::<i64, _>(0) as u64
    }

    /// The watermark, or 0 before the reconciler has made its schema.
    pub async fn watermark_if_migrated(&self) -> u64 {
        if self.migrated().await {
            self.watermark().await
        } else {
            0
        }
    }

    /// `(lsn, term)` of every TERM_STARTED in the ledger, in LSN order.
    pub async fn term_records(&self) -> Vec<(u64, u64)> {
        sqlx::query("SELECT lsn, qty FROM stampede.ledger WHERE kind = 'term_started' ORDER BY lsn")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) as u64))
            .collect()
    }

    /// `(sku, total, available, reserved, sold)` for every sale.
    pub async fn counters(&self) -> Vec<(u64, u64, u64, u64, u64)> {
        sqlx::query("SELECT sku, total, available, reserved, sold FROM stampede.sales ORDER BY sku")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let g = |i: usize| r.get::<i64, _>(i) as u64;
                (g(0), g(1), g(2), g(3), g(4))
            })
            .collect()
    }

    /// `(rows, distinct lsns, max lsn)` of the ledger.
    pub async fn ledger(&self) -> (u64, u64, u64) {
        let r = sqlx::query("SELECT count(*), count(DISTINCT lsn), coalesce(max(lsn), 0) FROM stampede.ledger")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        (r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) as u64, r.get::<i64, _>(2) as u64)
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "stampede-rt-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn node_config(dir: &Path, listen: &str) -> NodeConfig {
    let tokens = Tokens {
        admin: Some(ADMIN.into()),
        checkout: Some(CHECKOUT.into()),
        replication: Some(REPLICATION.into()),
        insecure: false,
    };
    let mut config = NodeConfig::new(dir, listen, tokens);
    config.pool_shards = 2;
    config.pin_hot_shards = false;
    config.retention = Retention::Consumer;
    config
}

/// A durable server on `listen` (use port 0 for a fresh one).
pub async fn start_node(dir: &Path, listen: &str) -> Node {
    Node::start(node_config(dir, listen)).await.expect("start node")
}

/// Stop a node gracefully, off the async workers.
pub async fn stop_node(node: Node) {
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().expect("clean shutdown");
}

pub async fn admin_client(addr: &str) -> Client {
    let mut config = ClientConfig::new(addr, ADMIN);
    config.connections = 2;
    Client::connect(config).await.expect("admin connects")
}

/// The reconciler binary with the test's token and database.
pub fn reconciler(db_url: &str) -> Command {
    reconciler_as(db_url, REPLICATION)
}

/// The reconciler binary with `token` (a server started by another harness).
pub fn reconciler_as(db_url: &str, token: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stampede-reconciler"));
    cmd.env("STAMPEDE_REPLICATION_TOKEN", token).env("DATABASE_URL", db_url).env("RUST_LOG", "warn");
    cmd
}

/// A running reconciler that is killed (SIGKILL) when dropped, so a failed
/// assertion never leaves one behind.
pub struct Running(pub std::process::Child);

impl Running {
    pub fn spawn(db_url: &str, server: &str) -> Running {
        Running(reconciler(db_url).args(["run", "--server", server]).spawn().expect("spawn the reconciler"))
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn is_running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn run_until_caught_up(db_url: &str, server: &str) -> Output {
    let out = reconciler(db_url).args(["run", "--until-caught-up", "--server", server]).output().unwrap();
    assert!(out.status.success(), "run --until-caught-up failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn report_json(db_url: &str, server: &str) -> (i32, serde_json::Value, String) {
    report_json_as(db_url, server, REPLICATION)
}

pub fn report_json_as(db_url: &str, server: &str, token: &str) -> (i32, serde_json::Value, String) {
    let out = reconciler_as(db_url, token).args(["report", "--json", "--server", server]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("report --json printed no JSON ({e}): {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), json, String::from_utf8_lossy(&out.stderr).to_string())
}

/// Sales used by [`Load`]: sku 1 is hot, sku 5 has a 300 ms TTL so holds
/// expire during a test.
pub async fn create_sales(client: &Client) {
    for (sku, stock, limit, ttl_ms, hot) in [
        (1, 5_000, 3, 60_000, true),
        (2, 2_000, 2, 60_000, false),
        (3, 50, 1, 60_000, false),
        (4, 100_000, 5, 60_000, false),
        (5, 3_000, 2, 300, false),
    ] {
        let outcome = client
            .create_sale(SaleCreate { sku, stock, limit_per_user: limit, ttl_ms, hot, queue: None })
            .await
            .unwrap();
        assert_eq!(outcome.status, Status::Ok, "create sku {sku}");
    }
    // sku 6 is gated by a virtual queue: its joins and admissions are log
    // records the reconciler must carry into the ledger too.
    let queue = stampede_protocol::message::QueueConfig {
        admit_rate_per_s: 2_000,
        admit_cap: 50,
        admission_ms: 200,
        start_at_ms: 0,
    };
    let sale = SaleCreate { sku: 6, stock: 1_000, limit_per_user: 1, ttl_ms: 60_000, hot: false, queue: Some(queue) };
    assert_eq!(client.create_sale(sale).await.unwrap().status, Status::Ok);
}

/// Random checkout traffic: reserve batches, confirms, releases, restocks,
/// pause/resume; every event kind of the log.
pub struct Load {
    rng: SmallRng,
    held: Vec<u128>,
    next_id: u128,
    pub acknowledged: u64,
}

impl Load {
    pub fn new(seed: u64) -> Load {
        Load { rng: SmallRng::seed_from_u64(seed), held: Vec::new(), next_id: (seed as u128) << 64, acknowledged: 0 }
    }

    /// One round: a reserve batch, then confirm/release some holds.
    pub async fn round(&mut self, client: &Client) {
        let ops: Vec<Reserve> = (0..200)
            .map(|_| {
                self.next_id += 1;
                Reserve {
                    sku: self.rng.gen_range(1..=5),
                    user: self.rng.gen_range(0..2_000),
                    qty: self.rng.gen_range(1..=2),
                    reservation_id: self.next_id,
                }
            })
            .collect();
        let outcomes = client.reserve_batch(&ops).await.unwrap();
        for (op, outcome) in ops.iter().zip(outcomes) {
            if outcome.status == Status::Reserved {
                self.held.push(op.reservation_id);
                self.acknowledged += 1;
            }
        }
        for _ in 0..40 {
            if self.held.is_empty() {
                break;
            }
            let id = self.held.swap_remove(self.rng.gen_range(0..self.held.len()));
            if self.rng.gen_bool(0.7) {
                let payment_ref = format!("pi_{id:x}");
                client.confirm(id, payment_ref.as_bytes()).await.unwrap();
            } else {
                client.release(id).await.unwrap();
            }
        }
        for _ in 0..10 {
            let user = self.rng.gen_range(0..5_000);
            let ticket = client.join(6, user).await.unwrap();
            if ticket.status == Status::Admitted && self.rng.gen_bool(0.5) {
                self.next_id += 1;
                let outcome = client.reserve(6, user, 1, self.next_id).await.unwrap();
                if outcome.status == Status::Reserved {
                    self.held.push(self.next_id);
                    self.acknowledged += 1;
                }
            }
        }
        match self.rng.gen_range(0..20) {
            0 => assert_eq!(client.restock(self.rng.gen_range(1..=5), 10).await.unwrap().status, Status::Ok),
            1 => {
                assert_eq!(client.pause(2).await.unwrap().status, Status::Ok);
                assert_eq!(client.resume(2).await.unwrap().status, Status::Ok);
            }
            _ => {}
        }
    }
}

/// Poll until PostgreSQL has settled `lsn` (or fail after `timeout`).
pub async fn wait_settled(db: &TestDb, lsn: u64, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let settled = db.watermark().await;
        if settled >= lsn {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "settled only up to {settled} of {lsn} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
