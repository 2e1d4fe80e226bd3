//! # ackwire
//!
//! Message delivery between Rust services with an explicit guarantee, chosen per
//! channel:
//!
//! | guarantee | sender | receiver | the handler sees each message | runs out at |
//! |---|---|---|---|---|
//! | [`Guarantee::AtMostOnce`] | sends once, never retries | delivers on arrival, no ack | 0 or 1 times | — |
//! | [`Guarantee::AtLeastOnce`] | retries (RTO + backoff) until acked or the deadline | acks *after* the handler finishes | 1..n times if the receipt was `Ok` | the per-message deadline (then the receipt resolves to `SendError::Deadline`) |
//! | [`Guarantee::EffectivelyOnce`] | as at-least-once | dedups by [`MessageId`]; duplicates are acked, not delivered | exactly once if the receipt was `Ok` | the dedup horizon for application keys (default 2 min); a receiver restart without durable dedup; disk loss |
//!
//! Exactly-once *delivery* is impossible (the Two Generals problem: the last ack can
//! always be lost). What ackwire gives is exactly-once *processing*: at-least-once
//! delivery plus a receiver-side dedup table, so a message that arrives again is
//! recognised and acknowledged without running the handler twice. Where it runs out:
//!
//! * **Dedup horizon.** Library-assigned IDs `(origin, channel, seq)` are remembered
//!   by a per-stream sequence window (one byte per tracked seq) for as long as the
//!   stream is live; a finished and settled stream, or one idle for `retention`, is
//!   retired to a tombstone that refuses its old seqs, and a tombstone is forgotten `retention` (default 24 h, plus up to
//!   a quarter) after the retirement. Application keys
//!   ([`IdKey`]) are remembered for the dedup horizon (default 2 minutes, like NATS
//!   JetStream); a resend after that is processed again.
//! * **Restarts.** In memory, the dedup state dies with the receiver process: across a
//!   restart effectively-once degrades to at-least-once. With
//!   [`dedup::DurableDedup`] it is persisted (crc-checked log, one group-committed
//!   fsync per burst) before the ack is sent; a failed write is counted in
//!   `ProtoStats::dedup_persist_errors` and the ack still sent.
//! * **Side effects.** If the handler crashes after its side effect but before
//!   `ack()`, the message is redelivered: handlers should still be idempotent, or
//!   commit their effect and the ack's dedup record together.
//! * **Deadline.** A receipt that fails with [`SendError::Deadline`] means "not known
//!   to be delivered" — the ack may be what was lost. Resend under the same [`IdKey`]
//!   on an effectively-once channel to make the retry safe.
//! * **Replicas.** A [`group::GroupSender`] re-sends a Down replica's unacknowledged
//!   messages to another replica under the same [`MessageId`]: exactly once in effect
//!   only where the replicas share their dedup record (an inbox on one database, crate
//!   `ackwire-inbox`); otherwise at-least-once across replicas.
//!
//! ```no_run
//! use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Plain TCP admits only the peers a node knows: `peer` (dialled) or `allow_peer`.
//! let ledger = Node::builder(NodeId(2))
//!     .bind("127.0.0.1:7000".parse()?)
//!     .allow_peer(NodeId(1))
//!     .build()
//!     .await?;
//! let shop = Node::builder(NodeId(1))
//!     .bind("127.0.0.1:0".parse()?)
//!     .peer(NodeId(2), "127.0.0.1:7000".parse()?)
//!     .build()
//!     .await?;
//! let mut payments = ledger.receiver::<u64>(ChannelId(1), false)?;
//! let out = shop.sender::<u64>(NodeId(2), ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce))?;
//! let receipt = out.send(&1999).await?; // waits only while the window is full
//! let payment = payments.recv().await.unwrap();
//! // ... process it, then:
//! payment.ack();
//! receipt.await?; // Ok(Acked): the handler finished
//! # Ok(()) }
//! ```
//!
//! ## Layout
//!
//! * [`node`](Node) — the tokio driver and the public API: [`Node`], [`Sender`],
//!   [`Receiver`], [`Delivery`], [`Receipt`]. Owns tasks, the transport link, the clock
//!   and one timer; no protocol logic.
//! * [`codec`] — how typed channels encode values: the [`Codec`] trait, [`Bincode`]
//!   (default), `Postcard` (feature `postcard`), and the type fingerprint that includes
//!   the codec.
//! * [`proto`] — the protocol as sans-IO state machines ([`proto::Endpoint`]):
//!   sequencing, in-flight window, cumulative + selective acks, retransmission,
//!   ordered delivery, use of the dedup table; and the node's policy around it: the
//!   heartbeat schedule and failure detector (`proto::liveness`) and what becomes of
//!   each sent message (`proto::sends`: acked, handed off when its target is Down or
//!   the sender gives up, refused by the hint store, rejected) and hint replay
//!   (`proto::replay`: throttle, per-target concurrency, expiry, the id floor of
//!   handed-off messages), reaching the hint store and the application's send
//!   windows through traits; `proto::core` joins them into the one object the
//!   driver feeds and polls. Reads no clock (every call takes
//!   `now`), opens no socket or file, spawns nothing and does no IO: with durable
//!   dedup it only buffers the records of completed messages, and holds its acks
//!   back until the owner (the node's driver) has written and fsynced them
//!   ([`proto::Endpoint::persist_owed`], [`dedup::Dedup::sync`]: one group commit
//!   per burst, under `block_in_place` on a multi-thread runtime).
//! * [`retry`] — RFC 6298 RTT estimator, exponential backoff with jitter, retry
//!   policy and retry budget (`rtt`, `backoff`, `policy`, `budget`); the streams'
//!   retransmissions and the TCP redial both go through it.
//! * [`dedup`] — receiver dedup: the lock-free per-stream [`dedup::SeqWindow`], the
//!   lock-free expiring [`dedup::IdTable`] for application keys, durable persistence.
//! * [`handoff`] — the hinted-handoff store: per-target append-only segment logs
//!   with crc32c records, fsync policies, crash recovery, replay throttle.
//! * `storage` (private) — what the durable logs share: the one [`handoff::FsyncPolicy`]
//!   (also [`dedup::FsyncPolicy`]), the checked file header, the record framing and
//!   its recovery scan (torn tail cut, corrupt record skipped), and the IO backends,
//!   on disk or in memory: one log file, and a directory of per-target segment files
//!   plus a cursor ([`handoff::SegmentIo`]) built from the same file handles, with one
//!   atomic replace and one fsync path. The dedup log (format 4; format 3 is read and rewritten) and the hint store
//!   are record codecs on top of it.
//! * [`detector`] — the phi-accrual failure detector (Up / Suspect / Down).
//! * [`group`] — replica groups: one logical receiver served by several nodes
//!   (spread by key or round-robin, re-routed under the same `MessageId` when a member
//!   is Down; members from a list or DNS).
//! * [`wire`] — frame types and the codec (length prefix, bincode 2 header, crc32c).
//! * [`transport`] — the [`transport::Transport`] trait; [`transport::tcp`] (real) and
//!   [`transport::mem`] (in-process, with seeded faults for tests and demos).
//! * `id`, `error`, `rng` — identities, shared errors, a seeded PRNG.
//!
//! `tests/integration/layering.rs` checks the sans-IO claims against the source: `proto`, `retry`
//! and `detector` name no runtime, socket, file or clock outside their unit tests,
//! and `wire` names tokio only in its feature-gated `tokio_util` adapter.
//!
//! ## The public API, and why each part is public
//!
//! * **The crate root** is what a service needs: [`Node`] and [`NodeBuilder`], the
//!   configuration ([`NodeConfig`], [`ChannelOptions`], [`ReceiverOptions`],
//!   [`HandoffConfig`], [`ProtoConfig`]), the handles ([`Sender`], [`RawSender`],
//!   [`Receiver`], [`RawReceiver`], [`Delivery`], [`Receipt`], the sinks), the ids
//!   ([`NodeId`], [`ChannelId`], [`MessageId`], [`IdKey`], [`Origin`],
//!   [`Guarantee`]), the outcomes and errors ([`Outcome`], [`SendError`] with
//!   [`HandoffRefusal`], [`NodeError`], [`NodeFailure`], [`AckError`],
//!   [`ConfigError`], [`RejectReason`]), [`Stats`] (protocol, dedup, hint store and
//!   TCP counters in one value) and the dead-letter queue.
//! * **The sans-IO layer** — [`proto`], [`retry`], [`detector`], [`dedup`],
//!   [`wire`] — is public on purpose, as a documented layer for embedding the
//!   protocol in another event loop, a simulator or a tool that reads frames
//!   (`wire`'s `tokio_util` codec). [`Node`] is built from exactly these parts;
//!   their items are covered by semver like the rest, and a service that only
//!   sends and receives never needs them.
//! * **Storage and topology**: [`handoff`] (the hint store and its configuration,
//!   usable on its own for tooling over a hint directory), [`group`] (replica
//!   groups), [`transport`] (the [`transport::Transport`] trait for your own
//!   transport, the TCP and TLS configuration, the in-process `mem` network),
//!   [`codec`] (the [`Codec`] trait for your own codec).
//! * **Behind features only**: `testing` (the simulated network for your tests) and
//!   `fuzzing` (entry points for the fuzz targets; not compiled into a normal build).
//!
//! ## Features and ecosystem
//!
//! * `tls` (default): mutual TLS 1.3 on the TCP transport ([`transport::tls`]).
//! * `tower`: senders as `tower::Service`s (`Sender::service`), whose response is the
//!   message's [`Outcome`] and whose `poll_ready` waits for window space.
//! * `metrics`: per-peer, per-channel `ackwire_*` counters, gauges and histograms
//!   through the `metrics` facade (the README's "Observability" section lists them).
//! * `postcard`: the `codec::Postcard` codec for typed channels
//!   ([`Node::sender_with_codec`], [`Node::receiver_with_codec`]).
//! * `tokio-util`: [`wire::FrameDecoder`] / [`wire::FrameEncoder`] as
//!   `tokio_util::codec` `Decoder` / `Encoder`, for `FramedRead` / `FramedWrite` over
//!   the wire format.
//! * `testing`: `ackwire::testing`, a simulated network on tokio's paused clock
//!   (seeded loss, duplication, reordering, partitions, restarts, crashes) for testing
//!   your own service's handlers (the README's "Testing your service").
//! * Always: per-message `tracing` events at trace level on the target
//!   `ackwire::message`, each inside a span `stream` per stream (peer and channel; the
//!   sender's run for received streams), inside a span `node` per node.
//! * Always: [`Receiver`] is a `futures::Stream`, [`Sender::sink`] a `futures::Sink`;
//!   the config types implement serde's `Serialize`/`Deserialize` (durations as
//!   `"200ms"`, `"5s"`; missing keys keep their defaults, except a channel's
//!   `channel` and `guarantee`; unknown keys are errors) — all but `TlsConfig`
//!   (certificates in memory: see `TlsFiles`) and the `mem` transport's `FaultPlan`.
#![warn(missing_docs)]

mod blocking;
pub mod codec;
mod config_serde;
pub mod dedup;
pub mod detector;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod group;
pub mod handoff;
mod id;
mod node;
pub mod proto;
pub mod retry;
mod rng;
mod storage;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
pub mod wire;

pub use codec::{Bincode, Codec, CodecError};
pub use error::ConfigError;
pub use id::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
pub use node::{
    AckError, ChannelOptions, DeadLetter, DeadLetterReason, DeadLetters, Delivery, DeliveryHandle,
    HandoffConfig, HandoffRefusal, IdentityConflict, Node, NodeBuilder, NodeConfig, NodeError,
    NodeFailure, Outcome, RawReceiver, RawSendSink, RawSender, Receipt, Receiver, ReceiverOptions,
    SendError, SendSink, Sender, Stats, BIND_RETRY,
};
#[cfg(feature = "tower")]
pub use node::{RawSenderService, SendFuture, SenderService};
pub use proto::ProtoConfig;
pub use wire::RejectReason;
