//! Per-message `tracing` events (target `ackwire::message`, level trace), the per-node
//! span and the per-stream spans they are emitted in, captured by a small hand-written
//! subscriber.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(9);

/// One captured event: target, level and its fields as `name=value` pairs (the
/// message under `message`), and the spans it was emitted in (innermost last).
#[derive(Debug, Clone)]
struct Captured {
    target: String,
    level: tracing::Level,
    fields: String,
    in_spans: Vec<u64>,
}

/// One captured span: its name, fields, target, level and parent (ids start at 1).
#[derive(Debug, Clone)]
struct SpanInfo {
    name: String,
    fields: String,
    target: String,
    level: tracing::Level,
    parent: Option<u64>,
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

/// Captures every event (with the spans entered when it happened), and every span.
/// The tests run on one thread, so one stack of entered spans is enough.
#[derive(Clone, Default)]
struct Capture {
    events: Arc<Mutex<Vec<Captured>>>,
    spans: Arc<Mutex<Vec<SpanInfo>>>,
    entered: Arc<Mutex<Vec<u64>>>,
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut f = Fields::default();
        attrs.record(&mut f);
        let parent = match attrs.parent() {
            Some(id) => Some(id.into_u64()),
            None if attrs.is_contextual() => self.entered.lock().unwrap().last().copied(),
            None => None,
        };
        let mut spans = self.spans.lock().unwrap();
        spans.push(SpanInfo {
            name: attrs.metadata().name().to_string(),
            fields: f.0,
            target: attrs.metadata().target().to_string(),
            level: *attrs.metadata().level(),
            parent,
        });
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
            in_spans: self.entered.lock().unwrap().clone(),
        });
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.entered.lock().unwrap().push(id.into_u64());
    }
    fn exit(&self, id: &tracing::span::Id) {
        let mut entered = self.entered.lock().unwrap();
        if let Some(i) = entered.iter().rposition(|e| *e == id.into_u64()) {
            entered.remove(i);
        }
    }
}

impl Capture {
    /// The span `id`.
    fn span(&self, id: u64) -> SpanInfo {
        self.spans.lock().unwrap()[id as usize - 1].clone()
    }

    /// The innermost `stream` span `event` was emitted in.
    fn stream_of(&self, event: &Captured) -> Option<(u64, SpanInfo)> {
        event
            .in_spans
            .iter()
            .rev()
            .map(|id| (*id, self.span(*id)))
            .find(|(_, s)| s.name == "stream")
    }
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
    let node_span = |n: &Node| {
        let field = format!("node={} ", n.origin());
        let ids: Vec<u64> = (1..=spans.len() as u64)
            .filter(|id| {
                let s = &spans[*id as usize - 1];
                s.name == "node" && s.fields.contains(&field)
            })
            .collect();
        assert_eq!(ids.len(), 1, "{spans:#?}");
        ids[0]
    };
    let (node_a, node_b) = (node_span(&a), node_span(&b));
    // Every per-message event is inside its stream's span: at the sender one span
    // `stream{dir=out peer=n2 channel=9}` for send, transmit and acked; at the
    // receiver `stream{dir=in from=<a's run> channel=9}` for deliver and completed.
    // Each is a trace-level span on `ackwire::message`, a child of its node's span.
    let outbound = "dir=out peer=n2 channel=9 ".to_string();
    let inbound = format!("dir=in from={} channel=9 ", a.origin());
    let stream = |i: usize| {
        capture
            .stream_of(per_message[i])
            .unwrap_or_else(|| panic!("{:?} is in no stream span", per_message[i]))
    };
    let (send_span, send_info) = stream(order[0]);
    for (i, want, node) in [
        (order[0], &outbound, node_a),
        (order[1], &outbound, node_a),
        (order[2], &inbound, node_b),
        (order[3], &inbound, node_b),
        (order[4], &outbound, node_a),
    ] {
        let (id, info) = stream(i);
        assert_eq!(&info.fields, want, "{:?}", per_message[i]);
        assert_eq!(info.parent, Some(node), "{info:?}");
        assert!(per_message[i].in_spans.contains(&node));
        assert_eq!(
            (info.target.as_str(), info.level),
            ("ackwire::message", tracing::Level::TRACE)
        );
        if want == &outbound {
            assert_eq!(id, send_span, "one span for the stream's life: {info:?}");
        }
    }
    assert_eq!(
        spans.iter().filter(|s| s.name == "stream").count(),
        2,
        "one span per stream and direction, made once: {spans:#?} (first {send_info:?})"
    );
    // Every per-message event of the run was inside some stream span.
    for e in &per_message {
        assert!(capture.stream_of(e).is_some(), "{e:?}");
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
    // The sends and their retransmissions share the stream's one span.
    let send_span = events
        .iter()
        .find(|e| e.target == "ackwire::message" && e.message() == "send")
        .and_then(|e| capture.stream_of(e))
        .expect("send in a stream span");
    for r in retransmits {
        assert_eq!(r.level, tracing::Level::TRACE);
        let id = id_of(r).expect("retransmit carries the id");
        assert!(sent.contains(&id), "{id} was never sent: {sent:?}");
        assert_eq!(capture.stream_of(r).map(|(id, _)| id), Some(send_span.0));
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
