//! Virtual queue benchmarks (one shard core, no network):
//! - `queue_join_1m`: 1M distinct users join one sale's queue, from empty.
//!   Target: >= 1M joins/s.
//! - `queue_poll_1m` / `queue_poll_10k`: a position lookup in a line of 1M
//!   (and of 10k) users: the same cost at both sizes is the O(1) claim.
//! - `queue_start_shuffle_1m`: the start of a sale with 1M pre-queued users
//!   (shuffle + placing them in line). Target: < 100 ms.
//!
//! (The memory budget, 1M waiting users in <= 64 MB, is measured by
//! `cargo test --release --test memory`.)

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use stampede::engine::{Engine, Event, ReservationDirectory};
use stampede_protocol::message::{QueueConfig, SaleCreate};
use stampede_protocol::Status;

/// The allocator the server uses (see src/bin/stampede-server.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: u64 = 1_000_000;
const SKU: u64 = 42;

fn queued_engine(start_at_ms: u64) -> Engine {
    let mut engine = Engine::new(Arc::new(ReservationDirectory::with_capacity(1024)));
    let queue = QueueConfig { admit_rate_per_s: 1_000, admit_cap: 0, admission_ms: 120_000, start_at_ms };
    let create =
        SaleCreate { sku: SKU, stock: 1_000, limit_per_user: 1, ttl_ms: 600_000, hot: true, queue: Some(queue) };
    assert_eq!(engine.create_sale(&create, 1, &mut Vec::new()).status, Status::Ok);
    engine
}

/// `users` distinct users join, events handed off every 4096 as a shard does.
fn fill(engine: &mut Engine, users: u64, events: &mut Vec<Event>) {
    for i in 0..users {
        let ticket = engine.join(SKU, i.wrapping_mul(0x9e37_79b9_7f4a_7c15), 2, events);
        debug_assert_eq!(ticket.status, Status::Waiting);
        if events.len() == 4096 {
            events.clear();
        }
    }
}

fn joins(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(USERS));
    group.bench_function("queue_join_1m", |b| {
        b.iter_batched(
            || (queued_engine(0), Vec::with_capacity(4096)),
            |(mut engine, mut events)| {
                fill(&mut engine, USERS, &mut events);
                (engine, events)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn polls(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    for (name, users) in [("queue_poll_1m", USERS), ("queue_poll_10k", 10_000)] {
        let mut engine = queued_engine(0);
        fill(&mut engine, users, &mut Vec::new());
        // Look users up in a scattered order, as polls arrive.
        let probes: Vec<u64> = (0..4096u64).map(|i| (i * 7919 % users).wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        group.throughput(Throughput::Elements(probes.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                for &user in &probes {
                    black_box(engine.poll(SKU, black_box(user), 3));
                }
            })
        });
    }
    group.finish();
}

fn start_shuffle(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.bench_function("queue_start_shuffle_1m", |b| {
        b.iter_batched(
            || {
                let mut engine = queued_engine(1_000);
                fill(&mut engine, USERS, &mut Vec::new());
                engine
            },
            |mut engine| {
                let mut events = Vec::new();
                engine.queue_tick(1_000, &mut || 42, &mut events);
                debug_assert!(matches!(events[0], Event::QueueStarted { .. }));
                engine
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, joins, polls, start_shuffle);
criterion_main!(benches);
