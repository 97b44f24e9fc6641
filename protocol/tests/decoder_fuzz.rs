//! Hostile input never panics the decoder, and never makes it reserve more
//! than one maximum frame of memory.

use bytes::BytesMut;
use proptest::prelude::*;
use stampede_protocol::limits::{FRAME_BODY_BYTES_MAX, HEADER_BYTES};
use stampede_protocol::message::{Reply, Request, Reserve};
use stampede_protocol::{Frame, FrameCodec};
use tokio_util::codec::Decoder;

/// Feed `input` in `chunk`-sized pieces; parse every frame as both a
/// request and a reply. Stops at the first framing error, as the server does.
fn feed(input: &[u8], chunk: usize) {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => exercise(&frame),
                Ok(None) => break,
                Err(_) => return,
            }
            assert!(buf.capacity() <= 2 * (HEADER_BYTES + FRAME_BODY_BYTES_MAX) + input.len());
        }
    }
}

fn exercise(frame: &Frame) {
    let _ = Request::decode(frame);
    let _ = Reply::decode(frame);
}

fn valid_stream() -> Vec<u8> {
    let mut buf = BytesMut::new();
    Request::Reserve(Reserve { sku: 1, user: 2, qty: 3, reservation_id: 4 }).encode_frame(1, &mut buf);
    Request::ReserveBatch(vec![Reserve { sku: 1, user: 2, qty: 3, reservation_id: 4 }; 3]).encode_frame(2, &mut buf);
    Request::Ping.encode_frame(3, &mut buf);
    buf.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1..64usize) {
        feed(&input, chunk);
    }

    /// Random bytes rarely get past the magic and checksums; mutating a
    /// valid stream reaches the body parsers.
    #[test]
    fn mutated_frames_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), chunk in 1..64usize) {
        let mut input = valid_stream();
        for (at, value) in flips {
            let at = at % input.len();
            input[at] = value;
        }
        feed(&input, chunk);
    }

    /// Bodies with arbitrary content behind a valid header and checksum
    /// reach every body decoder.
    #[test]
    fn arbitrary_bodies_never_panic(opcode in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::new();
        stampede_protocol::frame::encode_frame_with(&mut buf, opcode, 1, |b| b.extend_from_slice(&body));
        let frame = FrameCodec::new().decode(&mut buf).expect("valid framing").expect("complete");
        exercise(&frame);
    }
}
