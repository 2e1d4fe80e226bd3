//! Black-box operations tests: churn and the operator's view over time. Public API
//! only (README.md, rustdoc), real TCP on loopback, default configuration unless a test
//! says otherwise: peers added at runtime, peers that connect on their own, a peer
//! replaced by a new process on a new port, a peer decommissioned, a peer that never
//! comes back; counters after scripted scenarios; many sender incarnations of one id;
//! a slow handler on one channel next to busy ones; shutdown under load.
//!
//! Found when written (each failed on the commit it was written against; fixed since):
//! - `a_decommissioned_peer_added_again_is_not_stuck_down`,
//!   `decommissioned_hints_are_dropped_counted_and_never_replayed`: after
//!   `decommission(p)`, a process with id `p` that comes back and is added again with
//!   `add_peer` stays `Health::Down` in `Node::health` for good (no health event
//!   either), although it is connected and acking; without handoff every send to it
//!   fails at once with `SendError::PeerDown` (fail-fast reads that stale state).
//! - `a_cleanly_restarted_sender_is_not_an_identity_conflict`: a sender rebuilt with the
//!   same id right after its previous run's `shutdown()` returned is refused by the
//!   receiver as a second live incarnation (an `IdentityConflict` event and
//!   `rejected_duplicate_node` for most restarts), and its first messages are
//!   retransmitted after the redial. A gap of 5 ms between the runs hid it. (Fixed:
//!   a connection from a new incarnation waits up to 50 ms for the old one's end.)

use crate::support::ports;
use ackwire::detector::{Health, HealthChange};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, IdKey, Node, NodeConfig, NodeError,
    NodeId, Outcome, Receipt, Receiver, RejectReason, SendError, Stats,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

async fn within<F: std::future::Future>(secs: f64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs_f64(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

async fn settle(
    receipts: Vec<(u64, Receipt)>,
    secs: f64,
) -> Vec<(u64, Result<Outcome, SendError>)> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut out = Vec::new();
    for (v, r) in receipts {
        match tokio::time::timeout_at(deadline, r).await {
            Ok(res) => out.push((v, res)),
            Err(_) => panic!("receipt of message {v} did not resolve within {secs} s"),
        }
    }
    out
}

async fn wait_until(secs: f64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not reached within {secs} s");
}

async fn wait_health(node: &Node, peer: NodeId, want: Health, secs: f64) -> Duration {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if node.health(peer) == Some(want) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{peer} never became {want:?} within {secs} s (is {:?})",
        node.health(peer)
    );
}

/// Whether `node` sees `peer` as `want` within `secs`.
async fn health_within(node: &Node, peer: NodeId, want: Health, secs: f64) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if node.health(peer) == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Records every delivery and acks it, after `delay` if any.
fn consume(mut inbox: Receiver<u64>, seen: Seen, delay: Option<Duration>) {
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            if let Some(t) = delay {
                tokio::time::sleep(t).await;
            }
            *seen.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    });
}

fn seen() -> Seen {
    Arc::new(Mutex::new(HashMap::new()))
}

fn total(s: &Seen) -> u64 {
    s.lock().unwrap().values().map(|&c| u64::from(c)).sum()
}

fn distinct(s: &Seen) -> usize {
    s.lock().unwrap().len()
}

fn handoff_cfg(dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.handoff = Some(HandoffConfig::new(dir));
    c
}

fn drain_events(rx: &mut tokio::sync::broadcast::Receiver<HealthChange>) -> Vec<HealthChange> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(e) => out.push(e),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return out,
        }
    }
}

const CH: ChannelId = ChannelId(1);
const CH2: ChannelId = ChannelId(2);

// -------------------------------------------------------------------------------------
// Peers joining at runtime
// -------------------------------------------------------------------------------------

/// `Node::add_peer`: "Learn where `peer` is (TCP); the failure detector watches it from
/// now on". `Node::sender`: "Fails with `NodeError::UnknownPeer` for a peer this node
/// does not know". `Node::health`: "`None` until it has been heard from".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_added_at_runtime_becomes_sendable_and_watched() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got = seen();
    consume(b.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .build()
        .await
        .unwrap();
    let mut events = a.health_events();

    let before = a.sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce));
    assert!(
        matches!(before, Err(NodeError::UnknownPeer(NodeId(2)))),
        "sender before add_peer: {:?}",
        before.err()
    );
    assert_eq!(
        a.health(NodeId(2)),
        None,
        "health of a peer never heard from"
    );

    a.add_peer(NodeId(2), b.local_addr().unwrap());
    let out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .expect("sender after add_peer");
    let mut receipts = Vec::new();
    for v in 0..50u64 {
        receipts.push((v, within(5.0, "send", out.send(&v)).await.unwrap()));
    }
    for (v, r) in settle(receipts, 10.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "message {v}");
    }
    assert_eq!(distinct(&got), 50);
    wait_health(&a, NodeId(2), Health::Up, 5.0).await;
    // Watching it: no transition away from Up on a healthy link for 2.5 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let evs = drain_events(&mut events);
    assert!(
        evs.iter().all(|e| e.to != Health::Down),
        "a healthy runtime-added peer went Down: {evs:?}"
    );
    assert_eq!(a.health(NodeId(2)), Some(Health::Up));
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// `NodeConfig::allow_dynamic_peers` doc: "a sender is only made for a peer given to
/// `NodeBuilder::peer` or `Node::add_peer`, a peer that has connected to this node, …
/// any other id fails with `NodeError::UnknownPeer`". A node that accepts unknown peers
/// answers one that connected to it, also a new incarnation of it on a new port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_connected_can_be_answered_also_after_it_is_replaced() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .accept_unknown_peers(true)
        .build()
        .await
        .unwrap();
    let b_addr = b.local_addr().unwrap();
    let got_b = seen();
    consume(b.receiver::<u64>(CH, false).unwrap(), got_b.clone(), None);
    let before = b.sender::<u64>(NodeId(1), ChannelOptions::new(CH, Guarantee::AtLeastOnce));
    assert!(
        matches!(before, Err(NodeError::UnknownPeer(NodeId(1)))),
        "sender to a peer that never connected: {:?}",
        before.err()
    );

    for round in 0..2u64 {
        let a = Node::builder(NodeId(1))
            .bind(any_addr())
            .peer(NodeId(2), b_addr)
            .build()
            .await
            .unwrap();
        let got_a = seen();
        consume(a.receiver::<u64>(CH, false).unwrap(), got_a.clone(), None);
        let out = a
            .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
            .unwrap();
        let r = within(5.0, "send", out.send(&(100 + round))).await.unwrap();
        assert_eq!(within(10.0, "a->b receipt", r).await, Ok(Outcome::Acked));

        let back = b
            .sender::<u64>(NodeId(1), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
            .expect("a sender to a peer that has connected");
        let r = within(5.0, "send back", back.send(&(200 + round)))
            .await
            .unwrap();
        assert_eq!(
            within(12.0, "b->a receipt", r).await,
            Ok(Outcome::Acked),
            "round {round}: the answer to the connected peer"
        );
        assert_eq!(
            distinct(&got_a),
            1,
            "round {round}: incarnation got its answer"
        );
        within(10.0, "shutdown a", a.shutdown()).await;
    }
    assert_eq!(distinct(&got_b), 2);
    within(10.0, "shutdown b", b.shutdown()).await;
}

// -------------------------------------------------------------------------------------
// A peer replaced, decommissioned, gone for good
// -------------------------------------------------------------------------------------

/// `HandoffConfig::on_down`: "When the failure detector declares a target Down, move its
/// unacknowledged messages to the hint store, and store new messages for it directly."
/// `Outcome::HandedOff`: "will be replayed, under its original ID, when the target is
/// back". The target comes back as a new process on a new port (same id, `add_peer`
/// with the new address): every hint is processed exactly once, the counters say so,
/// and the health events show Down then Up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_replaced_on_a_new_port_gets_its_hints_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got1 = seen();
    consume(b1.receiver::<u64>(CH, false).unwrap(), got1.clone(), None);
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b1.local_addr().unwrap())
        .config(handoff_cfg(dir.path()))
        .build()
        .await
        .unwrap();
    let mut events = a.health_events();
    let out = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..10u64 {
        rs.push((v, out.send(&v).await.unwrap()));
    }
    for (v, r) in settle(rs, 10.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "message {v}");
    }
    within(10.0, "b1 shutdown", b1.shutdown()).await;
    drop(b1);
    wait_health(&a, NodeId(2), Health::Down, 12.0).await;

    let mut rs = Vec::new();
    for v in 100..130u64 {
        rs.push((v, within(5.0, "send", out.send(&v)).await.unwrap()));
    }
    for (v, r) in settle(rs, 5.0).await {
        assert_eq!(r, Ok(Outcome::HandedOff), "message {v} to a Down target");
    }
    let s = within(5.0, "stats", a.stats()).await.unwrap();
    let h = s.hints.expect("hint stats with handoff on");
    assert_eq!(s.handed_off, 30, "handed_off");
    assert_eq!(h.stored, 30, "hints stored");
    assert_eq!(h.pending, 30, "hints pending");

    // A new process of node 2 on a new port.
    let b2 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got2 = seen();
    consume(b2.receiver::<u64>(CH, false).unwrap(), got2.clone(), None);
    a.add_peer(NodeId(2), b2.local_addr().unwrap());
    wait_until(12.0, "30 hints replayed to the new process", || {
        distinct(&got2) == 30
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let g = got2.lock().unwrap();
        for v in 100..130u64 {
            assert_eq!(g.get(&v).copied(), Some(1), "hint {v} processed once");
        }
        assert!(
            g.keys().all(|k| *k >= 100),
            "an acked message replayed: {g:?}"
        );
    }
    let end = Instant::now() + Duration::from_secs(5);
    let h = loop {
        let h = a.stats().await.unwrap().hints.unwrap();
        if h.pending == 0 || Instant::now() > end {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(h.pending, 0, "pending after replay: {h:?}");
    assert_eq!(h.delivered, 30, "hints delivered: {h:?}");
    assert_eq!(a.health(NodeId(2)), Some(Health::Up));
    let evs: Vec<_> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.peer == NodeId(2))
        .collect();
    let down = evs.iter().position(|e| e.to == Health::Down);
    let up_after = down.and_then(|d| evs[d..].iter().position(|e| e.to == Health::Up));
    assert!(
        down.is_some() && up_after.is_some(),
        "health events should show Down then Up: {evs:?}"
    );
    for w in evs.windows(2) {
        assert_eq!(w[0].to, w[1].from, "health events chain: {evs:?}");
    }
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b2", b2.shutdown()).await;
}

/// `Node::decommission`: "The target is gone for good: drop its hints (counted) and stop
/// watching it. Returns the number of hints dropped." `HintStats::decommissioned`:
/// "Hints dropped by `decommission`". `Outcome::HandedOff`: replayed "until the hint
/// TTL, or the target is decommissioned". A decommissioned hint is never replayed, even
/// when a process with that id later shows up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommissioned_hints_are_dropped_counted_and_never_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let b_addr = b1.local_addr().unwrap();
    let _inbox1 = b1.receiver::<u64>(CH, false).unwrap();
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b_addr)
        .config(handoff_cfg(dir.path()))
        .build()
        .await
        .unwrap();
    let a = Arc::new(a);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_monotonic_sampler(a.clone(), stop.clone());
    wait_health(&a, NodeId(2), Health::Up, 5.0).await;
    within(10.0, "b1 shutdown", b1.shutdown()).await;
    drop(_inbox1);
    drop(b1);
    wait_health(&a, NodeId(2), Health::Down, 12.0).await;
    let out = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..20u64 {
        rs.push((v, within(5.0, "send", out.send(&v)).await.unwrap()));
    }
    for (v, r) in settle(rs, 5.0).await {
        assert_eq!(r, Ok(Outcome::HandedOff), "message {v}");
    }
    let dropped = within(5.0, "decommission", a.decommission(NodeId(2)))
        .await
        .unwrap();
    assert_eq!(dropped, 20, "decommission returns the hints dropped");
    let h = a.stats().await.unwrap().hints.unwrap();
    assert_eq!(h.decommissioned, 20, "{h:?}");
    assert_eq!(h.pending, 0, "{h:?}");
    assert_eq!(h.stored, 20, "counters are monotonic: stored stays {h:?}");

    // Node 2 reappears later (same address), and the operator adds it again.
    let b2 = Node::builder(NodeId(2))
        .bind(b_addr)
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got = seen();
    consume(b2.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    a.add_peer(NodeId(2), b_addr);
    let up = health_within(&a, NodeId(2), Health::Up, 8.0).await;
    let out = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 1000..1005u64 {
        rs.push((v, within(5.0, "send", out.send(&v)).await.unwrap()));
    }
    let res = settle(rs, 10.0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let g = got.lock().unwrap().clone();
    assert!(
        g.keys().all(|k| *k >= 1000),
        "decommissioned hints were delivered: {:?}",
        g.keys().filter(|k| **k < 1000).collect::<Vec<_>>()
    );
    assert_eq!(g.len(), 5, "{g:?}");
    let h = a.stats().await.unwrap().hints.unwrap();
    assert_eq!(h.pending, 0, "{h:?}");
    // Only hints of the new messages may have been delivered (under load the
    // re-added peer's fresh detector can find it Down for a moment, and the new
    // messages are handed off and replayed then): none of the 20 decommissioned ones.
    assert_eq!(
        h.delivered,
        h.stored - 20,
        "only hints stored after the decommission may be delivered: {h:?}"
    );
    stop.store(true, Ordering::Relaxed);
    within(5.0, "sampler", sampler).await.unwrap();
    // Acked, or handed off and replayed (the five were processed: `g.len() == 5`
    // above; the same load that can make the fresh detector find the peer Down
    // for a moment made all five `HandedOff` in one CI run).
    assert!(
        up && res
            .iter()
            .all(|(_, r)| matches!(r, Ok(Outcome::Acked | Outcome::HandedOff))),
        "node 2 re-added after decommission and reachable again: health {:?} \
         (Up within 8 s: {up}), new messages {res:?}",
        a.health(NodeId(2))
    );
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b2", b2.shutdown()).await;
}

/// Without handoff, a peer gone for good: `NodeConfig::fail_fast_when_down`: "a send to
/// a peer the failure detector holds Down fails at once with `SendError::PeerDown` …
/// Messages already in flight keep retrying until their deadline either way";
/// `SendError::Deadline`: "No ack arrived before the message's deadline". The health
/// events chain Up → … → Down and `health()` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gone_for_good_without_handoff_fails_typed() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let mut events = a.health_events();
    let mut opts = ChannelOptions::new(CH, Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(7));
    let out = a.sender::<u64>(NodeId(2), opts).unwrap();
    let mut rs = Vec::new();
    for v in 0..20u64 {
        rs.push((v, out.send(&v).await.unwrap()));
    }
    // The receiver holds them all unacknowledged, then its process is gone.
    let mut held = Vec::new();
    while held.len() < 20 {
        held.push(within(5.0, "deliveries", inbox.recv()).await.unwrap());
    }
    let sent_at = Instant::now();
    drop(b);
    std::mem::forget(held); // never acked, never nacked
    drop(inbox);

    wait_health(&a, NodeId(2), Health::Down, 12.0).await;
    for (v, r) in settle(rs, 9.0).await {
        assert!(
            matches!(r, Err(SendError::Deadline { .. })),
            "in-flight message {v} to a gone peer: {r:?}"
        );
    }
    assert!(
        sent_at.elapsed() >= Duration::from_secs(6),
        "failed before the deadline"
    );
    let t = Instant::now();
    let res = match out.send(&99).await {
        Ok(r) => within(1.0, "receipt to a Down peer", r).await,
        Err(e) => Err(e),
    };
    assert_eq!(res, Err(SendError::PeerDown { peer: NodeId(2) }));
    // "At once" against the 7 s deadline it would otherwise wait (with room for a
    // loaded 2-core machine).
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "not at once: {:?}",
        t.elapsed()
    );
    let s = a.stats().await.unwrap();
    assert_eq!(s.proto.gave_up, 20, "gave_up");
    assert_eq!(s.proto.acked, 0, "acked");
    let evs: Vec<_> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.peer == NodeId(2))
        .collect();
    assert_eq!(evs.last().map(|e| e.to), Some(Health::Down), "{evs:?}");
    for w in evs.windows(2) {
        assert_eq!(w[0].to, w[1].from, "health events chain: {evs:?}");
    }
    assert!(
        evs.iter().all(|e| e.from != e.to),
        "an event that changes nothing: {evs:?}"
    );
    within(10.0, "shutdown a", a.shutdown()).await;
}

/// `NodeConfig::fail_fast_when_down` (default on): "a send to a peer the failure
/// detector holds Down fails at once with `SendError::PeerDown`". That holds for a
/// send already waiting for a window slot when its peer dies: it fails when the peer
/// turns Down, not when the messages in flight reach their deadline and free a slot
/// (it then returned a receipt for a message sent into a gone peer). Both `send` and
/// `send_many` (also one cut part-way by the window), and a sink's `poll_ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waiting_for_the_window_fails_fast_when_its_peer_turns_down() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let mut cfg = NodeConfig::default();
    cfg.proto.max_in_flight = 20;
    let a = Node::builder(NodeId(1))
        .config(cfg)
        .bind(any_addr())
        .peer(NodeId(2), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let mut opts = ChannelOptions::new(CH, Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(20));
    let out = a.sender::<u64>(NodeId(2), opts).unwrap();
    let mut rs = Vec::new();
    for v in 0..15u64 {
        rs.push(out.send(&v).await.unwrap());
    }
    // A batch the window cuts part-way: its first 5 go at once, the other 5 wait.
    let part = tokio::spawn({
        let out = out.clone();
        async move {
            let vals: Vec<u64> = (15..25).collect();
            out.send_many(&vals).await
        }
    });
    let mut held = Vec::new();
    while held.len() < 20 {
        held.push(within(5.0, "deliveries", inbox.recv()).await.unwrap());
    }
    // The window is full: these wait for a slot.
    let one = tokio::spawn({
        let out = out.clone();
        async move { out.send(&99).await.map(drop) }
    });
    let many = tokio::spawn({
        let out = out.clone();
        async move { out.send_many(&[100, 101]).await.map(drop) }
    });
    // The sink's `poll_ready` waits "exactly when `Sender::send` would wait", and so
    // ends with the same `PeerDown`. (Regression: it waited out the 20 s deadline.)
    let sink = tokio::spawn({
        let mut sink = out.sink();
        async move { futures::SinkExt::send(&mut sink, 102).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !one.is_finished() && !many.is_finished() && !sink.is_finished() && !part.is_finished(),
        "the window was not full"
    );
    drop(b);
    std::mem::forget(held);
    drop(inbox);
    wait_health(&a, NodeId(2), Health::Down, 12.0).await;
    let down = Duration::from_secs(2);
    let one = within(down.as_secs_f64(), "the waiting send", one)
        .await
        .unwrap();
    let many = within(down.as_secs_f64(), "the waiting send_many", many)
        .await
        .unwrap();
    let sink = within(down.as_secs_f64(), "the waiting sink", sink)
        .await
        .unwrap();
    assert_eq!(one, Err(SendError::PeerDown { peer: NodeId(2) }));
    assert_eq!(many, Err(SendError::PeerDown { peer: NodeId(2) }));
    assert_eq!(sink, Err(SendError::PeerDown { peer: NodeId(2) }));
    // The batch that had sent a chunk returns every receipt: "PeerDown: nothing was
    // sent" holds per payload. (Regression: the call failed with PeerDown and the
    // receipts of the chunk it had sent were lost, so a caller resending the batch
    // sent those 5 twice.)
    let part = within(down.as_secs_f64(), "the part-way batch", part)
        .await
        .unwrap()
        .expect("a batch that sent a chunk returns its receipts");
    assert_eq!(part.len(), 10);
    for r in part.into_iter().skip(5) {
        let r = within(1.0, "an unsent payload's receipt", r).await;
        assert_eq!(r, Err(SendError::PeerDown { peer: NodeId(2) }));
    }
    drop(rs);
    within(10.0, "shutdown a", a.shutdown()).await;
}

// -------------------------------------------------------------------------------------
// Counters
// -------------------------------------------------------------------------------------

/// The counters an operator alerts on, from `Stats` ("Counters of a node (monotonic)")
/// and `ProtoStats`: `sent` "Messages accepted by `send`", `acked` "acknowledged by
/// their receiver (at-most-once: transmitted)", `delivered` "handed to the
/// application", `duplicates_dropped`, `rejected` / `rejects_received`, `no_receiver`;
/// README: "a slow handler does not cause retransmissions" (so none on a clean link).
/// Sampled all along, no counter goes backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_equal_a_scripted_scenario_and_never_go_backwards() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got_eo = seen();
    let got_alo = seen();
    let got_amo = seen();
    consume(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        got_eo.clone(),
        None,
    );
    consume(
        b.receiver::<u64>(ChannelId(2), true).unwrap(),
        got_alo.clone(),
        None,
    );
    consume(
        b.receiver::<u64>(ChannelId(3), false).unwrap(),
        got_amo.clone(),
        None,
    );
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let a = Arc::new(a);
    let b = Arc::new(b);

    // Sampler: every counter must be monotonic on both nodes.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last: [Option<Vec<(&'static str, u64)>>; 2] = [None, None];
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for (i, n) in [&a, &b].into_iter().enumerate() {
                    let s = n.stats().await.unwrap();
                    let now = counters(&s);
                    if let Some(prev) = &last[i] {
                        for ((name, p), (_, c)) in prev.iter().zip(now.iter()) {
                            assert!(c >= p, "node {} counter {name} went back {p} -> {c}", i + 1);
                        }
                    }
                    last[i] = Some(now);
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            samples
        })
    };

    let eo = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let alo = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(ChannelId(2), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let amo = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(ChannelId(3), Guarantee::AtMostOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..300u64 {
        rs.push((
            v,
            eo.send_with_key(&v, IdKey(1_000 + u128::from(v)))
                .await
                .unwrap(),
        ));
        rs.push((v, alo.send(&v).await.unwrap()));
        if v < 100 {
            rs.push((v, amo.send(&v).await.unwrap()));
        }
    }
    let res = settle(rs, 15.0).await;
    let acked = res.iter().filter(|(_, r)| *r == Ok(Outcome::Acked)).count();
    let sent = res.iter().filter(|(_, r)| *r == Ok(Outcome::Sent)).count();
    assert_eq!((acked, sent), (600, 100), "outcomes");
    // Ten application re-sends of keys already processed.
    let mut rs = Vec::new();
    for v in 0..10u64 {
        rs.push((
            v,
            eo.send_with_key(&v, IdKey(1_000 + u128::from(v)))
                .await
                .unwrap(),
        ));
    }
    for (v, r) in settle(rs, 10.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "re-send of key {v}");
    }
    wait_until(5.0, "all at-most-once arrived", || {
        distinct(&got_amo) == 100
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sa = a.stats().await.unwrap();
    let sb = b.stats().await.unwrap();
    assert_eq!(total(&got_eo), 300, "eo handled");
    assert_eq!(
        total(&got_alo),
        300,
        "alo handled (clean link, no redelivery)"
    );
    assert_eq!(sa.proto.sent, 710, "sender: sent");
    assert_eq!(
        sa.proto.acked, 710,
        "sender: acked (re-sends acked as duplicates)"
    );
    assert_eq!(
        sa.proto.retransmitted, 0,
        "sender: retransmitted on a clean link"
    );
    assert_eq!(sa.proto.gave_up, 0, "sender: gave_up");
    assert_eq!(sb.proto.delivered, 700, "receiver: delivered");
    assert_eq!(
        sb.proto.duplicates_dropped, 10,
        "receiver: duplicates_dropped"
    );
    assert_eq!(sb.proto.rejected, 0, "receiver: rejected");
    assert_eq!(sb.no_receiver, 0, "receiver: no_receiver");
    assert_eq!(sb.decode_failed, 0);

    // Four messages to a channel nobody receives: rejected after the grace.
    let lost = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(ChannelId(9), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..4u64 {
        rs.push((v, lost.send(&v).await.unwrap()));
    }
    for (v, r) in settle(rs, 12.0).await {
        assert_eq!(
            r,
            Err(SendError::Rejected {
                reason: RejectReason::NoReceiver
            }),
            "message {v}"
        );
    }
    let sa = a.stats().await.unwrap();
    let sb = b.stats().await.unwrap();
    assert_eq!(sa.proto.sent, 714);
    assert_eq!(sa.proto.rejects_received, 4, "sender: rejects_received");
    assert_eq!(sb.proto.rejected, 4, "receiver: rejected (once each)");
    assert!(
        sb.no_receiver >= 4,
        "receiver: no_receiver {}",
        sb.no_receiver
    );
    assert_eq!(sb.proto.delivered, 700, "nothing more delivered");
    stop.store(true, Ordering::Relaxed);
    let samples = within(5.0, "sampler", sampler).await.unwrap();
    assert!(samples > 10, "sampler ran {samples} times");
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// Samples `node`'s counters until `stop`, asserting none goes backwards (hint counters
/// included); returns the number of samples.
fn spawn_monotonic_sampler(node: Arc<Node>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut last: Option<Vec<(&'static str, u64)>> = None;
        let mut samples = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let s = node.stats().await.unwrap();
            let mut now = counters(&s);
            if let Some(h) = &s.hints {
                now.push(("hints.stored", h.stored));
                now.push(("hints.replayed", h.replayed));
                now.push(("hints.delivered", h.delivered));
                now.push(("hints.expired", h.expired));
                now.push(("hints.decommissioned", h.decommissioned));
            }
            if let Some(prev) = &last {
                for ((name, p), (_, c)) in prev.iter().zip(now.iter()) {
                    assert!(c >= p, "counter {name} went back {p} -> {c}");
                }
            }
            last = Some(now);
            samples += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        samples
    })
}

fn counters(s: &Stats) -> Vec<(&'static str, u64)> {
    let p = &s.proto;
    let mut v = vec![
        ("sent", p.sent),
        ("retransmitted", p.retransmitted),
        ("acked", p.acked),
        ("gave_up", p.gave_up),
        ("delivered", p.delivered),
        ("duplicates_dropped", p.duplicates_dropped),
        ("in_progress_dropped", p.in_progress_dropped),
        ("dedup_refused", p.dedup_refused),
        ("frames_ignored", p.frames_ignored),
        ("acks_sent", p.acks_sent),
        ("nacks_sent", p.nacks_sent),
        ("credit_waits", p.credit_waits),
        ("rejects_sent", p.rejects_sent),
        ("rejected", p.rejected),
        ("rejects_received", p.rejects_received),
        ("dead_lettered", p.dead_lettered),
        ("decode_failed", s.decode_failed),
        ("no_receiver", s.no_receiver),
        ("handed_off", s.handed_off),
        ("handoff_refused", s.handoff_refused),
        ("dedup.fresh", s.dedup.fresh),
        ("dedup.duplicates", s.dedup.duplicates),
        ("dedup.completed", s.dedup.completed),
        (
            "dedup.streams_retired_finished",
            s.dedup.streams_retired_finished,
        ),
    ];
    if let Some(t) = &s.tcp {
        v.push(("tcp.connections_opened", t.connections_opened));
        v.push(("tcp.connections_closed", t.connections_closed));
        v.push(("tcp.frames_sent", t.frames_sent));
        v.push(("tcp.frames_received", t.frames_received));
    }
    v
}

// -------------------------------------------------------------------------------------
// Churn of sender incarnations
// -------------------------------------------------------------------------------------

/// Many short-lived incarnations of one sender id, one after another, half shut down
/// cleanly and half dropped: SECURITY/README "Two live incarnations of one `NodeId` do not
/// flap" and `TcpConfig::stale_after` (a new incarnation "takes over once the old
/// connection is gone"); `Node::shutdown` docs "Dropping a `Node` instead stops it at
/// once"; README Upgrading: "the `Finish` frame (a node that shuts down cleanly lets its
/// receivers retire its dedup streams at once instead of after the 24 h retention)".
/// Every incarnation's messages are acked and processed exactly once, the receiver's
/// live dedup streams do not grow with cleanly stopped incarnations, and its
/// connections do not pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_incarnations_churn_one_id_delivers_everything_with_bounded_state() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(20))
        .build()
        .await
        .unwrap();
    let b_addr = b.local_addr().unwrap();
    let got = seen();
    consume(b.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    const RUNS: u64 = 16;
    const PER: u64 = 10;
    let t0 = Instant::now();
    for run in 0..RUNS {
        let a = Node::builder(NodeId(20))
            .bind(any_addr())
            .peer(NodeId(2), b_addr)
            .build()
            .await
            .unwrap();
        let out = a
            .sender::<u64>(
                NodeId(2),
                ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
            )
            .unwrap();
        let mut rs = Vec::new();
        for i in 0..PER {
            let v = run * 1000 + i;
            rs.push((v, out.send(&v).await.unwrap()));
        }
        let started = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(6), async {
            let mut out = Vec::new();
            for (v, r) in rs {
                out.push((v, r.await));
            }
            out
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "run {run} (previous run {}): receipts not resolved within 6 s",
                if run % 2 == 1 { "shut down" } else { "dropped" }
            )
        });
        for (v, r) in res {
            assert_eq!(r, Ok(Outcome::Acked), "run {run} message {v}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "run {run}: took {:?} to be served",
            started.elapsed()
        );
        if run % 2 == 0 {
            within(8.0, "clean shutdown", a.shutdown()).await;
        } else {
            drop(a);
        }
    }
    eprintln!("{RUNS} incarnations in {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let g = got.lock().unwrap();
        assert_eq!(g.len() as u64, RUNS * PER, "distinct processed");
        assert!(
            g.values().all(|&c| c == 1),
            "processed twice: {:?}",
            g.iter().filter(|(_, c)| **c > 1).collect::<Vec<_>>()
        );
    }
    let s = b.stats().await.unwrap();
    assert_eq!(s.proto.delivered, RUNS * PER);
    assert!(
        s.dedup.streams_retired_finished >= RUNS / 2,
        "cleanly stopped incarnations retired at once: {:?}",
        s.dedup
    );
    assert!(
        s.dedup.streams <= RUNS / 2 + 1,
        "live dedup streams after churn: {:?}",
        s.dedup
    );
    let t = s.tcp.unwrap();
    let open = t.connections_opened.saturating_sub(t.connections_closed);
    assert!(open <= 1, "connections still open on the receiver: {t:?}");
    within(10.0, "shutdown b", b.shutdown()).await;
}

// -------------------------------------------------------------------------------------
// A slow handler next to busy channels
// -------------------------------------------------------------------------------------

/// Per-stream windows and credit (README "Window and credit": "a sliding in-flight
/// window per stream … The receiver grants each stream credit"), one receiver per
/// channel, and "a slow handler does not cause retransmissions": a handler taking 2 s
/// per message on one channel must not hold up another channel of the same sender, nor
/// another sender, and causes no retransmission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_on_one_channel_does_not_hold_up_other_channels_or_peers() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .allow_peer(NodeId(3))
        .build()
        .await
        .unwrap();
    let b_addr = b.local_addr().unwrap();
    let slow = seen();
    let fast = seen();
    consume(
        b.receiver::<u64>(CH, false).unwrap(),
        slow.clone(),
        Some(Duration::from_secs(2)),
    );
    consume(b.receiver::<u64>(CH2, false).unwrap(), fast.clone(), None);
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b_addr)
        .build()
        .await
        .unwrap();
    let c = Node::builder(NodeId(3))
        .bind(any_addr())
        .peer(NodeId(2), b_addr)
        .build()
        .await
        .unwrap();
    wait_health(&a, NodeId(2), Health::Up, 5.0).await;
    wait_health(&c, NodeId(2), Health::Up, 5.0).await;
    let slow_out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut slow_rs = Vec::new();
    for v in 0..3u64 {
        slow_rs.push((v, slow_out.send(&v).await.unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let a_fast = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH2, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let c_fast = c
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH2, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..300u64 {
        rs.push((v, a_fast.send(&(10_000 + v)).await.unwrap()));
        rs.push((v, c_fast.send(&(20_000 + v)).await.unwrap()));
    }
    for (v, r) in settle(rs, 10.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "fast message {v}");
    }
    let fast_took = t.elapsed();
    // Head-of-line blocking behind the 2 s handler would take 2-6 s; 3.5 s leaves a
    // loaded machine room (1.5 s was tight).
    assert!(
        fast_took < Duration::from_millis(3500),
        "600 messages on a fast channel took {fast_took:?} next to a 2 s handler"
    );
    assert_eq!(distinct(&fast), 600);
    assert!(distinct(&slow) <= 1, "slow channel should still be busy");
    for (v, r) in settle(slow_rs, 10.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "slow message {v}");
    }
    assert_eq!(total(&slow), 3, "slow messages handled once each");
    let sa = a.stats().await.unwrap();
    let sc = c.stats().await.unwrap();
    // Not zero on a loaded machine (a new stream's first burst, before any ack, is
    // retransmitted in part when the receiver cannot answer within the RTO: README),
    // but no storm: a held message resent on every backoff would be several copies.
    let retx = sa.proto.retransmitted + sc.proto.retransmitted;
    assert!(retx <= 603 / 4, "senders retransmitted {retx} of 603");
    for n in [&a, &c, &b] {
        within(10.0, "shutdown", n.shutdown()).await;
    }
}

// -------------------------------------------------------------------------------------
// Shutdown under load
// -------------------------------------------------------------------------------------

/// `Node::shutdown`: "refuse new sends (`SendError::Shutdown`), wait up to
/// `NodeConfig::shutdown_drain` for unacknowledged messages, then spool what is left to
/// the hint store (…; without handoff they fail with `SendError::Shutdown`), … close the
/// transport, and wait for the driver to finish". Under load, with a handler that holds
/// some messages longer than the 5 s drain: shutdown returns in about the drain, every
/// receipt resolves (Acked or Shutdown), nothing acked was left unprocessed, and a send
/// during the drain is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_resolves_every_receipt_and_loses_nothing_acked() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let processed = seen();
    {
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let processed = processed.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let v = *d.message();
                let processed = processed.clone();
                tokio::spawn(async move {
                    // Every 50th message takes 8 s; the rest a little time.
                    let t = if v % 50 == 0 { 8_000 } else { v % 7 };
                    tokio::time::sleep(Duration::from_millis(t)).await;
                    *processed.lock().unwrap().entry(v).or_default() += 1;
                    d.ack();
                });
            }
        });
    }
    let a = Arc::new(
        Node::builder(NodeId(1))
            .bind(any_addr())
            .peer(NodeId(2), b.local_addr().unwrap())
            .build()
            .await
            .unwrap(),
    );
    let out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..1000u64 {
        rs.push((v, within(5.0, "send", out.send(&v)).await.unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let stopper = {
        let a = a.clone();
        tokio::spawn(async move { a.shutdown().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = match out.send(&5000).await {
        Ok(r) => within(2.0, "late receipt", r).await,
        Err(e) => Err(e),
    };
    assert_eq!(late, Err(SendError::Shutdown), "a send during the drain");
    within(10.0, "shutdown under load", stopper).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(8),
        "shutdown took {took:?} with messages held past the 5 s drain"
    );
    let res = settle(rs, 2.0).await;
    let mut acked = 0;
    let mut failed = Vec::new();
    for (v, r) in &res {
        match r {
            Ok(Outcome::Acked) => {
                acked += 1;
                assert_eq!(
                    processed.lock().unwrap().get(v).copied(),
                    Some(1),
                    "message {v} acked but not processed once"
                );
            }
            Err(SendError::Shutdown) => failed.push(*v),
            other => panic!("message {v}: unexpected {other:?}"),
        }
    }
    assert_eq!(failed.len(), 20, "the 20 held messages fail: {failed:?}");
    assert!(failed.iter().all(|v| v % 50 == 0), "{failed:?}");
    assert_eq!(acked, 980);
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// Without handoff: `Node::decommission` "stop[s] watching" a gone peer; when a process
/// with that id returns and the operator adds it again, `Node::add_peer` promises "the
/// failure detector watches it from now on", and `Node::health` is "The failure
/// detector's view of `peer`". A peer that is back, connected and answering must not
/// stay Down — with `fail_fast_when_down` (default on) every send to it would fail
/// with `PeerDown` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_peer_added_again_is_not_stuck_down() {
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let b_addr = b1.local_addr().unwrap();
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b_addr)
        .build()
        .await
        .unwrap();
    wait_health(&a, NodeId(2), Health::Up, 5.0).await;
    within(10.0, "b1 shutdown", b1.shutdown()).await;
    drop(b1);
    wait_health(&a, NodeId(2), Health::Down, 12.0).await;
    let dropped = within(5.0, "decommission", a.decommission(NodeId(2)))
        .await
        .unwrap();
    assert_eq!(dropped, 0, "no hints without handoff");

    let b2 = Node::builder(NodeId(2))
        .bind(b_addr)
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got = seen();
    consume(b2.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    let mut events = a.health_events();
    a.add_peer(NodeId(2), b_addr);
    let up = health_within(&a, NodeId(2), Health::Up, 8.0).await;
    let out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let res = match within(5.0, "send", out.send(&7)).await {
        Ok(r) => within(10.0, "receipt", r).await,
        Err(e) => Err(e),
    };
    let evs = drain_events(&mut events);
    assert!(
        up && res == Ok(Outcome::Acked),
        "re-added peer: health {:?} (Up within 8 s: {up}), send {res:?}, events {evs:?}, \
         b2 saw {:?}",
        a.health(NodeId(2)),
        got.lock().unwrap()
    );
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b2", b2.shutdown()).await;
}

/// A second process starts with a live peer's id before the first has gone (a rolling
/// replacement that overlaps): README "Two live incarnations of one `NodeId` do not
/// flap"; `Node::identity_conflicts`: "Each refused connection is one event (the
/// transport also counts them in `rejected_duplicate_node` …)"; docs: the new one
/// "takes over once the old connection is gone". The live one keeps being served while
/// both run; once it shuts down, the replacement gets the traffic, and messages acked
/// by either are processed once in total (effectively-once keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlapping_replacement_is_refused_while_the_old_one_lives_then_takes_over() {
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .allow_peer(NodeId(2))
        .build()
        .await
        .unwrap();
    let a_addr = a.local_addr().unwrap();
    let got = seen();
    consume(a.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    let mut conflicts = a.identity_conflicts();
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .peer(NodeId(1), a_addr)
        .build()
        .await
        .unwrap();
    let out1 = b1
        .sender::<u64>(
            NodeId(1),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let r = out1.send_with_key(&1, IdKey(1)).await.unwrap();
    assert_eq!(within(10.0, "b1 first", r).await, Ok(Outcome::Acked));

    // The replacement starts while b1 is alive and connected.
    let b2 = Node::builder(NodeId(2))
        .bind(any_addr())
        .peer(NodeId(1), a_addr)
        .build()
        .await
        .unwrap();
    let out2 = b2
        .sender::<u64>(
            NodeId(1),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut r2 = Vec::new();
    for v in 100..110u64 {
        r2.push((
            v,
            out2.send_with_key(&v, IdKey(u128::from(v))).await.unwrap(),
        ));
    }
    // b1 keeps being served meanwhile.
    for v in 2..20u64 {
        let r = out1.send_with_key(&v, IdKey(u128::from(v))).await.unwrap();
        assert_eq!(
            within(5.0, "b1 while b2 knocks", r).await,
            Ok(Outcome::Acked)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ev = within(5.0, "an identity conflict event", conflicts.recv())
        .await
        .expect("identity conflict event");
    assert_eq!(ev.live, b1.origin(), "{ev:?}");
    assert_eq!(ev.refused, b2.origin(), "{ev:?}");
    assert!(
        got.lock().unwrap().keys().all(|k| *k < 100),
        "the refused incarnation was served while the live one was connected"
    );
    within(10.0, "b1 shutdown", b1.shutdown()).await;
    drop(b1);
    let t = Instant::now();
    for (v, r) in settle(r2, 14.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "replacement's message {v}");
    }
    eprintln!(
        "replacement served {:?} after the old one shut down",
        t.elapsed()
    );
    let mut n_events = 1u64;
    while let Ok(_e) = conflicts.try_recv() {
        n_events += 1;
    }
    let tcp = a.tcp_stats().unwrap();
    assert_eq!(
        tcp.rejected_duplicate_node, n_events,
        "one event per refused connection: {tcp:?}"
    );
    {
        let g = got.lock().unwrap();
        assert_eq!(g.len(), 29, "{g:?}");
        assert!(g.values().all(|&c| c == 1), "{g:?}");
    }
    within(10.0, "shutdown b2", b2.shutdown()).await;
    within(10.0, "shutdown a", a.shutdown()).await;
}

/// A writer that never stops while its target is killed and replaced by a new process
/// on a new port: every receipt resolves Acked or HandedOff (handoff on: "Store a
/// message whose retries ran out … as a hint instead of failing its receipt" and
/// `on_down`), the node's `handed_off` equals the receipts that said HandedOff, every
/// message reaches a handler, the replacement processes each message it got once, and
/// the hint store ends empty with every hint delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuous_writer_through_a_killed_and_replaced_target_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got1 = seen();
    consume(b1.receiver::<u64>(CH, false).unwrap(), got1.clone(), None);
    let a = Arc::new(
        Node::builder(NodeId(1))
            .bind(any_addr())
            .peer(NodeId(2), b1.local_addr().unwrap())
            .config(handoff_cfg(dir.path()))
            .build()
            .await
            .unwrap(),
    );
    let mut events = a.health_events();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_monotonic_sampler(a.clone(), stop.clone());
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let out = a
                .sender::<u64>(
                    NodeId(2),
                    ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
                )
                .unwrap();
            let mut rs = Vec::new();
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rs.push((v, out.send(&v).await.expect("send accepted")));
                v += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            rs
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(b1); // killed: no drain, no Finish
    wait_health(&a, NodeId(2), Health::Down, 12.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b2 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got2 = seen();
    consume(b2.receiver::<u64>(CH, false).unwrap(), got2.clone(), None);
    a.add_peer(NodeId(2), b2.local_addr().unwrap());
    wait_health(&a, NodeId(2), Health::Up, 8.0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let rs = within(5.0, "writer", writer).await.unwrap();
    let samples = within(5.0, "sampler", sampler).await.unwrap();
    assert!(samples > 10, "sampler ran {samples} times");
    let n = rs.len() as u64;
    let res = settle(rs, 10.0).await;
    let mut handed = 0u64;
    for (v, r) in &res {
        match r {
            Ok(Outcome::Acked) => {}
            Ok(Outcome::HandedOff) => handed += 1,
            other => panic!("message {v}: {other:?}"),
        }
    }
    assert!(
        handed > 0,
        "nothing was handed off while the target was Down"
    );
    let end = Instant::now() + Duration::from_secs(8);
    let s = loop {
        let s = a.stats().await.unwrap();
        let h = s.hints.unwrap();
        if (h.pending == 0 && h.delivered == h.stored) || Instant::now() > end {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let h = s.hints.unwrap();
    assert_eq!(
        s.handed_off, handed,
        "handed_off vs receipts that said HandedOff"
    );
    assert_eq!(h.pending, 0, "{h:?}");
    assert_eq!(h.delivered, h.stored, "{h:?}");
    assert!(h.stored >= handed, "{h:?} vs {handed}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let g1 = got1.lock().unwrap().clone();
    let g2 = got2.lock().unwrap().clone();
    for v in 0..n {
        assert!(
            g1.contains_key(&v) || g2.contains_key(&v),
            "message {v} never reached a handler ({} messages, {handed} handed off)",
            n
        );
    }
    assert!(
        g2.values().all(|&c| c == 1),
        "replacement processed twice: {g2:?}"
    );
    let evs: Vec<_> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.peer == NodeId(2))
        .collect();
    for w in evs.windows(2) {
        assert_eq!(w[0].to, w[1].from, "health events chain: {evs:?}");
    }
    assert_eq!(evs.last().map(|e| e.to), Some(Health::Up), "{evs:?}");
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b2", b2.shutdown()).await;
}

/// Many short-lived peers, each its own id, discovered by their connection
/// (`accept_unknown_peers`), each sending a few messages and shutting down cleanly:
/// all acked and processed once; the receiver's connections are closed again
/// (`connections_closed`: "Kept connections that were later closed (lost, replaced, or
/// shut down)") and its live dedup streams retired by `Finish` ("lets its receivers
/// retire its dedup streams at once").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_lived_peers_leave_no_connections_or_streams_behind() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .accept_unknown_peers(true)
        .build()
        .await
        .unwrap();
    let b_addr = b.local_addr().unwrap();
    let got = seen();
    consume(b.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    const PEERS: u64 = 24;
    let mut tasks = Vec::new();
    for wave in 0..4u64 {
        for i in 0..PEERS / 4 {
            let id = 100 + wave * 10 + i;
            tasks.push(tokio::spawn(async move {
                let a = Node::builder(NodeId(id))
                    .bind(any_addr())
                    .peer(NodeId(2), b_addr)
                    .build()
                    .await
                    .unwrap();
                let out = a
                    .sender::<u64>(
                        NodeId(2),
                        ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
                    )
                    .unwrap();
                let mut rs = Vec::new();
                for k in 0..5u64 {
                    rs.push((k, out.send(&(id * 100 + k)).await.unwrap()));
                }
                for (k, r) in settle(rs, 8.0).await {
                    assert_eq!(r, Ok(Outcome::Acked), "peer {id} message {k}");
                }
                within(8.0, "peer shutdown", a.shutdown()).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in tasks {
        within(12.0, "short-lived peer", t).await.unwrap();
    }
    let end = Instant::now() + Duration::from_secs(4);
    let s = loop {
        let s = b.stats().await.unwrap();
        let t = s.tcp.unwrap();
        if t.connections_opened == t.connections_closed || Instant::now() > end {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let t = s.tcp.unwrap();
    assert_eq!(total(&got), PEERS * 5, "processed");
    assert_eq!(distinct(&got) as u64, PEERS * 5);
    assert!(t.connections_opened >= PEERS, "{t:?}");
    assert_eq!(
        t.connections_opened, t.connections_closed,
        "connections left open after every peer shut down: {t:?}"
    );
    assert!(s.dedup.streams <= 1, "live dedup streams: {:?}", s.dedup);
    assert!(s.dedup.streams_retired_finished >= PEERS, "{:?}", s.dedup);
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// Shutdown under load with handoff: `Node::shutdown` spools what the drain did not
/// settle ("receipts resolve `Outcome::HandedOff`"), "A node restarted on the same hint
/// directory replays the spooled messages", under their original ids; README:
/// "a duplicate arriving while the original is still processing is not delivered", and
/// `Finish` retires the stopped run's streams only once "they settled". Messages whose
/// handler is still busy when the sender stops are processed exactly once, and the new
/// run's hint counters show the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_spools_busy_messages_and_the_next_run_replays_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let b_addr = b.local_addr().unwrap();
    let processed = seen();
    {
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let processed = processed.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let v = *d.message();
                let processed = processed.clone();
                tokio::spawn(async move {
                    let t = if v % 50 == 0 { 6_500 } else { 1 };
                    tokio::time::sleep(Duration::from_millis(t)).await;
                    *processed.lock().unwrap().entry(v).or_default() += 1;
                    d.ack();
                });
            }
        });
    }
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b_addr)
        .config(handoff_cfg(dir.path()))
        .build()
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..200u64 {
        rs.push((v, out.send(&v).await.unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    within(9.0, "shutdown under load", a.shutdown()).await;
    let res = settle(rs, 2.0).await;
    let handed: Vec<u64> = res
        .iter()
        .filter(|(_, r)| *r == Ok(Outcome::HandedOff))
        .map(|(v, _)| *v)
        .collect();
    for (v, r) in &res {
        assert!(
            matches!(r, Ok(Outcome::Acked) | Ok(Outcome::HandedOff)),
            "message {v}: {r:?}"
        );
    }
    assert_eq!(handed, vec![0, 50, 100, 150], "the busy ones were spooled");
    drop(a);

    let a2 = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b_addr)
        .config(handoff_cfg(dir.path()))
        .build()
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(8);
    let h = loop {
        let h = a2.stats().await.unwrap().hints.unwrap();
        if (h.pending == 0 && h.delivered >= 4) || Instant::now() > end {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(h.pending, 0, "the next run's hints: {h:?}");
    assert_eq!(h.delivered, 4, "the next run's hints: {h:?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let g = processed.lock().unwrap().clone();
    assert_eq!(g.len(), 200, "processed distinct");
    assert!(
        g.values().all(|&c| c == 1),
        "processed twice: {:?}",
        g.iter().filter(|(_, c)| **c > 1).collect::<Vec<_>>()
    );
    let sb = b.stats().await.unwrap();
    assert_eq!(
        sb.proto.rejected, 0,
        "nothing refused (retired stream?): {:?}",
        sb.dedup
    );
    within(10.0, "shutdown a2", a2.shutdown()).await;
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// A sender restarted cleanly, one run after the other (each `shutdown()` awaited: it
/// "close[s] the transport, and wait[s] for the driver to finish"), is not another live
/// process: `Node::identity_conflicts` reports "another process claimed a peer's
/// `NodeId` while that peer's connection was alive", and `TcpConfig::stale_after` says a
/// new incarnation "takes over once the old connection is gone". So a rolling restart
/// raises no identity conflict, counts no `rejected_duplicate_node`, and (clean link)
/// retransmits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_restarted_sender_is_not_an_identity_conflict() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(20))
        .build()
        .await
        .unwrap();
    let b_addr = b.local_addr().unwrap();
    let got = seen();
    consume(b.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    let mut conflicts = b.identity_conflicts();
    let mut retransmitted = Vec::new();
    for run in 0..10u64 {
        let a = Node::builder(NodeId(20))
            .bind(any_addr())
            .peer(NodeId(2), b_addr)
            .build()
            .await
            .unwrap();
        let out = a
            .sender::<u64>(
                NodeId(2),
                ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
            )
            .unwrap();
        let mut rs = Vec::new();
        for i in 0..5u64 {
            rs.push((i, out.send(&(run * 100 + i)).await.unwrap()));
        }
        for (i, r) in settle(rs, 8.0).await {
            assert_eq!(r, Ok(Outcome::Acked), "run {run} message {i}");
        }
        retransmitted.push(a.stats().await.unwrap().proto.retransmitted);
        within(8.0, "clean shutdown", a.shutdown()).await;
        // Diagnosis knob: OPS_GAP_MS=5 waits between the runs (then the test passes).
        if let Ok(ms) = std::env::var("OPS_GAP_MS") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
    }
    let mut events = Vec::new();
    while let Ok(e) = conflicts.try_recv() {
        events.push(e);
    }
    let tcp = b.tcp_stats().unwrap();
    assert_eq!(distinct(&got), 50);
    assert!(
        events.is_empty()
            && tcp.rejected_duplicate_node == 0
            && retransmitted.iter().all(|r| *r == 0),
        "10 clean restarts: {} identity conflicts {events:?}, rejected_duplicate_node {}, \
         retransmitted per run {retransmitted:?}",
        events.len(),
        tcp.rejected_duplicate_node
    );
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// The receiving side stops while its handlers are busy: `Node::shutdown` "wait[s] for
/// the driver to finish" within about `shutdown_drain` (default 5 s) — it must not hang
/// on a handler; a `Receiver` "ends when the node shuts down"; the sender's receipts
/// for what was never acked fail typed by their deadline ("not known to be
/// delivered"), and every receipt that said `Acked` was processed ("acks only after
/// the handler finishes").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_stopping_with_busy_handlers_does_not_hang_and_acks_nothing_unprocessed() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let processed = seen();
    let ended = Arc::new(AtomicBool::new(false));
    {
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let (processed, ended) = (processed.clone(), ended.clone());
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let v = *d.message();
                let processed = processed.clone();
                tokio::spawn(async move {
                    let t = if v % 10 == 0 { 20_000 } else { v % 5 };
                    tokio::time::sleep(Duration::from_millis(t)).await;
                    *processed.lock().unwrap().entry(v).or_default() += 1;
                    d.ack();
                });
            }
            ended.store(true, Ordering::SeqCst);
        });
    }
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let mut opts = ChannelOptions::new(CH, Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(6));
    let out = a.sender::<u64>(NodeId(2), opts).unwrap();
    let mut rs = Vec::new();
    for v in 0..300u64 {
        rs.push((v, out.send(&v).await.unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    within(9.0, "receiver shutdown with busy handlers", b.shutdown()).await;
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    wait_until(2.0, "the receiver stream ended", || {
        ended.load(Ordering::SeqCst)
    })
    .await;
    let res = settle(rs, 9.0).await;
    let mut failed = 0;
    for (v, r) in &res {
        match r {
            Ok(Outcome::Acked) => assert_eq!(
                processed.lock().unwrap().get(v).copied(),
                Some(1),
                "message {v} acked but not processed"
            ),
            Err(SendError::Deadline { .. }) | Err(SendError::PeerDown { .. }) => failed += 1,
            other => panic!("message {v}: {other:?}"),
        }
    }
    assert!(
        failed >= 30,
        "the 30 busy messages cannot have been acked: {failed}"
    );
    within(10.0, "shutdown a", a.shutdown()).await;
}

/// `Node::decommission` while messages to the peer are still in flight (the peer has
/// just vanished and is not Down yet), handoff on: every receipt still resolves — no
/// hang — as `HandedOff` or a typed error, by the message's deadline plus a little
/// (`Outcome::HandedOff` "will be replayed … until the hint TTL, or the target is
/// decommissioned"; `SendError` "Each variant says whether the receiver may still have
/// the message").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_with_messages_in_flight_resolves_every_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b.local_addr().unwrap())
        .config(handoff_cfg(dir.path()))
        .build()
        .await
        .unwrap();
    let mut opts = ChannelOptions::new(CH, Guarantee::EffectivelyOnce);
    opts.deadline = Some(Duration::from_secs(4));
    let out = a.sender::<u64>(NodeId(2), opts).unwrap();
    let mut rs = Vec::new();
    for v in 0..20u64 {
        rs.push((v, out.send(&v).await.unwrap()));
    }
    let mut held = Vec::new();
    while held.len() < 20 {
        held.push(within(5.0, "deliveries", inbox.recv()).await.unwrap());
    }
    drop(b);
    std::mem::forget(held);
    drop(inbox);
    let dropped = within(5.0, "decommission", a.decommission(NodeId(2)))
        .await
        .unwrap();
    let res = settle(rs, 9.0).await;
    let mut outcomes: HashMap<String, u32> = HashMap::new();
    for (_, r) in &res {
        assert_ne!(r, &Ok(Outcome::Acked), "nobody acked: {res:?}");
        *outcomes.entry(format!("{r:?}")).or_default() += 1;
    }
    let s = a.stats().await.unwrap();
    eprintln!(
        "decommission dropped {dropped}; receipts {outcomes:?}; stats hints {:?}",
        s.hints
    );
    assert_eq!(s.proto.acked, 0);
    within(10.0, "shutdown a", a.shutdown()).await;
}

/// A receiver restarted quickly on the same port (clean shutdown, new process within
/// ~200 ms) while a writer keeps sending at-least-once: the failure detector declares
/// Down only after missed heartbeats (phi ≥ 8 with a 1 s heartbeat), so no Down event
/// and no `PeerDown` for a blip; README: at-least-once "retries … until acked or the
/// deadline (default 30 s)" — every receipt `Acked`, each message processed at least
/// once, and each `Acked` one processed by one of the two runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_restarted_quickly_on_its_port_is_a_blip_not_an_outage() {
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let b_addr = b1.local_addr().unwrap();
    let got = seen();
    consume(b1.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    let a = Arc::new(
        Node::builder(NodeId(1))
            .bind(any_addr())
            .peer(NodeId(2), b_addr)
            .build()
            .await
            .unwrap(),
    );
    wait_health(&a, NodeId(2), Health::Up, 5.0).await;
    let mut events = a.health_events();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_monotonic_sampler(a.clone(), stop.clone());
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let out = a
                .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
                .unwrap();
            let mut rs = Vec::new();
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match out.send(&v).await {
                    Ok(r) => rs.push((v, r)),
                    Err(e) => panic!("send {v} refused during a blip: {e:?}"),
                }
                v += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            rs
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    within(10.0, "b1 shutdown", b1.shutdown()).await;
    drop(b1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b2 = Node::builder(NodeId(2))
        .bind(b_addr)
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    consume(b2.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let rs = within(5.0, "writer", writer).await.unwrap();
    within(5.0, "sampler", sampler).await.unwrap();
    let n = rs.len() as u64;
    let t = Instant::now();
    for (v, r) in settle(rs, 12.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "message {v}");
    }
    eprintln!(
        "{n} messages settled {:?} after the writer stopped",
        t.elapsed()
    );
    {
        let g = got.lock().unwrap();
        for v in 0..n {
            assert!(g.contains_key(&v), "message {v} acked but never processed");
        }
    }
    let evs: Vec<_> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.peer == NodeId(2))
        .collect();
    assert!(
        evs.iter().all(|e| e.to != Health::Down),
        "a 200 ms restart was reported Down: {evs:?}"
    );
    let s = a.stats().await.unwrap();
    assert_eq!(s.proto.gave_up, 0);
    assert_eq!(s.proto.acked, n);
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b2", b2.shutdown()).await;
}

/// `NodeConfig::allow_dynamic_peers`: "Allow `Node::sender` to a peer this node does not
/// know". A sender made before discovery, with messages already sent; then the service
/// registry tells the operator where the peer is and `add_peer` is called: the queued
/// messages reach it (at-least-once "retries … until acked or the deadline").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_peer_discovered_after_the_first_sends_gets_them() {
    let mut cfg = NodeConfig::default();
    cfg.allow_dynamic_peers = true;
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .config(cfg)
        .build()
        .await
        .unwrap();
    let out = a
        .sender::<u64>(NodeId(7), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .expect("a sender to an unknown peer with allow_dynamic_peers");
    let mut rs = Vec::new();
    for v in 0..20u64 {
        rs.push((v, within(5.0, "send", out.send(&v)).await.unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = Node::builder(NodeId(7))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got = seen();
    consume(b.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    a.add_peer(NodeId(7), b.local_addr().unwrap());
    for (v, r) in settle(rs, 10.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "message {v}");
    }
    assert_eq!(distinct(&got), 20);
    wait_health(&a, NodeId(7), Health::Up, 5.0).await;
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// README "Window and credit": each stream has its own credit (default 4 096) and the
/// sending node as a whole 16 384 ("however many streams a peer opens, the receiver
/// holds at most that many of its messages"). A handler that stalls for 4 s holding a
/// full stream credit of one channel leaves the other channel of the same sender
/// flowing, and once it resumes, everything is delivered once with no retransmission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_channel_holding_its_whole_credit_leaves_another_channel_flowing() {
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let stalled = seen();
    let fast = seen();
    let resume = Arc::new(tokio::sync::Notify::new());
    {
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let (stalled, resume) = (stalled.clone(), resume.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            let r = resume.notified();
            tokio::pin!(r);
            loop {
                tokio::select! {
                    d = inbox.recv() => match d {
                        Some(d) => held.push(d),
                        None => return,
                    },
                    _ = &mut r => break,
                }
            }
            for d in held {
                *stalled.lock().unwrap().entry(*d.message()).or_default() += 1;
                d.ack();
            }
            while let Some(d) = inbox.recv().await {
                *stalled.lock().unwrap().entry(*d.message()).or_default() += 1;
                d.ack();
            }
        });
    }
    consume(b.receiver::<u64>(CH2, false).unwrap(), fast.clone(), None);
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let a = Arc::new(a);
    const STALLED: u64 = 5000;
    let slow_sends = {
        let a = a.clone();
        tokio::spawn(async move {
            let out = a
                .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
                .unwrap();
            let mut rs = Vec::new();
            for v in 0..STALLED {
                rs.push((v, out.send(&v).await.unwrap()));
            }
            rs
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let t = Instant::now();
    let out2 = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH2, Guarantee::AtLeastOnce))
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..2000u64 {
        rs.push((
            v,
            within(3.0, "send on the free channel", out2.send(&v))
                .await
                .unwrap(),
        ));
    }
    for (v, r) in settle(rs, 5.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "free-channel message {v}");
    }
    let took = t.elapsed();
    // Not held behind the stuck channel (its messages wait for their 30 s deadline);
    // room for a loaded 2-core machine.
    assert!(took < Duration::from_secs(8), "free channel took {took:?}");
    assert_eq!(distinct(&fast), 2000);
    let after_free = a.stats().await.unwrap().proto.retransmitted;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_resume = a.stats().await.unwrap().proto.retransmitted;
    resume.notify_one();
    let rs = within(10.0, "stalled sends accepted", slow_sends)
        .await
        .unwrap();
    for (v, r) in settle(rs, 12.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "stalled-channel message {v}");
    }
    assert_eq!(distinct(&stalled) as u64, STALLED);
    assert_eq!(total(&stalled), STALLED, "each delivered once");
    // No retransmission while the channel is stalled holding its whole credit (held
    // messages are re-checked by probes, not resent) nor after it resumes. The first
    // RTO of the two fresh streams is not part of the claim: a stream without an RTT
    // sample or any ack yet retransmits after the initial 200 ms RTO whatever the
    // receiver holds, and a test process starved that long (a loaded 2-core CI
    // machine) retransmitted 1 664-5 096 messages there, every one dropped by the
    // receiver as still in progress (`in_progress_dropped` equal to the count, one
    // connection). (Regression: the test asserted 0 over the whole run and failed 5
    // times in 8 under a busy loop.)
    let sa = a.stats().await.unwrap();
    let sb = b.stats().await.unwrap();
    assert_eq!(
        (before_resume, sa.proto.retransmitted),
        (after_free, after_free),
        "retransmissions during the stall or after the resume; a {:?}; b {:?}",
        sa.proto,
        sb.proto
    );
    assert!(
        sb.proto.in_progress_dropped + sb.proto.duplicates_dropped <= after_free,
        "copies the receiver dropped exceed the retransmissions: {:?}",
        sb.proto
    );
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b", b.shutdown()).await;
}

/// A peer that stays away longer than the hint limits: `HintStoreConfig::default_ttl`
/// ("TTL given to hints"), `HintStats::expired` ("Hints dropped because their TTL passed
/// (never returned)"), `max_hint_window` ("Targets down longer than this get no new
/// hints"), `SendError::HandoffRefused` ("the hint store refused it (target down longer
/// than the max hint window …)") and `Stats::handoff_refused`. Limits shortened to 3 s;
/// everything else default. When the peer finally returns, expired hints are not
/// replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_of_a_peer_away_too_long_expire_and_new_ones_are_refused_typed() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let b_addr = b1.local_addr().unwrap();
    let mut cfg = handoff_cfg(dir.path());
    {
        let h = cfg.handoff.as_mut().unwrap();
        h.store.default_ttl = Duration::from_secs(3);
        h.store.max_hint_window = Duration::from_secs(3);
    }
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b_addr)
        .config(cfg)
        .build()
        .await
        .unwrap();
    wait_health(&a, NodeId(2), Health::Up, 5.0).await;
    within(10.0, "b1 shutdown", b1.shutdown()).await;
    drop(b1);
    wait_health(&a, NodeId(2), Health::Down, 12.0).await;
    let down_at = Instant::now();
    let out = a
        .sender::<u64>(
            NodeId(2),
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..10u64 {
        rs.push((v, within(5.0, "send", out.send(&v)).await.unwrap()));
    }
    for (v, r) in settle(rs, 5.0).await {
        assert_eq!(r, Ok(Outcome::HandedOff), "message {v}");
    }
    let end = Instant::now() + Duration::from_secs(7);
    let h = loop {
        let h = a.stats().await.unwrap().hints.unwrap();
        if h.expired >= 10 || Instant::now() > end {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(h.expired, 10, "{h:?}");
    assert_eq!(h.pending, 0, "{h:?}");
    if down_at.elapsed() < Duration::from_millis(3500) {
        tokio::time::sleep(Duration::from_millis(3500) - down_at.elapsed()).await;
    }
    let res = match out.send(&99).await {
        Ok(r) => within(3.0, "receipt past the hint window", r).await,
        Err(e) => Err(e),
    };
    assert!(
        matches!(res, Err(SendError::HandoffRefused { .. })),
        "a send to a target Down longer than the hint window: {res:?}"
    );
    let s = a.stats().await.unwrap();
    assert_eq!(s.handoff_refused, 1, "Stats::handoff_refused");
    assert_eq!(s.handed_off, 10, "Stats::handed_off");

    let b2 = Node::builder(NodeId(2))
        .bind(b_addr)
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got = seen();
    consume(b2.receiver::<u64>(CH, false).unwrap(), got.clone(), None);
    wait_health(&a, NodeId(2), Health::Up, 8.0).await;
    let r = within(5.0, "send", out.send(&1000)).await.unwrap();
    assert_eq!(within(10.0, "receipt", r).await, Ok(Outcome::Acked));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let g = got.lock().unwrap().clone();
    assert_eq!(
        g.keys().copied().collect::<Vec<_>>(),
        vec![1000],
        "expired hints replayed?"
    );
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b2", b2.shutdown()).await;
}

/// The operator moves a peer: a new process with the peer's id starts on a new port
/// while the old one still runs, `add_peer` gives the new address, then the old one is
/// shut down. `Node::add_peer`: "Learn where `peer` is"; the old connection stays
/// while alive ("Two live incarnations of one `NodeId` do not flap") and the new one
/// "takes over once the old connection is gone". Every message of a continuous
/// at-least-once writer is acked, none fails, and the traffic ends up on the new
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_moved_to_a_new_address_while_the_old_process_drains_loses_nothing() {
    let b1 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got1 = seen();
    consume(b1.receiver::<u64>(CH, false).unwrap(), got1.clone(), None);
    let a = Arc::new(
        Node::builder(NodeId(1))
            .bind(any_addr())
            .peer(NodeId(2), b1.local_addr().unwrap())
            .build()
            .await
            .unwrap(),
    );
    wait_health(&a, NodeId(2), Health::Up, 5.0).await;
    let mut events = a.health_events();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let out = a
                .sender::<u64>(NodeId(2), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
                .unwrap();
            let mut rs = Vec::new();
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rs.push((v, out.send(&v).await.expect("send accepted")));
                v += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            rs
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b2 = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got2 = seen();
    consume(b2.receiver::<u64>(CH, false).unwrap(), got2.clone(), None);
    a.add_peer(NodeId(2), b2.local_addr().unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    within(10.0, "b1 shutdown", b1.shutdown()).await;
    drop(b1);
    let moved = Instant::now();
    wait_until(8.0, "traffic reaches the new process", || {
        distinct(&got2) > 20
    })
    .await;
    eprintln!(
        "traffic on the new process {:?} after the old one stopped",
        moved.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let rs = within(5.0, "writer", writer).await.unwrap();
    let n = rs.len() as u64;
    for (v, r) in settle(rs, 12.0).await {
        assert_eq!(r, Ok(Outcome::Acked), "message {v}");
    }
    let g1 = got1.lock().unwrap().clone();
    let g2 = got2.lock().unwrap().clone();
    for v in 0..n {
        assert!(
            g1.contains_key(&v) || g2.contains_key(&v),
            "message {v} acked, never processed"
        );
    }
    let evs: Vec<_> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.peer == NodeId(2))
        .collect();
    eprintln!("health events during the move: {evs:?}");
    assert_eq!(a.health(NodeId(2)), Some(Health::Up));
    within(10.0, "shutdown a", a.shutdown()).await;
    within(10.0, "shutdown b2", b2.shutdown()).await;
}
