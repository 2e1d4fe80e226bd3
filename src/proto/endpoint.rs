//! One node's protocol state: every outbound and inbound stream, peer incarnations,
//! message-ID dedup, and the events owed to the application.
//!
//! Sans-IO, in the manner of quinn-proto: inputs carry `now`
//! ([`Endpoint::send`], [`Endpoint::handle_frame`], [`Endpoint::handle_peer_up`],
//! [`Endpoint::handle_timeout`], [`Endpoint::complete`]), outputs are polled
//! ([`Endpoint::poll_transmit`], [`Endpoint::poll_event`], [`Endpoint::poll_timeout`]).
//! Must not do IO or read a clock; the tokio driver in `node` and the deterministic
//! simulation in the tests both drive this same type.

use super::active::ActiveMap;
use super::config::ProtoConfig;
use super::inbound::{Arrival, InboundStream, Known, StreamMark};
use super::outbound::{
    self as outbound, Counters, Dormant, OutEvent, OutboundStream, CREDIT_SLACK, INITIAL_CREDIT,
    INITIAL_NODE_CREDIT,
};
use crate::dedup::{Admit, Dedup};
use crate::id::{ChannelId, Guarantee, MessageId, NodeId, Origin};
use crate::retry::GiveUp;
use crate::rng::SplitMix64;
use crate::wire::{CreditProbe, Data, Frame, Heartbeat, Nack, Reject, RejectReason, SeqRange};
use bytes::Bytes;
use rustc_hash::FxHashMap as FastMap;
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
    /// Payload type fingerprint the message carried (`0`: none; see
    /// [`Accept::schema`]).
    pub schema: u32,
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
    /// Payload type fingerprint (`0`: unchecked); see [`Data::schema`].
    pub schema: u32,
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
    /// Refused for good (e.g. a payload the typed receiver cannot decode): settled
    /// without processing, never delivered again, and the sender told why with a
    /// [`Reject`] frame (protocol version 3; an older sender gets an ack, since
    /// retrying cannot help). The owner puts the message in its dead letters.
    Reject(RejectReason),
}

/// How a channel is received, for [`Endpoint::accept_channel_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Accept {
    /// Deliver each stream's messages in send order (see `proto::inbound`).
    pub ordered: bool,
    /// Deliveries of one message (first delivery plus redeliveries after nacks or
    /// drops) before it goes to the dead letters instead: [`Event::DeadLetter`], and a
    /// [`RejectReason::DeadLettered`] to the sender. `None`: no limit.
    pub max_deliveries: Option<u32>,
    /// Payload type fingerprint the channel's receiver expects (`0`: unchecked). A
    /// message carrying another non-zero fingerprint is rejected with
    /// [`RejectReason::TypeMismatch`] and never delivered.
    pub schema: u32,
}

impl Accept {
    /// Ordering and delivery limit; no type check.
    pub fn new(ordered: bool, max_deliveries: Option<u32>) -> Self {
        Accept {
            ordered,
            max_deliveries,
            schema: 0,
        }
    }

    /// The same, checking payload type fingerprints against `schema` (`0`: unchecked).
    pub fn schema(self, schema: u32) -> Self {
        Accept { schema, ..self }
    }
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
    /// The receiver refused the message for good (protocol version 3).
    Rejected {
        /// Which message.
        send: SendRef,
        /// The receiver's reason.
        reason: RejectReason,
    },
    /// A received message reached its channel's delivery limit: it is not delivered
    /// again; the owner keeps it as a dead letter. (Already settled: no completion.)
    DeadLetter {
        /// Which message.
        delivery: DeliveryRef,
        /// The payload.
        payload: Bytes,
        /// How many times it was delivered.
        deliveries: u32,
    },
    /// Any frame from `peer` arrived: evidence that it is alive (for the failure
    /// detector).
    Heard(NodeId),
    /// `peer` answered a [`Endpoint::ping`]: a heartbeat for the failure detector.
    HeartbeatAck(NodeId),
}

/// The largest sequence number a stream may use, and so the largest seq or floor a
/// frame may carry: 2^62. A stream sending a billion messages a second reaches it in
/// about 146 years; a frame beyond it is a lie and is dropped (counted in
/// [`ProtoStats::malformed_dropped`]), which keeps every sequence computation far
/// from overflow.
pub const MAX_SEQ: u64 = 1 << 62;

/// Live outbound streams (over every peer) at which a new one first puts the settled,
/// quiet ones aside as dormant records (see `proto::outbound`, "Dormant streams");
/// after a sweep, the next comes at twice the streams left live. A sender with fewer
/// (peer, channel) streams never sweeps; one that uses a new channel per request keeps
/// about 80 bytes (plus the map's slack) per channel it has used, for as long as it
/// runs, instead of the few KiB of a live stream.
pub(crate) const DORMANT_SWEEP_MIN: usize = 1024;

/// Effectively-once ids whose failed deliveries are counted across copies (the same
/// id sent again, or from another sender, while a copy is in the handler): a copy
/// handed out in place of a failed one goes on from the failures of the id, so
/// `max_deliveries` bounds the deliveries of the message, not of each copy. The map is
/// cleared when full; the per-copy count still bounds each copy.
const MAX_ID_FAILURES: usize = 1 << 16;

/// How long copies of a dead-lettered effectively-once id are refused as dead-lettered
/// without a new delivery or letter: the copies that were on their way (a copy
/// retransmitted after its failure, another sender's). A copy arriving later is a new
/// attempt.
const DEAD_ID_MEMORY: Duration = Duration::from_secs(120);

/// See [`Endpoint::id_failures`].
#[derive(Clone, Copy, Debug, Default)]
struct IdFailures {
    failures: u32,
    /// When a delivery of the id last failed: a count older than [`DEAD_ID_MEMORY`]
    /// is forgotten (the copies it counted are gone; a copy sent now is a new attempt).
    last_failure: Option<Instant>,
    /// Dead-lettered: copies are refused until then.
    dead_until: Option<Instant>,
}

impl IdFailures {
    /// The failures that still count at `now`.
    fn current(&self, now: Instant) -> u32 {
        match self.last_failure {
            Some(t) if now.saturating_duration_since(t) < DEAD_ID_MEMORY => self.failures,
            _ => 0,
        }
    }
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

/// Protocol counters. Each only grows, except [`delivered`](Self::delivered), which
/// counts back the deliveries taken back before the application saw them.
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
    /// Messages handed to the application. A delivery taken back before the
    /// application saw it (its receiver was dropped with it queued, or shutdown's
    /// handler grace ran out) is subtracted again and counted in
    /// [`deliveries_refused`](Self::deliveries_refused), so this can go down; its
    /// redelivery counts again when it is handed out. Use saturating arithmetic on
    /// differences.
    pub delivered: u64,
    /// Arrivals dropped as duplicates (stream-level or by message ID).
    pub duplicates_dropped: u64,
    /// Arrivals of an ID that was still being processed (a retransmission of it, or
    /// the same application key sent again). The first of them per message waits for
    /// the original: it is acked when the original is acked, or delivered in its place
    /// when the original is nacked or dropped.
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
    /// Idle inbound streams dropped to make room for a new stream of the same peer at
    /// [`ProtoConfig::max_streams_per_peer`] (made again by their next frame).
    pub streams_recycled: u64,
    /// Sending side: first transmissions that waited for the receiver's credit.
    pub credit_waits: u64,
    /// Sending side: credit probes (a blocked message sent to ask for fresh credit).
    pub credit_probes: u64,
    /// Sending side: probes sent by held messages' re-checks, asking the receiver for
    /// an ack of its current state (a finishing ack or a nack may have been lost).
    pub held_probes: u64,
    /// Receiving side: data frames dropped unacked because their stream was past the
    /// credit it was granted (plus slack): a sender ignoring flow control.
    pub credit_exceeded: u64,
    /// Receiving side: deliveries taken back before the application saw them (its
    /// receiver was gone); ordered streams rewind to them.
    pub deliveries_refused: u64,
    /// Data frames refused by [`Authorization`](super::Authorization) before touching a
    /// stream or the dedup table: the sender may not send on the channel, or the frame's
    /// id names another node and the sender may not relay.
    pub unauthorized_dropped: u64,
    /// Frames whose sequence numbers no honest sender produces (a seq of 0 or above
    /// [`MAX_SEQ`], a floor above the frame's own seq), dropped before touching any
    /// stream or dedup state.
    pub malformed_dropped: u64,
    /// Receiving side: reject frames sent (each reason, retransmissions included).
    pub rejects_sent: u64,
    /// Receiving side: messages refused for good (rejected once each; dead letters
    /// included).
    pub rejected: u64,
    /// Receiving side: messages that reached their channel's delivery limit.
    pub dead_lettered: u64,
    /// Receiving side: messages whose payload type fingerprint differed from the typed
    /// receiver's (rejected, never delivered).
    pub type_mismatches: u64,
    /// Sending side: messages the receiver rejected.
    pub rejects_received: u64,
    /// Sending side: times transmission to a peer stopped for lack of node credit
    /// ([`ProtoConfig::node_credit`]).
    pub node_credit_waits: u64,
    /// Receiving side: node credit updates sent.
    pub node_credits_sent: u64,
}

/// Counters of one outbound stream (see [`Endpoint::stream_counters`]); monotonic
/// while the stream lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamCounters {
    /// Target node.
    pub peer: NodeId,
    /// Channel.
    pub channel: ChannelId,
    /// Retransmissions ([`ProtoStats::retransmitted`]).
    pub retransmitted: u64,
    /// First transmissions that waited for the receiver's stream credit
    /// ([`ProtoStats::credit_waits`]).
    pub credit_waits: u64,
    /// Transmissions that waited for node credit ([`ProtoStats::node_credit_waits`]).
    pub node_credit_waits: u64,
}

#[derive(Debug)]
struct Peer {
    origin: Origin,
    up: bool,
    /// Protocol version of the current connection: what the peer understands.
    version: u16,
    /// When the last frame of any kind came from the peer: a stream whose own
    /// probe went unanswered while the peer talked lost it (`proto::outbound`,
    /// "Silent streams").
    heard: Option<Instant>,
    /// The last ping sent (nonce, when) and the shortest ping round trip seen: a
    /// floor for how soon an answer can come, which the streams' own samples (taken
    /// after the receiver's handler ran) may not give.
    ping: Option<(u64, Instant)>,
    min_rtt: Option<Duration>,
}

/// A node's whole protocol state. See the module docs for the call order.
#[derive(Debug)]
pub struct Endpoint {
    origin: Origin,
    config: ProtoConfig,
    dedup: Arc<Dedup>,
    peers: FastMap<NodeId, Peer>,
    /// Streams by key; the per-input scans visit only the active ones (see
    /// [`ActiveMap`]).
    outbound: ActiveMap<(NodeId, ChannelId), OutboundStream>,
    /// Outbound streams put aside settled and quiet (see [`DORMANT_SWEEP_MIN`]), and
    /// their counters summed for [`Endpoint::stats`].
    dormant: FastMap<(NodeId, ChannelId), Dormant>,
    dormant_counters: Counters,
    /// How many live outbound streams make the next new one sweep the quiet ones
    /// into `dormant`.
    dormant_sweep_at: usize,
    inbound: ActiveMap<(Origin, ChannelId), InboundStream>,
    /// The channels of each origin's inbound streams (the per-peer limit and the
    /// recycling scan look at one peer's streams, not at every peer's).
    inbound_of: FastMap<Origin, rustc_hash::FxHashSet<ChannelId>>,
    channels: FastMap<ChannelId, Accept>,
    /// Channels without a receiver that got data, and since when (bounded).
    unclaimed: FastMap<ChannelId, Instant>,
    /// When `unclaimed`, full, last dropped its entries past the grace.
    unclaimed_swept: Option<Instant>,
    /// Credit granted to streams whose frames find no receiver (see
    /// `grant_orphan_credit`); bounded, cleared when full.
    orphan_grants: FastMap<(Origin, ChannelId), u64>,
    /// Where recycled streams stopped (see `recycle_idle_stream`); bounded, cleared
    /// when full.
    marks: FastMap<(Origin, ChannelId), StreamMark>,
    transmit: VecDeque<(NodeId, Frame)>,
    /// Messages taken out of their streams unacknowledged, whose frames the owner's
    /// transport may still hold ([`Endpoint::drain_withdrawn`]).
    withdrawn: Vec<SendRef>,
    events: VecDeque<Event>,
    ready: Vec<Data>,
    /// Deliveries handed out (queued for `poll_event` or polled) and not finished, per
    /// sending node, whatever its incarnation: what bounds a peer across restarts (see
    /// `node_hold`).
    app_held: FastMap<NodeId, u64>,
    rng: SplitMix64,
    stats: ProtoStats,
    /// Peers with an unpolled `Event::Heard` (a handful at most).
    heard_pending: Vec<NodeId>,
    /// Arrivals waiting for another delivery of the same ID to finish, oldest first.
    waiting: HashMap<MessageId, VecDeque<Parked>>,
    /// Failed deliveries of each effectively-once id, over every copy of it, and
    /// whether it was dead-lettered (see [`MAX_ID_FAILURES`]); dropped when the id is
    /// acked.
    id_failures: FastMap<MessageId, IdFailures>,
    /// Nacks no longer count toward `max_deliveries` ([`Endpoint::stop_counting_nacks`]).
    nacks_uncounted: bool,
    /// Refused deliveries are no longer nacked (see `stop_nacking_refusals`).
    refusals_unnacked: bool,
    authz: super::Authorization,
    /// Sending side: node credit per peer (protocol version 3).
    node_out: FastMap<NodeId, NodeOut>,
    /// Receiving side: node credit granted per peer.
    node_in: FastMap<NodeId, NodeIn>,
}

/// What a peer lets this node send it on the current connection.
/// Does `origin` (its current run) speak protocol version 3, so that it can be told of
/// a refusal with a [`Reject`]?
fn speaks_v3(peers: &FastMap<NodeId, Peer>, origin: Origin) -> bool {
    peers
        .get(&origin.node)
        .is_some_and(|p| p.origin == origin && p.version >= 3)
}

/// An ack never covers a seq whose reject the sender has not confirmed (by moving its
/// floor past it): the cumulative ack stops below the first such seq, and ranges cover
/// the settled seqs above it. A reject can be lost with its connection while a later
/// ack, still queued in the transport, goes out on the next one; the sender would
/// take the seq for acked. Held back, the seq stays outstanding there, and its
/// retransmission meets the reject again. (Regression: a dead-lettered message's
/// receipt said `Acked` across a connection cut.) `rejected` is ascending.
fn hold_back_rejected(ack: &mut crate::wire::Ack, rejected: impl Iterator<Item = u64>) {
    let cumulative = ack.cumulative;
    let mut held = rejected.take_while(|s| *s <= cumulative).peekable();
    let Some(&first) = held.peek() else {
        return;
    };
    let mut below = Vec::new();
    let mut start = first + 1;
    for seq in held {
        if seq > start {
            below.push(SeqRange {
                start,
                end: seq - 1,
            });
        }
        start = seq + 1;
    }
    if start <= cumulative {
        below.push(SeqRange {
            start,
            end: cumulative,
        });
    }
    ack.cumulative = first - 1;
    below.append(&mut ack.ranges);
    ack.ranges = below;
    // Within what a decoder accepts: the highest ranges wait (their seqs stay
    // outstanding at the sender, and a retransmission is acked again). (Regression:
    // one range more than `MAX_ACK_RANGES`, and the sender closed the connection on
    // a malformed frame.)
    ack.ranges.truncate(crate::wire::MAX_ACK_RANGES);
}

/// The reject of `origin`'s message `seq` on `channel`, addressed to it.
fn reject_frame(
    origin: Origin,
    channel: ChannelId,
    seq: u64,
    reason: RejectReason,
) -> (NodeId, Frame) {
    (
        origin.node,
        Frame::Reject(Reject {
            channel,
            incarnation: origin.incarnation,
            seq,
            reason,
        }),
    )
}

/// The nack of `origin`'s message `seq` on `channel`, addressed to it.
fn nack_frame(origin: Origin, channel: ChannelId, seq: u64) -> (NodeId, Frame) {
    (
        origin.node,
        Frame::Nack(Nack {
            channel,
            incarnation: origin.incarnation,
            seq,
        }),
    )
}

/// Wait before the `probes`-th node credit probe: 200 ms doubling to 5 s.
fn node_probe_interval(probes: u32) -> Duration {
    Duration::from_millis(200)
        .saturating_mul(1 << probes.min(5))
        .min(super::MAX_PROBE_INTERVAL)
}

#[derive(Debug, Clone, Copy)]
struct NodeOut {
    /// `None`: the peer grants no node credit (protocol 2 or older).
    limit: Option<u64>,
    /// Data frames put on the connection so far.
    sent: u64,
    /// Blocked on node credit: when to probe, on which channel, how many probes so far.
    probe_due: Option<Instant>,
    probe_channel: ChannelId,
    probes: u32,
    /// `sent` when the last probe left (see [`crate::wire::NodeCredit::received`]).
    sent_at_probe: Option<u64>,
}

impl NodeOut {
    fn new(limit: Option<u64>) -> Self {
        NodeOut {
            limit,
            sent: 0,
            probe_due: None,
            probe_channel: ChannelId(0),
            probes: 0,
            sent_at_probe: None,
        }
    }

    fn budget(&self) -> u64 {
        self.limit.map_or(u64::MAX, |l| l.saturating_sub(self.sent))
    }
}

/// What this node granted a peer on the current connection.
#[derive(Debug, Clone, Copy, Default)]
struct NodeIn {
    /// Data frames received on the connection so far.
    received: u64,
    /// The last limit sent.
    advertised: u64,
    /// A grant is owed (new connection, or the peer probed).
    owed: bool,
}

/// An arrival parked behind a delivery of the same message ID still in progress.
#[derive(Debug)]
struct Parked {
    origin: Origin,
    data: Data,
}

impl Endpoint {
    /// An endpoint for the node run `origin`, deduplicating through `dedup`. `seed`
    /// drives retransmission jitter (fixed in simulations).
    pub fn new(origin: Origin, config: ProtoConfig, dedup: Arc<Dedup>, seed: u64) -> Self {
        Endpoint {
            origin,
            config,
            dedup,
            peers: FastMap::default(),
            outbound: ActiveMap::default(),
            dormant: FastMap::default(),
            dormant_counters: Counters::default(),
            dormant_sweep_at: DORMANT_SWEEP_MIN,
            inbound: ActiveMap::default(),
            inbound_of: FastMap::default(),
            channels: FastMap::default(),
            unclaimed: FastMap::default(),
            unclaimed_swept: None,
            orphan_grants: FastMap::default(),
            marks: FastMap::default(),
            transmit: VecDeque::new(),
            withdrawn: Vec::new(),
            events: VecDeque::new(),
            ready: Vec::new(),
            app_held: FastMap::default(),
            rng: SplitMix64::new(seed),
            stats: ProtoStats::default(),
            heard_pending: Vec::new(),
            waiting: HashMap::new(),
            id_failures: FastMap::default(),
            nacks_uncounted: false,
            refusals_unnacked: false,
            authz: super::Authorization::default(),
            node_out: FastMap::default(),
            node_in: FastMap::default(),
        }
    }

    /// Who may send on which channel, and who may relay for other nodes. Default
    /// [`Authorization::default`](super::Authorization::default).
    pub fn set_authorization(&mut self, authz: super::Authorization) {
        self.authz = authz;
    }

    /// This node run.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The configuration.
    pub fn config(&self) -> &ProtoConfig {
        &self.config
    }

    /// The dedup table's counters.
    pub fn dedup_stats(&self) -> crate::dedup::DedupStats {
        self.dedup.stats()
    }

    /// Counters.
    pub fn stats(&self) -> ProtoStats {
        let mut s = self.stats;
        let mut c = self.dormant_counters;
        for o in self.outbound.values() {
            c.add(&o.counters());
        }
        s.retransmitted = c.retransmits;
        s.credit_waits += c.credit_waits;
        s.credit_probes += c.credit_probes;
        s.held_probes += c.held_probes;
        s.node_credit_waits += c.node_waits;
        s
    }

    /// Each live outbound stream's own counters, the ones [`Endpoint::stats`] sums
    /// (with those of dormant streams, which go on from them when resumed): for
    /// per-peer, per-channel metrics (the node's `metrics` feature).
    pub fn stream_counters(&self) -> impl Iterator<Item = StreamCounters> + '_ {
        self.outbound
            .iter()
            .map(|(&(peer, channel), o)| StreamCounters {
                peer,
                channel,
                retransmitted: o.retransmits(),
                credit_waits: o.credit_counters().0,
                node_credit_waits: o.node_waits(),
            })
    }

    /// [`ProtoStats::duplicates_dropped`] alone, without assembling the whole
    /// [`ProtoStats`] (the driver reads it around each data frame to trace and count
    /// duplicates per stream).
    pub fn duplicates_dropped(&self) -> u64 {
        self.stats.duplicates_dropped
    }

    /// Accept messages on `channel`; `ordered` holds each stream's messages until
    /// their predecessors were delivered. Frames for channels not accepted are dropped
    /// unacked, so their senders keep retrying until a receiver appears.
    pub fn accept_channel(&mut self, channel: ChannelId, ordered: bool) {
        self.accept_channel_with(channel, Accept::new(ordered, None));
    }

    /// Accept messages on `channel` with `how` (ordering, delivery limit).
    pub fn accept_channel_with(&mut self, channel: ChannelId, how: Accept) {
        self.channels.insert(channel, how);
        self.unclaimed.remove(&channel);
    }

    /// Stop accepting `channel` (its receiver is gone). Its streams stay; new arrivals
    /// are treated as having no receiver (left unacked, then rejected after
    /// [`ProtoConfig::no_receiver_grace`]).
    pub fn unaccept_channel(&mut self, channel: ChannelId) {
        self.channels.remove(&channel);
    }

    /// Deliveries handed towards the application (queued for or held by a receiver)
    /// and not finished yet, over every peer.
    pub fn held_by_application(&self) -> u64 {
        self.app_held.values().sum()
    }

    /// Is `channel` accepted?
    pub fn accepts(&self, channel: ChannelId) -> bool {
        self.channels.contains_key(&channel)
    }

    /// Does the durable dedup hold records that must reach the disk before the next
    /// acks may leave? The endpoint does no IO: its owner then calls
    /// [`Dedup::sync`] on [`Endpoint::dedup`] (the write and fsync; one per burst:
    /// group commit), reports the outcome with [`Endpoint::persisted`], and only then
    /// calls [`handle_timeout`](Self::handle_timeout), which holds every ack back
    /// while records wait. Always `false` without durable dedup.
    pub fn persist_owed(&self) -> bool {
        self.dedup.needs_sync()
    }

    /// The dedup this endpoint checks arrivals against.
    pub fn dedup(&self) -> &Arc<Dedup> {
        &self.dedup
    }

    /// The outcome of the [`Dedup::sync`] that [`persist_owed`](Self::persist_owed)
    /// asked for. A failure is counted in `ProtoStats::dedup_persist_errors` and
    /// logged; the acks still leave (the messages were processed: withholding their
    /// acks would guarantee a second processing, where a lost record only risks one
    /// after a restart).
    pub fn persisted(&mut self, result: Result<(), crate::dedup::DedupError>) {
        if let Err(e) = result {
            self.stats.dedup_persist_errors += 1;
            tracing::warn!(error = %e, "dedup records not persisted");
        }
    }

    /// Is an acknowledgement of `delivery` still to be produced (its stream owes an
    /// ack, or durable dedup records await their fsync)? `false` once the ack frame
    /// covering it has been handed to [`Endpoint::poll_transmit`].
    pub fn ack_owed(&self, delivery: &DeliveryRef) -> bool {
        self.dedup.needs_sync()
            || self
                .inbound
                .get(&(delivery.origin, delivery.channel))
                .is_some_and(|s| s.ack_deadline().is_some())
    }

    /// How many times `delivery` has been handed to the application so far (1 on its
    /// first delivery), at `now`.
    pub fn deliveries(&self, now: Instant, delivery: &DeliveryRef) -> u32 {
        let of_id = if delivery.guarantee == Guarantee::EffectivelyOnce {
            self.id_failures
                .get(&delivery.id)
                .map_or(0, |f| f.current(now))
        } else {
            0
        };
        self.inbound
            .get(&(delivery.origin, delivery.channel))
            .map_or(0, |s| s.failures(delivery.seq))
            .max(of_id)
            .saturating_add(1)
    }

    /// Tell `origin` that its message `seq` on `channel` is refused for good, if it
    /// speaks protocol version 3 (older senders keep retrying until their deadline).
    fn send_reject(&mut self, origin: Origin, channel: ChannelId, seq: u64, reason: RejectReason) {
        if speaks_v3(&self.peers, origin) {
            self.stats.rejects_sent += 1;
            self.transmit
                .push_back(reject_frame(origin, channel, seq, reason));
        }
    }

    /// Messages of `node` held here (all its streams), for its node credit grant. Only
    /// active streams can hold any (a quiet one holds nothing), so a credit probe costs
    /// the busy streams, not every stream this node ever received on.
    fn held_by(&self, node: NodeId) -> HashMap<NodeId, u64> {
        let n = self
            .inbound
            .active_iter()
            .filter(|((o, _), _)| o.node == node)
            .map(|(_, st)| st.outstanding())
            .sum();
        HashMap::from([(node, n)])
    }

    /// Queue a message. The caller bounds the window (see [`Event::WindowOpened`]):
    /// at most `config.max_in_flight` slots per stream.
    ///
    /// One guarantee per channel and peer: the first send on a channel fixes it, and a
    /// send under another fails with [`StreamError::GuaranteeMismatch`]. (An earlier
    /// run's hints replayed on the channel do not count: at-least-once and
    /// effectively-once messages share a stream, each frame carrying its own
    /// guarantee.)
    pub fn send(&mut self, now: Instant, msg: Outgoing) -> Result<SendRef, StreamError> {
        self.send_from(now, msg, true)
    }

    /// [`send`](Self::send) for a hint replay: the message keeps its own guarantee.
    /// At-least-once and effectively-once messages share a stream (each frame says
    /// which it is), so a sender redeployed with the other of the two on a channel
    /// still replays its earlier run's hints there, and its own sends are not refused
    /// because a replay opened the stream first. (Regression: the replay failed with
    /// `GuaranteeMismatch` against this run's stream and held up the target's whole
    /// queue; or, replayed first, it made every send of this run on the channel fail.)
    /// A hint of either never shares a stream with at-most-once sends: it fails here
    /// (the replay asks [`takes_hint`](Self::takes_hint) first and passes such hints
    /// over, leaving them in the store).
    pub(crate) fn send_hint(
        &mut self,
        now: Instant,
        msg: Outgoing,
    ) -> Result<SendRef, StreamError> {
        self.send_from(now, msg, false)
    }

    /// Would [`send_hint`](Self::send_hint) take a hint with `guarantee` on
    /// `channel` to `peer` now?
    pub(crate) fn takes_hint(
        &self,
        peer: NodeId,
        channel: ChannelId,
        guarantee: Guarantee,
    ) -> bool {
        let key = (peer, channel);
        match (self.outbound.get(&key), self.dormant.get(&key)) {
            (Some(s), _) => s.admits(guarantee, false),
            (None, Some(d)) => outbound::admits(d.guarantee, d.claimed, guarantee, false),
            (None, None) => true,
        }
    }

    fn send_from(
        &mut self,
        now: Instant,
        msg: Outgoing,
        app: bool,
    ) -> Result<SendRef, StreamError> {
        let Outgoing {
            peer,
            channel,
            guarantee,
            payload,
            id,
            deadline,
            schema,
        } = msg;
        // An explicit id always travels: a replayed hint keeps the seq it was first sent
        // with, which is not the seq it gets now.
        let stream = self.outbound_stream(now, peer, channel, guarantee, app)?;
        let seq = stream.send_as(now, guarantee, payload, id, deadline, schema);
        self.stats.sent += 1;
        Ok(SendRef { peer, channel, seq })
    }

    /// Unsettled messages to `peer`, with their payload and dedup identity (for handing
    /// them off when the peer is declared down).
    pub fn in_flight_to(&self, peer: NodeId) -> Vec<(SendRef, Bytes, MessageId)> {
        let mut out = Vec::new();
        for ((p, channel), s) in self.outbound.iter() {
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

    /// One unsettled message's payload and dedup identity (`None`: settled, or not
    /// sent): [`in_flight_to`](Self::in_flight_to) for one message, without copying
    /// the others.
    pub fn in_flight_one(&self, send: SendRef) -> Option<(Bytes, MessageId)> {
        self.outbound
            .get(&(send.peer, send.channel))?
            .unsettled_one(send.seq)
    }

    /// Would a receiver's dedup window refuse `send` (just sent) now, because this
    /// run's own handed-off messages on its stream, still in the hint store, hold the
    /// stream's id floor more than `max_in_flight` below its id? (A receiver's window is
    /// at least its `max_in_flight` wide, twice by default.)
    pub(crate) fn far_above_hint_floor(&self, send: SendRef) -> bool {
        self.outbound
            .get(&(send.peer, send.channel))
            .is_some_and(|s| s.far_above_hint_floor(send.seq, self.config.max_in_flight as u64))
    }

    /// Take an unsettled message out of its stream (it was stored as a hint): no
    /// retransmission, no receipt event; its implicit id stays unsettled for the
    /// receiver's dedup until [`Endpoint::hint_settled`]. Returns whether it was there.
    pub fn hand_off(&mut self, send: SendRef) -> bool {
        let Some(s) = self.outbound.get_mut(&(send.peer, send.channel)) else {
            return false;
        };
        let Some((id, sent)) = s.take(send.seq) else {
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
        if sent {
            self.withdrawn.push(send);
        }
        true
    }

    /// Take an unsettled message out of its stream for good (its sender was told it
    /// failed): no retransmission, no event, and its id is settled. Returns whether it
    /// was there.
    pub fn abandon(&mut self, send: SendRef) -> bool {
        let Some(s) = self.outbound.get_mut(&(send.peer, send.channel)) else {
            return false;
        };
        let taken = s.take(send.seq);
        Self::drain_stream(
            &mut self.events,
            &mut self.stats,
            send.peer,
            send.channel,
            s,
        );
        if taken.is_some_and(|(_, sent)| sent) {
            self.withdrawn.push(send);
        }
        taken.is_some()
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

    /// A connection to `origin.node` completed its handshake and negotiated protocol
    /// `version`. A new incarnation means the peer restarted. On a re-connection
    /// (either way) unacked messages are retransmitted at once: the old connection may
    /// have swallowed them. A peer's first connection retransmits nothing: what was
    /// sent before it was queued for it (and lost frames come back on their timers).
    pub fn handle_peer_up(&mut self, now: Instant, origin: Origin, version: u16) {
        let restarted = match self.peers.get(&origin.node) {
            Some(p) => p.origin != origin,
            None => false,
        };
        if restarted {
            let old = self.peers[&origin.node].origin;
            // Stream state of the previous run is useless now; its dedup state stays
            // in `Dedup` (hint replays of its messages still need it).
            self.inbound.retain(|(o, _), _| *o != old);
            self.inbound_of.remove(&old);
            self.marks.retain(|(o, _), _| *o != old);
            self.orphan_grants.retain(|(o, _), _| *o != old);
            // Copies the old run parked behind a delivery still in a handler: their
            // streams (and the holds that counted them) are gone, and nothing would
            // answer them. (Regression: kept until that delivery finished, so a handler
            // that never acked, and senders that restarted and resent, grew this
            // without bound.)
            if !self.waiting.is_empty() {
                self.waiting.retain(|_, q| {
                    q.retain(|p| p.origin != old);
                    !q.is_empty()
                });
            }
        }
        let was_crediting = self.peers.get(&origin.node).is_some_and(|p| p.version >= 2);
        // Node credit counts frames per connection: both ends start again, except that
        // what was queued before a first connection is counted on it by both.
        let first_conn = !self.peers.contains_key(&origin.node);
        let out = self
            .node_out
            .entry(origin.node)
            .or_insert_with(|| NodeOut::new(Some(INITIAL_NODE_CREDIT)));
        if version < 3 {
            *out = NodeOut::new(None);
        } else if !first_conn || out.limit.is_none() {
            *out = NodeOut::new(Some(INITIAL_NODE_CREDIT));
        }
        if version >= 3 {
            self.node_in.insert(
                origin.node,
                NodeIn {
                    owed: true,
                    ..NodeIn::default()
                },
            );
            // The first grant goes out at once (the sender starts from
            // `INITIAL_NODE_CREDIT` until it arrives).
            let held = self.held_by(origin.node);
            self.grant_node_credit(&held, Some(origin.node));
        } else {
            self.node_in.remove(&origin.node);
        }
        // A first connection carries what was queued while it was being made; a
        // re-connection may have lost what the old one had in flight.
        let first = !self.peers.contains_key(&origin.node);
        self.peers.insert(
            origin.node,
            Peer {
                origin,
                up: true,
                version,
                heard: None,
                ping: None,
                min_rtt: None,
            },
        );
        if !restarted && !first && version >= 3 {
            // Rejects sent on the old connection may have gone with it; they go out
            // before any ack of the new one (see `proto::inbound`, "Rejections").
            for ((o, _), s) in self.inbound.iter_mut() {
                if *o == origin && s.resend_rejections_due(now) {
                    for (seq, reason) in s.rejections() {
                        self.stats.rejects_sent += 1;
                        self.transmit
                            .push_back(reject_frame(origin, s.channel(), seq, reason));
                    }
                }
            }
        }
        for ((peer, _), d) in self.dormant.iter_mut() {
            if *peer == origin.node {
                // As for the live streams below.
                if version < 2 {
                    d.credit = None;
                } else if restarted || !was_crediting {
                    d.credit = Some(d.initial_credit());
                }
            }
        }
        for ((peer, _), s) in self.outbound.iter_mut() {
            if *peer == origin.node {
                // A version-2 receiver grants credit; a new run of it (or a peer that
                // just upgraded) starts from the initial grant.
                if version < 2 {
                    s.set_credit(None);
                } else if restarted || !was_crediting {
                    s.set_credit(Some(s.initial_credit()));
                }
                if !first {
                    s.handle_reconnect();
                }
            }
        }
    }

    /// The connection to `peer` was lost.
    pub fn handle_peer_down(&mut self, _now: Instant, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.up = false;
        }
    }

    /// Protocol version negotiated with `peer` on its current (or last) connection.
    pub fn peer_version(&self, peer: NodeId) -> Option<u16> {
        self.peers.get(&peer).map(|p| p.version)
    }

    /// Is there a live connection to `peer`?
    pub fn is_up(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// Optional hint before [`handle_frame`](Self::handle_frame): `frame` is about to
    /// be handled. For a data frame with an application key, its dedup slots are
    /// prefetched, so that hinting a whole burst first overlaps the burst's cache
    /// misses (see [`crate::dedup::IdTable::begin_many`]). Changes no state.
    pub fn prefetch(&self, frame: &Frame) {
        if let Frame::Data(Data {
            id: Some(id),
            guarantee: Guarantee::EffectivelyOnce,
            ..
        }) = frame
        {
            self.dedup.prefetch(id);
        }
    }

    /// [`handle_frame`](Self::handle_frame) for a frame whose connection proved which
    /// run of the peer sent it (its handshake's [`Origin`]): a frame of a run other
    /// than the one the endpoint knows now (an earlier run's frame that arrived after
    /// the restarted run's [`handle_peer_up`](Self::handle_peer_up)) is dropped and
    /// counted in `frames_ignored`, never taken for the current run's: an earlier
    /// run's `Finish`, data or acks would otherwise settle, retire or answer the new
    /// run's streams by seq.
    pub fn handle_frame_from(&mut self, now: Instant, from: Origin, frame: Frame) {
        match self.peers.get_mut(&from.node) {
            Some(p) if p.origin == from => p.heard = Some(now),
            _ => {
                self.stats.frames_ignored += 1;
                return;
            }
        }
        self.frame_of(now, from, frame);
    }

    /// A frame arrived from `from`, taken as sent by the run of `from` this endpoint
    /// knows now. When the transport tells which run sent it (every built-in one
    /// does), use [`handle_frame_from`](Self::handle_frame_from), which drops an
    /// earlier run's late frames instead.
    pub fn handle_frame(&mut self, now: Instant, from: NodeId, frame: Frame) {
        let Some(peer_origin) = self.peers.get_mut(&from).map(|p| {
            p.heard = Some(now);
            p.origin
        }) else {
            self.stats.frames_ignored += 1;
            return;
        };
        self.frame_of(now, peer_origin, frame);
    }

    /// A frame from `peer_origin`, the peer's current run (both entry points looked
    /// it up once).
    fn frame_of(&mut self, now: Instant, peer_origin: Origin, frame: Frame) {
        let from = peer_origin.node;
        // One Heard per peer until the owner has seen it, not one per frame.
        if !self.heard_pending.contains(&from) {
            self.heard_pending.push(from);
            self.events.push_back(Event::Heard(from));
        }
        match frame {
            Frame::Data(data) => {
                if let Some(n) = self.node_in.get_mut(&from) {
                    n.received += 1;
                }
                self.on_data(now, peer_origin, data)
            }
            Frame::NodeCredit(c) => {
                if let Some(out) = self.node_out.get_mut(&from) {
                    if let Some(limit) = out.limit.as_mut() {
                        *limit = (*limit).max(c.limit);
                        if out.sent >= *limit {
                            // Still blocked: frames sent before the probe that the
                            // receiver never counted were lost; stop counting them.
                            if let Some(at) = out.sent_at_probe.take() {
                                let lost = at.saturating_sub(c.received);
                                out.sent = out.sent.saturating_sub(lost);
                            }
                        }
                        if out.sent < *limit {
                            out.probe_due = None;
                            out.probes = 0;
                            out.sent_at_probe = None;
                        }
                    }
                }
            }
            Frame::Ack(ack) => {
                if ack.incarnation != self.origin.incarnation {
                    self.stats.frames_ignored += 1;
                    return;
                }
                if let Some(s) = self.outbound.get_mut(&(from, ack.channel)) {
                    s.handle_ack(
                        now,
                        ack.cumulative,
                        &ack.ranges,
                        ack.credit,
                        ack.received,
                        &ack.held,
                    );
                    Self::drain_stream(&mut self.events, &mut self.stats, from, ack.channel, s);
                } else if let Some(d) = self.dormant.get_mut(&(from, ack.channel)) {
                    // Nothing to settle; a grant that came late (an at-most-once
                    // stream's credit follows what the application consumed) is kept,
                    // as a live stream keeps it.
                    if let (Some(grant), Some(cur)) = (ack.credit, d.credit) {
                        d.credit = Some(grant.max(cur));
                    }
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
                    s.handle_nack(now, nack.seq);
                }
            }
            Frame::Ping(hb) => self.transmit.push_back((from, Frame::Pong(hb))),
            Frame::CreditProbe(p) => {
                if let Some(n) = self.node_in.get_mut(&from) {
                    // The node grant too, at once: it may be what blocks, and this
                    // receiver may have no stream of the sender's to owe an ack on (it
                    // restarted, say), so no timer would send it later.
                    n.owed = true;
                    let held = self.held_by(from);
                    self.grant_node_credit(&held, Some(from));
                }
                // Answer with the stream's current grant (an ack, sent with this burst).
                let v3 = speaks_v3(&self.peers, peer_origin);
                if let Some(s) = self.inbound.get_mut(&(peer_origin, p.channel)) {
                    // A sender waiting on a seq this stream rejected lost the reject
                    // (with a connection): it goes again, before the ack, which holds
                    // that seq back (see `hold_back_rejected`).
                    if v3 && s.resend_rejections_due(now) {
                        for (seq, reason) in s.rejections() {
                            self.stats.rejects_sent += 1;
                            self.transmit.push_back(reject_frame(
                                peer_origin,
                                p.channel,
                                seq,
                                reason,
                            ));
                        }
                    }
                    s.owe_ack(now);
                } else {
                    self.stats.frames_ignored += 1;
                }
            }
            Frame::Reject(r) => {
                if r.incarnation != self.origin.incarnation {
                    self.stats.frames_ignored += 1;
                    return;
                }
                if let Some(s) = self.outbound.get_mut(&(from, r.channel)) {
                    s.handle_reject(now, r.seq, r.reason);
                    Self::drain_stream(&mut self.events, &mut self.stats, from, r.channel, s);
                } else {
                    self.stats.frames_ignored += 1;
                }
            }
            Frame::Finish(f) if f.last_seq > MAX_SEQ || f.id_floor > MAX_SEQ + 1 => {
                self.stats.malformed_dropped += 1;
            }
            Frame::Finish(f) => {
                // Only the connection's own run can finish its streams.
                if self.dedup.watermark_of(peer_origin, f.channel).is_some() {
                    let floor = f.id_floor.min(f.last_seq.saturating_add(1));
                    let res = self
                        .dedup
                        .advance_floor(peer_origin, f.channel, floor, now)
                        .and_then(|()| {
                            self.dedup
                                .finish_stream(peer_origin, f.channel, f.last_seq, now)
                        });
                    if let Err(e) = res {
                        tracing::debug!(origin = %peer_origin, channel = ?f.channel, error = %e, "finished stream not retired early (the retention retires it)");
                    }
                } else {
                    self.stats.frames_ignored += 1;
                }
            }
            Frame::Settled(f) if f.id_floor > MAX_SEQ + 1 => {
                self.stats.malformed_dropped += 1;
            }
            Frame::Settled(f) => {
                // Only for an earlier run of the connection's own node (the current
                // run's floor rides in its data frames), and only for a stream this
                // receiver tracks: a control frame creates no dedup state.
                let earlier = Origin {
                    node: from,
                    incarnation: f.incarnation,
                };
                if f.incarnation != peer_origin.incarnation
                    && self.dedup.watermark_of(earlier, f.channel).is_some()
                {
                    if let Err(e) = self
                        .dedup
                        .advance_floor(earlier, f.channel, f.id_floor, now)
                    {
                        tracing::debug!(origin = %earlier, channel = ?f.channel, error = %e, "settled floor of an earlier run not applied");
                    }
                } else {
                    self.stats.frames_ignored += 1;
                }
            }
            Frame::Pong(hb) => {
                if let Some(p) = self.peers.get_mut(&from) {
                    if let Some((nonce, sent)) = p.ping {
                        if nonce == hb.nonce {
                            let rtt = now.saturating_duration_since(sent);
                            p.min_rtt = Some(p.min_rtt.map_or(rtt, |m| m.min(rtt)));
                            p.ping = None;
                        }
                    }
                }
                self.events.push_back(Event::HeartbeatAck(from))
            }
            Frame::Handshake(_) => self.stats.frames_ignored += 1,
        }
    }

    /// This node run is shutting down cleanly and will send nothing more: tell every
    /// peer speaking protocol version 3 the last seq of each effectively-once stream to
    /// it ([`Frame::Finish`]), so its dedup state can be retired once settled instead
    /// of after the retention. Call once, after the last send; returns how many finish
    /// frames were queued.
    pub fn finish_streams(&mut self) -> usize {
        let mut n = 0;
        let live = self
            .outbound
            .iter()
            .map(|(&key, s)| (key, s.eo_sent(), s.last_seq(), s.id_floor()));
        // A dormant stream settled everything below its next seq.
        let dormant = self
            .dormant
            .iter()
            .map(|(&key, d)| (key, d.eo_sent, d.next_seq - 1, d.next_seq));
        for ((peer, channel), eo_sent, last_seq, id_floor) in live.chain(dormant) {
            let speaks = self.peers.get(&peer).is_some_and(|p| p.version >= 3);
            if speaks && eo_sent {
                n += 1;
                self.transmit.push_back((
                    peer,
                    Frame::Finish(crate::wire::Finish {
                        channel,
                        last_seq,
                        id_floor,
                    }),
                ));
            }
        }
        n
    }

    /// Tell `peer` that every library-assigned id of this node's earlier run
    /// `incarnation` on `channel` below `id_floor` is settled for good
    /// ([`Frame::Settled`]): the hint replay's floor for a run that is over. Queued only
    /// for a peer speaking protocol version 4; returns whether it was.
    pub(crate) fn send_settled(
        &mut self,
        peer: NodeId,
        incarnation: u64,
        channel: ChannelId,
        id_floor: u64,
    ) -> bool {
        if incarnation == self.origin.incarnation
            || self.peers.get(&peer).is_none_or(|p| p.version < 4)
        {
            return false;
        }
        self.transmit.push_back((
            peer,
            Frame::Settled(crate::wire::Settled {
                incarnation,
                channel,
                id_floor,
            }),
        ));
        true
    }

    /// Ask `peer` for a heartbeat answer. Prefer [`ping_at`](Self::ping_at): only a
    /// ping sent with its time gives the round-trip sample that lets a silent stream
    /// tell a lost probe from a slow receiver (`proto::outbound`, "Silent streams");
    /// without one it falls back to doubling probes while its receiver stays silent.
    pub fn ping(&mut self, peer: NodeId, nonce: u64) {
        self.transmit
            .push_back((peer, Frame::Ping(Heartbeat { nonce })));
    }

    /// [`ping`](Self::ping), sent at `now`: its pong gives a round-trip sample.
    pub fn ping_at(&mut self, now: Instant, peer: NodeId, nonce: u64) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.ping = Some((nonce, now));
        }
        self.ping(peer, nonce);
    }

    /// From now on an application's [`Completion::Nack`] does not count toward the
    /// channel's `max_deliveries` (its node drains before a stop: a handler that
    /// cannot finish a message then, such as a relay whose own sends are refused,
    /// nacks it, and its sender resends it at once). The nack is sent as before.
    pub fn stop_counting_nacks(&mut self) {
        self.nacks_uncounted = true;
    }

    /// From now on a [`Completion::Refuse`] is not nacked to the sender: its node
    /// stops, reads no more frames and takes back what its receivers had queued, so a
    /// prompt resend would only be dropped (and count as an attempt). The sender
    /// sends it again when the node's next run connects.
    pub fn stop_nacking_refusals(&mut self) {
        self.refusals_unnacked = true;
    }

    /// The application finished a delivered message. At-most-once deliveries are
    /// finished too (any [`Completion`]): that is what frees their stream's credit.
    ///
    /// [`Completion::Refuse`] means the application never saw the message (its
    /// receiver is gone): the stream's later deliveries still waiting in
    /// [`Endpoint::poll_event`] are taken back too, and an ordered stream rewinds (see
    /// the ordered delivery contract in `proto::inbound`). Call it before polling the
    /// next event.
    pub fn complete(&mut self, now: Instant, delivery: DeliveryRef, how: Completion) {
        self.release_held(delivery.origin.node, 1);
        if delivery.guarantee == Guarantee::AtMostOnce {
            // Settled at delivery time; finishing it frees credit (a credit update is
            // owed to a sender that understands one).
            let crediting = self
                .peers
                .get(&delivery.origin.node)
                .is_some_and(|p| p.origin == delivery.origin && p.version >= 2);
            if let Some(stream) = self.inbound.get_mut(&(delivery.origin, delivery.channel)) {
                stream.consumed(now, crediting);
            }
            return;
        }
        if how == Completion::Refuse {
            self.refuse_delivery(now, delivery);
            return;
        }
        if let Completion::Reject(reason) = how {
            self.reject_delivery(now, delivery, reason);
            return;
        }
        if delivery.guarantee == Guarantee::EffectivelyOnce {
            match how {
                Completion::Ack => {
                    // Group commit: buffered now, written and fsynced once by the
                    // owner before the acks of this burst leave (`persist_owed`).
                    if let Err(e) = self.dedup.complete_unsynced(&delivery.id, now) {
                        self.stats.dedup_persist_errors += 1;
                        tracing::warn!(id = %delivery.id, error = %e, "dedup completion not persisted");
                    }
                }
                Completion::Nack if self.nacks_uncounted => self.dedup.release(&delivery.id),
                Completion::Nack | Completion::Refuse | Completion::Reject(_) => {
                    self.dedup.release(&delivery.id);
                    if self.id_failures.len() >= MAX_ID_FAILURES
                        && !self.id_failures.contains_key(&delivery.id)
                    {
                        self.id_failures.clear();
                    }
                    let f = self.id_failures.entry(delivery.id).or_default();
                    f.failures = f.current(now).saturating_add(1);
                    f.last_failure = Some(now);
                }
            }
            if how == Completion::Ack && !self.id_failures.is_empty() {
                self.id_failures.remove(&delivery.id);
            }
        }
        let current = self
            .peers
            .get(&delivery.origin.node)
            .is_some_and(|p| p.origin == delivery.origin);
        if let Some(stream) = self.inbound.get_mut(&(delivery.origin, delivery.channel)) {
            match how {
                Completion::Ack if stream.is_ordered() => {
                    // What waits in line behind it goes out now. (A parked redelivery
                    // rewinds the stream below seqs already in handlers; without this
                    // the stream stopped at such a seq after it was acked, with what
                    // was buffered behind it reported held, until its deadline.)
                    let mut ready = std::mem::take(&mut self.ready);
                    stream.complete(now, delivery.seq, true);
                    stream.drain_head(&mut ready);
                    self.process_ready(now, delivery.origin, delivery.channel, &mut ready);
                    self.ready = ready;
                }
                Completion::Ack => stream.complete(now, delivery.seq, true),
                Completion::Nack | Completion::Refuse | Completion::Reject(_) => {
                    let count = !(how == Completion::Nack && self.nacks_uncounted);
                    stream.fail_counted(delivery.seq, count);
                    if current {
                        self.stats.nacks_sent += 1;
                        self.transmit.push_back(nack_frame(
                            delivery.origin,
                            delivery.channel,
                            delivery.seq,
                        ));
                    }
                }
            }
        }
        if delivery.guarantee == Guarantee::EffectivelyOnce {
            self.wake_parked(now, delivery.id, how == Completion::Ack);
        }
    }

    /// `delivery`, handed to the application, is refused for good (rule 4 of the
    /// ordered contract). Effectively-once: its id is released, not recorded as done —
    /// it was not processed, so a copy under the same id sent later is a new attempt
    /// (never acked as a duplicate of something no handler finished); copies parked
    /// behind it get the same refusal.
    fn reject_delivery(&mut self, now: Instant, delivery: DeliveryRef, reason: RejectReason) {
        // The id is released whether or not its stream is still here. (Regression: when
        // its sender had restarted since, the id stayed in progress for good, and every
        // later copy of it — the new run's resend, a hint — was parked behind it and
        // reported held until its deadline.)
        if delivery.guarantee == Guarantee::EffectivelyOnce {
            self.dedup.release(&delivery.id);
            self.id_failures.remove(&delivery.id);
        }
        if self
            .inbound
            .contains_key(&(delivery.origin, delivery.channel))
        {
            self.refuse_now(now, delivery.origin, delivery.channel, delivery.seq, reason);
        } // else: its sender restarted since; nothing to settle on the stream
        if delivery.guarantee == Guarantee::EffectivelyOnce {
            self.reject_parked(now, delivery.id, reason);
        }
    }

    /// Arrivals parked behind `id`, whose delivery was just refused for good: each is
    /// refused with the same reason (the same message sent again gets the same
    /// answer).
    fn reject_parked(&mut self, now: Instant, id: MessageId, reason: RejectReason) {
        if self.waiting.is_empty() {
            return;
        }
        let Some(queue) = self.waiting.remove(&id) else {
            return;
        };
        for p in queue {
            let (origin, channel, seq) = (p.origin, p.data.channel, p.data.seq);
            if !self.inbound.contains_key(&(origin, channel)) {
                continue; // its sender restarted since
            }
            self.refuse_now(now, origin, channel, seq, reason);
        }
    }

    /// Refuse `seq` for good (counted), tell its sender, and process what its stream
    /// can hand out next.
    fn refuse_now(
        &mut self,
        now: Instant,
        origin: Origin,
        channel: ChannelId,
        seq: u64,
        reason: RejectReason,
    ) {
        self.stats.rejected += 1;
        let mut ready = std::mem::take(&mut self.ready);
        self.settle_rejected(now, origin, channel, seq, reason, &mut ready);
        self.process_ready(now, origin, channel, &mut ready);
        self.ready = ready;
    }

    /// Settle a refused seq on its stream and tell the sender: a reject for a sender
    /// that speaks protocol 3, an ack for an older one (it cannot be told, and
    /// retrying cannot help).
    fn settle_rejected(
        &mut self,
        now: Instant,
        origin: Origin,
        channel: ChannelId,
        seq: u64,
        reason: RejectReason,
        ready: &mut Vec<Data>,
    ) {
        let speaks = speaks_v3(&self.peers, origin);
        let Some(stream) = self.inbound.get_mut(&(origin, channel)) else {
            return;
        };
        if speaks {
            stream.reject(now, seq, reason, ready);
            self.send_reject(origin, channel, seq, reason);
        } else {
            stream.complete(now, seq, true);
            stream.drain_head(ready);
        }
    }

    /// Arrivals parked behind `id` (a delivery of it just finished): after an ack they
    /// are duplicates, acked now; after a failure the oldest goes back to its stream to
    /// be delivered in the original's place (in line, on an ordered stream).
    fn wake_parked(&mut self, now: Instant, id: MessageId, acked: bool) {
        if self.waiting.is_empty() {
            return; // the common case: skip hashing the id (SipHash: ids are the peer's)
        }
        let Some(mut queue) = self.waiting.remove(&id) else {
            return;
        };
        // After a failure one copy takes the original's place: the oldest whose stream
        // is still there and whose sender has not settled it since. Copies passed over
        // are dropped (their senders gave up on them, or restarted and resend what
        // matters). (Regression: only the oldest was woken; when it was such a copy,
        // the ones behind it stayed parked behind a delivery no longer running, each
        // reported held to its sender until its deadline.)
        while let Some(p) = queue.pop_front() {
            let (origin, channel, seq) = (p.origin, p.data.channel, p.data.seq);
            let mut ready = std::mem::take(&mut self.ready);
            let mut taken = false;
            if let Some(stream) = self.inbound.get_mut(&(origin, channel)) {
                if acked {
                    self.stats.duplicates_dropped += 1;
                    stream.complete(now, seq, true);
                    stream.drain_head(&mut ready);
                } else {
                    taken = stream.unpark(p.data, &mut ready);
                }
            }
            if taken && !queue.is_empty() {
                // The rest wait behind the woken copy from now on, where its
                // admission finds them: a dead letter refuses them with it.
                // (Regression: they were put back only afterwards, so a woken copy
                // dead-lettered left them parked behind nothing, each held until its
                // sender's deadline.)
                let mut rest = std::mem::take(&mut queue);
                if let Some(newer) = self.waiting.remove(&id) {
                    rest.extend(newer);
                }
                self.waiting.insert(id, rest);
            }
            let events_before = self.events.len();
            self.process_ready(now, origin, channel, &mut ready);
            self.ready = ready;
            if taken {
                // Refused at admission (a full key table) or settled (a duplicate),
                // the woken copy is not in progress: the next one takes its place.
                let delivering = self
                    .events
                    .iter()
                    .skip(events_before)
                    .any(|e| matches!(e, Event::Deliver { delivery, .. } if delivery.id == id));
                if delivering {
                    break;
                }
                match self.waiting.remove(&id) {
                    Some(rest) => queue = rest,
                    None => break,
                }
            }
        }
        if !queue.is_empty() {
            // Copies parked meanwhile (behind the one just woken) wait after these.
            if let Some(newer) = self.waiting.remove(&id) {
                queue.extend(newer);
            }
            self.waiting.insert(id, queue);
        }
    }

    /// The application never saw `delivery` (its receiver is gone). Take back the
    /// stream's later deliveries still queued in `events` too, release their dedup
    /// marks, and let the stream rewind to `delivery`.
    fn refuse_delivery(&mut self, now: Instant, delivery: DeliveryRef) {
        let key = (delivery.origin, delivery.channel);
        let mut later = Vec::new();
        self.events.retain_mut(|ev| match ev {
            Event::Deliver {
                delivery: d,
                payload,
            } if (d.origin, d.channel) == key && d.seq > delivery.seq => {
                later.push((
                    *d,
                    Data {
                        channel: d.channel,
                        seq: d.seq,
                        floor: 0,
                        id_floor: 0,
                        id: Some(d.id),
                        guarantee: d.guarantee,
                        // Checked again when handed out again: the channel's receiver
                        // may have been registered with another type meanwhile.
                        // (Regression: `0` here skipped that check, and a receiver of
                        // another type decoded these.)
                        schema: d.schema,
                        payload: std::mem::take(payload),
                    },
                ));
                false
            }
            _ => true,
        });
        let n = 1 + later.len() as u64;
        self.release_held(delivery.origin.node, later.len() as u64);
        self.stats.deliveries_refused += n;
        self.stats.delivered = self.stats.delivered.saturating_sub(n);
        let refused = std::iter::once(&delivery).chain(later.iter().map(|(d, _)| d));
        let eo: Vec<MessageId> = refused
            .filter(|d| d.guarantee == Guarantee::EffectivelyOnce)
            .map(|d| d.id)
            .collect();
        let current = self
            .peers
            .get(&delivery.origin.node)
            .is_some_and(|p| p.origin == delivery.origin);
        if let Some(stream) = self.inbound.get_mut(&key) {
            // Tell the sender what was let go, as a handler's nack does: it took these
            // for held (its acks said so) and would otherwise retransmit them only at
            // its next re-check, `retry.backoff_cap` later. (Regression: a receiver
            // dropped with a window of deliveries queued stalled its stream ~2 s.) An
            // ordered stream takes back the later ones for order; only `delivery`
            // must come again.
            let mut let_go = vec![delivery.seq];
            if !stream.is_ordered() {
                let_go.extend(later.iter().map(|(d, _)| d.seq));
            }
            let mut ready = std::mem::take(&mut self.ready);
            stream.refuse(
                delivery.seq,
                later.into_iter().map(|(_, data)| data).collect(),
                &mut ready,
            );
            if current && !self.refusals_unnacked {
                for seq in let_go {
                    self.stats.nacks_sent += 1;
                    self.transmit
                        .push_back(nack_frame(delivery.origin, delivery.channel, seq));
                }
            }
            self.process_ready(now, delivery.origin, delivery.channel, &mut ready);
            self.ready = ready;
        }
        for id in eo {
            self.dedup.release(&id);
            self.wake_parked(now, id, false);
        }
    }

    /// Timers due at `now`: retransmissions, give-ups, owed acks. While
    /// [`persist_owed`](Self::persist_owed) is true no ack is produced (and
    /// [`poll_timeout`](Self::poll_timeout) stays due): persist first.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (&peer, out) in self.node_out.iter_mut() {
            if out.probe_due.is_some_and(|t| t <= now) {
                if out.budget() == 0 {
                    out.probes = out.probes.saturating_add(1);
                    out.sent_at_probe = Some(out.sent);
                    out.probe_due = Some(crate::retry::later(now, node_probe_interval(out.probes)));
                    self.transmit.push_back((
                        peer,
                        Frame::CreditProbe(CreditProbe {
                            channel: out.probe_channel,
                        }),
                    ));
                } else {
                    out.probe_due = None;
                }
            }
        }
        // Acks wait while durable dedup records are buffered: an ack must not
        // leave before the record of what it acknowledges is on disk.
        let persisting = self.dedup.needs_sync();
        let (events, stats, peers) = (&mut self.events, &mut self.stats, &self.peers);
        self.outbound.scan_active(|&(peer, channel), s| {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                let p = peers.get(&peer);
                s.handle_timeout(now, p.and_then(|p| p.heard), p.and_then(|p| p.min_rtt));
                Self::drain_stream(events, stats, peer, channel, s);
            }
            !s.is_quiet()
        });
        let tracking = !self.node_in.is_empty();
        let mut outstanding: HashMap<NodeId, u64> = HashMap::new();
        let (peers, transmit) = (&self.peers, &mut self.transmit);
        // A quiet stream holds nothing, so the active ones' counts are every count.
        self.inbound.scan_active(|&(origin, _), s| {
            // (Not polled while persisting: polling takes the owed ack.)
            if let Some(mut ack) = (!persisting).then(|| s.poll_ack(now)).flatten() {
                if speaks_v3(peers, origin) {
                    hold_back_rejected(&mut ack, s.rejections().map(|(seq, _)| seq));
                }
                stats.acks_sent += 1;
                transmit.push_back((origin.node, Frame::Ack(ack)));
            }
            if tracking {
                *outstanding.entry(origin.node).or_default() += s.outstanding();
            }
            !s.is_quiet()
        });
        if tracking {
            self.grant_node_credit(&outstanding, None);
        }
    }

    /// Grant each version-3 peer node credit: what it may still send is what its
    /// messages leave of [`ProtoConfig::node_credit`] here. Sent when it grew by an
    /// eighth of the window (or is owed), so a busy peer gets one update per batch.
    /// `outstanding` holds every peer's count (absent: none held); `only` limits the
    /// grants to one peer.
    fn grant_node_credit(&mut self, outstanding: &HashMap<NodeId, u64>, only: Option<NodeId>) {
        let window = self.config.node_credit;
        for (&peer, n) in self.node_in.iter_mut() {
            if only.is_some_and(|o| o != peer) {
                continue;
            }
            // Deliveries of an earlier run of the peer that the application still
            // holds count too (its streams were dropped when it restarted).
            let held = outstanding
                .get(&peer)
                .copied()
                .unwrap_or(0)
                .max(self.app_held.get(&peer).copied().unwrap_or(0));
            let limit = n
                .advertised
                .max(n.received.saturating_add(window.saturating_sub(held)));
            let grown = limit - n.advertised;
            if n.owed || grown >= (window / 8).max(1) {
                n.owed = false;
                n.advertised = limit;
                self.stats.node_credits_sent += 1;
                self.transmit.push_back((
                    peer,
                    Frame::NodeCredit(crate::wire::NodeCredit {
                        limit,
                        received: n.received,
                    }),
                ));
            }
        }
    }

    /// The node is stopping: every ack owed is due at `now`, so the next
    /// [`handle_timeout`](Self::handle_timeout) sends it instead of waiting out
    /// [`ProtoConfig::ack_delay`] (after the stop, it would never go).
    pub fn acks_due_now(&mut self, now: Instant) {
        self.inbound.scan_active(|_, s| {
            s.ack_due_by(now);
            !s.is_quiet()
        });
    }

    /// Earliest instant `handle_timeout` has work (may be early, never late).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let out = self
            .outbound
            .active_values()
            .filter_map(|s| s.poll_timeout());
        let inb = self
            .inbound
            .active_values()
            .filter_map(|s| s.ack_deadline());
        let probes = self.node_out.values().filter_map(|o| o.probe_due);
        out.chain(inb).chain(probes).min()
    }

    /// Next frame to transmit, and to whom. Call until `None` after every input.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(NodeId, Frame)> {
        if let Some(t) = self.transmit.pop_front() {
            return Some(t);
        }
        // Move every active stream's ready frames at once (one pass over the streams
        // and one event drain per stream, not per frame).
        let (transmit, node_out) = (&mut self.transmit, &mut self.node_out);
        let (events, stats) = (&mut self.events, &mut self.stats);
        self.outbound.scan_active(|&(peer, channel), s| {
            let before = transmit.len();
            if s.take_probe() {
                transmit.push_back((peer, Frame::CreditProbe(CreditProbe { channel })));
            }
            let out = node_out
                .entry(peer)
                .or_insert_with(|| NodeOut::new(Some(INITIAL_NODE_CREDIT)));
            let mut budget = out.budget();
            let start = budget;
            while let Some(data) = s.poll_transmit(now, &mut budget) {
                transmit.push_back((peer, Frame::Data(data)));
            }
            if out.limit.is_some() {
                out.sent += start - budget;
                if budget == 0 && s.has_queued() && out.probe_due.is_none() {
                    // Blocked on node credit: probe if no grant comes.
                    out.probe_channel = channel;
                    out.probe_due = Some(crate::retry::later(now, node_probe_interval(out.probes)));
                }
            }
            if transmit.len() > before {
                Self::drain_stream(events, stats, peer, channel, s);
            }
            !s.is_quiet()
        });
        self.transmit.pop_front()
    }

    /// Next event for the owner.
    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front()?;
        match &ev {
            Event::Heard(peer) => self.heard_pending.retain(|p| p != peer),
            Event::GaveUp { send, attempts, .. } if *attempts > 0 => self.withdrawn.push(*send),
            _ => {}
        }
        Some(ev)
    }

    /// Messages taken out of their streams without an ack since the last call, after
    /// being transmitted at least once — given up ([`Event::GaveUp`]), handed off
    /// ([`Endpoint::hand_off`]) or abandoned ([`Endpoint::abandon`]). Call it after
    /// each input, as [`Endpoint::poll_transmit`]: the list holds every such message
    /// until it is drained (no cap: a cap would lose exactly the withdrawals of a
    /// large hand-off, when a target with many messages in flight goes Down).
    /// Their data frames must not reach the target any more:
    /// an owner whose transport keeps frames for a peer across reconnects (TCP) drops
    /// them there ([`LinkCommand::Withdraw`](crate::transport::LinkCommand::Withdraw)),
    /// or a message whose sender was told it failed, whose hint expired or was
    /// decommissioned, would still be processed when the target comes back.
    /// (Regression: such a stale queue delivered every refused and expired message.)
    pub fn drain_withdrawn(&mut self) -> std::vec::Drain<'_, SendRef> {
        self.withdrawn.drain(..)
    }

    /// `n` deliveries of `node` were finished or taken back.
    fn release_held(&mut self, node: NodeId, n: u64) {
        if let Some(held) = self.app_held.get_mut(&node) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                self.app_held.remove(&node);
            }
        }
    }

    /// Most deliveries of one sending node the application may hold before further
    /// new messages from it are dropped (counted in `credit_exceeded`): twice its
    /// node credit plus the reconnection allowance. Node credit keeps an honest peer
    /// within one node credit per run; the hold is for a peer that ignores it, or
    /// restarts (a new incarnation, fresh streams, fresh credit) to get more.
    fn node_hold(&self) -> u64 {
        self.config
            .node_credit
            .saturating_mul(2)
            .saturating_add(INITIAL_NODE_CREDIT)
    }

    fn outbound_stream(
        &mut self,
        now: Instant,
        peer: NodeId,
        channel: ChannelId,
        guarantee: Guarantee,
        app: bool,
    ) -> Result<&mut OutboundStream, StreamError> {
        let key = (peer, channel);
        if !self.outbound.contains_key(&key) {
            if let Some(d) = self.dormant.get_mut(&key) {
                if app && !d.claimed {
                    // Only an earlier run's hints used it, and it is settled: this
                    // run's first send picks the guarantee, at-most-once included.
                    d.guarantee = guarantee;
                }
                if !outbound::admits(d.guarantee, d.claimed, guarantee, app) {
                    return Err(StreamError::GuaranteeMismatch {
                        peer,
                        channel,
                        existing: d.guarantee,
                    });
                }
            }
            if self.outbound.len() >= self.dormant_sweep_at {
                self.sweep_quiet_streams();
            }
        }
        let origin = self.origin;
        let (rng, peers, config) = (&mut self.rng, &self.peers, &self.config);
        let (dormant, dormant_counters) = (&mut self.dormant, &mut self.dormant_counters);
        // Only a new stream draws a seed and looks at the peer (once per stream, not
        // per send).
        let stream = self.outbound.entry(key).or_insert_with(|| {
            if let Some(d) = dormant.remove(&key) {
                dormant_counters.sub(&d.counters);
                return OutboundStream::resume(origin, channel, config, rng.next_u64(), now, &d);
            }
            // A receiver not yet heard from is assumed to grant credit (protocol 2);
            // if it turns out to speak version 1, `handle_peer_up` lifts the bound.
            let credit = match peers.get(&peer) {
                Some(p) if p.version < 2 => None,
                _ => Some(INITIAL_CREDIT),
            };
            OutboundStream::new(
                origin,
                channel,
                guarantee,
                config,
                rng.next_u64(),
                now,
                credit,
            )
        });
        if app && !stream.admits(guarantee, app) && !stream.is_claimed() {
            // A stream only an earlier run's hints used, to a channel this run sends
            // at-most-once on: no further replay goes on it (the replay passes the
            // hints left over), and once settled it goes on (same seqs) under this
            // run's guarantee. Until then this send is refused. (Regression: one
            // replayed hint made every at-most-once send of the run on its channel
            // fail.)
            stream.want(guarantee);
            if let Some(d) = stream.dormant() {
                *stream = OutboundStream::resume(origin, channel, config, rng.next_u64(), now, &d);
            }
        }
        if !stream.admits(guarantee, app) {
            return Err(StreamError::GuaranteeMismatch {
                peer,
                channel,
                existing: stream.guarantee(),
            });
        }
        if app {
            stream.claim(guarantee);
        }
        Ok(stream)
    }

    /// Put every settled, quiet outbound stream aside as a [`Dormant`] record (a few
    /// KiB each down to about 80 bytes), and set the stream count of the next sweep to
    /// twice what is left (at least [`DORMANT_SWEEP_MIN`]), so sweeps cost O(1) per new
    /// stream amortised. (Regression: a sender kept every stream it ever opened at
    /// full size, ~3.6 KiB per channel, for as long as it ran.)
    fn sweep_quiet_streams(&mut self) {
        let mut slept = Vec::new();
        self.outbound.retain(|key, s| match s.dormant() {
            Some(d) => {
                slept.push((*key, d));
                false
            }
            None => true,
        });
        self.outbound.shrink_if_sparse();
        for (key, d) in slept {
            self.dormant_counters.add(&d.counters);
            self.dormant.insert(key, d);
        }
        self.dormant_sweep_at = DORMANT_SWEEP_MIN.max(self.outbound.len().saturating_mul(2));
    }

    /// At the per-peer stream limit, drop `origin`'s idle stream whose last frame is
    /// oldest, to make room for a new one; `false` if none is idle. (Regression: streams
    /// of a live peer were never dropped, so a sender that used more channels than the
    /// limit over its lifetime, 256 by default, had every further channel refused until
    /// its receipts failed their deadline.) Only streams that owe nothing go
    /// ([`InboundStream::is_idle`]): the limit still bounds what a peer holds here.
    fn recycle_idle_stream(&mut self, origin: Origin) -> bool {
        let Some(channels) = self.inbound_of.get_mut(&origin) else {
            return false;
        };
        let inbound = &self.inbound;
        let victim = channels
            .iter()
            .filter_map(|c| inbound.get(&(origin, *c)).map(|s| (*c, s)))
            .filter(|(_, s)| s.is_idle())
            .min_by_key(|(_, s)| s.last_arrival())
            .map(|(c, _)| c);
        let Some(channel) = victim else {
            return false;
        };
        channels.remove(&channel);
        let key = (origin, channel);
        const MAX_MARKS: usize = 1 << 16;
        if let Some(s) = self.inbound.remove(&key) {
            if self.marks.len() >= MAX_MARKS {
                self.marks.clear();
            }
            self.marks.insert(key, s.mark());
        }
        self.stats.streams_recycled += 1;
        tracing::debug!(%origin, channel = ?key.1, "idle inbound stream dropped to make room for a new one");
        true
    }

    fn on_data(&mut self, now: Instant, origin: Origin, data: Data) {
        if data.seq == 0
            || data.seq > MAX_SEQ
            || data.floor > data.seq
            || data.id_floor > data.floor
        {
            self.stats.malformed_dropped += 1;
            tracing::debug!(%origin, channel = ?data.channel, seq = data.seq, floor = data.floor, id_floor = data.id_floor, "data frame dropped: sequence numbers no sender produces");
            return;
        }
        if let Err(why) = self.authz.check(origin.node, &data) {
            // Before any stream or dedup state: a refused frame leaves no trace.
            self.stats.unauthorized_dropped += 1;
            tracing::debug!(%origin, channel = ?data.channel, id = ?data.id, ?why, "data frame refused: not authorized");
            if data.guarantee != Guarantee::AtMostOnce {
                self.send_reject(origin, data.channel, data.seq, RejectReason::Unauthorized);
            }
            return;
        }
        let channel = data.channel;
        let Some(accept) = self.channels.get(&channel).copied() else {
            // No receiver: dropped unacked, so the sender retries until one appears;
            // past the grace period it is told (rejected), so it stops waiting.
            self.stats.frames_ignored += 1;
            let amo = data.guarantee == Guarantee::AtMostOnce;
            // But not a copy of a message processed or still held here (the receiver
            // was dropped while a slow handler held it, or its ack was lost in a cut):
            // `NoReceiver` says no handler saw it. A settled one is acked again, a held
            // one is reported held; an effectively-once id the dedup table knows
            // settled (a receiver that restarted) is acked. (Regression: such copies
            // were refused past the grace, and receipts of processed messages failed
            // `Rejected(NoReceiver)`.)
            if !amo {
                let known = match self.inbound.get_mut(&(origin, channel)) {
                    Some(s) => s.known_without_receiver(now, data.seq),
                    None => Known::Unknown,
                };
                match known {
                    Known::Done | Known::Held => return,
                    Known::Rejected(reason) => {
                        self.send_reject(origin, channel, data.seq, reason);
                        return;
                    }
                    Known::Unknown => {}
                }
                if data.guarantee == Guarantee::EffectivelyOnce
                    && self.settled_in_dedup(origin, &data)
                {
                    // No stream knows it: an ack of its own.
                    self.stats.duplicates_dropped += 1;
                    let seq = data.seq;
                    let ranges = vec![SeqRange {
                        start: seq,
                        end: seq,
                    }];
                    self.push_streamless_ack(origin, channel, ranges, None);
                    return;
                }
            }
            let rejected = !amo && self.past_no_receiver_grace(now, channel);
            if rejected {
                tracing::debug!(%origin, ?channel, seq = data.seq, "data frame rejected: no receiver");
                self.stats.rejected += 1;
                self.send_reject(origin, channel, data.seq, RejectReason::NoReceiver);
                if let Some(s) = self.inbound.get_mut(&(origin, channel)) {
                    s.forget_undeliverable(data.seq);
                }
            }
            if amo || rejected {
                self.grant_orphan_credit(now, origin, channel, data.seq);
            }
            return;
        };
        let ordered = accept.ordered;
        let is_new = !self.inbound.contains_key(&(origin, channel));
        if is_new {
            let open = self.inbound_of.get(&origin).map_or(0, |c| c.len());
            if open >= self.config.max_streams_per_peer && !self.recycle_idle_stream(origin) {
                self.stats.streams_refused += 1;
                tracing::debug!(%origin, ?channel, "inbound stream refused: per-peer limit");
                return;
            }
        }
        let version = self.peers.get(&origin.node).map_or(0, |p| p.version);
        let crediting = version >= 2;
        let node_hold = self.node_hold();
        let cfg = &self.config;
        if is_new {
            self.inbound_of.entry(origin).or_default().insert(channel);
        }
        let stream = self.inbound.entry((origin, channel)).or_insert_with(|| {
            InboundStream::new(
                origin,
                channel,
                ordered,
                cfg.ack_delay,
                cfg.max_ack_ranges,
                cfg.max_reorder_buffer,
                cfg.stream_credit,
                cfg.amo_reorder_slack,
            )
        });
        if is_new {
            // A stream recycled before goes on where it stopped; one whose frames
            // found no receiver keeps the credit those earned.
            if let Some(m) = self.marks.remove(&(origin, channel)) {
                stream.resume(m);
            }
            if let Some(g) = self.orphan_grants.remove(&(origin, channel)) {
                stream.granted_before(g);
            }
        }
        let node_full = self
            .app_held
            .get(&origin.node)
            .is_some_and(|n| *n >= node_hold);
        stream.note_frame(&data);
        if stream.over_credit(
            data.seq,
            data.floor,
            INITIAL_CREDIT,
            CREDIT_SLACK,
            node_full,
            crediting,
        ) {
            // A sender ignoring its credit: dropped unacked (safety net), counted.
            self.stats.credit_exceeded += 1;
            if data.guarantee == Guarantee::AtMostOnce {
                stream.spend(data.seq);
            }
            tracing::debug!(%origin, ?channel, seq = data.seq, guarantee = ?data.guarantee, "data frame dropped: past the stream's credit");
            return;
        }
        let id_floor = data.id_floor;
        let eo = data.guarantee == Guarantee::EffectivelyOnce;
        // Offered on every effectively-once frame, not only when it moved: the dedup
        // stream may have been retired (idle past the retention) and forgotten since,
        // and the floor is what lets it restart at the right place.
        if eo && id_floor > 1 {
            stream.last_id_floor = stream.last_id_floor.max(id_floor);
            if let Err(e) = self.dedup.advance_floor(origin, channel, id_floor, now) {
                // Not an IO error (records are only buffered here): a stream limit.
                // The stream's messages meet the same refusal at `begin`, counted
                // there. (Regression: it was counted as a persist error, which made
                // every pending `ack_durable` report `NotPersisted`.)
                tracing::debug!(%origin, error = %e, "dedup floor not applied");
            }
        }
        let mut ready = std::mem::take(&mut self.ready);
        // The channel's receiver now may not be the one this stream started with.
        stream.set_ordered(ordered, &mut ready);
        // Held ranges travel from protocol 5 on: for an older sender, neither worked
        // out nor acked for.
        stream.report_held = version >= 5;
        let (channel_seq, guarantee) = (data.seq, data.guarantee);
        match stream.on_data(now, data, &mut ready) {
            Arrival::Duplicate => self.stats.duplicates_dropped += 1,
            Arrival::InProgress => self.stats.in_progress_dropped += 1,
            Arrival::BufferFull => self.stats.reorder_overflow += 1,
            Arrival::Rejected(reason) => {
                self.stats.duplicates_dropped += 1;
                if guarantee != Guarantee::AtMostOnce {
                    self.send_reject(origin, channel, channel_seq, reason);
                }
            }
            Arrival::Ready | Arrival::Buffered => {}
        }
        self.process_ready(now, origin, channel, &mut ready);
        self.ready = ready;
    }

    /// Does the dedup table know `data`'s library-assigned id settled? (Read-only:
    /// application keys are not looked up here.)
    fn settled_in_dedup(&self, origin: Origin, data: &Data) -> bool {
        let id = data.id.unwrap_or(MessageId::Seq {
            origin,
            channel: data.channel,
            seq: data.seq,
        });
        match id {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => self.dedup.seq_done(origin, channel, seq),
            MessageId::Key(_) => false,
        }
    }

    /// An ack of `origin`'s stream on `channel` from no stream here: it acks `ranges`
    /// only, grants `credit` if any, and holds nothing.
    fn push_streamless_ack(
        &mut self,
        origin: Origin,
        channel: ChannelId,
        ranges: Vec<SeqRange>,
        credit: Option<u64>,
    ) {
        self.stats.acks_sent += 1;
        self.transmit.push_back((
            origin.node,
            Frame::Ack(crate::wire::Ack {
                channel,
                incarnation: origin.incarnation,
                cumulative: 0,
                ranges,
                credit,
                received: 0,
                held: Vec::new(),
            }),
        ));
    }

    /// A frame of `origin`'s stream on `channel` found no receiver and holds nothing
    /// here (at-most-once: dropped; otherwise rejected): grant the stream credit past
    /// it, so the sender's later messages come to be dropped or rejected too instead
    /// of waiting for a grant that no stream here would ever send. (Regression: past
    /// the initial credit, 256 messages, an at-least-once sender's messages never left
    /// and failed at their deadline instead of `NoReceiver`, and an at-most-once
    /// sender's receipts and window waited forever.) A credit-only ack (nothing
    /// acked), once per half a grant; bounded map, cleared when full (a grant sent
    /// again is harmless: grants only grow).
    fn grant_orphan_credit(&mut self, now: Instant, origin: Origin, channel: ChannelId, seq: u64) {
        const MAX_ORPHANS: usize = 4096;
        let crediting = self
            .peers
            .get(&origin.node)
            .is_some_and(|p| p.origin == origin && p.version >= 2);
        if !crediting {
            return;
        }
        if self.orphan_grants.len() >= MAX_ORPHANS {
            self.orphan_grants.clear();
        }
        let granted = self.orphan_grants.entry((origin, channel)).or_insert(0);
        if seq.saturating_add(INITIAL_CREDIT / 2) < *granted {
            return;
        }
        let grant = seq.saturating_add(INITIAL_CREDIT);
        *granted = grant;
        if let Some(s) = self.inbound.get_mut(&(origin, channel)) {
            // The stream of a receiver that went away still holds messages (slow
            // handlers): its own ack carries the grant and what it holds. (Regression:
            // this ack said nothing was held, and the sender retransmitted every
            // message a handler was still working on.)
            s.granted_before(grant);
            s.owe_ack(now);
            return;
        }
        self.push_streamless_ack(origin, channel, Vec::new(), Some(grant));
    }

    /// Has `channel` (without a receiver) been receiving data for longer than the grace
    /// period? The first arrival starts its clock. At most 4096 channels are timed;
    /// past that, further channels are treated as past their grace.
    fn past_no_receiver_grace(&mut self, now: Instant, channel: ChannelId) -> bool {
        const MAX_UNCLAIMED: usize = 4096;
        let grace = self.config.no_receiver_grace;
        if let Some(since) = self.unclaimed.get(&channel) {
            return now.saturating_duration_since(*since) >= grace;
        }
        if self.unclaimed.len() >= MAX_UNCLAIMED {
            // Full: channels past their grace make room (their next message starts a
            // new grace: later, never early), at most once a grace period; if none
            // is, this channel is within its grace. (Regression: a full table
            // answered "past the grace" for every new channel, so a peer sending on
            // 4 096 made-up channels had everyone's messages refused at once.)
            if self
                .unclaimed_swept
                .is_none_or(|t| now.saturating_duration_since(t) >= grace)
            {
                self.unclaimed_swept = Some(now);
                self.unclaimed
                    .retain(|_, since| now.saturating_duration_since(*since) < grace);
            }
            if self.unclaimed.len() >= MAX_UNCLAIMED {
                return grace.is_zero();
            }
        }
        self.unclaimed.insert(channel, now);
        grace.is_zero()
    }

    /// Hand the stream's ready messages to the application, in order, through dedup.
    /// A message dedup cannot admit now stops an ordered stream at it: what follows
    /// goes back to the stream (ordered delivery contract, rule 3).
    fn process_ready(
        &mut self,
        now: Instant,
        origin: Origin,
        channel: ChannelId,
        ready: &mut Vec<Data>,
    ) {
        if ready.is_empty() {
            return; // the common case after an ack or a wake: no lookups
        }
        let Endpoint {
            inbound,
            dedup,
            events,
            stats,
            waiting,
            peers,
            transmit,
            channels,
            app_held,
            id_failures,
            ..
        } = self;
        let Some(stream) = inbound.get_mut(&(origin, channel)) else {
            ready.clear();
            return;
        };
        let ordered = stream.is_ordered();
        let max_deliveries = channels.get(&channel).and_then(|a| a.max_deliveries);
        let expected_schema = channels.get(&channel).map_or(0, |a| a.schema);
        // Can the sender be told of a refusal (protocol version 3)?
        let speaks = speaks_v3(peers, origin);
        let mut reject = |stream: &mut InboundStream,
                          seq: u64,
                          reason: RejectReason,
                          ready: &mut Vec<Data>,
                          stats: &mut ProtoStats| {
            stats.rejected += 1;
            if speaks {
                stream.reject(now, seq, reason, ready);
                stats.rejects_sent += 1;
                transmit.push_back(reject_frame(origin, channel, seq, reason));
            } else {
                // An older sender cannot be told; acking ends its retries, which
                // cannot help.
                stream.complete(now, seq, true);
            }
        };
        let mut dead: Vec<MessageId> = Vec::new();
        let mut i = 0;
        while i < ready.len() {
            let d = &mut ready[i];
            let id = d.id.unwrap_or(MessageId::Seq {
                origin,
                channel,
                seq: d.seq,
            });
            let seq = d.seq;
            if expected_schema != 0 && d.schema != 0 && d.schema != expected_schema {
                // Another payload type: never decoded, never delivered.
                tracing::debug!(%id, expected = expected_schema, got = d.schema, "message of another payload type rejected");
                stats.type_mismatches += 1;
                if d.guarantee == Guarantee::AtMostOnce {
                    stream.complete(now, seq, false);
                } else {
                    reject(stream, seq, RejectReason::TypeMismatch, ready, stats);
                }
                i += 1;
                continue;
            }
            let delivery = DeliveryRef {
                origin,
                channel,
                seq,
                id,
                guarantee: d.guarantee,
                schema: d.schema,
            };
            match d.guarantee {
                Guarantee::AtMostOnce => {
                    // Settled on delivery: a transport duplicate is never delivered,
                    // whatever the application does with this one.
                    stream.complete(now, seq, false);
                    stream.amo_delivered();
                }
                Guarantee::AtLeastOnce => {}
                Guarantee::EffectivelyOnce => match dedup.begin(&id, now) {
                    Ok(Admit::Fresh) => {}
                    Ok(Admit::Duplicate) => {
                        stats.duplicates_dropped += 1;
                        stream.complete(now, seq, true);
                        i += 1;
                        continue;
                    }
                    Ok(Admit::InProgress) => {
                        // Answered when the original finishes (see `wake_parked`).
                        stats.in_progress_dropped += 1;
                        let later = if ordered {
                            ready.split_off(i + 1)
                        } else {
                            Vec::new()
                        };
                        let data = ready.remove(i);
                        stream.park(seq, later);
                        waiting
                            .entry(id)
                            .or_default()
                            .push_back(Parked { origin, data });
                        if ordered {
                            break;
                        }
                        continue;
                    }
                    Err(crate::dedup::DedupError::StreamRetired { .. }) => {
                        // Whether it was processed can no longer be told: refused for
                        // good (a late relay), never processed twice.
                        tracing::debug!(%id, "message of a retired stream rejected");
                        ready[i].payload = Bytes::new();
                        reject(stream, seq, RejectReason::StreamRetired, ready, stats);
                        i += 1;
                        continue;
                    }
                    Err(crate::dedup::DedupError::TableFull { .. }) if speaks => {
                        // The key table is at its memory budget: refused now, typed, so
                        // the sender's application sees why and can resend the same key
                        // later (nothing was processed). An older sender cannot be told
                        // (a reject would read as an ack): it retries, as below.
                        stats.dedup_refused += 1;
                        tracing::debug!(%id, "key table full: message rejected");
                        ready[i].payload = Bytes::new();
                        reject(stream, seq, RejectReason::KeyTableFull, ready, stats);
                        i += 1;
                        continue;
                    }
                    Err(e) => {
                        stats.dedup_refused += 1;
                        tracing::debug!(%id, error = %e, "dedup refused a message; sender will retry");
                        let later = if ordered {
                            ready.split_off(i + 1)
                        } else {
                            Vec::new()
                        };
                        ready.remove(i);
                        // Ordered, what it pushes (the stream's sender settled `seq`
                        // since) is next in line: nothing else is left in `ready`.
                        stream.refuse(seq, later, ready);
                        continue;
                    }
                },
            }
            if let (Some(max), false) =
                (max_deliveries, delivery.guarantee == Guarantee::AtMostOnce)
            {
                let mut deliveries = stream.failures(seq);
                // A copy of an effectively-once id dead-lettered moments ago (it was on
                // its way): refused with it, no second letter.
                let mut copy_of_dead = false;
                if delivery.guarantee == Guarantee::EffectivelyOnce {
                    if let Some(f) = id_failures.get(&id).copied() {
                        match f.dead_until {
                            Some(t) if now < t => copy_of_dead = true,
                            Some(_) => {
                                id_failures.remove(&id); // a new attempt
                            }
                            None => deliveries = deliveries.max(f.current(now)),
                        }
                    }
                }
                if copy_of_dead || deliveries >= max {
                    // Delivered `max` times already: a dead letter, not a redelivery.
                    // Not processed, so not recorded as done: a copy under the same id
                    // sent later is a new attempt (see `reject_delivery`).
                    if delivery.guarantee == Guarantee::EffectivelyOnce {
                        dedup.release(&id);
                        if !copy_of_dead {
                            dead.push(id);
                        }
                    }
                    let payload = std::mem::take(&mut ready[i].payload);
                    if !copy_of_dead {
                        stats.dead_lettered += 1;
                        events.push_back(Event::DeadLetter {
                            delivery,
                            payload,
                            deliveries,
                        });
                    }
                    reject(stream, seq, RejectReason::DeadLettered, ready, stats);
                    i += 1;
                    continue;
                }
            }
            stats.delivered += 1;
            *app_held.entry(origin.node).or_default() += 1;
            let payload = std::mem::take(&mut ready[i].payload);
            events.push_back(Event::Deliver { delivery, payload });
            i += 1;
        }
        ready.clear();
        for id in dead {
            // Copies still on their way are refused with it for a while (a copy sent
            // later is a new attempt).
            if self.id_failures.len() >= MAX_ID_FAILURES && !self.id_failures.contains_key(&id) {
                self.id_failures.clear();
            }
            self.id_failures.entry(id).or_default().dead_until =
                Some(crate::retry::later(now, DEAD_ID_MEMORY));
            // Copies of it parked behind the delivery that failed: refused with it.
            self.reject_parked(now, id, RejectReason::DeadLettered);
        }
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
                OutEvent::Rejected { seq, reason } => {
                    stats.rejects_received += 1;
                    events.push_back(Event::Rejected {
                        send: SendRef { peer, channel, seq },
                        reason,
                    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::DedupConfig;

    fn endpoint(node: u64, now: Instant) -> Endpoint {
        let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap());
        let origin = Origin {
            node: NodeId(node),
            incarnation: 1,
        };
        Endpoint::new(origin, ProtoConfig::default(), dedup, node)
    }

    /// Every frame `from` has for `to`.
    fn frames(from: &mut Endpoint, to: NodeId, now: Instant) -> Vec<Frame> {
        from.handle_timeout(now);
        let mut out = Vec::new();
        while let Some((peer, f)) = from.poll_transmit(now) {
            assert_eq!(peer, to);
            out.push(f);
        }
        out
    }

    /// An effectively-once message under application key `key` from `a` to node 2,
    /// channel 1.
    fn send_keyed(
        a: &mut Endpoint,
        now: Instant,
        key: u128,
        deadline: Option<Duration>,
    ) -> SendRef {
        a.send(
            now,
            Outgoing {
                peer: NodeId(2),
                channel: ChannelId(1),
                guarantee: Guarantee::EffectivelyOnce,
                payload: Bytes::from_static(b"k"),
                id: Some(MessageId::Key(crate::IdKey(key))),
                deadline,
                schema: 0,
            },
        )
        .unwrap()
    }

    /// A message without an explicit id from `a` to node 2 on `channel`.
    fn send_plain(a: &mut Endpoint, now: Instant, channel: ChannelId, guarantee: Guarantee) {
        a.send(
            now,
            Outgoing {
                peer: NodeId(2),
                channel,
                guarantee,
                payload: Bytes::from_static(b"m"),
                id: None,
                deadline: None,
                schema: 0,
            },
        )
        .unwrap();
    }

    /// The deliveries among `b`'s pending events (the others are dropped).
    fn deliveries(b: &mut Endpoint) -> Vec<DeliveryRef> {
        std::iter::from_fn(|| b.poll_event())
            .filter_map(|e| match e {
                Event::Deliver { delivery, .. } => Some(delivery),
                _ => None,
            })
            .collect()
    }

    /// A sequence number a liar might pick: small, around [`MAX_SEQ`], near
    /// `u64::MAX`, or anything.
    fn lie() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            0u64..6,
            MAX_SEQ - 3..=MAX_SEQ + 2,
            u64::MAX - 2..=u64::MAX,
            any::<u64>(),
        ]
    }

    /// One frame a lying (admitted) peer sends, and what the receiver does next.
    #[derive(Clone, Debug)]
    enum Lie {
        Data {
            ordered: bool,
            g: u8,
            seq: u64,
            floor: u64,
            id_floor: u64,
        },
        Ack {
            cumulative: u64,
            start: u64,
            end: u64,
            credit: u64,
            received: u64,
        },
        Nack(u64),
        Reject(u64),
        Finish {
            ordered: bool,
            last_seq: u64,
            id_floor: u64,
        },
        NodeCredit(u64, u64),
        Probe,
        /// The receiver's application finishes what it holds (ack, or nack when
        /// `true`) and its timers run.
        Work(bool),
    }

    fn lies() -> impl proptest::strategy::Strategy<Value = Vec<Lie>> {
        use proptest::prelude::*;
        let one = prop_oneof![
            4 => (any::<bool>(), 0u8..3, lie(), lie(), lie()).prop_map(|(ordered, g, seq, floor, id_floor)| Lie::Data { ordered, g, seq, floor, id_floor }),
            2 => (lie(), lie(), lie(), lie(), lie()).prop_map(|(cumulative, start, end, credit, received)| Lie::Ack { cumulative, start, end, credit, received }),
            1 => lie().prop_map(Lie::Nack),
            1 => lie().prop_map(Lie::Reject),
            1 => (any::<bool>(), lie(), lie()).prop_map(|(ordered, last_seq, id_floor)| Lie::Finish { ordered, last_seq, id_floor }),
            1 => (lie(), lie()).prop_map(|(a, b)| Lie::NodeCredit(a, b)),
            1 => Just(Lie::Probe),
            2 => any::<bool>().prop_map(Lie::Work),
        ];
        proptest::collection::vec(one, 1..40)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            // 512 by default; PROPTEST_CASES raises it for a hunt.
            cases: proptest::prelude::ProptestConfig::default().cases.max(512),
            failure_persistence: None,
            ..Default::default()
        })]

        /// Property: whatever sequence numbers an admitted peer puts in its frames,
        /// the endpoint neither panics (overflow checks are on in tests) nor stalls,
        /// and it keeps delivering another peer's messages. (Regression: a data frame
        /// with seq and floor at `u64::MAX` overflowed `next_deliver`; in a release
        /// build the ordered drain then looped ~2^64 times.)
        #[test]
        fn a_lying_peer_neither_panics_nor_stalls_the_endpoint(lies in lies()) {
            let t0 = Instant::now();
            let (mut b, liar, honest) = (endpoint(2, t0), endpoint(1, t0), endpoint(3, t0));
            let mut honest = honest;
            b.handle_peer_up(t0, liar.origin(), 3);
            b.handle_peer_up(t0, honest.origin(), 3);
            honest.handle_peer_up(t0, b.origin(), 3);
            b.accept_channel_with(ChannelId(1), Accept::new(false, None));
            b.accept_channel_with(ChannelId(2), Accept::new(true, None));
            // Outbound state for the liar's acks, nacks and rejects to hit.
            for ch in [1, 2] {
                b.send(t0, Outgoing { peer: NodeId(1), channel: ChannelId(ch), guarantee: Guarantee::AtLeastOnce, payload: Bytes::from_static(b"x"), id: None, deadline: None, schema: 0 }).unwrap();
            }
            let inc = liar.origin().incarnation;
            let mut now = t0;
            let mut held = Vec::new();
            for lie in lies {
                now += Duration::from_millis(7);
                let frame = match lie {
                    Lie::Data { ordered, g, seq, floor, id_floor } => Frame::Data(Data {
                        channel: ChannelId(if ordered { 2 } else { 1 }),
                        seq, floor, id_floor, id: None,
                        guarantee: [Guarantee::AtMostOnce, Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce][usize::from(g)],
                        schema: 0, payload: Bytes::from_static(b"lie"),
                    }),
                    Lie::Ack { cumulative, start, end, credit, received } => Frame::Ack(crate::wire::Ack {
                        channel: ChannelId(1), incarnation: b.origin().incarnation, cumulative,
                        ranges: vec![crate::wire::SeqRange { start, end }], credit: Some(credit), received,
                        held: vec![crate::wire::SeqRange { start: end, end: start }],
                    }),
                    Lie::Nack(seq) => Frame::Nack(crate::wire::Nack { channel: ChannelId(2), incarnation: b.origin().incarnation, seq }),
                    Lie::Reject(seq) => Frame::Reject(crate::wire::Reject { channel: ChannelId(1), incarnation: b.origin().incarnation, seq, reason: RejectReason::NoReceiver }),
                    Lie::Finish { ordered, last_seq, id_floor } => Frame::Finish(crate::wire::Finish { channel: ChannelId(if ordered { 2 } else { 1 }), last_seq, id_floor }),
                    Lie::NodeCredit(limit, received) => Frame::NodeCredit(crate::wire::NodeCredit { limit, received }),
                    Lie::Probe => Frame::CreditProbe(CreditProbe { channel: ChannelId(2) }),
                    Lie::Work(nack) => {
                        for d in held.drain(..) {
                            b.complete(now, d, if nack { Completion::Nack } else { Completion::Ack });
                        }
                        b.handle_timeout(now);
                        while b.poll_transmit(now).is_some() {}
                        continue;
                    }
                };
                b.handle_frame_from(now, Origin { node: NodeId(1), incarnation: inc }, frame);
                while let Some(ev) = b.poll_event() {
                    if let Event::Deliver { delivery, .. } = ev {
                        if delivery.guarantee != Guarantee::AtMostOnce {
                            held.push(delivery);
                        }
                    }
                }
            }
            // Another peer is still served.
            honest.send(now, Outgoing { peer: NodeId(2), channel: ChannelId(1), guarantee: Guarantee::EffectivelyOnce, payload: Bytes::from_static(b"honest"), id: None, deadline: None, schema: 0 }).unwrap();
            for f in frames(&mut honest, NodeId(2), now) {
                b.handle_frame_from(now, honest.origin(), f);
            }
            let mut delivered = false;
            while let Some(ev) = b.poll_event() {
                if let Event::Deliver { payload, .. } = ev {
                    delivered |= &payload[..] == b"honest";
                }
            }
            proptest::prop_assert!(delivered, "the honest peer's message was not delivered");
        }
    }

    /// A message refused for good was not processed, so its id is not recorded as
    /// done: a copy parked behind it (same key, another seq) gets the same refusal,
    /// and a copy sent later is delivered as a new attempt — never acked as a
    /// duplicate of something no handler finished. (Regression: both were acked.)
    #[test]
    fn copies_of_a_refused_message_are_refused_or_delivered_again_never_acked() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 3);
        b.handle_peer_up(now, a.origin(), 3);
        b.accept_channel_with(ChannelId(1), Accept::new(false, None));
        let send = |a: &mut Endpoint| send_keyed(a, now, 77, None);
        let (first, second) = (send(&mut a), send(&mut a));
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        let delivered = deliveries(&mut b);
        assert_eq!(delivered.len(), 1, "the copy waits behind the original");
        assert_eq!(b.stats().in_progress_dropped, 1);
        b.complete(
            now,
            delivered[0],
            Completion::Reject(RejectReason::Undecodable),
        );
        let out = frames(&mut b, NodeId(1), now);
        let rejected: Vec<u64> = out
            .iter()
            .filter_map(|f| match f {
                Frame::Reject(r) if r.reason == RejectReason::Undecodable => Some(r.seq),
                _ => None,
            })
            .collect();
        assert_eq!(rejected, [first.seq, second.seq], "{out:?}");
        for f in out {
            b.handle_frame(now, NodeId(1), f.clone());
            a.handle_frame(now, NodeId(2), f);
        }
        let answers: Vec<Event> = std::iter::from_fn(|| a.poll_event())
            .filter(|e| !matches!(e, Event::Heard(_) | Event::WindowOpened { .. }))
            .collect();
        assert!(
            answers.iter().all(|e| matches!(e, Event::Rejected { .. })) && answers.len() == 2,
            "both copies are refused, neither settled as acked: {answers:?}"
        );
        // The same key sent again later: a new attempt, delivered.
        let third = send(&mut a);
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        let again: Vec<u64> = deliveries(&mut b).iter().map(|d| d.seq).collect();
        assert_eq!(again, [third.seq]);
    }

    /// Deliveries taken back from a dropped ordered receiver keep their payload type:
    /// a receiver registered next with another type refuses them (`TypeMismatch`),
    /// it is not handed them to decode as its own.
    #[test]
    fn deliveries_taken_back_are_type_checked_again() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 5);
        b.handle_peer_up(now, a.origin(), 5);
        let (sa, sb) = (0xA, 0xB);
        b.accept_channel_with(ChannelId(1), Accept::new(true, None).schema(sa));
        for _ in 0..3 {
            a.send(
                now,
                Outgoing {
                    peer: NodeId(2),
                    channel: ChannelId(1),
                    guarantee: Guarantee::AtLeastOnce,
                    payload: Bytes::from_static(b"m"),
                    id: None,
                    deadline: None,
                    schema: sa,
                },
            )
            .unwrap();
        }
        let sent = frames(&mut a, NodeId(2), now);
        for f in sent.clone() {
            b.handle_frame(now, NodeId(1), f);
        }
        // The first delivery is refused (its receiver is gone) before the next two
        // are taken from the queue; then a receiver of another type registers.
        let first = loop {
            match b.poll_event() {
                Some(Event::Deliver { delivery, .. }) => break delivery,
                Some(_) => {}
                None => panic!("nothing delivered"),
            }
        };
        assert_eq!(first.schema, sa);
        b.complete(now, first, Completion::Refuse);
        b.accept_channel_with(ChannelId(1), Accept::new(true, None).schema(sb));
        for f in sent {
            if matches!(f, Frame::Data(ref d) if d.seq == first.seq) {
                b.handle_frame(now, NodeId(1), f);
            }
        }
        assert_eq!(deliveries(&mut b), [], "another type's messages handed out");
        let rejected: Vec<u64> = frames(&mut b, NodeId(1), now)
            .iter()
            .filter_map(|f| match f {
                Frame::Reject(r) if r.reason == RejectReason::TypeMismatch => Some(r.seq),
                _ => None,
            })
            .collect();
        assert_eq!(rejected, [1, 2, 3]);
    }

    /// An ack with rejections held back below its cumulative stays within the
    /// decoder's `MAX_ACK_RANGES`: the peer does not take it for malformed.
    #[test]
    fn an_ack_with_rejections_held_back_still_decodes() {
        use crate::wire::{Ack, FrameDecoder, SeqRange, MAX_ACK_RANGES};
        let n = MAX_ACK_RANGES as u64;
        let mut ack = Ack {
            channel: ChannelId(1),
            incarnation: 1,
            cumulative: 10,
            ranges: (0..n)
                .map(|i| SeqRange {
                    start: 12 + 2 * i,
                    end: 12 + 2 * i,
                })
                .collect(),
            credit: Some(1 << 30),
            received: 0,
            held: Vec::new(),
        };
        hold_back_rejected(&mut ack, [5u64].into_iter());
        assert_eq!(ack.cumulative, 4);
        assert_eq!(ack.ranges.len(), MAX_ACK_RANGES);
        assert_eq!(ack.ranges[0], SeqRange { start: 6, end: 10 });
        let mut buf = bytes::BytesMut::new();
        crate::wire::encode(&Frame::Ack(ack.clone()), &mut buf).unwrap();
        let back = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(back, Frame::Ack(ack));
    }

    /// Three copies of a key with a delivery limit of 1: the first is nacked, the
    /// copy woken in its place is dead-lettered, and the third, parked behind it, is
    /// refused with it (`DeadLettered`), not left parked behind nothing until its
    /// sender's deadline.
    #[test]
    fn copies_parked_behind_a_woken_copy_that_is_dead_lettered_are_refused_with_it() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 5);
        b.handle_peer_up(now, a.origin(), 5);
        b.accept_channel_with(ChannelId(1), Accept::new(false, Some(1)));
        let sent: Vec<SendRef> = (0..3).map(|_| send_keyed(&mut a, now, 90, None)).collect();
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        let d = deliveries(&mut b);
        assert_eq!(d.len(), 1, "two copies parked");
        b.complete(now, d[0], Completion::Nack);
        assert_eq!(deliveries(&mut b), [], "the limit is reached");
        let later = now + Duration::from_millis(30);
        let rejected: Vec<u64> = frames(&mut b, NodeId(1), later)
            .iter()
            .filter_map(|f| match f {
                Frame::Reject(r) if r.reason == RejectReason::DeadLettered => Some(r.seq),
                _ => None,
            })
            .collect();
        assert_eq!(rejected, [sent[1].seq, sent[2].seq]);
        assert!(b.waiting.is_empty());
    }

    /// Copies of a key parked behind a delivery still in a handler go with their
    /// sender's run: a sender that restarts and resends, again and again, while the
    /// handler holds the first copy, leaves only its current run's copies parked.
    /// (Regression: every run's copies stayed, 1 + 3 × 5 here.)
    #[test]
    fn copies_parked_by_an_earlier_run_of_the_sender_are_dropped_at_its_restart() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 5);
        b.handle_peer_up(now, a.origin(), 5);
        b.accept_channel_with(ChannelId(1), Accept::new(false, None));
        let key = MessageId::Key(crate::IdKey(80));
        send_keyed(&mut a, now, 80, None);
        send_keyed(&mut a, now, 80, None);
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        let held = deliveries(&mut b);
        assert_eq!(held.len(), 1);
        assert_eq!(b.waiting[&key].len(), 1);
        for run in 2..=6 {
            let mut next = Endpoint::new(
                Origin {
                    node: NodeId(1),
                    incarnation: run,
                },
                ProtoConfig::default(),
                Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap()),
                1,
            );
            next.handle_peer_up(now, b.origin(), 5);
            b.handle_peer_up(now, next.origin(), 5);
            for _ in 0..3 {
                send_keyed(&mut next, now, 80, None);
            }
            for f in frames(&mut next, NodeId(2), now) {
                b.handle_frame(now, NodeId(1), f);
            }
            assert!(
                deliveries(&mut b).is_empty(),
                "run {run}: parked, not delivered"
            );
            assert_eq!(b.waiting[&key].len(), 3, "run {run}");
            assert!(b.waiting[&key].iter().all(|p| p.origin == next.origin()));
        }
        // The handler acks at last: the live run's copies settle with it.
        b.complete(now, held[0], Completion::Ack);
        assert!(b.waiting.is_empty());
    }

    /// A delivery refused for good after its sender restarted (its stream is gone)
    /// still releases its id: the new run's copy of the same key is delivered, not
    /// parked behind a delivery that no longer exists. (Regression: the id stayed in
    /// progress for good; every later copy was parked and reported held.)
    #[test]
    fn a_rejection_after_the_senders_restart_releases_the_id() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 5);
        b.handle_peer_up(now, a.origin(), 5);
        b.accept_channel_with(ChannelId(1), Accept::new(false, None));
        let send = |a: &mut Endpoint| send_keyed(a, now, 79, None);
        send(&mut a);
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        let first = deliveries(&mut b);
        assert_eq!(first.len(), 1);
        // The sender restarts; then the application rejects what the old run sent.
        let mut a2 = Endpoint::new(
            Origin {
                node: NodeId(1),
                incarnation: 2,
            },
            ProtoConfig::default(),
            Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap()),
            1,
        );
        a2.handle_peer_up(now, b.origin(), 5);
        b.handle_peer_up(now, a2.origin(), 5);
        b.complete(now, first[0], Completion::Reject(RejectReason::Undecodable));
        // The new run sends the key again: a new attempt, delivered.
        send(&mut a2);
        for f in frames(&mut a2, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        assert_eq!(
            deliveries(&mut b).len(),
            1,
            "not parked behind the rejected one"
        );
        assert_eq!(b.stats().in_progress_dropped, 0);
    }

    /// A message processed and acked after its receiver was dropped, the ack lost:
    /// the sender's retransmissions find no receiver, past the grace too. The stream
    /// knows the seq settled and acks it again; `NoReceiver` would tell the sender no
    /// handler saw it. (Regression: refused `NoReceiver` once past the grace.) An
    /// effectively-once copy the dedup table knows settled, with no stream (a
    /// receiver that restarted), is acked too.
    #[test]
    fn a_copy_of_a_settled_message_without_a_receiver_is_acked_not_refused() {
        for guarantee in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
            let t0 = Instant::now();
            let (mut a, mut b) = (endpoint(1, t0), endpoint(2, t0));
            a.handle_peer_up(t0, b.origin(), 5);
            b.handle_peer_up(t0, a.origin(), 5);
            b.accept_channel_with(ChannelId(1), Accept::new(false, None));
            send_plain(&mut a, t0, ChannelId(1), guarantee);
            for f in frames(&mut a, NodeId(2), t0) {
                b.handle_frame(t0, NodeId(1), f);
            }
            let d = deliveries(&mut b);
            assert_eq!(d.len(), 1);
            b.complete(t0, d[0], Completion::Ack);
            b.unaccept_channel(ChannelId(1));
            // Every answer of b is lost from here on; a retransmits for 10 s.
            let mut answers = frames(&mut b, NodeId(1), t0);
            let mut now = t0;
            for _ in 0..10 {
                now += Duration::from_secs(1);
                for f in frames(&mut a, NodeId(2), now) {
                    b.handle_frame(now, NodeId(1), f);
                }
                answers.extend(frames(&mut b, NodeId(1), now));
            }
            let rejects: Vec<_> = answers
                .iter()
                .filter(|f| matches!(f, Frame::Reject(_)))
                .collect();
            assert!(rejects.is_empty(), "{guarantee:?}: {rejects:?}");
            let acks = answers
                .iter()
                .filter(|f| matches!(f, Frame::Ack(k) if k.cumulative >= 1 || k.ranges.iter().any(|r| r.start <= 1 && 1 <= r.end)))
                .count();
            assert!(acks >= 2, "{guarantee:?}: acked again: {answers:?}");
            // The receiver restarts (its dedup table kept, as a durable one is): no
            // stream knows the seq, the table does.
            if guarantee == Guarantee::EffectivelyOnce {
                let dedup = Arc::clone(&b.dedup);
                let mut b2 = Endpoint::new(b.origin(), ProtoConfig::default(), dedup, 2);
                b2.handle_peer_up(now, a.origin(), 5);
                let mut answers = Vec::new();
                for _ in 0..10 {
                    now += Duration::from_secs(1);
                    for f in frames(&mut a, NodeId(2), now) {
                        b2.handle_frame(now, NodeId(1), f);
                    }
                    answers.extend(frames(&mut b2, NodeId(1), now));
                }
                assert!(
                    !answers.iter().any(|f| matches!(f, Frame::Reject(_))),
                    "restarted: {answers:?}"
                );
                assert!(
                    answers.iter().any(|f| matches!(f, Frame::Ack(k) if k.ranges.iter().any(|r| r.start <= 1 && 1 <= r.end))),
                    "restarted: acked from the dedup table: {answers:?}"
                );
            }
        }
    }

    /// A key resent after its deadline, parked behind the original (still in a slow
    /// handler) and behind an earlier resend its sender gave up on too: when the
    /// original fails, the copy that can still be delivered is, on an ordered stream
    /// as on an unordered one. (Regression: only the oldest parked copy was woken; it
    /// was the given-up one, dropped, and the live one stayed parked — reported held
    /// to its sender — until its deadline.)
    #[test]
    fn a_failed_original_wakes_the_copy_that_is_still_wanted() {
        for ordered in [true, false] {
            let t0 = Instant::now();
            let (mut a, mut b) = (endpoint(1, t0), endpoint(2, t0));
            a.handle_peer_up(t0, b.origin(), 5);
            b.handle_peer_up(t0, a.origin(), 5);
            b.accept_channel_with(ChannelId(1), Accept::new(ordered, None));
            let send = |a: &mut Endpoint, now, deadline| send_keyed(a, now, 78, deadline);
            // The original (seq 1) goes to a slow handler; the resend (seq 2) parks.
            let soon = Some(Duration::from_secs(1));
            send(&mut a, t0, soon);
            send(&mut a, t0, soon);
            for f in frames(&mut a, NodeId(2), t0) {
                b.handle_frame(t0, NodeId(1), f);
            }
            let original = deliveries(&mut b);
            assert_eq!(original.len(), 1, "ordered {ordered}");
            // Both reach their deadlines at the sender; the application resends.
            let t1 = t0 + Duration::from_secs(2);
            a.handle_timeout(t1);
            let third = send(&mut a, t1, None);
            for f in frames(&mut a, NodeId(2), t1) {
                b.handle_frame(t1, NodeId(1), f);
            }
            assert!(deliveries(&mut b).is_empty(), "ordered {ordered}: parked");
            assert_eq!(b.stats().in_progress_dropped, 2, "ordered {ordered}");
            // The original's handler fails: the third copy is delivered now.
            b.complete(t1, original[0], Completion::Nack);
            let again: Vec<u64> = deliveries(&mut b).iter().map(|d| d.seq).collect();
            assert_eq!(again, [third.seq], "ordered {ordered}");
        }
    }

    /// Deliveries refused because their receiver is gone are nacked to the sender, as
    /// a handler's nack would be: the first refused one, and on an unordered stream
    /// the later ones taken back with it (an ordered stream keeps those for order).
    /// The sender, which had them reported held, retransmits them at once instead of
    /// at its next re-check. (Regression: a receiver dropped with a window of
    /// deliveries queued stalled its stream for `retry.backoff_cap`.)
    #[test]
    fn refused_deliveries_are_nacked_and_retransmitted_at_once() {
        for ordered in [false, true] {
            let now = Instant::now();
            let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
            a.handle_peer_up(now, b.origin(), crate::wire::PROTOCOL_VERSION);
            b.handle_peer_up(now, a.origin(), crate::wire::PROTOCOL_VERSION);
            b.accept_channel_with(ChannelId(1), Accept::new(ordered, None));
            for _ in 0..5 {
                send_plain(&mut a, now, ChannelId(1), Guarantee::AtLeastOnce);
            }
            for f in frames(&mut a, NodeId(2), now) {
                b.handle_frame(now, NodeId(1), f);
            }
            // The receiver takes 1 and 2, then is gone: 2 is refused, 3-5 are still
            // queued in the node's events.
            let mut taken = Vec::new();
            while taken.len() < 2 {
                if let Some(Event::Deliver { delivery, .. }) = b.poll_event() {
                    taken.push(delivery);
                }
            }
            b.complete(now, taken[0], Completion::Ack);
            b.complete(now, taken[1], Completion::Refuse);
            let t = now + Duration::from_millis(30);
            b.handle_timeout(t);
            let out = frames(&mut b, NodeId(1), t);
            let mut nacked: Vec<u64> = out
                .iter()
                .filter_map(|f| match f {
                    Frame::Nack(n) => Some(n.seq),
                    _ => None,
                })
                .collect();
            nacked.sort_unstable();
            let want: Vec<u64> = if ordered { vec![2] } else { vec![2, 3, 4, 5] };
            assert_eq!(nacked, want, "ordered {ordered}: {out:?}");
            for f in out {
                a.handle_frame(t, NodeId(2), f);
            }
            let before = a.stats().retransmitted;
            let later = t + crate::proto::outbound::NACK_RESEND_MIN;
            a.handle_timeout(later);
            let resent: Vec<u64> = frames(&mut a, NodeId(2), later)
                .into_iter()
                .filter_map(|f| match f {
                    Frame::Data(d) => Some(d.seq),
                    _ => None,
                })
                .collect();
            assert!(resent.contains(&2), "ordered {ordered}: resent {resent:?}");
            assert!(a.stats().retransmitted > before);
        }
    }

    /// A peer that restarts while the application still holds its earlier run's
    /// messages gets node credit only for what is left of the window: the held
    /// deliveries count though their streams were dropped with the old run. (Without
    /// that, each restart granted a whole fresh window on top.)
    #[test]
    fn node_credit_after_a_restart_counts_what_the_application_still_holds() {
        let now = Instant::now();
        let mut b = endpoint(2, now);
        b.accept_channel_with(ChannelId(1), Accept::new(false, None));
        let run = |incarnation| Origin {
            node: NodeId(1),
            incarnation,
        };
        b.handle_peer_up(now, run(1), 3);
        for seq in 1..=100 {
            b.handle_frame(
                now,
                NodeId(1),
                Frame::Data(Data {
                    channel: ChannelId(1),
                    seq,
                    floor: 1,
                    id_floor: 1,
                    id: None,
                    guarantee: Guarantee::AtLeastOnce,
                    schema: 0,
                    payload: Bytes::from_static(b"held"),
                }),
            );
        }
        let held = std::iter::from_fn(|| b.poll_event())
            .filter(|e| matches!(e, Event::Deliver { .. }))
            .count() as u64;
        assert_eq!(held, 100, "delivered and not finished");
        let _ = frames(&mut b, NodeId(1), now);
        b.handle_peer_up(now, run(2), 3);
        let grants: Vec<crate::wire::NodeCredit> = frames(&mut b, NodeId(1), now)
            .into_iter()
            .filter_map(|f| match f {
                Frame::NodeCredit(c) => Some(c),
                _ => None,
            })
            .collect();
        let c = grants.last().expect("the new run gets its first grant");
        assert_eq!(
            c.limit - c.received,
            ProtoConfig::default().node_credit - held,
            "{grants:?}"
        );
    }

    /// Each lie the black-box hunt found, alone: dropped and counted, nothing else.
    #[test]
    fn frames_with_impossible_sequence_numbers_are_dropped_and_counted() {
        let now = Instant::now();
        let (mut b, a) = (endpoint(2, now), endpoint(1, now));
        b.handle_peer_up(now, a.origin(), 3);
        b.accept_channel_with(ChannelId(2), Accept::new(true, None));
        let data = |seq, floor, id_floor| {
            Frame::Data(Data {
                channel: ChannelId(2),
                seq,
                floor,
                id_floor,
                id: None,
                guarantee: Guarantee::EffectivelyOnce,
                schema: 0,
                payload: Bytes::new(),
            })
        };
        for f in [
            data(u64::MAX, u64::MAX, u64::MAX),
            data(MAX_SEQ + 1, 1, 1),
            data(0, 0, 0),
            data(5, 6, 1),
            data(5, 5, 6),
        ] {
            b.handle_frame_from(now, a.origin(), f);
        }
        assert_eq!(b.stats().malformed_dropped, 5);
        assert!(b.inbound.is_empty(), "no stream was opened by a lie");
        // At the bound, the arithmetic still holds: delivered in order.
        for seq in [MAX_SEQ - 1, MAX_SEQ] {
            let Frame::Data(mut d) = data(seq, MAX_SEQ - 1, MAX_SEQ - 1) else {
                unreachable!()
            };
            d.guarantee = Guarantee::AtLeastOnce;
            b.handle_frame_from(now, a.origin(), Frame::Data(d));
        }
        assert_eq!(b.stats().malformed_dropped, 5);
        let seqs: Vec<u64> = std::iter::from_fn(|| b.poll_event())
            .filter_map(|e| match e {
                Event::Deliver { delivery, .. } => Some(delivery.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [MAX_SEQ - 1, MAX_SEQ]);
    }

    /// `a` sends two messages of `guarantee` to `b`, whose channel dead-letters a
    /// message at its second delivery; `b` nacks the first and acks the second, `a`
    /// retransmits the first, and `b` has just dead-lettered it: its reject is next in
    /// what `b` sends.
    fn first_of_two_dead_lettered(now: Instant, guarantee: Guarantee) -> (Endpoint, Endpoint) {
        // Sent a moment before `now`, so that the nack at `now` is answered at once (a
        // nack within `NACK_RESEND_MIN` of the copy it answers is paced).
        let sent = now
            .checked_sub(Duration::from_millis(150))
            .expect("an instant 150 ms before now");
        let (mut a, mut b) = (endpoint(1, sent), endpoint(2, sent));
        a.handle_peer_up(sent, b.origin(), 3);
        b.handle_peer_up(sent, a.origin(), 3);
        b.accept_channel_with(ChannelId(1), Accept::new(false, Some(1)));
        for n in 0..2u8 {
            a.send(
                sent,
                Outgoing {
                    peer: NodeId(2),
                    channel: ChannelId(1),
                    guarantee,
                    payload: Bytes::from(vec![n]),
                    id: None,
                    deadline: None,
                    schema: 0,
                },
            )
            .unwrap();
        }
        for f in frames(&mut a, NodeId(2), sent) {
            b.handle_frame(sent, NodeId(1), f);
        }
        let mut delivered = Vec::new();
        while let Some(ev) = b.poll_event() {
            if let Event::Deliver { delivery, .. } = ev {
                delivered.push(delivery);
            }
        }
        assert_eq!(delivered.len(), 2);
        b.complete(now, delivered[0], Completion::Nack);
        b.complete(now, delivered[1], Completion::Ack);
        for f in frames(&mut b, NodeId(1), now) {
            a.handle_frame(now, NodeId(2), f); // the nack and the ack of 2
        }
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f); // the nack made `a` retransmit 1
        }
        (a, b)
    }

    /// After `stop_counting_nacks` (its node drains before a stop) a message nacked
    /// more often than its channel's `max_deliveries` is delivered again each time,
    /// never dead-lettered, and its ack settles it; before, the second delivery of a
    /// `max_deliveries = 1` channel was a dead letter (`first_of_two_dead_lettered`).
    #[test]
    fn nacks_while_draining_do_not_count_toward_max_deliveries() {
        for guarantee in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
            let t0 = Instant::now();
            let (mut a, mut b) = (endpoint(1, t0), endpoint(2, t0));
            a.handle_peer_up(t0, b.origin(), 3);
            b.handle_peer_up(t0, a.origin(), 3);
            b.accept_channel_with(ChannelId(1), Accept::new(false, Some(1)));
            b.stop_counting_nacks();
            send_plain(&mut a, t0, ChannelId(1), guarantee);
            let mut now = t0;
            for round in 0..5 {
                for f in frames(&mut a, NodeId(2), now) {
                    b.handle_frame(now, NodeId(1), f);
                }
                let mut delivered = Vec::new();
                while let Some(ev) = b.poll_event() {
                    match ev {
                        Event::Deliver { delivery, .. } => delivered.push(delivery),
                        Event::DeadLetter { .. } => {
                            panic!("{guarantee:?}: dead-lettered in round {round}")
                        }
                        _ => {}
                    }
                }
                assert_eq!(delivered.len(), 1, "{guarantee:?} round {round}");
                let how = if round < 4 {
                    Completion::Nack
                } else {
                    Completion::Ack
                };
                b.complete(now, delivered[0], how);
                now += Duration::from_millis(300);
                for f in frames(&mut b, NodeId(1), now) {
                    a.handle_frame(now, NodeId(2), f);
                }
            }
            assert_eq!(b.stats().dead_lettered, 0, "{guarantee:?}");
            assert_eq!(a.stats().acked, 1, "{guarantee:?}");
        }
    }

    /// A reject lost with a connection reaches the sender on the next one, before any
    /// ack of the new connection: the sender never takes a rejected message for acked.
    #[test]
    fn a_reject_lost_with_its_connection_is_sent_again_before_any_ack() {
        let now = Instant::now();
        let (mut a, mut b) = first_of_two_dead_lettered(now, Guarantee::AtLeastOnce);
        let mut b_out = frames(&mut b, NodeId(1), now);
        assert!(
            b_out
                .iter()
                .any(|f| matches!(f, Frame::Reject(r) if r.seq == 1)),
            "{b_out:?}"
        );
        // The connection drops with every frame `b` sent on it.
        b_out.clear();
        a.handle_peer_down(now, NodeId(2));
        b.handle_peer_down(now, NodeId(1));
        a.handle_peer_up(now, b.origin(), 3);
        b.handle_peer_up(now, a.origin(), 3);
        let again = frames(&mut b, NodeId(1), now);
        let reject_at = again
            .iter()
            .position(|f| matches!(f, Frame::Reject(r) if r.seq == 1 && r.reason == RejectReason::DeadLettered))
            .expect("the reject is sent again");
        let first_ack = again.iter().position(|f| matches!(f, Frame::Ack(_)));
        assert!(first_ack.is_none_or(|ack| ack > reject_at), "{again:?}");
        for f in again {
            a.handle_frame(now, NodeId(2), f);
        }
        let mut outcome = None;
        while let Some(ev) = a.poll_event() {
            if let Event::Rejected { send, reason } = ev {
                outcome = Some((send.seq, reason));
            }
        }
        assert_eq!(outcome, Some((1, RejectReason::DeadLettered)));
        assert_eq!(a.stats().rejects_received, 1);
    }
    /// A reject lost with its connection while a later ack covering its seq still gets
    /// through (it waited in the transport's queue for the next connection): the
    /// sender does not take the rejected message for acked; it retransmits it and
    /// learns the reject. (Regression: the ack's cumulative covered the rejected seq,
    /// and a dead-lettered message's receipt said `Acked`, seen once under cuts in
    /// `blackbox_ordering::ordered_dead_letters_under_cuts_are_settled_once_and_in_order`.)
    #[test]
    fn an_ack_that_outruns_its_reject_does_not_settle_the_rejected_seq() {
        let now = Instant::now();
        let (mut a, mut b) = first_of_two_dead_lettered(now, Guarantee::EffectivelyOnce);
        let later = now + Duration::from_secs(1);
        let b_out = frames(&mut b, NodeId(1), later);
        assert!(
            b_out
                .iter()
                .any(|f| matches!(f, Frame::Reject(r) if r.seq == 1)),
            "{b_out:?}"
        );
        assert!(
            b_out.iter().any(|f| matches!(f, Frame::Ack(_))),
            "{b_out:?}"
        );
        // The reject is lost; the ack gets through.
        for f in b_out.into_iter().filter(|f| !matches!(f, Frame::Reject(_))) {
            a.handle_frame(later, NodeId(2), f);
        }
        let mut settled = Vec::new();
        while let Some(ev) = a.poll_event() {
            if let Event::Settled(send) = ev {
                settled.push(send.seq);
            }
        }
        assert!(
            !settled.contains(&1),
            "the rejected seq was taken for acked"
        );
        // 1 is retransmitted, and its copy meets the reject.
        let mut outcome = None;
        let mut t = later;
        for _ in 0..20 {
            t += Duration::from_secs(1);
            for f in frames(&mut a, NodeId(2), t) {
                b.handle_frame(t, NodeId(1), f);
            }
            for f in frames(&mut b, NodeId(1), t) {
                a.handle_frame(t, NodeId(2), f);
            }
            while let Some(ev) = a.poll_event() {
                match ev {
                    Event::Rejected { send, reason } => outcome = Some((send.seq, reason)),
                    Event::Settled(send) => assert_ne!(send.seq, 1, "taken for acked"),
                    _ => {}
                }
            }
            if outcome.is_some() {
                break;
            }
        }
        assert_eq!(outcome, Some((1, RejectReason::DeadLettered)));
    }

    /// `a` sends seqs 1..=3 (effectively-once, unordered) to `b` at `t0`; `lost` never
    /// arrives; `b` acks the others at `t0 + 190 ms` and `a` reads those acks.
    fn three_sent_one_lost(t0: Instant, lost: u64) -> Endpoint {
        let at190 = t0 + Duration::from_millis(190);
        let (mut a, mut b) = (endpoint(1, t0), endpoint(2, t0));
        a.handle_peer_up(t0, b.origin(), 3);
        b.handle_peer_up(t0, a.origin(), 3);
        for f in frames(&mut b, NodeId(1), t0) {
            a.handle_frame(t0, NodeId(2), f);
        }
        b.accept_channel(ChannelId(1), false);
        for n in 0..3 {
            send_eo(&mut a, t0, n);
        }
        for f in frames(&mut a, NodeId(2), t0) {
            if !matches!(&f, Frame::Data(d) if d.seq == lost) {
                b.handle_frame(t0, NodeId(1), f);
            }
        }
        while let Some(ev) = b.poll_event() {
            if let Event::Deliver { delivery, .. } = ev {
                b.complete(at190, delivery, Completion::Ack);
            }
        }
        for f in frames(&mut b, NodeId(1), at190) {
            a.handle_frame(at190, NodeId(2), f);
        }
        a
    }

    /// The seqs of the data frames `a` has for node 2 at `now`.
    fn data_seqs(a: &mut Endpoint, now: Instant) -> Vec<u64> {
        frames(a, NodeId(2), now)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Data(d) => Some(d.seq),
                _ => None,
            })
            .collect()
    }

    /// A retransmission timer does not fire while the receiver keeps settling the
    /// stream's messages (they are queued, not lost), and does once the stream has
    /// been quiet for an RTO: a lost message is still recovered.
    #[test]
    fn a_timer_waits_while_the_receiver_makes_progress_and_fires_once_quiet() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut a = three_sent_one_lost(t0, 3);
        // Seq 3's first timer (at most the initial RTO, 200 ms) has expired, but the
        // receiver settled 1 and 2 only 60 ms ago.
        assert_eq!(data_seqs(&mut a, at(250)), Vec::<u64>::new());
        assert_eq!(a.stats().retransmitted, 0);
        // Quiet for longer than any RTO (max_rto is 2 s): seq 3 goes again.
        assert_eq!(data_seqs(&mut a, at(2_400)), vec![3]);
        assert_eq!(a.stats().retransmitted, 1);
    }

    /// On an unordered channel a lost message is overtaken by acks of later ones: its
    /// expired timer retransmits it at once, without waiting for the stream to go quiet.
    #[test]
    fn an_overtaken_message_is_retransmitted_without_waiting_for_quiet() {
        let t0 = Instant::now();
        let mut a = three_sent_one_lost(t0, 1);
        assert_eq!(data_seqs(&mut a, t0 + Duration::from_millis(250)), vec![1]);
    }

    /// `in_flight_one` answers as `in_flight_to` does for that message, and `None` for a
    /// settled, future or unknown one.
    #[test]
    fn in_flight_one_matches_in_flight_to_message_by_message() {
        let t0 = Instant::now();
        let mut a = three_sent_one_lost(t0, 2);
        for n in 3..6 {
            send_eo(&mut a, t0, n);
        }
        let all = a.in_flight_to(NodeId(2));
        assert_eq!(all.len(), 4, "seq 2 lost, three more unacked");
        for (send, payload, id) in &all {
            assert_eq!(a.in_flight_one(*send), Some((payload.clone(), *id)));
        }
        let settled = SendRef { seq: 1, ..all[0].0 };
        assert_eq!(a.in_flight_one(settled), None, "seq 1 was acked");
        let future = SendRef {
            seq: 99,
            ..all[0].0
        };
        assert_eq!(a.in_flight_one(future), None);
        let other_channel = SendRef {
            channel: ChannelId(9),
            ..all[0].0
        };
        assert_eq!(a.in_flight_one(other_channel), None);
    }

    fn send_eo(a: &mut Endpoint, now: Instant, n: u8) {
        send_eo_on(a, now, 1, n);
    }

    /// An effectively-once message `[n]` to node 2 on channel `ch`.
    fn send_eo_on(a: &mut Endpoint, now: Instant, ch: u32, n: u8) {
        a.send(
            now,
            Outgoing {
                peer: NodeId(2),
                channel: ChannelId(ch),
                guarantee: Guarantee::EffectivelyOnce,
                payload: Bytes::from(vec![n]),
                id: None,
                deadline: None,
                schema: 0,
            },
        )
        .unwrap();
    }

    /// Frames both ways between `a` (node 1) and `b` (node 2) until nothing moves; `b`
    /// acks what it is handed. Returns how many of `a`'s messages settled and the
    /// payloads `b` delivered.
    fn pump(a: &mut Endpoint, b: &mut Endpoint, now: Instant) -> (usize, Vec<Bytes>) {
        let (mut settled, mut delivered) = (0, Vec::new());
        for _ in 0..10 {
            for f in frames(b, NodeId(1), now) {
                a.handle_frame(now, NodeId(2), f);
            }
            for f in frames(a, NodeId(2), now) {
                b.handle_frame(now, NodeId(1), f);
            }
            while let Some(ev) = b.poll_event() {
                if let Event::Deliver { delivery, payload } = ev {
                    delivered.push(payload);
                    b.complete(now, delivery, Completion::Ack);
                }
            }
            while let Some(ev) = a.poll_event() {
                settled += usize::from(matches!(ev, Event::Settled(_)));
            }
        }
        (settled, delivered)
    }

    /// `ProtoConfig::stream_credit` is a span (its docs): with one message held by its
    /// handler and every later one done, the sender transmits nothing past the held
    /// seq plus the credit; once the held one is done, the stream moves on.
    #[test]
    fn stream_credit_is_a_span_past_the_oldest_message_not_done() {
        let now = Instant::now();
        let mut a = endpoint(1, now);
        let cfg = ProtoConfig {
            stream_credit: 512,
            ..ProtoConfig::default()
        };
        let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap());
        let mut b = Endpoint::new(
            Origin {
                node: NodeId(2),
                incarnation: 1,
            },
            cfg,
            dedup,
            2,
        );
        a.handle_peer_up(now, b.origin(), 4);
        b.handle_peer_up(now, a.origin(), 4);
        b.accept_channel(ChannelId(1), false);
        for _ in 0..2000 {
            send_plain(&mut a, now, ChannelId(1), Guarantee::AtLeastOnce);
        }
        let (mut held, mut max_seq) = (None, 0u64);
        let mut round = |a: &mut Endpoint, b: &mut Endpoint, held: &mut Option<DeliveryRef>| {
            for _ in 0..20 {
                for f in frames(b, NodeId(1), now) {
                    a.handle_frame(now, NodeId(2), f);
                }
                for f in frames(a, NodeId(2), now) {
                    if let Frame::Data(d) = &f {
                        max_seq = max_seq.max(d.seq);
                    }
                    b.handle_frame(now, NodeId(1), f);
                }
                while let Some(ev) = b.poll_event() {
                    if let Event::Deliver { delivery, .. } = ev {
                        if delivery.seq == 1 && held.is_none() {
                            *held = Some(delivery);
                        } else {
                            b.complete(now, delivery, Completion::Ack);
                        }
                    }
                }
                while a.poll_event().is_some() {}
            }
            max_seq
        };
        let top = round(&mut a, &mut b, &mut held);
        assert!(held.is_some(), "seq 1 is held by its handler");
        assert!(
            (500..=512).contains(&top),
            "highest seq sent with seq 1 held and the rest done: {top}"
        );
        b.complete(now, held.take().unwrap(), Completion::Ack);
        let top = round(&mut a, &mut b, &mut held);
        assert_eq!(top, 2000, "the held message done, the stream goes on");
    }

    /// A hint replay keeps its own guarantee: on a channel this run sends at-least-once
    /// an earlier run's effectively-once hint goes out as effectively-once on the same
    /// stream (each frame says which), both are delivered, the application is still
    /// held to its one guarantee per channel, and the stream is finished at shutdown
    /// because an effectively-once message went out on it. A stream only a replay used
    /// is taken over, once settled, by the application's first send even at
    /// at-most-once (same seqs), after which no acked hint is taken on it.
    #[test]
    fn hints_keep_their_guarantee_and_only_the_application_claims_a_channel() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 4);
        b.handle_peer_up(now, a.origin(), 4);
        b.accept_channel(ChannelId(1), false);
        b.accept_channel(ChannelId(2), false);
        let msg = |ch: u32, guarantee, body: &'static [u8], id| Outgoing {
            peer: NodeId(2),
            channel: ChannelId(ch),
            guarantee,
            payload: Bytes::from_static(body),
            id,
            deadline: None,
            schema: 0,
        };
        let old_id = MessageId::Seq {
            origin: Origin {
                node: NodeId(1),
                incarnation: 0,
            },
            channel: ChannelId(1),
            seq: 1,
        };
        a.send(now, msg(1, Guarantee::AtLeastOnce, b"app", None))
            .unwrap();
        assert!(a.takes_hint(NodeId(2), ChannelId(1), Guarantee::EffectivelyOnce));
        a.send_hint(
            now,
            msg(1, Guarantee::EffectivelyOnce, b"hint", Some(old_id)),
        )
        .unwrap();
        let sent: Vec<(Bytes, Guarantee)> = frames(&mut a, NodeId(2), now)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Data(d) => Some((d.payload, d.guarantee)),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            [
                (Bytes::from_static(b"app"), Guarantee::AtLeastOnce),
                (Bytes::from_static(b"hint"), Guarantee::EffectivelyOnce)
            ]
        );
        // (The frames above were lost: the retransmissions go through.)
        let later = now + Duration::from_secs(5);
        let (settled, delivered) = pump(&mut a, &mut b, later);
        assert_eq!(settled, 2);
        assert_eq!(delivered.len(), 2, "{delivered:?}");
        for g in [Guarantee::EffectivelyOnce, Guarantee::AtMostOnce] {
            assert!(
                matches!(
                    a.send(later, msg(1, g, b"x", None)),
                    Err(StreamError::GuaranteeMismatch {
                        existing: Guarantee::AtLeastOnce,
                        ..
                    })
                ),
                "the application claimed channel 1 at-least-once; {g:?} refused"
            );
        }

        // Channel 2: only a replay used it; the application then sends at-most-once.
        a.send_hint(later, msg(2, Guarantee::AtLeastOnce, b"old", Some(old_id)))
            .unwrap();
        let later = later + Duration::from_secs(1);
        assert_eq!(pump(&mut a, &mut b, later).0, 1);
        let amo = a
            .send(later, msg(2, Guarantee::AtMostOnce, b"new", None))
            .expect("a settled stream only a replay used goes to the application");
        assert_eq!(amo.seq, 2, "same stream, next seq");
        let (_, delivered) = pump(&mut a, &mut b, later);
        assert_eq!(delivered, [Bytes::from_static(b"new")]);
        assert!(!a.takes_hint(NodeId(2), ChannelId(2), Guarantee::AtLeastOnce));
        assert!(a
            .send_hint(later, msg(2, Guarantee::AtLeastOnce, b"old2", Some(old_id)))
            .is_err());

        // Channel 3: the application asks for at-most-once while a replay is in
        // flight there: refused, and no further acked hint is taken on it; once the
        // replay settles, the stream is the application's.
        b.accept_channel(ChannelId(3), false);
        a.send_hint(later, msg(3, Guarantee::AtLeastOnce, b"old", Some(old_id)))
            .unwrap();
        assert!(matches!(
            a.send(later, msg(3, Guarantee::AtMostOnce, b"new", None)),
            Err(StreamError::GuaranteeMismatch {
                existing: Guarantee::AtLeastOnce,
                ..
            })
        ));
        assert!(!a.takes_hint(NodeId(2), ChannelId(3), Guarantee::AtLeastOnce));
        let later = later + Duration::from_secs(1);
        assert_eq!(
            pump(&mut a, &mut b, later).0,
            1,
            "the replay in flight settles"
        );
        a.send(later, msg(3, Guarantee::AtMostOnce, b"new", None))
            .expect("then the stream is the application's");
        assert_eq!(pump(&mut a, &mut b, later).1, [Bytes::from_static(b"new")]);

        // Channels 4 and 5: as channel 3, but the application's next send after the
        // replay settled is at-least-once; the answer is the same whether or not a
        // sweep put the settled stream aside in between.
        for (ch, sweep) in [(4, false), (5, true)] {
            b.accept_channel(ChannelId(ch), false);
            a.send_hint(later, msg(ch, Guarantee::AtLeastOnce, b"old", Some(old_id)))
                .unwrap();
            assert!(a
                .send(later, msg(ch, Guarantee::AtMostOnce, b"new", None))
                .is_err());
            let later = later + Duration::from_secs(1);
            assert_eq!(pump(&mut a, &mut b, later).0, 1);
            if sweep {
                a.sweep_quiet_streams();
                assert!(a.dormant.contains_key(&(NodeId(2), ChannelId(ch))));
            }
            a.send(later, msg(ch, Guarantee::AtLeastOnce, b"alo", None))
                .unwrap_or_else(|e| {
                    panic!("channel {ch} (sweep: {sweep}): no send claimed it yet: {e:?}")
                });
            assert!(
                a.send(later, msg(ch, Guarantee::AtMostOnce, b"x", None))
                    .is_err(),
                "claimed at-least-once now"
            );
            assert_eq!(pump(&mut a, &mut b, later).1, [Bytes::from_static(b"alo")]);
        }

        assert_eq!(
            a.finish_streams(),
            1,
            "channel 1 only: it carried effectively-once"
        );
    }

    /// Streams that have nothing left to do leave the per-input scans: after messages
    /// on 200 channels are delivered, acked and settled, neither end scans any of
    /// those streams any more, and one new message makes exactly its stream active
    /// again, which then delivers and settles as before. (Regression: every input
    /// scanned every stream ever opened, three to five times, and a settled stream's
    /// leftover timers kept it in the scans for up to its 30 s deadline; with 10 000
    /// idle channels one message's round trip took 2.6 ms instead of ~70 µs.)
    #[test]
    fn settled_streams_leave_the_scans_and_a_new_message_brings_one_back() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 3);
        b.handle_peer_up(now, a.origin(), 3);
        for ch in 0..200 {
            b.accept_channel(ChannelId(ch), false);
            send_eo_on(&mut a, now, ch, 0);
        }
        // The first transmissions are lost: the retransmissions arm timers that are
        // still pending when their acks settle the messages.
        assert!(!frames(&mut a, NodeId(2), now).is_empty());
        let later = now + Duration::from_secs(5);
        assert_eq!(pump(&mut a, &mut b, later).0, 200, "every message settled");
        assert_eq!(a.stats().retransmitted, 200);
        assert_eq!(a.outbound.len(), 200);
        assert_eq!(
            (a.outbound.active_len(), b.inbound.active_len()),
            (0, 0),
            "no settled stream is scanned"
        );
        assert_eq!(a.poll_timeout(), None, "and none has a timer");
        send_eo_on(&mut a, later, 7, 0);
        assert_eq!(a.outbound.active_len(), 1);
        assert_eq!(pump(&mut a, &mut b, later + Duration::from_secs(1)).0, 1);
        assert_eq!((a.outbound.active_len(), b.inbound.active_len()), (0, 0));
    }

    /// An id's failures count for [`DEAD_ID_MEMORY`] after the last one: a copy sent
    /// after that (the application resending under the same key once its receipt
    /// failed) is a new attempt with the full `max_deliveries`.
    #[test]
    fn an_ids_failures_are_forgotten_after_the_dead_id_memory() {
        let t0 = Instant::now();
        let f = IdFailures {
            failures: 6,
            last_failure: Some(t0),
            dead_until: None,
        };
        assert_eq!(f.current(t0 + DEAD_ID_MEMORY / 2), 6);
        assert_eq!(f.current(t0 + DEAD_ID_MEMORY), 0);
        assert_eq!(IdFailures::default().current(t0), 0);
    }

    /// A sender that used more channels than [`DORMANT_SWEEP_MIN`] keeps the settled
    /// ones as dormant records, not as live streams: the sweep changes no counter, a
    /// new message on a dormant channel gets the next seq of its stream (not seq 1
    /// again, which the receiver would drop as a duplicate) and is delivered and
    /// settled, a send under another guarantee is still refused, and a clean shutdown
    /// finishes the dormant streams too.
    #[test]
    fn settled_streams_go_dormant_and_resume_where_they_stopped() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 3);
        b.handle_peer_up(now, a.origin(), 3);
        let n = DORMANT_SWEEP_MIN as u32 + 100;
        let later = now + Duration::from_secs(5);
        for ch in 0..n {
            b.accept_channel(ChannelId(ch), false);
            send_eo_on(&mut a, now, ch, 0);
            if ch == 9 {
                // The first ten channels' first transmissions are lost: retransmitted.
                assert!(!frames(&mut a, NodeId(2), now).is_empty());
            }
            if ch % 100 == 99 {
                assert_eq!(pump(&mut a, &mut b, later).0, 100);
            }
        }
        assert_eq!(pump(&mut a, &mut b, later).0, (n % 100) as usize);
        let before = a.stats();
        assert_eq!(before.retransmitted, 10);
        assert!(
            a.outbound.len() < 200 && a.outbound.len() + a.dormant.len() == n as usize,
            "{} live, {} dormant",
            a.outbound.len(),
            a.dormant.len()
        );
        a.sweep_quiet_streams();
        assert_eq!((a.outbound.len(), a.dormant.len()), (0, n as usize));
        assert_eq!(a.stats(), before, "a sweep changes no counter");

        // Channel 3 (retransmitted once) again: seq 2 of its stream, delivered.
        let sent = a
            .send(
                later,
                Outgoing {
                    peer: NodeId(2),
                    channel: ChannelId(3),
                    guarantee: Guarantee::EffectivelyOnce,
                    payload: Bytes::from_static(b"again"),
                    id: None,
                    deadline: None,
                    schema: 0,
                },
            )
            .unwrap();
        assert_eq!(sent.seq, 2);
        assert_eq!(a.stream_counters().next().map(|c| c.retransmitted), Some(1));
        let (settled, delivered) = pump(&mut a, &mut b, later + Duration::from_secs(1));
        assert_eq!(
            (settled, delivered),
            (1, vec![Bytes::from_static(b"again")])
        );
        assert_eq!(a.stats().retransmitted, 10);

        let other = a.send(
            later,
            Outgoing {
                peer: NodeId(2),
                channel: ChannelId(4),
                guarantee: Guarantee::AtLeastOnce,
                payload: Bytes::new(),
                id: None,
                deadline: None,
                schema: 0,
            },
        );
        assert!(matches!(
            other,
            Err(StreamError::GuaranteeMismatch {
                existing: Guarantee::EffectivelyOnce,
                ..
            })
        ));
        assert_eq!(a.finish_streams(), n as usize, "live and dormant streams");
        let mut finished = 0;
        for f in frames(&mut a, NodeId(2), later) {
            if let Frame::Finish(f) = f {
                finished += 1;
                let last = if f.channel == ChannelId(3) { 2 } else { 1 };
                assert_eq!((f.last_seq, f.id_floor), (last, last + 1), "{f:?}");
            }
        }
        assert_eq!(finished, n);
    }

    /// The endpoint does no IO: with durable dedup, completing an effectively-once
    /// message only buffers its record, and no ack covering it is produced until the
    /// owner has synced the dedup (which writes the record to the file).
    #[test]
    fn an_ack_waits_for_its_durable_record_and_the_endpoint_writes_nothing() {
        let now = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let cfg = DedupConfig {
            durable: Some(crate::dedup::DurableDedup::new(dir.path())),
            ..DedupConfig::default()
        };
        let dedup = Arc::new(Dedup::open_at(cfg, now).unwrap());
        let origin = Origin {
            node: NodeId(2),
            incarnation: 1,
        };
        let mut b = Endpoint::new(origin, ProtoConfig::default(), dedup, 2);
        let mut a = endpoint(1, now);
        a.handle_peer_up(now, b.origin(), 3);
        b.handle_peer_up(now, a.origin(), 3);
        for f in frames(&mut b, NodeId(1), now) {
            a.handle_frame(now, NodeId(2), f); // the first node credit grant
        }
        b.accept_channel(ChannelId(1), false);
        for n in 0..2 {
            send_eo(&mut a, now, n);
        }
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        let mut last = None;
        while let Some(ev) = b.poll_event() {
            if let Event::Deliver { delivery, .. } = ev {
                b.complete(now, delivery, Completion::Ack);
                last = Some(delivery);
            }
        }
        let log = dir.path().join("dedup.log");
        let len = || std::fs::metadata(&log).unwrap().len();
        let before = len();
        let acks = |frames: Vec<Frame>| -> Vec<u64> {
            frames
                .into_iter()
                .filter_map(|f| match f {
                    Frame::Ack(a) if a.cumulative > 0 || !a.ranges.is_empty() => Some(a.cumulative),
                    _ => None,
                })
                .collect()
        };
        let later = now + Duration::from_secs(1);
        assert!(b.persist_owed());
        assert_eq!(acks(frames(&mut b, NodeId(1), later)), Vec::<u64>::new());
        assert_eq!(len(), before, "the endpoint wrote to the dedup log");
        assert!(b.ack_owed(&last.expect("delivered")));
        let synced = b.dedup().sync();
        b.persisted(synced);
        assert!(!b.persist_owed());
        assert!(len() > before, "the sync wrote the records");
        assert_eq!(acks(frames(&mut b, NodeId(1), later)), vec![2]);
        assert_eq!(b.stats().dedup_persist_errors, 0);
    }

    /// `Frame::Settled` moves the dedup window of an earlier run of the connection's
    /// node, and nothing else: not the connection's own run, not a stream the receiver
    /// does not track (no state is created), and a floor past `MAX_SEQ + 1` is counted
    /// malformed. A node queues it only for a version-4 peer and never for its own run.
    #[test]
    fn settled_moves_an_earlier_runs_window_only() {
        let now = Instant::now();
        let mut b = endpoint(2, now);
        let run = |incarnation| Origin {
            node: NodeId(1),
            incarnation,
        };
        b.handle_peer_up(now, run(99), 4);
        let ch = ChannelId(1);
        for (inc, seq) in [(7, 5), (99, 5)] {
            let id = MessageId::Seq {
                origin: run(inc),
                channel: ch,
                seq,
            };
            b.dedup().begin(&id, now).unwrap();
            b.dedup().complete(&id, now).unwrap();
        }
        let settled = |incarnation, id_floor| {
            Frame::Settled(crate::wire::Settled {
                incarnation,
                channel: ch,
                id_floor,
            })
        };
        let ignored = b.stats().frames_ignored;
        b.handle_frame(now, NodeId(1), settled(7, 101));
        assert_eq!(b.dedup().watermark_of(run(7), ch), Some(100));
        b.handle_frame(now, NodeId(1), settled(99, 101));
        assert_eq!(b.dedup().watermark_of(run(99), ch), Some(0), "own run");
        b.handle_frame(now, NodeId(1), settled(8, 101));
        assert_eq!(b.dedup().watermark_of(run(8), ch), None, "no state created");
        assert_eq!(b.stats().frames_ignored, ignored + 2);
        b.handle_frame(now, NodeId(1), settled(7, MAX_SEQ + 2));
        assert_eq!(b.stats().malformed_dropped, 1);
        assert_eq!(b.dedup().watermark_of(run(7), ch), Some(100));

        let mut a = endpoint(1, now);
        a.handle_peer_up(now, b.origin(), 3);
        assert!(!a.send_settled(NodeId(2), 7, ch, 10), "a version-3 peer");
        a.handle_peer_up(now, b.origin(), 4);
        assert!(!a.send_settled(NodeId(2), a.origin().incarnation, ch, 10));
        assert!(a.send_settled(NodeId(2), 7, ch, 10));
        let sent: Vec<_> = frames(&mut a, NodeId(2), now)
            .into_iter()
            .filter(|f| matches!(f, Frame::Settled(_)))
            .collect();
        assert_eq!(sent, vec![settled(7, 10)]);
    }

    /// A message on a stream its sender finished (a very late relay, or a sender
    /// misusing its run) is refused with a reason the sender sees, never processed.
    #[test]
    fn a_message_after_finish_is_rejected_as_a_retired_stream() {
        let now = Instant::now();
        let (mut a, mut b) = (endpoint(1, now), endpoint(2, now));
        a.handle_peer_up(now, b.origin(), 3);
        b.handle_peer_up(now, a.origin(), 3);
        for f in frames(&mut b, NodeId(1), now) {
            a.handle_frame(now, NodeId(2), f); // the first node credit grant
        }
        b.accept_channel(ChannelId(1), false);
        for n in 0..2 {
            send_eo(&mut a, now, n);
        }
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        while let Some(ev) = b.poll_event() {
            if let Event::Deliver { delivery, .. } = ev {
                b.complete(now, delivery, Completion::Ack);
            }
        }
        for f in frames(&mut b, NodeId(1), now) {
            a.handle_frame(now, NodeId(2), f);
        }
        assert_eq!(a.finish_streams(), 1);
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        assert_eq!(b.dedup_stats().streams_retired_finished, 1);
        send_eo(&mut a, now, 9);
        for f in frames(&mut a, NodeId(2), now) {
            b.handle_frame(now, NodeId(1), f);
        }
        let mut delivered = 0;
        while let Some(ev) = b.poll_event() {
            delivered += u32::from(matches!(ev, Event::Deliver { .. }));
        }
        assert_eq!(delivered, 0, "a message of a retired stream was delivered");
        for f in frames(&mut b, NodeId(1), now) {
            a.handle_frame(now, NodeId(2), f);
        }
        let mut outcome = None;
        while let Some(ev) = a.poll_event() {
            if let Event::Rejected { send, reason } = ev {
                outcome = Some((send.seq, reason));
            }
        }
        assert_eq!(outcome, Some((3, RejectReason::StreamRetired)));
    }

    /// The per-peer stream limit counts one origin's streams only, recycling picks
    /// that origin's idle stream, and a peer's restart frees its old run's streams:
    /// the per-origin index (`inbound_of`) always matches the streams held.
    #[test]
    fn the_stream_limit_is_per_origin_and_its_index_follows_recycling_and_restarts() {
        let t0 = Instant::now();
        let cfg = ProtoConfig {
            max_streams_per_peer: 2,
            ..ProtoConfig::default()
        };
        let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), t0).unwrap());
        let me = Origin {
            node: NodeId(2),
            incarnation: 1,
        };
        let mut b = Endpoint::new(me, cfg, dedup, 2);
        for ch in 1..=4 {
            b.accept_channel_with(ChannelId(ch), Accept::new(false, None));
        }
        let check_index = |b: &Endpoint| {
            let mut from_index: Vec<_> = b
                .inbound_of
                .iter()
                .flat_map(|(o, cs)| cs.iter().map(move |c| (*o, *c)))
                .collect();
            let mut held: Vec<_> = b.inbound.keys().copied().collect();
            from_index.sort_by_key(|(o, c)| (o.node, o.incarnation, c.0));
            held.sort_by_key(|(o, c)| (o.node, o.incarnation, c.0));
            assert_eq!(from_index, held);
        };
        let mut now = t0;
        // Each sender's message on `ch`, delivered and acked: its stream is idle.
        let deliver = |b: &mut Endpoint, a: &mut Endpoint, ch: u32, now: Instant| {
            send_plain(a, now, ChannelId(ch), Guarantee::EffectivelyOnce);
            for f in frames(a, NodeId(2), now) {
                b.handle_frame_from(now, a.origin(), f);
            }
            let mut got = 0;
            while let Some(ev) = b.poll_event() {
                if let Event::Deliver { delivery, .. } = ev {
                    b.complete(now, delivery, Completion::Ack);
                    got += 1;
                }
            }
            // b's acks go back, so a sends nothing again and b's stream owes nothing.
            let later = now + Duration::from_millis(100);
            b.handle_timeout(later);
            while let Some((peer, f)) = b.poll_transmit(later) {
                if peer == a.origin().node {
                    a.handle_frame_from(later, me, f);
                }
            }
            got
        };
        let (mut x, mut y) = (endpoint(1, t0), endpoint(3, t0));
        for a in [&mut x, &mut y] {
            b.handle_peer_up(t0, a.origin(), 3);
            a.handle_peer_up(t0, me, 3);
        }
        for ch in [1, 2] {
            now += Duration::from_secs(1);
            assert_eq!(deliver(&mut b, &mut x, ch, now), 1);
            assert_eq!(deliver(&mut b, &mut y, ch, now), 1);
        }
        check_index(&b);
        assert_eq!(b.stats().streams_recycled, 0, "two per origin fit");
        // x's third channel recycles x's oldest idle stream, not one of y's.
        now += Duration::from_secs(1);
        let got = deliver(&mut b, &mut x, 3, now);
        assert_eq!(got, 1, "{:?}", b.stats());
        assert_eq!(b.stats().streams_recycled, 1);
        assert_eq!(b.stats().streams_refused, 0);
        check_index(&b);
        let y_streams = b.inbound.keys().filter(|(o, _)| *o == y.origin()).count();
        assert_eq!(y_streams, 2, "y's streams stay");
        // x restarts: its old run's streams go, and the new run opens two at once.
        let mut x2 = Endpoint::new(
            Origin {
                node: NodeId(1),
                incarnation: x.origin().incarnation + 1,
            },
            ProtoConfig::default(),
            Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap()),
            1,
        );
        b.handle_peer_up(now, x2.origin(), 3);
        x2.handle_peer_up(now, me, 3);
        check_index(&b);
        for ch in [3, 4] {
            now += Duration::from_secs(1);
            assert_eq!(deliver(&mut b, &mut x2, ch, now), 1);
        }
        assert_eq!(
            b.stats().streams_recycled,
            1,
            "no recycling for a fresh run"
        );
        check_index(&b);
    }

    /// Every transmitted message taken out of its stream unacknowledged — handed off,
    /// abandoned, given up at its deadline — is reported once by `drain_withdrawn`
    /// (the driver withdraws its queued frames from the transport); an acked one is
    /// not, nor one never transmitted, nor a hand-off or abandon of what is not there.
    #[test]
    fn messages_taken_back_unacked_are_withdrawn_once() {
        let t0 = Instant::now();
        let mut a = endpoint(1, t0);
        let peer = NodeId(2);
        let send = |a: &mut Endpoint, deadline: Option<Duration>| {
            a.send(
                t0,
                Outgoing {
                    peer,
                    channel: ChannelId(1),
                    guarantee: Guarantee::AtLeastOnce,
                    payload: Bytes::from_static(b"m"),
                    id: None,
                    deadline,
                    schema: 0,
                },
            )
            .unwrap()
        };
        let handed = send(&mut a, None);
        let abandoned = send(&mut a, None);
        let expires = send(&mut a, Some(Duration::from_millis(50)));
        let kept = send(&mut a, None);
        assert_eq!(frames(&mut a, peer, t0).len(), 4, "all four transmitted");
        // Never transmitted: nothing to withdraw.
        let unsent = send(&mut a, None);
        assert!(a.hand_off(unsent));
        assert!(a.hand_off(handed));
        assert!(a.abandon(abandoned));
        assert!(!a.abandon(abandoned), "taken already");
        assert!(!a.hand_off(abandoned));
        for ms in [1, 60, 1_000, 5_000] {
            let _ = frames(&mut a, peer, t0 + Duration::from_millis(ms));
        }
        let mut gave_up = Vec::new();
        while let Some(ev) = a.poll_event() {
            if let Event::GaveUp { send, .. } = ev {
                gave_up.push(send);
            }
        }
        assert_eq!(gave_up, vec![expires]);
        let withdrawn: Vec<SendRef> = a.drain_withdrawn().collect();
        assert_eq!(withdrawn, vec![handed, abandoned, expires]);
        assert!(!withdrawn.contains(&kept));
        assert_eq!(a.drain_withdrawn().count(), 0, "reported once");
    }
}
