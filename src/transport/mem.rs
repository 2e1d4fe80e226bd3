//! In-process transport with seeded fault injection, for tests and demos.
//!
//! Owns an in-memory "network" ([`MemNetwork`]) that attached nodes send frames
//! through, the per-link fault decisions ([`FaultInjector`], sans-IO and usable without
//! tokio), run-time partitions, and delivery timing (tokio time, so paused-time tests
//! work). Must not encode frames or know about acks, retries or dedup.
//!
//! Each directed link `(from, to)` has its own [`FaultInjector`] seeded from
//! `(plan.seed, from, to)`: the same seed and the same frame order on a link give the
//! same loss / duplication / delay decisions, whatever other links do.
//!
//! ```
//! use ackwire::transport::mem::{FaultPlan, MemNetwork};
//! use ackwire::transport::{LinkCommand, LinkEvent, Transport};
//! use ackwire::wire::{Frame, Heartbeat};
//! use ackwire::{NodeId, Origin};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let net = MemNetwork::new(FaultPlan::default()).unwrap();
//! let a = Box::new(net.transport(NodeId(1))).start(Origin { node: NodeId(1), incarnation: 1 }).unwrap();
//! let mut b = Box::new(net.transport(NodeId(2))).start(Origin { node: NodeId(2), incarnation: 1 }).unwrap();
//! assert!(matches!(b.events.recv().await, Some(LinkEvent::Up { .. })));
//! a.commands.send(LinkCommand::Send { peer: NodeId(2), frames: vec![Frame::Ping(Heartbeat { nonce: 1 })] }).await.unwrap();
//! assert!(matches!(b.events.recv().await, Some(LinkEvent::Frame { .. })));
//! # });
//! ```

use super::{Link, LinkCommand, LinkEvent, Transport, TransportError};
use crate::id::{NodeId, Origin};
use crate::rng::SplitMix64;
use crate::wire::{Frame, PROTOCOL_VERSION};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Capacity of each node's command and event channels.
const CHANNEL_CAPACITY: usize = 1024;

/// Which faults a [`MemNetwork`] injects, and the seed that makes them reproducible.
///
/// `Default`: seed `0`, no loss, no duplication, no reordering, no delay
/// (`(0, 0)`), `reorder_extra` 10 ms (used only when `reorder > 0`).
///
/// ```
/// use ackwire::transport::mem::FaultPlan;
/// use std::time::Duration;
/// let plan = FaultPlan::new(42)
///     .loss(0.1)
///     .duplicate(0.05)
///     .reorder(0.2)
///     .delay(Duration::from_millis(1), Duration::from_millis(5));
/// plan.validate().unwrap();
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultPlan {
    /// Seed of every link's fault RNG.
    pub seed: u64,
    /// Probability in `[0, 1]` that a frame is dropped.
    pub loss: f64,
    /// Probability in `[0, 1]` that a delivered frame is delivered twice.
    pub duplicate: f64,
    /// Probability in `[0, 1]` that a delivered frame is held back by an extra random
    /// delay in `[0, reorder_extra]`, so later frames overtake it.
    pub reorder: f64,
    /// Base delay of every delivered frame, uniform in `[delay.0, delay.1]`.
    pub delay: (Duration, Duration),
    /// Upper bound of the extra delay of a reordered frame.
    pub reorder_extra: Duration,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            seed: 0,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: (Duration::ZERO, Duration::ZERO),
            reorder_extra: Duration::from_millis(10),
        }
    }
}

impl FaultPlan {
    /// No faults, with `seed`.
    pub fn new(seed: u64) -> Self {
        FaultPlan {
            seed,
            ..FaultPlan::default()
        }
    }

    /// Set the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Set the loss probability.
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// Set the duplication probability.
    pub fn duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// Set the reordering probability.
    pub fn reorder(mut self, p: f64) -> Self {
        self.reorder = p;
        self
    }

    /// Set the extra-delay bound of reordered frames.
    pub fn reorder_extra(mut self, max: Duration) -> Self {
        self.reorder_extra = max;
        self
    }

    /// Set the base delay range.
    pub fn delay(mut self, min: Duration, max: Duration) -> Self {
        self.delay = (min, max);
        self
    }

    /// Check that probabilities are in `[0, 1]` and `delay.0 <= delay.1`.
    pub fn validate(&self) -> Result<(), FaultPlanError> {
        for (name, p) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(FaultPlanError::Probability { name, value: p });
            }
        }
        if self.delay.0 > self.delay.1 {
            return Err(FaultPlanError::DelayRange {
                min: self.delay.0,
                max: self.delay.1,
            });
        }
        Ok(())
    }
}

/// An invalid [`FaultPlan`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultPlanError {
    /// A probability is outside `[0, 1]` (or NaN). Fix the plan.
    #[error("{name} probability {value} is not in [0, 1]")]
    Probability {
        /// Which field.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// `delay.0 > delay.1`. Swap them.
    #[error("delay range {min:?}..{max:?} is empty")]
    DelayRange {
        /// Lower bound given.
        min: Duration,
        /// Upper bound given.
        max: Duration,
    },
}

/// What happens to one frame on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultDecision {
    /// Lost.
    Drop,
    /// Delivered `copies` times (1 or 2), each after `delay`.
    Deliver {
        /// Number of copies (2 = duplicated).
        copies: u8,
        /// Delay before delivery (base delay plus any reordering delay).
        delay: Duration,
    },
}

/// Sans-IO fault decisions for one directed link. No tokio, no clock: a deterministic
/// simulation can drive it directly.
///
/// Every call to [`decide`](FaultInjector::decide) draws the same number of random
/// values whatever the outcome, so changing one probability does not shift the other
/// decisions of the sequence.
///
/// ```
/// use ackwire::transport::mem::{FaultInjector, FaultPlan};
/// use ackwire::NodeId;
/// let plan = FaultPlan::new(7).loss(0.5);
/// let mut a = FaultInjector::new(&plan, NodeId(1), NodeId(2));
/// let mut b = FaultInjector::new(&plan, NodeId(1), NodeId(2));
/// for _ in 0..100 {
///     assert_eq!(a.decide(), b.decide());
/// }
/// ```
#[derive(Clone, Debug)]
pub struct FaultInjector {
    plan: FaultPlan,
    rng: SplitMix64,
}

impl FaultInjector {
    /// The injector of link `from → to` under `plan`, seeded from `(plan.seed, from, to)`.
    pub fn new(plan: &FaultPlan, from: NodeId, to: NodeId) -> Self {
        let mut s = SplitMix64::new(plan.seed);
        let a = s.next_u64() ^ from.0;
        let b = SplitMix64::new(a).next_u64() ^ to.0;
        let seed = SplitMix64::new(b).next_u64();
        FaultInjector {
            plan: *plan,
            rng: SplitMix64::new(seed),
        }
    }

    /// Decide the fate of the next frame on this link.
    pub fn decide(&mut self) -> FaultDecision {
        let loss_roll = self.rng.next_f64();
        let dup_roll = self.rng.next_f64();
        let reorder_roll = self.rng.next_f64();
        let base = duration_between(&mut self.rng, self.plan.delay.0, self.plan.delay.1);
        let extra = duration_between(&mut self.rng, Duration::ZERO, self.plan.reorder_extra);
        if loss_roll < self.plan.loss {
            return FaultDecision::Drop;
        }
        let copies = if dup_roll < self.plan.duplicate { 2 } else { 1 };
        let delay = if reorder_roll < self.plan.reorder {
            base.saturating_add(extra)
        } else {
            base
        };
        FaultDecision::Deliver { copies, delay }
    }
}

fn duration_between(rng: &mut SplitMix64, lo: Duration, hi: Duration) -> Duration {
    let lo_n = u64::try_from(lo.as_nanos()).unwrap_or(u64::MAX);
    let hi_n = u64::try_from(hi.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.range_u64(lo_n, hi_n))
}

/// Counters of a [`MemNetwork`], as a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Frames handed to the network by senders.
    pub sent: u64,
    /// Frames dropped by the plan's loss.
    pub dropped_loss: u64,
    /// Frames dropped because their link was partitioned.
    pub dropped_partition: u64,
    /// Frames dropped because the destination was not attached when they were sent
    /// (frames still in flight when a node detaches are discarded uncounted).
    pub dropped_unattached: u64,
    /// Extra copies created by the plan's duplication.
    pub duplicated: u64,
    /// Frame events handed to receivers (copies included).
    pub delivered: u64,
}

/// An in-process network. Cloneable handle; all clones are the same network.
#[derive(Clone, Debug)]
pub struct MemNetwork {
    shared: Arc<Shared>,
}

impl MemNetwork {
    /// A network injecting `plan`'s faults. Errors if the plan is invalid.
    pub fn new(plan: FaultPlan) -> Result<Self, FaultPlanError> {
        plan.validate()?;
        Ok(MemNetwork {
            shared: Arc::new(Shared {
                plan,
                state: Mutex::new(NetState::default()),
                stats: AtomicStats::default(),
            }),
        })
    }

    /// A transport for node `id` on this network. Starting it attaches the node; a
    /// second attached transport with the same id fails with
    /// [`TransportError::DuplicateNode`].
    pub fn transport(&self, id: NodeId) -> MemTransport {
        MemTransport {
            net: self.clone(),
            id,
        }
    }

    /// Drop every frame between `a` and `b` (both directions) until healed.
    pub fn partition(&self, a: NodeId, b: NodeId) {
        self.state().partitions.insert(pair(a, b));
        tracing::info!(%a, %b, "mem: partition");
    }

    /// Undo [`partition(a, b)`](MemNetwork::partition). Does not undo an isolation.
    pub fn heal(&self, a: NodeId, b: NodeId) {
        self.state().partitions.remove(&pair(a, b));
        tracing::info!(%a, %b, "mem: heal");
    }

    /// Drop every frame to or from `node` until [`rejoin`](MemNetwork::rejoin) or
    /// [`heal_all`](MemNetwork::heal_all).
    pub fn isolate(&self, node: NodeId) {
        self.state().isolated.insert(node);
        tracing::info!(%node, "mem: isolate");
    }

    /// Undo [`isolate(node)`](MemNetwork::isolate).
    pub fn rejoin(&self, node: NodeId) {
        self.state().isolated.remove(&node);
        tracing::info!(%node, "mem: rejoin");
    }

    /// Remove every partition and isolation.
    pub fn heal_all(&self) {
        let mut st = self.state();
        st.partitions.clear();
        st.isolated.clear();
        tracing::info!("mem: heal all");
    }

    /// Simulate a killed connection between `a` and `b`: each gets `Down` for the other,
    /// then `Up` again. No effect unless both are attached.
    pub fn disconnect(&self, a: NodeId, b: NodeId) {
        let mut st = self.state();
        let (Some(na), Some(nb)) = (st.nodes.get(&a), st.nodes.get(&b)) else {
            return;
        };
        let (oa, ob) = (na.origin, nb.origin);
        st.push_now(a, LinkEvent::Down { peer: b });
        st.push_now(b, LinkEvent::Down { peer: a });
        st.push_now(
            a,
            LinkEvent::Up {
                origin: ob,
                version: PROTOCOL_VERSION,
            },
        );
        st.push_now(
            b,
            LinkEvent::Up {
                origin: oa,
                version: PROTOCOL_VERSION,
            },
        );
        tracing::info!(%a, %b, "mem: disconnect");
    }

    /// Whether a node with this id is attached now (its transport started and not yet
    /// shut down). A node's transport detaches shortly after the node stops, not at
    /// the instant `Node::shutdown` returns or the `Node` is dropped.
    pub fn is_attached(&self, id: NodeId) -> bool {
        self.state().nodes.contains_key(&id)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MemStats {
        let s = &self.shared.stats;
        MemStats {
            sent: s.sent.load(Ordering::Relaxed),
            dropped_loss: s.dropped_loss.load(Ordering::Relaxed),
            dropped_partition: s.dropped_partition.load(Ordering::Relaxed),
            dropped_unattached: s.dropped_unattached.load(Ordering::Relaxed),
            duplicated: s.duplicated.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
        }
    }

    fn state(&self) -> MutexGuard<'_, NetState> {
        // A poisoned lock only means another thread panicked mid-update of plain
        // collections; the data is still usable for a test network.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, from: NodeId, to: NodeId, frames: Vec<Frame>) {
        let stats = &self.shared.stats;
        stats.sent.fetch_add(frames.len() as u64, Ordering::Relaxed);
        let mut st = self.state();
        if st.is_blocked(from, to) {
            stats
                .dropped_partition
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
            tracing::trace!(%from, %to, n = frames.len(), "mem: dropped by partition");
            return;
        }
        if !st.nodes.contains_key(&to) {
            stats
                .dropped_unattached
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
            return;
        }
        let plan = self.shared.plan;
        let now = Instant::now();
        // The sending run (it routes while attached): receivers learn which run each
        // frame came from, as the TCP transport's connection handshake tells them.
        let incarnation = st.nodes.get(&from).map_or(0, |e| e.origin.incarnation);
        let event = |frame| LinkEvent::Frame {
            peer: from,
            incarnation,
            frame,
        };
        for frame in frames {
            let decision = st
                .injectors
                .entry((from, to))
                .or_insert_with(|| FaultInjector::new(&plan, from, to))
                .decide();
            match decision {
                FaultDecision::Drop => {
                    stats.dropped_loss.fetch_add(1, Ordering::Relaxed);
                }
                FaultDecision::Deliver { copies, delay } => {
                    if copies > 1 {
                        stats
                            .duplicated
                            .fetch_add(u64::from(copies - 1), Ordering::Relaxed);
                        for _ in 1..copies {
                            st.push(to, now + delay, event(frame.clone()));
                        }
                    }
                    st.push(to, now + delay, event(frame));
                }
            }
        }
    }

    fn attach(
        &self,
        origin: Origin,
        inbox: mpsc::UnboundedSender<Scheduled>,
    ) -> Result<(), TransportError> {
        let mut st = self.state();
        let id = origin.node;
        if st.nodes.contains_key(&id) {
            return Err(TransportError::DuplicateNode(id));
        }
        let others: Vec<(NodeId, Origin)> = st.nodes.iter().map(|(n, e)| (*n, e.origin)).collect();
        st.nodes.insert(id, NodeEntry { origin, inbox });
        for (other, other_origin) in others {
            st.push_now(
                id,
                LinkEvent::Up {
                    origin: other_origin,
                    version: PROTOCOL_VERSION,
                },
            );
            st.push_now(
                other,
                LinkEvent::Up {
                    origin,
                    version: PROTOCOL_VERSION,
                },
            );
        }
        tracing::info!(node = %origin, "mem: attached");
        Ok(())
    }

    fn detach(&self, id: NodeId) {
        let mut st = self.state();
        if st.nodes.remove(&id).is_none() {
            return;
        }
        let others: Vec<NodeId> = st.nodes.keys().copied().collect();
        for other in others {
            st.push_now(other, LinkEvent::Down { peer: id });
        }
        tracing::info!(node = %id, "mem: detached");
    }
}

/// A node's transport on a [`MemNetwork`]. Ignores [`LinkCommand::AddPeer`],
/// [`LinkCommand::RemovePeer`] and [`LinkCommand::Withdraw`] (it has no addresses and
/// keeps no frames for later).
#[derive(Debug)]
pub struct MemTransport {
    net: MemNetwork,
    id: NodeId,
}

impl Transport for MemTransport {
    /// Every node of the network is reachable by its id.
    fn dials_by_id(&self) -> bool {
        true
    }

    /// Attach the node. `local.node` must equal the id given to
    /// [`MemNetwork::transport`]; otherwise `local` wins (its id is used).
    fn start(self: Box<Self>, local: Origin) -> Result<Link, TransportError> {
        if local.node != self.id {
            tracing::warn!(expected = %self.id, got = %local.node, "mem: origin id differs from transport id; using origin");
        }
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (cmd_tx, mut cmd_rx) = mpsc::channel(CHANNEL_CAPACITY);
        self.net.attach(local, inbox_tx)?;
        let id = local.node;
        let delivery = tokio::spawn(delivery_loop(
            inbox_rx,
            events_tx,
            Arc::clone(&self.net.shared),
        ));
        let net = self.net;
        tokio::spawn(async move {
            while let Some(cmd) = cmd_rx.recv().await {
                match cmd {
                    LinkCommand::Send { peer, frames } => net.route(id, peer, frames),
                    LinkCommand::Shutdown => break,
                    // No addresses; frames are routed (or lost) at once, never kept.
                    _ => {}
                }
            }
            net.detach(id);
            delivery.abort();
        });
        Ok(Link {
            commands: cmd_tx,
            events: events_rx,
            local_addr: None,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Internals

#[derive(Debug)]
struct Shared {
    plan: FaultPlan,
    state: Mutex<NetState>,
    stats: AtomicStats,
}

#[derive(Debug, Default)]
struct AtomicStats {
    sent: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_partition: AtomicU64,
    dropped_unattached: AtomicU64,
    duplicated: AtomicU64,
    delivered: AtomicU64,
}

#[derive(Debug, Default)]
struct NetState {
    nodes: HashMap<NodeId, NodeEntry>,
    partitions: HashSet<(NodeId, NodeId)>,
    isolated: HashSet<NodeId>,
    injectors: HashMap<(NodeId, NodeId), FaultInjector>,
    /// Global scheduling order: ties on the deadline deliver in push order.
    next_seq: u64,
}

#[derive(Debug)]
struct NodeEntry {
    origin: Origin,
    inbox: mpsc::UnboundedSender<Scheduled>,
}

/// An event due at `at`; ordered by `(at, seq)`.
#[derive(Debug)]
struct Scheduled {
    at: Instant,
    seq: u64,
    event: LinkEvent,
}

impl NetState {
    fn is_blocked(&self, a: NodeId, b: NodeId) -> bool {
        self.isolated.contains(&a)
            || self.isolated.contains(&b)
            || self.partitions.contains(&pair(a, b))
    }

    fn push_now(&mut self, to: NodeId, event: LinkEvent) {
        self.push(to, Instant::now(), event);
    }

    fn push(&mut self, to: NodeId, at: Instant, event: LinkEvent) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(node) = self.nodes.get(&to) {
            // Fails only if the node's delivery task is gone (detaching): dropping the
            // event is then what a closed connection does.
            let _ = node.inbox.send(Scheduled { at, seq, event });
        }
    }
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Per node: hold scheduled events until due, hand them to the node in `(at, seq)` order.
async fn delivery_loop(
    mut inbox: mpsc::UnboundedReceiver<Scheduled>,
    events: mpsc::Sender<LinkEvent>,
    shared: Arc<Shared>,
) {
    let mut heap: BinaryHeap<Reverse<HeapItem>> = BinaryHeap::new();
    let mut inbox_open = true;
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(top)| top.at <= now) {
            let Some(Reverse(item)) = heap.pop() else {
                break;
            };
            let is_frame = matches!(item.event, LinkEvent::Frame { .. });
            if events.send(item.event).await.is_err() {
                return; // the node dropped its receiver
            }
            if is_frame {
                shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Take everything already queued before sleeping, so events due now are not
        // delayed behind a timer.
        while let Ok(s) = inbox.try_recv() {
            heap.push(Reverse(HeapItem::from(s)));
        }
        if heap
            .peek()
            .is_some_and(|Reverse(top)| top.at <= Instant::now())
        {
            continue;
        }
        let next = heap.peek().map(|Reverse(top)| top.at);
        if !inbox_open && next.is_none() {
            return;
        }
        tokio::select! {
            msg = inbox.recv(), if inbox_open => match msg {
                Some(s) => heap.push(Reverse(HeapItem::from(s))),
                None => inbox_open = false,
            },
            _ = sleep_until_opt(next) => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug)]
struct HeapItem {
    at: Instant,
    seq: u64,
    event: LinkEvent,
}

impl From<Scheduled> for HeapItem {
    fn from(s: Scheduled) -> Self {
        HeapItem {
            at: s.at,
            seq: s.seq,
            event: s.event,
        }
    }
}

impl PartialEq for HeapItem {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for HeapItem {}
impl PartialOrd for HeapItem {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapItem {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injector_is_deterministic_per_link_and_differs_between_links() {
        let plan = FaultPlan::new(11)
            .loss(0.3)
            .duplicate(0.2)
            .reorder(0.3)
            .delay(Duration::from_millis(1), Duration::from_millis(9));
        let run = |from, to| {
            let mut inj = FaultInjector::new(&plan, NodeId(from), NodeId(to));
            (0..200).map(|_| inj.decide()).collect::<Vec<_>>()
        };
        assert_eq!(run(1, 2), run(1, 2));
        assert_ne!(run(1, 2), run(2, 1));
        assert_ne!(run(1, 2), run(1, 3));
    }

    #[test]
    fn no_fault_plan_delivers_once_without_delay() {
        let mut inj = FaultInjector::new(&FaultPlan::default(), NodeId(1), NodeId(2));
        for _ in 0..1000 {
            assert_eq!(
                inj.decide(),
                FaultDecision::Deliver {
                    copies: 1,
                    delay: Duration::ZERO
                }
            );
        }
    }

    #[test]
    fn delays_stay_within_plan_bounds() {
        let plan = FaultPlan::new(3)
            .reorder(0.5)
            .reorder_extra(Duration::from_millis(4))
            .delay(Duration::from_millis(2), Duration::from_millis(3));
        let mut inj = FaultInjector::new(&plan, NodeId(1), NodeId(2));
        for _ in 0..1000 {
            let FaultDecision::Deliver { delay, .. } = inj.decide() else {
                panic!("no loss configured");
            };
            assert!(delay >= Duration::from_millis(2) && delay <= Duration::from_millis(7));
        }
    }

    #[test]
    fn invalid_plans_are_rejected() {
        assert!(FaultPlan::default().loss(1.5).validate().is_err());
        assert!(FaultPlan::default().duplicate(f64::NAN).validate().is_err());
        assert!(FaultPlan::default()
            .delay(Duration::from_millis(2), Duration::from_millis(1))
            .validate()
            .is_err());
        assert!(FaultPlan::default().validate().is_ok());
    }
}
