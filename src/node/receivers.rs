//! The receiving side of the driver: the application's receivers, the completions
//! their deliveries send back, `ack_durable` waiters and dead letters.
//!
//! Owns the per-channel receiver queues and the lock-free completion stack the
//! [`Delivery`] handles push to. Decides nothing about the protocol: a delivery with
//! no receiver (or whose receiver is gone) is refused back to the endpoint, which
//! keeps the stream's messages for a later receiver.

use super::command::AckReply;
use super::dead_letter::{DeadLetterQueue, DeadLetterReason};
use super::handles::Completions;
use super::observe::Observer;
use super::{AckError, DeadLetter, Delivery, DeliveryHandle, ReceiverOptions};
use crate::id::ChannelId;
use crate::proto::{Completion, DeliveryRef, Endpoint};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

pub(super) struct Receivers {
    by_channel: FxHashMap<ChannelId, mpsc::UnboundedSender<Delivery<Bytes>>>,
    /// Handed to deliveries so their completions come back here.
    pub(super) completions: Arc<Completions>,
    /// Completions drained from `completions`, reused.
    completed: Vec<(DeliveryRef, Completion)>,
    /// `ack_durable` waiters: the delivery, the persist-error count before it was
    /// completed, and where to answer.
    durable_acks: Vec<(DeliveryRef, u64, AckReply)>,
    /// Nothing is handed out any more ([`Receivers::stop_handing_out`]).
    stopped: bool,
    /// `Shared::queued_for_receivers`.
    queued: Arc<std::sync::atomic::AtomicU64>,
    /// [`NodeConfig::shutdown_handler_grace`](super::NodeConfig::shutdown_handler_grace).
    pub(super) handler_grace: std::time::Duration,
}

impl Receivers {
    pub(super) fn new(
        handler_grace: std::time::Duration,
        queued: Arc<std::sync::atomic::AtomicU64>,
        completions: Arc<Completions>,
    ) -> Self {
        Receivers {
            by_channel: FxHashMap::default(),
            completions,
            completed: Vec::new(),
            durable_acks: Vec::new(),
            stopped: false,
            queued,
            handler_grace,
        }
    }

    /// Deliveries queued for receivers, not yet taken out by the application.
    pub(super) fn queued(&self) -> u64 {
        self.queued.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Is a receiver registered on `channel`?
    pub(super) fn has(&self, channel: ChannelId) -> bool {
        self.by_channel.contains_key(&channel)
    }

    /// A receiver on `channel`: the endpoint accepts the channel from now on.
    pub(super) fn register(
        &mut self,
        endpoint: &mut Endpoint,
        channel: ChannelId,
        options: ReceiverOptions,
        schema: u32,
        tx: mpsc::UnboundedSender<Delivery<Bytes>>,
    ) {
        if self.stopped {
            return; // its receiver ends at once (it sees the stop)
        }
        // Before the map grows, let go of the receivers the application dropped: each
        // held its queue's first block (~6 KiB) and kept its channel accepted until a
        // message came for it. Amortised O(1) per registration. (Regression: a
        // receiver per request, dropped after its reply, left ~6.5 KiB per channel for
        // as long as the node ran.)
        if self.by_channel.len() >= self.by_channel.capacity().max(64)
            && !self.by_channel.contains_key(&channel)
        {
            self.by_channel.retain(|ch, tx| {
                if tx.is_closed() {
                    endpoint.unaccept_channel(*ch);
                }
                !tx.is_closed()
            });
        }
        self.by_channel.insert(channel, tx);
        endpoint.accept_channel_with(
            channel,
            crate::proto::Accept::new(options.ordered, options.max_deliveries).schema(schema),
        );
    }

    /// Hand a message to its channel's receiver. Without one (never registered, or
    /// dropped since) it is refused: the stream rewinds, and the sender retries until
    /// a receiver appears or is told there is none after the grace period.
    pub(super) fn deliver(
        &mut self,
        endpoint: &mut Endpoint,
        observe: &mut Observer,
        now: Instant,
        delivery: DeliveryRef,
        payload: Bytes,
    ) {
        let Some(tx) = self.by_channel.get(&delivery.channel) else {
            endpoint.unaccept_channel(delivery.channel);
            endpoint.complete(now, delivery, Completion::Refuse);
            return;
        };
        observe.delivered(&delivery);
        // At-most-once deliveries are finished too: that frees credit.
        let completion = Some((delivery, self.completions.clone()));
        let d = Delivery {
            message: payload,
            id: delivery.id,
            from: delivery.origin,
            channel: delivery.channel,
            guarantee: delivery.guarantee,
            handle: DeliveryHandle { completion },
        };
        // Counted before it is queued, so the count never misses a queued delivery.
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Err(mpsc::error::SendError(mut d)) = tx.send(d) {
            self.queued
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            d.handle.completion.take();
            self.by_channel.remove(&delivery.channel);
            endpoint.unaccept_channel(delivery.channel);
            endpoint.complete(now, delivery, Completion::Refuse);
        }
    }

    /// Apply every completion handlers pushed since the last call, oldest first.
    pub(super) fn take_completions(
        &mut self,
        endpoint: &mut Endpoint,
        observe: &mut Observer,
        now: Instant,
    ) {
        let mut done = std::mem::take(&mut self.completed);
        self.completions.stack.drain_into(&mut done);
        for (delivery, how) in done.drain(..) {
            complete(endpoint, observe, now, delivery, how);
        }
        self.completed = done;
    }

    /// A completion sent as a command; `done` (from `ack_durable`) is answered once
    /// the completion is persisted and its ack handed to the transport.
    pub(super) fn complete_command(
        &mut self,
        endpoint: &mut Endpoint,
        observe: &mut Observer,
        now: Instant,
        delivery: DeliveryRef,
        how: Completion,
        done: Option<AckReply>,
    ) {
        let errors = done
            .is_some()
            .then(|| endpoint.stats().dedup_persist_errors);
        complete(endpoint, observe, now, delivery, how);
        if let (Some(done), Some(errors)) = (done, errors) {
            self.durable_acks.push((delivery, errors, done));
        }
    }

    /// Resolve `ack_durable` waiters whose completion is fsynced (the endpoint syncs
    /// before it produces acks) and whose ack has been handed to the transport.
    pub(super) fn resolve_durable_acks(&mut self, endpoint: &Endpoint) {
        if self.durable_acks.is_empty() {
            return;
        }
        let errors = endpoint.stats().dedup_persist_errors;
        for (delivery, before, done) in std::mem::take(&mut self.durable_acks) {
            if endpoint.ack_owed(&delivery) {
                self.durable_acks.push((delivery, before, done));
                continue;
            }
            let _ = done.send(if errors > before {
                Err(AckError::NotPersisted)
            } else {
                Ok(())
            });
        }
    }

    /// A delivery its typed receiver could not decode: a dead letter (whatever its
    /// guarantee, as `Receiver::recv` documents), and rejected to its sender (an
    /// at-most-once sender, whose receipt resolved at transmission, is not told).
    /// (Regression: an at-most-once one was counted in `decode_failed` but never
    /// dead-lettered.)
    pub(super) fn undecodable(
        endpoint: &mut Endpoint,
        observe: &mut Observer,
        dead_letters: &DeadLetterQueue,
        now: Instant,
        delivery: DeliveryRef,
        payload: Bytes,
    ) {
        let deliveries = endpoint.deliveries(now, &delivery);
        let reason = DeadLetterReason::Undecodable;
        keep_dead_letter(observe, dead_letters, delivery, payload, deliveries, reason);
        endpoint.complete(
            now,
            delivery,
            Completion::Reject(crate::wire::RejectReason::Undecodable),
        );
    }

    /// A graceful stop's handler grace begins (or the node stops): no receiver is
    /// handed anything more. Each receiver takes back what is queued for it the next
    /// time the application polls it (or when it is dropped) and then ends; messages
    /// made ready from now on find no receiver and are refused (the sender keeps them
    /// for the node's next run).
    pub(super) fn stop_handing_out(&mut self, shared: &super::shared::Shared) {
        shared
            .receivers_stopped
            .store(true, std::sync::atomic::Ordering::Release);
        self.stopped = true;
        self.by_channel.clear();
    }
}

/// Finish a delivery in the endpoint (traced; the duplicates it settles counted).
fn complete(
    endpoint: &mut Endpoint,
    observe: &mut Observer,
    now: Instant,
    delivery: DeliveryRef,
    how: Completion,
) {
    observe.completed(&delivery, how);
    let duplicates = endpoint.duplicates_dropped();
    endpoint.complete(now, delivery, how);
    let settled = endpoint.duplicates_dropped() - duplicates;
    observe.duplicates_settled(&delivery, settled);
}

/// Keep a delivery as a dead letter after `deliveries` deliveries.
pub(super) fn keep_dead_letter(
    observe: &mut Observer,
    dead_letters: &DeadLetterQueue,
    delivery: DeliveryRef,
    payload: Bytes,
    deliveries: u32,
    reason: DeadLetterReason,
) {
    observe.dead_lettered(&delivery, deliveries, reason);
    dead_letters.push(DeadLetter {
        message: payload,
        id: delivery.id,
        from: delivery.origin,
        channel: delivery.channel,
        deliveries,
        reason,
    });
}
