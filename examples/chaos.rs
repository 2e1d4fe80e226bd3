//! One workload, each delivery guarantee, over an in-memory network that loses 20 % of
//! frames, duplicates 10 %, reorders 30 %, delays 0.1–3 ms, and is partitioned for a
//! for 2 s in the middle. Runs on virtual time, so it takes a few seconds.
//! `CHAOS_STATS=1` also prints each node's counters.
//!
//! ```text
//! cargo run --example chaos
//! ```
//!
//! For each guarantee it prints: messages sent, receipts acked / failed, distinct
//! messages the handler saw, duplicates the handler saw, and messages lost (never seen).

use ackwire::dedup::DurableDedup;
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MESSAGES: u64 = 5_000;
const CHANNEL: ChannelId = ChannelId(1);

#[derive(Debug, Default)]
struct Row {
    sent: u64,
    acked: u64,
    failed: u64,
    seen: u64,
    duplicates: u64,
    lost: u64,
    lost_after_ack: u64,
}

async fn run(guarantee: Guarantee, seed: u64) -> Row {
    let plan = FaultPlan::new(seed)
        .loss(0.2)
        .duplicate(0.1)
        .reorder(0.3)
        .delay(Duration::from_micros(100), Duration::from_millis(3));
    let net = MemNetwork::new(plan).expect("valid fault plan");
    let (a, b) = (NodeId(1), NodeId(2));
    let sender = Node::builder(a)
        .transport(net.transport(a))
        .config(NodeConfig::default())
        .seed(seed)
        .build()
        .await
        .expect("sender node");
    // The receiver keeps its dedup state on disk so effectively-once survives the
    // restart below (without it, it degrades to at-least-once across restarts).
    let dedup_dir = tempfile::tempdir().expect("temp dir");
    let seen: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let mut receiver = start_receiver(&net, b, seed + 1, dedup_dir.path(), seen.clone()).await;

    let out = sender
        .sender::<u64>(b, ChannelOptions::new(CHANNEL, guarantee))
        .expect("sender");
    let mut receipts = Vec::new();
    for i in 0..MESSAGES {
        if i == 2 * MESSAGES / 3 {
            // The receiving process restarts: deliveries in progress are lost, acks
            // not yet sent are lost; its replacement has the same id and address.
            receiver.0.shutdown().await;
            receiver.1.await.expect("handler");
            receiver = start_receiver(&net, b, seed + 2, dedup_dir.path(), seen.clone()).await;
        }
        if i == MESSAGES / 3 {
            net.partition(a, b); // the network splits for 2 s of (virtual) time...
            let net = net.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                net.heal(a, b); // ...and heals
            });
        }
        receipts.push((i, out.send(&i).await.expect("send accepted")));
        // A steady 1 000 messages per second of virtual time.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut row = Row {
        sent: MESSAGES,
        ..Row::default()
    };
    let mut acked = Vec::new();
    for (i, receipt) in receipts {
        match receipt.await {
            Ok(_) => {
                row.acked += 1;
                acked.push(i);
            }
            Err(_) => row.failed += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // let stragglers land
    if std::env::var_os("CHAOS_STATS").is_some() {
        eprintln!(
            "{guarantee:?}\n sender   {:?}\n receiver {:?}\n network  {:?}",
            sender.stats().await,
            receiver.0.stats().await,
            net.stats()
        );
    }
    receiver.0.shutdown().await;
    receiver.1.await.expect("handler");
    let seen = seen.lock().unwrap();
    row.seen = seen.len() as u64;
    row.duplicates = seen.values().map(|n| n - 1).sum();
    row.lost = MESSAGES - row.seen;
    row.lost_after_ack = acked.iter().filter(|i| !seen.contains_key(i)).count() as u64;
    row
}

/// Start the receiving node and its handler: count how often it sees each message,
/// then ack (after processing).
async fn start_receiver(
    net: &MemNetwork,
    id: NodeId,
    seed: u64,
    dedup_dir: &std::path::Path,
    seen: Arc<Mutex<HashMap<u64, u64>>>,
) -> (Node, tokio::task::JoinHandle<()>) {
    let mut config = NodeConfig::default();
    config.dedup.durable = Some(DurableDedup::new(dedup_dir));
    let node = Node::builder(id)
        .transport(net.transport(id))
        .config(config)
        .seed(seed)
        .build()
        .await
        .expect("receiver node");
    let mut inbox = node.receiver::<u64>(CHANNEL, false).expect("receiver");
    let handler = tokio::spawn(async move {
        while let Some(delivery) = inbox.recv().await {
            *seen.lock().unwrap().entry(*delivery.message()).or_default() += 1;
            delivery.ack();
        }
    });
    (node, handler)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true) // virtual time: faults and timers cost no wall-clock time
        .build()
        .expect("runtime");
    println!(
        "{MESSAGES} messages per guarantee at 1000/s; 20% loss, 10% duplication, 30% reordering,\n\
         a 2 s partition, and the receiver restarted once\n"
    );
    println!(
        "{:<16} {:>6} {:>6} {:>7} {:>9} {:>11} {:>6} {:>15}",
        "guarantee",
        "sent",
        "acked",
        "failed",
        "delivered",
        "dup-handler",
        "lost",
        "lost-after-ack"
    );
    for g in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ] {
        let r = runtime.block_on(run(g, 42));
        println!(
            "{:<16} {:>6} {:>6} {:>7} {:>9} {:>11} {:>6} {:>15}",
            format!("{g:?}"),
            r.sent,
            r.acked,
            r.failed,
            r.seen,
            r.duplicates,
            r.lost,
            r.lost_after_ack
        );
    }
    println!("\nacked for at-most-once means 'transmitted once'; lost-after-ack must be 0 for the other two,");
    println!("and dup-handler must be 0 for effectively-once.");
}
