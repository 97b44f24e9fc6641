//! Log replication: REPLICATE (0x30) streams the server's write-ahead log
//! from an LSN, and SETTLED (0x31) reports how far the consumer (the
//! reconciler) has durably applied it, which lets the server delete older
//! log segments.
//!
//! # Format
//!
//! REPLICATE request body, 8 bytes:
//! ```text
//!  0  8 from_lsn  u64, first LSN wanted (>= 1)
//! ```
//! The server answers with a *stream* of LOG_BATCH frames (opcode 0xb0, the
//! REPLICATE's request id), one after another for as long as the connection
//! stays open: first the records already in the log, then new ones as they
//! become durable. Only records that are on disk (fdatasync'ed) are sent.
//! When nothing new arrives for `REPLICATION_HEARTBEAT_MS`, a batch with no
//! records is sent, so the consumer can tell an idle log from a dead link.
//!
//! LOG_BATCH body, 22 + n bytes:
//! ```text
//!  0  2 status          u16: ok, or why the stream ends: lsn_unavailable, busy
//!                       (too many streams), shutting_down, internal_error
//!  2  8 durable_lsn     u64, the server's highest durable LSN when it sent this frame
//! 10  8 server_time_ms  u64, the server's clock (unix ms) when it sent this frame
//! 18  4 count           u32, records that follow (0: heartbeat or error)
//! 22  n records         `count` log records back to back, exactly as the
//!                       write-ahead log stores them (see [`crate::record`]),
//!                       LSNs consecutive, the first one continuing the previous frame
//! ```
//!
//! SETTLED request body, 8 bytes:
//! ```text
//!  0  8 settled_lsn  u64, every record <= this is durably applied downstream
//! ```
//! Reply: the common outcome body (`status`, `detail` = settled_lsn), `ok`
//! or `invalid_argument` when settled_lsn is beyond the durable log.

use bytes::{BufMut, BytesMut};

use crate::event::Event;
use crate::record::{decode_record, encode_record};
use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// REPLICATE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replicate {
    pub from_lsn: u64,
}

impl Replicate {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.from_lsn);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "REPLICATE");
        let from_lsn = r.u64()?;
        r.finish()?;
        if from_lsn == 0 {
            return Err(Malformed("REPLICATE: from_lsn must be >= 1".into()));
        }
        Ok(Replicate { from_lsn })
    }
}

/// SETTLED request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settled {
    pub settled_lsn: u64,
}

impl Settled {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.settled_lsn);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "SETTLED");
        let settled_lsn = r.u64()?;
        r.finish()?;
        Ok(Settled { settled_lsn })
    }
}

/// Bytes of a LOG_BATCH body before its records.
pub const LOG_BATCH_HEADER_BYTES: usize = 22;

/// One LOG_BATCH frame, decoded: every record's checksum verified and the
/// LSNs checked to be consecutive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogBatch {
    pub status: Status,
    pub durable_lsn: u64,
    pub server_time_ms: u64,
    pub records: Vec<(u64, Event)>,
}

impl LogBatch {
    /// Write the body header; the caller appends `count` raw records (the
    /// server copies them straight from its log segments).
    pub fn encode_header(status: Status, durable_lsn: u64, server_time_ms: u64, count: u32, dst: &mut BytesMut) {
        dst.put_u16_le(status.code());
        dst.put_u64_le(durable_lsn);
        dst.put_u64_le(server_time_ms);
        dst.put_u32_le(count);
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        LogBatch::encode_header(self.status, self.durable_lsn, self.server_time_ms, self.records.len() as u32, dst);
        for (lsn, event) in &self.records {
            encode_record(*lsn, event, dst);
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "LOG_BATCH");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let durable_lsn = r.u64()?;
        let server_time_ms = r.u64()?;
        let count = r.u32()? as usize;
        let mut rest = &body[LOG_BATCH_HEADER_BYTES..];
        // Each record is at least its 16-byte header: bound the allocation
        // by what the body can actually hold, not by the declared count.
        let mut records = Vec::with_capacity(count.min(rest.len() / crate::record::RECORD_HEADER_BYTES));
        for i in 0..count {
            let (lsn, event, used) =
                decode_record(rest).map_err(|e| Malformed(format!("LOG_BATCH record {i}: {e}")))?;
            if let Some((previous, _)) = records.last() {
                if lsn != previous + 1 {
                    return Err(Malformed(format!("LOG_BATCH record {i}: LSN {lsn} after {previous}")));
                }
            }
            records.push((lsn, event));
            rest = &rest[used..];
        }
        if !rest.is_empty() {
            return Err(Malformed(format!("LOG_BATCH: {} bytes after {count} records", rest.len())));
        }
        Ok(LogBatch { status, durable_lsn, server_time_ms, records })
    }
}
