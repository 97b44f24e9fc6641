//! Limits that protect the server, against a real server on 127.0.0.1:
//! idle connections are closed, and a client that never reads its replies
//! stalls only itself while everyone else keeps being answered.

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use stampede_protocol::message::{Hello, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

async fn raw_connection(addr: &str, token: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    Request::Hello(Hello { token: Bytes::copy_from_slice(token.as_bytes()) }).encode_frame(1, &mut buf);
    stream.write_all(&buf).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_but_a_busy_one_is_not() {
    let server = common::start_server_with(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let mut idle = raw_connection(&server.addr, common::CHECKOUT_TOKEN).await;
    let started = Instant::now();
    let mut sink = Vec::new();
    // Reads the HELLO reply, then EOF once the server closes the connection.
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the idle connection was not closed");
    assert!(started.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", started.elapsed());
    assert_eq!(server.handle.shared.connections_active(), 0);

    // A client that keeps talking is never cut off.
    let client = server.checkout(1).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.ping().await.expect("an active connection stays open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_stalls_only_itself() {
    let server = common::start_server().await;
    let mut slow = raw_connection(&server.addr, common::CHECKOUT_TOKEN).await;
    // Pipeline far more PINGs than the in-flight cap and never read a reply.
    let mut frames = BytesMut::new();
    for id in 2..60_000u64 {
        Request::Ping.encode_frame(id, &mut frames);
    }
    let writer = tokio::spawn(async move {
        // Blocks once the server stops reading this connection.
        let _ = tokio::time::timeout(Duration::from_secs(5), slow.write_all(&frames)).await;
        slow
    });
    // Meanwhile everyone else is answered promptly.
    let others = server.checkout(4).await;
    for _ in 0..200 {
        let started = Instant::now();
        others.ping().await.expect("other clients keep being served");
        assert!(started.elapsed() < Duration::from_secs(1), "a ping took {:?}", started.elapsed());
    }
    // The server stopped reading the slow client: its writes are stuck
    // behind TCP flow control instead of growing server memory.
    let slow = writer.await.unwrap();
    assert_eq!(server.handle.shared.connections_active(), 5, "4 clients' connections and the stuck one");
    // When the slow client goes away, its connection (and its slot) does too.
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.handle.shared.connections_active() > 4 {
        assert!(Instant::now() < deadline, "the stuck connection was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_above_the_reserve_rate_is_told_when_to_retry() {
    use stampede_protocol::message::Reserve;
    use stampede_protocol::Status;
    let server = common::start_server_with(|c| c.user_rate = Some((5, 5))).await;
    server.create_sale(1, 1_000, 100, 600_000, true).await;
    // No client-side retries: the library would wait out the hint itself.
    let connect = || {
        let mut config = stampede_protocol::client::ClientConfig::new(&server.addr, common::CHECKOUT_TOKEN);
        config.max_attempts = 1;
        stampede_protocol::client::Client::connect(config)
    };
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    // One user, two connections, 12 attempts at once: 5 pass (the burst).
    let mut statuses = Vec::new();
    for i in 0..6u128 {
        statuses.push(a.reserve(1, 7, 1, 100 + i).await.unwrap());
        statuses.push(b.reserve(1, 7, 1, 200 + i).await.unwrap());
    }
    let passed = statuses.iter().filter(|o| o.status == Status::Reserved).count();
    let limited: Vec<_> = statuses.iter().filter(|o| o.status == Status::RateLimited).collect();
    assert_eq!((passed, limited.len()), (5, 7), "{statuses:?}");
    assert!(limited.iter().all(|o| (1..=200).contains(&o.detail)), "retry-after hints: {limited:?}");
    // Others are not affected, in a batch too.
    let batch: Vec<Reserve> =
        (0..5u64).map(|u| Reserve { sku: 1, user: 1_000 + u, qty: 1, reservation_id: 500 + u128::from(u) }).collect();
    assert!(a.reserve_batch(&batch).await.unwrap().iter().all(|o| o.status == Status::Reserved));
    // After the hint, user 7 may go on (and the default client waits out
    // the hint by itself).
    assert_eq!(server.checkout(1).await.reserve(1, 7, 1, 301).await.unwrap().status, Status::Reserved);
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(a.reserve(1, 7, 1, 300).await.unwrap().status, Status::Reserved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_and_the_handshake_deadline_hold() {
    let server = common::start_server_with(|c| {
        c.connections_max = 3;
        c.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    // A connection that never sends HELLO is told why and closed at the deadline.
    let mut silent = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let started = Instant::now();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut reply)).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before the deadline");
    let frame = stampede_protocol::FrameCodec::new().decode(&mut BytesMut::from(&reply[..])).unwrap().unwrap();
    let error = stampede_protocol::Reply::decode(&frame).unwrap();
    assert_eq!(error.status(), Some(stampede_protocol::Status::Unauthenticated), "told why: {error:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.handle.shared.connections_active() > 0 {
        assert!(Instant::now() < deadline, "the closed connection's slot was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Three clients fill the cap; a fourth is accepted and closed at once.
    let clients: Vec<_> = futures_util::future::join_all((0..3).map(|_| server.checkout(1))).await;
    for c in &clients {
        c.ping().await.unwrap();
    }
    let mut extra = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut sink)).await;
    assert!(matches!(closed, Ok(Ok(0))), "over the cap: closed without a frame ({closed:?})");
    for c in &clients {
        c.ping().await.expect("the connections within the cap are unaffected");
    }
    // Dropped clients give their slots back promptly (the client library
    // half-closes; the server then closes its side).
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.handle.shared.connections_active() > 0 {
        assert!(Instant::now() < deadline, "dropped clients' connections linger");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
