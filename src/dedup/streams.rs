//! The registry of sequence windows, and their retirement.
//!
//! Owns the map from `(origin, channel)` to its [`SeqWindow`], the tombstones of retired
//! streams, and the rules that keep retirement exact. Must not touch files or clocks
//! (times are wall-clock milliseconds passed in by [`Dedup`](super::Dedup)).
//!
//! # Lifecycle
//!
//! A stream is *live* from its first message. It is *retired* — its window freed, a
//! small [`Tombstone`] left in its place — when
//!
//! * its sender said it is finished ([`Dedup::finish_stream`](super::Dedup::finish_stream))
//!   and every seq up to the announced last one is settled, or
//! * nothing touched it for `retention` (the sender crashed or restarted: a new run is
//!   a new origin, the old one never speaks again) and none of its messages is in
//!   progress in a handler here (or one has been for twice the retention).
//!
//! A tombstone keeps the watermark and the highest seq ever begun. For a later message
//! on the retired stream it answers exactly, or refuses:
//!
//! * `seq <= watermark`: `Duplicate` (it was processed);
//! * `seq` above every seq ever begun, no holes below it, not finished: the stream is
//!   *revived* (a live sender that was idle for the whole retention) with its
//!   watermark — exact, since nothing above it was ever processed;
//! * otherwise [`super::DedupError::StreamRetired`]: not
//!   processed, not acked, counted. Processing it could process it twice.
//!
//! A tombstone is itself forgotten `retention` (plus up to a quarter) after the
//! retirement, or after the last late message or completion it heard of. A message that arrives later still — after a silence of
//! more than the retention on a finished stream, or twice the retention on a crashed
//! one — is treated as a new stream's: the configuration check (retention longer than
//! the longest retry deadline plus hint TTL) is what rules that out.
//!
//! # Races
//!
//! A begin enters the stream's gate; retirement closes the gate only at zero, and
//! re-checks idleness after closing (reopening if the stream moved). So no begin can
//! mark a seq in a window after its tombstone was computed. A begin that meets a closed
//! gate waits for the tombstone (written before the window is unlinked) and answers
//! from it.

use super::sync::{wait_for_other, AtomicU64, Ordering, StreamMap};
use super::{Admit, DedupError, SeqWindow, WarnGate};
use crate::{ChannelId, NodeId, Origin};

/// Set in a stream's gate while it is being retired.
const CLOSED: u64 = 1 << 63;

/// How long a settled stream must have been idle before a full registry retires it
/// early ([`StreamRegistry::retire_under_pressure`]).
const PRESSURE_IDLE_MS: u64 = 1_000;

/// Tombstones one sending node may hold, as a multiple of `max_streams`, before its
/// finished and idle-settled streams stop being retired early (they then stay live
/// until the retention, and its new streams meet its live limit).
const TOMBSTONES_PER_NODE: u64 = 4;

pub(super) type StreamKey = (Origin, ChannelId);

/// What is left of a retired stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tombstone {
    /// Every seq `<= watermark` was settled.
    pub(super) watermark: u64,
    /// The highest seq ever begun (`>= watermark`).
    pub(super) max_seen: u64,
    /// The sender announced its end: no seq above `watermark` is legitimate.
    pub(super) finished: bool,
    /// When it was retired (wall-clock ms).
    pub(super) retired_ms: u64,
}

/// What a tombstone says about a seq.
enum Verdict {
    Duplicate,
    Revive,
    Refuse,
}

impl Tombstone {
    fn verdict(&self, seq: u64) -> Verdict {
        if seq <= self.watermark {
            Verdict::Duplicate
        } else if !self.finished && self.max_seen == self.watermark {
            Verdict::Revive
        } else {
            Verdict::Refuse
        }
    }
}

/// A live stream.
pub(super) struct StreamEntry {
    pub(super) window: SeqWindow,
    last_active_ms: AtomicU64,
    gate: AtomicU64,
    max_seen: AtomicU64,
    /// `0`, or the last seq the sender announced.
    finished: AtomicU64,
    /// Last activity time written to the durable log.
    stamped_ms: AtomicU64,
    /// Seqs begun `Fresh` and not yet completed or released (the receiver's own
    /// handlers hold them: a stream is not retired under them, see `retirable`).
    inflight: AtomicU64,
    /// The watermark last written to the durable log as a floor checkpoint (see
    /// [`StreamRegistry::complete`]).
    checkpoint: AtomicU64,
}

/// What [`StreamRegistry::complete`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Completed {
    /// The seq was in progress and is now done.
    pub(super) done: bool,
    /// Every seq up to the sender's announced last one is done.
    pub(super) settled: bool,
    /// The stream's activity time is due to be written.
    pub(super) stamp: bool,
    /// A floor to write to the durable log: every seq below it is done.
    pub(super) checkpoint: Option<u64>,
}

impl StreamEntry {
    fn new(window: u32, floor: u64, now_ms: u64) -> StreamEntry {
        let w = SeqWindow::new(window);
        w.advance_floor(floor);
        StreamEntry {
            window: w,
            last_active_ms: AtomicU64::new(now_ms),
            gate: AtomicU64::new(0),
            max_seen: AtomicU64::new(floor.saturating_sub(1)),
            finished: AtomicU64::new(0),
            stamped_ms: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            checkpoint: AtomicU64::new(floor.saturating_sub(1)),
        }
    }

    #[inline]
    fn touch(&self, now_ms: u64) {
        if self.last_active_ms.load(Ordering::Relaxed) < now_ms {
            self.last_active_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    /// `None` if the stream is being retired.
    fn begin(&self, seq: u64, now_ms: u64) -> Option<Result<Admit, DedupError>> {
        if self.gate.fetch_add(1, Ordering::AcqRel) & CLOSED != 0 {
            self.gate.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.touch(now_ms);
        let fin = self.finished.load(Ordering::Acquire);
        let r = if fin != 0 && seq > fin {
            Err(DedupError::StreamRetired {
                seq,
                watermark: self.window.watermark(),
            })
        } else {
            self.window.begin(seq)
        };
        if let Ok(Admit::Fresh) = r {
            self.max_seen.fetch_max(seq, Ordering::AcqRel);
            self.inflight.fetch_add(1, Ordering::AcqRel);
        }
        self.gate.fetch_sub(1, Ordering::AcqRel);
        Some(r)
    }

    fn tombstone(&self, now_ms: u64) -> Tombstone {
        let watermark = self.window.watermark();
        let fin = self.finished.load(Ordering::Acquire);
        Tombstone {
            watermark,
            max_seen: self.max_seen.load(Ordering::Acquire).max(watermark),
            finished: fin != 0 && watermark >= fin,
            retired_ms: now_ms,
        }
    }

    /// Its tombstone would answer every later seq exactly (see the module docs): not
    /// finished, nothing in progress, every seq it began settled; and idle for
    /// [`PRESSURE_IDLE_MS`] at `now_ms`.
    fn answered_exactly(&self, now_ms: u64) -> bool {
        let idle = now_ms.saturating_sub(self.last_active_ms.load(Ordering::Acquire));
        idle >= PRESSURE_IDLE_MS
            && self.finished.load(Ordering::Acquire) == 0
            && self.inflight.load(Ordering::Acquire) == 0
            && self.max_seen.load(Ordering::Acquire) <= self.window.watermark()
    }

    /// Retirable at `now_ms`: finished and settled, or idle for `retention_ms` with no
    /// message in progress (one held by a handler for twice the retention does not
    /// keep it: a seq whose in-progress mark a sender's floor overtook is never
    /// settled here).
    fn retirable(&self, now_ms: u64, retention_ms: u64) -> bool {
        let fin = self.finished.load(Ordering::Acquire);
        let idle = now_ms.saturating_sub(self.last_active_ms.load(Ordering::Acquire));
        (fin != 0 && self.window.watermark() >= fin)
            || (idle >= retention_ms
                && (self.inflight.load(Ordering::Acquire) == 0 || idle >= 2 * retention_ms))
    }
}

/// Counters of the registry.
#[derive(Debug, Default)]
pub(super) struct StreamCounters {
    pub(super) retired_idle: AtomicU64,
    pub(super) retired_finished: AtomicU64,
    pub(super) revived: AtomicU64,
    pub(super) refused_retired: AtomicU64,
    pub(super) tombstones_expired: AtomicU64,
    pub(super) retire_deferred: AtomicU64,
}

/// What the registry counts per sending node.
#[derive(Debug, Default)]
struct NodeCounts {
    /// Live streams (kept only when there is a per-node limit below `max`).
    live: AtomicU64,
    /// Tombstones of its streams.
    tombstones: AtomicU64,
}

/// Live streams and tombstones.
pub(super) struct StreamRegistry {
    live: StreamMap<StreamKey, StreamEntry>,
    retired: StreamMap<StreamKey, Tombstone>,
    window: u32,
    max: usize,
    /// Most live streams of one sending node (all its runs).
    max_per_node: usize,
    /// Live streams and tombstones per sending node (entries stay at zero: one per
    /// node ever seen, and only a connection's own node can be named, so as many as
    /// peers).
    per_node: StreamMap<NodeId, NodeCounts>,
    pub(super) retention_ms: u64,
    len: AtomicU64,
    tombstones: AtomicU64,
    next_sweep_ms: AtomicU64,
    /// When a full registry last looked for streams to retire early.
    pressure_scan_ms: AtomicU64,
    /// Paces the "tombstone budget reached" warning.
    warn: WarnGate,
    pub(super) counters: StreamCounters,
}

impl std::fmt::Debug for StreamRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRegistry")
            .field("streams", &self.len())
            .field("tombstones", &self.tombstones())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// Something the caller must persist (durable dedup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// A stream was retired.
    Retired(StreamKey, Tombstone),
    /// A retired stream came back with this floor.
    Revived(StreamKey, u64),
    /// A stream was created, or was active again long after its last stamp.
    Active(StreamKey, u64),
}

impl StreamRegistry {
    pub(super) fn new(max: usize, max_per_node: usize, window: u32, retention_ms: u64) -> Self {
        StreamRegistry {
            live: StreamMap::new(),
            retired: StreamMap::new(),
            window,
            max,
            max_per_node,
            per_node: StreamMap::new(),
            retention_ms,
            len: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
            next_sweep_ms: AtomicU64::new(0),
            pressure_scan_ms: AtomicU64::new(0),
            warn: WarnGate::new(),
            counters: StreamCounters::default(),
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    pub(super) fn tombstones(&self) -> u64 {
        self.tombstones.load(Ordering::Relaxed)
    }

    /// Bytes one live stream takes (its window, entry and an estimate of the map's
    /// per-entry overhead).
    pub(super) fn bytes_per_stream(&self) -> usize {
        (self.window.max(64) as usize).next_power_of_two() / 8 * 8
            + std::mem::size_of::<StreamEntry>()
            + std::mem::size_of::<StreamKey>()
            + 32
    }

    /// Bytes one tombstone takes (estimate, with map overhead).
    pub(super) fn bytes_per_tombstone() -> usize {
        std::mem::size_of::<Tombstone>() + std::mem::size_of::<StreamKey>() + 32
    }

    /// Check-and-insert `seq` on its stream (creating or reviving it).
    pub(super) fn begin(
        &self,
        k: StreamKey,
        seq: u64,
        now_ms: u64,
        changes: &mut Vec<Change>,
    ) -> Result<Admit, DedupError> {
        loop {
            match self.live.with(&k, |e| e.map(|e| e.begin(seq, now_ms))) {
                Some(Some(r)) => return r,
                Some(None) => {
                    // Being retired: its tombstone is about to replace it.
                    if let Some(r) = self.answer_from_tombstone(k, seq, now_ms, changes) {
                        return r;
                    }
                    wait_for_other();
                    continue;
                }
                None => {}
            }
            if let Some(r) = self.answer_from_tombstone(k, seq, now_ms, changes) {
                return r;
            }
            if self.live.with(&k, |e| e.is_some()) {
                continue;
            }
            self.create(k, 1, now_ms, changes)?;
        }
    }

    /// Marks `seq` done; returns whether it was in progress, plus the entry's
    /// finished-and-settled state (the caller then retires it).
    pub(super) fn complete(&self, k: &StreamKey, seq: u64, now_ms: u64) -> Completed {
        self.live.with(k, |e| match e {
            Some(e) => {
                // A completion is activity: the message's retransmissions may follow.
                e.touch(now_ms);
                let done = e.window.complete(seq);
                if done {
                    e.inflight.fetch_sub(1, Ordering::AcqRel);
                }
                let watermark = e.window.watermark();
                let fin = e.finished.load(Ordering::Acquire);
                // A floor checkpoint every eighth of a window the watermark moves: the
                // durable log's records of a stream are replayed in seq order and
                // slide the window from its last floor, so one lost record (a failed
                // write, a corrupted one) used to stop the slide there and every
                // record more than a window above it was dropped at recovery, those
                // messages then processed again. A checkpoint written after the loss
                // restarts the slide above it.
                let step = (e.window.window() / 8).max(8);
                let last = e.checkpoint.load(Ordering::Acquire);
                let checkpoint = (done
                    && watermark >= last.saturating_add(step)
                    && e.checkpoint
                        .compare_exchange(last, watermark, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok())
                .then_some(watermark + 1);
                Completed {
                    done,
                    settled: fin != 0 && watermark >= fin,
                    stamp: self.stamp_due(e, now_ms),
                    checkpoint,
                }
            }
            None => {
                // Retired while the handler ran: the completion still counts as
                // activity for the tombstone.
                self.refresh_tombstone(k, now_ms);
                Completed::default()
            }
        })
    }

    /// Restarts `k`'s tombstone clock (it keeps answering for a retention after the
    /// last time anything was heard of the stream; granularity `retention / 4`, which
    /// the expiry adds back).
    fn refresh_tombstone(&self, k: &StreamKey, now_ms: u64) {
        let Some(t) = self.retired.with(k, |t| t.copied()) else {
            return;
        };
        if now_ms >= t.retired_ms + self.refresh_ms() {
            // A racing sweep may forget it just before this (it is then put back and
            // counted again, and answers for a retention more, which is only safer) or
            // just after (it then expires on the old clock, as it would have without
            // this message).
            self.add_tombstone(
                *k,
                Tombstone {
                    retired_ms: now_ms,
                    ..t
                },
            );
        }
    }

    fn refresh_ms(&self) -> u64 {
        (self.retention_ms / 4).max(1)
    }

    /// When a tombstone last refreshed at `retired_ms` is forgotten: a full retention
    /// after the last activity, whatever the refresh granularity.
    pub(super) fn tombstone_expiry(&self, retired_ms: u64) -> u64 {
        retired_ms + self.retention_ms + self.refresh_ms()
    }

    pub(super) fn release(&self, k: &StreamKey, seq: u64) -> bool {
        self.live.with(k, |e| {
            e.is_some_and(|e| {
                let released = e.window.release(seq);
                if released {
                    e.inflight.fetch_sub(1, Ordering::AcqRel);
                }
                released
            })
        })
    }

    /// The sender settled every seq `< floor`. Returns `true` if the watermark moved.
    pub(super) fn advance_floor(
        &self,
        k: StreamKey,
        floor: u64,
        now_ms: u64,
        changes: &mut Vec<Change>,
    ) -> Result<bool, DedupError> {
        let mut created = false;
        loop {
            let r = self.live.with(&k, |e| {
                e.map(|e| {
                    if e.gate.load(Ordering::Acquire) & CLOSED != 0 {
                        return None;
                    }
                    e.touch(now_ms);
                    if floor <= e.window.watermark() + 1 {
                        return Some(false);
                    }
                    e.window.advance_floor(floor);
                    Some(true)
                })
            });
            match r {
                Some(Some(moved)) => return Ok(moved || created),
                Some(None) => {
                    wait_for_other();
                    continue;
                }
                None => {}
            }
            if let Some(t) = self.retired.with(&k, |t| t.copied()) {
                // A retired stream: the sender's promise revives it only if it covers
                // every seq ever begun (then nothing unknown remains below it).
                if t.finished || floor <= t.max_seen.max(t.watermark) + 1 {
                    return Ok(false);
                }
                created |= self.create(k, floor, now_ms, changes)?;
                continue;
            }
            if floor <= 1 {
                return Ok(false);
            }
            created |= self.create(k, floor, now_ms, changes)?;
        }
    }

    /// The sender announced `last_seq` as the stream's last: retire it once every seq up
    /// to it is settled. Returns `true` if it is settled already.
    pub(super) fn finish(
        &self,
        k: StreamKey,
        last_seq: u64,
        now_ms: u64,
        changes: &mut Vec<Change>,
    ) -> Result<bool, DedupError> {
        loop {
            let r = self.live.with(&k, |e| {
                e.map(|e| {
                    e.finished.store(last_seq.max(1), Ordering::Release);
                    e.window.watermark() >= last_seq
                })
            });
            if let Some(settled) = r {
                return Ok(settled);
            }
            if self.retired.with(&k, |t| t.is_some()) {
                return Ok(false);
            }
            if last_seq == 0 {
                return Ok(false);
            }
            self.create(k, 1, now_ms, changes)?;
        }
    }

    /// Retires `k` now if it is retirable (see [`StreamEntry::retirable`]) and its node
    /// is within its tombstone budget (else it stays live: see
    /// [`within_tombstone_budget`](Self::within_tombstone_budget)).
    pub(super) fn try_retire(&self, k: StreamKey, now_ms: u64) -> Option<Tombstone> {
        if !self.within_tombstone_budget(k.0.node, now_ms) {
            return None;
        }
        self.retire_idle(k, now_ms)
    }

    /// Retires `k` now if it is retirable, whatever its node's tombstones (the sweep:
    /// a stream idle for the retention leaves its window, which costs more).
    fn retire_idle(&self, k: StreamKey, now_ms: u64) -> Option<Tombstone> {
        let retention_ms = self.retention_ms;
        self.retire_if(k, now_ms, |e| e.retirable(now_ms, retention_ms))
    }

    /// May `node`'s streams be retired early (finished, or settled under pressure)?
    /// Not while it holds [`TOMBSTONES_PER_NODE`] × `max` tombstones: a node that
    /// names runs of itself faster than the retention forgets them (a crash loop, or a
    /// peer that lies about its incarnation) pays with its own streams — they stay
    /// live, and at its live limit its new streams are refused — and neither grows the
    /// registry without bound nor uses up another node's room. Counted in
    /// `retire_deferred`, warned at most every 10 s.
    fn within_tombstone_budget(&self, node: NodeId, now_ms: u64) -> bool {
        let held = self.node_tombstones(node, |n| n.load(Ordering::Relaxed));
        let budget = TOMBSTONES_PER_NODE * self.max as u64;
        if held < budget {
            return true;
        }
        self.counters
            .retire_deferred
            .fetch_add(1, Ordering::Relaxed);
        if self.warn.due(now_ms) {
            tracing::warn!(
                node = node.0,
                tombstones = held,
                budget,
                deferred_total = self.counters.retire_deferred.load(Ordering::Relaxed),
                "dedup: a sending node holds its tombstone budget (it started runs or \
                 streams faster than the retention forgets them); its finished streams \
                 stay live until the retention"
            );
        }
        false
    }

    /// A stream limit is reached: retire every live stream (of `node` only, for its
    /// per-node limit) that its tombstone answers exactly — nothing in progress, no
    /// hole (every seq it began is settled), not finished — and that was idle for
    /// [`PRESSURE_IDLE_MS`], so a new stream finds room. Lossless: a later seq at or
    /// below the watermark is a duplicate, one above it revives the stream where it
    /// stopped. At most one scan per [`PRESSURE_IDLE_MS`] / 10; a node holding its
    /// tombstone budget (see [`within_tombstone_budget`](Self::within_tombstone_budget))
    /// has none of its streams retired this way, and no other node's budget is
    /// touched. Returns how many were retired. (Regression: a sender's 4 097th
    /// effectively-once channel, or any channel of its run after 8 crashed runs of 512
    /// channels each, was refused for the 24 h retention.)
    fn retire_under_pressure(
        &self,
        node: Option<NodeId>,
        now_ms: u64,
        changes: &mut Vec<Change>,
    ) -> usize {
        let last = self.pressure_scan_ms.load(Ordering::Relaxed);
        if now_ms < last.saturating_add(PRESSURE_IDLE_MS / 10)
            || node.is_some_and(|n| !self.within_tombstone_budget(n, now_ms))
            || self
                .pressure_scan_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return 0;
        }
        let mut candidates = Vec::new();
        self.live.for_each(|k, e| {
            if node.is_none_or(|n| k.0.node == n) && e.answered_exactly(now_ms) {
                candidates.push(*k);
            }
        });
        let mut n = 0;
        for k in candidates {
            if node.is_none() && !self.within_tombstone_budget(k.0.node, now_ms) {
                continue;
            }
            if let Some(t) = self.retire_if(k, now_ms, |e| e.answered_exactly(now_ms)) {
                changes.push(Change::Retired(k, t));
                n += 1;
            }
        }
        if n > 0 {
            tracing::debug!(
                retired = n,
                "dedup: idle, settled streams retired to make room"
            );
        }
        n
    }

    /// Retires `k` now if `retirable` holds for it, before and after its gate closed.
    fn retire_if(
        &self,
        k: StreamKey,
        now_ms: u64,
        retirable: impl Fn(&StreamEntry) -> bool,
    ) -> Option<Tombstone> {
        let t = self.live.with(&k, |e| {
            let e = e?;
            if !retirable(e) {
                return None;
            }
            if e.gate
                .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return None;
            }
            // A begin may have touched it between the check and the close.
            if !retirable(e) {
                e.gate.fetch_and(!CLOSED, Ordering::AcqRel);
                return None;
            }
            let t = e.tombstone(now_ms);
            if e.finished.load(Ordering::Acquire) != 0 && t.finished {
                self.counters
                    .retired_finished
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.retired_idle.fetch_add(1, Ordering::Relaxed);
            }
            Some(t)
        })?;
        self.add_tombstone(k, t);
        self.live.remove(&k);
        self.len.fetch_sub(1, Ordering::Relaxed);
        if self.per_node_limited() {
            self.node_count(k, |n| n.fetch_sub(1, Ordering::AcqRel));
        }
        Some(t)
    }

    /// Is a sweep due at `now_ms`? (At most every `retention / 8`.)
    pub(super) fn sweep_due(&self, now_ms: u64) -> bool {
        now_ms >= self.next_sweep_ms.load(Ordering::Relaxed)
    }

    /// Retires every retirable stream and forgets expired tombstones.
    pub(super) fn sweep(&self, now_ms: u64, changes: &mut Vec<Change>) -> usize {
        let next = now_ms + (self.retention_ms / 8).max(1);
        let cur = self.next_sweep_ms.load(Ordering::Relaxed);
        self.next_sweep_ms.store(cur.max(next), Ordering::Relaxed);
        let mut candidates = Vec::new();
        self.live.for_each(|k, e| {
            if e.retirable(now_ms, self.retention_ms) {
                candidates.push(*k);
            }
        });
        let mut n = 0;
        for k in candidates {
            if let Some(t) = self.retire_idle(k, now_ms) {
                changes.push(Change::Retired(k, t));
                n += 1;
            }
        }
        let mut expired = Vec::new();
        self.retired.for_each(|k, t| {
            if now_ms >= self.tombstone_expiry(t.retired_ms) {
                expired.push(*k);
            }
        });
        for k in expired {
            if self.remove_tombstone(k) {
                self.counters
                    .tombstones_expired
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        n
    }

    /// Live streams: key, window, last activity (for snapshots).
    pub(super) fn for_each_live(&self, mut f: impl FnMut(StreamKey, &SeqWindow, u64)) {
        self.live.for_each(|k, e| {
            f(*k, &e.window, e.last_active_ms.load(Ordering::Relaxed));
        });
    }

    /// Tombstones (for snapshots).
    pub(super) fn for_each_tombstone(&self, mut f: impl FnMut(StreamKey, Tombstone)) {
        self.retired.for_each(|k, t| f(*k, *t));
    }

    /// Calls `f` with `k`'s window, if live.
    /// The watermark of `k`'s tombstone, if it is retired.
    pub(super) fn retired_watermark(&self, k: &StreamKey) -> Option<u64> {
        self.retired.with(k, |t| t.map(|t| t.watermark))
    }

    pub(super) fn with_window<R>(
        &self,
        k: &StreamKey,
        f: impl FnOnce(Option<&SeqWindow>) -> R,
    ) -> R {
        self.live.with(k, |e| f(e.map(|e| &e.window)))
    }

    /// Recovery: a live stream with this floor, done seqs and last activity.
    pub(super) fn restore_live(
        &self,
        k: StreamKey,
        floor: u64,
        seqs: &[u64],
        active_ms: u64,
    ) -> Result<u64, DedupError> {
        let mut changes = Vec::new();
        // Admitted whatever the limits: a recovered stream's records are what makes a
        // resend a duplicate, and dropping it would make it `Fresh` again. (Regression:
        // a log written under higher limits, or by an earlier version without the
        // per-node one, lost the streams over them at open.) New streams wait until
        // the count is back under the limits.
        self.create_with(k, floor, active_ms, &mut changes, false)?;
        self.live.with(&k, |e| {
            let e = e.expect("just created");
            e.last_active_ms.store(active_ms, Ordering::Relaxed);
            e.stamped_ms.store(active_ms, Ordering::Relaxed);
            let mut dropped = 0;
            for &s in seqs {
                if e.window.mark_done(s).is_err() {
                    dropped += 1;
                } else {
                    e.max_seen.fetch_max(s, Ordering::Relaxed);
                }
            }
            Ok(dropped)
        })
    }

    /// Recovery: a tombstone.
    pub(super) fn restore_tombstone(&self, k: StreamKey, t: Tombstone) {
        self.add_tombstone(k, t);
    }

    /// Records (or replaces) `k`'s tombstone; a new one is counted for the registry
    /// and for its node.
    fn add_tombstone(&self, k: StreamKey, t: Tombstone) {
        if self.retired.insert(k, t) {
            self.tombstones.fetch_add(1, Ordering::Relaxed);
            self.node_tombstones(k.0.node, |n| n.fetch_add(1, Ordering::Relaxed));
        }
    }

    /// Forgets `k`'s tombstone (expired, or the stream revived); `false` if a racer
    /// did first. Only the caller that removed it uncounts it, so the counts never
    /// wrap below zero.
    fn remove_tombstone(&self, k: StreamKey) -> bool {
        let removed = self.retired.remove(&k);
        if removed {
            self.tombstones.fetch_sub(1, Ordering::Relaxed);
            self.node_tombstones(k.0.node, |n| n.fetch_sub(1, Ordering::Relaxed));
        }
        removed
    }

    /// Answers from `k`'s tombstone, reviving the stream when that is exact. `None`:
    /// no tombstone (or it was just revived: look again).
    fn answer_from_tombstone(
        &self,
        k: StreamKey,
        seq: u64,
        now_ms: u64,
        changes: &mut Vec<Change>,
    ) -> Option<Result<Admit, DedupError>> {
        let t = self.retired.with(&k, |t| t.copied())?;
        let verdict = t.verdict(seq);
        if !matches!(verdict, Verdict::Revive) {
            self.refresh_tombstone(&k, now_ms);
        }
        match verdict {
            Verdict::Duplicate => Some(Ok(Admit::Duplicate)),
            Verdict::Refuse => {
                self.counters
                    .refused_retired
                    .fetch_add(1, Ordering::Relaxed);
                Some(Err(DedupError::StreamRetired {
                    seq,
                    watermark: t.watermark,
                }))
            }
            Verdict::Revive => match self.create(k, t.watermark + 1, now_ms, changes) {
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            },
        }
    }

    /// Creates `k` with `floor`; `false` if a racer created it first (fine: it is the
    /// same stream). A tombstone of `k` is removed once the live entry is in place.
    fn create(
        &self,
        k: StreamKey,
        floor: u64,
        now_ms: u64,
        changes: &mut Vec<Change>,
    ) -> Result<bool, DedupError> {
        self.create_with(k, floor, now_ms, changes, true)
    }

    /// [`create`](Self::create); `limited: false` admits the stream over the limits
    /// (recovery), still counting it.
    fn create_with(
        &self,
        k: StreamKey,
        floor: u64,
        now_ms: u64,
        changes: &mut Vec<Change>,
        limited: bool,
    ) -> Result<bool, DedupError> {
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.max as u64 && limited {
            self.len.fetch_sub(1, Ordering::AcqRel);
            if self.live.with(&k, |e| e.is_some()) {
                return Ok(false);
            }
            if self.retire_under_pressure(None, now_ms, changes) > 0 {
                return self.create_with(k, floor, now_ms, changes, limited);
            }
            return Err(DedupError::TooManyStreams { max: self.max });
        }
        // One node's share. (Regression: one admitted peer naming 16 384 made-up
        // runs of itself filled `max` and every other peer's new stream was refused
        // for the retention, a day.)
        let max_per_node = self.max_per_node as u64;
        if self.per_node_limited()
            && self.node_count(k, |n| n.fetch_add(1, Ordering::AcqRel)) >= max_per_node
            && limited
        {
            self.node_count(k, |n| n.fetch_sub(1, Ordering::AcqRel));
            self.len.fetch_sub(1, Ordering::AcqRel);
            if self.live.with(&k, |e| e.is_some()) {
                return Ok(false);
            }
            if self.retire_under_pressure(Some(k.0.node), now_ms, changes) > 0 {
                return self.create_with(k, floor, now_ms, changes, limited);
            }
            return Err(DedupError::TooManyStreams {
                max: self.max_per_node,
            });
        }
        let entry = StreamEntry::new(self.window, floor, now_ms);
        let ours = self.live.with_try_insert(k, entry, |e, ours| {
            if ours {
                e.stamped_ms.store(now_ms, Ordering::Relaxed);
            }
            ours
        });
        if !ours {
            if self.per_node_limited() {
                self.node_count(k, |n| n.fetch_sub(1, Ordering::AcqRel));
            }
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Ok(false);
        }
        if self.retired.with(&k, |t| t.is_some()) {
            self.remove_tombstone(k);
            self.counters.revived.fetch_add(1, Ordering::Relaxed);
            changes.push(Change::Revived(k, floor));
        }
        changes.push(Change::Active(k, now_ms));
        Ok(true)
    }

    /// Is there a per-node limit below the node-wide one (else nothing is counted
    /// per node: the node-wide check covers it)?
    fn per_node_limited(&self) -> bool {
        self.max_per_node < self.max
    }

    /// Runs `f` on the live-stream count of `k`'s sending node (made at zero).
    fn node_count(&self, k: StreamKey, f: impl Fn(&AtomicU64) -> u64) -> u64 {
        self.node_counts(k.0.node, |n| f(&n.live))
    }

    /// Runs `f` on the tombstone count of `node` (made at zero).
    fn node_tombstones(&self, node: NodeId, f: impl Fn(&AtomicU64) -> u64) -> u64 {
        self.node_counts(node, |n| f(&n.tombstones))
    }

    fn node_counts(&self, node: NodeId, f: impl Fn(&NodeCounts) -> u64) -> u64 {
        if let Some(v) = self.per_node.with(&node, |n| n.map(&f)) {
            return v;
        }
        self.per_node
            .with_try_insert(node, NodeCounts::default(), |n, _| f(n))
    }

    fn stamp_due(&self, e: &StreamEntry, now_ms: u64) -> bool {
        let last = e.stamped_ms.load(Ordering::Relaxed);
        now_ms >= last + (self.retention_ms / 4).max(1)
            && e.stamped_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}
