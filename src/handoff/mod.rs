//! Hinted handoff storage: a durable, per-target, append-only log of messages ("hints")
//! for targets that are unreachable, replayed (throttled) when the target is back.
//!
//! Owns the on-disk segment log, crash recovery, delivery progress, TTL expiry, the max
//! hint window, byte limits and the replay throttle's token bucket; what is replayed,
//! when and how fast is the sans-IO core's policy (`proto::replay`), which reaches this
//! store through a trait and its IO through `storage`. Must not do networking, decide when a
//! target is up or down (the failure detector does), or read the clock: every call that
//! needs time takes it (`now: Instant` for fsync group commit and throttling, wall-clock
//! unix milliseconds for hint creation and TTL, since hints outlive the process).
//!
//! # Layout on disk
//!
//! `<dir>/hints/<target>/<segment:020>.log` — one append-only log per target, rotated at
//! [`HintStoreConfig::segment_bytes`]; `<dir>/hints/<target>/cursor` — delivery progress,
//! replaced atomically (write temp file, rename). See the `format` module for bytes.
//!
//! The store is a record codec and policy on top of the crate's shared durable-log
//! layer (`storage`): the record framing, header check, recovery scan and
//! [`FsyncPolicy`] are that layer's, and so is the IO — [`SegmentIo`] and its
//! [`FileSegmentIo`] / [`MemSegmentIo`] backends, re-exported here, are built from the
//! same file handles (and the same fsync and atomic replace) as the dedup log's file.
//!
//! # Guarantees and where they run out
//!
//! * An [`HintStore::append`] that returned `Ok` survives a process crash (`kill -9`) under
//!   every [`FsyncPolicy`]: the bytes are in the OS page cache before `append` returns.
//!   Surviving a power loss or kernel crash depends on the policy (see [`FsyncPolicy`]).
//! * Replay is **at-least-once**: delivery progress is persisted lazily (at the next
//!   [`HintStore::next_batch`] for the same target, at [`HintStore::sync`], when a segment
//!   is deleted, and on drop). After a crash, hints marked delivered since the last
//!   persisted cursor are replayed again — typically at most one batch per target. Hints
//!   keep their [`MessageId`], so an effectively-once receiver drops these duplicates —
//!   for an application key (`IdKey`) only while the receiver still remembers it
//!   (`DedupConfig::horizon`, 2 min by default, against a 6 h hint TTL: a node with
//!   handoff warns at build when its horizon is shorter than its retry deadline plus
//!   hint TTL). Library-assigned ids are remembered for the retention, which the
//!   config check holds above that sum.
//! * Hints expire: a hint whose `created_unix_ms + ttl_ms` has passed is never returned.
//! * Lost for good: a quarantined segment (bad header) and corrupt records (counted in
//!   [`HintStats::corrupt_skipped`]), and everything if the disk itself is lost.

pub(crate) mod format;
mod store;
mod throttle;

pub use crate::storage::segments::{FileSegmentIo, MemSegmentIo, SegmentIo};
pub use store::HintStore;
pub use throttle::ReplayThrottle;

use crate::id::{ChannelId, Guarantee, MessageId, NodeId};
use bytes::Bytes;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One message held for an unreachable target.
///
/// The [`MessageId`] is kept as sent so the receiver's dedup still recognises a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    /// The node the message is for.
    pub target: NodeId,
    /// The message's identity (origin, channel, seq — or the application key).
    pub id: MessageId,
    /// The channel the message was sent on.
    pub channel: ChannelId,
    /// The channel's delivery guarantee.
    pub guarantee: Guarantee,
    /// Wall-clock creation time, unix milliseconds.
    pub created_unix_ms: u64,
    /// Time to live from `created_unix_ms`, milliseconds; `0` means "use the store's
    /// [`HintStoreConfig::default_ttl`]" (filled in by [`HintStore::append`]).
    pub ttl_ms: u64,
    /// The message body, stored raw.
    pub payload: Bytes,
}

impl Hint {
    /// The unix millisecond at which the hint expires (saturating).
    pub fn expires_unix_ms(&self) -> u64 {
        self.created_unix_ms.saturating_add(self.ttl_ms)
    }
}

/// Milliseconds since the unix epoch of `t` (0 for times before the epoch).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Where a hint sits in its target's log: segment id and byte offset of its record.
///
/// Positions of one target are unique and ordered like appends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HintPos {
    /// Segment id (file name).
    pub segment: u64,
    /// Byte offset of the record in the segment.
    pub offset: u64,
}

pub use crate::storage::FsyncPolicy;

/// Configuration of a [`HintStore`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HintStoreConfig {
    /// Base directory; hints live under `<dir>/hints/`. Default: `"."`.
    pub dir: PathBuf,
    /// Segment size bound: a segment is rotated before a record would make it larger
    /// (a single larger record gets a segment of its own). Default: 16 MiB.
    pub segment_bytes: u64,
    /// fsync policy. Default: [`FsyncPolicy::Every`]`(10 ms)` — group commit that loses at
    /// most 10 ms of hints on power loss at near-`Never` throughput.
    pub fsync: FsyncPolicy,
    /// TTL given to hints appended with `ttl_ms == 0`. Default: 6 h — twice the default
    /// window, so a hint stored at the end of a 3 h outage still has 3 h to be replayed.
    /// Must be at least `max_hint_window`.
    #[serde(with = "crate::config_serde::duration")]
    pub default_ttl: Duration,
    /// Targets down longer than this get no new hints ([`HintError::TargetDownTooLong`]).
    /// Default: 3 h (Cassandra's `max_hint_window`).
    #[serde(with = "crate::config_serde::duration")]
    pub max_hint_window: Duration,
    /// Disk bytes (segment files incl. headers and delivered-but-not-yet-deleted records)
    /// one target may use. Default: 1 GiB.
    pub max_bytes_per_target: u64,
    /// Disk bytes all targets together may use. Default: 4 GiB.
    pub max_total_bytes: u64,
}

impl Default for HintStoreConfig {
    fn default() -> Self {
        HintStoreConfig {
            dir: PathBuf::from("."),
            segment_bytes: 16 << 20,
            fsync: FsyncPolicy::Every(Duration::from_millis(10)),
            default_ttl: Duration::from_secs(6 * 3600),
            max_hint_window: Duration::from_secs(3 * 3600),
            max_bytes_per_target: 1 << 30,
            max_total_bytes: 4 << 30,
        }
    }
}

impl HintStoreConfig {
    /// The default configuration rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        HintStoreConfig {
            dir: dir.into(),
            ..Self::default()
        }
    }

    /// Checks the configuration.
    ///
    /// Rejects: `segment_bytes` below 4 KiB or above 4 GiB; `max_bytes_per_target` below
    /// `segment_bytes`; `max_total_bytes` below `max_bytes_per_target`; a zero
    /// `Every` interval; a zero `default_ttl`; `default_ttl` shorter than `max_hint_window`
    /// (hints would expire while the window still accepts them).
    pub fn validate(&self) -> Result<(), HintError> {
        let bad = |reason: &'static str| Err(HintError::InvalidConfig { reason });
        if !(4096..=(4u64 << 30)).contains(&self.segment_bytes) {
            return bad("segment_bytes must be between 4 KiB and 4 GiB");
        }
        if self.max_bytes_per_target < self.segment_bytes {
            return bad("max_bytes_per_target must be at least segment_bytes");
        }
        if self.max_total_bytes < self.max_bytes_per_target {
            return bad("max_total_bytes must be at least max_bytes_per_target");
        }
        if self.fsync == FsyncPolicy::Every(Duration::ZERO) {
            return bad("FsyncPolicy::Every needs a non-zero interval (use Always)");
        }
        if self.default_ttl.is_zero() {
            return bad("default_ttl must be non-zero");
        }
        if self.default_ttl < self.max_hint_window {
            return bad("default_ttl must be at least max_hint_window");
        }
        Ok(())
    }
}

/// Errors of the hint store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HintError {
    /// The target has been down longer than the max hint window; the hint was not stored.
    /// The caller reports the send as failed; the target needs a repair/resync instead.
    #[error("target {target} down for {down_for:?}, longer than the max hint window {max:?}")]
    TargetDownTooLong {
        /// The target.
        target: NodeId,
        /// How long it has been down.
        down_for: Duration,
        /// The configured window.
        max: Duration,
    },
    /// The target's hints would exceed `max_bytes_per_target`; the hint was not stored.
    /// The caller reports the send as failed (or retries after replay has drained hints).
    #[error("hints for target {target} would use {bytes} bytes, limit {max}")]
    TargetFull {
        /// The target.
        target: NodeId,
        /// Bytes the target would use with this hint.
        bytes: u64,
        /// The per-target limit.
        max: u64,
    },
    /// All hints would exceed `max_total_bytes`; the hint was not stored. As `TargetFull`.
    #[error("hint store would use {bytes} bytes, limit {max}")]
    StoreFull {
        /// Bytes the store would use with this hint.
        bytes: u64,
        /// The total limit.
        max: u64,
    },
    /// The hint's encoded record is larger than the format allows (64 MiB); not stored.
    /// The caller must not hint such a message.
    #[error("hint record of {size} bytes exceeds the {max}-byte limit")]
    HintTooLarge {
        /// Encoded size (or payload size if encoding was refused).
        size: u64,
        /// Limit.
        max: u64,
    },
    /// The configuration is invalid; fix it (the reason says how).
    #[error("invalid hint store configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// Another live store (of a node in this process or another) has the directory
    /// open: two stores writing one directory would lose hints, so the second is
    /// refused. Give each node its own directory; a node that just stopped releases
    /// it as it stops (a crashed process's lock goes with the process).
    #[error("hint directory {dir} is in use by another live node")]
    InUse {
        /// The directory.
        dir: std::path::PathBuf,
    },
    /// The storage failed. For `append`, the hint is not acknowledged (it may still be
    /// replayed after a restart — a duplicate, which dedup absorbs). Check the disk; the
    /// store stays usable and starts a fresh segment for the target.
    #[error("hint storage I/O failed while {op}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of a [`HintStore`] since it was opened (recovery counts included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintStats {
    /// Hints appended.
    pub stored: u64,
    /// Hints handed out by `next_batch` (a hint handed out twice counts twice).
    pub replayed: u64,
    /// Hints marked delivered.
    pub delivered: u64,
    /// Hints their target refused for good (unauthorized, dead-lettered, undecodable,
    /// another type, a retired stream), or larger than this run's TCP frames can
    /// carry (an earlier run's, after `TcpConfig::max_frame_len` was lowered),
    /// dropped from the store.
    pub rejected: u64,
    /// Hints dropped because their TTL passed (never returned).
    pub expired: u64,
    /// Appends refused by the max hint window.
    pub refused_window: u64,
    /// Appends refused by the per-target or total byte limit.
    pub refused_full: u64,
    /// Appends that failed with an I/O error (plus other I/O failures of the store).
    pub io_errors: u64,
    /// Corrupt regions skipped by recovery, plus records whose crc failed when replayed.
    pub corrupt_skipped: u64,
    /// Segments whose torn tail was truncated by recovery (or torn while being created).
    pub torn_tail_truncated: u64,
    /// Segments with a bad header, moved aside (`*.log.corrupt`).
    pub segments_quarantined: u64,
    /// Hints dropped by `decommission`.
    pub decommissioned: u64,
    /// Bytes of segment files currently on disk.
    pub bytes_total: u64,
    /// Hints currently waiting for delivery.
    pub pending: u64,
}

/// What [`HintStore::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Targets with at least one segment.
    pub targets: usize,
    /// Segments opened.
    pub segments: usize,
    /// Intact records found (delivered or not).
    pub records: u64,
    /// Records still waiting for delivery.
    pub pending: u64,
    /// Corrupt regions skipped (each followed by a valid record).
    pub corrupt_regions: u64,
    /// Bytes in those regions.
    pub corrupt_bytes: u64,
    /// Segments with a torn tail that was truncated.
    pub torn_tails: u64,
    /// Bytes cut off by those truncations.
    pub torn_bytes: u64,
    /// Segments quarantined for a bad header, with the reason.
    pub quarantined: Vec<(NodeId, u64, &'static str)>,
    /// Targets whose cursor file was damaged (their hints are all replayed again).
    pub cursors_reset: u64,
}

/// A target with hints waiting, as listed by [`HintStore::targets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetHints {
    /// The target.
    pub target: NodeId,
    /// Hints waiting for delivery (expired ones included until a replay or
    /// [`HintStore::expire`] drops them).
    pub pending: u64,
    /// Record bytes of those hints.
    pub pending_bytes: u64,
    /// Bytes of the target's segment files on disk.
    pub disk_bytes: u64,
}
