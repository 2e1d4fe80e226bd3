//! The application's handles: [`Sender`] / [`RawSender`] and the [`Receipt`] a send
//! returns; [`Receiver`] / [`RawReceiver`] and the [`Delivery`] (with its
//! [`DeliveryHandle`]) they yield.
//!
//! Owns what a send checks before it reaches the driver (payload size, a Down target,
//! a window slot), encoding and decoding with the channel's codec, and the way a
//! completion travels back (`Completions`). Must not touch the endpoint or the
//! transport: every send and completion reaches the driver as a command or through the
//! completion stack.

use super::command::Command;
use super::completions::CompletionStack;
#[cfg(feature = "metrics")]
use super::metrics;
use super::shared::Shared;
use super::{AckError, ChannelOptions, Outcome, SendError};
#[cfg(doc)]
use super::{Node, NodeConfig, ReceiverOptions, Stats};
use crate::codec::{Bincode, Decode, Encode};
use crate::detector::Health;
use crate::id::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
use crate::proto::{Completion, DeliveryRef};
use bytes::Bytes;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot, AcquireError, OwnedSemaphorePermit, Semaphore};

/// Sends `T` values on one channel to one peer, encoded by the codec `C` ([`Bincode`]
/// unless made by [`Node::sender_with_codec`]). Cheap to clone.
#[derive(Debug)]
pub struct Sender<T, C = Bincode> {
    pub(super) raw: RawSender,
    pub(super) codec: C,
    pub(super) _t: PhantomData<fn(&T)>,
}

impl<T, C: Clone> Clone for Sender<T, C> {
    fn clone(&self) -> Self {
        Sender {
            raw: self.raw.clone(),
            codec: self.codec.clone(),
            _t: PhantomData,
        }
    }
}

impl<T, C> Sender<T, C> {
    /// The same sender without the payload type check: its messages carry no type
    /// fingerprint, so typed receivers decode them whatever `T` is.
    ///
    /// By default a typed sender sends the fingerprint of `T`'s name without module
    /// paths (`Payment`, `Vec<Order>`, `(String, u64)`) with every message (protocol
    /// version 3), and a typed receiver whose type has another name rejects the message
    /// with [`RejectReason::TypeMismatch`](crate::RejectReason::TypeMismatch) instead of
    /// decoding it: a `String` sent to a `u64` receiver is caught, while two services
    /// that each define their own `Payment` agree. Use this (or
    /// [`ReceiverOptions::type_check`]) when the two ends name compatible types
    /// differently.
    pub fn without_type_check(mut self) -> Self {
        self.raw.schema = 0;
        self
    }

    /// The codec that encodes this sender's messages.
    pub fn codec(&self) -> &C {
        &self.codec
    }
}

impl<T, C: Encode<T>> Sender<T, C> {
    /// Send `value`. Waits while the stream's window is full; returns a [`Receipt`] that
    /// resolves when the message settles.
    pub async fn send(&self, value: &T) -> Result<Receipt, SendError> {
        let bytes = self.encode(value)?;
        self.raw.send(bytes).await
    }

    /// Send `value` if the stream's window has room now; otherwise fail at once with
    /// [`SendError::WindowFull`] instead of waiting.
    pub fn try_send(&self, value: &T) -> Result<Receipt, SendError> {
        let bytes = self.encode(value)?;
        self.raw.try_send(bytes)
    }

    /// Send `value` under an application idempotency key: on an effectively-once
    /// channel, any two sends with the same key are processed once within the
    /// receiver's dedup horizon. The keys are one namespace per receiving node,
    /// shared by all its senders and channels: a key already processed on one channel
    /// makes a send under it on another channel a duplicate (acked, not delivered).
    /// Derive keys per channel (or include the channel in them) when the same
    /// business id travels on several channels.
    pub async fn send_with_key(&self, value: &T, key: IdKey) -> Result<Receipt, SendError> {
        let bytes = self.encode(value)?;
        self.raw.send_with_key(bytes, key).await
    }

    /// `value` as a payload, or the send's error.
    fn encode(&self, value: &T) -> Result<Bytes, SendError> {
        encode_with(&self.codec, value)
    }
}

/// `value` encoded by `codec`, as a payload (`Vec` → `Bytes` moves, no copy).
pub(super) fn encode_with<T: ?Sized, C: Encode<T>>(
    codec: &C,
    value: &T,
) -> Result<Bytes, SendError> {
    codec
        .encode(value)
        .map(Bytes::from)
        .map_err(|e| SendError::Encode(Arc::new(e)))
}

/// Sends raw payloads on one channel to one peer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RawSender {
    pub(super) peer: NodeId,
    pub(super) options: ChannelOptions,
    /// Payload type fingerprint sent with each message (0: unchecked).
    pub(super) schema: u32,
    pub(super) window: Arc<Semaphore>,
    pub(super) window_size: usize,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) max_payload: usize,
    pub(super) shared: Arc<Shared>,
}

impl RawSender {
    /// Send `payload`; see [`Sender::send`].
    pub async fn send(&self, payload: Bytes) -> Result<Receipt, SendError> {
        self.submit(payload, None).await
    }

    /// Send `payload` under an idempotency key; see [`Sender::send_with_key`].
    pub async fn send_with_key(&self, payload: Bytes, key: IdKey) -> Result<Receipt, SendError> {
        self.submit(payload, Some(key)).await
    }

    /// Send `payload` if the window has room now; see [`Sender::try_send`].
    pub fn try_send(&self, payload: Bytes) -> Result<Receipt, SendError> {
        self.check(&payload)?;
        let permit = self.window.try_acquire().map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => self.shared.send_closed_error(),
            tokio::sync::TryAcquireError::NoPermits => SendError::WindowFull {
                window: self.window_size,
            },
        })?;
        permit.forget();
        self.enqueue(payload, None)
    }

    /// This sender with the payload type fingerprint `schema` in every data frame
    /// (what a typed sender sets; see [`crate::codec::fingerprint`]).
    pub(crate) fn with_schema(mut self, schema: u32) -> Self {
        self.schema = schema;
        self
    }

    /// The target node.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Count a window wait (feature `metrics`) unless `n` slots are free now.
    #[cfg(feature = "metrics")]
    pub(super) fn note_window_wait(&self, n: usize) {
        if self.window.available_permits() < n {
            metrics::window_wait(self.shared.node, self.peer, self.options.channel);
        }
    }

    /// Checks that fail a send before it takes a window slot: the payload's size and,
    /// with [`NodeConfig::fail_fast_when_down`], the target's health.
    pub(super) fn check(&self, payload: &Bytes) -> Result<(), SendError> {
        self.check_health()?;
        if payload.len() > self.max_payload {
            return Err(SendError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        Ok(())
    }

    /// Does [`NodeConfig::fail_fast_when_down`] apply to this sender's sends?
    fn fails_fast(&self) -> bool {
        // At-most-once is never handed off: with handoff on too, it fails here instead
        // of waiting for the credit of a receiver that is gone (it has no deadline).
        match self.options.guarantee {
            Guarantee::AtMostOnce => self.shared.amo_fail_fast_down,
            _ => self.shared.fail_fast_down,
        }
    }

    /// `PeerDown` if the target is Down and sends to it fail fast.
    fn check_health(&self) -> Result<(), SendError> {
        if self.fails_fast() && self.shared.health(self.peer) == Some(Health::Down) {
            return Err(SendError::PeerDown { peer: self.peer });
        }
        Ok(())
    }

    /// Take one window slot (the driver gives it back when the window slides). A send
    /// that fails fast stops waiting with `PeerDown` as soon as its target turns Down,
    /// instead of waiting for a slot that frees only when the messages in flight reach
    /// their deadline, and then sending into a peer that is gone. (Regression: a send
    /// waiting on a full window when its peer died returned a receipt 30 s later.)
    /// Cancel-safe: dropped while waiting, it takes nothing.
    pub(super) async fn acquire_slot(&self) -> Result<(), SendError> {
        self.wait_for_slot(|| self.window.acquire()).await?.forget();
        Ok(())
    }

    /// [`acquire_slot`](Self::acquire_slot) for a slot held across polls (the sink's
    /// and the tower service's `poll_ready`), with the same fail-fast wait.
    /// (Regression: their wait ignored a Down and ended only with the deadline.)
    pub(super) async fn acquire_owned_slot(self) -> Result<OwnedSemaphorePermit, SendError> {
        self.wait_for_slot(|| self.window.clone().acquire_owned())
            .await
    }

    /// Waits on `acquire` for a window slot; when sends fail fast, also for the target
    /// to turn Down (then `PeerDown`).
    async fn wait_for_slot<P, F>(&self, acquire: impl Fn() -> F) -> Result<P, SendError>
    where
        F: Future<Output = Result<P, AcquireError>>,
    {
        if !self.fails_fast() {
            return acquire().await.map_err(|_| self.shared.send_closed_error());
        }
        loop {
            let down = self.shared.down.notified();
            tokio::pin!(down);
            // Registered before the check, so a Down published in between wakes it.
            down.as_mut().enable();
            self.check_health()?;
            tokio::select! {
                biased;
                permit = acquire() => {
                    return permit.map_err(|_| self.shared.send_closed_error());
                }
                () = &mut down => {}
            }
        }
    }

    pub(super) fn enqueue(&self, payload: Bytes, key: Option<IdKey>) -> Result<Receipt, SendError> {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Send {
            peer: self.peer,
            options: self.options,
            payload,
            key,
            schema: self.schema,
            reply: tx,
        };
        if self.commands.send(cmd).is_err() {
            self.window.add_permits(1);
            return Err(self.shared.send_closed_error());
        }
        Ok(Receipt {
            rx,
            shared: self.shared.clone(),
        })
    }

    async fn submit(&self, payload: Bytes, key: Option<IdKey>) -> Result<Receipt, SendError> {
        self.check(&payload)?;
        #[cfg(feature = "metrics")]
        self.note_window_wait(1);
        self.acquire_slot().await?;
        self.enqueue(payload, key)
    }
}

/// Resolves when a sent message settles: `Ok(Outcome)` once acknowledged (or, for
/// at-most-once, transmitted), or the [`SendError`] that ended it.
#[derive(Debug)]
#[must_use = "a receipt tells whether the message was acknowledged"]
pub struct Receipt {
    pub(super) rx: oneshot::Receiver<Result<Outcome, SendError>>,
    pub(super) shared: Arc<Shared>,
}

impl Receipt {
    /// A receipt already settled with `error` (a message that was never sent).
    pub(super) fn failed(error: SendError, shared: &Arc<Shared>) -> Receipt {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(error));
        Receipt {
            rx,
            shared: shared.clone(),
        }
    }
}

impl Future for Receipt {
    type Output = Result<Outcome, SendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        Pin::new(&mut this.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(this.shared.send_closed_error())))
    }
}

/// Yields the messages of one channel, decoded as `T` by the codec `C` ([`Bincode`]
/// unless made by [`Node::receiver_with_codec`]).
#[derive(Debug)]
pub struct Receiver<T, C = Bincode> {
    pub(super) raw: RawReceiver,
    pub(super) codec: C,
    pub(super) _t: PhantomData<fn() -> T>,
}

impl<T, C> Receiver<T, C> {
    /// The codec that decodes this receiver's messages.
    pub fn codec(&self) -> &C {
        &self.codec
    }
}

impl<T, C: Decode<T>> Receiver<T, C> {
    /// The next message; `None` once the node has shut down.
    ///
    /// A payload that does not decode as `T`, or decodes with bytes left over (a value
    /// of another type), is never handed out: it is counted in
    /// [`Stats::decode_failed`], logged at warn (at most once a second per node, with
    /// the running count), put in [`Node::dead_letters`], and the sender's receipt
    /// fails with [`SendError::Rejected`]`{ reason: Undecodable }` instead of reporting
    /// `Ok(Acked)` for a message nobody processed (a sender speaking protocol 2 or
    /// older has no rejects: it is acked, to end its retries).
    pub async fn recv(&mut self) -> Option<Delivery<T>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll for the next message (what [`Receiver::recv`] and the
    /// [`futures_core::Stream`] impl use).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery<T>>> {
        loop {
            let Some(d) = std::task::ready!(self.raw.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            if let Some(d) = self.typed(d) {
                return Poll::Ready(Some(d));
            }
        }
    }

    /// `d` decoded as `T`, or `None` after handing an undecodable payload to the dead
    /// letters (and its sender a rejection).
    pub(super) fn typed(&self, d: Delivery<Bytes>) -> Option<Delivery<T>> {
        match self.codec.decode(&d.message) {
            Ok(value) => Some(d.map(value)),
            Err(error) => {
                self.raw
                    .shared
                    .decode_failed(d.id, d.channel, &error.to_string());
                let mut handle = d.handle;
                if let Some((delivery, back)) = handle.completion.take() {
                    let _ = back.commands.send(Command::Undecodable {
                        delivery,
                        payload: d.message,
                    });
                }
                None
            }
        }
    }
}

/// A receiver is a stream of deliveries (same rules as [`Receiver::recv`]): use it with
/// `StreamExt` combinators. It ends when the node shuts down.
impl<T, C: Decode<T>> futures_core::Stream for Receiver<T, C> {
    type Item = Delivery<T>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// A raw receiver is a stream of deliveries; it ends when the node shuts down.
impl futures_core::Stream for RawReceiver {
    type Item = Delivery<Bytes>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// Yields the raw payloads of one channel.
#[derive(Debug)]
pub struct RawReceiver {
    pub(super) rx: mpsc::UnboundedReceiver<Delivery<Bytes>>,
    pub(super) shared: Arc<Shared>,
    /// At-most-once deliveries that were queued when the node stopped handing out:
    /// settled already (never sent again), so still handed out, then `None`.
    pub(super) settled_left: std::collections::VecDeque<Delivery<Bytes>>,
}

/// Messages still queued when the receiver goes were never seen by the application:
/// they are taken back (`Completion::Refuse`), not nacked, so they do not count
/// towards [`ReceiverOptions::max_deliveries`](super::ReceiverOptions::max_deliveries).
/// At-least-once and effectively-once ones come back to the channel's next receiver
/// (counted in
/// [`ProtoStats::deliveries_refused`](crate::proto::ProtoStats::deliveries_refused));
/// at-most-once ones are never sent again, so they are lost with the receiver. (Regression: each queued message was dropped
/// as a nack, so every receiver drop used up one of its deliveries; with a limit of 1
/// they became dead letters unseen.)
impl Drop for RawReceiver {
    fn drop(&mut self) {
        self.take_back_queued(false);
    }
}

impl RawReceiver {
    /// The next message; `None` once the node has shut down.
    ///
    /// Nothing is handed out once a graceful stop ([`Node::shutdown`]) has begun its
    /// handler grace: from then on the messages still queued for this receiver, which
    /// the application never saw, are taken back unprocessed (the sender sends them
    /// again to the node's next run), and `recv` returns `None` — after handing out
    /// the at-most-once ones among them, which no sender would send again. A message
    /// handed out
    /// before that has the grace ([`NodeConfig::shutdown_handler_grace`], default 5 s)
    /// to be acked. (Regression: messages queued at the
    /// stop were handed out after `shutdown` returned, their acks went nowhere, and
    /// with durable dedup each was processed again by the restarted receiver.)
    ///
    /// [`Node::shutdown`]: super::Node::shutdown
    pub async fn recv(&mut self) -> Option<Delivery<Bytes>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll for the next message (same rules as [`RawReceiver::recv`]).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery<Bytes>>> {
        if self.stopped() {
            return Poll::Ready(self.settled_left.pop_front());
        }
        let got = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(_)) = got {
            self.taken_out(1);
        }
        got
    }

    /// `n` deliveries left this receiver's queue (see `Shared::queued_for_receivers`).
    fn taken_out(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.shared
            .queued_for_receivers
            .fetch_sub(n, Ordering::AcqRel);
    }

    /// Poll for up to `limit` messages into `buf` (same rules as
    /// [`RawReceiver::recv`]; the stop is checked on every poll).
    pub(super) fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<Delivery<Bytes>>,
        limit: usize,
    ) -> Poll<usize> {
        if self.stopped() {
            let n = self.settled_left.len().min(limit);
            buf.extend(self.settled_left.drain(..n));
            return Poll::Ready(n);
        }
        let got = self.rx.poll_recv_many(cx, buf, limit);
        if let Poll::Ready(n) = got {
            self.taken_out(n);
        }
        got
    }

    /// Has the node stopped handing out? Then what is queued here is taken back.
    pub(super) fn stopped(&mut self) -> bool {
        if !self.shared.receivers_stopped.load(Ordering::Acquire) {
            return false;
        }
        if !self.rx.is_closed() || !self.rx.is_empty() {
            self.take_back_queued(true);
        }
        true
    }

    /// Close the queue and take back every message in it (never seen by the
    /// application). At-most-once ones cannot come back (their sender settled them
    /// when it sent them): with `keep_settled` they are kept to be handed out.
    fn take_back_queued(&mut self, keep_settled: bool) {
        self.rx.close();
        let mut queued = Vec::new();
        while let Ok(d) = self.rx.try_recv() {
            self.taken_out(1);
            if keep_settled && d.guarantee == Guarantee::AtMostOnce {
                self.settled_left.push_back(d);
            } else {
                queued.push(d);
            }
        }
        // Newest first: an ordered stream then rewinds one seq at a time instead of
        // holding each for a redelivery.
        for mut d in queued.into_iter().rev() {
            d.handle.finish(Completion::Refuse);
        }
    }
}

/// A message handed to the application. Finish it with [`Delivery::ack`] after
/// processing, or [`Delivery::nack`] to have it redelivered; dropping it unfinished is a
/// nack. (At-most-once messages need neither.)
#[derive(Debug)]
pub struct Delivery<T> {
    pub(super) message: T,
    pub(super) id: MessageId,
    pub(super) from: Origin,
    pub(super) channel: ChannelId,
    pub(super) guarantee: Guarantee,
    pub(super) handle: DeliveryHandle,
}

impl<T> Delivery<T> {
    /// The message.
    pub fn message(&self) -> &T {
        &self.message
    }

    /// Split into the message and the handle that must still ack or nack it.
    pub fn into_parts(self) -> (T, DeliveryHandle) {
        (self.message, self.handle)
    }

    /// Its dedup identity.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The sending node run.
    pub fn from(&self) -> Origin {
        self.from
    }

    /// Its channel.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The guarantee it was sent with.
    pub fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    /// Processed: acknowledge to the sender (and record in the dedup table).
    pub fn ack(self) {
        self.handle.ack();
    }

    /// Not processed: the sender redelivers it soon — at once if the copy was sent
    /// more than 100 ms ago, otherwise 100 ms after it (a receiver's nacks cannot make
    /// a sender resend one message more than ten times a second).
    pub fn nack(self) {
        self.handle.nack();
    }

    /// Processed: acknowledge, and resolve once the acknowledgement is durable — the
    /// dedup record is written to the log (effectively-once with
    /// [`crate::dedup::DurableDedup`]; fsynced too under its default
    /// [`FsyncPolicy::Always`](crate::dedup::FsyncPolicy::Always), so it survives a power
    /// loss: a receiver killed after this returns does not process the message again
    /// while its id is remembered, `dedup.retention` for library-assigned ids and
    /// `dedup.horizon` for application keys) and
    /// the ack frame is handed to the transport. [`Delivery::ack`] is the same without
    /// the wait: a receiver killed between `ack()` and the group commit (one batch of
    /// completions, typically well under a millisecond) may process it again after its
    /// restart.
    ///
    /// Without durable dedup, or for at-least-once, it resolves once the ack is handed
    /// to the transport. The ack itself can still be lost on the wire; the sender then
    /// retransmits and the persisted record answers it as a duplicate.
    ///
    /// # Errors
    /// [`AckError::NotPersisted`] when the dedup log could not write the record (the
    /// ack was still sent); [`AckError::NodeStopped`] when the node stopped first.
    pub async fn ack_durable(self) -> Result<(), AckError> {
        self.handle.ack_durable().await
    }

    pub(super) fn map<U>(self, value: U) -> Delivery<U> {
        Delivery {
            message: value,
            id: self.id,
            from: self.from,
            channel: self.channel,
            guarantee: self.guarantee,
            handle: self.handle,
        }
    }
}

/// Finishes a delivery (see [`Delivery::into_parts`]). Dropping it unfinished is a
/// nack.
#[derive(Debug)]
pub struct DeliveryHandle {
    pub(super) completion: Option<(DeliveryRef, Arc<Completions>)>,
}

impl DeliveryHandle {
    /// Processed: acknowledge.
    pub fn ack(mut self) {
        self.finish(Completion::Ack);
    }

    /// Not processed: redeliver.
    pub fn nack(mut self) {
        self.finish(Completion::Nack);
    }

    /// Processed: acknowledge, and resolve once the acknowledgement is durable (see
    /// [`Delivery::ack_durable`]).
    pub async fn ack_durable(mut self) -> Result<(), AckError> {
        let Some((delivery, back)) = self.completion.take() else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        back.commands
            .send(Command::Complete {
                delivery,
                how: Completion::Ack,
                done: Some(tx),
            })
            .map_err(|_| AckError::NodeStopped)?;
        rx.await.unwrap_or(Err(AckError::NodeStopped))
    }

    fn finish(&mut self, how: Completion) {
        if let Some((delivery, back)) = self.completion.take() {
            if back.stack.push((delivery, how)) {
                // First of a burst: one wake-up for the driver, which takes them all.
                back.wake.notify_one();
            }
        }
    }
}

/// The way back from deliveries to the driver: plain completions through the lock-free
/// stack (one wake-up per burst), the rare ones that carry more through the command
/// channel.
#[derive(Debug)]
pub(super) struct Completions {
    pub(super) stack: CompletionStack<(DeliveryRef, Completion)>,
    pub(super) wake: tokio::sync::Notify,
    pub(super) commands: mpsc::UnboundedSender<Command>,
}

impl Drop for DeliveryHandle {
    fn drop(&mut self) {
        self.finish(Completion::Nack);
    }
}
