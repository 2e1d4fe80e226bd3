//! The tokio driver and the public API: [`Node`], [`Sender`], [`Receiver`],
//! [`Delivery`], [`Receipt`].
//!
//! Owns tasks, the transport link, the clock and the one timer of the node; holds no
//! protocol logic (that is [`crate::proto::Endpoint`]). The driver is a loop: read
//! transport events and application commands → feed the endpoint; the timer fires →
//! feed the endpoint; then poll the endpoint → write frames, hand deliveries to
//! receivers, resolve receipts, and reset the single `Sleep` to the earliest deadline.

mod batch;
pub(crate) mod completions;
mod dead_letter;
#[cfg(feature = "metrics")]
mod metrics;
mod observe;
#[cfg(feature = "tower")]
mod service;
mod sink;
mod spool;
pub(crate) mod typecheck;

use dead_letter::DeadLetterQueue;
pub use dead_letter::{DeadLetter, DeadLetterReason, DeadLetters};
use observe::{PendingReceipt, MESSAGE_TARGET};
#[cfg(feature = "tower")]
pub use service::{RawSenderService, SendFuture, SenderService};
pub use sink::{RawSendSink, SendSink};
pub use spool::HandoffConfig;

use crate::codec::{Bincode, Decode, Encode};
use crate::dedup::{Dedup, DedupConfig};
use crate::detector::{DetectorConfig, FailureDetector, Health, HealthChange};
use crate::id::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
use crate::proto::{
    Completion, DeliveryRef, Endpoint, Event, Outgoing, ProtoConfig, ProtoStats, SendRef,
};
use crate::retry::GiveUp;
use crate::transport::tcp::{TcpConfig, TcpTransport};
use crate::transport::{Link, LinkCommand, LinkEvent, Transport};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use spool::Spool;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// Errors building or operating a [`Node`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The transport could not start (e.g. the bind address is taken). Fix the address
    /// or wait for the previous owner to close.
    #[error("transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    /// A configuration value is invalid; the message says which.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The dedup table could not be opened (durable dedup IO). See the source.
    #[error("dedup: {0}")]
    Dedup(#[from] crate::dedup::DedupError),
    /// A receiver for this channel already exists on this node; keep one per channel.
    #[error("channel {0:?} already has a receiver")]
    ChannelTaken(ChannelId),
    /// The node has shut down.
    #[error("node has shut down")]
    Shutdown,
    /// The hint store could not be opened (see the source). Check the directory and its
    /// permissions.
    #[error("hint store: {0}")]
    Handoff(#[from] crate::handoff::HintError),
    /// The builder has no transport: call `bind` or `transport`.
    #[error("no transport configured: call NodeBuilder::bind or NodeBuilder::transport")]
    NoTransport,
    /// The node's driver task ended unexpectedly (it panicked): the node is dead and
    /// every call fails with this. The cause is also logged at error level and returned
    /// by [`Node::closed`]. Report it as a bug; build a new node to carry on.
    #[error(transparent)]
    Failed(NodeFailure),
    /// [`Node::sender`] to a peer this node does not know (never given to
    /// [`NodeBuilder::peer`] / [`Node::add_peer`], never connected). Add the peer
    /// first, or set [`NodeConfig::allow_dynamic_peers`].
    #[error("unknown peer {0}: add it with NodeBuilder::peer / Node::add_peer, or set NodeConfig::allow_dynamic_peers")]
    UnknownPeer(NodeId),
    /// [`Node::sender`] (or any sender) to this node's own id. A node has no
    /// connection to itself, so such messages could only fail at their deadline; call
    /// the handler directly, or run a second node.
    #[error("node {0} cannot send to itself")]
    SelfPeer(NodeId),
}

/// Why a node's driver stopped unexpectedly (carried by [`NodeError::Failed`] and
/// [`SendError::NodeFailed`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node driver failed: {cause}")]
pub struct NodeFailure {
    cause: Arc<str>,
}

impl NodeFailure {
    /// What ended the driver (the panic message).
    pub fn cause(&self) -> &str {
        &self.cause
    }
}

/// Why a send failed. Each variant says whether the receiver may still have the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No ack arrived before the message's deadline. The receiver may or may not have
    /// processed it (the ack may be what was lost): resend under the same
    /// [`IdKey`] to an effectively-once channel if it must happen exactly once.
    #[error("no ack before the deadline ({attempts} transmissions)")]
    Deadline {
        /// Transmissions made.
        attempts: u32,
    },
    /// The retry policy's maximum transmissions were made without an ack. Same
    /// caveat as [`SendError::Deadline`].
    #[error("no ack after {attempts} transmissions")]
    AttemptsExhausted {
        /// Transmissions made.
        attempts: u32,
    },
    /// The node shut down before the message settled. It may have been delivered.
    #[error("node shut down before the message settled")]
    Shutdown,
    /// The value could not be encoded by the sender's codec (its
    /// [`CodecError`](crate::codec::CodecError), as text); nothing was sent. Fix the
    /// value or its `Serialize` impl.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The payload is larger than the configured maximum; nothing was sent. Split it.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// Configured maximum ([`NodeConfig::max_payload`]).
        max: usize,
    },
    /// Retries ran out (or the target is down) and the hint store refused the message
    /// (target down longer than the max hint window, byte limits, IO error): it was not
    /// delivered and is not stored. Retry later or report the failure.
    #[error("hint store refused the message: {reason}")]
    HandoffRefused {
        /// What the store said.
        reason: String,
    },
    /// `try_send` found the stream's in-flight window full; nothing was sent. Wait
    /// (use `send`) or shed load.
    #[error("the stream's in-flight window ({window} messages) is full")]
    WindowFull {
        /// The window ([`ProtoConfig::max_in_flight`]).
        window: usize,
    },
    /// The channel to this peer already carries another guarantee; nothing was sent.
    #[error("channel already uses {existing:?}")]
    GuaranteeMismatch {
        /// The stream's guarantee.
        existing: Guarantee,
    },
    /// The failure detector holds the target Down and hinted handoff does not take the
    /// message ([`NodeConfig::fail_fast_when_down`]); nothing was sent. Retry once
    /// [`Node::health`] is Up again, or report the failure.
    #[error("peer {peer} is down")]
    PeerDown {
        /// The target.
        peer: NodeId,
    },
    /// The node's driver died ([`NodeError::Failed`]) before the message settled. It
    /// may have been delivered. Build a new node.
    #[error(transparent)]
    NodeFailed(NodeFailure),
    /// The receiver refused the message for good and said why (a receiver speaking
    /// protocol version 3): no receiver on its channel after its grace period, not
    /// authorized, a payload its typed receiver cannot decode, dead-lettered after its
    /// channel's delivery limit, or a stream the receiver has retired. The message was
    /// not processed by a handler (a dead-lettered or undecodable one is in the
    /// receiver's [`Node::dead_letters`]); sending it again unchanged gets the same
    /// answer.
    #[error("rejected by the receiver: {reason}")]
    Rejected {
        /// The receiver's reason.
        reason: crate::wire::RejectReason,
    },
}

/// How a message settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The receiver acknowledged it: for at-least-once and effectively-once, after its
    /// handler finished.
    Acked,
    /// At-most-once: it was handed to the transport once. Nothing more is known.
    Sent,
    /// The target was unreachable: the message is durably stored as a hint (per the
    /// store's fsync policy) and will be replayed, under its original ID, when the
    /// target is back — until the hint TTL, or the target is decommissioned.
    HandedOff,
}

/// Node-wide settings. Every default is written on its field.
///
/// Every config type implements serde's `Serialize` and `Deserialize`: a TOML or JSON
/// file names only what it changes, a misspelt key is an error, and durations are
/// strings such as `"200ms"`, `"5s"` or `"24h"` (see `examples/toml_config.rs`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Protocol tuning (window, acks, retries). Default [`ProtoConfig::default`].
    pub proto: ProtoConfig,
    /// Receiver-side dedup for effectively-once channels. Default
    /// [`DedupConfig::default`] (in memory) with `window` raised to 8192 seqs, twice
    /// the default `proto.max_in_flight`: a sequence window narrower than the senders'
    /// in-flight window refuses messages beyond it until the holes below fill.
    #[serde(deserialize_with = "crate::config_serde::node_dedup")]
    pub dedup: DedupConfig,
    /// Largest payload `send` accepts. Default 4 MiB.
    pub max_payload: usize,
    /// Failure detector (phi accrual, threshold 8). Default [`DetectorConfig::default`].
    pub detector: DetectorConfig,
    /// How often each known peer is pinged for the failure detector. Default 1 s.
    #[serde(with = "crate::config_serde::duration")]
    pub heartbeat_interval: Duration,
    /// Hinted handoff; `None` (default) disables it: a message whose retries run out
    /// fails its receipt.
    pub handoff: Option<HandoffConfig>,
    /// How long [`Node::shutdown`] waits for unacknowledged messages before spooling
    /// them to the hint store (or, without handoff, failing them). Default 5 s. Any
    /// value is accepted; `Duration::MAX` waits until every message has settled.
    #[serde(with = "crate::config_serde::duration")]
    pub shutdown_drain: Duration,
    /// Allow [`Node::sender`] to a peer this node does not know. Default `false`: a
    /// sender is only made for a peer given to [`NodeBuilder::peer`] or
    /// [`Node::add_peer`], a peer that has connected to this node, or (on an in-memory
    /// network) a node attached to the same network; any other id fails with
    /// [`NodeError::UnknownPeer`] instead of retrying into the void until the deadline.
    /// Set it when peers are discovered by the transport itself (a custom transport that
    /// dials by id).
    pub allow_dynamic_peers: bool,
    /// Without hinted handoff (or with `handoff.on_down` off), a send to a peer the
    /// failure detector holds Down fails at once with [`SendError::PeerDown`] instead of
    /// retrying until its deadline. Default `true`. Messages already in flight keep
    /// retrying until their deadline either way.
    pub fail_fast_when_down: bool,
    /// Who may send on which channel and who may relay other nodes' message ids.
    /// Default [`Authorization::default`](crate::proto::Authorization::default): any
    /// admitted peer on any channel, nobody relays for another node.
    pub authorization: crate::proto::Authorization,
    /// Dead letters kept for [`Node::dead_letters`] before the oldest is dropped
    /// (counted in [`Stats::dead_letters_dropped`], logged at warn). Default `10 000`;
    /// at most `2^24`.
    pub dead_letter_capacity: usize,
    /// Keep dead letters durably in this directory (a crc-checked log, fsynced before
    /// the sender is told): a restarted node finds the letters it had not handed out
    /// yet in [`Node::dead_letters`]. A letter leaves the log when it is handed to the
    /// application (one taken just before a crash may be seen again). Default `None`:
    /// in memory only, lost with the process.
    pub dead_letter_dir: Option<std::path::PathBuf>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            proto: ProtoConfig::default(),
            dedup: DedupConfig::default(),
            max_payload: 4 << 20,
            detector: DetectorConfig::default(),
            heartbeat_interval: Duration::from_secs(1),
            handoff: None,
            shutdown_drain: Duration::from_secs(5),
            allow_dynamic_peers: false,
            fail_fast_when_down: true,
            authorization: crate::proto::Authorization::default(),
            dead_letter_capacity: 10_000,
            dead_letter_dir: None,
        }
    }
}

impl NodeConfig {
    /// Largest accepted [`max_payload`](Self::max_payload): `u32::MAX` minus room for
    /// the data frame's header (a frame's length is a `u32` on the wire). Over TCP the
    /// bound is tighter: the payload and header must fit `TcpConfig::max_frame_len`.
    pub const MAX_PAYLOAD: usize = u32::MAX as usize - DATA_FRAME_OVERHEAD;
    /// Shortest accepted [`heartbeat_interval`](Self::heartbeat_interval): 1 ms.
    pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1);
    /// Longest accepted [`heartbeat_interval`](Self::heartbeat_interval): 1 hour (a
    /// slower heartbeat cannot tell a Down peer from a quiet one in any useful time).
    pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);
    /// Largest accepted `detector.max_samples`: 65 536 (the window grows to it).
    pub const MAX_DETECTOR_SAMPLES: usize = 1 << 16;

    /// Check every value; the error names the field and the bound it broke.
    ///
    /// `proto` as [`ProtoConfig::validate`]; `dedup` as `DedupConfig::validate`, and
    /// `dedup.window >= proto.max_in_flight`; `max_payload` in
    /// `1..=`[`MAX_PAYLOAD`](Self::MAX_PAYLOAD) (over TCP, also within the frame limit:
    /// checked by [`NodeBuilder::build`]); `heartbeat_interval`
    /// in `[1 ms, 1 h]`; `detector` as `DetectorConfig::validate`, with `max_samples
    /// <= 65536`; `handoff` as [`HandoffConfig::validate`]. `shutdown_drain` may be any
    /// duration.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::error::check::{count, duration, u};
        self.proto.validate()?;
        self.dedup.validate().map_err(crate::ConfigError::Dedup)?;
        if (self.dedup.window as usize) < self.proto.max_in_flight {
            return Err(crate::ConfigError::DedupWindowBelowInFlight {
                window: self.dedup.window,
                max_in_flight: self.proto.max_in_flight,
            });
        }
        // A message may still arrive up to the retry deadline plus the hint TTL (plus a
        // shutdown drain) after it was first sent; the dedup stream must outlive that,
        // or a late copy finds its stream retired (refused, `DedupError::StreamRetired`).
        let deadline = self.proto.retry.deadline.unwrap_or(Duration::ZERO);
        let hint_ttl = self
            .handoff
            .as_ref()
            .map_or(Duration::ZERO, |h| h.store.default_ttl);
        // A deadline or drain of `Duration::MAX` means "never": no retention outlives
        // it, and an idle stream's retention is then the documented limit.
        let needed = deadline
            .checked_add(hint_ttl)
            .and_then(|d| d.checked_add(self.shutdown_drain))
            .filter(|d| *d < Duration::from_secs(u64::MAX / 4));
        if let Some(needed) = needed.filter(|n| self.dedup.retention <= *n) {
            return Err(crate::ConfigError::RetentionTooShort {
                retention: self.dedup.retention,
                needed,
            });
        }
        count("max_payload", u(self.max_payload), 1, u(Self::MAX_PAYLOAD))?;
        duration(
            "heartbeat_interval",
            self.heartbeat_interval,
            Self::MIN_HEARTBEAT_INTERVAL,
            Self::MAX_HEARTBEAT_INTERVAL,
        )?;
        self.detector
            .validate()
            .map_err(crate::ConfigError::Detector)?;
        count(
            "detector.max_samples",
            u(self.detector.max_samples),
            1,
            u(Self::MAX_DETECTOR_SAMPLES),
        )?;
        if let Some(h) = &self.handoff {
            h.validate()?;
        }
        count(
            "dead_letter_capacity",
            u(self.dead_letter_capacity),
            0,
            1 << 24,
        )?;
        Ok(())
    }

    /// The largest `max_payload` that fits a TCP frame of `max_frame_len` body bytes.
    fn payload_limit(max_frame_len: usize) -> usize {
        max_frame_len.saturating_sub(DATA_FRAME_OVERHEAD)
    }
}

/// Bytes a data frame's body needs besides its payload, with room to spare: the
/// version and kind bytes and the bincode header (channel, seq, floors, the largest
/// message id, guarantee) come to under 80; see the test `data_frame_overhead_bound`.
const DATA_FRAME_OVERHEAD: usize = 128;

/// Options of one sending channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelOptions {
    /// The channel.
    pub channel: ChannelId,
    /// Its guarantee.
    pub guarantee: Guarantee,
    /// Per-message deadline overriding the retry policy's. Default `None` (policy's).
    #[serde(default, with = "crate::config_serde::option_duration")]
    pub deadline: Option<Duration>,
}

impl ChannelOptions {
    /// `channel` with `guarantee` and the policy's deadline.
    pub fn new(channel: ChannelId, guarantee: Guarantee) -> Self {
        ChannelOptions {
            channel,
            guarantee,
            deadline: None,
        }
    }
}

/// Two live incarnations claimed one `NodeId`: `refused` was turned away because
/// `live` holds a connection (see [`Node::identity_conflicts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdentityConflict {
    /// The incarnation whose connection stays.
    pub live: Origin,
    /// The incarnation that was refused.
    pub refused: Origin,
}

/// Options of a channel's receiver.
///
/// Default: unordered (each message is handed out as soon as it arrives), at most
/// [`ReceiverOptions::DEFAULT_MAX_DELIVERIES`] deliveries per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReceiverOptions {
    /// Deliver each stream's messages in send order. The contract, per stream (a
    /// stream is one sending node run on this channel):
    ///
    /// 1. first deliveries follow send order (a message the sender settled without
    ///    delivering — given up, or handed off — leaves a gap; a hint replayed later
    ///    travels on the replaying node's own stream);
    /// 2. a delivery that is nacked or dropped unfinished is redelivered before any
    ///    message of its stream that had not been handed out yet; messages already
    ///    handed out (up to the stream's credit) may be seen before it;
    /// 3. refusals before the application sees a message (no receiver, dedup
    ///    refusal, a duplicate of a message still being processed) rewind the stream,
    ///    so they keep rule 1.
    ///
    /// 4. a message refused for good (dead-lettered, undecodable) is settled: the
    ///    stream moves past it and it is never delivered again.
    ///
    /// Checked by the `ordered_contract_holds_through_every_refusal_path` simulation
    /// property, `tests/flow_control.rs` and (rule 4)
    /// `tests/rejections.rs::an_ordered_stream_moves_past_a_dead_letter_in_order`.
    pub ordered: bool,
    /// How many times one at-least-once or effectively-once message is handed to the
    /// application (its first delivery plus redeliveries after a nack or a dropped
    /// [`Delivery`]) before it goes to the dead letters ([`Node::dead_letters`])
    /// instead, and its sender's receipt fails with
    /// [`SendError::Rejected`]`{ reason: DeadLettered }` — as NATS's `MaxDeliver` and
    /// RabbitMQ's delivery limit do. `None`: redeliver until the sender's deadline.
    /// Default `Some(`[`DEFAULT_MAX_DELIVERIES`](Self::DEFAULT_MAX_DELIVERIES)`)`;
    /// `Some(0)` is refused.
    pub max_deliveries: Option<u32>,
    /// Typed receivers: reject a message whose sender's payload type differs from `T`
    /// ([`RejectReason::TypeMismatch`](crate::RejectReason::TypeMismatch)) instead of
    /// decoding it (the type check compares type names without module paths; see
    /// [`Sender::without_type_check`] for what it does and does not catch). Turn it off
    /// for a channel whose payload type is renamed or evolved compatibly. Raw
    /// receivers never check. Messages from raw senders, hint replays and senders
    /// speaking protocol 2 or older carry no type and are not checked. Default `true`.
    pub type_check: bool,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            ordered: false,
            max_deliveries: Some(Self::DEFAULT_MAX_DELIVERIES),
            type_check: true,
        }
    }
}

impl ReceiverOptions {
    /// Default delivery limit: 20 (RabbitMQ's default for quorum queues).
    pub const DEFAULT_MAX_DELIVERIES: u32 = 20;

    /// Deliver each stream's messages in send order (see [`ReceiverOptions::ordered`]).
    pub fn ordered() -> Self {
        ReceiverOptions {
            ordered: true,
            ..Self::default()
        }
    }

    /// Hand messages out as they arrive (the default).
    pub fn unordered() -> Self {
        ReceiverOptions::default()
    }

    /// The same options with the payload type check on or off (see
    /// [`ReceiverOptions::type_check`]).
    pub fn type_check(self, on: bool) -> Self {
        ReceiverOptions {
            type_check: on,
            ..self
        }
    }

    /// The same options with another delivery limit (see
    /// [`ReceiverOptions::max_deliveries`]).
    pub fn max_deliveries(self, limit: Option<u32>) -> Self {
        ReceiverOptions {
            max_deliveries: limit,
            ..self
        }
    }
}

/// Counters of a node (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Protocol counters: sent, retransmitted, acked, delivered, duplicates dropped,
    /// credit waits…
    pub proto: ProtoStats,
    /// Receiver dedup: streams live, retired and refused, key-table generations and
    /// refusals, memory, durable-log recovery.
    pub dedup: crate::dedup::DedupStats,
    /// Arrivals whose payload did not decode as the receiver's type (or left trailing
    /// bytes). They are not delivered and never acknowledged: they go to
    /// [`Node::dead_letters`] and the sender's receipt fails with
    /// [`SendError::Rejected`]`{ reason: Undecodable }` (a sender speaking protocol 2
    /// or older retries until its deadline), never `Ok(Acked)`.
    pub decode_failed: u64,
    /// Arrivals on a channel with no [`Receiver`] on this node. They are not
    /// acknowledged, so a receiver that starts late still gets them; after
    /// [`ProtoConfig::no_receiver_grace`] they are rejected
    /// ([`SendError::Rejected`]`{ reason: NoReceiver }` at the sender). Logged at warn
    /// at most once a second.
    pub no_receiver: u64,
    /// Hint store counters, when handoff is enabled.
    pub hints: Option<crate::handoff::HintStats>,
    /// Messages handed off to the hint store.
    pub handed_off: u64,
    /// Messages whose receipt failed because the hint store refused them (the store's
    /// own counters count every refused append, including retries).
    pub handoff_refused: u64,
    /// Dead letters dropped because [`Node::dead_letters`] was not drained and the
    /// queue was at [`NodeConfig::dead_letter_capacity`].
    pub dead_letters_dropped: u64,
    /// Dead letters that could not be written to [`NodeConfig::dead_letter_dir`] (kept
    /// in memory only; logged at warn).
    pub dead_letters_not_persisted: u64,
}

/// Builds a [`Node`].
#[derive(Debug)]
pub struct NodeBuilder {
    id: NodeId,
    tcp: Option<(SocketAddr, TcpConfig)>,
    transport: Option<Box<dyn TransportDebug>>,
    peers: Vec<(NodeId, SocketAddr)>,
    config: NodeConfig,
    seed: Option<u64>,
    trust: TcpTrust,
}

/// The builder's trust settings for the built-in TCP transport.
#[derive(Debug, Default)]
struct TcpTrust {
    allowed: Vec<NodeId>,
    accept_unknown_peers: Option<bool>,
    #[cfg(feature = "tls")]
    tls: Option<crate::transport::tls::TlsConfig>,
}

/// `Transport` plus `Debug`, so the builder can derive `Debug`.
trait TransportDebug: Transport + std::fmt::Debug {
    fn into_transport(self: Box<Self>) -> Box<dyn Transport>;
}
impl<T: Transport + std::fmt::Debug> TransportDebug for T {
    fn into_transport(self: Box<Self>) -> Box<dyn Transport> {
        self
    }
}

impl NodeBuilder {
    /// Listen on `addr` with the TCP transport and its default settings.
    pub fn bind(self, addr: SocketAddr) -> Self {
        self.tcp(addr, TcpConfig::default())
    }

    /// Listen on `addr` with the TCP transport configured by `config`.
    ///
    /// If the address is still held by a node that is shutting down (a restart on the
    /// same port), `build` retries the bind for up to [`BIND_RETRY`].
    pub fn tcp(mut self, addr: SocketAddr, config: TcpConfig) -> Self {
        self.tcp = Some((addr, config));
        self.transport = None;
        self
    }

    /// Use this transport (e.g. `mem` in tests, or your own).
    pub fn transport<T: Transport + std::fmt::Debug>(mut self, transport: T) -> Self {
        self.transport = Some(Box::new(transport));
        self.tcp = None;
        self
    }

    /// A peer reachable at `addr` (TCP). More can be added later with
    /// [`Node::add_peer`]. The failure detector watches it from the start: a peer that
    /// never answers is declared Down after a few heartbeats (and, with handoff, sends
    /// to it become hints) rather than only failing each message at its deadline.
    pub fn peer(mut self, id: NodeId, addr: SocketAddr) -> Self {
        self.peers.push((id, addr));
        self
    }

    /// Accept inbound connections from `id` without knowing its address (TCP without
    /// TLS; peers given to [`peer`](Self::peer) are accepted already).
    pub fn allow_peer(mut self, id: NodeId) -> Self {
        self.trust.allowed.push(id);
        self
    }

    /// Without TLS, accept inbound connections from any node id (default `false`: only
    /// configured or allowed peers). Overrides [`TcpConfig::accept_unknown_peers`].
    pub fn accept_unknown_peers(mut self, accept: bool) -> Self {
        self.trust.accept_unknown_peers = Some(accept);
        self
    }

    /// Run the TCP transport over mutual TLS 1.3 (see [`crate::transport::tls`]).
    /// Applies to the built-in transport ([`bind`](Self::bind), [`tcp`](Self::tcp));
    /// a transport given to [`transport`](Self::transport) is configured directly
    /// (`TcpTransport::with_tls`). The same holds for `allow_peer` and
    /// `accept_unknown_peers`.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::transport::tls::TlsConfig) -> Self {
        self.trust.tls = Some(tls);
        self
    }

    /// Node settings.
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Fix the seed of retransmission jitter (reproducible runs). Default: random.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validate, start the transport and the driver task. Must run inside a tokio
    /// runtime.
    ///
    /// Every configuration value is checked first ([`NodeConfig::validate`]; with TCP
    /// also `TcpConfig::validate`, `connect_timeout`, `handshake_timeout` and
    /// `backoff_min` of at least 1 ms, `channel_capacity` and `queue_bound` within
    /// tokio's channel limit, and `max_payload` against the frame limit): a bad value
    /// fails with [`NodeError::Config`] naming the field and the bound.
    pub async fn build(self) -> Result<Node, NodeError> {
        self.config.validate()?;
        if let Some((_, tcp)) = &self.tcp {
            check_tcp(&self.config, tcp)?;
        }
        let dials_by_id = self.transport.as_ref().is_some_and(|t| t.dials_by_id());
        let origin = Origin::new_random(self.id);
        let dedup = Arc::new(Dedup::open(self.config.dedup.clone())?);
        let mut tcp_stats = None;
        let link = match (self.transport, self.tcp) {
            (Some(t), _) => {
                let mut t = t.into_transport();
                t.batch_frames();
                t.start(origin)?
            }
            (None, Some((addr, cfg))) => {
                let (link, stats) = start_tcp(addr, cfg, &self.peers, self.trust, origin).await?;
                tcp_stats = Some(stats);
                link
            }
            (None, None) => return Err(NodeError::NoTransport),
        };
        let local_addr = link.local_addr;
        let watched: Vec<NodeId> = self.peers.iter().map(|(id, _)| *id).collect();
        for (id, addr) in self.peers {
            let _ = link
                .commands
                .send(LinkCommand::AddPeer { peer: id, addr })
                .await;
        }
        let seed = self.seed.unwrap_or_else(crate::rng::seed_from_entropy);
        let start = now();
        let spool = match self.config.handoff.clone() {
            Some(cfg) => Some(Spool::open(cfg, origin, start)?),
            None => None,
        };
        let mut detector =
            FailureDetector::new(self.config.detector).map_err(crate::ConfigError::Detector)?;
        for peer in &watched {
            detector.heartbeat(*peer, start); // watched from the start
        }
        let dead_letters = match &self.config.dead_letter_dir {
            Some(dir) => DeadLetterQueue::durable(self.config.dead_letter_capacity, dir)?,
            None => DeadLetterQueue::new(self.config.dead_letter_capacity),
        };
        let (health_tx, _) = broadcast::channel(256);
        let handoff_on_down = self.config.handoff.as_ref().is_some_and(|h| h.on_down);
        let mut endpoint = Endpoint::new(origin, self.config.proto.clone(), dedup, seed);
        endpoint.set_authorization(self.config.authorization.clone());
        let shared = Arc::new(Shared {
            windows: Mutex::new(FxHashMap::default()),
            receivers: Mutex::new(FxHashMap::default()),
            health: Mutex::new(watched.iter().map(|p| (*p, Health::Up)).collect()),
            health_tx: health_tx.clone(),
            conflict_tx: broadcast::channel(64).0,
            versions: Mutex::new(FxHashMap::default()),
            window: self.config.proto.max_in_flight,
            max_payload: self.config.max_payload,
            decode_failed: AtomicU64::new(0),
            decode_warned: Mutex::new(None),
            no_receiver: AtomicU64::new(0),
            no_receiver_warned: Mutex::new(None),
            dead_letters: Arc::new(dead_letters),
            known: Mutex::new(watched.iter().copied().collect()),
            any_peer: self.config.allow_dynamic_peers || dials_by_id,
            fail_fast_down: self.config.fail_fast_when_down && !handoff_on_down,
            state: watch::channel(NodeState::Running).0,
            #[cfg(feature = "metrics")]
            node: self.id,
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            endpoint,
            link,
            burst: Vec::with_capacity(BURST + 1),
            commands: cmd_rx,
            receipts: Default::default(),
            #[cfg(feature = "metrics")]
            metrics: metrics::NodeMetrics::new(self.id),
            spans: observe::StreamSpans::default(),
            receivers: FxHashMap::default(),
            shared: shared.clone(),
            completions: Arc::new(Completions {
                stack: completions::CompletionStack::new(),
                wake: tokio::sync::Notify::new(),
                commands: cmd_tx.clone(),
            }),
            completed: Vec::new(),
            outbox: FxHashMap::default(),
            detector,
            heartbeat_every: self.config.heartbeat_interval,
            next_heartbeat: later(start, self.config.heartbeat_interval),
            nonce: 0,
            health_tx,
            spool,
            handed_off: 0,
            handoff_refused: 0,
            shutdown_drain: self.config.shutdown_drain,
            draining_until: None,
            durable_acks: Vec::new(),
            clock: start,
        };
        let task = tokio::spawn(supervise(driver, shared.clone(), origin));
        Ok(Node {
            origin,
            tcp_stats,
            local_addr,
            commands: cmd_tx,
            shared,
            task: Mutex::new(Some(task)),
        })
    }
}

/// How long [`NodeBuilder::build`] keeps retrying a TCP bind whose address is in use.
pub const BIND_RETRY: Duration = Duration::from_secs(2);

/// The TCP settings, and `max_payload` against the TCP frame limit (a payload that
/// cannot fit a frame would be accepted by `send` and never delivered).
fn check_tcp(config: &NodeConfig, tcp: &TcpConfig) -> Result<(), crate::ConfigError> {
    use crate::error::check::{count, duration, u};
    tcp.validate().map_err(crate::ConfigError::Tcp)?;
    // Shorter timers make a node that cannot connect on a loaded host, or redials in a
    // busy loop.
    let ms = Duration::from_millis(1);
    for (field, d) in [
        ("tcp.connect_timeout", tcp.connect_timeout),
        ("tcp.handshake_timeout", tcp.handshake_timeout),
        ("tcp.backoff_min", tcp.backoff_min),
    ] {
        duration(field, d, ms, Duration::MAX)?;
    }
    // tokio's channels panic above this many slots.
    let chan = u(Semaphore::MAX_PERMITS);
    count("tcp.channel_capacity", u(tcp.channel_capacity), 1, chan)?;
    count("tcp.queue_bound", u(tcp.queue_bound), 1, chan)?;
    let max = NodeConfig::payload_limit(tcp.max_frame_len);
    if config.max_payload > max {
        return Err(crate::ConfigError::PayloadAboveFrameLimit {
            max_payload: config.max_payload,
            max_frame_len: tcp.max_frame_len,
            max,
        });
    }
    Ok(())
}

use crate::retry::later;

/// Runs the driver and makes its end visible: a panic is logged at error level and
/// recorded as the node's [`NodeFailure`] *before* the driver's state is dropped, so
/// every receipt, window wait and later call it fails sees [`NodeError::Failed`] /
/// [`SendError::NodeFailed`] rather than a plain shutdown.
async fn supervise(driver: Driver, shared: Arc<Shared>, origin: Origin) {
    let span = tracing::info_span!("node", node = %origin);
    let mut run = Box::pin(tracing::Instrument::instrument(driver.run(), span));
    match (CatchUnwind(&mut run)).await {
        Ok(()) => {
            shared.state.send_replace(NodeState::Closed);
        }
        Err(panic) => {
            let cause: Arc<str> = if let Some(s) = panic.downcast_ref::<&str>() {
                (*s).into()
            } else if let Some(s) = panic.downcast_ref::<String>() {
                s.as_str().into()
            } else {
                "driver panicked (non-string payload)".into()
            };
            tracing::error!(node = %origin, %cause, "node driver panicked: the node is dead, every call now fails with NodeError::Failed");
            shared
                .state
                .send_replace(NodeState::Failed(NodeFailure { cause }));
            shared.close_windows();
        }
    }
    // Only now drop the driver (its receipts and receiver queues).
    drop(run);
}

/// Polls a future, turning a panic inside it into `Err(payload)`.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

async fn start_tcp(
    addr: SocketAddr,
    mut cfg: TcpConfig,
    peers: &[(NodeId, SocketAddr)],
    trust: TcpTrust,
    origin: Origin,
) -> Result<(Link, Arc<crate::transport::tcp::TcpStats>), NodeError> {
    let give_up = tokio::time::Instant::now() + BIND_RETRY;
    if let Some(accept) = trust.accept_unknown_peers {
        cfg.accept_unknown_peers = accept;
    }
    loop {
        let mut transport =
            TcpTransport::new(addr, cfg.clone()).map_err(crate::ConfigError::Tcp)?;
        // Known before the first inbound connection can arrive (the node's AddPeer
        // commands follow, and also make the transport dial them).
        for (id, addr) in peers {
            transport = transport.with_peer(*id, *addr);
        }
        for id in &trust.allowed {
            transport = transport.allow_peer(*id);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &trust.tls {
            transport = transport.with_tls(tls.clone());
        }
        let stats = transport.stats();
        transport.batch_frames();
        match Box::new(transport).start(origin).map(|link| (link, stats)) {
            Err(crate::transport::TransportError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// One ackwire node: sends and receives messages over its transport.
///
/// ```no_run
/// use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let b = Node::builder(NodeId(2)).bind("127.0.0.1:0".parse()?).build().await?;
/// let a = Node::builder(NodeId(1))
///     .bind("127.0.0.1:0".parse()?)
///     .peer(NodeId(2), b.local_addr().unwrap())
///     .build()
///     .await?;
/// let mut inbox = b.receiver::<String>(ChannelId(7), false)?;
/// let out = a.sender::<String>(NodeId(2), ChannelOptions::new(ChannelId(7), Guarantee::EffectivelyOnce))?;
/// let receipt = out.send(&"hello".to_string()).await?;
/// let delivery = inbox.recv().await.unwrap();
/// assert_eq!(delivery.message(), "hello");
/// delivery.ack(); // the ack goes back only now, after processing
/// receipt.await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Node {
    origin: Origin,
    tcp_stats: Option<Arc<crate::transport::tcp::TcpStats>>,
    local_addr: Option<SocketAddr>,
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// Start building node `id`.
    pub fn builder(id: NodeId) -> NodeBuilder {
        NodeBuilder {
            id,
            tcp: None,
            transport: None,
            peers: Vec::new(),
            config: NodeConfig::default(),
            seed: None,
            trust: TcpTrust::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.origin.node
    }

    /// This run of the node (id + incarnation).
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Counters of the built-in TCP transport (connections, refusals by reason —
    /// strangers, duplicate node ids, TLS failures…); `None` with another transport.
    pub fn tcp_stats(&self) -> Option<crate::transport::tcp::TcpStatsSnapshot> {
        self.tcp_stats.as_ref().map(|s| s.snapshot())
    }

    /// The address the transport listens on, if any.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Learn where `peer` is (TCP); the failure detector watches it from now on (see
    /// [`NodeBuilder::peer`]).
    /// This node's own id is ignored (with a warning): a node does not connect to
    /// itself.
    pub fn add_peer(&self, peer: NodeId, addr: SocketAddr) {
        if peer == self.id() {
            tracing::warn!(%peer, %addr, "add_peer with this node's own id ignored");
            return;
        }
        self.shared
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer);
        let _ = self.commands.send(Command::AddPeer { peer, addr });
    }

    /// A typed sender to `peer` on a channel; messages are serialized with bincode's
    /// serde support (the [`Bincode`] codec; [`Node::sender_with_codec`] picks another).
    ///
    /// Fails with [`NodeError::UnknownPeer`] for a peer this node does not know (see
    /// [`NodeConfig::allow_dynamic_peers`]), [`NodeError::SelfPeer`] for this node's
    /// own id, [`NodeError::Config`] for a zero
    /// `options.deadline`, and [`NodeError::Shutdown`] / [`NodeError::Failed`] once the
    /// node has stopped.
    pub fn sender<T: Serialize>(
        &self,
        peer: NodeId,
        options: ChannelOptions,
    ) -> Result<Sender<T>, NodeError> {
        self.sender_with_codec(peer, options, Bincode)
    }

    /// A typed sender to `peer` on a channel whose messages `codec` encodes (see
    /// [`crate::codec`]); the channel's receiver must use the same codec. Otherwise as
    /// [`Node::sender`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "postcard")]
    /// # fn demo(node: ackwire::Node) -> Result<(), ackwire::NodeError> {
    /// use ackwire::codec::Postcard;
    /// use ackwire::{ChannelId, ChannelOptions, Guarantee, NodeId, ReceiverOptions};
    /// let out = node.sender_with_codec::<Vec<u32>, _>(
    ///     NodeId(2),
    ///     ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
    ///     Postcard,
    /// )?;
    /// // and on node 2:
    /// let inbox = node.receiver_with_codec::<Vec<u32>, _>(ChannelId(1), ReceiverOptions::default(), Postcard)?;
    /// # Ok(()) }
    /// ```
    pub fn sender_with_codec<T, C: Encode<T>>(
        &self,
        peer: NodeId,
        options: ChannelOptions,
        codec: C,
    ) -> Result<Sender<T, C>, NodeError> {
        let mut raw = self.raw_sender(peer, options)?;
        raw.schema = crate::codec::fingerprint::<T, C>();
        Ok(Sender {
            raw,
            codec,
            _t: PhantomData,
        })
    }

    /// A sender of raw bytes to `peer` on a channel.
    pub fn raw_sender(
        &self,
        peer: NodeId,
        options: ChannelOptions,
    ) -> Result<RawSender, NodeError> {
        self.check_running()?;
        if let Some(d) = options.deadline {
            crate::error::check::duration("deadline", d, Duration::from_nanos(1), Duration::MAX)?;
        }
        if peer == self.id() {
            return Err(NodeError::SelfPeer(peer));
        }
        if !self.shared.is_known(peer) {
            return Err(NodeError::UnknownPeer(peer));
        }
        let window = self.shared.window_for(peer, options.channel);
        Ok(RawSender {
            peer,
            options,
            window,
            window_size: self.shared.window,
            commands: self.commands.clone(),
            max_payload: self.shared.max_payload,
            shared: self.shared.clone(),
            schema: 0,
        })
    }

    /// The receiver of a channel, with [`ReceiverOptions`]. One receiver per channel
    /// and node.
    pub fn receiver_with<T: DeserializeOwned>(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
    ) -> Result<Receiver<T>, NodeError> {
        self.receiver_with_codec(channel, options, Bincode)
    }

    /// The receiver of a channel whose messages `codec` decodes (see [`crate::codec`]),
    /// with [`ReceiverOptions`]: a typed sender with another codec (or type) is rejected
    /// with [`RejectReason::TypeMismatch`](crate::RejectReason::TypeMismatch) unless the
    /// type check is off. One receiver per channel and node.
    pub fn receiver_with_codec<T, C: Decode<T>>(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
        codec: C,
    ) -> Result<Receiver<T, C>, NodeError> {
        let schema = if options.type_check {
            crate::codec::fingerprint::<T, C>()
        } else {
            0
        };
        Ok(Receiver {
            raw: self.register(channel, options, schema)?,
            codec,
            _t: PhantomData,
        })
    }

    /// The node's dead letters: received messages that reached their channel's
    /// delivery limit ([`ReceiverOptions::max_deliveries`]) or did not decode as their
    /// typed receiver's type. See [`DeadLetters`].
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters {
            queue: self.shared.dead_letters.clone(),
        }
    }

    /// `Err` once the node has failed or shut down.
    fn check_running(&self) -> Result<(), NodeError> {
        if let Some(f) = self.shared.failure() {
            return Err(NodeError::Failed(f));
        }
        if self.commands.is_closed() {
            return Err(NodeError::Shutdown);
        }
        Ok(())
    }

    /// Resolves when the node has stopped: `Ok(())` after [`Node::shutdown`] (or once
    /// the last handle is gone), [`NodeError::Failed`] with the cause if its driver
    /// died unexpectedly. Await it next to your service's other tasks to notice a dead
    /// node at once.
    pub async fn closed(&self) -> Result<(), NodeError> {
        let mut rx = self.shared.state.subscribe();
        let state = match rx.wait_for(|s| !matches!(s, NodeState::Running)).await {
            Ok(s) => s.clone(),
            Err(_) => NodeState::Closed,
        };
        match state {
            NodeState::Failed(f) => Err(NodeError::Failed(f)),
            _ => Ok(()),
        }
    }

    /// The receiver of a channel; `ordered` delivers each stream's messages in send
    /// order (shorthand for [`Node::receiver_with`]; see [`ReceiverOptions::ordered`]
    /// for exactly what that promises). One receiver per channel and node.
    pub fn receiver<T: DeserializeOwned>(
        &self,
        channel: ChannelId,
        ordered: bool,
    ) -> Result<Receiver<T>, NodeError> {
        self.receiver_with(
            channel,
            ReceiverOptions {
                ordered,
                ..ReceiverOptions::default()
            },
        )
    }

    /// The receiver of raw payloads of a channel (default [`ReceiverOptions`] but
    /// `ordered`).
    pub fn raw_receiver(
        &self,
        channel: ChannelId,
        ordered: bool,
    ) -> Result<RawReceiver, NodeError> {
        self.raw_receiver_with(
            channel,
            ReceiverOptions {
                ordered,
                ..ReceiverOptions::default()
            },
        )
    }

    /// The receiver of raw payloads of a channel, with [`ReceiverOptions`].
    pub fn raw_receiver_with(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
    ) -> Result<RawReceiver, NodeError> {
        self.register(channel, options, 0)
    }

    /// Register the receiver of `channel`; `schema` is the payload type fingerprint a
    /// typed receiver checks (0: none).
    fn register(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
        schema: u32,
    ) -> Result<RawReceiver, NodeError> {
        self.check_running()?;
        if let Some(limit) = options.max_deliveries {
            crate::error::check::count("max_deliveries", u64::from(limit), 1, u64::from(u32::MAX))?;
        }
        // Unbounded: what may be queued is bounded by the credit granted to each
        // inbound stream (`ProtoConfig::stream_credit`), never by refusing arrivals.
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut taken = self
                .shared
                .receivers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let live = taken
                .get(&channel)
                .and_then(mpsc::WeakUnboundedSender::upgrade)
                .is_some_and(|t| !t.is_closed());
            if live {
                return Err(NodeError::ChannelTaken(channel));
            }
            // Weak: the driver's sender alone decides when the receiver sees the end.
            taken.insert(channel, tx.downgrade());
        }
        self.commands
            .send(Command::Register {
                channel,
                options,
                schema,
                tx,
            })
            .map_err(|_| self.shared.closed_error())?;
        Ok(RawReceiver {
            rx,
            shared: self.shared.clone(),
        })
    }

    /// The failure detector's view of `peer` (`None` until it has been heard from).
    pub fn health(&self, peer: NodeId) -> Option<Health> {
        self.shared.health(peer)
    }

    /// The protocol version negotiated with `peer` on its current (or last)
    /// connection; `None` before the first one. See [`crate::wire::VersionRange`].
    pub fn protocol_version(&self, peer: NodeId) -> Option<u16> {
        let v = self
            .shared
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        v.get(&peer).copied()
    }

    /// Identity conflicts: another process claimed a peer's `NodeId` while that peer's
    /// connection was alive, and was refused (the live connection stays; see
    /// `TcpConfig::stale_after`). Each refused connection is one event (the transport
    /// also counts them in `rejected_duplicate_node` and warns, rate-limited). A
    /// subscriber more than 64 events behind skips the oldest.
    pub fn identity_conflicts(&self) -> broadcast::Receiver<IdentityConflict> {
        self.shared.conflict_tx.subscribe()
    }

    /// A stream of the failure detector's transitions (Up / Suspect / Down). A slow
    /// subscriber that falls more than 256 changes behind skips the oldest.
    pub fn health_events(&self) -> broadcast::Receiver<HealthChange> {
        self.shared.health_tx.subscribe()
    }

    /// The target is gone for good: drop its hints (counted) and stop watching it.
    /// Returns the number of hints dropped.
    pub async fn decommission(&self, peer: NodeId) -> Result<u64, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Decommission { peer, reply: tx })
            .map_err(|_| self.shared.closed_error())?;
        rx.await.map_err(|_| self.shared.closed_error())?
    }

    /// Counters.
    pub async fn stats(&self) -> Result<Stats, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats(tx))
            .map_err(|_| self.shared.closed_error())?;
        let mut stats = rx.await.map_err(|_| self.shared.closed_error())?;
        stats.decode_failed = self.shared.decode_failed.load(Ordering::Relaxed);
        stats.no_receiver = self.shared.no_receiver.load(Ordering::Relaxed);
        Ok(stats)
    }

    /// Stop gracefully: refuse new sends ([`SendError::Shutdown`]), wait up to
    /// [`NodeConfig::shutdown_drain`] for unacknowledged messages, then spool what is
    /// left to the hint store (receipts resolve [`Outcome::HandedOff`]; without handoff
    /// they fail with [`SendError::Shutdown`]), flush the hint log, close the transport,
    /// and wait for the driver to finish. A node restarted on the same hint directory
    /// replays the spooled messages. Dropping a `Node` instead stops it at once.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Drain);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// Sends `T` values on one channel to one peer, encoded by the codec `C` ([`Bincode`]
/// unless made by [`Node::sender_with_codec`]). Cheap to clone.
#[derive(Debug)]
pub struct Sender<T, C = Bincode> {
    raw: RawSender,
    codec: C,
    _t: PhantomData<fn(&T)>,
}

impl<T, C: Clone> Clone for Sender<T, C> {
    fn clone(&self) -> Self {
        Sender {
            raw: self.raw.clone(),
            codec: self.codec.clone(),
            _t: PhantomData,
        }
    }
}

impl<T, C> Sender<T, C> {
    /// The same sender without the payload type check: its messages carry no type
    /// fingerprint, so typed receivers decode them whatever `T` is.
    ///
    /// By default a typed sender sends the fingerprint of `T`'s name without module
    /// paths (`Payment`, `Vec<Order>`, `(String, u64)`) with every message (protocol
    /// version 3), and a typed receiver whose type has another name rejects the message
    /// with [`RejectReason::TypeMismatch`](crate::RejectReason::TypeMismatch) instead of
    /// decoding it: a `String` sent to a `u64` receiver is caught, while two services
    /// that each define their own `Payment` agree. Use this (or
    /// [`ReceiverOptions::type_check`]) when the two ends name compatible types
    /// differently.
    pub fn without_type_check(mut self) -> Self {
        self.raw.schema = 0;
        self
    }

    /// The codec that encodes this sender's messages.
    pub fn codec(&self) -> &C {
        &self.codec
    }
}

impl<T, C: Encode<T>> Sender<T, C> {
    /// Send `value`. Waits while the stream's window is full; returns a [`Receipt`] that
    /// resolves when the message settles.
    pub async fn send(&self, value: &T) -> Result<Receipt, SendError> {
        let bytes = self.encode(value)?;
        self.raw.send(bytes).await
    }

    /// Send `value` if the stream's window has room now; otherwise fail at once with
    /// [`SendError::WindowFull`] instead of waiting.
    pub fn try_send(&self, value: &T) -> Result<Receipt, SendError> {
        let bytes = self.encode(value)?;
        self.raw.try_send(bytes)
    }

    /// Send `value` under an application idempotency key: on an effectively-once
    /// channel, any two sends with the same key are processed once within the
    /// receiver's dedup horizon.
    pub async fn send_with_key(&self, value: &T, key: IdKey) -> Result<Receipt, SendError> {
        let bytes = self.encode(value)?;
        self.raw.send_with_key(bytes, key).await
    }

    /// `value` as a payload, or the send's error.
    fn encode(&self, value: &T) -> Result<Bytes, SendError> {
        encode_with(&self.codec, value)
    }
}

/// `value` encoded by `codec`, as a payload (`Vec` → `Bytes` moves, no copy).
fn encode_with<T: ?Sized, C: Encode<T>>(codec: &C, value: &T) -> Result<Bytes, SendError> {
    codec
        .encode(value)
        .map(Bytes::from)
        .map_err(|e| SendError::Encode(e.to_string()))
}

/// Sends raw payloads on one channel to one peer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RawSender {
    peer: NodeId,
    options: ChannelOptions,
    /// Payload type fingerprint sent with each message (0: unchecked).
    schema: u32,
    window: Arc<Semaphore>,
    window_size: usize,
    commands: mpsc::UnboundedSender<Command>,
    max_payload: usize,
    shared: Arc<Shared>,
}

impl RawSender {
    /// Send `payload`; see [`Sender::send`].
    pub async fn send(&self, payload: Bytes) -> Result<Receipt, SendError> {
        self.submit(payload, None).await
    }

    /// Send `payload` under an idempotency key; see [`Sender::send_with_key`].
    pub async fn send_with_key(&self, payload: Bytes, key: IdKey) -> Result<Receipt, SendError> {
        self.submit(payload, Some(key)).await
    }

    /// Send `payload` if the window has room now; see [`Sender::try_send`].
    pub fn try_send(&self, payload: Bytes) -> Result<Receipt, SendError> {
        self.check(&payload)?;
        let permit = self.window.try_acquire().map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => self.shared.send_closed_error(),
            tokio::sync::TryAcquireError::NoPermits => SendError::WindowFull {
                window: self.window_size,
            },
        })?;
        permit.forget();
        self.enqueue(payload, None)
    }

    /// This sender with the payload type fingerprint `schema` in every data frame
    /// (what a typed sender sets; see [`crate::codec::fingerprint`]).
    pub(crate) fn with_schema(mut self, schema: u32) -> Self {
        self.schema = schema;
        self
    }

    /// The target node.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Count a window wait (feature `metrics`) unless `n` slots are free now.
    #[cfg(feature = "metrics")]
    fn note_window_wait(&self, n: usize) {
        if self.window.available_permits() < n {
            metrics::window_wait(self.shared.node, self.peer, self.options.channel);
        }
    }

    /// Checks that fail a send before it takes a window slot: the payload's size and,
    /// with [`NodeConfig::fail_fast_when_down`], the target's health.
    fn check(&self, payload: &Bytes) -> Result<(), SendError> {
        if self.shared.fail_fast_down && self.shared.health(self.peer) == Some(Health::Down) {
            return Err(SendError::PeerDown { peer: self.peer });
        }
        if payload.len() > self.max_payload {
            return Err(SendError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        Ok(())
    }

    fn enqueue(&self, payload: Bytes, key: Option<IdKey>) -> Result<Receipt, SendError> {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Send {
            peer: self.peer,
            options: self.options,
            payload,
            key,
            schema: self.schema,
            reply: tx,
        };
        if self.commands.send(cmd).is_err() {
            self.window.add_permits(1);
            return Err(self.shared.send_closed_error());
        }
        Ok(Receipt {
            rx,
            shared: self.shared.clone(),
        })
    }

    async fn submit(&self, payload: Bytes, key: Option<IdKey>) -> Result<Receipt, SendError> {
        self.check(&payload)?;
        #[cfg(feature = "metrics")]
        self.note_window_wait(1);
        let permit = self
            .window
            .acquire()
            .await
            .map_err(|_| self.shared.send_closed_error())?;
        // The driver gives the slot back (add_permits) when the window slides.
        permit.forget();
        self.enqueue(payload, key)
    }
}

/// Resolves when a sent message settles: `Ok(Outcome)` once acknowledged (or, for
/// at-most-once, transmitted), or the [`SendError`] that ended it.
#[derive(Debug)]
#[must_use = "a receipt tells whether the message was acknowledged"]
pub struct Receipt {
    rx: oneshot::Receiver<Result<Outcome, SendError>>,
    shared: Arc<Shared>,
}

impl Future for Receipt {
    type Output = Result<Outcome, SendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        Pin::new(&mut this.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(this.shared.send_closed_error())))
    }
}

/// Yields the messages of one channel, decoded as `T` by the codec `C` ([`Bincode`]
/// unless made by [`Node::receiver_with_codec`]).
#[derive(Debug)]
pub struct Receiver<T, C = Bincode> {
    raw: RawReceiver,
    codec: C,
    _t: PhantomData<fn() -> T>,
}

impl<T, C> Receiver<T, C> {
    /// The codec that decodes this receiver's messages.
    pub fn codec(&self) -> &C {
        &self.codec
    }
}

impl<T, C: Decode<T>> Receiver<T, C> {
    /// The next message; `None` once the node has shut down.
    ///
    /// A payload that does not decode as `T`, or decodes with bytes left over (a value
    /// of another type), is never handed out and never acknowledged: it is counted in
    /// [`Stats::decode_failed`], logged at warn (at most once a second per node, with
    /// the running count), put in [`Node::dead_letters`], and the sender's receipt
    /// fails with [`SendError::Rejected`]`{ reason: Undecodable }` instead of reporting
    /// `Ok(Acked)` for a message nobody processed.
    pub async fn recv(&mut self) -> Option<Delivery<T>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll for the next message (what [`Receiver::recv`] and the
    /// [`futures_core::Stream`] impl use).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery<T>>> {
        loop {
            let Some(d) = std::task::ready!(self.raw.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            if let Some(d) = self.typed(d) {
                return Poll::Ready(Some(d));
            }
        }
    }

    /// `d` decoded as `T`, or `None` after handing an undecodable payload to the dead
    /// letters (and its sender a rejection).
    fn typed(&self, d: Delivery<Bytes>) -> Option<Delivery<T>> {
        match self.codec.decode(&d.message) {
            Ok(value) => Some(d.map(value)),
            Err(error) => {
                self.raw
                    .shared
                    .decode_failed(d.id, d.channel, &error.to_string());
                let mut handle = d.handle;
                if let Some((delivery, back)) = handle.completion.take() {
                    let _ = back.commands.send(Command::Undecodable {
                        delivery,
                        payload: d.message,
                    });
                }
                None
            }
        }
    }
}

/// A receiver is a stream of deliveries (same rules as [`Receiver::recv`]): use it with
/// `StreamExt` combinators. It ends when the node shuts down.
impl<T, C: Decode<T>> futures_core::Stream for Receiver<T, C> {
    type Item = Delivery<T>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// A raw receiver is a stream of deliveries; it ends when the node shuts down.
impl futures_core::Stream for RawReceiver {
    type Item = Delivery<Bytes>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// Yields the raw payloads of one channel.
#[derive(Debug)]
pub struct RawReceiver {
    rx: mpsc::UnboundedReceiver<Delivery<Bytes>>,
    shared: Arc<Shared>,
}

impl RawReceiver {
    /// The next message; `None` once the node has shut down.
    pub async fn recv(&mut self) -> Option<Delivery<Bytes>> {
        self.rx.recv().await
    }

    /// Poll for the next message.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery<Bytes>>> {
        self.rx.poll_recv(cx)
    }
}

/// A message handed to the application. Finish it with [`Delivery::ack`] after
/// processing, or [`Delivery::nack`] to have it redelivered; dropping it unfinished is a
/// nack. (At-most-once messages need neither.)
#[derive(Debug)]
pub struct Delivery<T> {
    message: T,
    id: MessageId,
    from: Origin,
    channel: ChannelId,
    guarantee: Guarantee,
    handle: DeliveryHandle,
}

impl<T> Delivery<T> {
    /// The message.
    pub fn message(&self) -> &T {
        &self.message
    }

    /// Split into the message and the handle that must still ack or nack it.
    pub fn into_parts(self) -> (T, DeliveryHandle) {
        (self.message, self.handle)
    }

    /// Its dedup identity.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The sending node run.
    pub fn from(&self) -> Origin {
        self.from
    }

    /// Its channel.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The guarantee it was sent with.
    pub fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    /// Processed: acknowledge to the sender (and record in the dedup table).
    pub fn ack(self) {
        self.handle.ack();
    }

    /// Not processed: the sender redelivers it soon.
    pub fn nack(self) {
        self.handle.nack();
    }

    /// Processed: acknowledge, and resolve once the acknowledgement is durable — the
    /// dedup record is fsynced (effectively-once with [`crate::dedup::DurableDedup`]:
    /// a receiver killed after this returns never processes the message again) and
    /// the ack frame is handed to the transport. [`Delivery::ack`] is the same without
    /// the wait: a receiver killed between `ack()` and the group commit (one batch of
    /// completions, typically well under a millisecond) may process it again after its
    /// restart.
    ///
    /// Without durable dedup, or for at-least-once, it resolves once the ack is handed
    /// to the transport. The ack itself can still be lost on the wire; the sender then
    /// retransmits and the persisted record answers it as a duplicate.
    ///
    /// # Errors
    /// [`AckError::NotPersisted`] when the dedup log could not write the record (the
    /// ack was still sent); [`AckError::NodeStopped`] when the node stopped first.
    pub async fn ack_durable(self) -> Result<(), AckError> {
        self.handle.ack_durable().await
    }

    fn map<U>(self, value: U) -> Delivery<U> {
        Delivery {
            message: value,
            id: self.id,
            from: self.from,
            channel: self.channel,
            guarantee: self.guarantee,
            handle: self.handle,
        }
    }
}

/// Finishes a delivery (see [`Delivery::into_parts`]). Dropping it unfinished is a
/// nack.
#[derive(Debug)]
pub struct DeliveryHandle {
    completion: Option<(DeliveryRef, Arc<Completions>)>,
}

impl DeliveryHandle {
    /// Processed: acknowledge.
    pub fn ack(mut self) {
        self.finish(Completion::Ack);
    }

    /// Not processed: redeliver.
    pub fn nack(mut self) {
        self.finish(Completion::Nack);
    }

    /// Processed: acknowledge, and resolve once the acknowledgement is durable (see
    /// [`Delivery::ack_durable`]).
    pub async fn ack_durable(mut self) -> Result<(), AckError> {
        let Some((delivery, back)) = self.completion.take() else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        back.commands
            .send(Command::Complete {
                delivery,
                how: Completion::Ack,
                done: Some(tx),
            })
            .map_err(|_| AckError::NodeStopped)?;
        rx.await.unwrap_or(Err(AckError::NodeStopped))
    }

    fn finish(&mut self, how: Completion) {
        if let Some((delivery, back)) = self.completion.take() {
            if back.stack.push((delivery, how)) {
                // First of a burst: one wake-up for the driver, which takes them all.
                back.wake.notify_one();
            }
        }
    }
}

/// The way back from deliveries to the driver: plain completions through the lock-free
/// stack (one wake-up per burst), the rare ones that carry more through the command
/// channel.
#[derive(Debug)]
struct Completions {
    stack: completions::CompletionStack<(DeliveryRef, Completion)>,
    wake: tokio::sync::Notify,
    commands: mpsc::UnboundedSender<Command>,
}

/// Where a receipt waits for its outcome.
type ReceiptReply = oneshot::Sender<Result<Outcome, SendError>>;

/// Where an `ack_durable` caller waits for its answer.
type AckReply = oneshot::Sender<Result<(), AckError>>;

/// Why [`Delivery::ack_durable`] could not confirm a durable acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The durable dedup log could not write or fsync the completion (disk full, IO
    /// error; counted in `ProtoStats::dedup_persist_errors` and logged). The ack was
    /// still sent: after a restart a resend of the message may be processed again.
    #[error("the dedup record of the acknowledged message was not persisted")]
    NotPersisted,
    /// The node stopped before the acknowledgement was durable; it may or may not be.
    #[error("the node stopped before the acknowledgement was durable")]
    NodeStopped,
}

impl Drop for DeliveryHandle {
    fn drop(&mut self) {
        self.finish(Completion::Nack);
    }
}

#[derive(Debug)]
struct Shared {
    windows: Mutex<FxHashMap<(NodeId, ChannelId), Arc<Semaphore>>>,
    receivers: Mutex<FxHashMap<ChannelId, mpsc::WeakUnboundedSender<Delivery<Bytes>>>>,
    health: Mutex<FxHashMap<NodeId, Health>>,
    health_tx: broadcast::Sender<HealthChange>,
    conflict_tx: broadcast::Sender<IdentityConflict>,
    /// Protocol version of each peer's current (or last) connection.
    versions: Mutex<FxHashMap<NodeId, u16>>,
    window: usize,
    max_payload: usize,
    decode_failed: AtomicU64,
    /// When the last decode failure was logged at warn (rate limit).
    decode_warned: Mutex<Option<std::time::Instant>>,
    no_receiver: AtomicU64,
    /// When the last arrival without a receiver was logged at warn (rate limit).
    no_receiver_warned: Mutex<Option<std::time::Instant>>,
    dead_letters: Arc<DeadLetterQueue>,
    /// Peers given to the builder or `add_peer` (peers heard from are in `health`).
    known: Mutex<std::collections::HashSet<NodeId>>,
    /// Any id is a peer: `allow_dynamic_peers`, or a transport that dials by id.
    any_peer: bool,
    /// `fail_fast_when_down` and no handoff on Down.
    fail_fast_down: bool,
    /// Running, closed, or failed (with the cause); see [`supervise`].
    state: watch::Sender<NodeState>,
    #[cfg(feature = "metrics")]
    node: NodeId,
}

/// Lifecycle of a node's driver.
#[derive(Debug, Clone)]
enum NodeState {
    Running,
    Closed,
    Failed(NodeFailure),
}

impl Shared {
    fn failure(&self) -> Option<NodeFailure> {
        match &*self.state.borrow() {
            NodeState::Failed(f) => Some(f.clone()),
            _ => None,
        }
    }

    /// The error of a call that found the node stopped.
    fn closed_error(&self) -> NodeError {
        self.failure()
            .map_or(NodeError::Shutdown, NodeError::Failed)
    }

    /// The error of a send that found the node stopped.
    fn send_closed_error(&self) -> SendError {
        self.failure()
            .map_or(SendError::Shutdown, SendError::NodeFailed)
    }

    fn health(&self, peer: NodeId) -> Option<Health> {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.get(&peer).copied()
    }

    fn is_known(&self, peer: NodeId) -> bool {
        self.any_peer
            || self.health(peer).is_some()
            || self
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&peer)
    }

    /// Count an undecodable payload; warn at most once a second.
    fn decode_failed(&self, id: MessageId, channel: ChannelId, error: &str) {
        let total = self.decode_failed.fetch_add(1, Ordering::Relaxed) + 1;
        if warn_due(&self.decode_warned) {
            tracing::warn!(%id, channel = channel.0, %error, total, "payload does not decode as the receiver's type; dead-lettered and rejected (not acked)");
        } else {
            tracing::debug!(%id, channel = channel.0, %error, "payload does not decode; refused");
        }
    }

    /// Count an arrival on a channel nobody receives; warn at most once a second.
    fn no_receiver(&self, from: NodeId, channel: ChannelId) {
        let total = self.no_receiver.fetch_add(1, Ordering::Relaxed) + 1;
        if warn_due(&self.no_receiver_warned) {
            tracing::warn!(channel = channel.0, %from, total, "message on a channel with no receiver on this node; not acked (rejected after the no-receiver grace period)");
        } else {
            tracing::debug!(channel = channel.0, %from, "no receiver; not acked");
        }
    }

    /// Wake every sender waiting for window space with `SendError::Shutdown`, and make
    /// later sends fail the same way.
    fn close_windows(&self) {
        let w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for sem in w.values() {
            sem.close();
        }
    }

    fn window_for(&self, peer: NodeId, channel: ChannelId) -> Arc<Semaphore> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w.entry((peer, channel))
            .or_insert_with(|| Arc::new(Semaphore::new(self.window)))
            .clone()
    }
}

/// Rate limit of a warn line: `true` (and the time recorded) at most once a second.
fn warn_due(last: &Mutex<Option<std::time::Instant>>) -> bool {
    let now = std::time::Instant::now();
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
        *last = Some(now);
        true
    } else {
        false
    }
}

#[derive(Debug)]
enum Command {
    Send {
        peer: NodeId,
        options: ChannelOptions,
        payload: Bytes,
        key: Option<IdKey>,
        schema: u32,
        reply: oneshot::Sender<Result<Outcome, SendError>>,
    },
    /// Several messages of one sender, each holding one window permit.
    SendBatch {
        peer: NodeId,
        options: ChannelOptions,
        schema: u32,
        items: Vec<(Bytes, Option<IdKey>, ReceiptReply)>,
    },
    Complete {
        delivery: DeliveryRef,
        how: Completion,
        /// `ack_durable`: resolved once the completion is persisted and its ack sent.
        done: Option<oneshot::Sender<Result<(), AckError>>>,
    },
    Register {
        channel: ChannelId,
        options: ReceiverOptions,
        schema: u32,
        tx: mpsc::UnboundedSender<Delivery<Bytes>>,
    },
    /// A delivery the typed receiver could not decode: to the dead letters, and
    /// rejected to its sender.
    Undecodable {
        delivery: DeliveryRef,
        payload: Bytes,
    },
    AddPeer {
        peer: NodeId,
        addr: SocketAddr,
    },
    Stats(oneshot::Sender<Stats>),
    /// Graceful shutdown: stop taking sends, drain, spool, stop.
    Drain,
    Decommission {
        peer: NodeId,
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    Shutdown,
}

struct Driver {
    endpoint: Endpoint,
    link: Link,
    /// Link events of the current wake-up (reused buffer).
    burst: Vec<LinkEvent>,
    commands: mpsc::UnboundedReceiver<Command>,
    receipts: rustc_hash::FxHashMap<SendRef, (Guarantee, PendingReceipt)>,
    #[cfg(feature = "metrics")]
    metrics: metrics::NodeMetrics,
    /// The `stream` span of each stream with traced per-message events.
    spans: observe::StreamSpans,
    receivers: FxHashMap<ChannelId, mpsc::UnboundedSender<Delivery<Bytes>>>,
    shared: Arc<Shared>,
    /// Handed to deliveries so their completions come back here.
    completions: Arc<Completions>,
    /// Completions drained from `completions`, reused.
    completed: Vec<(DeliveryRef, Completion)>,
    outbox: FxHashMap<NodeId, Vec<crate::wire::Frame>>,
    detector: FailureDetector,
    heartbeat_every: Duration,
    next_heartbeat: std::time::Instant,
    nonce: u64,
    health_tx: broadcast::Sender<HealthChange>,
    spool: Option<Spool>,
    handed_off: u64,
    handoff_refused: u64,
    shutdown_drain: Duration,
    draining_until: Option<std::time::Instant>,
    /// `ack_durable` waiters: the delivery, the persist-error count before it was
    /// completed, and where to answer.
    durable_acks: Vec<(DeliveryRef, u64, AckReply)>,
    /// The driver's notion of now: read once per wake-up.
    clock: std::time::Instant,
}

/// Work items taken per wake-up before frames are flushed, so bursts batch.
const BURST: usize = 256;

/// Frames a link event carries (counted against [`BURST`]; other events count one).
fn frames_in(ev: &LinkEvent) -> usize {
    match ev {
        LinkEvent::Frames { frames, .. } => frames.len(),
        _ => 1,
    }
}

impl Driver {
    async fn run(mut self) {
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        loop {
            let deadline = self.next_deadline();
            if let Some(d) = deadline {
                sleep.as_mut().reset(tokio::time::Instant::from_std(d));
            }
            tokio::select! {
                biased;
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    // One clock read per burst, not per item (it showed in profiles).
                    self.clock = now();
                    if !self.on_command(cmd) { break; }
                    for _ in 0..BURST {
                        match self.commands.try_recv() {
                            Ok(cmd) => if !self.on_command(cmd) { self.stop().await; return; },
                            Err(_) => break,
                        }
                    }
                }
                _ = self.completions.wake.notified() => {
                    self.clock = now();
                }
                ev = self.link.events.recv() => {
                    let Some(ev) = ev else { break };
                    self.clock = now();
                    // Take the burst first and hint its frames to the endpoint, so the
                    // dedup lookups of a burst of keyed messages overlap their cache
                    // misses instead of waiting for one after another.
                    let mut burst = std::mem::take(&mut self.burst);
                    let mut frames = frames_in(&ev);
                    burst.push(ev);
                    while frames <= BURST {
                        match self.link.events.try_recv() {
                            Ok(ev) => {
                                frames += frames_in(&ev);
                                burst.push(ev);
                            }
                            Err(_) => break,
                        }
                    }
                    for ev in &burst {
                        match ev {
                            LinkEvent::Frame { frame, .. } => self.endpoint.prefetch(frame),
                            LinkEvent::Frames { frames, .. } => {
                                frames.iter().for_each(|f| self.endpoint.prefetch(f))
                            }
                            _ => {}
                        }
                    }
                    for ev in burst.drain(..) {
                        self.on_link(ev);
                    }
                    self.burst = burst;
                }
                _ = &mut sleep, if deadline.is_some() => {}
            }
            let now = now();
            self.clock = now;
            self.take_completions();
            if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
                // Acks that already arrived settle their messages before any timer
                // calls them lost: after a stall (a busy machine, a long burst of
                // sends above) the queue can hold acks older than the expired timers,
                // and handling the timers first retransmits what the peer already has.
                for _ in 0..16 * BURST {
                    match self.link.events.try_recv() {
                        Ok(ev) => self.on_link(ev),
                        Err(_) => break,
                    }
                }
                self.take_completions();
                self.endpoint.handle_timeout(now);
            }
            self.dispatch();
            self.housekeeping(now);
            if !self.flush(now).await {
                break;
            }
            self.resolve_durable_acks();
            if let Some(until) = self.draining_until {
                if self.receipts.is_empty() || now >= until {
                    self.spool_all(now);
                    // A clean end of this run: receivers may retire its streams.
                    if self.endpoint.finish_streams() > 0 {
                        let _ = self.flush(now).await;
                    }
                    break;
                }
            }
        }
        self.stop().await;
    }

    /// Shutdown: every message still unacknowledged goes to the hint store.
    fn spool_all(&mut self, now: std::time::Instant) {
        if self.spool.is_none() {
            return;
        }
        let peers: std::collections::HashSet<NodeId> =
            self.receipts.keys().map(|r| r.peer).collect();
        for peer in peers {
            self.hand_off_to_down(peer, None, now);
        }
        tracing::info!(
            left = self.receipts.len(),
            "spooled unacknowledged messages"
        );
    }

    fn on_command(&mut self, cmd: Command) -> bool {
        let now = self.clock;
        match cmd {
            Command::Send {
                peer,
                options,
                payload,
                key,
                schema,
                reply,
            } => self.send_one(peer, options, schema, payload, key, reply),
            Command::SendBatch {
                peer,
                options,
                schema,
                items,
            } => {
                for (payload, key, reply) in items {
                    self.send_one(peer, options, schema, payload, key, reply);
                }
            }
            Command::Complete {
                delivery,
                how,
                done,
            } => {
                let errors = done
                    .is_some()
                    .then(|| self.endpoint.stats().dedup_persist_errors);
                self.complete(now, delivery, how);
                if let (Some(done), Some(errors)) = (done, errors) {
                    self.durable_acks.push((delivery, errors, done));
                }
            }
            Command::Register {
                channel,
                options,
                schema,
                tx,
            } => {
                self.receivers.insert(channel, tx);
                self.endpoint.accept_channel_with(
                    channel,
                    crate::proto::Accept::new(options.ordered, options.max_deliveries)
                        .schema(schema),
                );
            }
            Command::Undecodable { delivery, payload } => {
                if delivery.guarantee != Guarantee::AtMostOnce {
                    self.dead_letter(delivery, payload, DeadLetterReason::Undecodable);
                }
                self.endpoint.complete(
                    now,
                    delivery,
                    Completion::Reject(crate::wire::RejectReason::Undecodable),
                );
            }
            Command::AddPeer { peer, addr } => {
                if self.detector.state(peer).is_none() {
                    self.watch(peer, now);
                }
                let _ = self
                    .link
                    .commands
                    .try_send(LinkCommand::AddPeer { peer, addr });
            }
            Command::Stats(reply) => {
                let _ = reply.send(Stats {
                    proto: self.endpoint.stats(),
                    dedup: self.endpoint.dedup_stats(),
                    decode_failed: 0,
                    no_receiver: 0,
                    hints: self.spool.as_ref().map(Spool::stats),
                    handed_off: self.handed_off,
                    handoff_refused: self.handoff_refused,
                    dead_letters_dropped: self.shared.dead_letters.dropped(),
                    dead_letters_not_persisted: self.shared.dead_letters.not_persisted(),
                });
            }
            Command::Decommission { peer, reply } => {
                self.detector.remove(peer);
                self.spans.forget(peer);
                let res = match &mut self.spool {
                    Some(spool) => spool
                        .decommission(peer, &mut self.endpoint)
                        .map_err(NodeError::from),
                    None => Ok(0),
                };
                if let Ok(n) = res {
                    tracing::info!(%peer, dropped = n, "peer decommissioned; its hints dropped");
                }
                let _ = reply.send(res);
            }
            Command::Shutdown => return false,
            Command::Drain => {
                if self.draining_until.is_none() {
                    tracing::info!(unsettled = self.receipts.len(), "draining before shutdown");
                    self.draining_until = Some(later(now, self.shutdown_drain));
                    self.shared.close_windows();
                }
            }
        }
        true
    }

    fn on_link(&mut self, ev: LinkEvent) {
        let now = self.clock;
        match ev {
            LinkEvent::Up { origin, version } => {
                tracing::debug!(peer = %origin, version, "peer up");
                self.spans.peer_up(origin);
                self.shared
                    .versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(origin.node, version);
                self.watch(origin.node, now);
                self.endpoint.handle_peer_up(now, origin, version);
            }
            LinkEvent::Down { peer } => {
                tracing::debug!(%peer, "peer down");
                self.endpoint.handle_peer_down(now, peer);
            }
            LinkEvent::Conflict { live, refused } => {
                let _ = self
                    .shared
                    .conflict_tx
                    .send(IdentityConflict { live, refused });
            }
            LinkEvent::Frame { peer, frame } => self.on_frame(now, peer, frame),
            LinkEvent::Frames { peer, frames } => {
                for frame in frames {
                    self.on_frame(now, peer, frame);
                }
            }
        }
    }

    fn on_frame(&mut self, now: std::time::Instant, peer: NodeId, frame: crate::wire::Frame) {
        // Visibility only (the endpoint ignores it): count and warn.
        let mut data = None;
        if let crate::wire::Frame::Data(d) = &frame {
            if !self.receivers.contains_key(&d.channel) {
                self.shared.no_receiver(peer, d.channel);
            }
            data = Some((d.channel, d.seq, d.id));
        }
        if let crate::wire::Frame::Nack(n) = &frame {
            self.spans.outbound(peer, n.channel, || {
                tracing::trace!(target: MESSAGE_TARGET, %peer, channel = n.channel.0, seq = n.seq, "nack received")
            });
        }
        let duplicates = self.endpoint.duplicates_dropped();
        self.endpoint.handle_frame(now, peer, frame);
        let duplicates = self.endpoint.duplicates_dropped() - duplicates;
        if let (Some((channel, seq, id)), 1..) = (data, duplicates) {
            self.spans.inbound_from(peer, channel, || {
                tracing::trace!(target: MESSAGE_TARGET, id = ?id, from = %peer, channel = channel.0, seq, "duplicate dropped")
            });
            #[cfg(feature = "metrics")]
            self.metrics.duplicates(peer, channel, duplicates);
        }
    }

    fn dispatch(&mut self) {
        let now = self.clock;
        while let Some(ev) = self.endpoint.poll_event() {
            match ev {
                Event::Deliver { delivery, payload } => {
                    let Some(tx) = self.receivers.get(&delivery.channel) else {
                        self.endpoint.unaccept_channel(delivery.channel);
                        self.endpoint.complete(now, delivery, Completion::Refuse);
                        continue;
                    };
                    self.spans.inbound(delivery.origin, delivery.channel, || {
                        tracing::trace!(target: MESSAGE_TARGET, id = %delivery.id, from = %delivery.origin, channel = delivery.channel.0, seq = delivery.seq, "deliver")
                    });
                    #[cfg(feature = "metrics")]
                    self.metrics
                        .delivered(delivery.origin.node, delivery.channel);
                    // At-most-once deliveries are finished too: that frees credit.
                    let completion = Some((delivery, self.completions.clone()));
                    let d = Delivery {
                        message: payload,
                        id: delivery.id,
                        from: delivery.origin,
                        channel: delivery.channel,
                        guarantee: delivery.guarantee,
                        handle: DeliveryHandle { completion },
                    };
                    if let Err(mpsc::error::SendError(mut d)) = tx.send(d) {
                        // The receiver is gone: refuse (the stream rewinds; the sender
                        // retries until a receiver appears, or is told there is none
                        // after the grace period).
                        d.handle.completion.take();
                        self.receivers.remove(&delivery.channel);
                        self.endpoint.unaccept_channel(delivery.channel);
                        self.endpoint.complete(now, delivery, Completion::Refuse);
                    }
                }
                Event::Settled(r) => {
                    if let Some(spool) = &mut self.spool {
                        if spool.on_settled(r, &mut self.endpoint) {
                            self.spans.outbound(r.peer, r.channel, || {
                                tracing::trace!(target: MESSAGE_TARGET, peer = %r.peer, channel = r.channel.0, seq = r.seq, "replayed hint acked")
                            });
                            #[cfg(feature = "metrics")]
                            self.metrics.hint_replayed(r);
                            continue;
                        }
                    }
                    if let Some((g, reply)) = self.receipts.remove(&r) {
                        self.spans.outbound(r.peer, r.channel, || {
                            tracing::trace!(target: MESSAGE_TARGET, peer = %r.peer, channel = r.channel.0, seq = r.seq, "acked")
                        });
                        #[cfg(feature = "metrics")]
                        self.metrics
                            .settled(r, &reply.tracked, g != Guarantee::AtMostOnce, now);
                        let outcome = if g == Guarantee::AtMostOnce {
                            Outcome::Sent
                        } else {
                            Outcome::Acked
                        };
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Event::GaveUp {
                    send,
                    reason,
                    attempts,
                    payload,
                    id,
                } => {
                    if let Some(spool) = &mut self.spool {
                        if spool.on_gave_up(send) {
                            continue; // a replay: it stays in the store
                        }
                    }
                    let Some((g, reply)) = self.receipts.remove(&send) else {
                        continue;
                    };
                    self.spans.outbound(send.peer, send.channel, || {
                        tracing::trace!(target: MESSAGE_TARGET, %id, peer = %send.peer, channel = send.channel.0, seq = send.seq, ?reason, attempts, "gave up")
                    });
                    #[cfg(feature = "metrics")]
                    self.metrics.gave_up(send);
                    let hand_off = self.spool.as_ref().is_some_and(|s| s.config().on_give_up);
                    let res = if hand_off {
                        self.store_hint(send, id, g, payload, now)
                    } else {
                        Err(match reason {
                            GiveUp::MaxAttempts => SendError::AttemptsExhausted { attempts },
                            _ => SendError::Deadline { attempts },
                        })
                    };
                    match &res {
                        Ok(_) => self.endpoint.hint_stored(send, id),
                        Err(SendError::HandoffRefused { .. }) => self.handoff_refused += 1,
                        Err(_) => {}
                    }
                    let _ = reply.send(res);
                }
                Event::Rejected { send, reason } => {
                    self.spans.outbound(send.peer, send.channel, || {
                        tracing::trace!(target: MESSAGE_TARGET, peer = %send.peer, channel = send.channel.0, seq = send.seq, %reason, "rejected")
                    });
                    #[cfg(feature = "metrics")]
                    self.metrics.rejected(send, reason);
                    if let Some(spool) = &mut self.spool {
                        if spool.on_rejected(send, reason, &mut self.endpoint) {
                            continue;
                        }
                    }
                    if let Some((_, reply)) = self.receipts.remove(&send) {
                        tracing::debug!(peer = %send.peer, channel = send.channel.0, seq = send.seq, %reason, "message rejected by its receiver");
                        let _ = reply.send(Err(SendError::Rejected { reason }));
                    }
                }
                Event::DeadLetter {
                    delivery,
                    payload,
                    deliveries,
                } => {
                    self.dead_letters_at(
                        delivery,
                        payload,
                        deliveries,
                        DeadLetterReason::MaxDeliveries,
                    );
                }
                Event::WindowOpened { peer, channel, n } => {
                    self.shared
                        .window_for(peer, channel)
                        .add_permits(n as usize);
                }
                Event::Heard(peer) => self.detector.observe(peer, now),
                Event::HeartbeatAck(peer) => self.detector.heartbeat(peer, now),
            }
        }
    }

    /// Apply every completion handlers pushed since the last call, oldest first.
    fn take_completions(&mut self) {
        let now = self.clock;
        let mut done = std::mem::take(&mut self.completed);
        self.completions.stack.drain_into(&mut done);
        for (delivery, how) in done.drain(..) {
            self.complete(now, delivery, how);
        }
        self.completed = done;
    }

    /// Finish a delivery in the endpoint (traced; the duplicates it settles counted).
    fn complete(&mut self, now: std::time::Instant, delivery: DeliveryRef, how: Completion) {
        self.spans.inbound(delivery.origin, delivery.channel, || {
            tracing::trace!(target: MESSAGE_TARGET, id = %delivery.id, from = %delivery.origin, channel = delivery.channel.0, seq = delivery.seq, ?how, "completed")
        });
        #[cfg(feature = "metrics")]
        let duplicates = self.endpoint.duplicates_dropped();
        self.endpoint.complete(now, delivery, how);
        #[cfg(feature = "metrics")]
        self.metrics.duplicates(
            delivery.origin.node,
            delivery.channel,
            self.endpoint.duplicates_dropped() - duplicates,
        );
    }

    /// One message from a sender (alone or in a batch); it holds one window permit.
    fn send_one(
        &mut self,
        peer: NodeId,
        options: ChannelOptions,
        schema: u32,
        payload: Bytes,
        key: Option<IdKey>,
        reply: oneshot::Sender<Result<Outcome, SendError>>,
    ) {
        let now = self.clock;
        if self.draining_until.is_some() {
            self.shared.window_for(peer, options.channel).add_permits(1);
            let _ = reply.send(Err(SendError::Shutdown));
            return;
        }
        let msg = Outgoing {
            peer,
            channel: options.channel,
            guarantee: options.guarantee,
            payload,
            id: key.map(MessageId::Key),
            deadline: options.deadline,
            schema,
        };
        match self.endpoint.send(now, msg) {
            Ok(r) => {
                let origin = self.endpoint.origin();
                self.spans.outbound(peer, r.channel, || {
                    tracing::trace!(target: MESSAGE_TARGET, id = %observe::sent_id(origin, r, key), %peer, channel = r.channel.0, seq = r.seq, "send")
                });
                #[cfg(feature = "metrics")]
                let reply = PendingReceipt::new(reply, self.metrics.sent(r, now));
                #[cfg(not(feature = "metrics"))]
                let reply = PendingReceipt::new(reply);
                self.receipts.insert(r, (options.guarantee, reply));
                if options.guarantee != Guarantee::AtMostOnce
                    && self.detector.state(peer) == Some(Health::Down)
                    && self.spool.as_ref().is_some_and(|s| s.config().on_down)
                {
                    self.hand_off_to_down(peer, Some(r), now);
                }
            }
            Err(crate::proto::StreamError::GuaranteeMismatch { existing, .. }) => {
                self.shared.window_for(peer, options.channel).add_permits(1);
                let _ = reply.send(Err(SendError::GuaranteeMismatch { existing }));
            }
        }
    }

    /// Resolve `ack_durable` waiters whose completion is fsynced (the endpoint syncs
    /// before it produces acks) and whose ack has been handed to the transport.
    fn resolve_durable_acks(&mut self) {
        if self.durable_acks.is_empty() {
            return;
        }
        let errors = self.endpoint.stats().dedup_persist_errors;
        for (delivery, before, done) in std::mem::take(&mut self.durable_acks) {
            if self.endpoint.ack_owed(&delivery) {
                self.durable_acks.push((delivery, before, done));
                continue;
            }
            let _ = done.send(if errors > before {
                Err(AckError::NotPersisted)
            } else {
                Ok(())
            });
        }
    }

    /// Keep a delivery the application could not take as a dead letter.
    fn dead_letter(&mut self, delivery: DeliveryRef, payload: Bytes, reason: DeadLetterReason) {
        let deliveries = self.endpoint.deliveries(&delivery);
        self.dead_letters_at(delivery, payload, deliveries, reason);
    }

    fn dead_letters_at(
        &mut self,
        delivery: DeliveryRef,
        payload: Bytes,
        deliveries: u32,
        reason: DeadLetterReason,
    ) {
        self.spans.inbound(delivery.origin, delivery.channel, || {
            tracing::trace!(target: MESSAGE_TARGET, id = %delivery.id, from = %delivery.origin, channel = delivery.channel.0, seq = delivery.seq, deliveries, ?reason, "dead-lettered")
        });
        #[cfg(feature = "metrics")]
        self.metrics
            .dead_letter(delivery.origin.node, delivery.channel, reason);
        self.shared.dead_letters.push(DeadLetter {
            message: payload,
            id: delivery.id,
            from: delivery.origin,
            channel: delivery.channel,
            deliveries,
            reason,
        });
    }

    async fn flush(&mut self, now: std::time::Instant) -> bool {
        while let Some((peer, frame)) = self.endpoint.poll_transmit(now) {
            self.outbox.entry(peer).or_default().push(frame);
        }
        if tracing::enabled!(target: MESSAGE_TARGET, tracing::Level::TRACE) {
            for (peer, frames) in &self.outbox {
                let origin = self.endpoint.origin();
                observe::trace_transmits(
                    origin,
                    *peer,
                    frames.iter(),
                    &mut self.receipts,
                    &mut self.spans,
                );
            }
        }
        // Acks produced by transmits' events are dispatched next round.
        self.dispatch();
        for (peer, frames) in self.outbox.iter_mut() {
            if frames.is_empty() {
                continue;
            }
            let frames = std::mem::take(frames);
            if self
                .link
                .commands
                .send(LinkCommand::Send {
                    peer: *peer,
                    frames,
                })
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        let now = self.clock;
        [
            self.endpoint.poll_timeout(),
            Some(self.next_heartbeat),
            self.detector.poll_timeout(),
            self.spool.as_ref().and_then(|s| s.next_deadline(now)),
            self.draining_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Start (or keep) watching `peer` in the failure detector; a peer seen for the
    /// first time is published as Up.
    fn watch(&mut self, peer: NodeId, now: std::time::Instant) {
        let new = self.detector.state(peer).is_none();
        self.detector.heartbeat(peer, now);
        if new {
            let mut h = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
            h.entry(peer).or_insert(Health::Up);
        }
    }

    /// Heartbeats, failure detection, handoff and replay.
    fn housekeeping(&mut self, now: std::time::Instant) {
        #[cfg(feature = "metrics")]
        self.metrics.sync(&self.endpoint, now, false);
        if now >= self.next_heartbeat {
            self.next_heartbeat = later(now, self.heartbeat_every);
            let peers: Vec<NodeId> = self.detector.peers().map(|(p, _)| p).collect();
            for peer in peers {
                self.nonce += 1;
                self.endpoint.ping(peer, self.nonce);
            }
        }
        for change in self.detector.poll(now) {
            if change.to == Health::Down {
                // One line per transition: rate-limited by the detector itself.
                tracing::warn!(peer = %change.peer, from = ?change.from, "peer is Down (no heartbeat)");
            } else {
                tracing::info!(peer = %change.peer, from = ?change.from, to = ?change.to, "peer health changed");
            }
            {
                let mut h = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
                h.insert(change.peer, change.to);
            }
            let _ = self.health_tx.send(change);
            if change.to == Health::Down && self.spool.as_ref().is_some_and(|s| s.config().on_down)
            {
                self.hand_off_to_down(change.peer, None, now);
            }
        }
        if let Some(spool) = &mut self.spool {
            spool.tick(&mut self.endpoint, now);
            if spool.has_replay_work() {
                let (detector, endpoint) = (&self.detector, &mut self.endpoint);
                let ready: Vec<NodeId> = detector
                    .peers()
                    .filter(|(p, h)| *h != Health::Down && endpoint.is_up(*p))
                    .map(|(p, _)| p)
                    .collect();
                let shared = &self.shared;
                spool.replay(
                    endpoint,
                    |peer, channel| shared.window_for(peer, channel),
                    |p| ready.contains(&p),
                    now,
                );
            }
        }
        self.dispatch();
    }

    /// Move unacknowledged messages to `peer` (or only `only`) into the hint store:
    /// their receipts resolve as handed off. A message the store refuses stays in
    /// flight and keeps retrying.
    fn hand_off_to_down(&mut self, peer: NodeId, only: Option<SendRef>, now: std::time::Instant) {
        for (send, payload, id) in self.endpoint.in_flight_to(peer) {
            if only.is_some_and(|o| o != send) {
                continue;
            }
            let Some(&(g, _)) = self.receipts.get(&send) else {
                continue; // a replayed hint: already stored
            };
            match self.store_hint(send, id, g, payload, now) {
                Ok(outcome) => {
                    if self.endpoint.hand_off(send) {
                        if let Some((_, reply)) = self.receipts.remove(&send) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                }
                // A new send the store refuses (e.g. target down longer than the max
                // hint window) fails now, with the store's reason, rather than at its
                // deadline.
                Err(e) if only.is_some() => {
                    if self.endpoint.abandon(send) {
                        self.handoff_refused += 1;
                        if let Some((_, reply)) = self.receipts.remove(&send) {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                // Already in flight when the target went down: keep retrying; its
                // deadline decides.
                Err(_) => {}
            }
        }
    }

    fn store_hint(
        &mut self,
        send: SendRef,
        id: MessageId,
        g: Guarantee,
        payload: Bytes,
        now: std::time::Instant,
    ) -> Result<Outcome, SendError> {
        let down_for = self
            .detector
            .down_since(send.peer)
            .map(|t| now.saturating_duration_since(t));
        let Some(spool) = &mut self.spool else {
            return Err(SendError::HandoffRefused {
                reason: "hinted handoff is not enabled".into(),
            });
        };
        match spool.store(send, id, g, payload, down_for, now) {
            Ok(()) => {
                self.spans.outbound(send.peer, send.channel, || {
                    tracing::trace!(target: MESSAGE_TARGET, %id, peer = %send.peer, channel = send.channel.0, seq = send.seq, "handed off to the hint store")
                });
                #[cfg(feature = "metrics")]
                self.metrics.hint_stored(send);
                self.handed_off += 1;
                Ok(Outcome::HandedOff)
            }
            Err(e) => {
                tracing::warn!(peer = %send.peer, %id, error = %e, "hint refused");
                Err(SendError::HandoffRefused {
                    reason: e.to_string(),
                })
            }
        }
    }

    async fn stop(&mut self) {
        #[cfg(feature = "metrics")]
        self.metrics.sync(&self.endpoint, self.clock, true);
        if let Some(spool) = &mut self.spool {
            spool.sync();
        }
        let _ = self.link.commands.send(LinkCommand::Shutdown).await;
        for (_, (_, reply)) in self.receipts.drain() {
            let _ = reply.send(Err(SendError::Shutdown));
        }
        self.receivers.clear();
        self.shared.dead_letters.close();
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `DATA_FRAME_OVERHEAD` covers the largest data frame header the codec writes, so
    /// a payload of `max_payload` always fits the TCP frame limit it was checked against.
    #[test]
    fn data_frame_overhead_bound() {
        let worst = crate::wire::Frame::Data(crate::wire::Data {
            channel: ChannelId(u32::MAX),
            seq: u64::MAX,
            floor: u64::MAX,
            id_floor: u64::MAX,
            id: Some(MessageId::Seq {
                origin: Origin {
                    node: NodeId(u64::MAX),
                    incarnation: u64::MAX,
                },
                channel: ChannelId(u32::MAX),
                seq: u64::MAX,
            }),
            guarantee: Guarantee::EffectivelyOnce,
            payload: Bytes::new(),
            schema: 0,
        });
        let mut buf = bytes::BytesMut::new();
        crate::wire::encode(&worst, &mut buf).unwrap();
        let header = buf.len() - crate::wire::FRAME_PREFIX_LEN;
        assert!(header <= DATA_FRAME_OVERHEAD, "{header}");
        let key = crate::wire::Frame::Data(crate::wire::Data {
            id: Some(MessageId::Key(IdKey(u128::MAX))),
            ..match worst {
                crate::wire::Frame::Data(d) => d,
                _ => unreachable!(),
            }
        });
        let mut buf = bytes::BytesMut::new();
        crate::wire::encode(&key, &mut buf).unwrap();
        assert!(buf.len() - crate::wire::FRAME_PREFIX_LEN <= DATA_FRAME_OVERHEAD);
    }

    #[test]
    fn default_config_is_valid_and_bounds_are_named() {
        assert!(NodeConfig::default().validate().is_ok());
        let mut c = NodeConfig::default();
        c.proto.max_in_flight = 0;
        let e = c.validate().unwrap_err();
        assert!(matches!(
            e,
            crate::ConfigError::TooSmall {
                field: "proto.max_in_flight",
                value: 0,
                min: 1
            }
        ));
        assert!(e.to_string().contains("proto.max_in_flight"), "{e}");
        let mut c = NodeConfig::default();
        c.dedup.window = 16;
        assert!(matches!(
            c.validate(),
            Err(crate::ConfigError::DedupWindowBelowInFlight { window: 16, .. })
        ));
    }
}
