//! stampede: a flash-sale inventory server that never sells a unit twice.
//!
//! # Layout
//!
//! - [`limits`]: every limit of the server (and the wire limits), with reasons.
//! - [`clock`]: the time source; the engine is handed `now_ms`, never reads it.
//! - [`engine`]: the deterministic state machine of a set of SKUs: decide a
//!   command, emit an [`engine::Event`], apply it; invariants asserted on
//!   every apply. [`engine::directory`] maps reservation ids to SKUs.
//! - [`shard`]: shard threads (one engine each, bounded queue, expiry tick)
//!   and the [`shard::Router`] that maps a SKU to its shard and gauge.
//! - [`placement`]: the demand monitor that moves a sale outgrowing its
//!   pool shard to a shard of its own, and back when it cools.
//! - [`sink`]: where a shard hands its events; replies are released by the
//!   sink once the events are logged.
//! - [`server`]: TCP accept loop, auth, and per-connection reader/writer;
//!   [`server::log`] serves the log to the reconciler (REPLICATE, SETTLED,
//!   STATE_DUMP).
//! - [`wal`]: the write-ahead log (records, segments, group commit,
//!   snapshots, a cursor that follows the log); [`recovery`] rebuilds the
//!   engines from it and takes checkpoints.
//! - [`node`]: all of the above started and stopped in order (what
//!   `stampede-server` runs).
//! - [`storage`]: the file-system seam every log, snapshot and recovery
//!   file operation goes through; [`sim`]: the deterministic simulator that
//!   runs the node on a simulated disk and clock (`src/sim/SIMULATION.md`).
//! - [`memory`]: process-wide memory policy (no transparent huge pages).
//!
//! # One reservation, end to end
//!
//! 1. `server::conn` decodes a RESERVE frame, checks the connection's role.
//! 2. It looks the SKU up in the router (lock-free). If the SKU's published
//!    gauge says no unit is available, it answers `sold_out` right there.
//! 3. Otherwise it stages the request for the SKU's shard; the requests one
//!    socket read brought in go to each shard as one message (`try_send`;
//!    full: `busy`).
//! 4. The shard thread drains a batch of messages, runs due expiries,
//!    decides each request in its [`engine::Engine`] (idempotency, pause,
//!    stock, per-user limit, id claim), applying one event per change.
//! 5. The shard submits the cycle's events and replies to its
//!    [`sink::LogSink`], which delivers the replies once the events are logged.
//! 6. The connection's writer task encodes the reply and writes it.

pub mod clock;
pub mod cluster;
pub mod engine;
pub mod limits;
pub mod memory;
pub mod node;
pub mod placement;
pub mod recovery;
pub mod server;
pub mod shard;
pub mod sim;
pub mod sink;
pub mod storage;
pub mod wal;
