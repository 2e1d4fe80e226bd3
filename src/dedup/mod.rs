//! Receiver-side deduplication for effectively-once delivery.
//!
//! Owns the answer to "has this message already been processed (or is it being
//! processed right now)?": a [`SeqWindow`] per `(origin, channel)` stream for
//! library-assigned IDs, one [`IdTable`] for application keys, the lifecycle of both,
//! and an optional durable log. Must not do delivery, acking or network IO, and must not
//! read the clock on the hot path (callers pass `now`).
//!
//! # Protocol for the receiver
//!
//! 1. [`Dedup::begin`] before handing a message to the handler: `Fresh` → deliver;
//!    `Duplicate` → ack without delivering; `InProgress` → another delivery of the same
//!    message is running: neither deliver nor ack (its owner will ack). An error
//!    (`WindowOverrun`, `TableFull`, `TooManyStreams`, `StreamRetired`) → neither
//!    deliver nor ack: the sender retries (and, for `StreamRetired`, eventually gives
//!    up: see below).
//! 2. Handler succeeded → [`Dedup::complete`] then ack. Handler failed, or the delivery
//!    was dropped unacked → [`Dedup::release`], so the redelivery is processed.
//!    **Releasing on drop is the caller's job**: an entry left in progress is never
//!    expired and keeps its slot (and, in a window, holds the watermark back until the
//!    sender's [`Dedup::advance_floor`] moves past it).
//! 3. A sender that shuts down cleanly announces each stream's last seq:
//!    [`Dedup::finish_stream`]. Optional: without it the stream is retired after the
//!    retention anyway.
//!
//! # Limits, their defaults, and what happens at each
//!
//! | limit | default | at the limit |
//! |---|---|---|
//! | key `horizon` | 2 min (NATS JetStream's duplicate window) | a completed key is forgotten; a retry arriving later is processed again |
//! | key `table_budget_bytes` | 256 MiB (about 1–2.5 M keys within the horizon, i.e. a sustained ~10–20 k keys/s at 2 min; bursts of millions) | new keys refused with `TableFull` (counted in `table_full`, warned at most every 10 s); a node rejects the message to its sender as `RejectReason::KeyTableFull`; never a false duplicate |
//! | stream `retention` | 24 h | an idle or finished stream's window is retired; late messages answered from its tombstone or refused with `StreamRetired` (counted in `retired_refused`); the tombstone goes a retention after the last late message |
//! | `max_streams` (live) | 16 384 | a new stream refused with `TooManyStreams` |
//! | `max_streams_per_node` (live, one sending node's runs and channels) | 4 096 | that node's new stream refused with `TooManyStreams` |
//! | `window` per stream | 8192 seqs | a seq that far above the watermark refused with `WindowOverrun` until holes close |
//! | tombstones per sending node | 4 × `max_streams` (65 536) | that node's finished or settled streams are no longer retired early (counted in `retirements_deferred`, warned at most every 10 s): they stay live until the retention, and at its live limit its new streams are refused; other nodes are not affected |
//!
//! The key table grows with the key rate: it starts at `table_capacity` slots (16 384,
//! 384 KiB) and adds generations sized for twice the recent key rate × horizon, dropping
//! whole generations once all their keys expired (see [`IdTable`]). Memory for keys is
//! about 100–300 bytes per key completed within the last horizon, up to the budget.
//!
//! Sequence windows are *retired* (see `streams.rs`): after `retention` without
//! activity and with none of their messages in a handler (the sender crashed or
//! restarted — every run is a new origin), or as soon as a finished stream is settled.
//! What is left is a tombstone of under 100 bytes (watermark and highest seq begun),
//! kept for another `retention` (plus a quarter) after the last thing heard of the
//! stream. So dedup memory is bounded by the streams active within the retention — each
//! costs its window (`window` bytes: 8 KiB at the node's 8192 seqs) plus ~100 bytes —
//! not by every sender that ever ran. A late message for a retired stream gets
//! `Duplicate` if it is at or below the watermark, revives the stream if it is above
//! every seq ever begun and nothing was pending (a live sender that was only idle), and
//! is otherwise refused with the typed [`DedupError::StreamRetired`] — never processed
//! twice, never dropped silently. Retirement runs by itself when a new stream appears
//! or is refused at `max_streams` (at most every `retention / 8`); a stream limit
//! reached also retires at once the streams whose tombstones answer exactly (every
//! seq begun settled, nothing in progress, idle for a second), which loses nothing;
//! [`Dedup::retire_idle`] runs it on demand.
//!
//! **The retention must exceed the longest time a message can still arrive**: the
//! senders' retry deadline plus the hint TTL (30 s + 6 h with the defaults;
//! `NodeConfig::validate` checks it against the node's own retry policy, hint TTL and
//! shutdown drain; a per-channel deadline override is not checked). Once its tombstone
//! is forgotten too, a message arriving even later is taken for a new stream's.
//!
//! # Where the guarantee runs out
//!
//! * Application keys are remembered for `horizon` after completion. Keep it longer
//!   than the sender's retry deadline plus hint TTL if keyed messages may be handed off.
//! * Sequence windows remember until retirement, and their tombstones for another
//!   retention (see above).
//! * Without [`DurableDedup`], everything is forgotten on restart: effectively-once
//!   degrades to at-least-once across receiver restarts. With it and
//!   [`FsyncPolicy::Always`], every `complete` that returned is on disk before the ack;
//!   with `Never`, a machine crash may lose the last completions (they are then
//!   processed again after the restart), a process crash does not. Retirements and
//!   stream activity times are logged too, so the retention keeps counting across
//!   restarts and compaction drops retired streams.
//! * Durable entries carry wall-clock times (the only clock read is at `open`); a wall
//!   clock stepped forward across a restart shortens the horizon and the retention.

pub(crate) mod log;
mod segment;
mod streams;
pub(crate) mod sync;
mod table;
mod window;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use table::{IdTable, BATCH_LOOKAHEAD, BYTES_PER_SLOT, DEFAULT_INITIAL_SLOTS};
pub use window::SeqWindow;

use self::log::{DedupLog, Record, RetiredRecord};
use self::streams::{Change, StreamRegistry, Tombstone};
use self::sync::{AtomicBool, AtomicU64, Ordering};
use crate::{ChannelId, MessageId, Origin};

/// Least interval between two warnings of one kind ("key table full", "tombstone
/// budget reached"): a refusal is counted every time, warned about at most this often.
const WARN_EVERY_MS: u64 = 10_000;

/// Lets one warning through per [`WARN_EVERY_MS`].
#[derive(Debug)]
struct WarnGate {
    last_ms: AtomicU64,
}

impl WarnGate {
    fn new() -> Self {
        WarnGate {
            last_ms: AtomicU64::new(0),
        }
    }

    /// `true` for the first call and then at most once per [`WARN_EVERY_MS`] of
    /// `now_ms` (of racing callers, one).
    fn due(&self, now_ms: u64) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        (last == 0 || now_ms >= last + WARN_EVERY_MS)
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The answer of a check-and-insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Admit {
    /// Never seen (or released, or expired): the caller now owns it and must
    /// `complete` or `release` it.
    Fresh,
    /// Already processed: ack, do not deliver.
    Duplicate,
    /// Being processed by another delivery right now: neither deliver nor ack.
    InProgress,
}

/// Errors of the dedup family.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// `seq` is more than the window above the stream's watermark (a hole below it is
    /// still open). Do not process, do not ack: the sender retries later; holes close
    /// when earlier seqs complete or the sender advances the floor. Counted as
    /// `overruns`.
    #[error("seq {seq} is beyond the dedup window (watermark {watermark}, window {window})")]
    WindowOverrun {
        /// The rejected seq.
        seq: u64,
        /// The stream's watermark when it was rejected.
        watermark: u64,
        /// Window size in seqs.
        window: u64,
    },
    /// The key table is at its memory budget and has no free or expired slot for this
    /// key. Do not process. A node rejects the message to its sender
    /// ([`RejectReason::KeyTableFull`](crate::RejectReason::KeyTableFull): it may
    /// resend the key once entries expired; a sender of protocol 1 or 2, which cannot
    /// be told, retries). Counted as `table_full` and logged (rate-limited); raise
    /// `table_budget_bytes` (or shorten the horizon) if it happens in normal operation.
    #[error("dedup key table full ({capacity} slots, budget {budget_bytes} bytes)")]
    TableFull {
        /// Slots in the live generations.
        capacity: usize,
        /// The configured memory budget.
        budget_bytes: usize,
    },
    /// `seq` is 0 or above [`SeqWindow::MAX_SEQ`]: a malformed ID. Drop the message.
    #[error("seq {seq} is outside 1..=2^51-1")]
    SeqOutOfRange {
        /// The rejected seq.
        seq: u64,
    },
    /// A new stream was seen but `max_streams` streams are live. Do not process; the
    /// sender retries (idle streams are retired after the retention). Raise
    /// `max_streams` if it happens in normal operation.
    #[error("too many live dedup streams (max {max})")]
    TooManyStreams {
        /// The configured limit.
        max: usize,
    },
    /// The message belongs to a stream that was retired (its sender finished, or was
    /// idle longer than the retention), and whether it was processed can no longer be
    /// told. Do not process, do not ack: processing it might process it twice. It can
    /// only come from a relay or sender configured with a retry deadline or hint TTL
    /// longer than the receiver's retention, or from a sender that sent past the last
    /// seq it announced. Counted as `retired_refused`; fix the configuration.
    #[error("seq {seq} is for a retired dedup stream (watermark {watermark})")]
    StreamRetired {
        /// The refused seq.
        seq: u64,
        /// Every seq at or below it was processed.
        watermark: u64,
    },
    /// A [`DedupConfig`] field is out of range; fix the configuration.
    #[error("invalid dedup config: {0}")]
    InvalidConfig(&'static str),
    /// The durable log exists but is not a dedup log of a version this build reads.
    /// Move the file away (losing the durable dedup state) or use a matching build.
    #[error("bad dedup log header in {path}: {reason}")]
    BadHeader {
        /// The log file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// Another live node (in this process or another) has the durable dedup
    /// directory open. Two nodes writing one log would lose records (a compaction of
    /// one drops the other's), so the second is refused. Give each node its own
    /// directory; a node that just stopped releases it as it stops (a crashed
    /// process's lock goes with the process).
    #[error("dedup directory {dir} is in use by another live node")]
    InUse {
        /// The directory.
        dir: PathBuf,
    },
    /// Reading or writing the durable log failed. From `complete`: the message is
    /// marked done in memory but may not survive a restart; acking is still correct
    /// (at worst it is processed again after a restart).
    #[error("dedup log io: {0}")]
    Io(#[from] std::io::Error),
}

pub use crate::storage::FsyncPolicy;

/// Durable dedup options.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(
    default = "crate::config_serde::durable_dedup_defaults",
    deny_unknown_fields
)]
pub struct DurableDedup {
    /// Directory holding `dedup.log` (created if missing).
    pub dir: PathBuf,
    /// fsync policy; default [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
    /// Rewrite the log from the live state when it grows beyond this many bytes;
    /// default 64 MiB. Retired streams and expired keys are left out of the rewrite.
    pub compact_after_bytes: u64,
}

impl DurableDedup {
    /// Durable dedup in `dir` with the defaults (`Always`, compact after 64 MiB).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DurableDedup {
            dir: dir.into(),
            fsync: FsyncPolicy::Always,
            compact_after_bytes: 64 << 20,
        }
    }
}

/// Default [`DedupConfig::retention`]: 24 h, four times the default hint TTL (6 h),
/// well over that TTL plus the default retry deadline (30 s) and shutdown drain (5 s).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Default [`DedupConfig::table_budget_bytes`]: 256 MiB.
pub const DEFAULT_TABLE_BUDGET_BYTES: usize = 256 << 20;

/// Dedup configuration. Every default is in the field's doc and in the module doc's
/// table of limits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Seqs tracked above each stream's watermark (rounded up to a power of two,
    /// ≥ 64); one byte per seq, so `window` bytes per live stream. Default 8192: a
    /// node's must be at least the senders' in-flight window (`max_in_flight`, 4096 by
    /// default), and the two defaults agree, so `DedupConfig { durable, ..Default::default() }`
    /// inside a default `NodeConfig` validates.
    pub window: u32,
    /// Most live `(origin, channel)` streams (retired ones do not count). Default
    /// 16 384. At the limit, streams whose tombstones answer exactly (every seq they
    /// began settled, nothing in progress, idle for a second) are retired to make room;
    /// otherwise the new stream is refused with [`DedupError::TooManyStreams`].
    pub max_streams: usize,
    /// Most live streams of one sending node, over all its runs (incarnations) and
    /// channels, so that no one peer can take the whole of `max_streams` from the
    /// others (a peer may name any incarnation of itself). Default 4 096. At the limit
    /// the node's own streams make room: those idle past the retention, and, at once,
    /// those whose tombstones answer exactly (every seq they began settled, nothing in
    /// progress, idle for a second: a run that shut down, or crashed with nothing lost
    /// on the way). Otherwise its new stream is refused with
    /// [`DedupError::TooManyStreams`] (counted; its sender retries): 4 096 streams of
    /// one node with messages in flight or lost ones below settled ones.
    /// Capped by `max_streams`.
    pub max_streams_per_node: usize,
    /// Initial slots of the application-key table (rounded up to a power of two); it
    /// grows from there up to `table_budget_bytes`. Default 16 384 (384 KiB).
    pub table_capacity: usize,
    /// Most bytes the application-key table may use; at this budget new keys are
    /// refused with [`DedupError::TableFull`]. Default 256 MiB
    /// ([`DEFAULT_TABLE_BUDGET_BYTES`]). Set it to `table_capacity ×
    /// `[`BYTES_PER_SLOT`] for a fixed-size table.
    pub table_budget_bytes: usize,
    /// How long a completed application key is remembered. Default 2 minutes.
    #[serde(with = "crate::config_serde::duration")]
    pub horizon: Duration,
    /// How long a stream's window is kept without activity before it is retired, and
    /// how long its tombstone is kept after that. Must exceed the senders' longest
    /// retry deadline plus hint TTL. Default 24 h ([`DEFAULT_RETENTION`]).
    #[serde(with = "crate::config_serde::duration")]
    pub retention: Duration,
    /// Persist the state so duplicates are still caught after a restart.
    pub durable: Option<DurableDedup>,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window: 8192,
            max_streams: 16_384,
            max_streams_per_node: 4096,
            table_capacity: DEFAULT_INITIAL_SLOTS,
            table_budget_bytes: DEFAULT_TABLE_BUDGET_BYTES,
            horizon: Duration::from_secs(120),
            retention: DEFAULT_RETENTION,
            durable: None,
        }
    }
}

impl DedupConfig {
    /// Checks every field's range.
    ///
    /// # Errors
    /// [`DedupError::InvalidConfig`] naming the bad field.
    pub fn validate(&self) -> Result<(), DedupError> {
        if self.window == 0 || self.window > 1 << 24 {
            return Err(DedupError::InvalidConfig("window must be in 1..=2^24"));
        }
        if self.max_streams == 0 || self.max_streams > 1 << 24 {
            return Err(DedupError::InvalidConfig("max_streams must be in 1..=2^24"));
        }
        if self.max_streams_per_node == 0 || self.max_streams_per_node > 1 << 24 {
            return Err(DedupError::InvalidConfig(
                "max_streams_per_node must be in 1..=2^24",
            ));
        }
        if self.table_capacity == 0 || self.table_capacity > 1 << 30 {
            return Err(DedupError::InvalidConfig(
                "table_capacity must be in 1..=2^30",
            ));
        }
        if self.table_budget_bytes < self.table_capacity.next_power_of_two() * BYTES_PER_SLOT {
            return Err(DedupError::InvalidConfig(
                "table_budget_bytes must hold at least table_capacity slots",
            ));
        }
        if self.horizon.is_zero() || self.horizon > Duration::from_secs(365 * 86_400) {
            return Err(DedupError::InvalidConfig("horizon must be in (0, 1 year]"));
        }
        if let Some(DurableDedup {
            fsync: FsyncPolicy::Every(_),
            ..
        }) = self.durable
        {
            return Err(DedupError::InvalidConfig(
                "durable.fsync: the dedup log takes Always (one fsync per batch, before its acks) or Never, not Every",
            ));
        }
        if self.retention < Duration::from_secs(1)
            || self.retention > Duration::from_secs(10 * 365 * 86_400)
        {
            return Err(DedupError::InvalidConfig(
                "retention must be in [1 s, 10 years]",
            ));
        }
        Ok(())
    }
}

/// A snapshot of the dedup counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DedupStats {
    /// `begin` answered `Fresh`.
    pub fresh: u64,
    /// `begin` answered `Duplicate`.
    pub duplicates: u64,
    /// `begin` answered `InProgress`.
    pub in_progress_hits: u64,
    /// `begin` refused with `WindowOverrun`.
    pub overruns: u64,
    /// `begin` refused with `TableFull`.
    pub table_full: u64,
    /// Expired table entries reused in place by inserts.
    pub expired_reclaimed: u64,
    /// Successful `complete` calls.
    pub completed: u64,
    /// Successful `release` calls.
    pub released: u64,
    /// Live streams (with a window).
    pub streams: u64,
    /// Tombstones of retired streams currently kept.
    pub tombstones: u64,
    /// Streams retired after `retention` without activity.
    pub streams_retired_idle: u64,
    /// Streams retired because their sender finished and they settled.
    pub streams_retired_finished: u64,
    /// Retired streams brought back by a message above everything they had seen.
    pub streams_revived: u64,
    /// `begin` refused with `StreamRetired`.
    pub retired_refused: u64,
    /// Early retirements (a finished stream, or a settled one at a stream limit) put
    /// off because the stream's sending node held its tombstone budget (four times
    /// `max_streams`); the stream stays live until the retention.
    pub retirements_deferred: u64,
    /// Key-table generations in use.
    pub key_generations: u64,
    /// Key-table generations dropped whole (all their keys expired).
    pub key_generations_dropped: u64,
    /// Estimated bytes of dedup memory (windows, tombstones, key table slots).
    pub memory_bytes: u64,
    /// Corrupt durable records skipped at open.
    pub corrupt_records_skipped: u64,
    /// Bytes of torn tail truncated at open.
    pub torn_bytes_truncated: u64,
    /// Recovered records that no longer fit (window overrun / table full at open);
    /// those messages may be processed once more.
    pub recovery_dropped: u64,
}

/// The receiver's dedup: `Send + Sync`, shared via `Arc`.
///
/// `begin`/`complete`/`release` on a known stream or key take no lock and do not
/// allocate (a new stream allocates its window once, a key-table generation is
/// allocated once per horizon or doubling). Durable records are buffered under a
/// mutex and written by [`Dedup::sync`] (and [`Dedup::complete`]): those two are the
/// only calls that do IO.
///
/// ```
/// use std::time::Instant;
/// use ackwire::{ChannelId, MessageId, NodeId, Origin};
/// use ackwire::dedup::{Admit, Dedup, DedupConfig};
/// let d = Dedup::open(DedupConfig::default()).unwrap();
/// let id = MessageId::Seq { origin: Origin { node: NodeId(1), incarnation: 7 }, channel: ChannelId(0), seq: 1 };
/// let now = Instant::now();
/// assert_eq!(d.begin(&id, now).unwrap(), Admit::Fresh);
/// d.complete(&id, now).unwrap();
/// assert_eq!(d.begin(&id, now).unwrap(), Admit::Duplicate);
/// ```
#[derive(Debug)]
pub struct Dedup {
    streams: StreamRegistry,
    table: IdTable,
    /// The durable log, when durable.
    log: Option<Durable>,
    base: Instant,
    base_unix_ms: u64,
    counters: Counters,
}

/// The durable log and its bookkeeping.
#[derive(Debug)]
struct Durable {
    log: Mutex<Logged>,
    /// The directory's lock; `None` once [`Dedup::close`]d.
    lock: Mutex<Option<crate::storage::DirLock>>,
    /// `DurableDedup::compact_after_bytes`.
    compact_after: u64,
    /// Records are buffered and wait for [`Dedup::sync`].
    owed: AtomicBool,
    /// How long after a repair the next may run ([`REPAIR_RETRY`]).
    repair_retry: Duration,
}

#[derive(Debug)]
struct Logged {
    log: DedupLog,
    /// The log size at which it is next compacted.
    next_compaction: u64,
    /// The latest time a record was buffered at (a compaction at `sync` computes the
    /// live state at it).
    last_now: Instant,
    /// [`Dedup::close`]d: the directory is another node's now; nothing is written.
    closed: bool,
    /// A batch failed to write and the log has not been rewritten from memory since:
    /// the file lacks records that may have been acknowledged.
    hole: bool,
    /// No repair (rewrite) is forced before this time, on the real clock, but at the
    /// close (an ordinary compaction coming due repairs too): set by each repair,
    /// successful or not.
    repair_after: Option<Instant>,
}

/// After a repair of the log (successful or not), how long until the next may run: a
/// disk that keeps failing, steadily or now and then, costs at most one rewrite of the
/// live state per interval (counted from the end of the last), not one per commit.
const REPAIR_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Counters {
    fresh: AtomicU64,
    duplicates: AtomicU64,
    in_progress_hits: AtomicU64,
    overruns: AtomicU64,
    completed: AtomicU64,
    released: AtomicU64,
    corrupt_records_skipped: AtomicU64,
    torn_bytes_truncated: AtomicU64,
    recovery_dropped: AtomicU64,
}

impl Dedup {
    /// Opens with `Instant::now()` as the time base (see [`open_at`](Self::open_at)).
    ///
    /// # Errors
    /// As [`open_at`](Self::open_at).
    pub fn open(cfg: DedupConfig) -> Result<Dedup, DedupError> {
        Self::open_at(cfg, Instant::now())
    }

    /// Validates `cfg`, allocates the structures and, if durable, recovers the log.
    /// `now` is the time base (pass the same clock as to `begin`).
    ///
    /// # Errors
    /// `InvalidConfig`; `BadHeader` if the log file is not a dedup log; `Io`.
    pub fn open_at(cfg: DedupConfig, now: Instant) -> Result<Dedup, DedupError> {
        Self::open_at_wall(cfg, now, SystemTime::now())
    }

    /// Like [`open_at`](Self::open_at), with `wall` as the wall-clock time at `now`
    /// (durable times and the retention are measured in wall-clock time across
    /// restarts; a simulation passes its virtual wall clock here).
    ///
    /// # Errors
    /// As [`open_at`](Self::open_at).
    pub fn open_at_wall(
        cfg: DedupConfig,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Dedup, DedupError> {
        cfg.validate()?;
        let base_unix_ms = wall
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut d = Dedup {
            streams: StreamRegistry::new(
                cfg.max_streams,
                cfg.max_streams_per_node.min(cfg.max_streams),
                cfg.window,
                (cfg.retention.as_millis() as u64).max(1),
            ),
            table: IdTable::growing(cfg.table_capacity, cfg.table_budget_bytes, cfg.horizon, now),
            log: None,
            base: now,
            base_unix_ms,
            counters: Counters::default(),
        };
        if let Some(dur) = &cfg.durable {
            let lock = crate::storage::lock_dir(&dur.dir).map_err(|e| {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    DedupError::InUse {
                        dir: dur.dir.clone(),
                    }
                } else {
                    DedupError::Io(e)
                }
            })?;
            let (log, rec) = DedupLog::open(&dur.dir, dur.fsync)?;
            d.counters
                .corrupt_records_skipped
                .store(rec.corrupt_skipped, Ordering::Relaxed);
            d.counters
                .torn_bytes_truncated
                .store(rec.torn_bytes, Ordering::Relaxed);
            d.replay(&rec.records, now);
            let dropped = d.counters.recovery_dropped.load(Ordering::Relaxed);
            if rec.corrupt_skipped > 0 || rec.torn_bytes > 0 || dropped > 0 {
                tracing::warn!(
                    dir = %dur.dir.display(),
                    corrupt_records_skipped = rec.corrupt_skipped,
                    torn_bytes_truncated = rec.torn_bytes,
                    recovery_dropped = dropped,
                    "dedup log recovered with losses: messages whose records were lost may be processed again if resent"
                );
            }
            let next_compaction = dur.compact_after_bytes.max(2 * log.len());
            d.log = Some(Durable {
                log: Mutex::new(Logged {
                    log,
                    next_compaction,
                    last_now: now,
                    closed: false,
                    hole: false,
                    repair_after: None,
                }),
                lock: Mutex::new(Some(lock)),
                compact_after: dur.compact_after_bytes,
                repair_retry: REPAIR_RETRY,
                owed: AtomicBool::new(false),
            });
        }
        Ok(d)
    }

    /// Hint that `id` is about to be [`begin`](Self::begin)-checked: for an
    /// application key, prefetch its slots in the key table (see
    /// [`IdTable::prefetch`]); nothing for library-assigned ids (their window is small
    /// and hot). A receiver calls it for a burst of frames before handling them.
    pub fn prefetch(&self, id: &MessageId) {
        if let MessageId::Key(k) = *id {
            self.table.prefetch(k);
        }
    }

    /// Check-and-insert `id` (see the module doc for what to do with each answer).
    ///
    /// # Errors
    /// `WindowOverrun`, `TableFull`, `TooManyStreams`, `StreamRetired`: neither process
    /// nor ack. `SeqOutOfRange`: malformed ID, drop it. `Io` never (a new stream's
    /// record is buffered for the next [`sync`](Self::sync)).
    pub fn begin(&self, id: &MessageId, now: Instant) -> Result<Admit, DedupError> {
        let r = match *id {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => {
                let now_ms = self.unix_ms(now);
                let mut changes = Vec::new();
                let key = (origin, channel);
                let mut r = self.streams.begin(key, seq, now_ms, &mut changes);
                if matches!(r, Err(DedupError::TooManyStreams { .. }))
                    && self.streams.sweep_due(now_ms)
                    && self.streams.sweep(now_ms, &mut changes) > 0
                {
                    // At the limit, streams idle past the retention make room.
                    // (Regression: the sweep ran only after a stream was made, so
                    // once the registry was full of runs that crashed, every new
                    // sender run was refused for good.)
                    r = self.streams.begin(key, seq, now_ms, &mut changes);
                }
                if !changes.is_empty() {
                    // A new (or revived) stream: the rare path; also the moment memory
                    // grows, so it is when idle streams are retired.
                    if self.streams.sweep_due(now_ms) {
                        self.streams.sweep(now_ms, &mut changes);
                    }
                    let _ = self.persist_changes(&changes, now);
                }
                r
            }
            MessageId::Key(k) => self.table.begin(k, now),
        };
        let c = &self.counters;
        match &r {
            Ok(Admit::Fresh) => c.fresh.fetch_add(1, Ordering::Relaxed),
            Ok(Admit::Duplicate) => c.duplicates.fetch_add(1, Ordering::Relaxed),
            Ok(Admit::InProgress) => c.in_progress_hits.fetch_add(1, Ordering::Relaxed),
            Err(DedupError::WindowOverrun { .. }) => c.overruns.fetch_add(1, Ordering::Relaxed),
            Err(_) => 0,
        };
        r
    }

    /// Marks a `Fresh` id processed; when durable, then appends it to the log (and
    /// fsyncs per the policy) before returning, so ack after this returns. Completing
    /// an id that is not in progress is a no-op.
    ///
    /// # Errors
    /// `Io` if the durable append failed (see [`DedupError::Io`]).
    pub fn complete(&self, id: &MessageId, now: Instant) -> Result<(), DedupError> {
        self.complete_inner(id, now, true)
    }

    /// Like [`Dedup::complete`], but the durable record is only buffered in memory
    /// (no IO): call [`Dedup::sync`] once for a batch before acknowledging any of it
    /// (group commit: one write and one fsync per burst instead of one per message).
    /// A crash before that sync loses the record, as it loses an unacknowledged one.
    ///
    /// # Errors
    /// As [`Dedup::complete`].
    pub fn complete_unsynced(&self, id: &MessageId, now: Instant) -> Result<(), DedupError> {
        self.complete_inner(id, now, false)
    }

    /// Are durable records buffered that [`Dedup::sync`] has not written yet? Only
    /// [`Dedup::complete`] and `sync` itself do IO; every other call (`begin` of a new
    /// stream, [`complete_unsynced`](Self::complete_unsynced),
    /// [`advance_floor`](Self::advance_floor), [`finish_stream`](Self::finish_stream),
    /// [`retire_idle`](Self::retire_idle)) only buffers its records. Always `false`
    /// when not durable.
    pub fn needs_sync(&self) -> bool {
        self.log
            .as_ref()
            .is_some_and(|d| d.owed.load(Ordering::Acquire))
    }

    /// Writes every buffered record (one `write`), compacts the log when it is due,
    /// and fsyncs per the durable policy. This is the durable dedup's IO: a receiver
    /// calls it from its event loop, off the protocol's path (see
    /// [`Endpoint::persist_owed`](crate::proto::Endpoint::persist_owed)).
    ///
    /// # Errors
    /// `Io` from the durable log; the buffered records are then missing from the file
    /// (they are not written again) until a later `sync` or the [`close`](Self::close)
    /// rewrites the log from memory, so count the error: their messages may be
    /// processed again after a restart before that. A write that fails but whose
    /// rewrite succeeds at once returns `Ok` (logged at warn): its records are on disk.
    pub fn sync(&self) -> Result<(), DedupError> {
        let Some(d) = &self.log else {
            return Ok(());
        };
        let mut l = d.log.lock().unwrap_or_else(|e| e.into_inner());
        self.flush(d, &mut l, false)
    }

    /// Writes what is buffered ([`sync`](Self::sync)), then releases the durable
    /// directory so another node may open it (a node does this as it stops). A call
    /// that would record something durable after this (`complete`, a floor, a
    /// retirement) is not written and returns `Io`. Nothing to do when not durable.
    ///
    /// # Errors
    /// As [`sync`](Self::sync), and `Io` when an earlier failed write left records out
    /// of the file and rewriting it from memory failed again now; the directory is
    /// released either way.
    pub fn close(&self) -> Result<(), DedupError> {
        let Some(d) = &self.log else {
            return Ok(());
        };
        let mut l = d.log.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.flush(d, &mut l, true);
        l.closed = true;
        drop(d.lock.lock().unwrap_or_else(|e| e.into_inner()).take());
        r
    }

    /// Under the log's lock: write and fsync the buffer, then compact if due (and
    /// repair a hole left by a failed write: at once when `closing`). `Ok` when this
    /// flush's records are on disk; when `closing`, `Err` if a hole is left.
    fn flush(&self, d: &Durable, l: &mut Logged, closing: bool) -> Result<(), DedupError> {
        d.owed.store(false, Ordering::Release);
        if l.closed {
            l.log.discard_buffered();
            return Ok(());
        }
        let mut result = l.log.sync();
        // The failed batch is cut off the file (it may have been acknowledged):
        // rewrite the log from memory, which still holds it, now, rather than leave
        // the hole until the next compaction or a restart. After a repair, the next
        // waits `repair_retry` on the real clock (regression: every group commit of a
        // full disk rewrote the whole live state on the driver), but for the close,
        // which must not leave the hole to the next run. A node idle with a hole
        // repairs it at its next commit or at its close.
        l.hole |= result.is_err();
        if l.hole && (closing || l.repair_after.is_none_or(|t| Instant::now() >= t)) {
            l.next_compaction = 0;
        }
        if l.log.len() > l.next_compaction {
            // Rewrite from the live state; the next compaction waits until the log
            // has at least doubled, so rewriting stays amortised O(1) per record.
            let live = self.live_records(l.last_now);
            // A compaction that fails (no room for the new file, say) leaves the old
            // log whole, with every record this flush wrote: it is logged, retried
            // once the log has doubled again, and does not fail the flush. (Regression:
            // it failed every later flush, each retrying the whole rewrite, and
            // `ack_durable` reported `NotPersisted` for records that were on disk.)
            let repairing = l.hole;
            match l.log.rewrite(&live) {
                Ok(()) => {
                    // Everything in memory is on disk, the failed batch included.
                    l.hole = false;
                    if let Err(e) = std::mem::replace(&mut result, Ok(())) {
                        tracing::warn!(error = %e, "dedup log write failed; the log was rewritten from memory");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dedup log compaction failed; the log keeps growing until the next attempt");
                }
            }
            if repairing {
                // From the end of the rewrite, which may itself have taken long.
                l.repair_after = Some(Instant::now() + d.repair_retry);
            }
            l.next_compaction = d.compact_after.max(2 * l.log.len());
        }
        if closing && l.hole && result.is_ok() {
            result = Err(DedupError::Io(std::io::Error::other(
                "the dedup log lacks the records of a failed write, and rewriting it failed",
            )));
        }
        result
    }

    fn complete_inner(&self, id: &MessageId, now: Instant, sync: bool) -> Result<(), DedupError> {
        match *id {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => {
                let now_ms = self.unix_ms(now);
                let k = (origin, channel);
                let c = self.streams.complete(&k, seq, now_ms);
                if !c.done {
                    return Ok(());
                }
                self.counters.completed.fetch_add(1, Ordering::Relaxed);
                if c.stamp {
                    self.persist(Record::Active(origin, channel, now_ms), now, false)?;
                }
                if let Some(floor) = c.checkpoint {
                    self.persist(Record::Floor(origin, channel, floor), now, false)?;
                }
                self.persist(Record::SeqDone(origin, channel, seq), now, sync)?;
                if c.settled {
                    if let Some(t) = self.streams.try_retire(k, now_ms) {
                        self.persist_changes(&[Change::Retired(k, t)], now)?;
                    }
                }
                Ok(())
            }
            MessageId::Key(k) => {
                if !self.table.complete(k, now) {
                    return Ok(());
                }
                self.counters.completed.fetch_add(1, Ordering::Relaxed);
                self.persist(Record::KeyDone(k, self.unix_ms(now)), now, sync)
            }
        }
    }

    /// Forgets an in-progress id (processing failed) so its redelivery is `Fresh`.
    pub fn release(&self, id: &MessageId) {
        let released = match *id {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => self.streams.release(&(origin, channel), seq),
            MessageId::Key(k) => self.table.release(k),
        };
        if released {
            self.counters.released.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sender promises every seq `< floor` of this stream is settled forever:
    /// they become duplicates (see [`SeqWindow::advance_floor`]). Persisted when
    /// durable (buffered for the next [`sync`](Self::sync)). On a retired stream it revives the stream only if `floor` is above
    /// every seq the stream ever began (otherwise it is ignored).
    ///
    /// # Errors
    /// `TooManyStreams` for a new stream over the limit. (Its durable record is
    /// buffered for the next [`sync`](Self::sync).)
    pub fn advance_floor(
        &self,
        origin: Origin,
        channel: ChannelId,
        floor: u64,
        now: Instant,
    ) -> Result<(), DedupError> {
        let now_ms = self.unix_ms(now);
        let mut changes = Vec::new();
        let moved = self
            .streams
            .advance_floor((origin, channel), floor, now_ms, &mut changes)?;
        self.persist_changes(&changes, now)?;
        if moved {
            self.persist(Record::Floor(origin, channel, floor), now, false)?;
        }
        Ok(())
    }

    /// The sender's run `origin` shut down cleanly and `last_seq` was the last seq it
    /// sent on `channel` (0: it sent none). The stream is retired as soon as every seq
    /// up to `last_seq` is settled (now, if they are); from then on a retransmission of
    /// any of them is a `Duplicate` and a seq above it is refused with
    /// [`DedupError::StreamRetired`]. Without this call the stream is retired after
    /// the retention instead.
    ///
    /// # Errors
    /// `TooManyStreams` if the stream was unknown and no room is left (it is then
    /// retired by the retention). (Durable records are buffered for the next
    /// [`sync`](Self::sync).)
    pub fn finish_stream(
        &self,
        origin: Origin,
        channel: ChannelId,
        last_seq: u64,
        now: Instant,
    ) -> Result<(), DedupError> {
        let now_ms = self.unix_ms(now);
        let k = (origin, channel);
        let mut changes = Vec::new();
        let settled = self.streams.finish(k, last_seq, now_ms, &mut changes)?;
        if settled {
            if let Some(t) = self.streams.try_retire(k, now_ms) {
                changes.push(Change::Retired(k, t));
            }
        }
        self.persist_changes(&changes, now)
    }

    /// Retires every stream idle for the retention (or finished and settled) and
    /// forgets tombstones older than the retention. Runs by itself (at most every
    /// retention / 8) when a new stream appears; call it from a timer to reclaim memory
    /// when no new senders come. Returns how many streams were retired.
    ///
    /// # Errors
    /// None today (durable records are buffered for the next [`sync`](Self::sync));
    /// the `Result` is kept for callers that handle one.
    pub fn retire_idle(&self, now: Instant) -> Result<usize, DedupError> {
        let mut changes = Vec::new();
        let n = self.streams.sweep(self.unix_ms(now), &mut changes);
        self.persist_changes(&changes, now)?;
        Ok(n)
    }

    /// Is `seq` of the stream `(origin, channel)` known settled (done in a live window,
    /// or at or below a retired stream's watermark)? Read-only: nothing is begun.
    pub fn seq_done(&self, origin: Origin, channel: ChannelId, seq: u64) -> bool {
        self.streams
            .with_window(&(origin, channel), |w| w.map(|w| w.is_done(seq)))
            .unwrap_or_else(|| self.streams.retired_watermark(&(origin, channel)) >= Some(seq))
    }

    /// The watermark of a live stream's window (every seq at or below it is settled),
    /// if the stream is live.
    pub fn watermark_of(&self, origin: Origin, channel: ChannelId) -> Option<u64> {
        self.streams
            .with_window(&(origin, channel), |w| w.map(SeqWindow::watermark))
    }

    /// Estimated bytes of dedup memory: live windows, tombstones and key-table slots.
    pub fn memory_bytes(&self) -> usize {
        self.streams.len() as usize * self.streams.bytes_per_stream()
            + self.streams.tombstones() as usize * StreamRegistry::bytes_per_tombstone()
            + self.table.memory_bytes()
    }

    /// The application-key table.
    pub fn key_table(&self) -> &IdTable {
        &self.table
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DedupStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.streams.counters;
        DedupStats {
            fresh: l(&c.fresh),
            duplicates: l(&c.duplicates),
            in_progress_hits: l(&c.in_progress_hits),
            overruns: l(&c.overruns),
            table_full: self.table.table_full_count(),
            expired_reclaimed: self.table.expired_reclaimed_count(),
            completed: l(&c.completed),
            released: l(&c.released),
            streams: self.streams.len(),
            tombstones: self.streams.tombstones(),
            streams_retired_idle: l(&s.retired_idle),
            streams_retired_finished: l(&s.retired_finished),
            streams_revived: l(&s.revived),
            retired_refused: l(&s.refused_retired),
            retirements_deferred: l(&s.retire_deferred),
            key_generations: self.table.generations() as u64,
            key_generations_dropped: self.table.generations_dropped(),
            memory_bytes: self.memory_bytes() as u64,
            corrupt_records_skipped: l(&c.corrupt_records_skipped),
            torn_bytes_truncated: l(&c.torn_bytes_truncated),
            recovery_dropped: l(&c.recovery_dropped),
        }
    }

    /// Wall-clock milliseconds at `now` (the clock read once at `open`).
    fn unix_ms(&self, now: Instant) -> u64 {
        self.base_unix_ms + now.saturating_duration_since(self.base).as_millis() as u64
    }

    fn persist_changes(&self, changes: &[Change], now: Instant) -> Result<(), DedupError> {
        if self.log.is_none() {
            return Ok(());
        }
        for ch in changes {
            let rec = match *ch {
                Change::Retired((o, c), t) => Record::Retired(o, c, retired_record(t)),
                Change::Revived((o, c), floor) => Record::Floor(o, c, floor),
                Change::Active((o, c), ms) => Record::Active(o, c, ms),
            };
            self.persist(rec, now, false)?;
        }
        Ok(())
    }

    /// Buffers `rec`; with `sync`, also writes and fsyncs everything buffered.
    fn persist(&self, rec: Record, now: Instant, sync: bool) -> Result<(), DedupError> {
        let Some(d) = &self.log else {
            return Ok(());
        };
        let mut l = d.log.lock().unwrap_or_else(|e| e.into_inner());
        if l.closed {
            // Not written: the directory may be another node's now.
            return Err(DedupError::Io(std::io::Error::other(
                "the durable dedup log is closed",
            )));
        }
        l.log.append_unsynced(&rec);
        l.last_now = l.last_now.max(now);
        if sync {
            self.flush(d, &mut l, false)
        } else {
            d.owed.store(true, Ordering::Release);
            Ok(())
        }
    }

    /// The live state as records (compaction): live streams with their activity time,
    /// tombstones, unexpired keys. Retired streams' windows are gone from it.
    fn live_records(&self, now: Instant) -> Vec<Record> {
        let mut out = Vec::new();
        self.streams
            .for_each_live(|(origin, channel), w, active_ms| {
                out.push(Record::Active(origin, channel, active_ms));
                let wm = w.watermark();
                if wm > 0 {
                    out.push(Record::Floor(origin, channel, wm + 1));
                }
                for s in w.done_above_watermark() {
                    out.push(Record::SeqDone(origin, channel, s));
                }
            });
        self.streams.for_each_tombstone(|(o, c), t| {
            out.push(Record::Retired(o, c, retired_record(t)));
        });
        let now_unix = self.unix_ms(now);
        for (k, age) in self.table.done_entries(now) {
            out.push(Record::KeyDone(k, now_unix.saturating_sub(age)));
        }
        out
    }

    fn replay(&mut self, records: &[Record], now: Instant) {
        use std::collections::BTreeMap;
        #[derive(Default)]
        struct Rep {
            floor: u64,
            seqs: Vec<u64>,
            active_ms: Option<u64>,
            tomb: Option<Tombstone>,
        }
        let mut per_stream: BTreeMap<(Origin, ChannelId), Rep> = BTreeMap::new();
        let now_unix = self.unix_ms(now);
        let retention = self.streams.retention_ms;
        let mut dropped = 0;
        for r in records {
            match *r {
                Record::SeqDone(o, c, s) => {
                    let e = per_stream.entry((o, c)).or_default();
                    if let Some(t) = e.tomb.take() {
                        e.floor = e.floor.max(t.watermark + 1);
                    }
                    e.seqs.push(s);
                }
                Record::Floor(o, c, f) => {
                    let e = per_stream.entry((o, c)).or_default();
                    if let Some(t) = e.tomb.take() {
                        // Revived: it restarts at the tombstone's watermark.
                        e.floor = t.watermark + 1;
                    }
                    e.floor = e.floor.max(f);
                }
                Record::Active(o, c, ms) => {
                    let e = per_stream.entry((o, c)).or_default();
                    if let Some(t) = e.tomb.take() {
                        e.floor = e.floor.max(t.watermark + 1);
                    }
                    e.active_ms = Some(e.active_ms.map_or(ms, |a| a.max(ms)));
                }
                Record::Retired(o, c, r) => {
                    let e = per_stream.entry((o, c)).or_default();
                    *e = Rep {
                        tomb: Some(Tombstone {
                            watermark: r.watermark,
                            max_seen: r.max_seen,
                            finished: r.finished,
                            retired_ms: r.unix_ms,
                        }),
                        ..Rep::default()
                    };
                }
                Record::KeyDone(k, ms) => {
                    let age = Duration::from_millis(now_unix.saturating_sub(ms));
                    // Expired ones are simply not reinserted; a full table is counted.
                    if !self.table.insert_done(k, age, now) {
                        dropped += 1;
                    }
                }
            }
        }
        for (k, mut rep) in per_stream {
            if let Some(t) = rep.tomb {
                if now_unix < self.streams.tombstone_expiry(t.retired_ms) {
                    self.streams.restore_tombstone(k, t);
                }
                continue;
            }
            // An activity stamp lags the real activity by up to retention / 4 (see
            // `StreamRegistry::stamp_due`); without one (a version 1 log), count from now.
            let active = rep
                .active_ms
                .map_or(now_unix, |a| (a + retention / 4).min(now_unix));
            rep.seqs.sort_unstable();
            match self.streams.restore_live(k, rep.floor, &rep.seqs, active) {
                Ok(n) => dropped += n,
                Err(_) => dropped += rep.seqs.len() as u64,
            }
        }
        self.counters
            .recovery_dropped
            .store(dropped, Ordering::Relaxed);
    }
}

fn retired_record(t: Tombstone) -> RetiredRecord {
    RetiredRecord {
        watermark: t.watermark,
        max_seen: t.max_seen,
        finished: t.finished,
        unix_ms: t.retired_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{ChannelId, NodeId};
    use crate::storage::file::{LogFile, MemFile};
    use std::path::Path;
    // std's, also in a loom build (the crate's own are loom's there).
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    /// A log on a disk that can be made full: appends and rewrites fail.
    #[derive(Debug)]
    struct Fillable {
        mem: MemFile,
        full: Arc<AtomicBool>,
        rewrites: Arc<AtomicU64>,
    }

    impl LogFile for Fillable {
        fn path(&self) -> &Path {
            self.mem.path()
        }
        fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
            self.mem.read_all()
        }
        fn append(&mut self, b: &[u8]) -> std::io::Result<()> {
            if self.full.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("no space left on device"));
            }
            self.mem.append(b)
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.mem.truncate(len)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            self.mem.sync()
        }
        fn replace(&mut self, b: &[u8]) -> std::io::Result<()> {
            self.rewrites.fetch_add(1, Ordering::Relaxed);
            if self.full.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("no space left on device"));
            }
            self.mem.replace(b)
        }
    }

    /// A failed group commit repairs the log (rewrites it from memory) at once; after
    /// a repair the next waits `repair_retry`, however the disk fails (for good, or
    /// every other write), so a bad disk costs one rewrite per interval, not one per
    /// commit; once repaired, commits do not rewrite again; and the close tries once
    /// more, failing if the hole is still there. (Regression: every commit
    /// of a full disk rewrote the whole live state, on the node's driver.)
    #[test]
    fn a_full_disk_costs_one_repair_per_interval_not_one_per_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DedupConfig {
            durable: Some(DurableDedup::new(dir.path())),
            ..DedupConfig::default()
        };
        let t0 = Instant::now();
        let mut d = Dedup::open_at(cfg, t0).unwrap();
        let retry = Duration::from_secs(1);
        d.log.as_mut().unwrap().repair_retry = retry;
        let full = Arc::new(AtomicBool::new(false));
        let rewrites = Arc::new(AtomicU64::new(0));
        let io = Fillable {
            mem: MemFile::default(),
            full: full.clone(),
            rewrites: rewrites.clone(),
        };
        let (log, _) = DedupLog::open_on(Box::new(io), FsyncPolicy::Always).unwrap();
        d.log.as_ref().unwrap().log.lock().unwrap().log = log;
        let origin = Origin {
            node: NodeId(1),
            incarnation: 7,
        };
        let mut seq = 0u64;
        let mut commit = || {
            seq += 1;
            let id = MessageId::Seq {
                origin,
                channel: ChannelId(0),
                seq,
            };
            assert_eq!(d.begin(&id, t0).unwrap(), Admit::Fresh);
            d.complete_unsynced(&id, t0).unwrap();
            d.sync()
        };
        let count = || rewrites.load(Ordering::Relaxed);
        assert!(commit().is_ok());
        full.store(true, Ordering::Relaxed);
        // A full disk: the first failure's repair is tried (and fails), then none
        // within the interval.
        for _ in 0..50 {
            assert!(commit().is_err());
        }
        assert_eq!(count(), 1, "repairs while full");
        std::thread::sleep(retry + Duration::from_millis(50));
        assert!(commit().is_err());
        assert_eq!(count(), 2, "one more try after the interval");
        // A disk failing every other write: still none within the interval.
        for i in 0..40 {
            full.store(i % 2 == 0, Ordering::Relaxed);
            let _ = commit();
        }
        assert_eq!(count(), 2, "repairs while failing now and then");
        // Room again: the first commit after the interval repairs the hole, which
        // reports every record on disk; the ones after do not rewrite.
        full.store(false, Ordering::Relaxed);
        std::thread::sleep(retry + Duration::from_millis(50));
        assert!(commit().is_ok());
        assert_eq!(count(), 3, "the repair with room");
        for _ in 0..20 {
            assert!(commit().is_ok());
        }
        assert_eq!(count(), 3, "rewrites once repaired");
        // Full again within the interval after that repair: none now; the close
        // tries at once, and says the hole is left.
        full.store(true, Ordering::Relaxed);
        assert!(commit().is_err());
        assert_eq!(count(), 3, "a repair within the interval after the last");
        assert!(d.close().is_err(), "a close leaving a hole is an error");
        assert_eq!(count(), 4, "the repair at close");
    }
}
