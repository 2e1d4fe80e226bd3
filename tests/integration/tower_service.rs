//! Senders as `tower::Service`s (feature `tower`): the response is the receipt's
//! outcome, `poll_ready` follows the in-flight window, and tower's layers (timeout,
//! concurrency limit, load shedding) stack on top.
#![cfg(feature = "tower")]

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Outcome, SendError};
use bytes::Bytes;
use std::time::Duration;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

const CH: ChannelId = ChannelId(9);

async fn pair(config: NodeConfig) -> (Node, Node) {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut nodes = Vec::new();
    for id in [1, 2] {
        let node = Node::builder(NodeId(id))
            .transport(net.transport(NodeId(id)))
            .config(config.clone())
            .seed(id)
            .build()
            .await
            .unwrap();
        nodes.push(node);
    }
    let b = nodes.pop().unwrap();
    (nodes.pop().unwrap(), b)
}

/// Acks every delivery of `channel` on `node`; returns how many it acked.
fn ack_all(node: &Node, channel: ChannelId) -> tokio::task::JoinHandle<Vec<u32>> {
    let mut inbox = node.receiver::<u32>(channel, true).unwrap();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(d) = inbox.recv().await {
            seen.push(*d.message());
            d.ack();
        }
        seen
    })
}

#[tokio::test(start_paused = true)]
async fn the_response_is_the_receipts_outcome() {
    let (a, b) = pair(NodeConfig::default()).await;
    let acker = ack_all(&b, CH);
    let mut svc = a
        .sender::<u32>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap()
        .service();
    for n in 0..10 {
        let outcome = svc.ready().await.unwrap().call(n).await.unwrap();
        assert_eq!(outcome, Outcome::Acked);
    }
    // At-most-once: transmitted once is all a sender learns.
    let mut amo = a
        .sender::<u32>(
            NodeId(2),
            ChannelOptions::new(ChannelId(10), Guarantee::AtMostOnce),
        )
        .unwrap()
        .service();
    assert_eq!(
        amo.ready().await.unwrap().call(1).await.unwrap(),
        Outcome::Sent
    );

    // The raw service sends bytes the same way.
    let mut raw = a
        .raw_sender(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap()
        .service();
    let payload = Bytes::from(bincode_u32(10));
    assert_eq!(
        raw.ready().await.unwrap().call(payload).await.unwrap(),
        Outcome::Acked
    );

    b.shutdown().await;
    let seen = acker.await.unwrap();
    assert_eq!(seen, (0..=10).collect::<Vec<u32>>());
}

/// bincode 2 (standard config) encodes a small `u32` as one byte.
fn bincode_u32(n: u32) -> Vec<u8> {
    assert!(n < 251);
    vec![n as u8]
}

/// `poll_ready` is pending exactly while the window is full; `LoadShed` turns that into
/// an immediate `Overloaded` error, and an ack makes the service ready again.
#[tokio::test(start_paused = true)]
async fn poll_ready_follows_the_window_and_load_shed_refuses_when_full() {
    let mut config = NodeConfig::default();
    config.proto.max_in_flight = 4;
    let (a, b) = pair(config).await;
    let mut inbox = b.receiver::<u32>(CH, false).unwrap();
    let out = a
        .sender::<u32>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut svc = out.service();
    let mut pending = Vec::new();
    for n in 0..4 {
        pending.push(svc.ready().await.unwrap().call(n));
    }
    let full = tokio::time::timeout(Duration::from_secs(1), svc.ready()).await;
    assert!(full.is_err(), "ready with a full window");

    let mut shed = ServiceBuilder::new().load_shed().service(out.service());
    let err: BoxError = shed.ready().await.unwrap().call(99).await.unwrap_err();
    assert!(
        err.is::<tower::load_shed::error::Overloaded>(),
        "expected Overloaded, got {err}"
    );

    let first = inbox.recv().await.unwrap();
    assert_eq!(*first.message(), 0);
    first.ack();
    assert_eq!(pending.remove(0).await.unwrap(), Outcome::Acked);
    tokio::time::timeout(Duration::from_secs(1), svc.ready())
        .await
        .expect("an ack made room")
        .unwrap();
}

/// A timeout layer ends the wait for an ack that never comes; without one the
/// receipt's own failure is the error.
#[tokio::test(start_paused = true)]
async fn errors_reach_the_caller_through_the_layers() {
    let (a, _b) = pair(NodeConfig::default()).await; // no receiver on CH: never acked
    let mut opts = ChannelOptions::new(CH, Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(3));
    let out = a.sender::<u32>(NodeId(2), opts).unwrap();

    let mut timed = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(out.service());
    let start = tokio::time::Instant::now();
    let err = timed.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(start.elapsed().as_secs(), 1);

    let err = out
        .service()
        .ready()
        .await
        .unwrap()
        .call(2)
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Deadline { .. }), "{err:?}");
}

/// Timeout + concurrency limit stacked as in `examples/tower_layers.rs`: every call
/// succeeds, and no more than the limit are ever awaiting their ack.
#[tokio::test(start_paused = true)]
async fn timeout_and_concurrency_limit_stack() {
    const N: u32 = 500;
    let (a, b) = pair(NodeConfig::default()).await;
    let acker = ack_all(&b, CH);
    let out = a
        .sender::<u32>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .concurrency_limit(8)
        .service(out.service());
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let max_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..N {
        let mut svc = svc.clone();
        let (in_flight, max_seen) = (in_flight.clone(), max_seen.clone());
        tasks.push(tokio::spawn(async move {
            let ready = svc.ready().await?;
            let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            max_seen.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            let r = ready.call(n).await;
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            r
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Outcome::Acked);
    }
    let max = max_seen.load(std::sync::atomic::Ordering::SeqCst);
    assert!(max <= 8, "{max} calls in flight above the limit of 8");
    b.shutdown().await;
    let mut seen = acker.await.unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (0..N).collect::<Vec<u32>>());
}

/// A target turning Down ends a `poll_ready` waiting on a full window, as it ends a
/// waiting `Sender::send`: the request's response is `PeerDown`, while `poll_ready`
/// itself does not fail, so a `Buffer` in front of the service keeps serving (it fails
/// every later request for good once its service's `poll_ready` errs). (Regression:
/// `poll_ready` returned `PeerDown` and the `Buffer` died with it.)
#[tokio::test(start_paused = true)]
async fn a_target_down_fails_the_request_not_the_buffer() {
    let mut config = NodeConfig::default();
    config.proto.max_in_flight = 2;
    let (a, b) = pair(config).await;
    let inbox = b.receiver::<u32>(CH, false).unwrap();
    let out = a
        .sender::<u32>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut svc = ServiceBuilder::new().buffer(8).service(out.service());
    let held = [
        svc.ready().await.unwrap().call(0),
        svc.ready().await.unwrap().call(1),
    ];
    let third = tokio::spawn(svc.ready().await.unwrap().call(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "the window was not full");
    drop(inbox);
    drop(b);
    let down = SendError::PeerDown { peer: NodeId(2) };
    let err = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("the waiting request ends when the target is Down")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.downcast_ref::<SendError>(), Some(&down), "{err}");
    let later = svc.ready().await.unwrap().call(3);
    let err = tokio::time::timeout(Duration::from_secs(5), later)
        .await
        .expect("a later request is answered")
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<SendError>(),
        Some(&down),
        "a later request through the Buffer: {err}"
    );
    drop(held);
}
