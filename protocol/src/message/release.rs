//! RELEASE (0x13): the payment failed or the shopper left; return the units.
//!
//! # Format
//!
//! Request body, 16 bytes: `reservation_id u128`.
//! Reply body: one `Outcome`: `released` (also for a repeated RELEASE),
//! `expired` (it had already expired; stock is back either way),
//! `already_confirmed` (sold units are not released), `unknown_reservation`.

use bytes::{BufMut, BytesMut};

use crate::wire::{Malformed, Reader};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    pub reservation_id: u128,
}

impl Release {
    pub const WIRE_BYTES: usize = 16;

    pub fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        Ok(Release { reservation_id: r.u128()? })
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u128_le(self.reservation_id);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "RELEASE");
        let release = Self::read(&mut r)?;
        r.finish()?;
        Ok(release)
    }
}
