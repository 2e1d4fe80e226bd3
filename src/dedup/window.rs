//! The per-stream sequence window: watermark + sliding two-bit-per-seq ring.
//!
//! Owns the dedup state of one `(origin, channel)` stream of library-assigned sequence
//! numbers. Lock-free and allocation-free after construction. Must not know about files,
//! clocks or other streams.
//!
//! # Layout
//!
//! `watermark` is the highest seq such that every seq `1..=watermark` is settled
//! (processed, or abandoned by the sender via [`SeqWindow::advance_floor`]); those are
//! duplicates forever. Above it, a ring of `n` 64-bit words tracks the next `8 * n` seqs:
//! each word holds one *block* of 8 consecutive seqs as 8 × 2 state bits (bit 0
//! in-progress, bit 1 done) in its low 16 bits and the block number (`seq >> 3`) in its
//! high 48 bits. The full block number in every word means a stale word is always
//! recognised as stale (no ABA on slot reuse), which is why seqs are limited to
//! [`SeqWindow::MAX_SEQ`] (2^51 − 1).
//!
//! A word is only ever replaced by a newer block when every seq of its old block is at
//! or below the watermark, so dropping its bits loses nothing.

use super::sync::{AtomicU64, Ordering};
use super::{Admit, DedupError};

const ST_INPROG: u64 = 0b01;
const ST_DONE: u64 = 0b10;
const STATE_BITS: u32 = 16;

/// Dedup window for one stream of 1-based sequence numbers.
///
/// ```
/// use ackwire::dedup::{Admit, SeqWindow};
/// let w = SeqWindow::new(64);
/// assert_eq!(w.begin(1).unwrap(), Admit::Fresh);
/// assert_eq!(w.begin(1).unwrap(), Admit::InProgress);
/// w.complete(1);
/// assert_eq!(w.begin(1).unwrap(), Admit::Duplicate);
/// assert_eq!(w.watermark(), 1);
/// ```
pub struct SeqWindow {
    watermark: AtomicU64,
    words: Box<[AtomicU64]>,
    mask: u64,
}

impl std::fmt::Debug for SeqWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqWindow")
            .field("watermark", &self.watermark())
            .field("window", &self.window())
            .finish_non_exhaustive()
    }
}

impl SeqWindow {
    /// The largest sequence number the window accepts (block numbers are kept in full
    /// in 48 bits). Larger seqs get [`DedupError::SeqOutOfRange`].
    pub const MAX_SEQ: u64 = (1 << 51) - 1;

    /// A window tracking at least `window` seqs above the watermark (rounded up to a
    /// power of two, minimum 64). Memory: one byte per tracked seq.
    pub fn new(window: u32) -> SeqWindow {
        let seqs = (window.max(64) as u64).next_power_of_two();
        let n = seqs / 8;
        let words = (0..n).map(|i| AtomicU64::new(i << STATE_BITS)).collect();
        SeqWindow {
            watermark: AtomicU64::new(0),
            words,
            mask: n - 1,
        }
    }

    /// How many seqs above the watermark are tracked (a seq more than this far above
    /// the watermark may get [`DedupError::WindowOverrun`]; exactly: its block must be
    /// fewer than `window / 8` blocks above the block of `watermark + 1`).
    pub fn window(&self) -> u64 {
        (self.mask + 1) * 8
    }

    /// Every seq `1..=watermark()` is settled; `0` means nothing yet.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Check-and-insert: `Fresh` marks `seq` in progress (the caller must later
    /// [`complete`](Self::complete) or [`release`](Self::release) it), `InProgress` if
    /// another caller holds it, `Duplicate` if it was processed (or settled by a floor).
    ///
    /// # Errors
    /// [`DedupError::WindowOverrun`] when `seq` is beyond the window (do not process,
    /// do not ack: the sender retries later, once the watermark has moved);
    /// [`DedupError::SeqOutOfRange`] for `seq == 0` or `seq > MAX_SEQ`.
    pub fn begin(&self, seq: u64) -> Result<Admit, DedupError> {
        check_seq(seq)?;
        let b = seq >> 3;
        let sh = ((seq & 7) * 2) as u32;
        loop {
            let w = self.watermark.load(Ordering::Acquire);
            if seq <= w {
                return Ok(Admit::Duplicate);
            }
            if b > ((w + 1) >> 3) + self.mask {
                return Err(DedupError::WindowOverrun {
                    seq,
                    watermark: w,
                    window: self.window(),
                });
            }
            let word = &self.words[(b & self.mask) as usize];
            let cur = word.load(Ordering::Acquire);
            let tag = cur >> STATE_BITS;
            let new = if tag == b {
                let st = (cur >> sh) & 3;
                if st & ST_DONE != 0 {
                    return Ok(Admit::Duplicate);
                }
                if st & ST_INPROG != 0 {
                    return Ok(Admit::InProgress);
                }
                cur | (ST_INPROG << sh)
            } else if tag < b {
                // An older block: all of it is at or below `w` (b < wb + n and
                // tag ≡ b mod n give tag < wb), so its bits can go.
                (b << STATE_BITS) | (ST_INPROG << sh)
            } else {
                // A newer block owns the slot, so the watermark has passed `seq`;
                // the acquire load above synchronised with its writer, re-read.
                continue;
            };
            if word
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(Admit::Fresh);
            }
        }
    }

    /// Marks an in-progress `seq` done and slides the watermark over any contiguous
    /// done run. Returns `false` (and changes nothing) if `seq` was not in progress
    /// (for a seq a floor settled while it was in progress the answer is either; it
    /// is a duplicate regardless).
    pub fn complete(&self, seq: u64) -> bool {
        if self.transition(seq, ST_DONE) {
            self.slide();
            true
        } else {
            false
        }
    }

    /// Forgets an in-progress `seq` (processing failed) so a redelivery is `Fresh`.
    /// Returns `false` if `seq` was not in progress.
    pub fn release(&self, seq: u64) -> bool {
        self.transition(seq, 0)
    }

    /// The sender promises every seq `< floor` is settled forever (processed or
    /// abandoned): the watermark jumps to at least `floor - 1`, which unsticks holes.
    /// Those seqs are `Duplicate` from now on, even ones never seen.
    pub fn advance_floor(&self, floor: u64) {
        if floor <= 1 {
            return;
        }
        let target = (floor - 1).min(Self::MAX_SEQ);
        self.watermark.fetch_max(target, Ordering::AcqRel);
        self.slide();
    }

    /// `true` if `seq` is known processed (at or below the watermark, or done above it).
    pub fn is_done(&self, seq: u64) -> bool {
        if seq == 0 || seq > Self::MAX_SEQ {
            return false;
        }
        if seq <= self.watermark() {
            return true;
        }
        let cur = self.words[((seq >> 3) & self.mask) as usize].load(Ordering::Acquire);
        cur >> STATE_BITS == seq >> 3 && (cur >> ((seq & 7) * 2)) & ST_DONE != 0
    }

    /// Recovery: records `seq` as done without a prior `begin` (used when replaying the
    /// durable log). Seqs at or below the watermark are ignored.
    ///
    /// # Errors
    /// As [`begin`](Self::begin): `WindowOverrun`, `SeqOutOfRange`.
    pub fn mark_done(&self, seq: u64) -> Result<(), DedupError> {
        check_seq(seq)?;
        let b = seq >> 3;
        let sh = ((seq & 7) * 2) as u32;
        loop {
            let w = self.watermark.load(Ordering::Acquire);
            if seq <= w {
                return Ok(());
            }
            if b > ((w + 1) >> 3) + self.mask {
                return Err(DedupError::WindowOverrun {
                    seq,
                    watermark: w,
                    window: self.window(),
                });
            }
            let word = &self.words[(b & self.mask) as usize];
            let cur = word.load(Ordering::Acquire);
            let tag = cur >> STATE_BITS;
            let new = if tag == b {
                (cur & !(3 << sh)) | (ST_DONE << sh)
            } else if tag < b {
                (b << STATE_BITS) | (ST_DONE << sh)
            } else {
                continue;
            };
            if word
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.slide();
                return Ok(());
            }
        }
    }

    /// The done seqs above the watermark, ascending (for snapshots; allocates).
    pub fn done_above_watermark(&self) -> Vec<u64> {
        let w = self.watermark();
        let mut out = Vec::new();
        for word in self.words.iter() {
            let cur = word.load(Ordering::Acquire);
            let b = cur >> STATE_BITS;
            for i in 0..8u64 {
                let seq = (b << 3) | i;
                if seq > w && (cur >> (i * 2)) & ST_DONE != 0 {
                    out.push(seq);
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// In-progress → `to` (0 = released, `ST_DONE` = done) for `seq`'s bits.
    fn transition(&self, seq: u64, to: u64) -> bool {
        if seq == 0 || seq > Self::MAX_SEQ {
            return false;
        }
        let b = seq >> 3;
        let sh = ((seq & 7) * 2) as u32;
        let word = &self.words[(b & self.mask) as usize];
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if cur >> STATE_BITS != b || (cur >> sh) & ST_INPROG == 0 {
                return false;
            }
            let new = (cur & !(3 << sh)) | (to << sh);
            match word.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Moves the watermark over the contiguous run of done seqs just above it.
    fn slide(&self) {
        let mut w = self.watermark.load(Ordering::Acquire);
        loop {
            let next = w + 1;
            let b = next >> 3;
            if next > Self::MAX_SEQ {
                return;
            }
            let cur = self.words[(b & self.mask) as usize].load(Ordering::Acquire);
            if cur >> STATE_BITS != b {
                return;
            }
            let mut end = w;
            for i in (next & 7)..8 {
                if (cur >> (i * 2)) & ST_DONE != 0 {
                    end = (b << 3) | i;
                } else {
                    break;
                }
            }
            if end == w {
                return;
            }
            let prev = self.watermark.fetch_max(end, Ordering::AcqRel);
            w = prev.max(end);
        }
    }
}

fn check_seq(seq: u64) -> Result<(), DedupError> {
    if seq == 0 || seq > SeqWindow::MAX_SEQ {
        Err(DedupError::SeqOutOfRange { seq })
    } else {
        Ok(())
    }
}

#[cfg(all(test, not(ackwire_loom)))]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_completion_slides_watermark_over_the_run() {
        let w = SeqWindow::new(64);
        for s in [3, 2, 5] {
            assert_eq!(w.begin(s).unwrap(), Admit::Fresh);
            assert!(w.complete(s));
        }
        assert_eq!(w.watermark(), 0);
        assert_eq!(w.begin(1).unwrap(), Admit::Fresh);
        assert!(w.complete(1));
        assert_eq!(w.watermark(), 3);
        assert_eq!(w.done_above_watermark(), vec![5]);
        assert_eq!(w.begin(4).unwrap(), Admit::Fresh);
        assert!(w.release(4));
        assert_eq!(w.begin(4).unwrap(), Admit::Fresh);
        assert!(w.complete(4));
        assert_eq!(w.watermark(), 5);
    }

    #[test]
    fn overrun_is_an_error_not_a_duplicate_and_floor_unsticks_holes() {
        let w = SeqWindow::new(64);
        assert!(matches!(
            w.begin(64),
            Err(DedupError::WindowOverrun { seq: 64, .. })
        ));
        assert_eq!(w.begin(63).unwrap(), Admit::Fresh);
        w.advance_floor(100);
        assert_eq!(w.watermark(), 99);
        assert_eq!(w.begin(63).unwrap(), Admit::Duplicate);
        w.complete(63); // settled by the floor either way
        assert_eq!(w.begin(63).unwrap(), Admit::Duplicate);
        assert_eq!(w.begin(150).unwrap(), Admit::Fresh);
        assert!(matches!(
            w.begin(0),
            Err(DedupError::SeqOutOfRange { seq: 0 })
        ));
        assert!(matches!(
            w.begin(SeqWindow::MAX_SEQ + 1),
            Err(DedupError::SeqOutOfRange { .. })
        ));
    }

    #[test]
    fn ring_reuse_after_many_laps_keeps_exact_answers() {
        let w = SeqWindow::new(64);
        for s in 1..=10_000u64 {
            assert_eq!(w.begin(s).unwrap(), Admit::Fresh, "seq {s}");
            assert!(w.complete(s));
            assert_eq!(w.begin(s).unwrap(), Admit::Duplicate);
        }
        assert_eq!(w.watermark(), 10_000);
    }
}
