//! A slow handler with default settings: the receiver tells the sender what it holds,
//! so nothing is retransmitted while the handler works through its queue.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

/// Sender `A` and receiver `B` on `net`, default settings.
async fn pair(net: &MemNetwork) -> (Node, Node) {
    let b = Node::builder(B)
        .transport(net.transport(B))
        .build()
        .await
        .unwrap();
    let a = Node::builder(A)
        .transport(net.transport(A))
        .build()
        .await
        .unwrap();
    (a, b)
}

/// Property (doc claim in README "Window and credit"): a handler taking 300 ms per
/// message, one at a time, on a loss-free link with every default — each message is
/// transmitted once (no retransmission), every receipt is `Acked`, and each
/// effectively-once message is processed once. (Regression: under 512 held messages
/// the receiver said nothing until the first handler finished, after the sender's
/// 200 ms RTO: 20 messages cost 20 retransmissions.)
#[tokio::test(start_paused = true)]
async fn a_slow_handler_causes_no_retransmission() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net).await;
    let seen: Arc<Mutex<HashMap<(u32, u64), u32>>> = Arc::default();
    for ch in [1, 2] {
        let mut inbox = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                tokio::time::sleep(Duration::from_millis(300)).await;
                *seen.lock().unwrap().entry((ch, *d.message())).or_default() += 1;
                d.ack();
            }
        });
    }
    let mut receipts = Vec::new();
    for (ch, g) in [(1, Guarantee::AtLeastOnce), (2, Guarantee::EffectivelyOnce)] {
        let out = a
            .sender::<u64>(B, ChannelOptions::new(ChannelId(ch), g))
            .unwrap();
        for v in 0..20u64 {
            receipts.push(out.send(&v).await.unwrap());
        }
    }
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    let stats = a.stats().await.unwrap().proto;
    assert_eq!(stats.retransmitted, 0, "{stats:?}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 40);
        assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    }
    let received = b.stats().await.unwrap().proto;
    assert_eq!(
        received.in_progress_dropped + received.duplicates_dropped,
        0,
        "{received:?}"
    );
}

/// Property: after a connection is killed while a handler holds messages, each held
/// message is retransmitted once (the reconnect's resend), not every timer until the
/// handler finishes: the receiver answers a copy of a message it holds with an ack
/// saying so. 200 effectively-once messages held 10 s each, one disconnect at 1 s:
/// every receipt `Acked`, each message processed once, at most 200 retransmissions.
/// (Regression: 1 400 — the receiver dropped the copies as in progress without a word,
/// since its last ack had already covered them, and the sender's timers resent each
/// one every backoff until the handler finished.)
#[tokio::test(start_paused = true)]
async fn a_reconnect_under_a_slow_handler_resends_each_held_message_once() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net).await;
    let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    *seen.lock().unwrap().entry(*d.message()).or_default() += 1;
                    d.ack();
                });
            }
        });
    }
    let out = a
        .sender::<u64>(
            B,
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut receipts = Vec::new();
    for v in 0..200u64 {
        receipts.push(out.send(&v).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.stats().await.unwrap().proto.retransmitted, 0, "held");
    net.disconnect(A, B);
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    let retransmitted = a.stats().await.unwrap().proto.retransmitted;
    assert!(
        retransmitted <= 200,
        "{retransmitted} retransmissions for 200 held messages after one reconnect"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
}

/// Property: every at-most-once receipt resolves when its receiver goes away for good.
/// A receiver that never takes its messages grants no more credit, so most of 6 000
/// at-most-once messages wait for credit (at-most-once has no deadline); the receiver
/// node then stops. Within 30 s (once the failure detector holds it Down) every
/// receipt is resolved: `Ok(Sent)` for what was transmitted, `Err(PeerDown)` for what
/// never was.
/// (Regression: the untransmitted ones went out one per unanswered credit probe,
/// every few seconds: 1 895 of 6 000 receipts were still open 50 s later.)
#[tokio::test(start_paused = true)]
async fn at_most_once_receipts_resolve_when_the_receiver_is_gone_for_good() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net).await;
    let inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(ChannelId(1), Guarantee::AtMostOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for v in 0..6_000u64 {
        receipts.push(out.send(&v).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.shutdown().await;
    drop(inbox);
    // The detector declares B Down within seconds (default heartbeat 1 s, phi 8).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut sent, mut down) = (0, 0);
    for r in receipts {
        match tokio::time::timeout_at(deadline, r).await {
            Ok(Ok(Outcome::Sent)) => sent += 1,
            Ok(Err(ackwire::SendError::PeerDown { peer })) if peer == B => down += 1,
            other => panic!("{other:?} ({sent} sent, {down} failed PeerDown before it)"),
        }
    }
    assert!(down > 0 && sent > 0, "{sent} sent, {down} PeerDown");
    assert_eq!(sent + down, 6_000);
}
