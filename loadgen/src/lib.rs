//! stampede-loadgen: Black Friday drills with verified invariants, and the
//! same drills against Redis and PostgreSQL for comparison.
//!
//! # Layout
//!
//! - [`scenario`]: the scenarios (`flash`, `mixed`, `checkout`, `queue`,
//!   `shifting`, `regional`): which sales exist and what virtual user k
//!   does (derived from k, so a million users cost nothing until they act).
//! - [`target`]: stampede (client library), Redis (one Lua script via
//!   EVALSHA, pipelined) and PostgreSQL (a conditional UPDATE on the SKU
//!   row plus a per-user row, in a transaction), one outcome vocabulary.
//! - [`drill`]: workers (connections x depth), closed or open loop (with
//!   coordinated-omission-corrected latency and a spike profile),
//!   hdrhistogram per operation; every answer goes to the tally.
//! - [`audit`]: the tally, and the invariants checked reservation by
//!   reservation against the target's state at the end.
//! - [`report`]: the summary (JSON), the table, the HTML report.
//! - [`local`]: a stampede server started in-process for drills with no
//!   `--target`, and `redis-server` processes started for `compare`.
//! - [`cluster`]: `drill --cluster N`: etcd and N stampede nodes as child
//!   processes, the leader killed on schedule, and what clients saw of it.

pub mod audit;
pub mod cluster;
pub mod drill;
pub mod local;
pub mod report;
pub mod scenario;
pub mod target;
