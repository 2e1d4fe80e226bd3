//! Frame types: everything two nodes say to each other.
//!
//! Owns the shape of the protocol, not its encoding (see `codec`).

use crate::id::{ChannelId, Guarantee, MessageId, Origin};
use bincode::{Decode, Encode};
use bytes::Bytes;

/// One protocol frame.
///
/// `#[non_exhaustive]`: each protocol version has added frames (version 4 the
/// [`Frame::Settled`]); a `match` outside this crate needs a wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// First frame on every connection, both directions.
    Handshake(Handshake),
    /// A message on a stream.
    Data(Data),
    /// Cumulative + selective acknowledgement of a stream's messages.
    Ack(Ack),
    /// The receiver's handler failed a message: retransmit it soon.
    Nack(Nack),
    /// Heartbeat request; the peer answers with [`Frame::Pong`] echoing the nonce.
    Ping(Heartbeat),
    /// Heartbeat answer.
    Pong(Heartbeat),
    /// Protocol version 2: the sender's stream is blocked on credit and asks for the
    /// current grant; the receiver answers with an [`Ack`] carrying it. Carries no
    /// message, so probing never puts a stream past its credit.
    CreditProbe(CreditProbe),
    /// Protocol version 3: the receiver settled a message without processing it and
    /// says why; the sender's receipt fails with that reason at once.
    Reject(Reject),
    /// Protocol version 3: the sending node run shuts down cleanly and will send
    /// nothing more on the stream `(connection origin → receiver, channel)`; the
    /// receiver may retire the stream's dedup state once `last_seq` is settled.
    Finish(Finish),
    /// Protocol version 3: the receiver's credit for everything the sending node sends
    /// it on this connection (all streams together), like HTTP/2's connection window.
    NodeCredit(NodeCredit),
    /// Protocol version 4: the sending node says which library-assigned ids of one of
    /// its *earlier* runs' streams are settled for good, so the receiver's dedup window
    /// for that stream can move past seqs it will never see (the earlier run is over;
    /// what it did not deliver waits in the hint store this run replays from).
    Settled(Settled),
}

/// Settled ids of an earlier run of the sending node (protocol version 4).
///
/// Every library-assigned id `Seq { origin: (connection node, incarnation), channel,
/// seq < id_floor }` is settled for good: processed, or never to be sent again. A node
/// sends it while it replays hints of an earlier run of itself (a run with the same
/// node id and another incarnation): `id_floor` is the lowest seq of that run's stream
/// still waiting in its hint store for the receiver. The receiver applies it only to an
/// earlier run of the connection's own node, never to the connection's own run (whose
/// floor rides in its data frames), and only to a dedup stream it already tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Settled {
    /// The earlier run's incarnation.
    pub incarnation: u64,
    /// Channel of the stream.
    pub channel: ChannelId,
    /// Every seq below it is settled.
    pub id_floor: u64,
}

/// Node-level credit (protocol version 3).
///
/// Both ends count the data frames the sender put on the current connection (every
/// transmission, retransmissions included; the count restarts with each connection).
/// The sender may put data frame number `limit` on the connection, not `limit + 1`,
/// until a larger limit arrives. Limits only grow on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct NodeCredit {
    /// The highest data-frame count the sender may reach.
    pub limit: u64,
    /// Data frames the receiver had received on the connection when it granted
    /// `limit`. A transport that can lose frames within a connection (a simulated
    /// lossy network) makes the two counts drift; a sender waiting for credit probes,
    /// and counts frames it sent before the probe that the answer's `received` does not
    /// include as lost, so the window never shrinks for good.
    pub received: u64,
}

/// The sender's run is done with a stream (protocol version 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Finish {
    /// Channel of the stream.
    pub channel: ChannelId,
    /// The last seq the run sent on the stream (0: none).
    pub last_seq: u64,
    /// As [`Data::id_floor`]: every library-assigned id of the stream below it is
    /// settled for good (a message still waiting in a hint store keeps it below its
    /// seq, so its replay is still recognised).
    pub id_floor: u64,
}

/// Opening frame: who is speaking and which protocol version it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Handshake {
    /// The lowest protocol version the sender speaks (version 1 nodes require exactly
    /// 1). The range follows in a version probe; see [`crate::wire::Negotiation`].
    pub version: u16,
    /// The speaking node and its current incarnation.
    pub origin: Origin,
}

/// A message on the stream `(connection origin → receiver, channel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    /// Channel of the stream.
    pub channel: ChannelId,
    /// Stream sequence number (1-based), used for acks; unique per stream.
    pub seq: u64,
    /// Every stream seq below `floor` is settled by the sender (acked, given up, or
    /// handed off) and will never be sent again on this stream.
    pub floor: u64,
    /// Every library-assigned message ID `Seq { origin: <connection origin>, channel,
    /// seq < id_floor }` is settled for good (acked or abandoned), so the receiver's dedup
    /// window may treat them as seen. `<= floor`: a handed-off message keeps it low until
    /// its hint has been delivered, so a late replay is never mistaken for a duplicate.
    pub id_floor: u64,
    /// Dedup identity. `None` means `MessageId::Seq { origin: <connection origin>,
    /// channel, seq }` (the common case, and 30 bytes shorter on the wire); hint replays
    /// and application keys carry it explicitly.
    pub id: Option<MessageId>,
    /// The guarantee the sender asked for; tells the receiver whether to dedup and ack.
    pub guarantee: Guarantee,
    /// Protocol version 3: fingerprint of the payload's type, from a typed sender
    /// (`0`: unchecked — raw senders, hint replays, older versions, or a channel with
    /// the type check turned off). A typed receiver with another non-zero fingerprint
    /// rejects the message ([`RejectReason::TypeMismatch`]) instead of decoding it.
    pub schema: u32,
    /// The application payload, opaque to the protocol.
    pub payload: Bytes,
}

/// Inclusive range of stream sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct SeqRange {
    /// First seq in the range.
    pub start: u64,
    /// Last seq in the range (inclusive), `>= start`.
    pub end: u64,
}

/// Acknowledges messages of the stream `(receiver of this frame, incarnation, channel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Channel of the acknowledged stream.
    pub channel: ChannelId,
    /// Incarnation of the stream's origin, so an ack meant for a previous run of the
    /// sender is never applied to its new stream.
    pub incarnation: u64,
    /// Every seq `<= cumulative` is acknowledged (`0`: none).
    pub cumulative: u64,
    /// Further acknowledged ranges above `cumulative`, ascending and disjoint.
    pub ranges: Vec<SeqRange>,
    /// Receiver credit (protocol version 2 on): the sender may have sent every seq
    /// `<= credit` on this stream; later seqs wait for more credit. Grants only grow.
    /// `None` on a version-1 connection (and dropped when encoding for one): the
    /// sender's own window is the only bound there.
    pub credit: Option<u64>,
    /// Protocol version 2 on: every seq `<= received` is held by the receiver (done,
    /// being processed, or waiting for ordered delivery), so the sender need not
    /// retransmit it on the usual timer. `0` on a version-1 connection.
    pub received: u64,
    /// Protocol version 5 on: further seqs above `received` the receiver is processing
    /// (handed to its application, not finished; done ones are in `ranges`),
    /// ascending and disjoint, at most [`MAX_HELD_RANGES`] (a decoder refuses more). A receiver that restarted holds its redeliveries
    /// with gaps between them (seqs its earlier run settled are never sent again), so
    /// the watermark alone would leave them to be retransmitted on the usual timer.
    /// Empty below version 5 (and dropped when encoding for such a connection).
    pub held: Vec<SeqRange>,
}

/// Most SACK ranges ([`Ack::ranges`]) in one ack: a receiver sends the rest in the next
/// one, a decoder refuses a frame with more (malformed). 2^16 ranges are 1 MiB decoded;
/// without the bound, an 8 MiB frame of 2-byte ranges decoded to 64 MiB and was sorted
/// on the node's driver.
pub const MAX_ACK_RANGES: usize = 1 << 16;

/// Most held ranges ([`Ack::held`]) a receiver reports in one ack, and a sender keeps:
/// the lowest ones, whose timers fire first.
pub const MAX_HELD_RANGES: usize = 64;

/// The handler failed (or dropped) a message: the sender should retransmit it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Nack {
    /// Channel of the stream.
    pub channel: ChannelId,
    /// Incarnation of the stream's origin.
    pub incarnation: u64,
    /// Stream seq of the failed message.
    pub seq: u64,
}

/// Asks for the credit of the stream `(connection origin → receiver, channel)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct CreditProbe {
    /// Channel of the blocked stream.
    pub channel: ChannelId,
}

/// Heartbeat payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Heartbeat {
    /// Opaque value echoed by the pong.
    pub nonce: u64,
}

/// The receiver will not process a message (protocol version 3).
///
/// Refers to the stream `(receiver of this frame, incarnation, channel)` like [`Ack`].
/// A receiver sends it before any ack that covers `seq`, and again for every
/// retransmission of `seq` and after a reconnection until the sender's floor passes it,
/// so a sender learns the reason even when a connection drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Reject {
    /// Channel of the stream.
    pub channel: ChannelId,
    /// Incarnation of the stream's origin.
    pub incarnation: u64,
    /// Stream seq of the refused message.
    pub seq: u64,
    /// Why.
    pub reason: RejectReason,
}

/// Why a receiver refused a message for good.
///
/// On the wire a single byte; a code this build does not know decodes as
/// [`RejectReason::Other`], so newer receivers can add reasons without breaking older
/// senders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// No receiver is registered for the channel on the target node, and none appeared
    /// within the grace period ([`crate::proto::ProtoConfig::no_receiver_grace`]).
    NoReceiver,
    /// The target's authorization refuses this sender on this channel (or refuses the
    /// message id it claims).
    Unauthorized,
    /// The receiver's typed channel could not decode the payload; the message went to
    /// the receiver's dead letters.
    Undecodable,
    /// The message was delivered (and nacked or dropped) as many times as the
    /// receiver's channel allows; it went to the receiver's dead letters.
    DeadLettered,
    /// The payload's type (its fingerprint, see [`Data::schema`]) is not the typed
    /// receiver's type; nothing was delivered.
    TypeMismatch,
    /// The sending incarnation's stream was retired by the receiver's dedup table (a
    /// very late message of a finished or long-dead sender run); processing it could
    /// process a message twice.
    StreamRetired,
    /// The receiver's application-key dedup table is at its memory budget
    /// ([`crate::dedup::DedupConfig::table_budget_bytes`]): the message was not
    /// processed. Resending it under the same key later is safe (keys expire after the
    /// receiver's dedup horizon); a receiver that sees this often needs a larger budget
    /// or a shorter horizon.
    KeyTableFull,
    /// A reason code this build does not know (sent by a newer receiver).
    Other(u8),
}

impl RejectReason {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            RejectReason::NoReceiver => 1,
            RejectReason::Unauthorized => 2,
            RejectReason::Undecodable => 3,
            RejectReason::DeadLettered => 4,
            RejectReason::StreamRetired => 5,
            RejectReason::TypeMismatch => 6,
            RejectReason::KeyTableFull => 7,
            RejectReason::Other(c) => c,
        }
    }

    /// The reason a wire code stands for.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => RejectReason::NoReceiver,
            2 => RejectReason::Unauthorized,
            3 => RejectReason::Undecodable,
            4 => RejectReason::DeadLettered,
            5 => RejectReason::StreamRetired,
            6 => RejectReason::TypeMismatch,
            7 => RejectReason::KeyTableFull,
            c => RejectReason::Other(c),
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::NoReceiver => f.write_str("no receiver on the channel"),
            RejectReason::Unauthorized => f.write_str("not authorized"),
            RejectReason::Undecodable => f.write_str("payload not decodable by the receiver"),
            RejectReason::DeadLettered => f.write_str("dead-lettered after too many deliveries"),
            RejectReason::StreamRetired => f.write_str("sender stream retired by the receiver"),
            RejectReason::KeyTableFull => {
                f.write_str("receiver's dedup key table full (not processed; resend later)")
            }
            RejectReason::TypeMismatch => {
                f.write_str("payload type differs from the receiver's type")
            }
            RejectReason::Other(c) => write!(f, "rejected (reason code {c})"),
        }
    }
}

impl Encode for RejectReason {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.code().encode(encoder)
    }
}

impl<Ctx> Decode<Ctx> for RejectReason {
    fn decode<D: bincode::de::Decoder<Context = Ctx>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(RejectReason::from_code(u8::decode(decoder)?))
    }
}
bincode::impl_borrow_decode!(RejectReason);
