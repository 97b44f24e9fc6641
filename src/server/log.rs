//! The log operations of a connection with the replication (or admin)
//! role: REPLICATE streams the write-ahead log, SETTLED records how far the
//! downstream consumer has durably applied it, STATE_DUMP sends the
//! engine's state at one LSN. Format: `protocol/src/message/replicate.rs`,
//! `dump.rs` and PROTOCOL.md.
//!
//! Streams read the segment files (a [`LogCursor`]), never the writer's
//! memory: a slow consumer costs page-cache reads, not server memory, and
//! catching up from old segments and following live records are the same
//! code. Each stream keeps at most `REPLICATION_FRAMES_INFLIGHT_MAX` frames
//! queued for its connection; the socket's pace sets the stream's pace.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use stampede_protocol::frame::encode_frame_with;
use stampede_protocol::message::cluster::FOLLOW_BATCH_HEADER_BYTES;
use stampede_protocol::message::dump::DUMP_CHUNK_HEADER_BYTES;
use stampede_protocol::message::replicate::LOG_BATCH_HEADER_BYTES;
use stampede_protocol::message::{
    DumpChunk, DumpEntry, Follow, FollowAck, FollowBatch, LocationEntry, LogBatch, NodeRole, Opcode, ReservationEntry,
    SaleEntry, SnapshotChunk,
};
use stampede_protocol::Status;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::cluster::{history, ClusterState, StandbyInfo};
use crate::engine::SaleImage;
use crate::limits::{
    FRAME_BODY_BYTES_MAX, REPLICATION_FRAMES_INFLIGHT_MAX, REPLICATION_HEARTBEAT_MS, REPLICATION_STREAMS_MAX,
    SNAPSHOT_CHUNK_BYTES_MAX, STATE_DUMPS_CONCURRENT_MAX, STREAM_INLINE_READ_RECORDS,
};
use crate::sink::ConnTx;
use crate::wal::follow::{CursorError, LogCursor};
use crate::wal::writer::{WalControl, WalMsg, WalWatches};

use super::conn::Outbound;

/// One connection's REPLICATE stream, shared by the stream task and the
/// connection (which answers SETTLED and refuses a second REPLICATE).
#[derive(Clone)]
pub struct StreamState {
    /// Highest LSN the stream has handed to the connection.
    sent: Arc<AtomicU64>,
    /// Cleared when the stream task ends, for whatever reason.
    live: Arc<AtomicBool>,
    /// Cancelled when the connection's reader stops (the consumer closed
    /// or went away): the stream ends and frees its slot at once instead
    /// of at its next failed write.
    pub closed: CancellationToken,
}

impl StreamState {
    /// A stream starting at `from_lsn` (it has sent everything before).
    pub fn new(from_lsn: u64) -> StreamState {
        StreamState {
            sent: Arc::new(AtomicU64::new(from_lsn.saturating_sub(1))),
            live: Arc::new(AtomicBool::new(true)),
            closed: CancellationToken::new(),
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    pub fn sent_lsn(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }
}

/// Marks the stream ended when the stream task returns or is cancelled.
struct StreamEnd(StreamState);

impl Drop for StreamEnd {
    fn drop(&mut self) {
        self.0.live.store(false, Ordering::Release);
    }
}

/// What a stream feeds: a consumer (REPLICATE: LOG_BATCH frames of
/// *committed* records) or a standby (FOLLOW: FOLLOW_BATCH frames of
/// *written* records, with the leader's term and commit LSN).
#[derive(Clone, Copy)]
enum Feed {
    Consumer,
    Standby { term: u64, truncate_to: u64 },
}

/// A frame header, fixed before its records are read (off the runtime).
#[derive(Clone, Copy)]
struct Header {
    feed: Feed,
    status: Status,
    upto: u64,
    commit_lsn: u64,
    now_ms: u64,
}

impl Header {
    fn encode(&self, count: u32, body: &mut BytesMut) {
        match self.feed {
            Feed::Consumer => LogBatch::encode_header(self.status, self.upto, self.now_ms, count, body),
            Feed::Standby { term, truncate_to } => {
                FollowBatch::encode_header(self.status, term, self.commit_lsn, truncate_to, self.now_ms, count, body)
            }
        }
    }
}

impl Feed {
    fn opcode(self) -> u8 {
        match self {
            Feed::Consumer => Opcode::Replicate.reply(),
            Feed::Standby { .. } => Opcode::Follow.reply(),
        }
    }

    fn header_bytes(self) -> usize {
        match self {
            Feed::Consumer => LOG_BATCH_HEADER_BYTES,
            Feed::Standby { .. } => FOLLOW_BATCH_HEADER_BYTES,
        }
    }

    /// The LSN this feed follows: what a consumer may settle, or what a
    /// standby may copy.
    fn watch(self, watches: &WalWatches) -> watch::Receiver<u64> {
        match self {
            Feed::Consumer => watches.committed.clone(),
            Feed::Standby { .. } => watches.written.clone(),
        }
    }

    fn header_at(self, log: &LogService, status: Status, upto: u64) -> Header {
        let commit_lsn = *log.watches.committed.borrow();
        Header { feed: self, status, upto, commit_lsn, now_ms: log.clock.now_ms() }
    }
}

/// One frame with as many records (up to `upto`) as fit.
fn read_frame(
    cursor: &mut LogCursor,
    feed: Feed,
    header: Header,
    request_id: u64,
    upto: u64,
    dst: &mut BytesMut,
) -> Result<(), CursorError> {
    let mut result = Ok(());
    encode_frame_with(dst, feed.opcode(), request_id, |body| {
        let start = body.len();
        header.encode(0, body);
        match cursor.read(upto, start + FRAME_BODY_BYTES_MAX, body) {
            Ok(count) => {
                let at = start + feed.header_bytes() - 4;
                body[at..at + 4].copy_from_slice(&count.to_le_bytes());
            }
            Err(e) => result = Err(e),
        }
    });
    result
}

/// What the log operations need from the running server.
pub struct LogService {
    dir: PathBuf,
    /// The writer's LSNs: consumers follow `committed`, standbys `written`.
    watches: WalWatches,
    /// To the log writer: standbys' FOLLOW_ACKs.
    control: WalControl,
    /// This node's role, term and standbys.
    cluster: Arc<ClusterState>,
    clock: Arc<dyn Clock>,
    streams: Arc<Semaphore>,
    dumps: Arc<Semaphore>,
    /// Serialises writes of `consumer.lsn` (a std mutex: held for one small
    /// file write, never across an await).
    consumer_file: std::sync::Mutex<u64>,
}

impl LogService {
    pub fn new(
        dir: PathBuf,
        watches: WalWatches,
        control: WalControl,
        cluster: Arc<ClusterState>,
        clock: Arc<dyn Clock>,
    ) -> LogService {
        let consumer = crate::recovery::consumer_lsn(&dir);
        LogService {
            dir,
            watches,
            control,
            cluster,
            clock,
            streams: Arc::new(Semaphore::new(REPLICATION_STREAMS_MAX)),
            dumps: Arc::new(Semaphore::new(STATE_DUMPS_CONCURRENT_MAX)),
            consumer_file: std::sync::Mutex::new(consumer),
        }
    }

    /// The consumer's last settled LSN (0 if none).
    pub fn consumer_lsn(&self) -> u64 {
        *self.consumer_file.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest LSN a consumer may see: durable here and on the
    /// synchronous set.
    pub fn synced_lsn(&self) -> u64 {
        *self.watches.committed.borrow()
    }

    /// SETTLED from a connection whose stream is `stream` (`None`: the
    /// connection has no live REPLICATE stream): remember the consumer's
    /// settled LSN for log retention. The answer's detail is the LSN the
    /// server holds afterwards.
    ///
    /// - No live stream on this connection: `invalid_argument`. Only a
    ///   consumer that is reading the log can have settled any of it.
    /// - Beyond what this stream has sent: `invalid_argument`, detail = the
    ///   highest LSN the stream sent. A consumer cannot have settled a
    ///   record it never received; believing it would let a checkpoint
    ///   delete segments no one settled.
    /// - At or below what is recorded: `ok`, nothing changes (the recorded
    ///   LSN never goes backwards; a database restored from an older backup
    ///   re-settles from its own watermark, and the segments it needs were
    ///   kept unless retention already passed them).
    /// - Otherwise `ok`, recorded.
    ///
    /// Several streams may settle (one downstream system of record, e.g. a
    /// reconciler and its replacement during a handover): every one
    /// reports LSNs committed into the same PostgreSQL, so the highest is
    /// the truth.
    ///
    /// Written with a rename but not fsynced: after a power loss the file
    /// may hold an older value, which only keeps more segments (the safe
    /// direction). The reconciler's own watermark, in PostgreSQL, is the
    /// authority; this file only gates deletion.
    pub fn settled(&self, settled_lsn: u64, stream: Option<&StreamState>) -> (Status, u64) {
        let mut current = self.consumer_file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stream) = stream.filter(|s| s.is_live()) else {
            return (Status::InvalidArgument, *current);
        };
        let sent = stream.sent_lsn();
        if settled_lsn > sent {
            return (Status::InvalidArgument, sent);
        }
        if settled_lsn <= *current {
            return (Status::Ok, *current);
        }
        match crate::recovery::record_consumer_lsn(&self.dir, settled_lsn) {
            Ok(()) => {
                *current = settled_lsn;
                (Status::Ok, settled_lsn)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the consumer's settled LSN");
                (Status::InternalError, *current)
            }
        }
    }

    /// REPLICATE: stream records from `from_lsn` until the connection goes
    /// (its reader saw the end: `stream` is closed) or the stream cannot go
    /// on. Frees the stream's slot at once either way.
    pub async fn replicate(self: Arc<Self>, from_lsn: u64, request_id: u64, tx: ConnTx, stream: StreamState) {
        let _ended = StreamEnd(stream.clone());
        tokio::select! {
            _ = stream.closed.cancelled() => {}
            _ = self.stream_records(Feed::Consumer, from_lsn, request_id, tx, &stream) => {}
        }
    }

    /// FOLLOW from a standby: find where its log parts from ours, then
    /// stream our records from there as soon as they are written (so its
    /// fdatasync overlaps ours), each frame carrying our term and commit
    /// LSN. The standby's FOLLOW_ACKs arrive on the same connection.
    pub async fn follow(self: Arc<Self>, follow: Follow, request_id: u64, tx: ConnTx, stream: StreamState) {
        let _ended = StreamEnd(stream.clone());
        let cluster = self.cluster.clone();
        let term = cluster.term();
        let refuse = |status: Status| {
            let feed = Feed::Standby { term, truncate_to: follow.last_lsn };
            self.refuse_stream(feed, status, request_id, &tx);
        };
        if cluster.role() != NodeRole::Leader {
            return refuse(Status::NotLeader);
        }
        if follow.term > term {
            // The follower saw a newer term: this leader is stale. Its
            // lease is about to fail; the manager finds out from etcd.
            tracing::warn!(node = %follow.node_id, their_term = follow.term, our_term = term, "FOLLOW from a newer term");
            return refuse(Status::StaleTerm);
        }
        let last = *self.watches.written.borrow();
        let truncate_to = history::follow_from(&cluster.history.lock(), last, &follow.history, follow.last_lsn);
        if truncate_to < follow.last_lsn {
            tracing::warn!(
                node = %follow.node_id, their_last = follow.last_lsn, truncate_to,
                "a standby's log parts from ours: it must cut its records after the common point"
            );
        }
        tracing::info!(node = %follow.node_id, from_lsn = truncate_to + 1, term, "standby following");
        cluster.standbys.lock().insert(
            follow.node_id.clone(),
            StandbyInfo {
                addr: follow.addr.clone(),
                streaming: true,
                durable_lsn: truncate_to,
                applied_lsn: truncate_to,
                last_progress: Some(std::time::Instant::now()),
            },
        );
        let feed = Feed::Standby { term, truncate_to };
        tokio::select! {
            _ = stream.closed.cancelled() => {}
            _ = self.stream_records(feed, truncate_to + 1, request_id, tx, &stream) => {}
        }
        if let Some(standby) = cluster.standbys.lock().get_mut(&follow.node_id) {
            standby.streaming = false;
        }
        tracing::info!(node = %follow.node_id, "standby stream ended");
    }

    /// FOLLOW_ACK from standby `node`: its durable LSN, for the writer's
    /// synchronous set and for CLUSTER.
    pub fn standby_ack(&self, node: &str, ack: FollowAck) {
        if let Some(standby) = self.cluster.standbys.lock().get_mut(node) {
            if ack.durable_lsn > standby.durable_lsn {
                standby.last_progress = Some(std::time::Instant::now());
            }
            standby.durable_lsn = standby.durable_lsn.max(ack.durable_lsn);
            standby.applied_lsn = standby.applied_lsn.max(ack.applied_lsn);
        }
        let _ = self.control.send(WalMsg::StandbyDurable { node: node.to_string(), lsn: ack.durable_lsn });
    }

    /// The last LSN fdatasync'ed here (whatever the standbys hold).
    pub fn local_durable_lsn(&self) -> u64 {
        *self.watches.synced.borrow()
    }

    async fn stream_records(&self, feed: Feed, from_lsn: u64, request_id: u64, tx: ConnTx, stream: &StreamState) {
        let credit = Arc::new(Semaphore::new(REPLICATION_FRAMES_INFLIGHT_MAX));
        let send = |body: Bytes, permit: OwnedSemaphorePermit| tx.send(Outbound::Frame { bytes: body, credit: permit });
        let fresh = || credit.clone().try_acquire_owned().expect("fresh");
        let Ok(_slot) = self.streams.clone().try_acquire_owned() else {
            let _ = send(self.frame(feed, Status::Busy, request_id, 0, |_| {}), fresh());
            return;
        };
        let mut watch = feed.watch(&self.watches);
        if from_lsn > *watch.borrow() + 1 {
            let _ = send(self.frame(feed, Status::LsnUnavailable, request_id, 0, |_| {}), fresh());
            return;
        }
        let dir = self.dir.clone();
        let opened = tokio::task::spawn_blocking(move || LogCursor::open(&dir, from_lsn)).await;
        let mut cursor = match opened.expect("cursor open does not panic") {
            Ok(cursor) => cursor,
            Err(e) => {
                tracing::warn!(from_lsn, error = %e, "stream refused");
                let _ = send(self.frame(feed, Status::LsnUnavailable, request_id, 0, |_| {}), fresh());
                return;
            }
        };
        tracing::info!(from_lsn, "log stream started");
        // The first frame goes out at once, even with no record to send, so
        // the consumer learns the durable LSN (and its lag) immediately.
        let mut first = true;
        loop {
            let upto = *watch.borrow_and_update();
            let Ok(permit) = credit.clone().acquire_owned().await else { return };
            if cursor.next_lsn() > upto && std::mem::take(&mut first) {
                if send(self.frame(feed, Status::Ok, request_id, 0, |_| {}), permit).is_err() {
                    return;
                }
                continue;
            }
            if cursor.next_lsn() > upto {
                // Caught up: wait for more, or send a heartbeat.
                match tokio::time::timeout(Duration::from_millis(REPLICATION_HEARTBEAT_MS), watch.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => {
                        // The log writer stopped: the server is shutting
                        // down. Say so, so the consumer reconnects later.
                        let _ = send(self.frame(feed, Status::ShuttingDown, request_id, 0, |_| {}), permit);
                        return;
                    }
                    Err(_) => {
                        if send(self.frame(feed, Status::Ok, request_id, 0, |_| {}), permit).is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            let header = feed.header_at(self, Status::Ok, upto);
            let read = move |mut cursor: LogCursor| {
                let mut body = BytesMut::with_capacity(FRAME_BODY_BYTES_MAX + 64);
                let result = read_frame(&mut cursor, feed, header, request_id, upto, &mut body);
                (cursor, result.map(|()| body.freeze()))
            };
            // A stream at the head of the log reads what the writer has
            // just written: in the page cache, a copy of microseconds, done
            // here. A hop to the blocking pool and back cost a standby more
            // than that in wake-ups on every frame, and every reply waits
            // for the standby. Further back the read may go to disk: off
            // the runtime.
            let (returned, result) = if upto - cursor.next_lsn() < STREAM_INLINE_READ_RECORDS {
                read(cursor)
            } else {
                tokio::task::spawn_blocking(move || read(cursor)).await.expect("log read does not panic")
            };
            cursor = returned;
            match result {
                Ok(frame) => {
                    if send(frame, permit).is_err() {
                        return; // the consumer went away
                    }
                    stream.sent.fetch_max(cursor.next_lsn() - 1, Ordering::AcqRel);
                }
                Err(e) => {
                    let status = match e {
                        CursorError::Unavailable { .. } => Status::LsnUnavailable,
                        _ => Status::InternalError,
                    };
                    tracing::error!(error = %e, "log stream stopped");
                    let _ = send(self.frame(feed, status, request_id, 0, |_| {}), permit);
                    return;
                }
            }
        }
    }

    /// One frame of `feed` with `status` and `count` records that
    /// `records` appends.
    fn frame(
        &self,
        feed: Feed,
        status: Status,
        request_id: u64,
        count: u32,
        records: impl FnOnce(&mut BytesMut),
    ) -> Bytes {
        let upto = *feed.watch(&self.watches).borrow();
        let header = feed.header_at(self, status, upto);
        let mut buf = BytesMut::new();
        encode_frame_with(&mut buf, feed.opcode(), request_id, |body| {
            header.encode(count, body);
            records(body);
        });
        buf.freeze()
    }

    /// End a REPLICATE request at once with a LOG_BATCH carrying `status`.
    pub fn refuse_replicate(&self, status: Status, request_id: u64, tx: &ConnTx) {
        self.refuse_stream(Feed::Consumer, status, request_id, tx);
    }

    fn refuse_stream(&self, feed: Feed, status: Status, request_id: u64, tx: &ConnTx) {
        let credit = Arc::new(Semaphore::new(1)).try_acquire_owned().expect("a fresh semaphore has a permit");
        let _ = tx.send(Outbound::Frame { bytes: self.frame(feed, status, request_id, 0, |_| {}), credit });
    }

    /// SNAPSHOT_FETCH: send our newest snapshot file in chunks, with the
    /// term of its last record, so a new standby can start from it.
    pub async fn snapshot_fetch(self: Arc<Self>, request_id: u64, tx: ConnTx) {
        let credit = Arc::new(Semaphore::new(REPLICATION_FRAMES_INFLIGHT_MAX));
        let frame = |chunk: SnapshotChunk| {
            let mut buf = BytesMut::new();
            encode_frame_with(&mut buf, Opcode::SnapshotFetch.reply(), request_id, |body| chunk.encode(body));
            buf.freeze()
        };
        let refusal = |status| SnapshotChunk {
            status,
            last: true,
            lsn: 0,
            term: 0,
            offset: 0,
            total_bytes: 0,
            data: Bytes::new(),
        };
        if !self.cluster.decides() {
            let _ = tx.send(Outbound::Frame {
                bytes: frame(refusal(Status::NotLeader)),
                credit: credit.try_acquire_owned().expect("fresh"),
            });
            return;
        }
        let dir = self.dir.clone();
        let newest = tokio::task::spawn_blocking(move || -> std::io::Result<Option<(u64, Vec<u8>)>> {
            match crate::wal::snapshot::list_snapshots(&dir)?.first() {
                Some((lsn, path)) => Ok(Some((*lsn, std::fs::read(path)?))),
                None => Ok(None),
            }
        })
        .await
        .expect("snapshot read does not panic");
        let (lsn, bytes) = match newest {
            Ok(Some(found)) => found,
            Ok(None) => {
                let _ = tx.send(Outbound::Frame {
                    bytes: frame(refusal(Status::LsnUnavailable)),
                    credit: credit.try_acquire_owned().expect("fresh"),
                });
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "SNAPSHOT_FETCH: cannot read the snapshot");
                let _ = tx.send(Outbound::Frame {
                    bytes: frame(refusal(Status::InternalError)),
                    credit: credit.try_acquire_owned().expect("fresh"),
                });
                return;
            }
        };
        let term = history::term_of(&self.cluster.history.lock(), lsn);
        let total_bytes = bytes.len() as u64;
        let bytes = Bytes::from(bytes);
        let mut offset = 0;
        loop {
            let end = (offset + SNAPSHOT_CHUNK_BYTES_MAX).min(bytes.len());
            let chunk = SnapshotChunk {
                status: Status::Ok,
                last: end == bytes.len(),
                lsn,
                term,
                offset: offset as u64,
                total_bytes,
                data: bytes.slice(offset..end),
            };
            let Ok(permit) = credit.clone().acquire_owned().await else { return };
            if tx.send(Outbound::Frame { bytes: frame(chunk), credit: permit }).is_err() || end == bytes.len() {
                return;
            }
            offset = end;
        }
    }

    /// STATE_DUMP: rebuild the state at the synced LSN and send it in chunks.
    pub async fn state_dump(self: Arc<Self>, request_id: u64, tx: ConnTx) {
        let credit = Arc::new(Semaphore::new(REPLICATION_FRAMES_INFLIGHT_MAX));
        let chunk_frame = |status: Status, last: bool, lsn: u64, now_ms: u64, entries: Vec<DumpEntry>| {
            let mut buf = BytesMut::new();
            let chunk = DumpChunk { status, last, lsn, server_time_ms: now_ms, entries };
            encode_frame_with(&mut buf, Opcode::StateDump.reply(), request_id, |body| chunk.encode(body));
            buf.freeze()
        };
        let now_ms = self.clock.now_ms();
        let Ok(_gate) = self.dumps.clone().try_acquire_owned() else {
            let frame = chunk_frame(Status::Busy, true, 0, now_ms, Vec::new());
            let _ = tx.send(Outbound::Frame { bytes: frame, credit: credit.try_acquire_owned().expect("fresh") });
            return;
        };
        let lsn = self.synced_lsn();
        let dir = self.dir.clone();
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || crate::recovery::state_at(&dir, lsn)).await;
        let images = match loaded.expect("state rebuild does not panic") {
            Ok(images) => images,
            Err(e) => {
                tracing::error!(error = %e, lsn, "STATE_DUMP failed");
                let frame = chunk_frame(Status::InternalError, true, lsn, now_ms, Vec::new());
                let _ = tx.send(Outbound::Frame { bytes: frame, credit: credit.try_acquire_owned().expect("fresh") });
                return;
            }
        };
        tracing::info!(lsn, sales = images.len(), elapsed_ms = started.elapsed().as_millis() as u64, "state dump");
        let mut entries = Vec::new();
        let mut bytes = DUMP_CHUNK_HEADER_BYTES;
        let all = images.into_iter().flat_map(dump_entries);
        let mut all = all.peekable();
        while let Some(entry) = all.next() {
            bytes += entry.encoded_len();
            entries.push(entry);
            let next_fits = all.peek().is_some_and(|n| bytes + n.encoded_len() <= FRAME_BODY_BYTES_MAX);
            if next_fits {
                continue;
            }
            let last = all.peek().is_none();
            let Ok(permit) = credit.clone().acquire_owned().await else { return };
            let frame = chunk_frame(Status::Ok, last, lsn, now_ms, std::mem::take(&mut entries));
            if tx.send(Outbound::Frame { bytes: frame, credit: permit }).is_err() {
                return;
            }
            bytes = DUMP_CHUNK_HEADER_BYTES;
            if last {
                return;
            }
        }
        // No sale at all: one empty, last chunk.
        let Ok(permit) = credit.acquire_owned().await else { return };
        let _ = tx.send(Outbound::Frame { bytes: chunk_frame(Status::Ok, true, lsn, now_ms, entries), credit: permit });
    }
}

/// A sale's entries for STATE_DUMP: the sale, then its reservations by id.
fn dump_entries(image: SaleImage) -> impl Iterator<Item = DumpEntry> {
    let sale = DumpEntry::Sale(SaleEntry {
        sku: image.sku,
        total: image.total,
        available: image.available,
        reserved: image.reserved,
        sold: image.sold,
        limit_per_user: image.limit_per_user,
        ttl_ms: image.ttl_ms,
        hot: image.hot,
        paused: image.paused,
    });
    let sku = image.sku;
    // A sale with one location, id 0, and no regions has no LOCATION entries.
    let plain = image.regions.is_empty() && image.locations.len() == 1 && image.locations[0].location == 0;
    let locations = image.locations.into_iter().filter(move |_| !plain).map(move |l| {
        DumpEntry::Location(LocationEntry {
            sku,
            location: l.location,
            total: l.total,
            available: l.available,
            reserved: l.reserved,
            sold: l.sold,
        })
    });
    std::iter::once(sale).chain(locations).chain(image.reservations.into_iter().map(move |r| {
        DumpEntry::Reservation(ReservationEntry {
            sku,
            reservation_id: r.id,
            user: r.user,
            qty: r.qty,
            state: r.state,
            expires_at_ms: r.expires_at_ms,
            settled_at_ms: r.settled_at_ms,
            payment_ref: r.payment_ref.unwrap_or_default(),
            location: r.location,
        })
    }))
}
