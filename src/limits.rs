//! Every limit of the server in one place, unit last, each with its reason.
//! Wire limits (frame size, batch size, ...) live in the protocol crate and
//! are re-exported here so this file is the one place to read them all.

pub use stampede_protocol::limits::*;

/// Operations (each of a batch counted) queued for one shard before new
/// requests get `busy` instead of growing memory: at ~5M decisions/s a
/// full queue drains in ~13 ms, short enough to keep p99 low, long enough
/// to absorb a burst from thousands of connections. Every queued message
/// carries at least one operation (admin and move messages aside, which
/// are few), so this bounds the queue's messages too. The queue itself
/// grows in small blocks as it fills: a preallocated one of this many
/// slots cost every dedicated shard ~5 MiB however small its sale.
pub const SHARD_QUEUE_OPS_MAX: usize = 64 * 1024;

/// Operations (a batch counts each of its ops) a shard decides per cycle
/// before it hands the cycle's events to the log sink. Small enough that
/// the log writer fsyncs one cycle while the shard decides the next (so a
/// reply waits for about one fsync, not for a huge cycle), large enough to
/// amortise the hand-off: 4096 ops is about 1 ms of work.
pub const SHARD_CYCLE_OPS_MAX: usize = 4096;

/// Most sale operations one connection sends a shard in one message (what
/// one socket read brought in, batches included). A message is decided
/// whole, in one cycle: this keeps one busy connection's message to a
/// quarter of a cycle, so others' requests are not stuck behind it.
pub const SHARD_MESSAGE_OPS_MAX: usize = 1024;

/// How often an idle shard wakes to expire reservations. Expiry is
/// therefore at most this late (plus queueing), which is far below the
/// minute-scale TTLs of a checkout.
pub const EXPIRY_TICK_MS: u64 = 10;

/// Retry hint sent with `busy`: about one full-queue drain time.
pub const BUSY_RETRY_AFTER_MS: u64 = 10;

/// Requests one connection may have in flight (sent, not yet answered).
/// The reader stops reading the socket at this point, so a client that
/// never reads its replies holds at most this many replies in memory.
pub const CONNECTION_REQUESTS_INFLIGHT_MAX: usize = 4096;

/// Concurrent client connections. Past this, new connections are accepted
/// and immediately closed so the listener backlog does not fill up.
pub const CONNECTIONS_MAX: usize = 10_000;

/// An authenticated connection that sends nothing for this long, with no
/// request in flight, is closed: it holds a connection slot (of
/// CONNECTIONS_MAX) and buffers for nobody. Pooled clients ping more often
/// than this; the reconciler's stream is exempt (its server sends
/// heartbeats).
pub const CONNECTION_IDLE_TIMEOUT_MS: u64 = 5 * 60 * 1000;

/// At shutdown, connections get this long to send the replies they owe
/// and close before the final snapshot is written regardless: a client
/// that does not read its replies cannot hold a shutdown (or a failover)
/// hostage. Every reply is in the connection's writer by then; this bounds
/// only the socket writes.
pub const SHUTDOWN_CONNECTIONS_DRAIN_MS: u64 = 2_000;

/// After a connection's last reply and FIN, the server reads and discards
/// the client's input until it closes too, at most this long: closing a
/// socket with unread input resets it, and a reset destroys replies the
/// client has received but not read yet (conn.rs, `linger`).
pub const CONNECTION_CLOSE_LINGER_MS: u64 = 1_000;

/// A connection must complete HELLO within this time (slowloris guard).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Units of stock one sale may hold (initial + restocks). 2^48 is far past
/// any real inventory and keeps every sum of counters far from u64 overflow.
pub const STOCK_UNITS_MAX: u64 = 1 << 48;

/// Longest reservation TTL: one week. A longer hold is a pre-order, not a
/// checkout, and would keep stock out of the sale.
pub const RESERVATION_TTL_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// Default reservation TTL: 10 minutes, long enough for 3-D Secure.
pub const RESERVATION_TTL_MS_DEFAULT: u64 = 10 * 60 * 1000;

/// Dedicated (hot) shards, each a pinned thread. Each one costs a thread
/// and ideally a core; more than this is a configuration mistake.
pub const HOT_SHARDS_MAX: usize = 64;

// ----------------------------------------------------------- placement
// The demand monitor (`src/placement.rs`) moves a sale to a shard of its
// own when it outgrows its pool shard, and back when it cools.

/// Operations a shard holds for a sale on its way to it (a move): the
/// ones arriving while the old shard finishes what it has. Past this,
/// `busy` with `BUSY_RETRY_AFTER_MS`. A move takes well under a
/// millisecond, so this is only reached if the old shard is far behind.
pub const MOVE_HELD_OPS_MAX: usize = 64 * 1024;

/// How often the monitor reads the shards' demand counters.
pub const PLACEMENT_INTERVAL_MS: u64 = 250;

/// A sale deciding this many operations a second on a pool shard is
/// promoted whatever its share: at this rate it is a drop, not an
/// ordinary product, and its stampede should not queue other SKUs.
pub const PROMOTE_OPS_PER_S_DEFAULT: u64 = 50_000;

/// ...or a sale taking at least this share (percent) of the decisions
/// of a pool shard that is saturated: busy at least
/// `SATURATED_BUSY_PERCENT` of the time, or refusing requests `busy`.
pub const PROMOTE_SHARE_PERCENT: u64 = 50;
pub const SATURATED_BUSY_PERCENT: u64 = 70;

/// The condition must hold this many intervals in a row (one interval's
/// burst is not a trend): 2 x 250 ms, so a sale that turns hot is moved
/// within about a second.
pub const PROMOTE_AFTER_INTERVALS: u32 = 2;

/// A sale the monitor promoted goes back to the pool once it decides
/// fewer than this many operations a second (a tenth of the promotion
/// rate: the gap is the hysteresis) ...
pub const DEMOTE_OPS_PER_S_DEFAULT: u64 = 5_000;

/// ... for this long without a break.
pub const DEMOTE_AFTER_MS_DEFAULT: u64 = 30_000;

/// Dedicated shards the monitor may hold at once, by default: half the
/// cores (at least one), leaving the rest to the pool, the connections
/// and the log writer. Admins may place more (up to `HOT_SHARDS_MAX`).
pub fn auto_dedicated_default(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Reservation ids a server's id directory is sized for in its first tier
/// (at most half full, so probes stay short); more go on in further tiers
/// (engine/directory.rs). 1M ids: 2M slots of 32 bytes (64 MiB, faulted in
/// when the server starts).
pub const DIRECTORY_IDS_PRESIZED: usize = 1 << 20;

/// A new hot sale's tables (per-user records, reservation index and
/// records, expiry queue) are sized for its stock up to this many units
/// (~170 bytes a unit, resident from the sale's creation), so the drop
/// itself never waits for a rehash or a page fault. Past it they grow.
pub const SALE_PRESIZED_RESERVATIONS_MAX: u64 = 1 << 20;

/// Largest first tier of the id directory (128 MiB), however long the log
/// recovery presizes it for; the ids beyond it go on in further tiers.
pub const DIRECTORY_MAIN_SLOTS_MAX: usize = 1 << 22;

/// Slots a directory probe looks at in one tier before the id goes on to
/// the next: 8 cache lines in a row, which the hardware prefetcher
/// follows. A new id scans the whole window of every tier that is full
/// for it, so a longer window costs every claim once tiers crowd (32 made
/// a 10M-id sale markedly slower); at half load, clusters send a few
/// thousand of a million ids on early, which costs a page fault each.
pub const DIRECTORY_PROBE_SLOTS: usize = 16;

/// Tiers the id directory may chain, each twice the size of the one
/// before: 32 doublings of even a test's 2 Ki-slot first tier is more
/// slots than any machine has memory for, so this bound is never what
/// stops a server (memory is). It sizes the fixed array of tier pointers.
pub const DIRECTORY_TIERS_MAX: usize = 32;

/// A WAL segment is closed and a new one started past this size. 64 MiB
/// keeps the number of files small while a segment still replays in well
/// under a second and can be deleted as soon as it is covered.
pub const WAL_SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Default group-commit size bound: flush once this many bytes are waiting.
pub const WAL_FLUSH_BYTES_DEFAULT: usize = 1024 * 1024;

/// Default group-commit time bound: a record waits at most this long for
/// others to share its fsync. Small next to one fdatasync (~150 us here).
pub const WAL_FLUSH_INTERVAL_US_DEFAULT: u64 = 50;

/// Default fsync cadence in `async` durability mode: the loss window.
pub const WAL_ASYNC_SYNC_INTERVAL_MS_DEFAULT: u64 = 10;

/// Submissions (one shard cycle each) waiting for the log writer. When the
/// writer falls behind, shards block on this queue, their own queues fill,
/// and clients get `busy`: memory stays bounded.
pub const WAL_SUBMISSIONS_QUEUED_MAX: usize = 1024;

/// Snapshots kept in the data dir (the newest ones); older ones are deleted.
pub const SNAPSHOTS_KEPT: usize = 2;

/// Concurrent REPLICATE streams. One reconciler needs one; a few more
/// leave room for a standby or an audit tool. Each costs a file handle and
/// a read buffer, and reads the log from disk.
pub const REPLICATION_STREAMS_MAX: usize = 8;

/// A log stream this close to the head of the log (in records) reads the
/// next frame on its own task: what it reads was just written and is in
/// the page cache. Further behind, the read goes to the blocking pool (it
/// may wait for the disk). 4096 records is well under a megabyte.
pub const STREAM_INLINE_READ_RECORDS: u64 = 4096;

/// Frames (up to 64 KiB each) one REPLICATE stream or STATE_DUMP may have
/// queued for its connection's writer. The stream waits for the socket
/// beyond this, so a slow consumer holds at most ~1 MiB of server memory.
pub const REPLICATION_FRAMES_INFLIGHT_MAX: usize = 16;

/// STATE_DUMPs running at once. Each rebuilds a full copy of the state
/// from the snapshot and the log (memory and a core for seconds on a large
/// log); a second request meanwhile gets `busy`.
pub const STATE_DUMPS_CONCURRENT_MAX: usize = 1;

/// Users one sale's queue holds in line. ~45 bytes each (see
/// engine/queue.rs), so 10M is ~450 MiB at most; past it JOIN answers
/// `busy`. Ten million people in line for one drop is already beyond any
/// real sale; the cap keeps a bot flood from exhausting memory.
pub const QUEUE_WAITING_MAX: u64 = 10_000_000;

/// Default per-user RESERVE rate (operations per second, per user id,
/// across all connections) and burst. A person clicking Buy sends a
/// handful; a checkout service retrying with backoff a few dozen; a bot
/// thousands. Above it RESERVE answers `rate_limited` with a retry-after.
pub const USER_RESERVES_PER_S_DEFAULT: u32 = 100;
pub const USER_RESERVES_BURST_DEFAULT: u32 = 200;

/// Token buckets of the per-user rate limiter (a power of two): 4M x 8
/// bytes = 32 MiB, faulted in at start. Users share buckets by hash; see
/// `server/ratelimit.rs` for why two per user keep that fair.
pub const USER_RATE_BUCKETS: usize = 1 << 22;

/// Writes reach the disk in whole sectors at least (the page cache writes
/// back whole 4 KiB pages, disks persist whole 512-byte sectors, and a
/// `kill -9` stops a `write(2)` between pages): bytes of an interrupted
/// write that never reached the disk start at a multiple of this. Recovery
/// calls a last record torn when it is zeros from such a boundary to the
/// end of the file, and damaged (possibly acknowledged) otherwise (WAL.md).
pub const TORN_WRITE_ALIGN_BYTES: usize = 512;

/// The leader's etcd lease, by default (`--lease-ttl-ms`): how long a dead
/// leader keeps its successor waiting, and how long a cut-off leader goes on
/// acknowledging before it fences itself (a quarter less, see
/// cluster/election.rs). 2 s puts a failover under 3 s with room for the
/// standby to notice and promote; etcd handles shorter TTLs badly under load.
pub const LEADER_LEASE_TTL_MS_DEFAULT: u64 = 2_000;

/// How often a standby reads the `leader` key (and a leader renews: a
/// quarter of its TTL, whichever is shorter): a failover waits at most this
/// long after the old lease expired.
pub const CLUSTER_POLL_INTERVAL_MS: u64 = 100;

/// FOLLOW frames a standby has appended but not yet applied. The apply
/// thread lags the log by at most this many frames (a frame body holds at
/// most FRAME_BODY_BYTES_MAX of records); beyond it the standby stops reading
/// the stream, so a slow apply slows the leader rather than growing memory.
pub const STANDBY_APPLY_QUEUE_FRAMES: usize = 64;

/// A node's registration lease (`nodes/<id>` in etcd), renewed every second.
pub const NODE_LEASE_TTL_S: u64 = 5;

/// A synchronous standby that makes no progress for this long while
/// replies wait for it is replaced by a caught-up standby, if there is one;
/// without one, a strict leader answers `sync_standby_unavailable` to new
/// requests from then on (`--sync-timeout-ms`).
pub const SYNC_STANDBY_TIMEOUT_MS_DEFAULT: u64 = 2_000;

/// A replicated log closing (SIGTERM) holds its last groups' replies this
/// long for the synchronous standbys' acknowledgements; replies still
/// waiting then are never sent (clients retry elsewhere with the same id).
pub const WAL_CLOSE_STANDBY_WAIT_MS: u64 = 2_000;

/// Exit status of a node that must rejoin its cluster from the start: a
/// leader that lost its lease, or a standby whose log must be cut or
/// replaced before it can follow. Its supervisor restarts it (the status
/// is EX_TEMPFAIL); it then recovers from its data dir and follows.
pub const EXIT_REJOIN: i32 = 75;
