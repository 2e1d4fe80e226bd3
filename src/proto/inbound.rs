//! The receiving half of one stream `(origin → this node, channel)`.
//!
//! Owns stream-level bookkeeping: which seqs are done, in progress, or buffered for
//! ordered delivery, and the acks owed to the sender. Message-ID dedup (hint replays,
//! application keys, restarts) is the endpoint's job through [`crate::dedup`]; this
//! type only stops retransmissions of the same stream seq from being delivered twice.
//! Pure state, no IO, no clock.

use crate::id::{ChannelId, Guarantee, Origin};
use crate::wire::{Ack, Data, SeqRange};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

/// What became of an arriving frame at the stream level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// New: the frame (and possibly buffered successors) was pushed to `ready`.
    Ready,
    /// Already done (an ack is re-sent), or below the sender's floor.
    Duplicate,
    /// Same seq already handed to the application and not finished.
    InProgress,
    /// Held for ordered delivery until its predecessors arrive.
    Buffered,
    /// Ordered-delivery buffer is full; dropped without ack (the sender retransmits).
    BufferFull,
}

/// Receiving half of a stream. For each arriving `Data`: `on_data`, then process what it
/// pushed to `ready`; later `complete` / `fail` each ready seq; `poll_ack(now)` yields
/// the ack frame when due; `ack_deadline` tells when.
#[derive(Debug)]
pub(crate) struct InboundStream {
    origin: Origin,
    channel: ChannelId,
    cumulative: u64,
    done: BTreeSet<u64>,
    in_progress: HashSet<u64>,
    pending_ack: Vec<SeqRange>,
    ack_due: Option<Instant>,
    ack_delay: Duration,
    max_ack_ranges: usize,
    ordered: bool,
    next_deliver: u64,
    reorder: BTreeMap<u64, Data>,
    max_reorder: usize,
    /// Last id floor passed to dedup, so it is only called when the floor moves.
    pub(crate) last_id_floor: u64,
}

impl InboundStream {
    pub(crate) fn new(
        origin: Origin,
        channel: ChannelId,
        ordered: bool,
        ack_delay: Duration,
        max_ack_ranges: usize,
        max_reorder: usize,
    ) -> Self {
        InboundStream {
            origin,
            channel,
            cumulative: 0,
            done: BTreeSet::new(),
            in_progress: HashSet::new(),
            pending_ack: Vec::new(),
            ack_due: None,
            ack_delay,
            max_ack_ranges: max_ack_ranges.max(1),
            ordered,
            next_deliver: 1,
            reorder: BTreeMap::new(),
            max_reorder,
            last_id_floor: 0,
        }
    }

    /// Stream-level admission of one frame. Deliverable frames (in order, when ordered)
    /// are appended to `ready` and marked in progress.
    pub(crate) fn on_data(&mut self, now: Instant, data: Data, ready: &mut Vec<Data>) -> Arrival {
        let seq = data.seq;
        let acks = data.guarantee != Guarantee::AtMostOnce;
        self.advance_floor(data.floor, ready);
        if seq <= self.cumulative || self.done.contains(&seq) {
            if acks {
                self.push_ack(now, seq);
            }
            return Arrival::Duplicate;
        }
        if self.in_progress.contains(&seq) {
            return Arrival::InProgress;
        }
        if self.ordered && seq > self.next_deliver {
            if self.reorder.contains_key(&seq) {
                return Arrival::Buffered;
            }
            if self.reorder.len() >= self.max_reorder {
                return Arrival::BufferFull;
            }
            self.reorder.insert(seq, data);
            return Arrival::Buffered;
        }
        let advance = self.ordered && seq == self.next_deliver;
        self.in_progress.insert(seq);
        ready.push(data);
        if advance {
            self.next_deliver += 1;
            self.drain_ordered(ready);
        }
        Arrival::Ready
    }

    /// The application finished `seq`: it is done and (unless at-most-once) acked.
    pub(crate) fn complete(&mut self, now: Instant, seq: u64, ack: bool) {
        self.in_progress.remove(&seq);
        if seq > self.cumulative {
            self.done.insert(seq);
            while self.done.first() == Some(&(self.cumulative + 1)) {
                self.done.pop_first();
                self.cumulative += 1;
            }
        }
        if ack {
            self.push_ack(now, seq);
        }
    }

    /// `seq` was not processed (nacked, dropped, refused): a retransmission may deliver it.
    pub(crate) fn fail(&mut self, seq: u64) {
        self.in_progress.remove(&seq);
    }

    /// When the owed ack must go out, if one is owed.
    pub(crate) fn ack_deadline(&self) -> Option<Instant> {
        self.ack_due
    }

    /// The ack frame, if one is owed and due at `now`.
    pub(crate) fn poll_ack(&mut self, now: Instant) -> Option<Ack> {
        match self.ack_due {
            Some(due) if due <= now => {}
            _ => return None,
        }
        self.ack_due = None;
        let cumulative = self.cumulative;
        let ranges: Vec<SeqRange> = self
            .pending_ack
            .drain(..)
            .filter(|r| r.end > cumulative)
            .map(|r| SeqRange {
                start: r.start.max(cumulative + 1),
                end: r.end,
            })
            .collect();
        Some(Ack {
            channel: self.channel,
            incarnation: self.origin.incarnation,
            cumulative,
            ranges,
        })
    }

    fn advance_floor(&mut self, floor: u64, ready: &mut Vec<Data>) {
        let settled = floor.saturating_sub(1);
        if settled > self.cumulative {
            self.cumulative = settled;
            while self.done.first().is_some_and(|s| *s <= settled) {
                self.done.pop_first();
            }
            while self.done.first() == Some(&(self.cumulative + 1)) {
                self.done.pop_first();
                self.cumulative += 1;
            }
        }
        if self.ordered && floor > self.next_deliver {
            // The sender settled everything below `floor`; what we hold of it is still
            // delivered (never dropped), in order, and the gap is skipped.
            while let Some(entry) = self.reorder.first_entry() {
                if *entry.key() >= floor {
                    break;
                }
                let data = entry.remove();
                self.in_progress.insert(data.seq);
                ready.push(data);
            }
            self.next_deliver = floor;
            self.drain_ordered(ready);
        }
    }

    fn drain_ordered(&mut self, ready: &mut Vec<Data>) {
        while let Some(data) = self.reorder.remove(&self.next_deliver) {
            self.in_progress.insert(data.seq);
            ready.push(data);
            self.next_deliver += 1;
        }
    }

    fn push_ack(&mut self, now: Instant, seq: u64) {
        match self.pending_ack.last_mut() {
            Some(r) if r.end + 1 == seq => r.end = seq,
            Some(r) if r.start <= seq && seq <= r.end => {}
            _ => self.pending_ack.push(SeqRange {
                start: seq,
                end: seq,
            }),
        }
        let due = if self.pending_ack.len() >= self.max_ack_ranges {
            now
        } else {
            now.checked_add(self.ack_delay)
                .unwrap_or_else(|| crate::retry::far_future(now))
        };
        self.ack_due = Some(self.ack_due.map_or(due, |d| d.min(due)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;
    use bytes::Bytes;

    fn data(seq: u64, floor: u64) -> Data {
        Data {
            channel: ChannelId(0),
            seq,
            floor,
            id_floor: floor,
            id: None,
            guarantee: Guarantee::AtLeastOnce,
            payload: Bytes::from_static(b"x"),
        }
    }

    fn stream(ordered: bool) -> InboundStream {
        let origin = Origin {
            node: NodeId(1),
            incarnation: 9,
        };
        InboundStream::new(origin, ChannelId(0), ordered, Duration::ZERO, 8, 16)
    }

    #[test]
    fn retransmission_of_done_seq_is_duplicate_and_reacked() {
        let now = Instant::now();
        let mut s = stream(false);
        let mut ready = Vec::new();
        assert_eq!(s.on_data(now, data(1, 1), &mut ready), Arrival::Ready);
        assert_eq!(s.on_data(now, data(1, 1), &mut ready), Arrival::InProgress);
        s.complete(now, 1, true);
        let ack = s.poll_ack(now).expect("ack owed");
        assert_eq!(ack.cumulative, 1);
        assert_eq!(s.on_data(now, data(1, 1), &mut ready), Arrival::Duplicate);
        assert_eq!(s.poll_ack(now).expect("re-ack").cumulative, 1);
        assert_eq!(ready.len(), 1);
    }

    #[test]
    fn selective_ranges_above_a_hole() {
        let now = Instant::now();
        let mut s = stream(false);
        let mut ready = Vec::new();
        for seq in [2, 3, 5] {
            s.on_data(now, data(seq, 1), &mut ready);
            s.complete(now, seq, true);
        }
        let ack = s.poll_ack(now).unwrap();
        assert_eq!(ack.cumulative, 0);
        assert_eq!(
            ack.ranges,
            vec![SeqRange { start: 2, end: 3 }, SeqRange { start: 5, end: 5 }]
        );
    }

    #[test]
    fn ordered_holds_until_gap_fills_or_floor_passes() {
        let now = Instant::now();
        let mut s = stream(true);
        let mut ready = Vec::new();
        assert_eq!(s.on_data(now, data(2, 1), &mut ready), Arrival::Buffered);
        assert_eq!(s.on_data(now, data(3, 1), &mut ready), Arrival::Buffered);
        assert!(ready.is_empty());
        assert_eq!(s.on_data(now, data(1, 1), &mut ready), Arrival::Ready);
        assert_eq!(ready.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2, 3]);
        ready.clear();
        // 4 is settled by the sender (floor 5): 5 is deliverable at once.
        assert_eq!(s.on_data(now, data(6, 5), &mut ready), Arrival::Buffered);
        assert_eq!(s.on_data(now, data(5, 5), &mut ready), Arrival::Ready);
        assert_eq!(ready.iter().map(|d| d.seq).collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn failed_seq_can_be_delivered_again() {
        let now = Instant::now();
        let mut s = stream(false);
        let mut ready = Vec::new();
        s.on_data(now, data(1, 1), &mut ready);
        s.fail(1);
        assert_eq!(s.on_data(now, data(1, 1), &mut ready), Arrival::Ready);
        assert_eq!(ready.len(), 2);
    }
}
