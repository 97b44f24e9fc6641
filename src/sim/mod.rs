//! Deterministic simulation of a stampede cluster (SIMULATION.md): the
//! real engine, shard cycles, log writer, segments, snapshots, checkpoints,
//! recovery and replication of a leader and one or two standbys, on
//! simulated disks ([`disk::SimDisk`]) with a simulated clock, driven by
//! one seeded PRNG in one thread, with many clients, faults and checks
//! against a plain model after every step.
//!
//! Everything the simulator does comes from its seed: the same seed gives
//! the same trace (its digest is in the report), so a failure replays with
//! `stampede-sim --seed S`.
//!
//! Who leads is decided by the real election ([`crate::cluster::election`])
//! against a model of etcd ([`etcd::SimEtcd`]), with the manager's lease
//! and synchronous-set rules (`LeaseKeeper`, `SyncKeeper`) on simulated
//! monotonic time and the log writer's real fence; the reconciler's rows
//! (`stampede_protocol::ledger`) follow the committed log.
//!
//! Not simulated yet (SIMULATION.md, "Not covered"): the connection layer
//! (framing, auth, rate limits, the sold-out fast path), hot shards, the
//! manager's own async loop (the simulator calls its decisions in its
//! order), more than two standbys.

pub mod disk;
pub mod etcd;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stampede_protocol::message::{HoldState, QueueConfig, Reply, Reserve, SaleCreate, SaleLocations, Where};
use stampede_protocol::{Opcode, Status};
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, ManualClock, ManualMonotonic, Monotonic};
use crate::cluster::election::{Election, Leadership};
use crate::cluster::manager::{begin_term, LeaseKeeper, SyncKeeper};
use crate::cluster::{history, ClusterConfig, StandbyInfo, SyncDegrade};
use crate::engine::{Engine, ReservationDirectory};
use crate::recovery::{self, RecoverOptions, RecoveryError, Retention};
use crate::server::conn::Outbound;
use crate::shard::{pool_index, AdminCmd, Answer, Engines, SaleOp, ShardHandle, ShardLoop, ShardMsg};
use crate::sink::AdminResult;
use crate::wal::writer::{Fence, ManualWal, WalMsg};
use crate::wal::{Durability, WalConfig};
use disk::{DiskFaults, DiskStats, SimDisk};
use etcd::{SimEtcd, SimEtcdClient};

/// SKUs on sale, their stock, and the per-user limit: small, so that
/// sell-outs, limits and contention happen within a few hundred steps.
const SKUS: [u64; 4] = [11, 12, 13, QUEUED_SKU];
/// This sale has a virtual queue: users JOIN, are admitted in order at a
/// rate, and only then may reserve. Its line opens a few simulated
/// seconds in (joins before go to the shuffled pre-queue).
const QUEUED_SKU: u64 = 14;
const QUEUE: QueueConfig =
    QueueConfig { admit_rate_per_s: 40, admit_cap: 16, admission_ms: 4_000, start_at_ms: START_MS + 3_000 };
const STOCK: u64 = 150;
/// This sale's stock is in three warehouses (STOCK in all), region 5
/// takes from 3 then 1; RESERVE_AT sends a region (5, or 9 which the sale
/// does not map), a list (4 is no warehouse of it) or neither.
const LOCATED_SKU: u64 = 13;
const WAREHOUSES: [(u16, u64); 3] = [(1, 60), (2, 50), (3, 40)];
const REGION_ORDER: (u16, [u16; 2]) = (5, [3, 1]);
const LIMIT_PER_USER: u32 = 3;
const TTL_MS: u64 = 5_000;
const CLIENTS: usize = 12;
const USERS: u64 = 80;
/// Operations a client keeps in flight at most.
const CLIENT_INFLIGHT_MAX: usize = 16;
const POOL_SHARDS: usize = 2;
/// Small segments: rotations, spares and retention happen often.
const SEGMENT_BYTES: u64 = 16 * 1024;
const DISK_BYTES: u64 = 64 << 20;
/// The clock starts here (a plausible unix time in ms).
const START_MS: u64 = 1_800_000_000_000;
/// Steps of the quiet phase at the end: no faults, every client's
/// outstanding operations must be answered within it.
const QUIESCE_STEPS: u64 = 2_000;
/// The clock steps back by less than this (SIMULATION.md: the bound).
const CLOCK_STEP_BACK_MS_MAX: u64 = 500;

/// Which fault classes a run injects (all by default; shrinking turns
/// them off one by one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    pub kill: bool,
    pub power_loss: bool,
    pub sync_fail: bool,
    pub disk_full: bool,
    pub bit_flip: bool,
    pub clock_jump: bool,
    /// The leader-standby link: broken connections, partitions, delayed
    /// acknowledgements.
    pub link: bool,
    /// The leader's lease: the leader stalls (a GC-like pause) or is cut
    /// off from etcd.
    pub lease: bool,
    /// Slow syncs: simulated time passes inside an fsync.
    pub slow_io: bool,
}

impl Faults {
    pub const ALL: Faults = Faults {
        kill: true,
        power_loss: true,
        sync_fail: true,
        disk_full: true,
        bit_flip: true,
        clock_jump: true,
        link: true,
        lease: true,
        slow_io: true,
    };
    pub const NONE: Faults = Faults {
        kill: false,
        power_loss: false,
        sync_fail: false,
        disk_full: false,
        bit_flip: false,
        clock_jump: false,
        link: false,
        lease: false,
        slow_io: false,
    };

    /// The fault classes that are on, by name.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.kill, "kill"),
            (self.power_loss, "power_loss"),
            (self.sync_fail, "sync_fail"),
            (self.disk_full, "disk_full"),
            (self.bit_flip, "bit_flip"),
            (self.clock_jump, "clock_jump"),
            (self.link, "link"),
            (self.lease, "lease"),
            (self.slow_io, "slow_io"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    /// This set with one class turned off (`index` in `names` order of ALL).
    pub fn without(&self, index: usize) -> Faults {
        let mut f = *self;
        match index {
            0 => f.kill = false,
            1 => f.power_loss = false,
            2 => f.sync_fail = false,
            3 => f.disk_full = false,
            4 => f.bit_flip = false,
            5 => f.clock_jump = false,
            6 => f.link = false,
            7 => f.lease = false,
            _ => f.slow_io = false,
        }
        f
    }
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Steps of the faulty phase (the quiet phase follows).
    pub steps: u64,
    pub faults: Faults,
    /// Keep the trace lines (the digest is always computed).
    pub trace: bool,
    /// The log's durability mode. `Async` acknowledges before fsync, so
    /// power losses must catch it losing acknowledged reservations: the
    /// test that the checks can fail.
    pub durability: Durability,
    /// A cluster: one or two standbys (by the seed) follow the leader's
    /// log, replies wait for the synchronous one, and who leads is
    /// decided through etcd. `false`: a lone node.
    pub standby: bool,
}

impl SimConfig {
    pub fn new(seed: u64, steps: u64) -> SimConfig {
        SimConfig { seed, steps, faults: Faults::ALL, trace: false, durability: Durability::Fsync, standby: true }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    /// Client operations sent (retries included) and answered.
    pub ops_sent: u64,
    pub ops_answered: u64,
    /// Reservations whose RESERVE was acknowledged.
    pub reservations_acked: u64,
    pub kills: u64,
    pub power_losses: u64,
    pub log_failures: u64,
    pub recoveries: u64,
    /// Recoveries refused because of an injected bit flip (then undone).
    pub refusals: u64,
    /// Recoveries refused because a torn write looked like a flipped bit
    /// (then started with the escape hatch, losing nothing acknowledged).
    pub torn_refusals: u64,
    /// Checkpoints (or reconciler reads) refused because of a flip
    /// recovery did not need.
    pub checkpoint_refusals: u64,
    pub checkpoints: u64,
    pub expiries_seen: u64,
    /// Records the standby took from the leader's log.
    pub replicated: u64,
    /// Leader crashes after which the standby took over.
    pub failovers: u64,
    /// Standbys built afresh from a copy of the leader's disk (after a
    /// failover, a leader restart, or a log the standby could not follow).
    pub standby_rebuilds: u64,
    pub standby_crashes: u64,
    /// Terms won in etcd (the first included).
    pub elections: u64,
    /// Leaders that lost their lease (a pause, or cut off from etcd).
    pub leases_lost: u64,
    /// Live moves of a sale between shards started.
    pub moves: u64,
    /// Changes of the synchronous set recorded in etcd, and of those the
    /// ones that left the leader alone (degraded, `--sync-degrade async`).
    pub sync_set_changes: u64,
    pub sync_set_degraded: u64,
    /// Rejoining nodes that cut records the leader does not hold (their
    /// term history parted from the leader's).
    pub tails_cut: u64,
    /// Records the reconciler applied, and how often its rows were
    /// compared with the engines (every time it caught up).
    pub reconciled: u64,
    pub ledger_checks: u64,
    /// Over the trace (see `digest_line`): equal for equal seeds.
    pub trace_digest: u64,
    pub trace: Vec<String>,
    pub disk: DiskStats,
}

/// A failed check, with what is needed to replay it.
#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub step: u64,
    pub message: String,
    /// The trace up to the failure (with `trace` on).
    pub trace_tail: Vec<String>,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} failed at step {}: {}", self.seed, self.step, self.message)?;
        writeln!(f, "replay: stampede-sim --seed {} --trace", self.seed)?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Run one seed: the faulty phase, then the quiet phase, checking after
/// every step. A panic in the code under test is a failure too.
pub fn run(config: &SimConfig) -> Result<SimReport, SimFailure> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Sim::new(config.clone()).run()));
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".to_string());
            Err(SimFailure { seed: config.seed, step: 0, message: format!("panic: {message}"), trace_tail: Vec::new() })
        }
    }
}

/// Find a smaller failing configuration: turn fault classes off while the
/// seed still fails, then cut the faulty phase to the failing step.
pub fn shrink(config: &SimConfig) -> Option<(SimConfig, SimFailure)> {
    let mut best = config.clone();
    let mut failure = run(&best).err()?;
    for index in 0..Faults::ALL.names().len() {
        let candidate = SimConfig { faults: best.faults.without(index), ..best.clone() };
        if candidate.faults == best.faults {
            continue;
        }
        if let Err(f) = run(&candidate) {
            best = candidate;
            failure = f;
        }
    }
    // A failure at step k needs no step after k.
    if failure.step > 0 && failure.step < best.steps {
        let candidate = SimConfig { steps: failure.step, ..best.clone() };
        if let Err(f) = run(&candidate) {
            best = candidate;
            failure = f;
        }
    }
    Some((best, failure))
}

#[derive(Clone, Debug)]
enum Op {
    /// RESERVE; RESERVE_AT (with `at`) for the sale in several warehouses.
    Reserve {
        sku: u64,
        user: u64,
        qty: u32,
        id: u128,
        at: Where,
    },
    Confirm {
        sku: u64,
        id: u128,
    },
    Release {
        sku: u64,
        id: u128,
    },
    /// JOIN (`join`) or POLL of a sale's queue.
    Ticket {
        sku: u64,
        user: u64,
        join: bool,
    },
}

impl Op {
    fn sku(&self) -> u64 {
        match self {
            Op::Reserve { sku, .. } | Op::Confirm { sku, .. } | Op::Release { sku, .. } | Op::Ticket { sku, .. } => {
                *sku
            }
        }
    }

    /// The operation as bytes for the trace digest: the same content as
    /// its `Debug` line, without formatting it (the digest covers every
    /// operation of every run; the text is made only with `--trace`).
    fn digest_bytes(&self, out: &mut Vec<u8>) {
        let (tag, sku, user, qty, id) = match *self {
            Op::Reserve { sku, user, qty, id, .. } => (1u8, sku, user, qty, id),
            Op::Confirm { sku, id } => (2, sku, 0, 0, id),
            Op::Release { sku, id } => (3, sku, 0, 0, id),
            Op::Ticket { sku, user, join } => (4 + u8::from(join), sku, user, 0, 0),
        };
        out.push(tag);
        out.extend_from_slice(&sku.to_le_bytes());
        out.extend_from_slice(&user.to_le_bytes());
        out.extend_from_slice(&qty.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        if let Op::Reserve { at, .. } = self {
            let region = if let Where::Region(r) = at { *r } else { 0 };
            out.extend_from_slice(&region.to_le_bytes());
            for id in at.list() {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }

    /// The reservation id (0 for a ticket).
    fn id(&self) -> u128 {
        match self {
            Op::Reserve { id, .. } | Op::Confirm { id, .. } | Op::Release { id, .. } => *id,
            Op::Ticket { .. } => 0,
        }
    }

    fn payment_ref(id: u128) -> Bytes {
        Bytes::from(format!("pay-{id:x}"))
    }

    /// The sale operation (`None`: a ticket, which travels on its own).
    fn to_sale_op(&self) -> Option<(Opcode, SaleOp)> {
        Some(match *self {
            Op::Reserve { sku, user, qty, id, at } => {
                let op = Reserve { sku, user, qty, reservation_id: id };
                if sku == LOCATED_SKU {
                    (Opcode::ReserveAt, SaleOp::ReserveAt(op, at))
                } else {
                    (Opcode::Reserve, SaleOp::Reserve(op))
                }
            }
            Op::Confirm { sku, id } => {
                (Opcode::Confirm, SaleOp::Confirm { sku, reservation_id: id, payment_ref: Op::payment_ref(id) })
            }
            Op::Release { sku, id } => (Opcode::Release, SaleOp::Release { sku, reservation_id: id }),
            Op::Ticket { .. } => return None,
        })
    }
}

/// An operation in flight, with what the model knew when it was sent.
struct Sent {
    op: Op,
    /// A retry of an operation whose answer a crash lost.
    retry: bool,
    /// Pause and resume commands sent for its SKU so far.
    pauses: u64,
    resumes: u64,
    /// The sale's acknowledged pause state, if no pause or resume was
    /// open (sent and unanswered, or lost).
    paused: Option<bool>,
    /// JOINs sent for its user of the queued sale so far (tickets).
    joins: u64,
    /// Sent while its sale moved between shards: it may be decided after
    /// a request the connection sent later (PROTOCOL.md §6.7).
    during_move: bool,
}

struct Client {
    tx: mpsc::UnboundedSender<Outbound>,
    rx: mpsc::UnboundedReceiver<Outbound>,
    conn: u64,
    next_request: u64,
    inflight: BTreeMap<u64, Sent>,
    /// Operations whose outcome a crash made unknown: retried as they were.
    unknown: Vec<Op>,
}

/// What a user of the queued sale was last shown.
#[derive(Clone, Copy, Debug)]
enum Seen {
    Waiting(u64),
    Admitted,
}

/// A sale's pause state as acknowledged, and the commands sent for it.
#[derive(Clone, Copy, Debug, Default)]
struct PauseModel {
    paused: bool,
    /// PAUSE and RESUME commands sent (answered or not).
    pauses: u64,
    resumes: u64,
    /// Commands sent and not answered (in flight, or lost in a crash).
    open: u32,
}

/// What the model knows of an acknowledged reservation.
#[derive(Clone, Debug)]
struct Acked {
    sku: u64,
    user: u64,
    qty: u32,
    expires_at_ms: u64,
    state: HoldState,
    /// The confirm time, once a CONFIRM was acknowledged.
    confirmed_at_ms: Option<u64>,
    /// The warehouse the answer named (0: a sale without warehouses).
    location: u16,
}

/// The nodes' ids in etcd; the roles move between them. A run has a
/// leader and one or two standbys (`--sync-standbys 1`: with two, one is
/// synchronous and the other follows asynchronously until it is needed).
const NODE_IDS: [&str; 3] = ["n1", "n2", "n3"];

/// The leader's lease (SIMULATION.md: the fence margin is a quarter of it).
const LEASE_TTL_MS: u64 = 2_000;

/// How often a node's manager looks at etcd (the server's poll).
const POLL_MS: u64 = crate::limits::CLUSTER_POLL_INTERVAL_MS;

/// Polls after a leader's loss within which a new one must be elected
/// (liveness).
const ELECTION_POLLS_MAX: u64 = 200;

/// What a node's cluster manager would be given. `degrade`: the leader
/// goes on without its standby after the synchronous timeout
/// (`--sync-degrade async`), a quarter of the runs.
fn cluster_config(id: usize, degrade: SyncDegrade) -> ClusterConfig {
    ClusterConfig {
        etcd: Vec::new(),
        cluster: "sim".to_string(),
        node_id: NODE_IDS[id].to_string(),
        advertise: NODE_IDS[id].to_string(),
        sync_standbys: 1,
        degrade,
        sync_timeout: std::time::Duration::from_secs(2),
        lease_ttl: std::time::Duration::from_millis(LEASE_TTL_MS),
        peer_token: String::new(),
    }
}

/// The reconciler's view of the log: the records the leader has committed,
/// applied in order with the reconciler's own code
/// (`stampede_protocol::ledger`, what settlement writes to PostgreSQL).
#[derive(Default)]
struct Ledger {
    model: stampede_protocol::ledger::Model,
    /// The last LSN applied (settled).
    applied: u64,
    /// On the current leader's log; reopened after a restart or failover.
    cursor: Option<crate::wal::follow::LogCursor>,
}

/// A leader's lease, as its manager keeps it.
struct Lease {
    /// The manager's lease rules (the real `LeaseKeeper`).
    lease: LeaseKeeper,
    /// The manager's synchronous-set policy (the real `SyncKeeper`).
    keeper: SyncKeeper,
    /// The set in force (recorded in etcd), and the last the writer was
    /// told (`None` inside: hold).
    set: Vec<String>,
    told: Option<Option<Vec<String>>>,
}

/// A synchronous standby: its own disk, its log writer (the leader's
/// records, same LSNs), its hot engines (recovery's `Replica`) and a
/// cursor on the leader's log.
struct Standby {
    /// Index into `NODE_IDS`.
    id: usize,
    disk: Arc<SimDisk>,
    mount: crate::storage::Mount,
    dir: PathBuf,
    wal: ManualWal,
    replica: crate::recovery::Replica,
    cursor: Option<crate::wal::follow::LogCursor>,
    /// Its term history (the file, kept in memory as the manager does).
    history: history::History,
    /// Acknowledgements it sent that the leader has not read yet (a TCP
    /// connection: in order, lost if it breaks).
    acks_in_flight: std::collections::VecDeque<u64>,
    /// Its link to the leader is cut until this step (a partition).
    link_down_until: u64,
    /// Its durable LSN as the leader last heard it (its handshake, then
    /// its acknowledgements), and when that last moved.
    heard: u64,
    progress: Option<std::time::Instant>,
}

struct Node {
    /// Index into `NODE_IDS`.
    id: usize,
    /// The pool shards (`POOL_SHARDS`), then shards of their own.
    shards: Vec<ShardLoop>,
    /// Each shard's handle (where a move hands a sale over and where other
    /// shards pass requests on), and what arrived through it, queued for
    /// the shard's next cycle by the simulator.
    handles: Vec<(Arc<ShardHandle>, crossbeam_channel::Receiver<ShardMsg>)>,
    /// Where each SKU's requests go (the router's table).
    routes: BTreeMap<u64, usize>,
    directory: Arc<ReservationDirectory>,
    wal: ManualWal,
    admin: Vec<(AdminCmd, oneshot::Receiver<AdminResult>)>,
    /// The writer's fence, on the simulated monotonic clock.
    fence: Arc<Fence>,
    /// While it leads (with a standby; a lone node leads without etcd).
    lease: Option<Lease>,
}

struct Sim {
    config: SimConfig,
    rng: SmallRng,
    clock: ManualClock,
    /// Monotonic time (leases, the fence): moves with `clock`, never back.
    mono: ManualMonotonic,
    etcd: SimEtcd,
    /// Each node's election (the real code over the simulated etcd).
    elections: Vec<Election<SimEtcdClient>>,
    configs: Vec<ClusterConfig>,
    /// The node whose disk `disk` is (the leader's, or the one starting).
    leader_at: usize,
    /// Who won each term: never two.
    terms: BTreeMap<u64, usize>,
    /// Standbys in this run (0: a lone node).
    standby_count: usize,
    /// Times the standby caught up with everything the leader wrote.
    catch_ups: u64,
    ledger: Ledger,
    /// The latest time the engine may have seen (the clock can step back).
    high_water_ms: u64,
    disk: Arc<SimDisk>,
    _mount: crate::storage::Mount,
    dir: PathBuf,
    node: Option<Node>,
    clients: Vec<Client>,
    acked: BTreeMap<u128, Acked>,
    /// The keys of `acked`, for picking one at random in O(1), and by SKU
    /// and by `(sku, user)` for the stock and limit checks.
    acked_ids: Vec<u128>,
    acked_by_sku: BTreeMap<u64, Vec<u128>>,
    acked_by_user: BTreeMap<(u64, u64), Vec<u128>>,
    /// Stock per SKU as acknowledged (restocks add to it).
    total: BTreeMap<u64, u64>,
    /// Restocks in flight or unknown: the total may be this much higher.
    total_unknown: BTreeMap<u64, u64>,
    /// Each sale's pause state as the model knows it.
    pause: BTreeMap<u64, PauseModel>,
    /// Users whose JOIN of the queued sale was answered (in line or
    /// admitted).
    joined: std::collections::BTreeSet<u64>,
    /// The last ticket a user of the queued sale was shown, per
    /// connection: `(client, sku, user)`.
    /// With the JOINs sent for that user when the ticket's request was.
    line: BTreeMap<(usize, u64, u64), (Seen, u64)>,
    /// JOINs sent per `(sku, user)`.
    joins: BTreeMap<(u64, u64), u64>,
    report: SimReport,
    step: u64,
    digest: u64,
    /// Restored to the full size at the next restart.
    disk_full: bool,
    /// An armed crash struck outside the log writer: crash now.
    crash_pending: bool,
    /// Flipped bits no recovery has refused yet.
    flips: Vec<disk::Flip>,
    standbys: Vec<Standby>,
    cycles: u64,
    /// Open (sent, unanswered: in flight or unknown) RELEASEs per
    /// reservation id, and open JOINs per user: kept as operations open and
    /// close, so a check reads them without walking every open operation.
    open_releases: HashMap<u128, u32>,
    open_joins: HashMap<u64, u32>,
    /// The live move under way (one at a time, as the router's admin lock
    /// makes them).
    moving: Option<Moving>,
    /// Each sale's placement `(dedicated, pinned)` as acknowledged, and
    /// one a lost answer leaves unknown.
    placement: BTreeMap<u64, (Placed, Option<Placed>)>,
}

impl Node {
    /// The shard `sku`'s requests go to: where its sale is, or its pool
    /// shard for a sale not (yet) created, which answers `unknown_sku`.
    fn route(&self, sku: u64) -> usize {
        self.routes.get(&sku).copied().unwrap_or_else(|| pool_index(sku, POOL_SHARDS))
    }
}

/// A sale's placement: `(dedicated, pinned)`.
type Placed = (bool, bool);

/// A move of a sale between shards, as `Router::move_sale` makes it.
struct Moving {
    sku: u64,
    /// The shard it left: a connection that read the route before the
    /// switch still queues there (and the old shard passes it on).
    from: usize,
    dedicated: bool,
    pinned: bool,
    /// The SALE_MOVED's answer (`None` once it came).
    done: Option<oneshot::Receiver<AdminResult>>,
    /// Fires when the new shard took the sale.
    installed: oneshot::Receiver<std::time::Instant>,
    arrived: bool,
}

/// The trace digest: CRC-32C over every line, with the number of lines
/// in the high half (hardware CRC: a byte-at-a-time hash was the
/// simulator's largest single cost).
fn digest_line(digest: u64, line: &[u8]) -> u64 {
    let crc = crc32c::crc32c_append(digest as u32, line);
    ((digest >> 32).wrapping_add(1) << 32) | u64::from(crc)
}

type Check = Result<(), String>;

/// Why a start failed.
enum Failed {
    /// An I/O error: the process exits and is started again.
    Io(String),
    /// Recovery refused the data dir.
    Refused(String),
    /// A check failed after the start.
    Check(String),
}

/// Syncs that fail with EIO, per million.
const SYNC_FAIL_PPM: u32 = 3_000;

/// Syncs that are slow, per million, and the most simulated time one
/// takes: past the 2 s lease, so a slow fsync can outlast a leadership.
const SLOW_SYNC_PPM: u32 = 2_000;
const SLOW_SYNC_MS_MAX: u64 = 2_500;

/// The standby's state is compared with the leader's at every this many
/// times it catches up (and at every failover, through the start checks).
const STANDBY_COMPARE_EVERY: u64 = 8;

/// Shard cycles between full invariant checks (and at every start).
const FULL_CHECK_EVERY_CYCLES: u64 = 64;

/// Starts that fail on I/O errors before the simulator gives up.
const START_ATTEMPTS_MAX: u32 = 50;

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let mono = ManualMonotonic::new();
        let drift = rng.gen_range(-etcd::DRIFT_PPM_MAX..=etcd::DRIFT_PPM_MAX);
        let etcd = SimEtcd::new(mono.clone(), drift);
        let degrade = if rng.gen_ratio(1, 4) { SyncDegrade::Async } else { SyncDegrade::Never };
        let standby_count = if config.standby { rng.gen_range(1..=2) } else { 0 };
        let configs: Vec<ClusterConfig> = (0..NODE_IDS.len()).map(|id| cluster_config(id, degrade)).collect();
        let elections = (0..NODE_IDS.len())
            .map(|id| Election::over(&configs[id], etcd.client(NODE_IDS[id]), Arc::new(mono.clone())))
            .collect();
        let disk = SimDisk::new(rng.gen(), DISK_BYTES, DiskFaults::default());
        let clock = ManualClock::new(START_MS);
        let (clock_, mono_) = (clock.clone(), mono.clone());
        disk.set_pass_time(Arc::new(move |ms| {
            clock_.advance_ms(ms);
            mono_.advance_ms(ms);
        }));
        let mount = crate::storage::mount(disk.clone());
        let dir = mount.root.join("data");
        let clients = (0..CLIENTS)
            .map(|i| {
                let (tx, rx) = mpsc::unbounded_channel();
                Client { tx, rx, conn: i as u64, next_request: 1, inflight: BTreeMap::new(), unknown: Vec::new() }
            })
            .collect();
        Sim {
            report: SimReport { seed: config.seed, ..Default::default() },
            config,
            rng,
            clock,
            mono,
            etcd,
            elections,
            configs,
            leader_at: 0,
            terms: BTreeMap::new(),
            standby_count,
            catch_ups: 0,
            ledger: Ledger::default(),
            high_water_ms: START_MS,
            disk,
            _mount: mount,
            dir,
            node: None,
            clients,
            acked: BTreeMap::new(),
            acked_ids: Vec::new(),
            acked_by_sku: BTreeMap::new(),
            acked_by_user: BTreeMap::new(),
            total: SKUS.iter().map(|&s| (s, 0)).collect(),
            total_unknown: SKUS.iter().map(|&s| (s, 0)).collect(),
            pause: SKUS.iter().map(|&s| (s, PauseModel::default())).collect(),
            joined: Default::default(),
            line: Default::default(),
            joins: Default::default(),
            step: 0,
            digest: 0,
            disk_full: false,
            crash_pending: false,
            flips: Vec::new(),
            standbys: Vec::new(),
            cycles: 0,
            open_releases: HashMap::new(),
            open_joins: HashMap::new(),
            moving: None,
            placement: SKUS.iter().map(|&s| (s, ((false, false), None))).collect(),
        }
    }

    /// A trace line of a frequent step (a client's operation, a cycle, a
    /// flush): `bytes` (what the line says) go into the digest, and the
    /// text is made only when kept.
    fn trace_op(&mut self, bytes: &[u8], line: impl FnOnce() -> String) {
        self.digest = digest_line(self.digest, bytes);
        if self.config.trace {
            self.report.trace.push(format!("{:>7} {}", self.step, line()));
        }
    }

    fn trace(&mut self, line: impl FnOnce() -> String) {
        let mut line = line();
        if line.contains(crate::storage::SIM_ROOT) {
            // Paths in messages: the mount root differs between runs in
            // one process; the trace must not.
            line = line.replace(&*self._mount.root.to_string_lossy(), "<disk>");
        }
        self.digest = digest_line(self.digest, line.as_bytes());
        if self.config.trace {
            self.report.trace.push(format!("{:>7} {line}", self.step));
        }
    }

    fn fail(&self, message: String) -> SimFailure {
        // The whole trace (kept only with `trace` on).
        let tail = self.report.trace.clone();
        SimFailure { seed: self.config.seed, step: self.step, message, trace_tail: tail }
    }

    fn run(mut self) -> Result<SimReport, SimFailure> {
        self.start(false).map_err(|e| self.fail(e))?;
        if self.config.standby {
            // A new cluster: no `sync` key yet, so the first node may lead.
            let leadership = self.elect(&[0]).map_err(|e| self.fail(e))?;
            let started = match self.promote(leadership) {
                Ok(true) => self.rebuild_standbys(),
                Ok(false) => self.crash(false),
                Err(e) => Err(e),
            };
            started.map_err(|e| self.fail(e))?;
        }
        self.create_sales().map_err(|e| self.fail(e))?;
        let faulty = self.config.steps;
        while self.step < faulty + QUIESCE_STEPS {
            self.step += 1;
            let quiet = self.step > faulty;
            if self.step == faulty + 1 {
                self.etcd.heal();
                self.disk.set_faults(DiskFaults::default());
                for standby in &mut self.standbys {
                    standby.link_down_until = 0;
                    standby.disk.set_faults(DiskFaults::default());
                }
            }
            self.one_step(quiet).map_err(|e| self.fail(e))?;
        }
        // Liveness: after the faults stopped, everything was answered.
        let open: usize = self.clients.iter().map(|c| c.inflight.len() + c.unknown.len()).sum();
        if self.moving.is_some() {
            return Err(self.fail(format!("a move was not done {QUIESCE_STEPS} steps after the faults stopped")));
        }
        if open > 0 {
            return Err(
                self.fail(format!("{open} operations still unanswered {QUIESCE_STEPS} steps after the faults stopped"))
            );
        }
        // The reconciler catches up with everything committed: its rows
        // equal the engine's state.
        self.reconcile_all().map_err(|e| self.fail(e))?;
        self.check_against_engines(true).map_err(|e| self.fail(e))?;
        self.report.steps = self.step;
        self.report.trace_digest = self.digest;
        self.report.disk = self.disk.stats();
        Ok(self.report)
    }

    // --- the node -------------------------------------------------------

    /// Recover from the disk and start the shards and the writer. An I/O
    /// error (an injected EIO) fails the start, as it would the process;
    /// the supervisor starts it again (bounded).
    fn start(&mut self, truncate_corrupt: bool) -> Check {
        if self.disk_full {
            // The operator freed space.
            self.disk.set_capacity(DISK_BYTES);
            self.disk_full = false;
        }
        for attempt in 1..=START_ATTEMPTS_MAX {
            match self.start_once(truncate_corrupt) {
                Ok(()) => return Ok(()),
                Err(Failed::Io(e)) if attempt < START_ATTEMPTS_MAX => {
                    self.disk.kill();
                    self.trace(|| format!("start failed ({e}); restarting"));
                }
                Err(Failed::Io(e)) => return Err(format!("no start in {START_ATTEMPTS_MAX} attempts: {e}")),
                Err(Failed::Refused(e)) => return Err(format!("recovery refused: {e}")),
                Err(Failed::Check(e)) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    fn start_once(&mut self, truncate_corrupt: bool) -> Result<(), Failed> {
        let options = RecoverOptions { presized_ids: 4096, ..RecoverOptions::new(POOL_SHARDS, truncate_corrupt) };
        let recovered = match recovery::recover(&self.dir, options) {
            Ok(recovered) => recovered,
            Err(RecoveryError::Io(e)) => return Err(Failed::Io(e.to_string())),
            Err(refused) => return Err(Failed::Refused(refused.to_string())),
        };
        self.report.recoveries += 1;
        if self.config.standby {
            // The term history that goes with the log (the node's startup).
            let file = history::load(&self.dir).map_err(|e| Failed::Io(e.to_string()))?;
            let ours = history::reconcile(file, &recovered.report.terms, recovered.next_lsn - 1);
            history::store(&self.dir, &ours).map_err(|e| Failed::Io(e.to_string()))?;
        }
        let wal = self.open_wal(&self.dir.clone(), recovered.next_lsn).map_err(|e| Failed::Io(e.to_string()))?;
        self.node = Some(self.node_from(self.leader_at, recovered.engines, wal));
        let next_lsn = recovered.next_lsn;
        self.trace(|| format!("start next_lsn={next_lsn}"));
        self.check_settled_held(next_lsn - 1).map_err(Failed::Check)?;
        // A lone node is the authority once started; a cluster node only
        // once it leads (it may start and then lose the election).
        self.check_against_engines(!self.config.standby).map_err(Failed::Check)
    }

    /// A log writer whose fence runs on simulated time. Closed until the
    /// node wins a term (a lone node, without etcd, leads from the start).
    fn open_wal(&self, dir: &std::path::Path, next_lsn: u64) -> std::io::Result<ManualWal> {
        let fence = Arc::new(Fence::new(Arc::new(self.mono.clone())));
        if self.config.standby {
            fence.close();
        }
        ManualWal::open_fenced(self.wal_config(dir), next_lsn, fence)
    }

    /// A node running `engines` (recovered, or a standby's) with `wal`:
    /// a shard per pool engine, and one per hot engine that holds a sale
    /// (as `Router::new` starts them).
    fn node_from(&mut self, id: usize, engines: Engines, wal: ManualWal) -> Node {
        let Engines { directory, pool, hot } = engines;
        let mut node = Node {
            id,
            shards: Vec::new(),
            handles: Vec::new(),
            routes: BTreeMap::new(),
            directory,
            fence: wal.fence().clone(),
            wal,
            admin: Vec::new(),
            lease: None,
        };
        let hot = hot.into_iter().filter(|engine| engine.skus().next().is_some());
        for engine in pool.into_iter().chain(hot) {
            self.add_shard(&mut node, engine);
        }
        node
    }

    /// Start a shard over `engine` on `node`; its SKUs route to it.
    fn add_shard(&mut self, node: &mut Node, engine: Engine) -> usize {
        let index = node.shards.len();
        let mut skus: Vec<u64> = engine.skus().collect();
        skus.sort_unstable();
        node.routes.extend(skus.into_iter().map(|sku| (sku, index)));
        let mut seeds = SmallRng::seed_from_u64(self.rng.gen());
        let shard = ShardLoop::new(
            engine,
            Arc::new(self.clock.clone()),
            Box::new(node.wal.sink()),
            Arc::new(AtomicUsize::new(0)),
        )
        .with_seeds(Box::new(move || seeds.gen()));
        node.shards.push(shard);
        node.handles.push(crate::shard::detached_handle(index, index >= POOL_SHARDS));
        index
    }

    /// The shard `sku`'s requests go to now.
    fn route(&self, sku: u64) -> usize {
        self.node.as_ref().expect("running").route(sku)
    }

    /// Where a connection queues a request for `sku`: the route, or,
    /// while `sku` moves, half the time the shard it left (the connection
    /// read the route just before the switch).
    fn route_from_connection(&mut self, sku: u64) -> usize {
        match self.moving.as_ref().map(|m| (m.sku, m.from)) {
            Some((moving, from)) if moving == sku && self.rng.gen_bool(0.5) => from,
            _ => self.route(sku),
        }
    }

    /// A sale is between shards: given up by one (SALE_MOVED decided),
    /// not yet taken by the other. Its state is in neither engine.
    fn sale_in_flight(&self) -> bool {
        self.moving.as_ref().is_some_and(|m| !m.arrived)
    }

    /// Move a sale live, as `Router::move_sale` does: the new shard is
    /// told to expect it, the old one gives it up behind what is queued,
    /// and the route switches; requests that reach the old shard later are
    /// passed on, and the new one holds the sale's requests until it has
    /// it. From the pool to a shard of its own, or back.
    fn start_move(&mut self) -> Check {
        if self.moving.is_some() || self.node.is_none() {
            return self.deliver();
        }
        let sku = SKUS[self.rng.gen_range(0..SKUS.len())];
        let pinned = self.rng.gen_bool(0.5);
        let from = self.route(sku);
        let dedicated = from < POOL_SHARDS;
        let to = if dedicated {
            // An empty shard of its own, or a new one (the router retires
            // empty ones; reusing one is the same to the shard).
            let node = self.node.as_ref().expect("running");
            let free = (POOL_SHARDS..node.shards.len())
                .find(|&i| node.shards[i].engine().skus().next().is_none() && !node.routes.values().any(|&r| r == i));
            match free {
                Some(i) => i,
                None => {
                    let mut node = self.node.take().expect("running");
                    let engine = Engine::new(node.directory.clone());
                    let i = self.add_shard(&mut node, engine);
                    self.node = Some(node);
                    i
                }
            }
        } else {
            pool_index(sku, POOL_SHARDS)
        };
        let (done, done_rx) = oneshot::channel();
        let (installed, installed_rx) = oneshot::channel();
        let node = self.node.as_mut().expect("running");
        let target = node.handles[to].0.clone();
        node.shards[to].push(ShardMsg::Expect { sku });
        node.shards[from].push(ShardMsg::MoveOut { sku, to: target, dedicated, pinned, done, installed });
        node.routes.insert(sku, to);
        self.report.moves += 1;
        self.moving =
            Some(Moving { sku, from, dedicated, pinned, done: Some(done_rx), installed: installed_rx, arrived: false });
        self.trace(|| format!("move {sku} from shard {from} to {to} dedicated={dedicated} pinned={pinned}"));
        Ok(())
    }

    /// The move's answer and arrival, as they come.
    fn follow_move(&mut self) -> Check {
        let Some(m) = self.moving.as_mut() else { return Ok(()) };
        let mut answer = None;
        if let Some(done) = m.done.as_mut() {
            match done.try_recv() {
                Ok((outcome, _)) => answer = Some(outcome.status),
                Err(oneshot::error::TryRecvError::Empty) => {}
                // Dropped with a failed group: the node goes down with it.
                Err(oneshot::error::TryRecvError::Closed) => m.done = None,
            }
        }
        if !m.arrived && m.installed.try_recv().is_ok() {
            m.arrived = true;
        }
        let (sku, placed) = (m.sku, (m.dedicated, m.pinned));
        if let Some(status) = answer {
            m.done = None;
            self.trace(|| format!("move {sku} answered {status:?}"));
            if status != Status::Ok {
                return Err(format!("the move of sale {sku} answered {status:?}"));
            }
            self.placement.insert(sku, (placed, None));
        }
        if self.moving.as_ref().is_some_and(|m| m.done.is_none() && m.arrived) {
            self.moving = None;
        }
        Ok(())
    }

    // --- the reconciler's view ---------------------------------------------

    /// The reconciler reads what the leader has committed (never beyond:
    /// a failover could take that back), applies it to its rows, and
    /// settles (the leader keeps log segments until then: consumer
    /// retention). When it has everything the leader wrote, its rows must
    /// equal the engines' state.
    fn reconcile(&mut self) -> Check {
        let Some(node) = self.node.as_ref() else { return Ok(()) };
        let committed = node.wal.stats().committed_lsn.load(std::sync::atomic::Ordering::Acquire);
        if committed <= self.ledger.applied {
            return Ok(());
        }
        if self.ledger.cursor.is_none() {
            let from = self.ledger.applied + 1;
            match crate::wal::follow::LogCursor::open(&self.dir, from) {
                Ok(cursor) => self.ledger.cursor = Some(cursor),
                Err(e) => return Err(format!("the reconciler cannot read LSN {from} on the leader: {e}")),
            }
        }
        let cursor = self.ledger.cursor.as_mut().expect("opened above");
        let mut out = bytes::BytesMut::new();
        if let Err(e) = cursor.read(committed, 64 << 10, &mut out) {
            // An injected read error: the reconciler reconnects later.
            self.ledger.cursor = None;
            let message = e.to_string().replace(&*self._mount.root.to_string_lossy(), "<disk>");
            self.trace(|| format!("the reconciler's read failed: {message}"));
            if !self.flips.is_empty() && message.contains("LSN") {
                // Latent damage in a segment kept for the reconciler (a
                // snapshot covered it, so recovery never read it): found,
                // as it must be; the operator restores the bytes from the
                // standby or a backup.
                self.report.checkpoint_refusals += 1;
                for flip in std::mem::take(&mut self.flips) {
                    self.disk.unflip(&flip);
                }
                self.trace(|| "the reconciler met flipped data; restored".to_string());
            }
            return Ok(());
        }
        let mut at = 0;
        while at < out.len() {
            let (lsn, event, used) = crate::wal::record::decode_record(&out[at..])
                .map_err(|e| format!("the reconciler read a bad record: {e}"))?;
            at += used;
            if lsn != self.ledger.applied + 1 {
                return Err(format!("the reconciler read LSN {lsn} after {}", self.ledger.applied));
            }
            if lsn > committed {
                return Err(format!("the reconciler was handed LSN {lsn}, beyond the committed {committed}"));
            }
            self.ledger.model.apply(lsn, &event).map_err(|e| format!("the reconciler's rows refuse the log: {e}"))?;
            self.ledger.applied = lsn;
            self.report.reconciled += 1;
        }
        // SETTLED (sometimes late: it gates segment deletion).
        if self.rng.gen_bool(0.7) {
            let _ = recovery::record_consumer_lsn(&self.dir, self.ledger.applied);
        }
        let applied = self.ledger.applied;
        self.trace(|| format!("reconciled to {applied}"));
        let node = self.node.as_ref().expect("checked");
        if applied == node.wal.written_lsn() && !node.wal.has_pending() {
            self.check_ledger()?;
        }
        Ok(())
    }

    /// The log a node starts or takes over with holds every record the
    /// reconciler settled (PostgreSQL never holds a record the cluster
    /// lost).
    fn check_settled_held(&self, last_lsn: u64) -> Check {
        if self.ledger.applied > last_lsn {
            return Err(format!(
                "the reconciler settled LSN {}, but the leader's log now ends at {last_lsn}: settled records lost",
                self.ledger.applied
            ));
        }
        Ok(())
    }

    /// Catch the reconciler up with everything the leader wrote (the quiet
    /// end: every group flushed and committed) and compare.
    fn reconcile_all(&mut self) -> Check {
        for _ in 0..16 {
            self.flush(false)?;
            self.replicate()?;
            self.reconcile()?;
        }
        let node = self.node.as_ref().expect("running");
        let written = node.wal.written_lsn();
        let committed = node.wal.stats().committed_lsn.load(std::sync::atomic::Ordering::Acquire);
        if self.ledger.applied > committed {
            return Err(format!(
                "the reconciler settled LSN {}, beyond the {committed} the leader has made durable: settled records \
                 not durable",
                self.ledger.applied
            ));
        }
        if self.ledger.applied < committed {
            return Err(format!(
                "the reconciler ends at LSN {}, the leader committed {committed}",
                self.ledger.applied
            ));
        }
        // With asynchronous durability the tail is not synced, so not
        // committed: the reconciler may not have it yet.
        if committed == written {
            self.check_ledger()?;
        }
        Ok(())
    }

    /// The reconciler's rows equal the engines' sales and reservations,
    /// field by field.
    fn check_ledger(&mut self) -> Check {
        if self.sale_in_flight() {
            // Its state is in neither engine (the end of the run compares).
            return Ok(());
        }
        self.report.ledger_checks += 1;
        let node = self.node.as_ref().expect("running");
        let model = &self.ledger.model;
        let mut reservations = 0;
        let mut skus = 0;
        for shard in &node.shards {
            for image in shard.engine().export() {
                skus += 1;
                let Some((row, _)) = model.sales.get(&image.sku) else {
                    return Err(format!("sale {} is in the engine, not in the reconciler's rows", image.sku));
                };
                let engine = (image.total, image.available, image.reserved, image.sold, image.limit_per_user);
                let rows = (row.total, row.available, row.reserved, row.sold, row.limit_per_user);
                let engine_at: Vec<_> =
                    image.locations.iter().map(|l| (l.location, l.total, l.available, l.reserved, l.sold)).collect();
                let rows_at: Vec<_> =
                    row.locations.iter().map(|l| (l.location, l.total, l.available, l.reserved, l.sold)).collect();
                if engine_at != rows_at {
                    return Err(format!(
                        "sale {}: warehouses {engine_at:?} in the engine, {rows_at:?} in the rows",
                        image.sku
                    ));
                }
                if engine != rows || (image.ttl_ms, image.paused, image.hot) != (row.ttl_ms, row.paused, row.hot) {
                    return Err(format!(
                        "sale {}: engine {engine:?} paused={} hot={}, reconciler {rows:?} paused={} hot={}",
                        image.sku, image.paused, image.hot, row.paused, row.hot
                    ));
                }
                for r in &image.reservations {
                    reservations += 1;
                    let Some((row, _)) = model.reservations.get(&r.id) else {
                        return Err(format!("reservation {:x} is in the engine, not in the reconciler's rows", r.id));
                    };
                    let engine = (image.sku, r.user, r.qty, r.state, r.expires_at_ms, r.settled_at_ms, r.location);
                    let rows = (
                        row.sku,
                        row.user,
                        row.qty,
                        row.state,
                        row.expires_at_ms,
                        row.settled_at_ms.unwrap_or(0),
                        row.location,
                    );
                    if engine != rows || r.payment_ref.as_deref() != row.payment_ref.as_deref() {
                        return Err(format!("reservation {:x}: engine {engine:?}, reconciler {rows:?}", r.id));
                    }
                }
            }
        }
        if (skus, reservations) != (model.sales.len(), model.reservations.len()) {
            return Err(format!(
                "the engine holds {skus} sales and {reservations} reservations, the reconciler {} and {}",
                model.sales.len(),
                model.reservations.len()
            ));
        }
        Ok(())
    }

    // --- who leads ----------------------------------------------------

    /// Poll etcd as the nodes' managers do, every `POLL_MS`, until one of
    /// `candidates` wins a term (whichever polls first after the lease of
    /// the last leader ran out; the real rules decide who may). Bounded:
    /// a cluster that elects nobody fails liveness.
    fn elect(&mut self, candidates: &[usize]) -> Result<Leadership, String> {
        for _ in 0..ELECTION_POLLS_MAX {
            let mut order = candidates.to_vec();
            if self.rng.gen_bool(0.5) {
                order.reverse();
            }
            for id in order {
                if let Some(leadership) = self.try_campaign(id)? {
                    self.leader_at = id;
                    return Ok(leadership);
                }
            }
            self.pass_time(POLL_MS);
        }
        Err(format!("no leader elected within {} ms", ELECTION_POLLS_MAX * POLL_MS))
    }

    /// One poll of node `id`'s manager with no leader to follow: campaign
    /// if etcd has no leader and this node may lead.
    fn try_campaign(&mut self, id: usize) -> Result<Option<Leadership>, String> {
        let election = &self.elections[id];
        if !matches!(etcd::now(election.leader()), Ok(None)) {
            return Ok(None);
        }
        if !matches!(etcd::now(election.eligible()), Ok(true)) {
            return Ok(None);
        }
        let Ok(Some(leadership)) = etcd::now(election.campaign()) else { return Ok(None) };
        let term = leadership.term;
        if let Some(other) = self.terms.insert(term, id) {
            return Err(format!("term {term} won twice: by {} and by {}", NODE_IDS[other], NODE_IDS[id]));
        }
        if self.terms.range(term + 1..).next().is_some() {
            return Err(format!("term {term} won after a later term"));
        }
        self.report.elections += 1;
        self.trace(|| format!("{} won term {term}", NODE_IDS[id]));
        Ok(Some(leadership))
    }

    /// Start leading `leadership.term` with the node in `self.node` (the
    /// manager's promotion, in its order): the term history first, then
    /// the `sync` key (this node alone until its standby is recorded),
    /// the fence opened to the lease's deadline, TERM_STARTED first in the
    /// log. `false` if the node could not (the history could not be
    /// written: it exits to rejoin, as the manager does).
    fn promote(&mut self, leadership: Leadership) -> Result<bool, String> {
        let node = self.node.as_mut().expect("a node to promote");
        let term = leadership.term;
        let start_lsn = node.wal.written_lsn() + 1;
        let mut ours = history::load(&self.dir).map_err(|e| format!("reading the term history: {e}"))?;
        // The manager's first steps: the history, then the `sync` key.
        if let Err(reason) = etcd::now(begin_term(&self.dir, &mut ours, &self.elections[node.id], term, start_lsn)) {
            let reason = reason.replace(&*self._mount.root.to_string_lossy(), "<disk>");
            self.trace(|| format!("{reason}: exits to rejoin"));
            return Ok(false);
        }
        node.wal.send(WalMsg::SyncSet(None));
        node.fence.extend_to(leadership.valid_until);
        let at_ms = self.clock.now_ms();
        crate::sink::LogSink::submit(
            &mut node.wal.sink(),
            &mut vec![crate::engine::Event::TermStarted { term, at_ms }],
            &mut Vec::new(),
        );
        let keeper = SyncKeeper::new(&self.configs[node.id]);
        let lease = LeaseKeeper::new(&self.configs[node.id], leadership, self.mono.now());
        node.lease = Some(Lease { lease, keeper, set: Vec::new(), told: Some(None) });
        self.trace(|| format!("leading term {term} from LSN {start_lsn}"));
        Ok(true)
    }

    /// Time passes for everyone (the nodes' managers poll in between).
    fn advance(&mut self, ms: u64) -> Check {
        let mut left = ms;
        while left > 0 {
            let chunk = left.min(POLL_MS);
            self.pass_time(chunk);
            left -= chunk;
            self.lead_tick()?;
        }
        Ok(())
    }

    /// The latest time any node's clock showed (a slow sync moves the
    /// clocks inside the step, without `pass_time`).
    fn high_water(&self) -> u64 {
        self.high_water_ms.max(self.clock.now_ms())
    }

    /// Both clocks move; nothing runs (a stall, or time inside one poll).
    fn pass_time(&mut self, ms: u64) {
        self.clock.advance_ms(ms);
        self.mono.advance_ms(ms);
        self.high_water_ms = self.high_water();
    }

    /// One poll of the leader's manager: renew the lease when due and move
    /// the fence with it; record the standby in `sync` if it is not yet;
    /// a lease lost or not renewed in time ends the leadership.
    fn lead_tick(&mut self) -> Check {
        let Some(node) = self.node.as_mut() else { return Ok(()) };
        let Some(lease) = node.lease.as_mut() else { return Ok(()) };
        let polled = etcd::now(lease.lease.poll(&self.elections[node.id], &node.fence, &self.mono));
        if let Err(reason) = polled {
            return self.lose(reason);
        }
        self.keep_sync_set()
    }

    /// One round of the manager's synchronous-set policy (the real
    /// `SyncKeeper::plan`) over what the leader knows of its standby: a
    /// change goes to etcd first, then to the writer; the writer releases
    /// only with a complete set, or a degraded one (`--sync-degrade
    /// async`). (The policy's refusal of new requests is the router's,
    /// which the simulator does not run.)
    fn keep_sync_set(&mut self) -> Check {
        let now = self.mono.now();
        let standbys: BTreeMap<String, StandbyInfo> = self
            .standbys
            .iter()
            .map(|s| {
                let info = StandbyInfo {
                    addr: String::new(),
                    streaming: s.cursor.is_some() && self.step >= s.link_down_until,
                    durable_lsn: s.heard,
                    applied_lsn: s.heard,
                    last_progress: s.progress,
                };
                (NODE_IDS[s.id].to_string(), info)
            })
            .collect();
        let Some(node) = self.node.as_mut() else { return Ok(()) };
        let Some(lease) = node.lease.as_mut() else { return Ok(()) };
        let stats = node.wal.stats();
        let commit = stats.committed_lsn.load(std::sync::atomic::Ordering::Acquire);
        let waiting = stats.groups_waiting.load(std::sync::atomic::Ordering::Acquire) > 0;
        let plan = lease.keeper.plan(now, commit, waiting, &lease.set, &standbys);
        let mut changed = None;
        if let Some(desired) = plan.change {
            node.wal.send(WalMsg::SyncSet(None));
            lease.told = Some(None);
            match etcd::now(self.elections[node.id].write_sync_set(lease.lease.leadership.term, &desired)) {
                Ok(true) => {
                    changed = Some(desired.clone());
                    lease.set = desired;
                }
                Ok(false) => return self.lose("the leader key changed while recording the synchronous set"),
                // Unreachable: hold, and try again at the next poll.
                Err(_) => return Ok(()),
            }
        }
        let usable = lease.set.len() >= lease.keeper.wanted() || plan.degraded;
        let tell = usable.then(|| lease.set.clone());
        if lease.told.as_ref() != Some(&tell) {
            node.wal.send(WalMsg::SyncSet(tell.clone()));
            lease.told = Some(tell);
        }
        if let Some(set) = changed {
            self.report.sync_set_changes += 1;
            self.report.sync_set_degraded += u64::from(plan.degraded);
            self.trace(|| format!("synchronous set now {set:?} (degraded={})", plan.degraded));
        }
        Ok(())
    }

    /// The lease is gone: the fence closes at once (no reply leaves after
    /// the deadline) and the node exits to rejoin (the server exits 75; a
    /// process end, nothing on disk lost).
    fn lose(&mut self, reason: &str) -> Check {
        let Some(node) = self.node.as_ref() else { return Ok(()) };
        node.fence.close();
        self.report.leases_lost += 1;
        let reason = reason.to_string();
        self.trace(|| format!("lost leadership: {reason}"));
        self.crash(false)
    }

    /// The leader stalls (a long GC-like pause) for up to twice its lease:
    /// nothing of it runs, while the standby's manager polls etcd and takes
    /// over once the lease has run out. Then the old leader runs again
    /// before it notices: whatever its writer releases now would be a
    /// second node acknowledging while another leads, which the fence must
    /// prevent.
    fn pause_leader(&mut self) -> Check {
        self.deliver()?;
        let ms = self.rng.gen_range(LEASE_TTL_MS / 2..LEASE_TTL_MS * 2);
        self.trace(|| format!("leader stalls for {ms} ms"));
        let mut candidates: Vec<usize> = self.standbys.iter().map(|s| s.id).collect();
        let mut successor = None;
        let mut left = ms;
        while left > 0 && successor.is_none() {
            let chunk = left.min(POLL_MS);
            self.pass_time(chunk);
            left -= chunk;
            // The standbys' managers poll in no fixed order.
            if candidates.len() > 1 && self.rng.gen_bool(0.5) {
                candidates.reverse();
            }
            for &id in &candidates {
                successor = self.try_campaign(id)?;
                if successor.is_some() {
                    self.leader_at = id;
                    break;
                }
            }
        }
        // A successor ends the stall as it wins: the earliest moment two
        // nodes think they lead, the hardest for the fence.
        let Some(leadership) = successor else { return self.lead_tick() };
        let mut old = self.node.take().expect("a leader");
        let old_id = old.id;
        let old_term = old.lease.as_ref().map_or(0, |l| l.lease.leadership.term);
        // The stalled writer's release runs first (its own thread in the
        // server).
        let _ = old.wal.flush();
        let released: usize = self.clients.iter().map(|c| c.rx.len()).sum();
        if released > 0 {
            return Err(format!(
                "the leader of term {old_term} released {released} replies after term {} began elsewhere",
                leadership.term
            ));
        }
        // Its manager's next poll: the renewal fails, it exits to rejoin.
        let renewed = old.lease.as_mut().map(|l| etcd::now(self.elections[old.id].renew(&mut l.lease.leadership)));
        if matches!(renewed, Some(Ok(true))) {
            return Err(format!("etcd renewed the lease of term {old_term} after term {} began", leadership.term));
        }
        old.fence.close();
        drop(old);
        self.report.leases_lost += 1;
        self.trace(|| format!("the leader of term {old_term} found its lease gone"));
        self.requests_lost();
        self.failover(old_id, leadership)
    }

    /// The node went away: what its clients had in flight is unknown to
    /// them now (they retry it, with the same ids).
    fn requests_lost(&mut self) {
        // A lost JOIN may have taken a new place after an unseen lapse.
        self.line.clear();
        // A move whose SALE_MOVED was not answered: logged or not.
        if let Some(m) = self.moving.take() {
            if m.done.is_some() {
                let entry = self.placement.get_mut(&m.sku).expect("sku");
                entry.1 = Some((m.dedicated, m.pinned));
            }
        }
        for client in &mut self.clients {
            let lost: Vec<Op> = std::mem::take(&mut client.inflight).into_values().map(|s| s.op).collect();
            client.unknown.extend(lost);
        }
    }

    /// The setup: sales created and acknowledged before any fault.
    fn create_sales(&mut self) -> Check {
        let faults = self.disk_faults();
        self.disk.set_faults(DiskFaults::default());
        for standby in &self.standbys {
            standby.disk.set_faults(DiskFaults::default());
        }
        for sku in SKUS {
            let cmd = SaleCreate {
                sku,
                stock: STOCK,
                limit_per_user: LIMIT_PER_USER,
                ttl_ms: TTL_MS,
                hot: false,
                queue: (sku == QUEUED_SKU).then_some(QUEUE),
            };
            if sku == LOCATED_SKU {
                let locations = SaleLocations {
                    locations: WAREHOUSES.to_vec(),
                    regions: vec![(REGION_ORDER.0, REGION_ORDER.1.to_vec())],
                };
                self.admin(AdminCmd::CreateAt(cmd, Box::new(locations)));
            } else {
                self.admin(AdminCmd::Create(cmd));
            }
        }
        // Decided, logged and answered before any fault.
        for shard in 0..POOL_SHARDS {
            self.node.as_mut().expect("started").shards[shard].cycle();
        }
        self.flush(false)?;
        if !self.standbys.is_empty() {
            for i in 0..self.standbys.len() {
                self.replicate_to(i)?;
            }
            let node = self.node.as_ref().expect("started");
            for standby in &mut self.standbys {
                for lsn in standby.acks_in_flight.drain(..) {
                    node.wal.send(WalMsg::StandbyDurable { node: NODE_IDS[standby.id].to_string(), lsn });
                    standby.heard = standby.heard.max(lsn);
                }
            }
            self.keep_sync_set()?;
            self.flush(false)?;
        }
        for sku in SKUS {
            if self.total[&sku] != STOCK {
                return Err(format!("sale {sku} was not created"));
            }
        }
        self.disk.set_faults(faults);
        for standby in &self.standbys {
            standby.disk.set_faults(faults);
        }
        Ok(())
    }

    fn disk_faults(&self) -> DiskFaults {
        let f = self.config.faults;
        DiskFaults {
            sync_fail_ppm: if f.sync_fail { SYNC_FAIL_PPM } else { 0 },
            slow_sync_ppm: if f.slow_io { SLOW_SYNC_PPM } else { 0 },
            slow_sync_ms_max: SLOW_SYNC_MS_MAX,
        }
    }

    /// A disk of this run: its slow syncs move the run's clocks.
    fn new_disk(&mut self, faults: DiskFaults) -> Arc<SimDisk> {
        let disk = SimDisk::new(self.rng.gen(), DISK_BYTES, faults);
        let (clock, mono) = (self.clock.clone(), self.mono.clone());
        disk.set_pass_time(Arc::new(move |ms| {
            clock.advance_ms(ms);
            mono.advance_ms(ms);
        }));
        disk
    }

    fn admin(&mut self, cmd: AdminCmd) {
        let sku = cmd.sku();
        match &cmd {
            AdminCmd::Create(_) | AdminCmd::CreateAt(..) | AdminCmd::Place { .. } => {}
            // (Restocks go to a sale's first warehouse.)
            AdminCmd::RestockAt { .. } | AdminCmd::AddLocation { .. } | AdminCmd::SetRegion { .. } => {
                unreachable!("the simulator sends none")
            }
            AdminCmd::Restock { sku, qty } => *self.total_unknown.get_mut(sku).expect("sku") += qty,
            AdminCmd::SetPaused { sku, paused } => {
                let p = self.pause.get_mut(sku).expect("sku");
                if *paused {
                    p.pauses += 1;
                } else {
                    p.resumes += 1;
                }
                p.open += 1;
            }
        }
        let (done, rx) = oneshot::channel();
        let node = self.node.as_mut().expect("started");
        let shard = node.route(sku);
        node.shards[shard].push(ShardMsg::Admin { cmd: cmd.clone(), done });
        node.admin.push((cmd, rx));
    }

    /// The writer's group: written, synced, replies released. A failure
    /// is fatal to the node (as in the server): it crashes.
    fn flush(&mut self, faults_on: bool) -> Check {
        let Some(node) = self.node.as_mut() else { return Ok(()) };
        match node.wal.flush() {
            Ok(()) => {
                self.deliver()?;
                Ok(())
            }
            Err(e) => {
                self.report.log_failures += 1;
                let message = e.to_string();
                self.trace(|| format!("log failed: {message}"));
                let power = faults_on && self.crash_kind();
                self.crash(power)
            }
        }
    }

    /// The node dies (process kill, or power loss), its outstanding
    /// requests become unknown to their clients, and it restarts.
    fn crash(&mut self, power_loss: bool) -> Check {
        // Replies already handed to a connection were sent: acknowledged.
        self.deliver()?;
        self.node = None;
        let torn_before = self.disk.stats().torn_writes;
        if power_loss {
            self.disk.power_loss();
            self.report.power_losses += 1;
        } else {
            self.disk.kill();
            self.report.kills += 1;
        }
        self.trace(|| format!("crash power_loss={power_loss}"));
        self.requests_lost();
        self.ledger.cursor = None;
        let torn = self.disk.stats().torn_writes > torn_before;
        if !self.config.standby {
            return self.restart(torn);
        }
        // The dead leader's lease runs out in etcd; then both managers poll
        // and campaign if they may (the `sync` key decides). The restarted
        // node's recovery does not change who may lead, and if the standby
        // wins, the old disk is replaced by a copy: it recovers only when
        // it leads again.
        let old = self.leader_at;
        let mut candidates = vec![old];
        candidates.extend(self.standbys.iter().map(|s| s.id));
        let leadership = self.elect(&candidates)?;
        if self.leader_at != old {
            return self.failover(old, leadership);
        }
        self.restart(torn)?;
        if !self.promote(leadership)? {
            return self.crash(false);
        }
        self.check_against_engines(true)?;
        // The leader came back on its own disk, maybe without records its
        // standbys already took (written here, never synced): they follow
        // the new term, cutting their logs where the histories part.
        self.refollow_standbys()?;
        if self.standbys.len() < self.standby_count {
            return self.rebuild_standbys();
        }
        Ok(())
    }

    /// Every standby there should be and is not: a copy of the leader.
    fn rebuild_standbys(&mut self) -> Check {
        let ids: Vec<usize> = (0..=self.standby_count)
            .filter(|&id| id != self.leader_at && !self.standbys.iter().any(|s| s.id == id))
            .collect();
        for id in ids {
            self.rebuild_standby(id)?;
        }
        Ok(())
    }

    /// A new term began: each standby's manager sees the new leader and
    /// makes the FOLLOW handshake: it follows on from its log if that is a
    /// prefix of the leader's, or restarts and cuts it where the term
    /// histories part (`history::follow_from`).
    fn refollow_standbys(&mut self) -> Check {
        let leader = history::load(&self.dir).map_err(|e| format!("reading the leader's term history: {e}"))?;
        let leader_last = self.node.as_ref().expect("a leader").wal.written_lsn();
        let mut i = 0;
        while i < self.standbys.len() {
            let s = &mut self.standbys[i];
            let last = s.replica.last_lsn();
            if history::follow_from(&leader, leader_last, &s.history, last) < last {
                let Standby { id, disk, mount, wal, replica, cursor, .. } = self.standbys.remove(i);
                drop((wal, replica, cursor));
                disk.kill();
                self.rejoin_standby(id, disk, mount)?;
                // Rejoined at the end of the list (or rebuilt).
                continue;
            }
            // A new connection, from what it holds.
            s.cursor = None;
            s.acks_in_flight.clear();
            s.heard = last;
            s.progress = Some(self.mono.now());
            let name = NODE_IDS[s.id].to_string();
            self.node.as_ref().expect("a leader").wal.send(WalMsg::StandbyDurable { node: name, lsn: last });
            i += 1;
        }
        Ok(())
    }

    /// The crashed node starts again on its own disk (maybe with a bit
    /// flipped by the crash; `torn`: the power loss tore a write).
    fn restart(&mut self, torn: bool) -> Check {
        // Unanswered admin commands: a restock may or may not have landed
        // (the total is checked against the range after recovery).
        let flip = (self.config.faults.bit_flip && self.rng.gen_ratio(1, 4))
            .then(|| self.disk.flip_random_bit(&["wal-0", "snap-"]))
            .flatten();
        if let Some(flip) = &flip {
            // The file's name, not its path: the mount root differs between
            // runs in one process, the trace must not.
            let path = flip.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let (offset, bit) = (flip.offset, flip.bit);
            self.trace(|| format!("flip {path} byte {offset} bit {bit}"));
        }
        // Flips stay pending until something refuses them: a recovery that
        // did not need the bytes (a segment a newer snapshot covers) may
        // meet them later (a checkpoint, a fallback).
        self.flips.extend(flip);
        let mut result = self.start(false);
        if let Err(refused) = &result {
            if refused.starts_with("recovery refused") && !self.flips.is_empty() {
                // Detected, as it must be: the operator restores the bytes
                // (from a replica or backup) and starts again.
                self.report.refusals += 1;
                self.trace(|| "refused the flipped log; restored".to_string());
                for flip in std::mem::take(&mut self.flips) {
                    self.disk.unflip(&flip);
                }
                result = self.start(false);
            }
        }
        if let Err(refused) = &result {
            if torn && refused.contains("makes it a valid record") {
                // A torn write whose lost bytes were one bit away from
                // zeros reads exactly like a flipped bit in a whole record:
                // refused by design (WAL.md). The runbook's escape hatch
                // cuts it; it was never acknowledged, so nothing that was
                // may be missing after (checked by the start).
                self.report.torn_refusals += 1;
                self.trace(|| "refused an ambiguous torn write; started with --wal-truncate-corrupt".to_string());
                result = self.start(true);
            }
        }
        result
    }

    /// The standby won the election: it leads with the engines it kept
    /// hot and the log writer it had (the manager's promotion). It holds
    /// every acknowledged record (replies waited for it); a new standby is
    /// built from a copy of it.
    fn failover(&mut self, old_id: usize, leadership: Leadership) -> Check {
        self.node = None;
        let winner = self.leader_at;
        let at = self.standbys.iter().position(|s| s.id == winner).expect("the winner is a standby");
        let standby = self.standbys.remove(at);
        let Standby { id, disk, mount, dir, wal, replica, cursor, .. } = standby;
        drop(cursor);
        self.report.failovers += 1;
        self.trace(|| format!("failover to {}", NODE_IDS[id]));
        // The reconciler follows the new leader from where it was; it only
        // ever read committed records, which the standby holds.
        self.ledger.cursor = None;
        self.check_settled_held(wal.written_lsn())?;
        // The old leader's disk stays with it: it rejoins as the standby.
        // (A flip pending on it is repaired first: latent damage on a
        // rejoining node is not modelled.)
        for flip in std::mem::take(&mut self.flips) {
            self.disk.unflip(&flip);
        }
        let old_disk = std::mem::replace(&mut self.disk, disk);
        let old_mount = std::mem::replace(&mut self._mount, mount);
        self.dir = dir;
        self.leader_at = id;
        if self.disk_full {
            // Its operator frees space as it restarts.
            old_disk.set_capacity(DISK_BYTES);
            self.disk_full = false;
        }
        let engines = replica.into_engines();
        let node = self.node_from(id, engines, wal);
        self.node = Some(node);
        if !self.promote(leadership)? {
            return self.crash(false);
        }
        self.check_against_engines(true)?;
        // The other standby follows the new term; the old leader rejoins.
        self.refollow_standbys()?;
        old_disk.kill();
        self.rejoin_standby(old_id, old_disk, old_mount)
    }

    /// Node `id` joins the leader as its standby with the disk it has: it
    /// recovers, compares its term history with the leader's (the FOLLOW
    /// handshake's rule, `history::follow_from`), cuts its log after the
    /// common point (`standby::cut_log_after`) and recovers again. What it
    /// cannot do that way (recovery refuses, the leader no longer holds
    /// the records it needs, an I/O error) it does from a copy instead, as
    /// the real node does from the leader's snapshot.
    fn rejoin_standby(&mut self, id: usize, disk: Arc<SimDisk>, mount: crate::storage::Mount) -> Check {
        self.standbys.retain(|s| s.id != id);
        let dir = mount.root.join("data");
        let options = RecoverOptions { presized_ids: 4096, ..RecoverOptions::new(POOL_SHARDS, false) };
        let cut = recovery::recover(&dir, options).map_err(|e| e.to_string()).and_then(|recovered| {
            let last = recovered.next_lsn - 1;
            let ours =
                history::reconcile(history::load(&dir).map_err(|e| e.to_string())?, &recovered.report.terms, last);
            let leader = history::load(&self.dir).map_err(|e| e.to_string())?;
            let node = self.node.as_ref().expect("a leader");
            let keep = history::follow_from(&leader, node.wal.written_lsn(), &ours, last);
            if keep < last {
                crate::cluster::standby::cut_log_after(&dir, keep).map_err(|e| e.to_string())?;
            }
            Ok((keep, last))
        });
        match cut {
            Ok((keep, last)) => {
                if keep < last {
                    self.report.tails_cut += 1;
                }
                self.trace(|| format!("{} rejoins: keeps its log to {keep} of {last}", NODE_IDS[id]));
                // The leader's log may no longer start where it goes on.
                let following = self.open_standby_retrying(id, disk, mount).is_ok()
                    && self.standbys.iter().any(|s| s.id == id && s.cursor.is_some());
                if following {
                    return Ok(());
                }
                self.rebuild_standby(id)
            }
            Err(e) => {
                let message = e.replace(&*mount.root.to_string_lossy(), "<disk>");
                self.trace(|| format!("{} cannot rejoin with its log ({message}): a copy", NODE_IDS[id]));
                self.rebuild_standby(id)
            }
        }
    }

    /// A standby built afresh: a copy of the leader's durable state (a
    /// base backup), recovered by the real code, following from there.
    fn rebuild_standby(&mut self, id: usize) -> Check {
        self.standbys.retain(|s| s.id != id);
        // The setup (step 0) is free of faults.
        let faults = if self.step == 0 { DiskFaults::default() } else { self.disk_faults() };
        let disk = self.new_disk(faults);
        let mount = crate::storage::mount(disk.clone());
        disk.copy_from(&self.disk, &self._mount.root, &mount.root);
        // A pending flip is a latent error of the leader's disk, not of the
        // copy (the copy is checked; same inode numbers).
        for flip in &self.flips {
            disk.unflip(flip);
        }
        self.report.standby_rebuilds += 1;
        self.trace(|| format!("{} rebuilt from the leader", NODE_IDS[id]));
        self.open_standby_retrying(id, disk, mount)
    }

    /// [`Self::open_standby`], started again after an injected I/O error
    /// (bounded), as a supervisor would.
    fn open_standby_retrying(&mut self, id: usize, disk: Arc<SimDisk>, mount: crate::storage::Mount) -> Check {
        let mut mount = mount;
        for attempt in 1.. {
            match self.open_standby(id, disk.clone(), mount) {
                Ok(()) => return Ok(()),
                Err((e, back)) if e.contains("EIO") && attempt < START_ATTEMPTS_MAX => {
                    mount = back;
                    disk.kill();
                    self.trace(|| "standby start failed on an I/O error; restarting".to_string());
                }
                Err((e, _)) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Start the standby on its disk (recovery, writer, replica) and point
    /// its cursor at the leader's log.
    /// On failure the mount comes back, for another attempt.
    fn open_standby(
        &mut self,
        id: usize,
        disk: Arc<SimDisk>,
        mount: crate::storage::Mount,
    ) -> Result<(), (String, crate::storage::Mount)> {
        let dir = mount.root.join("data");
        let options = RecoverOptions { presized_ids: 4096, ..RecoverOptions::new(POOL_SHARDS, false) };
        let recovered = match recovery::recover(&dir, options) {
            Ok(recovered) => recovered,
            Err(e) => return Err((format!("standby recovery: {e}"), mount)),
        };
        let last = recovered.next_lsn - 1;
        // The term history that goes with the log (the node's startup).
        let history = match history::load(&dir) {
            Ok(file) => history::reconcile(file, &recovered.report.terms, last),
            Err(e) => return Err((format!("standby history: {e}"), mount)),
        };
        if let Err(e) = history::store(&dir, &history) {
            return Err((format!("standby history: {e}"), mount));
        }
        let wal = match self.open_wal(&dir, recovered.next_lsn) {
            Ok(wal) => wal,
            Err(e) => return Err((format!("standby log: {e}"), mount)),
        };
        let replica = crate::recovery::Replica::new(recovered.engines, last);
        let cursor = crate::wal::follow::LogCursor::open(&self.dir, last + 1).ok();
        // A handshake: the leader knows where it stands (it joins the
        // synchronous set at the manager's next round, once caught up).
        let node = self.node.as_ref().expect("a leader");
        node.wal.send(WalMsg::StandbyDurable { node: NODE_IDS[id].to_string(), lsn: last });
        let progress = Some(self.mono.now());
        self.standbys.push(Standby {
            id,
            disk,
            mount,
            dir,
            wal,
            replica,
            cursor,
            history,
            acks_in_flight: Default::default(),
            link_down_until: 0,
            heard: last,
            progress,
        });
        Ok(())
    }

    /// One standby (at random) reads what the leader wrote, applies it,
    /// writes and syncs it, and acknowledges.
    fn replicate(&mut self) -> Check {
        if self.standbys.is_empty() {
            return Ok(());
        }
        let i = self.rng.gen_range(0..self.standbys.len());
        self.replicate_to(i)
    }

    /// Standby `i` reads what the leader wrote, applies it, writes and
    /// syncs it, and acknowledges; a log it cannot follow (segments
    /// retention deleted, damage) makes it start afresh.
    fn replicate_to(&mut self, i: usize) -> Check {
        if self.step < self.standbys[i].link_down_until {
            // Partitioned: nothing flows either way.
            return Ok(());
        }
        let Some(node) = self.node.as_mut() else { return Ok(()) };
        let standby = &mut self.standbys[i];
        // Acknowledgements sent earlier arrive now, in order (or some of
        // them: delayed, never reordered).
        let arrive = self.rng.gen_range(0..=standby.acks_in_flight.len());
        for lsn in standby.acks_in_flight.drain(..arrive) {
            node.wal.send(WalMsg::StandbyDurable { node: NODE_IDS[standby.id].to_string(), lsn });
            if lsn > standby.heard {
                standby.heard = lsn;
                standby.progress = Some(self.mono.now());
            }
        }
        let id = standby.id;
        if arrive > 0 && node.lease.is_some() {
            self.keep_sync_set()?;
        }
        // The policy's round may have ended this leadership (and so
        // changed who stands by).
        let Some(i) = self.standbys.iter().position(|s| s.id == id) else { return Ok(()) };
        let Some(node) = self.node.as_mut() else { return Ok(()) };
        let standby = &mut self.standbys[i];
        if standby.cursor.is_none() {
            // Reconnected after a break: follow from what it holds, and say
            // what that is (acknowledgements in flight were lost with the
            // connection).
            let from = standby.replica.last_lsn() + 1;
            match crate::wal::follow::LogCursor::open(&self.dir, from) {
                Ok(cursor) => {
                    standby.cursor = Some(cursor);
                    standby.acks_in_flight.push_back(from - 1);
                }
                Err(_) => return self.rebuild_standby(id),
            }
        }
        let Some(cursor) = standby.cursor.as_mut() else { unreachable!("opened above") };
        let upto = node.wal.written_lsn();
        let mut out = bytes::BytesMut::new();
        match cursor.read(upto, 64 << 10, &mut out) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                let message = e.to_string().replace(&*self._mount.root.to_string_lossy(), "<disk>");
                self.trace(|| format!("{} cannot follow: {message}", NODE_IDS[id]));
                return self.rebuild_standby(id);
            }
        }
        let mut records = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let (lsn, event, used) = crate::wal::record::decode_record(&out[at..])
                .map_err(|e| format!("the cursor handed out a bad record: {e}"))?;
            records.push((lsn, event));
            at += used;
        }
        let (first, last) = (records[0].0, records[records.len() - 1].0);
        if let Err(e) = crate::cluster::standby::record_terms(&standby.dir, &mut standby.history, &records) {
            let message = e.to_string();
            self.trace(|| format!("{} history failed: {message}", NODE_IDS[id]));
            return self.crash_standby(i, false);
        }
        standby
            .replica
            .apply(&records)
            .map_err(|e| format!("the standby could not apply the leader's records: {e}"))?;
        standby.wal.send(WalMsg::Records { bytes: out.freeze(), first_lsn: first, last_lsn: last });
        if let Err(e) = standby.wal.flush() {
            let message = e.to_string();
            self.trace(|| format!("{} log failed: {message}", NODE_IDS[id]));
            return self.crash_standby(i, false);
        }
        standby.acks_in_flight.push_back(last);
        // Caught up with a leader that has nothing unwritten: the same state
        // (compared every `STANDBY_COMPARE_EVERY`th time: the digests of
        // every sale and reservation were half the simulator's time).
        let mut differs = false;
        let caught_up = last == node.wal.written_lsn() && !node.wal.has_pending();
        self.catch_ups += u64::from(caught_up);
        // (Not while a sale is between shards: it is in neither engine.)
        let in_flight = self.moving.as_ref().is_some_and(|m| !m.arrived);
        if caught_up && self.catch_ups.is_multiple_of(STANDBY_COMPARE_EVERY) && !in_flight {
            let mut leader = BTreeMap::new();
            for shard in &node.shards {
                leader.extend(shard.engine().digest());
            }
            let mut follower = BTreeMap::new();
            let engines = standby.replica.engines();
            for engine in engines.pool.iter().chain(&engines.hot) {
                follower.extend(engine.digest());
            }
            differs = leader != follower;
        }
        self.report.replicated += records.len() as u64;
        self.trace(|| format!("{} durable to {last}", NODE_IDS[id]));
        if differs {
            return Err(format!("{}'s state differs from the leader's at LSN {last}", NODE_IDS[id]));
        }
        Ok(())
    }

    /// Standby `i` dies (or its log failed) and restarts from its disk.
    fn crash_standby(&mut self, i: usize, power_loss: bool) -> Check {
        let Standby { id, disk, mount, wal, replica, cursor, .. } = self.standbys.remove(i);
        drop((wal, replica, cursor));
        if power_loss {
            disk.power_loss();
        } else {
            disk.kill();
        }
        self.report.standby_crashes += 1;
        self.trace(|| format!("{} crash power_loss={power_loss}", NODE_IDS[id]));
        match self.open_standby(id, disk, mount) {
            Ok(()) => Ok(()),
            // What it cannot start from (an ambiguous torn write, an I/O
            // error): a fresh copy, as an operator would do.
            Err((e, _)) => {
                let message = e.replace(&*self._mount.root.to_string_lossy(), "<disk>");
                self.trace(|| format!("{} restart failed ({message}); rebuilding", NODE_IDS[id]));
                self.rebuild_standby(id)
            }
        }
    }

    fn wal_config(&self, dir: &std::path::Path) -> WalConfig {
        WalConfig {
            segment_bytes_max: SEGMENT_BYTES,
            flush_bytes: 4096,
            durability: self.config.durability,
            // Async mode syncs on a wall-clock interval: never, here (only
            // rotations sync), so a run stays a function of its seed.
            async_sync_interval: std::time::Duration::from_secs(3600),
            ..WalConfig::new(dir)
        }
    }

    // --- one step ---------------------------------------------------------

    fn one_step(&mut self, quiet: bool) -> Check {
        let roll = self.rng.gen_range(0..10_000);
        let result = match roll {
            0..=3_999 => self.client_sends(quiet),
            4_000..=5_999 => {
                let node = self.node.as_mut().expect("running");
                // Mostly a shard with work (a shard thread runs when it
                // has some), sometimes any (an idle one's cycle expires).
                let busy: Vec<usize> = (0..node.shards.len())
                    .filter(|&i| node.shards[i].queued() > 0 || !node.handles[i].1.is_empty())
                    .collect();
                let shard = if !busy.is_empty() && self.rng.gen_ratio(3, 4) {
                    busy[self.rng.gen_range(0..busy.len())]
                } else {
                    self.rng.gen_range(0..node.shards.len())
                };
                // What other shards passed on or handed over since.
                while let Ok(msg) = node.handles[shard].1.try_recv() {
                    node.shards[shard].push(msg);
                }
                node.shards[shard].cycle();
                self.trace_op(&[b'c', shard as u8], || format!("cycle shard {shard}"));
                self.follow_move()?;
                // The engine asserts its invariants on every apply; the
                // full check (every sale, every user) now and then.
                self.cycles += 1;
                if self.cycles.is_multiple_of(FULL_CHECK_EVERY_CYCLES) {
                    self.check_invariants()
                } else {
                    Ok(())
                }
            }
            6_000..=7_999 => {
                let quiet_or_not = !quiet;
                self.trace_op(b"f", || "flush".to_string());
                self.flush(quiet_or_not)
            }
            8_000..=8_399 => self.replicate(),
            9_190..=9_199 if !quiet && !self.standbys.is_empty() && self.config.faults.link => {
                let i = self.rng.gen_range(0..self.standbys.len());
                let name = NODE_IDS[self.standbys[i].id];
                if self.rng.gen_bool(0.5) {
                    // The connection breaks: the cursor and the
                    // acknowledgements on their way are gone.
                    self.standbys[i].cursor = None;
                    self.standbys[i].acks_in_flight.clear();
                    self.trace(|| format!("link to {name} broken"));
                } else {
                    let steps = self.rng.gen_range(20..400);
                    self.standbys[i].link_down_until = self.step + steps;
                    self.trace(|| format!("link to {name} partitioned for {steps} steps"));
                }
                Ok(())
            }
            9_185..=9_189 if !quiet && !self.standbys.is_empty() && self.config.faults.kill => {
                let i = self.rng.gen_range(0..self.standbys.len());
                let power = self.config.faults.power_loss && self.rng.gen_bool(0.5);
                self.crash_standby(i, power)
            }
            8_400..=8_999 => {
                let ms: u64 = if self.rng.gen_ratio(1, 20) {
                    self.rng.gen_range(1_000..8_000)
                } else {
                    self.rng.gen_range(1..200)
                };
                let mut bytes = vec![b'+'];
                bytes.extend_from_slice(&ms.to_le_bytes());
                self.trace_op(&bytes, || format!("clock +{ms}"));
                self.advance(ms)
            }
            9_000..=9_049 if !quiet && self.config.faults.clock_jump => {
                // A step back within the documented bound (the wall clock
                // corrected by NTP): expiry deadlines stay monotonic.
                let back = self.rng.gen_range(1..CLOCK_STEP_BACK_MS_MAX);
                // (The latest time shown, which a slow sync may have moved.)
                self.high_water_ms = self.high_water();
                self.clock.step_back_ms(back);
                self.trace(|| format!("clock -{back}"));
                Ok(())
            }
            9_100..=9_149 => {
                let sku = SKUS[self.rng.gen_range(0..SKUS.len())];
                // Resume a paused sale sooner than pausing a running one.
                let p = self.pause[&sku];
                let paused = if p.paused { false } else { self.rng.gen_ratio(1, 3) };
                if paused == p.paused && p.open == 0 {
                    return self.deliver();
                }
                self.trace(|| format!("set paused {sku} {paused}"));
                self.admin(AdminCmd::SetPaused { sku, paused });
                Ok(())
            }
            9_050..=9_099 => {
                let sku = SKUS[self.rng.gen_range(0..SKUS.len())];
                let qty = self.rng.gen_range(1..5);
                self.trace(|| format!("restock {sku} +{qty}"));
                self.admin(AdminCmd::Restock { sku, qty });
                Ok(())
            }
            9_150..=9_169 => {
                let node = self.node.as_ref().expect("running");
                let active = node.wal.stats().active_segment_first_lsn.load(std::sync::atomic::Ordering::Acquire);
                let armed = self.disk.crash_armed();
                let result = recovery::checkpoint(&self.dir, Some(active), Retention::Consumer);
                self.crash_pending = armed && !self.disk.crash_armed();
                let ok = result.is_ok();
                self.trace(|| format!("checkpoint below {active}: ok={ok}"));
                self.report.checkpoints += u64::from(ok);
                match result {
                    Ok(_) | Err(RecoveryError::Io(_)) => Ok(()),
                    // A flipped bit recovery did not need to read (a segment
                    // a newer snapshot covers, kept for falling back to): the
                    // checkpoint finds it and refuses, as it must; the
                    // operator restores the bytes.
                    Err(_) if !self.flips.is_empty() => {
                        self.report.checkpoint_refusals += 1;
                        for flip in std::mem::take(&mut self.flips) {
                            self.disk.unflip(&flip);
                        }
                        self.trace(|| "checkpoint refused flipped data; restored".to_string());
                        Ok(())
                    }
                    Err(e) => Err(format!("checkpoint failed on a log with no damage: {e}")),
                }
            }
            9_170..=9_174 if !quiet && self.config.faults.disk_full && !self.disk_full => {
                let room = self.rng.gen_range(0..8192);
                self.disk.set_capacity(self.disk.used() + room);
                self.disk_full = true;
                self.trace(|| format!("disk nearly full: {room} bytes left"));
                Ok(())
            }
            9_175..=9_184 if !quiet && (self.config.faults.kill || self.config.faults.power_loss) => {
                if self.rng.gen_bool(0.5) {
                    // Between a group's write and its fsync.
                    self.trace(|| "crash armed for the next fsync".to_string());
                    self.disk.crash_at_next_sync();
                    Ok(())
                } else {
                    let power = self.crash_kind();
                    self.crash(power)
                }
            }
            9_210..=9_409 => self.reconcile(),
            9_410..=9_439 if !quiet => self.start_move(),
            9_200..=9_203 if !quiet && !self.standbys.is_empty() && self.config.faults.lease => self.pause_leader(),
            9_204..=9_207 if !quiet && self.config.standby && self.config.faults.lease => {
                let ms = self.rng.gen_range(200..4_000);
                // The leader (its lease at stake) or the standby (it cannot
                // campaign while cut off).
                let id = match self.standbys.len() {
                    n if n > 0 && self.rng.gen_bool(0.3) => self.standbys[self.rng.gen_range(0..n)].id,
                    _ => self.leader_at,
                };
                self.etcd.cut(NODE_IDS[id], ms);
                self.trace(|| format!("{} cut off from etcd for {ms} ms", NODE_IDS[id]));
                Ok(())
            }
            _ => self.deliver(),
        };
        result?;
        // An armed crash that struck elsewhere (a checkpoint's fsync).
        if self.node.is_some() && self.crash_pending {
            self.crash_pending = false;
            let power = self.crash_kind();
            return self.crash(power);
        }
        Ok(())
    }

    /// Power loss or process kill, as the enabled faults allow.
    fn crash_kind(&mut self) -> bool {
        match (self.config.faults.kill, self.config.faults.power_loss) {
            (true, true) => self.rng.gen_bool(0.5),
            (_, power) => power,
        }
    }

    fn client_sends(&mut self, quiet: bool) -> Check {
        let c = self.rng.gen_range(0..CLIENTS);
        if self.clients[c].inflight.len() >= CLIENT_INFLIGHT_MAX {
            return self.deliver();
        }
        // Retry an unknown outcome first (same id, same request), as a
        // checkout service does; in the quiet phase always.
        if !self.clients[c].unknown.is_empty() && (quiet || self.rng.gen_bool(0.5)) {
            // As many as it may have in flight, oldest first (a client
            // that reconnects resends what it is waiting for).
            let room = CLIENT_INFLIGHT_MAX - self.clients[c].inflight.len();
            let n = room.min(self.clients[c].unknown.len());
            let ops: Vec<Op> = self.clients[c].unknown.drain(..n).collect();
            self.send(c, ops, true);
        } else if quiet {
            return self.deliver();
        } else {
            // One to a few operations in one message (a pipelined read or
            // a batch frame).
            let n = self.rng.gen_range(1..=CLIENT_INFLIGHT_MAX - self.clients[c].inflight.len());
            let ops: Vec<Op> = (0..n).filter_map(|_| self.new_op()).collect();
            self.send(c, ops, false);
        }
        Ok(())
    }

    fn new_op(&mut self) -> Option<Op> {
        let roll = self.rng.gen_range(0..100);
        if roll < 12 {
            let user = self.rng.gen_range(1..=USERS);
            return Some(Op::Ticket { sku: QUEUED_SKU, user, join: self.rng.gen_bool(0.5) });
        }
        if roll < 55 || self.acked.is_empty() {
            let sku = SKUS[self.rng.gen_range(0..SKUS.len())];
            let user = if sku == QUEUED_SKU && !self.joined.is_empty() && self.rng.gen_bool(0.8) {
                // Mostly someone in line.
                *self.joined.iter().nth(self.rng.gen_range(0..self.joined.len())).expect("in range")
            } else {
                self.rng.gen_range(1..=USERS)
            };
            let qty = self.rng.gen_range(1..=2);
            let id = self.rng.gen::<u128>() | 1;
            let at = if sku != LOCATED_SKU {
                Where::Default
            } else {
                match self.rng.gen_range(0..5) {
                    0 => Where::Default,
                    1 => Where::Region(REGION_ORDER.0),
                    2 => Where::Region(9),
                    _ => {
                        let n = self.rng.gen_range(1..=3);
                        let ids: Vec<u16> = (0..n).map(|_| self.rng.gen_range(1..=4)).collect();
                        Where::locations(&ids)
                    }
                }
            };
            return Some(Op::Reserve { sku, user, qty, id, at });
        }
        // A reservation the model holds, most of the time (a few tries),
        // else any acknowledged one.
        let mut pick = || self.acked_ids[self.rng.gen_range(0..self.acked_ids.len())];
        let mut id = pick();
        for _ in 0..4 {
            if self.acked[&id].state == HoldState::Held {
                break;
            }
            id = pick();
        }
        let sku = self.acked[&id].sku;
        Some(if roll < 80 { Op::Confirm { sku, id } } else { Op::Release { sku, id } })
    }

    fn send(&mut self, c: usize, ops: Vec<Op>, retry: bool) {
        self.report.ops_sent += ops.len() as u64;
        let mut by_shard: BTreeMap<usize, Vec<(Answer, SaleOp)>> = BTreeMap::new();
        let mut tickets = Vec::new();
        for op in ops {
            if !retry {
                self.open_changed(&op, true);
            }
            let shard = self.route_from_connection(op.sku());
            let client = &mut self.clients[c];
            let request_id = client.next_request;
            client.next_request += 1;
            match op.to_sale_op() {
                Some((opcode, sale_op)) => {
                    by_shard.entry(shard).or_default().push((Answer::Alone { request_id, opcode }, sale_op))
                }
                None => tickets.push((request_id, op.clone(), shard)),
            }
            let p = &self.pause[&op.sku()];
            let joins = match op {
                Op::Ticket { sku, user, join } => {
                    let n = self.joins.entry((sku, user)).or_default();
                    *n += u64::from(join);
                    *n
                }
                _ => 0,
            };
            let during_move = self.moving.as_ref().is_some_and(|m| m.sku == op.sku());
            let sent = Sent {
                during_move,
                op,
                retry,
                pauses: p.pauses,
                resumes: p.resumes,
                paused: (p.open == 0).then_some(p.paused),
                joins,
            };
            self.clients[c].inflight.insert(request_id, sent);
        }
        let (tx, conn) = (self.clients[c].tx.clone(), self.clients[c].conn);
        let node = self.node.as_mut().expect("running");
        for (shard, ops) in by_shard {
            node.shards[shard].push(ShardMsg::Ops { ops, tx: tx.clone(), conn, received: std::time::Instant::now() });
        }
        for (request_id, op, shard) in tickets {
            let Op::Ticket { sku, user, join } = op else { unreachable!("tickets only") };
            let reply = crate::shard::ReplyTo { tx: tx.clone(), request_id, received: std::time::Instant::now() };
            node.shards[shard].push(ShardMsg::Ticket { sku, user, join, reply });
        }
        let mut bytes = vec![b's', c as u8];
        let last = self.clients[c].inflight.values().last().map(|s| s.op.clone());
        if let Some(op) = &last {
            op.digest_bytes(&mut bytes);
        }
        self.trace_op(&bytes, || format!("client {c} sends {last:?}"));
    }

    // --- answers and checks ---------------------------------------------

    /// Hand every released reply to its client and check it.
    fn deliver(&mut self) -> Check {
        self.follow_move()?;
        if let Some(node) = self.node.as_mut() {
            let admin = std::mem::take(&mut node.admin);
            let mut waiting = Vec::new();
            let mut answered = Vec::new();
            for (cmd, mut rx) in admin {
                match rx.try_recv() {
                    Ok((outcome, _)) => answered.push((cmd, outcome)),
                    Err(oneshot::error::TryRecvError::Empty) => waiting.push((cmd, rx)),
                    // Dropped with a failed group: unknown.
                    Err(oneshot::error::TryRecvError::Closed) => {}
                }
            }
            self.node.as_mut().expect("running").admin = waiting;
            for (cmd, outcome) in answered {
                let line = format!("admin {cmd:?} answered {:?}", outcome.status);
                self.trace(|| line);
                match cmd {
                    AdminCmd::Create(c) | AdminCmd::CreateAt(c, _) if outcome.status == Status::Ok => {
                        *self.total.get_mut(&c.sku).expect("sku") += c.stock;
                    }
                    AdminCmd::Restock { sku, qty } if outcome.status == Status::Ok => {
                        *self.total.get_mut(&sku).expect("sku") += qty;
                        *self.total_unknown.get_mut(&sku).expect("sku") -= qty;
                    }
                    AdminCmd::SetPaused { sku, paused } if outcome.status == Status::Ok => {
                        let p = self.pause.get_mut(&sku).expect("sku");
                        p.paused = paused;
                        p.open -= 1;
                    }
                    _ => return Err(format!("admin command answered {:?}", outcome.status)),
                }
            }
        }
        for c in 0..CLIENTS {
            while let Ok(out) = self.clients[c].rx.try_recv() {
                let results = match out {
                    Outbound::Outcomes { results, .. } => results,
                    Outbound::Reply { request_id, reply: Reply::Ticket(ticket), .. } => {
                        let Some(sent) = self.clients[c].inflight.remove(&request_id) else {
                            return Err(format!("client {c}: a ticket for request {request_id}, not in flight"));
                        };
                        self.report.ops_answered += 1;
                        self.open_changed(&sent.op, false);
                        let mut bytes = vec![b't', c as u8];
                        sent.op.digest_bytes(&mut bytes);
                        bytes.extend_from_slice(&ticket.status.code().to_le_bytes());
                        bytes.push(u8::from(ticket.pre_start) | u8::from(ticket.stock_pending) << 1);
                        for field in [ticket.position, ticket.estimated_wait_ms, ticket.admitted_until_ms] {
                            bytes.extend_from_slice(&field.to_le_bytes());
                        }
                        self.trace_op(&bytes, || format!("client {c} got {ticket:?} for {:?}", sent.op));
                        self.check_ticket(c, &sent, &ticket)?;
                        continue;
                    }
                    _ => return Err("an answer of an unexpected kind".to_string()),
                };
                for (answer, outcome) in results {
                    let Answer::Alone { request_id, .. } = answer else {
                        return Err("an answer for a batch slot on a connection that sent none".to_string());
                    };
                    let Some(sent) = self.clients[c].inflight.remove(&request_id) else {
                        return Err(format!("client {c}: an answer to request {request_id}, not in flight"));
                    };
                    self.check_pause(&sent, outcome.status)?;
                    let op = sent.op;
                    self.open_changed(&op, false);
                    self.report.ops_answered += 1;
                    let (status, detail) = (outcome.status, outcome.detail);
                    let mut bytes = vec![b'g', c as u8];
                    op.digest_bytes(&mut bytes);
                    bytes.extend_from_slice(&status.code().to_le_bytes());
                    bytes.extend_from_slice(&detail.to_le_bytes());
                    self.trace_op(&bytes, || format!("client {c} got {status:?} {detail} for {op:?}"));
                    self.check_answer(&op, status, detail, outcome.location)?;
                }
            }
        }
        Ok(())
    }

    /// `paused` only if the sale was paused, or a pause was sent, while the
    /// operation was in flight; a new reservation never while the sale was
    /// paused throughout (a retry may answer its earlier reservation).
    fn check_pause(&self, sent: &Sent, status: Status) -> Check {
        let p = &self.pause[&sent.op.sku()];
        match status {
            Status::Paused if sent.paused == Some(false) && p.pauses == sent.pauses => {
                Err(format!("{:?} answered paused; no pause was acknowledged or sent", sent.op))
            }
            Status::Reserved
                if !sent.retry
                    && !self.acked.contains_key(&sent.op.id())
                    && sent.paused == Some(true)
                    && p.resumes == sent.resumes =>
            {
                Err(format!("{:?} reserved while the sale was paused", sent.op))
            }
            _ => Ok(()),
        }
    }

    /// A ticket is consistent with the line: positions only go down while
    /// a user waits (a new place only through a JOIN after a lapse), and
    /// no `waiting` after an admission without a JOIN in between. Compared
    /// per connection: its answers come in the order they were decided
    /// (answers on different connections released by one group do not).
    /// Only tickets with no JOIN of that user sent between them are
    /// compared: after an unseen lapse a JOIN takes a new place at the back.
    fn check_ticket(&mut self, client: usize, sent: &Sent, ticket: &stampede_protocol::message::QueueTicket) -> Check {
        let Op::Ticket { sku, user, join } = sent.op else { unreachable!("a ticket answers a ticket op") };
        let key = (client, sku, user);
        if join && matches!(ticket.status, Status::Waiting | Status::Admitted) {
            self.joined.insert(user);
        }
        if sent.during_move {
            // Not ordered with the connection's other tickets: neither
            // compared nor the reference for the next one.
            return Ok(());
        }
        let last = self.line.get(&key).copied().filter(|(_, joins)| *joins == sent.joins && !join);
        match (ticket.status, last.map(|(seen, _)| seen)) {
            (Status::Waiting, Some(Seen::Waiting(p))) if !ticket.pre_start && ticket.position > p => {
                return Err(format!("user {user} moved back in line: position {p}, then {}", ticket.position));
            }
            (Status::Waiting, Some(Seen::Admitted)) if !ticket.pre_start => {
                return Err(format!("user {user} waiting again after an admission, without joining"));
            }
            _ => {}
        }
        match ticket.status {
            Status::Waiting if !ticket.pre_start => {
                self.line.insert(key, (Seen::Waiting(ticket.position), sent.joins));
            }
            Status::Admitted => {
                self.line.insert(key, (Seen::Admitted, sent.joins));
            }
            _ => {
                self.line.remove(&key);
            }
        }
        Ok(())
    }

    /// An answer is consistent with everything acknowledged before it.
    fn check_answer(&mut self, op: &Op, status: Status, detail: u64, location: u16) -> Check {
        let id = op.id();
        let now = self.high_water();
        match (op, status) {
            (Op::Ticket { .. }, status) => Err(format!("a JOIN or POLL answered as an outcome ({status:?})")),
            (Op::Reserve { sku, user, qty, at, .. }, Status::Reserved) => {
                if *sku == QUEUED_SKU && !self.acked.contains_key(&id) && !self.may_have_joined(*user) {
                    return Err(format!("user {user} reserved the queued sale without ever joining its line"));
                }
                if let Some(a) = self.acked.get(&id) {
                    if a.expires_at_ms != detail {
                        return Err(format!(
                            "retry of RESERVE {id:x} answered expiry {detail}, acknowledged {}",
                            a.expires_at_ms
                        ));
                    }
                    if a.location != location {
                        return Err(format!(
                            "retry of RESERVE {id:x} answered warehouse {location}, acknowledged {}",
                            a.location
                        ));
                    }
                } else if *sku != LOCATED_SKU {
                    if location != 0 {
                        return Err(format!("sku {sku} (one location) reserved at warehouse {location}"));
                    }
                } else {
                    // A warehouse of the sale, and one the order allowed.
                    let allowed: Vec<u16> = match at {
                        Where::Locations { .. } => at.list().to_vec(),
                        Where::Region(r) if *r == REGION_ORDER.0 => REGION_ORDER.1.to_vec(),
                        _ => WAREHOUSES.iter().map(|(l, _)| *l).collect(),
                    };
                    if !allowed.contains(&location) || !WAREHOUSES.iter().any(|(l, _)| *l == location) {
                        return Err(format!("RESERVE_AT {at:?} answered warehouse {location}"));
                    }
                }
                if !self.acked.contains_key(&id) {
                    self.report.reservations_acked += 1;
                    self.acked_ids.push(id);
                    self.acked_by_sku.entry(*sku).or_default().push(id);
                    self.acked_by_user.entry((*sku, *user)).or_default().push(id);
                    self.acked.insert(
                        id,
                        Acked {
                            sku: *sku,
                            user: *user,
                            qty: *qty,
                            expires_at_ms: detail,
                            state: HoldState::Held,
                            confirmed_at_ms: None,
                            location,
                        },
                    );
                }
                self.check_stock_and_limits(*sku, *user)
            }
            (Op::Reserve { at, .. }, refused) => {
                if self.acked.contains_key(&id) {
                    return Err(format!("retry of an acknowledged RESERVE {id:x} answered {refused:?}"));
                }
                // Only a list naming a warehouse the sale lacks.
                if refused == Status::UnknownLocation
                    && !at.list().iter().any(|l| !WAREHOUSES.iter().any(|(w, _)| w == l))
                {
                    return Err(format!("RESERVE_AT {at:?} answered unknown_location"));
                }
                Ok(())
            }
            (Op::Confirm { .. } | Op::Release { .. }, Status::UnknownReservation) => {
                if self.acked.contains_key(&id) {
                    return Err(format!("acknowledged reservation {id:x} is unknown to the engine"));
                }
                Ok(())
            }
            (Op::Confirm { .. } | Op::Release { .. }, status) => {
                let Some(a) = self.acked.get_mut(&id) else {
                    return Err(format!("{status:?} for {id:x}, a reservation never acknowledged"));
                };
                let next = match (op, status, a.state) {
                    (Op::Confirm { .. }, Status::Confirmed, HoldState::Held) => {
                        a.confirmed_at_ms = Some(detail);
                        HoldState::Confirmed
                    }
                    (Op::Confirm { .. }, Status::Confirmed, HoldState::Confirmed)
                        if a.confirmed_at_ms.is_none_or(|at| at == detail) =>
                    {
                        a.confirmed_at_ms = Some(detail);
                        HoldState::Confirmed
                    }
                    (_, Status::Expired, HoldState::Held | HoldState::Expired)
                        if detail == a.expires_at_ms && now >= a.expires_at_ms =>
                    {
                        self.report.expiries_seen += 1;
                        HoldState::Expired
                    }
                    (Op::Release { .. }, Status::Released, HoldState::Held | HoldState::Released) => {
                        HoldState::Released
                    }
                    // A settle whose answer a crash lost landed after all.
                    (Op::Confirm { .. }, Status::AlreadyReleased, HoldState::Held | HoldState::Released) => {
                        HoldState::Released
                    }
                    (Op::Release { .. }, Status::AlreadyConfirmed, HoldState::Held | HoldState::Confirmed) => {
                        HoldState::Confirmed
                    }
                    (_, status, state) => {
                        return Err(format!(
                            "{op:?} answered {status:?} {detail} but the reservation was acknowledged {state:?} \
                             (expires {}, now {now})",
                            a.expires_at_ms
                        ))
                    }
                };
                a.state = next;
                Ok(())
            }
        }
    }

    /// Every operation whose answer is not in: in flight, or lost in a
    /// crash (it may have landed).
    fn open_ops(&self) -> impl Iterator<Item = &Op> {
        self.clients.iter().flat_map(|c| c.unknown.iter().chain(c.inflight.values().map(|s| &s.op)))
    }

    /// `op` was sent (`opened`) or answered: the counts of open RELEASEs
    /// and JOINs follow. (A crash leaves an operation open, unknown, until
    /// a retry is answered.)
    fn open_changed(&mut self, op: &Op, opened: bool) {
        fn count<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K, opened: bool) {
            if opened {
                *map.entry(key).or_default() += 1;
            } else if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(key) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        match *op {
            Op::Release { id, .. } => count(&mut self.open_releases, id, opened),
            Op::Ticket { user, join: true, .. } => count(&mut self.open_joins, user, opened),
            _ => {}
        }
    }

    /// A JOIN of the queued sale by `user` was answered, or is open.
    fn may_have_joined(&self, user: u64) -> bool {
        self.joined.contains(&user) || self.open_joins.contains_key(&user)
    }

    /// Units acknowledged as held (not yet due) or sold never exceed the
    /// stock, and no user holds more than the limit. (A RELEASE still
    /// unanswered may already have given its units back: those holds are
    /// not counted.)
    fn check_stock_and_limits(&self, sku: u64, user: u64) -> Check {
        let now = self.high_water();
        let live = |id: &u128| {
            let a = &self.acked[id];
            a.state == HoldState::Confirmed
                || (a.state == HoldState::Held && now < a.expires_at_ms && !self.open_releases.contains_key(id))
        };
        let units_of = |ids: &[u128]| ids.iter().filter(|id| live(id)).map(|id| u64::from(self.acked[id].qty)).sum();
        // The whole sale on every 16th acknowledgement (it is the costly
        // part: all of the sale's reservations), the user's on every one.
        let ids = &self.acked_by_sku[&sku];
        if ids.len().is_multiple_of(16) {
            let units: u64 = units_of(ids);
            let most = self.total[&sku] + self.total_unknown[&sku];
            if units > most {
                return Err(format!(
                    "oversold: {units} units of sku {sku} acknowledged against a stock of at most {most}"
                ));
            }
            if sku == LOCATED_SKU {
                for (location, stock) in self.warehouse_stock() {
                    let here: u64 = ids
                        .iter()
                        .filter(|id| live(id) && self.acked[*id].location == location)
                        .map(|id| u64::from(self.acked[id].qty))
                        .sum();
                    if here > stock {
                        return Err(format!(
                            "oversold: {here} units acknowledged at warehouse {location} of sku {sku}, which has \
                             at most {stock}"
                        ));
                    }
                }
            }
        }
        let mine: u64 = units_of(&self.acked_by_user[&(sku, user)]);
        if mine > u64::from(LIMIT_PER_USER) {
            return Err(format!("user {user} holds {mine} units of sku {sku}, over the limit of {LIMIT_PER_USER}"));
        }
        Ok(())
    }

    /// The most each warehouse of `LOCATED_SKU` can hold: its stock, and
    /// for the first (where RESTOCK goes) the restocks acknowledged or
    /// whose answer was lost.
    fn warehouse_stock(&self) -> Vec<(u16, u64)> {
        let restocked = self.total[&LOCATED_SKU].saturating_sub(STOCK) + self.total_unknown[&LOCATED_SKU];
        WAREHOUSES.iter().enumerate().map(|(i, &(l, s))| (l, if i == 0 { s + restocked } else { s })).collect()
    }

    fn check_invariants(&self) -> Check {
        for shard in &self.node.as_ref().expect("running").shards {
            let engine = shard.engine();
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.check_invariants()));
            if caught.is_err() {
                return Err("an engine invariant broke".to_string());
            }
        }
        Ok(())
    }

    /// Every acknowledged outcome is in the engines, in the same state (or
    /// a later one that an unknown outcome explains), and totals add up.
    /// `resolve`: these engines are now the authority, so admin commands
    /// a crash left unknown take the state they show.
    fn check_against_engines(&mut self, resolve: bool) -> Check {
        self.check_invariants()?;
        let now = self.high_water();
        let node = self.node.as_ref().expect("running");
        let unknown: std::collections::BTreeSet<u128> = self.open_ops().map(Op::id).collect();
        for sku in SKUS {
            let shard = node.route(sku);
            let status = node.shards[shard].engine().status(sku, now);
            if status.status != Status::Ok {
                if self.total[&sku] == 0 {
                    continue;
                }
                return Err(format!("sale {sku} lost: {:?}", status.status));
            }
            // Where the last acknowledged move put it (or one whose answer
            // was lost), on a shard that matches.
            let placed = (status.sale.hot, status.sale.pinned);
            let (acked, unknown) = self.placement[&sku];
            if placed != acked && Some(placed) != unknown {
                return Err(format!(
                    "sale {sku} placed (dedicated, pinned) = {placed:?}, acknowledged {acked:?} (unknown: {unknown:?})"
                ));
            }
            if status.sale.hot != (shard >= POOL_SHARDS) {
                return Err(format!("sale {sku} hot={} runs on shard {shard}", status.sale.hot));
            }
            if resolve {
                self.placement.insert(sku, (placed, None));
            }
            let p = self.pause.get_mut(&sku).expect("sku");
            if p.open == 0 && status.sale.paused != p.paused {
                return Err(format!(
                    "sale {sku} paused={} in the engine, acknowledged {}",
                    status.sale.paused, p.paused
                ));
            }
            // Commands a crash lost landed or not: the engine says which.
            if resolve {
                p.paused = status.sale.paused;
                p.open = 0;
            }
            let (low, high) = (self.total[&sku], self.total[&sku] + self.total_unknown[&sku]);
            if status.sale.total < low || status.sale.total > high {
                return Err(format!("sale {sku} total {} outside the acknowledged {low}..={high}", status.sale.total));
            }
            // Its warehouses: the ones created, in order, each adding up;
            // all but the first (where restocks go) at their stock.
            let warehouses = node.shards[shard].engine().locations(sku).locations;
            let want: Vec<u16> = if sku == LOCATED_SKU { WAREHOUSES.iter().map(|w| w.0).collect() } else { vec![0] };
            if warehouses.iter().map(|l| l.location).collect::<Vec<_>>() != want {
                return Err(format!("sale {sku} has warehouses {warehouses:?}"));
            }
            for (i, l) in warehouses.iter().enumerate() {
                let stock = if sku == LOCATED_SKU { WAREHOUSES[i].1 } else { STOCK };
                if l.available + l.reserved + l.sold != l.total || (i > 0 && l.total != stock) {
                    return Err(format!("sale {sku} warehouse {l:?} (stock {stock})"));
                }
            }
        }
        for (id, a) in &mut self.acked {
            let engine = node.shards[node.route(a.sku)].engine();
            let Some(r) = engine.reservation(*id) else {
                return Err(format!("acknowledged reservation {id:x} ({a:?}) is gone"));
            };
            if (r.sku, r.user, r.qty, r.expires_at_ms) != (a.sku, a.user, a.qty, a.expires_at_ms) {
                return Err(format!("reservation {id:x} is {r:?}, acknowledged as {a:?}"));
            }
            let at = engine.locations(a.sku).locations.get(usize::from(r.location)).map(|l| l.location);
            if at != Some(a.location) {
                return Err(format!("reservation {id:x} is at warehouse {at:?}, acknowledged at {}", a.location));
            }
            let settled_unknown = unknown.contains(id);
            let ok = match (a.state, r.state) {
                (x, y) if x == y => true,
                (HoldState::Held, HoldState::Expired) => now >= a.expires_at_ms,
                (HoldState::Held, HoldState::Confirmed | HoldState::Released) => settled_unknown,
                _ => false,
            };
            if !ok {
                return Err(format!("reservation {id:x} is {:?} in the engine, acknowledged {:?}", r.state, a.state));
            }
            if a.state == HoldState::Confirmed && a.confirmed_at_ms.is_some_and(|at| at != r.settled_at_ms) {
                return Err(format!(
                    "reservation {id:x} confirmed at {} but acknowledged at {:?}",
                    r.settled_at_ms, a.confirmed_at_ms
                ));
            }
        }
        Ok(())
    }
}
