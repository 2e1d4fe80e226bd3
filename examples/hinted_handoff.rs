//! Hinted handoff with three nodes in one process (in-memory network, virtual time).
//!
//! A coordinator writes to two replicas, B and C, at 200 messages/s. C drops off the
//! network for 8 s: the failure detector marks it Suspect then Down, and writes meant for
//! C are stored as hints on disk instead of failing. When C is back, the detector marks
//! it Up and the hints are replayed, throttled, under their original message IDs, so C's
//! effectively-once receiver still processes each write exactly once.
//!
//! ```text
//! cargo run --example hinted_handoff
//! ```

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, HandoffConfig, Node, NodeConfig, NodeId};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WRITES: ChannelId = ChannelId(1);
const COORD: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hints_dir = tempfile::tempdir()?;
    let net = MemNetwork::new(FaultPlan::default())?;
    let t0 = tokio::time::Instant::now();
    let at = move || format!("{:>5.1}s", t0.elapsed().as_secs_f64());

    let mut config = NodeConfig::default();
    let mut handoff = HandoffConfig::new(hints_dir.path());
    handoff.replay_bytes_per_sec = 4 << 10; // slow on purpose, to watch the drain
    config.handoff = Some(handoff);
    let coordinator = Node::builder(COORD)
        .transport(net.transport(COORD))
        .config(config)
        .build()
        .await?;

    // Two replicas, each counting what its handler processed.
    let mut processed = Vec::new();
    let mut replicas = Vec::new();
    for id in [B, C] {
        let node = Node::builder(id)
            .transport(net.transport(id))
            .build()
            .await?;
        let mut inbox = node.receiver::<u64>(WRITES, false)?;
        let seen: Arc<Mutex<(u64, HashSet<u64>)>> = Arc::default();
        let counts = seen.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let mut c = counts.lock().unwrap();
                c.0 += 1; // deliveries
                c.1.insert(*d.message()); // distinct writes
                drop(c);
                d.ack();
            }
        });
        processed.push(seen);
        replicas.push(node);
    }

    // Print every failure-detector transition as it happens.
    let mut health = coordinator.health_events();
    let clock = at;
    tokio::spawn(async move {
        while let Ok(change) = health.recv().await {
            println!(
                "{}  detector: {} {:?} -> {:?}",
                clock(),
                change.peer,
                change.from,
                change.to
            );
        }
    });

    let to_b =
        coordinator.sender::<u64>(B, ChannelOptions::new(WRITES, Guarantee::EffectivelyOnce))?;
    let to_c =
        coordinator.sender::<u64>(C, ChannelOptions::new(WRITES, Guarantee::EffectivelyOnce))?;
    let total = 4_000u64;
    let mut receipts = Vec::new();
    for i in 0..total {
        if i == 400 {
            println!("{}  C leaves the network", at());
            net.isolate(C);
        }
        if i == 2_000 {
            println!("{}  C is back", at());
            net.rejoin(C);
        }
        if i % 400 == 0 {
            let s = coordinator.stats().await?;
            let h = s.hints.unwrap_or_default();
            println!(
                "{}  written {i:>4}  hints stored {:>4} replayed {:>4} pending {:>4}",
                at(),
                h.stored,
                h.delivered,
                h.pending
            );
        }
        receipts.push(to_b.send(&i).await?);
        receipts.push(to_c.send(&i).await?);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut outcomes = std::collections::BTreeMap::new();
    for r in receipts {
        *outcomes.entry(format!("{:?}", r.await)).or_insert(0) += 1;
    }
    // Let the hints drain.
    loop {
        let h = coordinator.stats().await?.hints.unwrap_or_default();
        println!(
            "{}  draining: hints stored {:>4} replayed {:>4} pending {:>4}",
            at(),
            h.stored,
            h.delivered,
            h.pending
        );
        if h.pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("\nreceipts: {outcomes:?}");
    for (name, seen) in ["B", "C"].iter().zip(&processed) {
        let s = seen.lock().unwrap();
        println!(
            "replica {name}: processed {} distinct writes of {total}, {} deliveries (duplicates: {})",
            s.1.len(),
            s.0,
            s.0 - s.1.len() as u64
        );
    }
    Ok(())
}
