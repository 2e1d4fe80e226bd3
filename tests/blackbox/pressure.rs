//! Black-box tests under pressure: slow and misbehaving handlers, a receiver that stops
//! reading while senders keep sending, many senders to one slow receiver, misuse of the
//! API, and connections killed, delayed or stalled by a proxy. Public API only
//! (README.md, docs/SECURITY.md, the crate and item docs), real TCP on loopback, default
//! settings unless a test is about one.
//!
//! Every wait is bounded (`within`, `poll_until`): a hang fails the test instead of
//! stalling the run.
//!
//! Found when written (fixed since: a first-transmission timeout backs off new
//! messages' first RTO until a valid sample or a new connection,
//! `RttEstimator::on_timeout`, capped at half a message's time to its deadline):
//!
//! - `k_delayed_link_150ms_second_burst_not_retransmitted` (fails every run): over a
//!   lossless link with a round trip above the 200 ms initial / minimum RTO (150 ms
//!   each way), a burst of messages sent before the first ack is retransmitted in full
//!   (expected), and so is every later burst (500 of 500): Karn's rule takes RTT samples
//!   only from messages transmitted once, every message of a burst times out once before
//!   its ack, so the estimator never gets a sample and stays at 200 ms; the RTO is not
//!   backed off between messages either (RFC 6298 5.5, 5.7 keep the backed-off RTO until
//!   a valid sample). A steadily paced sender does learn the RTT
//!   (`k_delayed_link_150ms_paced_effectively_once` passes). Guarantees hold; the cost
//!   is twice the traffic for as long as the traffic stays bursty.

use crate::support;

use ackwire::{
    ChannelId, ChannelOptions, Delivery, Guarantee, Node, NodeError, NodeId, Outcome, Receipt,
    SendError,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::pair::tcp_pair;
use support::proxy::{Chaos, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// helpers

fn any_addr() -> SocketAddr {
    support::ports::restartable_addr()
}

async fn within<F: std::future::Future>(secs: f64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs_f64(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

/// Poll `cond` every 20 ms until it holds; panic with `what` after `secs`.
async fn poll_until<F, Fut>(secs: f64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what}: not reached within {secs} s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Await every receipt (bounded), returning the outcomes in order.
async fn settle_all(
    receipts: Vec<Receipt>,
    secs: f64,
    what: &str,
) -> Vec<Result<Outcome, SendError>> {
    within(secs, what, futures::future::join_all(receipts)).await
}

fn count_errors(outcomes: &[Result<Outcome, SendError>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for o in outcomes {
        *m.entry(format!("{o:?}")).or_insert(0) += 1;
    }
    m
}

fn assert_all_acked(outcomes: &[Result<Outcome, SendError>], what: &str) {
    let bad = outcomes
        .iter()
        .filter(|o| !matches!(o, Ok(Outcome::Acked)))
        .count();
    assert_eq!(
        bad,
        0,
        "{what}: expected every receipt Ok(Acked), saw {:?}",
        count_errors(outcomes)
    );
}

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

/// A receiver loop that acks at once and counts each value.
fn spawn_counting(mut rx: ackwire::Receiver<u64>, seen: Seen) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            *seen.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            d.ack();
        }
    })
}

fn check_exactly_once(seen: &Seen, n: u64, what: &str) {
    let seen = seen.lock().unwrap();
    let missing: Vec<u64> = (0..n).filter(|i| !seen.contains_key(i)).take(10).collect();
    let dup: Vec<(u64, u32)> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(k, c)| (*k, *c))
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && dup.is_empty(),
        "{what}: expected each of {n} values exactly once; missing (first 10) {missing:?}, \
         repeated (first 10) {dup:?}, distinct seen {}",
        seen.len()
    );
}

fn check_at_least_once(seen: &Seen, n: u64, what: &str) {
    let seen = seen.lock().unwrap();
    let missing: Vec<u64> = (0..n).filter(|i| !seen.contains_key(i)).take(10).collect();
    assert!(
        missing.is_empty(),
        "{what}: expected each of {n} values at least once; missing (first 10) {missing:?}"
    );
}

fn opts(ch: u32, g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(ChannelId(ch), g)
}

/// A proxy that can stop forwarding without closing (both directions stop reading and
/// writing), and resume. Connections are never closed by it.
struct StallProxy {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
    /// Stops only the direction from the target back to the connecting node.
    paused_back: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    async fn start(target: SocketAddr, delay: Duration) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let paused_back = Arc::new(AtomicBool::new(false));
        let p = paused.clone();
        let pb = paused_back.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(stall_pump(ri, wo, p.clone(), delay));
                tokio::spawn(stall_pump(ro, wi, pb.clone(), delay));
            }
        });
        StallProxy {
            addr,
            paused,
            paused_back,
            task,
        }
    }

    fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::SeqCst);
        self.paused_back.store(on, Ordering::SeqCst);
    }

    fn pause_back(&self, on: bool) {
        self.paused_back.store(on, Ordering::SeqCst);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn stall_pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    paused: Arc<AtomicBool>,
    delay: Duration,
) {
    // A delay line: each chunk is written `delay` after it was read (a constant
    // one-way latency, not one that adds up over chunks).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let p = paused.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until((at + delay).into()).await;
            while p.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn receiver_node(id: NodeId, allow: &[NodeId]) -> Node {
    let mut b = Node::builder(id).bind(any_addr());
    for p in allow {
        b = b.allow_peer(*p);
    }
    b.build().await.unwrap()
}

async fn sender_node(id: NodeId, peer: NodeId, addr: SocketAddr) -> Node {
    Node::builder(id)
        .bind(any_addr())
        .peer(peer, addr)
        .build()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. slow and misbehaving handlers

/// A receiver that stops calling `recv` for 5–10 s while its sender keeps sending: the
/// receiver holds at most its stream credit (4 096 + 256 slack), `send` waits (no
/// error), and once the receiver resumes every message is delivered per the guarantee.
async fn paused_receiver(g: Guarantee, ch: u32, pause_for: Duration) {
    const N: u64 = 12_000;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
    let tx = a.sender::<u64>(NodeId(2), opts(ch, g)).unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..N {
            receipts.push(tx.send(&i).await.map_err(|e| (i, e))?);
            acc.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<_, (u64, SendError)>(receipts)
    });
    // Let the sender run into the credit / window while nobody reads.
    let pause = Instant::now();
    poll_until(10.0, "sender made progress", || async {
        accepted.load(Ordering::Relaxed) >= 4096
    })
    .await;
    while pause.elapsed() < pause_for {
        let s = within(5.0, "stats", b.stats()).await.unwrap();
        assert!(
            s.proto.delivered <= 4096 + 256,
            "{g:?}: expected the paused receiver to hold at most its stream credit \
             (4096 + 256), saw {} delivered to its queue",
            s.proto.delivered
        );
        assert!(
            !sending.is_finished(),
            "{g:?}: expected send to wait while the receiver is paused, but the sending task \
             finished ({} accepted)",
            accepted.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let held = accepted.load(Ordering::Relaxed);
    assert!(
        held < N,
        "{g:?}: expected backpressure (send waits), but all {N} sends returned during a \
         {pause_for:?} pause"
    );
    let seen: Seen = Arc::default();
    let recv_task = spawn_counting(rx, seen.clone());
    let receipts = within(20.0, "sending after the pause", sending)
        .await
        .unwrap()
        .unwrap_or_else(|(i, e)| {
            panic!("{g:?}: expected send to wait, never fail; send #{i} failed with {e:?}")
        });
    let outcomes = settle_all(receipts, 20.0, "receipts after the pause").await;
    match g {
        Guarantee::AtMostOnce => {
            // Healthy link: the sender never overruns the receiver, so nothing is lost.
            let sent = outcomes
                .iter()
                .filter(|o| matches!(o, Ok(Outcome::Sent)))
                .count() as u64;
            assert_eq!(sent, N, "{g:?}: receipts {:?}", count_errors(&outcomes));
            poll_until(10.0, "every sent AMO message arrives", || async {
                seen.lock().unwrap().len() as u64 >= sent
            })
            .await;
            check_exactly_once(&seen, N, "at-most-once after a paused receiver");
        }
        Guarantee::AtLeastOnce => {
            assert_all_acked(&outcomes, "at-least-once after a paused receiver");
            check_at_least_once(&seen, N, "at-least-once after a paused receiver");
        }
        _ => {
            assert_all_acked(&outcomes, "effectively-once after a paused receiver");
            check_exactly_once(&seen, N, "effectively-once after a paused receiver");
        }
    }
    let _ = held;
    if g != Guarantee::AtMostOnce {
        // No storm: a held message retransmitted on every backoff would be several
        // copies each. Not "none": holding needs the receiving process to answer
        // within the RTO (README, "Acks also say which messages the receiver already
        // holds"), and on a loaded CI machine a burst went out twice in part (1 664 of
        // 12 000 = 14 %, over the 5 % this bound was).
        let s = a.stats().await.unwrap();
        assert!(
            s.proto.retransmitted <= N / 4,
            "{g:?}: a receiver that stopped reading for {pause_for:?} (its messages held, reported \
             as held): expected few retransmissions, saw {} for {N} messages",
            s.proto.retransmitted
        );
    }
    recv_task.abort();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_paused_receiver_bounded_and_backpressured_effectively_once() {
    paused_receiver(Guarantee::EffectivelyOnce, 11, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_paused_receiver_bounded_and_backpressured_at_least_once() {
    paused_receiver(Guarantee::AtLeastOnce, 12, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_paused_receiver_bounded_and_backpressured_at_most_once() {
    paused_receiver(Guarantee::AtMostOnce, 13, Duration::from_secs(5)).await;
}

/// A handler that drops the first delivery of every message (documented: a nack) and
/// nacks the second: each message comes a third time and is then acked; on an
/// effectively-once channel the handler sees it exactly three times and the receipt
/// is `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_dropped_and_nacked_deliveries_are_redelivered() {
    const N: u64 = 300;
    for (g, ch) in [
        (Guarantee::EffectivelyOnce, 21),
        (Guarantee::AtLeastOnce, 22),
    ] {
        let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let tx = a.sender::<u64>(NodeId(2), opts(ch, g)).unwrap();
        let seen: Seen = Arc::default();
        let s2 = seen.clone();
        let handler = tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let c = {
                    let mut m = s2.lock().unwrap();
                    let c = m.entry(*d.message()).or_insert(0);
                    *c += 1;
                    *c
                };
                match c {
                    1 => drop(d),
                    2 => d.nack(),
                    _ => d.ack(),
                }
            }
        });
        let mut receipts = Vec::new();
        for i in 0..N {
            receipts.push(within(10.0, "send", tx.send(&i)).await.unwrap());
        }
        let outcomes = settle_all(receipts, 15.0, "receipts of dropped/nacked").await;
        assert_all_acked(&outcomes, &format!("{g:?} dropped then nacked"));
        let m = seen.lock().unwrap().clone();
        for i in 0..N {
            let c = m.get(&i).copied().unwrap_or(0);
            if g == Guarantee::EffectivelyOnce {
                assert_eq!(
                    c, 3,
                    "{g:?}: expected value {i} delivered exactly 3 times (drop, nack, ack), saw {c}"
                );
            } else {
                assert!(
                    c >= 3,
                    "{g:?}: expected value {i} delivered >= 3 times, saw {c}"
                );
            }
        }
        handler.abort();
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// Acks from plain OS threads 1.5–2.5 s after delivery (the handler hands the delivery
/// away): every receipt `Acked`, effectively-once processes each once, and the slow
/// handler does not cause a storm of retransmissions (the receiver reports held
/// messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_late_acks_from_other_threads() {
    const N: u64 = 200;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(31), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(31, Guarantee::EffectivelyOnce))
        .unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let handler = tokio::spawn(async move {
        let mut rng = 7u64;
        while let Some(d) = rx.recv().await {
            *s2.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            let wait = 1500 + xorshift(&mut rng) % 1000;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(wait));
                d.ack();
            });
        }
    });
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(within(10.0, "send", tx.send(&i)).await.unwrap());
    }
    let outcomes = settle_all(receipts, 15.0, "receipts of late acks").await;
    assert_all_acked(&outcomes, "late acks from threads");
    check_exactly_once(&seen, N, "late acks from threads");
    let s = a.stats().await.unwrap();
    assert!(
        s.proto.retransmitted <= N / 4,
        "expected few retransmissions for held messages (receiver reports what it holds), \
         saw {} retransmissions for {N} messages",
        s.proto.retransmitted
    );
    handler.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A concurrent handler that sleeps 50 ms – 2 s on one message in 20: effectively-once
/// processes every message once, every receipt is `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_sometimes_slow_concurrent_handler_effectively_once() {
    const N: u64 = 1000;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(41), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(41, Guarantee::EffectivelyOnce))
        .unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let handler = tokio::spawn(async move {
        let mut rng = 99u64;
        while let Some(d) = rx.recv().await {
            *s2.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            let r = xorshift(&mut rng);
            if r.is_multiple_of(20) {
                let ms = 50 + (r >> 8) % 1950;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    d.ack();
                });
            } else {
                d.ack();
            }
        }
    });
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(within(10.0, "send", tx.send(&i)).await.unwrap());
    }
    let outcomes = settle_all(receipts, 15.0, "receipts, slow handler").await;
    assert_all_acked(&outcomes, "sometimes-slow handler");
    check_exactly_once(&seen, N, "sometimes-slow handler");
    handler.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// Eight sender nodes, each sending more than one stream credit, to one receiver that
/// works slowly: no sender is starved (the docs say fairness between peers is not
/// enforced, so this checks only that no sender's messages stop flowing for long while
/// the receiver processes the others), every receipt is `Acked`, each message
/// processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_eight_senders_one_slow_receiver_none_starved() {
    const SENDERS: u32 = 8;
    const PER: u64 = 5000;
    let ids: Vec<NodeId> = (0..SENDERS).map(|i| NodeId(100 + i as u64)).collect();
    let b = receiver_node(NodeId(2), &ids).await;
    let mut rx = b.receiver::<u64>(ChannelId(51), false).unwrap();
    let mut senders = Vec::new();
    for id in &ids {
        senders.push(sender_node(*id, NodeId(2), b.local_addr().unwrap()).await);
    }
    let total = SENDERS as u64 * PER;
    let times: Arc<Mutex<HashMap<NodeId, Vec<Instant>>>> = Arc::default();
    let t2 = times.clone();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let handler = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(d) = rx.recv().await {
            let from = d.from().node;
            *s2.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            t2.lock()
                .unwrap()
                .entry(from)
                .or_default()
                .push(Instant::now());
            d.ack();
            n += 1;
            if n.is_multiple_of(500) {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, node) in senders.iter().enumerate() {
        let tx = node
            .sender::<u64>(NodeId(2), opts(51, Guarantee::EffectivelyOnce))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let base = k as u64 * PER;
            let mut receipts = Vec::new();
            for i in 0..PER {
                receipts.push(tx.send(&(base + i)).await?);
            }
            Ok::<_, SendError>(futures::future::join_all(receipts).await)
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        let r = within(60.0, "a sender's messages", t).await.unwrap();
        outcomes.extend(r.expect("send failed (expected send to wait, never fail)"));
    }
    let took = start.elapsed();
    assert_all_acked(&outcomes, "eight senders");
    check_exactly_once(&seen, total, "eight senders");
    // Longest pause in each sender's flow (from the start, between its deliveries).
    let times = times.lock().unwrap().clone();
    let mut gaps = Vec::new();
    for id in &ids {
        let ts = &times[id];
        let mut prev = start;
        let mut gap = Duration::ZERO;
        for t in ts {
            gap = gap.max(t.saturating_duration_since(prev));
            prev = *t;
        }
        gaps.push((*id, gap));
    }
    eprintln!("eight senders: {took:?} in all; longest pause per sender {gaps:?}");
    for (id, gap) in &gaps {
        assert!(
            *gap < Duration::from_secs(2),
            "starvation: sender {id}'s messages stopped flowing for {gap:?} while the \
             receiver processed the others (whole run {took:?}; pauses {gaps:?})"
        );
    }
    handler.abort();
    for s in &senders {
        s.shutdown().await;
    }
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 2. misuse of the API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_second_receiver_on_a_channel_is_refused_until_the_first_is_dropped() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let first = b.receiver::<u64>(ChannelId(61), false).unwrap();
    match b.receiver::<u64>(ChannelId(61), false) {
        Err(NodeError::ChannelTaken(ChannelId(61))) => {}
        other => panic!("expected ChannelTaken(61) for a second receiver, got {other:?}"),
    }
    match b.raw_receiver(ChannelId(61), true) {
        Err(NodeError::ChannelTaken(ChannelId(61))) => {}
        other => panic!("expected ChannelTaken(61) for a second raw receiver, got {other:?}"),
    }
    drop(first);
    let rx = b
        .receiver::<u64>(ChannelId(61), false)
        .expect("a new receiver after the first was dropped");
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let tx = a
        .sender::<u64>(NodeId(2), opts(61, Guarantee::AtLeastOnce))
        .unwrap();
    let r = within(10.0, "send", tx.send(&5)).await.unwrap();
    assert_eq!(within(10.0, "receipt", r).await, Ok(Outcome::Acked));
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A receiver dropped with deliveries queued and in its hands, then registered again
/// while messages are in flight: effectively-once still processes each message exactly
/// once and every receipt is `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_receiver_dropped_and_reregistered_mid_stream() {
    const N: u64 = 3000;
    for (g, ch) in [
        (Guarantee::EffectivelyOnce, 71),
        (Guarantee::AtLeastOnce, 72),
    ] {
        let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let tx = a.sender::<u64>(NodeId(2), opts(ch, g)).unwrap();
        let sending = tokio::spawn(async move {
            let mut receipts = Vec::new();
            for i in 0..N {
                receipts.push(tx.send(&i).await.unwrap());
            }
            receipts
        });
        let seen: Seen = Arc::default();
        // First receiver: process 500, hold 5 unfinished, then drop everything.
        let mut held: Vec<Delivery<u64>> = Vec::new();
        let mut processed = 0;
        while processed < 500 {
            let d = within(10.0, "first receiver", rx.recv()).await.unwrap();
            *seen.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            if held.len() < 5 && processed % 100 == 50 {
                // These were seen but not finished: their count is undone below.
                held.push(d);
            } else {
                d.ack();
            }
            processed += 1;
        }
        for d in &held {
            *seen.lock().unwrap().get_mut(d.message()).unwrap() -= 1;
        }
        drop(rx);
        drop(held);
        let rx2 = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let t = spawn_counting(rx2, seen.clone());
        let receipts = within(20.0, "sending", sending).await.unwrap();
        let outcomes = settle_all(receipts, 20.0, "receipts across re-registration").await;
        assert_all_acked(&outcomes, &format!("{g:?} across re-registration"));
        seen.lock().unwrap().retain(|_, c| *c > 0);
        if g == Guarantee::EffectivelyOnce {
            check_exactly_once(&seen, N, "effectively-once across re-registration");
        } else {
            check_at_least_once(&seen, N, "at-least-once across re-registration");
        }
        t.abort();
        a.shutdown().await;
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_self_and_unknown_peers_are_typed_errors() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    match a.sender::<u64>(NodeId(1), opts(1, Guarantee::AtLeastOnce)) {
        Err(NodeError::SelfPeer(NodeId(1))) => {}
        other => panic!("expected SelfPeer(1), got {other:?}"),
    }
    match a.raw_sender(NodeId(77), opts(1, Guarantee::EffectivelyOnce)) {
        Err(NodeError::UnknownPeer(NodeId(77))) => {}
        other => panic!("expected UnknownPeer(77), got {other:?}"),
    }
    // The receiver side only allowed node 1; it was never told node 77 either.
    match b.sender::<u64>(NodeId(77), opts(1, Guarantee::AtMostOnce)) {
        Err(NodeError::UnknownPeer(NodeId(77))) => {}
        other => panic!("expected UnknownPeer(77) at the receiver, got {other:?}"),
    }
    // add_peer with the node's own id is ignored: still SelfPeer, no connection to self.
    a.add_peer(NodeId(1), a.local_addr().unwrap());
    match a.sender::<u64>(NodeId(1), opts(1, Guarantee::AtLeastOnce)) {
        Err(NodeError::SelfPeer(NodeId(1))) => {}
        other => panic!("expected SelfPeer(1) after add_peer(self), got {other:?}"),
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// After `shutdown`: a sender made before fails `send`/`try_send` with
/// `SendError::Shutdown`, new senders/receivers fail with `NodeError::Shutdown`, stats
/// fail, a receiver's `recv` ends; nothing hangs. Two concurrent shutdowns and a third
/// later one all return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_use_after_shutdown_and_repeated_shutdown() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(81), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(81, Guarantee::AtLeastOnce))
        .unwrap();
    let r = tx.send(&1).await.unwrap();
    within(10.0, "recv", rx.recv()).await.unwrap().ack();
    assert_eq!(within(10.0, "receipt", r).await, Ok(Outcome::Acked));
    let a = Arc::new(a);
    let (x, y) = (a.clone(), a.clone());
    within(
        15.0,
        "two concurrent shutdowns",
        futures::future::join(async move { x.shutdown().await }, async move {
            y.shutdown().await
        }),
    )
    .await;
    within(5.0, "a third shutdown", a.shutdown()).await;
    match within(5.0, "send after shutdown", tx.send(&2)).await {
        Err(SendError::Shutdown) => {}
        other => panic!("expected Err(Shutdown) from send after shutdown, got {other:?}"),
    }
    match tx.try_send(&3) {
        Err(SendError::Shutdown) => {}
        other => panic!("expected Err(Shutdown) from try_send after shutdown, got {other:?}"),
    }
    match a.sender::<u64>(NodeId(2), opts(81, Guarantee::AtLeastOnce)) {
        Err(NodeError::Shutdown) => {}
        other => panic!("expected NodeError::Shutdown from sender(), got {other:?}"),
    }
    match a.receiver::<u64>(ChannelId(82), false) {
        Err(NodeError::Shutdown) => {}
        other => panic!("expected NodeError::Shutdown from receiver(), got {other:?}"),
    }
    assert!(within(5.0, "stats after shutdown", a.stats())
        .await
        .is_err());
    assert!(within(5.0, "closed after shutdown", a.closed())
        .await
        .is_ok());
    b.shutdown().await;
    assert!(
        within(5.0, "recv after shutdown", rx.recv())
            .await
            .is_none(),
        "expected recv to end (None) after the receiver's node shut down"
    );
}

/// A delivery held across the receiver node's shutdown: acking it afterwards does not
/// panic, `ack_durable` fails with `NodeStopped` (or is `Ok`) promptly instead of
/// hanging; a node dropped from inside its own handler ends the receiver's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_ack_after_shutdown_and_node_dropped_in_handler() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(91), false).unwrap();
    let mut o = opts(91, Guarantee::EffectivelyOnce);
    o.deadline = Some(Duration::from_secs(3));
    let tx = a.sender::<u64>(NodeId(2), o).unwrap();
    let r1 = tx.send(&1).await.unwrap();
    let r2 = tx.send(&2).await.unwrap();
    let d1 = within(10.0, "recv 1", rx.recv()).await.unwrap();
    let d2 = within(10.0, "recv 2", rx.recv()).await.unwrap();
    within(15.0, "receiver shutdown with held deliveries", b.shutdown()).await;
    d1.ack();
    let r = within(5.0, "ack_durable after shutdown", d2.ack_durable()).await;
    assert!(
        matches!(r, Err(ackwire::AckError::NodeStopped) | Ok(())),
        "expected NodeStopped (or Ok) from ack_durable after shutdown, got {r:?}"
    );
    // Neither was finished while the receiver ran: the receipts resolve by their 3 s
    // deadline, and not as Acked.
    for (k, r) in [(1, r1), (2, r2)] {
        let o = within(10.0, "receipt of a delivery finished after shutdown", r).await;
        assert!(
            !matches!(o, Ok(Outcome::Acked)),
            "expected receipt {k} not Acked (its delivery was finished only after the \
             receiver node stopped), got {o:?}"
        );
    }
    drop(b);

    // A node dropped from inside its handler.
    let (b, a2) = tcp_pair(NodeId(4), NodeId(3)).await;
    let mut rx = b.receiver::<u64>(ChannelId(92), false).unwrap();
    let tx = a2
        .sender::<u64>(NodeId(4), opts(92, Guarantee::AtLeastOnce))
        .unwrap();
    let _r = tx.send(&7).await.unwrap();
    let handler = tokio::spawn(async move {
        let d = rx.recv().await.unwrap();
        drop(b);
        d.ack();
        rx.recv().await
    });
    let end = within(
        10.0,
        "recv after the node was dropped in its handler",
        handler,
    )
    .await
    .expect("handler task panicked");
    assert!(
        end.is_none(),
        "expected recv to end after the node was dropped"
    );
    a.shutdown().await;
    a2.shutdown().await;
}

/// Payload sizes: one byte over `max_payload` is `TooLarge` (send and try_send), exactly
/// `max_payload` (4 MiB, fits the default 8 MiB frame) is delivered intact and acked,
/// and an empty payload is delivered as empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_payload_sizes_at_the_limits() {
    let max = ackwire::NodeConfig::default().max_payload;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.raw_receiver(ChannelId(101), false).unwrap();
    let tx = a
        .raw_sender(NodeId(2), opts(101, Guarantee::AtLeastOnce))
        .unwrap();
    match within(5.0, "too large", tx.send(Bytes::from(vec![1u8; max + 1]))).await {
        Err(SendError::TooLarge { len, max: m }) => {
            assert_eq!((len, m), (max + 1, max));
        }
        other => panic!("expected TooLarge for max_payload + 1 bytes, got {other:?}"),
    }
    match tx.try_send(Bytes::from(vec![1u8; 3 * max])) {
        Err(SendError::TooLarge { .. }) => {}
        other => panic!("expected TooLarge from try_send, got {other:?}"),
    }
    let big: Vec<u8> = (0..max).map(|i| (i * 31 % 251) as u8).collect();
    let r_big = within(10.0, "send max", tx.send(Bytes::from(big.clone())))
        .await
        .unwrap();
    let r_empty = within(10.0, "send empty", tx.send(Bytes::new()))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = within(15.0, "recv limit payloads", rx.recv())
            .await
            .expect("receiver ended");
        got.push(d.message().len());
        if d.message().len() == max {
            assert!(d.message()[..] == big[..], "max-size payload corrupted");
        }
        d.ack();
    }
    got.sort();
    assert_eq!(
        got,
        vec![0, max],
        "expected an empty and a max-size payload delivered"
    );
    assert_eq!(within(15.0, "receipt max", r_big).await, Ok(Outcome::Acked));
    assert_eq!(
        within(15.0, "receipt empty", r_empty).await,
        Ok(Outcome::Acked)
    );
    // Effectively-once and at-most-once also carry a max-size payload.
    for (g, ch) in [
        (Guarantee::EffectivelyOnce, 102),
        (Guarantee::AtMostOnce, 103),
    ] {
        let mut rx = b.raw_receiver(ChannelId(ch), false).unwrap();
        let tx = a.raw_sender(NodeId(2), opts(ch, g)).unwrap();
        let r = within(10.0, "send max", tx.send(Bytes::from(big.clone())))
            .await
            .unwrap();
        let d = within(15.0, "recv max", rx.recv()).await.unwrap();
        assert_eq!(d.message().len(), max, "{g:?}: max-size payload length");
        d.ack();
        let o = within(15.0, "receipt", r).await;
        assert!(
            matches!(o, Ok(Outcome::Acked) | Ok(Outcome::Sent)),
            "{g:?}: expected the max-size payload's receipt Ok, got {o:?}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// The whole API on a current-thread runtime: every guarantee delivers and acks.
#[tokio::test(flavor = "current_thread")]
async fn m_current_thread_runtime() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    for (g, ch) in [
        (Guarantee::AtMostOnce, 111),
        (Guarantee::AtLeastOnce, 112),
        (Guarantee::EffectivelyOnce, 113),
    ] {
        let rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let seen: Seen = Arc::default();
        let t = spawn_counting(rx, seen.clone());
        let tx = a.sender::<u64>(NodeId(2), opts(ch, g)).unwrap();
        let mut receipts = Vec::new();
        for i in 0..2000 {
            receipts.push(within(10.0, "send", tx.send(&i)).await.unwrap());
        }
        let outcomes = settle_all(receipts, 15.0, "current-thread receipts").await;
        if g == Guarantee::AtMostOnce {
            assert!(outcomes.iter().all(|o| matches!(o, Ok(Outcome::Sent))));
            poll_until(10.0, "AMO arrivals", || async {
                seen.lock().unwrap().len() == 2000
            })
            .await;
        } else {
            assert_all_acked(&outcomes, &format!("{g:?} on current_thread"));
        }
        check_exactly_once(&seen, 2000, &format!("{g:?} on current_thread"));
        t.abort();
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Handles used from plain OS threads with no runtime: `send` and the receipt driven
/// by `futures::executor::block_on`, `try_send`, deliveries received on the runtime and
/// acked on a plain thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_handles_used_from_plain_threads() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(121), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(121, Guarantee::EffectivelyOnce))
        .unwrap();
    let (dtx, drx) = std::sync::mpsc::channel::<Delivery<u64>>();
    let acker = std::thread::spawn(move || {
        let mut n = 0u64;
        while let Ok(d) = drx.recv() {
            d.ack();
            n += 1;
        }
        n
    });
    let fwd = tokio::spawn(async move {
        let mut vals = Vec::new();
        while let Some(d) = rx.recv().await {
            vals.push(*d.message());
            if dtx.send(d).is_err() {
                break;
            }
            if vals.len() == 400 {
                break;
            }
        }
        vals
    });
    let sender_thread = std::thread::spawn(move || {
        let mut outcomes = Vec::new();
        for i in 0..200u64 {
            let r = futures::executor::block_on(tx.send(&i)).unwrap();
            outcomes.push(r);
        }
        for i in 200..400u64 {
            loop {
                match tx.try_send(&i) {
                    Ok(r) => {
                        outcomes.push(r);
                        break;
                    }
                    Err(SendError::WindowFull { .. }) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("try_send from a plain thread: {e:?}"),
                }
            }
        }
        outcomes
            .into_iter()
            .map(futures::executor::block_on)
            .collect::<Vec<_>>()
    });
    let outcomes = within(
        20.0,
        "plain-thread sender",
        tokio::task::spawn_blocking(move || sender_thread.join().unwrap()),
    )
    .await
    .unwrap();
    assert_all_acked(&outcomes, "plain-thread sends");
    let mut vals = within(10.0, "forwarder", fwd).await.unwrap();
    vals.sort();
    assert_eq!(vals, (0..400).collect::<Vec<_>>());
    let acked = within(
        10.0,
        "acker",
        tokio::task::spawn_blocking(move || acker.join().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(acked, 400);
    a.shutdown().await;
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 3. killed, delayed and stalled connections

async fn through_chaos(g: Guarantee, ch: u32, chaos: Chaos, n: u64, slow: bool) {
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let mut proxy = Proxy::start(b.local_addr().unwrap(), chaos).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
    let tx = a.sender::<u64>(NodeId(2), opts(ch, g)).unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let handler = tokio::spawn(async move {
        let mut rng = 5u64;
        while let Some(d) = rx.recv().await {
            *s2.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            let r = xorshift(&mut rng);
            if slow && r.is_multiple_of(50) {
                let ms = 50 + (r >> 8) % 1500;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    d.ack();
                });
            } else {
                d.ack();
            }
        }
    });
    let mut receipts = Vec::new();
    let mut send_errors = Vec::new();
    for i in 0..n {
        match within(35.0, "send through chaos", tx.send(&i)).await {
            Ok(r) => receipts.push(r),
            Err(e) => send_errors.push((i, e)),
        }
        // Spread the stream over ~5 s so that the proxy's faults land mid-stream.
        if i.is_multiple_of(20) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let outcomes = settle_all(receipts, 40.0, "receipts through chaos").await;
    proxy.calm();
    let kills = proxy.stats.kills.load(Ordering::Relaxed);
    let what = format!("{g:?} through a proxy ({kills} kills)");
    assert!(
        kills >= 3,
        "{what}: the proxy should have cut the link mid-stream"
    );
    match g {
        Guarantee::AtMostOnce => {
            // Every receipt resolved (bounded above); nothing arrives twice; nothing
            // arrives that was not sent.
            let seen = seen.lock().unwrap();
            assert!(
                seen.values().all(|c| *c == 1),
                "{what}: an at-most-once value was delivered twice"
            );
            assert!(seen.keys().all(|k| *k < n));
        }
        Guarantee::AtLeastOnce => {
            assert!(
                send_errors.is_empty(),
                "{what}: send errors {send_errors:?}"
            );
            assert_all_acked(&outcomes, &what);
            check_at_least_once(&seen, n, &what);
        }
        _ => {
            assert!(
                send_errors.is_empty(),
                "{what}: send errors {send_errors:?}"
            );
            assert_all_acked(&outcomes, &what);
            check_exactly_once(&seen, n, &what);
        }
    }
    handler.abort();
    a.shutdown().await;
    b.shutdown().await;
}

fn kills(seed: u64) -> Chaos {
    Chaos {
        seed,
        kill_every: Some(Duration::from_millis(400)),
        refuse_for: Duration::from_millis(100),
        split: 0.1,
        stall: 0.0,
        stall_for: Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_connection_killed_repeatedly_effectively_once_slow_handler() {
    through_chaos(Guarantee::EffectivelyOnce, 131, kills(1), 4000, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_connection_killed_repeatedly_at_least_once() {
    through_chaos(Guarantee::AtLeastOnce, 132, kills(2), 4000, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_connection_killed_repeatedly_at_most_once() {
    through_chaos(Guarantee::AtMostOnce, 133, kills(3), 4000, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_stalls_and_kills_effectively_once() {
    let chaos = Chaos {
        seed: 4,
        kill_every: Some(Duration::from_millis(800)),
        refuse_for: Duration::ZERO,
        split: 0.2,
        stall: 0.02,
        stall_for: Duration::from_millis(700),
    };
    through_chaos(Guarantee::EffectivelyOnce, 134, chaos, 3000, true).await;
}

/// A link that stops forwarding without closing: receipts with a 3 s channel deadline
/// resolve by their deadline (as `Deadline`), they do not hang; when the link resumes,
/// new messages are acked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_stalled_link_receipts_resolve_by_deadline_then_recover() {
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = StallProxy::start(b.local_addr().unwrap(), Duration::ZERO).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(141), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let mut o = opts(141, Guarantee::EffectivelyOnce);
    o.deadline = Some(Duration::from_secs(3));
    let tx = a.sender::<u64>(NodeId(2), o).unwrap();
    // Warm up: the connection is up.
    let r = within(10.0, "warm-up send", tx.send(&0)).await.unwrap();
    assert_eq!(within(10.0, "warm-up receipt", r).await, Ok(Outcome::Acked));
    proxy.pause(true);
    let start = Instant::now();
    let mut receipts = Vec::new();
    for i in 1..=50u64 {
        match within(5.0, "send into a stalled link", tx.send(&i)).await {
            Ok(r) => receipts.push(r),
            Err(e) => panic!("send into a stalled link failed at once: {e:?}"),
        }
    }
    let outcomes = settle_all(receipts, 8.0, "receipts on a stalled link").await;
    let took = start.elapsed();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(SendError::Deadline { .. }))),
        "expected every receipt on a stalled link to fail with Deadline, saw {:?}",
        count_errors(&outcomes)
    );
    assert!(
        took < Duration::from_secs(6),
        "receipts with a 3 s deadline took {took:?}"
    );
    proxy.pause(false);
    // Recovery: a new message is acked (PeerDown while the detector still holds it
    // Down is allowed; poll until a send is acked).
    let mut i = 1000u64;
    poll_until(15.0, "a send acked after the link resumed", || {
        i += 1;
        let tx = tx.clone();
        let v = i;
        async move {
            match tx.send(&v).await {
                Ok(r) => matches!(
                    tokio::time::timeout(Duration::from_secs(4), r).await,
                    Ok(Ok(Outcome::Acked))
                ),
                Err(_) => false,
            }
        }
    })
    .await;
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A link stalled for 4 s mid-stream (default 30 s deadline), then resumed: every
/// effectively-once message is processed exactly once and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_stall_mid_stream_then_resume_effectively_once() {
    const N: u64 = 3000;
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = StallProxy::start(b.local_addr().unwrap(), Duration::ZERO).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(151), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let tx = a
        .sender::<u64>(NodeId(2), opts(151, Guarantee::EffectivelyOnce))
        .unwrap();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..N {
            receipts.push(tx.send(&i).await.map_err(|e| (i, e))?);
            if i.is_multiple_of(100) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok::<_, (u64, SendError)>(receipts)
    });
    poll_until(10.0, "some arrivals", || async {
        seen.lock().unwrap().len() > 300
    })
    .await;
    proxy.pause(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.pause(false);
    let receipts = within(25.0, "sending", sending)
        .await
        .unwrap()
        .unwrap_or_else(|(i, e)| panic!("send #{i} failed during a 4 s stall: {e:?}"));
    let outcomes = settle_all(receipts, 30.0, "receipts after a stall").await;
    assert_all_acked(&outcomes, "after a 4 s stall");
    check_exactly_once(&seen, N, "after a 4 s stall");
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A link with a constant one-way latency and a steady sender: effectively-once exactly
/// once, all acked, and few retransmissions (the link loses nothing; RFC 6298 RTO
/// estimation with Karn's rule should learn the RTT).
async fn delayed_link(one_way: Duration, ch: u32, max_retx_pct: u64, pace: Option<Duration>) {
    const N: u64 = 500;
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = StallProxy::start(b.local_addr().unwrap(), one_way).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let tx = a
        .sender::<u64>(NodeId(2), opts(ch, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(within(10.0, "send", tx.send(&i)).await.unwrap());
        match pace {
            Some(p) => tokio::time::sleep(p).await,
            None if i.is_multiple_of(50) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => {}
        }
    }
    let outcomes = settle_all(receipts, 20.0, "receipts over a delayed link").await;
    assert_all_acked(&outcomes, "delayed link");
    check_exactly_once(&seen, N, "delayed link");
    let s = a.stats().await.unwrap();
    assert!(
        s.proto.retransmitted * 100 <= N * max_retx_pct,
        "one-way latency {one_way:?} (RTT ~{:?}), pace {pace:?}, lossless: expected at most {max_retx_pct}% \
         of {N} messages retransmitted, saw {} retransmissions",
        one_way * 2,
        s.proto.retransmitted
    );
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// RTT ~100 ms, below the 200 ms minimum RTO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_delayed_link_50ms_effectively_once() {
    delayed_link(Duration::from_millis(50), 161, 25, None).await;
}

/// Two bursts of `n` effectively-once messages over a link with a constant one-way
/// latency; returns the retransmissions of each burst.
async fn two_bursts(one_way: Duration, ch: u32, n: u64) -> Vec<u64> {
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = StallProxy::start(b.local_addr().unwrap(), one_way).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let tx = a
        .sender::<u64>(NodeId(2), opts(ch, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut retx = Vec::new();
    for burst in 0..2u64 {
        let before = a.stats().await.unwrap().proto.retransmitted;
        let mut receipts = Vec::new();
        for i in burst * n..(burst + 1) * n {
            receipts.push(within(10.0, "send", tx.send(&i)).await.unwrap());
        }
        let outcomes = settle_all(receipts, 20.0, "receipts of a burst").await;
        assert_all_acked(&outcomes, "burst over a delayed link");
        retx.push(a.stats().await.unwrap().proto.retransmitted - before);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    check_exactly_once(&seen, 2 * n, "two bursts over a delayed link");
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
    retx
}

/// RTT ~300 ms, above the 200 ms initial RTO, bursty sender: a first burst of 500 is
/// not retransmitted wholesale (no RTT sample yet, but only the oldest message goes at
/// the RTO and the rest wait for its answer); after it settled, a second burst on the same
/// stream must not be retransmitted wholesale again — the estimator has had a whole
/// burst of acks to learn the RTT from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_delayed_link_150ms_second_burst_not_retransmitted() {
    const N: u64 = 500;
    let retx = two_bursts(Duration::from_millis(150), 162, N).await;
    eprintln!("150 ms one way, bursts of {N}: retransmissions per burst {retx:?}");
    // The first burst's timers run out before any ack can come back: only the oldest
    // message goes and the rest wait for its answer (README, "Silent streams"; seen: 2
    // of 500, 258 before that rule).
    assert!(
        retx[0] * 100 <= N * 25,
        "first burst of {N} over a 300 ms round trip: at most 25% retransmitted; \
         retransmissions per burst: {retx:?}"
    );
    assert!(
        retx[1] * 100 <= N * 20,
        "one-way latency 150 ms (RTT ~300 ms), lossless: expected the second burst of {N} \
         to have at most 20% retransmitted once the first burst's acks were in; \
         retransmissions per burst: {retx:?}"
    );
}

/// RTT ~100 ms (below the 200 ms minimum RTO), bursts of 4 000 (one window): queueing
/// behind the burst must not turn into a retransmission of the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_delayed_link_50ms_window_bursts() {
    const N: u64 = 4000;
    let retx = two_bursts(Duration::from_millis(50), 164, N).await;
    assert!(
        retx[1] * 100 <= N * 25,
        "one-way latency 50 ms (RTT ~100 ms), lossless: expected at most 25% of a burst of \
         {N} retransmitted; retransmissions per burst: {retx:?}"
    );
}

/// As above with a steady paced sender (one message every 15 ms for 7.5 s): plenty of
/// time for the estimator to take a sample and stop retransmitting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_delayed_link_150ms_paced_effectively_once() {
    delayed_link(
        Duration::from_millis(150),
        163,
        20,
        Some(Duration::from_millis(15)),
    )
    .await;
}

/// `Node::shutdown` while a `send` waits for window space (the receiver stopped
/// reading): shutdown returns within its drain (5 s) plus slack, the waiting `send`
/// returns `Err(Shutdown)` instead of hanging, and every receipt resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_shutdown_while_send_waits_for_window() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let _rx = b.receiver::<u64>(ChannelId(171), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(171, Guarantee::AtLeastOnce))
        .unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..20_000u64 {
            match tx.send(&i).await {
                Ok(r) => receipts.push(r),
                Err(e) => return (receipts, Some(e)),
            }
            acc.fetch_add(1, Ordering::Relaxed);
        }
        (receipts, None)
    });
    poll_until(10.0, "the window fills", || async {
        accepted.load(Ordering::Relaxed) >= 4096
    })
    .await;
    // Let the send block on the full window.
    let stable = accepted.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        accepted.load(Ordering::Relaxed) < 20_000,
        "send never waited"
    );
    let _ = stable;
    let t = Instant::now();
    within(12.0, "shutdown while a send waits", a.shutdown()).await;
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "shutdown took {:?} (drain 5 s)",
        t.elapsed()
    );
    let (receipts, err) = within(5.0, "the waiting send returns", sending)
        .await
        .unwrap();
    assert_eq!(
        err,
        Some(SendError::Shutdown),
        "expected the send waiting for window space to fail with Shutdown"
    );
    let outcomes = settle_all(receipts, 5.0, "receipts after shutdown").await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(Outcome::Acked) | Err(SendError::Shutdown))),
        "expected receipts Acked or Err(Shutdown), saw {:?}",
        count_errors(&outcomes)
    );
    b.shutdown().await;
}

/// `send` futures cancelled (dropped) while they wait for window space do not leak
/// window slots: once everything settled, a full window of `try_send` succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_cancelled_sends_do_not_leak_window_slots() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(181), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(181, Guarantee::EffectivelyOnce))
        .unwrap();
    // Fill the window with nobody reading.
    let mut receipts = Vec::new();
    let mut i = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), tx.send(&i)).await {
            Ok(r) => receipts.push(r.unwrap()),
            Err(_) => break, // waited: window full, this send was cancelled
        }
        i += 1;
        assert!(i < 50_000, "send never waited for window space");
    }
    // Cancel 200 more waiting sends.
    for k in 0..200u64 {
        let r = tokio::time::timeout(Duration::from_millis(5), tx.send(&(1_000_000 + k))).await;
        if let Ok(r) = r {
            receipts.push(r.unwrap());
        }
    }
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let t = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            *s2.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            d.ack();
        }
    });
    let n_first = receipts.len();
    let outcomes = settle_all(receipts, 20.0, "receipts of the first window").await;
    assert_all_acked(&outcomes, "first window");
    let cancelled_arrived: Vec<u64> = seen
        .lock()
        .unwrap()
        .keys()
        .copied()
        .filter(|k| *k >= i && *k < 1_000_000)
        .collect();
    assert!(
        cancelled_arrived.is_empty(),
        "a cancelled send's message was delivered: {cancelled_arrived:?}"
    );
    let window = ackwire::ProtoConfig::default().max_in_flight;
    let mut ok = 0;
    let mut second = Vec::new();
    for k in 0..window as u64 {
        match tx.try_send(&(2_000_000 + k)) {
            Ok(r) => {
                ok += 1;
                second.push(r);
            }
            Err(SendError::WindowFull { .. }) => break,
            Err(e) => panic!("try_send: {e:?}"),
        }
    }
    assert_eq!(
        ok, window,
        "after {n_first} settled sends and ~200 cancelled ones, expected a full window of \
         {window} try_sends to succeed, only {ok} did (window slots leaked?)"
    );
    let outcomes = settle_all(second, 20.0, "second window").await;
    assert_all_acked(&outcomes, "second window");
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// An ordered effectively-once channel through a proxy that kills the connection
/// repeatedly: first deliveries follow send order, each message processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_ordered_channel_through_kills() {
    const N: u64 = 3000;
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = Proxy::start(b.local_addr().unwrap(), kills(9)).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let mut rx = b
        .receiver_with::<u64>(ChannelId(191), ackwire::ReceiverOptions::ordered())
        .unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(191, Guarantee::EffectivelyOnce))
        .unwrap();
    let order: Arc<Mutex<Vec<u64>>> = Arc::default();
    let o2 = order.clone();
    let t = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            o2.lock().unwrap().push(*d.message());
            d.ack();
        }
    });
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(within(35.0, "send", tx.send(&i)).await.unwrap());
        if i.is_multiple_of(20) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let outcomes = settle_all(receipts, 40.0, "ordered receipts").await;
    let kills = proxy.stats.kills.load(Ordering::Relaxed);
    assert_all_acked(&outcomes, &format!("ordered through {kills} kills"));
    let got = order.lock().unwrap().clone();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "ordered effectively-once through {kills} kills: expected 0..{N} once each in \
         order; got {} deliveries, first out of place at {:?}",
        got.len(),
        got.iter().enumerate().find(|(k, v)| *k as u64 != **v)
    );
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A sequential handler (no concurrency) that sleeps 1–2 s inline on a few messages:
/// the queue behind it waits, nothing is retransmitted wholesale (the receiver reports
/// what it holds), every message is processed once and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_sequential_handler_sleeping_inline() {
    const N: u64 = 600;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(201), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(201, Guarantee::EffectivelyOnce))
        .unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let t = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let v = *d.message();
            *s2.lock().unwrap().entry(v).or_insert(0) += 1;
            if v % 200 == 100 {
                tokio::time::sleep(Duration::from_millis(1000 + v)).await;
            } else if v % 50 == 7 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            d.ack();
        }
    });
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(within(10.0, "send", tx.send(&i)).await.unwrap());
    }
    let outcomes = settle_all(receipts, 15.0, "receipts, inline-sleeping handler").await;
    assert_all_acked(&outcomes, "inline-sleeping handler");
    check_exactly_once(&seen, N, "inline-sleeping handler");
    let s = a.stats().await.unwrap();
    assert!(
        s.proto.retransmitted <= N / 4,
        "expected few retransmissions behind a slow sequential handler (held messages are \
         reported), saw {} for {N} messages",
        s.proto.retransmitted
    );
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// The delivery limit's boundary with the default `max_deliveries` (20): a message
/// nacked 19 times and acked on its 20th delivery is `Acked`; one nacked 20 times is
/// dead-lettered after exactly 20 deliveries and its receipt is
/// `Rejected { DeadLettered }`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_nack_until_the_delivery_limit() {
    let limit = ackwire::ReceiverOptions::DEFAULT_MAX_DELIVERIES;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(211), false).unwrap();
    let mut dead = b.dead_letters();
    let tx = a
        .sender::<u64>(NodeId(2), opts(211, Guarantee::EffectivelyOnce))
        .unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let t = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let v = *d.message();
            let c = {
                let mut m = s2.lock().unwrap();
                let c = m.entry(v).or_insert(0);
                *c += 1;
                *c
            };
            // value 1: ack on the limit-th delivery; value 2: never ack.
            if v == 1 && c == limit {
                d.ack();
            } else {
                d.nack();
            }
        }
    });
    let r1 = tx.send(&1).await.unwrap();
    let r2 = tx.send(&2).await.unwrap();
    assert_eq!(
        within(
            15.0,
            "receipt of the message acked on its last allowed delivery",
            r1
        )
        .await,
        Ok(Outcome::Acked),
        "a message acked on delivery {limit} (the limit) must be Acked"
    );
    match within(15.0, "receipt of the always-nacked message", r2).await {
        Err(SendError::Rejected {
            reason: ackwire::RejectReason::DeadLettered,
        }) => {}
        other => panic!("expected Rejected {{ DeadLettered }}, got {other:?}"),
    }
    let letter = within(5.0, "dead letter", dead.recv()).await.unwrap();
    assert_eq!(letter.deliveries, limit, "dead letter's delivery count");
    let m = seen.lock().unwrap().clone();
    assert_eq!(m.get(&1).copied(), Some(limit), "deliveries of value 1");
    assert_eq!(m.get(&2).copied(), Some(limit), "deliveries of value 2");
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A delivery acked after its Receiver was dropped (the node still runs): the ack
/// counts — the receipt is `Acked` and a new receiver on the channel does not get the
/// message again (effectively-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_ack_after_receiver_dropped_counts() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(221), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(221, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = tx.send(&42).await.unwrap();
    let d = within(10.0, "recv", rx.recv()).await.unwrap();
    drop(rx);
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.ack();
    assert_eq!(
        within(
            10.0,
            "receipt of a delivery acked after its receiver was dropped",
            r
        )
        .await,
        Ok(Outcome::Acked)
    );
    let mut rx2 = b.receiver::<u64>(ChannelId(221), false).unwrap();
    let r2 = tx.send(&43).await.unwrap();
    let d2 = within(10.0, "recv on the new receiver", rx2.recv())
        .await
        .unwrap();
    assert_eq!(
        *d2.message(),
        43,
        "expected the new receiver's first message to be the new one (42 was acked)"
    );
    d2.ack();
    assert_eq!(within(10.0, "receipt 2", r2).await, Ok(Outcome::Acked));
    a.shutdown().await;
    b.shutdown().await;
}

/// `ack_durable` while the connection to the sender is cut and reconnects are refused:
/// it resolves (the ack is handed to the transport, or the stop is reported) within a
/// few seconds rather than waiting for the link; when the link is back the receipt is
/// `Acked` and the message was processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_ack_durable_while_the_link_is_down() {
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = Proxy::start(b.local_addr().unwrap(), Chaos::none()).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let mut rx = b.receiver::<u64>(ChannelId(231), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(231, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = tx.send(&5).await.unwrap();
    let d = within(10.0, "recv", rx.recv()).await.unwrap();
    proxy.refuse(true);
    proxy.kill_all();
    let res = within(5.0, "ack_durable with the link down", d.ack_durable()).await;
    assert_eq!(res, Ok(()), "ack_durable with the link down");
    proxy.refuse(false);
    assert_eq!(
        within(25.0, "receipt after the link is back", r).await,
        Ok(Outcome::Acked)
    );
    // Nothing redelivered.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "the acked message was delivered again"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A second sender on the same channel and peer with another guarantee: its sends fail
/// with `GuaranteeMismatch`, the first sender's stream is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_two_guarantees_on_one_channel() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let rx = b.receiver::<u64>(ChannelId(241), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let alo = a
        .sender::<u64>(NodeId(2), opts(241, Guarantee::AtLeastOnce))
        .unwrap();
    let r = alo.send(&1).await.unwrap();
    assert_eq!(within(10.0, "receipt", r).await, Ok(Outcome::Acked));
    let eo = a
        .sender::<u64>(NodeId(2), opts(241, Guarantee::EffectivelyOnce))
        .unwrap();
    // The error may come from `send` or from the receipt; either way nothing is sent.
    let res = match within(5.0, "mismatched send", eo.send(&2)).await {
        Ok(r) => within(10.0, "mismatched receipt", r).await,
        Err(e) => Err(e),
    };
    assert_eq!(
        res,
        Err(SendError::GuaranteeMismatch {
            existing: Guarantee::AtLeastOnce
        }),
        "a second guarantee on one channel"
    );
    let r = alo.send(&3).await.unwrap();
    assert_eq!(within(10.0, "receipt", r).await, Ok(Outcome::Acked));
    assert!(
        !seen.lock().unwrap().contains_key(&2),
        "the mismatched message was delivered"
    );
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// Sixteen tasks share one sender (clones) while the receiver works slowly: every
/// waiting `send` is woken in time, every receipt `Acked`, each message processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_many_tasks_share_one_full_window() {
    const TASKS: u64 = 16;
    const PER: u64 = 800;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(251), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(251, Guarantee::EffectivelyOnce))
        .unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let t = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(d) = rx.recv().await {
            *s2.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            d.ack();
            n += 1;
            if n.is_multiple_of(1000) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let mut tasks = Vec::new();
    for k in 0..TASKS {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for i in 0..PER {
                receipts.push(tx.send(&(k * PER + i)).await.unwrap());
            }
            futures::future::join_all(receipts).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(within(20.0, "a sending task", task).await.unwrap());
    }
    assert_all_acked(&outcomes, "sixteen tasks on one window");
    check_exactly_once(&seen, TASKS * PER, "sixteen tasks on one window");
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A message under an application key held by a slow handler while the same key is
/// sent again: the copy is not delivered while the original is processing; if the
/// original is acked both receipts are `Acked` and the handler saw it once; if the
/// original is nacked, it is delivered again once and then acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_same_key_while_original_in_progress() {
    for (nack_first, ch) in [(false, 261), (true, 262)] {
        let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let tx = a
            .sender::<u64>(NodeId(2), opts(ch, Guarantee::EffectivelyOnce))
            .unwrap();
        let key = ackwire::IdKey(0xABCDEF + ch as u128);
        let r1 = tx.send_with_key(&1, key).await.unwrap();
        let d = within(10.0, "first delivery", rx.recv()).await.unwrap();
        let r2 = tx.send_with_key(&1, key).await.unwrap();
        // While the original is held, the copy must not be delivered.
        if let Ok(Some(x)) = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await {
            panic!(
                "nack_first={nack_first}: a copy under the same key was delivered while the \
                 original was still being processed (id {:?})",
                x.id()
            );
        }
        let mut deliveries = 1;
        if nack_first {
            d.nack();
            let again = within(10.0, "redelivery after nack", rx.recv())
                .await
                .unwrap();
            deliveries += 1;
            again.ack();
        } else {
            d.ack();
        }
        for (k, r) in [(1, r1), (2, r2)] {
            assert_eq!(
                within(10.0, "receipt", r).await,
                Ok(Outcome::Acked),
                "nack_first={nack_first}: receipt {k}"
            );
        }
        if let Ok(Some(x)) = tokio::time::timeout(Duration::from_millis(700), rx.recv()).await {
            panic!(
                "nack_first={nack_first}: expected {deliveries} deliveries of the keyed message, \
                 saw another (id {:?})",
                x.id()
            );
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// Dropping the sending `Node` (no shutdown) while a `send` waits for window space:
/// the waiting send and every receipt resolve promptly with an error, nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_node_dropped_while_send_waits() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let _rx = b.receiver::<u64>(ChannelId(271), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(271, Guarantee::EffectivelyOnce))
        .unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..20_000u64 {
            match tx.send(&i).await {
                Ok(r) => receipts.push(r),
                Err(e) => return (receipts, Some(e)),
            }
            acc.fetch_add(1, Ordering::Relaxed);
        }
        (receipts, None)
    });
    poll_until(10.0, "the window fills", || async {
        accepted.load(Ordering::Relaxed) >= 4096
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(a);
    let (receipts, err) = within(5.0, "the waiting send after the node was dropped", sending)
        .await
        .unwrap();
    assert!(
        err.is_some(),
        "expected the waiting send to fail after its node was dropped"
    );
    let outcomes = settle_all(receipts, 5.0, "receipts after the node was dropped").await;
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_err() || o == &Ok(Outcome::Acked)),
        "{:?}",
        count_errors(&outcomes)
    );
    b.shutdown().await;
}

/// A `max_payload` larger than the default TCP frame allows is refused by `build()`
/// with a configuration error (not a panic, not a node that cannot send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_max_payload_above_the_frame_limit_is_a_config_error() {
    let mut cfg = ackwire::NodeConfig::default();
    cfg.max_payload = 16 << 20;
    match Node::builder(NodeId(1))
        .bind(any_addr())
        .config(cfg)
        .build()
        .await
    {
        Err(NodeError::Config(_)) => {}
        Err(e) => panic!("expected NodeError::Config, got {e:?}"),
        Ok(_) => panic!("expected NodeError::Config for max_payload 16 MiB > 8 MiB frame, built"),
    }
}

/// A receiver that stops reading for 6 s behind a link that is cut every ~500 ms: the
/// sender reconnects and retransmits what is unacknowledged, yet the receiver still
/// holds at most its stream credit (4 096 + 256) — retransmitted copies of messages
/// already queued are not queued again — and once it resumes the guarantee holds.
async fn paused_receiver_through_kills(g: Guarantee, ch: u32, seed: u64) {
    const N: u64 = 8000;
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let chaos = Chaos {
        seed,
        kill_every: Some(Duration::from_millis(500)),
        refuse_for: Duration::from_millis(50),
        split: 0.0,
        stall: 0.0,
        stall_for: Duration::ZERO,
    };
    let mut proxy = Proxy::start(b.local_addr().unwrap(), chaos).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
    let tx = a.sender::<u64>(NodeId(2), opts(ch, g)).unwrap();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..N {
            receipts.push(tx.send(&i).await.map_err(|e| (i, e))?);
        }
        Ok::<_, (u64, SendError)>(receipts)
    });
    let pause = Instant::now();
    let mut max_delivered = 0;
    while pause.elapsed() < Duration::from_secs(6) {
        let s = within(5.0, "stats", b.stats()).await.unwrap();
        max_delivered = max_delivered.max(s.proto.delivered);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kills = proxy.stats.kills.load(Ordering::Relaxed);
    assert!(
        max_delivered <= 4096 + 256,
        "{g:?}: a receiver paused for 6 s behind a link cut {kills} times: expected at most \
         its stream credit (4096 + 256) handed to its queue, saw {max_delivered}"
    );
    proxy.calm();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let receipts = within(30.0, "sending after the pause", sending)
        .await
        .unwrap()
        .unwrap_or_else(|(i, e)| panic!("{g:?}: send #{i} failed: {e:?}"));
    let outcomes = settle_all(receipts, 30.0, "receipts after the pause").await;
    assert_all_acked(&outcomes, &format!("{g:?} paused behind kills"));
    if g == Guarantee::EffectivelyOnce {
        check_exactly_once(&seen, N, "effectively-once paused behind kills");
    } else {
        check_at_least_once(&seen, N, "at-least-once paused behind kills");
    }
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_paused_receiver_through_kills_at_least_once() {
    paused_receiver_through_kills(Guarantee::AtLeastOnce, 281, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_paused_receiver_through_kills_effectively_once() {
    paused_receiver_through_kills(Guarantee::EffectivelyOnce, 282, 12).await;
}

/// At-most-once to a receiver paused behind a link cut every ~500 ms: nothing hangs —
/// `send` keeps returning once the receiver resumes (a stream blocked on credit probes
/// for it after a reconnection), every receipt resolves, and nothing arrives twice or
/// unsent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_paused_receiver_through_kills_at_most_once() {
    const N: u64 = 8000;
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let chaos = Chaos {
        seed: 13,
        kill_every: Some(Duration::from_millis(500)),
        refuse_for: Duration::from_millis(50),
        split: 0.0,
        stall: 0.0,
        stall_for: Duration::ZERO,
    };
    let mut proxy = Proxy::start(b.local_addr().unwrap(), chaos).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(291), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(291, Guarantee::AtMostOnce))
        .unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..N {
            receipts.push(tx.send(&i).await.map_err(|e| (i, e))?);
            acc.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<_, (u64, SendError)>(receipts)
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = accepted.load(Ordering::Relaxed);
    proxy.calm();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let receipts = within(
        20.0,
        &format!("at-most-once sends after the pause ({during} accepted during it)"),
        sending,
    )
    .await
    .unwrap()
    .unwrap_or_else(|(i, e)| panic!("send #{i} failed: {e:?}"));
    let outcomes = settle_all(receipts, 20.0, "at-most-once receipts").await;
    let sent = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Outcome::Sent)))
        .count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let seen = seen.lock().unwrap();
        assert!(
            seen.values().all(|c| *c == 1),
            "an AMO message arrived twice"
        );
        assert!(seen.keys().all(|k| *k < N));
        assert!(
            seen.len() <= sent,
            "more arrived ({}) than receipts said Sent ({sent})",
            seen.len()
        );
    }
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// The documented recipe after a `Deadline`: the handler held the message past the
/// sender's 2 s deadline; the application resends under the same `IdKey` while the
/// original is still being processed and again after it was acked. The handler runs
/// once; the resends are `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_resend_same_key_after_deadline_runs_once() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(301), false).unwrap();
    let mut o = opts(301, Guarantee::EffectivelyOnce);
    o.deadline = Some(Duration::from_secs(2));
    let tx = a.sender::<u64>(NodeId(2), o).unwrap();
    let key = ackwire::IdKey(0x5151);
    let r1 = tx.send_with_key(&9, key).await.unwrap();
    let d = within(10.0, "first delivery", rx.recv()).await.unwrap();
    match within(10.0, "receipt past its deadline", r1).await {
        Err(SendError::Deadline { .. }) => {}
        other => panic!("expected Deadline while the handler holds the message, got {other:?}"),
    }
    // Resend while the original is still in the handler's hands.
    let r2 = tx.send_with_key(&9, key).await.unwrap();
    if let Ok(Some(x)) = tokio::time::timeout(Duration::from_millis(800), rx.recv()).await {
        panic!(
            "the resend under the same key was delivered while the original was still \
             being processed (id {:?}; original {:?})",
            x.id(),
            d.id()
        );
    }
    d.ack();
    assert_eq!(
        within(10.0, "resend's receipt", r2).await,
        Ok(Outcome::Acked),
        "resend under the same key while the original was in progress, original then acked"
    );
    let r3 = tx.send_with_key(&9, key).await.unwrap();
    assert_eq!(
        within(10.0, "resend after ack", r3).await,
        Ok(Outcome::Acked)
    );
    if let Ok(Some(x)) = tokio::time::timeout(Duration::from_millis(700), rx.recv()).await {
        panic!(
            "the keyed message was processed twice (second delivery {:?})",
            x.id()
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A link that stalls for 8 s without closing (long enough for the failure detector to
/// hold the peer Down) while the sender keeps sending effectively-once: sends either
/// are accepted or fail with `PeerDown` (typed, at once), nothing hangs, and every
/// accepted message is processed exactly once and acked after the link resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_long_stall_then_resume_effectively_once() {
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = StallProxy::start(b.local_addr().unwrap(), Duration::ZERO).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(311), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let tx = a
        .sender::<u64>(NodeId(2), opts(311, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut accepted = Vec::new();
    let mut refused = 0u64;
    let start = Instant::now();
    let mut i = 0u64;
    let mut paused = false;
    let mut resumed = false;
    while start.elapsed() < Duration::from_secs(11) {
        if !paused && start.elapsed() > Duration::from_secs(1) {
            proxy.pause(true);
            paused = true;
        }
        if !resumed && start.elapsed() > Duration::from_secs(9) {
            proxy.pause(false);
            resumed = true;
        }
        match within(5.0, "send during a long stall", tx.send(&i)).await {
            Ok(r) => accepted.push((i, r)),
            Err(SendError::PeerDown { .. }) => refused += 1,
            Err(e) => panic!("send #{i} during a long stall: unexpected {e:?}"),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ids: Vec<u64> = accepted.iter().map(|(i, _)| *i).collect();
    let outcomes = settle_all(
        accepted.into_iter().map(|(_, r)| r).collect(),
        30.0,
        "receipts after a long stall",
    )
    .await;
    assert_all_acked(
        &outcomes,
        &format!("after an 8 s stall ({refused} sends refused PeerDown)"),
    );
    {
        let s = seen.lock().unwrap();
        let missing: Vec<u64> = ids.iter().copied().filter(|i| !s.contains_key(i)).collect();
        let dup: Vec<u64> = s.iter().filter(|(_, c)| **c > 1).map(|(k, _)| *k).collect();
        assert!(
            missing.is_empty() && dup.is_empty(),
            "after an 8 s stall: missing {missing:?}, repeated {dup:?}"
        );
    }
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// The receiver node shuts down while its handler holds deliveries and finishes them
/// 300 ms later (within the documented 1 s grace): their acks are not lost — the
/// sender's receipts are `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_acks_within_the_shutdown_grace_are_sent() {
    for (g, ch) in [
        (Guarantee::EffectivelyOnce, 321),
        (Guarantee::AtLeastOnce, 322),
    ] {
        let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let mut o = opts(ch, g);
        o.deadline = Some(Duration::from_secs(4));
        let tx = a.sender::<u64>(NodeId(2), o).unwrap();
        let mut receipts = Vec::new();
        for i in 0..5u64 {
            receipts.push(tx.send(&i).await.unwrap());
        }
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(within(10.0, "recv", rx.recv()).await.unwrap());
        }
        let b = Arc::new(b);
        let b2 = b.clone();
        let stopping = tokio::spawn(async move { b2.shutdown().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        for d in held {
            d.ack();
        }
        within(10.0, "receiver shutdown", stopping).await.unwrap();
        let outcomes = settle_all(receipts, 10.0, "receipts acked during shutdown grace").await;
        assert_all_acked(
            &outcomes,
            &format!("{g:?}: deliveries acked 300 ms into the receiver's shutdown"),
        );
        a.shutdown().await;
    }
}

/// Max-size (4 MiB) effectively-once payloads through a proxy that cuts the connection
/// every ~300 ms and splits writes: every payload arrives intact, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_max_size_payloads_through_kills() {
    const N: u64 = 12;
    let max = ackwire::NodeConfig::default().max_payload;
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let chaos = Chaos {
        seed: 21,
        kill_every: Some(Duration::from_millis(300)),
        refuse_for: Duration::from_millis(50),
        split: 0.3,
        stall: 0.0,
        stall_for: Duration::ZERO,
    };
    let proxy = Proxy::start(b.local_addr().unwrap(), chaos).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let mut rx = b.raw_receiver(ChannelId(331), false).unwrap();
    let tx = a
        .raw_sender(NodeId(2), opts(331, Guarantee::EffectivelyOnce))
        .unwrap();
    let got: Arc<Mutex<HashMap<u8, u32>>> = Arc::default();
    let g2 = got.clone();
    let t = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let m = d.message();
            let tag = m[0];
            let intact = m.len() == max && m.iter().all(|b| *b == tag);
            assert!(intact, "payload {tag} corrupted (len {})", m.len());
            *g2.lock().unwrap().entry(tag).or_insert(0) += 1;
            d.ack();
        }
    });
    let mut receipts = Vec::new();
    for i in 0..N {
        let p = Bytes::from(vec![i as u8; max]);
        receipts.push(within(30.0, "send 4 MiB", tx.send(p)).await.unwrap());
    }
    let outcomes = settle_all(receipts, 40.0, "receipts of 4 MiB payloads").await;
    let kills = proxy.stats.kills.load(Ordering::Relaxed);
    assert_all_acked(&outcomes, &format!("4 MiB payloads through {kills} kills"));
    let got = got.lock().unwrap().clone();
    for i in 0..N as u8 {
        assert_eq!(got.get(&i).copied(), Some(1), "payload {i}: {got:?}");
    }
    assert!(!t.is_finished(), "receiver task ended (payload corrupted?)");
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// Zero-sized typed values (`()` and an empty `Vec`) are delivered and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_zero_sized_typed_values() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut unit = b.receiver::<()>(ChannelId(341), false).unwrap();
    let mut empty = b.receiver::<Vec<u8>>(ChannelId(342), false).unwrap();
    let tu = a
        .sender::<()>(NodeId(2), opts(341, Guarantee::EffectivelyOnce))
        .unwrap();
    let te = a
        .sender::<Vec<u8>>(NodeId(2), opts(342, Guarantee::AtLeastOnce))
        .unwrap();
    let r1 = tu.send(&()).await.unwrap();
    let r2 = te.send(&Vec::new()).await.unwrap();
    within(10.0, "recv ()", unit.recv()).await.unwrap().ack();
    let d = within(10.0, "recv empty vec", empty.recv()).await.unwrap();
    assert!(d.message().is_empty());
    d.ack();
    assert_eq!(within(10.0, "receipt ()", r1).await, Ok(Outcome::Acked));
    assert_eq!(within(10.0, "receipt vec", r2).await, Ok(Outcome::Acked));
    a.shutdown().await;
    b.shutdown().await;
}

/// Every stream a node hands out ends once the node has stopped — by `shutdown` or by
/// dropping the `Node` — instead of waiting forever: `Receiver::recv` (`None`),
/// `recv_many` (0), `DeadLetters::recv` (`None`), `closed()`; `decommission` and
/// `stats` fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_handles_end_when_the_node_stops() {
    for by_drop in [false, true] {
        let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
        let mut rx = b.receiver::<u64>(ChannelId(351), false).unwrap();
        let mut raw = b.raw_receiver(ChannelId(352), false).unwrap();
        let mut dead = b.dead_letters();
        let mut dead2 = b.dead_letters();
        // Park a waiter on each before the stop.
        let w_rx = tokio::spawn(async move { rx.recv().await.is_none() });
        let w_dead = tokio::spawn(async move { dead.recv().await.is_none() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        if by_drop {
            drop(b);
        } else {
            within(10.0, "shutdown", b.shutdown()).await;
            assert!(within(5.0, "closed", b.closed()).await.is_ok());
            assert!(within(5.0, "decommission", b.decommission(NodeId(1)))
                .await
                .is_err());
            assert!(within(5.0, "stats", b.stats()).await.is_err());
        }
        let how = if by_drop { "dropped" } else { "shut down" };
        assert!(
            within(
                5.0,
                &format!("Receiver::recv after the node was {how}"),
                w_rx
            )
            .await
            .unwrap(),
            "recv returned a delivery"
        );
        assert!(within(
            5.0,
            &format!("DeadLetters::recv after the node was {how}"),
            w_dead
        )
        .await
        .unwrap());
        assert!(within(
            5.0,
            &format!("a second DeadLetters handle after the node was {how}"),
            dead2.recv()
        )
        .await
        .is_none());
        let mut buf = Vec::new();
        assert_eq!(
            within(
                5.0,
                &format!("recv_many after the node was {how}"),
                raw.recv_many(&mut buf, 10)
            )
            .await,
            0
        );
        a.shutdown().await;
    }
}

/// Only the way back stalls (acks, heartbeats and credit from the receiver stop; data
/// still flows to it) for 5 s: every effectively-once message is processed exactly
/// once and acked once the way back resumes; sends are accepted or refused `PeerDown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_one_way_stall_of_acks_effectively_once() {
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = StallProxy::start(b.local_addr().unwrap(), Duration::ZERO).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(361), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let tx = a
        .sender::<u64>(NodeId(2), opts(361, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut accepted = Vec::new();
    let mut refused = 0u64;
    let start = Instant::now();
    let mut i = 0u64;
    let (mut paused, mut resumed) = (false, false);
    while start.elapsed() < Duration::from_secs(8) {
        if !paused && start.elapsed() > Duration::from_secs(1) {
            proxy.pause_back(true);
            paused = true;
        }
        if !resumed && start.elapsed() > Duration::from_secs(6) {
            proxy.pause_back(false);
            resumed = true;
        }
        match within(5.0, "send during a one-way stall", tx.send(&i)).await {
            Ok(r) => accepted.push((i, r)),
            Err(SendError::PeerDown { .. }) => refused += 1,
            Err(e) => panic!("send #{i} during a one-way stall: unexpected {e:?}"),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ids: Vec<u64> = accepted.iter().map(|(i, _)| *i).collect();
    let outcomes = settle_all(
        accepted.into_iter().map(|(_, r)| r).collect(),
        30.0,
        "receipts after a one-way stall",
    )
    .await;
    assert_all_acked(
        &outcomes,
        &format!("after a 5 s stall of the way back ({refused} sends refused PeerDown)"),
    );
    {
        let s = seen.lock().unwrap();
        let missing: Vec<u64> = ids.iter().copied().filter(|i| !s.contains_key(i)).collect();
        let dup: Vec<u64> = s.iter().filter(|(_, c)| **c > 1).map(|(k, _)| *k).collect();
        assert!(
            missing.is_empty() && dup.is_empty(),
            "after a one-way stall: missing {missing:?}, repeated {dup:?}"
        );
    }
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A receiver paused with a full stream credit queued (4 096 messages it never saw) is
/// dropped; 2 s later (inside the 5 s no-receiver grace) a new one registers. The
/// queued messages come back to it: every message processed exactly once, all acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_full_queue_dropped_then_new_receiver_within_grace() {
    const N: u64 = 10_000;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let rx = b.receiver::<u64>(ChannelId(371), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(371, Guarantee::EffectivelyOnce))
        .unwrap();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..N {
            receipts.push(tx.send(&i).await.map_err(|e| (i, e))?);
        }
        Ok::<_, (u64, SendError)>(receipts)
    });
    poll_until(10.0, "the receiver's queue fills", || async {
        b.stats().await.unwrap().proto.delivered >= 4096
    })
    .await;
    drop(rx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen: Seen = Arc::default();
    let t = spawn_counting(
        b.receiver::<u64>(ChannelId(371), false).unwrap(),
        seen.clone(),
    );
    let receipts = within(30.0, "sending", sending)
        .await
        .unwrap()
        .unwrap_or_else(|(i, e)| panic!("send #{i} failed: {e:?}"));
    let outcomes = settle_all(receipts, 30.0, "receipts across a dropped full queue").await;
    assert_all_acked(
        &outcomes,
        "a full queue dropped, new receiver within the grace",
    );
    check_exactly_once(
        &seen,
        N,
        "a full queue dropped, new receiver within the grace",
    );
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// A poison message always nacked on a channel without a delivery limit
/// (`max_deliveries(None)`: "redeliver until the sender's deadline") next to healthy
/// traffic: the healthy messages keep flowing and are all acked, and the poison
/// message's receipt ends by its deadline (3 s) with `Deadline`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_poison_message_without_delivery_limit() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b
        .receiver_with::<u64>(
            ChannelId(381),
            ackwire::ReceiverOptions::default().max_deliveries(None),
        )
        .unwrap();
    let mut o = opts(381, Guarantee::EffectivelyOnce);
    o.deadline = Some(Duration::from_secs(3));
    let tx = a.sender::<u64>(NodeId(2), o).unwrap();
    let poison_deliveries = Arc::new(AtomicU64::new(0));
    let pd = poison_deliveries.clone();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let t = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if *d.message() == u64::MAX {
                pd.fetch_add(1, Ordering::Relaxed);
                d.nack();
            } else {
                *s2.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
                d.ack();
            }
        }
    });
    let poison = tx.send(&u64::MAX).await.unwrap();
    let mut receipts = Vec::new();
    for i in 0..1000u64 {
        receipts.push(tx.send(&i).await.unwrap());
        if i.is_multiple_of(100) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let outcomes = settle_all(receipts, 15.0, "healthy receipts next to a poison message").await;
    assert_all_acked(&outcomes, "healthy messages next to a poison message");
    check_exactly_once(&seen, 1000, "healthy messages next to a poison message");
    match within(10.0, "poison receipt", poison).await {
        Err(SendError::Deadline { .. }) => {}
        other => panic!("expected the always-nacked message to end with Deadline, got {other:?}"),
    }
    eprintln!(
        "poison message delivered {} times in its 3 s",
        poison_deliveries.load(Ordering::Relaxed)
    );
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// `Sender::sink` on a link that stalls without closing: `send_all` of 200 values and
/// `close()` end with the first failure (`Deadline`, 3 s channel deadline) in bounded
/// time instead of waiting for the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_sink_close_on_a_stalled_link_fails_by_deadline() {
    use futures::{SinkExt, StreamExt};
    let b = receiver_node(NodeId(2), &[NodeId(1)]).await;
    let proxy = StallProxy::start(b.local_addr().unwrap(), Duration::ZERO).await;
    let a = sender_node(NodeId(1), NodeId(2), proxy.addr).await;
    let rx = b.receiver::<u64>(ChannelId(391), false).unwrap();
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let mut o = opts(391, Guarantee::AtLeastOnce);
    o.deadline = Some(Duration::from_secs(3));
    let tx = a.sender::<u64>(NodeId(2), o).unwrap();
    let r = within(10.0, "warm-up", tx.send(&0)).await.unwrap();
    assert_eq!(within(10.0, "warm-up receipt", r).await, Ok(Outcome::Acked));
    proxy.pause(true);
    let mut sink = tx.sink();
    let start = Instant::now();
    let res = within(10.0, "sink send_all + close on a stalled link", async {
        sink.send_all(&mut futures::stream::iter(1..=200u64).map(Ok))
            .await?;
        sink.close().await
    })
    .await;
    assert!(
        matches!(res, Err(SendError::Deadline { .. })),
        "expected the sink to fail with Deadline on a stalled link, got {res:?} after {:?}",
        start.elapsed()
    );
    proxy.pause(false);
    t.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// Eight sender nodes keep sending to a receiver that stops reading for 4 s: it holds
/// at most a stream credit per sender (8 × (4 096 + 256)), every `send` waits rather
/// than fails, and afterwards every message is processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_eight_senders_to_a_paused_receiver() {
    const SENDERS: u64 = 8;
    const PER: u64 = 6000;
    let ids: Vec<NodeId> = (0..SENDERS).map(|i| NodeId(200 + i)).collect();
    let b = receiver_node(NodeId(2), &ids).await;
    let rx = b.receiver::<u64>(ChannelId(401), false).unwrap();
    let mut senders = Vec::new();
    for id in &ids {
        senders.push(sender_node(*id, NodeId(2), b.local_addr().unwrap()).await);
    }
    let mut tasks = Vec::new();
    for (k, node) in senders.iter().enumerate() {
        let tx = node
            .sender::<u64>(NodeId(2), opts(401, Guarantee::EffectivelyOnce))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let base = k as u64 * PER;
            let mut receipts = Vec::new();
            for i in 0..PER {
                receipts.push(tx.send(&(base + i)).await?);
            }
            Ok::<_, SendError>(receipts)
        }));
    }
    let pause = Instant::now();
    let mut max_delivered = 0;
    while pause.elapsed() < Duration::from_secs(4) {
        let s = within(5.0, "stats", b.stats()).await.unwrap();
        max_delivered = max_delivered.max(s.proto.delivered);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        max_delivered <= SENDERS * (4096 + 256),
        "a paused receiver with {SENDERS} senders: expected at most {} queued, saw {max_delivered}",
        SENDERS * (4096 + 256)
    );
    assert!(
        tasks.iter().all(|t| !t.is_finished()),
        "expected every sender to be held back while the receiver was paused"
    );
    let seen: Seen = Arc::default();
    let t = spawn_counting(rx, seen.clone());
    let mut outcomes = Vec::new();
    for task in tasks {
        let receipts = within(30.0, "a sender after the pause", task)
            .await
            .unwrap()
            .expect("send failed (expected it to wait)");
        outcomes.extend(settle_all(receipts, 30.0, "receipts after the pause").await);
    }
    assert_all_acked(&outcomes, "eight senders to a paused receiver");
    check_exactly_once(&seen, SENDERS * PER, "eight senders to a paused receiver");
    t.abort();
    for s in &senders {
        s.shutdown().await;
    }
    b.shutdown().await;
}
