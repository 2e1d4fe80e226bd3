//! A node configured from a TOML file: `NodeConfig`, `TcpConfig` and `ChannelOptions`
//! implement serde's `Deserialize` (and `Serialize`), with human-readable durations,
//! defaults for every key the file leaves out, and an error for a misspelt key.
//!
//! ```text
//! cargo run --example toml_config                       # examples/toml_config.toml
//! cargo run --example toml_config -- path/to/node.toml  # your own file
//! ```

use ackwire::transport::tcp::TcpConfig;
use ackwire::transport::tls::TlsFiles;
use ackwire::{ChannelOptions, Node, NodeConfig, NodeId};
use serde::Deserialize;
use std::net::SocketAddr;

/// The file's layout: the application's own keys next to ackwire's config types.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceConfig {
    id: u64,
    bind: SocketAddr,
    #[serde(default)]
    node: NodeConfig,
    #[serde(default)]
    tcp: TcpConfig,
    channel: ChannelOptions,
    /// Mutual TLS from PEM files; without it, plain TCP.
    tls: Option<TlsFiles>,
}

/// The file next to this example, so `cargo run --example toml_config` works from
/// any directory.
const DEFAULT_FILE: &str = include_str!("toml_config.toml");

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let text = match std::env::args().nth(1) {
        Some(path) => std::fs::read_to_string(path)?,
        None => DEFAULT_FILE.to_string(),
    };
    // A typo such as `heartbeat_intervl` fails here, naming the key and its line.
    let cfg: ServiceConfig = toml::from_str(&text)?;
    println!(
        "config: node n{} heartbeat {:?}, retry deadline {:?}, dedup horizon {:?} \
         (window {} kept from the defaults), tcp connect timeout {:?}",
        cfg.id,
        cfg.node.heartbeat_interval,
        cfg.node.proto.retry.deadline,
        cfg.node.dedup.horizon,
        cfg.node.dedup.window,
        cfg.tcp.connect_timeout,
    );

    // A peer to talk to, with default settings.
    let ledger = Node::builder(NodeId(2))
        .bind("127.0.0.1:0".parse()?)
        .allow_peer(NodeId(cfg.id))
        .build()
        .await?;
    let mut inbox = ledger.receiver::<String>(cfg.channel.channel, false)?;

    // The node from the file (`build` validates every value and names a bad one).
    let mut builder = Node::builder(NodeId(cfg.id))
        .tcp(cfg.bind, cfg.tcp)
        .config(cfg.node)
        .peer(ledger.id(), ledger.local_addr().expect("tcp listens"));
    if let Some(files) = &cfg.tls {
        builder = builder.tls(files.load()?);
    }
    let node = builder.build().await?;
    let out = node.sender::<String>(ledger.id(), cfg.channel)?;
    let receipt = out.send(&"configured from TOML".to_string()).await?;
    let delivery = inbox.recv().await.expect("delivered");
    println!("ledger: got {:?}", delivery.message());
    delivery.ack();
    println!("node: receipt {:?}", receipt.await?);

    node.shutdown().await;
    ledger.shutdown().await;
    Ok(())
}
