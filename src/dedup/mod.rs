//! Receiver-side deduplication for effectively-once delivery.
//!
//! Owns the answer to "has this message already been processed (or is it being
//! processed right now)?": a [`SeqWindow`] per `(origin, channel)` stream for
//! library-assigned IDs, one [`IdTable`] for application keys, a lock-free registry of
//! streams, and an optional durable log. Must not do delivery, acking or network IO,
//! and must not read the clock on the hot path (callers pass `now`).
//!
//! # Protocol for the receiver
//!
//! 1. [`Dedup::begin`] before handing a message to the handler: `Fresh` → deliver;
//!    `Duplicate` → ack without delivering; `InProgress` → another delivery of the same
//!    message is running: neither deliver nor ack (its owner will ack). An error
//!    (`WindowOverrun`, `TableFull`) → neither deliver nor ack: the sender retries.
//! 2. Handler succeeded → [`Dedup::complete`] then ack. Handler failed, or the delivery
//!    was dropped unacked → [`Dedup::release`], so the redelivery is processed.
//!    **Releasing on drop is the caller's job**: an entry left in progress is never
//!    expired and keeps its slot (and, in a window, holds the watermark back until the
//!    sender's [`Dedup::advance_floor`] moves past it).
//!
//! # Where the guarantee runs out
//!
//! * Application keys are remembered for `horizon` after completion (default 2 min,
//!   like NATS JetStream's duplicate window). A retry arriving later is processed again.
//!   Keep the horizon longer than the sender's retry deadline plus hint TTL.
//! * Sequence windows remember forever (per origin incarnation).
//! * Without [`DurableDedup`], everything is forgotten on restart: effectively-once
//!   degrades to at-least-once across receiver restarts. With it and
//!   [`FsyncPolicy::Always`], every `complete` that returned is on disk before the ack;
//!   with `Never`, a machine crash may lose the last completions (they are then
//!   processed again after the restart), a process crash does not.
//! * Durable key entries carry a wall-clock completion time (the only clock read is at
//!   `open`); a wall clock stepped forward across a restart shortens their horizon.

pub(crate) mod log;
mod sync;
mod table;
mod window;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use table::IdTable;
pub use window::SeqWindow;

use self::log::{DedupLog, Record};
use self::sync::{AtomicPtr, AtomicU64, Ordering};
use crate::{ChannelId, MessageId, Origin};

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
    /// The ID table has no free or expired slot for this key. Do not process; nack so
    /// the sender retries after entries expire. Counted as `table_full`; raise
    /// `table_capacity` if it happens in normal operation.
    #[error("dedup table full ({capacity} slots, none expired)")]
    TableFull {
        /// Slots in the table.
        capacity: usize,
    },
    /// `seq` is 0 or above [`SeqWindow::MAX_SEQ`]: a malformed ID. Drop the message.
    #[error("seq {seq} is outside 1..=2^51-1")]
    SeqOutOfRange {
        /// The rejected seq.
        seq: u64,
    },
    /// A new stream was seen but `max_streams` streams are already registered. Do not
    /// process; raise `max_streams`.
    #[error("too many dedup streams (max {max})")]
    TooManyStreams {
        /// The configured limit.
        max: usize,
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
    /// Reading or writing the durable log failed. From `complete`: the message is
    /// marked done in memory but may not survive a restart; acking is still correct
    /// (at worst it is processed again after a restart).
    #[error("dedup log io: {0}")]
    Io(#[from] std::io::Error),
}

/// When the durable log is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// After every record: a returned `complete` survives a machine crash. Slowest.
    #[default]
    Always,
    /// Never explicitly: records reach the OS on every `complete` (a process crash
    /// loses nothing) but a machine crash may lose recent ones.
    Never,
}

/// Durable dedup options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableDedup {
    /// Directory holding `dedup.log` (created if missing).
    pub dir: PathBuf,
    /// fsync policy; default [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
    /// Rewrite the log from the live state when it grows beyond this many bytes;
    /// default 64 MiB.
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

/// Dedup configuration.
///
/// Defaults: `window` 1024 seqs per stream (1 KiB each; must exceed the sender's
/// in-flight window), `max_streams` 4096, `table_capacity` 2^18 slots (6 MiB; size it
/// to about twice the peak key rate × horizon), `horizon` 2 minutes (NATS JetStream's
/// default duplicate window), `durable` `None` (in memory only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupConfig {
    /// Seqs tracked above each stream's watermark (rounded up to a power of two, ≥ 64).
    pub window: u32,
    /// Most `(origin, channel)` streams remembered (the registry is fixed-size).
    pub max_streams: usize,
    /// Slots in the application-key table (rounded up to a power of two).
    pub table_capacity: usize,
    /// How long a completed application key is remembered.
    pub horizon: Duration,
    /// Persist the state so duplicates are still caught after a restart.
    pub durable: Option<DurableDedup>,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window: 1024,
            max_streams: 4096,
            table_capacity: 1 << 18,
            horizon: Duration::from_secs(120),
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
        if self.table_capacity == 0 || self.table_capacity > 1 << 30 {
            return Err(DedupError::InvalidConfig(
                "table_capacity must be in 1..=2^30",
            ));
        }
        if self.horizon.is_zero() || self.horizon > Duration::from_secs(365 * 86_400) {
            return Err(DedupError::InvalidConfig("horizon must be in (0, 1 year]"));
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
    /// Expired table entries reused by inserts.
    pub expired_reclaimed: u64,
    /// Successful `complete` calls.
    pub completed: u64,
    /// Successful `release` calls.
    pub released: u64,
    /// Streams registered.
    pub streams: u64,
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
/// allocate (a new stream allocates its window once; the durable log appends under a
/// mutex, which is the IO path).
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
    /// The log and the size at which it is next compacted.
    log: Option<(Mutex<DedupLog>, u64, AtomicU64)>,
    base: Instant,
    base_unix_ms: u64,
    counters: Counters,
}

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
    /// `now` is the time base for the key table (pass the same clock as to `begin`).
    ///
    /// # Errors
    /// `InvalidConfig`; `BadHeader` if the log file is not a dedup log; `Io`.
    pub fn open_at(cfg: DedupConfig, now: Instant) -> Result<Dedup, DedupError> {
        cfg.validate()?;
        let base_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut d = Dedup {
            streams: StreamRegistry::new(cfg.max_streams, cfg.window),
            table: IdTable::new(cfg.table_capacity, cfg.horizon, now),
            log: None,
            base: now,
            base_unix_ms,
            counters: Counters::default(),
        };
        if let Some(dur) = &cfg.durable {
            let (log, rec) = DedupLog::open(&dur.dir, dur.fsync)?;
            d.counters
                .corrupt_records_skipped
                .store(rec.corrupt_skipped, Ordering::Relaxed);
            d.counters
                .torn_bytes_truncated
                .store(rec.torn_bytes, Ordering::Relaxed);
            d.replay(&rec.records, now);
            let next = dur.compact_after_bytes.max(2 * log.len());
            d.log = Some((
                Mutex::new(log),
                dur.compact_after_bytes,
                AtomicU64::new(next),
            ));
        }
        Ok(d)
    }

    /// Check-and-insert `id` (see the module doc for what to do with each answer).
    ///
    /// # Errors
    /// `WindowOverrun`, `TableFull`, `TooManyStreams`: neither process nor ack.
    /// `SeqOutOfRange`: malformed ID, drop it.
    pub fn begin(&self, id: &MessageId, now: Instant) -> Result<Admit, DedupError> {
        let r = match *id {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => self.streams.get_or_insert(origin, channel)?.begin(seq),
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

    /// Like [`Dedup::complete`], but a durable record is only written (it survives a
    /// process crash), not fsynced: call [`Dedup::sync`] once for a batch before
    /// acknowledging any of it (group commit: one fsync per burst instead of one per
    /// message).
    pub fn complete_unsynced(&self, id: &MessageId, now: Instant) -> Result<(), DedupError> {
        self.complete_inner(id, now, false)
    }

    /// fsync (per the durable policy) every record written since the last sync.
    pub fn sync(&self) -> Result<(), DedupError> {
        let Some((log, _, _)) = &self.log else {
            return Ok(());
        };
        log.lock().unwrap_or_else(|e| e.into_inner()).sync()
    }

    fn complete_inner(&self, id: &MessageId, now: Instant, sync: bool) -> Result<(), DedupError> {
        let (done, rec) = match *id {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => match self.streams.get(origin, channel) {
                Some(w) => (w.complete(seq), Record::SeqDone(origin, channel, seq)),
                None => (false, Record::SeqDone(origin, channel, seq)),
            },
            MessageId::Key(k) => (
                self.table.complete(k, now),
                Record::KeyDone(k, self.unix_ms(now)),
            ),
        };
        if !done {
            return Ok(());
        }
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        self.persist(rec, now, sync)
    }

    /// Forgets an in-progress id (processing failed) so its redelivery is `Fresh`.
    pub fn release(&self, id: &MessageId) {
        let released = match *id {
            MessageId::Seq {
                origin,
                channel,
                seq,
            } => self
                .streams
                .get(origin, channel)
                .is_some_and(|w| w.release(seq)),
            MessageId::Key(k) => self.table.release(k),
        };
        if released {
            self.counters.released.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sender promises every seq `< floor` of this stream is settled forever:
    /// they become duplicates (see [`SeqWindow::advance_floor`]). Persisted when
    /// durable.
    ///
    /// # Errors
    /// `TooManyStreams` for a new stream over the limit; `Io` from the durable log.
    pub fn advance_floor(
        &self,
        origin: Origin,
        channel: ChannelId,
        floor: u64,
    ) -> Result<(), DedupError> {
        let w = self.streams.get_or_insert(origin, channel)?;
        if floor <= w.watermark() + 1 {
            return Ok(());
        }
        w.advance_floor(floor);
        self.persist(Record::Floor(origin, channel, floor), self.base, false)
    }

    /// The dedup window of a stream, if it has been seen.
    pub fn window_of(&self, origin: Origin, channel: ChannelId) -> Option<&SeqWindow> {
        self.streams.get(origin, channel)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DedupStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DedupStats {
            fresh: l(&c.fresh),
            duplicates: l(&c.duplicates),
            in_progress_hits: l(&c.in_progress_hits),
            overruns: l(&c.overruns),
            table_full: self.table.table_full_count(),
            expired_reclaimed: self.table.expired_reclaimed_count(),
            completed: l(&c.completed),
            released: l(&c.released),
            streams: self.streams.len.load(Ordering::Relaxed),
            corrupt_records_skipped: l(&c.corrupt_records_skipped),
            torn_bytes_truncated: l(&c.torn_bytes_truncated),
            recovery_dropped: l(&c.recovery_dropped),
        }
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.base_unix_ms + now.saturating_duration_since(self.base).as_millis() as u64
    }

    fn persist(&self, rec: Record, now: Instant, sync: bool) -> Result<(), DedupError> {
        let Some((log, compact_after, next)) = &self.log else {
            return Ok(());
        };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if sync {
            log.append(&rec)?;
        } else {
            log.append_unsynced(&rec)?;
        }
        if log.len() > next.load(Ordering::Relaxed) {
            // Rewrite from the live state; the next compaction waits until the log
            // has at least doubled, so rewriting stays amortised O(1) per record.
            let live = self.live_records(now);
            log.rewrite(&live)?;
            next.store((*compact_after).max(2 * log.len()), Ordering::Relaxed);
        }
        Ok(())
    }

    /// The live state as records (compaction).
    fn live_records(&self, now: Instant) -> Vec<Record> {
        let mut out = Vec::new();
        self.streams.for_each(|origin, channel, w| {
            let wm = w.watermark();
            if wm > 0 {
                out.push(Record::Floor(origin, channel, wm + 1));
            }
            for s in w.done_above_watermark() {
                out.push(Record::SeqDone(origin, channel, s));
            }
        });
        let now_unix = self.unix_ms(now);
        for (k, age) in self.table.done_entries(now) {
            out.push(Record::KeyDone(k, now_unix.saturating_sub(age)));
        }
        out
    }

    fn replay(&mut self, records: &[Record], now: Instant) {
        use std::collections::BTreeMap;
        let mut per_stream: BTreeMap<(Origin, ChannelId), (u64, Vec<u64>)> = BTreeMap::new();
        let now_unix = self.unix_ms(now);
        let mut dropped = 0;
        for r in records {
            match *r {
                Record::SeqDone(o, c, s) => per_stream.entry((o, c)).or_default().1.push(s),
                Record::Floor(o, c, f) => {
                    let e = per_stream.entry((o, c)).or_default();
                    e.0 = e.0.max(f);
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
        for ((o, c), (floor, mut seqs)) in per_stream {
            let Ok(w) = self.streams.get_or_insert(o, c) else {
                dropped += seqs.len() as u64;
                continue;
            };
            w.advance_floor(floor);
            seqs.sort_unstable();
            for s in seqs {
                if w.mark_done(s).is_err() {
                    dropped += 1;
                }
            }
        }
        self.counters
            .recovery_dropped
            .store(dropped, Ordering::Relaxed);
    }
}

/// A fixed-size, insert-only, lock-free map from `(origin, channel)` to its window.
struct StreamRegistry {
    slots: Box<[AtomicPtr<StreamEntry>]>,
    mask: usize,
    max: usize,
    window: u32,
    len: AtomicU64,
}

#[derive(Debug)]
struct StreamEntry {
    origin: Origin,
    channel: ChannelId,
    window: SeqWindow,
}

impl std::fmt::Debug for StreamRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRegistry")
            .field("streams", &self.len.load(Ordering::Relaxed))
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl StreamRegistry {
    fn new(max: usize, window: u32) -> Self {
        let cap = (max * 2).next_power_of_two();
        StreamRegistry {
            slots: (0..cap)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            mask: cap - 1,
            max,
            window,
            len: AtomicU64::new(0),
        }
    }

    fn home(origin: Origin, channel: ChannelId) -> usize {
        let mut z =
            origin.node.0 ^ origin.incarnation.rotate_left(21) ^ (channel.0 as u64).rotate_left(42);
        z = z.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (z ^ (z >> 31)) as usize
    }

    fn get(&self, origin: Origin, channel: ChannelId) -> Option<&SeqWindow> {
        let h = Self::home(origin, channel);
        for i in 0..=self.mask {
            let p = self.slots[(h + i) & self.mask].load(Ordering::Acquire);
            if p.is_null() {
                return None;
            }
            // SAFETY: non-null pointers come from `Box::into_raw` in `get_or_insert`
            // and are freed only in `Drop`, which has `&mut self`.
            let e = unsafe { &*p };
            if e.origin == origin && e.channel == channel {
                return Some(&e.window);
            }
        }
        None
    }

    fn get_or_insert(&self, origin: Origin, channel: ChannelId) -> Result<&SeqWindow, DedupError> {
        if let Some(w) = self.get(origin, channel) {
            return Ok(w);
        }
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.max as u64 {
            self.len.fetch_sub(1, Ordering::AcqRel);
            // A racer may have inserted it meanwhile.
            return self
                .get(origin, channel)
                .ok_or(DedupError::TooManyStreams { max: self.max });
        }
        let fresh = Box::into_raw(Box::new(StreamEntry {
            origin,
            channel,
            window: SeqWindow::new(self.window),
        }));
        let h = Self::home(origin, channel);
        for i in 0..=self.mask {
            let slot = &self.slots[(h + i) & self.mask];
            let mut p = slot.load(Ordering::Acquire);
            if p.is_null() {
                match slot.compare_exchange(
                    std::ptr::null_mut(),
                    fresh,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    // SAFETY: just published; lives until Drop.
                    Ok(_) => return Ok(unsafe { &(*fresh).window }),
                    Err(actual) => p = actual,
                }
            }
            // SAFETY: as in `get`.
            let e = unsafe { &*p };
            if e.origin == origin && e.channel == channel {
                // Lost the race to the same stream: free ours.
                // SAFETY: `fresh` was never published.
                drop(unsafe { Box::from_raw(fresh) });
                self.len.fetch_sub(1, Ordering::AcqRel);
                return Ok(&e.window);
            }
        }
        // Unreachable in practice: the array has 2 × max slots and len <= max.
        // SAFETY: `fresh` was never published.
        drop(unsafe { Box::from_raw(fresh) });
        self.len.fetch_sub(1, Ordering::AcqRel);
        Err(DedupError::TooManyStreams { max: self.max })
    }

    fn for_each(&self, mut f: impl FnMut(Origin, ChannelId, &SeqWindow)) {
        for slot in self.slots.iter() {
            let p = slot.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: as in `get`.
                let e = unsafe { &*p };
                f(e.origin, e.channel, &e.window);
            }
        }
    }
}

impl Drop for StreamRegistry {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            let p = slot.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: we have `&mut self`; every non-null pointer is a published,
                // unique `Box::into_raw` result.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}
