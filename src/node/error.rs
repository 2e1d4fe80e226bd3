//! The node's error and outcome types: [`NodeError`] (building or operating a node),
//! [`SendError`] and [`Outcome`] (how a send ended), [`AckError`] (a durable ack) and
//! [`NodeFailure`] (why a driver died).
//!
//! Owns the types and the advice each variant gives the caller; must not decide when
//! one is raised (the builder, the handles and the driver do).

use crate::id::{ChannelId, Guarantee, NodeId};
use std::sync::Arc;
#[cfg(doc)]
use {
    super::{Delivery, Node, NodeBuilder, NodeConfig},
    crate::id::IdKey,
    crate::proto::ProtoConfig,
};

/// Errors building or operating a [`Node`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The transport could not start (e.g. the bind address is taken). Fix the address
    /// or wait for the previous owner to close.
    #[error("transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    /// A configuration value is invalid; the message says which.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The dedup table could not be opened (durable dedup IO). See the source.
    #[error("dedup: {0}")]
    Dedup(#[from] crate::dedup::DedupError),
    /// A receiver for this channel already exists on this node; keep one per channel.
    #[error("channel {0:?} already has a receiver")]
    ChannelTaken(ChannelId),
    /// The node has shut down.
    #[error("node has shut down")]
    Shutdown,
    /// The hint store could not be opened (see the source). Check the directory and its
    /// permissions.
    #[error("hint store: {0}")]
    Handoff(#[from] crate::handoff::HintError),
    /// The tokio runtime `build` ran on lacks a driver the node needs: timers always,
    /// and IO for the TCP transport. Build the runtime with `enable_all()` (as
    /// `#[tokio::main]` and `#[tokio::test]` do), or `enable_time()` and
    /// `enable_io()`.
    #[error("the tokio runtime has no {0} driver: build it with enable_all()")]
    RuntimeDriver(&'static str),
    /// The builder has no transport: call `bind` or `transport`.
    #[error("no transport configured: call NodeBuilder::bind or NodeBuilder::transport")]
    NoTransport,
    /// The node's driver task ended unexpectedly (it panicked): the node is dead and
    /// every call fails with this. The cause is also logged at error level and returned
    /// by [`Node::closed`]. Report it as a bug; build a new node to carry on.
    #[error(transparent)]
    Failed(NodeFailure),
    /// [`Node::sender`] to a peer this node does not know (never given to
    /// [`NodeBuilder::peer`] / [`Node::add_peer`], never connected). Add the peer
    /// first, or set [`NodeConfig::allow_dynamic_peers`].
    #[error("unknown peer {0}: add it with NodeBuilder::peer / Node::add_peer, or set NodeConfig::allow_dynamic_peers")]
    UnknownPeer(NodeId),
    /// [`Node::sender`] (or any sender) to this node's own id. A node has no
    /// connection to itself, so such messages could only fail at their deadline; call
    /// the handler directly, or run a second node.
    #[error("node {0} cannot send to itself")]
    SelfPeer(NodeId),
    /// A durable store's directory (durable dedup, hint store) belongs to another node
    /// id (its `OWNER` file says so). Its records are that node's: a durable dedup log
    /// would make this node ack messages it never processed (a library-assigned
    /// message id names the sending run, channel and seq, not the receiver), and hints
    /// would be replayed under ids this node may not claim. Give each node id its own
    /// directories, or start the node under the id that wrote them.
    #[error("{} belongs to node {owner}; this node is {node}", dir.display())]
    DirectoryOfAnotherNode {
        /// The directory.
        dir: std::path::PathBuf,
        /// The node id that wrote it.
        owner: NodeId,
        /// This node's id.
        node: NodeId,
    },
}

/// Why a node's driver stopped unexpectedly (carried by [`NodeError::Failed`] and
/// [`SendError::NodeFailed`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node driver failed: {cause}")]
pub struct NodeFailure {
    pub(super) cause: Arc<str>,
}

impl NodeFailure {
    /// What ended the driver (the panic message).
    pub fn cause(&self) -> &str {
        &self.cause
    }
}

/// Why a message could not be handed off ([`SendError::HandoffRefused`]).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffRefusal {
    /// The node has no hint store ([`NodeConfig::handoff`] is `None`, the default).
    /// Not returned by this version: without a hint store a message whose retries run
    /// out fails with [`SendError::Deadline`] (or [`SendError::PeerDown`] or
    /// [`SendError::AttemptsExhausted`], see there).
    /// Kept so that code matching on it keeps compiling.
    #[error("hinted handoff is not enabled on this node")]
    NotEnabled,
    /// The hint store refused the hint; match on the [`HintError`] to see why
    /// ([`HintError::TargetDownTooLong`], [`HintError::TargetFull`], …).
    ///
    /// [`HintError`]: crate::handoff::HintError
    /// [`HintError::TargetDownTooLong`]: crate::handoff::HintError::TargetDownTooLong
    /// [`HintError::TargetFull`]: crate::handoff::HintError::TargetFull
    #[error(transparent)]
    Store(Arc<crate::handoff::HintError>),
}

impl HandoffRefusal {
    /// The hint store's error, if the store refused (`None`: handoff is off).
    pub fn hint_error(&self) -> Option<&crate::handoff::HintError> {
        match self {
            HandoffRefusal::NotEnabled => None,
            HandoffRefusal::Store(e) => Some(e),
        }
    }
}

/// Two refusals are equal if they are the same kind and say the same (a
/// [`HintError`](crate::handoff::HintError) holds an `io::Error`, which has no `==`).
impl PartialEq for HandoffRefusal {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (HandoffRefusal::NotEnabled, HandoffRefusal::NotEnabled) => true,
            (HandoffRefusal::Store(a), HandoffRefusal::Store(b)) => {
                Arc::ptr_eq(a, b) || a.to_string() == b.to_string()
            }
            _ => false,
        }
    }
}

impl Eq for HandoffRefusal {}

/// Why a send failed. Each variant says whether the receiver may still have the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No ack arrived before the message's deadline. The receiver may or may not have
    /// processed it (the ack may be what was lost): resend under the same
    /// [`IdKey`] to an effectively-once channel if it must happen exactly once.
    #[error("no ack before the deadline ({attempts} transmissions)")]
    Deadline {
        /// Transmissions made.
        attempts: u32,
    },
    /// The retry policy's maximum transmissions were made without an ack. Same
    /// caveat as [`SendError::Deadline`].
    #[error("no ack after {attempts} transmissions")]
    AttemptsExhausted {
        /// Transmissions made.
        attempts: u32,
    },
    /// The node shut down before the message settled. It may have been delivered.
    #[error("node shut down before the message settled")]
    Shutdown,
    /// The value could not be encoded by the sender's codec; nothing was sent. The
    /// codec's [`CodecError`](crate::codec::CodecError) is carried (and is the
    /// error's [`source`](std::error::Error::source)). Fix the value or its
    /// `Serialize` impl.
    #[error("cannot encode message: {0}")]
    Encode(#[source] Arc<crate::codec::CodecError>),
    /// The payload is larger than the configured maximum; nothing was sent. Split it.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// Configured maximum ([`NodeConfig::max_payload`]).
        max: usize,
    },
    /// Retries ran out (or the target is down) on a node with a hint store
    /// ([`NodeConfig::handoff`]) and the store refused the message (target down longer
    /// than the max hint window, byte limits, IO error); without a hint store the same
    /// message fails with [`SendError::Deadline`] (or [`SendError::PeerDown`]) instead.
    /// `reason` is also the error's
    /// [`source`](std::error::Error::source); [`HandoffRefusal::hint_error`] gives the
    /// store's typed [`HintError`]. It is not stored, and what of it still waited to
    /// be written is withdrawn, so it does not reach the target later. A message that
    /// was transmitted before its retries ran out may have been processed (as with
    /// [`SendError::Deadline`], the ack may be what was lost): resend under the same
    /// [`IdKey`] to an effectively-once channel if it must happen exactly once, or
    /// report the failure.
    ///
    /// At a graceful stop ([`Node::shutdown`](crate::Node::shutdown)) a message the
    /// store refuses fails with [`SendError::Shutdown`] instead (it was not handed
    /// off, and the node is stopping); the refusal is logged.
    ///
    /// [`HintError`]: crate::handoff::HintError
    #[error("message not handed off: {reason}")]
    HandoffRefused {
        /// Why.
        #[source]
        reason: HandoffRefusal,
    },
    /// `try_send` found the stream's in-flight window full; nothing was sent. Wait
    /// (use `send`) or shed load.
    #[error("the stream's in-flight window ({window} messages) is full")]
    WindowFull {
        /// The window ([`ProtoConfig::max_in_flight`]).
        window: usize,
    },
    /// The channel to this peer already carries another guarantee; nothing was sent.
    /// This run's first send on a channel fixes its guarantee. (An earlier run's hints
    /// replayed there do not, except that at-most-once cannot share a channel with
    /// the acked guarantees: an at-most-once send is refused, `existing` naming the
    /// hints' guarantee, while such a replay is in flight on the channel; no further
    /// hint is replayed there, and a retry goes through once those settled.)
    #[error("channel already uses {existing:?}")]
    GuaranteeMismatch {
        /// The stream's guarantee.
        existing: Guarantee,
    },
    /// The failure detector holds the target Down and hinted handoff does not take the
    /// message ([`NodeConfig::fail_fast_when_down`]); nothing was sent. Retry once
    /// [`Node::health`] is Up again, or report the failure.
    #[error("peer {peer} is down")]
    PeerDown {
        /// The target.
        peer: NodeId,
    },
    /// The node's driver died ([`NodeError::Failed`]) before the message settled. It
    /// may have been delivered. Build a new node.
    #[error(transparent)]
    NodeFailed(NodeFailure),
    /// The receiver refused the message for good and said why (a receiver speaking
    /// protocol version 3): no receiver on its channel after its grace period, not
    /// authorized, a payload its typed receiver cannot decode, dead-lettered after its
    /// channel's delivery limit, or a stream the receiver has retired. The message was
    /// not processed by a handler (a dead-lettered or undecodable one is in the
    /// receiver's [`Node::dead_letters`]); sending it again unchanged gets the same
    /// answer. It is not recorded as processed: a copy sent again under the same
    /// `IdKey` is a new attempt — refused the same way if nothing changed (an
    /// undecodable payload; a handler that still fails it `max_deliveries` times, which
    /// makes another dead letter), processed if the cause is gone — and is never
    /// answered `Acked` without a handler finishing it. Except on an effectively-once
    /// channel, for an id dead-lettered after `max_deliveries` deliveries: a copy
    /// arriving within 2 minutes of the letter
    /// is refused again at once (`DeadLettered`), without a delivery or a new letter,
    /// even if the handler would now succeed; send it again after that.
    #[error("rejected by the receiver: {reason}")]
    Rejected {
        /// The receiver's reason.
        reason: crate::wire::RejectReason,
    },
}

/// How a message settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The receiver acknowledged it: for at-least-once and effectively-once, after its
    /// handler finished.
    Acked,
    /// At-most-once: it was handed to the transport once. Nothing more is known.
    Sent,
    /// The target was unreachable: the message is durably stored as a hint (per the
    /// store's fsync policy) and will be replayed, under its original ID, when the
    /// target is back — until the hint TTL, or the target is decommissioned. Also the
    /// outcome of an effectively-once message sent while more than a window
    /// (`ProtoConfig::max_in_flight`) of this run's earlier messages on its stream still
    /// wait in the hint store: the target's dedup window would refuse it until they are
    /// replayed, so it is stored behind them and replayed in turn.
    HandedOff,
}

/// Why [`Delivery::ack_durable`] could not confirm a durable acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The durable dedup log could not write or fsync the completion (disk full, IO
    /// error; counted in `ProtoStats::dedup_persist_errors` and logged). The ack was
    /// still sent: after a restart a resend of the message may be processed again.
    #[error("the dedup record of the acknowledged message was not persisted")]
    NotPersisted,
    /// The node stopped before the acknowledgement was durable; it may or may not be.
    #[error("the node stopped before the acknowledgement was durable")]
    NodeStopped,
}
