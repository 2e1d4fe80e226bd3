//! One node's protocol and policy, sans-IO: the [`Endpoint`], its [`Liveness`] and
//! the [`Sends`] decisions, joined so that the driver only moves bytes, events and
//! time between them and the world.
//!
//! [`Core`] consumes the endpoint's internal events itself — settlements, give-ups
//! and rejections go to [`Sends`] (which hands off through the [`Hints`] store),
//! proof of life and heartbeat answers go to [`Liveness`] — and gives the owner only
//! what leaves the core:
//!
//! * [`Core::poll_event`]: deliveries, dead letters and window slides (the
//!   application's side);
//! * [`Core::reports`]: what became of sent messages, in order (receipts to answer);
//! * [`Core::poll_health`]: health changes to publish;
//! * [`Core::poll_timeout`]: the one deadline at which [`Core::handle_timeout`] (and
//!   the endpoint's own timeout) has work.
//!
//! Every method takes `now`; nothing here reads a clock, touches a socket or a file
//! (the hint store behind [`Hints`] is the owner's).

use super::liveness::Liveness;
use super::replay::Windows;
use super::sends::{Hints, Report, Sends};
use super::{Endpoint, Event, Outgoing, SendRef, StreamError};
use crate::detector::{Health, HealthChange};
use crate::id::{Guarantee, NodeId, Origin};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Why [`Core::send`] took no message.
#[derive(Debug)]
pub(crate) enum SendRefused {
    /// The node is draining for shutdown: no new sends.
    Draining,
    /// The endpoint refused it.
    Stream(StreamError),
}

/// The sans-IO heart of a node; see the module docs.
#[derive(Debug)]
pub(crate) struct Core<R, H> {
    /// The delivery protocol.
    pub(crate) endpoint: Endpoint,
    /// Heartbeats and the failure detector.
    pub(crate) liveness: Liveness,
    /// Open receipts and the handoff decisions about them.
    pub(crate) sends: Sends<R>,
    /// The hint store, if the node has one.
    pub(crate) hints: Option<H>,
    reports: Vec<Report<R>>,
    health: VecDeque<HealthChange>,
    grace: Duration,
}

impl<R, H: Hints> Core<R, H> {
    /// A core over `endpoint`; a drain for shutdown gives open receipts `grace`.
    pub(crate) fn new(
        endpoint: Endpoint,
        liveness: Liveness,
        hints: Option<H>,
        grace: Duration,
    ) -> Self {
        Core {
            endpoint,
            liveness,
            sends: Sends::default(),
            hints,
            reports: Vec::new(),
            health: VecDeque::new(),
            grace,
        }
    }

    /// A new message from the application. On `Ok`, the caller opens its receipt
    /// with [`Core::opened`] before anything else touches the core.
    pub(crate) fn send(&mut self, now: Instant, msg: Outgoing) -> Result<SendRef, SendRefused> {
        if self.sends.draining() {
            return Err(SendRefused::Draining);
        }
        self.endpoint.send(now, msg).map_err(SendRefused::Stream)
    }

    /// The receipt of `send` (just taken by [`Core::send`]) is `reply`. If the target
    /// is Down and the hint store takes messages for Down targets, it is handed off
    /// now.
    pub(crate) fn opened(&mut self, now: Instant, send: SendRef, guarantee: Guarantee, reply: R) {
        // The target's health matters only to a hint store (no lookup per send
        // without one, the default).
        let down_for = self
            .hints
            .as_ref()
            .and_then(|_| self.liveness.down_for(send.peer, now));
        self.sends.opened(
            &mut self.endpoint,
            self.hints.as_mut(),
            down_for,
            send,
            guarantee,
            reply,
            now,
            &mut self.reports,
        );
        // An at-most-once send that reached the core after its target went Down (it
        // passed the handle's check before the Down was published) would wait for the
        // credit of a receiver that is gone, like those failed at the Down.
        if guarantee == Guarantee::AtMostOnce
            && self.sends.amo_fails_on_down
            && self.liveness.down_for(send.peer, now).is_some()
        {
            self.sends
                .fail_unsent_amo(&mut self.endpoint, send.peer, &mut self.reports);
        }
    }

    /// Start (or keep) watching `peer`; `true` if it is seen for the first time (it
    /// starts Up).
    pub(crate) fn watch(&mut self, peer: NodeId, now: Instant) -> bool {
        self.sends.decommissioned.remove(&peer);
        self.liveness.watch(peer, now)
    }

    /// The application named `peer` (with an address): watch it unless watched
    /// already. `true` if it is seen for the first time.
    pub(crate) fn add_peer(&mut self, peer: NodeId, now: Instant) -> bool {
        self.liveness.state(peer).is_none() && self.watch(peer, now)
    }

    /// The detector's view of `peer` (`None` if not watched).
    pub(crate) fn health(&self, peer: NodeId) -> Option<crate::detector::Health> {
        self.liveness.state(peer)
    }

    /// Stop watching `peer` (decommissioned).
    pub(crate) fn forget(&mut self, peer: NodeId) {
        self.liveness.forget(peer);
        self.sends.decommissioned.insert(peer);
        // At-most-once messages still waiting for its credit have no deadline, and no
        // Down will come for a peer nobody watches: they fail now. (Regression: their
        // receipts stayed open for good after `decommission`.)
        self.sends
            .fail_unsent_amo(&mut self.endpoint, peer, &mut self.reports);
    }

    /// The peers hints may be replayed to now: watched, not Down, and connected.
    pub(crate) fn reachable(&self) -> Vec<NodeId> {
        self.liveness
            .not_down()
            .filter(|p| self.endpoint.is_up(*p))
            .collect()
    }

    /// A connection to the run `origin` came up, speaking `version`. `true` if the
    /// peer is seen for the first time.
    pub(crate) fn peer_up(&mut self, now: Instant, origin: Origin, version: u16) -> bool {
        let new = self.watch(origin.node, now);
        self.endpoint.handle_peer_up(now, origin, version);
        new
    }

    /// The next event for the application: a delivery, a dead letter or a window
    /// slide. Every other endpoint event is handled here (its effects show in
    /// [`Core::reports`]).
    pub(crate) fn poll_event(&mut self, now: Instant) -> Option<Event> {
        while let Some(ev) = self.endpoint.poll_event() {
            let hints = self.hints.as_mut();
            let out = &mut self.reports;
            match ev {
                Event::Settled(send) => self.sends.settled(&mut self.endpoint, hints, send, out),
                Event::GaveUp {
                    send,
                    reason,
                    attempts,
                    payload,
                    id,
                } => {
                    let down_for = self.liveness.down_for(send.peer, now);
                    self.sends.gave_up(
                        &mut self.endpoint,
                        hints,
                        send,
                        id,
                        payload,
                        reason,
                        attempts,
                        down_for,
                        now,
                        out,
                    );
                }
                Event::Rejected { send, reason } => {
                    self.sends
                        .rejected(&mut self.endpoint, hints, send, reason, out)
                }
                Event::Heard(peer) => self.liveness.heard(peer, now),
                Event::HeartbeatAck(peer) => self.liveness.heartbeat(peer, now),
                app @ (Event::Deliver { .. }
                | Event::DeadLetter { .. }
                | Event::WindowOpened { .. }) => return Some(app),
            }
        }
        None
    }

    /// What became of sent messages since the last call, in order.
    pub(crate) fn reports(&mut self) -> std::vec::Drain<'_, Report<R>> {
        self.reports.drain(..)
    }

    /// The next health change to publish.
    pub(crate) fn poll_health(&mut self) -> Option<HealthChange> {
        self.health.pop_front()
    }

    /// The liveness policy's timers: ping rounds and health changes; a peer found
    /// Down has its unacknowledged messages handed off. (The endpoint's own timers
    /// are [`Endpoint::handle_timeout`]: the owner settles arrived acks first.)
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let endpoint = &mut self.endpoint;
        let changes = self
            .liveness
            .handle_timeout(now, |peer, nonce| endpoint.ping_at(now, peer, nonce));
        for change in changes {
            if change.to == Health::Down {
                let down_for = self.liveness.down_for(change.peer, now);
                self.sends.peer_down(
                    &mut self.endpoint,
                    self.hints.as_mut(),
                    change.peer,
                    down_for,
                    now,
                    &mut self.reports,
                );
            }
            self.health.push_back(change);
        }
    }

    /// The hint store's timers: its group commit, hint expiry and replay to the peers
    /// that are not Down and connected, each replayed message taking a slot of the
    /// application's `windows` (see [`crate::proto::replay`]).
    pub(crate) fn handle_hints(&mut self, now: Instant, windows: &mut dyn Windows) {
        let Some(hints) = &self.hints else {
            return;
        };
        let ready = if hints.has_replay_work() {
            self.reachable()
        } else {
            Vec::new()
        };
        if let Some(hints) = &mut self.hints {
            hints.handle_timeout(&mut self.endpoint, &ready, windows, now);
        }
    }

    /// The earliest time anything here has work: the endpoint's timers, the next
    /// ping round or health change, the hint store's, the end of a drain.
    pub(crate) fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        [
            self.endpoint.poll_timeout(),
            self.liveness.poll_timeout(),
            self.hints.as_ref().and_then(|h| h.next_deadline(now)),
            self.sends.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Graceful shutdown starts: no new sends; open receipts get the grace period.
    /// `false` if it had started.
    pub(crate) fn begin_drain(&mut self, now: Instant) -> bool {
        self.sends.begin_drain(now, self.grace)
    }

    /// Is the drain over at `now`? Then every message still open has been offered to
    /// the hint store (if any) and the caller stops; [`Core::stop`] fails the rest.
    pub(crate) fn drain_over(&mut self, now: Instant) -> bool {
        if !self.sends.drain_over(now) {
            return false;
        }
        if let Some(hints) = &mut self.hints {
            let liveness = &self.liveness;
            self.sends.spool_all(
                &mut self.endpoint,
                hints,
                |peer| liveness.down_for(peer, now),
                now,
                &mut self.reports,
            );
            tracing::info!(left = self.sends.len(), "spooled unacknowledged messages");
        }
        true
    }

    /// The node stops: every receipt still open fails (see [`Core::reports`]), and
    /// what its receivers had queued is refused without nacks (the next run gets it).
    pub(crate) fn stop(&mut self) {
        self.sends.fail_all(&mut self.reports);
        self.endpoint.stop_nacking_refusals();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::{Dedup, DedupConfig};
    use crate::detector::{DetectorConfig, FailureDetector};
    use crate::id::ChannelId;
    use crate::proto::sends::tests::MemHints;
    use crate::proto::sends::Resolution;
    use crate::proto::{Accept, Completion, ProtoConfig};
    use bytes::Bytes;
    use std::sync::Arc;

    const EVERY: Duration = Duration::from_millis(100);

    fn core(node: u64, hints: Option<MemHints>, now: Instant) -> Core<u8, MemHints> {
        let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap());
        let origin = Origin {
            node: NodeId(node),
            incarnation: 1,
        };
        let endpoint = Endpoint::new(origin, ProtoConfig::default(), dedup, node);
        let detector = FailureDetector::new(DetectorConfig::default()).unwrap();
        let liveness = Liveness::new(detector, EVERY, now);
        Core::new(endpoint, liveness, hints, Duration::from_secs(1))
    }

    fn message(to: u64, byte: u8) -> Outgoing {
        Outgoing {
            peer: NodeId(to),
            channel: ChannelId(1),
            guarantee: Guarantee::EffectivelyOnce,
            payload: Bytes::from(vec![byte]),
            id: None,
            deadline: None,
            schema: 0,
        }
    }

    /// Move every frame `from` has for `to` into `to`.
    fn carry(from: &mut Core<u8, MemHints>, to: &mut Core<u8, MemHints>, now: Instant) {
        let origin = from.endpoint.origin();
        while let Some((peer, frame)) = from.endpoint.poll_transmit(now) {
            assert_eq!(peer, to.endpoint.origin().node);
            to.endpoint.handle_frame_from(now, origin, frame);
        }
    }

    fn resolutions(c: &mut Core<u8, MemHints>) -> Vec<(u8, String)> {
        c.reports()
            .filter_map(|r| match r {
                Report::Resolve { reply, how, .. } => Some((reply, format!("{how:?}"))),
                _ => None,
            })
            .collect()
    }

    /// The core keeps the endpoint's own events (settlement, proof of life) and hands
    /// out only the application's: the receiver sees one delivery, the sender's
    /// receipt resolves as settled, and the sender's detector heard the receiver.
    #[test]
    fn an_acked_message_resolves_its_receipt_and_only_the_delivery_leaves_the_core() {
        let now = Instant::now();
        let (mut a, mut b) = (core(1, None, now), core(2, None, now));
        assert!(a.peer_up(now, b.endpoint.origin(), 3), "first seen");
        assert!(b.peer_up(now, a.endpoint.origin(), 3));
        assert!(!a.peer_up(now, b.endpoint.origin(), 3), "seen before");
        b.endpoint
            .accept_channel_with(ChannelId(1), Accept::new(false, None));
        let r = a.send(now, message(2, 7)).unwrap();
        a.opened(now, r, Guarantee::EffectivelyOnce, 7);
        carry(&mut a, &mut b, now);
        let Some(Event::Deliver { delivery, payload }) = b.poll_event(now) else {
            panic!("no delivery");
        };
        assert_eq!(&payload[..], [7]);
        assert!(b.poll_event(now).is_none());
        b.endpoint.complete(now, delivery, Completion::Ack);
        // The ack may wait for the receiver's ack delay: run its timer.
        let later = b.endpoint.poll_timeout().map_or(now, |t| t.max(now));
        b.endpoint.handle_timeout(later);
        carry(&mut b, &mut a, later);
        while let Some(ev) = a.poll_event(later) {
            assert!(
                matches!(ev, Event::WindowOpened { .. }),
                "only the window slide leaves the sender's core: {ev:?}"
            );
        }
        assert_eq!(resolutions(&mut a), [(7, "Settled".to_string())]);
        assert_eq!(a.sends.len(), 0);
        assert_eq!(a.liveness.state(NodeId(2)), Some(Health::Up));
    }

    /// A silent peer goes Down through the core's own timers: its health change is
    /// published once, and its unacknowledged message is handed off to the store
    /// with how long the peer has been Down; a new send to it goes straight there.
    #[test]
    fn a_peer_that_goes_silent_is_published_down_and_its_messages_handed_off() {
        let t0 = Instant::now();
        let hints = MemHints {
            on_down: true,
            ..MemHints::default()
        };
        let mut a = core(1, Some(hints), t0);
        let peer = Origin {
            node: NodeId(2),
            incarnation: 1,
        };
        a.peer_up(t0, peer, 3);
        let r = a.send(t0, message(2, 1)).unwrap();
        a.opened(t0, r, Guarantee::EffectivelyOnce, 1);
        // Drive the clock by the core's own deadlines, never hearing from the peer.
        let mut now = t0;
        let mut changes = Vec::new();
        while !changes.iter().any(|c: &HealthChange| c.to == Health::Down) {
            now = a
                .poll_timeout(now)
                .expect("a ping round is always due")
                .max(now);
            assert!(now - t0 < Duration::from_secs(120), "never declared Down");
            a.endpoint.handle_timeout(now);
            a.handle_timeout(now);
            while a.poll_event(now).is_some() {}
            changes.extend(std::iter::from_fn(|| a.poll_health()));
        }
        assert_eq!(
            changes.last().map(|c| (c.peer, c.to)),
            Some((NodeId(2), Health::Down))
        );
        assert_eq!(resolutions(&mut a), [(1, "HandedOff".to_string())]);
        let stored = &a.hints.as_ref().unwrap().stored;
        assert_eq!(stored.len(), 1);
        assert!(
            stored[0].2.is_some(),
            "stored with how long the peer is Down"
        );
        // A new message to the Down peer is handed off at once.
        let r = a.send(now, message(2, 2)).unwrap();
        a.opened(now, r, Guarantee::EffectivelyOnce, 2);
        assert_eq!(resolutions(&mut a), [(2, "HandedOff".to_string())]);
        assert_eq!(a.reachable(), Vec::<NodeId>::new());
    }

    /// A message in flight when its peer is decommissioned is given up at its
    /// deadline, not hinted (the peer's hints were dropped; a new one would be
    /// replayed to the next process with its id); nor is it spooled at shutdown. A
    /// peer watched again is hinted as before.
    #[test]
    fn messages_to_a_decommissioned_peer_are_never_hinted() {
        let t0 = Instant::now();
        let hints = MemHints {
            on_give_up: true,
            ..MemHints::default()
        };
        let mut a = core(1, Some(hints), t0);
        let peer = Origin {
            node: NodeId(2),
            incarnation: 1,
        };
        a.peer_up(t0, peer, 3);
        for n in [1, 2] {
            let r = a.send(t0, message(2, n)).unwrap();
            a.opened(t0, r, Guarantee::EffectivelyOnce, n);
        }
        // Runs the core (timers, transmissions to nowhere) from `from` to `to`.
        fn run(a: &mut Core<u8, MemHints>, from: Instant, to: Instant) {
            let mut now = from;
            while now < to {
                now += Duration::from_millis(100);
                a.endpoint.handle_timeout(now);
                a.handle_timeout(now);
                while a.poll_event(now).is_some() {}
                while a.endpoint.poll_transmit(now).is_some() {}
            }
        }
        a.forget(NodeId(2));
        let later = t0 + Duration::from_secs(31);
        run(&mut a, t0, later);
        let got = resolutions(&mut a);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|(_, r)| r.starts_with("GaveUp")), "{got:?}");
        assert!(a.hints.as_ref().unwrap().stored.is_empty());
        // Added back: hinted again.
        a.add_peer(NodeId(2), later);
        let r = a.send(later, message(2, 3)).unwrap();
        a.opened(later, r, Guarantee::EffectivelyOnce, 3);
        run(&mut a, later, later + Duration::from_secs(31));
        assert_eq!(resolutions(&mut a), [(3, "HandedOff".to_string())]);
    }

    /// A drain refuses new sends, is over once nothing is open, and at its end spools
    /// what is still open; whatever the store did not take fails at `stop`.
    #[test]
    fn a_drain_refuses_new_sends_spools_what_is_open_and_stop_fails_the_rest() {
        let now = Instant::now();
        let hints = MemHints {
            full: true,
            ..MemHints::default()
        };
        let mut a = core(1, Some(hints), now);
        let r = a.send(now, message(2, 1)).unwrap();
        a.opened(now, r, Guarantee::EffectivelyOnce, 1);
        assert!(a.begin_drain(now));
        assert!(!a.begin_drain(now), "once");
        assert!(matches!(
            a.send(now, message(2, 2)),
            Err(SendRefused::Draining)
        ));
        assert!(!a.drain_over(now), "a receipt is open and the grace runs");
        let end = now + Duration::from_secs(1);
        assert!(a.poll_timeout(now).is_some_and(|t| t <= end));
        assert!(a.drain_over(end));
        assert!(
            resolutions(&mut a).is_empty(),
            "the full store took nothing"
        );
        a.stop();
        let how: Vec<_> = a
            .reports()
            .filter_map(|r| match r {
                Report::Resolve { reply, how, .. } => Some((reply, how)),
                _ => None,
            })
            .collect();
        assert!(matches!(how[..], [(1, Resolution::Shutdown)]), "{how:?}");
    }
}
