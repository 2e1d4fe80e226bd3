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
//! good (TCP's persist timer). Only a receiver that knows the stream can answer: when
//! three probes in a row go unanswered, the oldest blocked message goes instead, which
//! opens the stream there and brings its grant. Apart from that the stream never goes
//! past its credit.
//!
//! # Skipped seqs
//!
//! A seq that leaves the stream without an ack (handed off, given up) is never sent
//! again on it, and the receiver learns so only from a later frame's floor. When the
//! floor passes such a seq and no frame goes out to carry it, the oldest transmitted
//! message still unsettled is sent once more as it is (not counted as a
//! retransmission): an ordered receiver holding later messages then skips the gap.
//!
//! # Dormant streams
//!
//! A stream with nothing unsettled and nothing owed (no timer, probe, skipped seq or
//! hint of this run) can be put aside as a [`Dormant`] record: its next seq, its
//! credit and its counters, about 80 bytes where the live stream takes a few KiB. The
//! endpoint does so when it holds many streams (see `Endpoint::outbound_stream`); the
//! next send on the channel resumes the stream where it stopped, so the receiver sees
//! one stream with consecutive seqs either way.
//!
//! # Held messages
//!
//! A version-2 receiver also reports the seq up to which it holds every message
//! ([`crate::wire::Ack::received`]), and a version-5 receiver the ranges above that
//! watermark that its handlers hold ([`crate::wire::Ack::held`]: a receiver that
//! restarted holds its redeliveries with gaps between them). A message that waits in
//! the receiver's queue or in its handler is not lost, so its retransmission timer
//! only re-checks it every
//! `retry.backoff_cap` instead of retransmitting it every RTO. The re-check sends a
//! [`crate::wire::CreditProbe`] (at most one per RTO for the whole stream), which the
//! receiver answers with an ack of its current state: the ack that finished the
//! message may have been lost with no later traffic to repeat it, and the nack of a
//! message the receiver let go may have been lost too. The answer's cumulative ack
//! settles the first; its `received`, lower than before, un-holds the second, which
//! is then retransmitted as any other. A nack, a reconnect and a receiver restart
//! retransmit at once. With a version-1 receiver there is no credit; the node's window
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
//!
//! # Silent streams
//!
//! A receiver that has not answered the stream at all (no ack, nack or reject) for a
//! whole RTO is either slow to get CPU time or not getting the stream's frames, and
//! one retransmission tells which as well as a whole window of them. So, as TCP
//! retransmits only its oldest segment at an RTO, the first timer that expires on a
//! silent stream retransmits its message (the *probe*; the oldest, since first timers
//! expire in send order) and every other timer due before the receiver answers waits
//! one RTO after the probe. The answer decides what the others are:
//!
//! - it shows the receiver holds or settled everything sent before the probe: queued,
//!   not lost; nothing more goes ("Quiet streams" applies to what is left);
//! - it shows only the probe: the rest were lost; they go at once, one round trip
//!   after the probe rather than another RTO;
//! - it shows the probe and more but stops short of a message sent before the probe,
//!   and came at least the shortest round trip seen after the probe (so it can
//!   reflect it): that message is lost (on an ordered stream, the gap the receiver
//!   waits on, with messages above it held unreported) and goes at once as the next
//!   probe, paid from the retry budget, the rest still waiting (NewReno's partial
//!   ack, RFC 6582);
//! - none comes within the RTO, but the peer sent other frames at least the shortest
//!   round trip after the probe: the probe or its answer was lost, and the rest go
//!   then; otherwise one more probe, the wait doubling up to `retry.backoff_cap`
//!   (with `retry.max_attempts` set, only until the probes reach it).
//!
//! The shortest round trip is the least of the stream's RTT samples, the messages it
//! saw reported held after one transmission, and the peer's ping round trips (a
//! stream whose every message went in one burst long ago has no useful sample of its
//! own). An answer sooner than that after the probe is taken as one to the traffic
//! before it: it draws no copy (what it shows still counts as progress); without any
//! sample, answers are taken as they come. Over a 300 ms round trip (200 ms initial RTO) a first burst of 500 drew 258
//! copies before, 2 now (`tests/blackbox/pressure.rs`,
//! `k_delayed_link_150ms_second_burst_not_retransmitted`).
//!
//! Overtaken messages, nacks, reconnects and deadlines do not wait. Without this, a
//! receiver starved of CPU for an RTO drew a copy of every message of its senders'
//! bursts: 21 nodes on 2 cores beside two busy loops (`tests/blackbox/tails.rs`,
//! `t1`, `t6`) retransmitted up to 9 796 copies of 6 000 acked messages, and 0-64
//! with it.
//!
//! # Retries
//!
//! The stream arms and judges its retry timers through its [`RetryPolicy`]
//! ([`RetryPolicy::schedule`] on every transmission, [`RetryPolicy::on_timeout`] when a
//! timer fires) and owns its [`RttEstimator`], [`Backoff`] and [`RetryBudget`]. The
//! budget is the stream's own, not shared with the target's other streams. Fresh
//! sends and acked messages deposit into it; a retransmission it refuses is deferred
//! by one RTO and asks again, never dropped.
//!
//! # Timers
//!
//! A message's first retransmission timer is one RTO after its first transmission,
//! without jitter (as TCP's; jitter spreads the *retries* of many senders, and first
//! transmissions are already spread by when they were sent). Those timers are armed in
//! transmission order, so they go on a sorted queue instead of the heap: arming is a
//! push at the back, and the cumulative ack pops settled entries off the front, so the
//! queue holds about one window and the earliest timer is the oldest unacked message's
//! (a single per-stream timer, as TCP keeps). When the RTO has fallen since the last
//! entry, a new entry is raised to that entry's instant (it fires at most the drop
//! later, never earlier); a message whose deadline comes before that instant goes on
//! the heap instead, so deadlines stay exact. Every other timer — retransmissions
//! (jittered, backed off), held re-checks, quiet deferrals, deadlines of waiting
//! messages — is on a binary heap, which stays empty on a stream that loses nothing.
//! The heap entry per message this replaces was a quarter of the sender's CPU at
//! ~1 M msgs/s (issue 14).
//!
//! # Slot layout
//!
//! The window holds one slot per unacknowledged message (up to `max_in_flight`, 4096
//! by default, per stream), so a slot is kept within 64 bytes (one cache line; issue
//! 14): the payload handle and a few `u32`s, nothing else in line.
//!
//! - **Ids out of line.** Most messages carry the implicit `Seq` id; an explicit id (an
//!   application key, a relayed or hinted message's id) lives in a side map keyed by
//!   seq and the slot has a flag. The entry goes when the slot does (settle, give-up,
//!   reject, `take`), all through [`OutboundStream::remove`].
//! - **Timestamps as `u32` offsets** from a per-stream epoch (the stream's creation
//!   `now`): the latest transmission in microseconds, rounded down (RTT samples keep
//!   microsecond resolution, far below the 1 ms clock granularity and 200 ms RTO
//!   floor), the deadline in milliseconds, rounded up (a deadline never fires early;
//!   at most 1 ms late). `u32::MAX` means none.
//! - **Range.** Microseconds in a `u32` cover 71 minutes, so before it writes a
//!   timestamp the stream moves its epoch forward (by whole milliseconds, so every
//!   stored offset converts exactly) once `now` is 2³¹ µs (≈ 36 min) past it: a cost
//!   of one pass over the window per half hour of use. A value that does not fit (a
//!   deadline beyond ≈ 49 days, such as `Duration::MAX`; a transmission or deadline
//!   from before a moved epoch, i.e. a message unacked for over half an hour; an
//!   instant before the epoch) is kept exactly in a side map instead, marked
//!   `u32::MAX - 1` in the slot. No value is saturated or approximated beyond the
//!   rounding above, however long the stream lives.

use crate::id::{ChannelId, Guarantee, MessageId};
use crate::proto::config::ProtoConfig;
use crate::retry::{Backoff, GiveUp, RetryBudget, RetryDecision, RetryPolicy, RttEstimator};
use crate::wire::{Data, SeqRange, MAX_HELD_RANGES};
use bytes::Bytes;
use rustc_hash::FxHashMap;
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

/// Timer generation marking the paced resend a nack asked for (see
/// [`NACK_RESEND_MIN`]). Retransmission timers never use it.
const NACKED: u32 = u32::MAX - 1;

/// A nacked message is sent again at once if its last transmission is at least this
/// old, otherwise this long after it: a receiver's nacks cannot make the sender resend
/// one message more than ten times a second. (Regression: a receiver answering each
/// copy of a 1 MiB message with nacks had it resent ~900 times a second, a 12 500-fold
/// amplification of its 20-byte nacks, outside the retry budget.) A handler that nacks
/// sees the message again within about this long.
pub(crate) const NACK_RESEND_MIN: Duration = Duration::from_millis(100);

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

/// Slot timestamp: none (never transmitted; no deadline).
const NO_TIME: u32 = u32::MAX;

/// Slot timestamp: out of the offset range, kept exactly in a [`SlotTimes`] side map.
const WIDE_TIME: u32 = u32::MAX - 1;

/// How far `now` may get past the epoch before the epoch moves: half the range of a
/// microsecond `u32` offset (module docs, "Slot layout").
const REBASE_AFTER: Duration = Duration::from_micros(1 << 31);

/// One unacknowledged message (module docs, "Slot layout": at most 64 bytes).
#[derive(Debug)]
struct InFlight {
    payload: Bytes,
    /// Latest transmission, microseconds after the epoch (rounded down); [`NO_TIME`]:
    /// never transmitted; [`WIDE_TIME`]: in [`SlotTimes::wide_sent`].
    sent_us: u32,
    /// Deadline, milliseconds after the epoch (rounded up); [`NO_TIME`]: none;
    /// [`WIDE_TIME`]: in [`SlotTimes::wide_deadline`].
    deadline_ms: u32,
    attempts: u32,
    /// Generation of the armed timer; a popped timer entry with another value is stale.
    timer_gen: u32,
    /// Waiting in the transmit queue.
    queued: bool,
    /// A deadline timer is armed for it while it waits for node credit.
    waiting_armed: bool,
    /// A paced resend asked for by a nack is armed ([`NACKED`]).
    nack_armed: bool,
    /// Another nack came while it was armed (it may answer a newer copy).
    nack_again: bool,
    /// Carries an explicit id, kept in [`OutboundStream::ids`]; otherwise its id is
    /// the implicit `Seq { origin, channel, seq }`.
    has_id: bool,
    /// Payload type fingerprint of this message's sender (see `wire::Data::schema`):
    /// per message, as senders of different types may share a stream. (Regression: the
    /// stream kept the latest send's, so an `i64` queued just before a `u64` on the
    /// same channel went out as a `u64` and was decoded as one.)
    schema: u32,
    /// This message's guarantee: at-least-once and effectively-once messages may share
    /// a stream (see [`OutboundStream::admits`]), and each frame says which it is.
    guarantee: Guarantee,
}

// Issue 14: a window slot fits in one cache line.
const _: () = assert!(std::mem::size_of::<Option<InFlight>>() <= 64);

/// A slot taken out of the window, with its out-of-line parts put back together.
struct Removed {
    payload: Bytes,
    id: Option<MessageId>,
    last_sent: Sent,
    attempts: u32,
}

/// A removed slot's latest transmission.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Never,
    /// Microseconds after the epoch.
    Offset(u32),
    At(Instant),
}

/// The epoch slot timestamps are offsets from, and the timestamps that do not fit
/// (module docs, "Slot layout").
#[derive(Debug)]
struct SlotTimes {
    epoch: Instant,
    /// Every millisecond offset below [`WIDE_TIME`] is a representable instant (false
    /// only for an epoch within 49 days of the clock's end).
    fits: bool,
    /// Exact latest transmissions of slots marked [`WIDE_TIME`], by seq.
    wide_sent: FxHashMap<u64, Instant>,
    /// Exact deadlines of slots marked [`WIDE_TIME`], by seq.
    wide_deadline: FxHashMap<u64, Instant>,
    /// The last `now` given to [`Self::advance`] and its age: a burst of frames
    /// transmitted at one `now` subtracts the epoch once, not once per frame.
    last: Option<(Instant, Duration)>,
}

impl SlotTimes {
    fn new(epoch: Instant) -> Self {
        SlotTimes {
            epoch,
            fits: fits(epoch),
            wide_sent: FxHashMap::default(),
            wide_deadline: FxHashMap::default(),
            last: None,
        }
    }

    /// `m`'s latest transmission (the hot paths read the offset directly).
    #[cfg(test)]
    fn sent(&self, seq: u64, m: &InFlight) -> Option<Instant> {
        match m.sent_us {
            NO_TIME => None,
            WIDE_TIME => self.wide_sent.get(&seq).copied(),
            us => Some(self.epoch + Duration::from_micros(u64::from(us))),
        }
    }

    fn deadline(&self, seq: u64, m: &InFlight) -> Option<Instant> {
        match m.deadline_ms {
            NO_TIME => None,
            WIDE_TIME => self.wide_deadline.get(&seq).copied(),
            ms => Some(self.epoch + Duration::from_millis(u64::from(ms))),
        }
    }

    /// The instant of a removed slot's latest transmission (`None`: never sent). An
    /// offset always converts: it was taken from an instant at or after the epoch.
    /// When `seq` (slot `m`) was last transmitted, if it was.
    fn sent_at(&self, seq: u64, m: &InFlight) -> Option<Instant> {
        match m.sent_us {
            NO_TIME => None,
            WIDE_TIME => self.wide_sent.get(&seq).copied(),
            us => self.instant(Sent::Offset(us)),
        }
    }

    fn instant(&self, sent: Sent) -> Option<Instant> {
        match sent {
            Sent::Never => None,
            Sent::Offset(us) => self.epoch.checked_add(Duration::from_micros(u64::from(us))),
            Sent::At(at) => Some(at),
        }
    }

    /// Record `at` as `m`'s latest transmission; `us` is `at` as an offset
    /// ([`Self::advance`], [`micros_down`]), if it has one.
    fn set_sent(&mut self, seq: u64, m: &mut InFlight, at: Instant, us: Option<u32>) {
        if m.sent_us == WIDE_TIME {
            self.wide_sent.remove(&seq);
        }
        m.sent_us = match us {
            Some(us) => us,
            None => {
                self.wide_sent.insert(seq, at);
                WIDE_TIME
            }
        };
    }

    /// The slot encoding of the deadline of a message sent at `now` (`age` after the
    /// epoch, [`Self::advance`]), `timeout` after it.
    fn encode_deadline(
        &mut self,
        seq: u64,
        now: Instant,
        age: Option<Duration>,
        timeout: Option<Duration>,
    ) -> u32 {
        let Some(timeout) = timeout else {
            return NO_TIME;
        };
        // `epoch + age + timeout` is `now + timeout`, rounded up to a millisecond.
        let ms = age
            .filter(|_| self.fits)
            .and_then(|a| a.checked_add(timeout))
            .and_then(millis_up);
        match ms {
            Some(ms) => ms,
            None => {
                self.wide_deadline.insert(seq, later(now, timeout));
                WIDE_TIME
            }
        }
    }

    /// `now` after the epoch (`None`: before it), first moving the epoch if `now` has
    /// got [`REBASE_AFTER`] past it.
    fn advance(
        &mut self,
        now: Instant,
        base: u64,
        slots: &mut VecDeque<Option<InFlight>>,
    ) -> Option<Duration> {
        if let Some((at, age)) = self.last {
            if at == now {
                return Some(age);
            }
        }
        let mut age = now.checked_duration_since(self.epoch)?;
        if age >= REBASE_AFTER {
            self.rebase(now, base, slots);
            age = now.checked_duration_since(self.epoch)?;
        }
        self.last = Some((now, age));
        Some(age)
    }

    /// Move the epoch to `now` (rounded down to a whole millisecond past the old one)
    /// if `now` has got [`REBASE_AFTER`] past it, re-expressing every slot's offsets.
    fn rebase(&mut self, now: Instant, base: u64, slots: &mut VecDeque<Option<InFlight>>) {
        let Some(age) = now.checked_duration_since(self.epoch) else {
            return;
        };
        if age < REBASE_AFTER {
            return;
        }
        let delta_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let delta_us = delta_ms.saturating_mul(1000);
        let old = self.epoch;
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(m) = slot.as_mut() else {
                continue;
            };
            let seq = base + i as u64;
            if !matches!(m.sent_us, NO_TIME | WIDE_TIME) {
                let us = u64::from(m.sent_us);
                m.sent_us = match us.checked_sub(delta_us) {
                    // Below `us`, which fits.
                    Some(rel) => rel as u32,
                    None => {
                        self.wide_sent.insert(seq, old + Duration::from_micros(us));
                        WIDE_TIME
                    }
                };
            }
            if !matches!(m.deadline_ms, NO_TIME | WIDE_TIME) {
                let ms = u64::from(m.deadline_ms);
                m.deadline_ms = match ms.checked_sub(delta_ms) {
                    Some(rel) => rel as u32,
                    None => {
                        self.wide_deadline
                            .insert(seq, old + Duration::from_millis(ms));
                        WIDE_TIME
                    }
                };
            }
        }
        // `delta_ms` whole milliseconds are at most `age`: `old + age` is `now`.
        self.epoch = old + Duration::from_millis(delta_ms);
        self.fits = fits(self.epoch);
        self.last = None;
    }
}

/// [`OutboundStream::admits`] for a stream of `stream` guarantee, `claimed` or not.
pub(crate) fn admits(stream: Guarantee, claimed: bool, guarantee: Guarantee, app: bool) -> bool {
    if app && claimed {
        return guarantee == stream;
    }
    same_class(stream, guarantee)
}

/// Both at-most-once, or both acked.
fn same_class(a: Guarantee, b: Guarantee) -> bool {
    (a == Guarantee::AtMostOnce) == (b == Guarantee::AtMostOnce)
}

/// Sending half of a stream. Call order for the owner: `send` / `handle_ack` /
/// `handle_nack` / `handle_timeout` / `handle_reconnect` as inputs arrive, then drain
/// `poll_transmit` and `poll_event`, then arm a timer for `poll_timeout`.
#[derive(Debug)]
pub(crate) struct OutboundStream {
    channel: ChannelId,
    origin: crate::id::Origin,
    /// The stream's guarantee: at-most-once, or one of the acked two (see
    /// [`admits`](Self::admits)).
    guarantee: Guarantee,
    /// An application send fixed [`guarantee`](Self::guarantee) for this run; until
    /// then only hint replays used the stream, under their own runs' guarantees.
    claimed: bool,
    /// An application send of this guarantee was refused because the stream, not yet
    /// claimed, carries replays of the other class: no new replay of that class is
    /// taken, and once the stream settles it goes to this guarantee.
    wanted: Option<Guarantee>,
    /// An effectively-once message went out on the stream: its receiver keeps dedup
    /// state for it, which [`Frame::Finish`](crate::wire::Frame) retires.
    eo_sent: bool,
    next_seq: u64,
    /// The highest seq ever put on the wire: an ack or reject can only be about a
    /// message the receiver could have seen (one still waiting for credit was not).
    max_sent: u64,
    /// Seq of `slots[0]`; everything below is settled.
    base: u64,
    slots: VecDeque<Option<InFlight>>,
    /// Explicit ids of the slots flagged `has_id`, by seq (module docs, "Slot layout").
    ids: FxHashMap<u64, MessageId>,
    /// Epoch of the slots' timestamps, and those that do not fit in line.
    times: SlotTimes,
    /// Implicit-id seqs that were handed off and whose hints are not yet delivered: they
    /// hold the id floor down.
    hinted: BTreeSet<u64>,
    /// Timers of first transmissions, `(due, seq, generation)` in ascending `due`
    /// (module docs, "Timers"); settled entries leave the front as the window moves.
    first: VecDeque<(Instant, u64, u32)>,
    /// Every other timer: retransmissions, re-checks, deferrals and deadlines that
    /// would break `first`'s order.
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    transmit: VecDeque<u64>,
    rtt: RttEstimator,
    backoff: Backoff,
    budget: RetryBudget,
    /// Attempt limit, default deadline, and the timer each transmission arms.
    policy: RetryPolicy,
    amo_slack: u64,
    events: VecDeque<OutEvent>,
    retransmits: u64,
    /// Slots freed at the front since the last `take_opened`.
    opened: u64,
    /// First (and only) transmission of the newest never-retransmitted message settled
    /// by the current ack frame, its RTT sample: one estimator update per ack frame,
    /// not per message.
    sample: Option<Sent>,
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
    /// Seqs at or above `base` that left the stream without an ack (handed off, given
    /// up): the receiver may wait for them until a frame's floor passes them.
    skipped: BTreeSet<u64>,
    /// The floor passed a skipped seq: a data frame must carry it to the receiver.
    floor_owed: bool,
    credit_waits: u64,
    credit_probes: u64,
    /// The receiver holds every seq `<= held` (not lost, just not finished yet).
    held: u64,
    /// And every seq of these inclusive spans above `held`, ascending and disjoint, at
    /// most [`MAX_HELD_RANGES`] ([`crate::wire::Ack::held`], protocol version 5).
    held_spans: Vec<(u64, u64)>,
    /// When a held message's re-check last asked for the stream's state, and how
    /// often it did.
    last_held_probe: Option<Instant>,
    held_probes: u64,
    /// Times `poll_transmit` stopped for lack of node credit.
    node_waits: u64,
    /// The last `poll_transmit` stopped for lack of node credit (nothing went out
    /// since): every queued message's deadline timer is armed, and so is each new one.
    starved: bool,
    /// Credit probes sent since the receiver last acked anything.
    unanswered_probes: u32,
    /// When an ack last settled a message or advanced `held`: see "Quiet streams".
    last_progress: Option<Instant>,
    /// Highest seq an ack settled: a message below it that is neither settled nor
    /// held was overtaken, so it is lost rather than queued ("Quiet streams").
    highest_acked: u64,
    /// One retransmission at a time while the receiver is silent ("Silent streams").
    gate: SilenceGate,
    /// Set by `settle` when an ack settles a message transmitted once: evidence the
    /// receiver got more than a probe.
    settled_original: bool,
    /// The shortest round trip seen (an ack's RTT sample, or a message reported held
    /// after one transmission): no answer to a probe comes sooner.
    min_rtt: Option<Duration>,
}

/// The "Silent streams" state of a stream.
#[derive(Debug, Default)]
struct SilenceGate {
    /// When the receiver last answered the stream (`answered`) or, when it has not
    /// answered since, when the last probe went out. `None`: neither yet.
    since: Option<Instant>,
    /// Whether `since` is an answer (retransmissions go freely until one RTO after it)
    /// rather than a probe (others wait until one gap after it).
    answered: bool,
    /// Probes in a row that went unanswered without the peer being heard at least a
    /// round trip after them: the wait after the next one doubles.
    unanswered: u32,
    /// When the peer last sent any frame (the endpoint's, passed to
    /// `handle_timeout`).
    heard: Option<Instant>,
    /// Highest seq retransmitted as a probe since the last answer.
    probe_high: u64,
    /// Seqs (with their timer generation) whose timers wait for the answer to the
    /// probe.
    waiting: Vec<(u64, u32)>,
}

impl SilenceGate {
    /// A retransmission timer is due (not held, not overtaken, not quiet): `None` if
    /// it may go now, or until when it waits for the receiver to answer the probe.
    ///
    /// With an attempt limit, the gate opens once the receiver left as many probes in a
    /// row unanswered as the limit allows one message retransmissions: each message
    /// then counts its own attempts, so the limit still ends them in its time.
    fn holds(
        &self,
        now: Instant,
        rto: Duration,
        cap: Duration,
        max_attempts: Option<u32>,
    ) -> Option<Instant> {
        if max_attempts.is_some_and(|a| self.unanswered.saturating_add(2) >= a) {
            return None;
        }
        match self.since {
            Some(s) if !self.answered => {
                let until = later(s, self.gap(rto, cap));
                (now < until).then_some(until)
            }
            _ => None,
        }
    }

    /// The wait after a probe: one RTO, doubling for each probe before it that went
    /// unanswered while the peer sent nothing at all, up to `cap`.
    fn gap(&self, rto: Duration, cap: Duration) -> Duration {
        rto.saturating_mul(1 << self.unanswered.min(16))
            .min(cap.max(rto))
    }

    /// A retransmission that `holds` let go is on its way. It is the probe, unless
    /// the receiver answered within the last RTO, or the last probe's wait passed
    /// without an answer while the peer sent other frames: then the probe or its
    /// answer was lost, not the receiver starved, and the rest go too (for an RTO;
    /// one copy at a time over a lossy link is too slow).
    ///
    /// `min_rtt`: the shortest round trip seen; a frame from the peer says the probe
    /// (or its answer) was lost only if it came at least that long after the probe —
    /// sent after the probe could have arrived. Without a sample, it says nothing.
    fn retransmitting(&mut self, now: Instant, seq: u64, rto: Duration, min_rtt: Option<Duration>) {
        match self.since {
            Some(s) if self.answered && now < later(s, rto) => return,
            Some(s) if !self.answered => {
                let talked = match (self.heard, min_rtt) {
                    (Some(h), Some(m)) => h >= later(s, m),
                    _ => false,
                };
                if talked {
                    self.since = Some(now);
                    self.answered = true;
                    self.unanswered = 0;
                    self.probe_high = 0;
                    return;
                }
                self.unanswered = self.unanswered.saturating_add(1);
            }
            _ => {}
        }
        self.since = Some(now);
        self.answered = false;
        self.probe_high = self.probe_high.max(seq);
    }

    /// A partial answer to the probe found `seq` lost: it goes now as the next probe.
    fn reprobe(&mut self, now: Instant, seq: u64) {
        self.since = Some(now);
        self.answered = false;
        self.unanswered = 0;
        self.probe_high = self.probe_high.max(seq);
    }

    /// Whether a probe is out and not answered yet.
    fn probing(&self) -> bool {
        self.since.is_some() && !self.answered
    }

    /// The receiver answered the stream: open the gate, and hand back the timers that
    /// waited for it.
    fn answer(&mut self, now: Instant) -> Vec<(u64, u32)> {
        self.since = Some(now);
        self.answered = true;
        self.unanswered = 0;
        self.probe_high = 0;
        std::mem::take(&mut self.waiting)
    }
}

/// Counters of one stream that outlive it going dormant (see "Dormant streams").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) retransmits: u64,
    pub(crate) credit_waits: u64,
    pub(crate) credit_probes: u64,
    pub(crate) held_probes: u64,
    pub(crate) node_waits: u64,
}

impl Counters {
    pub(crate) fn add(&mut self, o: &Counters) {
        self.retransmits += o.retransmits;
        self.credit_waits += o.credit_waits;
        self.credit_probes += o.credit_probes;
        self.held_probes += o.held_probes;
        self.node_waits += o.node_waits;
    }

    pub(crate) fn sub(&mut self, o: &Counters) {
        self.retransmits -= o.retransmits;
        self.credit_waits -= o.credit_waits;
        self.credit_probes -= o.credit_probes;
        self.held_probes -= o.held_probes;
        self.node_waits -= o.node_waits;
    }
}

/// What a settled, quiet stream keeps while it is put aside (see "Dormant streams").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dormant {
    pub(crate) guarantee: Guarantee,
    /// See [`OutboundStream::admits`].
    pub(crate) claimed: bool,
    /// An effectively-once message went out on the stream.
    pub(crate) eo_sent: bool,
    /// The seq its next message gets.
    pub(crate) next_seq: u64,
    /// The receiver's grant, as [`OutboundStream::set_credit`] takes it.
    pub(crate) credit: Option<u64>,
    pub(crate) counters: Counters,
}

impl Dormant {
    /// The grant a fresh receiver run starts the stream with
    /// ([`OutboundStream::initial_credit`]).
    pub(crate) fn initial_credit(&self) -> u64 {
        self.next_seq
            .saturating_sub(1)
            .saturating_add(INITIAL_CREDIT)
    }
}

impl OutboundStream {
    /// The stream as a [`Dormant`] record, if it holds nothing that would be lost:
    /// every message settled, no timer, probe, event or frame owed, no skipped seq the
    /// receiver still has to learn of, no hint of this run outstanding.
    pub(crate) fn dormant(&self) -> Option<Dormant> {
        let idle = self.is_quiet()
            && self.hinted.is_empty()
            && self.skipped.is_empty()
            && !self.floor_owed
            && self.ids.is_empty();
        // A stream the application wanted under another guarantee goes to it, still
        // unclaimed: the application's next send claims it, whichever guarantee that
        // is, as on the live stream. (Regression: the record was claimed at-most-once,
        // so after a sweep an at-least-once send failed for the rest of the run where
        // the live stream took it, though no at-most-once send had ever succeeded.)
        idle.then(|| Dormant {
            guarantee: self.wanted.unwrap_or(self.guarantee),
            claimed: self.claimed,
            eo_sent: self.eo_sent,
            next_seq: self.next_seq,
            credit: self.credit,
            counters: self.counters(),
        })
    }

    /// A stream resumed from its [`Dormant`] record: its next message gets the seq it
    /// would have had, under the same credit, and its counters go on from theirs.
    pub(crate) fn resume(
        origin: crate::id::Origin,
        channel: ChannelId,
        config: &ProtoConfig,
        seed: u64,
        now: Instant,
        d: &Dormant,
    ) -> Self {
        let mut s = Self::new(origin, channel, d.guarantee, config, seed, now, d.credit);
        s.claimed = d.claimed;
        s.eo_sent = d.eo_sent;
        s.next_seq = d.next_seq;
        s.base = d.next_seq;
        s.max_sent = d.next_seq - 1;
        s.highest_acked = d.next_seq - 1;
        s.retransmits = d.counters.retransmits;
        s.credit_waits = d.counters.credit_waits;
        s.credit_probes = d.counters.credit_probes;
        s.held_probes = d.counters.held_probes;
        s.node_waits = d.counters.node_waits;
        s
    }

    /// The stream's counters.
    pub(crate) fn counters(&self) -> Counters {
        Counters {
            retransmits: self.retransmits,
            credit_waits: self.credit_waits,
            credit_probes: self.credit_probes,
            held_probes: self.held_probes,
            node_waits: self.node_waits,
        }
    }

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
            claimed: false,
            wanted: None,
            eo_sent: false,
            next_seq: 1,
            max_sent: 0,
            base: 1,
            slots: VecDeque::new(),
            ids: FxHashMap::default(),
            times: SlotTimes::new(now),
            hinted: BTreeSet::new(),
            first: VecDeque::new(),
            timers: BinaryHeap::new(),
            transmit: VecDeque::new(),
            rtt: RttEstimator::new(config.rtt),
            backoff: Backoff::new(&config.retry, seed),
            budget: RetryBudget::new(config.retry_budget, now),
            policy: config.retry,
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
            skipped: BTreeSet::new(),
            floor_owed: false,
            credit_waits: 0,
            credit_probes: 0,
            held: 0,
            held_spans: Vec::new(),
            last_held_probe: None,
            held_probes: 0,
            node_waits: 0,
            starved: false,
            unanswered_probes: 0,
            last_progress: None,
            highest_acked: 0,
            gate: SilenceGate::default(),
            settled_original: false,
            min_rtt: None,
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

    /// Move blocked seqs the credit now covers back into the queue, in seq order: after
    /// first transmissions still queued from an earlier grant (waiting for node credit),
    /// before newer ones. (Regression: they went to the front, ahead of an earlier
    /// grant's seqs still queued, so a stream's first transmissions left out of order;
    /// an at-most-once receiver, whose grant follows the highest seq seen, then counted
    /// the late ones against no grant and overflowed its window.)
    fn unblock(&mut self) {
        let limit = self.credit.unwrap_or(u64::MAX);
        let mut n = 0;
        while self.blocked.get(n).is_some_and(|s| *s <= limit) {
            n += 1;
        }
        if n > 0 {
            let lowest = self.blocked[0];
            // Newer seqs queued since these were blocked sit at the back.
            let mut at = self.transmit.len();
            while at > 0 && self.transmit[at - 1] > lowest {
                at -= 1;
            }
            let newer = self.transmit.split_off(at);
            self.transmit.extend(self.blocked.drain(..n));
            self.transmit.extend(newer);
        }
        if self.blocked.is_empty() {
            self.probe_due = None;
        }
    }

    pub(crate) fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    /// Has an effectively-once message gone out on the stream (its receiver then
    /// keeps dedup state for it)?
    pub(crate) fn eo_sent(&self) -> bool {
        self.eo_sent
    }

    /// May a message with `guarantee` go on this stream; `app`: an application send
    /// (else a hint replay)? At-least-once and effectively-once messages may share a
    /// stream (each frame carries its message's guarantee, and the receiver dedups per
    /// message), so an earlier run's hints replay under their own guarantee on a
    /// channel this run uses with the other one. The application itself gets one
    /// guarantee per channel: its first send claims the stream's. At-most-once never
    /// shares (it is never retransmitted and its floor trails differently).
    pub(crate) fn admits(&self, guarantee: Guarantee, app: bool) -> bool {
        let wanted_ok = app || self.wanted.is_none_or(|w| same_class(w, guarantee));
        wanted_ok && admits(self.guarantee, self.claimed, guarantee, app)
    }

    /// The application wants the stream (not yet claimed) under `guarantee`, which it
    /// does not [`admit`](Self::admits) now: no replay of the other class is taken
    /// from now on, and the stream goes to `guarantee` once settled
    /// ([`dormant`](Self::dormant)).
    pub(crate) fn want(&mut self, guarantee: Guarantee) {
        debug_assert!(!self.claimed);
        self.wanted = Some(guarantee);
    }

    pub(crate) fn is_claimed(&self) -> bool {
        self.claimed
    }

    /// An application send with `guarantee` (which [`admits`](Self::admits)) claims
    /// the stream.
    pub(crate) fn claim(&mut self, guarantee: Guarantee) {
        self.guarantee = guarantee;
        self.claimed = true;
        self.wanted = None;
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
    #[cfg(test)]
    pub(crate) fn send(
        &mut self,
        now: Instant,
        payload: Bytes,
        id: Option<MessageId>,
        deadline: Option<Duration>,
        schema: u32,
    ) -> u64 {
        self.send_as(now, self.guarantee, payload, id, deadline, schema)
    }

    /// [`send`](Self::send) a message with its own `guarantee`, which the stream
    /// [`admits`](Self::admits).
    pub(crate) fn send_as(
        &mut self,
        now: Instant,
        guarantee: Guarantee,
        payload: Bytes,
        id: Option<MessageId>,
        deadline: Option<Duration>,
        schema: u32,
    ) -> u64 {
        debug_assert!(self.admits(guarantee, false));
        let age = self.times.advance(now, self.base, &mut self.slots);
        let seq = self.next_seq;
        self.next_seq += 1;
        // At-most-once keeps nothing past transmission: no budget, no deadline.
        let deadline = if self.guarantee == Guarantee::AtMostOnce {
            None
        } else {
            self.budget.deposit(now);
            deadline.or(self.policy.deadline)
        };
        let deadline_ms = self.times.encode_deadline(seq, now, age, deadline);
        self.eo_sent |= guarantee == Guarantee::EffectivelyOnce;
        if let Some(id) = id {
            self.ids.insert(seq, id);
        }
        self.slots.push_back(Some(InFlight {
            payload,
            sent_us: NO_TIME,
            deadline_ms,
            attempts: 0,
            timer_gen: 0,
            queued: true,
            waiting_armed: false,
            nack_armed: false,
            nack_again: false,
            has_id: id.is_some(),
            schema,
            guarantee,
        }));
        self.transmit.push_back(seq);
        if self.starved {
            self.arm_waiting(seq);
        }
        seq
    }

    /// Next frame to put on the wire, if `budget` (the node-level credit left, in data
    /// frames) allows one; a frame returned used one unit of it.
    pub(crate) fn poll_transmit(&mut self, now: Instant, budget: &mut u64) -> Option<Data> {
        let amo = self.guarantee == Guarantee::AtMostOnce;
        let now_us = self
            .times
            .advance(now, self.base, &mut self.slots)
            .and_then(micros_down);
        while let Some(&seq) = self.transmit.front() {
            if *budget == 0 {
                // Waits for node credit; the deadlines of the messages queued still
                // run, each its own (senders on one stream may set different ones).
                // Armed once when the credit runs out, then as each new message is
                // queued. (Regression: only the head's was armed, so a message with a
                // shorter deadline behind it failed only after the head gave up.)
                if !self.starved {
                    self.starved = true;
                    let queued: Vec<u64> = self.transmit.iter().copied().collect();
                    for s in queued {
                        self.arm_waiting(s);
                    }
                }
                self.node_waits += 1;
                return None;
            }
            self.starved = false;
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
                    .and_then(|i| self.times.deadline(seq, self.slots[i].as_ref()?))
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
            self.max_sent = self.max_sent.max(seq);
            self.times.set_sent(seq, m, now, now_us);
            let frame = Data {
                channel: self.channel,
                seq,
                floor,
                id_floor,
                id: if m.has_id {
                    self.ids.get(&seq).copied()
                } else {
                    None
                },
                guarantee: m.guarantee,
                schema: m.schema,
                // At-most-once settles on this transmission: the frame takes the
                // payload instead of sharing it (no reference count up and down).
                payload: if amo {
                    std::mem::take(&mut m.payload)
                } else {
                    m.payload.clone()
                },
            };
            if amo {
                self.settle(seq, None);
            } else {
                let deadline = self.times.deadline(seq, m);
                m.timer_gen = next_gen(m.timer_gen);
                let gen = m.timer_gen;
                let rto = if m.attempts == 1 {
                    first_timeout(&self.rtt, deadline, now)
                } else {
                    self.rtt.rto()
                };
                let due = self
                    .policy
                    .schedule(&mut self.backoff, rto, m.attempts, deadline, now);
                if m.attempts == 1 {
                    // A first transmission's timer (one RTO, unjittered) goes on the
                    // stream's sorted queue (module docs, "Timers").
                    self.arm_first(due, deadline, seq, gen);
                } else {
                    self.timers.push(Reverse((due, seq, gen)));
                }
            }
            *budget -= 1;
            self.floor_owed = false; // the frame carries the floor
            return Some(frame);
        }
        self.floor_frame(budget)
    }

    /// Arm the timer of `seq`'s first transmission (module docs, "Timers"): on the
    /// sorted `first` queue at `due` (one RTO, or the deadline if earlier:
    /// [`RetryPolicy::schedule`]), raised to the queue's last instant if the RTO fell
    /// since; a deadline before that instant goes to the heap instead, so it still
    /// fires on time.
    fn arm_first(&mut self, due: Instant, deadline: Option<Instant>, seq: u64, gen: u32) {
        match self.first.back() {
            Some(&(last, _, _)) if due < last => {
                if deadline.is_some_and(|d| d < last) {
                    self.timers.push(Reverse((due, seq, gen)));
                } else {
                    self.first.push_back((last, seq, gen));
                }
            }
            _ => self.first.push_back((due, seq, gen)),
        }
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
            if let Some(d) = self.times.deadline(seq, m) {
                m.waiting_armed = true;
                self.timers.push(Reverse((d, seq, WAITING)));
            }
        }
    }

    /// Nothing to do until the stream is used again: nothing in flight, queued, blocked,
    /// timed or owed, and no event or freed slot unreported. (The endpoint's scans skip
    /// such a stream; any later use borrows it mutably, which makes it active again.)
    pub(crate) fn is_quiet(&self) -> bool {
        self.slots.is_empty()
            && self.transmit.is_empty()
            && self.blocked.is_empty()
            && self.events.is_empty()
            && self.first.is_empty()
            && self.timers.is_empty()
            && self.probe_due.is_none()
            && !self.probe_owed
            && self.opened == 0
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
        [
            self.timers.peek().map(|Reverse((t, _, _))| *t),
            self.first.front().map(|(t, _, _)| *t),
            self.probe_due,
        ]
        .into_iter()
        .flatten()
        .min()
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
    /// `heard`: when the peer last sent any frame; `peer_rtt`: the shortest ping
    /// round trip to it ("Silent streams").
    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        heard: Option<Instant>,
        peer_rtt: Option<Duration>,
    ) {
        self.gate.heard = heard;
        if let Some(r) = peer_rtt {
            self.note_rtt(r);
        }
        if self.probe_due.is_some_and(|t| t <= now) {
            self.probe_due = None;
            if !self.blocked.is_empty() {
                self.probes = self.probes.saturating_add(1);
                self.credit_probes += 1;
                self.probe_owed = true;
                self.probe_due = Some(now + self.probe_interval());
                self.unanswered_probes = self.unanswered_probes.saturating_add(1);
                if self.unanswered_probes > 2 {
                    // Probes go unanswered: a receiver run that never saw this stream
                    // cannot answer a data-less probe. At-most-once: it restarted, and
                    // what it was sent arrived before its receiver registered. Any
                    // guarantee: the seqs the grant covered left the stream before
                    // their first transmission (handed off, given up), so nothing of
                    // the stream reached the receiver run. The oldest blocked message
                    // goes instead, which opens the stream there and brings its credit
                    // back. (A receiver that answers, however busy, resets the count:
                    // its grant is never exceeded this way.) (Regression: after a
                    // target restart the first 256 live sends were handed off behind
                    // this run's own hints before going out; the replay's hints next
                    // in the stream waited on credit from a target run that had seen
                    // nothing and ignored the probes: 0 of 9 000 hints in 20 s.)
                    if let (Some(c), Some(&head)) = (self.credit, self.blocked.front()) {
                        self.credit = Some(c.max(head));
                        self.unblock();
                    }
                }
            }
        }
        loop {
            let first = self.first.front().copied().filter(|e| e.0 <= now);
            let heap = self
                .timers
                .peek()
                .map(|Reverse(e)| *e)
                .filter(|e| e.0 <= now);
            let (seq, gen) = match (first, heap) {
                (Some(f), Some(h)) if h.0 < f.0 => {
                    self.timers.pop();
                    (h.1, h.2)
                }
                (Some(f), _) => {
                    self.first.pop_front();
                    (f.1, f.2)
                }
                (None, Some(h)) => {
                    self.timers.pop();
                    (h.1, h.2)
                }
                (None, None) => break,
            };
            self.fire(now, seq, gen);
        }
    }

    /// Timer `gen` of `seq` is due: retransmit, give up, or re-arm it.
    fn fire(&mut self, now: Instant, seq: u64, gen: u32) {
        let Some(idx) = self.index(seq) else {
            return;
        };
        let held = self.is_held(seq);
        let Some(m) = self.slots[idx].as_mut() else {
            return;
        };
        let deadline = self.times.deadline(seq, m);
        // The policy's verdict. The deadline ends a message whatever it waits for;
        // the attempt limit only where a retransmission is due (below), since it
        // bounds transmissions, not waiting for a receiver that holds the message.
        let decision = self.policy.on_timeout(m.attempts, deadline, now);
        let expired = decision == RetryDecision::GiveUp(GiveUp::Deadline);
        if gen == NACKED {
            if !m.nack_armed {
                return;
            }
            m.nack_armed = false;
            let again = std::mem::take(&mut m.nack_again);
            if expired {
                self.give_up(seq, GiveUp::Deadline);
                return;
            }
            if m.queued {
                return;
            }
            // A copy that went out since (a timer's retransmission, a reconnect)
            // answers the nack; a nack that came after it is paced from that copy.
            match self.times.sent_at(seq, m) {
                Some(sent) if now < later(sent, NACK_RESEND_MIN) => {
                    if again {
                        m.nack_armed = true;
                        self.timers
                            .push(Reverse((later(sent, NACK_RESEND_MIN), seq, NACKED)));
                    }
                }
                _ => self.queue_retransmit(seq),
            }
            return;
        }
        if gen == WAITING {
            // Still waiting for credit (never sent, or a retransmission queued
            // behind node credit) at its deadline: give up.
            if (m.attempts == 0 || m.queued) && expired {
                self.give_up(seq, GiveUp::Deadline);
            }
            return;
        }
        if m.timer_gen != gen || m.queued {
            return; // stale entry
        }
        if expired {
            self.give_up(seq, GiveUp::Deadline);
            return;
        }
        if held {
            // The receiver has it; only re-check now and then (module docs, "Held
            // messages"). Its ack (or a nack) may have been lost with nothing after it
            // to repeat it: ask for the stream's state. One probe per RTO serves every
            // held message of the stream; the answer's cumulative ack settles what was
            // finished, its `received` un-holds what the receiver let go.
            if self
                .last_held_probe
                .is_none_or(|t| now >= later(t, self.rtt.rto()))
            {
                self.last_held_probe = Some(now);
                self.probe_owed = true;
                self.held_probes += 1;
            }
            // Re-checked at the retry policy's backoff cap.
            let mut next = later(now, self.policy.backoff_cap);
            if let Some(d) = deadline {
                next = next.min(d);
            }
            m.timer_gen = next_gen(m.timer_gen);
            self.timers.push(Reverse((next, seq, m.timer_gen)));
            return;
        }
        let overtaken = seq < self.highest_acked;
        if let Some(quiet_until) = self.last_progress.map(|p| later(p, self.rtt.rto())) {
            if now < quiet_until && !overtaken {
                // The receiver settled something within the last RTO: it is
                // working through its queue, so this message is more likely
                // queued than lost (module docs, "Quiet streams").
                let mut next = quiet_until;
                if let Some(d) = deadline {
                    next = next.min(d);
                }
                m.timer_gen = next_gen(m.timer_gen);
                self.timers.push(Reverse((next, seq, m.timer_gen)));
                return;
            }
        }
        if let RetryDecision::GiveUp(reason) = decision {
            self.give_up(seq, reason);
            return;
        }
        if !overtaken {
            let (rto, cap) = (self.rtt.rto(), self.policy.backoff_cap);
            if let Some(until) = self.gate.holds(now, rto, cap, self.policy.max_attempts) {
                // The receiver has not answered the probe yet (module docs,
                // "Silent streams").
                let mut next = until;
                if let Some(d) = deadline {
                    next = next.min(d);
                }
                m.timer_gen = next_gen(m.timer_gen);
                self.timers.push(Reverse((next, seq, m.timer_gen)));
                let gen = m.timer_gen;
                self.wait_for_answer(seq, gen);
                return;
            }
        }
        if !self.budget.try_withdraw(now) {
            // Over the retry budget: defer (never drop) the retry by one RTO, and by a
            // millisecond at least: an `Endpoint` built on a config that was never
            // validated (`max_rto` zero) re-armed the timer at `now`, and
            // `handle_timeout` popped it again for ever.
            let mut next = later(now, self.rtt.rto().max(Duration::from_millis(1)));
            if let Some(d) = deadline {
                next = next.min(d);
            }
            m.timer_gen = next_gen(m.timer_gen);
            self.timers.push(Reverse((next, seq, m.timer_gen)));
            return;
        }
        if m.attempts == 1 {
            // Its first timer ran out: the RTO may be too short, and Karn's rule gives
            // no sample from what is retransmitted. Back off new messages' first timers
            // until a clean sample (`RttEstimator::on_timeout`).
            if let Some(sent) = self.times.sent_at(seq, m) {
                self.rtt.on_timeout(now.saturating_duration_since(sent));
            }
        }
        if !overtaken {
            self.gate
                .retransmitting(now, seq, self.rtt.rto(), self.min_rtt);
        }
        self.queue_retransmit(seq);
    }

    /// Apply an ack from the receiver, with the credit it grants (if it grants any).
    pub(crate) fn handle_ack(
        &mut self,
        now: Instant,
        cumulative: u64,
        ranges: &[SeqRange],
        credit: Option<u64>,
        received: u64,
        held: &[SeqRange],
    ) {
        // Only what was transmitted can be acked: a receiver acking further (a buggy or
        // lying one) must not turn messages it never got into successes.
        let top = self.max_sent;
        self.unanswered_probes = 0;
        let received = received.min(top);
        // The answer to a probe shows progress only if the receiver holds or settled
        // more than the probes carried ("Silent streams"); the probes alone say the
        // rest was lost, not queued.
        let probing = self.gate.probing();
        let progress_before = self.last_progress;
        let probes_only_below = self
            .held
            .max(self.gate.probe_high)
            .max(self.held_spans.last().map_or(0, |&(_, end)| end));
        self.settled_original = false;
        if received > self.held {
            self.last_progress = Some(now);
            // The receiver reports what it holds within its ack delay of arrival, not
            // after its handler ran: the best round-trip floor there is.
            if let Some(m) = self.index(received).and_then(|i| self.slots[i].as_ref()) {
                if m.attempts == 1 {
                    if let Some(sent) = self.times.sent_at(received, m) {
                        self.note_rtt(now.saturating_duration_since(sent));
                    }
                }
            }
        }
        // The receiver's held watermark only falls when it let a message go (its
        // nack says so too, but a nack can be lost): follow it down as well as up.
        self.held = received;
        self.set_held_spans(held, top);
        if let (Some(grant), Some(cur)) = (credit, self.credit) {
            if grant > cur {
                self.credit = Some(grant);
                self.probes = 0;
                self.unblock();
            }
        }
        let acked_at = Some(now);
        let base_before = self.base;
        let mut settled = 0;
        let mut seq = self.base;
        while seq <= cumulative.min(top) {
            settled += u64::from(self.settle(seq, acked_at));
            seq += 1;
        }
        // Each seq is looked at once, however the ranges overlap or are ordered: the
        // work is bounded by the ranges (sorted) plus the window, not their product.
        // Ranges come in any order — a receiver lists them as its handlers finish.
        // (Regression: walking them as if ascending skipped every range listed after
        // a higher one, so messages acked by a concurrent handler while an earlier one
        // was still running were never settled and failed their deadline.)
        let lo = self.base.max(cumulative.min(top).saturating_add(1));
        let clip = |r: &SeqRange| {
            let (start, end) = (r.start.max(lo), r.end.min(top));
            (start <= end).then_some((start, end))
        };
        // An honest receiver sends them ascending: no copy then.
        settled += if ranges.is_sorted_by_key(|r| r.start) {
            self.settle_spans(lo, ranges.iter().filter_map(clip), acked_at)
        } else {
            let mut spans: Vec<(u64, u64)> = ranges.iter().filter_map(clip).collect();
            spans.sort_unstable();
            self.settle_spans(lo, spans.into_iter(), acked_at)
        };
        // An ack is evidence the target keeps up: each message it settled earns retry
        // budget too, so a target back from a partition gets its backlog retried at
        // the pace it acks (like slow start), while a silent or struggling one does
        // not. One deposit for the frame.
        self.budget.deposit_n(now, settled);
        if let Some(sent) = self.sample.take().and_then(|s| self.times.instant(s)) {
            // `settle` applied Karn's rule already: only a message transmitted once
            // becomes the frame's sample.
            self.rtt.on_ack(sent, now, false);
            self.note_rtt(now.saturating_duration_since(sent));
        }
        // (A version-1 receiver reports no watermark: its acks carry no credit. And a
        // message the receiver is processing needs no floor to be handed out.)
        if credit.is_some()
            && self.base > base_before
            && self.base > self.held.saturating_add(1)
            && self.oldest_sent().is_some_and(|seq| !self.is_held(seq))
        {
            // The floor moved past seqs the receiver does not hold (a receiver that
            // restarted never saw what its earlier run settled): an ordered receiver
            // buffers what it holds above them until a frame's floor passes them. Carry
            // the new floor now, as for a skipped seq ("Skipped seqs"), rather than
            // with the next retransmission, up to `retry.backoff_cap` later: after a
            // restart an ordered stream moves one such gap at a time. (Found by
            // `tests/sim_node_props.rs`'s crashed-receiver property: 26 gaps ran past
            // the deadline.) A lost copy costs only that: those retransmissions still
            // carry the floor.
            self.floor_owed = true;
        }
        self.release_past_unsent(credit.is_some(), cumulative);
        // The cumulative ack retires the oldest first-transmission timers: the queue
        // holds about one window, not one RTO's worth of traffic.
        while self.first.front().is_some_and(|e| e.1 < self.base) {
            self.first.pop_front();
        }
        if probing {
            // An answer sooner than the shortest round trip seen after the probe
            // answers the traffic before it, not the probe.
            let early = self
                .gate
                .since
                .is_some_and(|p| self.min_rtt.is_some_and(|m| now < later(p, m)));
            // Whether it shows the latest probe: held, or settled by now.
            let high = self.gate.probe_high;
            let shows_probe = received >= high
                || self.in_held_spans(high)
                || self
                    .index(high)
                    .and_then(|i| self.slots[i].as_ref())
                    .is_none();
            // Held spans reaching above the probes show more than the probes too.
            let spans_show_more = self
                .held_spans
                .last()
                .is_some_and(|&(_, end)| end > probes_only_below);
            if !self.settled_original && received <= probes_only_below && !spans_show_more {
                self.last_progress = progress_before;
                if early {
                    return; // the rest keep waiting for the probe's own answer
                }
            } else if let Some(next) = (shows_probe && !early)
                .then(|| self.lost_before_probe(received))
                .flatten()
                .filter(|_| self.budget.try_withdraw(now))
            {
                // A partial answer: the receiver holds or settled the probe and more,
                // but stops short of a message sent before the probe — over an RTO
                // ago. On an ordered stream that is the next gap the receiver waits
                // on, messages above it held unreported, and it stays silent until
                // the gap fills: retransmit that one now (paid from the retry budget),
                // as the next probe, the rest still waiting (NewReno's partial ack,
                // RFC 6582). (Regression: one gap per quiet RTO, so at 13 % loss an
                // ordered stream of 140 messages ran past its deadline.) Only an
                // answer that shows the probe counts, so a message is never taken as
                // lost on the strength of its own copy.
                self.gate.reprobe(now, next);
                self.queue_retransmit(next);
                return;
            }
        }
        self.answered(now);
    }

    /// A grant that can never reach the head of the blocked messages, whose frames
    /// would move it: the receiver grants from what it has seen and settled, and the
    /// seqs below the head left this stream without being sent, or were given up
    /// while the receiver still held them.
    /// - Every seq between the last one sent and the head left unsent (given up at
    ///   its deadline, failed when the peer went Down, handed off), and the receiver
    ///   has room past the last one it saw: no frame will ever move its grant (an
    ///   at-most-once grant counts from the highest seq seen) up to the head.
    /// - The receiver's watermark lags this stream's floor and nothing sent is
    ///   unsettled: a message it still held (a slow handler) was given up at its
    ///   deadline, and no frame is left to carry the floor past it.
    ///
    /// The head goes instead: its frame carries the floor and moves the receiver's
    /// grant (a receiver that answers its probes resets the unanswered-probe escape,
    /// so that never fires here). The receiver's hold still bounds what it takes.
    /// (Regression: an at-most-once stream whose peer went Down with a window of
    /// messages waiting for credit, and an at-least-once stream whose last unacked
    /// message a handler held past its deadline and then nacked, never sent again.)
    fn release_past_unsent(&mut self, crediting: bool, cumulative: u64) {
        let (Some(c), Some(&head)) = (self.credit, self.blocked.front()) else {
            return;
        };
        if c >= head {
            return;
        }
        let gap = head > self.max_sent.saturating_add(1)
            && c > self.max_sent
            // (Seqs below the base are settled: only the slots from there are looked at.)
            && (self.max_sent.max(self.base.saturating_sub(1)) + 1..head).all(|seq| {
                self.index(seq)
                    .and_then(|i| self.slots[i].as_ref())
                    .is_none()
            });
        // (At-most-once settles at transmission: its base always runs ahead of what
        // the receiver has consumed, which is its flow control at work.)
        let floor_ahead = crediting
            && self.guarantee != Guarantee::AtMostOnce
            && cumulative.saturating_add(1) < self.base
            && self.oldest_sent().is_none();
        if gap || floor_ahead {
            self.credit = Some(head);
            self.unblock();
        }
    }

    /// Take the receiver's held spans above its watermark: clipped to what was
    /// transmitted, ascending and disjoint, at most [`MAX_HELD_RANGES`] (a lying
    /// receiver's list in any order, overlapping or inverted, costs a sort at most).
    fn set_held_spans(&mut self, held: &[SeqRange], top: u64) {
        if held.is_empty() {
            // The usual ack: let a stream that had spans once give their memory back.
            self.held_spans = Vec::new();
            return;
        }
        self.held_spans.clear();
        let lo = self.held.max(self.base.saturating_sub(1)).saturating_add(1);
        self.held_spans.extend(
            held.iter()
                .take(MAX_HELD_RANGES)
                .map(|r| (r.start.max(lo), r.end.min(top)))
                .filter(|(start, end)| start <= end),
        );
        if !self.held_spans.is_sorted() {
            self.held_spans.sort_unstable();
        }
        self.held_spans.dedup_by(|next, prev| {
            // Merge `next` into `prev` when they overlap or touch.
            if next.0 <= prev.1.saturating_add(1) {
                prev.1 = prev.1.max(next.1);
                true
            } else {
                false
            }
        });
    }

    /// Does the receiver hold `seq` above its watermark?
    fn in_held_spans(&self, seq: u64) -> bool {
        self.held_span_at(seq).is_some()
    }

    /// The index of the held span holding `seq`, if one does.
    fn held_span_at(&self, seq: u64) -> Option<usize> {
        let i = self.held_spans.partition_point(|&(start, _)| start <= seq);
        (i > 0 && seq <= self.held_spans[i - 1].1).then(|| i - 1)
    }

    /// The oldest unsettled message transmitted at least once (what `floor_frame`
    /// sends), if any.
    fn oldest_sent(&self) -> Option<u64> {
        self.slots
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.attempts > 0))
            .map(|i| self.base + i as u64)
    }

    /// Does the receiver hold `seq` (module docs, "Held messages")?
    fn is_held(&self, seq: u64) -> bool {
        seq <= self.held || self.in_held_spans(seq)
    }

    fn note_rtt(&mut self, rtt: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// The first message above `received` that is neither settled, queued nor held,
    /// if its last transmission was no later than the probe.
    fn lost_before_probe(&self, received: u64) -> Option<u64> {
        let probe = self.gate.since?;
        let mut seq = self.base.max(received.saturating_add(1));
        while seq <= self.max_sent {
            if let Some(i) = self.held_span_at(seq) {
                seq = self.held_spans[i].1.saturating_add(1);
                continue;
            }
            if let Some(m) = self.index(seq).and_then(|i| self.slots[i].as_ref()) {
                let sent = self.times.sent_at(seq, m)?;
                return (!m.queued && m.attempts > 0 && sent <= probe).then_some(seq);
            }
            seq += 1;
        }
        None
    }

    /// Timer `gen` of `seq` waits for the answer to the probe. A timer that waits
    /// again after the next probe is listed again; stale entries are dropped once
    /// they outnumber the window, so the list stays within twice the window however
    /// long the receiver is silent.
    fn wait_for_answer(&mut self, seq: u64, gen: u32) {
        if self.gate.waiting.len() >= 2 * self.slots.len().max(32) {
            let mut waiting = std::mem::take(&mut self.gate.waiting);
            waiting.retain(|&(s, g)| {
                self.index(s)
                    .and_then(|i| self.slots[i].as_ref())
                    .is_some_and(|m| m.timer_gen == g && !m.queued)
            });
            self.gate.waiting = waiting;
        }
        self.gate.waiting.push((seq, gen));
    }

    /// Any ack, nack or reject of the stream: the receiver is not silent ("Silent
    /// streams"). The timers that waited for it fire now.
    fn answered(&mut self, now: Instant) {
        for (seq, gen) in self.gate.answer(now) {
            let Some(m) = self.index(seq).and_then(|i| self.slots[i].as_mut()) else {
                continue;
            };
            if m.timer_gen == gen && !m.queued {
                m.timer_gen = next_gen(m.timer_gen);
                self.timers.push(Reverse((now, seq, m.timer_gen)));
            }
        }
    }

    /// Settle every seq of `spans` (ascending by start, clipped to what was
    /// transmitted) at or above `from`, each once however the spans overlap.
    fn settle_spans(
        &mut self,
        mut from: u64,
        spans: impl Iterator<Item = (u64, u64)>,
        acked_at: Option<Instant>,
    ) -> u64 {
        let mut settled = 0;
        for (start, end) in spans {
            let mut s = start.max(from);
            while s <= end {
                settled += u64::from(self.settle(s, acked_at));
                s += 1;
            }
            from = from.max(end.saturating_add(1));
        }
        settled
    }

    /// The receiver failed `seq`: retransmit it promptly.
    pub(crate) fn handle_nack(&mut self, now: Instant, seq: u64) {
        // It is no longer held; neither, for the keep-alive, is anything above it.
        self.held = self.held.min(seq.saturating_sub(1));
        // Spans are exact (unlike the watermark): only `seq` leaves them.
        if let Some(i) = self.held_span_at(seq) {
            let (start, end) = self.held_spans[i];
            match (start < seq, seq < end) {
                (false, false) => {
                    self.held_spans.remove(i);
                }
                (true, false) => self.held_spans[i].1 = seq - 1,
                (false, true) => self.held_spans[i].0 = seq + 1,
                (true, true) => {
                    self.held_spans[i].1 = seq - 1;
                    self.held_spans.insert(i + 1, (seq + 1, end));
                }
            }
        }
        self.answered(now);
        let Some(idx) = self.index(seq) else {
            return;
        };
        let Some(m) = self.slots[idx].as_mut() else {
            return;
        };
        if m.queued {
            return; // a resend is on its way already
        }
        if m.nack_armed {
            // Served by the armed resend, unless a copy goes out before it (then this
            // nack may answer that copy: see `fire`).
            m.nack_again = true;
            return;
        }
        match self.times.sent_at(seq, m) {
            Some(sent) if now < later(sent, NACK_RESEND_MIN) => {
                // Paced: one resend, NACK_RESEND_MIN after the last transmission.
                m.nack_armed = true;
                self.timers
                    .push(Reverse((later(sent, NACK_RESEND_MIN), seq, NACKED)));
            }
            _ => self.queue_retransmit(seq),
        }
    }

    /// The receiver refused `seq` for good: settle it (no RTT sample, no retry budget
    /// earned) and report the reason. A reject for a seq already settled is ignored.
    pub(crate) fn handle_reject(
        &mut self,
        now: Instant,
        seq: u64,
        reason: crate::wire::RejectReason,
    ) {
        if seq > self.max_sent {
            return; // never transmitted: the receiver cannot have refused it
        }
        self.answered(now);
        if self.remove(seq).is_some() {
            self.events.push_back(OutEvent::Rejected { seq, reason });
            self.compact();
        }
    }

    /// A connection came (back) up, or the receiver restarted: everything unacked may have
    /// been lost with the old connection, so retransmit it now rather than after an RTO.
    pub(crate) fn handle_reconnect(&mut self) {
        // Timeouts while the peer had no connection say nothing of its round trip:
        // a new connection starts from the estimate, not a backed-off RTO. (Otherwise a
        // channel whose deadline is a few RTOs lost its retransmissions after every
        // outage.)
        self.rtt.clear_backoff();
        if self.guarantee == Guarantee::AtMostOnce {
            return;
        }
        // Whatever the receiver held may have gone with the connection or the run.
        self.held = 0;
        self.held_spans.clear();
        // A new connection: the old one's silence says nothing of it.
        self.gate = SilenceGate::default();
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
            let id = if m.has_id {
                self.ids.get(&seq).copied()
            } else {
                None
            };
            Some((seq, m.payload.clone(), self.id_of(seq, id)))
        })
    }

    /// `seq`'s payload and dedup identity, if it is unsettled (one slot looked up; the
    /// same as `seq`'s entry of [`unsettled`](Self::unsettled)).
    pub(crate) fn unsettled_one(&self, seq: u64) -> Option<(Bytes, MessageId)> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let m = self.slots.get(i)?.as_ref()?;
        let id = if m.has_id {
            self.ids.get(&seq).copied()
        } else {
            None
        };
        Some((m.payload.clone(), self.id_of(seq, id)))
    }

    /// Remove an unsettled message without an event (it was handed off). Returns its
    /// dedup identity and whether it was ever transmitted, or `None` if it was not
    /// there.
    pub(crate) fn take(&mut self, seq: u64) -> Option<(MessageId, bool)> {
        let m = self.remove(seq)?;
        self.skip(seq);
        self.compact();
        let sent = m.attempts > 0 || !matches!(m.last_sent, Sent::Never);
        Some((self.id_of(seq, m.id), sent))
    }

    /// Take `seq`'s slot out of the window (leaving `None`, for `compact`) together
    /// with its out-of-line parts. Every path that ends a message goes through here,
    /// so the side maps hold entries of live slots only.
    fn remove(&mut self, seq: u64) -> Option<Removed> {
        let idx = self.index(seq)?;
        let m = self.slots[idx].take()?;
        if m.attempts == 0 {
            // Left unsent (given up, handed off, failed): it no longer waits for
            // credit. (A stale entry kept the head of `blocked` below the messages
            // that do, and `release_past_unsent` released one stale seq per ack.)
            if let Ok(at) = self.blocked.binary_search(&seq) {
                self.blocked.remove(at);
                if self.blocked.is_empty() {
                    self.probe_due = None;
                }
            }
        }
        let last_sent = match m.sent_us {
            NO_TIME => Sent::Never,
            WIDE_TIME => self
                .times
                .wide_sent
                .remove(&seq)
                .map_or(Sent::Never, Sent::At),
            us => Sent::Offset(us),
        };
        if m.deadline_ms == WIDE_TIME {
            self.times.wide_deadline.remove(&seq);
        }
        let id = if m.has_id {
            self.ids.remove(&seq)
        } else {
            None
        };
        Some(Removed {
            payload: m.payload,
            id,
            last_sent,
            attempts: m.attempts,
        })
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

    /// Is `seq` (just sent, with its implicit id) at least `span` above the lowest of
    /// this stream's handed-off seqs still waiting in the hint store? Its id is then
    /// past what a receiver's dedup window (at least `max_in_flight` wide) accepts
    /// while those hints hold the id floor down. Effectively-once only (the others are
    /// not deduped by seq).
    pub(crate) fn far_above_hint_floor(&self, seq: u64, span: u64) -> bool {
        // The map lookup last: on almost every send no hint of the stream is pending.
        self.guarantee == Guarantee::EffectivelyOnce
            && self
                .hinted
                .first()
                .is_some_and(|&h| h < self.base && seq >= h.saturating_add(span))
            && !self.ids.contains_key(&seq)
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
                // A queued retransmission has no timer until it goes out, which may
                // wait for node credit: its deadline must still end it. (Regression:
                // only the head of the queue was armed, so against a receiver that
                // stopped granting node credit, every retransmission behind the head
                // stayed unresolved past its deadline, for as long as the link lived.)
                // One entry per retransmission (rare); a stale one finds the message
                // sent, or gone, and does nothing.
                if let Some(d) = self.times.deadline(seq, m) {
                    self.timers.push(Reverse((d, seq, WAITING)));
                }
            }
        }
    }

    fn give_up(&mut self, seq: u64, reason: GiveUp) {
        if let Some(m) = self.remove(seq) {
            self.skip(seq);
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

    /// `acked_at`: when the ack arrived; `None` for at-most-once's settle on
    /// transmission. Returns whether an ack settled it (the caller deposits retry
    /// budget for those, once per ack frame).
    fn settle(&mut self, seq: u64, acked_at: Option<Instant>) -> bool {
        let Some(m) = self.remove(seq) else {
            return false;
        };
        if let Some(now) = acked_at {
            self.last_progress = Some(now);
            self.highest_acked = self.highest_acked.max(seq);
            // Karn's rule: only never-retransmitted messages give RTT samples.
            if m.attempts == 1 && !matches!(m.last_sent, Sent::Never) {
                self.sample = Some(m.last_sent);
            }
            if m.attempts == 1 {
                self.settled_original = true;
            }
        }
        self.events.push_back(OutEvent::Settled { seq });
        self.compact();
        acked_at.is_some()
    }

    fn compact(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
            self.opened += 1;
        }
        while self.skipped.first().is_some_and(|s| *s < self.base) {
            self.skipped.pop_first();
            self.floor_owed = true;
        }
        if self.slots.is_empty() {
            // Every timer left names a settled message (a timer only acts on a seq
            // that still has a slot): drop them now, so that an idle stream has nothing
            // timed and the endpoint's scans skip it, instead of until the last one
            // would have fired (a waiting message's deadline: 30 s by default).
            self.timers.clear();
            self.first.clear();
        }
    }

    /// `seq` left the stream unacked (module docs, "Skipped seqs").
    fn skip(&mut self, seq: u64) {
        if self.guarantee != Guarantee::AtMostOnce {
            self.skipped.insert(seq);
        }
    }

    /// The floor passed a skipped seq and no data frame has carried it since: a copy of
    /// the oldest transmitted message still unsettled carries it now (not a
    /// retransmission: no attempt, timer or budget), if there is one. Without it, an
    /// ordered receiver holding later messages waits for the skipped seq until the
    /// stream next sends something, which may be never: its later messages are held,
    /// so not retransmitted, and new ones may wait for their acks. (Regression: a
    /// replay of this run's hints beside live sends handed off behind them, to an
    /// ordered receiver: every second or so nothing moved, ~1 400 hints a second.)
    fn floor_frame(&mut self, budget: &mut u64) -> Option<Data> {
        if !std::mem::take(&mut self.floor_owed) || *budget == 0 {
            return None;
        }
        let (idx, m) = self
            .slots
            .iter()
            .enumerate()
            .find_map(|(i, m)| m.as_ref().filter(|m| m.attempts > 0).map(|m| (i, m)))?;
        let seq = self.base + idx as u64;
        *budget -= 1;
        Some(Data {
            channel: self.channel,
            seq,
            floor: self.base,
            id_floor: self.id_floor(),
            id: if m.has_id {
                self.ids.get(&seq).copied()
            } else {
                None
            },
            guarantee: m.guarantee,
            schema: m.schema,
            payload: m.payload.clone(),
        })
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

/// Every millisecond offset from `epoch` below [`WIDE_TIME`] is an `Instant`.
fn fits(epoch: Instant) -> bool {
    epoch
        .checked_add(Duration::from_millis(u64::from(WIDE_TIME)))
        .is_some()
}

/// `d` in whole microseconds, rounded down, if that is an in-line slot offset. (`u64`
/// arithmetic: `Duration::as_micros` works in `u128`.)
fn micros_down(d: Duration) -> Option<u32> {
    let us = d
        .as_secs()
        .checked_mul(1_000_000)?
        .checked_add(u64::from(d.subsec_micros()))?;
    u32::try_from(us).ok().filter(|us| *us < WIDE_TIME)
}

/// `d` in whole milliseconds, rounded up, if that is an in-line slot offset.
fn millis_up(d: Duration) -> Option<u32> {
    let ms = d
        .as_secs()
        .checked_mul(1000)?
        .checked_add(u64::from(d.subsec_nanos().div_ceil(1_000_000)))?;
    u32::try_from(ms).ok().filter(|ms| *ms < WIDE_TIME)
}

/// The next retransmission timer generation (never [`WAITING`]).
fn next_gen(gen: u32) -> u32 {
    match gen.wrapping_add(1) {
        WAITING | NACKED => 0,
        g => g,
    }
}

use crate::retry::later;

/// The timeout of a first transmission made at `now`: the RTO, or the estimator's
/// backed-off one after a first timer ran out ([`RttEstimator::first_rto`], RFC 6298
/// §5.5). The backoff takes at most half the time left to the message's deadline (and
/// never goes below the RTO), so a message with a deadline a few RTOs away still gets
/// a retransmission before it: the backoff is for links slower than the RTO, and a
/// deadline says how long this message may wait.
fn first_timeout(rtt: &RttEstimator, deadline: Option<Instant>, now: Instant) -> Duration {
    let backed = rtt.first_rto();
    match deadline {
        Some(d) => backed
            .min(d.saturating_duration_since(now) / 2)
            .max(rtt.rto()),
        None => backed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{IdKey, NodeId, Origin};

    const ORIGIN: Origin = Origin {
        node: NodeId(1),
        incarnation: 1,
    };

    fn stream(now: Instant) -> OutboundStream {
        stream_with(now, 7, |_| {})
    }

    /// An at-least-once stream without a deadline, `tweak`ed, seeded with `seed`.
    fn stream_with(
        now: Instant,
        seed: u64,
        tweak: impl FnOnce(&mut ProtoConfig),
    ) -> OutboundStream {
        let mut config = ProtoConfig::default();
        config.retry.deadline = None;
        tweak(&mut config);
        OutboundStream::new(
            ORIGIN,
            ChannelId(1),
            Guarantee::AtLeastOnce,
            &config,
            seed,
            now,
            None,
        )
    }

    /// A `guarantee` stream without a deadline, granted `credit` (`None`: a receiver
    /// without credit), with `n` messages queued.
    fn credited(
        now: Instant,
        guarantee: Guarantee,
        credit: Option<u64>,
        n: usize,
    ) -> OutboundStream {
        let mut config = ProtoConfig::default();
        config.retry.deadline = None;
        let mut s = OutboundStream::new(ORIGIN, ChannelId(1), guarantee, &config, 7, now, credit);
        for _ in 0..n {
            s.send(now, Bytes::from_static(b"m"), None, None, 0);
        }
        s
    }

    /// A stream whose retry budget is one retry per deposit over `ttl`, no floor.
    fn budget_stream(now: Instant, seed: u64, ttl: Duration) -> OutboundStream {
        stream_with(now, seed, |c| {
            c.retry_budget = crate::retry::RetryBudgetConfig {
                ttl,
                min_retries_per_sec: 0,
                retry_ratio: 1.0,
            };
        })
    }

    /// Property: first transmissions leave in seq order, however grants and node
    /// credit interleave. Random grant steps and node budgets; every frame that is a
    /// first transmission must carry a higher seq than the one before. (Regression:
    /// seqs unblocked by a grant jumped ahead of an earlier grant's seqs still queued
    /// for node credit.)
    #[test]
    fn first_transmissions_leave_in_seq_order_across_grants_and_node_credit() {
        let mut rng = crate::rng::SplitMix64::new(11);
        for guarantee in [Guarantee::AtMostOnce, Guarantee::AtLeastOnce] {
            for _case in 0..200 {
                let now = Instant::now();
                let mut config = ProtoConfig::default();
                config.retry.deadline = None;
                let mut s =
                    OutboundStream::new(ORIGIN, ChannelId(1), guarantee, &config, 7, now, Some(8));
                let mut last = 0;
                let mut credit = 8;
                let mut sent_total = 0u64;
                for _step in 0..40 {
                    for _ in 0..rng.range_u64(0, 19) {
                        s.send(now, Bytes::from_static(b"m"), None, None, 0);
                    }
                    let mut budget = rng.range_u64(0, 11);
                    while let Some(d) = s.poll_transmit(now, &mut budget) {
                        assert!(d.seq > last, "{guarantee:?}: {} after {last}", d.seq);
                        last = d.seq;
                        sent_total += 1;
                    }
                    credit += rng.range_u64(0, 15);
                    s.handle_ack(now, 0, &[], Some(credit), 0, &[]);
                }
                assert!(sent_total > 0);
            }
        }
    }

    /// What the driver does at `now`: fire due timers, transmit all, collect events.
    fn run(s: &mut OutboundStream, now: Instant) -> Vec<OutEvent> {
        s.handle_timeout(now, None, None);
        let mut budget = u64::MAX;
        while s.poll_transmit(now, &mut budget).is_some() {}
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    /// Walk the stream's timers like a driver, up to and including `until`.
    fn run_until(s: &mut OutboundStream, until: Instant) -> Vec<OutEvent> {
        let mut events = Vec::new();
        while let Some(t) = s.poll_timeout().filter(|t| *t <= until) {
            events.extend(run(s, t));
        }
        events
    }

    fn side_entries(s: &OutboundStream) -> usize {
        s.ids.len() + s.times.wide_sent.len() + s.times.wide_deadline.len()
    }

    fn slot(s: &OutboundStream, seq: u64) -> &InFlight {
        s.slots[s.index(seq).unwrap()].as_ref().unwrap()
    }

    fn gave_up(events: &[OutEvent], want: u64) -> Option<(GiveUp, MessageId, u32)> {
        events.iter().find_map(|e| match e {
            OutEvent::GaveUp {
                seq,
                reason,
                id,
                attempts,
                ..
            } if *seq == want => Some((*reason, *id, *attempts)),
            _ => None,
        })
    }

    fn settled(events: &[OutEvent]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                OutEvent::Settled { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    /// The floor passing a seq that left the stream unacked reaches the receiver even
    /// when nothing new is sent: seq 1 and 3 transmitted, 2 handed off before its turn,
    /// 1 acked. The stream sends 3 once more carrying floor 3 (an ordered receiver
    /// holding 3 was waiting for 2), without counting a retransmission; once only.
    /// (Regression: nothing carried the floor until a later send, so an ordered
    /// receiver held 3 and the replay beside it stalled.)
    #[test]
    fn a_floor_past_a_skipped_seq_is_carried_by_a_copy_of_the_oldest_unsettled() {
        for guarantee in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
            let now = Instant::now();
            let mut s = credited(now, guarantee, None, 0);
            let mut budget = u64::MAX;
            let mut poll = |s: &mut OutboundStream| -> Vec<(u64, u64)> {
                std::iter::from_fn(|| s.poll_transmit(now, &mut budget))
                    .map(|d| (d.seq, d.floor))
                    .collect()
            };
            s.send(now, Bytes::from_static(b"1"), None, None, 0);
            assert_eq!(poll(&mut s), [(1, 1)]);
            s.send(now, Bytes::from_static(b"2"), None, None, 0);
            s.send(now, Bytes::from_static(b"3"), None, None, 0);
            assert!(s.take(2).is_some_and(|(_, sent)| !sent));
            assert_eq!(poll(&mut s), [(3, 1)]);
            s.handle_ack(now, 1, &[], None, 1, &[]);
            assert_eq!(
                poll(&mut s),
                [(3, 3)],
                "{guarantee:?}: the floor, carried by 3"
            );
            assert_eq!(s.retransmits(), 0, "{guarantee:?}: not a retransmission");
            assert!(poll(&mut s).is_empty(), "{guarantee:?}: once");
        }
    }

    /// A stream whose grant was used up by seqs that left it untransmitted (handed
    /// off) has nothing on the wire, and a receiver run that never saw it cannot answer
    /// its probes: after three unanswered probes its oldest blocked message goes out
    /// (no more), which opens the stream there. A grant of 4, its four seqs handed off,
    /// four more sent. (Regression: they waited for credit for good.)
    #[test]
    fn unanswered_probes_send_the_oldest_blocked_message_on_every_guarantee() {
        for guarantee in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
            let t0 = Instant::now();
            let mut s = credited(t0, guarantee, Some(4), 8);
            for seq in 1..=4 {
                assert!(s.take(seq).is_some_and(|(_, sent)| !sent), "{seq}");
            }
            let mut sent = Vec::new();
            let mut now = t0;
            let mut budget = u64::MAX;
            for _ in 0..3 {
                sent.extend(
                    std::iter::from_fn(|| s.poll_transmit(now, &mut budget)).map(|d| d.seq),
                );
                assert!(
                    sent.is_empty(),
                    "{guarantee:?}: {sent:?} before the third probe"
                );
                now = s.poll_timeout().expect("a probe is due");
                s.handle_timeout(now, None, None);
                assert!(s.take_probe(), "{guarantee:?}: a probe is owed");
            }
            sent.extend(std::iter::from_fn(|| s.poll_transmit(now, &mut budget)).map(|d| d.seq));
            assert_eq!(
                sent,
                [5],
                "{guarantee:?}: the oldest blocked message, no more"
            );
            assert_eq!(s.credit_counters().1, 3, "{guarantee:?}: three probes");
            // The receiver run now knows the stream: its first ack grants the rest.
            s.handle_ack(now, 0, &[], Some(4 + 256), 0, &[]);
            sent.extend(std::iter::from_fn(|| s.poll_transmit(now, &mut budget)).map(|d| d.seq));
            assert_eq!(sent, [5, 6, 7, 8], "{guarantee:?}");
        }
    }

    /// A message the receiver holds (a slow handler) leaves the stream while the rest
    /// of the grant is acked (given up at its deadline, handed off): the receiver's
    /// watermark, and so its grant, stay below it for as long as the handler runs, or
    /// for good if the handler then nacks it. With nothing sent left to carry the
    /// floor, the oldest blocked message goes, with the floor. (Regression: probes
    /// were answered with the same grant and the stream never sent again.)
    #[test]
    fn a_held_message_given_up_does_not_stall_the_stream() {
        for guarantee in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
            let t0 = Instant::now();
            let ms = Duration::from_millis(1);
            let mut s = credited(t0, guarantee, Some(4), 8);
            let mut budget = u64::MAX;
            let sent: Vec<u64> = std::iter::from_fn(|| s.poll_transmit(t0, &mut budget))
                .map(|d| d.seq)
                .collect();
            assert_eq!(sent, [1, 2, 3, 4]);
            // 2..=4 acked; 1 held by a handler.
            s.handle_ack(
                t0 + ms,
                0,
                &[SeqRange { start: 2, end: 4 }],
                Some(4),
                1,
                &[],
            );
            assert!(s.take(1).is_some_and(|(_, was_sent)| was_sent));
            // The receiver answers with the same watermark and grant.
            s.handle_ack(t0 + 2 * ms, 0, &[], Some(4), 1, &[]);
            let more: Vec<(u64, u64)> =
                std::iter::from_fn(|| s.poll_transmit(t0 + 2 * ms, &mut budget))
                    .map(|d| (d.seq, d.floor))
                    .collect();
            assert_eq!(
                more,
                [(5, 5)],
                "{guarantee:?}: the head, carrying the floor"
            );
        }
    }

    /// At-most-once: the messages waiting for credit are failed unsent (the peer went
    /// Down) and the peer comes back. Its grant counts from the highest seq it has
    /// seen, so it never reaches the next one sent, which is past the failed ones;
    /// while it has room, the oldest blocked message goes. (Regression: the stream
    /// never sent again, and once its window filled every send blocked for good.)
    #[test]
    fn at_most_once_past_messages_failed_unsent_sends_again() {
        let t0 = Instant::now();
        let mut s = credited(t0, Guarantee::AtMostOnce, Some(4), 12);
        let mut budget = u64::MAX;
        let sent: Vec<u64> = std::iter::from_fn(|| s.poll_transmit(t0, &mut budget))
            .map(|d| d.seq)
            .collect();
        assert_eq!(sent, [1, 2, 3, 4]);
        for seq in 5..=8 {
            assert!(s.take(seq).is_some_and(|(_, was_sent)| !was_sent), "{seq}");
        }
        // The receiver consumed 1..=4 and has room for 2 more past them: fewer than
        // the failed run, so its grant does not even cover that.
        let now = t0 + Duration::from_millis(5);
        s.handle_ack(now, 4, &[], Some(6), 4, &[]);
        let more: Vec<u64> = std::iter::from_fn(|| s.poll_transmit(now, &mut budget))
            .map(|d| d.seq)
            .collect();
        assert_eq!(more, [9], "the head only");
        // A receiver with no room left past what it saw releases nothing.
        let mut s = credited(t0, Guarantee::AtMostOnce, Some(4), 12);
        let _: Vec<_> = std::iter::from_fn(|| s.poll_transmit(t0, &mut budget)).collect();
        for seq in 5..=8 {
            s.take(seq);
        }
        s.handle_ack(now, 4, &[], Some(4), 4, &[]);
        assert!(s.poll_transmit(now, &mut budget).is_none());
    }

    /// A receiver that answers the probes (it knows the stream, and its grant stays
    /// where it is: a busy handler) is never sent past its grant.
    #[test]
    fn answered_probes_keep_the_stream_within_its_grant() {
        let t0 = Instant::now();
        let mut s = credited(t0, Guarantee::EffectivelyOnce, Some(2), 4);
        let mut budget = u64::MAX;
        let mut now = t0;
        let first: Vec<u64> = std::iter::from_fn(|| s.poll_transmit(now, &mut budget))
            .map(|d| d.seq)
            .collect();
        assert_eq!(first, [1, 2]);
        for _ in 0..10 {
            // The probe (due, or the held re-check) and the receiver's answer: an ack
            // of nothing new with the same grant.
            now = s.poll_timeout().expect("a timer");
            s.handle_timeout(now, None, None);
            s.handle_ack(now, 0, &[], Some(2), 2, &[]);
            let more: Vec<u64> = std::iter::from_fn(|| s.poll_transmit(now, &mut budget))
                .map(|d| d.seq)
                .filter(|seq| *seq > 2)
                .collect();
            assert!(more.is_empty(), "sent past the grant: {more:?}");
        }
    }

    /// Only what was put on the wire can be acked or rejected: six messages, credit
    /// for three, and a receiver that acks and rejects all six settles three.
    /// (Regression: the three still waiting for credit resolved `Acked`.)
    #[test]
    fn an_ack_or_reject_beyond_what_was_transmitted_settles_nothing_more() {
        let now = Instant::now();
        let mut s = credited(now, Guarantee::AtLeastOnce, Some(3), 6);
        assert!(run(&mut s, now).is_empty());
        let lie = [SeqRange { start: 1, end: 6 }];
        s.handle_reject(now, 5, crate::wire::RejectReason::NoReceiver);
        s.handle_ack(now, 6, &lie, Some(3), 6, &[]);
        let events: Vec<OutEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(settled(&events), [1, 2, 3], "{events:?}");
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, OutEvent::Rejected { .. })),
            "{events:?}"
        );
    }

    /// Ranges that overlap or come out of order (an honest receiver sends them
    /// ascending and disjoint) settle each transmitted seq at most once, and the
    /// work is bounded by the ranges plus the window: 200 000 copies of one huge range
    /// finish at once. (Regression: each range was walked in full, ranges × window;
    /// one such frame stalled the node's driver for seconds.)
    #[test]
    fn overlapping_ack_ranges_settle_each_seq_once_in_bounded_work() {
        let now = Instant::now();
        let mut s = stream(now);
        for _ in 0..10 {
            s.send(now, Bytes::from_static(b"m"), None, None, 0);
        }
        run(&mut s, now);
        let mut ranges = vec![
            SeqRange { start: 2, end: 4 },
            SeqRange { start: 3, end: 5 },
            SeqRange { start: 1, end: 1 },
        ];
        ranges.extend(std::iter::repeat_n(
            SeqRange {
                start: 9,
                end: u64::MAX,
            },
            200_000,
        ));
        s.handle_ack(now, 0, &ranges, None, 0, &[]);
        let events: Vec<OutEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(settled(&events), [1, 2, 3, 4, 5, 9, 10]);
    }

    /// Property: an ack settles every transmitted seq its ranges name, whatever order
    /// the ranges come in (a receiver lists them as its handlers finish). Random
    /// subsets of 64 seqs, as single-seq ranges in random order, plus duplicates.
    /// (Regression: ranges were walked as if ascending, so a range listed after a
    /// higher one was skipped and its messages failed their deadline although their
    /// handler had acked them.)
    #[test]
    fn ack_ranges_in_any_order_settle_exactly_what_they_name() {
        let mut rng = crate::rng::SplitMix64::new(5);
        for _case in 0..500 {
            let now = Instant::now();
            let mut s = stream(now);
            for _ in 0..64 {
                s.send(now, Bytes::from_static(b"m"), None, None, 0);
            }
            run(&mut s, now);
            let mut named: Vec<u64> = (2..=64).filter(|_| rng.range_u64(0, 2) == 0).collect();
            let mut ranges: Vec<SeqRange> = named
                .iter()
                .map(|&q| SeqRange { start: q, end: q })
                .collect();
            for i in (1..ranges.len()).rev() {
                let j = rng.range_u64(0, i as u64) as usize;
                ranges.swap(i, j);
            }
            if let Some(&r) = ranges.first() {
                ranges.push(r);
            }
            s.handle_ack(now, 0, &ranges, None, 0, &[]);
            let events: Vec<OutEvent> = std::iter::from_fn(|| s.poll_event()).collect();
            named.sort_unstable();
            assert_eq!(settled(&events), named);
        }
    }

    #[test]
    fn offsets_round_and_stop_at_the_wide_marker() {
        let d = |s: u64, ns: u32| Duration::new(s, ns);
        assert_eq!(micros_down(d(0, 0)), Some(0));
        assert_eq!(micros_down(d(1, 1_999)), Some(1_000_001));
        assert_eq!(micros_down(d(4294, 967_293_999)), Some(WIDE_TIME - 1));
        assert_eq!(micros_down(d(4294, 967_294_000)), None);
        assert_eq!(micros_down(Duration::MAX), None);
        assert_eq!(millis_up(d(0, 0)), Some(0));
        assert_eq!(millis_up(d(0, 1)), Some(1));
        assert_eq!(millis_up(d(1, 999_999_999)), Some(2000));
        assert_eq!(millis_up(d(2, 0)), Some(2000));
        assert_eq!(
            millis_up(Duration::from_millis(u64::from(WIDE_TIME) - 1)),
            Some(WIDE_TIME - 1)
        );
        assert_eq!(millis_up(Duration::from_millis(u64::from(WIDE_TIME))), None);
        assert_eq!(millis_up(Duration::MAX), None);
    }

    #[test]
    fn a_window_slot_fits_in_64_bytes() {
        eprintln!(
            "Option<InFlight>: {} B",
            std::mem::size_of::<Option<InFlight>>()
        );
        assert!(std::mem::size_of::<Option<InFlight>>() <= 64);
    }

    const MIN: Duration = Duration::from_secs(60);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A stream outlives its offset range (71 min of microseconds, 49 days of
    /// milliseconds) and keeps every timestamp and id exact: RTT samples, deadlines
    /// in line, beyond the range and across epoch moves, explicit and implicit ids.
    #[test]
    fn a_stream_outlives_the_offset_range() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        let key = MessageId::Key(IdKey(42));
        // 1: implicit id, no deadline; 2: explicit id, deadline past the ms range.
        s.send(t0, Bytes::from_static(b"c"), None, None, 0);
        s.send(t0, Bytes::from_static(b"a"), Some(key), Some(60 * DAY), 0);
        assert_eq!(slot(&s, 2).deadline_ms, WIDE_TIME);
        let mut budget = u64::MAX;
        let f1 = s.poll_transmit(t0, &mut budget).unwrap();
        let f2 = s.poll_transmit(t0, &mut budget).unwrap();
        assert_eq!((f1.id, f2.id), (None, Some(key)));
        // The receiver holds both: they are only re-checked, never retransmitted.
        s.handle_ack(t0 + Duration::from_millis(1), 0, &[], None, 2, &[]);

        // Past half the µs range: the epoch moves by whole milliseconds.
        let t1 = t0 + 40 * MIN + Duration::from_micros(500);
        assert!(run(&mut s, t1).is_empty());
        assert_eq!(s.times.epoch, t0 + 40 * MIN);
        assert_eq!(s.times.sent(1, slot(&s, 1)), Some(t0));
        assert_eq!(s.times.sent(2, slot(&s, 2)), Some(t0));
        assert_eq!(s.times.deadline(2, slot(&s, 2)), Some(t0 + 60 * DAY));
        assert_eq!((slot(&s, 1).attempts, slot(&s, 2).attempts), (1, 1));

        // 3: a 30 s deadline, in line after the move; it fires exactly on time.
        let t3 = t0 + 40 * MIN + Duration::from_millis(2);
        s.send(
            t3,
            Bytes::from_static(b"b"),
            None,
            Some(Duration::from_secs(30)),
            0,
        );
        assert_ne!(slot(&s, 3).deadline_ms, WIDE_TIME);
        let before = run_until(
            &mut s,
            t3 + Duration::from_secs(30) - Duration::from_micros(1),
        );
        assert!(gave_up(&before, 3).is_none());
        let at = run(&mut s, t3 + Duration::from_secs(30));
        let (reason, id, _) = gave_up(&at, 3).expect("3 given up at its deadline");
        assert_eq!(reason, GiveUp::Deadline);
        assert_eq!(
            id,
            MessageId::Seq {
                origin: ORIGIN,
                channel: ChannelId(1),
                seq: 3
            }
        );

        // 1 is acked 45 min after its only transmission: the sample is exact.
        let before = s.rtt.srtt();
        s.handle_ack(t0 + 45 * MIN, 1, &[], None, 2, &[]);
        assert!(matches!(s.poll_event(), Some(OutEvent::Settled { seq: 1 })));
        assert_eq!(before, None);
        assert_eq!(s.rtt.srtt(), Some(45 * MIN));

        // 2's deadline, 60 days out (beyond the ms range), fires exactly on time.
        let early = run(&mut s, t0 + 60 * DAY - Duration::from_micros(1));
        assert!(gave_up(&early, 2).is_none());
        let at = run(&mut s, t0 + 60 * DAY);
        assert_eq!(gave_up(&at, 2), Some((GiveUp::Deadline, key, 1)));

        // Months in: sending, acking and RTT samples still work.
        let t4 = t0 + 100 * DAY;
        s.send(t4, Bytes::from_static(b"d"), Some(key), None, 0);
        let f = s.poll_transmit(t4, &mut budget).unwrap();
        assert_eq!((f.seq, f.id), (4, Some(key)));
        assert_eq!(s.times.epoch, t4);
        s.handle_ack(t4 + Duration::from_millis(3), 4, &[], None, 4, &[]);
        assert!(matches!(s.poll_event(), Some(OutEvent::Settled { seq: 4 })));
        // An exact 3 ms sample (the second: SRTT = (7 * 45 min + 3 ms) / 8).
        let srtt = (7 * (45 * MIN).as_nanos() + 3_000_000) / 8;
        assert_eq!(s.rtt.srtt(), Some(Duration::from_nanos(srtt as u64)));
        assert!(s.slots.is_empty());
        assert_eq!(side_entries(&s), 0);
    }

    /// While node credit is exhausted, every queued message's own deadline runs —
    /// those queued before the credit ran out and those queued after — not only the
    /// head's: a message with a 1 s deadline behind one with 10 s gives up at 1 s.
    /// (Regression: only the head's timer was armed.)
    #[test]
    fn queued_messages_keep_their_own_deadlines_without_node_credit() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        s.send(t0, Bytes::new(), None, Some(Duration::from_secs(10)), 0);
        s.send(t0, Bytes::new(), None, Some(Duration::from_secs(1)), 0);
        let mut none = 0;
        assert!(s.poll_transmit(t0, &mut none).is_none());
        s.send(t0, Bytes::new(), None, Some(Duration::from_secs(2)), 0);
        assert!(s.poll_transmit(t0, &mut none).is_none());
        s.handle_timeout(t0 + Duration::from_millis(1001), None, None);
        let at_1s: Vec<OutEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(gave_up(&at_1s, 2).map(|g| g.0), Some(GiveUp::Deadline));
        assert!(gave_up(&at_1s, 1).is_none() && gave_up(&at_1s, 3).is_none());
        s.handle_timeout(t0 + Duration::from_millis(2001), None, None);
        let at_2s: Vec<OutEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(gave_up(&at_2s, 3).map(|g| g.0), Some(GiveUp::Deadline));
        assert!(gave_up(&at_2s, 1).is_none());
    }

    /// A deadline is stored in whole milliseconds, rounded up: never early, at most
    /// 1 ms late.
    #[test]
    fn a_deadline_off_the_millisecond_grid_fires_within_1_ms_after() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        let t = t0 + Duration::from_micros(300);
        s.send(t, Bytes::new(), None, Some(Duration::from_secs(1)), 0);
        let d = s.times.deadline(1, slot(&s, 1)).unwrap();
        assert!(d >= t + Duration::from_secs(1));
        assert!(d < t + Duration::from_secs(1) + Duration::from_millis(1));
        assert!(run(&mut s, t).is_empty());
        let events = run_until(&mut s, d - Duration::from_nanos(1));
        assert!(gave_up(&events, 1).is_none());
        let events = run_until(&mut s, d);
        assert_eq!(gave_up(&events, 1).map(|g| g.0), Some(GiveUp::Deadline));
    }

    /// Side-map entries (explicit ids, out-of-range timestamps) go with their slot on
    /// every path that ends a message.
    #[test]
    fn side_entries_leave_with_their_slots() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        for n in 1..=5u8 {
            let id = MessageId::Key(IdKey(u128::from(n)));
            s.send(t0, Bytes::from(vec![n]), Some(id), Some(Duration::MAX), 0);
        }
        assert_eq!(side_entries(&s), 10);
        assert!(run(&mut s, t0).is_empty());
        let ids: Vec<_> = s.unsettled().map(|(seq, _, id)| (seq, id)).collect();
        assert_eq!(ids[2], (3, MessageId::Key(IdKey(3))));
        // Settle, reject, hand off: each takes its entries along.
        s.handle_ack(t0, 0, &[SeqRange { start: 2, end: 2 }], None, 0, &[]);
        assert_eq!(side_entries(&s), 8);
        s.handle_reject(t0, 4, crate::wire::RejectReason::NoReceiver);
        assert_eq!(side_entries(&s), 6);
        assert_eq!(s.take(1).map(|(id, _)| id), Some(MessageId::Key(IdKey(1))));
        assert_eq!(side_entries(&s), 4);
        // Give up (too many attempts) after a reconnect retransmitted them.
        s.policy.max_attempts = Some(2);
        s.handle_reconnect();
        let _ = run(&mut s, t0);
        let events = run_until(&mut s, t0 + DAY);
        assert_eq!(
            gave_up(&events, 3),
            Some((GiveUp::MaxAttempts, MessageId::Key(IdKey(3)), 2))
        );
        assert_eq!(
            gave_up(&events, 5),
            Some((GiveUp::MaxAttempts, MessageId::Key(IdKey(5)), 2))
        );
        assert!(s.slots.is_empty());
        assert_eq!(side_entries(&s), 0);
    }

    /// Issue 14, "Timers": on a stream that loses nothing the heap stays empty and the
    /// first-transmission queue holds the unacked messages only (not an RTO's worth of
    /// traffic: without the cumulative ack's pruning it would hold all 10 000).
    #[test]
    fn first_timers_leave_with_the_cumulative_ack_and_the_heap_stays_empty() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        let mut now = t0;
        for i in 1..=10_000u64 {
            now += Duration::from_micros(10);
            s.send(now, Bytes::new(), None, None, 0);
            run(&mut s, now);
            if i % 100 == 0 {
                s.handle_ack(now, i - 50, &[], None, 0, &[]);
            }
            assert!(s.first.len() <= 150, "{} entries at {i}", s.first.len());
        }
        assert!(s.timers.is_empty());
        assert_eq!(s.retransmits(), 0);
    }

    /// A first timer fires exactly one RTO after the transmission, not earlier (no
    /// jitter); the retransmission's timer is jittered within `[rto, 2·rto]`.
    #[test]
    fn a_first_timer_is_one_rto_and_a_retry_timer_is_jittered() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        let rto = s.rtt.rto();
        s.send(t0, Bytes::new(), None, None, 0);
        run(&mut s, t0);
        assert_eq!(s.poll_timeout(), Some(t0 + rto));
        run_until(&mut s, t0 + rto - Duration::from_nanos(1));
        assert_eq!(s.retransmits(), 0);
        run_until(&mut s, t0 + rto);
        assert_eq!(s.retransmits(), 1);
        assert!(s.first.is_empty());
        let next = s.poll_timeout().unwrap();
        assert!(
            next >= t0 + 2 * rto && next <= t0 + 3 * rto,
            "{:?}",
            next - t0
        );
        assert_eq!(s.timers.len(), 1);
    }

    /// RFC 6298 §5.5: a first timer that ran out backs off the next messages' first
    /// timers to twice what it waited (so bursts over a link slower than the RTO stop
    /// going twice), but never past half the time to a message's own deadline nor
    /// below the RTO (a short-deadline message still gets its retransmission), and a
    /// clean sample or a new connection ends it.
    #[test]
    fn a_first_timeout_backs_off_new_first_timers_within_half_their_deadline() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        let rto = s.rtt.rto();
        s.send(t0, Bytes::new(), None, None, 0); // seq 1
        run(&mut s, t0);
        run_until(&mut s, t0 + rto);
        assert_eq!(s.retransmits(), 1);
        // Seq 2, no deadline: its first timer is twice what seq 1 waited.
        let t1 = t0 + rto;
        s.send(t1, Bytes::new(), None, None, 0);
        run(&mut s, t1);
        assert_eq!(s.first.back().map(|e| e.0), Some(t1 + 2 * rto));
        // Seq 3, a deadline 1.5 RTO away: half of it is below the RTO, so one RTO.
        s.send(t1, Bytes::new(), None, Some(rto * 3 / 2), 0);
        run(&mut s, t1);
        run_until(&mut s, t1 + rto - Duration::from_nanos(1));
        assert_eq!(slot(&s, 3).attempts, 1);
        run_until(&mut s, t1 + rto);
        assert_eq!(slot(&s, 3).attempts, 2, "retransmitted before its deadline");
        // Seq 4, a deadline 3 RTOs away: backed off to 1.5 RTO, not 2.
        assert_eq!(first_timeout(&s.rtt, Some(t1 + 3 * rto), t1), rto * 3 / 2);
        // A clean sample (seq 2 was sent once) ends the backoff.
        s.handle_ack(t1 + rto, 0, &[SeqRange { start: 2, end: 2 }], None, 0, &[]);
        assert_eq!(s.rtt.first_rto(), s.rtt.rto());
        // So does a new connection.
        let t2 = t1 + 10 * rto;
        s.send(t2, Bytes::new(), None, None, 0); // seq 4
        run(&mut s, t2);
        run_until(&mut s, t2 + 3 * rto);
        assert!(s.rtt.first_rto() > s.rtt.rto());
        s.handle_reconnect();
        assert_eq!(s.rtt.first_rto(), s.rtt.rto());
    }

    /// After the RTO falls, a later first timer is raised to the queue's last instant
    /// (it fires later, never earlier than its own RTO), while a message whose
    /// deadline comes before that instant is timed on the heap and fails on time.
    #[test]
    fn a_fallen_rto_raises_first_timers_but_never_delays_a_deadline() {
        let mut config = ProtoConfig::default();
        config.retry.deadline = None;
        config.rtt.min_rto = Duration::from_millis(1);
        config.rtt.initial_rto = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut s = OutboundStream::new(
            ORIGIN,
            ChannelId(1),
            Guarantee::AtLeastOnce,
            &config,
            7,
            t0,
            None,
        );
        s.send(t0, Bytes::new(), None, None, 0);
        s.send(t0, Bytes::new(), None, None, 0);
        run(&mut s, t0);
        // An ack of seq 2 only: a 1 ms sample pulls the RTO down to a few ms.
        let t1 = t0 + Duration::from_millis(1);
        s.handle_ack(t1, 0, &[SeqRange { start: 2, end: 2 }], None, 0, &[]);
        assert!(s.rtt.rto() < Duration::from_millis(10));
        s.send(t1, Bytes::new(), None, None, 0); // seq 3: raised to t0 + 1 s
        s.send(t1, Bytes::new(), None, Some(Duration::from_millis(100)), 0); // seq 4
        run(&mut s, t1);
        assert_eq!(s.timers.len(), 1, "seq 4's deadline is on the heap");
        let events = run_until(&mut s, t0 + Duration::from_millis(999));
        assert_eq!(slot(&s, 1).attempts, 1, "no first timer fired early");
        assert_eq!(
            slot(&s, 3).attempts,
            1,
            "seq 3's timer was raised, not early"
        );
        // Seq 4 kept its own (fallen) RTO on the heap, retried, and failed on time.
        let (reason, _, attempts) = gave_up(&events, 4).expect("seq 4 failed at its deadline");
        assert_eq!(reason, GiveUp::Deadline);
        assert!(attempts > 1);
        run_until(&mut s, t0 + Duration::from_secs(1));
        assert_eq!(slot(&s, 1).attempts, 2, "seqs 1 and 3 fire together");
        assert_eq!(slot(&s, 3).attempts, 2);
    }

    /// The retry budget is the stream's own (module docs, "Retries"): once a stream's
    /// retries have spent it, its next retry is deferred by one RTO, not dropped, and
    /// goes once a deposit pays for it; another stream to the same target still
    /// retries at once.
    #[test]
    fn a_refused_retry_waits_one_rto_and_the_budget_is_per_stream() {
        let t0 = Instant::now();
        let new = |seed| budget_stream(t0, seed, Duration::from_secs(10));
        let (mut a, mut b) = (new(7), new(8));
        let rto = a.rtt.rto();
        a.send(t0, Bytes::new(), None, None, 0);
        b.send(t0, Bytes::new(), None, None, 0);
        run(&mut a, t0);
        run(&mut b, t0);
        // The send's deposit pays for the first retry.
        run_until(&mut a, t0 + rto);
        assert_eq!(a.retransmits(), 1);
        // The next one finds the budget spent: deferred by one RTO, still in flight.
        let fire = a.poll_timeout().unwrap();
        assert!(run(&mut a, fire).is_empty());
        assert_eq!(a.retransmits(), 1);
        assert_eq!(a.poll_timeout(), Some(fire + rto));
        assert_eq!(slot(&a, 1).attempts, 2);
        // `b`'s budget is untouched by `a`'s retries.
        run_until(&mut b, t0 + rto);
        assert_eq!(b.retransmits(), 1);
        // A fresh send on `a` deposits again; the deferred retry then goes.
        let ms = Duration::from_millis(1);
        a.send(fire + ms, Bytes::new(), None, None, 0);
        run(&mut a, fire + ms);
        run_until(&mut a, fire + rto);
        assert_eq!(a.retransmits(), 2);
        assert_eq!(slot(&a, 1).attempts, 3);
    }

    /// A stream of `n` messages sent at `t0`, nothing answered: its RTO.
    fn silent_burst(t0: Instant, n: u64) -> (OutboundStream, Duration) {
        let mut s = stream(t0);
        for _ in 0..n {
            s.send(t0, Bytes::new(), None, None, 0);
        }
        run(&mut s, t0);
        let rto = s.rtt.rto();
        (s, rto)
    }

    /// "Silent streams": a burst the receiver has not answered for an RTO draws one
    /// retransmission, of its oldest message, not one per message; the rest wait one
    /// RTO after it, and the wait doubles while probes go unanswered (up to
    /// `retry.backoff_cap`).
    #[test]
    fn a_silent_receiver_draws_one_probe_per_wait_not_the_whole_burst() {
        let t0 = Instant::now();
        let (mut s, rto) = silent_burst(t0, 10);
        run_until(&mut s, t0 + rto);
        assert_eq!(s.retransmits(), 1);
        assert_eq!(slot(&s, 1).attempts, 2, "the probe is the oldest message");
        assert!((2..=10).all(|q| slot(&s, q).attempts == 1));
        run_until(&mut s, t0 + rto * 2 - Duration::from_millis(1));
        assert_eq!(
            s.retransmits(),
            1,
            "the others wait one RTO after the probe"
        );
        // Probes at 1, 2, 4, 8 and 16 RTOs (200 ms each; the next gap is the 2 s cap).
        run_until(&mut s, t0 + rto * 20);
        assert_eq!(s.retransmits(), 5);
        assert!(s.poll_event().is_none(), "nothing given up or settled");
        // An hour of silence (no deadline here): one probe per 2 s cap, not ten, and
        // the list of waiting timers stays bounded.
        run_until(&mut s, t0 + Duration::from_secs(3600));
        assert!(s.retransmits() <= 5 + 3600 / 2, "{}", s.retransmits());
        assert!(s.gate.waiting.len() <= 64, "{}", s.gate.waiting.len());
    }

    /// An answer that shows the receiver got only the probe says the rest were lost:
    /// they go at once, one round trip after the probe, not after another RTO.
    #[test]
    fn an_answer_holding_only_the_probe_releases_the_rest_at_once() {
        let t0 = Instant::now();
        let (mut s, rto) = silent_burst(t0, 10);
        run_until(&mut s, t0 + rto);
        let t1 = t0 + rto + Duration::from_millis(1);
        s.handle_ack(t1, 1, &[], None, 1, &[]);
        run(&mut s, t1);
        assert_eq!(s.retransmits(), 10, "the probe, then the other nine");
        assert!((2..=10).all(|q| slot(&s, q).attempts == 2));
    }

    /// An answer that shows the receiver holds everything the probe did not carry
    /// says it is working through a queue: nothing more is retransmitted (held).
    /// A partial one — it holds or settled more than the probe, but stops short of a
    /// message sent before the probe — says that message is lost (on an ordered
    /// stream, the gap the receiver waits on): it goes at once as the next probe, the
    /// rest keep waiting (NewReno's partial ack).
    #[test]
    fn an_answer_showing_more_than_the_probe_keeps_the_rest_waiting() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        // Held: nothing more goes before the held re-check.
        let (mut s, rto) = silent_burst(t0, 10);
        run_until(&mut s, t0 + rto);
        s.handle_ack(t0 + rto + ms, 1, &[], None, 10, &[]);
        run_until(&mut s, t0 + rto * 5);
        assert_eq!(s.retransmits(), 1);
        // Settled originals up to 6, one round trip (1 ms, seen on seq 1) after the
        // probe: 7 goes now, 8..=11 wait.
        let (mut s, t1, rto) = warm_burst(t0, 10);
        run_until(&mut s, t1 + rto);
        assert_eq!(slot(&s, 2).attempts, 2, "the probe");
        let t2 = t1 + rto + ms;
        s.handle_ack(t2, 6, &[], None, 6, &[]);
        run(&mut s, t2);
        assert_eq!(s.retransmits(), 2, "the probe, then the gap at 7");
        assert_eq!(slot(&s, 7).attempts, 2);
        assert!((8..=11).all(|q| slot(&s, q).attempts == 1));
        // The answer to that fills the rest: nothing more goes.
        s.handle_ack(t2 + ms, 7, &[], None, 11, &[]);
        run_until(&mut s, t2 + rto * 5);
        assert_eq!(s.retransmits(), 2);
        // An answer sooner than any round trip seen answers what was sent before the
        // probe, not the probe: no copy drawn from it.
        let (mut s, rto) = silent_burst(t0, 10);
        run_until(&mut s, t0 + rto);
        s.handle_ack(t0 + rto + ms, 5, &[], None, 5, &[]);
        run(&mut s, t0 + rto + ms);
        assert_eq!(s.retransmits(), 1);
    }

    /// Only an answer that shows the probe can call a message lost: acks of the
    /// originals around an unshown probe never draw another copy of the probe (a
    /// receiver acking one message at a time would otherwise get a copy of it per ack,
    /// outside the retry budget).
    #[test]
    fn an_answer_that_does_not_show_the_probe_draws_no_copy_of_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let (mut s, t1, rto) = warm_burst(t0, 10);
        run_until(&mut s, t1 + rto);
        assert_eq!(slot(&s, 2).attempts, 2, "the probe");
        for k in 3..=6u64 {
            let t = t1 + rto + ms * (2 * k as u32);
            s.handle_ack(t, 1, &[SeqRange { start: k, end: k }], None, 1, &[]);
            run(&mut s, t);
        }
        assert_eq!(
            slot(&s, 2).attempts,
            2,
            "no copy of the probe from acks of 3..=6"
        );
    }

    /// One message acked after 1 ms (a round-trip sample), then `n` more sent at the
    /// returned instant, unanswered: the stream and its RTO.
    fn warm_burst(t0: Instant, n: u64) -> (OutboundStream, Instant, Duration) {
        let mut s = stream(t0);
        s.send(t0, Bytes::new(), None, None, 0);
        run(&mut s, t0);
        let t1 = t0 + Duration::from_millis(1);
        s.handle_ack(t1, 1, &[], None, 1, &[]);
        for _ in 0..n {
            s.send(t1, Bytes::new(), None, None, 0);
        }
        run(&mut s, t1);
        let rto = s.rtt.rto();
        (s, t1, rto)
    }

    /// A probe whose wait passes without an answer while the peer sent other frames
    /// (at least a round trip after the probe) was lost, or its answer was: the rest
    /// go then, not one more probe. A frame sooner than that says nothing.
    #[test]
    fn a_lost_probe_of_a_talking_peer_releases_the_rest_after_one_rto() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let walk = |s: &mut OutboundStream, until: Instant, heard: Instant| {
            while let Some(t) = s.poll_timeout().filter(|t| *t <= until) {
                s.handle_timeout(t, Some(heard), None);
                let mut budget = u64::MAX;
                while s.poll_transmit(t, &mut budget).is_some() {}
            }
        };
        let (mut s, t1, rto) = warm_burst(t0, 10);
        run_until(&mut s, t1 + rto);
        assert_eq!(s.retransmits(), 1);
        // A heartbeat from the peer 2 ms after the probe (round trip 1 ms).
        walk(&mut s, t1 + rto * 2, t1 + rto + ms * 2);
        assert_eq!(s.retransmits(), 10, "the probe, then the other nine");
        // Without a round-trip sample the heartbeat proves nothing: one more probe.
        let (mut s, rto) = silent_burst(t0, 10);
        run_until(&mut s, t0 + rto);
        walk(&mut s, t0 + rto * 2, t0 + rto + ms * 2);
        assert_eq!(s.retransmits(), 2);
    }

    /// With an attempt limit and no deadline, a silent receiver still ends every
    /// message by its limit: the gate holds the others only while the probes so far
    /// are fewer than one message's retransmissions, then each counts its own.
    #[test]
    fn an_attempt_limit_still_ends_every_message_of_a_silent_stream() {
        let t0 = Instant::now();
        let mut s = stream_with(t0, 7, |c| c.retry.max_attempts = Some(4));
        for _ in 0..10 {
            s.send(t0, Bytes::new(), None, None, 0);
        }
        run(&mut s, t0);
        // Without the gate the last give-up comes after 1 + 2 + 4 + 8 RTOs at most
        // (backoff with equal jitter, capped at 2 s): within 12 s here, 20 s allowed.
        let events = run_until(&mut s, t0 + Duration::from_secs(20));
        for seq in 1..=10 {
            assert_eq!(
                gave_up(&events, seq).map(|(r, _, n)| (r, n)),
                Some((GiveUp::MaxAttempts, 4)),
                "seq {seq}"
            );
        }
        assert!(s.slots.is_empty());
    }

    /// A nack or a reject is an answer too: it re-arms the waiting timers at once.
    #[test]
    fn a_reject_answers_the_probe() {
        let t0 = Instant::now();
        let (mut s, rto) = silent_burst(t0, 10);
        run_until(&mut s, t0 + rto);
        let t1 = t0 + rto + Duration::from_millis(1);
        s.handle_reject(t1, 1, crate::wire::RejectReason::NoReceiver);
        run(&mut s, t1);
        assert_eq!(s.retransmits(), 10);
    }

    /// Walk the stream's timers up to `until`; count the probes it owes on the way.
    fn run_counting_probes(s: &mut OutboundStream, until: Instant) -> (Vec<OutEvent>, u32) {
        let (mut events, mut probes) = (Vec::new(), 0);
        while let Some(t) = s.poll_timeout().filter(|t| *t <= until) {
            events.extend(run(s, t));
            probes += u32::from(s.take_probe());
        }
        (events, probes)
    }

    /// Liveness: a message the receiver reported held, whose finishing ack was then
    /// lost with no later traffic to repeat it, is still settled. Its re-check asks for
    /// the stream's state (one probe for all held messages), without retransmitting.
    #[test]
    fn a_held_message_whose_ack_was_lost_is_asked_about_again() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        s.send(t0, Bytes::new(), None, None, 0);
        s.send(t0, Bytes::new(), None, None, 0);
        run(&mut s, t0);
        let ms = Duration::from_millis(1);
        // The receiver holds both (in its handler); the ack that finishes them is lost.
        s.handle_ack(t0 + ms, 0, &[], None, 2, &[]);
        let keepalive = ProtoConfig::default().retry.backoff_cap;
        let until = t0 + s.rtt.rto() + keepalive;
        let (events, probes) = run_counting_probes(&mut s, until);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(s.retransmits(), 0, "held messages are not retransmitted");
        assert!(probes >= 1, "no probe asked for the lost ack");
        assert!(probes <= 3, "one probe per RTO at most, got {probes}");
        assert_eq!(s.counters().held_probes, u64::from(probes));
        // The probe's answer: the receiver's current cumulative ack.
        s.handle_ack(until, 2, &[], None, 2, &[]);
        let settled = std::iter::from_fn(|| s.poll_event())
            .filter(|e| matches!(e, OutEvent::Settled { .. }))
            .count();
        assert_eq!(settled, 2);
        // Nothing left to re-check (stale timer entries fire as no-ops).
        let (events, probes) = run_counting_probes(&mut s, until + 60 * keepalive);
        assert!(events.is_empty() && probes == 0 && s.retransmits() == 0);
    }

    /// Liveness: a message the receiver held and then let go (its nack lost) is
    /// retransmitted once an ack reports the lower held watermark.
    #[test]
    fn a_held_message_let_go_is_retransmitted_though_its_nack_was_lost() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        s.send(t0, Bytes::new(), None, None, 0);
        run(&mut s, t0);
        let ms = Duration::from_millis(1);
        s.handle_ack(t0 + ms, 0, &[], None, 1, &[]);
        // The answer to the re-check's probe: nothing held any more.
        s.handle_ack(t0 + 2 * ms, 0, &[], None, 0, &[]);
        let keepalive = ProtoConfig::default().retry.backoff_cap;
        let until = t0 + s.rtt.rto() + keepalive;
        run_until(&mut s, until);
        assert!(s.retransmits() >= 1);
    }
    /// Held spans (protocol version 5): messages the receiver holds above a gap in its
    /// watermark (a receiver that restarted holds redeliveries between seqs its earlier
    /// run settled) are re-checked, not retransmitted; the one in the gap is
    /// retransmitted; a nack or a later ack without the span lets a message go again.
    #[test]
    fn messages_held_above_the_watermark_are_not_retransmitted() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        for _ in 0..6 {
            s.send(t0, Bytes::new(), None, None, 0);
        }
        run(&mut s, t0);
        let ms = Duration::from_millis(1);
        let span = |start, end| SeqRange { start, end };
        // Holds 1, 3, 5-6; 2 and 4 are lost. Listed out of order, overlapping, with
        // an inverted span and one past what was sent, as a lying receiver might.
        let lie = [span(5, 6), span(3, 3), span(6, 5), span(5, 5), span(9, 12)];
        s.handle_ack(t0 + ms, 0, &[], None, 1, &lie);
        assert_eq!(s.held_spans, vec![(3, 3), (5, 6)]);
        // Walk the timers like a driver, keeping the seqs that go out.
        let walk = |s: &mut OutboundStream, until: Instant| {
            let mut sent = Vec::new();
            while let Some(t) = s.poll_timeout().filter(|t| *t <= until) {
                s.handle_timeout(t, None, None);
                let mut budget = u64::MAX;
                while let Some(d) = s.poll_transmit(t, &mut budget) {
                    sent.push(d.seq);
                }
                while s.poll_event().is_some() {}
            }
            sent
        };
        let keepalive = ProtoConfig::default().retry.backoff_cap;
        let until = t0 + s.rtt.rto() + keepalive / 2;
        let resent = walk(&mut s, until);
        assert!(
            resent.iter().all(|seq| [2, 4].contains(seq)) && resent.contains(&2),
            "retransmitted {resent:?}: only the lost 2 and 4 may go"
        );
        // A nack of 5 lets it go (only it: 6 is still held): it is retransmitted.
        s.handle_nack(until, 5);
        assert_eq!(s.held_spans, vec![(3, 3), (6, 6)]);
        let resent = walk(&mut s, until + NACK_RESEND_MIN);
        assert!(resent.contains(&5), "{resent:?}");
        // A later ack without the span: 3 is no longer held.
        s.handle_ack(until + 2 * ms, 0, &[], None, 1, &[]);
        assert!(!s.is_held(3) && s.is_held(1));
    }

    /// A receiver that claims a message held for good (a lying or stuck one) only
    /// delays its end: the message is re-checked, never retransmitted, and fails at
    /// its deadline.
    #[test]
    fn a_message_claimed_held_for_good_still_ends_at_its_deadline() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        s.send(t0, Bytes::new(), None, Some(Duration::from_secs(5)), 0);
        s.send(t0, Bytes::new(), None, Some(Duration::from_secs(5)), 0);
        run(&mut s, t0);
        let held = [SeqRange { start: 2, end: 2 }];
        let ms = Duration::from_millis(1);
        s.handle_ack(t0 + ms, 0, &[], Some(100), 0, &held);
        let mut events = Vec::new();
        let mut now = t0 + ms;
        while let Some(t) = s
            .poll_timeout()
            .filter(|t| *t <= t0 + Duration::from_secs(6))
        {
            now = t;
            events.extend(run(&mut s, now));
            // Every answer to a re-check claims it held again.
            s.handle_ack(now, 0, &[], Some(100), 0, &held);
        }
        assert!(now >= t0 + Duration::from_secs(5));
        assert!(
            matches!(gave_up(&events, 2), Some((GiveUp::Deadline, _, _))),
            "{events:?}"
        );
        assert!(s.retransmits() >= 1, "1, not held, is retransmitted");
    }

    /// When the floor moves past seqs the receiver's watermark does not cover (it
    /// restarted, and its earlier run settled them), one copy of the oldest unsettled
    /// message carries the new floor at once, not counted as a retransmission; an
    /// ack that moves the floor within the watermark, a version-1 ack (no
    /// watermark), or one showing the receiver processing that message sends none.
    #[test]
    fn a_floor_past_what_the_receiver_holds_is_carried_at_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let setup = || {
            let mut s = stream(t0);
            for _ in 0..5 {
                s.send(t0, Bytes::new(), None, None, 0);
            }
            run(&mut s, t0);
            // The earlier receiver run settled 2 and 3; the new one holds 1.
            let span = SeqRange { start: 2, end: 3 };
            s.handle_ack(t0 + ms, 0, &[span], Some(100), 1, &[]);
            s
        };
        let sent = |s: &mut OutboundStream, now: Instant| {
            let mut budget = u64::MAX;
            std::iter::from_fn(|| s.poll_transmit(now, &mut budget))
                .map(|d| (d.seq, d.floor))
                .collect::<Vec<_>>()
        };
        let mut s = setup();
        assert!(sent(&mut s, t0 + ms).is_empty());
        // 1 is done: the floor moves to 4, past 2 and 3, which the new run never saw.
        s.handle_ack(t0 + 2 * ms, 1, &[], Some(100), 1, &[]);
        assert_eq!(sent(&mut s, t0 + 2 * ms), [(4, 4)]);
        assert_eq!(s.retransmits(), 0);
        // Within the watermark: nothing.
        s.handle_ack(t0 + 3 * ms, 4, &[], Some(100), 4, &[]);
        assert!(sent(&mut s, t0 + 3 * ms).is_empty());
        // A version-1 ack (no credit, no watermark): nothing.
        let mut s = setup();
        s.handle_ack(t0 + 2 * ms, 1, &[], None, 0, &[]);
        assert!(sent(&mut s, t0 + 2 * ms).is_empty());
        // The receiver is processing 4 already (a held span): a floor would not help.
        let mut s = setup();
        let four = SeqRange { start: 4, end: 4 };
        s.handle_ack(t0 + 2 * ms, 1, &[], Some(100), 1, &[four]);
        assert!(sent(&mut s, t0 + 2 * ms).is_empty());
    }

    /// Nacks pace resends: a receiver nacking every copy at once (four nacks each) gets
    /// one copy per NACK_RESEND_MIN, not one per nack or per round trip; a nack for a
    /// copy older than that is answered at once. (Regression: ~900 resends a second
    /// of a message whose every copy was nacked.)
    #[test]
    fn nacks_resend_a_message_at_most_once_per_nack_interval() {
        let t0 = Instant::now();
        let mut s = stream(t0);
        s.send(t0, Bytes::from_static(b"m"), None, None, 0);
        run(&mut s, t0);
        let ms = Duration::from_millis(1);
        let mut now = t0;
        // One second of a receiver nacking each copy 1 ms after it left, four times.
        while now < t0 + Duration::from_secs(1) {
            now += ms;
            for _ in 0..4 {
                s.handle_nack(now, 1);
            }
            run(&mut s, now);
        }
        let resent = s.retransmits();
        assert!(
            (8..=11).contains(&resent),
            "{resent} resends in 1 s of nacks (one per {NACK_RESEND_MIN:?} expected)"
        );
        // A nack for a copy sent long ago is answered at once.
        let mut s = stream(t0);
        s.send(t0, Bytes::from_static(b"m"), None, None, 0);
        run(&mut s, t0);
        let late = t0 + NACK_RESEND_MIN + ms;
        s.handle_nack(late, 1);
        run(&mut s, late);
        assert_eq!(s.retransmits(), 1);
    }

    /// A nack that comes while a paced resend is armed, after another copy went out
    /// (a reconnect's), is still answered within NACK_RESEND_MIN of that copy, not at
    /// the next retransmission timer.
    #[test]
    fn a_nack_for_a_copy_sent_while_a_resend_was_armed_is_answered() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut s = stream(t0);
        s.send(t0, Bytes::from_static(b"m"), None, None, 0);
        run(&mut s, t0);
        s.handle_nack(t0 + 20 * ms, 1); // armed for t0 + 100 ms
        s.handle_reconnect(); // resends at t0 + 50 ms
        run(&mut s, t0 + 50 * ms);
        assert_eq!(s.retransmits(), 1);
        s.handle_nack(t0 + 55 * ms, 1); // the reconnect's copy failed too
        run_until(&mut s, t0 + 160 * ms);
        assert_eq!(s.retransmits(), 2, "the second nack was dropped");
    }

    /// A config that was never validated (the sans-IO `Endpoint` does not check it):
    /// a zero RTO and no retry budget. A retry over the budget is deferred by a
    /// millisecond at least, so `handle_timeout` returns. (Regression: the deferral
    /// re-armed the timer at `now` and `handle_timeout` popped it for ever.)
    #[test]
    fn a_zero_rto_over_the_budget_does_not_spin() {
        let t0 = Instant::now();
        let mut s = stream_with(t0, 3, |c| {
            c.rtt.initial_rto = Duration::ZERO;
            c.rtt.min_rto = Duration::ZERO;
            c.rtt.max_rto = Duration::ZERO;
            c.retry_budget = crate::retry::RetryBudgetConfig {
                ttl: Duration::from_secs(10),
                min_retries_per_sec: 0,
                retry_ratio: 0.0,
            };
        });
        s.send(t0, Bytes::new(), None, None, 0);
        run(&mut s, t0);
        run(&mut s, t0 + Duration::from_millis(5));
        assert_eq!(s.retransmits(), 0, "no budget, no retry");
        let next = s.poll_timeout().expect("the message's timer");
        assert!(next > t0 + Duration::from_millis(5), "{next:?}");
    }

    /// Retry budget: every fresh send and every message an ack settles deposits one
    /// retry (ratio 1.0, no floor); two sends and one acked message pay for exactly
    /// three retries of the message that is lost.
    #[test]
    fn fresh_sends_and_acked_messages_each_earn_one_retry() {
        let t0 = Instant::now();
        let mut s = budget_stream(t0, 7, Duration::from_secs(60));
        s.send(t0, Bytes::new(), None, None, 0);
        s.send(t0, Bytes::new(), None, None, 0);
        run(&mut s, t0);
        s.handle_ack(t0 + Duration::from_millis(1), 1, &[], None, 0, &[]);
        // Seq 2 is lost: its timer fires every <= 2 s (the backoff cap); 50 s of
        // firings, all within the budget's window.
        run_until(&mut s, t0 + Duration::from_secs(50));
        assert_eq!(s.retransmits(), 3);
    }
}
