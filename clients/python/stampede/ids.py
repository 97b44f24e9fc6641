"""Reservation ids: generated client-side, 128 random bits from ``secrets``.

Generate one id per purchase attempt and store it with the order *before*
sending RESERVE (PROTOCOL.md §9): a checkout process that crashes, or
whose request has an unknown outcome, can then retry or release with the
same id, and the server answers the original outcome instead of reserving
twice. Never reuse an id for a different purchase. With 128 random bits,
collisions between independent processes are negligible.
"""

from __future__ import annotations

import secrets

from .errors import InvalidRequest
from .limits import U128_MAX


def new_reservation_id() -> int:
    """A fresh random, non-zero 128-bit reservation id."""
    while True:
        rid = secrets.randbits(128)
        if rid:  # 0 is refused by the server (invalid_argument)
            return rid


def format_reservation_id(rid: int) -> str:
    """32 lowercase hex digits, the form ``stampede-ctl`` prints."""
    return "%032x" % rid


def parse_reservation_id(text: str) -> int:
    """Parse 1 to 32 hex digits (an optional ``0x`` prefix); 0 is refused."""
    digits = text[2:] if text.lower().startswith("0x") else text
    if not 1 <= len(digits) <= 32:
        raise InvalidRequest("a reservation id is 1 to 32 hex digits, got %r" % text)
    try:
        rid = int(digits, 16)
    except ValueError:
        raise InvalidRequest("a reservation id is hex, got %r" % text) from None
    if rid == 0 or rid > U128_MAX:
        raise InvalidRequest("reservation id 0 is reserved")
    return rid
