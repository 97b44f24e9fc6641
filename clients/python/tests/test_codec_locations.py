"""Stock in several locations (PROTOCOL.md §5.4a, §5.8b, §5.9, §5.10a,
§5.12, §5.14, §6.2a): the new bodies' layouts and sizes, strict decoding
(the server's ``malformed_body`` cases), the older-kind rule of events and
dump entries at location 0, and the client's argument checks. Offline: no
server is needed (the client checks raise before anything connects)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from stampede import AsyncClient, Client, LocationsReply, LocationStatus, OutcomeAt, SaleLocations
from stampede import aio
from stampede import events as ev
from stampede.errors import FrameError, InvalidRequest, Malformed
from stampede.frame import Frame, decode_frame
from stampede.limits import LOCATIONS_PER_SALE_MAX, REGIONS_PER_SALE_MAX, RESERVE_PREFS_MAX
from stampede.messages import (
    DumpChunk,
    LocationAdd,
    LocationEntry,
    Locations,
    Outcome,
    QueueConfig,
    RegionSet,
    ReservationEntry,
    Reserve,
    ReserveAt,
    RestockAt,
    SaleCreate,
    SaleEntry,
    decode_reply,
    decode_request,
    encode_request,
)
from stampede.status import HoldState, Opcode, Status

ID = 0x0123456789ABCDEFFEDCBA9876543210
RESERVE_OP = Reserve(42, 7, 1, ID).encode_body()


def roundtrip(request: Any) -> Any:
    return decode_request(decode_frame(encode_request(request, 9)))


def refused(opcode: int, body: bytes) -> None:
    """The server would answer ``malformed_body`` (and close): so does the
    decoder, with the request id."""
    with pytest.raises(FrameError) as e:
        decode_request(Frame(opcode, 9, body))
    assert (e.value.status, e.value.request_id) == (Status.MALFORMED_BODY, 9), e.value


# --- RESERVE_AT -----------------------------------------------------------


def test_reserve_at_layout_and_round_trip() -> None:
    default = ReserveAt(42, 7, 1, ID)
    assert default.encode_body() == RESERVE_OP + b"\x00\x00\x00"  # region 0, count 0: 39 bytes
    region = ReserveAt(42, 7, 1, ID, region=0x0102)
    assert region.encode_body() == RESERVE_OP + b"\x02\x01\x00"
    listed = ReserveAt(42, 7, 1, ID, locations=[3, 0x0201])
    assert listed.encode_body() == RESERVE_OP + b"\x00\x00\x02" + b"\x03\x00\x01\x02"
    assert listed.wire_bytes() == len(listed.encode_body()) == 43
    assert listed.op == Reserve(42, 7, 1, ID)
    for n in range(RESERVE_PREFS_MAX + 1):
        m = ReserveAt(42, 7, 1, ID, locations=list(range(1, n + 1)))
        assert len(m.encode_body()) == 39 + 2 * n
        assert roundtrip(m) == m
    for m in (default, region, ReserveAt(1, 2, 3, (1 << 128) - 1, locations=[0xFFFF])):
        assert roundtrip(m) == m
    frame = decode_frame(encode_request(listed, 9))
    assert frame.opcode == 0x18


def test_reserve_at_region_and_count_both_non_zero_is_malformed() -> None:
    refused(Opcode.RESERVE_AT, RESERVE_OP + struct.pack("<HBH", 2, 1, 3))
    # Refused before sending, too: the server would close the connection.
    with pytest.raises(InvalidRequest):
        encode_request(ReserveAt(42, 7, 1, ID, region=2, locations=[3]), 1)


def test_reserve_at_count_over_the_limit_is_malformed() -> None:
    n = RESERVE_PREFS_MAX + 1
    refused(Opcode.RESERVE_AT, RESERVE_OP + struct.pack("<HB", 0, n) + struct.pack("<%dH" % n, *range(1, n + 1)))
    refused(Opcode.RESERVE_AT, RESERVE_OP + struct.pack("<HB", 0, 255))
    with pytest.raises(InvalidRequest):
        encode_request(ReserveAt(42, 7, 1, ID, locations=list(range(1, n + 1))), 1)


def test_reserve_at_lengths_are_exact() -> None:
    body = ReserveAt(42, 7, 1, ID, locations=[3, 1]).encode_body()
    refused(Opcode.RESERVE_AT, body[:-1])  # a location cut short
    refused(Opcode.RESERVE_AT, body + b"\x00")  # trailing byte
    refused(Opcode.RESERVE_AT, RESERVE_OP)  # a plain RESERVE body: no region, no count
    refused(Opcode.RESERVE_AT, RESERVE_OP + struct.pack("<HB", 0, 2) + b"\x03\x00")  # count 2, one id


def test_reserve_at_field_ranges_are_checked_before_sending() -> None:
    with pytest.raises(InvalidRequest):
        encode_request(ReserveAt(42, 7, 1, ID, locations=[1 << 16]), 1)
    with pytest.raises(InvalidRequest):
        encode_request(ReserveAt(42, 7, 1, ID, region=-1), 1)


def test_reserve_at_is_never_packed_into_a_batch() -> None:
    # BATCH carries RESERVE, CONFIRM and RELEASE only (§5.5a).
    coalesced: "tuple[type, ...]" = aio._COALESCED
    assert ReserveAt not in coalesced and not issubclass(ReserveAt, Reserve)


def test_reserve_at_reply_is_an_outcome_and_a_location() -> None:
    reply = OutcomeAt(Status.RESERVED, 1_795_000_600_000, location=3)
    body = reply.encode_body()
    assert body == struct.pack("<HQH", 1, 1_795_000_600_000, 3) and len(body) == 12
    got = decode_reply(Frame(0x98, 4, body), Opcode.RESERVE_AT)
    assert got == reply and isinstance(got, Outcome) and got.location == 3 and got.expires_at_ms == 1_795_000_600_000
    sold_out = decode_reply(Frame(0x98, 4, OutcomeAt(Status.SOLD_OUT).encode_body()), Opcode.RESERVE_AT)
    assert (sold_out.status, sold_out.location) == (Status.SOLD_OUT, 0)  # type: ignore[union-attr]
    busy = decode_reply(Frame(0x98, 4, OutcomeAt(Status.BUSY, 10).encode_body()), Opcode.RESERVE_AT)
    assert isinstance(busy, Outcome) and busy.retry_after_ms == 10
    assert aio._retry_after_s(busy) == 0.01  # the client's retry logic sees an Outcome
    for bad in (body[:10], body + b"\x00", struct.pack("<HQH", 9999, 0, 0)):
        with pytest.raises(Malformed):
            decode_reply(Frame(0x98, 4, bad), Opcode.RESERVE_AT)
    # Every other outcome has location 0 and keeps its 10 bytes.
    plain = Outcome(Status.RESERVED, 5)
    assert plain.location == 0 and len(plain.encode_body()) == 10
    assert OutcomeAt(Status.RESERVED, 5) != plain  # different replies


# --- LOCATIONS ------------------------------------------------------------


def test_locations_request_and_reply() -> None:
    assert Locations(42).encode_body() == struct.pack("<Q", 42)
    assert roundtrip(Locations(42)) == Locations(42)
    refused(Opcode.LOCATIONS, b"\x00" * 7)

    reply = LocationsReply(
        Status.OK,
        [LocationStatus(1, 60, 59, 0, 1), LocationStatus(3, 65, 63, 2, 0)],
        [(2, [3, 1]), (7, [1])],
    )
    body = reply.encode_body()
    assert len(body) == 2 + 1 + 34 * 2 + 1 + (3 + 4) + (3 + 2)
    got = decode_reply(Frame(0x99, 5, body), Opcode.LOCATIONS)
    assert got == reply
    assert reply.location(3) == LocationStatus(3, 65, 63, 2, 0) and reply.location(4) is None
    assert reply.region(2) == [3, 1] and reply.region(5) is None
    # unknown_sku: both counts 0.
    unknown = LocationsReply(Status.UNKNOWN_SKU)
    assert unknown.encode_body() == struct.pack("<HBB", 14, 0, 0)
    assert LocationsReply.decode_body(unknown.encode_body()) == unknown
    # A sale without locations has one, id 0.
    single = LocationsReply(Status.OK, [LocationStatus(0, 10, 9, 1, 0)])
    assert LocationsReply.decode_body(single.encode_body()) == single


def test_locations_reply_is_strict() -> None:
    body = LocationsReply(Status.OK, [LocationStatus(1, 1, 1, 0, 0)], [(2, [1])]).encode_body()
    for bad in (body[:-1], body + b"\x00"):
        with pytest.raises(Malformed):
            LocationsReply.decode_body(bad)
    n = LOCATIONS_PER_SALE_MAX + 1
    too_many = struct.pack("<HB", 0, n) + b"".join(LocationStatus(i).encode() for i in range(n)) + b"\x00"
    with pytest.raises(Malformed):
        LocationsReply.decode_body(too_many)
    n = REGIONS_PER_SALE_MAX + 1
    regions = struct.pack("<HB", 0, 0) + bytes((n,)) + b"".join(struct.pack("<HBH", r + 1, 1, 0) for r in range(n))
    with pytest.raises(Malformed):
        LocationsReply.decode_body(regions)
    for n in (0, RESERVE_PREFS_MAX + 1):  # a region's order: 1..=8 locations
        bad = struct.pack("<HBBHB", 0, 0, 1, 2, n) + b"\x01\x00" * n
        with pytest.raises(Malformed):
            LocationsReply.decode_body(bad)


# --- SALE_CREATE's locations section ----------------------------------------


def test_sale_create_with_locations() -> None:
    section = SaleLocations([(1, 60), (3, 40)], [(2, [3, 1])])
    assert section.stock == 100
    create = SaleCreate(42, 100, 2, 600_000, locations=section)
    body = create.encode_body()
    assert body[28] == 0b100
    assert body[29:] == bytes.fromhex("02" "0100" "3c00000000000000" "0300" "2800000000000000" "01" "0200" "02" "0300" "0100")
    assert roundtrip(create) == create
    # After the queue section when both are there; every flag bit used.
    both = SaleCreate(42, 100, 2, 600_000, True, QueueConfig(500, 0, 120_000, 7), section)
    body = both.encode_body()
    assert body[28] == 0b111 and body[29:53] == QueueConfig(500, 0, 120_000, 7).encode() and body[53:] == section.encode()
    assert roundtrip(both) == both
    # Without locations: the 29-byte body of old, flag bit 2 clear.
    assert len(SaleCreate(42, 100, 2, 600_000).encode_body()) == 29
    assert SaleLocations.of({1: 60, 3: 40}, {2: [3, 1]}) == section
    assert SaleLocations.of([(1, 60), (3, 40)], [(2, (3, 1))]) == section


def test_sale_create_unknown_flag_bits_are_malformed() -> None:
    body = bytearray(SaleCreate(42, 100, 2, 600_000).encode_body())
    for bit in (0x08, 0x10, 0x80):
        body[28] = bit
        refused(Opcode.SALE_CREATE, bytes(body))
    body[28] = 0x04  # locations announced, none there
    refused(Opcode.SALE_CREATE, bytes(body))


def test_sale_create_locations_section_limits() -> None:
    head = SaleCreate(42, 0, 2, 600_000, locations=SaleLocations([(1, 0)])).encode_body()[:29]

    def section(count: int, regions: bytes = b"\x00") -> bytes:
        return bytes((count,)) + b"".join(struct.pack("<HQ", i + 1, 0) for i in range(count)) + regions

    assert decode_request(Frame(Opcode.SALE_CREATE, 9, head + section(LOCATIONS_PER_SALE_MAX))) is not None
    refused(Opcode.SALE_CREATE, head + section(0))
    refused(Opcode.SALE_CREATE, head + section(LOCATIONS_PER_SALE_MAX + 1))
    n = REGIONS_PER_SALE_MAX
    ok_regions = bytes((n,)) + b"".join(struct.pack("<HBH", r + 1, 1, 1) for r in range(n))
    assert decode_request(Frame(Opcode.SALE_CREATE, 9, head + section(1, ok_regions))) is not None
    many = bytes((n + 1,)) + b"".join(struct.pack("<HBH", r + 1, 1, 1) for r in range(n + 1))
    refused(Opcode.SALE_CREATE, head + section(1, many))
    for k in (0, RESERVE_PREFS_MAX + 1):
        refused(Opcode.SALE_CREATE, head + section(1, struct.pack("<BHB", 1, 2, k) + b"\x01\x00" * k))
    refused(Opcode.SALE_CREATE, head + section(1) + b"\x00")  # trailing
    # The encoder refuses what the server would call malformed.
    for bad in (
        SaleLocations([]),
        SaleLocations([(i + 1, 1) for i in range(LOCATIONS_PER_SALE_MAX + 1)]),
        SaleLocations([(1, 1)], [(r + 1, [1]) for r in range(REGIONS_PER_SALE_MAX + 1)]),
        SaleLocations([(1, 1)], [(2, [])]),
        SaleLocations([(1, 1)], [(2, [1] * (RESERVE_PREFS_MAX + 1))]),
        SaleLocations([(1 << 16, 1)]),
    ):
        with pytest.raises(InvalidRequest):
            encode_request(SaleCreate(42, 1, 1, 1000, locations=bad), 1)
    # Repeated ids, region 0, a stock that does not add up: the server's to
    # refuse (invalid_argument), so they encode.
    odd = SaleCreate(42, 5, 1, 1000, locations=SaleLocations([(1, 1), (1, 1)], [(0, [1, 1])]))
    assert roundtrip(odd) == odd


# --- RESTOCK_AT, LOCATION_ADD, REGION_SET -----------------------------------


def test_restock_at_and_location_add() -> None:
    assert RestockAt(42, 3, 25).encode_body() == struct.pack("<QHQ", 42, 3, 25)
    assert LocationAdd(42, 5, 10).encode_body() == struct.pack("<QHQ", 42, 5, 10)
    for m in (RestockAt(42, 3, 25), LocationAdd(42, 5, 10), RestockAt((1 << 64) - 1, 0xFFFF, (1 << 64) - 1)):
        assert len(m.encode_body()) == 18 and roundtrip(m) == m
    for opcode in (Opcode.RESTOCK_AT, Opcode.LOCATION_ADD):
        refused(opcode, struct.pack("<QHQ", 42, 3, 25)[:-1])
        refused(opcode, struct.pack("<QHQ", 42, 3, 25) + b"\x00")
    with pytest.raises(InvalidRequest):
        encode_request(RestockAt(42, 1 << 16, 1), 1)
    for opcode, reply in ((Opcode.RESTOCK_AT, 65), (Opcode.LOCATION_ADD, 110), (Opcode.REGION_SET, 0)):
        got = decode_reply(Frame(opcode | 0x80, 3, Outcome(Status.OK, reply).encode_body()), opcode)
        assert got == Outcome(Status.OK, reply)


def test_region_set() -> None:
    m = RegionSet(42, 4, [5, 3, 1])
    assert m.encode_body() == struct.pack("<QHB3H", 42, 4, 3, 5, 3, 1) and len(m.encode_body()) == 11 + 2 * 3
    assert roundtrip(m) == m
    assert roundtrip(RegionSet(42, 4, list(range(RESERVE_PREFS_MAX)))) == RegionSet(42, 4, list(range(RESERVE_PREFS_MAX)))
    for n in (0, RESERVE_PREFS_MAX + 1):
        refused(Opcode.REGION_SET, struct.pack("<QHB", 42, 4, n) + b"\x01\x00" * n)
        with pytest.raises(InvalidRequest):
            encode_request(RegionSet(42, 4, [1] * n), 1)
    refused(Opcode.REGION_SET, m.encode_body()[:-1])
    refused(Opcode.REGION_SET, m.encode_body() + b"\x00")


# --- events -----------------------------------------------------------------


def test_reserved_and_restocked_take_the_older_kind_at_location_0() -> None:
    at0 = ev.Reserved(42, 7, 1, ID, 9, 8)
    assert at0.location == 0
    payload = at0.encode_payload()
    assert (payload[0], len(payload)) == (5, 53)
    assert ev.decode_event(payload) == at0
    at3 = ev.Reserved(42, 7, 1, ID, 9, 8, location=3)
    payload = at3.encode_payload()
    assert (payload[0], len(payload), payload[-2:]) == (16, 55, b"\x03\x00")
    assert payload[1:53] == at0.encode_payload()[1:]  # RESERVED's fields, then the location
    assert ev.decode_event(payload) == at3

    r0 = ev.Restocked(42, 25, 8)
    assert (r0.encode_payload()[0], len(r0.encode_payload())) == (2, 25) and ev.decode_event(r0.encode_payload()) == r0
    r3 = ev.Restocked(42, 25, 8, 3)
    payload = r3.encode_payload()
    assert (payload[0], len(payload), payload[-2:]) == (19, 27, b"\x03\x00")
    assert ev.decode_event(payload) == r3
    assert ev.EVENT_TYPES[16] is ev.Reserved and ev.EVENT_TYPES[19] is ev.Restocked


def test_at_kinds_with_location_0_or_cut_short_are_refused() -> None:
    for event in (ev.Reserved(42, 7, 1, ID, 9, 8, location=3), ev.Restocked(42, 25, 8, 3)):
        payload = bytearray(event.encode_payload())
        with pytest.raises(Malformed):
            ev.decode_event(bytes(payload[:-2]))  # the _AT kind without its location
        with pytest.raises(Malformed):
            ev.decode_event(bytes(payload) + b"\x00")
        payload[-2:] = b"\x00\x00"  # "not 0": the older kind is for location 0
        with pytest.raises(Malformed):
            ev.decode_event(bytes(payload))


def test_location_events() -> None:
    created = ev.SaleCreatedAt(0, 0, 0, False, 0, SaleLocations([(1, 0), (2, 0)], [(1, [2, 1])]))
    payload = created.encode_payload()
    assert (payload[0], len(payload)) == (17, 59)  # 30 + 1 + 2 x 10 + 1 + (2 + 1 + 2 x 2), as the Rust test
    assert ev.decode_event(payload) == created
    hot = ev.SaleCreatedAt(42, 2, 600_000, True, 5, SaleLocations([(1, 60)]))
    assert ev.decode_event(hot.encode_payload()) == hot
    bad = bytearray(hot.encode_payload())
    bad[21] = 2  # hot must be 0 or 1
    with pytest.raises(Malformed):
        ev.decode_event(bytes(bad))
    with pytest.raises(Malformed):  # no locations section
        ev.decode_event(hot.encode_payload()[:30])

    added = ev.LocationAdded(42, 5, 10, 7)
    assert added.encode_payload() == bytes((18,)) + struct.pack("<QHQQ", 42, 5, 10, 7) and len(added.encode_payload()) == 27
    assert ev.decode_event(added.encode_payload()) == added

    region = ev.RegionSet(0, 0, [1, 2], 0)
    assert (region.encode_payload()[0], len(region.encode_payload())) == (20, 24)
    assert ev.decode_event(region.encode_payload()) == region
    for n in (0, RESERVE_PREFS_MAX + 1):
        with pytest.raises(Malformed):
            ev.decode_event(bytes((20,)) + struct.pack("<QHB", 42, 4, n) + b"\x01\x00" * n + struct.pack("<Q", 0))
    with pytest.raises(Malformed):
        ev.decode_event(bytes((21,)) + bytes(16))  # a kind this version does not know: refused, never skipped
    assert {k: ev.EVENT_TYPES[k] for k in (17, 18, 20)} == {17: ev.SaleCreatedAt, 18: ev.LocationAdded, 20: ev.RegionSet}


# --- STATE_DUMP entries -----------------------------------------------------


def test_dump_entries_with_locations() -> None:
    held = ReservationEntry(42, ID, 7, 1, HoldState.HELD, 9, 0)
    assert held.location == 0
    assert (held.encode()[0], len(held.encode())) == (2, 55)
    at3 = ReservationEntry(42, ID, 7, 1, HoldState.CONFIRMED, 9, 10, b"pi_1", location=3)
    raw = at3.encode()
    assert (raw[0], len(raw), raw[-2:]) == (4, 57 + 4, b"\x03\x00")
    loc = LocationEntry(42, 3, 40, 39, 1, 0)
    assert (loc.encode()[0], len(loc.encode())) == (3, 43)
    chunk = DumpChunk(Status.OK, True, 7, 8, [SaleEntry(42, 100, 99, 1, 0, 2, 600_000), loc, held, at3])
    assert DumpChunk.decode_body(chunk.encode_body()) == chunk
    # RESERVATION_AT at location 0, or cut short: refused.
    zero = bytearray(at3.encode())
    zero[-2:] = b"\x00\x00"
    head = struct.pack("<HBQQI", 0, 1, 7, 8, 1)
    with pytest.raises(Malformed):
        DumpChunk.decode_body(head + bytes(zero))
    with pytest.raises(Malformed):
        DumpChunk.decode_body(head + raw[:-2])
    with pytest.raises(Malformed):
        DumpChunk.decode_body(head + bytes((5,)) + bytes(42))  # unknown entry kind


# --- the clients' argument checks (nothing is sent) --------------------------


def client_refuses(make: Any) -> None:
    """``make(client)`` raises InvalidRequest before any connection: the
    address has nobody listening, so a send would fail differently."""

    async def main() -> None:
        client = AsyncClient("127.0.0.1:9", "t", max_attempts=1, connect_timeout=0.5)
        try:
            with pytest.raises(InvalidRequest):
                await make(client)
            assert client.stats.connects == 0 and client.stats.frames_sent == 0
        finally:
            await client.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.reserve_at(1, 2, 1, 5, region=2, locations=[1]),
        lambda c: c.reserve_at(1, 2, 1, 5, locations=list(range(1, RESERVE_PREFS_MAX + 2))),
        lambda c: c.reserve_at(1, 2, 1, 5, locations=[1 << 16]),
        lambda c: c.reserve_at(1, 2, 1, 5, region=1 << 16),
        lambda c: c.reserve_at(1, 2, 1 << 32, 5),
        lambda c: c.locations(-1),
        lambda c: c.restock_at(1, 1 << 16, 1),
        lambda c: c.add_location(1, 2, -1),
        lambda c: c.set_region(1, 2, []),
        lambda c: c.set_region(1, 2, [1] * (RESERVE_PREFS_MAX + 1)),
        lambda c: c.set_region(1, 1 << 16, [1]),
        lambda c: c.create_sale(1, 10, 1, 1000, regions={2: [1]}),
        lambda c: c.create_sale(1, 10, 1, 1000, locations={}),
        lambda c: c.create_sale(1, 10, 1, 1000, locations={i + 1: 1 for i in range(LOCATIONS_PER_SALE_MAX + 1)}),
        lambda c: c.create_sale(1, 10, 1, 1000, locations={1: 10}, regions={r + 1: [1] for r in range(REGIONS_PER_SALE_MAX + 1)}),
        lambda c: c.create_sale(1, 10, 1, 1000, locations={1: 10}, regions={2: []}),
        lambda c: c.create_sale(1, 10, 1, 1000, locations={1: 10}, regions={2: [1 << 16]}),
        lambda c: c.create_sale(1, 10, 1, 1000, locations={1: 1.5}),
        lambda c: c.create_sale_at(1, 1, 1000, {1: 10}, {2: [1] * (RESERVE_PREFS_MAX + 1)}),
        lambda c: c.create_sale(1, 10, 1, 1000, locations=SaleLocations([(1, 10)], [(2, [1])]), regions={3: [1]}),
    ],
)
def test_client_checks_arguments_before_sending(call: Any) -> None:
    client_refuses(call)


def test_blocking_client_has_the_same_calls() -> None:
    for name in ("reserve_at", "locations", "create_sale_at", "restock_at", "add_location", "set_region"):
        assert callable(getattr(Client, name)) and callable(getattr(AsyncClient, name)), name
