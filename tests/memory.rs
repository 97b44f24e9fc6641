//! Memory budgets measured with a counting allocator on the real engine
//! (plus the big tables the engine maps straight from the OS, which it
//! counts itself): the per-user purchase record, and a queue of 1M waiting
//! users.
//!
//! Two engines hold the same 1M reservations of one unit each: in one they
//! belong to 1M distinct users, in the other to a single user. Everything
//! per-reservation is identical, so the difference is exactly the cost of
//! 1M per-user records (the limit table).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use stampede::engine::{Engine, ReservationDirectory};
use stampede_protocol::message::{Reserve, SaleCreate};
use stampede_protocol::Status;

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const USERS: u64 = 1_000_000;

/// The allocator counts every thread: measurements take turns.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Bytes held: allocations plus mapped tables, once no helper thread is
/// still preparing or freeing a table (their work lands at a time that
/// depends on the machine's load; a CI run once read a table freed in one
/// measurement and not yet in the other).
fn live_bytes() -> isize {
    let asked = std::time::Instant::now();
    while stampede::engine::flat::background_jobs() > 0 {
        assert!(asked.elapsed() < std::time::Duration::from_secs(30), "table helper threads still running after 30 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    LIVE_BYTES.load(Ordering::Relaxed) + stampede::engine::flat::mapped_table_bytes() as isize
}

/// Bytes held by an engine with 1M one-unit reservations.
fn engine_bytes(distinct_users: bool) -> isize {
    let before = live_bytes();
    let mut engine = Engine::new(Arc::new(ReservationDirectory::for_server()));
    let mut events = Vec::new();
    // Created with one unit, then restocked: a sale presizes its tables
    // for its initial stock, which would hide the difference measured here.
    // Grown by use, the user table is at its least favourable size.
    let create = SaleCreate { sku: 1, stock: 1, limit_per_user: USERS as u32, ttl_ms: 600_000, hot: true, queue: None };
    assert_eq!(engine.create_sale(&create, 0, &mut events).status, Status::Ok);
    assert_eq!(engine.restock(1, USERS - 1, 0, &mut events).status, Status::Ok);
    for i in 0..USERS {
        let user = if distinct_users { i } else { 7 };
        let op = Reserve { sku: 1, user, qty: 1, reservation_id: u128::from(i) + 1 };
        assert_eq!(engine.reserve(&op, 0, &mut events).status, Status::Reserved);
        events.clear();
    }
    drop(events);
    let held = live_bytes() - before;
    drop(engine);
    held
}

#[test]
fn per_user_record_fits_in_64_bytes() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let distinct = engine_bytes(true);
    let single = engine_bytes(false);
    let per_user = (distinct - single) as f64 / USERS as f64;
    let per_reservation = single as f64 / USERS as f64;
    println!("per-user purchase record: {per_user:.1} bytes/user at 1M users");
    println!("everything else per reservation (record, id directory, expiry queue): {per_reservation:.1} bytes");
    assert!(per_user > 0.0, "the measurement must see the user table");
    assert!(per_user <= 64.0, "per-user record costs {per_user:.1} bytes, budget 64");
}

/// 1M users waiting in one sale's queue fit in 64 MB (the budget),
/// joins counted while they happen (the log's events are dropped, as the
/// shard hands them to the log writer).
#[test]
fn a_queue_of_1m_waiting_users_fits_in_64_mb() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = Engine::new(Arc::new(ReservationDirectory::with_capacity(1024)));
    let mut events = Vec::new();
    let queue = stampede_protocol::message::QueueConfig {
        admit_rate_per_s: 1_000,
        admit_cap: 0,
        admission_ms: 120_000,
        start_at_ms: 0,
    };
    let create = SaleCreate { sku: 1, stock: 1_000, limit_per_user: 1, ttl_ms: 600_000, hot: true, queue: Some(queue) };
    assert_eq!(engine.create_sale(&create, 1, &mut events).status, Status::Ok);
    events.clear();
    let before = live_bytes();
    for user in 0..USERS {
        let ticket = engine.join(1, user * 7919, 2, &mut events);
        assert_eq!(ticket.status, Status::Waiting);
        events.clear();
    }
    let held = live_bytes() - before;
    let per_user = held as f64 / USERS as f64;
    println!("queue: {:.1} MB for 1M waiting users ({per_user:.1} bytes/user)", held as f64 / 1e6);
    assert_eq!(engine.poll(1, 999_999 * 7919, 3).position, USERS, "the last joiner is last");
    assert!(held <= 64_000_000, "1M waiting users hold {held} bytes, budget 64 MB");
}
