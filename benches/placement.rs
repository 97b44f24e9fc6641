//! Moving a live sale between shards (issue 19): how long the sale's
//! requests are held while a sale with a million reservations moves from
//! its pool shard to a dedicated one and back, through the real router
//! and shard threads (`Router::move_sale`; volatile log sink, so the
//! figure is the move and not an fsync).
//!
//! For comparison, what the move would cost if it copied the sale through
//! its snapshot image instead of handing its tables over.
//!
//! `cargo bench --bench placement`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use stampede::clock::SystemClock;
use stampede::engine::{Engine, ReservationDirectory};
use stampede::shard::{Engines, Router};
use stampede::sink::VolatileSink;
use stampede_protocol::message::{Reserve, SaleCreate};
use stampede_protocol::Status;

const SKU: u64 = 42;
const RESERVATIONS: u64 = 1_000_000;

/// An engine holding sale `SKU` with `RESERVATIONS` held reservations
/// (one per user), plus a small neighbour sale.
fn loaded_engine(directory: Arc<ReservationDirectory>) -> Engine {
    let mut engine = Engine::new(directory);
    let mut events = Vec::new();
    for (sku, stock) in [(SKU, 2 * RESERVATIONS), (7, 100)] {
        let sale = SaleCreate { sku, stock, limit_per_user: 1, ttl_ms: 3_600_000, hot: false, queue: None };
        assert_eq!(engine.create_sale(&sale, 1, &mut events).status, Status::Ok);
    }
    for user in 0..RESERVATIONS {
        let op = Reserve { sku: SKU, user, qty: 1, reservation_id: u128::from(user) + 1 };
        assert_eq!(engine.reserve(&op, 2, &mut events).status, Status::Reserved);
        events.clear();
    }
    engine
}

fn move_1m(c: &mut Criterion) {
    stampede::memory::disable_transparent_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let directory = Arc::new(ReservationDirectory::for_server());
    let engine = loaded_engine(directory.clone());
    let engines = Engines { directory, pool: vec![engine], hot: Vec::new() };
    let router = runtime.block_on(async {
        Router::new(engines, Arc::new(SystemClock), Box::new(|_| Box::new(VolatileSink::default())), false)
    });
    let mut group = c.benchmark_group("placement");
    group.sample_size(20);
    // Held: from the route switch to the new shard having the sale (what
    // a request for the SKU arriving during the move waits, besides its
    // own decision).
    // Where the sale is now: each move sends it to the other kind of shard.
    let mut dedicated = false;
    group.bench_function("move_1m_reservations_held", |b| {
        b.iter_custom(|iters| {
            let mut held = Duration::ZERO;
            for _ in 0..iters {
                dedicated = !dedicated;
                let result = runtime.block_on(router.move_sale(SKU, dedicated, true));
                assert_eq!(result.outcome.status, Status::Ok);
                held += result.took.expect("the sale moved");
            }
            held
        })
    });
    // The whole admin call: the move logged (here: handed to the sink)
    // and the old dedicated shard retired.
    group.bench_function("move_1m_reservations_call", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                dedicated = !dedicated;
                let result = runtime.block_on(router.move_sale(SKU, dedicated, true));
                assert_eq!(result.outcome.status, Status::Ok);
            }
            started.elapsed()
        })
    });
    group.finish();

    // What a copy through the snapshot image would hold requests for.
    let mut group = c.benchmark_group("placement");
    group.sample_size(10);
    let source = loaded_engine(Arc::new(ReservationDirectory::for_server()));
    group.bench_function("copy_1m_reservations_via_image", |b| {
        b.iter(|| {
            let image = source.export().into_iter().find(|i| i.sku == SKU).expect("the sale");
            let mut target = Engine::new(Arc::new(ReservationDirectory::for_server()));
            target.import(image).expect("imports");
            target
        })
    });
    group.finish();
}

criterion_group!(benches, move_1m);
criterion_main!(benches);
