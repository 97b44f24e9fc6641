//! Bounds-checked little-endian reading of message bodies.
//!
//! `bytes::Buf` panics on a short read; a decoder fed by the network must
//! never panic, so every read here returns `Malformed` instead.

use bytes::Bytes;

/// A body did not match its opcode's layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed body: {0}")]
pub struct Malformed(pub String);

/// Cursor over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the message, for error text.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(format!("{}: needed {n} more bytes, {} left", self.what, self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Bytes not read yet (to bound allocations by what the input holds).
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn u128(&mut self) -> Result<u128, Malformed> {
        Ok(u128::from_le_bytes(self.take(16)?.try_into().expect("16 bytes")))
    }
    /// A length-prefixed byte string whose u8/u16 length was already read.
    pub fn bytes(&mut self, len: usize) -> Result<Bytes, Malformed> {
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }

    /// Every layout has a fixed or self-described length: trailing bytes
    /// mean the peer and we disagree about the format.
    pub fn finish(self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Malformed(format!("{}: {} unexpected trailing bytes", self.what, self.buf.len())))
        }
    }
}
