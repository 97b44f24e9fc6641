//! The virtual queue (waiting room) of a sale: JOIN (0x15) and POLL (0x16),
//! and the queue parts of SALE_CREATE and STATUS.
//!
//! # Format
//!
//! JOIN and POLL request body, 16 bytes (the ticket is the pair):
//! ```text
//!  0  8 sku   u64
//!  8  8 user  u64
//! ```
//! Reply: QUEUE_TICKET, 27 bytes:
//! ```text
//!  0  2 status                u16: waiting | admitted | sold_out | expired (POLL: the
//!                             admission lapsed; JOIN again to go to the back) |
//!                             no_ticket (POLL before JOIN) | unknown_sku | busy
//!  2  1 flags                 u8: bit 0 pre_start (joined before the start: the
//!                             position is assigned by the shuffle at the start),
//!                             bit 1 stock_pending (no unit available now, but
//!                             held reservations may return some)
//!  3  8 position              u64: 1 = next to be admitted; 0 when not waiting
//!                             or before the start
//! 11  8 estimated_wait_ms     u64: position / admission rate
//! 19  8 admitted_until_ms     u64: admitted: reserve before this (unix ms); else 0
//! ```
//!
//! SALE_CREATE with bit 1 of `flags` set carries a queue after the 29-byte
//! sale definition (53 bytes in all):
//! ```text
//! 29  4 admit_rate_per_s  u32, >= 1: users admitted per second
//! 33  4 admit_cap         u32: most admitted-but-not-yet-reserved users at
//!                         once (0: no fixed cap); the cap never exceeds the
//!                         units available
//! 37  8 admission_ms      u64, 1..=QUEUE_ADMISSION_MS_MAX: how long an admitted
//!                         user may take to reserve
//! 45  8 start_at_ms       u64: unix ms the queue opens (0: at once); users who
//!                         join before are shuffled at the start
//! ```
//!
//! A STATUS reply with bit 2 of `flags` set (the sale has a queue) carries
//! 36 more bytes after the 55-byte body (91 in all):
//! ```text
//! 55  8 waiting               u64: users in line (pre-start joiners included)
//! 63  4 admit_rate_per_s      u32
//! 67  8 admitted_outstanding  u64: admitted, not yet reserved, not lapsed
//! 75  8 admitted_total        u64
//! 83  8 oldest_wait_ms        u64: how long the first user in line has waited
//! ```

use bytes::{BufMut, BytesMut};

use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// A sale's queue settings (SALE_CREATE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueConfig {
    pub admit_rate_per_s: u32,
    pub admit_cap: u32,
    pub admission_ms: u64,
    pub start_at_ms: u64,
}

/// Bytes of [`QueueConfig`] on the wire.
pub const QUEUE_CONFIG_BYTES: usize = 24;

impl QueueConfig {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32_le(self.admit_rate_per_s);
        dst.put_u32_le(self.admit_cap);
        dst.put_u64_le(self.admission_ms);
        dst.put_u64_le(self.start_at_ms);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        Ok(QueueConfig {
            admit_rate_per_s: r.u32()?,
            admit_cap: r.u32()?,
            admission_ms: r.u64()?,
            start_at_ms: r.u64()?,
        })
    }
}

/// The queue part of a STATUS reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub waiting: u64,
    pub admit_rate_per_s: u32,
    pub admitted_outstanding: u64,
    pub admitted_total: u64,
    pub oldest_wait_ms: u64,
}

impl QueueStats {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.waiting);
        dst.put_u32_le(self.admit_rate_per_s);
        dst.put_u64_le(self.admitted_outstanding);
        dst.put_u64_le(self.admitted_total);
        dst.put_u64_le(self.oldest_wait_ms);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        Ok(QueueStats {
            waiting: r.u64()?,
            admit_rate_per_s: r.u32()?,
            admitted_outstanding: r.u64()?,
            admitted_total: r.u64()?,
            oldest_wait_ms: r.u64()?,
        })
    }
}

/// JOIN / POLL request: the ticket is (sku, user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TicketRequest {
    pub sku: u64,
    pub user: u64,
}

impl TicketRequest {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.sku);
        dst.put_u64_le(self.user);
    }

    pub fn decode(body: &[u8], what: &'static str) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, what);
        let request = TicketRequest { sku: r.u64()?, user: r.u64()? };
        r.finish()?;
        Ok(request)
    }
}

/// QUEUE_TICKET reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueTicket {
    pub status: Status,
    pub pre_start: bool,
    pub stock_pending: bool,
    pub position: u64,
    pub estimated_wait_ms: u64,
    pub admitted_until_ms: u64,
}

impl QueueTicket {
    pub const WIRE_BYTES: usize = 27;

    pub fn of(status: Status) -> QueueTicket {
        QueueTicket {
            status,
            pre_start: false,
            stock_pending: false,
            position: 0,
            estimated_wait_ms: 0,
            admitted_until_ms: 0,
        }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        dst.put_u8(u8::from(self.pre_start) | (u8::from(self.stock_pending) << 1));
        dst.put_u64_le(self.position);
        dst.put_u64_le(self.estimated_wait_ms);
        dst.put_u64_le(self.admitted_until_ms);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "QUEUE_TICKET");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let flags = r.u8()?;
        if flags & !0b11 != 0 {
            return Err(Malformed(format!("QUEUE_TICKET: unknown flag bits {flags:#04x}")));
        }
        let ticket = QueueTicket {
            status,
            pre_start: flags & 1 != 0,
            stock_pending: flags & 2 != 0,
            position: r.u64()?,
            estimated_wait_ms: r.u64()?,
            admitted_until_ms: r.u64()?,
        };
        r.finish()?;
        Ok(ticket)
    }
}
