//! # ackwire
//!
//! Message delivery between Rust services with an explicit guarantee.
#![warn(missing_docs)]

pub mod handoff;
mod id;
mod rng;
pub mod transport;
pub mod wire;

pub use id::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
