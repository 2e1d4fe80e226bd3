//! Protocol configuration: windows, acks, retries.

use crate::retry::{RetryBudgetConfig, RetryPolicy, RttConfig};
use std::time::Duration;

/// Tuning of the delivery protocol. Every default is written on its field.
///
/// ```
/// let cfg = ackwire::ProtoConfig::default();
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProtoConfig {
    /// Maximum span of unsettled messages per stream (the sliding window, as in TCP):
    /// `send` waits when it is full. Default `4096`. Messages waiting for the
    /// receiver's credit count against it.
    pub max_in_flight: usize,
    /// Receiving side: credit granted to each inbound stream, in messages — how many of
    /// a stream's messages may be outstanding here at once (queued for the
    /// application, held for ordering, being processed, or on the way). It is a span of
    /// seqs, as TCP's window: on an acked stream the sender may transmit up to
    /// `stream_credit` seqs past the oldest of its messages not yet done here, so one
    /// message held long by a slow handler holds the stream's grant where it is even
    /// when everything after it is done. Senders never
    /// exceed it (protocol version 2; a version-1 sender is bounded by its own
    /// `max_in_flight` instead), so a receiver never refuses a message for lack of
    /// room — on an ordered channel while `max_reorder_buffer` is at least
    /// `stream_credit` (the defaults; a smaller buffer drops what does not fit, counted
    /// in `ProtoStats::reorder_overflow`). Memory per stream is bounded by
    /// `stream_credit` payloads. Default `4096`; at least 256
    /// ([`crate::proto::INITIAL_CREDIT`], what a sender may send before
    /// the first grant).
    pub stream_credit: u64,
    /// Receiving side: credit granted to each sending node for all its streams
    /// together, in messages — how many of one peer's messages may be outstanding here
    /// at once, whatever the number of its streams (protocol version 3; see
    /// [`crate::wire::NodeCredit`]). Each stream is further bounded by
    /// `stream_credit`. Memory per sending node is bounded by about `node_credit`
    /// payloads (plus [`crate::proto::INITIAL_NODE_CREDIT`] after each reconnection).
    /// Default `16384`; at least 256.
    pub node_credit: u64,
    /// How long the receiver may hold an owed ack to batch it with others. Default
    /// `0`: acks go out at the end of the current burst of work, which batches bulk
    /// streams without adding latency to a lone message.
    #[serde(with = "crate::config_serde::duration")]
    pub ack_delay: Duration,
    /// An ack is sent at once when this many separate ranges are owed. Default `64`.
    pub max_ack_ranges: usize,
    /// Ordered channels: frames held waiting for a gap to fill, per stream; further
    /// frames are dropped unacked (the sender retransmits). Default `4096`.
    pub max_reorder_buffer: usize,
    /// Inbound streams (one per sending node run and channel) one peer may hold. A
    /// frame that would open one more first makes room by dropping the peer's idle
    /// stream (nothing in the application or owed) whose last frame is oldest
    /// (counted in `ProtoStats::streams_recycled`; its next frame makes it again);
    /// when none is idle the frame is dropped unacked (the sender retries) and counted
    /// in `ProtoStats::streams_refused`. Default `256`.
    pub max_streams_per_peer: usize,
    /// At-most-once streams advertise a floor this far behind the newest seq, so on
    /// an unordered channel a frame overtaken by fewer than this many later frames
    /// still gets delivered, while the receiver's bookkeeping stays bounded (at most
    /// this many seqs per stream). An ordered channel never waits for an at-most-once
    /// gap (it is never retransmitted): see `ReceiverOptions::ordered`. Default
    /// `16384`.
    pub amo_reorder_slack: u64,
    /// Receiving side: how long messages on a channel with no receiver are left to
    /// retry (unacked) before they are rejected with
    /// [`RejectReason::NoReceiver`](crate::wire::RejectReason::NoReceiver), counted from
    /// the first such message (per channel, since the channel last had a receiver) —
    /// room for receivers that start a little after their node. Senders speaking
    /// protocol version 2 or older get no reject: their messages stay unacked until a
    /// receiver appears or their deadline passes. Default `5 s`; at most 1 day.
    #[serde(with = "crate::config_serde::duration")]
    pub no_receiver_grace: Duration,
    /// Retransmission: attempts, deadline, backoff. See [`RetryPolicy`].
    pub retry: RetryPolicy,
    /// RTT estimation (RFC 6298). See [`RttConfig`].
    pub rtt: RttConfig,
    /// Retry budget against a struggling target, one per outbound stream (a target's
    /// streams do not share one). See [`RetryBudgetConfig`].
    ///
    /// Default: `retry_ratio` 1.0, `min_retries_per_sec` 100, `ttl` 10 s — looser than
    /// Finagle's RPC numbers ([`RetryBudgetConfig::default`], 0.2 and 10/s). For a
    /// delivery library retries *are* the guarantee: a link with 20 % loss each way
    /// needs retries for ~36 % of messages, and a 0.2 budget turned such a healthy but
    /// lossy link into deadline failures in our tests. Acks earn budget too, so a
    /// target that keeps acking gets its backlog retried at the pace it acks; against
    /// one that acks nothing, 1.0 caps retries at one per fresh send (plus the floor),
    /// so a retry storm stays within twice the fresh load. Refused retries are
    /// deferred, never dropped.
    #[serde(deserialize_with = "crate::config_serde::proto_retry_budget")]
    pub retry_budget: RetryBudgetConfig,
}

impl Default for ProtoConfig {
    fn default() -> Self {
        ProtoConfig {
            max_in_flight: 4096,
            stream_credit: 4096,
            node_credit: 16384,
            ack_delay: Duration::ZERO,
            max_ack_ranges: 64,
            max_reorder_buffer: 4096,
            max_streams_per_peer: 256,
            amo_reorder_slack: 16384,
            no_receiver_grace: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            rtt: RttConfig::default(),
            retry_budget: RetryBudgetConfig {
                retry_ratio: 1.0,
                min_retries_per_sec: 100,
                ..RetryBudgetConfig::default()
            },
        }
    }
}

impl ProtoConfig {
    /// Largest accepted [`max_in_flight`](Self::max_in_flight): `2^24`, the widest
    /// dedup sequence window (which must be at least as wide).
    pub const MAX_IN_FLIGHT: usize = 1 << 24;
    /// Largest accepted [`ack_delay`](Self::ack_delay): 1 s. A longer hold makes every
    /// sender retransmit before its ack arrives (the default `min_rto` is 200 ms).
    pub const MAX_ACK_DELAY: Duration = Duration::from_secs(1);
    /// Largest accepted [`max_ack_ranges`](Self::max_ack_ranges): 65 536 (an ack frame
    /// of that many ranges still fits the default 8 MiB frame limit).
    pub const MAX_ACK_RANGES: usize = crate::wire::MAX_ACK_RANGES;
    /// Largest accepted [`max_reorder_buffer`](Self::max_reorder_buffer),
    /// [`max_streams_per_peer`](Self::max_streams_per_peer) and
    /// [`amo_reorder_slack`](Self::amo_reorder_slack): `2^24`.
    pub const MAX_BOOKKEEPING: usize = 1 << 24;
    /// Largest accepted [`no_receiver_grace`](Self::no_receiver_grace): 1 day.
    pub const MAX_NO_RECEIVER_GRACE: Duration = Duration::from_secs(86_400);

    /// Check every value and that they fit together.
    ///
    /// Bounds: `max_in_flight` in `1..=2^24`; `ack_delay <= 1 s`; `max_ack_ranges` in
    /// `1..=65536`; `max_reorder_buffer` and `amo_reorder_slack` in `0..=2^24`;
    /// `max_streams_per_peer` in `1..=2^24`; `no_receiver_grace <= 1 day`; `retry`, `rtt` and `retry_budget` as their
    /// own `validate`. Durations without an upper bound here (`retry.deadline`,
    /// `retry.backoff_cap`, `rtt.max_rto`) may be as long as `Duration::MAX`: timers
    /// that would overflow the clock are treated as "never".
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::error::check::{count, duration, u};
        let book = u(Self::MAX_BOOKKEEPING);
        count(
            "proto.max_in_flight",
            u(self.max_in_flight),
            1,
            u(Self::MAX_IN_FLIGHT),
        )?;
        count(
            "proto.stream_credit",
            self.stream_credit,
            super::INITIAL_CREDIT,
            book,
        )?;
        count(
            "proto.node_credit",
            self.node_credit,
            super::INITIAL_CREDIT,
            book,
        )?;
        duration(
            "proto.ack_delay",
            self.ack_delay,
            Duration::ZERO,
            Self::MAX_ACK_DELAY,
        )?;
        count(
            "proto.max_ack_ranges",
            u(self.max_ack_ranges),
            1,
            u(Self::MAX_ACK_RANGES),
        )?;
        count(
            "proto.max_reorder_buffer",
            u(self.max_reorder_buffer),
            0,
            book,
        )?;
        count(
            "proto.max_streams_per_peer",
            u(self.max_streams_per_peer),
            1,
            book,
        )?;
        count("proto.amo_reorder_slack", self.amo_reorder_slack, 0, book)?;
        duration(
            "proto.no_receiver_grace",
            self.no_receiver_grace,
            Duration::ZERO,
            Self::MAX_NO_RECEIVER_GRACE,
        )?;
        let retry = |field| move |source| crate::ConfigError::Retry { field, source };
        self.retry.validate().map_err(retry("proto.retry"))?;
        self.rtt.validate().map_err(retry("proto.rtt"))?;
        self.retry_budget
            .validate()
            .map_err(retry("proto.retry_budget"))?;
        Ok(())
    }
}
