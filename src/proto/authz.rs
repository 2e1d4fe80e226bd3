//! Authorization of inbound data: who may send on a channel, and who may relay
//! messages whose id names another node.
//!
//! Owns the decision only (pure, sans-IO); the [`Endpoint`](super::Endpoint) asks it
//! before a data frame reaches a stream or the dedup table, and counts refusals. The
//! peer a frame is checked against is the one its connection authenticated (with TLS,
//! the node its certificate names), never one the frame itself claims.

use crate::id::{ChannelId, MessageId, NodeId};
use crate::wire::Data;
use std::collections::{BTreeSet, HashMap};

/// Which peers may relay messages whose explicit [`MessageId::Seq`] names *another*
/// node's origin.
///
/// A message id `Seq { origin, .. }` is what the receiver's sequence window records as
/// processed, so a peer allowed to send ids of another node can pre-mark that node's
/// future messages as seen and silently suppress them. Ids naming the sending node
/// itself — any incarnation, so a restarted node's hint replays of its previous run
/// pass — are always allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum RelayPolicy {
    /// No peer relays for another node. The default: ackwire itself never relays
    /// (hints are stored and replayed by the node that sent them, under its own node
    /// id), so only an application-level relay would need more.
    #[default]
    Nobody,
    /// These peers may relay for any node.
    Peers(BTreeSet<NodeId>),
    /// Every peer may relay for any node (trusts every peer with every other's ids).
    Anyone,
}

/// Inbound authorization. `Default`: any peer the transport admitted may send on any
/// channel; nobody may relay for another node ([`RelayPolicy::Nobody`]).
///
/// A refused frame is dropped before any stream or dedup state and counted in
/// `ProtoStats::unauthorized_dropped`. An at-least-once or effectively-once sender is
/// told: its receipt fails with `SendError::Rejected { reason: Unauthorized }`
/// (`tests/integration/rejections.rs`); an at-most-once frame is dropped without an answer.
///
/// ```
/// use ackwire::proto::{Authorization, RelayPolicy};
/// use ackwire::{ChannelId, NodeId};
/// let authz = Authorization::default()
///     .restrict_channel(ChannelId(1), [NodeId(2), NodeId(3)])
///     .relay(RelayPolicy::Peers([NodeId(9)].into()));
/// assert!(authz.may_send(NodeId(2), ChannelId(1)));
/// assert!(!authz.may_send(NodeId(4), ChannelId(1)));
/// assert!(authz.may_send(NodeId(4), ChannelId(2)));
/// assert!(authz.may_relay(NodeId(9)) && !authz.may_relay(NodeId(2)));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Authorization {
    relay: RelayPolicy,
    #[serde(rename = "channels", with = "crate::config_serde::channel_senders")]
    channel_senders: HashMap<ChannelId, BTreeSet<NodeId>>,
}

/// Why a data frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The sender is not among the channel's allowed senders.
    Channel,
    /// The frame's id names another node and the sender may not relay.
    Relay,
}

impl Authorization {
    /// Only `senders` may send on `channel` (replaces an earlier list for it).
    pub fn restrict_channel(
        mut self,
        channel: ChannelId,
        senders: impl IntoIterator<Item = NodeId>,
    ) -> Self {
        self.channel_senders
            .insert(channel, senders.into_iter().collect());
        self
    }

    /// Set who may relay for other nodes.
    pub fn relay(mut self, policy: RelayPolicy) -> Self {
        self.relay = policy;
        self
    }

    /// May `peer` send on `channel`?
    pub fn may_send(&self, peer: NodeId, channel: ChannelId) -> bool {
        self.channel_senders
            .get(&channel)
            .is_none_or(|s| s.contains(&peer))
    }

    /// May `peer` send messages whose ids name other nodes?
    pub fn may_relay(&self, peer: NodeId) -> bool {
        match &self.relay {
            RelayPolicy::Nobody => false,
            RelayPolicy::Peers(p) => p.contains(&peer),
            RelayPolicy::Anyone => true,
        }
    }

    /// Check a data frame that arrived on `peer`'s authenticated connection.
    pub fn check(&self, peer: NodeId, data: &Data) -> Result<(), Refusal> {
        if !self.may_send(peer, data.channel) {
            return Err(Refusal::Channel);
        }
        match data.id {
            Some(MessageId::Seq { origin, .. }) if origin.node != peer && !self.may_relay(peer) => {
                Err(Refusal::Relay)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{Guarantee, Origin};
    use bytes::Bytes;

    fn data(id: Option<MessageId>) -> Data {
        Data {
            channel: ChannelId(1),
            seq: 1,
            floor: 1,
            id_floor: 1,
            id,
            guarantee: Guarantee::EffectivelyOnce,
            payload: Bytes::new(),
            schema: 0,
        }
    }

    fn seq_of(node: u64, incarnation: u64) -> Option<MessageId> {
        Some(MessageId::Seq {
            origin: Origin {
                node: NodeId(node),
                incarnation,
            },
            channel: ChannelId(1),
            seq: 5,
        })
    }

    #[test]
    fn own_ids_pass_foreign_ids_need_relay_rights() {
        let a = Authorization::default();
        assert_eq!(a.check(NodeId(2), &data(None)), Ok(()));
        assert_eq!(a.check(NodeId(2), &data(seq_of(2, 77))), Ok(()));
        assert_eq!(a.check(NodeId(2), &data(seq_of(1, 7))), Err(Refusal::Relay));
        let a = a.relay(RelayPolicy::Peers([NodeId(2)].into()));
        assert_eq!(a.check(NodeId(2), &data(seq_of(1, 7))), Ok(()));
        assert_eq!(a.check(NodeId(3), &data(seq_of(1, 7))), Err(Refusal::Relay));
        let a = a.relay(RelayPolicy::Anyone);
        assert_eq!(a.check(NodeId(3), &data(seq_of(1, 7))), Ok(()));
    }

    #[test]
    fn restricted_channel_refuses_others() {
        let a = Authorization::default().restrict_channel(ChannelId(1), [NodeId(2)]);
        assert_eq!(a.check(NodeId(2), &data(None)), Ok(()));
        assert_eq!(a.check(NodeId(3), &data(None)), Err(Refusal::Channel));
    }
}
