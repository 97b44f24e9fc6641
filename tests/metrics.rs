//! The metrics endpoint of a real durable server on 127.0.0.1: valid
//! Prometheus text (parsed by a parser crate), counters that move under
//! load, and the health endpoints.

mod common;

use std::sync::Arc;

use stampede::node::{Node, NodeConfig};
use stampede::server::Tokens;
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::SaleCreate;
use stampede_protocol::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` over a fresh HTTP/1.1 connection: (status code, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn parse(body: &str) -> prometheus_parse::Scrape {
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"))
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_under_load() {
    let dir = common::process::TempDir::new("metrics");
    let tokens = Tokens { admin: Some(b"adm".to_vec()), checkout: None, replication: None, insecure: false };
    let mut config = NodeConfig::new(&dir.0, "127.0.0.1:0", tokens);
    config.pin_hot_shards = false;
    config.metrics_listen = Some("127.0.0.1:0".into());
    let node = Node::start(config).await.unwrap();
    let metrics = node.metrics_addr.expect("metrics listener");
    assert_eq!(get(metrics, "/healthz").await.0, 200);
    assert_eq!(get(metrics, "/readyz").await.0, 200);
    assert_eq!(get(metrics, "/nope").await.0, 404);

    let (status, body) = get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    let before = parse(&body);
    assert_eq!(value(&before, "stampede_replies_total", &[("opcode", "reserve"), ("status", "reserved")]), 0.0);

    let mut client_config = ClientConfig::new(node.addr().to_string(), "adm");
    client_config.connections = 2;
    let client = Arc::new(Client::connect(client_config).await.unwrap());
    let sale = SaleCreate { sku: 42, stock: 100, limit_per_user: 1, ttl_ms: 600_000, hot: true, queue: None };
    assert_eq!(client.create_sale(sale).await.unwrap().status, Status::Ok);
    for user in 0..150u64 {
        client.reserve(42, user, 1, u128::from(user) + 1).await.unwrap();
    }
    client.confirm(1, b"pi").await.unwrap();
    // A queued sale that opens in an hour: its line shows in /metrics.
    let queue = stampede_protocol::message::QueueConfig {
        admit_rate_per_s: 10,
        admit_cap: 0,
        admission_ms: 60_000,
        start_at_ms: 9_000_000_000_000,
    };
    let queued = SaleCreate { sku: 43, stock: 10, limit_per_user: 1, ttl_ms: 600_000, hot: false, queue: Some(queue) };
    assert_eq!(client.create_sale(queued).await.unwrap().status, Status::Ok);
    for user in 0..3 {
        assert_eq!(client.join(43, user).await.unwrap().status, Status::Waiting);
    }

    let after = parse(&get(metrics, "/metrics").await.1);
    assert_eq!(value(&after, "stampede_replies_total", &[("opcode", "reserve"), ("status", "reserved")]), 100.0);
    assert_eq!(value(&after, "stampede_replies_total", &[("opcode", "reserve"), ("status", "sold_out")]), 50.0);
    assert_eq!(value(&after, "stampede_sku_available", &[("sku", "42")]), 0.0);
    assert_eq!(value(&after, "stampede_sku_reserved", &[("sku", "42")]), 99.0);
    assert_eq!(value(&after, "stampede_sku_sold", &[("sku", "42")]), 1.0);
    assert_eq!(value(&after, "stampede_queue_waiting", &[("sku", "43")]), 3.0);
    assert!(value(&after, "stampede_wal_records_total", &[]) >= 102.0, "sale + 100 reserves + 1 confirm");
    assert!(value(&after, "stampede_wal_syncs_total", &[]) >= 1.0);
    assert!(value(&after, "stampede_connections", &[]) >= 2.0);
    let fsyncs = after.samples.iter().find(|s| s.metric == "stampede_wal_fsync_seconds").expect("fsync histogram");
    match &fsyncs.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.iter().any(|b| b.count > 0.0), "fsync latencies recorded: {buckets:?}")
        }
        other => panic!("fsync latency is a histogram with real buckets, got {other:?}"),
    }
    assert_eq!(value(&after, "stampede_replication_lag_records", &[]), value(&after, "stampede_wal_synced_lsn", &[]));
    let reserve_latency = after
        .samples
        .iter()
        .find(|s| s.metric == "stampede_request_duration_seconds" && s.labels.get("opcode") == Some("reserve"))
        .expect("a reserve latency histogram");
    match &reserve_latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(total, 150.0, "every reserve timed: {buckets:?}");
        }
        other => panic!("request latency is a histogram with real buckets, got {other:?}"),
    }

    // Placement: sku 42 (hot) moves to the pool and back; the monitor's
    // rates and the moves show.
    assert_eq!(value(&after, "stampede_dedicated_shards", &[]), 1.0);
    assert_eq!(client.move_sale(42, false).await.unwrap().status, Status::Ok);
    assert_eq!(client.move_sale(42, true).await.unwrap().status, Status::Ok);
    assert_eq!(client.move_sale(43, false).await.unwrap().status, Status::Ok, "a pin only: nothing moves");
    tokio::time::sleep(std::time::Duration::from_millis(3 * stampede::limits::PLACEMENT_INTERVAL_MS)).await;
    let moved = parse(&get(metrics, "/metrics").await.1);
    assert_eq!(value(&moved, "stampede_placement_admin_moves_total", &[]), 3.0);
    assert_eq!(value(&moved, "stampede_sale_moves_total", &[]), 2.0);
    assert_eq!(value(&moved, "stampede_placement_promotions_total", &[]), 0.0, "pinned sales are left alone");
    assert_eq!(value(&moved, "stampede_dedicated_shards", &[]), 1.0, "the emptied dedicated shard was retired");
    assert!(value(&moved, "stampede_sale_move_held_seconds_max", &[]) > 0.0);
    let rated = moved.samples.iter().filter(|s| s.metric == "stampede_sale_decided_per_second").count();
    assert_eq!(rated, 2, "both sales have a rate (0 now: no load)");
    assert_eq!(
        moved.samples.iter().filter(|s| s.metric == "stampede_shard_busy_ratio").count(),
        2,
        "the pool shard and sku 42's"
    );

    // A hot sale in two warehouses: each location's stock shows.
    let hot = SaleCreate { sku: 44, stock: 7, limit_per_user: 2, ttl_ms: 600_000, hot: true, queue: None };
    let at = stampede_protocol::message::SaleLocations { locations: vec![(1, 3), (2, 4)], regions: Vec::new() };
    assert_eq!(client.create_sale_at(hot, at).await.unwrap().status, Status::Ok);
    let prefer_2 = stampede_protocol::message::Where::locations(&[2]);
    assert_eq!(client.reserve_at(44, 1, 2, 9_001, prefer_2).await.unwrap().location, 2);
    client.confirm(9_001, b"pi").await.unwrap();
    assert_eq!(client.reserve_at(44, 2, 1, 9_002, prefer_2).await.unwrap().location, 2);
    let located = parse(&get(metrics, "/metrics").await.1);
    let at = |name: &str, location: &str| value(&located, name, &[("sku", "44"), ("location", location)]);
    assert_eq!(at("stampede_location_available", "1"), 3.0);
    assert_eq!(at("stampede_location_available", "2"), 1.0);
    assert_eq!(at("stampede_location_reserved", "2"), 1.0);
    assert_eq!(at("stampede_location_sold", "2"), 2.0);
    // A sale with one location has no per-location series (the SKU's are the same).
    let one =
        |s: &&prometheus_parse::Sample| s.metric == "stampede_location_available" && s.labels.get("sku") == Some("42");
    assert!(!located.samples.iter().any(|s| one(&s)));

    drop(client);
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().unwrap();
    assert_eq!(get(metrics, "/readyz").await.0, 503, "not ready once shutting down");
}
