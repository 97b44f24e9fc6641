//! Recovery and checkpoints: the newest valid snapshot plus a replay of the
//! write-ahead log after it rebuilds the engines exactly.
//!
//! Rules (WAL.md has the full story):
//! - Snapshots are tried newest first; one that fails its checksum is
//!   skipped with a log line, and replay starts from an older one.
//! - The log must be continuous: every record's LSN is the previous plus
//!   one, across segments too. A gap is corruption.
//! - A torn tail (invalid bytes at the very end of the last segment with no
//!   valid record after them) is truncated, logging how many bytes were
//!   dropped: those bytes were never fsynced, so never acknowledged.
//! - Anything else invalid is corruption: recovery refuses, naming the
//!   segment and offset, unless `truncate_corrupt` is set, in which case
//!   the log is cut there and later segments are renamed `*.discarded`,
//!   with a log line saying what was lost.
//! - After replay every invariant is checked over the whole state.
//!
//! A checkpoint runs the same replay over *closed* segments only, writes a
//! new snapshot, and deletes segments that both the snapshot and the
//! downstream consumer have moved past.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Claim, Engine, Event, ReservationDirectory, SaleImage, RESERVE_PREFETCH_AHEAD};
use crate::limits::DIRECTORY_IDS_PRESIZED;
use crate::shard::{pool_index, Engines};
use crate::wal::segment::{list_segments, scan_segment, sync_dir, Scan, ScanEnd, SEGMENT_HEADER_BYTES};
use crate::wal::snapshot::{list_snapshots, read_snapshot, write_snapshot};

/// Name of the file holding the downstream consumer's settled LSN.
pub const CONSUMER_LSN_FILE: &str = "consumer.lsn";

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("i/o error in the data dir: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "write-ahead log corrupt in {segment} at byte offset {offset}: {reason}; refusing to start \
         (--wal-truncate-corrupt cuts the log there, losing every record after it)"
    )]
    Corrupt { segment: PathBuf, offset: u64, reason: String },
    #[error("write-ahead log starts at LSN {first_lsn} but the newest snapshot covers only up to {snapshot_lsn}: records are missing")]
    Gap { snapshot_lsn: u64, first_lsn: u64 },
}

#[derive(Clone, Copy, Debug)]
pub struct RecoverOptions {
    pub pool_shards: usize,
    pub truncate_corrupt: bool,
}

#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub snapshot_lsn: Option<u64>,
    pub records_replayed: u64,
    pub segments_scanned: usize,
    pub torn_bytes_dropped: u64,
    /// What `truncate_corrupt` threw away, for the log.
    pub discarded: Vec<String>,
    pub last_lsn: u64,
    pub elapsed: Duration,
}

pub struct Recovered {
    pub engines: Engines,
    /// The LSN the log writer continues with.
    pub next_lsn: u64,
    pub report: RecoveryReport,
}

/// Which engine holds a SKU.
#[derive(Clone, Copy)]
enum Slot {
    Pool(usize),
    Hot(usize),
}

impl Slot {
    fn engine(self, engines: &Engines) -> &Engine {
        match self {
            Slot::Pool(i) => &engines.pool[i],
            Slot::Hot(i) => &engines.hot[i],
        }
    }

    fn engine_mut(self, engines: &mut Engines) -> &mut Engine {
        match self {
            Slot::Pool(i) => &mut engines.pool[i],
            Slot::Hot(i) => &mut engines.hot[i],
        }
    }
}

/// Routes SKUs to engines exactly as the live router does.
struct Loader {
    engines: Engines,
    /// Looked up once per replayed event: a fast hasher, not SipHash.
    slots: std::collections::HashMap<u64, Slot, foldhash::fast::RandomState>,
    /// Directory claims of replayed reservations, not yet made.
    claims: Vec<(u128, u64)>,
}

impl Loader {
    /// `records_estimate` sizes the id directory up front: resizing a
    /// concurrent table millions of entries large dominates replay time.
    /// `serving`: the engines will serve requests (startup recovery), so
    /// the directory is prefaulted; a state dump or checkpoint skips that.
    fn new(pool_shards: usize, records_estimate: usize, serving: bool) -> Loader {
        let capacity = DIRECTORY_IDS_PRESIZED.max(records_estimate);
        let directory = ReservationDirectory::with_capacity(capacity);
        let directory = Arc::new(if serving { directory.prefaulted() } else { directory });
        let pool_shards = pool_shards.max(1);
        let pool = (0..pool_shards)
            .map(|_| {
                let mut engine = Engine::new(directory.clone());
                // About half of all records create a reservation.
                engine.reserve_capacity(records_estimate / 2 / pool_shards);
                engine
            })
            .collect();
        Loader { engines: Engines { directory, pool, hot: Vec::new() }, slots: Default::default(), claims: Vec::new() }
    }

    fn new_slot(&mut self, sku: u64, hot: bool) -> Slot {
        let slot = if hot {
            self.engines.hot.push(Engine::new(self.engines.directory.clone()));
            Slot::Hot(self.engines.hot.len() - 1)
        } else {
            Slot::Pool(pool_index(sku, self.engines.pool.len()))
        };
        self.slots.insert(sku, slot);
        slot
    }

    fn import(&mut self, image: SaleImage) {
        let slot = self.new_slot(image.sku, image.hot);
        slot.engine_mut(&mut self.engines).import(image);
    }

    fn apply(&mut self, event: &Event) {
        let slot = match *event {
            Event::SaleCreated { sku, hot, .. } => self.new_slot(sku, hot),
            _ => *self.slots.get(&event.sku()).unwrap_or_else(|| panic!("event for unknown sku: {event:?}")),
        };
        slot.engine_mut(&mut self.engines).apply_deferring_claim(event, &mut self.claims);
    }

    /// Start loading what applying `event` will miss on (a hint).
    fn prefetch(&self, event: &Event) {
        if let Some(&slot) = self.slots.get(&event.sku()) {
            slot.engine(&self.engines).prefetch_apply(event);
        }
    }

    fn all_engines(&self) -> impl Iterator<Item = &Engine> {
        self.engines.pool.iter().chain(&self.engines.hot)
    }
}

/// Whether replay may repair the log (startup) or must find it clean
/// (checkpoints read closed segments that recovery already vetted).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Repair { truncate_corrupt: bool },
    ReadOnly,
}

/// Which part of the log to load.
#[derive(Clone, Copy, Default)]
struct Bounds {
    /// Only segments whose first LSN is below this (closed segments).
    below: Option<u64>,
    /// Only records up to this LSN, which must be synced; the segment that
    /// holds it may still be written to (bytes after it are ignored).
    upto: Option<u64>,
}

/// Load the newest valid snapshot, then replay segments within `bounds`.
fn load(dir: &Path, loader: &mut Loader, mode: Mode, bounds: Bounds) -> Result<RecoveryReport, RecoveryError> {
    let Bounds { below, upto } = bounds;
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    let mut snapshot_lsn = 0;
    let snapshots = list_snapshots(dir)?.into_iter().filter(|(lsn, _)| upto.is_none_or(|u| *lsn <= u));
    for (_, path) in snapshots {
        match read_snapshot(&path) {
            Ok((lsn, sales)) => {
                for image in sales {
                    loader.import(image);
                }
                snapshot_lsn = lsn;
                report.snapshot_lsn = Some(lsn);
                break;
            }
            Err(e) => tracing::warn!(error = %e, "skipping invalid snapshot"),
        }
    }
    let segments: Vec<(u64, PathBuf)> = list_segments(dir)?
        .into_iter()
        .filter(|(first, _)| below.is_none_or(|b| *first < b) && upto.is_none_or(|u| *first <= u))
        .collect();
    report.last_lsn = snapshot_lsn;
    // Replay from the last segment that starts at or before the first LSN
    // the snapshot does not cover.
    let Some(start) = segments.iter().rposition(|(first, _)| *first <= snapshot_lsn + 1) else {
        if let Some((first_lsn, _)) = segments.first() {
            return Err(RecoveryError::Gap { snapshot_lsn, first_lsn: *first_lsn });
        }
        report.elapsed = started.elapsed();
        return Ok(report);
    };
    // A reader thread reads, verifies and decodes segments while this
    // thread applies: the two halves of replay overlap on two cores.
    let last_index = segments.len() - 1;
    let segments = &segments;
    let directory = loader.engines.directory.clone();
    std::thread::scope(|scope| -> Result<(), RecoveryError> {
        let (tx, rx) = crossbeam_channel::bounded::<Chunk>(REPLAY_CHUNKS_QUEUED);
        scope.spawn(move || read_segments(segments, start, upto, tx));
        // Claims go to the shared id directory from a third thread: in a
        // valid log an id is reserved once, so order does not matter, and
        // the directory is complete when the scope ends, before serving.
        let (claims_tx, claims_rx) = crossbeam_channel::bounded::<Vec<(u128, u64)>>(REPLAY_CHUNKS_QUEUED);
        let directory = &directory;
        scope.spawn(move || {
            for claims in claims_rx {
                for (id, sku) in claims {
                    let claim = directory.claim(id, sku);
                    assert!(!matches!(claim, Claim::Conflict), "reservation {id:#x} replayed for two skus");
                }
            }
        });
        for chunk in rx {
            let (index, scan) = match chunk {
                Chunk::Events(events) => {
                    // Prefetch a few records ahead, as a shard does for a
                    // run of RESERVEs: a 10M-record log builds tables far
                    // larger than the cache.
                    for (i, (lsn, event)) in events.iter().enumerate() {
                        if let Some((_, ahead)) = events.get(i + RESERVE_PREFETCH_AHEAD) {
                            loader.prefetch(ahead);
                        }
                        if *lsn > snapshot_lsn {
                            loader.apply(event);
                            report.records_replayed += 1;
                        }
                    }
                    if !loader.claims.is_empty() {
                        let claims = std::mem::replace(&mut loader.claims, Vec::with_capacity(REPLAY_CHUNK_RECORDS));
                        let _ = claims_tx.send(claims);
                    }
                    continue;
                }
                Chunk::Done(index, scan) => (index, scan?),
            };
            let path = &segments[index].1;
            report.segments_scanned += 1;
            report.last_lsn = report.last_lsn.max(scan.last_lsn);
            let (offset, reason, torn) = match scan.end {
                ScanEnd::Clean => continue,
                ScanEnd::TornTail { offset, reason, .. } => (offset, reason, true),
                ScanEnd::Corrupt { offset, reason } => (offset, reason, false),
            };
            // The reader stopped after this segment; nothing more will come.
            let Mode::Repair { truncate_corrupt } = mode else {
                return Err(RecoveryError::Corrupt { segment: path.clone(), offset, reason });
            };
            let size = std::fs::metadata(path)?.len();
            if torn && index == last_index {
                tracing::warn!(
                    segment = %path.display(), offset, dropped_bytes = size - offset, %reason,
                    "truncating torn tail of the write-ahead log (never acknowledged)"
                );
                report.torn_bytes_dropped += size - offset;
                cut(path, offset)?;
                break;
            }
            if !truncate_corrupt {
                return Err(RecoveryError::Corrupt { segment: path.clone(), offset, reason });
            }
            let later = &segments[index + 1..];
            let lost = format!(
                "cut {} at offset {offset} ({} bytes) and discarded {} later segment(s): every record after LSN {} is lost",
                path.display(),
                size - offset,
                later.len(),
                scan.last_lsn
            );
            tracing::error!(%reason, "{lost}");
            report.discarded.push(lost);
            if offset < SEGMENT_HEADER_BYTES as u64 {
                // A damaged header: keep the whole segment for forensics.
                discard(path)?;
            } else {
                cut(path, offset)?;
            }
            for (_, later_path) in later {
                discard(later_path)?;
            }
            sync_dir(dir)?;
            break;
        }
        Ok(())
    })?;
    for engine in loader.all_engines() {
        engine.check_invariants();
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Decoded records travel from the reader thread in chunks of this many.
const REPLAY_CHUNK_RECORDS: usize = 4096;
/// Chunks the reader may run ahead of the applier (bounds replay memory).
const REPLAY_CHUNKS_QUEUED: usize = 16;

enum Chunk {
    Events(Vec<(u64, Event)>),
    /// Segment `index` is finished; a non-clean end stops the reader.
    Done(usize, std::io::Result<Scan>),
}

/// The reader half of replay: scan `segments[start..]` in order, checking
/// LSN continuity, until the end, the first segment that is not clean, or
/// the record `upto` (what follows it in that segment is not looked at: it
/// may be a write in progress).
fn read_segments(segments: &[(u64, PathBuf)], start: usize, upto: Option<u64>, tx: crossbeam_channel::Sender<Chunk>) {
    let upto = upto.unwrap_or(u64::MAX);
    let mut buf = Vec::new();
    let mut expect = segments[start].0;
    for (index, (_, path)) in segments.iter().enumerate().skip(start) {
        let mut chunk = Vec::with_capacity(REPLAY_CHUNK_RECORDS);
        let mut receiver_gone = false;
        let scan = scan_segment(path, expect, &mut buf, |lsn, event| {
            if lsn > upto {
                return;
            }
            chunk.push((lsn, event));
            if chunk.len() == REPLAY_CHUNK_RECORDS {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(REPLAY_CHUNK_RECORDS));
                receiver_gone |= tx.send(Chunk::Events(full)).is_err();
            }
        });
        if receiver_gone || (!chunk.is_empty() && tx.send(Chunk::Events(chunk)).is_err()) {
            return;
        }
        let scan = match scan {
            Ok(mut s) if s.last_lsn >= upto => {
                // Everything wanted was valid; the rest is not our business.
                s.last_lsn = upto;
                s.end = ScanEnd::Clean;
                let _ = tx.send(Chunk::Done(index, Ok(s)));
                return;
            }
            other => other,
        };
        let clean = matches!(&scan, Ok(s) if s.end == ScanEnd::Clean);
        if let Ok(s) = &scan {
            expect = s.last_lsn + 1;
        }
        if tx.send(Chunk::Done(index, scan)).is_err() || !clean {
            return;
        }
    }
}

/// About how many records and snapshot entries a recovery of `dir` will
/// load (~50 bytes each): the newest snapshot plus the segments after it
/// (below `below`), not the whole history retention may still keep.
fn records_estimate(dir: &Path, below: Option<u64>) -> std::io::Result<usize> {
    let (snapshot_lsn, mut bytes) = match list_snapshots(dir)?.first() {
        Some((lsn, path)) => (*lsn, std::fs::metadata(path)?.len()),
        None => (0, 0),
    };
    let segments = list_segments(dir)?;
    for (i, (first, path)) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|(n, _)| *n);
        let after_snapshot = next_first.is_none_or(|n| n > snapshot_lsn + 1);
        if after_snapshot && below.is_none_or(|b| *first < b) {
            bytes += std::fs::metadata(path)?.len();
        }
    }
    Ok((bytes / 50) as usize)
}

/// Rename a segment out of the log (`*.discarded`), keeping its bytes.
fn discard(path: &Path) -> std::io::Result<()> {
    let mut discarded = path.to_path_buf().into_os_string();
    discarded.push(".discarded");
    std::fs::rename(path, discarded)
}

/// Truncate a segment at `offset`; one cut inside its header is removed.
fn cut(path: &Path, offset: u64) -> std::io::Result<()> {
    if offset < SEGMENT_HEADER_BYTES as u64 {
        std::fs::remove_file(path)?;
    } else {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(offset)?;
        file.sync_all()?;
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Rebuild the engines from `dir` (startup).
pub fn recover(dir: &Path, options: RecoverOptions) -> Result<Recovered, RecoveryError> {
    let mut loader = Loader::new(options.pool_shards, records_estimate(dir, None)?, true);
    let mode = Mode::Repair { truncate_corrupt: options.truncate_corrupt };
    let report = load(dir, &mut loader, mode, Bounds::default())?;
    // The writer starts a fresh segment at next_lsn; a last segment that
    // holds no record (it starts at next_lsn) is removed to make room.
    let next_lsn = report.last_lsn + 1;
    for (first, path) in list_segments(dir)? {
        if first >= next_lsn {
            std::fs::remove_file(&path)?;
            sync_dir(dir)?;
        }
    }
    // What was replayed is now treated as durable (served, streamed to the
    // reconciler, built on by new records), but a process killed between
    // write(2) and fdatasync left the tail of the last segment in the page
    // cache only. Sync it now, before anything depends on it: otherwise a
    // later power loss could take those records back, after the reconciler
    // settled them and after newer segments were synced behind them.
    // (Closed segments were synced when the writer rotated past them.)
    if let Some((_, last)) = list_segments(dir)?.last() {
        std::fs::File::open(last)?.sync_all()?;
        sync_dir(dir)?;
    }
    Ok(Recovered { engines: loader.engines, next_lsn, report })
}

/// The engine's complete state at `lsn` (every record up to it applied,
/// none after), rebuilt from the newest snapshot at or before `lsn` and the
/// log, by the same code recovery uses, while the server keeps running.
/// `lsn` must be synced. This is what STATE_DUMP serves: because the engine
/// is a deterministic function of its log, this *is* the state the live
/// engine had once it applied record `lsn`.
pub fn state_at(dir: &Path, lsn: u64) -> Result<Vec<SaleImage>, RecoveryError> {
    let mut loader = Loader::new(1, records_estimate(dir, None)?, false);
    let report = load(dir, &mut loader, Mode::ReadOnly, Bounds { below: None, upto: Some(lsn) })?;
    if report.last_lsn != lsn {
        return Err(RecoveryError::Io(std::io::Error::other(format!(
            "the log ends at LSN {} before the requested LSN {lsn}",
            report.last_lsn
        ))));
    }
    let mut images: Vec<SaleImage> = loader.all_engines().flat_map(|e| e.export()).collect();
    images.sort_unstable_by_key(|i| i.sku);
    Ok(images)
}

/// Which segments may be deleted once a snapshot covers them.
/// (`clap::ValueEnum`: parsed from `consumer` / `snapshot`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    /// Keep segments until the downstream consumer (the reconciler) has
    /// settled past them, as recorded in `consumer.lsn`.
    Consumer,
    /// No downstream consumer: delete once a snapshot covers them.
    Snapshot,
}

/// The settled LSN the downstream consumer last reported (0 if none).
pub fn consumer_lsn(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(CONSUMER_LSN_FILE)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// What a checkpoint did.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub snapshot_lsn: Option<u64>,
    pub segments_deleted: usize,
    pub elapsed: Duration,
}

/// Snapshot everything in segments before `active_first_lsn` (all segments
/// if `None`, after the writer has closed), then apply the retention rule.
pub fn checkpoint(
    dir: &Path,
    active_first_lsn: Option<u64>,
    retention: Retention,
) -> Result<Checkpoint, RecoveryError> {
    let started = Instant::now();
    let mut loader = Loader::new(1, records_estimate(dir, active_first_lsn)?, false);
    let report = load(dir, &mut loader, Mode::ReadOnly, Bounds { below: active_first_lsn, upto: None })?;
    let mut result = Checkpoint::default();
    let covered = report.last_lsn;
    if report.records_replayed > 0 {
        let mut images: Vec<SaleImage> = loader.all_engines().flat_map(|e| e.export()).collect();
        images.sort_unstable_by_key(|i| i.sku);
        write_snapshot(dir, covered, &images)?;
        result.snapshot_lsn = Some(covered);
    }
    // Only what the *oldest* kept snapshot covers may go: if the newest one
    // is damaged, recovery falls back to the older one and must still find
    // every segment after it.
    let oldest_kept = list_snapshots(dir)?.last().map_or(0, |(lsn, _)| *lsn);
    let bound = match retention {
        Retention::Snapshot => oldest_kept,
        Retention::Consumer => oldest_kept.min(consumer_lsn(dir)),
    };
    // A closed segment ends just before the next one starts.
    let segments = list_segments(dir)?;
    for pair in segments.windows(2) {
        let ((_, path), (next_first, _)) = (&pair[0], &pair[1]);
        let closed = active_first_lsn.is_none_or(|active| *next_first <= active);
        if closed && next_first - 1 <= bound {
            std::fs::remove_file(path)?;
            result.segments_deleted += 1;
        }
    }
    if result.segments_deleted > 0 {
        sync_dir(dir)?;
    }
    result.elapsed = started.elapsed();
    Ok(result)
}
