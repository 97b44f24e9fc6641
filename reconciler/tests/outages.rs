//! The reconciler rides out PostgreSQL going away: a restart (sessions
//! terminated by the administrator), a crash (immediate stop, recovery at
//! start), and a database that is down when the reconciler starts. It
//! retries with backoff, says so in its log and its metrics, resumes from
//! the watermark, and in the end PostgreSQL equals the engine with every
//! record settled exactly once. PostgreSQL here is a private server the
//! test starts itself (common/pg.rs), so stopping it disturbs no one.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::pg::PrivatePostgres;
use common::*;
use sqlx::{Connection, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn synced(node: &stampede::node::Node) -> u64 {
    node.wal_stats.synced_lsn.load(std::sync::atomic::Ordering::Acquire)
}

/// `run --metrics-listen 127.0.0.1:0`, with the metrics address it printed.
fn spawn_with_metrics(db_url: &str, server: &str) -> (Running, String) {
    let mut child = reconciler(db_url)
        .args(["run", "--server", server, "--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the reconciler");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("stampede-reconciler metrics on ").expect("metrics address").to_string();
    (Running(child), addr)
}

/// One metric's value from the reconciler's /metrics (0 if absent).
async fn metric(addr: &str, name: &str) -> f64 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics endpoint");
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The watermark, on a fresh connection (pooled ones die with the server).
async fn watermark(url: &str) -> Option<u64> {
    let mut conn = sqlx::PgConnection::connect(url).await.ok()?;
    let row = sqlx::query("SELECT settled_lsn FROM stampede.watermark").fetch_one(&mut conn).await.ok()?;
    Some(row.get::<i64, _>(0) as u64)
}

async fn wait_settled_at(url: &str, lsn: u64, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let settled = watermark(url).await;
        if settled.is_some_and(|s| s >= lsn) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "settled only {settled:?} of {lsn} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_rides_out_a_postgres_restart_a_crash_and_a_late_start() {
    let seed = seed("postgres_outages");
    let pg = tokio::task::spawn_blocking(PrivatePostgres::start).await.unwrap();
    let url = pg.url("postgres");
    let dir = TempDir::new("outages");
    let node = start_node(&dir.0, "127.0.0.1:0").await;
    let addr = node.addr().to_string();
    let client = admin_client(&addr).await;
    create_sales(&client).await;
    let mut load = Load::new(seed);
    let (mut child, metrics) = spawn_with_metrics(&url, &addr);
    for _ in 0..10 {
        load.round(&client).await;
    }
    wait_settled_at(&url, synced(&node), Duration::from_secs(30)).await;
    assert_eq!(metric(&metrics, "stampede_reconciler_database_up").await, 1.0);

    // Its sessions terminated under it, mid-transaction (what a failover
    // proxy or an administrator does): FATAL 57P01 on the next statement.
    {
        let busy = {
            let (client, mut load) = (client.clone(), Load::new(seed ^ 1));
            tokio::spawn(async move {
                for _ in 0..40 {
                    load.round(&client).await;
                }
            })
        };
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut terminated = 0i64;
        while !busy.is_finished() {
            let row = sqlx::query(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            )
            .fetch_one(&mut admin)
            .await
            .unwrap();
            terminated += row.get::<i64, _>(0);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        busy.await.unwrap();
        assert!(terminated > 0, "sessions were terminated");
        tokio::time::sleep(Duration::from_millis(300)).await;
        wait_settled_at(&url, synced(&node), Duration::from_secs(30)).await;
        assert!(child.is_running(), "seed {seed}: the reconciler exited when its sessions were terminated");
    }

    for (mode, down_for) in [("fast", Duration::from_millis(1_500)), ("immediate", Duration::from_millis(400))] {
        // Load keeps coming, so the stop lands in the middle of settling.
        let busy = {
            let (client, mut load) = (client.clone(), Load::new(seed ^ mode.len() as u64));
            tokio::spawn(async move {
                for _ in 0..30 {
                    load.round(&client).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        let pg_ref = &pg;
        tokio::task::block_in_place(|| pg_ref.stop(mode));
        busy.await.unwrap();
        wait_for("the reconciler to notice the database is down", Duration::from_secs(20), async || {
            metric(&metrics, "stampede_reconciler_database_up").await == 0.0
        })
        .await;
        tokio::time::sleep(down_for).await;
        assert!(child.is_running(), "seed {seed}: the reconciler exited during a PostgreSQL {mode} stop");
        tokio::task::block_in_place(|| pg_ref.start_again());
        for _ in 0..5 {
            load.round(&client).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        wait_settled_at(&url, synced(&node), Duration::from_secs(30)).await;
        assert_eq!(metric(&metrics, "stampede_reconciler_database_up").await, 1.0, "after the {mode} stop");
        assert!(child.is_running());
    }
    let reconnects = metric(&metrics, "stampede_reconciler_reconnects_total{peer=\"database\"}").await;
    assert!(reconnects >= 2.0, "reconnections counted: {reconnects}");

    // Started while the database is down: it waits for it, then settles.
    child.kill();
    tokio::task::block_in_place(|| pg.stop("fast"));
    let (mut child, metrics) = spawn_with_metrics(&url, &addr);
    for _ in 0..5 {
        load.round(&client).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(child.is_running(), "the reconciler waits for a database that is down");
    assert_eq!(metric(&metrics, "stampede_reconciler_database_up").await, 0.0);
    tokio::task::block_in_place(|| pg.start_again());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lsn = synced(&node);
    wait_settled_at(&url, lsn, Duration::from_secs(30)).await;
    child.kill();

    // Exactly once through all of it, and PostgreSQL equals the engine.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let row = sqlx::query("SELECT count(*), count(DISTINCT lsn), coalesce(max(lsn), 0) FROM stampede.ledger")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let ledger: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let settled = watermark(&url).await.unwrap() as i64;
    assert_eq!(ledger, (settled, settled, settled), "seed {seed}: every record once, none missing");
    let (report_url, server) = (url.clone(), addr.clone());
    let (code, json, stderr) = tokio::task::spawn_blocking(move || report_json(&report_url, &server)).await.unwrap();
    assert_eq!(code, 0, "seed {seed}: {json:#}\n{stderr}");
    drop(client);
    stop_node(node).await;
    drop(pg);
}
