//! Moving live sales between shards (issue 19): SALE_MOVE under load, the
//! demand monitor's own moves, and kill -9 in the middle of moves.
//!
//! Every test audits against what the server acknowledged: each
//! acknowledged reservation is still there (a retried RESERVE answers
//! `reserved` with the original expiry), the counters equal what was
//! acknowledged (or, after a crash, lie between the acknowledged and the
//! acknowledged plus what was in flight), and `available + reserved +
//! sold == total`. Seeds are printed; `STAMPEDE_SEED` replays one.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{ServerProcess, TempDir, ADMIN, CHECKOUT};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::SaleCreate;
use stampede_protocol::Status;

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Held,
    Confirmed,
    Released,
    /// A confirm or release whose answer a crash lost: its units may be
    /// held, sold or back.
    Unknown,
}

/// A reservation the server acknowledged: (sku, user, qty, expiry, state).
type Acked = HashMap<u128, (u64, u64, u32, u64, State)>;

/// One worker's bounded run of reserves, confirms and releases, mostly on
/// `hot_sku`; what was acknowledged goes to `acked`. Calls whose answer
/// never came (a crash) go to `uncertain` by SKU and units.
#[allow(clippy::too_many_arguments)]
async fn worker(
    client: Client,
    seed: u64,
    skus: &[u64],
    hot_sku: u64,
    ops: usize,
    acked: Arc<Mutex<Acked>>,
    uncertain: Arc<Mutex<HashMap<u64, u64>>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut mine: Vec<u128> = Vec::new();
    for _ in 0..ops {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let settle = !mine.is_empty() && rng.gen_bool(0.3);
        if settle {
            let id = mine.swap_remove(rng.gen_range(0..mine.len()));
            let confirm = rng.gen_bool(0.6);
            let (sku, ..) = acked.lock()[&id];
            let answer = if confirm { client.confirm(id, b"paid").await } else { client.release(id).await };
            match answer {
                Ok(o) if o.status == Status::Confirmed || o.status == Status::Released => {
                    let mut acked = acked.lock();
                    let entry = acked.get_mut(&id).expect("mine");
                    entry.4 = if confirm { State::Confirmed } else { State::Released };
                }
                Ok(o) => panic!("settling {id:#x} of sku {sku}: {o:?}"),
                Err(_) => {
                    acked.lock().get_mut(&id).expect("mine").4 = State::Unknown;
                    return;
                }
            }
            continue;
        }
        let sku = if rng.gen_bool(0.8) { hot_sku } else { skus[rng.gen_range(0..skus.len())] };
        let user = rng.gen_range(1..=5_000u64);
        let qty = rng.gen_range(1..=2u32);
        let id: u128 = rng.gen::<u128>() | 1;
        match client.reserve(sku, user, qty, id).await {
            Ok(o) if o.status == Status::Reserved => {
                acked.lock().insert(id, (sku, user, qty, o.detail, State::Held));
                mine.push(id);
            }
            Ok(o) => assert!(
                matches!(o.status, Status::LimitExceeded | Status::SoldOut | Status::InsufficientStock),
                "reserve on sku {sku}: {o:?}"
            ),
            Err(_) => {
                *uncertain.lock().entry(sku).or_default() += u64::from(qty);
                return;
            }
        }
    }
}

/// STATUS of `sku`, which must exist (a `busy` answer, all zeros, is asked again).
async fn sale_of(client: &Client, sku: u64) -> stampede_protocol::message::SaleStatus {
    loop {
        let reply = client.status(sku).await.expect("status answered");
        match reply.status {
            Status::Ok => return reply.sale,
            Status::Busy => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("STATUS of sku {sku}: {other}"),
        }
    }
}

/// Every acknowledged reservation answers a retried RESERVE with its
/// original expiry; per SKU, the counters add up and lie within what was
/// acknowledged plus `slack` units (calls a crash left unanswered).
async fn audit(client: &Client, acked: &Acked, skus: &[u64], slack: &HashMap<u64, u64>, exact: bool) {
    for (&id, &(sku, user, qty, expires, _)) in acked {
        let o = client.reserve(sku, user, qty, id).await.expect("retry answered");
        assert_eq!((o.status, o.detail), (Status::Reserved, expires), "acknowledged reservation {id:#x} of sku {sku}");
    }
    for &sku in skus {
        let s = sale_of(client, sku).await;
        assert_eq!(s.available + s.reserved + s.sold, s.total, "sku {sku}: {s:?}");
        let (mut held, mut sold, mut unknown) = (0u64, 0u64, 0u64);
        for &(_, _, qty, _, state) in acked.values().filter(|a| a.0 == sku) {
            match state {
                State::Held => held += u64::from(qty),
                State::Confirmed => sold += u64::from(qty),
                State::Released => {}
                State::Unknown => unknown += u64::from(qty),
            }
        }
        let slack = slack.get(&sku).copied().unwrap_or(0) + unknown;
        if exact {
            assert_eq!((s.reserved, s.sold), (held, sold), "sku {sku}: counters against the acknowledgements");
        } else {
            assert!(
                s.reserved + s.sold >= held + sold,
                "sku {sku}: {s:?} lost acknowledged units ({held} held, {sold} sold)"
            );
            assert!(
                s.reserved + s.sold <= held + sold + slack,
                "sku {sku}: {s:?} holds more than acknowledged ({held} + {sold}) plus in flight ({slack})"
            );
        }
    }
}

/// Moves back and forth at random moments while 12 workers reserve,
/// confirm and release: every request decided once, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_under_load_decide_every_request_exactly_once() {
    let seed = common::seed();
    let server = common::start_server_with(|c| {
        c.user_rate = None;
        c.placement.auto = false;
    })
    .await;
    let skus = [11u64, 12, 13];
    for &sku in &skus {
        server.create_sale(sku, 3_000, 4, 600_000, false).await;
    }
    // Sold out from the start: it moves too, and every buyer hears
    // sold_out throughout (the gauge moves with the sale).
    server.create_sale(14, 0, 1, 600_000, false).await;
    let moving = Arc::new(AtomicBool::new(true));
    let sold_out_checker = {
        let client = server.checkout(1).await;
        let moving = moving.clone();
        tokio::spawn(async move {
            let mut asked = 0u64;
            while moving.load(Ordering::Relaxed) {
                asked += 1;
                let o = client.reserve(14, asked, 1, u128::from(asked) << 64).await.expect("answered");
                assert_eq!(o.status, Status::SoldOut, "request {asked} for the sold-out sku during moves");
            }
            asked
        })
    };
    let acked = Arc::new(Mutex::new(Acked::new()));
    let uncertain = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..12u64 {
        let client = server.checkout(1).await;
        let (acked, uncertain, stop) = (acked.clone(), uncertain.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { worker(client, seed ^ w, &skus, 11, 600, acked, uncertain, stop).await }));
    }
    let admin = server.admin().await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut moved = 0;
    for i in 0..40 {
        tokio::time::sleep(Duration::from_micros(rng.gen_range(0..4_000))).await;
        let sku = match i % 4 {
            3 => 12,
            1 => 14,
            _ => 11,
        };
        let dedicated = !sale_of(&admin, sku).await.hot;
        let o = admin.move_sale(sku, dedicated).await.expect("move answered");
        assert_eq!(o.status, Status::Ok, "move {i} of sku {sku}");
        let s = sale_of(&admin, sku).await;
        assert_eq!((s.hot, s.pinned), (dedicated, true), "sku {sku} after move {i}");
        moved += 1;
    }
    moving.store(false, Ordering::Relaxed);
    let asked = sold_out_checker.await.expect("sold-out checker");
    assert!(asked > 10, "the sold-out sku was asked only {asked} times");
    for task in tasks {
        task.await.expect("worker");
    }
    assert!(uncertain.lock().is_empty(), "no call may go unanswered without a crash");
    let acked = acked.lock().clone();
    assert!(acked.len() > 1_000, "the load reserved too little to test anything: {}", acked.len());
    audit(&admin, &acked, &skus, &HashMap::new(), true).await;
    let placement = &server.handle.shared.router().expect("router").placement;
    assert_eq!(placement.admin_moves.load(Ordering::Relaxed), moved);
    assert_eq!(placement.moves.load(Ordering::Relaxed), moved, "each move moved the sale");
    eprintln!(
        "{} reservations audited over {moved} moves; requests held at most {} us",
        acked.len(),
        placement.move_held_us_max.load(Ordering::Relaxed)
    );
}

/// The server's own monitor: a sale that turns hot gets a shard of its
/// own within a few intervals; once it cools it goes back to the pool.
/// A pinned sale (moved by an admin) stays where it was put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_that_turns_hot_is_promoted_and_goes_back_when_it_cools() {
    let seed = common::seed();
    let server = common::start_server_with(|c| {
        c.user_rate = None;
        c.placement.promote_ops_per_s = 2_000;
        c.placement.demote_ops_per_s = 200;
        c.placement.demote_after = Duration::from_millis(1_500);
        c.placement.dedicated_max = 2;
        c.placement.interval = Duration::from_millis(100);
    })
    .await;
    let skus = [21u64, 22, 23];
    for &sku in &skus {
        server.create_sale(sku, 1_000_000, 1_000, 600_000, false).await;
    }
    let admin = server.admin().await;
    // Pinned to the pool by an admin: never promoted, however hot.
    assert_eq!(admin.move_sale(23, false).await.unwrap().status, Status::Ok);
    let acked = Arc::new(Mutex::new(Acked::new()));
    let uncertain = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = |hot: u64| {
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let (acked, uncertain, stop) = (acked.clone(), uncertain.clone(), stop.clone());
            let addr = server.addr.clone();
            tasks.push(tokio::spawn(async move {
                let client = Client::connect(ClientConfig::new(&addr, common::CHECKOUT_TOKEN)).await.unwrap();
                worker(client, seed ^ (hot << 8) ^ w, &[hot], hot, 200_000, acked, uncertain, stop).await
            }));
        }
        tasks
    };
    let started = Instant::now();
    let mut tasks = load(21);
    tasks.extend(load(23));
    let promoted_after = loop {
        if sale_of(&admin, 21).await.hot {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "sku 21 was never promoted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let s = sale_of(&admin, 21).await;
    assert!(s.hot && !s.pinned, "promoted by the monitor, not pinned: {s:?}");
    // PLACEMENT shows it, with its demand, beside the pinned one.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let p = admin.placement().await.unwrap();
    assert_eq!((p.status, p.dedicated_shards, p.dedicated_max, p.auto), (Status::Ok, 1, 2, true), "{p:?}");
    let of = |sku: u64| p.sales.iter().find(|s| s.sku == sku).copied();
    let hot = of(21).expect("the hot sale is listed");
    assert!(hot.dedicated && !hot.pinned && hot.decided_per_s > 0, "{p:?}");
    let pinned = of(23).expect("the pinned sale is listed");
    assert!(!pinned.dedicated && pinned.pinned && pinned.decided_per_s > 0, "{p:?}");
    // Keep it hot a little longer: it stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sale_of(&admin, 21).await.hot, "demoted while still hot");
    assert!(!sale_of(&admin, 23).await.hot, "a sale pinned to the pool was promoted");
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let cooled = Instant::now();
    let demoted_after = loop {
        if !sale_of(&admin, 21).await.hot {
            break cooled.elapsed();
        }
        assert!(cooled.elapsed() < Duration::from_secs(20), "sku 21 never went back to the pool");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let placement = &server.handle.shared.router().unwrap().placement;
    // The monitor counts a move once its admin answer is back (after the
    // log), a moment after STATUS shows the new placement.
    let counted = Instant::now();
    while placement.demotions.load(Ordering::Relaxed) == 0 {
        assert!(counted.elapsed() < Duration::from_secs(5), "the demotion was never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(placement.promotions.load(Ordering::Relaxed) >= 1);
    assert_eq!(server.handle.shared.router().unwrap().dedicated_shards(), 0, "the core was given back");
    let acked = acked.lock().clone();
    audit(&admin, &acked, &skus, &HashMap::new(), true).await;
    eprintln!(
        "promoted {promoted_after:?} after the load began, demoted {demoted_after:?} after it stopped; {} reservations audited",
        acked.len()
    );
}

/// kill -9 while sales move under load, restart, audit; again, for
/// `STAMPEDE_MOVE_ROUNDS` rounds (default 6). An acknowledged move is
/// where recovery puts the sale; one in flight at the kill may or may not
/// have happened.
#[test]
fn kill_9_in_the_middle_of_moves_loses_nothing_and_keeps_the_placement() {
    let seed = common::seed();
    let rounds: u64 = std::env::var("STAMPEDE_MOVE_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let dir = TempDir::new("placement-crash");
    let logs = TempDir::new("placement-crash-log");
    let log = logs.0.join("server.log");
    let flags = ["--shards", "2", "--user-reserve-rate", "0"];
    let skus = [31u64, 32];
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let acked = Arc::new(Mutex::new(Acked::new()));
    let mut slack: HashMap<u64, u64> = HashMap::new();
    // (placement acknowledged last, a move in flight at the kill)
    let mut expected: HashMap<u64, (bool, bool)> = HashMap::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for round in 0..rounds {
        let mut server = ServerProcess::start_logged(&dir.0, &flags, &log);
        let addr = server.addr.clone();
        let kill_after = Duration::from_millis(rng.gen_range(20..400));
        let round_seed = rng.gen::<u64>();
        let (acked2, expected2) = (acked.clone(), expected.clone());
        let uncertain = runtime.block_on(async {
            let admin = Client::connect(client_config(&addr, ADMIN)).await.expect("admin connects");
            if round == 0 {
                for &sku in &skus {
                    let create =
                        SaleCreate { sku, stock: 50_000, limit_per_user: 4, ttl_ms: 600_000, hot: false, queue: None };
                    assert_eq!(admin.create_sale(create).await.unwrap().status, Status::Ok);
                }
            }
            // Recovery put every sale where its last acknowledged move did.
            for (&sku, &(dedicated, in_flight)) in &expected2 {
                let s = sale_of(&admin, sku).await;
                assert!(
                    s.hot == dedicated || in_flight,
                    "round {round}: sku {sku} recovered {} but its last acknowledged move put it {}",
                    if s.hot { "dedicated" } else { "in the pool" },
                    if dedicated { "dedicated" } else { "in the pool" },
                );
            }
            let uncertain = Arc::new(Mutex::new(HashMap::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            for w in 0..6u64 {
                let client = Client::connect(client_config(&addr, CHECKOUT)).await.expect("checkout connects");
                let (acked, uncertain, stop) = (acked2.clone(), uncertain.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    worker(client, round_seed ^ w, &skus, 31, 1_000_000, acked, uncertain, stop).await
                }));
            }
            // Move back and forth until the kill.
            let mover = tokio::spawn(async move {
                let mut placed: HashMap<u64, (bool, bool)> = HashMap::new();
                let mut i = 0u64;
                loop {
                    let sku = skus[(i % 3 == 2) as usize];
                    i += 1;
                    let Ok(status) = admin.status(sku).await else { break };
                    let dedicated = !status.sale.hot;
                    placed.insert(sku, (status.sale.hot, true));
                    match admin.move_sale(sku, dedicated).await {
                        Ok(o) if o.status == Status::Ok => {
                            placed.insert(sku, (dedicated, false));
                        }
                        Ok(o) => panic!("move of sku {sku}: {o:?}"),
                        Err(_) => break,
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                placed
            });
            tokio::time::sleep(kill_after).await;
            server.kill();
            stop.store(true, Ordering::Relaxed);
            for task in tasks {
                task.await.expect("worker");
            }
            let placed = mover.await.expect("mover");
            let unanswered = uncertain.lock().clone();
            (unanswered, placed)
        });
        let (unanswered, placed) = uncertain;
        for (sku, units) in unanswered {
            *slack.entry(sku).or_default() += units;
        }
        expected.extend(placed);
        eprintln!("round {round}: killed after {kill_after:?}; {} acknowledged so far", acked.lock().len());
    }
    let server = ServerProcess::start_logged(&dir.0, &flags, &log);
    runtime.block_on(async {
        let admin = Client::connect(client_config(&server.addr, ADMIN)).await.unwrap();
        let acked = acked.lock().clone();
        assert!(acked.len() > 100, "too little load to test anything: {}", acked.len());
        audit(&admin, &acked, &skus, &slack, false).await;
        for (&sku, &(dedicated, in_flight)) in &expected {
            let s = sale_of(&admin, sku).await;
            assert!(s.hot == dedicated || in_flight, "sku {sku}: recovered hot={} expected {dedicated}", s.hot);
        }
        eprintln!("{} acknowledged reservations audited after {rounds} kills", acked.len());
    });
}

/// No retries: the audit must see exactly which calls were answered.
fn client_config(addr: &str, token: &str) -> ClientConfig {
    let mut config = ClientConfig::new(addr, token);
    config.max_attempts = 1;
    config.request_timeout = Duration::from_secs(5);
    config
}
