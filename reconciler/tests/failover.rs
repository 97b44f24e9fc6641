//! The reconciler keeps settling across failovers: a real cluster (etcd
//! and three `stampede-server` processes on 127.0.0.1, the root crate's
//! test harness), the reconciler binary given every node's address, a
//! checkout load through a client that follows the leader, and the leader
//! killed with SIGKILL at seeded moments. The reconciler must find each new
//! leader by itself and continue from its watermark: in the end the ledger
//! holds every LSN of the final leader's log exactly once (the records of
//! every term, TERM_STARTED included), PostgreSQL equals the engine (the
//! report is clean), and the reconciler never exited.
//!
//! `STAMPEDE_FAILOVER_ROUNDS` raises the number of failovers (default 2).

mod common;

#[allow(dead_code)]
#[path = "../../tests/common/process.rs"]
mod process;

#[allow(dead_code)]
#[path = "../../tests/common/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use cluster::{TestCluster, REPLICATION};
use common::*;
use rand::{Rng, SeedableRng};

/// `stampede-reconciler` with the cluster's replication token.
fn reconciler_for_cluster(db_url: &str) -> std::process::Command {
    reconciler_as(db_url, REPLICATION)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_settles_across_failovers_exactly_once() {
    let seed = seed("the_reconciler_settles_across_failovers_exactly_once");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let rounds: usize = std::env::var("STAMPEDE_FAILOVER_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let db = TestDb::new("failover").await;
    let mut cluster = TestCluster::start(3, &[]);
    let first_leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let admin = cluster.client(process::ADMIN).await;
    create_sales(&admin).await;

    let mut reconciler = Running(
        reconciler_for_cluster(&db.url)
            .args(["run", "--server", &cluster.addrs()])
            .spawn()
            .expect("spawn the reconciler"),
    );
    let mut load = Load::new(seed);
    let mut leader = first_leader;
    for round in 0..rounds {
        // Traffic, then the leader killed while the reconciler is busy with
        // it: at least one round settled first, so the kill lands mid-stream.
        let busy = rng.gen_range(2..6);
        for _ in 0..busy {
            load.round(&admin).await;
        }
        let before = db.watermark_if_migrated().await;
        let started = Instant::now();
        while db.watermark_if_migrated().await == before && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            db.watermark_if_migrated().await > before,
            "seed {seed} round {round}: the reconciler settled nothing before the kill"
        );
        load.round(&admin).await;
        eprintln!("round {round}: killing the leader {}", cluster.nodes[leader].id);
        cluster.nodes[leader].kill();
        // The load goes on through the failover (the client finds the new
        // leader and resends with the same ids).
        for _ in 0..busy {
            load.round(&admin).await;
        }
        let next = cluster.wait_leader(Duration::from_secs(20)).await;
        assert_ne!(next, leader, "seed {seed} round {round}: the killed node cannot lead");
        assert!(reconciler.is_running(), "seed {seed} round {round}: the reconciler exited across the failover");
        // The old leader comes back as a standby (cutting what it wrote and
        // never had acknowledged), so the next round has a spare again.
        cluster.start_node(leader);
        cluster.wait_caught_up(Duration::from_secs(30)).await;
        leader = next;
    }
    for _ in 0..3 {
        load.round(&admin).await;
    }
    assert!(load.acknowledged > 0, "seed {seed}: the load reserved nothing");

    // Everything the final leader logged settles, each LSN once. Holds of
    // the short-TTL sale go on expiring for a moment after the load (each
    // expiry a record): wait until the log stands still and is settled.
    cluster.wait_caught_up(Duration::from_secs(30)).await;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let started = Instant::now();
    let head = loop {
        let head = cluster.describe(leader).await.expect("the leader answers").nodes[0].durable_lsn;
        wait_settled(&db, head, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cluster.describe(leader).await.expect("the leader answers").nodes[0].durable_lsn;
        if now == head && db.watermark().await == head {
            break head;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "seed {seed}: the log never stood still");
    };
    assert!(reconciler.is_running(), "seed {seed}: the reconciler exited");
    let (rows, distinct, max) = db.ledger().await;
    assert_eq!(
        (rows, distinct, max),
        (head, head, head),
        "seed {seed}: the ledger must hold LSNs 1..={head} once each"
    );
    // A TERM_STARTED opens each leader's records: one per election at
    // least (a leader that lost its lease under load adds one), terms
    // rising with the LSN.
    let terms = db.term_records().await;
    assert!(terms.len() > rounds, "seed {seed}: {} TERM_STARTED records for {rounds} failovers", terms.len());
    assert!(terms.windows(2).all(|w| w[0].1 < w[1].1), "seed {seed}: terms out of order in the ledger: {terms:?}");

    let addrs = cluster.addrs();
    let url = db.url.clone();
    let (code, json, stderr) =
        tokio::task::spawn_blocking(move || report_json_as(&url, &addrs, REPLICATION)).await.unwrap();
    assert_eq!(code, 0, "seed {seed}: report: {json:#}\n{stderr}");
    assert_eq!(json["ok"], true, "seed {seed}");
    assert_eq!(json["lsn"], head, "seed {seed}: the report ran against the final leader's log");
    assert_eq!(json["lag_records"], 0, "seed {seed}");

    reconciler.kill();
    drop(cluster);
    db.drop_db().await;
}
