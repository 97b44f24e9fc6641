//! Frame header and the streaming frame codec.
//!
//! # Format
//!
//! Every frame, request or reply, is a 32-byte header followed by
//! `body_len` bytes of body. All integers are little-endian.
//!
//! ```text
//! offset size field
//!      0    4 magic          b"STMP" (0x53 0x54 0x4d 0x50)
//!      4    1 version        PROTOCOL_VERSION (1)
//!      5    1 opcode         request opcode, or request opcode | 0x80 in a reply, 0xff = ERROR
//!      6    2 flags          0 in version 1 (non-zero: malformed_body)
//!      8    8 request_id     chosen by the client, echoed in the reply
//!     16    4 body_len       <= FRAME_BODY_BYTES_MAX
//!     20    4 body_crc32c    CRC-32C (Castagnoli) of the body bytes (0 for an empty body)
//!     24    4 reserved       0 in version 1
//!     28    4 header_crc32c  CRC-32C of header bytes 0..28
//! ```
//!
//! The header has its own checksum so that a corrupted `body_len` is caught
//! before the decoder waits for (or allocates) a body of that size.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::limits::{FRAME_BODY_BYTES_MAX, HEADER_BYTES, PROTOCOL_VERSION};
use crate::status::Status;

/// The four magic bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"STMP";

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
    pub body_len: u32,
    pub body_crc32c: u32,
    pub reserved: u32,
}

// The header layout above is 32 bytes; keep the constant honest.
const _: () = assert!(4 + 1 + 1 + 2 + 8 + 4 + 4 + 4 + 4 == HEADER_BYTES);
const _: () = assert!(FRAME_BODY_BYTES_MAX <= u32::MAX as usize);

/// A complete, checksum-verified frame whose body has not been parsed yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub request_id: u64,
    pub body: Bytes,
}

/// Why a byte stream could not be framed. Protocol errors carry the status
/// to send back and, when the header was trustworthy, the request id.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{status}: {detail}")]
    Protocol {
        status: Status,
        /// `Some` once the header checksum verified, so the id can be echoed.
        request_id: Option<u64>,
        detail: String,
    },
}

impl FrameError {
    fn protocol(status: Status, request_id: Option<u64>, detail: impl Into<String>) -> Self {
        FrameError::Protocol { status, request_id, detail: detail.into() }
    }
}

/// Write the header for a body that is already in `dst[start + HEADER_BYTES..]`.
/// `start` is where the header's 32 placeholder bytes begin.
fn seal_header(dst: &mut BytesMut, start: usize, opcode: u8, request_id: u64) {
    let body_len = dst.len() - start - HEADER_BYTES;
    debug_assert!(body_len <= FRAME_BODY_BYTES_MAX, "encoder built an oversize body");
    let body_crc = crc32c::crc32c(&dst[start + HEADER_BYTES..]);
    let head = &mut dst[start..start + HEADER_BYTES];
    head[0..4].copy_from_slice(&MAGIC);
    head[4] = PROTOCOL_VERSION;
    head[5] = opcode;
    head[6..8].copy_from_slice(&0u16.to_le_bytes());
    head[8..16].copy_from_slice(&request_id.to_le_bytes());
    head[16..20].copy_from_slice(&(body_len as u32).to_le_bytes());
    head[20..24].copy_from_slice(&body_crc.to_le_bytes());
    head[24..28].copy_from_slice(&0u32.to_le_bytes());
    let header_crc = crc32c::crc32c(&head[0..28]);
    head[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

/// Append one frame to `dst`, letting `write_body` append the body in place
/// (no intermediate buffer). The header is filled in afterwards.
pub fn encode_frame_with(dst: &mut BytesMut, opcode: u8, request_id: u64, write_body: impl FnOnce(&mut BytesMut)) {
    let start = dst.len();
    dst.put_bytes(0, HEADER_BYTES);
    write_body(dst);
    seal_header(dst, start, opcode, request_id);
}

/// Parse and verify a header. `Err` is a protocol error to report.
pub fn decode_header(head: &[u8; HEADER_BYTES]) -> Result<Header, FrameError> {
    if head[0..4] != MAGIC {
        return Err(FrameError::protocol(
            Status::BadMagic,
            None,
            format!("expected magic {:02x?}, found {:02x?}", MAGIC, &head[0..4]),
        ));
    }
    // Version before checksum: a newer client whose header differs should
    // hear "unsupported version", not "bad checksum".
    if head[4] != PROTOCOL_VERSION {
        return Err(FrameError::protocol(
            Status::UnsupportedVersion,
            None,
            format!("expected protocol version {PROTOCOL_VERSION}, found {}", head[4]),
        ));
    }
    let mut cursor = &head[5..];
    let opcode = cursor.get_u8();
    let flags = cursor.get_u16_le();
    let request_id = cursor.get_u64_le();
    let body_len = cursor.get_u32_le();
    let body_crc32c = cursor.get_u32_le();
    let reserved = cursor.get_u32_le();
    let header_crc = cursor.get_u32_le();
    let computed = crc32c::crc32c(&head[0..28]);
    if header_crc != computed {
        return Err(FrameError::protocol(
            Status::BadChecksum,
            None,
            format!("header checksum {header_crc:#010x}, computed {computed:#010x}"),
        ));
    }
    let header = Header { version: head[4], opcode, flags, request_id, body_len, body_crc32c, reserved };
    if flags != 0 || reserved != 0 {
        return Err(FrameError::protocol(
            Status::MalformedBody,
            Some(request_id),
            format!("flags {flags:#x} and reserved {reserved:#x} must be zero in version 1"),
        ));
    }
    if body_len as usize > FRAME_BODY_BYTES_MAX {
        return Err(FrameError::protocol(
            Status::FrameTooLarge,
            Some(request_id),
            format!("body of {body_len} bytes exceeds the maximum of {FRAME_BODY_BYTES_MAX}"),
        ));
    }
    Ok(header)
}

/// Streaming decoder (and raw encoder) for frames.
///
/// A small state machine: read the header, verify it (including that the
/// declared length is within the maximum, before reserving any memory), then
/// wait for the body. "Not enough bytes yet" is `Ok(None)`, not an error.
#[derive(Debug, Default)]
pub struct FrameCodec {
    /// The verified header of the frame whose body we are waiting for.
    pending: Option<Header>,
}

impl FrameCodec {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let header = match self.pending {
            Some(header) => header,
            None => {
                if src.len() < HEADER_BYTES {
                    return Ok(None);
                }
                let head: &[u8; HEADER_BYTES] = src[..HEADER_BYTES].try_into().expect("length checked");
                let header = decode_header(head)?;
                src.advance(HEADER_BYTES);
                self.pending = Some(header);
                header
            }
        };
        let body_len = header.body_len as usize;
        if src.len() < body_len {
            // Bounded: body_len <= FRAME_BODY_BYTES_MAX was checked above.
            src.reserve(body_len - src.len());
            return Ok(None);
        }
        self.pending = None;
        let body = src.split_to(body_len).freeze();
        let computed = crc32c::crc32c(&body);
        if computed != header.body_crc32c {
            return Err(FrameError::protocol(
                Status::BadChecksum,
                Some(header.request_id),
                format!("body checksum {:#010x}, computed {computed:#010x}", header.body_crc32c),
            ));
        }
        Ok(Some(Frame { opcode: header.opcode, request_id: header.request_id, body }))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() && self.pending.is_none() => Ok(None),
            None => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ))),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if frame.body.len() > FRAME_BODY_BYTES_MAX {
            return Err(FrameError::protocol(
                Status::FrameTooLarge,
                Some(frame.request_id),
                format!("refusing to send a {}-byte body", frame.body.len()),
            ));
        }
        encode_frame_with(dst, frame.opcode, frame.request_id, |b| b.extend_from_slice(&frame.body));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(opcode: u8, request_id: u64, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_frame_with(&mut buf, opcode, request_id, |b| b.extend_from_slice(body));
        buf
    }

    #[test]
    fn round_trip_byte_at_a_time() {
        let wire = frame_bytes(0x10, 77, b"hello body");
        let mut codec = FrameCodec::new();
        let mut src = BytesMut::new();
        let mut out = None;
        for (i, byte) in wire.iter().enumerate() {
            src.put_u8(*byte);
            let got = codec.decode(&mut src).unwrap();
            if i + 1 < wire.len() {
                assert!(got.is_none(), "frame complete too early at byte {i}");
            } else {
                out = got;
            }
        }
        let frame = out.expect("frame after last byte");
        assert_eq!(frame.opcode, 0x10);
        assert_eq!(frame.request_id, 77);
        assert_eq!(&frame.body[..], b"hello body");
    }

    #[test]
    fn oversize_length_is_refused_before_allocation() {
        let mut wire = frame_bytes(0x02, 5, b"");
        wire[16..20].copy_from_slice(&(FRAME_BODY_BYTES_MAX as u32 + 1).to_le_bytes());
        let crc = crc32c::crc32c(&wire[0..28]);
        wire[28..32].copy_from_slice(&crc.to_le_bytes());
        let capacity_before = wire.capacity();
        let err = FrameCodec::new().decode(&mut wire).unwrap_err();
        assert!(matches!(err, FrameError::Protocol { status: Status::FrameTooLarge, request_id: Some(5), .. }));
        assert_eq!(wire.capacity(), capacity_before);
    }
}
