"""The 32-byte checksummed frame header and a streaming frame reader.

Every frame, request or reply, is a header followed by ``body_len`` body
bytes (PROTOCOL.md §2). The header carries a CRC-32C of its first 28 bytes
and one of the body, so a corrupted length is caught before the reader
waits for, or buffers, a body of that size.

``FrameReader`` is fed whatever the socket delivers (any split, several
frames at once) and returns complete, verified frames. It checks the
header in the server's order (§2.3): magic, version (before the checksum,
so a peer of another version hears "unsupported version"), header
checksum, ``flags``/``reserved``, ``body_len`` against the maximum, then
the body checksum.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Optional

from .checksum import crc32c
from .errors import FrameError
from .limits import FRAME_BODY_BYTES_MAX, HEADER_BYTES, PROTOCOL_VERSION
from .status import Status

#: The four bytes that open every frame: ASCII ``STMP``.
MAGIC = b"STMP"

# magic, version, opcode, flags, request_id, body_len, body_crc, reserved
_HEAD = struct.Struct("<4sBBHQIII")
_U32 = struct.Struct("<I")


class Header(NamedTuple):
    """A decoded, verified header."""

    version: int
    opcode: int
    flags: int
    request_id: int
    body_len: int
    body_crc32c: int
    reserved: int


class Frame(NamedTuple):
    """A complete, checksum-verified frame whose body is not parsed yet."""

    opcode: int
    request_id: int
    body: bytes


def encode_frame(opcode: int, request_id: int, body: bytes = b"") -> bytes:
    """One complete frame: header (both checksums filled in) and body."""
    if len(body) > FRAME_BODY_BYTES_MAX:
        raise ValueError("a %d-byte body exceeds FRAME_BODY_BYTES_MAX (%d)" % (len(body), FRAME_BODY_BYTES_MAX))
    head = _HEAD.pack(MAGIC, PROTOCOL_VERSION, opcode, 0, request_id, len(body), crc32c(body) if body else 0, 0)
    return head + _U32.pack(crc32c(head)) + body


def decode_header(head: bytes) -> Header:
    """Parse and verify 32 header bytes; ``FrameError`` says what is wrong,
    with the request id once the header checksum has verified."""
    if len(head) != HEADER_BYTES:
        raise ValueError("a header is %d bytes, got %d" % (HEADER_BYTES, len(head)))
    if head[0:4] != MAGIC:
        raise FrameError(Status.BAD_MAGIC, None, "expected magic %r, found %r" % (MAGIC, bytes(head[0:4])))
    if head[4] != PROTOCOL_VERSION:
        raise FrameError(
            Status.UNSUPPORTED_VERSION,
            None,
            "expected protocol version %d, found %d" % (PROTOCOL_VERSION, head[4]),
        )
    _, version, opcode, flags, request_id, body_len, body_crc, reserved = _HEAD.unpack_from(head)
    (stored,) = _U32.unpack_from(head, 28)
    computed = crc32c(head[0:28])
    if stored != computed:
        raise FrameError(
            Status.BAD_CHECKSUM, None, "header checksum %#010x, computed %#010x" % (stored, computed)
        )
    if flags != 0 or reserved != 0:
        raise FrameError(
            Status.MALFORMED_BODY,
            request_id,
            "flags %#x and reserved %#x must be zero in version 1" % (flags, reserved),
        )
    if body_len > FRAME_BODY_BYTES_MAX:
        raise FrameError(
            Status.FRAME_TOO_LARGE,
            request_id,
            "body of %d bytes exceeds the maximum of %d" % (body_len, FRAME_BODY_BYTES_MAX),
        )
    return Header(version, opcode, flags, request_id, body_len, body_crc, reserved)


def decode_frame(data: bytes) -> Frame:
    """Exactly one frame from ``data`` (no more, no less)."""
    reader = FrameReader()
    frames = reader.feed(data)
    if len(frames) != 1 or reader.buffered:
        raise ValueError("expected exactly one frame, got %d and %d spare bytes" % (len(frames), reader.buffered))
    return frames[0]


class FrameReader:
    """Turns a byte stream into verified frames.

    ``feed`` raises ``FrameError`` on the first violation; the stream is
    then out of sync for good and the connection must be dropped.
    """

    __slots__ = ("_buf", "_pending")

    def __init__(self) -> None:
        self._buf = bytearray()
        # The verified header whose body we are waiting for.
        self._pending: Optional[Header] = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned frame."""
        return len(self._buf) + (HEADER_BYTES if self._pending is not None else 0)

    def feed(self, data: bytes) -> List[Frame]:
        """Add received bytes; return every frame they complete, in order."""
        buf = self._buf
        buf += data
        frames: List[Frame] = []
        pos = 0
        end = len(buf)
        pending = self._pending
        try:
            while True:
                if pending is None:
                    if end - pos < HEADER_BYTES:
                        break
                    pending = decode_header(bytes(buf[pos : pos + HEADER_BYTES]))
                    pos += HEADER_BYTES
                body_len = pending.body_len
                if end - pos < body_len:
                    break
                body = bytes(buf[pos : pos + body_len])
                pos += body_len
                if body_len:
                    computed = crc32c(body)
                    if computed != pending.body_crc32c:
                        raise FrameError(
                            Status.BAD_CHECKSUM,
                            pending.request_id,
                            "body checksum %#010x, computed %#010x" % (pending.body_crc32c, computed),
                        )
                elif pending.body_crc32c != 0:
                    # An empty body's checksum is 0 (crc32c of nothing).
                    raise FrameError(Status.BAD_CHECKSUM, pending.request_id, "empty body with a non-zero checksum")
                frames.append(Frame(pending.opcode, pending.request_id, body))
                pending = None
        finally:
            self._pending = pending
            if pos:
                del buf[:pos]
        return frames
