//! Reading the log while it is written: the replication stream's cursor.
//!
//! A [`LogCursor`] walks the segment files from a starting LSN and copies
//! whole records, byte for byte, into an output buffer, up to a limit LSN
//! the caller knows to be synced. Records at or below the synced LSN are
//! complete in the file (the writer wrote them before it synced), so the
//! cursor never sees a half-written record it would have to send; it stops
//! before anything newer. Each record's checksum is verified before it is
//! sent, so a disk error is reported here rather than downstream.
//!
//! A preallocated segment has zeros after its records, and a buffer read
//! while the writer was appending may hold a record half written and
//! zeros after it: before calling anything invalid (or the end of the
//! segment), the cursor reads the file again from that record.
//!
//! Segments are found by name: a closed segment continues in the one named
//! after the next LSN. A segment deleted by retention while the cursor was
//! still before it makes the cursor fail with `Unavailable`.

use std::path::{Path, PathBuf};

use bytes::BytesMut;

use crate::storage::{self, File};
use crate::wal::record::{decode_record, RecordError, RECORD_HEADER_BYTES};
use crate::wal::segment::{list_segments, segment_name, SEGMENT_HEADER_BYTES};

/// Bytes read from a segment file per `read(2)`.
const READ_CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("LSN {lsn} is not in the log (it holds {oldest}..)")]
    Unavailable { lsn: u64, oldest: u64 },
    #[error("log record at LSN {lsn} in {segment}: {reason}")]
    Corrupt { lsn: u64, segment: PathBuf, reason: String },
    #[error("i/o error reading the log: {0}")]
    Io(#[from] std::io::Error),
}

pub struct LogCursor {
    dir: PathBuf,
    /// LSN of the next record to hand out.
    next_lsn: u64,
    segment: PathBuf,
    file: File,
    /// Bytes read from `file` and not yet consumed, from `pending_at`.
    pending: Vec<u8>,
    pending_at: usize,
    /// The file offset of `pending[0]`.
    pending_offset: u64,
}

impl LogCursor {
    /// Position a cursor at `from_lsn` (the next record it returns).
    pub fn open(dir: &Path, from_lsn: u64) -> Result<LogCursor, CursorError> {
        let segments = list_segments(dir)?;
        let oldest = segments.first().map_or(from_lsn, |(first, _)| *first);
        let Some((_, path)) = segments.iter().rev().find(|(first, _)| *first <= from_lsn) else {
            return Err(CursorError::Unavailable { lsn: from_lsn, oldest });
        };
        let file = storage::open_read(path)?;
        let mut cursor = LogCursor {
            dir: dir.to_path_buf(),
            next_lsn: from_lsn,
            segment: path.clone(),
            file,
            pending: Vec::with_capacity(READ_CHUNK_BYTES),
            pending_at: 0,
            pending_offset: SEGMENT_HEADER_BYTES as u64,
        };
        // Skip the records of this segment before from_lsn.
        cursor.skip_before(from_lsn)?;
        Ok(cursor)
    }

    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    fn skip_before(&mut self, from_lsn: u64) -> Result<(), CursorError> {
        loop {
            let peeked = match self.peek() {
                // The record at `from_lsn` may be the one being written
                // right now (a stream may start just past the synced LSN):
                // half of it and zeros is not damage. Stop here; `read`
                // looks again once it is synced, and reports a record that
                // is still invalid then.
                Err(CursorError::Corrupt { .. }) => return Ok(()),
                other => other?,
            };
            let Some((lsn, used)) = peeked else {
                // The segment ended before from_lsn: from_lsn is the first
                // record of the next segment or beyond the log's end; the
                // next read finds out which.
                return Ok(());
            };
            if lsn >= from_lsn {
                return Ok(());
            }
            self.pending_at += used;
        }
    }

    /// The LSN and size of the next complete record in this segment, or
    /// `None` at the end of the segment's written bytes.
    fn peek(&mut self) -> Result<Option<(u64, usize)>, CursorError> {
        let mut reread = false;
        loop {
            let available = &self.pending[self.pending_at..];
            match decode_record(available) {
                Ok((lsn, _, used)) => return Ok(Some((lsn, used))),
                Err(RecordError::Truncated { .. }) => {
                    if !self.fill()? {
                        return Ok(None);
                    }
                }
                Err(_) if !reread => {
                    // Stale bytes (see the module doc): once more, fresh.
                    self.reread()?;
                    reread = true;
                }
                // Zeros where a record would start, read fresh: the
                // preallocated rest of the segment.
                Err(_) if available[..RECORD_HEADER_BYTES].iter().all(|&b| b == 0) => return Ok(None),
                Err(e) => {
                    let lsn = if available.len() >= RECORD_HEADER_BYTES {
                        u64::from_le_bytes(available[4..12].try_into().expect("8 bytes"))
                    } else {
                        self.next_lsn
                    };
                    return Err(CursorError::Corrupt { lsn, segment: self.segment.clone(), reason: e.to_string() });
                }
            }
        }
    }

    /// Drop the buffer from the next record on and read the file again
    /// from there.
    fn reread(&mut self) -> std::io::Result<()> {
        let offset = self.pending_offset + self.pending_at as u64;
        self.pending.clear();
        self.pending_at = 0;
        self.pending_offset = offset;
        self.fill()?;
        Ok(())
    }

    /// Read more of the current file; false at its end.
    fn fill(&mut self) -> std::io::Result<bool> {
        self.pending.drain(..self.pending_at);
        self.pending_offset += self.pending_at as u64;
        self.pending_at = 0;
        let start = self.pending.len();
        self.pending.resize(start + READ_CHUNK_BYTES, 0);
        let n = self.file.read_at(&mut self.pending[start..], self.pending_offset + start as u64)?;
        self.pending.truncate(start + n);
        Ok(n > 0)
    }

    /// Move to the segment that starts at `next_lsn`.
    fn next_segment(&mut self) -> Result<(), CursorError> {
        let path = self.dir.join(segment_name(self.next_lsn));
        let file = match storage::open_read(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let oldest = list_segments(&self.dir)?.first().map_or(self.next_lsn, |(first, _)| *first);
                return Err(CursorError::Unavailable { lsn: self.next_lsn, oldest });
            }
            Err(e) => return Err(e.into()),
        };
        self.file = file;
        self.segment = path;
        self.pending.clear();
        self.pending_at = 0;
        self.pending_offset = SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    /// Append whole records `next_lsn..=upto` to `out`, stopping before
    /// `out` would exceed `max_bytes`. Returns how many were appended.
    /// `upto` must be synced: every record up to it is complete on disk.
    pub fn read(&mut self, upto: u64, max_bytes: usize, out: &mut BytesMut) -> Result<u32, CursorError> {
        let mut count = 0;
        while self.next_lsn <= upto {
            let Some((lsn, used)) = self.peek()? else {
                // The segment ends before `next_lsn`: the record must open
                // the next segment. If that is the one we are in, the log
                // does not hold what `upto` promised (a caller's error, or
                // damage): say so rather than open it again forever.
                let ended = self.segment.clone();
                self.next_segment()?;
                if self.segment == ended {
                    return Err(CursorError::Corrupt {
                        lsn: self.next_lsn,
                        segment: ended,
                        reason: format!(
                            "the log ends before LSN {}, which was to be readable up to {upto}",
                            self.next_lsn
                        ),
                    });
                }
                continue;
            };
            if lsn != self.next_lsn {
                return Err(CursorError::Corrupt {
                    lsn,
                    segment: self.segment.clone(),
                    reason: format!("expected LSN {}", self.next_lsn),
                });
            }
            if out.len() + used > max_bytes {
                break;
            }
            out.extend_from_slice(&self.pending[self.pending_at..self.pending_at + used]);
            self.pending_at += used;
            self.next_lsn += 1;
            count += 1;
        }
        Ok(count)
    }
}
