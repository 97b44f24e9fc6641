"""Stable numbered codes of the protocol: statuses, opcodes and roles.

The numbers are part of the wire format (PROTOCOL.md §4 and §7) and are
never renumbered or reused, so they live here as ``IntEnum`` members whose
values are the wire values. ``tests/test_spec_tables.py`` checks the
``Status`` members against the status table of PROTOCOL.md §7, code for
code and name for name.

Domain outcomes (``SOLD_OUT``, ``LIMIT_EXCEEDED``, ...) are ordinary replies,
not errors: a checkout handles them on its happy path.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """A reply's status. ``int(status)`` is the wire code, ``status.wire_name``
    the snake_case name used in PROTOCOL.md and in JSON output."""

    # success
    OK = 0
    RESERVED = 1
    CONFIRMED = 2
    RELEASED = 3
    WAITING = 4
    ADMITTED = 5
    # domain refusals: nothing changed
    SOLD_OUT = 10
    INSUFFICIENT_STOCK = 11
    LIMIT_EXCEEDED = 12
    PAUSED = 13
    UNKNOWN_SKU = 14
    UNKNOWN_RESERVATION = 15
    EXPIRED = 16
    ALREADY_RELEASED = 17
    ALREADY_CONFIRMED = 18
    ID_CONFLICT = 19
    SALE_EXISTS = 20
    INVALID_ARGUMENT = 21
    LSN_UNAVAILABLE = 22
    NO_LOG = 23
    NOT_ADMITTED = 24
    NO_TICKET = 25
    UNKNOWN_LOCATION = 26
    LOCATION_EXISTS = 27
    # overload and clusters: nothing was done, retry
    BUSY = 30
    SHUTTING_DOWN = 31
    RATE_LIMITED = 32
    NOT_LEADER = 33
    SYNC_STANDBY_UNAVAILABLE = 34
    STALE_TERM = 35
    # auth
    UNAUTHENTICATED = 40
    AUTH_FAILED = 41
    FORBIDDEN = 42
    # protocol errors: the server replies, then closes the connection
    BAD_MAGIC = 50
    UNSUPPORTED_VERSION = 51
    FRAME_TOO_LARGE = 52
    UNKNOWN_OPCODE = 53
    BAD_CHECKSUM = 54
    MALFORMED_BODY = 55
    BATCH_TOO_LARGE = 56
    INTERNAL_ERROR = 60

    @property
    def wire_name(self) -> str:
        """The name PROTOCOL.md uses (``sold_out``)."""
        return self.name.lower()

    @property
    def is_protocol_error(self) -> bool:
        """The 50-series: the server closes the connection after replying."""
        return 50 <= self.value < 60

    @property
    def is_retryable(self) -> bool:
        """Whether resending the identical request later may succeed
        (PROTOCOL.md §7, "Retryable" column)."""
        return self in _RETRYABLE

    def __str__(self) -> str:
        return self.wire_name

    @classmethod
    def from_code(cls, code: int) -> "Status | None":
        """The status with this wire code, or None for a code this version
        does not know (which a client treats as an unknown outcome)."""
        return _BY_CODE.get(code)


_BY_CODE = {int(s): s for s in Status}
_RETRYABLE = frozenset(
    {
        Status.BUSY,
        Status.SHUTTING_DOWN,
        Status.RATE_LIMITED,
        Status.NOT_LEADER,
        Status.SYNC_STANDBY_UNAVAILABLE,
    }
)


class Opcode(enum.IntEnum):
    """Request opcodes (PROTOCOL.md §4). A reply carries ``opcode | 0x80``."""

    HELLO = 0x01
    PING = 0x02
    CLUSTER = 0x03
    RESERVE = 0x10
    RESERVE_BATCH = 0x11
    CONFIRM = 0x12
    RELEASE = 0x13
    STATUS = 0x14
    JOIN = 0x15
    POLL = 0x16
    BATCH = 0x17
    RESERVE_AT = 0x18
    LOCATIONS = 0x19
    SALE_CREATE = 0x20
    RESTOCK = 0x21
    PAUSE = 0x22
    RESUME = 0x23
    SALE_MOVE = 0x24
    PLACEMENT = 0x25
    RESTOCK_AT = 0x26
    LOCATION_ADD = 0x27
    REGION_SET = 0x28
    REPLICATE = 0x30
    SETTLED = 0x31
    STATE_DUMP = 0x32
    FOLLOW = 0x33
    FOLLOW_ACK = 0x34
    SNAPSHOT_FETCH = 0x35

    @property
    def reply(self) -> int:
        """The opcode of a successful reply to this request."""
        return self.value | REPLY_BIT


#: Set in every reply's opcode.
REPLY_BIT = 0x80
#: The opcode of an ERROR reply (§5.16).
ERROR_OPCODE = 0xFF


class Role(enum.IntEnum):
    """What a connection may do, granted by its HELLO token (§3.3)."""

    NONE = 0
    CHECKOUT = 1
    ADMIN = 2
    REPLICATION = 3


class NodeRole(enum.IntEnum):
    """A node's part in its cluster, as CLUSTER reports it (§5.14a)."""

    NONE = 0
    LEADER = 1
    STANDBY = 2
    SINGLE = 3


class HoldState(enum.IntEnum):
    """A reservation's state in a DUMP_CHUNK entry (§5.14)."""

    HELD = 1
    CONFIRMED = 2
    RELEASED = 3
    EXPIRED = 4
