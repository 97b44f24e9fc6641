"""CRC-32C (Castagnoli), the checksum of every frame header, body and log
record (PROTOCOL.md §2.2).

The package has no runtime dependency: when the maintained ``crc32c``
package from PyPI is importable (``pip install stampede-client[fast]``) its
hardware or C implementation is used, otherwise a table-driven pure-Python
one. Both give identical results; ``tests/test_codec.py`` checks each
against the spec's check values and the shared test vectors.

This is *not* the zlib/IEEE CRC-32 that ``binascii.crc32`` computes.
"""

from __future__ import annotations

import struct
import sys
from typing import Callable, Union

Buffer = Union[bytes, bytearray, memoryview]

#: The reflected Castagnoli polynomial (0x1EDC6F41 bit-reversed).
POLYNOMIAL_REFLECTED = 0x82F63B78


def _make_tables() -> "list[list[int]]":
    """Slicing-by-4 tables: table[0] is the classic byte table; table[k]
    advances a byte k positions further, so the pure-Python loop handles
    four bytes per step instead of one."""
    t0 = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ POLYNOMIAL_REFLECTED if crc & 1 else crc >> 1
        t0.append(crc)
    tables = [t0]
    for _ in range(3):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ t0[prev[n] & 0xFF] for n in range(256)])
    return tables


_T0, _T1, _T2, _T3 = _make_tables()


def crc32c_pure(data: Buffer, crc: int = 0) -> int:
    """CRC-32C of ``data`` in pure Python; ``crc`` continues a previous value."""
    t0, t1, t2, t3 = _T0, _T1, _T2, _T3
    crc ^= 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n = len(mv)
    words = n // 4
    if words:
        # Four bytes at a time: fold the little-endian word into the CRC and
        # look each of its bytes up in the table for its distance to the end.
        for w in mv[: words * 4].cast("I") if _LITTLE_ENDIAN else _words_le(mv, words):
            crc ^= w
            crc = t3[crc & 0xFF] ^ t2[(crc >> 8) & 0xFF] ^ t1[(crc >> 16) & 0xFF] ^ t0[crc >> 24]
    for b in mv[words * 4 :]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _words_le(mv: memoryview, words: int) -> "list[int]":
    """Little-endian u32 words on a big-endian host (``cast("I")`` is native)."""
    return list(struct.unpack("<%dI" % words, mv[: words * 4]))


_LITTLE_ENDIAN = sys.byteorder == "little"

IMPLEMENTATION: str
crc32c: Callable[[Buffer], int]

try:  # pragma: no cover - depends on the environment
    import crc32c as _crc32c_pkg  # type: ignore[import-not-found,unused-ignore]

    def crc32c(data: Buffer) -> int:
        """CRC-32C of ``data`` (the ``crc32c`` package's implementation)."""
        return int(_crc32c_pkg.crc32c(data))

    IMPLEMENTATION = "crc32c package (%s)" % getattr(_crc32c_pkg, "hardware_based", "software")
except ImportError:  # pragma: no cover - depends on the environment

    def crc32c(data: Buffer) -> int:
        """CRC-32C of ``data`` (pure Python, slicing-by-4)."""
        return crc32c_pure(data)

    IMPLEMENTATION = "pure Python"
