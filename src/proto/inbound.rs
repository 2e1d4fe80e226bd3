//! The receiving half of one stream `(origin → this node, channel)`.
//!
//! Owns stream-level bookkeeping: which seqs are done, in progress, or buffered for
//! ordered delivery, and the acks owed to the sender. Message-ID dedup (hint replays,
//! application keys, restarts) is the endpoint's job through [`crate::dedup`]; this
//! type only stops retransmissions of the same stream seq from being delivered twice.
//! Pure state, no IO, no clock.
//!
//! # Credit
//!
//! The stream grants its sender credit (protocol version 2): the highest seq the
//! sender may have transmitted. For acked streams it is `cumulative + window`, so at
//! most `window` of the stream's messages are ever between "not yet done" and "may be
//! sent" — queued for the application, held for ordering, being processed, or on the
//! way. At-most-once streams have no cumulative progress worth the name (a lost frame
//! is a permanent hole), so their grant is `highest seen + window - outstanding`.
//! Grants only grow. See [`crate::proto::ProtoConfig::stream_credit`].
//!
//! # Ordered delivery contract
//!
//! On an ordered stream:
//! 1. **First deliveries follow send order.** The application is handed message `n`
//!    for the first time before `n + 1`, with gaps only where the sender settled a
//!    message without delivering it (given up, or handed off: a hint is replayed later
//!    on the replaying node's own stream).
//! 2. **A redelivery comes before anything not yet handed out.** When the application
//!    nacks or drops `n`, the stream hands out no message it had not handed out yet
//!    until `n` has been delivered again; messages handed out before the nack (up to
//!    the credit window) may be seen before the redelivery.
//! 3. Every refusal that happens before the application saw a message — no receiver,
//!    a dedup refusal, a duplicate of a message still being processed elsewhere —
//!    rewinds the stream to that message, so rule 1 holds for it too.
//! 4. A message refused for good (dead-lettered, undecodable, a retired stream: see
//!    [`crate::wire::RejectReason`]) is settled like a processed one: the stream moves
//!    past it and it is never delivered again.
//!
//! # Rejections
//!
//! A rejected seq counts as done for the cumulative ack, and its reason is kept until
//! the sender's floor passes it: a retransmission of it, or a new connection from the
//! same sender run, gets the reject again (see [`InboundStream::rejections`]). The
//! endpoint sends the reject before any ack that covers the seq, so a sender that reads
//! its connection in order learns the reason before it could take the seq for acked.
//! Across a cut that order can break (the reject lost with the old connection, a later
//! ack queued for the new one), so an ack to a version-3 sender never covers a rejected
//! seq its floor has not passed, and a credit probe (the sender waiting on that seq)
//! gets the stream's rejects again.

use crate::id::{ChannelId, Guarantee, Origin};
use crate::wire::{Ack, Data, RejectReason, SeqRange, MAX_ACK_RANGES, MAX_HELD_RANGES};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What a stream knows of a seq (see [`InboundStream::known_without_receiver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// Settled here.
    Done,
    /// Held here: in a handler.
    Held,
    /// Refused here before, for this reason.
    Rejected(RejectReason),
    /// Not processed and not in a handler.
    Unknown,
}

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
    /// A retransmission of a seq this stream rejected: the reject is owed again.
    Rejected(RejectReason),
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
    /// (Fx-hashed: keys are seqs within the stream's credit window, so a peer cannot
    /// grow a collision chain beyond that window.)
    in_progress: FxHashSet<u64>,
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
    /// Ordered: nacked or dropped seqs awaiting redelivery; while any is held, no seq
    /// not yet handed out is delivered (contract rule 2).
    held: BTreeSet<u64>,
    /// Credit window: messages the stream may have outstanding (see module docs).
    window: u64,
    /// Highest credit granted so far (grants only grow).
    granted: u64,
    /// Highest seq seen (at-most-once grants).
    highest: u64,
    /// At-most-once stream: grants follow consumption, not acks.
    amo: bool,
    /// At-most-once: seqs more than this far below the highest seen are taken as
    /// lost, whatever floor the sender claims (`ProtoConfig::amo_reorder_slack`).
    amo_slack: u64,
    /// At-most-once messages handed to the application and not yet finished.
    unconsumed: u64,
    /// Every seq `<= received` is held here: done, in progress, or buffered.
    received: u64,
    /// `received` as last reported in an ack.
    reported: u64,
    /// Seqs refused for good, with the reason, until the sender's floor passes them.
    rejected: BTreeMap<u64, RejectReason>,
    /// When the kept rejections were last sent again (see `resend_rejections_due`).
    rejects_resent: Option<Instant>,
    /// Seqs the application failed (nacked or dropped), with how many times: the
    /// deliveries so far are one more. Cleared when the seq is done or rejected.
    failures: FxHashMap<u64, u32>,
    /// When the last frame arrived (picks which idle stream makes room for a new one).
    last_arrival: Option<Instant>,
    /// The sender reads held ranges ([`Ack::held`], protocol 5): work them out and
    /// owe an ack for them. Set by the endpoint from the connection's version.
    pub(crate) report_held: bool,
}

/// See [`InboundStream::mark`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamMark {
    cumulative: u64,
    next_deliver: u64,
    granted: u64,
    highest: u64,
}

/// How soon a receiver tells the sender which messages it holds (in its handler or
/// for ordering) when no ack of a finished message has said so: well under the
/// default minimum RTO (200 ms), so a slow handler does not make the sender
/// retransmit what it already has.
pub(crate) const HELD_ACK_DELAY: Duration = Duration::from_millis(20);

/// Shortest time between two re-sends of a stream's kept rejections. (Correctness
/// does not depend on the re-send: an ack never covers a kept rejection. It only
/// lets a sender that lost a reject settle sooner.)
pub(crate) const REJECTS_RESEND_EVERY: Duration = Duration::from_millis(100);

impl InboundStream {
    #[allow(clippy::too_many_arguments)] // the stream's limits, each from `ProtoConfig`
    pub(crate) fn new(
        origin: Origin,
        channel: ChannelId,
        ordered: bool,
        ack_delay: Duration,
        max_ack_ranges: usize,
        max_reorder: usize,
        window: u64,
        amo_slack: u64,
    ) -> Self {
        InboundStream {
            origin,
            channel,
            cumulative: 0,
            done: BTreeSet::new(),
            in_progress: FxHashSet::default(),
            pending_ack: Vec::new(),
            ack_due: None,
            ack_delay,
            max_ack_ranges: max_ack_ranges.max(1),
            ordered,
            next_deliver: 1,
            reorder: BTreeMap::new(),
            max_reorder,
            last_id_floor: 0,
            held: BTreeSet::new(),
            window: window.max(1),
            granted: 0,
            highest: 0,
            amo: false,
            amo_slack,
            unconsumed: 0,
            received: 0,
            reported: 0,
            rejected: BTreeMap::new(),
            rejects_resent: None,
            failures: FxHashMap::default(),
            last_arrival: None,
            report_held: true,
        }
    }

    /// Nothing here is owed to anyone: no message in the application or waiting to be
    /// handed out, no failure or rejection to remember, no ack due. Such a stream can
    /// be dropped and made again by its next frame: the frame's floor says where to
    /// start, as after a receiver restart, and effectively-once dedup lives in
    /// `Dedup`, not here.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_progress.is_empty()
            && self.reorder.is_empty()
            && self.held.is_empty()
            && self.failures.is_empty()
            && self.rejected.is_empty()
            // At-most-once keeps `done` only against transport duplicates, which an
            // honest sender never makes (it never retransmits).
            && (self.amo || self.done.is_empty())
            && self.pending_ack.is_empty()
            && self.ack_due.is_none()
            && self.unconsumed == 0
    }

    /// When the stream's last frame arrived.
    pub(crate) fn last_arrival(&self) -> Option<Instant> {
        self.last_arrival
    }

    /// What an idle stream leaves behind when it is dropped to make room, so that
    /// the run made by its next frame goes on where it stopped.
    pub(crate) fn mark(&self) -> StreamMark {
        StreamMark {
            cumulative: self.cumulative,
            next_deliver: self.next_deliver,
            granted: self.granted,
            highest: self.highest,
        }
    }

    /// A new run of a dropped stream: everything up to its mark's `cumulative` was
    /// done and acked (an idle stream owes nothing), so a copy of it is a duplicate
    /// (re-acked, not delivered again); an ordered stream goes on from where it was;
    /// the credit granted stays granted. (Regression, with recycling: a late
    /// at-most-once message was delivered after later ones on an ordered channel,
    /// and an honest sender's burst on its old grant was dropped as over credit.)
    pub(crate) fn resume(&mut self, m: StreamMark) {
        self.cumulative = self.cumulative.max(m.cumulative);
        self.received = self.received.max(m.cumulative);
        self.reported = self.reported.max(m.cumulative);
        self.next_deliver = self.next_deliver.max(m.next_deliver);
        self.granted = self.granted.max(m.granted);
        self.highest = self.highest.max(m.highest);
    }

    /// Credit granted to this stream's sender before the stream existed (its frames
    /// found no receiver; see `Endpoint::grant_orphan_credit`).
    pub(crate) fn granted_before(&mut self, granted: u64) {
        self.granted = self.granted.max(granted);
    }

    /// Stream-level admission of one frame. Deliverable frames (in order, when ordered)
    /// are appended to `ready` and marked in progress.
    pub(crate) fn on_data(&mut self, now: Instant, data: Data, ready: &mut Vec<Data>) -> Arrival {
        self.last_arrival = Some(now);
        let (seq, floor) = (data.seq, data.floor);
        let buffered_before = self.reorder.contains_key(&seq);
        let arrival = self.admit(now, data, ready);
        self.extend_received();
        // A copy of a message held here (in the handler, or buffered for order) that
        // the last ack already covered: the sender does not know it is held (it
        // reconnected, or that ack was lost), and would retransmit it every timer
        // until the handler finishes. (Regression: one connection kill under a 10 s
        // handler cost 7 retransmissions per held message, 1 400 for 200.)
        let held_copy = matches!(arrival, Arrival::InProgress | Arrival::Buffered)
            && seq <= self.received
            && seq <= self.reported;
        // In progress here above the watermark (a gap below it: a receiver that
        // restarted, whose earlier run settled the seqs between its redeliveries):
        // only the ack's held ranges say so.
        let held_above = self.report_held
            && matches!(arrival, Arrival::Ready | Arrival::InProgress)
            && seq > self.received;
        // A copy of a message buffered for order above a gap, whose floor shows the
        // sender has not learnt what this stream settled: it lost the ack that would
        // move its floor past the gap (seqs this run never saw, after a restart).
        // Say again what is settled. (Found by `tests/sim_node_props.rs`'s
        // crashed-receiver property: every answer to the sender's re-check lost, an
        // ordered stream waited 15 s for one ack while copies kept arriving.) A copy
        // whose floor is past what is settled (the gap is a plain loss) draws none.
        let buffered_copy =
            buffered_before && arrival == Arrival::Buffered && floor <= self.cumulative;
        if !self.amo && self.received >= self.reported + (self.window / 8).max(1) {
            // Tell the sender what is held here before its timers think it lost: a
            // busy application otherwise delays every ack past the sender's RTO.
            self.owe_ack(now);
        } else if !self.amo
            && (self.received > self.reported || held_copy || held_above || buffered_copy)
        {
            // A few messages held: say so within HELD_ACK_DELAY, well before the
            // sender's RTO (at least 200 ms by default). A handler that finishes
            // sooner sends its ack first, and this one merges into it.
            let due = crate::retry::later(now, HELD_ACK_DELAY);
            self.ack_due = Some(self.ack_due.map_or(due, |d| d.min(due)));
        }
        arrival
    }

    /// Advance the held watermark over seqs held here (amortised O(1) per arrival).
    fn extend_received(&mut self) {
        self.received = self.received.max(self.cumulative);
        loop {
            let next = self.received + 1;
            let held = self.done.contains(&next)
                || self.in_progress.contains(&next)
                || self.reorder.contains_key(&next);
            if !held {
                break;
            }
            self.received = next;
        }
    }

    fn admit(&mut self, now: Instant, data: Data, ready: &mut Vec<Data>) -> Arrival {
        let seq = data.seq;
        let acks = data.guarantee != Guarantee::AtMostOnce;
        let fresh = self.highest == 0;
        self.amo = !acks;
        self.highest = self.highest.max(seq);
        self.advance_floor(data.floor, ready);
        if !acks {
            // The receiver's own bound: at-most-once is never retransmitted, so a seq
            // more than the slack below the newest is lost (or overtaken too far),
            // whatever floor the sender claims. Without it a sender that never moved
            // its floor, and never sent one seq, grew `done` by one entry per message
            // for as long as the application read. (Regression.)
            let implied = self.highest.saturating_sub(self.amo_slack);
            if implied > data.floor {
                self.advance_floor(implied, ready);
            }
        }
        if !acks && self.ordered && (fresh || seq > self.next_deliver) {
            // At-most-once is never retransmitted, and its floor trails far behind
            // (`amo_reorder_slack`): what is missing before `seq` is lost, or was for
            // a run of this stream that is gone (a receiver that registered late or
            // restarted). Waiting for it would hold an ordered stream for good, its
            // reorder buffer and credit with it. So an ordered stream starts at its
            // first frame and skips a gap; a message that arrives after a later one
            // went out is dropped, so order holds. (Regression: such streams
            // delivered nothing more and their senders' windows stalled.) An
            // unordered stream keeps waiting for nothing, so it delivers whatever
            // comes within the slack, late or not.
            self.advance_floor(seq, ready);
        }
        if let Some(&reason) = self.rejected.get(&seq) {
            return Arrival::Rejected(reason);
        }
        if seq <= self.cumulative || self.done.contains(&seq) {
            if acks {
                self.push_ack(now, seq);
            }
            return Arrival::Duplicate;
        }
        if self.in_progress.contains(&seq) {
            return Arrival::InProgress;
        }
        if self.held.remove(&seq) {
            // The redelivery the stream was holding for (rule 2).
            self.reorder.remove(&seq);
            self.in_progress.insert(seq);
            ready.push(data);
            self.drain_ordered(ready);
            return Arrival::Ready;
        }
        // While a redelivery is held, only messages handed out before may go (rule 2).
        let waiting = seq > self.next_deliver
            || (seq == self.next_deliver
                && !self.held.is_empty()
                && !self.failures.contains_key(&seq));
        if self.ordered && waiting {
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
        if advance {
            // Never leave a buffered copy of what goes out (it would go out again).
            self.reorder.remove(&seq);
        }
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
        if !self.failures.is_empty() {
            self.failures.remove(&seq);
        }
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

    /// The application had `seq` and did not process it (nacked or dropped): a
    /// retransmission delivers it again, and an ordered stream holds back what it has
    /// not handed out yet until then (rule 2).
    #[cfg(test)]
    pub(crate) fn fail(&mut self, seq: u64) {
        self.fail_counted(seq, true);
    }

    /// [`InboundStream::fail`]; with `count` false the failed delivery does not count
    /// toward the message's delivery limit (its node is draining before a stop).
    pub(crate) fn fail_counted(&mut self, seq: u64, count: bool) {
        let was_out = self.in_progress.remove(&seq);
        if was_out {
            *self.failures.entry(seq).or_insert(0) += u32::from(count);
        }
        // Not a seq its sender settled meanwhile (gave up on): it will not come again,
        // and holding it would stop the stream until the next frame's floor.
        if was_out && self.ordered && seq < self.next_deliver && seq > self.cumulative {
            self.held.insert(seq);
        }
        self.let_go(seq);
    }

    /// `seq` is no longer held here: the watermark falls below it, and so does what
    /// counts as reported, so that once its copy arrives and the watermark rises
    /// again, an ack says so (the sender's nack handling took everything above `seq`
    /// for let go, and would otherwise retransmit what is still held here).
    fn let_go(&mut self, seq: u64) {
        self.received = self.received.min(seq.saturating_sub(1));
        self.reported = self.reported.min(self.received);
    }

    /// `seq` was refused: the application will not process it now (no receiver, a
    /// dedup refusal, a payload it cannot decode). `later` are this stream's seqs after
    /// it that were made ready but not handed out. An ordered stream rewinds to `seq`
    /// when nothing after it was handed out (rule 3): `later` go back to the reorder
    /// buffer and wait for `seq`'s retransmission. If later seqs were handed out
    /// already, it holds `seq` as after a nack (rule 2). A `seq` its sender settled
    /// meanwhile will not come again: what waited behind it is pushed to `ready`.
    /// (Found by the stream model once its sender stopped retransmitting what the
    /// stream reports held: the stream rewound below its cumulative ack and waited
    /// for a retransmission that never came.)
    pub(crate) fn refuse(&mut self, seq: u64, later: Vec<Data>, ready: &mut Vec<Data>) {
        self.in_progress.remove(&seq);
        self.let_go(seq);
        if !self.ordered {
            for d in later {
                self.in_progress.remove(&d.seq);
            }
            return;
        }
        let between = self.next_deliver.saturating_sub(seq.saturating_add(1));
        let nothing_handed_out = seq < self.next_deliver && later.len() as u64 == between;
        for d in later {
            self.in_progress.remove(&d.seq);
            self.next_deliver = self.next_deliver.min(d.seq);
            self.reorder.insert(d.seq, d);
        }
        if nothing_handed_out || seq >= self.next_deliver {
            self.next_deliver = self.next_deliver.min(seq);
        } else if seq > self.cumulative {
            self.held.insert(seq);
        }
        self.drain_ordered(ready);
    }

    /// How many times `seq` has been handed to the application and failed (nacked or
    /// dropped).
    pub(crate) fn failures(&self, seq: u64) -> u32 {
        self.failures.get(&seq).copied().unwrap_or(0)
    }

    /// `seq` is refused for good (rule 4): settled without an ack range of its own, its
    /// reason kept for retransmissions until the sender's floor passes it. An ordered
    /// stream hands out what was waiting behind it (pushed to `ready`).
    pub(crate) fn reject(
        &mut self,
        now: Instant,
        seq: u64,
        reason: RejectReason,
        ready: &mut Vec<Data>,
    ) {
        self.failures.remove(&seq);
        self.held.remove(&seq);
        self.rejected.insert(seq, reason);
        self.complete(now, seq, false);
        self.extend_received();
        self.drain_head(ready);
    }

    /// What a data frame says before its credit check: its guarantee (so a new
    /// stream's first frame is judged by its own guarantee's rule; regression: an
    /// at-most-once stream seen first by a restarted receiver was judged as acked,
    /// its frames above the initial credit dropped, and the stream never learned it
    /// was at-most-once: every later message lost), and its floor (see
    /// [`note_floor`](Self::note_floor)).
    pub(crate) fn note_frame(&mut self, data: &Data) {
        self.amo = data.guarantee == Guarantee::AtMostOnce;
        self.note_floor(data.floor);
    }

    /// Forgets the rejections below `floor` (the sender has settled them), as an
    /// accepted frame carrying it would: called before the frame's credit check, so
    /// rejections the sender has confirmed never hold back its next message.
    pub(crate) fn note_floor(&mut self, floor: u64) {
        while self
            .rejected
            .first_key_value()
            .is_some_and(|(s, _)| *s < floor)
        {
            self.rejected.pop_first();
        }
    }

    /// May the kept rejections be sent again now (a probe, a new connection)? At most
    /// once per [`REJECTS_RESEND_EVERY`]: a peer asking again and again gets them once
    /// per period, not once per request.
    pub(crate) fn resend_rejections_due(&mut self, now: Instant) -> bool {
        if self.rejected.is_empty()
            || self
                .rejects_resent
                .is_some_and(|t| now.saturating_duration_since(t) < REJECTS_RESEND_EVERY)
        {
            return false;
        }
        self.rejects_resent = Some(now);
        true
    }

    /// Rejections the sender may not have heard of yet (their seqs are at or above its
    /// last floor), to send again on a new connection.
    pub(crate) fn rejections(&self) -> impl Iterator<Item = (u64, RejectReason)> + '_ {
        self.rejected.iter().map(|(s, r)| (*s, *r))
    }

    /// Channel of the stream.
    pub(crate) fn channel(&self) -> ChannelId {
        self.channel
    }

    /// `seq` waits for another delivery of the same message ID to finish (it is a
    /// duplicate of a message still being processed); retransmissions of it are
    /// dropped meanwhile. An ordered stream stops at it; `later` go back to the reorder
    /// buffer until [`Self::unpark`]. The stream only ever rewinds to it: a parked
    /// redelivery (made ready out of line, after a nack) above where the stream
    /// stands must not move it past what waits below.
    pub(crate) fn park(&mut self, seq: u64, later: Vec<Data>) {
        self.in_progress.insert(seq);
        if self.ordered {
            for d in later {
                self.in_progress.remove(&d.seq);
                self.reorder.insert(d.seq, d);
            }
            self.next_deliver = self.next_deliver.min(seq);
        }
    }

    /// A parked `seq` is to be delivered after all (the delivery it waited for
    /// failed). Returns false if its sender settled it since (gave up on it): it is
    /// dropped, and the caller wakes the next copy of the message instead. Otherwise
    /// unordered, it is pushed to `ready` at once; ordered, it goes back in line and is
    /// handed out when the stream reaches it (at once if it is next), or at once if the
    /// stream stands past it already (it was parked while the stream was unordered:
    /// [`Self::set_ordered`] counts what is in progress as handed out).
    pub(crate) fn unpark(&mut self, data: Data, ready: &mut Vec<Data>) -> bool {
        let seq = data.seq;
        if seq <= self.cumulative || self.done.contains(&seq) {
            self.in_progress.remove(&seq);
            self.drain_head(ready);
            return false;
        }
        if !self.ordered || seq < self.next_deliver {
            ready.push(data); // stays in progress
        } else {
            self.in_progress.remove(&seq);
            self.reorder.insert(seq, data);
        }
        self.drain_head(ready);
        true
    }

    /// Ordered: hand out whatever is next in line (after a parked seq was settled).
    pub(crate) fn drain_head(&mut self, ready: &mut Vec<Data>) {
        if self.ordered {
            self.drain_ordered(ready);
        }
    }

    /// At-most-once: a frame dropped by the hold ([`Self::over_credit`]) is lost, and
    /// its seq counts as arrived, so the grant (which follows arrivals) still moves
    /// past it. Without this, a sender that had gone past the hold would wait for a
    /// grant that only arrivals could raise, and none would come.
    pub(crate) fn spend(&mut self, seq: u64) {
        self.highest = self.highest.max(seq);
    }

    /// At-most-once: a message was handed to the application.
    pub(crate) fn amo_delivered(&mut self) {
        self.unconsumed += 1;
    }

    /// At-most-once: the application finished a message; with `update`, a credit
    /// update is owed to the sender.
    pub(crate) fn consumed(&mut self, now: Instant, update: bool) {
        self.unconsumed = self.unconsumed.saturating_sub(1);
        if update {
            let due = crate::retry::later(now, self.ack_delay);
            self.ack_due = Some(self.ack_due.map_or(due, |d| d.min(due)));
        }
    }

    /// Nothing to do until a frame or a completion arrives: no ack owed or pending and
    /// no message held here. (The endpoint's scans skip such a stream; anything that
    /// changes it borrows it mutably, which makes it active again.)
    pub(crate) fn is_quiet(&self) -> bool {
        self.ack_due.is_none() && self.pending_ack.is_empty() && self.outstanding() == 0
    }

    /// The sender asked for its credit: an ack is owed now.
    /// A copy of `seq` arrived while no receiver takes this stream's channel: is it
    /// one this stream already answered or a handler still holds? `Rejected` (refused
    /// here before: say so again), `Done` (settled here: acked again, as any duplicate
    /// is) and `Held` (in a handler: the next ack says so) must not be refused as
    /// never processed. `Unknown` may be; a copy buffered for order or held for a
    /// redelivery is one (no handler has it, and none will take it), and
    /// [`forget_undeliverable`](Self::forget_undeliverable) drops it when it is.
    pub(crate) fn known_without_receiver(&mut self, now: Instant, seq: u64) -> Known {
        if self.amo {
            return Known::Unknown;
        }
        if let Some(&reason) = self.rejected.get(&seq) {
            return Known::Rejected(reason);
        }
        if seq <= self.cumulative || self.done.contains(&seq) {
            self.push_ack(now, seq);
            return Known::Done;
        }
        if self.in_progress.contains(&seq) {
            self.owe_ack(now);
            return Known::Held;
        }
        Known::Unknown
    }

    /// `seq` was refused for want of a receiver: a copy buffered for order or held for
    /// a redelivery is dropped, so it no longer counts as held here (the stream's
    /// hold and its node's credit).
    pub(crate) fn forget_undeliverable(&mut self, seq: u64) {
        self.reorder.remove(&seq);
        self.held.remove(&seq);
    }

    pub(crate) fn owe_ack(&mut self, now: Instant) {
        self.ack_due = Some(self.ack_due.map_or(now, |d| d.min(now)));
    }

    /// Messages of this stream held here: handed to the application and not
    /// finished, parked, or waiting for ordered delivery.
    pub(crate) fn outstanding(&self) -> u64 {
        (self.in_progress.len() + self.reorder.len()) as u64 + self.unconsumed
    }

    /// Is this an ordered stream?
    pub(crate) fn is_ordered(&self) -> bool {
        self.ordered
    }

    /// The channel's receiver was registered again with the other ordering: the
    /// stream follows the receiver it has now. To ordered: first deliveries follow
    /// send order from the messages not handed out yet on (what went out unordered
    /// before stays as it went). To unordered: nothing waits any more; what was
    /// buffered for ordering is pushed to `ready`. (Regression: a stream kept the
    /// ordering of the receiver registered when its first frame arrived, so an
    /// ordered receiver registered after an unordered one saw first deliveries out
    /// of send order.)
    pub(crate) fn set_ordered(&mut self, ordered: bool, ready: &mut Vec<Data>) {
        if self.ordered == ordered {
            return;
        }
        self.ordered = ordered;
        if ordered {
            let handed_out = self
                .in_progress
                .iter()
                .copied()
                .chain(self.done.last().copied())
                .fold(self.cumulative, u64::max);
            self.next_deliver = self.next_deliver.max(handed_out.saturating_add(1));
        } else {
            self.held.clear();
            for (seq, data) in std::mem::take(&mut self.reorder) {
                if seq > self.cumulative
                    && !self.done.contains(&seq)
                    && self.in_progress.insert(seq)
                {
                    ready.push(data);
                }
            }
        }
    }

    /// Credit the sender may use now: the highest seq it may have transmitted.
    pub(crate) fn credit(&mut self) -> u64 {
        let grant = if self.amo {
            let outstanding = self.unconsumed + self.reorder.len() as u64;
            self.highest + self.window.saturating_sub(outstanding)
        } else {
            self.cumulative.saturating_add(self.window)
        };
        self.granted = self.granted.max(grant);
        self.granted
    }

    /// Would `seq` exceed what this stream allows, by more than `slack`? (A sender
    /// that honours credit never gets there; probes and a receiver restart stay within
    /// the slack.) Two limits, both needed:
    /// - **The grant** (acked guarantees): `seq` beyond the highest credit granted, or
    ///   beyond the initial credit past the frame's own floor (everything below it is
    ///   settled: what a receiver run that just started, and granted nothing yet,
    ///   counts from).
    /// - **The hold** (every guarantee): a new message while the stream already holds
    ///   its window plus `slack` of messages not finished (handed to the application,
    ///   parked, or waiting for ordered delivery). A floor is the sender's word, so a
    ///   lying floor can move the grant as far as it likes; what the stream holds it
    ///   cannot. At-most-once grants follow arrivals, so for it the hold is the only
    ///   limit. Seqs the stream already knows (duplicates, a held redelivery, a
    ///   rejected seq) are never held back: they add nothing. (An honest ordered
    ///   stream cannot wedge on the hold: what waits for ordered delivery is within
    ///   its grant, at most the window, so the hold is reached only while the
    ///   application holds messages, and finishing them makes room.)
    ///
    /// `node_full`: the sending node already has as many deliveries held by the
    /// application as the endpoint allows one node (over all its incarnations and
    /// streams); a new message is then held back like one past the stream's hold.
    /// `grants`: the sender speaks a version with credit (2 and later); the hold
    /// applies to every version (a version-1 sender is bounded by its own window).
    pub(crate) fn over_credit(
        &self,
        seq: u64,
        floor: u64,
        initial: u64,
        slack: u64,
        node_full: bool,
        grants: bool,
    ) -> bool {
        // The cheap test first: the lookups run only once the hold is reached.
        // Rejections kept for the sender count too: they wait for its floor, and a
        // floor that never moves would let them grow without bound (and each probe
        // sends them all again). (Regression: 60 000 kept for one stream.)
        let held = self.outstanding() + self.rejected.len() as u64;
        let holding = node_full || held >= self.window.saturating_add(slack);
        if holding && !self.knows(seq) {
            return true;
        }
        if self.amo {
            return false;
        }
        let settled = self.cumulative.max(floor.saturating_sub(1));
        if !grants {
            // A version 1 sender has no grant to keep to; its window bounds how far
            // ahead of what it settled it sends. Held to ours (plus the slack), `done`
            // stays bounded even when its floor never moves; an honest sender's frames
            // past it are dropped unacked and sent again. (Regression: a peer that
            // negotiated version 1 and never sent one seq grew `done` without bound.)
            return seq > settled.saturating_add(self.window).saturating_add(slack);
        }
        // Before anything is settled, a new stream's sender has only the initial
        // credit. Once something is (`floor > 1`), it may hold a grant of a run of
        // this stream that is gone (a receiver restart, a recycled stream), at most
        // its settled seqs plus the window. (Regression: a recycled stream allowed
        // only the initial credit, so an honest burst was dropped as over credit.)
        let base = if floor > 1 { self.window } else { initial };
        let allowed = self
            .granted
            .max(settled.saturating_add(base))
            .saturating_add(slack);
        seq > allowed
    }

    /// Is `seq` one this stream has seen or settled (its arrival adds nothing held)?
    fn knows(&self, seq: u64) -> bool {
        seq <= self.cumulative
            || self.done.contains(&seq)
            || self.in_progress.contains(&seq)
            || self.held.contains(&seq)
            || self.reorder.contains_key(&seq)
            || self.rejected.contains_key(&seq)
    }

    /// An owed ack is due at `now` at the latest (the node is stopping: it would not
    /// be sent after `ack_delay`).
    pub(crate) fn ack_due_by(&mut self, now: Instant) {
        if let Some(d) = self.ack_due {
            self.ack_due = Some(d.min(now));
        }
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
        // Ascending and merged (handlers finish in any order), as a sender expects
        // from an honest receiver; it copes with any order regardless.
        self.pending_ack.sort_unstable_by_key(|r| r.start);
        let mut ranges: Vec<SeqRange> = Vec::with_capacity(self.pending_ack.len());
        for r in self.pending_ack.drain(..).filter(|r| r.end > cumulative) {
            let r = SeqRange {
                start: r.start.max(cumulative + 1),
                end: r.end,
            };
            match ranges.last_mut() {
                Some(last) if r.start <= last.end.saturating_add(1) => {
                    last.end = last.end.max(r.end);
                }
                _ => ranges.push(r),
            }
        }
        if ranges.len() > MAX_ACK_RANGES {
            // The rest goes in the next ack, at once (a decoder refuses more).
            self.pending_ack = ranges.split_off(MAX_ACK_RANGES);
            self.ack_due = Some(now);
        }
        Some(Ack {
            channel: self.channel,
            incarnation: self.origin.incarnation,
            cumulative,
            ranges,
            credit: Some(self.credit()),
            received: {
                self.reported = self.received.max(cumulative);
                self.reported
            },
            held: if self.amo || !self.report_held {
                // At-most-once is never retransmitted: nothing to hold back.
                Vec::new()
            } else {
                self.held_above(self.reported)
            },
        })
    }

    /// Seqs above `from` in progress here (handed to the application, not finished),
    /// as ascending ranges, the lowest [`MAX_HELD_RANGES`] of them ([`Ack::held`]).
    ///
    /// Not the done ones: an ack's ranges report those once, and if that ack is lost,
    /// only a copy of the message (re-acked as a duplicate) reports it again, so the
    /// sender must not take a done message for held. Nor those buffered for order
    /// above a gap: they wait for a frame whose floor passes the gap when its seqs were
    /// settled without this run seeing them (a receiver that restarted), and their own
    /// retransmissions carry it. Held, they would wait for the sender's next frame of
    /// the stream, which may not come before their deadline. (Found by
    /// `tests/sim_node_props.rs`'s crashed-receiver property.)
    fn held_above(&self, from: u64) -> Vec<SeqRange> {
        // Every seq in `(cumulative, from]` is in one of the three sets, so unless
        // they hold more entries than that, none lies above `from`: the common case
        // (nothing missing below what is held) costs no walk.
        let listed = self.done.len() + self.in_progress.len() + self.reorder.len();
        if self.in_progress.is_empty() || listed as u64 <= from.saturating_sub(self.cumulative) {
            return Vec::new();
        }
        let above = from.saturating_add(1);
        let mut seqs: Vec<u64> = self
            .in_progress
            .iter()
            .copied()
            .filter(|&s| s >= above)
            .collect();
        seqs.sort_unstable();
        let mut ranges: Vec<SeqRange> = Vec::new();
        for s in seqs {
            if let Some(r) = ranges.last_mut().filter(|r| s <= r.end.saturating_add(1)) {
                r.end = r.end.max(s);
            } else if ranges.len() == MAX_HELD_RANGES {
                break;
            } else {
                ranges.push(SeqRange { start: s, end: s });
            }
        }
        ranges
    }

    fn advance_floor(&mut self, floor: u64, ready: &mut Vec<Data>) {
        let settled = floor.saturating_sub(1);
        // The sender settled these: it has its reject (or gave up on its own).
        self.note_floor(floor);
        if !self.failures.is_empty() {
            // Failed seqs the sender gave up on will not be delivered again.
            self.failures.retain(|s, _| *s >= floor);
        }
        // Held seqs the sender settled without a redelivery will not come back; what
        // waited behind them (rule 2) goes out now, before this frame is looked at.
        let mut released = false;
        while self.held.first().is_some_and(|s| *s < floor) {
            self.held.pop_first();
            released = true;
        }
        if released && floor <= self.next_deliver {
            self.drain_ordered(ready);
        }
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

    /// Hand out the run of messages from `next_deliver` on, skipping seqs that are
    /// already done (a parked duplicate settled with its original; a buffered copy of
    /// one is dropped); stop at a gap, at a seq still in progress (parked), or — while
    /// a redelivery is held (rule 2) — at the first message never handed out before.
    fn drain_ordered(&mut self, ready: &mut Vec<Data>) {
        if self.next_deliver <= self.cumulative {
            // All of it is done: drop the buffered copies and step past it at once
            // (not one seq at a time: the cumulative ack may be far ahead).
            let mut done = self.reorder.split_off(&self.next_deliver);
            let mut rest = done.split_off(&(self.cumulative + 1));
            self.reorder.append(&mut rest); // `done` (next_deliver..=cumulative) is dropped
            self.next_deliver = self.cumulative + 1;
        }
        loop {
            let next = self.next_deliver;
            if next <= self.cumulative || self.done.contains(&next) {
                self.reorder.remove(&next);
            } else if !self.held.is_empty() && !self.failures.contains_key(&next) {
                break;
            } else if let Some(data) = self.reorder.remove(&next) {
                self.in_progress.insert(data.seq);
                ready.push(data);
            } else {
                break;
            }
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
            crate::retry::later(now, self.ack_delay)
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
            schema: 0,
        }
    }

    fn stream(ordered: bool) -> InboundStream {
        let origin = Origin {
            node: NodeId(1),
            incarnation: 9,
        };
        InboundStream::new(
            origin,
            ChannelId(0),
            ordered,
            Duration::ZERO,
            8,
            16,
            64,
            1024,
        )
    }

    /// `ProtoConfig::amo_reorder_slack`: "the receiver's bookkeeping stays bounded (at
    /// most this many seqs per stream)", whatever floor the sender claims. A sender
    /// that never sends seq 1 and keeps its floor at 1, to a receiver that reads
    /// everything: `done` stays within the receiver's slack (1024 here), and a copy
    /// more than the slack behind the newest is dropped, not delivered.
    /// (Regression: `done` grew by one entry per message, 20 000 here.)
    #[test]
    fn an_at_most_once_stream_keeps_at_most_its_slack_whatever_floor_is_claimed() {
        let now = Instant::now();
        let mut ready = Vec::new();
        for ordered in [false, true] {
            let mut s = stream(ordered);
            for seq in 2..=20_000u64 {
                let mut d = data(seq, 1);
                d.guarantee = Guarantee::AtMostOnce;
                assert_eq!(s.on_data(now, d, &mut ready), Arrival::Ready, "seq {seq}");
                for d in ready.drain(..) {
                    s.complete(now, d.seq, false);
                }
                assert!(s.done.len() <= 1024, "seq {seq}: {} done", s.done.len());
            }
            let mut late = data(20_000 - 1025, 1);
            late.guarantee = Guarantee::AtMostOnce;
            assert_eq!(s.on_data(now, late, &mut ready), Arrival::Duplicate);
            assert!(ready.is_empty());
        }
        // Unordered, a copy overtaken by fewer than the slack is still delivered.
        let mut s = stream(false);
        for seq in [1u64, 3, 500, 2] {
            let mut d = data(seq, 1);
            d.guarantee = Guarantee::AtMostOnce;
            assert_eq!(s.on_data(now, d, &mut ready), Arrival::Ready, "seq {seq}");
        }
    }

    /// A version 1 sender (no grants) is held to the receiver's window plus slack
    /// ahead of what it settled, so `done` stays bounded when its floor never moves.
    #[test]
    fn a_sender_without_grants_is_held_to_the_window_ahead_of_its_floor() {
        let s = stream(false); // window 64
        let (initial, slack) = (16, 8);
        assert!(!s.over_credit(1 + 64 + 8 - 1, 1, initial, slack, false, false));
        assert!(s.over_credit(1 + 64 + 8, 1, initial, slack, false, false));
        assert!(!s.over_credit(1000 + 64, 1001, initial, slack, false, false));
        assert!(s.over_credit(1001 + 64 + 8, 1001, initial, slack, false, false));
    }

    /// A stream follows its channel's receiver when it is registered again with the
    /// other ordering: made ordered, later first deliveries wait for their
    /// predecessors; made unordered, what was buffered for ordering goes out at once.
    /// (Regression: the ordering of the first receiver stuck to the stream.)
    #[test]
    fn a_stream_follows_a_receiver_registered_again_with_the_other_ordering() {
        let now = Instant::now();
        let seqs = |r: &mut Vec<Data>| r.drain(..).map(|d| d.seq).collect::<Vec<_>>();
        let mut s = stream(false);
        let mut ready = Vec::new();
        assert_eq!(s.on_data(now, data(1, 1), &mut ready), Arrival::Ready);
        assert_eq!(s.on_data(now, data(3, 1), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&mut ready), vec![1, 3]);
        s.complete(now, 1, true);
        // Ordered from here: 2 was never handed out, 3 was; 5 waits for 4.
        s.set_ordered(true, &mut ready);
        assert!(ready.is_empty());
        assert_eq!(s.on_data(now, data(5, 2), &mut ready), Arrival::Buffered);
        assert_eq!(s.on_data(now, data(4, 2), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&mut ready), vec![4, 5]);
        assert_eq!(s.on_data(now, data(7, 2), &mut ready), Arrival::Buffered);
        // Unordered again: 7 no longer waits for 6.
        s.set_ordered(false, &mut ready);
        assert_eq!(seqs(&mut ready), vec![7]);
        assert_eq!(s.on_data(now, data(7, 2), &mut ready), Arrival::InProgress);
        assert_eq!(s.on_data(now, data(6, 2), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&mut ready), vec![6]);
    }

    /// An ordered at-most-once stream never waits for what cannot come: it starts at
    /// its first frame (the floor trails far behind), skips a gap at once, and drops a
    /// message that arrives after a later one went out. Unordered, a late message is
    /// still delivered. (Regression: the stream waited for seqs below its first frame
    /// or lost in a cut, for good.)
    #[test]
    fn an_ordered_at_most_once_stream_starts_at_its_first_frame_and_skips_gaps() {
        let now = Instant::now();
        let amo = |seq| Data {
            guarantee: Guarantee::AtMostOnce,
            ..data(seq, 1)
        };
        let seqs = |r: &mut Vec<Data>| r.drain(..).map(|d| d.seq).collect::<Vec<_>>();
        let mut s = stream(true);
        let mut ready = Vec::new();
        assert_eq!(s.on_data(now, amo(101), &mut ready), Arrival::Ready);
        assert_eq!(s.on_data(now, amo(102), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&mut ready), vec![101, 102]);
        // 103 and 104 lost: 105 goes out at once.
        assert_eq!(s.on_data(now, amo(105), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&mut ready), vec![105]);
        // 104 arrives late: dropped, order holds.
        assert_eq!(s.on_data(now, amo(104), &mut ready), Arrival::Duplicate);
        assert!(ready.is_empty());
        for seq in [101, 102, 105] {
            s.complete(now, seq, false);
        }
        assert!(s.is_idle(), "nothing owed: recyclable");

        let mut u = stream(false);
        assert_eq!(u.on_data(now, amo(7), &mut ready), Arrival::Ready);
        assert_eq!(u.on_data(now, amo(9), &mut ready), Arrival::Ready);
        assert_eq!(u.on_data(now, amo(8), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&mut ready), vec![7, 9, 8]);
    }

    /// An at-most-once stream holds at most its window (plus the slack) of messages
    /// the application has not consumed; past that a frame is dropped. The dropped
    /// frames' seqs are spent, so once the application catches up the grant covers
    /// the sender's next seq. (Regressions: at-most-once was never held, so a receiver
    /// that did not read grew with a flood; and a hold without `spend` froze the grant
    /// of a sender that had gone past it, since at-most-once grants follow arrivals.)
    #[test]
    fn an_at_most_once_flood_is_held_and_the_grant_moves_past_it() {
        let now = Instant::now();
        let mut s = stream(false); // window 64
        let mut ready = Vec::new();
        for seq in 1..=64 {
            assert!(!s.over_credit(seq, seq, 64, 0, false, true), "{seq}");
            let d = Data {
                guarantee: Guarantee::AtMostOnce,
                ..data(seq, seq)
            };
            assert_eq!(s.on_data(now, d, &mut ready), Arrival::Ready);
            s.complete(now, seq, false);
            s.amo_delivered();
        }
        // The flood's own seqs do not buy it room: the stream holds 64 unconsumed.
        assert!(s.over_credit(65, 65, 64, 0, false, true));
        assert!(s.over_credit(1 << 40, 1 << 40, 64, 0, false, true));
        assert!(!s.over_credit(65, 65, 64, 1, false, true), "the slack");
        for seq in 65..=200 {
            assert!(s.over_credit(seq, seq, 64, 0, false, true));
            s.spend(seq);
        }
        for _ in 0..64 {
            s.consumed(now, true);
        }
        assert!(!s.over_credit(201, 201, 64, 0, false, true));
        assert!(
            s.credit() >= 201,
            "the grant must cover the sender's next seq: {}",
            s.credit()
        );
    }

    /// Acked guarantees are held too, however the floor lies: a floor is the sender's
    /// word (it moves the grant), but what the stream holds is not. Seqs it already
    /// knows still get through (a duplicate is re-acked). (Regression: `floor = seq` on every frame let a flood past the
    /// grant, and a receiver that did not read grew with it.)
    #[test]
    fn a_lying_floor_does_not_lift_the_hold() {
        let now = Instant::now();
        for ordered in [false, true] {
            let mut s = stream(ordered); // window 64
            let mut ready = Vec::new();
            for seq in 1..=64 {
                assert!(!s.over_credit(seq, seq, 64, 0, false, true), "{seq}");
                s.on_data(now, data(seq, seq), &mut ready);
            }
            assert_eq!(ready.len(), 64, "ordered {ordered}");
            assert!(
                s.over_credit(65, 65, 64, 0, false, true),
                "ordered {ordered}"
            );
            assert!(
                s.over_credit(65, 65, 64, 0, false, false),
                "held without grants too (a version-1 sender), ordered {ordered}"
            );
            assert!(
                s.over_credit(10_000, 10_000, 64, 0, false, true),
                "ordered {ordered}"
            );
            assert!(
                !s.over_credit(64, 64, 64, 0, false, true),
                "a duplicate, ordered {ordered}"
            );
            s.complete(now, 1, true);
            assert!(
                !s.over_credit(65, 65, 64, 0, false, true),
                "room again, ordered {ordered}"
            );
        }
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

    /// A receiver that restarted gets redeliveries with gaps between them (the seqs its
    /// earlier run settled are never sent again): its ack reports them as held ranges
    /// above the watermark, within the held-ack delay of their arrival, and stops
    /// reporting one once it is let go. Not what an ordered stream buffers above a
    /// gap (its own retransmissions bring the floor that lets it go). At most
    /// `MAX_HELD_RANGES`, the lowest.
    #[test]
    fn what_is_held_above_a_gap_is_reported_in_held_ranges() {
        let now = Instant::now();
        let mut s = stream(false);
        let mut ready = Vec::new();
        for seq in [10, 20, 21, 30] {
            assert_eq!(s.on_data(now, data(seq, 10), &mut ready), Arrival::Ready);
        }
        assert!(s.ack_deadline().is_some_and(|d| d <= now + HELD_ACK_DELAY));
        let ack = s.poll_ack(now + HELD_ACK_DELAY).expect("held ack owed");
        assert_eq!((ack.cumulative, ack.received), (9, 10));
        let span = |start, end| SeqRange { start, end };
        assert_eq!(ack.held, vec![span(20, 21), span(30, 30)]);
        // A copy of a held message asks for the ack again (the sender may not know).
        assert_eq!(s.ack_deadline(), None);
        assert_eq!(
            s.on_data(now, data(20, 10), &mut ready),
            Arrival::InProgress
        );
        assert_eq!(s.ack_deadline(), Some(now + HELD_ACK_DELAY));
        assert!(s.poll_ack(now + HELD_ACK_DELAY).is_some());
        // Let go: no longer reported. Done: in the ack's ranges, not held (if that ack
        // is lost, a copy of 30 is re-acked; a sender taking it for held would keep it
        // unsettled).
        s.fail(21);
        s.complete(now, 30, true);
        let ack = s.poll_ack(now).expect("ack owed");
        assert_eq!(
            (ack.held, ack.ranges),
            (vec![span(20, 20)], vec![span(30, 30)])
        );
        assert!(s.poll_ack(now + HELD_ACK_DELAY).is_none());
        // A sender older than protocol 5 reads no ranges: none worked out, none owed.
        let mut v4 = stream(false);
        v4.report_held = false;
        for seq in [10, 20] {
            v4.on_data(now, data(seq, 10), &mut ready);
        }
        assert!(v4.poll_ack(now + HELD_ACK_DELAY).unwrap().held.is_empty());
        assert_eq!(
            v4.on_data(now, data(20, 10), &mut ready),
            Arrival::InProgress
        );
        assert_eq!(v4.ack_deadline(), None);
        // At-most-once streams report nothing held (never retransmitted).
        let mut a = stream(false);
        for seq in [5, 9] {
            let mut d = data(seq, 5);
            d.guarantee = Guarantee::AtMostOnce;
            a.on_data(now, d, &mut ready);
        }
        a.owe_ack(now);
        assert!(a.poll_ack(now).is_none_or(|ack| ack.held.is_empty()));
        // Nothing missing below what is held: no ranges.
        s.complete(now, 10, true);
        let mut t = stream(false);
        for seq in 1..=5 {
            t.on_data(now, data(seq, 1), &mut ready);
        }
        assert!(t.poll_ack(now + HELD_ACK_DELAY).unwrap().held.is_empty());
        // An ordered stream buffering above a lost 2: not reported.
        let mut o = stream(true);
        for seq in [1, 3, 4, 6] {
            o.on_data(now, data(seq, 1), &mut ready);
        }
        let ack = o.poll_ack(now + HELD_ACK_DELAY).unwrap();
        assert_eq!((ack.received, ack.held), (1, vec![]));
        // A copy of a buffered message whose floor shows the sender has not learnt
        // what is settled here (1 is done; it lost that ack) is answered; one whose
        // floor is past that (2 is a plain loss) is not.
        o.complete(now, 1, true);
        assert!(o.poll_ack(now).is_some());
        assert_eq!(o.on_data(now, data(3, 2), &mut ready), Arrival::Buffered);
        assert_eq!(o.ack_deadline(), None);
        assert_eq!(o.on_data(now, data(3, 1), &mut ready), Arrival::Buffered);
        assert_eq!(o.ack_deadline(), Some(now + HELD_ACK_DELAY));
        // The cap: the lowest MAX_HELD_RANGES.
        let mut c = InboundStream::new(
            s.origin,
            ChannelId(0),
            false,
            Duration::ZERO,
            8,
            16,
            4 * MAX_HELD_RANGES as u64,
            1024,
        );
        for i in 1..=(MAX_HELD_RANGES as u64 + 5) {
            c.on_data(now, data(2 * i, 2), &mut ready);
        }
        let held = c.poll_ack(now + HELD_ACK_DELAY).unwrap().held;
        assert_eq!(held.len(), MAX_HELD_RANGES);
        // 2 is the watermark; 4, 6, ... are held above it.
        let last = 2 * (MAX_HELD_RANGES as u64 + 1);
        assert_eq!(held.last(), Some(&span(last, last)));
    }

    /// After a message is let go (nacked), its copy raises the watermark back over
    /// what the handlers still hold, and an ack says so within the held-ack delay: the
    /// sender took everything above the nacked seq for let go. (Found in review: the
    /// watermark came back to what was last reported, so no ack was owed, and the
    /// sender retransmitted the held messages above on its timers.)
    #[test]
    fn a_redelivery_after_a_nack_reports_what_is_held_above_it_again() {
        let now = Instant::now();
        let mut s = stream(false);
        let mut ready = Vec::new();
        for seq in 1..=5 {
            s.on_data(now, data(seq, 1), &mut ready);
        }
        let ack = s.poll_ack(now + HELD_ACK_DELAY).expect("held ack");
        assert_eq!(ack.received, 5);
        s.fail(2);
        let ack = s.poll_ack(now + HELD_ACK_DELAY);
        assert!(ack.as_ref().is_none_or(|a| a.received == 1), "{ack:?}");
        assert_eq!(s.on_data(now, data(2, 1), &mut ready), Arrival::Ready);
        assert_eq!(s.ack_deadline(), Some(now + HELD_ACK_DELAY));
        assert_eq!(s.poll_ack(now + HELD_ACK_DELAY).unwrap().received, 5);
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

    fn seqs(ready: &[Data]) -> Vec<u64> {
        ready.iter().map(|d| d.seq).collect()
    }

    /// A held seq (refused after a later one was handed out) that the sender settles
    /// without a redelivery unblocks the stream: what waited behind it is handed out
    /// at once, in order, and a retransmission of it later is not delivered twice.
    /// (Found by `guarantees_sim`: the floor popped the held seq without draining, a
    /// retransmission was then delivered past the copy still buffered, and a later
    /// floor jump handed that stale copy out after its successors.)
    #[test]
    fn the_sender_settling_a_held_seq_hands_out_what_waited_behind_it() {
        let now = Instant::now();
        let mut s = stream(true);
        let mut ready = Vec::new();
        for seq in 1..=4 {
            s.on_data(now, data(seq, 1), &mut ready);
        }
        assert_eq!(seqs(&ready), [1, 2, 3, 4]);
        ready.clear();
        // The application saw 1 and 3; 2 is refused and 4 comes back with it.
        s.refuse(2, vec![data(4, 1)], &mut ready);
        assert!(ready.is_empty(), "4 waits for 2");
        // The sender gives 2 up (floor 3) while 5 is sent: 4 and 5 go out, in order.
        assert_eq!(s.on_data(now, data(5, 3), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&ready), [4, 5]);
        ready.clear();
        // A late retransmission of 4 is not delivered again; nothing stale is left.
        assert_eq!(s.on_data(now, data(4, 3), &mut ready), Arrival::InProgress);
        s.complete(now, 4, true);
        assert_eq!(s.on_data(now, data(4, 3), &mut ready), Arrival::Duplicate);
        for seq in [1, 3, 5] {
            s.complete(now, seq, true);
        }
        assert_eq!(s.on_data(now, data(7, 7), &mut ready), Arrival::Ready);
        assert_eq!(seqs(&ready), [7]);
        assert_eq!(s.outstanding(), 1, "only 7 is held here");
    }

    /// Found by the stream model: parking a redelivery (made ready out of line after
    /// a nack) moved the stream past a parked seq and a buffered one below it, so the
    /// first was dropped when unparked and the second was handed out again later.
    #[test]
    fn a_parked_redelivery_does_not_move_the_stream_past_what_waits_below() {
        let now = Instant::now();
        let mut s = stream(true);
        let mut ready = Vec::new();
        for seq in 1..=3 {
            s.on_data(now, data(seq, 1), &mut ready);
        }
        ready.clear();
        // The application nacks all three; 1 and 2 come again, and 1 duplicates a
        // delivery in progress elsewhere: parked, 2 back in the buffer.
        for seq in 1..=3 {
            s.fail(seq);
        }
        s.on_data(now, data(1, 1), &mut ready);
        s.on_data(now, data(2, 1), &mut ready);
        assert_eq!(seqs(&ready), [1, 2]);
        ready.clear();
        s.park(1, vec![data(2, 1)]);
        // 3 comes again and is parked too (another duplicate in progress).
        s.on_data(now, data(3, 1), &mut ready);
        assert_eq!(seqs(&ready), [3]);
        ready.clear();
        s.park(3, Vec::new());
        // Both originals fail: 1, 2 and 3 go out again, in order, each once.
        assert!(s.unpark(data(1, 1), &mut ready));
        assert!(s.unpark(data(3, 1), &mut ready));
        assert_eq!(seqs(&ready), [1, 2, 3]);
        assert_eq!(s.outstanding(), 3, "nothing left buffered");
    }

    /// An ack carries at most `MAX_ACK_RANGES` SACK ranges (the decoder refuses more):
    /// the rest goes in the next ack, due at once.
    #[test]
    fn an_ack_with_too_many_ranges_is_sent_in_parts() {
        let now = Instant::now();
        let mut s = stream(false);
        for i in 0..MAX_ACK_RANGES as u64 + 5 {
            s.push_ack(now, 2 * i + 10);
        }
        let first = s.poll_ack(now).expect("due: the range limit was reached");
        assert_eq!(first.ranges.len(), MAX_ACK_RANGES);
        let rest = s.poll_ack(now).expect("the rest is due at once");
        assert_eq!(rest.ranges.len(), 5);
        assert_eq!(rest.ranges[0].start, 2 * MAX_ACK_RANGES as u64 + 10);
        assert!(s.poll_ack(now).is_none());
    }

    /// A copy parked while the stream was unordered, woken after its receiver was
    /// registered again as ordered (which counts what is in progress as handed
    /// out): it is delivered, not dropped below where the stream stands. And a parked
    /// copy its sender gave up on meanwhile is dropped, and says so.
    #[test]
    fn a_copy_parked_before_the_stream_became_ordered_is_still_delivered() {
        let now = Instant::now();
        let mut s = stream(false);
        let mut ready = Vec::new();
        s.on_data(now, data(1, 1), &mut ready);
        s.on_data(now, data(2, 1), &mut ready);
        assert_eq!(seqs(&ready), [1, 2]);
        ready.clear();
        s.park(2, Vec::new()); // a copy of a message in a handler elsewhere
        s.set_ordered(true, &mut ready);
        assert!(ready.is_empty());
        assert!(s.unpark(data(2, 1), &mut ready), "2 is still wanted");
        assert_eq!(seqs(&ready), [2]);
        ready.clear();
        // 3 parks; the sender gives it up (floor 5, with 4): 3 is dropped when woken.
        s.on_data(now, data(3, 1), &mut ready);
        assert_eq!(seqs(&ready), [3]);
        ready.clear();
        s.park(3, Vec::new());
        s.on_data(now, data(5, 5), &mut ready);
        assert_eq!(seqs(&ready), [5]);
        ready.clear();
        assert!(!s.unpark(data(3, 1), &mut ready), "its sender gave 3 up");
        assert!(ready.is_empty());
    }

    /// One step of the ordered-stream model below.
    #[derive(Clone, Debug)]
    enum Op {
        /// The sender (re)transmits its `n`-th unsettled message, with its floor.
        Arrive(usize),
        /// The application takes the next message made ready.
        HandOut,
        /// The next message made ready is refused before the application saw it (no
        /// receiver, a dedup refusal): it and the stream's later queued ones go back.
        Refuse,
        /// The application acks / nacks its `n`-th message in hand.
        Complete(usize),
        Fail(usize),
        /// The sender learns of the `n`-th acked message, or gives its `n`-th
        /// unsettled one up, and settles it.
        Ack(usize),
        GiveUp(usize),
        /// A stale copy of the `n`-th message arrives, carrying an old floor.
        Stale(usize, usize),
        /// The next message made ready duplicates a delivery still in progress
        /// elsewhere (same message ID): parked, the stream's later queued ones back.
        Park,
        /// The delivery the `n`-th parked message waited for failed (it goes back in
        /// line) or was acked (it is settled as a duplicate).
        Unpark(usize),
        SettleParked(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..8usize).prop_map(Op::Arrive),
            3 => Just(Op::HandOut),
            1 => Just(Op::Refuse),
            2 => (0..8usize).prop_map(Op::Complete),
            1 => (0..8usize).prop_map(Op::Fail),
            2 => (0..8usize).prop_map(Op::Ack),
            1 => (0..8usize).prop_map(Op::GiveUp),
            1 => (0..12usize, 0..8usize).prop_map(|(n, f)| Op::Stale(n, f)),
            1 => Just(Op::Park),
            1 => (0..8usize).prop_map(Op::Unpark),
            1 => (0..8usize).prop_map(Op::SettleParked),
        ]
    }

    /// The application's and the sender's side of one ordered stream, driven by `Op`s.
    #[derive(Default)]
    struct Model {
        /// Made ready by the stream, not yet handed to the application (the
        /// endpoint's queue of `Deliver` events).
        queued: std::collections::VecDeque<Data>,
        in_hand: Vec<u64>,
        acked: BTreeSet<u64>,
        /// Settled by the sender (acked, or given up).
        settled: BTreeSet<u64>,
        firsts: Vec<u64>,
        seen: BTreeSet<u64>,
        parked: Vec<Data>,
        /// Every floor the sender has sent, oldest first.
        floors: Vec<u64>,
    }

    const MESSAGES: u64 = 12;

    impl Model {
        fn unsettled(&self) -> Vec<u64> {
            (1..=MESSAGES)
                .filter(|s| !self.settled.contains(s))
                .collect()
        }

        fn floor(&self) -> u64 {
            self.unsettled().first().copied().unwrap_or(MESSAGES + 1)
        }

        /// The next queued message and the stream's later queued ones, taken back from
        /// the queue (as the endpoint does when it refuses or parks one).
        fn take_back(&mut self) -> Option<(Data, Vec<Data>)> {
            let d = self.queued.pop_front()?;
            let later = self
                .queued
                .iter()
                .filter(|l| l.seq > d.seq)
                .cloned()
                .collect();
            self.queued.retain(|l| l.seq < d.seq);
            Some((d, later))
        }

        /// The sender's retransmission timers, as a real sender runs them: what the
        /// stream reports held (its watermark, and the held ranges above it) is only
        /// re-checked, never retransmitted; the rest is retransmitted with the floor.
        /// (A model that retransmitted everything hid streams stuck behind a held
        /// message: the retransmission's floor moved them on.)
        fn retransmit_unheld(&mut self, s: &mut InboundStream) {
            let now = Instant::now();
            let held = s.held_above(s.received);
            for seq in self.unsettled() {
                let reported =
                    seq <= s.received || held.iter().any(|r| r.start <= seq && seq <= r.end);
                if !reported {
                    let mut ready = Vec::new();
                    self.floors.push(self.floor());
                    s.on_data(now, data(seq, self.floor()), &mut ready);
                    self.queued.extend(ready);
                }
            }
        }

        fn step(&mut self, s: &mut InboundStream, op: &Op) -> Result<(), String> {
            let now = Instant::now();
            match *op {
                Op::Arrive(n) => {
                    let unsettled = self.unsettled();
                    if let Some(&seq) = unsettled.get(n % unsettled.len().max(1)) {
                        let mut ready = Vec::new();
                        self.floors.push(self.floor());
                        s.on_data(now, data(seq, self.floor()), &mut ready);
                        self.queued.extend(ready);
                    }
                }
                Op::Stale(n, f) => {
                    if !self.floors.is_empty() {
                        let floor = self.floors[f % self.floors.len()];
                        let seq = (n as u64 % MESSAGES) + 1;
                        if seq >= floor {
                            let mut ready = Vec::new();
                            s.on_data(now, data(seq, floor), &mut ready);
                            self.queued.extend(ready);
                        }
                    }
                }
                Op::Park => {
                    // Unordered, the endpoint parks the one message and goes on.
                    let taken = match s.ordered {
                        true => self.take_back(),
                        false => self.queued.pop_front().map(|d| (d, Vec::new())),
                    };
                    if let Some((d, later)) = taken {
                        s.park(d.seq, later);
                        self.parked.push(d);
                    }
                }
                Op::Unpark(n) | Op::SettleParked(n) => {
                    if !self.parked.is_empty() {
                        let d = self.parked.remove(n % self.parked.len());
                        let mut ready = Vec::new();
                        if matches!(op, Op::Unpark(_)) {
                            if !s.unpark(d.clone(), &mut ready) && !self.settled.contains(&d.seq) {
                                return Err(format!("unsettled {} dropped when unparked", d.seq));
                            }
                        } else {
                            s.complete(now, d.seq, true);
                            s.drain_head(&mut ready);
                            self.acked.insert(d.seq);
                        }
                        self.queued.extend(ready);
                    }
                }
                Op::HandOut => {
                    if let Some(d) = self.queued.pop_front() {
                        if self.in_hand.contains(&d.seq) {
                            return Err(format!("{} handed out while in hand", d.seq));
                        }
                        if self.acked.contains(&d.seq) {
                            return Err(format!("{} handed out after it was acked", d.seq));
                        }
                        if self.seen.insert(d.seq) {
                            if s.ordered && self.firsts.last().is_some_and(|&l| l > d.seq) {
                                return Err(format!(
                                    "first delivery of {} after {:?}",
                                    d.seq, self.firsts
                                ));
                            }
                            self.firsts.push(d.seq);
                        }
                        self.in_hand.push(d.seq);
                    }
                }
                Op::Refuse => {
                    if let Some((d, later)) = self.take_back() {
                        let mut ready = Vec::new();
                        s.refuse(d.seq, later, &mut ready);
                        self.queued.extend(ready);
                    }
                }
                Op::Complete(n) | Op::Fail(n) => {
                    if !self.in_hand.is_empty() {
                        let seq = self.in_hand.remove(n % self.in_hand.len());
                        if matches!(op, Op::Complete(_)) {
                            // As the endpoint does: an ack may free what waits in line.
                            let mut ready = Vec::new();
                            s.complete(now, seq, true);
                            s.drain_head(&mut ready);
                            self.queued.extend(ready);
                            self.acked.insert(seq);
                        } else {
                            s.fail(seq);
                        }
                    }
                }
                Op::Ack(n) => {
                    let acked: Vec<u64> = self.acked.difference(&self.settled).copied().collect();
                    if let Some(&seq) = acked.get(n % acked.len().max(1)) {
                        self.settled.insert(seq);
                    }
                }
                Op::GiveUp(n) => {
                    let open: Vec<u64> = self
                        .unsettled()
                        .into_iter()
                        .filter(|s| !self.acked.contains(s))
                        .collect();
                    if let Some(&seq) = open.get(n % open.len().max(1)) {
                        self.settled.insert(seq);
                    }
                }
            }
            Ok(())
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 2000,
            // Next to this file, as the integration tests keep theirs.
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
            )),
            ..Default::default()
        })]

        /// Property (one stream; for ordered ones the ordered contract, rules 1-3):
        /// whatever the order of arrivals, retransmissions, stale copies, refusals,
        /// nacks, acks, give-ups and parked duplicates, (a) an ordered stream's
        /// application first sees its messages in seq order, (b) no stream hands out a
        /// message the application holds or has acked, and (c) no stream gets stuck:
        /// once the sender retransmits what it has not settled and the application
        /// acks what it gets, every message is acked or given up.
        #[test]
        fn a_stream_hands_out_once_in_order_and_never_sticks(
            ops in proptest::collection::vec(op(), 1..120), ordered in proptest::bool::ANY
        ) {
            let mut s = stream(ordered);
            let mut m = Model::default();
            for op in &ops {
                if let Err(e) = m.step(&mut s, op) {
                    return Err(proptest::test_runner::TestCaseError::fail(format!("{e} ({op:?})")));
                }
            }
            // Calm: the application acks what it holds, the sender retransmits what
            // it has not settled, in order, until nothing changes.
            while !m.parked.is_empty() {
                m.step(&mut s, &Op::Unpark(0)).map_err(proptest::test_runner::TestCaseError::fail)?;
            }
            for _ in 0..4 * MESSAGES {
                while !m.in_hand.is_empty() {
                    m.step(&mut s, &Op::Complete(0)).map_err(proptest::test_runner::TestCaseError::fail)?;
                }
                for n in 0..m.acked.len() {
                    m.step(&mut s, &Op::Ack(n)).map_err(proptest::test_runner::TestCaseError::fail)?;
                }
                m.retransmit_unheld(&mut s);
                while !m.queued.is_empty() {
                    m.step(&mut s, &Op::HandOut).map_err(proptest::test_runner::TestCaseError::fail)?;
                }
            }
            for n in 0..m.acked.len() {
                m.step(&mut s, &Op::Ack(n)).map_err(proptest::test_runner::TestCaseError::fail)?;
            }
            proptest::prop_assert!(m.unsettled().is_empty(), "stuck: {:?} unsettled, nd {}, reorder {:?}, held {:?}, received {}, cumulative {}, in progress {:?}, done {:?}", m.unsettled(), s.next_deliver, s.reorder.keys().collect::<Vec<_>>(), s.held, s.received, s.cumulative, s.in_progress, s.done);
        }
    }
}
