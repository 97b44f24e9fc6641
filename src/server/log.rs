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
use stampede_protocol::message::dump::DUMP_CHUNK_HEADER_BYTES;
use stampede_protocol::message::replicate::LOG_BATCH_HEADER_BYTES;
use stampede_protocol::message::{DumpChunk, DumpEntry, LogBatch, Opcode, ReservationEntry, SaleEntry};
use stampede_protocol::Status;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::engine::SaleImage;
use crate::limits::{
    FRAME_BODY_BYTES_MAX, REPLICATION_FRAMES_INFLIGHT_MAX, REPLICATION_HEARTBEAT_MS, REPLICATION_STREAMS_MAX,
    STATE_DUMPS_CONCURRENT_MAX,
};
use crate::recovery::CONSUMER_LSN_FILE;
use crate::sink::ConnTx;
use crate::wal::follow::{CursorError, LogCursor};

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

/// What the log operations need from the running server.
pub struct LogService {
    dir: PathBuf,
    /// The synced LSN, published by the log writer after each fdatasync.
    synced: watch::Receiver<u64>,
    clock: Arc<dyn Clock>,
    streams: Arc<Semaphore>,
    dumps: Arc<Semaphore>,
    /// Serialises writes of `consumer.lsn` (a std mutex: held for one small
    /// file write, never across an await).
    consumer_file: std::sync::Mutex<u64>,
}

impl LogService {
    pub fn new(dir: PathBuf, synced: watch::Receiver<u64>, clock: Arc<dyn Clock>) -> LogService {
        let consumer = crate::recovery::consumer_lsn(&dir);
        LogService {
            dir,
            synced,
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

    pub fn synced_lsn(&self) -> u64 {
        *self.synced.borrow()
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
        let tmp = self.dir.join(format!("{CONSUMER_LSN_FILE}.tmp"));
        let written = std::fs::write(&tmp, format!("{settled_lsn}\n"))
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(CONSUMER_LSN_FILE)));
        match written {
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
            _ = self.stream_records(from_lsn, request_id, tx, &stream) => {}
        }
    }

    async fn stream_records(&self, from_lsn: u64, request_id: u64, tx: ConnTx, stream: &StreamState) {
        let credit = Arc::new(Semaphore::new(REPLICATION_FRAMES_INFLIGHT_MAX));
        let send = |body: Bytes, permit: OwnedSemaphorePermit| tx.send(Outbound::Frame { bytes: body, credit: permit });
        let Ok(_slot) = self.streams.clone().try_acquire_owned() else {
            let frame = self.log_batch_error(Status::Busy, request_id);
            let _ = send(frame, credit.clone().try_acquire_owned().expect("fresh"));
            return;
        };
        if from_lsn > self.synced_lsn() + 1 {
            let frame = self.log_batch_error(Status::LsnUnavailable, request_id);
            let _ = send(frame, credit.clone().try_acquire_owned().expect("fresh"));
            return;
        }
        let dir = self.dir.clone();
        let opened = tokio::task::spawn_blocking(move || LogCursor::open(&dir, from_lsn)).await;
        let mut cursor = match opened.expect("cursor open does not panic") {
            Ok(cursor) => cursor,
            Err(e) => {
                tracing::warn!(from_lsn, error = %e, "REPLICATE refused");
                let frame = self.log_batch_error(Status::LsnUnavailable, request_id);
                let _ = send(frame, credit.clone().try_acquire_owned().expect("fresh"));
                return;
            }
        };
        let mut synced = self.synced.clone();
        tracing::info!(from_lsn, "replication stream started");
        // The first frame goes out at once, even with no record to send, so
        // the consumer learns the durable LSN (and its lag) immediately.
        let mut first = true;
        loop {
            let upto = *synced.borrow_and_update();
            let Ok(permit) = credit.clone().acquire_owned().await else { return };
            if cursor.next_lsn() > upto && std::mem::take(&mut first) {
                if send(self.log_batch_frame(request_id, upto, 0, |_| {}), permit).is_err() {
                    return;
                }
                continue;
            }
            if cursor.next_lsn() > upto {
                // Caught up: wait for the next sync, or send a heartbeat.
                match tokio::time::timeout(Duration::from_millis(REPLICATION_HEARTBEAT_MS), synced.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => {
                        // The log writer stopped: the server is shutting
                        // down. Say so, so the consumer reconnects later.
                        let _ = send(self.log_batch_error(Status::ShuttingDown, request_id), permit);
                        return;
                    }
                    Err(_) => {
                        let frame = self.log_batch_frame(request_id, upto, 0, |_| {});
                        if send(frame, permit).is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            let now_ms = self.clock.now_ms();
            let read = tokio::task::spawn_blocking(move || {
                let mut body = BytesMut::with_capacity(FRAME_BODY_BYTES_MAX + 64);
                let result = LogService::encode_log_batch(&mut cursor, request_id, upto, now_ms, &mut body);
                (cursor, result.map(|()| body.freeze()))
            });
            let (returned, result) = read.await.expect("log read does not panic");
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
                    tracing::error!(error = %e, "replication stream stopped");
                    let _ = send(self.log_batch_error(status, request_id), permit);
                    return;
                }
            }
        }
    }

    /// One LOG_BATCH frame with as many records (up to `upto`) as fit.
    fn encode_log_batch(
        cursor: &mut LogCursor,
        request_id: u64,
        upto: u64,
        now_ms: u64,
        dst: &mut BytesMut,
    ) -> Result<(), CursorError> {
        let mut result = Ok(());
        encode_frame_with(dst, Opcode::Replicate.reply(), request_id, |body| {
            let start = body.len();
            LogBatch::encode_header(Status::Ok, upto, now_ms, 0, body);
            match cursor.read(upto, start + FRAME_BODY_BYTES_MAX, body) {
                Ok(count) => {
                    let at = start + LOG_BATCH_HEADER_BYTES - 4;
                    body[at..at + 4].copy_from_slice(&count.to_le_bytes());
                }
                Err(e) => result = Err(e),
            }
        });
        result
    }

    fn log_batch_frame(
        &self,
        request_id: u64,
        durable_lsn: u64,
        count: u32,
        records: impl FnOnce(&mut BytesMut),
    ) -> Bytes {
        let mut buf = BytesMut::new();
        encode_frame_with(&mut buf, Opcode::Replicate.reply(), request_id, |body| {
            LogBatch::encode_header(Status::Ok, durable_lsn, self.clock.now_ms(), count, body);
            records(body);
        });
        buf.freeze()
    }

    /// End a REPLICATE request at once with a LOG_BATCH carrying `status`.
    pub fn refuse_replicate(&self, status: Status, request_id: u64, tx: &ConnTx) {
        let credit = Arc::new(Semaphore::new(1)).try_acquire_owned().expect("a fresh semaphore has a permit");
        let _ = tx.send(Outbound::Frame { bytes: self.log_batch_error(status, request_id), credit });
    }

    fn log_batch_error(&self, status: Status, request_id: u64) -> Bytes {
        let mut buf = BytesMut::new();
        encode_frame_with(&mut buf, Opcode::Replicate.reply(), request_id, |body| {
            LogBatch::encode_header(status, self.synced_lsn(), self.clock.now_ms(), 0, body);
        });
        buf.freeze()
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
    std::iter::once(sale).chain(image.reservations.into_iter().map(move |r| {
        DumpEntry::Reservation(ReservationEntry {
            sku,
            reservation_id: r.id,
            user: r.user,
            qty: r.qty,
            state: r.state,
            expires_at_ms: r.expires_at_ms,
            settled_at_ms: r.settled_at_ms,
            payment_ref: r.payment_ref.unwrap_or_default(),
        })
    }))
}
