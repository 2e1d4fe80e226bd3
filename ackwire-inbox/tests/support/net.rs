//! Two ackwire nodes on TCP loopback (plain TCP: the receiver admits the sender by id).

use ackwire::transport::tcp::TcpConfig;
use ackwire::{Node, NodeId};
use std::net::SocketAddr;
use std::time::Duration;

pub const SENDER: NodeId = NodeId(1);
pub const RECEIVER: NodeId = NodeId(2);

/// Redial quickly: a restarted peer should not wait out a 5 s backoff.
pub fn fast_tcp() -> TcpConfig {
    TcpConfig {
        backoff_max: Duration::from_millis(200),
        ..TcpConfig::default()
    }
}

/// A receiving node listening on `addr` that admits [`SENDER`].
pub async fn receiver_node(addr: SocketAddr) -> Node {
    Node::builder(RECEIVER)
        .tcp(addr, fast_tcp())
        .allow_peer(SENDER)
        .build()
        .await
        .expect("receiver node")
}

/// A sending node that knows [`RECEIVER`] at `target`.
pub async fn sender_node(target: SocketAddr) -> Node {
    Node::builder(SENDER)
        .tcp(super::ports::restartable_addr(), fast_tcp())
        .peer(RECEIVER, target)
        .build()
        .await
        .expect("sender node")
}

/// Poll `check` every 20 ms until it is true or `timeout` passes; returns the last
/// result.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
