//! Shared test harness: a real server on 127.0.0.1 (ephemeral port) in this
//! process, and clients for each role.

#![allow(dead_code)]

pub mod cluster;
pub mod netns;
pub mod process;
pub mod raw;

use std::sync::Arc;

use stampede::clock::SystemClock;
use stampede::server::{self, ServerConfig, ServerHandle, Tokens};
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::SaleCreate;
use stampede_protocol::Status;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const CHECKOUT_TOKEN: &str = "test-checkout-token";
pub const REPLICATION_TOKEN: &str = "test-replication-token";

pub struct TestServer {
    pub handle: ServerHandle,
    pub addr: String,
}

/// Start a server with two pool shards (hot SKUs get their own, unpinned).
pub async fn start_server() -> TestServer {
    start_server_with(|_| {}).await
}

/// The same, with the config adjusted by `adjust` first.
pub async fn start_server_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let tokens = Tokens {
        admin: Some(ADMIN_TOKEN.as_bytes().to_vec()),
        checkout: Some(CHECKOUT_TOKEN.as_bytes().to_vec()),
        replication: Some(REPLICATION_TOKEN.as_bytes().to_vec()),
        insecure: false,
    };
    let mut config = ServerConfig::new(tokens);
    config.pool_shards = 2;
    config.pin_hot_shards = false;
    config.clock = Arc::new(SystemClock);
    adjust(&mut config);
    let handle = server::start(listener, config).expect("start server");
    let addr = handle.addr.to_string();
    TestServer { handle, addr }
}

impl TestServer {
    pub async fn admin(&self) -> Client {
        Client::connect(ClientConfig::new(&self.addr, ADMIN_TOKEN)).await.expect("admin connects")
    }

    pub async fn checkout(&self, connections: usize) -> Client {
        let mut config = ClientConfig::new(&self.addr, CHECKOUT_TOKEN);
        config.connections = connections;
        Client::connect(config).await.expect("checkout connects")
    }

    pub async fn create_sale(&self, sku: u64, stock: u64, limit_per_user: u32, ttl_ms: u64, hot: bool) {
        let outcome = self
            .admin()
            .await
            .create_sale(SaleCreate { sku, stock, limit_per_user, ttl_ms, hot, queue: None })
            .await
            .expect("create_sale answered");
        assert_eq!(outcome.status, Status::Ok, "creating sale {sku}");
    }
}

/// A seed from `STAMPEDE_SEED` or the clock; printed so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("STAMPEDE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("seed: {seed} (rerun with STAMPEDE_SEED={seed})");
    seed
}
