//! The `testing` feature's harness (`ackwire::testing::SimNet`) as a user would drive it:
//! what is deterministic for one seed, partitions and restarts under faults, and the
//! cost of virtual time.
#![cfg(feature = "testing")]

use ackwire::dedup::DurableDedup;
use ackwire::testing::{runtime, NodeSetup, SimNet};
use ackwire::transport::mem::{FaultPlan, MemStats};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Sender};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(1);
const SHOP: NodeId = NodeId(1);
const BANK: NodeId = NodeId(2);

/// 20 % loss, 10 % duplication, 30 % reordering, 0.1–2 ms delay.
fn faulty(seed: u64) -> FaultPlan {
    FaultPlan::new(seed)
        .loss(0.2)
        .duplicate(0.1)
        .reorder(0.3)
        .delay(Duration::from_micros(100), Duration::from_millis(2))
}

/// How often the handler ran for each message, shared across the bank's incarnations.
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

/// The bank node: at every start, a handler that counts each message and acks it.
fn bank(config: NodeConfig, seen: Seen) -> NodeSetup {
    NodeSetup::new(BANK)
        .config(config)
        .on_start(move |node: &Node| {
            let mut inbox = node.receiver::<u64>(CH, false).unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(d) = inbox.recv().await {
                    *seen.lock().unwrap().entry(*d.message()).or_default() += 1;
                    d.ack();
                }
            });
        })
}

/// A shop and a bank (built with `config`) on `seed`'s faults: the simulation, the
/// bank's handler counts, and the shop's sender to the bank with guarantee `g`.
async fn shop_and_bank(seed: u64, config: NodeConfig, g: Guarantee) -> (SimNet, Seen, Sender<u64>) {
    let mut sim = SimNet::new(faulty(seed)).unwrap();
    let seen = Seen::default();
    sim.add_node(SHOP).await.unwrap();
    sim.add(bank(config, seen.clone())).await.unwrap();
    let out = sim
        .node(SHOP)
        .unwrap()
        .sender::<u64>(BANK, ChannelOptions::new(CH, g))
        .unwrap();
    (sim, seen, out)
}

/// One at-most-once sender, 500 messages 1 ms apart, over `seed`'s faults, in a fresh
/// runtime: the network's counters at the end.
fn at_most_once_run(seed: u64) -> MemStats {
    runtime().unwrap().block_on(async {
        let (sim, _seen, out) =
            shop_and_bank(seed, NodeConfig::default(), Guarantee::AtMostOnce).await;
        for i in 0..500u64 {
            // At-most-once: the receipt says only that the frame was handed over.
            drop(out.send(&i).await.unwrap());
            sim.advance(Duration::from_millis(1)).await;
        }
        sim.advance(Duration::from_secs(1)).await;
        let stats = sim.stats();
        sim.shutdown().await;
        stats
    })
}

/// The same seed gives the same fault counts for a fixed workload whose frame order
/// does not depend on task scheduling (one at-most-once sender, sends spaced in
/// virtual time, no acks); another seed gives other counts.
#[test]
fn same_seed_same_fault_counts_for_one_at_most_once_sender() {
    let first = at_most_once_run(5);
    assert!(first.dropped_loss > 0 && first.duplicated > 0, "{first:?}");
    for _ in 0..3 {
        assert_eq!(at_most_once_run(5), first, "seed 5 rerun");
    }
    assert_ne!(at_most_once_run(6), first, "seed 6 drew the same faults");
}

/// Two senders bursting acked messages (100 per millisecond each) at one receiver that
/// restarts halfway, in a fresh runtime: the network's counters at the end.
fn acked_burst_run(seed: u64, g: Guarantee) -> MemStats {
    runtime().unwrap().block_on(async {
        let mut sim = SimNet::new(faulty(seed)).unwrap();
        sim.add_node(SHOP).await.unwrap();
        sim.add_node(NodeId(3)).await.unwrap();
        sim.add(bank(NodeConfig::default(), Seen::default()))
            .await
            .unwrap();
        let options = ChannelOptions::new(CH, g);
        let a = sim.node(SHOP).unwrap().sender::<u64>(BANK, options);
        let b = sim.node(NodeId(3)).unwrap().sender::<u64>(BANK, options);
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut receipts = Vec::new();
        for i in 0..1000u64 {
            receipts.push(a.send(&i).await.unwrap());
            receipts.push(b.send(&(i + 1_000_000)).await.unwrap());
            if i == 500 {
                sim.restart(BANK).await.unwrap();
            }
            if i % 100 == 0 {
                sim.advance(Duration::from_millis(1)).await;
            }
        }
        for r in receipts {
            r.await.unwrap();
        }
        sim.advance(Duration::from_secs(1)).await;
        let stats = sim.stats();
        sim.shutdown().await;
        stats
    })
}

/// Beyond what the harness promises: with acks flowing (at-least-once and
/// effectively-once), two senders bursting and a receiver restart, the same seed has
/// so far also given the same fault counts. tokio does not promise the scheduling
/// order this relies on; if a tokio upgrade breaks this test, weaken the module docs'
/// "observed" sentence rather than the harness.
#[test]
fn same_seed_same_fault_counts_with_acks_two_senders_and_a_restart() {
    for g in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
        let first = acked_burst_run(5, g);
        assert!(first.dropped_loss > 0 && first.duplicated > 0, "{first:?}");
        assert_eq!(acked_burst_run(5, g), first, "{g:?}: seed 5 rerun");
    }
}

/// Messages sent before and during a 10 s partition are all acknowledged once it
/// heals, and each processed exactly once (effectively-once) or at least once
/// (at-least-once), although frames were also lost, duplicated and reordered.
#[tokio::test(start_paused = true)]
async fn partition_then_heal_delivers_every_message() {
    for (seed, g) in [(1, Guarantee::EffectivelyOnce), (2, Guarantee::AtLeastOnce)] {
        let (sim, seen, out) = shop_and_bank(seed, NodeConfig::default(), g).await;
        let mut receipts = Vec::new();
        for i in 0..100u64 {
            if i == 50 {
                sim.partition(SHOP, BANK);
            }
            receipts.push(out.send(&i).await.unwrap());
            sim.advance(Duration::from_millis(1)).await;
        }
        sim.advance(Duration::from_secs(10)).await;
        assert!(
            sim.stats().dropped_partition > 0,
            "seed {seed}: partition had no effect"
        );
        sim.heal(SHOP, BANK);
        for (i, r) in receipts.into_iter().enumerate() {
            r.await
                .unwrap_or_else(|e| panic!("seed {seed} {g:?}: message {i}: {e}"));
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 100, "seed {seed} {g:?}");
        if g == Guarantee::EffectivelyOnce {
            assert!(seen.values().all(|n| *n == 1), "seed {seed}: {seen:?}");
        }
        sim.shutdown().await;
    }
}

/// A receiver restarted (cleanly) in the middle of a faulty stream, with durable dedup
/// in a temporary directory: every effectively-once message is acknowledged and its
/// handler runs exactly once across both incarnations.
#[tokio::test(start_paused = true)]
async fn restart_keeps_effectively_once_exactly_once() {
    for seed in [3, 4] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::default();
        config.dedup.durable = Some(DurableDedup::new(dir.path()));
        let (mut sim, seen, out) = shop_and_bank(seed, config, Guarantee::EffectivelyOnce).await;
        let mut receipts = Vec::new();
        for i in 0..300u64 {
            if i == 150 {
                sim.restart(BANK).await.unwrap();
            }
            receipts.push(out.send(&i).await.unwrap());
            sim.advance(Duration::from_millis(1)).await;
        }
        for (i, r) in receipts.into_iter().enumerate() {
            r.await
                .unwrap_or_else(|e| panic!("seed {seed}: message {i}: {e}"));
        }
        assert_eq!(sim.incarnations(BANK).unwrap(), 2);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 300, "seed {seed}");
        assert!(
            seen.iter().all(|(_, n)| *n == 1),
            "seed {seed}: processed twice: {:?}",
            seen.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
        );
        sim.shutdown().await;
    }
}

/// A crashed receiver (dropped without draining) and its restart: every
/// at-least-once message is acknowledged, and each one reaches the handler at
/// least once.
#[tokio::test(start_paused = true)]
async fn crash_and_start_delivers_every_at_least_once_message() {
    let (mut sim, seen, out) =
        shop_and_bank(8, NodeConfig::default(), Guarantee::AtLeastOnce).await;
    let mut receipts = Vec::new();
    for i in 0..200u64 {
        if i == 100 {
            sim.crash(BANK).await.unwrap();
        }
        if i == 110 {
            sim.start(BANK).await.unwrap();
        }
        receipts.push(out.send(&i).await.unwrap());
        sim.advance(Duration::from_millis(1)).await;
    }
    for (i, r) in receipts.into_iter().enumerate() {
        r.await.unwrap_or_else(|e| panic!("message {i}: {e}"));
    }
    assert_eq!(seen.lock().unwrap().len(), 200);
    sim.shutdown().await;
}

/// A simulated minute (one effectively-once message every 100 ms, heartbeats, 20 %
/// loss) passes on the virtual clock: at least 60 s of virtual time elapse, every
/// message is processed once, and the wall clock stays far below a minute (bound
/// loose, 30 s, for a loaded machine).
#[test]
fn a_simulated_minute_runs_in_seconds() {
    let wall = std::time::Instant::now();
    let (virtual_elapsed, seen) = runtime().unwrap().block_on(async {
        let (sim, seen, out) =
            shop_and_bank(9, NodeConfig::default(), Guarantee::EffectivelyOnce).await;
        let mut receipts = Vec::new();
        for i in 0..600u64 {
            receipts.push(out.send(&i).await.unwrap());
            sim.advance(Duration::from_millis(100)).await;
        }
        for r in receipts {
            r.await.unwrap();
        }
        let elapsed = sim.elapsed();
        sim.shutdown().await;
        let seen = seen.lock().unwrap().clone();
        (elapsed, seen)
    });
    assert!(
        virtual_elapsed >= Duration::from_secs(60),
        "{virtual_elapsed:?}"
    );
    assert_eq!(seen.len(), 600);
    assert!(seen.values().all(|n| *n == 1));
    assert!(
        wall.elapsed() < Duration::from_secs(30),
        "a virtual minute took {:?} of wall time",
        wall.elapsed()
    );
}

/// `run_until` returns once the condition holds, with the virtual time it waited, and
/// times out on the virtual clock.
#[tokio::test(start_paused = true)]
async fn run_until_waits_in_virtual_time() {
    let (sim, seen, out) = shop_and_bank(10, NodeConfig::default(), Guarantee::AtLeastOnce).await;
    sim.partition(SHOP, BANK);
    let _receipt = out.send(&1).await.unwrap();
    let s = seen.clone();
    let early = sim
        .run_until(
            || s.lock().unwrap().contains_key(&1),
            Duration::from_secs(2),
        )
        .await;
    assert!(early.is_err(), "delivered through a partition: {early:?}");
    sim.heal(SHOP, BANK);
    let waited = sim
        .run_until(
            || s.lock().unwrap().contains_key(&1),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(waited < Duration::from_secs(10));
    assert!(sim.elapsed() >= Duration::from_secs(2));
    sim.shutdown().await;
}
