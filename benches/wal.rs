//! Durability benchmarks (custom harness; `cargo bench --bench wal`):
//!
//! 1. raw `fdatasync` latency of this machine (4 KiB append + fdatasync);
//! 2. acknowledgement latency through the group-commit writer (submit one
//!    event, wait for its reply) at 1, 8 and 64 concurrent submitters, in
//!    fsync mode: p50/p99 next to the raw figure;
//! 3. replay: records/s and the time to recover a 10M-event log;
//! 4. the same state recovered from a snapshot that covers the whole log.
//!
//! Under `cargo test --benches` (no `--bench` flag) it runs tiny sizes once
//! so it cannot rot.

use std::io::Write;

/// The allocator the server uses (see src/bin/stampede-server.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use stampede::engine::{Engine, Event, ReservationDirectory};
use stampede::recovery::{self, RecoverOptions};
use stampede::sink::{Delivery, LogSink};
use stampede::wal::writer::{self, DataSync};
use stampede::wal::WalConfig;
use stampede_protocol::message::{Outcome, Reserve, SaleCreate};
use stampede_protocol::Status;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stampede-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn raw_fdatasync(samples: usize) -> (Duration, Duration) {
    let dir = temp_dir("fsync");
    let mut file = std::fs::File::create(dir.join("probe")).unwrap();
    let block = vec![7u8; 4096];
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        file.write_all(&block).unwrap();
        let t = Instant::now();
        file.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    let _ = std::fs::remove_dir_all(&dir);
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

/// Ack latency with `submitters` threads each doing `per_thread` submit-and-wait.
fn group_commit_ack(submitters: usize, per_thread: usize) -> (Duration, Duration, f64, f64) {
    let dir = temp_dir("ack");
    let fatal: writer::FatalHandler = Arc::new(|m: &str| panic!("{m}"));
    let wal = writer::start(WalConfig::new(&dir), 1, Box::new(DataSync), fatal).unwrap();
    let started = Instant::now();
    let threads: Vec<_> = (0..submitters)
        .map(|t| {
            let mut sink = wal.sink();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per_thread);
                for i in 0..per_thread {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let event = Event::Reserved {
                        sku: 1,
                        user: (t * per_thread + i) as u64,
                        qty: 1,
                        reservation_id: (t * per_thread + i) as u128 + 1,
                        expires_at_ms: 1,
                        at_ms: 1,
                        location: 0,
                    };
                    let t0 = Instant::now();
                    sink.submit(&mut vec![event], &mut vec![Delivery::Admin(tx, (Outcome::of(Status::Ok), None))]);
                    rx.blocking_recv().expect("acknowledged");
                    lat.push(t0.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    let syncs = wal.stats.syncs_total.load(std::sync::atomic::Ordering::Relaxed);
    wal.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    lat.sort_unstable();
    let acks = lat.len() as f64;
    (percentile(&lat, 0.5), percentile(&lat, 0.99), acks / elapsed.as_secs_f64(), acks / syncs.max(1) as f64)
}

/// Write a realistic log of about `events` events (reserve, then confirm
/// 3 in 4, release the rest) straight through the log writer.
fn write_log(dir: &std::path::Path, events: u64) -> u64 {
    let mut engine = Engine::new(Arc::new(ReservationDirectory::new()));
    let fatal: writer::FatalHandler = Arc::new(|m: &str| panic!("{m}"));
    let config = WalConfig { durability: stampede::wal::Durability::Async, ..WalConfig::new(dir) };
    let wal = writer::start(config, 1, Box::new(DataSync), fatal).unwrap();
    let mut sink = wal.sink();
    let mut batch = Vec::with_capacity(4096);
    let skus = 100u64;
    for sku in 1..=skus {
        let create = SaleCreate { sku, stock: events, limit_per_user: 4, ttl_ms: 3_600_000, hot: false, queue: None };
        engine.create_sale(&create, 1, &mut batch);
    }
    let mut written = 0u64;
    let mut n = 0u64;
    while written + (batch.len() as u64) < events {
        n += 1;
        let id = u128::from(n);
        let sku = 1 + n % skus;
        engine.reserve(&Reserve { sku, user: n, qty: 1, reservation_id: id }, 2, &mut batch);
        if n % 4 == 3 {
            engine.release(sku, id, 3, &mut batch);
        } else {
            engine.confirm(sku, id, &Bytes::from_static(b"pi_3NxYz"), 3, &mut batch);
        }
        if batch.len() >= 4000 {
            written += batch.len() as u64;
            sink.submit(&mut batch, &mut Vec::new());
        }
    }
    written += batch.len() as u64;
    sink.submit(&mut batch, &mut Vec::new());
    drop(sink);
    wal.close().unwrap();
    written
}

fn main() {
    // As stampede-server runs (see stampede::memory).
    stampede::memory::disable_transparent_huge_pages();
    let full = std::env::args().any(|a| a == "--bench");
    let scale = |full_size: usize, smoke: usize| if full { full_size } else { smoke };

    let (p50, p99) = raw_fdatasync(scale(2000, 20));
    println!("raw fdatasync (4 KiB append):        p50 {:>7.1} us  p99 {:>7.1} us", us(p50), us(p99));
    for submitters in [1, 8, 64] {
        let (p50, p99, rate, per_sync) = group_commit_ack(submitters, scale(20_000 / submitters.max(1), 5));
        println!(
            "group-commit ack, {submitters:>2} submitters:     p50 {:>7.1} us  p99 {:>7.1} us  ({rate:>9.0} acks/s, {per_sync:.1} records per fsync)",
            us(p50),
            us(p99)
        );
    }

    let events = if full {
        std::env::var("STAMPEDE_REPLAY_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000_000)
    } else {
        10_000
    };
    let dir = temp_dir("replay");
    let t = Instant::now();
    let written = write_log(&dir, events);
    let bytes: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    println!(
        "wrote a log of {written} events ({:.0} MiB) in {:.1} s",
        bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let recovered = recovery::recover(&dir, RecoverOptions::new(1, false)).unwrap();
    let r = &recovered.report;
    assert_eq!(r.records_replayed, written);
    println!(
        "recovery of {} events: {:.2} s = {:.2} M records/s (read, verify, decode, apply, check invariants)",
        r.records_replayed,
        r.elapsed.as_secs_f64(),
        r.records_replayed as f64 / r.elapsed.as_secs_f64() / 1e6
    );
    let replay = r.elapsed;
    drop(recovered);

    // The same state from a snapshot that covers the whole log (what a
    // restart after SIGTERM loads): the fast path, or it has no reason to be.
    let t = Instant::now();
    recovery::checkpoint(&dir, None, recovery::Retention::Consumer).unwrap();
    let snapshot_bytes: u64 = stampede::wal::snapshot::list_snapshots(&dir)
        .unwrap()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    println!(
        "snapshot of that state: {:.0} MiB written in {:.2} s",
        snapshot_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let from_snapshot = recovery::recover(&dir, RecoverOptions::new(1, false)).unwrap().report;
    assert_eq!((from_snapshot.records_replayed, from_snapshot.snapshot_lsn), (0, Some(written)));
    println!(
        "recovery from the snapshot: {:.2} s ({:.2}x the replay of the log it covers, {:.2} s)",
        from_snapshot.elapsed.as_secs_f64(),
        from_snapshot.elapsed.as_secs_f64() / replay.as_secs_f64(),
        replay.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
