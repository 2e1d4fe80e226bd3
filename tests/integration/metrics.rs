//! The `metrics` feature: the `ackwire_*` numbers after known workloads over the
//! in-memory transport, read back from `metrics-util`'s `DebuggingRecorder`.
//!
//! Each test installs its own recorder for its own thread (`metrics::with_local_recorder`)
//! and runs its nodes on a current-thread runtime inside it, so tests running in
//! parallel never see each other's numbers. A snapshot resets counters and gauges, so
//! each test takes one snapshot at the moment it checks.
#![cfg(feature = "metrics")]

use ackwire::detector::Health;
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Outcome, ReceiverOptions,
    RejectReason, SendError,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshot, Snapshotter};
use std::future::Future;
use std::time::Duration;

const CH: ChannelId = ChannelId(5);
const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

/// Run `f` on a paused-clock current-thread runtime with a fresh recorder installed.
fn with_recorder<F: Future<Output = ()>>(f: impl FnOnce(Snapshotter) -> F) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(f(snapshotter)));
}

/// A metric's labels, as `(key, value)` pairs.
type Labels = Vec<(String, String)>;

/// The metrics of one snapshot, found by name and labels.
struct Metrics(Vec<(String, Labels, DebugValue)>);

impl Metrics {
    fn of(snapshot: Snapshot) -> Self {
        Metrics(
            snapshot
                .into_vec()
                .into_iter()
                .map(|(k, _, _, v)| {
                    let key = k.key();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_string(), l.value().to_string()))
                        .collect();
                    (key.name().to_string(), labels, v)
                })
                .collect(),
        )
    }

    /// The value of `name` whose labels include every one of `labels`; panics unless
    /// exactly one matches.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> &DebugValue {
        let found: Vec<&DebugValue> = self
            .0
            .iter()
            .filter(|(n, ls, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0]
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.get(name, labels) {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.get(name, labels) {
            DebugValue::Gauge(g) => g.into_inner(),
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.get(name, labels) {
            DebugValue::Histogram(h) => h.iter().map(|v| v.into_inner()).collect(),
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }
}

/// Sender-side labels (node A, target B, channel CH) and receiver-side ones.
const AT_A: &[(&str, &str)] = &[("node", "n1"), ("peer", "n2"), ("channel", "5")];
const AT_B: &[(&str, &str)] = &[("node", "n2"), ("peer", "n1"), ("channel", "5")];

async fn pair(plan: FaultPlan, config: NodeConfig) -> (Node, Node) {
    let net = MemNetwork::new(plan).unwrap();
    let node = |id: NodeId| {
        Node::builder(id)
            .transport(net.transport(id))
            .config(config.clone())
            .seed(id.0)
            .build()
    };
    let a = node(A).await.unwrap();
    let b = node(B).await.unwrap();
    (a, b)
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(300), f)
        .await
        .expect("did not complete within 5 minutes (virtual time)")
}

#[test]
fn a_hundred_acked_messages_count_a_hundred_sent_acked_delivered_and_latencies() {
    with_recorder(|snapshotter| async move {
        let (a, b) = pair(FaultPlan::new(1), NodeConfig::default()).await;
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let out = a
            .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
            .unwrap();
        let mut receipts = Vec::new();
        for i in 0..100u64 {
            receipts.push(out.send(&i).await.unwrap());
        }
        for _ in 0..100 {
            within(inbox.recv()).await.unwrap().ack();
        }
        for r in receipts {
            within(r).await.unwrap();
        }
        a.shutdown().await;
        b.shutdown().await;
        let m = Metrics::of(snapshotter.snapshot());
        assert_eq!(m.counter("ackwire_messages_sent_total", AT_A), 100);
        assert_eq!(m.counter("ackwire_messages_acked_total", AT_A), 100);
        assert_eq!(m.counter("ackwire_messages_retransmitted_total", AT_A), 0);
        assert_eq!(m.gauge("ackwire_messages_in_flight", AT_A), 0.0);
        let latencies = m.histogram("ackwire_ack_latency_seconds", AT_A);
        assert_eq!(latencies.len(), 100);
        assert!(
            latencies.iter().all(|s| (0.0..60.0).contains(s)),
            "{latencies:?}"
        );
        assert_eq!(m.counter("ackwire_messages_delivered_total", AT_B), 100);
        assert_eq!(m.counter("ackwire_messages_duplicate_total", AT_B), 0);
    });
}

#[test]
fn a_dead_lettered_message_counts_as_rejected_with_its_reason() {
    with_recorder(|snapshotter| async move {
        let (a, b) = pair(FaultPlan::new(2), NodeConfig::default()).await;
        let mut inbox = b
            .receiver_with::<u64>(CH, ReceiverOptions::default().max_deliveries(Some(1)))
            .unwrap();
        let out = a
            .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
            .unwrap();
        let receipt = out.send(&7).await.unwrap();
        within(inbox.recv()).await.unwrap().nack();
        assert_eq!(
            within(receipt).await,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            })
        );
        a.shutdown().await;
        b.shutdown().await;
        let m = Metrics::of(snapshotter.snapshot());
        let rejected: Vec<(&str, &str)> = [AT_A, &[("reason", "dead_lettered")]].concat();
        assert_eq!(m.counter("ackwire_messages_rejected_total", &rejected), 1);
        assert_eq!(m.counter("ackwire_messages_acked_total", AT_A), 0);
        assert_eq!(m.gauge("ackwire_messages_in_flight", AT_A), 0.0);
        assert!(m.histogram("ackwire_ack_latency_seconds", AT_A).is_empty());
        let dead: Vec<(&str, &str)> = [AT_B, &[("reason", "max_deliveries")]].concat();
        assert_eq!(m.counter("ackwire_dead_letters_total", &dead), 1);
        assert_eq!(m.counter("ackwire_messages_delivered_total", AT_B), 1);
    });
}

#[test]
fn unacked_messages_fill_the_in_flight_gauge_and_a_full_window_counts_a_wait() {
    with_recorder(|snapshotter| async move {
        let mut config = NodeConfig::default();
        config.proto.max_in_flight = 2;
        let (a, b) = pair(FaultPlan::new(3), config).await;
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let out = a
            .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
            .unwrap();
        let r1 = out.send(&1).await.unwrap();
        let r2 = out.send(&2).await.unwrap();
        let held = [
            within(inbox.recv()).await.unwrap(),
            within(inbox.recv()).await.unwrap(),
        ];
        // The window (2) is full: the third send waits until an ack slides it.
        let third = tokio::spawn({
            let out = out.clone();
            async move { out.send(&3).await.unwrap().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished());
        let m = Metrics::of(snapshotter.snapshot());
        assert_eq!(m.gauge("ackwire_messages_in_flight", AT_A), 2.0);
        assert_eq!(m.counter("ackwire_window_waits_total", AT_A), 1);
        assert_eq!(m.counter("ackwire_messages_sent_total", AT_A), 2);
        for d in held {
            d.ack();
        }
        within(inbox.recv()).await.unwrap().ack();
        within(r1).await.unwrap();
        within(r2).await.unwrap();
        within(third).await.unwrap().unwrap();
    });
}

#[test]
fn retransmissions_and_duplicates_match_the_node_stats_per_stream() {
    with_recorder(|snapshotter| async move {
        let plan = FaultPlan::new(4).loss(0.3).duplicate(0.3);
        let (a, b) = pair(plan, NodeConfig::default()).await;
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let out = a
            .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
            .unwrap();
        let mut receipts = Vec::new();
        for i in 0..50u64 {
            receipts.push(out.send(&i).await.unwrap());
        }
        for _ in 0..50 {
            within(inbox.recv()).await.unwrap().ack();
        }
        for r in receipts {
            within(r).await.unwrap();
        }
        let (sa, sb) = (a.stats().await.unwrap(), b.stats().await.unwrap());
        a.shutdown().await;
        b.shutdown().await;
        let m = Metrics::of(snapshotter.snapshot());
        let retransmitted = m.counter("ackwire_messages_retransmitted_total", AT_A);
        assert!(retransmitted > 0, "30% loss retransmits");
        // One stream each way: the per-stream numbers are the node's.
        assert_eq!(retransmitted, sa.proto.retransmitted);
        let duplicates = m.counter("ackwire_messages_duplicate_total", AT_B);
        assert!(duplicates > 0, "30% duplication drops duplicates");
        assert_eq!(duplicates, sb.proto.duplicates_dropped);
        assert_eq!(m.counter("ackwire_messages_delivered_total", AT_B), 50);
        assert_eq!(m.counter("ackwire_messages_acked_total", AT_A), 50);
    });
}

#[test]
fn hints_stored_while_the_target_is_down_count_as_stored_then_replayed() {
    with_recorder(|snapshotter| async move {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::default();
        config.handoff = Some(ackwire::HandoffConfig::new(dir.path()));
        let net = MemNetwork::new(FaultPlan::new(5)).unwrap();
        let a = Node::builder(A)
            .transport(net.transport(A))
            .config(config)
            .seed(1)
            .build()
            .await
            .unwrap();
        let b = Node::builder(B)
            .transport(net.transport(B))
            .seed(2)
            .build()
            .await
            .unwrap();
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let acked = tokio::spawn(async move {
            let mut n = 0;
            while n < 4 {
                within(inbox.recv()).await.unwrap().ack();
                n += 1;
            }
        });
        let out = a
            .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
            .unwrap();
        assert_eq!(out.send(&0).await.unwrap().await, Ok(Outcome::Acked));
        net.isolate(B);
        wait_health(&a, Health::Down).await;
        for i in 1..4 {
            assert_eq!(out.send(&i).await.unwrap().await, Ok(Outcome::HandedOff));
        }
        net.rejoin(B);
        wait_health(&a, Health::Up).await;
        within(acked).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await; // the replays' acks
        a.shutdown().await;
        b.shutdown().await;
        let m = Metrics::of(snapshotter.snapshot());
        assert_eq!(m.counter("ackwire_messages_sent_total", AT_A), 4);
        assert_eq!(m.counter("ackwire_hints_stored_total", AT_A), 3);
        assert_eq!(m.counter("ackwire_hints_replayed_total", AT_A), 3);
        // Only the application send settled by an ack counts as acked.
        assert_eq!(m.counter("ackwire_messages_acked_total", AT_A), 1);
        assert_eq!(m.histogram("ackwire_ack_latency_seconds", AT_A).len(), 1);
        assert_eq!(m.gauge("ackwire_messages_in_flight", AT_A), 0.0);
        assert_eq!(m.counter("ackwire_messages_delivered_total", AT_B), 4);
    });
}

async fn wait_health(node: &Node, want: Health) {
    for _ in 0..600 {
        if node.health(B) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{B} never became {want:?}");
}
