//! The virtual queue: fairness, rate and cap, lapses, sold-out drain and
//! restarts. Engine tests drive a simulated clock (every tick is explicit,
//! so the rate can be checked to the user); the last tests use a real
//! server on 127.0.0.1, and a real kill -9.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use stampede::engine::queue::shuffle;
use stampede::engine::{Engine, Event, ReservationDirectory};
use stampede_protocol::message::{QueueConfig, QueueTicket, Reserve, SaleCreate};
use stampede_protocol::Status;

const SKU: u64 = 42;
const TICK_MS: u64 = 10;

fn engine() -> Engine {
    Engine::new(Arc::new(ReservationDirectory::with_capacity(1 << 16)))
}

fn queued_sale(engine: &mut Engine, stock: u64, queue: QueueConfig, events: &mut Vec<Event>) {
    let create = SaleCreate { sku: SKU, stock, limit_per_user: 1, ttl_ms: 600_000, hot: false, queue: Some(queue) };
    assert_eq!(engine.create_sale(&create, 1_000, events).status, Status::Ok);
}

/// Run the queue clock from `from` to `to` (inclusive) in ticks; returns
/// the users admitted, in order.
fn run_ticks(engine: &mut Engine, from: u64, to: u64, seed: u64, events: &mut Vec<Event>) -> Vec<u64> {
    let mut admitted = Vec::new();
    let mut now = from;
    while now <= to {
        let start = events.len();
        engine.queue_tick(now, &mut || seed, events);
        admitted.extend(events[start..].iter().filter_map(|e| match e {
            Event::Admitted { user, .. } => Some(*user),
            _ => None,
        }));
        now += TICK_MS;
    }
    admitted
}

/// The documented shuffle, pinned: another implementation (an auditor's
/// script) must produce exactly this permutation for this seed.
#[test]
fn the_start_shuffle_is_fixed_forever() {
    let mut order: Vec<u32> = (0..10).collect();
    shuffle(&mut order, 42);
    // Computed independently (a 10-line Python SplitMix64 + Fisher-Yates).
    assert_eq!(order, vec![0, 9, 5, 8, 6, 4, 7, 2, 1, 3]);
    let mut empty: Vec<u32> = Vec::new();
    shuffle(&mut empty, 1);
    let mut one = vec![7];
    shuffle(&mut one, 1);
    assert_eq!(one, vec![7]);
}

#[test]
fn pre_start_joiners_go_first_in_the_logged_shuffle_order_then_strict_fifo() {
    let seed = common::seed();
    let mut engine = engine();
    let mut events = Vec::new();
    let start_at_ms = 10_000;
    queued_sale(
        &mut engine,
        1_000_000,
        QueueConfig { admit_rate_per_s: 1_000, admit_cap: 0, admission_ms: 60_000, start_at_ms },
        &mut events,
    );
    // 500 people join before the start, in a scrambled order, many twice.
    let mut rng_state = seed;
    let mut pre: Vec<u64> = (1..=500).collect();
    shuffle(&mut pre, seed);
    for (i, &user) in pre.iter().enumerate() {
        let t = engine.join(SKU, user, 2_000 + i as u64, &mut events);
        assert_eq!(t.status, Status::Waiting);
        assert!(t.pre_start && t.position == 0, "before the start no one has a position: {t:?}");
        if stampede::engine::queue::splitmix64(&mut rng_state).is_multiple_of(3) {
            let again = engine.join(SKU, user, 3_000 + i as u64, &mut events);
            assert_eq!(again, engine.poll(SKU, user, 3_000 + i as u64), "joining again is the same ticket");
        }
    }
    let joins = events.iter().filter(|e| matches!(e, Event::QueueJoined { .. })).count();
    assert_eq!(joins, 500, "one ticket per user, however often they join");

    // The start: the seed goes into the log.
    let start_seed = seed ^ 0x5eed;
    run_ticks(&mut engine, start_at_ms, start_at_ms, start_seed, &mut events);
    let logged_seed = events
        .iter()
        .find_map(|e| match e {
            Event::QueueStarted { seed, .. } => Some(*seed),
            _ => None,
        })
        .expect("QUEUE_STARTED logged");
    assert_eq!(logged_seed, start_seed);

    // 500 more join after the start, one by one: strictly first come.
    let post: Vec<u64> = (1_001..=1_500).collect();
    let mut last_position = 0;
    for (i, &user) in post.iter().enumerate() {
        let t = engine.join(SKU, user, start_at_ms + 1 + i as u64, &mut events);
        assert_eq!(t.status, Status::Waiting);
        assert!(t.position > last_position, "later joiners stand behind earlier ones");
        last_position = t.position;
    }

    // Admit everyone, watching every position at every tick.
    let everyone: Vec<u64> = pre.iter().chain(&post).copied().collect();
    let mut positions: HashMap<u64, u64> = HashMap::new();
    let mut admitted = Vec::new();
    let mut now = start_at_ms + TICK_MS;
    while admitted.len() < everyone.len() {
        admitted.extend(run_ticks(&mut engine, now, now, start_seed, &mut events));
        for &user in &everyone {
            let t = engine.poll(SKU, user, now);
            if t.status == Status::Waiting {
                let before = positions.insert(user, t.position).unwrap_or(u64::MAX);
                assert!(
                    t.position <= before,
                    "user {user}'s position went up from {before} to {} (seed {seed})",
                    t.position
                );
            }
        }
        now += TICK_MS;
        assert!(now < start_at_ms + 10_000, "admission stalled (seed {seed})");
    }
    // Pre-start joiners in the order the logged seed gives, then FIFO.
    let mut expected_pre = pre.clone();
    shuffle(&mut expected_pre, logged_seed);
    let expected: Vec<u64> = expected_pre.into_iter().chain(post).collect();
    assert_eq!(admitted, expected, "admission order (seed {seed})");
    let unique: HashSet<u64> = admitted.iter().copied().collect();
    assert_eq!(unique.len(), admitted.len(), "someone was admitted twice");
}

#[test]
fn admission_keeps_to_the_rate_and_the_cap_within_one_percent() {
    // Rate: 5000/s for 10 s of ticks, an endless line, no cap.
    let mut engine = engine();
    let mut events = Vec::new();
    queued_sale(
        &mut engine,
        1 << 40,
        QueueConfig { admit_rate_per_s: 5_000, admit_cap: 0, admission_ms: 3_600_000, start_at_ms: 0 },
        &mut events,
    );
    for user in 0..100_000 {
        engine.join(SKU, user, 1_000, &mut events);
    }
    run_ticks(&mut engine, 1_000, 1_000, 1, &mut events); // the start
    let admitted = run_ticks(&mut engine, 1_010, 11_000, 1, &mut events);
    let expected = 5_000 * 10;
    assert!(
        (admitted.len() as f64 - expected as f64).abs() <= expected as f64 * 0.01,
        "{} admitted in 10 s at 5000/s",
        admitted.len()
    );
    // And second by second, too.
    let mut per_second = [0u64; 10];
    for e in &events {
        if let Event::Admitted { at_ms, .. } = e {
            if (1_010..11_000).contains(at_ms) {
                per_second[((at_ms - 1_010) / 1_000) as usize] += 1;
            }
        }
    }
    for (second, n) in per_second.iter().enumerate() {
        assert!((*n as f64 - 5_000.0).abs() <= 50.0, "second {second}: {n} admitted");
    }

    // Cap: 100 outstanding admissions at most, and the cap is reached.
    let mut engine = self::engine();
    let mut events = Vec::new();
    queued_sale(
        &mut engine,
        1 << 40,
        QueueConfig { admit_rate_per_s: 10_000, admit_cap: 100, admission_ms: 3_600_000, start_at_ms: 0 },
        &mut events,
    );
    for user in 0..10_000 {
        engine.join(SKU, user, 1_000, &mut events);
    }
    let admitted = run_ticks(&mut engine, 1_000, 3_000, 1, &mut events);
    assert_eq!(admitted.len(), 100, "exactly the cap is outstanding");
    let stats = engine.status(SKU, 3_000).sale.queue.unwrap();
    assert_eq!((stats.admitted_outstanding, stats.waiting), (100, 9_900));

    // The cap follows the stock: 20 units, no configured cap.
    let mut engine = self::engine();
    let mut events = Vec::new();
    queued_sale(
        &mut engine,
        20,
        QueueConfig { admit_rate_per_s: 10_000, admit_cap: 0, admission_ms: 3_600_000, start_at_ms: 0 },
        &mut events,
    );
    for user in 0..1_000 {
        engine.join(SKU, user, 1_000, &mut events);
    }
    assert_eq!(run_ticks(&mut engine, 1_000, 2_000, 1, &mut events).len(), 20);
}

fn reserve(engine: &mut Engine, user: u64, now: u64, events: &mut Vec<Event>) -> Status {
    let op = Reserve { sku: SKU, user, qty: 1, reservation_id: u128::from(user) + 1 };
    engine.reserve(&op, now, events).status
}

/// Stock comes before admission (PROTOCOL.md §6.2, rule 6q): a user who
/// was never admitted hears `sold_out` / `insufficient_stock` when that is
/// the truth, exactly as the connection's fast path answers from the
/// published counters, and `not_admitted` only while units remain.
#[test]
fn a_user_not_admitted_hears_sold_out_first_as_on_the_fast_path() {
    let mut engine = engine();
    let mut events = Vec::new();
    let queue = QueueConfig { admit_rate_per_s: 1_000, admit_cap: 1, admission_ms: 500, start_at_ms: 0 };
    queued_sale(&mut engine, 1, queue, &mut events);
    for user in 0..3 {
        engine.join(SKU, user, 1_000, &mut events);
    }
    // The cap (1, and never more than the units) admits user 0 only.
    assert_eq!(run_ticks(&mut engine, 1_000, 1_100, 1, &mut events), vec![0]);
    let two = Reserve { sku: SKU, user: 2, qty: 2, reservation_id: 99 };
    assert_eq!(engine.reserve(&two, 1_100, &mut events).status, Status::InsufficientStock, "asks for 2 of 1");
    assert_eq!(reserve(&mut engine, 2, 1_100, &mut events), Status::NotAdmitted, "a unit remains");
    assert_eq!(reserve(&mut engine, 0, 1_100, &mut events), Status::Reserved);
    assert_eq!(reserve(&mut engine, 2, 1_100, &mut events), Status::SoldOut, "nothing left to queue for");
}

#[test]
fn reserving_needs_an_admission_and_lapsed_ones_pass_to_the_next_user() {
    let mut engine = engine();
    let mut events = Vec::new();
    queued_sale(
        &mut engine,
        1_000,
        QueueConfig { admit_rate_per_s: 1_000, admit_cap: 10, admission_ms: 500, start_at_ms: 0 },
        &mut events,
    );
    for user in 0..30 {
        engine.join(SKU, user, 1_000, &mut events);
    }
    assert_eq!(reserve(&mut engine, 0, 1_000, &mut events), Status::NotAdmitted, "before admission");
    let first = run_ticks(&mut engine, 1_000, 1_100, 1, &mut events);
    assert_eq!(first, (0..10).collect::<Vec<_>>());
    assert_eq!(reserve(&mut engine, 10, 1_100, &mut events), Status::NotAdmitted, "still waiting");
    // User 0 buys: the admission is used and frees a place under the cap.
    assert_eq!(reserve(&mut engine, 0, 1_100, &mut events), Status::Reserved);
    assert_eq!(run_ticks(&mut engine, 1_110, 1_110, 1, &mut events), vec![10]);
    // Users 1..=9 do nothing: their admissions lapse at 1_000 + 500 ...
    let t = engine.poll(SKU, 1, 1_400);
    assert_eq!(t.status, Status::Admitted);
    assert_eq!(reserve(&mut engine, 1, 1_600, &mut events), Status::NotAdmitted, "the window closed");
    // (and user 10's, admitted at 1_110, at 1_610).
    let next = run_ticks(&mut engine, 1_600, 1_700, 1, &mut events);
    assert_eq!(next, (11..=20).collect::<Vec<_>>(), "the lapsed places pass to the next in line");
    let lapses = events.iter().filter(|e| matches!(e, Event::AdmissionLapsed { .. })).count();
    assert_eq!(lapses, 10);
    assert_eq!(engine.poll(SKU, 1, 1_700).status, Status::Expired);
    // Joining again after a lapse is a new place at the back.
    let again = engine.join(SKU, 1, 1_700, &mut events);
    assert_eq!((again.status, again.position), (Status::Waiting, 10), "behind users 21..=29");
    // The buyer may reserve again within the window (limit permitting: 1 here).
    assert_eq!(reserve(&mut engine, 0, 1_200, &mut events), Status::Reserved, "a retry answers the original");
}

#[test]
fn a_sold_out_sale_drains_the_queue_but_not_while_holds_may_return() {
    let mut engine = engine();
    let mut events = Vec::new();
    queued_sale(
        &mut engine,
        2,
        QueueConfig { admit_rate_per_s: 1_000, admit_cap: 0, admission_ms: 60_000, start_at_ms: 0 },
        &mut events,
    );
    for user in 0..10 {
        engine.join(SKU, user, 1_000, &mut events);
    }
    assert_eq!(run_ticks(&mut engine, 1_000, 1_100, 1, &mut events), vec![0, 1]);
    assert_eq!(reserve(&mut engine, 0, 1_100, &mut events), Status::Reserved);
    assert_eq!(reserve(&mut engine, 1, 1_100, &mut events), Status::Reserved);
    // Nothing available, two holds that may expire: keep waiting, told so.
    let t: QueueTicket = engine.poll(SKU, 5, 1_200);
    assert_eq!((t.status, t.stock_pending), (Status::Waiting, true));
    // User 1 gives up (release), user 0 pays: a unit is back, user 2 is admitted.
    assert_eq!(engine.release(SKU, 2, 1_300, &mut events).status, Status::Released);
    assert_eq!(run_ticks(&mut engine, 1_300, 1_300, 1, &mut events), vec![2]);
    assert_eq!(engine.confirm(SKU, 1, &bytes::Bytes::from_static(b"p"), 1_300, &mut events).status, Status::Confirmed);
    assert_eq!(reserve(&mut engine, 2, 1_310, &mut events), Status::Reserved);
    assert_eq!(engine.confirm(SKU, 3, &bytes::Bytes::from_static(b"p"), 1_320, &mut events).status, Status::Confirmed);
    // Sold out for good: everyone waiting hears it at once; new joiners too.
    for user in 3..10 {
        assert_eq!(engine.poll(SKU, user, 1_330).status, Status::SoldOut, "user {user}");
    }
    assert_eq!(engine.join(SKU, 99, 1_330, &mut events).status, Status::SoldOut);
    assert!(run_ticks(&mut engine, 1_330, 2_000, 1, &mut events).is_empty());
}

/// The queue is rebuilt exactly from the log (replay) and from a snapshot
/// image: same positions, and admission continues in the same order.
#[test]
fn replay_and_snapshots_keep_everyone_in_place() {
    let mut engine = engine();
    let mut events = Vec::new();
    queued_sale(
        &mut engine,
        1_000,
        QueueConfig { admit_rate_per_s: 100, admit_cap: 5, admission_ms: 300, start_at_ms: 5_000 },
        &mut events,
    );
    for user in 0..200 {
        engine.join(SKU, user * 7 % 200, 1_000 + user, &mut events);
    }
    run_ticks(&mut engine, 5_000, 5_600, 9, &mut events);
    for user in 200..260 {
        engine.join(SKU, user, 5_600, &mut events);
    }
    let buyer = (0..200).find(|&u| engine.poll(SKU, u, 5_600).status == Status::Admitted).expect("someone admitted");
    assert_eq!(reserve(&mut engine, buyer, 5_600, &mut events), Status::Reserved);
    run_ticks(&mut engine, 5_610, 6_500, 9, &mut events);

    let mut replayed = self::engine();
    for e in &events {
        replayed.apply(e);
    }
    let mut imported = self::engine();
    for image in engine.export() {
        imported.import(image).expect("a consistent image");
    }
    assert_eq!(replayed.digest(), engine.digest());
    assert_eq!(imported.digest(), engine.digest());
    for user in 0..260 {
        let t = engine.poll(SKU, user, 6_500);
        assert_eq!(replayed.poll(SKU, user, 6_500), t, "replay, user {user}");
        assert_eq!(imported.poll(SKU, user, 6_500), t, "snapshot, user {user}");
    }
    // All three go on admitting the same users.
    let a = run_ticks(&mut engine, 6_510, 8_000, 9, &mut Vec::new());
    let b = run_ticks(&mut replayed, 6_510, 8_000, 9, &mut Vec::new());
    let c = run_ticks(&mut imported, 6_510, 8_000, 9, &mut Vec::new());
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_eq!(a, c);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ticket_per_user_across_connections_and_reserve_needs_admission() {
    let server = common::start_server().await;
    let admin = server.admin().await;
    let later =
        QueueConfig { admit_rate_per_s: 100, admit_cap: 0, admission_ms: 60_000, start_at_ms: now_ms() + 60_000 };
    let sale = SaleCreate { sku: 1, stock: 100, limit_per_user: 1, ttl_ms: 600_000, hot: false, queue: Some(later) };
    assert_eq!(admin.create_sale(sale).await.unwrap().status, Status::Ok);
    let open = QueueConfig { admit_rate_per_s: 1_000, admit_cap: 0, admission_ms: 60_000, start_at_ms: 0 };
    let sale = SaleCreate { sku: 2, stock: 100, limit_per_user: 1, ttl_ms: 600_000, hot: true, queue: Some(open) };
    assert_eq!(admin.create_sale(sale).await.unwrap().status, Status::Ok);

    // Three connections of one shopper: one ticket.
    let clients = [server.checkout(1).await, server.checkout(1).await, server.checkout(1).await];
    let tickets = futures_util::future::join_all(clients.iter().map(|c| c.join(1, 7))).await;
    for t in &tickets {
        let t = t.as_ref().unwrap();
        assert_eq!((t.status, t.pre_start), (Status::Waiting, true));
    }
    let status = admin.status(1).await.unwrap().sale.queue.expect("queue figures in STATUS");
    assert_eq!((status.waiting, status.admit_rate_per_s, status.admitted_total), (1, 100, 0));
    let reserve = clients[0].reserve(1, 7, 1, 70).await.unwrap();
    assert_eq!(reserve.status, Status::NotAdmitted, "a queued sale sells only to admitted users");
    assert_eq!(clients[1].poll(1, 8).await.unwrap().status, Status::NoTicket);

    // An open queue admits within a few ticks; then the reserve goes through.
    let joined = clients[0].join(2, 7).await.unwrap();
    assert!(matches!(joined.status, Status::Waiting | Status::Admitted), "{joined:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let t = clients[1].poll(2, 7).await.unwrap();
        if t.status == Status::Admitted {
            assert!(t.admitted_until_ms > now_ms());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never admitted: {t:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(clients[2].reserve(2, 7, 1, 71).await.unwrap().status, Status::Reserved);
    // A sale without a queue admits everyone.
    server.create_sale(3, 10, 1, 600_000, false).await;
    assert_eq!(clients[0].join(3, 7).await.unwrap().status, Status::Admitted);
}

/// kill -9 mid-queue (after the start's shuffle): everyone keeps their
/// place, and the order is the one the logged seed gave.
#[test]
fn a_restart_mid_queue_keeps_the_order() {
    use common::process::{ServerProcess, TempDir, ADMIN, CHECKOUT};
    use stampede_protocol::client::{Client, ClientConfig};
    let dir = TempDir::new("queue-restart");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut server = ServerProcess::start(&dir.0, &[]);
    let users: Vec<u64> = (100..160).collect();
    let positions_before = runtime.block_on(async {
        let admin = Client::connect(ClientConfig::new(&server.addr, ADMIN)).await.unwrap();
        // One admission at a time, never used: the line stands still.
        let queue =
            QueueConfig { admit_rate_per_s: 50, admit_cap: 1, admission_ms: 600_000, start_at_ms: now_ms() + 800 };
        let sale =
            SaleCreate { sku: 5, stock: 1_000, limit_per_user: 1, ttl_ms: 600_000, hot: false, queue: Some(queue) };
        assert_eq!(admin.create_sale(sale).await.unwrap().status, Status::Ok);
        let shopper = Client::connect(ClientConfig::new(&server.addr, CHECKOUT)).await.unwrap();
        for &user in &users {
            assert!(shopper.join(5, user).await.unwrap().pre_start);
        }
        tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
        let mut positions = HashMap::new();
        for &user in &users {
            let t = shopper.poll(5, user).await.unwrap();
            positions.insert(user, (t.status, t.position));
        }
        positions
    });
    let admitted = positions_before.values().filter(|(s, _)| *s == Status::Admitted).count();
    assert_eq!(admitted, 1, "the cap admits one: {positions_before:?}");
    server.kill();
    let server = ServerProcess::start(&dir.0, &[]);
    runtime.block_on(async {
        let shopper = Client::connect(ClientConfig::new(&server.addr, CHECKOUT)).await.unwrap();
        for &user in &users {
            let t = shopper.poll(5, user).await.unwrap();
            assert_eq!((t.status, t.position), positions_before[&user], "user {user} after kill -9");
        }
    });
}

/// A used admission ends at its deadline (POLL says so, JOIN is a new
/// place), a pause stops the admission clock, and a retried SALE_CREATE
/// completes a queue whose record a crash tore off.
#[test]
fn admissions_end_pause_and_torn_creation_are_handled() {
    let mut engine = engine();
    let mut events = Vec::new();
    let queue = QueueConfig { admit_rate_per_s: 1_000, admit_cap: 0, admission_ms: 500, start_at_ms: 0 };
    queued_sale(&mut engine, 100, queue, &mut events);
    for user in 0..3 {
        engine.join(SKU, user, 1_000, &mut events);
    }
    assert_eq!(run_ticks(&mut engine, 1_000, 1_010, 1, &mut events), vec![0, 1, 2]);
    // User 0 buys, and after the window is over is done with this admission.
    assert_eq!(reserve(&mut engine, 0, 1_100, &mut events), Status::Reserved);
    assert_eq!(engine.poll(SKU, 0, 1_200).status, Status::Admitted);
    assert_eq!(engine.poll(SKU, 0, 1_600).status, Status::Expired);
    assert_eq!(engine.join(SKU, 0, 1_600, &mut events).status, Status::Waiting, "a new place in line");

    // A pause from 1_100 to 2_100 stops users 1 and 2's clocks (deadline
    // 1_500 moves to 2_500): nobody lapses, and they can buy after it.
    assert_eq!(engine.set_paused(SKU, true, 1_100, &mut events).status, Status::Ok);
    run_ticks(&mut engine, 1_110, 2_090, 1, &mut events);
    assert!(!events.iter().any(|e| matches!(e, Event::AdmissionLapsed { .. })), "no lapse during a pause");
    assert_eq!(engine.set_paused(SKU, false, 2_100, &mut events).status, Status::Ok);
    run_ticks(&mut engine, 2_100, 2_200, 1, &mut events);
    assert_eq!(reserve(&mut engine, 1, 2_400, &mut events), Status::Reserved, "the window moved out by the pause");
    let mut replayed = self::engine();
    for e in &events {
        replayed.apply(e);
    }
    assert_eq!(replayed.digest(), engine.digest());

    // Torn creation: SALE_CREATED survived a crash, QUEUE_CONFIGURED did not.
    let mut torn = self::engine();
    let created = Event::SaleCreated { sku: 7, stock: 10, limit_per_user: 1, ttl_ms: 600_000, hot: false, at_ms: 1 };
    torn.apply(&created);
    let retry = SaleCreate { sku: 7, stock: 10, limit_per_user: 1, ttl_ms: 600_000, hot: false, queue: Some(queue) };
    let mut retry_events = Vec::new();
    assert_eq!(torn.create_sale(&retry, 2, &mut retry_events).status, Status::Ok, "the retry completes it");
    assert!(matches!(retry_events.as_slice(), [Event::QueueConfigured { sku: 7, .. }]));
    assert!(torn.status(7, 3).sale.queue.is_some());
    assert_eq!(torn.create_sale(&retry, 3, &mut Vec::new()).status, Status::SaleExists, "once complete: exists");
}
