//! Codec cost per frame: encode and decode of `Data` frames with 64 B and 1 KiB payloads.
//!
//! Run: `cargo bench -p ackwire-benches --bench codec -- --warm-up-time 1 --measurement-time 3`

use ackwire::wire::{Data, Frame, FrameDecoder, FrameEncoder};
use ackwire::{ChannelId, Guarantee};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

fn data(len: usize) -> Frame {
    Frame::Data(Data {
        channel: ChannelId(7),
        seq: 123_456,
        floor: 123_000,
        id_floor: 123_000,
        id: None,
        guarantee: Guarantee::EffectivelyOnce,
        schema: 0,
        payload: Bytes::from(vec![0xA5; len]),
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for (name, len) in [("64B", 64usize), ("1KiB", 1024)] {
        let frame = data(len);
        let enc = FrameEncoder::default();
        let mut buf = BytesMut::with_capacity(4096);
        g.bench_function(format!("encode_data_{name}"), |b| {
            b.iter(|| {
                buf.clear();
                enc.encode(black_box(&frame), &mut buf).unwrap();
                black_box(buf.len());
            })
        });

        let mut one = BytesMut::new();
        enc.encode(&frame, &mut one).unwrap();
        let one = one.freeze();
        let mut dec = FrameDecoder::default();
        g.bench_function(format!("decode_data_{name}"), |b| {
            b.iter_batched(
                || BytesMut::from(&one[..]),
                |mut src| black_box(dec.decode(&mut src).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
