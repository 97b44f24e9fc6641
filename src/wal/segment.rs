//! Segment files: naming, the segment header, and scanning with the
//! torn-tail / corruption distinction recovery depends on.
//!
//! # Format
//!
//! A segment is `wal-<first_lsn, 20 digits>.seg` in the data dir:
//! ```text
//!  0  8 magic          b"STMPWAL\0"
//!  8  4 version        u32 = 1
//! 12  4 reserved       0
//! 16  8 first_lsn      u64, LSN of the segment's first record
//! 24  4 reserved       0
//! 28  4 header_crc32c  CRC-32C of bytes 0..28
//! 32  ... records back to back (see record.rs), no padding
//! ...  zeros to the end of the file (a preallocated segment)
//! ```
//!
//! Segments after the first of a run are **preallocated**: a helper thread
//! zero-fills and syncs a spare file (`wal-spare.ready`) ahead of time, and a
//! rotation renames it into place and writes its header. Records then
//! overwrite zeros, so `fdatasync` has no file size or block allocation to
//! write back: only the data. The records end where the zeros begin: an
//! all-zero record header is never a valid record (its checksum is not
//! zero), so "every remaining byte is zero" marks the clean end exactly.

use std::path::{Path, PathBuf};

use crate::engine::Event;
use crate::limits::TORN_WRITE_ALIGN_BYTES;
use crate::storage::{self, Create, File};
use crate::wal::record::{decode_record, verify_record, RecordError};

pub const SEGMENT_MAGIC: [u8; 8] = *b"STMPWAL\0";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_BYTES: usize = 32;

/// The preallocated spare segment, ready to be renamed into place (kept
/// across restarts: it is all zeros).
pub const SPARE_NAME: &str = "wal-spare.ready";
/// The spare while it is being zero-filled (removed at start if left).
pub const SPARE_PARTIAL_NAME: &str = "wal-spare.partial";

pub fn segment_name(first_lsn: u64) -> String {
    format!("wal-{first_lsn:020}.seg")
}

/// Segments in `dir`, sorted by first LSN.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    crate::wal::list_by_lsn(dir, "wal-", ".seg")
}

pub fn encode_header(first_lsn: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut head = [0u8; SEGMENT_HEADER_BYTES];
    head[0..8].copy_from_slice(&SEGMENT_MAGIC);
    head[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    head[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32c::crc32c(&head[0..28]);
    head[28..32].copy_from_slice(&crc.to_le_bytes());
    head
}

/// Create a new segment file, write its header and make both the file and
/// its directory entry durable.
/// The file grows as records are written (the writer writes at explicit
/// offsets, never in append mode, so preallocated and growing segments are
/// written alike).
pub fn create_segment(dir: &Path, first_lsn: u64) -> std::io::Result<File> {
    let path = dir.join(segment_name(first_lsn));
    let file = storage::create(&path, Create::New)?;
    file.write_all_at(&encode_header(first_lsn), 0)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

/// Zero-fill and sync a spare segment of `bytes` (the preallocation helper
/// thread; never on the write path). Written under a partial name and
/// renamed when complete, so a spare that exists is whole.
pub fn prepare_spare(dir: &Path, bytes: u64) -> std::io::Result<()> {
    let ready = dir.join(SPARE_NAME);
    if storage::exists(&ready) {
        return Ok(());
    }
    let partial = dir.join(SPARE_PARTIAL_NAME);
    let result = (|| {
        let file = storage::create(&partial, Create::Truncate)?;
        // Real zeros, not fallocate: an unwritten extent would still need
        // its conversion written back at the first fdatasync over it.
        let zeros = vec![0u8; (1 << 20).min(bytes as usize)];
        let mut at = 0;
        while at < bytes {
            let n = (bytes - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        storage::rename(&partial, &ready)
    })();
    if result.is_err() {
        // A full disk: give the space back; rotation creates a growing
        // segment instead.
        let _ = storage::remove(&partial);
    }
    result
}

/// The next segment: the spare renamed into place with its header written
/// and synced, or, with no spare ready, a new growing one. The flag says
/// which (`true`: preallocated).
pub fn install_segment(dir: &Path, first_lsn: u64) -> std::io::Result<(File, bool)> {
    let spare = dir.join(SPARE_NAME);
    let path = dir.join(segment_name(first_lsn));
    match storage::rename(&spare, &path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((create_segment(dir, first_lsn)?, false)),
        Err(e) => return Err(e),
    }
    // A crash before this header is synced leaves a segment of zeros: a
    // torn header, which recovery drops (see `scan_segment`).
    let file = storage::open(&path)?;
    file.write_all_at(&encode_header(first_lsn), 0)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok((file, true))
}

/// fsync a directory, so a created, renamed or deleted entry is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    storage::sync_dir(dir)
}

/// How a segment scan ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belonged to a valid record.
    Clean,
    /// Invalid bytes from `offset` to the end, with no valid record after
    /// them: the tail of a write cut short by a crash. Safe to truncate:
    /// it was never fsynced, so never acknowledged.
    TornTail { offset: u64, dropped_bytes: u64, reason: String },
    /// An invalid record at `offset` with valid data after it (or a broken
    /// header or LSN sequence): damage that truncation would turn into loss
    /// of acknowledged records.
    Corrupt { offset: u64, reason: String },
}

/// What scanning one segment found.
#[derive(Debug)]
pub struct Scan {
    pub first_lsn: u64,
    /// LSN of the last valid record (first_lsn - 1 if none).
    pub last_lsn: u64,
    /// Bytes of header plus valid records.
    pub valid_bytes: u64,
    pub end: ScanEnd,
}

/// Read `path` and hand every valid record from LSN `decode_from` on to
/// `visit` in order; records before it are checked (length, checksum, LSN)
/// but not decoded (a snapshot covers them: decoding is most of the cost of
/// reading a record). `expect_lsn` is the LSN the first record must carry
/// (continuity across segments). `buf` is reused across calls so replaying
/// many segments does not fault in (and zero) fresh memory for each one.
pub fn scan_segment(
    path: &Path,
    expect_lsn: u64,
    decode_from: u64,
    buf: &mut Vec<u8>,
    mut visit: impl FnMut(u64, Event),
) -> std::io::Result<Scan> {
    buf.clear();
    storage::read_into(path, buf)?;
    let bytes: &[u8] = buf;
    let header_problem = if bytes.len() < SEGMENT_HEADER_BYTES {
        Some(format!("segment header truncated ({} bytes)", bytes.len()))
    } else if bytes[0..8] != SEGMENT_MAGIC {
        Some("bad segment magic".to_string())
    } else if crc32c::crc32c(&bytes[0..28]) != u32::from_le_bytes(bytes[28..32].try_into().expect("4")) {
        Some("segment header checksum mismatch".to_string())
    } else if u32::from_le_bytes(bytes[8..12].try_into().expect("4")) != SEGMENT_VERSION {
        Some(format!(
            "segment format version {} (this binary reads {SEGMENT_VERSION})",
            u32::from_le_bytes(bytes[8..12].try_into().expect("4"))
        ))
    } else {
        None
    };
    let named_lsn = expect_lsn;
    if let Some(reason) = header_problem {
        // A segment created by a crashed rotation can have a torn header
        // (short, or zeros where the file grew but the write did not land);
        // its header is synced before any record goes in, so it never held
        // one: a torn tail at offset 0.
        let end = if bytes.iter().all(|&b| b == 0) {
            // (A spare renamed into place before its header was synced:
            // nothing but preallocated zeros to drop.)
            ScanEnd::TornTail { offset: 0, dropped_bytes: 0, reason }
        } else if bytes.len() < SEGMENT_HEADER_BYTES {
            ScanEnd::TornTail { offset: 0, dropped_bytes: bytes.len() as u64, reason }
        } else {
            ScanEnd::Corrupt { offset: 0, reason }
        };
        return Ok(Scan { first_lsn: named_lsn, last_lsn: named_lsn.saturating_sub(1), valid_bytes: 0, end });
    }
    let first_lsn = u64::from_le_bytes(bytes[16..24].try_into().expect("8"));
    let mut scan = Scan {
        first_lsn,
        last_lsn: first_lsn.saturating_sub(1),
        valid_bytes: SEGMENT_HEADER_BYTES as u64,
        end: ScanEnd::Clean,
    };
    if first_lsn != expect_lsn {
        // Nothing of this segment is usable: the last valid LSN is the one
        // before it, not what its header claims.
        scan.last_lsn = expect_lsn.saturating_sub(1);
        scan.end = ScanEnd::Corrupt {
            offset: 16,
            reason: format!("segment starts at LSN {first_lsn}, expected {expect_lsn}"),
        };
        return Ok(scan);
    }
    let mut at = SEGMENT_HEADER_BYTES;
    let mut next_lsn = first_lsn;
    // Where the preallocated zeros begin: past it no record can start.
    let data_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    while at < bytes.len() {
        if at >= data_end {
            // Every remaining byte is zero: the clean end of a
            // preallocated segment (or a torn write that never reached
            // this far; either way nothing was acknowledged past `at`).
            break;
        }
        let record = if next_lsn < decode_from {
            verify_record(&bytes[at..]).map(|(lsn, used)| (lsn, None, used))
        } else {
            decode_record(&bytes[at..]).map(|(lsn, event, used)| (lsn, Some(event), used))
        };
        match record {
            Ok((lsn, event, used)) if lsn == next_lsn => {
                if let Some(event) = event {
                    visit(lsn, event);
                }
                at += used;
                next_lsn += 1;
            }
            Ok((lsn, ..)) => {
                scan.end =
                    ScanEnd::Corrupt { offset: at as u64, reason: format!("record LSN {lsn}, expected {next_lsn}") };
                break;
            }
            Err(error) => {
                scan.end = classify_failure(bytes, at, next_lsn, &error);
                break;
            }
        }
    }
    scan.last_lsn = next_lsn - 1;
    scan.valid_bytes = at as u64;
    Ok(scan)
}

/// A bad record is a torn tail only if no valid record with a later LSN
/// appears anywhere after it *and* its bytes are what an interrupted write
/// leaves (`tail_kind`); otherwise it is damage that may have hit an
/// acknowledged record, and recovery must not drop it silently.
fn classify_failure(bytes: &[u8], at: usize, next_lsn: u64, error: &RecordError) -> ScanEnd {
    let reason = error.to_string();
    // Past the last non-zero byte no record can start (preallocated zeros).
    let data_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    let later_valid = (at + 1..data_end).any(|probe| {
        matches!(decode_record(&bytes[probe..]), Ok((lsn, _, _)) if lsn >= next_lsn && lsn < next_lsn + (1 << 40))
    });
    if later_valid {
        return ScanEnd::Corrupt { offset: at as u64, reason: format!("{reason}, and valid records follow") };
    }
    match tail_kind(&bytes[at..], at, next_lsn, error) {
        Tail::Torn(why) => ScanEnd::TornTail {
            offset: at as u64,
            dropped_bytes: torn_bytes(&bytes[at..]) as u64,
            reason: format!("{reason}: {why}"),
        },
        Tail::Damaged(why) => ScanEnd::Corrupt { offset: at as u64, reason: format!("{reason}: {why}") },
    }
}

/// The bytes of a torn record at the start of `rest`: as far as its header
/// says it reaches (or the whole rest, if the header is cut short or
/// impossible), not counting the preallocated zeros after it.
fn torn_bytes(rest: &[u8]) -> usize {
    use crate::limits::RECORD_PAYLOAD_BYTES_MAX;
    use crate::wal::record::RECORD_HEADER_BYTES;
    let extent = match rest.get(12..16) {
        Some(len) => match u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize {
            len if len <= RECORD_PAYLOAD_BYTES_MAX => (RECORD_HEADER_BYTES + len).min(rest.len()),
            _ => rest.len(),
        },
        None => rest.len(),
    };
    if rest[extent..].iter().all(|&b| b == 0) {
        extent
    } else {
        rest.len()
    }
}

/// What the invalid bytes at the end of the last segment are.
enum Tail {
    /// What an interrupted write leaves: never fsynced, never acknowledged.
    Torn(&'static str),
    /// A complete record that is wrong: it may have been acknowledged.
    Damaged(String),
}

/// Tell a torn write from a damaged record at the end of the log. `rest`
/// starts at the first invalid record, at byte `offset` of the segment,
/// and runs to the end of the file; no valid record follows.
///
/// - Fewer bytes than a record header, or a record whose declared length
///   runs past the end of the file: cut short, **torn**.
/// - A complete record (its length fits in the file) that one flipped bit
///   would make valid: **damaged** (this catches a flip in the length
///   field that makes a complete record look cut short, too).
/// - A complete record whose bytes, from a sector boundary inside it to the
///   end of the file, are all zeros: the rest of the write never reached
///   the disk (a power loss after the file grew), **torn**.
/// - Anything else (an impossible length, a checksummed payload that does
///   not decode, a complete record that fails its checksum with no zero
///   run): **damaged**.
fn tail_kind(rest: &[u8], offset: usize, next_lsn: u64, error: &RecordError) -> Tail {
    use crate::limits::RECORD_PAYLOAD_BYTES_MAX;
    use crate::wal::record::RECORD_HEADER_BYTES;
    if let RecordError::BadPayload(_) = error {
        return Tail::Damaged("its checksum is valid, so it was written whole; it may have been acknowledged".into());
    }
    if rest.len() < RECORD_HEADER_BYTES {
        return Tail::Torn("the record header is cut short by the end of the segment");
    }
    if let Some(bit) = single_flip_repair(rest, next_lsn) {
        return Tail::Damaged(format!(
            "flipping bit {} of byte {} makes it a valid record for LSN {next_lsn}: a complete record, damaged \
             after it was written; it may have been acknowledged",
            bit % 8,
            offset + bit / 8
        ));
    }
    let len = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes")) as usize;
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Tail::Damaged(
            "an impossible length in a complete header, which no interrupted write leaves; it may have been \
             acknowledged"
                .into(),
        );
    }
    let total = RECORD_HEADER_BYTES + len;
    if total > rest.len() {
        return Tail::Torn("the record is cut short by the end of the segment");
    }
    // Where the run of zeros that ends the file starts, rounded up to the
    // next sector boundary: from there on nothing reached the disk.
    let zeros_from = rest.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    let aligned = (offset + zeros_from).next_multiple_of(TORN_WRITE_ALIGN_BYTES) - offset;
    if zeros_from == 0 || aligned < total {
        return Tail::Torn("the record ends in zeros from a sector boundary to the end of the segment");
    }
    Tail::Damaged("a complete record that fails its checksum; it may have been acknowledged".into())
}

/// The bit (counted from the start of `rest`) whose flip turns the bytes at
/// the start of `rest` into a valid record with LSN `lsn`, if there is one.
/// Tries the header's bits and the payload's (as the stored length declares
/// it); a flip in the length field changes how many bytes the record spans.
/// Runs only on the failure path (at most ~33k checksums of 4 KiB).
fn single_flip_repair(rest: &[u8], lsn: u64) -> Option<usize> {
    use crate::limits::RECORD_PAYLOAD_BYTES_MAX;
    use crate::wal::record::RECORD_HEADER_BYTES;
    let mut copy = rest[..rest.len().min(RECORD_HEADER_BYTES + RECORD_PAYLOAD_BYTES_MAX)].to_vec();
    let declared = u32::from_le_bytes(copy[12..16].try_into().expect("4 bytes")) as usize;
    let span =
        if RECORD_HEADER_BYTES + declared <= copy.len() { RECORD_HEADER_BYTES + declared } else { RECORD_HEADER_BYTES };
    (0..span * 8).find(|&bit| {
        copy[bit / 8] ^= 1 << (bit % 8);
        let valid = matches!(decode_record(&copy), Ok((found, _, _)) if found == lsn);
        copy[bit / 8] ^= 1 << (bit % 8);
        valid
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_all_zero_header_is_never_a_record() {
        // The clean end of a preallocated segment rests on this.
        assert!(crate::wal::record::verify_record(&[0u8; 64]).is_err());
        assert!(decode_record(&[0u8; 64]).is_err());
    }
}
