//! # ackwire
//!
//! Message delivery between Rust services with an explicit guarantee.
#![warn(missing_docs)]

pub mod dedup;
pub mod detector;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod handoff;
mod id;
mod node;
pub mod proto;
pub mod retry;
mod rng;
pub mod transport;
pub mod wire;

pub use error::ConfigError;
pub use id::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
pub use node::{
    ChannelOptions, Delivery, DeliveryHandle, Node, NodeBuilder, NodeConfig, NodeError, Outcome,
    RawReceiver, RawSender, Receipt, Receiver, SendError, Sender, Stats, BIND_RETRY,
};
pub use proto::ProtoConfig;
