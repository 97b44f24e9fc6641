"""The asyncio client: pipelined, coalescing, retry-safe, leader-following.

It behaves like the Rust reference client (``protocol/src/client.rs``):

- **Pipelining.** Any number of calls may be in flight on a connection;
  each carries a request id and the connection hands every reply to the
  call that sent it, in whatever order replies arrive. Calls are spread
  round-robin over ``connections`` sockets.
- **Coalescing** (PROTOCOL.md §9, on by default). The RESERVE, CONFIRM and
  RELEASE calls that queue on a connection while the event loop is busy
  are packed into BATCH frames when the connection next writes: at most
  1024 operations and 65536 body bytes per frame, a call of another kind
  ends the batch (calls leave in the order they were made), and a batch of
  one is sent as that operation's own request. Nothing waits on a timer: a
  lone caller's request leaves at once, and under load batches grow by
  themselves. Each call keeps its own outcome, timeout and retries.
- **Retries with the same reservation id.** A call whose connection broke
  or whose reply timed out has an unknown outcome; it is resent on a fresh
  connection with the identical request (the server deduplicates by
  reservation id, so a retry never reserves twice). ``busy`` and
  ``rate_limited`` are resent after the server's retry-after,
  ``shutting_down`` after a pause. A definite answer (``sold_out``,
  ``confirmed``, ...) is never resent. RESTOCK and RESTOCK_AT, the requests
  that are not idempotent, are only resent when they provably never left
  this process.
- **Following the leader.** Given several node addresses, a ``not_leader``
  answer or an unreachable node makes the client ask the nodes who leads
  (CLUSTER) and move every connection there, for up to
  ``failover_timeout``, then resend the call. A call whose outcome was
  unknown answers its original outcome on the new leader.

Outcomes are data (``Outcome``, ``StatusReply``, ...); only transport and
protocol failures raise (see ``stampede.errors``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl as _ssl
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from . import limits
from .errors import (
    AuthError,
    ConnectError,
    ConnectionLost,
    InvalidRequest,
    ProtocolError,
    RequestTimeout,
    ServerError,
    StampedeError,
    TLSError,
    TransportError,
)
from .frame import Frame, FrameReader, encode_frame
from .ids import new_reservation_id
from .messages import (
    BatchReply,
    Cluster,
    ClusterReply,
    Confirm,
    ErrorReply,
    Hello,
    HelloReply,
    Join,
    LocationAdd,
    Locations,
    LocationsReply,
    Outcome,
    Pause,
    Ping,
    Placement,
    PlacementReply,
    Poll,
    QueueConfig,
    QueueTicket,
    RegionSet,
    Release,
    Reply,
    Request,
    Reserve,
    ReserveAt,
    ReserveBatch,
    Restock,
    RestockAt,
    Resume,
    SaleCreate,
    SaleLocations,
    SaleMove,
    StatusReply,
    StatusRequest,
    decode_reply,
    encode_request,
)
from .status import NodeRole, Opcode, Role, Status

#: A TLS setting: None/False for plaintext, True for the system's default
#: trust store, or a configured ``ssl.SSLContext``.
TLSOption = Union[None, bool, _ssl.SSLContext]
R = TypeVar("R")

_COALESCED = (Reserve, Confirm, Release)
_U16 = struct.Struct("<H")


@dataclass
class ClientStats:
    """Counters of what the client did on the wire (for tests and tuning)."""

    #: Calls made (each RESERVE, CONFIRM, ... counts once, retries not).
    calls: int = 0
    #: Frames written, HELLOs and CLUSTER probes included.
    frames_sent: int = 0
    #: BATCH frames the client packed (two or more calls each)...
    batches_sent: int = 0
    #: ...and the calls they carried.
    calls_in_batches: int = 0
    #: Attempts after the first (transport failures, busy, rate_limited).
    retries: int = 0
    #: Connections opened (HELLO succeeded).
    connects: int = 0


class _Call:
    """A call waiting for its reply on one connection."""

    __slots__ = ("future", "opcode")

    def __init__(self, future: "asyncio.Future[Reply]", opcode: int) -> None:
        self.future = future
        self.opcode = opcode


class _Connection(asyncio.Protocol):
    """One socket: a writer that packs queued calls into frames, and a
    reader that resolves the calls' futures by request id."""

    def __init__(self, loop: asyncio.AbstractEventLoop, addr: str, coalesce: bool, stats: ClientStats) -> None:
        self.loop = loop
        self.addr = addr
        self.transport: Optional[asyncio.Transport] = None
        self.coalesce = coalesce
        self.stats = stats
        # Request id -> the call waiting for it, or, for a BATCH frame the
        # writer packed, the request ids of its calls in operation order.
        self.pending: Dict[int, Union[_Call, List[int]]] = {}
        # No new calls: the connection timed out, was replaced, or is gone.
        self.closed = False
        self.gone = False
        self.close_reason: Optional[str] = None
        self._reader = FrameReader()
        self._queue: List[Tuple[int, Request]] = []
        self._flush_scheduled = False
        self._write_paused = False
        # Frames written whose reply has not been read (a BATCH counts once).
        self._inflight = 0
        self._next_packed = 0
        # Calls' deadlines in submission order (one timer for the earliest,
        # not one per call: at tens of thousands of calls a second, per-call
        # timers cost more than the rest of the call).
        self._deadlines: Deque[Tuple[float, "asyncio.Future[Reply]", float]] = deque()
        self._sweep_handle: Optional[asyncio.TimerHandle] = None
        self._sweep_at = 0.0
        # The server's limits from its HELLO reply (never above ours).
        self.frame_body_max = limits.FRAME_BODY_BYTES_MAX
        self.batch_ops_max = limits.BATCH_OPS_MAX

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # The server disables Nagle and clients should too (§1):
                # a small request must not wait for the previous ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self._reader.feed(data):
                self._dispatch(frame.opcode, frame.request_id, frame.body)
            # Answered calls leave the deadline queue (replies come roughly
            # in order, so the head is where they are).
            deadlines = self._deadlines
            while deadlines and deadlines[0][1].done():
                deadlines.popleft()
        except ProtocolError as e:
            # §2.4: a violation is fatal for the connection, and every call
            # still waiting on it has an unknown outcome (they retry).
            self._abort("protocol violation from %s: %s" % (self.addr, e))

    def eof_received(self) -> bool:
        # The server replied to everything it read and closed its side (a
        # refused HELLO, shutdown, idle timeout): close ours (§3.6).
        self.closed = True
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = self.gone = True
        reason = self.close_reason or ("connection to %s lost%s" % (self.addr, ": %s" % exc if exc else ""))
        self._fail_all(ConnectionLost(reason + " before the reply arrived"))

    def pause_writing(self) -> None:
        # The socket's send buffer is full: stop writing, let calls queue
        # (they make bigger batches once it drains).
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._queue:
            self._schedule_flush()

    # -- calls ------------------------------------------------------------

    def submit(self, request_id: int, request: Request, future: "asyncio.Future[Reply]", timeout: float) -> None:
        """Queue a call; it leaves with whatever else queues in this loop
        turn. ``future`` fails with ``RequestTimeout`` after ``timeout``."""
        if self.closed:
            raise ConnectionLost("connection to %s is closed" % self.addr)
        self.pending[request_id] = _Call(future, int(request.OPCODE))
        self._queue.append((request_id, request))
        if not self._flush_scheduled:
            self._schedule_flush()
        deadline = self.loop.time() + timeout
        deadlines = self._deadlines
        if deadlines and deadline < deadlines[-1][0]:
            # Shorter than the calls before it (a rare, custom timeout): a
            # timer of its own keeps the queue in deadline order.
            timer = self.loop.call_later(timeout, _expire, future, timeout)
            future.add_done_callback(lambda _: timer.cancel())
            return
        deadlines.append((deadline, future, timeout))
        # The sweep may still be armed for an earlier head that has gone
        # (answered calls leave the queue), at a later time than this one.
        if self._sweep_handle is None or deadline < self._sweep_at:
            self._arm_sweep(deadline)

    def _arm_sweep(self, when: float) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        self._sweep_at = when
        self._sweep_handle = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        """Fail the calls whose deadline passed; re-arm for the next one."""
        self._sweep_handle = None
        now = self.loop.time()
        deadlines = self._deadlines
        while deadlines:
            deadline, future, timeout = deadlines[0]
            if future.done():
                deadlines.popleft()
            elif deadline <= now:
                deadlines.popleft()
                future.set_exception(RequestTimeout(timeout))
            else:
                self._arm_sweep(deadline)
                break

    def forget(self, request_id: int) -> None:
        """The call gave up (timed out or was cancelled)."""
        self.pending.pop(request_id, None)
        self._close_if_idle()

    def retire(self, linger_s: float) -> None:
        """Take no new calls; close once the calls in flight are answered,
        or after ``linger_s`` whatever happens (a blackholed socket must not
        stay open for ever; calls still waiting then retry elsewhere)."""
        if not self.closed:
            self.closed = True
            self.loop.call_later(linger_s, self._abort_if_open)
        self._close_if_idle()

    def _abort_if_open(self) -> None:
        if not self.gone:
            self._abort("connection to %s retired" % self.addr)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        # call_soon, not a timer: every call already queued in this loop
        # turn (tasks woken by the same reply read, say) goes in one write.
        self.loop.call_soon(self._flush)

    def _close_if_idle(self) -> None:
        if self.closed and not self.pending and not self._queue and self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.gone or self._write_paused or not self._queue:
            return
        budget = limits.CONNECTION_REQUESTS_INFLIGHT_MAX - self._inflight
        if budget <= 0:
            return  # a reply frees room and flushes again
        queue = self._queue
        pending = self.pending
        out: List[bytes] = []
        ops: List[Any] = []
        ids: List[int] = []
        body_bytes = limits.BATCH_COUNT_BYTES
        frames = 0
        taken = 0
        ops_max = self.batch_ops_max
        body_max = self.frame_body_max
        for request_id, request in queue:
            if frames >= budget:
                break
            taken += 1
            if request_id not in pending:
                continue  # gave up before it was written: never send it
            if self.coalesce and type(request) in _COALESCED:
                size = 1 + request.wire_bytes()  # type: ignore[union-attr]
                if ops and (len(ops) >= ops_max or body_bytes + size > body_max):
                    out.append(self._pack(ops, ids))
                    frames += 1
                    ops, ids, body_bytes = [], [], limits.BATCH_COUNT_BYTES
                ops.append(request)
                ids.append(request_id)
                body_bytes += size
                continue
            if ops:
                out.append(self._pack(ops, ids))
                frames += 1
                ops, ids, body_bytes = [], [], limits.BATCH_COUNT_BYTES
            out.append(encode_request(request, request_id))
            frames += 1
        if ops:
            out.append(self._pack(ops, ids))
            frames += 1
        del queue[:taken]
        if out:
            self._inflight += frames
            self.stats.frames_sent += frames
            assert self.transport is not None
            self.transport.write(b"".join(out))
        if queue and not self._flush_scheduled and frames < budget:
            self._schedule_flush()

    def _pack(self, ops: List[Any], ids: List[int]) -> bytes:
        """One BATCH frame for ``ops``, or a lone op as its own request."""
        if len(ops) == 1:
            return encode_request(ops[0], ids[0])
        self._next_packed += 1
        packed_id = limits.PACKED_REQUEST_ID_BIT | self._next_packed
        self.pending[packed_id] = ids
        self.stats.batches_sent += 1
        self.stats.calls_in_batches += len(ids)
        parts = [_U16.pack(len(ops))]
        for op in ops:
            parts.append(_KIND_BYTE[type(op)])
            parts.append(op.encode_body())
        return encode_frame(Opcode.BATCH, packed_id, b"".join(parts))

    def _dispatch(self, opcode: int, request_id: int, body: bytes) -> None:
        if request_id == 0:
            # A connection-level ERROR (handshake timeout, a frame the
            # server could not read): it closes next; remember why.
            try:
                reply = decode_reply(_frame(opcode, request_id, body))
                self.close_reason = "%s closed the connection (%s)" % (self.addr, reply)
            except ProtocolError:
                self.close_reason = "%s closed the connection" % self.addr
            return
        if self._inflight > 0:
            self._inflight -= 1
        entry = self.pending.pop(request_id, None)
        if entry is None:
            pass  # its call gave up (timed out) before the reply came
        elif type(entry) is list:
            self._resolve_packed(entry, opcode, request_id, body)
        else:
            call: _Call = entry  # type: ignore[assignment]
            try:
                reply = decode_reply(_frame(opcode, request_id, body), call.opcode)
            except ProtocolError:
                self.pending[request_id] = call  # fails with the others
                raise
            if not call.future.done():
                call.future.set_result(reply)
        if self.closed:
            self._close_if_idle()
        elif self._queue and not self._flush_scheduled:
            self._schedule_flush()

    def _resolve_packed(self, ids: List[int], opcode: int, request_id: int, body: bytes) -> None:
        try:
            reply = decode_reply(_frame(opcode, request_id, body), Opcode.BATCH)
            if isinstance(reply, BatchReply) and len(reply.results) != len(ids):
                raise ProtocolError("BATCH of %d operations answered with %d results" % (len(ids), len(reply.results)))
        except ProtocolError:
            self.pending[request_id] = ids
            raise
        pending = self.pending
        if isinstance(reply, BatchReply):
            for rid, outcome in zip(ids, reply.results):
                call = pending.pop(rid, None)
                if call is not None and not call.future.done():  # type: ignore[union-attr]
                    call.future.set_result(outcome)  # type: ignore[union-attr]
        else:
            # An ERROR to the BATCH is the answer of every call in it (§9).
            for rid in ids:
                call = pending.pop(rid, None)
                if call is not None and not call.future.done():  # type: ignore[union-attr]
                    call.future.set_result(reply)  # type: ignore[union-attr]

    def _abort(self, reason: str) -> None:
        self.close_reason = reason
        self.closed = True
        self._fail_all(ConnectionLost(reason))
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, exc: TransportError) -> None:
        pending, self.pending = self.pending, {}
        self._queue.clear()
        self._deadlines.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for entry in pending.values():
            if isinstance(entry, _Call) and not entry.future.done():
                entry.future.set_exception(exc)


_KIND_BYTE = {cls: bytes((cls.KIND,)) for cls in _COALESCED}


def _frame(opcode: int, request_id: int, body: bytes) -> Frame:
    return Frame(opcode, request_id, body)


def _expire(future: "asyncio.Future[Reply]", timeout: float) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(timeout))


def split_address(addr: str) -> Tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) into its parts."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidRequest("expected host:port, got %r" % addr)
    return host.strip("[]"), int(port)


def _parse_nodes(addrs: Union[str, Sequence[str]]) -> List[str]:
    parts = addrs.split(",") if isinstance(addrs, str) else list(addrs)
    nodes = [a.strip() for a in parts if a and a.strip()]
    if not nodes:
        raise InvalidRequest("no server address given")
    for node in nodes:
        split_address(node)
    return nodes


def _token_bytes(token: Union[str, bytes, None]) -> bytes:
    if token is None:
        token = os.environ.get(limits.TOKEN_ENV, "")
    raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    if len(raw) > limits.TOKEN_BYTES_MAX:
        raise InvalidRequest("token of %d bytes exceeds TOKEN_BYTES_MAX (%d)" % (len(raw), limits.TOKEN_BYTES_MAX))
    return raw


def _check_u(value: int, bits: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise InvalidRequest("%s must be an integer in 0..2^%d, got %r" % (name, bits, value))
    return value


#: A sale's locations as ``create_sale`` takes them: ``{location: stock}``,
#: ``(location, stock)`` pairs, or a ``SaleLocations`` (which may carry the
#: regions too).
LocationsArg = Union[SaleLocations, Mapping[int, int], Iterable[Tuple[int, int]]]
#: Regions as ``create_sale`` takes them: ``{region: [location, ...]}`` or pairs.
RegionsArg = Union[Mapping[int, Sequence[int]], Iterable[Tuple[int, Sequence[int]]]]


def _location_ids(ids: Iterable[int], name: str) -> List[int]:
    return [_check_u(i, 16, "%s[%d]" % (name, n)) for n, i in enumerate(ids)]


def _sale_locations(locations: Optional[LocationsArg], regions: Optional[RegionsArg]) -> Optional[SaleLocations]:
    """``create_sale``'s locations section, checked against the wire limits
    (ids and stock in range, 1..=16 locations, at most 16 regions of
    1..=8 locations): ``InvalidRequest`` before anything is sent."""
    if locations is None:
        if regions is not None:
            raise InvalidRequest("regions need locations")
        return None
    if isinstance(locations, SaleLocations):
        if regions is not None:
            if locations.regions:
                raise InvalidRequest("regions given twice: in the SaleLocations and as an argument")
            section = SaleLocations(list(locations.locations), SaleLocations.of((), regions).regions)
        else:
            section = locations
    else:
        section = SaleLocations.of(locations, regions)
    for n, (location, stock) in enumerate(section.locations):
        _check_u(location, 16, "locations[%d] id" % n)
        _check_u(stock, 64, "locations[%d] stock" % n)
    if not 1 <= len(section.locations) <= limits.LOCATIONS_PER_SALE_MAX:
        raise InvalidRequest(
            "%d locations; allowed 1..=LOCATIONS_PER_SALE_MAX (%d)" % (len(section.locations), limits.LOCATIONS_PER_SALE_MAX)
        )
    if len(section.regions) > limits.REGIONS_PER_SALE_MAX:
        raise InvalidRequest("%d regions; at most REGIONS_PER_SALE_MAX (%d)" % (len(section.regions), limits.REGIONS_PER_SALE_MAX))
    for region, order in section.regions:
        _check_u(region, 16, "region")
        _location_ids(order, "region %d order" % region)
        if not 1 <= len(order) <= limits.RESERVE_PREFS_MAX:
            raise InvalidRequest("region %d orders %d locations; allowed 1..=%d" % (region, len(order), limits.RESERVE_PREFS_MAX))
    return section


def _retry_after_s(reply: Reply) -> Optional[float]:
    """How long to wait before resending, when the reply says "not now"
    (§9): ``busy`` and ``rate_limited`` carry the delay; a STATUS or a
    ticket ``busy`` may not; ``shutting_down`` never does."""
    status = getattr(reply, "status", None)
    if status is Status.BUSY or status is Status.RATE_LIMITED:
        if isinstance(reply, Outcome):
            ms = reply.detail
        elif isinstance(reply, QueueTicket) and reply.estimated_wait_ms:
            ms = reply.estimated_wait_ms
        else:
            ms = limits.BUSY_RETRY_AFTER_MS
    elif status is Status.SHUTTING_DOWN:
        ms = limits.SHUTTING_DOWN_RETRY_MS
    else:
        return None
    return min(max(ms, limits.RETRY_AFTER_MIN_MS), limits.RETRY_AFTER_MAX_MS) / 1000.0


class AsyncClient:
    """A stampede client for asyncio code. Create it anywhere; it connects
    on ``connect()``, on entering ``async with``, or on the first call, and
    then belongs to that event loop. Share one client across tasks.

    ``addrs``: ``"host:port"``, or several nodes of a cluster
    (``"a:7070,b:7070"`` or a list): calls go to the leader, wherever it is.
    ``token``: the HELLO token (str or bytes); default: ``$STAMPEDE_TOKEN``.
    ``ssl``: None for plaintext, True for TLS with the system trust store,
    or an ``ssl.SSLContext`` (e.g. ``ssl.create_default_context(cafile=...)``).
    ``max_attempts`` counts the first try; see ``stampede.limits`` for the
    defaults, which mirror the Rust reference client.
    """

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
        self._nodes = _parse_nodes(addrs)
        self._token = _token_bytes(token)
        if connections < 1:
            raise InvalidRequest("connections must be >= 1")
        self._request_timeout = float(request_timeout)
        self._connect_timeout = float(connect_timeout)
        self._max_attempts = max(1, int(max_attempts))
        if ssl is True:
            self._ssl: Optional[_ssl.SSLContext] = _ssl.create_default_context()
        elif ssl is None or ssl is False:
            self._ssl = None
        else:
            self._ssl = ssl
        self._server_hostname = server_hostname
        self._failover_timeout = float(failover_timeout)
        self._coalesce = bool(coalesce)
        self._slots: List[Optional[_Connection]] = [None] * int(connections)
        self._locks: List[Optional[asyncio.Lock]] = [None] * int(connections)
        self._current = self._nodes[0]
        self._next_slot = 0
        self._next_request_id = 1
        self._role: Optional[Role] = None
        self._leader_search: Optional["asyncio.Task[bool]"] = None
        self._leader_epoch = 0
        self._closed = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.failover_retries = 0
        self.stats = ClientStats()

    # -- lifecycle ----------------------------------------------------------

    async def connect(self) -> "AsyncClient":
        """Open every connection now, so a bad address, TLS setting or token
        fails here rather than on the first call."""
        loop = self._running_loop()
        if len(self._nodes) > 1:
            if not await self._find_leader(loop.time() + self._failover_timeout):
                raise ConnectError(",".join(self._nodes), "no node says who leads")
        for slot in range(len(self._slots)):
            await self._conn(slot)
        return self

    async def close(self) -> None:
        """Close every connection (calls in flight fail with ConnectionLost)."""
        self._running_loop()
        self._closed = True
        if self._leader_search is not None:
            self._leader_search.cancel()
        for i, conn in enumerate(self._slots):
            if conn is not None:
                conn.abort()
            self._slots[i] = None

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def role(self) -> Optional[Role]:
        """The role the server granted the token (after the first connect)."""
        return self._role

    @property
    def current_node(self) -> str:
        """The node calls go to: the leader, as far as the client knows."""
        return self._current

    @property
    def nodes(self) -> List[str]:
        return list(self._nodes)

    # -- the operations -----------------------------------------------------

    async def ping(self) -> Outcome:
        """PING: ``detail`` is the server's clock (unix ms)."""
        return await self._outcome(Ping())

    async def clock_offset_ms(self) -> int:
        """Server clock minus local clock, in ms, estimated from one PING
        (§6.6: compare ``expires_at`` with the server's clock)."""
        before = time.time()
        outcome = await self.ping()
        after = time.time()
        return int(outcome.detail - (before + after) * 500)

    async def reserve(self, sku: int, user: int, qty: int = 1, reservation_id: Optional[int] = None) -> Outcome:
        """Hold ``qty`` units of ``sku`` for ``user``.

        Pass the ``reservation_id`` you stored with the order (see
        ``stampede.new_reservation_id``); with None the client picks one and
        returns it as ``outcome.reservation_id``. Retries always reuse it. On
        an exception the outcome is unknown: ``err.reservation_id`` holds the
        id to retry (or release) with later."""
        rid = new_reservation_id() if reservation_id is None else reservation_id
        if not (
            type(sku) is int
            and type(user) is int
            and type(qty) is int
            and type(rid) is int
            and 0 <= sku <= limits.U64_MAX
            and 0 <= user <= limits.U64_MAX
            and 0 <= qty <= limits.U32_MAX
            and 0 <= rid <= limits.U128_MAX
        ):  # the slow path names the bad argument
            _check_u(sku, 64, "sku"), _check_u(user, 64, "user"), _check_u(qty, 32, "qty")
            _check_u(rid, 128, "reservation_id")
        request = Reserve(sku, user, qty, rid)
        try:
            outcome = await self._outcome(request)
        except StampedeError as e:
            e.reservation_id = rid
            raise
        outcome.reservation_id = rid
        return outcome

    async def reserve_at(
        self,
        sku: int,
        user: int,
        qty: int = 1,
        reservation_id: Optional[int] = None,
        *,
        region: Optional[int] = None,
        locations: Optional[Sequence[int]] = None,
    ) -> Outcome:
        """Hold ``qty`` units of ``sku`` for ``user`` at one location
        (RESERVE_AT, §6.2a): the first location, in ``locations`` order (up
        to 8 ids), or in the order the sale maps ``region`` to, or in the
        sale's default order (neither given), that has them all. Give at
        most one of ``region`` and ``locations``. The outcome's ``location``
        says where the units are held (0 unless ``reserved``).

        Reservation ids and retries as ``reserve``: a retry reuses the id
        and answers the original reservation and location, whatever the
        preferences. ``unknown_location``: the list names a location the
        sale does not have."""
        rid = new_reservation_id() if reservation_id is None else reservation_id
        _check_u(sku, 64, "sku"), _check_u(user, 64, "user"), _check_u(qty, 32, "qty")
        _check_u(rid, 128, "reservation_id")
        ids = _location_ids(locations or (), "locations")
        if len(ids) > limits.RESERVE_PREFS_MAX:
            raise InvalidRequest("%d preferred locations; at most RESERVE_PREFS_MAX (%d)" % (len(ids), limits.RESERVE_PREFS_MAX))
        region_id = 0 if region is None else _check_u(region, 16, "region")
        if region_id and ids:
            raise InvalidRequest("reserve_at takes a region or a list of locations, not both")
        request = ReserveAt(sku, user, qty, rid, region_id, ids)
        try:
            outcome = await self._outcome(request)
        except StampedeError as e:
            e.reservation_id = rid
            raise
        outcome.reservation_id = rid
        return outcome

    async def locations(self, sku: int) -> LocationsReply:
        """A sale's locations with their counters (in its default order), and
        its regions' orders (``busy`` is retried after 10 ms)."""
        return self._expect(await self._call(Locations(_check_u(sku, 64, "sku"))), LocationsReply)

    async def reserve_batch(self, ops: Iterable[Union[Reserve, Tuple[int, int, int, int]]]) -> List[Outcome]:
        """Up to 1024 reservations in one RESERVE_BATCH frame; results in
        order. Operations answered ``busy`` or ``rate_limited`` are resent
        (alone, with their own ids) after the delay, as §6.3 advises."""
        reserves = [op if isinstance(op, Reserve) else Reserve(*op) for op in ops]
        if not 1 <= len(reserves) <= limits.BATCH_OPS_MAX:
            raise InvalidRequest("batch of %d ops; allowed 1..=%d" % (len(reserves), limits.BATCH_OPS_MAX))
        for op in reserves:
            for name in ("sku", "user"):
                _check_u(getattr(op, name), 64, name)
            _check_u(op.qty, 32, "qty")
            _check_u(op.reservation_id, 128, "reservation_id")
        results: List[Optional[Outcome]] = [None] * len(reserves)
        todo = list(range(len(reserves)))
        for attempt in range(self._max_attempts):
            reply = await self._call(ReserveBatch([reserves[i] for i in todo]))
            if not isinstance(reply, BatchReply) or len(reply.results) != len(todo):
                raise ProtocolError("expected %d batch results, got %r" % (len(todo), reply))
            again = []
            delay = 0.0
            for i, outcome in zip(todo, reply.results):
                outcome.reservation_id = reserves[i].reservation_id
                results[i] = outcome
                wait = _retry_after_s(outcome)
                if wait is not None:
                    again.append(i)
                    delay = max(delay, wait)
            if not again or attempt + 1 == self._max_attempts:
                break
            self.stats.retries += 1
            await asyncio.sleep(delay)
            todo = again
        return [r for r in results if r is not None]

    async def confirm(self, reservation_id: int, payment_ref: Union[bytes, str] = b"") -> Outcome:
        """Sell a held reservation. Resending with the same ``payment_ref``
        answers the original confirm time; ``expired`` means too late (void
        the payment authorisation)."""
        ref = payment_ref.encode("utf-8") if isinstance(payment_ref, str) else bytes(payment_ref)
        if len(ref) > limits.PAYMENT_REF_BYTES_MAX:
            raise InvalidRequest("payment_ref longer than PAYMENT_REF_BYTES_MAX (%d)" % limits.PAYMENT_REF_BYTES_MAX)
        outcome = await self._outcome(Confirm(_check_u(reservation_id, 128, "reservation_id"), ref))
        outcome.reservation_id = reservation_id
        return outcome

    async def release(self, reservation_id: int) -> Outcome:
        """Give a held reservation's units back (a repeat answers ``released``)."""
        outcome = await self._outcome(Release(_check_u(reservation_id, 128, "reservation_id")))
        outcome.reservation_id = reservation_id
        return outcome

    async def status(self, sku: int) -> StatusReply:
        """A sale's counters (``busy`` is retried after 10 ms)."""
        reply = await self._call(StatusRequest(_check_u(sku, 64, "sku")))
        return self._expect(reply, StatusReply)

    async def join(self, sku: int, user: int) -> QueueTicket:
        """Take a place in a queued sale's line (idempotent: one ticket per
        user and sale, whatever the connection)."""
        return self._expect(await self._call(Join(_check_u(sku, 64, "sku"), _check_u(user, 64, "user"))), QueueTicket)

    async def poll(self, sku: int, user: int) -> QueueTicket:
        """Where ``user`` stands in the sale's line."""
        return self._expect(await self._call(Poll(_check_u(sku, 64, "sku"), _check_u(user, 64, "user"))), QueueTicket)

    async def cluster(self) -> ClusterReply:
        """Who leads, as the node this client talks to knows it."""
        return self._expect(await self._call(Cluster()), ClusterReply)

    async def create_sale(
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
        """Admin: create a sale. A retry after success answers ``sale_exists``.

        ``locations`` splits the stock over locations (warehouses, §6.2a):
        ``{location: stock}`` (or ``(location, stock)`` pairs, or a
        ``SaleLocations``), 1..=16 of them, in the sale's default order;
        ``stock`` must be their sum. ``regions`` maps regions (not 0) to an
        order of those locations: ``{region: [location, ...]}``, at most 16
        regions of 1..=8 locations each. Without ``locations`` the sale has
        one location, id 0."""
        request = SaleCreate(
            _check_u(sku, 64, "sku"),
            _check_u(stock, 64, "stock"),
            _check_u(limit_per_user, 32, "limit_per_user"),
            _check_u(ttl_ms, 64, "ttl_ms"),
            bool(hot),
            queue,
            _sale_locations(locations, regions),
        )
        return await self._outcome(request)

    async def create_sale_at(
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
        """Admin: ``create_sale`` with its stock split over ``locations``;
        the sale's stock is their sum (the Rust client's ``create_sale_at``)."""
        sale_locations = _sale_locations(locations, regions)
        assert sale_locations is not None
        return await self.create_sale(
            sku, sale_locations.stock, limit_per_user, ttl_ms, hot=hot, queue=queue, locations=sale_locations
        )

    async def restock(self, sku: int, qty: int) -> Outcome:
        """Admin: add stock. **Not idempotent**: never resent once it may
        have reached the server. On a TransportError whose
        ``outcome_unknown`` is true, read ``total`` with ``status`` first."""
        return await self._outcome(Restock(_check_u(sku, 64, "sku"), _check_u(qty, 64, "qty")), idempotent=False)

    async def restock_at(self, sku: int, location: int, qty: int) -> Outcome:
        """Admin: add stock at one location; ``detail`` is the location's new
        total. **Not idempotent**, like ``restock``: never resent once it
        may have reached the server (on a TransportError whose
        ``outcome_unknown`` is true, read the location with ``locations``
        first)."""
        request = RestockAt(_check_u(sku, 64, "sku"), _check_u(location, 16, "location"), _check_u(qty, 64, "qty"))
        return await self._outcome(request, idempotent=False)

    async def add_location(self, sku: int, location: int, stock: int) -> Outcome:
        """Admin: a new location with ``stock`` units for a running sale,
        last in its default order; ``detail`` is the sale's new total. A
        retry that finds it added answers ``location_exists``."""
        request = LocationAdd(_check_u(sku, 64, "sku"), _check_u(location, 16, "location"), _check_u(stock, 64, "stock"))
        return await self._outcome(request)

    async def set_region(self, sku: int, region: int, order: Sequence[int]) -> Outcome:
        """Admin: shoppers of ``region`` (not 0) take their units from
        ``order`` (1..=8 locations), first that has them, replacing the
        region's earlier order. Idempotent."""
        ids = _location_ids(order, "order")
        if not 1 <= len(ids) <= limits.RESERVE_PREFS_MAX:
            raise InvalidRequest("a region orders 1..=%d locations, got %d" % (limits.RESERVE_PREFS_MAX, len(ids)))
        return await self._outcome(RegionSet(_check_u(sku, 64, "sku"), _check_u(region, 16, "region"), ids))

    async def pause(self, sku: int) -> Outcome:
        """Admin: new RESERVEs of the sale answer ``paused``."""
        return await self._outcome(Pause(_check_u(sku, 64, "sku")))

    async def resume(self, sku: int) -> Outcome:
        """Admin: undo ``pause``."""
        return await self._outcome(Resume(_check_u(sku, 64, "sku")))

    async def move_sale(self, sku: int, dedicated: bool) -> Outcome:
        """Admin: move a sale to a shard of its own (``dedicated``) or back
        to the pool, pinned there (the server's demand monitor leaves it).
        Idempotent: a retry finds it moved and answers ``ok``. ``detail``
        is how long the sale's requests were held, in microseconds."""
        return await self._outcome(SaleMove(_check_u(sku, 64, "sku"), bool(dedicated)))

    async def placement(self) -> PlacementReply:
        """Admin: dedicated shards and the hottest sales with their
        placement, pin and requests decided per second."""
        return self._expect(await self._call(Placement()), PlacementReply)

    async def raw(self, request: Request) -> Reply:
        """Send any request once, without retries; the reply as it came
        (an ERROR frame as an ``ErrorReply``). For tools and tests."""
        self._running_loop()
        conn = await self._conn(0)
        return await self._send_once(conn, request)

    # -- machinery ----------------------------------------------------------

    async def _outcome(self, request: Request, idempotent: bool = True) -> Outcome:
        return self._expect(await self._call(request, idempotent), Outcome)

    @staticmethod
    def _expect(reply: Reply, cls: Type[R]) -> R:
        if not isinstance(reply, cls):
            raise ProtocolError("expected %s, got %r" % (cls.__name__, reply))
        return reply

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, which the client then belongs to. A client used
        from a new loop (a script that calls ``asyncio.run`` twice) drops
        the connections of the old one, which can no longer run (their
        sockets close when they are collected)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                self._slots = [None] * len(self._slots)
                self._locks = [None] * len(self._locks)
                self._leader_search = None
            self._loop = loop
        return loop

    def _lock(self, slot: int) -> asyncio.Lock:
        # Created lazily, inside the running loop (Python 3.9 binds a lock
        # to the loop current at construction).
        lock = self._locks[slot]
        if lock is None:
            lock = self._locks[slot] = asyncio.Lock()
        return lock

    async def _conn(self, slot: int) -> _Connection:
        """The slot's connection, (re)connecting if it is closed."""
        conn = self._slots[slot]
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise RuntimeError("the client is closed")
        async with self._lock(slot):
            conn = self._slots[slot]
            if conn is not None and not conn.closed:
                return conn  # another call reconnected meanwhile
            fresh = await self._connect_to(self._current)
            if self._closed:
                fresh.abort()
                raise RuntimeError("the client is closed")
            self._slots[slot] = fresh
            if conn is not None:
                conn.retire(self._request_timeout)
            return fresh

    async def _connect_to(self, addr: str) -> _Connection:
        """A new connection to ``addr`` that has passed HELLO. Every failure
        here is a ``ConnectError``: no call has used the connection yet."""
        host, port = split_address(addr)
        loop = asyncio.get_running_loop()
        hostname = None
        if self._ssl is not None:
            hostname = self._server_hostname or host
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop, addr, self._coalesce, self.stats),
                    host,
                    port,
                    ssl=self._ssl,
                    server_hostname=hostname,
                ),
                self._connect_timeout,
            )
        except _ssl.SSLCertVerificationError as e:
            raise TLSError(addr, e) from None
        except asyncio.TimeoutError:
            raise ConnectError(addr, "no connection within %.3f s" % self._connect_timeout) from None
        except OSError as e:
            raise ConnectError(addr, e) from None
        try:
            reply = await self._send_once(conn, Hello(self._token), self._connect_timeout + self._request_timeout)
        except TransportError as e:
            conn.abort()
            raise ConnectError(addr, "no HELLO reply: %s" % e) from None
        if isinstance(reply, HelloReply) and reply.status is Status.OK:
            self._role = reply.role
            conn.frame_body_max = min(limits.FRAME_BODY_BYTES_MAX, reply.frame_body_bytes_max)
            conn.batch_ops_max = max(1, min(limits.BATCH_OPS_MAX, reply.batch_ops_max))
            self.stats.connects += 1
            return conn
        conn.abort()
        if isinstance(reply, HelloReply):
            raise AuthError(reply.status)
        if isinstance(reply, ErrorReply):
            raise ServerError(reply.status, reply.message)
        raise ProtocolError("unexpected reply to HELLO: %r" % (reply,))

    def _request_id(self) -> int:
        rid = self._next_request_id
        # Ids stay below the packed-batch bit; 0 is the server's own (§3.4).
        self._next_request_id = rid + 1 if rid + 1 < limits.PACKED_REQUEST_ID_BIT else 1
        return rid

    async def _send_once(self, conn: _Connection, request: Request, timeout: Optional[float] = None) -> Reply:
        """One attempt on one connection, bounded by the request timeout."""
        future: "asyncio.Future[Reply]" = conn.loop.create_future()
        request_id = self._request_id()
        conn.submit(request_id, request, future, self._request_timeout if timeout is None else timeout)
        try:
            return await future
        except RequestTimeout:
            # A connection that let a reply time out may be blackholed: new
            # calls (and this call's retry) get a fresh one; the calls
            # already waiting on it keep waiting for their replies.
            conn.retire(self._request_timeout)
            raise
        finally:
            if not future.done() or future.cancelled() or future.exception() is not None:
                conn.forget(request_id)

    async def _call(self, request: Request, idempotent: bool = True) -> Reply:
        """Send with reconnects and retries (see the module doc)."""
        if self._closed:
            raise RuntimeError("the client is closed")
        self.stats.calls += 1
        loop = self._running_loop()
        attempts = self._max_attempts
        backoff = limits.BACKOFF_INITIAL_S
        cluster = len(self._nodes) > 1
        failover_deadline: Optional[float] = None
        attempt = 0
        nslots = len(self._slots)
        while True:
            attempt += 1
            slot = self._next_slot
            self._next_slot = (slot + 1) % nslots
            epoch = self._leader_epoch
            reply: Optional[Reply] = None
            error: Optional[TransportError] = None
            try:
                conn = self._slots[slot]
                if conn is None or conn.closed:
                    conn = await self._conn(slot)
                reply = await self._send_once(conn, request)
            except TransportError as e:
                error = e
            if cluster:
                # A failover: the node does not (or no longer) lead, or is
                # gone. ``not_leader`` did nothing, and an unknown outcome
                # is what retries with the same id are for. Costs time, not
                # attempts.
                if error is None:
                    lost = getattr(reply, "status", None) in (Status.NOT_LEADER, Status.SHUTTING_DOWN)
                else:
                    lost = not isinstance(error, TLSError) and (idempotent or not error.outcome_unknown)
                if lost:
                    if failover_deadline is None:
                        failover_deadline = loop.time() + self._failover_timeout
                    if loop.time() < failover_deadline and (
                        epoch != self._leader_epoch or await self._find_leader(failover_deadline)
                    ):
                        self.failover_retries += 1
                        attempt -= 1
                        continue
            if cluster and error is None and getattr(reply, "status", None) is Status.SYNC_STANDBY_UNAVAILABLE:
                # A new leader still without its synchronous standby: it did
                # nothing, and will answer once the standby has joined
                # (§6.12). Like a failover, this costs time, not attempts.
                if failover_deadline is None:
                    failover_deadline = loop.time() + self._failover_timeout
                if loop.time() < failover_deadline:
                    self.stats.retries += 1
                    attempt -= 1
                    await asyncio.sleep(limits.SHUTTING_DOWN_RETRY_MS / 1000)
                    continue
            if error is None:
                assert reply is not None
                if isinstance(reply, ErrorReply):
                    raise ServerError(reply.status, reply.message)
                if idempotent and attempt < attempts:
                    # A reply means the request reached the server: a
                    # non-idempotent one is never resent after that.
                    wait = _retry_after_s(reply)
                    if wait is not None:
                        self.stats.retries += 1
                        await asyncio.sleep(wait)
                        continue
                return reply
            if attempt >= attempts or isinstance(error, TLSError):
                raise error
            if not idempotent and error.outcome_unknown:
                raise error
            self.stats.retries += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, limits.BACKOFF_MAX_S)

    async def _find_leader(self, deadline: float) -> bool:
        """Ask the nodes who leads until one says, or ``deadline``; move every
        connection there. One search at a time: concurrent calls share it."""
        if len(self._nodes) <= 1:
            return True
        search = self._leader_search
        if search is None or search.done():
            search = self._leader_search = asyncio.ensure_future(self._search_leader(deadline))
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(asyncio.shield(search), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return False

    async def _search_leader(self, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            current = self._current
            for node in [current] + [n for n in self._nodes if n != current]:
                try:
                    reply = await self._ask_cluster(node)
                except (StampedeError, OSError):
                    continue
                if reply.role in (NodeRole.LEADER, NodeRole.SINGLE):
                    self._switch_to(node)
                    return True
                if reply.leader_addr:
                    # A standby names the leader: check with the leader itself.
                    try:
                        leader = await self._ask_cluster(reply.leader_addr)
                    except (StampedeError, OSError):
                        continue
                    if leader.role is NodeRole.LEADER:
                        self._switch_to(reply.leader_addr)
                        return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(limits.LEADER_POLL_INTERVAL_S)

    async def _ask_cluster(self, node: str) -> ClusterReply:
        """CLUSTER on a fresh connection to ``node``."""
        conn = await self._connect_to(node)
        try:
            reply = await self._send_once(conn, Cluster())
        finally:
            conn.retire(self._request_timeout)
        if isinstance(reply, ErrorReply):
            raise ServerError(reply.status, reply.message)
        return self._expect(reply, ClusterReply)

    def _switch_to(self, node: str) -> None:
        """Talk to ``node`` from now on: every connection reconnects there."""
        # Even when it is the same node: its connections may be stale (it
        # restarted), and fresh ones cost one HELLO each.
        self._current = node
        self._leader_epoch += 1
        for conn in self._slots:
            if conn is not None:
                conn.retire(self._request_timeout)
