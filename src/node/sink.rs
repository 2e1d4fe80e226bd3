//! Senders as `futures::Sink`s: [`SendSink`] (typed) and [`RawSendSink`] (bytes).
//!
//! Owns the sink bookkeeping only: reserving a window slot before an item is accepted
//! ([`WindowSlot`], shared with the tower service), and keeping the receipts of sent
//! items so `poll_flush` can wait for them and report the first failure. Sending itself
//! is [`RawSender`]'s (`check` and `enqueue`), so a sink's message goes exactly the way
//! `send` would send it.

use super::handles::encode_with;
use super::{Outcome, RawSender, Receipt, SendError, Sender};
use crate::codec::{Bincode, Encode};
use bytes::Bytes;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};

/// A [`Sender`] as a `futures::Sink<T>`: made by [`Sender::sink`].
///
/// Backpressured by the stream's in-flight window: `poll_ready` is pending while the
/// window is full, exactly when [`Sender::send`] would wait, and as there, a target the
/// failure detector turns Down meanwhile ends the wait (unless
/// [`NodeConfig::fail_fast_when_down`](crate::NodeConfig) is off): `poll_ready` is then
/// ready and the next item fails in `start_send` with [`SendError::PeerDown`] (unless
/// the target is up again with room in the window by then: the item is sent).
///
/// Every accepted item's [`Receipt`] is kept: `poll_flush` (and so `SinkExt::flush`,
/// `send`, `send_all`, `close`) resolves once every item sent so far has settled, and
/// fails with the first failure among them (in send order). A failure noticed earlier,
/// while the oldest receipts are reaped in `poll_ready`, is returned from `poll_ready`
/// at once, so a
/// pipeline stops at the first lost message instead of running on.
///
/// Each failure is reported once; failures that happen between two reports are counted
/// in [`failed`](Self::failed) and only the first is returned. An error from
/// `start_send` (the item was not sent: [`SendError::TooLarge`],
/// [`SendError::PeerDown`], an encoding error) concerns that item only; the sink stays
/// usable.
///
/// ```no_run
/// use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId};
/// use futures::{stream, SinkExt, StreamExt};
/// # async fn demo(node: Node) -> Result<(), ackwire::SendError> {
/// let out = node
///     .sender::<u64>(NodeId(2), ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce))
///     .unwrap();
/// let mut sink = out.sink();
/// // Waits whenever the window is full; fails if any message fails.
/// sink.send_all(&mut stream::iter(0..10_000u64).map(Ok)).await?;
/// sink.close().await?; // every message acknowledged
/// assert_eq!(sink.settled(), 10_000);
/// # Ok(()) }
/// ```
pub struct SendSink<T, C = Bincode> {
    raw: RawSendSink,
    codec: C,
    _t: PhantomData<fn(T)>,
}

/// A [`RawSender`] as a `futures::Sink<Bytes>`: made by [`RawSender::sink`]. Same
/// rules as [`SendSink`].
pub struct RawSendSink {
    sender: RawSender,
    slot: WindowSlot,
    receipts: VecDeque<Receipt>,
    error: Option<SendError>,
    settled: u64,
    failed: u64,
}

impl<T, C: Encode<T>> Sender<T, C> {
    /// A `futures::Sink<T>` sending on this sender's channel (with its codec); see
    /// [`SendSink`].
    pub fn sink(&self) -> SendSink<T, C> {
        SendSink {
            raw: self.raw.sink(),
            codec: self.codec.clone(),
            _t: PhantomData,
        }
    }
}

impl RawSender {
    /// A `futures::Sink<Bytes>` sending on this sender's channel; see [`RawSendSink`].
    pub fn sink(&self) -> RawSendSink {
        RawSendSink {
            sender: self.clone(),
            slot: WindowSlot::default(),
            receipts: VecDeque::new(),
            error: None,
            settled: 0,
            failed: 0,
        }
    }
}

impl<T, C> SendSink<T, C> {
    /// Items accepted whose receipt has been seen to settle (`Ok` or failed).
    pub fn settled(&self) -> u64 {
        self.raw.settled
    }

    /// Items whose receipt failed (each counted, whether or not it was reported).
    pub fn failed(&self) -> u64 {
        self.raw.failed
    }

    /// Items accepted whose receipt has not been seen to settle yet.
    pub fn outstanding(&self) -> usize {
        self.raw.receipts.len()
    }
}

impl RawSendSink {
    /// Items accepted whose receipt has been seen to settle (`Ok` or failed).
    pub fn settled(&self) -> u64 {
        self.settled
    }

    /// Items whose receipt failed (each counted, whether or not it was reported).
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Items accepted whose receipt has not been seen to settle yet.
    pub fn outstanding(&self) -> usize {
        self.receipts.len()
    }

    /// Records one settled receipt.
    fn settle(&mut self, result: Result<Outcome, SendError>) {
        self.settled += 1;
        if let Err(e) = result {
            self.failed += 1;
            self.error.get_or_insert(e);
        }
    }

    /// Reaps the oldest receipts while they are settled (cheap: acks mostly arrive in
    /// send order), so a long pipeline that never flushes keeps no settled receipts.
    /// Leaves `cx` registered with the oldest unsettled receipt.
    fn reap_front(&mut self, cx: &mut Context<'_>) {
        while let Some(front) = self.receipts.front_mut() {
            match Pin::new(front).poll(cx) {
                Poll::Ready(result) => {
                    self.receipts.pop_front();
                    self.settle(result);
                }
                Poll::Pending => break,
            }
        }
    }

    fn take_error(&mut self) -> Result<(), SendError> {
        self.error.take().map_or(Ok(()), Err)
    }
}

impl futures_sink::Sink<Bytes> for RawSendSink {
    type Error = SendError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let this = self.get_mut();
        this.reap_front(cx);
        this.take_error()?;
        this.slot.poll_reserve(&this.sender, cx)
    }

    fn start_send(self: Pin<&mut Self>, payload: Bytes) -> Result<(), SendError> {
        let this = self.get_mut();
        let receipt = this.slot.send(&this.sender, payload)?;
        this.receipts.push_back(receipt);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        // Oldest first, waiting on the oldest unsettled one: amortised O(1) per item (a
        // stream's receipts settle mostly in send order), and failures are met in send
        // order.
        let this = self.get_mut();
        this.reap_front(cx);
        if this.receipts.is_empty() {
            Poll::Ready(this.take_error())
        } else {
            Poll::Pending
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut *this).poll_flush(cx))?;
        this.slot.release();
        Poll::Ready(Ok(()))
    }
}

impl<T, C: Encode<T>> futures_sink::Sink<T> for SendSink<T, C> {
    type Error = SendError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        Pin::new(&mut self.get_mut().raw).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: T) -> Result<(), SendError> {
        let this = self.get_mut();
        let bytes = encode_with(&this.codec, &item)?;
        Pin::new(&mut this.raw).start_send(bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        Pin::new(&mut self.get_mut().raw).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        Pin::new(&mut self.get_mut().raw).poll_close(cx)
    }
}

impl<T, C> fmt::Debug for SendSink<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendSink").field("raw", &self.raw).finish()
    }
}

impl fmt::Debug for RawSendSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSendSink")
            .field("peer", &self.sender.peer)
            .field("channel", &self.sender.options.channel)
            .field("reserved", &self.slot.is_reserved())
            .field("outstanding", &self.receipts.len())
            .field("settled", &self.settled)
            .field("failed", &self.failed)
            .finish()
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, SendError>> + Send>>;

/// One reserved slot of a sender's in-flight window, taken by a poll (`poll_ready` of
/// the sink and of the tower service) and spent by the next send. Dropping it unspent
/// gives the slot back.
#[derive(Default)]
pub(super) struct WindowSlot {
    permit: Option<OwnedSemaphorePermit>,
    acquiring: Option<Acquire>,
    /// The last wait ended because the target was Down (no slot taken): the next send
    /// fails with `PeerDown` rather than `WindowFull` should the window still be full.
    down: bool,
}

impl WindowSlot {
    /// Ready once a slot is reserved, or (when sends to the target fail fast) once the
    /// target is Down, without a slot: the next send then fails with `PeerDown` unless
    /// the target is up again with room. Fails only if the node is closed or failed.
    pub(super) fn poll_reserve(
        &mut self,
        sender: &RawSender,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), SendError>> {
        if self.permit.is_some() {
            return Poll::Ready(Ok(()));
        }
        let acquiring = match &mut self.acquiring {
            Some(acquiring) => acquiring,
            None => match sender.window.clone().try_acquire_owned() {
                Ok(permit) => {
                    self.permit = Some(permit);
                    self.down = false;
                    return Poll::Ready(Ok(()));
                }
                Err(TryAcquireError::Closed) => {
                    return Poll::Ready(Err(sender.shared.send_closed_error()))
                }
                Err(TryAcquireError::NoPermits) => {
                    #[cfg(feature = "metrics")]
                    sender.note_window_wait(1);
                    // Waits as `Sender::send` does: a target turning Down ends it.
                    self.acquiring
                        .insert(Box::pin(sender.clone().acquire_owned_slot()))
                }
            },
        };
        let acquired = ready!(acquiring.as_mut().poll(cx));
        self.acquiring = None;
        match acquired {
            Ok(permit) => {
                self.permit = Some(permit);
                self.down = false;
                Poll::Ready(Ok(()))
            }
            // The target turned Down: ready without a slot, so the next item (sent as
            // `try_send` is) fails with `PeerDown` on its own. An error from here
            // would end the whole sink or service for callers that take a `poll_ready`
            // error as fatal (tower's `Buffer` fails every later request).
            Err(SendError::PeerDown { .. }) => {
                self.down = true;
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Sends `payload` in the reserved slot. Without one (`poll_ready` was skipped, or
    /// its wait ended with the target Down) it behaves as [`RawSender::try_send`],
    /// except that after such a Down a full window is `PeerDown`, not `WindowFull`. If
    /// the payload is refused before it is sent (too large, peer down), the slot stays
    /// reserved for the next item.
    pub(super) fn send(
        &mut self,
        sender: &RawSender,
        payload: Bytes,
    ) -> Result<Receipt, SendError> {
        let Some(permit) = self.permit.take() else {
            return match sender.try_send(payload) {
                // Ready because the target was Down, which it no longer is: the
                // window is still full, and this item's wait ended with that Down.
                Err(SendError::WindowFull { .. }) if std::mem::take(&mut self.down) => {
                    Err(SendError::PeerDown { peer: sender.peer })
                }
                r => {
                    self.down = false;
                    r
                }
            };
        };
        if let Err(e) = sender.check(&payload) {
            self.permit = Some(permit);
            return Err(e);
        }
        // The driver gives the slot back (add_permits) when the window slides.
        permit.forget();
        sender.enqueue(payload, None)
    }

    /// Whether a slot is reserved and not yet spent.
    pub(super) fn is_reserved(&self) -> bool {
        self.permit.is_some()
    }

    /// Gives a reserved, unspent slot back.
    pub(super) fn release(&mut self) {
        self.permit = None;
        self.acquiring = None;
    }
}
