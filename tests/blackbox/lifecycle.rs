//! Black-box lifecycle tests: what happens over long (virtual) time and many
//! lifecycles. Public API only (README.md, rustdoc, `ackwire::testing`), default
//! settings unless a test is about a setting. Hours-long scenarios run on the
//! `testing` feature's `SimNet` (tokio's paused clock); the ones where the clock or the
//! transport matters run on real TCP loopback.
//!
//! Areas: the dedup horizon and application-key expiry, the key-table budget; many
//! sender incarnations (clean and crashed) against one long-lived receiver, with and
//! without durable dedup, receiver restarts in the middle; stream retirement and a late
//! message for a retired stream; hinted handoff over long outages (TTL, sender
//! restarts while holding hints, decommission); retry deadlines; failure-detector
//! flapping over hours; dead letters across restarts; durable files staying bounded.
//!
//! Found when written (failing on the commit they were written against):
//! - `streams_of_crashed_senders_make_room_after_the_retention_at_max_streams`: at
//!   `dedup.max_streams`, idle streams are never retired, so a new stream is refused
//!   forever (documented: "refused and retried ... idle streams are retired after the
//!   retention"). The sweep runs only when `StreamRegistry::begin` reports a change
//!   (a stream created or revived), and a creation refused with `TooManyStreams`
//!   reports none; the node never calls `Dedup::retire_idle`. 4 crashed runs, 25 h
//!   later: `streams: 4, streams_retired_idle: 0`, the fifth run's send `Deadline`.
//! - `hints_older_than_their_ttl_are_expired_not_replayed_in_virtual_time`: hint TTL is
//!   measured with `SystemTime::now()` (the OS clock), so on `SimNet`'s virtual clock a
//!   6-h TTL never passes: a target back after 7 virtual hours gets all 10 hints
//!   (`expired: 0, delivered: 10`).

use crate::support::ports;
use ackwire::codec::Decode;
use ackwire::dedup::{DurableDedup, BYTES_PER_SLOT};
use ackwire::detector::{Health, HealthChange};
use ackwire::testing::{NodeSetup, SimNet};
use ackwire::transport::mem::FaultPlan;
use ackwire::{
    Bincode, ChannelId, ChannelOptions, Delivery, Guarantee, HandoffConfig, IdKey, Node,
    NodeConfig, NodeId, Outcome, Receipt, RejectReason, SendError, Stats,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const CH: ChannelId = ChannelId(1);
const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn seen() -> Seen {
    Arc::default()
}

fn count(s: &Seen, v: u64) -> u32 {
    s.lock().unwrap().get(&v).copied().unwrap_or(0)
}

fn distinct(s: &Seen) -> usize {
    s.lock().unwrap().len()
}

/// A start hook: a `u64` receiver on `CH` that counts each value and acks it.
fn counter(s: Seen) -> impl FnMut(&Node) + Send + 'static {
    move |node: &Node| {
        let mut rx = node.receiver::<u64>(CH, false).unwrap();
        let s = s.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                *s.lock().unwrap().entry(*d.message()).or_default() += 1;
                d.ack();
            }
        });
    }
}

fn eo() -> ChannelOptions {
    ChannelOptions::new(CH, Guarantee::EffectivelyOnce)
}

async fn stats(node: &Node) -> Stats {
    node.stats().await.unwrap()
}

async fn resolve(r: Receipt, within: Duration) -> Result<Outcome, SendError> {
    match tokio::time::timeout(within, r).await {
        Ok(res) => res,
        Err(_) => panic!("receipt did not resolve within {within:?}"),
    }
}

async fn resolve_all(
    rs: Vec<(u64, Receipt)>,
    within: Duration,
) -> Vec<(u64, Result<Outcome, SendError>)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    for (v, r) in rs {
        match tokio::time::timeout_at(deadline, r).await {
            Ok(res) => out.push((v, res)),
            Err(_) => panic!("receipt of {v} did not resolve within {within:?}"),
        }
    }
    out
}

async fn wait_health(
    sim: &SimNet,
    node: NodeId,
    peer: NodeId,
    want: Health,
    within: Duration,
) -> Duration {
    let n = sim.node(node).unwrap();
    sim.run_until(|| n.health(peer) == Some(want), within)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{node} never saw {peer} {want:?}: {e} (now {:?})",
                n.health(peer)
            )
        })
}

fn dir_bytes(dir: &Path) -> (usize, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += m.len();
            }
        }
    }
    (files, bytes)
}

fn handoff_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.handoff = Some(HandoffConfig::new(dir));
    c
}

fn durable_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.dedup.durable = Some(DurableDedup::new(dir));
    c
}

// ---------------------------------------------------------------------------------
// Dedup horizon and application keys

/// README, dedup limits: "key horizon | 2 min | a key is forgotten; a resend after it is
/// processed again"; the guarantee table: "duplicates are acked, not delivered".
/// Defaults: the same `IdKey` 60 s after it completed is acked and not processed; 3 min
/// after, it is processed again.
#[tokio::test(start_paused = true)]
async fn an_idkey_within_the_horizon_is_acked_unprocessed_and_after_it_is_processed_again() {
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(11)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();

    let r = out.send_with_key(&7, IdKey(7)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(10)).await.unwrap(),
        Outcome::Acked
    );
    assert_eq!(count(&s, 7), 1);

    sim.advance(Duration::from_secs(60)).await;
    let r = out.send_with_key(&7, IdKey(7)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(10)).await.unwrap(),
        Outcome::Acked
    );
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(
        count(&s, 7),
        1,
        "a resend within the horizon was processed again"
    );
    let st = stats(sim.node(B).unwrap()).await;
    assert!(st.dedup.duplicates >= 1, "{:?}", st.dedup);

    sim.advance(Duration::from_secs(180)).await;
    let r = out.send_with_key(&7, IdKey(7)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(10)).await.unwrap(),
        Outcome::Acked
    );
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(
        count(&s, 7),
        2,
        "a resend after the horizon must be processed again"
    );
    sim.shutdown().await;
}

/// dedup module docs: "The key table grows with the key rate ... dropping whole
/// generations once all their keys expired ... Memory for keys is about 100–300 bytes
/// per key completed within the last horizon"; README: "Memory is therefore bounded by
/// the senders alive within the retention, not by history". 40 minutes of 10 keys/s:
/// memory after 40 minutes is about what it was after 10, generations are dropped, and
/// every key is processed exactly once.
#[tokio::test(start_paused = true)]
async fn key_table_memory_tracks_the_key_rate_not_history_over_40_minutes() {
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(12)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut mem_at_10 = 0;
    let mut gens = Vec::new();
    let mut k = 0u64;
    for minute in 0..40 {
        let mut rs = Vec::new();
        for _sec in 0..60 {
            for _ in 0..10 {
                k += 1;
                rs.push((
                    k,
                    out.send_with_key(&k, IdKey(k as u128 + (1 << 64)))
                        .await
                        .unwrap(),
                ));
            }
            sim.advance(Duration::from_secs(1)).await;
        }
        for (v, r) in resolve_all(rs, Duration::from_secs(60)).await {
            assert_eq!(r.unwrap(), Outcome::Acked, "key {v}");
        }
        let st = stats(sim.node(B).unwrap()).await;
        gens.push(st.dedup.key_generations);
        if minute == 9 {
            mem_at_10 = st.dedup.memory_bytes;
        }
    }
    let st = stats(sim.node(B).unwrap()).await;
    assert_eq!(distinct(&s), k as usize);
    assert!(s.lock().unwrap().values().all(|n| *n == 1));
    assert!(st.dedup.key_generations_dropped > 0, "{:?}", st.dedup);
    assert!(
        st.dedup.memory_bytes <= mem_at_10 * 3 / 2 + (256 << 10),
        "dedup memory grew with history: {} B at 10 min, {} B at 40 min; generations {gens:?}",
        mem_at_10,
        st.dedup.memory_bytes
    );
    assert!(st.dedup.memory_bytes < 8 << 20, "{:?}", st.dedup);
    sim.shutdown().await;
}

/// README, dedup limits: "only at the budget are new keys refused (`TableFull`, counted,
/// warned): the sender's receipt fails at once with `Rejected { reason: KeyTableFull }`
/// (nothing was processed; resending the same key after the horizon is safe ...)".
/// A fixed-size table (`table_budget_bytes = table_capacity × BYTES_PER_SLOT`, as the
/// field's doc suggests): refused keys were not processed, counted, and each resent
/// after the horizon is processed exactly once.
#[tokio::test(start_paused = true)]
async fn a_full_key_table_refuses_typed_and_resending_after_the_horizon_is_safe() {
    let s = seen();
    let mut cfg = NodeConfig::default();
    cfg.dedup.table_capacity = 1024;
    cfg.dedup.table_budget_bytes = 1024 * BYTES_PER_SLOT;
    let mut sim = SimNet::new(FaultPlan::new(13)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).config(cfg).on_start(counter(s.clone())))
        .await
        .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut rs = Vec::new();
    for k in 1..=3000u64 {
        rs.push((k, out.send_with_key(&k, IdKey(k as u128)).await.unwrap()));
    }
    let mut refused = Vec::new();
    for (k, r) in resolve_all(rs, Duration::from_secs(60)).await {
        match r {
            Ok(Outcome::Acked) => {}
            Err(SendError::Rejected {
                reason: RejectReason::KeyTableFull,
            }) => refused.push(k),
            other => panic!("key {k}: {other:?}"),
        }
    }
    sim.advance(Duration::from_secs(1)).await;
    assert!(
        !refused.is_empty(),
        "a 1024-slot table took 3000 keys within the horizon"
    );
    for k in &refused {
        assert_eq!(count(&s, *k), 0, "refused key {k} was processed");
    }
    let st = stats(sim.node(B).unwrap()).await;
    assert!(
        st.dedup.table_full >= refused.len() as u64,
        "{:?} refused {}",
        st.dedup,
        refused.len()
    );

    // After the horizon, resend the refused keys (in table-sized rounds).
    let mut left = refused.clone();
    let mut rounds = 0;
    while !left.is_empty() {
        rounds += 1;
        assert!(rounds < 20, "{} keys still refused", left.len());
        sim.advance(Duration::from_secs(150)).await;
        let mut rs = Vec::new();
        for k in left.iter().take(500) {
            rs.push((*k, out.send_with_key(k, IdKey(*k as u128)).await.unwrap()));
        }
        let mut still = left.iter().skip(500).copied().collect::<Vec<_>>();
        for (k, r) in resolve_all(rs, Duration::from_secs(60)).await {
            match r {
                Ok(Outcome::Acked) => {}
                Err(SendError::Rejected {
                    reason: RejectReason::KeyTableFull,
                }) => still.push(k),
                other => panic!("resent key {k}: {other:?}"),
            }
        }
        left = still;
    }
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(distinct(&s), 3000);
    let twice: Vec<_> = s
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(k, n)| (*k, *n))
        .collect();
    assert!(
        twice.is_empty(),
        "keys not processed exactly once: {twice:?}"
    );
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Sender incarnations against one long-lived receiver

/// README, dedup limits: "stream `retention` | 24 h | a sender incarnation idle that long
/// (crashed, or finished) has its window retired to a small tombstone"; "Memory is
/// therefore bounded by the senders alive within the retention"; Finish frame: "a node
/// that shuts down cleanly lets its receivers retire its dedup streams at once instead
/// of after the 24 h retention". 24 incarnations, clean restarts and crashes
/// alternating: every acked message processed once, none twice; finished streams retire
/// at once, crashed ones after 24 h.
#[tokio::test(start_paused = true)]
async fn sender_incarnations_clean_and_crashed_retire_and_nothing_is_processed_twice() {
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(14)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    let mut acked = HashSet::new();
    let (mut clean, mut crashed) = (0u64, 0u64);
    for inc in 0..24u64 {
        let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
        let mut rs = Vec::new();
        for j in 0..20 {
            let v = inc * 100 + j;
            rs.push((v, out.send(&v).await.unwrap()));
        }
        if inc % 2 == 0 {
            for (v, r) in resolve_all(rs, Duration::from_secs(30)).await {
                assert_eq!(r.unwrap(), Outcome::Acked, "{v}");
                acked.insert(v);
            }
            sim.advance(Duration::from_secs(2)).await;
            sim.restart(A).await.unwrap();
            clean += 1;
        } else {
            // Crash with part of the messages still unacknowledged.
            sim.advance(Duration::from_micros(300)).await;
            sim.crash(A).await.unwrap();
            for (v, r) in resolve_all(rs, Duration::from_secs(30)).await {
                match r {
                    Ok(Outcome::Acked) => {
                        acked.insert(v);
                    }
                    Err(SendError::Shutdown) => {}
                    other => panic!("{v}: {other:?}"),
                }
            }
            crashed += 1;
            sim.advance(Duration::from_secs(2)).await;
            sim.start(A).await.unwrap();
        }
    }
    sim.advance(Duration::from_secs(5)).await;
    for v in &acked {
        assert_eq!(count(&s, *v), 1, "acked message {v}");
    }
    let twice: Vec<_> = s
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| *k)
        .collect();
    assert!(twice.is_empty(), "processed twice: {twice:?}");
    let st = stats(sim.node(B).unwrap()).await.dedup;
    assert!(
        st.streams_retired_finished >= clean,
        "{st:?} after {clean} clean shutdowns"
    );
    assert!(st.streams <= crashed + 2, "{st:?}");

    // A day later, a new incarnation's stream appears: the crashed ones are retired.
    sim.advance(Duration::from_secs(25 * 3600)).await;
    sim.restart(A).await.unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let r = out.send(&999_999).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(30)).await.unwrap(),
        Outcome::Acked
    );
    let st = stats(sim.node(B).unwrap()).await.dedup;
    assert!(
        st.streams_retired_idle >= crashed,
        "{st:?} after {crashed} crashes"
    );
    assert!(st.streams <= 2, "live streams after a day: {st:?}");
    sim.shutdown().await;
}

/// README: "`EffectivelyOnce` ... exactly once if the receipt was `Ok`"; "Resend under
/// the same `IdKey` on an effectively-once channel to make the retry safe"; durable
/// dedup survives receiver restarts. Sender crashes and retries its unresolved keys from
/// the next incarnation; the receiver (durable dedup) is restarted cleanly and crashed
/// (while idle) in the middle. Every key is processed exactly once.
#[tokio::test(start_paused = true)]
async fn durable_dedup_keeps_keys_once_across_sender_crashes_and_receiver_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(15)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(
        NodeSetup::new(B)
            .config(durable_cfg(tmp.path()))
            .on_start(counter(s.clone())),
    )
    .await
    .unwrap();
    let mut pending: Vec<u64> = Vec::new();
    let mut next = 1u64;
    for round in 0..16u64 {
        if round == 6 {
            sim.restart(B).await.unwrap();
        }
        if round == 11 {
            sim.advance(Duration::from_secs(2)).await;
            sim.crash(B).await.unwrap();
            sim.start(B).await.unwrap();
        }
        let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
        let mut todo = std::mem::take(&mut pending);
        for _ in 0..20 {
            todo.push(next);
            next += 1;
        }
        let mut rs = Vec::new();
        for v in &todo {
            rs.push((
                *v,
                out.send_with_key(v, IdKey(*v as u128 + (7 << 80)))
                    .await
                    .unwrap(),
            ));
        }
        if round % 2 == 1 {
            sim.advance(Duration::from_micros(500)).await;
            sim.crash(A).await.unwrap();
            for (v, r) in resolve_all(rs, Duration::from_secs(30)).await {
                match r {
                    Ok(Outcome::Acked) => {}
                    Err(SendError::Shutdown) => pending.push(v),
                    other => panic!("{v}: {other:?}"),
                }
            }
            sim.start(A).await.unwrap();
        } else {
            for (v, r) in resolve_all(rs, Duration::from_secs(30)).await {
                assert_eq!(r.unwrap(), Outcome::Acked, "{v}");
            }
            sim.restart(A).await.unwrap();
        }
    }
    // Retry what is left once more.
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    for v in std::mem::take(&mut pending) {
        let r = out
            .send_with_key(&v, IdKey(v as u128 + (7 << 80)))
            .await
            .unwrap();
        assert_eq!(
            resolve(r, Duration::from_secs(30)).await.unwrap(),
            Outcome::Acked
        );
    }
    sim.advance(Duration::from_secs(1)).await;
    let total = next - 1;
    assert_eq!(distinct(&s) as u64, total);
    let bad: Vec<_> = s
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(k, n)| (*k, *n))
        .collect();
    assert!(bad.is_empty(), "keys processed other than once: {bad:?}");
    sim.shutdown().await;
}

/// README, dedup limits: a sender idle longer than the retention "has its window retired
/// to a small tombstone; a late copy below its watermark is a duplicate, anything else is
/// refused (`StreamRetired`, counted), never processed twice"; the rejection table:
/// "refuses a message for good: ... stream retired" → "the receipt fails at once with
/// `SendError::Rejected { reason }`". dedup docs: a per-channel deadline override "is not
/// checked". A message nacked (so released), whose retries are cut off by a 25 h
/// partition while a later seq of its stream was processed, arrives after the stream
/// retired: the sender's receipt fails typed and the handler never sees it again.
#[tokio::test(start_paused = true)]
async fn a_late_retry_for_a_retired_stream_is_refused_typed_and_not_processed() {
    let mut sim = SimNet::new(FaultPlan::new(16)).unwrap();
    let net = sim.network().clone();
    let deliveries = seen();
    let d2 = deliveries.clone();
    sim.add_node(A).await.unwrap();
    sim.add_node(C).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(move |node: &Node| {
        let mut rx = node.receiver::<u64>(CH, false).unwrap();
        let d2 = d2.clone();
        let net = net.clone();
        tokio::spawn(async move {
            let mut held: Option<Delivery<u64>> = None;
            let mut second: Option<Delivery<u64>> = None;
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                *d2.lock().unwrap().entry(v).or_default() += 1;
                match v {
                    1 => held = Some(d),
                    2 => second = Some(d),
                    _ => d.ack(),
                }
                if held.is_some() && second.is_some() {
                    second.take().unwrap().ack();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    net.partition(A, B);
                    held.take().unwrap().nack();
                }
            }
        });
    }))
    .await
    .unwrap();
    let opts = ChannelOptions {
        deadline: Some(Duration::from_secs(48 * 3600)),
        ..eo()
    };
    let out = sim.node(A).unwrap().sender::<u64>(B, opts).unwrap();
    let r1 = out.send(&1).await.unwrap();
    let r2 = out.send(&2).await.unwrap();
    assert_eq!(
        resolve(r2, Duration::from_secs(10)).await.unwrap(),
        Outcome::Acked
    );
    let d = deliveries.clone();
    sim.run_until(|| count(&d, 1) == 1, Duration::from_secs(5))
        .await
        .unwrap();
    // A day passes; then another sender's new stream makes the receiver sweep.
    sim.advance(Duration::from_secs(25 * 3600)).await;
    let other = sim.node(C).unwrap().sender::<u64>(B, eo()).unwrap();
    let rc = other.send(&3).await.unwrap();
    assert_eq!(
        resolve(rc, Duration::from_secs(30)).await.unwrap(),
        Outcome::Acked
    );
    let st = stats(sim.node(B).unwrap()).await.dedup;
    assert!(
        st.streams_retired_idle >= 1,
        "A's stream not retired after 25 h idle: {st:?}"
    );
    sim.heal(A, B);
    let res = resolve(r1, Duration::from_secs(120)).await;
    assert!(
        matches!(
            res,
            Err(SendError::Rejected {
                reason: RejectReason::StreamRetired
            })
        ),
        "late retry for a retired stream: {res:?}"
    );
    sim.advance(Duration::from_secs(5)).await;
    assert_eq!(
        count(&deliveries, 1),
        1,
        "the late message was handed to the application again"
    );
    let st = stats(sim.node(B).unwrap()).await.dedup;
    assert!(st.retired_refused >= 1, "{st:?}");
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Hinted handoff over long outages

/// `HintStoreConfig::default_ttl`: "Default: 6 h"; README: hint "TTL ... (`SendError::
/// HandoffRefused`)", `Outcome::HandedOff`: "will be replayed ... when the target is back
/// — until the hint TTL"; `HintStats::expired`: "Hints dropped because their TTL passed
/// (never returned)". `ackwire::testing`: "Virtual time. A timer set for `t` fires at
/// virtual `t`", and SimNet "must not change how a node behaves". A target that returns
/// after 7 h (virtual) must get none of the 6-h hints; they are counted as expired.
#[tokio::test(start_paused = true)]
async fn hints_older_than_their_ttl_are_expired_not_replayed_in_virtual_time() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(17)).unwrap();
    sim.add(NodeSetup::new(A).config(handoff_cfg(tmp.path())))
        .await
        .unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    sim.advance(Duration::from_secs(5)).await;
    sim.isolate(B);
    wait_health(&sim, A, B, Health::Down, Duration::from_secs(60)).await;
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut rs = Vec::new();
    for v in 0..10u64 {
        rs.push((v, out.send(&v).await.unwrap()));
    }
    for (v, r) in resolve_all(rs, Duration::from_secs(60)).await {
        assert_eq!(r.unwrap(), Outcome::HandedOff, "{v}");
    }
    sim.advance(Duration::from_secs(7 * 3600)).await;
    sim.rejoin(B);
    wait_health(&sim, A, B, Health::Up, Duration::from_secs(60)).await;
    sim.advance(Duration::from_secs(120)).await;
    let h = stats(sim.node(A).unwrap()).await.hints.unwrap();
    assert_eq!(
        distinct(&s),
        0,
        "hints 7 h old (TTL 6 h) were replayed: {h:?}"
    );
    assert_eq!(h.expired, 10, "{h:?}");
    assert_eq!(h.pending, 0, "{h:?}");
    sim.shutdown().await;
}

/// README hinted handoff: hints "durably hold messages for unreachable targets";
/// `Outcome::HandedOff`: "replayed, under its original ID, when the target is back";
/// SECURITY: "Ids that name X itself, in any incarnation, are allowed. That is how a
/// restarted node replays hints stored by its previous run." A target away 2 h (within
/// the 3 h window and 6 h TTL) while its sender restarts cleanly, crashes and restarts
/// again: each effectively-once message handed off is processed exactly once, and the
/// store ends empty.
#[tokio::test(start_paused = true)]
async fn hints_survive_three_sender_lifecycles_during_a_two_hour_outage_and_replay_once() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(18)).unwrap();
    sim.add(NodeSetup::new(A).config(handoff_cfg(tmp.path())))
        .await
        .unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    sim.advance(Duration::from_secs(5)).await;
    sim.isolate(B);
    wait_health(&sim, A, B, Health::Down, Duration::from_secs(60)).await;
    let mut handed = Vec::new();
    for phase in 0..3u64 {
        let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
        let mut rs = Vec::new();
        for j in 0..10 {
            let v = phase * 100 + j;
            rs.push((v, out.send(&v).await.unwrap()));
        }
        for (v, r) in resolve_all(rs, Duration::from_secs(60)).await {
            assert_eq!(r.unwrap(), Outcome::HandedOff, "{v}");
            handed.push(v);
        }
        sim.advance(Duration::from_secs(40 * 60)).await;
        match phase {
            0 => {
                sim.restart(A).await.unwrap();
            }
            1 => {
                sim.advance(Duration::from_secs(1)).await;
                sim.crash(A).await.unwrap();
                sim.start(A).await.unwrap();
            }
            _ => {
                sim.restart(A).await.unwrap();
            }
        }
        // The new incarnation must learn that B is still Down.
        wait_health(&sim, A, B, Health::Down, Duration::from_secs(60)).await;
    }
    let h = stats(sim.node(A).unwrap()).await.hints.unwrap();
    assert_eq!(
        h.pending, 30,
        "hints pending before the target returns: {h:?}"
    );
    sim.rejoin(B);
    let s2 = s.clone();
    let waited = sim
        .run_until(|| distinct(&s2) == 30, Duration::from_secs(600))
        .await;
    sim.advance(Duration::from_secs(120)).await;
    let h = stats(sim.node(A).unwrap()).await.hints.unwrap();
    assert!(
        waited.is_ok(),
        "{} of 30 hinted messages arrived; {h:?}",
        distinct(&s)
    );
    for v in &handed {
        assert_eq!(count(&s, *v), 1, "hinted message {v}");
    }
    assert_eq!(h.pending, 0, "{h:?}");
    sim.shutdown().await;
}

/// README: "`Node::decommission(peer)` (drop a gone target's hints)"; `Outcome::HandedOff`:
/// replayed "until the hint TTL, or the target is decommissioned". Decommissioned hints
/// stay dropped across the sender's restarts: when a process with the old id comes back,
/// none of them is delivered.
#[tokio::test(start_paused = true)]
async fn decommissioned_hints_stay_dropped_across_sender_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(19)).unwrap();
    sim.add(NodeSetup::new(A).config(handoff_cfg(tmp.path())))
        .await
        .unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    sim.advance(Duration::from_secs(5)).await;
    sim.isolate(B);
    wait_health(&sim, A, B, Health::Down, Duration::from_secs(60)).await;
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut rs = Vec::new();
    for v in 0..10u64 {
        rs.push((v, out.send(&v).await.unwrap()));
    }
    for (v, r) in resolve_all(rs, Duration::from_secs(60)).await {
        assert_eq!(r.unwrap(), Outcome::HandedOff, "{v}");
    }
    sim.advance(Duration::from_secs(3600)).await;
    let dropped = sim.node(A).unwrap().decommission(B).await.unwrap();
    assert_eq!(dropped, 10);
    sim.restart(A).await.unwrap();
    sim.advance(Duration::from_secs(60)).await;
    sim.crash(A).await.unwrap();
    sim.start(A).await.unwrap();
    let h = stats(sim.node(A).unwrap()).await.hints.unwrap();
    assert_eq!(
        h.pending, 0,
        "decommissioned hints came back after restarts: {h:?}"
    );
    sim.rejoin(B);
    sim.advance(Duration::from_secs(300)).await;
    assert_eq!(distinct(&s), 0, "decommissioned hints were delivered");
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Retry deadlines, failure detector over hours, counters

/// README: `AtLeastOnce` "retries ... until acked or the deadline (default 30 s) ... the
/// receipt then fails with `SendError::Deadline`"; "A send to a peer the failure
/// detector holds Down, without hinted handoff, fails at once with
/// `SendError::PeerDown`"; counters: `gave_up` "messages whose retries ran out".
/// Defaults, a partition: messages in flight fail at their deadline (not earlier, not
/// much later), new sends fail fast once Down, `gave_up` equals what the application saw,
/// and nothing is processed after the heal.
#[tokio::test(start_paused = true)]
async fn messages_cut_off_fail_at_their_deadline_and_counters_agree() {
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(20)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    let out = sim
        .node(A)
        .unwrap()
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let r = out.send(&0).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(5)).await.unwrap(),
        Outcome::Acked
    );
    sim.partition(A, B);
    let t0 = Instant::now();
    let mut rs = Vec::new();
    for v in 1..=5u64 {
        rs.push(out.send(&v).await.unwrap());
    }
    let mut deadline_fails = 0;
    for r in rs {
        match resolve(r, Duration::from_secs(120)).await {
            Err(SendError::Deadline { .. }) => {
                deadline_fails += 1;
                let t = t0.elapsed();
                assert!(
                    t >= Duration::from_secs(29) && t <= Duration::from_secs(40),
                    "deadline fired after {t:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    wait_health(&sim, A, B, Health::Down, Duration::from_secs(60)).await;
    let res = out.send(&6).await;
    let res = match res {
        Ok(r) => resolve(r, Duration::from_secs(5)).await,
        Err(e) => Err(e),
    };
    assert!(matches!(res, Err(SendError::PeerDown { .. })), "{res:?}");
    sim.heal(A, B);
    sim.advance(Duration::from_secs(60)).await;
    let st = stats(sim.node(A).unwrap()).await.proto;
    assert_eq!(st.gave_up, deadline_fails, "{st:?}");
    assert_eq!(st.acked, 1, "{st:?}");
    for v in 1..=6 {
        assert_eq!(
            count(&s, v),
            0,
            "message {v} processed after its receipt failed"
        );
    }
    sim.shutdown().await;
}

/// detector docs: "a peer's health never flaps without an input from the peer"; "Only
/// `poll` moves a peer towards Down ... only an arrival from the peer brings it back
/// Up"; `heartbeat_after_down` gaps are not learned. Ten outages of 2 min, 20 min apart,
/// over 4 hours: every outage is detected in about the same time (it does not get slower
/// as the history grows), the events form a consistent chain, and messages sent while Up
/// are each processed once with `acked` equal to what the application saw.
#[tokio::test(start_paused = true)]
async fn failure_detector_over_four_hours_of_flapping_stays_consistent_and_prompt() {
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(21)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    let mut events = sim.node(A).unwrap().health_events();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut detect = Vec::new();
    let mut recover = Vec::new();
    let mut ok = 0u64;
    let mut v = 0u64;
    for _cycle in 0..10 {
        sim.advance(Duration::from_secs(20 * 60)).await;
        let mut rs = Vec::new();
        for _ in 0..5 {
            v += 1;
            rs.push((v, out.send(&v).await.unwrap()));
        }
        for (v, r) in resolve_all(rs, Duration::from_secs(30)).await {
            assert_eq!(r.unwrap(), Outcome::Acked, "{v}");
            ok += 1;
        }
        sim.partition(A, B);
        detect.push(wait_health(&sim, A, B, Health::Down, Duration::from_secs(120)).await);
        sim.advance(Duration::from_secs(120)).await;
        sim.heal(A, B);
        recover.push(wait_health(&sim, A, B, Health::Up, Duration::from_secs(60)).await);
    }
    let mut log: Vec<HealthChange> = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.peer == B {
            log.push(e);
        }
    }
    for w in log.windows(2) {
        assert_eq!(w[0].to, w[1].from, "health events do not chain: {log:?}");
        assert!(w[0].at <= w[1].at);
    }
    let downs = log.iter().filter(|e| e.to == Health::Down).count();
    assert_eq!(downs, 10, "{log:?}");
    let (min, max) = (detect.iter().min().unwrap(), detect.iter().max().unwrap());
    assert!(
        *max <= Duration::from_secs(20) && *max <= *min * 2 + Duration::from_secs(1),
        "time to detect each outage: {detect:?}"
    );
    assert!(
        recover.iter().all(|d| *d <= Duration::from_secs(5)),
        "{recover:?}"
    );
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(distinct(&s) as u64, ok);
    assert!(s.lock().unwrap().values().all(|n| *n == 1));
    let st = stats(sim.node(A).unwrap()).await.proto;
    assert_eq!(st.acked, ok, "{st:?}");
    assert_eq!(st.sent, ok, "{st:?}");
    assert_eq!(sim.node(A).unwrap().health(B), Some(Health::Up));
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Dead letters across restarts

fn poison_counter(s: Seen) -> impl FnMut(&Node) + Send + 'static {
    move |node: &Node| {
        let mut rx = node.receiver::<u64>(CH, false).unwrap();
        let s = s.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let v = *d.message();
                *s.lock().unwrap().entry(v).or_default() += 1;
                if v >= 1_000_000 {
                    d.nack();
                } else {
                    d.ack();
                }
            }
        });
    }
}

/// README: "a message nacked or dropped `max_deliveries` times (default 20) ... goes to
/// `Node::dead_letters()` ... and is never delivered again"; `NodeConfig::dead_letter_dir`:
/// "a restarted node finds the letters it had not handed out yet ... A letter leaves the
/// log when it is handed to the application"; README: durable logs ... bounded. Twelve
/// receiver lifecycles (clean restarts and crashes), three poison messages each: every
/// letter handed out once, none back after a restart, and the log directory does not
/// grow with the number of letters ever taken.
#[tokio::test(start_paused = true)]
async fn dead_letters_taken_stay_taken_across_restarts_and_the_log_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut cfg = NodeConfig::default();
    cfg.dead_letter_dir = Some(tmp.path().to_path_buf());
    let mut sim = SimNet::new(FaultPlan::new(22)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(
        NodeSetup::new(B)
            .config(cfg)
            .on_start(poison_counter(s.clone())),
    )
    .await
    .unwrap();
    let mut sizes = Vec::new();
    let mut taken = HashMap::<u64, u32>::new();
    for round in 0..12u64 {
        let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
        let mut rs = Vec::new();
        for j in 0..3 {
            let p = 1_000_000 + round * 10 + j;
            rs.push((p, out.send(&p).await.unwrap()));
            rs.push((round * 10 + j, out.send(&(round * 10 + j)).await.unwrap()));
        }
        for (v, r) in resolve_all(rs, Duration::from_secs(60)).await {
            if v >= 1_000_000 {
                assert!(
                    matches!(
                        r,
                        Err(SendError::Rejected {
                            reason: RejectReason::DeadLettered
                        })
                    ),
                    "{v}: {r:?}"
                );
            } else {
                assert_eq!(r.unwrap(), Outcome::Acked);
            }
        }
        let mut dl = sim.node(B).unwrap().dead_letters();
        // Letters left over from an earlier run would show up here.
        for _ in 0..3 {
            let l = tokio::time::timeout(Duration::from_secs(5), dl.recv())
                .await
                .expect("dead letter")
                .expect("dead letter");
            let v: u64 = Bincode.decode(&l.message).unwrap();
            assert!(l.deliveries <= 20 && l.deliveries >= 1, "{l:?}");
            *taken.entry(v).or_default() += 1;
        }
        assert!(
            dl.try_recv().is_none(),
            "round {round}: more dead letters than poison messages"
        );
        sim.advance(Duration::from_secs(1)).await;
        if round % 2 == 0 {
            sim.restart(B).await.unwrap();
        } else {
            sim.crash(B).await.unwrap();
            sim.start(B).await.unwrap();
        }
        let mut dl = sim.node(B).unwrap().dead_letters();
        if let Some(l) = dl.try_recv() {
            panic!("round {round}: a taken dead letter came back after a restart: {l:?}");
        }
        sizes.push(dir_bytes(tmp.path()));
    }
    assert_eq!(taken.len(), 36, "{taken:?}");
    assert!(taken.values().all(|n| *n == 1), "{taken:?}");
    for (p, n) in s.lock().unwrap().iter().filter(|(p, _)| **p >= 1_000_000) {
        assert!(*n <= 20, "poison {p} delivered {n} times");
    }
    let (files, bytes) = *sizes.last().unwrap();
    assert!(
        files <= 4 && bytes <= 64 << 10,
        "dead-letter log after 12 runs: {sizes:?}"
    );
    sim.shutdown().await;
}

/// `NodeConfig::dead_letter_capacity`: "Dead letters kept for `Node::dead_letters`
/// before the oldest is dropped (counted in `Stats::dead_letters_dropped`)"; with
/// `dead_letter_dir` "a restarted node finds the letters it had not handed out yet".
/// Capacity 4, seven letters nobody drains: three dropped and counted, the four newest
/// kept, and a restart brings back exactly those four (not the dropped ones).
#[tokio::test(start_paused = true)]
async fn dead_letter_capacity_drops_the_oldest_and_a_restart_does_not_resurrect_them() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut cfg = NodeConfig::default();
    cfg.dead_letter_dir = Some(tmp.path().to_path_buf());
    cfg.dead_letter_capacity = 4;
    let mut sim = SimNet::new(FaultPlan::new(23)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(
        NodeSetup::new(B)
            .config(cfg)
            .on_start(poison_counter(s.clone())),
    )
    .await
    .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut order = Vec::new();
    for j in 0..7u64 {
        let p = 1_000_000 + j;
        let r = out.send(&p).await.unwrap();
        let res = resolve(r, Duration::from_secs(60)).await;
        assert!(
            matches!(
                res,
                Err(SendError::Rejected {
                    reason: RejectReason::DeadLettered
                })
            ),
            "{res:?}"
        );
        order.push(p);
    }
    let st = stats(sim.node(B).unwrap()).await;
    assert_eq!(st.dead_letters_dropped, 3, "{st:?}");
    sim.restart(B).await.unwrap();
    let mut dl = sim.node(B).unwrap().dead_letters();
    let mut got = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(200), dl.recv()).await {
        got.push(Decode::<u64>::decode(&Bincode, &l.message).unwrap());
    }
    assert_eq!(got, order[3..].to_vec(), "letters after a restart");
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Durable files over many restarts

fn dedup_log_bytes(dir: &Path) -> u64 {
    dir_bytes(dir).1
}

/// `DurableDedup::compact_after_bytes`: "Rewrite the log from the live state when it
/// grows beyond this many bytes ... Retired streams and expired keys are left out of the
/// rewrite"; dedup docs: "Retirements and stream activity times are logged too, so ...
/// compaction drops retired streams". 60 clean sender incarnations of 100 messages
/// against a durable receiver (compaction at 32 KiB) that restarts every 15: the log
/// stays within a small multiple of the threshold, and nothing is processed twice.
#[tokio::test(start_paused = true)]
async fn the_durable_dedup_log_stays_bounded_over_sixty_sender_incarnations() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut cfg = durable_cfg(tmp.path());
    cfg.dedup.durable.as_mut().unwrap().compact_after_bytes = 32 << 10;
    let mut sim = SimNet::new(FaultPlan::new(24)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).config(cfg).on_start(counter(s.clone())))
        .await
        .unwrap();
    let mut sizes = Vec::new();
    for inc in 0..60u64 {
        if inc > 0 && inc % 15 == 0 {
            sim.restart(B).await.unwrap();
        }
        let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
        let mut rs = Vec::new();
        for j in 0..100 {
            let v = inc * 1000 + j;
            rs.push((v, out.send(&v).await.unwrap()));
        }
        for (v, r) in resolve_all(rs, Duration::from_secs(30)).await {
            assert_eq!(r.unwrap(), Outcome::Acked, "{v}");
        }
        sim.restart(A).await.unwrap();
        sim.advance(Duration::from_millis(200)).await;
        sizes.push(dedup_log_bytes(tmp.path()));
    }
    assert_eq!(distinct(&s), 6000);
    assert!(s.lock().unwrap().values().all(|n| *n == 1));
    let max = *sizes.iter().max().unwrap();
    assert!(max <= 160 << 10, "dedup log sizes: {sizes:?}");
    let st = stats(sim.node(B).unwrap()).await.dedup;
    assert!(st.streams <= 2, "{st:?}");
    sim.shutdown().await;
}

/// dedup docs: "With it [DurableDedup] ... every `complete` that returned is on disk";
/// the README limits: "key horizon | 2 min | a key is forgotten; a resend after it is
/// processed again"; `ackwire::testing`: SimNet "must not change how a node behaves"
/// and time is virtual. A key completed, then the receiver (durable dedup) restarted 5
/// minutes later and the key resent: the horizon has passed, so it is processed again —
/// as it is without the restart (see the first test).
#[tokio::test(start_paused = true)]
async fn a_durable_key_is_forgotten_after_the_horizon_across_a_restart_in_virtual_time() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(25)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(
        NodeSetup::new(B)
            .config(durable_cfg(tmp.path()))
            .on_start(counter(s.clone())),
    )
    .await
    .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let r = out.send_with_key(&5, IdKey(5)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(10)).await.unwrap(),
        Outcome::Acked
    );
    // Within the horizon, across a restart: a duplicate.
    sim.advance(Duration::from_secs(30)).await;
    sim.restart(B).await.unwrap();
    let r = out.send_with_key(&5, IdKey(5)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(30)).await.unwrap(),
        Outcome::Acked
    );
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(
        count(&s, 5),
        1,
        "durable dedup forgot a key within its horizon"
    );
    // Past the horizon, across a restart: processed again.
    sim.advance(Duration::from_secs(300)).await;
    sim.restart(B).await.unwrap();
    let r = out.send_with_key(&5, IdKey(5)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(30)).await.unwrap(),
        Outcome::Acked
    );
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(
        count(&s, 5),
        2,
        "a key completed 5.5 min (virtual) before was still a duplicate after the restart"
    );
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Real TCP

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

async fn tcp_receiver(addr: SocketAddr, cfg: NodeConfig, s: Seen) -> Node {
    let mut n = None;
    for _ in 0..50 {
        match Node::builder(B)
            .bind(addr)
            .allow_peer(A)
            .config(cfg.clone())
            .build()
            .await
        {
            Ok(node) => {
                n = Some(node);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let n = n.expect("receiver did not bind");
    counter(s)(&n);
    n
}

/// The same promise as the virtual-time test above, on real TCP with the real clock and
/// a short horizon (2 s): durable dedup remembers a key across a receiver restart within
/// the horizon, and a resend after the horizon (across another restart) is processed
/// again. Also: the sender's receipts all resolve `Acked` across the restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_durable_key_horizon_across_receiver_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut cfg = durable_cfg(tmp.path());
    cfg.dedup.horizon = Duration::from_secs(2);
    let rx = tcp_receiver(any_addr(), cfg.clone(), s.clone()).await;
    let addr = rx.local_addr().unwrap();
    let tx = Node::builder(A)
        .bind(any_addr())
        .peer(B, addr)
        .build()
        .await
        .unwrap();
    let out = tx.sender::<u64>(B, eo()).unwrap();
    let r = out.send_with_key(&9, IdKey(9)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(10)).await.unwrap(),
        Outcome::Acked
    );
    rx.shutdown().await;
    drop(rx);
    let rx = tcp_receiver(addr, cfg.clone(), s.clone()).await;
    let r = out.send_with_key(&9, IdKey(9)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(15)).await.unwrap(),
        Outcome::Acked
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count(&s, 9), 1, "within the horizon across a restart");
    tokio::time::sleep(Duration::from_secs(3)).await;
    rx.shutdown().await;
    drop(rx);
    let rx = tcp_receiver(addr, cfg, s.clone()).await;
    let r = out.send_with_key(&9, IdKey(9)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(15)).await.unwrap(),
        Outcome::Acked
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count(&s, 9), 2, "after the horizon across a restart");
    tx.shutdown().await;
    rx.shutdown().await;
}

/// README: hint store "per-target append-only segment logs ... TTL, max hint window,
/// byte limits"; a hint "durably stored" and replayed once the target is back;
/// `HintStats::bytes_total`: "Bytes of segment files currently on disk". Real TCP: a
/// target killed (dropped) five times, each time the sender hands off messages and
/// restarts itself once; after each return everything is processed exactly once and the
/// hint directory does not keep growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_hint_store_stays_bounded_over_five_outages_with_sender_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let rx = tcp_receiver(any_addr(), NodeConfig::default(), s.clone()).await;
    let addr = rx.local_addr().unwrap();
    let mut rx = Some(rx);
    let mut cfg = handoff_cfg(tmp.path());
    // Shorter detector pause so the outage is noticed quickly (wall time).
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.detector.first_heartbeat_estimate = Duration::from_millis(200);
    cfg.detector.acceptable_heartbeat_pause = Duration::from_millis(200);
    let mut sizes = Vec::new();
    let mut handed = 0;
    let mut v = 0u64;
    let mut expect = Vec::new();
    for _outage in 0..5 {
        let tx = Node::builder(A)
            .bind(any_addr())
            .peer(B, addr)
            .config(cfg.clone())
            .build()
            .await
            .unwrap();
        let out = tx.sender::<u64>(B, eo()).unwrap();
        // Kill the target.
        drop(rx.take());
        let t0 = Instant::now();
        while tx.health(B) != Some(Health::Down) {
            assert!(t0.elapsed() < Duration::from_secs(10), "never Down");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut rs = Vec::new();
        for _ in 0..20 {
            v += 1;
            rs.push((v, out.send(&v).await.unwrap()));
        }
        for (v, r) in resolve_all(rs, Duration::from_secs(10)).await {
            assert_eq!(r.unwrap(), Outcome::HandedOff, "{v}");
            expect.push(v);
            handed += 1;
        }
        tx.shutdown().await;
        drop(tx);
        // The sender comes back first, then the target.
        let tx = Node::builder(A)
            .bind(any_addr())
            .peer(B, addr)
            .config(cfg.clone())
            .build()
            .await
            .unwrap();
        rx = Some(tcp_receiver(addr, NodeConfig::default(), s.clone()).await);
        let t0 = Instant::now();
        loop {
            let h = tx.stats().await.unwrap().hints.unwrap();
            if h.pending == 0 && expect.iter().all(|v| count(&s, *v) >= 1) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "hints not replayed: {h:?}, seen {}",
                distinct(&s)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tx.shutdown().await;
        drop(tx);
        sizes.push(dir_bytes(tmp.path()));
    }
    assert_eq!(handed, 100);
    for v in &expect {
        assert_eq!(count(&s, *v), 1, "hinted {v}");
    }
    let (files, bytes) = *sizes.last().unwrap();
    assert!(
        files <= 4 && bytes <= 64 << 10,
        "hint directory after 5 outages: {sizes:?}"
    );
    if let Some(rx) = rx {
        rx.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------
// More limits over time

/// README, dedup limits: "live streams (`max_streams`) | 16 384 | settled streams idle
/// for a second are retired to make room (losslessly ...); otherwise a new stream is
/// refused (`TooManyStreams`) and retried"; `DedupConfig::retention`: "How long a
/// stream's window is kept without activity before it is retired". A receiver with
/// `max_streams = 4` whose four streams belong to crashed sender runs, each of whose one
/// message was acked: a fifth run is served at once (the four are settled, so they are
/// retired to make room), and so is a message a day later. (Before the early
/// retirement, the fifth run was refused until the retention had passed.)
#[tokio::test(start_paused = true)]
async fn streams_of_crashed_senders_make_room_at_max_streams() {
    let s = seen();
    let mut cfg = NodeConfig::default();
    cfg.dedup.max_streams = 4;
    let mut sim = SimNet::new(FaultPlan::new(26)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).config(cfg).on_start(counter(s.clone())))
        .await
        .unwrap();
    for inc in 0..4u64 {
        let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
        let r = out.send(&inc).await.unwrap();
        assert_eq!(
            resolve(r, Duration::from_secs(30)).await.unwrap(),
            Outcome::Acked
        );
        sim.advance(Duration::from_secs(1)).await;
        sim.crash(A).await.unwrap();
        sim.start(A).await.unwrap();
    }
    let st = stats(sim.node(B).unwrap()).await.dedup;
    assert_eq!(st.streams, 4, "{st:?}");
    // A fifth run: the four crashed runs' streams are settled and idle, so they make
    // room at once.
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let r = out.send(&100).await.unwrap();
    let early = resolve(r, Duration::from_secs(60)).await;
    assert!(
        matches!(early, Ok(Outcome::Acked)),
        "at max_streams: {early:?}"
    );
    let st = stats(sim.node(B).unwrap()).await.dedup;
    assert!(st.streams_retired_idle >= 1, "{st:?}");
    assert_eq!(count(&s, 100), 1);
    // The four crashed runs stay idle for a day and a bit.
    sim.advance(Duration::from_secs(25 * 3600)).await;
    let r = out.send(&101).await.unwrap();
    let late = resolve(r, Duration::from_secs(60)).await;
    let st = stats(sim.node(B).unwrap()).await;
    assert!(
        matches!(late, Ok(Outcome::Acked)),
        "a day after the four senders crashed a new stream is still refused: {late:?}; dedup {:?}; dedup_refused {}",
        st.dedup,
        st.proto.dedup_refused
    );
    assert_eq!(count(&s, 101), 1);
    sim.shutdown().await;
}

/// README guarantee table: a duplicate "arriving while the original is still processing
/// is not delivered"; dedup docs: "an entry left in progress is never expired"; key
/// horizon "How long a completed application key is remembered". A handler that holds a
/// keyed message for 4 minutes (twice the horizon): a copy resent meanwhile is not
/// delivered, the original's completion starts the horizon, and a copy 1 minute after
/// completion is still a duplicate. Processed once.
#[tokio::test(start_paused = true)]
async fn a_key_held_longer_than_the_horizon_is_not_processed_twice() {
    let s = seen();
    let s2 = s.clone();
    let mut sim = SimNet::new(FaultPlan::new(27)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(move |node: &Node| {
        let mut rx = node.receiver::<u64>(CH, false).unwrap();
        let s2 = s2.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                *s2.lock().unwrap().entry(*d.message()).or_default() += 1;
                let s3 = s2.clone();
                let _ = s3;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(240)).await;
                    d.ack();
                });
            }
        });
    }))
    .await
    .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let first = out.send_with_key(&1, IdKey(1)).await.unwrap();
    let first = tokio::spawn(first);
    sim.advance(Duration::from_secs(60)).await;
    let again = out.send_with_key(&1, IdKey(1)).await.unwrap();
    let again = tokio::spawn(again);
    sim.advance(Duration::from_secs(200)).await;
    // The original completed at ~240 s.
    let a = first.await.unwrap();
    let b = again.await.unwrap();
    assert_eq!(
        count(&s, 1),
        1,
        "delivered again while in progress ({a:?}, {b:?})"
    );
    sim.advance(Duration::from_secs(60)).await;
    let third = out.send_with_key(&1, IdKey(1)).await.unwrap();
    let t = resolve(third, Duration::from_secs(30)).await;
    assert_eq!(t.unwrap(), Outcome::Acked);
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(
        count(&s, 1),
        1,
        "a copy 1 min after completion was processed again"
    );
    sim.shutdown().await;
}

/// README: a dead-lettered message "is not recorded as processed, so a copy the
/// application sends again under the same `IdKey` is a new attempt (refused again, or
/// processed), never acked unprocessed". With durable dedup and a receiver restart in
/// between: the poison key is dead-lettered, the handler is fixed, the key resent after
/// the restart is processed (not acked as a duplicate).
#[tokio::test(start_paused = true)]
async fn a_dead_lettered_key_resent_after_a_receiver_restart_is_processed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let acked = seen();
    let poison = Arc::new(AtomicBool::new(true));
    let (a2, p2) = (acked.clone(), poison.clone());
    let mut sim = SimNet::new(FaultPlan::new(28)).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(
        NodeSetup::new(B)
            .config(durable_cfg(tmp.path()))
            .on_start(move |node: &Node| {
                let mut rx = node.receiver::<u64>(CH, false).unwrap();
                let (a2, p2) = (a2.clone(), p2.clone());
                tokio::spawn(async move {
                    while let Some(d) = rx.recv().await {
                        if p2.load(Ordering::SeqCst) {
                            d.nack();
                        } else {
                            *a2.lock().unwrap().entry(*d.message()).or_default() += 1;
                            d.ack();
                        }
                    }
                });
            }),
    )
    .await
    .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let r = out.send_with_key(&42, IdKey(42)).await.unwrap();
    let res = resolve(r, Duration::from_secs(60)).await;
    assert!(
        matches!(
            res,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            })
        ),
        "{res:?}"
    );
    poison.store(false, Ordering::SeqCst);
    sim.restart(B).await.unwrap();
    let r = out.send_with_key(&42, IdKey(42)).await.unwrap();
    assert_eq!(
        resolve(r, Duration::from_secs(60)).await.unwrap(),
        Outcome::Acked
    );
    sim.advance(Duration::from_secs(1)).await;
    assert_eq!(
        count(&acked, 42),
        1,
        "the dead-lettered key was acked unprocessed"
    );
    sim.shutdown().await;
}

/// README hinted handoff ("`on_down`: when the failure detector declares a target Down,
/// move its unacknowledged messages to the hint store, and store new messages for it
/// directly"; replayed when back), `Stats::handed_off` "Messages handed off to the hint
/// store", `HintStats` stored/delivered/pending. Six outages over three hours with a
/// steady writer: every effectively-once message is processed exactly once, every
/// receipt `Acked` or `HandedOff`, and the counters agree with the receipts.
#[tokio::test(start_paused = true)]
async fn six_outages_with_handoff_every_message_once_and_counters_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let s = seen();
    let mut sim = SimNet::new(FaultPlan::new(29)).unwrap();
    sim.add(NodeSetup::new(A).config(handoff_cfg(tmp.path())))
        .await
        .unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut v = 0u64;
    let (mut acked, mut handed) = (0u64, 0u64);
    let mut all = Vec::new();
    for cycle in 0..6 {
        let mut rs = Vec::new();
        // 30 minutes: 10 min up, 5 min cut off, 15 min up; one message every 10 s.
        for step in 0..180 {
            if step == 60 {
                sim.isolate(B);
            }
            if step == 90 {
                sim.rejoin(B);
            }
            v += 1;
            rs.push((v, out.send(&v).await.unwrap()));
            all.push(v);
            sim.advance(Duration::from_secs(10)).await;
        }
        for (v, r) in resolve_all(rs, Duration::from_secs(120)).await {
            match r {
                Ok(Outcome::Acked) => acked += 1,
                Ok(Outcome::HandedOff) => handed += 1,
                other => panic!("cycle {cycle} message {v}: {other:?}"),
            }
        }
    }
    let s2 = s.clone();
    let n = all.len();
    let done = sim
        .run_until(|| distinct(&s2) == n, Duration::from_secs(600))
        .await;
    sim.advance(Duration::from_secs(60)).await;
    let st = stats(sim.node(A).unwrap()).await;
    let h = st.hints.unwrap();
    assert!(done.is_ok(), "{} of {n} processed; {h:?}", distinct(&s));
    let twice: Vec<_> = s
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, c)| **c != 1)
        .map(|(k, c)| (*k, *c))
        .collect();
    assert!(twice.is_empty(), "processed other than once: {twice:?}");
    assert!(handed > 0, "no outage led to a handoff");
    assert_eq!(
        st.handed_off, handed,
        "handed_off vs HandedOff receipts; {h:?}"
    );
    assert_eq!(h.stored, handed, "{h:?}");
    assert_eq!(h.pending, 0, "{h:?}");
    assert_eq!(h.delivered, h.stored, "{h:?}");
    assert_eq!(acked + handed, n as u64);
    sim.shutdown().await;
}

/// README: "`Node::stats()` (sent, retransmitted, acked, delivered, duplicates dropped,
/// ...)"; metrics table: sent = "messages accepted by `send`", acked = "messages the
/// target acknowledged", delivered = "messages handed to the channel's receiver
/// (redeliveries included)"; effectively-once "exactly once if the receipt was `Ok`".
/// An hour of a lossy, duplicating, reordering link: the counters equal what the
/// application saw.
#[tokio::test(start_paused = true)]
async fn an_hour_of_a_lossy_link_counters_match_what_the_application_saw() {
    let s = seen();
    let plan = FaultPlan::new(30)
        .loss(0.2)
        .duplicate(0.1)
        .reorder(0.3)
        .delay(Duration::from_micros(100), Duration::from_millis(5));
    let mut sim = SimNet::new(plan).unwrap();
    sim.add_node(A).await.unwrap();
    sim.add(NodeSetup::new(B).on_start(counter(s.clone())))
        .await
        .unwrap();
    let out = sim.node(A).unwrap().sender::<u64>(B, eo()).unwrap();
    let mut rs = Vec::new();
    for v in 0..1800u64 {
        rs.push((v, out.send(&v).await.unwrap()));
        sim.advance(Duration::from_secs(2)).await;
    }
    let mut ok = 0u64;
    for (v, r) in resolve_all(rs, Duration::from_secs(120)).await {
        match r {
            Ok(Outcome::Acked) => ok += 1,
            Err(SendError::Deadline { .. }) => {}
            other => panic!("{v}: {other:?}"),
        }
    }
    sim.advance(Duration::from_secs(60)).await;
    let a = stats(sim.node(A).unwrap()).await.proto;
    let b = stats(sim.node(B).unwrap()).await.proto;
    let handler_calls: u64 = s.lock().unwrap().values().map(|c| *c as u64).sum();
    assert!(s.lock().unwrap().values().all(|c| *c == 1));
    assert_eq!(ok, 1800, "{a:?}");
    assert_eq!(a.sent, 1800, "{a:?}");
    assert_eq!(a.acked, ok, "{a:?}");
    assert_eq!(b.delivered, handler_calls, "{b:?}");
    sim.shutdown().await;
}
