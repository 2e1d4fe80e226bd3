//! A node that dials a peer which does not admit it (plain TCP, the receiver has no
//! `allow_peer` / `peer` for it) must see the dial fail, not succeed: the peer goes
//! Down, sends fail at once with `SendError::PeerDown`, and it redials with a growing
//! backoff. Once the receiver admits it, it reconnects and delivers.
//!
//! Regression: the accepting side wrote its own handshake before it read (and refused)
//! the dialer's claim, so the refused dialer had a complete handshake. It reported the
//! peer `Up` for ever, redialed ~23 times a second, and its messages waited for their
//! deadline instead of failing with `PeerDown`. Real TCP on loopback, default
//! `NodeConfig`.

#[path = "support/ports.rs"]
mod ports;

use ackwire::detector::Health;
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome, SendError};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};

const RECEIVER: NodeId = NodeId(7_101);
const SENDER: NodeId = NodeId(7_102);
const CH: ChannelId = ChannelId(1);

async fn receiver(addr: SocketAddr, admit: bool) -> Node {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut b = Node::builder(RECEIVER).bind(addr);
        if admit {
            b = b.allow_peer(SENDER);
        }
        match b.build().await {
            Ok(n) => return n,
            // A restart on the port of a node just stopped: retry until it is free.
            Err(e) if Instant::now() < deadline => {
                eprintln!("receiver build: {e}; retrying");
                sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("receiver does not build on {addr}: {e}"),
        }
    }
}

async fn sender(to: SocketAddr) -> Node {
    Node::builder(SENDER)
        .bind("127.0.0.1:0".parse().unwrap())
        .peer(RECEIVER, to)
        .build()
        .await
        .expect("sender builds")
}

/// Poll the sender's view of the receiver every 20 ms for `window`, and fail if the
/// peer is ever reported Up again by the detector (a transition to Up), or if it is
/// not Down by the end of the window and from then on. Returns when it first was Down.
async fn assert_goes_down_and_stays_down(node: &Node, window: Duration) -> Duration {
    let mut events = node.health_events();
    let started = Instant::now();
    let mut down_at = None;
    let mut seen = Vec::new();
    while started.elapsed() < window {
        let h = node.health(RECEIVER);
        if seen.last() != Some(&h) {
            seen.push(h);
        }
        match (h, down_at) {
            (Some(Health::Down), None) => down_at = Some(started.elapsed()),
            (Some(Health::Down), Some(_)) => {}
            (other, Some(at)) => {
                panic!("Down after {at:?}, then {other:?}; sequence {seen:?}")
            }
            _ => {}
        }
        while let Ok(change) = events.try_recv() {
            assert!(
                !(change.peer == RECEIVER && change.to == Health::Up),
                "a refused connection made the receiver Up: {change:?}; sequence {seen:?}"
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    let tcp = node.tcp_stats().unwrap();
    down_at.unwrap_or_else(|| {
        panic!(
            "the receiver that refuses us is not Down after {window:?}: sequence {seen:?}, \
             sender tcp {tcp:?}"
        )
    })
}

/// A receiver that does not admit the sender: the sender holds it Down within 5 s
/// (never Up), a send fails at once with `PeerDown`, and the sender dials a handful of
/// times, not ~20 times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_the_receiver_does_not_admit_sees_it_down_and_fails_fast() {
    let addr = ports::restartable_addr();
    let r = receiver(addr, false).await;
    let s = sender(addr).await;
    let window = Duration::from_secs(5);
    let down_at = assert_goes_down_and_stays_down(&s, window).await;
    eprintln!("Down after {down_at:?}");

    let tx = s
        .sender::<u64>(RECEIVER, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let t = Instant::now();
    let res = timeout(Duration::from_secs(3), async {
        match tx.send(&1).await {
            Err(e) => Err(e),
            Ok(receipt) => receipt.await,
        }
    })
    .await;
    assert!(
        matches!(res, Ok(Err(SendError::PeerDown { .. }))),
        "a send to a peer that refuses us gave {res:?} after {:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "not at once: {:?}",
        t.elapsed()
    );

    let rs = r.tcp_stats().unwrap();
    let ss = s.tcp_stats().unwrap();
    // The dial backs off (50 ms doubling up to 5 s): ~8 attempts in 5 s.
    assert!(
        rs.rejected_unknown_peer >= 1 && rs.rejected_unknown_peer < 30,
        "receiver refused {} connections in ~5 s; receiver {rs:?}",
        rs.rejected_unknown_peer
    );
    assert_eq!(rs.connections_opened, 0, "receiver {rs:?}");
    assert_eq!(
        ss.connections_opened, 0,
        "sender kept a refused connection: {ss:?}"
    );
    assert!(ss.handshakes_failed >= 1, "sender {ss:?}");
    assert_eq!(
        ss.handshakes_failed, ss.rejected_handshake_timeout,
        "each refused dial is counted once, as a handshake the peer closed: {ss:?}"
    );
    s.shutdown().await;
    r.shutdown().await;
}

/// Once the receiver admits the sender (it restarts on the same address with
/// `allow_peer`), the sender reconnects and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_admitted_the_refused_sender_reconnects_and_delivers() {
    let addr = ports::restartable_addr();
    let r = receiver(addr, false).await;
    let s = sender(addr).await;
    assert_goes_down_and_stays_down(&s, Duration::from_secs(5)).await;
    r.shutdown().await;
    drop(r);

    let r = receiver(addr, true).await;
    let mut rx = r.receiver::<u64>(CH, false).unwrap();
    let tx = s
        .sender::<u64>(RECEIVER, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    // The sender redials within its backoff (at most 5 s) and the detector hears the
    // receiver again; until then sends fail fast with PeerDown, as an application sees.
    let started = Instant::now();
    let receipt = loop {
        match tx.send(&42).await {
            Ok(receipt) => break receipt,
            Err(SendError::PeerDown { .. }) if started.elapsed() < Duration::from_secs(20) => {
                sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!(
                "no send accepted {:?} after the receiver admitted us: {e:?}; health {:?}, \
                 sender tcp {:?}",
                started.elapsed(),
                s.health(RECEIVER),
                s.tcp_stats()
            ),
        }
    };
    let d = timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("delivered within 10 s")
        .expect("receiver open");
    assert_eq!(*d.message(), 42);
    d.ack();
    let outcome = timeout(Duration::from_secs(10), receipt)
        .await
        .expect("receipt");
    assert_eq!(outcome, Ok(Outcome::Acked));
    assert_eq!(s.health(RECEIVER), Some(Health::Up));
    s.shutdown().await;
    r.shutdown().await;
}

/// Warn-level events, captured process-wide (the transport logs from its own tasks).
mod warns {
    use std::fmt::Write as _;
    use std::sync::{Mutex, OnceLock};

    static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Fields(String);

    impl tracing::field::Visit for Fields {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            let _ = write!(self.0, "{}={:?} ", field.name(), value);
        }
    }

    struct Capture;

    impl tracing::Subscriber for Capture {
        fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
            *m.level() <= tracing::Level::WARN
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            let mut f = Fields(String::new());
            e.record(&mut f);
            EVENTS.lock().unwrap().push(f.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Start capturing (once per process).
    pub(super) fn capture() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            let _ = tracing::subscriber::set_global_default(Capture);
        });
    }

    /// The captured warn (and error) events that contain every one of `parts`.
    pub(super) fn matching(parts: &[&str]) -> Vec<String> {
        let events = EVENTS.lock().unwrap();
        events
            .iter()
            .filter(|e| parts.iter().all(|p| e.contains(p)))
            .cloned()
            .collect()
    }
}

/// Neither side is silent: the refusing node warns (rate-limited) with the refused id
/// and how to admit it; the refused dialer warns (rate-limited) that the peer closed
/// the connection during the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_warn_about_the_refusal_rate_limited() {
    warns::capture();
    const R: NodeId = NodeId(7_201);
    const S: NodeId = NodeId(7_202);
    let r = Node::builder(R)
        .bind(ports::restartable_addr())
        .build()
        .await
        .unwrap();
    let addr = r.local_addr().unwrap();
    let s = Node::builder(S)
        .bind("127.0.0.1:0".parse().unwrap())
        .peer(R, addr)
        .build()
        .await
        .unwrap();
    sleep(Duration::from_secs(5)).await;
    let refused = r.tcp_stats().unwrap().rejected_unknown_peer;
    let receiver_side = warns::matching(&[&format!("peer={S}"), "allow_peer"]);
    let sender_side = warns::matching(&[
        &format!("peer={R}"),
        "closed the connection during the handshake",
    ]);
    assert!(refused >= 2, "refused {refused}");
    assert_eq!(
        receiver_side.len(),
        1,
        "the refusing node warns once per 10 s ({refused} refused): {receiver_side:#?}"
    );
    assert_eq!(
        sender_side.len(),
        1,
        "the refused dialer warns once per 30 s: {sender_side:#?}"
    );
    s.shutdown().await;
    r.shutdown().await;
}
