//! The tokio driver: one task per node runs [`Driver::run`] under [`supervise`](super::supervise::supervise).
//!
//! Owns tasks, the transport link, the clock and the one timer of the node; holds no
//! protocol logic, liveness policy or handoff decision: those are the sans-IO
//! [`Core`] (the endpoint, its liveness and the fate of sent messages). The driver
//! answers what the core reports (receipts, in [`Driver::report`]), publishes health
//! changes, and hands deliveries to receivers. Hint replay (throttle, batches,
//! concurrency) is still the spool's (`node/spool.rs`); the driver hands it the peers
//! that are not Down and connected. The driver is a loop: read transport events and
//! application commands ([`Command`]) → feed the core; the timer fires → feed the
//! core; then poll the core → write frames, hand deliveries to receivers, resolve
//! receipts, and reset the single `Sleep` to the earliest deadline.

use super::command::Command;
use super::dead_letter::DeadLetterReason;
use super::observe::{self, Observer, PendingReceipt, MESSAGE_TARGET};
use super::receivers::{keep_dead_letter, Receivers};
use super::shared::Shared;
use super::spool::Spool;
use super::{ChannelOptions, IdentityConflict, NodeError, Outcome, SendError, Stats};
use crate::id::{IdKey, MessageId, NodeId, Origin};
use crate::proto::core::{Core, SendRefused};
use crate::proto::{Event, Outgoing};
use crate::transport::{Link, LinkCommand, LinkEvent};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub(super) struct Driver {
    /// The node's protocol and policy.
    pub(super) core: Core<PendingReceipt, Spool>,
    pub(super) link: Link,
    /// Link events of the current wake-up (reused buffer).
    pub(super) burst: Vec<LinkEvent>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    /// Per-message trace events (each in its stream's span) and metrics.
    pub(super) observe: Observer,
    /// The application's receivers and what their deliveries send back.
    pub(super) receivers: Receivers,
    pub(super) shared: Arc<Shared>,
    pub(super) outbox: FxHashMap<NodeId, Vec<crate::wire::Frame>>,
    /// The driver's notion of now: read once per wake-up.
    pub(super) clock: std::time::Instant,
}

/// Work items taken per wake-up before frames are flushed, so bursts batch.
pub(super) const BURST: usize = 256;

/// Frames a link event carries (counted against [`BURST`]; other events count one).
fn frames_in(ev: &LinkEvent) -> usize {
    match ev {
        LinkEvent::Frames { frames, .. } => frames.len(),
        _ => 1,
    }
}

impl Driver {
    pub(super) async fn run(mut self) {
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        loop {
            let deadline = self.core.poll_timeout(self.clock);
            if let Some(d) = deadline {
                sleep.as_mut().reset(tokio::time::Instant::from_std(d));
            }
            tokio::select! {
                biased;
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    // One clock read per burst, not per item (it showed in profiles).
                    self.clock = now();
                    if !self.on_command(cmd) { break; }
                    for _ in 0..BURST {
                        match self.commands.try_recv() {
                            Ok(cmd) => if !self.on_command(cmd) { self.stop().await; return; },
                            Err(_) => break,
                        }
                    }
                }
                _ = self.receivers.completions.wake.notified() => {
                    self.clock = now();
                }
                ev = self.link.events.recv() => {
                    let Some(ev) = ev else { break };
                    self.clock = now();
                    // Take the burst first and hint its frames to the endpoint, so the
                    // dedup lookups of a burst of keyed messages overlap their cache
                    // misses instead of waiting for one after another.
                    let mut burst = std::mem::take(&mut self.burst);
                    let mut frames = frames_in(&ev);
                    burst.push(ev);
                    while frames <= BURST {
                        match self.link.events.try_recv() {
                            Ok(ev) => {
                                frames += frames_in(&ev);
                                burst.push(ev);
                            }
                            Err(_) => break,
                        }
                    }
                    for ev in &burst {
                        let endpoint = &self.core.endpoint;
                        match ev {
                            LinkEvent::Frame { frame, .. } => endpoint.prefetch(frame),
                            LinkEvent::Frames { frames, .. } => {
                                frames.iter().for_each(|f| endpoint.prefetch(f))
                            }
                            _ => {}
                        }
                    }
                    for ev in burst.drain(..) {
                        self.on_link(ev);
                    }
                    self.burst = burst;
                }
                _ = &mut sleep, if deadline.is_some() => {}
            }
            let now = now();
            self.clock = now;
            self.take_completions();
            if self.core.endpoint.poll_timeout().is_some_and(|t| t <= now) {
                // Acks that already arrived settle their messages before any timer
                // calls them lost: after a stall (a busy machine, a long burst of
                // sends above) the queue can hold acks older than the expired timers,
                // and handling the timers first retransmits what the peer already has.
                for _ in 0..16 * BURST {
                    match self.link.events.try_recv() {
                        Ok(ev) => self.on_link(ev),
                        Err(_) => break,
                    }
                }
                self.take_completions();
                self.core.endpoint.handle_timeout(now);
            }
            self.dispatch();
            self.housekeeping(now);
            if !self.flush(now).await {
                break;
            }
            self.receivers.resolve_durable_acks(&self.core.endpoint);
            if self.core.drain_over(now) {
                self.report();
                // A clean end of this run: receivers may retire its streams.
                if self.core.endpoint.finish_streams() > 0 {
                    let _ = self.flush(now).await;
                }
                break;
            }
        }
        self.stop().await;
    }

    fn on_command(&mut self, cmd: Command) -> bool {
        let now = self.clock;
        match cmd {
            Command::Send {
                peer,
                options,
                payload,
                key,
                schema,
                reply,
            } => self.send_one(peer, options, schema, payload, key, reply),
            Command::SendBatch {
                peer,
                options,
                schema,
                items,
            } => {
                for (payload, key, reply) in items {
                    self.send_one(peer, options, schema, payload, key, reply);
                }
            }
            Command::Complete {
                delivery,
                how,
                done,
            } => self.receivers.complete_command(
                &mut self.core.endpoint,
                &mut self.observe,
                now,
                delivery,
                how,
                done,
            ),
            Command::Register {
                channel,
                options,
                schema,
                tx,
            } => self
                .receivers
                .register(&mut self.core.endpoint, channel, options, schema, tx),
            Command::Undecodable { delivery, payload } => Receivers::undecodable(
                &mut self.core.endpoint,
                &mut self.observe,
                &self.shared.dead_letters,
                now,
                delivery,
                payload,
            ),
            Command::AddPeer { peer, addr } => {
                if self.core.liveness.state(peer).is_none() && self.core.watch(peer, now) {
                    self.shared.first_seen(peer);
                }
                let _ = self
                    .link
                    .commands
                    .try_send(LinkCommand::AddPeer { peer, addr });
            }
            Command::Stats(reply) => {
                let core = &self.core;
                let _ = reply.send(Stats {
                    proto: core.endpoint.stats(),
                    dedup: core.endpoint.dedup_stats(),
                    decode_failed: 0, // these three are filled by `Node::stats`
                    no_receiver: 0,
                    tcp: None,
                    hints: core.hints.as_ref().map(Spool::stats),
                    handed_off: core.sends.handed_off(),
                    handoff_refused: core.sends.handoff_refused(),
                    dead_letters_dropped: self.shared.dead_letters.dropped(),
                    dead_letters_not_persisted: self.shared.dead_letters.not_persisted(),
                });
            }
            Command::Decommission { peer, reply } => {
                self.core.liveness.forget(peer);
                self.observe.spans.forget(peer);
                let res = match &mut self.core.hints {
                    Some(spool) => spool
                        .decommission(peer, &mut self.core.endpoint)
                        .map_err(NodeError::from),
                    None => Ok(0),
                };
                if let Ok(n) = res {
                    tracing::info!(%peer, dropped = n, "peer decommissioned; its hints dropped");
                }
                let _ = reply.send(res);
            }
            Command::Shutdown => return false,
            Command::Drain => {
                if self.core.begin_drain(now) {
                    tracing::info!(
                        unsettled = self.core.sends.len(),
                        "draining before shutdown"
                    );
                    self.shared.close_windows();
                }
            }
        }
        true
    }

    fn on_link(&mut self, ev: LinkEvent) {
        let now = self.clock;
        match ev {
            LinkEvent::Up { origin, version } => {
                tracing::debug!(peer = %origin, version, "peer up");
                self.observe.spans.peer_up(origin);
                self.shared
                    .versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(origin.node, version);
                if self.core.peer_up(now, origin, version) {
                    self.shared.first_seen(origin.node);
                }
            }
            LinkEvent::Down { peer } => {
                tracing::debug!(%peer, "peer down");
                self.core.endpoint.handle_peer_down(now, peer);
            }
            LinkEvent::Conflict { live, refused } => {
                let _ = self
                    .shared
                    .conflict_tx
                    .send(IdentityConflict { live, refused });
            }
            LinkEvent::Frame {
                peer,
                incarnation,
                frame,
            } => {
                let from = Origin {
                    node: peer,
                    incarnation,
                };
                self.on_frame(now, from, frame);
            }
            LinkEvent::Frames {
                peer,
                incarnation,
                frames,
            } => {
                let from = Origin {
                    node: peer,
                    incarnation,
                };
                for frame in frames {
                    self.on_frame(now, from, frame);
                }
            }
        }
    }

    /// A frame from the run `from` (its connection's handshake says which).
    fn on_frame(&mut self, now: std::time::Instant, from: Origin, frame: crate::wire::Frame) {
        let peer = from.node;
        // Visibility only (the endpoint ignores it): count and warn.
        let mut data = None;
        if let crate::wire::Frame::Data(d) = &frame {
            if !self.receivers.has(d.channel) {
                self.shared.no_receiver(peer, d.channel);
            }
            data = Some((d.channel, d.seq, d.id));
        }
        if let crate::wire::Frame::Nack(n) = &frame {
            self.observe.nack_received(peer, n.channel, n.seq);
        }
        let endpoint = &mut self.core.endpoint;
        let duplicates = endpoint.duplicates_dropped();
        endpoint.handle_frame_from(now, from, frame);
        let duplicates = endpoint.duplicates_dropped() - duplicates;
        if let (Some((channel, seq, id)), 1..) = (data, duplicates) {
            self.observe
                .duplicate_dropped(peer, channel, seq, id, duplicates);
        }
    }

    /// Hand the core's application events out, then answer its reports.
    fn dispatch(&mut self) {
        let now = self.clock;
        while let Some(ev) = self.core.poll_event(now) {
            match ev {
                Event::Deliver { delivery, payload } => self.receivers.deliver(
                    &mut self.core.endpoint,
                    &mut self.observe,
                    now,
                    delivery,
                    payload,
                ),
                Event::DeadLetter {
                    delivery,
                    payload,
                    deliveries,
                } => keep_dead_letter(
                    &mut self.observe,
                    &self.shared.dead_letters,
                    delivery,
                    payload,
                    deliveries,
                    DeadLetterReason::MaxDeliveries,
                ),
                Event::WindowOpened { peer, channel, n } => {
                    self.shared
                        .window_for(peer, channel)
                        .add_permits(n as usize);
                }
                _ => {} // the core's own
            }
        }
        self.report();
    }

    /// Carry out what the core decided about sent messages: trace and count each
    /// step, answer receipts.
    fn report(&mut self) {
        for r in self.core.reports() {
            self.observe.report(r, self.clock);
        }
    }

    /// Apply every completion handlers pushed since the last call.
    fn take_completions(&mut self) {
        self.receivers
            .take_completions(&mut self.core.endpoint, &mut self.observe, self.clock);
    }

    /// One message from a sender (alone or in a batch); it holds one window permit.
    fn send_one(
        &mut self,
        peer: NodeId,
        options: ChannelOptions,
        schema: u32,
        payload: Bytes,
        key: Option<IdKey>,
        reply: oneshot::Sender<Result<Outcome, SendError>>,
    ) {
        let now = self.clock;
        let msg = Outgoing {
            peer,
            channel: options.channel,
            guarantee: options.guarantee,
            payload,
            id: key.map(MessageId::Key),
            deadline: options.deadline,
            schema,
        };
        let err = match self.core.send(now, msg) {
            Ok(r) => {
                let origin = self.core.endpoint.origin();
                let reply = self.observe.sent(origin, r, key, reply, now);
                self.core.opened(now, r, options.guarantee, reply);
                return self.report();
            }
            Err(SendRefused::Draining) => SendError::Shutdown,
            Err(SendRefused::Stream(crate::proto::StreamError::GuaranteeMismatch {
                existing,
                ..
            })) => SendError::GuaranteeMismatch { existing },
        };
        self.shared.window_for(peer, options.channel).add_permits(1);
        let _ = reply.send(Err(err));
    }

    async fn flush(&mut self, now: std::time::Instant) -> bool {
        while let Some((peer, frame)) = self.core.endpoint.poll_transmit(now) {
            self.outbox.entry(peer).or_default().push(frame);
        }
        if tracing::enabled!(target: MESSAGE_TARGET, tracing::Level::TRACE) {
            for (peer, frames) in &self.outbox {
                let origin = self.core.endpoint.origin();
                observe::trace_transmits(
                    origin,
                    *peer,
                    frames.iter(),
                    &mut self.core.sends,
                    &mut self.observe.spans,
                );
            }
        }
        // Acks produced by transmits' events are dispatched next round.
        self.dispatch();
        for (peer, frames) in self.outbox.iter_mut() {
            if frames.is_empty() {
                continue;
            }
            let frames = std::mem::take(frames);
            if self
                .link
                .commands
                .send(LinkCommand::Send {
                    peer: *peer,
                    frames,
                })
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Heartbeats, failure detection and handoff (the core's); hint expiry and
    /// replay (the spool's).
    fn housekeeping(&mut self, now: std::time::Instant) {
        self.observe.sync(&self.core.endpoint, now, false);
        self.core.handle_timeout(now);
        while let Some(change) = self.core.poll_health() {
            self.shared.publish_health(change);
        }
        self.report();
        let core = &mut self.core;
        if let Some(spool) = &mut core.hints {
            spool.tick(&mut core.endpoint, now);
            if spool.has_replay_work() {
                let endpoint = &mut core.endpoint;
                let ready: Vec<NodeId> = core
                    .liveness
                    .not_down()
                    .filter(|p| endpoint.is_up(*p))
                    .collect();
                let shared = &self.shared;
                spool.replay(
                    endpoint,
                    |peer, channel| shared.window_for(peer, channel),
                    |p| ready.contains(&p),
                    now,
                );
            }
        }
        self.dispatch();
    }

    async fn stop(&mut self) {
        self.observe.sync(&self.core.endpoint, self.clock, true);
        if let Some(spool) = &mut self.core.hints {
            spool.sync();
        }
        let _ = self.link.commands.send(LinkCommand::Shutdown).await;
        self.core.stop();
        self.report();
        self.receivers.close();
        self.shared.dead_letters.close();
    }
}

pub(super) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
