//! CONFIRM (0x12): the payment succeeded, turn a reservation into a sale.
//!
//! # Format
//!
//! Request body, 17 + n bytes:
//! ```text
//!  0 16 reservation_id  u128
//! 16  1 payment_ref_len u8, <= PAYMENT_REF_BYTES_MAX
//! 17  n payment_ref     bytes (opaque to the server, echoed to the ledger)
//! ```
//! Reply body: one `Outcome`: `confirmed` (detail = confirm time, unix ms),
//! `expired` (detail = expiry time), `already_released`,
//! `unknown_reservation`, `id_conflict` (confirmed before with another
//! payment_ref). A repeated CONFIRM with the same payment_ref answers
//! `confirmed` with the original confirm time.

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::PAYMENT_REF_BYTES_MAX;
use crate::wire::{Malformed, Reader};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirm {
    pub reservation_id: u128,
    pub payment_ref: Bytes,
}

impl Confirm {
    pub fn encode(&self, dst: &mut BytesMut) {
        assert!(self.payment_ref.len() <= PAYMENT_REF_BYTES_MAX, "payment_ref too long");
        dst.put_u128_le(self.reservation_id);
        dst.put_u8(self.payment_ref.len() as u8);
        dst.extend_from_slice(&self.payment_ref);
    }

    /// Bytes of this request's body.
    pub fn wire_bytes(&self) -> usize {
        17 + self.payment_ref.len()
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        let reservation_id = r.u128()?;
        let len = r.u8()? as usize;
        if len > PAYMENT_REF_BYTES_MAX {
            return Err(Malformed(format!("payment_ref of {len} bytes exceeds {PAYMENT_REF_BYTES_MAX}")));
        }
        let payment_ref = r.bytes(len)?;
        Ok(Confirm { reservation_id, payment_ref })
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "CONFIRM");
        let confirm = Self::read(&mut r)?;
        r.finish()?;
        Ok(confirm)
    }
}
