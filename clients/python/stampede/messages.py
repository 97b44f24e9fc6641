"""Typed messages: every request and reply body of PROTOCOL.md §5, as data.

Each request class has an ``OPCODE`` and ``encode_body()``; each class can
``decode_body(body)`` its own layout. ``encode_request`` / ``decode_reply``
add and check the frame around them; the reply's type follows from its
opcode (the request opcode ``| 0x80``, or ``0xff`` for an ERROR).

Decoding is strict, as the spec asks of a client (§2.4): a short body,
trailing bytes, an over-long length or an unknown status is ``Malformed``.
Replication frames (LOG_BATCH, DUMP_CHUNK, FOLLOW, ...) are here too, so
the package decodes every frame of the protocol and every shared test
vector, though the checkout clients never send them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple, Type, Union, get_args

from .errors import FrameError, InvalidRequest, Malformed
from .events import Event, decode_records, encode_record
from .frame import Frame, encode_frame
from .limits import (
    BATCH_OPS_MAX,
    ERROR_MESSAGE_BYTES_MAX,
    HISTORY_ENTRIES_MAX,
    LOCATIONS_PER_SALE_MAX,
    PAYMENT_REF_BYTES_MAX,
    RESERVE_PREFS_MAX,
    SNAPSHOT_CHUNK_BYTES_MAX,
    TOKEN_BYTES_MAX,
)
from .locations import SaleLocations as SaleLocations  # re-exported: SALE_CREATE's section
from .locations import pack_ids, pack_regions, read_ids, read_regions
from .status import ERROR_OPCODE, REPLY_BIT, HoldState, NodeRole, Opcode, Role, Status
from .wire import Reader, pack_u128

_MASK64 = (1 << 64) - 1
_RESERVE = struct.Struct("<QQIQQ")  # sku, user, qty, id low, id high
_OUTCOME = struct.Struct("<HQ")
_SKU = struct.Struct("<Q")
_SKU_USER = struct.Struct("<QQ")
_U16 = struct.Struct("<H")
_SKU_LOCATION_U64 = struct.Struct("<QHQ")  # RESTOCK_AT, LOCATION_ADD
_WHERE = struct.Struct("<HB")  # RESERVE_AT: region, count


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


class _Empty:
    """A request with an empty body."""

    OPCODE: ClassVar[Opcode]

    def encode_body(self) -> bytes:
        return b""

    @classmethod
    def decode_body(cls, body: bytes):  # type: ignore[no-untyped-def]
        Reader(body, cls.__name__).finish()
        return cls()


@dataclass
class Hello:
    """HELLO (0x01): authenticates the connection with an opaque token."""

    OPCODE: ClassVar[Opcode] = Opcode.HELLO
    token: bytes

    def encode_body(self) -> bytes:
        if len(self.token) > TOKEN_BYTES_MAX:
            raise InvalidRequest("token of %d bytes exceeds TOKEN_BYTES_MAX (%d)" % (len(self.token), TOKEN_BYTES_MAX))
        return _U16.pack(len(self.token)) + bytes(self.token)

    @classmethod
    def decode_body(cls, body: bytes) -> "Hello":
        r = Reader(body, "HELLO")
        n = r.u16()
        if n > TOKEN_BYTES_MAX:
            raise Malformed("HELLO: token of %d bytes exceeds %d" % (n, TOKEN_BYTES_MAX))
        token = r.bytes(n)
        r.finish()
        return cls(token)


@dataclass
class Ping(_Empty):
    """PING (0x02): round trip and the server's clock."""

    OPCODE: ClassVar[Opcode] = Opcode.PING


@dataclass
class Cluster(_Empty):
    """CLUSTER (0x03): who leads, as this node knows it."""

    OPCODE: ClassVar[Opcode] = Opcode.CLUSTER


@dataclass
class Placement(_Empty):
    """PLACEMENT (0x25, admin): where sales run and their demand."""

    OPCODE: ClassVar[Opcode] = Opcode.PLACEMENT


@dataclass
class Reserve:
    """RESERVE (0x10): hold ``qty`` units of ``sku`` for ``user`` under a
    client-chosen, non-zero 128-bit ``reservation_id``."""

    OPCODE: ClassVar[Opcode] = Opcode.RESERVE
    KIND: ClassVar[int] = 1  # its kind byte inside a BATCH
    WIRE_BYTES: ClassVar[int] = 36
    sku: int
    user: int
    qty: int
    reservation_id: int

    def encode_body(self) -> bytes:
        rid = self.reservation_id
        return _RESERVE.pack(self.sku, self.user, self.qty, rid & _MASK64, rid >> 64)

    def wire_bytes(self) -> int:
        return 36

    @classmethod
    def read(cls, r: Reader) -> "Reserve":
        sku, user, qty, low, high = r.unpack(_RESERVE)
        return cls(sku, user, qty, (high << 64) | low)

    @classmethod
    def decode_body(cls, body: bytes) -> "Reserve":
        r = Reader(body, "RESERVE")
        op = cls.read(r)
        r.finish()
        return op


@dataclass
class ReserveAt:
    """RESERVE_AT (0x18): a RESERVE that says where the units may come from
    (§5.4a, §6.2a): ``locations``, up to ``RESERVE_PREFS_MAX`` ids in
    order of preference, or a ``region`` the sale maps to an order, or
    neither (the sale's default order). Not both: the server answers that
    ``malformed_body``, so it is refused here before sending. The units
    all come from one location, the first in the order that has them;
    the reply (``OutcomeAt``) says which. Never packed into a BATCH."""

    OPCODE: ClassVar[Opcode] = Opcode.RESERVE_AT
    sku: int
    user: int
    qty: int
    reservation_id: int
    region: int = 0
    locations: List[int] = field(default_factory=list)

    def encode_body(self) -> bytes:
        n = len(self.locations)
        if n > RESERVE_PREFS_MAX:
            raise InvalidRequest("RESERVE_AT of %d preferred locations; at most RESERVE_PREFS_MAX (%d)" % (n, RESERVE_PREFS_MAX))
        if self.region != 0 and n != 0:
            raise InvalidRequest("RESERVE_AT: a region or a list of locations, not both")
        rid = self.reservation_id
        return b"".join(
            (
                _RESERVE.pack(self.sku, self.user, self.qty, rid & _MASK64, rid >> 64),
                _WHERE.pack(self.region, n),
                struct.pack("<%dH" % n, *self.locations),
            )
        )

    def wire_bytes(self) -> int:
        return 39 + 2 * len(self.locations)

    @property
    def op(self) -> Reserve:
        """The reserve op it carries (what a retry must repeat exactly)."""
        return Reserve(self.sku, self.user, self.qty, self.reservation_id)

    @classmethod
    def decode_body(cls, body: bytes) -> "ReserveAt":
        r = Reader(body, "RESERVE_AT")
        op = Reserve.read(r)
        region, count = r.unpack(_WHERE)
        if count > RESERVE_PREFS_MAX:
            raise Malformed("RESERVE_AT: %d preferred locations, at most %d" % (count, RESERVE_PREFS_MAX))
        if region != 0 and count != 0:
            raise Malformed("RESERVE_AT: a region and a list of locations")
        locations = [r.u16() for _ in range(count)]
        r.finish()
        return cls(op.sku, op.user, op.qty, op.reservation_id, region, locations)


@dataclass
class Confirm:
    """CONFIRM (0x12): sell a held reservation; ``payment_ref`` is stored
    and compared byte for byte on a repeat."""

    OPCODE: ClassVar[Opcode] = Opcode.CONFIRM
    KIND: ClassVar[int] = 2
    reservation_id: int
    payment_ref: bytes = b""

    def encode_body(self) -> bytes:
        if len(self.payment_ref) > PAYMENT_REF_BYTES_MAX:
            raise InvalidRequest(
                "payment_ref of %d bytes exceeds PAYMENT_REF_BYTES_MAX (%d)"
                % (len(self.payment_ref), PAYMENT_REF_BYTES_MAX)
            )
        return pack_u128(self.reservation_id) + bytes((len(self.payment_ref),)) + bytes(self.payment_ref)

    def wire_bytes(self) -> int:
        return 17 + len(self.payment_ref)

    @classmethod
    def read(cls, r: Reader) -> "Confirm":
        rid = r.u128()
        n = r.u8()
        if n > PAYMENT_REF_BYTES_MAX:
            raise Malformed("CONFIRM: payment_ref of %d bytes exceeds %d" % (n, PAYMENT_REF_BYTES_MAX))
        return cls(rid, r.bytes(n))

    @classmethod
    def decode_body(cls, body: bytes) -> "Confirm":
        r = Reader(body, "CONFIRM")
        op = cls.read(r)
        r.finish()
        return op


@dataclass
class Release:
    """RELEASE (0x13): give a held reservation's units back."""

    OPCODE: ClassVar[Opcode] = Opcode.RELEASE
    KIND: ClassVar[int] = 3
    reservation_id: int

    def encode_body(self) -> bytes:
        return pack_u128(self.reservation_id)

    def wire_bytes(self) -> int:
        return 16

    @classmethod
    def read(cls, r: Reader) -> "Release":
        return cls(r.u128())

    @classmethod
    def decode_body(cls, body: bytes) -> "Release":
        r = Reader(body, "RELEASE")
        op = cls.read(r)
        r.finish()
        return op


#: An operation of a BATCH frame.
BatchOp = Union[Reserve, Confirm, Release]
_BATCH_KINDS: Dict[int, Type[BatchOp]] = {Reserve.KIND: Reserve, Confirm.KIND: Confirm, Release.KIND: Release}


class BatchTooLarge(Malformed):
    """A batch ``count`` of 0 or above ``BATCH_OPS_MAX`` (its own status,
    ``batch_too_large``, rather than ``malformed_body``)."""


def _check_count(n: int, what: str) -> None:
    if not 1 <= n <= BATCH_OPS_MAX:
        raise InvalidRequest("%s of %d operations; allowed 1..=%d" % (what, n, BATCH_OPS_MAX))


@dataclass
class ReserveBatch:
    """RESERVE_BATCH (0x11): up to 1024 reserve operations, each decided as
    a RESERVE alone would be; one reply with the results in order."""

    OPCODE: ClassVar[Opcode] = Opcode.RESERVE_BATCH
    ops: List[Reserve]

    def encode_body(self) -> bytes:
        _check_count(len(self.ops), "RESERVE_BATCH")
        return _U16.pack(len(self.ops)) + b"".join(op.encode_body() for op in self.ops)

    @classmethod
    def decode_body(cls, body: bytes) -> "ReserveBatch":
        r = Reader(body, "RESERVE_BATCH")
        n = r.u16()
        if not 1 <= n <= BATCH_OPS_MAX:
            raise BatchTooLarge("RESERVE_BATCH of %d operations" % n)
        ops = [Reserve.read(r) for _ in range(n)]
        r.finish()
        return cls(ops)


@dataclass
class Batch:
    """BATCH (0x17): RESERVE, CONFIRM and RELEASE in any mix, each decided
    as it would be alone (§5.5a). The client packs concurrent calls into
    these (§9, "Coalescing")."""

    OPCODE: ClassVar[Opcode] = Opcode.BATCH
    ops: List[BatchOp]

    def encode_body(self) -> bytes:
        _check_count(len(self.ops), "BATCH")
        parts = [_U16.pack(len(self.ops))]
        for op in self.ops:
            parts.append(bytes((op.KIND,)))
            parts.append(op.encode_body())
        return b"".join(parts)

    @classmethod
    def decode_body(cls, body: bytes) -> "Batch":
        r = Reader(body, "BATCH")
        n = r.u16()
        if not 1 <= n <= BATCH_OPS_MAX:
            raise BatchTooLarge("BATCH of %d operations" % n)
        ops: List[BatchOp] = []
        for _ in range(n):
            kind = r.u8()
            op_cls = _BATCH_KINDS.get(kind)
            if op_cls is None:
                raise Malformed("BATCH: unknown operation kind %d" % kind)
            ops.append(op_cls.read(r))
        r.finish()
        return cls(ops)


@dataclass
class _SkuOnly:
    sku: int

    OPCODE: ClassVar[Opcode]

    def encode_body(self) -> bytes:
        return _SKU.pack(self.sku)

    @classmethod
    def decode_body(cls, body: bytes):  # type: ignore[no-untyped-def]
        r = Reader(body, cls.__name__)
        (sku,) = r.unpack(_SKU)
        r.finish()
        return cls(sku)


@dataclass
class StatusRequest(_SkuOnly):
    """STATUS (0x14): a sale's counters."""

    OPCODE: ClassVar[Opcode] = Opcode.STATUS


@dataclass
class Locations(_SkuOnly):
    """LOCATIONS (0x19): a sale's locations with their counters, and its
    regions' orders."""

    OPCODE: ClassVar[Opcode] = Opcode.LOCATIONS


@dataclass
class Pause(_SkuOnly):
    """PAUSE (0x22), admin: new RESERVEs answer ``paused``."""

    OPCODE: ClassVar[Opcode] = Opcode.PAUSE


@dataclass
class Resume(_SkuOnly):
    """RESUME (0x23), admin."""

    OPCODE: ClassVar[Opcode] = Opcode.RESUME


@dataclass
class SaleMove:
    """SALE_MOVE (0x24), admin: move a sale to a shard of its own
    (``dedicated``) or back to the pool, pinned there (§6.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.SALE_MOVE
    sku: int
    dedicated: bool

    _ST: ClassVar[struct.Struct] = struct.Struct("<QB")

    def encode_body(self) -> bytes:
        return self._ST.pack(self.sku, 1 if self.dedicated else 0)

    @classmethod
    def decode_body(cls, body: bytes) -> "SaleMove":
        r = Reader(body, "SALE_MOVE")
        sku, placement = r.unpack(cls._ST)
        r.finish()
        if placement > 1:
            raise Malformed("SALE_MOVE: placement %d (0 pool, 1 dedicated)" % placement)
        return cls(sku, placement == 1)


@dataclass
class _Ticket:
    sku: int
    user: int

    OPCODE: ClassVar[Opcode]

    def encode_body(self) -> bytes:
        return _SKU_USER.pack(self.sku, self.user)

    @classmethod
    def decode_body(cls, body: bytes):  # type: ignore[no-untyped-def]
        r = Reader(body, cls.__name__)
        sku, user = r.unpack(_SKU_USER)
        r.finish()
        return cls(sku, user)


@dataclass
class Join(_Ticket):
    """JOIN (0x15): take a place in a queued sale's line (idempotent)."""

    OPCODE: ClassVar[Opcode] = Opcode.JOIN


@dataclass
class Poll(_Ticket):
    """POLL (0x16): where a user stands in the line."""

    OPCODE: ClassVar[Opcode] = Opcode.POLL


@dataclass
class QueueConfig:
    """The virtual queue of a sale (SALE_CREATE with bit 1 of flags)."""

    admit_rate_per_s: int
    admit_cap: int = 0
    admission_ms: int = 120_000
    start_at_ms: int = 0

    _ST: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    def encode(self) -> bytes:
        return self._ST.pack(self.admit_rate_per_s, self.admit_cap, self.admission_ms, self.start_at_ms)

    @classmethod
    def read(cls, r: Reader) -> "QueueConfig":
        return cls(*r.unpack(cls._ST))


@dataclass
class SaleCreate:
    """SALE_CREATE (0x20), admin: a new sale (29 bytes; 53 with a queue;
    then the locations section when ``locations`` is set, flag bit 2).
    With ``locations`` the stock is split over them (§6.2a) and ``stock``
    must be their sum (``SaleLocations.stock``); without, the sale has one
    location, id 0."""

    OPCODE: ClassVar[Opcode] = Opcode.SALE_CREATE
    sku: int
    stock: int
    limit_per_user: int
    ttl_ms: int
    hot: bool = False
    queue: Optional[QueueConfig] = None
    locations: Optional[SaleLocations] = None

    _ST: ClassVar[struct.Struct] = struct.Struct("<QQIQB")

    def encode_body(self) -> bytes:
        flags = (1 if self.hot else 0) | (2 if self.queue is not None else 0) | (4 if self.locations is not None else 0)
        body = self._ST.pack(self.sku, self.stock, self.limit_per_user, self.ttl_ms, flags)
        queue = self.queue.encode() if self.queue is not None else b""
        return body + queue + (self.locations.encode() if self.locations is not None else b"")

    @classmethod
    def decode_body(cls, body: bytes) -> "SaleCreate":
        r = Reader(body, "SALE_CREATE")
        sku, stock, limit, ttl_ms, flags = r.unpack(cls._ST)
        if flags & ~0b111:
            raise Malformed("SALE_CREATE: unknown flag bits %#04x" % flags)
        queue = QueueConfig.read(r) if flags & 2 else None
        locations = SaleLocations.read(r) if flags & 4 else None
        r.finish()
        return cls(sku, stock, limit, ttl_ms, bool(flags & 1), queue, locations)


@dataclass
class Restock:
    """RESTOCK (0x21), admin: add units. **Not idempotent.**"""

    OPCODE: ClassVar[Opcode] = Opcode.RESTOCK
    sku: int
    qty: int

    def encode_body(self) -> bytes:
        return _SKU_USER.pack(self.sku, self.qty)

    @classmethod
    def decode_body(cls, body: bytes) -> "Restock":
        r = Reader(body, "RESTOCK")
        sku, qty = r.unpack(_SKU_USER)
        r.finish()
        return cls(sku, qty)


@dataclass
class RestockAt:
    """RESTOCK_AT (0x26), admin: ``qty`` more units at one location. **Not
    idempotent**, like RESTOCK. The reply's ``detail`` is the location's
    new total."""

    OPCODE: ClassVar[Opcode] = Opcode.RESTOCK_AT
    sku: int
    location: int
    qty: int

    def encode_body(self) -> bytes:
        return _SKU_LOCATION_U64.pack(self.sku, self.location, self.qty)

    @classmethod
    def decode_body(cls, body: bytes) -> "RestockAt":
        r = Reader(body, "RESTOCK_AT")
        sku, location, qty = r.unpack(_SKU_LOCATION_U64)
        r.finish()
        return cls(sku, location, qty)


@dataclass
class LocationAdd:
    """LOCATION_ADD (0x27), admin: a new location with ``stock`` units for
    a running sale, last in its default order. A repeat answers
    ``location_exists``. The reply's ``detail`` is the sale's new total."""

    OPCODE: ClassVar[Opcode] = Opcode.LOCATION_ADD
    sku: int
    location: int
    stock: int

    def encode_body(self) -> bytes:
        return _SKU_LOCATION_U64.pack(self.sku, self.location, self.stock)

    @classmethod
    def decode_body(cls, body: bytes) -> "LocationAdd":
        r = Reader(body, "LOCATION_ADD")
        sku, location, stock = r.unpack(_SKU_LOCATION_U64)
        r.finish()
        return cls(sku, location, stock)


@dataclass
class RegionSet:
    """REGION_SET (0x28), admin: shoppers of ``region`` (not 0) take their
    units from ``order`` (1..=``RESERVE_PREFS_MAX`` locations), first that
    has them, replacing the region's earlier order."""

    OPCODE: ClassVar[Opcode] = Opcode.REGION_SET
    sku: int
    region: int
    order: List[int]

    _ST: ClassVar[struct.Struct] = struct.Struct("<QH")

    def encode_body(self) -> bytes:
        return self._ST.pack(self.sku, self.region) + pack_ids(self.order, "REGION_SET")

    @classmethod
    def decode_body(cls, body: bytes) -> "RegionSet":
        r = Reader(body, "REGION_SET")
        sku, region = r.unpack(cls._ST)
        order = read_ids(r)
        r.finish()
        return cls(sku, region, order)


@dataclass
class Replicate:
    """REPLICATE (0x30), replication role: stream the log from ``from_lsn``."""

    OPCODE: ClassVar[Opcode] = Opcode.REPLICATE
    from_lsn: int

    def encode_body(self) -> bytes:
        return _SKU.pack(self.from_lsn)

    @classmethod
    def decode_body(cls, body: bytes) -> "Replicate":
        r = Reader(body, "REPLICATE")
        lsn = r.u64()
        r.finish()
        if lsn == 0:
            raise Malformed("REPLICATE: from_lsn must be >= 1")
        return cls(lsn)


@dataclass
class Settled:
    """SETTLED (0x31): every record up to ``settled_lsn`` is applied downstream."""

    OPCODE: ClassVar[Opcode] = Opcode.SETTLED
    settled_lsn: int

    def encode_body(self) -> bytes:
        return _SKU.pack(self.settled_lsn)

    @classmethod
    def decode_body(cls, body: bytes) -> "Settled":
        r = Reader(body, "SETTLED")
        lsn = r.u64()
        r.finish()
        return cls(lsn)


@dataclass
class StateDump(_Empty):
    """STATE_DUMP (0x32): the engine's whole state at one LSN."""

    OPCODE: ClassVar[Opcode] = Opcode.STATE_DUMP


def _put_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 255:
        raise InvalidRequest("string of %d bytes exceeds 255: %r" % (len(raw), s[:40]))
    return bytes((len(raw),)) + raw


@dataclass
class Follow:
    """FOLLOW (0x33), between cluster nodes: stream the leader's log."""

    OPCODE: ClassVar[Opcode] = Opcode.FOLLOW
    term: int
    last_lsn: int
    history: List[Tuple[int, int]]
    node_id: str
    addr: str

    def encode_body(self) -> bytes:
        history = self.history[-HISTORY_ENTRIES_MAX:]
        parts = [struct.pack("<QQH", self.term, self.last_lsn, len(history))]
        parts.extend(struct.pack("<QQ", t, lsn) for t, lsn in history)
        parts.append(_put_str(self.node_id))
        parts.append(_put_str(self.addr))
        return b"".join(parts)

    @classmethod
    def decode_body(cls, body: bytes) -> "Follow":
        r = Reader(body, "FOLLOW")
        term, last_lsn, n = r.u64(), r.u64(), r.u16()
        if n > HISTORY_ENTRIES_MAX:
            raise Malformed("FOLLOW: %d history entries, at most %d" % (n, HISTORY_ENTRIES_MAX))
        history = [(r.u64(), r.u64()) for _ in range(n)]
        node_id = r.string(r.u8(), "node_id")
        addr = r.string(r.u8(), "addr")
        r.finish()
        return cls(term, last_lsn, history, node_id, addr)


@dataclass
class FollowAck:
    """FOLLOW_ACK (0x34): a follower's durable and applied LSN (no reply)."""

    OPCODE: ClassVar[Opcode] = Opcode.FOLLOW_ACK
    durable_lsn: int
    applied_lsn: int

    def encode_body(self) -> bytes:
        return _SKU_USER.pack(self.durable_lsn, self.applied_lsn)

    @classmethod
    def decode_body(cls, body: bytes) -> "FollowAck":
        r = Reader(body, "FOLLOW_ACK")
        durable, applied = r.unpack(_SKU_USER)
        r.finish()
        return cls(durable, applied)


@dataclass
class SnapshotFetch(_Empty):
    """SNAPSHOT_FETCH (0x35): the leader's newest snapshot, in chunks."""

    OPCODE: ClassVar[Opcode] = Opcode.SNAPSHOT_FETCH


Request = Union[
    Hello,
    Ping,
    Cluster,
    Reserve,
    ReserveBatch,
    Confirm,
    Release,
    StatusRequest,
    Join,
    Poll,
    Batch,
    ReserveAt,
    Locations,
    SaleCreate,
    Restock,
    Pause,
    Resume,
    SaleMove,
    Placement,
    RestockAt,
    LocationAdd,
    RegionSet,
    Replicate,
    Settled,
    StateDump,
    Follow,
    FollowAck,
    SnapshotFetch,
]

# Derived from the Union, so a request type is listed once.
REQUEST_TYPES: Dict[int, type] = {int(cls.OPCODE): cls for cls in get_args(Request)}


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """The result of one operation: a ``Status`` and one number whose
    meaning depends on it (§5.1): ``expires_at`` (unix ms) for ``reserved``,
    the confirm time for ``confirmed``, ``expires_at`` for ``expired``, the
    retry delay (ms) for ``busy`` and ``rate_limited``, the server time for
    PING, the new total for RESTOCK and LOCATION_ADD, the location's new
    total for RESTOCK_AT, how long the sale's requests were held (µs) for
    SALE_MOVE.

    ``reservation_id`` is not on the wire: the client fills it in on the
    answer to ``reserve``, so a caller that let the client pick the id
    learns it (and can persist it, confirm or release with it).

    ``location`` is on the wire only in RESERVE_AT's reply (``OutcomeAt``):
    with ``reserved``, the location the units are held at (a retry answers
    the original one); 0 otherwise, and 0 in every other reply (a sale
    without locations has one, id 0)."""

    status: Status
    detail: int = 0
    reservation_id: Optional[int] = field(default=None, compare=False)
    location: int = 0

    def encode_body(self) -> bytes:
        return _OUTCOME.pack(int(self.status), self.detail)

    @classmethod
    def read(cls, r: Reader) -> "Outcome":
        status = r.status()
        return cls(status, r.u64())

    @classmethod
    def decode_body(cls, body: bytes) -> "Outcome":
        r = Reader(body, "outcome")
        outcome = cls.read(r)
        r.finish()
        return outcome

    @property
    def expires_at_ms(self) -> Optional[int]:
        """When a ``reserved`` (or ``expired``) hold ends, unix ms, by the
        server's clock; None for other statuses."""
        return self.detail if self.status in (Status.RESERVED, Status.EXPIRED) else None

    @property
    def retry_after_ms(self) -> Optional[int]:
        """The server's suggested delay for ``busy`` / ``rate_limited``."""
        return self.detail if self.status in (Status.BUSY, Status.RATE_LIMITED) else None


_OUTCOME_AT = struct.Struct("<HQH")


@dataclass
class OutcomeAt(Outcome):
    """RESERVE_AT reply (0x98), 12 bytes: an ``Outcome`` then ``location
    u16`` (see ``Outcome.location``)."""

    def encode_body(self) -> bytes:
        return _OUTCOME_AT.pack(int(self.status), self.detail, self.location)

    @classmethod
    def decode_body(cls, body: bytes) -> "OutcomeAt":
        r = Reader(body, "RESERVE_AT reply")
        status = r.status()
        detail, location = r.u64(), r.u16()
        r.finish()
        return cls(status, detail, location=location)


@dataclass
class HelloReply:
    """HELLO reply (0x81): the role granted and the server's limits."""

    status: Status
    role: Role
    frame_body_bytes_max: int
    batch_ops_max: int

    _ST: ClassVar[struct.Struct] = struct.Struct("<BIH")

    def encode_body(self) -> bytes:
        return _U16.pack(int(self.status)) + self._ST.pack(int(self.role), self.frame_body_bytes_max, self.batch_ops_max)

    @classmethod
    def decode_body(cls, body: bytes) -> "HelloReply":
        r = Reader(body, "HELLO reply")
        status = r.status()
        role_byte, fmax, bmax = r.unpack(cls._ST)
        r.finish()
        try:
            role = Role(role_byte)
        except ValueError:
            raise Malformed("HELLO reply: unknown role %d" % role_byte) from None
        return cls(status, role, fmax, bmax)


@dataclass
class BatchReply:
    """RESERVE_BATCH / BATCH reply: one ``Outcome`` per operation, in order."""

    results: List[Outcome]

    def encode_body(self) -> bytes:
        return _U16.pack(len(self.results)) + b"".join(o.encode_body() for o in self.results)

    @classmethod
    def decode_body(cls, body: bytes) -> "BatchReply":
        r = Reader(body, "batch reply")
        n = r.u16()
        if n > BATCH_OPS_MAX:
            raise Malformed("batch reply of %d results" % n)
        if r.remaining() != n * 10:
            raise Malformed("batch reply: %d results in %d bytes" % (n, r.remaining()))
        results = []
        for i in range(n):
            code, detail = _OUTCOME.unpack_from(body, 2 + 10 * i)
            status = Status.from_code(code)
            if status is None:
                raise Malformed("batch reply: unknown status %d" % code)
            results.append(Outcome(status, detail))
        return cls(results)


@dataclass
class QueueStats:
    """The queue part of a STATUS reply (flags bit 2)."""

    waiting: int
    admit_rate_per_s: int
    admitted_outstanding: int
    admitted_total: int
    oldest_wait_ms: int

    _ST: ClassVar[struct.Struct] = struct.Struct("<QIQQQ")

    def encode(self) -> bytes:
        return self._ST.pack(
            self.waiting, self.admit_rate_per_s, self.admitted_outstanding, self.admitted_total, self.oldest_wait_ms
        )

    @classmethod
    def read(cls, r: Reader) -> "QueueStats":
        return cls(*r.unpack(cls._ST))


@dataclass
class StatusReply:
    """STATUS reply (0x94): a consistent snapshot of a sale's counters.
    ``available + reserved + sold == total`` whenever ``status`` is ``ok``;
    with ``unknown_sku`` or ``busy`` every field is 0. ``hot``: the sale
    runs on a shard of its own now; ``pinned``: an admin chose its
    placement (flags bit 3). Unknown flag bits are ignored."""

    status: Status
    total: int = 0
    available: int = 0
    reserved: int = 0
    sold: int = 0
    limit_per_user: int = 0
    ttl_ms: int = 0
    reservations: int = 0
    hot: bool = False
    paused: bool = False
    queue: Optional[QueueStats] = None
    pinned: bool = False

    _ST: ClassVar[struct.Struct] = struct.Struct("<QQQQIQQB")

    def encode_body(self) -> bytes:
        flags = (
            (1 if self.hot else 0)
            | (2 if self.paused else 0)
            | (4 if self.queue is not None else 0)
            | (8 if self.pinned else 0)
        )
        body = _U16.pack(int(self.status)) + self._ST.pack(
            self.total,
            self.available,
            self.reserved,
            self.sold,
            self.limit_per_user,
            self.ttl_ms,
            self.reservations,
            flags,
        )
        return body + (self.queue.encode() if self.queue is not None else b"")

    @classmethod
    def decode_body(cls, body: bytes) -> "StatusReply":
        r = Reader(body, "STATUS reply")
        status = r.status()
        total, available, reserved, sold, limit, ttl_ms, reservations, flags = r.unpack(cls._ST)
        queue = QueueStats.read(r) if flags & 4 else None
        r.finish()
        return cls(
            status,
            total,
            available,
            reserved,
            sold,
            limit,
            ttl_ms,
            reservations,
            bool(flags & 1),
            bool(flags & 2),
            queue,
            bool(flags & 8),
        )


@dataclass
class QueueTicket:
    """JOIN / POLL reply (0x95 / 0x96): a user's place in a sale's line."""

    status: Status
    pre_start: bool = False
    stock_pending: bool = False
    position: int = 0
    estimated_wait_ms: int = 0
    admitted_until_ms: int = 0

    _ST: ClassVar[struct.Struct] = struct.Struct("<BQQQ")

    def encode_body(self) -> bytes:
        flags = (1 if self.pre_start else 0) | (2 if self.stock_pending else 0)
        return _U16.pack(int(self.status)) + self._ST.pack(
            flags, self.position, self.estimated_wait_ms, self.admitted_until_ms
        )

    @classmethod
    def decode_body(cls, body: bytes) -> "QueueTicket":
        r = Reader(body, "QUEUE_TICKET")
        status = r.status()
        flags, position, wait_ms, until_ms = r.unpack(cls._ST)
        r.finish()
        if flags & ~0b11:
            raise Malformed("QUEUE_TICKET: unknown flag bits %#04x" % flags)
        return cls(status, bool(flags & 1), bool(flags & 2), position, wait_ms, until_ms)


@dataclass
class LocationStatus:
    """One location's counters in a LOCATIONS reply:
    ``available + reserved + sold == total``."""

    location: int
    total: int = 0
    available: int = 0
    reserved: int = 0
    sold: int = 0

    _ST: ClassVar[struct.Struct] = struct.Struct("<HQQQQ")

    def encode(self) -> bytes:
        return self._ST.pack(self.location, self.total, self.available, self.reserved, self.sold)

    @classmethod
    def read(cls, r: Reader) -> "LocationStatus":
        return cls(*r.unpack(cls._ST))


@dataclass
class LocationsReply:
    """LOCATIONS reply (0x99): the sale's locations in the order they were
    added (its default order) with their counters, and its regions' orders
    as ``(region, [location, ...])``. The sale's STATUS counters are the
    sums over its locations; a sale made without locations has one, id 0,
    and no regions. With ``unknown_sku`` (or ``busy``, ...) both lists are
    empty."""

    status: Status
    locations: List[LocationStatus] = field(default_factory=list)
    regions: List[Tuple[int, List[int]]] = field(default_factory=list)

    def location(self, location: int) -> Optional[LocationStatus]:
        """The counters of one location, or None if the sale has no such one."""
        for entry in self.locations:
            if entry.location == location:
                return entry
        return None

    def region(self, region: int) -> Optional[List[int]]:
        """A region's order, or None if the sale does not map it (its
        shoppers get the default order)."""
        for r, order in self.regions:
            if r == region:
                return order
        return None

    def encode_body(self) -> bytes:
        parts = [_U16.pack(int(self.status)), bytes((len(self.locations),))]
        parts.extend(entry.encode() for entry in self.locations)
        parts.append(pack_regions(self.regions))
        return b"".join(parts)

    @classmethod
    def decode_body(cls, body: bytes) -> "LocationsReply":
        r = Reader(body, "LOCATIONS reply")
        status = r.status()
        count = r.u8()
        if count > LOCATIONS_PER_SALE_MAX:
            raise Malformed("LOCATIONS reply: %d locations, at most %d" % (count, LOCATIONS_PER_SALE_MAX))
        locations = [LocationStatus.read(r) for _ in range(count)]
        regions = read_regions(r)
        r.finish()
        return cls(status, locations, regions)


@dataclass
class LogBatch:
    """One LOG_BATCH frame of a REPLICATE stream (0xb0): records verified
    and LSNs checked to be consecutive."""

    status: Status
    durable_lsn: int
    server_time_ms: int
    records: List[Tuple[int, Event]] = field(default_factory=list)

    _ST: ClassVar[struct.Struct] = struct.Struct("<QQI")

    def encode_body(self) -> bytes:
        head = _U16.pack(int(self.status)) + self._ST.pack(self.durable_lsn, self.server_time_ms, len(self.records))
        return head + b"".join(encode_record(lsn, e) for lsn, e in self.records)

    @classmethod
    def decode_body(cls, body: bytes) -> "LogBatch":
        r = Reader(body, "LOG_BATCH")
        status = r.status()
        durable, now, count = r.unpack(cls._ST)
        return cls(status, durable, now, decode_records(body[22:], count, "LOG_BATCH"))


@dataclass
class SaleEntry:
    """A sale in a DUMP_CHUNK."""

    sku: int
    total: int
    available: int
    reserved: int
    sold: int
    limit_per_user: int
    ttl_ms: int
    hot: bool = False
    paused: bool = False

    KIND: ClassVar[int] = 1
    _ST: ClassVar[struct.Struct] = struct.Struct("<QQQQQIQB")

    def encode(self) -> bytes:
        flags = (1 if self.hot else 0) | (2 if self.paused else 0)
        return bytes((self.KIND,)) + self._ST.pack(
            self.sku, self.total, self.available, self.reserved, self.sold, self.limit_per_user, self.ttl_ms, flags
        )

    @classmethod
    def read(cls, r: Reader) -> "SaleEntry":
        sku, total, available, reserved, sold, limit, ttl_ms, flags = r.unpack(cls._ST)
        if flags & ~0b11:
            raise Malformed("DUMP_CHUNK: sale flags %#04x" % flags)
        return cls(sku, total, available, reserved, sold, limit, ttl_ms, bool(flags & 1), bool(flags & 2))


@dataclass
class LocationEntry:
    """One location's counters in a DUMP_CHUNK, after its sale's entry (only
    for a sale with locations: a sale with one location, id 0, and no
    regions has none)."""

    sku: int
    location: int
    total: int
    available: int
    reserved: int
    sold: int

    KIND: ClassVar[int] = 3
    _ST: ClassVar[struct.Struct] = struct.Struct("<QHQQQQ")

    def encode(self) -> bytes:
        return bytes((self.KIND,)) + self._ST.pack(
            self.sku, self.location, self.total, self.available, self.reserved, self.sold
        )

    @classmethod
    def read(cls, r: Reader) -> "LocationEntry":
        return cls(*r.unpack(cls._ST))


@dataclass
class ReservationEntry:
    """A reservation (any state) in a DUMP_CHUNK. At ``location`` 0 it is a
    RESERVATION entry (kind 2); at any other, RESERVATION_AT (kind 4, the
    same fields then ``location u16``)."""

    sku: int
    reservation_id: int
    user: int
    qty: int
    state: HoldState
    expires_at_ms: int
    settled_at_ms: int
    payment_ref: bytes = b""
    location: int = 0

    KIND: ClassVar[int] = 2
    AT_KIND: ClassVar[int] = 4

    def encode(self) -> bytes:
        return b"".join(
            (
                bytes((self.AT_KIND if self.location else self.KIND,)),
                _SKU.pack(self.sku),
                pack_u128(self.reservation_id),
                struct.pack("<QIBQQB", self.user, self.qty, int(self.state), self.expires_at_ms, self.settled_at_ms, len(self.payment_ref)),
                bytes(self.payment_ref),
                _U16.pack(self.location) if self.location else b"",
            )
        )

    @classmethod
    def read(cls, r: Reader, at: bool = False) -> "ReservationEntry":
        """Kind 2, or with ``at`` kind 4 (whose location must not be 0)."""
        sku, rid, user, qty, code = r.u64(), r.u128(), r.u64(), r.u32(), r.u8()
        try:
            state = HoldState(code)
        except ValueError:
            raise Malformed("DUMP_CHUNK: reservation state %d" % code) from None
        expires, settled, n = r.u64(), r.u64(), r.u8()
        if n > PAYMENT_REF_BYTES_MAX:
            raise Malformed("DUMP_CHUNK: payment_ref of %d bytes" % n)
        payment_ref = r.bytes(n)
        location = 0
        if at:
            location = r.u16()
            if location == 0:
                raise Malformed("DUMP_CHUNK: RESERVATION_AT at location 0")
        return cls(sku, rid, user, qty, state, expires, settled, payment_ref, location)


DumpEntry = Union[SaleEntry, LocationEntry, ReservationEntry]


@dataclass
class DumpChunk:
    """One DUMP_CHUNK frame (0xb2) of a STATE_DUMP; the last has ``last``."""

    status: Status
    last: bool
    lsn: int
    server_time_ms: int
    entries: List[DumpEntry] = field(default_factory=list)

    _ST: ClassVar[struct.Struct] = struct.Struct("<BQQI")

    def encode_body(self) -> bytes:
        head = _U16.pack(int(self.status)) + self._ST.pack(1 if self.last else 0, self.lsn, self.server_time_ms, len(self.entries))
        return head + b"".join(e.encode() for e in self.entries)

    @classmethod
    def decode_body(cls, body: bytes) -> "DumpChunk":
        r = Reader(body, "DUMP_CHUNK")
        status = r.status()
        flags, lsn, now, count = r.unpack(cls._ST)
        if flags & ~1:
            raise Malformed("DUMP_CHUNK: flags %#04x" % flags)
        entries: List[DumpEntry] = []
        for _ in range(count):
            kind = r.u8()
            if kind == SaleEntry.KIND:
                entries.append(SaleEntry.read(r))
            elif kind == LocationEntry.KIND:
                entries.append(LocationEntry.read(r))
            elif kind == ReservationEntry.KIND or kind == ReservationEntry.AT_KIND:
                entries.append(ReservationEntry.read(r, at=kind == ReservationEntry.AT_KIND))
            else:
                raise Malformed("DUMP_CHUNK: unknown entry kind %d" % kind)
        r.finish()
        return cls(status, bool(flags & 1), lsn, now, entries)


@dataclass
class NodeInfo:
    """One node as CLUSTER reports it."""

    id: str
    addr: str
    role: NodeRole
    in_sync_set: bool
    streaming: bool
    durable_lsn: int
    applied_lsn: int


def _node_role(code: int) -> NodeRole:
    try:
        return NodeRole(code)
    except ValueError:
        raise Malformed("unknown node role %d" % code) from None


@dataclass
class ClusterReply:
    """CLUSTER reply (0x83): the term, this node's role, the leader's address
    (empty while an election runs) and the nodes this one knows."""

    status: Status
    term: int
    role: NodeRole
    leader_addr: str
    nodes: List[NodeInfo] = field(default_factory=list)

    def encode_body(self) -> bytes:
        parts = [struct.pack("<HQB", int(self.status), self.term, int(self.role)), _put_str(self.leader_addr)]
        parts.append(bytes((len(self.nodes),)))
        for n in self.nodes:
            parts.append(_put_str(n.id))
            parts.append(_put_str(n.addr))
            flags = (1 if n.in_sync_set else 0) | (2 if n.streaming else 0)
            parts.append(struct.pack("<BBQQ", int(n.role), flags, n.durable_lsn, n.applied_lsn))
        return b"".join(parts)

    @classmethod
    def decode_body(cls, body: bytes) -> "ClusterReply":
        r = Reader(body, "CLUSTER reply")
        status = r.status()
        term = r.u64()
        role = _node_role(r.u8())
        leader = r.string(r.u8(), "leader_addr")
        nodes = []
        for _ in range(r.u8()):
            node_id = r.string(r.u8(), "node id")
            addr = r.string(r.u8(), "node addr")
            node_role = _node_role(r.u8())
            flags = r.u8()
            if flags & ~3:
                raise Malformed("CLUSTER reply: node flags %#04x" % flags)
            nodes.append(NodeInfo(node_id, addr, node_role, bool(flags & 1), bool(flags & 2), r.u64(), r.u64()))
        r.finish()
        return cls(status, term, role, leader, nodes)


#: Sales a PLACEMENT reply lists at most.
PLACEMENT_SALES_MAX = 10


@dataclass
class SalePlacement:
    """One sale in a PLACEMENT reply."""

    sku: int
    dedicated: bool
    pinned: bool
    #: Requests its shard decided per second over the monitor's last interval.
    decided_per_s: int


@dataclass
class PlacementReply:
    """PLACEMENT reply (0xa5): dedicated shards, the monitor's settings and
    the hottest sales (at most 10). Every field is 0 unless ``ok``."""

    status: Status
    dedicated_shards: int = 0
    dedicated_max: int = 0
    auto: bool = False
    sales: List[SalePlacement] = field(default_factory=list)

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<HHHBH")
    _SALE: ClassVar[struct.Struct] = struct.Struct("<QBI")

    def encode_body(self) -> bytes:
        sales = self.sales[:PLACEMENT_SALES_MAX]
        head = self._HEAD.pack(int(self.status), self.dedicated_shards, self.dedicated_max, 1 if self.auto else 0, len(sales))
        return head + b"".join(
            self._SALE.pack(s.sku, (1 if s.dedicated else 0) | (2 if s.pinned else 0), s.decided_per_s) for s in sales
        )

    @classmethod
    def decode_body(cls, body: bytes) -> "PlacementReply":
        r = Reader(body, "PLACEMENT reply")
        status = r.status()
        dedicated_shards = r.u16()
        dedicated_max = r.u16()
        auto = r.u8() != 0
        count = r.u16()
        if count > PLACEMENT_SALES_MAX:
            raise Malformed("PLACEMENT reply: %d sales" % count)
        sales = []
        for _ in range(count):
            sku = r.u64()
            placement = r.u8()
            sales.append(SalePlacement(sku, bool(placement & 1), bool(placement & 2), r.u32()))
        r.finish()
        return cls(status, dedicated_shards, dedicated_max, auto, sales)


@dataclass
class FollowBatch:
    """One FOLLOW_BATCH frame (0xb3) of a FOLLOW stream."""

    status: Status
    term: int
    commit_lsn: int
    truncate_to: int
    server_time_ms: int
    records: List[Tuple[int, Event]] = field(default_factory=list)

    _ST: ClassVar[struct.Struct] = struct.Struct("<QQQQI")

    def encode_body(self) -> bytes:
        head = _U16.pack(int(self.status)) + self._ST.pack(
            self.term, self.commit_lsn, self.truncate_to, self.server_time_ms, len(self.records)
        )
        return head + b"".join(encode_record(lsn, e) for lsn, e in self.records)

    @classmethod
    def decode_body(cls, body: bytes) -> "FollowBatch":
        r = Reader(body, "FOLLOW_BATCH")
        status = r.status()
        term, commit, truncate_to, now, count = r.unpack(cls._ST)
        return cls(status, term, commit, truncate_to, now, decode_records(body[38:], count, "FOLLOW_BATCH"))


@dataclass
class SnapshotChunk:
    """One SNAPSHOT_CHUNK frame (0xb5)."""

    status: Status
    last: bool
    lsn: int
    term: int
    offset: int
    total_bytes: int
    data: bytes = b""

    _ST: ClassVar[struct.Struct] = struct.Struct("<BQQQQI")

    def encode_body(self) -> bytes:
        return _U16.pack(int(self.status)) + self._ST.pack(
            1 if self.last else 0, self.lsn, self.term, self.offset, self.total_bytes, len(self.data)
        ) + bytes(self.data)

    @classmethod
    def decode_body(cls, body: bytes) -> "SnapshotChunk":
        r = Reader(body, "SNAPSHOT_CHUNK")
        status = r.status()
        flags, lsn, term, offset, total, n = r.unpack(cls._ST)
        if flags & ~1:
            raise Malformed("SNAPSHOT_CHUNK: flags %#04x" % flags)
        if n > SNAPSHOT_CHUNK_BYTES_MAX:
            raise Malformed("SNAPSHOT_CHUNK: %d bytes exceed %d" % (n, SNAPSHOT_CHUNK_BYTES_MAX))
        data = r.bytes(n)
        r.finish()
        return cls(status, bool(flags & 1), lsn, term, offset, total, data)


@dataclass
class ErrorReply:
    """ERROR (0xff): a request that could not be handled. Act on ``status``
    alone; the message is for logs."""

    status: Status
    message: str = ""

    def encode_body(self) -> bytes:
        raw = self.message.encode("utf-8")
        if len(raw) > ERROR_MESSAGE_BYTES_MAX:
            # Truncate on a character boundary, as the server does.
            raw = raw[:ERROR_MESSAGE_BYTES_MAX].decode("utf-8", "ignore").encode("utf-8")
        return struct.pack("<HH", int(self.status), len(raw)) + raw

    @classmethod
    def decode_body(cls, body: bytes) -> "ErrorReply":
        r = Reader(body, "ERROR")
        status = r.status()
        n = r.u16()
        if n > ERROR_MESSAGE_BYTES_MAX:
            raise Malformed("ERROR: message of %d bytes exceeds %d" % (n, ERROR_MESSAGE_BYTES_MAX))
        message = r.string(n, "message")
        r.finish()
        return cls(status, message)


Reply = Union[
    HelloReply,
    Outcome,
    OutcomeAt,
    LocationsReply,
    BatchReply,
    StatusReply,
    QueueTicket,
    LogBatch,
    DumpChunk,
    ClusterReply,
    PlacementReply,
    FollowBatch,
    SnapshotChunk,
    ErrorReply,
]

#: The reply body type of each request opcode (FOLLOW_ACK has no reply).
REPLY_TYPES: Dict[int, type] = {
    Opcode.HELLO: HelloReply,
    Opcode.PING: Outcome,
    Opcode.CLUSTER: ClusterReply,
    Opcode.RESERVE: Outcome,
    Opcode.RESERVE_BATCH: BatchReply,
    Opcode.CONFIRM: Outcome,
    Opcode.RELEASE: Outcome,
    Opcode.STATUS: StatusReply,
    Opcode.JOIN: QueueTicket,
    Opcode.POLL: QueueTicket,
    Opcode.BATCH: BatchReply,
    Opcode.RESERVE_AT: OutcomeAt,
    Opcode.LOCATIONS: LocationsReply,
    Opcode.SALE_CREATE: Outcome,
    Opcode.RESTOCK: Outcome,
    Opcode.PAUSE: Outcome,
    Opcode.RESUME: Outcome,
    Opcode.SALE_MOVE: Outcome,
    Opcode.PLACEMENT: PlacementReply,
    Opcode.RESTOCK_AT: Outcome,
    Opcode.LOCATION_ADD: Outcome,
    Opcode.REGION_SET: Outcome,
    Opcode.REPLICATE: LogBatch,
    Opcode.SETTLED: Outcome,
    Opcode.STATE_DUMP: DumpChunk,
    Opcode.FOLLOW: FollowBatch,
    Opcode.SNAPSHOT_FETCH: SnapshotChunk,
}


# ---------------------------------------------------------------------------
# Frames <-> messages
# ---------------------------------------------------------------------------


def encode_request(request: Request, request_id: int) -> bytes:
    """A complete request frame."""
    try:
        body = request.encode_body()
    except struct.error as e:
        # A field out of its wire range (negative, or over u64/u32).
        raise InvalidRequest("%s: %s" % (type(request).__name__, e)) from None
    return encode_frame(int(request.OPCODE), request_id, body)


def encode_reply(reply: Reply, request_opcode: int, request_id: int) -> bytes:
    """A complete reply frame to a request of ``request_opcode``."""
    opcode = ERROR_OPCODE if isinstance(reply, ErrorReply) else (request_opcode | REPLY_BIT)
    return encode_frame(opcode, request_id, reply.encode_body())


def decode_request(frame: Frame) -> Request:
    """Parse a request frame as the server would; ``FrameError`` carries the
    status it would answer (``unknown_opcode``, ``malformed_body``,
    ``batch_too_large``)."""
    cls = REQUEST_TYPES.get(frame.opcode)
    if cls is None:
        raise FrameError(Status.UNKNOWN_OPCODE, frame.request_id, "unknown request opcode %#04x" % frame.opcode)
    try:
        return cls.decode_body(frame.body)  # type: ignore[attr-defined,no-any-return]
    except BatchTooLarge as e:
        raise FrameError(Status.BATCH_TOO_LARGE, frame.request_id, str(e)) from None
    except Malformed as e:
        raise FrameError(Status.MALFORMED_BODY, frame.request_id, str(e)) from None


def decode_reply(frame: Frame, request_opcode: Optional[int] = None) -> Reply:
    """Parse a reply frame. With ``request_opcode``, also check that the
    reply answers that request (§2.4): its opcode must be the request's
    ``| 0x80`` or an ERROR. ``Malformed`` on any mismatch."""
    if frame.opcode == ERROR_OPCODE:
        return ErrorReply.decode_body(frame.body)
    if request_opcode is not None and frame.opcode != (request_opcode | REPLY_BIT):
        raise Malformed("reply opcode %#04x to a request of opcode %#04x" % (frame.opcode, request_opcode))
    cls = REPLY_TYPES.get(frame.opcode & ~REPLY_BIT) if frame.opcode & REPLY_BIT else None
    if cls is None:
        raise Malformed("unknown reply opcode %#04x" % frame.opcode)
    return cls.decode_body(frame.body)  # type: ignore[attr-defined,no-any-return]
