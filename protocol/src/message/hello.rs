//! HELLO (0x01): the first frame on every connection; authenticates it.
//!
//! # Format
//!
//! Request body, 2 + n bytes:
//! ```text
//!  0  2 token_len  u16, <= TOKEN_BYTES_MAX
//!  2  n token      bytes
//! ```
//! Reply body, 9 bytes:
//! ```text
//!  0  2 status                u16: ok | auth_failed
//!  2  1 role                  u8: 0 none, 1 checkout, 2 admin, 3 replication
//!  3  4 frame_body_bytes_max  u32 (the server's limit)
//!  7  2 batch_ops_max         u16 (the server's limit)
//! ```
//! The protocol version travels in every header, so HELLO does not repeat it.
//! On `auth_failed` the server closes the connection after the reply.

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::TOKEN_BYTES_MAX;
use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// What an authenticated connection may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    None = 0,
    /// reserve, confirm, release, status, ping.
    Checkout = 1,
    /// Everything: checkout operations, sale administration, the log.
    Admin = 2,
    /// The log only: REPLICATE, SETTLED, STATE_DUMP (the reconciler).
    Replication = 3,
}

impl Role {
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            0 => Some(Role::None),
            1 => Some(Role::Checkout),
            2 => Some(Role::Admin),
            3 => Some(Role::Replication),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Checkout => "checkout",
            Role::Admin => "admin",
            Role::Replication => "replication",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub token: Bytes,
}

impl Hello {
    pub fn encode(&self, dst: &mut BytesMut) {
        assert!(self.token.len() <= TOKEN_BYTES_MAX, "token too long");
        dst.put_u16_le(self.token.len() as u16);
        dst.extend_from_slice(&self.token);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "HELLO");
        let len = r.u16()? as usize;
        if len > TOKEN_BYTES_MAX {
            return Err(Malformed(format!("token of {len} bytes exceeds {TOKEN_BYTES_MAX}")));
        }
        let token = r.bytes(len)?;
        r.finish()?;
        Ok(Hello { token })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub status: Status,
    pub role: Role,
    pub frame_body_bytes_max: u32,
    pub batch_ops_max: u16,
}

impl HelloReply {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        dst.put_u8(self.role as u8);
        dst.put_u32_le(self.frame_body_bytes_max);
        dst.put_u16_le(self.batch_ops_max);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "HELLO reply");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let role_byte = r.u8()?;
        let role = Role::from_u8(role_byte).ok_or_else(|| Malformed(format!("unknown role {role_byte}")))?;
        let reply = HelloReply { status, role, frame_body_bytes_max: r.u32()?, batch_ops_max: r.u16()? };
        r.finish()?;
        Ok(reply)
    }
}
