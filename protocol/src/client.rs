//! Async client library for checkout services (and for `stampede-ctl` and
//! the loadgen).
//!
//! - **Pipelining**: any number of calls may be in flight on one connection;
//!   each carries a request id and the reader task hands every reply to the
//!   call that sent it, in whatever order replies arrive.
//! - **Several connections**: calls are spread round-robin over
//!   `connections` sockets (one shard-hot SKU is still served in order).
//! - **Reconnects and safe retries**: when a connection drops or a reply
//!   times out, the call is sent again on a fresh connection *with the same
//!   reservation id*, which the server deduplicates, so a retry never
//!   reserves twice. `busy` replies are retried after the server's hint.
//!   A timed-out connection is not reused for new calls. RESTOCK is the one
//!   operation that is not idempotent: it is only resent if it provably
//!   never left this process (a connect failure), never after any reply.
//! - **Coalescing** (on by default, `ClientConfig::coalesce`): while a
//!   connection's previous write is under way, the RESERVE, CONFIRM and
//!   RELEASE calls queued on it are packed into one BATCH frame (PROTOCOL.md
//!   §9), the way TigerBeetle's clients batch: many concurrent callers make
//!   big frames, one caller alone still sends its request at once (no timer,
//!   no added latency at low load). Each call gets its own outcome and is
//!   retried on its own, with its own reservation id, exactly as if it had
//!   gone alone.
//! - **Following the leader of a cluster**: give several node addresses
//!   (`"a:7070,b:7070,c:7070"`). A `not_leader` answer, or a node that
//!   cannot be reached, makes the client ask the nodes who leads (CLUSTER)
//!   and move every connection there, for up to `failover_timeout`, then
//!   resend the call (with the same reservation id). A call whose outcome
//!   was unknown (the old leader died with it) answers its original
//!   outcome on the new leader: a failover is a slower call, not an error.
//!
//! # Example: a checkout service
//!
//! ```no_run
//! use stampede_protocol::client::{Client, ClientConfig};
//! use stampede_protocol::Status;
//!
//! # async fn checkout() -> Result<(), stampede_protocol::client::ClientError> {
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7070", "checkout-token")).await?;
//! // One id per purchase attempt; store it with the order so a crashed
//! // checkout process can retry (or release) with the same id.
//! let id = stampede_protocol::client::new_reservation_id();
//! let held = client.reserve(42, /* user */ 7, /* qty */ 1, id).await?;
//! match held.status {
//!     Status::Reserved => {
//!         // ... charge the card before `held.detail` (unix ms) ...
//!         let paid = true;
//!         if paid {
//!             let done = client.confirm(id, b"pi_3Nx...").await?;
//!             // `expired`: too slow; void the payment authorisation.
//!             assert!(matches!(done.status, Status::Confirmed | Status::Expired));
//!         } else {
//!             client.release(id).await?;
//!         }
//!     }
//!     Status::SoldOut | Status::LimitExceeded => { /* tell the shopper */ }
//!     other => eprintln!("could not reserve: {other}"),
//! }
//! # Ok(()) }
//! ```
//!
//! A complete runnable version is `protocol/examples/checkout.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use crate::frame::FrameCodec;
use crate::limits::{BATCH_OPS_MAX, FRAME_BODY_BYTES_MAX};
use crate::message::{
    batch, BatchOp, Confirm, Hello, NodeRole, Outcome, QueueTicket, Release, Reply, Request, Reserve, Restock, Role,
    SaleCreate, StatusReply, TicketRequest,
};
use crate::status::Status;

/// Failures of the transport or of the protocol, never domain outcomes:
/// `sold_out` arrives as `Ok(Outcome { status: SoldOut, .. })`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("authentication failed: {0}")]
    Auth(Status),
    #[error("connection lost before the reply arrived")]
    Disconnected,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("server refused the request: {status}: {message}")]
    Server { status: Status, message: String },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// True when resending the same request may succeed.
    fn is_transient(&self) -> bool {
        matches!(self, ClientError::Connect { .. } | ClientError::Disconnected | ClientError::Timeout(_))
    }
}

/// How to reach and talk to a server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub addr: String,
    pub token: String,
    /// Sockets to spread calls over.
    pub connections: usize,
    /// How long one attempt waits for its reply.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts per call (first try included) on transient failures and `busy`.
    pub max_attempts: u32,
    /// Speak TLS, trusting this configuration's roots (see [`crate::tls`]).
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// How long a call keeps looking for a leader (a failover) before it
    /// gives up with the last error.
    pub failover_timeout: Duration,
    /// Pack RESERVE, CONFIRM and RELEASE calls queued on one connection
    /// into BATCH frames (see the module doc). Off: every call is a frame
    /// of its own (to measure the server's per-request path, or for a
    /// server older than BATCH).
    pub coalesce: bool,
}

impl ClientConfig {
    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            token: token.into(),
            connections: 1,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            max_attempts: 5,
            tls: None,
            failover_timeout: Duration::from_secs(10),
            coalesce: true,
        }
    }
}

/// A fresh random reservation id (never 0). Uses the OS-seeded hasher
/// keys so that no RNG dependency is needed; 128 bits make collisions
/// between independent checkout processes negligible.
pub fn new_reservation_id() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut a = std::collections::hash_map::RandomState::new().build_hasher();
    a.write_u64(n);
    a.write_u128(nanos);
    let mut b = std::collections::hash_map::RandomState::new().build_hasher();
    b.write_u64(!n);
    let id = ((a.finish() as u128) << 64) | b.finish() as u128;
    id.max(1)
}

/// What a request id on the wire stands for.
enum Waiting {
    /// A call waiting for its reply.
    Call(oneshot::Sender<Reply>),
    /// A BATCH frame the writer packed: the request ids of its calls, in
    /// the order of its operations.
    Packed(Vec<u64>),
}

/// Request ids waiting for their reply. A std mutex: it is held for a few
/// map operations, never across an await, so an async mutex would only add
/// cost.
type Pending = Arc<std::sync::Mutex<HashMap<u64, Waiting>>>;

/// One live connection: a writer task fed by a channel and a reader task
/// that resolves pending calls.
struct Conn {
    outgoing: mpsc::Sender<(u64, Request)>,
    pending: Pending,
    /// Set by the reader task when the socket is gone; checked after a call
    /// registers itself so no call can wait on a dead connection.
    closed: Arc<AtomicBool>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.outgoing.is_closed()
    }
}

struct Inner {
    config: ClientConfig,
    /// Every node address given (`addr` split at commas).
    nodes: Vec<String>,
    /// The node the connections go to: the leader, as far as we know.
    current: std::sync::Mutex<String>,
    /// Calls that had to find a (new) leader and go again.
    failover_retries: AtomicU64,
    /// Each slot's live connection: read by every call (a shared lock, no
    /// await), replaced under the slot's `reconnecting` lock.
    slots: Vec<std::sync::RwLock<Option<Arc<Conn>>>>,
    /// One reconnect per slot at a time (an async mutex: it is held across
    /// the connect and the handshake). Calls never take it while the slot's
    /// connection is open.
    reconnecting: Vec<tokio::sync::Mutex<()>>,
    next_slot: AtomicUsize,
    next_request_id: AtomicU64,
    role: std::sync::Mutex<Role>,
}

/// A handle to a stampede server; cheap to clone and share across tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Whether a call may be sent again after it possibly reached the server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    Idempotent,
    OnlyIfUnsent,
}

impl Client {
    /// Connect (all connections eagerly, so a bad address or token fails here).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let connections = config.connections.max(1);
        let nodes: Vec<String> =
            config.addr.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
        let inner = Arc::new(Inner {
            current: std::sync::Mutex::new(nodes.first().cloned().unwrap_or_default()),
            failover_retries: AtomicU64::new(0),
            nodes,
            slots: (0..connections).map(|_| std::sync::RwLock::new(None)).collect(),
            reconnecting: (0..connections).map(|_| tokio::sync::Mutex::new(())).collect(),
            config,
            next_slot: AtomicUsize::new(0),
            next_request_id: AtomicU64::new(1),
            role: std::sync::Mutex::new(Role::None),
        });
        let client = Client { inner };
        if client.inner.nodes.len() > 1 {
            // A cluster: connect to its leader, wherever it is now.
            let deadline = tokio::time::Instant::now() + client.inner.config.failover_timeout;
            client.find_leader(deadline).await?;
        }
        for slot in 0..connections {
            client.conn(slot).await?;
        }
        Ok(client)
    }

    /// Calls so far that found a new leader and were sent again there.
    pub fn failover_retries(&self) -> u64 {
        self.inner.failover_retries.load(Ordering::Relaxed)
    }

    /// The node this client talks to (the leader, as far as it knows).
    pub fn current_node(&self) -> String {
        self.inner.current.lock().expect("current lock").clone()
    }

    /// Ask the nodes who leads until one says, or `deadline`; move every
    /// connection there. A single address is its own leader.
    async fn find_leader(&self, deadline: tokio::time::Instant) -> Result<(), ClientError> {
        if self.inner.nodes.len() <= 1 {
            return Ok(());
        }
        let mut last_err = ClientError::Disconnected;
        loop {
            let current = self.current_node();
            let mut candidates = vec![current.clone()];
            candidates.extend(self.inner.nodes.iter().filter(|n| **n != current).cloned());
            for node in candidates {
                match self.ask_cluster(&node).await {
                    Ok(reply) if matches!(reply.role, NodeRole::Leader | NodeRole::Single) => {
                        self.switch_to(&node);
                        return Ok(());
                    }
                    Ok(reply) if !reply.leader_addr.is_empty() => {
                        // A standby names the leader: check with the leader itself.
                        if let Ok(leader) = self.ask_cluster(&reply.leader_addr).await {
                            if leader.role == NodeRole::Leader {
                                self.switch_to(&reply.leader_addr);
                                return Ok(());
                            }
                        }
                    }
                    Ok(_) => last_err = ClientError::Server { status: Status::NotLeader, message: node },
                    Err(e) => last_err = e,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(last_err);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CLUSTER on a fresh connection to `node`.
    async fn ask_cluster(&self, node: &str) -> Result<crate::message::ClusterReply, ClientError> {
        let conn = self.connect_to(node).await?;
        let reply = self.send_once(&conn, Request::Cluster).await;
        conn.closed.store(true, Ordering::SeqCst);
        match reply? {
            Reply::Cluster(reply) => Ok(reply),
            Reply::Error(e) => Err(ClientError::Server { status: e.status, message: e.message }),
            other => Err(ClientError::Protocol(format!("expected a CLUSTER reply, got {other:?}"))),
        }
    }

    /// Talk to `node` from now on: every connection reconnects there.
    fn switch_to(&self, node: &str) {
        let mut current = self.inner.current.lock().expect("current lock");
        if *current != node {
            tracing::info!(from = %current, to = %node, "following the leader");
            *current = node.to_string();
        }
        for slot in &self.inner.slots {
            if let Some(conn) = slot.read().expect("slot lock").as_ref() {
                conn.closed.store(true, Ordering::SeqCst);
            }
        }
    }

    /// The role the server granted our token.
    pub fn role(&self) -> Role {
        *self.inner.role.lock().expect("role lock")
    }

    /// Get the slot's connection, (re)connecting if it is closed.
    async fn conn(&self, slot: usize) -> Result<Arc<Conn>, ClientError> {
        let live = |client: &Client| {
            let guard = client.inner.slots[slot].read().expect("slot lock");
            guard.as_ref().filter(|conn| !conn.is_closed()).cloned()
        };
        if let Some(conn) = live(self) {
            return Ok(conn);
        }
        let _reconnecting = self.inner.reconnecting[slot].lock().await;
        // Another call may have reconnected while this one waited.
        if let Some(conn) = live(self) {
            return Ok(conn);
        }
        let conn = self.connect_to(&self.current_node()).await?;
        *self.inner.slots[slot].write().expect("slot lock") = Some(conn.clone());
        Ok(conn)
    }

    /// A new authenticated connection to `addr`.
    async fn connect_to(&self, addr: &str) -> Result<Arc<Conn>, ClientError> {
        let config = &self.inner.config;
        let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
        stream.set_nodelay(true).ok();
        let conn = Arc::new(match &config.tls {
            None => spawn_conn(stream, config.coalesce),
            Some(tls) => {
                let name = crate::tls::server_name(addr)
                    .map_err(|e| ClientError::Connect { addr: addr.to_string(), source: std::io::Error::other(e) })?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let handshake = tokio::time::timeout(config.connect_timeout, connector.connect(name, stream));
                let stream = handshake
                    .await
                    .map_err(|_| ClientError::Timeout(config.connect_timeout))?
                    .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
                spawn_conn(stream, config.coalesce)
            }
        });
        // Authenticate before anyone else may use this connection.
        let hello = Request::Hello(Hello { token: Bytes::copy_from_slice(config.token.as_bytes()) });
        let reply = self.send_once(&conn, hello).await?;
        match reply {
            Reply::Hello(h) if h.status == Status::Ok => {
                *self.inner.role.lock().expect("role lock") = h.role;
            }
            Reply::Hello(h) => return Err(ClientError::Auth(h.status)),
            Reply::Error(e) => return Err(ClientError::Server { status: e.status, message: e.message }),
            other => return Err(ClientError::Protocol(format!("unexpected reply to HELLO: {other:?}"))),
        }
        Ok(conn)
    }

    /// One attempt on one connection.
    async fn send_once(&self, conn: &Conn, request: Request) -> Result<Reply, ClientError> {
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().expect("pending lock").insert(request_id, Waiting::Call(tx));
        if conn.is_closed() {
            conn.pending.lock().expect("pending lock").remove(&request_id);
            return Err(ClientError::Disconnected);
        }
        // The whole attempt (queueing behind a stalled socket included) is
        // bounded by the request timeout.
        let timeout = self.inner.config.request_timeout;
        let attempt = async {
            if conn.outgoing.send((request_id, request)).await.is_err() {
                return Err(ClientError::Disconnected);
            }
            rx.await.map_err(|_| ClientError::Disconnected)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                conn.pending.lock().expect("pending lock").remove(&request_id);
                Err(e)
            }
            Err(_) => {
                conn.pending.lock().expect("pending lock").remove(&request_id);
                // A connection that let a reply time out may be blackholed:
                // new calls (and this call's retry) get a fresh one. Calls
                // already waiting on it keep waiting for their replies.
                conn.closed.store(true, Ordering::SeqCst);
                Err(ClientError::Timeout(timeout))
            }
        }
    }

    /// Send with reconnects and retries; see the module doc.
    async fn call(&self, request: Request, retry: Retry) -> Result<Reply, ClientError> {
        let attempts = self.inner.config.max_attempts.max(1);
        let mut backoff = Duration::from_millis(5);
        let mut last_err = None;
        let cluster = self.inner.nodes.len() > 1;
        let mut failover_deadline = None;
        let mut attempt = 0;
        while attempt < attempts {
            attempt += 1;
            let slot = self.inner.next_slot.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
            let result = match self.conn(slot).await {
                Ok(conn) => self.send_once(&conn, request.clone()).await,
                Err(e) => Err(e),
            };
            // A failover: the node is not (or no longer) the leader, or is
            // gone. Find the leader and send again; `not_leader` did
            // nothing, and an unknown outcome is what retries with the same
            // id are for. This does not use up attempts, only time.
            let lost_leader = match &result {
                // (A leader stopping hands over to a standby: the same.)
                Ok(reply) => matches!(reply_status(reply), Some(Status::NotLeader | Status::ShuttingDown)),
                Err(e) => e.is_transient() && (retry == Retry::Idempotent || matches!(e, ClientError::Connect { .. })),
            };
            if cluster && lost_leader {
                let deadline = *failover_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + self.inner.config.failover_timeout);
                if tokio::time::Instant::now() < deadline && self.find_leader(deadline).await.is_ok() {
                    self.inner.failover_retries.fetch_add(1, Ordering::Relaxed);
                    attempt -= 1;
                    continue;
                }
            }
            match result {
                Ok(Reply::Error(e)) => return Err(ClientError::Server { status: e.status, message: e.message }),
                Ok(reply) => {
                    // A reply means the request reached the server: a
                    // non-idempotent request is never resent after that.
                    let busy = reply_busy_hint(&reply).filter(|_| retry == Retry::Idempotent);
                    match busy {
                        Some(retry_after_ms) if attempt < attempts => {
                            tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(1, 1000))).await;
                            continue;
                        }
                        _ => return Ok(reply),
                    }
                }
                Err(e) if e.is_transient() && attempt < attempts => {
                    let unsent = matches!(e, ClientError::Connect { .. });
                    if retry == Retry::OnlyIfUnsent && !unsent {
                        return Err(e);
                    }
                    tracing::debug!(attempt, error = %e, "retrying with the same request");
                    last_err = Some(e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(ClientError::Disconnected))
    }

    async fn outcome(&self, request: Request, retry: Retry) -> Result<Outcome, ClientError> {
        match self.call(request, retry).await? {
            Reply::Outcome(o) => Ok(o),
            other => Err(ClientError::Protocol(format!("expected an outcome, got {other:?}"))),
        }
    }

    /// Who leads the cluster, as the node this client talks to knows it.
    pub async fn cluster(&self) -> Result<crate::message::ClusterReply, ClientError> {
        match self.call(Request::Cluster, Retry::Idempotent).await? {
            Reply::Cluster(reply) => Ok(reply),
            other => Err(ClientError::Protocol(format!("expected a CLUSTER reply, got {other:?}"))),
        }
    }

    pub async fn ping(&self) -> Result<Outcome, ClientError> {
        self.outcome(Request::Ping, Retry::Idempotent).await
    }

    /// Hold `qty` units of `sku` for `user`. Retries reuse `reservation_id`.
    pub async fn reserve(&self, sku: u64, user: u64, qty: u32, reservation_id: u128) -> Result<Outcome, ClientError> {
        self.outcome(Request::Reserve(Reserve { sku, user, qty, reservation_id }), Retry::Idempotent).await
    }

    /// Up to `BATCH_OPS_MAX` reservations in one frame; results in order.
    pub async fn reserve_batch(&self, ops: &[Reserve]) -> Result<Vec<Outcome>, ClientError> {
        if ops.is_empty() || ops.len() > BATCH_OPS_MAX {
            return Err(ClientError::InvalidRequest(format!(
                "batch of {} ops; allowed 1..={BATCH_OPS_MAX}",
                ops.len()
            )));
        }
        match self.call(Request::ReserveBatch(ops.to_vec()), Retry::Idempotent).await? {
            Reply::Batch(results) if results.len() == ops.len() => Ok(results),
            other => Err(ClientError::Protocol(format!("expected {} batch results, got {other:?}", ops.len()))),
        }
    }

    pub async fn confirm(&self, reservation_id: u128, payment_ref: &[u8]) -> Result<Outcome, ClientError> {
        if payment_ref.len() > crate::limits::PAYMENT_REF_BYTES_MAX {
            return Err(ClientError::InvalidRequest("payment_ref longer than PAYMENT_REF_BYTES_MAX".into()));
        }
        let request = Request::Confirm(Confirm { reservation_id, payment_ref: Bytes::copy_from_slice(payment_ref) });
        self.outcome(request, Retry::Idempotent).await
    }

    pub async fn release(&self, reservation_id: u128) -> Result<Outcome, ClientError> {
        self.outcome(Request::Release(Release { reservation_id }), Retry::Idempotent).await
    }

    pub async fn status(&self, sku: u64) -> Result<StatusReply, ClientError> {
        match self.call(Request::Status { sku }, Retry::Idempotent).await? {
            Reply::Status(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("expected a status reply, got {other:?}"))),
        }
    }

    /// Join the sale's queue (idempotent: one ticket per user and sale, so
    /// joining again, from any connection, answers the same ticket).
    pub async fn join(&self, sku: u64, user: u64) -> Result<QueueTicket, ClientError> {
        self.ticket(Request::Join(TicketRequest { sku, user })).await
    }

    /// Where `user` stands in the sale's queue.
    pub async fn poll(&self, sku: u64, user: u64) -> Result<QueueTicket, ClientError> {
        self.ticket(Request::Poll(TicketRequest { sku, user })).await
    }

    async fn ticket(&self, request: Request) -> Result<QueueTicket, ClientError> {
        match self.call(request, Retry::Idempotent).await? {
            Reply::Ticket(t) => Ok(t),
            other => Err(ClientError::Protocol(format!("expected a queue ticket, got {other:?}"))),
        }
    }

    /// Admin: create a sale. A retry after success answers `sale_exists`.
    pub async fn create_sale(&self, sale: SaleCreate) -> Result<Outcome, ClientError> {
        self.outcome(Request::SaleCreate(sale), Retry::Idempotent).await
    }

    /// Admin: add stock. Not idempotent, so never resent once it may have
    /// reached the server: on `Disconnected`/`Timeout` check STATUS first.
    pub async fn restock(&self, sku: u64, qty: u64) -> Result<Outcome, ClientError> {
        self.outcome(Request::Restock(Restock { sku, qty }), Retry::OnlyIfUnsent).await
    }

    pub async fn pause(&self, sku: u64) -> Result<Outcome, ClientError> {
        self.outcome(Request::Pause { sku }, Retry::Idempotent).await
    }

    pub async fn resume(&self, sku: u64) -> Result<Outcome, ClientError> {
        self.outcome(Request::Resume { sku }, Retry::Idempotent).await
    }

    /// Admin: move a sale to a shard of its own (`dedicated`) or back to
    /// the pool, pinned there (the server's demand monitor leaves it).
    /// Idempotent: a retry finds it moved and answers `ok`. The outcome's
    /// value is how long the sale's requests were held, in microseconds.
    pub async fn move_sale(&self, sku: u64, dedicated: bool) -> Result<Outcome, ClientError> {
        self.outcome(Request::SaleMove(crate::message::SaleMove { sku, dedicated }), Retry::Idempotent).await
    }

    /// Admin: where sales run and the demand the server's monitor sees.
    pub async fn placement(&self) -> Result<crate::message::PlacementReply, ClientError> {
        match self.call(Request::Placement, Retry::Idempotent).await? {
            Reply::Placement(p) => Ok(p),
            other => Err(ClientError::Protocol(format!("expected a PLACEMENT reply, got {other:?}"))),
        }
    }

    /// Hold `qty` units of `sku` for `user` at one location: the first in
    /// `at`'s order that has them all. The outcome's `location` says which.
    /// Retries reuse `reservation_id` (and answer the original location).
    pub async fn reserve_at(
        &self,
        sku: u64,
        user: u64,
        qty: u32,
        reservation_id: u128,
        at: crate::message::Where,
    ) -> Result<Outcome, ClientError> {
        let op = crate::message::ReserveAt { op: Reserve { sku, user, qty, reservation_id }, at };
        match self.call(Request::ReserveAt(op), Retry::Idempotent).await? {
            Reply::OutcomeAt(o) | Reply::Outcome(o) => Ok(o),
            other => Err(ClientError::Protocol(format!("expected a RESERVE_AT reply, got {other:?}"))),
        }
    }

    /// A sale's locations with their counters, and its regions' orders.
    pub async fn locations(&self, sku: u64) -> Result<crate::message::LocationsReply, ClientError> {
        match self.call(Request::Locations { sku }, Retry::Idempotent).await? {
            Reply::Locations(l) => Ok(l),
            other => Err(ClientError::Protocol(format!("expected a LOCATIONS reply, got {other:?}"))),
        }
    }

    /// Admin: create a sale whose stock is split over locations (`sale.stock`
    /// must be their sum).
    pub async fn create_sale_at(
        &self,
        sale: SaleCreate,
        locations: crate::message::SaleLocations,
    ) -> Result<Outcome, ClientError> {
        self.outcome(Request::SaleCreateAt(sale, locations), Retry::Idempotent).await
    }

    /// Admin: add stock at one location. Not idempotent (as `restock`).
    pub async fn restock_at(&self, sku: u64, location: u16, qty: u64) -> Result<Outcome, ClientError> {
        let request = Request::RestockAt(crate::message::RestockAt { sku, location, qty });
        self.outcome(request, Retry::OnlyIfUnsent).await
    }

    /// Admin: a new location for a running sale. A retry that finds it
    /// added answers `location_exists`.
    pub async fn add_location(&self, sku: u64, location: u16, stock: u64) -> Result<Outcome, ClientError> {
        let request = Request::LocationAdd(crate::message::LocationAdd { sku, location, stock });
        self.outcome(request, Retry::Idempotent).await
    }

    /// Admin: the order of locations for shoppers of `region`.
    pub async fn set_region(&self, sku: u64, region: u16, order: &[u16]) -> Result<Outcome, ClientError> {
        let request = Request::RegionSet(crate::message::RegionSet { sku, region, order: order.to_vec() });
        self.outcome(request, Retry::Idempotent).await
    }

    /// Send a request and return the raw reply, without retries (tools, tests).
    pub async fn raw(&self, request: Request) -> Result<Reply, ClientError> {
        let conn = self.conn(0).await?;
        self.send_once(&conn, request).await
    }
}

/// The status of a whole reply (a batch: when every result shares it).
fn reply_status(reply: &Reply) -> Option<Status> {
    match reply {
        Reply::Batch(results) => {
            let first = results.first()?.status;
            results.iter().all(|r| r.status == first).then_some(first)
        }
        other => other.status(),
    }
}

/// `Some(retry_after_ms)` when the whole reply says "busy" (or "shutting down"). A batch with
/// some busy results is returned as is: the caller resends those ops.
fn reply_busy_hint(reply: &Reply) -> Option<u64> {
    match reply {
        Reply::Outcome(o) if o.status == Status::Busy => Some(o.detail),
        Reply::Outcome(o) if o.status == Status::ShuttingDown => Some(100),
        Reply::Outcome(o) if o.status == Status::RateLimited => Some(o.detail),
        Reply::Status(s) if s.status == Status::Busy => Some(crate::limits::BUSY_RETRY_AFTER_MS_DEFAULT),
        Reply::Ticket(t) if t.status == Status::Busy => Some(crate::limits::BUSY_RETRY_AFTER_MS_DEFAULT),
        _ => None,
    }
}

/// Request ids of the BATCH frames a connection's writer packs: the top bit
/// set, so they never meet the client's own ids (counted from 1).
const PACKED_REQUEST_ID_BIT: u64 = 1 << 63;

/// Packs a connection's queued sale calls into BATCH frames (see the
/// module doc): operations gather until a call of another kind, the batch
/// limits or the end of the queue, then leave as one frame (a lone
/// operation as its own request, unchanged on the wire).
struct Packer {
    coalesce: bool,
    pending: Pending,
    ops: Vec<BatchOp>,
    ids: Vec<u64>,
    /// Bytes the BATCH body would take with `ops`.
    body_bytes: usize,
    next_packed_id: u64,
}

impl Packer {
    fn new(coalesce: bool, pending: Pending) -> Packer {
        Packer {
            coalesce,
            pending,
            ops: Vec::new(),
            ids: Vec::new(),
            body_bytes: batch::body_bytes(0),
            next_packed_id: 0,
        }
    }

    /// Add one queued call; frames that are complete go to `buf`.
    fn push(&mut self, request_id: u64, request: Request, buf: &mut BytesMut) {
        let op = match request {
            Request::Reserve(op) if self.coalesce => BatchOp::Reserve(op),
            Request::Confirm(op) if self.coalesce => BatchOp::Confirm(op),
            Request::Release(op) if self.coalesce => BatchOp::Release(op),
            other => {
                // Order on the wire follows order of the calls.
                self.flush(buf);
                other.encode_frame(request_id, buf);
                return;
            }
        };
        if self.ops.len() == BATCH_OPS_MAX || self.body_bytes + op.wire_bytes() > FRAME_BODY_BYTES_MAX {
            self.flush(buf);
        }
        self.body_bytes += op.wire_bytes();
        self.ops.push(op);
        self.ids.push(request_id);
    }

    /// Encode what is packed: one BATCH frame, or a lone request as itself.
    fn flush(&mut self, buf: &mut BytesMut) {
        match self.ops.len() {
            0 => return,
            1 => {
                let request = match self.ops.pop().expect("one op") {
                    BatchOp::Reserve(op) => Request::Reserve(op),
                    BatchOp::Confirm(op) => Request::Confirm(op),
                    BatchOp::Release(op) => Request::Release(op),
                };
                request.encode_frame(self.ids.pop().expect("one id"), buf);
            }
            _ => {
                self.next_packed_id += 1;
                let packed_id = PACKED_REQUEST_ID_BIT | self.next_packed_id;
                let ops = std::mem::take(&mut self.ops);
                let ids = std::mem::take(&mut self.ids);
                self.pending.lock().expect("pending lock").insert(packed_id, Waiting::Packed(ids));
                Request::Batch(ops).encode_frame(packed_id, buf);
            }
        }
        self.body_bytes = batch::body_bytes(0);
    }
}

/// Hand a reply to whoever waits for `request_id`: its call, or each call
/// packed into the BATCH frame `request_id` (an ERROR to the frame is each
/// call's answer; a reply of the wrong shape fails them all with
/// `Disconnected`, and they retry with their own ids).
fn resolve(pending: &Pending, request_id: u64, reply: Reply) {
    let mut pending = pending.lock().expect("pending lock");
    match pending.remove(&request_id) {
        Some(Waiting::Call(tx)) => {
            let _ = tx.send(reply);
        }
        Some(Waiting::Packed(ids)) => match reply {
            Reply::Batch(outcomes) if outcomes.len() == ids.len() => {
                for (id, outcome) in ids.iter().zip(outcomes) {
                    if let Some(Waiting::Call(tx)) = pending.remove(id) {
                        let _ = tx.send(Reply::Outcome(outcome));
                    }
                }
            }
            Reply::Error(e) => {
                for id in &ids {
                    if let Some(Waiting::Call(tx)) = pending.remove(id) {
                        let _ = tx.send(Reply::Error(e.clone()));
                    }
                }
            }
            other => {
                tracing::warn!(?other, ops = ids.len(), "BATCH answered with the wrong shape");
                for id in &ids {
                    pending.remove(id);
                }
            }
        },
        None if request_id == 0 => {
            // A connection-level ERROR (no request id): the server closes next.
            tracing::warn!(?reply, "connection-level error from server");
        }
        // The call gave up (timed out) before its reply came.
        None => {}
    }
}

/// Spawn the writer and reader tasks for a connected stream.
fn spawn_conn<S>(stream: S, coalesce: bool) -> Conn
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, mut write_half) = tokio::io::split(stream);
    // Bounded: a caller that outpaces the socket waits here instead of
    // queueing without limit.
    let (outgoing, mut rx) = mpsc::channel::<(u64, Request)>(1024);
    let pending: Pending = Arc::default();

    let mut packer = Packer::new(coalesce, pending.clone());
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // Whatever queued while the previous write was under way goes in
        // the next one, packed (no timer: the write itself is the wait).
        while let Some((request_id, request)) = rx.recv().await {
            packer.push(request_id, request, &mut buf);
            while buf.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok((id, req)) => packer.push(id, req, &mut buf),
                    Err(_) => break,
                }
            }
            packer.flush(&mut buf);
            if write_half.write_all(&buf).await.is_err() {
                break;
            }
            buf.clear();
        }
        // Every sender is gone (the client was dropped) or the socket
        // failed: say goodbye (FIN), so the server closes its side and the
        // reader task ends, instead of the connection lingering until the
        // server's idle timeout. Dropping `rx` marks the connection closed
        // for new calls.
        let _ = write_half.shutdown().await;
    });

    let reader_pending = pending.clone();
    let closed = Arc::new(AtomicBool::new(false));
    let reader_closed = closed.clone();
    tokio::spawn(async move {
        let mut frames = FramedRead::new(read_half, FrameCodec::new());
        while let Some(Ok(frame)) = frames.next().await {
            let Ok(reply) = Reply::decode(&frame) else {
                break;
            };
            resolve(&reader_pending, frame.request_id, reply);
        }
        // Fail every waiting call: dropping the senders wakes them with
        // `Disconnected`, and they retry on a fresh connection.
        reader_closed.store(true, Ordering::SeqCst);
        reader_pending.lock().expect("pending lock").clear();
    });
    Conn { outgoing, pending, closed }
}
