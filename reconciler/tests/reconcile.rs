//! The reconciler against real parts: PostgreSQL on 127.0.0.1:5432 (a
//! database per test), a durable stampede server on 127.0.0.1 with its
//! write-ahead log on disk, and the `stampede-reconciler` binary.

mod common;

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stampede_protocol::message::{Replicate, Reply, Request};
use stampede_protocol::Status;

use common::*;

fn synced(node: &stampede::node::Node) -> u64 {
    node.wal_stats.synced_lsn.load(std::sync::atomic::Ordering::Acquire)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_report_is_clean_and_counters_match_the_engine() {
    let seed = seed("end_to_end");
    let db = TestDb::new("e2e").await;
    let dir = TempDir::new("e2e");
    let node = start_node(&dir.0, "127.0.0.1:0").await;
    let addr = node.addr().to_string();
    let client = admin_client(&addr).await;
    create_sales(&client).await;
    let mut load = Load::new(seed);
    for round in 0..30 {
        load.round(&client).await;
        // Sales move between shards mid-load (SALE_MOVED records).
        if round == 10 {
            assert_eq!(client.move_sale(2, true).await.unwrap().status, Status::Ok);
        }
        if round == 20 {
            assert_eq!(client.move_sale(1, false).await.unwrap().status, Status::Ok);
        }
    }
    // Let sku 5's 300 ms holds expire (EXPIRED events) and sku 6's line
    // run its course (admissions lapse after 200 ms and admit the next),
    // until the log stops changing.
    let lsn = quiesce(&node).await;
    assert!(lsn > 5_000, "the load wrote {lsn} records");

    let (url, server) = (db.url.clone(), addr.clone());
    blocking(move || run_until_caught_up(&url, &server)).await;
    assert_eq!(db.watermark().await, lsn, "run --until-caught-up settles everything durable at start");

    let (url, server) = (db.url.clone(), addr.clone());
    let (code, json, stderr) = blocking(move || report_json(&url, &server)).await;
    assert_eq!(code, 0, "report: {json:#}\n{stderr}");
    assert_eq!(json["ok"], true);
    assert_eq!(json["lsn"], lsn);
    assert_eq!(json["lag_records"], 0);
    assert_eq!(json["skus"].as_array().unwrap().len(), 6);

    // PostgreSQL's counters are the engine's, SKU by SKU.
    let counters = db.counters().await;
    assert_eq!(counters.len(), 6);
    for (sku, total, available, reserved, sold) in counters {
        let live = client.status(sku).await.unwrap().sale;
        assert_eq!(
            (total, available, reserved, sold),
            (live.total, live.available, live.reserved, live.sold),
            "sku {sku}"
        );
    }
    // Where each sale runs now, in PostgreSQL too.
    let hot: Vec<(i64, bool)> =
        sqlx::query_as("SELECT sku, hot FROM stampede.sales ORDER BY sku").fetch_all(&db.pool).await.unwrap();
    for (sku, hot) in hot {
        assert_eq!(hot, client.status(sku as u64).await.unwrap().sale.hot, "sku {sku}: placement");
    }
    assert!(client.status(2).await.unwrap().sale.hot, "sku 2 moved to a shard of its own");
    assert!(!client.status(1).await.unwrap().sale.hot, "sku 1 moved to the pool");
    // Every record exactly once, and every kind of event made it.
    assert_eq!(db.ledger().await, (lsn, lsn, lsn));
    let kinds: Vec<String> = sqlx::query_scalar("SELECT DISTINCT kind FROM stampede.ledger ORDER BY kind")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for kind in [
        "confirmed",
        "expired",
        "released",
        "reserved",
        "sale_created",
        "queue_configured",
        "queue_joined",
        "admitted",
        "sale_moved",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} event in the ledger: {kinds:?}");
    }
    // The settled LSN reached the server through the stream.
    let consumer = std::fs::read_to_string(dir.0.join("consumer.lsn")).unwrap();
    assert_eq!(consumer.trim().parse::<u64>().unwrap(), lsn);

    stop_node(node).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_row_is_named_and_exits_non_zero() {
    let seed = seed("corrupted_row");
    let db = TestDb::new("corrupt").await;
    let dir = TempDir::new("corrupt");
    let node = start_node(&dir.0, "127.0.0.1:0").await;
    let addr = node.addr().to_string();
    let client = admin_client(&addr).await;
    create_sales(&client).await;
    let mut load = Load::new(seed);
    for _ in 0..5 {
        load.round(&client).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (url, server) = (db.url.clone(), addr.clone());
    blocking(move || run_until_caught_up(&url, &server)).await;

    // Test only: move a unit from available to sold behind the reconciler's
    // back (the row still adds up, so only a comparison can catch it).
    let changed = sqlx::query("UPDATE stampede.sales SET sold = sold + 1, available = available - 1 WHERE sku = 4")
        .execute(&db.pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);

    let (url, server) = (db.url.clone(), addr.clone());
    let (code, json, _) = blocking(move || report_json(&url, &server)).await;
    assert_eq!(code, 1, "a disagreement exits 1: {json:#}");
    assert_eq!(json["ok"], false);
    let bad: Vec<u64> = json["skus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| s["sku"].as_u64().unwrap())
        .collect();
    assert_eq!(bad, vec![4], "exactly sku 4 differs");

    // The table for a person names it too.
    let out = reconciler(&db.url).args(["report", "--server", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.trim_start().starts_with("4 ")).unwrap_or_else(|| panic!("no sku 4 row:\n{text}"));
    assert!(line.contains("DIFFERS"), "{line}");
    assert!(text.contains("DISAGREEMENT"), "{text}");

    stop_node(node).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_follows_live_and_resumes_across_a_server_restart() {
    let seed = seed("server_restart");
    let db = TestDb::new("restart").await;
    let dir = TempDir::new("restart");
    let node = start_node(&dir.0, "127.0.0.1:0").await;
    let addr = node.addr().to_string();
    let mut child = Running::spawn(&db.url, &addr);
    let client = admin_client(&addr).await;
    create_sales(&client).await;
    let mut load = Load::new(seed);
    for _ in 0..20 {
        load.round(&client).await;
    }
    let before = synced(&node);
    wait_settled(&db, before, Duration::from_secs(30)).await;

    // Restart the server on the same address; the reconciler reconnects and
    // resumes from its watermark.
    drop(client);
    stop_node(node).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let node = start_node(&dir.0, &addr).await;
    let client = admin_client(&addr).await;
    for _ in 0..20 {
        load.round(&client).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = synced(&node);
    assert!(after > before);
    wait_settled(&db, after, Duration::from_secs(30)).await;
    assert!(child.is_running(), "the reconciler survived the server restart");
    child.kill();

    assert_eq!(db.ledger().await, (after, after, after));
    let (url, server) = (db.url.clone(), addr.clone());
    let (code, json, stderr) = blocking(move || report_json(&url, &server)).await;
    assert_eq!(code, 0, "report: {json:#}\n{stderr}");
    stop_node(node).await;
    db.drop_db().await;
}

/// kill -9 the reconciler at random moments while it settles (and while
/// the log keeps growing); every restart resumes from the watermark. In
/// the end PostgreSQL equals the engine and no record was applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_reconciler_at_random_points_loses_and_repeats_nothing() {
    let seed = seed("kill_reconciler");
    let rounds: usize =
        std::env::var("STAMPEDE_RECONCILER_KILL_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let mut rng = SmallRng::seed_from_u64(seed);
    let db = TestDb::new("kill").await;
    let dir = TempDir::new("kill");
    let node = start_node(&dir.0, "127.0.0.1:0").await;
    let addr = node.addr().to_string();
    let client = admin_client(&addr).await;
    create_sales(&client).await;
    let mut load = Load::new(seed);
    for _ in 0..60 {
        load.round(&client).await;
    }
    let mut last_watermark = 0;
    let mut kills_mid_run = 0;
    for round in 0..rounds {
        let mut child = Running::spawn(&db.url, &addr);
        // Keep the log growing while the reconciler works.
        for _ in 0..rng.gen_range(0..4) {
            load.round(&client).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
        child.kill(); // SIGKILL
        if !db.migrated().await {
            // Killed before it created its schema: nothing settled yet.
            assert_eq!(last_watermark, 0, "round {round}: the schema vanished (seed {seed})");
            continue;
        }
        let watermark = db.watermark().await;
        assert!(
            watermark >= last_watermark,
            "round {round}: watermark went back from {last_watermark} to {watermark} (seed {seed})"
        );
        if watermark < synced(&node) {
            kills_mid_run += 1;
        }
        last_watermark = watermark;
        // Never a gap or a repeat, even right after a kill.
        let (rows, distinct, max) = db.ledger().await;
        assert_eq!((rows, distinct, max), (watermark, watermark, watermark), "round {round} (seed {seed})");
    }
    eprintln!("{kills_mid_run} of {rounds} kills landed before the reconciler had caught up");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let lsn = synced(&node);
    let (url, server) = (db.url.clone(), addr.clone());
    blocking(move || run_until_caught_up(&url, &server)).await;
    assert_eq!(db.ledger().await, (lsn, lsn, lsn), "seed {seed}");
    let (url, server) = (db.url.clone(), addr.clone());
    let (code, json, stderr) = blocking(move || report_json(&url, &server)).await;
    assert_eq!(code, 0, "seed {seed}: {json:#}\n{stderr}");
    for (sku, total, available, reserved, sold) in db.counters().await {
        let live = client.status(sku).await.unwrap().sale;
        assert_eq!(
            (total, available, reserved, sold),
            (live.total, live.available, live.reserved, live.sold),
            "sku {sku}"
        );
    }
    stop_node(node).await;
    db.drop_db().await;
}

/// Segments go only once a snapshot covers them *and* the reconciler has
/// settled past them; a consumer that needs a deleted segment is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_segments_are_kept_until_the_reconciler_has_settled_them() {
    let seed = seed("retention");
    let db = TestDb::new("retention").await;
    let dir = TempDir::new("retention");
    let mut config = node_config(&dir.0, "127.0.0.1:0");
    config.wal.segment_bytes_max = 32 * 1024;
    config.snapshot_interval = Duration::from_millis(100);
    let node = stampede::node::Node::start(config).await.unwrap();
    let addr = node.addr().to_string();
    let client = admin_client(&addr).await;
    create_sales(&client).await;
    let mut load = Load::new(seed);
    for _ in 0..20 {
        load.round(&client).await;
    }
    let segments = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".seg"))
            .count()
    };
    // Several checkpoints run; with no consumer every segment stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = segments(&dir.0);
    assert!(before > 5, "{before} segments");
    assert!(std::fs::read_dir(&dir.0).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".snap")));

    let (url, server) = (db.url.clone(), addr.clone());
    blocking(move || run_until_caught_up(&url, &server)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while segments(&dir.0) >= before {
        assert!(std::time::Instant::now() < deadline, "settled segments were never deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A fresh database would need LSN 1, which is gone: a clear refusal.
    let fresh = TestDb::new("retention_fresh").await;
    let out = reconciler(&fresh.url).args(["run", "--until-caught-up", "--server", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no longer holds the log"), "{stderr}");

    stop_node(node).await;
    db.drop_db().await;
    fresh.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_needs_the_replication_role_and_an_lsn_the_log_has() {
    let dir = TempDir::new("roles");
    let node = start_node(&dir.0, "127.0.0.1:0").await;
    let addr = node.addr().to_string();
    let checkout =
        stampede_protocol::client::Client::connect(stampede_protocol::client::ClientConfig::new(&addr, CHECKOUT))
            .await
            .unwrap();
    for request in [Request::Replicate(Replicate { from_lsn: 1 }), Request::StateDump] {
        match checkout.raw(request).await {
            Err(stampede_protocol::client::ClientError::Server { status: Status::Forbidden, .. }) => {}
            Ok(Reply::Error(e)) if e.status == Status::Forbidden => {}
            other => panic!("checkout role reached the log: {other:?}"),
        }
    }
    // The replication token cannot sell anything.
    let replication =
        stampede_protocol::client::Client::connect(stampede_protocol::client::ClientConfig::new(&addr, REPLICATION))
            .await
            .unwrap();
    match replication.reserve(1, 1, 1, 1).await {
        Err(stampede_protocol::client::ClientError::Server { status: Status::Forbidden, .. }) => {}
        other => panic!("replication role reserved: {other:?}"),
    }
    // Beyond the end of the log.
    let client = stampede_protocol::replication::ReplicationClient::connect(&addr, REPLICATION).await.unwrap();
    // Keep the settler: dropping it closes our write half, and a stream
    // whose consumer has closed may end before it answers (a race this
    // test lost under load).
    let (mut stream, _settler) = client.replicate(1_000).await.unwrap();
    match stream.next_batch().await {
        Err(stampede_protocol::client::ClientError::Server { status: Status::LsnUnavailable, .. }) => {}
        other => panic!("REPLICATE past the end: {other:?}"),
    }
    stop_node(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_and_connection_problems_are_clear_errors() {
    // PostgreSQL unreachable.
    let out = reconciler("postgres://postgres@127.0.0.1:1/nothing")
        .args(["report", "--server", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach PostgreSQL"), "{out:?}");

    // No schema yet.
    let db = TestDb::new("schema").await;
    let out = reconciler(&db.url).args(["report", "--server", "127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stampede schema"), "{out:?}");

    // A schema newer than the binary.
    let out = reconciler(&db.url).arg("migrate").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from the future', true, '\\x00', 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let out = reconciler(&db.url).args(["report", "--server", "127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("newer than this binary"), "{out:?}");
    db.drop_db().await;
}

/// Wait until the node's synced LSN has not moved for 500 ms (at most 30 s)
/// and return it: expiries and queue admissions go on after the load stops.
async fn quiesce(node: &stampede::node::Node) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = synced(node);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = synced(node);
        if now == last {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "the log kept changing for 30 s after the load");
        last = now;
    }
}

/// A sale in three warehouses (and one without locations) under seeded
/// load with preferences, regions, restocks of one warehouse, a warehouse
/// added mid-sale and a region re-mapped: PostgreSQL holds one row per
/// warehouse equal to the engine's, every reservation at the warehouse the
/// server answered, the report is clean per warehouse; a warehouse row
/// changed behind the reconciler's back (still adding up) is named, and
/// one that does not add up is refused by the table's CHECK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warehouses_settle_row_by_row_and_the_report_compares_each() {
    use stampede_protocol::message::{SaleCreate, SaleLocations, Where};
    let seed = seed("warehouses");
    let db = TestDb::new("warehouses").await;
    let dir = TempDir::new("warehouses");
    let node = start_node(&dir.0, "127.0.0.1:0").await;
    let addr = node.addr().to_string();
    let client = admin_client(&addr).await;
    let create = |sku, stock| SaleCreate { sku, stock, limit_per_user: 6, ttl_ms: 60_000, hot: false, queue: None };
    let spec =
        SaleLocations { locations: vec![(1, 300), (2, 120), (3, 40)], regions: vec![(7, vec![3, 2]), (8, vec![1])] };
    assert_eq!(client.create_sale_at(create(10, 460), spec).await.unwrap().status, Status::Ok);
    assert_eq!(client.create_sale(create(11, 50)).await.unwrap().status, Status::Ok);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut placed: Vec<(u128, u16)> = Vec::new();
    for i in 0..1_500u64 {
        if i == 500 {
            assert_eq!(client.add_location(10, 9, 25).await.unwrap().status, Status::Ok);
            assert_eq!(client.set_region(10, 8, &[9, 1]).await.unwrap().status, Status::Ok);
        }
        if i % 300 == 299 {
            assert_eq!(client.restock_at(10, 3, 5).await.unwrap().status, Status::Ok);
        }
        let sku = if i % 7 == 0 { 11 } else { 10 };
        let at = match rng.gen_range(0..4) {
            0 => Where::Region(rng.gen_range(7..=9)),
            1 => Where::locations(&[rng.gen_range(1..=3), 1]),
            _ => Where::Default,
        };
        let id = u128::from(i) + 1;
        let outcome = client.reserve_at(sku, rng.gen_range(0..200), rng.gen_range(1..=2), id, at).await.unwrap();
        if outcome.status == Status::Reserved {
            placed.push((id, outcome.location));
            match rng.gen_range(0..3) {
                0 => assert_eq!(client.confirm(id, b"pi").await.unwrap().status, Status::Confirmed),
                1 => assert_eq!(client.release(id).await.unwrap().status, Status::Released),
                _ => {}
            }
        }
    }
    assert!(placed.len() > 300, "seed {seed}: {} reservations", placed.len());
    let lsn = quiesce(&node).await;
    let (url, server) = (db.url.clone(), addr.clone());
    blocking(move || run_until_caught_up(&url, &server)).await;
    assert_eq!(db.watermark().await, lsn);
    let (url, server) = (db.url.clone(), addr.clone());
    let (code, json, stderr) = blocking(move || report_json(&url, &server)).await;
    assert_eq!(code, 0, "seed {seed}: report: {json:#}\n{stderr}");
    assert_eq!(json["ok"], true);

    // One row per warehouse, equal to the engine's.
    for sku in [10u64, 11] {
        let rows: Vec<(i32, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT location, total, available, reserved, sold FROM stampede.sale_locations WHERE sku = $1 \
             ORDER BY location",
        )
        .bind(sku as i64)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let mut live: Vec<(i32, i64, i64, i64, i64)> = client
            .locations(sku)
            .await
            .unwrap()
            .locations
            .iter()
            .map(|l| (i32::from(l.location), l.total as i64, l.available as i64, l.reserved as i64, l.sold as i64))
            .collect();
        live.sort_unstable();
        assert_eq!(rows, live, "seed {seed}: sku {sku} warehouses");
    }
    // Every reservation at the warehouse the server answered.
    for (id, location) in &placed {
        let row: i32 = sqlx::query_scalar("SELECT location FROM stampede.reservations WHERE id = $1")
            .bind(uuid::Uuid::from_u128(*id))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(row, i32::from(*location), "seed {seed}: reservation {id}");
    }

    // A sold unit put back as available at warehouse 2, behind the
    // reconciler's back: the row still adds up, the comparison names it.
    let changed = sqlx::query(
        "UPDATE stampede.sale_locations SET sold = sold - 1, available = available + 1 \
         WHERE sku = 10 AND location = 2 AND sold > 0",
    )
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(changed, 1);
    let (url, server) = (db.url.clone(), addr.clone());
    let (code, json, _) = blocking(move || report_json(&url, &server)).await;
    assert_eq!(code, 1, "seed {seed}: a warehouse that differs exits 1: {json:#}");
    let bad: Vec<u64> = json["skus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| s["sku"].as_u64().unwrap())
        .collect();
    assert_eq!(bad, vec![10]);
    // A row that does not add up is refused by PostgreSQL itself.
    let refused = sqlx::query("UPDATE stampede.sale_locations SET sold = sold + 1 WHERE sku = 10 AND location = 1")
        .execute(&db.pool)
        .await;
    assert!(refused.is_err(), "the CHECK refuses a warehouse whose counters do not add up");

    stop_node(node).await;
    db.drop_db().await;
}
