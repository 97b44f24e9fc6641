//! Shard threads and the routing table in front of them.
//!
//! Each shard is one OS thread that owns an [`Engine`] for the SKUs routed to
//! it and drains a bounded crossbeam queue. Ordinary SKUs are spread over a
//! fixed pool of shards by SKU; a SKU created `hot` gets a shard of its own,
//! pinned to a core, so its stampede neither waits behind other SKUs nor
//! slows them down.
//!
//! Why OS threads and crossbeam, not tokio tasks: a shard is CPU-bound and
//! must never yield mid-batch or share its core with I/O tasks; crossbeam's
//! bounded channel gives a cheap `try_send` that fails fast when full, which
//! is exactly the `busy` signal.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use foldhash::fast::RandomState;
use parking_lot::Mutex;
use stampede_protocol::message::{Opcode, Outcome, QueueTicket, Reply, Reserve, SaleCreate, StatusReply};
use stampede_protocol::Status;
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::engine::{Engine, ReservationDirectory, SkuGauge, RESERVE_PREFETCH_AHEAD};
use crate::limits::{
    BUSY_RETRY_AFTER_MS, EXPIRY_TICK_MS, HOT_SHARDS_MAX, SHARD_CYCLE_OPS_MAX, SHARD_QUEUE_MESSAGES_MAX,
    SHARD_QUEUE_OPS_MAX,
};
use crate::server::conn::Outbound;
use crate::sink::{AdminResult, ConnTx, Delivery, LogSink};

/// Where a shard's reply goes.
pub struct ReplyTo {
    pub tx: ConnTx,
    pub request_id: u64,
    /// When the connection read the request (latency histograms).
    pub received: std::time::Instant,
}

#[derive(Clone, Debug)]
pub enum AdminCmd {
    Create(SaleCreate),
    Restock { sku: u64, qty: u64 },
    SetPaused { sku: u64, paused: bool },
}

/// One sale operation bound for a shard.
pub enum SaleOp {
    Reserve(Reserve),
    Confirm { reservation_id: u128, payment_ref: Bytes },
    Release { reservation_id: u128 },
}

/// Where an operation's outcome goes on its connection: a frame of its own,
/// or a slot of a batch frame that the connection's writer assembles.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// The operation came alone in the frame `request_id` with `opcode`.
    Alone { request_id: u64, opcode: Opcode },
    /// Operation `index` of the connection's batch `batch` (a
    /// per-connection sequence number, not the client's request id, so a
    /// client that reuses a request id cannot mix two batches up).
    InBatch { batch: u64, index: u16 },
}

/// A message to a shard thread.
pub enum ShardMsg {
    /// Sale operations one connection read together (single requests and
    /// parts of batch frames alike), decided in order; their outcomes go
    /// back to the connection as one message, so the hand-offs cost once
    /// per read instead of once per request.
    Ops {
        ops: Vec<(Answer, SaleOp)>,
        tx: ConnTx,
        /// The connection (process-unique): a cycle's outcomes for one
        /// connection travel back as one message.
        conn: u64,
        /// When the connection read the first of them (latency histograms).
        received: std::time::Instant,
    },
    Status {
        sku: u64,
        reply: ReplyTo,
    },
    /// JOIN (`join` true) or POLL of the sale's queue.
    Ticket {
        sku: u64,
        user: u64,
        join: bool,
        reply: ReplyTo,
    },
    Admin {
        cmd: AdminCmd,
        done: oneshot::Sender<AdminResult>,
    },
    /// State digest of this shard's SKUs (answered directly, not logged).
    Digest {
        done: oneshot::Sender<std::collections::BTreeMap<u64, u64>>,
    },
    /// Finish this cycle, hand it to the sink, say so on `done`, then
    /// answer everything that still arrives `shutting_down` until every
    /// sender is gone (so no request read by a connection goes unanswered).
    Shutdown {
        done: crossbeam_channel::Sender<()>,
    },
}

/// The engines a router starts its shards with: empty for a new server,
/// recovered from the data dir otherwise. All share one id directory.
pub struct Engines {
    pub directory: Arc<ReservationDirectory>,
    /// One engine per pool shard (ordinary SKUs, by `pool_index`).
    pub pool: Vec<Engine>,
    /// One engine per hot SKU.
    pub hot: Vec<Engine>,
}

impl Engines {
    pub fn empty(pool_shards: usize) -> Engines {
        let directory = Arc::new(ReservationDirectory::for_server());
        let pool = (0..pool_shards.max(1)).map(|_| Engine::new(directory.clone())).collect();
        Engines { directory, pool, hot: Vec::new() }
    }
}

impl ShardMsg {
    /// Engine operations this message carries (a batch counts each op).
    fn ops(&self) -> usize {
        match self {
            ShardMsg::Ops { ops, .. } => ops.len(),
            _ => 1,
        }
    }

    /// Operations this message counts against `SHARD_QUEUE_OPS_MAX`: the
    /// requests `ShardHandle::submit` queues (admin commands, digests and
    /// stops are sent around the bound and count none).
    fn queued_ops(&self) -> usize {
        match self {
            ShardMsg::Ops { ops, .. } => ops.len(),
            ShardMsg::Status { .. } | ShardMsg::Ticket { .. } => 1,
            ShardMsg::Admin { .. } | ShardMsg::Digest { .. } | ShardMsg::Shutdown { .. } => 0,
        }
    }

    /// Answer this message without deciding it: `busy` (the shard's queue
    /// is full; retry in `BUSY_RETRY_AFTER_MS`) or `shutting_down`. The one
    /// place that knows each request's refusal shape.
    pub fn refuse(self, status: Status) {
        let retry_after_ms = if status == Status::Busy { BUSY_RETRY_AFTER_MS } else { 0 };
        let outcome = Outcome::new(status, retry_after_ms);
        match self {
            ShardMsg::Ops { ops, tx, received, .. } => {
                let results = ops.into_iter().map(|(answer, _)| (answer, outcome)).collect();
                let _ = tx.send(Outbound::Outcomes { results, received });
            }
            ShardMsg::Status { reply, .. } => {
                reply.send(Opcode::Status, Reply::Status(StatusReply { status, sale: Default::default() }))
            }
            ShardMsg::Ticket { join, reply, .. } => {
                let ticket = QueueTicket { estimated_wait_ms: retry_after_ms, ..QueueTicket::of(status) };
                reply.send(if join { Opcode::Join } else { Opcode::Poll }, Reply::Ticket(ticket))
            }
            ShardMsg::Admin { done, .. } => {
                let _ = done.send((Outcome::of(status), None));
            }
            // Dropping `done` tells the waiter there is no digest.
            ShardMsg::Digest { .. } | ShardMsg::Shutdown { .. } => {}
        }
    }
}

impl ReplyTo {
    /// Hand a complete reply to the connection's writer.
    pub fn send(self, opcode: Opcode, reply: Reply) {
        let _ =
            self.tx.send(Outbound::Reply { request_id: self.request_id, opcode, reply, received: Some(self.received) });
    }
}

pub struct ShardHandle {
    pub id: usize,
    pub hot: bool,
    pub tx: Sender<ShardMsg>,
    /// The status every request is answered with instead of being queued
    /// (0: none), shared by every shard of a router: `shutting_down` once
    /// the server stops, `not_leader` once a leader is fenced,
    /// `sync_standby_unavailable` while a strict leader has no synchronous
    /// standby. One relaxed load per request; written rarely.
    refusing: Arc<AtomicU16>,
    /// Operations queued and not yet taken by the shard (see
    /// `SHARD_QUEUE_OPS_MAX`): added by `submit`, taken off by the shard.
    queued_ops: Arc<AtomicUsize>,
    /// The shard thread; it ends once every sender is gone.
    pub thread: Mutex<Option<JoinHandle<()>>>,
}

impl ShardHandle {
    /// Queue a request for the shard, or answer it at once: `busy` if the
    /// shard is saturated, `shutting_down` if the server is stopping.
    /// Either way the request gets exactly one reply.
    pub fn submit(&self, msg: ShardMsg) {
        let refusing = self.refusing.load(Ordering::Relaxed);
        if refusing != 0 {
            return msg.refuse(Status::from_code(refusing).unwrap_or(Status::ShuttingDown));
        }
        let ops = msg.queued_ops();
        let before = self.queued_ops.fetch_add(ops, Ordering::Relaxed);
        // (A message bigger than the bound still goes into an empty queue.)
        if before > 0 && before + ops > SHARD_QUEUE_OPS_MAX {
            self.queued_ops.fetch_sub(ops, Ordering::Relaxed);
            return msg.refuse(Status::Busy);
        }
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                self.queued_ops.fetch_sub(ops, Ordering::Relaxed);
                msg.refuse(Status::Busy)
            }
            Err(TrySendError::Disconnected(msg)) => {
                self.queued_ops.fetch_sub(ops, Ordering::Relaxed);
                msg.refuse(Status::ShuttingDown)
            }
        }
    }

    /// Operations waiting in the shard's queue.
    pub fn queue_len(&self) -> usize {
        self.queued_ops.load(Ordering::Relaxed)
    }
}

/// Builds the log sink of each new shard.
pub type SinkFactory = Box<dyn Fn(usize) -> Box<dyn LogSink> + Send + Sync>;

/// What a connection task needs to reach a SKU without asking anyone.
pub struct Route {
    pub shard: Arc<ShardHandle>,
    pub gauge: Arc<SkuGauge>,
}

/// The routing table: sku -> shard and gauge, plus the shard pool.
pub struct Router {
    /// Lock-free reads on every request; written once per sale creation.
    routes: papaya::HashMap<u64, Arc<Route>, RandomState>,
    pool: Vec<Arc<ShardHandle>>,
    hot: Mutex<Vec<Arc<ShardHandle>>>,
    pub directory: Arc<ReservationDirectory>,
    clock: Arc<dyn Clock>,
    sinks: SinkFactory,
    /// Cores for hot shards, handed out round-robin (empty: no pinning).
    cores: Vec<core_affinity::CoreId>,
    /// Serialises sale creation so two creates of one SKU cannot both win.
    admin: tokio::sync::Mutex<()>,
    /// Shared with every shard handle (see `ShardHandle::refusing`).
    refusing: Arc<AtomicU16>,
}

impl Router {
    /// Start a shard thread for every engine (recovered or empty) and route
    /// each of their SKUs to it.
    pub fn new(engines: Engines, clock: Arc<dyn Clock>, sinks: SinkFactory, pin_hot: bool) -> Arc<Router> {
        let Engines { directory, pool: pool_engines, hot: hot_engines } = engines;
        assert!(!pool_engines.is_empty(), "at least one pool shard");
        let mut cores = if pin_hot { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
        // Hot shards take the last cores first; the runtime and pool shards
        // float over the rest.
        cores.reverse();
        let routes = papaya::HashMap::with_hasher(RandomState::default());
        let refusing = Arc::new(AtomicU16::new(0));
        let spawn = |id: usize, hot: bool, core, engine: Engine| {
            let gauges: Vec<(u64, Arc<SkuGauge>)> =
                engine.skus().map(|sku| (sku, engine.gauge(sku).expect("listed sku"))).collect();
            let shard = spawn_shard(id, hot, core, engine, clock.clone(), sinks(id), refusing.clone());
            for (sku, gauge) in gauges {
                routes.pin().insert(sku, Arc::new(Route { shard: shard.clone(), gauge }));
            }
            shard
        };
        let pool: Vec<_> = pool_engines.into_iter().enumerate().map(|(id, e)| spawn(id, false, None, e)).collect();
        let hot: Vec<_> = hot_engines
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
                spawn(pool.len() + i, true, core, e)
            })
            .collect();
        Arc::new(Router {
            routes,
            pool,
            hot: Mutex::new(hot),
            directory,
            clock,
            sinks,
            cores,
            admin: tokio::sync::Mutex::new(()),
            refusing,
        })
    }

    /// The status requests are refused with right now, if any.
    pub fn refusing(&self) -> Option<Status> {
        Status::from_code(self.refusing.load(Ordering::Relaxed)).filter(|s| *s != Status::Ok)
    }

    /// Refuse every request with `status` from now on (`not_leader` for a
    /// fenced leader: for good). Never replaces `shutting_down`.
    pub fn refuse(&self, status: Status) {
        let _ = self.refusing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
            (current != Status::ShuttingDown.code()).then_some(status.code())
        });
    }

    /// Stop refusing with `status` (the condition passed); another
    /// refusal set meanwhile stays.
    pub fn stop_refusing(&self, status: Status) {
        let _ = self.refusing.compare_exchange(status.code(), 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Stop deciding: from now on requests are answered `shutting_down`
    /// (by the connection, or by the shard for what it finds queued behind
    /// its stop); every shard first decides what was queued before, hands
    /// its last cycle to the log sink and drops the sink. Returns once all
    /// have; the shard threads live on, refusing, until the last sender
    /// (the last connection) is gone.
    pub fn shutdown(&self) {
        self.refusing.store(Status::ShuttingDown.code(), Ordering::Relaxed);
        let shards = self.shards();
        let (done, finished) = crossbeam_channel::bounded(shards.len());
        let mut stopped = 0;
        for shard in &shards {
            if shard.tx.send(ShardMsg::Shutdown { done: done.clone() }).is_ok() {
                stopped += 1;
            }
        }
        drop(done);
        for _ in 0..stopped {
            // An error means a shard thread ended without saying so (it
            // panicked, and the process is exiting).
            if finished.recv().is_err() {
                break;
            }
        }
    }

    /// Per-SKU state digests from every shard (see `Engine::digest`).
    pub async fn digest(&self) -> std::collections::BTreeMap<u64, u64> {
        let mut all = std::collections::BTreeMap::new();
        for shard in self.shards() {
            let (done, rx) = oneshot::channel();
            let tx = shard.tx.clone();
            let sent = tokio::task::spawn_blocking(move || tx.send(ShardMsg::Digest { done }).is_ok()).await;
            if matches!(sent, Ok(true)) {
                if let Ok(part) = rx.await {
                    all.extend(part);
                }
            }
        }
        all
    }

    /// The route of a SKU, if it has a sale.
    pub fn route(&self, sku: u64) -> Option<Arc<Route>> {
        self.routes.pin().get(&sku).cloned()
    }

    /// Run `f` on the route without cloning the Arc (hot path).
    #[inline]
    pub fn with_route<R>(&self, sku: u64, f: impl FnOnce(Option<&Route>) -> R) -> R {
        let routes = self.routes.pin();
        f(routes.get(&sku).map(|r| &**r))
    }

    /// Every routed SKU with its route (metrics).
    pub fn routes(&self) -> Vec<(u64, Arc<Route>)> {
        self.routes.pin().iter().map(|(sku, route)| (*sku, route.clone())).collect()
    }

    pub fn shards(&self) -> Vec<Arc<ShardHandle>> {
        let mut all = self.pool.clone();
        all.extend(self.hot.lock().iter().cloned());
        all
    }

    /// Admin: create a sale, spawning its own shard if it is hot. The route
    /// is published only after the shard has created (and logged) the sale.
    pub async fn create_sale(&self, cmd: SaleCreate) -> Outcome {
        let _serial = self.admin.lock().await;
        if self.routes.pin().contains_key(&cmd.sku) {
            return Outcome::of(Status::SaleExists);
        }
        // Validate before spawning a hot shard for it.
        if let Err(status) = crate::engine::validate_sale(&cmd) {
            return Outcome::of(status);
        }
        let shard = if cmd.hot {
            let mut hot = self.hot.lock();
            if hot.len() >= HOT_SHARDS_MAX {
                return Outcome::of(Status::InvalidArgument);
            }
            let id = self.pool.len() + hot.len();
            let core = (!self.cores.is_empty()).then(|| self.cores[hot.len() % self.cores.len()]);
            let engine = Engine::new(self.directory.clone());
            let sink = (self.sinks)(id);
            let shard = spawn_shard(id, true, core, engine, self.clock.clone(), sink, self.refusing.clone());
            hot.push(shard.clone());
            shard
        } else {
            self.pool[pool_index(cmd.sku, self.pool.len())].clone()
        };
        let (outcome, gauge) = admin_call(&shard, AdminCmd::Create(cmd)).await;
        if let Some(gauge) = gauge.filter(|_| outcome.status == Status::Ok) {
            self.routes.pin().insert(cmd.sku, Arc::new(Route { shard, gauge }));
        }
        outcome
    }

    /// Admin: restock, pause or resume an existing sale.
    pub async fn admin(&self, sku: u64, cmd: AdminCmd) -> Outcome {
        let Some(route) = self.route(sku) else {
            return Outcome::of(Status::UnknownSku);
        };
        admin_call(&route.shard, cmd).await.0
    }
}

/// The pool shard of an ordinary SKU. Recovery uses the same function.
pub fn pool_index(sku: u64, shards: usize) -> usize {
    // Fibonacci hashing spreads sequential SKUs evenly.
    (sku.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % shards
}

async fn admin_call(shard: &ShardHandle, cmd: AdminCmd) -> AdminResult {
    let (done, rx) = oneshot::channel();
    // Admin commands are rare and must not be refused for load: block
    // (on a blocking-pool thread) rather than answer busy.
    let tx = shard.tx.clone();
    let sent = tokio::task::spawn_blocking(move || tx.send(ShardMsg::Admin { cmd, done }).is_ok()).await;
    if !matches!(sent, Ok(true)) {
        return (Outcome::of(Status::ShuttingDown), None);
    }
    rx.await.unwrap_or((Outcome::of(Status::ShuttingDown), None))
}

fn spawn_shard(
    id: usize,
    hot: bool,
    core: Option<core_affinity::CoreId>,
    engine: Engine,
    clock: Arc<dyn Clock>,
    sink: Box<dyn LogSink>,
    refusing: Arc<AtomicU16>,
) -> Arc<ShardHandle> {
    let (tx, rx) = crossbeam_channel::bounded(SHARD_QUEUE_MESSAGES_MAX);
    let queued_ops = Arc::new(AtomicUsize::new(0));
    let shard_queued_ops = queued_ops.clone();
    let name = if hot { format!("shard-hot-{id}") } else { format!("shard-{id}") };
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(shard = id, core = core.id, "could not pin hot shard to its core");
                }
            }
            let shard = ShardLoop::new(engine, clock, sink, shard_queued_ops);
            if let Some(done) = shard.run(&rx) {
                // Drain mode: nothing more is decided or logged. Whatever a
                // connection queued after the stop is refused, until the
                // last sender is dropped.
                let _ = done.send(());
                for msg in rx.iter() {
                    msg.refuse(Status::ShuttingDown);
                }
            }
        })
        .expect("spawn shard thread");
    Arc::new(ShardHandle { id, hot, tx, refusing, queued_ops, thread: Mutex::new(Some(thread)) })
}

/// A shard's state and its decision cycle. The shard thread runs it over
/// its queue ([`ShardLoop::run`]); the simulator runs the same cycles from
/// its own loop ([`ShardLoop::cycle`]).
pub struct ShardLoop {
    engine: Engine,
    clock: Arc<dyn Clock>,
    sink: Box<dyn LogSink>,
    events: Vec<crate::engine::Event>,
    replies: Vec<Delivery>,
    /// This cycle's messages (kept for its allocation).
    inbox: std::collections::VecDeque<ShardMsg>,
    /// Shared with the handle: operations still in the queue.
    queued_ops: Arc<AtomicUsize>,
    /// This cycle's `Outcomes` reply per connection: its index in `replies`.
    reply_slots: std::collections::HashMap<u64, usize, RandomState>,
    /// Queue-start shuffle seeds.
    seeds: Box<dyn FnMut() -> u64 + Send>,
}

impl ShardLoop {
    pub fn new(engine: Engine, clock: Arc<dyn Clock>, sink: Box<dyn LogSink>, queued_ops: Arc<AtomicUsize>) -> Self {
        ShardLoop {
            engine,
            clock,
            sink,
            events: Vec::new(),
            replies: Vec::new(),
            inbox: Default::default(),
            queued_ops,
            reply_slots: Default::default(),
            seeds: Box::new(|| stampede_protocol::client::new_reservation_id() as u64),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Decide until told to stop; then return the stop's `done` once the
    /// last cycle is with the sink and the sink is dropped (`None`: every
    /// sender went away first).
    fn run(mut self, rx: &Receiver<ShardMsg>) -> Option<crossbeam_channel::Sender<()>> {
        let tick = Duration::from_millis(EXPIRY_TICK_MS);
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return None,
            };
            // A cycle ends after SHARD_CYCLE_OPS_MAX operations, so the log
            // writer can fsync one cycle while the shard decides the next.
            // The cycle's messages are taken off the queue first, so that
            // deciding one RESERVE can prefetch for the ones behind it.
            if let Some(msg) = first {
                let mut ops = msg.ops();
                self.queued_ops.fetch_sub(msg.queued_ops(), Ordering::Relaxed);
                self.inbox.push_back(msg);
                while ops < SHARD_CYCLE_OPS_MAX && !matches!(self.inbox.back(), Some(ShardMsg::Shutdown { .. })) {
                    let Ok(msg) = rx.try_recv() else { break };
                    ops += msg.ops();
                    self.queued_ops.fetch_sub(msg.queued_ops(), Ordering::Relaxed);
                    self.inbox.push_back(msg);
                }
            }
            if let Some(stop) = self.cycle() {
                // The log writer may now be closed: this shard hands it
                // nothing more.
                drop(self.sink);
                return Some(stop);
            }
        }
    }

    /// Queue a message for the next cycle (the simulator's queue).
    pub fn push(&mut self, msg: ShardMsg) {
        self.inbox.push_back(msg);
    }

    /// One cycle: due expiries and queue events, then every queued message
    /// decided in order, then the cycle handed to the sink. A stop ends
    /// the cycle: its `done` is returned and nothing after it is decided.
    pub fn cycle(&mut self) -> Option<crossbeam_channel::Sender<()>> {
        let now_ms = self.clock.now_ms();
        // Expire first, so stock that is due back is back before this
        // cycle's reservations are decided.
        self.engine.expire_due(now_ms, &mut self.events);
        // Queues: starts, lapses and admissions due by now. The start's
        // shuffle seed is written to the log, so the order can be
        // recomputed.
        self.engine.queue_tick(now_ms, &mut self.seeds, &mut self.events);
        let mut stop = None;
        for msg in self.inbox.iter().take(RESERVE_PREFETCH_AHEAD) {
            self.prefetch(msg);
        }
        while let Some(msg) = self.inbox.pop_front() {
            // The message RESERVE_PREFETCH_AHEAD places behind this one.
            if let Some(ahead) = self.inbox.get(RESERVE_PREFETCH_AHEAD - 1) {
                self.prefetch(ahead);
            }
            if let ShardMsg::Shutdown { done } = msg {
                stop = Some(done);
                break;
            }
            self.handle(msg, now_ms);
        }
        // Nothing follows a stop in this cycle (see above).
        self.inbox.clear();
        if !self.events.is_empty() || !self.replies.is_empty() {
            self.sink.submit(&mut self.events, &mut self.replies);
        }
        self.reply_slots.clear();
        stop
    }

    /// Where queue-start shuffle seeds come from (default: the OS-seeded
    /// id generator; the simulator's seeded PRNG, so a run replays).
    pub fn with_seeds(mut self, seeds: Box<dyn FnMut() -> u64 + Send>) -> Self {
        self.seeds = seeds;
        self
    }

    /// Start loading what deciding `msg` will miss on (its first sale
    /// operation; `decide_ops` prefetches within the message; a hint).
    fn prefetch(&self, msg: &ShardMsg) {
        if let ShardMsg::Ops { ops, .. } = msg {
            if let Some((_, op)) = ops.first() {
                self.prefetch_op(op);
            }
        }
    }

    #[inline]
    fn prefetch_op(&self, op: &SaleOp) {
        match op {
            SaleOp::Reserve(op) => self.engine.prefetch_reserve(op),
            SaleOp::Confirm { reservation_id, .. } | SaleOp::Release { reservation_id } => {
                self.engine.prefetch_reservation(*reservation_id)
            }
        }
    }

    /// Decide one connection's operations in order, prefetching
    /// `RESERVE_PREFETCH_AHEAD` behind; one reply message for them all.
    fn decide_ops(
        &mut self,
        ops: Vec<(Answer, SaleOp)>,
        tx: ConnTx,
        conn: u64,
        received: std::time::Instant,
        now_ms: u64,
    ) {
        for (_, op) in ops.iter().take(RESERVE_PREFETCH_AHEAD).skip(1) {
            self.prefetch_op(op);
        }
        // Sold out, the requests behind will most likely be refused on
        // cached state: prefetching for them would be wasted work.
        let mut prefetching = true;
        let mut results = Vec::with_capacity(ops.len());
        for (i, (answer, op)) in ops.iter().enumerate() {
            if let Some((_, ahead)) = ops.get(i + RESERVE_PREFETCH_AHEAD).filter(|_| prefetching) {
                self.prefetch_op(ahead);
            }
            let engine = &mut self.engine;
            let events = &mut self.events;
            let outcome = match op {
                SaleOp::Reserve(op) => engine.reserve(op, now_ms, events),
                SaleOp::Confirm { reservation_id, payment_ref } => {
                    engine.confirm(*reservation_id, payment_ref, now_ms, events)
                }
                SaleOp::Release { reservation_id } => engine.release(*reservation_id, now_ms, events),
            };
            prefetching = outcome.status != Status::SoldOut;
            results.push((*answer, outcome));
        }
        // One message per connection per cycle: the cycle's replies are
        // released together, after all of its events are logged, so
        // joining them changes no order that matters. (The joined message
        // keeps the earliest read time: later ones' latency is counted from
        // it, overstated by at most one cycle.)
        if let Some(&at) = self.reply_slots.get(&conn) {
            if let Some(Delivery::Conn(_, Outbound::Outcomes { results: joined, .. })) = self.replies.get_mut(at) {
                joined.extend(results);
                return;
            }
        }
        self.reply_slots.insert(conn, self.replies.len());
        self.replies.push(Delivery::Conn(tx, Outbound::Outcomes { results, received }));
    }

    /// Decide one message (not a stop: `run` takes those).
    fn handle(&mut self, msg: ShardMsg, now_ms: u64) {
        let msg = match msg {
            ShardMsg::Ops { ops, tx, conn, received } => return self.decide_ops(ops, tx, conn, received, now_ms),
            other => other,
        };
        let engine = &mut self.engine;
        let events = &mut self.events;
        let (reply, opcode, body) = match msg {
            ShardMsg::Ops { .. } => unreachable!("decided above"),
            ShardMsg::Status { sku, reply } => (reply, Opcode::Status, Reply::Status(engine.status(sku, now_ms))),
            ShardMsg::Ticket { sku, user, join, reply } => {
                let (opcode, ticket) = if join {
                    (Opcode::Join, engine.join(sku, user, now_ms, events))
                } else {
                    (Opcode::Poll, engine.poll(sku, user, now_ms))
                };
                (reply, opcode, Reply::Ticket(ticket))
            }
            ShardMsg::Admin { cmd, done } => {
                let result = match cmd {
                    AdminCmd::Create(create) => {
                        let outcome = engine.create_sale(&create, now_ms, events);
                        (outcome, engine.gauge(create.sku))
                    }
                    AdminCmd::Restock { sku, qty } => (engine.restock(sku, qty, now_ms, events), None),
                    AdminCmd::SetPaused { sku, paused } => (engine.set_paused(sku, paused, now_ms, events), None),
                };
                self.replies.push(Delivery::Admin(done, result));
                return;
            }
            ShardMsg::Digest { done } => {
                let _ = done.send(engine.digest());
                return;
            }
            ShardMsg::Shutdown { .. } => unreachable!("run takes the stop"),
        };
        let msg = Outbound::Reply { request_id: reply.request_id, opcode, reply: body, received: Some(reply.received) };
        self.replies.push(Delivery::Conn(reply.tx, msg));
    }
}
