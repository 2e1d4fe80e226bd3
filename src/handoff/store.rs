//! The hint store: per-target segment logs with an in-memory index, recovery, limits,
//! expiry and delivery progress.
//!
//! Owns the policy (what to keep, when to sync, when to delete). Must not do networking or
//! read the clock; bytes are formatted by `format` and moved by a [`SegmentIo`].

use super::format::{self, Frame, HeaderProblem, ScanItem, SEGMENT_HEADER_LEN};
use super::{
    FileSegmentIo, FsyncPolicy, Hint, HintError, HintPos, HintStats, HintStoreConfig,
    RecoveryReport, SegmentIo, TargetHints,
};
use crate::id::{ChannelId, Guarantee, MessageId, NodeId, Origin};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// A durable store of hints, one append-only segment log per target.
///
/// Use: [`open`](Self::open) (recovers what is on disk), [`append`](Self::append) while a
/// target is down; when it is back, loop [`next_batch`](Self::next_batch) → send each hint
/// through the normal at-least-once path → [`mark_delivered`](Self::mark_delivered) on
/// ack, pacing with a [`ReplayThrottle`](super::ReplayThrottle); call
/// [`rewind`](Self::rewind) if the target goes down mid-replay so un-acked hints are handed
/// out again. With [`FsyncPolicy::Every`], call [`sync_if_due`](Self::sync_if_due) at
/// [`next_sync_deadline`](Self::next_sync_deadline). Periodically call
/// [`expire`](Self::expire) to drop expired hints of targets that never come back.
///
/// All methods are blocking file IO; an async caller uses `spawn_blocking`.
///
/// ```
/// use ackwire::handoff::{Hint, HintStore, HintStoreConfig, FsyncPolicy};
/// use ackwire::{ChannelId, Guarantee, IdKey, MessageId, NodeId};
/// use std::time::Instant;
///
/// let dir = std::env::temp_dir().join(format!("ackwire-doc-{}", std::process::id()));
/// let mut cfg = HintStoreConfig::new(&dir);
/// cfg.fsync = FsyncPolicy::Never;
/// let (mut store, _report) = HintStore::open(cfg)?;
/// let hint = Hint {
///     target: NodeId(2),
///     id: MessageId::Key(IdKey(42)),
///     channel: ChannelId(0),
///     guarantee: Guarantee::EffectivelyOnce,
///     created_unix_ms: 1_000,
///     ttl_ms: 0, // store default
///     payload: "hello".into(),
/// };
/// store.append(hint, None, Instant::now())?;
/// let batch = store.next_batch(NodeId(2), 64 << 10, 2_000)?;
/// assert_eq!(batch.len(), 1);
/// store.mark_delivered(NodeId(2), batch[0].0)?;
/// assert_eq!(store.stats().pending, 0);
/// # drop(store); std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), ackwire::handoff::HintError>(())
/// ```
#[derive(Debug)]
pub struct HintStore<B: SegmentIo = FileSegmentIo> {
    cfg: HintStoreConfig,
    io: B,
    targets: BTreeMap<NodeId, TargetLog>,
    stats: HintStats,
    /// Segments written since their last sync.
    dirty: BTreeSet<(NodeId, u64)>,
    /// Targets whose directory changed (segment created) since the last sync.
    dirty_dirs: BTreeSet<NodeId>,
    /// When the oldest unsynced write happened (group commit).
    dirty_since: Option<Instant>,
    /// The directory's lock, when opened on files by [`HintStore::open`].
    dir_lock: Option<crate::storage::DirLock>,
    /// Closed (`close`): nothing is written any more.
    closed: bool,
}

#[derive(Debug, Default)]
struct TargetLog {
    segments: BTreeMap<u64, Segment>,
    /// Segment new hints go to; `None` → create a new one.
    active: Option<u64>,
    /// Next segment id; ids are never reused (persisted in the cursor).
    next_segment: u64,
    /// Next position `next_batch` looks at.
    replay: HintPos,
    /// Delivery progress changed since the cursor was last written.
    cursor_dirty: bool,
    disk_bytes: u64,
    pending: u64,
    pending_bytes: u64,
    /// The seqs of the pending hints' library-assigned ids, per stream.
    seqs: SeqIndex,
}

/// The seqs of library-assigned ids (`MessageId::Seq`) among one target's pending
/// effectively-once hints (the only ones a receiver dedups), per `(origin, channel)`
/// stream: what [`HintStore::seq_floors`] reads. A multiset (a replayed hint handed off
/// again is a second record with the same id).
#[derive(Debug, Default)]
struct SeqIndex {
    streams: Vec<(Origin, ChannelId)>,
    ix: HashMap<(Origin, ChannelId), u32>,
    pending: BTreeMap<(u32, u64), u32>,
}

impl SeqIndex {
    /// Count `id` in (if it is a library-assigned, effectively-once one); returns the
    /// key to take it out.
    fn add(&mut self, id: &MessageId, guarantee: Guarantee) -> Option<(u32, u64)> {
        if guarantee != Guarantee::EffectivelyOnce {
            return None;
        }
        let MessageId::Seq {
            origin,
            channel,
            seq,
        } = *id
        else {
            return None;
        };
        let n = match self.ix.get(&(origin, channel)) {
            Some(n) => *n,
            None => {
                let n = u32::try_from(self.streams.len()).ok()?;
                self.streams.push((origin, channel));
                self.ix.insert((origin, channel), n);
                n
            }
        };
        *self.pending.entry((n, seq)).or_default() += 1;
        Some((n, seq))
    }

    fn remove(&mut self, key: (u32, u64)) {
        if let Some(c) = self.pending.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                self.pending.remove(&key);
            }
        }
    }

    /// The lowest pending seq of every stream that has one.
    fn floors(&self) -> Vec<(Origin, ChannelId, u64)> {
        self.streams
            .iter()
            .enumerate()
            .filter_map(|(i, &(origin, channel))| {
                let i = u32::try_from(i).ok()?;
                let (&(_, seq), _) = self.pending.range((i, 0)..=(i, u64::MAX)).next()?;
                Some((origin, channel, seq))
            })
            .collect()
    }
}

#[derive(Debug)]
struct Segment {
    len: u64,
    /// How its records are framed (by its header's version).
    frame: Frame,
    records: Vec<Rec>,
    /// Index of the first record not done (== records.len() when all are done).
    first_pending: usize,
    /// Offsets of done records after `first_pending`.
    done_extra: BTreeSet<u64>,
    pending: usize,
}

#[derive(Clone, Copy, Debug)]
struct Rec {
    offset: u64,
    len: u32,
    expires_unix_ms: u64,
    done: bool,
    /// Its key in the target's [`SeqIndex`], if its id is library-assigned.
    seq_key: Option<(u32, u64)>,
}

impl Segment {
    fn new(len: u64, frame: Frame) -> Self {
        Segment {
            len,
            frame,
            records: Vec::new(),
            first_pending: 0,
            done_extra: BTreeSet::new(),
            pending: 0,
        }
    }

    /// Marks record `idx` done; returns its length and index key if it was pending.
    fn mark_done(&mut self, idx: usize) -> Option<(u32, Option<(u32, u64)>)> {
        let rec = self.records.get_mut(idx)?;
        if rec.done {
            return None;
        }
        rec.done = true;
        let len = (rec.len, rec.seq_key);
        self.pending -= 1;
        if idx == self.first_pending {
            while let Some(r) = self.records.get(self.first_pending) {
                if !r.done {
                    break;
                }
                self.done_extra.remove(&r.offset);
                self.first_pending += 1;
            }
        } else {
            self.done_extra.insert(self.records[idx].offset);
        }
        Some(len)
    }

    fn cursor(&self, id: u64) -> format::SegmentCursor {
        format::SegmentCursor {
            segment: id,
            done_below: self
                .records
                .get(self.first_pending)
                .map_or(self.len, |r| r.offset),
            done: self.done_extra.iter().copied().collect(),
        }
    }
}

impl HintStore<FileSegmentIo> {
    /// Opens (creating if needed) the store under `<config.dir>/hints/` and recovers it:
    /// torn tails are truncated, corrupt records skipped, bad-header segments quarantined,
    /// delivery progress reloaded. Never panics on bad files.
    pub fn open(config: HintStoreConfig) -> Result<(Self, RecoveryReport), HintError> {
        config.validate()?;
        let dir = config.dir.join("hints");
        // One live store per directory, in this process or any other (see
        // `HintError::InUse`).
        let lock = crate::storage::lock_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                HintError::InUse { dir: dir.clone() }
            } else {
                io_err("locking dir")(e)
            }
        })?;
        let io = FileSegmentIo::new(&dir).map_err(io_err("creating dir"))?;
        let (mut store, report) = Self::open_with(config, io)?;
        store.dir_lock = Some(lock);
        Ok((store, report))
    }

    /// Syncs, then releases the directory so another store may open it (a node does
    /// this as it stops). The store must not be written to afterwards.
    pub(crate) fn close(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "hint store not synced at close");
        }
        // Whatever the sync left undone stays undone: the directory may be another
        // store's from now on, so nothing (not `Drop`) may write there again.
        self.dirty.clear();
        self.dirty_dirs.clear();
        self.dirty_since = None;
        self.closed = true;
        self.dir_lock = None;
    }
}

impl<B: SegmentIo> HintStore<B> {
    /// As [`HintStore::open`] on any backend (`config.dir` is ignored).
    pub fn open_with(
        config: HintStoreConfig,
        mut io: B,
    ) -> Result<(Self, RecoveryReport), HintError> {
        config.validate()?;
        let mut report = RecoveryReport::default();
        let mut stats = HintStats::default();
        let mut targets = BTreeMap::new();
        let mut ids = io.list_targets().map_err(io_err("listing targets"))?;
        ids.sort();
        for target in ids {
            let log = recover_target(&mut io, target, &mut report, &mut stats)?;
            if !log.segments.is_empty() {
                report.targets += 1;
            }
            targets.insert(target, log);
        }
        stats.pending = report.pending;
        let mut store = HintStore {
            cfg: config,
            io,
            targets,
            stats,
            dirty: BTreeSet::new(),
            dirty_dirs: BTreeSet::new(),
            dirty_since: None,
            dir_lock: None,
            closed: false,
        };
        store.refresh_totals();
        tracing::info!(?report, "hint store recovered");
        Ok((store, report))
    }

    /// The configuration in use.
    pub fn config(&self) -> &HintStoreConfig {
        &self.cfg
    }

    /// The storage backend.
    pub fn backend(&self) -> &B {
        &self.io
    }

    /// Stores `hint` for `hint.target`; `Ok` means it is stored per the fsync policy (with
    /// `Always`: fsynced). `target_down_for` is how long the failure detector has seen the
    /// target down (`None` if unknown, e.g. retries ran out on a live target). `now` drives
    /// group commit. A `ttl_ms` of 0 is replaced by the configured default TTL.
    ///
    /// Errors: [`HintError::TargetDownTooLong`], [`HintError::TargetFull`],
    /// [`HintError::StoreFull`], [`HintError::HintTooLarge`], [`HintError::Io`]; each
    /// leaves nothing stored, and each but `HintTooLarge` (a caller's error, refused
    /// before the store is touched) is counted in [`HintStats`].
    pub fn append(
        &mut self,
        mut hint: Hint,
        target_down_for: Option<Duration>,
        now: Instant,
    ) -> Result<HintPos, HintError> {
        if let Some(down_for) = target_down_for {
            if down_for > self.cfg.max_hint_window {
                self.stats.refused_window += 1;
                return Err(HintError::TargetDownTooLong {
                    target: hint.target,
                    down_for,
                    max: self.cfg.max_hint_window,
                });
            }
        }
        if hint.ttl_ms == 0 {
            hint.ttl_ms = u64::try_from(self.cfg.default_ttl.as_millis()).unwrap_or(u64::MAX);
        }
        // Encoded for a salt of 0, then re-keyed for the segment it goes to (its
        // length does not depend on the salt).
        let Some(mut record) = format::encode_record(&hint, Frame::Salted(0)) else {
            return Err(HintError::HintTooLarge {
                size: hint.payload.len() as u64,
                max: format::MAX_RECORD_BODY as u64,
            });
        };
        let target = hint.target;
        let rec_len = record.len() as u64;
        let seg_bound = self.cfg.segment_bytes;
        let log = self.targets.entry(target).or_default();
        let active = log.active.and_then(|id| {
            let s = log.segments.get(&id)?;
            let fits = s.len + rec_len <= seg_bound || s.records.is_empty();
            // Nothing is appended to a version 1 (plain) segment.
            (fits && matches!(s.frame, Frame::Salted(_))).then_some(id)
        });
        let extra = rec_len
            + if active.is_none() {
                SEGMENT_HEADER_LEN as u64
            } else {
                0
            };
        if log.disk_bytes + extra > self.cfg.max_bytes_per_target {
            self.stats.refused_full += 1;
            return Err(HintError::TargetFull {
                target,
                bytes: log.disk_bytes + extra,
                max: self.cfg.max_bytes_per_target,
            });
        }
        if self.stats.bytes_total + extra > self.cfg.max_total_bytes {
            self.stats.refused_full += 1;
            return Err(HintError::StoreFull {
                bytes: self.stats.bytes_total + extra,
                max: self.cfg.max_total_bytes,
            });
        }
        let seg_id = match active {
            Some(id) => id,
            None => {
                let id = log.next_segment;
                // A stray file named with the largest id leaves no next one.
                let Some(next) = id.checked_add(1) else {
                    self.stats.io_errors += 1;
                    return Err(io_err("creating segment")(std::io::Error::other(
                        "segment ids exhausted (a segment file named with the largest id)",
                    )));
                };
                let salt = crate::storage::new_salt();
                let header = format::encode_segment_header(target, id, salt);
                if let Err(e) = self.io.create_segment(target, id, &header) {
                    self.stats.io_errors += 1;
                    return Err(io_err("creating segment")(e));
                }
                log.next_segment = next;
                log.segments
                    .insert(id, Segment::new(header.len() as u64, Frame::Salted(salt)));
                log.disk_bytes += header.len() as u64;
                self.stats.bytes_total += header.len() as u64;
                log.active = Some(id);
                self.dirty_dirs.insert(target);
                self.dirty.insert((target, id));
                self.dirty_since.get_or_insert(now);
                tracing::debug!(%target, segment = id, "hint segment created");
                id
            }
        };
        let Some(seg) = log.segments.get_mut(&seg_id) else {
            return Err(io_err("indexing")(std::io::Error::other(
                "active segment missing",
            )));
        };
        format::salt_record(&mut record, seg.frame);
        let offset = seg.len;
        let mut failed = Vec::new();
        let written = self.io.append(target, seg_id, &record).and_then(|()| {
            self.dirty.insert((target, seg_id));
            self.dirty_since.get_or_insert(now);
            match self.cfg.fsync {
                FsyncPolicy::Always => sync_dirty(
                    &mut self.io,
                    &mut self.dirty,
                    &mut self.dirty_dirs,
                    &mut self.dirty_since,
                    &mut failed,
                ),
                FsyncPolicy::Every(d) => match self.dirty_since {
                    Some(t) if now.saturating_duration_since(t) >= d => sync_dirty(
                        &mut self.io,
                        &mut self.dirty,
                        &mut self.dirty_dirs,
                        &mut self.dirty_since,
                        &mut failed,
                    ),
                    _ => Ok(()),
                },
                FsyncPolicy::Never => Ok(()),
            }
        });
        if let Err(e) = written {
            // Undo what may have been written; if even that fails, stop using the segment
            // so the partial record stays a torn tail that recovery cuts.
            let _ = self.io.truncate(target, seg_id, offset);
            log.active = None;
            self.stats.io_errors += 1;
            self.stop_appending_to(&failed);
            return Err(io_err("appending hint")(e));
        }
        seg.len += rec_len;
        seg.records.push(Rec {
            offset,
            len: rec_len as u32,
            expires_unix_ms: hint.expires_unix_ms(),
            done: false,
            seq_key: log.seqs.add(&hint.id, hint.guarantee),
        });
        seg.pending += 1;
        log.pending += 1;
        log.pending_bytes += rec_len;
        log.disk_bytes += rec_len;
        self.stats.bytes_total += rec_len;
        self.stats.pending += 1;
        self.stats.stored += 1;
        Ok(HintPos {
            segment: seg_id,
            offset,
        })
    }

    /// Makes every appended hint durable (fsync) and persists delivery progress.
    pub fn sync(&mut self) -> Result<(), HintError> {
        let mut failed = Vec::new();
        let r = sync_dirty(
            &mut self.io,
            &mut self.dirty,
            &mut self.dirty_dirs,
            &mut self.dirty_since,
            &mut failed,
        );
        if let Err(e) = r {
            self.stats.io_errors += 1;
            self.stop_appending_to(&failed);
            return Err(io_err("syncing segments")(e));
        }
        let dirty: Vec<NodeId> = self
            .targets
            .iter()
            .filter(|(_, l)| l.cursor_dirty)
            .map(|(t, _)| *t)
            .collect();
        for t in dirty {
            self.write_cursor(t, true)?;
        }
        Ok(())
    }

    /// Segments whose sync failed take no more appends: the next hint of their target
    /// starts a new segment (and, if the directory was removed, a new directory).
    fn stop_appending_to(&mut self, failed: &[(NodeId, u64)]) {
        for &(target, segment) in failed {
            if let Some(log) = self.targets.get_mut(&target) {
                if log.active == Some(segment) {
                    log.active = None;
                }
            }
        }
    }

    /// With [`FsyncPolicy::Every`], when unsynced appends must be synced; `None` if nothing
    /// is waiting or the policy is not `Every`.
    pub fn next_sync_deadline(&self) -> Option<Instant> {
        match self.cfg.fsync {
            // Saturating: `Every(Duration::MAX)` passes `validate` (a config file's
            // "never" is `Duration::MAX`) and `t + d` panicked on it.
            FsyncPolicy::Every(d) => self.dirty_since.map(|t| crate::retry::later(t, d)),
            _ => None,
        }
    }

    /// Syncs if [`next_sync_deadline`](Self::next_sync_deadline) has passed at `now`.
    pub fn sync_if_due(&mut self, now: Instant) -> Result<(), HintError> {
        match self.next_sync_deadline() {
            Some(deadline) if now >= deadline => self.sync(),
            _ => Ok(()),
        }
    }

    /// The next hints of `target` in append order, up to `max_bytes` of record bytes (at
    /// least one hint if any is pending). Hints expired at `now_unix_ms` and records whose
    /// crc fails on re-read are skipped, counted and marked done — never returned. Each
    /// call continues after the last hint handed out (see [`rewind`](Self::rewind)) and
    /// first persists the delivery progress marked since the previous call.
    pub fn next_batch(
        &mut self,
        target: NodeId,
        max_bytes: u64,
        now_unix_ms: u64,
    ) -> Result<Vec<(HintPos, Hint)>, HintError> {
        let mut out = Vec::new();
        let Some(log) = self.targets.get(&target) else {
            return Ok(out);
        };
        if log.cursor_dirty {
            let durable = self.cfg.fsync != FsyncPolicy::Never;
            if let Err(e) = self.write_cursor(target, durable) {
                // Progress not persisted only means more duplicates after a crash.
                tracing::warn!(%target, error = %e, "hint cursor not persisted");
            }
        }
        let Some(log) = self.targets.get_mut(&target) else {
            return Ok(out);
        };
        let mut bytes = 0u64;
        let start = log.replay;
        'segs: for (&seg_id, seg) in log.segments.range_mut(start.segment..) {
            let mut from = if seg_id == start.segment {
                seg.records.partition_point(|r| r.offset < start.offset)
            } else {
                0
            };
            from = from.max(seg.first_pending);
            loop {
                // Select the next records of this segment that fit the budget, dropping
                // expired ones on the way, then read them with one contiguous read.
                let mut picked: Vec<usize> = Vec::new();
                let mut picked_bytes = 0u64;
                let mut full = false;
                for idx in from..seg.records.len() {
                    let rec = seg.records[idx];
                    if rec.done {
                        continue;
                    }
                    if rec.expires_unix_ms <= now_unix_ms {
                        drop_pending(
                            seg,
                            idx,
                            log_counts(&mut log.pending, &mut log.pending_bytes, &mut log.seqs),
                        );
                        self.stats.expired += 1;
                        self.stats.pending -= 1;
                        log.cursor_dirty = true;
                        continue;
                    }
                    let len = u64::from(rec.len);
                    if (!out.is_empty() || !picked.is_empty())
                        && bytes + picked_bytes + len > max_bytes
                    {
                        full = true;
                        break;
                    }
                    picked.push(idx);
                    picked_bytes += len;
                }
                let (Some(&first), Some(&last)) = (picked.first(), picked.last()) else {
                    if full {
                        break 'segs;
                    }
                    break;
                };
                let base = seg.records[first].offset;
                let end = seg.records[last].offset + u64::from(seg.records[last].len);
                let mut span = vec![0u8; (end - base) as usize];
                if let Err(e) = self.io.read_at(target, seg_id, base, &mut span) {
                    self.stats.io_errors += 1;
                    if !out.is_empty() {
                        // What was read is handed out (the replay position already
                        // moved past it); the next batch starts with this read again.
                        tracing::warn!(%target, segment = seg_id, error = %e, "reading hints failed; batch cut short");
                        break 'segs;
                    }
                    return Err(io_err("reading hints")(e));
                }
                let span = bytes::Bytes::from(span);
                for &idx in &picked {
                    let rec = seg.records[idx];
                    let at = (rec.offset - base) as usize;
                    let hint = format::decode_record_in(&span, at, rec.len as usize, seg.frame)
                        .filter(|h| h.target == target);
                    let Some(hint) = hint else {
                        tracing::warn!(%target, segment = seg_id, offset = rec.offset, "corrupt hint skipped");
                        drop_pending(
                            seg,
                            idx,
                            log_counts(&mut log.pending, &mut log.pending_bytes, &mut log.seqs),
                        );
                        self.stats.corrupt_skipped += 1;
                        self.stats.pending -= 1;
                        log.cursor_dirty = true;
                        continue;
                    };
                    bytes += u64::from(rec.len);
                    log.replay = HintPos {
                        segment: seg_id,
                        offset: rec.offset + 1,
                    };
                    let pos = HintPos {
                        segment: seg_id,
                        offset: rec.offset,
                    };
                    out.push((pos, hint));
                }
                if !full {
                    break;
                }
                if !out.is_empty() {
                    break 'segs;
                }
                // Everything picked was corrupt: keep going so a pending hint is returned.
                from = last + 1;
            }
        }
        self.stats.replayed += out.len() as u64;
        // The batch is handed out whatever happens here: the replay position moved past
        // its hints, so an error now would strand them (pending, never read again in
        // this run). Deleting finished segments is retried at the next batch or mark.
        // (Regression: a failed cursor write dropped the batch.)
        if let Err(e) = self.delete_finished(target) {
            tracing::warn!(%target, error = %e, "deleting delivered hint segments failed; retried later");
        }
        Ok(out)
    }

    /// Records that the hint at `pos` was delivered (acked by the target). Marks may come
    /// in any order; a segment is deleted once all its hints are done. Returns `false` if
    /// the position is unknown or already done (marks are idempotent).
    pub fn mark_delivered(&mut self, target: NodeId, pos: HintPos) -> Result<bool, HintError> {
        self.mark_done(target, pos, false)
    }

    /// Records that the target refused the hint at `pos` for good: done as
    /// [`mark_delivered`](Self::mark_delivered), counted in
    /// [`HintStats::rejected`] instead of `delivered`.
    pub fn mark_rejected(&mut self, target: NodeId, pos: HintPos) -> Result<bool, HintError> {
        self.mark_done(target, pos, true)
    }

    fn mark_done(
        &mut self,
        target: NodeId,
        pos: HintPos,
        rejected: bool,
    ) -> Result<bool, HintError> {
        let Some(log) = self.targets.get_mut(&target) else {
            return Ok(false);
        };
        let Some(seg) = log.segments.get_mut(&pos.segment) else {
            return Ok(false);
        };
        let Ok(idx) = seg.records.binary_search_by_key(&pos.offset, |r| r.offset) else {
            return Ok(false);
        };
        if !drop_pending(
            seg,
            idx,
            log_counts(&mut log.pending, &mut log.pending_bytes, &mut log.seqs),
        ) {
            return Ok(false);
        }
        log.cursor_dirty = true;
        if rejected {
            self.stats.rejected += 1;
        } else {
            self.stats.delivered += 1;
        }
        self.stats.pending -= 1;
        if seg.pending == 0 {
            self.delete_finished(target)?;
        }
        Ok(true)
    }

    /// Makes [`next_batch`](Self::next_batch) start again at `target`'s oldest undelivered
    /// hint (e.g. the target went down mid-replay and handed-out hints were not acked).
    pub fn rewind(&mut self, target: NodeId) {
        if let Some(log) = self.targets.get_mut(&target) {
            log.replay = HintPos::default();
        }
    }

    /// Drops every hint expired at `now_unix_ms` (all targets) and deletes segments that
    /// become empty. Returns how many were dropped.
    pub fn expire(&mut self, now_unix_ms: u64) -> Result<u64, HintError> {
        let (mut dropped, mut counted) = (0, 0);
        let ids: Vec<NodeId> = self.targets.keys().copied().collect();
        for target in ids {
            let Some(log) = self.targets.get_mut(&target) else {
                continue;
            };
            for seg in log.segments.values_mut() {
                for idx in seg.first_pending..seg.records.len() {
                    let r = seg.records[idx];
                    if !r.done
                        && r.expires_unix_ms <= now_unix_ms
                        && drop_pending(
                            seg,
                            idx,
                            log_counts(&mut log.pending, &mut log.pending_bytes, &mut log.seqs),
                        )
                    {
                        dropped += 1;
                        log.cursor_dirty = true;
                    }
                }
            }
            // Counted before the segments are deleted: the hints are gone from the
            // pending counts whether or not that succeeds.
            self.stats.expired += dropped - counted;
            self.stats.pending -= dropped - counted;
            counted = dropped;
            self.delete_finished(target)?;
        }
        Ok(dropped)
    }

    /// Drops all hints of a decommissioned target (files included). Returns how many
    /// undelivered hints were dropped (counted in [`HintStats::decommissioned`]).
    pub fn decommission(&mut self, target: NodeId) -> Result<u64, HintError> {
        let Some(log) = self.targets.remove(&target) else {
            return Ok(0);
        };
        self.dirty.retain(|(t, _)| *t != target);
        self.dirty_dirs.remove(&target);
        self.stats.decommissioned += log.pending;
        self.stats.pending -= log.pending;
        self.stats.bytes_total -= log.disk_bytes;
        tracing::info!(%target, dropped = log.pending, "hints of decommissioned target dropped");
        if let Err(e) = self.io.remove_target(target) {
            self.stats.io_errors += 1;
            return Err(io_err("removing target")(e));
        }
        Ok(log.pending)
    }

    /// For each `(origin, channel)` stream with library-assigned ids among `target`'s
    /// pending effectively-once hints, the lowest such seq still pending. The replay of an earlier run's
    /// hints tells the target that every seq of that run's stream below it is settled
    /// (`Frame::Settled`): the run is over, and what it did not deliver is here.
    pub(crate) fn seq_floors(&self, target: NodeId) -> Vec<(Origin, ChannelId, u64)> {
        self.targets
            .get(&target)
            .map_or_else(Vec::new, |log| log.seqs.floors())
    }

    /// Targets that have hint segments, with pending counts and bytes.
    pub fn targets(&self) -> Vec<TargetHints> {
        self.targets
            .iter()
            .filter(|(_, l)| !l.segments.is_empty())
            .map(|(t, l)| TargetHints {
                target: *t,
                pending: l.pending,
                pending_bytes: l.pending_bytes,
                disk_bytes: l.disk_bytes,
            })
            .collect()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HintStats {
        self.stats
    }

    fn refresh_totals(&mut self) {
        self.stats.bytes_total = self.targets.values().map(|l| l.disk_bytes).sum();
        self.stats.pending = self.targets.values().map(|l| l.pending).sum();
    }

    /// Deletes `target`'s segments with nothing pending, then persists the cursor (so a
    /// crash in between only leaves a stale cursor entry, never a reused segment id).
    fn delete_finished(&mut self, target: NodeId) -> Result<(), HintError> {
        let Some(log) = self.targets.get_mut(&target) else {
            return Ok(());
        };
        let done: Vec<u64> = log
            .segments
            .iter()
            .filter(|(_, s)| s.pending == 0 && !s.records.is_empty())
            .map(|(id, _)| *id)
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        for id in done {
            if let Err(e) = self.io.remove_segment(target, id) {
                self.stats.io_errors += 1;
                return Err(io_err("deleting segment")(e));
            }
            if let Some(s) = log.segments.remove(&id) {
                log.disk_bytes -= s.len;
                self.stats.bytes_total -= s.len;
            }
            if log.active == Some(id) {
                log.active = None;
            }
            self.dirty.remove(&(target, id));
            tracing::debug!(%target, segment = id, "delivered hint segment deleted");
        }
        self.write_cursor(target, self.cfg.fsync == FsyncPolicy::Always)
    }

    fn write_cursor(&mut self, target: NodeId, durable: bool) -> Result<(), HintError> {
        let Some(log) = self.targets.get_mut(&target) else {
            return Ok(());
        };
        let state = cursor_state(log);
        if let Err(e) = self
            .io
            .write_cursor(target, &format::encode_cursor(&state), durable)
        {
            self.stats.io_errors += 1;
            return Err(io_err("writing cursor")(e));
        }
        log.cursor_dirty = false;
        Ok(())
    }
}

impl<B: SegmentIo> Drop for HintStore<B> {
    /// Best effort: persists delivery progress, and syncs unless the policy is `Never`.
    fn drop(&mut self) {
        if self.closed {
            return; // the directory may be another store's now
        }
        if self.cfg.fsync != FsyncPolicy::Never {
            let _ = self.sync();
        } else {
            let dirty: Vec<NodeId> = self
                .targets
                .iter()
                .filter(|(_, l)| l.cursor_dirty)
                .map(|(t, _)| *t)
                .collect();
            for t in dirty {
                let _ = self.write_cursor(t, false);
            }
        }
    }
}

fn io_err(op: &'static str) -> impl Fn(std::io::Error) -> HintError {
    move |source| HintError::Io { op, source }
}

struct Counts<'a> {
    pending: &'a mut u64,
    pending_bytes: &'a mut u64,
    seqs: &'a mut SeqIndex,
}

fn log_counts<'a>(
    pending: &'a mut u64,
    pending_bytes: &'a mut u64,
    seqs: &'a mut SeqIndex,
) -> Counts<'a> {
    Counts {
        pending,
        pending_bytes,
        seqs,
    }
}

/// Marks record `idx` done and updates the target's counts; `false` if it was done.
fn drop_pending(seg: &mut Segment, idx: usize, c: Counts<'_>) -> bool {
    match seg.mark_done(idx) {
        Some((len, key)) => {
            *c.pending -= 1;
            *c.pending_bytes -= u64::from(len);
            if let Some(key) = key {
                c.seqs.remove(key);
            }
            true
        }
        None => false,
    }
}

fn cursor_state(log: &TargetLog) -> format::CursorState {
    format::CursorState {
        next_segment: log.next_segment,
        segments: log.segments.iter().map(|(id, s)| s.cursor(*id)).collect(),
    }
}

/// Syncs every dirty segment, then every dirty directory; returns the first error.
/// An entry whose sync fails is dropped all the same, and the failed segments are
/// added to `failed` (their target stops appending to them): after a failed fsync the
/// kernel may have marked the pages clean, so a later fsync that succeeds would prove
/// nothing, and a segment removed under the store fails for good. (Regression: a
/// failed entry stayed dirty with its deadline in the past, so the driver retried it
/// at once, forever — a busy loop of `hint store sync failed` warnings once the hint
/// directory was removed — and hints kept going to the removed segment.)
fn sync_dirty<B: SegmentIo>(
    io: &mut B,
    dirty: &mut BTreeSet<(NodeId, u64)>,
    dirty_dirs: &mut BTreeSet<NodeId>,
    dirty_since: &mut Option<Instant>,
    failed: &mut Vec<(NodeId, u64)>,
) -> std::io::Result<()> {
    let mut first = None;
    for (t, s) in std::mem::take(dirty) {
        if let Err(e) = io.sync(t, s) {
            failed.push((t, s));
            first.get_or_insert(e);
        }
    }
    for t in std::mem::take(dirty_dirs) {
        if let Err(e) = io.sync_dir(t) {
            first.get_or_insert(e);
        }
    }
    *dirty_since = None;
    first.map_or(Ok(()), Err)
}

/// Loads one target: cursor, segments (checked, scanned, repaired), then writes back a
/// pruned cursor if it changed.
fn recover_target<B: SegmentIo>(
    io: &mut B,
    target: NodeId,
    report: &mut RecoveryReport,
    stats: &mut HintStats,
) -> Result<TargetLog, HintError> {
    let raw = io.read_cursor(target).map_err(io_err("reading cursor"))?;
    let mut damaged = false;
    let cursor = match raw.as_deref().map(format::decode_cursor) {
        None => format::CursorState::default(),
        Some(Some(c)) => c,
        Some(None) => {
            damaged = true;
            tracing::warn!(%target, "hint cursor damaged; all hints of the target will be replayed");
            report.cursors_reset += 1;
            format::CursorState::default()
        }
    };
    let mut log = TargetLog {
        next_segment: cursor.next_segment,
        ..TargetLog::default()
    };
    let mut seg_ids = io
        .list_segments(target)
        .map_err(io_err("listing segments"))?;
    seg_ids.sort_unstable();
    for id in seg_ids {
        log.next_segment = log.next_segment.max(id.saturating_add(1));
        let bytes = io
            .read_segment(target, id)
            .map_err(io_err("reading segment"))?;
        let frame = match format::check_segment_header(&bytes, target, id) {
            Ok(frame) => frame,
            Err(HeaderProblem::Short) => {
                // Torn while being created: no record in it was ever acknowledged.
                report.torn_tails += 1;
                report.torn_bytes += bytes.len() as u64;
                stats.torn_tail_truncated += 1;
                io.remove_segment(target, id)
                    .map_err(io_err("removing torn segment"))?;
                continue;
            }
            Err(HeaderProblem::Bad(reason)) => {
                tracing::error!(%target, segment = id, reason, "hint segment quarantined");
                report.quarantined.push((target, id, reason));
                stats.segments_quarantined += 1;
                io.quarantine_segment(target, id)
                    .map_err(io_err("quarantining segment"))?;
                continue;
            }
        };
        report.segments += 1;
        let scan = format::scan_segment(&bytes, frame);
        if scan.keep_len < bytes.len() as u64 {
            report.torn_tails += 1;
            report.torn_bytes += bytes.len() as u64 - scan.keep_len;
            stats.torn_tail_truncated += 1;
            tracing::warn!(%target, segment = id, cut = bytes.len() as u64 - scan.keep_len, "torn hint tail truncated");
            io.truncate(target, id, scan.keep_len)
                .map_err(io_err("truncating torn tail"))?;
        }
        let seg_cursor = cursor.segments.iter().find(|c| c.segment == id);
        let mut seg = Segment::new(scan.keep_len, frame);
        for item in scan.items {
            match item {
                ScanItem::Corrupt { len, .. } => {
                    report.corrupt_regions += 1;
                    report.corrupt_bytes += len;
                    stats.corrupt_skipped += 1;
                }
                ScanItem::Record { offset, len } => {
                    let start = offset as usize;
                    let meta = bytes
                        .get(start..start + len as usize)
                        .and_then(|b| format::record_meta(b, frame));
                    // A record of another target (e.g. a copied file) is treated as corrupt.
                    let Some(meta) = meta.filter(|m| m.target == target) else {
                        report.corrupt_regions += 1;
                        report.corrupt_bytes += u64::from(len);
                        stats.corrupt_skipped += 1;
                        continue;
                    };
                    report.records += 1;
                    let done = seg_cursor
                        .is_some_and(|c| offset < c.done_below || c.done.contains(&offset));
                    seg.records.push(Rec {
                        offset,
                        len,
                        expires_unix_ms: meta.created_unix_ms.saturating_add(meta.ttl_ms),
                        done,
                        seq_key: if done {
                            None
                        } else {
                            log.seqs.add(&meta.id, meta.guarantee)
                        },
                    });
                    if !done {
                        seg.pending += 1;
                        log.pending += 1;
                        log.pending_bytes += u64::from(len);
                    }
                }
            }
        }
        seg.first_pending = seg
            .records
            .iter()
            .position(|r| !r.done)
            .unwrap_or(seg.records.len());
        seg.done_extra = seg.records[seg.first_pending..]
            .iter()
            .filter(|r| r.done)
            .map(|r| r.offset)
            .collect();
        if seg.pending == 0 {
            // Fully delivered (or empty): nothing to keep.
            io.remove_segment(target, id)
                .map_err(io_err("removing delivered segment"))?;
            continue;
        }
        log.disk_bytes += seg.len;
        // New hints go to the last salted segment; a version 1 one is only read.
        log.active = matches!(frame, Frame::Salted(_)).then_some(id);
        log.segments.insert(id, seg);
    }
    report.pending += log.pending;
    let state = cursor_state(&log);
    if damaged || state != cursor || (raw.is_none() && !log.segments.is_empty()) {
        io.write_cursor(target, &format::encode_cursor(&state), true)
            .map_err(io_err("writing cursor"))?;
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fsync interval no instant can be added to (a config file's "never") is a
    /// deadline far ahead, not a panic.
    #[test]
    fn an_endless_fsync_interval_never_comes_due() {
        use crate::handoff::MemSegmentIo;
        use crate::id::{Guarantee, IdKey};
        let cfg = HintStoreConfig {
            fsync: FsyncPolicy::Every(Duration::MAX),
            ..HintStoreConfig::new("unused")
        };
        assert!(cfg.validate().is_ok());
        let (mut st, _) = HintStore::open_with(cfg, MemSegmentIo::new()).unwrap();
        let now = Instant::now();
        let hint = Hint {
            target: NodeId(2),
            id: MessageId::Key(IdKey(7)),
            channel: ChannelId(1),
            guarantee: Guarantee::EffectivelyOnce,
            created_unix_ms: 1_000,
            ttl_ms: 60_000,
            payload: bytes::Bytes::from_static(b"x"),
        };
        st.append(hint, None, now).unwrap();
        let due = st.next_sync_deadline().expect("an unsynced append");
        assert!(due > now + Duration::from_secs(365 * 24 * 3600), "{due:?}");
        st.sync_if_due(now + Duration::from_secs(3600)).unwrap();
    }

    fn seg(n: u64) -> Segment {
        let mut s = Segment::new(32 + 10 * n, Frame::Plain);
        for i in 0..n {
            s.records.push(Rec {
                offset: 32 + 10 * i,
                len: 10,
                expires_unix_ms: u64::MAX,
                done: false,
                seq_key: None,
            });
        }
        s.pending = n as usize;
        s
    }

    /// The floor of each stream of library-assigned ids is its lowest pending hint's
    /// seq: it rises as hints are delivered, rejected or expire, ignores application
    /// keys and at-least-once hints, and is rebuilt by recovery from the records and
    /// the cursor.
    #[test]
    fn seq_floors_follow_pending_hints_through_marks_expiry_and_recovery() {
        use crate::handoff::MemSegmentIo;
        use crate::id::{Guarantee, IdKey};
        let io = MemSegmentIo::new();
        let cfg = HintStoreConfig::new("unused");
        let (mut st, _) = HintStore::open_with(cfg.clone(), io.clone()).unwrap();
        let run = Origin {
            node: NodeId(1),
            incarnation: 5,
        };
        let t = NodeId(2);
        let hint = |id: MessageId, ch: u32, ttl_ms: u64| Hint {
            target: t,
            id,
            channel: ChannelId(ch),
            guarantee: Guarantee::EffectivelyOnce,
            created_unix_ms: 1_000,
            ttl_ms,
            payload: bytes::Bytes::from_static(b"x"),
        };
        let seq = |seq, ch| MessageId::Seq {
            origin: run,
            channel: ChannelId(ch),
            seq,
        };
        let now = Instant::now();
        let long = 1 << 40;
        let mut pos = Vec::new();
        for s in [30, 10, 20] {
            pos.push(st.append(hint(seq(s, 1), 1, long), None, now).unwrap());
        }
        st.append(hint(seq(7, 2), 2, 500), None, now).unwrap(); // expires at 1 500
        st.append(hint(MessageId::Key(IdKey(3)), 1, long), None, now)
            .unwrap();
        let mut alo = hint(seq(1, 3), 3, long);
        alo.guarantee = Guarantee::AtLeastOnce; // no dedup window to move
        st.append(alo, None, now).unwrap();
        let floors = |st: &HintStore<MemSegmentIo>| {
            let mut f = st.seq_floors(t);
            f.sort_unstable();
            f
        };
        let (c1, c2) = (ChannelId(1), ChannelId(2));
        assert_eq!(floors(&st), vec![(run, c1, 10), (run, c2, 7)]);
        assert!(st.seq_floors(NodeId(9)).is_empty());
        st.mark_delivered(t, pos[1]).unwrap(); // seq 10
        assert_eq!(floors(&st), vec![(run, c1, 20), (run, c2, 7)]);
        st.expire(2_000).unwrap();
        assert_eq!(floors(&st), vec![(run, c1, 20)]);
        st.sync().unwrap();
        drop(st);
        let (mut st, _) = HintStore::open_with(cfg, io).unwrap();
        assert_eq!(floors(&st), vec![(run, c1, 20)], "rebuilt by recovery");
        st.mark_rejected(t, pos[2]).unwrap(); // seq 20
        assert_eq!(floors(&st), vec![(run, c1, 30)]);
        st.mark_delivered(t, pos[0]).unwrap();
        assert!(floors(&st).is_empty(), "no library-assigned id pending");
    }

    /// A version 1 segment (plain records, written by an earlier build) is recovered
    /// and replayed; new hints go to a new, salted segment, never to it; once
    /// delivered it is deleted.
    #[test]
    fn a_version_1_segment_is_read_and_new_hints_go_to_a_salted_one() {
        use crate::handoff::MemSegmentIo;
        use crate::id::{Guarantee, IdKey};
        let t = NodeId(2);
        let hint = |k: u128| Hint {
            target: t,
            id: MessageId::Key(IdKey(k)),
            channel: ChannelId(1),
            guarantee: Guarantee::EffectivelyOnce,
            created_unix_ms: 1_000,
            ttl_ms: 1 << 40,
            payload: bytes::Bytes::from(format!("payload {k}")),
        };
        let mut old = format::encode_plain_segment_header(t, 0).to_vec();
        for k in 0..3 {
            old.extend_from_slice(&format::encode_record(&hint(k), Frame::Plain).unwrap());
        }
        let io = MemSegmentIo::new();
        io.set_segment_bytes(t, 0, old.clone());
        let cfg = HintStoreConfig::new("unused");
        let (mut st, report) = HintStore::open_with(cfg.clone(), io.clone()).unwrap();
        assert_eq!((report.segments, report.records), (1, 3));
        let pos = st.append(hint(3), None, Instant::now()).unwrap();
        assert_eq!(pos.segment, 1, "a new segment, not the version 1 one");
        assert_eq!(
            io.segment_bytes(t, 0).unwrap(),
            old,
            "the old segment untouched"
        );
        let new = io.segment_bytes(t, 1).unwrap();
        assert!(matches!(
            format::check_segment_header(&new, t, 1),
            Ok(Frame::Salted(_))
        ));
        st.sync().unwrap();
        drop(st);
        let (mut st, report) = HintStore::open_with(cfg, io.clone()).unwrap();
        assert_eq!((report.segments, report.records), (2, 4));
        let batch = st.next_batch(t, u64::MAX, 2_000).unwrap();
        let got: Vec<Hint> = batch.iter().map(|(_, h)| h.clone()).collect();
        assert_eq!(got, (0..4).map(hint).collect::<Vec<_>>());
        for (p, _) in &batch[..3] {
            st.mark_delivered(t, *p).unwrap();
        }
        assert!(io.segment_bytes(t, 0).is_none(), "delivered, deleted");
    }

    #[test]
    fn out_of_order_marks_keep_a_compact_cursor() {
        let mut s = seg(5);
        assert_eq!(s.mark_done(2), Some((10, None)));
        assert_eq!(s.mark_done(2), None, "second mark is a no-op");
        assert_eq!(s.cursor(0).done_below, 32);
        assert_eq!(s.cursor(0).done, vec![52]);
        s.mark_done(0);
        s.mark_done(1);
        // The prefix 0..=2 is done: the extra set folds into the watermark.
        assert_eq!(s.cursor(0).done_below, 62);
        assert!(s.cursor(0).done.is_empty());
        s.mark_done(4);
        s.mark_done(3);
        assert_eq!(s.pending, 0);
        assert_eq!(s.cursor(0).done_below, s.len);
        assert_eq!(s.mark_done(9), None, "unknown index is ignored");
    }
}
