//! Black-box: two peers whose configurations differ, as during a rolling deploy or
//! after a config mistake, over real TCP, each side otherwise at the defaults:
//! heartbeat intervals far apart (30 s against 1 s, both roles) or both slower than
//! the detector's default expects, a message refused for its type or for a missing
//! receiver and sent again under the same key once fixed, two payload types on one
//! channel, a sender redeployed with another guarantee on a
//! channel that still has hints, a peer list naming the other node at a wrong address,
//! a stale address on one side only, hinted handoff on one side only, a key horizon
//! shorter than the handler, a sender redeployed with a smaller frame limit over its
//! old hints, and a receiver restarted with a smaller credit, as ordered, or on an
//! older protocol version while thousands of messages are in flight.
//!
//! Found:
//! - a stream kept the payload type fingerprint of its latest send, and stamped every
//!   transmission (first or retransmission) with it: two typed senders of different
//!   types on one channel (an old and a new producer mid-migration) had each `i64`
//!   queued before a `u64` sent as a `u64`, passing the receiver's type check and
//!   decoded as the wrong value (50 of 50 `-1i64` processed as `1u64`, each receipt
//!   `Acked`) (`two_payload_types_on_one_channel_each_carry_their_own_type`; fixed: the
//!   fingerprint is kept per message in its window slot);
//! - two nodes with a slower heartbeat (5 s, accepted up to 1 h) and the default
//!   detector held each other Suspect, then Down, about 3 s into every idle gap between
//!   pings (the detector's 1 s first estimate never learned the interval: a heartbeat
//!   arriving after Down is not recorded), so sends on a healthy idle link could fail
//!   with `PeerDown` (`a_slower_heartbeat_on_both_sides_does_not_flap_an_idle_link`;
//!   fixed: a node raises `detector.first_heartbeat_estimate` to its
//!   `heartbeat_interval`, as it raises the TCP idle timeout);
//! - a sender redeployed with another guarantee on a channel for which its earlier run
//!   left hints: the old hints are never replayed (the replay fails with
//!   `GuaranteeMismatch` against the new run's stream and stops the target's whole
//!   queue, so hints of the target's other channels are stuck too, until the TTL), or,
//!   once they were replayed first, every send of the new run on that channel fails with
//!   `GuaranteeMismatch { existing: EffectivelyOnce }` for the rest of the run
//!   (`a_sender_redeployed_with_another_guarantee_*`; fixed: at-least-once and
//!   effectively-once messages share a stream, each frame carrying its own
//!   message's guarantee, and only the application's sends claim the channel's
//!   guarantee for the run; an earlier run's acked hints on a channel this run sends
//!   at-most-once on are set aside, kept in the store, and do not hold up the
//!   target's other hints: `a_sender_redeployed_at_most_once_*`);
//! - a sender redeployed with a smaller `max_frame_len` replays an earlier run's hint
//!   that no longer fits its frames: each transmission is dropped by its own transport
//!   (`frames_dropped_oversize`, 9 in 8 s), the hint is retried, given up and replayed
//!   again until its TTL (6 h), nobody is told
//!   (`a_hint_larger_than_the_redeployed_senders_frame_limit_does_not_loop`; fixed: a
//!   hint larger than this run's frames can carry is dropped from the store, counted
//!   in `HintStats::rejected` and warned).

use crate::support;

use ackwire::detector::Health;
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, IdKey, Node, NodeConfig, NodeId, Outcome,
    ReceiverOptions, RejectReason, SendError,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::ports::restartable_addr;
use support::wait::{wait_health, within};

/// Handler invocations per value.
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn opts(ch: u32, g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(ChannelId(ch), g)
}

fn hb(secs: u64) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.heartbeat_interval = Duration::from_secs(secs);
    c
}

/// A receiver node `id` on `addr` admitting `allow`, with `cfg`.
async fn receiver_at(id: u64, addr: SocketAddr, allow: &[u64], cfg: NodeConfig) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(addr).config(cfg);
    for p in allow {
        b = b.allow_peer(NodeId(*p));
    }
    within(10.0, "receiver builds", b.build())
        .await
        .expect("receiver node builds")
}

/// A sender node `id` on `addr` knowing `peer` at `peer_addr`, with `cfg`.
async fn sender_at(
    id: u64,
    addr: SocketAddr,
    peer: u64,
    peer_addr: SocketAddr,
    cfg: NodeConfig,
) -> Node {
    within(
        10.0,
        "sender builds",
        Node::builder(NodeId(id))
            .bind(addr)
            .peer(NodeId(peer), peer_addr)
            .config(cfg)
            .build(),
    )
    .await
    .expect("sender node builds")
}

/// Count every `u64` received on `rx`, acking each at once.
fn spawn_counter(mut rx: ackwire::Receiver<u64>, seen: Seen) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            *seen.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
            d.ack();
        }
    })
}

/// Polls `f` every 50 ms for up to `secs`; whether it came to hold.
async fn reached(secs: f64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while !f() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

fn seen_count(seen: &Seen, v: u64) -> u32 {
    seen.lock().unwrap().get(&v).copied().unwrap_or(0)
}

fn tcp(n: &Node) -> ackwire::transport::tcp::TcpStatsSnapshot {
    n.tcp_stats().expect("a TCP node has TCP stats")
}

/// Heartbeat intervals far apart (30 s on one side, the default 1 s on the other), in
/// both roles at once: sender slow / receiver default and sender default / receiver
/// slow. `TcpConfig::idle_timeout` says "the node's heartbeats (a ping each way every
/// `heartbeat_interval`) keep a live connection busy": an idle link must not be cut
/// as half-open and redialed (no `idle_timeouts`, no new connection), both ends keep
/// each other Up through a silence longer than the default idle timeout (10 s), and a
/// message sent after it is acked promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_30s_against_1s_keep_an_idle_link_up_and_prompt() {
    // Pair 1: sender 30 s, receiver default. Pair 2: sender default, receiver 30 s.
    let (r1, r2) = (restartable_addr(), restartable_addr());
    let rx1 = receiver_at(2, r1, &[1], NodeConfig::default()).await;
    let tx1 = sender_at(1, restartable_addr(), 2, r1, hb(30)).await;
    let rx2 = receiver_at(4, r2, &[3], hb(30)).await;
    let tx2 = sender_at(3, restartable_addr(), 4, r2, NodeConfig::default()).await;
    let pairs = [
        (&tx1, &rx1, NodeId(2), NodeId(1)),
        (&tx2, &rx2, NodeId(4), NodeId(3)),
    ];
    let mut outs = Vec::new();
    let mut seens = Vec::new();
    for (i, (tx, rx, to, _)) in pairs.iter().enumerate() {
        let seen: Seen = Arc::default();
        spawn_counter(
            rx.receiver::<u64>(ChannelId(1), false).unwrap(),
            seen.clone(),
        );
        let out = tx
            .sender::<u64>(*to, opts(1, Guarantee::AtLeastOnce))
            .unwrap();
        let r = within(5.0, "first send", async {
            out.send(&0).await.unwrap().await
        })
        .await;
        assert_eq!(r, Ok(Outcome::Acked), "pair {i}: first message");
        outs.push(out);
        seens.push(seen);
    }
    let before: Vec<_> = pairs.iter().map(|(t, r, ..)| (tcp(t), tcp(r))).collect();
    // A silence longer than the default idle timeout (10 s) and the detector's default
    // expectation (about 2.5 s), shorter than 3 × 30 s.
    let mut downs = Vec::new();
    let mut watch: Vec<_> = pairs
        .iter()
        .flat_map(|(t, r, ..)| [t.health_events(), r.health_events()])
        .collect();
    tokio::time::sleep(Duration::from_secs(13)).await;
    for w in &mut watch {
        while let Ok(ev) = w.try_recv() {
            downs.push(format!("{ev:?}"));
        }
    }
    for (i, (tx, rx, to, from)) in pairs.iter().enumerate() {
        let (tb, rb) = &before[i];
        let (ta, ra) = (tcp(tx), tcp(rx));
        assert_eq!(
            ta.idle_timeouts + ra.idle_timeouts,
            0,
            "pair {i}: idle link cut as half-open: sender {ta:?} receiver {ra:?}"
        );
        assert_eq!(
            (ta.connections_opened, ra.connections_opened),
            (tb.connections_opened, rb.connections_opened),
            "pair {i}: the idle link was redialed"
        );
        assert_eq!(tx.health(*to), Some(Health::Up), "pair {i}: sender's view");
        assert_eq!(
            rx.health(*from),
            Some(Health::Up),
            "pair {i}: receiver's view"
        );
    }
    assert!(
        downs.is_empty(),
        "health changes during an idle period: {downs:?}"
    );
    for (i, out) in outs.iter().enumerate() {
        let t0 = Instant::now();
        let r = within(5.0, "send after idle", async {
            out.send(&1).await.unwrap().await
        })
        .await;
        assert_eq!(r, Ok(Outcome::Acked), "pair {i}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "pair {i}: ack after idle took {:?}",
            t0.elapsed()
        );
        assert_eq!(seen_count(&seens[i], 1), 1);
    }
    for n in [&tx1, &rx1, &tx2, &rx2] {
        n.shutdown().await;
    }
}

fn handoff_cfg(dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.handoff = Some(HandoffConfig::new(dir));
    c
}

/// A sender with hinted handoff stores effectively-once messages on channel 1 while
/// its target is down, and is then redeployed with channel 1 switched to
/// at-least-once (same node id, same hint directory). When the target returns, the
/// new run's own at-least-once messages on channel 1 and the earlier run's
/// effectively-once hints must all arrive (or fail with a typed error): a change of
/// guarantee in a new deploy must not strand the old run's hints until their TTL, nor
/// make the new run's sends fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_redeployed_with_another_guarantee_still_replays_its_old_hints() {
    let dir = tempfile::tempdir().unwrap();
    let (r_addr, s_addr) = (restartable_addr(), restartable_addr());
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let s1 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    rx.shutdown().await;
    drop(rx);
    wait_health(&s1, NodeId(2), Health::Down, 10.0).await;
    let old = s1
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    for v in 0..5u64 {
        let r = within(5.0, "old run's send", async {
            old.send(&v).await.unwrap().await
        })
        .await;
        assert_eq!(r, Ok(Outcome::HandedOff), "value {v}");
    }
    // A second channel, same guarantee in both runs: must not be held up either.
    let other = s1
        .sender::<u64>(NodeId(2), opts(2, Guarantee::EffectivelyOnce))
        .unwrap();
    for v in 10..13u64 {
        let r = within(5.0, "old run's send ch2", async {
            other.send(&v).await.unwrap().await
        })
        .await;
        assert_eq!(r, Ok(Outcome::HandedOff), "value {v}");
    }
    s1.shutdown().await;
    drop(s1);

    // The redeploy: channel 1 is now at-least-once.
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let seen1: Seen = Arc::default();
    let seen2: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen1.clone(),
    );
    spawn_counter(
        rx.receiver::<u64>(ChannelId(2), false).unwrap(),
        seen2.clone(),
    );
    let s2 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    let new = s2
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let mut results = Vec::new();
    for v in 100..105u64 {
        let r = within(15.0, "new run's send", new.send(&v)).await;
        match r {
            Ok(fut) => results.push(within(15.0, "new run's receipt", fut).await),
            Err(e) => results.push(Err(e)),
        }
    }
    for (i, r) in results.iter().enumerate() {
        assert!(
            matches!(r, Ok(Outcome::Acked)),
            "new run's at-least-once message {i} on the re-guaranteed channel: {r:?}"
        );
    }
    let replayed = reached(10.0, || {
        (0..5).all(|v| seen_count(&seen1, v) >= 1) && (10..13).all(|v| seen_count(&seen2, v) >= 1)
    })
    .await;
    let stats = s2.stats().await.unwrap();
    let snapshot = (seen1.lock().unwrap().clone(), seen2.lock().unwrap().clone());
    assert!(
        replayed,
        "hints of the earlier run not replayed within 10 s: seen (ch1, ch2) {snapshot:?}, hints {:?}",
        stats.hints
    );
    for v in 0..5 {
        assert_eq!(seen_count(&seen1, v), 1, "old hint {v} processed once");
    }
    s2.shutdown().await;
    rx.shutdown().await;
}

/// As above, but the redeployed run sends on the re-guaranteed channel only after the
/// earlier run's hints were all delivered: its at-least-once sends must then work
/// (nothing of the old guarantee is left on the channel in this run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_redeployed_with_another_guarantee_can_send_after_old_hints_drain() {
    let dir = tempfile::tempdir().unwrap();
    let (r_addr, s_addr) = (restartable_addr(), restartable_addr());
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let s1 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    rx.shutdown().await;
    drop(rx);
    wait_health(&s1, NodeId(2), Health::Down, 10.0).await;
    let old = s1
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    for v in 0..3u64 {
        let r = within(5.0, "old run's send", async {
            old.send(&v).await.unwrap().await
        })
        .await;
        assert_eq!(r, Ok(Outcome::HandedOff), "value {v}");
    }
    s1.shutdown().await;
    drop(s1);

    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let seen: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let s2 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    let drained = reached(10.0, || (0..3).all(|v| seen_count(&seen, v) == 1)).await;
    assert!(
        drained,
        "old hints not replayed: {:?}",
        seen.lock().unwrap()
    );
    let t0 = Instant::now();
    while s2.stats().await.unwrap().hints.unwrap().pending > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "hint store not emptied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = s2
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let r = within(10.0, "new run's send", async {
        match new.send(&100).await {
            Ok(r) => r.await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert_eq!(
        r,
        Ok(Outcome::Acked),
        "the new run never used EffectivelyOnce on channel 1; the old hints are gone"
    );
    assert_eq!(seen_count(&seen, 100), 1);
    s2.shutdown().await;
    rx.shutdown().await;
}

/// The other direction: hints an earlier run stored at-least-once, replayed by a run
/// that made the channel effectively-once. Both must arrive: every old hint at least
/// once, every new effectively-once message exactly once, and the new run's sends are
/// never refused (`GuaranteeMismatch`) because of the old hints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_redeployed_effectively_once_replays_its_old_at_least_once_hints() {
    let dir = tempfile::tempdir().unwrap();
    let (r_addr, s_addr) = (restartable_addr(), restartable_addr());
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let s1 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    rx.shutdown().await;
    drop(rx);
    wait_health(&s1, NodeId(2), Health::Down, 10.0).await;
    let old = s1
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    for v in 0..20u64 {
        let r = within(5.0, "old run's send", async {
            old.send(&v).await.unwrap().await
        })
        .await;
        assert_eq!(r, Ok(Outcome::HandedOff), "value {v}");
    }
    s1.shutdown().await;
    drop(s1);

    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let seen: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let s2 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    let new = s2
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    // Sent while the old hints replay (the replay starts once the link is up).
    let mut receipts = Vec::new();
    for v in 100..200u64 {
        receipts.push(within(15.0, "new run's send", new.send(&v)).await);
    }
    for (i, r) in receipts.into_iter().enumerate() {
        let r = match r {
            Ok(fut) => within(15.0, "new run's receipt", fut).await,
            Err(e) => Err(e),
        };
        assert_eq!(r, Ok(Outcome::Acked), "new run's message {i}");
    }
    let replayed = reached(15.0, || (0..20).all(|v| seen_count(&seen, v) >= 1)).await;
    let hints = s2.stats().await.unwrap().hints;
    let snapshot = seen.lock().unwrap().clone();
    assert!(
        replayed,
        "old at-least-once hints not replayed: {snapshot:?}, hints {hints:?}"
    );
    for v in 100..200 {
        assert_eq!(seen_count(&seen, v), 1, "effectively-once {v}");
    }
    let t0 = Instant::now();
    while s2.stats().await.unwrap().hints.unwrap().pending > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "hint store not emptied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s2.shutdown().await;
    rx.shutdown().await;
}

/// A sender whose earlier run stored at-least-once hints on channels 1 and 2 is
/// redeployed sending channel 1 at-most-once. Whichever comes first (the replay of
/// channel 1's hints or the new run's first at-most-once send):
/// - channel 2's hints are replayed (not held up behind channel 1's);
/// - the new run's at-most-once sends on channel 1 go through within seconds (at most
///   refused while old hints are in flight there), then every one of them is accepted
///   and, on an unfaulted loopback link, processed once;
/// - no old hint of channel 1 is lost: each is processed, or still in the store, and a
///   third run that uses channel 1 at-least-once again delivers what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_redeployed_at_most_once_keeps_its_old_hints_and_replays_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (r_addr, s_addr) = (restartable_addr(), restartable_addr());
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let s1 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    rx.shutdown().await;
    drop(rx);
    wait_health(&s1, NodeId(2), Health::Down, 10.0).await;
    for ch in [1u32, 2] {
        let old = s1
            .sender::<u64>(NodeId(2), opts(ch, Guarantee::AtLeastOnce))
            .unwrap();
        for v in 0..5u64 {
            let v = u64::from(ch) * 10 + v;
            let r = within(5.0, "old run's send", async {
                old.send(&v).await.unwrap().await
            })
            .await;
            assert_eq!(r, Ok(Outcome::HandedOff), "value {v}");
        }
    }
    s1.shutdown().await;
    drop(s1);

    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let seen1: Seen = Arc::default();
    let seen2: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen1.clone(),
    );
    spawn_counter(
        rx.receiver::<u64>(ChannelId(2), false).unwrap(),
        seen2.clone(),
    );
    let s2 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    wait_health(&s2, NodeId(2), Health::Up, 10.0).await;
    let amo = s2
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtMostOnce))
        .unwrap();
    // The first at-most-once send may be refused while old hints are in flight on the
    // channel; it must go through within seconds.
    let t0 = Instant::now();
    let mut refusals = 0u32;
    loop {
        // (The refusal may come from `send` or from its receipt.)
        let r = match within(10.0, "first at-most-once send", amo.send(&1000)).await {
            Ok(r) => within(10.0, "receipt", r).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(Outcome::Sent) => break,
            Err(SendError::GuaranteeMismatch { .. }) => refusals += 1,
            other => panic!("at-most-once send: {other:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "at-most-once sends on channel 1 still refused after 15 s ({refusals} refusals)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for v in 1001..1021u64 {
        let r = within(10.0, "at-most-once send", async {
            amo.send(&v)
                .await
                .map_err(|e| format!("{e}"))?
                .await
                .map_err(|e| format!("{e}"))
        })
        .await;
        assert_eq!(
            r,
            Ok(Outcome::Sent),
            "at-most-once {v} once the channel is this run's"
        );
    }
    let amo_arrived = reached(10.0, || (1000..1021).all(|v| seen_count(&seen1, v) == 1)).await;
    assert!(
        amo_arrived,
        "at-most-once messages on channel 1: {:?}",
        seen1.lock().unwrap()
    );
    let other = reached(15.0, || (20..25).all(|v| seen_count(&seen2, v) >= 1)).await;
    let hints = s2.stats().await.unwrap().hints;
    let snapshot = seen2.lock().unwrap().clone();
    assert!(
        other,
        "channel 2's hints held up: {snapshot:?}, hints {hints:?}"
    );
    // Channel 1's old hints: processed, or still in the store.
    let processed = (10..15).filter(|v| seen_count(&seen1, *v) >= 1).count() as u64;
    let pending = s2.stats().await.unwrap().hints.unwrap().pending;
    assert!(
        processed + pending >= 5,
        "channel 1's old hints lost: {processed} processed, {pending} pending"
    );
    s2.shutdown().await;
    drop(s2);

    // A third run using channel 1 at-least-once again: what is left is delivered.
    let s3 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    let alo = s3
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let r = within(15.0, "third run's send", async {
        match alo.send(&2000).await {
            Ok(r) => r.await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert_eq!(r, Ok(Outcome::Acked));
    let all = reached(15.0, || (10..15).all(|v| seen_count(&seen1, v) >= 1)).await;
    let hints = s3.stats().await.unwrap().hints;
    let snapshot = seen1.lock().unwrap().clone();
    assert!(
        all,
        "channel 1's old hints not delivered by a run using it at-least-once: {snapshot:?}, hints {hints:?}"
    );
    s3.shutdown().await;
    rx.shutdown().await;
}

/// Two typed senders of different payload types on one channel to one peer (an old
/// and a new version of a producer in one process, mid-migration), the receiver typed
/// as one of them. The README: "a typed `Sender<T>` sends a fingerprint of `T`'s name
/// ... with each message, and a typed `Receiver<U>` whose type ... differs rejects it
/// before decoding (`Rejected { reason: TypeMismatch }`)". Each message must carry its
/// own sender's type: every `i64` is refused as `TypeMismatch`, never decoded as a
/// `u64` (the bytes of `-1i64` read as `1u64`), and every `u64` is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_payload_types_on_one_channel_each_carry_their_own_type() {
    let r_addr = restartable_addr();
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let tx = sender_at(1, restartable_addr(), 2, r_addr, NodeConfig::default()).await;
    let got: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut inbox = rx.receiver::<u64>(ChannelId(1), false).unwrap();
    let g = got.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            g.lock().unwrap().push(*d.message());
            d.ack();
        }
    });
    let old = tx
        .sender::<i64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let new = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let mut olds = Vec::new();
    let mut news = Vec::new();
    for i in 0..50u64 {
        // Queued back to back, before the driver transmits either.
        olds.push(old.send(&-1).await.unwrap());
        news.push(new.send(&(1000 + i)).await.unwrap());
    }
    let mut old_results = HashMap::new();
    for r in olds {
        let o = within(10.0, "old-type receipt", r).await;
        *old_results.entry(format!("{o:?}")).or_insert(0) += 1;
    }
    for r in news {
        assert_eq!(
            within(10.0, "new-type receipt", r).await,
            Ok(Outcome::Acked)
        );
    }
    let got = got.lock().unwrap().clone();
    let wrong: Vec<u64> = got.iter().copied().filter(|v| *v < 1000).collect();
    assert!(
        wrong.is_empty(),
        "i64 payloads decoded as u64 ({} of them, e.g. {:?}); old-type receipts {old_results:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(got.len(), 50, "every u64 processed once");
    assert_eq!(
        old_results.get(&format!(
            "{:?}",
            Err::<Outcome, _>(SendError::Rejected {
                reason: RejectReason::TypeMismatch
            })
        )),
        Some(&50),
        "{old_results:?}"
    );
    tx.shutdown().await;
    rx.shutdown().await;
}

/// The sender's peer list names the receiver (node 2) at an address where another
/// node (3) listens, and node 3 even admits the sender. The sender must refuse the
/// node that answers (`rejected_wrong_peer`), never deliver node 2's messages to node
/// 3, and its receipts must fail with a typed error within the deadline (no hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_list_naming_the_wrong_address_fails_typed_and_delivers_nothing_there() {
    let q_addr = restartable_addr();
    let q = receiver_at(3, q_addr, &[1], NodeConfig::default()).await;
    let seen: Seen = Arc::default();
    spawn_counter(
        q.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let tx = sender_at(1, restartable_addr(), 2, q_addr, NodeConfig::default()).await;
    let mut o = opts(1, Guarantee::EffectivelyOnce);
    o.deadline = Some(Duration::from_secs(4));
    let out = tx.sender::<u64>(NodeId(2), o).unwrap();
    let amo = tx
        .sender::<u64>(NodeId(2), opts(2, Guarantee::AtMostOnce))
        .unwrap();
    let mut results = Vec::new();
    for v in 0..5u64 {
        let r = within(8.0, "send to the misaddressed peer", async {
            match out.send(&v).await {
                Ok(r) => r.await,
                Err(e) => Err(e),
            }
        })
        .await;
        results.push(r);
    }
    for r in &results {
        assert!(
            matches!(
                r,
                Err(SendError::Deadline { .. }) | Err(SendError::PeerDown { .. })
            ),
            "{results:?}"
        );
    }
    // At-most-once waits for credit without a deadline: it must fail once the peer is
    // Down, not hang.
    let r = within(10.0, "at-most-once to the misaddressed peer", async {
        match amo.send(&9).await {
            Ok(r) => r.await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(matches!(r, Err(SendError::PeerDown { .. })), "{r:?}");
    assert_ne!(tx.health(NodeId(2)), Some(Health::Up));
    let t = tcp(&tx);
    assert!(
        t.rejected_wrong_peer >= 1,
        "the wrong node was not counted: {t:?}"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "node 3 processed node 2's messages"
    );
    assert_eq!(q.stats().await.unwrap().proto.delivered, 0);
    tx.shutdown().await;
    q.shutdown().await;
}

/// A rolling deploy where the receiver still runs the old payload type: an
/// effectively-once message under an application key is refused with `TypeMismatch`
/// (never processed). The README says a refused message is "not recorded as
/// processed", so when the producer is rolled back (or the receiver catches up) and
/// sends the same key again with the right type, it must be processed, exactly once,
/// not acked as a duplicate of the refused one. Likewise for a key refused with
/// `NoReceiver` before the channel's receiver was registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_refused_for_its_type_or_a_missing_receiver_is_processed_when_sent_again() {
    let r_addr = restartable_addr();
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let tx = sender_at(1, restartable_addr(), 2, r_addr, NodeConfig::default()).await;
    let seen: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let wrong = tx
        .sender::<String>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = within(10.0, "wrong type", async {
        wrong
            .send_with_key(&"v2".to_string(), IdKey(501))
            .await
            .unwrap()
            .await
    })
    .await;
    assert_eq!(
        r,
        Err(SendError::Rejected {
            reason: RejectReason::TypeMismatch
        })
    );
    let right = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = within(10.0, "right type, same key", async {
        right.send_with_key(&501, IdKey(501)).await.unwrap().await
    })
    .await;
    assert_eq!(r, Ok(Outcome::Acked));
    assert_eq!(
        seen_count(&seen, 501),
        1,
        "the corrected message was processed"
    );

    // No receiver on channel 9 yet: refused after the grace (5 s).
    let late = tx
        .sender::<u64>(NodeId(2), opts(9, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = within(12.0, "no receiver", async {
        late.send_with_key(&902, IdKey(902)).await.unwrap().await
    })
    .await;
    assert_eq!(
        r,
        Err(SendError::Rejected {
            reason: RejectReason::NoReceiver
        })
    );
    let seen9: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(9), false).unwrap(),
        seen9.clone(),
    );
    let r = within(10.0, "same key, receiver now there", async {
        late.send_with_key(&902, IdKey(902)).await.unwrap().await
    })
    .await;
    assert_eq!(r, Ok(Outcome::Acked));
    assert!(
        reached(2.0, || seen_count(&seen9, 902) == 1).await,
        "{:?}",
        seen9.lock().unwrap()
    );
    // And once processed, the key is a duplicate: not processed again.
    let r = within(10.0, "processed key again", async {
        right.send_with_key(&501, IdKey(501)).await.unwrap().await
    })
    .await;
    assert_eq!(r, Ok(Outcome::Acked));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen_count(&seen, 501), 1);
    tx.shutdown().await;
    rx.shutdown().await;
}

/// A receiver killed with thousands of a sender's messages in flight under the default
/// credit (4 096 per stream), and restarted on the same address with the smallest
/// credit (`stream_credit` and `node_credit` 256). The sender's old grant is void for
/// the new run: every message must still be delivered and acked well before its
/// deadline (none dropped as over-credit for good, none failing at the deadline), and
/// the new run's bound must hold from its first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_restarted_with_a_smaller_credit_still_takes_every_in_flight_message() {
    const N: u64 = 3000;
    let r_addr = restartable_addr();
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let tx = sender_at(1, restartable_addr(), 2, r_addr, NodeConfig::default()).await;
    // The first run holds every delivery without finishing it.
    let mut inbox = rx.receiver::<u64>(ChannelId(1), false).unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let holder = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            h.lock().unwrap().push(d);
        }
    });
    let out = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for v in 0..N {
        receipts.push(within(5.0, "send", out.send(&v)).await.unwrap());
    }
    assert!(reached(10.0, || held.lock().unwrap().len() as u64 >= N / 2).await);
    // Killed: the node dropped with the deliveries still held (as a crash leaves them).
    drop(rx);
    holder.abort();
    std::mem::forget(std::mem::take(&mut *held.lock().unwrap()));
    let mut small = NodeConfig::default();
    small.proto.stream_credit = 256;
    small.proto.node_credit = 256;
    let rx = receiver_at(2, r_addr, &[1], small).await;
    let seen: Seen = Arc::default();
    let most = Arc::new(Mutex::new(0usize));
    let mut inbox = rx.receiver::<u64>(ChannelId(1), false).unwrap();
    let (s, m) = (seen.clone(), most.clone());
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while inbox.recv_many(&mut batch, usize::MAX).await > 0 {
            {
                let mut mm = m.lock().unwrap();
                *mm = (*mm).max(batch.len());
            }
            for d in batch.drain(..) {
                *s.lock().unwrap().entry(*d.message()).or_insert(0) += 1;
                d.ack();
            }
        }
    });
    let t0 = Instant::now();
    let mut tally: HashMap<String, usize> = HashMap::new();
    for r in receipts {
        let o = within(25.0, "receipt after the restart", r).await;
        *tally.entry(format!("{o:?}")).or_insert(0) += 1;
    }
    assert_eq!(
        tally.get("Ok(Acked)"),
        Some(&(N as usize)),
        "{tally:?} after {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    let missing = (0..N).filter(|v| seen_count(&seen, *v) == 0).count();
    assert_eq!(missing, 0, "values never processed by the new run");
    let most = *most.lock().unwrap();
    assert!(
        most <= 256 + 256,
        "the new run was handed {most} at once, over its credit"
    );
    tx.shutdown().await;
    rx.shutdown().await;
}

/// A receiver killed while an effectively-once sender has messages in flight, and
/// redeployed with `ReceiverOptions::ordered()` on the channel that was unordered,
/// while the sender keeps sending. The new run's first deliveries must follow send
/// order (rule 1 of the ordered contract), every message must be acked, and none
/// processed twice by the new run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_redeployed_ordered_delivers_the_in_flight_backlog_in_send_order() {
    const N: u64 = 1500;
    let r_addr = restartable_addr();
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let tx = sender_at(1, restartable_addr(), 2, r_addr, NodeConfig::default()).await;
    let mut inbox = rx.receiver::<u64>(ChannelId(1), false).unwrap();
    let processed: Seen = Arc::default();
    let p = processed.clone();
    // The first run finishes the even values only, holding the odd ones.
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let first = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            let v = *d.message();
            if v % 2 == 0 {
                *p.lock().unwrap().entry(v).or_insert(0) += 1;
                d.ack();
            } else {
                h.lock().unwrap().push(d);
            }
        }
    });
    let out = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for v in 0..N / 2 {
        receipts.push(within(5.0, "send", out.send(&v)).await.unwrap());
    }
    assert!(reached(10.0, || held.lock().unwrap().len() as u64 >= N / 4 - 10).await);
    drop(rx);
    first.abort();
    std::mem::forget(std::mem::take(&mut *held.lock().unwrap()));
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let order: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut inbox = rx
        .receiver_with::<u64>(ChannelId(1), ReceiverOptions::ordered())
        .unwrap();
    let o = order.clone();
    let again: Seen = Arc::default();
    let a = again.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            let v = *d.message();
            o.lock().unwrap().push(v);
            *a.lock().unwrap().entry(v).or_insert(0) += 1;
            d.ack();
        }
    });
    for v in N / 2..N {
        receipts.push(within(10.0, "send", out.send(&v)).await.unwrap());
    }
    let mut tally: HashMap<String, usize> = HashMap::new();
    for r in receipts {
        let o = within(25.0, "receipt", r).await;
        *tally.entry(format!("{o:?}")).or_insert(0) += 1;
    }
    assert_eq!(tally.get("Ok(Acked)"), Some(&(N as usize)), "{tally:?}");
    let order = order.lock().unwrap().clone();
    let inversions: Vec<(u64, u64)> = order
        .windows(2)
        .filter(|w| w[1] < w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        inversions.is_empty(),
        "the ordered run delivered out of send order: {} inversions, first {:?}",
        inversions.len(),
        &inversions[..inversions.len().min(5)]
    );
    let twice: Vec<u64> = again
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(v, _)| *v)
        .collect();
    assert!(
        twice.is_empty(),
        "processed twice by the new run: {twice:?}"
    );
    // Everything the first run did not finish was processed by the second.
    let missing = (0..N)
        .filter(|v| seen_count(&processed, *v) == 0 && seen_count(&again, *v) == 0)
        .count();
    assert_eq!(missing, 0);
    tx.shutdown().await;
    rx.shutdown().await;
}

/// One node with hinted handoff, the other without, sending to each other on one
/// channel. Each restarts in turn while the other keeps sending: the handoff node's
/// messages to the absent peer are `HandedOff` and delivered, once each, when it
/// returns; the node without handoff fails its sends to the absent peer with a typed
/// `PeerDown` (no hang), and sends again normally once the peer is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_on_one_side_only_each_side_keeps_its_own_promise() {
    let dir = tempfile::tempdir().unwrap();
    let (a_addr, b_addr) = (restartable_addr(), restartable_addr());
    let build = |id: u64, addr: SocketAddr, peer: u64, peer_addr: SocketAddr, cfg: NodeConfig| {
        sender_at(id, addr, peer, peer_addr, cfg)
    };
    let a = build(1, a_addr, 2, b_addr, handoff_cfg(dir.path())).await;
    let b = build(2, b_addr, 1, a_addr, NodeConfig::default()).await;
    let at_b: Seen = Arc::default();
    spawn_counter(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        at_b.clone(),
    );
    let at_a: Seen = Arc::default();
    spawn_counter(
        a.receiver::<u64>(ChannelId(1), false).unwrap(),
        at_a.clone(),
    );
    let a_out = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let b_out = b
        .sender::<u64>(NodeId(1), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let send = |out: &ackwire::Sender<u64>, v: u64| {
        let out = out.clone();
        async move {
            match out.send(&v).await {
                Ok(r) => r.await,
                Err(e) => Err(e),
            }
        }
    };
    assert_eq!(
        within(5.0, "a->b", send(&a_out, 1)).await,
        Ok(Outcome::Acked)
    );
    assert_eq!(
        within(5.0, "b->a", send(&b_out, 1)).await,
        Ok(Outcome::Acked)
    );
    // B (no handoff) goes away: A hands off.
    b.shutdown().await;
    drop((b, b_out));
    wait_health(&a, NodeId(2), Health::Down, 10.0).await;
    for v in 10..15 {
        assert_eq!(
            within(5.0, "a->absent b", send(&a_out, v)).await,
            Ok(Outcome::HandedOff)
        );
    }
    let b = build(2, b_addr, 1, a_addr, NodeConfig::default()).await;
    let at_b2: Seen = Arc::default();
    spawn_counter(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        at_b2.clone(),
    );
    assert!(
        reached(10.0, || (10..15).all(|v| seen_count(&at_b2, v) == 1)).await,
        "hints not delivered to the returning node without handoff: {:?}",
        at_b2.lock().unwrap()
    );
    // A (handoff) goes away: B has no handoff, so its sends fail typed.
    let b_out = b
        .sender::<u64>(NodeId(1), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    assert_eq!(
        within(5.0, "b->a", send(&b_out, 2)).await,
        Ok(Outcome::Acked)
    );
    a.shutdown().await;
    drop((a, a_out));
    wait_health(&b, NodeId(1), Health::Down, 10.0).await;
    let r = within(5.0, "b->absent a", send(&b_out, 20)).await;
    assert!(matches!(r, Err(SendError::PeerDown { .. })), "{r:?}");
    let a = build(1, a_addr, 2, b_addr, handoff_cfg(dir.path())).await;
    let at_a2: Seen = Arc::default();
    spawn_counter(
        a.receiver::<u64>(ChannelId(1), false).unwrap(),
        at_a2.clone(),
    );
    wait_health(&b, NodeId(1), Health::Up, 10.0).await;
    assert_eq!(
        within(10.0, "b->returned a", send(&b_out, 21)).await,
        Ok(Outcome::Acked)
    );
    assert_eq!(seen_count(&at_a2, 20), 0, "a failed send must not arrive");
    assert_eq!(seen_count(&at_a2, 21), 1);
    let t0 = Instant::now();
    while a.stats().await.unwrap().hints.unwrap().pending != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "hints left pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A receiver whose key horizon (3 s) is far below its sender's retry deadline (the
/// default 30 s) and below its own handler's time (6 s): the horizon counts from
/// completion ("how long a completed application key is remembered"), so a copy of
/// the key sent while the handler still works is not delivered (it is answered with
/// the original), and one sent just after completion is a duplicate. The handler runs
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_horizon_shorter_than_the_handler_does_not_let_a_copy_through() {
    let r_addr = restartable_addr();
    let mut cfg = NodeConfig::default();
    cfg.dedup.horizon = Duration::from_secs(3);
    let rx = receiver_at(2, r_addr, &[1], cfg).await;
    let tx = sender_at(1, restartable_addr(), 2, r_addr, NodeConfig::default()).await;
    let runs = Arc::new(Mutex::new(0u32));
    let mut inbox = rx.receiver::<u64>(ChannelId(1), false).unwrap();
    let rr = runs.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *rr.lock().unwrap() += 1;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(6)).await;
                d.ack();
            });
        }
    });
    let out = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let first = out.send_with_key(&7, IdKey(7)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let copy = out.send_with_key(&7, IdKey(7)).await.unwrap();
    assert_eq!(within(15.0, "first", first).await, Ok(Outcome::Acked));
    assert_eq!(within(15.0, "copy", copy).await, Ok(Outcome::Acked));
    let after = within(10.0, "copy after completion", async {
        out.send_with_key(&7, IdKey(7)).await.unwrap().await
    })
    .await;
    assert_eq!(after, Ok(Outcome::Acked));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *runs.lock().unwrap(),
        1,
        "the handler ran more than once for one key"
    );
    tx.shutdown().await;
    rx.shutdown().await;
}

/// A receiver rolled back to an older protocol (versions 1..=1: no credit, no reject
/// frames) and then forward again, each time killed with a sender's effectively-once
/// messages in flight. The sender's credit state from the previous run must not stall
/// or lose anything: every receipt `Acked` well before the deadline, each value
/// processed at least once, none twice by one run that finished it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_rolled_back_and_forward_across_protocol_versions_mid_stream() {
    use ackwire::transport::tcp::TcpConfig;
    use ackwire::wire::VersionRange;
    const N: u64 = 2000;
    let r_addr = restartable_addr();
    let start = |versions: VersionRange| async move {
        let t = TcpConfig {
            versions,
            ..TcpConfig::default()
        };
        within(
            10.0,
            "receiver builds",
            Node::builder(NodeId(2))
                .tcp(r_addr, t)
                .allow_peer(NodeId(1))
                .build(),
        )
        .await
        .unwrap()
    };
    let v1 = VersionRange { min: 1, max: 1 };
    let tx = sender_at(1, restartable_addr(), 2, r_addr, NodeConfig::default()).await;
    let out = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let seen: Seen = Arc::default();
    let mut receipts = Vec::new();
    let mut next = 0u64;
    for (run, versions) in [VersionRange::default(), v1, VersionRange::default()]
        .into_iter()
        .enumerate()
    {
        let rx = start(versions).await;
        let mut inbox = rx.receiver::<u64>(ChannelId(1), false).unwrap();
        let s = seen.clone();
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = held.clone();
        let last = run == 2;
        let finishing = Arc::new(AtomicBool::new(true));
        let f = finishing.clone();
        let task = tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let v = *d.message();
                // Earlier runs finish only a third, and hold the rest when killed.
                if last || (v % 3 == 0 && f.load(Ordering::SeqCst)) {
                    *s.lock().unwrap().entry(v).or_insert(0) += 1;
                    d.ack();
                } else {
                    h.lock().unwrap().push(d);
                }
            }
        });
        for _ in 0..N / 2 {
            receipts.push(within(10.0, "send", out.send(&next)).await.unwrap());
            next += 1;
        }
        assert!(
            reached(15.0, || tx.protocol_version(NodeId(2))
                == Some(versions.max))
            .await,
            "run {run}: spoke {:?}, not {}",
            tx.protocol_version(NodeId(2)),
            versions.max
        );
        if last {
            let t0 = Instant::now();
            let mut tally: HashMap<String, usize> = HashMap::new();
            for r in std::mem::take(&mut receipts) {
                let o = within(25.0, "receipt", r).await;
                *tally.entry(format!("{o:?}")).or_insert(0) += 1;
            }
            assert_eq!(
                tally.get("Ok(Acked)"),
                Some(&(next as usize)),
                "{tally:?} after {:?}",
                t0.elapsed()
            );
            let missing = (0..next).filter(|v| seen_count(&seen, *v) == 0).count();
            assert_eq!(missing, 0);
            rx.shutdown().await;
        } else {
            assert!(
                reached(10.0, || held.lock().unwrap().len() >= 200).await,
                "run {run} received too little"
            );
            // Finish no more, and let the acks of what was finished reach the sender
            // before the kill: a finished message whose ack dies with the run may be
            // processed again (no durable dedup), and how many that are depends only
            // on how loaded the machine is. (It was 102 on a busy 2-core machine.)
            finishing.store(false, Ordering::SeqCst);
            let finished = seen.lock().unwrap().len() as u64;
            let end = Instant::now() + Duration::from_secs(10);
            while tx.stats().await.unwrap().proto.acked < finished && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(rx);
            task.abort();
            std::mem::forget(std::mem::take(&mut *held.lock().unwrap()));
        }
    }
    let twice: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(v, c)| **c > 1 && **v % 3 == 0)
        .map(|(v, _)| *v)
        .collect();
    // Without durable dedup a restart may process a finished message again only if its
    // ack was lost with the run; each run's acks were waited for, so no more than a
    // handful.
    assert!(
        twice.len() <= 64,
        "finished values processed again: {}",
        twice.len()
    );
    tx.shutdown().await;
}

/// Two nodes that both list each other, one of them at a stale address where nothing
/// listens (the other moved). The good connection (dialed by the node that has the
/// right address) must carry traffic both ways: the stale side's failing redials must
/// not cut it, mark the peer Down, or fail its sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_address_on_one_side_does_not_disturb_the_link_the_other_side_dialed() {
    let (a_addr, b_addr) = (restartable_addr(), restartable_addr());
    let nowhere = restartable_addr(); // nothing listens here
    let a = sender_at(1, a_addr, 2, nowhere, NodeConfig::default()).await;
    let b = sender_at(2, b_addr, 1, a_addr, NodeConfig::default()).await;
    let at_a: Seen = Arc::default();
    let at_b: Seen = Arc::default();
    spawn_counter(
        a.receiver::<u64>(ChannelId(1), false).unwrap(),
        at_a.clone(),
    );
    spawn_counter(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        at_b.clone(),
    );
    let a_out = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let b_out = b
        .sender::<u64>(NodeId(1), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let mut events = vec![a.health_events(), b.health_events()];
    let mut failures = Vec::new();
    let t0 = Instant::now();
    let mut v = 0u64;
    while t0.elapsed() < Duration::from_secs(8) {
        for (name, out) in [("a->b", &a_out), ("b->a", &b_out)] {
            let r = within(10.0, name, async {
                match out.send(&v).await {
                    Ok(r) => r.await,
                    Err(e) => Err(e),
                }
            })
            .await;
            if r != Ok(Outcome::Acked) {
                failures.push(format!("{name} {v} at {:?}: {r:?}", t0.elapsed()));
            }
        }
        v += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut changes = Vec::new();
    for e in &mut events {
        while let Ok(ev) = e.try_recv() {
            changes.push(format!("{ev:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} sends failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(changes.is_empty(), "health changed: {changes:?}");
    let (ta, tb) = (tcp(&a), tcp(&b));
    assert!(
        ta.connections_closed + tb.connections_closed <= 1,
        "the link churned: a {ta:?}\nb {tb:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A sender whose peer list names the receiver at an address where nothing listens:
/// its sends fail typed (the peer is held Down), and once the application gives the
/// right address with `Node::add_peer`, the sender connects and new sends are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_peer_address_corrected_with_add_peer_recovers() {
    let r_addr = restartable_addr();
    let nowhere = restartable_addr();
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let seen: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let tx = sender_at(1, restartable_addr(), 2, nowhere, NodeConfig::default()).await;
    let out = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    wait_health(&tx, NodeId(2), Health::Down, 10.0).await;
    let r = within(5.0, "send while misaddressed", async {
        match out.send(&1).await {
            Ok(r) => r.await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(matches!(r, Err(SendError::PeerDown { .. })), "{r:?}");
    tx.add_peer(NodeId(2), r_addr);
    wait_health(&tx, NodeId(2), Health::Up, 10.0).await;
    let r = within(10.0, "send after the correction", async {
        match out.send(&2).await {
            Ok(r) => r.await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert_eq!(r, Ok(Outcome::Acked));
    assert_eq!(seen_count(&seen, 2), 1);
    assert_eq!(seen_count(&seen, 1), 0);
    tx.shutdown().await;
    rx.shutdown().await;
}

/// A sender with hinted handoff stores a 200 KiB message for its absent target, and is
/// redeployed with a smaller frame limit (`max_frame_len` 64 KiB, `max_payload` to
/// match). The old hint no longer fits its own run's frames: it cannot ever be sent.
/// It must not be retransmitted into the transport's oversize drop over and over;
/// the other messages on the channel must be delivered. (Found: it was, about once a
/// second until its 6 h TTL; now dropped from the store and counted as rejected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_larger_than_the_redeployed_senders_frame_limit_does_not_loop() {
    oversized_hint_case(true).await;
}

/// The same with only `max_payload` lowered (the frame limit left at its default):
/// the earlier run's 200 KiB hint still fits this run's frames, so it is replayed and
/// delivered, not dropped (`max_payload` bounds what the application sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_over_a_lowered_max_payload_that_fits_the_frames_is_still_delivered() {
    oversized_hint_case(false).await;
}

async fn oversized_hint_case(lower_frame: bool) {
    use ackwire::transport::tcp::TcpConfig;
    let dir = tempfile::tempdir().unwrap();
    let (r_addr, s_addr) = (restartable_addr(), restartable_addr());
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let s1 = sender_at(1, s_addr, 2, r_addr, handoff_cfg(dir.path())).await;
    rx.shutdown().await;
    drop(rx);
    wait_health(&s1, NodeId(2), Health::Down, 10.0).await;
    let big = s1
        .raw_sender(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let r = within(5.0, "big", async {
        big.send(bytes::Bytes::from(vec![7u8; 200 << 10]))
            .await
            .unwrap()
            .await
    })
    .await;
    assert_eq!(r, Ok(Outcome::HandedOff));
    s1.shutdown().await;
    drop(s1);
    let rx = receiver_at(2, r_addr, &[1], NodeConfig::default()).await;
    let mut inbox = rx.raw_receiver(ChannelId(1), false).unwrap();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let sz = sizes.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            sz.lock().unwrap().push(d.message().len());
            d.ack();
        }
    });
    let t = if lower_frame {
        TcpConfig {
            max_frame_len: 64 << 10,
            ..TcpConfig::default()
        }
    } else {
        TcpConfig::default()
    };
    let mut cfg = handoff_cfg(dir.path());
    cfg.max_payload = (64 << 10) - 256;
    let s2 = within(
        10.0,
        "s2",
        Node::builder(NodeId(1))
            .tcp(s_addr, t)
            .peer(NodeId(2), r_addr)
            .config(cfg)
            .build(),
    )
    .await
    .unwrap();
    let small = s2
        .raw_sender(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let r = within(10.0, "small", async {
        small
            .send(bytes::Bytes::from_static(b"small"))
            .await
            .unwrap()
            .await
    })
    .await;
    assert_eq!(r, Ok(Outcome::Acked));
    if !lower_frame {
        let delivered = || sizes.lock().unwrap().contains(&(200 << 10));
        let t0 = Instant::now();
        while !delivered() && t0.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(delivered(), "the hint that fits was not delivered");
        let hints = s2.stats().await.unwrap().hints.expect("handoff enabled");
        assert_eq!(hints.rejected, 0, "{hints:?}");
        s2.shutdown().await;
        rx.shutdown().await;
        return;
    }
    // Dropped once its replay comes up (within a second or so of the connection);
    // a loaded machine gets 20 s.
    let t0 = Instant::now();
    loop {
        let h = s2.stats().await.unwrap().hints.expect("handoff enabled");
        if (h.rejected, h.pending) == (1, 0) || t0.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then nothing more goes into the transport's oversize drop.
    let dropped = tcp(&s2).frames_dropped_oversize;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = s2.stats().await.unwrap();
    let t = tcp(&s2);
    assert_eq!(
        t.frames_dropped_oversize, dropped,
        "still replayed into the drop"
    );
    assert!(
        t.frames_dropped_oversize <= 2,
        "the oversized hint went into the transport's drop {} times (retransmitted {}, \
         hints {:?}, received sizes {:?})",
        t.frames_dropped_oversize,
        st.proto.retransmitted,
        st.hints,
        sizes.lock().unwrap()
    );
    // It is dropped from the store and counted, not left pending until its TTL.
    let hints = st.hints.expect("handoff enabled");
    assert_eq!((hints.rejected, hints.pending), (1, 0), "{hints:?}");
    assert!(
        sizes.lock().unwrap().iter().all(|&n| n < 64 << 10),
        "the oversized hint reached the receiver"
    );
    s2.shutdown().await;
    rx.shutdown().await;
}

/// Both sides with a slower heartbeat (5 s; accepted up to 1 h) and the default
/// detector, whose estimate assumes about 1 s. An idle, healthy link must not be taken
/// for a failure: no health change during 12 s of silence (before the fix the
/// receiver held the sender Down about 3 s into every idle gap until the next ping,
/// and a send then failed with `PeerDown`), no idle cut, and a message after it is
/// acked promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_heartbeat_on_both_sides_does_not_flap_an_idle_link() {
    let r = restartable_addr();
    let rx = receiver_at(2, r, &[1], hb(5)).await;
    let tx = sender_at(1, restartable_addr(), 2, r, hb(5)).await;
    let seen: Seen = Arc::default();
    spawn_counter(
        rx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let out = tx
        .sender::<u64>(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let seen_back: Seen = Arc::default();
    spawn_counter(
        tx.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen_back.clone(),
    );
    let r0 = within(5.0, "first", async { out.send(&0).await.unwrap().await }).await;
    assert_eq!(r0, Ok(Outcome::Acked));
    // The receiver knows the sender once it has connected.
    let back = rx
        .sender::<u64>(NodeId(1), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let mut events = vec![tx.health_events(), rx.health_events()];
    let mut downs = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tx.health(NodeId(2)) != Some(Health::Up) || rx.health(NodeId(1)) != Some(Health::Up) {
            downs.push(format!(
                "at {:?}: sender sees {:?}, receiver sees {:?}",
                t0.elapsed(),
                tx.health(NodeId(2)),
                rx.health(NodeId(1))
            ));
        }
    }
    for e in &mut events {
        while let Ok(ev) = e.try_recv() {
            downs.push(format!("{ev:?}"));
        }
    }
    assert!(
        downs.is_empty(),
        "an idle healthy link flapped: {:?}",
        &downs[..downs.len().min(6)]
    );
    let (ta, tb) = (tcp(&tx), tcp(&rx));
    assert_eq!(ta.idle_timeouts + tb.idle_timeouts, 0);
    let t1 = Instant::now();
    let r1 = within(5.0, "after idle", async {
        out.send(&1).await.unwrap().await
    })
    .await;
    let r2 = within(5.0, "back after idle", async {
        match back.send(&2).await {
            Ok(r) => r.await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert_eq!((r1, r2), (Ok(Outcome::Acked), Ok(Outcome::Acked)));
    assert!(t1.elapsed() < Duration::from_secs(2), "{:?}", t1.elapsed());
    tx.shutdown().await;
    rx.shutdown().await;
}
