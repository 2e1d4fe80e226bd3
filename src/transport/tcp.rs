//! TCP transport: one connection per peer pair, handshake, batching writer, reconnect.
//!
//! Owns sockets and the tokio tasks around them: an accept loop, one dialer per
//! unconnected peer with a known address (exponential backoff + jitter), and per
//! connection a reader (a [`FrameDecoder`]) and a writer that drains the peer's queue
//! into few large writes. A manager task owns all per-peer state; the node talks to it
//! through the [`Link`]. Must not know about acks, retries or dedup: frames the
//! transport cannot deliver are dropped and counted, and the protocol above retransmits.
//!
//! # Connection rules
//!
//! - Both sides send a [`crate::wire::Handshake`] (and a version probe) first and
//!   agree on a protocol version from their [`TcpConfig::versions`] (see
//!   [`crate::wire::Negotiation`]) within [`TcpConfig::handshake_timeout`]; every later
//!   frame is encoded for that version. No common version, a different first frame,
//!   garbage, a dialed peer answering with another node id, or a connection to
//!   ourselves closes the connection, counted in [`TcpStats`] and logged at `warn`.
//! - Anyone may dial. If two connections exist for a pair, both sides keep the one
//!   dialed by the lower [`NodeId`] and close the other. A new connection from the same
//!   dialer, or from a new incarnation of the peer, replaces the old one. When both
//!   sides dial at once a side may briefly report `Down` then `Up` (same origin) while
//!   the duplicate is closed, and frames written on the losing connection are lost.
//! - [`LinkEvent::Up`] is emitted when a peer gets its first connection (and when a
//!   peer's incarnation changes, after a `Down`), [`LinkEvent::Down`] when its
//!   connection is lost. After a loss the transport redials (after a backoff) if it
//!   knows the peer's address.
//! - Frames for a peer go to a per-peer queue bounded by [`TcpConfig::queue_bound`]
//!   frames, kept across reconnects. When full, the oldest frames are dropped and
//!   counted (`frames_dropped_disconnected` or, while connected, `frames_dropped_backlog`).

use super::{Link, LinkCommand, LinkEvent, Transport, TransportError};
use crate::id::{NodeId, Origin};
use crate::rng::{seed_from_entropy, SplitMix64};
use crate::wire::{
    DecodeError, Frame, FrameDecoder, FrameEncoder, IncompatibleVersion, Negotiation,
    NegotiationError, NegotiationStep, UnsupportedRange, VersionRange, DEFAULT_MAX_FRAME_LEN,
};
use bytes::BytesMut;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// Settings of a [`TcpTransport`].
///
/// `Default`:
/// - `connect_timeout`: 3 s
/// - `handshake_timeout`: 5 s
/// - `backoff_min`: 50 ms, `backoff_max`: 5 s (redial delay doubles per failed
///   attempt between these bounds; each delay is drawn uniformly from its upper half)
/// - `max_frame_len`: 8 MiB ([`DEFAULT_MAX_FRAME_LEN`]), both directions
/// - `queue_bound`: 16 384 frames per peer
/// - `write_batch_bytes`: 64 KiB (the writer issues a write once this much is encoded,
///   or when the queue is empty)
/// - `channel_capacity`: 1 024 (command and event channels of the [`Link`])
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Give up one connect attempt after this long.
    pub connect_timeout: Duration,
    /// Close a connection whose peer has not completed the handshake after this long.
    pub handshake_timeout: Duration,
    /// First redial delay.
    pub backoff_min: Duration,
    /// Largest redial delay.
    pub backoff_max: Duration,
    /// Largest frame body accepted or sent.
    pub max_frame_len: usize,
    /// Frames queued per peer before the oldest are dropped.
    pub queue_bound: usize,
    /// Bytes the writer encodes before issuing one write.
    pub write_batch_bytes: usize,
    /// Capacity of the link's command and event channels.
    pub channel_capacity: usize,
    /// Protocol versions spoken; each connection uses the highest one both sides
    /// speak. Default: all this build speaks ([`VersionRange::SUPPORTED`]). Raise
    /// `min` after a rolling upgrade to stop speaking old versions.
    pub versions: VersionRange,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            queue_bound: 16_384,
            write_batch_bytes: 64 * 1024,
            channel_capacity: 1024,
            versions: VersionRange::SUPPORTED,
        }
    }
}

impl TcpConfig {
    /// Check the settings; see [`TcpConfigError`] for what is refused.
    pub fn validate(&self) -> Result<(), TcpConfigError> {
        let zero = |name, d: Duration| {
            if d.is_zero() {
                Err(TcpConfigError::Zero(name))
            } else {
                Ok(())
            }
        };
        zero("connect_timeout", self.connect_timeout)?;
        zero("handshake_timeout", self.handshake_timeout)?;
        zero("backoff_min", self.backoff_min)?;
        if self.backoff_max < self.backoff_min {
            return Err(TcpConfigError::BackoffRange {
                min: self.backoff_min,
                max: self.backoff_max,
            });
        }
        if self.max_frame_len < MIN_FRAME_LEN || self.max_frame_len > u32::MAX as usize {
            return Err(TcpConfigError::MaxFrameLen(self.max_frame_len));
        }
        for (name, v) in [
            ("queue_bound", self.queue_bound),
            ("write_batch_bytes", self.write_batch_bytes),
            ("channel_capacity", self.channel_capacity),
        ] {
            if v == 0 {
                return Err(TcpConfigError::Zero(name));
            }
        }
        self.versions.validate()?;
        Ok(())
    }
}

/// Smallest accepted `max_frame_len`: room for any header.
const MIN_FRAME_LEN: usize = 256;
/// Bound on the first frame of a connection (a handshake is ~30 bytes).
const HANDSHAKE_MAX_FRAME_LEN: usize = 1024;

/// An invalid [`TcpConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TcpConfigError {
    /// A duration or size that must be positive is zero. Set it.
    #[error("{0} must not be zero")]
    Zero(&'static str),
    /// `backoff_max < backoff_min`. Swap or fix them.
    #[error("backoff_max {max:?} is below backoff_min {min:?}")]
    BackoffRange {
        /// Given minimum.
        min: Duration,
        /// Given maximum.
        max: Duration,
    },
    /// `max_frame_len` is below 256 or above `u32::MAX`. Pick a value in range.
    #[error("max_frame_len {0} is outside 256..=u32::MAX")]
    MaxFrameLen(usize),
    /// `versions` names a protocol version this build does not speak, or is empty.
    #[error(transparent)]
    Versions(#[from] UnsupportedRange),
}

/// Live counters of a [`TcpTransport`]; read with [`TcpStats::snapshot`].
#[derive(Debug, Default)]
pub struct TcpStats {
    c: [AtomicU64; COUNTERS],
}

/// A copy of a [`TcpStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStatsSnapshot {
    /// Connections that completed the handshake and were kept.
    pub connections_opened: u64,
    /// Kept connections that were later closed (lost, replaced, or shut down).
    pub connections_closed: u64,
    /// Connections closed at once because the pair already had the preferred one.
    pub duplicate_connections_closed: u64,
    /// Connect attempts that failed or timed out.
    pub connect_failures: u64,
    /// Handshakes that failed for any reason (each also counted under one `rejected_*`).
    pub handshakes_failed: u64,
    /// Frames written to sockets.
    pub frames_sent: u64,
    /// Frames read from sockets and handed to the node (handshakes excluded).
    pub frames_received: u64,
    /// Streams closed for a checksum mismatch.
    pub rejected_bad_checksum: u64,
    /// Streams closed for a wrong format or protocol version.
    pub rejected_unsupported_version: u64,
    /// Streams closed for an oversized length prefix.
    pub rejected_too_large: u64,
    /// Streams closed for a malformed frame.
    pub rejected_malformed: u64,
    /// Streams closed for a frame out of place (data before the handshake, or a
    /// second handshake).
    pub rejected_unexpected_frame: u64,
    /// Handshakes not completed in time (or the peer closed before completing).
    pub rejected_handshake_timeout: u64,
    /// Handshakes naming an unexpected node (not the dialed one, or ourselves).
    pub rejected_wrong_peer: u64,
    /// Frames dropped because the peer's queue overflowed while it had no connection.
    pub frames_dropped_disconnected: u64,
    /// Frames dropped because the peer's queue overflowed while connected (slow peer).
    pub frames_dropped_backlog: u64,
    /// Frames dropped because they encode larger than `max_frame_len`.
    pub frames_dropped_oversize: u64,
}

impl TcpStats {
    /// Read every counter.
    pub fn snapshot(&self) -> TcpStatsSnapshot {
        let g = |c: Counter| self.c[c as usize].load(Ordering::Relaxed);
        TcpStatsSnapshot {
            connections_opened: g(Counter::ConnectionsOpened),
            connections_closed: g(Counter::ConnectionsClosed),
            duplicate_connections_closed: g(Counter::DuplicateConnectionsClosed),
            connect_failures: g(Counter::ConnectFailures),
            handshakes_failed: g(Counter::HandshakesFailed),
            frames_sent: g(Counter::FramesSent),
            frames_received: g(Counter::FramesReceived),
            rejected_bad_checksum: g(Counter::RejectedBadChecksum),
            rejected_unsupported_version: g(Counter::RejectedUnsupportedVersion),
            rejected_too_large: g(Counter::RejectedTooLarge),
            rejected_malformed: g(Counter::RejectedMalformed),
            rejected_unexpected_frame: g(Counter::RejectedUnexpectedFrame),
            rejected_handshake_timeout: g(Counter::RejectedHandshakeTimeout),
            rejected_wrong_peer: g(Counter::RejectedWrongPeer),
            frames_dropped_disconnected: g(Counter::FramesDroppedDisconnected),
            frames_dropped_backlog: g(Counter::FramesDroppedBacklog),
            frames_dropped_oversize: g(Counter::FramesDroppedOversize),
        }
    }

    fn add(&self, c: Counter, n: u64) {
        self.c[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    fn reject(&self, r: &Reject) {
        self.inc(match r {
            Reject::Decode(DecodeError::BadChecksum) => Counter::RejectedBadChecksum,
            Reject::Decode(DecodeError::UnsupportedVersion { .. }) => {
                Counter::RejectedUnsupportedVersion
            }
            Reject::Decode(DecodeError::TooLarge { .. }) => Counter::RejectedTooLarge,
            Reject::Decode(DecodeError::Malformed(_)) => Counter::RejectedMalformed,
            Reject::UnexpectedFrame => Counter::RejectedUnexpectedFrame,
            Reject::Incompatible(_) => Counter::RejectedUnsupportedVersion,
            Reject::Timeout | Reject::Closed => Counter::RejectedHandshakeTimeout,
            Reject::WrongPeer { .. } | Reject::SelfConnection => Counter::RejectedWrongPeer,
            Reject::Io(_) => return,
        });
    }
}

/// A TCP [`Transport`].
///
/// ```no_run
/// use ackwire::transport::tcp::{TcpConfig, TcpTransport};
/// use ackwire::transport::Transport;
/// use ackwire::{NodeId, Origin};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = TcpTransport::new("127.0.0.1:7000".parse()?, TcpConfig::default())?
///     .with_peer(NodeId(2), "127.0.0.1:7001".parse()?);
/// let stats = transport.stats();
/// let link = Box::new(transport).start(Origin::new_random(NodeId(1)))?;
/// # drop((link, stats)); Ok(()) }
/// ```
#[derive(Debug)]
pub struct TcpTransport {
    bind: SocketAddr,
    config: TcpConfig,
    peers: Vec<(NodeId, SocketAddr)>,
    stats: Arc<TcpStats>,
}

impl TcpTransport {
    /// A transport that will listen on `bind` (port 0 picks a free port; see
    /// [`Link::local_addr`]). Fails if `config` is invalid.
    pub fn new(bind: SocketAddr, config: TcpConfig) -> Result<Self, TcpConfigError> {
        config.validate()?;
        Ok(TcpTransport {
            bind,
            config,
            peers: Vec::new(),
            stats: Arc::default(),
        })
    }

    /// Know `peer`'s address from the start (same as [`LinkCommand::AddPeer`]).
    pub fn with_peer(mut self, peer: NodeId, addr: SocketAddr) -> Self {
        self.peers.push((peer, addr));
        self
    }

    /// The transport's counters; the handle stays valid after start and shutdown.
    pub fn stats(&self) -> Arc<TcpStats> {
        Arc::clone(&self.stats)
    }
}

impl Transport for TcpTransport {
    fn start(self: Box<Self>, local: Origin) -> Result<Link, TransportError> {
        let bind_err = |source| TransportError::Bind {
            addr: self.bind,
            source,
        };
        let std_listener = std::net::TcpListener::bind(self.bind).map_err(bind_err)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let local_addr = listener.local_addr()?;
        let cap = self.config.channel_capacity;
        let (cmd_tx, cmd_rx) = mpsc::channel(cap);
        let (events_tx, events_rx) = mpsc::channel(cap);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(Ctx {
            local,
            cfg: self.config,
            stats: self.stats,
            internal: internal_tx,
        });
        let acceptor = tokio::spawn(accept_loop(listener, Arc::clone(&ctx)));
        let mut mgr = Manager {
            ctx,
            events: events_tx,
            peers: HashMap::new(),
            next_conn_id: 0,
            acceptor,
        };
        for (peer, addr) in self.peers {
            mgr.add_peer(peer, addr);
        }
        tracing::info!(node = %local, %local_addr, "tcp: listening");
        tokio::spawn(mgr.run(cmd_rx, internal_rx));
        Ok(Link {
            commands: cmd_tx,
            events: events_rx,
            local_addr: Some(local_addr),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Internals

#[derive(Clone, Copy, Debug)]
enum Counter {
    ConnectionsOpened,
    ConnectionsClosed,
    DuplicateConnectionsClosed,
    ConnectFailures,
    HandshakesFailed,
    FramesSent,
    FramesReceived,
    RejectedBadChecksum,
    RejectedUnsupportedVersion,
    RejectedTooLarge,
    RejectedMalformed,
    RejectedUnexpectedFrame,
    RejectedHandshakeTimeout,
    RejectedWrongPeer,
    FramesDroppedDisconnected,
    FramesDroppedBacklog,
    FramesDroppedOversize,
}
const COUNTERS: usize = Counter::FramesDroppedOversize as usize + 1;

/// Why a connection was refused or closed.
#[derive(Debug, thiserror::Error)]
enum Reject {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("unexpected frame")]
    UnexpectedFrame,
    #[error("{0}")]
    Incompatible(IncompatibleVersion),
    #[error("handshake timed out")]
    Timeout,
    #[error("peer closed during handshake")]
    Closed,
    #[error("expected {expected}, peer says it is {got}")]
    WrongPeer { expected: NodeId, got: NodeId },
    #[error("connected to ourselves")]
    SelfConnection,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Read-only context shared by all tasks of one transport.
#[derive(Debug)]
struct Ctx {
    local: Origin,
    cfg: TcpConfig,
    stats: Arc<TcpStats>,
    internal: mpsc::UnboundedSender<Internal>,
}

/// Messages from connection tasks to the manager.
#[derive(Debug)]
enum Internal {
    Established(Established),
    Closed { peer: NodeId, conn_id: u64 },
}

#[derive(Debug)]
struct Established {
    origin: Origin,
    dialed_by: NodeId,
    stream: TcpStream,
    /// The negotiated protocol version.
    version: u16,
    /// Frames received during the negotiation, to hand on first.
    early: Vec<Frame>,
    /// Bytes read past the negotiation.
    buf: BytesMut,
    remote: SocketAddr,
}

/// A peer's outbound frames, shared by the manager (producer) and the current writer.
#[derive(Debug, Default)]
struct PeerQueue {
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    frames: VecDeque<Frame>,
    /// The connection whose writer may take frames. A writer of any other connection
    /// (one being torn down) stops instead of taking frames it could not deliver.
    owner: Option<u64>,
}

impl PeerQueue {
    fn set_owner(&self, owner: Option<u64>) {
        self.lock().owner = owner;
        // Wake a superseded writer so it notices and exits.
        self.notify.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Only plain pushes/swaps happen under the lock; a poisoned lock still holds a
        // consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Peer {
    addr: Option<SocketAddr>,
    queue: Arc<PeerQueue>,
    conn: Option<Conn>,
    dialer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    origin: Origin,
    dialed_by: NodeId,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Conn {
    fn abort(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

#[derive(Debug)]
struct Manager {
    ctx: Arc<Ctx>,
    events: mpsc::Sender<LinkEvent>,
    peers: HashMap<NodeId, Peer>,
    next_conn_id: u64,
    acceptor: JoinHandle<()>,
}

impl Manager {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<LinkCommand>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        loop {
            tokio::select! {
                biased;
                Some(msg) = internal.recv() => match msg {
                    Internal::Established(e) => self.established(e).await,
                    Internal::Closed { peer, conn_id } => self.closed(peer, conn_id).await,
                },
                cmd = commands.recv() => match cmd {
                    Some(LinkCommand::Send { peer, frames }) => self.send(peer, frames),
                    Some(LinkCommand::AddPeer { peer, addr }) => self.add_peer(peer, addr),
                    Some(LinkCommand::Shutdown) | None => break,
                },
            }
        }
        self.shutdown().await;
    }

    fn peer(&mut self, id: NodeId) -> &mut Peer {
        self.peers.entry(id).or_insert_with(|| Peer {
            addr: None,
            queue: Arc::default(),
            conn: None,
            dialer: None,
        })
    }

    fn send(&mut self, peer: NodeId, frames: Vec<Frame>) {
        let bound = self.ctx.cfg.queue_bound;
        let stats = Arc::clone(&self.ctx.stats);
        if peer == self.ctx.local.node {
            stats.add(Counter::FramesDroppedDisconnected, frames.len() as u64);
            tracing::warn!(%peer, "tcp: frames addressed to ourselves dropped");
            return;
        }
        let p = self.peer(peer);
        let connected = p.conn.is_some();
        let dropped = {
            let q = &mut p.queue.lock().frames;
            q.extend(frames);
            let over = q.len().saturating_sub(bound);
            q.drain(..over);
            over
        };
        p.queue.notify.notify_one();
        if dropped > 0 {
            let c = if connected {
                Counter::FramesDroppedBacklog
            } else {
                Counter::FramesDroppedDisconnected
            };
            stats.add(c, dropped as u64);
            tracing::debug!(%peer, dropped, connected, "tcp: peer queue full, oldest frames dropped");
        }
        if !connected {
            self.ensure_dialing(peer, false);
        }
    }

    fn add_peer(&mut self, peer: NodeId, addr: SocketAddr) {
        if peer == self.ctx.local.node {
            return;
        }
        let p = self.peer(peer);
        if p.addr != Some(addr) {
            p.addr = Some(addr);
            if let Some(d) = p.dialer.take() {
                d.abort();
            }
        }
        self.ensure_dialing(peer, false);
    }

    /// Start a dialer for `peer` if it has an address, no connection and no dialer.
    fn ensure_dialing(&mut self, peer: NodeId, after_backoff: bool) {
        let ctx = Arc::clone(&self.ctx);
        let p = self.peer(peer);
        let Some(addr) = p.addr else { return };
        if p.conn.is_some() || p.dialer.as_ref().is_some_and(|d| !d.is_finished()) {
            return;
        }
        p.dialer = Some(tokio::spawn(dial_loop(peer, addr, ctx, after_backoff)));
    }

    async fn established(&mut self, e: Established) {
        let peer = e.origin.node;
        let local = self.ctx.local.node;
        let stats = Arc::clone(&self.ctx.stats);
        let p = self.peer(peer);
        if let Some(d) = p.dialer.take() {
            d.abort();
        }
        let mut restarted = false;
        let had_conn = p.conn.is_some();
        if let Some(cur) = &p.conn {
            let keep_new = if cur.origin != e.origin {
                restarted = true;
                true
            } else if cur.dialed_by == e.dialed_by {
                true
            } else {
                e.dialed_by == local.min(peer)
            };
            stats.inc(Counter::DuplicateConnectionsClosed);
            if !keep_new {
                tracing::debug!(%peer, remote = %e.remote, "tcp: duplicate connection closed, keeping the one dialed by the lower id");
                return; // dropping e.stream closes it
            }
            if let Some(old) = p.conn.take() {
                p.queue.set_owner(None);
                old.abort();
                stats.inc(Counter::ConnectionsClosed);
            }
            tracing::debug!(%peer, remote = %e.remote, "tcp: connection replaced");
            if restarted {
                let _ = self.events.send(LinkEvent::Down { peer }).await;
            }
        }
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        if !had_conn || restarted {
            // Before the reader starts, so Up precedes the connection's frames.
            let _ = self
                .events
                .send(LinkEvent::Up {
                    origin: e.origin,
                    version: e.version,
                })
                .await;
        }
        let _ = e.stream.set_nodelay(true);
        let (rd, wr) = e.stream.into_split();
        let events = self.events.clone();
        let ctx = Arc::clone(&self.ctx);
        let p = self.peer(peer);
        let conn = ConnInfo {
            peer,
            id,
            version: e.version,
        };
        let reader = tokio::spawn(read_loop(
            rd,
            e.early,
            e.buf,
            conn,
            events,
            Arc::clone(&ctx),
        ));
        p.queue.set_owner(Some(id));
        let writer = tokio::spawn(write_loop(wr, Arc::clone(&p.queue), conn, ctx));
        p.conn = Some(Conn {
            id,
            origin: e.origin,
            dialed_by: e.dialed_by,
            reader,
            writer,
        });
        stats.inc(Counter::ConnectionsOpened);
        tracing::info!(peer = %e.origin, remote = %e.remote, dialed_by = %e.dialed_by, version = e.version, "tcp: connected");
    }

    async fn closed(&mut self, peer: NodeId, conn_id: u64) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.conn.as_ref().is_none_or(|c| c.id != conn_id) {
            return; // an already replaced connection
        }
        if let Some(c) = p.conn.take() {
            p.queue.set_owner(None);
            c.abort();
        }
        self.ctx.stats.inc(Counter::ConnectionsClosed);
        tracing::info!(%peer, "tcp: disconnected");
        let _ = self.events.send(LinkEvent::Down { peer }).await;
        self.ensure_dialing(peer, true);
    }

    async fn shutdown(mut self) {
        self.acceptor.abort();
        let _ = (&mut self.acceptor).await;
        for (_, p) in self.peers.drain() {
            if let Some(d) = p.dialer {
                d.abort();
                let _ = d.await;
            }
            if let Some(c) = p.conn {
                c.abort();
                let _ = c.reader.await;
                let _ = c.writer.await;
                self.ctx.stats.inc(Counter::ConnectionsClosed);
            }
        }
        tracing::info!(node = %self.ctx.local, "tcp: shut down");
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((mut stream, remote)) => {
                    let ctx = Arc::clone(&ctx);
                    handshakes.spawn(async move {
                        match handshake(&mut stream, &ctx, None).await {
                            Ok(hs) => {
                                let _ = ctx.internal.send(Internal::Established(Established {
                                    origin: hs.origin,
                                    dialed_by: hs.origin.node,
                                    stream,
                                    version: hs.version,
                                    early: hs.early,
                                    buf: hs.buf,
                                    remote,
                                }));
                            }
                            Err(r) => handshake_failed(&ctx, &r, remote, None),
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "tcp: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
}

fn handshake_failed(ctx: &Ctx, r: &Reject, remote: SocketAddr, peer: Option<NodeId>) {
    ctx.stats.inc(Counter::HandshakesFailed);
    ctx.stats.reject(r);
    match r {
        Reject::Incompatible(v) => tracing::warn!(
            %remote, ?peer, ours = %v.ours, theirs = %v.theirs,
            "tcp: no common protocol version, connection closed"
        ),
        _ => {
            tracing::warn!(%remote, ?peer, reason = %r, "tcp: handshake failed, connection closed")
        }
    }
}

/// A completed handshake.
#[derive(Debug)]
struct Handshaken {
    origin: Origin,
    version: u16,
    early: Vec<Frame>,
    /// Bytes read past the negotiation (encoded for `version`).
    buf: BytesMut,
}

/// Bytes a peer may send before the version is agreed: a handshake, a probe, and
/// whatever backlog a version-1 peer sends before it answers the probe. Bounded, so a
/// peer that is not even up cannot make us hold more.
const MAX_EARLY_BYTES: usize = 16 << 20;

/// Exchange handshakes and agree on a protocol version.
async fn handshake(
    stream: &mut TcpStream,
    ctx: &Ctx,
    expected: Option<NodeId>,
) -> Result<Handshaken, Reject> {
    let exchange = async {
        let mut negotiation = Negotiation::new(ctx.local, ctx.cfg.versions);
        let mut out = BytesMut::new();
        let enc = FrameEncoder::default().with_version(1);
        for frame in negotiation.opening() {
            enc.encode(&frame, &mut out)
                .map_err(|_| Reject::UnexpectedFrame)?;
        }
        stream.write_all(&out).await?;
        // The handshake frame is small; frames a version-1 peer sends before it answers
        // the probe may be as large as any frame.
        let mut dec = FrameDecoder::new(HANDSHAKE_MAX_FRAME_LEN).with_version(1);
        let mut buf = BytesMut::with_capacity(256);
        let mut read = 0usize;
        loop {
            match dec.decode(&mut buf)? {
                Some(frame) => {
                    dec = FrameDecoder::new(ctx.cfg.max_frame_len).with_version(1);
                    match negotiation.on_frame(frame) {
                        Ok(NegotiationStep::NeedFrame) => {}
                        Ok(NegotiationStep::Done {
                            origin,
                            version,
                            early,
                        }) => {
                            return Ok(Handshaken {
                                origin,
                                version,
                                early,
                                buf,
                            })
                        }
                        Err(NegotiationError::Incompatible(v)) => {
                            return Err(Reject::Incompatible(v))
                        }
                        Err(_) => return Err(Reject::UnexpectedFrame),
                    }
                }
                None => {
                    let n = stream.read_buf(&mut buf).await?;
                    if n == 0 {
                        return Err(match negotiation.on_closed() {
                            Some(v) => Reject::Incompatible(v),
                            None => Reject::Closed,
                        });
                    }
                    read += n;
                    if read > MAX_EARLY_BYTES {
                        return Err(Reject::UnexpectedFrame);
                    }
                }
            }
        }
    };
    let hs = tokio::time::timeout(ctx.cfg.handshake_timeout, exchange)
        .await
        .map_err(|_| Reject::Timeout)??;
    let origin = hs.origin;
    if origin.node == ctx.local.node {
        return Err(Reject::SelfConnection);
    }
    if let Some(expected) = expected {
        if origin.node != expected {
            return Err(Reject::WrongPeer {
                expected,
                got: origin.node,
            });
        }
    }
    Ok(hs)
}

/// Redial delay before attempt `attempt` (0-based): `min * 2^attempt` capped at `max`,
/// drawn uniformly from its upper half.
fn backoff(cfg: &TcpConfig, attempt: u32, rng: &mut SplitMix64) -> Duration {
    let exp = cfg
        .backoff_min
        .saturating_mul(1u32 << attempt.min(20))
        .min(cfg.backoff_max);
    let half = exp / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rng.range_u64(0, nanos))
}

/// A failed dial of a configured peer: warn on the first failure and then at most every
/// [`CONNECT_WARN_EVERY`] per peer (with the attempt count), debug otherwise.
fn connect_failed(
    peer: NodeId,
    addr: SocketAddr,
    attempt: u32,
    error: &dyn std::fmt::Display,
    warned: &mut Option<tokio::time::Instant>,
) {
    let now = tokio::time::Instant::now();
    if warned.is_none_or(|t| now.duration_since(t) >= CONNECT_WARN_EVERY) {
        *warned = Some(now);
        tracing::warn!(%peer, %addr, attempts = attempt + 1, %error, "tcp: cannot connect to peer; retrying with backoff");
    } else {
        tracing::debug!(%peer, %addr, attempt, %error, "tcp: connect failed");
    }
}

/// Least time between two warn lines about one peer's failed dials.
const CONNECT_WARN_EVERY: Duration = Duration::from_secs(30);

async fn dial_loop(peer: NodeId, addr: SocketAddr, ctx: Arc<Ctx>, after_backoff: bool) {
    let mut rng = SplitMix64::new(seed_from_entropy());
    let mut attempt = 0u32;
    let mut warned: Option<tokio::time::Instant> = None;
    if after_backoff {
        tokio::time::sleep(backoff(&ctx.cfg, 0, &mut rng)).await;
    }
    loop {
        tracing::debug!(%peer, %addr, attempt, "tcp: dialing");
        match tokio::time::timeout(ctx.cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(mut stream)) => match handshake(&mut stream, &ctx, Some(peer)).await {
                Ok(hs) => {
                    let _ = ctx.internal.send(Internal::Established(Established {
                        origin: hs.origin,
                        dialed_by: ctx.local.node,
                        stream,
                        version: hs.version,
                        early: hs.early,
                        buf: hs.buf,
                        remote: addr,
                    }));
                    return;
                }
                Err(r) => handshake_failed(&ctx, &r, addr, Some(peer)),
            },
            Ok(Err(e)) => {
                ctx.stats.inc(Counter::ConnectFailures);
                connect_failed(peer, addr, attempt, &e, &mut warned);
            }
            Err(_) => {
                ctx.stats.inc(Counter::ConnectFailures);
                connect_failed(peer, addr, attempt, &"timed out", &mut warned);
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(backoff(&ctx.cfg, attempt, &mut rng)).await;
    }
}

/// Which connection a reader or writer serves.
#[derive(Clone, Copy, Debug)]
struct ConnInfo {
    peer: NodeId,
    id: u64,
    /// Negotiated protocol version.
    version: u16,
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    early: Vec<Frame>,
    mut buf: BytesMut,
    conn: ConnInfo,
    events: mpsc::Sender<LinkEvent>,
    ctx: Arc<Ctx>,
) {
    let ConnInfo {
        peer,
        id: conn_id,
        version,
    } = conn;
    let mut dec = FrameDecoder::new(ctx.cfg.max_frame_len).with_version(version);
    for frame in early {
        ctx.stats.inc(Counter::FramesReceived);
        if events.send(LinkEvent::Frame { peer, frame }).await.is_err() {
            return;
        }
    }
    let reason: Option<Reject> = 'conn: loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(Frame::Handshake(_))) => break 'conn Some(Reject::UnexpectedFrame),
                Ok(Some(frame)) => {
                    ctx.stats.inc(Counter::FramesReceived);
                    if events.send(LinkEvent::Frame { peer, frame }).await.is_err() {
                        break 'conn None; // the node is gone
                    }
                }
                Ok(None) => break,
                Err(e) => break 'conn Some(Reject::Decode(e)),
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => break Some(Reject::Io(e)),
        }
    };
    match &reason {
        Some(Reject::Io(e)) => tracing::debug!(%peer, error = %e, "tcp: read failed"),
        Some(r) => {
            ctx.stats.reject(r);
            tracing::warn!(%peer, reason = %r, "tcp: bad input, connection closed");
        }
        None => tracing::debug!(%peer, "tcp: peer closed the connection"),
    }
    let _ = ctx.internal.send(Internal::Closed { peer, conn_id });
}

async fn write_loop(mut wr: OwnedWriteHalf, queue: Arc<PeerQueue>, conn: ConnInfo, ctx: Arc<Ctx>) {
    let ConnInfo {
        peer,
        id: conn_id,
        version,
    } = conn;
    let enc = FrameEncoder::new(ctx.cfg.max_frame_len).with_version(version);
    let batch_bytes = ctx.cfg.write_batch_bytes;
    let mut local: VecDeque<Frame> = VecDeque::new();
    let mut buf = BytesMut::with_capacity(batch_bytes.min(1 << 20));
    let result: std::io::Result<()> = async {
        loop {
            let notified = queue.notify.notified();
            {
                let mut q = queue.lock();
                if q.owner != Some(conn_id) {
                    return Ok(()); // superseded: leave the frames to the next connection
                }
                std::mem::swap(&mut q.frames, &mut local);
            }
            if local.is_empty() {
                notified.await;
                continue;
            }
            let mut n = 0u64;
            while let Some(frame) = local.pop_front() {
                match enc.encode(&frame, &mut buf) {
                    Ok(()) => n += 1,
                    Err(e) => {
                        ctx.stats.inc(Counter::FramesDroppedOversize);
                        tracing::warn!(%peer, error = %e, "tcp: frame not sent");
                    }
                }
                if buf.len() >= batch_bytes {
                    wr.write_all(&buf).await?;
                    buf.clear();
                    ctx.stats.add(Counter::FramesSent, n);
                    n = 0;
                }
            }
            if !buf.is_empty() {
                wr.write_all(&buf).await?;
                buf.clear();
                ctx.stats.add(Counter::FramesSent, n);
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "tcp: write failed");
    }
    let _ = ctx.internal.send(Internal::Closed { peer, conn_id });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_bad_ones_are_refused() {
        assert_eq!(TcpConfig::default().validate(), Ok(()));
        let bad = TcpConfig {
            backoff_max: Duration::from_millis(1),
            ..TcpConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(TcpConfigError::BackoffRange { .. })
        ));
        let bad = TcpConfig {
            queue_bound: 0,
            ..TcpConfig::default()
        };
        assert_eq!(bad.validate(), Err(TcpConfigError::Zero("queue_bound")));
        let bad = TcpConfig {
            max_frame_len: 10,
            ..TcpConfig::default()
        };
        assert_eq!(bad.validate(), Err(TcpConfigError::MaxFrameLen(10)));
    }

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let cfg = TcpConfig::default();
        let mut rng = SplitMix64::new(1);
        for attempt in 0..40 {
            let exp = (cfg.backoff_min * 2u32.pow(attempt.min(20))).min(cfg.backoff_max);
            let d = backoff(&cfg, attempt, &mut rng);
            assert!(
                d >= exp / 2 && d <= exp,
                "attempt {attempt}: {d:?} vs {exp:?}"
            );
        }
    }
}
