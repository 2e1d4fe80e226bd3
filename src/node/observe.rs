//! What the driver keeps per in-flight message and per stream for observability, and
//! the per-message trace events it cannot emit in one line.
//!
//! Owns [`PendingReceipt`] (a receipt's reply plus, with the `metrics` feature, its
//! send instant), the `stream` spans ([`StreamSpans`]) and the trace of transmitted
//! data frames. Decides nothing about the protocol. Per-message events use the target
//! [`MESSAGE_TARGET`] at `trace` level only, each inside the span of its stream (see
//! the README's "Observability" section for the whole table).

use super::driver::ReceiptReply;
use super::{Outcome, SendError};
use crate::id::{ChannelId, MessageId, NodeId, Origin};
use crate::proto::SendRef;
use crate::wire::Frame;
use rustc_hash::FxHashMap;
use tracing::Span;

/// The `tracing` target of every per-message event and stream span (always at
/// `trace` level).
pub(super) const MESSAGE_TARGET: &str = "ackwire::message";

/// Whether per-message events are wanted at all (one cheap callsite check).
fn tracing_messages() -> bool {
    tracing::enabled!(target: MESSAGE_TARGET, tracing::Level::TRACE)
}

/// One `stream` span per stream this node sends or receives on, children of the
/// node's `node` span, made the first time one of the stream's per-message events is
/// traced and kept while the stream can still have events; every per-message event is
/// emitted inside its stream's span.
///
/// * Sending: `stream{dir="out" peer=n2 channel=7}`, one per (target, channel): the
///   stream's other half of its identity, this node's run, is the `node` span's.
/// * Receiving: `stream{dir="in" from=n1#<incarnation> channel=7}`, one per (sending
///   run, channel), as the receiver keeps its streams: a restarted sender is a new
///   stream with a new span, and the spans of the sender's earlier runs are dropped
///   when the new run connects.
///
/// The driver is one loop over every stream, so a stream span is never held entered
/// across an `await`: each event enters it for its own duration
/// ([`Span::in_scope`]). Without a subscriber that wants `ackwire::message` at
/// trace level, no span is made and nothing is kept.
#[derive(Debug, Default)]
pub(super) struct StreamSpans {
    outbound: FxHashMap<(NodeId, ChannelId), Span>,
    inbound: FxHashMap<(Origin, ChannelId), Span>,
    /// Each peer's current run (from its last connection), for the events that know
    /// only the peer's node id.
    runs: FxHashMap<NodeId, Origin>,
}

impl StreamSpans {
    /// Run `event` (a per-message trace event) inside the span of the stream to `peer`
    /// on `channel`.
    pub(super) fn outbound(&mut self, peer: NodeId, channel: ChannelId, event: impl FnOnce()) {
        if !tracing_messages() {
            return;
        }
        if let Some(span) = self.outbound.get(&(peer, channel)) {
            return span.in_scope(event);
        }
        let span = tracing::trace_span!(target: MESSAGE_TARGET, "stream", dir = "out", %peer, channel = channel.0);
        span.in_scope(event);
        if !span.is_disabled() {
            self.outbound.insert((peer, channel), span);
        }
    }

    /// Run `event` inside the span of the stream from `from` on `channel`.
    pub(super) fn inbound(&mut self, from: Origin, channel: ChannelId, event: impl FnOnce()) {
        if !tracing_messages() {
            return;
        }
        if let Some(span) = self.inbound.get(&(from, channel)) {
            return span.in_scope(event);
        }
        let span = tracing::trace_span!(target: MESSAGE_TARGET, "stream", dir = "in", %from, channel = channel.0);
        span.in_scope(event);
        if !span.is_disabled() {
            self.inbound.insert((from, channel), span);
        }
    }

    /// As [`StreamSpans::inbound`] for an arrival known only by the peer's node id:
    /// the stream of its current run (outside any stream span if none is known).
    pub(super) fn inbound_from(&mut self, peer: NodeId, channel: ChannelId, event: impl FnOnce()) {
        match self.runs.get(&peer) {
            Some(&run) => self.inbound(run, channel, event),
            None if tracing_messages() => event(),
            None => {}
        }
    }

    /// `origin` connected: its earlier runs' receiving streams are over.
    pub(super) fn peer_up(&mut self, origin: Origin) {
        if self.runs.insert(origin.node, origin) != Some(origin) {
            self.inbound
                .retain(|(from, _), _| from.node != origin.node || *from == origin);
        }
    }

    /// `peer` is gone for good: drop every span of its streams.
    pub(super) fn forget(&mut self, peer: NodeId) {
        self.runs.remove(&peer);
        self.outbound.retain(|(to, _), _| *to != peer);
        self.inbound.retain(|(from, _), _| from.node != peer);
    }
}

/// A sent message's receipt, waiting for its outcome in the driver's receipts map.
#[derive(Debug)]
pub(super) struct PendingReceipt {
    reply: ReceiptReply,
    /// Transmitted at least once (kept only while per-message tracing is on: tells a
    /// first transmission from a retransmission).
    transmitted: bool,
    /// When `send` accepted it, and its place in the in-flight gauge.
    #[cfg(feature = "metrics")]
    pub(super) tracked: super::metrics::Tracked,
}

impl PendingReceipt {
    pub(super) fn new(
        reply: ReceiptReply,
        #[cfg(feature = "metrics")] tracked: super::metrics::Tracked,
    ) -> Self {
        PendingReceipt {
            reply,
            transmitted: false,
            #[cfg(feature = "metrics")]
            tracked,
        }
    }

    /// Resolve the receipt (as `oneshot::Sender::send`).
    pub(super) fn send(
        self,
        outcome: Result<Outcome, SendError>,
    ) -> Result<(), Result<Outcome, SendError>> {
        self.reply.send(outcome)
    }
}

/// The id of a message `send` accepted as `r`: its key, or its library-assigned id.
pub(super) fn sent_id(origin: Origin, r: SendRef, key: Option<crate::id::IdKey>) -> MessageId {
    key.map_or(
        MessageId::Seq {
            origin,
            channel: r.channel,
            seq: r.seq,
        },
        MessageId::Key,
    )
}

/// Trace each data frame about to go to `peer`: a first transmission, a
/// retransmission, or a replayed hint (no receipt of this run waits for it).
pub(super) fn trace_transmits<'a>(
    origin: Origin,
    peer: NodeId,
    frames: impl Iterator<Item = &'a Frame>,
    receipts: &mut crate::proto::sends::Sends<PendingReceipt>,
    spans: &mut StreamSpans,
) {
    for frame in frames {
        let Frame::Data(d) = frame else { continue };
        let id = d.id.unwrap_or(MessageId::Seq {
            origin,
            channel: d.channel,
            seq: d.seq,
        });
        let send = SendRef {
            peer,
            channel: d.channel,
            seq: d.seq,
        };
        let event = match receipts.get_mut(&send) {
            Some(r) if r.transmitted => "retransmit",
            Some(r) => {
                r.transmitted = true;
                "transmit"
            }
            None => "transmit (replayed hint or settled)",
        };
        spans.outbound(peer, d.channel, || {
            tracing::trace!(target: MESSAGE_TARGET, %id, %peer, channel = d.channel.0, seq = d.seq, "{event}")
        });
    }
}
