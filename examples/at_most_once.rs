//! At-most-once over TCP loopback: fire and forget. Each message is sent once and never
//! retried; the handler sees it 0 or 1 times. Cheapest, for data that is worthless late
//! (metrics, presence pings).
//!
//! ```text
//! cargo run --example at_most_once
//! ```

use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metrics = ChannelId(1);
    // Two nodes in one process; in real use they are two services.
    let collector = Node::builder(NodeId(2))
        .bind("127.0.0.1:0".parse()?)
        .allow_peer(NodeId(1)) // without TLS, only configured peers are accepted
        .build()
        .await?;
    let app = Node::builder(NodeId(1))
        .bind("127.0.0.1:0".parse()?)
        .peer(collector.id(), collector.local_addr().expect("tcp listens"))
        .build()
        .await?;

    let mut inbox = collector.receiver::<(String, f64)>(metrics, false)?;
    let out = app.sender::<(String, f64)>(
        collector.id(),
        ChannelOptions::new(metrics, Guarantee::AtMostOnce),
    )?;

    for i in 0..5 {
        let receipt = out.send(&("cpu".to_string(), 0.25 * i as f64)).await?;
        // For at-most-once the receipt only says "handed to the transport once".
        assert_eq!(receipt.await?, Outcome::Sent);
    }
    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_secs(2), inbox.recv()).await {
            // No ack needed: at-most-once deliveries are settled on arrival.
            Ok(Some(d)) => println!("collector got {:?} from {}", d.message(), d.from()),
            _ => println!("a sample was lost, and that is allowed"),
        }
    }
    Ok(())
}
