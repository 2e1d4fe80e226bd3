//! Black-box audit of documented claims (README.md, RELIABILITY.md, the rustdoc of the
//! public API) that no other suite pins. Public API only, real TCP on 127.0.0.1,
//! default `NodeConfig` unless the claim is about a setting. Each test's doc comment
//! quotes the claim and where it is.
//!
//! Found: `sender()`/`receiver()` still succeeded for a moment after the node had
//! stopped (a second concurrent `shutdown()` could see it); the docs of `Node::health`,
//! `SendError::Rejected` and two dedup defaults said something else than the code. All
//! fixed.

use crate::support;

use ackwire::{
    AckError, ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeError, NodeId, Outcome,
    ReceiverOptions, RejectReason, SendError,
};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn addr() -> SocketAddr {
    support::ports::restartable_addr()
}

/// `f`, or a panic naming `what` after `secs` seconds.
async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {secs} s"))
}

/// `(receiver, sender)` over TCP loopback with the given configs.
async fn pair_with(rid: u64, sid: u64, rcfg: NodeConfig, scfg: NodeConfig) -> (Node, Node) {
    let b = Node::builder(NodeId(rid))
        .bind(addr())
        .allow_peer(NodeId(sid))
        .config(rcfg)
        .build()
        .await
        .expect("receiver builds");
    let a = Node::builder(NodeId(sid))
        .bind(addr())
        .peer(NodeId(rid), b.local_addr().unwrap())
        .config(scfg)
        .build()
        .await
        .expect("sender builds");
    (b, a)
}

async fn pair(rid: u64, sid: u64) -> (Node, Node) {
    pair_with(rid, sid, NodeConfig::default(), NodeConfig::default()).await
}

/// `Delivery::nack` (src/node/handles.rs): "the sender redelivers it soon — at once if
/// the copy was sent more than 100 ms ago, otherwise 100 ms after it (a receiver's
/// nacks cannot make a sender resend one message more than ten times a second)".
/// With the default delivery limit (20), a message nacked at once every time is
/// delivered 20 times, so its 20 deliveries span at least 19 × 100 ms, and it is then
/// dead-lettered (`Rejected { reason: DeadLettered }`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_cannot_make_a_sender_resend_a_message_more_than_ten_times_a_second() {
    for (i, g) in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce]
        .into_iter()
        .enumerate()
    {
        let (b, a) = pair(10 + 2 * i as u64, 11 + 2 * i as u64).await;
        let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
        let out = a
            .sender::<u64>(b.id(), ChannelOptions::new(ChannelId(1), g))
            .unwrap();
        let receipt = out.send(&7).await.unwrap();
        let mut at = Vec::new();
        let res = within(30, "dead letter after 20 nacks", async {
            tokio::select! {
                r = receipt => r,
                _ = async {
                    while let Some(d) = inbox.recv().await {
                        at.push(Instant::now());
                        d.nack();
                    }
                    std::future::pending::<()>().await
                } => unreachable!(),
            }
        })
        .await;
        assert_eq!(
            res,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            }),
            "{g:?}"
        );
        assert_eq!(at.len(), 20, "{g:?}: default max_deliveries is 20");
        let span = at[19] - at[0];
        // 19 gaps of at least 100 ms each; allow 10 % for timer granularity.
        assert!(
            span >= Duration::from_millis(1710),
            "{g:?}: 20 deliveries of one nacked message within {span:?}: more than ten \
             resends a second (gaps: {:?})",
            at.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
        );
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// `Delivery::ack_durable` (src/node/handles.rs): "# Errors ...
/// [`AckError::NodeStopped`] when the node stopped first." A delivery held across its
/// node's shutdown: `ack_durable` must fail `NodeStopped`, not hang and not say `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_durable_after_the_node_stopped_fails_node_stopped() {
    let (b, a) = pair(20, 21).await;
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let _receipt = out.send(&1).await.unwrap();
    let d = within(10, "delivery", inbox.recv()).await.unwrap();
    within(30, "receiver shutdown", b.shutdown()).await;
    let r = within(10, "ack_durable after stop", d.ack_durable()).await;
    assert!(matches!(r, Err(AckError::NodeStopped)), "got {r:?}");
    a.shutdown().await;
}

/// `NodeError::NoTransport` (src/node/error.rs): "The builder has no transport: call
/// `bind` or `transport`."
#[tokio::test]
async fn a_builder_without_a_transport_fails_no_transport() {
    let r = within(10, "build", Node::builder(NodeId(30)).build()).await;
    assert!(
        matches!(r, Err(NodeError::NoTransport)),
        "got {:?}",
        r.err()
    );
}

/// `Node::shutdown` / `Node::sender` / `Node::stats` docs: after shutdown, new sends
/// fail `SendError::Shutdown`, `sender()` and `receiver()` fail `NodeError::Shutdown`,
/// and so do `stats()` and `decommission()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_after_shutdown_fails_shutdown() {
    let (b, a) = pair(40, 41).await;
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    within(30, "shutdown", a.shutdown()).await;
    let s = within(10, "send after shutdown", out.send(&1)).await;
    assert_eq!(s.err(), Some(SendError::Shutdown));
    let t = out.try_send(&1);
    assert_eq!(t.err(), Some(SendError::Shutdown));
    assert!(matches!(
        a.sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(2), Guarantee::AtLeastOnce)
        ),
        Err(NodeError::Shutdown)
    ));
    assert!(matches!(
        a.receiver::<u64>(ChannelId(3), false),
        Err(NodeError::Shutdown)
    ));
    assert!(matches!(
        within(10, "stats", a.stats()).await,
        Err(NodeError::Shutdown)
    ));
    assert!(matches!(
        within(10, "decommission", a.decommission(b.id())).await,
        Err(NodeError::Shutdown)
    ));
    b.shutdown().await;
}

/// `NodeConfig::max_payload`: "Largest payload `send` accepts. Default 4 MiB." and
/// README "Limits, each a typed error ...: payload size (`SendError::TooLarge`)".
/// Exactly 4 MiB is accepted and delivered over default TCP; one byte more is
/// `TooLarge { len, max: 4 MiB }`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_max_payload_is_4_mib_exactly() {
    let (b, a) = pair(50, 51).await;
    let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
    let out = a
        .raw_sender(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let max = 4 << 20;
    let big = bytes::Bytes::from(vec![7u8; max + 1]);
    assert_eq!(
        out.send(big.clone()).await.err(),
        Some(SendError::TooLarge { len: max + 1, max })
    );
    let receipt = out.send(big.slice(..max)).await.unwrap();
    let d = within(30, "4 MiB delivery", inbox.recv()).await.unwrap();
    assert_eq!(d.message().len(), max);
    d.ack();
    assert_eq!(
        within(30, "4 MiB receipt", receipt).await,
        Ok(Outcome::Acked)
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// `NodeConfig::dead_letter_capacity`: "Dead letters kept for `Node::dead_letters`
/// before the oldest is dropped (counted in `Stats::dead_letters_dropped`, logged at
/// warn). Default `10 000`; at most `2^24`." (so 0 is accepted: every letter is
/// dropped, and each is counted). The sender is still told `DeadLettered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_dead_letter_capacity_drops_every_letter_counted() {
    let mut rcfg = NodeConfig::default();
    rcfg.dead_letter_capacity = 0;
    let (b, a) = pair_with(60, 61, rcfg, NodeConfig::default()).await;
    let mut inbox = b
        .receiver_with::<u64>(
            ChannelId(1),
            ReceiverOptions::default().max_deliveries(Some(1)),
        )
        .unwrap();
    let mut dead = b.dead_letters();
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let receipt = out.send(&9).await.unwrap();
    within(10, "delivery", inbox.recv()).await.unwrap().nack();
    assert_eq!(
        within(10, "receipt", receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::DeadLettered
        })
    );
    let stats = b.stats().await.unwrap();
    assert_eq!(stats.dead_letters_dropped, 1, "{stats:?}");
    assert!(dead.try_recv().is_none());
    a.shutdown().await;
    b.shutdown().await;
}

/// `Node::add_peer`: "This node's own id is ignored (with a warning): a node does not
/// connect to itself." A sender to it still fails `SelfPeer`, and the node keeps
/// working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_peer_with_the_nodes_own_id_is_ignored() {
    let (b, a) = pair(70, 71).await;
    a.add_peer(a.id(), b.local_addr().unwrap());
    assert!(matches!(
        a.sender::<u64>(
            a.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce)
        ),
        Err(NodeError::SelfPeer(id)) if id == a.id()
    ));
    assert_eq!(a.health(a.id()), None);
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let receipt = out.send(&3).await.unwrap();
    within(10, "delivery", inbox.recv()).await.unwrap().ack();
    assert_eq!(within(10, "receipt", receipt).await, Ok(Outcome::Acked));
    a.shutdown().await;
    b.shutdown().await;
}

/// `SendError::HandoffRefused` (src/node/error.rs): "Retries ran out (or the target is
/// down) and the message could not be handed off: handoff is off, or the hint store
/// refused it" and `HandoffRefusal::NotEnabled`: "The node has no hint store". The
/// README says instead: without handoff a message whose retries run out fails with
/// `SendError::Deadline`. This pins what happens (Deadline), with handoff off, to a
/// peer that never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_running_out_without_handoff_is_deadline() {
    // A bound but never-accepting address: nothing listens there once dropped.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let a = Node::builder(NodeId(80))
        .bind(addr())
        .peer(NodeId(81), dead)
        .build()
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(81),
            ChannelOptions {
                deadline: Some(Duration::from_secs(1)),
                ..ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce)
            },
        )
        .unwrap();
    let receipt = out.send(&1).await.unwrap();
    let r = within(20, "receipt", receipt).await;
    assert!(matches!(r, Err(SendError::Deadline { .. })), "got {r:?}");
    a.shutdown().await;
}

/// README, dead-letter row: "effectively-once counts the deliveries of every copy of an
/// id together (the same key sent twice counts once towards the limit, and gets one
/// letter), and refuses copies of a dead-lettered id arriving within 2 minutes without
/// a new letter". Two sends under one key, every delivery nacked: 20 deliveries in all
/// (the default limit), one letter, both receipts `DeadLettered`; a third send under
/// the key is refused at once, not delivered, no new letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sent_twice_counts_once_towards_the_delivery_limit_and_gets_one_letter() {
    let (b, a) = pair(90, 91).await;
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let mut dead = b.dead_letters();
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let key = ackwire::IdKey(0xfeed);
    let r1 = out.send_with_key(&1, key).await.unwrap();
    let r2 = out.send_with_key(&1, key).await.unwrap();
    let deliveries = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = deliveries.clone();
    let handler = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            d.nack();
        }
    });
    let rejected = Err(SendError::Rejected {
        reason: RejectReason::DeadLettered,
    });
    assert_eq!(within(30, "first receipt", r1).await, rejected);
    assert_eq!(within(30, "second receipt", r2).await, rejected);
    let letter = within(5, "the letter", dead.recv()).await.unwrap();
    assert_eq!(letter.id, ackwire::MessageId::Key(key));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        deliveries.load(std::sync::atomic::Ordering::SeqCst),
        20,
        "both copies together are delivered max_deliveries times"
    );
    assert!(dead.try_recv().is_none(), "one letter for the two copies");
    let t = Instant::now();
    let r3 = out.send_with_key(&1, key).await.unwrap();
    assert_eq!(within(10, "third receipt", r3).await, rejected);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(deliveries.load(std::sync::atomic::Ordering::SeqCst), 20);
    assert!(
        dead.try_recv().is_none(),
        "no new letter for a refused copy"
    );
    handler.abort();
    a.shutdown().await;
    b.shutdown().await;
}

/// `ReceiverOptions::max_deliveries`: "`Some(0)` is refused." — typed, naming the field.
#[tokio::test]
async fn a_delivery_limit_of_zero_is_refused_typed() {
    let b = Node::builder(NodeId(100))
        .bind(addr())
        .build()
        .await
        .unwrap();
    let r = b.receiver_with::<u64>(
        ChannelId(1),
        ReceiverOptions::default().max_deliveries(Some(0)),
    );
    match r {
        Err(NodeError::Config(e)) => assert_eq!(e.field(), "max_deliveries", "{e}"),
        other => panic!("expected a ConfigError, got {:?}", other.err()),
    }
    // The channel is still free for a valid receiver.
    assert!(b.receiver::<u64>(ChannelId(1), false).is_ok());
    b.shutdown().await;
}

/// `Node::health` said: "The failure detector's view of `peer` (`None` until it has
/// been heard from ...)". FALSE before the doc fix in this commit: a peer given to
/// `NodeBuilder::peer` that never answers is `Some(Up)` at once, then Suspect, then
/// Down (the detector watches a configured peer "as if heard from" at build time). The
/// doc now says so; this pins the behaviour the doc describes: never `None`, starts
/// `Up`, Down within a few seconds, and a peer never configured is `None`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_of_a_configured_peer_never_heard_from() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let a = Node::builder(NodeId(110))
        .bind(addr())
        .peer(NodeId(111), dead)
        .build()
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..40 {
        let h = a.health(NodeId(111));
        if seen.last() != Some(&h) {
            seen.push(h);
        }
        if h == Some(ackwire::detector::Health::Down) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    use ackwire::detector::Health::{Down, Up};
    assert_eq!(seen.first(), Some(&Some(Up)), "{seen:?}");
    assert_eq!(seen.last(), Some(&Some(Down)), "{seen:?}");
    assert!(!seen.contains(&None), "{seen:?}");
    assert_eq!(a.health(NodeId(112)), None);
    a.shutdown().await;
}

/// `Node::protocol_version`: "`None` before the first one"; README "Upgrading": this
/// build speaks 1..=5 and "each connection uses the highest version both ends speak".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_current_nodes_speak_protocol_5() {
    let (b, a) = pair(120, 121).await;
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = out.send(&1).await.unwrap();
    within(10, "delivery", inbox.recv()).await.unwrap().ack();
    assert_eq!(within(10, "receipt", r).await, Ok(Outcome::Acked));
    assert_eq!(a.protocol_version(b.id()), Some(5));
    assert_eq!(b.protocol_version(a.id()), Some(5));
    assert_eq!(a.protocol_version(NodeId(999)), None);
    a.shutdown().await;
    b.shutdown().await;
}

/// `Node::shutdown`: "Every call waits for the stop, also one made while another is in
/// progress." Two concurrent calls: when either returns, the node is stopped
/// (`closed()` resolves at once, new senders fail `Shutdown`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_shutdown_also_waits_for_the_stop() {
    for i in 0..5u64 {
        second_concurrent_shutdown(130 + 2 * i, 131 + 2 * i).await;
    }
}

async fn second_concurrent_shutdown(rid: u64, sid: u64) {
    let (b, a) = pair(rid, sid).await;
    // Something to drain: an unacked message holds the drain up to its 5 s default.
    let _inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let _r = out.send(&1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = std::sync::Arc::new(a);
    let a1 = a.clone();
    let first = tokio::spawn(async move { a1.shutdown().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    within(30, "second shutdown", a.shutdown()).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), a.closed())
            .await
            .is_ok(),
        "the second shutdown returned before the node stopped"
    );
    assert!(matches!(
        a.sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(2), Guarantee::AtLeastOnce)
        ),
        Err(NodeError::Shutdown)
    ));
    within(30, "first shutdown", first).await.unwrap();
    b.shutdown().await;
}

/// `Delivery::into_parts` / `DeliveryHandle`: "Dropping it unfinished is a nack." The
/// message comes back, and the sender's receipt is `Acked` once the redelivery is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_handle_is_a_nack() {
    let (b, a) = pair(140, 141).await;
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let r = out.send(&5).await.unwrap();
    let (v, handle) = within(10, "delivery", inbox.recv())
        .await
        .unwrap()
        .into_parts();
    assert_eq!(v, 5);
    drop(handle);
    let d = within(10, "redelivery", inbox.recv()).await.unwrap();
    assert_eq!(*d.message(), 5);
    d.ack();
    assert_eq!(within(10, "receipt", r).await, Ok(Outcome::Acked));
    a.shutdown().await;
    b.shutdown().await;
}

/// README "Known limits": "A frame over the receiver's limit from a peer past the
/// handshake is read past and dropped, counted in `frames_skipped_too_large` and warned
/// once per connection; the connection and every other channel on it carry on. The
/// sender is not told: an acked message fails at its deadline (`SendError::Deadline`)".
/// No other test reads `frames_skipped_too_large`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_after_the_handshake_is_skipped_and_counted() {
    use ackwire::transport::tcp::TcpConfig;
    let tcp = TcpConfig {
        max_frame_len: 64 << 10,
        ..TcpConfig::default()
    };
    let mut rcfg = NodeConfig::default();
    rcfg.max_payload = (64 << 10) - 128;
    let b = Node::builder(NodeId(150))
        .tcp(addr(), tcp)
        .allow_peer(NodeId(151))
        .config(rcfg)
        .build()
        .await
        .unwrap();
    let a = Node::builder(NodeId(151))
        .bind(addr())
        .peer(NodeId(150), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let mut small_rx = b.receiver::<u64>(ChannelId(2), false).unwrap();
    let mut big_rx = b.raw_receiver(ChannelId(1), false).unwrap();
    let small = a
        .sender::<u64>(
            b.id(),
            ChannelOptions::new(ChannelId(2), Guarantee::AtLeastOnce),
        )
        .unwrap();
    // Warm up: the connection is handshaken.
    let r = small.send(&0).await.unwrap();
    within(10, "warm-up", small_rx.recv()).await.unwrap().ack();
    assert_eq!(within(10, "warm-up receipt", r).await, Ok(Outcome::Acked));
    let opened = b.tcp_stats().unwrap().connections_opened;
    let big = a
        .raw_sender(
            b.id(),
            ChannelOptions {
                deadline: Some(Duration::from_secs(2)),
                ..ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce)
            },
        )
        .unwrap();
    let big_r = big
        .send(bytes::Bytes::from(vec![7u8; 100 << 10]))
        .await
        .unwrap();
    // Another channel on the same connection carries on meanwhile.
    for v in 1..=20u64 {
        let r = small.send(&v).await.unwrap();
        let d = within(10, "small delivery", small_rx.recv()).await.unwrap();
        assert_eq!(*d.message(), v);
        d.ack();
        assert_eq!(within(10, "small receipt", r).await, Ok(Outcome::Acked));
    }
    let big_o = within(20, "oversize receipt", big_r).await;
    assert!(
        matches!(big_o, Err(SendError::Deadline { .. })),
        "got {big_o:?}"
    );
    assert!(big_rx.try_recv_none(), "the oversize message was delivered");
    let s = b.tcp_stats().unwrap();
    assert!(s.frames_skipped_too_large >= 1, "{s:?}");
    assert_eq!(s.rejected_too_large, 0, "{s:?}");
    assert_eq!(
        s.connections_opened, opened,
        "the connection was cut: {s:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

trait TryRecvNone {
    fn try_recv_none(&mut self) -> bool;
}

impl TryRecvNone for ackwire::RawReceiver {
    fn try_recv_none(&mut self) -> bool {
        use futures::FutureExt;
        self.recv().now_or_never().is_none()
    }
}

/// `TcpConfig` defaults: "`backoff_min`: 50 ms, `backoff_max`: 5 s (redial delay
/// doubles per failed attempt between these bounds; each delay is drawn uniformly from
/// its upper half)". A configured peer whose address refuses connections: in the first
/// 10 s the delays 25–50, 50–100, … ms reach the 2.5–5 s cap after 7 doublings, so
/// 7–11 attempts; in the next 10 s at the cap, 2–4 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redials_back_off_from_50_ms_to_5_s() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let a = Node::builder(NodeId(160))
        .bind(addr())
        .peer(NodeId(161), dead)
        .build()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let f10 = a.tcp_stats().unwrap().connect_failures;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let f20 = a.tcp_stats().unwrap().connect_failures;
    assert!(
        (6..=12).contains(&f10),
        "{f10} failed dials in the first 10 s"
    );
    assert!(
        (1..=5).contains(&(f20 - f10)),
        "{} failed dials in the next 10 s (at the 5 s cap: 2-4)",
        f20 - f10
    );
    a.shutdown().await;
}

/// `Node::shutdown`: "Every call waits for the stop, also one made while another is in
/// progress", and README: "A directory held by a live node fails with `InUse`". When
/// the second of two concurrent `shutdown()` calls returns, the node has stopped, so a
/// new run of it opens the same durable-dedup directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_second_concurrent_shutdown_returns_the_directory_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = NodeConfig::default();
        c.dedup.durable = Some(ackwire::dedup::DurableDedup::new(dir.path()));
        c
    };
    for round in 0..8 {
        let a = std::sync::Arc::new(
            Node::builder(NodeId(170))
                .bind("127.0.0.1:0".parse().unwrap())
                .config(cfg())
                .build()
                .await
                .unwrap_or_else(|e| panic!("round {round}: the directory is not free: {e}")),
        );
        let a1 = a.clone();
        let first = tokio::spawn(async move { a1.shutdown().await });
        tokio::task::yield_now().await;
        within(30, "second shutdown", a.shutdown()).await;
        // No wait here: the second call has returned, so the node has stopped.
        let again = Node::builder(NodeId(170))
            .bind("127.0.0.1:0".parse().unwrap())
            .config(cfg())
            .build()
            .await;
        match again {
            Ok(n) => n.shutdown().await,
            Err(e) => panic!("round {round}: after shutdown() returned, build failed: {e}"),
        }
        within(30, "first shutdown", first).await.unwrap();
    }
}
