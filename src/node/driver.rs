//! The tokio driver: one task per node runs [`Driver::run`] under [`supervise`](super::supervise::supervise).
//!
//! Owns tasks, the transport link, the clock and the one timer of the node; holds no
//! protocol logic, liveness policy or handoff decision: those are the sans-IO
//! [`Core`] (the endpoint, its liveness and the fate of sent messages). The driver
//! is a loop: read transport events (`node/link_events.rs`) and application commands
//! (`node/command.rs`) → feed the core; the timer fires → feed the core; then poll
//! the core → write frames, hand deliveries to receivers, answer what the core
//! reports about sent messages ([`Driver::report`]), publish health changes, and reset
//! the single `Sleep` to the earliest deadline. Hint replay (throttle, batches,
//! concurrency, expiry) is the core's too (`proto/replay.rs`): the driver lends it the
//! hint store and the application's send windows.

use super::command::Command;
use super::dead_letter::DeadLetterReason;
use super::observe::{self, Observer, PendingReceipt, MESSAGE_TARGET};
use super::receivers::{keep_dead_letter, Receivers};
use super::shared::Shared;
use super::spool::Spool;
use crate::id::NodeId;
use crate::proto::core::Core;
use crate::proto::Event;
use crate::transport::{Link, LinkCommand, LinkEvent};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

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
    /// Messages the core took back, per peer, to withdraw from the link.
    pub(super) withdrawn: FxHashMap<NodeId, Vec<(crate::ChannelId, u64)>>,
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
    pub(super) async fn run(&mut self) {
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
                self.persist();
                self.core.endpoint.handle_timeout(now);
            }
            self.dispatch();
            self.housekeeping(now);
            if !self.flush(now).await {
                break;
            }
            self.receivers.resolve_durable_acks(&self.core.endpoint);
            if self.core.drain_over(now) {
                self.finish_held_deliveries().await;
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

    /// Hand the core's application events out, then answer its reports.
    pub(super) fn dispatch(&mut self) {
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
    pub(super) fn report(&mut self) {
        for r in self.core.reports() {
            self.observe.report(r, self.clock);
        }
    }

    /// Apply every completion handlers pushed since the last call.
    pub(super) fn take_completions(&mut self) {
        self.receivers
            .take_completions(&mut self.core.endpoint, &mut self.observe, self.clock);
    }

    pub(super) async fn flush(&mut self, now: std::time::Instant) -> bool {
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
        // After the frames: what the core took back must not be written later.
        for send in self.core.endpoint.drain_withdrawn() {
            self.withdrawn
                .entry(send.peer)
                .or_default()
                .push((send.channel, send.seq));
        }
        for (peer, messages) in self.withdrawn.drain() {
            let cmd = LinkCommand::Withdraw { peer, messages };
            if self.link.commands.send(cmd).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Heartbeats, failure detection, handoff, hint expiry and replay (the core's).
    fn housekeeping(&mut self, now: std::time::Instant) {
        self.observe.sync(&self.core.endpoint, now, false);
        self.core.handle_timeout(now);
        while let Some(change) = self.core.poll_health() {
            self.shared.publish_health(change);
        }
        self.report();
        self.core
            .handle_hints(now, &mut self.shared.replay_windows());
        self.dispatch();
    }

    async fn stop(&mut self) {
        self.observe.sync(&self.core.endpoint, self.clock, true);
        self.persist();
        if let Some(spool) = &mut self.core.hints {
            if let Err(e) = spool.log_mut().sync() {
                tracing::warn!(error = %e, "hint store sync failed");
            }
        }
        let _ = self.link.commands.send(LinkCommand::Shutdown).await;
        // Windows first: a send made after any receipt failed below fails too.
        self.shared.close_windows();
        self.core.stop();
        self.report();
        self.receivers.stop_handing_out(&self.shared);
        self.shared.dead_letters.close();
        self.release_stores();
        // Wait (bounded) for the transport to write what was queued last, e.g. `Finish`
        // frames, and close: its events end then. (Regression: shutdown returned with
        // the port still bound and the finish frames unsent: `tests/blackbox_leaks.rs`.)
        // 2 s: the TCP transport flushes for at most 500 ms first.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.link.events.recv().await.is_some() {}
        })
        .await;
    }
}

pub(super) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
