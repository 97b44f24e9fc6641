//! WAL record framing and the event payload encoding.
//!
//! # Format
//!
//! A record (all integers little-endian):
//! ```text
//!  0  4 crc32c   CRC-32C of bytes 4..16+len (lsn, len and payload)
//!  4  8 lsn      u64, strictly increasing by 1 across the whole log
//! 12  4 len      u32, payload length, <= RECORD_PAYLOAD_BYTES_MAX
//! 16  len payload: one event, below
//! ```
//! The checksum covers the LSN and the length as well as the payload, so a
//! torn or misdirected write can never pass as a valid record.
//!
//! Event payload: `kind u8` then the fields of that kind, in order:
//! ```text
//! 1 SALE_CREATED  sku u64, stock u64, limit_per_user u32, ttl_ms u64, hot u8, at_ms u64
//! 2 RESTOCKED     sku u64, qty u64, at_ms u64
//! 3 PAUSED        sku u64, at_ms u64
//! 4 RESUMED       sku u64, at_ms u64
//! 5 RESERVED      sku u64, user u64, qty u32, reservation_id u128, expires_at_ms u64, at_ms u64
//! 6 CONFIRMED     sku u64, reservation_id u128, at_ms u64, payment_ref_len u8, payment_ref bytes
//! 7 RELEASED      sku u64, reservation_id u128, at_ms u64
//! 8 EXPIRED       sku u64, reservation_id u128, at_ms u64
//! ```
//! Kinds are never renumbered; a new event gets a new kind.

use bytes::{BufMut, Bytes, BytesMut};
use stampede_protocol::wire::{Malformed, Reader};

use crate::engine::Event;
use crate::limits::{PAYMENT_REF_BYTES_MAX, RECORD_PAYLOAD_BYTES_MAX};

/// Bytes before the payload.
pub const RECORD_HEADER_BYTES: usize = 16;

const SALE_CREATED: u8 = 1;
const RESTOCKED: u8 = 2;
const PAUSED: u8 = 3;
const RESUMED: u8 = 4;
const RESERVED: u8 = 5;
const CONFIRMED: u8 = 6;
const RELEASED: u8 = 7;
const EXPIRED: u8 = 8;

/// Append the payload encoding of `event`.
pub fn encode_event(event: &Event, dst: &mut BytesMut) {
    match event {
        Event::SaleCreated { sku, stock, limit_per_user, ttl_ms, hot, at_ms } => {
            dst.put_u8(SALE_CREATED);
            dst.put_u64_le(*sku);
            dst.put_u64_le(*stock);
            dst.put_u32_le(*limit_per_user);
            dst.put_u64_le(*ttl_ms);
            dst.put_u8(u8::from(*hot));
            dst.put_u64_le(*at_ms);
        }
        Event::Restocked { sku, qty, at_ms } => {
            dst.put_u8(RESTOCKED);
            dst.put_u64_le(*sku);
            dst.put_u64_le(*qty);
            dst.put_u64_le(*at_ms);
        }
        Event::Paused { sku, at_ms } | Event::Resumed { sku, at_ms } => {
            dst.put_u8(if matches!(event, Event::Paused { .. }) { PAUSED } else { RESUMED });
            dst.put_u64_le(*sku);
            dst.put_u64_le(*at_ms);
        }
        Event::Reserved { sku, user, qty, reservation_id, expires_at_ms, at_ms } => {
            dst.put_u8(RESERVED);
            dst.put_u64_le(*sku);
            dst.put_u64_le(*user);
            dst.put_u32_le(*qty);
            dst.put_u128_le(*reservation_id);
            dst.put_u64_le(*expires_at_ms);
            dst.put_u64_le(*at_ms);
        }
        Event::Confirmed { sku, reservation_id, at_ms, payment_ref } => {
            debug_assert!(payment_ref.len() <= PAYMENT_REF_BYTES_MAX);
            dst.put_u8(CONFIRMED);
            dst.put_u64_le(*sku);
            dst.put_u128_le(*reservation_id);
            dst.put_u64_le(*at_ms);
            dst.put_u8(payment_ref.len() as u8);
            dst.extend_from_slice(payment_ref);
        }
        Event::Released { sku, reservation_id, at_ms } | Event::Expired { sku, reservation_id, at_ms } => {
            dst.put_u8(if matches!(event, Event::Released { .. }) { RELEASED } else { EXPIRED });
            dst.put_u64_le(*sku);
            dst.put_u128_le(*reservation_id);
            dst.put_u64_le(*at_ms);
        }
    }
}

/// Decode one event payload (the whole payload must be consumed).
pub fn decode_event(payload: &[u8]) -> Result<Event, Malformed> {
    let mut r = Reader::new(payload, "event");
    let event = match r.u8()? {
        SALE_CREATED => Event::SaleCreated {
            sku: r.u64()?,
            stock: r.u64()?,
            limit_per_user: r.u32()?,
            ttl_ms: r.u64()?,
            hot: r.u8()? != 0,
            at_ms: r.u64()?,
        },
        RESTOCKED => Event::Restocked { sku: r.u64()?, qty: r.u64()?, at_ms: r.u64()? },
        PAUSED => Event::Paused { sku: r.u64()?, at_ms: r.u64()? },
        RESUMED => Event::Resumed { sku: r.u64()?, at_ms: r.u64()? },
        RESERVED => Event::Reserved {
            sku: r.u64()?,
            user: r.u64()?,
            qty: r.u32()?,
            reservation_id: r.u128()?,
            expires_at_ms: r.u64()?,
            at_ms: r.u64()?,
        },
        CONFIRMED => {
            let sku = r.u64()?;
            let reservation_id = r.u128()?;
            let at_ms = r.u64()?;
            let len = r.u8()? as usize;
            if len > PAYMENT_REF_BYTES_MAX {
                return Err(Malformed(format!("payment_ref of {len} bytes")));
            }
            let payment_ref: Bytes = r.bytes(len)?;
            Event::Confirmed { sku, reservation_id, at_ms, payment_ref }
        }
        RELEASED => Event::Released { sku: r.u64()?, reservation_id: r.u128()?, at_ms: r.u64()? },
        EXPIRED => Event::Expired { sku: r.u64()?, reservation_id: r.u128()?, at_ms: r.u64()? },
        kind => return Err(Malformed(format!("unknown event kind {kind}"))),
    };
    r.finish()?;
    Ok(event)
}

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
    let event = decode_event(&buf[RECORD_HEADER_BYTES..total]).map_err(|e| RecordError::BadPayload(e.0))?;
    Ok((lsn, event, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Event> {
        vec![
            Event::SaleCreated { sku: 1, stock: 2, limit_per_user: 3, ttl_ms: 4, hot: true, at_ms: 5 },
            Event::Restocked { sku: 1, qty: 9, at_ms: 6 },
            Event::Paused { sku: 1, at_ms: 7 },
            Event::Resumed { sku: 1, at_ms: 8 },
            Event::Reserved { sku: 1, user: 2, qty: 3, reservation_id: u128::MAX - 5, expires_at_ms: 10, at_ms: 9 },
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

#[cfg(test)]
mod size_tests {
    use super::*;

    /// WAL.md lists each kind's payload size; keep it true.
    #[test]
    fn payload_sizes_match_wal_md() {
        let sizes = [
            (Event::SaleCreated { sku: 0, stock: 0, limit_per_user: 0, ttl_ms: 0, hot: false, at_ms: 0 }, 38),
            (Event::Restocked { sku: 0, qty: 0, at_ms: 0 }, 25),
            (Event::Paused { sku: 0, at_ms: 0 }, 17),
            (Event::Reserved { sku: 0, user: 0, qty: 0, reservation_id: 0, expires_at_ms: 0, at_ms: 0 }, 53),
            (Event::Confirmed { sku: 0, reservation_id: 0, at_ms: 0, payment_ref: Bytes::new() }, 34),
            (Event::Expired { sku: 0, reservation_id: 0, at_ms: 0 }, 33),
        ];
        for (event, size) in sizes {
            let mut buf = BytesMut::new();
            encode_event(&event, &mut buf);
            assert_eq!(buf.len(), size, "{event:?}");
        }
    }
}
