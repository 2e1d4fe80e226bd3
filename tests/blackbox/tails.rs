//! Black-box: many sender nodes (10–20, one process, real TCP on loopback) to one
//! receiver whose handlers have a heavy latency tail, with DEFAULT settings, for all
//! three guarantees; a noisy neighbour hammering the receiver's port meanwhile; one
//! slow channel next to fast ones; a handler slow only for messages redelivered after
//! a receiver crash; one application key sent by ten nodes at once to a handler slower
//! than the key horizon; one sender stuck past its stream credit beside ten others.
//!
//! What each test checks, per guarantee: at-most-once never delivered twice (and, on
//! this healthy link, never lost); at-least-once processed at least once for every
//! `Acked` receipt; effectively-once never handed to a handler twice; every receipt
//! resolves (messages held past the 30 s default deadline fail with `Deadline`, the
//! rest are `Acked` / `Sent`); nothing healthy dead-lettered or rejected;
//! retransmissions under a generous bound; no sender starved while another sender's
//! messages are stuck in handlers.
//!
//! Held: every guarantee's property, with 20 senders and with a noisy neighbour
//! (~100 000 junk connections in 35 s, all counted in the transport's `rejected_*` /
//! `handshakes_failed`); no sender starved behind another's messages stuck past the
//! deadline; a channel whose handler holds 1 000 messages does not stall three fast
//! channels of the same ten senders; a key sent by ten nodes at once to a handler
//! twice as slow as the key horizon runs once and all ten receipts are `Acked`; one
//! sender whose 5 000 messages are held past its stream credit does not slow ten
//! others on the same channel (the receiver holds at most 4 096 of its stream).
//!
//! Found and fixed: `t6` (20 senders, one process, 2 cores; each stream warmed up,
//! then 150 messages per guarantee each at once to one receiver with heavy-tailed
//! handlers) drew about 4 500 retransmissions for 6 000 acked-kind messages (75 %),
//! and up to 9 796 with two busy loops beside the binary: every one a copy the
//! receiver already had, sent because the receiver, starved of CPU, answered nothing
//! for an RTO and every timer of a burst then expired together. A stream whose
//! receiver has been silent for an RTO now retransmits only its oldest message and
//! waits for the answer (`proto/outbound.rs`, "Silent streams"): 0–64 under the same
//! load (`t1` and `t6`, three runs each). `t1`/`t2` keep the looser storm bound (`NO_STORM_PCT`), `t6` the 5 % one.
//!
//! Found and fixed: `t7` (after a receiver crash, the 120 messages the crashed run
//! held are redelivered to the new run, whose handler takes 6 s for each) drew
//! 560–670 retransmissions (5 per message, on the sender's backoff; 5 runs), 440–540
//! of them dropped by the new run as in-progress copies, instead of the one resend at
//! reconnection. The new run's held watermark (`Ack::received`) is a prefix; the seqs
//! the crashed run settled between the held ones are never sent again, so it stopped
//! at the first gap and the sender treated the rest as lost. Protocol version 5 acks
//! carry held ranges above the watermark (`Ack::held`): 120 now, one copy each.
//! `t9` is the same on ordered receivers, whose new run buffers the redeliveries
//! above those gaps until a frame's floor passes them: all delivered, 331 copies
//! (440 before the sender carried a floor that moves past such a gap at once).

use crate::support;

use ackwire::{
    ChannelId, ChannelOptions, Delivery, Guarantee, IdKey, Node, NodeConfig, NodeId, Outcome,
    SendError,
};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::wait::{wait_until, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// (channel, value) -> count.
type Tally = Arc<Mutex<HashMap<(u32, u64), u32>>>;
/// (channel, value) -> the receipt's outcome.
type Results = Arc<Mutex<HashMap<(u32, u64), Result<Outcome, SendError>>>>;

/// Values are `sender index * M + seq`.
const M: u64 = 1_000_000;

fn bump(t: &Tally, ch: u32, v: u64) {
    *t.lock().unwrap().entry((ch, v)).or_default() += 1;
}

fn count(t: &Tally, ch: u32, v: u64) -> u32 {
    t.lock().unwrap().get(&(ch, v)).copied().unwrap_or(0)
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn receiver_node(id: u64, addr: SocketAddr, allow: &[u64], cfg: NodeConfig) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(addr).config(cfg);
    for p in allow {
        b = b.allow_peer(NodeId(*p));
    }
    b.build().await.expect("receiver builds")
}

async fn sender_node(id: u64, peer: u64, addr: SocketAddr) -> Node {
    Node::builder(NodeId(id))
        .bind(any_addr())
        .peer(NodeId(peer), addr)
        .build()
        .await
        .expect("sender builds")
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The heavy tail: 99 % of messages 0–1 ms, 1 % 2–5 s.
fn tail_latency(ch: u32, v: u64) -> Duration {
    let h = mix(v ^ (u64::from(ch) << 48));
    if h.is_multiple_of(100) {
        Duration::from_millis(2_000 + (h >> 8) % 3_000)
    } else {
        Duration::from_micros((h >> 8) % 1_000)
    }
}

/// Sends `per` values of sender `idx` on `out`; each receipt's outcome lands in
/// `results` as it resolves (so one stuck receipt does not hide the others).
fn spawn_sends(
    out: ackwire::Sender<u64>,
    ch: u32,
    idx: u64,
    per: u64,
    results: Results,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for s in 0..per {
            let v = idx * M + s;
            match out.send(&v).await {
                Ok(r) => {
                    let results = results.clone();
                    tokio::spawn(async move {
                        let got = r.await;
                        results.lock().unwrap().insert((ch, v), got);
                    });
                }
                Err(e) => {
                    results.lock().unwrap().insert((ch, v), Err(e));
                }
            }
        }
    })
}

async fn stats(n: &Node) -> ackwire::Stats {
    within(10.0, "stats", n.stats()).await.expect("stats")
}

async fn retransmitted(nodes: &[Node]) -> u64 {
    let mut sum = 0;
    for n in nodes {
        sum += stats(n).await.proto.retransmitted;
    }
    sum
}

async fn sum_of(nodes: &[Node], f: impl Fn(&ackwire::Stats) -> u64) -> u64 {
    let mut sum = 0;
    for n in nodes {
        sum += f(&stats(n).await);
    }
    sum
}

// ---------------------------------------------------------------------------------------
// Noisy neighbour: another process that can reach the receiver's port.

async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    sock.connect(dst).await
}

/// The first bytes a node sends on a connection it dials (its handshake).
async fn captured_opening(claim: u64, as_peer: u64) -> Vec<u8> {
    let listener = TcpListener::bind(any_addr()).await.unwrap();
    let node = sender_node(claim, as_peer, listener.local_addr().unwrap()).await;
    let (mut s, _) = within(10.0, "capture accept", listener.accept())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    // Long enough for a node built on a loaded machine; the loop ends at the first
    // 100 ms pause after data.
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) if !got.is_empty() => break,
            Err(_) => {}
        }
    }
    node.shutdown().await;
    assert!(!got.is_empty(), "the node sent no handshake bytes");
    got
}

#[derive(Clone, Copy, Debug)]
enum Noise {
    /// Connect, say nothing, hold.
    Idle,
    /// Random bytes, then hold.
    Garbage,
    /// Half of a real handshake, then hold.
    HalfHandshake,
    /// Open and close at once.
    OpenClose,
}

/// One noisy worker from `src` until `stop`; returns the connections it made.
fn spawn_noise(
    src: Ipv4Addr,
    dst: SocketAddr,
    kind: Noise,
    opening: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut made = 0u64;
        let mut rng = seed | 1;
        while !stop.load(Ordering::Relaxed) {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(2), connect_from(src, dst)).await
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            made += 1;
            match kind {
                Noise::OpenClose => {
                    drop(s);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                Noise::Idle => {}
                Noise::Garbage => {
                    let mut bytes = vec![0u8; 16 + (rng % 2_000) as usize];
                    for b in bytes.iter_mut() {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        *b = rng as u8;
                    }
                    let _ = s.write_all(&bytes).await;
                }
                Noise::HalfHandshake => {
                    let _ = s.write_all(&opening[..opening.len() / 2]).await;
                }
            }
            let until = Instant::now() + Duration::from_millis(1_500);
            let mut buf = [0u8; 1024];
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
        }
        made
    })
}

/// Everything the receiver's transport counts as refused input.
async fn noise_counted(n: &Node) -> u64 {
    let Some(t) = stats(n).await.tcp else {
        return 0;
    };
    t.handshakes_failed
        + t.rejected_bad_checksum
        + t.rejected_unsupported_version
        + t.rejected_too_large
        + t.rejected_malformed
        + t.rejected_unexpected_frame
        + t.rejected_handshake_timeout
        + t.rejected_wrong_peer
        + t.rejected_unknown_peer
        + t.evicted_handshakes
}

// ---------------------------------------------------------------------------------------
// 1. Many senders, heavy-tailed handlers, some messages stuck past the deadline.

const AMO: u32 = 1;
const ALO: u32 = 2;
const EO: u32 = 3;
/// Sender 0's first `STUCK` messages on every channel are held this long by their
/// handler: past the 30 s default deadline.
const STUCK: u64 = 40;
const STUCK_FOR: Duration = Duration::from_secs(33);
/// The "no retransmission storm" bound of the tests that pass: on average at most
/// eight copies per message (seen: up to 1.6 in `t1`/`t2` on a loaded 2-core machine
/// before the silent-stream gate, under 0.01 after it; `t6` holds the README's 5 %).
const NO_STORM_PCT: u64 = 800;

fn is_stuck(v: u64) -> bool {
    v < STUCK
}

/// Values of warm-up messages (one per stream, before the run).
const WARM: u64 = 900 * M;

/// Runs the heavy-tail workload; `max_retx_pct` bounds retransmissions as a percentage
/// of the at-least-once and effectively-once messages sent.
async fn heavy_tail(
    base: u64,
    senders: u64,
    per: u64,
    noise: bool,
    warm_up: bool,
    max_retx_pct: u64,
) {
    let allow: Vec<u64> = (1..=senders).map(|i| base + i).collect();
    let b = receiver_node(base, any_addr(), &allow, NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let delivered: Tally = Arc::default();
    let completed: Tally = Arc::default();
    let stuck_done = Arc::new(AtomicU64::new(0));
    let mut handlers = Vec::new();
    for ch in [AMO, ALO, EO] {
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let (dl, cp, sd) = (delivered.clone(), completed.clone(), stuck_done.clone());
        handlers.push(tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                bump(&dl, ch, v);
                let (cp, sd) = (cp.clone(), sd.clone());
                tokio::spawn(async move {
                    let stuck = is_stuck(v);
                    let lat = if stuck {
                        STUCK_FOR
                    } else if v >= WARM {
                        Duration::ZERO
                    } else {
                        tail_latency(ch, v)
                    };
                    tokio::time::sleep(lat).await;
                    bump(&cp, ch, v);
                    d.ack();
                    if stuck {
                        sd.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        }));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut noisy = Vec::new();
    let noise_before = noise_counted(&b).await;
    if noise {
        let claimed = base + 999; // not admitted: a stranger's handshake
        let opening = Arc::new(captured_opening(claimed, base).await);
        let mut seed = base;
        for kind in [
            Noise::Idle,
            Noise::Garbage,
            Noise::HalfHandshake,
            Noise::OpenClose,
        ] {
            for _ in 0..4 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                noisy.push(spawn_noise(
                    Ipv4Addr::new(127, 0, 0, 2),
                    addr,
                    kind,
                    opening.clone(),
                    stop.clone(),
                    seed,
                ));
            }
        }
    }

    let results: Results = Arc::default();
    let mut nodes = Vec::new();
    let mut tasks = Vec::new();
    let mut outs = Vec::new();
    for (idx, id) in allow.iter().enumerate() {
        let a = sender_node(*id, base, addr).await;
        for (ch, g) in [
            (AMO, Guarantee::AtMostOnce),
            (ALO, Guarantee::AtLeastOnce),
            (EO, Guarantee::EffectivelyOnce),
        ] {
            let out = a
                .sender::<u64>(NodeId(base), ChannelOptions::new(ChannelId(ch), g))
                .unwrap();
            if warm_up {
                let r = within(20.0, "warm-up send", out.send(&(WARM + idx as u64)))
                    .await
                    .unwrap();
                let _ = within(20.0, "warm-up receipt", r).await;
            }
            outs.push((out, ch, idx as u64));
        }
        nodes.push(a);
    }
    let retx_warm = retransmitted(&nodes).await;
    let t0 = Instant::now();
    for (out, ch, idx) in outs {
        tasks.push(spawn_sends(out, ch, idx, per, results.clone()));
    }
    for t in tasks {
        within(60.0, "a sender's sends", t).await.unwrap();
    }
    // Every receipt but the stuck ones resolves while the stuck ones are still held:
    // no sender starved behind sender 0's stuck messages.
    let healthy: Vec<(u32, u64)> = [AMO, ALO, EO]
        .into_iter()
        .flat_map(|ch| (0..senders).flat_map(move |i| (0..per).map(move |s| (ch, i * M + s))))
        .filter(|(ch, v)| *ch == AMO || !is_stuck(*v))
        .collect();
    let unresolved = |keys: &[(u32, u64)]| -> Vec<(u32, u64)> {
        let r = results.lock().unwrap();
        keys.iter()
            .filter(|k| !r.contains_key(k))
            .copied()
            .collect()
    };
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let left = unresolved(&healthy);
        if left.is_empty() {
            break;
        }
        if Instant::now() >= end {
            panic!(
                "{} healthy receipts unresolved after 90 s, e.g. {:?}",
                left.len(),
                &left[..left.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let healthy_took = t0.elapsed();
    let stuck_done_then = stuck_done.load(Ordering::SeqCst);
    let mut problems = Vec::new();
    if stuck_done_then != 0 {
        problems.push(format!(
            "starvation: the healthy receipts resolved only after {stuck_done_then} stuck \
             handlers had finished ({healthy_took:?})"
        ));
    }
    // Then every receipt resolves, the stuck ones included (past their deadline).
    let all: Vec<(u32, u64)> = [AMO, ALO, EO]
        .into_iter()
        .flat_map(|ch| (0..senders).flat_map(move |i| (0..per).map(move |s| (ch, i * M + s))))
        .collect();
    let end = Instant::now() + Duration::from_secs(60);
    while !unresolved(&all).is_empty() {
        if Instant::now() >= end {
            let left = unresolved(&all);
            panic!(
                "{} receipts never resolved, e.g. {:?}",
                left.len(),
                &left[..left.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stuck_total = 3 * STUCK;
    wait_until(60.0, "the stuck handlers finish", || {
        stuck_done.load(Ordering::SeqCst) >= stuck_total
    })
    .await;
    // Room for anything redelivered after the stuck handlers' acks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut noise_made = 0;
    for n in noisy {
        noise_made += within(10.0, "noise worker", n).await.unwrap();
    }

    let results = results.lock().unwrap().clone();
    let mut kinds: HashMap<String, u64> = HashMap::new();
    for ((ch, v), r) in &results {
        let stuck = is_stuck(*v) && *ch != AMO;
        let want_ok = if *ch == AMO {
            Outcome::Sent
        } else {
            Outcome::Acked
        };
        let k = format!("ch{ch} {r:?}");
        *kinds
            .entry(k.split(" {").next().unwrap().to_string())
            .or_default() += 1;
        match r {
            Ok(o) if *o == want_ok && !stuck => {}
            Err(SendError::Deadline { .. }) if stuck => {}
            other => problems.push(format!(
                "ch{ch} value {v} (stuck={stuck}): receipt {other:?}"
            )),
        }
        let dl = count(&delivered, *ch, *v);
        let cp = count(&completed, *ch, *v);
        match *ch {
            AMO => {
                if dl != 1 {
                    problems.push(format!("at-most-once value {v} delivered {dl} times"));
                }
            }
            ALO => {
                if r == &Ok(Outcome::Acked) && cp == 0 {
                    problems.push(format!("at-least-once value {v} Acked, never processed"));
                }
            }
            _ => {
                if dl > 1 {
                    problems.push(format!(
                        "effectively-once value {v} handed to a handler {dl} times \
                         (completed {cp})"
                    ));
                }
                if r == &Ok(Outcome::Acked) && cp != 1 {
                    problems.push(format!(
                        "effectively-once value {v} Acked, processed {cp} times"
                    ));
                }
            }
        }
    }
    let rs = stats(&b).await;
    let retx = retransmitted(&nodes).await;
    let sent = 3 * senders * per;
    let alo_redelivered: u32 = (0..senders)
        .flat_map(|i| (0..per).map(move |s| i * M + s))
        .map(|v| count(&delivered, ALO, v).saturating_sub(1))
        .sum();
    eprintln!(
        "heavy tail ({senders} senders x {per} x 3, noise={noise}): healthy receipts in \
         {healthy_took:?}; outcomes {kinds:?}; retransmitted {retx} of {sent}; \
         at-least-once redeliveries {alo_redelivered}; receiver delivered {} dups dropped \
         {} in-progress dropped {} held probes {} credit waits {}; noise connections \
         {noise_made}, counted {}; retransmitted during warm-up {retx_warm}",
        rs.proto.delivered,
        rs.proto.duplicates_dropped,
        rs.proto.in_progress_dropped,
        sum_of(&nodes, |s| s.proto.held_probes).await,
        sum_of(&nodes, |s| s.proto.credit_waits).await,
        noise_counted(&b).await - noise_before,
    );
    if rs.proto.dead_lettered != 0 || rs.proto.rejected != 0 {
        problems.push(format!(
            "healthy messages refused: dead-lettered {} rejected {}",
            rs.proto.dead_lettered, rs.proto.rejected
        ));
    }
    let acked_kind = 2 * senders * per;
    if retx > acked_kind * max_retx_pct / 100 + 50 {
        problems.push(format!(
            "retransmitted {retx} for {acked_kind} at-least-once and effectively-once \
             messages (bound {max_retx_pct} %)"
        ));
    }
    if noise {
        if noise_made == 0 {
            problems.push("the noisy neighbour made no connection".into());
        }
        if noise_counted(&b).await == noise_before {
            problems.push(format!(
                "{noise_made} noisy connections, none counted by the receiver: {:?}",
                stats(&b).await.tcp
            ));
        }
    }
    for h in handlers {
        h.abort();
    }
    for a in &nodes {
        within(30.0, "sender shutdown", a.shutdown()).await;
    }
    within(30.0, "receiver shutdown", b.shutdown()).await;
    problems.truncate(40);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// 20 sender nodes, each 150 messages per guarantee, to one receiver whose handlers
/// (one task per delivery) take 0–1 ms, 1 % of them 2–5 s, and sender 0's first 40
/// messages per channel 33 s (past the default 30 s deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_twenty_senders_heavy_tailed_handlers_all_guarantees() {
    heavy_tail(10_000, 20, 150, false, false, NO_STORM_PCT).await;
}

/// As `t1` with 12 senders, while a noisy neighbour (another loopback address) keeps
/// opening connections to the receiver's port: idle ones, garbage, half a handshake,
/// open-and-close. The senders' promises hold, and the noise is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_heavy_tail_with_a_noisy_neighbour_on_the_port() {
    heavy_tail(11_000, 12, 150, true, false, NO_STORM_PCT).await;
}

/// The same workload as `t1`, but every stream first sends one message and has it
/// acked (connections up, an RTT sample per stream: ~1 ms on loopback), then the 20
/// senders send their bursts together. The receiver holds every message it got within
/// 20 ms (README: "so a slow handler does not cause retransmissions"; "a stalled,
/// loaded machine no longer turns into a burst of spurious retransmissions"), so
/// retransmissions should stay a small fraction: at most 5 % of the 6 000
/// at-least-once and effectively-once messages. Seen before the silent-stream gate:
/// about 4 500 retransmissions (75 %, up to 9 796 beside two busy loops), all of them
/// copies the receiver dropped; after it, 0–64 beside two busy loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_twenty_senders_bursting_together_retransmit_little() {
    heavy_tail(15_000, 20, 150, false, true, 5).await;
}

// ---------------------------------------------------------------------------------------
// 2. One slow channel next to fast ones, ten senders.

/// Ten senders each send 100 effectively-once messages on a channel whose handler
/// holds every delivery, then 400 messages on each of three fast channels (one per
/// guarantee). Every fast receipt resolves while all 1 000 slow messages are still
/// held (no head-of-line blocking across channels or senders); released, the slow
/// ones are all `Acked`, each processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_one_slow_channel_does_not_stall_fast_channels_of_ten_senders() {
    const BASE: u64 = 12_000;
    const SENDERS: u64 = 10;
    const SLOW_N: u64 = 100;
    const FAST_N: u64 = 400;
    const SLOW: u32 = 10;
    let allow: Vec<u64> = (1..=SENDERS).map(|i| BASE + i).collect();
    let b = receiver_node(BASE, any_addr(), &allow, NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    let delivered: Tally = Arc::default();
    {
        let mut rx = b.receiver::<u64>(ChannelId(SLOW), false).unwrap();
        let (held, dl) = (held.clone(), delivered.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                bump(&dl, SLOW, *d.message());
                held.lock().unwrap().push(d);
            }
        });
    }
    let fast = [
        (11u32, Guarantee::AtLeastOnce),
        (12, Guarantee::EffectivelyOnce),
        (13, Guarantee::AtMostOnce),
    ];
    for (ch, _) in fast {
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let dl = delivered.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                bump(&dl, ch, *d.message());
                d.ack();
            }
        });
    }
    let mut nodes = Vec::new();
    for id in &allow {
        nodes.push(sender_node(*id, BASE, addr).await);
    }
    let slow_results: Results = Arc::default();
    let mut tasks = Vec::new();
    for (idx, a) in nodes.iter().enumerate() {
        let out = a
            .sender::<u64>(
                NodeId(BASE),
                ChannelOptions::new(ChannelId(SLOW), Guarantee::EffectivelyOnce),
            )
            .unwrap();
        tasks.push(spawn_sends(
            out,
            SLOW,
            idx as u64,
            SLOW_N,
            slow_results.clone(),
        ));
    }
    for t in tasks {
        within(30.0, "slow sends", t).await.unwrap();
    }
    wait_until(15.0, "every slow message held by its handler", || {
        held.lock().unwrap().len() as u64 == SENDERS * SLOW_N
    })
    .await;
    let t0 = Instant::now();
    let fast_results: Results = Arc::default();
    let mut tasks = Vec::new();
    for (idx, a) in nodes.iter().enumerate() {
        for (ch, g) in fast {
            let out = a
                .sender::<u64>(NodeId(BASE), ChannelOptions::new(ChannelId(ch), g))
                .unwrap();
            tasks.push(spawn_sends(
                out,
                ch,
                idx as u64,
                FAST_N,
                fast_results.clone(),
            ));
        }
    }
    for t in tasks {
        within(20.0, "fast sends", t).await.unwrap();
    }
    let want = SENDERS * FAST_N * fast.len() as u64;
    wait_until(
        20.0,
        "every fast receipt resolves while the slow channel holds its messages",
        || fast_results.lock().unwrap().len() as u64 == want,
    )
    .await;
    let fast_took = t0.elapsed();
    // An at-most-once receipt resolves when its message is written, not when it
    // arrives: the last ones may still be on their way. (A CI run checked at once and
    // found the last tens of them not yet delivered.)
    let amo_arrived =
        || (0..SENDERS).all(|i| (0..FAST_N).all(|s| count(&delivered, 13, i * M + s) > 0));
    let settle = Instant::now() + Duration::from_secs(10);
    while !amo_arrived() && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut problems = Vec::new();
    if !amo_arrived() {
        let s = b.stats().await.unwrap();
        problems.push(format!(
            "at-most-once messages missing 10 s after their receipts: receiver delivered \
             {}, frames ignored {}, reorder overflow {}, credit exceeded {}, tcp {:?}",
            s.proto.delivered,
            s.proto.frames_ignored,
            s.proto.reorder_overflow,
            s.proto.credit_exceeded,
            s.tcp
        ));
    }
    let still_held = held.lock().unwrap().len() as u64;
    if still_held != SENDERS * SLOW_N || !slow_results.lock().unwrap().is_empty() {
        problems.push(format!(
            "slow channel changed while held: {still_held} held, {} receipts resolved",
            slow_results.lock().unwrap().len()
        ));
    }
    for ((ch, v), r) in fast_results.lock().unwrap().iter() {
        let want = if *ch == 13 {
            Outcome::Sent
        } else {
            Outcome::Acked
        };
        if r != &Ok(want) {
            problems.push(format!("fast ch{ch} value {v}: {r:?}"));
        }
        let dl = count(&delivered, *ch, *v);
        if (*ch == 12 || *ch == 13) && dl != 1 {
            problems.push(format!("fast ch{ch} value {v} delivered {dl} times"));
        }
        if *ch == 11 && dl == 0 {
            problems.push(format!("fast ch{ch} value {v} acked, never delivered"));
        }
    }
    // Release the slow channel.
    for d in held.lock().unwrap().drain(..) {
        d.ack();
    }
    wait_until(30.0, "every slow receipt resolves once released", || {
        slow_results.lock().unwrap().len() as u64 == SENDERS * SLOW_N
    })
    .await;
    for ((ch, v), r) in slow_results.lock().unwrap().iter() {
        if r != &Ok(Outcome::Acked) {
            problems.push(format!("slow value {v}: {r:?}"));
        }
        let dl = count(&delivered, *ch, *v);
        if dl != 1 {
            problems.push(format!("slow value {v} delivered {dl} times"));
        }
    }
    let retx = retransmitted(&nodes).await;
    eprintln!(
        "slow channel: fast channels done in {fast_took:?} with 1 000 slow messages held; \
         retransmitted {retx}"
    );
    // Retransmittable: the slow channel and the two acked fast channels.
    let total = SENDERS * (SLOW_N + 2 * FAST_N);
    if retx > total * NO_STORM_PCT / 100 {
        problems.push(format!("retransmitted {retx} of {total}"));
    }
    for a in &nodes {
        within(30.0, "sender shutdown", a.shutdown()).await;
    }
    within(30.0, "receiver shutdown", b.shutdown()).await;
    problems.truncate(40);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 3. A handler slow only for messages redelivered after a receiver crash.

/// Six senders, 100 effectively-once and 100 at-least-once messages each. The
/// receiver's first run acks at once but holds every tenth message; it is crashed
/// (dropped without shutdown) and restarted on the same address, where the handler
/// takes 6 s for each message its first run had seen (the redeliveries: 20 times the
/// 200 ms minimum RTO) and is immediate otherwise. Every receipt `Acked`; in the
/// second run no effectively-once message reaches a handler twice (retransmissions
/// arriving during the slow redelivery are in-progress duplicates); the held ones
/// are processed exactly once over both runs; retransmissions bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_handler_slow_only_for_redeliveries_after_a_receiver_crash() {
    redelivered_slow(13_000, None, false, Duration::from_secs(6)).await;
}

/// As `t4`, with the bound the README's held-message promise implies: the sender
/// retransmits the messages the crashed run held at once when the new run connects
/// (one copy each), and the new run holds them in its handler for 6 s, telling the
/// sender so; a slow handler "does not cause retransmissions" and held messages are
/// only re-checked (a probe, not a copy) every `retry.backoff_cap`. So after the crash
/// at most two copies per held message (120 held: at most 240).
///
/// Regression: 560–670 retransmissions (5–6 per held message, on the sender's
/// backoff), 440–540 of them dropped by the new run as in-progress copies. The new
/// run's held watermark (`Ack::received`) is a prefix: it stopped at seq 11 of each
/// stream, which the crashed run had settled and the sender never sends again, so the
/// redeliveries above it (20, 30, …) looked unheld. Protocol version 5 adds held
/// ranges above the watermark to the ack (`Ack::held`); now 120 (one copy each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_redeliveries_held_by_a_slow_handler_after_a_crash_are_not_retransmitted() {
    redelivered_slow(16_000, Some(2), false, Duration::from_secs(6)).await;
}

/// As `t7`, on ordered receivers, each redelivery taking 300 ms. The new run hands
/// out the redelivery of seq 10 and buffers 20, 30, … for order: it never saw the seqs
/// between them, which the crashed run settled, so only a frame whose floor passes
/// them lets 20 go. Every receipt `Acked`, each held message processed once
/// (effectively-once), at most five copies each: a buffered message is retransmitted
/// on the backoff while it waits its turn (the held ranges of protocol 5 report only
/// what handlers hold), and when the sender's floor moves past such a gap a copy
/// carries it at once. Seen: 331 copies in 7.2 s (440 in 9.6 s without that copy).
/// (Found in review: with buffered messages reported held, such a stream stalled
/// until the deadline: nothing carried the floor.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t9_ordered_receivers_restarted_with_gaps_between_redeliveries_deliver_them() {
    redelivered_slow(17_000, Some(5), true, Duration::from_millis(300)).await;
}

/// `copies`: at most this many retransmissions per held message after the crash.
async fn redelivered_slow(base: u64, copies: Option<u64>, ordered: bool, slow_for: Duration) {
    const SENDERS: u64 = 6;
    const N: u64 = 100;
    const EO_CH: u32 = 20;
    const ALO_CH: u32 = 21;
    let addr = support::ports::restartable_addr();
    let allow: Vec<u64> = (1..=SENDERS).map(|i| base + i).collect();
    let b = receiver_node(base, addr, &allow, NodeConfig::default()).await;
    let seen1: Arc<Mutex<HashSet<(u32, u64)>>> = Arc::default();
    let completed: Tally = Arc::default();
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    for ch in [EO_CH, ALO_CH] {
        let mut rx = b.receiver::<u64>(ChannelId(ch), ordered).unwrap();
        let (seen1, cp, held) = (seen1.clone(), completed.clone(), held.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                seen1.lock().unwrap().insert((ch, v));
                if v.is_multiple_of(10) {
                    held.lock().unwrap().push(d);
                } else {
                    bump(&cp, ch, v);
                    d.ack();
                }
            }
        });
    }
    let mut nodes = Vec::new();
    let results: Results = Arc::default();
    let mut tasks = Vec::new();
    for (idx, id) in allow.iter().enumerate() {
        let a = sender_node(*id, base, addr).await;
        for (ch, g) in [
            (EO_CH, Guarantee::EffectivelyOnce),
            (ALO_CH, Guarantee::AtLeastOnce),
        ] {
            let out = a
                .sender::<u64>(NodeId(base), ChannelOptions::new(ChannelId(ch), g))
                .unwrap();
            tasks.push(spawn_sends(out, ch, idx as u64, N, results.clone()));
        }
        nodes.push(a);
    }
    for t in tasks {
        within(30.0, "sends", t).await.unwrap();
    }
    let held_n = SENDERS * 2 * N / 10;
    wait_until(20.0, "the first run holds every tenth message", || {
        held.lock().unwrap().len() as u64 == held_n
    })
    .await;
    wait_until(20.0, "the other receipts resolve", || {
        results.lock().unwrap().len() as u64 == SENDERS * 2 * N - held_n
    })
    .await;
    let retx_before = retransmitted(&nodes).await;
    // Crash: the node is dropped with the deliveries still held (they stay alive here,
    // never acked).
    drop(b);
    let orphans: Vec<Delivery<u64>> = std::mem::take(&mut *held.lock().unwrap());
    let seen_first: HashSet<(u32, u64)> = seen1.lock().unwrap().clone();
    let held_ids: Vec<(u32, u64)> = orphans
        .iter()
        .map(|d| (d.channel().0, *d.message()))
        .collect();
    let mut b2 = None;
    let end = Instant::now() + Duration::from_secs(15);
    while b2.is_none() {
        let mut bld = Node::builder(NodeId(base)).bind(addr);
        for p in &allow {
            bld = bld.allow_peer(NodeId(*p));
        }
        match bld.build().await {
            Ok(n) => b2 = Some(n),
            Err(e) if Instant::now() < end => {
                eprintln!("restart: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the receiver could not restart on its address: {e}"),
        }
    }
    let b2 = b2.unwrap();
    let delivered2: Tally = Arc::default();
    for ch in [EO_CH, ALO_CH] {
        let mut rx = b2.receiver::<u64>(ChannelId(ch), ordered).unwrap();
        let (dl, cp, seen) = (delivered2.clone(), completed.clone(), seen_first.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                bump(&dl, ch, v);
                let cp = cp.clone();
                let slow = seen.contains(&(ch, v));
                tokio::spawn(async move {
                    if slow {
                        tokio::time::sleep(slow_for).await;
                    }
                    bump(&cp, ch, v);
                    d.ack();
                });
            }
        });
    }
    wait_until(45.0, "every receipt resolves after the restart", || {
        results.lock().unwrap().len() as u64 == SENDERS * 2 * N
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(orphans);
    let mut problems = Vec::new();
    for ((ch, v), r) in results.lock().unwrap().iter() {
        if r != &Ok(Outcome::Acked) {
            problems.push(format!("ch{ch} value {v}: {r:?}"));
        }
        let cp = count(&completed, *ch, *v);
        let d2 = count(&delivered2, *ch, *v);
        if cp == 0 {
            problems.push(format!("ch{ch} value {v} acked, never processed"));
        }
        if *ch == EO_CH && d2 > 1 {
            problems.push(format!(
                "effectively-once value {v} handed to the second run's handler {d2} times"
            ));
        }
    }
    for (ch, v) in &held_ids {
        let cp = count(&completed, *ch, *v);
        if *ch == EO_CH && cp != 1 {
            problems.push(format!(
                "effectively-once value {v}, held by the crashed run, processed {cp} times"
            ));
        }
    }
    let retx = retransmitted(&nodes).await;
    let s2 = stats(&b2).await;
    let redelivered = held_ids.len();
    eprintln!(
        "redelivery after crash: {redelivered} held, retransmitted {retx_before} before the \
         crash and {retx} in all; second run delivered {} in-progress dropped {} \
         duplicates dropped {}",
        s2.proto.delivered, s2.proto.in_progress_dropped, s2.proto.duplicates_dropped
    );
    let total = SENDERS * 2 * N;
    if retx > 4 * total {
        problems.push(format!("retransmitted {retx} for {total} messages"));
    }
    let after = retx - retx_before;
    if copies.is_some_and(|c| after > c * redelivered as u64) {
        problems.push(format!(
            "{after} retransmissions after the crash for {redelivered} messages the crashed \
             run held (in-progress copies dropped by the new run: {})",
            s2.proto.in_progress_dropped
        ));
    }
    if s2.proto.dead_lettered != 0 || s2.proto.rejected != 0 {
        problems.push(format!(
            "second run refused messages: dead-lettered {} rejected {}",
            s2.proto.dead_lettered, s2.proto.rejected
        ));
    }
    for a in &nodes {
        within(30.0, "sender shutdown", a.shutdown()).await;
    }
    within(30.0, "receiver shutdown", b2.shutdown()).await;
    problems.truncate(40);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 4. One key from ten nodes, a handler slower than the key horizon.

/// Effectively-once, key horizon 10 s (the setting under test; everything else
/// default). Ten sender nodes send the same `IdKey` at once; the handler takes 20 s
/// (twice the horizon, inside the 30 s deadline). The docs: "a duplicate arriving while
/// the original is still processing is not delivered", in-progress keys do not expire,
/// and a completed key is remembered for the horizon. Expected: the handler runs once;
/// all ten receipts `Acked`; a resend right after completion is acked unprocessed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_one_key_from_ten_senders_to_a_handler_slower_than_the_horizon() {
    const BASE: u64 = 14_000;
    const SENDERS: u64 = 10;
    const CH: u32 = 30;
    let allow: Vec<u64> = (1..=SENDERS).map(|i| BASE + i).collect();
    let mut cfg = NodeConfig::default();
    cfg.dedup.horizon = Duration::from_secs(10);
    let b = receiver_node(BASE, any_addr(), &allow, cfg).await;
    let addr = b.local_addr().unwrap();
    let delivered: Tally = Arc::default();
    let completed: Tally = Arc::default();
    {
        let mut rx = b.receiver::<u64>(ChannelId(CH), false).unwrap();
        let (dl, cp) = (delivered.clone(), completed.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                bump(&dl, CH, 0);
                let cp = cp.clone();
                tokio::spawn(async move {
                    if v != u64::MAX {
                        tokio::time::sleep(Duration::from_secs(20)).await;
                    }
                    bump(&cp, CH, 0);
                    d.ack();
                });
            }
        });
    }
    let mut nodes = Vec::new();
    let mut outs = Vec::new();
    for id in &allow {
        let a = sender_node(*id, BASE, addr).await;
        // Connected before the burst, so the ten copies arrive together.
        let warm = a
            .sender::<u64>(
                NodeId(BASE),
                ChannelOptions::new(ChannelId(CH), Guarantee::EffectivelyOnce),
            )
            .unwrap();
        let r = within(
            15.0,
            "warm-up",
            warm.send_with_key(&u64::MAX, IdKey(u128::from(*id))),
        )
        .await
        .unwrap();
        assert_eq!(within(15.0, "warm-up receipt", r).await, Ok(Outcome::Acked));
        outs.push(warm);
        nodes.push(a);
    }
    let warm_deliveries = count(&delivered, CH, 0);
    let key = IdKey(0xdead_beef_0000_7777);
    let t0 = Instant::now();
    let mut receipts = Vec::new();
    for (i, out) in outs.iter().enumerate() {
        let r = out.send_with_key(&(i as u64), key).await.unwrap();
        receipts.push(tokio::spawn(async move { (i, r.await, t0.elapsed()) }));
    }
    let mut problems = Vec::new();
    for h in receipts {
        let (i, r, at) = within(45.0, "a keyed receipt", h).await.unwrap();
        eprintln!("sender {i}: {r:?} after {at:?}");
        if r != Ok(Outcome::Acked) {
            problems.push(format!("sender {i}: {r:?} after {at:?}"));
        }
    }
    let runs = count(&delivered, CH, 0) - warm_deliveries;
    if runs != 1 {
        problems.push(format!("the key was handed to the handler {runs} times"));
    }
    // Right after completion, well inside the horizon: acked, not processed.
    let r = within(15.0, "resend", outs[0].send_with_key(&0, key))
        .await
        .unwrap();
    let again = within(15.0, "resend receipt", r).await;
    if again != Ok(Outcome::Acked) {
        problems.push(format!("resend inside the horizon: {again:?}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = count(&delivered, CH, 0) - warm_deliveries;
    if runs != 1 {
        problems.push(format!(
            "after a resend inside the horizon the key ran {runs} times"
        ));
    }
    let s = stats(&b).await;
    eprintln!(
        "one key, ten senders: in-progress dropped {} duplicates dropped {}; \
         retransmitted {}",
        s.proto.in_progress_dropped,
        s.proto.duplicates_dropped,
        retransmitted(&nodes).await
    );
    for a in &nodes {
        within(30.0, "sender shutdown", a.shutdown()).await;
    }
    within(30.0, "receiver shutdown", b.shutdown()).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 5. One sender past its stream credit in a stuck handler, ten others on the channel.

/// Effectively-once, defaults. The handler holds every delivery from sender 0 and acks
/// the others at once. Sender 0 sends 5 000 messages, more than its stream credit
/// (4 096): its stream stops at the credit (plus slack) while ten other senders send
/// 500 each on the same channel. Every other sender's receipts are `Acked` while sender
/// 0's are held, the receiver never holds more of sender 0's stream than its credit plus
/// 256, and once released, all of sender 0's 5 000 are `Acked`, each processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8_one_sender_stuck_past_its_credit_does_not_starve_ten_others() {
    const BASE: u64 = 17_000;
    const OTHERS: u64 = 10;
    const STUCK_N: u64 = 5_000;
    const OTHER_N: u64 = 500;
    const CH: u32 = 40;
    let allow: Vec<u64> = (1..=OTHERS + 1).map(|i| BASE + i).collect();
    let b = receiver_node(BASE, any_addr(), &allow, NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    let max_held = Arc::new(AtomicU64::new(0));
    let delivered: Tally = Arc::default();
    {
        let mut rx = b.receiver::<u64>(ChannelId(CH), false).unwrap();
        let (held, max_held, dl) = (held.clone(), max_held.clone(), delivered.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                bump(&dl, CH, *d.message());
                if d.from().node == NodeId(BASE + 1) {
                    let mut h = held.lock().unwrap();
                    h.push(d);
                    max_held.fetch_max(h.len() as u64, Ordering::SeqCst);
                } else {
                    d.ack();
                }
            }
        });
    }
    let mut nodes = Vec::new();
    for id in &allow {
        nodes.push(sender_node(*id, BASE, addr).await);
    }
    let opts = || ChannelOptions::new(ChannelId(CH), Guarantee::EffectivelyOnce);
    let stuck_results: Results = Arc::default();
    let stuck_out = nodes[0].sender::<u64>(NodeId(BASE), opts()).unwrap();
    let stuck_task = spawn_sends(stuck_out, CH, 0, STUCK_N, stuck_results.clone());
    wait_until(20.0, "sender 0 fills its stream credit", || {
        held.lock().unwrap().len() >= 4_000
    })
    .await;
    let others: Results = Arc::default();
    let mut tasks = Vec::new();
    for (i, a) in nodes.iter().enumerate().skip(1) {
        let out = a.sender::<u64>(NodeId(BASE), opts()).unwrap();
        tasks.push(spawn_sends(out, CH, i as u64, OTHER_N, others.clone()));
    }
    for t in tasks {
        within(20.0, "the other senders' sends", t).await.unwrap();
    }
    wait_until(20.0, "every other sender's receipts resolve", || {
        others.lock().unwrap().len() as u64 == OTHERS * OTHER_N
    })
    .await;
    let mut problems = Vec::new();
    if !stuck_results.lock().unwrap().is_empty() {
        problems.push(format!(
            "{} of sender 0's receipts resolved while its messages were held",
            stuck_results.lock().unwrap().len()
        ));
    }
    for ((ch, v), r) in others.lock().unwrap().iter() {
        if r != &Ok(Outcome::Acked) {
            problems.push(format!("other sender value {v}: {r:?}"));
        }
        let dl = count(&delivered, *ch, *v);
        if dl != 1 {
            problems.push(format!("other sender value {v} delivered {dl} times"));
        }
    }
    let most = max_held.load(Ordering::SeqCst);
    if most > 4_096 + 256 {
        problems.push(format!(
            "the receiver held {most} of sender 0's messages, past its credit"
        ));
    }
    // Release sender 0 (its first messages are well inside their 30 s deadline).
    let release = {
        let held = held.clone();
        tokio::spawn(async move {
            loop {
                let batch: Vec<Delivery<u64>> = std::mem::take(&mut *held.lock().unwrap());
                for d in batch {
                    d.ack();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // From now on the handler still parks sender 0's deliveries; the task acks them.
    within(30.0, "sender 0's sends", stuck_task).await.unwrap();
    wait_until(30.0, "sender 0's receipts resolve once released", || {
        stuck_results.lock().unwrap().len() as u64 == STUCK_N
    })
    .await;
    release.abort();
    for ((ch, v), r) in stuck_results.lock().unwrap().iter() {
        if r != &Ok(Outcome::Acked) {
            problems.push(format!("sender 0 value {v}: {r:?}"));
        }
        let dl = count(&delivered, *ch, *v);
        if dl != 1 {
            problems.push(format!("sender 0 value {v} delivered {dl} times"));
        }
    }
    let retx = retransmitted(&nodes).await;
    eprintln!("stuck sender: held at most {most}; retransmitted {retx}");
    let total = STUCK_N + OTHERS * OTHER_N;
    if retx > total * NO_STORM_PCT / 100 {
        problems.push(format!("retransmitted {retx} of {total}"));
    }
    for a in &nodes {
        within(30.0, "sender shutdown", a.shutdown()).await;
    }
    within(30.0, "receiver shutdown", b.shutdown()).await;
    problems.truncate(40);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
