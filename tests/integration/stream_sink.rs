//! Senders as `futures::Sink`s (`Sender::sink`, `RawSender::sink`) feeding receivers
//! used as `futures::Stream`s: order and count kept, backpressure from the in-flight
//! window, failures surfaced by `flush`, per-item errors that leave the sink usable.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, SendError};
use bytes::Bytes;
use futures::{stream, SinkExt, StreamExt};
use std::time::Duration;

const CH: ChannelId = ChannelId(5);

async fn pair(net: &MemNetwork, config: NodeConfig) -> (Node, Node) {
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

/// A pipeline: a stream of 2 000 numbers into the sink, the receiver as a stream on
/// the other side. Every guarantee delivers every number once, in order, and the sink
/// sees every receipt settle `Ok` by `close`.
#[tokio::test(start_paused = true)]
async fn sink_to_stream_keeps_order_and_count_for_every_guarantee() {
    const N: u64 = 2_000;
    for (i, g) in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let net = MemNetwork::new(FaultPlan::default()).unwrap();
        let (a, b) = pair(&net, NodeConfig::default()).await;
        let ch = ChannelId(10 + i as u32);
        let inbox = b.receiver::<u64>(ch, true).unwrap();
        let consumer = tokio::spawn(
            inbox
                .take(N as usize)
                .map(|d| {
                    let n = *d.message();
                    d.ack();
                    n
                })
                .collect::<Vec<u64>>(),
        );
        let out = a
            .sender::<u64>(NodeId(2), ChannelOptions::new(ch, g))
            .unwrap();
        let mut sink = out.sink();
        sink.send_all(&mut stream::iter(0..N).map(Ok))
            .await
            .unwrap();
        sink.close().await.unwrap();
        assert_eq!(sink.settled(), N, "{g:?}");
        assert_eq!(sink.failed(), 0, "{g:?}");
        assert_eq!(sink.outstanding(), 0, "{g:?}");
        let got = consumer.await.unwrap();
        assert_eq!(got, (0..N).collect::<Vec<_>>(), "{g:?}: order or count");
    }
}

/// `poll_ready` is pending while the window is full (here 8 messages, none acked) and
/// becomes ready when an ack slides the window.
#[tokio::test(start_paused = true)]
async fn sink_waits_for_window_space() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut config = NodeConfig::default();
    config.proto.max_in_flight = 8;
    let (a, b) = pair(&net, config).await;
    let mut inbox = b.receiver::<u32>(CH, false).unwrap();
    let out = a
        .sender::<u32>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut sink = out.sink();
    for n in 0..8 {
        // `feed` = poll_ready + start_send, without waiting for receipts.
        tokio::time::timeout(Duration::from_millis(10), sink.feed(n))
            .await
            .expect("window has room")
            .unwrap();
    }
    assert_eq!(sink.outstanding(), 8);
    let blocked = tokio::time::timeout(Duration::from_secs(1), sink.feed(8)).await;
    assert!(
        blocked.is_err(),
        "a 9th message was accepted into a full window"
    );

    // Ack the oldest: the window slides by one and the 9th goes in.
    let first = inbox.recv().await.unwrap();
    assert_eq!(*first.message(), 0);
    first.ack();
    tokio::time::timeout(Duration::from_secs(1), sink.feed(8))
        .await
        .expect("an ack made room")
        .unwrap();
    // Ack the rest; flush then reports every message settled.
    for _ in 1..9 {
        inbox.recv().await.unwrap().ack();
    }
    sink.flush().await.unwrap();
    assert_eq!(
        (sink.settled(), sink.failed(), sink.outstanding()),
        (9, 0, 0)
    );
}

/// Messages nobody acknowledges (no receiver on the channel) fail at their deadline;
/// `flush` surfaces the failure, every one is counted, and the sink stays usable.
#[tokio::test(start_paused = true)]
async fn flush_surfaces_the_first_failed_receipt() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let mut opts = ChannelOptions::new(CH, Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(2));
    let out = a.sender::<String>(NodeId(2), opts).unwrap();
    let mut sink = out.sink();
    for i in 0..3 {
        sink.feed(format!("nobody listens {i}")).await.unwrap();
    }
    let err = sink.flush().await.unwrap_err();
    assert!(matches!(err, SendError::Deadline { .. }), "{err:?}");
    assert_eq!((sink.settled(), sink.failed()), (3, 3));
    // Reported once: the next flush has nothing left to report.
    sink.flush().await.unwrap();

    // With a receiver the same sink delivers again.
    let mut inbox = b.receiver::<String>(CH, false).unwrap();
    sink.feed("now heard".to_string()).await.unwrap();
    let d = inbox.recv().await.unwrap();
    assert_eq!(d.message(), "now heard");
    d.ack();
    sink.flush().await.unwrap();
    assert_eq!((sink.settled(), sink.failed()), (4, 3));
}

/// A payload above `max_payload` is refused by `start_send` (the item only): the raw
/// sink's next item is sent and delivered.
#[tokio::test(start_paused = true)]
async fn an_oversized_item_fails_alone() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut config = NodeConfig::default();
    config.max_payload = 1024;
    let (a, b) = pair(&net, config).await;
    let mut inbox = b.raw_receiver(CH, false).unwrap();
    let out = a
        .raw_sender(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut sink = out.sink();
    let err = sink.send(Bytes::from(vec![0u8; 4096])).await.unwrap_err();
    assert!(
        matches!(
            err,
            SendError::TooLarge {
                len: 4096,
                max: 1024
            }
        ),
        "{err:?}"
    );
    // `feed`, not `send`: `send` also flushes, which waits for the ack below.
    sink.feed(Bytes::from_static(b"fits")).await.unwrap();
    let d = inbox.recv().await.unwrap();
    assert_eq!(&d.message()[..], b"fits");
    d.ack();
    sink.close().await.unwrap();
    assert_eq!((sink.settled(), sink.failed()), (1, 0));
}

/// A long pipeline stops at the first failure: `send_all` returns it from `poll_ready`
/// once the oldest message fails, instead of pushing the whole stream into the void.
#[tokio::test(start_paused = true)]
async fn a_pipeline_stops_at_the_first_failure() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut config = NodeConfig::default();
    config.proto.max_in_flight = 8;
    let (a, _b) = pair(&net, config).await; // no receiver on CH: nothing is acked
    let mut opts = ChannelOptions::new(CH, Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(1));
    let out = a.sender::<u32>(NodeId(2), opts).unwrap();
    let mut sink = out.sink();
    let err = sink
        .send_all(&mut stream::iter(0..1_000u32).map(Ok))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Deadline { .. }), "{err:?}");
    let accepted = sink.settled() + sink.outstanding() as u64;
    assert!(
        (8..=16).contains(&accepted),
        "{accepted} messages accepted before the failure stopped the pipeline"
    );
    assert!(sink.failed() >= 1);
}

/// A typed sink keeps the typed sender's payload type check: `String`s into a `u64`
/// receiver are rejected (`RejectReason::TypeMismatch`), and `flush` says so.
#[tokio::test(start_paused = true)]
async fn a_typed_sink_keeps_the_type_check() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let _inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a
        .sender::<String>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut sink = out.sink();
    sink.feed("not a number".to_string()).await.unwrap();
    let err = sink.flush().await.unwrap_err();
    assert!(
        matches!(
            err,
            SendError::Rejected {
                reason: ackwire::RejectReason::TypeMismatch
            }
        ),
        "{err:?}"
    );
}
