//! Senders as `tower::Service`s (feature `tower`): [`SenderService`] and
//! [`RawSenderService`].
//!
//! Owns the adaptation only: `poll_ready` reserves a slot of the stream's in-flight
//! window (the sink's [`WindowSlot`]), `call` sends in it and returns the message's
//! [`Receipt`] as the response future. Sending is [`RawSender`]'s, so a message sent
//! through the service goes exactly the way `send` would send it.

use super::handles::encode_with;
use super::sink::WindowSlot;
use super::{Outcome, RawSender, Receipt, SendError, Sender};
use crate::codec::{Bincode, Encode};
use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_service::Service;

/// A [`Sender`] as a `tower::Service<T>` (feature `tower`): made by
/// [`Sender::service`].
///
/// The response is the message's outcome: the future resolves when its receipt does
/// (`Ok(Outcome::Acked)` once the receiver's handler acked it, or the [`SendError`]
/// that ended it), so tower middleware sees one request per message:
///
/// * `poll_ready` is pending while the stream's in-flight window is full (when
///   [`Sender::send`] would wait): `LoadShed` then refuses at once, `Buffer` queues;
///   as `send`'s, the wait ends when the target turns Down (with the default
///   [`NodeConfig::fail_fast_when_down`](crate::NodeConfig)): `poll_ready` is ready and
///   that request's response is [`SendError::PeerDown`]; `poll_ready` itself fails
///   only when the node has stopped, so a `Buffer` in front of the service lives on;
/// * `ConcurrencyLimit` bounds messages awaiting their ack;
/// * `Timeout` bounds the wait for the ack. Dropping the response future (a timeout
///   does) only stops waiting: the message itself is not recalled, and may still be
///   delivered (retried until its own deadline, as any sent message).
///
/// Each clone reserves its own window slot, as tower expects of `Clone` services.
///
/// ```no_run
/// use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome};
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// # async fn demo(node: Node) -> Result<(), tower::BoxError> {
/// let out = node.sender::<String>(
///     NodeId(2),
///     ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
/// )?;
/// let mut svc = ServiceBuilder::new()
///     .timeout(Duration::from_secs(5))
///     .concurrency_limit(256)
///     .service(out.service());
/// let outcome = svc.ready().await?.call("hello".to_string()).await?;
/// assert_eq!(outcome, Outcome::Acked);
/// # Ok(()) }
/// ```
pub struct SenderService<T, C = Bincode> {
    raw: RawSenderService,
    codec: C,
    _t: PhantomData<fn(T)>,
}

/// A [`RawSender`] as a `tower::Service<Bytes>` (feature `tower`): made by
/// [`RawSender::service`]. Same rules as [`SenderService`].
pub struct RawSenderService {
    sender: RawSender,
    slot: WindowSlot,
}

/// The response future of [`SenderService`] and [`RawSenderService`]: the message's
/// outcome, or the error that refused or ended it.
#[must_use = "the future tells whether the message was acknowledged"]
#[derive(Debug)]
pub struct SendFuture {
    state: Result<Receipt, Option<SendError>>,
}

impl<T, C: Encode<T>> Sender<T, C> {
    /// This sender as a `tower::Service<T>` (with its codec); see [`SenderService`].
    pub fn service(&self) -> SenderService<T, C> {
        SenderService {
            raw: self.raw.service(),
            codec: self.codec.clone(),
            _t: PhantomData,
        }
    }
}

impl RawSender {
    /// This sender as a `tower::Service<Bytes>`; see [`RawSenderService`].
    pub fn service(&self) -> RawSenderService {
        RawSenderService {
            sender: self.clone(),
            slot: WindowSlot::default(),
        }
    }
}

impl Service<Bytes> for RawSenderService {
    type Response = Outcome;
    type Error = SendError;
    type Future = SendFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        self.slot.poll_reserve(&self.sender, cx)
    }

    /// Sends `payload` in the slot `poll_ready` reserved (without one, as
    /// [`RawSender::try_send`]: [`SendError::WindowFull`] if the window is full, or
    /// [`SendError::PeerDown`] when `poll_ready` was ready because the target was
    /// Down).
    fn call(&mut self, payload: Bytes) -> SendFuture {
        SendFuture {
            state: self.slot.send(&self.sender, payload).map_err(Some),
        }
    }
}

impl<T, C: Encode<T>> Service<T> for SenderService<T, C> {
    type Response = Outcome;
    type Error = SendError;
    type Future = SendFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        self.raw.poll_ready(cx)
    }

    fn call(&mut self, value: T) -> SendFuture {
        match encode_with(&self.codec, &value) {
            Ok(bytes) => self.raw.call(bytes),
            Err(e) => SendFuture {
                state: Err(Some(e)),
            },
        }
    }
}

impl Future for SendFuture {
    type Output = Result<Outcome, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            Ok(receipt) => Pin::new(receipt).poll(cx),
            Err(e) => Poll::Ready(Err(e.take().unwrap_or(SendError::Shutdown))),
        }
    }
}

impl Clone for RawSenderService {
    fn clone(&self) -> Self {
        self.sender.service()
    }
}

impl<T, C: Clone> Clone for SenderService<T, C> {
    fn clone(&self) -> Self {
        SenderService {
            raw: self.raw.clone(),
            codec: self.codec.clone(),
            _t: PhantomData,
        }
    }
}

impl fmt::Debug for RawSenderService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSenderService")
            .field("peer", &self.sender.peer)
            .field("channel", &self.sender.options.channel)
            .field("reserved", &self.slot.is_reserved())
            .finish()
    }
}

impl<T, C> fmt::Debug for SenderService<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderService")
            .field("raw", &self.raw)
            .finish()
    }
}
