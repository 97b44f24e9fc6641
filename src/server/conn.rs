//! One client connection: a reader that decodes and dispatches requests,
//! and a writer that encodes replies as they arrive, in any order.
//!
//! ```text
//! socket -> FrameCodec -> Request::decode -> auth/role check
//!        -> fast path (unknown sku, sold out, paused: answered right here)
//!        -> or ShardMsg into the shard's bounded queue (full: busy; stopping: shutting_down)
//! shard  -> LogSink -> Outbound into this connection's channel -> writer -> socket
//! ```
//!
//! Backpressure: the reader takes one permit per request from a semaphore
//! of `CONNECTION_REQUESTS_INFLIGHT_MAX`; the writer gives it back once the
//! reply is written. A client that stops reading its replies therefore
//! stops being read, and holds a bounded amount of server memory.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::StreamExt;
use stampede_protocol::frame::FrameError;
use stampede_protocol::message::{
    BatchOp, ErrorReply, HelloReply, LocationsReply, Opcode, Outcome, PlacementReply, QueueTicket, Reply, Request,
    Reserve, Role, StatusReply,
};
use stampede_protocol::{FrameCodec, Status};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::FramedRead;

use super::Shared;
use crate::engine::{ReservationDirectory, SkuGauge};
use crate::limits::{BATCH_OPS_MAX, CONNECTION_REQUESTS_INFLIGHT_MAX, FRAME_BODY_BYTES_MAX, SHARD_MESSAGE_OPS_MAX};
use crate::shard::{AdminCmd, Answer, ReplyTo, SaleOp, ShardHandle, ShardMsg};
use crate::sink::ConnTx;

/// What the writer task is asked to send.
pub enum Outbound {
    /// A complete reply to the request `request_id` (which had `opcode`),
    /// read at `received` (for the latency histogram; `None`: not timed).
    Reply { request_id: u64, opcode: Opcode, reply: Reply, received: Option<std::time::Instant> },
    /// A batch was dispatched: `total` results are coming, `filled` of them
    /// already known (answered on the fast path). Always sent before any
    /// shard can answer its part, through this same channel. `batch` is a
    /// per-connection sequence number, not the client's request id, so a
    /// client that reuses a request id cannot mix two batches up.
    /// `opcode` is the batch's (RESERVE_BATCH or BATCH).
    BatchStart { batch: u64, request_id: u64, opcode: Opcode, total: u16, received: std::time::Instant },
    /// The outcomes of one shard message's operations (`ShardMsg::Ops`),
    /// each to its own frame or batch slot; read at `received`.
    Outcomes { results: Vec<(Answer, Outcome)>, received: std::time::Instant },
    /// A ready-made frame of a stream (REPLICATE, STATE_DUMP). It completes
    /// no request; `credit` goes back to the stream once it is written.
    Frame { bytes: bytes::Bytes, credit: tokio::sync::OwnedSemaphorePermit },
}

impl Outbound {
    fn error(request_id: u64, status: Status, message: impl Into<String>) -> Outbound {
        // The opcode is not used for ERROR frames (they carry 0xff).
        let reply = Reply::Error(ErrorReply { status, message: message.into() });
        Outbound::Reply { request_id, opcode: Opcode::Ping, reply, received: None }
    }
}

/// Serve one connection until it closes or breaks the protocol.
pub async fn serve<S>(stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(CONNECTION_REQUESTS_INFLIGHT_MAX));
    let writer = tokio::spawn(write_loop(write_half, rx, permits.clone(), shared.clone()));
    // Shutdown began before this connection was served: close it at once.
    let Some(mut close) = shared.close_signal() else { return };
    let mut conn = Conn {
        shared,
        tx,
        role: Role::None,
        stream: None,
        next_batch: Default::default(),
        follower: None,
        received: std::time::Instant::now(),
        staged: Vec::new(),
        router: None,
        id: NEXT_CONN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    };
    let mut frames = FramedRead::new(read_half, FrameCodec::new());
    let linger_after = conn.read_loop(&mut frames, &permits, &mut close.rx).await;
    // A log stream ends with the reader: its consumer is gone or going.
    if let Some(stream) = &conn.stream {
        stream.closed.cancel();
    }
    // Dropping our sender lets the writer finish once every in-flight reply
    // (whose senders the shards hold) is written.
    drop(conn);
    match linger_after {
        Linger::Yes => linger(frames.into_inner(), writer).await,
        Linger::No => {
            let _ = writer.await;
        }
    }
}

/// Whether closing may find the client's input unread (see `linger`).
enum Linger {
    /// We stop reading a client that may still be sending (shutdown, a
    /// protocol error, a refused HELLO).
    Yes,
    /// The client closed, broke, or went silent: nothing is unread.
    No,
}

/// Close without losing replies. A socket closed while unread input is
/// waiting in it (a pipelining client's next requests) sends a reset, and a
/// reset makes the client's kernel discard the replies it received but the
/// client has not read yet. So: keep reading and discarding input while
/// the writer sends what is owed and its FIN, then until the client closes
/// too (EOF) or `CONNECTION_CLOSE_LINGER_MS` passed.
async fn linger<R: AsyncRead + Unpin>(mut read_half: R, writer: tokio::task::JoinHandle<()>) {
    let mut sink = tokio::io::sink();
    let discard = tokio::io::copy(&mut read_half, &mut sink);
    tokio::pin!(discard);
    tokio::pin!(writer);
    let client_closed = tokio::select! {
        _ = &mut writer => false,
        _ = &mut discard => {
            let _ = writer.await;
            true
        }
    };
    if !client_closed {
        let linger = std::time::Duration::from_millis(crate::limits::CONNECTION_CLOSE_LINGER_MS);
        let _ = tokio::time::timeout(linger, discard).await;
    }
}

struct Conn {
    shared: Arc<Shared>,
    tx: ConnTx,
    role: Role,
    /// This connection's REPLICATE stream, once it started one.
    stream: Option<super::log::StreamState>,
    /// Sequence number of the next RESERVE_BATCH on this connection.
    /// (An atomic only so `&self` can bump it; one connection task uses it.)
    next_batch: std::sync::atomic::AtomicU64,
    /// The node id of the standby whose FOLLOW stream this connection
    /// carries (its FOLLOW_ACKs are counted for it).
    follower: Option<String>,
    /// When the request being dispatched was read (latency histograms).
    received: std::time::Instant,
    /// Sale operations read but not yet sent, per shard: every request a
    /// read brought in travels to its shard as one message (see
    /// `read_loop`). Few shards per connection, so a list beats a map.
    staged: Vec<Staged>,
    /// The router, once this node decides (see `dispatch`).
    router: Option<Arc<super::Router>>,
    /// Process-unique (shards join a cycle's replies per connection).
    id: u64,
}

/// The next connection's id.
static NEXT_CONN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One shard's operations waiting to leave together.
struct Staged {
    shard: Arc<ShardHandle>,
    ops: Vec<(Answer, SaleOp)>,
    /// When the first of them was read.
    since: std::time::Instant,
}

enum Flow {
    Continue,
    Close,
}

impl Conn {
    /// Read and dispatch until the connection should close. Sale
    /// operations are staged per shard while more frames are ready without
    /// waiting (what one socket read brought in), and leave when the input
    /// runs dry, before anything else is dispatched, and before waiting
    /// for a permit, so staging never holds a request back from a shard
    /// longer than it takes to decode what was already read.
    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        frames: &mut FramedRead<R, FrameCodec>,
        permits: &Semaphore,
        closing: &mut tokio::sync::oneshot::Receiver<()>,
    ) -> Linger {
        let linger = self.read_and_dispatch(frames, permits, closing).await;
        self.flush_staged();
        linger
    }

    async fn read_and_dispatch<R: AsyncRead + Unpin>(
        &mut self,
        frames: &mut FramedRead<R, FrameCodec>,
        permits: &Semaphore,
        closing: &mut tokio::sync::oneshot::Receiver<()>,
    ) -> Linger {
        let handshake_deadline = tokio::time::Instant::now() + self.shared.handshake_timeout;
        loop {
            // A frame already read (or readable at once) joins the staged
            // ones; `FramedRead::next` keeps its state when the future is
            // dropped unfinished, so polling it once loses nothing.
            let ready = if self.staged.is_empty() { None } else { frames.next().now_or_never() };
            let next = match ready {
                Some(next) => Some(next),
                None => {
                    self.flush_staged();
                    // At shutdown, stop reading: every request read so far
                    // gets its reply (the writer finishes them), then the
                    // connection closes.
                    tokio::select! {
                        biased;
                        _ = &mut *closing => return Linger::Yes,
                        next = self.next_frame(frames, handshake_deadline, permits) => next,
                    }
                }
            };
            // A deadline passed: the client is silent, nothing is unread.
            let Some(next) = next else { return Linger::No };
            let frame = match next {
                None => return Linger::No,
                Some(Ok(frame)) => frame,
                Some(Err(FrameError::Io(e))) => {
                    tracing::debug!(error = %e, "connection read error");
                    return Linger::No;
                }
                Some(Err(FrameError::Protocol { status, request_id, detail })) => {
                    tracing::debug!(%status, %detail, "protocol error; closing connection");
                    let _ = self.tx.send(Outbound::error(request_id.unwrap_or(0), status, detail));
                    return Linger::Yes;
                }
            };
            // One permit per request, returned by the writer with the reply.
            // Staged requests hold permits of their own: send them before
            // waiting for one, or their replies could never free it.
            match permits.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(tokio::sync::TryAcquireError::Closed) => return Linger::No,
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    self.flush_staged();
                    match permits.acquire().await {
                        Ok(permit) => permit.forget(),
                        // The writer is gone: so is the client.
                        Err(_) => return Linger::No,
                    }
                }
            }
            let request = match Request::decode(&frame) {
                Ok(request) => request,
                Err((status, detail)) => {
                    tracing::debug!(%status, %detail, "malformed request; closing connection");
                    let _ = self.tx.send(Outbound::error(frame.request_id, status, detail));
                    return Linger::Yes;
                }
            };
            self.received = std::time::Instant::now();
            if let Flow::Close = self.dispatch(frame.request_id, request, permits) {
                return Linger::Yes;
            }
        }
    }

    /// The next frame under this connection's deadlines: `None` when the
    /// connection should close (handshake or idle timeout), `Some(None)` at
    /// the end of the stream.
    async fn next_frame<R: AsyncRead + Unpin>(
        &self,
        frames: &mut FramedRead<R, FrameCodec>,
        handshake_deadline: tokio::time::Instant,
        permits: &Semaphore,
    ) -> Option<Option<Result<stampede_protocol::frame::Frame, FrameError>>> {
        loop {
            return Some(if self.role == Role::None {
                match tokio::time::timeout_at(handshake_deadline, frames.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let _ = self.tx.send(Outbound::error(
                            0,
                            Status::Unauthenticated,
                            "no HELLO within the handshake timeout",
                        ));
                        return None;
                    }
                }
            } else if self.role == Role::Replication {
                // A log consumer may send nothing for as long as the log is
                // quiet; its stream's heartbeats keep the connection alive.
                frames.next().await
            } else {
                match tokio::time::timeout(self.shared.idle_timeout, frames.next()).await {
                    Ok(next) => next,
                    // Idle with requests still in flight is a client waiting
                    // for us, not an idle client: keep waiting.
                    Err(_) if permits.available_permits() < CONNECTION_REQUESTS_INFLIGHT_MAX => continue,
                    Err(_) => {
                        tracing::debug!("closing an idle connection");
                        return None;
                    }
                }
            });
        }
    }

    fn reply(&self, request_id: u64, opcode: Opcode, reply: Reply) {
        let _ = self.tx.send(Outbound::Reply { request_id, opcode, reply, received: Some(self.received) });
    }

    fn reply_to(&self, request_id: u64) -> ReplyTo {
        ReplyTo { tx: self.tx.clone(), request_id, received: self.received }
    }

    fn dispatch(&mut self, request_id: u64, request: Request, permits: &Semaphore) -> Flow {
        let opcode = request.opcode();
        // Requests are handed on in the order they were read: whatever is
        // not staged waits for what is.
        let stageable = matches!(
            request,
            Request::Reserve(_)
                | Request::ReserveBatch(_)
                | Request::Batch(_)
                | Request::Confirm(_)
                | Request::Release(_)
        );
        if !stageable {
            self.flush_staged();
        }
        if let Request::Hello(hello) = &request {
            self.role = self.shared.tokens.role_for(&hello.token);
            let status = if self.role == Role::None { Status::AuthFailed } else { Status::Ok };
            let reply = HelloReply {
                status,
                role: self.role,
                frame_body_bytes_max: FRAME_BODY_BYTES_MAX as u32,
                batch_ops_max: BATCH_OPS_MAX as u16,
            };
            self.reply(request_id, opcode, Reply::Hello(reply));
            return if self.role == Role::None { Flow::Close } else { Flow::Continue };
        }
        if self.role == Role::None {
            let _ = self.tx.send(Outbound::error(request_id, Status::Unauthenticated, "send HELLO with a token first"));
            return Flow::Continue;
        }
        if !opcode.allowed_for(self.role) {
            let message = format!(
                "{opcode:?} needs one of the roles {}; this connection has {}",
                opcode.roles(),
                self.role.name()
            );
            let _ = self.tx.send(Outbound::error(request_id, Status::Forbidden, message));
            return Flow::Continue;
        }
        match request {
            Request::Hello(_) => unreachable!("handled above"),
            Request::Ping => {
                let now_ms = self.shared.clock.now_ms();
                self.reply(request_id, opcode, Reply::Outcome(Outcome::new(Status::Ok, now_ms)));
            }
            Request::Cluster => {
                let own_lsn = self.shared.log.as_ref().map(|log| log.local_durable_lsn());
                let reply = self.shared.cluster.describe(&self.shared.addr.to_string(), own_lsn);
                self.reply(request_id, opcode, Reply::Cluster(reply));
            }
            Request::Replicate(_)
            | Request::Settled(_)
            | Request::StateDump
            | Request::Follow(_)
            | Request::FollowAck(_)
            | Request::SnapshotFetch => self.log_request(request_id, request, permits),
            sale => {
                // Only a node that decides (the leader, a single node) has
                // shards: everyone else points at the leader.
                // (Installed once, never replaced: the connection keeps
                // its own handle, moved out while in use, so the hot path
                // touches no shared reference count.)
                if self.router.is_none() {
                    self.router = self.shared.router().cloned();
                }
                let Some(router) = self.router.take() else {
                    self.reply(request_id, opcode, refusal(&sale, Status::NotLeader));
                    return Flow::Continue;
                };
                self.sale_request(request_id, sale, &router);
                self.router = Some(router);
            }
        }
        Flow::Continue
    }

    /// A request that the shards decide (or the fast path answers).
    fn sale_request(&mut self, request_id: u64, request: Request, router: &super::Router) {
        let opcode = request.opcode();
        match request {
            Request::Placement => {
                let reply = router.placement_reply();
                self.reply(request_id, opcode, Reply::Placement(reply));
            }
            Request::Reserve(op) => {
                let answer = Answer::Alone { request_id, opcode };
                if let Some(outcome) = self.stage(answer, SaleOp::Reserve(op), router, Gauge::Decides, &[]) {
                    self.reply(request_id, opcode, Reply::Outcome(outcome));
                }
            }
            Request::ReserveAt(m) => {
                let answer = Answer::Alone { request_id, opcode };
                if let Some(outcome) = self.stage(answer, SaleOp::ReserveAt(m.op, m.at), router, Gauge::Decides, &[]) {
                    self.reply(request_id, opcode, Reply::OutcomeAt(outcome));
                }
            }
            Request::Locations { sku } => match router.route(sku) {
                None => self.reply(request_id, opcode, Reply::Locations(LocationsReply::of(Status::UnknownSku))),
                Some(route) => route.shard.submit(ShardMsg::Locations { sku, reply: self.reply_to(request_id) }),
            },
            Request::ReserveBatch(ops) => {
                let ops = ops.into_iter().map(SaleOp::Reserve);
                self.batch(request_id, opcode, ops, router);
            }
            Request::Batch(ops) => {
                let ops = ops.into_iter().map(|op| match op {
                    BatchOp::Reserve(op) => SaleOp::Reserve(op),
                    BatchOp::Confirm(c) => {
                        SaleOp::Confirm { sku: 0, reservation_id: c.reservation_id, payment_ref: c.payment_ref }
                    }
                    BatchOp::Release(r) => SaleOp::Release { sku: 0, reservation_id: r.reservation_id },
                });
                self.batch(request_id, opcode, ops, router);
            }
            Request::Confirm(confirm) => {
                let op = SaleOp::Confirm {
                    sku: 0,
                    reservation_id: confirm.reservation_id,
                    payment_ref: confirm.payment_ref,
                };
                if let Some(outcome) = self.stage(Answer::Alone { request_id, opcode }, op, router, Gauge::Decides, &[])
                {
                    self.reply(request_id, opcode, Reply::Outcome(outcome));
                }
            }
            Request::Release(release) => {
                let op = SaleOp::Release { sku: 0, reservation_id: release.reservation_id };
                if let Some(outcome) = self.stage(Answer::Alone { request_id, opcode }, op, router, Gauge::Decides, &[])
                {
                    self.reply(request_id, opcode, Reply::Outcome(outcome));
                }
            }
            Request::Status { sku } => match router.route(sku) {
                None => {
                    let reply = StatusReply { status: Status::UnknownSku, sale: Default::default() };
                    self.reply(request_id, opcode, Reply::Status(reply));
                }
                Some(route) => route.shard.submit(ShardMsg::Status { sku, reply: self.reply_to(request_id) }),
            },
            Request::Join(ticket) | Request::Poll(ticket) => {
                let join = matches!(request, Request::Join(_));
                match router.route(ticket.sku) {
                    None => self.reply(request_id, opcode, Reply::Ticket(QueueTicket::of(Status::UnknownSku))),
                    Some(route) => route.shard.submit(ShardMsg::Ticket {
                        sku: ticket.sku,
                        user: ticket.user,
                        join,
                        reply: self.reply_to(request_id),
                    }),
                }
            }
            Request::SaleCreate(_)
            | Request::SaleCreateAt(..)
            | Request::Restock(_)
            | Request::RestockAt(_)
            | Request::LocationAdd(_)
            | Request::RegionSet(_)
            | Request::Pause { .. }
            | Request::Resume { .. }
            | Request::SaleMove(_) => {
                // Admin commands wait for the shard; run them off the read
                // loop so they do not stall this connection's pipeline.
                let shared = self.shared.clone();
                let tx = self.tx.clone();
                let received = self.received;
                tokio::spawn(async move {
                    let Some(router) = shared.router() else { return };
                    let outcome = match request {
                        Request::SaleCreate(create) => router.create_sale(create).await,
                        Request::SaleCreateAt(create, locations) => {
                            router.create_sale_at(create, Some(locations)).await
                        }
                        Request::RestockAt(r) => {
                            let cmd = AdminCmd::RestockAt { sku: r.sku, location: r.location, qty: r.qty };
                            router.admin(r.sku, cmd).await
                        }
                        Request::LocationAdd(a) => {
                            let cmd = AdminCmd::AddLocation { sku: a.sku, location: a.location, stock: a.stock };
                            router.admin(a.sku, cmd).await
                        }
                        Request::RegionSet(r) => {
                            let cmd = AdminCmd::SetRegion { sku: r.sku, region: r.region, order: r.order.into() };
                            router.admin(r.sku, cmd).await
                        }
                        Request::Restock(r) => router.admin(r.sku, AdminCmd::Restock { sku: r.sku, qty: r.qty }).await,
                        Request::Pause { sku } => router.admin(sku, AdminCmd::SetPaused { sku, paused: true }).await,
                        Request::Resume { sku } => router.admin(sku, AdminCmd::SetPaused { sku, paused: false }).await,
                        Request::SaleMove(m) => {
                            let moved = router.move_sale(m.sku, m.dedicated, true).await;
                            if moved.outcome.status == Status::Ok {
                                router.placement.admin_moves.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            // The value: how long the SKU's requests were held (us).
                            let held_us = moved.took.map_or(0, |d| d.as_micros() as u64);
                            Outcome::new(moved.outcome.status, held_us)
                        }
                        _ => unreachable!("admin requests only"),
                    };
                    let reply = Reply::Outcome(outcome);
                    let _ = tx.send(Outbound::Reply { request_id, opcode, reply, received: Some(received) });
                });
            }
            _ => unreachable!("sale requests only"),
        }
    }

    /// REPLICATE, SETTLED, STATE_DUMP and the cluster's FOLLOW, FOLLOW_ACK
    /// and SNAPSHOT_FETCH (see `log.rs`). A stream's request holds its
    /// in-flight permit for the life of the stream; FOLLOW_ACK has no reply
    /// and gives its permit back at once.
    fn log_request(&mut self, request_id: u64, request: Request, permits: &Semaphore) {
        let opcode = request.opcode();
        if let Request::FollowAck(ack) = request {
            permits.add_permits(1);
            if let (Some(log), Some(node)) = (&self.shared.log, &self.follower) {
                log.standby_ack(node, ack);
            }
            return;
        }
        let Some(log) = self.shared.log.clone() else {
            let _ = self.tx.send(Outbound::error(request_id, Status::NoLog, "this server keeps no write-ahead log"));
            return;
        };
        // The log of record is the leader's: a standby's holds records
        // that may still be cut (a consumer must never settle those).
        if !self.shared.cluster.decides() && !matches!(request, Request::Follow(_) | Request::SnapshotFetch) {
            match request {
                Request::Replicate(_) => log.refuse_replicate(Status::NotLeader, request_id, &self.tx),
                _ => self.reply(request_id, opcode, refusal(&request, Status::NotLeader)),
            }
            return;
        }
        match request {
            Request::Follow(follow) => {
                if self.stream.as_ref().is_some_and(|s| s.is_live()) {
                    log.refuse_replicate(Status::InvalidArgument, request_id, &self.tx);
                    return;
                }
                let stream = super::log::StreamState::new(follow.last_lsn + 1);
                self.stream = Some(stream.clone());
                self.follower = Some(follow.node_id.clone());
                tokio::spawn(log.follow(follow, request_id, self.tx.clone(), stream));
            }
            Request::SnapshotFetch => {
                tokio::spawn(log.snapshot_fetch(request_id, self.tx.clone()));
            }
            Request::Replicate(replicate) => {
                // One stream per connection: a second would interleave its
                // frames with the first's, and SETTLED could not say which
                // one it answers.
                if self.stream.as_ref().is_some_and(|s| s.is_live()) {
                    log.refuse_replicate(Status::InvalidArgument, request_id, &self.tx);
                    return;
                }
                let stream = super::log::StreamState::new(replicate.from_lsn);
                self.stream = Some(stream.clone());
                tokio::spawn(log.replicate(replicate.from_lsn, request_id, self.tx.clone(), stream));
            }
            Request::StateDump => {
                tokio::spawn(log.state_dump(request_id, self.tx.clone()));
            }
            Request::Settled(settled) => {
                let (status, lsn) = log.settled(settled.settled_lsn, self.stream.as_ref());
                self.reply(request_id, opcode, Reply::Outcome(Outcome::new(status, lsn)));
            }
            _ => unreachable!("log requests only"),
        }
    }

    /// The per-user RESERVE rate, in its place in the order of answers
    /// (PROTOCOL.md §6.2): `None` lets `op` through to the shard. A user
    /// over the rate is answered `rate_limited`, except for a malformed
    /// request (`invalid_argument`, whatever the rate) and a retry of a
    /// reservation id the server already knows (the shard answers its
    /// original outcome: a retry of a success is never refused). Those two
    /// checks run only for a user already over the rate, so they cost the
    /// normal path nothing.
    fn rate_limit(&self, op: &Reserve, router: &super::Router) -> Option<Outcome> {
        let retry_after_ms = self.shared.user_rate.as_ref()?.check(op.user).err()?;
        // In the engine's order: a known id first (`reserved` or
        // `id_conflict`), then the arguments.
        if router.directory.sku_of(op.reservation_id).is_some() {
            return None;
        }
        if op.qty == 0 || op.reservation_id == 0 {
            return Some(Outcome::of(Status::InvalidArgument));
        }
        Some(Outcome::new(Status::RateLimited, retry_after_ms))
    }

    /// Answer `op` at once if the fast path can (`Some`), else stage it
    /// for its shard: a RESERVE by SKU (unknown SKU, the published gauge,
    /// the per-user rate), a CONFIRM or RELEASE by reservation id
    /// (directory -> SKU -> shard; an id never seen is unknown here).
    ///
    /// `gauge` says which refusals the published gauge may give: in a
    /// batch, the operations before this one are not decided yet, so only
    /// answers they cannot change are taken (see `Gauge`).
    ///
    /// `earlier` holds the ids (with their SKUs) that RESERVEs earlier in
    /// the same batch sent to their shards: not in the directory until the
    /// shard decides them, yet a CONFIRM or RELEASE of one behind them must
    /// reach that shard, as it would have alone.
    fn stage(
        &mut self,
        answer: Answer,
        mut op: SaleOp,
        router: &super::Router,
        gauge: Gauge,
        earlier: &[(u128, u64)],
    ) -> Option<Outcome> {
        // With a choice of locations only the shard knows whether the ones
        // asked for are short (`insufficient_stock`) or empty (`sold_out`);
        // nothing at all anywhere is `sold_out` from the gauge still.
        let by_location = matches!(op, SaleOp::ReserveAt(..));
        let shard = match &mut op {
            SaleOp::Reserve(reserve) | SaleOp::ReserveAt(reserve, _) => router.with_route(reserve.sku, |route| {
                let Some(route) = route else {
                    return Err(Outcome::of(Status::UnknownSku));
                };
                let refusal = fast_refusal(&route.gauge, &router.directory, reserve).filter(|refusal| match gauge {
                    _ if by_location && refusal.status == Status::InsufficientStock => false,
                    Gauge::Decides => true,
                    Gauge::SoldOutStays => refusal.status != Status::InsufficientStock,
                    Gauge::Ignored => false,
                });
                if let Some(refusal) = refusal {
                    return Err(refusal);
                }
                // The per-user rate guards the shard: a sold-out answer
                // costs less than the check, so it is never limited.
                if let Some(refusal) = self.rate_limit(reserve, router) {
                    return Err(refusal);
                }
                Ok(self.staged_index(&route.shard))
            }),
            SaleOp::Confirm { sku, reservation_id, .. } | SaleOp::Release { sku, reservation_id } => {
                let found = router
                    .directory
                    .sku_of(*reservation_id)
                    .or_else(|| earlier.iter().rev().find(|(id, _)| id == reservation_id).map(|(_, sku)| *sku));
                // The shard finds the reservation among its SKU's.
                *sku = found.unwrap_or(0);
                match found.and_then(|sku| router.route(sku)) {
                    None => Err(Outcome::of(Status::UnknownReservation)),
                    Some(route) => Ok(self.staged_index(&route.shard)),
                }
            }
        };
        let index = match shard {
            Ok(index) => index,
            Err(outcome) => return Some(outcome),
        };
        let staged = &mut self.staged[index];
        if staged.ops.is_empty() {
            staged.since = self.received;
        }
        staged.ops.push((answer, op));
        if staged.ops.len() >= SHARD_MESSAGE_OPS_MAX {
            let ops = std::mem::take(&mut staged.ops);
            let msg = ShardMsg::Ops { ops, tx: self.tx.clone(), conn: self.id, received: staged.since };
            staged.shard.submit(msg);
        }
        None
    }

    /// The index of `shard`'s staging entry, added if new.
    fn staged_index(&mut self, shard: &Arc<ShardHandle>) -> usize {
        if let Some(index) = self.staged.iter().position(|s| s.shard.id == shard.id) {
            return index;
        }
        self.staged.push(Staged { shard: shard.clone(), ops: Vec::new(), since: self.received });
        self.staged.len() - 1
    }

    /// Send every staged operation to its shard, one message per shard.
    fn flush_staged(&mut self) {
        for staged in self.staged.drain(..) {
            if !staged.ops.is_empty() {
                let msg = ShardMsg::Ops { ops: staged.ops, tx: self.tx.clone(), conn: self.id, received: staged.since };
                staged.shard.submit(msg);
            }
        }
    }

    /// A RESERVE_BATCH or BATCH: the writer learns of the batch first,
    /// then each operation is staged for its shard like a request of its
    /// own; what the fast path answers goes to the writer in one message.
    fn batch(
        &mut self,
        request_id: u64,
        opcode: Opcode,
        ops: impl ExactSizeIterator<Item = SaleOp>,
        router: &super::Router,
    ) {
        let batch = self.next_batch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let total = ops.len() as u16;
        let received = self.received;
        // Before any shard can answer part of it (staging may send).
        let _ = self.tx.send(Outbound::BatchStart { batch, request_id, opcode, total, received });
        let mut answered = Vec::new();
        let mut gauge = Gauge::SoldOutStays;
        let mut reserved_here = Vec::new();
        for (index, op) in ops.enumerate() {
            let answer = Answer::InBatch { batch, index: index as u16 };
            // A RELEASE gives units back, and so does a CONFIRM or RELEASE
            // of a hold past its deadline (it expires then).
            if matches!(op, SaleOp::Release { .. } | SaleOp::Confirm { .. }) {
                gauge = Gauge::Ignored;
            }
            let reserving = match &op {
                SaleOp::Reserve(r) => Some((r.reservation_id, r.sku)),
                _ => None,
            };
            match self.stage(answer, op, router, gauge, &reserved_here) {
                Some(outcome) => answered.push((answer, outcome)),
                None => reserved_here.extend(reserving),
            }
        }
        if !answered.is_empty() {
            let _ = self.tx.send(Outbound::Outcomes { results: answered, received });
        }
    }
}

/// Which fast-path refusals an operation may get from the published gauge
/// (a snapshot of the SKU's counters when the frame is read).
#[derive(Clone, Copy)]
enum Gauge {
    /// Any: the operation came alone.
    Decides,
    /// In a batch: the operations before it may take units (so
    /// `insufficient_stock` could become `sold_out` by its turn) but not
    /// give any back, so `sold_out` and `paused` stand.
    SoldOutStays,
    /// In a batch after a RELEASE or CONFIRM, which may give units back
    /// that the gauge cannot show yet (a confirm of a lapsed hold expires
    /// it): the shard decides, in order.
    Ignored,
}

/// The reply that refuses `request` with `status` (nothing was done), in
/// the request's own reply shape.
fn refusal(request: &Request, status: Status) -> Reply {
    match request {
        Request::ReserveBatch(ops) => Reply::Batch(vec![Outcome::of(status); ops.len()]),
        Request::Batch(ops) => Reply::Batch(vec![Outcome::of(status); ops.len()]),
        Request::Status { .. } => Reply::Status(StatusReply { status, sale: Default::default() }),
        Request::Join(_) | Request::Poll(_) => Reply::Ticket(QueueTicket::of(status)),
        Request::Placement => Reply::Placement(PlacementReply::of(status)),
        _ => Reply::Outcome(Outcome::of(status)),
    }
}

/// Answer a RESERVE without the shard when the published gauge already
/// decides it. Truthful: `sold_out` only when the gauge read 0 at that
/// instant. A retry of an id that already holds units is never refused
/// here: only the shard knows its original outcome.
#[inline]
pub fn fast_refusal(gauge: &SkuGauge, directory: &ReservationDirectory, op: &Reserve) -> Option<Outcome> {
    let available = gauge.available();
    let paused = gauge.paused();
    if !paused && available >= u64::from(op.qty) && op.qty > 0 {
        return None;
    }
    // Invalid requests and possible retries are the shard's to answer.
    if op.qty == 0 || op.reservation_id == 0 || directory.sku_of(op.reservation_id).is_some() {
        return None;
    }
    Some(Outcome::of(if paused {
        Status::Paused
    } else if available == 0 {
        Status::SoldOut
    } else {
        Status::InsufficientStock
    }))
}

/// A batch whose parts are still arriving from shards.
struct PendingBatch {
    request_id: u64,
    opcode: Opcode,
    received: std::time::Instant,
    results: Vec<Option<Outcome>>,
    missing: usize,
}

async fn write_loop<W: AsyncWrite>(
    write_half: W,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    permits: Arc<Semaphore>,
    shared: Arc<Shared>,
) {
    let counters = &shared.requests;
    let mut write_half = std::pin::pin!(write_half);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut batches: HashMap<u64, PendingBatch> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut completed = encode(first, &mut buf, &mut batches, counters);
        // Coalesce everything already queued into one write.
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(msg) => completed += encode(msg, &mut buf, &mut batches, counters),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            if write_half.write_all(&buf).await.is_err() {
                // The peer is gone. Closing the semaphore wakes a reader
                // parked on a permit, so the connection task (and its slot
                // under CONNECTIONS_MAX) ends instead of waiting forever.
                permits.close();
                return;
            }
            buf.clear();
        }
        permits.add_permits(completed);
    }
    permits.close();
    let _ = write_half.shutdown().await;
}

/// Encode one message; returns the number of requests it completed.
fn encode(
    msg: Outbound,
    buf: &mut BytesMut,
    batches: &mut HashMap<u64, PendingBatch>,
    counters: &super::metrics::RequestCounters,
) -> usize {
    match msg {
        Outbound::Reply { request_id, opcode, reply, received } => {
            let counted = if matches!(reply, Reply::Error(_)) { None } else { Some(opcode) };
            counters.count(counted, reply.status().unwrap_or(Status::Ok));
            if let (Some(op), Some(received)) = (counted, received) {
                counters.latency(op, received.elapsed());
            }
            reply.encode_frame(opcode, request_id, buf);
            1
        }
        Outbound::BatchStart { batch, request_id, opcode, total, received } => {
            let total = usize::from(total);
            let pending = PendingBatch { request_id, opcode, received, results: vec![None; total], missing: total };
            batches.insert(batch, pending);
            0
        }
        Outbound::Outcomes { results, received } => {
            let elapsed = received.elapsed();
            let mut completed = 0;
            for (answer, outcome) in results {
                match answer {
                    Answer::Alone { request_id, opcode } => {
                        counters.count(Some(opcode), outcome.status);
                        counters.latency(opcode, elapsed);
                        let reply = if opcode == Opcode::ReserveAt {
                            Reply::OutcomeAt(outcome)
                        } else {
                            Reply::Outcome(outcome)
                        };
                        reply.encode_frame(opcode, request_id, buf);
                        completed += 1;
                    }
                    Answer::InBatch { batch, index } => {
                        completed += fill_batch(batches, batch, index, outcome, buf, counters)
                    }
                }
            }
            completed
        }
        Outbound::Frame { bytes, credit } => {
            // The stream may send its next frame once this one is queued
            // in the write buffer, which is written before the next read.
            buf.extend_from_slice(&bytes);
            drop(credit);
            0
        }
    }
}

/// Put one outcome in its batch; once the batch is whole, encode its reply
/// (returns 1: a request completed).
fn fill_batch(
    batches: &mut HashMap<u64, PendingBatch>,
    key: u64,
    index: u16,
    outcome: Outcome,
    buf: &mut BytesMut,
    counters: &super::metrics::RequestCounters,
) -> usize {
    let batch = batches.get_mut(&key).expect("BatchStart precedes its parts");
    let slot = &mut batch.results[usize::from(index)];
    debug_assert!(slot.is_none(), "batch slot answered twice");
    *slot = Some(outcome);
    batch.missing -= 1;
    if batch.missing > 0 {
        return 0;
    }
    let batch = batches.remove(&key).expect("present");
    let results: Vec<Outcome> = batch.results.into_iter().map(|r| r.expect("all answered")).collect();
    for outcome in &results {
        counters.count(Some(batch.opcode), outcome.status);
    }
    counters.latency(batch.opcode, batch.received.elapsed());
    Reply::Batch(results).encode_frame(batch.opcode, batch.request_id, buf);
    1
}
