//! What the driver keeps per in-flight message and per stream for observability, and
//! the per-message trace events it cannot emit in one line.
//!
//! Owns [`PendingReceipt`] (a receipt's reply plus, with the `metrics` feature, its
//! send instant), the `stream` spans ([`StreamSpans`]) and the trace of transmitted
//! data frames. Decides nothing about the protocol. Per-message events use the target
//! [`MESSAGE_TARGET`] at `trace` level only, each inside the span of its stream (see
//! the README's "Observability" section for the whole table).

use super::command::ReceiptReply;
use super::error::HandoffRefusal;
use super::{Outcome, SendError};
use crate::id::{ChannelId, MessageId, NodeId, Origin};
use crate::proto::sends::{Report, Resolution};
use crate::proto::SendRef;
use crate::retry::GiveUp;
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

/// Every per-message trace event and `metrics` count of the driver, each in its
/// stream's span: the driver calls one method per thing that happened.
#[derive(Debug)]
pub(super) struct Observer {
    pub(super) spans: StreamSpans,
    #[cfg(feature = "metrics")]
    pub(super) metrics: super::metrics::NodeMetrics,
}

impl Observer {
    pub(super) fn new(
        #[cfg_attr(not(feature = "metrics"), allow(unused_variables))] node: NodeId,
    ) -> Self {
        Observer {
            spans: StreamSpans::default(),
            #[cfg(feature = "metrics")]
            metrics: super::metrics::NodeMetrics::new(node),
        }
    }

    /// The endpoint accepted a message as `r`: its receipt waits in a
    /// [`PendingReceipt`].
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(super) fn sent(
        &mut self,
        origin: Origin,
        r: SendRef,
        key: Option<crate::id::IdKey>,
        reply: ReceiptReply,
        now: std::time::Instant,
    ) -> PendingReceipt {
        self.spans.outbound(r.peer, r.channel, || {
            tracing::trace!(target: MESSAGE_TARGET, id = %sent_id(origin, r, key), peer = %r.peer, channel = r.channel.0, seq = r.seq, "send")
        });
        #[cfg(feature = "metrics")]
        return PendingReceipt::new(reply, self.metrics.sent(r, now));
        #[cfg(not(feature = "metrics"))]
        PendingReceipt::new(reply)
    }

    /// A nack arrived from `peer`.
    pub(super) fn nack_received(&mut self, peer: NodeId, channel: ChannelId, seq: u64) {
        self.spans.outbound(peer, channel, || {
            tracing::trace!(target: MESSAGE_TARGET, %peer, channel = channel.0, seq, "nack received")
        });
    }

    /// A data frame from `peer` was a duplicate (`n` messages dropped).
    pub(super) fn duplicate_dropped(
        &mut self,
        peer: NodeId,
        channel: ChannelId,
        seq: u64,
        id: Option<MessageId>,
        #[cfg_attr(not(feature = "metrics"), allow(unused_variables))] n: u64,
    ) {
        self.spans.inbound_from(peer, channel, || {
            tracing::trace!(target: MESSAGE_TARGET, id = ?id, from = %peer, channel = channel.0, seq, "duplicate dropped")
        });
        #[cfg(feature = "metrics")]
        self.metrics.duplicates(peer, channel, n);
    }

    /// A message goes to its receiver.
    pub(super) fn delivered(&mut self, d: &crate::proto::DeliveryRef) {
        self.spans.inbound(d.origin, d.channel, || {
            tracing::trace!(target: MESSAGE_TARGET, id = %d.id, from = %d.origin, channel = d.channel.0, seq = d.seq, "deliver")
        });
        #[cfg(feature = "metrics")]
        self.metrics.delivered(d.origin.node, d.channel);
    }

    /// The handler finished a delivery as `how`.
    pub(super) fn completed(
        &mut self,
        d: &crate::proto::DeliveryRef,
        how: crate::proto::Completion,
    ) {
        self.spans.inbound(d.origin, d.channel, || {
            tracing::trace!(target: MESSAGE_TARGET, id = %d.id, from = %d.origin, channel = d.channel.0, seq = d.seq, ?how, "completed")
        });
    }

    /// Completing a delivery settled `n` duplicates that waited on it.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(super) fn duplicates_settled(&mut self, d: &crate::proto::DeliveryRef, n: u64) {
        #[cfg(feature = "metrics")]
        self.metrics.duplicates(d.origin.node, d.channel, n);
    }

    /// A delivery became a dead letter after `deliveries` deliveries.
    pub(super) fn dead_lettered(
        &mut self,
        d: &crate::proto::DeliveryRef,
        deliveries: u32,
        reason: super::dead_letter::DeadLetterReason,
    ) {
        self.spans.inbound(d.origin, d.channel, || {
            tracing::trace!(target: MESSAGE_TARGET, id = %d.id, from = %d.origin, channel = d.channel.0, seq = d.seq, deliveries, ?reason, "dead-lettered")
        });
        #[cfg(feature = "metrics")]
        self.metrics.dead_letter(d.origin.node, d.channel, reason);
    }

    /// Carry out one step [`crate::proto::sends`] decided: trace and count it, and
    /// answer the receipt it resolves.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(super) fn report(&mut self, r: Report<PendingReceipt>, now: std::time::Instant) {
        match r {
            Report::HintReplayed(r) => {
                self.spans.outbound(r.peer, r.channel, || {
                    tracing::trace!(target: MESSAGE_TARGET, peer = %r.peer, channel = r.channel.0, seq = r.seq, "replayed hint acked")
                });
                #[cfg(feature = "metrics")]
                self.metrics.hint_replayed(r);
            }
            Report::GaveUp {
                send,
                id,
                reason,
                attempts,
            } => {
                self.spans.outbound(send.peer, send.channel, || {
                    tracing::trace!(target: MESSAGE_TARGET, %id, peer = %send.peer, channel = send.channel.0, seq = send.seq, ?reason, attempts, "gave up")
                });
                #[cfg(feature = "metrics")]
                self.metrics.gave_up(send);
            }
            Report::Rejected {
                send,
                reason,
                for_now,
            } => {
                self.spans.outbound(send.peer, send.channel, || {
                    tracing::trace!(target: MESSAGE_TARGET, peer = %send.peer, channel = send.channel.0, seq = send.seq, %reason, for_now, "rejected")
                });
                // A replayed hint refused for now stays in the store: not "refused
                // for good", which is what the metric counts.
                #[cfg(feature = "metrics")]
                if !for_now {
                    self.metrics.rejected(send, reason);
                }
            }
            Report::HintStored { send, id } => {
                self.spans.outbound(send.peer, send.channel, || {
                    tracing::trace!(target: MESSAGE_TARGET, %id, peer = %send.peer, channel = send.channel.0, seq = send.seq, "handed off to the hint store")
                });
                #[cfg(feature = "metrics")]
                self.metrics.hint_stored(send);
            }
            Report::Resolve {
                send,
                guarantee,
                reply,
                how,
            } => {
                let result = match how {
                    Resolution::Settled => {
                        self.spans.outbound(send.peer, send.channel, || {
                            tracing::trace!(target: MESSAGE_TARGET, peer = %send.peer, channel = send.channel.0, seq = send.seq, "acked")
                        });
                        let acked = guarantee != crate::id::Guarantee::AtMostOnce;
                        #[cfg(feature = "metrics")]
                        self.metrics.settled(send, &reply.tracked, acked, now);
                        Ok(if acked { Outcome::Acked } else { Outcome::Sent })
                    }
                    Resolution::HandedOff => Ok(Outcome::HandedOff),
                    Resolution::GaveUp {
                        reason: GiveUp::MaxAttempts,
                        attempts,
                    } => Err(SendError::AttemptsExhausted { attempts }),
                    Resolution::GaveUp { attempts, .. } => Err(SendError::Deadline { attempts }),
                    Resolution::HandoffRefused(e) => Err(SendError::HandoffRefused {
                        reason: HandoffRefusal::Store(std::sync::Arc::new(e)),
                    }),
                    Resolution::Rejected(reason) => {
                        tracing::debug!(peer = %send.peer, channel = send.channel.0, seq = send.seq, %reason, "message rejected by its receiver");
                        Err(SendError::Rejected { reason })
                    }
                    Resolution::Shutdown => Err(SendError::Shutdown),
                    Resolution::PeerDown => Err(SendError::PeerDown { peer: send.peer }),
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Sync the gauges from the endpoint (`force`: now, else when due).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(super) fn sync(
        &mut self,
        endpoint: &crate::proto::Endpoint,
        now: std::time::Instant,
        force: bool,
    ) {
        #[cfg(feature = "metrics")]
        self.metrics.sync(endpoint, now, force);
    }
}
