//! Per-message `tracing` events (target `ackwire::message`, level trace) and the
//! per-node span, captured by a small hand-written subscriber.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(9);

/// One captured event: target, level and its fields as `name=value` pairs (the
/// message under `message`).
#[derive(Debug, Clone)]
struct Captured {
    target: String,
    level: tracing::Level,
    fields: String,
}

impl Captured {
    /// The event's message (spaces were stored as `_`).
    fn message(&self) -> String {
        self.fields
            .split(' ')
            .find_map(|f| f.strip_prefix("message="))
            .unwrap_or("")
            .replace('_', " ")
    }
}

#[derive(Default)]
struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}").replace(' ', "_");
        let _ = write!(self.0, "{}={} ", field.name(), v);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let _ = write!(self.0, "{}={} ", field.name(), value.replace(' ', "_"));
    }
}

/// Captures every event, and the name and fields of every span.
#[derive(Clone, Default)]
struct Capture {
    events: Arc<Mutex<Vec<Captured>>>,
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut f = Fields::default();
        attrs.record(&mut f);
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_string(), f.0));
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut f = Fields::default();
        event.record(&mut f);
        self.events.lock().unwrap().push(Captured {
            target: event.metadata().target().to_string(),
            level: *event.metadata().level(),
            fields: f.0,
        });
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The events of one acked message, in order: send and transmit at the sender (with
/// the message id), deliver and the ack completion at the receiver (same id), then
/// acked at the sender; all at trace level on the `ackwire::message` target; and one
/// `node` span per node.
#[tokio::test(start_paused = true)]
async fn one_acked_message_leaves_trace_events_with_its_id() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let net = MemNetwork::new(FaultPlan::new(1)).unwrap();
    let node = |id: NodeId| {
        Node::builder(id)
            .transport(net.transport(id))
            .seed(id.0)
            .build()
    };
    let a = node(NodeId(1)).await.unwrap();
    let b = node(NodeId(2)).await.unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let receipt = out.send(&42).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(60), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    let id = d.id().to_string();
    d.ack();
    tokio::time::timeout(Duration::from_secs(60), receipt)
        .await
        .unwrap()
        .unwrap();
    a.shutdown().await;
    b.shutdown().await;

    let events = capture.events.lock().unwrap().clone();
    let per_message: Vec<&Captured> = events
        .iter()
        .filter(|e| e.target == "ackwire::message")
        .collect();
    assert!(
        per_message.iter().all(|e| e.level == tracing::Level::TRACE),
        "{per_message:#?}"
    );
    let with_id = format!("id={id} ");
    let find = |message: &str| {
        per_message
            .iter()
            .position(|e| e.message() == message)
            .unwrap_or_else(|| panic!("no {message:?} event in {per_message:#?}"))
    };
    let order = ["send", "transmit", "deliver", "completed", "acked"].map(find);
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{per_message:#?}");
    for i in &order[..4] {
        assert!(
            per_message[*i].fields.contains(&with_id),
            "{:?} lacks {with_id}",
            per_message[*i]
        );
    }
    assert!(per_message[order[3]].fields.contains("how=Ack "));
    // "acked" names the stream position that "send" had.
    for field in ["peer=n2 ", "channel=9 ", "seq=1 "] {
        assert!(per_message[order[0]].fields.contains(field));
        assert!(per_message[order[4]].fields.contains(field));
    }
    assert!(
        !per_message.iter().any(|e| e.message() == "retransmit"),
        "no loss, no retransmission: {per_message:#?}"
    );
    // One span per node, named `node`, with the node's run as its field.
    let spans = capture.spans.lock().unwrap().clone();
    for n in [&a, &b] {
        let field = format!("node={} ", n.origin());
        assert_eq!(
            spans
                .iter()
                .filter(|(name, f)| name == "node" && f.contains(&field))
                .count(),
            1,
            "{spans:?}"
        );
    }
}

/// Over a lossy network, retransmissions show as `retransmit` events carrying the id
/// that the message's `send` event had.
#[tokio::test(start_paused = true)]
async fn retransmissions_are_traced_with_the_message_id() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let net = MemNetwork::new(FaultPlan::new(3).loss(0.4)).unwrap();
    let node = |id: NodeId| {
        Node::builder(id)
            .transport(net.transport(id))
            .seed(id.0)
            .build()
    };
    let a = node(NodeId(1)).await.unwrap();
    let b = node(NodeId(2)).await.unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..20 {
        receipts.push(out.send(&i).await.unwrap());
    }
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.ack();
        }
    });
    for r in receipts {
        tokio::time::timeout(Duration::from_secs(300), r)
            .await
            .unwrap()
            .unwrap();
    }
    let retransmitted = a.stats().await.unwrap().proto.retransmitted;
    assert!(retransmitted > 0, "40% loss retransmits");
    let events = capture.events.lock().unwrap().clone();
    let id_of = |e: &Captured| {
        e.fields
            .split(' ')
            .find_map(|f| f.strip_prefix("id="))
            .map(str::to_string)
    };
    let sent: Vec<String> = events
        .iter()
        .filter(|e| e.target == "ackwire::message" && e.message() == "send")
        .filter_map(id_of)
        .collect();
    assert_eq!(sent.len(), 20);
    let retransmits: Vec<&Captured> = events
        .iter()
        .filter(|e| e.target == "ackwire::message" && e.message() == "retransmit")
        .collect();
    assert!(
        !retransmits.is_empty(),
        "{retransmitted} retransmissions, none traced"
    );
    for r in retransmits {
        assert_eq!(r.level, tracing::Level::TRACE);
        let id = id_of(r).expect("retransmit carries the id");
        assert!(sent.contains(&id), "{id} was never sent: {sent:?}");
    }
}

/// A nack shows at both ends: the receiver's `completed` with `how=Nack`, then the
/// sender's `nack received` for the same stream position, then its `retransmit`.
#[tokio::test(start_paused = true)]
async fn a_nack_is_traced_at_both_ends() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let net = MemNetwork::new(FaultPlan::new(1)).unwrap();
    let node = |id: NodeId| {
        Node::builder(id)
            .transport(net.transport(id))
            .seed(id.0)
            .build()
    };
    let a = node(NodeId(1)).await.unwrap();
    let b = node(NodeId(2)).await.unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&5).await.unwrap();
    let minute = Duration::from_secs(60);
    let first = tokio::time::timeout(minute, inbox.recv()).await.unwrap();
    first.unwrap().nack();
    let again = tokio::time::timeout(minute, inbox.recv()).await.unwrap();
    again.unwrap().ack();
    tokio::time::timeout(Duration::from_secs(60), receipt)
        .await
        .unwrap()
        .unwrap();
    let events = capture.events.lock().unwrap().clone();
    let per_message: Vec<&Captured> = events
        .iter()
        .filter(|e| e.target == "ackwire::message")
        .collect();
    let find = |message: &str, field: &str| {
        per_message
            .iter()
            .position(|e| e.message() == message && e.fields.contains(field))
            .unwrap_or_else(|| panic!("no {message:?} with {field:?} in {per_message:#?}"))
    };
    let nacked = find("completed", "how=Nack ");
    let received = find("nack received", "seq=1 ");
    let retransmit = find("retransmit", "seq=1 ");
    assert!(
        nacked < received && received < retransmit,
        "{per_message:#?}"
    );
}
