//! RESERVE (0x10), RESERVE_BATCH (0x11) and the `Outcome` result they share
//! with most other operations.
//!
//! # Format
//!
//! RESERVE request body, 36 bytes:
//! ```text
//!  0  8 sku             u64
//!  8  8 user            u64
//! 16  4 qty             u32, >= 1
//! 20 16 reservation_id  u128, chosen by the client, never 0
//! ```
//! RESERVE reply body: one `Outcome` (10 bytes):
//! ```text
//!  0  2 status  u16 (see status codes)
//!  2  8 detail  u64: reserved -> expiry (unix ms); busy -> retry after (ms);
//!               confirmed -> confirm time (unix ms); otherwise 0 unless noted
//! ```
//! RESERVE_BATCH request body: `u16 count` (1..=BATCH_OPS_MAX) then `count`
//! RESERVE bodies back to back. Reply: `u16 count` then `count` Outcomes in
//! the same order as the operations.

use bytes::{BufMut, BytesMut};

use crate::limits::BATCH_OPS_MAX;
use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// Hold `qty` units of `sku` for `user` under the client-chosen id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserve {
    pub sku: u64,
    pub user: u64,
    pub qty: u32,
    pub reservation_id: u128,
}

impl Reserve {
    pub const WIRE_BYTES: usize = 36;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.sku);
        dst.put_u64_le(self.user);
        dst.put_u32_le(self.qty);
        dst.put_u128_le(self.reservation_id);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        Ok(Reserve { sku: r.u64()?, user: r.u64()?, qty: r.u32()?, reservation_id: r.u128()? })
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "RESERVE");
        let op = Self::read(&mut r)?;
        r.finish()?;
        Ok(op)
    }
}

/// The result of one operation: a status and one status-dependent number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    pub detail: u64,
    /// The location (warehouse) of a reservation: sent only in RESERVE_AT's
    /// reply (see `location.rs`); 0 elsewhere.
    pub location: u16,
}

impl Outcome {
    pub const WIRE_BYTES: usize = 10;

    pub const fn new(status: Status, detail: u64) -> Self {
        Outcome { status, detail, location: 0 }
    }
    pub const fn of(status: Status) -> Self {
        Outcome { status, detail: 0, location: 0 }
    }
    /// `reserved` at `location` until `expires_at_ms`.
    pub const fn reserved_at(expires_at_ms: u64, location: u16) -> Self {
        Outcome { status: Status::Reserved, detail: expires_at_ms, location }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        dst.put_u64_le(self.detail);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status code {code}")))?;
        Ok(Outcome { status, detail: r.u64()?, location: 0 })
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "outcome");
        let outcome = Self::read(&mut r)?;
        r.finish()?;
        Ok(outcome)
    }
}

/// Encode a RESERVE_BATCH body.
pub fn encode_batch(ops: &[Reserve], dst: &mut BytesMut) {
    assert!(!ops.is_empty() && ops.len() <= BATCH_OPS_MAX, "batch of {} ops", ops.len());
    dst.put_u16_le(ops.len() as u16);
    for op in ops {
        op.encode(dst);
    }
}

/// Why a batch body was refused: a count out of range is its own status.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchError {
    TooLarge(usize),
    Malformed(Malformed),
}

impl From<Malformed> for BatchError {
    fn from(m: Malformed) -> Self {
        BatchError::Malformed(m)
    }
}

pub fn decode_batch(body: &[u8]) -> Result<Vec<Reserve>, BatchError> {
    let mut r = Reader::new(body, "RESERVE_BATCH");
    let count = r.u16()? as usize;
    if count == 0 || count > BATCH_OPS_MAX {
        return Err(BatchError::TooLarge(count));
    }
    // The count is bounded above, and the frame body length bounds the bytes.
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        ops.push(Reserve::read(&mut r)?);
    }
    r.finish()?;
    Ok(ops)
}

pub fn encode_batch_reply(results: &[Outcome], dst: &mut BytesMut) {
    dst.put_u16_le(results.len() as u16);
    for outcome in results {
        outcome.encode(dst);
    }
}

pub fn decode_batch_reply(body: &[u8]) -> Result<Vec<Outcome>, Malformed> {
    let mut r = Reader::new(body, "RESERVE_BATCH reply");
    let count = r.u16()? as usize;
    if count > BATCH_OPS_MAX {
        return Err(Malformed(format!("batch reply of {count} results")));
    }
    let mut results = Vec::with_capacity(count);
    for _ in 0..count {
        results.push(Outcome::read(&mut r)?);
    }
    r.finish()?;
    Ok(results)
}
