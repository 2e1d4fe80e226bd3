//! Latency at a fixed moderate rate over TCP loopback, per guarantee (harness = false;
//! prints a table, runs under `cargo bench -p ackwire-benches --bench latency`).
//!
//! One sender node → one receiver node, 64 B payloads carrying their send instant, at
//! [`RATE`] msg/s paced by a tokio sleep per 1 ms tick ([`PER_TICK`] messages per tick:
//! tokio's timer has millisecond granularity). For each message it records
//!
//! * `send→ack`: from the `send` call until its [`ackwire::Receipt`] resolved — the
//!   receiver's handler acked and the ack came back (at-most-once: until the frame was
//!   handed to the transport, `Outcome::Sent`);
//! * `send→deliver`: from the `send` call until the receiving handler got it (one
//!   way; both nodes share the process clock).
//!
//! Percentiles come from an HDR histogram (3 significant digits). A warm-up second is
//! discarded. Set `ACKWIRE_LAT_SECS` to change the measured seconds (default 3).
//!
//! The last row repeats effectively-once with [`IDLE_CHANNELS`] other channels between
//! the same two nodes opened first (one message each, acked, then idle): a node's cost
//! per message must not grow with the streams it has open but not in use.

use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
use bytes::Bytes;
use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Messages per second.
const RATE: u64 = 10_000;
/// Messages sent per 1 ms tick.
const PER_TICK: u64 = RATE / 1000;
const SIZE: usize = 64;
/// Idle channels open in the last row.
const IDLE_CHANNELS: u32 = 10_000;

type Hist = Arc<Mutex<Histogram<u64>>>;

fn hist() -> Hist {
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("histogram bounds"),
    ))
}

fn record(h: &Hist, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    h.lock()
        .unwrap_or_else(|e| e.into_inner())
        .saturating_record(ns);
}

struct Row {
    name: &'static str,
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    achieved: f64,
}

async fn run(g: Guarantee, name: &'static str, ch: u32, secs: u64, idle: u32) -> Row {
    let base = Instant::now();
    let b = Node::builder(NodeId(2))
        .bind("127.0.0.1:0".parse().expect("addr"))
        .allow_peer(NodeId(1))
        .build()
        .await
        .expect("receiver node");
    let a = Node::builder(NodeId(1))
        .bind("127.0.0.1:0".parse().expect("addr"))
        .peer(NodeId(2), b.local_addr().expect("bound"))
        .build()
        .await
        .expect("sender node");
    // Channels 1000.. that are opened, used once and left idle.
    let mut idle_receipts = Vec::new();
    for c in 1000..1000 + idle {
        let mut inbox = b.raw_receiver(ChannelId(c), false).expect("receiver");
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                d.ack();
            }
        });
        let s = a
            .raw_sender(NodeId(2), ChannelOptions::new(ChannelId(c), g))
            .expect("sender");
        idle_receipts.push(s.send(Bytes::from_static(b"idle")).await.expect("send"));
    }
    for r in idle_receipts {
        r.await.expect("idle channel's message settled");
    }
    let deliver = hist();
    let ack = hist();
    // Only messages sent after warm-up are recorded; their payload carries a flag.
    let mut inbox = b.raw_receiver(ChannelId(ch), false).expect("receiver");
    let dh = deliver.clone();
    let consumer = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            let m = d.message();
            let sent_ns = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
            if m[8] == 1 {
                let now = base.elapsed();
                record(&dh, now.saturating_sub(Duration::from_nanos(sent_ns)));
            }
            d.ack();
        }
    });
    let out = a
        .raw_sender(NodeId(2), ChannelOptions::new(ChannelId(ch), g))
        .expect("sender");
    // Receipts are awaited in send order by one collector task.
    let (rtx, mut rrx) = mpsc::unbounded_channel::<(Instant, bool, ackwire::Receipt)>();
    let ah = ack.clone();
    let collector = tokio::spawn(async move {
        while let Some((t0, measured, r)) = rrx.recv().await {
            r.await.expect("settled");
            if measured {
                record(&ah, t0.elapsed());
            }
        }
    });
    let warmup = RATE; // one second
    let total = warmup + RATE * secs;
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut measured_start = None;
    while sent < total {
        let tick = sent / PER_TICK;
        tokio::time::sleep_until(start + Duration::from_millis(tick)).await;
        for _ in 0..PER_TICK {
            let measured = sent >= warmup;
            if measured && measured_start.is_none() {
                measured_start = Some(Instant::now());
            }
            let t0 = Instant::now();
            let mut p = vec![0u8; SIZE];
            let ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            p[..8].copy_from_slice(&ns.to_le_bytes());
            p[8] = u8::from(measured);
            let r = out.send(Bytes::from(p)).await.expect("send");
            let _ = rtx.send((t0, measured, r));
            sent += 1;
        }
    }
    drop(rtx);
    collector.await.expect("collector");
    let achieved = (RATE * secs) as f64
        / measured_start
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(1.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.shutdown().await;
    b.shutdown().await;
    consumer.abort();
    let take = |h: Hist| {
        let h = h.lock().unwrap_or_else(|e| e.into_inner());
        h.clone()
    };
    Row {
        name,
        ack: take(ack),
        deliver: take(deliver),
        achieved,
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("latency: run with `cargo bench -p ackwire-benches --bench latency`");
        return;
    }
    let secs = std::env::var("ACKWIRE_LAT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "latency: {RATE} msg/s ({PER_TICK} per 1 ms tick), {SIZE} B, {secs} s measured after 1 s warm-up, TCP loopback"
    );
    println!("| guarantee | what | n | p50 µs | p99 µs | p99.9 µs | max µs | achieved msg/s |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (i, (g, name, idle)) in [
        (Guarantee::AtMostOnce, "AtMostOnce", 0),
        (Guarantee::AtLeastOnce, "AtLeastOnce", 0),
        (Guarantee::EffectivelyOnce, "EffectivelyOnce", 0),
        (
            Guarantee::EffectivelyOnce,
            "EffectivelyOnce, 10 000 idle channels open",
            IDLE_CHANNELS,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let row = rt.block_on(run(g, name, 10 + i as u32, secs, idle));
        for (what, h) in [
            (
                if g == Guarantee::AtMostOnce {
                    "send→sent"
                } else {
                    "send→ack"
                },
                &row.ack,
            ),
            ("send→deliver", &row.deliver),
        ] {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
                row.name,
                what,
                h.len(),
                us(h, 0.50),
                us(h, 0.99),
                us(h, 0.999),
                h.max() as f64 / 1000.0,
                row.achieved
            );
        }
    }
}
