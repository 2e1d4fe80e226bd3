//! Batched sending and receiving: many messages through the driver in one step.
//!
//! `send_many` takes the window slots that are free (waiting, as `send` does, only
//! when none is) and hands each such chunk to the driver as one command, so a burst
//! costs one channel message and one driver wake-up per chunk instead of per message;
//! `recv_many` takes every delivery already queued in one call. The single-message
//! calls keep working and mean the same thing.

use super::command::Command;
use super::handles::encode_with;
use super::{Delivery, RawReceiver, RawSender, Receipt, Receiver, SendError, Sender};
use crate::codec::{Decode, Encode};
use crate::id::IdKey;
use bytes::Bytes;
use tokio::sync::oneshot;

impl RawSender {
    /// Send every payload of `payloads`, in order, and return their receipts in the
    /// same order. Waits for window space like [`RawSender::send`]: each step takes
    /// every window slot that is free (at most the window), waiting only while none
    /// is, and reaches the driver as one chunk. So a batch moves whenever single sends
    /// would, for example to a receiver that acks only once it has a group of later
    /// messages.
    ///
    /// Every payload is checked before any is sent: a payload over the maximum fails
    /// the whole call with [`SendError::TooLarge`] and nothing is sent. If the target
    /// turns Down part-way (and sends to it fail fast, see
    /// [`NodeConfig::fail_fast_when_down`](crate::NodeConfig)), the call still returns
    /// every receipt once a chunk was sent: the sent messages settle as usual, and the
    /// receipts of the payloads not sent resolve at once to [`SendError::PeerDown`].
    /// (Down before the first chunk, the call fails with `PeerDown` and nothing is
    /// sent.) If the node stops part-way, the call fails with its error; messages of
    /// earlier chunks were handed to the node and settle as their receipts would have
    /// (with the same error if they had not settled yet).
    ///
    /// **Cancellation:** dropping the future (a `timeout`, a `select!`) while it waits
    /// for window space for a later chunk does not take back the chunks already handed
    /// to the node: they are sent and settle, but their receipts are lost with the
    /// future. A batch that fits in the free window goes in one step and is not split.
    /// To retry a cancelled batch safely, send it with
    /// [`RawSender::send_many_with_keys`]: keys make the repeat of an
    /// effectively-once message a duplicate, not a second message.
    pub async fn send_many<I>(&self, payloads: I) -> Result<Vec<Receipt>, SendError>
    where
        I: IntoIterator<Item = Bytes>,
    {
        let items: Vec<(Bytes, Option<IdKey>)> = payloads.into_iter().map(|p| (p, None)).collect();
        self.submit_many(items).await
    }

    /// [`RawSender::send_many`] with an application idempotency key per payload (see
    /// [`RawSender::send_with_key`]).
    pub async fn send_many_with_keys<I>(&self, items: I) -> Result<Vec<Receipt>, SendError>
    where
        I: IntoIterator<Item = (Bytes, IdKey)>,
    {
        let items: Vec<(Bytes, Option<IdKey>)> =
            items.into_iter().map(|(p, k)| (p, Some(k))).collect();
        self.submit_many(items).await
    }

    async fn submit_many(
        &self,
        items: Vec<(Bytes, Option<IdKey>)>,
    ) -> Result<Vec<Receipt>, SendError> {
        for (payload, _) in &items {
            self.check(payload)?;
        }
        let mut receipts = Vec::with_capacity(items.len());
        let mut rest = items.len();
        let mut items = items.into_iter();
        let chunk_max = self.window_size.max(1);
        while rest > 0 {
            let n = match self.take_free_slots(rest.min(chunk_max)).await {
                Ok(n) => n,
                // The target turned Down after a chunk went: the call still returns
                // every receipt, so a caller can tell what was sent; the rest fail
                // as single sends to a Down peer would. (Regression: the call failed
                // and the sent chunks' receipts were lost, so a caller resending the
                // batch sent them twice.)
                Err(e @ SendError::PeerDown { .. }) if !receipts.is_empty() => {
                    receipts.extend(items.map(|_| Receipt::failed(e.clone(), &self.shared)));
                    return Ok(receipts);
                }
                Err(e) => return Err(e),
            };
            rest -= n;
            let chunk: Vec<(Bytes, Option<IdKey>)> = items.by_ref().take(n).collect();
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            let mut batch = Vec::with_capacity(chunk.len());
            for (payload, key) in chunk {
                let (tx, rx) = oneshot::channel();
                batch.push((payload, key, tx));
                receipts.push(Receipt {
                    rx,
                    shared: self.shared.clone(),
                });
            }
            let cmd = Command::SendBatch {
                peer: self.peer,
                options: self.options,
                schema: self.schema,
                items: batch,
            };
            if self.commands.send(cmd).is_err() {
                self.window.add_permits(n as usize);
                return Err(self.shared.send_closed_error());
            }
        }
        Ok(receipts)
    }

    /// Takes between 1 and `most` window slots: waits (in turn, as a single send does)
    /// for one, then takes as many more as are free at once. Never waits for more
    /// than one: a whole-window wait stalled a batch for its whole deadline whenever
    /// the window could not empty — a receiver that acks in groups holds the last,
    /// incomplete group until later messages arrive — and a slot held elsewhere (a
    /// sink's `poll_ready`) stalled it, and every send queued behind it, for good.
    async fn take_free_slots(&self, most: usize) -> Result<usize, SendError> {
        #[cfg(feature = "metrics")]
        self.note_window_wait(1);
        // The driver gives each slot back (add_permits) when the window slides.
        self.acquire_slot().await?;
        let mut got = 1;
        while got < most {
            let free = self.window.available_permits().min(most - got);
            if free == 0 {
                break;
            }
            match self.window.try_acquire_many(free as u32) {
                Ok(p) => {
                    p.forget();
                    got += free;
                }
                Err(tokio::sync::TryAcquireError::NoPermits) => continue, // taken meanwhile
                Err(tokio::sync::TryAcquireError::Closed) => break,
            }
        }
        Ok(got)
    }
}

impl<T, C: Encode<T>> Sender<T, C> {
    /// Send every value of `values`, in order; see [`RawSender::send_many`]. A value
    /// that cannot be encoded fails the whole call before anything is sent.
    pub async fn send_many<'a, I>(&self, values: I) -> Result<Vec<Receipt>, SendError>
    where
        I: IntoIterator<Item = &'a T>,
        T: 'a,
    {
        let payloads = values
            .into_iter()
            .map(|v| encode_with(&self.codec, v))
            .collect::<Result<Vec<Bytes>, SendError>>()?;
        self.raw.send_many(payloads).await
    }
}

impl RawReceiver {
    /// Move up to `limit` deliveries into `buf` at once, waiting for the first one.
    /// Returns how many were added; `0` once the node has shut down (or for a `limit`
    /// of 0).
    /// Same rules as [`RawReceiver::recv`]: nothing is handed out once a graceful stop
    /// has begun its handler grace.
    pub async fn recv_many(&mut self, buf: &mut Vec<Delivery<Bytes>>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        std::future::poll_fn(|cx| self.poll_recv_many(cx, buf, limit)).await
    }
}

impl<T, C: Decode<T>> Receiver<T, C> {
    /// Move up to `limit` decoded deliveries into `buf` at once, waiting for the first
    /// one (same decoding rules as [`Receiver::recv`]). Returns how many were added;
    /// `0` once the node has shut down (or for a `limit` of 0).
    pub async fn recv_many(&mut self, buf: &mut Vec<Delivery<T>>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let mut raw = Vec::with_capacity(limit.min(1024));
        loop {
            raw.clear();
            if self.raw.recv_many(&mut raw, limit).await == 0 {
                return 0;
            }
            let before = buf.len();
            for d in raw.drain(..) {
                if let Some(d) = self.typed(d) {
                    buf.push(d);
                }
            }
            if buf.len() > before {
                return buf.len() - before;
            }
            // Every one was undecodable (dead-lettered): wait for more.
        }
    }
}
