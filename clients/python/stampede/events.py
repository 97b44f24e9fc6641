"""Engine events and the checksummed log record that carries one.

LOG_BATCH (the REPLICATE stream) and FOLLOW_BATCH frames carry the
server's write-ahead log records unchanged (PROTOCOL.md §5.12): each is
``crc32c u32, lsn u64, len u32, payload``, the payload being one event:
``kind u8`` then that kind's fields. A checkout client never needs these;
they are here so the package decodes every frame of the protocol (and so
every shared test vector), and for SRE scripts that read the log.

Kinds are never renumbered, and a consumer must refuse a kind it does not
know rather than skip it (skipping would silently diverge).

Locations (§6.2a): ``Reserved`` and ``Restocked`` have a ``location``. At
location 0 (a sale without locations has one, id 0) they are the older
kinds, RESERVED (5) and RESTOCKED (2); elsewhere RESERVED_AT (16) and
RESTOCKED_AT (19), the same fields then ``location u16``. Encoding picks
the kind as the server does, and an ``_AT`` kind naming location 0 is
malformed. CONFIRMED, RELEASED and EXPIRED act on the reservation's
location.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Dict, List, Tuple, Type, Union, get_args

from .checksum import crc32c
from .errors import Malformed
from .limits import PAYMENT_REF_BYTES_MAX, RECORD_PAYLOAD_BYTES_MAX
from .locations import SaleLocations, pack_ids, read_ids
from .wire import Reader, pack_u128

# Field codes of the fixed-size layouts below: Q u64, I u32, H u16, B u8
# (bool for ``hot``), X u128.
_CODES = {"Q": struct.Struct("<Q"), "I": struct.Struct("<I"), "H": struct.Struct("<H"), "B": struct.Struct("<B")}
_U16 = struct.Struct("<H")


class _Event:
    """Common encode/decode for the fixed-layout events."""

    KIND: ClassVar[int]
    LAYOUT: ClassVar[str]  # one field code per dataclass field, in order

    def encode_payload(self) -> bytes:
        out = [bytes((self.KIND,))]
        for code, f in zip(self.LAYOUT, fields(self)):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out.append(pack_u128(value) if code == "X" else _CODES[code].pack(int(value)))
        return b"".join(out)

    @classmethod
    def read(cls, r: Reader) -> "_Event":
        # A layout shorter than the fields leaves the rest to their defaults
        # (``location`` of the located events: see ``_Located``).
        values = []
        for code, f in zip(cls.LAYOUT, fields(cls)):  # type: ignore[arg-type]
            if code == "X":
                values.append(r.u128())
            elif code == "Q":
                values.append(r.u64())
            elif code == "I":
                values.append(r.u32())
            elif code == "H":
                values.append(r.u16())
            else:
                byte = r.u8()
                if f.type in ("bool", bool):
                    if byte > 1:
                        raise Malformed("%s: %s must be 0 or 1, is %d" % (cls.__name__, f.name, byte))
                    values.append(bool(byte))
                else:
                    values.append(byte)
        return cls(*values)


class _Located(_Event):
    """An event that happens at one location (PROTOCOL.md §5.12, "Locations"):
    ``location`` 0 (a sale without locations, or its first) is the older
    kind, ``KIND``; any other location is ``AT_KIND``, the same fields then
    ``location u16``. Encoding picks the kind as the server does, so a
    consumer sees one type whichever kind the record has."""

    AT_KIND: ClassVar[int]
    location: int

    def encode_payload(self) -> bytes:
        payload = super().encode_payload()
        if self.location == 0:
            return payload
        return bytes((self.AT_KIND,)) + payload[1:] + _U16.pack(self.location)

    @classmethod
    def read_at(cls, r: Reader) -> "_Event":
        """The ``AT_KIND`` layout: a location of 0 there is malformed (the
        spec says "not 0"; the server writes the older kind for it)."""
        event = cls.read(r)
        location = r.u16()
        if location == 0:
            raise Malformed("%s: location 0 in kind %d (kind %d is for location 0)" % (cls.__name__, cls.AT_KIND, cls.KIND))
        setattr(event, "location", location)
        return event


@dataclass
class SaleCreated(_Event):
    KIND: ClassVar[int] = 1
    LAYOUT: ClassVar[str] = "QQIQBQ"
    sku: int
    stock: int
    limit_per_user: int
    ttl_ms: int
    hot: bool
    at_ms: int


@dataclass
class Restocked(_Located):
    """RESTOCKED (kind 2) at location 0, RESTOCKED_AT (kind 19) elsewhere."""

    KIND: ClassVar[int] = 2
    AT_KIND: ClassVar[int] = 19
    LAYOUT: ClassVar[str] = "QQQ"
    sku: int
    qty: int
    at_ms: int
    location: int = 0


@dataclass
class Paused(_Event):
    KIND: ClassVar[int] = 3
    LAYOUT: ClassVar[str] = "QQ"
    sku: int
    at_ms: int


@dataclass
class Resumed(_Event):
    KIND: ClassVar[int] = 4
    LAYOUT: ClassVar[str] = "QQ"
    sku: int
    at_ms: int


@dataclass
class Reserved(_Located):
    """RESERVED (kind 5) at location 0, RESERVED_AT (kind 16) elsewhere."""

    KIND: ClassVar[int] = 5
    AT_KIND: ClassVar[int] = 16
    LAYOUT: ClassVar[str] = "QQIXQQ"
    sku: int
    user: int
    qty: int
    reservation_id: int
    expires_at_ms: int
    at_ms: int
    location: int = 0


@dataclass
class Confirmed(_Event):
    """The one event with a variable part: the payment reference."""

    KIND: ClassVar[int] = 6
    LAYOUT: ClassVar[str] = "QXQ"
    sku: int
    reservation_id: int
    at_ms: int
    payment_ref: bytes = b""

    def encode_payload(self) -> bytes:
        head = bytes((self.KIND,)) + struct.pack("<Q", self.sku) + pack_u128(self.reservation_id)
        return head + struct.pack("<QB", self.at_ms, len(self.payment_ref)) + bytes(self.payment_ref)

    @classmethod
    def read(cls, r: Reader) -> "Confirmed":
        sku, reservation_id, at_ms = r.u64(), r.u128(), r.u64()
        n = r.u8()
        if n > PAYMENT_REF_BYTES_MAX:
            raise Malformed("CONFIRMED: payment_ref of %d bytes" % n)
        return cls(sku, reservation_id, at_ms, r.bytes(n))


@dataclass
class Released(_Event):
    KIND: ClassVar[int] = 7
    LAYOUT: ClassVar[str] = "QXQ"
    sku: int
    reservation_id: int
    at_ms: int


@dataclass
class Expired(_Event):
    KIND: ClassVar[int] = 8
    LAYOUT: ClassVar[str] = "QXQ"
    sku: int
    reservation_id: int
    at_ms: int


@dataclass
class QueueConfigured(_Event):
    KIND: ClassVar[int] = 9
    LAYOUT: ClassVar[str] = "QIIQQQ"
    sku: int
    admit_rate_per_s: int
    admit_cap: int
    admission_ms: int
    start_at_ms: int
    at_ms: int


@dataclass
class QueueJoined(_Event):
    KIND: ClassVar[int] = 10
    LAYOUT: ClassVar[str] = "QQQ"
    sku: int
    user: int
    at_ms: int


@dataclass
class QueueStarted(_Event):
    KIND: ClassVar[int] = 11
    LAYOUT: ClassVar[str] = "QQQ"
    sku: int
    seed: int
    at_ms: int


@dataclass
class Admitted(_Event):
    KIND: ClassVar[int] = 12
    LAYOUT: ClassVar[str] = "QQQQ"
    sku: int
    user: int
    until_ms: int
    at_ms: int


@dataclass
class AdmissionLapsed(_Event):
    KIND: ClassVar[int] = 13
    LAYOUT: ClassVar[str] = "QQQ"
    sku: int
    user: int
    at_ms: int


@dataclass
class TermStarted(_Event):
    KIND: ClassVar[int] = 14
    LAYOUT: ClassVar[str] = "QQ"
    term: int
    at_ms: int


@dataclass
class SaleMoved(_Event):
    """The sale now runs on a shard of its own (``dedicated``) or in the
    pool; ``pinned``: an admin chose that. One placement byte on the wire."""

    KIND: ClassVar[int] = 15
    LAYOUT: ClassVar[str] = "QBQ"  # placement: bit 0 dedicated, bit 1 pinned
    sku: int
    dedicated: bool
    pinned: bool
    at_ms: int

    def encode_payload(self) -> bytes:
        placement = (1 if self.dedicated else 0) | (2 if self.pinned else 0)
        return bytes((self.KIND,)) + struct.pack("<QBQ", self.sku, placement, self.at_ms)

    @classmethod
    def read(cls, r: Reader) -> "SaleMoved":
        sku, placement = r.u64(), r.u8()
        if placement > 3:
            raise Malformed("SALE_MOVED: placement %#04x" % placement)
        return cls(sku, bool(placement & 1), bool(placement & 2), r.u64())


@dataclass
class SaleCreatedAt(_Event):
    """A sale whose stock is split over locations (one record, so a torn
    creation never leaves half of them): SALE_CREATE's locations section
    (``SaleLocations``) after the fixed fields. Each location starts with
    ``total = available = stock``; the sale's counters are their sums."""

    KIND: ClassVar[int] = 17
    LAYOUT: ClassVar[str] = "QIQBQ"
    sku: int
    limit_per_user: int
    ttl_ms: int
    hot: bool
    at_ms: int
    locations: SaleLocations

    def encode_payload(self) -> bytes:
        return super().encode_payload() + self.locations.encode()

    @classmethod
    def read(cls, r: Reader) -> "SaleCreatedAt":
        sku, limit_per_user, ttl_ms, hot, at_ms = r.u64(), r.u32(), r.u64(), r.u8(), r.u64()
        if hot > 1:
            raise Malformed("SaleCreatedAt: hot must be 0 or 1, is %d" % hot)
        return cls(sku, limit_per_user, ttl_ms, hot == 1, at_ms, SaleLocations.read(r))


@dataclass
class LocationAdded(_Event):
    """A new location of a running sale, last in its default order, with
    ``total = available = stock``."""

    KIND: ClassVar[int] = 18
    LAYOUT: ClassVar[str] = "QHQQ"
    sku: int
    location: int
    stock: int
    at_ms: int


@dataclass
class RegionSet(_Event):
    """Shoppers of ``region`` take their units from ``order``, first that
    has them (replacing the region's earlier order). Changes no counter."""

    KIND: ClassVar[int] = 20
    LAYOUT: ClassVar[str] = "QH"  # then n u8, n x location u16, at_ms u64
    sku: int
    region: int
    order: List[int]
    at_ms: int

    def encode_payload(self) -> bytes:
        return b"".join(
            (
                bytes((self.KIND,)),
                struct.pack("<QH", self.sku, self.region),
                pack_ids(self.order, "REGION_SET event"),
                struct.pack("<Q", self.at_ms),
            )
        )

    @classmethod
    def read(cls, r: Reader) -> "RegionSet":
        sku, region = r.u64(), r.u16()
        order = read_ids(r)
        return cls(sku, region, order, r.u64())


Event = Union[
    SaleCreated,
    Restocked,
    Paused,
    Resumed,
    Reserved,
    Confirmed,
    Released,
    Expired,
    QueueConfigured,
    QueueJoined,
    QueueStarted,
    Admitted,
    AdmissionLapsed,
    TermStarted,
    SaleMoved,
    SaleCreatedAt,
    LocationAdded,
    RegionSet,
]

# Derived from the Union, so an event type is listed once. The located
# events answer to two kinds: ``KIND`` (location 0) and ``AT_KIND``.
EVENT_TYPES: Dict[int, Type[_Event]] = {cls.KIND: cls for cls in get_args(Event)}
_AT_TYPES: Dict[int, Type[_Located]] = {
    cls.AT_KIND: cls for cls in get_args(Event) if isinstance(cls, type) and issubclass(cls, _Located)
}
EVENT_TYPES.update(_AT_TYPES)


def decode_event(payload: bytes) -> Event:
    """One event from a record payload (every byte must be used)."""
    r = Reader(payload, "event")
    kind = r.u8()
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise Malformed("unknown event kind %d" % kind)
    at = _AT_TYPES.get(kind)
    event = at.read_at(r) if at is not None else cls.read(r)
    r.finish()
    return event  # type: ignore[return-value]


# --- records -------------------------------------------------------------

#: Bytes before a record's payload: crc32c u32, lsn u64, len u32.
RECORD_HEADER_BYTES = 16
_RECORD_HEAD = struct.Struct("<IQI")
_LSN_LEN = struct.Struct("<QI")


def encode_record(lsn: int, event: Event) -> bytes:
    """One complete record; the checksum covers the LSN, length and payload."""
    payload = event.encode_payload()
    if len(payload) > RECORD_PAYLOAD_BYTES_MAX:
        raise ValueError("event encodes to %d bytes" % len(payload))
    body = _LSN_LEN.pack(lsn, len(payload)) + payload
    return struct.pack("<I", crc32c(body)) + body


def decode_record(buf: bytes, pos: int = 0) -> Tuple[int, Event, int]:
    """The record at ``buf[pos:]``: ``(lsn, event, bytes used)``."""
    if len(buf) - pos < RECORD_HEADER_BYTES:
        raise Malformed("record needs %d bytes, %d remain" % (RECORD_HEADER_BYTES, len(buf) - pos))
    stored, lsn, n = _RECORD_HEAD.unpack_from(buf, pos)
    if n > RECORD_PAYLOAD_BYTES_MAX:
        raise Malformed("record length %d exceeds %d" % (n, RECORD_PAYLOAD_BYTES_MAX))
    total = RECORD_HEADER_BYTES + n
    if len(buf) - pos < total:
        raise Malformed("record needs %d bytes, %d remain" % (total, len(buf) - pos))
    computed = crc32c(bytes(buf[pos + 4 : pos + total]))
    if computed != stored:
        raise Malformed("record checksum %#010x, computed %#010x" % (stored, computed))
    return lsn, decode_event(bytes(buf[pos + RECORD_HEADER_BYTES : pos + total])), total


def decode_records(buf: bytes, count: int, what: str) -> List[Tuple[int, Event]]:
    """``count`` records filling ``buf`` exactly, LSNs consecutive."""
    records: List[Tuple[int, Event]] = []
    pos = 0
    for i in range(count):
        try:
            lsn, event, used = decode_record(buf, pos)
        except Malformed as e:
            raise Malformed("%s record %d: %s" % (what, i, e)) from None
        if records and lsn != records[-1][0] + 1:
            raise Malformed("%s record %d: LSN %d after %d" % (what, i, lsn, records[-1][0]))
        records.append((lsn, event))
        pos += used
    if pos != len(buf):
        raise Malformed("%s: %d bytes after %d records" % (what, len(buf) - pos, count))
    return records
