"""Bounds-checked little-endian reading of message bodies, and u128 helpers.

A decoder fed by the network must never crash on hostile input: every
read here raises ``Malformed`` on a short body, and ``finish`` refuses
trailing bytes (every layout has a fixed or self-described length, so
extra bytes mean the peers disagree about the format).
"""

from __future__ import annotations

import struct
from typing import Tuple

from .errors import Malformed
from .status import Status

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U128 = struct.Struct("<QQ")
_MASK64 = (1 << 64) - 1


def pack_u128(value: int) -> bytes:
    """16 bytes, least significant first (the low u64, then the high u64)."""
    return _U128.pack(value & _MASK64, value >> 64)


def join_u128(low: int, high: int) -> int:
    return (high << 64) | low


class Reader:
    """A cursor over one body; ``what`` names the message in error text."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def _need(self, n: int) -> int:
        pos = self.pos
        if len(self.buf) - pos < n:
            raise Malformed("%s: needed %d more bytes, %d left" % (self.what, n, len(self.buf) - pos))
        self.pos = pos + n
        return pos

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def unpack(self, st: struct.Struct) -> Tuple[int, ...]:
        return st.unpack_from(self.buf, self._need(st.size))

    def u8(self) -> int:
        return self.buf[self._need(1)]

    def u16(self) -> int:
        return int(_U16.unpack_from(self.buf, self._need(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.buf, self._need(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.buf, self._need(8))[0])

    def u128(self) -> int:
        low, high = _U128.unpack_from(self.buf, self._need(16))
        return int((high << 64) | low)

    def bytes(self, n: int) -> bytes:
        pos = self._need(n)
        return bytes(self.buf[pos : pos + n])

    def string(self, n: int, field: str) -> str:
        try:
            return self.bytes(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("%s: %s is not UTF-8" % (self.what, field)) from None

    def status(self) -> Status:
        code = self.u16()
        status = Status.from_code(code)
        if status is None:
            # PROTOCOL.md §7: an unknown status means an unknown outcome; the
            # caller drops the connection, like the reference client.
            raise Malformed("%s: unknown status %d" % (self.what, code))
        return status

    def finish(self) -> None:
        extra = len(self.buf) - self.pos
        if extra:
            raise Malformed("%s: %d unexpected trailing bytes" % (self.what, extra))
