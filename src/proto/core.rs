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
    }

    /// Start (or keep) watching `peer`; `true` if it is seen for the first time (it
    /// starts Up).
    pub(crate) fn watch(&mut self, peer: NodeId, now: Instant) -> bool {
        self.liveness.watch(peer, now)
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
            .handle_timeout(now, |peer, nonce| endpoint.ping(peer, nonce));
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

    /// The node stops: every receipt still open fails (see [`Core::reports`]).
    pub(crate) fn stop(&mut self) {
        self.sends.fail_all(&mut self.reports);
    }
}
