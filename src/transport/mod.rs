//! Moving frames between nodes.
//!
//! A [`Transport`] is started once by the node and hands back a [`Link`]: a command
//! channel to send frames (and learn peer addresses) and an event channel that yields
//! frames and connection changes. Transports own sockets, connections, reconnects and
//! the handshake; they know nothing of acks, retries or dedup.
//!
//! Two implementations: [`tcp`] (real, tokio) and [`mem`] (in-process, with a seeded
//! [`mem::FaultPlan`] for tests and demos).

use crate::id::{ChannelId, NodeId, Origin};
use crate::wire::Frame;
use std::net::SocketAddr;
use tokio::sync::mpsc;

pub mod mem;
pub mod tcp;
#[cfg(feature = "tls")]
pub mod tls;

/// Something that moves frames between this node and its peers.
pub trait Transport: Send + 'static {
    /// Start the transport for the local node run `local`. Called once, from within a
    /// tokio runtime.
    fn start(self: Box<Self>, local: Origin) -> Result<Link, TransportError>;

    /// Whether the transport reaches any node id by itself, without an address from
    /// the node (the in-memory network does). A node on such a transport treats every
    /// id as a known peer (see `NodeConfig::allow_dynamic_peers`). Default `false`.
    fn dials_by_id(&self) -> bool {
        false
    }

    /// Asks the transport to report the frames of one read as one
    /// [`LinkEvent::Frames`] instead of one [`LinkEvent::Frame`] each (a node asks
    /// this of every transport it starts: one channel message per read instead of
    /// per frame). Called before [`start`](Self::start). A transport may ignore it
    /// (the default does): a node handles both events.
    fn batch_frames(&mut self) {}

    /// Tells the transport that the node pings every peer this often (a node calls it
    /// before [`start`](Self::start)), so a transport that closes idle connections
    /// keeps them for at least a few intervals. Default: ignored.
    fn heartbeat_interval(&mut self, _every: std::time::Duration) {}

    /// The largest frame body the transport carries, if it has a limit. A node checks
    /// `NodeConfig::max_payload` against it when it is built (a payload over it could
    /// never be sent) and drops hints over it from its store. Default `None`.
    fn max_frame_len(&self) -> Option<usize> {
        None
    }
}

/// A started transport: commands in, events out.
#[derive(Debug)]
pub struct Link {
    /// Commands to the transport. Bounded: a full queue is backpressure.
    pub commands: mpsc::Sender<LinkCommand>,
    /// Events from the transport. `None` once the transport has shut down.
    pub events: mpsc::Receiver<LinkEvent>,
    /// Address the transport listens on, if it listens on one.
    pub local_addr: Option<SocketAddr>,
}

/// What the node asks of a transport.
#[derive(Debug)]
#[non_exhaustive]
pub enum LinkCommand {
    /// Deliver `frames`, in order, to `peer`. If there is no connection the transport
    /// connects (or waits for one) and may drop frames it cannot deliver; the protocol
    /// above retransmits what matters.
    Send {
        /// Destination node.
        peer: NodeId,
        /// Frames to send, in order.
        frames: Vec<Frame>,
    },
    /// Learn (or change) where `peer` can be reached. Transports without addresses
    /// ignore it.
    AddPeer {
        /// The peer.
        peer: NodeId,
        /// Its address.
        addr: SocketAddr,
    },
    /// Drop the data frames of these messages (`(channel, seq)` on `peer`'s streams)
    /// if they are still waiting to be written: their sender took them back (handed
    /// off, given up, abandoned), so they must not reach `peer` later. Frames already
    /// written are not recalled. Transports that keep no frames for later ignore it.
    Withdraw {
        /// The peer the messages were for.
        peer: NodeId,
        /// The messages' channels and sequence numbers.
        messages: Vec<(ChannelId, u64)>,
    },
    /// `peer` is gone for good (`Node::decommission`): forget its address, stop dialing
    /// it and drop what is queued for it; a connection it holds now is kept until it
    /// closes, and it is not redialed then. A later `AddPeer` adds it again, and it may
    /// still connect on its own. Transports without addresses ignore it.
    RemovePeer {
        /// The peer.
        peer: NodeId,
    },
    /// Close every connection and stop.
    Shutdown,
}

/// What a transport reports to the node.
#[derive(Debug)]
pub enum LinkEvent {
    /// A connection to `peer` completed its handshake. `origin` carries the peer's
    /// current incarnation: a changed incarnation means the peer restarted.
    Up {
        /// The peer's run.
        origin: Origin,
        /// The protocol version the connection negotiated (what the peer understands:
        /// see [`crate::wire::VersionRange`]).
        version: u16,
    },
    /// A frame arrived from `peer` (never a handshake: transports consume those).
    Frame {
        /// Sender of the frame.
        peer: NodeId,
        /// The sending run's incarnation ([`Origin::incarnation`]), as the handshake of
        /// the connection that carried the frame proved it. A frame of an earlier run
        /// can arrive after a later run's [`LinkEvent::Up`] (it was in flight, or
        /// queued behind a slow node); the node drops it instead of taking it for the
        /// later run's.
        incarnation: u64,
        /// The frame.
        frame: Frame,
    },
    /// Several frames from `peer`, in arrival order, only from a transport that was
    /// asked to [`Transport::batch_frames`] (never empty; never a handshake; the TCP
    /// transport puts at most 64 in one event).
    Frames {
        /// Sender of the frames.
        peer: NodeId,
        /// As [`LinkEvent::Frame::incarnation`]: the run whose connection carried them.
        incarnation: u64,
        /// The frames, oldest first.
        frames: Vec<Frame>,
    },
    /// A connection claiming `refused.node` was refused because another incarnation of
    /// that node, `live`, holds a live connection: two processes run with one `NodeId`.
    Conflict {
        /// The incarnation whose connection stays.
        live: Origin,
        /// The incarnation that was refused.
        refused: Origin,
    },
    /// The connection to `peer` was lost or closed.
    Down {
        /// The peer.
        peer: NodeId,
    },
}

/// Errors starting or running a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Binding the listen address failed. Check the address and that it is free.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address that was asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The node id is already registered on this in-memory network. Use distinct ids.
    #[error("node {0} is already attached to this network")]
    DuplicateNode(NodeId),
    /// Any other IO error.
    #[error("transport io: {0}")]
    Io(#[from] std::io::Error),
}
