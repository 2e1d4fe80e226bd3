//! Two nodes over TCP loopback with the default configuration: a receiver that admits
//! only the sender, and a sender that knows the receiver's address.

use ackwire::{Guarantee, Node, NodeId};

/// Every guarantee, in the order the bulk tests run them.
pub const GUARANTEES: [Guarantee; 3] = [
    Guarantee::AtMostOnce,
    Guarantee::AtLeastOnce,
    Guarantee::EffectivelyOnce,
];

/// `(receiver, sender)`, both on loopback ([`super::ports::restartable_addr`]) with `NodeConfig::default()`.
pub async fn tcp_pair(receiver: NodeId, sender: NodeId) -> (Node, Node) {
    let b = Node::builder(receiver)
        .bind(super::ports::restartable_addr())
        .allow_peer(sender)
        .build()
        .await
        .unwrap();
    let a = Node::builder(sender)
        .bind(super::ports::restartable_addr())
        .peer(receiver, b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    (b, a)
}
