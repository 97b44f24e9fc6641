//! A complete flash-sale drill on this machine, in one command:
//! `cargo run --release --example drill [-- BUYERS STOCK MODE BATCH DEPTH]`.
//!
//! Starts a real stampede server on 127.0.0.1 (ephemeral port, fresh
//! random tokens, a write-ahead log in a temporary data dir; MODE is
//! `fsync` (default), `async` or `volatile` (no log)), creates one hot SKU, and lets BUYERS shoppers (default
//! 200,000; each a distinct user with a per-user limit of 1) press Buy at
//! once over 32 pipelined connections. Winners pay (confirm) or abandon
//! (release). Then it audits the server against its own tally and exits
//! non-zero if any invariant broke: no unit sold twice, sold + reserved +
//! available == total, every acknowledged reservation accounted for.
//!
//! The full load generator (scenarios, open loop, baselines against Redis
//! and PostgreSQL, reports) is `stampede-loadgen`; this is the quick check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use stampede::server::{self, ServerConfig, Tokens};
use stampede::wal::writer;
use stampede::wal::{Durability, WalConfig};
use stampede_protocol::client::{new_reservation_id, Client, ClientConfig};
use stampede_protocol::message::{Reserve, SaleCreate};
use stampede_protocol::Status;

/// mimalloc: the engine allocates and frees many small records; glibc's
/// allocator spent a quarter of replay time consolidating free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECTIONS: usize = 32;
const SKU: u64 = 42;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // As stampede-server runs (see stampede::memory).
    stampede::memory::disable_transparent_huge_pages();
    let mut args = std::env::args().skip(1);
    let buyers: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200_000).min(10_000_000);
    let stock: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let mode = args.next().unwrap_or_else(|| "fsync".into());
    let batch: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128).clamp(1, 1024);
    // Batches in flight per connection (pipelining depth).
    let depth: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4).clamp(1, 64);

    let admin_token = format!("{:032x}", new_reservation_id());
    let checkout_token = format!("{:032x}", new_reservation_id());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tokens = Tokens {
        admin: Some(admin_token.clone().into_bytes()),
        checkout: Some(checkout_token.clone().into_bytes()),
        replication: None,
        insecure: false,
    };
    let mut config = ServerConfig::new(tokens);
    let data_dir = std::env::temp_dir().join(format!("stampede-drill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir)?;
    let wal = match mode.as_str() {
        "volatile" => None,
        durability => {
            let wal_config = WalConfig {
                durability: <Durability as clap::ValueEnum>::from_str(durability, false).map_err(anyhow::Error::msg)?,
                ..WalConfig::new(&data_dir)
            };
            let fatal: writer::FatalHandler = Arc::new(|m: &str| panic!("{m}"));
            let wal = writer::start(wal_config, 1, Box::new(writer::DataSync), fatal)?;
            config.sinks = wal.sink_factory();
            Some(wal)
        }
    };
    let handle = server::start(listener, config)?;
    let addr = handle.addr.to_string();
    println!("stampede server on {addr} (durability: {mode}, log in {})", data_dir.display());

    let admin = Client::connect(ClientConfig::new(&addr, &admin_token)).await?;
    let sale = SaleCreate { sku: SKU, stock, limit_per_user: 1, ttl_ms: 600_000, hot: true, queue: None };
    anyhow::ensure!(admin.create_sale(sale).await?.status == Status::Ok, "create sale");
    println!("sale: sku {SKU}, {stock} units, limit 1 per user; {buyers} buyers on {CONNECTIONS} connections, batches of {batch}, {depth} in flight per connection");

    let next_user = Arc::new(AtomicU64::new(0));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // reserved, sold_out, other, busy
    let winners = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for task in 0..CONNECTIONS * depth {
        if task % depth == 0 {
            clients.push(Client::connect(ClientConfig::new(&addr, &checkout_token)).await?);
        }
        let client = clients[task / depth].clone();
        let (next_user, counts, winners) = (next_user.clone(), counts.clone(), winners.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next_user.fetch_add(batch as u64, Ordering::Relaxed);
                if first >= buyers {
                    return anyhow::Ok(());
                }
                let ops: Vec<Reserve> = (first..(first + batch as u64).min(buyers))
                    .map(|user| Reserve { sku: SKU, user, qty: 1, reservation_id: new_reservation_id() })
                    .collect();
                let results = client.reserve_batch(&ops).await?;
                for (op, outcome) in ops.iter().zip(results) {
                    let slot = match outcome.status {
                        Status::Reserved => {
                            winners.lock().push(op.reservation_id);
                            0
                        }
                        Status::SoldOut => 1,
                        Status::Busy => 3,
                        _ => 2,
                    };
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let [reserved, sold_out, other, busy] = [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed));
    println!(
        "stampede: {buyers} requests in {:.3} s = {:.0} req/s; reserved {reserved}, sold_out {sold_out}, busy {busy}, other {other}",
        elapsed.as_secs_f64(),
        buyers as f64 / elapsed.as_secs_f64()
    );

    // Checkout: 3 of 4 winners pay, the rest abandon and release; done
    // concurrently over the same connections, as checkout services would.
    let winners = Arc::new(std::mem::take(&mut *winners.lock()));
    let settled: Arc<[AtomicU64; 2]> = Arc::new(Default::default()); // paid, released
    let mut tasks = Vec::new();
    for task in 0..CONNECTIONS * depth {
        let (client, winners, settled) = (clients[task / depth].clone(), winners.clone(), settled.clone());
        let stride = CONNECTIONS * depth;
        tasks.push(tokio::spawn(async move {
            for i in (task..winners.len()).step_by(stride) {
                let id = winners[i];
                if i % 4 == 3 {
                    anyhow::ensure!(client.release(id).await?.status == Status::Released, "release");
                    settled[1].fetch_add(1, Ordering::Relaxed);
                } else {
                    anyhow::ensure!(client.confirm(id, b"drill").await?.status == Status::Confirmed, "confirm");
                    settled[0].fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let (paid, released) = (settled[0].load(Ordering::Relaxed), settled[1].load(Ordering::Relaxed));
    let checkout = Client::connect(ClientConfig::new(&addr, &checkout_token)).await?;
    let status = checkout.status(SKU).await?.sale;
    println!(
        "server: total {} available {} reserved {} sold {}",
        status.total, status.available, status.reserved, status.sold
    );

    let mut failures = Vec::new();
    if reserved != stock.min(buyers) {
        failures.push(format!("reserved {reserved} != min(stock, buyers) {}", stock.min(buyers)));
    }
    if busy + other > 0 {
        failures.push(format!("{} requests neither reserved nor sold out", busy + other));
    }
    if status.sold != paid || status.sold > stock {
        failures.push(format!("server sold {} but {paid} were confirmed (stock {stock})", status.sold));
    }
    if status.available + status.reserved + status.sold != status.total {
        failures.push("available + reserved + sold != total".into());
    }
    if status.available != stock - paid {
        failures.push(format!("available {} != stock - sold {}", status.available, stock - paid));
    }
    handle.shared.router().expect("a single node has its router").shutdown();
    if let Some(wal) = wal {
        wal.close()?;
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    if failures.is_empty() {
        println!("invariants: ok (paid {paid}, released {released}, no unit sold twice)");
        Ok(())
    } else {
        for f in &failures {
            eprintln!("INVARIANT BROKEN: {f}");
        }
        std::process::exit(1)
    }
}
