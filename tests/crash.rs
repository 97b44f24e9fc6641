//! Crash for real: the server runs as a child process under concurrent
//! reserve/confirm/release load and is killed with SIGKILL at random
//! moments (seeded; the seed is printed), then restarted on the same data
//! dir and audited against the clients' record of acknowledged replies:
//! - every acknowledged reservation is still there (a retried RESERVE
//!   answers `reserved` with the original expiry),
//! - every acknowledged confirm and release is still there,
//! - available + reserved + sold == total, and sold is exactly the acked
//!   confirms plus some of the confirms whose reply was lost in the crash.
//!
//! `STAMPEDE_CRASH_ROUNDS` raises the number of kill/restart rounds.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::process::{ServerProcess, TempDir, ADMIN, CHECKOUT};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::SaleCreate;
use stampede_protocol::Status;

const SKUS: u64 = 3;
const STOCK: u64 = 2_000;
const LIMIT: u32 = 4;
const WORKERS: u64 = 8;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Known {
    /// Reserve acknowledged with this expiry.
    Held {
        expires_at_ms: u64,
    },
    Confirmed {
        expires_at_ms: u64,
        at_ms: u64,
    },
    Released {
        expires_at_ms: u64,
    },
}

#[derive(Default)]
struct Ledger {
    /// What the server acknowledged, per reservation id: (sku, user, qty, state).
    acked: HashMap<u128, (u64, u64, u32, Known)>,
    /// Confirms sent whose reply never came (may or may not have happened).
    uncertain_confirms: HashMap<u128, u64>,
}

/// No retries: the test must see exactly which calls were answered.
fn config(addr: &str, token: &str) -> ClientConfig {
    let mut config = ClientConfig::new(addr, token);
    config.max_attempts = 1;
    config.request_timeout = Duration::from_secs(2);
    config
}

async fn client(addr: &str, token: &str) -> Client {
    Client::connect(config(addr, token)).await.expect("connect")
}

/// One worker's load until the connection dies (the kill) or `ops` are done.
async fn worker(addr: String, seed: u64, ledger: Arc<Mutex<Ledger>>, round: u64, ops: usize) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let Ok(client) = Client::connect(config(&addr, CHECKOUT)).await else {
        return;
    };
    for i in 0..ops {
        let pick = rng.gen_range(0..10);
        let candidate = {
            let ledger = ledger.lock();
            let held: Vec<u128> =
                ledger.acked.iter().filter(|(_, v)| matches!(v.3, Known::Held { .. })).map(|(id, _)| *id).collect();
            (!held.is_empty()).then(|| held[rng.gen_range(0..held.len())])
        };
        match (pick, candidate) {
            (0..=5, _) | (_, None) => {
                let id = (u128::from(round) << 96) | (u128::from(seed) << 32) | i as u128 | 1;
                let (sku, user, qty) = (rng.gen_range(1..=SKUS), rng.gen_range(0..1000), rng.gen_range(1..=2));
                match client.reserve(sku, user, qty, id).await {
                    Ok(o) if o.status == Status::Reserved => {
                        ledger.lock().acked.insert(id, (sku, user, qty, Known::Held { expires_at_ms: o.detail }));
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            (6..=7, Some(id)) => {
                {
                    let mut l = ledger.lock();
                    let sku = l.acked[&id].0;
                    l.uncertain_confirms.insert(id, sku);
                }
                match client.confirm(id, format!("pay-{id:x}").as_bytes()).await {
                    Ok(o) if o.status == Status::Confirmed => {
                        let mut l = ledger.lock();
                        l.uncertain_confirms.remove(&id);
                        let entry = l.acked.get_mut(&id).unwrap();
                        if let Known::Held { expires_at_ms } = entry.3 {
                            entry.3 = Known::Confirmed { expires_at_ms, at_ms: o.detail };
                        }
                    }
                    // Another worker released it concurrently.
                    Ok(o) if o.status == Status::AlreadyReleased => {
                        ledger.lock().uncertain_confirms.remove(&id);
                    }
                    Ok(o) => panic!("confirm of held {id:x}: {o:?}"),
                    Err(_) => return,
                }
            }
            (_, Some(id)) => match client.release(id).await {
                Ok(o) if o.status == Status::Released => {
                    let mut l = ledger.lock();
                    let entry = l.acked.get_mut(&id).unwrap();
                    if let Known::Held { expires_at_ms } = entry.3 {
                        entry.3 = Known::Released { expires_at_ms };
                    }
                }
                // Another worker confirmed it concurrently.
                Ok(o) if o.status == Status::AlreadyConfirmed => {}
                Ok(o) => panic!("release of held {id:x}: {o:?}"),
                Err(_) => return,
            },
        }
    }
}

async fn audit(addr: &str, ledger: &Ledger, seed: u64, round: u64) {
    let client = client(addr, CHECKOUT).await;
    let ctx = format!("seed {seed} round {round}");
    for (&id, &(sku, user, qty, known)) in &ledger.acked {
        let expires_at_ms = match known {
            Known::Held { expires_at_ms } | Known::Released { expires_at_ms } => expires_at_ms,
            Known::Confirmed { expires_at_ms, .. } => expires_at_ms,
        };
        let again = client.reserve(sku, user, qty, id).await.expect("audit reserve");
        assert_eq!(
            (again.status, again.detail),
            (Status::Reserved, expires_at_ms),
            "{ctx}: acknowledged reservation {id:x} lost or changed"
        );
        match known {
            Known::Confirmed { at_ms, .. } => {
                let o = client.confirm(id, format!("pay-{id:x}").as_bytes()).await.unwrap();
                assert_eq!((o.status, o.detail), (Status::Confirmed, at_ms), "{ctx}: acknowledged confirm {id:x} lost");
            }
            Known::Released { .. } => {
                let o = client.release(id).await.unwrap();
                assert_eq!(o.status, Status::Released, "{ctx}: acknowledged release {id:x} lost");
            }
            Known::Held { .. } => {}
        }
    }
    for sku in 1..=SKUS {
        let s = client.status(sku).await.unwrap().sale;
        assert_eq!(s.available + s.reserved + s.sold, s.total, "{ctx}: sku {sku} invariant");
        assert_eq!(s.total, STOCK, "{ctx}: sku {sku} total changed");
        let acked_sold: u64 = ledger
            .acked
            .values()
            .filter(|v| v.0 == sku && matches!(v.3, Known::Confirmed { .. }))
            .map(|v| u64::from(v.2))
            .sum();
        let maybe_sold: u64 = ledger
            .uncertain_confirms
            .iter()
            .filter(|(_, s)| **s == sku)
            .map(|(id, _)| u64::from(ledger.acked[id].2))
            .sum();
        assert!(
            s.sold >= acked_sold && s.sold <= acked_sold + maybe_sold,
            "{ctx}: sku {sku} sold {} not within acked {acked_sold} + uncertain {maybe_sold}",
            s.sold
        );
    }
}

/// After the audit, fold what the server now says about uncertain confirms
/// back into the ledger (they are settled one way or the other).
async fn settle_uncertain(addr: &str, ledger: &mut Ledger) {
    let client = client(addr, CHECKOUT).await;
    let uncertain: Vec<u128> = ledger.uncertain_confirms.keys().copied().collect();
    for id in uncertain {
        let o = client.confirm(id, format!("pay-{id:x}").as_bytes()).await.unwrap();
        let entry = ledger.acked.get_mut(&id).unwrap();
        if let (Status::Confirmed, Known::Held { expires_at_ms }) = (o.status, entry.3) {
            entry.3 = Known::Confirmed { expires_at_ms, at_ms: o.detail };
        }
        ledger.uncertain_confirms.remove(&id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_reservation() {
    let seed = common::seed();
    let rounds: u64 = std::env::var("STAMPEDE_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let dir = TempDir::new("crash");
    let mut server = ServerProcess::start(&dir.0, &[]);
    let admin = client(&server.addr, ADMIN).await;
    for sku in 1..=SKUS {
        let sale =
            SaleCreate { sku, stock: STOCK, limit_per_user: LIMIT, ttl_ms: 3_600_000, hot: sku == 1, queue: None };
        assert_eq!(admin.create_sale(sale).await.unwrap().status, Status::Ok);
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..rounds {
        let tasks: Vec<_> = (0..WORKERS)
            .map(|w| tokio::spawn(worker(server.addr.clone(), seed ^ (round * 100 + w), ledger.clone(), round, 400)))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..300))).await;
        server.kill();
        for task in tasks {
            task.await.unwrap();
        }
        server = ServerProcess::start(&dir.0, &[]);
        let mut snapshot = std::mem::take(&mut *ledger.lock());
        audit(&server.addr, &snapshot, seed, round).await;
        settle_uncertain(&server.addr, &mut snapshot).await;
        *ledger.lock() = snapshot;
        eprintln!("round {round}: {} acknowledged reservations audited", ledger.lock().acked.len());
    }
    // A clean shutdown writes a snapshot; recovery from it audits clean too.
    assert!(server.terminate().success(), "SIGTERM exits 0");
    let server = ServerProcess::start(&dir.0, &[]);
    let final_ledger = std::mem::take(&mut *ledger.lock());
    audit(&server.addr, &final_ledger, seed, rounds).await;
    assert!(std::fs::read_dir(&dir.0).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("snap-")));
}

#[test]
fn a_failing_fsync_is_fatal_for_the_process() {
    let dir = TempDir::new("fsync-fatal");
    let mut server = ServerProcess::start(&dir.0, &["--fail-fsync-after", "3"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let acked = runtime.block_on(async {
        let admin = client(&server.addr, ADMIN).await;
        let sale = SaleCreate { sku: 1, stock: 10, limit_per_user: 10, ttl_ms: 60_000, hot: false, queue: None };
        assert_eq!(admin.create_sale(sale).await.unwrap().status, Status::Ok);
        let checkout = client(&server.addr, CHECKOUT).await;
        let mut acked = 0;
        for user in 0..6u64 {
            if let Ok(o) = checkout.reserve(1, user, 1, u128::from(user) + 1).await {
                assert_eq!(o.status, Status::Reserved);
                acked += 1;
            }
        }
        acked
    });
    assert_eq!(acked, 2, "only reserves whose fsync succeeded are acknowledged");
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(70), "exits non-zero after a failed fsync");
}

#[test]
fn a_reservation_that_expires_while_the_server_is_down_is_released_and_logged() {
    use stampede::engine::Event;
    use stampede::wal::segment::{list_segments, scan_segment};

    let dir = TempDir::new("expire-down");
    let mut server = ServerProcess::start(&dir.0, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let held = runtime.block_on(async {
        let admin = client(&server.addr, ADMIN).await;
        let sale = SaleCreate { sku: 9, stock: 3, limit_per_user: 3, ttl_ms: 400, hot: true, queue: None };
        assert_eq!(admin.create_sale(sale).await.unwrap().status, Status::Ok);
        let checkout = client(&server.addr, CHECKOUT).await;
        assert_eq!(checkout.reserve(9, 1, 1, 1).await.unwrap().status, Status::Reserved);
        let held = checkout.reserve(9, 1, 1, 2).await.unwrap();
        assert_eq!(held.status, Status::Reserved);
        assert_eq!(checkout.confirm(1, b"paid").await.unwrap().status, Status::Confirmed);
        held
    });
    server.kill();
    std::thread::sleep(Duration::from_millis(600));
    let server = ServerProcess::start(&dir.0, &[]);
    runtime.block_on(async {
        let checkout = client(&server.addr, CHECKOUT).await;
        // Recovery released the lapsed hold; the sold unit stayed sold.
        let s = checkout.status(9).await.unwrap().sale;
        assert_eq!((s.total, s.available, s.reserved, s.sold), (3, 2, 0, 1));
        let late = checkout.confirm(2, b"too-late").await.unwrap();
        assert_eq!((late.status, late.detail), (Status::Expired, held.detail));
    });
    // ... and the release is in the log, as an EXPIRED record after the restart.
    let mut expired = Vec::new();
    let mut buf = Vec::new();
    let segments = list_segments(&dir.0).unwrap();
    let mut expect = segments[0].0;
    for (_, path) in &segments {
        let scan = scan_segment(path, expect, 0, &mut buf, |_, event| {
            if let Event::Expired { reservation_id, .. } = event {
                expired.push(reservation_id);
            }
        })
        .unwrap();
        expect = scan.last_lsn + 1;
    }
    assert_eq!(expired, vec![2], "exactly the lapsed hold was logged as expired");
}
