//! Wire rules a client written from PROTOCOL.md alone relies on, checked
//! over TCP against a real durable server (in-process `Node` on 127.0.0.1):
//!
//! - SETTLED only on a connection with a live REPLICATE stream, never
//!   beyond what that stream sent, never moving the recorded LSN back
//!   (§5.13);
//! - a second REPLICATE on a connection that streams is refused, the first
//!   stream goes on (§5.12);
//! - a consumer that closes its connection frees its stream slot at once
//!   (§6.10);
//! - the per-user rate limit never refuses a retry of a known reservation
//!   and never hides a malformed request (§6.2).

mod common;

use std::time::Duration;

use common::process::TempDir;
use common::raw::RawConn;
use common::{ADMIN_TOKEN, CHECKOUT_TOKEN, REPLICATION_TOKEN};
use stampede::limits::REPLICATION_STREAMS_MAX;
use stampede::node::{Node, NodeConfig};
use stampede::server::Tokens;
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::{Replicate, Settled};
use stampede_protocol::message::{Reply, Request, Reserve, SaleCreate};
use stampede_protocol::Status;

async fn node(dir: &std::path::Path, user_rate: Option<(u32, u32)>) -> Node {
    let tokens = Tokens {
        admin: Some(ADMIN_TOKEN.into()),
        checkout: Some(CHECKOUT_TOKEN.into()),
        replication: Some(REPLICATION_TOKEN.into()),
        insecure: false,
    };
    let mut config = NodeConfig::new(dir, "127.0.0.1:0", tokens);
    config.pin_hot_shards = false;
    config.user_rate = user_rate;
    Node::start(config).await.expect("start node")
}

async fn client(addr: &str, token: &str) -> Client {
    let mut config = ClientConfig::new(addr, token);
    config.max_attempts = 1;
    Client::connect(config).await.expect("connect")
}

/// A sale and `n` reservations: a log with a few records in it.
async fn some_log(addr: &str, n: u64) {
    let sale = SaleCreate { sku: 1, stock: 100, limit_per_user: 5, ttl_ms: 60_000, hot: false, queue: None };
    assert_eq!(client(addr, ADMIN_TOKEN).await.create_sale(sale).await.unwrap().status, Status::Ok);
    let checkout = client(addr, CHECKOUT_TOKEN).await;
    for user in 0..n {
        assert_eq!(checkout.reserve(1, user, 1, u128::from(user) + 1).await.unwrap().status, Status::Reserved);
    }
}

fn synced(node: &Node) -> u64 {
    node.wal_stats.synced_lsn.load(std::sync::atomic::Ordering::Acquire)
}

/// Read LOG_BATCH frames of `request_id` until one reaches `lsn`.
async fn read_stream_to(conn: &mut RawConn, request_id: u64, lsn: u64) {
    let mut last = 0;
    while last < lsn {
        match conn.next().await {
            Some((id, Reply::LogBatch(batch))) if id == request_id => {
                assert_eq!(batch.status, Status::Ok);
                last = batch.records.last().map_or(last, |(lsn, _)| *lsn);
            }
            other => panic!("expected a LOG_BATCH of request {request_id}, got {other:?}"),
        }
    }
}

async fn settle(conn: &mut RawConn, request_id: u64, lsn: u64) -> (Status, u64) {
    conn.send(request_id, Request::Settled(Settled { settled_lsn: lsn })).await;
    loop {
        match conn.next().await {
            Some((id, Reply::Outcome(o))) if id == request_id => return (o.status, o.detail),
            // Stream frames (heartbeats) may come in between.
            Some((_, Reply::LogBatch(_))) => continue,
            other => panic!("expected the SETTLED reply, got {other:?}"),
        }
    }
}

fn consumer_file(dir: &std::path::Path) -> u64 {
    stampede::recovery::consumer_lsn(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_needs_a_live_stream_and_never_goes_beyond_it_or_backwards() {
    let dir = TempDir::new("settled");
    let node = node(&dir.0, None).await;
    let addr = node.addr().to_string();
    some_log(&addr, 6).await;
    let end = synced(&node);
    assert!(end >= 7);

    // No stream on this connection: refused, the recorded LSN unchanged.
    let mut lone = RawConn::authed(&addr, REPLICATION_TOKEN).await;
    assert_eq!(settle(&mut lone, 5, 3).await, (Status::InvalidArgument, 0));
    assert_eq!(consumer_file(&dir.0), 0);

    // A stream, read until it has sent every record there is.
    let mut consumer = RawConn::authed(&addr, REPLICATION_TOKEN).await;
    consumer.send(2, Request::Replicate(Replicate { from_lsn: 1 })).await;
    read_stream_to(&mut consumer, 2, end).await;
    // Beyond what the stream sent: refused, detail = what it sent.
    assert_eq!(settle(&mut consumer, 3, end + 5).await, (Status::InvalidArgument, end));
    assert_eq!(consumer_file(&dir.0), 0);
    // Forward: recorded.
    assert_eq!(settle(&mut consumer, 4, 3).await, (Status::Ok, 3));
    assert_eq!(consumer_file(&dir.0), 3);
    assert_eq!(settle(&mut consumer, 5, end).await, (Status::Ok, end));
    // Backwards: `ok`, nothing changes, the detail says what is recorded.
    assert_eq!(settle(&mut consumer, 6, 2).await, (Status::Ok, end));
    assert_eq!(settle(&mut consumer, 7, 0).await, (Status::Ok, end));
    assert_eq!(consumer_file(&dir.0), end);
    // Another connection without a stream still may not move it.
    assert_eq!(settle(&mut lone, 8, end).await, (Status::InvalidArgument, end));
    drop((lone, consumer));
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replicate_on_a_streaming_connection_is_refused_and_the_first_goes_on() {
    let dir = TempDir::new("second-replicate");
    let node = node(&dir.0, None).await;
    let addr = node.addr().to_string();
    some_log(&addr, 3).await;
    let mut conn = RawConn::authed(&addr, REPLICATION_TOKEN).await;
    conn.send(2, Request::Replicate(Replicate { from_lsn: 1 })).await;
    read_stream_to(&mut conn, 2, synced(&node)).await;
    conn.send(3, Request::Replicate(Replicate { from_lsn: 1 })).await;
    loop {
        match conn.next().await {
            Some((3, Reply::LogBatch(batch))) => {
                assert_eq!((batch.status, batch.records.len()), (Status::InvalidArgument, 0));
                break;
            }
            Some((2, Reply::LogBatch(_))) => continue, // a heartbeat of the first
            other => panic!("expected the refusal of request 3, got {other:?}"),
        }
    }
    // The first stream still delivers what comes next, and nothing more
    // arrives for request 3.
    let checkout = client(&addr, CHECKOUT_TOKEN).await;
    assert_eq!(checkout.reserve(1, 77, 1, 777).await.unwrap().status, Status::Reserved);
    let target = synced(&node);
    let mut last = 0;
    while last < target {
        match conn.next().await {
            Some((2, Reply::LogBatch(batch))) => last = batch.records.last().map_or(last, |(lsn, _)| *lsn),
            other => panic!("expected the first stream, got {other:?}"),
        }
    }
    drop(conn);
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_closes_frees_its_stream_slot_at_once() {
    let dir = TempDir::new("slots");
    let node = node(&dir.0, None).await;
    let addr = node.addr().to_string();
    some_log(&addr, 2).await;
    let end = synced(&node);
    for round in 0..3 {
        let mut streams = Vec::new();
        for _ in 0..REPLICATION_STREAMS_MAX {
            let mut conn = RawConn::authed(&addr, REPLICATION_TOKEN).await;
            conn.send(2, Request::Replicate(Replicate { from_lsn: 1 })).await;
            read_stream_to(&mut conn, 2, end).await;
            streams.push(conn);
        }
        // All slots taken: one more is `busy`.
        let mut extra = RawConn::authed(&addr, REPLICATION_TOKEN).await;
        extra.send(2, Request::Replicate(Replicate { from_lsn: 1 })).await;
        match extra.next().await {
            Some((2, Reply::LogBatch(batch))) => assert_eq!(batch.status, Status::Busy, "round {round}"),
            other => panic!("round {round}: expected busy, got {other:?}"),
        }
        // The consumers go away; their slots are free well before the next
        // heartbeat (1 s) could have found the sockets dead.
        drop(streams);
        drop(extra);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_never_refuses_a_retry_of_a_known_reservation_nor_hides_bad_arguments() {
    let dir = TempDir::new("rate-order");
    // One RESERVE per second per user, no burst beyond it.
    let node = node(&dir.0, Some((1, 1))).await;
    let addr = node.addr().to_string();
    let sale = SaleCreate { sku: 1, stock: 100, limit_per_user: 5, ttl_ms: 60_000, hot: false, queue: None };
    assert_eq!(client(&addr, ADMIN_TOKEN).await.create_sale(sale).await.unwrap().status, Status::Ok);
    let checkout = client(&addr, CHECKOUT_TOKEN).await;
    let first = checkout.reserve(1, 7, 1, 1001).await.unwrap();
    assert_eq!(first.status, Status::Reserved);
    // The bucket is empty now.
    assert_eq!(checkout.reserve(1, 7, 1, 1002).await.unwrap().status, Status::RateLimited);
    // A retry of the success answers its original outcome, every time.
    for _ in 0..3 {
        let again = checkout.reserve(1, 7, 1, 1001).await.unwrap();
        assert_eq!((again.status, again.detail), (Status::Reserved, first.detail));
    }
    // The same id for another request is still `id_conflict`, not limited.
    assert_eq!(checkout.reserve(1, 7, 2, 1001).await.unwrap().status, Status::IdConflict);
    // Malformed is malformed whatever the rate.
    assert_eq!(checkout.reserve(1, 7, 0, 1003).await.unwrap().status, Status::InvalidArgument);
    assert_eq!(checkout.reserve(1, 7, 1, 0).await.unwrap().status, Status::InvalidArgument);
    // The same in a batch.
    let ops = [
        Reserve { sku: 1, user: 7, qty: 1, reservation_id: 1001 },
        Reserve { sku: 1, user: 7, qty: 1, reservation_id: 1004 },
        Reserve { sku: 1, user: 7, qty: 0, reservation_id: 1005 },
    ];
    let statuses: Vec<Status> = checkout.reserve_batch(&ops).await.unwrap().iter().map(|o| o.status).collect();
    assert_eq!(statuses, [Status::Reserved, Status::RateLimited, Status::InvalidArgument]);
    drop(checkout);
    tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap().unwrap();
}
