//! Node-level credit (issue 11, "per stream and per node"): however many streams a
//! sending node opens to a receiver, the receiver never holds more than
//! `ProtoConfig::node_credit` of its messages (plus the initial grant of a new
//! connection), and nothing stalls once the application catches up.

use crate::support;

use ackwire::proto::INITIAL_NODE_CREDIT;
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Outcome};
use std::time::Duration;
use support::reliability::report;

async fn node(net: &MemNetwork, id: u64, config: NodeConfig) -> Node {
    Node::builder(NodeId(id))
        .transport(net.transport(NodeId(id)))
        .config(config)
        .seed(id)
        .build()
        .await
        .unwrap()
}

/// 8 streams × 3 000 messages to a receiver whose application holds every delivery:
/// stream credit alone (4 096 each) would let all 24 000 in.
async fn held_by_node_credit(g: Guarantee) {
    const STREAMS: u32 = 8;
    const PER: u64 = 3_000;
    let net = MemNetwork::new(FaultPlan::new(21)).unwrap();
    let mut config = NodeConfig::default();
    config.proto.retry.deadline = None; // the test decides when the app catches up
    let a = node(&net, 1, config.clone()).await;
    let b = node(&net, 2, config.clone()).await;
    let window = config.proto.node_credit;
    assert!(u64::from(STREAMS) * PER > window + INITIAL_NODE_CREDIT);
    let mut inboxes = Vec::new();
    let mut senders = Vec::new();
    for c in 0..STREAMS {
        inboxes.push(b.receiver::<u64>(ChannelId(c), false).unwrap());
        senders.push(
            a.sender::<u64>(NodeId(2), ChannelOptions::new(ChannelId(c), g))
                .unwrap(),
        );
    }
    let send_all = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for n in 0..PER {
            for s in &senders {
                receipts.push(s.send(&n).await.unwrap());
            }
        }
        receipts
    });
    // Let everything that credit allows arrive; hold it.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let mut held = Vec::new();
    for inbox in inboxes.iter_mut() {
        while let Ok(Some(d)) = tokio::time::timeout(Duration::ZERO, inbox.recv()).await {
            held.push(d);
        }
    }
    let most = window + INITIAL_NODE_CREDIT;
    assert!(
        held.len() as u64 <= most,
        "{g:?}: the receiver holds {} messages of one sending node (bound {most})",
        held.len()
    );
    assert!(
        held.len() as u64 >= window * 7 / 8,
        "{g:?}: only {} held: credit is granted too sparingly",
        held.len()
    );
    let waits = a.stats().await.unwrap().proto.node_credit_waits;
    assert!(waits > 0, "{g:?}: the sender never waited for node credit");
    let peak = held.len();
    // The application catches up: everything arrives, nothing stalls.
    let mut total = held.len() as u64;
    for d in held.drain(..) {
        d.ack();
    }
    let drain = async {
        while total < u64::from(STREAMS) * PER {
            for inbox in inboxes.iter_mut() {
                while let Ok(Some(d)) =
                    tokio::time::timeout(Duration::from_millis(1), inbox.recv()).await
                {
                    total += 1;
                    d.ack();
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(600), drain)
        .await
        .unwrap_or_else(|_| panic!("{g:?}: stalled after the application caught up"));
    let receipts = send_all.await.unwrap();
    for r in receipts {
        let want = if g == Guarantee::AtMostOnce {
            Outcome::Sent
        } else {
            Outcome::Acked
        };
        assert_eq!(r.await, Ok(want));
    }
    report(
        &format!("{g:?}"),
        "one sending node, 8 streams, the receiver's application holds every delivery",
        "8 x 3 000 msgs",
        &format!(
            "the receiver held at most {peak} (node credit {window} + initial {INITIAL_NODE_CREDIT}); all delivered once the application caught up"
        ),
    );
}

#[tokio::test(start_paused = true)]
async fn node_credit_bounds_what_one_sender_has_outstanding_at_least_once() {
    held_by_node_credit(Guarantee::AtLeastOnce).await;
}

#[tokio::test(start_paused = true)]
async fn node_credit_bounds_what_one_sender_has_outstanding_at_most_once() {
    held_by_node_credit(Guarantee::AtMostOnce).await;
}
