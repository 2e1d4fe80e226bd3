//! The public API (`Node`, `Sender`, `Receiver`, `Delivery`, `Receipt`) driven over the
//! in-memory transport, on paused tokio time.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Outcome, SendError};
use std::collections::HashMap;
use std::time::Duration;

const CH: ChannelId = ChannelId(3);

async fn pair(net: &MemNetwork, config: NodeConfig) -> (Node, Node) {
    let a = Node::builder(NodeId(1))
        .transport(net.transport(NodeId(1)))
        .config(config.clone())
        .seed(1)
        .build()
        .await
        .unwrap();
    let b = Node::builder(NodeId(2))
        .transport(net.transport(NodeId(2)))
        .config(config)
        .seed(2)
        .build()
        .await
        .unwrap();
    (a, b)
}

fn opts(g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(CH, g)
}

/// Every guarantee over a lossy, duplicating, reordering network: at-least-once and
/// effectively-once deliver every message whose receipt is Ok; effectively-once
/// processes each exactly once; at-most-once never twice.
#[tokio::test(start_paused = true)]
async fn each_guarantee_holds_over_faulty_mem_network() {
    for g in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ] {
        let plan = FaultPlan::new(11)
            .loss(0.2)
            .duplicate(0.1)
            .reorder(0.3)
            .delay(Duration::from_micros(100), Duration::from_millis(2));
        let net = MemNetwork::new(plan).unwrap();
        let (a, b) = pair(&net, NodeConfig::default()).await;
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let consumer = tokio::spawn(async move {
            let mut seen: HashMap<u64, u32> = HashMap::new();
            while let Some(d) = inbox.recv().await {
                *seen.entry(*d.message()).or_default() += 1;
                d.ack();
            }
            seen
        });
        let out = a.sender::<u64>(NodeId(2), opts(g)).unwrap();
        let mut receipts = Vec::new();
        for i in 0..2000u64 {
            receipts.push((i, out.send(&i).await.unwrap()));
        }
        let mut ok = Vec::new();
        for (i, r) in receipts {
            match r.await {
                Ok(_) => ok.push(i),
                Err(e) => assert_ne!(g, Guarantee::EffectivelyOnce, "{i}: {e}"),
            }
        }
        // Let the last acks/deliveries settle, then stop the receiver.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = b.stats().await.unwrap();
        b.shutdown().await;
        let seen = consumer.await.unwrap();
        match g {
            Guarantee::AtMostOnce => {
                assert!(seen.values().all(|n| *n == 1), "AMO delivered twice");
                assert!(seen.len() < 2000, "20% loss must lose some AMO messages");
            }
            Guarantee::AtLeastOnce => {
                for i in &ok {
                    assert!(seen.contains_key(i), "ALO lost acked message {i}");
                }
            }
            _ => {
                assert_eq!(ok.len(), 2000);
                for i in &ok {
                    assert_eq!(seen.get(i), Some(&1), "EO message {i}");
                }
                assert!(
                    stats.proto.duplicates_dropped > 0,
                    "faults produced no duplicate?"
                );
            }
        }
    }
}

/// The receipt resolves only after the receiver's handler acked; a nack, or dropping
/// the delivery, gets the message redelivered.
#[tokio::test(start_paused = true)]
async fn receipt_waits_for_handler_and_nack_redelivers() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let mut inbox = b.receiver::<String>(CH, false).unwrap();
    let out = a
        .sender::<String>(NodeId(2), opts(Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipt = out.send(&"job".to_string()).await.unwrap();

    let first = inbox.recv().await.unwrap();
    assert_eq!(first.message(), "job");
    let id = first.id();
    // Handler still running: no ack may have reached the sender.
    let pending = tokio::time::timeout(Duration::from_secs(5), &mut receipt).await;
    assert!(
        pending.is_err(),
        "receipt resolved before the handler finished"
    );
    first.nack();

    let second = inbox.recv().await.unwrap();
    assert_eq!(second.id(), id, "a nacked message is redelivered as itself");
    drop(second); // dropped unfinished = nack

    let third = inbox.recv().await.unwrap();
    assert_eq!(third.id(), id, "a dropped delivery is redelivered");
    third.ack();
    assert_eq!(receipt.await, Ok(Outcome::Acked));
}

/// With no receiver ever acking, the receipt fails with the deadline error instead of
/// hanging.
#[tokio::test(start_paused = true)]
async fn unacked_message_fails_at_deadline() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut cfg = NodeConfig::default();
    cfg.proto.retry.deadline = Some(Duration::from_secs(3));
    let (a, _b) = pair(&net, cfg).await;
    // Node 2 has no receiver on the channel: frames are dropped unacked.
    let out = a
        .sender::<u8>(NodeId(2), opts(Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&1).await.unwrap();
    let start = tokio::time::Instant::now();
    let res = receipt.await;
    assert!(
        matches!(res, Err(SendError::Deadline { attempts }) if attempts > 1),
        "{res:?}"
    );
    assert!(start.elapsed() >= Duration::from_secs(3));
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// `send` waits while the window is full and continues when acks slide it.
#[tokio::test(start_paused = true)]
async fn full_window_blocks_send_until_acks() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut cfg = NodeConfig::default();
    cfg.proto.max_in_flight = 4;
    let (a, b) = pair(&net, cfg).await;
    let mut inbox = b.receiver::<u32>(CH, false).unwrap();
    let out = a
        .sender::<u32>(NodeId(2), opts(Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..4 {
        receipts.push(out.send(&i).await.unwrap());
    }
    let fifth = tokio::time::timeout(Duration::from_secs(2), out.send(&4)).await;
    assert!(fifth.is_err(), "window of 4 let a 5th message through");
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(inbox.recv().await.unwrap());
    }
    for d in held {
        d.ack();
    }
    let fifth = tokio::time::timeout(Duration::from_secs(2), out.send(&4))
        .await
        .expect("window did not reopen")
        .unwrap();
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    inbox.recv().await.unwrap().ack();
    assert_eq!(fifth.await, Ok(Outcome::Acked));
}

/// A payload that does not decode as the receiver's type is refused (never acked) and
/// counted, and the next good message still arrives; oversized payloads are refused at send.
#[tokio::test(start_paused = true)]
async fn bad_payloads_are_counted_not_fatal() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut cfg = NodeConfig::default();
    cfg.max_payload = 1024;
    let (a, b) = pair(&net, cfg).await;
    let mut inbox = b.receiver::<(u64, u64)>(CH, false).unwrap();
    let raw = a
        .raw_sender(NodeId(2), opts(Guarantee::AtLeastOnce))
        .unwrap();
    let bad = raw.send(bytes::Bytes::from_static(&[0xff])).await.unwrap();
    let too_big = raw.send(bytes::Bytes::from(vec![0u8; 2048])).await;
    assert!(matches!(
        too_big,
        Err(SendError::TooLarge {
            len: 2048,
            max: 1024
        })
    ));
    let typed = a
        .sender::<(u64, u64)>(NodeId(2), opts(Guarantee::AtLeastOnce))
        .unwrap();
    let good = typed.send(&(7, 8)).await.unwrap();
    let d = inbox.recv().await.unwrap();
    assert_eq!(*d.message(), (7, 8));
    d.ack();
    assert_eq!(good.await, Ok(Outcome::Acked));
    // Issue 13: a payload nobody processed is never reported Acked: it is
    // dead-lettered on the receiver and the sender told why.
    assert_eq!(
        bad.await,
        Err(SendError::Rejected {
            reason: ackwire::RejectReason::Undecodable
        }),
        "a poison message is not acked"
    );
    assert!(b.stats().await.unwrap().decode_failed >= 1);
}

/// One receiver per channel; a second is refused with a typed error.
#[tokio::test]
async fn second_receiver_on_a_channel_is_refused() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (_a, b) = pair(&net, NodeConfig::default()).await;
    let _r = b.receiver::<u8>(CH, false).unwrap();
    assert!(matches!(
        b.receiver::<u8>(CH, false),
        Err(ackwire::NodeError::ChannelTaken(c)) if c == CH
    ));
}

/// Two guarantees on one channel to one peer are refused with a typed error.
#[tokio::test(start_paused = true)]
async fn one_guarantee_per_channel() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let _inbox = b.receiver::<u8>(CH, false).unwrap();
    let x = a
        .sender::<u8>(NodeId(2), opts(Guarantee::AtLeastOnce))
        .unwrap();
    let y = a
        .sender::<u8>(NodeId(2), opts(Guarantee::AtMostOnce))
        .unwrap();
    let _rx = x.send(&1).await.unwrap();
    let ry = y.send(&2).await.unwrap();
    assert!(matches!(
        ry.await,
        Err(SendError::GuaranteeMismatch {
            existing: Guarantee::AtLeastOnce
        })
    ));
}

/// `Receiver` is a `futures::Stream`: deliveries flow through stream combinators, and
/// the stream ends when the node shuts down.
#[tokio::test(start_paused = true)]
async fn receiver_is_a_stream_that_ends_at_shutdown() {
    use futures::StreamExt;
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let inbox = b.receiver::<u32>(CH, false).unwrap();
    let out = a
        .sender::<u32>(b.id(), opts(Guarantee::EffectivelyOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for v in 0..20u32 {
        receipts.push(out.send(&v).await.unwrap());
    }
    let mut stream = inbox.map(|d| {
        let v = *d.message();
        d.ack();
        v
    });
    let mut got: Vec<u32> = (&mut stream).take(20).collect().await;
    got.sort_unstable();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    b.shutdown().await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), stream.next()).await,
        Ok(None),
        "the stream ends when the node shuts down"
    );
}
