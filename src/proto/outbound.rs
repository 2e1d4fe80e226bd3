//! The sending half of one stream `(this node → target, channel)`.
//!
//! Owns sequence numbers, the in-flight window, retransmission timers and the floors
//! advertised to the receiver. Pure state: every input carries `now`, every output is
//! polled. Must not do IO, read a clock, or know about other streams.
//!
//! # Credit
//!
//! With a receiver that grants credit (protocol version 2), a message's *first*
//! transmission waits until its seq is within the credit; retransmissions never wait
//! (the message was already counted against an earlier grant). Grants arrive on acks;
//! before the first one a stream may send [`INITIAL_CREDIT`] messages. A stream that
//! is blocked on credit sends a [`crate::wire::CreditProbe`] (no message) after a probe
//! timeout (one RTO, doubling per probe up to [`MAX_PROBE_INTERVAL`]); the receiver
//! answers with its current grant, so a lost credit update cannot stall a stream for
//! good (TCP's persist timer) and the stream never goes past its credit.
//!
//! # Held messages
//!
//! A version-2 receiver also reports the seq up to which it holds every message
//! ([`crate::wire::Ack::received`]): a message that waits in the receiver's queue or in
//! its handler is not lost, so its retransmission timer only re-checks it every
//! `retry.backoff_cap` (a keep-alive in case the receiver drops it, e.g. its receiver
//! goes away) instead of retransmitting it every RTO. A nack, a reconnect and a
//! receiver restart retransmit as before. With a version-1 receiver there is no credit; the node's window
//! (`max_in_flight`) is the only bound.
//!
//! # Quiet streams
//!
//! A retransmission timer that expires while the receiver settled something (or
//! advanced its held watermark) less than one RTO ago does not retransmit: it waits
//! until the stream has been quiet for a whole RTO. A receiver that keeps acking is
//! working through a queue, and the unacked messages behind it are far more likely
//! queued than lost; retransmitting them is what a stalled, loaded machine turned into
//! thousands of spurious retransmissions (RFC 5682's F-RTO avoids the same). The wait
//! is bounded: a lost message holds the receiver's cumulative ack, so the stream runs
//! out of credit at most one window later, goes quiet, and the timer fires. It does
//! not wait at all for a message that was *overtaken* — a later seq of the stream was
//! acked while it is neither acked nor held by the receiver (over one connection
//! frames arrive in order, so it was lost; on an unordered channel this is how a loss
//! shows while the rest of the stream keeps flowing). Nacks, reconnects and
//! deadlines do not wait.

use crate::id::{ChannelId, Guarantee, MessageId};
use crate::proto::config::ProtoConfig;
use crate::retry::{Backoff, GiveUp, RetryBudget, RttEstimator};
use crate::wire::{Data, SeqRange};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// Messages a stream may send to a credit-granting receiver before its first grant.
/// Part of protocol version 2: receivers accept at least this many.
pub const INITIAL_CREDIT: u64 = 256;

/// Data frames a sender may put on a new connection before the receiver's first
/// [`crate::wire::NodeCredit`] (protocol version 3).
pub const INITIAL_NODE_CREDIT: u64 = 1024;

/// How far past its grants a receiver still accepts a stream's messages (a sender
/// still using the previous receiver run's grants after a restart); beyond it frames
/// are dropped unacked and counted.
pub const CREDIT_SLACK: u64 = 256;

/// Timer generation marking a deadline armed while a message waits for credit (it has
/// no retransmission timer yet). Retransmission timers never use it.
const WAITING: u32 = u32::MAX;

/// Longest wait between two credit probes of a blocked stream.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(5);

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
    /// The receiver refused `seq` for good (protocol version 3).
    Rejected {
        /// Stream seq.
        seq: u64,
        /// The receiver's reason.
        reason: crate::wire::RejectReason,
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
    /// A deadline timer is armed for it while it waits for node credit.
    waiting_armed: bool,
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
    /// Highest seq the receiver lets us have transmitted; `None`: the receiver grants
    /// no credit (protocol version 1).
    credit: Option<u64>,
    /// First transmissions waiting for credit, ascending.
    blocked: VecDeque<u64>,
    /// When to probe a blocked stream, and how many probes since credit last grew.
    probe_due: Option<Instant>,
    probes: u32,
    /// A credit probe is owed to the receiver.
    probe_owed: bool,
    credit_waits: u64,
    credit_probes: u64,
    /// The receiver holds every seq `<= held` (not lost, just not finished yet).
    held: u64,
    /// Re-check interval of a held message (the retry policy's backoff cap).
    keepalive: Duration,
    /// Payload type fingerprint of the latest send (see `wire::Data::schema`).
    schema: u32,
    /// Times `poll_transmit` stopped for lack of node credit.
    node_waits: u64,
    /// Credit probes sent since the receiver last acked anything.
    unanswered_probes: u32,
    /// When an ack last settled a message or advanced `held`: see "Quiet streams".
    last_progress: Option<Instant>,
    /// Highest seq an ack settled: a message below it that is neither settled nor
    /// held was overtaken, so it is lost rather than queued ("Quiet streams").
    highest_acked: u64,
}

impl OutboundStream {
    pub(crate) fn new(
        origin: crate::id::Origin,
        channel: ChannelId,
        guarantee: Guarantee,
        config: &ProtoConfig,
        seed: u64,
        now: Instant,
        credit: Option<u64>,
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
            credit,
            blocked: VecDeque::new(),
            probe_due: None,
            probes: 0,
            probe_owed: false,
            credit_waits: 0,
            credit_probes: 0,
            held: 0,
            keepalive: config.retry.backoff_cap,
            schema: 0,
            node_waits: 0,
            unanswered_probes: 0,
            last_progress: None,
            highest_acked: 0,
        }
    }

    /// First transmissions that had to wait for credit, and probes sent.
    pub(crate) fn credit_counters(&self) -> (u64, u64) {
        (self.credit_waits, self.credit_probes)
    }

    /// The receiver grants credit (`Some`: the grant to start from) or not (`None`,
    /// a version-1 peer: everything blocked goes out).
    pub(crate) fn set_credit(&mut self, credit: Option<u64>) {
        self.credit = credit;
        self.unblock();
    }

    /// The grant a fresh receiver run starts this stream with.
    pub(crate) fn initial_credit(&self) -> u64 {
        (self.base - 1).saturating_add(INITIAL_CREDIT)
    }

    /// Move blocked seqs the credit now covers back to the front of the queue, in order.
    fn unblock(&mut self) {
        let limit = self.credit.unwrap_or(u64::MAX);
        let mut n = 0;
        while self.blocked.get(n).is_some_and(|s| *s <= limit) {
            n += 1;
        }
        for seq in self.blocked.drain(..n).rev() {
            self.transmit.push_front(seq);
        }
        if self.blocked.is_empty() {
            self.probe_due = None;
        }
    }

    pub(crate) fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    /// Total retransmissions so far.
    /// The last seq assigned on the stream (0: none).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

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
        schema: u32,
    ) -> u64 {
        self.schema = schema;
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
            waiting_armed: false,
        }));
        self.transmit.push_back(seq);
        seq
    }

    /// Next frame to put on the wire, if `budget` (the node-level credit left, in data
    /// frames) allows one; a frame returned used one unit of it.
    pub(crate) fn poll_transmit(&mut self, now: Instant, budget: &mut u64) -> Option<Data> {
        let amo = self.guarantee == Guarantee::AtMostOnce;
        while let Some(&seq) = self.transmit.front() {
            if *budget == 0 {
                // Waits for node credit; a first transmission's deadline still runs.
                self.arm_waiting(seq);
                self.node_waits += 1;
                return None;
            }
            self.transmit.pop_front();
            let first = self
                .index(seq)
                .and_then(|i| self.slots[i].as_ref())
                .is_some_and(|m| m.attempts == 0);
            if first && self.credit.is_some_and(|c| seq > c) {
                // Waits for credit. Blocked seqs stay ascending: first transmissions
                // are queued in seq order and unblocked in order.
                let at = self.blocked.partition_point(|s| *s < seq);
                self.blocked.insert(at, seq);
                self.credit_waits += 1;
                // Its deadline still runs while it waits (it has no retransmission
                // timer yet): a receiver that never grants credit fails it in time.
                if let Some(d) = self
                    .index(seq)
                    .and_then(|i| self.slots[i].as_ref()?.deadline)
                {
                    self.timers.push(Reverse((d, seq, WAITING)));
                }
                if self.probe_due.is_none() {
                    self.probe_due = Some(now + self.probe_interval());
                }
                continue;
            }
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
                schema: self.schema,
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
                m.timer_gen = next_gen(m.timer_gen);
                self.timers.push(Reverse((due, seq, m.timer_gen)));
            }
            *budget -= 1;
            return Some(frame);
        }
        None
    }

    /// A message not transmitted yet waits (for node credit): arm its deadline once, so
    /// a receiver that never grants credit fails it in time.
    fn arm_waiting(&mut self, seq: u64) {
        let Some(idx) = self.index(seq) else {
            return;
        };
        let Some(m) = self.slots[idx].as_mut() else {
            return;
        };
        if !m.waiting_armed {
            if let Some(d) = m.deadline {
                m.waiting_armed = true;
                self.timers.push(Reverse((d, seq, WAITING)));
            }
        }
    }

    /// Frames are waiting to be transmitted.
    pub(crate) fn has_queued(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// First transmissions and retransmissions that waited for node credit.
    pub(crate) fn node_waits(&self) -> u64 {
        self.node_waits
    }

    /// A credit probe is due: send [`crate::wire::CreditProbe`] for this stream.
    pub(crate) fn take_probe(&mut self) -> bool {
        std::mem::take(&mut self.probe_owed)
    }

    /// Earliest instant at which `handle_timeout` has work (may be early, never late).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((t, _, _))| *t);
        match (timer, self.probe_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn probe_interval(&self) -> Duration {
        self.rtt
            .rto()
            .saturating_mul(1u32 << self.probes.min(16))
            .min(MAX_PROBE_INTERVAL)
    }

    pub(crate) fn poll_event(&mut self) -> Option<OutEvent> {
        self.events.pop_front()
    }

    /// Retransmit or give up on every message whose timer is due; probe a stream blocked
    /// on credit.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.probe_due.is_some_and(|t| t <= now) {
            self.probe_due = None;
            if !self.blocked.is_empty() {
                self.probes = self.probes.saturating_add(1);
                self.credit_probes += 1;
                self.probe_owed = true;
                self.probe_due = Some(now + self.probe_interval());
                self.unanswered_probes = self.unanswered_probes.saturating_add(1);
                if self.guarantee == Guarantee::AtMostOnce && self.unanswered_probes > 2 {
                    // Probes go unanswered: a receiver run that never saw this stream
                    // (it restarted, and what it was sent arrived before its receiver
                    // registered) cannot answer a data-less probe. The oldest blocked
                    // message goes instead, which opens the stream there and brings
                    // its credit back. (A receiver that answers, however busy, resets
                    // the count: its grant is never exceeded this way.)
                    if let (Some(c), Some(&head)) = (self.credit, self.blocked.front()) {
                        self.credit = Some(c.max(head));
                        self.unblock();
                    }
                }
            }
        }
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
            if gen == WAITING {
                // Still waiting for credit (never sent, or a retransmission queued
                // behind node credit) at its deadline: give up.
                if (m.attempts == 0 || m.queued) && m.deadline.is_some_and(|d| now >= d) {
                    self.give_up(seq, GiveUp::Deadline);
                }
                continue;
            }
            if m.timer_gen != gen || m.queued {
                continue; // stale entry
            }
            if m.deadline.is_some_and(|d| now >= d) {
                self.give_up(seq, GiveUp::Deadline);
                continue;
            }
            if seq <= self.held {
                // The receiver has it; only re-check now and then (module docs).
                let mut next = later(now, self.keepalive);
                if let Some(d) = m.deadline {
                    next = next.min(d);
                }
                m.timer_gen = next_gen(m.timer_gen);
                self.timers.push(Reverse((next, seq, m.timer_gen)));
                continue;
            }
            let overtaken = seq < self.highest_acked;
            if let Some(quiet_until) = self.last_progress.map(|p| later(p, self.rtt.rto())) {
                if now < quiet_until && !overtaken {
                    // The receiver settled something within the last RTO: it is
                    // working through its queue, so this message is more likely
                    // queued than lost (module docs, "Quiet streams").
                    let mut next = quiet_until;
                    if let Some(d) = m.deadline {
                        next = next.min(d);
                    }
                    m.timer_gen = next_gen(m.timer_gen);
                    self.timers.push(Reverse((next, seq, m.timer_gen)));
                    continue;
                }
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
                m.timer_gen = next_gen(m.timer_gen);
                self.timers.push(Reverse((next, seq, m.timer_gen)));
                continue;
            }
            self.queue_retransmit(seq);
        }
    }

    /// Apply an ack from the receiver, with the credit it grants (if it grants any).
    pub(crate) fn handle_ack(
        &mut self,
        now: Instant,
        cumulative: u64,
        ranges: &[SeqRange],
        credit: Option<u64>,
        received: u64,
    ) {
        let top = self.next_seq.saturating_sub(1);
        self.unanswered_probes = 0;
        if received.min(top) > self.held {
            self.last_progress = Some(now);
        }
        self.held = self.held.max(received.min(top));
        if let (Some(grant), Some(cur)) = (credit, self.credit) {
            if grant > cur {
                self.credit = Some(grant);
                self.probes = 0;
                self.unblock();
            }
        }
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
        // It is no longer held; neither, for the keep-alive, is anything above it.
        self.held = self.held.min(seq.saturating_sub(1));
        self.queue_retransmit(seq);
    }

    /// The receiver refused `seq` for good: settle it (no RTT sample, no retry budget
    /// earned) and report the reason. A reject for a seq already settled is ignored.
    pub(crate) fn handle_reject(&mut self, seq: u64, reason: crate::wire::RejectReason) {
        let Some(idx) = self.index(seq) else {
            return;
        };
        if self.slots[idx].take().is_some() {
            self.events.push_back(OutEvent::Rejected { seq, reason });
            self.compact();
        }
    }

    /// A connection came (back) up, or the receiver restarted: everything unacked may have
    /// been lost with the old connection, so retransmit it now rather than after an RTO.
    pub(crate) fn handle_reconnect(&mut self) {
        if self.guarantee == Guarantee::AtMostOnce {
            return;
        }
        // Whatever the receiver held may have gone with the connection or the run.
        self.held = 0;
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

    pub(crate) fn id_floor(&self) -> u64 {
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
                self.last_progress = Some(now);
                self.highest_acked = self.highest_acked.max(seq);
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

/// The next retransmission timer generation (never [`WAITING`]).
fn next_gen(gen: u32) -> u32 {
    match gen.wrapping_add(1) {
        WAITING => 0,
        g => g,
    }
}

use crate::retry::later;
