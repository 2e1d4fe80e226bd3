//! Black-box combinations and sequences against the public API over real TCP, default
//! settings unless a test says otherwise: several guarantees and channels on one pair
//! with one channel stuck, receivers restarted several times in a row under
//! effectively-once senders, hinted handoff interrupted during replay, lifecycle misuse
//! (drops, late acks, extreme deadlines, payload limits) and the README's own code with
//! a handler slower than the retry timeout.
//!
//! Bugs found when written:
//! - an inbound stream kept the ordering of the receiver registered when its first
//!   frame arrived, so an ordered receiver registered after an unordered one on the
//!   same channel saw first deliveries out of send order
//!   (`a_channel_first_unordered_then_reregistered_ordered_keeps_send_order`,
//!   `receivers_alternating_ordered_and_unordered_under_load`; fixed:
//!   `InboundStream::set_ordered`, and a registration first applies the completions
//!   pushed before it, so messages a dropped receiver gave back precede it);
//! - a payload the sender's `max_payload` accepts but the receiver's TCP frame limit
//!   does not makes the receiver cut the connection at every transmission: the sender
//!   retransmits it at once on each reconnect until its deadline (about 25 cuts a
//!   second), at-most-once messages of other channels are lost on a healthy link, and
//!   once handed off its replays go on cutting the link for the hint's TTL
//!   (`a_payload_above_the_receivers_frame_limit_*`, `a_handed_off_payload_*`; open).

use crate::support;

use ackwire::dedup::DurableDedup;
use ackwire::detector::Health;
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, IdKey, Node, NodeConfig, NodeError,
    NodeId, Outcome, Receipt, ReceiverOptions, SendError,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::pair::tcp_pair;
use support::ports::restartable_addr;
use support::proxy::{Chaos, Proxy};
use support::wait::{any_addr, wait_health, wait_until, within};

/// Handler invocations per message key.
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn opts(ch: u32, g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(ChannelId(ch), g)
}

fn opts_deadline(ch: u32, g: Guarantee, d: Duration) -> ChannelOptions {
    let mut o = opts(ch, g);
    o.deadline = Some(d);
    o
}

fn bump(seen: &Seen, k: u64) {
    *seen.lock().unwrap().entry(k).or_insert(0) += 1;
}

fn get(seen: &Seen, k: u64) -> u32 {
    seen.lock().unwrap().get(&k).copied().unwrap_or(0)
}

fn fast_hb(mut c: NodeConfig) -> NodeConfig {
    c.heartbeat_interval = Duration::from_millis(100);
    c
}

fn handoff_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.handoff = Some(HandoffConfig::new(dir));
    fast_hb(c)
}

fn durable_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.dedup.durable = Some(DurableDedup::new(dir));
    c
}

/// Await every receipt, each within `secs` of the call; returns the outcomes and the
/// longest single wait.
async fn settle(receipts: Vec<Receipt>, secs: f64, what: &str) -> Vec<Result<Outcome, SendError>> {
    let mut out = Vec::with_capacity(receipts.len());
    for (i, r) in receipts.into_iter().enumerate() {
        out.push(within(secs, &format!("{what}: receipt #{i}"), r).await);
    }
    out
}

fn tally(outcomes: &[Result<Outcome, SendError>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for o in outcomes {
        let k = match o {
            Ok(o) => format!("Ok({o:?})"),
            Err(SendError::Deadline { .. }) => "Deadline".to_string(),
            Err(e) => format!("Err({e:?})"),
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
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

/// A sender node `id` knowing `peer` at `addr`, with `cfg`.
async fn sender_to(id: u64, peer: u64, addr: SocketAddr, cfg: NodeConfig) -> Node {
    Node::builder(NodeId(id))
        .bind(any_addr())
        .peer(NodeId(peer), addr)
        .config(cfg)
        .build()
        .await
        .expect("sender node builds")
}

/// Consume a `u64` channel: count each value, ack at once (or after `slow` for every
/// value with `v % slow_every == 0`).
fn spawn_counter(
    mut rx: ackwire::Receiver<u64>,
    seen: Seen,
    slow_every: u64,
    slow: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let v = *d.message();
            bump(&seen, v);
            if slow_every > 0 && v % slow_every == 0 {
                tokio::spawn(async move {
                    tokio::time::sleep(slow).await;
                    d.ack();
                });
            } else {
                d.ack();
            }
        }
    })
}

// ---------------------------------------------------------------------------------
// 1. Several guarantees and channels on one pair, one channel stuck.
// ---------------------------------------------------------------------------------

/// At-most-once, at-least-once and effectively-once channels beside an
/// effectively-once channel whose handler takes every delivery and never finishes
/// it (deadline 3 s): the three healthy channels settle everything promptly and
/// exactly per their guarantee; every stuck receipt fails with `Deadline` near its
/// deadline, none hangs and none is `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_channel_beside_all_three_guarantees_on_one_pair() {
    const N: u64 = 600;
    const STUCK: u64 = 300;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let seen: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    let gs = [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ];
    for (i, s) in seen.iter().enumerate() {
        spawn_counter(
            b.receiver::<u64>(ChannelId(10 + i as u32), false).unwrap(),
            s.clone(),
            0,
            Duration::ZERO,
        );
    }
    let mut stuck_rx = b.receiver::<u64>(ChannelId(99), false).unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let stuck_seen = Seen::default();
    {
        let held = held.clone();
        let stuck_seen = stuck_seen.clone();
        tokio::spawn(async move {
            while let Some(d) = stuck_rx.recv().await {
                bump(&stuck_seen, *d.message());
                held.lock().unwrap().push(d);
            }
        });
    }
    let stuck_deadline = Duration::from_secs(3);
    let stuck_out = a
        .sender::<u64>(
            NodeId(2),
            opts_deadline(99, Guarantee::EffectivelyOnce, stuck_deadline),
        )
        .unwrap();
    let started = Instant::now();
    let stuck_task = tokio::spawn(async move {
        let mut rs = Vec::new();
        for i in 0..STUCK {
            rs.push(stuck_out.send(&i).await.unwrap());
        }
        let sent_by = started.elapsed();
        let mut outs = Vec::new();
        for r in rs {
            outs.push((r.await, started.elapsed()));
        }
        (sent_by, outs)
    });
    let mut tasks = Vec::new();
    for (i, g) in gs.iter().enumerate() {
        let out = a.sender::<u64>(NodeId(2), opts(10 + i as u32, *g)).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut rs = Vec::new();
            for v in 0..N {
                rs.push(out.send(&v).await.unwrap());
            }
            settle(rs, 20.0, "healthy channel").await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let outs = within(30.0, "healthy channel", t).await.unwrap();
        let want = if i == 0 { "Ok(Sent)" } else { "Ok(Acked)" };
        let t = tally(&outs);
        assert_eq!(t.get(want).copied(), Some(N as usize), "{:?}: {t:?}", gs[i]);
    }
    let healthy_done = started.elapsed();
    assert!(
        healthy_done < Duration::from_secs(10),
        "healthy channels took {healthy_done:?} beside a stuck one"
    );
    // At-most-once on a healthy link loses nothing; the acked ones per their guarantee.
    wait_until(10.0, "every at-most-once message arrives", || {
        seen[0].lock().unwrap().len() as u64 == N
    })
    .await;
    for v in 0..N {
        assert_eq!(get(&seen[0], v), 1, "at-most-once {v}");
        assert!(get(&seen[1], v) >= 1, "at-least-once {v} never processed");
        assert_eq!(get(&seen[2], v), 1, "effectively-once {v}");
    }
    let (sent_by, outs) = within(20.0, "stuck receipts", stuck_task).await.unwrap();
    for (i, (o, at)) in outs.iter().enumerate() {
        assert!(
            matches!(o, Err(SendError::Deadline { .. })),
            "stuck #{i}: {o:?} (handler never finished it)"
        );
        assert!(
            *at <= sent_by + stuck_deadline + Duration::from_secs(5),
            "stuck #{i} resolved at {at:?}, sends done by {sent_by:?}, deadline {stuck_deadline:?}"
        );
    }
    assert_eq!(stuck_seen.lock().unwrap().len() as u64, STUCK);
    drop(held);
}

/// An ordered effectively-once channel whose handler holds its first delivery for
/// 3 s, an unordered at-least-once channel and an at-most-once channel on one pair
/// through a proxy that cuts the connection twice: every acked receipt is `Acked`,
/// the ordered channel is processed exactly once and in order, and the other channels
/// are not held up by the ordered one's held message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_channel_holding_its_head_beside_others_through_cuts() {
    const N: u64 = 400;
    let b = receiver_at(2, any_addr(), &[1], NodeConfig::default()).await;
    let proxy = Proxy::start(b.local_addr().unwrap(), Chaos::none()).await;
    let a = sender_to(1, 2, proxy.addr, NodeConfig::default()).await;
    let order: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut ord_rx = b
        .receiver_with::<u64>(ChannelId(1), ReceiverOptions::ordered())
        .unwrap();
    {
        let order = order.clone();
        tokio::spawn(async move {
            while let Some(d) = ord_rx.recv().await {
                let v = *d.message();
                order.lock().unwrap().push(v);
                if v == 0 {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        d.ack();
                    });
                } else {
                    d.ack();
                }
            }
        });
    }
    let alo_seen = Seen::default();
    spawn_counter(
        b.receiver::<u64>(ChannelId(2), false).unwrap(),
        alo_seen.clone(),
        0,
        Duration::ZERO,
    );
    let ord = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let alo = a
        .sender::<u64>(NodeId(2), opts(2, Guarantee::AtLeastOnce))
        .unwrap();
    let start = Instant::now();
    let ord_task = tokio::spawn(async move {
        let mut rs = Vec::new();
        for v in 0..N {
            rs.push(ord.send(&v).await.unwrap());
            if v % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        settle(rs, 25.0, "ordered").await
    });
    let alo_task = tokio::spawn(async move {
        let mut rs = Vec::new();
        for v in 0..N {
            rs.push(alo.send(&v).await.unwrap());
            if v % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let outs = settle(rs, 25.0, "alo").await;
        (outs, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.kill_all();
    tokio::time::sleep(Duration::from_millis(900)).await;
    proxy.kill_all();
    let (alo_outs, alo_done) = within(30.0, "alo", alo_task).await.unwrap();
    assert_eq!(
        tally(&alo_outs).get("Ok(Acked)").copied(),
        Some(N as usize),
        "{:?}",
        tally(&alo_outs)
    );
    for v in 0..N {
        assert!(get(&alo_seen, v) >= 1, "alo {v}");
    }
    let ord_outs = within(30.0, "ordered", ord_task).await.unwrap();
    assert_eq!(
        tally(&ord_outs).get("Ok(Acked)").copied(),
        Some(N as usize),
        "{:?}",
        tally(&ord_outs)
    );
    let order = order.lock().unwrap().clone();
    assert_eq!(order, (0..N).collect::<Vec<_>>(), "ordered, exactly once");
    // The at-least-once channel paced over ~0.8 s plus two cuts; it must not wait for
    // the ordered channel's 3 s head.
    assert!(alo_done < Duration::from_secs(8), "alo took {alo_done:?}");
}

// ---------------------------------------------------------------------------------
// 2. A receiver restarted several times in a row under effectively-once senders.
// ---------------------------------------------------------------------------------

/// How the receiver goes away between runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// `Node::shutdown().await`.
    Graceful,
    /// `drop(node)` without shutdown.
    Drop,
}

/// The receiver's run: two effectively-once channels, each value counted once per
/// handler invocation; acked with `ack_durable` when `durable`.
async fn restart_receiver(
    addr: SocketAddr,
    dir: Option<&Path>,
    seen: &Seen,
    durable_done: &Arc<Mutex<HashMap<u64, u32>>>,
) -> Node {
    let cfg = match dir {
        Some(d) => durable_cfg(d),
        None => NodeConfig::default(),
    };
    let b = receiver_at(2, addr, &[1], cfg).await;
    for ch in [1u32, 2] {
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let seen = seen.clone();
        let done = durable_done.clone();
        let durable = dir.is_some();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                bump(&seen, v);
                // A message whose `ack_durable` resolved is never processed again.
                if let Some(n) = done.lock().unwrap().get_mut(&v) {
                    *n += 1;
                }
                let done = done.clone();
                tokio::spawn(async move {
                    if v % 7 == 0 {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    if durable {
                        if d.ack_durable().await.is_ok() {
                            done.lock().unwrap().entry(v).or_insert(0);
                        }
                    } else {
                        d.ack();
                    }
                });
            }
        });
    }
    b
}

/// Keyed effectively-once senders on two channels keep sending while the receiver is
/// restarted three times in a row (`stop` each time). Every receipt resolves within
/// its deadline plus slack; a failed one is resent under its key until `Ok`. Then:
/// `exact` — every key processed exactly once; otherwise at least once.
async fn receiver_restarted_three_times(stop: Stop, durable: bool, exact: bool) {
    const PER_CH: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let addr = restartable_addr();
    let seen = Seen::default();
    let ddir = durable.then(|| dir.path());
    let done: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let mut b = restart_receiver(addr, ddir, &seen, &done).await;
    let a = sender_to(1, 2, addr, NodeConfig::default()).await;
    let deadline = Duration::from_secs(8);
    let mut senders = Vec::new();
    for ch in [1u32, 2] {
        let out = a
            .sender::<u64>(
                NodeId(2),
                opts_deadline(ch, Guarantee::EffectivelyOnce, deadline),
            )
            .unwrap();
        let base = u64::from(ch) * 1_000_000;
        senders.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for i in 0..PER_CH {
                let v = base + i;
                pending.push((v, out.send_with_key(&v, IdKey(u128::from(v))).await));
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            // Settle, resending failures under their key.
            let mut resends = 0u32;
            let mut failures: HashMap<String, usize> = HashMap::new();
            let mut round = pending;
            while !round.is_empty() {
                let mut next = Vec::new();
                for (v, r) in round {
                    let res = match r {
                        Ok(r) => {
                            within(deadline.as_secs_f64() + 10.0, &format!("receipt of {v}"), r)
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(Outcome::Acked) => {}
                        other => {
                            *failures.entry(format!("{other:?}")).or_insert(0) += 1;
                            resends += 1;
                            assert!(resends < 5_000, "resend loop: {failures:?}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            next.push((v, out.send_with_key(&v, IdKey(u128::from(v))).await));
                        }
                    }
                }
                round = next;
            }
            failures
        }));
    }
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        match stop {
            Stop::Graceful => within(20.0, "receiver shutdown", b.shutdown()).await,
            Stop::Drop => drop(b),
        }
        tokio::time::sleep(Duration::from_millis(150 * round)).await;
        b = restart_receiver(addr, ddir, &seen, &done).await;
    }
    let mut failures = Vec::new();
    for s in senders {
        failures.push(within(60.0, "senders settle", s).await.unwrap());
    }
    let again: Vec<(u64, u32)> = done
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(v, n)| (*v, *n))
        .collect();
    assert!(
        again.is_empty(),
        "{stop:?} durable={durable}: processed again after ack_durable resolved: {again:?}"
    );
    let seen = seen.lock().unwrap().clone();
    let mut dups = Vec::new();
    for ch in [1u64, 2] {
        for i in 0..PER_CH {
            let v = ch * 1_000_000 + i;
            let n = seen.get(&v).copied().unwrap_or(0);
            assert!(
                n >= 1,
                "{stop:?} durable={durable}: {v} acked but never processed"
            );
            if n > 1 {
                dups.push((v, n));
            }
        }
    }
    if exact {
        assert!(
            dups.is_empty(),
            "{stop:?} durable={durable}: processed more than once: {dups:?} (failures {failures:?})"
        );
    }
    eprintln!(
        "{stop:?} durable={durable}: dups {}, failures {failures:?}",
        dups.len()
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eo_keys_once_across_three_graceful_durable_receiver_restarts() {
    receiver_restarted_three_times(Stop::Graceful, true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eo_keys_once_across_three_dropped_durable_receiver_runs_with_ack_durable() {
    // Killed runs may process a message whose `ack_durable` had not resolved again
    // (documented); one whose `ack_durable` resolved never (checked inside).
    receiver_restarted_three_times(Stop::Drop, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eo_keys_at_least_once_across_three_dropped_in_memory_receiver_runs() {
    receiver_restarted_three_times(Stop::Drop, false, false).await;
}

// ---------------------------------------------------------------------------------
// 3. Hinted handoff: target down, up, down again during the replay, up.
// ---------------------------------------------------------------------------------

/// A target run for the handoff tests: durable dedup in `dir`, an effectively-once
/// channel 1 and an at-least-once channel 2 whose handlers ack after `delay` with
/// `ack_durable`; `acked_durably` records what each run durably acked, and counts any
/// later invocation of such a message.
async fn handoff_target(
    addr: SocketAddr,
    dir: &Path,
    eo: &Seen,
    alo: &Seen,
    done: &Arc<Mutex<HashMap<u64, u32>>>,
    delay: Duration,
) -> Node {
    let b = receiver_at(2, addr, &[1], fast_hb(durable_cfg(dir))).await;
    for (ch, seen) in [(1u32, eo.clone()), (2, alo.clone())] {
        let mut rx = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let done = done.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                bump(&seen, v);
                if ch == 1 {
                    if let Some(n) = done.lock().unwrap().get_mut(&v) {
                        *n += 1;
                    }
                }
                let done = done.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if d.ack_durable().await.is_ok() && ch == 1 {
                        done.lock().unwrap().entry(v).or_insert(0);
                    }
                });
            }
        });
    }
    b
}

async fn hints_pending(node: &Node) -> u64 {
    node.stats()
        .await
        .ok()
        .and_then(|s| s.hints)
        .map_or(u64::MAX, |h| h.pending)
}

/// Send `range` on both channels; returns the receipts.
async fn send_both(
    eo: &ackwire::Sender<u64>,
    alo: &ackwire::Sender<u64>,
    range: std::ops::Range<u64>,
) -> Vec<Receipt> {
    let mut rs = Vec::new();
    for v in range {
        rs.push(eo.send(&v).await.expect("eo send accepted"));
        rs.push(alo.send(&v).await.expect("alo send accepted"));
    }
    rs
}

/// The target goes down (`first`), comes back, goes down again (`second`) while its
/// replay is under way, and comes back: every message accepted is delivered, the
/// effectively-once channel exactly once (graceful stops: durable dedup keeps
/// everything acked), never again after an `ack_durable` resolved; the store ends
/// empty.
/// Sends `range` on both channels while the target is Down: every receipt must be
/// `HandedOff`.
async fn all_handed_off(
    eo_out: &ackwire::Sender<u64>,
    alo_out: &ackwire::Sender<u64>,
    range: std::ops::Range<u64>,
    what: &str,
) {
    let n = range.end - range.start;
    let out = settle(send_both(eo_out, alo_out, range).await, 15.0, what).await;
    assert_eq!(
        tally(&out).get("Ok(HandedOff)").copied(),
        Some(2 * n as usize),
        "{what}: {:?}",
        tally(&out)
    );
}

async fn down_up_down_during_replay_up(second: Stop) {
    const LIVE: u64 = 100;
    const OUTAGE1: u64 = 1200;
    const OUTAGE2: u64 = 200;
    let hints = tempfile::tempdir().unwrap();
    let dd = tempfile::tempdir().unwrap();
    let addr = restartable_addr();
    let (eo, alo) = (Seen::default(), Seen::default());
    let done: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let delay = Duration::from_millis(20);
    let b = handoff_target(addr, dd.path(), &eo, &alo, &done, delay).await;
    let mut cfg = handoff_cfg(hints.path());
    if let Some(h) = cfg.handoff.as_mut() {
        // A replay slow enough to be interrupted: 16 hints awaiting acks at a time.
        h.replay_concurrency = 16;
    }
    let a = sender_to(1, 2, addr, cfg).await;
    let eo_out = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let alo_out = a
        .sender::<u64>(NodeId(2), opts(2, Guarantee::AtLeastOnce))
        .unwrap();
    wait_health(&a, NodeId(2), Health::Up, 10.0).await;
    let live = settle(send_both(&eo_out, &alo_out, 0..LIVE).await, 15.0, "live").await;
    assert_eq!(
        tally(&live).get("Ok(Acked)").copied(),
        Some(2 * LIVE as usize),
        "{:?}",
        tally(&live)
    );

    // Down: everything sent now becomes a hint.
    within(15.0, "target shutdown", b.shutdown()).await;
    wait_health(&a, NodeId(2), Health::Down, 15.0).await;
    all_handed_off(&eo_out, &alo_out, LIVE..LIVE + OUTAGE1, "outage 1").await;

    // Up: the replay starts; down again part way through it.
    let b = handoff_target(addr, dd.path(), &eo, &alo, &done, delay).await;
    wait_until(15.0, "replay under way", || {
        let n = eo.lock().unwrap().len() + alo.lock().unwrap().len();
        n as u64 >= 2 * LIVE + 200
    })
    .await;
    let before = eo.lock().unwrap().len() + alo.lock().unwrap().len();
    match second {
        Stop::Graceful => within(15.0, "target shutdown 2", b.shutdown()).await,
        Stop::Drop => drop(b),
    }
    assert!(
        (before as u64) < 2 * (LIVE + OUTAGE1),
        "the replay finished before the second outage ({before} seen): slow it down"
    );
    wait_health(&a, NodeId(2), Health::Down, 15.0).await;
    let lo = LIVE + OUTAGE1;
    all_handed_off(&eo_out, &alo_out, lo..lo + OUTAGE2, "outage 2").await;

    // Up for good: everything arrives.
    let b = handoff_target(addr, dd.path(), &eo, &alo, &done, delay).await;
    let total = LIVE + OUTAGE1 + OUTAGE2;
    let end = Instant::now() + Duration::from_secs(25);
    loop {
        let missing: Vec<u64> = (0..total)
            .filter(|v| get(&eo, *v) == 0 || get(&alo, *v) == 0)
            .collect();
        let pending = hints_pending(&a).await;
        if missing.is_empty() && pending == 0 {
            break;
        }
        if Instant::now() > end {
            panic!(
                "{second:?}: after the target is back for good, {} values still missing \
                 (first {:?}), {pending} hints pending, stats {:?}",
                missing.len(),
                &missing[..missing.len().min(10)],
                a.stats().await.ok().and_then(|s| s.hints)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again: Vec<(u64, u32)> = done
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(v, n)| (*v, *n))
        .collect();
    assert!(
        again.is_empty(),
        "{second:?}: effectively-once messages processed again after their ack_durable \
         resolved: {:?}",
        &again[..again.len().min(10)]
    );
    if second == Stop::Graceful {
        let dups: Vec<(u64, u32)> = (0..total)
            .map(|v| (v, get(&eo, v)))
            .filter(|(_, n)| *n > 1)
            .collect();
        assert!(
            dups.is_empty(),
            "graceful outages with durable dedup: effectively-once processed twice: {:?}",
            &dups[..dups.len().min(10)]
        );
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_down_up_graceful_down_during_replay_up_delivers_everything() {
    down_up_down_during_replay_up(Stop::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_down_up_dropped_during_replay_up_delivers_everything() {
    down_up_down_during_replay_up(Stop::Drop).await;
}

// ---------------------------------------------------------------------------------
// 4. Lifecycle and misuse.
// ---------------------------------------------------------------------------------

/// Two senders on one effectively-once channel, one with a 1.5 s deadline and one with
/// the default, interleaved, to a handler that holds every delivery for 4 s: the
/// short-deadline receipts fail with `Deadline` near 1.5 s (not held back behind the
/// long ones' timers), the long ones are `Acked` once the handler finishes, and every
/// message is processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_deadlines_on_one_stream_each_fire_on_time() {
    const N: u64 = 100;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let seen = Seen::default();
    let mut rx = b.receiver::<u64>(ChannelId(5), false).unwrap();
    {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                bump(&seen, *d.message());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    d.ack();
                });
            }
        });
    }
    let short = a
        .sender::<u64>(
            NodeId(2),
            opts_deadline(5, Guarantee::EffectivelyOnce, Duration::from_millis(1500)),
        )
        .unwrap();
    let long = a
        .sender::<u64>(NodeId(2), opts(5, Guarantee::EffectivelyOnce))
        .unwrap();
    let start = Instant::now();
    let mut shorts = Vec::new();
    let mut longs = Vec::new();
    for v in 0..N {
        if v % 2 == 0 {
            longs.push(long.send(&v).await.unwrap());
        } else {
            shorts.push(short.send(&v).await.unwrap());
        }
    }
    for (i, r) in shorts.into_iter().enumerate() {
        let o = within(10.0, "short receipt", r).await;
        assert!(
            matches!(o, Err(SendError::Deadline { .. })),
            "short #{i}: {o:?}"
        );
        let at = start.elapsed();
        assert!(
            at < Duration::from_secs(6),
            "short #{i} resolved at {at:?}, deadline 1.5 s"
        );
    }
    let outs = settle(longs, 20.0, "long").await;
    assert_eq!(
        tally(&outs).get("Ok(Acked)").copied(),
        Some((N / 2) as usize),
        "{:?}",
        tally(&outs)
    );
    for v in 0..N {
        assert_eq!(get(&seen, v), 1, "{v}");
    }
}

/// Extreme per-channel deadlines: zero is a typed config error; one nanosecond never
/// hangs (each receipt `Deadline` or `Acked`, each message processed at most once);
/// `Duration::MAX` to a target that went away keeps retrying, and the sender's
/// shutdown then resolves every such receipt with `Shutdown` within the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_tiny_and_endless_deadlines() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let zero = a.sender::<u64>(
        NodeId(2),
        opts_deadline(1, Guarantee::EffectivelyOnce, Duration::ZERO),
    );
    assert!(matches!(zero, Err(NodeError::Config(_))), "{zero:?}");
    let seen = Seen::default();
    spawn_counter(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
        0,
        Duration::ZERO,
    );
    for g in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
        let ch = if g == Guarantee::AtLeastOnce { 1 } else { 2 };
        if ch == 2 {
            spawn_counter(
                b.receiver::<u64>(ChannelId(2), false).unwrap(),
                seen.clone(),
                0,
                Duration::ZERO,
            );
        }
        let tiny = a
            .sender::<u64>(NodeId(2), opts_deadline(ch, g, Duration::from_nanos(1)))
            .unwrap();
        let mut rs = Vec::new();
        for v in 0..200u64 {
            rs.push(tiny.send(&(u64::from(ch) * 1000 + v)).await.unwrap());
        }
        let outs = settle(rs, 10.0, "1 ns deadline").await;
        for o in &outs {
            assert!(
                matches!(o, Ok(Outcome::Acked) | Err(SendError::Deadline { .. })),
                "{g:?} 1 ns: {o:?}"
            );
        }
        if g == Guarantee::EffectivelyOnce {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for v in 0..200u64 {
                assert!(get(&seen, 2000 + v) <= 1, "{v} processed twice");
            }
        }
        eprintln!("{g:?} 1 ns: {:?}", tally(&outs));
    }
    // Endless deadline, target gone.
    let endless = a
        .sender::<u64>(
            NodeId(2),
            opts_deadline(3, Guarantee::AtLeastOnce, Duration::MAX),
        )
        .unwrap();
    let _rx3 = b.receiver::<u64>(ChannelId(3), false).unwrap(); // holds, never reads
    let mut rs = Vec::new();
    for v in 0..20u64 {
        rs.push(endless.send(&v).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(b);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let stopping = tokio::spawn(async move { a.shutdown().await });
    let outs = settle(rs, 15.0, "endless deadline at shutdown").await;
    for o in &outs {
        assert_eq!(o, &Err(SendError::Shutdown), "{:?}", tally(&outs));
    }
    within(15.0, "sender shutdown", stopping).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(12), "{:?}", t0.elapsed());
}

/// A delivery held by the application when its receiving node is dropped, acked after
/// a new run of the same node id is up on the same address: the late ack is harmless,
/// the new run gets the message again, and the sender's receipt is `Acked` once that
/// run acks it (never before it was processed by a live run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_acked_after_its_node_was_dropped_and_replaced() {
    let addr = restartable_addr();
    let b = receiver_at(2, addr, &[1], NodeConfig::default()).await;
    let mut rx = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let a = sender_to(1, 2, addr, NodeConfig::default()).await;
    let out = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = out.send_with_key(&7, IdKey(7)).await.unwrap();
    let held = within(10.0, "first delivery", rx.recv()).await.unwrap();
    drop(rx);
    drop(b);
    let b2 = receiver_at(2, addr, &[1], NodeConfig::default()).await;
    let mut rx2 = b2.receiver::<u64>(ChannelId(1), false).unwrap();
    held.ack(); // the dead run's delivery
    let again = within(15.0, "redelivery to the new run", rx2.recv())
        .await
        .unwrap();
    assert_eq!(*again.message(), 7);
    // Not acked yet by the live run: the receipt must still be pending.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut r = r;
    assert!(
        futures::poll!(&mut r).is_pending(),
        "receipt resolved before the live run acked"
    );
    again.ack();
    assert_eq!(within(15.0, "receipt", r).await, Ok(Outcome::Acked));
}

/// Deliveries outstanding when their `Receiver` is dropped, the node then shut down,
/// and only then finished (ack, ack_durable, nack, drop): nothing panics or hangs,
/// `ack_durable` reports `NodeStopped` or `Ok`, and the sender's receipts all resolve
/// (the sender is shut down last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_outliving_receiver_and_node_finish_quietly() {
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let mut rx = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..8u64 {
        rs.push(out.send(&v).await.unwrap());
    }
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(within(10.0, "delivery", rx.recv()).await.unwrap());
    }
    drop(rx);
    within(15.0, "receiver node shutdown", b.shutdown()).await;
    let mut it = held.into_iter();
    it.next().unwrap().ack();
    let r = within(5.0, "ack_durable", it.next().unwrap().ack_durable()).await;
    assert!(
        matches!(r, Ok(()) | Err(ackwire::AckError::NodeStopped)),
        "{r:?}"
    );
    it.next().unwrap().nack();
    let (_, h) = it.next().unwrap().into_parts();
    let r = within(5.0, "handle ack_durable", h.ack_durable()).await;
    assert!(
        matches!(r, Ok(()) | Err(ackwire::AckError::NodeStopped)),
        "{r:?}"
    );
    drop(it);
    within(20.0, "sender shutdown", a.shutdown()).await;
    let outs = settle(rs, 5.0, "after both shut down").await;
    for o in &outs {
        assert!(
            matches!(o, Err(SendError::Shutdown) | Ok(Outcome::Acked)),
            "{o:?}"
        );
    }
}

/// A deadline shorter than the handler takes, with hinted handoff on the sender and
/// the target up throughout: each message gives up while its original is still in
/// the handler, is handed off (`HandedOff`) and replayed at once; effectively-once
/// processes each exactly once (the replay meets the original in progress) and the
/// store ends empty. The same with a 1 ns deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_shorter_than_the_handler_with_handoff_and_the_target_up() {
    const N: u64 = 150;
    let hints = tempfile::tempdir().unwrap();
    let b = receiver_at(2, any_addr(), &[1], fast_hb(NodeConfig::default())).await;
    let a = sender_to(1, 2, b.local_addr().unwrap(), handoff_cfg(hints.path())).await;
    let seen = Seen::default();
    spawn_counter(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
        1,
        Duration::from_millis(1500),
    );
    wait_health(&a, NodeId(2), Health::Up, 10.0).await;
    let slowish = a
        .sender::<u64>(
            NodeId(2),
            opts_deadline(1, Guarantee::EffectivelyOnce, Duration::from_millis(700)),
        )
        .unwrap();
    let tiny = a
        .sender::<u64>(
            NodeId(2),
            opts_deadline(1, Guarantee::EffectivelyOnce, Duration::from_nanos(1)),
        )
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..N {
        let s = if v % 2 == 0 { &slowish } else { &tiny };
        rs.push(s.send(&v).await.unwrap());
    }
    let outs = settle(rs, 15.0, "short deadline with handoff").await;
    for (i, o) in outs.iter().enumerate() {
        assert!(
            matches!(o, Ok(Outcome::HandedOff) | Ok(Outcome::Acked)),
            "#{i}: {o:?} ({:?})",
            tally(&outs)
        );
    }
    eprintln!("outcomes {:?}", tally(&outs));
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let missing = (0..N).filter(|v| get(&seen, *v) == 0).count();
        let pending = hints_pending(&a).await;
        if missing == 0 && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "{missing} never processed, {pending} hints pending: {:?}",
            a.stats().await.ok().and_then(|s| s.hints)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dups: Vec<(u64, u32)> = (0..N)
        .map(|v| (v, get(&seen, v)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(dups.is_empty(), "processed other than once: {dups:?}");
}

// ---------------------------------------------------------------------------------
// 5. The README's code over real TCP with a handler slower than the retry timeout.
// ---------------------------------------------------------------------------------

/// The README's "Using it" (payments as `(String, u64)`, effectively-once,
/// `send_with_key`), with the ledger consuming through the `Stream` combinator form
/// and every fourth payment taking 600 ms (three initial RTOs) before its ack; every
/// key is also sent a second time while its first copy may still be in the handler,
/// and the connection is cut once. Every receipt is `Acked`, each payment is charged
/// exactly once, and the slow handler causes no deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_using_it_with_a_handler_slower_than_the_retry_timeout() {
    use futures::StreamExt;
    const N: u64 = 120;
    let ledger = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let proxy = Proxy::start(ledger.local_addr().unwrap(), Chaos::none()).await;
    let shop = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), proxy.addr)
        .build()
        .await
        .unwrap();
    let payments = ledger
        .receiver::<(String, u64)>(ChannelId(1), false)
        .unwrap();
    let out = shop
        .sender::<(String, u64)>(
            NodeId(2),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let charged: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    {
        let charged = charged.clone();
        tokio::spawn(async move {
            payments
                .for_each_concurrent(None, |d| {
                    let charged = charged.clone();
                    async move {
                        let (who, cents) = d.message().clone();
                        *charged.lock().unwrap().entry(who).or_insert(0) += 1;
                        if cents % 4 == 0 {
                            tokio::time::sleep(Duration::from_millis(600)).await;
                        }
                        d.ack();
                    }
                })
                .await;
        });
    }
    let mut receipts = Vec::new();
    for i in 0..N {
        let p = (format!("customer-{i}"), i);
        receipts.push(
            out.send_with_key(&p, IdKey(u128::from(i) + 1))
                .await
                .unwrap(),
        );
        if i == N / 2 {
            proxy.kill_all();
        }
    }
    // Each key again (an application retry), while many first copies are in progress.
    for i in 0..N {
        let p = (format!("customer-{i}"), i);
        receipts.push(
            out.send_with_key(&p, IdKey(u128::from(i) + 1))
                .await
                .unwrap(),
        );
    }
    let outs = settle(receipts, 25.0, "payments").await;
    assert_eq!(
        tally(&outs).get("Ok(Acked)").copied(),
        Some(2 * N as usize),
        "{:?}",
        tally(&outs)
    );
    let charged = charged.lock().unwrap().clone();
    for i in 0..N {
        assert_eq!(
            charged.get(&format!("customer-{i}")).copied(),
            Some(1),
            "payment {i} charged other than once"
        );
    }
    let s = shop.stats().await.unwrap();
    assert_eq!(s.proto.gave_up, 0, "{:?}", s.proto);
}

/// Request/response between two nodes over one TCP connection pair: node 1's requests
/// (effectively-once) are handled on node 2 by a handler that sends a reply to node 1
/// (effectively-once, on another channel) and acks the request only after the reply's
/// receipt resolved `Acked`; node 1's reply handler is sometimes slow. The connection
/// is cut twice. Every request and every reply is processed exactly once and every
/// receipt is `Acked`. `reply_ch` 1 answers on the requests' own channel number.
async fn request_reply_through_cuts(reply_ch: u32) {
    const N: u64 = 150;
    let b = receiver_at(2, any_addr(), &[1], NodeConfig::default()).await;
    let proxy = Proxy::start(b.local_addr().unwrap(), Chaos::none()).await;
    let a = sender_to(1, 2, proxy.addr, NodeConfig::default()).await;
    // Node 2 answers node 1 over the connection node 1 opened.
    let requests = Seen::default();
    let replies = Seen::default();
    let mut req_rx = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let b = Arc::new(b);
    {
        let requests = requests.clone();
        let b = b.clone();
        tokio::spawn(async move {
            // Node 1 is known to node 2 once it has connected: make the reply sender
            // when the first request is in.
            let mut reply_out = None;
            while let Some(d) = req_rx.recv().await {
                let v = *d.message();
                bump(&requests, v);
                let reply_out = reply_out
                    .get_or_insert_with(|| {
                        b.sender::<u64>(NodeId(1), opts(reply_ch, Guarantee::EffectivelyOnce))
                            .expect("a connected peer can be answered")
                    })
                    .clone();
                tokio::spawn(async move {
                    let r = reply_out
                        .send_with_key(&v, IdKey(u128::from(v) + 10_000))
                        .await
                        .expect("reply accepted");
                    match r.await {
                        Ok(Outcome::Acked) => d.ack(),
                        other => {
                            eprintln!("reply {v}: {other:?}");
                            d.nack();
                        }
                    }
                });
            }
        });
    }
    spawn_counter(
        a.receiver::<u64>(ChannelId(reply_ch), false).unwrap(),
        replies.clone(),
        5,
        Duration::from_millis(500),
    );
    let req_out = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..N {
        rs.push(req_out.send(&v).await.unwrap());
        if v == N / 3 || v == 2 * N / 3 {
            proxy.kill_all();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outs = settle(rs, 25.0, "requests").await;
    assert_eq!(
        tally(&outs).get("Ok(Acked)").copied(),
        Some(N as usize),
        "{:?}",
        tally(&outs)
    );
    for v in 0..N {
        assert_eq!(get(&requests, v), 1, "request {v}");
        assert_eq!(get(&replies, v), 1, "reply {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_handlers_that_await_their_replies_receipts_through_cuts() {
    request_reply_through_cuts(2).await;
}

/// The same with the replies on channel 1 too: each node both sends and receives on
/// channel 1 over the one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_one_channel_number_in_both_directions_through_cuts() {
    request_reply_through_cuts(1).await;
}

/// A sender with hinted handoff keeps sending on an effectively-once and an
/// at-least-once channel while its target (durable dedup, graceful stops) is
/// restarted four times with gaps around the failure detector's reaction time
/// (0 ms, 300 ms, 1 s, 2 s): live retransmissions, messages moved to the store at Down
/// and their replays race. Every receipt is `Acked` or `HandedOff`, nothing is lost,
/// effectively-once is processed exactly once, and the store ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_restarted_four_times_around_the_detector_with_handoff() {
    let hints = tempfile::tempdir().unwrap();
    let dd = tempfile::tempdir().unwrap();
    let addr = restartable_addr();
    let (eo, alo) = (Seen::default(), Seen::default());
    let done: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let delay = Duration::from_millis(5);
    let mut b = handoff_target(addr, dd.path(), &eo, &alo, &done, delay).await;
    let a = sender_to(1, 2, addr, handoff_cfg(hints.path())).await;
    wait_health(&a, NodeId(2), Health::Up, 10.0).await;
    let eo_out = a
        .sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let alo_out = a
        .sender::<u64>(NodeId(2), opts(2, Guarantee::AtLeastOnce))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let stop = stop.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut rs = Vec::new();
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rs.push(
                    eo_out
                        .send_with_key(&v, IdKey(u128::from(v) + 1))
                        .await
                        .map_err(|e| (v, e)),
                );
                rs.push(alo_out.send(&v).await.map_err(|e| (v, e)));
                v += 1;
                sent.store(v, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            rs
        })
    };
    for gap in [0u64, 300, 1000, 2000] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        within(15.0, "target shutdown", b.shutdown()).await;
        tokio::time::sleep(Duration::from_millis(gap)).await;
        b = handoff_target(addr, dd.path(), &eo, &alo, &done, delay).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let rs = within(20.0, "producer", producer).await.unwrap();
    let n = sent.load(Ordering::Relaxed);
    let mut receipts = Vec::new();
    for r in rs {
        match r {
            Ok(r) => receipts.push(r),
            Err((v, e)) => panic!("send of {v} refused: {e:?}"),
        }
    }
    let outs = settle(receipts, 40.0, "receipts").await;
    let t = tally(&outs);
    for o in &outs {
        assert!(
            matches!(o, Ok(Outcome::Acked) | Ok(Outcome::HandedOff)),
            "{o:?}: {t:?}"
        );
    }
    eprintln!("{n} per channel: {t:?}");
    let end = Instant::now() + Duration::from_secs(25);
    loop {
        let missing: Vec<u64> = (0..n)
            .filter(|v| get(&eo, *v) == 0 || get(&alo, *v) == 0)
            .collect();
        let pending = hints_pending(&a).await;
        if missing.is_empty() && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "{} of {n} missing (first {:?}), {pending} hints pending",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dups: Vec<(u64, u32)> = (0..n)
        .map(|v| (v, get(&eo, v)))
        .filter(|(_, c)| *c > 1)
        .collect();
    assert!(
        dups.is_empty(),
        "effectively-once processed more than once across graceful durable restarts: {:?} of {n}",
        &dups[..dups.len().min(10)]
    );
    b.shutdown().await;
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------
// 6. Re-registering a channel's receiver with other options.
// ---------------------------------------------------------------------------------

/// Serve `rx` serially (about 1 ms a message), appending each value seen for the
/// first time to `first` and counting each ack in `seen`; stops (dropping the receiver and the delivery in hand) when
/// aborted.
fn spawn_ordered_reader(
    mut rx: ackwire::Receiver<u64>,
    first: Arc<Mutex<Vec<u64>>>,
    seen: Seen,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let v = *d.message();
            {
                let mut f = first.lock().unwrap();
                if !f.contains(&v) {
                    f.push(v);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            // Counted when finished: the delivery in hand when the reader is aborted
            // is dropped unfinished (a nack) and comes back.
            d.ack();
            bump(&seen, v);
        }
    })
}

/// The channel's first receiver is `first_ordered`; it is dropped after one message
/// and the channel re-registered with `ReceiverOptions::ordered()`. Under load that
/// receiver is dropped with messages queued and a new ordered one registered at once
/// (twice). The ordered contract must hold for the stream from then on: first
/// deliveries follow send order (messages taken back from a dropped receiver rewind
/// the stream), and effectively-once processes each message once.
async fn reregistered_as_ordered(first_ordered: bool) {
    const N: u64 = 1500;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let ch = ChannelId(7);
    let out = a
        .sender::<u64>(NodeId(2), opts(7, Guarantee::EffectivelyOnce))
        .unwrap();
    {
        let mut r1 = b
            .receiver_with::<u64>(
                ch,
                if first_ordered {
                    ReceiverOptions::ordered()
                } else {
                    ReceiverOptions::unordered()
                },
            )
            .unwrap();
        let r = out.send(&0).await.unwrap();
        let d = within(10.0, "first message", r1.recv()).await.unwrap();
        d.ack();
        assert_eq!(within(10.0, "first receipt", r).await, Ok(Outcome::Acked));
    }
    let first: Arc<Mutex<Vec<u64>>> = Arc::default();
    let seen = Seen::default();
    let mut reader = spawn_ordered_reader(
        b.receiver_with::<u64>(ch, ReceiverOptions::ordered())
            .unwrap(),
        first.clone(),
        seen.clone(),
    );
    let sending = tokio::spawn(async move {
        let mut rs = Vec::new();
        for v in 1..=N {
            rs.push(out.send(&v).await.unwrap());
        }
        rs
    });
    for _ in 0..2 {
        let at = first.lock().unwrap().len() as u64 + N / 4;
        wait_until(15.0, "the reader makes progress", || {
            first.lock().unwrap().len() as u64 >= at
        })
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        reader.abort();
        let _ = reader.await;
        reader = spawn_ordered_reader(
            b.receiver_with::<u64>(ch, ReceiverOptions::ordered())
                .unwrap(),
            first.clone(),
            seen.clone(),
        );
        first.lock().unwrap().push(u64::MAX); // marks a re-registration
    }
    let rs = within(30.0, "sending", sending).await.unwrap();
    let outs = settle(rs, 30.0, "receipts").await;
    assert_eq!(
        tally(&outs).get("Ok(Acked)").copied(),
        Some(N as usize),
        "{:?}",
        tally(&outs)
    );
    let order: Vec<u64> = first
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|v| *v != u64::MAX)
        .collect();
    let inversions: Vec<(u64, u64)> = order
        .windows(2)
        .filter(|w| w[1] < w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        inversions.is_empty(),
        "first receiver ordered={first_ordered}: an ordered receiver saw first deliveries \
         out of send order {} times, e.g. {:?}",
        inversions.len(),
        &inversions[..inversions.len().min(8)]
    );
    for v in 1..=N {
        assert_eq!(get(&seen, v), 1, "{v} processed other than once");
    }
}

/// Control: the channel was ordered from its first registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_channel_reregistered_ordered_keeps_send_order() {
    reregistered_as_ordered(true).await;
}

/// The channel was first registered unordered; every later receiver is ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_first_unordered_then_reregistered_ordered_keeps_send_order() {
    reregistered_as_ordered(false).await;
}

// ---------------------------------------------------------------------------------
// 7. A payload the sender accepts but the receiver's frame limit does not.
// ---------------------------------------------------------------------------------

/// The receiver runs a smaller TCP frame limit (64 KiB, its `max_payload` set to
/// match) than the sender's default `max_payload` (4 MiB): a rolling configuration
/// change, or two teams' defaults. One 100 KiB at-least-once message (deadline 3 s)
/// is sent while another channel carries 600 at-most-once messages over a healthy
/// loopback link. The promises at stake: at-most-once loses nothing on a healthy link
/// (README guarantee table), a limit is "a typed error or a counted drop" (README
/// limits), and the oversize message's receipt resolves near its deadline. With
/// `handoff`, the message is handed off when it gives up; once it has, the link must
/// settle instead of being cut for the rest of the hint's TTL.
async fn oversize_for_the_receivers_frame_limit(handoff: bool) {
    use ackwire::transport::tcp::TcpConfig;
    let hints = tempfile::tempdir().unwrap();
    let tcp = TcpConfig {
        max_frame_len: 64 << 10,
        ..TcpConfig::default()
    };
    let mut rcfg = NodeConfig::default();
    rcfg.max_payload = (64 << 10) - 128;
    let b = Node::builder(NodeId(2))
        .tcp(any_addr(), tcp)
        .allow_peer(NodeId(1))
        .config(rcfg)
        .build()
        .await
        .unwrap();
    let scfg = if handoff {
        handoff_cfg(hints.path())
    } else {
        NodeConfig::default()
    };
    let a = sender_to(1, 2, b.local_addr().unwrap(), scfg).await;
    let seen = Seen::default();
    spawn_counter(
        b.receiver::<u64>(ChannelId(2), false).unwrap(),
        seen.clone(),
        0,
        Duration::ZERO,
    );
    let mut big_rx = b.raw_receiver(ChannelId(1), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = big_rx.recv().await {
            d.ack();
        }
    });
    let amo = a
        .sender::<u64>(NodeId(2), opts(2, Guarantee::AtMostOnce))
        .unwrap();
    let r = amo.send(&0).await.unwrap();
    assert_eq!(within(10.0, "warm-up", r).await, Ok(Outcome::Sent));
    let deadline = Duration::from_secs(3);
    let big = a
        .raw_sender(
            NodeId(2),
            opts_deadline(1, Guarantee::AtLeastOnce, deadline),
        )
        .unwrap();
    let t0 = Instant::now();
    let big_r = big.send(Bytes::from(vec![7u8; 100 << 10])).await.unwrap();
    let mut sent = 0u64;
    for v in 1..=600u64 {
        if let Ok(Outcome::Sent) = within(20.0, "amo", amo.send(&v).await.unwrap()).await {
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let big_o = within(20.0, "oversize receipt", big_r).await;
    let at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lost: Vec<u64> = (1..=600u64).filter(|v| get(&seen, *v) == 0).collect();
    let cuts = b.tcp_stats().unwrap().rejected_too_large;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cuts_later = b.tcp_stats().unwrap().rejected_too_large;
    let summary = format!(
        "handoff={handoff}: oversize receipt {big_o:?} after {at:?}; at-most-once on another \
         channel: {sent} Sent, {} lost (first {:?}); connections the receiver cut for the \
         oversize frame: {cuts}, and 3 s after its receipt resolved {cuts_later}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!("{summary}");
    if handoff {
        assert!(
            matches!(big_o, Ok(Outcome::HandedOff) | Err(_)),
            "{summary}"
        );
    } else {
        assert!(big_o.is_err(), "{summary}");
    }
    assert!(at < deadline + Duration::from_secs(8), "{summary}");
    assert!(
        lost.is_empty(),
        "a healthy link lost at-most-once messages of another channel: {summary}"
    );
    assert_eq!(
        cuts, cuts_later,
        "the link is still being cut after the oversize message settled: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_above_the_receivers_frame_limit_does_not_disturb_other_channels() {
    oversize_for_the_receivers_frame_limit(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_off_payload_above_the_receivers_frame_limit_does_not_cut_the_link_for_its_ttl() {
    oversize_for_the_receivers_frame_limit(true).await;
}

/// A sender with `max_payload` 1000: a payload of exactly 1000 bytes goes through
/// `send`, `try_send`, `send_with_key`, `send_many` and the sink on every guarantee
/// and arrives byte for byte; 1001 bytes fail with `TooLarge { len: 1001, max: 1000 }`
/// on each, before anything is sent (the batch holding one is refused whole). Then the
/// target goes down: a 1000-byte effectively-once message is handed off and replayed
/// byte for byte once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_at_and_over_the_limit_on_every_api_and_through_a_hint() {
    use futures::SinkExt;
    const MAX: usize = 1000;
    let hints = tempfile::tempdir().unwrap();
    let addr = restartable_addr();
    let start_target = |addr| async move {
        let b = receiver_at(2, addr, &[1], fast_hb(NodeConfig::default())).await;
        let got: Arc<Mutex<Vec<(u32, Bytes)>>> = Arc::default();
        for ch in 1..=3u32 {
            let mut rx = b.raw_receiver(ChannelId(ch), false).unwrap();
            let got = got.clone();
            tokio::spawn(async move {
                while let Some(d) = rx.recv().await {
                    got.lock().unwrap().push((ch, d.message().clone()));
                    d.ack();
                }
            });
        }
        (b, got)
    };
    let (b, got) = start_target(addr).await;
    let mut cfg = handoff_cfg(hints.path());
    cfg.max_payload = MAX;
    let a = sender_to(1, 2, addr, cfg).await;
    wait_health(&a, NodeId(2), Health::Up, 10.0).await;
    let at = |tag: u8| Bytes::from(vec![tag; MAX]);
    let over = Bytes::from(vec![0u8; MAX + 1]);
    let too_large = SendError::TooLarge {
        len: MAX + 1,
        max: MAX,
    };
    let mut receipts = Vec::new();
    let mut want = Vec::new();
    for (ch, g) in [
        (1u32, Guarantee::AtMostOnce),
        (2, Guarantee::AtLeastOnce),
        (3, Guarantee::EffectivelyOnce),
    ] {
        let out = a.raw_sender(NodeId(2), opts(ch, g)).unwrap();
        let tag = (ch * 10) as u8;
        assert_eq!(out.send(over.clone()).await.unwrap_err(), too_large);
        assert_eq!(out.try_send(over.clone()).unwrap_err(), too_large);
        assert_eq!(
            out.send_with_key(over.clone(), IdKey(u128::from(ch)))
                .await
                .unwrap_err(),
            too_large
        );
        assert_eq!(
            out.send_many(vec![at(tag + 9), over.clone()])
                .await
                .unwrap_err(),
            too_large
        );
        let mut sink = out.sink();
        assert_eq!(sink.send(over.clone()).await.unwrap_err(), too_large);
        receipts.push(out.send(at(tag + 1)).await.unwrap());
        receipts.push(out.try_send(at(tag + 2)).unwrap());
        receipts.push(
            out.send_with_key(at(tag + 3), IdKey(1000 + u128::from(ch)))
                .await
                .unwrap(),
        );
        receipts.extend(out.send_many(vec![at(tag + 4)]).await.unwrap());
        let mut sink = out.sink();
        sink.send(at(tag + 5)).await.unwrap();
        within(10.0, "sink close", sink.close()).await.unwrap();
        for k in 1..=5u8 {
            want.push((ch, at(tag + k)));
        }
    }
    let outs = settle(receipts, 10.0, "at the limit").await;
    for o in &outs {
        assert!(matches!(o, Ok(Outcome::Acked) | Ok(Outcome::Sent)), "{o:?}");
    }
    wait_until(10.0, "every at-limit payload arrives", || {
        got.lock().unwrap().len() >= want.len()
    })
    .await;
    let mut have = got.lock().unwrap().clone();
    have.sort();
    want.sort();
    assert_eq!(have.len(), want.len(), "nothing refused was sent");
    assert!(have == want, "payloads arrived altered");

    // Through the hint store.
    within(15.0, "target shutdown", b.shutdown()).await;
    wait_health(&a, NodeId(2), Health::Down, 15.0).await;
    let eo = a
        .raw_sender(NodeId(2), opts(3, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = eo.send(at(99)).await.unwrap();
    assert_eq!(within(10.0, "hint", r).await, Ok(Outcome::HandedOff));
    assert_eq!(eo.send(over.clone()).await.unwrap_err(), too_large);
    let (_b2, got2) = start_target(addr).await;
    wait_until(20.0, "the at-limit hint is replayed", || {
        !got2.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(got2.lock().unwrap().clone(), vec![(3, at(99))]);
}

/// A channel's receiver re-registered four times under load, alternating unordered and
/// ordered, on at-most-once and at-least-once streams: nothing stalls, every
/// at-least-once message is processed and acked, at-most-once messages sent after the
/// last re-registration all arrive (those queued in a dropped receiver are lost with
/// it, as documented), and while a receiver is ordered its first deliveries of each
/// stream follow send order, except that a message sent before it registered may
/// come after one the dropped receiver had been handed (rule 2 of the ordered
/// contract; a CI run saw at-least-once 1000051 before 1000000, which the first
/// receiver was handling when it was aborted). Counted and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_alternating_ordered_and_unordered_under_load() {
    const N: u64 = 1200;
    let (b, a) = tcp_pair(NodeId(2), NodeId(1)).await;
    let b = Arc::new(b);
    // Values: at-most-once 0..N, at-least-once 1_000_000 + 0..N, on one channel.
    let amo = a
        .sender::<u64>(NodeId(2), opts(4, Guarantee::AtMostOnce))
        .unwrap();
    let alo_node = sender_to(3, 2, b.local_addr().unwrap(), NodeConfig::default()).await;
    b.add_peer(NodeId(3), alo_node.local_addr().unwrap());
    let alo = alo_node
        .sender::<u64>(NodeId(2), opts(4, Guarantee::AtLeastOnce))
        .unwrap();
    let seen = Seen::default();
    // (receiver generation, ordered, value) per first delivery.
    let log: Arc<Mutex<Vec<(u32, bool, u64)>>> = Arc::default();
    let started: Arc<Mutex<std::collections::HashSet<u64>>> = Arc::default();
    // How many values of each stream had been sent when each generation registered.
    let sent = Arc::new(AtomicU64::new(0));
    let registered_after: Arc<Mutex<Vec<u64>>> = Arc::default();
    let serve = |generation: u32, ordered: bool| {
        let rx = b
            .receiver_with::<u64>(
                ChannelId(4),
                if ordered {
                    ReceiverOptions::ordered()
                } else {
                    ReceiverOptions::unordered()
                },
            )
            .unwrap();
        let (seen, log, started) = (seen.clone(), log.clone(), started.clone());
        registered_after
            .lock()
            .unwrap()
            .push(sent.load(Ordering::SeqCst));
        tokio::spawn(async move {
            let mut rx = rx;
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                // A first delivery is the first time a handler gets the message (a
                // handler aborted mid-message did get it: its redelivery is not one).
                if started.lock().unwrap().insert(v) {
                    log.lock().unwrap().push((generation, ordered, v));
                }
                tokio::time::sleep(Duration::from_micros(300)).await;
                d.ack();
                bump(&seen, v);
            }
        })
    };
    let mut reader = serve(0, false);
    let sent_by_task = sent.clone();
    let sending = tokio::spawn(async move {
        let mut rs = Vec::new();
        for v in 0..N {
            sent_by_task.store(v + 1, Ordering::SeqCst);
            rs.push(amo.send(&v).await.unwrap());
            rs.push(alo.send(&(1_000_000 + v)).await.unwrap());
            if v % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        (rs, amo)
    });
    for generation in 1..=4u32 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        reader.abort();
        let _ = reader.await;
        reader = serve(generation, generation % 2 == 1);
    }
    let (rs, amo) = within(30.0, "sending", sending).await.unwrap();
    // After the last re-registration: at-most-once on a healthy link loses nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tail = Vec::new();
    for v in N..N + 200 {
        tail.push(amo.send(&v).await.unwrap());
    }
    let tail = settle(tail, 10.0, "tail").await;
    assert!(
        tail.iter().all(|o| o == &Ok(Outcome::Sent)),
        "{:?}",
        tally(&tail)
    );
    wait_until(10.0, "the at-most-once tail arrives", || {
        (N..N + 200).all(|v| get(&seen, v) == 1)
    })
    .await;
    let outs = settle(rs, 30.0, "receipts").await;
    let t = tally(&outs);
    assert_eq!(t.get("Ok(Sent)").copied(), Some(N as usize), "{t:?}");
    assert_eq!(t.get("Ok(Acked)").copied(), Some(N as usize), "{t:?}");
    wait_until(15.0, "every at-least-once message processed", || {
        (0..N).all(|v| get(&seen, 1_000_000 + v) >= 1)
    })
    .await;
    // At-most-once queued in an aborted receiver is lost with it (documented); the
    // rest arrives.
    let amo_got = (0..N).filter(|v| get(&seen, *v) >= 1).count() as u64;
    let log = log.lock().unwrap().clone();
    let registered_after = registered_after.lock().unwrap().clone();
    let mut inversions = Vec::new();
    let mut allowed = 0;
    for generation in [1u32, 3] {
        for alo_stream in [false, true] {
            let vals: Vec<u64> = log
                .iter()
                .filter(|(g, o, v)| *g == generation && *o && (*v >= 1_000_000) == alo_stream)
                .map(|(_, _, v)| *v)
                .collect();
            for w in vals.windows(2).filter(|w| w[1] < w[0]) {
                // A message sent before this receiver registered may have been handed
                // to the one dropped before it (queued, unread) and taken back: rule 2
                // of the ordered contract (`ReceiverOptions::ordered`) lets what was
                // handed out come before it. Messages sent after the registration
                // follow send order (rule 1).
                if w[1] % 1_000_000 < registered_after[generation as usize] {
                    allowed += 1;
                } else {
                    inversions.push((w[0], w[1]));
                }
            }
        }
    }
    eprintln!("inversions of messages sent before their receiver registered: {allowed}");
    eprintln!("at-most-once arrived {amo_got} of {N} across the re-registrations");
    assert!(
        inversions.is_empty(),
        "ordered receivers saw first deliveries out of send order: {:?}",
        &inversions[..inversions.len().min(8)]
    );
}
