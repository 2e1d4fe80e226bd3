//! Nodes and their public API: [`Node`], [`Sender`], [`Receiver`], [`Delivery`],
//! [`Receipt`], and the tokio driver behind them.
//!
//! One concept per file: `error` (error and outcome types), `config` (settings,
//! options, counters), `builder` ([`NodeBuilder`] and transport start-up), `handles`
//! (senders, receipts, receivers, deliveries), `shared` (the state the handles share
//! with the driver) and `driver` (the task that feeds the sans-IO
//! [`crate::proto::Endpoint`] and moves what it puts out; no protocol logic). This file
//! holds [`Node`] and the `pub use` list the crate root re-exports from.

mod batch;
mod builder;
mod command;
pub(crate) mod completions;
mod config;
mod dead_letter;
mod driver;
mod error;
mod handles;
mod link_events;
#[cfg(feature = "metrics")]
mod metrics;
mod observe;
mod receivers;
#[cfg(feature = "tower")]
mod service;
mod shared;
mod sink;
mod spool;
mod supervise;
pub(crate) mod typecheck;

pub use builder::{NodeBuilder, BIND_RETRY};
pub use config::{ChannelOptions, NodeConfig, ReceiverOptions, Stats};
pub use dead_letter::{DeadLetter, DeadLetterReason, DeadLetters};
pub use error::{AckError, HandoffRefusal, NodeError, NodeFailure, Outcome, SendError};
pub use handles::{Delivery, DeliveryHandle, RawReceiver, RawSender, Receipt, Receiver, Sender};
#[cfg(feature = "tower")]
pub use service::{RawSenderService, SendFuture, SenderService};
pub use sink::{RawSendSink, SendSink};
pub use spool::HandoffConfig;

use builder::TcpTrust;
use command::Command;
use shared::{NodeState, Shared};

use crate::codec::{Bincode, Decode, Encode};
use crate::detector::{Health, HealthChange};
use crate::id::{ChannelId, NodeId, Origin};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// One ackwire node: sends and receives messages over its transport.
///
/// ```
/// use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Plain TCP admits the peers a node knows: `peer` (it dials them) or `allow_peer`.
/// let b = Node::builder(NodeId(2))
///     .bind("127.0.0.1:0".parse()?)
///     .allow_peer(NodeId(1))
///     .build()
///     .await?;
/// let a = Node::builder(NodeId(1))
///     .bind("127.0.0.1:0".parse()?)
///     .peer(NodeId(2), b.local_addr().unwrap())
///     .build()
///     .await?;
/// let mut inbox = b.receiver::<String>(ChannelId(7), false)?;
/// let out = a.sender::<String>(NodeId(2), ChannelOptions::new(ChannelId(7), Guarantee::EffectivelyOnce))?;
/// let receipt = out.send(&"hello".to_string()).await?;
/// let delivery = inbox.recv().await.unwrap();
/// assert_eq!(delivery.message(), "hello");
/// delivery.ack(); // the ack goes back only now, after processing
/// assert_eq!(receipt.await?, ackwire::Outcome::Acked);
/// # a.shutdown().await;
/// # b.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Node {
    origin: Origin,
    tcp_stats: Option<Arc<crate::transport::tcp::TcpStats>>,
    /// Closes the TCP listener at once when the node is dropped.
    accept_stop: Option<Arc<tokio::sync::Notify>>,
    local_addr: Option<SocketAddr>,
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// Start building node `id`.
    pub fn builder(id: NodeId) -> NodeBuilder {
        NodeBuilder {
            id,
            tcp: None,
            transport: None,
            peers: Vec::new(),
            config: NodeConfig::default(),
            seed: None,
            trust: TcpTrust::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.origin.node
    }

    /// This run of the node (id + incarnation).
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Counters of the built-in TCP transport (connections, refusals by reason —
    /// strangers, duplicate node ids, TLS failures…); `None` with another transport.
    pub fn tcp_stats(&self) -> Option<crate::transport::tcp::TcpStatsSnapshot> {
        self.tcp_stats.as_ref().map(|s| s.snapshot())
    }

    /// The address the transport listens on, if any.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Learn where `peer` is (TCP); the failure detector watches it from now on (see
    /// [`NodeBuilder::peer`]).
    /// This node's own id is ignored (with a warning): a node does not connect to
    /// itself.
    pub fn add_peer(&self, peer: NodeId, addr: SocketAddr) {
        if peer == self.id() {
            tracing::warn!(%peer, %addr, "add_peer with this node's own id ignored");
            return;
        }
        self.shared
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer);
        // Watched from now on, as `health` says: `Some(Up)` at once, not once the
        // driver has taken the command (the builder's peers start the same way).
        self.shared.seen(peer, Health::Up);
        let _ = self.commands.send(Command::AddPeer { peer, addr });
    }

    /// A typed sender to `peer` on a channel; messages are serialized with bincode's
    /// serde support (the [`Bincode`] codec; [`Node::sender_with_codec`] picks another).
    ///
    /// Fails with [`NodeError::UnknownPeer`] for a peer this node does not know (see
    /// [`NodeConfig::allow_dynamic_peers`]), [`NodeError::SelfPeer`] for this node's
    /// own id, [`NodeError::Config`] for a zero
    /// `options.deadline`, and [`NodeError::Shutdown`] / [`NodeError::Failed`] once the
    /// node has stopped.
    pub fn sender<T: Serialize>(
        &self,
        peer: NodeId,
        options: ChannelOptions,
    ) -> Result<Sender<T>, NodeError> {
        self.sender_with_codec(peer, options, Bincode)
    }

    /// A typed sender to `peer` on a channel whose messages `codec` encodes (see
    /// [`crate::codec`]); the channel's receiver must use the same codec. Otherwise as
    /// [`Node::sender`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "postcard")]
    /// # fn demo(node: ackwire::Node) -> Result<(), ackwire::NodeError> {
    /// use ackwire::codec::Postcard;
    /// use ackwire::{ChannelId, ChannelOptions, Guarantee, NodeId, ReceiverOptions};
    /// let out = node.sender_with_codec::<Vec<u32>, _>(
    ///     NodeId(2),
    ///     ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
    ///     Postcard,
    /// )?;
    /// // and on node 2:
    /// let inbox = node.receiver_with_codec::<Vec<u32>, _>(ChannelId(1), ReceiverOptions::default(), Postcard)?;
    /// # Ok(()) }
    /// ```
    pub fn sender_with_codec<T, C: Encode<T>>(
        &self,
        peer: NodeId,
        options: ChannelOptions,
        codec: C,
    ) -> Result<Sender<T, C>, NodeError> {
        let mut raw = self.raw_sender(peer, options)?;
        raw.schema = crate::codec::fingerprint::<T, C>();
        Ok(Sender {
            raw,
            codec,
            _t: PhantomData,
        })
    }

    /// A sender of raw bytes to `peer` on a channel.
    pub fn raw_sender(
        &self,
        peer: NodeId,
        options: ChannelOptions,
    ) -> Result<RawSender, NodeError> {
        self.check_running()?;
        if let Some(d) = options.deadline {
            crate::error::check::duration("deadline", d, Duration::from_nanos(1), Duration::MAX)?;
        }
        if peer == self.id() {
            return Err(NodeError::SelfPeer(peer));
        }
        if !self.shared.is_known(peer) {
            return Err(NodeError::UnknownPeer(peer));
        }
        let window = self.shared.window_for(peer, options.channel);
        Ok(RawSender {
            peer,
            options,
            window,
            window_size: self.shared.window,
            commands: self.commands.clone(),
            max_payload: self.shared.max_payload,
            shared: self.shared.clone(),
            schema: 0,
        })
    }

    /// The receiver of a channel, with [`ReceiverOptions`]. One receiver per channel
    /// and node.
    pub fn receiver_with<T: DeserializeOwned>(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
    ) -> Result<Receiver<T>, NodeError> {
        self.receiver_with_codec(channel, options, Bincode)
    }

    /// The receiver of a channel whose messages `codec` decodes (see [`crate::codec`]),
    /// with [`ReceiverOptions`]: a typed sender with another codec (or type) is rejected
    /// with [`RejectReason::TypeMismatch`](crate::RejectReason::TypeMismatch) unless the
    /// type check is off. One receiver per channel and node.
    pub fn receiver_with_codec<T, C: Decode<T>>(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
        codec: C,
    ) -> Result<Receiver<T, C>, NodeError> {
        let schema = if options.type_check {
            crate::codec::fingerprint::<T, C>()
        } else {
            0
        };
        Ok(Receiver {
            raw: self.register(channel, options, schema)?,
            codec,
            _t: PhantomData,
        })
    }

    /// The node's dead letters: received messages that reached their channel's
    /// delivery limit ([`ReceiverOptions::max_deliveries`]) or did not decode as their
    /// typed receiver's type. See [`DeadLetters`].
    pub fn dead_letters(&self) -> DeadLetters {
        self.shared.dead_letters.handle()
    }

    /// `Err` once the node has failed or shut down.
    fn check_running(&self) -> Result<(), NodeError> {
        if let Some(f) = self.shared.failure() {
            return Err(NodeError::Failed(f));
        }
        // The state turns `Closed` before the driver closes its command channel: a call
        // in between (e.g. right after `closed()` or a second, concurrent `shutdown()`
        // returned) must not hand out a sender or receiver of a stopped node.
        if self.commands.is_closed() || !matches!(*self.shared.state.borrow(), NodeState::Running) {
            return Err(NodeError::Shutdown);
        }
        Ok(())
    }

    /// Resolves when the node has stopped: `Ok(())` after [`Node::shutdown`] (or once
    /// the last handle is gone), [`NodeError::Failed`] with the cause if its driver
    /// died unexpectedly. Await it next to your service's other tasks to notice a dead
    /// node at once.
    pub async fn closed(&self) -> Result<(), NodeError> {
        let mut rx = self.shared.state.subscribe();
        let state = match rx.wait_for(|s| !matches!(s, NodeState::Running)).await {
            Ok(s) => s.clone(),
            Err(_) => NodeState::Closed,
        };
        match state {
            NodeState::Failed(f) => Err(NodeError::Failed(f)),
            _ => Ok(()),
        }
    }

    /// The receiver of a channel; `ordered` delivers each stream's messages in send
    /// order (shorthand for [`Node::receiver_with`]; see [`ReceiverOptions::ordered`]
    /// for exactly what that promises). One receiver per channel and node.
    pub fn receiver<T: DeserializeOwned>(
        &self,
        channel: ChannelId,
        ordered: bool,
    ) -> Result<Receiver<T>, NodeError> {
        self.receiver_with(
            channel,
            ReceiverOptions {
                ordered,
                ..ReceiverOptions::default()
            },
        )
    }

    /// The receiver of raw payloads of a channel (default [`ReceiverOptions`] but
    /// `ordered`).
    pub fn raw_receiver(
        &self,
        channel: ChannelId,
        ordered: bool,
    ) -> Result<RawReceiver, NodeError> {
        self.raw_receiver_with(
            channel,
            ReceiverOptions {
                ordered,
                ..ReceiverOptions::default()
            },
        )
    }

    /// The receiver of raw payloads of a channel, with [`ReceiverOptions`].
    pub fn raw_receiver_with(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
    ) -> Result<RawReceiver, NodeError> {
        self.register(channel, options, 0)
    }

    /// Register the receiver of `channel`; `schema` is the payload type fingerprint a
    /// typed receiver checks (0: none).
    fn register(
        &self,
        channel: ChannelId,
        options: ReceiverOptions,
        schema: u32,
    ) -> Result<RawReceiver, NodeError> {
        self.check_running()?;
        if let Some(limit) = options.max_deliveries {
            crate::error::check::count("max_deliveries", u64::from(limit), 1, u64::from(u32::MAX))?;
        }
        // Unbounded: for acked guarantees what may be queued is bounded by the credit
        // granted to each inbound stream (`ProtoConfig::stream_credit`), never by
        // refusing arrivals. At-most-once from a peer ignoring its credit is not
        // (a known gap: docs/SECURITY.md).
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut taken = self
                .shared
                .receivers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let live = taken
                .get(&channel)
                .and_then(mpsc::WeakUnboundedSender::upgrade)
                .is_some_and(|t| !t.is_closed());
            if live {
                return Err(NodeError::ChannelTaken(channel));
            }
            // Before the map grows, drop the registrations of receivers gone since
            // (each kept a channel's allocation): amortised O(1) per registration.
            if taken.len() >= taken.capacity().max(64) {
                taken.retain(|_, w| w.upgrade().is_some_and(|t| !t.is_closed()));
            }
            // Weak: the driver's sender alone decides when the receiver sees the end.
            taken.insert(channel, tx.downgrade());
        }
        self.commands
            .send(Command::Register {
                channel,
                options,
                schema,
                tx,
            })
            .map_err(|_| self.shared.closed_error())?;
        Ok(RawReceiver {
            rx,
            shared: self.shared.clone(),
            settled_left: std::collections::VecDeque::new(),
        })
    }

    /// The failure detector's view of `peer`. A peer given to
    /// [`NodeBuilder::peer`] or [`add_peer`](Self::add_peer) is watched from then on
    /// as if heard from at that moment: it starts `Some(Up)`, before any connection,
    /// and turns Suspect and Down (about 3 s) if it is never reached. `None` for a
    /// peer neither configured nor heard from, and again after
    /// [`decommission`](Self::decommission) until the peer connects again or is added
    /// with [`add_peer`](Self::add_peer).
    pub fn health(&self, peer: NodeId) -> Option<Health> {
        self.shared.health(peer)
    }

    /// The protocol version negotiated with `peer` on its current (or last)
    /// connection; `None` before the first one. See [`crate::wire::VersionRange`].
    pub fn protocol_version(&self, peer: NodeId) -> Option<u16> {
        let v = self
            .shared
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        v.get(&peer).copied()
    }

    /// Identity conflicts: another process claimed a peer's `NodeId` while that peer's
    /// connection was alive, and was refused (the live connection stays; see
    /// `TcpConfig::stale_after`). Each refused connection is one event (the transport
    /// also counts them in `rejected_duplicate_node` and warns, rate-limited). A
    /// subscriber more than 64 events behind skips the oldest. Ends
    /// (`RecvError::Closed`) once the node has stopped.
    pub fn identity_conflicts(&self) -> broadcast::Receiver<IdentityConflict> {
        self.shared.conflict_tx.subscribe()
    }

    /// A stream of the failure detector's transitions (Up / Suspect / Down). A slow
    /// subscriber that falls more than 256 changes behind skips the oldest. Ends
    /// (`RecvError::Closed`, after the changes already sent) once the node has stopped:
    /// after [`shutdown`](Self::shutdown), a failure, or its runtime dropped.
    pub fn health_events(&self) -> broadcast::Receiver<HealthChange> {
        self.shared.health_tx.subscribe()
    }

    /// The target is gone for good: drop its hints (counted), stop watching it
    /// ([`health`](Self::health) is `None` until it connects again or is added with
    /// [`add_peer`](Self::add_peer)) and stop dialing it (the transport forgets its
    /// address; a connection it holds stays until it closes). At-most-once messages to
    /// it still waiting for its credit fail with [`SendError::PeerDown`]; acked ones
    /// keep their deadlines, and are not hinted when they reach them (nor spooled at
    /// shutdown) until the peer connects again or is added back. Returns the number
    /// of hints dropped.
    pub async fn decommission(&self, peer: NodeId) -> Result<u64, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Decommission { peer, reply: tx })
            .map_err(|_| self.shared.closed_error())?;
        rx.await.map_err(|_| self.shared.closed_error())?
    }

    /// Counters.
    pub async fn stats(&self) -> Result<Stats, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats(tx))
            .map_err(|_| self.shared.closed_error())?;
        let mut stats = rx.await.map_err(|_| self.shared.closed_error())?;
        stats.decode_failed = self.shared.decode_failed.load(Ordering::Relaxed);
        stats.no_receiver = self.shared.no_receiver.load(Ordering::Relaxed);
        stats.tcp = self.tcp_stats();
        Ok(stats)
    }

    /// Stop gracefully: refuse new sends ([`SendError::Shutdown`]), wait up to
    /// [`NodeConfig::shutdown_drain`] for unacknowledged messages, then spool what is
    /// left to the hint store (receipts resolve [`Outcome::HandedOff`]; without handoff
    /// they fail with [`SendError::Shutdown`]), give deliveries the application still
    /// holds up to [`NodeConfig::shutdown_handler_grace`] (default 5 s; it ends as
    /// soon as none is held) to finish, so their acks and dedup records are not lost
    /// with the stop, flush the hint log, close the transport, and wait for the driver
    /// to finish. Receivers hand out nothing new from the start of that grace on:
    /// messages still queued for them, never seen by the application, are taken back
    /// unacknowledged for the sender to send to the node's next run, and `recv` returns
    /// `None` — after the queued at-most-once ones, which no sender sends again (see
    /// [`RawReceiver::recv`]). A node restarted on the same hint directory
    /// replays the spooled messages. Dropping a `Node` instead stops it at once.
    ///
    /// Receivers keep handing out during the drain. A delivery nacked (or dropped)
    /// then does not count toward
    /// [`ReceiverOptions::max_deliveries`](crate::ReceiverOptions::max_deliveries):
    /// its sender sends it again, to this run or the next, as often as it is nacked,
    /// and it is never dead-lettered for it. (A relay whose own sends now fail with
    /// [`SendError::Shutdown`] can nack what it cannot forward.)
    ///
    /// The grace waits only for deliveries handed out to the application; messages
    /// still queued for a receiver that is not polled are taken back without waiting.
    /// A delivery still held when the grace ends is treated like a handler crash:
    /// its `ack()` is lost (`ack_durable` fails with [`AckError::NodeStopped`]), a
    /// warning is logged with the count, and its sender sends it again to the node's
    /// next run, which delivers it again — also on an effectively-once channel with
    /// durable dedup (an at-most-once one is not sent again). A handler that may run longer than the grace must be idempotent
    /// (or use the `ackwire-inbox` crate).
    ///
    /// Every call waits for the stop, also one made while another is in progress.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Drain);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        match task {
            Some(task) => {
                let _ = task.await;
            }
            // Another call holds the task: wait for the driver to end all the same.
            None => {
                let _ = self.closed().await;
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The port goes back now, not once the driver reaches the command: a new node
        // may bind it at once even while this one is still busy stopping.
        if let Some(stop) = &self.accept_stop {
            stop.notify_one();
        }
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// Two live incarnations claimed one `NodeId`: `refused` was turned away because
/// `live` holds a connection (see [`Node::identity_conflicts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdentityConflict {
    /// The incarnation whose connection stays.
    pub live: Origin,
    /// The incarnation that was refused.
    pub refused: Origin,
}
