"""The asyncio client against a real ``stampede-server`` (no mocks).

Each test starts its own server on a free port with its own data dir
(``start_server`` / ``server`` fixtures) and bounds every loop by count and
time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import struct
import time
from typing import Dict, List, Tuple

import pytest

from harness import ADMIN, CHECKOUT, TLS_DIR, ServerProcess, run
from stampede import (
    AsyncClient,
    AuthError,
    ConnectError,
    Outcome,
    QueueConfig,
    RequestTimeout,
    ServerError,
    Status,
    TLSError,
    TransportError,
    new_reservation_id,
)
from stampede.frame import Frame, FrameReader, encode_frame
from stampede.messages import ErrorReply, HelloReply, LocationsReply, Ping, Reserve, decode_reply
from stampede.status import Opcode, Role

HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


async def create_sale(addr: str, sku: int, stock: int, limit: int = 1, ttl_ms: int = HOUR_MS, **kw: object) -> None:
    async with AsyncClient(addr, ADMIN) as admin:
        outcome = await admin.create_sale(sku, stock, limit, ttl_ms, **kw)  # type: ignore[arg-type]
        assert outcome.status is Status.OK, outcome


def counters_of(reply: LocationsReply) -> List[Tuple[int, int, int, int, int]]:
    """A LOCATIONS reply's counters: (location, total, available, reserved, sold)."""
    return [(x.location, x.total, x.available, x.reserved, x.sold) for x in reply.locations]


def test_reserve_confirm_release(server: ServerProcess) -> None:
    async def main() -> None:
        await create_sale(server.addr, 1, stock=10, limit=2)
        async with AsyncClient(server.addr, CHECKOUT) as c:
            assert c.role is Role.CHECKOUT
            ping = await c.ping()
            assert ping.status is Status.OK and abs(ping.detail - now_ms()) < 60_000

            held = await c.reserve(1, user=7, qty=1)
            assert held.status is Status.RESERVED
            assert held.reservation_id is not None
            assert held.expires_at_ms is not None and held.detail > now_ms() + HOUR_MS - 60_000

            done = await c.confirm(held.reservation_id, b"pi_1")
            assert done.status is Status.CONFIRMED and done.detail > 0
            again = await c.confirm(held.reservation_id, b"pi_1")
            assert (again.status, again.detail) == (Status.CONFIRMED, done.detail), "a repeat answers the original time"
            assert (await c.confirm(held.reservation_id, b"pi_2")).status is Status.ID_CONFLICT
            assert (await c.release(held.reservation_id)).status is Status.ALREADY_CONFIRMED

            other = await c.reserve(1, user=8, qty=2)
            assert other.status is Status.RESERVED
            assert (await c.release(other.reservation_id)).status is Status.RELEASED  # type: ignore[arg-type]
            assert (await c.release(other.reservation_id)).status is Status.RELEASED  # type: ignore[arg-type]
            assert (await c.confirm(other.reservation_id, b"x")).status is Status.ALREADY_RELEASED  # type: ignore[arg-type]

            assert (await c.confirm(new_reservation_id())).status is Status.UNKNOWN_RESERVATION
            assert (await c.release(new_reservation_id())).status is Status.UNKNOWN_RESERVATION
            assert (await c.reserve(999, 7, 1)).status is Status.UNKNOWN_SKU
            assert (await c.reserve(1, 9, 0)).status is Status.INVALID_ARGUMENT
            assert (await c.reserve(1, 9, 11)).status is Status.INSUFFICIENT_STOCK

            s = await c.status(1)
            assert (s.status, s.total, s.available, s.reserved, s.sold) == (Status.OK, 10, 9, 0, 1)
            assert s.limit_per_user == 2 and s.ttl_ms == HOUR_MS and s.reservations == 0
            assert s.available + s.reserved + s.sold == s.total
            assert (await c.status(999)).status is Status.UNKNOWN_SKU

    run(main())


def test_admin_calls_and_the_queue(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.addr, ADMIN) as admin, AsyncClient(server.addr, CHECKOUT) as c:
            assert admin.role is Role.ADMIN
            assert (await admin.create_sale(5, 3, 1, HOUR_MS)).status is Status.OK
            assert (await admin.create_sale(5, 3, 1, HOUR_MS)).status is Status.SALE_EXISTS
            assert (await admin.create_sale(6, 3, 0, HOUR_MS)).status is Status.INVALID_ARGUMENT
            assert (await admin.pause(5)).status is Status.OK
            assert (await c.reserve(5, 1, 1)).status is Status.PAUSED
            assert (await c.status(5)).paused
            assert (await admin.resume(5)).status is Status.OK
            assert (await c.reserve(5, 1, 1)).status is Status.RESERVED
            restocked = await admin.restock(5, 4)
            assert (restocked.status, restocked.detail) == (Status.OK, 7)
            assert (await admin.restock(404, 4)).status is Status.UNKNOWN_SKU
            # SALE_MOVE: to a shard of its own and back, pinned; the sale sells throughout.
            assert (await admin.move_sale(5, True)).status is Status.OK
            s = await c.status(5)
            assert (s.hot, s.pinned, s.total) == (True, True, 7)
            assert (await admin.move_sale(5, True)).status is Status.OK, "idempotent"
            assert (await c.reserve(5, 2, 1)).status is Status.RESERVED
            assert (await admin.move_sale(5, False)).status is Status.OK
            s = await c.status(5)
            assert (s.hot, s.pinned, s.reserved) == (False, True, 2)
            assert (await admin.move_sale(404, True)).status is Status.UNKNOWN_SKU

            # A sale without a queue admits anyone.
            ticket = await c.join(5, 1)
            assert (ticket.status, ticket.admitted_until_ms) == (Status.ADMITTED, 0)
            # A queued sale: JOIN, POLL until admitted (bounded), then RESERVE.
            queue = QueueConfig(admit_rate_per_s=1000, admit_cap=0, admission_ms=60_000, start_at_ms=0)
            assert (await admin.create_sale(7, 10, 1, HOUR_MS, queue=queue)).status is Status.OK
            assert (await c.poll(7, 42)).status is Status.NO_TICKET
            assert (await c.reserve(7, 42, 1)).status is Status.NOT_ADMITTED
            ticket = await c.join(7, 42)
            assert ticket.status in (Status.WAITING, Status.ADMITTED)
            deadline = time.monotonic() + 5
            while ticket.status is not Status.ADMITTED and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                ticket = await c.poll(7, 42)
            assert ticket.status is Status.ADMITTED and ticket.admitted_until_ms > now_ms()
            assert (await c.reserve(7, 42, 1)).status is Status.RESERVED
            status = await c.status(7)
            assert status.queue is not None and status.queue.admit_rate_per_s == 1000

    run(main())


def test_stock_in_several_locations(server: ServerProcess) -> None:
    """A sale with two locations and a region: RESERVE_AT by preference, by
    region and in the default order; LOCATIONS' counters per location and
    their sums in STATUS; RESTOCK_AT, LOCATION_ADD, REGION_SET; and the
    same state after a restart (the new log events replay)."""

    async def main() -> None:
        async with AsyncClient(server.addr, ADMIN) as admin, AsyncClient(server.addr, CHECKOUT) as c:
            # Location 1 with 3 units, location 2 with 5; region 9 prefers 2.
            created = await admin.create_sale(40, 8, 5, HOUR_MS, locations={1: 3, 2: 5}, regions={9: [2, 1]})
            assert created.status is Status.OK, created
            again = await admin.create_sale_at(40, 5, HOUR_MS, {1: 3, 2: 5}, {9: [2, 1]})
            assert again.status is Status.SALE_EXISTS
            # The stock must add up; a region may only name the sale's locations.
            assert (await admin.create_sale(41, 9, 5, HOUR_MS, locations={1: 3, 2: 5})).status is Status.INVALID_ARGUMENT
            refused = await admin.create_sale(41, 3, 5, HOUR_MS, locations={1: 3}, regions={9: [4]})
            assert refused.status is Status.UNKNOWN_LOCATION

            loc = await c.locations(40)
            assert loc.status is Status.OK
            assert counters_of(loc) == [(1, 3, 3, 0, 0), (2, 5, 5, 0, 0)]
            assert loc.regions == [(9, [2, 1])]

            # The default order: the first location that has all the units.
            a = await c.reserve_at(40, 1, 2)
            assert (a.status, a.location) == (Status.RESERVED, 1), a
            # A list of preferences.
            b = await c.reserve_at(40, 2, 2, locations=[2, 1])
            assert (b.status, b.location) == (Status.RESERVED, 2), b
            # Never split: location 1 has one unit left, so two come from 2.
            rid = new_reservation_id()
            d = await c.reserve_at(40, 3, 2, rid, locations=[1, 2])
            assert (d.status, d.location, d.reservation_id) == (Status.RESERVED, 2, rid), d
            # A retry answers the original reservation and location, whatever
            # the preferences sent the second time, and reserves nothing more.
            retry = await c.reserve_at(40, 3, 2, rid, locations=[1])
            assert (retry.status, retry.detail, retry.location) == (Status.RESERVED, d.detail, 2)
            # Each location has one unit now.
            short = await c.reserve_at(40, 4, 2, locations=[1])
            assert (short.status, short.location) == (Status.INSUFFICIENT_STOCK, 0)
            assert (await c.reserve_at(40, 4, 2, locations=[1, 2])).status is Status.INSUFFICIENT_STOCK
            # The region's order: 2 first.
            e = await c.reserve_at(40, 4, 1, region=9)
            assert (e.status, e.location) == (Status.RESERVED, 2), e
            assert (await c.reserve_at(40, 5, 1, locations=[2])).status is Status.SOLD_OUT
            assert (await c.reserve_at(40, 5, 1, locations=[7])).status is Status.UNKNOWN_LOCATION
            # A region the sale does not map: the default order.
            f = await c.reserve_at(40, 5, 1, region=77)
            assert (f.status, f.location) == (Status.RESERVED, 1), f

            loc = await c.locations(40)
            assert counters_of(loc) == [(1, 3, 0, 3, 0), (2, 5, 0, 5, 0)]
            s = await c.status(40)
            assert (s.total, s.available, s.reserved, s.sold) == (8, 0, 8, 0), "STATUS sums the locations"

            # CONFIRM and RELEASE act on the reservation's location.
            assert (await c.release(a.reservation_id)).status is Status.RELEASED  # type: ignore[arg-type]
            assert (await c.confirm(b.reservation_id, b"pi_b")).status is Status.CONFIRMED  # type: ignore[arg-type]
            assert counters_of(await c.locations(40)) == [(1, 3, 2, 1, 0), (2, 5, 0, 3, 2)]

            # Admin: restock one location, add one, map a region.
            restocked = await admin.restock_at(40, 2, 4)
            assert (restocked.status, restocked.detail) == (Status.OK, 9), "detail: the location's new total"
            assert (await admin.restock_at(40, 7, 1)).status is Status.UNKNOWN_LOCATION
            added = await admin.add_location(40, 3, 10)
            assert (added.status, added.detail) == (Status.OK, 22), "detail: the sale's new total"
            assert (await admin.add_location(40, 3, 10)).status is Status.LOCATION_EXISTS
            assert (await admin.set_region(40, 5, [3, 1])).status is Status.OK
            assert (await admin.set_region(40, 5, [8])).status is Status.UNKNOWN_LOCATION
            assert (await admin.set_region(40, 0, [1])).status is Status.INVALID_ARGUMENT
            g = await c.reserve_at(40, 6, 1, region=5)
            assert (g.status, g.location) == (Status.RESERVED, 3), g

            loc = await c.locations(40)
            assert counters_of(loc) == [(1, 3, 2, 1, 0), (2, 9, 4, 3, 2), (3, 10, 9, 1, 0)], "added last"
            assert dict((r, o) for r, o in loc.regions) == {9: [2, 1], 5: [3, 1]}
            s = await c.status(40)
            assert (s.total, s.available, s.reserved, s.sold) == (22, 15, 5, 2)

            # The per-user limit counts every location: user 4 holds 1 at 2.
            limited = await c.reserve_at(40, 4, 5, locations=[3])
            assert limited.status is Status.LIMIT_EXCEEDED

            # RESERVE takes the default order; RESTOCK adds to the first
            # location and answers the sale's new total.
            h = await c.reserve(40, 7, 1)
            assert (h.status, h.location) == (Status.RESERVED, 0), "RESERVE's reply carries no location"
            restocked = await admin.restock(40, 1)
            assert (restocked.status, restocked.detail) == (Status.OK, 23)
            assert counters_of(await c.locations(40)) == [(1, 4, 2, 2, 0), (2, 9, 4, 3, 2), (3, 10, 9, 1, 0)]

        # kill -9 and a restart replay the log: the same locations, regions
        # and holds.
        await asyncio.get_running_loop().run_in_executor(None, server.restart)
        async with AsyncClient(server.addr, CHECKOUT) as c:
            after = await c.locations(40)
            assert counters_of(after) == [(1, 4, 2, 2, 0), (2, 9, 4, 3, 2), (3, 10, 9, 1, 0)]
            assert dict((r, o) for r, o in after.regions) == {9: [2, 1], 5: [3, 1]}
            retry = await c.reserve_at(40, 3, 2, rid)
            assert (retry.status, retry.detail, retry.location) == (Status.RESERVED, d.detail, 2)

    run(main())


def test_a_sale_without_locations_has_one_with_id_0(server: ServerProcess) -> None:
    async def main() -> None:
        await create_sale(server.addr, 43, stock=5, limit=5)
        async with AsyncClient(server.addr, CHECKOUT) as c:
            loc = await c.locations(43)
            assert (loc.status, counters_of(loc), loc.regions) == (Status.OK, [(0, 5, 5, 0, 0)], [])
            held = await c.reserve_at(43, 1, 2)
            assert (held.status, held.location) == (Status.RESERVED, 0)
            # RESERVE is RESERVE_AT in the default order: the same outcome.
            assert (await c.reserve(43, 1, 2, held.reservation_id)).detail == held.detail
            assert (await c.reserve_at(43, 2, 1, locations=[1])).status is Status.UNKNOWN_LOCATION
            assert counters_of(await c.locations(43)) == [(0, 5, 3, 2, 0)]
            unknown = await c.locations(404)
            assert (unknown.status, unknown.locations, unknown.regions) == (Status.UNKNOWN_SKU, [], [])
            assert (await c.reserve_at(404, 1, 1, region=3)).status is Status.UNKNOWN_SKU
        async with AsyncClient(server.addr, ADMIN) as admin:
            # A sale without locations can grow one.
            assert (await admin.add_location(43, 7, 4)).status is Status.OK
            async with AsyncClient(server.addr, CHECKOUT) as c:
                assert [x.location for x in (await c.locations(43)).locations] == [0, 7]
                moved = await c.reserve_at(43, 3, 4, locations=[7])
                assert (moved.status, moved.location) == (Status.RESERVED, 7)

    run(main())


def test_reserve_at_with_a_region_and_a_list_is_malformed_on_the_server(server: ServerProcess) -> None:
    """The client refuses to send it; the server, sent the bytes anyway,
    answers ``malformed_body`` with the request's id and closes (§5.4a)."""
    body = Reserve(42, 7, 1, new_reservation_id()).encode_body() + bytes.fromhex("0200" "01" "0300")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        reader = FrameReader()
        frames: List[Frame] = []
        s.sendall(encode_frame(Opcode.HELLO, 1, struct.pack("<H", len(CHECKOUT)) + CHECKOUT.encode()))
        deadline = time.monotonic() + 5
        while not frames and time.monotonic() < deadline:
            frames.extend(reader.feed(s.recv(4096)))
        hello = decode_reply(frames[0], Opcode.HELLO)
        assert isinstance(hello, HelloReply) and hello.status is Status.OK
        s.sendall(encode_frame(Opcode.RESERVE_AT, 2, body))
        while time.monotonic() < deadline:
            data = s.recv(4096)
            if not data:
                break  # the server closes after a protocol error
            frames.extend(reader.feed(data))
        assert [f.request_id for f in frames] == [1, 2]
        reply = decode_reply(frames[1], Opcode.RESERVE_AT)
        assert isinstance(reply, ErrorReply) and reply.status is Status.MALFORMED_BODY


def test_expiry(server: ServerProcess) -> None:
    async def main() -> None:
        await create_sale(server.addr, 2, stock=1, ttl_ms=300)
        async with AsyncClient(server.addr, CHECKOUT) as c:
            held = await c.reserve(2, 1, 1)
            assert held.status is Status.RESERVED
            assert (await c.reserve(2, 2, 1)).status is Status.SOLD_OUT
            # The server expires the hold in the background: its unit returns.
            deadline = time.monotonic() + 5
            status = await c.status(2)
            while status.available != 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                status = await c.status(2)
            assert (status.available, status.reserved, status.reservations) == (1, 0, 0)
            late = await c.confirm(held.reservation_id, b"pi_late")  # type: ignore[arg-type]
            assert (late.status, late.detail) == (Status.EXPIRED, held.detail), "expired, detail = expires_at"
            assert (await c.release(held.reservation_id)).status is Status.EXPIRED  # type: ignore[arg-type]
            # The retry of the original RESERVE still answers the original outcome.
            again = await c.reserve(2, 1, 1, held.reservation_id)
            assert (again.status, again.detail) == (Status.RESERVED, held.detail)
            assert (await c.status(2)).available == 1, "and reserves nothing"

    run(main())


def test_per_user_limit_holds_across_connections(server: ServerProcess) -> None:
    async def main() -> None:
        await create_sale(server.addr, 3, stock=100, limit=2)
        clients = [AsyncClient(server.addr, CHECKOUT, connections=2) for _ in range(3)]
        for c in clients:
            await c.connect()
        try:
            # Twelve attempts by one user over six connections, at once.
            outcomes = await asyncio.gather(*[clients[i % 3].reserve(3, 77, 1) for i in range(12)])
            by_status: Dict[Status, List[Outcome]] = {}
            for o in outcomes:
                by_status.setdefault(o.status, []).append(o)
            assert {s: len(v) for s, v in by_status.items()} == {Status.RESERVED: 2, Status.LIMIT_EXCEEDED: 10}
            # Giving one back makes room for exactly one more.
            freed = by_status[Status.RESERVED][0].reservation_id
            assert (await clients[1].release(freed)).status is Status.RELEASED  # type: ignore[arg-type]
            more = await asyncio.gather(*[clients[i % 3].reserve(3, 77, 1) for i in range(6)])
            assert sorted(o.status for o in more) == [Status.RESERVED] + [Status.LIMIT_EXCEEDED] * 5
            status = await clients[0].status(3)
            assert (status.reserved, status.available) == (2, 98)
        finally:
            for c in clients:
                await c.close()

    run(main())


def test_idempotent_retry_with_the_same_id(server: ServerProcess) -> None:
    async def main() -> None:
        await create_sale(server.addr, 4, stock=1, limit=5)
        rid = new_reservation_id()
        async with AsyncClient(server.addr, CHECKOUT) as a, AsyncClient(server.addr, CHECKOUT) as b:
            first = await a.reserve(4, 7, 1, rid)
            assert first.status is Status.RESERVED and first.reservation_id == rid
            # The same request on another connection (a retry after an unknown
            # outcome): the original outcome, nothing reserved twice, even
            # though the sale is now sold out and then paused.
            retry = await b.reserve(4, 7, 1, rid)
            assert (retry.status, retry.detail) == (Status.RESERVED, first.detail)
            assert (await b.reserve(4, 8, 1)).status is Status.SOLD_OUT
            async with AsyncClient(server.addr, ADMIN) as admin:
                assert (await admin.pause(4)).status is Status.OK
            retry = await a.reserve(4, 7, 1, rid)
            assert (retry.status, retry.detail) == (Status.RESERVED, first.detail)
            # The same id for a different request is a conflict, not a reservation.
            assert (await a.reserve(4, 7, 2, rid)).status is Status.ID_CONFLICT
            status = await b.status(4)
            assert (status.reserved, status.available, status.reservations) == (1, 0, 1)
            # A refused RESERVE claims nothing: its id is decided afresh later.
            refused_id = new_reservation_id()
            assert (await a.reserve(4, 9, 1, refused_id)).status is Status.PAUSED
            assert (await a.confirm(refused_id)).status is Status.UNKNOWN_RESERVATION

    run(main())


def test_last_unit_race_has_exactly_one_winner(server: ServerProcess) -> None:
    async def main() -> None:
        rounds, contenders = 5, 300
        async with AsyncClient(server.addr, ADMIN) as admin:
            for sku in range(100, 100 + rounds):
                assert (await admin.create_sale(sku, 1, 1, HOUR_MS)).status is Status.OK
        clients = [AsyncClient(server.addr, CHECKOUT, connections=3) for _ in range(3)]
        try:
            for c in clients:
                await c.connect()
            for sku in range(100, 100 + rounds):
                start = asyncio.Event()

                async def contender(i: int) -> Outcome:
                    await start.wait()
                    return await clients[i % 3].reserve(sku, 1000 + i, 1)

                tasks = [asyncio.ensure_future(contender(i)) for i in range(contenders)]
                await asyncio.sleep(0)
                start.set()
                outcomes = await asyncio.gather(*tasks)
                winners = [o for o in outcomes if o.status is Status.RESERVED]
                assert len(winners) == 1, "sku %d: %d winners" % (sku, len(winners))
                assert all(o.status is Status.SOLD_OUT for o in outcomes if o is not winners[0])
                status = await clients[0].status(sku)
                assert (status.available, status.reserved, status.reservations) == (0, 1, 1)
                # The winner's id is the one that holds the unit.
                assert (await clients[1].confirm(winners[0].reservation_id, b"won")).status is Status.CONFIRMED  # type: ignore[arg-type]
        finally:
            for c in clients:
                await c.close()

    run(main())


def test_pipelining_thousands_of_requests(server: ServerProcess) -> None:
    n = 5000

    async def main() -> None:
        await create_sale(server.addr, 9, stock=2 * n, limit=1)
        # Coalescing on (the default): one gather of 5000 reserves.
        async with AsyncClient(server.addr, CHECKOUT, connections=2) as c:
            outcomes = await asyncio.gather(*[c.reserve(9, 10_000 + i, 1) for i in range(n)])
            assert [o.status for o in outcomes] == [Status.RESERVED] * n
            assert len({o.reservation_id for o in outcomes}) == n
            assert c.stats.batches_sent > 0 and c.stats.calls_in_batches > n // 2
            assert c.stats.frames_sent < n // 4, "calls were packed into BATCH frames: %r" % c.stats
            assert (await c.status(9)).reserved == n

        # Coalescing off: every call its own frame, thousands in flight on one
        # connection, three kinds mixed so each reply must find its own call.
        async with AsyncClient(server.addr, CHECKOUT, connections=1, coalesce=False) as c:

            async def one(i: int) -> Tuple[int, Status]:
                if i % 3 == 0:
                    return i, (await c.reserve(9, 20_000 + i, 1)).status
                if i % 3 == 1:
                    return i, (await c.reserve(424242, 1, 1)).status
                return i, (await c.confirm(new_reservation_id())).status

            got = await asyncio.gather(*[one(i) for i in range(n)])
            expected = [Status.RESERVED, Status.UNKNOWN_SKU, Status.UNKNOWN_RESERVATION]
            wrong = [(i, s) for i, s in got if s is not expected[i % 3]]
            assert wrong == [], wrong[:10]
            assert c.stats.batches_sent == 0 and c.stats.frames_sent >= n
            assert (await c.status(9)).reserved == n + (n + 2) // 3

    run(main(), timeout=90)


def test_reserve_batch_and_mixed_coalesced_calls(server: ServerProcess) -> None:
    async def main() -> None:
        await create_sale(server.addr, 11, stock=1000, limit=1)
        async with AsyncClient(server.addr, CHECKOUT, connections=1) as c:
            ops = [(11, 500 + i, 1, new_reservation_id()) for i in range(1024)]
            results = await c.reserve_batch(ops)
            assert [r.status for r in results] == [Status.RESERVED] * 1000 + [Status.SOLD_OUT] * 24
            assert [r.reservation_id for r in results] == [op[3] for op in ops]
            # Confirms and releases of many callers at once share BATCH frames
            # and each gets its own answer.
            held = [r.reservation_id for r in results[:1000]]
            answers = await asyncio.gather(
                *[c.confirm(rid, b"p%d" % i) if i % 2 else c.release(rid) for i, rid in enumerate(held)]  # type: ignore[arg-type]
            )
            assert [a.status for a in answers] == [Status.RELEASED, Status.CONFIRMED] * 500
            status = await c.status(11)
            assert (status.sold, status.reserved, status.available) == (500, 0, 500)

    run(main())


def test_rate_limited_is_retried_after_the_servers_delay(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(["--user-reserve-rate", "20", "--user-reserve-burst", "4"])

    async def main() -> None:
        await create_sale(server.addr, 12, stock=1000, limit=1000)
        # One attempt: the refusal comes back as data, with its delay.
        async with AsyncClient(server.addr, CHECKOUT, max_attempts=1) as c:
            first = [await c.reserve(12, 1, 1) for _ in range(10)]
            limited = [o for o in first if o.status is Status.RATE_LIMITED]
            assert limited and all(o.retry_after_ms for o in limited), first
            assert c.stats.retries == 0
        # Default attempts: the client waits the delay and resends the same id.
        async with AsyncClient(server.addr, CHECKOUT) as c:
            started = time.monotonic()
            outcomes = [await c.reserve(12, 2, 1) for _ in range(10)]
            elapsed = time.monotonic() - started
            assert [o.status for o in outcomes] == [Status.RESERVED] * 10
            assert c.stats.retries > 0
            # 10 reserves at 20/s after a burst of 4: at least ~0.3 s of waiting.
            assert elapsed >= 0.25, elapsed
            assert (await c.status(12)).reserved == 10 + sum(o.status is Status.RESERVED for o in first)

    run(main())


def test_bad_token_and_forbidden(server: ServerProcess) -> None:
    async def main() -> None:
        for token in ("not-a-token", ""):
            c = AsyncClient(server.addr, token, max_attempts=1)
            with pytest.raises(AuthError) as e:
                await c.connect()
            assert e.value.status is Status.AUTH_FAILED
            await c.close()
        async with AsyncClient(server.addr, CHECKOUT) as c:
            with pytest.raises(ServerError) as err:
                await c.create_sale(1, 1, 1, HOUR_MS)
            assert err.value.status is Status.FORBIDDEN
            # The connection stays open after forbidden.
            assert (await c.ping()).status is Status.OK
            assert c.stats.connects == 2

    run(main())


def test_token_from_the_environment(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAMPEDE_TOKEN", ADMIN)

    async def main() -> None:
        async with AsyncClient(server.addr) as c:
            assert c.role is Role.ADMIN

    run(main())


def test_unreachable_server_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused

        async def main() -> None:
            c = AsyncClient("127.0.0.1:%d" % port, CHECKOUT, max_attempts=2)
            with pytest.raises(ConnectError) as e:
                await c.reserve(1, 1, 1)
            assert e.value.outcome_unknown is False and e.value.reservation_id is not None
            await c.close()

        run(main())


def test_server_restart_mid_run_with_retries(start_server) -> None:  # type: ignore[no-untyped-def]
    """kill -9 (and a graceful SIGTERM) while 64 tasks reserve: every call
    is answered after the restart, retries reuse the ids, the server holds
    each acknowledged reservation exactly once, with its original expiry."""
    server = start_server()
    workers, per_worker = 64, 40

    async def main() -> None:
        await create_sale(server.addr, 13, stock=100_000, limit=1)
        acks: Dict[int, Tuple[int, int]] = {}  # reservation id -> (user, expires_at)
        # Enough attempts to ride out a restart (backoff caps at 500 ms).
        client = AsyncClient(server.addr, CHECKOUT, connections=2, max_attempts=40, request_timeout=3)
        await client.connect()

        async def worker(w: int) -> None:
            for k in range(per_worker):
                rid = new_reservation_id()  # "stored with the order" first
                user = w * 1000 + k
                outcome = await client.reserve(13, user, 1, rid)
                assert outcome.status is Status.RESERVED, outcome
                acks[rid] = (user, outcome.detail)
                await asyncio.sleep(0.002)

        async def chaos() -> None:
            for stop in ("kill", "term"):
                target = len(acks) + 300
                deadline = time.monotonic() + 20
                while len(acks) < target and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                loop = asyncio.get_running_loop()
                if stop == "kill":
                    await loop.run_in_executor(None, server.kill)
                else:
                    await loop.run_in_executor(None, server.terminate)
                await asyncio.sleep(0.3)
                await loop.run_in_executor(None, server.restart)

        await asyncio.gather(chaos(), *[worker(w) for w in range(workers)])
        assert len(acks) == workers * per_worker
        assert client.stats.retries > 0, "the restarts made calls retry"
        # Every acknowledged reservation survived, once, with its expiry.
        retried = await asyncio.gather(*[client.reserve(13, user, 1, rid) for rid, (user, _) in acks.items()])
        assert [(o.status, o.detail) for o in retried] == [(Status.RESERVED, exp) for _, exp in acks.values()]
        status = await client.status(13)
        assert (status.reserved, status.reservations) == (len(acks), len(acks)), status
        await client.close()

    run(main(), timeout=90)


def test_tls(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(["--tls-cert", str(TLS_DIR / "server.pem"), "--tls-key", str(TLS_DIR / "server.key")])

    async def main() -> None:
        ctx = ssl.create_default_context(cafile=str(TLS_DIR / "ca.pem"))
        # Python 3.13 verifies strictly by default, and the repository's test
        # CA (tests/data/tls) has no key usage extension: relax just that.
        ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
        async with AsyncClient(server.addr, ADMIN, ssl=ctx) as c:
            assert (await c.ping()).status is Status.OK
            assert (await c.create_sale(3, 5, 1, HOUR_MS)).status is Status.OK
            assert (await c.reserve(3, 7, 1)).status is Status.RESERVED
        # A client that does not trust the CA is refused, without retries.
        untrusting = AsyncClient(server.addr, ADMIN, ssl=True)
        with pytest.raises(TLSError):
            await untrusting.connect()
        await untrusting.close()
        # Plaintext on the TLS port: an error for that client only.
        plain = AsyncClient(server.addr, ADMIN, max_attempts=1, connect_timeout=2, request_timeout=2)
        with pytest.raises(TransportError):
            await plain.connect()
        await plain.close()
        async with AsyncClient(server.addr, ADMIN, ssl=ctx) as c:
            assert (await c.status(3)).reserved == 1

    run(main())


def test_protocol_errors_from_the_real_server(server: ServerProcess) -> None:
    """The codec reads the server's ERROR frames: a bad magic is answered
    ``bad_magic`` with request id 0, then end-of-stream (§2.3, §3.6)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        frame = bytearray(encode_frame(Ping.OPCODE, 5))
        frame[0:4] = b"XXXX"
        s.sendall(bytes(frame))
        reader = FrameReader()
        frames = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = s.recv(4096)
            if not data:
                break
            frames.extend(reader.feed(data))
        assert len(frames) == 1
        reply = decode_reply(frames[0])
        assert isinstance(reply, ErrorReply) and reply.status is Status.BAD_MAGIC
        assert frames[0].request_id == 0


def test_request_timeout_then_retry_with_the_same_id(server: ServerProcess) -> None:
    """A server that stops answering (SIGSTOP): the call times out with an
    unknown outcome and the id to retry with; a retry with that id settles
    it without reserving twice. With attempts left, the client does that
    retry itself once the server answers again (SIGCONT)."""

    async def main() -> None:
        await create_sale(server.addr, 14, stock=10, limit=5)
        rid = new_reservation_id()
        async with AsyncClient(server.addr, CHECKOUT, request_timeout=0.3, max_attempts=1) as c:
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(RequestTimeout) as e:
                    await c.reserve(14, 1, 1, rid)
                assert 0.25 <= time.monotonic() - started < 3
                assert e.value.outcome_unknown and e.value.reservation_id == rid
            finally:
                os.kill(server.pid, signal.SIGCONT)
            settled = await c.reserve(14, 1, 1, rid)
            assert settled.status is Status.RESERVED
            assert (await c.status(14)).reserved == 1, "the retry reserved nothing more"

        async with AsyncClient(server.addr, CHECKOUT, request_timeout=0.3, max_attempts=10) as c:
            loop = asyncio.get_running_loop()
            os.kill(server.pid, signal.SIGSTOP)
            loop.call_later(0.8, os.kill, server.pid, signal.SIGCONT)
            try:
                outcome = await c.reserve(14, 2, 1)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert outcome.status is Status.RESERVED
            assert c.stats.retries >= 1
            assert (await c.status(14)).reserved == 2

    run(main())


def test_one_client_across_event_loops(server: ServerProcess) -> None:
    """A script that calls asyncio.run twice with the same client."""
    client = AsyncClient(server.addr, ADMIN)
    assert run(client.create_sale(15, 5, 1, HOUR_MS)).status is Status.OK
    assert run(client.reserve(15, 1, 1)).status is Status.RESERVED
    assert run(client.status(15)).reserved == 1
    run(client.close())
