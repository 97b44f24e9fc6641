//! Codec benchmarks: frames/s through the streaming decoder plus request
//! parsing (what a connection's reader does per request), and encoding.
//! Target: decode >= 10M frames/s.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stampede_protocol::message::{Opcode, Outcome, Reply, Request, Reserve};
use stampede_protocol::{FrameCodec, Status};
use tokio_util::codec::Decoder;

const FRAMES: usize = 10_000;

fn reserve(i: u64) -> Request {
    Request::Reserve(Reserve { sku: 42, user: i, qty: 1, reservation_id: u128::from(i) + 1 })
}

fn codec(c: &mut Criterion) {
    let mut wire = BytesMut::new();
    for i in 0..FRAMES as u64 {
        reserve(i).encode_frame(i, &mut wire);
    }
    let wire = wire.freeze();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("decode_reserve_frames", |b| {
        b.iter(|| {
            let mut src = BytesMut::from(&wire[..]);
            let mut codec = FrameCodec::new();
            let mut n = 0;
            while let Some(frame) = codec.decode(&mut src).expect("valid") {
                let request = Request::decode(&frame).expect("valid");
                black_box(&request);
                n += 1;
            }
            assert_eq!(n, FRAMES);
        })
    });
    let requests: Vec<Request> = (0..FRAMES as u64).map(reserve).collect();
    group.bench_function("encode_reserve_frames", |b| {
        let mut buf = BytesMut::with_capacity(wire.len());
        b.iter(|| {
            buf.clear();
            for (i, request) in requests.iter().enumerate() {
                request.encode_frame(i as u64, &mut buf);
            }
            black_box(&buf);
        })
    });
    let reply = Reply::Outcome(Outcome::new(Status::Reserved, 1_795_000_000_000));
    group.bench_function("encode_reserve_replies", |b| {
        let mut buf = BytesMut::with_capacity(FRAMES * 64);
        b.iter(|| {
            buf.clear();
            for i in 0..FRAMES as u64 {
                reply.encode_frame(Opcode::Reserve, i, &mut buf);
            }
            black_box(&buf);
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
