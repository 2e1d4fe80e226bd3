//! [`SeqMap`]: a map keyed by [`SendRef`] laid out for the way a node's open receipts
//! are used: each stream opens its seqs in increasing order and mostly settles them in
//! about that order.
//!
//! The hash map it replaces put consecutive seqs of a stream in random buckets, so with
//! a window of thousands of messages in flight every open and every settle was a cache
//! miss (the receipt map's `remove` was the largest symbol of the effectively-once
//! batch profile, 7 % of all samples; BENCHMARKS.md). Here each stream keeps a *run*:
//! a ring of slots indexed by `seq - base`, so consecutive seqs sit next to each other
//! and the settled prefix is popped off the front.
//!
//! A seq that does not fit its stream's run stays exact in a per-stream spill map: one
//! far from the run, or one that would make the run sparse (a run grows only while it
//! stays within `4 × live + 64` slots, so one receipt left open while thousands after
//! it settle costs a hash entry per later message, as before, not a ring that grows
//! with every send; settles leave empty slots behind until the ends are trimmed, so a
//! run holds at most about the stream's peak window, as the hash map's capacity did).

use super::SendRef;
use crate::id::{ChannelId, NodeId};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;

/// A run may always grow to this many slots, however sparse.
const DENSE_FLOOR: usize = 64;
/// Otherwise it holds at most this many slots per live entry.
const SLOTS_PER_LIVE: usize = 4;

/// Map from [`SendRef`] to `V`, exact like a hash map, stored per stream as runs of
/// consecutive seqs (see the module docs).
#[derive(Debug)]
pub(crate) struct SeqMap<V> {
    streams: FxHashMap<(NodeId, ChannelId), Run<V>>,
    len: usize,
}

#[derive(Debug)]
struct Run<V> {
    /// The seq of `slots[0]`.
    base: u64,
    /// `slots[i]` holds seq `base + i`. Never starts or ends with `None`.
    slots: VecDeque<Option<V>>,
    /// `Some` slots.
    live: usize,
    /// Entries that did not fit the run. A seq is in the run or here, never both.
    spill: FxHashMap<u64, V>,
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        SeqMap {
            streams: FxHashMap::default(),
            len: 0,
        }
    }
}

impl<V> Run<V> {
    fn new() -> Self {
        Run {
            base: 0,
            slots: VecDeque::new(),
            live: 0,
            spill: FxHashMap::default(),
        }
    }

    /// The run's index of `seq`, if the run covers it.
    fn index(&self, seq: u64) -> Option<usize> {
        let i = seq.checked_sub(self.base)?;
        (i < self.slots.len() as u64).then_some(i as usize)
    }

    /// May the run grow to `len` slots?
    fn may_span(&self, len: usize) -> bool {
        len <= DENSE_FLOOR || len <= SLOTS_PER_LIVE.saturating_mul(self.live + 1)
    }

    fn get(&self, seq: u64) -> Option<&V> {
        if let Some(v) = self.index(seq).and_then(|i| self.slots[i].as_ref()) {
            return Some(v);
        }
        if self.spill.is_empty() {
            None
        } else {
            self.spill.get(&seq)
        }
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut V> {
        if let Some(i) = self.index(seq) {
            if self.slots[i].is_some() {
                return self.slots[i].as_mut();
            }
        }
        if self.spill.is_empty() {
            None
        } else {
            self.spill.get_mut(&seq)
        }
    }

    /// Insert; returns the value `seq` had.
    fn insert(&mut self, seq: u64, v: V) -> Option<V> {
        if !self.spill.is_empty() {
            if let Some(old) = self.spill.get_mut(&seq) {
                return Some(std::mem::replace(old, v));
            }
        }
        if self.slots.is_empty() {
            self.base = seq;
            self.slots.push_back(Some(v));
            self.live = 1;
            return None;
        }
        if let Some(i) = self.index(seq) {
            let old = self.slots[i].replace(v);
            if old.is_none() {
                self.live += 1;
            }
            return old;
        }
        let len = self.slots.len() as u64;
        if seq >= self.base {
            // After the run: pad with empty slots up to it.
            let new_len = (seq - self.base).checked_add(1);
            if let Some(n) = new_len.and_then(|l| usize::try_from(l).ok()) {
                if self.may_span(n) {
                    self.slots.resize_with(n - 1, || None);
                    self.slots.push_back(Some(v));
                    self.live += 1;
                    return None;
                }
            }
        } else {
            // Before the run.
            let gap = self.base - seq;
            if let Ok(n) = usize::try_from(gap.saturating_add(len)) {
                if self.may_span(n) {
                    for _ in 1..gap {
                        self.slots.push_front(None);
                    }
                    self.slots.push_front(Some(v));
                    self.base = seq;
                    self.live += 1;
                    return None;
                }
            }
        }
        self.spill.insert(seq, v)
    }

    fn remove(&mut self, seq: u64) -> Option<V> {
        if let Some(i) = self.index(seq) {
            if let Some(v) = self.slots[i].take() {
                self.live -= 1;
                while matches!(self.slots.front(), Some(None)) {
                    self.slots.pop_front();
                    // Wraps only once the run is empty, where `base` means nothing.
                    self.base = self.base.wrapping_add(1);
                }
                while matches!(self.slots.back(), Some(None)) {
                    self.slots.pop_back();
                }
                return Some(v);
            }
        }
        if self.spill.is_empty() {
            None
        } else {
            self.spill.remove(&seq)
        }
    }

    fn is_empty(&self) -> bool {
        self.live == 0 && self.spill.is_empty()
    }
}

impl<V> SeqMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn get(&self, k: &SendRef) -> Option<&V> {
        self.streams.get(&(k.peer, k.channel))?.get(k.seq)
    }

    pub(crate) fn get_mut(&mut self, k: &SendRef) -> Option<&mut V> {
        self.streams.get_mut(&(k.peer, k.channel))?.get_mut(k.seq)
    }

    /// Insert; returns the value `k` had.
    pub(crate) fn insert(&mut self, k: SendRef, v: V) -> Option<V> {
        let old = self
            .streams
            .entry((k.peer, k.channel))
            .or_insert_with(Run::new)
            .insert(k.seq, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, k: &SendRef) -> Option<V> {
        let key = (k.peer, k.channel);
        let run = self.streams.get_mut(&key)?;
        let v = run.remove(k.seq)?;
        self.len -= 1;
        if run.is_empty() {
            self.streams.remove(&key);
        }
        Some(v)
    }

    /// Every key, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = SendRef> + '_ {
        self.streams.iter().flat_map(|(&(peer, channel), run)| {
            let at = move |seq| SendRef { peer, channel, seq };
            let in_run = run
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_some())
                .map(move |(i, _)| at(run.base + i as u64));
            in_run.chain(run.spill.keys().map(move |&seq| at(seq)))
        })
    }

    /// Take every entry out, in no particular order.
    pub(crate) fn drain(&mut self) -> Vec<(SendRef, V)> {
        let mut all = Vec::with_capacity(self.len);
        for ((peer, channel), run) in self.streams.drain() {
            let at = |seq| SendRef { peer, channel, seq };
            for (i, slot) in run.slots.into_iter().enumerate() {
                if let Some(v) = slot {
                    all.push((at(run.base + i as u64), v));
                }
            }
            all.extend(run.spill.into_iter().map(|(seq, v)| (at(seq), v)));
        }
        self.len = 0;
        all
    }

    /// Slots held by the runs (filled or not) and entries spilled, for the tests'
    /// memory bound.
    #[cfg(test)]
    fn footprint(&self) -> (usize, usize) {
        self.streams.values().fold((0, 0), |(slots, spilled), r| {
            (slots + r.slots.len(), spilled + r.spill.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(peer: u64, channel: u32, seq: u64) -> SendRef {
        SendRef {
            peer: NodeId(peer),
            channel: ChannelId(channel),
            seq,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32, u64, u32),
        Remove(u64, u32, u64),
        Get(u64, u32, u64),
    }

    /// Seqs mostly near each other (the run), sometimes far (the spill) or huge.
    fn seq() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => 0u64..200,
            1 => 0u64..100_000,
            1 => (u64::MAX - 3)..=u64::MAX,
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let peer = 1u64..3;
        let ch = 1u32..3;
        prop_oneof![
            4 => (peer.clone(), ch.clone(), seq(), any::<u32>()).prop_map(|(p, c, s, v)| Op::Insert(p, c, s, v)),
            3 => (peer.clone(), ch.clone(), seq()).prop_map(|(p, c, s)| Op::Remove(p, c, s)),
            1 => (peer, ch, seq()).prop_map(|(p, c, s)| Op::Get(p, c, s)),
        ]
    }

    proptest! {
        /// Property: `SeqMap` answers every insert, remove, get, len, keys and drain
        /// exactly as a `HashMap<SendRef, V>` does, whatever the order of seqs.
        #[test]
        fn seqmap_behaves_as_a_hash_map(ops in proptest::collection::vec(op(), 1..400)) {
            let mut m = SeqMap::default();
            let mut model: HashMap<SendRef, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(p, c, s, v) => {
                        prop_assert_eq!(m.insert(key(p, c, s), v), model.insert(key(p, c, s), v));
                    }
                    Op::Remove(p, c, s) => {
                        prop_assert_eq!(m.remove(&key(p, c, s)), model.remove(&key(p, c, s)));
                    }
                    Op::Get(p, c, s) => {
                        prop_assert_eq!(m.get(&key(p, c, s)), model.get(&key(p, c, s)));
                        if let Some(v) = m.get_mut(&key(p, c, s)) {
                            *v = v.wrapping_add(1);
                            *model.get_mut(&key(p, c, s)).unwrap() = *v;
                        }
                    }
                }
                prop_assert_eq!(m.len(), model.len());
                prop_assert_eq!(m.is_empty(), model.is_empty());
            }
            let mut keys: Vec<SendRef> = m.keys().collect();
            keys.sort_by_key(|k| (k.peer, k.channel, k.seq));
            let mut want: Vec<SendRef> = model.keys().copied().collect();
            want.sort_by_key(|k| (k.peer, k.channel, k.seq));
            prop_assert_eq!(keys, want);
            let mut all = m.drain();
            all.sort_by_key(|(k, _)| (k.peer, k.channel, k.seq));
            let mut want: Vec<(SendRef, u32)> = model.into_iter().collect();
            want.sort_by_key(|(k, _)| (k.peer, k.channel, k.seq));
            prop_assert_eq!(all, want);
            prop_assert!(m.is_empty());
            prop_assert!(m.streams.is_empty(), "empty streams are dropped");
        }
    }

    #[test]
    fn in_order_sends_and_settles_stay_in_the_run() {
        let mut m = SeqMap::default();
        for s in 1..=10_000u64 {
            assert_eq!(m.insert(key(1, 1, s), s), None);
            if s > 4_000 {
                assert_eq!(m.remove(&key(1, 1, s - 4_000)), Some(s - 4_000));
            }
        }
        assert_eq!(m.len(), 4_000);
        assert_eq!(m.footprint(), (4_000, 0), "dense: no spill, no empty slots");
    }

    /// One receipt left open while 100 000 later ones open and settle: the ring stays
    /// within its bound (4 slots per live entry + 64) and the rest spills, exactly.
    #[test]
    fn one_stuck_receipt_does_not_grow_the_run_with_every_send() {
        let mut m = SeqMap::default();
        m.insert(key(1, 1, 1), 0u64);
        for s in 2..=100_000u64 {
            m.insert(key(1, 1, s), s);
            if s > 101 {
                assert_eq!(m.remove(&key(1, 1, s - 100)), Some(s - 100));
            }
        }
        assert_eq!(m.len(), 101);
        let (slots, spilled) = m.footprint();
        assert!(slots <= SLOTS_PER_LIVE * 102 + DENSE_FLOOR, "{slots} slots");
        assert!(spilled <= 101, "{spilled} spilled");
        assert_eq!(m.get(&key(1, 1, 1)), Some(&0));
        assert_eq!(m.remove(&key(1, 1, 1)), Some(0));
        for s in 99_901..=100_000u64 {
            assert_eq!(m.remove(&key(1, 1, s)), Some(s));
        }
        assert!(m.is_empty());
        assert!(m.streams.is_empty());
    }
}
