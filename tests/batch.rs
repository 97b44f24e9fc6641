//! BATCH frames and the client's coalescing, against a real server on
//! 127.0.0.1: every operation of a BATCH is answered as it would be alone,
//! and many concurrent callers sharing one coalescing connection each get
//! their own outcome, with retries that never apply twice.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::raw::RawConn;
use common::{start_server, start_server_with, CHECKOUT_TOKEN};
use stampede_protocol::client::{new_reservation_id, Client, ClientConfig};
use stampede_protocol::message::{BatchOp, Confirm, Opcode, Release, Reply, Request, Reserve};
use stampede_protocol::Status;

/// The operations of one round: reserves over two SKUs (one hot, so two
/// shards), limit and stock refusals, retries, bad arguments, unknown SKUs
/// and ids, and confirms and releases of reservations made in earlier
/// rounds.
fn round_ops(round: u64, earlier: &[u128], rng: &mut u64) -> Vec<BatchOp> {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut ops = Vec::new();
    // Ids reserved earlier in this same frame: a CONFIRM or RELEASE behind
    // them must reach their shard, as it would have alone.
    let mut this_frame: Vec<u128> = Vec::new();
    for i in 0..(40 + next() % 40) {
        let roll = next() % 100;
        let op = match roll {
            0..=49 => {
                let sku = [1, 2][(next() % 2) as usize];
                let id = (u128::from(round) << 32) | u128::from(i) | 1 << 100;
                this_frame.push(id);
                BatchOp::Reserve(Reserve { sku, user: next() % 30, qty: 1 + (next() % 3) as u32, reservation_id: id })
            }
            50..=59 if !this_frame.is_empty() && next() % 2 == 0 => {
                let id = this_frame[(next() % this_frame.len() as u64) as usize];
                if next() % 2 == 0 {
                    BatchOp::Confirm(Confirm { reservation_id: id, payment_ref: Bytes::from_static(b"same-frame") })
                } else {
                    BatchOp::Release(Release { reservation_id: id })
                }
            }
            50..=59 if !earlier.is_empty() => {
                // A retry of an earlier reservation, same arguments unknown
                // here: the server answers reserved or id_conflict.
                let id = earlier[(next() % earlier.len() as u64) as usize];
                BatchOp::Reserve(Reserve { sku: 1, user: 0, qty: 1, reservation_id: id })
            }
            60..=74 if !earlier.is_empty() => {
                let id = earlier[(next() % earlier.len() as u64) as usize];
                let payment_ref = Bytes::from(format!("pay-{}", next() % 2));
                BatchOp::Confirm(Confirm { reservation_id: id, payment_ref })
            }
            75..=89 if !earlier.is_empty() => {
                BatchOp::Release(Release { reservation_id: earlier[(next() % earlier.len() as u64) as usize] })
            }
            90..=92 => BatchOp::Reserve(Reserve { sku: 99, user: 1, qty: 1, reservation_id: new_reservation_id() }),
            93..=95 => BatchOp::Reserve(Reserve { sku: 1, user: 1, qty: 0, reservation_id: new_reservation_id() }),
            _ => BatchOp::Release(Release { reservation_id: new_reservation_id() }),
        };
        ops.push(op);
    }
    ops
}

fn alone(op: &BatchOp) -> Request {
    match op.clone() {
        BatchOp::Reserve(op) => Request::Reserve(op),
        BatchOp::Confirm(op) => Request::Confirm(op),
        BatchOp::Release(op) => Request::Release(op),
    }
}

/// Two servers with the same sales: one gets each round as one BATCH
/// frame, the other gets the same operations one frame at a time, each
/// sent after the previous one's reply. Every outcome must match, status
/// by status, and the sales must end in the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_each_operation_as_alone() {
    let seed = common::seed();
    let mut rng = seed | 1;
    let no_rate = |c: &mut stampede::server::ServerConfig| c.user_rate = None;
    let (batched, single) = (start_server_with(no_rate).await, start_server_with(no_rate).await);
    for server in [&batched, &single] {
        server.create_sale(1, 120, 4, 60_000, false).await;
        server.create_sale(2, 60, 3, 60_000, true).await;
    }
    let mut a = RawConn::authed(&batched.addr, CHECKOUT_TOKEN).await;
    let mut b = RawConn::authed(&single.addr, CHECKOUT_TOKEN).await;
    let mut earlier: Vec<u128> = Vec::new();
    let mut request_id = 10;
    let mut compared = HashMap::<Status, usize>::new();
    for round in 0..25u64 {
        let ops = round_ops(round, &earlier, &mut rng);
        request_id += 1;
        a.send(request_id, Request::Batch(ops.clone())).await;
        let (id, reply) = a.next().await.expect("BATCH answered");
        assert_eq!(id, request_id, "seed {seed}");
        let Reply::Batch(results) = reply else { panic!("seed {seed}: BATCH answered {reply:?}") };
        assert_eq!(results.len(), ops.len(), "seed {seed}: one outcome per operation");
        for (i, (op, got)) in ops.iter().zip(&results).enumerate() {
            request_id += 1;
            b.send(request_id, alone(op)).await;
            let (id, reply) = b.next().await.expect("answered");
            assert_eq!(id, request_id);
            let Reply::Outcome(want) = reply else { panic!("seed {seed}: {op:?} answered {reply:?}") };
            assert_eq!(got.status, want.status, "seed {seed}, round {round}, op {i}: {op:?}");
            *compared.entry(got.status).or_default() += 1;
            if let BatchOp::Reserve(r) = op {
                if got.status == Status::Reserved && r.reservation_id >> 100 == 1 {
                    earlier.push(r.reservation_id);
                }
            }
        }
    }
    // The rounds reached every kind of answer they were built for.
    for status in [
        Status::Reserved,
        Status::Confirmed,
        Status::Released,
        Status::LimitExceeded,
        Status::UnknownSku,
        Status::UnknownReservation,
        Status::InvalidArgument,
    ] {
        assert!(compared.get(&status).copied().unwrap_or(0) > 0, "seed {seed}: no {status} in {compared:?}");
    }
    let admin = (batched.admin().await, single.admin().await);
    for sku in [1, 2] {
        let (x, y) = (admin.0.status(sku).await.unwrap().sale, admin.1.status(sku).await.unwrap().sale);
        assert_eq!(
            (x.available, x.reserved, x.sold, x.reservations),
            (y.available, y.reserved, y.sold, y.reservations),
            "seed {seed}: sku {sku}"
        );
    }
}

/// Many callers, one connection, coalescing on: each caller's RESERVE,
/// then CONFIRM or RELEASE, gets its own outcome; the server saw BATCH
/// frames; retries with the same ids change nothing; nothing is oversold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_batches_and_keep_their_own_outcomes() {
    let server = start_server_with(|c| c.user_rate = None).await;
    let stock = 700u64;
    server.create_sale(5, stock, 1, 60_000, false).await;
    server.create_sale(6, stock, 1, 60_000, true).await;
    let mut config = ClientConfig::new(&server.addr, CHECKOUT_TOKEN);
    config.connections = 1;
    let client = Client::connect(config).await.unwrap();
    let callers = 2000u64;
    let ids: Vec<u128> = (0..callers).map(|_| new_reservation_id()).collect();
    let reserve_all = |client: Client| {
        let ids = ids.clone();
        async move {
            let tasks: Vec<_> = (0..callers)
                .map(|caller| {
                    let client = client.clone();
                    let id = ids[caller as usize];
                    tokio::spawn(async move { client.reserve(5 + caller % 2, caller, 1, id).await.unwrap().status })
                })
                .collect();
            let mut statuses = Vec::new();
            for task in tasks {
                statuses.push(task.await.unwrap());
            }
            statuses
        }
    };
    let first = reserve_all(client.clone()).await;
    let reserved: Vec<u64> = (0..callers).filter(|c| first[*c as usize] == Status::Reserved).collect();
    assert_eq!(reserved.len() as u64, 2 * stock, "each SKU sells its stock exactly");
    assert!(first.iter().all(|s| matches!(s, Status::Reserved | Status::SoldOut)), "{first:?}");
    let batched = server.handle.shared.requests.answered(Opcode::Batch, Status::Reserved);
    assert!(batched > 0, "2000 concurrent callers on one connection never shared a BATCH frame");

    // Every caller again, same ids: the reserved ones are told so again,
    // and the rest are decided afresh (still sold out).
    let again = reserve_all(client.clone()).await;
    for caller in 0..callers as usize {
        let want = if first[caller] == Status::Reserved { Status::Reserved } else { Status::SoldOut };
        assert_eq!(again[caller], want, "caller {caller}");
    }

    // Pay for the even callers, give back the odd ones, concurrently.
    let tasks: Vec<_> = reserved
        .iter()
        .map(|&caller| {
            let client = client.clone();
            let id = ids[caller as usize];
            tokio::spawn(async move {
                let outcome = if caller % 4 < 2 {
                    client.confirm(id, format!("pay-{caller}").as_bytes()).await
                } else {
                    client.release(id).await
                };
                (caller, outcome.unwrap().status)
            })
        })
        .collect();
    for task in tasks {
        let (caller, status) = task.await.unwrap();
        let want = if caller % 4 < 2 { Status::Confirmed } else { Status::Released };
        assert_eq!(status, want, "caller {caller}");
    }
    let confirmed = server.handle.shared.requests.answered(Opcode::Batch, Status::Confirmed);
    let released = server.handle.shared.requests.answered(Opcode::Batch, Status::Released);
    assert!(confirmed + released > 0, "confirms and releases were never coalesced");
    for sku in [5u64, 6] {
        let sale = client.status(sku).await.unwrap().sale;
        let sold = reserved.iter().filter(|c| 5 + *c % 2 == sku && *c % 4 < 2).count() as u64;
        assert_eq!((sale.sold, sale.reserved, sale.available), (sold, 0, stock - sold), "sku {sku}");
    }
}

/// A lone caller's request is sent as itself (coalescing adds nothing to
/// the wire at low load), and coalescing off never sends BATCH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_calls_and_coalescing_off_send_no_batch() {
    let server = start_server().await;
    server.create_sale(8, 1000, 1000, 60_000, false).await;
    let client = server.checkout(1).await;
    for user in 0..50 {
        let outcome = client.reserve(8, user, 1, new_reservation_id()).await.unwrap();
        assert_eq!(outcome.status, Status::Reserved);
    }
    let mut config = ClientConfig::new(&server.addr, CHECKOUT_TOKEN);
    config.coalesce = false;
    let plain = Client::connect(config).await.unwrap();
    let tasks: Vec<_> = (100..600u64)
        .map(|user| {
            let plain = plain.clone();
            tokio::spawn(async move { plain.reserve(8, user, 1, new_reservation_id()).await.unwrap().status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Status::Reserved);
    }
    let requests = &server.handle.shared.requests;
    assert_eq!(requests.answered(Opcode::Batch, Status::Reserved), 0);
    assert_eq!(requests.answered(Opcode::Reserve, Status::Reserved), 550);
    tokio::time::sleep(Duration::from_millis(1)).await;
}
