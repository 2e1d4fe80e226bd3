//! Two nodes over TCP loopback with the default configuration: a receiver that admits
//! only the sender, and a sender that knows the receiver's address.

use ackwire::{Guarantee, Node, NodeId};

/// Every guarantee, in the order the bulk tests run them.
pub const GUARANTEES: [Guarantee; 3] = [
    Guarantee::AtMostOnce,
    Guarantee::AtLeastOnce,
    Guarantee::EffectivelyOnce,
];

/// `(receiver, sender)`, both on `127.0.0.1:0` with `NodeConfig::default()`.
pub async fn tcp_pair(receiver: NodeId, sender: NodeId) -> (Node, Node) {
    let b = Node::builder(receiver)
        .bind("127.0.0.1:0".parse().unwrap())
        .allow_peer(sender)
        .build()
        .await
        .unwrap();
    let a = Node::builder(sender)
        .bind("127.0.0.1:0".parse().unwrap())
        .peer(receiver, b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    (b, a)
}
