//! # ackwire
//!
//! Message delivery between Rust services with an explicit guarantee.
#![warn(missing_docs)]

pub mod dedup;
pub mod detector;
mod id;
pub mod retry;
mod rng;
pub mod transport;
pub mod wire;

pub use id::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
