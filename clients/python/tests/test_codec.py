"""The codec's edges: CRC-32C, frame validation in the spec's order, strict
body decoding, and argument checks before anything is sent."""

from __future__ import annotations

import os
import struct

import pytest

from stampede import checksum
from stampede import events as ev
from stampede.errors import FrameError, InvalidRequest, Malformed
from stampede.frame import FrameReader, decode_frame, decode_header, encode_frame
from stampede.ids import format_reservation_id, new_reservation_id, parse_reservation_id
from stampede.limits import BATCH_OPS_MAX, FRAME_BODY_BYTES_MAX, PAYMENT_REF_BYTES_MAX, TOKEN_BYTES_MAX
from stampede.messages import (
    Batch,
    BatchReply,
    Confirm,
    Frame,
    Hello,
    Outcome,
    Placement,
    PlacementReply,
    Release,
    Reserve,
    ReserveBatch,
    SaleMove,
    SalePlacement,
    StatusReply,
    decode_reply,
    decode_request,
    encode_request,
)
from stampede.status import Opcode, Status


def bitwise_crc32c(data: bytes) -> int:
    """The bitwise reference of PROTOCOL.md §2.2, transcribed."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("impl", [checksum.crc32c, checksum.crc32c_pure], ids=["selected", "pure"])
def test_crc32c_check_values(impl) -> None:  # type: ignore[no-untyped-def]
    assert impl(b"123456789") == 0xE3069283
    assert impl(b"") == 0
    for n in list(range(0, 70)) + [1000, 4097]:
        data = os.urandom(n)
        assert impl(data) == bitwise_crc32c(data), n
    # Not the zlib/IEEE CRC-32.
    import zlib

    assert impl(b"123456789") != zlib.crc32(b"123456789")


def test_pure_crc_continues_a_previous_value() -> None:
    data = os.urandom(123)
    assert checksum.crc32c_pure(data[50:], checksum.crc32c_pure(data[:50])) == checksum.crc32c_pure(data)


def _corrupt(frame: bytes, offset: int, value: int, fix_header_crc: bool = True) -> bytes:
    b = bytearray(frame)
    b[offset] = value
    if fix_header_crc:
        b[28:32] = struct.pack("<I", checksum.crc32c(bytes(b[0:28])))
    return bytes(b)


PING = encode_frame(Opcode.PING, 9)
RESERVE = encode_request(Reserve(1, 2, 3, 4), 77)


def test_validation_follows_the_spec_order() -> None:
    # 1 magic (id unknown), 2 version before the checksum, 3 header checksum.
    for offset, value, status in ((0, ord("X"), Status.BAD_MAGIC), (4, 2, Status.UNSUPPORTED_VERSION)):
        with pytest.raises(FrameError) as e:
            decode_header(_corrupt(PING, offset, value, fix_header_crc=False)[:32])
        assert (e.value.status, e.value.request_id) == (status, None)
    with pytest.raises(FrameError) as e:
        decode_header(_corrupt(PING, 8, 10, fix_header_crc=False)[:32])
    assert (e.value.status, e.value.request_id) == (Status.BAD_CHECKSUM, None)
    # 4 flags / reserved non-zero: id echoed.
    for offset in (6, 24):
        with pytest.raises(FrameError) as e:
            decode_header(_corrupt(PING, offset, 1)[:32])
        assert (e.value.status, e.value.request_id) == (Status.MALFORMED_BODY, 9)
    # 6 body checksum.
    with pytest.raises(FrameError) as e:
        FrameReader().feed(_corrupt(RESERVE, 40, RESERVE[40] ^ 1, fix_header_crc=False))
    assert (e.value.status, e.value.request_id) == (Status.BAD_CHECKSUM, 77)


def test_oversize_length_is_refused_before_the_body_arrives() -> None:
    b = bytearray(PING)
    b[16:20] = struct.pack("<I", FRAME_BODY_BYTES_MAX + 1)
    b[28:32] = struct.pack("<I", checksum.crc32c(bytes(b[0:28])))
    reader = FrameReader()
    with pytest.raises(FrameError) as e:
        reader.feed(bytes(b))  # the header alone: no body is awaited
    assert (e.value.status, e.value.request_id) == (Status.FRAME_TOO_LARGE, 9)


def test_the_largest_body_is_accepted() -> None:
    frame = encode_frame(0x92, 3, bytes(FRAME_BODY_BYTES_MAX))
    assert decode_frame(frame).body == bytes(FRAME_BODY_BYTES_MAX)
    with pytest.raises(ValueError):
        encode_frame(0x92, 3, bytes(FRAME_BODY_BYTES_MAX + 1))


def test_reply_bodies_are_strict() -> None:
    ok = Outcome(Status.RESERVED, 5).encode_body()
    with pytest.raises(Malformed):
        decode_reply(Frame(0x90, 1, ok + b"\x00"), Opcode.RESERVE)  # trailing byte
    with pytest.raises(Malformed):
        decode_reply(Frame(0x90, 1, ok[:-1]), Opcode.RESERVE)  # short
    with pytest.raises(Malformed):
        decode_reply(Frame(0x90, 1, struct.pack("<HQ", 9999, 0)), Opcode.RESERVE)  # unknown status
    with pytest.raises(Malformed):
        decode_reply(Frame(0x92, 1, ok), Opcode.RESERVE)  # the reply to another request
    with pytest.raises(Malformed):
        decode_reply(Frame(0x7F, 1, ok))  # not a reply opcode
    with pytest.raises(Malformed):
        decode_reply(Frame(0x97, 1, struct.pack("<H", 2) + ok), Opcode.BATCH)  # count says 2, one result
    assert decode_reply(Frame(0x97, 1, BatchReply([Outcome(Status.BUSY, 10)]).encode_body()), Opcode.BATCH) == BatchReply(
        [Outcome(Status.BUSY, 10)]
    )


def test_batch_counts_and_kinds() -> None:
    for count in (0, BATCH_OPS_MAX + 1):
        for opcode in (Opcode.RESERVE_BATCH, Opcode.BATCH):
            with pytest.raises(FrameError) as e:
                decode_request(Frame(opcode, 5, struct.pack("<H", count)))
            assert e.value.status is Status.BATCH_TOO_LARGE
    bad_kind = bytearray(Batch([Release(3)]).encode_body())
    bad_kind[2] = 4
    with pytest.raises(FrameError) as e:
        decode_request(Frame(Opcode.BATCH, 5, bytes(bad_kind)))
    assert e.value.status is Status.MALFORMED_BODY
    with pytest.raises(InvalidRequest):
        encode_request(ReserveBatch([]), 1)
    with pytest.raises(InvalidRequest):
        encode_request(Batch([Release(1)] * (BATCH_OPS_MAX + 1)), 1)
    full = Batch([Reserve(1, 2, 3, i + 1) for i in range(BATCH_OPS_MAX)])
    assert decode_request(decode_frame(encode_request(full, 1))) == full


def test_arguments_out_of_range_are_refused_before_sending() -> None:
    with pytest.raises(InvalidRequest):
        encode_request(Hello(b"x" * (TOKEN_BYTES_MAX + 1)), 1)
    with pytest.raises(InvalidRequest):
        encode_request(Confirm(1, b"x" * (PAYMENT_REF_BYTES_MAX + 1)), 1)
    with pytest.raises(InvalidRequest):
        encode_request(Reserve(-1, 2, 3, 4), 1)
    with pytest.raises(InvalidRequest):
        encode_request(Reserve(1, 2, 1 << 32, 4), 1)
    assert decode_request(decode_frame(encode_request(Confirm(1, b"x" * PAYMENT_REF_BYTES_MAX), 1))) == Confirm(
        1, b"x" * PAYMENT_REF_BYTES_MAX
    )


def test_u128_ids_round_trip_at_the_edges() -> None:
    for rid in (1, (1 << 64) - 1, 1 << 64, (1 << 128) - 1):
        assert decode_request(decode_frame(encode_request(Reserve(1, 2, 3, rid), 1))) == Reserve(1, 2, 3, rid)


def test_reservation_ids() -> None:
    ids = {new_reservation_id() for _ in range(1000)}
    assert len(ids) == 1000 and 0 not in ids
    assert all(0 < i < (1 << 128) for i in ids)
    assert any(i >> 120 for i in ids)  # the high bits are used too
    rid = new_reservation_id()
    assert parse_reservation_id(format_reservation_id(rid)) == rid
    assert parse_reservation_id("0x2a") == 42
    for bad in ("", "0", "xyz", "1" * 33):
        with pytest.raises(InvalidRequest):
            parse_reservation_id(bad)


def test_status_helpers() -> None:
    assert Status.SOLD_OUT.wire_name == "sold_out" and str(Status.SOLD_OUT) == "sold_out"
    assert int(Status.RATE_LIMITED) == 32
    assert Status.BUSY.is_retryable and not Status.SOLD_OUT.is_retryable
    assert Status.BAD_MAGIC.is_protocol_error and not Status.FORBIDDEN.is_protocol_error
    assert Status.from_code(33) is Status.NOT_LEADER and Status.from_code(9999) is None
    assert Outcome(Status.RESERVED, 7).expires_at_ms == 7 and Outcome(Status.BUSY, 10).retry_after_ms == 10


def test_sale_move_placement() -> None:
    for dedicated in (False, True):
        move = SaleMove(42, dedicated)
        assert move.encode_body()[8] == int(dedicated)
        assert decode_request(decode_frame(encode_request(move, 1))) == move
    # A placement other than 0 or 1 is malformed_body, as the server says.
    with pytest.raises(FrameError) as e:
        decode_request(Frame(Opcode.SALE_MOVE, 5, struct.pack("<QB", 42, 2)))
    assert (e.value.status, e.value.request_id) == (Status.MALFORMED_BODY, 5)
    reply = decode_reply(Frame(Opcode.SALE_MOVE.reply, 5, Outcome(Status.OK, 180).encode_body()), Opcode.SALE_MOVE)
    assert reply == Outcome(Status.OK, 180)


def test_placement_request_is_empty() -> None:
    assert decode_request(decode_frame(encode_request(Placement(), 3))) == Placement()
    # Like CLUSTER or STATE_DUMP: a body where none belongs is malformed_body.
    with pytest.raises(FrameError) as e:
        decode_request(Frame(Opcode.PLACEMENT, 3, b"\x00"))
    assert (e.value.status, e.value.request_id) == (Status.MALFORMED_BODY, 3)


def test_placement_reply() -> None:
    reply = PlacementReply(
        Status.OK,
        1,
        2,
        True,
        [SalePlacement(42, True, False, 61_000), SalePlacement(7, False, True, 350), SalePlacement(9, True, True, 0)],
    )
    body = reply.encode_body()
    assert len(body) == 9 + 13 * 3
    assert [body[9 + 13 * i + 8] for i in range(3)] == [0b01, 0b10, 0b11]
    frame = Frame(Opcode.PLACEMENT.reply, 4, body)
    assert decode_reply(frame, Opcode.PLACEMENT) == reply
    # The placement bits decode one by one.
    sales = PlacementReply.decode_body(body).sales
    assert [(s.dedicated, s.pinned) for s in sales] == [(True, False), (False, True), (True, True)]
    # A non-ok reply: every field 0.
    refused = PlacementReply(Status.NOT_LEADER)
    assert refused.encode_body() == struct.pack("<HHHBH", int(Status.NOT_LEADER), 0, 0, 0, 0)
    assert PlacementReply.decode_body(refused.encode_body()) == refused
    # At most 10 sales: a count of 11 is malformed, even with the bytes there.
    many = [SalePlacement(i, False, False, i) for i in range(11)]
    head = struct.pack("<HHHBH", int(Status.OK), 0, 2, 1, 11)
    rows = b"".join(struct.pack("<QBI", s.sku, 0, s.decided_per_s) for s in many)
    with pytest.raises(Malformed):
        PlacementReply.decode_body(head + rows)
    ten = struct.pack("<HHHBH", int(Status.OK), 0, 2, 1, 10) + rows[: 13 * 10]
    assert len(PlacementReply.decode_body(ten).sales) == 10
    # Short or trailing bytes are malformed too.
    with pytest.raises(Malformed):
        PlacementReply.decode_body(body[:-1])
    with pytest.raises(Malformed):
        PlacementReply.decode_body(body + b"\x00")


def test_sale_moved_event_placement() -> None:
    for dedicated, pinned in ((False, False), (True, False), (False, True), (True, True)):
        event = ev.SaleMoved(42, dedicated, pinned, 7)
        payload = event.encode_payload()
        assert len(payload) == 18 and payload[9] == int(dedicated) | int(pinned) << 1
        assert ev.decode_event(payload) == event
    bad = bytearray(ev.SaleMoved(42, True, True, 7).encode_payload())
    bad[9] = 4  # an unknown placement bit: refused, never skipped
    with pytest.raises(Malformed):
        ev.decode_event(bytes(bad))
    assert ev.EVENT_TYPES[15] is ev.SaleMoved


def test_status_reply_flags() -> None:
    pinned = StatusReply(Status.OK, 10, 10, 0, 0, 1, 1000, 0, hot=True, pinned=True)
    body = bytearray(pinned.encode_body())
    assert body[54] == 0b1001
    assert StatusReply.decode_body(bytes(body)) == pinned
    body[54] |= 0x80  # a bit this version does not know: ignored
    assert StatusReply.decode_body(bytes(body)) == pinned
