//! One node's protocol state: every outbound and inbound stream, peer incarnations,
//! message-ID dedup, and the events owed to the application.
//!
//! Sans-IO, in the manner of quinn-proto: inputs carry `now`
//! ([`Endpoint::send`], [`Endpoint::handle_frame`], [`Endpoint::handle_peer_up`],
//! [`Endpoint::handle_timeout`], [`Endpoint::complete`]), outputs are polled
//! ([`Endpoint::poll_transmit`], [`Endpoint::poll_event`], [`Endpoint::poll_timeout`]).
//! Must not do IO or read a clock; the tokio driver in `node` and the deterministic
//! simulation in the tests both drive this same type.

use super::config::ProtoConfig;
use super::inbound::{Arrival, InboundStream};
use super::outbound::{OutEvent, OutboundStream};
use crate::dedup::{Admit, Dedup};
use crate::fasthash::FastMap;
use crate::id::{ChannelId, Guarantee, MessageId, NodeId, Origin};
use crate::retry::GiveUp;
use crate::rng::SplitMix64;
use crate::wire::{Data, Frame, Heartbeat, Nack};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Identifies a message this node sent: the stream and its seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SendRef {
    /// Target node.
    pub peer: NodeId,
    /// Channel.
    pub channel: ChannelId,
    /// Stream seq.
    pub seq: u64,
}

/// Identifies a message handed to the application, for [`Endpoint::complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryRef {
    /// Sending node run.
    pub origin: Origin,
    /// Channel.
    pub channel: ChannelId,
    /// Stream seq.
    pub seq: u64,
    /// Dedup identity.
    pub id: MessageId,
    /// Guarantee the sender asked for.
    pub guarantee: Guarantee,
}

/// A message to send, for [`Endpoint::send`].
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Target node.
    pub peer: NodeId,
    /// Channel.
    pub channel: ChannelId,
    /// Guarantee of the channel.
    pub guarantee: Guarantee,
    /// The payload.
    pub payload: Bytes,
    /// Dedup identity: `None` for a library-assigned one; `Some(MessageId::Key(..))`
    /// for an application idempotency key; a stored message (hint) keeps the id it was
    /// first sent with.
    pub id: Option<MessageId>,
    /// Per-message deadline overriding the retry policy's.
    pub deadline: Option<Duration>,
}

/// How the application finished a delivered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Processed: ack it (and remember it in the dedup table).
    Ack,
    /// Not processed: tell the sender to retransmit (and forget it in the dedup table).
    Nack,
    /// Not processed and no nack sent (e.g. no receiver, receiver buffer full): the
    /// sender's retransmission timer brings it back.
    Refuse,
}

/// What the endpoint reports.
#[derive(Debug)]
pub enum Event {
    /// Hand a message to the application; finish it with [`Endpoint::complete`]
    /// (at-most-once messages need no completion).
    Deliver {
        /// Pass back to [`Endpoint::complete`].
        delivery: DeliveryRef,
        /// The payload.
        payload: Bytes,
    },
    /// The message was acknowledged by the receiver (at-most-once: transmitted).
    Settled(SendRef),
    /// The sender gave up on the message; the owner hands it off or fails its receipt.
    GaveUp {
        /// Which message.
        send: SendRef,
        /// Why.
        reason: GiveUp,
        /// The message, for the hint store.
        payload: Bytes,
        /// Its dedup identity.
        id: MessageId,
        /// Transmissions made.
        attempts: u32,
    },
    /// `n` more messages may be sent on the stream (its window slid).
    WindowOpened {
        /// Target node.
        peer: NodeId,
        /// Channel.
        channel: ChannelId,
        /// Slots freed.
        n: u64,
    },
    /// Any frame from `peer` arrived: evidence that it is alive (for the failure
    /// detector).
    Heard(NodeId),
    /// `peer` answered a [`Endpoint::ping`]: a heartbeat for the failure detector.
    HeartbeatAck(NodeId),
}

/// Errors from [`Endpoint::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream to this peer and channel already exists with another guarantee. Use
    /// one guarantee per channel.
    #[error("channel {channel:?} to {peer} already uses {existing:?}")]
    GuaranteeMismatch {
        /// Target.
        peer: NodeId,
        /// Channel.
        channel: ChannelId,
        /// Guarantee the stream has.
        existing: Guarantee,
    },
}

/// Protocol counters (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProtoStats {
    /// Messages accepted by `send`.
    pub sent: u64,
    /// Retransmissions.
    pub retransmitted: u64,
    /// Messages acknowledged by their receiver (at-most-once: transmitted).
    pub acked: u64,
    /// Messages given up by the sender (deadline or attempts).
    pub gave_up: u64,
    /// Messages handed to the application.
    pub delivered: u64,
    /// Arrivals dropped as duplicates (stream-level or by message ID).
    pub duplicates_dropped: u64,
    /// Arrivals not delivered because the same ID was still being processed.
    pub in_progress_dropped: u64,
    /// Arrivals refused by the dedup table (window overrun or table full); the sender
    /// retransmits them later.
    pub dedup_refused: u64,
    /// Arrivals dropped because the ordered-delivery buffer was full.
    pub reorder_overflow: u64,
    /// Frames ignored: from an unknown peer, for a previous incarnation, or malformed.
    pub frames_ignored: u64,
    /// Ack frames sent.
    pub acks_sent: u64,
    /// Nack frames sent.
    pub nacks_sent: u64,
    /// Dedup completions that failed to persist (durable dedup IO errors).
    pub dedup_persist_errors: u64,
    /// Data frames dropped because their peer already has
    /// [`ProtoConfig::max_streams_per_peer`] inbound streams.
    pub streams_refused: u64,
}

#[derive(Debug)]
struct Peer {
    origin: Origin,
    up: bool,
}

/// A node's whole protocol state. See the module docs for the call order.
#[derive(Debug)]
pub struct Endpoint {
    origin: Origin,
    config: ProtoConfig,
    dedup: Arc<Dedup>,
    peers: HashMap<NodeId, Peer>,
    outbound: FastMap<(NodeId, ChannelId), OutboundStream>,
    inbound: FastMap<(Origin, ChannelId), InboundStream>,
    ordered: HashMap<ChannelId, bool>,
    transmit: VecDeque<(NodeId, Frame)>,
    events: VecDeque<Event>,
    ready: Vec<Data>,
    rng: SplitMix64,
    stats: ProtoStats,
    /// Durable dedup records written but not yet fsynced.
    dedup_unsynced: bool,
    /// Peers with an unpolled `Event::Heard` (a handful at most).
    heard_pending: Vec<NodeId>,
}

impl Endpoint {
    /// An endpoint for the node run `origin`, deduplicating through `dedup`. `seed`
    /// drives retransmission jitter (fixed in simulations).
    pub fn new(origin: Origin, config: ProtoConfig, dedup: Arc<Dedup>, seed: u64) -> Self {
        Endpoint {
            origin,
            config,
            dedup,
            peers: HashMap::new(),
            outbound: FastMap::default(),
            inbound: FastMap::default(),
            ordered: HashMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            ready: Vec::new(),
            rng: SplitMix64::new(seed),
            stats: ProtoStats::default(),
            dedup_unsynced: false,
            heard_pending: Vec::new(),
        }
    }

    /// This node run.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The configuration.
    pub fn config(&self) -> &ProtoConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> ProtoStats {
        let mut s = self.stats;
        s.retransmitted = self.outbound.values().map(|o| o.retransmits()).sum();
        s
    }

    /// Accept messages on `channel`; `ordered` holds each stream's messages until
    /// their predecessors were delivered. Frames for channels not accepted are dropped
    /// unacked, so their senders keep retrying until a receiver appears.
    pub fn accept_channel(&mut self, channel: ChannelId, ordered: bool) {
        self.ordered.insert(channel, ordered);
    }

    /// Is `channel` accepted?
    pub fn accepts(&self, channel: ChannelId) -> bool {
        self.ordered.contains_key(&channel)
    }

    /// Queue a message. The caller bounds the window (see [`Event::WindowOpened`]):
    /// at most `config.max_in_flight` slots per stream.
    pub fn send(&mut self, now: Instant, msg: Outgoing) -> Result<SendRef, StreamError> {
        let Outgoing {
            peer,
            channel,
            guarantee,
            payload,
            id,
            deadline,
        } = msg;
        // An explicit id always travels: a replayed hint keeps the seq it was first sent
        // with, which is not the seq it gets now.
        let stream = self.outbound_stream(now, peer, channel, guarantee)?;
        let seq = stream.send(now, payload, id, deadline);
        self.stats.sent += 1;
        Ok(SendRef { peer, channel, seq })
    }

    /// Unsettled messages to `peer`, with their payload and dedup identity (for handing
    /// them off when the peer is declared down).
    pub fn in_flight_to(&self, peer: NodeId) -> Vec<(SendRef, Bytes, MessageId)> {
        let mut out = Vec::new();
        for ((p, channel), s) in &self.outbound {
            if *p == peer {
                for (seq, payload, id) in s.unsettled() {
                    out.push((
                        SendRef {
                            peer,
                            channel: *channel,
                            seq,
                        },
                        payload,
                        id,
                    ));
                }
            }
        }
        out
    }

    /// Take an unsettled message out of its stream (it was stored as a hint): no
    /// retransmission, no receipt event; its implicit id stays unsettled for the
    /// receiver's dedup until [`Endpoint::hint_settled`]. Returns whether it was there.
    pub fn hand_off(&mut self, send: SendRef) -> bool {
        let Some(s) = self.outbound.get_mut(&(send.peer, send.channel)) else {
            return false;
        };
        let Some(id) = s.take(send.seq) else {
            return false;
        };
        s.mark_hinted(send.seq, id);
        Self::drain_stream(
            &mut self.events,
            &mut self.stats,
            send.peer,
            send.channel,
            s,
        );
        true
    }

    /// Take an unsettled message out of its stream for good (its sender was told it
    /// failed): no retransmission, no event, and its id is settled. Returns whether it
    /// was there.
    pub fn abandon(&mut self, send: SendRef) -> bool {
        let Some(s) = self.outbound.get_mut(&(send.peer, send.channel)) else {
            return false;
        };
        let taken = s.take(send.seq).is_some();
        Self::drain_stream(
            &mut self.events,
            &mut self.stats,
            send.peer,
            send.channel,
            s,
        );
        taken
    }

    /// A given-up message ([`Event::GaveUp`]) was stored in the hint store: its implicit
    /// id stays unsettled for the receiver's dedup until [`Endpoint::hint_settled`].
    pub fn hint_stored(&mut self, send: SendRef, id: MessageId) {
        if let Some(s) = self.outbound.get_mut(&(send.peer, send.channel)) {
            s.mark_hinted(send.seq, id);
        }
    }

    /// The hint for `send` was delivered or dropped for good.
    pub fn hint_settled(&mut self, send: SendRef) {
        if let Some(s) = self.outbound.get_mut(&(send.peer, send.channel)) {
            s.hint_done(send.seq);
        }
    }

    /// A connection to `origin.node` completed its handshake. A new incarnation means
    /// the peer restarted. Either way unacked messages are retransmitted at once: the
    /// old connection may have swallowed them.
    pub fn handle_peer_up(&mut self, _now: Instant, origin: Origin) {
        let restarted = match self.peers.get(&origin.node) {
            Some(p) => p.origin != origin,
            None => false,
        };
        if restarted {
            let old = self.peers[&origin.node].origin;
            // Stream state of the previous run is useless now; its dedup state stays
            // in `Dedup` (hint replays of its messages still need it).
            self.inbound.retain(|(o, _), _| *o != old);
        }
        self.peers.insert(origin.node, Peer { origin, up: true });
        for ((peer, _), s) in self.outbound.iter_mut() {
            if *peer == origin.node {
                s.handle_reconnect();
            }
        }
    }

    /// The connection to `peer` was lost.
    pub fn handle_peer_down(&mut self, _now: Instant, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.up = false;
        }
    }

    /// Is there a live connection to `peer`?
    pub fn is_up(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// A frame arrived from `from`.
    pub fn handle_frame(&mut self, now: Instant, from: NodeId, frame: Frame) {
        let Some(peer_origin) = self.peers.get(&from).map(|p| p.origin) else {
            self.stats.frames_ignored += 1;
            return;
        };
        // One Heard per peer until the owner has seen it, not one per frame.
        if !self.heard_pending.contains(&from) {
            self.heard_pending.push(from);
            self.events.push_back(Event::Heard(from));
        }
        match frame {
            Frame::Data(data) => self.on_data(now, peer_origin, data),
            Frame::Ack(ack) => {
                if ack.incarnation != self.origin.incarnation {
                    self.stats.frames_ignored += 1;
                    return;
                }
                if let Some(s) = self.outbound.get_mut(&(from, ack.channel)) {
                    s.handle_ack(now, ack.cumulative, &ack.ranges);
                    Self::drain_stream(&mut self.events, &mut self.stats, from, ack.channel, s);
                } else {
                    self.stats.frames_ignored += 1;
                }
            }
            Frame::Nack(nack) => {
                if nack.incarnation != self.origin.incarnation {
                    self.stats.frames_ignored += 1;
                    return;
                }
                if let Some(s) = self.outbound.get_mut(&(from, nack.channel)) {
                    s.handle_nack(nack.seq);
                }
            }
            Frame::Ping(hb) => self.transmit.push_back((from, Frame::Pong(hb))),
            Frame::Pong(_) => self.events.push_back(Event::HeartbeatAck(from)),
            Frame::Handshake(_) => self.stats.frames_ignored += 1,
        }
    }

    /// Ask `peer` for a heartbeat answer.
    pub fn ping(&mut self, peer: NodeId, nonce: u64) {
        self.transmit
            .push_back((peer, Frame::Ping(Heartbeat { nonce })));
    }

    /// The application finished a delivered message.
    pub fn complete(&mut self, now: Instant, delivery: DeliveryRef, how: Completion) {
        if delivery.guarantee == Guarantee::AtMostOnce {
            return; // settled at delivery time
        }
        if delivery.guarantee == Guarantee::EffectivelyOnce {
            match how {
                Completion::Ack => {
                    // Group commit: written now, fsynced once before the acks of this
                    // burst leave (see `handle_timeout`).
                    self.dedup_unsynced = true;
                    if let Err(e) = self.dedup.complete_unsynced(&delivery.id, now) {
                        self.stats.dedup_persist_errors += 1;
                        tracing::warn!(id = %delivery.id, error = %e, "dedup completion not persisted");
                    }
                }
                Completion::Nack | Completion::Refuse => self.dedup.release(&delivery.id),
            }
        }
        let current = self
            .peers
            .get(&delivery.origin.node)
            .is_some_and(|p| p.origin == delivery.origin);
        let Some(stream) = self.inbound.get_mut(&(delivery.origin, delivery.channel)) else {
            return; // the sender restarted since; nothing to ack
        };
        match how {
            Completion::Ack => stream.complete(now, delivery.seq, true),
            Completion::Nack => {
                stream.fail(delivery.seq);
                if current {
                    self.stats.nacks_sent += 1;
                    self.transmit.push_back((
                        delivery.origin.node,
                        Frame::Nack(Nack {
                            channel: delivery.channel,
                            incarnation: delivery.origin.incarnation,
                            seq: delivery.seq,
                        }),
                    ));
                }
            }
            Completion::Refuse => stream.fail(delivery.seq),
        }
    }

    /// Timers due at `now`: retransmissions, give-ups, owed acks. Durable dedup
    /// records of completed messages are fsynced (once) before any ack is produced.
    pub fn handle_timeout(&mut self, now: Instant) {
        if std::mem::take(&mut self.dedup_unsynced) {
            if let Err(e) = self.dedup.sync() {
                // The messages were processed: acking them is still right (withholding
                // the ack would guarantee a second processing); a later resend of the
                // same id after a restart may be processed again. Counted and logged.
                self.stats.dedup_persist_errors += 1;
                tracing::warn!(error = %e, "dedup records not fsynced");
            }
        }
        for (&(peer, channel), s) in self.outbound.iter_mut() {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
                Self::drain_stream(&mut self.events, &mut self.stats, peer, channel, s);
            }
        }
        for (&(origin, _), s) in self.inbound.iter_mut() {
            if let Some(ack) = s.poll_ack(now) {
                self.stats.acks_sent += 1;
                self.transmit.push_back((origin.node, Frame::Ack(ack)));
            }
        }
    }

    /// Earliest instant `handle_timeout` has work (may be early, never late).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let out = self.outbound.values().filter_map(|s| s.poll_timeout());
        let inb = self.inbound.values().filter_map(|s| s.ack_deadline());
        out.chain(inb).min()
    }

    /// Next frame to transmit, and to whom. Call until `None` after every input.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(NodeId, Frame)> {
        if let Some(t) = self.transmit.pop_front() {
            return Some(t);
        }
        // Move every stream's ready frames at once (one pass over the streams and one
        // event drain per stream, not per frame).
        for (&(peer, channel), s) in self.outbound.iter_mut() {
            let before = self.transmit.len();
            while let Some(data) = s.poll_transmit(now) {
                self.transmit.push_back((peer, Frame::Data(data)));
            }
            if self.transmit.len() > before {
                Self::drain_stream(&mut self.events, &mut self.stats, peer, channel, s);
            }
        }
        self.transmit.pop_front()
    }

    /// Next event for the owner.
    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front()?;
        if let Event::Heard(peer) = ev {
            self.heard_pending.retain(|p| *p != peer);
        }
        Some(ev)
    }

    fn outbound_stream(
        &mut self,
        now: Instant,
        peer: NodeId,
        channel: ChannelId,
        guarantee: Guarantee,
    ) -> Result<&mut OutboundStream, StreamError> {
        let origin = self.origin;
        let seed = self.rng.next_u64();
        let config = &self.config;
        let stream = self
            .outbound
            .entry((peer, channel))
            .or_insert_with(|| OutboundStream::new(origin, channel, guarantee, config, seed, now));
        if stream.guarantee() != guarantee {
            return Err(StreamError::GuaranteeMismatch {
                peer,
                channel,
                existing: stream.guarantee(),
            });
        }
        Ok(stream)
    }

    fn on_data(&mut self, now: Instant, origin: Origin, data: Data) {
        let channel = data.channel;
        let Some(&ordered) = self.ordered.get(&channel) else {
            // No receiver: drop unacked; the sender retries until one appears.
            self.stats.frames_ignored += 1;
            return;
        };
        if !self.inbound.contains_key(&(origin, channel)) {
            let open = self.inbound.keys().filter(|(o, _)| *o == origin).count();
            if open >= self.config.max_streams_per_peer {
                self.stats.streams_refused += 1;
                tracing::debug!(%origin, ?channel, "inbound stream refused: per-peer limit");
                return;
            }
        }
        let cfg = &self.config;
        let stream = self.inbound.entry((origin, channel)).or_insert_with(|| {
            InboundStream::new(
                origin,
                channel,
                ordered,
                cfg.ack_delay,
                cfg.max_ack_ranges,
                cfg.max_reorder_buffer,
            )
        });
        let id_floor = data.id_floor;
        let eo = data.guarantee == Guarantee::EffectivelyOnce;
        // Offered on every effectively-once frame, not only when it moved: the dedup
        // stream may have been retired (idle past the retention) and forgotten since,
        // and the floor is what lets it restart at the right place.
        if eo && id_floor > 1 {
            stream.last_id_floor = stream.last_id_floor.max(id_floor);
            if let Err(e) = self.dedup.advance_floor(origin, channel, id_floor, now) {
                self.stats.dedup_persist_errors += 1;
                tracing::warn!(%origin, error = %e, "dedup floor not persisted");
            }
        }
        let mut ready = std::mem::take(&mut self.ready);
        match stream.on_data(now, data, &mut ready) {
            Arrival::Duplicate => self.stats.duplicates_dropped += 1,
            Arrival::InProgress => self.stats.in_progress_dropped += 1,
            Arrival::BufferFull => self.stats.reorder_overflow += 1,
            Arrival::Ready | Arrival::Buffered => {}
        }
        for d in ready.drain(..) {
            let id = d.id.unwrap_or(MessageId::Seq {
                origin,
                channel,
                seq: d.seq,
            });
            let delivery = DeliveryRef {
                origin,
                channel,
                seq: d.seq,
                id,
                guarantee: d.guarantee,
            };
            match d.guarantee {
                Guarantee::AtMostOnce => {
                    // Settled on delivery: a transport duplicate is never delivered,
                    // whatever the application does with this one.
                    stream.complete(now, d.seq, false);
                }
                Guarantee::AtLeastOnce => {}
                Guarantee::EffectivelyOnce => match self.dedup.begin(&id, now) {
                    Ok(Admit::Fresh) => {}
                    Ok(Admit::Duplicate) => {
                        self.stats.duplicates_dropped += 1;
                        stream.complete(now, d.seq, true);
                        continue;
                    }
                    Ok(Admit::InProgress) => {
                        self.stats.in_progress_dropped += 1;
                        stream.fail(d.seq);
                        continue;
                    }
                    Err(e) => {
                        self.stats.dedup_refused += 1;
                        tracing::debug!(%id, error = %e, "dedup refused a message; sender will retry");
                        stream.fail(d.seq);
                        continue;
                    }
                },
            }
            self.stats.delivered += 1;
            self.events.push_back(Event::Deliver {
                delivery,
                payload: d.payload,
            });
        }
        self.ready = ready;
    }

    fn drain_stream(
        events: &mut VecDeque<Event>,
        stats: &mut ProtoStats,
        peer: NodeId,
        channel: ChannelId,
        s: &mut OutboundStream,
    ) {
        while let Some(ev) = s.poll_event() {
            match ev {
                OutEvent::Settled { seq } => {
                    stats.acked += 1;
                    events.push_back(Event::Settled(SendRef { peer, channel, seq }));
                }
                OutEvent::GaveUp {
                    seq,
                    reason,
                    payload,
                    id,
                    attempts,
                } => {
                    stats.gave_up += 1;
                    events.push_back(Event::GaveUp {
                        send: SendRef { peer, channel, seq },
                        reason,
                        payload,
                        id,
                        attempts,
                    });
                }
            }
        }
        let n = s.take_opened();
        if n > 0 {
            events.push_back(Event::WindowOpened { peer, channel, n });
        }
    }
}
