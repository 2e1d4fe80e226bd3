//! What the application's handles ask of the driver: one [`Command`] per call, on
//! the node's command channel, with the channel the answer comes back on; and how the
//! driver answers each ([`Driver::on_command`]): by feeding the core, the receivers
//! or the hint store. No decision of its own is made here.

use super::driver::Driver;
use super::receivers::Receivers;
use super::{
    AckError, ChannelOptions, Delivery, NodeError, Outcome, ReceiverOptions, SendError, Stats,
};
use crate::id::{ChannelId, IdKey, MessageId, NodeId};
use crate::proto::core::SendRefused;
use crate::proto::{Completion, DeliveryRef, Outgoing};
use crate::transport::LinkCommand;
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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

impl Driver {
    /// Answer one application command; `false` when the node is to stop.
    pub(super) fn on_command(&mut self, cmd: Command) -> bool {
        let now = self.clock;
        match cmd {
            Command::Send {
                peer,
                options,
                payload,
                key,
                schema,
                reply,
            } => self.send_one(peer, options, schema, payload, key, reply),
            Command::SendBatch {
                peer,
                options,
                schema,
                items,
            } => {
                for (payload, key, reply) in items {
                    self.send_one(peer, options, schema, payload, key, reply);
                }
            }
            Command::Complete {
                delivery,
                how,
                done,
            } => self.receivers.complete_command(
                &mut self.core.endpoint,
                &mut self.observe,
                now,
                delivery,
                how,
                done,
            ),
            Command::Register {
                channel,
                options,
                schema,
                tx,
            } => {
                // Completions pushed before this registration was asked for come
                // first: the messages a dropped receiver of the channel gave back
                // are taken back before the new receiver (and its ordering) applies.
                // (Regression: a frame handled in between went to an ordered
                // receiver ahead of the messages given back just before.)
                self.take_completions();
                self.receivers
                    .register(&mut self.core.endpoint, channel, options, schema, tx)
            }
            Command::Undecodable { delivery, payload } => Receivers::undecodable(
                &mut self.core.endpoint,
                &mut self.observe,
                &self.shared.dead_letters,
                now,
                delivery,
                payload,
            ),
            Command::AddPeer { peer, addr } => {
                self.core.add_peer(peer, now);
                // Also after a decommission, when the detector may already watch it
                // again (a connection that stayed up kept answering pings).
                if let Some(h) = self.core.health(peer) {
                    self.shared.seen(peer, h);
                }
                self.link_control(LinkCommand::AddPeer { peer, addr });
            }
            Command::Stats(reply) => {
                let core = &self.core;
                let _ = reply.send(Stats {
                    proto: core.endpoint.stats(),
                    dedup: core.endpoint.dedup_stats(),
                    decode_failed: 0, // these three are filled by `Node::stats`
                    no_receiver: 0,
                    tcp: None,
                    hints: core.hints.as_ref().map(|s| s.log().stats()),
                    handed_off: core.sends.handed_off(),
                    handoff_refused: core.sends.handoff_refused(),
                    dead_letters_dropped: self.shared.dead_letters.dropped(),
                    dead_letters_not_persisted: self.shared.dead_letters.not_persisted(),
                    dead_letters_unreadable: self.shared.dead_letters.unreadable(),
                });
            }
            Command::Decommission { peer, reply } => {
                self.core.forget(peer);
                // Stop dialing it too (the transport keeps a connection it holds).
                self.link_control(LinkCommand::RemovePeer { peer });
                self.shared.forget_health(peer);
                self.observe.spans.forget(peer);
                let res = match &mut self.core.hints {
                    Some(spool) => spool
                        .decommission(peer, &mut self.core.endpoint)
                        .map_err(NodeError::from),
                    None => Ok(0),
                };
                if let Ok(n) = res {
                    tracing::info!(%peer, dropped = n, "peer decommissioned; its hints dropped");
                }
                let _ = reply.send(res);
            }
            Command::Shutdown => return false,
            Command::Drain => {
                if self.core.begin_drain(now) {
                    // A handler that cannot finish a message while its node stops
                    // (a relay whose own sends are refused) nacks it; counted, its
                    // sender's prompt resends used up `max_deliveries` within the
                    // drain. (Regression: a relay draining for 5 s dead-lettered 267
                    // of 500 healthy messages.)
                    self.core.endpoint.stop_counting_nacks();
                    tracing::info!(
                        unsettled = self.core.sends.len(),
                        "draining before shutdown"
                    );
                    self.shared.close_windows();
                }
            }
        }
        true
    }

    /// One message from a sender (alone or in a batch); it holds one window permit.
    fn send_one(
        &mut self,
        peer: NodeId,
        options: ChannelOptions,
        schema: u32,
        payload: Bytes,
        key: Option<IdKey>,
        reply: oneshot::Sender<Result<Outcome, SendError>>,
    ) {
        let now = self.clock;
        let msg = Outgoing {
            peer,
            channel: options.channel,
            guarantee: options.guarantee,
            payload,
            id: key.map(MessageId::Key),
            deadline: options.deadline,
            schema,
        };
        let err = match self.core.send(now, msg) {
            Ok(r) => {
                let origin = self.core.endpoint.origin();
                let reply = self.observe.sent(origin, r, key, reply, now);
                self.core.opened(now, r, options.guarantee, reply);
                return self.report();
            }
            Err(SendRefused::Draining) => SendError::Shutdown,
            Err(SendRefused::Stream(crate::proto::StreamError::GuaranteeMismatch {
                existing,
                ..
            })) => SendError::GuaranteeMismatch { existing },
        };
        self.shared.window_for(peer, options.channel).add_permits(1);
        let _ = reply.send(Err(err));
    }
}

impl Driver {
    /// The durable dedup's IO, done here and not in the core: write and fsync the
    /// records the core buffered (one group commit), before the acks they gate are
    /// produced (see [`Endpoint::persist_owed`](crate::proto::Endpoint::persist_owed)).
    /// The fsync runs under `block_in_place` on a multi-thread runtime.
    pub(super) fn persist(&mut self) {
        let endpoint = &mut self.core.endpoint;
        if endpoint.persist_owed() {
            let result = endpoint.dedup().sync();
            endpoint.persisted(result);
        }
    }
}

impl Driver {
    /// The end of a run: write what the durable stores hold and release their
    /// directories, before the node is seen stopped, so a new node may open them as
    /// soon as this one's `shutdown()` or `closed()` returns. (Each directory is
    /// locked while a node has it open: two live nodes on one store would lose
    /// records.)
    pub(super) fn release_stores(&mut self) {
        let endpoint = &mut self.core.endpoint;
        let closed = endpoint.dedup().close();
        endpoint.persisted(closed);
        if let Some(spool) = &mut self.core.hints {
            spool.log_mut().close();
        }
    }
}

/// How long the handler grace waits to confirm that what the application holds is
/// only what is still queued for its receivers (see `finish_held_deliveries`).
const CONFIRM_NOTHING_HANDED_OUT: std::time::Duration = std::time::Duration::from_millis(20);

impl Driver {
    /// Hands the transport a peer change from a command, which cannot wait for room in
    /// the transport's queue: see [`LinkBacklog::submit`].
    fn link_control(&self, cmd: LinkCommand) {
        LinkBacklog::submit(&self.shared.link_backlog, &self.link.commands, cmd);
    }

    /// A graceful stop gives the deliveries the application still holds up to
    /// `shutdown_handler_grace` to finish (new frames are no longer read), so the
    /// completions of handlers busy at that moment are applied: their dedup records
    /// written and synced, their acks sent when due. (Regression: an effectively-once
    /// message a handler acked just as its node stopped lost its record and was
    /// processed again after the restart.)
    ///
    /// Receivers hand out nothing from here on: what is queued for them, unseen by the
    /// application, is taken back for the node's next run, and messages made ready
    /// now are refused the same way (see [`Receivers::stop_handing_out`]).
    pub(super) async fn finish_held_deliveries(&mut self) {
        // `None`: a grace too long to represent (`Duration::MAX`) waits for them all.
        let until = tokio::time::Instant::now().checked_add(self.receivers.handler_grace);
        self.receivers.stop_handing_out(&self.shared);
        self.core.endpoint.stop_nacking_refusals();
        // Queued deliveries the application never took are taken back by their
        // receivers, not waited for; a delivery taken out just as the stop began is
        // counted as queued for a moment, so "nothing handed out" is confirmed once
        // more after a short pause before the grace ends on it.
        let mut confirming = false;
        loop {
            self.clock = super::driver::now();
            self.take_completions();
            self.dispatch();
            let held = self.core.endpoint.held_by_application();
            let queued = self.receivers.queued();
            if held == 0 || (held <= queued && confirming) {
                break;
            }
            if held <= queued {
                confirming = true;
                tokio::time::sleep(CONFIRM_NOTHING_HANDED_OUT).await;
                continue;
            }
            confirming = false;
            tokio::select! {
                _ = self.receivers.completions.wake.notified() => {}
                // `ack_durable` finishes a delivery by command; sends meet the drain.
                // (Regression: an `ack_durable` in the grace was never applied, and
                // its caller saw `NodeStopped` once the grace was over.)
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => {
                        self.clock = super::driver::now();
                        if !self.on_command(cmd) {
                            break;
                        }
                    }
                    None => break,
                },
                _ = async {
                    match until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => break,
            }
        }
        let now = super::driver::now();
        self.clock = now;
        self.take_completions();
        let still_held = self
            .core
            .endpoint
            .held_by_application()
            .saturating_sub(self.receivers.queued());
        if still_held > 0 {
            // Their acks, when they come, go nowhere: the sender sends these messages
            // again to the node's next run, which processes them again (also with
            // durable dedup, which never saw their records). Say so instead of
            // dropping those acks silently.
            tracing::warn!(
                held = still_held,
                grace = ?self.receivers.handler_grace,
                "stopping with deliveries the application still holds after the handler grace: they are not acknowledged; at-least-once and effectively-once ones will be delivered again to this node's next run (at-most-once ones are not sent again)"
            );
        }
        self.persist();
        // Acks held back by `ack_delay` go now: after the stop they would never go,
        // and the sender would resend what was processed. (Regression: with
        // `ack_delay = 200ms`, a message acked just before `shutdown` was never
        // acknowledged and its `ack_durable` failed with `NodeStopped`.)
        self.core.endpoint.acks_due_now(now);
        self.core.endpoint.handle_timeout(now);
        let _ = self.flush(now).await;
        self.receivers.resolve_durable_acks(&self.core.endpoint);
    }
}

/// Peer changes (`AddPeer`, `RemovePeer`) that found the transport's command queue
/// full, waiting in order for room.
#[derive(Debug, Default)]
pub(super) struct LinkBacklog {
    queue: VecDeque<LinkCommand>,
    /// A task is handing `queue` to the transport.
    draining: bool,
}

impl LinkBacklog {
    /// Give `cmd` to the transport on `tx` without waiting: at once when there is room
    /// and nothing waits before it; otherwise behind what waits, handed over in order
    /// by one task. Never lost, never ahead of an earlier change. (Regressions: a full
    /// queue dropped an `add_peer` silently, and the node never dialed the peer; then
    /// each change that found the queue full went from a task of its own, so a
    /// `decommission` followed by an `add_peer` of the same peer could reach the
    /// transport in the other order, and the re-added peer was never dialed.)
    pub(super) fn submit(
        backlog: &Arc<Mutex<LinkBacklog>>,
        tx: &mpsc::Sender<LinkCommand>,
        cmd: LinkCommand,
    ) {
        let mut b = backlog.lock().unwrap_or_else(|e| e.into_inner());
        if b.draining {
            b.queue.push_back(cmd);
            return;
        }
        match tx.try_send(cmd) {
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                b.queue.push_back(cmd);
                b.draining = true;
            }
            // Sent, or the transport is gone (so is every peer change).
            _ => return,
        }
        drop(b);
        let (backlog, tx) = (Arc::clone(backlog), tx.clone());
        tokio::spawn(async move {
            loop {
                let next = {
                    let mut b = backlog.lock().unwrap_or_else(|e| e.into_inner());
                    match b.queue.pop_front() {
                        Some(cmd) => cmd,
                        None => {
                            b.draining = false;
                            return;
                        }
                    }
                };
                if tx.send(next).await.is_err() {
                    let mut b = backlog.lock().unwrap_or_else(|e| e.into_inner());
                    b.queue.clear();
                    b.draining = false;
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(cmd: &LinkCommand) -> String {
        match cmd {
            LinkCommand::AddPeer { peer, .. } => format!("add {}", peer.0),
            LinkCommand::RemovePeer { peer } => format!("remove {}", peer.0),
            LinkCommand::Send { peer, .. } => format!("send {}", peer.0),
            _ => "other".into(),
        }
    }

    /// Peer changes reach the transport in the order they were made, whether or not
    /// its queue was full: a `decommission` that waited for room and an `add_peer` made
    /// once room was free arrive remove-then-add. (Regression: the add overtook the
    /// waiting remove, so the re-added peer was forgotten.)
    #[tokio::test(flavor = "current_thread")]
    async fn peer_changes_reach_the_transport_in_order_when_the_queue_was_full() {
        let (tx, mut rx) = mpsc::channel(1);
        let backlog = Arc::default();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        tx.try_send(LinkCommand::Send {
            peer: NodeId(9),
            frames: Vec::new(),
        })
        .unwrap();
        LinkBacklog::submit(&backlog, &tx, LinkCommand::RemovePeer { peer: NodeId(1) });
        // Room again before the waiting change was handed over.
        let mut got = vec![name(&rx.recv().await.unwrap())];
        LinkBacklog::submit(
            &backlog,
            &tx,
            LinkCommand::AddPeer {
                peer: NodeId(1),
                addr,
            },
        );
        LinkBacklog::submit(&backlog, &tx, LinkCommand::RemovePeer { peer: NodeId(2) });
        for _ in 0..3 {
            got.push(name(&rx.recv().await.unwrap()));
        }
        assert_eq!(got, ["send 9", "remove 1", "add 1", "remove 2"]);
        // Drained: the next change goes straight to the queue again.
        tokio::task::yield_now().await;
        assert!(!backlog.lock().unwrap().draining);
        LinkBacklog::submit(&backlog, &tx, LinkCommand::RemovePeer { peer: NodeId(3) });
        assert_eq!(name(&rx.try_recv().unwrap()), "remove 3");
    }
}
