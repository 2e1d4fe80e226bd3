//! A sender as a `tower::Service` (feature `tower`, on for examples) under tower's own
//! middleware: a timeout on each message's ack and a limit on messages awaiting one.
//! The response of each call is the message's outcome (`Acked` once the receiver's
//! handler acknowledged it).
//!
//! ```text
//! cargo run --example tower_layers
//! ```

use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orders = ChannelId(3);
    let warehouse = Node::builder(NodeId(2))
        .bind("127.0.0.1:0".parse()?)
        .allow_peer(NodeId(1))
        .build()
        .await?;
    let shop = Node::builder(NodeId(1))
        .bind("127.0.0.1:0".parse()?)
        .peer(warehouse.id(), warehouse.local_addr().expect("tcp listens"))
        .build()
        .await?;

    // The warehouse acks each order after "processing" it, one at a time; order 7 takes
    // 1.5 s, so it and the orders queued behind it miss the 1 s timeout.
    let mut inbox = warehouse.receiver::<u32>(orders, false)?;
    let handler = tokio::spawn(async move {
        let mut processed = 0;
        while let Some(order) = inbox.recv().await {
            if *order.message() == 7 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            order.ack();
            processed += 1;
        }
        processed
    });

    let sender = shop.sender::<u32>(
        warehouse.id(),
        ChannelOptions::new(orders, Guarantee::EffectivelyOnce),
    )?;
    // Each call waits at most 1 s for its ack; at most 32 orders await one at a time.
    // (The sender's own `poll_ready` also waits while its in-flight window is full.)
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .concurrency_limit(32)
        .service(sender.service());

    let started = Instant::now();
    let mut calls = Vec::new();
    for order in 0..200u32 {
        let mut svc = svc.clone();
        calls.push(tokio::spawn(
            async move { svc.ready().await?.call(order).await },
        ));
    }
    let mut results: BTreeMap<String, u32> = BTreeMap::new();
    for call in calls {
        let label = match call.await? {
            Ok(Outcome::Acked) => "acked".to_string(),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("error: {e}"),
        };
        *results.entry(label).or_default() += 1;
    }
    println!(
        "200 orders through timeout(1 s) + concurrency_limit(32) in {:?}:",
        started.elapsed()
    );
    for (label, n) in &results {
        println!("  {n:4}  {label}");
    }
    println!("(a timed-out order is not recalled: the warehouse still processes it once)");

    shop.shutdown().await;
    warehouse.shutdown().await;
    println!("warehouse processed {} orders", handler.await?);
    Ok(())
}
