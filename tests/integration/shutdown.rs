//! Graceful shutdown: nothing accepted is lost across `Node::shutdown` + restart.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, Node, NodeConfig, NodeId, Outcome,
    SendError,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(5);
const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

async fn receiver(net: &MemNetwork) -> (Node, Seen) {
    let b = Node::builder(B)
        .transport(net.transport(B))
        .build()
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *s.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    });
    (b, seen)
}

async fn sender(net: &MemNetwork, hints: Option<&std::path::Path>) -> Node {
    sender_draining(net, hints, Duration::from_secs(2)).await
}

async fn sender_draining(
    net: &MemNetwork,
    hints: Option<&std::path::Path>,
    drain: Duration,
) -> Node {
    let mut cfg = NodeConfig::default();
    cfg.shutdown_drain = drain;
    cfg.handoff = hints.map(HandoffConfig::new);
    Node::builder(A)
        .transport(net.transport(A))
        .config(cfg)
        .build()
        .await
        .unwrap()
}

/// Messages still unacknowledged at shutdown (the target is unreachable) are spooled to
/// the hint store; the restarted node replays them: every one processed exactly once.
#[tokio::test(start_paused = true)]
async fn unacked_messages_are_spooled_and_replayed_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (_b, seen) = receiver(&net).await;
    let a = sender(&net, Some(dir.path())).await;
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    assert_eq!(out.send(&0).await.unwrap().await, Ok(Outcome::Acked));
    net.partition(A, B);
    let mut receipts = Vec::new();
    for i in 1..=500 {
        receipts.push(out.send(&i).await.unwrap());
    }
    a.shutdown().await;
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::HandedOff));
    }
    assert!(matches!(out.send(&999).await, Err(SendError::Shutdown)));
    drop(a);

    net.heal(A, B);
    let a2 = sender(&net, Some(dir.path())).await;
    for _ in 0..300 {
        if seen.lock().unwrap().len() == 501 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = seen.lock().unwrap().clone();
    for i in 0..=500 {
        assert_eq!(seen.get(&i), Some(&1), "message {i}");
    }
    assert_eq!(a2.stats().await.unwrap().hints.unwrap().pending, 0);
    println!("reliability: graceful shutdown | shutdown with 500 messages unacknowledged (target partitioned), then restart | 1 run | all spooled to hints (HandedOff), replayed after restart, each processed exactly once");
}

/// With a reachable target, shutdown waits for the acks: every receipt resolves Acked.
#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_messages() {
    let plan = FaultPlan::new(3)
        .loss(0.2)
        .delay(Duration::from_millis(1), Duration::from_millis(5));
    let net = MemNetwork::new(plan).unwrap();
    let (_b, seen) = receiver(&net).await;
    // 20 % loss with a 200 ms minimum RTO and backoff: give the drain room.
    let a = sender_draining(&net, None, Duration::from_secs(30)).await;
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..1000 {
        receipts.push(out.send(&i).await.unwrap());
    }
    a.shutdown().await;
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    assert_eq!(seen.lock().unwrap().len(), 1000);
}

/// Without handoff, what cannot be acked within the drain fails with a typed error
/// rather than hanging.
#[tokio::test(start_paused = true)]
async fn without_handoff_unackable_messages_fail_at_shutdown() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let (_b, _seen) = receiver(&net).await;
    let a = sender(&net, None).await;
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    net.partition(A, B);
    let r = out.send(&1).await.unwrap();
    let start = tokio::time::Instant::now();
    a.shutdown().await;
    assert_eq!(r.await, Err(SendError::Shutdown));
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "drain deadline not honoured"
    );
}

/// Two `shutdown` calls at once both return only when the node has stopped: every
/// receipt resolved and `closed()` ready (regression: the second call returned at once,
/// while the first still waited for the drain).
#[tokio::test(start_paused = true)]
async fn concurrent_shutdown_calls_both_wait_for_the_stop() {
    use futures::FutureExt;
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let b = Node::builder(B)
        .transport(net.transport(B))
        .build()
        .await
        .unwrap();
    // Deliveries are held, never finished: the drain runs its whole grace period.
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(d) = inbox.recv().await {
            held.push(d);
        }
    });
    let a = Arc::new(sender(&net, None).await);
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for v in 0..10u64 {
        receipts.push(out.send(&v).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.shutdown().await;
    assert!(
        a.closed().now_or_never().is_some(),
        "the second shutdown returned before the node stopped"
    );
    for r in receipts {
        let got = r
            .now_or_never()
            .expect("a receipt still open after shutdown");
        assert!(matches!(got, Err(SendError::Shutdown)), "{got:?}");
    }
    first.await.unwrap();
    b.shutdown().await;
    hold.abort();
}

/// Every receipt resolves when a node is dropped, also for a send that raced the
/// stop: the command channel is closed and drained before the driver ends, so no
/// send can land in it after the last look. (Regression: a send whose push into the
/// channel was still under way when the driver dropped its end stayed queued while
/// the sender handle lived, and its receipt hung; CI saw it once in
/// `blackbox::api::dropping_a_node_resolves_its_receipts_and_ends_its_receivers`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_of_sends_racing_a_node_drop_all_resolve() {
    for round in 0..300u64 {
        let net = MemNetwork::new(FaultPlan::default()).unwrap();
        let a = Node::builder(A)
            .transport(net.transport(A))
            .build()
            .await
            .unwrap();
        let out = a
            .raw_sender(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
            .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let out = out.clone();
            tasks.push(tokio::spawn(async move {
                let mut receipts = Vec::new();
                // B never answers: each send holds its window slot until the stop.
                loop {
                    match out.try_send(bytes::Bytes::from_static(b"x")) {
                        Ok(r) => receipts.push(r),
                        Err(SendError::WindowFull { .. }) => {}
                        Err(_) => break,
                    }
                    tokio::task::yield_now().await;
                }
                receipts
            }));
        }
        tokio::task::yield_now().await;
        drop(a);
        for t in tasks {
            for r in t.await.unwrap() {
                let res = tokio::time::timeout(Duration::from_secs(5), r)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: a receipt hung after drop"));
                assert!(
                    matches!(res, Err(SendError::Shutdown)),
                    "round {round}: {res:?}"
                );
            }
        }
        drop(out);
    }
}

use crate::support::ports;

async fn tcp_node(id: NodeId, allow: Option<NodeId>, cfg: NodeConfig) -> Node {
    tcp_node_at(id, ports::restartable_addr(), allow, None, cfg).await
}

async fn tcp_node_at(
    id: NodeId,
    addr: std::net::SocketAddr,
    allow: Option<NodeId>,
    peer: Option<(NodeId, std::net::SocketAddr)>,
    cfg: NodeConfig,
) -> Node {
    let mut b = Node::builder(id).bind(addr).config(cfg);
    if let Some(p) = allow {
        b = b.allow_peer(p);
    }
    if let Some((p, at)) = peer {
        b = b.peer(p, at);
    }
    tokio::time::timeout(Duration::from_secs(10), b.build())
        .await
        .expect("build in time")
        .expect("build")
}

/// Receiver `B` (with a receiver on `CH`) and sender `A` (with a sender to it) over TCP,
/// default settings.
async fn tcp_channel(g: Guarantee) -> (Node, ackwire::Receiver<u64>, Node, ackwire::Sender<u64>) {
    tcp_channel_with(g, NodeConfig::default()).await
}

/// As [`tcp_channel`], with the receiving node's config `b_cfg`.
async fn tcp_channel_with(
    g: Guarantee,
    b_cfg: NodeConfig,
) -> (Node, ackwire::Receiver<u64>, Node, ackwire::Sender<u64>) {
    let b = tcp_node(B, Some(A), b_cfg).await;
    let rx = b.receiver::<u64>(CH, false).unwrap();
    let a = tcp_node_at(
        A,
        ports::restartable_addr(),
        None,
        Some((B, b.local_addr().unwrap())),
        NodeConfig::default(),
    )
    .await;
    let tx = a.sender::<u64>(B, ChannelOptions::new(CH, g)).unwrap();
    (b, rx, a, tx)
}

/// `RawReceiver::recv`: nothing is handed out once a graceful stop has begun its handler
/// grace; `None` after `shutdown` returned even with messages still queued, and those
/// are taken back (never acked unprocessed): every receipt stays open until the
/// sender gives up, none is `Acked` for a message the application did not take.
/// (Regression: 9 messages queued at the stop were handed out after `shutdown`
/// returned, and their acks went nowhere.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_hands_out_nothing_once_shutdown_has_returned() {
    let (b, mut rx, a, tx) = tcp_channel(Guarantee::EffectivelyOnce).await;
    let mut receipts = Vec::new();
    for i in 0..10u64 {
        receipts.push(tx.send(&i).await.unwrap());
    }
    // One taken (so all have arrived: one stream, in one burst), the rest left queued.
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let first_value = *first.message();
    first.ack();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(10), b.shutdown())
        .await
        .unwrap();
    let mut after = Vec::new();
    while let Some(d) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("recv after shutdown returns")
    {
        after.push(*d.message());
        d.ack();
    }
    assert!(
        after.is_empty(),
        "recv() handed out {after:?} after shutdown() returned"
    );
    // Only the message the application took and acked may be acked.
    tokio::time::timeout(Duration::from_secs(10), a.shutdown())
        .await
        .unwrap();
    for (i, r) in receipts.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("receipt resolves at the sender's stop");
        if i as u64 != first_value {
            assert_ne!(r, Ok(Outcome::Acked), "message {i} acked, never processed");
        }
    }
}

/// Effectively-once with `DurableDedup` across a clean receiver shutdown and restart
/// on the same address and directory, with the plain handler loop (`recv`, 20 ms of
/// work, `ack`) slower than the arrivals: no message is processed twice, and every
/// receipt is `Acked`. (Regression: 230 of 300 were processed twice — handed out by
/// the stopped receiver, acked into nothing, and processed again after the restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_effectively_once_holds_across_a_clean_receiver_restart() {
    const N: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = NodeConfig::default();
        c.dedup.durable = Some(ackwire::dedup::DurableDedup::new(dir.path()));
        c
    };
    let seen: Seen = Arc::default();
    let handler = |mut rx: ackwire::Receiver<u64>| {
        let s = seen.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                tokio::time::sleep(Duration::from_millis(20)).await; // the work
                *s.lock().unwrap().entry(*d.message()).or_default() += 1;
                d.ack();
            }
        })
    };
    let addr = ports::restartable_addr();
    let b1 = tcp_node_at(B, addr, Some(A), None, cfg()).await;
    let h1 = handler(b1.receiver::<u64>(CH, false).unwrap());
    let a = tcp_node_at(
        A,
        ports::restartable_addr(),
        None,
        Some((B, addr)),
        NodeConfig::default(),
    )
    .await;
    let tx = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(tx.send(&i).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::time::timeout(Duration::from_secs(10), b1.shutdown())
        .await
        .unwrap();
    drop(b1);
    // The first handler's loop ends: its receiver hands out nothing more.
    tokio::time::timeout(Duration::from_secs(5), h1)
        .await
        .expect("the stopped receiver's loop ends")
        .unwrap();
    let processed_before = seen.lock().unwrap().len();
    assert!(
        (processed_before as u64) < N,
        "the stop came after every message was processed ({processed_before}): nothing tested"
    );
    let b2 = tcp_node_at(B, addr, Some(A), None, cfg()).await;
    let h2 = handler(b2.receiver::<u64>(CH, false).unwrap());
    for (i, r) in receipts.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("receipt resolves");
        assert_eq!(r, Ok(Outcome::Acked), "message {i}");
    }
    let seen = seen.lock().unwrap().clone();
    let twice: Vec<u64> = (0..N).filter(|v| seen.get(v) != Some(&1)).collect();
    assert!(
        twice.is_empty(),
        "{} of {N} not processed exactly once (e.g. {:?}; {processed_before} processed before the stop)",
        twice.len(),
        &twice[..twice.len().min(8)]
    );
    h2.abort();
    a.shutdown().await;
    b2.shutdown().await;
}

/// At-most-once messages queued for a receiver when its node stops are still handed
/// out (their sender settled them when it sent them and will not send them again),
/// then `recv` ends: nothing is lost to the stop itself. (Regression: taking the
/// queue back at the stop dropped them uncounted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_messages_queued_at_a_stop_are_still_handed_out() {
    let (b, mut rx, a, tx) = tcp_channel(Guarantee::AtMostOnce).await;
    for i in 0..20u64 {
        let r = tx.send(&i).await.unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), r)
                .await
                .unwrap(),
            Ok(Outcome::Sent)
        );
    }
    let mut got = vec![*tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap()
        .message()];
    // Every message reaches the receiving node (a receipt resolves when its message
    // is written, not when it arrives) before the stop; polled, not a fixed sleep.
    for _ in 0..500 {
        if b.stats().await.unwrap().proto.delivered >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), b.shutdown())
        .await
        .unwrap();
    while let Some(d) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("recv after shutdown returns")
    {
        got.push(*d.message());
    }
    got.sort_unstable();
    assert_eq!(got, (0..20).collect::<Vec<u64>>());
    a.shutdown().await;
}

/// The handler grace (`NodeConfig::shutdown_handler_grace`, default 5 s) waits for
/// deliveries handed out to the application, not for messages still queued for a
/// receiver the application does not poll: those are taken back at once. A stop with
/// ten queued messages returns well within the grace; with one handed out and held,
/// it waits the whole grace for it (and an ack within the grace is applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_grace_waits_for_handed_out_deliveries_not_queued_ones() {
    // Only queued: the receiver is never polled.
    let (b, rx, a, tx) = tcp_channel(Guarantee::EffectivelyOnce).await;
    let mut receipts = Vec::new();
    for i in 0..10u64 {
        receipts.push(tx.send(&i).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // all arrived and queued
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), b.shutdown())
        .await
        .unwrap();
    let queued_only = t0.elapsed();
    assert!(
        queued_only < Duration::from_secs(3),
        "a stop with only queued messages took {queued_only:?} (the grace is 5 s)"
    );
    drop(rx);
    for r in receipts {
        // Never acked unprocessed: they fail (the sender's deadline or shutdown).
        let got = tokio::time::timeout(Duration::from_millis(1), r).await;
        assert!(!matches!(got, Ok(Ok(Outcome::Acked))), "{got:?}");
    }
    a.shutdown().await;

    // One handed out and held for 2 s: the stop waits for it and its ack counts.
    let (b, mut rx, a, tx) = tcp_channel(Guarantee::EffectivelyOnce).await;
    let r = tx.send(&7).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let acker = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        d.ack();
    });
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), b.shutdown())
        .await
        .unwrap();
    let held = t0.elapsed();
    assert!(
        held >= Duration::from_millis(1500),
        "the stop did not wait for the held delivery ({held:?})"
    );
    acker.await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .unwrap(),
        Ok(Outcome::Acked)
    );
    a.shutdown().await;
}

/// `NodeConfig::shutdown_handler_grace` at its documented extremes: `Duration::ZERO`
/// stops without waiting for a held delivery (its late ack is not applied), and
/// `Duration::MAX` waits for it however long it takes (6 s here, past the 5 s
/// default), and its ack is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_grace_zero_does_not_wait_and_max_waits_for_every_held_delivery() {
    for (grace, hold, waits) in [
        (Duration::ZERO, Duration::from_secs(4), false),
        (Duration::MAX, Duration::from_secs(6), true),
    ] {
        let mut cfg = NodeConfig::default();
        cfg.shutdown_handler_grace = grace;
        let (b, mut rx, a, tx) = tcp_channel_with(Guarantee::EffectivelyOnce, cfg).await;
        let r = tx.send(&1).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let acker = tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            d.ack();
        });
        let t0 = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(30), b.shutdown())
            .await
            .unwrap();
        let took = t0.elapsed();
        acker.await.unwrap();
        if waits {
            assert!(
                took >= hold - Duration::from_millis(100),
                "grace {grace:?}: {took:?}"
            );
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(10), r)
                    .await
                    .unwrap(),
                Ok(Outcome::Acked)
            );
        } else {
            // Not the 4 s hold (with room for a loaded 2-core machine).
            assert!(took < Duration::from_secs(3), "grace {grace:?}: {took:?}");
            // The ack came after the stop: never reported acked.
            let got = tokio::time::timeout(Duration::from_millis(300), r).await;
            assert!(!matches!(got, Ok(Ok(Outcome::Acked))), "{got:?}");
        }
        a.shutdown().await;
    }
}

/// `Node::shutdown`: the handler grace is there "so their acks and dedup records are
/// not lost with the stop". With `ProtoConfig::ack_delay` (acks held back to batch
/// them), an ack made just before the stop still goes out: the sender's receipt is
/// `Acked` and `ack_durable` returns `Ok`. (Regression: the ack was not due yet when
/// the grace ended, so it never went; `ack_durable` failed with `NodeStopped`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_held_back_by_ack_delay_goes_out_at_shutdown() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut cfg = NodeConfig::default();
    cfg.proto.ack_delay = Duration::from_millis(500);
    let b = Node::builder(B)
        .transport(net.transport(B))
        .config(cfg)
        .build()
        .await
        .unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let a = sender(&net, None).await;
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&1).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    // Past the 20 ms in which a held message is reported (that report would carry an
    // earlier ack with it), well before the sender's first retransmission (200 ms,
    // whose duplicate would be acked at once).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let acked = tokio::spawn(d.ack_durable());
    tokio::time::sleep(Duration::from_millis(20)).await;
    tokio::time::timeout(Duration::from_secs(10), b.shutdown())
        .await
        .unwrap();
    assert_eq!(acked.await.unwrap(), Ok(()), "ack_durable at shutdown");
    let r = tokio::time::timeout(Duration::from_secs(3), receipt).await;
    assert_eq!(
        r.ok(),
        Some(Ok(Outcome::Acked)),
        "the ack made before the stop"
    );
    a.shutdown().await;
}
