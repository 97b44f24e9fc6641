//! The log writer thread: group commit.
//!
//! Shards send one [`Submission`] per cycle (its events and the replies
//! that wait for them). The writer assigns LSNs, encodes records into one
//! buffer, writes it, and in `fsync` mode calls `fdatasync` once for the
//! whole group before releasing every reply in it. It stops collecting a
//! group when `flush_bytes` are waiting or `flush_interval` has passed since
//! the group's first submission, whichever comes first; under load, the
//! submissions that arrive during one fsync form the next group, so one
//! fsync serves many requests.
//!
//! A failed write or fsync is fatal: the writer stops, drops every reply it
//! holds (none of them is acknowledged), and calls the fatal handler, which
//! in the server logs and exits non-zero. It never retries an fsync: after
//! a failed fsync the kernel may have dropped the dirty pages, and a retry
//! that "succeeds" would acknowledge data that is not on disk.
//!
//! In a cluster (src/cluster) the writer is also where synchronous
//! replication holds acknowledgements: a group's replies leave only once
//! the group is durable here *and* on every member of the synchronous set
//! (the standbys' FOLLOW_ACKs arrive as [`WalMsg::StandbyDurable`]), and
//! only while the leader's lease is known valid ([`Fence`]). A standby's
//! writer appends the leader's records unchanged ([`WalMsg::Records`]).
//! On a cluster node the replies are released on a thread of their own
//! ("wal-release"): a FOLLOW_ACK that completes a group releases it at
//! once, where the writer would see it only after the fdatasync it is in
//! (which doubled the latency of every replicated reply).
//! Three LSNs are published: *written* (in the file, maybe not synced:
//! standbys stream from it, so their fsyncs overlap the leader's),
//! *synced* (fdatasync'ed here), and *committed* (synced here and on the
//! synchronous set: what the reconciler may settle).

use crate::storage::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::clock::{Monotonic, SystemMonotonic};
use crate::engine::Event;
use crate::limits::WAL_SUBMISSIONS_QUEUED_MAX;
use crate::sink::{Delivery, LogSink};
use crate::wal::record::encode_record;
use crate::wal::segment::create_segment;
use crate::wal::{Durability, WalConfig};

/// One shard cycle's events and the replies that depend on them.
pub struct Submission {
    pub events: Vec<Event>,
    pub replies: Vec<Delivery>,
}

pub enum WalMsg {
    Submit(Submission),
    /// Records written elsewhere (a standby appending its leader's log),
    /// encoded, with consecutive LSNs `first_lsn..=last_lsn`, which must
    /// continue this log.
    Records {
        bytes: bytes::Bytes,
        first_lsn: u64,
        last_lsn: u64,
    },
    /// The synchronous set: replies wait until every member has made their
    /// records durable (`Some(vec![])`: no standby to wait for; `None`:
    /// release nothing until told again, while the set is being changed).
    SyncSet(Option<Vec<String>>),
    /// A standby's FOLLOW_ACK: its log is durable up to `lsn`.
    StandbyDurable {
        node: String,
        lsn: u64,
    },
    /// Flush, fsync and stop. Sent once every shard has stopped.
    Close,
}

/// Whether replies may leave: the leader's lease deadline, on the
/// monotonic clock, in ms since `epoch` (`u64::MAX`: no lease, a single
/// node). Checked before every release: no acknowledgement leaves after the
/// deadline, whatever else is slow.
#[derive(Debug)]
pub struct Fence {
    clock: Arc<dyn Monotonic>,
    epoch: Instant,
    deadline_ms: AtomicU64,
}

impl Default for Fence {
    fn default() -> Self {
        Fence::new(Arc::new(SystemMonotonic))
    }
}

impl Fence {
    /// Open (no lease), on `clock` (the simulator's time, or the system's).
    pub fn new(clock: Arc<dyn Monotonic>) -> Fence {
        let epoch = clock.now();
        Fence { clock, epoch, deadline_ms: AtomicU64::new(u64::MAX) }
    }

    /// Replies may leave until `deadline`.
    pub fn extend_to(&self, deadline: Instant) {
        let ms = deadline.saturating_duration_since(self.epoch).as_millis() as u64;
        self.deadline_ms.store(ms, Ordering::Release);
    }

    /// No reply may leave any more.
    pub fn close(&self) {
        self.deadline_ms.store(0, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        let now = self.clock.now().saturating_duration_since(self.epoch).as_millis() as u64;
        now < self.deadline_ms.load(Ordering::Acquire)
    }
}

/// The sync call, behind a seam so tests can make it fail.
pub trait Syncer: Send + 'static {
    fn sync(&mut self, file: &File) -> std::io::Result<()>;
}

/// `fdatasync(2)`: data and the metadata needed to read it back.
pub struct DataSync;

impl Syncer for DataSync {
    fn sync(&mut self, file: &File) -> std::io::Result<()> {
        file.sync_data()
    }
}

/// Test seam: succeed `ok_syncs` times, then fail every time.
pub struct FailingSync {
    pub ok_syncs: u64,
}

impl Syncer for FailingSync {
    fn sync(&mut self, file: &File) -> std::io::Result<()> {
        if self.ok_syncs == 0 {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        self.ok_syncs -= 1;
        file.sync_data()
    }
}

/// Called once, from the writer thread, when the log cannot continue.
pub type FatalHandler = Arc<dyn Fn(&str) + Send + Sync>;

/// Counters readable from other threads (metrics, tests, replication).
#[derive(Debug)]
pub struct WalStats {
    /// fdatasync latency, seconds (recorded by the writer, read by /metrics;
    /// prometheus-client's histogram: one short lock per fsync).
    pub fsync_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Records per group commit.
    pub group_records: prometheus_client::metrics::histogram::Histogram,
    /// Highest LSN whose record is durable (per the durability mode).
    pub durable_lsn: AtomicU64,
    /// Highest LSN whose record has been fdatasync'ed (in `fsync` mode the
    /// same as `durable_lsn`; in `async` mode up to one sync interval behind).
    pub synced_lsn: AtomicU64,
    pub records_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub syncs_total: AtomicU64,
    pub groups_total: AtomicU64,
    /// First LSN of the segment being written (older ones are closed).
    pub active_segment_first_lsn: AtomicU64,
    /// Highest LSN durable here and on every member of the synchronous set
    /// (= `synced_lsn` without a cluster).
    pub committed_lsn: AtomicU64,
    /// Groups whose replies wait for the synchronous set, and their replies.
    pub groups_waiting: AtomicU64,
    pub replies_waiting: AtomicU64,
}

impl Default for WalStats {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        WalStats {
            // 50 us .. ~0.8 s: a healthy fdatasync is 0.1-1 ms; seconds mean trouble.
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 15)),
            group_records: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            durable_lsn: AtomicU64::new(0),
            synced_lsn: AtomicU64::new(0),
            records_total: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            syncs_total: AtomicU64::new(0),
            groups_total: AtomicU64::new(0),
            active_segment_first_lsn: AtomicU64::new(0),
            committed_lsn: AtomicU64::new(0),
            groups_waiting: AtomicU64::new(0),
            replies_waiting: AtomicU64::new(0),
        }
    }
}

/// A running log writer.
pub struct WalHandle {
    tx: Sender<WalMsg>,
    /// The release thread's inbox, on a replicated log.
    release_tx: Option<Sender<ReleaseMsg>>,
    releaser: Option<JoinHandle<()>>,
    /// Followers of the written, synced and committed LSNs.
    pub watches: WalWatches,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    pub stats: Arc<WalStats>,
    /// The lease fence the writer checks before releasing replies.
    pub fence: Arc<Fence>,
}

/// Watch channels on the writer's LSNs: a watch, because the writer never
/// blocks on it and a follower that wakes late needs only the newest value
/// (it reads the records from the segment files). Closed when it stops.
#[derive(Clone)]
pub struct WalWatches {
    /// In the file (write(2) done), maybe not synced: standbys follow this.
    pub written: tokio::sync::watch::Receiver<u64>,
    /// fdatasync'ed here.
    pub synced: tokio::sync::watch::Receiver<u64>,
    /// Synced here and on the synchronous set: consumers follow this.
    pub committed: tokio::sync::watch::Receiver<u64>,
}

impl WalHandle {
    /// A sink for one shard.
    pub fn sink(&self) -> WalSink {
        WalSink { tx: self.tx.clone() }
    }

    /// Sinks for the router's shards, including hot shards created later.
    pub fn sink_factory(&self) -> crate::shard::SinkFactory {
        let tx = self.tx.clone();
        Box::new(move |_| Box::new(WalSink { tx: tx.clone() }))
    }

    /// A sender for cluster control messages (synchronous set, standby
    /// acknowledgements, a standby's records).
    pub fn control(&self) -> WalControl {
        WalControl { writer: self.tx.clone(), release: self.release_tx.clone() }
    }

    /// Flush, fsync and stop the writer (on a replicated log, waiting up to
    /// `WAL_CLOSE_STANDBY_WAIT_MS` for the synchronous set to acknowledge
    /// the last groups; replies still waiting then are never sent). Call
    /// after every shard has stopped.
    pub fn close(mut self) -> std::io::Result<()> {
        let _ = self.tx.send(WalMsg::Close);
        let result = match self.thread.take().expect("joined once").join() {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::other("log writer panicked")),
        };
        if let Some(releaser) = self.releaser.take() {
            // The writer sends this too when it finishes, but not when it
            // failed: the release thread must stop either way.
            if let Some(tx) = &self.release_tx {
                let _ = tx.send(ReleaseMsg::Close);
            }
            if releaser.join().is_err() {
                return Err(std::io::Error::other("log release thread panicked"));
            }
        }
        result
    }
}

/// Where cluster control messages go: the synchronous set and standby
/// acknowledgements to whoever releases replies (the release thread on a
/// replicated log), a standby's records to the writer.
#[derive(Clone)]
pub struct WalControl {
    writer: Sender<WalMsg>,
    release: Option<Sender<ReleaseMsg>>,
}

/// The log writer (or its release thread) has stopped.
#[derive(Debug)]
pub struct WalStopped;

impl WalControl {
    pub fn send(&self, msg: WalMsg) -> Result<(), WalStopped> {
        let sent = match (msg, &self.release) {
            (WalMsg::SyncSet(set), Some(release)) => release.send(ReleaseMsg::SyncSet(set)).is_ok(),
            (WalMsg::StandbyDurable { node, lsn }, Some(release)) => {
                release.send(ReleaseMsg::StandbyDurable { node, lsn }).is_ok()
            }
            (msg, _) => self.writer.send(msg).is_ok(),
        };
        sent.then_some(()).ok_or(WalStopped)
    }
}

/// The [`LogSink`] of a shard: hands each cycle to the writer.
pub struct WalSink {
    tx: Sender<WalMsg>,
}

impl LogSink for WalSink {
    fn submit(&mut self, events: &mut Vec<Event>, replies: &mut Vec<Delivery>) {
        let submission = Submission { events: std::mem::take(events), replies: std::mem::take(replies) };
        // Blocks when the writer is WAL_SUBMISSIONS_QUEUED_MAX behind: the
        // shard stops taking requests and clients get `busy`. If the writer
        // is gone (fatal error), the replies are dropped: never acknowledged.
        let _ = self.tx.send(WalMsg::Submit(submission));
    }
}

/// Start the writer; the first record written gets `next_lsn`. A fresh
/// segment is created for it.
pub fn start(
    config: WalConfig,
    next_lsn: u64,
    syncer: Box<dyn Syncer>,
    fatal: FatalHandler,
) -> std::io::Result<WalHandle> {
    let (writer, rx, handle) = build(config, next_lsn, syncer, true, Arc::new(Fence::default()))?;
    let thread = std::thread::Builder::new().name("wal-writer".into()).spawn(move || {
        let result = writer.run(rx);
        if let Err(e) = &result {
            fatal(&format!("write-ahead log failed, no further acknowledgements: {e}"));
        }
        result
    })?;
    Ok(WalHandle { thread: Some(thread), ..handle })
}

/// A writer driven by its caller instead of a thread (the simulator): the
/// same group commit, segment rotation and preallocation (done inline),
/// one group per [`ManualWal::flush`]. Not for a replicated log.
pub struct ManualWal {
    writer: Writer,
    rx: Receiver<WalMsg>,
    handle: WalHandle,
}

impl ManualWal {
    /// With a lease fence on the simulator's clock: replies leave only
    /// while it is open (a leader's writer).
    pub fn open_fenced(config: WalConfig, next_lsn: u64, fence: Arc<Fence>) -> std::io::Result<ManualWal> {
        assert!(!config.replicated, "a manual writer releases replies itself");
        let (writer, rx, handle) = build(config, next_lsn, Box::new(DataSync), false, fence)?;
        Ok(ManualWal { writer, rx, handle })
    }

    pub fn sink(&self) -> WalSink {
        self.handle.sink()
    }

    pub fn stats(&self) -> &Arc<WalStats> {
        &self.handle.stats
    }

    /// Something was submitted since the last flush.
    pub fn has_pending(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Queue a control message or a standby's records for the next flush.
    pub fn send(&self, msg: WalMsg) {
        // The receiver lives in `self`: this cannot fail.
        let _ = self.handle.tx.send(msg);
    }

    /// The lease fence this writer checks before releasing replies.
    pub fn fence(&self) -> &Arc<Fence> {
        &self.handle.fence
    }

    /// The last LSN written to the file (a standby may read up to it).
    pub fn written_lsn(&self) -> u64 {
        *self.handle.watches.written.borrow()
    }

    /// Take everything submitted so far as one group: write it, make it
    /// durable per the mode, release its replies. An error is the log's
    /// failure: the node must stop (no further acknowledgements).
    pub fn flush(&mut self) -> std::io::Result<()> {
        while let Ok(msg) = self.rx.try_recv() {
            self.writer.take(msg);
        }
        self.writer.flush()
    }
}

/// A writer and its handle, not started.
fn build(
    config: WalConfig,
    next_lsn: u64,
    syncer: Box<dyn Syncer>,
    threaded: bool,
    fence: Arc<Fence>,
) -> std::io::Result<(Writer, Receiver<WalMsg>, WalHandle)> {
    // A spare left by the previous run (all zeros) makes the first
    // segment preallocated too.
    let (file, preallocated) = if config.preallocate {
        crate::wal::segment::install_segment(&config.dir, next_lsn)?
    } else {
        (create_segment(&config.dir, next_lsn)?, false)
    };
    let stats = Arc::new(WalStats::default());
    stats.durable_lsn.store(next_lsn - 1, Ordering::Release);
    stats.synced_lsn.store(next_lsn - 1, Ordering::Release);
    stats.committed_lsn.store(next_lsn - 1, Ordering::Release);
    // Everything before next_lsn was recovered from disk: already synced.
    // (Committed too: a node recovers only what it acknowledged or what
    // its leader sent it; a new leader's first TERM_STARTED commits the rest.)
    let (written_tx, written) = tokio::sync::watch::channel(next_lsn - 1);
    let (synced_tx, synced) = tokio::sync::watch::channel(next_lsn - 1);
    let (committed_tx, committed) = tokio::sync::watch::channel(next_lsn - 1);
    stats.active_segment_first_lsn.store(next_lsn, Ordering::Release);
    let (tx, rx) = crossbeam_channel::bounded(WAL_SUBMISSIONS_QUEUED_MAX);
    let commits = Commits {
        stats: stats.clone(),
        committed: committed_tx,
        fence: fence.clone(),
        sync_set: Some(Vec::new()),
        standby_durable: Default::default(),
        waiting: Default::default(),
    };
    let (release, release_tx, releaser) = if config.replicated {
        // Unbounded, yet bounded in practice: one message per group (the
        // writer's own queue is bounded) and per FOLLOW_ACK.
        let (release_tx, release_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new().name("wal-release".into()).spawn(move || commits.run(release_rx))?;
        (Release::Thread(release_tx.clone()), Some(release_tx), Some(thread))
    } else {
        (Release::Inline(commits), None, None)
    };
    // Segments larger than the default bound exist only as test seams
    // (never rotating): nothing to preallocate for.
    let spare_ready = Arc::new(AtomicBool::new(false));
    let preallocating = config.preallocate && config.segment_bytes_max <= crate::limits::WAL_SEGMENT_BYTES_MAX;
    let spares = if preallocating && !threaded {
        Spares::Inline
    } else if preallocating {
        // One request at a time is enough: a spare takes a segment's worth
        // of writes to be needed.
        let (spares_tx, spares_rx) = crossbeam_channel::bounded::<()>(1);
        let (dir, bytes) = (config.dir.clone(), config.segment_bytes_max);
        let ready = spare_ready.clone();
        std::thread::Builder::new().name("wal-prealloc".into()).spawn(move || {
            // Ends when the writer (the only sender) is gone.
            for () in spares_rx.iter() {
                match crate::wal::segment::prepare_spare(&dir, bytes) {
                    Ok(()) => ready.store(true, Ordering::Release),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not preallocate the next log segment; it will grow as written")
                    }
                }
            }
        })?;
        Spares::Thread(spares_tx)
    } else {
        Spares::None
    };
    let mut writer = Writer {
        dir: config.dir.clone(),
        config,
        file,
        growing: !preallocated,
        spares,
        spare_requested: false,
        spare_ready,
        segment_bytes: crate::wal::segment::SEGMENT_HEADER_BYTES as u64,
        next_lsn,
        buf: BytesMut::with_capacity(1 << 20),
        group: Vec::new(),
        dirty: false,
        group_records: 0,
        last_sync: Instant::now(),
        syncer,
        stats: stats.clone(),
        written: written_tx,
        synced: synced_tx,
        release,
    };
    if writer.growing {
        // A fresh log (or a start that found no spare): the first segment
        // grows, and every fdatasync on it writes its size too. Ask for a
        // spare now and move to it as soon as it is ready (see `flush`),
        // rather than when this one is half full.
        writer.request_spare();
    }
    let handle = WalHandle {
        tx,
        release_tx,
        releaser,
        watches: WalWatches { written, synced, committed },
        thread: None,
        stats,
        fence,
    };
    Ok((writer, rx, handle))
}

/// Who zero-fills spare segments.
enum Spares {
    /// Nobody: segments grow (preallocation off, or a log that never
    /// rotates).
    None,
    /// The `wal-prealloc` thread, asked through this channel.
    Thread(crossbeam_channel::Sender<()>),
    /// The writer itself, when asked (a manual writer: deterministic).
    Inline,
}

struct Writer {
    dir: PathBuf,
    config: WalConfig,
    file: File,
    segment_bytes: u64,
    next_lsn: u64,
    buf: BytesMut,
    group: Vec<Delivery>,
    /// Written but not yet synced (async mode).
    dirty: bool,
    /// Records in the group being collected.
    group_records: u64,
    last_sync: Instant,
    syncer: Box<dyn Syncer>,
    /// Who makes the next spare segment (see `WalConfig::preallocate`).
    spares: Spares,
    /// The next spare was asked for (reset at each rotation).
    spare_requested: bool,
    /// Set by the preallocation thread when a spare is ready; taken by the
    /// writer when it leaves a growing segment early for it.
    spare_ready: Arc<AtomicBool>,
    /// The active segment grows as written (no spare was ready for it).
    growing: bool,
    stats: Arc<WalStats>,
    /// Publish the written and synced LSNs (see [`WalWatches`]).
    written: tokio::sync::watch::Sender<u64>,
    synced: tokio::sync::watch::Sender<u64>,
    /// Who releases the replies of durable groups.
    release: Release,
}

/// A single node's writer releases replies itself, right after its
/// fdatasync; a replicated log's go to the release thread.
enum Release {
    Inline(Commits),
    Thread(Sender<ReleaseMsg>),
}

/// What the release thread hears.
pub enum ReleaseMsg {
    /// Durable here up to `lsn` (the stats say so already); `replies`
    /// (maybe none) are those of the group that ends there.
    Local {
        lsn: u64,
        replies: Vec<Delivery>,
    },
    SyncSet(Option<Vec<String>>),
    StandbyDurable {
        node: String,
        lsn: u64,
    },
    /// The writer has stopped: release what the synchronous set
    /// acknowledges within `WAL_CLOSE_STANDBY_WAIT_MS`, then stop.
    Close,
}

/// Replies waiting for their group to be durable on the synchronous set,
/// and the committed LSN.
struct Commits {
    stats: Arc<WalStats>,
    committed: tokio::sync::watch::Sender<u64>,
    fence: Arc<Fence>,
    /// Members whose durability a release waits for (`None`: hold all).
    sync_set: Option<Vec<String>>,
    /// Each standby's durable LSN, as its FOLLOW_ACKs report it.
    standby_durable: std::collections::HashMap<String, u64>,
    /// Groups durable here whose replies wait: `(last_lsn, replies)`.
    waiting: std::collections::VecDeque<(u64, Vec<Delivery>)>,
}

impl Commits {
    fn take(&mut self, msg: ReleaseMsg) {
        match msg {
            ReleaseMsg::Local { lsn, replies } => {
                // The replies wait behind every earlier group, for the
                // synchronous set and the lease.
                if !replies.is_empty() {
                    self.stats.groups_waiting.fetch_add(1, Ordering::Relaxed);
                    self.stats.replies_waiting.fetch_add(replies.len() as u64, Ordering::Relaxed);
                    self.waiting.push_back((lsn, replies));
                }
            }
            ReleaseMsg::SyncSet(set) => self.sync_set = set,
            ReleaseMsg::StandbyDurable { node, lsn } => {
                let durable = self.standby_durable.entry(node).or_insert(0);
                *durable = (*durable).max(lsn);
            }
            ReleaseMsg::Close => {}
        }
    }

    /// The release thread: take every message there is, then release.
    /// Wakes every `FENCE_RECHECK_MS` regardless, so replies held by a
    /// fence that has since been extended leave without waiting for
    /// another message.
    fn run(mut self, rx: Receiver<ReleaseMsg>) {
        const FENCE_RECHECK_MS: u64 = 50;
        let mut closing: Option<Instant> = None;
        loop {
            let wait = match closing {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::from_millis(FENCE_RECHECK_MS),
            }
            .min(Duration::from_millis(FENCE_RECHECK_MS));
            match rx.recv_timeout(wait) {
                Ok(msg) => {
                    if matches!(msg, ReleaseMsg::Close) {
                        let wait = Duration::from_millis(crate::limits::WAL_CLOSE_STANDBY_WAIT_MS);
                        closing = Some(Instant::now() + wait);
                    }
                    self.take(msg);
                    while let Ok(msg) = rx.try_recv() {
                        if matches!(msg, ReleaseMsg::Close) {
                            let wait = Duration::from_millis(crate::limits::WAL_CLOSE_STANDBY_WAIT_MS);
                            closing = Some(Instant::now() + wait);
                        }
                        self.take(msg);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing = Some(Instant::now()),
            }
            self.release();
            if let Some(deadline) = closing {
                if self.waiting.is_empty() || Instant::now() >= deadline {
                    return;
                }
            }
        }
    }

    /// The highest LSN durable here and on every member of the
    /// synchronous set (`None` while the set is being changed).
    fn commit_point(&self) -> Option<u64> {
        let local = self.stats.durable_lsn.load(Ordering::Acquire);
        let set = self.sync_set.as_ref()?;
        Some(set.iter().map(|node| self.standby_durable.get(node).copied().unwrap_or(0)).fold(local, u64::min))
    }

    /// Release the waiting groups the synchronous set has made durable,
    /// while the lease fence is open; publish the committed LSN.
    fn release(&mut self) {
        let Some(commit) = self.commit_point() else { return };
        let synced = self.stats.synced_lsn.load(Ordering::Acquire);
        let committed = commit.min(synced);
        if committed > self.stats.committed_lsn.load(Ordering::Acquire) {
            self.stats.committed_lsn.store(committed, Ordering::Release);
            self.committed.send_if_modified(|lsn| std::mem::replace(lsn, committed) != committed);
        }
        if !self.fence.is_open() {
            return;
        }
        while self.waiting.front().is_some_and(|(last_lsn, _)| *last_lsn <= commit) {
            let (_, replies) = self.waiting.pop_front().expect("checked");
            self.stats.groups_waiting.fetch_sub(1, Ordering::Relaxed);
            self.stats.replies_waiting.fetch_sub(replies.len() as u64, Ordering::Relaxed);
            for reply in replies {
                reply.deliver();
            }
        }
    }
}

impl Writer {
    fn run(mut self, rx: Receiver<WalMsg>) -> std::io::Result<()> {
        loop {
            // In async mode wake up to sync even when no one writes.
            let idle_wait = match self.config.durability {
                Durability::Fsync => Duration::from_secs(3600),
                Durability::Async => self.config.async_sync_interval,
            };
            let first = match rx.recv_timeout(idle_wait) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => {
                    self.sync_if_due()?;
                    self.publish(Vec::new());
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return self.finish(),
            };
            let mut closing = self.take(first);
            let deadline = Instant::now() + self.config.flush_interval;
            while !closing && self.buf.len() < self.config.flush_bytes {
                let next = if self.config.flush_interval.is_zero() {
                    rx.try_recv().ok()
                } else {
                    rx.recv_deadline(deadline).ok()
                };
                match next {
                    Some(msg) => closing = self.take(msg),
                    None => break,
                }
            }
            self.flush()?;
            if closing {
                return self.finish();
            }
        }
    }

    /// Add a message to the current group; true if it asks to close.
    fn take(&mut self, msg: WalMsg) -> bool {
        match msg {
            WalMsg::Submit(submission) => {
                for event in &submission.events {
                    encode_record(self.next_lsn, event, &mut self.buf);
                    self.next_lsn += 1;
                }
                self.stats.records_total.fetch_add(submission.events.len() as u64, Ordering::Relaxed);
                self.group_records += submission.events.len() as u64;
                self.group.extend(submission.replies);
                false
            }
            WalMsg::Records { bytes, first_lsn, last_lsn } => {
                // The standby side checked continuity; a gap here is a bug
                // that would corrupt the log, so stop rather than write it.
                assert_eq!(first_lsn, self.next_lsn, "records out of order for this log");
                self.buf.extend_from_slice(&bytes);
                self.next_lsn = last_lsn + 1;
                let count = last_lsn + 1 - first_lsn;
                self.stats.records_total.fetch_add(count, Ordering::Relaxed);
                self.group_records += count;
                false
            }
            WalMsg::SyncSet(set) => {
                self.control(ReleaseMsg::SyncSet(set));
                false
            }
            WalMsg::StandbyDurable { node, lsn } => {
                self.control(ReleaseMsg::StandbyDurable { node, lsn });
                false
            }
            WalMsg::Close => true,
        }
    }

    /// A synchronous-set change or a standby acknowledgement, to whoever
    /// releases replies.
    fn control(&mut self, msg: ReleaseMsg) {
        match &mut self.release {
            Release::Inline(commits) => {
                commits.take(msg);
                commits.release();
            }
            Release::Thread(tx) => {
                let _ = tx.send(msg);
            }
        }
    }

    /// The log is durable here up to the stats' LSN: hand over the group's
    /// replies (released once the synchronous set has it too).
    fn publish(&mut self, replies: Vec<Delivery>) {
        let lsn = self.stats.durable_lsn.load(Ordering::Acquire);
        match &mut self.release {
            Release::Inline(commits) => {
                commits.take(ReleaseMsg::Local { lsn, replies });
                commits.release();
            }
            Release::Thread(tx) => {
                // Gone only if the release thread panicked: the replies
                // are dropped, never acknowledged.
                let _ = tx.send(ReleaseMsg::Local { lsn, replies });
            }
        }
    }

    /// Write the group, make it durable per the mode, then release replies.
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            // At an explicit offset: a preallocated segment is longer than
            // its records.
            self.file.write_all_at(&self.buf, self.segment_bytes)?;
            self.segment_bytes += self.buf.len() as u64;
            self.stats.bytes_total.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
            self.buf.clear();
            self.dirty = true;
        }
        // Standbys may read the group now: their write and fdatasync run
        // while ours does.
        self.written.send_if_modified(|lsn| std::mem::replace(lsn, self.next_lsn - 1) != self.next_lsn - 1);
        match self.config.durability {
            Durability::Fsync => self.sync()?,
            Durability::Async => self.sync_if_due()?,
        }
        if self.config.durability == Durability::Async {
            // Acknowledged after write(2): durable once the next sync runs.
            self.stats.durable_lsn.store(self.next_lsn - 1, Ordering::Release);
        }
        self.stats.groups_total.fetch_add(1, Ordering::Relaxed);
        if self.group_records > 0 {
            self.stats.group_records.observe(self.group_records as f64);
            self.group_records = 0;
        }
        let replies = std::mem::take(&mut self.group);
        self.publish(replies);
        if self.segment_bytes >= self.config.segment_bytes_max {
            self.rotate()?;
        } else if self.growing && self.spare_ready.swap(false, Ordering::Acquire) {
            // A growing segment costs a metadata write per fdatasync (its
            // size): leave it for the spare at once. Segments may end at
            // any record; recovery and the cursor follow LSNs, not sizes.
            self.rotate()?;
        } else if self.segment_bytes >= self.config.segment_bytes_max / 2 {
            // Half full: the helper zero-fills the next segment while this
            // one fills up.
            self.request_spare();
        }
        Ok(())
    }

    /// Ask the helper for the next spare, once per segment (no spare at
    /// all for a log that never rotates).
    fn request_spare(&mut self) {
        if !self.spare_requested {
            match &self.spares {
                Spares::None => {}
                Spares::Thread(spares) => {
                    let _ = spares.try_send(());
                }
                Spares::Inline => match crate::wal::segment::prepare_spare(&self.dir, self.config.segment_bytes_max) {
                    Ok(()) => self.spare_ready.store(true, Ordering::Release),
                    Err(e) => tracing::warn!(error = %e, "could not preallocate the next log segment"),
                },
            }
            self.spare_requested = true;
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty {
            let started = Instant::now();
            self.syncer.sync(&self.file)?;
            self.stats.fsync_seconds.observe(started.elapsed().as_secs_f64());
            self.dirty = false;
            self.last_sync = Instant::now();
            self.stats.syncs_total.fetch_add(1, Ordering::Relaxed);
        }
        let synced = self.next_lsn - 1;
        self.stats.durable_lsn.store(synced, Ordering::Release);
        self.stats.synced_lsn.store(synced, Ordering::Release);
        self.synced.send_if_modified(|lsn| std::mem::replace(lsn, synced) != synced);
        Ok(())
    }

    fn sync_if_due(&mut self) -> std::io::Result<()> {
        if self.dirty && self.last_sync.elapsed() >= self.config.async_sync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// Close the full segment (synced) and start the next one.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.sync()?;
        let (file, preallocated) = crate::wal::segment::install_segment(&self.dir, self.next_lsn)?;
        self.file = file;
        self.growing = !preallocated;
        // The helper zero-fills the next spare while this one fills up.
        self.spare_requested = false;
        if preallocated {
            // Taken (a flag the helper set after a spare was already
            // installed would only cause one early rotation).
            self.spare_ready.store(false, Ordering::Release);
        } else {
            // The helper was slower than this segment: the next spare now.
            self.request_spare();
        }
        self.segment_bytes = crate::wal::segment::SEGMENT_HEADER_BYTES as u64;
        self.stats.active_segment_first_lsn.store(self.next_lsn, Ordering::Release);
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.flush()?;
        self.sync()?;
        self.publish(Vec::new());
        if let Release::Thread(tx) = &self.release {
            let _ = tx.send(ReleaseMsg::Close);
        }
        Ok(())
    }
}
