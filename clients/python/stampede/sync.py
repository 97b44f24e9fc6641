"""The blocking client, for scripts and WSGI apps: the same methods as
``AsyncClient``, without ``await``.

It runs one ``AsyncClient`` on a private event loop in a daemon thread and
hands each call to it, so it keeps everything the asyncio client does:
pipelining, coalescing of the calls that many request threads make at
once into BATCH frames, retries with the same reservation id, leader
following. One ``Client`` is safe to share between threads (a WSGI
server's worker threads should share one).

Fork safety: the loop thread starts on first use. A client created before
a pre-forking server forks (gunicorn ``--preload``) starts afresh in each
worker, because it notices the new process id.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Awaitable, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

from . import limits
from .aio import AsyncClient, ClientStats, LocationsArg, RegionsArg, TLSOption
from .messages import (
    ClusterReply,
    LocationsReply,
    Outcome,
    PlacementReply,
    QueueConfig,
    QueueTicket,
    Reply,
    Request,
    Reserve,
    StatusReply,
)
from .status import Role

T = TypeVar("T")


class Client:
    """A blocking stampede client. Arguments as for ``AsyncClient``; the
    connections open on ``connect()``, on entering ``with``, or on the first
    call. Every method blocks the calling thread until the answer (or the
    exception) is there."""

    def __init__(
        self,
        addrs: Union[str, Sequence[str]] = limits.DEFAULT_ADDRESS,
        token: Union[str, bytes, None] = None,
        *,
        connections: int = limits.CONNECTIONS_DEFAULT,
        request_timeout: float = limits.REQUEST_TIMEOUT_S,
        connect_timeout: float = limits.CONNECT_TIMEOUT_S,
        max_attempts: int = limits.MAX_ATTEMPTS,
        ssl: TLSOption = None,
        server_hostname: Optional[str] = None,
        failover_timeout: float = limits.FAILOVER_TIMEOUT_S,
        coalesce: bool = True,
    ) -> None:
        self._kwargs = dict(
            addrs=addrs,
            token=token,
            connections=connections,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            ssl=ssl,
            server_hostname=server_hostname,
            failover_timeout=failover_timeout,
            coalesce=coalesce,
        )
        # Build one now so bad arguments fail in the constructor.
        self._client: Optional[AsyncClient] = AsyncClient(**self._kwargs)  # type: ignore[arg-type]
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle --------------------------------------------------------

    def _ensure_loop(self) -> Tuple[asyncio.AbstractEventLoop, AsyncClient]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._pid != os.getpid():
                # Forked: the parent's loop thread does not exist here, and
                # its sockets are shared with the parent. Start afresh.
                self._loop = self._thread = None
                self._client = AsyncClient(**self._kwargs)  # type: ignore[arg-type]
                self._pid = os.getpid()
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="stampede-client", daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
            assert self._client is not None
            return self._loop, self._client

    def _run(self, make: "Any") -> Any:
        loop, client = self._ensure_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking Client call from its own event loop thread would deadlock")
        coro: Awaitable[Any] = make(client)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()  # type: ignore[arg-type]

    def connect(self) -> "Client":
        """Open every connection now (a bad address or token fails here)."""
        self._run(lambda c: c.connect())
        return self

    def close(self) -> None:
        """Close the connections and stop the loop thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread, client = self._loop, self._thread, self._client
        if loop is None or thread is None or client is None or self._pid != os.getpid():
            return
        asyncio.run_coroutine_threadsafe(client.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed and self._loop is not None and self._pid == os.getpid():
                self._loop.call_soon_threadsafe(self._loop.stop)
        except Exception:
            pass

    @property
    def role(self) -> Optional[Role]:
        return self._client.role if self._client is not None else None

    @property
    def current_node(self) -> str:
        assert self._client is not None
        return self._client.current_node

    @property
    def failover_retries(self) -> int:
        return self._client.failover_retries if self._client is not None else 0

    @property
    def stats(self) -> ClientStats:
        assert self._client is not None
        return self._client.stats

    # -- the operations (see AsyncClient for what each does) --------------

    def ping(self) -> Outcome:
        """PING: ``detail`` is the server's clock (unix ms)."""
        return self._run(lambda c: c.ping())  # type: ignore[no-any-return]

    def clock_offset_ms(self) -> int:
        """Server clock minus local clock, ms, from one PING."""
        return self._run(lambda c: c.clock_offset_ms())  # type: ignore[no-any-return]

    def reserve(self, sku: int, user: int, qty: int = 1, reservation_id: Optional[int] = None) -> Outcome:
        """Hold units; retries reuse ``reservation_id`` (or the one picked,
        returned as ``outcome.reservation_id``)."""
        return self._run(lambda c: c.reserve(sku, user, qty, reservation_id))  # type: ignore[no-any-return]

    def reserve_at(
        self,
        sku: int,
        user: int,
        qty: int = 1,
        reservation_id: Optional[int] = None,
        *,
        region: Optional[int] = None,
        locations: Optional[Sequence[int]] = None,
    ) -> Outcome:
        """Hold units at one location: the first of ``locations`` (or of the
        order ``region`` maps to, or of the sale's default order) that has
        them all; ``outcome.location`` says which. Retries as ``reserve``."""
        return self._run(  # type: ignore[no-any-return]
            lambda c: c.reserve_at(sku, user, qty, reservation_id, region=region, locations=locations)
        )

    def locations(self, sku: int) -> LocationsReply:
        """A sale's locations with their counters, and its regions' orders."""
        return self._run(lambda c: c.locations(sku))  # type: ignore[no-any-return]

    def reserve_batch(self, ops: Iterable[Union[Reserve, Tuple[int, int, int, int]]]) -> List[Outcome]:
        """Up to 1024 reservations in one frame; results in order."""
        ops = list(ops)
        return self._run(lambda c: c.reserve_batch(ops))  # type: ignore[no-any-return]

    def confirm(self, reservation_id: int, payment_ref: Union[bytes, str] = b"") -> Outcome:
        """Sell a held reservation."""
        return self._run(lambda c: c.confirm(reservation_id, payment_ref))  # type: ignore[no-any-return]

    def release(self, reservation_id: int) -> Outcome:
        """Give a held reservation's units back."""
        return self._run(lambda c: c.release(reservation_id))  # type: ignore[no-any-return]

    def status(self, sku: int) -> StatusReply:
        """A sale's counters."""
        return self._run(lambda c: c.status(sku))  # type: ignore[no-any-return]

    def join(self, sku: int, user: int) -> QueueTicket:
        """Take a place in a queued sale's line."""
        return self._run(lambda c: c.join(sku, user))  # type: ignore[no-any-return]

    def poll(self, sku: int, user: int) -> QueueTicket:
        """Where a user stands in the line."""
        return self._run(lambda c: c.poll(sku, user))  # type: ignore[no-any-return]

    def cluster(self) -> ClusterReply:
        """Who leads, as the current node knows it."""
        return self._run(lambda c: c.cluster())  # type: ignore[no-any-return]

    def create_sale(
        self,
        sku: int,
        stock: int,
        limit_per_user: int,
        ttl_ms: int,
        *,
        hot: bool = False,
        queue: Optional[QueueConfig] = None,
        locations: Optional[LocationsArg] = None,
        regions: Optional[RegionsArg] = None,
    ) -> Outcome:
        """Admin: create a sale, its stock split over ``locations``
        (``{location: stock}``) if given, with ``regions``
        (``{region: [location, ...]}``)."""
        return self._run(  # type: ignore[no-any-return]
            lambda c: c.create_sale(
                sku, stock, limit_per_user, ttl_ms, hot=hot, queue=queue, locations=locations, regions=regions
            )
        )

    def create_sale_at(
        self,
        sku: int,
        limit_per_user: int,
        ttl_ms: int,
        locations: LocationsArg,
        regions: Optional[RegionsArg] = None,
        *,
        hot: bool = False,
        queue: Optional[QueueConfig] = None,
    ) -> Outcome:
        """Admin: create a sale whose stock is the sum of its ``locations``."""
        return self._run(  # type: ignore[no-any-return]
            lambda c: c.create_sale_at(sku, limit_per_user, ttl_ms, locations, regions, hot=hot, queue=queue)
        )

    def restock(self, sku: int, qty: int) -> Outcome:
        """Admin: add stock (not idempotent, never resent once sent)."""
        return self._run(lambda c: c.restock(sku, qty))  # type: ignore[no-any-return]

    def restock_at(self, sku: int, location: int, qty: int) -> Outcome:
        """Admin: add stock at one location (not idempotent, never resent
        once sent)."""
        return self._run(lambda c: c.restock_at(sku, location, qty))  # type: ignore[no-any-return]

    def add_location(self, sku: int, location: int, stock: int) -> Outcome:
        """Admin: a new location for a running sale (a repeat answers
        ``location_exists``)."""
        return self._run(lambda c: c.add_location(sku, location, stock))  # type: ignore[no-any-return]

    def set_region(self, sku: int, region: int, order: Sequence[int]) -> Outcome:
        """Admin: the order of locations for shoppers of ``region``."""
        return self._run(lambda c: c.set_region(sku, region, order))  # type: ignore[no-any-return]

    def pause(self, sku: int) -> Outcome:
        """Admin: pause a sale."""
        return self._run(lambda c: c.pause(sku))  # type: ignore[no-any-return]

    def resume(self, sku: int) -> Outcome:
        """Admin: resume a sale."""
        return self._run(lambda c: c.resume(sku))  # type: ignore[no-any-return]

    def move_sale(self, sku: int, dedicated: bool) -> Outcome:
        """Admin: move a sale to a shard of its own or back to the pool
        (pinned; idempotent)."""
        return self._run(lambda c: c.move_sale(sku, dedicated))  # type: ignore[no-any-return]

    def placement(self) -> PlacementReply:
        """Admin: dedicated shards and the hottest sales' demand."""
        return self._run(lambda c: c.placement())  # type: ignore[no-any-return]

    def raw(self, request: Request) -> Reply:
        """Send any request once, without retries."""
        return self._run(lambda c: c.raw(request))  # type: ignore[no-any-return]
