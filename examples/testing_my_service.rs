//! Testing *your own* service with `ackwire::testing` (feature `testing`): a bank that
//! credits accounts, fed by a shop over ackwire, checked under 20 % loss, 10 %
//! duplication, 30 % reordering, a 1 s partition and a restart of the bank, on
//! virtual time: 3 seeds × 2 guarantees, about a minute of virtual time, run in a
//! few seconds.
//!
//! ```text
//! cargo run --example testing_my_service --features testing
//! ```
//!
//! The invariant checked is the bank's own: every credit is applied exactly once and
//! the balances add up. With effectively-once (and the bank's dedup state on disk, so
//! it survives the restart) the handler never even sees a credit twice. With
//! at-least-once it does see duplicates, and the bank's own idempotency (it remembers
//! the credit ids it applied) keeps the balances right.

use ackwire::dedup::DurableDedup;
use ackwire::testing::{runtime, NodeSetup, SimNet};
use ackwire::transport::mem::FaultPlan;
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CREDITS: ChannelId = ChannelId(1);
const SHOP: NodeId = NodeId(1);
const BANK: NodeId = NodeId(2);
const N: u64 = 600;
const CENTS: i64 = 250;

/// The message: credit `cents` to `account`; `id` identifies the credit.
#[derive(Debug, Serialize, Deserialize)]
struct Credit {
    id: u64,
    account: u32,
    cents: i64,
}

/// The service under test: the bank's ledger. In production it would live in a
/// database; here it is shared by the bank node's incarnations, as a database
/// outlives a process restart.
#[derive(Debug, Default)]
struct Ledger {
    balances: HashMap<u32, i64>,
    /// Credit ids already applied: the service's own idempotency.
    applied: HashSet<u64>,
    /// Times the handler was called, and how many of those were repeats.
    handler_calls: u64,
    repeats: u64,
}

impl Ledger {
    /// The handler's business logic: apply a credit unless it was applied already.
    fn credit(&mut self, c: &Credit) {
        self.handler_calls += 1;
        if self.applied.insert(c.id) {
            *self.balances.entry(c.account).or_default() += c.cents;
        } else {
            self.repeats += 1;
        }
    }
}

/// The bank node: at every start (the first and after the restart), attach the
/// credits receiver and run the handler, which applies and then acks.
fn bank(ledger: Arc<Mutex<Ledger>>, config: NodeConfig) -> NodeSetup {
    NodeSetup::new(BANK)
        .config(config)
        .on_start(move |node: &Node| {
            let mut inbox = node
                .receiver::<Credit>(CREDITS, false)
                .expect("one receiver per incarnation");
            let ledger = ledger.clone();
            tokio::spawn(async move {
                while let Some(delivery) = inbox.recv().await {
                    ledger.lock().unwrap().credit(delivery.message());
                    delivery.ack(); // only after the credit is applied
                }
            });
        })
}

/// One test run: returns the ledger after every receipt has settled.
async fn run(guarantee: Guarantee, seed: u64) -> Ledger {
    let plan = FaultPlan::new(seed)
        .loss(0.2)
        .duplicate(0.1)
        .reorder(0.3)
        .delay(Duration::from_micros(100), Duration::from_millis(2));
    let mut sim = SimNet::new(plan).expect("valid plan inside a runtime");
    // Effectively-once across a restart needs the receiver's dedup state on disk.
    let dedup_dir = tempfile::tempdir().expect("temp dir");
    let mut bank_config = NodeConfig::default();
    bank_config.dedup.durable = Some(DurableDedup::new(dedup_dir.path()));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    sim.add_node(SHOP).await.expect("shop");
    sim.add(bank(ledger.clone(), bank_config))
        .await
        .expect("bank");

    let out = sim
        .node(SHOP)
        .expect("shop running")
        .sender::<Credit>(BANK, ChannelOptions::new(CREDITS, guarantee))
        .expect("sender");
    let mut receipts = Vec::new();
    for id in 0..N {
        match id {
            200 => sim.partition(SHOP, BANK), // the network splits for 1 s...
            300 => sim.heal(SHOP, BANK),      // ...and heals
            450 => {
                // The bank process restarts: same id, new incarnation, same ledger.
                sim.restart(BANK).await.expect("bank restarts");
            }
            _ => {}
        }
        let credit = Credit {
            id,
            account: (id % 10) as u32,
            cents: CENTS,
        };
        receipts.push(out.send(&credit).await.expect("send accepted"));
        sim.advance(Duration::from_millis(10)).await; // 100 credits per second
    }
    for (id, receipt) in receipts.into_iter().enumerate() {
        if let Err(e) = receipt.await {
            panic!("seed {seed}: credit {id} not acknowledged: {e}");
        }
    }
    let stats = sim.stats();
    println!(
        "{guarantee:?}, seed {seed}: {:.1} virtual s; network sent {} frames, lost {}, \
         dropped {} in the partition, duplicated {}",
        sim.elapsed().as_secs_f64(),
        stats.sent,
        stats.dropped_loss,
        stats.dropped_partition,
        stats.duplicated
    );
    sim.shutdown().await;
    Arc::try_unwrap(ledger)
        .expect("handlers ended with their nodes")
        .into_inner()
        .unwrap()
}

fn main() {
    let rt = runtime().expect("paused current-thread runtime");
    for seed in [1, 2, 3] {
        for guarantee in [Guarantee::EffectivelyOnce, Guarantee::AtLeastOnce] {
            let ledger = rt.block_on(run(guarantee, seed));
            // The bank's invariant, whatever the guarantee: each credit applied once.
            assert_eq!(ledger.applied.len() as u64, N, "a credit was lost");
            let total: i64 = ledger.balances.values().sum();
            assert_eq!(total, N as i64 * CENTS, "balances do not add up");
            for account in 0..10u32 {
                assert_eq!(ledger.balances[&account], N as i64 / 10 * CENTS);
            }
            if guarantee == Guarantee::EffectivelyOnce {
                // Dedup kept every repeat away from the handler.
                assert_eq!(ledger.repeats, 0, "effectively-once handler saw a repeat");
                assert_eq!(ledger.handler_calls, N);
            }
            println!(
                "  handler called {} times for {N} credits ({} repeats absorbed by the \
                 ledger's idempotency); every balance right\n",
                ledger.handler_calls, ledger.repeats
            );
        }
    }
}
