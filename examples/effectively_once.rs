//! Effectively-once over TCP loopback: at-least-once delivery plus receiver dedup by
//! message ID. Exactly-once *delivery* is impossible; this gives exactly-once
//! *processing* within the dedup horizon. Here the caller even sends the same payment
//! twice under one idempotency key, and the handler runs it once.
//!
//! ```text
//! cargo run --example effectively_once
//! ```

use ackwire::{ChannelId, ChannelOptions, Guarantee, IdKey, Node, NodeId};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let payments = ChannelId(3);
    let ledger = Node::builder(NodeId(2))
        .bind("127.0.0.1:0".parse()?)
        .allow_peer(NodeId(1)) // without TLS, only configured peers are accepted
        .build()
        .await?;
    let shop = Node::builder(NodeId(1))
        .bind("127.0.0.1:0".parse()?)
        .peer(ledger.id(), ledger.local_addr().expect("tcp listens"))
        .build()
        .await?;

    let mut inbox = ledger.receiver::<(String, u64)>(payments, false)?;
    let out = shop.sender::<(String, u64)>(
        ledger.id(),
        ChannelOptions::new(payments, Guarantee::EffectivelyOnce),
    )?;

    // The shop retries a payment it is unsure about, under the same idempotency key.
    let order_42 = IdKey(42);
    let first = out.send_with_key(&("alice".into(), 1999), order_42).await?;
    let retry = out.send_with_key(&("alice".into(), 1999), order_42).await?;
    let other = out.send(&("bob".into(), 500)).await?;

    let mut balance = 0;
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(500), inbox.recv()).await {
        let (who, cents) = p.message().clone();
        balance += cents;
        println!("ledger: charged {who} {cents} (id {})", p.id());
        p.ack();
    }
    println!(
        "shop: receipts {:?} {:?} {:?}",
        first.await?,
        retry.await?,
        other.await?
    );
    println!("ledger balance {balance} (1999 + 500: the retried payment ran once)");
    assert_eq!(balance, 2499);
    Ok(())
}
