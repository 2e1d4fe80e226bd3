//! Rejections and dead letters over TCP loopback, with default settings except the
//! delivery limit: a poison message that the handler fails every time goes to the
//! receiver's dead letters after 3 deliveries, a message of the wrong type and a
//! message for a channel nobody receives are rejected, and each sender's receipt says
//! why instead of waiting out its deadline.
//!
//! ```text
//! cargo run --example dead_letters
//! ```

use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, ReceiverOptions};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orders = ChannelId(1);
    let worker = Node::builder(NodeId(2))
        .bind("127.0.0.1:0".parse()?)
        .allow_peer(NodeId(1)) // without TLS, only configured peers are accepted
        .build()
        .await?;
    let api = Node::builder(NodeId(1))
        .bind("127.0.0.1:0".parse()?)
        .peer(worker.id(), worker.local_addr().expect("tcp listens"))
        .build()
        .await?;

    let mut inbox = worker
        .receiver_with::<String>(orders, ReceiverOptions::ordered().max_deliveries(Some(3)))?;
    tokio::spawn(async move {
        while let Some(order) = inbox.recv().await {
            if order.message().contains("poison") {
                println!("worker: {} failed, nack", order.message());
                order.nack();
            } else {
                println!("worker: processed {}", order.message());
                order.ack();
            }
        }
    });
    let mut dead = worker.dead_letters();
    let dead_task = tokio::spawn(async move {
        if let Some(letter) = dead.recv().await {
            // Dead letters keep the raw payload: decode it as the channel's type.
            let (order, _): (String, usize) =
                bincode::serde::decode_from_slice(&letter.message, bincode::config::standard())
                    .expect("a String payload");
            println!(
                "worker: dead letter {} from {} after {} deliveries ({:?})",
                order, letter.from, letter.deliveries, letter.reason
            );
        }
    });

    let out = api.sender::<String>(
        worker.id(),
        ChannelOptions::new(orders, Guarantee::EffectivelyOnce),
    )?;
    let mut receipts = Vec::new();
    for name in ["order 1", "order 2 (poison)", "order 3"] {
        receipts.push((name, out.send(&name.to_string()).await?));
    }
    for (name, r) in receipts {
        println!("api: {name} -> {:?}", r.await);
    }
    dead_task.await?;

    // The wrong type on the same channel: rejected before decoding.
    let wrong = api.sender::<u64>(
        worker.id(),
        ChannelOptions::new(orders, Guarantee::EffectivelyOnce),
    )?;
    println!(
        "api: a u64 to a String channel -> {:?}",
        wrong.send(&7).await?.await
    );

    // A channel nobody receives: rejected after the 5 s grace period.
    let nowhere = api.sender::<String>(
        worker.id(),
        ChannelOptions::new(ChannelId(9), Guarantee::AtLeastOnce),
    )?;
    let started = Instant::now();
    let r = nowhere.send(&"hello?".to_string()).await?.await;
    println!(
        "api: a message to a channel without receiver -> {r:?} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    api.shutdown().await;
    worker.shutdown().await;
    Ok(())
}
