//! The delivery protocol as pure state machines (sans-IO).
//!
//! Owns sequencing, acks, retransmission, ordered delivery and the use of the dedup
//! table, and the node's policy around them: liveness, the fate of each sent message,
//! hint replay. Never imports tokio, never touches a socket, a file or a clock: every
//! input carries `now`, every output is polled (`tests/integration/layering.rs` checks it). Durable
//! dedup records are only buffered here; the owner writes and fsyncs them
//! ([`Endpoint::persist_owed`]). The hint store is reached through a trait the owner
//! implements. [`Endpoint`] is the entry point; the per-stream halves are private.

mod active;
mod authz;
mod config;
pub(crate) mod core;
mod endpoint;
mod inbound;
pub(crate) mod liveness;
mod outbound;
pub(crate) mod replay;
pub(crate) mod sends;
mod seqmap;

pub use authz::{Authorization, Refusal, RelayPolicy};
pub use config::ProtoConfig;
pub use endpoint::{
    Accept, Completion, DeliveryRef, Endpoint, Event, Outgoing, ProtoStats, SendRef,
    StreamCounters, StreamError, MAX_SEQ,
};
pub use outbound::{CREDIT_SLACK, INITIAL_CREDIT, INITIAL_NODE_CREDIT, MAX_PROBE_INTERVAL};
