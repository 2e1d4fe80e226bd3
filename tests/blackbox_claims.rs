//! Black-box checks of user-facing claims in README.md and the crate docs (`src/lib.rs`)
//! that no other suite pins: documented defaults not asserted elsewhere, what happens at
//! the default dead-letter capacity and node credit over real TCP, what the `metrics`
//! counters count, and what the `tracing` events promise (rate limits, the `node` span,
//! per-message events at trace level only).
//!
//! Public API only, real TCP on 127.0.0.1, default `NodeConfig` unless a claim is about
//! a setting. Each test's doc comment quotes the claim it checks and where it is.
//!
//! The metrics and tracing tests share one process-wide recorder and one subscriber
//! (installed on first use; nodes are told apart by their ids), since the nodes' tasks
//! run on a multi-thread runtime.

#[path = "support/ports.rs"]
mod ports;
use ackwire::proto::{CREDIT_SLACK, INITIAL_NODE_CREDIT};
use ackwire::transport::tcp::TcpConfig;
use ackwire::wire::VersionRange;
use ackwire::{
    ChannelId, ChannelOptions, Delivery, Guarantee, IdKey, Node, NodeConfig, NodeId, Outcome,
    Receipt, ReceiverOptions, RejectReason, SendError,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

/// `f`, or a panic naming `what` after `secs` seconds.
async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {secs} s"))
}

/// `(receiver, sender)` over TCP loopback: the receiver admits the sender, the sender
/// knows the receiver's address.
async fn pair_with(rid: u64, sid: u64, rcfg: NodeConfig, scfg: NodeConfig) -> (Node, Node) {
    let b = Node::builder(NodeId(rid))
        .bind(any_addr())
        .allow_peer(NodeId(sid))
        .config(rcfg)
        .build()
        .await
        .expect("receiver builds");
    let a = Node::builder(NodeId(sid))
        .bind(any_addr())
        .peer(NodeId(rid), b.local_addr().unwrap())
        .config(scfg)
        .build()
        .await
        .expect("sender builds");
    (b, a)
}

async fn pair(rid: u64, sid: u64) -> (Node, Node) {
    pair_with(rid, sid, NodeConfig::default(), NodeConfig::default()).await
}

/// Every receipt's outcome, each waited for at most until `secs` from now.
async fn settle(receipts: Vec<Receipt>, secs: u64) -> Vec<Option<Result<Outcome, SendError>>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::with_capacity(receipts.len());
    for r in receipts {
        out.push(tokio::time::timeout_at(deadline, r).await.ok());
    }
    out
}

// ---- a process-wide metrics recorder that never resets its counters ---------------

type MetricKey = (String, Vec<(String, String)>);

#[derive(Clone, Default)]
struct CounterRecorder(Arc<Mutex<HashMap<MetricKey, Arc<AtomicU64>>>>);

impl metrics::Recorder for CounterRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        // `AtomicU64` as a gauge holds the bits of an `f64`.
        metrics::Gauge::from_arc(self.slot(key))
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// The process-wide recorder; install before building the nodes a test reads.
fn recorder() -> &'static CounterRecorder {
    static REC: OnceLock<CounterRecorder> = OnceLock::new();
    REC.get_or_init(|| {
        let r = CounterRecorder::default();
        metrics::set_global_recorder(r.clone()).expect("no other global recorder");
        r
    })
}

impl CounterRecorder {
    /// The one value cell of `key` (counters and gauges have distinct names).
    fn slot(&self, key: &metrics::Key) -> Arc<AtomicU64> {
        let mut labels: Vec<(String, String)> = key
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        labels.sort();
        let id = (key.name().to_string(), labels);
        self.0.lock().unwrap().entry(id).or_default().clone()
    }

    /// The value of the gauge `name` with exactly the labels that include `labels`
    /// (`None` if it was never registered).
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|((n, ls), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, c)| f64::from_bits(c.load(Ordering::Relaxed)))
    }

    /// The sum of every counter named `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, ls), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Every `(labels, value)` of counters named `name` that carry `node = node`.
    fn of_node(&self, name: &str, node: &str) -> Vec<(Vec<(String, String)>, u64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, ls), _)| n == name && ls.iter().any(|(k, v)| k == "node" && v == node))
            .map(|((_, ls), c)| (ls.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Waits (up to `secs`) until `f()` holds.
async fn eventually(secs: u64, what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "{what}: not true within {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- a process-wide tracing subscriber ---------------------------------------------

/// One event at debug level or above: target, level, message, and the `node` field of
/// the innermost `node` span it was emitted in (if any).
#[derive(Clone, Debug)]
struct Ev {
    target: String,
    level: tracing::Level,
    message: String,
    fields: Vec<(String, String)>,
    node_span: Option<String>,
    at: Instant,
}

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
}

#[derive(Default)]
struct Capture {
    next_id: AtomicU64,
    /// Span id → the value of its `node` field, for spans named `node`.
    node_spans: Mutex<HashMap<u64, String>>,
    /// Span id → its metadata, to answer `Span::current()`.
    span_meta: Mutex<HashMap<u64, &'static tracing::Metadata<'static>>>,
    events: Mutex<Vec<Ev>>,
    /// Callsites on the `ackwire::message` target at a level other than trace.
    message_above_trace: Mutex<Vec<String>>,
}

thread_local! {
    static ENTERED: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl tracing::Subscriber for &'static Capture {
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if meta.target().starts_with("ackwire::message") && *meta.level() != tracing::Level::TRACE {
            self.message_above_trace.lock().unwrap().push(format!(
                "{} {} {}",
                meta.level(),
                meta.target(),
                meta.name()
            ));
        }
        // Trace-level callsites (per-message events and `stream` spans) are not needed
        // here: leave them off so the other tests do not pay for them.
        if *meta.level() == tracing::Level::TRACE {
            tracing::subscriber::Interest::never()
        } else {
            tracing::subscriber::Interest::always()
        }
    }
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() != tracing::Level::TRACE
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.span_meta.lock().unwrap().insert(id, attrs.metadata());
        if attrs.metadata().name() == "node" {
            let mut f = Fields::default();
            attrs.record(&mut f);
            if let Some((_, v)) = f.0.into_iter().find(|(k, _)| k == "node") {
                self.node_spans.lock().unwrap().insert(id, v);
            }
        }
        tracing::span::Id::from_u64(id)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        if meta.target().starts_with("ackwire::message") && *meta.level() != tracing::Level::TRACE {
            self.message_above_trace.lock().unwrap().push(format!(
                "{} {} {}",
                meta.level(),
                meta.target(),
                meta.name()
            ));
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let message =
            f.0.iter()
                .find(|(k, _)| k == "message")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
        let node_span = ENTERED.with(|e| {
            let spans = self.node_spans.lock().unwrap();
            e.borrow()
                .iter()
                .rev()
                .find_map(|id| spans.get(id).cloned())
        });
        self.events.lock().unwrap().push(Ev {
            target: meta.target().to_string(),
            level: *meta.level(),
            message,
            fields: f.0,
            node_span,
            at: Instant::now(),
        });
    }
    /// The innermost entered span, as a real subscriber answers it: the transport
    /// spawns its tasks in `Span::current()`.
    fn current_span(&self) -> tracing_core::span::Current {
        let top = ENTERED.with(|e| e.borrow().last().copied());
        let meta = top.and_then(|id| Some((id, *self.span_meta.lock().unwrap().get(&id)?)));
        match meta {
            Some((id, meta)) => {
                tracing_core::span::Current::new(tracing::span::Id::from_u64(id), meta)
            }
            None => tracing_core::span::Current::none(),
        }
    }
    fn enter(&self, id: &tracing::span::Id) {
        ENTERED.with(|e| e.borrow_mut().push(id.into_u64()));
    }
    fn exit(&self, id: &tracing::span::Id) {
        ENTERED.with(|e| {
            let mut e = e.borrow_mut();
            if let Some(i) = e.iter().rposition(|x| *x == id.into_u64()) {
                e.remove(i);
            }
        });
    }
}

/// The process-wide subscriber; install before building the nodes a test watches.
fn capture() -> &'static Capture {
    static CAP: OnceLock<&'static Capture> = OnceLock::new();
    CAP.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::default());
        tracing::subscriber::set_global_default(c).expect("no other global subscriber");
        c
    })
}

impl Capture {
    /// Warn-level events since `since` whose message contains `needle` (tests tell
    /// their nodes apart by the `node` span or the fields).
    fn warns(&self, needle: &str, since: Instant) -> Vec<Ev> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e.level == tracing::Level::WARN && e.message.contains(needle) && e.at >= since
            })
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------------

/// Stated defaults that `tests/blackbox/durability.rs::s4_documented_defaults` does not
/// pin:
/// - README "Using it": "inbound streams per peer (`max_streams_per_peer`, 256 ...)".
/// - README "How it works", dedup limits table: "live streams of one sending node
///   (`max_streams_per_node`) | 4 096".
/// - README "Known limits": "its queue keeps at most `queue_bound` (16 384) frames";
///   "Timers are tuned for a LAN (initial and minimum RTO 200 ms)".
/// - README "How it works": "plus `CREDIT_SLACK` (256)"; node credit "plus 1 024 after a
///   reconnection"; "**Failure detection** (`detector`): phi-accrual, threshold 8".
/// - README "Upgrading": "`TcpConfig::versions`, default: every version the build
///   speaks"; "this build | 1..=4".
/// - README "Replica groups": "at most `max_attempts` (8) times"; table: "`member_wait`
///   (default 10 s)"; `DnsMembers` "re-resolved every 10 s".
#[test]
fn defaults_stated_in_the_docs_that_no_other_test_pins() {
    let c = NodeConfig::default();
    assert_eq!(c.proto.max_streams_per_peer, 256);
    assert_eq!(c.dedup.max_streams_per_node, 4096);
    assert_eq!(c.proto.rtt.initial_rto, Duration::from_millis(200));
    assert_eq!(c.proto.rtt.min_rto, Duration::from_millis(200));
    assert_eq!(c.detector.threshold, 8.0);
    assert_eq!(CREDIT_SLACK, 256);
    assert_eq!(INITIAL_NODE_CREDIT, 1024);
    let t = TcpConfig::default();
    assert_eq!(t.queue_bound, 16_384);
    assert_eq!(t.versions, VersionRange::SUPPORTED);
    assert_eq!((t.versions.min, t.versions.max), (1, 5));
    let g = ackwire::group::GroupConfig::new(ChannelId(1));
    assert_eq!(g.max_attempts, 8);
    assert_eq!(g.member_wait, Duration::from_secs(10));
    assert_eq!(
        ackwire::group::DnsMembers::DEFAULT_REFRESH,
        Duration::from_secs(10)
    );
}

// ---------------------------------------------------------------------------------
// Limits at their defaults, over TCP
// ---------------------------------------------------------------------------------

/// README table, dead-lettered row: "the dead-letter queue is bounded (default 10 000,
/// oldest dropped and counted)"; `Stats::dead_letters_dropped`. With the default
/// capacity, 10 005 undecodable payloads (a typed `u8` receiver given three bytes:
/// "leaves bytes over" is undecodable) and nobody draining the letters: exactly 5
/// dropped and counted, the 10 000 newest kept, the oldest kept being message #5; every
/// receipt `Rejected { Undecodable }`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_dead_letter_queue_keeps_10_000_and_drops_the_oldest_counted() {
    const N: u16 = 10_005;
    let (b, a) = pair(7102, 7101).await;
    let mut dead = b.dead_letters();
    let mut inbox = b.receiver::<u8>(ChannelId(71), false).unwrap();
    // recv() decodes (and dead-letters) junk until a good message arrives.
    let good = tokio::spawn(async move {
        inbox.recv().await.map(|d| {
            let v = *d.message();
            d.ack();
            v
        })
    });
    let out = a
        .raw_sender(
            NodeId(7102),
            ChannelOptions::new(ChannelId(71), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let payloads: Vec<Bytes> = (0..N)
        .map(|i| {
            let [lo, hi] = i.to_le_bytes();
            Bytes::from(vec![1u8, lo, hi])
        })
        .collect();
    let receipts = within(20, "send 10 005", out.send_many(payloads))
        .await
        .unwrap();
    let outcomes = settle(receipts, 15).await;
    let undecodable = Some(Err(SendError::Rejected {
        reason: RejectReason::Undecodable,
    }));
    let bad: Vec<(usize, &Option<Result<Outcome, SendError>>)> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| **o != undecodable)
        .take(3)
        .collect();
    assert!(
        bad.is_empty(),
        "receipts not Rejected(Undecodable): {bad:?}"
    );
    // The good message lets recv() return.
    within(5, "good message", async {
        out.send(Bytes::from_static(&[7])).await.unwrap().await
    })
    .await
    .unwrap();
    assert_eq!(within(5, "recv", good).await.unwrap(), Some(7));
    let s = within(5, "stats", b.stats()).await.unwrap();
    assert_eq!(s.decode_failed, u64::from(N));
    assert_eq!(
        s.dead_letters_dropped, 5,
        "10 005 letters into the default queue of 10 000"
    );
    let mut kept = Vec::new();
    while let Some(l) = dead.try_recv() {
        kept.push(l);
    }
    assert_eq!(kept.len(), 10_000, "letters kept");
    let first = &kept[0].message;
    assert_eq!(
        u16::from_le_bytes([first[1], first[2]]),
        5,
        "the oldest kept letter is message #5 (#0..#4 dropped)"
    );
}

/// README "How it works", window and credit: "each sending node gets node credit for all
/// its streams together (`ProtoConfig::node_credit`, default 16 384 messages ...):
/// however many streams a peer opens, the receiver holds at most that many of its
/// messages, plus 1 024 after a reconnection". `tests/integration/node_credit.rs` checks it on the
/// in-memory network; here over TCP with defaults: 8 channels × 3 000 at-least-once
/// messages to an application that holds every delivery. Once the flow settles, at
/// most 16 384 + 1 024 are held; after the application acks everything, every receipt
/// is `Acked` and each message was delivered once.
/// Observability: "`ackwire_node_credit_waits_total` ... transmissions that waited for
/// the receiver's node credit" counts the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_credit_bounds_what_one_sender_has_held_across_eight_channels_over_tcp() {
    let rec = recorder();
    const CHANNELS: u32 = 8;
    const PER: u64 = 3_000;
    let (b, a) = pair(7202, 7201).await;
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    for c in 0..CHANNELS {
        let mut inbox = b.receiver::<u64>(ChannelId(720 + c), false).unwrap();
        let held = held.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                held.lock().unwrap().push(d);
            }
        });
    }
    let mut sends = Vec::new();
    for c in 0..CHANNELS {
        let out = a
            .sender::<u64>(
                NodeId(7202),
                ChannelOptions::new(ChannelId(720 + c), Guarantee::AtLeastOnce),
            )
            .unwrap();
        sends.push(tokio::spawn(async move {
            let mut r = Vec::new();
            for i in 0..PER {
                r.push(out.send(&i).await.unwrap());
            }
            r
        }));
    }
    // Let the flow reach its bound, then watch it stay there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(held.lock().unwrap().len() as u64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bound = NodeConfig::default().proto.node_credit + INITIAL_NODE_CREDIT;
    assert!(
        peak <= bound,
        "receiver holds {peak} messages of one sender; documented bound {bound}"
    );
    assert!(peak > 0, "nothing arrived");
    // Release: ack everything held and everything that comes after.
    let releaser = {
        let held = held.clone();
        tokio::spawn(async move {
            loop {
                let batch: Vec<Delivery<u64>> = std::mem::take(&mut *held.lock().unwrap());
                let n = batch.len();
                for d in batch {
                    d.ack();
                }
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut receipts = Vec::new();
    for s in sends {
        receipts.extend(within(15, "sends", s).await.unwrap());
    }
    let outcomes = settle(receipts, 12).await;
    releaser.abort();
    let acked = outcomes
        .iter()
        .filter(|o| **o == Some(Ok(Outcome::Acked)))
        .count() as u64;
    assert_eq!(acked, u64::from(CHANNELS) * PER, "every receipt Acked");
    let st = within(5, "stats", b.stats()).await.unwrap();
    assert_eq!(
        st.proto.delivered,
        u64::from(CHANNELS) * PER,
        "delivered once each"
    );
    // Counters are copied out about once a second.
    eventually(4, "node credit waits counted", || {
        rec.sum("ackwire_node_credit_waits_total", &[("node", "n7201")]) > 0
    })
    .await;
}

// ---------------------------------------------------------------------------------
// Metrics: what the counters count
// ---------------------------------------------------------------------------------

/// README "Observability": "`ackwire_messages_given_up_total` | counter | node, peer,
/// channel | messages whose retries ran out (deadline or attempts), then handed off or
/// failed"; "Every metric has the label `node` (this node's id, e.g. `n1`)". A channel
/// deadline of 1 s to a handler that holds the delivery: the receipt fails with
/// `Deadline` and the counter of (n7301, n7302, 73) is 1; the `ackwire_messages_in_flight`
/// gauge ("messages accepted by `send` whose receipt has not resolved yet") is back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_up_messages_are_counted_per_peer_and_channel() {
    let rec = recorder();
    let (b, a) = pair(7302, 7301).await;
    let mut inbox = b.raw_receiver(ChannelId(73), false).unwrap();
    let mut opts = ChannelOptions::new(ChannelId(73), Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(1));
    let out = a.raw_sender(NodeId(7302), opts).unwrap();
    let r = out.send(Bytes::from_static(b"slow")).await.unwrap();
    let held = within(5, "delivery", inbox.recv()).await.unwrap();
    let res = within(8, "receipt", r).await;
    assert!(
        matches!(res, Err(SendError::Deadline { .. })),
        "receipt of a held message past its 1 s deadline: {res:?}"
    );
    drop(held);
    let labels = [("node", "n7301"), ("peer", "n7302"), ("channel", "73")];
    eventually(3, "given_up counted", || {
        rec.sum("ackwire_messages_given_up_total", &labels) >= 1
    })
    .await;
    assert_eq!(rec.sum("ackwire_messages_given_up_total", &labels), 1);
    assert_eq!(rec.sum("ackwire_messages_sent_total", &labels), 1);
    assert_eq!(rec.sum("ackwire_messages_acked_total", &labels), 0);
    // "`ackwire_messages_in_flight` | gauge | ... | messages accepted by `send` whose
    // receipt has not resolved yet": the failed receipt has resolved.
    eventually(3, "in-flight gauge back to 0", || {
        rec.gauge("ackwire_messages_in_flight", &labels) == Some(0.0)
    })
    .await;
}

/// README table, rejected row: "no receiver on the channel after a 5 s grace period";
/// "Messages on a channel without a receiver are counted in `Stats::no_receiver`";
/// Observability: "`ackwire_messages_rejected_total` | ... | `reason` = `no_receiver`".
/// One at-least-once message to a channel nobody receives on: rejected with
/// `NoReceiver` no earlier than the grace (allowing 0.5 s of slack) and well before the
/// 30 s deadline, counted once under reason `no_receiver`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_receiver_rejection_comes_after_the_grace_and_is_counted_by_reason() {
    let rec = recorder();
    let (b, a) = pair(7402, 7401).await;
    let out = a
        .raw_sender(
            NodeId(7402),
            ChannelOptions::new(ChannelId(74), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let started = Instant::now();
    let r = out.send(Bytes::from_static(b"x")).await.unwrap();
    let res = within(15, "receipt", r).await;
    let took = started.elapsed();
    assert_eq!(
        res,
        Err(SendError::Rejected {
            reason: RejectReason::NoReceiver
        })
    );
    assert!(
        took >= Duration::from_millis(4500),
        "rejected after {took:?}, before the 5 s grace"
    );
    let s = within(5, "stats", b.stats()).await.unwrap();
    assert!(s.no_receiver >= 1, "Stats::no_receiver = {}", s.no_receiver);
    let labels = [
        ("node", "n7401"),
        ("peer", "n7402"),
        ("channel", "74"),
        ("reason", "no_receiver"),
    ];
    eventually(3, "rejected counted", || {
        rec.sum("ackwire_messages_rejected_total", &labels) >= 1
    })
    .await;
    assert_eq!(rec.sum("ackwire_messages_rejected_total", &labels), 1);
}

/// README "Observability": "`ackwire_messages_rejected_total` | ... | `reason` = ...
/// `type_mismatch`"; README "Misuse": "a typed `Receiver<U>` whose type or codec differs
/// rejects it before decoding (`Rejected { reason: TypeMismatch }`)". A `String` sent to
/// a `u64` receiver: counted once under reason `type_mismatch`, never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_mismatch_is_counted_under_its_reason() {
    let rec = recorder();
    let (b, a) = pair(7502, 7501).await;
    let mut inbox = b.receiver::<u64>(ChannelId(75), false).unwrap();
    let out = a
        .sender::<String>(
            NodeId(7502),
            ChannelOptions::new(ChannelId(75), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = out.send(&"not a number".to_string()).await.unwrap();
    assert_eq!(
        within(10, "receipt", r).await,
        Err(SendError::Rejected {
            reason: RejectReason::TypeMismatch
        })
    );
    let labels = [
        ("node", "n7501"),
        ("peer", "n7502"),
        ("channel", "75"),
        ("reason", "type_mismatch"),
    ];
    eventually(3, "rejected counted", || {
        rec.sum("ackwire_messages_rejected_total", &labels) >= 1
    })
    .await;
    assert_eq!(rec.sum("ackwire_messages_rejected_total", &labels), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), inbox.recv())
            .await
            .is_err(),
        "a mismatched message was delivered"
    );
}

/// README "Observability": sender side "`ackwire_messages_rejected_total` ... `reason` =
/// ... `undecodable`", receiver side "`ackwire_dead_letters_total` | counter | node,
/// peer, channel, reason | receiving: messages put in the dead letters: `reason` =
/// `max_deliveries`, `undecodable`" with `peer` = "the sender when receiving". One
/// payload a typed receiver cannot decode: one rejection counted at the sender, one
/// dead letter counted at the receiver under (n7602, peer n7601, 76, undecodable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_payload_is_counted_at_both_ends_under_its_reason() {
    let rec = recorder();
    let (b, a) = pair(7602, 7601).await;
    let mut inbox = b.receiver::<u8>(ChannelId(76), false).unwrap();
    let good = tokio::spawn(async move {
        inbox.recv().await.map(|d| {
            let v = *d.message();
            d.ack();
            v
        })
    });
    let out = a
        .raw_sender(
            NodeId(7602),
            ChannelOptions::new(ChannelId(76), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = out.send(Bytes::from_static(&[1, 2, 3])).await.unwrap();
    assert_eq!(
        within(10, "receipt", r).await,
        Err(SendError::Rejected {
            reason: RejectReason::Undecodable
        })
    );
    let ok = out.send(Bytes::from_static(&[9])).await.unwrap();
    assert_eq!(within(10, "good receipt", ok).await, Ok(Outcome::Acked));
    assert_eq!(within(5, "recv", good).await.unwrap(), Some(9));
    let at_a = [
        ("node", "n7601"),
        ("peer", "n7602"),
        ("channel", "76"),
        ("reason", "undecodable"),
    ];
    let at_b = [
        ("node", "n7602"),
        ("peer", "n7601"),
        ("channel", "76"),
        ("reason", "undecodable"),
    ];
    eventually(3, "counted at both ends", || {
        rec.sum("ackwire_messages_rejected_total", &at_a) >= 1
            && rec.sum("ackwire_dead_letters_total", &at_b) >= 1
    })
    .await;
    assert_eq!(rec.sum("ackwire_messages_rejected_total", &at_a), 1);
    assert_eq!(rec.sum("ackwire_dead_letters_total", &at_b), 1);
}

/// README "Observability": "`ackwire_credit_waits_total` | counter | node, peer, channel
/// | first transmissions that waited for the receiver's stream credit (copied like
/// retransmissions)"; "How it works": "The receiver grants each stream credit
/// (`ProtoConfig::stream_credit`, default 4 096 messages) ...: a message's first
/// transmission waits until it is within the credit". 6 000 messages on one stream to
/// an application that holds them all: at most 4 096 are held, the wait is counted, and
/// after the application acks, all are `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_stream_credit_is_counted_and_bounds_what_is_held() {
    let rec = recorder();
    const N: u64 = 6_000;
    let (b, a) = pair(7702, 7701).await;
    let mut inbox = b.receiver::<u64>(ChannelId(77), false).unwrap();
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    {
        let held = held.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                held.lock().unwrap().push(d);
            }
        });
    }
    let out = a
        .sender::<u64>(
            NodeId(7702),
            ChannelOptions::new(ChannelId(77), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let sending = tokio::spawn(async move {
        let mut r = Vec::new();
        for i in 0..N {
            r.push(out.send(&i).await.unwrap());
        }
        r
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n_held = held.lock().unwrap().len() as u64;
    assert!(
        n_held <= NodeConfig::default().proto.stream_credit,
        "held {n_held} of one stream, credit 4 096"
    );
    let labels = [("node", "n7701"), ("peer", "n7702"), ("channel", "77")];
    eventually(4, "credit waits counted", || {
        rec.sum("ackwire_credit_waits_total", &labels) > 0
    })
    .await;
    let releaser = {
        let held = held.clone();
        tokio::spawn(async move {
            loop {
                let batch: Vec<Delivery<u64>> = std::mem::take(&mut *held.lock().unwrap());
                let n = batch.len();
                for d in batch {
                    d.ack();
                }
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let receipts = within(15, "sends", sending).await.unwrap();
    let outcomes = settle(receipts, 10).await;
    releaser.abort();
    assert!(
        outcomes.iter().all(|o| *o == Some(Ok(Outcome::Acked))),
        "every receipt Acked"
    );
}

/// README "Observability", `ackwire_messages_rejected_total`: "`reason` = `no_receiver`,
/// `unauthorized`, `undecodable`, `dead_lettered`, `type_mismatch`, `stream_retired`,
/// `key_table_full`, `other`". A 64-slot key table (the setting
/// `tests/blackbox/keys.rs` uses) and 200 distinct keys: every rejection is counted, and
/// every reason label counted at the sender is a documented one. (Found when written:
/// `key_table_full` was counted but missing from the README's list.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_reason_label_is_one_the_readme_lists() {
    let rec = recorder();
    let mut rcfg = NodeConfig::default();
    rcfg.dedup.horizon = Duration::from_secs(2);
    rcfg.dedup.table_capacity = 64;
    rcfg.dedup.table_budget_bytes = 64 * ackwire::dedup::BYTES_PER_SLOT;
    let (b, a) = pair_with(7802, 7801, rcfg, NodeConfig::default()).await;
    let mut inbox = b.raw_receiver(ChannelId(78), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.ack();
        }
    });
    let out = a
        .raw_sender(
            NodeId(7802),
            ChannelOptions::new(ChannelId(78), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut receipts = Vec::new();
    for k in 0..200u64 {
        receipts.push(
            out.send_with_key(
                Bytes::from(k.to_le_bytes().to_vec()),
                IdKey(7_800_000 + u128::from(k)),
            )
            .await
            .unwrap(),
        );
    }
    let outcomes = settle(receipts, 12).await;
    let full = outcomes
        .iter()
        .filter(|o| {
            **o == Some(Err(SendError::Rejected {
                reason: RejectReason::KeyTableFull,
            }))
        })
        .count();
    assert!(full > 0, "a 64-slot table refused none of 200 keys");
    tokio::time::sleep(Duration::from_millis(300)).await;
    const LISTED: [&str; 8] = [
        "no_receiver",
        "unauthorized",
        "undecodable",
        "dead_lettered",
        "type_mismatch",
        "stream_retired",
        "key_table_full",
        "other",
    ];
    let counted = rec.of_node("ackwire_messages_rejected_total", "n7801");
    let total: u64 = counted.iter().map(|(_, v)| v).sum();
    assert_eq!(
        total, full as u64,
        "every KeyTableFull rejection counted: {counted:?}"
    );
    let undocumented: Vec<String> = counted
        .iter()
        .filter(|(_, v)| *v > 0)
        .filter_map(|(ls, _)| {
            ls.iter()
                .find(|(k, _)| k == "reason")
                .map(|(_, v)| v.clone())
        })
        .filter(|r| !LISTED.contains(&r.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "reason labels not listed in the README: {undocumented:?}"
    );
}

/// README "Observability": "`ackwire_messages_delivered_total` | ... | receiving:
/// messages handed to the channel's receiver (redeliveries included)"; `Node::stats()`
/// "delivered". One message nacked twice then acked: three deliveries counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_count_as_deliveries() {
    let rec = recorder();
    let (b, a) = pair(7902, 7901).await;
    let mut inbox = b.raw_receiver(ChannelId(79), false).unwrap();
    let out = a
        .raw_sender(
            NodeId(7902),
            ChannelOptions::new(ChannelId(79), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = out.send(Bytes::from_static(b"again")).await.unwrap();
    for _ in 0..2 {
        within(5, "delivery", inbox.recv()).await.unwrap().nack();
    }
    within(5, "delivery", inbox.recv()).await.unwrap().ack();
    assert_eq!(within(5, "receipt", r).await, Ok(Outcome::Acked));
    let s = within(5, "stats", b.stats()).await.unwrap();
    assert_eq!(s.proto.delivered, 3, "Stats delivered");
    let labels = [("node", "n7902"), ("peer", "n7901"), ("channel", "79")];
    eventually(3, "delivered counted", || {
        rec.sum("ackwire_messages_delivered_total", &labels) >= 3
    })
    .await;
    assert_eq!(rec.sum("ackwire_messages_delivered_total", &labels), 3);
}

// ---------------------------------------------------------------------------------
// Tracing
// ---------------------------------------------------------------------------------

/// README "Observability", tracing table: "`ackwire::node` | warn / error | ... message
/// on a channel with no receiver (... at most once a second)"; "The driver runs inside a
/// span `node` with the field `node` (the node's run, `n1#<incarnation>`), so every
/// event below carries it". 300 at-least-once messages to a channel nobody receives on,
/// over 2.5 s: the receiving node warns at most once per started second, on an
/// `ackwire::node` target, inside its `node` span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_receiver_warnings_are_rate_limited_and_carry_the_node_span() {
    let cap = capture();
    let since = Instant::now();
    let (b, a) = pair(8002, 8001).await;
    let out = a
        .raw_sender(
            NodeId(8002),
            ChannelOptions::new(ChannelId(80), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..300u64 {
        receipts.push(
            out.send(Bytes::from(i.to_le_bytes().to_vec()))
                .await
                .unwrap(),
        );
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let elapsed = since.elapsed();
    let s = within(5, "stats", b.stats()).await.unwrap();
    // Every message within the stream's initial credit (256) arrives and is counted;
    // the rest wait for credit, which a channel without a receiver grants only once
    // it rejects (after the 5 s grace). Meanwhile the silent stream's timers send a
    // probe now and then (README "How it works"), so arrivals go on past the first
    // second.
    assert!(s.no_receiver > 256, "no_receiver = {}", s.no_receiver);
    let mine: Vec<Ev> = cap
        .warns("no receiver", since)
        .into_iter()
        .filter(|e| {
            e.node_span
                .as_deref()
                .is_some_and(|n| n.starts_with("n8002#"))
        })
        .collect();
    let all = cap.warns("no receiver", since);
    assert!(
        !mine.is_empty(),
        "no no-receiver warning inside node n8002's span; warnings seen: {all:?}"
    );
    let allowed = elapsed.as_secs() + 1;
    assert!(
        mine.len() as u64 <= allowed,
        "{} warnings in {elapsed:?} (at most once a second)",
        mine.len()
    );
    assert!(
        mine.iter().all(|e| e.target.starts_with("ackwire::node")),
        "{mine:?}"
    );
    drop(receipts);
}

/// README "Observability", tracing table: "`ackwire::node` | warn / error | ...
/// undecodable payload ... (both at most once a second)". 300 undecodable payloads
/// within about 2 s: the warnings about them number at most one per started second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_warnings_are_rate_limited() {
    let cap = capture();
    let since = Instant::now();
    let (b, a) = pair(8102, 8101).await;
    let mut inbox = b.receiver::<u8>(ChannelId(81), false).unwrap();
    let good = tokio::spawn(async move {
        inbox.recv().await.map(|d| {
            let v = *d.message();
            d.ack();
            v
        })
    });
    let out = a
        .raw_sender(
            NodeId(8102),
            ChannelOptions::new(ChannelId(81), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let receipts = out
        .send_many((0..300u16).map(|i| {
            let [lo, hi] = i.to_le_bytes();
            Bytes::from(vec![1u8, lo, hi])
        }))
        .await
        .unwrap();
    let outcomes = settle(receipts, 10).await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Some(Err(SendError::Rejected { .. })))));
    let ok = out.send(Bytes::from_static(&[5])).await.unwrap();
    assert_eq!(within(10, "good", ok).await, Ok(Outcome::Acked));
    assert_eq!(within(5, "recv", good).await.unwrap(), Some(5));
    let elapsed = since.elapsed();
    let s = within(5, "stats", b.stats()).await.unwrap();
    assert_eq!(s.decode_failed, 300);
    // The warnings carry no `node` span (see the next test): tell this test's apart
    // by the message id in their fields, which names the sending run (n8101#...).
    let warns: Vec<Ev> = cap
        .warns("does not decode", since)
        .into_iter()
        .filter(|e| {
            e.fields
                .iter()
                .any(|(k, v)| k == "id" && v.starts_with("n8101#"))
        })
        .collect();
    assert!(!warns.is_empty(), "no undecodable warning at all");
    let allowed = elapsed.as_secs() + 1;
    assert!(
        warns.len() as u64 <= allowed,
        "{} undecodable warnings in {elapsed:?} (at most once a second)",
        warns.len()
    );
}

/// README "Observability", tracing: "The driver runs inside a span `node` with the field
/// `node` (the node's run, `n1#<incarnation>`), so every event below carries it", and
/// the table below lists "`ackwire::node` | warn / error | ... undecodable payload". The
/// warning about an undecodable payload must carry the receiving node's `node` span, so
/// that an operator can tell which node warned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_undecodable_warning_carries_the_node_span() {
    let cap = capture();
    let since = Instant::now();
    let (b, a) = pair(8202, 8201).await;
    let mut inbox = b.receiver::<u8>(ChannelId(82), false).unwrap();
    let good = tokio::spawn(async move {
        inbox.recv().await.map(|d| {
            let v = *d.message();
            d.ack();
            v
        })
    });
    let out = a
        .raw_sender(
            NodeId(8202),
            ChannelOptions::new(ChannelId(82), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = out.send(Bytes::from_static(&[1, 2])).await.unwrap();
    assert_eq!(
        within(10, "receipt", r).await,
        Err(SendError::Rejected {
            reason: RejectReason::Undecodable
        })
    );
    let ok = out.send(Bytes::from_static(&[5])).await.unwrap();
    assert_eq!(within(10, "good", ok).await, Ok(Outcome::Acked));
    assert_eq!(within(5, "recv", good).await.unwrap(), Some(5));
    let warns = cap.warns("does not decode", since);
    assert!(!warns.is_empty(), "no undecodable warning at all");
    let in_b: Vec<&Ev> = warns
        .iter()
        .filter(|e| {
            e.node_span
                .as_deref()
                .is_some_and(|n| n.starts_with("n8202#"))
        })
        .collect();
    assert!(
        !in_b.is_empty(),
        "the undecodable warning of node n8202 is not inside its `node` span: {warns:?}"
    );
}

/// README "Observability", tracing: "Per-message events never log above `trace`, all on
/// their own target" (`ackwire::message`). A workload that makes every kind of
/// per-message event (sends, acks, nacks and redeliveries, a dead letter, a rejection,
/// a duplicate key): no event or callsite on `ackwire::message` is above trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_events_are_never_above_trace() {
    let cap = capture();
    let (b, a) = pair(8302, 8301).await;
    // Nack / redelivery / ack, and a dead letter at the delivery limit.
    let mut inbox = b
        .raw_receiver_with(
            ChannelId(83),
            ReceiverOptions::unordered().max_deliveries(Some(2)),
        )
        .unwrap();
    let out = a
        .raw_sender(
            NodeId(8302),
            ChannelOptions::new(ChannelId(83), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r1 = out.send(Bytes::from_static(b"ok")).await.unwrap();
    within(5, "d1", inbox.recv()).await.unwrap().nack();
    within(5, "d1 again", inbox.recv()).await.unwrap().ack();
    assert_eq!(within(5, "r1", r1).await, Ok(Outcome::Acked));
    let r2 = out.send(Bytes::from_static(b"poison")).await.unwrap();
    within(5, "d2", inbox.recv()).await.unwrap().nack();
    within(5, "d2 again", inbox.recv()).await.unwrap().nack();
    assert_eq!(
        within(5, "r2", r2).await,
        Err(SendError::Rejected {
            reason: RejectReason::DeadLettered
        })
    );
    // A type mismatch, and a duplicate key on effectively-once.
    let mut typed = b.receiver::<u64>(ChannelId(84), false).unwrap();
    let wrong = a
        .sender::<String>(
            NodeId(8302),
            ChannelOptions::new(ChannelId(84), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r3 = wrong.send(&"x".to_string()).await.unwrap();
    assert!(matches!(
        within(5, "r3", r3).await,
        Err(SendError::Rejected { .. })
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), typed.recv())
            .await
            .is_err()
    );
    let mut eo_in = b.raw_receiver(ChannelId(85), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = eo_in.recv().await {
            d.ack();
        }
    });
    let eo = a
        .raw_sender(
            NodeId(8302),
            ChannelOptions::new(ChannelId(85), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    for _ in 0..2 {
        let r = eo
            .send_with_key(Bytes::from_static(b"k"), IdKey(8_300_001))
            .await
            .unwrap();
        assert_eq!(within(5, "eo", r).await, Ok(Outcome::Acked));
    }
    let s = within(5, "stats", b.stats()).await.unwrap();
    assert!(s.proto.duplicates_dropped >= 1);
    let above = cap.message_above_trace.lock().unwrap().clone();
    assert!(
        above.is_empty(),
        "per-message events above trace on ackwire::message: {above:?}"
    );
}

// ---------------------------------------------------------------------------------
// Guarantees and lifecycle at their defaults
// ---------------------------------------------------------------------------------

/// README table, `AtMostOnce`: "delivers on arrival, no ack"; "At-most-once ... (its
/// "acked" only means "transmitted once")"; lib.rs: at-most-once "sends once, never
/// retries"; Observability: "`ackwire_messages_acked_total` | ... | messages the target
/// acknowledged (at-most-once: transmitted)"; `Outcome::Sent`: "At-most-once: it was
/// handed to the transport once". A delivery the handler holds and never acks: the
/// at-most-once receipt settles `Sent` promptly, the acked counter counts it, and
/// nothing is retransmitted or delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_most_once_receipt_is_acked_on_transmission_without_the_handler() {
    let rec = recorder();
    let (b, a) = pair(8402, 8401).await;
    let mut inbox = b.raw_receiver(ChannelId(86), false).unwrap();
    let out = a
        .raw_sender(
            NodeId(8402),
            ChannelOptions::new(ChannelId(86), Guarantee::AtMostOnce),
        )
        .unwrap();
    let r = out.send(Bytes::from_static(b"fire")).await.unwrap();
    let held = within(5, "delivery", inbox.recv()).await.unwrap();
    assert_eq!(within(3, "receipt", r).await, Ok(Outcome::Sent));
    let labels = [("node", "n8401"), ("peer", "n8402"), ("channel", "86")];
    eventually(3, "at-most-once acked counted", || {
        rec.sum("ackwire_messages_acked_total", &labels) >= 1
    })
    .await;
    assert_eq!(rec.sum("ackwire_messages_acked_total", &labels), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = within(5, "stats", a.stats()).await.unwrap();
    assert_eq!(s.proto.retransmitted, 0, "at-most-once retransmitted");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), inbox.recv())
            .await
            .is_err(),
        "an at-most-once message was delivered twice"
    );
    drop(held);
}

/// README "Using it": "`Node::shutdown()`: refuse new sends, wait up to `shutdown_drain`
/// for acks, spool what is left to the hint store, flush, close"; `NodeConfig::
/// shutdown_drain`: "Default 5 s" and "(or, without handoff, failing them)". A
/// message whose handler holds it: with the defaults `shutdown()` returns after about
/// 5 s (not before 4.5 s, not after 10 s), the receipt fails (`Shutdown`), and a send
/// made during the drain is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_the_default_drain_then_fails_what_is_unacked() {
    let (b, a) = pair(8502, 8501).await;
    let a = Arc::new(a);
    let mut inbox = b.raw_receiver(ChannelId(87), false).unwrap();
    let out = a
        .raw_sender(
            NodeId(8502),
            ChannelOptions::new(ChannelId(87), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = out.send(Bytes::from_static(b"held")).await.unwrap();
    let held = within(5, "delivery", inbox.recv()).await.unwrap();
    let started = Instant::now();
    let a2 = a.clone();
    let stopping = tokio::spawn(async move { a2.shutdown().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = out.send(Bytes::from_static(b"late")).await;
    assert!(
        late.is_err(),
        "a send during the shutdown drain was accepted"
    );
    within(12, "shutdown", stopping).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4500) && took <= Duration::from_secs(10),
        "shutdown took {took:?}; default drain 5 s"
    );
    let res = within(3, "receipt", r).await;
    assert_eq!(
        res,
        Err(SendError::Shutdown),
        "receipt of the unacked message"
    );
    drop(held);
}

/// README "Upgrading", step 2: "optionally raise `versions.min` to 2 ...: nodes stop
/// speaking version 1, and a leftover 0.1 node is refused with a counted
/// `rejected_unsupported_version` and a warning naming both ranges". A node speaking
/// 2..=3 and a node speaking only 1 that dials it: the refusal is counted and a warning
/// names "2..=3" and "1..=1".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_version_1_node_is_refused_with_a_warning_naming_both_ranges() {
    let cap = capture();
    let since = Instant::now();
    let (new, old) = version_pair(8602, 8601).await;
    let counted = async {
        loop {
            let s = new.tcp_stats().unwrap();
            if s.rejected_unsupported_version > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(10, "rejected_unsupported_version counted", counted).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let warns: Vec<Ev> = cap
        .warns("no common protocol version", since)
        .into_iter()
        .filter(|e| {
            let vals: Vec<&str> = e.fields.iter().map(|(_, v)| v.as_str()).collect();
            vals.contains(&"2..=3") && vals.contains(&"1..=1")
        })
        .collect();
    assert!(
        !warns.is_empty(),
        "no warning naming 2..=3 and 1..=1; version warnings: {:?}",
        cap.warns("version", since)
    );
    drop(old);
}

/// Anyone who reaches the port can fail a handshake, as often as it connects (a port
/// scan, a load balancer's TCP check, a connect-and-close loop): each failure is
/// counted in `TcpStats::handshakes_failed`, and warned about at most once per 10 s.
/// (Regression: one warning per connection, at whatever rate a stranger connected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_and_close_loop_is_counted_and_warned_about_once() {
    let cap = capture();
    let since = Instant::now();
    let n = Node::builder(NodeId(8901))
        .tcp(any_addr(), TcpConfig::default())
        .build()
        .await
        .unwrap();
    let addr = n.local_addr().unwrap();
    for _ in 0..40 {
        drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let counted = async {
        while n.tcp_stats().unwrap().handshakes_failed < 40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(10, "40 failed handshakes counted", counted).await;
    let warned = cap
        .warns("handshake failed", since)
        .into_iter()
        .filter(|e| {
            e.node_span
                .as_deref()
                .is_some_and(|s| s.starts_with("n8901#"))
        })
        .count();
    assert_eq!(warned, 1, "40 failed inbound handshakes, {warned} warnings");
    n.shutdown().await;
}

/// A node speaking only 2..=3 (`NodeId(new)`) and one speaking only 1, which knows the
/// first's address.
async fn version_pair(new: u64, old: u64) -> (Node, Node) {
    let tcp_new = TcpConfig {
        versions: VersionRange { min: 2, max: 3 },
        ..TcpConfig::default()
    };
    let tcp_old = TcpConfig {
        versions: VersionRange { min: 1, max: 1 },
        ..TcpConfig::default()
    };
    let n = Node::builder(NodeId(new))
        .tcp(any_addr(), tcp_new)
        .allow_peer(NodeId(old))
        .build()
        .await
        .unwrap();
    let o = Node::builder(NodeId(old))
        .tcp(any_addr(), tcp_old)
        .peer(NodeId(new), n.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    (n, o)
}

/// README "Observability", tracing: "The driver runs inside a span `node` with the field
/// `node` (the node's run, `n1#<incarnation>`), so every event below carries it", and
/// the table below lists "`ackwire::transport::tcp` | info / warn | ... handshake and
/// TLS failures". The version-mismatch warning of the node speaking 2..=3 must carry
/// that node's `node` span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_warning_carries_the_node_span() {
    let cap = capture();
    let since = Instant::now();
    let (new, old) = version_pair(8702, 8701).await;
    let counted = async {
        loop {
            if new.tcp_stats().unwrap().rejected_unsupported_version > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(10, "rejected_unsupported_version counted", counted).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let warns = cap.warns("no common protocol version", since);
    assert!(!warns.is_empty(), "no version warning at all");
    let spans: Vec<Option<String>> = warns.iter().map(|e| e.node_span.clone()).collect();
    assert!(
        spans
            .iter()
            .any(|n| n.as_deref().is_some_and(|n| n.starts_with("n8702#"))),
        "no version warning inside node n8702's `node` span: spans {spans:?}"
    );
    drop(old);
}

/// README "Observability", tracing table: "`ackwire::node` | warn / error | peer is Down
/// ..."; "The driver runs inside a span `node` ..., so every event below carries it".
/// A peer that stops: the sending node warns that it is Down, inside its `node` span,
/// once for the one transition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_peer_is_warned_once_inside_the_node_span() {
    let cap = capture();
    let since = Instant::now();
    let (b, a) = pair(8802, 8801).await;
    let mut events = a.health_events();
    let up = async {
        while a.health(NodeId(8802)) != Some(ackwire::detector::Health::Up) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(10, "peer Up", up).await;
    within(10, "receiver shutdown", b.shutdown()).await;
    drop(b);
    let down = async {
        loop {
            match events.recv().await {
                Ok(c) if c.peer == NodeId(8802) && c.to == ackwire::detector::Health::Down => {
                    return
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("health events: {e}"),
            }
        }
    };
    within(15, "peer Down", down).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warns: Vec<Ev> = cap
        .warns("Down", since)
        .into_iter()
        .filter(|e| e.fields.iter().any(|(k, v)| k == "peer" && v == "n8802"))
        .collect();
    assert_eq!(warns.len(), 1, "Down warnings about n8802: {warns:?}");
    assert!(
        warns[0]
            .node_span
            .as_deref()
            .is_some_and(|n| n.starts_with("n8801#")),
        "the Down warning is not inside node n8801's span: {warns:?}"
    );
}

/// README "Using it", limits: "inbound streams per peer (`max_streams_per_peer`, 256: at
/// the limit the peer's idle stream with the oldest frame makes room ...; only when all
/// 256 hold unfinished messages is a new one refused unacked and retried, counted in
/// `streams_refused`". Defaults over TCP: 256 channels each with one message the
/// application holds; a message on a 257th channel is not delivered and the refusal is
/// counted; once one held message is acked, the 257th is delivered and `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_257th_stream_of_a_peer_waits_while_256_hold_unfinished_messages() {
    const LIMIT: u32 = 256;
    let (b, a) = pair(8902, 8901).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delivery<Bytes>>();
    for c in 0..=LIMIT {
        let mut inbox = b.raw_receiver(ChannelId(10_000 + c), false).unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let _ = tx.send(d);
            }
        });
    }
    let mut receipts = Vec::new();
    for c in 0..LIMIT {
        let out = a
            .raw_sender(
                NodeId(8902),
                ChannelOptions::new(ChannelId(10_000 + c), Guarantee::AtLeastOnce),
            )
            .unwrap();
        receipts.push(out.send(Bytes::from_static(b"held")).await.unwrap());
    }
    let mut held = Vec::new();
    while held.len() < LIMIT as usize {
        held.push(
            within(15, "the 256 held deliveries", rx.recv())
                .await
                .unwrap(),
        );
    }
    let extra = a
        .raw_sender(
            NodeId(8902),
            ChannelOptions::new(ChannelId(10_000 + LIMIT), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = extra.send(Bytes::from_static(b"257th")).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await;
    assert!(
        early.is_err(),
        "a 257th stream was served while all 256 held unfinished messages: {:?}",
        early.ok().flatten().map(|d| d.channel())
    );
    let s = within(5, "stats", b.stats()).await.unwrap();
    assert!(
        s.proto.streams_refused >= 1,
        "streams_refused = {}",
        s.proto.streams_refused
    );
    held.pop().unwrap().ack();
    let d = within(10, "the 257th after room was made", rx.recv())
        .await
        .unwrap();
    assert_eq!(d.channel(), ChannelId(10_000 + LIMIT));
    d.ack();
    assert_eq!(within(10, "257th receipt", r).await, Ok(Outcome::Acked));
    for d in held {
        d.ack();
    }
    let outcomes = settle(receipts, 10).await;
    assert!(outcomes.iter().all(|o| *o == Some(Ok(Outcome::Acked))));
}
