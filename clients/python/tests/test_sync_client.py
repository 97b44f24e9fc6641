"""The blocking client against a real server: the same operations from
many threads at once (as a WSGI server's workers would make them)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List

import pytest

from harness import ADMIN, CHECKOUT, ServerProcess
from stampede import AuthError, Client, Outcome, ServerError, Status, new_reservation_id
from stampede.messages import ErrorReply, Ping, Replicate


def test_blocking_client_checkout_flow(server: ServerProcess) -> None:
    with Client(server.addr, ADMIN) as admin:
        assert admin.create_sale(21, 500, 1, 600_000).status is Status.OK
        assert isinstance(admin.raw(Ping()), Outcome)
        # raw() returns even an ERROR as data; a malformed body closes the
        # connection, and the next call reconnects.
        refused = admin.raw(Replicate(0))
        assert isinstance(refused, ErrorReply) and refused.status is Status.MALFORMED_BODY
        assert admin.status(21).total == 500
        with Client(server.addr, CHECKOUT) as checkout, pytest.raises(ServerError) as e:
            checkout.pause(21)
        assert e.value.status is Status.FORBIDDEN

    client = Client(server.addr, CHECKOUT)  # connects on first use
    try:
        assert client.ping().status is Status.OK
        rid = new_reservation_id()
        held = client.reserve(21, 1, 1, reservation_id=rid)
        assert (held.status, held.reservation_id) == (Status.RESERVED, rid)
        assert client.confirm(rid, "pi_1").status is Status.CONFIRMED
        assert client.status(21).sold == 1

        # 32 threads, 400 purchase attempts: reserve, then confirm or release.
        def purchase(user: int) -> List[Outcome]:
            o = client.reserve(21, 1000 + user, 1)
            assert o.reservation_id is not None
            second = client.confirm(o.reservation_id, b"p") if user % 2 else client.release(o.reservation_id)
            return [o, second]

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(purchase, range(400)))
        assert all(r[0].status is Status.RESERVED for r in results)
        assert [r[1].status for r in results] == [Status.RELEASED, Status.CONFIRMED] * 200
        s = client.status(21)
        assert (s.sold, s.reserved, s.available) == (201, 0, 299)
        assert client.stats.calls >= 803
    finally:
        client.close()
    with pytest.raises(RuntimeError):
        client.ping()


def test_blocking_client_bad_token(server: ServerProcess) -> None:
    client = Client(server.addr, "wrong", max_attempts=1)
    try:
        with pytest.raises(AuthError):
            client.connect()
    finally:
        client.close()
    assert threading.active_count() < 50


def test_blocking_client_locations(server: ServerProcess) -> None:
    """The location calls of the blocking client: a sale over two
    warehouses, reservations by preference and by region, LOCATIONS."""
    with Client(server.addr, ADMIN) as admin:
        assert admin.create_sale_at(22, 2, 600_000, {1: 4, 3: 6}, {2: [3, 1]}).status is Status.OK
        assert admin.status(22).total == 10, "the stock is the locations' sum"
        with Client(server.addr, CHECKOUT) as c:
            near = c.reserve_at(22, 1, 1, region=2)
            assert (near.status, near.location) == (Status.RESERVED, 3)
            listed = c.reserve_at(22, 2, 2, locations=[1, 3])
            assert (listed.status, listed.location) == (Status.RESERVED, 1)
            assert c.reserve_at(22, 3, 1, locations=[5]).status is Status.UNKNOWN_LOCATION
            assert (admin.restock_at(22, 1, 2).status, admin.add_location(22, 5, 1).status) == (Status.OK, Status.OK)
            assert admin.set_region(22, 2, [5, 3]).status is Status.OK
            far = c.reserve_at(22, 3, 1, region=2)
            assert (far.status, far.location) == (Status.RESERVED, 5)
            reply = c.locations(22)
            assert [(x.location, x.total, x.available, x.reserved) for x in reply.locations] == [
                (1, 6, 4, 2),
                (3, 6, 5, 1),
                (5, 1, 0, 1),
            ]
            assert reply.region(2) == [5, 3]
