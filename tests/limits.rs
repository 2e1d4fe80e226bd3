//! Resource limits: each is enforced with a typed error or a counted drop, and a peer
//! that misbehaves does not disturb the others. Each test prints a `reliability:` line.

#[path = "support/ports.rs"]
mod ports;
use ackwire::handoff::HintError;
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::transport::tcp::{TcpConfig, TcpTransport};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, Node, NodeConfig, NodeId, Outcome,
    SendError,
};
use std::time::Duration;

fn report(fault: &str, runs: &str, held: &str) {
    println!("reliability: limits | {fault} | {runs} | {held}");
}
use tokio::io::AsyncWriteExt;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

async fn node(net: &MemNetwork, id: NodeId, cfg: NodeConfig) -> Node {
    Node::builder(id)
        .transport(net.transport(id))
        .config(cfg)
        .build()
        .await
        .unwrap()
}

/// Max in-flight per stream: `try_send` on a full window fails with `WindowFull`.
#[tokio::test(start_paused = true)]
async fn full_window_is_a_typed_error_for_try_send() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut cfg = NodeConfig::default();
    cfg.proto.max_in_flight = 4;
    let a = node(&net, A, cfg.clone()).await;
    let b = node(&net, B, cfg).await;
    let mut inbox = b.receiver::<u8>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u8>(B, ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce))
        .unwrap();
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(out.try_send(&i).unwrap());
    }
    assert!(matches!(
        out.try_send(&4),
        Err(SendError::WindowFull { window: 4 })
    ));
    for _ in 0..4 {
        inbox.recv().await.unwrap().ack();
    }
    for r in held {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    assert!(out.try_send(&5).is_ok(), "window reopened after acks");
    report(
        "window full (max in-flight per stream)",
        "1 run",
        "try_send -> SendError::WindowFull; send waits",
    );
}

/// Receiver credit: while the application is busy, a stream never has more than its
/// credit outstanding at the receiver; the sender waits (counted) instead of the
/// receiver refusing anything; once the application catches up every message is
/// processed once — for every guarantee, at-most-once included (which loses nothing).
#[tokio::test(start_paused = true)]
async fn credit_holds_senders_back_while_the_application_is_busy() {
    const N: u32 = 2_000;
    const CREDIT: u64 = 256;
    for (i, g) in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let net = MemNetwork::new(FaultPlan::default()).unwrap();
        let mut cfg = NodeConfig::default();
        cfg.proto.stream_credit = CREDIT;
        let (a_id, b_id) = (NodeId(10 + 2 * i as u64), NodeId(11 + 2 * i as u64));
        let a = node(&net, a_id, NodeConfig::default()).await;
        let b = node(&net, b_id, cfg).await;
        let mut inbox = b.receiver::<u32>(ChannelId(1), false).unwrap();
        let out = a
            .sender::<u32>(b_id, ChannelOptions::new(ChannelId(1), g))
            .unwrap();
        let sending = tokio::spawn(async move {
            let mut receipts = Vec::new();
            for v in 0..N {
                receipts.push(out.send(&v).await.unwrap());
            }
            receipts
        });
        tokio::time::sleep(Duration::from_secs(2)).await; // the application is busy
        let delivered = b.stats().await.unwrap().proto.delivered;
        assert!(
            delivered <= CREDIT,
            "{g:?}: {delivered} messages handed out with a credit of {CREDIT}"
        );
        assert!(delivered > 0, "{g:?}: nothing arrived at all");
        let mut seen = std::collections::HashSet::new();
        while seen.len() < N as usize {
            let d = tokio::time::timeout(Duration::from_secs(30), inbox.recv())
                .await
                .unwrap_or_else(|_| panic!("{g:?}: stalled at {}", seen.len()))
                .unwrap();
            assert!(seen.insert(*d.message()), "{g:?}: processed twice");
            d.ack();
        }
        for r in sending.await.unwrap() {
            assert!(r.await.is_ok(), "{g:?}");
        }
        let sa = a.stats().await.unwrap().proto;
        let sb = b.stats().await.unwrap().proto;
        assert!(sa.credit_waits > 0, "{g:?}: the sender never waited");
        if g == Guarantee::AtMostOnce {
            assert_eq!(sa.retransmitted, 0, "{g:?}");
        }
        // (At-least-once and effectively-once retransmit what the busy application
        // holds past the RTO: an ack means "processed", so the sender cannot tell a
        // held message from a lost one. The receiver drops those as in progress.)
        assert_eq!(sb.credit_exceeded + sb.deliveries_refused, 0, "{g:?}");
        report(
            &format!("receiver credit ({g:?})"),
            "1 run",
            &format!(
                "<= {CREDIT} outstanding while busy; {} sender waits; all {N} processed once, none refused",
                sa.credit_waits
            ),
        );
    }
}

/// Max streams per peer: while the peer's streams all owe something (a message in the
/// application), frames opening more are dropped and counted, and the existing streams
/// keep working; once one is idle it makes room (recycled, counted) and the new
/// channel is served. (Regression: streams of a live peer were never dropped, so
/// a sender that used more channels than the limit had every further one refused.)
#[tokio::test(start_paused = true)]
async fn streams_per_peer_are_bounded() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut bcfg = NodeConfig::default();
    bcfg.proto.max_streams_per_peer = 2;
    let mut acfg = NodeConfig::default();
    acfg.proto.retry.deadline = Some(Duration::from_secs(20));
    let a = node(&net, A, acfg).await;
    let b = node(&net, B, bcfg).await;
    let mut inboxes = Vec::new();
    for c in 1..=3 {
        inboxes.push(b.receiver::<u8>(ChannelId(c), false).unwrap());
    }
    let sender = |c: u32| {
        a.sender::<u8>(B, ChannelOptions::new(ChannelId(c), Guarantee::AtLeastOnce))
            .unwrap()
    };
    // Channels 1 and 2 open the peer's two streams, each with a message held in the
    // application...
    let mut held = Vec::new();
    let mut first = Vec::new();
    for (c, inbox) in (1..=2).zip(inboxes.iter_mut()) {
        first.push(sender(c).send(&(c as u8)).await.unwrap());
        held.push(inbox.recv().await.unwrap());
    }
    // ...so a third is refused for now.
    let third = sender(3).send(&3).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = b.stats().await.unwrap().proto;
    assert!(st.streams_refused > 0, "{st:?}");
    assert_eq!(st.streams_recycled, 0, "{st:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(10), inboxes[2].recv())
            .await
            .is_err(),
        "channel 3 was served while both streams were busy"
    );
    // The held messages finish: their streams are idle and make room.
    for d in held {
        d.ack();
    }
    for r in first {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    let d = inboxes[2].recv().await.unwrap();
    assert_eq!(*d.message(), 3);
    d.ack();
    assert_eq!(third.await, Ok(Outcome::Acked));
    // Channel 1's stream was dropped for it; its next message makes it again.
    let again = sender(1).send(&9).await.unwrap();
    let d = inboxes[0].recv().await.unwrap();
    assert_eq!(*d.message(), 9);
    d.ack();
    assert_eq!(again.await, Ok(Outcome::Acked));
    let st = b.stats().await.unwrap().proto;
    assert!(st.streams_recycled >= 1, "{st:?}");
    report(
        "max streams per peer exceeded",
        "1 run",
        &format!(
            "{} frames dropped and counted while every stream was busy; {} idle streams recycled once they finished",
            st.streams_refused, st.streams_recycled
        ),
    );
}

/// Max hint bytes per target: once full, further hand-offs fail with a typed error
/// naming the limit.
#[tokio::test(start_paused = true)]
async fn hint_bytes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut cfg = NodeConfig::default();
    let mut h = HandoffConfig::new(dir.path());
    h.store.segment_bytes = 4096;
    h.store.max_bytes_per_target = 8192;
    h.store.max_total_bytes = 8192;
    cfg.handoff = Some(h);
    let a = node(&net, A, cfg).await;
    let _b = node(&net, B, NodeConfig::default()).await;
    let out = a
        .raw_sender(B, ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce))
        .unwrap();
    net.isolate(B);
    // B was never heard from, so messages reach the store when their retries run out.
    let mut handed = 0;
    let mut refused = 0;
    let mut receipts = Vec::new();
    for _ in 0..30 {
        receipts.push(out.send(bytes::Bytes::from(vec![1u8; 512])).await.unwrap());
    }
    for r in receipts {
        match r.await {
            Ok(Outcome::HandedOff) => handed += 1,
            Err(SendError::HandoffRefused { reason }) => {
                assert!(
                    matches!(
                        reason.hint_error(),
                        Some(HintError::TargetFull { .. } | HintError::StoreFull { .. })
                    ),
                    "{reason:?}"
                );
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        handed > 0 && refused > 0,
        "handed {handed} refused {refused}"
    );
    let stats = a.stats().await.unwrap();
    assert_eq!(stats.handoff_refused, refused);
    assert!(stats.hints.unwrap().refused_full >= refused);
    report(
        "hint store byte limit reached",
        "1 run",
        &format!("{handed} stored, {refused} refused with SendError::HandoffRefused and counted"),
    );
}

/// A TCP peer that sends garbage or a wrong protocol version is disconnected with a
/// counted reason, and a good peer of the same node is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_wrong_version_peers_do_not_disturb_good_ones() {
    // B never dials A: it admits A explicitly (plain TCP refuses unknown peers).
    let transport = TcpTransport::new(ports::restartable_addr(), TcpConfig::default())
        .unwrap()
        .allow_peer(A);
    let tcp_stats = transport.stats();
    let b = Node::builder(B).transport(transport).build().await.unwrap();
    let addr = b.local_addr().unwrap();
    let a = Node::builder(A)
        .bind(ports::restartable_addr())
        .peer(B, addr)
        .build()
        .await
        .unwrap();
    let mut inbox = b.receiver::<u32>(ChannelId(1), false).unwrap();
    let consumer = tokio::spawn(async move {
        let mut n = 0;
        while let Some(d) = inbox.recv().await {
            d.ack();
            n += 1;
        }
        n
    });
    // Bad peers: HTTP garbage, then a frame with a huge length, then random bytes.
    let mut bad = Vec::new();
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 1, 2, 3],
        (0..200u32).map(|i| (i * 37 % 251) as u8).collect(),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&junk).await.unwrap();
        bad.push(s);
    }
    let out = a
        .sender::<u32>(B, ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..1000 {
        receipts.push(out.send(&i).await.unwrap());
    }
    for r in receipts {
        assert_eq!(r.await, Ok(Outcome::Acked));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = tcp_stats.snapshot();
    let rejected = s.rejected_bad_checksum
        + s.rejected_malformed
        + s.rejected_too_large
        + s.rejected_unsupported_version
        + s.rejected_unexpected_frame;
    assert!(rejected >= 3, "{s:?}");
    b.shutdown().await;
    assert_eq!(consumer.await.unwrap(), 1000);
    report(
        "TCP peers sending garbage / oversize length / random bytes",
        "3 bad peers",
        &format!("{rejected} disconnects with counted reason; good peer's 1000 messages all acked"),
    );
}
