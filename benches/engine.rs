//! Engine benchmarks (one shard core, no network):
//! - `reserve_1m_users`: 1M reservations on one hot SKU by 1M distinct
//!   users, from an empty engine. Target: >= 5M decisions/s.
//! - `reserve_10k_users`: the same with 10k users, whose tables fit in
//!   cache: the CPU cost of a decision without the memory misses.
//! - `stampede_1m_users_10k_stock`: 1M distinct users, 10k units, every
//!   decision made by the engine (10k reserved, 990k sold out).
//! - `sold_out_answer`: the connection-side fast path on a sold-out SKU
//!   (gauge read + idempotency-directory probe). Target: >= 50M/s.
//! - `limit_exceeded`: a decision that reaches the shard and is refused.
//! - `reserve_at_1m_users_{1,8}_locations`: 1M users reserve one unit each
//!   with RESERVE_AT, giving their region (1..=8, by user), from a sale
//!   with one location or eight (125k units each, every region ordering
//!   all eight from its nearest); as warehouses empty, later shoppers are
//!   served further down their region's order. Target: 8 locations cost
//!   at most 1.2x one.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use stampede::engine::{Engine, Event, ReservationDirectory};
use stampede::server::conn::fast_refusal;
use stampede_protocol::message::{Reserve, SaleCreate, SaleLocations, Where};
use stampede_protocol::Status;

/// mimalloc: the engine allocates and frees many small records; glibc's
/// allocator spent a quarter of replay time consolidating free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: u64 = 1_000_000;

/// Requests a shard decides per cycle in these benchmarks (a server's cycle
/// is up to `SHARD_CYCLE_OPS_MAX`; 4096 is what a busy one sees).
const CYCLE: usize = 4096;

fn hot_sale(engine: &mut Engine, stock: u64) {
    let create = SaleCreate { sku: 42, stock, limit_per_user: 1, ttl_ms: 600_000, hot: true, queue: None };
    assert_eq!(engine.create_sale(&create, 0, &mut Vec::new()).status, Status::Ok);
}

fn reserve_users(c: &mut Criterion) {
    // As stampede-server runs (see stampede::memory).
    stampede::memory::disable_transparent_huge_pages();
    reserve_n_users(c, "reserve_1m_users", USERS);
    reserve_n_users(c, "reserve_10k_users", 10_000);
    stampede_1m_users(c);
    reserve_at_locations(c, 1);
    reserve_at_locations(c, 8);
}

/// A hot sale of `USERS` units over `locations` locations (ids 1..), with
/// regions 1..=8 each ordering every location from region r's nearest.
fn located_sale(engine: &mut Engine, locations: u16) {
    let create = SaleCreate { sku: 42, stock: USERS, limit_per_user: 1, ttl_ms: 600_000, hot: true, queue: None };
    let each = USERS / u64::from(locations);
    let spec = SaleLocations {
        locations: (1..=locations).map(|id| (id, each)).collect(),
        regions: if locations == 1 {
            Vec::new()
        } else {
            (1..=8u16).map(|r| (r, (0..locations).map(|k| (r - 1 + k) % locations + 1).collect())).collect()
        },
    };
    assert_eq!(engine.create_sale_at(&create, Some(&spec), 0, &mut Vec::new()).status, Status::Ok);
}

/// 1M users reserve with their region, decided as a shard decides a
/// connection's operations (prefetching `RESERVE_PREFETCH_AHEAD` ahead).
fn reserve_at_locations(c: &mut Criterion, locations: u16) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(USERS));
    group.bench_function(format!("reserve_at_1m_users_{locations}_locations"), |b| {
        b.iter_batched(
            || {
                let mut engine = Engine::new(Arc::new(ReservationDirectory::for_server()));
                located_sale(&mut engine, locations);
                (engine, Vec::with_capacity(4096))
            },
            |(mut engine, mut events)| {
                let mut won = 0u64;
                let mut ops = Vec::with_capacity(CYCLE);
                for first in (0..USERS).step_by(CYCLE) {
                    ops.clear();
                    ops.extend((first..USERS.min(first + CYCLE as u64)).map(|user| {
                        let op = Reserve { sku: 42, user, qty: 1, reservation_id: u128::from(user) + 1 };
                        (op, Where::Region((user % 8) as u16 + 1))
                    }));
                    let ahead = stampede::engine::RESERVE_PREFETCH_AHEAD;
                    for (op, _) in ops.iter().take(ahead) {
                        engine.prefetch_reserve(op);
                    }
                    for (i, (op, at)) in ops.iter().enumerate() {
                        if let Some((next, _)) = ops.get(i + ahead) {
                            engine.prefetch_reserve(next);
                        }
                        won += u64::from(engine.reserve_at(op, at, 1, &mut events).status == Status::Reserved);
                    }
                    events.clear();
                }
                assert_eq!(won, USERS);
                (engine, events)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// Users `0..users` each reserve one unit of SKU 42 (id = user + 1),
/// decided as a shard does: each cycle of `CYCLE` requests as one
/// prefetching run, its events then handed off. Returns the units reserved.
fn reserve_in_cycles(engine: &mut Engine, users: u64, events: &mut Vec<Event>) -> u64 {
    let mut won = 0u64;
    let mut ops = Vec::with_capacity(CYCLE);
    for first in (0..users).step_by(CYCLE) {
        ops.clear();
        ops.extend((first..users.min(first + CYCLE as u64)).map(|user| Reserve {
            sku: 42,
            user,
            qty: 1,
            reservation_id: u128::from(user) + 1,
        }));
        engine.reserve_run(&ops, |op| op, 1, events, |_, outcome| won += u64::from(outcome.status == Status::Reserved));
        events.clear();
    }
    won
}

/// The stampede shape decided entirely by the shard (no connection fast
/// path): 1M distinct users each try once for one of 10k units on a hot
/// SKU; 10k win, the rest are refused `sold_out` by the engine.
fn stampede_1m_users(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(USERS));
    group.bench_function("stampede_1m_users_10k_stock", |b| {
        b.iter_batched(
            || {
                let mut engine = Engine::new(Arc::new(ReservationDirectory::for_server()));
                hot_sale(&mut engine, 10_000);
                (engine, Vec::with_capacity(4096))
            },
            |(mut engine, mut events)| {
                let won = reserve_in_cycles(&mut engine, USERS, &mut events);
                assert_eq!(won, 10_000);
                (engine, events)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// `users` distinct users each reserve one unit, from an empty engine.
fn reserve_n_users(c: &mut Criterion, name: &str, users: u64) {
    let mut group = c.benchmark_group("engine");
    if users >= USERS {
        group.sample_size(10);
    }
    group.throughput(Throughput::Elements(users));
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                // A server sizes its directory for a large drop; the small
                // case gets a table of its own size, so it stays in cache.
                let directory = if users >= USERS {
                    ReservationDirectory::for_server()
                } else {
                    ReservationDirectory::with_capacity(2 * users as usize)
                };
                let mut engine = Engine::new(Arc::new(directory));
                hot_sale(&mut engine, users);
                (engine, Vec::with_capacity(4096))
            },
            |(mut engine, mut events)| {
                let won = reserve_in_cycles(&mut engine, users, &mut events);
                debug_assert_eq!(won, users);
                (engine, events)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn refusals(c: &mut Criterion) {
    stampede::memory::disable_transparent_huge_pages();
    let mut group = c.benchmark_group("engine");
    // A sold-out sale whose directory holds the ids of its 10k winners.
    let directory = Arc::new(ReservationDirectory::for_server());
    let mut engine = Engine::new(directory.clone());
    hot_sale(&mut engine, 10_000);
    let mut events = Vec::new();
    for user in 0..10_000u64 {
        let op = Reserve { sku: 42, user, qty: 1, reservation_id: u128::from(user) + 1 };
        assert_eq!(engine.reserve(&op, 1, &mut events).status, Status::Reserved);
    }
    let gauge = engine.gauge(42).unwrap();
    assert_eq!(gauge.available(), 0);

    const N: u64 = 1000;
    let losers: Vec<Reserve> = (0..N)
        .map(|i| Reserve { sku: 42, user: 1_000_000 + i, qty: 1, reservation_id: 0xdead_0000 + u128::from(i) })
        .collect();
    group.throughput(Throughput::Elements(N));
    group.bench_function("sold_out_answer", |b| {
        b.iter(|| {
            for op in &losers {
                let refusal = fast_refusal(&gauge, &directory, black_box(op));
                debug_assert_eq!(refusal.map(|o| o.status), Some(Status::SoldOut));
                black_box(refusal);
            }
        })
    });

    // Restock so requests reach the engine, then refuse on the user limit.
    engine.restock(42, 1_000_000, 1, &mut events).status.eq(&Status::Ok).then_some(()).expect("restock");
    let repeaters: Vec<Reserve> =
        (0..N).map(|i| Reserve { sku: 42, user: i, qty: 1, reservation_id: 0xbeef_0000 + u128::from(i) }).collect();
    group.bench_function("limit_exceeded", |b| {
        b.iter(|| {
            for op in &repeaters {
                let outcome = engine.reserve(black_box(op), 1, &mut events);
                debug_assert_eq!(outcome.status, Status::LimitExceeded);
                black_box(outcome);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, reserve_users, refusals);
criterion_main!(benches);
