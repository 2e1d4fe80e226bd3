//! The sender's ack path through the sans-IO [`Endpoint`], no IO and no tokio:
//!
//! * `register_cumulative_ack`: per message, `send` + `poll_transmit` (arms the
//!   retransmission timer) and a share of one cumulative `Frame::Ack` for the whole
//!   batch, draining every event, plus the expiry sweep that pops the batch's stale
//!   timer entries (timers are cancelled lazily, so that sweep is the cancel cost).
//! * `register_individual_acks`: the same with one `Frame::Ack` per message.
//! * `at_most_once_register`: `send` + `poll_transmit` of an at-most-once stream
//!   (settles on transmit, no timer, no ack) — the floor of the path.
//! * `stale_timer_sweep`: only the expiry sweep (`handle_timeout`) over a batch of
//!   acked messages' timer entries.
//! * `timer_heap_replica`: push + pop of the timer entry type in a `BinaryHeap` of the
//!   window's size, the structure the stream arms its timers in.
//!
//! The receiver is played as a default one answers: a node-level grant, then on every
//! ack the stream's credit `cumulative + 4096`. Every batch must transmit all its
//! messages (asserted): without credit the bench would measure sends that wait for it.
//!
//! Before the criterion groups it prints the live heap bytes per in-flight message at
//! 1 M in flight, measured with a counting global allocator, with and without the
//! 64 B payload. Run with `cargo bench -p ackwire-benches --bench ackpath`.

use ackwire::dedup::{Dedup, DedupConfig};
use ackwire::proto::{Endpoint, Outgoing};
use ackwire::wire::{Ack, Frame};
use ackwire::{ChannelId, Guarantee, NodeId, Origin, ProtoConfig};
use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to `System` unchanged and only adds a counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const PEER: NodeId = NodeId(2);
const CH: ChannelId = ChannelId(1);
/// Messages per measured batch (a quarter of the default 4096 window).
const BATCH: u64 = 1024;
/// The credit a receiver grants past what it settled (the default window).
const WINDOW: u64 = 4096;

/// A sender endpoint whose peer is up, so acks from it are applied.
fn endpoint(now: Instant, max_in_flight: usize, g: Guarantee) -> (Endpoint, u64) {
    let origin = Origin {
        node: NodeId(1),
        incarnation: 7,
    };
    let mut cfg = ProtoConfig::default();
    cfg.max_in_flight = max_in_flight;
    let dedup = Arc::new(Dedup::open(DedupConfig::default()).expect("dedup"));
    let mut ep = Endpoint::new(origin, cfg, dedup, 42);
    ep.handle_peer_up(
        now,
        Origin {
            node: PEER,
            incarnation: 9,
        },
        ackwire::wire::PROTOCOL_VERSION,
    );
    // The receiver's node-level grant (a sender only waits for it when the
    // receiver's buffers are full), then one message of `g` acked with a grant of
    // `max_in_flight` more, as a receiver answers a stream's first message.
    ep.handle_frame(
        now,
        PEER,
        Frame::NodeCredit(ackwire::wire::NodeCredit {
            limit: 1 << 40,
            received: 0,
        }),
    );
    let first = ep
        .send(now, outgoing(g, Bytes::from_static(b"first")))
        .expect("send")
        .seq;
    while ep.poll_transmit(now).is_some() {}
    let inc = origin.incarnation;
    ep.handle_frame(now, PEER, grant(inc, first, first + max_in_flight as u64));
    drain(&mut ep);
    (ep, inc)
}

fn outgoing(guarantee: Guarantee, payload: Bytes) -> Outgoing {
    Outgoing {
        peer: PEER,
        channel: CH,
        guarantee,
        schema: 0,
        payload,
        id: None,
        deadline: None,
    }
}

/// The receiver's ack up to `cumulative`, granting credit as a receiver with the
/// default window does: `WINDOW` past what it settled.
fn ack(incarnation: u64, cumulative: u64) -> Frame {
    grant(incarnation, cumulative, cumulative + WINDOW)
}

/// An ack frame settling up to `cumulative` and granting stream credit up to `credit`.
fn grant(incarnation: u64, cumulative: u64, credit: u64) -> Frame {
    Frame::Ack(Ack {
        channel: CH,
        incarnation,
        cumulative,
        ranges: Vec::new(),
        credit: Some(credit),
        received: 0,
        held: Vec::new(),
    })
}

/// Send and transmit a batch; returns the highest seq. Every message of the batch
/// must go out: a batch that waits for credit would measure the blocked path (as
/// this bench did, unnoticed, from receiver flow control until issue 14's fix).
fn register(ep: &mut Endpoint, now: Instant, g: Guarantee, payload: &Bytes) -> u64 {
    let mut top = 0;
    for _ in 0..BATCH {
        top = ep
            .send(now, outgoing(g, payload.clone()))
            .expect("send")
            .seq;
    }
    let mut frames = 0;
    while let Some(f) = ep.poll_transmit(now) {
        frames += 1;
        black_box(f);
    }
    assert_eq!(frames, BATCH, "a batch waited for credit");
    top
}

fn drain(ep: &mut Endpoint) {
    while let Some(e) = ep.poll_event() {
        black_box(e);
    }
}

/// A clock the benches advance by an hour per batch, so every timer is due at the
/// next sweep.
struct Clock(Instant);

impl Clock {
    fn tick(&mut self) -> Instant {
        self.0 += Duration::from_secs(3600);
        self.0
    }
}

fn ackpath(c: &mut Criterion) {
    let payload = Bytes::from(vec![0xA5u8; 64]);
    let mut group = c.benchmark_group("ackpath");
    group.throughput(Throughput::Elements(BATCH));

    for (name, individual) in [
        ("register_cumulative_ack", false),
        ("register_individual_acks", true),
    ] {
        group.bench_function(BenchmarkId::new(name, BATCH), |b| {
            let mut clock = Clock(Instant::now());
            let (mut ep, inc) = endpoint(clock.0, 4096, Guarantee::AtLeastOnce);
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let now = clock.tick();
                    let top = register(&mut ep, now, Guarantee::AtLeastOnce, &payload);
                    if individual {
                        for seq in top + 1 - BATCH..=top {
                            ep.handle_frame(now, PEER, ack(inc, seq));
                        }
                    } else {
                        ep.handle_frame(now, PEER, ack(inc, top));
                    }
                    drain(&mut ep);
                    ep.handle_timeout(clock.tick());
                    drain(&mut ep);
                }
                start.elapsed()
            })
        });
    }

    group.bench_function(BenchmarkId::new("at_most_once_register", BATCH), |b| {
        let mut clock = Clock(Instant::now());
        let (mut ep, inc) = endpoint(clock.0, 4096, Guarantee::AtMostOnce);
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let now = clock.tick();
                let top = register(&mut ep, now, Guarantee::AtMostOnce, &payload);
                // At-most-once settles on transmission; the receiver's acks only
                // carry credit.
                ep.handle_frame(now, PEER, ack(inc, top));
                drain(&mut ep);
            }
            start.elapsed()
        })
    });

    group.bench_function(BenchmarkId::new("stale_timer_sweep", BATCH), |b| {
        let mut clock = Clock(Instant::now());
        let (mut ep, inc) = endpoint(clock.0, 4096, Guarantee::AtLeastOnce);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let now = clock.tick();
                let top = register(&mut ep, now, Guarantee::AtLeastOnce, &payload);
                ep.handle_frame(now, PEER, ack(inc, top));
                drain(&mut ep);
                let later = clock.tick();
                let start = Instant::now();
                ep.handle_timeout(later);
                total += start.elapsed();
                drain(&mut ep);
            }
            total
        })
    });

    group.bench_function(BenchmarkId::new("timer_heap_replica", BATCH), |b| {
        let base = Instant::now();
        let mut heap: BinaryHeap<Reverse<(Instant, u64, u32)>> = BinaryHeap::new();
        let mut seq = 0u64;
        for _ in 0..4096 {
            seq += 1;
            heap.push(Reverse((base + Duration::from_micros(seq), seq, 1)));
        }
        b.iter(|| {
            for _ in 0..BATCH {
                seq += 1;
                heap.push(Reverse((base + Duration::from_micros(seq), seq, 1)));
                black_box(heap.pop());
            }
        })
    });
    group.finish();
}

/// Live heap bytes per in-flight message at `n` in flight.
fn memory_report() {
    const N: u64 = 1 << 20;
    let now = Instant::now();
    println!("ackpath memory: {N} messages in flight on one at-least-once stream");
    for (label, owned) in [
        ("payload shared (Bytes::from_static, 0 B heap)", false),
        ("payload owned (64 B Vec per message)", true),
    ] {
        let (mut ep, _) = endpoint(now, N as usize, Guarantee::AtLeastOnce);
        static PAYLOAD: [u8; 64] = [0xA5; 64];
        let before = LIVE.load(Ordering::Relaxed);
        for _ in 0..N {
            let payload = if owned {
                Bytes::from(PAYLOAD.to_vec())
            } else {
                Bytes::from_static(&PAYLOAD)
            };
            ep.send(now, outgoing(Guarantee::AtLeastOnce, payload))
                .expect("send");
        }
        let queued = LIVE.load(Ordering::Relaxed) - before;
        let mut frames = 0;
        while let Some(f) = ep.poll_transmit(now) {
            frames += 1;
            black_box(f);
        }
        assert_eq!(frames, N, "messages waited for credit");
        drain(&mut ep);
        let armed = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "  {label}: queued {:.1} B/msg, transmitted with timer armed {:.1} B/msg",
            queued as f64 / N as f64,
            armed as f64 / N as f64
        );
        drop(ep);
    }
}

criterion_group!(benches, ackpath);

fn main() {
    memory_report();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
