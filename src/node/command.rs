//! What the application's handles ask of the driver: one [`Command`] per call, on
//! the node's command channel, with the channel the answer comes back on.

use super::{
    AckError, ChannelOptions, Delivery, NodeError, Outcome, ReceiverOptions, SendError, Stats,
};
use crate::id::{ChannelId, IdKey, NodeId};
use crate::proto::{Completion, DeliveryRef};
use bytes::Bytes;
use std::net::SocketAddr;
use tokio::sync::{mpsc, oneshot};

/// Where a receipt waits for its outcome.
pub(super) type ReceiptReply = oneshot::Sender<Result<Outcome, SendError>>;

/// Where an `ack_durable` caller waits for its answer.
pub(super) type AckReply = oneshot::Sender<Result<(), AckError>>;

#[derive(Debug)]
pub(super) enum Command {
    Send {
        peer: NodeId,
        options: ChannelOptions,
        payload: Bytes,
        key: Option<IdKey>,
        schema: u32,
        reply: oneshot::Sender<Result<Outcome, SendError>>,
    },
    /// Several messages of one sender, each holding one window permit.
    SendBatch {
        peer: NodeId,
        options: ChannelOptions,
        schema: u32,
        items: Vec<(Bytes, Option<IdKey>, ReceiptReply)>,
    },
    Complete {
        delivery: DeliveryRef,
        how: Completion,
        /// `ack_durable`: resolved once the completion is persisted and its ack sent.
        done: Option<oneshot::Sender<Result<(), AckError>>>,
    },
    Register {
        channel: ChannelId,
        options: ReceiverOptions,
        schema: u32,
        tx: mpsc::UnboundedSender<Delivery<Bytes>>,
    },
    /// A delivery the typed receiver could not decode: to the dead letters, and
    /// rejected to its sender.
    Undecodable {
        delivery: DeliveryRef,
        payload: Bytes,
    },
    AddPeer {
        peer: NodeId,
        addr: SocketAddr,
    },
    Stats(oneshot::Sender<Stats>),
    /// Graceful shutdown: stop taking sends, drain, spool, stop.
    Drain,
    Decommission {
        peer: NodeId,
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    Shutdown,
}
