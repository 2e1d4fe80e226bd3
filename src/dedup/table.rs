//! The expiring ID table for application idempotency keys.
//!
//! Owns the set of full 128-bit keys, in generations ("segments") that grow with the
//! key rate up to a memory budget and expire whole. Must not read a clock (every call
//! takes `now`), or ever report a key it does not hold. The slot protocol of one
//! generation lives in `segment.rs`.
//!
//! # Generations
//!
//! Inserts go to the newest segment only. A new segment is added when
//!
//! * the horizon period of the current one has passed (it starts a new period, sized
//!   for twice the keys the previous period inserted, at least the initial capacity), or
//! * the current one is half used (or a probe chain in it is full): the new one has
//!   four times its slots and belongs to the same period.
//!
//! Older segments are only read (and settled) until every entry in them expired: then
//! the whole segment is dropped at once, O(1) per key. With a steady key rate `r` and
//! horizon `h`, two or three generations of `2·r·h` to `4·r·h` slots (rounded up to a
//! power of two) live at a time: roughly 100–300 bytes per key of the last horizon. A
//! burst leaves one generation per ×4 of growth, which lookups probe until they
//! expire (one horizon); the next period's generation is sized for the burst's rate. A segment is freed through crossbeam-epoch once no
//! reader can still see it.
//!
//! # At the budget
//!
//! A segment is only added if the live segments plus the new one fit in the budget
//! (the largest power-of-two size that fits is taken, if it is at least the initial
//! capacity). Until then, the current segment keeps taking keys (reusing expired and
//! released slots in place). When it has no usable slot near a key's home and no
//! segment can be added, that key is refused with [`DedupError::TableFull`], counted in
//! [`IdTable::table_full_count`], and a warning is logged (at most every 10 s).
//!
//! # Progress
//!
//! `begin`/`complete`/`release` take no lock. Adding a segment allocates (once per
//! horizon period or per doubling) and publishes it with one compare-and-swap; a racer
//! that loses that race frees its allocation and retries on the winner's list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::segment::{key_hash, Claim, Rank, Segment, SLOT_BYTES, TIME_MASK};
use super::sync::{fence, pin, wait_for_other, AtomicU64, Ordering, Pin, Snapshot};
use super::{Admit, DedupError, WarnGate};
use crate::IdKey;

/// How many keys ahead [`IdTable::begin_many`] prefetches (about the number of
/// cache misses a core keeps in flight).
pub const BATCH_LOOKAHEAD: usize = 8;

/// Default initial capacity (slots) of a growing table: 16 384 slots, 384 KiB.
pub const DEFAULT_INITIAL_SLOTS: usize = 16_384;

/// A generation added because the current one filled up has this many times its
/// slots: 4 keeps the number of generations a burst leaves behind (each probed by
/// lookups until it expires) small, at up to 4× memory headroom.
const GROWTH: usize = 4;

/// Bytes of memory one slot takes (the budget is spent in slots).
pub const BYTES_PER_SLOT: usize = SLOT_BYTES;

/// How long a failed attempt to add a segment is not retried (for the non-forced
/// triggers), as a fraction of the horizon.
const ROLL_BACKOFF_DIV: u64 = 16;

type SegList = Vec<Arc<Segment>>;

/// A claim published but not yet arbitrated: what `arbitrate`/`commit` need, and (in
/// [`IdTable::begin_many`]) where its answer goes in `out`.
#[derive(Clone, Copy)]
struct Pending {
    pos: usize,
    key: IdKey,
    hash: u64,
    idx: usize,
    ver: u64,
    dist: usize,
}

impl Pending {
    const NONE: Pending = Pending {
        pos: 0,
        key: IdKey(0),
        hash: 0,
        idx: 0,
        ver: 0,
        dist: 0,
    };
}

/// A lock-free set of [`IdKey`]s that forgets completed keys after a horizon and
/// grows with the key rate up to a memory budget (see the module doc).
///
/// * [`IdTable::growing`] starts at `initial_slots` and adds generations up to
///   `budget_bytes`; [`IdTable::new`] is a single fixed generation (no growth).
/// * A completed key is remembered for `horizon` after [`complete`](Self::complete).
///   An in-progress key never expires: a handler that never completes holds its slot
///   (and its generation) until the caller [`release`](Self::release)s it (the driver
///   releases when a delivery is dropped unacked).
/// * Never a false "duplicate": keys are stored and compared in full.
///
/// ```
/// use std::time::{Duration, Instant};
/// use ackwire::{IdKey, dedup::{Admit, IdTable}};
/// let t0 = Instant::now();
/// let t = IdTable::growing(1024, 64 << 20, Duration::from_secs(60), t0);
/// let k = IdKey(42);
/// assert_eq!(t.begin(k, t0).unwrap(), Admit::Fresh);
/// assert_eq!(t.begin(k, t0).unwrap(), Admit::InProgress);
/// assert!(t.complete(k, t0));
/// assert_eq!(t.begin(k, t0 + Duration::from_secs(59)).unwrap(), Admit::Duplicate);
/// assert_eq!(t.begin(k, t0 + Duration::from_secs(61)).unwrap(), Admit::Fresh);
/// ```
pub struct IdTable {
    segs: Snapshot<SegList>,
    horizon_ms: u64,
    base: Instant,
    min_slots: usize,
    budget_bytes: usize,
    next_id: AtomicU64,
    next_roll_ms: AtomicU64,
    table_full: AtomicU64,
    expired_reclaimed: AtomicU64,
    segments_dropped: AtomicU64,
    warn: WarnGate,
}

impl std::fmt::Debug for IdTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdTable")
            .field("capacity", &self.capacity())
            .field("budget_bytes", &self.budget_bytes)
            .field("horizon", &self.horizon())
            .field("table_full", &self.table_full_count())
            .finish_non_exhaustive()
    }
}

impl IdTable {
    /// A single fixed generation of at least `capacity` slots (power of two, minimum
    /// 8): it never grows, and refuses with `TableFull` when a key's neighbourhood has
    /// no free or expired slot. Times are measured from `base`.
    pub fn new(capacity: usize, horizon: Duration, base: Instant) -> IdTable {
        let cap = capacity.max(8).next_power_of_two();
        Self::growing(cap, cap * SLOT_BYTES, horizon, base)
    }

    /// A table that starts with `initial_slots` slots (power of two, minimum 8) and
    /// adds generations as the key rate needs, while all of them fit in `budget_bytes`
    /// (at least the first generation is always allocated).
    pub fn growing(
        initial_slots: usize,
        budget_bytes: usize,
        horizon: Duration,
        base: Instant,
    ) -> IdTable {
        let min_slots = initial_slots.max(8).next_power_of_two();
        let horizon_ms = (horizon.as_millis() as u64).clamp(1, TIME_MASK / 4);
        // Times are offset by the horizon so recovered entries completed before
        // `base` still have a non-negative time (see `ms`).
        let first = Segment::new(0, min_slots, horizon_ms, horizon_ms, horizon_ms);
        IdTable {
            segs: Snapshot::new(vec![Arc::new(first)]),
            horizon_ms,
            base,
            min_slots,
            budget_bytes: budget_bytes.max(min_slots * SLOT_BYTES),
            next_id: AtomicU64::new(1),
            next_roll_ms: AtomicU64::new(0),
            table_full: AtomicU64::new(0),
            expired_reclaimed: AtomicU64::new(0),
            segments_dropped: AtomicU64::new(0),
            warn: WarnGate::new(),
        }
    }

    /// Slots in the live generations.
    pub fn capacity(&self) -> usize {
        let g = pin();
        self.segs.load(&g).iter().map(|s| s.capacity()).sum()
    }

    /// Bytes of slot memory in the live generations (excluding small fixed headers).
    pub fn memory_bytes(&self) -> usize {
        self.capacity() * SLOT_BYTES
    }

    /// The memory budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// Live generations.
    pub fn generations(&self) -> usize {
        let g = pin();
        self.segs.load(&g).len()
    }

    /// Generations dropped whole after all their entries expired.
    pub fn generations_dropped(&self) -> u64 {
        self.segments_dropped.load(Ordering::Relaxed)
    }

    /// How long completed keys are remembered.
    pub fn horizon(&self) -> Duration {
        Duration::from_millis(self.horizon_ms)
    }

    /// How many inserts were refused with [`DedupError::TableFull`].
    pub fn table_full_count(&self) -> u64 {
        self.table_full.load(Ordering::Relaxed)
    }

    /// How many expired entries were reused in place by inserts.
    pub fn expired_reclaimed_count(&self) -> u64 {
        self.expired_reclaimed.load(Ordering::Relaxed)
    }

    /// Check-and-insert `key`: `Fresh` (now in progress, owned by the caller),
    /// `InProgress` (another caller holds it) or `Duplicate` (completed within the
    /// horizon).
    ///
    /// # Errors
    /// [`DedupError::TableFull`] when the budget is reached and the newest generation
    /// has no free or expired slot near the key's home: do not process, nack; the
    /// sender retries later (entries expire meanwhile).
    pub fn begin(&self, key: IdKey, now: Instant) -> Result<Admit, DedupError> {
        let now_ms = self.ms(now);
        let hash = key_hash(key);
        let g = pin();
        loop {
            let list = self.segs.load(&g);
            let cur = list.last().expect("a table always has a generation");
            if now_ms >= self.next_roll_ms.load(Ordering::Relaxed)
                && self.roll_due(cur, now_ms)
                && self.roll(list, now_ms, false, &g)
            {
                continue;
            }
            for s in &list[..list.len() - 1] {
                if let Some(a) = s.lookup(key, hash, now_ms) {
                    return Ok(a);
                }
            }
            if !cur.enter() {
                // Closed by a roller that is about to publish a newer generation.
                self.roll(list, now_ms, true, &g);
                wait_for_other();
                continue;
            }
            match cur.claim(key, hash, now_ms, true) {
                Claim::Live(a) => {
                    cur.leave();
                    return Ok(a);
                }
                Claim::Full => {
                    cur.leave();
                    if self.roll(list, now_ms, true, &g) {
                        continue;
                    }
                    return Err(self.refuse(list, now_ms));
                }
                Claim::Claimed {
                    idx,
                    ver,
                    dist,
                    reclaimed,
                    ..
                } => {
                    if reclaimed {
                        self.expired_reclaimed.fetch_add(1, Ordering::Relaxed);
                    }
                    fence(Ordering::SeqCst);
                    let claim = Pending {
                        pos: 0,
                        key,
                        hash,
                        idx,
                        ver,
                        dist,
                    };
                    let answer = self.decide(&g, cur, &claim, now_ms);
                    if answer != Admit::Fresh {
                        cur.leave();
                    }
                    return Ok(answer);
                }
            }
        }
    }

    /// Hint the CPU to fetch the slots a later [`begin`](Self::begin) of `key` reads
    /// first (its home slot in every generation). Changes nothing; worth it for a
    /// batch of keys about to be checked, on a table larger than the CPU cache.
    pub fn prefetch(&self, key: IdKey) {
        let hash = key_hash(key);
        let g = pin();
        for s in self.segs.load(&g).iter() {
            s.prefetch(hash);
        }
    }

    /// [`begin`](Self::begin) for each of `keys` in order, appending one answer per
    /// key to `out`: the same answers as calling `begin` one key at a time, but
    /// faster, because the home slots of the next keys are prefetched while one key is
    /// claimed (up to [`BATCH_LOOKAHEAD`] misses overlap), because each group of
    /// [`BATCH_LOOKAHEAD`] keys enters the generation with one gate increment and is
    /// arbitrated after ONE `SeqCst` fence (where `begin` pays both per key), and
    /// because answers are one byte each. Racers see a group's claimed keys as
    /// `InProgress` until the group is arbitrated, as they see one `begin`'s key until
    /// it commits.
    ///
    /// # Errors
    /// The first key `begin` would refuse ([`DedupError::TableFull`]) stops the batch:
    /// `out` then holds the answers of the keys before it (the refused key is
    /// `keys[answered]`, where `answered` is how much `out` grew), nothing after it
    /// was looked at or claimed, and the error is returned.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use ackwire::dedup::{Admit, IdTable};
    /// use ackwire::IdKey;
    ///
    /// let now = Instant::now();
    /// let table = IdTable::new(1024, Duration::from_secs(60), now);
    /// let mut out = Vec::new();
    /// table.begin_many(&[IdKey(1), IdKey(2), IdKey(1)], now, &mut out)?;
    /// assert_eq!(out, [Admit::Fresh, Admit::Fresh, Admit::InProgress]);
    /// # Ok::<(), ackwire::dedup::DedupError>(())
    /// ```
    pub fn begin_many(
        &self,
        keys: &[IdKey],
        now: Instant,
        out: &mut Vec<Admit>,
    ) -> Result<(), DedupError> {
        out.reserve(keys.len());
        let now_ms = self.ms(now);
        let g = pin();
        let warm = |k: IdKey| {
            let hash = key_hash(k);
            for s in self.segs.load(&g).iter() {
                s.prefetch(hash);
            }
        };
        for &k in keys.iter().take(BATCH_LOOKAHEAD) {
            warm(k);
        }
        let mut next = 0;
        while next < keys.len() {
            next = self.begin_group(keys, next, now, now_ms, &g, &warm, out)?;
        }
        Ok(())
    }

    /// Marks an in-progress `key` completed at `now`; it is a `Duplicate` until
    /// `now + horizon`. Returns `false` if `key` was not in progress.
    pub fn complete(&self, key: IdKey, now: Instant) -> bool {
        self.settle(key, Some(self.ms(now)))
    }

    /// Forgets an in-progress `key` (processing failed) so a redelivery is `Fresh`.
    /// Returns `false` if `key` was not in progress.
    pub fn release(&self, key: IdKey) -> bool {
        self.settle(key, None)
    }

    /// Completed, unexpired keys with their age in milliseconds at `now` (for
    /// snapshots; allocates).
    pub fn done_entries(&self, now: Instant) -> Vec<(IdKey, u64)> {
        let now_ms = self.ms(now);
        let g = pin();
        let mut out = Vec::new();
        for s in self.segs.load(&g).iter() {
            s.done_entries(now_ms, &mut out);
        }
        // A key may have an expired-then-reinserted copy in two generations only if
        // the older one expired, which `done_entries` skips; still, keep one per key.
        out.sort_unstable_by_key(|&(k, t)| (k, std::cmp::Reverse(t)));
        out.dedup_by_key(|e| e.0);
        out.into_iter()
            .map(|(k, t)| (k, now_ms.saturating_sub(t)))
            .collect()
    }

    /// Recovery: records `key` as completed `age` before `now`. An already expired
    /// age is skipped and a key already present is left as it is (both `true`);
    /// returns `false` only if the table had no room for it.
    pub fn insert_done(&self, key: IdKey, age: Duration, now: Instant) -> bool {
        let age_ms = age.as_millis() as u64;
        if age_ms >= self.horizon_ms {
            return true;
        }
        let t = self.ms(now).saturating_sub(age_ms);
        match self.begin(key, now) {
            Ok(Admit::Fresh) => self.settle(key, Some(t)),
            Ok(Admit::Duplicate | Admit::InProgress) => true,
            Err(_) => false,
        }
    }

    fn settle(&self, key: IdKey, done_at: Option<u64>) -> bool {
        let hash = key_hash(key);
        let g = pin();
        // Newest first: an in-progress entry is almost always in the newest generation.
        self.segs
            .load(&g)
            .iter()
            .rev()
            .any(|s| s.settle(key, hash, done_at))
    }

    /// One group of [`begin_many`](Self::begin_many): up to [`BATCH_LOOKAHEAD`] keys
    /// from `start` are claimed in the current generation (each publishes its
    /// `PENDING` copy), then ONE `SeqCst` fence orders all those publications before
    /// the arbitration scans, then each claim is arbitrated and committed as in
    /// [`begin`](Self::begin). Dekker's argument holds per key: every copy is
    /// published before the fence that precedes its scans, so of two racers on one
    /// key at least one sees the other. Anything unusual (a roll due, a closed or full
    /// generation) first settles the claims made so far and hands that key to `begin`.
    /// Returns the index of the next key.
    #[allow(clippy::too_many_arguments)]
    fn begin_group(
        &self,
        keys: &[IdKey],
        start: usize,
        now: Instant,
        now_ms: u64,
        g: &Pin,
        warm: &impl Fn(IdKey),
        out: &mut Vec<Admit>,
    ) -> Result<usize, DedupError> {
        let list = self.segs.load(g);
        let cur = list.last().expect("a table always has a generation");
        let older = &list[..list.len() - 1];
        let roll_due =
            now_ms >= self.next_roll_ms.load(Ordering::Relaxed) && self.roll_due(cur, now_ms);
        let end = (start + BATCH_LOOKAHEAD).min(keys.len());
        let mut pending = [Pending::NONE; BATCH_LOOKAHEAD];
        let mut n = 0;
        let mut i = start;
        // The whole group enters the generation's gate with one increment (a count per
        // key, as if each were its own inserter); counts that do not become `INPROG`
        // entries go back with one decrement at the end. While we hold them the
        // generation cannot be closed, so no key below finds it closed.
        let held = (end - start) as u64;
        let mut one_by_one = roll_due || !cur.enter_n(held);
        let entered = !one_by_one;
        let mut fresh_slots = 0;
        while i < end && !one_by_one {
            let key = keys[i];
            let hash = key_hash(key);
            if let Some(a) = older.iter().find_map(|s| s.lookup(key, hash, now_ms)) {
                out.push(a);
            } else {
                match cur.claim(key, hash, now_ms, false) {
                    Claim::Live(a) => out.push(a),
                    Claim::Full => {
                        one_by_one = true;
                        continue;
                    }
                    Claim::Claimed {
                        idx,
                        ver,
                        dist,
                        reclaimed,
                        fresh_slot,
                    } => {
                        if reclaimed {
                            self.expired_reclaimed.fetch_add(1, Ordering::Relaxed);
                        }
                        fresh_slots += usize::from(fresh_slot);
                        pending[n] = Pending {
                            pos: out.len(),
                            key,
                            hash,
                            idx,
                            ver,
                            dist,
                        };
                        n += 1;
                        out.push(Admit::Fresh); // settled below
                    }
                }
            }
            if let Some(&k) = keys.get(i + BATCH_LOOKAHEAD) {
                warm(k);
            }
            i += 1;
        }
        let mut kept = 0;
        if n > 0 {
            cur.add_used(fresh_slots);
            fence(Ordering::SeqCst);
            for p in &pending[..n] {
                let a = self.decide(g, cur, p, now_ms);
                kept += u64::from(a == Admit::Fresh);
                out[p.pos] = a;
            }
        }
        if entered {
            cur.leave_n(held - kept);
        }
        if one_by_one && i < end {
            // Every earlier key is settled: `begin` sees what it would have seen one
            // key at a time (and rolls, waits for a closer, or refuses as it does).
            out.push(self.begin(keys[i], now)?);
            if let Some(&k) = keys.get(i + BATCH_LOOKAHEAD) {
                warm(k);
            }
            i += 1;
        }
        Ok(i)
    }

    /// Arbitrate a published claim (after the `SeqCst` fence that follows its
    /// publication) and settle it: `Fresh` if it commits, `InProgress` if the commit
    /// fails, or the answer another copy gives (the claim is then retracted).
    /// Does not touch the gate: the caller's count for the key stays as the new
    /// `INPROG` entry's if the answer is `Fresh`, and must be given back otherwise.
    fn decide(&self, g: &Pin, cur: &Arc<Segment>, c: &Pending, now_ms: u64) -> Admit {
        match self.arbitrate(g, cur, c.key, c.hash, c.idx, c.dist, now_ms) {
            None if cur.commit(c.idx, c.ver) => Admit::Fresh,
            None => Admit::InProgress,
            Some(answer) => {
                cur.retract(c.idx, c.ver);
                answer
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn arbitrate(
        &self,
        g: &Pin,
        cur: &Arc<Segment>,
        key: IdKey,
        hash: u64,
        mine: usize,
        my_dist: usize,
        now_ms: u64,
    ) -> Option<Admit> {
        // Reloaded after the fence: a generation published by a racer is seen here, or
        // the racer sees our copy (module doc of `segment.rs`).
        for s in self.segs.load(g).iter() {
            let rank = if Arc::ptr_eq(s, cur) {
                Rank::Same { mine, my_dist }
            } else if s.id < cur.id {
                Rank::Older
            } else {
                Rank::Newer
            };
            if let Some(a) = s.arbitrate(key, hash, now_ms, rank) {
                return Some(a);
            }
        }
        None
    }

    fn roll_due(&self, cur: &Segment, now_ms: u64) -> bool {
        now_ms >= cur.start_ms + self.horizon_ms || cur.used() * 2 >= cur.capacity()
    }

    /// Tries to add a generation to `list` (dropping expired ones). `forced`: the
    /// current generation cannot take the key (full, or closed). Returns `true` if the
    /// list changed (by us or a racer): retry on the new one.
    fn roll(&self, list: &SegList, now_ms: u64, forced: bool, g: &Pin) -> bool {
        let cur = list.last().expect("a table always has a generation");
        let time_due = now_ms >= cur.start_ms + self.horizon_ms;
        if !time_due && !forced && cur.used() * 2 < cur.capacity() {
            return false;
        }
        let mut keep: SegList = Vec::with_capacity(list.len() + 1);
        let mut dropped = 0;
        for s in &list[..list.len() - 1] {
            if s.droppable(now_ms) {
                dropped += 1;
            } else {
                keep.push(s.clone());
            }
        }
        let cur_goes = cur.is_closed() || (time_due && cur.quiescent(now_ms));
        let live: usize =
            keep.iter().map(|s| s.bytes()).sum::<usize>() + if cur_goes { 0 } else { cur.bytes() };
        let want = if time_due {
            let period_keys: usize = list
                .iter()
                .filter(|s| s.period_start_ms == cur.period_start_ms)
                .map(|s| s.used())
                .sum();
            (2 * period_keys).next_power_of_two().max(self.min_slots)
        } else {
            cur.capacity() * GROWTH
        };
        let room = self.budget_bytes.saturating_sub(live) / SLOT_BYTES;
        let slots = if want <= room {
            want
        } else if room >= self.min_slots {
            1 << room.ilog2()
        } else {
            0
        };
        if slots == 0 {
            if !forced {
                let backoff = (self.horizon_ms / ROLL_BACKOFF_DIV).max(1);
                self.next_roll_ms.store(now_ms + backoff, Ordering::Relaxed);
            }
            if dropped > 0 && !cur.is_closed() {
                // Unlink the expired generations anyway: that is what makes room.
                keep.push(cur.clone());
                if self.segs.replace(list, keep, g) {
                    self.segments_dropped.fetch_add(dropped, Ordering::Relaxed);
                }
                return true;
            }
            return cur.is_closed();
        }
        // Committed to adding a generation: now the current one may close too.
        if cur_goes && cur.droppable(now_ms) {
            dropped += 1;
        } else {
            if cur_goes
                && !cur.is_closed()
                && live + cur.bytes() + slots * SLOT_BYTES > self.budget_bytes
            {
                // Someone entered it after all, and the budget counted it as gone.
                return false;
            }
            keep.push(cur.clone());
        }
        let period_start = if time_due {
            now_ms
        } else {
            cur.period_start_ms
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fresh = Arc::new(Segment::new(
            id,
            slots,
            now_ms,
            period_start,
            self.horizon_ms,
        ));
        keep.push(fresh.clone());
        if self.segs.replace(list, keep, g) {
            self.segments_dropped.fetch_add(dropped, Ordering::Relaxed);
            self.next_roll_ms.store(0, Ordering::Relaxed);
            return true;
        }
        if cur.is_closed() {
            // We (or another roller) closed the current generation: it must not stay
            // the newest one, or nobody could insert. Append ours to whatever won,
            // unless the winner already moved past it.
            loop {
                let now_list = self.segs.load(g);
                if !Arc::ptr_eq(now_list.last().expect("non-empty"), cur) {
                    return true;
                }
                let mut next: SegList = now_list.clone();
                next.push(fresh.clone());
                if self.segs.replace(now_list, next, g) {
                    return true;
                }
            }
        }
        true
    }

    fn refuse(&self, list: &SegList, now_ms: u64) -> DedupError {
        self.table_full.fetch_add(1, Ordering::Relaxed);
        if self.warn.due(now_ms) {
            tracing::warn!(
                budget_bytes = self.budget_bytes,
                refused_total = self.table_full_count(),
                "dedup key table at its memory budget: refusing new keys until entries \
                 expire (raise DedupConfig::table_budget_bytes or shorten the horizon)"
            );
        }
        DedupError::TableFull {
            capacity: list.iter().map(|s| s.capacity()).sum(),
            budget_bytes: self.budget_bytes,
        }
    }

    /// Milliseconds since `base`, offset by the horizon so recovered entries completed
    /// before `base` still have a non-negative time.
    fn ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.base).as_millis() as u64;
        (since + self.horizon_ms).min(TIME_MASK / 2)
    }
}

#[cfg(all(test, not(ackwire_loom)))]
mod tests {
    use super::*;

    /// Property: `begin_many` answers exactly as `begin` called key by key, on a
    /// table that grows (several generations) and with repeats inside one batch.
    #[test]
    fn begin_many_answers_as_begin_one_at_a_time() {
        let base = Instant::now();
        let h = Duration::from_secs(60);
        let (a, b) = (
            IdTable::growing(64, 1 << 20, h, base),
            IdTable::growing(64, 1 << 20, h, base),
        );
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        let mut out = Vec::new();
        for round in 0..50u64 {
            let now = base + Duration::from_millis(round * 10);
            let keys: Vec<IdKey> = (0..37)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    IdKey(u128::from(x % 1500))
                })
                .collect();
            out.clear();
            a.begin_many(&keys, now, &mut out).unwrap();
            assert_eq!(out.len(), keys.len());
            let want: Vec<Admit> = keys.iter().map(|k| b.begin(*k, now).unwrap()).collect();
            for ((k, got), want) in keys.iter().zip(&out).zip(want) {
                assert_eq!(*got, want, "key {k:?} round {round}");
                if want == Admit::Fresh && k.0 % 3 != 0 {
                    assert!(a.complete(*k, now) && b.complete(*k, now));
                }
            }
        }
        assert!(a.generations() > 1, "the table grew");
    }

    #[test]
    fn release_makes_key_fresh_and_expired_slot_is_reused() {
        let t0 = Instant::now();
        let t = IdTable::new(8, Duration::from_millis(100), t0);
        for i in 0..8u128 {
            assert_eq!(t.begin(IdKey(i), t0).unwrap(), Admit::Fresh);
        }
        assert!(matches!(
            t.begin(IdKey(99), t0),
            Err(DedupError::TableFull { capacity: 8, .. })
        ));
        assert_eq!(t.table_full_count(), 1);
        assert!(t.release(IdKey(3)));
        assert!(!t.release(IdKey(3)));
        assert_eq!(t.begin(IdKey(99), t0).unwrap(), Admit::Fresh);
        assert!(t.complete(IdKey(0), t0));
        // in-progress entries never expire; the done one does
        let later = t0 + Duration::from_millis(100);
        assert_eq!(t.begin(IdKey(1), later).unwrap(), Admit::InProgress);
        assert_eq!(t.begin(IdKey(500), later).unwrap(), Admit::Fresh);
        assert_eq!(t.expired_reclaimed_count(), 1);
        // key 0's slot went to 500: 0 is absent now, and there is no room for it
        assert!(matches!(
            t.begin(IdKey(0), later),
            Err(DedupError::TableFull { .. })
        ));
        assert!(t.release(IdKey(1)));
        assert_eq!(t.begin(IdKey(0), later).unwrap(), Admit::Fresh);
    }

    #[test]
    fn keys_sharing_low_bits_are_never_confused() {
        let t0 = Instant::now();
        let t = IdTable::new(64, Duration::from_secs(1), t0);
        let a = IdKey(7);
        let b = IdKey(7 | (1u128 << 100));
        assert_eq!(t.begin(a, t0).unwrap(), Admit::Fresh);
        assert!(t.complete(a, t0));
        assert_eq!(t.begin(b, t0).unwrap(), Admit::Fresh);
        assert_eq!(t.begin(a, t0).unwrap(), Admit::Duplicate);
    }

    #[test]
    fn grows_past_its_initial_capacity_and_drops_expired_generations() {
        let t0 = Instant::now();
        let h = Duration::from_millis(1000);
        let t = IdTable::growing(64, 1 << 20, h, t0);
        for i in 0..5_000u128 {
            assert_eq!(t.begin(IdKey(i), t0).unwrap(), Admit::Fresh, "key {i}");
            assert!(t.complete(IdKey(i), t0));
        }
        assert!(t.generations() > 1);
        assert!(t.capacity() >= 5_000);
        for i in 0..5_000u128 {
            assert_eq!(t.begin(IdKey(i), t0).unwrap(), Admit::Duplicate, "key {i}");
        }
        // Two horizons later every old generation is gone; one insert triggers it.
        let later = t0 + 2 * h;
        assert_eq!(t.begin(IdKey(1 << 90), later).unwrap(), Admit::Fresh);
        assert_eq!(t.generations(), 1, "{t:?}");
        assert!(t.generations_dropped() >= 2);
        assert_eq!(t.table_full_count(), 0);
        assert_eq!(t.begin(IdKey(7), later).unwrap(), Admit::Fresh);
    }

    #[test]
    fn at_the_budget_it_refuses_with_a_typed_counted_error() {
        let t0 = Instant::now();
        // Budget for 64 + 128 slots: the third doubling does not fit.
        let t = IdTable::growing(64, (64 + 128) * SLOT_BYTES, Duration::from_secs(60), t0);
        let mut fresh = 0;
        let mut refused = 0;
        for i in 0..1_000u128 {
            match t.begin(IdKey(i), t0) {
                Ok(Admit::Fresh) => fresh += 1,
                Err(DedupError::TableFull { budget_bytes, .. }) => {
                    assert_eq!(budget_bytes, (64 + 128) * SLOT_BYTES);
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(t.memory_bytes() <= t.budget_bytes());
        assert_eq!(fresh + refused, 1_000);
        assert!(fresh >= 150, "fresh {fresh}");
        assert_eq!(t.table_full_count(), refused);
    }

    #[test]
    fn a_refused_key_stops_the_batch_and_claims_nothing_after_it() {
        let t0 = Instant::now();
        let t = IdTable::growing(64, (64 + 128) * SLOT_BYTES, Duration::from_secs(60), t0);
        let keys: Vec<IdKey> = (0..1_000u128).map(IdKey).collect();
        let mut out = Vec::new();
        let err = t.begin_many(&keys, t0, &mut out).unwrap_err();
        assert!(matches!(err, DedupError::TableFull { .. }), "{err:?}");
        let answered = out.len();
        assert!((150..1_000).contains(&answered), "answered {answered}");
        assert!(out.iter().all(|a| *a == Admit::Fresh));
        assert_eq!(t.table_full_count(), 1);
        // Everything answered is in progress; nothing after the refused key was
        // claimed: once room is made, the refused key and the next are still fresh.
        for k in &keys[..answered] {
            assert_eq!(t.begin(*k, t0).unwrap(), Admit::InProgress);
            assert!(t.release(*k));
        }
        out.clear();
        t.begin_many(&keys[answered..answered + 2], t0, &mut out)
            .unwrap();
        assert_eq!(out, [Admit::Fresh, Admit::Fresh]);
    }

    #[test]
    fn an_in_progress_key_in_an_old_generation_is_still_found_and_settled() {
        let t0 = Instant::now();
        let h = Duration::from_millis(100);
        let t = IdTable::growing(8, 1 << 20, h, t0);
        assert_eq!(t.begin(IdKey(1), t0).unwrap(), Admit::Fresh);
        let later = t0 + 5 * h;
        // New generation (period passed); the in-progress key keeps the old one.
        assert_eq!(t.begin(IdKey(2), later).unwrap(), Admit::Fresh);
        assert_eq!(t.generations(), 2);
        assert_eq!(t.begin(IdKey(1), later).unwrap(), Admit::InProgress);
        assert!(t.complete(IdKey(1), later));
        assert_eq!(t.begin(IdKey(1), later).unwrap(), Admit::Duplicate);
        let much_later = later + 3 * h;
        assert_eq!(t.begin(IdKey(1), much_later).unwrap(), Admit::Fresh);
    }
}
