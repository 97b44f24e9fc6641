//! Stock in several locations (issue 20), against a real server on
//! 127.0.0.1: the last-unit race between two warehouses, preferences and
//! regions, per-user limits across locations, the admin calls, and a
//! restart (the log and a snapshot bring every location back).
//!
//! Seeds are printed; `STAMPEDE_SEED` replays one.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{seed, start_server, TestServer};
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use stampede_protocol::message::{LocationStatus, SaleCreate, SaleLocations, Where};
use stampede_protocol::Status;

/// Acknowledged reservations: id -> (user, location, qty).
type Acked = HashMap<u128, (u64, u16, u32)>;

fn sale(sku: u64, stock: u64, limit: u32) -> SaleCreate {
    SaleCreate { sku, stock, limit_per_user: limit, ttl_ms: 60_000, hot: false, queue: None }
}

async fn create_at(server: &TestServer, sku: u64, locations: Vec<(u16, u64)>, regions: Vec<(u16, Vec<u16>)>) {
    let stock = locations.iter().map(|(_, s)| s).sum();
    let outcome = server
        .admin()
        .await
        .create_sale_at(sale(sku, stock, 4), SaleLocations { locations, regions })
        .await
        .expect("answered");
    assert_eq!(outcome.status, Status::Ok, "creating sale {sku} with locations");
}

/// `(location, total, available, reserved, sold)` of each location.
async fn counters(server: &TestServer, sku: u64) -> Vec<(u16, u64, u64, u64, u64)> {
    let reply = server.admin().await.locations(sku).await.expect("LOCATIONS answered");
    assert_eq!(reply.status, Status::Ok);
    reply.locations.iter().map(|l: &LocationStatus| (l.location, l.total, l.available, l.reserved, l.sold)).collect()
}

/// Two warehouses hold one unit each; 200 buyers, each preferring the two
/// in a random order (or giving a region, or nothing), all at once. Exactly
/// two win, one per warehouse; everyone else is told `sold_out`; each
/// winner's answer names the warehouse its unit is in. Seeded rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_unit_of_two_warehouses_goes_to_exactly_two_buyers() {
    let server = start_server().await;
    let base = seed();
    for round in 0..10u64 {
        let seed = base.wrapping_add(round);
        let sku = 100 + round;
        create_at(&server, sku, vec![(1, 1), (2, 1)], vec![(10, vec![2, 1]), (20, vec![1])]).await;
        let client = server.checkout(8).await;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let buyers: Vec<(u64, Where)> = (0..200u64)
            .map(|user| {
                let at = match rng.gen_range(0..4) {
                    0 => Where::locations(&[1, 2]),
                    1 => Where::locations(&[2, 1]),
                    2 => Where::Region(10),
                    _ => Where::Default,
                };
                (user, at)
            })
            .collect();
        let wins: Arc<Mutex<Vec<(u64, u16)>>> = Default::default();
        let mut tasks = Vec::new();
        for (user, at) in buyers {
            let (client, wins) = (client.clone(), wins.clone());
            tasks.push(tokio::spawn(async move {
                let id = (u128::from(sku) << 64) | u128::from(user) | 1 << 100;
                let outcome = client.reserve_at(sku, user, 1, id, at).await.expect("answered");
                match outcome.status {
                    Status::Reserved => wins.lock().push((user, outcome.location)),
                    Status::SoldOut => {}
                    other => panic!("seed {seed}: user {user} got {other:?}"),
                }
            }));
        }
        for task in tasks {
            task.await.expect("buyer task");
        }
        let mut wins = wins.lock().clone();
        wins.sort_by_key(|(_, location)| *location);
        let places: Vec<u16> = wins.iter().map(|(_, l)| *l).collect();
        assert_eq!(places, vec![1, 2], "seed {seed}: winners {wins:?}");
        assert_eq!(counters(&server, sku).await, vec![(1, 1, 0, 1, 0), (2, 1, 0, 1, 0)], "seed {seed}");
    }
}

/// Preferences, regions and the default order each pick the first
/// location with all the units; a retry answers the original location;
/// a reservation is never split; the limit counts every location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_take_the_first_location_that_has_the_units() {
    let server = start_server().await;
    create_at(&server, 7, vec![(1, 2), (2, 5), (3, 1)], vec![(9, vec![3, 2])]).await;
    let client = server.checkout(1).await;
    // Preferences: 3 has 1 unit, so 2 units come from 2.
    let a = client.reserve_at(7, 1, 2, 11, Where::locations(&[3, 2])).await.unwrap();
    assert_eq!((a.status, a.location), (Status::Reserved, 2));
    // The retry, with other preferences, answers the original.
    let again = client.reserve_at(7, 1, 2, 11, Where::locations(&[1])).await.unwrap();
    assert_eq!((again.status, again.location, again.detail), (Status::Reserved, 2, a.detail));
    // Region 9 -> [3, 2]: 1 unit from 3.
    let b = client.reserve_at(7, 2, 1, 12, Where::Region(9)).await.unwrap();
    assert_eq!((b.status, b.location), (Status::Reserved, 3));
    // Only 3 listed, now empty: sold out there, though 2 and 1 have units.
    let c = client.reserve_at(7, 3, 1, 13, Where::locations(&[3])).await.unwrap();
    assert_eq!(c.status, Status::SoldOut);
    // 4 units: no single location has them (1 has 2, 2 has 3): never split.
    let d = client.reserve_at(7, 3, 4, 14, Where::Default).await.unwrap();
    assert_eq!(d.status, Status::InsufficientStock);
    // An unknown location id.
    let e = client.reserve_at(7, 3, 1, 15, Where::locations(&[1, 8])).await.unwrap();
    assert_eq!(e.status, Status::UnknownLocation);
    // An unmapped region uses the default order: location 1 first.
    let f = client.reserve_at(7, 3, 1, 16, Where::Region(77)).await.unwrap();
    assert_eq!((f.status, f.location), (Status::Reserved, 1));
    // Plain RESERVE: the default order (1 has one left).
    let g = client.reserve(7, 4, 1, 17).await.unwrap();
    assert_eq!(g.status, Status::Reserved);
    // The limit (4) counts units at every location: user 1 holds 2 at
    // location 2; 3 more anywhere is over it.
    let h = client.reserve_at(7, 1, 3, 18, Where::locations(&[2])).await.unwrap();
    assert_eq!(h.status, Status::LimitExceeded);
    assert_eq!(counters(&server, 7).await, vec![(1, 2, 0, 2, 0), (2, 5, 3, 2, 0), (3, 1, 0, 1, 0)]);
    // CONFIRM and RELEASE act on the reservation's location.
    assert_eq!(client.confirm(11, b"pay").await.unwrap().status, Status::Confirmed);
    assert_eq!(client.release(12).await.unwrap().status, Status::Released);
    assert_eq!(counters(&server, 7).await, vec![(1, 2, 0, 2, 0), (2, 5, 3, 0, 2), (3, 1, 1, 0, 0)]);
    // STATUS: the sums.
    let status = client.status(7).await.unwrap().sale;
    assert_eq!((status.total, status.available, status.reserved, status.sold), (8, 4, 2, 2));
}

/// The admin calls: restock a location, add one, map a region; and their
/// refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locations_are_restocked_added_and_mapped() {
    let server = start_server().await;
    let admin = server.admin().await;
    create_at(&server, 8, vec![(1, 0), (2, 0)], Vec::new()).await;
    let client = server.checkout(1).await;
    assert_eq!(client.reserve_at(8, 1, 1, 21, Where::Default).await.unwrap().status, Status::SoldOut);
    let restocked = admin.restock_at(8, 2, 3).await.unwrap();
    assert_eq!((restocked.status, restocked.detail), (Status::Ok, 3));
    assert_eq!(admin.restock_at(8, 9, 3).await.unwrap().status, Status::UnknownLocation);
    let added = admin.add_location(8, 5, 10).await.unwrap();
    assert_eq!((added.status, added.detail), (Status::Ok, 13));
    assert_eq!(admin.add_location(8, 5, 10).await.unwrap().status, Status::LocationExists);
    assert_eq!(admin.set_region(8, 4, &[5, 2]).await.unwrap().status, Status::Ok);
    assert_eq!(admin.set_region(8, 4, &[6]).await.unwrap().status, Status::UnknownLocation);
    assert_eq!(admin.set_region(8, 0, &[5]).await.unwrap().status, Status::InvalidArgument);
    let r = client.reserve_at(8, 1, 1, 22, Where::Region(4)).await.unwrap();
    assert_eq!((r.status, r.location), (Status::Reserved, 5));
    // Plain RESTOCK goes to the first location.
    let plain = admin.restock(8, 2).await.unwrap();
    assert_eq!((plain.status, plain.detail), (Status::Ok, 15));
    let reply = admin.locations(8).await.unwrap();
    assert_eq!(reply.regions, vec![(4, vec![5, 2])]);
    assert_eq!(
        reply.locations.iter().map(|l| (l.location, l.total, l.available)).collect::<Vec<_>>(),
        vec![(1, 2, 2), (2, 3, 3), (5, 10, 9)]
    );
    // Creation refusals: stock that does not add up, repeated ids, a region
    // naming a location the sale lacks.
    let bad = |locations: Vec<(u16, u64)>, stock: u64, regions: Vec<(u16, Vec<u16>)>| {
        let admin = admin.clone();
        async move { admin.create_sale_at(sale(9, stock, 1), SaleLocations { locations, regions }).await.unwrap().status }
    };
    assert_eq!(bad(vec![(1, 2), (2, 2)], 5, Vec::new()).await, Status::InvalidArgument);
    assert_eq!(bad(vec![(1, 2), (1, 2)], 4, Vec::new()).await, Status::InvalidArgument);
    assert_eq!(bad(vec![(1, 2)], 2, vec![(3, vec![4])]).await, Status::UnknownLocation);
    // A sale made the old way has one location, id 0.
    server.create_sale(10, 5, 1, 60_000, false).await;
    assert_eq!(counters(&server, 10).await, vec![(0, 5, 5, 0, 0)]);
    let r = client.reserve_at(10, 1, 1, 23, Where::locations(&[0])).await.unwrap();
    assert_eq!((r.status, r.location), (Status::Reserved, 0));
}

/// Many buyers with random preferences over three warehouses, seeded, and
/// every answer audited: the units a location handed out never exceed its
/// stock, each location's counters equal its acknowledged reservations,
/// and no buyer holds more than the limit across locations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_buyers_never_oversell_any_location() {
    let server = start_server().await;
    let seed = seed();
    let stock = [(1u16, 40u64), (2, 25), (3, 10)];
    create_at(&server, 30, stock.to_vec(), vec![(1, vec![3, 1]), (2, vec![2])]).await;
    let client = server.checkout(4).await;
    let acked: Arc<Mutex<Acked>> = Default::default();
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let (client, acked) = (client.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ worker);
            for i in 0..60u64 {
                let user = rng.gen_range(0..30u64);
                let qty = rng.gen_range(1..=3u32);
                let mut ids = vec![1u16, 2, 3];
                ids.shuffle(&mut rng);
                ids.truncate(rng.gen_range(1..=3));
                let at = match rng.gen_range(0..3) {
                    0 => Where::locations(&ids),
                    1 => Where::Region(rng.gen_range(1..=3)),
                    _ => Where::Default,
                };
                let id = u128::from(worker) << 32 | u128::from(i) | 1 << 90;
                let outcome = client.reserve_at(30, user, qty, id, at).await.expect("answered");
                match outcome.status {
                    Status::Reserved => {
                        assert!(matches!(outcome.location, 1..=3), "seed {seed}: location {}", outcome.location);
                        if let Where::Locations { .. } = at {
                            assert!(at.list().contains(&outcome.location), "seed {seed}: not a preferred location");
                        }
                        acked.lock().insert(id, (user, outcome.location, qty));
                    }
                    Status::SoldOut | Status::InsufficientStock | Status::LimitExceeded => {}
                    other => panic!("seed {seed}: {other:?}"),
                }
                // Some go back, so units move between buyers.
                if rng.gen_bool(0.2) {
                    let back = acked.lock().keys().next().copied();
                    if let Some(back) = back {
                        let _ = client.release(back).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    // Released ones are out; what is held is what the server says.
    let mut held: HashMap<u16, u64> = HashMap::new();
    let mut per_user: HashMap<u64, u64> = HashMap::new();
    let acked = acked.lock().clone();
    for (id, (user, location, qty)) in acked.iter() {
        let confirm = client.confirm(*id, b"p").await.unwrap();
        if confirm.status == Status::Confirmed {
            *held.entry(*location).or_default() += u64::from(*qty);
            *per_user.entry(*user).or_default() += u64::from(*qty);
        } else {
            assert_eq!(confirm.status, Status::AlreadyReleased, "seed {seed}");
        }
    }
    let got = counters(&server, 30).await;
    for (location, total, available, reserved, sold) in got {
        let want_total = stock.iter().find(|(l, _)| *l == location).unwrap().1;
        let sold_here = held.get(&location).copied().unwrap_or(0);
        assert_eq!((total, reserved, sold), (want_total, 0, sold_here), "seed {seed}: location {location}");
        assert_eq!(available + sold, total, "seed {seed}: location {location}");
    }
    assert!(per_user.values().all(|&units| units <= 4), "seed {seed}: a user over the limit");
}

/// Every location's counters, regions and reservations come back after
/// kill -9 (the log replayed) and after a clean stop (the snapshot it
/// writes, then the log): the acknowledged state, exactly, at each start.
#[test]
fn locations_survive_kill_9_and_a_snapshot() {
    use common::process::{ServerProcess, TempDir, ADMIN, CHECKOUT};
    use stampede_protocol::client::{Client, ClientConfig};
    let seed = seed();
    let dir = TempDir::new("locations-restart");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let flags = ["--shards", "2", "--user-reserve-rate", "0"];
    let mut server = ServerProcess::start(&dir.0, &flags);
    let connect = |addr: String, token: &'static str| async move {
        Client::connect(ClientConfig::new(&addr, token)).await.expect("connects")
    };
    let snapshot = |addr: String| async move {
        let admin = connect(addr, ADMIN).await;
        let mut out = Vec::new();
        for sku in [40u64, 41] {
            out.push(admin.locations(sku).await.expect("LOCATIONS"));
        }
        out
    };
    let (before, held) = runtime.block_on(async {
        let admin = connect(server.addr.clone(), ADMIN).await;
        let locations = SaleLocations { locations: vec![(1, 30), (2, 20), (7, 5)], regions: vec![(3, vec![7, 2])] };
        assert_eq!(admin.create_sale_at(sale(40, 55, 6), locations).await.unwrap().status, Status::Ok);
        admin.create_sale(sale(41, 10, 6)).await.unwrap();
        let client = connect(server.addr.clone(), CHECKOUT).await;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut held = Vec::new();
        for i in 0..120u64 {
            let at = match rng.gen_range(0..3) {
                0 => Where::Region(3),
                1 => Where::locations(&[2, 1]),
                _ => Where::Default,
            };
            let id = u128::from(i) + 1;
            let sku = if i % 5 == 0 { 41 } else { 40 };
            let (user, qty) = (i % 17, rng.gen_range(1..=2));
            let outcome = client.reserve_at(sku, user, qty, id, at).await.unwrap();
            if outcome.status == Status::Reserved {
                held.push((id, sku, user, qty, outcome.location, outcome.detail));
                match rng.gen_range(0..3) {
                    0 => assert_eq!(client.confirm(id, b"p").await.unwrap().status, Status::Confirmed),
                    1 => assert_eq!(client.release(id).await.unwrap().status, Status::Released),
                    _ => {}
                }
            }
        }
        assert_eq!(admin.restock_at(40, 7, 4).await.unwrap().status, Status::Ok);
        assert_eq!(admin.add_location(40, 9, 3).await.unwrap().status, Status::Ok);
        assert_eq!(admin.set_region(40, 5, &[9, 1]).await.unwrap().status, Status::Ok);
        (snapshot(server.addr.clone()).await, held)
    });
    assert!(held.len() > 20, "seed {seed}: too few reservations ({})", held.len());
    for stop in ["kill -9", "clean stop"] {
        if stop == "kill -9" {
            server.kill();
        } else {
            assert!(server.terminate().success());
        }
        server = ServerProcess::start(&dir.0, &flags);
        runtime.block_on(async {
            assert_eq!(snapshot(server.addr.clone()).await, before, "seed {seed}: after {stop}");
            // Each acknowledged reservation answers its retry at its location.
            let client = connect(server.addr.clone(), CHECKOUT).await;
            let status = client.status(40).await.unwrap().sale;
            assert_eq!(status.available + status.reserved + status.sold, status.total);
            for &(id, sku, user, qty, location, expiry) in &held {
                let again = client.reserve_at(sku, user, qty, id, Where::Default).await.unwrap();
                assert_eq!(
                    (again.status, again.location, again.detail),
                    (Status::Reserved, location, expiry),
                    "seed {seed}: the retry of {id} after {stop}"
                );
            }
        });
    }
}
