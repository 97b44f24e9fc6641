//! Recovery and checkpoints: the newest valid snapshot plus a replay of the
//! write-ahead log after it rebuilds the engines exactly.
//!
//! Rules (WAL.md has the full story):
//! - Snapshots are tried newest first. One that fails its checksum, whose
//!   contents contradict themselves, or whose replay breaks an invariant is
//!   passed over (with a log line) for the next older one, and finally for
//!   the log alone; at startup the ones passed over are renamed
//!   `*.discarded` once another way worked. Recovery refuses, naming every
//!   file it tried, only when nothing covers the state.
//! - The log must be continuous: every record's LSN is the previous plus
//!   one, across segments too. A gap is corruption.
//! - A torn tail (bytes at the very end of the last segment that an
//!   interrupted write leaves: cut short, or zeros from a sector boundary,
//!   with no valid record after them) is truncated, logging how many bytes
//!   were dropped: they were never fsynced, so never acknowledged.
//! - Anything else invalid is corruption, including a complete last record
//!   that fails its checksum (it may have been acknowledged): recovery
//!   refuses, naming the segment and offset, unless `truncate_corrupt` is
//!   set, in which case the log is cut there, the cut bytes and later
//!   segments are kept as `*.discarded` files (never overwritten), and a log
//!   line names the last LSN kept and the records lost.
//! - After replay every invariant is checked over the whole state. No
//!   assertion on recovered data crashes the process: a broken invariant
//!   while importing or replaying is caught, turned into a fallback or a
//!   refusal that names the LSN, and nothing on disk is changed by a refusal.
//!
//! A checkpoint runs the same replay over *closed* segments only, writes a
//! new snapshot, and deletes segments that both the snapshot and the
//! downstream consumer have moved past.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Claim, Engine, Event, ReservationDirectory, SaleImage, RESERVE_PREFETCH_AHEAD};
use crate::limits::DIRECTORY_IDS_PRESIZED;
use crate::shard::{pool_index, Engines};
use crate::storage;
use crate::wal::segment::{list_segments, scan_segment, sync_dir, Scan, ScanEnd, SEGMENT_HEADER_BYTES};
use crate::wal::snapshot::{list_snapshots, read_snapshot_each, write_snapshot};

/// Name of the file holding the downstream consumer's settled LSN.
pub const CONSUMER_LSN_FILE: &str = "consumer.lsn";

/// Where the runbook for a refusal to start lives.
const RUNBOOK: &str = "see ops/OPERATIONS.md, 'The server refuses to start'";

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("i/o error in the data dir: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "write-ahead log corrupt in {segment} at byte offset {offset}: {reason}; refusing to start \
         (--wal-truncate-corrupt cuts the log there, losing every record after it; {RUNBOOK})"
    )]
    Corrupt { segment: PathBuf, offset: u64, reason: String },
    #[error(
        "the write-ahead log starts at LSN {first_lsn} ({segment}) but {covered}: records {}..={} are missing; \
         refusing to start ({RUNBOOK})", covered_lsn + 1, first_lsn - 1
    )]
    Gap { covered_lsn: u64, first_lsn: u64, segment: PathBuf, covered: String },
    #[error(
        "the data dir holds no consistent state: {reason}; refusing to start, nothing was changed on disk ({RUNBOOK})"
    )]
    Inconsistent { reason: String },
}

#[derive(Clone, Copy, Debug)]
pub struct RecoverOptions {
    pub pool_shards: usize,
    pub truncate_corrupt: bool,
    /// Reservation ids the directory is sized (and faulted in) for before
    /// serving: `DIRECTORY_IDS_PRESIZED` for a server ([`Self::new`]); the
    /// simulator, which restarts a small node thousands of times, less.
    pub presized_ids: usize,
}

impl RecoverOptions {
    pub fn new(pool_shards: usize, truncate_corrupt: bool) -> RecoverOptions {
        RecoverOptions { pool_shards, truncate_corrupt, presized_ids: DIRECTORY_IDS_PRESIZED }
    }
}

#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub snapshot_lsn: Option<u64>,
    pub records_replayed: u64,
    pub segments_scanned: usize,
    pub torn_bytes_dropped: u64,
    /// What `truncate_corrupt` threw away, for the log.
    pub discarded: Vec<String>,
    /// Snapshots passed over, each with the reason (newest first).
    pub snapshots_rejected: Vec<String>,
    /// Leftover files removed at start (`*.tmp` of interrupted writes).
    pub leftovers_removed: Vec<String>,
    /// The last LSN of the recovered state (0: empty).
    pub last_lsn: u64,
    /// `(term, lsn)` of every TERM_STARTED record replayed (the log's part
    /// of the cluster's term history).
    pub terms: Vec<(u64, u64)>,
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
    /// Reservations the log is expected to hold and no sale has room for
    /// yet: a sale created in replay takes room for up to its stock.
    reservations_estimate: usize,
    /// Looked up once per replayed event: a fast hasher, not SipHash.
    slots: std::collections::HashMap<u64, Slot, foldhash::fast::RandomState>,
    /// Directory claims of replayed reservations, not yet made.
    claims: Vec<(u128, u64)>,
    /// `(term, lsn)` of every TERM_STARTED replayed.
    terms: Vec<(u64, u64)>,
}

/// How to build an empty [`Loader`]: recovery may need several (one per
/// way of rebuilding the state it tries).
#[derive(Clone, Copy)]
struct LoaderSpec {
    pool_shards: usize,
    reservations_estimate: usize,
    /// The engines will serve requests (startup recovery), so the id
    /// directory is presized for this many ids and prefaulted; a state
    /// dump or checkpoint (`None`) sizes it for what it loads only.
    serving: Option<usize>,
}

impl Loader {
    /// `reservations_estimate` sizes the id directory and the engines'
    /// tables up front: resizing tables millions of entries large
    /// dominates recovery time.
    fn new(spec: LoaderSpec) -> Loader {
        let LoaderSpec { pool_shards, reservations_estimate, serving } = spec;
        let capacity = serving.unwrap_or(0).max(reservations_estimate);
        let directory = ReservationDirectory::with_capacity(capacity);
        let directory = Arc::new(if serving.is_some() { directory.prefaulted() } else { directory });
        let pool_shards = pool_shards.max(1);
        let pool = (0..pool_shards).map(|_| Engine::new(directory.clone())).collect();
        Loader {
            engines: Engines { directory, pool, hot: Vec::new() },
            reservations_estimate,
            slots: Default::default(),
            claims: Vec::new(),
            terms: Vec::new(),
        }
    }

    fn new_slot(&mut self, sku: u64, hot: bool) -> Slot {
        let slot = if hot {
            self.engines.hot.push(Engine::new(self.engines.directory.clone()));
            Slot::Hot(self.engines.hot.len() - 1)
        } else {
            Slot::Pool(pool_index(sku, self.engines.pool.len()))
        };
        let previous = self.slots.insert(sku, slot);
        assert!(previous.is_none(), "sku {sku} created twice");
        slot
    }

    /// Import a sale image; its directory claims go to `self.claims`.
    fn import(&mut self, image: SaleImage) -> Result<(), String> {
        if self.slots.contains_key(&image.sku) {
            return Err(format!("sku {} appears twice", image.sku));
        }
        let slot = self.new_slot(image.sku, image.hot);
        let Loader { engines, claims, .. } = self;
        slot.engine_mut(engines).import_deferring_claims(image, claims)
    }

    /// Hand the claims gathered so far to the claiming thread.
    fn send_claims(&mut self, tx: &crossbeam_channel::Sender<Vec<(u128, u64)>>) {
        if !self.claims.is_empty() {
            let claims = std::mem::replace(&mut self.claims, Vec::with_capacity(REPLAY_CHUNK_RECORDS));
            let _ = tx.send(claims);
        }
    }

    fn apply(&mut self, lsn: u64, event: &Event) {
        let slot = match *event {
            Event::SaleCreated { sku, hot, stock, .. } => return self.created(sku, hot, stock, event),
            Event::SaleCreatedAt { sku, hot, ref locations, .. } => {
                return self.created(sku, hot, locations.stock(), event);
            }
            Event::TermStarted { term, .. } => {
                self.terms.push((term, lsn));
                return;
            }
            Event::SaleMoved { sku, dedicated, .. } => return self.apply_moved(sku, dedicated, event),
            _ => {
                let sku = event.sku().expect("every other event has a sku");
                *self.slots.get(&sku).unwrap_or_else(|| panic!("event for unknown sku: {event:?}"))
            }
        };
        slot.engine_mut(&mut self.engines).apply_deferring_claim(event, &mut self.claims);
    }

    /// A new sale: placed, applied, and presized from the estimate.
    fn created(&mut self, sku: u64, hot: bool, stock: u64, event: &Event) {
        let slot = self.new_slot(sku, hot);
        let engine = slot.engine_mut(&mut self.engines);
        engine.apply(event);
        // The estimate is shared out as sales are created, so many sales
        // never presize for more than the log holds.
        let presize = usize::try_from(stock).unwrap_or(usize::MAX).min(self.reservations_estimate);
        self.reservations_estimate -= presize;
        engine.reserve_capacity(sku, presize);
    }

    /// SALE_MOVED: the sale's new placement, then its state handed to the
    /// engine the live router would have moved it to (a shard of its own,
    /// or its pool shard). An emptied hot engine stays empty; the router
    /// starts no shard for it.
    fn apply_moved(&mut self, sku: u64, dedicated: bool, event: &Event) {
        let from = *self.slots.get(&sku).unwrap_or_else(|| panic!("event for unknown sku: {event:?}"));
        let engine = from.engine_mut(&mut self.engines);
        engine.apply(event);
        if matches!(from, Slot::Hot(_)) == dedicated {
            // A change of pin only.
            return;
        }
        let moving = engine.take_sale(sku).expect("the slot's engine holds the sale");
        let to = if dedicated {
            self.engines.hot.push(Engine::new(self.engines.directory.clone()));
            Slot::Hot(self.engines.hot.len() - 1)
        } else {
            Slot::Pool(pool_index(sku, self.engines.pool.len()))
        };
        to.engine_mut(&mut self.engines).put_sale(moving);
        self.slots.insert(sku, to);
    }

    /// Start loading what applying `event` will miss on (a hint).
    fn prefetch(&self, event: &Event) {
        if let Some(&slot) = event.sku().and_then(|sku| self.slots.get(&sku)) {
            slot.engine(&self.engines).prefetch_apply(event);
        }
    }

    fn all_engines(&self) -> impl Iterator<Item = &Engine> {
        self.engines.pool.iter().chain(&self.engines.hot)
    }
}

/// A hot standby's engines: recovered state, with the leader's records
/// applied as they arrive, by the code replay uses.
pub struct Replica {
    loader: Loader,
    last_lsn: u64,
}

impl Replica {
    /// Continue from engines `recover` returned, whose last record is `last_lsn`.
    pub fn new(engines: Engines, last_lsn: u64) -> Replica {
        let mut slots: std::collections::HashMap<u64, Slot, foldhash::fast::RandomState> = Default::default();
        for (i, engine) in engines.pool.iter().enumerate() {
            slots.extend(engine.skus().map(|sku| (sku, Slot::Pool(i))));
        }
        for (i, engine) in engines.hot.iter().enumerate() {
            slots.extend(engine.skus().map(|sku| (sku, Slot::Hot(i))));
        }
        Replica {
            loader: Loader { engines, reservations_estimate: 0, slots, claims: Vec::new(), terms: Vec::new() },
            last_lsn,
        }
    }

    /// Apply consecutive records, the first being the next one, as replay
    /// does (prefetching a few ahead; the id claims after the run). A
    /// record that breaks an invariant is a bug or a divergent log: the
    /// error says which.
    pub fn apply(&mut self, records: &[(u64, Event)]) -> Result<(), String> {
        let Some((first, _)) = records.first() else { return Ok(()) };
        if *first != self.last_lsn + 1 {
            return Err(format!("record {first} after {}", self.last_lsn));
        }
        let loader = &mut self.loader;
        let applying = Cell::new(*first);
        catching(|| {
            for (i, (lsn, event)) in records.iter().enumerate() {
                if let Some((_, ahead)) = records.get(i + RESERVE_PREFETCH_AHEAD) {
                    loader.prefetch(ahead);
                }
                applying.set(*lsn);
                loader.apply(*lsn, event);
            }
            let directory = &loader.engines.directory;
            for (i, &(id, sku)) in loader.claims.iter().enumerate() {
                if let Some(&(ahead, _)) = loader.claims.get(i + RESERVE_PREFETCH_AHEAD) {
                    directory.prefetch(ahead);
                }
                let claim = directory.claim(id, sku);
                assert!(!matches!(claim, Claim::Conflict), "reservation {id:#x} belongs to two skus");
            }
            loader.claims.clear();
        })
        .map_err(|message| format!("applying the record at LSN {}: {message}", applying.get()))?;
        self.last_lsn = records.last().map_or(self.last_lsn, |(lsn, _)| *lsn);
        Ok(())
    }

    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }

    /// The engines as replayed so far.
    pub fn engines(&self) -> &Engines {
        &self.loader.engines
    }

    /// The engines, to serve from (a promotion).
    pub fn into_engines(self) -> Engines {
        self.loader.engines
    }
}

thread_local! {
    /// Set while this thread imports or replays recovered data.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Whether a panic on this thread will be caught by recovery and turned
/// into a fallback or a refusal (the server's panic hook, which otherwise
/// exits the process, lets these through).
pub fn panic_is_caught() -> bool {
    CATCHING.with(Cell::get)
}

/// Marks this thread's panics as caught by recovery while it lives.
struct CatchGuard;

impl CatchGuard {
    fn enter() -> CatchGuard {
        CATCHING.with(|c| c.set(true));
        CatchGuard
    }
}

impl Drop for CatchGuard {
    fn drop(&mut self) {
        CATCHING.with(|c| c.set(false));
    }
}

/// Run `load` while another thread makes the id-directory claims it
/// sends: an id is claimed once in a valid state, so order does not
/// matter, and the directory is complete when this returns. A claim that
/// conflicts (one id for two SKUs) panics, which the caller catches.
fn with_claims_thread<T>(
    directory: &ReservationDirectory,
    load: impl FnOnce(crossbeam_channel::Sender<Vec<(u128, u64)>>) -> T,
) -> T {
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<(u128, u64)>>(REPLAY_CHUNKS_QUEUED);
        scope.spawn(move || {
            let _guard = CatchGuard::enter();
            for claims in rx {
                for (id, sku) in claims {
                    let claim = directory.claim(id, sku);
                    assert!(!matches!(claim, Claim::Conflict), "reservation {id:#x} belongs to two skus");
                }
            }
        });
        load(tx)
    })
}

/// Run `f`, turning a panic (a broken engine invariant) into an error with
/// the panic's message.
fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let _guard = CatchGuard::enter();
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
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

/// Why one way of rebuilding the state (a snapshot and the log after it,
/// or the log alone) did not work.
enum Failure {
    /// The log itself is damaged or incomplete: an older snapshot cannot
    /// help (it needs the same records and more).
    Log(RecoveryError),
    /// The state broke an invariant: the snapshot may be to blame.
    Inconsistent(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Log(RecoveryError::Io(e))
    }
}

/// Rebuild the state: the newest snapshot that works and the log after it
/// (within `bounds`), falling back to older snapshots and to the log alone.
fn load(dir: &Path, spec: LoaderSpec, mode: Mode, bounds: Bounds) -> Result<(Loader, RecoveryReport), RecoveryError> {
    let started = Instant::now();
    let snapshots: Vec<(u64, PathBuf)> =
        list_snapshots(dir)?.into_iter().filter(|(lsn, _)| bounds.upto.is_none_or(|u| *lsn <= u)).collect();
    let segments: Vec<(u64, PathBuf)> = list_segments(dir)?
        .into_iter()
        .filter(|(first, _)| bounds.below.is_none_or(|b| *first < b) && bounds.upto.is_none_or(|u| *first <= u))
        .collect();
    // Snapshots passed over, with the reason.
    let mut rejected: Vec<(PathBuf, String)> = Vec::new();
    let candidates = snapshots.iter().map(Some).chain(std::iter::once(None));
    for candidate in candidates {
        let mut loader = Loader::new(spec);
        let mut report = RecoveryReport::default();
        let mut snapshot_lsn = 0;
        if let Some((_, path)) = candidate {
            match import_snapshot(path, &mut loader) {
                Ok(lsn) => {
                    snapshot_lsn = lsn;
                    report.snapshot_lsn = Some(lsn);
                }
                Err(reason) => {
                    tracing::warn!(snapshot = %path.display(), %reason, "passing over a snapshot");
                    rejected.push((path.clone(), reason));
                    continue;
                }
            }
        }
        let covered = || match candidate {
            Some((_, path)) => format!("the snapshot {} covers only up to LSN {snapshot_lsn}", path.display()),
            None if rejected.is_empty() && snapshots.is_empty() => "there is no snapshot".to_string(),
            None => format!("no snapshot could be used ({})", describe(&rejected)),
        };
        match replay(dir, &segments, &mut loader, &mut report, snapshot_lsn, mode, bounds.upto, &covered) {
            Ok(()) => {
                if let Mode::Repair { .. } = mode {
                    for (path, reason) in &rejected {
                        let kept = discard(path)?;
                        tracing::warn!(snapshot = %path.display(), kept = %kept.display(), %reason,
                            "a snapshot that could not be used was renamed out of the way");
                    }
                }
                report.snapshots_rejected = rejected.iter().map(|(path, reason)| named(path, reason)).collect();
                report.terms = std::mem::take(&mut loader.terms);
                report.elapsed = started.elapsed();
                return Ok((loader, report));
            }
            Err(Failure::Log(e)) => return Err(e),
            Err(Failure::Inconsistent(reason)) => match candidate {
                Some((_, path)) => {
                    let reason = format!("the log replayed after it broke an invariant: {reason}");
                    tracing::warn!(snapshot = %path.display(), %reason, "passing over a snapshot");
                    rejected.push((path.clone(), reason));
                }
                None => {
                    let mut reason = format!("replaying the log from its start: {reason}");
                    if !rejected.is_empty() {
                        reason.push_str(&format!("; snapshots tried first: {}", describe(&rejected)));
                    }
                    return Err(RecoveryError::Inconsistent { reason });
                }
            },
        }
    }
    unreachable!("the last candidate (the log alone) returns")
}

fn named(path: &Path, reason: &str) -> String {
    format!("{}: {reason}", path.display())
}

fn describe(rejected: &[(PathBuf, String)]) -> String {
    rejected.iter().map(|(path, reason)| named(path, reason)).collect::<Vec<_>>().join("; ")
}

/// Read, verify and import one snapshot; its LSN.
/// Images are decoded on one thread while this one imports them and a
/// third makes the id-directory claims. (Every invariant is checked once
/// more after the replay that follows.)
fn import_snapshot(path: &Path, loader: &mut Loader) -> Result<u64, String> {
    let directory = loader.engines.directory.clone();
    let imported = catching(|| {
        with_claims_thread(&directory, |claims| {
            std::thread::scope(|scope| {
                let (tx, rx) = crossbeam_channel::bounded::<SaleImage>(SNAPSHOT_IMAGES_QUEUED);
                let reader = scope.spawn(move || {
                    let _guard = CatchGuard::enter();
                    // A send fails only when the importer stopped on an error.
                    read_snapshot_each(path, |image| tx.send(image).map_err(|_| String::new()))
                });
                let mut result = Ok(());
                for image in rx {
                    result = loader.import(image);
                    if result.is_err() {
                        break;
                    }
                    loader.send_claims(&claims);
                }
                let read = reader.join().unwrap_or_else(|_| Err("the snapshot reader panicked".into()));
                result.and(read)
            })
        })
    });
    imported.and_then(|read| read)
}

/// Sale images the snapshot reader may decode ahead of the importer.
const SNAPSHOT_IMAGES_QUEUED: usize = 16;

/// Replay `segments` after `snapshot_lsn` into `loader` (up to `upto`),
/// repairing the log as `mode` allows. `covered` says what the state
/// covers before the log, for a gap's message.
#[allow(clippy::too_many_arguments)]
fn replay(
    dir: &Path,
    segments: &[(u64, PathBuf)],
    loader: &mut Loader,
    report: &mut RecoveryReport,
    snapshot_lsn: u64,
    mode: Mode,
    upto: Option<u64>,
    covered: &dyn Fn() -> String,
) -> Result<(), Failure> {
    report.last_lsn = snapshot_lsn;
    // Replay from the last segment that starts at or before the first LSN
    // the snapshot does not cover.
    let Some(start) = segments.iter().rposition(|(first, _)| *first <= snapshot_lsn + 1) else {
        let Some((first_lsn, segment)) = segments.first() else {
            return Ok(());
        };
        // Every segment starts after what the state covers.
        let gap = RecoveryError::Gap {
            covered_lsn: snapshot_lsn,
            first_lsn: *first_lsn,
            segment: segment.clone(),
            covered: covered(),
        };
        return match mode {
            Mode::Repair { truncate_corrupt: true } if snapshot_lsn > 0 => {
                // The escape hatch: continue from the snapshot, keeping the
                // unreachable segments aside.
                discard_after(dir, segments, 0, None, snapshot_lsn, &gap.to_string(), report)?;
                Ok(())
            }
            _ => Err(Failure::Log(gap)),
        };
    };
    // A reader thread reads, verifies and decodes segments while this
    // thread applies: the two halves of replay overlap on two cores.
    let last_index = segments.len() - 1;
    let directory = loader.engines.directory.clone();
    // The LSN being applied, for the message if it breaks an invariant.
    let applying = Cell::new(0u64);
    let outcome = catching(|| {
        // Claims go to the shared id directory from a third thread.
        with_claims_thread(&directory, |claims_tx| {
            std::thread::scope(|scope| -> Result<(), Failure> {
                let (tx, rx) = crossbeam_channel::bounded::<Chunk>(REPLAY_CHUNKS_QUEUED);
                scope.spawn(move || {
                    let _guard = CatchGuard::enter();
                    read_segments(segments, start, snapshot_lsn + 1, upto, tx)
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
                                    applying.set(*lsn);
                                    loader.apply(*lsn, event);
                                    report.records_replayed += 1;
                                    report.last_lsn = *lsn;
                                }
                            }
                            loader.send_claims(&claims_tx);
                            continue;
                        }
                        Chunk::Done(index, scan) => (index, scan?),
                    };
                    let path = &segments[index].1;
                    report.segments_scanned += 1;
                    let (offset, reason, torn, torn_bytes) = match scan.end {
                        ScanEnd::Clean => continue,
                        ScanEnd::TornTail { offset, reason, dropped_bytes } => (offset, reason, true, dropped_bytes),
                        ScanEnd::Corrupt { offset, reason } => (offset, reason, false, 0),
                    };
                    // The reader stopped after this segment; nothing more will come.
                    let corrupt = || RecoveryError::Corrupt { segment: path.clone(), offset, reason: reason.clone() };
                    let Mode::Repair { truncate_corrupt } = mode else {
                        return Err(Failure::Log(corrupt()));
                    };
                    if torn && index == last_index {
                        // (Not counting the zeros of a preallocated segment.)
                        tracing::warn!(
                            segment = %path.display(), offset, dropped_bytes = torn_bytes, %reason,
                            "truncating the torn tail of the write-ahead log (an interrupted write: never acknowledged)"
                        );
                        report.torn_bytes_dropped += torn_bytes;
                        cut(path, offset, false)?;
                        break;
                    }
                    if !truncate_corrupt {
                        return Err(Failure::Log(corrupt()));
                    }
                    let kept = report.last_lsn;
                    let why = format!("{} at byte offset {offset}: {reason}", path.display());
                    discard_after(dir, segments, index, Some(offset), kept, &why, report)?;
                    break;
                }
                Ok(())
            })
        })
    });
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => return Err(failure),
        Err(message) => {
            let at = applying.get();
            let lsn = if at > 0 { format!("applying the record at LSN {at}") } else { "loading".to_string() };
            return Err(Failure::Inconsistent(format!("{lsn}: {message}")));
        }
    }
    catching(|| {
        for engine in loader.all_engines() {
            engine.check_invariants();
        }
    })
    .map_err(|message| Failure::Inconsistent(format!("after replaying up to LSN {}: {message}", report.last_lsn)))
}

/// The escape hatch (`--wal-truncate-corrupt`): cut segment `index` at
/// `offset` (`None`: keep none of it) and take every later segment out of
/// the log, keeping all of it in `*.discarded` files; the state continues
/// after `kept_lsn`. Logs and reports what was lost.
fn discard_after(
    dir: &Path,
    segments: &[(u64, PathBuf)],
    index: usize,
    offset: Option<u64>,
    kept_lsn: u64,
    why: &str,
    report: &mut RecoveryReport,
) -> std::io::Result<()> {
    // The highest LSN the discarded bytes held, for the message: scan what
    // is discarded as far as it reads (best effort; it is damaged).
    let mut lost_upto = kept_lsn;
    if let (Some(offset), Ok(bytes)) = (offset, storage::read(&segments[index].1)) {
        // The damaged record itself, if a whole one's worth of bytes is cut.
        if bytes.len() >= offset as usize + crate::wal::record::RECORD_HEADER_BYTES {
            lost_upto = kept_lsn + 1;
        }
        lost_upto = lost_upto.max(last_readable_lsn(&bytes, offset as usize + 1, kept_lsn));
    }
    let mut buf = Vec::new();
    for (first, path) in &segments[index + 1..] {
        if let Ok(scan) = scan_segment(path, *first, u64::MAX, &mut buf, |_, _| {}) {
            lost_upto = lost_upto.max(scan.last_lsn);
        }
        lost_upto = lost_upto.max(first.saturating_sub(1));
    }
    let mut kept_files = Vec::new();
    let (path, later) = (&segments[index].1, &segments[index + 1..]);
    match offset {
        Some(offset) if offset >= SEGMENT_HEADER_BYTES as u64 => kept_files.push(cut(path, offset, true)?),
        _ => kept_files.push(discard(path)?),
    }
    for (_, later_path) in later {
        kept_files.push(discard(later_path)?);
    }
    sync_dir(dir)?;
    let lost = if lost_upto > kept_lsn {
        format!("records {}..={lost_upto} (at least) are lost", kept_lsn + 1)
    } else {
        "no whole record was lost".to_string()
    };
    let kept_files: Vec<String> = kept_files.iter().map(|p| p.display().to_string()).collect();
    let message = format!(
        "--wal-truncate-corrupt: the log now ends at LSN {kept_lsn} and the server continues from there; {lost}; \
         the cut bytes are kept in {}",
        kept_files.join(", ")
    );
    tracing::error!(cause = %why, "{message}");
    report.discarded.push(message);
    Ok(())
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
/// may be a write in progress). Records before `decode_from` (covered by
/// the snapshot) are checked but not decoded or sent.
fn read_segments(
    segments: &[(u64, PathBuf)],
    start: usize,
    decode_from: u64,
    upto: Option<u64>,
    tx: crossbeam_channel::Sender<Chunk>,
) {
    let upto = upto.unwrap_or(u64::MAX);
    let mut buf = Vec::new();
    let mut expect = segments[start].0;
    for (index, (_, path)) in segments.iter().enumerate().skip(start) {
        let mut chunk = Vec::with_capacity(REPLAY_CHUNK_RECORDS);
        let mut receiver_gone = false;
        let scan = scan_segment(path, expect, decode_from, &mut buf, |lsn, event| {
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

/// About how many reservations a recovery of `dir` will load: the newest
/// snapshot's (each ~54 bytes there) plus those the segments after it
/// create (records are ~50 bytes, about half of them create one), not the
/// whole history retention may still keep. Sizes the tables up front:
/// growing them while loading millions of entries dominates the time.
fn reservations_estimate(dir: &Path, below: Option<u64>) -> std::io::Result<usize> {
    let (snapshot_lsn, snapshot_bytes) = match list_snapshots(dir)?.first() {
        Some((lsn, path)) => (*lsn, storage::len(path)?),
        None => (0, 0),
    };
    let mut log_bytes = 0;
    let segments = list_segments(dir)?;
    for (i, (first, path)) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|(n, _)| *n);
        let after_snapshot = next_first.is_none_or(|n| n > snapshot_lsn + 1);
        if after_snapshot && below.is_none_or(|b| *first < b) {
            log_bytes += storage::len(path)?;
        }
    }
    Ok((snapshot_bytes / 54 + log_bytes / 100) as usize)
}

/// The highest LSN of a valid record at or after byte `from` of a damaged
/// segment (`above` if none): find the first valid record by probing every
/// offset, walk on record by record, probe again after more damage.
fn last_readable_lsn(bytes: &[u8], from: usize, above: u64) -> u64 {
    use crate::wal::record::decode_record;
    let plausible = |lsn: u64| lsn > above && lsn < above + (1 << 40);
    let (mut at, mut last) = (from, above);
    while at < bytes.len() {
        match decode_record(&bytes[at..]) {
            Ok((lsn, _, used)) if plausible(lsn) => {
                last = last.max(lsn);
                at += used;
            }
            _ => at += 1,
        }
    }
    last
}

/// A name for keeping `path`'s bytes out of the log that no earlier
/// discard used: `<name>.discarded`, then `<name>.1.discarded`, ...
fn discarded_name(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    (0..)
        .map(|n| match n {
            0 => path.with_file_name(format!("{name}{tag}.discarded")),
            n => path.with_file_name(format!("{name}{tag}.{n}.discarded")),
        })
        .find(|candidate| !storage::exists(candidate))
        .expect("some name is free")
}

/// Rename a file out of the log (`*.discarded`), keeping its bytes; the
/// new name.
fn discard(path: &Path) -> std::io::Result<PathBuf> {
    let kept = discarded_name(path, "");
    storage::rename(path, &kept)?;
    Ok(kept)
}

/// Take a file out of the log, keeping its bytes (`*.discarded`, never
/// overwriting an earlier one); the new name.
pub fn discard_file(path: &Path) -> std::io::Result<PathBuf> {
    discard(path)
}

/// Cut a segment at `offset`, first copying the bytes cut off to a
/// `*.discarded` file; that file's name.
pub fn cut_keeping(path: &Path, offset: u64) -> std::io::Result<PathBuf> {
    cut(path, offset, true)
}

/// Truncate a segment at `offset`; one cut inside its header is removed.
/// With `keep`, the bytes cut off are first copied (and synced) to a
/// `*.discarded` file, whose name is returned.
fn cut(path: &Path, offset: u64, keep: bool) -> std::io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut kept = PathBuf::new();
    if keep {
        let bytes = storage::read(path)?;
        kept = discarded_name(path, &format!(".from-{offset}"));
        let file = storage::create(&kept, storage::Create::Truncate)?;
        file.write_all_at(&bytes[(offset as usize).min(bytes.len())..], 0)?;
        file.sync_all()?;
    }
    if offset < SEGMENT_HEADER_BYTES as u64 {
        storage::remove(path)?;
    } else {
        let file = storage::open(path)?;
        file.set_len(offset)?;
        file.sync_all()?;
    }
    sync_dir(dir)?;
    Ok(kept)
}

/// Remove what an interrupted write left (`snap-*.snap.tmp`,
/// `consumer.lsn.tmp`, a half zero-filled spare segment): a temporary file
/// is renamed into place only once complete, so a leftover is garbage, and
/// a snapshot's can be large. (A complete spare, `wal-spare.ready`, is kept:
/// it is all zeros and the next rotation uses it.)
fn remove_leftovers(dir: &Path, report: &mut RecoveryReport) -> std::io::Result<()> {
    let mut removed = false;
    for name in storage::list(dir)? {
        let leftover = (name.starts_with("snap-") && name.ends_with(".snap.tmp"))
            || name == "consumer.lsn.tmp"
            || name == crate::wal::segment::SPARE_PARTIAL_NAME;
        if leftover {
            let path = dir.join(&name);
            let bytes = storage::len(&path)?;
            storage::remove(&path)?;
            tracing::warn!(file = %path.display(), bytes, "removed the leftover of an interrupted write");
            report.leftovers_removed.push(format!("{name} ({bytes} bytes)"));
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Rebuild the engines from `dir` (startup).
pub fn recover(dir: &Path, options: RecoverOptions) -> Result<Recovered, RecoveryError> {
    let mut leftovers = RecoveryReport::default();
    remove_leftovers(dir, &mut leftovers)?;
    let spec = LoaderSpec {
        pool_shards: options.pool_shards,
        reservations_estimate: reservations_estimate(dir, None)?,
        serving: Some(options.presized_ids),
    };
    let mode = Mode::Repair { truncate_corrupt: options.truncate_corrupt };
    let (loader, mut report) = load(dir, spec, mode, Bounds::default())?;
    report.leftovers_removed = leftovers.leftovers_removed;
    // A consumer that settled records the escape hatch just cut holds
    // state this log no longer has: say so, with both numbers.
    let consumer = consumer_lsn(dir);
    if !report.discarded.is_empty() && consumer > report.last_lsn {
        tracing::error!(
            consumer_lsn = consumer,
            log_ends_at = report.last_lsn,
            "the downstream consumer (reconciler) settled records up to LSN {consumer}, past the end of the cut log: \
             PostgreSQL holds records the engine lost; run `stampede-reconciler report` before resuming the sale"
        );
    }
    // The writer starts a fresh segment at next_lsn; a last segment that
    // holds no record (it starts at next_lsn) is removed to make room.
    let next_lsn = report.last_lsn + 1;
    for (first, path) in list_segments(dir)? {
        if first >= next_lsn {
            storage::remove(&path)?;
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
        storage::open(last)?.sync_all()?;
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
    let spec = LoaderSpec { pool_shards: 1, reservations_estimate: reservations_estimate(dir, None)?, serving: None };
    let (loader, report) = load(dir, spec, Mode::ReadOnly, Bounds { below: None, upto: Some(lsn) })?;
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
    storage::read(&dir.join(CONSUMER_LSN_FILE))
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Record the consumer's settled LSN (what `Retention::Consumer` keeps
/// segments for). A rename, not fsynced: after a power loss the file may
/// hold an older value, which only keeps more segments (the safe
/// direction); the consumer's own watermark is the authority.
pub fn record_consumer_lsn(dir: &Path, lsn: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{CONSUMER_LSN_FILE}.tmp"));
    let file = storage::create(&tmp, storage::Create::Truncate)?;
    file.write_all_at(format!("{lsn}\n").as_bytes(), 0)?;
    drop(file);
    storage::rename(&tmp, &dir.join(CONSUMER_LSN_FILE))
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
    let spec = LoaderSpec {
        pool_shards: 1,
        reservations_estimate: reservations_estimate(dir, active_first_lsn)?,
        serving: None,
    };
    let (loader, report) = load(dir, spec, Mode::ReadOnly, Bounds { below: active_first_lsn, upto: None })?;
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
            storage::remove(path)?;
            result.segments_deleted += 1;
        }
    }
    if result.segments_deleted > 0 {
        sync_dir(dir)?;
    }
    result.elapsed = started.elapsed();
    Ok(result)
}
