//! STATE_DUMP (0x32): the engine's complete state at one log position, for
//! reconciliation. Every record up to `lsn` is reflected, none after it.
//!
//! # Format
//!
//! Request body: empty. The server answers with one or more DUMP_CHUNK
//! frames (opcode 0xb2, the request's id); the last has bit 0 of `flags` set.
//!
//! DUMP_CHUNK body, 23 + n bytes:
//! ```text
//!  0  2 status          u16: ok | busy (another dump is running) | no_log
//!  2  1 flags           u8, bit 0: last chunk of this dump
//!  3  8 lsn             u64, the log position of the state
//! 11  8 server_time_ms  u64, the server's clock (unix ms) when the dump was taken
//! 19  4 count           u32, entries that follow
//! 23  n entries         back to back, each `kind u8` then its fields:
//! ```
//! ```text
//! 1 SALE         sku u64, total u64, available u64, reserved u64, sold u64,
//!                limit_per_user u32, ttl_ms u64, flags u8 (bit 0 hot, bit 1 paused)   (54 bytes)
//! 2 RESERVATION  sku u64, reservation_id u128, user u64, qty u32,
//!                state u8 (1 held, 2 confirmed, 3 released, 4 expired),
//!                expires_at_ms u64, settled_at_ms u64 (0 while held),
//!                payment_ref_len u8, payment_ref bytes                                 (55 + len bytes)
//! 3 LOCATION     sku u64, location u16, total u64, available u64, reserved u64,
//!                sold u64                                                              (43 bytes)
//! 4 RESERVATION_AT  a RESERVATION's fields, then location u16                          (57 + len bytes)
//! ```
//! Sales come in ascending SKU order, each followed by its LOCATION entries
//! (in the order the locations were added) and then all its reservations
//! (settled ones included) in ascending id order. A sale with one location,
//! id 0, and no regions has no LOCATION entries, and its reservations are
//! RESERVATION entries (location 0); a reservation at any other location
//! is a RESERVATION_AT.

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::PAYMENT_REF_BYTES_MAX;
use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// A reservation's state, as the engine keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum HoldState {
    /// Units held until `expires_at_ms`.
    Held = 1,
    /// Paid: the units are sold.
    Confirmed = 2,
    /// Given back by the client.
    Released = 3,
    /// Given back because the TTL passed.
    Expired = 4,
}

impl HoldState {
    pub fn from_u8(v: u8) -> Option<HoldState> {
        match v {
            1 => Some(HoldState::Held),
            2 => Some(HoldState::Confirmed),
            3 => Some(HoldState::Released),
            4 => Some(HoldState::Expired),
            _ => None,
        }
    }

    /// The name used in reports, JSON and the reconciler's database.
    pub const fn name(self) -> &'static str {
        match self {
            HoldState::Held => "held",
            HoldState::Confirmed => "confirmed",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaleEntry {
    pub sku: u64,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub limit_per_user: u32,
    pub ttl_ms: u64,
    pub hot: bool,
    pub paused: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationEntry {
    pub sku: u64,
    pub reservation_id: u128,
    pub user: u64,
    pub qty: u32,
    pub state: HoldState,
    pub expires_at_ms: u64,
    pub settled_at_ms: u64,
    /// Set once confirmed (may be empty).
    pub payment_ref: Bytes,
    /// The location its units are at (0: the one of a sale without locations).
    pub location: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DumpEntry {
    Sale(SaleEntry),
    Reservation(ReservationEntry),
    Location(LocationEntry),
}

/// One location's counters of the sale before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocationEntry {
    pub sku: u64,
    pub location: u16,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

const SALE: u8 = 1;
const RESERVATION: u8 = 2;
const LOCATION: u8 = 3;
const RESERVATION_AT: u8 = 4;

impl DumpEntry {
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            DumpEntry::Sale(s) => {
                dst.put_u8(SALE);
                dst.put_u64_le(s.sku);
                dst.put_u64_le(s.total);
                dst.put_u64_le(s.available);
                dst.put_u64_le(s.reserved);
                dst.put_u64_le(s.sold);
                dst.put_u32_le(s.limit_per_user);
                dst.put_u64_le(s.ttl_ms);
                dst.put_u8(u8::from(s.hot) | (u8::from(s.paused) << 1));
            }
            DumpEntry::Location(l) => {
                dst.put_u8(LOCATION);
                dst.put_u64_le(l.sku);
                dst.put_u16_le(l.location);
                dst.put_u64_le(l.total);
                dst.put_u64_le(l.available);
                dst.put_u64_le(l.reserved);
                dst.put_u64_le(l.sold);
            }
            DumpEntry::Reservation(r) => {
                assert!(r.payment_ref.len() <= PAYMENT_REF_BYTES_MAX, "payment_ref too long");
                dst.put_u8(if r.location == 0 { RESERVATION } else { RESERVATION_AT });
                dst.put_u64_le(r.sku);
                dst.put_u128_le(r.reservation_id);
                dst.put_u64_le(r.user);
                dst.put_u32_le(r.qty);
                dst.put_u8(r.state as u8);
                dst.put_u64_le(r.expires_at_ms);
                dst.put_u64_le(r.settled_at_ms);
                dst.put_u8(r.payment_ref.len() as u8);
                dst.extend_from_slice(&r.payment_ref);
                if r.location != 0 {
                    dst.put_u16_le(r.location);
                }
            }
        }
    }

    /// Encoded size in bytes (the server packs chunks up to the frame limit).
    pub fn encoded_len(&self) -> usize {
        match self {
            DumpEntry::Sale(_) => 54,
            DumpEntry::Reservation(r) => 55 + r.payment_ref.len() + if r.location == 0 { 0 } else { 2 },
            DumpEntry::Location(_) => 43,
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<DumpEntry, Malformed> {
        Ok(match r.u8()? {
            SALE => {
                let (sku, total, available, reserved, sold) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let (limit_per_user, ttl_ms, flags) = (r.u32()?, r.u64()?, r.u8()?);
                if flags & !0b11 != 0 {
                    return Err(Malformed(format!("DUMP_CHUNK: sale flags {flags:#04x}")));
                }
                DumpEntry::Sale(SaleEntry {
                    sku,
                    total,
                    available,
                    reserved,
                    sold,
                    limit_per_user,
                    ttl_ms,
                    hot: flags & 1 != 0,
                    paused: flags & 2 != 0,
                })
            }
            LOCATION => DumpEntry::Location(LocationEntry {
                sku: r.u64()?,
                location: r.u16()?,
                total: r.u64()?,
                available: r.u64()?,
                reserved: r.u64()?,
                sold: r.u64()?,
            }),
            kind @ (RESERVATION | RESERVATION_AT) => {
                let (sku, reservation_id, user, qty) = (r.u64()?, r.u128()?, r.u64()?, r.u32()?);
                let code = r.u8()?;
                let state = HoldState::from_u8(code)
                    .ok_or_else(|| Malformed(format!("DUMP_CHUNK: reservation state {code}")))?;
                let (expires_at_ms, settled_at_ms) = (r.u64()?, r.u64()?);
                let len = r.u8()? as usize;
                if len > PAYMENT_REF_BYTES_MAX {
                    return Err(Malformed(format!("DUMP_CHUNK: payment_ref of {len} bytes")));
                }
                let payment_ref = r.bytes(len)?;
                let location = match kind {
                    RESERVATION_AT => match r.u16()? {
                        0 => return Err(Malformed("DUMP_CHUNK: RESERVATION_AT at location 0".into())),
                        location => location,
                    },
                    _ => 0,
                };
                DumpEntry::Reservation(ReservationEntry {
                    location,
                    sku,
                    reservation_id,
                    user,
                    qty,
                    state,
                    expires_at_ms,
                    settled_at_ms,
                    payment_ref,
                })
            }
            kind => return Err(Malformed(format!("DUMP_CHUNK: unknown entry kind {kind}"))),
        })
    }
}

/// Bytes of a DUMP_CHUNK body before its entries.
pub const DUMP_CHUNK_HEADER_BYTES: usize = 23;

/// One DUMP_CHUNK frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpChunk {
    pub status: Status,
    pub last: bool,
    pub lsn: u64,
    pub server_time_ms: u64,
    pub entries: Vec<DumpEntry>,
}

impl DumpChunk {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        dst.put_u8(u8::from(self.last));
        dst.put_u64_le(self.lsn);
        dst.put_u64_le(self.server_time_ms);
        dst.put_u32_le(self.entries.len() as u32);
        for entry in &self.entries {
            entry.encode(dst);
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "DUMP_CHUNK");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(Malformed(format!("DUMP_CHUNK: flags {flags:#04x}")));
        }
        let (lsn, server_time_ms) = (r.u64()?, r.u64()?);
        let count = r.u32()? as usize;
        // The smallest entry is 43 bytes: bound the allocation by the body.
        let mut entries = Vec::with_capacity(count.min(body.len() / 43));
        for _ in 0..count {
            entries.push(DumpEntry::read(&mut r)?);
        }
        r.finish()?;
        Ok(DumpChunk { status, last: flags & 1 != 0, lsn, server_time_ms, entries })
    }
}
