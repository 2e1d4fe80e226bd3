//! The node's settings and counters: [`NodeConfig`] and its validation (with the TCP
//! checks [`NodeBuilder::build`] adds), [`ChannelOptions`], [`ReceiverOptions`] and
//! the [`Stats`] snapshot.
//!
//! Owns plain data, its documented defaults and its bounds; must not start anything or
//! read the clock (the builder applies a config, the driver fills the counters).

use super::HandoffConfig;
#[cfg(doc)]
use super::{Delivery, Node, NodeBuilder, NodeError, Receiver, SendError, Sender};
use crate::dedup::DedupConfig;
use crate::detector::DetectorConfig;
use crate::id::{ChannelId, Guarantee};
use crate::proto::{ProtoConfig, ProtoStats};
use crate::transport::tcp::TcpConfig;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Node-wide settings. Every default is written on its field.
///
/// Every config type (all but the TLS material `TlsConfig`, whose files
/// [`TlsFiles`](crate::transport::tls::TlsFiles) names, and the `mem` transport's
/// `FaultPlan`) implements serde's `Serialize` and `Deserialize`: a TOML or JSON
/// file names only what it changes, a misspelt key is an error, and durations are
/// strings such as `"200ms"`, `"5s"` or `"24h"` (see `examples/toml_config.rs`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Protocol tuning (window, acks, retries). Default [`ProtoConfig::default`].
    pub proto: ProtoConfig,
    /// Receiver-side dedup for effectively-once channels. Default
    /// [`DedupConfig::default`] (in memory; `window` 8192 seqs, twice the default
    /// `proto.max_in_flight`): a sequence window narrower than the senders' in-flight
    /// window refuses messages beyond it until the holes below fill.
    #[serde(deserialize_with = "crate::config_serde::node_dedup")]
    pub dedup: DedupConfig,
    /// Largest payload `send` accepts. Default 4 MiB.
    pub max_payload: usize,
    /// Failure detector (phi accrual, threshold 8). Default [`DetectorConfig::default`].
    pub detector: DetectorConfig,
    /// How often each known peer is pinged for the failure detector. Default 1 s. The
    /// node raises the detector's `first_heartbeat_estimate` to at least this, so a
    /// slower heartbeat does not make an idle peer look Down before its first interval
    /// is measured.
    #[serde(with = "crate::config_serde::duration")]
    pub heartbeat_interval: Duration,
    /// Hinted handoff; `None` (default) disables it: a message whose retries run out
    /// fails its receipt.
    pub handoff: Option<HandoffConfig>,
    /// How long [`Node::shutdown`] waits for unacknowledged messages before spooling
    /// them to the hint store (or, without handoff, failing them). Default 5 s.
    /// `Duration::MAX` waits until every message has settled. A finite drain counts
    /// towards what `dedup.retention` must outlive (see [`NodeConfig::validate`]): with
    /// the defaults, a drain of 24 h or more is refused unless the retention is raised.
    #[serde(with = "crate::config_serde::duration")]
    pub shutdown_drain: Duration,
    /// How long [`Node::shutdown`] waits, after the drain, for deliveries the
    /// application still holds (handed out, not yet acked or nacked; messages still
    /// queued for a receiver are taken back instead) before it stops.
    /// Default 5 s, so a handler that is sometimes slow finishes and its ack and dedup
    /// record are kept; the wait ends as soon as none is held. A delivery still held at
    /// the end is treated like a handler crash (see [`Node::shutdown`]). Any value is
    /// accepted; `Duration::ZERO` stops without waiting, `Duration::MAX` waits for
    /// every held delivery.
    #[serde(with = "crate::config_serde::duration")]
    pub shutdown_handler_grace: Duration,
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
    /// retrying until their deadline either way; at-most-once messages that were
    /// never transmitted (waiting for the receiver's credit, which has no deadline)
    /// fail with `PeerDown` when the peer goes Down. At-most-once is never handed off,
    /// so its sends fail so with hinted handoff on too.
    pub fail_fast_when_down: bool,
    /// Who may send on which channel and who may relay other nodes' message ids.
    /// Default [`Authorization::default`](crate::proto::Authorization::default): any
    /// admitted peer on any channel, nobody relays for another node.
    pub authorization: crate::proto::Authorization,
    /// Dead letters kept for [`Node::dead_letters`] before the oldest is dropped
    /// (counted in [`Stats::dead_letters_dropped`], logged at warn). Default `10 000`;
    /// at most `2^24`. `0` keeps none: each letter is only counted in
    /// `dead_letters_dropped` (not logged, not written to `dead_letter_dir`), though
    /// its sender is still told it was rejected.
    pub dead_letter_capacity: usize,
    /// Keep dead letters durably in this directory (a crc-checked log, fsynced before
    /// the sender is told): a restarted node finds the letters it had not handed out
    /// yet in [`Node::dead_letters`]. A letter leaves the log when it is handed to the
    /// application (one taken just before a crash may be seen again, as may one taken
    /// from a handle after its node stopped: the log is closed then, for the next
    /// run to open). Default `None`:
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
            shutdown_handler_grace: Duration::from_secs(5),
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
    /// <= 65536`; `handoff` as [`HandoffConfig::validate`]; `dedup.retention` longer
    /// than the retry deadline plus the hint TTL plus `shutdown_drain` (a late copy must
    /// not find its stream retired; a sum that reaches `Duration::MAX` counts as never
    /// and is not checked). `shutdown_handler_grace` may be any duration.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::error::check::{count, duration, u};
        self.proto.validate()?;
        self.dedup.validate().map_err(crate::ConfigError::Dedup)?;
        if let (Some(dl), Some(h)) = (&self.dead_letter_dir, &self.handoff) {
            if *dl == h.store.dir {
                return Err(crate::ConfigError::DeadLettersInHintDir { dir: dl.clone() });
            }
        }
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
    pub(super) fn payload_limit(max_frame_len: usize) -> usize {
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
    ///
    /// At-least-once and effectively-once only. An at-most-once message has no
    /// deadline, as it has no retries: it waits for the receiver's credit as long as
    /// the receiver withholds it, and its receipt resolves `Sent` once it is
    /// transmitted (or fails when the node shuts down). A value set here is still
    /// range-checked for every guarantee.
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
    /// At-most-once messages are never retransmitted, so for them a missing message
    /// is lost, not late: an at-most-once stream starts at the first message that
    /// reaches the receiver (a receiver that registers late or restarts does not wait
    /// for earlier ones), a gap is skipped at once, and a message arriving after a
    /// later one was delivered is dropped (counted in `duplicates_dropped`), so order
    /// still holds (`tests/blackbox_ordering.rs`, `*at_most_once*`).
    ///
    /// Checked by the `ordered_contract_holds_through_every_refusal_path` simulation
    /// property, `tests/integration/flow_control.rs` and (rule 4)
    /// `tests/integration/rejections.rs::an_ordered_stream_moves_past_a_dead_letter_in_order`.
    pub ordered: bool,
    /// How many times one at-least-once or effectively-once message is handed to the
    /// application (its first delivery plus redeliveries after a nack or a dropped
    /// [`Delivery`]; not while its node drains before a stop, see [`Node::shutdown`])
    /// before it goes to the dead letters ([`Node::dead_letters`])
    /// instead, and its sender's receipt fails with
    /// [`SendError::Rejected`]`{ reason: DeadLettered }` — as NATS's `MaxDeliver` and
    /// RabbitMQ's delivery limit do. `None`: redeliver until the sender's deadline.
    /// Default `Some(`[`DEFAULT_MAX_DELIVERIES`](Self::DEFAULT_MAX_DELIVERIES)`)`;
    /// `Some(0)` is refused. In a config file: a number, or `"none"`.
    #[serde(with = "crate::config_serde::option_limit")]
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

/// Counters of a node. Most count events and only grow; the few that describe the
/// current state go down as well: `proto.delivered` (see
/// [`ProtoStats::delivered`](crate::proto::ProtoStats::delivered)), the dedup table's
/// `streams`, `tombstones`, `key_generations` and `memory_bytes`, and the hint store's
/// `pending` and `bytes_total`.
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
    /// bytes). They are not delivered: they go to [`Node::dead_letters`] and the
    /// sender's receipt fails with [`SendError::Rejected`]`{ reason: Undecodable }`.
    /// A sender speaking protocol 2 or older has no rejects: its message is acked to
    /// end its retries, so its receipt says `Ok(Acked)` (the letter is still kept).
    pub decode_failed: u64,
    /// Arrivals on a channel with no [`Receiver`] on this node. They are not
    /// acknowledged, so a receiver that starts late still gets them; after
    /// [`ProtoConfig::no_receiver_grace`] they are rejected
    /// ([`SendError::Rejected`]`{ reason: NoReceiver }` at the sender). Logged at warn
    /// at most once a second.
    pub no_receiver: u64,
    /// Hint store counters, when handoff is enabled.
    pub hints: Option<crate::handoff::HintStats>,
    /// The built-in TCP transport's counters (connections, frames, every rejected
    /// connection by reason); `None` on another transport. The same as
    /// [`Node::tcp_stats`](crate::Node::tcp_stats).
    pub tcp: Option<crate::transport::tcp::TcpStatsSnapshot>,
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
    /// What this build could not read of [`NodeConfig::dead_letter_dir`] when the node
    /// started: records of a newer build's format, and segments quarantined for a bad
    /// header (each counts once). Left on disk (a segment holding such a record is
    /// kept, and counts towards the log's size), not delivered; logged at warn.
    pub dead_letters_unreadable: u64,
}

/// The TCP settings, and `max_payload` against the TCP frame limit (a payload that
/// cannot fit a frame would be accepted by `send` and never delivered).
pub(super) fn check_tcp(config: &NodeConfig, tcp: &TcpConfig) -> Result<(), crate::ConfigError> {
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
    check_frame_limit(config, tcp.max_frame_len)
}

/// `max_payload` fits a transport's frames of at most `max_frame_len` bytes.
pub(super) fn check_frame_limit(
    config: &NodeConfig,
    max_frame_len: usize,
) -> Result<(), crate::ConfigError> {
    let max = NodeConfig::payload_limit(max_frame_len);
    if config.max_payload > max {
        return Err(crate::ConfigError::PayloadAboveFrameLimit {
            max_payload: config.max_payload,
            max_frame_len,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{IdKey, MessageId, NodeId, Origin};
    use bytes::Bytes;

    /// `shutdown_drain` as its docs say: any drain is accepted while the retention
    /// outlives deadline + drain, 24 h is refused with the defaults, and
    /// `Duration::MAX` (never) is accepted.
    #[test]
    fn shutdown_drain_counts_towards_the_retention() {
        let with = |drain| NodeConfig {
            shutdown_drain: drain,
            ..NodeConfig::default()
        };
        assert!(with(Duration::from_secs(3600)).validate().is_ok());
        assert!(with(Duration::MAX).validate().is_ok());
        assert!(matches!(
            with(Duration::from_secs(24 * 3600)).validate(),
            Err(crate::ConfigError::RetentionTooShort { .. })
        ));
        let mut longer = with(Duration::from_secs(24 * 3600));
        longer.dedup.retention = Duration::from_secs(48 * 3600);
        assert!(longer.validate().is_ok());
    }

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
