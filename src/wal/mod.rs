//! The write-ahead log: every event reaches disk before its reply leaves.
//!
//! - [`record`]: record framing (LSN, length, CRC-32C) and event encoding.
//! - [`segment`]: segment files, and scanning that tells a torn tail (safe
//!   to truncate) from corruption (refuse to start).
//! - [`writer`]: the group-commit writer thread and the shards' [`writer::WalSink`].
//! - [`snapshot`]: atomic snapshot files of the whole engine state.
//! - [`follow`]: a cursor that reads records while the log is written
//!   (the replication stream).
//!
//! WAL.md in this directory documents the on-disk format byte by byte, the
//! durability modes and their loss windows, and the recovery rules.

pub mod follow;
pub mod record;
pub mod segment;
pub mod snapshot;
pub mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::limits::{
    WAL_ASYNC_SYNC_INTERVAL_MS_DEFAULT, WAL_FLUSH_BYTES_DEFAULT, WAL_FLUSH_INTERVAL_US_DEFAULT, WAL_SEGMENT_BYTES_MAX,
};

/// When a reply may leave relative to its record reaching the disk.
/// (`clap::ValueEnum`: parsed from `fsync` / `async` on command lines.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Reply after `fdatasync` of the group. Loss window: none.
    Fsync,
    /// Reply after `write(2)`; fsync every `async_sync_interval`. Loss
    /// window on power loss or kernel crash: up to that interval. A killed
    /// process (kill -9) loses nothing: the data is in the page cache.
    Async,
}

#[derive(Clone, Debug)]
pub struct WalConfig {
    pub dir: PathBuf,
    pub durability: Durability,
    /// Group-commit size bound.
    pub flush_bytes: usize,
    /// Group-commit time bound.
    pub flush_interval: Duration,
    /// fsync cadence in async mode.
    pub async_sync_interval: Duration,
    pub segment_bytes_max: u64,
    /// A cluster node's log: replies are released on a thread of their
    /// own, as the synchronous standbys acknowledge (see writer.rs).
    pub replicated: bool,
    /// Zero-fill the next segment ahead of time on a helper thread (see
    /// segment.rs): `fdatasync` then writes data only, no file size.
    pub preallocate: bool,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalConfig {
            dir: dir.into(),
            durability: Durability::Fsync,
            flush_bytes: WAL_FLUSH_BYTES_DEFAULT,
            flush_interval: Duration::from_micros(WAL_FLUSH_INTERVAL_US_DEFAULT),
            async_sync_interval: Duration::from_millis(WAL_ASYNC_SYNC_INTERVAL_MS_DEFAULT),
            segment_bytes_max: WAL_SEGMENT_BYTES_MAX,
            replicated: false,
            preallocate: true,
        }
    }
}

/// Files in `dir` named `<prefix><lsn><suffix>`, as `(lsn, path)`, sorted
/// by LSN (segments and snapshots are both named this way).
pub(crate) fn list_by_lsn(dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for name in crate::storage::list(dir)? {
        if let Some(lsn) = name.strip_prefix(prefix).and_then(|n| n.strip_suffix(suffix)) {
            if let Ok(lsn) = lsn.parse::<u64>() {
                found.push((lsn, dir.join(&name)));
            }
        }
    }
    found.sort_unstable_by_key(|(lsn, _)| *lsn);
    Ok(found)
}
