//! Test *your* service's handlers under loss, duplication, reordering, partitions and
//! restarts, on a virtual clock (feature `testing`).
//!
//! Owns a [`SimNet`]: ordinary [`Node`]s, built with your [`NodeConfig`], attached to
//! one in-memory network ([`MemNetwork`]) that injects a seeded [`FaultPlan`], plus the
//! faults you apply during a test (partition, isolation, connection reset, clean
//! restart, crash) and helpers that wait on tokio's paused clock. It must not change
//! how a node behaves: what a test sees here is what the `mem` transport and the real
//! node code do.
//!
//! # Virtual time
//!
//! Run the test on a current-thread runtime with paused time: a
//! `#[tokio::test(start_paused = true)]` test, or [`runtime()`] for a `main` or a doc
//! test. The clock then moves only when every task is idle, and jumps straight to the
//! next timer, so retransmission timeouts, heartbeats and a partition of a minute
//! cost no wall-clock time. ([`SimNet::advance`] and [`SimNet::run_until`] also work
//! on a real clock; they then really wait.)
//!
//! Work a handler does off the runtime does not hold the clock: while a handler
//! waits on a plain thread (or a real database, a `std::thread::sleep`), every task
//! is idle, so the clock runs on from timer to timer and a sender's deadline (30 s by
//! default) can pass in milliseconds of real time: its receipts then fail with
//! `SendError::Deadline` although the handler processes the messages. Run such work
//! in `tokio::task::spawn_blocking` (tokio does not move a paused clock while a
//! blocking task runs) or raise the deadline in the test's `NodeConfig`
//! (`tests/blackbox/runtimes.rs`, `r02a` / `r02b`).
//!
//! # What is deterministic, and what is not
//!
//! Deterministic, for the same [`FaultPlan`] (seed included):
//!
//! * **Each link's fault decisions, per frame index.** The directed link `a → b` draws
//!   its loss / duplication / delay decisions from a generator seeded by
//!   `(seed, a, b)`: the *n*-th frame sent on that link gets the same fate in every run
//!   ([`FaultInjector`](crate::transport::mem::FaultInjector)).
//! * **Each node's retransmission jitter**, seeded by `(seed, id, incarnation number)`
//!   (the first start of a node is incarnation number 1, each restart adds one).
//! * **Virtual time.** A timer set for `t` fires at virtual `t`, however long the
//!   machine took.
//!
//! Not promised:
//!
//! * **tokio's scheduling order.** Tasks woken at the same virtual instant run in an
//!   order tokio does not specify, and `tokio::select!` picks among ready branches at
//!   random. How a node batches acks and data into frames decides *which* frame is the
//!   *n*-th on a link, so whenever acknowledgements flow (at-least-once and
//!   effectively-once) a tokio change could make one seed give other [`MemStats`]
//!   counts, or hit other messages, than before.
//! * **Incarnation ids** ([`Origin::incarnation`](crate::Origin)) are random, as in
//!   production; the network's bookkeeping uses std's randomly seeded hash maps.
//!
//! What `tests/integration/testing_harness.rs` checks: the same seed gives the same [`MemStats`]
//! (frames sent, lost, duplicated, delivered) for a fixed workload of one at-most-once
//! sender with sends spaced in virtual time (no acks flow; a second seed gives other
//! counts), and — observed with the tokio this crate was tested with, not promised —
//! also for at-least-once and effectively-once bursts from two senders to a receiver
//! that restarts halfway, rerun in a fresh runtime. So a failing seed usually replays;
//! still, write tests that assert your service's invariants (every credit applied
//! once, no balance negative), ideally over several seeds, rather than exact counts
//! of drops or retries.
//!
//! # Example
//!
//! A credit service that applies each credit once, tested under 20 % loss,
//! duplication, reordering and a partition (`examples/testing_my_service.rs` adds a
//! restart and an at-least-once variant):
//!
//! ```
//! use ackwire::testing::{runtime, NodeSetup, SimNet};
//! use ackwire::transport::mem::FaultPlan;
//! use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! const CREDITS: ChannelId = ChannelId(1);
//! let (shop, bank) = (NodeId(1), NodeId(2));
//! // The service under test: (credit id, cents) -> balance, plus how often the
//! // handler ran for each credit.
//! let applied: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
//!
//! runtime().unwrap().block_on(async {
//!     let plan = FaultPlan::new(7).loss(0.2).duplicate(0.1).reorder(0.3)
//!         .delay(Duration::from_micros(100), Duration::from_millis(2));
//!     let mut sim = SimNet::new(plan).unwrap();
//!     sim.add_node(shop).await.unwrap();
//!     let seen = applied.clone();
//!     sim.add(NodeSetup::new(bank).on_start(move |node: &Node| {
//!         // Runs at every start of the bank node, so a restart re-attaches the handler.
//!         let mut inbox = node.receiver::<(u64, i64)>(CREDITS, false).unwrap();
//!         let seen = seen.clone();
//!         tokio::spawn(async move {
//!             while let Some(credit) = inbox.recv().await {
//!                 *seen.lock().unwrap().entry(credit.message().0).or_default() += 1;
//!                 credit.ack();
//!             }
//!         });
//!     }))
//!     .await
//!     .unwrap();
//!
//!     let out = sim.node(shop).unwrap()
//!         .sender::<(u64, i64)>(bank, ChannelOptions::new(CREDITS, Guarantee::EffectivelyOnce))
//!         .unwrap();
//!     let mut receipts = Vec::new();
//!     for id in 0..100u64 {
//!         if id == 50 {
//!             sim.partition(shop, bank);
//!         }
//!         if id == 60 {
//!             sim.heal(shop, bank);
//!         }
//!         receipts.push(out.send(&(id, 100)).await.unwrap());
//!         sim.advance(Duration::from_millis(10)).await;
//!     }
//!     for r in receipts {
//!         r.await.unwrap(); // every credit acknowledged...
//!     }
//!     let seen = applied.clone();
//!     sim.run_until(|| seen.lock().unwrap().len() == 100, Duration::from_secs(5))
//!         .await
//!         .unwrap();
//!     sim.shutdown().await;
//! });
//! // ...and applied exactly once, although the network lost and duplicated frames.
//! assert!(applied.lock().unwrap().values().all(|n| *n == 1));
//! ```

use crate::rng::SplitMix64;
use crate::transport::mem::{FaultPlan, FaultPlanError, MemNetwork, MemStats};
use crate::{Node, NodeConfig, NodeError, NodeId};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// A current-thread tokio runtime with paused time and every driver enabled: the
/// runtime a [`SimNet`] is meant to run on, for a `main`, an example or a doc test
/// (`#[tokio::test(start_paused = true)]` gives the same in a test).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
}

/// How long [`SimNet::restart`], [`SimNet::stop`] and [`SimNet::crash`] wait (in
/// virtual time) for a stopped node to leave the network before giving up with
/// [`SimError::StillAttached`]. A node detaches within a few scheduler turns of
/// stopping; 10 s leaves ample room.
pub const DETACH_WAIT: Duration = Duration::from_secs(10);

/// How often [`SimNet::run_until`] checks its condition: every 1 ms of virtual time.
pub const RUN_UNTIL_STEP: Duration = Duration::from_millis(1);

/// Simulated nodes on one in-memory network with seeded faults. See the
/// [module docs](self) for what is deterministic.
///
/// Nodes are kept by id; each id has at most one running incarnation. Dropping a
/// `SimNet` drops its nodes (they stop at once); [`SimNet::shutdown`] stops them
/// cleanly.
#[derive(Debug)]
pub struct SimNet {
    net: MemNetwork,
    plan: FaultPlan,
    start: Instant,
    nodes: BTreeMap<NodeId, Slot>,
}

/// How to start one simulated node: its id, its [`NodeConfig`] and a hook run at every
/// start (the first and each restart).
///
/// `Default` config: [`NodeConfig::default`]; no hook.
pub struct NodeSetup {
    id: NodeId,
    config: NodeConfig,
    on_start: Option<StartHook>,
}

type StartHook = Box<dyn FnMut(&Node) + Send>;

/// Errors of the [`SimNet`] API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The fault plan is invalid; fix it (see [`FaultPlan::validate`]).
    #[error("invalid fault plan: {0}")]
    Plan(#[from] FaultPlanError),
    /// Called outside a tokio runtime. Run the test inside one (see [`runtime()`]).
    #[error("no tokio runtime: run the simulation inside one (ackwire::testing::runtime, or #[tokio::test(start_paused = true)])")]
    NoRuntime,
    /// [`SimNet::add`] with an id already added. Use another id, or
    /// [`SimNet::restart`] for a new incarnation of that node.
    #[error("node {0} was already added")]
    NodeExists(NodeId),
    /// No node with this id was added. Add it first.
    #[error("no node {0} in this simulation")]
    UnknownNode(NodeId),
    /// The node is stopped or crashed. Start it again with [`SimNet::start`].
    #[error("node {0} is not running (stopped or crashed): call SimNet::start")]
    NodeDown(NodeId),
    /// [`SimNet::start`] on a node that is running. Use [`SimNet::restart`] to replace
    /// it with a new incarnation.
    #[error("node {0} is already running")]
    NodeRunning(NodeId),
    /// Building the node failed (its config is invalid, or a durable directory could
    /// not be opened). The source says why; the node is left stopped.
    #[error("node {id} did not start: {source}")]
    Node {
        /// Which node.
        id: NodeId,
        /// Why.
        #[source]
        source: NodeError,
    },
    /// A stopped node's transport was still attached after [`DETACH_WAIT`] of
    /// virtual time, so a new incarnation could not attach. Something in the test
    /// blocks the runtime; report it as a bug if not.
    #[error("node {0} did not leave the network after it stopped")]
    StillAttached(NodeId),
    /// [`SimNet::run_until`]'s condition did not hold within its timeout (virtual
    /// time). The test's expectation failed, or the timeout is too short.
    #[error("condition not met within {waited:?} of virtual time")]
    Timeout {
        /// The timeout given.
        waited: Duration,
    },
}

impl SimNet {
    /// An empty simulation whose network injects `plan`'s faults, seeded by
    /// `plan.seed`. Must be called inside a tokio runtime (paused, for virtual time):
    /// the simulation's clock starts now.
    pub fn new(plan: FaultPlan) -> Result<SimNet, SimError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(SimError::NoRuntime);
        }
        Ok(SimNet {
            net: MemNetwork::new(plan)?,
            plan,
            start: Instant::now(),
            nodes: BTreeMap::new(),
        })
    }

    /// The fault plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The seed (`plan().seed`): print it when a test fails, to rerun it.
    pub fn seed(&self) -> u64 {
        self.plan.seed
    }

    /// The underlying network: clone it to apply faults from another task.
    pub fn network(&self) -> &MemNetwork {
        &self.net
    }

    /// The network's counters (frames sent, dropped by loss or partition, duplicated,
    /// delivered).
    pub fn stats(&self) -> MemStats {
        self.net.stats()
    }

    /// Time on the (virtual) clock since [`SimNet::new`].
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Add node `id` with the default [`NodeConfig`] and start it. Shorthand for
    /// [`add`](SimNet::add)`(NodeSetup::new(id))`.
    pub async fn add_node(&mut self, id: NodeId) -> Result<&Node, SimError> {
        self.add(NodeSetup::new(id)).await
    }

    /// Add a node and start it: build it on the network with its config and a seed
    /// derived from the simulation's, then run its start hook. Every node of the
    /// network can reach every other by id.
    pub async fn add(&mut self, setup: NodeSetup) -> Result<&Node, SimError> {
        let id = setup.id;
        if self.nodes.contains_key(&id) {
            return Err(SimError::NodeExists(id));
        }
        let mut slot = Slot {
            setup,
            node: None,
            incarnations: 0,
        };
        slot.start(&self.net, self.plan.seed).await?; // a node that did not start is not kept
        self.nodes.insert(id, slot);
        self.node(id)
    }

    /// The running incarnation of node `id`.
    pub fn node(&self, id: NodeId) -> Result<&Node, SimError> {
        self.slot(id)?.node.as_ref().ok_or(SimError::NodeDown(id))
    }

    /// The ids of every node added, running or not, in ascending order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// How many times node `id` has been started (1 after [`add`](SimNet::add), one
    /// more per restart or start).
    pub fn incarnations(&self, id: NodeId) -> Result<u64, SimError> {
        Ok(self.slot(id)?.incarnations)
    }

    /// Drop every frame between `a` and `b`, both directions, until
    /// [`heal`](SimNet::heal) or [`heal_all`](SimNet::heal_all). Connections stay
    /// "up": the nodes notice only through missing acks and heartbeats.
    pub fn partition(&self, a: NodeId, b: NodeId) {
        self.net.partition(a, b);
    }

    /// Undo [`partition(a, b)`](SimNet::partition).
    pub fn heal(&self, a: NodeId, b: NodeId) {
        self.net.heal(a, b);
    }

    /// Drop every frame to or from `node` until [`rejoin`](SimNet::rejoin) or
    /// [`heal_all`](SimNet::heal_all).
    pub fn isolate(&self, node: NodeId) {
        self.net.isolate(node);
    }

    /// Undo [`isolate(node)`](SimNet::isolate).
    pub fn rejoin(&self, node: NodeId) {
        self.net.rejoin(node);
    }

    /// Remove every partition and isolation.
    pub fn heal_all(&self) {
        self.net.heal_all();
    }

    /// Reset the connection between `a` and `b`: each sees the other go down and come
    /// back up at once (frames already in flight are still delivered). No effect
    /// unless both are running.
    pub fn disconnect(&self, a: NodeId, b: NodeId) {
        self.net.disconnect(a, b);
    }

    /// Replace node `id` with a new incarnation (same id and config, new
    /// [`Origin::incarnation`](crate::Origin)): stop the running one cleanly, as
    /// [`Node::shutdown`] does (it waits up to its `shutdown_drain` for unacknowledged
    /// messages), wait until it has left the network, then start the new one and run
    /// the start hook. A node that is not running is just started.
    ///
    /// What survives is what survives a real restart: state your service keeps
    /// outside the node, and the node's durable directories if its config has them
    /// (`dedup.durable`, `handoff`). In-memory dedup does not: across a restart of the
    /// receiver without durable dedup, effectively-once degrades to at-least-once.
    pub async fn restart(&mut self, id: NodeId) -> Result<&Node, SimError> {
        self.stop(id).await?;
        self.start(id).await
    }

    /// Stop node `id` cleanly (as [`Node::shutdown`]) and keep it down until
    /// [`start`](SimNet::start). Stopping a node that is down does nothing.
    pub async fn stop(&mut self, id: NodeId) -> Result<(), SimError> {
        let node = self.slot_mut(id)?.node.take();
        if let Some(node) = node {
            node.shutdown().await;
            drop(node);
            self.wait_detached(id).await?;
        }
        Ok(())
    }

    /// Stop node `id` abruptly and keep it down until [`start`](SimNet::start): the
    /// `Node` is dropped without draining, as when its owner drops it. Its unsettled
    /// receipts fail with [`SendError::Shutdown`](crate::SendError::Shutdown),
    /// deliveries its handlers still hold can no longer be acknowledged (the sender
    /// retries them, to the next incarnation), and its in-memory dedup state is lost.
    ///
    /// Not a power cut: files the node wrote (hint store, durable dedup log) were
    /// handed to the operating system as on any stop, and nothing is torn.
    /// Crashing a node that is down does nothing.
    pub async fn crash(&mut self, id: NodeId) -> Result<(), SimError> {
        let node = self.slot_mut(id)?.node.take();
        if let Some(node) = node {
            drop(node);
            self.wait_detached(id).await?;
        }
        Ok(())
    }

    /// Start node `id` again after [`stop`](SimNet::stop) or
    /// [`crash`](SimNet::crash): a new incarnation with the same id and config, then
    /// its start hook.
    pub async fn start(&mut self, id: NodeId) -> Result<&Node, SimError> {
        let net = self.net.clone();
        let seed = self.plan.seed;
        let slot = self.slot_mut(id)?;
        if slot.node.is_some() {
            return Err(SimError::NodeRunning(id));
        }
        slot.start(&net, seed).await?;
        self.node(id)
    }

    /// Let `d` of (virtual) time pass while every node, handler and timer runs.
    pub async fn advance(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// Let time pass until `condition` holds, checking it every [`RUN_UNTIL_STEP`] of
    /// virtual time; returns the virtual time waited. Fails with
    /// [`SimError::Timeout`] if it does not hold within `timeout`.
    pub async fn run_until(
        &self,
        mut condition: impl FnMut() -> bool,
        timeout: Duration,
    ) -> Result<Duration, SimError> {
        let start = Instant::now();
        loop {
            if condition() {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return Err(SimError::Timeout { waited: timeout });
            }
            tokio::time::sleep(RUN_UNTIL_STEP).await;
        }
    }

    /// Stop every running node cleanly (as [`Node::shutdown`], one after another in
    /// id order), so handlers see their receivers end.
    pub async fn shutdown(mut self) {
        for slot in self.nodes.values_mut() {
            if let Some(node) = slot.node.take() {
                node.shutdown().await;
            }
        }
    }

    fn slot(&self, id: NodeId) -> Result<&Slot, SimError> {
        self.nodes.get(&id).ok_or(SimError::UnknownNode(id))
    }

    fn slot_mut(&mut self, id: NodeId) -> Result<&mut Slot, SimError> {
        self.nodes.get_mut(&id).ok_or(SimError::UnknownNode(id))
    }

    /// Wait until node `id`'s transport has detached, so a new incarnation can attach.
    async fn wait_detached(&self, id: NodeId) -> Result<(), SimError> {
        let give_up = Instant::now() + DETACH_WAIT;
        while self.net.is_attached(id) {
            if Instant::now() >= give_up {
                return Err(SimError::StillAttached(id));
            }
            tokio::time::sleep(RUN_UNTIL_STEP).await;
        }
        Ok(())
    }
}

impl NodeSetup {
    /// Node `id` with the default [`NodeConfig`] and no start hook.
    pub fn new(id: NodeId) -> Self {
        NodeSetup {
            id,
            config: NodeConfig::default(),
            on_start: None,
        }
    }

    /// The node's settings, used at every start (e.g. `dedup.durable` in a temporary
    /// directory, so effectively-once survives restarts).
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Run `hook` right after each start of the node (its first and every restart),
    /// before the simulation yields to other tasks: the place to attach your
    /// service's receivers and spawn its handlers, so a restarted node serves again
    /// without a gap.
    pub fn on_start(mut self, hook: impl FnMut(&Node) + Send + 'static) -> Self {
        self.on_start = Some(Box::new(hook));
        self
    }
}

impl std::fmt::Debug for NodeSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSetup")
            .field("id", &self.id)
            .field("config", &self.config)
            .field("on_start", &self.on_start.as_ref().map(|_| "FnMut(&Node)"))
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Internals

/// One node id: how to start it, its running incarnation, how often it was started.
#[derive(Debug)]
struct Slot {
    setup: NodeSetup,
    node: Option<Node>,
    incarnations: u64,
}

impl Slot {
    async fn start(&mut self, net: &MemNetwork, seed: u64) -> Result<(), SimError> {
        let id = self.setup.id;
        let incarnation = self.incarnations + 1;
        let node = Node::builder(id)
            .transport(net.transport(id))
            .config(self.setup.config.clone())
            .seed(node_seed(seed, id, incarnation))
            .build()
            .await
            .map_err(|source| SimError::Node { id, source })?;
        self.incarnations = incarnation;
        if let Some(hook) = &mut self.setup.on_start {
            hook(&node);
        }
        self.node = Some(node);
        Ok(())
    }
}

/// The jitter seed of incarnation number `incarnation` of node `id` under `seed`.
fn node_seed(seed: u64, id: NodeId, incarnation: u64) -> u64 {
    let a = SplitMix64::new(seed).next_u64() ^ id.0;
    let b = SplitMix64::new(a).next_u64() ^ incarnation;
    SplitMix64::new(b).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_seeds_differ_by_node_and_incarnation_and_repeat_by_seed() {
        let s = |seed, id, inc| node_seed(seed, NodeId(id), inc);
        assert_eq!(s(1, 2, 3), s(1, 2, 3));
        assert_ne!(s(1, 2, 3), s(1, 2, 4));
        assert_ne!(s(1, 2, 3), s(1, 3, 3));
        assert_ne!(s(1, 2, 3), s(2, 2, 3));
    }

    #[test]
    fn new_outside_a_runtime_is_a_typed_error() {
        assert!(matches!(
            SimNet::new(FaultPlan::default()),
            Err(SimError::NoRuntime)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn misuse_is_a_typed_error() {
        assert!(matches!(
            SimNet::new(FaultPlan::default().loss(2.0)),
            Err(SimError::Plan(_))
        ));
        let mut sim = SimNet::new(FaultPlan::default()).unwrap();
        sim.add_node(NodeId(1)).await.unwrap();
        assert!(matches!(
            sim.add_node(NodeId(1)).await,
            Err(SimError::NodeExists(NodeId(1)))
        ));
        assert!(matches!(
            sim.node(NodeId(9)),
            Err(SimError::UnknownNode(NodeId(9)))
        ));
        assert!(matches!(
            sim.restart(NodeId(9)).await,
            Err(SimError::UnknownNode(NodeId(9)))
        ));
        assert!(matches!(
            sim.start(NodeId(1)).await,
            Err(SimError::NodeRunning(NodeId(1)))
        ));
        sim.crash(NodeId(1)).await.unwrap();
        assert!(matches!(
            sim.node(NodeId(1)),
            Err(SimError::NodeDown(NodeId(1)))
        ));
        sim.start(NodeId(1)).await.unwrap();
        assert_eq!(sim.incarnations(NodeId(1)).unwrap(), 2);
        let bad = NodeConfig {
            max_payload: 0,
            ..NodeConfig::default()
        };
        assert!(matches!(
            sim.add(NodeSetup::new(NodeId(2)).config(bad)).await,
            Err(SimError::Node { id: NodeId(2), .. })
        ));
        assert_eq!(sim.node_ids(), vec![NodeId(1)], "a failed add is not kept");
        assert!(matches!(
            sim.run_until(|| false, Duration::from_millis(5)).await,
            Err(SimError::Timeout { .. })
        ));
    }
}
