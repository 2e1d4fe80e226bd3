//! Batched sends and receives (issue 14 item 2): `send_many` hands a whole batch to the
//! node, window by window; `recv_many` takes every queued delivery at once. Same
//! guarantees as the single-message calls.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, IdKey, Node, NodeConfig, NodeId, Outcome, SendError,
};
use bytes::Bytes;
use std::time::Duration;

const CH: ChannelId = ChannelId(4);

async fn pair(seed: u64) -> (MemNetwork, Node, Node) {
    let net = MemNetwork::new(FaultPlan::new(seed)).unwrap();
    let mut nodes = Vec::new();
    for id in [1, 2] {
        nodes.push(
            Node::builder(NodeId(id))
                .transport(net.transport(NodeId(id)))
                .config(NodeConfig::default())
                .seed(id)
                .build()
                .await
                .unwrap(),
        );
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    (net, a, b)
}

#[tokio::test(start_paused = true)]
async fn a_batch_larger_than_the_window_arrives_in_order_and_every_receipt_resolves() {
    let (_net, a, b) = pair(1).await;
    let mut inbox = b.receiver::<u64>(CH, true).unwrap();
    let out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    const N: u64 = 10_000; // the default window is 4 096
    let values: Vec<u64> = (0..N).collect();
    let receiving = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = Vec::new();
        let mut calls = 0;
        while (got.len() as u64) < N {
            let n = inbox.recv_many(&mut buf, 1024).await;
            assert!(n > 0 && n <= 1024, "recv_many returned {n}");
            calls += 1;
            for d in buf.drain(..) {
                got.push(*d.message());
                d.ack();
            }
        }
        (got, calls)
    });
    let receipts = out.send_many(&values).await.unwrap();
    assert_eq!(receipts.len() as u64, N);
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    let (got, calls) = tokio::time::timeout(Duration::from_secs(60), receiving)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, values, "every message once, in send order");
    assert!(
        calls < N,
        "recv_many took one delivery per call ({calls} calls)"
    );
}

#[tokio::test(start_paused = true)]
async fn one_oversized_payload_fails_the_batch_before_anything_is_sent() {
    let (_net, a, b) = pair(2).await;
    let mut inbox = b.raw_receiver(CH, false).unwrap();
    let out = a
        .raw_sender(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let max = NodeConfig::default().max_payload;
    let batch = vec![
        Bytes::from_static(b"fine"),
        Bytes::from(vec![0u8; max + 1]),
        Bytes::from_static(b"also fine"),
    ];
    assert!(matches!(
        out.send_many(batch).await,
        Err(SendError::TooLarge { .. })
    ));
    let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
    assert!(got.is_err(), "nothing of a refused batch is sent: {got:?}");
    assert_eq!(a.stats().await.unwrap().proto.sent, 0);
}

#[tokio::test(start_paused = true)]
async fn keyed_batches_on_effectively_once_process_each_key_once() {
    let (_net, a, b) = pair(3).await;
    let mut inbox = b.raw_receiver(CH, false).unwrap();
    let out = a
        .raw_sender(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    // 100 keys, each sent twice in one batch.
    let items: Vec<(Bytes, IdKey)> = (0..200u64)
        .map(|i| {
            (
                Bytes::from(i.to_le_bytes().to_vec()),
                IdKey(u128::from(i % 100)),
            )
        })
        .collect();
    let handler = tokio::spawn(async move {
        let mut processed = 0u64;
        let mut buf = Vec::new();
        while let Ok(n) =
            tokio::time::timeout(Duration::from_secs(5), inbox.recv_many(&mut buf, 64)).await
        {
            if n == 0 {
                break;
            }
            for d in buf.drain(..) {
                processed += 1;
                d.ack();
            }
        }
        processed
    });
    let receipts = out.send_many_with_keys(items).await.unwrap();
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    assert_eq!(handler.await.unwrap(), 100, "each key processed once");
}
