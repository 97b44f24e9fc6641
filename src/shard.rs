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

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use foldhash::fast::RandomState;
use parking_lot::Mutex;
use stampede_protocol::message::{
    LocationsReply, Opcode, Outcome, QueueTicket, Reply, Reserve, SaleCreate, SaleLocations, StatusReply, Where,
};
use stampede_protocol::Status;
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::engine::{Engine, MovingSale, ReservationDirectory, SkuGauge, RESERVE_PREFETCH_AHEAD};
use crate::limits::{
    BUSY_RETRY_AFTER_MS, EXPIRY_TICK_MS, HOT_SHARDS_MAX, MOVE_HELD_OPS_MAX, SHARD_CYCLE_OPS_MAX, SHARD_QUEUE_OPS_MAX,
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
    /// A sale whose stock is split over locations.
    CreateAt(SaleCreate, Box<SaleLocations>),
    RestockAt {
        sku: u64,
        location: u16,
        qty: u64,
    },
    AddLocation {
        sku: u64,
        location: u16,
        stock: u64,
    },
    SetRegion {
        sku: u64,
        region: u16,
        order: Box<[u16]>,
    },
    Restock {
        sku: u64,
        qty: u64,
    },
    SetPaused {
        sku: u64,
        paused: bool,
    },
    /// Log a new pin for a sale that stays where it is (a move to where
    /// it already runs).
    Place {
        sku: u64,
        dedicated: bool,
        pinned: bool,
    },
}

impl AdminCmd {
    pub fn sku(&self) -> u64 {
        match self {
            AdminCmd::Create(create) | AdminCmd::CreateAt(create, _) => create.sku,
            AdminCmd::Restock { sku, .. }
            | AdminCmd::SetPaused { sku, .. }
            | AdminCmd::Place { sku, .. }
            | AdminCmd::RestockAt { sku, .. }
            | AdminCmd::AddLocation { sku, .. }
            | AdminCmd::SetRegion { sku, .. } => *sku,
        }
    }
}

/// One sale operation bound for a shard.
pub enum SaleOp {
    Reserve(Reserve),
    /// RESERVE_AT: from the first location in this order that has the units.
    ReserveAt(Reserve, Where),
    /// `sku`: the reservation's, from the id directory.
    Confirm {
        sku: u64,
        reservation_id: u128,
        payment_ref: Bytes,
    },
    Release {
        sku: u64,
        reservation_id: u128,
    },
}

impl SaleOp {
    /// The SKU it acts on.
    pub fn sku(&self) -> u64 {
        match self {
            SaleOp::Reserve(op) | SaleOp::ReserveAt(op, _) => op.sku,
            SaleOp::Confirm { sku, .. } | SaleOp::Release { sku, .. } => *sku,
        }
    }
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
    /// LOCATIONS: the sale's locations and regions.
    Locations {
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
    /// Sale `sku` is on its way here (a move): hold its requests until
    /// it arrives (`MoveIn`), up to `MOVE_HELD_OPS_MAX` operations.
    Expect {
        sku: u64,
    },
    /// Give sale `sku` up to `to`: decided after everything queued before
    /// it, logged as SALE_MOVED (with `dedicated` and `pinned`), handed
    /// over with `MoveIn` once that cycle is with the log; what arrives
    /// for the SKU afterwards is forwarded to `to`. `done` answers once
    /// the move is logged; `installed` says when `to` took the sale.
    MoveOut {
        sku: u64,
        to: Arc<ShardHandle>,
        dedicated: bool,
        pinned: bool,
        done: oneshot::Sender<AdminResult>,
        installed: oneshot::Sender<std::time::Instant>,
    },
    /// The sale a `MoveOut` gave up (`None`: the old shard did not have
    /// it; the requests held for it are refused `busy`, to be retried
    /// where the router points again).
    MoveIn {
        sku: u64,
        sale: Option<MovingSale>,
        installed: oneshot::Sender<std::time::Instant>,
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
            ShardMsg::Status { .. } | ShardMsg::Ticket { .. } | ShardMsg::Locations { .. } => 1,
            ShardMsg::Admin { .. }
            | ShardMsg::Digest { .. }
            | ShardMsg::Shutdown { .. }
            | ShardMsg::Expect { .. }
            | ShardMsg::MoveOut { .. }
            | ShardMsg::MoveIn { .. } => 0,
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
            ShardMsg::Locations { reply, .. } => {
                reply.send(Opcode::Locations, Reply::Locations(LocationsReply::of(status)))
            }
            ShardMsg::Ticket { join, reply, .. } => {
                let ticket = QueueTicket { estimated_wait_ms: retry_after_ms, ..QueueTicket::of(status) };
                reply.send(if join { Opcode::Join } else { Opcode::Poll }, Reply::Ticket(ticket))
            }
            ShardMsg::Admin { done, .. } | ShardMsg::MoveOut { done, .. } => {
                let _ = done.send((Outcome::of(status), None));
            }
            // Dropping `done` tells the waiter there is no digest. (A
            // refused move: the server is stopping, and its state is in
            // the log.)
            ShardMsg::Digest { .. } | ShardMsg::Shutdown { .. } | ShardMsg::Expect { .. } | ShardMsg::MoveIn { .. } => {
            }
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
    /// How busy the shard is (the demand monitor reads it).
    pub stats: Arc<ShardStats>,
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
            self.stats.refused_busy.fetch_add(ops as u64, Ordering::Relaxed);
            return msg.refuse(Status::Busy);
        }
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                self.queued_ops.fetch_sub(ops, Ordering::Relaxed);
                self.stats.refused_busy.fetch_add(ops as u64, Ordering::Relaxed);
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

    /// Queue a message another shard passed on (a request for a sale that
    /// moved here): counted as a request, `busy` if the queue is full.
    /// Never waits: two shards passing on to each other must not block.
    fn pass_on(&self, msg: ShardMsg) {
        let ops = msg.queued_ops();
        self.queued_ops.fetch_add(ops, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(msg) {
            self.queued_ops.fetch_sub(ops, Ordering::Relaxed);
            let status = if e.is_full() { Status::Busy } else { Status::ShuttingDown };
            e.into_inner().refuse(status);
        }
    }

    /// Send a control message around the queue bound (admin commands,
    /// moves): it waits for room rather than being refused.
    fn send_control(&self, msg: ShardMsg) -> bool {
        self.tx.send(msg).is_ok()
    }
}

/// What the demand monitor reads about a shard. Single writer for
/// `busy_ns` (the shard thread); `refused_busy` is added to by the
/// connections that find the queue full, which is the rare path.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Nanoseconds spent in cycles that had work.
    pub busy_ns: AtomicU64,
    /// Operations answered `busy` because the queue was full.
    pub refused_busy: AtomicU64,
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
    /// Moves made and the demand the monitor last saw.
    pub placement: crate::placement::PlacementStats,
    /// The id the next dedicated shard gets (ids are never reused: a
    /// retired shard's thread may still be passing requests on).
    next_shard_id: AtomicUsize,
}

/// How a move went: the admin's outcome, and how long the SKU's requests
/// were held (from the route switch to the new shard having the sale;
/// `None` if nothing moved).
#[derive(Clone, Copy, Debug)]
pub struct MoveResult {
    pub outcome: Outcome,
    pub took: Option<Duration>,
}

impl MoveResult {
    fn of(status: Status) -> Self {
        MoveResult { outcome: Outcome::of(status), took: None }
    }
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
        // (A hot engine whose sale moved back to the pool is empty.)
        let hot: Vec<_> = hot_engines
            .into_iter()
            .filter(|e| e.skus().next().is_some())
            .enumerate()
            .map(|(i, e)| {
                let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
                spawn(pool.len() + i, true, core, e)
            })
            .collect();
        let next_shard_id = AtomicUsize::new(pool.len() + hot.len());
        Arc::new(Router {
            routes,
            pool,
            hot: Mutex::new(hot),
            directory,
            clock,
            sinks,
            next_shard_id,
            placement: Default::default(),
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
        self.create_sale_at(cmd, None).await
    }

    /// Admin: create a sale, with its stock split over `locations`.
    pub async fn create_sale_at(&self, cmd: SaleCreate, locations: Option<SaleLocations>) -> Outcome {
        let _serial = self.admin.lock().await;
        if self.routes.pin().contains_key(&cmd.sku) {
            return Outcome::of(Status::SaleExists);
        }
        // Validate before spawning a hot shard for it.
        if let Err(status) = crate::engine::validate_sale(&cmd) {
            return Outcome::of(status);
        }
        if let Some(Err(status)) = locations.as_ref().map(|l| crate::engine::validate_locations(&cmd, l)) {
            return Outcome::of(status);
        }
        let shard = if cmd.hot {
            match self.spawn_dedicated() {
                Some(shard) => shard,
                None => return Outcome::of(Status::InvalidArgument),
            }
        } else {
            self.pool[pool_index(cmd.sku, self.pool.len())].clone()
        };
        let create = match locations {
            None => AdminCmd::Create(cmd),
            Some(locations) => AdminCmd::CreateAt(cmd, Box::new(locations)),
        };
        let (outcome, gauge) = admin_call(&shard, create).await;
        if let Some(gauge) = gauge.filter(|_| outcome.status == Status::Ok) {
            self.routes.pin().insert(cmd.sku, Arc::new(Route { shard, gauge }));
        } else if cmd.hot {
            self.retire_if_empty(&shard);
        }
        outcome
    }

    /// A new dedicated shard with an empty engine, pinned to the next core
    /// (`None`: `HOT_SHARDS_MAX` are running).
    fn spawn_dedicated(&self) -> Option<Arc<ShardHandle>> {
        let mut hot = self.hot.lock();
        if hot.len() >= HOT_SHARDS_MAX {
            return None;
        }
        let id = self.next_shard_id.fetch_add(1, Ordering::Relaxed);
        let core = (!self.cores.is_empty()).then(|| self.cores[hot.len() % self.cores.len()]);
        let engine = Engine::new(self.directory.clone());
        let sink = (self.sinks)(id);
        let shard = spawn_shard(id, true, core, engine, self.clock.clone(), sink, self.refusing.clone());
        hot.push(shard.clone());
        Some(shard)
    }

    /// Forget a dedicated shard no route points to any more (its sale
    /// moved back to the pool, or its creation failed): its thread ends
    /// once the last request routed to it before is passed on.
    fn retire_if_empty(&self, shard: &Arc<ShardHandle>) {
        let in_use = self.routes.pin().values().any(|route| Arc::ptr_eq(&route.shard, shard));
        if shard.hot && !in_use {
            self.hot.lock().retain(|s| !Arc::ptr_eq(s, shard));
        }
    }

    /// Dedicated shards running now.
    pub fn dedicated_shards(&self) -> usize {
        self.hot.lock().len()
    }

    /// PLACEMENT: the dedicated shards and the hottest sales the demand
    /// monitor saw in its last interval.
    pub fn placement_reply(&self) -> stampede_protocol::message::PlacementReply {
        use stampede_protocol::message::{PlacementReply, SalePlacement};
        let p = &self.placement;
        PlacementReply {
            status: Status::Ok,
            dedicated_shards: self.dedicated_shards().min(usize::from(u16::MAX)) as u16,
            dedicated_max: p.dedicated_max.load(Ordering::Relaxed).min(usize::from(u16::MAX)) as u16,
            auto: p.auto.load(Ordering::Relaxed),
            sales: p
                .top
                .lock()
                .iter()
                .map(|s| SalePlacement {
                    sku: s.sku,
                    dedicated: s.dedicated,
                    pinned: s.pinned,
                    decided_per_s: s.ops_per_s.round().min(f64::from(u32::MAX)) as u32,
                })
                .collect(),
        }
    }

    /// Admin or monitor: move sale `sku` to a shard of its own
    /// (`dedicated`) or back to its pool shard, live. The old shard
    /// decides everything queued for the SKU before the move, logs
    /// SALE_MOVED and hands the sale's tables over (nothing is copied);
    /// the new shard holds the SKU's requests that arrive meanwhile and
    /// decides them, in order, once it has the sale. The gauge stays the
    /// same, so the sold-out fast path answers throughout.
    ///
    /// `pinned`: an admin's placement, which the monitor then leaves
    /// alone. A sale already placed as asked only has its pin logged.
    pub async fn move_sale(&self, sku: u64, dedicated: bool, pinned: bool) -> MoveResult {
        let _serial = self.admin.lock().await;
        let Some(route) = self.route(sku) else {
            return MoveResult::of(Status::UnknownSku);
        };
        if route.shard.hot == dedicated {
            let cmd = AdminCmd::Place { sku, dedicated, pinned };
            return MoveResult { outcome: admin_call(&route.shard, cmd).await.0, took: None };
        }
        let to = if dedicated {
            match self.spawn_dedicated() {
                Some(shard) => shard,
                None => return MoveResult::of(Status::InvalidArgument),
            }
        } else {
            self.pool[pool_index(sku, self.pool.len())].clone()
        };
        let from = route.shard.clone();
        let started = std::time::Instant::now();
        let (done, answer) = oneshot::channel();
        let (installed, arrived) = oneshot::channel();
        let expect = ShardMsg::Expect { sku };
        let move_out = ShardMsg::MoveOut { sku, to: to.clone(), dedicated, pinned, done, installed };
        // The new shard learns first, so it holds (rather than decides
        // against no sale) what the switched route sends it.
        let (to_, from_) = (to.clone(), from.clone());
        let sent = tokio::task::spawn_blocking(move || to_.send_control(expect) && from_.send_control(move_out)).await;
        if !matches!(sent, Ok(true)) {
            return MoveResult::of(Status::ShuttingDown);
        }
        self.routes.pin().insert(sku, Arc::new(Route { shard: to.clone(), gauge: route.gauge.clone() }));
        let outcome = answer.await.map(|(outcome, _)| outcome).unwrap_or(Outcome::of(Status::ShuttingDown));
        let installed_after = arrived.await.ok().map(|at| at.saturating_duration_since(started));
        if outcome.status != Status::Ok {
            // The old shard did not have it (cannot happen under the admin
            // lock) or is stopping: point back.
            self.routes.pin().insert(sku, route.clone());
            self.retire_if_empty(&to);
            return MoveResult { outcome, took: None };
        }
        self.retire_if_empty(&from);
        if let Some(took) = installed_after {
            self.placement.record_move(took);
        }
        MoveResult { outcome, took: installed_after }
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
    // Unbounded in type; `SHARD_QUEUE_OPS_MAX` bounds it (see limits.rs).
    let (tx, rx) = crossbeam_channel::unbounded();
    let queued_ops = Arc::new(AtomicUsize::new(0));
    let shard = ShardLoop::new(engine, clock, sink, queued_ops.clone());
    let stats = shard.stats();
    let name = if hot { format!("shard-hot-{id}") } else { format!("shard-{id}") };
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(shard = id, core = core.id, "could not pin hot shard to its core");
                }
            }
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
    Arc::new(ShardHandle { id, hot, tx, refusing, queued_ops, stats, thread: Mutex::new(Some(thread)) })
}

/// A handle with no thread behind it: the simulator takes what other
/// shards pass on or hand over (`MoveIn`) from `Receiver` and queues it
/// for the shard's next cycle itself.
pub fn detached_handle(id: usize, hot: bool) -> (Arc<ShardHandle>, Receiver<ShardMsg>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = ShardHandle {
        id,
        hot,
        tx,
        refusing: Default::default(),
        queued_ops: Default::default(),
        stats: Default::default(),
        thread: Mutex::new(None),
    };
    (Arc::new(handle), rx)
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
    /// Busy time, for the demand monitor.
    stats: Arc<ShardStats>,
    /// Sales on their way here (`Expect` seen, `MoveIn` not yet): the
    /// requests held for each, in arrival order, and how many operations.
    incoming: std::collections::HashMap<u64, (Vec<ShardMsg>, usize), RandomState>,
    /// Sales moved away, and where: a request routed here before the
    /// router pointed elsewhere is passed on.
    forward: std::collections::HashMap<u64, Arc<ShardHandle>, RandomState>,
    /// Sales given up this cycle, sent once the cycle is with the log so
    /// that the new shard's records for them follow the SALE_MOVED.
    handing_over: Vec<(Arc<ShardHandle>, ShardMsg)>,
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
            stats: Default::default(),
            incoming: Default::default(),
            forward: Default::default(),
            handing_over: Vec::new(),
        }
    }

    /// What this shard tells the demand monitor.
    pub fn stats(&self) -> Arc<ShardStats> {
        self.stats.clone()
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
            let started = (!self.inbox.is_empty()).then(std::time::Instant::now);
            let stop = self.cycle();
            if let Some(started) = started {
                let busy = self.stats.busy_ns.load(Ordering::Relaxed);
                self.stats.busy_ns.store(busy + started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            if let Some(stop) = stop {
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

    /// Messages queued for the next cycle (the simulator's queue).
    pub fn queued(&self) -> usize {
        self.inbox.len()
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
        // The SALE_MOVED records are with the log writer (ahead of anything
        // the new shards will submit): the sales may go.
        for (to, msg) in self.handing_over.drain(..) {
            if !to.send_control(msg) {
                tracing::error!(shard = to.id, "a moved sale's new shard is gone");
            }
        }
        if stop.is_some() {
            // Requests held for a sale on its way here: the sale will not
            // come (its old shard refuses the move once it stops too), and
            // every request read gets a reply.
            for (_, (held, _)) in self.incoming.drain() {
                held.into_iter().for_each(|msg| msg.refuse(Status::ShuttingDown));
            }
        }
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
            SaleOp::Reserve(op) | SaleOp::ReserveAt(op, _) => self.engine.prefetch_reserve(op),
            SaleOp::Confirm { sku, reservation_id, .. } | SaleOp::Release { sku, reservation_id } => {
                self.engine.prefetch_reservation(*sku, *reservation_id)
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
                SaleOp::ReserveAt(op, at) => engine.reserve_at(op, at, now_ms, events),
                SaleOp::Confirm { sku, reservation_id, payment_ref } => {
                    engine.confirm(*sku, *reservation_id, payment_ref, now_ms, events)
                }
                SaleOp::Release { sku, reservation_id } => engine.release(*sku, *reservation_id, now_ms, events),
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

    /// Pass on or hold what a move says must not be decided here yet: a
    /// message for a sale that moved away goes to its new shard (`busy`
    /// if that shard's queue is full), one for a sale on its way here
    /// waits for it (`busy` past `MOVE_HELD_OPS_MAX` operations). `None`:
    /// taken care of.
    fn divert(&mut self, sku: u64, msg: ShardMsg, ops: usize) -> Option<ShardMsg> {
        if let Some(to) = self.forward.get(&sku) {
            to.pass_on(msg);
            return None;
        }
        let Some((held, held_ops)) = self.incoming.get_mut(&sku) else { return Some(msg) };
        if *held_ops + ops > MOVE_HELD_OPS_MAX {
            msg.refuse(Status::Busy);
        } else {
            *held_ops += ops;
            held.push(msg);
        }
        None
    }

    /// [`Self::divert`] for one connection's operations: those of moving
    /// sales are split off, per SKU in their order; the rest are returned.
    fn divert_ops(
        &mut self,
        ops: Vec<(Answer, SaleOp)>,
        tx: &ConnTx,
        conn: u64,
        received: std::time::Instant,
    ) -> Vec<(Answer, SaleOp)> {
        let moving = |sku: u64| self.incoming.contains_key(&sku) || self.forward.contains_key(&sku);
        if !ops.iter().any(|(_, op)| moving(op.sku())) {
            return ops;
        }
        let mut here = Vec::with_capacity(ops.len());
        let mut diverted: Vec<(u64, Vec<(Answer, SaleOp)>)> = Vec::new();
        for (answer, op) in ops {
            let sku = op.sku();
            if !moving(sku) {
                here.push((answer, op));
            } else if let Some((_, list)) = diverted.iter_mut().find(|(s, _)| *s == sku) {
                list.push((answer, op));
            } else {
                diverted.push((sku, vec![(answer, op)]));
            }
        }
        for (sku, ops) in diverted {
            let n = ops.len();
            let msg = ShardMsg::Ops { ops, tx: tx.clone(), conn, received };
            if let Some(msg) = self.divert(sku, msg, n) {
                // (Cannot happen: `moving` said it is diverted.)
                msg.refuse(Status::Busy);
            }
        }
        here
    }

    /// Decide one message (not a stop: `run` takes those).
    fn handle(&mut self, msg: ShardMsg, now_ms: u64) {
        let msg = match msg {
            ShardMsg::Ops { ops, tx, conn, received } => {
                if self.incoming.is_empty() && self.forward.is_empty() {
                    return self.decide_ops(ops, tx, conn, received, now_ms);
                }
                let ops = self.divert_ops(ops, &tx, conn, received);
                if !ops.is_empty() {
                    self.decide_ops(ops, tx, conn, received, now_ms);
                }
                return;
            }
            ShardMsg::Expect { sku } => {
                self.forward.remove(&sku);
                self.incoming.entry(sku).or_default();
                return;
            }
            ShardMsg::MoveOut { sku, to, dedicated, pinned, done, installed } => {
                let outcome = match self.engine.move_out(sku, dedicated, pinned, now_ms, &mut self.events) {
                    Ok(sale) => {
                        self.forward.insert(sku, to.clone());
                        self.handing_over.push((to, ShardMsg::MoveIn { sku, sale: Some(sale), installed }));
                        Outcome::of(Status::Ok)
                    }
                    Err(status) => {
                        self.handing_over.push((to, ShardMsg::MoveIn { sku, sale: None, installed }));
                        Outcome::of(status)
                    }
                };
                self.replies.push(Delivery::Admin(done, (outcome, None)));
                return;
            }
            ShardMsg::MoveIn { sku, sale, installed } => {
                let (held, _) = self.incoming.remove(&sku).unwrap_or_default();
                match sale {
                    Some(sale) => {
                        self.engine.put_sale(sale);
                        let _ = installed.send(std::time::Instant::now());
                        for msg in held {
                            self.handle(msg, now_ms);
                        }
                    }
                    None => held.into_iter().for_each(|msg| msg.refuse(Status::Busy)),
                }
                return;
            }
            other => other,
        };
        let sku = match &msg {
            ShardMsg::Status { sku, .. } | ShardMsg::Ticket { sku, .. } | ShardMsg::Locations { sku, .. } => Some(*sku),
            ShardMsg::Admin { cmd, .. } => Some(cmd.sku()),
            _ => None,
        };
        let msg = match sku {
            Some(sku) => match self.divert(sku, msg, 1) {
                Some(msg) => msg,
                None => return,
            },
            None => msg,
        };
        let engine = &mut self.engine;
        let events = &mut self.events;
        let (reply, opcode, body) = match msg {
            ShardMsg::Ops { .. } | ShardMsg::Expect { .. } | ShardMsg::MoveOut { .. } | ShardMsg::MoveIn { .. } => {
                unreachable!("taken above")
            }
            ShardMsg::Status { sku, reply } => (reply, Opcode::Status, Reply::Status(engine.status(sku, now_ms))),
            ShardMsg::Locations { sku, reply } => (reply, Opcode::Locations, Reply::Locations(engine.locations(sku))),
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
                    AdminCmd::CreateAt(create, locations) => {
                        let outcome = engine.create_sale_at(&create, Some(&locations), now_ms, events);
                        (outcome, engine.gauge(create.sku))
                    }
                    AdminCmd::RestockAt { sku, location, qty } => {
                        (engine.restock_at(sku, location, qty, now_ms, events), None)
                    }
                    AdminCmd::AddLocation { sku, location, stock } => {
                        (engine.add_location(sku, location, stock, now_ms, events), None)
                    }
                    AdminCmd::SetRegion { sku, region, order } => {
                        (engine.set_region(sku, region, &order, now_ms, events), None)
                    }
                    AdminCmd::Restock { sku, qty } => (engine.restock(sku, qty, now_ms, events), None),
                    AdminCmd::SetPaused { sku, paused } => (engine.set_paused(sku, paused, now_ms, events), None),
                    AdminCmd::Place { sku, dedicated, pinned } => {
                        (engine.place(sku, dedicated, pinned, now_ms, events), None)
                    }
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
