//! At-least-once over TCP loopback: retried until acknowledged, and the receiver acks
//! only after its handler has finished. The handler may see a message more than once
//! (after a receiver restart, say), so it should be idempotent.
//!
//! ```text
//! cargo run --example at_least_once
//! ```

use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let jobs = ChannelId(2);
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

    let mut inbox = worker.receiver::<String>(jobs, false)?;
    let handler = tokio::spawn(async move {
        let mut failed_once = false;
        while let Some(job) = inbox.recv().await {
            if job.message() == "resize photo 2" && !failed_once {
                // Processing failed: nack, and the sender redelivers it.
                failed_once = true;
                println!("worker: {} failed, nack", job.message());
                job.nack();
                continue;
            }
            println!("worker: done {}", job.message());
            job.ack(); // the ack leaves only now, after the work is done
        }
    });

    let out = api.sender::<String>(
        worker.id(),
        ChannelOptions::new(jobs, Guarantee::AtLeastOnce),
    )?;
    let mut receipts = Vec::new();
    for i in 1..=3 {
        receipts.push(out.send(&format!("resize photo {i}")).await?);
    }
    for (i, r) in receipts.into_iter().enumerate() {
        // Resolves once the worker acked, i.e. after its handler finished.
        println!("api: photo {} -> {:?}", i + 1, r.await?);
    }
    worker.shutdown().await;
    handler.await?;
    Ok(())
}
