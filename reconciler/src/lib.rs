//! stampede-reconciler: makes PostgreSQL, the system of record, agree with
//! the stampede engine exactly, and reports when anything disagrees.
//!
//! # Layout
//!
//! - [`settle`]: `run`: follow the server's log (REPLICATE) from the
//!   database's watermark and settle it, one transaction per group of
//!   records, watermark included (exactly once); report the new watermark
//!   back (SETTLED) so the server may delete old log segments.
//! - [`model`]: the rows (sales, reservations) as plain data and
//!   [`model::Model::apply`], the one definition of what a log record does
//!   to them (used by settlement and by the report). It lives in the
//!   protocol crate (`stampede_protocol::ledger`), shared with the
//!   deterministic simulator, which checks it against the engine.
//! - [`db`]: PostgreSQL: connection, the embedded sqlx migrations and the
//!   version check, row loading, and the multi-row (`UNNEST`) writes.
//! - [`report`]: compare the engine (STATE_DUMP) with PostgreSQL at the
//!   same LSN; invariants; lag.
//!
//! The schema is in `migrations/`; the wire operations are in the
//! protocol crate's `replication` module and PROTOCOL.md.

pub mod db;
pub use stampede_protocol::ledger as model;
pub mod report;
pub mod settle;
