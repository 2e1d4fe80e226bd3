//! The `ackwire_*` metrics (feature `metrics`): per-peer, per-channel counters, gauges
//! and histograms recorded through the [`metrics`] facade, for whatever exporter the
//! application installs (Prometheus, StatsD, OpenTelemetry…).
//!
//! Owns one node's metric handles, cached per stream so the hot path does not build a
//! label set per message; decides nothing: the driver calls it where the events already
//! happen. Without the feature this module is not compiled and the driver keeps no send
//! instants.
//!
//! Every metric carries the label `node` (this node's id, e.g. `n1`); the per-stream
//! ones also `peer` (the other node's id) and `channel` (the channel number). On the
//! sending side `peer` is the target; on the receiving side it is the sending node.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `ackwire_messages_sent_total` | counter | node, peer, channel | messages accepted by `send` (and the batch/sink/service APIs) |
//! | `ackwire_messages_retransmitted_total` | counter | node, peer, channel | retransmissions of the stream (synced from the protocol core about once a second and at shutdown) |
//! | `ackwire_messages_acked_total` | counter | node, peer, channel | messages the target acknowledged (at-most-once: transmitted) |
//! | `ackwire_messages_given_up_total` | counter | node, peer, channel | messages whose retries ran out (deadline or attempts), whether then handed off or failed |
//! | `ackwire_messages_rejected_total` | counter | node, peer, channel, reason | messages the target refused for good; `reason` is `no_receiver`, `unauthorized`, `undecodable`, `dead_lettered`, `type_mismatch`, `stream_retired`, `key_table_full` or `other` |
//! | `ackwire_messages_in_flight` | gauge | node, peer, channel | messages accepted by `send` whose receipt has not resolved yet |
//! | `ackwire_ack_latency_seconds` | histogram | node, peer, channel | from `send` accepting a message to its ack (at-least-once and effectively-once; hint replays excluded) |
//! | `ackwire_window_waits_total` | counter | node, peer, channel | `send` calls that waited for the stream's in-flight window |
//! | `ackwire_credit_waits_total` | counter | node, peer, channel | first transmissions that waited for the receiver's stream credit (synced like retransmissions) |
//! | `ackwire_node_credit_waits_total` | counter | node, peer, channel | transmissions that waited for the receiver's node credit (synced like retransmissions) |
//! | `ackwire_hints_stored_total` | counter | node, peer, channel | messages stored in the hint store (retries ran out, target Down, or shutdown spool) |
//! | `ackwire_hints_replayed_total` | counter | node, peer, channel | replayed hints the target acknowledged |
//! | `ackwire_messages_delivered_total` | counter | node, peer, channel | receiving side: messages handed to the channel's receiver (redeliveries included) |
//! | `ackwire_messages_duplicate_total` | counter | node, peer, channel | receiving side: arrivals dropped as duplicates of a message already processed |
//! | `ackwire_dead_letters_total` | counter | node, peer, channel, reason | receiving side: messages put in the dead letters; `reason` is `max_deliveries` or `undecodable` |
//!
//! Install the recorder before building the node: handles are taken when a stream is
//! first seen, and a handle taken without a recorder stays a no-op.

use crate::id::{ChannelId, NodeId};
use crate::proto::{Endpoint, SendRef};
use crate::wire::RejectReason;
use metrics::{Counter, Gauge, Histogram, Label};
use rustc_hash::FxHashMap as FastMap;
use std::time::{Duration, Instant};

/// How often the counters kept inside the protocol core are copied out.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// One node's metric handles.
#[derive(Debug)]
pub(super) struct NodeMetrics {
    node: String,
    out: FastMap<(NodeId, ChannelId), OutStream>,
    inbound: FastMap<(NodeId, ChannelId), InStream>,
    next_sync: Option<Instant>,
}

/// When an in-flight message was accepted; keeps the in-flight gauge (it goes down
/// when the receipt is resolved or dropped).
#[derive(Debug)]
pub(super) struct Tracked {
    at: Instant,
    in_flight: Gauge,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

impl NodeMetrics {
    pub(super) fn new(node: NodeId) -> Self {
        NodeMetrics {
            node: node.to_string(),
            out: FastMap::default(),
            inbound: FastMap::default(),
            next_sync: None,
        }
    }

    /// `send` accepted a message: count it and start its latency clock.
    pub(super) fn sent(&mut self, send: SendRef, now: Instant) -> Tracked {
        let s = self.out(send.peer, send.channel);
        s.sent.increment(1);
        s.in_flight.increment(1.0);
        Tracked {
            at: now,
            in_flight: s.in_flight.clone(),
        }
    }

    /// The target acknowledged `send`, accepted at `tracked.at`; `acked` is false for
    /// an at-most-once transmission (no ack, no latency).
    pub(super) fn settled(&mut self, send: SendRef, tracked: &Tracked, acked: bool, now: Instant) {
        let s = self.out(send.peer, send.channel);
        s.acked.increment(1);
        if acked {
            s.ack_latency
                .record(now.saturating_duration_since(tracked.at).as_secs_f64());
        }
    }

    pub(super) fn gave_up(&mut self, send: SendRef) {
        self.out(send.peer, send.channel).given_up.increment(1);
    }

    pub(super) fn rejected(&mut self, send: SendRef, reason: RejectReason) {
        let mut labels = self.labels(send.peer, send.channel);
        labels.push(Label::new("reason", reject_reason(reason)));
        metrics::counter!("ackwire_messages_rejected_total", labels).increment(1);
    }

    pub(super) fn hint_stored(&mut self, send: SendRef) {
        self.out(send.peer, send.channel).hints_stored.increment(1);
    }

    pub(super) fn hint_replayed(&mut self, send: SendRef) {
        self.out(send.peer, send.channel)
            .hints_replayed
            .increment(1);
    }

    /// Receiving side: a message from `from` was handed to the receiver.
    pub(super) fn delivered(&mut self, from: NodeId, channel: ChannelId) {
        self.inbound(from, channel).delivered.increment(1);
    }

    /// Receiving side: `n` arrivals from `from` were dropped as duplicates.
    pub(super) fn duplicates(&mut self, from: NodeId, channel: ChannelId, n: u64) {
        if n > 0 {
            self.inbound(from, channel).duplicates.increment(n);
        }
    }

    pub(super) fn dead_letter(
        &mut self,
        from: NodeId,
        channel: ChannelId,
        reason: super::DeadLetterReason,
    ) {
        let reason = match reason {
            super::DeadLetterReason::MaxDeliveries => "max_deliveries",
            super::DeadLetterReason::Undecodable => "undecodable",
        };
        let mut labels = self.labels(from, channel);
        labels.push(Label::new("reason", reason));
        metrics::counter!("ackwire_dead_letters_total", labels).increment(1);
    }

    /// Copy the per-stream counters the protocol core keeps (retransmissions, credit
    /// waits) into the metrics, at most once per [`SYNC_EVERY`] unless `force`.
    pub(super) fn sync(&mut self, endpoint: &Endpoint, now: Instant, force: bool) {
        if !force && self.next_sync.is_some_and(|t| now < t) {
            return;
        }
        self.next_sync = Some(crate::retry::later(now, SYNC_EVERY));
        for c in endpoint.stream_counters() {
            let s = self.out(c.peer, c.channel);
            advance(&s.retransmitted, &mut s.seen.0, c.retransmitted);
            advance(&s.credit_waits, &mut s.seen.1, c.credit_waits);
            advance(&s.node_credit_waits, &mut s.seen.2, c.node_credit_waits);
        }
    }

    fn labels(&self, peer: NodeId, channel: ChannelId) -> Vec<Label> {
        vec![
            Label::new("node", self.node.clone()),
            Label::new("peer", peer.to_string()),
            Label::new("channel", channel.0.to_string()),
        ]
    }

    fn out(&mut self, peer: NodeId, channel: ChannelId) -> &mut OutStream {
        if !self.out.contains_key(&(peer, channel)) {
            let labels = self.labels(peer, channel);
            self.out.insert((peer, channel), OutStream::new(labels));
        }
        self.out.get_mut(&(peer, channel)).expect("inserted above")
    }

    fn inbound(&mut self, from: NodeId, channel: ChannelId) -> &mut InStream {
        if !self.inbound.contains_key(&(from, channel)) {
            let l = self.labels(from, channel);
            let s = InStream {
                delivered: metrics::counter!("ackwire_messages_delivered_total", l.clone()),
                duplicates: metrics::counter!("ackwire_messages_duplicate_total", l),
            };
            self.inbound.insert((from, channel), s);
        }
        self.inbound
            .get_mut(&(from, channel))
            .expect("inserted above")
    }
}

/// `send` waited for the stream's in-flight window (called from the sender's task).
pub(super) fn window_wait(node: NodeId, peer: NodeId, channel: ChannelId) {
    metrics::counter!(
        "ackwire_window_waits_total",
        "node" => node.to_string(),
        "peer" => peer.to_string(),
        "channel" => channel.0.to_string()
    )
    .increment(1);
}

/// Handles of one outbound stream.
#[derive(Debug)]
struct OutStream {
    sent: Counter,
    acked: Counter,
    retransmitted: Counter,
    given_up: Counter,
    credit_waits: Counter,
    node_credit_waits: Counter,
    hints_stored: Counter,
    hints_replayed: Counter,
    in_flight: Gauge,
    ack_latency: Histogram,
    /// Last synced core values: retransmitted, credit waits, node credit waits.
    seen: (u64, u64, u64),
}

impl OutStream {
    fn new(l: Vec<Label>) -> Self {
        OutStream {
            sent: metrics::counter!("ackwire_messages_sent_total", l.clone()),
            acked: metrics::counter!("ackwire_messages_acked_total", l.clone()),
            retransmitted: metrics::counter!("ackwire_messages_retransmitted_total", l.clone()),
            given_up: metrics::counter!("ackwire_messages_given_up_total", l.clone()),
            credit_waits: metrics::counter!("ackwire_credit_waits_total", l.clone()),
            node_credit_waits: metrics::counter!("ackwire_node_credit_waits_total", l.clone()),
            hints_stored: metrics::counter!("ackwire_hints_stored_total", l.clone()),
            hints_replayed: metrics::counter!("ackwire_hints_replayed_total", l.clone()),
            in_flight: metrics::gauge!("ackwire_messages_in_flight", l.clone()),
            ack_latency: metrics::histogram!("ackwire_ack_latency_seconds", l),
            seen: (0, 0, 0),
        }
    }
}

/// Handles of one inbound stream.
#[derive(Debug)]
struct InStream {
    delivered: Counter,
    duplicates: Counter,
}

/// Add what the core's counter gained since `seen` (a stream the core dropped and made
/// again starts from zero: its whole value is new).
fn advance(counter: &Counter, seen: &mut u64, now: u64) {
    let delta = if now >= *seen { now - *seen } else { now };
    if delta > 0 {
        counter.increment(delta);
    }
    *seen = now;
}

/// The `reason` label of a rejection.
fn reject_reason(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::NoReceiver => "no_receiver",
        RejectReason::Unauthorized => "unauthorized",
        RejectReason::Undecodable => "undecodable",
        RejectReason::DeadLettered => "dead_lettered",
        RejectReason::TypeMismatch => "type_mismatch",
        RejectReason::StreamRetired => "stream_retired",
        RejectReason::KeyTableFull => "key_table_full",
        _ => "other",
    }
}
