//! A checkout service's use of the client library, runnable against a
//! server:
//!
//! ```text
//! STAMPEDE_ADMIN_TOKEN=adm STAMPEDE_CHECKOUT_TOKEN=chk \
//!     cargo run --release --bin stampede-server -- --data-dir /tmp/stampede &
//! STAMPEDE_TOKEN=adm cargo run --bin stampede-ctl -- sale create --sku 42 --stock 100 --limit 1
//! STAMPEDE_TOKEN=chk cargo run -p stampede-protocol --example checkout -- 127.0.0.1:7070 42
//! ```
//!
//! Each "order" reserves one unit, pretends to charge a card, and confirms
//! (or releases when the payment fails). Every call may be retried: the
//! library resends with the same reservation id, so nothing is held twice.

use std::time::Duration;

use stampede_protocol::client::{new_reservation_id, Client, ClientConfig, ClientError};
use stampede_protocol::Status;

/// What the shop tells the shopper.
#[derive(Debug)]
enum Checkout {
    Paid,
    PaymentDeclined,
    TooSlow,
    SoldOut,
    AlreadyBought,
    #[allow(dead_code)] // read through Debug
    TryAgainLater(Status),
}

async fn checkout(client: &Client, sku: u64, user: u64, card_ok: bool) -> Result<Checkout, ClientError> {
    // Persist this id with the order before calling: a crashed checkout
    // process retries (or releases) with it.
    let id = new_reservation_id();
    let held = client.reserve(sku, user, 1, id).await?;
    match held.status {
        Status::Reserved => {}
        Status::SoldOut | Status::InsufficientStock => return Ok(Checkout::SoldOut),
        Status::LimitExceeded => return Ok(Checkout::AlreadyBought),
        other => return Ok(Checkout::TryAgainLater(other)),
    }
    // The payment provider call; must finish before `held.detail` (unix ms).
    tokio::time::sleep(Duration::from_millis(5)).await;
    if !card_ok {
        client.release(id).await?;
        return Ok(Checkout::PaymentDeclined);
    }
    let done = client.confirm(id, format!("pay-{user}").as_bytes()).await?;
    Ok(match done.status {
        Status::Confirmed => Checkout::Paid,
        // The hold lapsed: void the card authorisation.
        Status::Expired => Checkout::TooSlow,
        other => Checkout::TryAgainLater(other),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7070".into());
    let sku: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(42);
    let token = std::env::var("STAMPEDE_TOKEN").map_err(|_| "set STAMPEDE_TOKEN to the checkout token")?;
    let mut config = ClientConfig::new(addr, token);
    config.connections = 4;
    let client = Client::connect(config).await?;

    let orders: Vec<_> = (0..20u64)
        .map(|user| {
            let client = client.clone();
            tokio::spawn(async move { (user, checkout(&client, sku, user, user % 5 != 0).await) })
        })
        .collect();
    for order in orders {
        let (user, result) = order.await?;
        println!("user {user:>2}: {:?}", result?);
    }
    let status = client.status(sku).await?.sale;
    println!(
        "sku {sku}: total {} available {} reserved {} sold {}",
        status.total, status.available, status.reserved, status.sold
    );
    Ok(())
}
