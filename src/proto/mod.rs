//! The delivery protocol as pure state machines (sans-IO).
//!
//! Owns sequencing, acks, retransmission, ordered delivery and the use of the dedup
//! table. Never imports tokio, never touches a socket or a clock: every input carries
//! `now`, every output is polled (`tests/layering.rs` checks it). The one IO on its
//! path is durable dedup's log, written by the [`Dedup`](crate::dedup::Dedup) it is
//! given. [`Endpoint`] is the entry point; the per-stream halves are private.

mod authz;
mod config;
pub(crate) mod core;
mod endpoint;
mod inbound;
pub(crate) mod liveness;
mod outbound;
pub(crate) mod sends;

pub use authz::{Authorization, Refusal, RelayPolicy};
pub use config::ProtoConfig;
pub use endpoint::{
    Accept, Completion, DeliveryRef, Endpoint, Event, Outgoing, ProtoStats, SendRef,
    StreamCounters, StreamError, MAX_SEQ,
};
pub use outbound::{CREDIT_SLACK, INITIAL_CREDIT, INITIAL_NODE_CREDIT, MAX_PROBE_INTERVAL};
