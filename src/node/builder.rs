//! Building a node: [`NodeBuilder`] validates the configuration, starts the transport
//! (retrying a TCP bind whose address is still in use for [`BIND_RETRY`]) and the
//! driver task, and returns the [`Node`] handle.
//!
//! Owns the builder's settings and the start-up order; must not hold protocol logic
//! or anything that runs after `build` returns (that is the driver's).

use super::completions::CompletionStack;
use super::config::check_tcp;
use super::dead_letter::DeadLetterQueue;
use super::driver::{now, Driver, BURST};
use super::handles::Completions;
use super::observe;
use super::receivers::Receivers;
use super::shared::{EventTx, NodeState, Shared};
use super::spool;
use super::supervise::supervise;
use super::{Node, NodeConfig, NodeError};
use crate::dedup::Dedup;
use crate::detector::{FailureDetector, Health};
use crate::handoff::HintError;
use crate::id::{NodeId, Origin};
use crate::proto::core::Core;
use crate::proto::liveness::Liveness;
use crate::proto::Endpoint;
use crate::transport::tcp::{TcpConfig, TcpTransport};
use crate::transport::{Link, LinkCommand, Transport};
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Builds a [`Node`].
#[derive(Debug)]
pub struct NodeBuilder {
    pub(super) id: NodeId,
    pub(super) tcp: Option<(SocketAddr, TcpConfig)>,
    pub(super) transport: Option<Box<dyn TransportDebug>>,
    pub(super) peers: Vec<(NodeId, SocketAddr)>,
    pub(super) config: NodeConfig,
    pub(super) seed: Option<u64>,
    pub(super) trust: TcpTrust,
}

/// The builder's trust settings for the built-in TCP transport.
#[derive(Debug, Default)]
pub(super) struct TcpTrust {
    allowed: Vec<NodeId>,
    accept_unknown_peers: Option<bool>,
    #[cfg(feature = "tls")]
    tls: Option<crate::transport::tls::TlsConfig>,
}

/// `Transport` plus `Debug`, so the builder can derive `Debug`.
pub(super) trait TransportDebug: Transport + std::fmt::Debug {
    fn into_transport(self: Box<Self>) -> Box<dyn Transport>;
}
impl<T: Transport + std::fmt::Debug> TransportDebug for T {
    fn into_transport(self: Box<Self>) -> Box<dyn Transport> {
        self
    }
}

impl NodeBuilder {
    /// Listen on `addr` with the TCP transport and its default settings.
    pub fn bind(self, addr: SocketAddr) -> Self {
        self.tcp(addr, TcpConfig::default())
    }

    /// Listen on `addr` with the TCP transport configured by `config`.
    ///
    /// If the address is still held by a node that is shutting down (a restart on the
    /// same port), `build` retries the bind for up to [`BIND_RETRY`].
    pub fn tcp(mut self, addr: SocketAddr, config: TcpConfig) -> Self {
        self.tcp = Some((addr, config));
        self.transport = None;
        self
    }

    /// Use this transport (e.g. `mem` in tests, or your own).
    pub fn transport<T: Transport + std::fmt::Debug>(mut self, transport: T) -> Self {
        self.transport = Some(Box::new(transport));
        self.tcp = None;
        self
    }

    /// A peer reachable at `addr` (TCP). More can be added later with
    /// [`Node::add_peer`]. The failure detector watches it from the start: a peer that
    /// never answers is declared Down after a few heartbeats (and, with handoff, sends
    /// to it become hints) rather than only failing each message at its deadline.
    /// The node's own id here makes [`build`](Self::build) fail with
    /// [`NodeError::SelfPeer`] (a node does not connect to itself).
    pub fn peer(mut self, id: NodeId, addr: SocketAddr) -> Self {
        self.peers.push((id, addr));
        self
    }

    /// Accept inbound connections from `id` without knowing its address (TCP without
    /// TLS; peers given to [`peer`](Self::peer) are accepted already).
    pub fn allow_peer(mut self, id: NodeId) -> Self {
        self.trust.allowed.push(id);
        self
    }

    /// Without TLS, accept inbound connections from any node id (default `false`: only
    /// configured or allowed peers). Overrides [`TcpConfig::accept_unknown_peers`].
    pub fn accept_unknown_peers(mut self, accept: bool) -> Self {
        self.trust.accept_unknown_peers = Some(accept);
        self
    }

    /// Run the TCP transport over mutual TLS 1.3 (see [`crate::transport::tls`]).
    /// Applies to the built-in transport ([`bind`](Self::bind), [`tcp`](Self::tcp));
    /// a transport given to [`transport`](Self::transport) is configured directly
    /// (`TcpTransport::with_tls`). The same holds for `allow_peer` and
    /// `accept_unknown_peers`.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::transport::tls::TlsConfig) -> Self {
        self.trust.tls = Some(tls);
        self
    }

    /// Node settings.
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Fix the seed of retransmission jitter (reproducible runs). Default: random.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validate, start the transport and the driver task. Must run inside a tokio
    /// runtime with timers and (for TCP) IO enabled (`enable_all()`, as
    /// `#[tokio::main]` gives); one without fails with [`NodeError::RuntimeDriver`].
    ///
    /// Every configuration value is checked first ([`NodeConfig::validate`]; with TCP
    /// also `TcpConfig::validate`, `connect_timeout`, `handshake_timeout` and
    /// `backoff_min` of at least 1 ms, `channel_capacity` and `queue_bound` within
    /// tokio's channel limit, and `max_payload` against the frame limit; with a
    /// transport given to [`transport`](Self::transport), `max_payload` against its
    /// [`Transport::max_frame_len`]): a bad value fails with [`NodeError::Config`]
    /// naming the field and the bound.
    pub async fn build(self) -> Result<Node, NodeError> {
        self.config.validate()?;
        check_runtime_drivers(self.tcp.is_some())?;
        // (Regression: accepted, and the node then watched itself, declared itself
        // Down and warned about a heartbeat to itself every second.)
        if self.peers.iter().any(|(id, _)| *id == self.id) {
            return Err(NodeError::SelfPeer(self.id));
        }
        if let Some((_, tcp)) = &self.tcp {
            check_tcp(&self.config, tcp)?;
        }
        // A transport given ready-made (`TcpTransport::with_tls`) has the same frame
        // limit. (Regression: unchecked, a payload between the two was accepted by
        // `send` and then dropped by the transport at every attempt.)
        let given_frame_limit = self.transport.as_ref().and_then(|t| t.max_frame_len());
        if let Some(m) = given_frame_limit {
            super::config::check_frame_limit(&self.config, m)?;
        }
        let dials_by_id = self.transport.as_ref().is_some_and(|t| t.dials_by_id());
        let origin = Origin::new_random(self.id);
        // Everything the node starts runs in its span (the stores' recovery, the
        // transport's tasks, the driver), so their events carry the node.
        let span = tracing::info_span!("node", node = %origin);
        let dedup_cfg = &self.config.dedup;
        warn_short_key_horizon(&self.config, self.id);
        // Before the store's recovery touches another node's files.
        if let Some(d) = &dedup_cfg.durable {
            claim_dir(&d.dir, self.id).map_err(|e| match e {
                Claim::Other(e) => e,
                Claim::Io(e) => NodeError::Dedup(crate::dedup::DedupError::Io(e)),
            })?;
        }
        let dedup = open_store(
            || Dedup::open(dedup_cfg.clone()),
            |e| matches!(e, crate::dedup::DedupError::InUse { .. }),
        )
        .instrument(span.clone())
        .await?;
        let dedup = Arc::new(dedup);
        // The largest hint this run can send: an earlier run's larger one is dropped
        // from the store (its frames would be refused by this run's transport).
        let frame_limit = match (&self.transport, &self.tcp) {
            (Some(_), _) => given_frame_limit,
            (None, Some((_, tcp))) => Some(tcp.max_frame_len),
            (None, None) => None,
        };
        let hint_max = frame_limit.map_or(usize::MAX, NodeConfig::payload_limit);
        let mut tcp_stats = None;
        let mut accept_stop = None;
        let link = match (self.transport, self.tcp) {
            (Some(t), _) => {
                let mut t = t.into_transport();
                t.batch_frames();
                // Heartbeats are what keep a live connection from looking idle.
                t.heartbeat_interval(self.config.heartbeat_interval);
                span.in_scope(|| t.start(origin))?
            }
            (None, Some((addr, mut cfg))) => {
                // Heartbeats are what keep a live connection from looking idle.
                cfg.idle_timeout = cfg
                    .idle_timeout
                    .max(self.config.heartbeat_interval.saturating_mul(3));
                let (link, stats, stop) = start_tcp(addr, cfg, &self.peers, self.trust, origin)
                    .instrument(span.clone())
                    .await?;
                tcp_stats = Some(stats);
                accept_stop = Some(stop);
                link
            }
            (None, None) => return Err(NodeError::NoTransport),
        };
        let local_addr = link.local_addr;
        let watched: Vec<NodeId> = self.peers.iter().map(|(id, _)| *id).collect();
        for (id, addr) in self.peers {
            let _ = link
                .commands
                .send(LinkCommand::AddPeer { peer: id, addr })
                .await;
        }
        let seed = self.seed.unwrap_or_else(crate::rng::seed_from_entropy);
        let start = now();
        let hint_in_use = |e: &HintError| matches!(e, HintError::InUse { .. });
        // The stores opened after the transport: a failure must give the address back
        // before `build` returns (the caller may retry on it at once).
        let stores = async {
            let spool = match &self.config.handoff {
                Some(cfg) => {
                    claim_dir(&cfg.store.dir, self.id).map_err(|e| match e {
                        Claim::Other(e) => e,
                        Claim::Io(e) => NodeError::Handoff(HintError::Io {
                            op: "claiming the hint directory",
                            source: e,
                        }),
                    })?;
                    let open = open_store(
                        || spool::open(cfg.clone(), hint_max, origin, start),
                        hint_in_use,
                    );
                    Some(open.instrument(span.clone()).await?)
                }
                None => None,
            };
            // The estimate seeds the detector's window: one below the heartbeat
            // interval takes every idle gap between pings for a failure, and a heartbeat
            // that arrives after the peer was declared Down is not recorded, so the
            // window never learns the real interval. (Regression: two nodes with a 5 s
            // heartbeat and the default detector held each other Down in every idle
            // period, failing sends with `PeerDown` on a healthy link.)
            let mut detector_cfg = self.config.detector;
            detector_cfg.first_heartbeat_estimate = detector_cfg
                .first_heartbeat_estimate
                .max(self.config.heartbeat_interval);
            let mut detector =
                FailureDetector::new(detector_cfg).map_err(crate::ConfigError::Detector)?;
            for peer in &watched {
                detector.heartbeat(*peer, start); // watched from the start
            }
            let dead_letters = match &self.config.dead_letter_dir {
                Some(dir) => {
                    let capacity = self.config.dead_letter_capacity;
                    open_store(|| DeadLetterQueue::durable(capacity, dir), hint_in_use)
                        .instrument(span.clone())
                        .await?
                }
                None => DeadLetterQueue::new(self.config.dead_letter_capacity),
            };
            Ok::<_, NodeError>((spool, detector, dead_letters))
        }
        .await;
        let (spool, detector, dead_letters) = match stores {
            Ok(s) => s,
            Err(e) => {
                release_link(link, accept_stop).await;
                return Err(e);
            }
        };
        let handoff_on_down = self.config.handoff.as_ref().is_some_and(|h| h.on_down);
        let mut endpoint = Endpoint::new(origin, self.config.proto.clone(), dedup, seed);
        endpoint.set_authorization(self.config.authorization.clone());
        let shared = Arc::new(Shared {
            span,
            windows: Mutex::new(Default::default()),
            link_backlog: Arc::default(),
            receivers: Mutex::new(FxHashMap::default()),
            health: Mutex::new(watched.iter().map(|p| (*p, Health::Up)).collect()),
            health_tx: EventTx::new(256),
            down: tokio::sync::Notify::new(),
            conflict_tx: EventTx::new(64),
            versions: Mutex::new(FxHashMap::default()),
            window: self.config.proto.max_in_flight,
            max_payload: self.config.max_payload,
            decode_failed: AtomicU64::new(0),
            receivers_stopped: std::sync::atomic::AtomicBool::new(false),
            queued_for_receivers: Arc::default(),
            decode_warned: Mutex::new(None),
            no_receiver: AtomicU64::new(0),
            no_receiver_warned: Mutex::new(None),
            dead_letters: Arc::new(dead_letters),
            known: Mutex::new(watched.iter().copied().collect()),
            any_peer: self.config.allow_dynamic_peers || dials_by_id,
            fail_fast_down: self.config.fail_fast_when_down && !handoff_on_down,
            amo_fail_fast_down: self.config.fail_fast_when_down,
            state: watch::channel(NodeState::Running).0,
            #[cfg(feature = "metrics")]
            node: self.id,
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let liveness = Liveness::new(detector, self.config.heartbeat_interval, start);
        let mut core = Core::new(endpoint, liveness, spool, self.config.shutdown_drain);
        core.sends.amo_fails_on_down = shared.amo_fail_fast_down;
        let driver = Driver {
            core,
            link,
            burst: Vec::with_capacity(BURST + 1),
            commands: cmd_rx,
            observe: observe::Observer::new(self.id),
            receivers: Receivers::new(
                self.config.shutdown_handler_grace,
                shared.queued_for_receivers.clone(),
                Arc::new(Completions {
                    stack: CompletionStack::new(),
                    wake: tokio::sync::Notify::new(),
                    commands: cmd_tx.clone(),
                }),
            ),
            shared: shared.clone(),
            outbox: FxHashMap::default(),
            withdrawn: FxHashMap::default(),
            clock: start,
        };
        let end = super::supervise::EndGuard(shared.clone());
        let task = tokio::spawn(supervise(driver, shared.clone(), origin, end));
        Ok(Node {
            origin,
            tcp_stats,
            accept_stop,
            local_addr,
            commands: cmd_tx,
            shared,
            task: Mutex::new(Some(task)),
        })
    }
}

/// Closes a TCP node's listening socket at once (see `TcpTransport::accept_stop`).
type AcceptStop = Arc<tokio::sync::Notify>;

/// How long [`NodeBuilder::build`] keeps retrying a TCP bind whose address is in use.
pub const BIND_RETRY: Duration = Duration::from_secs(2);

async fn start_tcp(
    addr: SocketAddr,
    mut cfg: TcpConfig,
    peers: &[(NodeId, SocketAddr)],
    trust: TcpTrust,
    origin: Origin,
) -> Result<(Link, Arc<crate::transport::tcp::TcpStats>, AcceptStop), NodeError> {
    let give_up = tokio::time::Instant::now() + BIND_RETRY;
    if let Some(accept) = trust.accept_unknown_peers {
        cfg.accept_unknown_peers = accept;
    }
    loop {
        let mut transport =
            TcpTransport::new(addr, cfg.clone()).map_err(crate::ConfigError::Tcp)?;
        // Known before the first inbound connection can arrive (the node's AddPeer
        // commands follow, and also make the transport dial them).
        for (id, addr) in peers {
            transport = transport.with_peer(*id, *addr);
        }
        for id in &trust.allowed {
            transport = transport.allow_peer(*id);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &trust.tls {
            transport = transport.with_tls(tls.clone());
        }
        let stats = transport.stats();
        let stop = transport.accept_stop();
        transport.batch_frames();
        match Box::new(transport)
            .start(origin)
            .map(|link| (link, stats, stop))
        {
            Err(crate::transport::TransportError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Closes a transport started by a `build` that then failed, and waits (at most 2 s)
/// until it has: its listening socket is closed when this returns. (Regression: the
/// socket closed on its own a moment later, and a corrected node built at once on the
/// same address failed with `AddrInUse` under load.)
async fn release_link(mut link: Link, accept_stop: Option<AcceptStop>) {
    if let Some(stop) = accept_stop {
        stop.notify_one();
    }
    let _ = link.commands.try_send(LinkCommand::Shutdown);
    drop(link.commands);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while link.events.recv().await.is_some() {}
    })
    .await;
}

/// Why a store directory could not be claimed ([`claim_dir`]).
enum Claim {
    Other(NodeError),
    Io(std::io::Error),
}

/// Claims a durable store's directory for `node`, before the store opens it (its
/// recovery may truncate or quarantine files): a directory written by another node id
/// is refused. (Regression: a node
/// given another node's durable-dedup directory acked 20 of 30 messages it never
/// processed — their library-assigned ids, which name the sending run, channel and
/// seq, matched the other node's records — and one given another node's hint
/// directory replayed hints under ids it may not claim, which their target refused,
/// and deleted them.)
fn claim_dir(dir: &std::path::Path, node: NodeId) -> Result<(), Claim> {
    match crate::storage::claim_owner(dir, node.0) {
        Ok(None) => Ok(()),
        Ok(Some(owner)) => Err(Claim::Other(NodeError::DirectoryOfAnotherNode {
            dir: dir.to_path_buf(),
            owner: NodeId(owner),
            node,
        })),
        Err(e) => Err(Claim::Io(e)),
    }
}

/// How long `build` waits for a store directory held by a node that is stopping.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens a durable store, waiting up to [`STORE_WAIT`] while its directory is held by
/// a node that is stopping (one dropped a moment ago in this process releases it as
/// its task ends, which on a current-thread runtime needs this task to yield first).
/// A directory still held after that belongs to a live node: `in_use` is returned.
async fn open_store<T, E>(
    mut open: impl FnMut() -> Result<T, E>,
    in_use: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let give_up = tokio::time::Instant::now() + STORE_WAIT;
    loop {
        match open() {
            Err(e) if in_use(&e) && tokio::time::Instant::now() < give_up => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
}

/// The node's driver arms tokio timers, and the TCP transport registers sockets with
/// tokio's IO driver: on a runtime built without one, tokio panics at first use, in
/// the driver task (the node then dead from the start) or in `build` itself. Asked
/// here instead, so that it is a typed error. tokio has no query for a handle's
/// drivers: a timer and a socket are made as probes, and the panic a missing driver
/// raises is caught (its message still goes to the panic hook). (Regression: with
/// `enable_io()` only, `build()` returned `Ok` and every later call failed
/// `NodeError::Failed`; with `enable_time()` only, `build()` panicked.)
fn check_runtime_drivers(tcp: bool) -> Result<(), NodeError> {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let timer = catch_unwind(AssertUnwindSafe(|| {
        drop(tokio::time::sleep(Duration::ZERO));
    }));
    if timer.is_err() {
        return Err(NodeError::RuntimeDriver("timer"));
    }
    // A connected pair of local sockets registers with the IO driver and touches no
    // network. (Elsewhere the TCP transport's own registration is the check.)
    #[cfg(unix)]
    if tcp {
        let io = catch_unwind(AssertUnwindSafe(|| {
            tokio::net::UnixStream::pair().map(drop)
        }));
        if io.is_err() {
            return Err(NodeError::RuntimeDriver("IO"));
        }
    }
    #[cfg(not(unix))]
    let _ = tcp;
    Ok(())
}

/// Hints keep their message ids, but application keys are remembered only for
/// `dedup.horizon` (2 min by default) while a hint may replay up to the retry deadline
/// plus the hint TTL later (6 h by default): a keyed effectively-once message whose
/// first copy was processed and whose ack was lost is then processed again when its
/// hint replays. Sequence ids are covered (the retention is checked against the same
/// sum); keys are a memory trade-off, so this is a warning, not an error.
fn warn_short_key_horizon(config: &NodeConfig, node: NodeId) {
    let Some(h) = &config.handoff else {
        return;
    };
    let deadline = config.proto.retry.deadline.unwrap_or(Duration::ZERO);
    let late = deadline.saturating_add(h.store.default_ttl);
    if config.dedup.horizon < late {
        tracing::warn!(
            %node,
            horizon = ?config.dedup.horizon,
            latest_replay = ?late,
            "hinted handoff is on and dedup.horizon is shorter than the retry deadline plus the hint TTL: an effectively-once message sent under an IdKey and replayed from a hint after the horizon is taken for a new one by its receiver (processed again if its first copy was); raise dedup.horizon on the receivers, or shorten handoff.default_ttl, if keyed messages may be handed off"
        );
    }
}
