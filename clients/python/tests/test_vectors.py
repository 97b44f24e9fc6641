"""Every shared test vector of ``protocol/testdata/`` encoded and decoded
byte for byte.

``vectors.txt`` holds one frame per line, ``name request_id frame_hex``
(``#`` starts a comment). For each line this test builds the message that
PROTOCOL.md §10.2 says the vector encodes, checks that encoding it gives
exactly the stored bytes, and that decoding the stored bytes gives the
message back. A vector with no expected message here, or an expected
message with no vector, fails the test, so new vectors cannot slip by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from harness import PROTOCOL_DIR
from stampede import events as ev
from stampede.frame import FrameReader, decode_frame
from stampede.messages import (
    Batch,
    BatchReply,
    Cluster,
    ClusterReply,
    Confirm,
    DumpChunk,
    ErrorReply,
    Follow,
    FollowAck,
    FollowBatch,
    Hello,
    HelloReply,
    Join,
    LocationAdd,
    LocationEntry,
    Locations,
    LocationsReply,
    LocationStatus,
    LogBatch,
    NodeInfo,
    Outcome,
    OutcomeAt,
    Pause,
    Ping,
    Poll,
    QueueConfig,
    QueueStats,
    QueueTicket,
    RegionSet,
    Release,
    Replicate,
    Reserve,
    ReservationEntry,
    ReserveAt,
    ReserveBatch,
    Restock,
    RestockAt,
    Resume,
    SaleCreate,
    SaleEntry,
    SaleLocations,
    Placement,
    PlacementReply,
    SaleMove,
    SalePlacement,
    Settled,
    SnapshotChunk,
    SnapshotFetch,
    StateDump,
    StatusReply,
    StatusRequest,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from stampede.status import HoldState, NodeRole, Opcode, Role, Status

VECTORS_DIR = PROTOCOL_DIR / "testdata"
ID = 0x0123456789ABCDEFFEDCBA9876543210
T0 = 1_795_000_000_000  # 2026-11-18T11:06:40Z, the vectors' "now"

# name -> (the request's opcode for a reply, or None for a request; message)
R = None
EXPECTED: Dict[str, Tuple[Optional[Opcode], object]] = {
    "hello": (R, Hello(b"secret")),
    "hello_reply": (Opcode.HELLO, HelloReply(Status.OK, Role.CHECKOUT, 65536, 1024)),
    "ping": (R, Ping()),
    "ping_reply": (Opcode.PING, Outcome(Status.OK, T0)),
    "reserve": (R, Reserve(42, 7, 1, ID)),
    "reserve_reply_reserved": (Opcode.RESERVE, Outcome(Status.RESERVED, T0 + 600_000)),
    "reserve_reply_sold_out": (Opcode.RESERVE, Outcome(Status.SOLD_OUT, 0)),
    "reserve_reply_busy": (Opcode.RESERVE, Outcome(Status.BUSY, 10)),
    "reserve_batch": (R, ReserveBatch([Reserve(42, 7, 1, ID), Reserve(43, 8, 2, 2)])),
    "reserve_batch_reply": (
        Opcode.RESERVE_BATCH,
        BatchReply([Outcome(Status.RESERVED, T0 + 600_000), Outcome(Status.LIMIT_EXCEEDED, 0)]),
    ),
    "batch": (R, Batch([Reserve(43, 8, 2, 2), Confirm(ID, b"pi_1"), Release(3)])),
    "batch_reply": (
        Opcode.BATCH,
        BatchReply(
            [
                Outcome(Status.RESERVED, T0 + 600_000),
                Outcome(Status.CONFIRMED, T0 + 30_000),
                Outcome(Status.UNKNOWN_RESERVATION, 0),
            ]
        ),
    ),
    "confirm": (R, Confirm(ID, b"pi_1")),
    "confirm_reply": (Opcode.CONFIRM, Outcome(Status.CONFIRMED, T0 + 30_000)),
    "release": (R, Release(ID)),
    "release_reply": (Opcode.RELEASE, Outcome(Status.RELEASED, 0)),
    "status": (R, StatusRequest(42)),
    "status_reply": (
        Opcode.STATUS,
        StatusReply(Status.OK, 1000, 990, 6, 4, 1, 600_000, 6, hot=True, paused=False),
    ),
    "sale_create": (R, SaleCreate(42, 1000, 1, 600_000, hot=True)),
    "sale_create_reply": (Opcode.SALE_CREATE, Outcome(Status.OK, 0)),
    "restock": (R, Restock(42, 100)),
    "restock_reply": (Opcode.RESTOCK, Outcome(Status.OK, 1100)),
    "pause": (R, Pause(42)),
    "resume": (R, Resume(42)),
    "error_reply": (Opcode.PING, ErrorReply(Status.FORBIDDEN, "needs admin")),
    "replicate": (R, Replicate(1001)),
    "log_batch": (
        Opcode.REPLICATE,
        LogBatch(
            Status.OK,
            1002,
            T0 + 500,
            [
                (1001, ev.Reserved(42, 7, 1, ID, T0 + 600_000, T0)),
                (1002, ev.Confirmed(42, ID, T0 + 30_000, b"pi_1")),
            ],
        ),
    ),
    "log_batch_heartbeat": (Opcode.REPLICATE, LogBatch(Status.OK, 1002, T0 + 1_500, [])),
    "settled": (R, Settled(1002)),
    "settled_reply": (Opcode.SETTLED, Outcome(Status.OK, 1002)),
    "state_dump": (R, StateDump()),
    "dump_chunk": (
        Opcode.STATE_DUMP,
        DumpChunk(
            Status.OK,
            True,
            1002,
            T0 + 31_000,
            [
                SaleEntry(42, 1000, 999, 0, 1, 1, 600_000, hot=True, paused=False),
                ReservationEntry(42, ID, 7, 1, HoldState.CONFIRMED, T0 + 600_000, T0 + 30_000, b"pi_1"),
            ],
        ),
    ),
    "join": (R, Join(42, 7)),
    "join_reply_waiting": (Opcode.JOIN, QueueTicket(Status.WAITING, False, False, 1500, 3000, 0)),
    "poll": (R, Poll(42, 7)),
    "poll_reply_admitted": (Opcode.POLL, QueueTicket(Status.ADMITTED, False, False, 0, 0, T0 + 120_000)),
    "sale_create_queued": (R, SaleCreate(42, 1000, 1, 600_000, True, QueueConfig(500, 0, 120_000, T0))),
    "status_reply_queued": (
        Opcode.STATUS,
        StatusReply(
            Status.OK,
            1000,
            990,
            6,
            4,
            1,
            600_000,
            6,
            hot=True,
            paused=False,
            queue=QueueStats(250_000, 500, 12, 1_010, 2_020_000),
        ),
    ),
    "reserve_reply_shutting_down": (Opcode.RESERVE, Outcome(Status.SHUTTING_DOWN, 0)),
    "reserve_reply_rate_limited": (Opcode.RESERVE, Outcome(Status.RATE_LIMITED, 250)),
    "status_reply_busy": (Opcode.STATUS, StatusReply(Status.BUSY)),
    "settled_reply_refused": (Opcode.SETTLED, Outcome(Status.INVALID_ARGUMENT, 1002)),
    "reserve_reply_not_leader": (Opcode.RESERVE, Outcome(Status.NOT_LEADER, 0)),
    "cluster": (R, Cluster()),
    "cluster_reply": (
        Opcode.CLUSTER,
        ClusterReply(
            Status.OK,
            15,
            NodeRole.STANDBY,
            "10.0.0.2:7070",
            [NodeInfo("n3", "10.0.0.3:7070", NodeRole.STANDBY, True, True, 1002, 1001)],
        ),
    ),
    "follow": (R, Follow(15, 1000, [(2, 1), (15, 901)], "n3", "10.0.0.3:7070")),
    "follow_batch": (
        Opcode.FOLLOW,
        FollowBatch(Status.OK, 15, 1000, 1000, T0 + 500, [(1001, ev.TermStarted(15, T0 + 400))]),
    ),
    "follow_ack": (R, FollowAck(1001, 1001)),
    "snapshot_fetch": (R, SnapshotFetch()),
    "snapshot_chunk": (Opcode.SNAPSHOT_FETCH, SnapshotChunk(Status.OK, True, 900, 2, 0, 4, b"STMP")),
    "log_batch_refused": (Opcode.REPLICATE, LogBatch(Status.INVALID_ARGUMENT, 1002, T0 + 2_000, [])),
    "sale_move": (R, SaleMove(42, dedicated=True)),
    "sale_move_reply": (Opcode.SALE_MOVE, Outcome(Status.OK, 180)),
    "placement": (R, Placement()),
    "placement_reply": (
        Opcode.PLACEMENT,
        PlacementReply(
            Status.OK,
            1,
            2,
            True,
            [SalePlacement(42, True, False, 61_000), SalePlacement(7, False, True, 350)],
        ),
    ),
    "log_batch_sale_moved": (
        Opcode.REPLICATE,
        LogBatch(Status.OK, 1003, T0 + 3_000, [(1003, ev.SaleMoved(42, True, True, T0 + 2_500))]),
    ),
    # Stock in several locations (PROTOCOL.md §6.2a).
    "reserve_at": (R, ReserveAt(42, 7, 1, ID, locations=[3, 1])),
    "reserve_at_region": (R, ReserveAt(42, 7, 1, ID, region=2)),
    "reserve_at_reply": (Opcode.RESERVE_AT, OutcomeAt(Status.RESERVED, T0 + 600_000, location=3)),
    "sale_create_locations": (R, SaleCreate(42, 100, 2, 600_000, locations=SaleLocations([(1, 60), (3, 40)], [(2, [3, 1])]))),
    "restock_at": (R, RestockAt(42, 3, 25)),
    "location_add": (R, LocationAdd(42, 5, 10)),
    "region_set": (R, RegionSet(42, 4, [5, 3, 1])),
    "locations": (R, Locations(42)),
    "locations_reply": (
        Opcode.LOCATIONS,
        LocationsReply(Status.OK, [LocationStatus(1, 60, 59, 0, 1), LocationStatus(3, 65, 63, 2, 0)], [(2, [3, 1])]),
    ),
    "dump_chunk_locations": (
        Opcode.STATE_DUMP,
        DumpChunk(
            Status.OK,
            True,
            2001,
            T0 + 31_000,
            [
                SaleEntry(42, 100, 99, 1, 0, 2, 600_000),
                LocationEntry(42, 1, 60, 60, 0, 0),
                LocationEntry(42, 3, 40, 39, 1, 0),
                ReservationEntry(42, ID, 7, 1, HoldState.HELD, T0 + 600_000, 0, b"", location=3),
            ],
        ),
    ),
    "log_batch_locations": (
        Opcode.REPLICATE,
        LogBatch(
            Status.OK,
            2004,
            T0 + 4_000,
            [
                (2000, ev.SaleCreatedAt(42, 2, 600_000, False, T0, SaleLocations([(1, 60), (3, 40)], [(2, [3, 1])]))),
                (2001, ev.Reserved(42, 7, 1, ID, T0 + 600_000, T0 + 100, location=3)),
                (2002, ev.Restocked(42, 25, T0 + 1_000, location=3)),
                (2003, ev.LocationAdded(42, 5, 10, T0 + 2_000)),
                (2004, ev.RegionSet(42, 4, [5, 3, 1], T0 + 3_000)),
            ],
        ),
    ),
}


def load_vectors() -> List[Tuple[str, str, int, bytes]]:
    """(file, name, request_id, frame) for every vector line in testdata/."""
    files = sorted(VECTORS_DIR.glob("*.txt"))
    assert files, "no vector files in %s" % VECTORS_DIR
    out = []
    for path in files:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            assert len(parts) == 3, "%s:%d: expected `name request_id frame_hex`" % (path.name, lineno)
            name, request_id, frame_hex = parts
            out.append((path.name, name, int(request_id), bytes.fromhex(frame_hex)))
    return out


VECTORS = load_vectors()


@pytest.mark.parametrize("file,name,request_id,frame", VECTORS, ids=[v[1] for v in VECTORS])
def test_vector_encodes_and_decodes_byte_for_byte(file: str, name: str, request_id: int, frame: bytes) -> None:
    assert name in EXPECTED, "vector %s (%s) has no expected message in this test: add it" % (name, file)
    request_opcode, message = EXPECTED[name]

    # Encoding the message gives exactly the stored bytes.
    if request_opcode is None:
        encoded = encode_request(message, request_id)  # type: ignore[arg-type]
    else:
        encoded = encode_reply(message, int(request_opcode), request_id)  # type: ignore[arg-type]
    assert encoded.hex() == frame.hex(), name

    # Decoding the stored bytes gives the message back, with the frame's id.
    decoded_frame = decode_frame(frame)
    assert decoded_frame.request_id == request_id
    if request_opcode is None:
        assert decoded_frame.opcode == int(message.OPCODE)  # type: ignore[attr-defined]
        assert decode_request(decoded_frame) == message
    else:
        assert decode_reply(decoded_frame, int(request_opcode)) == message

    # The streaming reader gives the same frame fed one byte at a time.
    reader = FrameReader()
    got = []
    for i in range(len(frame)):
        got.extend(reader.feed(frame[i : i + 1]))
        assert len(got) == (1 if i == len(frame) - 1 else 0), "%s: frame complete at byte %d" % (name, i)
    assert got[0] == decoded_frame


def test_every_expected_message_has_a_vector() -> None:
    names = {v[1] for v in VECTORS}
    assert sorted(set(EXPECTED) - names) == [], "expected messages without a vector"
    assert len(names) == len(VECTORS), "duplicate vector names"


def test_all_vectors_back_to_back_in_one_stream() -> None:
    """Replies arrive several per TCP segment: the reader splits them."""
    stream = b"".join(v[3] for v in VECTORS)
    frames = []
    reader = FrameReader()
    for start in range(0, len(stream), 97):  # an awkward chunk size
        frames.extend(reader.feed(stream[start : start + 97]))
    assert [(f.request_id, len(f.body)) for f in frames] == [
        (v[2], len(v[3]) - 32) for v in VECTORS
    ]
    assert reader.buffered == 0


def test_protocol_md_quotes_every_vector() -> None:
    """PROTOCOL.md §10.1 reproduces the file: the spec we read is the one
    the vectors belong to."""
    spec = (PROTOCOL_DIR / "PROTOCOL.md").read_text()
    for file, name, request_id, frame in VECTORS:
        assert "%s %d %s" % (name, request_id, frame.hex()) in spec, name


def test_worked_example_reserve() -> None:
    """PROTOCOL.md §10.3, field by field."""
    frame = dict((v[1], v[3]) for v in VECTORS)["reserve"]
    assert len(frame) == 68
    assert frame[20:24] == bytes.fromhex("4a78b15c")  # body_crc32c 0x5cb1784a
    assert frame[28:32] == bytes.fromhex("81a4559b")  # header_crc32c 0x9b55a481
    assert frame[52:60] == (0xFEDCBA9876543210).to_bytes(8, "little")
    assert frame[60:68] == (0x0123456789ABCDEF).to_bytes(8, "little")


def test_vectors_dir_is_where_the_spec_says() -> None:
    assert (VECTORS_DIR / "vectors.txt").is_file(), Path(VECTORS_DIR)
