//! Black-box tests, round 5: ordered delivery and effectively-once under combined
//! faults (a proxy that cuts the connection while handlers nack and drop, receivers
//! dropped and re-created, a sender restarted as a new incarnation, hinted handoff
//! replaying to a returning target, a receiver process SIGKILLed after `ack_durable`,
//! more channels than the per-peer stream limit, channels without a receiver for a
//! while). Real TCP on loopback, default settings unless a test says otherwise, public
//! API only (README.md, rustdoc, examples/).
//!
//! The ordered contract checked here is `ReceiverOptions::ordered`'s, rules 1-4:
//! per stream (one sending node run on one channel) first deliveries follow send
//! order; a nacked or dropped delivery is redelivered before anything of its stream
//! not handed out yet; refusals before the application saw a message rewind the
//! stream; a message refused for good is settled.
//!
//! Found when written (each failed when written; fixed since):
//! - At-most-once on an ordered receiver wedges whenever its stream starts past seq 1
//!   or has a hole: the sender's at-most-once floor trails 16 384 seqs behind
//!   (`amo_reorder_slack`) while the stream's credit and reorder buffer stop at 4 096,
//!   so the stream waits for seqs that will never come. After a connection cut
//!   (`ordered_at_most_once_moves_past_messages_lost_in_a_cut`: deliveries stop,
//!   `send` blocks, a window of receipts never resolves, also after the link heals), a
//!   late receiver (`an_ordered_receiver_registering_late_*`: 0 of 100 delivered), a
//!   receiver restart (`ordered_at_most_once_flows_again_after_the_receiver_restarts`:
//!   0 of 100) and a recycled stream (`at_most_once_on_recycled_ordered_streams_*`:
//!   only each channel's first message delivered, the rest lost uncounted).
//! - A recycled at-most-once stream made again by a later frame never becomes idle
//!   again, so the per-peer stream slots fill up with them: a sender that used more
//!   than 256 at-most-once channels has further channels refused for good
//!   (`at_most_once_on_recycled_unordered_streams_*`), including new at-least-once
//!   channels, whose receipts fail their deadline
//!   (`new_acked_channels_are_served_after_many_at_most_once_channels`).
//! - A recycled acked stream forgets the credit it granted: an honest sender's burst
//!   on it is dropped past 512 messages as `credit_exceeded` and retransmitted
//!   (`a_burst_on_a_recycled_stream_is_not_dropped_as_over_credit`: 1 488 of 2 000).
//!
//! Fixed by: an at-most-once stream starts at its first frame and, when ordered, skips
//! a gap (a late message after a later one is dropped); at-most-once `done` entries no
//! longer keep a stream from being idle; once the sender's floor says something was
//! settled, a stream allows the full window, not the initial credit.

#![allow(clippy::type_complexity)] // test bookkeeping shared across tasks

#[path = "support/ports.rs"]
mod ports;
use ackwire::dedup::DurableDedup;
use ackwire::detector::Health;
use ackwire::{
    ChannelId, ChannelOptions, Delivery, Guarantee, HandoffConfig, IdKey, Node, NodeConfig, NodeId,
    Origin, Outcome, RawReceiver, RawSender, Receipt, ReceiverOptions, RejectReason, SendError,
};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

// -------------------------------------------------------------------------------------
// Helpers
// -------------------------------------------------------------------------------------

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

fn free_port() -> SocketAddr {
    ports::restartable_addr()
}

async fn within<F: std::future::Future>(secs: u64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

fn rnd(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Polls (up to 10 s) until `book` records a delivery on `ch` of every value in
/// `values`; returns either way (the caller's checks report what is missing).
async fn wait_delivered(book: &Arc<Mutex<Book>>, ch: u32, values: std::ops::Range<u64>) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let done = {
            let bk = book.lock().unwrap();
            values.clone().all(|i| bk.delivered.contains_key(&(ch, i)))
        };
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn payload(i: u64) -> Bytes {
    Bytes::copy_from_slice(&i.to_be_bytes())
}

fn index(p: &Bytes) -> u64 {
    u64::from_be_bytes(p[..8].try_into().unwrap())
}

async fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every receipt's outcome, waiting at most `secs` in total; `None` for one that did
/// not resolve in time (a hang).
async fn settle<K: Copy>(
    receipts: Vec<(K, Receipt)>,
    secs: u64,
) -> Vec<(K, Option<Result<Outcome, SendError>>)> {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    for (k, r) in receipts {
        out.push((k, tokio::time::timeout_at(end, r).await.ok()));
    }
    out
}

fn tally<K>(res: &[(K, Option<Result<Outcome, SendError>>)]) -> HashMap<String, usize> {
    let mut t = HashMap::new();
    for (_, r) in res {
        *t.entry(format!("{r:?}")).or_default() += 1;
    }
    t
}

async fn receiver_node(id: u64, addr: SocketAddr, allow: &[u64], cfg: NodeConfig) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(addr).config(cfg);
    for a in allow {
        b = b.allow_peer(NodeId(*a));
    }
    b.build().await.expect("receiver builds")
}

async fn sender_node(id: u64, peer: u64, addr: SocketAddr, cfg: NodeConfig) -> Node {
    Node::builder(NodeId(id))
        .bind(any_addr())
        .peer(NodeId(peer), addr)
        .config(cfg)
        .build()
        .await
        .expect("sender builds")
}

fn durable_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.dedup.durable = Some(DurableDedup::new(dir));
    c
}

fn raw_sender(node: &Node, peer: u64, ch: u32, g: Guarantee) -> RawSender {
    node.raw_sender(NodeId(peer), ChannelOptions::new(ChannelId(ch), g))
        .expect("sender")
}

// -------------------------------------------------------------------------------------
// A proxy that can cut every connection through it
// -------------------------------------------------------------------------------------

struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind(any_addr()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let c2 = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c2.lock().unwrap().push(h);
            }
        });
        Proxy {
            addr,
            conns,
            accept,
        }
    }

    /// Close every connection through the proxy (both sockets dropped at once).
    fn cut(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Cut the proxy's connections every `every` until `stop` is set.
fn cutter(proxy: Arc<Proxy>, every: Duration, stop: Arc<std::sync::atomic::AtomicBool>) {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(every).await;
            proxy.cut();
        }
    });
}

// -------------------------------------------------------------------------------------
// What the application saw
// -------------------------------------------------------------------------------------

/// The application's view of one receiving channel (or several: keyed by channel).
#[derive(Default)]
struct Book {
    /// First deliveries, in the order the application received them: (channel,
    /// sending node run, index).
    firsts: Vec<(u32, Origin, u64)>,
    delivered: HashMap<(u32, u64), u32>,
    /// Processed (acked by the handler).
    acked: HashMap<(u32, u64), u32>,
    /// Effectively-once: deliveries of a message after the handler had acked it.
    after_ack: Vec<(u32, u64)>,
    /// Nacked or dropped, redelivery not yet seen: when.
    failed_at: HashMap<(u32, u64), Instant>,
    /// Rule 2, conservatively: first deliveries of messages whose `send` started more
    /// than 150 ms after an earlier message of the stream was nacked and before that
    /// one was redelivered.
    overtook_redelivery: Vec<(u32, u64, u64)>,
}

type SharedBook = Arc<Mutex<Book>>;
type SentAt = Arc<Mutex<HashMap<(u32, u64), Instant>>>;

impl Book {
    fn on_delivery(&mut self, ch: u32, from: Origin, i: u64, eo: bool, sent_at: Option<&SentAt>) {
        let n = self.delivered.entry((ch, i)).or_default();
        *n += 1;
        let first = *n == 1;
        if eo && self.acked.get(&(ch, i)).copied().unwrap_or(0) > 0 {
            self.after_ack.push((ch, i));
        }
        self.failed_at.remove(&(ch, i));
        if first {
            self.firsts.push((ch, from, i));
            if let Some(sent) = sent_at {
                let sent = sent.lock().unwrap();
                if let Some(t) = sent.get(&(ch, i)) {
                    for ((c, n), at) in &self.failed_at {
                        if *c == ch && *t > *at + Duration::from_millis(150) {
                            self.overtook_redelivery.push((ch, *n, i));
                        }
                    }
                }
            }
        }
    }

    /// Per channel and sending run, first deliveries that came after a later message's
    /// (rule 1): (channel, earlier-delivered index, later-delivered smaller index).
    fn inversions(&self, only: impl Fn(u32, u64) -> bool) -> Vec<(u32, u64, u64)> {
        let mut last: HashMap<(u32, Origin), u64> = HashMap::new();
        let mut bad = Vec::new();
        for (ch, from, i) in &self.firsts {
            if !only(*ch, *i) {
                continue;
            }
            if let Some(prev) = last.get(&(*ch, *from)) {
                if *i < *prev {
                    bad.push((*ch, *prev, *i));
                }
            }
            let e = last.entry((*ch, *from)).or_insert(*i);
            *e = (*e).max(*i);
        }
        bad
    }

    fn acked(&self, ch: u32, i: u64) -> u32 {
        self.acked.get(&(ch, i)).copied().unwrap_or(0)
    }
}

/// How a handler finishes deliveries: percentages of nacks and drops (the rest acked).
#[derive(Clone, Copy)]
struct Faults {
    nack_pct: u64,
    drop_pct: u64,
}

const CLEAN: Faults = Faults {
    nack_pct: 0,
    drop_pct: 0,
};

/// Record `d`, then ack, nack or drop it.
fn finish(
    d: Delivery<Bytes>,
    ch: u32,
    book: &SharedBook,
    rng: &mut u64,
    f: Faults,
    sent_at: Option<&SentAt>,
) {
    let i = index(d.message());
    let eo = d.guarantee() == Guarantee::EffectivelyOnce;
    let roll = rnd(rng) % 100;
    let mut b = book.lock().unwrap();
    b.on_delivery(ch, d.from(), i, eo, sent_at);
    if roll < f.nack_pct {
        b.failed_at.insert((ch, i), Instant::now());
        drop(b);
        d.nack();
    } else if roll < f.nack_pct + f.drop_pct {
        b.failed_at.insert((ch, i), Instant::now());
        drop(b);
        drop(d);
    } else {
        *b.acked.entry((ch, i)).or_default() += 1;
        drop(b);
        d.ack();
    }
}

/// A serial handler on `rx` until the node stops.
fn spawn_handler(
    mut rx: RawReceiver,
    ch: u32,
    book: SharedBook,
    seed: u64,
    f: Faults,
    sent_at: Option<SentAt>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = seed | 1;
        while let Some(d) = rx.recv().await {
            finish(d, ch, &book, &mut rng, f, sent_at.as_ref());
        }
    })
}

/// Failures of the common checks for a channel whose messages `0..n` all got `Ok(Acked)`.
fn check_channel(book: &Book, ch: u32, n: u64, eo: bool) -> Vec<String> {
    let mut errs = Vec::new();
    let lost: Vec<u64> = (0..n).filter(|i| book.acked(ch, *i) == 0).collect();
    if !lost.is_empty() {
        errs.push(format!(
            "channel {ch}: {} acked messages never processed, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(8)]
        ));
    }
    if eo {
        let twice: Vec<u64> = (0..n).filter(|i| book.acked(ch, *i) > 1).collect();
        if !twice.is_empty() {
            errs.push(format!(
                "channel {ch}: {} effectively-once messages processed more than once, e.g. {:?}",
                twice.len(),
                &twice[..twice.len().min(8)]
            ));
        }
        let again: Vec<_> = book.after_ack.iter().filter(|x| x.0 == ch).collect();
        if !again.is_empty() {
            errs.push(format!(
                "channel {ch}: {} deliveries after the message was processed, e.g. {:?}",
                again.len(),
                &again[..again.len().min(8)]
            ));
        }
    }
    let inv = book.inversions(|c, _| c == ch);
    if !inv.is_empty() {
        errs.push(format!(
            "channel {ch}: {} first deliveries out of send order (rule 1), e.g. {:?}",
            inv.len(),
            &inv[..inv.len().min(8)]
        ));
    }
    errs
}

fn bad_receipts<K: std::fmt::Debug + Copy>(
    res: &[(K, Option<Result<Outcome, SendError>>)],
    ok: impl Fn(&Result<Outcome, SendError>) -> bool,
) -> Vec<String> {
    res.iter()
        .filter(|(_, r)| !r.as_ref().is_some_and(&ok))
        .take(8)
        .map(|(k, r)| format!("{k:?}: {r:?}"))
        .collect()
}

// -------------------------------------------------------------------------------------
// 1. Ordered receivers while the connection is cut and handlers nack and drop
// -------------------------------------------------------------------------------------

/// Promise (`ReceiverOptions::ordered`): "1. first deliveries follow send order" and
/// "2. a delivery that is nacked or dropped unfinished is redelivered before any
/// message of its stream that had not been handed out yet", together with the README's
/// "at least once if the receipt was `Ok`" / "exactly once if the receipt was `Ok`" —
/// while a proxy cuts the connection every 300 ms and the handler nacks 12 % and drops
/// 5 % of its deliveries. One ordered at-least-once and one ordered effectively-once
/// channel, 500 messages each, paced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_channels_keep_order_through_cuts_while_handlers_nack_and_drop() {
    const N: u64 = 500;
    let b = receiver_node(1102, any_addr(), &[1101], NodeConfig::default()).await;
    let proxy = Arc::new(Proxy::start(b.local_addr().unwrap()).await);
    let a = sender_node(1101, 1102, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let sent_at: SentAt = Arc::default();
    let faults = Faults {
        nack_pct: 12,
        drop_pct: 5,
    };
    for (ch, seed) in [(1u32, 11u64), (2, 23)] {
        let rx = b
            .raw_receiver_with(ChannelId(ch), ReceiverOptions::ordered())
            .unwrap();
        spawn_handler(rx, ch, book.clone(), seed, faults, Some(sent_at.clone()));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cutter(proxy.clone(), Duration::from_millis(300), stop.clone());
    let alo = raw_sender(&a, 1102, 1, Guarantee::AtLeastOnce);
    let eo = raw_sender(&a, 1102, 2, Guarantee::EffectivelyOnce);
    let mut receipts = Vec::new();
    for i in 0..N {
        for (ch, s) in [(1u32, &alo), (2, &eo)] {
            sent_at.lock().unwrap().insert((ch, i), Instant::now());
            receipts.push((
                (ch, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    let res = settle(receipts, 12).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        wait_until(3, "all processed", || {
            let bk = book.lock().unwrap();
            (0..N).all(|i| bk.acked(1, i) > 0 && bk.acked(2, i) > 0)
        }),
    )
    .await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    errs.extend(check_channel(&bk, 1, N, false));
    errs.extend(check_channel(&bk, 2, N, true));
    if !bk.overtook_redelivery.is_empty() {
        errs.push(format!(
            "{} first deliveries of messages sent >150 ms after an earlier one was nacked came before its redelivery (rule 2), e.g. (channel, nacked, delivered) {:?}",
            bk.overtook_redelivery.len(),
            &bk.overtook_redelivery[..bk.overtook_redelivery.len().min(8)]
        ));
    }
    eprintln!(
        "[cuts+nacks] receipts {:?}; deliveries {}; errors {errs:#?}",
        tally(&res),
        bk.delivered.values().sum::<u32>()
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

// -------------------------------------------------------------------------------------
// 2. Ordered receivers dropped and re-created while the connection is cut
// -------------------------------------------------------------------------------------

/// Promise (`ReceiverOptions::ordered`, rules 1-3, and `RawReceiver`'s drop: "messages
/// still queued when the receiver goes ... come back to the channel's next receiver"):
/// an ordered receiver is dropped five times, each time holding three deliveries
/// unfinished (dropped with it), and re-created at once, while the proxy cuts the
/// connection every 400 ms. Ordered at-least-once and effectively-once: every receipt
/// `Acked`, every message processed (effectively-once exactly once), first deliveries
/// in send order across the receivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_receivers_recreated_while_the_link_is_cut() {
    const N: u64 = 800;
    let b = receiver_node(1202, any_addr(), &[1201], NodeConfig::default()).await;
    let proxy = Arc::new(Proxy::start(b.local_addr().unwrap()).await);
    let a = sender_node(1201, 1202, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let sent_at: SentAt = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b = Arc::new(b);
    let mut workers = Vec::new();
    for (ch, seed) in [(3u32, 5u64), (4, 77)] {
        let (b, book, sent_at) = (b.clone(), book.clone(), sent_at.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = seed;
            for generation in 0..6 {
                let mut rx = b
                    .raw_receiver_with(ChannelId(ch), ReceiverOptions::ordered())
                    .expect("re-register after drop");
                if generation == 5 {
                    spawn_handler(rx, ch, book, seed, CLEAN, Some(sent_at));
                    return;
                }
                let until =
                    tokio::time::Instant::now() + Duration::from_millis(250 + rnd(&mut rng) % 300);
                let mut held = Vec::new();
                while tokio::time::Instant::now() < until {
                    let Ok(Some(d)) = tokio::time::timeout_at(until, rx.recv()).await else {
                        break;
                    };
                    if held.len() < 3 && rnd(&mut rng).is_multiple_of(10) {
                        let i = index(d.message());
                        let eo = d.guarantee() == Guarantee::EffectivelyOnce;
                        book.lock()
                            .unwrap()
                            .on_delivery(ch, d.from(), i, eo, Some(&sent_at));
                        held.push(d);
                    } else {
                        finish(d, ch, &book, &mut rng, CLEAN, Some(&sent_at));
                    }
                }
                eprintln!(
                    "[recreate+cuts] channel {ch} generation {generation}: {} delivered so far, {} held",
                    book.lock().unwrap().delivered.len(),
                    held.len()
                );
                {
                    let mut bk = book.lock().unwrap();
                    for d in &held {
                        bk.failed_at.insert((ch, index(d.message())), Instant::now());
                    }
                }
                drop(rx);
                drop(held);
            }
        }));
    }
    cutter(proxy.clone(), Duration::from_millis(400), stop.clone());
    let alo = raw_sender(&a, 1202, 3, Guarantee::AtLeastOnce);
    let eo = raw_sender(&a, 1202, 4, Guarantee::EffectivelyOnce);
    let mut receipts = Vec::new();
    for i in 0..N {
        for (ch, s) in [(3u32, &alo), (4, &eo)] {
            sent_at.lock().unwrap().insert((ch, i), Instant::now());
            receipts.push((
                (ch, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    let res = settle(receipts, 12).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        within(5, "receiver generations", w).await.unwrap();
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        wait_until(3, "all processed", || {
            let bk = book.lock().unwrap();
            (0..N).all(|i| bk.acked(3, i) > 0 && bk.acked(4, i) > 0)
        }),
    )
    .await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    errs.extend(check_channel(&bk, 3, N, false));
    errs.extend(check_channel(&bk, 4, N, true));
    if !bk.overtook_redelivery.is_empty() {
        errs.push(format!(
            "{} first deliveries of messages sent >150 ms after an earlier one was dropped unfinished came before its redelivery (rule 2), e.g. (channel, dropped, delivered) {:?}",
            bk.overtook_redelivery.len(),
            &bk.overtook_redelivery[..bk.overtook_redelivery.len().min(8)]
        ));
    }
    eprintln!(
        "[recreate+cuts] receipts {:?}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

// -------------------------------------------------------------------------------------
// 3. The sender restarts (new incarnation) mid-stream, through a cutting proxy
// -------------------------------------------------------------------------------------

/// Promise (`ReceiverOptions::ordered`: "a stream is one sending node run on this
/// channel", rule 1 per stream; `Sender::send_with_key`: "any two sends with the same
/// key are processed once within the receiver's dedup horizon"): a sender sends 600
/// keyed effectively-once messages and 600 at-least-once ones on ordered channels, is
/// dropped without shutdown part-way, and a new run of the same node id resends every
/// key (and sends the at-least-once ones again from the start, as a fresh stream),
/// while the connection is cut every 500 ms and the handler nacks 10 %. Every receipt
/// of the last run `Acked`; every key processed exactly once; per sending run first
/// deliveries in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_streams_across_a_sender_restart_keep_order_and_keys_once() {
    const N: u64 = 600;
    let b = receiver_node(1302, any_addr(), &[1301], NodeConfig::default()).await;
    let proxy = Arc::new(Proxy::start(b.local_addr().unwrap()).await);
    let book: SharedBook = Arc::default();
    let faults = Faults {
        nack_pct: 10,
        drop_pct: 0,
    };
    for (ch, seed) in [(5u32, 3u64), (6, 9)] {
        let rx = b
            .raw_receiver_with(ChannelId(ch), ReceiverOptions::ordered())
            .unwrap();
        spawn_handler(rx, ch, book.clone(), seed, faults, None);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cutter(proxy.clone(), Duration::from_millis(500), stop.clone());
    let key = |i: u64| IdKey(13_000_000 + u128::from(i));
    // First run: dropped hard after ~half.
    {
        let a = sender_node(1301, 1302, proxy.addr, NodeConfig::default()).await;
        let alo = raw_sender(&a, 1302, 5, Guarantee::AtLeastOnce);
        let eo = raw_sender(&a, 1302, 6, Guarantee::EffectivelyOnce);
        let mut receipts = Vec::new();
        for i in 0..N / 2 {
            receipts.push(within(10, "send", alo.send(payload(i))).await.unwrap());
            receipts.push(
                within(10, "send", eo.send_with_key(payload(i), key(i)))
                    .await
                    .unwrap(),
            );
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        drop(receipts);
        drop(a);
    }
    let a = sender_node(1301, 1302, proxy.addr, NodeConfig::default()).await;
    let alo = raw_sender(&a, 1302, 5, Guarantee::AtLeastOnce);
    let eo = raw_sender(&a, 1302, 6, Guarantee::EffectivelyOnce);
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push((
            (5u32, i),
            within(10, "send", alo.send(payload(i))).await.unwrap(),
        ));
        receipts.push((
            (6u32, i),
            within(10, "send", eo.send_with_key(payload(i), key(i)))
                .await
                .unwrap(),
        ));
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let res = settle(receipts, 12).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    errs.extend(check_channel(&bk, 5, N, false));
    errs.extend(check_channel(&bk, 6, N, true));
    let runs: HashSet<Origin> = bk.firsts.iter().map(|x| x.1).collect();
    eprintln!(
        "[sender restart] receipts {:?}; sending runs seen {}; errors {errs:#?}",
        tally(&res),
        runs.len()
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

// -------------------------------------------------------------------------------------
// 4. Hinted handoff replays to an ordered receiver that returns
// -------------------------------------------------------------------------------------

/// Promise (`ReceiverOptions::ordered` rule 1: "a message the sender settled without
/// delivering — given up, or handed off — leaves a gap; a hint replayed later travels
/// on the replaying node's own stream"; `Outcome::HandedOff`: "will be replayed, under
/// its original ID, when the target is back"; effectively-once with `DurableDedup`):
/// the receiver (ordered, durable dedup) shuts down mid-stream and stays away until
/// its sender (hinted handoff, defaults) holds it Down, then restarts on the same
/// address and directory. Every receipt `Acked` or `HandedOff`; every message
/// processed (effectively-once exactly once, across the restart); the messages acked
/// directly (not handed off) first delivered in send order; the hint store drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_replay_to_a_returning_ordered_receiver() {
    const N: u64 = 1_600;
    let dirs = tempfile::tempdir().unwrap();
    let dedup = dirs.path().join("dedup");
    let hints = dirs.path().join("hints");
    let addr = free_port();
    let book: SharedBook = Arc::default();
    let start_b = |book: SharedBook| {
        let dedup = dedup.clone();
        async move {
            let b = receiver_node(1402, addr, &[1401], durable_cfg(&dedup)).await;
            for (ch, seed) in [(7u32, 1u64), (8, 2)] {
                let rx = b
                    .raw_receiver_with(ChannelId(ch), ReceiverOptions::ordered())
                    .unwrap();
                spawn_handler(rx, ch, book.clone(), seed, CLEAN, None);
            }
            b
        }
    };
    let b = start_b(book.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.handoff = Some(HandoffConfig::new(&hints));
    let a = sender_node(1401, 1402, addr, cfg).await;
    let alo = raw_sender(&a, 1402, 7, Guarantee::AtLeastOnce);
    let eo = raw_sender(&a, 1402, 8, Guarantee::EffectivelyOnce);
    let t0 = Instant::now();
    let sending = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..N {
            // 200 a second per channel, for 8 s.
            let due = t0 + Duration::from_millis(i * 5);
            tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
            for (ch, s) in [(7u32, &alo), (8, &eo)] {
                match tokio::time::timeout(Duration::from_secs(10), s.send(payload(i))).await {
                    Ok(Ok(r)) => receipts.push(((ch, i), r)),
                    other => panic!("send {ch}/{i}: {other:?}"),
                }
            }
        }
        receipts
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    within(10, "receiver shutdown", b.shutdown()).await;
    drop(b);
    let went = Instant::now();
    let downs = within(12, "sender holds the receiver Down", async {
        loop {
            if a.health(NodeId(1402)) == Some(Health::Down) {
                return went.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = start_b(book.clone()).await;
    let back = t0.elapsed();
    let up = within(10, "sender sees the receiver Up again", async {
        loop {
            if a.health(NodeId(1402)) == Some(Health::Up) {
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let receipts = within(20, "all sent", sending).await.unwrap();
    let res = settle(receipts, 15).await;
    let _ = tokio::time::timeout(
        Duration::from_secs(8),
        wait_until(8, "all processed", || {
            let bk = book.lock().unwrap();
            (0..N).all(|i| bk.acked(7, i) > 0 && bk.acked(8, i) > 0)
        }),
    )
    .await;
    let mut hstats = a.stats().await.unwrap().hints.unwrap();
    let end = Instant::now() + Duration::from_secs(4);
    while hstats.pending != 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        hstats = a.stats().await.unwrap().hints.unwrap();
    }
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| {
        matches!(r, Ok(Outcome::Acked) | Ok(Outcome::HandedOff))
    });
    let direct: HashSet<(u32, u64)> = res
        .iter()
        .filter(|(_, r)| matches!(r, Some(Ok(Outcome::Acked))))
        .map(|(k, _)| *k)
        .collect();
    for (ch, eo) in [(7u32, false), (8, true)] {
        let lost: Vec<u64> = (0..N).filter(|i| bk.acked(ch, *i) == 0).collect();
        if !lost.is_empty() {
            errs.push(format!(
                "channel {ch}: {} never processed, e.g. {:?}",
                lost.len(),
                &lost[..lost.len().min(8)]
            ));
        }
        if eo {
            let twice: Vec<u64> = (0..N).filter(|i| bk.acked(ch, *i) > 1).collect();
            if !twice.is_empty() {
                errs.push(format!(
                    "channel {ch}: {} processed twice, e.g. {:?}",
                    twice.len(),
                    &twice[..twice.len().min(8)]
                ));
            }
        }
        let inv = bk.inversions(|c, i| c == ch && direct.contains(&(c, i)));
        if !inv.is_empty() {
            errs.push(format!(
                "channel {ch}: {} directly acked messages first delivered out of send order, e.g. {:?}",
                inv.len(),
                &inv[..inv.len().min(8)]
            ));
        }
    }
    if hstats.pending != 0 {
        errs.push(format!("hints left: {hstats:?}"));
    }
    eprintln!(
        "[handoff ordered] Down after {downs:?}, back at {back:?}, Up at {up:?}; receipts {:?}; hints {hstats:?}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

// -------------------------------------------------------------------------------------
// 5. A receiver process SIGKILLed after ack_durable: sends, keys and batches
// -------------------------------------------------------------------------------------

const ROLE_ENV: &str = "ORDERING_CHILD_ROLE";

/// Entry point of the child processes; a no-op in a normal test run.
#[test]
fn ordering_child_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "receiver");
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("child needs {k}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr: SocketAddr = env("ORD_ADDR").parse().unwrap();
        let dir = std::path::PathBuf::from(env("ORD_DIR"));
        let log = std::path::PathBuf::from(env("ORD_LOG"));
        let b = receiver_node(1502, addr, &[1501], durable_cfg(&dir)).await;
        let mut inbox = b
            .raw_receiver_with(ChannelId(9), ReceiverOptions::ordered())
            .unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        );
        while let Some(d) = inbox.recv().await {
            let i = index(d.message());
            (&*file)
                .write_all(format!("P {i} {}\n", d.from()).as_bytes())
                .unwrap();
            let file = file.clone();
            tokio::spawn(async move {
                if d.ack_durable().await.is_ok() {
                    (&*file).write_all(format!("C {i}\n").as_bytes()).unwrap();
                }
            });
        }
    });
}

/// A receiver child process, killed when dropped: a failing test must not leave it
/// running (it would hold the test's output pipe open, and its port).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(envs: &[(&str, String)]) -> Child {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "ordering_child_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE_ENV, "receiver")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    Child(c.spawn().expect("spawn child"))
}

/// Per index: the event letters in log order, and the first-`P` order.
fn read_log(log: &Path) -> (HashMap<u64, Vec<char>>, Vec<u64>) {
    let mut m: HashMap<u64, Vec<char>> = HashMap::new();
    let mut firsts = Vec::new();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text.lines() {
        let mut it = line.split(' ');
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(v) = v.parse::<u64>() else { continue };
        let c = k.chars().next().unwrap();
        let e = m.entry(v).or_default();
        if c == 'P' && !e.contains(&'P') {
            firsts.push(v);
        }
        e.push(c);
    }
    (m, firsts)
}

/// Promise (README: "`ack_durable()` ... exactly once, also across a receiver killed at
/// any point after it resolved"; `Delivery::ack_durable`: "a receiver killed after this
/// returns never processes the message again"; ordered rule 1): one sender mixes
/// `send`, `send_with_key`, `send_many` and `send_many_with_keys` (blocks of 40) on an
/// effectively-once channel to an ordered receiver process with durable dedup, which is
/// SIGKILLed twice mid-stream and restarted at once on the same port and directory.
/// Every receipt `Acked`; every message processed; none processed again after its
/// `ack_durable` resolved; first deliveries in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_eo_keys_and_batches_survive_receiver_sigkill_in_order() {
    const BLOCKS: u64 = 80;
    const PER: u64 = 40;
    const N: u64 = BLOCKS * PER;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let addr = free_port();
    let envs = [
        ("ORD_ADDR", addr.to_string()),
        ("ORD_DIR", dir.path().join("dedup").display().to_string()),
        ("ORD_LOG", log.display().to_string()),
    ];
    let mut child = spawn_child(&envs);
    let a = sender_node(1501, 1502, addr, NodeConfig::default()).await;
    let eo = raw_sender(&a, 1502, 9, Guarantee::EffectivelyOnce);
    let sending = tokio::spawn(async move {
        let key = |i: u64| IdKey(15_000_000 + u128::from(i));
        let mut receipts: Vec<(u64, Receipt)> = Vec::new();
        for blk in 0..BLOCKS {
            let ids: Vec<u64> = (blk * PER..(blk + 1) * PER).collect();
            let t = Duration::from_secs(10);
            match blk % 4 {
                0 => {
                    for i in &ids {
                        let r = tokio::time::timeout(t, eo.send(payload(*i))).await;
                        receipts.push((*i, r.expect("send hung").expect("send")));
                    }
                }
                1 => {
                    for i in &ids {
                        let r = tokio::time::timeout(t, eo.send_with_key(payload(*i), key(*i)));
                        receipts.push((*i, r.await.expect("send hung").expect("send")));
                    }
                }
                2 => {
                    let r = tokio::time::timeout(t, eo.send_many(ids.iter().map(|i| payload(*i))));
                    let r = r.await.expect("send_many hung").expect("send_many");
                    receipts.extend(ids.iter().copied().zip(r));
                }
                _ => {
                    let items = ids.iter().map(|i| (payload(*i), key(*i)));
                    let r = tokio::time::timeout(t, eo.send_many_with_keys(items));
                    let r = r.await.expect("send_many_with_keys hung").expect("batch");
                    receipts.extend(ids.iter().copied().zip(r));
                }
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        receipts
    });
    for kill in 0..2 {
        let l2 = log.clone();
        let at = (kill + 1) * N / 4;
        within(
            15,
            "child processing",
            wait_until(15, "processed", move || read_log(&l2).0.len() as u64 >= at),
        )
        .await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        child = spawn_child(&envs);
    }
    let receipts = within(25, "all sent", sending).await.unwrap();
    let res = settle(receipts, 15).await;
    // Give the child up to 5 s to log every `C`, then check what it did. Not every
    // message gets one: a SIGKILL between `ack_durable`'s commit and the `C` write
    // leaves a message settled for good with no `C` (its copy is a duplicate for the
    // next run), so this wait must not fail the test. (Regression: it was a
    // `wait_until` inside a `timeout`, and its own assert fired at the 5 s mark
    // whenever both were due in one poll, likely on a loaded machine; the panic also
    // leaked the child process.)
    let all_committed = || {
        let (m, _) = read_log(&log);
        (0..N).all(|i| m.get(&i).is_some_and(|e| e.contains(&'C')))
    };
    let until = Instant::now() + Duration::from_secs(5);
    while !all_committed() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    a.shutdown().await;
    let (m, firsts) = read_log(&log);
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    let lost: Vec<u64> = (0..N).filter(|i| !m.contains_key(i)).collect();
    if !lost.is_empty() {
        errs.push(format!(
            "{} never processed, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(8)]
        ));
    }
    let mut again: Vec<(u64, String)> = m
        .iter()
        .filter(|(_, e)| {
            e.iter()
                .position(|c| *c == 'C')
                .is_some_and(|ci| e[ci..].contains(&'P'))
        })
        .map(|(i, e)| (*i, e.iter().collect()))
        .collect();
    again.sort();
    if !again.is_empty() {
        errs.push(format!(
            "{} processed again after ack_durable resolved, e.g. {:?}",
            again.len(),
            &again[..again.len().min(8)]
        ));
    }
    let inv: Vec<(u64, u64)> = firsts
        .windows(2)
        .filter(|w| w[1] < w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    if !inv.is_empty() {
        errs.push(format!(
            "{} first deliveries out of send order, e.g. {:?}",
            inv.len(),
            &inv[..inv.len().min(8)]
        ));
    }
    let reprocessed = m
        .values()
        .filter(|e| e.iter().filter(|c| **c == 'P').count() > 1)
        .count();
    let no_c = m.values().filter(|e| !e.contains(&'C')).count();
    eprintln!(
        "[sigkill durable] receipts {:?}; processed {}; seen twice (before C) {reprocessed}; processed without a C {no_c}; errors {errs:#?}",
        tally(&res),
        m.len()
    );
    assert!(errs.is_empty(), "{errs:#?}");
}

// -------------------------------------------------------------------------------------
// 6. More channels than the per-peer stream limit
// -------------------------------------------------------------------------------------

/// Promise (`ProtoConfig::max_streams_per_peer`: "A frame that would open one more
/// first makes room by dropping the peer's idle stream ... its next frame makes it
/// again"; `ReceiverOptions::ordered` rule 1; effectively-once "exactly once if the
/// receipt was `Ok`"): one sender uses 300 channels (ordered receivers; at-least-once
/// and effectively-once alternating) round-robin, one message per channel at a time,
/// 6 rounds of 2 messages, with the handlers nacking 3 % and the connection cut once.
/// Every receipt `Acked`; per channel first deliveries in send order; effectively-once
/// channels process each message exactly once; streams were recycled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_ordered_channels_recycle_streams_without_reordering() {
    const CHANNELS: u32 = 300;
    const ROUNDS: u64 = 6;
    const PER: u64 = 2;
    let b = receiver_node(1602, any_addr(), &[1601], NodeConfig::default()).await;
    let proxy = Proxy::start(b.local_addr().unwrap()).await;
    let a = sender_node(1601, 1602, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let g = |c: u32| {
        if c.is_multiple_of(2) {
            Guarantee::AtLeastOnce
        } else {
            Guarantee::EffectivelyOnce
        }
    };
    let mut senders = Vec::new();
    for c in 0..CHANNELS {
        let ch = 100 + c;
        let rx = b
            .raw_receiver_with(ChannelId(ch), ReceiverOptions::ordered())
            .unwrap();
        let f = Faults {
            nack_pct: 3,
            drop_pct: 0,
        };
        spawn_handler(rx, ch, book.clone(), u64::from(ch) * 7 + 1, f, None);
        senders.push((ch, raw_sender(&a, 1602, ch, g(c))));
    }
    let mut receipts = Vec::new();
    for round in 0..ROUNDS {
        for k in 0..PER {
            for (ch, s) in &senders {
                let i = round * PER + k;
                receipts.push((
                    (*ch, i),
                    within(10, "send", s.send(payload(i))).await.unwrap(),
                ));
            }
        }
        if round == 3 {
            proxy.cut();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = settle(receipts, 15).await;
    let n = ROUNDS * PER;
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        wait_until(3, "all processed", || {
            let bk = book.lock().unwrap();
            (0..CHANNELS).all(|c| (0..n).all(|i| bk.acked(100 + c, i) > 0))
        }),
    )
    .await;
    let st = b.stats().await.unwrap().proto;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    for c in 0..CHANNELS {
        errs.extend(check_channel(
            &bk,
            100 + c,
            n,
            g(c) == Guarantee::EffectivelyOnce,
        ));
    }
    eprintln!(
        "[300 channels] receipts {:?}; recycled {} refused {}; errors ({}) {:#?}",
        tally(&res),
        st.streams_recycled,
        st.streams_refused,
        errs.len(),
        &errs[..errs.len().min(12)]
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(st.streams_recycled > 0, "no stream was recycled: {st:?}");
    assert!(errs.is_empty(), "{:#?}", &errs[..errs.len().min(20)]);
}

/// Promise as above, for effectively-once without application keys while streams are
/// recycled under the receiver's feet: 300 effectively-once channels (unordered),
/// round-robin, 8 rounds of 1 message, each round's receipts awaited before the next
/// (so every stream goes idle and is recycled between rounds), the connection cut in
/// the middle of two rounds. Every receipt `Acked`, every message processed exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_effectively_once_streams_stay_exactly_once_across_cuts() {
    const CHANNELS: u32 = 300;
    const ROUNDS: u64 = 8;
    let b = receiver_node(1702, any_addr(), &[1701], NodeConfig::default()).await;
    let proxy = Proxy::start(b.local_addr().unwrap()).await;
    let a = sender_node(1701, 1702, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let mut senders = Vec::new();
    for c in 0..CHANNELS {
        let ch = 500 + c;
        let rx = b.raw_receiver(ChannelId(ch), false).unwrap();
        spawn_handler(rx, ch, book.clone(), u64::from(ch), CLEAN, None);
        senders.push((ch, raw_sender(&a, 1702, ch, Guarantee::EffectivelyOnce)));
    }
    let mut all = Vec::new();
    for round in 0..ROUNDS {
        let mut receipts = Vec::new();
        for (k, (ch, s)) in senders.iter().enumerate() {
            receipts.push((
                (*ch, round),
                within(10, "send", s.send(payload(round))).await.unwrap(),
            ));
            if (round == 2 || round == 5) && k == CHANNELS as usize / 2 {
                proxy.cut();
            }
        }
        all.extend(settle(receipts, 10).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = b.stats().await.unwrap().proto;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&all, |r| *r == Ok(Outcome::Acked));
    for c in 0..CHANNELS {
        errs.extend(check_channel(&bk, 500 + c, ROUNDS, true));
    }
    eprintln!(
        "[300 eo channels] receipts {:?}; recycled {}; errors ({}) {:#?}",
        tally(&all),
        st.streams_recycled,
        errs.len(),
        &errs[..errs.len().min(12)]
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(st.streams_recycled > 0, "no stream was recycled: {st:?}");
    assert!(errs.is_empty(), "{:#?}", &errs[..errs.len().min(20)]);
}

// -------------------------------------------------------------------------------------
// 7. Channels without a receiver for a while
// -------------------------------------------------------------------------------------

/// Promise (`Stats::no_receiver`: "They are not acknowledged, so a receiver that starts
/// late still gets them"; `ProtoConfig::no_receiver_grace`, default 5 s; ordered rule
/// 3: "refusals before the application sees a message (no receiver ...) rewind the
/// stream, so they keep rule 1"): messages on three channels with no receiver for
/// 2.5 s (an ordered at-least-once, an ordered effectively-once, an at-most-once), then
/// the receivers register and more messages follow. Every acked-guarantee receipt
/// `Acked`, every such message processed (effectively-once once), in send order; every
/// at-most-once receipt resolves (nothing hangs) and its messages sent after the
/// registration are delivered at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_registering_within_the_grace_get_earlier_messages_in_order() {
    const BEFORE: u64 = 150;
    const AFTER: u64 = 150;
    let b = receiver_node(1802, any_addr(), &[1801], NodeConfig::default()).await;
    let a = sender_node(1801, 1802, b.local_addr().unwrap(), NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let chans = [
        (21u32, Guarantee::AtLeastOnce),
        (22, Guarantee::EffectivelyOnce),
        (23, Guarantee::AtMostOnce),
    ];
    let senders: Vec<(u32, Guarantee, RawSender)> = chans
        .iter()
        .map(|(c, g)| (*c, *g, raw_sender(&a, 1802, *c, *g)))
        .collect();
    let mut receipts = Vec::new();
    let t0 = Instant::now();
    for i in 0..BEFORE {
        for (c, _, s) in &senders {
            receipts.push((
                (*c, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(t0.elapsed())).await;
    for (c, _) in chans {
        let opts = if c == 23 {
            ReceiverOptions::unordered()
        } else {
            ReceiverOptions::ordered()
        };
        let rx = b.raw_receiver_with(ChannelId(c), opts).unwrap();
        spawn_handler(rx, c, book.clone(), u64::from(c), CLEAN, None);
    }
    for i in BEFORE..BEFORE + AFTER {
        for (c, _, s) in &senders {
            receipts.push((
                (*c, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let res = settle(receipts, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| r.is_ok());
    let n = BEFORE + AFTER;
    let acked: Vec<_> = res.iter().filter(|((c, _), _)| *c != 23).cloned().collect();
    errs.extend(bad_receipts(&acked, |r| *r == Ok(Outcome::Acked)));
    errs.extend(check_channel(&bk, 21, n, false));
    errs.extend(check_channel(&bk, 22, n, true));
    let amo_twice: Vec<u64> = (0..n)
        .filter(|i| bk.delivered.get(&(23, *i)).copied().unwrap_or(0) > 1)
        .collect();
    if !amo_twice.is_empty() {
        errs.push(format!("at-most-once delivered twice: {amo_twice:?}"));
    }
    let amo_after = (BEFORE..n)
        .filter(|i| bk.delivered.contains_key(&(23, *i)))
        .count();
    eprintln!(
        "[late receivers] receipts {:?}; at-most-once sent after registration delivered {amo_after}/{AFTER}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Promise (`ProtoConfig::no_receiver_grace`: "after [the grace] they are rejected
/// ([`SendError::Rejected`]`{ reason: NoReceiver }` at the sender)"; README "rejected
/// ... the handler sees [it] never"; ordered rule 4: "a message refused for good ... is
/// settled: the stream moves past it and it is never delivered again"): an ordered
/// effectively-once and an ordered at-least-once channel get a message every 100 ms
/// with no receiver for 7 s; the receivers then register and 50 more follow. Every
/// receipt resolves (no hang), as `Acked` or `Rejected { NoReceiver }`; the first
/// messages (sent in the first 4 s) are rejected; every message sent after the
/// registration is `Acked`; no rejected message is ever delivered; the acked ones are
/// processed (effectively-once once), first deliveries in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_registering_after_the_grace_never_see_rejected_messages() {
    let b = receiver_node(1902, any_addr(), &[1901], NodeConfig::default()).await;
    let a = sender_node(1901, 1902, b.local_addr().unwrap(), NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let chans = [
        (31u32, Guarantee::EffectivelyOnce),
        (32, Guarantee::AtLeastOnce),
    ];
    let senders: Vec<(u32, RawSender)> = chans
        .iter()
        .map(|(c, g)| (*c, raw_sender(&a, 1902, *c, *g)))
        .collect();
    let mut receipts = Vec::new();
    let mut early = Vec::new();
    let mut late = Vec::new();
    let t0 = Instant::now();
    let mut i = 0u64;
    while t0.elapsed() < Duration::from_secs(7) {
        for (c, s) in &senders {
            receipts.push((
                (*c, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        if t0.elapsed() < Duration::from_secs(4) {
            early.push(i);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (c, _) in chans {
        let rx = b
            .raw_receiver_with(ChannelId(c), ReceiverOptions::ordered())
            .unwrap();
        spawn_handler(rx, c, book.clone(), u64::from(c), CLEAN, None);
    }
    for _ in 0..50 {
        for (c, s) in &senders {
            receipts.push((
                (*c, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        late.push(i);
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let res = settle(receipts, 6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let no_receiver = Err(SendError::Rejected {
        reason: RejectReason::NoReceiver,
    });
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked) || *r == no_receiver);
    let outcome: HashMap<(u32, u64), Option<Result<Outcome, SendError>>> =
        res.iter().cloned().collect();
    for (c, g) in chans {
        for e in &early {
            if outcome[&(c, *e)].as_ref() != Some(&no_receiver) {
                errs.push(format!(
                    "channel {c}: message {e} sent {} s before the receiver: {:?}",
                    7 - e / 10,
                    outcome[&(c, *e)]
                ));
            }
        }
        for l in &late {
            if outcome[&(c, *l)] != Some(Ok(Outcome::Acked)) {
                errs.push(format!(
                    "channel {c}: message {l} sent after registration: {:?}",
                    outcome[&(c, *l)]
                ));
            }
        }
        for k in 0..i {
            let delivered = bk.delivered.get(&(c, k)).copied().unwrap_or(0);
            match &outcome[&(c, k)] {
                Some(Ok(Outcome::Acked)) => {
                    if bk.acked(c, k) == 0 {
                        errs.push(format!("channel {c}: {k} Acked, never processed"));
                    }
                    if g == Guarantee::EffectivelyOnce && bk.acked(c, k) > 1 {
                        errs.push(format!("channel {c}: {k} processed twice"));
                    }
                }
                _ if delivered > 0 => errs.push(format!(
                    "channel {c}: {k} delivered {delivered} times though its receipt is {:?}",
                    outcome[&(c, k)]
                )),
                _ => {}
            }
        }
        let inv = bk.inversions(|ch, _| ch == c);
        if !inv.is_empty() {
            errs.push(format!("channel {c}: out of send order {inv:?}"));
        }
    }
    eprintln!(
        "[after grace] {i} per channel; receipts {:?}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{:#?}", &errs[..errs.len().min(30)]);
}

/// Promise (`ProtoConfig::no_receiver_grace`: the grace is "counted from the first such
/// message (per channel, since the channel last had a receiver)"): an ordered
/// effectively-once channel first has no receiver for 4 s (messages waiting), then a
/// receiver for 1 s, which is dropped; messages keep coming, and a new receiver
/// registers 3 s after the drop (7 s after the very first message). Nothing is
/// rejected: every receipt `Acked`, every message processed once, in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_restarts_when_a_channel_loses_its_receiver() {
    let b = receiver_node(2002, any_addr(), &[2001], NodeConfig::default()).await;
    let a = sender_node(2001, 2002, b.local_addr().unwrap(), NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let s = raw_sender(&a, 2002, 41, Guarantee::EffectivelyOnce);
    let t0 = Instant::now();
    let mut receipts = Vec::new();
    let mut i = 0u64;
    let mut phase = 0;
    let mut handler: Option<tokio::task::JoinHandle<()>> = None;
    while t0.elapsed() < Duration::from_millis(7_500) {
        let t = t0.elapsed();
        if phase == 0 && t >= Duration::from_secs(4) {
            let rx = b
                .raw_receiver_with(ChannelId(41), ReceiverOptions::ordered())
                .unwrap();
            handler = Some(spawn_handler(rx, 41, book.clone(), 41, CLEAN, None));
            phase = 1;
        } else if phase == 1 && t >= Duration::from_secs(5) {
            let h = handler.take().unwrap();
            h.abort();
            let _ = h.await; // the receiver is dropped with the task
            phase = 2;
        } else if phase == 2 && t >= Duration::from_secs(7) {
            let rx = b
                .raw_receiver_with(ChannelId(41), ReceiverOptions::ordered())
                .unwrap();
            handler = Some(spawn_handler(rx, 41, book.clone(), 42, CLEAN, None));
            phase = 3;
        }
        receipts.push((i, within(10, "send", s.send(payload(i))).await.unwrap()));
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = settle(receipts, 6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    errs.extend(check_channel(&bk, 41, i, true));
    eprintln!(
        "[grace restarts] {i} sent; receipts {:?}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Promise (`ProtoConfig::stream_credit`: "Senders never exceed it ..., so a receiver
/// never refuses a message for lack of room"; `ProtoStats::credit_exceeded`: frames
/// dropped past the credit are "a sender ignoring flow control"; `max_streams_per_peer`:
/// a recycled stream's "next frame makes it again"): an honest default sender whose
/// ordered effectively-once stream was recycled (280 other channels used since) sends a
/// burst of 2 000 on it. Every receipt `Acked`, processed once, in order; the receiver
/// drops none of them as over credit, and the sender retransmits under 1 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_recycled_stream_is_not_dropped_as_over_credit() {
    const OTHERS: u32 = 280;
    const BURST: u64 = 2_000;
    let b = receiver_node(2102, any_addr(), &[2101], NodeConfig::default()).await;
    let a = sender_node(2101, 2102, b.local_addr().unwrap(), NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let rx = b
        .raw_receiver_with(ChannelId(3000), ReceiverOptions::ordered())
        .unwrap();
    spawn_handler(rx, 3000, book.clone(), 5, CLEAN, None);
    let hot = raw_sender(&a, 2102, 3000, Guarantee::EffectivelyOnce);
    let first = within(10, "send", hot.send_many((0..10).map(payload)))
        .await
        .unwrap();
    for r in first {
        assert_eq!(within(10, "warm-up receipt", r).await, Ok(Outcome::Acked));
    }
    let mut others = Vec::new();
    for c in 0..OTHERS {
        let ch = 3001 + c;
        let rx = b.raw_receiver(ChannelId(ch), false).unwrap();
        spawn_handler(rx, ch, book.clone(), u64::from(ch), CLEAN, None);
        let s = raw_sender(&a, 2102, ch, Guarantee::AtLeastOnce);
        others.push(within(10, "send", s.send(payload(0))).await.unwrap());
    }
    for r in others {
        assert_eq!(within(10, "other receipt", r).await, Ok(Outcome::Acked));
    }
    let before_b = b.stats().await.unwrap().proto;
    let before_a = a.stats().await.unwrap().proto;
    assert!(before_b.streams_recycled > 0, "{before_b:?}");
    let t = Instant::now();
    let burst = within(10, "burst", hot.send_many((10..10 + BURST).map(payload)))
        .await
        .unwrap();
    let res = settle((10..10 + BURST).zip(burst).collect(), 12).await;
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_b = b.stats().await.unwrap().proto;
    let after_a = a.stats().await.unwrap().proto;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    errs.extend(check_channel(&bk, 3000, 10 + BURST, true));
    let exceeded = after_b.credit_exceeded - before_b.credit_exceeded;
    let retx = after_a.retransmitted - before_a.retransmitted;
    eprintln!(
        "[recycled burst] took {took:?}; receipts {:?}; credit_exceeded {exceeded}; retransmitted {retx}; recycled {}; errors {errs:#?}",
        tally(&res),
        after_b.streams_recycled
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
    assert_eq!(
        exceeded, 0,
        "an honest sender's messages were dropped as over credit after its stream was recycled"
    );
    // The defect resent everything past the credit (~1 500 of 2 000); a loaded machine
    // may time out part of a burst (README: holding needs an answer within the RTO).
    assert!(retx <= BURST / 4, "{retx} retransmissions for {BURST}");
}

/// Promise (`ReceiverOptions::ordered` rule 4: "a message refused for good
/// (dead-lettered, undecodable) is settled: the stream moves past it and it is never
/// delivered again"; `ReceiverOptions::max_deliveries`: handed to the application that
/// many times, then the receipt fails with `Rejected { reason: DeadLettered }`): an
/// ordered effectively-once and an ordered at-least-once receiver with a limit of 2
/// deliveries, a handler that nacks 30 % of deliveries, and a proxy cutting the
/// connection every 350 ms. Every receipt `Acked` or `DeadLettered`; a dead-lettered
/// message was delivered exactly twice, never processed, and never delivered after its
/// second nack; an `Acked` one was processed (effectively-once once); first deliveries
/// in send order; the node's dead letters name exactly the dead-lettered messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_dead_letters_under_cuts_are_settled_once_and_in_order() {
    const N: u64 = 400;
    let b = receiver_node(2202, any_addr(), &[2201], NodeConfig::default()).await;
    let proxy = Arc::new(Proxy::start(b.local_addr().unwrap()).await);
    let a = sender_node(2201, 2202, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let faults = Faults {
        nack_pct: 30,
        drop_pct: 0,
    };
    let mut letters = b.dead_letters();
    let dead: Arc<Mutex<Vec<(u32, u64, u32)>>> = Arc::default();
    let d2 = dead.clone();
    tokio::spawn(async move {
        while let Some(l) = letters.recv().await {
            d2.lock()
                .unwrap()
                .push((l.channel.0, index(&l.message), l.deliveries));
        }
    });
    for (ch, seed) in [(51u32, 3u64), (52, 4)] {
        let opts = ReceiverOptions::ordered().max_deliveries(Some(2));
        let rx = b.raw_receiver_with(ChannelId(ch), opts).unwrap();
        spawn_handler(rx, ch, book.clone(), seed, faults, None);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cutter(proxy.clone(), Duration::from_millis(350), stop.clone());
    let alo = raw_sender(&a, 2202, 51, Guarantee::AtLeastOnce);
    let eo = raw_sender(&a, 2202, 52, Guarantee::EffectivelyOnce);
    let mut receipts = Vec::new();
    for i in 0..N {
        for (ch, s) in [(51u32, &alo), (52, &eo)] {
            receipts.push((
                (ch, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    let res = settle(receipts, 12).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead_letter = Err(SendError::Rejected {
        reason: RejectReason::DeadLettered,
    });
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked) || *r == dead_letter);
    let mut n_dead = 0;
    for ((ch, i), r) in &res {
        let delivered = bk.delivered.get(&(*ch, *i)).copied().unwrap_or(0);
        let acked = bk.acked(*ch, *i);
        match r {
            Some(Ok(Outcome::Acked)) if acked == 0 || (*ch == 52 && acked > 1) => {
                errs.push(format!("{ch}/{i}: Acked, processed {acked} times"));
            }
            Some(Ok(Outcome::Acked)) => {}
            Some(r) if *r == dead_letter => {
                n_dead += 1;
                if acked > 0 || delivered != 2 {
                    errs.push(format!(
                        "{ch}/{i}: dead-lettered after {delivered} deliveries, processed {acked} times"
                    ));
                }
            }
            _ => {}
        }
    }
    for ch in [51u32, 52] {
        let inv = bk.inversions(|c, _| c == ch);
        if !inv.is_empty() {
            errs.push(format!("channel {ch}: out of send order {inv:?}"));
        }
    }
    let letters = dead.lock().unwrap().len();
    if letters != n_dead {
        errs.push(format!(
            "{n_dead} receipts DeadLettered but {letters} dead letters"
        ));
    }
    eprintln!(
        "[dead letters+cuts] receipts {:?}; letters {letters}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(
        n_dead > 0,
        "no message was dead-lettered: the test did not test"
    );
    assert!(errs.is_empty(), "{:#?}", &errs[..errs.len().min(30)]);
}

/// Promise (`RawReceiver`'s drop: messages still queued "are taken back ..., not
/// nacked, so they do not count towards `ReceiverOptions::max_deliveries` and come
/// back to the channel's next receiver"; ordered rule 3): ordered receivers with a
/// delivery limit of 1 are dropped six times with messages queued (never held
/// unfinished), while the proxy cuts the connection every 400 ms. Nothing is
/// dead-lettered: every receipt `Acked`, every message processed (effectively-once
/// once), first deliveries in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_of_dropped_ordered_receivers_never_use_up_deliveries() {
    const N: u64 = 800;
    let b = Arc::new(receiver_node(2302, any_addr(), &[2301], NodeConfig::default()).await);
    let proxy = Arc::new(Proxy::start(b.local_addr().unwrap()).await);
    let a = sender_node(2301, 2302, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let opts = ReceiverOptions::ordered().max_deliveries(Some(1));
    let mut workers = Vec::new();
    for (ch, seed) in [(61u32, 8u64), (62, 99)] {
        let (b, book) = (b.clone(), book.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = seed;
            for generation in 0..7 {
                let mut rx = b
                    .raw_receiver_with(ChannelId(ch), opts)
                    .expect("re-register after drop");
                if generation == 6 {
                    spawn_handler(rx, ch, book, seed, CLEAN, None);
                    return;
                }
                // Process a few slowly so that more queue up, then go.
                let until =
                    tokio::time::Instant::now() + Duration::from_millis(200 + rnd(&mut rng) % 300);
                let mut got = 0;
                while tokio::time::Instant::now() < until {
                    let Ok(Some(d)) = tokio::time::timeout_at(until, rx.recv()).await else {
                        break;
                    };
                    finish(d, ch, &book, &mut rng, CLEAN, None);
                    got += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                eprintln!("[limit 1, drops] channel {ch} generation {generation}: {got} processed");
                drop(rx);
            }
        }));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cutter(proxy.clone(), Duration::from_millis(400), stop.clone());
    let alo = raw_sender(&a, 2302, 61, Guarantee::AtLeastOnce);
    let eo = raw_sender(&a, 2302, 62, Guarantee::EffectivelyOnce);
    let mut receipts = Vec::new();
    for i in 0..N {
        for (ch, s) in [(61u32, &alo), (62, &eo)] {
            receipts.push((
                (ch, i),
                within(10, "send", s.send(payload(i))).await.unwrap(),
            ));
        }
        if i % 40 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for w in workers {
        within(8, "receiver generations", w).await.unwrap();
    }
    let res = settle(receipts, 12).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = b.stats().await.unwrap().proto;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    errs.extend(check_channel(&bk, 61, N, false));
    errs.extend(check_channel(&bk, 62, N, true));
    eprintln!(
        "[limit 1, drops] receipts {:?}; taken back {}; errors {errs:#?}",
        tally(&res),
        st.deliveries_refused
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{:#?}", &errs[..errs.len().min(30)]);
}

/// Promise (`NodeConfig::shutdown_drain`: "How long `Node::shutdown` waits for
/// unacknowledged messages before spooling them ... (or, without handoff, failing
/// them). Default 5 s"; `Delivery::nack`: "the sender redelivers it soon"): the sender
/// calls `shutdown()` right after sending 300 messages on an ordered effectively-once
/// channel whose handler nacks every message's first delivery, through a proxy that
/// cuts the connection once during the drain. The drain waits for the redeliveries:
/// every receipt `Acked` (none `Shutdown`), each message processed once, in order,
/// and `shutdown()` returns within the drain (plus 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drain_waits_for_nacked_redeliveries_on_an_ordered_channel() {
    const N: u64 = 300;
    let b = receiver_node(2402, any_addr(), &[2401], NodeConfig::default()).await;
    let proxy = Proxy::start(b.local_addr().unwrap()).await;
    let a = sender_node(2401, 2402, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let mut rx = b
        .raw_receiver_with(ChannelId(71), ReceiverOptions::ordered())
        .unwrap();
    let b2 = book.clone();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let i = index(d.message());
            let eo = d.guarantee() == Guarantee::EffectivelyOnce;
            let mut bk = b2.lock().unwrap();
            bk.on_delivery(71, d.from(), i, eo, None);
            if bk.delivered[&(71, i)] == 1 {
                drop(bk);
                d.nack();
            } else {
                *bk.acked.entry((71, i)).or_default() += 1;
                drop(bk);
                d.ack();
            }
        }
    });
    let s = raw_sender(&a, 2402, 71, Guarantee::EffectivelyOnce);
    let receipts = within(10, "send", s.send_many((0..N).map(payload)))
        .await
        .unwrap();
    let t = Instant::now();
    let cut = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        proxy.cut();
        proxy
    });
    within(8, "shutdown within the drain", a.shutdown()).await;
    let took = t.elapsed();
    let _proxy = cut.await.unwrap();
    let res = settle((0..N).zip(receipts).collect(), 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    errs.extend(check_channel(&bk, 71, N, true));
    eprintln!(
        "[drain+nacks] shutdown took {took:?}; receipts {:?}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    b.shutdown().await;
    assert!(errs.is_empty(), "{:#?}", &errs[..errs.len().min(30)]);
}

/// Promise (README, ordered channels: "A duplicate of a message still being processed
/// is answered when the original finishes: acked with it, or delivered in its place if
/// it fails"; `RawReceiver`'s drop: queued messages "are taken back ... and come back
/// to the channel's next receiver"): a first sender run's keyed effectively-once
/// messages sit in a receiver that has not read them (10 held in the handler, the rest
/// queued); that run is dropped for good, and a new run of the same node resends every
/// key (its copies wait for the originals). Then the receiver is dropped — the held
/// ones unfinished, the queued ones taken back — and a new one registered. The old run
/// can never retransmit, so the new run's copies must be delivered in the originals'
/// place: every receipt of the new run `Acked` within 10 s, every key processed exactly
/// once. Ordered and unordered channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_waiting_for_originals_taken_back_from_a_dropped_receiver_are_delivered() {
    const N: u64 = 100;
    let b = receiver_node(2502, any_addr(), &[2501], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let key = |ch: u32, i: u64| IdKey((u128::from(ch) << 64) | u128::from(25_000 + i));
    let chans = [(81u32, true), (82, false)];
    let mut first_rx = Vec::new();
    for (ch, ordered) in chans {
        let opts = if ordered {
            ReceiverOptions::ordered()
        } else {
            ReceiverOptions::unordered()
        };
        first_rx.push((ch, opts, b.raw_receiver_with(ChannelId(ch), opts).unwrap()));
    }
    {
        let a1 = sender_node(2501, 2502, addr, NodeConfig::default()).await;
        let mut receipts = Vec::new();
        for (ch, _) in chans {
            let s = raw_sender(&a1, 2502, ch, Guarantee::EffectivelyOnce);
            let items = (0..N).map(|i| (payload(i), key(ch, i)));
            receipts.push(
                within(10, "send", s.send_many_with_keys(items))
                    .await
                    .unwrap(),
            );
        }
        // Wait until they are queued at the receiver.
        within(10, "queued", async {
            loop {
                if b.stats().await.unwrap().proto.delivered >= 2 * N {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        drop(receipts);
        drop(a1);
    }
    let mut held = Vec::new();
    for (_, _, rx) in first_rx.iter_mut() {
        for _ in 0..10 {
            held.push(within(5, "recv", rx.recv()).await.unwrap());
        }
    }
    let a2 = sender_node(2501, 2502, addr, NodeConfig::default()).await;
    let mut receipts = Vec::new();
    for (ch, _) in chans {
        let s = raw_sender(&a2, 2502, ch, Guarantee::EffectivelyOnce);
        let items = (0..N).map(|i| (payload(i), key(ch, i)));
        let r = within(10, "send", s.send_many_with_keys(items))
            .await
            .unwrap();
        receipts.extend((0..N).map(|i| (ch, i)).zip(r));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parked = b.stats().await.unwrap().proto.in_progress_dropped;
    let book: SharedBook = Arc::default();
    let mut opts_of = Vec::new();
    for (ch, opts, rx) in first_rx {
        drop(rx);
        opts_of.push((ch, opts));
    }
    drop(held);
    for (ch, opts) in opts_of {
        let rx = b.raw_receiver_with(ChannelId(ch), opts).unwrap();
        spawn_handler(rx, ch, book.clone(), u64::from(ch), CLEAN, None);
    }
    let res = settle(receipts, 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    for (ch, _) in chans {
        let lost: Vec<u64> = (0..N).filter(|i| bk.acked(ch, *i) == 0).collect();
        let twice: Vec<u64> = (0..N).filter(|i| bk.acked(ch, *i) > 1).collect();
        if !lost.is_empty() || !twice.is_empty() {
            errs.push(format!(
                "channel {ch}: never processed {} (e.g. {:?}), processed twice {:?}",
                lost.len(),
                &lost[..lost.len().min(8)],
                twice
            ));
        }
    }
    eprintln!(
        "[taken back originals] copies waiting {parked}; receipts {:?}; errors {errs:#?}",
        tally(&res)
    );
    drop(bk);
    assert!(
        parked > 0,
        "no copy waited for its original: the test did not test"
    );
    a2.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Promise (README: at-most-once "delivers on arrival" and loses only "what the
/// network loses (nothing on a healthy link: the sender never overruns the
/// receiver)"; `max_streams_per_peer`: a recycled stream's "next frame makes it
/// again"; a frame finding no idle stream is "dropped ... and counted in
/// `ProtoStats::streams_refused`"): 300 at-most-once channels to ordered receivers on a
/// healthy link, round-robin (paced: 2 ms every 10 sends), 6 rounds of 2 messages with
/// a pause between rounds (so streams go idle and are recycled). Every message is delivered except those counted
/// as refused, at most once, and in send order; no channel is refused for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_on_recycled_ordered_streams_is_delivered_on_a_healthy_link() {
    amo_recycled_case(2601, ReceiverOptions::ordered()).await;
}

/// As `at_most_once_on_recycled_ordered_streams_is_delivered_on_a_healthy_link`, with
/// unordered receivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_on_recycled_unordered_streams_is_delivered_on_a_healthy_link() {
    amo_recycled_case(2701, ReceiverOptions::unordered()).await;
}

async fn amo_recycled_case(a_id: u64, opts: ReceiverOptions) {
    let b_id = a_id + 1;
    const CHANNELS: u32 = 300;
    const ROUNDS: u64 = 6;
    const PER: u64 = 2;
    let b = receiver_node(b_id, any_addr(), &[a_id], NodeConfig::default()).await;
    let a = sender_node(a_id, b_id, b.local_addr().unwrap(), NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let mut senders = Vec::new();
    for c in 0..CHANNELS {
        let ch = 4000 + c;
        let rx = b.raw_receiver_with(ChannelId(ch), opts).unwrap();
        spawn_handler(rx, ch, book.clone(), u64::from(ch), CLEAN, None);
        senders.push((ch, raw_sender(&a, b_id, ch, Guarantee::AtMostOnce)));
    }
    let mut receipts = Vec::new();
    for round in 0..ROUNDS {
        for k in 0..PER {
            for (j, (ch, s)) in senders.iter().enumerate() {
                let i = round * PER + k;
                receipts.push((
                    (*ch, i),
                    within(10, "send", s.send(payload(i))).await.unwrap(),
                ));
                if j % 10 == 9 {
                    // Paced, so that the receiver's handlers keep up and streams go idle.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let res = settle(receipts, 10).await;
    let n = ROUNDS * PER;
    let sent = u64::from(CHANNELS) * n;
    // An at-most-once receipt resolves when the message is written: wait (up to 10 s)
    // until every message is delivered or counted as refused.
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let refused = b.stats().await.unwrap().proto.streams_refused;
        if book.lock().unwrap().delivered.len() as u64 + refused >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = b.stats().await.unwrap().proto;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Sent));
    let delivered: u64 = bk.delivered.len() as u64;
    let twice = bk.delivered.values().filter(|v| **v > 1).count();
    let missing: Vec<(u32, u64)> = (0..CHANNELS)
        .flat_map(|c| (0..n).map(move |i| (4000 + c, i)))
        .filter(|k| !bk.delivered.contains_key(k))
        .collect();
    if delivered + st.streams_refused < sent {
        errs.push(format!(
            "{} of {sent} delivered, {} counted as refused: {} lost uncounted on a healthy link, e.g. {:?}",
            delivered,
            st.streams_refused,
            sent - delivered - st.streams_refused,
            &missing[..missing.len().min(10)]
        ));
    }
    if twice > 0 {
        errs.push(format!("{twice} at-most-once messages delivered twice"));
    }
    // Streams go idle between rounds, so from the second round on every channel has
    // a stream to use: none may be starved for good.
    let starved: Vec<u32> = (0..CHANNELS)
        .map(|c| 4000 + c)
        .filter(|ch| (PER..n).all(|i| !bk.delivered.contains_key(&(*ch, i))))
        .collect();
    if !starved.is_empty() {
        errs.push(format!(
            "{} channels had nothing delivered after their first round (every frame refused), e.g. {:?}",
            starved.len(),
            &starved[..starved.len().min(8)]
        ));
    }
    let inv = bk.inversions(|_, _| true);
    if !inv.is_empty() {
        errs.push(format!(
            "{} out of send order, e.g. {:?}",
            inv.len(),
            &inv[..inv.len().min(8)]
        ));
    }
    eprintln!(
        "[amo recycled, ordered {}] delivered {delivered}/{sent}; recycled {} refused {}; errors {errs:#?}",
        opts.ordered,
        st.streams_recycled, st.streams_refused
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Promise (README: at-most-once "delivers on arrival"; ordered rule 1: "a message the
/// sender settled without delivering ... leaves a gap"; Known limits: "at-most-once
/// messages sent into a broken connection are lost" — those, not the ones after): an
/// ordered receiver on an at-most-once channel while the proxy cuts the connection
/// every 150 ms for 2.5 s (2 KiB payloads, sent in bursts of 50); then the link stays
/// healthy and 200 more messages follow (after a fresh at-least-once round trip shows
/// the link is up). No `send` waits more than 3 s (at-most-once waits only for the
/// receiver's credit), every receipt resolves `Sent`, those 200 are all delivered, once
/// each, and every first delivery is in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_at_most_once_moves_past_messages_lost_in_a_cut() {
    amo_cut_case(2801, ReceiverOptions::ordered()).await;
}

/// As `ordered_at_most_once_moves_past_messages_lost_in_a_cut`, with an unordered
/// receiver (README: at-most-once "delivers on arrival").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_at_most_once_keeps_flowing_after_cuts() {
    amo_cut_case(2901, ReceiverOptions::unordered()).await;
}

async fn amo_cut_case(a_id: u64, opts: ReceiverOptions) {
    let b_id = a_id + 1;
    let b = receiver_node(b_id, any_addr(), &[a_id], NodeConfig::default()).await;
    let proxy = Arc::new(Proxy::start(b.local_addr().unwrap()).await);
    let a = sender_node(a_id, b_id, proxy.addr, NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let rx = b.raw_receiver_with(ChannelId(91), opts).unwrap();
    spawn_handler(rx, 91, book.clone(), 91, CLEAN, None);
    let rx = b.raw_receiver(ChannelId(92), false).unwrap();
    spawn_handler(rx, 92, book.clone(), 92, CLEAN, None);
    let amo = raw_sender(&a, b_id, 91, Guarantee::AtMostOnce);
    let probe = raw_sender(&a, b_id, 92, Guarantee::AtLeastOnce);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cutter(proxy.clone(), Duration::from_millis(150), stop.clone());
    let t0 = Instant::now();
    let mut i = 0u64;
    let mut receipts = Vec::new();
    let mut hung = None;
    // A send waits at most 3 s (at-most-once waits only for the receiver's credit).
    // 2 KiB payloads, so that a cut finds frames in flight.
    let big = |i: u64| {
        let mut v = vec![0u8; 2048];
        v[..8].copy_from_slice(&i.to_be_bytes());
        Bytes::from(v)
    };
    let send = |i: u64| tokio::time::timeout(Duration::from_secs(3), amo.send(big(i)));
    'cuts: while t0.elapsed() < Duration::from_millis(2500) {
        for _ in 0..50 {
            match send(i).await {
                Ok(r) => receipts.push((i, r.unwrap())),
                Err(_) => {
                    hung = Some((i, "while the link was cut"));
                    break 'cuts;
                }
            }
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = within(10, "probe", probe.send(payload(0))).await.unwrap();
    assert_eq!(within(10, "probe receipt", r).await, Ok(Outcome::Acked));
    let healthy_from = i;
    for _ in 0..200 {
        if hung.is_some() {
            break;
        }
        match send(i).await {
            Ok(r) => receipts.push((i, r.unwrap())),
            Err(_) => hung = Some((i, "on a healthy link")),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let res = settle(receipts, 3).await;
    // An at-most-once receipt resolves when the message is written: the ones sent on
    // the healthy link may still be on their way.
    if hung.is_none() {
        wait_delivered(&book, 91, healthy_from..i).await;
    }
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = Vec::new();
    let unresolved = res.iter().filter(|(_, r)| r.is_none()).count();
    if unresolved > 0 {
        errs.push(format!(
            "{unresolved} receipts unresolved 3 s after the last send, e.g. {:?}",
            res.iter().find(|(_, r)| r.is_none()).map(|x| x.0)
        ));
    }
    errs.extend(
        bad_receipts(&res, |r| *r == Ok(Outcome::Sent))
            .into_iter()
            .take(3),
    );
    if let Some((k, when)) = hung {
        errs.push(format!(
            "send of message {k} ({when}, {healthy_from} sent before) still waiting after 3 s"
        ));
    }
    let lost: Vec<u64> = (healthy_from..i)
        .filter(|_| hung.is_none())
        .filter(|k| !bk.delivered.contains_key(&(91, *k)))
        .collect();
    if !lost.is_empty() {
        errs.push(format!(
            "{} of the 200 sent on a healthy link never delivered, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(8)]
        ));
    }
    let twice = (0..i)
        .filter(|k| bk.delivered.get(&(91, *k)).copied().unwrap_or(0) > 1)
        .count();
    if twice > 0 {
        errs.push(format!("{twice} delivered twice"));
    }
    // An unordered receiver delivers on arrival, late frames too (`proto::inbound`:
    // "an unordered stream ... delivers whatever comes within the slack, late or not"),
    // and across a cut the tail of the replaced connection can still reach the node
    // after the first frames of the new one (its reader is aborted, but a poll already
    // running on a preempted worker thread finishes first). So its order is checked
    // among the messages sent on the healthy link, one connection; an ordered one's
    // everywhere. (Regression: under CPU load 8 frames of a cut connection were
    // delivered after 700 later ones, and the unordered case failed.)
    let inv = bk.inversions(|c, k| c == 91 && (opts.ordered || k >= healthy_from));
    if !inv.is_empty() {
        errs.push(format!("out of send order: {:?}", &inv[..inv.len().min(8)]));
    }
    let during = (0..healthy_from)
        .filter(|k| bk.delivered.contains_key(&(91, *k)))
        .count();
    eprintln!(
        "[amo cuts, ordered {}] during cuts {during}/{healthy_from} delivered; errors {errs:#?}",
        opts.ordered
    );
    drop(bk);
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Promise (`ProtoConfig::max_streams_per_peer`: "A frame that would open one more
/// first makes room by dropping the peer's idle stream (nothing in the application or
/// owed)"; the regression note on recycling: a sender that used more channels than the
/// limit over its lifetime must not have "every further channel refused until its
/// receipts failed their deadline"): a sender first uses 300 at-most-once channels
/// (unordered receivers that consume everything at once) for 4 paced rounds, then
/// sends on 10 new at-least-once channels (channel deadline 5 s, the one setting
/// changed). All of those are `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_acked_channels_are_served_after_many_at_most_once_channels() {
    const CHANNELS: u32 = 300;
    let b = receiver_node(3002, any_addr(), &[3001], NodeConfig::default()).await;
    let a = sender_node(3001, 3002, b.local_addr().unwrap(), NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let mut senders = Vec::new();
    for c in 0..CHANNELS {
        let ch = 6000 + c;
        let rx = b.raw_receiver(ChannelId(ch), false).unwrap();
        spawn_handler(rx, ch, book.clone(), u64::from(ch), CLEAN, None);
        senders.push(raw_sender(&a, 3002, ch, Guarantee::AtMostOnce));
    }
    for round in 0..4u64 {
        let mut receipts = Vec::new();
        for (j, s) in senders.iter().enumerate() {
            receipts.push((j, within(10, "send", s.send(payload(round))).await.unwrap()));
            if j % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        settle(receipts, 5).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut receipts = Vec::new();
    for c in 0..10u32 {
        let ch = 7000 + c;
        let rx = b.raw_receiver(ChannelId(ch), false).unwrap();
        spawn_handler(rx, ch, book.clone(), u64::from(ch), CLEAN, None);
        let mut opts = ChannelOptions::new(ChannelId(ch), Guarantee::AtLeastOnce);
        opts.deadline = Some(Duration::from_secs(5));
        let s = a.raw_sender(NodeId(3002), opts).unwrap();
        receipts.push((ch, within(10, "send", s.send(payload(0))).await.unwrap()));
    }
    let res = settle(receipts, 8).await;
    let st = b.stats().await.unwrap().proto;
    let errs = bad_receipts(&res, |r| *r == Ok(Outcome::Acked));
    eprintln!(
        "[after amo channels] receipts {:?}; recycled {} refused {}; errors {errs:#?}",
        tally(&res),
        st.streams_recycled,
        st.streams_refused
    );
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Promise (README: at-most-once "delivers on arrival", loses only "what the network
/// loses (nothing on a healthy link...)"; `Stats::no_receiver`: messages on a channel
/// with no receiver are "counted ... and warned about"; ordered rule 1: a message
/// settled without delivering "leaves a gap"): an ordered receiver registers on an
/// at-most-once channel after 100 messages were sent to it (those may be dropped);
/// 100 more follow on the healthy link after the registration. Those are all delivered,
/// in send order, and every receipt resolves `Sent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_receiver_registering_late_gets_later_at_most_once_messages() {
    let b = receiver_node(3102, any_addr(), &[3101], NodeConfig::default()).await;
    let a = sender_node(3101, 3102, b.local_addr().unwrap(), NodeConfig::default()).await;
    let book: SharedBook = Arc::default();
    let s = raw_sender(&a, 3102, 25, Guarantee::AtMostOnce);
    let mut receipts = Vec::new();
    for i in 0..100u64 {
        receipts.push((i, within(10, "send", s.send(payload(i))).await.unwrap()));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rx = b
        .raw_receiver_with(ChannelId(25), ReceiverOptions::ordered())
        .unwrap();
    spawn_handler(rx, 25, book.clone(), 25, CLEAN, None);
    for i in 100..200u64 {
        receipts.push((i, within(10, "send", s.send(payload(i))).await.unwrap()));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let res = settle(receipts, 5).await;
    // At-most-once receipts resolve when written, not when delivered: wait for the
    // last ones (up to 10 s; a fixed 500 ms was a race on a loaded machine).
    wait_delivered(&book, 25, 100..200).await;
    let st = b.stats().await.unwrap();
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Sent));
    let lost: Vec<u64> = (100..200)
        .filter(|i| !bk.delivered.contains_key(&(25, *i)))
        .collect();
    if !lost.is_empty() {
        errs.push(format!(
            "{} of the 100 sent after the registration never delivered, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(8)]
        ));
    }
    let inv = bk.inversions(|_, _| true);
    if !inv.is_empty() {
        errs.push(format!("out of send order: {inv:?}"));
    }
    eprintln!(
        "[late ordered amo] no_receiver {}; delivered {}; receipts {:?}; errors {errs:#?}",
        st.no_receiver,
        bk.delivered.len(),
        tally(&res)
    );
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Promise as `an_ordered_receiver_registering_late_gets_later_at_most_once_messages`,
/// across a receiver restart: an ordered at-most-once receiver node gets 100 messages,
/// shuts down, and restarts on the same address; once an at-least-once round trip shows
/// the link is back, 100 more follow. Those are all delivered, in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_at_most_once_flows_again_after_the_receiver_restarts() {
    let addr = free_port();
    let book: SharedBook = Arc::default();
    let start = |book: SharedBook| async move {
        let b = receiver_node(3202, addr, &[3201], NodeConfig::default()).await;
        let rx = b
            .raw_receiver_with(ChannelId(26), ReceiverOptions::ordered())
            .unwrap();
        spawn_handler(rx, 26, book.clone(), 26, CLEAN, None);
        let rx = b.raw_receiver(ChannelId(27), false).unwrap();
        spawn_handler(rx, 27, book, 27, CLEAN, None);
        b
    };
    let b = start(book.clone()).await;
    let a = sender_node(3201, 3202, addr, NodeConfig::default()).await;
    let s = raw_sender(&a, 3202, 26, Guarantee::AtMostOnce);
    let probe = raw_sender(&a, 3202, 27, Guarantee::AtLeastOnce);
    let mut receipts = Vec::new();
    for i in 0..100u64 {
        receipts.push((i, within(10, "send", s.send(payload(i))).await.unwrap()));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    within(10, "receiver shutdown", b.shutdown()).await;
    drop(b);
    let b = start(book.clone()).await;
    let r = within(10, "probe", probe.send(payload(0))).await.unwrap();
    assert_eq!(within(10, "probe receipt", r).await, Ok(Outcome::Acked));
    for i in 100..200u64 {
        receipts.push((i, within(10, "send", s.send(payload(i))).await.unwrap()));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let res = settle(receipts, 5).await;
    // At-most-once receipts resolve when written, not when delivered: wait for the
    // last ones (up to 10 s; a fixed 500 ms was a race on a loaded machine).
    wait_delivered(&book, 26, 100..200).await;
    let bk = std::mem::take(&mut *book.lock().unwrap());
    let mut errs = bad_receipts(&res, |r| *r == Ok(Outcome::Sent));
    let lost: Vec<u64> = (100..200)
        .filter(|i| !bk.delivered.contains_key(&(26, *i)))
        .collect();
    if !lost.is_empty() {
        errs.push(format!(
            "{} of the 100 sent after the restart never delivered, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(8)]
        ));
    }
    let before = (0..100)
        .filter(|i| bk.delivered.contains_key(&(26, *i)))
        .count();
    eprintln!(
        "[amo ordered restart] before restart {before}/100; receipts {:?}; errors {errs:#?}",
        tally(&res)
    );
    a.shutdown().await;
    b.shutdown().await;
    assert!(errs.is_empty(), "{errs:#?}");
}
