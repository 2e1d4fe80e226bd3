//! The sending half of one stream `(this node → target, channel)`.
//!
//! Owns sequence numbers, the in-flight window, retransmission timers and the floors
//! advertised to the receiver. Pure state: every input carries `now`, every output is
//! polled. Must not do IO, read a clock, or know about other streams.

use crate::id::{ChannelId, Guarantee, MessageId};
use crate::proto::config::ProtoConfig;
use crate::retry::{Backoff, GiveUp, RetryBudget, RttEstimator};
use crate::wire::{Data, SeqRange};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// Something the stream reports to its owner.
#[derive(Debug)]
pub(crate) enum OutEvent {
    /// The receiver acknowledged `seq` (for at-most-once: it was transmitted).
    Settled {
        /// Stream seq.
        seq: u64,
    },
    /// The stream gave up on `seq`; the message is handed back for handoff or failure.
    GaveUp {
        /// Stream seq.
        seq: u64,
        /// Why.
        reason: GiveUp,
        /// The message, so it can be stored as a hint.
        payload: Bytes,
        /// Its dedup identity.
        id: MessageId,
        /// How many times it was transmitted.
        attempts: u32,
    },
}

/// One unacknowledged message.
#[derive(Debug)]
struct InFlight {
    payload: Bytes,
    /// `None`: the implicit `Seq { origin, channel, seq }`.
    id: Option<MessageId>,
    last_sent: Option<Instant>,
    deadline: Option<Instant>,
    attempts: u32,
    /// Generation of the armed timer; a popped timer entry with another value is stale.
    timer_gen: u32,
    /// Waiting in the transmit queue.
    queued: bool,
}

/// Sending half of a stream. Call order for the owner: `send` / `handle_ack` /
/// `handle_nack` / `handle_timeout` / `handle_reconnect` as inputs arrive, then drain
/// `poll_transmit` and `poll_event`, then arm a timer for `poll_timeout`.
#[derive(Debug)]
pub(crate) struct OutboundStream {
    channel: ChannelId,
    origin: crate::id::Origin,
    guarantee: Guarantee,
    next_seq: u64,
    /// Seq of `slots[0]`; everything below is settled.
    base: u64,
    slots: VecDeque<Option<InFlight>>,
    /// Implicit-id seqs that were handed off and whose hints are not yet delivered: they
    /// hold the id floor down.
    hinted: BTreeSet<u64>,
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    transmit: VecDeque<u64>,
    rtt: RttEstimator,
    backoff: Backoff,
    budget: RetryBudget,
    max_attempts: Option<u32>,
    deadline: Option<Duration>,
    amo_slack: u64,
    events: VecDeque<OutEvent>,
    retransmits: u64,
    /// Slots freed at the front since the last `take_opened`.
    opened: u64,
    /// RTT sample from the newest never-retransmitted message settled by the current
    /// ack frame: one estimator update per ack, not per message.
    sample: Option<Duration>,
}

impl OutboundStream {
    pub(crate) fn new(
        origin: crate::id::Origin,
        channel: ChannelId,
        guarantee: Guarantee,
        config: &ProtoConfig,
        seed: u64,
        now: Instant,
    ) -> Self {
        OutboundStream {
            channel,
            origin,
            guarantee,
            next_seq: 1,
            base: 1,
            slots: VecDeque::new(),
            hinted: BTreeSet::new(),
            timers: BinaryHeap::new(),
            transmit: VecDeque::new(),
            rtt: RttEstimator::new(config.rtt),
            backoff: Backoff::new(&config.retry, seed),
            budget: RetryBudget::new(config.retry_budget, now),
            max_attempts: config.retry.max_attempts,
            deadline: config.retry.deadline,
            amo_slack: config.amo_reorder_slack,
            events: VecDeque::new(),
            retransmits: 0,
            opened: 0,
            sample: None,
        }
    }

    pub(crate) fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    /// Total retransmissions so far.
    pub(crate) fn retransmits(&self) -> u64 {
        self.retransmits
    }

    /// Queue a new message; returns its stream seq. The caller bounds the span (the
    /// node's window semaphore does).
    pub(crate) fn send(
        &mut self,
        now: Instant,
        payload: Bytes,
        id: Option<MessageId>,
        deadline: Option<Duration>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        // At-most-once keeps nothing past transmission: no budget, no deadline.
        let deadline = if self.guarantee == Guarantee::AtMostOnce {
            None
        } else {
            self.budget.deposit(now);
            deadline.or(self.deadline).map(|d| later(now, d))
        };
        self.slots.push_back(Some(InFlight {
            payload,
            id,
            last_sent: None,
            deadline,
            attempts: 0,
            timer_gen: 0,
            queued: true,
        }));
        self.transmit.push_back(seq);
        seq
    }

    /// Next frame to put on the wire.
    pub(crate) fn poll_transmit(&mut self, now: Instant) -> Option<Data> {
        let amo = self.guarantee == Guarantee::AtMostOnce;
        while let Some(seq) = self.transmit.pop_front() {
            let (floor, id_floor) = if amo {
                let f = seq.saturating_sub(self.amo_slack).max(1);
                (f, f)
            } else {
                (self.base, self.id_floor())
            };
            let Some(idx) = self.index(seq) else {
                continue; // settled while queued
            };
            let Some(m) = self.slots[idx].as_mut() else {
                continue;
            };
            m.queued = false;
            m.attempts += 1;
            m.last_sent = Some(now);
            let frame = Data {
                channel: self.channel,
                seq,
                floor,
                id_floor,
                id: m.id,
                guarantee: self.guarantee,
                payload: m.payload.clone(),
            };
            if amo {
                self.settle(seq, None);
            } else {
                let rto = self.rtt.rto();
                let mut due = later(now, self.backoff.delay(rto, m.attempts - 1));
                if let Some(d) = m.deadline {
                    due = due.min(d);
                }
                m.timer_gen = m.timer_gen.wrapping_add(1);
                self.timers.push(Reverse((due, seq, m.timer_gen)));
            }
            return Some(frame);
        }
        None
    }

    /// Earliest instant at which `handle_timeout` has work (may be early, never late).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _, _))| *t)
    }

    pub(crate) fn poll_event(&mut self) -> Option<OutEvent> {
        self.events.pop_front()
    }

    /// Retransmit or give up on every message whose timer is due.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((due, seq, gen))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            let Some(idx) = self.index(seq) else {
                continue;
            };
            let Some(m) = self.slots[idx].as_mut() else {
                continue;
            };
            if m.timer_gen != gen || m.queued {
                continue; // stale entry
            }
            if m.deadline.is_some_and(|d| now >= d) {
                self.give_up(seq, GiveUp::Deadline);
                continue;
            }
            if self.max_attempts.is_some_and(|max| m.attempts >= max) {
                self.give_up(seq, GiveUp::MaxAttempts);
                continue;
            }
            if !self.budget.try_withdraw(now) {
                // Over the retry budget: defer (never drop) the retry by one RTO.
                let mut next = later(now, self.rtt.rto());
                if let Some(d) = m.deadline {
                    next = next.min(d);
                }
                m.timer_gen = m.timer_gen.wrapping_add(1);
                self.timers.push(Reverse((next, seq, m.timer_gen)));
                continue;
            }
            self.queue_retransmit(seq);
        }
    }

    /// Apply an ack from the receiver.
    pub(crate) fn handle_ack(&mut self, now: Instant, cumulative: u64, ranges: &[SeqRange]) {
        let top = self.next_seq.saturating_sub(1);
        let mut seq = self.base;
        while seq <= cumulative.min(top) {
            self.settle(seq, Some(now));
            seq += 1;
        }
        for r in ranges {
            if r.end < r.start {
                continue;
            }
            let mut s = r.start.max(self.base);
            while s <= r.end.min(top) {
                self.settle(s, Some(now));
                s += 1;
            }
        }
        if let Some(rtt) = self.sample.take() {
            self.rtt.on_sample(rtt);
        }
    }

    /// The receiver failed `seq`: retransmit it promptly.
    pub(crate) fn handle_nack(&mut self, seq: u64) {
        self.queue_retransmit(seq);
    }

    /// A connection came (back) up, or the receiver restarted: everything unacked may have
    /// been lost with the old connection, so retransmit it now rather than after an RTO.
    pub(crate) fn handle_reconnect(&mut self) {
        if self.guarantee == Guarantee::AtMostOnce {
            return;
        }
        let seqs: Vec<u64> = (self.base..self.next_seq)
            .filter(|s| {
                self.index(*s)
                    .and_then(|i| self.slots[i].as_ref())
                    .is_some_and(|m| !m.queued && m.attempts > 0)
            })
            .collect();
        for s in seqs {
            self.queue_retransmit(s);
        }
    }

    /// Unsettled messages: seq, payload and dedup identity.
    pub(crate) fn unsettled(&self) -> impl Iterator<Item = (u64, Bytes, MessageId)> + '_ {
        let base = self.base;
        self.slots.iter().enumerate().filter_map(move |(i, slot)| {
            let m = slot.as_ref()?;
            let seq = base + i as u64;
            Some((seq, m.payload.clone(), self.id_of(seq, m.id)))
        })
    }

    /// Remove an unsettled message without an event (it was handed off). Returns its
    /// dedup identity, or `None` if it was not there.
    pub(crate) fn take(&mut self, seq: u64) -> Option<MessageId> {
        let idx = self.index(seq)?;
        let m = self.slots[idx].take()?;
        self.compact();
        Some(self.id_of(seq, m.id))
    }

    fn id_of(&self, seq: u64, explicit: Option<MessageId>) -> MessageId {
        explicit.unwrap_or(MessageId::Seq {
            origin: self.origin,
            channel: self.channel,
            seq,
        })
    }

    /// `seq`, carrying `id`, left the stream as a hint. If `id` is the stream's own
    /// implicit id it stays unsettled for dedup (holds the id floor) until
    /// [`Self::hint_done`]; explicit ids (keys, replays) do not touch the floor.
    pub(crate) fn mark_hinted(&mut self, seq: u64, id: MessageId) {
        if id == self.id_of(seq, None) {
            self.hinted.insert(seq);
        }
    }

    /// The hint for `seq` was delivered or dropped for good.
    pub(crate) fn hint_done(&mut self, seq: u64) {
        self.hinted.remove(&seq);
    }

    fn id_floor(&self) -> u64 {
        match self.hinted.first() {
            Some(&h) => h.min(self.base),
            None => self.base,
        }
    }

    fn queue_retransmit(&mut self, seq: u64) {
        let Some(idx) = self.index(seq) else {
            return;
        };
        if let Some(m) = self.slots[idx].as_mut() {
            if !m.queued {
                m.queued = true;
                self.transmit.push_back(seq);
                self.retransmits += 1;
            }
        }
    }

    fn give_up(&mut self, seq: u64, reason: GiveUp) {
        let Some(idx) = self.index(seq) else {
            return;
        };
        if let Some(m) = self.slots[idx].take() {
            let id = self.id_of(seq, m.id);
            self.events.push_back(OutEvent::GaveUp {
                seq,
                reason,
                payload: m.payload,
                id,
                attempts: m.attempts,
            });
            self.compact();
        }
    }

    fn settle(&mut self, seq: u64, acked_at: Option<Instant>) {
        let Some(idx) = self.index(seq) else {
            return;
        };
        if let Some(m) = self.slots[idx].take() {
            if let Some(now) = acked_at {
                // Karn's rule: only never-retransmitted messages give RTT samples.
                if let (1, Some(sent)) = (m.attempts, m.last_sent) {
                    self.sample = Some(now.saturating_duration_since(sent));
                }
                // An ack is evidence the target keeps up: it earns retry budget too, so
                // a target back from a partition gets its backlog retried at the pace
                // it acks (like slow start), while a silent or struggling one does not.
                self.budget.deposit(now);
            }
            self.events.push_back(OutEvent::Settled { seq });
            self.compact();
        }
    }

    fn compact(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
            self.opened += 1;
        }
    }

    /// Window slots freed since the last call.
    pub(crate) fn take_opened(&mut self) -> u64 {
        std::mem::take(&mut self.opened)
    }

    fn index(&self, seq: u64) -> Option<usize> {
        let idx = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        (idx < self.slots.len()).then_some(idx)
    }
}

/// `now + d`, or a far-future instant ("never") where that overflows the clock: a
/// configured duration may be as long as `Duration::MAX`.
fn later(now: Instant, d: std::time::Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| crate::retry::far_future(now))
}
