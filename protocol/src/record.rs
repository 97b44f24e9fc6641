//! Log record framing: an event payload wrapped with its LSN, length and a
//! CRC-32C. The server's write-ahead log stores records in this format and
//! the replication stream (REPLICATE) ships them unchanged, so a consumer
//! verifies the same checksum the log wrote.
//!
//! # Format
//!
//! A record (all integers little-endian):
//! ```text
//!  0  4 crc32c   CRC-32C of bytes 4..16+len (lsn, len and payload)
//!  4  8 lsn      u64, strictly increasing by 1 across the whole log
//! 12  4 len      u32, payload length, <= RECORD_PAYLOAD_BYTES_MAX
//! 16  len payload: one event (see [`crate::event`])
//! ```
//! The checksum covers the LSN and the length as well as the payload, so a
//! torn or misdirected write can never pass as a valid record.

use bytes::{BufMut, BytesMut};

use crate::event::{decode_event, encode_event, Event};
use crate::limits::RECORD_PAYLOAD_BYTES_MAX;

/// Bytes before the payload.
pub const RECORD_HEADER_BYTES: usize = 16;

/// Append one complete record for `event` with `lsn`.
pub fn encode_record(lsn: u64, event: &Event, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_bytes(0, RECORD_HEADER_BYTES);
    encode_event(event, dst);
    let len = dst.len() - start - RECORD_HEADER_BYTES;
    assert!(len <= RECORD_PAYLOAD_BYTES_MAX, "event encodes to {len} bytes");
    dst[start + 4..start + 12].copy_from_slice(&lsn.to_le_bytes());
    dst[start + 12..start + 16].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&dst[start + 4..]);
    dst[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes remain than the record needs: the end of a torn write.
    Truncated { needed: usize, available: usize },
    /// The declared length is impossible.
    BadLength(u32),
    /// The checksum does not match.
    BadChecksum { stored: u32, computed: u32 },
    /// Checksum fine but the payload does not decode (a bug or a newer format).
    BadPayload(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated { needed, available } => {
                write!(f, "record needs {needed} bytes, {available} remain")
            }
            RecordError::BadLength(len) => write!(f, "record length {len} exceeds {RECORD_PAYLOAD_BYTES_MAX}"),
            RecordError::BadChecksum { stored, computed } => {
                write!(f, "checksum {stored:#010x}, computed {computed:#010x}")
            }
            RecordError::BadPayload(e) => write!(f, "payload: {e}"),
        }
    }
}

/// Parse the record at the start of `buf`: `(lsn, event, bytes used)`.
pub fn decode_record(buf: &[u8]) -> Result<(u64, Event, usize), RecordError> {
    let (lsn, total) = verify_record(buf)?;
    let event = decode_event(&buf[RECORD_HEADER_BYTES..total]).map_err(|e| RecordError::BadPayload(e.0))?;
    Ok((lsn, event, total))
}

/// Check the record at the start of `buf` (length and checksum) without
/// decoding its payload: `(lsn, bytes used)`. For records a reader needs
/// to step over intact but not to apply (those a snapshot covers).
pub fn verify_record(buf: &[u8]) -> Result<(u64, usize), RecordError> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Truncated { needed: RECORD_HEADER_BYTES, available: buf.len() });
    }
    let stored = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let lsn = u64::from_le_bytes(buf[4..12].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    if len as usize > RECORD_PAYLOAD_BYTES_MAX {
        return Err(RecordError::BadLength(len));
    }
    let total = RECORD_HEADER_BYTES + len as usize;
    if buf.len() < total {
        return Err(RecordError::Truncated { needed: total, available: buf.len() });
    }
    let computed = crc32c::crc32c(&buf[4..total]);
    if computed != stored {
        return Err(RecordError::BadChecksum { stored, computed });
    }
    Ok((lsn, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn all_kinds() -> Vec<Event> {
        vec![
            Event::SaleCreated { sku: 1, stock: 2, limit_per_user: 3, ttl_ms: 4, hot: true, at_ms: 5 },
            Event::Restocked { sku: 1, qty: 9, at_ms: 6, location: 0 },
            Event::Paused { sku: 1, at_ms: 7 },
            Event::Resumed { sku: 1, at_ms: 8 },
            Event::Reserved {
                sku: 1,
                user: 2,
                qty: 3,
                reservation_id: u128::MAX - 5,
                expires_at_ms: 10,
                at_ms: 9,
                location: 0,
            },
            Event::Reserved {
                sku: 1,
                user: 2,
                qty: 3,
                reservation_id: 77,
                expires_at_ms: 10,
                at_ms: 9,
                location: 65535,
            },
            Event::Restocked { sku: 1, qty: 9, at_ms: 6, location: 4 },
            Event::SaleCreatedAt {
                sku: 3,
                limit_per_user: 2,
                ttl_ms: 1000,
                hot: false,
                at_ms: 5,
                locations: Box::new(crate::message::SaleLocations {
                    locations: vec![(1, 5), (7, 0), (65535, 9)],
                    regions: vec![(2, vec![7, 1]), (9, vec![65535])],
                }),
            },
            Event::LocationAdded { sku: 3, location: 8, stock: 4, at_ms: 6 },
            Event::RegionSet { sku: 3, region: 2, order: vec![8, 1, 7].into_boxed_slice(), at_ms: 7 },
            Event::Confirmed { sku: 1, reservation_id: 7, at_ms: 11, payment_ref: Bytes::from_static(b"pi_123") },
            Event::Released { sku: 1, reservation_id: 8, at_ms: 12 },
            Event::Expired { sku: 1, reservation_id: 9, at_ms: 13 },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        let mut buf = BytesMut::new();
        for (i, event) in all_kinds().iter().enumerate() {
            encode_record(100 + i as u64, event, &mut buf);
        }
        let mut at = 0;
        for (i, event) in all_kinds().iter().enumerate() {
            let (lsn, decoded, used) = decode_record(&buf[at..]).unwrap();
            assert_eq!((lsn, &decoded), (100 + i as u64, event));
            at += used;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let mut buf = BytesMut::new();
        encode_record(1, &all_kinds()[4], &mut buf);
        for bit in 0..buf.len() * 8 {
            let mut copy = buf.to_vec();
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&copy).is_err(), "bit {bit} flip undetected");
        }
    }
}
