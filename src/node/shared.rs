//! State the driver shares with the node's handles ([`Shared`]): the per-stream window
//! semaphores, the receivers' registrations, peer health and protocol versions, the
//! decode and no-receiver counters with their rate-limited warnings, the dead letters,
//! and the node's lifecycle ([`NodeState`]).
//!
//! Owns the locks and the error a call gets once the node has stopped; must not make
//! protocol decisions (the driver feeds the endpoint, which makes them).

use super::dead_letter::DeadLetterQueue;
use super::error::NodeFailure;
#[cfg(doc)]
use super::supervise::supervise;
use super::{Delivery, IdentityConflict, NodeError, SendError};
use crate::detector::{Health, HealthChange};
use crate::id::{ChannelId, MessageId, NodeId};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};

#[derive(Debug)]
pub(super) struct Shared {
    /// The node's `node` span: the driver and the transport run in it, and events
    /// raised on the application's tasks (a payload that does not decode) enter it.
    pub(super) span: tracing::Span,
    pub(super) windows: Mutex<Windows>,
    /// Peer changes waiting for room in the transport's queue (see `LinkBacklog`).
    pub(super) link_backlog: Arc<Mutex<super::command::LinkBacklog>>,
    pub(super) receivers: Mutex<FxHashMap<ChannelId, mpsc::WeakUnboundedSender<Delivery<Bytes>>>>,
    pub(super) health: Mutex<FxHashMap<NodeId, Health>>,
    pub(super) health_tx: EventTx<HealthChange>,
    /// Woken when a peer turns Down: sends waiting for a window slot to it fail with
    /// `PeerDown` then (with `fail_fast_when_down`), not when a slot frees.
    pub(super) down: tokio::sync::Notify,
    pub(super) conflict_tx: EventTx<IdentityConflict>,
    /// Protocol version of each peer's current (or last) connection.
    pub(super) versions: Mutex<FxHashMap<NodeId, u16>>,
    pub(super) window: usize,
    pub(super) max_payload: usize,
    pub(super) decode_failed: AtomicU64,
    /// Set when a graceful stop begins its handler grace (or the node stops): receivers
    /// hand out nothing more, and take back what is queued for them (see
    /// [`RawReceiver::recv`](super::RawReceiver::recv)).
    pub(super) receivers_stopped: std::sync::atomic::AtomicBool,
    /// Deliveries in receivers' queues, not yet handed to the application: counted up
    /// by the driver before it queues one, down by the receiver once it took it out.
    /// The handler grace waits only for the rest of what the application holds.
    pub(super) queued_for_receivers: Arc<AtomicU64>,
    /// When the last decode failure was logged at warn (rate limit).
    pub(super) decode_warned: Mutex<Option<std::time::Instant>>,
    pub(super) no_receiver: AtomicU64,
    /// When the last arrival without a receiver was logged at warn (rate limit).
    pub(super) no_receiver_warned: Mutex<Option<std::time::Instant>>,
    pub(super) dead_letters: Arc<DeadLetterQueue>,
    /// Peers given to the builder or `add_peer` (peers heard from are in `health`).
    pub(super) known: Mutex<std::collections::HashSet<NodeId>>,
    /// Any id is a peer: `allow_dynamic_peers`, or a transport that dials by id.
    pub(super) any_peer: bool,
    /// `fail_fast_when_down` and no handoff on Down.
    pub(super) fail_fast_down: bool,
    /// `fail_fast_when_down`: at-most-once is never handed off, so its sends to a Down
    /// peer fail with or without handoff.
    pub(super) amo_fail_fast_down: bool,
    /// Running, closed, or failed (with the cause); see [`supervise`].
    pub(super) state: watch::Sender<NodeState>,
    #[cfg(feature = "metrics")]
    pub(super) node: NodeId,
}

/// The send window of each `(peer, channel)` a sender was made for.
#[derive(Debug, Default)]
pub(super) struct Windows {
    map: FxHashMap<(NodeId, ChannelId), Arc<Semaphore>>,
    /// Entries at which the next new one first drops the unused ones.
    sweep_at: usize,
}

/// Windows kept before a new one first drops those no sender holds and nothing
/// occupies; then twice what is left.
const WINDOW_SWEEP_MIN: usize = 1024;

impl Windows {
    /// Drops the windows no sender holds and nothing occupies (every permit free): one
    /// made again later starts full, as it was. (Regression: one was kept for every
    /// channel ever sent on.)
    fn sweep(&mut self, window: usize) {
        self.map
            .retain(|_, sem| Arc::strong_count(sem) > 1 || sem.available_permits() != window);
        if self.map.len() < self.map.capacity() / 4 {
            self.map.shrink_to(self.map.len() * 2);
        }
        self.sweep_at = WINDOW_SWEEP_MIN.max(self.map.len() * 2);
    }
}

/// Lifecycle of a node's driver.
#[derive(Debug, Clone)]
pub(super) enum NodeState {
    Running,
    Closed,
    Failed(NodeFailure),
}

impl Shared {
    pub(super) fn failure(&self) -> Option<NodeFailure> {
        match &*self.state.borrow() {
            NodeState::Failed(f) => Some(f.clone()),
            _ => None,
        }
    }

    /// The error of a call that found the node stopped.
    pub(super) fn closed_error(&self) -> NodeError {
        self.failure()
            .map_or(NodeError::Shutdown, NodeError::Failed)
    }

    /// The error of a send that found the node stopped.
    pub(super) fn send_closed_error(&self) -> SendError {
        self.failure()
            .map_or(SendError::Shutdown, SendError::NodeFailed)
    }

    pub(super) fn health(&self, peer: NodeId) -> Option<Health> {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.get(&peer).copied()
    }

    pub(super) fn is_known(&self, peer: NodeId) -> bool {
        self.any_peer
            || self.health(peer).is_some()
            || self
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&peer)
    }

    /// Count an undecodable payload; warn at most once a second.
    pub(super) fn decode_failed(&self, id: MessageId, channel: ChannelId, error: &str) {
        let total = self.decode_failed.fetch_add(1, Ordering::Relaxed) + 1;
        // Raised on the application's receiving task, outside the driver's span.
        let _node = self.span.enter();
        if warn_due(&self.decode_warned) {
            tracing::warn!(%id, channel = channel.0, %error, total, "payload does not decode as the receiver's type; dead-lettered and rejected (not acked)");
        } else {
            tracing::debug!(%id, channel = channel.0, %error, "payload does not decode; refused");
        }
    }

    /// Count an arrival on a channel nobody receives; warn at most once a second.
    pub(super) fn no_receiver(&self, from: NodeId, channel: ChannelId) {
        let total = self.no_receiver.fetch_add(1, Ordering::Relaxed) + 1;
        if warn_due(&self.no_receiver_warned) {
            tracing::warn!(channel = channel.0, %from, total, "message on a channel with no receiver on this node; not acked (rejected after the no-receiver grace period)");
        } else {
            tracing::debug!(channel = channel.0, %from, "no receiver; not acked");
        }
    }

    /// A health change of a peer: logged (a Down at warn, once per transition: the
    /// detector reports each transition once), kept for `Node::health`, broadcast to
    /// `Node::health_changes` subscribers.
    pub(super) fn publish_health(&self, change: HealthChange) {
        if change.to == Health::Down {
            tracing::warn!(peer = %change.peer, from = ?change.from, "peer is Down (no heartbeat)");
        } else {
            tracing::info!(peer = %change.peer, from = ?change.from, to = ?change.to, "peer health changed");
        }
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(change.peer, change.to);
        if change.to == Health::Down {
            self.down.notify_waiters();
        }
        self.health_tx.send(change);
    }

    /// A decommissioned peer is no longer watched: its health is unknown until it is
    /// added and seen again. (Regression: its last state stayed, so a peer
    /// decommissioned while Down and added back stayed Down for good, and fail-fast
    /// sends to it failed with `PeerDown` although it was connected.)
    pub(super) fn forget_health(&self, peer: NodeId) {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    }

    /// A peer seen for the first time, or again after a decommission: published as
    /// the detector sees it (`state`, Up for a new peer) unless already known.
    pub(super) fn seen(&self, peer: NodeId, state: Health) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.entry(peer).or_insert(state);
    }

    /// Wake every sender waiting for window space with `SendError::Shutdown`, and make
    /// later sends fail the same way.
    pub(super) fn close_windows(&self) {
        let w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for sem in w.map.values() {
            sem.close();
        }
    }

    pub(super) fn window_for(&self, peer: NodeId, channel: ChannelId) -> Arc<Semaphore> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if w.map.len() >= w.sweep_at.max(WINDOW_SWEEP_MIN) && !w.map.contains_key(&(peer, channel))
        {
            w.sweep(self.window);
        }
        w.map
            .entry((peer, channel))
            .or_insert_with(|| {
                let sem = Arc::new(Semaphore::new(self.window));
                // Made after the stop closed the others (the state changes first):
                // closed too, so a send on it fails rather than waits.
                if !matches!(*self.state.borrow(), NodeState::Running) {
                    sem.close();
                }
                sem
            })
            .clone()
    }
}

/// Rate limit of a warn line: `true` (and the time recorded) at most once a second.
fn warn_due(last: &Mutex<Option<std::time::Instant>>) -> bool {
    let now = std::time::Instant::now();
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
        *last = Some(now);
        true
    } else {
        false
    }
}

/// The application's send windows as the core's replay policy takes slots of them: a
/// replayed hint holds a slot like a send, given back when its stream's window slides.
pub(super) struct ReplayWindows<'a>(&'a Shared);

impl Shared {
    /// The send windows, lent to the core's hint replay.
    pub(super) fn replay_windows(&self) -> ReplayWindows<'_> {
        ReplayWindows(self)
    }
}

impl crate::proto::replay::Windows for ReplayWindows<'_> {
    fn try_take(&mut self, peer: NodeId, channel: ChannelId) -> bool {
        match self.0.window_for(peer, channel).try_acquire() {
            Ok(permit) => {
                permit.forget(); // given back when the window slides
                true
            }
            Err(_) => false,
        }
    }

    fn give_back(&mut self, peer: NodeId, channel: ChannelId) {
        self.0.window_for(peer, channel).add_permits(1);
    }
}

/// The sender of one of the node's event streams ([`Node::health_events`],
/// [`Node::identity_conflicts`]): dropped when the node stops ([`EndGuard`]), so that
/// every subscriber's `recv` ends with `RecvError::Closed` like a `Receiver` or
/// `DeadLetters::recv`, and a subscription taken after the stop ends at once.
/// (Regression: the sender lived as long as any handle of the node, so a monitoring
/// loop over `health_events()` waited for good after `shutdown()` or a dropped runtime.)
///
/// [`Node::health_events`]: super::Node::health_events
/// [`Node::identity_conflicts`]: super::Node::identity_conflicts
/// [`EndGuard`]: super::supervise::EndGuard
#[derive(Debug)]
pub(super) struct EventTx<T>(Mutex<Option<broadcast::Sender<T>>>);

impl<T: Clone> EventTx<T> {
    /// A stream whose subscribers skip the oldest events beyond `capacity`.
    pub(super) fn new(capacity: usize) -> Self {
        EventTx(Mutex::new(Some(broadcast::channel(capacity).0)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<broadcast::Sender<T>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `event` to the current subscribers (none after the stop).
    pub(super) fn send(&self, event: T) {
        if let Some(tx) = self.lock().as_ref() {
            let _ = tx.send(event);
        }
    }

    /// A new subscription; after the stop, one that is already closed.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<T> {
        match self.lock().as_ref() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Ends the stream for every subscriber (they still get what was sent before).
    pub(super) fn close(&self) {
        self.lock().take();
    }
}
