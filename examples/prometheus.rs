//! The `metrics` feature exported in the Prometheus text format with
//! `metrics-exporter-prometheus`: two nodes on the in-memory network (10% frame loss,
//! so there are retransmissions), 200 acked messages on one channel and a poison
//! message that ends in the receiver's dead letters on another; then the `ackwire_*`
//! lines a Prometheus server would scrape are printed.
//!
//! ```text
//! cargo run --example prometheus --features metrics
//! ```
//!
//! The exporter is installed with `PrometheusBuilder::install_recorder`, which returns
//! a handle whose `render()` gives the scrape text, and without its default features:
//! no HTTP listener, so the example builds without hyper and ends by itself. A service
//! serves `handle.render()` on its own `/metrics` route (or enables the exporter's
//! `http-listener` feature and calls `PrometheusBuilder::install` to get a listener).
//! The recorder must be installed before the nodes are built.

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, ReceiverOptions};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Ack latencies as a histogram with buckets (the exporter's default is a summary).
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("ackwire_ack_latency_seconds".into()),
            &[0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0],
        )?
        .install_recorder()?;

    let net = MemNetwork::new(FaultPlan::new(7).loss(0.1))?;
    let api = Node::builder(NodeId(1))
        .transport(net.transport(NodeId(1)))
        .build()
        .await?;
    let worker = Node::builder(NodeId(2))
        .transport(net.transport(NodeId(2)))
        .build()
        .await?;

    let (orders, audit) = (ChannelId(1), ChannelId(2));
    let mut inbox = worker.receiver::<u64>(orders, false)?;
    tokio::spawn(async move {
        while let Some(order) = inbox.recv().await {
            order.ack();
        }
    });
    let mut audit_inbox = worker
        .receiver_with::<String>(audit, ReceiverOptions::default().max_deliveries(Some(2)))?;
    tokio::spawn(async move {
        while let Some(poison) = audit_inbox.recv().await {
            poison.nack(); // fails every time: dead-lettered after 2 deliveries
        }
    });

    let out = api.sender::<u64>(
        worker.id(),
        ChannelOptions::new(orders, Guarantee::EffectivelyOnce),
    )?;
    let mut receipts = Vec::new();
    for i in 0..200 {
        receipts.push(out.send(&i).await?);
    }
    for r in receipts {
        r.await?;
    }
    let poison = api.sender::<String>(
        worker.id(),
        ChannelOptions::new(audit, Guarantee::AtLeastOnce),
    )?;
    let rejected = poison.send(&"poison".to_string()).await?.await;
    println!("# poison message: {rejected:?}");

    api.shutdown().await;
    worker.shutdown().await;
    for line in handle.render().lines() {
        if line.starts_with("ackwire_") || line.starts_with("# TYPE ackwire_") {
            println!("{line}");
        }
    }
    Ok(())
}
