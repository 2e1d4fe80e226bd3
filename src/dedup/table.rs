//! The expiring ID table for application idempotency keys.
//!
//! Owns a fixed-capacity, lock-free, open-addressed (linear probing) set of full 128-bit
//! keys with a per-entry state and completion time. Must not read a clock (every call
//! takes `now`), allocate after construction, or ever report a key it does not hold
//! (keys are compared in full, read under a per-slot version check).
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
//! Reusable slots in the middle of a chain let two concurrent inserters of the same key
//! claim different slots. After publishing `PENDING`, each inserter fences (`SeqCst`)
//! and rescans the chain (Dekker: of two racers at least one sees the other). A racer
//! that sees an `INPROG`/live `DONE` copy retracts; between two `PENDING` copies the one
//! nearer the home slot wins and may kill the other. Exactly one copy becomes `INPROG`.
//! A loser answers `InProgress`, which is safe: the winner acks or releases, and the
//! sender retries whatever was not acked.
//!
//! Every claim bumps a 21-bit slot version, and key reads are validated against the
//! whole state word (kind, version, time), so a reader can only be fooled if one slot
//! is reclaimed exactly 2^21 times between two of its loads a few nanoseconds apart.

use std::time::{Duration, Instant};

use super::sync::{fence, AtomicU64, Ordering};
use super::{Admit, DedupError};
use crate::IdKey;

const K_EMPTY: u64 = 0;
const K_BUSY: u64 = 1;
const K_PENDING: u64 = 2;
const K_INPROG: u64 = 3;
const K_DONE: u64 = 4;
const K_FREE: u64 = 5;

const TIME_BITS: u32 = 40;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const VER_MASK: u64 = (1 << 21) - 1;

/// Longest probe chain: a key lives within this many slots of its home slot.
const MAX_PROBE: usize = 128;

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
fn pack(kind: u64, ver: u64, time: u64) -> u64 {
    (kind << 61) | ((ver & VER_MASK) << TIME_BITS) | (time & TIME_MASK)
}

#[derive(Debug)]
struct Slot {
    state: AtomicU64,
    lo: AtomicU64,
    hi: AtomicU64,
}

/// A bounded, lock-free set of [`IdKey`]s that forgets completed keys after a horizon.
///
/// * `capacity` slots (rounded up to a power of two) are allocated once; 24 bytes each.
///   Plan for ~2× headroom: an insert looks for a free slot only within 128 slots of
///   the key's home, so a crowded neighbourhood refuses with
///   [`DedupError::TableFull`] before every slot is used.
/// * A completed key is remembered for `horizon` after [`complete`](Self::complete);
///   after that its slot is reused by a later insert (reclaim is incremental, on the
///   insert path; no sweep). An in-progress key never expires: a handler that never
///   completes holds its slot until the caller [`release`](Self::release)s it (the
///   driver releases when a delivery is dropped unacked).
/// * Never a false "duplicate": keys are stored and compared in full.
///
/// ```
/// use std::time::{Duration, Instant};
/// use ackwire::{IdKey, dedup::{Admit, IdTable}};
/// let t0 = Instant::now();
/// let t = IdTable::new(1024, Duration::from_secs(60), t0);
/// let k = IdKey(42);
/// assert_eq!(t.begin(k, t0).unwrap(), Admit::Fresh);
/// assert_eq!(t.begin(k, t0).unwrap(), Admit::InProgress);
/// assert!(t.complete(k, t0));
/// assert_eq!(t.begin(k, t0 + Duration::from_secs(59)).unwrap(), Admit::Duplicate);
/// assert_eq!(t.begin(k, t0 + Duration::from_secs(61)).unwrap(), Admit::Fresh);
/// ```
pub struct IdTable {
    slots: Box<[Slot]>,
    mask: usize,
    probe: usize,
    horizon_ms: u64,
    base: Instant,
    table_full: AtomicU64,
    expired_reclaimed: AtomicU64,
}

impl std::fmt::Debug for IdTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdTable")
            .field("capacity", &self.capacity())
            .field("horizon", &self.horizon())
            .field("table_full", &self.table_full_count())
            .field("expired_reclaimed", &self.expired_reclaimed_count())
            .finish_non_exhaustive()
    }
}

/// What a probe found for a key.
enum Found {
    /// A live copy: answer with this.
    Live(Admit),
    /// Not present; the first reusable slot (index, state, probe distance) if any.
    Absent(Option<(usize, u64, usize)>),
}

impl IdTable {
    /// A table of at least `capacity` slots (power of two, minimum 8) remembering
    /// completed keys for `horizon`, with times measured from `base`.
    pub fn new(capacity: usize, horizon: Duration, base: Instant) -> IdTable {
        let cap = capacity.max(8).next_power_of_two();
        let mut slots = Vec::with_capacity(cap);
        advise_huge_pages(
            slots.as_mut_ptr() as *mut u8,
            cap * std::mem::size_of::<Slot>(),
        );
        slots.extend((0..cap).map(|_| Slot {
            state: AtomicU64::new(pack(K_EMPTY, 0, 0)),
            lo: AtomicU64::new(0),
            hi: AtomicU64::new(0),
        }));
        let slots = slots.into_boxed_slice();
        IdTable {
            slots,
            mask: cap - 1,
            probe: cap.min(MAX_PROBE),
            horizon_ms: (horizon.as_millis() as u64).min(TIME_MASK / 2),
            base,
            table_full: AtomicU64::new(0),
            expired_reclaimed: AtomicU64::new(0),
        }
    }

    /// Number of slots (the memory budget in entries).
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// How long completed keys are remembered.
    pub fn horizon(&self) -> Duration {
        Duration::from_millis(self.horizon_ms)
    }

    /// Bytes of slot memory (excluding the small fixed header).
    pub fn memory_bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<Slot>()
    }

    /// How many inserts were refused with [`DedupError::TableFull`].
    pub fn table_full_count(&self) -> u64 {
        self.table_full.load(Ordering::Relaxed)
    }

    /// How many expired entries were reused by inserts.
    pub fn expired_reclaimed_count(&self) -> u64 {
        self.expired_reclaimed.load(Ordering::Relaxed)
    }

    /// Check-and-insert `key`: `Fresh` (now in progress, owned by the caller),
    /// `InProgress` (another caller holds it) or `Duplicate` (completed within the
    /// horizon).
    ///
    /// # Errors
    /// [`DedupError::TableFull`] when no free or expired slot is near the key's home:
    /// do not process, nack; the sender retries later (entries expire meanwhile).
    pub fn begin(&self, key: IdKey, now: Instant) -> Result<Admit, DedupError> {
        let now_ms = self.ms(now);
        let home = self.home(key);
        loop {
            let (idx, s, dist) = match self.find(key, home, now_ms) {
                Found::Live(a) => return Ok(a),
                Found::Absent(Some(free)) => free,
                Found::Absent(None) => {
                    self.table_full.fetch_add(1, Ordering::Relaxed);
                    return Err(DedupError::TableFull {
                        capacity: self.capacity(),
                    });
                }
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
            if kind(s) == K_DONE {
                self.expired_reclaimed.fetch_add(1, Ordering::Relaxed);
            }
            fence(Ordering::Release);
            slot.lo.store(key.0 as u64, Ordering::Relaxed);
            slot.hi.store((key.0 >> 64) as u64, Ordering::Relaxed);
            let pending = pack(K_PENDING, v, 0);
            slot.state.store(pending, Ordering::Release);
            fence(Ordering::SeqCst);
            let verdict = self.arbitrate(key, home, idx, dist, now_ms);
            return match verdict {
                None => {
                    match slot.state.compare_exchange(
                        pending,
                        pack(K_INPROG, v, 0),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => Ok(Admit::Fresh),
                        // Killed by a copy nearer home: that one is winning.
                        Err(_) => Ok(Admit::InProgress),
                    }
                }
                Some(answer) => {
                    let _ = slot.state.compare_exchange(
                        pending,
                        pack(K_FREE, v, 0),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                    Ok(answer)
                }
            };
        }
    }

    /// Marks an in-progress `key` completed at `now`; it is a `Duplicate` until
    /// `now + horizon`. Returns `false` if `key` was not in progress.
    pub fn complete(&self, key: IdKey, now: Instant) -> bool {
        self.complete_at_ms(key, self.ms(now))
    }

    /// Forgets an in-progress `key` (processing failed) so a redelivery is `Fresh`.
    /// Returns `false` if `key` was not in progress.
    pub fn release(&self, key: IdKey) -> bool {
        self.settle(key, |v| pack(K_FREE, v, 0))
    }

    /// Completed, unexpired keys with their age in milliseconds at `now` (for
    /// snapshots; allocates).
    pub fn done_entries(&self, now: Instant) -> Vec<(IdKey, u64)> {
        let now_ms = self.ms(now);
        let mut out = Vec::new();
        for slot in self.slots.iter() {
            let s = slot.state.load(Ordering::Acquire);
            if kind(s) == K_DONE && !self.expired(s, now_ms) {
                if let Some(k) = self.read_key(slot, s) {
                    out.push((k, now_ms.saturating_sub(time(s))));
                }
            }
        }
        out
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
            Ok(Admit::Fresh) => self.complete_at_ms(key, t),
            Ok(Admit::Duplicate | Admit::InProgress) => true,
            Err(_) => false,
        }
    }

    fn complete_at_ms(&self, key: IdKey, t: u64) -> bool {
        self.settle(key, |v| pack(K_DONE, v, t))
    }

    /// Finds the `INPROG` copy of `key` and moves it to `to(version)`.
    fn settle(&self, key: IdKey, to: impl Fn(u64) -> u64) -> bool {
        let home = self.home(key);
        let mut i = 0;
        while i < self.probe {
            let slot = &self.slots[(home + i) & self.mask];
            let s = slot.state.load(Ordering::Acquire);
            match kind(s) {
                K_EMPTY => return false,
                K_INPROG => match self.read_key(slot, s) {
                    None => continue,
                    Some(k) if k == key => {
                        if slot
                            .state
                            .compare_exchange(s, to(ver(s)), Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok()
                        {
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

    /// After publishing our `PENDING` copy at `mine` (distance `my_dist`): `None` if we
    /// may take it, `Some(answer)` if we must retract.
    fn arbitrate(
        &self,
        key: IdKey,
        home: usize,
        mine: usize,
        my_dist: usize,
        now_ms: u64,
    ) -> Option<Admit> {
        let mut i = 0;
        while i < self.probe {
            let idx = (home + i) & self.mask;
            if idx == mine {
                i += 1;
                continue;
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
                        _ if i < my_dist => return Some(Admit::InProgress),
                        _ => {
                            // A farther PENDING copy: kill it; on failure look again.
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

    /// Milliseconds since `base`, offset by the horizon so recovered entries completed
    /// before `base` still have a non-negative time.
    fn ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.base).as_millis() as u64;
        (since + self.horizon_ms).min(TIME_MASK)
    }

    fn home(&self, key: IdKey) -> usize {
        let x = (key.0 as u64) ^ ((key.0 >> 64) as u64).rotate_left(29);
        let mut z = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 32;
        z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 29;
        (z as usize) & self.mask
    }
}

/// Best effort: ask Linux for transparent huge pages on a large, not yet touched slot
/// array. Lookups are one random access into it, so on big tables the TLB miss is a
/// large part of the cost (measured in `benches/dedup.rs`). Errors are ignored.
#[cfg(all(target_os = "linux", not(ackwire_loom)))]
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    const PAGE: usize = 4096;
    const MADV_HUGEPAGE: i32 = 14;
    extern "C" {
        fn madvise(addr: *mut u8, len: usize, advice: i32) -> i32;
    }
    if len < 2 * HUGE {
        return;
    }
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) / PAGE * PAGE;
    // SAFETY: [start, end) lies inside the allocation we own and have not yet handed
    // out; MADV_HUGEPAGE only changes how the kernel backs those pages, not their
    // contents or validity.
    unsafe {
        madvise(start as *mut u8, end - start, MADV_HUGEPAGE);
    }
}

#[cfg(not(all(target_os = "linux", not(ackwire_loom))))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

#[cfg(all(test, not(ackwire_loom)))]
mod tests {
    use super::*;

    #[test]
    fn release_makes_key_fresh_and_expired_slot_is_reused() {
        let t0 = Instant::now();
        let t = IdTable::new(8, Duration::from_millis(100), t0);
        for i in 0..8u128 {
            assert_eq!(t.begin(IdKey(i), t0).unwrap(), Admit::Fresh);
        }
        assert!(matches!(
            t.begin(IdKey(99), t0),
            Err(DedupError::TableFull { capacity: 8 })
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
}
