//! TCP transport: one connection per peer pair, handshake, batching writer, reconnect.
//!
//! Owns sockets and the tokio tasks around them: an accept loop, one dialer per
//! unconnected peer with a known address (exponential backoff + jitter), and per
//! connection a reader (a [`FrameDecoder`]) and a writer that drains the peer's queue
//! into few large writes. A manager task owns all per-peer state; the node talks to it
//! through the [`Link`]. Must not know about acks, retries or dedup: frames the
//! transport cannot deliver are dropped and counted, and the protocol above retransmits.
//!
//! # Connection rules
//!
//! - Both sides send a [`crate::wire::Handshake`] (and a version probe) and agree on
//!   a protocol version from their [`TcpConfig::versions`] (see
//!   [`crate::wire::Negotiation`]) within [`TcpConfig::handshake_timeout`]; every later
//!   frame is encoded for that version. The acceptor sends its probe only once it has
//!   read and admitted the dialer's claim, so a refused dialer (speaking version 2 or
//!   later) never completes the handshake: its attempt fails and backs off, it never
//!   reports the peer up. No common version, a different first frame,
//!   garbage, a dialed peer answering with another node id, or a connection to
//!   ourselves closes the connection, counted in [`TcpStats`] and logged at `warn`.
//! - Anyone may dial. If two connections exist for a pair, both sides keep the one
//!   dialed by the lower [`NodeId`] and close the other. A new connection from the same
//!   dialer, or from a new incarnation of the peer, replaces the old one. When both
//!   sides dial at once, the lower id's dial finishes its handshake even if the higher
//!   id's connection arrived first (it is the one both keep), so a slow link settles
//!   on one connection instead of redialing in a loop; a side may briefly report
//!   `Down` then `Up` (same origin) while the duplicate is closed, and frames written
//!   on the losing connection are lost.
//! - [`LinkEvent::Up`] is emitted when a peer gets its first connection (and when a
//!   peer's incarnation changes, after a `Down`), [`LinkEvent::Down`] when its
//!   connection is lost. After a loss the transport redials (after a backoff) if it
//!   knows the peer's address. A connection from which nothing was read for
//!   [`TcpConfig::idle_timeout`] counts as lost (`idle_timeouts`): a half-open
//!   connection (no FIN or RST ever arrives) is closed and redialed, not kept for good.
//!   So is one to which a write made no progress for as long (`write_timeouts`): a
//!   peer that stopped reading, whatever it still sends.
//! - Frames for a peer go to a per-peer queue, kept across reconnects, except the data
//!   frames of a message its sender took back ([`LinkCommand::Withdraw`]). While the peer
//!   has no connection the queue is bounded by [`TcpConfig::queue_bound`] frames and the
//!   oldest are dropped and counted (`frames_dropped_disconnected`); the protocol
//!   retransmits what matters once it is back. Heartbeats (pings, pongs) for a peer
//!   without a connection are not queued at all. A connected peer's queue is trimmed
//!   only at `4 × queue_bound` frames: what the node sends on its own is bounded by the
//!   protocol (each stream's receiver credit and in-flight window), so nothing is
//!   dropped on a link whose peer reads, at-most-once included; replies are not (a
//!   pong per ping, a reject per refused message), so a peer that asks for them
//!   faster than it reads is disconnected at that mark (`stalled_peers_disconnected`)
//!   and its queue cut to `queue_bound` (`frames_dropped_backlog`).
//!
//! # Trust
//!
//! - With [`TcpTransport::with_tls`] every connection is mutual TLS 1.3 (see
//!   [`super::tls`]): both sides present a certificate chained to a trusted CA, and the
//!   node id a peer claims in the handshake must be the one its certificate names
//!   (`rejected_identity_mismatch` otherwise). Any peer the CA vouches for is accepted.
//! - Without TLS, a node accepts inbound connections only from peers it knows
//!   ([`TcpTransport::with_peer`], [`TcpTransport::allow_peer`], [`LinkCommand::AddPeer`])
//!   unless [`TcpConfig::accept_unknown_peers`] is set; strangers are refused and
//!   counted (`rejected_unknown_peer`, warned at most every 10 s with the id to
//!   admit) as soon as their handshake frame is read, before anything that follows it
//!   and before this node sends its version probe. A plain-TCP node id is only *claimed*: anyone who
//!   can reach the port can claim a known id. A node listening without TLS on a
//!   non-loopback address logs a warning once.
//! - One node id, one live incarnation: while a peer's connection is alive (bytes
//!   received within [`TcpConfig::stale_after`]), a connection from *another*
//!   incarnation of the same id is refused (`rejected_duplicate_node`, warned at most
//!   every 10 s) instead of replacing it; it takes over once the old connection is gone
//!   or stale. Before it is refused it is held up to 50 ms, keeping its IP slot, in
//!   case the old connection is closing: a process restarted cleanly connects right
//!   after the old one closed, before this side has read the end.
//! - A frame started must be completed within [`TcpConfig::read_timeout`]
//!   (`read_timeouts`), and one remote IP address may hold at most
//!   [`TcpConfig::max_connections_per_ip`] accepted connections, handshaking or
//!   established (`rejected_ip_limit`).
//! - However many addresses connect, the node holds at most
//!   [`TcpConfig::max_handshaking`] accepted connections that have not completed their
//!   handshake; at that bound a new connection closes the oldest of them
//!   (`evicted_handshakes`). Established connections do not count.

#[cfg(feature = "tls")]
use super::tls::{self, TlsConfig, TlsRefusal};
use super::{Link, LinkCommand, LinkEvent, Transport, TransportError};
use crate::id::{ChannelId, NodeId, Origin};
use crate::retry::Backoff;
use crate::rng::seed_from_entropy;
use crate::wire::{
    DecodeError, Frame, FrameDecoder, FrameEncoder, IncompatibleVersion, Negotiation,
    NegotiationError, NegotiationStep, UnsupportedRange, VersionRange, DEFAULT_MAX_FRAME_LEN,
    FRAME_PREFIX_LEN,
};
use bytes::{Buf, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// Settings of a [`TcpTransport`].
///
/// `Default`:
/// - `connect_timeout`: 3 s
/// - `handshake_timeout`: 5 s
/// - `backoff_min`: 50 ms, `backoff_max`: 5 s (redial delay doubles per failed
///   attempt between these bounds; each delay is drawn uniformly from its upper half;
///   a connection that ends within 1 s of its handshake with nothing read after the
///   handshake counts as a failed attempt, up to the delay of the fifth (400–800 ms),
///   so a peer that refuses this node after the handshake is not redialed every 50 ms)
/// - `max_frame_len`: 8 MiB ([`DEFAULT_MAX_FRAME_LEN`]), both directions
/// - `queue_bound`: 16 384 frames per peer
/// - `write_batch_bytes`: 64 KiB (the writer issues a write once this much is encoded,
///   or when the queue is empty)
/// - `channel_capacity`: 1 024 (command and event channels of the [`Link`])
/// - `accept_unknown_peers`: `false` (without TLS, only known peers are accepted)
/// - `read_timeout`: 30 s (a frame whose first bytes arrived must be complete by then)
/// - `max_connections_per_ip`: 64 accepted connections per remote IP address
/// - `max_handshaking`: 256 accepted connections in their handshake, node-wide
/// - `stale_after`: 10 s (a connection silent this long yields to a new incarnation)
/// - `idle_timeout`: 10 s (a connection silent this long is closed and redialed)
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// Give up one connect attempt after this long.
    #[serde(with = "crate::config_serde::duration")]
    pub connect_timeout: Duration,
    /// Close a connection whose peer has not completed the handshake after this long.
    #[serde(with = "crate::config_serde::duration")]
    pub handshake_timeout: Duration,
    /// First redial delay.
    #[serde(with = "crate::config_serde::duration")]
    pub backoff_min: Duration,
    /// Largest redial delay.
    #[serde(with = "crate::config_serde::duration")]
    pub backoff_max: Duration,
    /// Largest frame body accepted or sent. Run the same value on every node: a
    /// larger frame from a handshaken peer is read past and dropped
    /// ([`TcpStatsSnapshot::frames_skipped_too_large`]), and its message fails at its
    /// sender's deadline; before the handshake one closes the connection.
    pub max_frame_len: usize,
    /// Frames queued per peer before the oldest are dropped.
    pub queue_bound: usize,
    /// Bytes the writer encodes before issuing one write.
    pub write_batch_bytes: usize,
    /// Capacity of the link's command and event channels.
    pub channel_capacity: usize,
    /// Protocol versions spoken; each connection uses the highest one both sides
    /// speak. Default: all this build speaks ([`VersionRange::SUPPORTED`]). Raise
    /// `min` after a rolling upgrade to stop speaking old versions.
    pub versions: VersionRange,
    /// Without TLS: accept inbound connections from node ids this transport was not
    /// told about. Off by default: a stranger is refused (`rejected_unknown_peer`).
    /// With TLS the CA decides who is a peer and this setting is not consulted.
    pub accept_unknown_peers: bool,
    /// Close a connection (counted in `read_timeouts`) when a frame it started is not
    /// complete after this long: a stalled or trickling peer cannot pin a connection
    /// and its buffer. An idle connection between frames is not affected.
    #[serde(with = "crate::config_serde::duration")]
    pub read_timeout: Duration,
    /// Accepted connections (handshaking or established) one remote IP address may
    /// hold; further ones are closed at once (`rejected_ip_limit`).
    pub max_connections_per_ip: usize,
    /// Accepted connections that have not completed their handshake (TLS included)
    /// the node holds at once, whatever their addresses. A connection accepted while
    /// this many are handshaking closes the OLDEST of them (its task is aborted, its
    /// socket closed; counted in `evicted_handshakes`, a warning logged at most once a
    /// second) and takes its place. Connections leave the count when their handshake
    /// completes or fails (at the latest after `handshake_timeout`); established
    /// connections and the connections this node dials do not count. Bounds the
    /// descriptors and memory an outsider holding many addresses (an IPv6 prefix, a
    /// botnet) can make the node spend before proving anything: without it,
    /// `max_connections_per_ip` idle connections from each of many addresses exhaust a
    /// typical 1 024-descriptor limit. Evicting the oldest keeps new peers served while
    /// an outsider holds the node at the bound: to keep one out, the outsider must open
    /// this many connections within that peer's handshake round trip. Keep it well
    /// below the process's descriptor limit. Default: 256.
    pub max_handshaking: usize,
    /// A peer's connection counts as alive while it received bytes within this long
    /// (the node's heartbeats keep it busy); while alive, a second incarnation of the
    /// same node id is refused rather than allowed to replace it.
    #[serde(with = "crate::config_serde::duration")]
    pub stale_after: Duration,
    /// Close an established connection from which nothing at all was read for this
    /// long (counted in `idle_timeouts`), and redial: a half-open connection (the
    /// peer's host vanished, or a NAT or firewall dropped the flow without a FIN or
    /// RST) is otherwise kept for good, and the peer never comes back Up. The node's
    /// heartbeats (a ping each way every `heartbeat_interval`) keep a live connection
    /// busy; a node raises this to at least 3 × its `heartbeat_interval` (also for a
    /// `TcpTransport` given to `NodeBuilder::transport`). A `TcpTransport` used on its
    /// own, without a node, sends nothing by itself: its idle connections are closed
    /// (and redialed if the address is known) after this long; `Duration::MAX` turns
    /// the timeout off. A write that makes no progress for this long closes the
    /// connection too (`write_timeouts`): the peer stopped reading, even if it still
    /// sends.
    #[serde(with = "crate::config_serde::duration")]
    pub idle_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            queue_bound: 16_384,
            write_batch_bytes: 64 * 1024,
            channel_capacity: 1024,
            versions: VersionRange::SUPPORTED,
            accept_unknown_peers: false,
            read_timeout: Duration::from_secs(30),
            max_connections_per_ip: 64,
            max_handshaking: 256,
            stale_after: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

impl TcpConfig {
    /// Check the settings; see [`TcpConfigError`] for what is refused.
    pub fn validate(&self) -> Result<(), TcpConfigError> {
        let zero = |name, d: Duration| {
            if d.is_zero() {
                Err(TcpConfigError::Zero(name))
            } else {
                Ok(())
            }
        };
        zero("connect_timeout", self.connect_timeout)?;
        zero("handshake_timeout", self.handshake_timeout)?;
        zero("backoff_min", self.backoff_min)?;
        zero("read_timeout", self.read_timeout)?;
        zero("stale_after", self.stale_after)?;
        zero("idle_timeout", self.idle_timeout)?;
        if self.backoff_max < self.backoff_min {
            return Err(TcpConfigError::BackoffRange {
                min: self.backoff_min,
                max: self.backoff_max,
            });
        }
        if self.max_frame_len < MIN_FRAME_LEN || self.max_frame_len > u32::MAX as usize {
            return Err(TcpConfigError::MaxFrameLen(self.max_frame_len));
        }
        for (name, v) in [
            ("queue_bound", self.queue_bound),
            ("write_batch_bytes", self.write_batch_bytes),
            ("channel_capacity", self.channel_capacity),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_handshaking", self.max_handshaking),
        ] {
            if v == 0 {
                return Err(TcpConfigError::Zero(name));
            }
        }
        // tokio's channels panic above this many slots. (Regression: checked only for
        // a node built with `bind`, so a `TcpTransport` given to
        // `NodeBuilder::transport` panicked when it started.)
        let max = tokio::sync::Semaphore::MAX_PERMITS;
        for (field, value) in [
            ("channel_capacity", self.channel_capacity),
            ("queue_bound", self.queue_bound),
        ] {
            if value > max {
                return Err(TcpConfigError::AboveChannelLimit { field, value, max });
            }
        }
        self.versions.validate()?;
        Ok(())
    }
}

/// At most one duplicate-node warning per this long (the rest are logged at debug).
const CONFLICT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Smallest accepted `max_frame_len`: room for any header.
const MIN_FRAME_LEN: usize = 256;
/// Bound on the first frame of a connection (a handshake is ~30 bytes).
const HANDSHAKE_MAX_FRAME_LEN: usize = 1024;

/// An invalid [`TcpConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TcpConfigError {
    /// A duration or size that must be positive is zero. Set it.
    #[error("{0} must not be zero")]
    Zero(&'static str),
    /// `backoff_max < backoff_min`. Swap or fix them.
    #[error("backoff_max {max:?} is below backoff_min {min:?}")]
    BackoffRange {
        /// Given minimum.
        min: Duration,
        /// Given maximum.
        max: Duration,
    },
    /// `max_frame_len` is below 256 or above `u32::MAX`. Pick a value in range.
    #[error("max_frame_len {0} is outside 256..=u32::MAX")]
    MaxFrameLen(usize),
    /// A channel size above what tokio's channels can hold
    /// (`tokio::sync::Semaphore::MAX_PERMITS`). Pick a smaller one.
    #[error("{field} {value} is above {max} (tokio's channel limit)")]
    AboveChannelLimit {
        /// The field.
        field: &'static str,
        /// Its value.
        value: usize,
        /// The largest accepted.
        max: usize,
    },
    /// `versions` names a protocol version this build does not speak, or is empty.
    #[error(transparent)]
    Versions(#[from] UnsupportedRange),
}

/// Live counters of a [`TcpTransport`]; read with [`TcpStats::snapshot`].
#[derive(Debug)]
pub struct TcpStats {
    c: [AtomicU64; COUNTERS],
}

impl Default for TcpStats {
    fn default() -> Self {
        TcpStats {
            c: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A copy of a [`TcpStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStatsSnapshot {
    /// Connections that completed the handshake and were kept.
    pub connections_opened: u64,
    /// Kept connections that were later closed (lost, replaced, or shut down).
    pub connections_closed: u64,
    /// Connections closed at once because the pair already had the preferred one.
    pub duplicate_connections_closed: u64,
    /// Connect attempts that failed or timed out.
    pub connect_failures: u64,
    /// Handshakes that failed for any reason (each also counted under one `rejected_*`).
    pub handshakes_failed: u64,
    /// Frames written to sockets.
    pub frames_sent: u64,
    /// Frames read from sockets and handed to the node (handshakes excluded).
    pub frames_received: u64,
    /// Streams closed for a checksum mismatch.
    pub rejected_bad_checksum: u64,
    /// Streams closed for a wrong format or protocol version.
    pub rejected_unsupported_version: u64,
    /// Streams closed for an oversized length prefix.
    pub rejected_too_large: u64,
    /// Streams closed for a malformed frame.
    pub rejected_malformed: u64,
    /// Streams closed for a frame out of place (data before the handshake, or a
    /// second handshake).
    pub rejected_unexpected_frame: u64,
    /// Handshakes not completed in time (or the peer closed before completing).
    pub rejected_handshake_timeout: u64,
    /// Handshakes naming an unexpected node (not the dialed one, or ourselves).
    pub rejected_wrong_peer: u64,
    /// Frames dropped because the peer's queue overflowed while it had no connection.
    pub frames_dropped_disconnected: u64,
    /// Frames dropped from a connected peer's queue when it was disconnected for not
    /// reading (see `stalled_peers_disconnected`): the queue is cut to `queue_bound`.
    pub frames_dropped_backlog: u64,
    /// Frames dropped because they encode larger than `max_frame_len`.
    pub frames_dropped_oversize: u64,
    /// Frames dropped because the connection's protocol version has no such frame:
    /// queued for a peer before its version was known (a credit probe queued before
    /// the first connection, to a peer that turns out to speak version 1), or before
    /// it restarted on an older build. Nothing lost: the protocol re-sends what such a
    /// peer understands.
    pub frames_dropped_unsupported: u64,
    /// Frames a handshaken peer sent larger than this node's `max_frame_len`, read past
    /// and dropped without closing the connection (the sender's `max_payload` exceeds
    /// this node's frame limit: a configuration mismatch). The sender is not told; an
    /// acked message fails at its deadline (`SendError::Deadline`).
    pub frames_skipped_too_large: u64,
    /// Inbound connections refused: the peer's node id is not known and
    /// `accept_unknown_peers` is off (plain TCP).
    pub rejected_unknown_peer: u64,
    /// Connections refused because another incarnation of the same node id holds a
    /// live connection (two processes with one `NodeId`).
    pub rejected_duplicate_node: u64,
    /// Inbound connections closed at once: their IP address already holds
    /// `max_connections_per_ip`.
    pub rejected_ip_limit: u64,
    /// Inbound connections closed in their handshake to make room for a newer one: the
    /// node already held `max_handshaking` connections in their handshake and closed
    /// the oldest of them.
    pub evicted_handshakes: u64,
    /// Connections closed because a started frame was not completed in `read_timeout`.
    pub read_timeouts: u64,
    /// Established connections closed because nothing was read from them within
    /// `idle_timeout` (half-open or black-holed); the transport redials a peer whose
    /// address it knows.
    pub idle_timeouts: u64,
    /// Established connections closed because a write made no progress for
    /// `idle_timeout`: the peer stopped reading (while it may still send, which keeps
    /// the read side alive). The transport redials a peer whose address it knows.
    pub write_timeouts: u64,
    /// Times accepting a connection failed (for example out of file descriptors,
    /// `EMFILE`); the listener waits 100 ms and tries again. Warned at most every
    /// 10 s, with the count since the last warning.
    pub accept_failures: u64,
    /// TLS: the peer presented no certificate.
    pub rejected_tls_no_certificate: u64,
    /// TLS: the peer's certificate does not chain to a trusted CA.
    pub rejected_tls_untrusted: u64,
    /// TLS: the peer's certificate has expired (or is not valid yet).
    pub rejected_tls_expired: u64,
    /// TLS: the handshake failed for another reason (protocol error, alert, timeout).
    pub rejected_tls_other: u64,
    /// TLS: the node id claimed in the handshake is not the one the peer's verified
    /// certificate names (or, dialing, the dialed node's certificate names another).
    pub rejected_identity_mismatch: u64,
    /// Connections closed because `4 × queue_bound` frames waited for a peer that did
    /// not read them (it asked for replies, pongs or rejects, faster than it read).
    /// The node redials; the protocol retransmits what matters.
    pub stalled_peers_disconnected: u64,
    /// Queued data frames dropped because their message was taken back by its sender
    /// (handed off, given up, abandoned) before they were written: they must not reach
    /// the peer later (see [`LinkCommand::Withdraw`]).
    pub frames_withdrawn: u64,
}

impl TcpStats {
    /// Read every counter.
    pub fn snapshot(&self) -> TcpStatsSnapshot {
        let g = |c: Counter| self.c[c as usize].load(Ordering::Relaxed);
        TcpStatsSnapshot {
            connections_opened: g(Counter::ConnectionsOpened),
            connections_closed: g(Counter::ConnectionsClosed),
            duplicate_connections_closed: g(Counter::DuplicateConnectionsClosed),
            connect_failures: g(Counter::ConnectFailures),
            handshakes_failed: g(Counter::HandshakesFailed),
            frames_sent: g(Counter::FramesSent),
            frames_received: g(Counter::FramesReceived),
            rejected_bad_checksum: g(Counter::RejectedBadChecksum),
            rejected_unsupported_version: g(Counter::RejectedUnsupportedVersion),
            rejected_too_large: g(Counter::RejectedTooLarge),
            rejected_malformed: g(Counter::RejectedMalformed),
            rejected_unexpected_frame: g(Counter::RejectedUnexpectedFrame),
            rejected_handshake_timeout: g(Counter::RejectedHandshakeTimeout),
            rejected_wrong_peer: g(Counter::RejectedWrongPeer),
            frames_dropped_disconnected: g(Counter::FramesDroppedDisconnected),
            frames_dropped_backlog: g(Counter::FramesDroppedBacklog),
            frames_dropped_oversize: g(Counter::FramesDroppedOversize),
            frames_dropped_unsupported: g(Counter::FramesDroppedUnsupported),
            frames_skipped_too_large: g(Counter::FramesSkippedTooLarge),
            rejected_unknown_peer: g(Counter::RejectedUnknownPeer),
            rejected_duplicate_node: g(Counter::RejectedDuplicateNode),
            rejected_ip_limit: g(Counter::RejectedIpLimit),
            evicted_handshakes: g(Counter::EvictedHandshakes),
            read_timeouts: g(Counter::ReadTimeouts),
            idle_timeouts: g(Counter::IdleTimeouts),
            write_timeouts: g(Counter::WriteTimeouts),
            accept_failures: g(Counter::AcceptFailures),
            rejected_tls_no_certificate: g(Counter::RejectedTlsNoCertificate),
            rejected_tls_untrusted: g(Counter::RejectedTlsUntrusted),
            rejected_tls_expired: g(Counter::RejectedTlsExpired),
            rejected_tls_other: g(Counter::RejectedTlsOther),
            rejected_identity_mismatch: g(Counter::RejectedIdentityMismatch),
            stalled_peers_disconnected: g(Counter::StalledPeersDisconnected),
            frames_withdrawn: g(Counter::FramesWithdrawn),
        }
    }

    fn add(&self, c: Counter, n: u64) {
        self.c[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    fn reject(&self, r: &Reject) {
        self.inc(match r {
            Reject::Decode(DecodeError::BadChecksum) => Counter::RejectedBadChecksum,
            Reject::Decode(DecodeError::UnsupportedVersion { .. }) => {
                Counter::RejectedUnsupportedVersion
            }
            Reject::Decode(DecodeError::TooLarge { .. }) => Counter::RejectedTooLarge,
            Reject::Decode(DecodeError::Malformed(_)) => Counter::RejectedMalformed,
            Reject::UnexpectedFrame => Counter::RejectedUnexpectedFrame,
            Reject::Incompatible(_) => Counter::RejectedUnsupportedVersion,
            Reject::Timeout | Reject::Closed => Counter::RejectedHandshakeTimeout,
            Reject::WrongPeer { .. } | Reject::SelfConnection => Counter::RejectedWrongPeer,
            Reject::UnknownPeer(_) => Counter::RejectedUnknownPeer,
            Reject::DuplicateNode { .. } => Counter::RejectedDuplicateNode,
            Reject::ReadTimeout => Counter::ReadTimeouts,
            Reject::IdleTimeout => Counter::IdleTimeouts,
            #[cfg(feature = "tls")]
            Reject::Tls(t) => match t {
                TlsRefusal::NoCertificate => Counter::RejectedTlsNoCertificate,
                TlsRefusal::UntrustedIssuer => Counter::RejectedTlsUntrusted,
                TlsRefusal::Expired => Counter::RejectedTlsExpired,
                TlsRefusal::Other => Counter::RejectedTlsOther,
                TlsRefusal::NotForNode => Counter::RejectedIdentityMismatch,
            },
            #[cfg(feature = "tls")]
            Reject::IdentityMismatch { .. } => Counter::RejectedIdentityMismatch,
            Reject::Io(_) => return,
        });
    }
}

/// A TCP [`Transport`].
///
/// ```no_run
/// use ackwire::transport::tcp::{TcpConfig, TcpTransport};
/// use ackwire::transport::Transport;
/// use ackwire::{NodeId, Origin};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = TcpTransport::new("127.0.0.1:7000".parse()?, TcpConfig::default())?
///     .with_peer(NodeId(2), "127.0.0.1:7001".parse()?);
/// let stats = transport.stats();
/// let link = Box::new(transport).start(Origin::new_random(NodeId(1)))?;
/// # drop((link, stats)); Ok(()) }
/// ```
#[derive(Debug)]
pub struct TcpTransport {
    bind: SocketAddr,
    config: TcpConfig,
    peers: Vec<(NodeId, SocketAddr)>,
    allowed: Vec<NodeId>,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
    stats: Arc<TcpStats>,
    /// Report each read's frames as one `LinkEvent::Frames` (`Transport::batch_frames`).
    batch: bool,
    /// Closes the listening socket at once when notified (see [`Self::accept_stop`]).
    accept_stop: Arc<tokio::sync::Notify>,
}

impl TcpTransport {
    /// A transport that will listen on `bind` (port 0 picks a free port; see
    /// [`Link::local_addr`]). Fails if `config` is invalid.
    pub fn new(bind: SocketAddr, config: TcpConfig) -> Result<Self, TcpConfigError> {
        config.validate()?;
        Ok(TcpTransport {
            bind,
            config,
            peers: Vec::new(),
            allowed: Vec::new(),
            #[cfg(feature = "tls")]
            tls: None,
            stats: Arc::default(),
            accept_stop: Arc::default(),
            batch: false,
        })
    }

    /// Know `peer`'s address from the start (same as [`LinkCommand::AddPeer`]).
    pub fn with_peer(mut self, peer: NodeId, addr: SocketAddr) -> Self {
        self.peers.push((peer, addr));
        self
    }

    /// Accept inbound connections from `peer` without knowing its address (plain TCP;
    /// peers given to [`with_peer`](Self::with_peer) are accepted already).
    pub fn allow_peer(mut self, peer: NodeId) -> Self {
        self.allowed.push(peer);
        self
    }

    /// Use mutual TLS 1.3 on every connection, in both directions (see [`super::tls`]).
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The transport's counters; the handle stays valid after start and shutdown.
    pub fn stats(&self) -> Arc<TcpStats> {
        Arc::clone(&self.stats)
    }

    /// Notified (`notify_one`), the transport closes its listening socket at once,
    /// ahead of the commands queued before its `Shutdown`: a node that is dropped or
    /// shut down gives its port back even while its driver is still busy, so a new
    /// node can bind it. (Regression: a node dropped under load from 60 senders
    /// still held its port past `BIND_RETRY`, and the restart on it failed.)
    pub(crate) fn accept_stop(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.accept_stop)
    }
}

impl Transport for TcpTransport {
    fn batch_frames(&mut self) {
        self.batch = true;
    }

    /// `TcpConfig::max_frame_len`.
    fn max_frame_len(&self) -> Option<usize> {
        Some(self.config.max_frame_len)
    }

    /// Raises `idle_timeout` to at least three heartbeat intervals.
    fn heartbeat_interval(&mut self, every: Duration) {
        self.config.idle_timeout = self.config.idle_timeout.max(every.saturating_mul(3));
    }

    fn start(self: Box<Self>, local: Origin) -> Result<Link, TransportError> {
        let bind_err = |source| TransportError::Bind {
            addr: self.bind,
            source,
        };
        let std_listener = std::net::TcpListener::bind(self.bind).map_err(bind_err)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let local_addr = listener.local_addr()?;
        #[cfg(feature = "tls")]
        let tls = match self.tls {
            Some(t) if !t.certifies(local.node) => {
                return Err(TransportError::Io(std::io::Error::other(format!(
                    "the TLS certificate is not valid for {} (expected SAN {})",
                    local.node,
                    tls::node_dns_name(local.node)
                ))))
            }
            t => t,
        };
        #[cfg(feature = "tls")]
        let secure = tls.is_some();
        #[cfg(not(feature = "tls"))]
        let secure = false;
        if !secure && !local_addr.ip().is_loopback() {
            tracing::warn!(%local_addr, "tcp: accepting plain TCP (no TLS) on a non-loopback address: peers are identified by what they claim, not proven");
        }
        let cap = self.config.channel_capacity;
        let (cmd_tx, cmd_rx) = mpsc::channel(cap);
        let (events_tx, events_rx) = mpsc::channel(cap);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(Ctx {
            local,
            cfg: self.config,
            stats: self.stats,
            internal: internal_tx,
            #[cfg(feature = "tls")]
            tls,
            epoch: Instant::now(),
            ip_slots: Mutex::default(),
            batch: self.batch,
            // Every configured peer is known before the acceptor starts: a peer
            // already redialing this address must not meet a half-filled set.
            known: Mutex::new(
                self.allowed
                    .into_iter()
                    .chain(self.peers.iter().map(|(p, _)| *p))
                    .filter(|p| *p != local.node)
                    .collect(),
            ),
            last_stranger_warn: Mutex::default(),
            last_handshake_warn: Mutex::default(),
            large_first: AtomicUsize::new(0),
        });
        let acceptor = spawn_here(accept_loop(listener, Arc::clone(&ctx), self.accept_stop));
        let mut mgr = Manager {
            ctx,
            events: events_tx,
            peers: rustc_hash::FxHashMap::default(),
            next_conn_id: 0,
            commands: cmd_rx,
            backlog: VecDeque::new(),
            acceptor,
            last_conflict_warn: None,
        };
        for (peer, addr) in self.peers {
            mgr.add_peer(peer, addr);
        }
        tracing::info!(node = %local, %local_addr, "tcp: listening");
        spawn_here(mgr.run(internal_rx));
        Ok(Link {
            commands: cmd_tx,
            events: events_rx,
            local_addr: Some(local_addr),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Internals

#[derive(Clone, Copy, Debug)]
enum Counter {
    ConnectionsOpened,
    ConnectionsClosed,
    DuplicateConnectionsClosed,
    ConnectFailures,
    HandshakesFailed,
    FramesSent,
    FramesReceived,
    RejectedBadChecksum,
    RejectedUnsupportedVersion,
    RejectedTooLarge,
    RejectedMalformed,
    RejectedUnexpectedFrame,
    RejectedHandshakeTimeout,
    RejectedWrongPeer,
    FramesDroppedDisconnected,
    FramesDroppedBacklog,
    FramesDroppedOversize,
    RejectedUnknownPeer,
    RejectedDuplicateNode,
    RejectedIpLimit,
    ReadTimeouts,
    RejectedTlsNoCertificate,
    RejectedTlsUntrusted,
    RejectedTlsExpired,
    RejectedTlsOther,
    RejectedIdentityMismatch,
    StalledPeersDisconnected,
    FramesWithdrawn,
    FramesSkippedTooLarge,
    EvictedHandshakes,
    IdleTimeouts,
    AcceptFailures,
    WriteTimeouts,
    FramesDroppedUnsupported,
}
const COUNTERS: usize = Counter::FramesDroppedUnsupported as usize + 1;

/// A connected peer is disconnected once this many times `queue_bound` frames wait
/// for it (see `Manager::send`).
const STALLED_FACTOR: usize = 4;

/// Why a connection was refused or closed.
#[derive(Debug, thiserror::Error)]
enum Reject {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("unexpected frame")]
    UnexpectedFrame,
    #[error("{0}")]
    Incompatible(IncompatibleVersion),
    #[error("handshake timed out")]
    Timeout,
    #[error("peer closed during handshake")]
    Closed,
    #[error("expected {expected}, peer says it is {got}")]
    WrongPeer { expected: NodeId, got: NodeId },
    #[error("connected to ourselves")]
    SelfConnection,
    #[error("{0} is not a known peer and accept_unknown_peers is off")]
    UnknownPeer(NodeId),
    #[error("{new} conflicts with live connection of {live} (same node id, other incarnation)")]
    DuplicateNode { live: Origin, new: Origin },
    #[error("frame not completed within the read timeout")]
    ReadTimeout,
    #[error("nothing read within the idle timeout (half-open connection?)")]
    IdleTimeout,
    #[cfg(feature = "tls")]
    #[error("{0}")]
    Tls(TlsRefusal),
    #[cfg(feature = "tls")]
    #[error("peer claims {claimed} but its certificate does not name it")]
    IdentityMismatch { claimed: NodeId },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Read-only context shared by all tasks of one transport.
#[derive(Debug)]
struct Ctx {
    local: Origin,
    cfg: TcpConfig,
    stats: Arc<TcpStats>,
    internal: mpsc::UnboundedSender<Internal>,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
    /// Time zero of `Conn::last_read` stamps.
    epoch: Instant,
    /// Accepted connections per remote IP address.
    ip_slots: Mutex<HashMap<IpAddr, usize>>,
    /// One `LinkEvent::Frames` per read instead of a `LinkEvent::Frame` per frame.
    batch: bool,
    /// Peers that may connect without TLS (configured, allowed or added).
    known: Mutex<HashSet<NodeId>>,
    /// When a refused stranger was last warned about (see `STRANGER_WARN_EVERY`).
    last_stranger_warn: Mutex<Option<Instant>>,
    /// When another failed inbound handshake was last warned about (same interval).
    last_handshake_warn: Mutex<Option<Instant>>,
    /// Handshakes now allowed a version-1 first frame of up to `max_frame_len` (see
    /// `MAX_LARGE_FIRST_FRAMES`).
    large_first: AtomicUsize,
}

/// How many handshakes, node-wide, may read a version-1 peer's first frame of up to
/// `max_frame_len` at once; the others read frames of up to 1 KiB until the version is
/// agreed. Without TLS a node id is only a claim, so anyone who knows a configured
/// peer's id could claim it on many connections and make the node hold
/// `max_frame_len` (8 MiB) for each until the handshake timeout: about 540 MiB from
/// one address, 2.3 GiB within `max_handshaking` (tests/blackbox_liars.rs). An honest
/// version-1 peer has one handshake in flight; while an attack holds these four, its
/// large first frame is refused and it redials.
const MAX_LARGE_FIRST_FRAMES: usize = 4;

/// One of the `MAX_LARGE_FIRST_FRAMES`; given back when dropped.
struct LargeFirst<'a>(&'a AtomicUsize);

impl<'a> LargeFirst<'a> {
    fn take(count: &'a AtomicUsize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LARGE_FIRST_FRAMES).then_some(n + 1)
            })
            .ok()
            .map(|_| LargeFirst(count))
    }
}

impl Drop for LargeFirst<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ctx {
    /// May `peer` hold an inbound connection? With TLS its certificate proved it;
    /// without, it must be known unless strangers are accepted.
    fn admits(&self, peer: NodeId) -> bool {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return true;
        }
        self.cfg.accept_unknown_peers
            || self
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&peer)
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Take one connection slot of `ip`, or `None` if it holds the maximum.
    fn take_ip_slot(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut slots = self.ip_slots.lock().unwrap_or_else(|e| e.into_inner());
        let n = slots.entry(ip).or_insert(0);
        if *n >= self.cfg.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ctx: Arc::downgrade(self),
            ip,
        })
    }
}

/// One accepted connection's share of its IP address's limit; released on drop.
#[derive(Debug)]
struct IpSlot {
    ctx: std::sync::Weak<Ctx>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.upgrade() {
            let mut slots = ctx.ip_slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = slots.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    slots.remove(&self.ip);
                }
            }
        }
    }
}

/// A connection's byte stream: plain TCP or TLS over TCP.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// The leaf certificate the peer presented (TLS only; already chain-verified).
    #[cfg(feature = "tls")]
    fn peer_leaf(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s.get_ref().1.peer_certificates()?.first(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Messages from connection tasks to the manager.
#[derive(Debug)]
enum Internal {
    Established(Established),
    Closed { peer: NodeId, conn_id: u64 },
}

#[derive(Debug)]
struct Established {
    origin: Origin,
    dialed_by: NodeId,
    stream: Stream,
    /// The negotiated protocol version.
    version: u16,
    /// Frames received during the negotiation, to hand on first.
    early: Vec<Frame>,
    /// Bytes read past the negotiation.
    buf: BytesMut,
    remote: SocketAddr,
    /// Accepted connections hold their IP address's slot for their whole life.
    slot: Option<IpSlot>,
    /// Already held back once for an identity conflict (see `RESTART_GRACE`).
    deferred: bool,
    /// Our dial, finished after the peer's connection superseded it (see
    /// [`DIAL_SUPERSEDED`]).
    superseded: bool,
}

/// How long a connection from a new incarnation of a peer whose connection still looks
/// alive is held back before it counts as an identity conflict: a cleanly restarted
/// process connects right after the old one closed its socket, before this side has
/// read the end. (Regression: such restarts were refused and reported as conflicts.)
const RESTART_GRACE: Duration = Duration::from_millis(50);

/// A connection that closes sooner than this after its handshake, with nothing read
/// after the handshake, does not reset the redial backoff: a peer that completes the
/// handshake and then closes (it refuses a duplicate node id, or crashes on each
/// connection) is redialed with the backoff of failed dials, not every `backoff_min` —
/// growing only to [`SHORT_LIVED_MAX_ATTEMPT`]'s delay, since a restarted process is
/// refused the same way until the peer has seen its old connection end, and must get
/// in soon after. A connection that carried anything is redialed at once (after
/// `backoff_min`), however short it lived.
const SHORT_LIVED: Duration = Duration::from_secs(1);

/// The redial after a run of short-lived connections waits at most as after this many
/// failed dials: `backoff_min · 2⁴` (400–800 ms by default).
const SHORT_LIVED_MAX_ATTEMPT: u32 = 4;

/// Short-lived connections in a row after which the dialer warns (once per run).
const SHORT_LIVED_WARN_AFTER: u32 = 3;

/// How long a shutting-down transport waits for connected writers to drain their
/// queues before it closes the connections.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(500);

/// A peer's outbound frames, shared by the manager (producer) and the current writer.
#[derive(Debug, Default)]
struct PeerQueue {
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    frames: VecDeque<Frame>,
    /// The connection whose writer may take frames. A writer of any other connection
    /// (one being torn down) stops instead of taking frames it could not deliver.
    owner: Option<u64>,
    /// The owner's writer has taken frames it has not written and flushed yet.
    in_hand: bool,
}

impl PeerQueue {
    fn set_owner(&self, owner: Option<u64>) {
        self.lock().owner = owner;
        // Wake a superseded writer so it notices and exits.
        self.notify.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Only plain pushes/swaps happen under the lock; a poisoned lock still holds a
        // consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Peer {
    addr: Option<SocketAddr>,
    queue: Arc<PeerQueue>,
    conn: Option<Conn>,
    dialer: Option<Dialer>,
    /// Connections in a row that closed within [`SHORT_LIVED`] of opening: the redial
    /// after the next close backs off as after this many failed dials.
    short_lived: u32,
}

/// A peer's dialer task and what the manager may see and change of it.
#[derive(Debug)]
struct Dialer {
    task: JoinHandle<()>,
    state: Arc<DialState>,
}

/// Shared between a dialer task and the manager: [`DIAL_IDLE`], [`DIAL_BUSY`],
/// [`DIAL_SUPERSEDED`] or [`DIAL_EXITED`], changed only by compare-and-swap, so the
/// manager never supersedes a dialer that is not in an attempt, and a superseded
/// dialer either is revived or stops, never both.
#[derive(Debug, Default)]
struct DialState(AtomicU8);

/// Waiting out a backoff between attempts.
const DIAL_IDLE: u8 = 0;
/// Connecting or handshaking.
const DIAL_BUSY: u8 = 1;
/// A connection came from the peer while this dial was connecting or handshaking:
/// the dial finishes its attempt (if it connects, its connection is the one both
/// sides keep), but does not try again.
const DIAL_SUPERSEDED: u8 = 2;
/// A superseded dialer's attempt failed and it stopped.
const DIAL_EXITED: u8 = 3;

impl DialState {
    fn swap_if(&self, from: u8, to: u8) -> Result<u8, u8> {
        self.0
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
    }
}

impl Dialer {
    fn abort(&self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Conn {
    id: u64,
    origin: Origin,
    dialed_by: NodeId,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// When the reader last received bytes, and whether it has stopped.
    last_read: Arc<Liveness>,
    opened: Instant,
    _slot: Option<IpSlot>,
}

/// What the manager sees of a connection's reader without asking it.
#[derive(Debug)]
struct Liveness {
    /// `Ctx::millis` when the reader last received bytes.
    last_read: AtomicU64,
    /// The reader has stopped (the peer closed the connection, or it failed).
    ended: AtomicBool,
    /// Bytes came after the handshake (see [`SHORT_LIVED`]).
    heard: AtomicBool,
}

impl Conn {
    fn abort(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

#[derive(Debug)]
struct Manager {
    ctx: Arc<Ctx>,
    events: mpsc::Sender<LinkEvent>,
    commands: mpsc::Receiver<LinkCommand>,
    /// Commands taken in while an event waited for room (see [`Manager::emit`]),
    /// handled before any newer one.
    backlog: VecDeque<LinkCommand>,
    peers: rustc_hash::FxHashMap<NodeId, Peer>,
    next_conn_id: u64,
    acceptor: JoinHandle<()>,
    /// Rate limit of the duplicate-node warning.
    last_conflict_warn: Option<Instant>,
}

impl Manager {
    async fn run(mut self, mut internal: mpsc::UnboundedReceiver<Internal>) {
        loop {
            if let Some(cmd) = self.backlog.pop_front() {
                if !self.command(cmd).await {
                    break;
                }
                continue;
            }
            tokio::select! {
                biased;
                Some(msg) = internal.recv() => match msg {
                    Internal::Established(e) => self.established(e).await,
                    Internal::Closed { peer, conn_id } => self.closed(peer, conn_id).await,
                },
                cmd = self.commands.recv() => {
                    if !self.command(cmd.unwrap_or(LinkCommand::Shutdown)).await {
                        break;
                    }
                }
            }
        }
        self.shutdown().await;
    }

    /// Carries out `cmd`; `false` once the transport is to stop.
    async fn command(&mut self, cmd: LinkCommand) -> bool {
        match cmd {
            LinkCommand::Send { peer, frames } => self.send(peer, frames).await,
            LinkCommand::AddPeer { peer, addr } => self.add_peer(peer, addr),
            LinkCommand::Withdraw { peer, messages } => self.withdraw(peer, &messages),
            LinkCommand::RemovePeer { peer } => self.remove_peer(peer),
            LinkCommand::Shutdown => return false,
        }
        true
    }

    /// Reports a peer's change to the node. While the event channel is full, keeps
    /// taking commands into `backlog`: the node's driver may wait for room in the
    /// command channel before it reads events again, and two tasks each waiting for
    /// the other's channel would hang the node for good. (Regression: with more peers
    /// coming up than the event channel holds, `tests/integration/transport_tcp.rs`.)
    async fn emit(&mut self, event: LinkEvent) {
        let events = self.events.clone();
        let room = events.reserve();
        tokio::pin!(room);
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                permit = &mut room => {
                    if let Ok(permit) = permit {
                        permit.send(event);
                    }
                    return;
                }
                cmd = self.commands.recv(), if open => match cmd {
                    Some(cmd) => self.backlog.push_back(cmd),
                    None => {
                        open = false;
                        self.backlog.push_back(LinkCommand::Shutdown);
                    }
                },
            }
        }
    }

    fn peer(&mut self, id: NodeId) -> &mut Peer {
        self.peers.entry(id).or_insert_with(|| Peer {
            addr: None,
            queue: Arc::default(),
            conn: None,
            dialer: None,
            short_lived: 0,
        })
    }

    /// Drops the queued data frames of withdrawn messages (see
    /// [`LinkCommand::Withdraw`]): a message handed off or given up while its peer was
    /// away must not be written to the peer's next connection from this queue.
    fn withdraw(&mut self, peer: NodeId, messages: &[(ChannelId, u64)]) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let gone: HashSet<(ChannelId, u64)> = messages.iter().copied().collect();
        let mut q = p.queue.lock();
        let before = q.frames.len();
        q.frames
            .retain(|f| !matches!(f, Frame::Data(d) if gone.contains(&(d.channel, d.seq))));
        let dropped = before - q.frames.len();
        drop(q);
        if dropped > 0 {
            self.ctx.stats.add(Counter::FramesWithdrawn, dropped as u64);
            tracing::debug!(%peer, dropped, "tcp: frames of withdrawn messages dropped");
        }
    }

    async fn send(&mut self, peer: NodeId, mut frames: Vec<Frame>) {
        let bound = self.ctx.cfg.queue_bound;
        let stats = Arc::clone(&self.ctx.stats);
        if peer == self.ctx.local.node {
            stats.add(Counter::FramesDroppedDisconnected, frames.len() as u64);
            tracing::warn!(%peer, "tcp: frames addressed to ourselves dropped");
            return;
        }
        let p = self.peer(peer);
        let conn = p.conn.as_ref().map(|c| c.id);
        if conn.is_none() {
            // A heartbeat is about the connection it travels on: one queued for a peer
            // without a connection would only be written, stale, on the next one, which
            // starts its own. Not queued. (Regression: a departed peer that was never
            // decommissioned is pinged every heartbeat interval for as long as the node
            // runs, and each ping waited in its queue: `queue_bound` frames per departed
            // id, kept for good.)
            // A node credit grant is too: it counts the frames of the connection it was
            // made on, and both ends count afresh on the next one (its Up brings a new
            // grant). (Regression: a stale grant was written on the next connection,
            // and its sender took that run's total for this one's limit: node credit
            // was off.)
            frames.retain(|f| !is_per_connection(f));
            if frames.is_empty() {
                self.ensure_dialing(peer, false);
                return;
            }
        }
        let (dropped, stalled) = {
            let q = &mut p.queue.lock().frames;
            q.extend(frames);
            // A connected peer's queue is trimmed only once it holds
            // `STALLED_FACTOR × queue_bound` frames: what the node sends is bounded end
            // to end (each stream's credit and window), so a peer that reads never
            // gets there and nothing is dropped on a healthy link, at-most-once
            // included. What is not bounded is the replies a peer asks for (a pong per
            // ping, a reject per refused message): a peer that asks and never reads is
            // disconnected at that mark, and its queue cut to the bound. (Regression:
            // a ping flood from a peer that did not read queued millions of pongs.)
            let limit = if conn.is_some() {
                bound.saturating_mul(STALLED_FACTOR)
            } else {
                bound
            };
            let stalled = conn.is_some() && q.len() > limit;
            let over = if stalled {
                q.len().saturating_sub(bound)
            } else {
                q.len().saturating_sub(limit)
            };
            q.drain(..over);
            (over, stalled)
        };
        p.queue.notify.notify_one();
        if dropped > 0 {
            let c = if stalled {
                Counter::FramesDroppedBacklog
            } else {
                Counter::FramesDroppedDisconnected
            };
            stats.add(c, dropped as u64);
            tracing::debug!(%peer, dropped, stalled, "tcp: peer queue full, oldest frames dropped");
        }
        match conn {
            Some(conn_id) if stalled => {
                stats.inc(Counter::StalledPeersDisconnected);
                tracing::warn!(%peer, "tcp: peer does not read what it is sent: disconnected");
                self.closed(peer, conn_id).await;
            }
            Some(_) => {}
            None => self.ensure_dialing(peer, false),
        }
    }

    fn add_peer(&mut self, peer: NodeId, addr: SocketAddr) {
        if peer == self.ctx.local.node {
            return;
        }
        self.ctx
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer);
        let p = self.peer(peer);
        if p.addr != Some(addr) {
            p.addr = Some(addr);
            if let Some(d) = p.dialer.take() {
                d.abort();
            }
        }
        self.ensure_dialing(peer, false);
    }

    /// `peer` is gone for good ([`LinkCommand::RemovePeer`]): no address, no dialer,
    /// and without a connection no entry either (its queue of frames goes with it,
    /// counted as dropped while disconnected). (Regression: a decommissioned peer with
    /// an address was redialed every `backoff_max` for as long as the node ran, its
    /// dialer task and queue kept: `tests/blackbox_leaks.rs`.)
    fn remove_peer(&mut self, peer: NodeId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.addr = None;
        if let Some(d) = p.dialer.take() {
            d.abort();
        }
        if p.conn.is_none() {
            if let Some(p) = self.peers.remove(&peer) {
                let dropped = p.queue.lock().frames.len();
                if dropped > 0 {
                    self.ctx
                        .stats
                        .add(Counter::FramesDroppedDisconnected, dropped as u64);
                }
            }
        }
    }

    /// Start a dialer for `peer` if it has an address, no connection and no dialer.
    /// After a lost connection (`after_backoff`) it first waits the backoff of the
    /// peer's run of short-lived connections. A superseded dialer still in its last
    /// attempt is told to go on dialing instead.
    fn ensure_dialing(&mut self, peer: NodeId, after_backoff: bool) {
        let ctx = Arc::clone(&self.ctx);
        let p = self.peer(peer);
        let Some(addr) = p.addr else { return };
        if p.conn.is_some() {
            return;
        }
        if let Some(d) = p.dialer.as_ref().filter(|d| !d.task.is_finished()) {
            match d.state.swap_if(DIAL_SUPERSEDED, DIAL_BUSY) {
                Err(DIAL_EXITED) => {} // it stopped: start another
                _ => return,           // revived, or dialing anyway
            }
        }
        let first_wait = after_backoff.then_some(p.short_lived.min(SHORT_LIVED_MAX_ATTEMPT));
        let state = Arc::new(DialState::default());
        p.dialer = Some(Dialer {
            task: spawn_here(dial_loop(peer, addr, ctx, first_wait, Arc::clone(&state))),
            state,
        });
    }

    async fn established(&mut self, e: Established) {
        let peer = e.origin.node;
        let local = self.ctx.local.node;
        let stats = Arc::clone(&self.ctx.stats);
        if e.dialed_by == peer && !self.ctx.admits(peer) {
            let r = Reject::UnknownPeer(peer);
            stats.inc(Counter::HandshakesFailed);
            stats.reject(&r);
            tracing::debug!(remote = %e.remote, reason = %r, "tcp: stranger refused, connection closed");
            return; // dropping e.stream closes it
        }
        let now_ms = self.ctx.millis();
        let stale_ms = u64::try_from(self.ctx.cfg.stale_after.as_millis()).unwrap_or(u64::MAX);
        let current = self.peers.get(&peer).and_then(|p| p.conn.as_ref());
        if let Some(cur) = current.filter(|c| e.superseded && c.origin != e.origin) {
            // Our superseded dial reached another incarnation than the one whose
            // connection superseded it (an old process still answering during a
            // restart): not an identity conflict, and never a replacement.
            stats.inc(Counter::DuplicateConnectionsClosed);
            tracing::debug!(%peer, remote = %e.remote, live = %cur.origin, reached = %e.origin, "tcp: superseded dial reached another incarnation, closed");
            return;
        }
        if let Some(cur) = current {
            let silent_ms = now_ms.saturating_sub(cur.last_read.last_read.load(Ordering::Relaxed));
            let ended = cur.last_read.ended.load(Ordering::Acquire) || cur.reader.is_finished();
            if cur.origin != e.origin && silent_ms < stale_ms && !ended && !e.deferred {
                // Perhaps a clean restart whose old connection is closing: look again
                // as soon as this side has read its end, or after `RESTART_GRACE`.
                let internal = self.ctx.internal.clone();
                let old = Arc::clone(&cur.last_read);
                let mut e = e;
                e.deferred = true;
                spawn_here(async move {
                    let until = tokio::time::Instant::now() + RESTART_GRACE;
                    while !old.ended.load(Ordering::Acquire) && tokio::time::Instant::now() < until
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let _ = internal.send(Internal::Established(e));
                });
                return;
            }
            if cur.origin != e.origin && silent_ms < stale_ms && !ended {
                // Two live incarnations claim one node id: the established one stays.
                let r = Reject::DuplicateNode {
                    live: cur.origin,
                    new: e.origin,
                };
                stats.reject(&r);
                let warn = self
                    .last_conflict_warn
                    .is_none_or(|t| t.elapsed() >= CONFLICT_WARN_EVERY);
                if warn {
                    self.last_conflict_warn = Some(Instant::now());
                    tracing::warn!(remote = %e.remote, reason = %r, refused_so_far = stats.snapshot().rejected_duplicate_node, "tcp: duplicate node id, newer connection refused");
                } else {
                    tracing::debug!(remote = %e.remote, reason = %r, "tcp: duplicate node id, newer connection refused");
                }
                // Surfaced to the node (never blocks the manager; the counter above
                // keeps the full count if the event queue is full).
                let _ = self.events.try_send(LinkEvent::Conflict {
                    live: cur.origin,
                    refused: e.origin,
                });
                return;
            }
        }
        let p = self.peer(peer);
        // Both sides dialed at once: the connection the lower id dialed is the one
        // both keep, so the lower id lets its own dial finish its handshake when the
        // higher id's arrives first. (Regression: it aborted that dial even when the
        // peer had already accepted it and, as the lower id's, kept it, closing its
        // own; over a slow link each side then held the connection the other had
        // dropped, and they redialed in a loop.)
        let own_dial_wins = e.dialed_by == peer && local < peer;
        match p.dialer.take() {
            Some(d)
                if own_dial_wins
                    && !d.task.is_finished()
                    && matches!(
                        d.state.swap_if(DIAL_BUSY, DIAL_SUPERSEDED),
                        Ok(_) | Err(DIAL_SUPERSEDED)
                    ) =>
            {
                p.dialer = Some(d);
            }
            Some(d) => d.abort(),
            None => {}
        }
        let mut restarted = false;
        let had_conn = p.conn.is_some();
        if let Some(cur) = &p.conn {
            let keep_new = if cur.origin != e.origin {
                restarted = true;
                true
            } else if cur.dialed_by == e.dialed_by {
                true
            } else {
                e.dialed_by == local.min(peer)
            };
            stats.inc(Counter::DuplicateConnectionsClosed);
            if !keep_new {
                tracing::debug!(%peer, remote = %e.remote, "tcp: duplicate connection closed, keeping the one dialed by the lower id");
                return; // dropping e.stream closes it
            }
            if let Some(old) = p.conn.take() {
                p.queue.set_owner(None);
                p.queue.lock().frames.retain(|f| !is_per_connection(f));
                old.abort();
                stats.inc(Counter::ConnectionsClosed);
            }
            tracing::debug!(%peer, remote = %e.remote, "tcp: connection replaced");
            if restarted {
                self.emit(LinkEvent::Down { peer }).await;
            }
        }
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        if !had_conn || restarted {
            // Before the reader starts, so Up precedes the connection's frames.
            self.emit(LinkEvent::Up {
                origin: e.origin,
                version: e.version,
            })
            .await;
        }
        let events = self.events.clone();
        let ctx = Arc::clone(&self.ctx);
        let last_read = Arc::new(Liveness {
            last_read: AtomicU64::new(now_ms),
            ended: AtomicBool::new(false),
            heard: AtomicBool::new(!e.early.is_empty() || !e.buf.is_empty()),
        });
        let p = self.peer(peer);
        let conn = ConnInfo {
            peer,
            incarnation: e.origin.incarnation,
            id,
            version: e.version,
        };
        p.queue.set_owner(Some(id));
        let queue = Arc::clone(&p.queue);
        let lr = Arc::clone(&last_read);
        let (reader, writer) = match e.stream {
            Stream::Plain(s) => {
                let (rd, wr) = s.into_split();
                spawn_io(rd, wr, e.early, e.buf, conn, events, queue, ctx, lr)
            }
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let (rd, wr) = tokio::io::split(*s);
                spawn_io(rd, wr, e.early, e.buf, conn, events, queue, ctx, lr)
            }
        };
        let p = self.peer(peer);
        p.conn = Some(Conn {
            id,
            origin: e.origin,
            dialed_by: e.dialed_by,
            reader,
            writer,
            last_read,
            opened: Instant::now(),
            _slot: e.slot,
        });
        stats.inc(Counter::ConnectionsOpened);
        tracing::info!(peer = %e.origin, remote = %e.remote, dialed_by = %e.dialed_by, version = e.version, "tcp: connected");
    }

    async fn closed(&mut self, peer: NodeId, conn_id: u64) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.conn.as_ref().is_none_or(|c| c.id != conn_id) {
            return; // an already replaced connection
        }
        if let Some(c) = p.conn.take() {
            p.queue.set_owner(None);
            p.queue.lock().frames.retain(|f| !is_per_connection(f));
            let heard = c.last_read.heard.load(Ordering::Relaxed);
            p.short_lived = if !heard && c.opened.elapsed() < SHORT_LIVED {
                p.short_lived.saturating_add(1)
            } else {
                0
            };
            if p.short_lived == SHORT_LIVED_WARN_AFTER {
                tracing::warn!(%peer, in_a_row = p.short_lived, "tcp: the peer closes each connection right after its handshake (it may refuse this node, e.g. another live process uses this node id); redialing with backoff");
            }
            c.abort();
        }
        self.ctx.stats.inc(Counter::ConnectionsClosed);
        tracing::info!(%peer, "tcp: disconnected");
        self.emit(LinkEvent::Down { peer }).await;
        self.ensure_dialing(peer, true);
    }

    async fn shutdown(mut self) {
        self.acceptor.abort();
        let _ = (&mut self.acceptor).await;
        // Give connected writers a moment to put what is queued on the wire (the last
        // acks, a clean shutdown's finish frames): bounded, never a hang.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
        while tokio::time::Instant::now() < deadline {
            // What the writers have taken counts too: a batch still being written (to
            // a peer reading slowly) holds the last frames, a clean shutdown's
            // `Finish` among them. (Regression: only the shared queue was looked at,
            // and those were aborted with the writer.)
            let pending = self.peers.values().any(|p| {
                p.conn.is_some() && {
                    let q = p.queue.lock();
                    !q.frames.is_empty() || q.in_hand
                }
            });
            if !pending {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::task::yield_now().await;
        for (_, p) in self.peers.drain() {
            if let Some(d) = p.dialer {
                d.abort();
                let _ = d.task.await;
            }
            if let Some(c) = p.conn {
                c.abort();
                let _ = c.reader.await;
                let _ = c.writer.await;
                self.ctx.stats.inc(Counter::ConnectionsClosed);
            }
        }
        tracing::info!(node = %self.ctx.local, "tcp: shut down");
    }
}

/// At most one warning per this long that `max_handshaking` was reached (the
/// evictions in between are counted in `evicted_handshakes`, and logged at debug).
const HANDSHAKE_LIMIT_WARN_EVERY: Duration = Duration::from_secs(1);
/// At most one "accept failed" warning per this long.
const ACCEPT_FAILED_WARN_EVERY: Duration = Duration::from_secs(10);

/// The accepted connections in their handshake, oldest first, so that the node can
/// hold at most `max_handshaking` of them and, at that bound, close the oldest to make
/// room for a new one. (Regression: only the per-address limit applied, so an outsider
/// holding 64 idle connections from each of many addresses made the node hold
/// thousands of descriptors until their handshake timeouts, and the process ran out of
/// them. Then the bound refused the NEW connection, so an outsider reopening its idle
/// connections as they timed out, about 50 a second, kept every new peer out.)
struct Handshaking {
    tasks: JoinSet<()>,
    /// Abort handles in accept order. Entries of tasks that ended on their own stay
    /// until they reach the front or the queue is compacted (see `admit`).
    order: std::collections::VecDeque<tokio::task::AbortHandle>,
    /// Tasks in their handshake: spawned, not joined, not evicted.
    live: usize,
    /// Evicted tasks not joined yet (so that their join does not count them twice).
    evicted: std::collections::HashSet<tokio::task::Id>,
}

impl Handshaking {
    fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            order: std::collections::VecDeque::new(),
            live: 0,
            evicted: std::collections::HashSet::new(),
        }
    }

    /// A joined task leaves the count, unless it left it when evicted.
    fn joined(&mut self, id: tokio::task::Id) {
        if !self.evicted.remove(&id) {
            self.live -= 1;
        }
    }

    /// Closes the oldest connection still in its handshake (aborting its task drops
    /// its socket). False if there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some(h) = self.order.pop_front() {
            if !h.is_finished() {
                h.abort();
                self.evicted.insert(h.id());
                self.live -= 1;
                return true;
            }
        }
        false
    }

    fn admit(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let h = self.tasks.spawn(task);
        self.order.push_back(h);
        self.live += 1;
        // Drop the entries of tasks that ended on their own once they are over half the
        // queue: each compaction removes more than half its entries, so it costs O(1)
        // per accept, amortised, and the queue stays under 2 * live + 64 entries.
        if self.order.len() > 2 * self.live + 64 {
            self.order.retain(|h| !h.is_finished());
        }
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, stop: Arc<tokio::sync::Notify>) {
    let mut handshaking = Handshaking::new();
    let max = ctx.cfg.max_handshaking;
    let mut last_limit_warn: Option<Instant> = None;
    let mut evicted_since_warn = 0u64;
    let mut last_accept_warn: Option<Instant> = None;
    let mut accept_failed_since_warn = 0u64;
    loop {
        tokio::select! {
            // The node is going away: drop the listener (and the handshakes in
            // progress) now, not when the manager gets to its `Shutdown`.
            () = stop.notified() => return,
            res = listener.accept() => match res {
                Ok((tcp, remote)) => {
                    let Some(slot) = ctx.take_ip_slot(remote.ip()) else {
                        ctx.stats.inc(Counter::RejectedIpLimit);
                        tracing::debug!(%remote, "tcp: connection limit of the address reached, connection closed");
                        continue; // dropping tcp closes it
                    };
                    // Count the handshakes that ended but are not joined yet first.
                    while let Some(res) = handshaking.tasks.try_join_next_with_id() {
                        handshaking.joined(res.map_or_else(|e| e.id(), |(id, ())| id));
                    }
                    // At the bound the OLDEST handshake makes room: an outsider must
                    // open `max_handshaking` connections within one honest handshake's
                    // round trip to keep a new peer out, not merely keep that many open.
                    if handshaking.live >= max && handshaking.evict_oldest() {
                        ctx.stats.inc(Counter::EvictedHandshakes);
                        evicted_since_warn += 1;
                        if last_limit_warn.is_none_or(|t| t.elapsed() >= HANDSHAKE_LIMIT_WARN_EVERY) {
                            tracing::warn!(
                                %remote,
                                evicted_since_last_warning = evicted_since_warn,
                                max_handshaking = max,
                                "tcp: too many connections in their handshake, the oldest closed"
                            );
                            last_limit_warn = Some(Instant::now());
                            evicted_since_warn = 0;
                        } else {
                            tracing::debug!(%remote, "tcp: handshake limit reached, the oldest handshake closed");
                        }
                    }
                    let ctx = Arc::clone(&ctx);
                    handshaking.admit(tracing::Instrument::instrument(async move {
                        let _ = tcp.set_nodelay(true);
                        // A failure is counted and logged inside. Nothing after it
                        // awaits, so an eviction cannot cut an established connection.
                        let handshaken = secure_and_handshake(tcp, &ctx, None, remote).await;
                        if let Ok((hs, stream)) = handshaken {
                            let _ = ctx.internal.send(Internal::Established(Established {
                                origin: hs.origin,
                                dialed_by: hs.origin.node,
                                stream,
                                version: hs.version,
                                early: hs.early,
                                buf: hs.buf,
                                remote,
                                slot: Some(slot),
                                deferred: false,
                                superseded: false,
                            }));
                        }
                    }, tracing::Span::current()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning, and
                    // warn at most every 10 s (it repeats ten times a second).
                    ctx.stats.inc(Counter::AcceptFailures);
                    accept_failed_since_warn += 1;
                    if last_accept_warn.is_none_or(|t| t.elapsed() >= ACCEPT_FAILED_WARN_EVERY) {
                        tracing::warn!(
                            error = %e,
                            failures_since_last_warning = accept_failed_since_warn,
                            "tcp: accept failed; retrying every 100 ms"
                        );
                        last_accept_warn = Some(Instant::now());
                        accept_failed_since_warn = 0;
                    } else {
                        tracing::debug!(error = %e, "tcp: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(res) = handshaking.tasks.join_next_with_id(), if !handshaking.tasks.is_empty() => {
                handshaking.joined(res.map_or_else(|e| e.id(), |(id, ())| id));
            }
        }
    }
}

fn handshake_failed(ctx: &Ctx, r: &Reject, remote: SocketAddr, peer: Option<NodeId>) {
    ctx.stats.inc(Counter::HandshakesFailed);
    ctx.stats.reject(r);
    // Accepting, anyone who reaches the port can fail a handshake (a port scan, a
    // connect-and-close loop, a load balancer's TCP check, plain TCP to a TLS node,
    // a version we do not speak), as often as it connects: such warnings come at most
    // every `STRANGER_WARN_EVERY`, the rest at debug level; each failure is counted in
    // `TcpStats` by its reason.
    let due = |last: &Mutex<Option<Instant>>| {
        let now = Instant::now();
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|t| now.duration_since(t) >= STRANGER_WARN_EVERY);
        if due {
            *last = Some(now);
        }
        due
    };
    match r {
        Reject::Incompatible(v) if peer.is_some() || due(&ctx.last_handshake_warn) => {
            tracing::warn!(
                %remote, ?peer, ours = %v.ours, theirs = %v.theirs,
                "tcp: no common protocol version, connection closed"
            )
        }
        // Also a peer missing from our configuration: its own interval, and advice.
        Reject::UnknownPeer(claimed) => {
            if due(&ctx.last_stranger_warn) {
                tracing::warn!(
                    %remote, peer = %claimed,
                    refused_so_far = ctx.stats.snapshot().rejected_unknown_peer,
                    "tcp: refused a connection from {claimed}, not an admitted peer of this node; \
                     if it should talk to this node, add it here with `allow_peer` (or `peer`)"
                );
            } else {
                tracing::debug!(%remote, reason = %r, "tcp: stranger refused, connection closed")
            }
        }
        // Dialing: the peer closed before answering, most likely because it does not
        // admit us; `dial_loop` warns about it, rate-limited.
        Reject::Closed if peer.is_some() => {
            tracing::debug!(%remote, ?peer, reason = %r, "tcp: handshake failed, connection closed")
        }
        _ if peer.is_some() => {
            tracing::warn!(%remote, ?peer, reason = %r, "tcp: handshake failed, connection closed")
        }
        _ if matches!(r, Reject::Incompatible(_)) || !due(&ctx.last_handshake_warn) => {
            tracing::debug!(%remote, reason = %r, "tcp: inbound handshake failed, connection closed")
        }
        _ => tracing::warn!(
            %remote, reason = %r,
            failed_so_far = ctx.stats.snapshot().handshakes_failed,
            "tcp: inbound handshake failed, connection closed (more within 10 s at debug level)"
        ),
    }
}

/// Wrap `tcp` in TLS if configured (accepting when `expected` is `None`, dialing
/// `expected` otherwise), exchange handshakes, and check that the claimed node id is the
/// one the certificate names.
async fn secure_and_handshake(
    tcp: TcpStream,
    ctx: &Ctx,
    expected: Option<NodeId>,
    remote: SocketAddr,
) -> Result<(Handshaken, Stream), Counted> {
    // One deadline for TLS and the handshake together. (Regression: each had its own
    // `handshake_timeout`, so a certificate holder could keep a half-open connection
    // for twice the documented limit.)
    let deadline = deadline_in(ctx.cfg.handshake_timeout);
    #[cfg(feature = "tls")]
    let mut stream = match &ctx.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let secured = async {
                match expected {
                    None => tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server))
                        .accept(tcp)
                        .await
                        .map(tokio_rustls::TlsStream::from),
                    Some(peer) => tokio_rustls::TlsConnector::from(Arc::clone(&tls.client))
                        .connect(tls::server_name(peer), tcp)
                        .await
                        .map(tokio_rustls::TlsStream::from),
                }
            };
            match tokio::time::timeout_at(deadline, secured).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    handshake_failed(ctx, &Reject::Tls(TlsRefusal::of(&e)), remote, expected);
                    return Err(Counted {
                        closed_by_peer: false,
                    });
                }
                Err(_) => {
                    handshake_failed(ctx, &Reject::Tls(TlsRefusal::Other), remote, expected);
                    return Err(Counted {
                        closed_by_peer: false,
                    });
                }
            }
        }
    };
    #[cfg(not(feature = "tls"))]
    let mut stream = Stream::Plain(tcp);
    // The claim is checked against the certificate inside, as soon as it is read.
    match handshake(&mut stream, ctx, expected, deadline).await {
        Ok(hs) => Ok((hs, stream)),
        Err(r) => {
            // Counted while the connection is still open, so a peer that sees it
            // close finds the refusal in the stats already.
            handshake_failed(ctx, &r, remote, expected);
            Err(Counted {
                closed_by_peer: matches!(r, Reject::Closed),
            })
        }
    }
}

/// A failed handshake, already counted and logged by [`handshake_failed`].
#[derive(Debug)]
struct Counted {
    /// The peer closed the connection before completing the handshake: dialing, most
    /// likely a peer that does not admit us (the dialer warns, rate-limited).
    closed_by_peer: bool,
}

/// A completed handshake.
#[derive(Debug)]
struct Handshaken {
    origin: Origin,
    version: u16,
    early: Vec<Frame>,
    /// Bytes read past the negotiation (encoded for `version`).
    buf: BytesMut,
}

/// Bytes a peer may send before the version is agreed, beyond its largest frame: a
/// handshake, a probe or a version-1 peer's first frame (up to `max_frame_len`), and
/// what follows them in the same reads. Bounded, so a peer that is not even up cannot
/// make us hold more; a stranger is refused at its handshake, before any of it.
const EARLY_SLACK: usize = 1 << 20;

/// Exchange handshakes and agree on a protocol version.
///
/// The dialing side (`expected` is `Some`) writes its whole opening (handshake and
/// version probe) first and then reads. The accepting side writes its handshake frame,
/// then reads the dialer's handshake and checks the claim (ourselves, a stranger, a
/// claim its certificate does not back) *before* it writes the rest of its opening: a
/// refused dialer must never receive a complete handshake, or it would count the
/// connection as established, report the peer up and redial at once when it is closed.
/// (Regression: the acceptor wrote all of its opening first, so a node that was not
/// admitted saw its peer `Up` for ever and reconnected ~20 times a second.) A dialer
/// speaking version 2 or later completes only with our probe; a dialer that speaks
/// only version 1 completes on our handshake frame alone, so it still sees a refused
/// connection open and close.
async fn handshake(
    stream: &mut Stream,
    ctx: &Ctx,
    expected: Option<NodeId>,
    deadline: tokio::time::Instant,
) -> Result<Handshaken, Reject> {
    let exchange = async {
        let mut negotiation = Negotiation::new(ctx.local, ctx.cfg.versions);
        // Our handshake frame, and what follows it (the version probe, unless we speak
        // only version 1).
        let (mut hello, mut rest) = (BytesMut::new(), BytesMut::new());
        let enc = FrameEncoder::default().with_version(1);
        for (i, frame) in negotiation.opening().iter().enumerate() {
            let out = if i == 0 { &mut hello } else { &mut rest };
            enc.encode(frame, out)
                .map_err(|_| Reject::UnexpectedFrame)?;
        }
        if expected.is_some() {
            // Dialing: all of it at once.
            hello.extend_from_slice(&rest);
            rest.clear();
        }
        stream.write_all(&hello).await?;
        // The handshake frame is small; frames a version-1 peer sends before it answers
        // the probe may be as large as any frame.
        let mut dec = FrameDecoder::new(HANDSHAKE_MAX_FRAME_LEN).with_version(1);
        let mut buf = BytesMut::with_capacity(256);
        let mut read = 0usize;
        let mut early_limit = ctx.cfg.max_frame_len.saturating_add(EARLY_SLACK);
        let mut checked = false;
        let mut _large_first = None;
        loop {
            match dec.decode(&mut buf)? {
                Some(frame) => {
                    let step = negotiation.on_frame(frame);
                    if !checked {
                        if let Some((claimed, their_min)) = negotiation.claimed() {
                            checked = true;
                            // Refused: the peer never gets the rest of our opening.
                            check_claim(stream, ctx, expected, claimed.node)?;
                            if !rest.is_empty() {
                                stream.write_all(&rest.split()).await?;
                            }
                            // A node speaking version 2 or later sends its small probe
                            // next; only a version-1 node's first frame may be large.
                            let large = if their_min == 1 {
                                LargeFirst::take(&ctx.large_first)
                            } else {
                                None
                            };
                            let next = if large.is_some() {
                                ctx.cfg.max_frame_len
                            } else {
                                early_limit = read.saturating_add(EARLY_SLACK);
                                HANDSHAKE_MAX_FRAME_LEN
                            };
                            _large_first = large;
                            dec = FrameDecoder::new(next).with_version(1);
                        }
                    }
                    match step {
                        Ok(NegotiationStep::NeedFrame) => {
                            if !checked {
                                return Err(Reject::UnexpectedFrame);
                            }
                        }
                        Ok(NegotiationStep::Done {
                            origin,
                            version,
                            early,
                        }) => {
                            // The connection's own decoder starts afresh: a buffer
                            // grown for a large early frame is left to that frame
                            // (see `FrameDecoder::decode`), not carried on.
                            let buf = if dec.in_large_buffer() {
                                BytesMut::from(&buf[..])
                            } else {
                                buf
                            };
                            return Ok(Handshaken {
                                origin,
                                version,
                                early,
                                buf,
                            });
                        }
                        Err(NegotiationError::Incompatible(v)) => {
                            // A handshake naming versions we do not speak: our probe
                            // still tells the peer which ones we do (it cannot complete
                            // the handshake with it).
                            if !rest.is_empty() {
                                let _ = stream.write_all(&rest.split()).await;
                            }
                            return Err(Reject::Incompatible(v));
                        }
                        Err(_) => return Err(Reject::UnexpectedFrame),
                    }
                }
                None => {
                    let n = match stream.read_buf(&mut buf).await {
                        Ok(n) => n,
                        // A peer that closes with our bytes unread resets the
                        // connection: the same refusal as a clean close.
                        Err(e) if closed_by_peer(&e) => 0,
                        Err(e) => return Err(e.into()),
                    };
                    if n == 0 {
                        return Err(match negotiation.on_closed() {
                            Some(v) => Reject::Incompatible(v),
                            None => Reject::Closed,
                        });
                    }
                    read += n;
                    if read > early_limit {
                        return Err(Reject::UnexpectedFrame);
                    }
                }
            }
        }
    };
    let hs = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| Reject::Timeout)??;
    let origin = hs.origin;
    if origin.node == ctx.local.node {
        return Err(Reject::SelfConnection);
    }
    if let Some(expected) = expected {
        if origin.node != expected {
            return Err(Reject::WrongPeer {
                expected,
                got: origin.node,
            });
        }
    }
    Ok(hs)
}

/// May the peer that claims to be `claimed` go on with the handshake? Checked as soon
/// as its handshake frame is read: ourselves, a stranger (accepting without TLS), a
/// dialed address answering as another node, a claim its TLS certificate does not name.
fn check_claim(
    stream: &Stream,
    ctx: &Ctx,
    expected: Option<NodeId>,
    claimed: NodeId,
) -> Result<(), Reject> {
    // Our own id is a self-connection (or someone posing as us): refused here, not
    // after its first frame. (Regression: claiming our id skipped the check, and a
    // version-1 claim then made us buffer a frame of up to `max_frame_len` per
    // connection until the timeout.)
    if claimed == ctx.local.node {
        return Err(Reject::SelfConnection);
    }
    match expected {
        // A stranger is refused at its handshake, before we read (and hold) what
        // follows, and before it hears ours. (Regression: it could make us buffer a
        // frame of up to `max_frame_len` first, on each of its connections.)
        None if !ctx.admits(claimed) => return Err(Reject::UnknownPeer(claimed)),
        Some(expected) if claimed != expected => {
            return Err(Reject::WrongPeer {
                expected,
                got: claimed,
            })
        }
        _ => {}
    }
    // Fails closed: a TLS stream without a peer certificate (none today: client
    // certificates are mandatory and sessions are never resumed) proves no identity.
    #[cfg(feature = "tls")]
    if matches!(stream, Stream::Tls(_)) {
        match stream.peer_leaf() {
            Some(leaf) if tls::cert_names_node(leaf, claimed) => {}
            _ => return Err(Reject::IdentityMismatch { claimed }),
        }
    }
    #[cfg(not(feature = "tls"))]
    let _ = stream;
    Ok(())
}

/// Did the peer close (or reset) the connection, as opposed to a local failure?
/// Frames about the connection they travel on (heartbeats, node credit grants): never
/// carried over to the next one.
fn is_per_connection(f: &Frame) -> bool {
    matches!(f, Frame::Ping(_) | Frame::Pong(_) | Frame::NodeCredit(_))
}

fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

/// The redial backoff, the same [`Backoff`] as message retries: the delay before
/// attempt `n` (0-based) is `backoff_min · 2ⁿ` capped at `backoff_max`, drawn uniformly
/// from its upper half (equal jitter), as [`Backoff::delay`]`(cfg.backoff_min, n)`.
fn redial_backoff(cfg: &TcpConfig, seed: u64) -> Backoff {
    Backoff::with_cap(cfg.backoff_max, true, seed)
}

/// A failed dial of a configured peer: warn on the first failure and then at most every
/// [`CONNECT_WARN_EVERY`] per peer (with the attempt count), debug otherwise.
fn connect_failed(
    peer: NodeId,
    addr: SocketAddr,
    attempt: u32,
    error: &dyn std::fmt::Display,
    warned: &mut Option<tokio::time::Instant>,
) {
    let now = tokio::time::Instant::now();
    if warned.is_none_or(|t| now.duration_since(t) >= CONNECT_WARN_EVERY) {
        *warned = Some(now);
        tracing::warn!(%peer, %addr, attempts = attempt + 1, %error, "tcp: cannot connect to peer; retrying with backoff");
    } else {
        tracing::debug!(%peer, %addr, attempt, %error, "tcp: connect failed");
    }
}

/// Least time between two warn lines about one peer's failed dials.
const CONNECT_WARN_EVERY: Duration = Duration::from_secs(30);

/// Least time between two warn lines about refused strangers (the rest at debug).
const STRANGER_WARN_EVERY: Duration = Duration::from_secs(10);

/// `first_wait`: wait first, as after this many failed dials (see [`SHORT_LIVED`]); the
/// attempts after it continue from there.
async fn dial_loop(
    peer: NodeId,
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    first_wait: Option<u32>,
    state: Arc<DialState>,
) {
    let mut backoff = redial_backoff(&ctx.cfg, seed_from_entropy());
    let mut attempt = first_wait.unwrap_or(0);
    let mut warned: Option<tokio::time::Instant> = None;
    let mut refused_warned: Option<tokio::time::Instant> = None;
    if let Some(n) = first_wait {
        tokio::time::sleep(backoff.delay(ctx.cfg.backoff_min, n)).await;
    }
    loop {
        tracing::debug!(%peer, %addr, attempt, "tcp: dialing");
        let _ = state.swap_if(DIAL_IDLE, DIAL_BUSY);
        match tokio::time::timeout(ctx.cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                // A failure is counted and logged inside; it backs off like a failed
                // connect.
                match secure_and_handshake(tcp, &ctx, Some(peer), addr).await {
                    Ok((hs, stream)) => {
                        let _ = ctx.internal.send(Internal::Established(Established {
                            origin: hs.origin,
                            dialed_by: ctx.local.node,
                            stream,
                            version: hs.version,
                            early: hs.early,
                            buf: hs.buf,
                            remote: addr,
                            slot: None,
                            deferred: false,
                            superseded: state.0.load(Ordering::Acquire) == DIAL_SUPERSEDED,
                        }));
                        return;
                    }
                    Err(Counted {
                        closed_by_peer: true,
                    }) => connect_failed(
                        peer,
                        addr,
                        attempt,
                        &"the peer closed the connection during the handshake (it may not \
                          admit this node: `allow_peer` or `peer` on the receiving node)",
                        &mut refused_warned,
                    ),
                    Err(_) => {}
                }
            }
            Ok(Err(e)) => {
                ctx.stats.inc(Counter::ConnectFailures);
                connect_failed(peer, addr, attempt, &e, &mut warned);
            }
            Err(_) => {
                ctx.stats.inc(Counter::ConnectFailures);
                connect_failed(peer, addr, attempt, &"timed out", &mut warned);
            }
        }
        // Back to waiting, unless superseded: then stop, unless revived meanwhile.
        while let Err(DIAL_SUPERSEDED) = state.swap_if(DIAL_BUSY, DIAL_IDLE) {
            if state.swap_if(DIAL_SUPERSEDED, DIAL_EXITED).is_ok() {
                return; // the peer's connection is up; the manager redials if it goes
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(backoff.delay(ctx.cfg.backoff_min, attempt)).await;
    }
}

/// Start a connection's reader and writer tasks over its two halves.
#[allow(clippy::too_many_arguments)]
fn spawn_io<R, W>(
    rd: R,
    wr: W,
    early: Vec<Frame>,
    buf: BytesMut,
    conn: ConnInfo,
    events: mpsc::Sender<LinkEvent>,
    queue: Arc<PeerQueue>,
    ctx: Arc<Ctx>,
    last_read: Arc<Liveness>,
) -> (JoinHandle<()>, JoinHandle<()>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let reader = spawn_here(read_loop(
        rd,
        early,
        buf,
        conn,
        events,
        Arc::clone(&ctx),
        last_read,
    ));
    let writer = spawn_here(write_loop(wr, queue, conn, ctx));
    (reader, writer)
}

/// Which connection a reader or writer serves.
#[derive(Clone, Copy, Debug)]
struct ConnInfo {
    peer: NodeId,
    /// The peer run's incarnation, from this connection's handshake.
    incarnation: u64,
    id: u64,
    /// Negotiated protocol version.
    version: u16,
}

/// Most frames in one `LinkEvent::Frames`. The event channel holds
/// `channel_capacity` events, so at most 64 × `channel_capacity` frames (65 536 by
/// default) wait between the readers and the node: a peer flooding tiny frames is
/// then held back by TCP flow control, as with one event per frame (1 024 frames).
const MAX_FRAMES_PER_EVENT: usize = 64;

/// A handshaken peer sent a frame of `len` body bytes, over this node's `max` (its
/// sender accepts larger payloads than this node's frame limit: the two are configured
/// differently). The frame is read past and dropped, counted, and warned about once per
/// connection; returns how many bytes to skip (the frame's prefix and body).
///
/// Closing the connection instead, as before, cut every channel of the link at each
/// retransmission of that one message: at-most-once messages of other channels were
/// lost on a healthy link, and a handed-off copy kept cutting it for the hint's
/// lifetime. A started frame must still complete within `read_timeout`, so a peer
/// announcing a huge frame and sending nothing is closed as before.
fn skip_oversized(ctx: &Ctx, peer: NodeId, len: usize, max: usize, warned: &mut bool) -> usize {
    ctx.stats.inc(Counter::FramesSkippedTooLarge);
    if !std::mem::replace(warned, true) {
        tracing::warn!(
            %peer,
            len,
            max_frame_len = max,
            "tcp: peer sent a frame larger than max_frame_len; dropped (its max_payload \
             exceeds this node's frame limit; the message fails at its sender's deadline)"
        );
    } else {
        tracing::debug!(%peer, len, max_frame_len = max, "tcp: oversized frame dropped");
    }
    // Saturating: where `usize` is 32 bits a length near `u32::MAX` would overflow.
    FRAME_PREFIX_LEN.saturating_add(len)
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    early: Vec<Frame>,
    mut buf: BytesMut,
    conn: ConnInfo,
    events: mpsc::Sender<LinkEvent>,
    ctx: Arc<Ctx>,
    last_read: Arc<Liveness>,
) {
    let ConnInfo {
        peer,
        incarnation,
        id: conn_id,
        version,
    } = conn;
    let mut dec = FrameDecoder::new(ctx.cfg.max_frame_len).with_version(version);
    // One frame's event, stamped with the connection's proven peer and run.
    let one = move |frame| LinkEvent::Frame {
        peer,
        incarnation,
        frame,
    };
    for frame in early {
        ctx.stats.inc(Counter::FramesReceived);
        if events.send(one(frame)).await.is_err() {
            return;
        }
    }
    // When the frame at the head of `buf` must be complete (set while a partial frame
    // is buffered, pushed back whenever a frame completes).
    let mut frame_deadline: Option<tokio::time::Instant> = None;
    // Frames decoded from the current read, when they go up as `Frames` events.
    let mut batch: Vec<Frame> = Vec::with_capacity(MAX_FRAMES_PER_EVENT);
    // Bytes of an oversized frame still to be read past (see `skip_oversized`).
    let mut skip = 0usize;
    let mut warned_oversized = false;
    let reason: Option<Reject> = 'conn: loop {
        let mut progressed = false;
        let mut bad = None;
        loop {
            if skip > 0 {
                let n = skip.min(buf.len());
                buf.advance(n);
                skip -= n;
                // Not progress: like a frame, a skipped one must end within
                // `read_timeout` of its start.
                if skip > 0 {
                    break; // the rest of it is still to come
                }
            }
            match dec.decode(&mut buf) {
                Ok(Some(Frame::Handshake(_))) => {
                    bad = Some(Reject::UnexpectedFrame);
                    break;
                }
                Ok(Some(frame)) => {
                    progressed = true;
                    ctx.stats.inc(Counter::FramesReceived);
                    if ctx.batch {
                        batch.push(frame);
                        if batch.len() == MAX_FRAMES_PER_EVENT {
                            let frames = std::mem::replace(
                                &mut batch,
                                Vec::with_capacity(MAX_FRAMES_PER_EVENT),
                            );
                            if events
                                .send(LinkEvent::Frames {
                                    peer,
                                    incarnation,
                                    frames,
                                })
                                .await
                                .is_err()
                            {
                                return; // the node is gone (see below)
                            }
                        }
                    } else if events.send(one(frame)).await.is_err() {
                        return; // the node is gone (see below)
                    }
                }
                Ok(None) => break,
                Err(DecodeError::TooLarge { len, max }) => {
                    skip = skip_oversized(&ctx, peer, len, max, &mut warned_oversized);
                }
                Err(e) => {
                    bad = Some(Reject::Decode(e));
                    break;
                }
            }
        }
        // What arrived before a bad frame is delivered before the connection closes.
        let ev = match batch.len() {
            0 => None,
            1 => batch.pop().map(one),
            _ => Some(LinkEvent::Frames {
                peer,
                incarnation,
                frames: std::mem::replace(&mut batch, Vec::with_capacity(MAX_FRAMES_PER_EVENT)),
            }),
        };
        if let Some(ev) = ev {
            if events.send(ev).await.is_err() {
                // The node is gone: it stopped reading events as it shuts down, and
                // its transport is being told to stop. Stop reading, but do not report
                // the connection closed: the manager would drop it (and its writer)
                // before it flushes what the node queued last, such as a clean
                // shutdown's `Finish` frames, which its shutdown waits to write.
                // (Regression: a frame arriving from the peer during a shutdown lost
                // the finish frames, so the receiver kept the run's dedup streams live
                // for the 24 h retention: `tests/blackbox_leaks.rs`.)
                return;
            }
        }
        if bad.is_some() {
            break 'conn bad;
        }
        if buf.is_empty() && skip == 0 {
            frame_deadline = None;
        } else if progressed || frame_deadline.is_none() {
            frame_deadline = Some(deadline_in(ctx.cfg.read_timeout));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        let read = match frame_deadline {
            // Between frames: a live peer's heartbeats arrive well within the idle
            // timeout; silence this long is a half-open connection, which would
            // otherwise be kept (and never redialed) for good.
            None => match tokio::time::timeout(ctx.cfg.idle_timeout, rd.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break Some(Reject::IdleTimeout),
            },
            Some(d) => match tokio::time::timeout_at(d, rd.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break Some(Reject::ReadTimeout),
            },
        };
        match read {
            Ok(0) => break None,
            Ok(_) => {
                last_read.last_read.store(ctx.millis(), Ordering::Relaxed);
                if !last_read.heard.load(Ordering::Relaxed) {
                    last_read.heard.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => break Some(Reject::Io(e)),
        }
    };
    match &reason {
        Some(Reject::Io(e)) => tracing::debug!(%peer, error = %e, "tcp: read failed"),
        Some(r @ Reject::IdleTimeout) => {
            ctx.stats.reject(r);
            tracing::warn!(%peer, idle_timeout = ?ctx.cfg.idle_timeout, "tcp: nothing read from the peer within the idle timeout (half-open connection?); closed");
        }
        Some(r) => {
            ctx.stats.reject(r);
            tracing::warn!(%peer, reason = %r, "tcp: bad input, connection closed");
        }
        None => tracing::debug!(%peer, "tcp: peer closed the connection"),
    }
    last_read.ended.store(true, Ordering::Release);
    let _ = ctx.internal.send(Internal::Closed { peer, conn_id });
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    queue: Arc<PeerQueue>,
    conn: ConnInfo,
    ctx: Arc<Ctx>,
) {
    let ConnInfo {
        peer,
        id: conn_id,
        version,
        ..
    } = conn;
    let enc = FrameEncoder::new(ctx.cfg.max_frame_len).with_version(version);
    let batch_bytes = ctx.cfg.write_batch_bytes;
    // A write that makes no progress this long means the peer stopped reading; it may
    // still send (pings keep the read side alive), so only the writer can tell.
    let stall = ctx.cfg.idle_timeout;
    let mut local: VecDeque<Frame> = VecDeque::new();
    let mut buf = BytesMut::with_capacity(batch_bytes.min(1 << 20));
    let result: std::io::Result<()> = async {
        loop {
            let notified = queue.notify.notified();
            {
                let mut q = queue.lock();
                if q.owner != Some(conn_id) {
                    return Ok(()); // superseded: leave the frames to the next connection
                }
                std::mem::swap(&mut q.frames, &mut local);
                q.in_hand = !local.is_empty();
            }
            if local.is_empty() {
                notified.await;
                continue;
            }
            let mut n = 0u64;
            while let Some(frame) = local.pop_front() {
                match enc.encode(&frame, &mut buf) {
                    Ok(()) => n += 1,
                    Err(e @ crate::wire::EncodeError::Unsupported { .. }) => {
                        // Queued before the peer's version was known (see
                        // `TcpStatsSnapshot::frames_dropped_unsupported`). (Regression:
                        // counted as oversize, with a warning.)
                        ctx.stats.inc(Counter::FramesDroppedUnsupported);
                        tracing::debug!(%peer, error = %e, "tcp: frame not sent");
                    }
                    Err(e) => {
                        ctx.stats.inc(Counter::FramesDroppedOversize);
                        tracing::warn!(%peer, error = %e, "tcp: frame not sent");
                    }
                }
                if buf.len() >= batch_bytes {
                    write_all_progressing(&mut wr, &buf, stall).await?;
                    buf.clear();
                    ctx.stats.add(Counter::FramesSent, n);
                    n = 0;
                }
            }
            if !buf.is_empty() {
                write_all_progressing(&mut wr, &buf, stall).await?;
                buf.clear();
                ctx.stats.add(Counter::FramesSent, n);
            }
            // TLS may hold encrypted records back until flushed; plain TCP: no-op.
            match tokio::time::timeout(stall, wr.flush()).await {
                Ok(r) => r?,
                Err(_) => return Err(stalled_write()),
            }
            queue.lock().in_hand = false;
        }
    }
    .await;
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::TimedOut {
            ctx.stats.inc(Counter::WriteTimeouts);
            tracing::warn!(%peer, timeout = ?stall, "tcp: peer stopped reading; connection closed");
        } else {
            tracing::debug!(%peer, error = %e, "tcp: write failed");
        }
    }
    let _ = ctx.internal.send(Internal::Closed { peer, conn_id });
}

/// Spawn `fut` in the caller's span. A node starts its transport inside its `node` span
/// (`NodeBuilder::build`), and every task here spawns the next from within one, so the
/// transport's events carry the node like the driver's do.
fn spawn_here<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::task::spawn(tracing::Instrument::instrument(
        fut,
        tracing::Span::current(),
    ))
}

/// `write_all`, but failing with `TimedOut` when one `write` makes no progress for
/// `stall` (a slow reader that takes bytes keeps it going; one that stopped does not).
async fn write_all_progressing<W>(
    wr: &mut W,
    mut buf: &[u8],
    stall: Duration,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    while !buf.is_empty() {
        match tokio::time::timeout(stall, wr.write(buf)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled_write()),
        }
    }
    Ok(())
}

fn stalled_write() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "write made no progress")
}

/// `d` from now; a timeout too long to add (configs accept up to `Duration::MAX`) is
/// a deadline a generation away, not an overflow panic in a connection task.
fn deadline_in(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_bad_ones_are_refused() {
        assert_eq!(TcpConfig::default().validate(), Ok(()));
        let bad = TcpConfig {
            backoff_max: Duration::from_millis(1),
            ..TcpConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(TcpConfigError::BackoffRange { .. })
        ));
        let bad = TcpConfig {
            queue_bound: 0,
            ..TcpConfig::default()
        };
        assert_eq!(bad.validate(), Err(TcpConfigError::Zero("queue_bound")));
        let bad = TcpConfig {
            max_handshaking: 0,
            ..TcpConfig::default()
        };
        assert_eq!(bad.validate(), Err(TcpConfigError::Zero("max_handshaking")));
        let bad = TcpConfig {
            max_frame_len: 10,
            ..TcpConfig::default()
        };
        assert_eq!(bad.validate(), Err(TcpConfigError::MaxFrameLen(10)));
    }

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let cfg = TcpConfig::default();
        let mut backoff = redial_backoff(&cfg, 1);
        for attempt in 0..40 {
            let exp = (cfg.backoff_min * 2u32.pow(attempt.min(20))).min(cfg.backoff_max);
            let d = backoff.delay(cfg.backoff_min, attempt);
            assert!(
                d >= exp / 2 && d <= exp,
                "attempt {attempt}: {d:?} vs {exp:?}"
            );
        }
        // `backoff_max` bounds the delay however many attempts failed.
        let wide = TcpConfig {
            backoff_max: Duration::from_secs(3600),
            ..TcpConfig::default()
        };
        let mut backoff = redial_backoff(&wide, 2);
        for attempt in [20, 63, 64, u32::MAX] {
            let d = backoff.delay(wide.backoff_min, attempt);
            assert!(d >= wide.backoff_max / 2 && d <= wide.backoff_max, "{d:?}");
        }
    }

    /// A node's heartbeat interval raises a given transport's idle timeout to three
    /// intervals (never lowers it), as `TcpConfig::idle_timeout` documents.
    #[test]
    fn heartbeat_interval_raises_the_idle_timeout() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut t = TcpTransport::new(addr, TcpConfig::default()).unwrap();
        t.heartbeat_interval(Duration::from_secs(1));
        assert_eq!(t.config.idle_timeout, Duration::from_secs(10));
        t.heartbeat_interval(Duration::from_secs(7));
        assert_eq!(t.config.idle_timeout, Duration::from_secs(21));
        t.heartbeat_interval(Duration::MAX);
        assert_eq!(t.config.idle_timeout, Duration::MAX);
    }
}
