//! Bounded waits for the black-box suites: every wait ends in a panic that names what
//! did not happen, so a hang fails its test instead of stalling the run.

use ackwire::detector::Health;
use ackwire::{Node, NodeId};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Any free port on loopback.
pub fn any_addr() -> SocketAddr {
    super::ports::restartable_addr()
}

/// `f`'s output, or a panic naming `what` after `secs`.
pub async fn within<F: std::future::Future>(secs: f64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs_f64(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `secs`.
pub async fn wait_until(secs: f64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while !f() {
        if Instant::now() >= end {
            panic!("{what}: not reached within {secs} s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `node` sees `peer` as `want`; panics after `secs`.
pub async fn wait_health(node: &Node, peer: NodeId, want: Health, secs: f64) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while node.health(peer) != Some(want) {
        if Instant::now() >= end {
            panic!(
                "{peer} never became {want:?} within {secs} s (is {:?})",
                node.health(peer)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
