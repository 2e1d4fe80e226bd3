//! Frame types: everything two nodes say to each other.
//!
//! Owns the shape of the protocol, not its encoding (see `codec`).

use crate::id::{ChannelId, Guarantee, MessageId, Origin};
use bincode::{Decode, Encode};
use bytes::Bytes;

/// One protocol frame.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

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
