//! High availability, for real: etcd and three `stampede-server` processes
//! on 127.0.0.1, a reserve/confirm/release load whose every
//! acknowledgement is recorded by id, and the leader killed with SIGKILL at
//! seeded random moments. After each failover the new leader's whole state
//! (STATE_DUMP) is checked against the acknowledgements: every acknowledged
//! reservation present in the same state, nothing refused present, no
//! reservation nobody asked for, the counters adding up; the old leader
//! restarts, rejoins as a standby and catches up. Also: a standby killed
//! and restarted under load, a synchronous standby that stalls (SIGSTOP)
//! with and without another to replace it.
//!
//! `STAMPEDE_FAILOVER_ROUNDS` raises the number of failovers.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::cluster::TestCluster;
use common::process::{ADMIN, CHECKOUT};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use stampede_protocol::client::Client;
use stampede_protocol::message::{HoldState, NodeRole, SaleCreate};
use stampede_protocol::replication::ReplicationClient;
use stampede_protocol::Status;

const SKUS: u64 = 3;
const STOCK: u64 = 5_000;
const LIMIT: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Held,
    Confirmed { at_ms: u64 },
    Released,
}

#[derive(Clone, Copy, Debug)]
struct Acked {
    sku: u64,
    user: u64,
    qty: u32,
    expires_at_ms: u64,
    fate: Fate,
}

/// What the clients were told.
#[derive(Clone, Default)]
struct Ledger {
    acked: HashMap<u128, Acked>,
    /// Reserves refused with a final answer: the id must not exist.
    refused: HashMap<u128, Status>,
    /// Calls whose outcome is unknown (an error): may or may not exist.
    uncertain: HashMap<u128, u64>,
    /// Confirms whose outcome is unknown.
    uncertain_confirms: HashMap<u128, u64>,
    /// Releases whose outcome is unknown (the call failed during a
    /// failover, after the release may have landed).
    uncertain_releases: HashMap<u128, u64>,
}

async fn create_sales(client: &Client) {
    for sku in 1..=SKUS {
        let sale =
            SaleCreate { sku, stock: STOCK, limit_per_user: LIMIT, ttl_ms: 3_600_000, hot: sku == 1, queue: None };
        assert_eq!(client.create_sale(sale).await.unwrap().status, Status::Ok);
    }
}

/// One worker: `ops` operations, recording every answer.
async fn worker(client: Client, seed: u64, ledger: Arc<Mutex<Ledger>>, ops: usize) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for i in 0..ops {
        let held: Option<u128> = {
            let l = ledger.lock();
            let held: Vec<u128> = l.acked.iter().filter(|(_, a)| a.fate == Fate::Held).map(|(id, _)| *id).collect();
            (!held.is_empty()).then(|| held[rng.gen_range(0..held.len())])
        };
        match (rng.gen_range(0..10), held) {
            (0..=5, _) | (_, None) => {
                let id = (u128::from(seed) << 64) | (i as u128 + 1);
                let (sku, user, qty) = (rng.gen_range(1..=SKUS), rng.gen_range(0..2_000), rng.gen_range(1..=2));
                match client.reserve(sku, user, qty, id).await {
                    Ok(o) if o.status == Status::Reserved => {
                        ledger
                            .lock()
                            .acked
                            .insert(id, Acked { sku, user, qty, expires_at_ms: o.detail, fate: Fate::Held });
                    }
                    Ok(o) if o.status.is_retryable() => {
                        ledger.lock().uncertain.insert(id, sku);
                    }
                    Ok(o) => {
                        ledger.lock().refused.insert(id, o.status);
                    }
                    Err(_) => {
                        ledger.lock().uncertain.insert(id, sku);
                    }
                }
            }
            (6..=7, Some(id)) => {
                let sku = ledger.lock().acked[&id].sku;
                ledger.lock().uncertain_confirms.insert(id, sku);
                match client.confirm(id, format!("pay-{id:x}").as_bytes()).await {
                    Ok(o) if o.status == Status::Confirmed => {
                        let mut l = ledger.lock();
                        l.uncertain_confirms.remove(&id);
                        let a = l.acked.get_mut(&id).unwrap();
                        if a.fate == Fate::Held {
                            a.fate = Fate::Confirmed { at_ms: o.detail };
                        }
                    }
                    Ok(o) if o.status == Status::AlreadyReleased => {
                        ledger.lock().uncertain_confirms.remove(&id);
                    }
                    _ => {}
                }
            }
            (_, Some(id)) => {
                let sku = ledger.lock().acked[&id].sku;
                ledger.lock().uncertain_releases.insert(id, sku);
                match client.release(id).await {
                    Ok(o) if o.status == Status::Released => {
                        let mut l = ledger.lock();
                        l.uncertain_releases.remove(&id);
                        let a = l.acked.get_mut(&id).unwrap();
                        if a.fate == Fate::Held {
                            a.fate = Fate::Released;
                        }
                    }
                    Ok(o) if o.status == Status::AlreadyConfirmed => {
                        ledger.lock().uncertain_releases.remove(&id);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The leader's whole state against what the clients were told.
async fn audit(cluster: &TestCluster, ledger: &Ledger, ctx: &str) {
    let mut log = ReplicationClient::connect_leader(&cluster.addrs(), ADMIN).await.expect("connect to the leader");
    let dump = log.state_dump().await.expect("STATE_DUMP");
    let (sales, reservations) = common::cluster::split_dump(dump.entries);
    let mut problems = Vec::new();
    for (id, a) in &ledger.acked {
        let Some(r) = reservations.get(id) else {
            problems.push(format!("acknowledged reservation {id:#x} is gone ({a:?})"));
            continue;
        };
        if (r.sku, r.user, r.qty, r.expires_at_ms) != (a.sku, a.user, a.qty, a.expires_at_ms) {
            problems.push(format!("reservation {id:#x} changed: {r:?} vs {a:?}"));
        }
        let ok = match a.fate {
            Fate::Held => {
                matches!(r.state, HoldState::Held)
                    || (ledger.uncertain_confirms.contains_key(id) && r.state == HoldState::Confirmed)
                    || (ledger.uncertain_releases.contains_key(id) && r.state == HoldState::Released)
            }
            Fate::Confirmed { at_ms } => r.state == HoldState::Confirmed && r.settled_at_ms == at_ms,
            Fate::Released => r.state == HoldState::Released,
        };
        if !ok {
            problems.push(format!("reservation {id:#x}: acknowledged {:?}, now {:?}", a.fate, r.state));
        }
    }
    for (id, status) in &ledger.refused {
        if reservations.contains_key(id) {
            problems.push(format!("reservation {id:#x} was refused ({status}) but exists"));
        }
    }
    for id in reservations.keys() {
        if !ledger.acked.contains_key(id) && !ledger.uncertain.contains_key(id) {
            problems.push(format!("reservation {id:#x} exists but nobody was told of it"));
        }
    }
    for sku in 1..=SKUS {
        let s = sales.get(&sku).unwrap_or_else(|| panic!("{ctx}: sale {sku} missing"));
        let held: u64 = reservations
            .values()
            .filter(|r| r.sku == sku && r.state == HoldState::Held)
            .map(|r| u64::from(r.qty))
            .sum();
        let sold: u64 = reservations
            .values()
            .filter(|r| r.sku == sku && r.state == HoldState::Confirmed)
            .map(|r| u64::from(r.qty))
            .sum();
        if s.available + s.reserved + s.sold != s.total || s.reserved != held || s.sold != sold || s.total != STOCK {
            problems.push(format!("sku {sku}: {s:?}, reservations hold {held} and sold {sold}"));
        }
    }
    assert!(problems.is_empty(), "{ctx}: {} problems, e.g. {:#?}", problems.len(), &problems[..problems.len().min(5)]);
    eprintln!("{ctx}: {} acknowledged reservations checked", ledger.acked.len());
}

/// STATUS of `sku` from the leader. A node that does not decide, or a
/// leader without its synchronous standby, answers with every field 0
/// (`not_leader`, `sync_standby_unavailable`): asked again, for 10 s.
async fn sale_status(admin: &Client, sku: u64, ctx: &str) -> stampede_protocol::message::SaleStatus {
    let asked = std::time::Instant::now();
    loop {
        let reply = admin.status(sku).await.expect("status answered");
        if reply.status == Status::Ok {
            return reply.sale;
        }
        assert!(asked.elapsed() < Duration::from_secs(10), "{ctx}: STATUS answered {}", reply.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `workers` workers of `ops` operations against the cluster.
fn load(
    client: &Client,
    seed: u64,
    ledger: &Arc<Mutex<Ledger>>,
    workers: u64,
    ops: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers).map(|w| tokio::spawn(worker(client.clone(), seed.wrapping_add(w), ledger.clone(), ops))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_reservation() {
    let seed = common::seed();
    let rounds: u64 = std::env::var("STAMPEDE_FAILOVER_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(3, &[]));
    let admin = cluster.client(ADMIN).await;
    create_sales(&admin).await;
    let client = cluster.client(CHECKOUT).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // Where each sale was acknowledged to run (SALE_MOVE under load).
    let mut placed: HashMap<u64, bool> = HashMap::new();
    for round in 0..rounds {
        let ctx = format!("seed {seed} round {round}");
        cluster.wait_caught_up(Duration::from_secs(30)).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let tasks = load(&client, seed.wrapping_mul(31).wrapping_add(round * 1000), &ledger, 6, 300);
        // A sale moves under load before the kill: the new leader must
        // run it where the acknowledged move put it.
        let sku = round % SKUS + 1;
        let dedicated = !sale_status(&admin, sku, &ctx).await.hot;
        let moved = admin.move_sale(sku, dedicated).await.expect("move answered");
        assert_eq!(moved.status, Status::Ok, "{ctx}: move of sku {sku}");
        placed.insert(sku, dedicated);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        let killed_at = std::time::Instant::now();
        cluster.nodes[leader].kill();
        for task in tasks {
            task.await.unwrap();
        }
        let new_leader = cluster.wait_leader(Duration::from_secs(10)).await;
        assert_ne!(new_leader, leader, "{ctx}: a new leader");
        eprintln!(
            "{ctx}: node {} took over from node {} ({:?} after the kill, load done)",
            new_leader,
            leader,
            killed_at.elapsed()
        );
        let told = ledger.lock().clone();
        audit(&cluster, &told, &ctx).await;
        // The old leader comes back as a standby and catches up.
        tokio::task::block_in_place(|| cluster.start_node(leader));
        cluster.wait_caught_up(Duration::from_secs(30)).await;
        let reply = cluster.describe(leader).await.expect("the old leader answers");
        assert_eq!(reply.role, NodeRole::Standby, "{ctx}: the old leader rejoined as a standby");
        // With its synchronous standby back, the new leader answers STATUS.
        for (&sku, &dedicated) in &placed {
            let s = sale_status(&admin, sku, &ctx).await;
            assert_eq!(
                (s.hot, s.pinned),
                (dedicated, true),
                "{ctx}: sku {sku} placed as acknowledged\n{}",
                cluster.log_tails(40)
            );
        }
    }
    let told = ledger.lock().clone();
    audit(&cluster, &told, &format!("seed {seed} final")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_killed_under_load_catches_up_after_its_restart() {
    let seed = common::seed();
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(3, &[]));
    let admin = cluster.client(ADMIN).await;
    create_sales(&admin).await;
    let client = cluster.client(CHECKOUT).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let standby = (leader + 1) % 3;
    let tasks = load(&client, seed, &ledger, 4, 300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.nodes[standby].kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| cluster.start_node(standby));
    for task in tasks {
        task.await.unwrap();
    }
    cluster.wait_caught_up(Duration::from_secs(30)).await;
    assert_eq!(cluster.wait_leader(Duration::from_secs(5)).await, leader, "the leader stayed");
    let told = ledger.lock().clone();
    audit(&cluster, &told, &format!("seed {seed}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_synchronous_standby_is_replaced_or_holds_the_leader_by_default() {
    // Three nodes: the stalled member is replaced by the other standby.
    let timeout = ["--sync-timeout-ms", "500"];
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(3, &timeout));
    let admin = cluster.client(ADMIN).await;
    create_sales(&admin).await;
    let client = cluster.client(CHECKOUT).await;
    cluster.wait_caught_up(Duration::from_secs(30)).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let sync_member = |reply: &stampede_protocol::message::ClusterReply| {
        reply.nodes.iter().find(|n| n.in_sync_set).map(|n| n.id.clone())
    };
    let before = sync_member(&cluster.describe(leader).await.unwrap()).expect("a synchronous standby");
    let stalled = cluster.nodes.iter().position(|n| n.id == before).unwrap();
    cluster.nodes[stalled].signal("STOP");
    let started = std::time::Instant::now();
    let o = client.reserve(1, 1, 1, 0xabc).await.expect("answered");
    assert_eq!(o.status, Status::Reserved, "acknowledged once the other standby replaced the stalled one");
    let waited = started.elapsed();
    let after = sync_member(&cluster.describe(leader).await.unwrap()).expect("a synchronous standby");
    assert_ne!(after, before, "the stalled standby left the synchronous set");
    eprintln!("replaced {before} by {after}; the acknowledgement waited {waited:?}");
    assert!(waited < Duration::from_secs(5), "replaced within the timeout and a few polls: {waited:?}");
    cluster.nodes[stalled].signal("CONT");
    drop(cluster);

    // Two nodes: nobody to replace it. Strict by default: the reply waits,
    // and after the timeout new requests are refused; back when it is.
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(2, &timeout));
    let admin = cluster.client(ADMIN).await;
    create_sales(&admin).await;
    cluster.wait_caught_up(Duration::from_secs(30)).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let standby = 1 - leader;
    let client = cluster.client(CHECKOUT).await;
    assert_eq!(client.reserve(1, 1, 1, 0x1).await.unwrap().status, Status::Reserved);
    cluster.nodes[standby].signal("STOP");
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.reserve(1, 2, 1, 0x2).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    if held.is_finished() {
        // Say how it ended (an acknowledgement, or an error: a lost lease
        // under load ends the call differently from a broken rule).
        let early = held.await;
        panic!("no acknowledgement while the only standby is stalled, but the call ended: {early:?}");
    }
    let mut direct = stampede_protocol::client::ClientConfig::new(&cluster.nodes[leader].addr, CHECKOUT);
    direct.max_attempts = 1;
    let direct = Client::connect(direct).await.unwrap();
    let refused = direct.reserve(1, 3, 1, 0x3).await.unwrap();
    assert_eq!(refused.status, Status::SyncStandbyUnavailable, "refused after the timeout");
    cluster.nodes[standby].signal("CONT");
    let o = held.await.unwrap().expect("answered once the standby is back");
    assert_eq!(o.status, Status::Reserved);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(direct.reserve(1, 3, 1, 0x3).await.unwrap().status, Status::Reserved, "serving again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_cluster_fails_over_too() {
    // --sync-standbys 0: no standby is known to hold every acknowledged
    // record, so none is in `sync`; any must be allowed to take over, or a
    // lost leader would stop the sale for good.
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(3, &["--sync-standbys", "0"]));
    let admin = cluster.client(ADMIN).await;
    create_sales(&admin).await;
    let client = cluster.client(CHECKOUT).await;
    assert_eq!(client.reserve(1, 1, 1, 0x1).await.unwrap().status, Status::Reserved);
    cluster.wait_caught_up(Duration::from_secs(30)).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    cluster.nodes[leader].kill();
    let next = cluster.wait_leader(Duration::from_secs(15)).await;
    assert_ne!(next, leader, "a standby took over");
    assert_eq!(client.reserve(1, 2, 1, 0x2).await.unwrap().status, Status::Reserved, "the sale goes on");
    // Caught up before the kill, so the reservation made then survived.
    assert_eq!(client.reserve(1, 1, 1, 0x1).await.unwrap().status, Status::Reserved, "the retry answers as before");
    let status = client.status(1).await.unwrap().sale;
    assert_eq!(status.reserved, 2, "{status:?}");
}
