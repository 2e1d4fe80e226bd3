//! One generation of the key table: a fixed-capacity, lock-free, open-addressed set.
//!
//! Owns the slot array of one [`Segment`] and the per-slot protocol: full 128-bit keys,
//! a per-entry state and completion time, and the arbitration that keeps one copy of a
//! key. Must not read a clock (every call takes `now_ms`), allocate after construction,
//! or ever report a key it does not hold (keys are compared in full, read under a
//! per-slot version check). Which segment inserts go to, and when segments are dropped,
//! is [`IdTable`](super::IdTable)'s business.
//!
//! # Slot states
//!
//! `EMPTY` (never used; ends a probe chain, never comes back) → `BUSY` (claimed, key
//! being written) → `PENDING` (key published, arbitration running) → `INPROG` (owned by
//! one caller) → `DONE` (completed at a time) → expired (a `DONE` older than the horizon:
//! reusable in place) or `FREE` (released / lost arbitration: reusable).
//!
//! # Why arbitration
//!
//! Reusable slots in the middle of a chain, and a newer segment taking inserts while an
//! older one still holds live keys, let two concurrent inserters of the same key claim
//! different slots. After publishing `PENDING`, each inserter fences (`SeqCst`) and
//! rescans the key's chain in every live segment (Dekker: of two racers at least one
//! sees the other). Copies are ranked by (segment age, probe distance): a racer that
//! sees an `INPROG`/live `DONE` copy, or a better-ranked `PENDING` copy, retracts; a
//! worse-ranked `PENDING` copy is killed. Exactly one copy becomes `INPROG`. A loser
//! answers `InProgress`, which is safe: the winner acks or releases, and the sender
//! retries whatever was not acked.
//!
//! Every claim bumps a 21-bit slot version, and key reads are validated against the
//! whole state word (kind, version, time), so a reader can only be fooled if one slot
//! is reclaimed exactly 2^21 times between two of its loads a few nanoseconds apart.
//!
//! # The gate
//!
//! `gate` counts inserters inside the segment plus its `INPROG` entries. A segment is
//! dropped only after its gate was closed at zero (so no insert can still land in it and
//! no owner can still complete into it) and its last completion has expired.

use super::sync::{fence, AtomicU64, AtomicUsize, Ordering};
use super::Admit;
use crate::IdKey;

const K_EMPTY: u64 = 0;
const K_BUSY: u64 = 1;
const K_PENDING: u64 = 2;
const K_INPROG: u64 = 3;
const K_DONE: u64 = 4;
const K_FREE: u64 = 5;

const TIME_BITS: u32 = 40;
pub(super) const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const VER_MASK: u64 = (1 << 21) - 1;

/// Longest probe chain: a key lives within this many slots of its home slot.
const MAX_PROBE: usize = 128;

/// Set in `gate` once the segment may be dropped.
const CLOSED: u64 = 1 << 63;

/// Bytes of one slot.
pub(super) const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

#[inline]
fn kind(s: u64) -> u64 {
    s >> 61
}
#[inline]
fn ver(s: u64) -> u64 {
    (s >> TIME_BITS) & VER_MASK
}
#[inline]
fn time(s: u64) -> u64 {
    s & TIME_MASK
}
#[inline]
const fn pack(kind: u64, ver: u64, time: u64) -> u64 {
    (kind << 61) | ((ver & VER_MASK) << TIME_BITS) | (time & TIME_MASK)
}

#[derive(Debug)]
struct Slot {
    state: AtomicU64,
    lo: AtomicU64,
    hi: AtomicU64,
}

/// One generation: a fixed slot array plus its bookkeeping.
pub(super) struct Segment {
    /// Creation order: a smaller id is an older segment.
    pub(super) id: u64,
    /// When it became the insert segment (table milliseconds).
    pub(super) start_ms: u64,
    /// Start of the horizon period it belongs to (a segment added because its
    /// predecessor filled up inherits the predecessor's period).
    pub(super) period_start_ms: u64,
    slots: Box<[Slot]>,
    mask: usize,
    probe: usize,
    horizon_ms: u64,
    // The three counters are written by inserters and completers while every probe
    // reads the fields above: each sits on its own cache line, so a write does not
    // evict the read-mostly header from the other cores (at 2 threads that sharing
    // cost more than the slot misses).
    used: Line<AtomicUsize>,
    gate: Line<AtomicU64>,
    max_done_ms: Line<AtomicU64>,
}

/// A value alone on its (pair of adjacent) cache line(s): 128 bytes, because x86's
/// adjacent-line prefetcher pulls lines in pairs.
#[repr(align(128))]
#[derive(Debug)]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("capacity", &self.capacity())
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

/// What an insert attempt in the current segment got.
pub(super) enum Claim {
    /// A live copy already answers.
    Live(Admit),
    /// No free or expired slot near the key's home.
    Full,
    /// Our `PENDING` copy is published at `idx` (probe distance `dist`, version `ver`);
    /// arbitration decides. `reclaimed`: the slot held an expired entry;
    /// `fresh_slot`: it was `EMPTY` (taken for the first time).
    Claimed {
        idx: usize,
        ver: u64,
        dist: usize,
        reclaimed: bool,
        fresh_slot: bool,
    },
}

/// Where a segment stands relative to the one holding our `PENDING` copy.
#[derive(Clone, Copy)]
pub(super) enum Rank {
    /// Older segment: its `PENDING` copies beat ours.
    Older,
    /// Our segment: copies nearer home beat ours.
    Same { mine: usize, my_dist: usize },
    /// Newer segment: its `PENDING` copies lose to ours.
    Newer,
}

/// What a probe found for a key.
enum Found {
    Live(Admit),
    /// Not present; the first reusable slot (index, state, probe distance) if any.
    Absent(Option<(usize, u64, usize)>),
}

impl Segment {
    pub(super) fn new(
        id: u64,
        capacity: usize,
        start_ms: u64,
        period_start_ms: u64,
        horizon_ms: u64,
    ) -> Segment {
        let cap = capacity.max(8).next_power_of_two();
        Segment {
            id,
            start_ms,
            period_start_ms,
            slots: empty_slots(cap),
            mask: cap - 1,
            probe: cap.min(MAX_PROBE),
            horizon_ms,
            used: Line(AtomicUsize::new(0)),
            gate: Line(AtomicU64::new(0)),
            max_done_ms: Line(AtomicU64::new(0)),
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.mask + 1
    }

    pub(super) fn bytes(&self) -> usize {
        self.capacity() * SLOT_BYTES
    }

    /// Slots ever taken from `EMPTY` (reused slots are not counted again).
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Enters as an inserter; `false` if the segment is closed (reload the list).
    #[inline]
    pub(super) fn enter(&self) -> bool {
        if self.gate.fetch_add(1, Ordering::AcqRel) & CLOSED != 0 {
            self.gate.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Leaves (an inserter that did not win, or an `INPROG` entry that settled).
    #[inline]
    pub(super) fn leave(&self) {
        self.gate.fetch_sub(1, Ordering::AcqRel);
    }

    /// Enters as `n` inserters at once (a group of a batch: one locked increment
    /// instead of `n`); `false` if the segment is closed. The caller then holds `n`
    /// counts and gives back, with [`leave_n`](Self::leave_n), every count that did not
    /// become an `INPROG` entry, exactly as `n` separate inserters would.
    #[inline]
    pub(super) fn enter_n(&self, n: u64) -> bool {
        if self.gate.fetch_add(n, Ordering::AcqRel) & CLOSED != 0 {
            self.gate.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back `n` counts taken by [`enter_n`](Self::enter_n) (none: no write).
    #[inline]
    pub(super) fn leave_n(&self, n: u64) {
        if n > 0 {
            self.gate.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Adds `n` slots taken from `EMPTY` by claims made with `count_used = false`.
    #[inline]
    pub(super) fn add_used(&self, n: usize) {
        if n > 0 {
            self.used.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Nothing in it can matter any more: no inserter or `INPROG` entry, and every
    /// completion expired at `now_ms` (a racy check: see [`close`](Self::close)).
    pub(super) fn quiescent(&self, now_ms: u64) -> bool {
        let g = self.gate.load(Ordering::Acquire);
        (g == 0 || g & CLOSED != 0) && self.expired_at(now_ms)
    }

    /// Closes the gate if nobody is inside (no inserter, no `INPROG` entry); `true` if
    /// it is closed (by this call or an earlier one). A closed segment takes no more
    /// inserts and is never reopened; its `DONE` entries stay readable.
    pub(super) fn close(&self) -> bool {
        let g = self.gate.load(Ordering::Acquire);
        if g & CLOSED != 0 {
            return true;
        }
        g == 0
            && self
                .gate
                .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Closed, and every completion in it expired at `now_ms`: it can be unlinked.
    /// (Once closed nothing can complete into it any more, so the check is final.)
    pub(super) fn droppable(&self, now_ms: u64) -> bool {
        self.expired_at(now_ms) && self.close() && self.expired_at(now_ms)
    }

    pub(super) fn is_closed(&self) -> bool {
        self.gate.load(Ordering::Acquire) & CLOSED != 0
    }

    fn expired_at(&self, now_ms: u64) -> bool {
        now_ms >= self.max_done_ms.load(Ordering::Acquire) + self.horizon_ms
    }

    /// A live copy of `key` here, if any (read-only probe of an older segment).
    pub(super) fn lookup(&self, key: IdKey, hash: u64, now_ms: u64) -> Option<Admit> {
        match self.find(key, self.home(hash), now_ms) {
            Found::Live(a) => Some(a),
            Found::Absent(_) => None,
        }
    }

    /// Looks for `key`; if absent, publishes a `PENDING` copy in the first reusable
    /// slot. The caller must have [`enter`](Self::enter)ed. `count_used`: add a slot
    /// taken from `EMPTY` to `used` now; a batch passes `false`, counts the
    /// `Claimed { fresh_slot: true, .. }` answers and adds them once with
    /// [`add_used`](Self::add_used).
    pub(super) fn claim(&self, key: IdKey, hash: u64, now_ms: u64, count_used: bool) -> Claim {
        let home = self.home(hash);
        loop {
            let (idx, s, dist) = match self.find(key, home, now_ms) {
                Found::Live(a) => return Claim::Live(a),
                Found::Absent(Some(free)) => free,
                Found::Absent(None) => return Claim::Full,
            };
            let slot = &self.slots[idx];
            let v = ver(s) + 1;
            if slot
                .state
                .compare_exchange(s, pack(K_BUSY, v, 0), Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            if kind(s) == K_EMPTY && count_used {
                self.used.fetch_add(1, Ordering::Relaxed);
            }
            fence(Ordering::Release);
            slot.lo.store(key.0 as u64, Ordering::Relaxed);
            slot.hi.store((key.0 >> 64) as u64, Ordering::Relaxed);
            slot.state.store(pack(K_PENDING, v, 0), Ordering::Release);
            return Claim::Claimed {
                idx,
                ver: v,
                dist,
                reclaimed: kind(s) == K_DONE,
                fresh_slot: kind(s) == K_EMPTY,
            };
        }
    }

    /// Our `PENDING` copy at `idx` becomes `INPROG`; `false` if a better copy killed it.
    pub(super) fn commit(&self, idx: usize, v: u64) -> bool {
        self.slots[idx]
            .state
            .compare_exchange(
                pack(K_PENDING, v, 0),
                pack(K_INPROG, v, 0),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Withdraws our `PENDING` copy at `idx` (it may already have been killed).
    pub(super) fn retract(&self, idx: usize, v: u64) {
        let _ = self.slots[idx].state.compare_exchange(
            pack(K_PENDING, v, 0),
            pack(K_FREE, v, 0),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Scans `key`'s chain here after our `PENDING` copy was published (see the module
    /// doc): `None` if nothing here beats ours, `Some(answer)` if we must retract.
    pub(super) fn arbitrate(
        &self,
        key: IdKey,
        hash: u64,
        now_ms: u64,
        rank: Rank,
    ) -> Option<Admit> {
        let home = self.home(hash);
        let mut i = 0;
        while i < self.probe {
            let idx = (home + i) & self.mask;
            if let Rank::Same { mine, .. } = rank {
                if idx == mine {
                    i += 1;
                    continue;
                }
            }
            let slot = &self.slots[idx];
            let s = slot.state.load(Ordering::Acquire);
            match kind(s) {
                K_EMPTY => break,
                K_PENDING | K_INPROG | K_DONE => match self.read_key(slot, s) {
                    None => continue,
                    Some(k) if k == key => match kind(s) {
                        K_INPROG => return Some(Admit::InProgress),
                        K_DONE if !self.expired(s, now_ms) => return Some(Admit::Duplicate),
                        K_DONE => {}
                        _ => {
                            let theirs_wins = match rank {
                                Rank::Older => true,
                                Rank::Same { my_dist, .. } => i < my_dist,
                                Rank::Newer => false,
                            };
                            if theirs_wins {
                                return Some(Admit::InProgress);
                            }
                            // A worse-ranked PENDING copy: kill it; on failure look again.
                            if slot
                                .state
                                .compare_exchange(
                                    s,
                                    pack(K_FREE, ver(s), 0),
                                    Ordering::AcqRel,
                                    Ordering::Relaxed,
                                )
                                .is_err()
                            {
                                continue;
                            }
                        }
                    },
                    Some(_) => {}
                },
                _ => {}
            }
            i += 1;
        }
        None
    }

    /// Finds the `INPROG` copy of `key`: `Some(t)` completes it at `t` (table ms),
    /// `None` releases it. Returns whether it was found (and then leaves the gate).
    pub(super) fn settle(&self, key: IdKey, hash: u64, done_at: Option<u64>) -> bool {
        let home = self.home(hash);
        let mut i = 0;
        while i < self.probe {
            let slot = &self.slots[(home + i) & self.mask];
            let s = slot.state.load(Ordering::Acquire);
            match kind(s) {
                K_EMPTY => return false,
                K_INPROG => match self.read_key(slot, s) {
                    None => continue,
                    Some(k) if k == key => {
                        let to = match done_at {
                            Some(t) => {
                                // Before the entry turns DONE and before `leave`, so a
                                // closer that sees the gate at zero sees this time. A
                                // load first: completions within one millisecond (most
                                // of them) find the maximum already there and write
                                // nothing to the shared line.
                                if self.max_done_ms.load(Ordering::Acquire) < t {
                                    self.max_done_ms.fetch_max(t, Ordering::AcqRel);
                                }
                                pack(K_DONE, ver(s), t)
                            }
                            None => pack(K_FREE, ver(s), 0),
                        };
                        if slot
                            .state
                            .compare_exchange(s, to, Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok()
                        {
                            self.leave();
                            return true;
                        }
                        continue;
                    }
                    Some(_) => {}
                },
                _ => {}
            }
            i += 1;
        }
        false
    }

    /// Completed, unexpired keys with their completion time (table ms).
    pub(super) fn done_entries(&self, now_ms: u64, out: &mut Vec<(IdKey, u64)>) {
        for slot in self.slots.iter() {
            let s = slot.state.load(Ordering::Acquire);
            if kind(s) == K_DONE && !self.expired(s, now_ms) {
                if let Some(k) = self.read_key(slot, s) {
                    out.push((k, time(s)));
                }
            }
        }
    }

    /// Probes `key`'s chain: a live copy, or absence plus the first reusable slot.
    fn find(&self, key: IdKey, home: usize, now_ms: u64) -> Found {
        let mut free = None;
        let mut i = 0;
        while i < self.probe {
            let idx = (home + i) & self.mask;
            let slot = &self.slots[idx];
            let s = slot.state.load(Ordering::Acquire);
            match kind(s) {
                K_EMPTY => {
                    if free.is_none() {
                        free = Some((idx, s, i));
                    }
                    break;
                }
                K_FREE if free.is_none() => free = Some((idx, s, i)),
                K_PENDING | K_INPROG | K_DONE => {
                    let expired = kind(s) == K_DONE && self.expired(s, now_ms);
                    match self.read_key(slot, s) {
                        None => continue, // changed under us: look again
                        Some(k) if k == key && !expired => {
                            return Found::Live(if kind(s) == K_DONE {
                                Admit::Duplicate
                            } else {
                                Admit::InProgress
                            });
                        }
                        Some(_) => {
                            if expired && free.is_none() {
                                free = Some((idx, s, i));
                            }
                        }
                    }
                }
                _ => {} // BUSY: its owner arbitrates against us if it is our key
            }
            i += 1;
        }
        Found::Absent(free)
    }

    /// Reads the key of a slot whose state was `s`; `None` if the slot changed.
    fn read_key(&self, slot: &Slot, s: u64) -> Option<IdKey> {
        let lo = slot.lo.load(Ordering::Relaxed);
        let hi = slot.hi.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if slot.state.load(Ordering::Relaxed) != s {
            return None;
        }
        Some(IdKey(((hi as u128) << 64) | lo as u128))
    }

    fn expired(&self, s: u64, now_ms: u64) -> bool {
        now_ms >= time(s) + self.horizon_ms
    }

    /// Hint the CPU to load the key's home slot into the cache, and the line after
    /// it (no effect on state). Two lines: a 24-byte slot may straddle a line, and at
    /// the load a generation rolls at (half full) an absent key's probe runs over
    /// about four slots before it meets an `EMPTY` one.
    #[inline]
    pub(super) fn prefetch(&self, hash: u64) {
        let p: *const u8 = std::ptr::from_ref(&self.slots[self.home(hash)]).cast();
        prefetch_read(p);
        prefetch_read(p.wrapping_add(64));
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        (hash as usize) & self.mask
    }
}

/// The key's hash, shared by every segment (each masks it to its size).
#[inline]
pub(super) fn key_hash(key: IdKey) -> u64 {
    let x = (key.0 as u64) ^ ((key.0 >> 64) as u64).rotate_left(29);
    let mut z = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z ^= z >> 32;
    z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 29;
    z
}

/// An all-`EMPTY` slot array. Outside loom it comes from the allocator already zeroed
/// (fresh pages from the OS for a large array: no pass over the memory, which for a
/// generation of millions of slots stalled its caller for tens of milliseconds, and
/// the receiver's acks with it); pages are then touched as keys land in them.
///
/// No `MADV_HUGEPAGE`: it saved TLB misses (229 → 176 ns per random lookup in the
/// dedup bench), but with Linux's default `defrag = madvise` each first touch of a
/// huge page could compact memory for milliseconds — ~50 touches of ~5 ms each right
/// after a 96 MiB generation was added, 250 ms in which the receiver acked nothing,
/// so its senders retransmitted a whole window. 4 KiB faults cost microseconds.
#[cfg(not(ackwire_loom))]
fn empty_slots(cap: usize) -> Box<[Slot]> {
    const _: () = assert!(pack(K_EMPTY, 0, 0) == 0, "an empty slot is all zero bytes");
    let layout = std::alloc::Layout::array::<Slot>(cap).expect("slot array fits in isize");
    // SAFETY: `cap >= 8`, so the layout is not zero-sized. A `Slot` is three
    // `AtomicU64`s (std's, same layout as `u64`), so all-zero bytes are a valid slot:
    // state `pack(K_EMPTY, 0, 0) == 0` (asserted above), key 0. The pointer comes from
    // the global allocator with this exact layout, which is what `Box<[Slot]>` of
    // length `cap` deallocates with.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<Slot>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, cap))
    }
}

#[cfg(ackwire_loom)]
fn empty_slots(cap: usize) -> Box<[Slot]> {
    (0..cap)
        .map(|_| Slot {
            state: AtomicU64::new(pack(K_EMPTY, 0, 0)),
            lo: AtomicU64::new(0),
            hi: AtomicU64::new(0),
        })
        .collect()
}

/// A software prefetch of the cache line at `p` (x86-64 `prefetcht0`; elsewhere
/// nothing). Unlike a plain load it is not ordered by the fences and compare-and-swaps
/// of the slot protocol, so several keys' misses overlap while one key is claimed.
#[inline]
fn prefetch_read(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(ackwire_loom)))]
    // SAFETY: a prefetch is a hint: it never faults, reads no value into the program
    // and changes no memory, whatever the address. `p` points into a live slot array
    // or at most one line past its end.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(all(target_arch = "x86_64", not(ackwire_loom))))]
    let _ = p;
}
