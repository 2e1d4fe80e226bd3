//! Identities: nodes, their incarnations, channels and messages.
//!
//! Owns the plain-data identity types that cross the wire and land in the dedup table
//! and the hint log. Must not know about IO or time.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's stable identity, chosen by the application and kept across restarts.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// One run of a node: its [`NodeId`] plus a random incarnation chosen at start.
///
/// Library-assigned message IDs are scoped by origin, so a restarted sender (new
/// incarnation) never collides with sequence numbers its previous run used.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Serialize, Deserialize,
)]
pub struct Origin {
    /// The node.
    pub node: NodeId,
    /// Random per-run value; `0` is never chosen by [`Origin::new_random`].
    pub incarnation: u64,
}

impl Origin {
    /// An origin for `node` with a fresh random incarnation.
    pub fn new_random(node: NodeId) -> Self {
        let mut incarnation = crate::rng::seed_from_entropy();
        if incarnation == 0 {
            incarnation = 1;
        }
        Origin { node, incarnation }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:x}", self.node, self.incarnation)
    }
}

/// A named flow of messages between two nodes. Each `(origin, target, channel)` is one
/// stream with its own sequence numbers.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Serialize, Deserialize,
)]
pub struct ChannelId(pub u32);

/// An application-supplied idempotency key: 128 bits, compared in full (never a
/// fingerprint), so two different keys are never mistaken for each other.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Serialize, Deserialize,
)]
pub struct IdKey(pub u128);

/// The identity the receiver deduplicates on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Serialize, Deserialize,
)]
pub enum MessageId {
    /// Library-assigned: the `seq`-th message of `origin`'s stream on `channel`. Stays
    /// with the message through retries and hinted handoff.
    Seq {
        /// Sending node run.
        origin: Origin,
        /// Channel of the stream.
        channel: ChannelId,
        /// 1-based sequence number within the stream.
        seq: u64,
    },
    /// Application-supplied idempotency key.
    Key(IdKey),
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => write!(f, "{origin}/c{}/{seq}", channel.0),
            MessageId::Key(k) => write!(f, "key:{:032x}", k.0),
        }
    }
}

/// The delivery guarantee of a channel.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize, Default,
)]
pub enum Guarantee {
    /// Sent once, never retried; the handler sees each message 0 or 1 times.
    AtMostOnce,
    /// Retried until acked, the deadline passes, or it is handed off; the receiver acks
    /// after the handler finishes. The handler sees each message 0..n times: more than
    /// once after a lost ack, a nack or a crash; never only when the sender's receipt
    /// fails (deadline, rejection, shutdown), which tells the sender.
    #[default]
    AtLeastOnce,
    /// At-least-once plus receiver dedup by [`MessageId`]: each message is completed
    /// (acked) at most once per id — within `dedup.retention` for library-assigned ids
    /// and `dedup.horizon` for application keys, and across a receiver restart only
    /// with a [`DurableDedup`](crate::dedup::DurableDedup). The handler may see it again
    /// after a nack, a dropped delivery, a crash before the ack, or the end of the
    /// shutdown grace; see the [`dedup`](crate::dedup) module.
    EffectivelyOnce,
}
