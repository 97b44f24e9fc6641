//! End-to-end tests against a real server on 127.0.0.1.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::raw::RawConn;
use common::{start_server, CHECKOUT_TOKEN};
use stampede_protocol::client::{new_reservation_id, Client, ClientConfig, ClientError};
use stampede_protocol::frame::encode_frame_with;
use stampede_protocol::message::{Hello, Opcode, Reply, Request, Reserve, Role, SaleCreate};
use stampede_protocol::Status;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_unit_race_sells_exactly_one() {
    let server = start_server().await;
    // Many connections, shared by 1000 concurrent buyers.
    let clients: Vec<Client> = futures_util::future::join_all((0..50).map(|_| server.checkout(1))).await;
    for round in 0..30u64 {
        let sku = 1000 + round;
        server.create_sale(sku, 1, 1, 60_000, round % 2 == 0).await;
        let mut tasks = Vec::new();
        for buyer in 0..1000u64 {
            let client = clients[(buyer % 50) as usize].clone();
            tasks.push(tokio::spawn(async move { client.reserve(sku, buyer, 1, new_reservation_id()).await }));
        }
        let mut reserved = 0;
        let mut sold_out = 0;
        for task in tasks {
            match task.await.unwrap().expect("reserve answered").status {
                Status::Reserved => reserved += 1,
                Status::SoldOut => sold_out += 1,
                other => panic!("round {round}: unexpected {other}"),
            }
        }
        assert_eq!((reserved, sold_out), (1, 999), "round {round}");
        let status = clients[0].status(sku).await.unwrap().sale;
        assert_eq!((status.available, status.reserved, status.sold, status.total), (0, 1, 0, 1), "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limit_holds_across_connections() {
    // 400 simultaneous attempts by one user: the per-user *rate* limit
    // (tests/limits.rs) would refuse most of them before the purchase
    // limit is even asked; this test is about the purchase limit.
    let server = common::start_server_with(|c| c.user_rate = None).await;
    for (sku, hot) in [(7u64, false), (8, true)] {
        server.create_sale(sku, 1000, 2, 60_000, hot).await;
        let clients: Vec<Client> = futures_util::future::join_all((0..20).map(|_| server.checkout(1))).await;
        let mut tasks = Vec::new();
        for attempt in 0..400usize {
            let client = clients[attempt % clients.len()].clone();
            tasks.push(tokio::spawn(async move { client.reserve(sku, 77, 1, new_reservation_id()).await }));
        }
        let mut reserved = 0;
        for task in tasks {
            match task.await.unwrap().unwrap().status {
                Status::Reserved => reserved += 1,
                Status::LimitExceeded => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(reserved, 2, "sku {sku}: one user, limit 2");
        let sale = clients[0].status(sku).await.unwrap().sale;
        assert_eq!((sale.reserved, sale.available), (2, 998));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_returns_stock_and_confirm_answers_expired() {
    let server = start_server().await;
    server.create_sale(5, 2, 2, 300, false).await;
    let client = server.checkout(1).await;
    let (a, b) = (new_reservation_id(), new_reservation_id());
    let held = client.reserve(5, 1, 1, a).await.unwrap();
    assert_eq!(held.status, Status::Reserved);
    assert_eq!(client.reserve(5, 2, 1, b).await.unwrap().status, Status::Reserved);
    assert_eq!(client.reserve(5, 3, 1, new_reservation_id()).await.unwrap().status, Status::SoldOut);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The expiry tick returned both units without anyone asking.
    let sale = client.status(5).await.unwrap().sale;
    assert_eq!((sale.available, sale.reserved, sale.sold, sale.reservations), (2, 0, 0, 0));
    let late = client.confirm(a, b"pay").await.unwrap();
    assert_eq!(late.status, Status::Expired);
    assert_eq!(late.detail, held.detail, "expired answers the expiry time");
    assert_eq!(client.release(b).await.unwrap().status, Status::Expired);
    // The user's limit is free again.
    assert_eq!(client.reserve(5, 1, 2, new_reservation_id()).await.unwrap().status, Status::Reserved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_idempotent() {
    let server = start_server().await;
    server.create_sale(9, 1, 1, 60_000, false).await;
    server.create_sale(10, 5, 5, 60_000, false).await;
    let client = server.checkout(2).await;
    let id = new_reservation_id();
    let first = client.reserve(9, 1, 1, id).await.unwrap();
    assert_eq!(first.status, Status::Reserved);
    // The sale is now sold out; the retry still gets the original answer.
    for _ in 0..3 {
        assert_eq!(client.reserve(9, 1, 1, id).await.unwrap(), first);
    }
    let sale = client.status(9).await.unwrap().sale;
    assert_eq!((sale.reserved, sale.available), (1, 0), "retries reserved nothing more");
    // The same id for a different request is refused, on this SKU or another.
    assert_eq!(client.reserve(9, 2, 1, id).await.unwrap().status, Status::IdConflict);
    assert_eq!(client.reserve(10, 1, 1, id).await.unwrap().status, Status::IdConflict);
    assert_eq!(client.status(10).await.unwrap().sale.reserved, 0);

    let confirmed = client.confirm(id, b"pay-1").await.unwrap();
    assert_eq!(confirmed.status, Status::Confirmed);
    assert_eq!(client.confirm(id, b"pay-1").await.unwrap(), confirmed, "same confirm, same answer");
    assert_eq!(client.confirm(id, b"pay-2").await.unwrap().status, Status::IdConflict);
    assert_eq!(client.release(id).await.unwrap().status, Status::AlreadyConfirmed);
    let sale = client.status(9).await.unwrap().sale;
    assert_eq!((sale.sold, sale.reserved, sale.available), (1, 0, 0));

    let other = new_reservation_id();
    assert_eq!(client.reserve(10, 3, 2, other).await.unwrap().status, Status::Reserved);
    assert_eq!(client.release(other).await.unwrap().status, Status::Released);
    assert_eq!(client.release(other).await.unwrap().status, Status::Released);
    assert_eq!(client.confirm(other, b"x").await.unwrap().status, Status::AlreadyReleased);
    let sale = client.status(10).await.unwrap().sale;
    assert_eq!((sale.available, sale.reserved), (5, 0), "released once, not twice");
    assert_eq!(client.release(12345).await.unwrap().status, Status::UnknownReservation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_pause_restock_and_unknown_sku() {
    let server = start_server().await;
    server.create_sale(20, 3, 1, 60_000, false).await;
    server.create_sale(21, 100, 1, 60_000, true).await;
    let client = server.checkout(1).await;
    let ops: Vec<Reserve> = (0..6)
        .map(|i| Reserve {
            sku: if i % 2 == 0 { 20 } else { 21 },
            user: i,
            qty: 1,
            reservation_id: new_reservation_id(),
        })
        .chain([Reserve { sku: 999, user: 1, qty: 1, reservation_id: new_reservation_id() }])
        .collect();
    let results = client.reserve_batch(&ops).await.unwrap();
    let statuses: Vec<Status> = results.iter().map(|o| o.status).collect();
    assert_eq!(statuses[..6], [Status::Reserved; 6]);
    assert_eq!(statuses[6], Status::UnknownSku);
    // Resending the batch is safe: same ids, same answers, nothing more held.
    let again = client.reserve_batch(&ops).await.unwrap();
    assert_eq!(again, results);
    assert_eq!(client.status(20).await.unwrap().sale.available, 0);

    let admin = server.admin().await;
    assert_eq!(admin.pause(21).await.unwrap().status, Status::Ok);
    assert_eq!(client.reserve(21, 50, 1, new_reservation_id()).await.unwrap().status, Status::Paused);
    assert!(client.status(21).await.unwrap().sale.paused);
    assert_eq!(admin.resume(21).await.unwrap().status, Status::Ok);
    assert_eq!(client.reserve(21, 50, 1, new_reservation_id()).await.unwrap().status, Status::Reserved);

    assert_eq!(client.reserve(20, 50, 1, new_reservation_id()).await.unwrap().status, Status::SoldOut);
    let restocked = admin.restock(20, 2).await.unwrap();
    assert_eq!((restocked.status, restocked.detail), (Status::Ok, 5));
    assert_eq!(client.reserve(20, 50, 1, new_reservation_id()).await.unwrap().status, Status::Reserved);
    // One unit left, two asked: not "sold out", which would be untrue.
    assert_eq!(client.reserve(20, 51, 2, new_reservation_id()).await.unwrap().status, Status::InsufficientStock);
    assert_eq!(client.reserve(21, 51, 2, new_reservation_id()).await.unwrap().status, Status::LimitExceeded);
    let sale = client.status(20).await.unwrap().sale;
    assert_eq!((sale.total, sale.available, sale.reserved), (5, 1, 4));
    assert_eq!(admin.restock(999, 1).await.unwrap().status, Status::UnknownSku);
    assert_eq!(client.status(999).await.unwrap().status, Status::UnknownSku);
    let create = SaleCreate { sku: 20, stock: 1, limit_per_user: 1, ttl_ms: 1000, hot: false, queue: None };
    assert_eq!(admin.create_sale(create).await.unwrap().status, Status::SaleExists);
    let bad = SaleCreate { sku: 22, stock: 1, limit_per_user: 0, ttl_ms: 1000, hot: false, queue: None };
    assert_eq!(admin.create_sale(bad).await.unwrap().status, Status::InvalidArgument);
    // invalid_argument left no route behind.
    assert_eq!(client.status(22).await.unwrap().status, Status::UnknownSku);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_enforced() {
    let server = start_server().await;
    // Wrong token: refused at connect.
    let err = Client::connect(ClientConfig::new(&server.addr, "wrong")).await.err().expect("wrong token refused");
    assert!(matches!(err, ClientError::Auth(Status::AuthFailed)), "{err:?}");
    let err = Client::connect(ClientConfig::new(&server.addr, "")).await.err().expect("empty token refused");
    assert!(matches!(err, ClientError::Auth(Status::AuthFailed)), "{err:?}");

    // Checkout role cannot administer.
    let checkout = server.checkout(1).await;
    assert_eq!(checkout.role(), Role::Checkout);
    let err = checkout
        .create_sale(SaleCreate { sku: 1, stock: 1, limit_per_user: 1, ttl_ms: 1000, hot: false, queue: None })
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Server { status: Status::Forbidden, .. }), "{err:?}");
    let err = checkout.restock(1, 1).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { status: Status::Forbidden, .. }), "{err:?}");
    assert_eq!(server.admin().await.role(), Role::Admin);

    // No HELLO at all: every request is refused as unauthenticated.
    let mut raw = RawConn::connect(&server.addr).await;
    raw.send(1, Request::Status { sku: 1 }).await;
    assert_eq!(raw.error_status().await, Some((1, Status::Unauthenticated)));
    // ... and a wrong HELLO closes the connection.
    raw.send(2, Request::Hello(Hello { token: Bytes::from_static(b"nope") })).await;
    match raw.next().await {
        Some((2, Reply::Hello(h))) => assert_eq!(h.status, Status::AuthFailed),
        other => panic!("expected auth_failed, got {other:?}"),
    }
    assert!(raw.next().await.is_none(), "server closes after auth_failed");
}

fn raw_frame(opcode: u8, request_id: u64, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame_with(&mut buf, opcode, request_id, |b| b.extend_from_slice(body));
    buf
}

fn reseal_header(frame: &mut BytesMut) {
    let crc = crc32c(&frame[0..28]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn crc32c(bytes: &[u8]) -> u32 {
    // Bitwise CRC-32C, independent of the codec's implementation.
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_an_error_and_close_only_that_connection() {
    let server = start_server().await;
    server.create_sale(1, 10, 10, 60_000, false).await;
    let bystander = server.checkout(1).await;

    let mut reserve_body = BytesMut::new();
    Reserve { sku: 1, user: 1, qty: 1, reservation_id: 5 }.encode(&mut reserve_body);
    let good = raw_frame(Opcode::Reserve as u8, 9, &reserve_body);

    let mut cases: Vec<(&str, BytesMut, u64, Status)> = Vec::new();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    cases.push(("bad magic", bad_magic, 0, Status::BadMagic));
    let mut bad_version = good.clone();
    bad_version[4] = 9;
    cases.push(("bad version", bad_version, 0, Status::UnsupportedVersion));
    let mut oversize = good.clone();
    oversize[16..20].copy_from_slice(&(stampede_protocol::limits::FRAME_BODY_BYTES_MAX as u32 + 1).to_le_bytes());
    reseal_header(&mut oversize);
    cases.push(("oversize length", oversize, 9, Status::FrameTooLarge));
    cases.push(("unknown opcode", raw_frame(0x7e, 9, b""), 9, Status::UnknownOpcode));
    cases.push(("reply opcode as request", raw_frame(0x90, 9, &reserve_body), 9, Status::UnknownOpcode));
    cases.push(("truncated body", raw_frame(Opcode::Reserve as u8, 9, &reserve_body[..20]), 9, Status::MalformedBody));
    let mut long_body = reserve_body.clone();
    long_body.put_u8(0);
    cases.push(("trailing bytes", raw_frame(Opcode::Reserve as u8, 9, &long_body), 9, Status::MalformedBody));
    let mut bad_body_crc = good.clone();
    let last = bad_body_crc.len() - 1;
    bad_body_crc[last] ^= 0x01;
    cases.push(("bad body checksum", bad_body_crc, 9, Status::BadChecksum));
    let mut bad_header_crc = good.clone();
    bad_header_crc[8] ^= 0x01;
    cases.push(("bad header checksum", bad_header_crc, 0, Status::BadChecksum));
    cases.push((
        "empty batch",
        raw_frame(Opcode::ReserveBatch as u8, 9, &0u16.to_le_bytes()),
        9,
        Status::BatchTooLarge,
    ));
    cases.push((
        "batch over the max",
        raw_frame(Opcode::ReserveBatch as u8, 9, &1025u16.to_le_bytes()),
        9,
        Status::BatchTooLarge,
    ));

    for (name, bytes, expect_id, expect_status) in cases {
        let mut conn = RawConn::authed(&server.addr, CHECKOUT_TOKEN).await;
        conn.send_bytes(&bytes).await;
        assert_eq!(conn.error_status().await, Some((expect_id, expect_status)), "{name}");
        assert!(conn.next().await.is_none(), "{name}: connection closed after the error");
        // Everyone else is unaffected.
        assert_eq!(bystander.ping().await.unwrap().status, Status::Ok, "{name}: server still serves");
    }

    // A frame cut off mid-body, then EOF: no reply is possible; nothing breaks.
    let mut conn = RawConn::authed(&server.addr, CHECKOUT_TOKEN).await;
    conn.send_bytes(&good[..good.len() - 5]).await;
    conn.write.shutdown().await.unwrap();
    assert!(conn.next().await.is_none());
    assert_eq!(bystander.ping().await.unwrap().status, Status::Ok);
    // None of the bad frames reserved anything.
    assert_eq!(bystander.status(1).await.unwrap().sale.reserved, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_replies_match_their_requests() {
    let server = start_server().await;
    server.create_sale(30, 10_000, 10_000, 60_000, true).await;
    server.create_sale(31, 10_000, 10_000, 60_000, false).await;
    let mut conn = RawConn::authed(&server.addr, CHECKOUT_TOKEN).await;
    // 2000 requests in one write, across two shards plus connection-local answers.
    let mut buf = BytesMut::new();
    let mut expected = HashSet::new();
    for i in 0..2000u64 {
        let request = match i % 4 {
            0 => Request::Reserve(Reserve { sku: 30, user: i, qty: 1, reservation_id: u128::from(i) + 1 }),
            1 => Request::Reserve(Reserve { sku: 31, user: i, qty: 1, reservation_id: u128::from(i) + 1 }),
            2 => Request::Ping,
            _ => Request::Status { sku: 30 },
        };
        request.encode_frame(100 + i, &mut buf);
        expected.insert(100 + i);
    }
    conn.send_bytes(&buf).await;
    for _ in 0..2000 {
        let (id, reply) = conn.next().await.expect("reply");
        assert!(expected.remove(&id), "unexpected or duplicate reply id {id}");
        let want = match (id - 100) % 4 {
            0 | 1 => Status::Reserved,
            _ => Status::Ok,
        };
        assert_eq!(reply.status(), Some(want), "request {id}");
    }
    assert!(expected.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_cannot_mix_up_batches() {
    let server = start_server().await;
    server.create_sale(40, 100, 100, 60_000, false).await;
    server.create_sale(41, 100, 100, 60_000, true).await;
    let mut conn = RawConn::authed(&server.addr, CHECKOUT_TOKEN).await;
    let batch = |first: u128| {
        Request::ReserveBatch(
            (0..10u64)
                .map(|i| Reserve { sku: 40 + i % 2, user: i, qty: 1, reservation_id: first + u128::from(i) })
                .collect(),
        )
    };
    // Two batches in flight under the same (misused) request id.
    let mut buf = BytesMut::new();
    batch(1000).encode_frame(77, &mut buf);
    batch(2000).encode_frame(77, &mut buf);
    conn.send_bytes(&buf).await;
    for _ in 0..2 {
        match conn.next().await {
            Some((77, Reply::Batch(results))) => {
                assert_eq!(results.len(), 10);
                assert!(results.iter().all(|o| o.status == Status::Reserved), "{results:?}");
            }
            other => panic!("expected a batch reply, got {other:?}"),
        }
    }
    let client = server.checkout(1).await;
    assert_eq!(client.status(40).await.unwrap().sale.reserved + client.status(41).await.unwrap().sale.reserved, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_and_then_resets_frees_its_connection() {
    let server = start_server().await;
    let shared = server.handle.shared.clone();
    let mut conn = RawConn::authed(&server.addr, CHECKOUT_TOKEN).await;
    assert_eq!(shared.connections_active(), 1);
    // Far more pipelined requests than the in-flight limit, replies never
    // read: the server's writer blocks on a full socket, its reader parks
    // on the in-flight limit.
    let mut buf = BytesMut::new();
    for i in 0..200_000u64 {
        Request::Ping.encode_frame(10 + i, &mut buf);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.write.write_all(&buf)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Now the client vanishes with a reset.
    let RawConn { write, read } = conn;
    let stream = read.into_inner().reunite(write).expect("same stream");
    stream.set_zero_linger().unwrap();
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shared.connections_active() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the dead connection's task never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server still serves.
    assert_eq!(server.checkout(1).await.ping().await.unwrap().status, Status::Ok);
}
