//! Every guarantee through a chaos TCP proxy on loopback: from a seed it kills
//! connections, refuses reconnects for a while, splits writes at random byte
//! boundaries, and stalls. Each run checks its guarantee's property:
//! at-most-once never duplicates, at-least-once loses nothing acknowledged,
//! effectively-once processes each message exactly once.
//!
//! The default run uses 2 seeds × 3 000 messages per guarantee over plain TCP, plus
//! 1 seed × 1 500 per guarantee over mutual TLS (certificates generated per run); the
//! long run
//! (`cargo test --release --test integration chaos_tcp:: -- --ignored`) uses 20 seeds × 10 000.
//! Each test prints a `reliability:` line that RELIABILITY.md is built from.

use crate::support;

use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::proxy::{Chaos, Proxy};

const CH: ChannelId = ChannelId(2);

#[derive(Default)]
struct RunResult {
    sent: u64,
    acked: u64,
    failed: u64,
    processed_distinct: u64,
    duplicates: u64,
    lost_after_ack: u64,
    kills: u64,
    splits: u64,
}

async fn run_once(g: Guarantee, seed: u64, n: u64, tls: bool) -> RunResult {
    let ca = tls.then(|| support::pki::Ca::new("chaos ca"));
    let mut b = Node::builder(NodeId(2))
        .bind(support::ports::restartable_addr())
        .allow_peer(NodeId(1)); // plain TCP admits only configured peers
    if let Some(ca) = &ca {
        b = b.tls(ca.node(NodeId(2)));
    }
    let b = b.build().await.unwrap();
    let chaos = Chaos {
        seed,
        kill_every: Some(Duration::from_millis(100)),
        refuse_for: Duration::from_millis(60),
        split: 0.3,
        stall: 0.02,
        stall_for: Duration::from_millis(15),
    };
    let mut proxy = Proxy::start(b.local_addr().unwrap(), chaos).await;
    let mut a = Node::builder(NodeId(1))
        .bind(support::ports::restartable_addr())
        .peer(NodeId(2), proxy.addr);
    if let Some(ca) = &ca {
        a = a.tls(ca.node(NodeId(1)));
    }
    let a = a.build().await.unwrap();
    let seen: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let s = seen.clone();
    let consumer = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *s.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    });
    let out = a
        .sender::<u64>(NodeId(2), ChannelOptions::new(CH, g))
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..n {
        receipts.push((i, out.send(&i).await.unwrap()));
        if i % 10 == 0 {
            // ~3 000 messages/s, so a run spans many kills.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut r = RunResult {
        sent: n,
        ..RunResult::default()
    };
    let mut ok = Vec::new();
    for (i, receipt) in receipts {
        // A bounded wait: a hang fails the test instead of stalling CI.
        match tokio::time::timeout(Duration::from_secs(60), receipt).await {
            Ok(Ok(Outcome::Acked | Outcome::Sent)) => {
                r.acked += 1;
                ok.push(i);
            }
            Ok(other) => {
                r.failed += 1;
                assert_eq!(g, Guarantee::AtMostOnce, "{g:?} message {i}: {other:?}");
            }
            Err(_) => panic!("{g:?} seed {seed}: receipt {i} hung"),
        }
    }
    r.kills = proxy.stats.kills.load(Ordering::Relaxed);
    r.splits = proxy.stats.splits.load(Ordering::Relaxed);
    proxy.calm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.shutdown().await;
    consumer.await.unwrap();
    let seen = seen.lock().unwrap();
    r.processed_distinct = seen.len() as u64;
    r.duplicates = seen.values().map(|c| c - 1).sum();
    if g != Guarantee::AtMostOnce {
        r.lost_after_ack = ok.iter().filter(|i| !seen.contains_key(i)).count() as u64;
    }
    r
}

async fn run(g: Guarantee, seeds: u64, n: u64, tls: bool) {
    let mut total = RunResult::default();
    for seed in 0..seeds {
        let r = run_once(g, seed, n, tls).await;
        match g {
            Guarantee::AtMostOnce => assert_eq!(r.duplicates, 0, "seed {seed}: AMO duplicated"),
            Guarantee::AtLeastOnce => {
                assert_eq!(r.lost_after_ack, 0, "seed {seed}: ALO lost acked messages");
                assert_eq!(r.acked, n, "seed {seed}");
            }
            Guarantee::EffectivelyOnce => {
                assert_eq!(r.lost_after_ack, 0, "seed {seed}: EO lost acked messages");
                assert_eq!(r.duplicates, 0, "seed {seed}: EO processed twice");
                assert_eq!(r.processed_distinct, n, "seed {seed}");
            }
        }
        assert!(r.kills > 0, "the proxy killed no connection");
        total.sent += r.sent;
        total.acked += r.acked;
        total.failed += r.failed;
        total.processed_distinct += r.processed_distinct;
        total.duplicates += r.duplicates;
        total.lost_after_ack += r.lost_after_ack;
        total.kills += r.kills;
        total.splits += r.splits;
    }
    let held = match g {
        Guarantee::AtMostOnce => format!(
            "0 duplicates; {} of {} delivered",
            total.processed_distinct, total.sent
        ),
        Guarantee::AtLeastOnce => format!(
            "0 of {} acked lost; {} handler duplicates",
            total.acked, total.duplicates
        ),
        Guarantee::EffectivelyOnce => format!("0 of {} acked lost; 0 processed twice", total.acked),
    };
    support::reliability::report(
        &format!("{g:?}"),
        &format!(
            "{} chaos proxy: {} connection kills, reconnect refusals, {} split writes, stalls",
            if tls { "TLS" } else { "TCP" },
            total.kills,
            total.splits
        ),
        &format!("{seeds} seeds x {n} msgs"),
        &held,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_never_duplicates_through_chaos() {
    run(Guarantee::AtMostOnce, 2, 3_000, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_never_duplicates_through_chaos_over_tls() {
    run(Guarantee::AtMostOnce, 1, 1_500, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_loses_nothing_through_chaos_over_tls() {
    run(Guarantee::AtLeastOnce, 1, 1_500, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effectively_once_exactly_once_through_chaos_over_tls() {
    run(Guarantee::EffectivelyOnce, 1, 1_500, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_loses_nothing_through_chaos() {
    run(Guarantee::AtLeastOnce, 2, 3_000, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effectively_once_exactly_once_through_chaos() {
    run(Guarantee::EffectivelyOnce, 2, 3_000, false).await;
}

/// Long run: `cargo test --release --test integration chaos_tcp:: -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 20 seeds x 10 000 messages per guarantee"]
async fn long_chaos_all_guarantees() {
    for g in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ] {
        run(g, 20, 10_000, false).await;
        run(g, 5, 10_000, true).await;
    }
}
