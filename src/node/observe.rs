//! What the driver keeps per in-flight message for observability, and the
//! per-message trace events it cannot emit in one line.
//!
//! Owns [`PendingReceipt`] (a receipt's reply plus, with the `metrics` feature, its
//! send instant) and the trace of transmitted data frames. Decides nothing about the
//! protocol. Per-message events use the target [`MESSAGE_TARGET`] at `trace` level
//! only (see the README's "Observability" section for the whole table).

use super::{Outcome, ReceiptReply, SendError};
use crate::id::{MessageId, Origin};
use crate::proto::SendRef;
use crate::wire::Frame;

/// The `tracing` target of every per-message event (always at `trace` level).
pub(super) const MESSAGE_TARGET: &str = "ackwire::message";

/// A sent message's receipt, waiting for its outcome in the driver's receipts map.
#[derive(Debug)]
pub(super) struct PendingReceipt {
    reply: ReceiptReply,
    /// Transmitted at least once (kept only while per-message tracing is on: tells a
    /// first transmission from a retransmission).
    transmitted: bool,
    /// When `send` accepted it, and its place in the in-flight gauge.
    #[cfg(feature = "metrics")]
    pub(super) tracked: super::metrics::Tracked,
}

impl PendingReceipt {
    pub(super) fn new(
        reply: ReceiptReply,
        #[cfg(feature = "metrics")] tracked: super::metrics::Tracked,
    ) -> Self {
        PendingReceipt {
            reply,
            transmitted: false,
            #[cfg(feature = "metrics")]
            tracked,
        }
    }

    /// Resolve the receipt (as `oneshot::Sender::send`).
    pub(super) fn send(
        self,
        outcome: Result<Outcome, SendError>,
    ) -> Result<(), Result<Outcome, SendError>> {
        self.reply.send(outcome)
    }
}

/// The id of a message `send` accepted as `r`: its key, or its library-assigned id.
pub(super) fn sent_id(origin: Origin, r: SendRef, key: Option<crate::id::IdKey>) -> MessageId {
    key.map_or(
        MessageId::Seq {
            origin,
            channel: r.channel,
            seq: r.seq,
        },
        MessageId::Key,
    )
}

/// Trace each data frame about to go to `peer`: a first transmission, a
/// retransmission, or a replayed hint (no receipt of this run waits for it).
pub(super) fn trace_transmits<'a>(
    origin: Origin,
    peer: crate::id::NodeId,
    frames: impl Iterator<Item = &'a Frame>,
    receipts: &mut rustc_hash::FxHashMap<SendRef, (crate::id::Guarantee, PendingReceipt)>,
) {
    for frame in frames {
        let Frame::Data(d) = frame else { continue };
        let id = d.id.unwrap_or(MessageId::Seq {
            origin,
            channel: d.channel,
            seq: d.seq,
        });
        let send = SendRef {
            peer,
            channel: d.channel,
            seq: d.seq,
        };
        match receipts.get_mut(&send) {
            Some((_, r)) if r.transmitted => {
                tracing::trace!(target: MESSAGE_TARGET, %id, %peer, channel = d.channel.0, seq = d.seq, "retransmit")
            }
            Some((_, r)) => {
                r.transmitted = true;
                tracing::trace!(target: MESSAGE_TARGET, %id, %peer, channel = d.channel.0, seq = d.seq, "transmit")
            }
            None => {
                tracing::trace!(target: MESSAGE_TARGET, %id, %peer, channel = d.channel.0, seq = d.seq, "transmit (replayed hint or settled)")
            }
        }
    }
}
