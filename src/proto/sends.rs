//! What becomes of each sent message, sans-IO: the receipts a node owes and the hinted
//! handoff decisions.
//!
//! [`Sends`] holds one entry per message whose receipt is still open (the reply is
//! the owner's type `R`: the driver's oneshot, a test's plain value) and decides, for
//! every event of the endpoint and the liveness policy, how each resolves:
//!
//! * **Settled** (acked; at-most-once: transmitted) → `Acked` / `Sent`, unless it was
//!   a replayed hint, which the hint store settles instead.
//! * **Target Down** with handoff `on_down` → every unacknowledged message to it goes
//!   to the hint store (`HandedOff`); one the store refuses stays in flight and keeps
//!   retrying, its deadline decides. A *new* send to a Down target that the store
//!   refuses fails at once with the store's reason.
//! * **Given up** (deadline, attempts) → with handoff `on_give_up`, into the hint store
//!   (`HandedOff`, or the store's refusal); without, the give-up itself. A replayed hint
//!   that is given up goes back to the store's queue.
//! * **Rejected** by the receiver → the rejection (a replayed hint: the store decides).
//! * **Shutdown** → whatever is still open is handed off (if the node has a hint store)
//!   by [`Sends::spool_all`], the rest fails with [`Resolution::Shutdown`].
//!
//! The hint store itself is IO; it is reached through the [`Hints`] trait, which the
//! node's spool implements. Every decision here is a function of its inputs and `now`.

use super::seqmap::SeqMap;
use super::{Endpoint, SendRef};
use crate::handoff::HintError;
use crate::id::{Guarantee, MessageId, NodeId};
use crate::retry::GiveUp;
use crate::wire::RejectReason;
use bytes::Bytes;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The hint store, as the handoff decisions need it.
pub(crate) trait Hints {
    /// Move messages to a target the detector holds Down into the store.
    fn on_down(&self) -> bool;
    /// Move messages the sender gave up on into the store.
    fn on_give_up(&self) -> bool;
    /// Store `payload` (sent as `send` with `id`) as a hint for `send.peer`, which has
    /// been Down for `down_for` (`None`: not Down).
    fn store(
        &mut self,
        send: SendRef,
        id: MessageId,
        guarantee: Guarantee,
        payload: Bytes,
        down_for: Option<Duration>,
        now: Instant,
    ) -> Result<(), HintError>;
    /// `send` settled: `true` if it was a replayed hint (the store settles it).
    fn on_settled(&mut self, send: SendRef, endpoint: &mut Endpoint) -> bool;
    /// `send` was given up: `true` if it was a replayed hint (back to its queue).
    fn on_gave_up(&mut self, send: SendRef) -> bool;
    /// `send` was rejected: `true` if it was a replayed hint (the store decides).
    fn on_rejected(&mut self, send: SendRef, reason: RejectReason, endpoint: &mut Endpoint)
        -> bool;
    /// When the store next has work of its own (replay, expiry) at `now`.
    fn next_deadline(&self, now: Instant) -> Option<Instant>;
    /// Are there hints waiting to be replayed?
    fn has_replay_work(&self) -> bool {
        false
    }
    /// The store's own work due at `now` (fsync, expiry, replay to the `ready` peers,
    /// each replayed message taking a slot of `windows`).
    fn handle_timeout(
        &mut self,
        _endpoint: &mut Endpoint,
        _ready: &[NodeId],
        _windows: &mut dyn super::replay::Windows,
        _now: Instant,
    ) {
    }
}

/// How a receipt resolves; the node maps it to its public outcome or error.
#[derive(Debug)]
pub(crate) enum Resolution {
    /// Acknowledged by the receiver (at-most-once: transmitted).
    Settled,
    /// In the hint store, to be replayed when the target returns.
    HandedOff,
    /// The sender gave up and there was no hint store to take it.
    GaveUp { reason: GiveUp, attempts: u32 },
    /// The hint store refused it.
    HandoffRefused(HintError),
    /// The receiver refused it for good.
    Rejected(RejectReason),
    /// The node stopped first.
    Shutdown,
    /// At-most-once, never transmitted: the target went Down.
    PeerDown,
}

/// One thing [`Sends`] reports, in the order it happened.
#[derive(Debug)]
pub(crate) enum Report<R> {
    /// A replayed hint was acknowledged (no receipt: the store settled it).
    HintReplayed(SendRef),
    /// The sender gave up on a message that has a receipt (its resolution follows).
    GaveUp {
        send: SendRef,
        id: MessageId,
        reason: GiveUp,
        attempts: u32,
    },
    /// The receiver rejected a message (any resolution follows). `for_now`: a
    /// replayed hint refused for the time being (it stays in the store and is
    /// replayed again), not a refusal for good.
    Rejected {
        send: SendRef,
        reason: RejectReason,
        for_now: bool,
    },
    /// A message went into the hint store (its resolution follows).
    HintStored { send: SendRef, id: MessageId },
    /// A receipt resolves.
    Resolve {
        send: SendRef,
        guarantee: Guarantee,
        reply: R,
        how: Resolution,
    },
}

/// The open receipts of one node, and the handoff decisions about them.
#[derive(Debug)]
pub(crate) struct Sends<R> {
    open: SeqMap<(Guarantee, R)>,
    handed_off: u64,
    handoff_refused: u64,
    /// Graceful shutdown: no new sends; open receipts get until then to settle.
    draining_until: Option<Instant>,
    /// The "hint refused" warning's rate limit: when it was last raised, and how many
    /// refusals were logged at debug level since.
    refused_warned_at: Option<Instant>,
    refused_quiet: u64,
    /// When a peer goes Down, fail its at-most-once messages still waiting for credit
    /// (`NodeConfig::fail_fast_when_down` without handoff on Down).
    pub(crate) amo_fails_on_down: bool,
    /// Peers decommissioned and not watched again since: their messages are never
    /// hinted (their hints were dropped; a hint now would reach whatever process
    /// takes the id next).
    pub(crate) decommissioned: HashSet<NodeId>,
}

/// At most one "hint refused" warning per this long (a full store refuses every
/// message of a burst; the rest go to debug, and the next warning counts them).
const REFUSED_WARN_EVERY: Duration = Duration::from_secs(10);

impl<R> Default for Sends<R> {
    fn default() -> Self {
        Sends {
            open: SeqMap::default(),
            handed_off: 0,
            handoff_refused: 0,
            draining_until: None,
            refused_warned_at: None,
            refused_quiet: 0,
            amo_fails_on_down: false,
            decommissioned: HashSet::new(),
        }
    }
}

impl<R> Sends<R> {
    /// Open receipts.
    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }

    /// The open receipt of `send`, for observation.
    pub(crate) fn get_mut(&mut self, send: &SendRef) -> Option<&mut R> {
        self.open.get_mut(send).map(|(_, r)| r)
    }

    /// Messages moved into the hint store by this run.
    pub(crate) fn handed_off(&self) -> u64 {
        self.handed_off
    }

    /// Messages the hint store refused.
    pub(crate) fn handoff_refused(&self) -> u64 {
        self.handoff_refused
    }

    /// Graceful shutdown starts at `now`: from here on the caller takes no new send,
    /// and the open receipts get `grace` to settle. Returns `false` if it had started.
    pub(crate) fn begin_drain(&mut self, now: Instant, grace: Duration) -> bool {
        if self.draining_until.is_some() {
            return false;
        }
        self.draining_until = Some(crate::retry::later(now, grace));
        true
    }

    /// Is the node shutting down (no new sends)?
    pub(crate) fn draining(&self) -> bool {
        self.draining_until.is_some()
    }

    /// Is the drain over at `now`: every receipt settled, or the grace passed? Then
    /// what is still open goes to the hint store ([`Sends::spool_all`]) or fails.
    pub(crate) fn drain_over(&self, now: Instant) -> bool {
        self.draining_until
            .is_some_and(|until| self.open.is_empty() || now >= until)
    }

    /// When [`drain_over`](Self::drain_over) turns true by the clock alone.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.draining_until
    }

    /// `send` was just accepted by the endpoint. If its target is Down (`down_for`:
    /// for how long; `None` unless Down) and the store takes messages for Down
    /// targets, it goes to the store at once. So it does, behind them, when this run's
    /// own hints for its stream hold the id floor more than a window below its id
    /// ([`Endpoint::far_above_hint_floor`]): the target would refuse it as a dedup
    /// window overrun until their replay raised the floor, and while refused it would
    /// hold the stream's credit, which the replay needs. (Regression: 9 000 own hints
    /// and a steady producer on the returned target's channel; nothing moved until the
    /// live messages' 30 s deadline handed them off.) If the store refuses it, it goes
    /// live as before.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn opened(
        &mut self,
        endpoint: &mut Endpoint,
        hints: Option<&mut impl Hints>,
        down_for: Option<Duration>,
        send: SendRef,
        guarantee: Guarantee,
        reply: R,
        now: Instant,
        out: &mut Vec<Report<R>>,
    ) {
        self.open.insert(send, (guarantee, reply));
        if let Some(hints) = hints {
            if guarantee != Guarantee::AtMostOnce && down_for.is_some() && hints.on_down() {
                self.hand_off(endpoint, hints, send.peer, Some(send), down_for, now, out);
            } else if endpoint.far_above_hint_floor(send) {
                self.queue_behind_hints(endpoint, hints, send, now, out);
            }
        }
    }

    /// Store `send` behind its stream's own hints (see [`Sends::opened`]); if the store
    /// refuses it, it stays live.
    fn queue_behind_hints(
        &mut self,
        endpoint: &mut Endpoint,
        hints: &mut impl Hints,
        send: SendRef,
        now: Instant,
        out: &mut Vec<Report<R>>,
    ) {
        let Some((payload, id)) = endpoint.in_flight_one(send) else {
            return;
        };
        let Some(&(guarantee, _)) = self.open.get(&send) else {
            return;
        };
        if self
            .store(hints, send, id, guarantee, payload, None, now, out)
            .is_ok()
            && endpoint.hand_off(send)
        {
            self.resolve(send, Resolution::HandedOff, out);
        }
    }

    /// The detector found `peer` Down (for `down_for`).
    pub(crate) fn peer_down(
        &mut self,
        endpoint: &mut Endpoint,
        hints: Option<&mut impl Hints>,
        peer: NodeId,
        down_for: Option<Duration>,
        now: Instant,
        out: &mut Vec<Report<R>>,
    ) {
        if let Some(hints) = hints.filter(|h| h.on_down()) {
            self.hand_off(endpoint, hints, peer, None, down_for, now, out);
        }
        if self.amo_fails_on_down {
            self.fail_unsent_amo(endpoint, peer, out);
        }
    }

    /// Shutdown: every open receipt's message goes to the hint store (those it refuses
    /// stay open, for the caller to fail).
    pub(crate) fn spool_all(
        &mut self,
        endpoint: &mut Endpoint,
        hints: &mut impl Hints,
        down_for: impl Fn(NodeId) -> Option<Duration>,
        now: Instant,
        out: &mut Vec<Report<R>>,
    ) {
        let mut peers: Vec<NodeId> = self.open.keys().map(|r| r.peer).collect();
        peers.sort_unstable();
        peers.dedup();
        for peer in peers {
            if self.decommissioned.contains(&peer) {
                continue; // never hinted (see `decommissioned`); fails at the stop
            }
            self.hand_off(endpoint, hints, peer, None, down_for(peer), now, out);
        }
    }

    /// The endpoint settled `send`.
    pub(crate) fn settled(
        &mut self,
        endpoint: &mut Endpoint,
        hints: Option<&mut impl Hints>,
        send: SendRef,
        out: &mut Vec<Report<R>>,
    ) {
        if hints.is_some_and(|h| h.on_settled(send, endpoint)) {
            out.push(Report::HintReplayed(send));
            return;
        }
        self.resolve(send, Resolution::Settled, out);
    }

    /// The endpoint gave `send` up.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gave_up(
        &mut self,
        endpoint: &mut Endpoint,
        mut hints: Option<&mut impl Hints>,
        send: SendRef,
        id: MessageId,
        payload: Bytes,
        reason: GiveUp,
        attempts: u32,
        down_for: Option<Duration>,
        now: Instant,
        out: &mut Vec<Report<R>>,
    ) {
        if hints.as_mut().is_some_and(|h| h.on_gave_up(send)) {
            return; // a replay: it stays in the store
        }
        if self.decommissioned.contains(&send.peer) {
            // In flight when its target was decommissioned: given up, not hinted.
            // (Regression: it became a new hint 30 s later, replayed to the next
            // process with that id.)
            hints = None;
        }
        let Some(&(guarantee, _)) = self.open.get(&send) else {
            return;
        };
        out.push(Report::GaveUp {
            send,
            id,
            reason,
            attempts,
        });
        let how = match hints.filter(|h| h.on_give_up()) {
            Some(hints) => {
                match self.store(hints, send, id, guarantee, payload, down_for, now, out) {
                    Ok(()) => {
                        endpoint.hint_stored(send, id);
                        Resolution::HandedOff
                    }
                    Err(e) => {
                        self.handoff_refused += 1;
                        Resolution::HandoffRefused(e)
                    }
                }
            }
            None => Resolution::GaveUp { reason, attempts },
        };
        self.resolve(send, how, out);
    }

    /// The receiver rejected `send`.
    pub(crate) fn rejected(
        &mut self,
        endpoint: &mut Endpoint,
        hints: Option<&mut impl Hints>,
        send: SendRef,
        reason: RejectReason,
        out: &mut Vec<Report<R>>,
    ) {
        let replay = hints.is_some_and(|h| h.on_rejected(send, reason, endpoint));
        // A replay refused for now goes back to its queue: reported (traced), but not
        // a refusal for good. (Regression: the rejected-messages metric counted one
        // hint once per replay, thousands of times over its TTL.)
        let for_now = replay && crate::proto::replay::refused_for_now(reason);
        out.push(Report::Rejected {
            send,
            reason,
            for_now,
        });
        if replay {
            return;
        }
        self.resolve(send, Resolution::Rejected(reason), out);
    }

    /// Fail every open receipt (the node stops).
    pub(crate) fn fail_all(&mut self, out: &mut Vec<Report<R>>) {
        for (send, (guarantee, reply)) in self.open.drain() {
            out.push(Report::Resolve {
                send,
                guarantee,
                reply,
                how: Resolution::Shutdown,
            });
        }
    }

    /// Move unacknowledged messages to `peer` (or only `only`) into the hint store:
    /// their receipts resolve as handed off. A message the store refuses stays in
    /// flight and keeps retrying, unless it is `only` (a new send): that one fails now,
    /// with the store's reason, rather than at its deadline.
    #[allow(clippy::too_many_arguments)]
    fn hand_off(
        &mut self,
        endpoint: &mut Endpoint,
        hints: &mut impl Hints,
        peer: NodeId,
        only: Option<SendRef>,
        down_for: Option<Duration>,
        now: Instant,
        out: &mut Vec<Report<R>>,
    ) {
        // One new send to a Down peer looks up its own message only.
        let messages = match only {
            Some(send) => endpoint
                .in_flight_one(send)
                .map(|(payload, id)| (send, payload, id))
                .into_iter()
                .collect(),
            None => endpoint.in_flight_to(peer),
        };
        for (send, payload, id) in messages {
            let Some(&(guarantee, _)) = self.open.get(&send) else {
                continue; // a replayed hint: already stored
            };
            if guarantee == Guarantee::AtMostOnce {
                // Never hinted (it is never retried): one still waiting for credit
                // fails with `PeerDown` at the Down, or `Shutdown` at a stop.
                continue;
            }
            let stored = self.store(hints, send, id, guarantee, payload, down_for, now, out);
            let how = match stored {
                Ok(()) if endpoint.hand_off(send) => Resolution::HandedOff,
                Err(e) if only.is_some() && endpoint.abandon(send) => {
                    self.handoff_refused += 1;
                    Resolution::HandoffRefused(e)
                }
                _ => continue,
            };
            self.resolve(send, how, out);
        }
    }

    /// Whether a refused hint is warned about now (at most once per
    /// [`REFUSED_WARN_EVERY`]); if so, the next one waits that long.
    fn refused_warning_due(&mut self, now: Instant) -> bool {
        let due = self
            .refused_warned_at
            .is_none_or(|t| now.saturating_duration_since(t) >= REFUSED_WARN_EVERY);
        if due {
            self.refused_warned_at = Some(now);
        }
        due
    }

    /// At-most-once messages to `peer`, gone Down, that were never transmitted: they
    /// are never retried and have no deadline, so they would wait for the credit of a
    /// receiver that is gone (one going out per unanswered credit probe, every few
    /// seconds). They fail with `PeerDown` instead. (Regression: 1 895 of 6 000
    /// receipts to a receiver dropped for good were still open 50 s later.)
    pub(crate) fn fail_unsent_amo(
        &mut self,
        endpoint: &mut Endpoint,
        peer: NodeId,
        out: &mut Vec<Report<R>>,
    ) {
        let waiting: Vec<SendRef> = endpoint
            .in_flight_to(peer)
            .into_iter()
            .map(|(send, _, _)| send)
            .filter(|send| matches!(self.open.get(send), Some((Guarantee::AtMostOnce, _))))
            .collect();
        for send in waiting {
            if endpoint.abandon(send) {
                self.resolve(send, Resolution::PeerDown, out);
            }
        }
    }

    /// Resolve the open receipt of `send` as `how` (nothing if none is open).
    fn resolve(&mut self, send: SendRef, how: Resolution, out: &mut Vec<Report<R>>) {
        if let Some((guarantee, reply)) = self.open.remove(&send) {
            out.push(Report::Resolve {
                send,
                guarantee,
                reply,
                how,
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn store(
        &mut self,
        hints: &mut impl Hints,
        send: SendRef,
        id: MessageId,
        guarantee: Guarantee,
        payload: Bytes,
        down_for: Option<Duration>,
        now: Instant,
        out: &mut Vec<Report<R>>,
    ) -> Result<(), HintError> {
        match hints.store(send, id, guarantee, payload, down_for, now) {
            Ok(()) => {
                self.handed_off += 1;
                out.push(Report::HintStored { send, id });
                Ok(())
            }
            Err(e) => {
                if self.refused_warning_due(now) {
                    let quiet = std::mem::take(&mut self.refused_quiet);
                    tracing::warn!(peer = %send.peer, %id, error = %e, refused_since_last_warning = quiet, "hint refused");
                } else {
                    self.refused_quiet += 1;
                    tracing::debug!(peer = %send.peer, %id, error = %e, "hint refused");
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dedup::{Dedup, DedupConfig};
    use crate::id::{ChannelId, Origin};
    use crate::proto::{Outgoing, ProtoConfig};
    use std::sync::Arc;

    /// A hint store in memory that refuses when `full`.
    #[derive(Debug, Default)]
    pub(crate) struct MemHints {
        pub(crate) on_down: bool,
        pub(crate) on_give_up: bool,
        pub(crate) full: bool,
        pub(crate) stored: Vec<(SendRef, Bytes, Option<Duration>)>,
        pub(crate) replaying: Vec<SendRef>,
    }

    impl Hints for MemHints {
        fn on_down(&self) -> bool {
            self.on_down
        }
        fn on_give_up(&self) -> bool {
            self.on_give_up
        }
        fn store(
            &mut self,
            send: SendRef,
            _id: MessageId,
            _guarantee: Guarantee,
            payload: Bytes,
            down_for: Option<Duration>,
            _now: Instant,
        ) -> Result<(), HintError> {
            if self.full {
                return Err(HintError::TargetFull {
                    target: send.peer,
                    bytes: 1,
                    max: 0,
                });
            }
            self.stored.push((send, payload, down_for));
            Ok(())
        }
        fn on_settled(&mut self, send: SendRef, _: &mut Endpoint) -> bool {
            self.replaying.contains(&send)
        }
        fn on_gave_up(&mut self, send: SendRef) -> bool {
            self.replaying.contains(&send)
        }
        fn on_rejected(&mut self, send: SendRef, _: RejectReason, _: &mut Endpoint) -> bool {
            self.replaying.contains(&send)
        }
        fn next_deadline(&self, _: Instant) -> Option<Instant> {
            None
        }
    }

    const PEER: NodeId = NodeId(2);

    fn endpoint(now: Instant) -> Endpoint {
        let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap());
        let origin = Origin {
            node: NodeId(1),
            incarnation: 1,
        };
        Endpoint::new(origin, ProtoConfig::default(), dedup, 1)
    }

    fn send(ep: &mut Endpoint, g: Guarantee, byte: u8, now: Instant) -> SendRef {
        ep.send(
            now,
            Outgoing {
                peer: PEER,
                // One guarantee per channel.
                channel: ChannelId(match g {
                    Guarantee::AtMostOnce => 1,
                    Guarantee::AtLeastOnce => 2,
                    _ => 3,
                }),
                guarantee: g,
                payload: Bytes::from(vec![byte]),
                id: None,
                deadline: None,
                schema: 0,
            },
        )
        .unwrap()
    }

    /// [`send`] a message and open its receipt (its value is the message byte), the
    /// target Down for `down_for` if that is `Some`.
    #[allow(clippy::too_many_arguments)]
    fn open_one(
        ep: &mut Endpoint,
        sends: &mut Sends<u8>,
        hints: &mut MemHints,
        out: &mut Vec<Report<u8>>,
        g: Guarantee,
        byte: u8,
        down_for: Option<Duration>,
        now: Instant,
    ) -> SendRef {
        let r = send(ep, g, byte, now);
        sends.opened(ep, Some(hints), down_for, r, g, byte, now, out);
        r
    }

    /// The receipts' values (`reply` is the message byte) and resolutions, in order.
    fn resolved(out: &mut Vec<Report<u8>>) -> Vec<(u8, String)> {
        out.drain(..)
            .filter_map(|r| match r {
                Report::Resolve { reply, how, .. } => Some((reply, format!("{how:?}"))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_down_target_hands_off_every_open_message_and_a_full_store_keeps_them_in_flight() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        let mut hints = MemHints {
            on_down: true,
            full: true,
            ..MemHints::default()
        };
        for b in 0..3u8 {
            let alo = Guarantee::AtLeastOnce;
            open_one(&mut ep, &mut sends, &mut hints, &mut out, alo, b, None, now);
        }
        assert!(out.is_empty(), "an Up target: nothing to decide");
        // The store is full: everything stays open and in flight.
        let down = Some(Duration::from_secs(1));
        sends.peer_down(&mut ep, Some(&mut hints), PEER, down, now, &mut out);
        assert!(resolved(&mut out).is_empty());
        assert_eq!(
            (sends.len(), sends.handed_off(), sends.handoff_refused()),
            (3, 0, 0)
        );
        assert_eq!(ep.in_flight_to(PEER).len(), 3);
        // It has room now: all three go, with how long the target has been down.
        hints.full = false;
        sends.peer_down(&mut ep, Some(&mut hints), PEER, down, now, &mut out);
        assert_eq!(
            resolved(&mut out),
            [(0, "HandedOff"), (1, "HandedOff"), (2, "HandedOff")].map(|(b, s)| (b, s.to_string()))
        );
        assert!(hints.stored.iter().all(|(_, _, d)| *d == down));
        assert_eq!((sends.len(), sends.handed_off()), (0, 3));
        assert!(ep.in_flight_to(PEER).is_empty());
    }

    /// A new effectively-once send whose id is a window (`max_in_flight`) or more above
    /// the lowest of its stream's own handed-off seqs still in the store goes to the
    /// store behind them (a target would refuse it as a dedup overrun); below that it
    /// goes live, and so does one the store refuses, one with an application key, and
    /// one sent after the floor rose.
    #[test]
    fn a_send_a_window_above_its_streams_own_hints_is_stored_behind_them() {
        let now = Instant::now();
        let config = ProtoConfig {
            max_in_flight: 4,
            ..ProtoConfig::default()
        };
        let origin = Origin {
            node: NodeId(1),
            incarnation: 1,
        };
        let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap());
        let mut ep = Endpoint::new(origin, config, dedup, 1);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        let mut hints = MemHints {
            on_down: true,
            ..MemHints::default()
        };
        let eo = Guarantee::EffectivelyOnce;
        let open = |ep: &mut Endpoint,
                    sends: &mut Sends<u8>,
                    hints: &mut MemHints,
                    out: &mut Vec<Report<u8>>,
                    b: u8,
                    down: bool| {
            let down_for = down.then_some(Duration::from_secs(1));
            open_one(ep, sends, hints, out, eo, b, down_for, now)
        };
        let r1 = open(&mut ep, &mut sends, &mut hints, &mut out, 1, true); // seq 1: hinted
        for b in 2..=4 {
            open(&mut ep, &mut sends, &mut hints, &mut out, b, false); // seqs 2-4: live
        }
        assert_eq!(resolved(&mut out), [(1, "HandedOff".to_string())]);
        open(&mut ep, &mut sends, &mut hints, &mut out, 5, false); // seq 5 = 1 + 4
        assert_eq!(resolved(&mut out), [(5, "HandedOff".to_string())]);
        hints.full = true;
        open(&mut ep, &mut sends, &mut hints, &mut out, 6, false);
        assert!(resolved(&mut out).is_empty(), "refused by the store: live");
        hints.full = false;
        let keyed = ep
            .send(
                now,
                Outgoing {
                    peer: PEER,
                    channel: ChannelId(3),
                    guarantee: eo,
                    payload: Bytes::from_static(b"k"),
                    id: Some(MessageId::Key(crate::IdKey(9))),
                    deadline: None,
                    schema: 0,
                },
            )
            .unwrap();
        sends.opened(&mut ep, Some(&mut hints), None, keyed, eo, 7, now, &mut out);
        assert!(resolved(&mut out).is_empty(), "an application key: live");
        ep.hint_settled(r1); // seq 1 delivered: the floor is seq 5 now
        open(&mut ep, &mut sends, &mut hints, &mut out, 8, false); // seq 8 < 5 + 4
        assert!(resolved(&mut out).is_empty(), "below the risen floor: live");
        assert_eq!(hints.stored.len(), 2);
        assert_eq!(ep.in_flight_to(PEER).len(), 6);
    }

    #[test]
    fn a_new_send_to_a_down_target_is_handed_off_or_fails_at_once_with_the_stores_reason() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        let mut hints = MemHints {
            on_down: true,
            ..MemHints::default()
        };
        let r = send(&mut ep, Guarantee::EffectivelyOnce, 7, now);
        sends.opened(
            &mut ep,
            Some(&mut hints),
            Some(Duration::ZERO),
            r,
            Guarantee::EffectivelyOnce,
            7,
            now,
            &mut out,
        );
        assert_eq!(resolved(&mut out), [(7, "HandedOff".to_string())]);
        hints.full = true;
        let r = send(&mut ep, Guarantee::EffectivelyOnce, 8, now);
        sends.opened(
            &mut ep,
            Some(&mut hints),
            Some(Duration::ZERO),
            r,
            Guarantee::EffectivelyOnce,
            8,
            now,
            &mut out,
        );
        let got = resolved(&mut out);
        assert_eq!(got.len(), 1);
        assert!(got[0].1.starts_with("HandoffRefused(TargetFull"), "{got:?}");
        assert_eq!(sends.handoff_refused(), 1);
        assert!(
            ep.in_flight_to(PEER).is_empty(),
            "the refused send was abandoned"
        );
        // At-most-once is never hinted; without on_down nothing is.
        let r = send(&mut ep, Guarantee::AtMostOnce, 9, now);
        sends.opened(
            &mut ep,
            Some(&mut hints),
            Some(Duration::ZERO),
            r,
            Guarantee::AtMostOnce,
            9,
            now,
            &mut out,
        );
        hints.on_down = false;
        let r = send(&mut ep, Guarantee::AtLeastOnce, 10, now);
        sends.opened(
            &mut ep,
            Some(&mut hints),
            Some(Duration::ZERO),
            r,
            Guarantee::AtLeastOnce,
            10,
            now,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(sends.len(), 2);
    }

    #[test]
    fn a_given_up_message_is_hinted_with_on_give_up_and_fails_with_its_reason_without() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        let mut hints = MemHints {
            on_give_up: true,
            ..MemHints::default()
        };
        let g = Guarantee::AtLeastOnce;
        let (a, b, c) = (
            send(&mut ep, g, 1, now),
            send(&mut ep, g, 2, now),
            send(&mut ep, g, 3, now),
        );
        for (r, v) in [(a, 1), (b, 2), (c, 3)] {
            sends.opened(&mut ep, None::<&mut MemHints>, None, r, g, v, now, &mut out);
        }
        let id = MessageId::Key(crate::IdKey(7));
        let p = Bytes::from_static(b"p");
        sends.gave_up(
            &mut ep,
            Some(&mut hints),
            a,
            id,
            p.clone(),
            GiveUp::Deadline,
            4,
            None,
            now,
            &mut out,
        );
        assert!(matches!(out[0], Report::GaveUp { attempts: 4, .. }));
        assert!(matches!(out[1], Report::HintStored { .. }));
        assert_eq!(resolved(&mut out), [(1, "HandedOff".to_string())]);
        sends.gave_up(
            &mut ep,
            None::<&mut MemHints>,
            b,
            id,
            p.clone(),
            GiveUp::MaxAttempts,
            5,
            None,
            now,
            &mut out,
        );
        assert_eq!(
            resolved(&mut out),
            [(2, "GaveUp { reason: MaxAttempts, attempts: 5 }".to_string())]
        );
        hints.full = true;
        sends.gave_up(
            &mut ep,
            Some(&mut hints),
            c,
            id,
            p.clone(),
            GiveUp::Deadline,
            6,
            None,
            now,
            &mut out,
        );
        let got = resolved(&mut out);
        assert!(got[0].1.starts_with("HandoffRefused"), "{got:?}");
        assert_eq!(
            (sends.handed_off(), sends.handoff_refused(), sends.len()),
            (1, 1, 0)
        );
    }

    #[test]
    fn replayed_hints_are_settled_by_the_store_and_receipts_by_their_outcome() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        let mut hints = MemHints::default();
        let g = Guarantee::AtLeastOnce;
        let replay = send(&mut ep, g, 0, now);
        hints.replaying.push(replay);
        let (a, b, c) = (
            send(&mut ep, g, 1, now),
            send(&mut ep, Guarantee::AtMostOnce, 2, now),
            send(&mut ep, g, 3, now),
        );
        sends.opened(&mut ep, Some(&mut hints), None, a, g, 1, now, &mut out);
        sends.opened(
            &mut ep,
            Some(&mut hints),
            None,
            b,
            Guarantee::AtMostOnce,
            2,
            now,
            &mut out,
        );
        sends.opened(&mut ep, Some(&mut hints), None, c, g, 3, now, &mut out);
        for r in [replay, a, b] {
            sends.settled(&mut ep, Some(&mut hints), r, &mut out);
        }
        assert!(matches!(out[0], Report::HintReplayed(r) if r == replay));
        assert_eq!(
            resolved(&mut out),
            [(1, "Settled".to_string()), (2, "Settled".to_string())]
        );
        sends.rejected(
            &mut ep,
            Some(&mut hints),
            replay,
            RejectReason::DeadLettered,
            &mut out,
        );
        assert_eq!(out.len(), 1, "a replay's rejection is the store's: {out:?}");
        assert!(matches!(out[0], Report::Rejected { for_now: false, .. }));
        out.clear();
        // A replay refused for now (no receiver yet) stays in the store: reported, but
        // not as a refusal for good (the metric of those skips it).
        sends.rejected(
            &mut ep,
            Some(&mut hints),
            replay,
            RejectReason::NoReceiver,
            &mut out,
        );
        assert!(
            matches!(out[..], [Report::Rejected { for_now: true, .. }]),
            "{out:?}"
        );
        out.clear();
        sends.rejected(
            &mut ep,
            Some(&mut hints),
            c,
            RejectReason::DeadLettered,
            &mut out,
        );
        assert!(matches!(out[0], Report::Rejected { .. }));
        assert_eq!(
            resolved(&mut out),
            [(3, "Rejected(DeadLettered)".to_string())]
        );
        let d = send(&mut ep, g, 4, now);
        sends.opened(&mut ep, Some(&mut hints), None, d, g, 4, now, &mut out);
        sends.fail_all(&mut out);
        assert_eq!(resolved(&mut out), [(4, "Shutdown".to_string())]);
        assert_eq!(sends.len(), 0);
    }

    #[test]
    fn a_drain_is_over_when_every_receipt_settled_or_its_grace_passed() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        assert!(
            !sends.drain_over(now + Duration::from_secs(999)),
            "no drain begun"
        );
        let g = Guarantee::AtLeastOnce;
        let (a, b) = (send(&mut ep, g, 1, now), send(&mut ep, g, 2, now));
        sends.opened(&mut ep, None::<&mut MemHints>, None, a, g, 1, now, &mut out);
        sends.opened(&mut ep, None::<&mut MemHints>, None, b, g, 2, now, &mut out);
        assert!(sends.begin_drain(now, Duration::from_secs(5)));
        assert!(!sends.begin_drain(now + Duration::from_secs(1), Duration::from_secs(60)));
        assert!(sends.draining());
        assert_eq!(sends.poll_timeout(), Some(now + Duration::from_secs(5)));
        sends.settled(&mut ep, None::<&mut MemHints>, a, &mut out);
        assert!(!sends.drain_over(now + Duration::from_secs(4)), "b is open");
        assert!(
            sends.drain_over(now + Duration::from_secs(5)),
            "grace passed"
        );
        sends.settled(&mut ep, None::<&mut MemHints>, b, &mut out);
        assert!(sends.drain_over(now), "all settled");
    }

    #[test]
    fn shutdown_spools_every_open_message_to_each_target() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        let mut hints = MemHints::default();
        for b in 0..4u8 {
            let r = send(&mut ep, Guarantee::EffectivelyOnce, b, now);
            sends.opened(
                &mut ep,
                Some(&mut hints),
                None,
                r,
                Guarantee::EffectivelyOnce,
                b,
                now,
                &mut out,
            );
        }
        sends.spool_all(&mut ep, &mut hints, |_| None, now, &mut out);
        assert_eq!(resolved(&mut out).len(), 4);
        let payloads: Vec<u8> = hints.stored.iter().map(|(_, p, _)| p[0]).collect();
        assert_eq!(payloads, [0, 1, 2, 3]);
        assert_eq!(sends.len(), 0);
    }

    #[test]
    fn a_full_store_warns_once_per_period_and_counts_the_refusals_it_kept_quiet() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let mut sends = Sends::default();
        let mut out = Vec::new();
        let mut hints = MemHints {
            on_down: true,
            full: true,
            ..MemHints::default()
        };
        let eo = Guarantee::EffectivelyOnce;
        let down = Some(Duration::ZERO);
        let mut refuse = |sends: &mut Sends<u8>, i: u8, at: Instant| {
            open_one(&mut ep, sends, &mut hints, &mut out, eo, i, down, at);
        };
        for i in 0..5 {
            refuse(&mut sends, i, now + Duration::from_secs(u64::from(i)));
        }
        assert_eq!(sends.handoff_refused(), 5);
        assert_eq!(
            sends.refused_quiet, 4,
            "one warning in the first 10 s, four kept quiet"
        );
        refuse(&mut sends, 5, now + REFUSED_WARN_EVERY);
        assert_eq!(
            sends.refused_quiet, 0,
            "the next period's warning reports them"
        );
        refuse(
            &mut sends,
            6,
            now + REFUSED_WARN_EVERY + Duration::from_secs(1),
        );
        assert_eq!(sends.refused_quiet, 1);
    }
}
