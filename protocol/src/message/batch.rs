//! BATCH (0x17): RESERVE, CONFIRM and RELEASE operations of any mix in one
//! frame, each answered as if it had come alone.
//!
//! Why a mixed batch: a checkout service's callers send one operation each
//! (reserve, later confirm or release), and a client that packs whatever
//! its callers queued while the previous frame was written (PROTOCOL.md §9,
//! "Coalescing") sees all three kinds at once. One frame then costs the
//! server one decode, one trip to each shard and one reply, instead of one
//! of each per operation.
//!
//! # Format
//!
//! Request body: `u16 count` (1..=BATCH_OPS_MAX), then `count` operations
//! back to back, each a kind byte followed by that operation's own request
//! body, unchanged:
//! ```text
//!  0  1 kind  u8: 1 = RESERVE (36 bytes follow), 2 = CONFIRM (17 + n),
//!             3 = RELEASE (16)
//!  1  . body  the RESERVE, CONFIRM or RELEASE request body
//! ```
//! Reply body (opcode 0x97), as RESERVE_BATCH's: `u16 count`, then `count`
//! Outcomes in the order of the operations. Each operation's outcome is
//! exactly what the operation alone would have been answered; operations
//! are decided in order within a shard, and operations of different SKUs
//! may be decided by different shards in any order between them.
//! An unknown kind makes the whole frame `malformed_body`.

use bytes::{BufMut, BytesMut};

use crate::limits::BATCH_OPS_MAX;
use crate::message::{Confirm, Release, Reserve};
use crate::wire::{Malformed, Reader};

/// One operation of a BATCH frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOp {
    Reserve(Reserve),
    Confirm(Confirm),
    Release(Release),
}

impl BatchOp {
    pub const KIND_RESERVE: u8 = 1;
    pub const KIND_CONFIRM: u8 = 2;
    pub const KIND_RELEASE: u8 = 3;

    /// Bytes this operation takes in a BATCH body (kind byte included).
    pub fn wire_bytes(&self) -> usize {
        1 + match self {
            BatchOp::Reserve(_) => Reserve::WIRE_BYTES,
            BatchOp::Confirm(c) => c.wire_bytes(),
            BatchOp::Release(_) => Release::WIRE_BYTES,
        }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            BatchOp::Reserve(op) => {
                dst.put_u8(Self::KIND_RESERVE);
                op.encode(dst);
            }
            BatchOp::Confirm(op) => {
                dst.put_u8(Self::KIND_CONFIRM);
                op.encode(dst);
            }
            BatchOp::Release(op) => {
                dst.put_u8(Self::KIND_RELEASE);
                op.encode(dst);
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        Ok(match r.u8()? {
            Self::KIND_RESERVE => BatchOp::Reserve(Reserve::read(r)?),
            Self::KIND_CONFIRM => BatchOp::Confirm(Confirm::read(r)?),
            Self::KIND_RELEASE => BatchOp::Release(Release::read(r)?),
            kind => return Err(Malformed(format!("BATCH: unknown operation kind {kind}"))),
        })
    }
}

/// Bytes of a BATCH body holding operations of `ops_bytes` in all.
pub const fn body_bytes(ops_bytes: usize) -> usize {
    2 + ops_bytes
}

/// Encode a BATCH body.
pub fn encode(ops: &[BatchOp], dst: &mut BytesMut) {
    assert!(!ops.is_empty() && ops.len() <= BATCH_OPS_MAX, "batch of {} ops", ops.len());
    dst.put_u16_le(ops.len() as u16);
    for op in ops {
        op.encode(dst);
    }
}

/// Decode a BATCH body.
pub fn decode(body: &[u8]) -> Result<Vec<BatchOp>, super::reserve::BatchError> {
    let mut r = Reader::new(body, "BATCH");
    let count = r.u16()? as usize;
    if count == 0 || count > BATCH_OPS_MAX {
        return Err(super::reserve::BatchError::TooLarge(count));
    }
    // The count is bounded above, and the frame body length bounds the bytes.
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        ops.push(BatchOp::read(&mut r)?);
    }
    r.finish()?;
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sample() -> Vec<BatchOp> {
        vec![
            BatchOp::Reserve(Reserve { sku: 7, user: 9, qty: 2, reservation_id: 0xabc }),
            BatchOp::Confirm(Confirm { reservation_id: 0xabc, payment_ref: Bytes::from_static(b"pi_1") }),
            BatchOp::Release(Release { reservation_id: 0xdef }),
        ]
    }

    #[test]
    fn round_trips_and_sizes_add_up() {
        let ops = sample();
        let mut buf = BytesMut::new();
        encode(&ops, &mut buf);
        assert_eq!(buf.len(), body_bytes(ops.iter().map(BatchOp::wire_bytes).sum()));
        assert_eq!(decode(&buf).unwrap(), ops);
    }

    #[test]
    fn refuses_unknown_kinds_counts_and_trailing_bytes() {
        let mut buf = BytesMut::new();
        encode(&sample(), &mut buf);
        let mut bad_kind = buf.to_vec();
        bad_kind[2] = 4;
        assert!(matches!(decode(&bad_kind), Err(super::super::reserve::BatchError::Malformed(_))));
        let mut trailing = buf.to_vec();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(super::super::reserve::BatchError::Malformed(_))));
        let mut short = buf.to_vec();
        short.pop();
        assert!(matches!(decode(&short), Err(super::super::reserve::BatchError::Malformed(_))));
        assert_eq!(decode(&[0, 0]), Err(super::super::reserve::BatchError::TooLarge(0)));
        let too_many = (BATCH_OPS_MAX as u16 + 1).to_le_bytes();
        assert_eq!(decode(&too_many), Err(super::super::reserve::BatchError::TooLarge(BATCH_OPS_MAX + 1)));
    }
}
