//! A complete flash-sale drill on this machine, in one command:
//! `cargo run --release --example drill [-- BUYERS STOCK]`.
//!
//! Starts a real stampede server on 127.0.0.1 (ephemeral port, fresh
//! random tokens), creates one hot SKU, and lets BUYERS shoppers (default
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
use stampede_protocol::client::{new_reservation_id, Client, ClientConfig};
use stampede_protocol::message::{Reserve, SaleCreate};
use stampede_protocol::Status;

/// mimalloc: the engine allocates and frees many small records; glibc's
/// allocator spent a quarter of replay time consolidating free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECTIONS: usize = 32;
const BATCH: usize = 64;
const SKU: u64 = 42;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let buyers: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200_000).min(10_000_000);
    let stock: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10_000);

    let admin_token = format!("{:032x}", new_reservation_id());
    let checkout_token = format!("{:032x}", new_reservation_id());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tokens = Tokens {
        admin: Some(admin_token.clone().into_bytes()),
        checkout: Some(checkout_token.clone().into_bytes()),
        insecure: false,
    };
    let handle = server::start(listener, ServerConfig::new(tokens))?;
    let addr = handle.addr.to_string();
    println!("stampede server on {addr}");

    let admin = Client::connect(ClientConfig::new(&addr, &admin_token)).await?;
    let sale = SaleCreate { sku: SKU, stock, limit_per_user: 1, ttl_ms: 600_000, hot: true };
    anyhow::ensure!(admin.create_sale(sale).await?.status == Status::Ok, "create sale");
    println!("sale: sku {SKU}, {stock} units, limit 1 per user; {buyers} buyers on {CONNECTIONS} connections");

    let next_user = Arc::new(AtomicU64::new(0));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // reserved, sold_out, other, busy
    let winners = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = Client::connect(ClientConfig::new(&addr, &checkout_token)).await?;
        let (next_user, counts, winners) = (next_user.clone(), counts.clone(), winners.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next_user.fetch_add(BATCH as u64, Ordering::Relaxed);
                if first >= buyers {
                    return anyhow::Ok(());
                }
                let ops: Vec<Reserve> = (first..(first + BATCH as u64).min(buyers))
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

    // Checkout: 3 of 4 winners pay, the rest abandon and release.
    let winners = std::mem::take(&mut *winners.lock());
    let checkout = Client::connect(ClientConfig::new(&addr, &checkout_token)).await?;
    let (mut paid, mut released) = (0u64, 0u64);
    for (i, id) in winners.iter().enumerate() {
        if i % 4 == 3 {
            anyhow::ensure!(checkout.release(*id).await?.status == Status::Released, "release");
            released += 1;
        } else {
            anyhow::ensure!(checkout.confirm(*id, b"drill").await?.status == Status::Confirmed, "confirm");
            paid += 1;
        }
    }
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
