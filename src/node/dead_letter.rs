//! Dead letters: received messages the application will never process — they reached
//! their channel's delivery limit, or their payload does not decode as the typed
//! receiver's type. Kept in a bounded in-memory queue the application drains with
//! [`Node::dead_letters`](super::Node::dead_letters).
//!
//! Owns the queue and its handle; must not decide what is dead (that is the protocol's
//! delivery count and the typed receiver's decode check).

use crate::id::{ChannelId, MessageId, Origin};
use bytes::Bytes;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Why a message became a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// It was delivered [`ReceiverOptions::max_deliveries`](super::ReceiverOptions::max_deliveries)
    /// times and nacked or dropped each time.
    MaxDeliveries,
    /// Its payload does not decode as the typed [`Receiver`](super::Receiver)'s type
    /// (or leaves bytes over).
    Undecodable,
}

/// A message the application will not process, with what is known about it. Its sender
/// was told (a receipt failing with
/// [`SendError::Rejected`](super::SendError::Rejected), for a sender speaking protocol
/// version 3).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The raw payload.
    pub message: Bytes,
    /// Its dedup identity.
    pub id: MessageId,
    /// The sending node run.
    pub from: Origin,
    /// Its channel.
    pub channel: ChannelId,
    /// How many times it was handed to the application.
    pub deliveries: u32,
    /// Why it is here.
    pub reason: DeadLetterReason,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<DeadLetter>,
    wakers: Vec<Waker>,
    closed: bool,
}

/// The node's dead-letter queue (shared by the driver and every [`DeadLetters`]).
#[derive(Debug)]
pub(crate) struct DeadLetterQueue {
    state: Mutex<State>,
    capacity: usize,
    dropped: AtomicU64,
}

impl DeadLetterQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        DeadLetterQueue {
            state: Mutex::new(State::default()),
            capacity,
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `letter`. At capacity the oldest letter is dropped, counted and logged.
    pub(crate) fn push(&self, letter: DeadLetter) {
        tracing::debug!(id = %letter.id, channel = letter.channel.0, from = %letter.from, deliveries = letter.deliveries, reason = ?letter.reason, "dead letter");
        let wakers = {
            let mut st = self.lock();
            if st.queue.len() >= self.capacity {
                if let Some(old) = st.queue.pop_front() {
                    let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(id = %old.id, total, capacity = self.capacity, "dead-letter queue full: oldest dead letter dropped (drain Node::dead_letters)");
                }
            }
            if self.capacity > 0 {
                st.queue.push_back(letter);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            std::mem::take(&mut st.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Letters dropped because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The node stopped: handles see the end once the queue is empty.
    pub(crate) fn close(&self) {
        let wakers = {
            let mut st = self.lock();
            st.closed = true;
            std::mem::take(&mut st.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// Yields the node's dead letters, oldest first (see [`DeadLetter`]). Every handle
/// draws from the same queue: each letter goes to one of them. Ends once the node has
/// stopped and the queue is empty. Also a [`futures_core::Stream`].
///
/// The queue holds at most [`NodeConfig::dead_letter_capacity`](super::NodeConfig::dead_letter_capacity)
/// letters; past that the oldest is dropped, counted in
/// [`Stats::dead_letters_dropped`](super::Stats::dead_letters_dropped) and logged at warn.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    pub(crate) queue: Arc<DeadLetterQueue>,
}

impl DeadLetters {
    /// The next dead letter; `None` once the node has stopped and none are left.
    pub async fn recv(&mut self) -> Option<DeadLetter> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next dead letter if one is queued now.
    pub fn try_recv(&mut self) -> Option<DeadLetter> {
        self.queue.lock().queue.pop_front()
    }

    /// Poll for the next dead letter.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<DeadLetter>> {
        let mut st = self.queue.lock();
        if let Some(letter) = st.queue.pop_front() {
            return Poll::Ready(Some(letter));
        }
        if st.closed {
            return Poll::Ready(None);
        }
        if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            st.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl futures_core::Stream for DeadLetters {
    type Item = DeadLetter;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DeadLetter>> {
        self.get_mut().poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;

    fn letter(n: u64) -> DeadLetter {
        DeadLetter {
            message: Bytes::from(n.to_le_bytes().to_vec()),
            id: MessageId::Key(crate::IdKey(u128::from(n))),
            from: Origin {
                node: NodeId(1),
                incarnation: 1,
            },
            channel: ChannelId(0),
            deliveries: 3,
            reason: DeadLetterReason::MaxDeliveries,
        }
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts_it() {
        let q = Arc::new(DeadLetterQueue::new(2));
        for n in 0..3 {
            q.push(letter(n));
        }
        assert_eq!(q.dropped(), 1);
        let mut h = DeadLetters { queue: q.clone() };
        assert_eq!(h.try_recv(), Some(letter(1)));
        assert_eq!(h.try_recv(), Some(letter(2)));
        assert_eq!(h.try_recv(), None);
    }

    #[tokio::test]
    async fn recv_wakes_on_push_and_ends_after_close() {
        let q = Arc::new(DeadLetterQueue::new(8));
        let mut h = DeadLetters { queue: q.clone() };
        let waiter = tokio::spawn(async move {
            let first = h.recv().await;
            let end = h.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        q.push(letter(7));
        q.close();
        let (first, end) = waiter.await.unwrap();
        assert_eq!(first, Some(letter(7)));
        assert_eq!(end, None);
    }
}
