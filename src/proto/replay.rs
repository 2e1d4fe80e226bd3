//! Hinted handoff policy, sans-IO: what goes into the hint store, when and what is
//! replayed from it, and the bookkeeping that keeps a handed-off message's id unsettled
//! at this node's endpoint until its hint is delivered, expires or is dropped.
//!
//! Owns the replay queues (hints read from the store, waiting their turn), the replay
//! throttle (bytes per second over all targets), the per-target concurrency bound, the
//! expiry schedule and the id floor of this run's own handed-off messages. Reaches the
//! store only through [`HintLog`] and the application's send windows only through
//! [`Windows`], both the owner's; every method takes `now` and reads no clock, so the
//! whole policy runs under the deterministic simulation and in the unit tests below
//! against an in-memory log. Hint times are wall-clock Unix milliseconds: the owner
//! gives the wall clock once, at [`Replay::new`], and hint times are that plus the
//! owner's clock since (so a virtual clock moves them, and a wall-clock step does not).

use super::sends::Hints;
use super::{Endpoint, Outgoing, SendRef};
use crate::handoff::{Hint, HintError, HintPos, ReplayThrottle};
use crate::id::{ChannelId, Guarantee, MessageId, NodeId, Origin};
use crate::wire::RejectReason;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// The hint store, as the replay policy uses it (the node's is a
/// [`HintStore`](crate::handoff::HintStore)). Every call is the store's IO; none reads
/// a clock.
pub(crate) trait HintLog {
    /// Store `hint` for its target, which has been Down for `down_for`.
    fn append(
        &mut self,
        hint: Hint,
        down_for: Option<Duration>,
        now: Instant,
    ) -> Result<(), HintError>;
    /// The next hints of `target` not yet handed out, up to about `max_bytes`, none
    /// expired at `now_unix_ms`.
    fn next_batch(
        &mut self,
        target: NodeId,
        max_bytes: u64,
        now_unix_ms: u64,
    ) -> Result<Vec<(HintPos, Hint)>, HintError>;
    /// The hint at `pos` was delivered.
    fn mark_delivered(&mut self, target: NodeId, pos: HintPos) -> Result<bool, HintError>;
    /// The hint at `pos` was refused for good by its target.
    fn mark_rejected(&mut self, target: NodeId, pos: HintPos) -> Result<bool, HintError>;
    /// Drop every hint expired at `now_unix_ms`; how many.
    fn expire(&mut self, now_unix_ms: u64) -> Result<u64, HintError>;
    /// Drop every hint for `target`; how many.
    fn decommission(&mut self, target: NodeId) -> Result<u64, HintError>;
    /// Hints not yet delivered, over all targets.
    fn pending(&self) -> u64;
    /// Targets with hints not yet delivered.
    fn pending_targets(&self) -> Vec<NodeId>;
    /// For each `(origin, channel)` stream of library-assigned ids among `target`'s
    /// undelivered hints (handed out or not), the lowest such seq.
    fn seq_floors(&self, target: NodeId) -> Vec<(Origin, ChannelId, u64)>;
    /// Group commit: fsync if the policy's interval has passed at `now`.
    fn sync_if_due(&mut self, now: Instant) -> Result<(), HintError>;
    /// When [`HintLog::sync_if_due`] next has work.
    fn next_sync_deadline(&self) -> Option<Instant>;
}

/// The application's per-(peer, channel) send windows: a replayed hint takes a slot
/// like any send, and gives it back when its stream's window slides.
pub(crate) trait Windows {
    /// Take one slot of the window to `peer` on `channel`; `false` if it is full.
    fn try_take(&mut self, peer: NodeId, channel: ChannelId) -> bool;
    /// Give back a slot [`Windows::try_take`] took for a send that did not happen.
    fn give_back(&mut self, peer: NodeId, channel: ChannelId);
}

/// The replay policy's settings (from the node's `HandoffConfig`).
#[derive(Clone, Debug)]
pub(crate) struct ReplayConfig {
    /// Hand off the messages of a target found Down, and new ones for it.
    pub(crate) on_down: bool,
    /// Hand off a message whose retries ran out.
    pub(crate) on_give_up: bool,
    /// Replay throttle, payload bytes per second over all targets.
    pub(crate) bytes_per_sec: NonZeroU64,
    /// Burst above the rate.
    pub(crate) burst: u64,
    /// Replayed hints awaiting their ack, per target.
    pub(crate) concurrency: usize,
    /// Bytes read from a target's log at a time.
    pub(crate) batch_bytes: u64,
    /// A hint's time to live (the store's default).
    pub(crate) ttl: Duration,
    /// The largest payload this run's transport can carry (the TCP frame limit less
    /// the frame's own bytes; unbounded for a transport given to the builder): an
    /// earlier run's hint above it can never be sent by this run and is dropped,
    /// counted as rejected.
    pub(crate) max_payload: usize,
}

/// How often replay and hint expiry are looked at while hints are pending.
pub(crate) const REPLAY_TICK: Duration = Duration::from_millis(10);
/// The first wait before a target whose replay was refused for now (no receiver on
/// the channel yet, its key table full) is replayed again; doubled on each further
/// refusal up to [`REFUSED_BACKOFF_MAX`], cleared by a replay it takes.
const REFUSED_BACKOFF: Duration = Duration::from_millis(100);
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often expiry is looked at.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// How often an unchanged settled floor of an earlier run is told again (the target
/// may have restarted and forgotten it, or the frame gone with a connection).
const SETTLED_AGAIN: Duration = Duration::from_secs(1);

/// The replay policy over a hint log `L`; see the module docs.
#[derive(Debug)]
pub(crate) struct Replay<L> {
    log: L,
    cfg: ReplayConfig,
    origin: Origin,
    throttle: ReplayThrottle,
    queued: HashMap<NodeId, VecDeque<(HintPos, Hint)>>,
    /// Targets and channels whose stream took no acked hint (this run sends
    /// at-most-once there, see [`Endpoint::takes_hint`]), warned once each. Their
    /// hints are passed over, left pending in the store (a later run that uses the
    /// channel with an acked guarantee replays them, or they expire), so the target's
    /// other hints go on.
    refused: HashSet<(NodeId, ChannelId)>,
    replaying: HashMap<SendRef, (HintPos, Hint)>,
    outstanding: HashMap<NodeId, usize>,
    /// This run's own handed-off messages, holding the id floor, with their expiry.
    own_hinted: BTreeMap<(NodeId, u32, u64), u64>,
    next_expire: Instant,
    /// The wall clock at `base`, in Unix ms.
    base: Instant,
    base_unix_ms: u64,
    /// The last replay round sent nothing and nothing is outstanding: every pending
    /// target is away. No fast tick then; the peer's return wakes the owner anyway.
    blocked: bool,
    /// The target the shared throttle last ran out on, and whether it had sent
    /// anything in that round: the next round starts after it if so, at it if not (it
    /// waits for the tokens), so every target with a backlog gets its turn.
    throttled_at: Option<(NodeId, bool)>,
    /// The settled floors of earlier runs' streams last told each target, and when.
    told: HashMap<(NodeId, Origin, ChannelId), (u64, Instant)>,
    /// Targets that refused a replay for now: not replayed to before the instant (set
    /// at the next replay round, `None` until then), and the wait the next refusal
    /// doubles.
    backoff: HashMap<NodeId, (Option<Instant>, Duration)>,
}

/// Does a replayed hint refused with `reason` stay in the store, to be replayed again
/// (refused for now), rather than be dropped? A receiver not registered yet, a full key
/// table, and a reason this build does not know (`Other`, from a newer peer: the
/// hint's TTL bounds the retries, and a final refusal would drop it).
pub(crate) fn refused_for_now(reason: RejectReason) -> bool {
    matches!(
        reason,
        RejectReason::NoReceiver | RejectReason::KeyTableFull | RejectReason::Other(_)
    )
}

impl<L: HintLog> Replay<L> {
    /// The policy over `log` for the run `origin`; `now` on the owner's clock is
    /// `unix_ms_now` on the wall clock.
    pub(crate) fn new(
        log: L,
        cfg: ReplayConfig,
        origin: Origin,
        now: Instant,
        unix_ms_now: u64,
    ) -> Self {
        Replay {
            throttle: ReplayThrottle::new(cfg.bytes_per_sec, cfg.burst, now),
            log,
            cfg,
            origin,
            queued: HashMap::new(),
            throttled_at: None,
            refused: HashSet::new(),
            replaying: HashMap::new(),
            outstanding: HashMap::new(),
            own_hinted: BTreeMap::new(),
            next_expire: now,
            base: now,
            base_unix_ms: unix_ms_now,
            blocked: false,
            told: HashMap::new(),
            backoff: HashMap::new(),
        }
    }

    /// The hint log.
    pub(crate) fn log(&self) -> &L {
        &self.log
    }

    /// The hint log, to flush or close it.
    pub(crate) fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }

    /// The wall clock (Unix ms) at the owner's `now`.
    fn unix_ms_at(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.base).as_millis();
        self.base_unix_ms
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// Are there hints to replay (queued here or pending in the log)?
    pub(crate) fn has_replay_work(&self) -> bool {
        self.log.pending() > 0 || self.queued.values().any(|q| !q.is_empty())
    }

    fn expire(&mut self, endpoint: &mut Endpoint, now: Instant) {
        self.next_expire = now + EXPIRE_EVERY;
        let now_ms = self.unix_ms_at(now);
        if let Err(e) = self.log.expire(now_ms) {
            tracing::warn!(error = %e, "hint expiry failed");
        }
        // Hints read from the store and not sent yet expire with it: never replayed
        // after their TTL, which the id floor below passes. (The store fills in a TTL
        // of 0 at append; one left 0 is not judged here.)
        for q in self.queued.values_mut() {
            q.retain(|(_, h)| h.ttl_ms == 0 || h.expires_unix_ms() > now_ms);
        }
        // A replay in flight keeps its message's floor until it is done (its
        // retransmissions carry the floor: past it, the receiver would ack a copy
        // it never processed as a duplicate). (Regression: a hint that expired while
        // its replay was in flight was reported replayed, never processed.)
        let in_flight: HashSet<(NodeId, u32, u64)> = self
            .replaying
            .iter()
            .filter_map(|(send, (_, h))| match h.id {
                MessageId::Seq {
                    origin,
                    channel,
                    seq,
                } if origin == self.origin => Some((send.peer, channel.0, seq)),
                _ => None,
            })
            .collect();
        let expired: Vec<_> = self
            .own_hinted
            .iter()
            .filter(|(k, exp)| **exp <= now_ms && !in_flight.contains(k))
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            self.own_hinted.remove(&k);
            endpoint.hint_settled(SendRef {
                peer: k.0,
                channel: ChannelId(k.1),
                seq: k.2,
            });
        }
    }

    fn replay(
        &mut self,
        endpoint: &mut Endpoint,
        ready: &[NodeId],
        windows: &mut dyn Windows,
        now: Instant,
    ) {
        let mut targets = self.log.pending_targets();
        targets.extend(self.queued.keys().copied());
        targets.sort_unstable();
        targets.dedup();
        if let Some((last, served)) = self.throttled_at.take() {
            // Start after the target that used up the throttle last round, or at the
            // one it left waiting. (Regression: the lowest id always went first, so
            // one large backlog took every token and the other targets' hints waited
            // until it was empty, or expired.)
            let first = targets.partition_point(|t| if served { *t <= last } else { *t < last });
            targets.rotate_left(first);
        }
        let now_ms = self.unix_ms_at(now);
        self.blocked = true;
        for target in targets.into_iter().filter(|t| ready.contains(t)) {
            self.tell_settled(endpoint, target, now);
            if let Some((until, wait)) = self.backoff.get_mut(&target) {
                let until = *until.get_or_insert(now + *wait);
                if now < until {
                    self.blocked = false; // waiting out a refusal: come back soon
                    continue;
                }
            }
            let mut passed_over = false;
            let mut served = false;
            while self.outstanding.get(&target).copied().unwrap_or(0) < self.cfg.concurrency {
                let queue = self.queued.entry(target).or_default();
                if queue.is_empty() {
                    if passed_over {
                        // Hints passed over are read a batch per tick, not a whole
                        // backlog in one. (Regression: counting their payload bytes,
                        // empty payloads never reached the limit.)
                        self.blocked = false;
                        break;
                    }
                    match self.log.next_batch(target, self.cfg.batch_bytes, now_ms) {
                        Ok(batch) if !batch.is_empty() => queue.extend(batch),
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(%target, error = %e, "reading hints failed");
                            break;
                        }
                    }
                }
                let Some((_, hint)) = queue.front() else {
                    break;
                };
                let (channel, len) = (hint.channel, hint.payload.len() as u64);
                if hint.payload.len() > self.cfg.max_payload {
                    // An earlier run's hint, larger than this run may send: its frames
                    // would be dropped by the transport on every retransmission until
                    // the hint's TTL. (Regression: a 200 KiB hint after a redeploy
                    // with a 64 KiB frame limit was replayed into the transport's
                    // oversize drop about once a second, and nobody was told.)
                    let Some((pos, hint)) = queue.pop_front() else {
                        break;
                    };
                    tracing::warn!(
                        %target, id = %hint.id, len = hint.payload.len(),
                        max_payload = self.cfg.max_payload,
                        "hint larger than this run's transport can send; dropped from the store"
                    );
                    if let Err(e) = self.log.mark_rejected(target, pos) {
                        tracing::warn!(%target, error = %e, "dropping a hint failed; it may replay again");
                    }
                    self.release_floor(endpoint, target, hint.id);
                    continue;
                }
                if !endpoint.takes_hint(target, channel, hint.guarantee) {
                    // Passed over, not left in front: the target's other hints go on.
                    // (Regression: it stayed at the front and held up every channel's
                    // hints for the target until its TTL.) It stays pending in the
                    // store, and this run does not read it again: it replays in a
                    // later run (or expires at its TTL), even if the channel could
                    // take it later in this one.
                    let Some((_, hint)) = queue.pop_front() else {
                        break;
                    };
                    self.refuse(target, &hint);
                    passed_over = true;
                    continue;
                }
                // The window first: bytes taken from the throttle for a hint that then
                // found its window full were spent on nothing, every tick, starving
                // the other targets' replays while a live sender kept that window full.
                if !windows.try_take(target, channel) {
                    break; // the stream's window is full; next tick
                }
                if self.throttle.try_take(len, now).is_err() {
                    windows.give_back(target, channel);
                    self.blocked = false; // throttled, not blocked: come back soon
                    self.throttled_at = Some((target, served));
                    return; // the throttle covers every target
                }
                let Some((pos, hint)) = queue.pop_front() else {
                    windows.give_back(target, channel);
                    break;
                };
                let msg = Outgoing {
                    peer: target,
                    channel: hint.channel,
                    guarantee: hint.guarantee,
                    payload: hint.payload.clone(),
                    id: Some(hint.id),
                    deadline: None,
                    schema: 0, // a hint keeps no type: unchecked
                };
                match endpoint.send_hint(now, msg) {
                    Ok(send) => {
                        // The slot is given back when the window slides.
                        *self.outstanding.entry(target).or_default() += 1;
                        self.replaying.insert(send, (pos, hint));
                        served = true;
                    }
                    Err(e) => {
                        // `takes_hint` said yes: not expected; passed over all the same.
                        tracing::debug!(%target, error = %e, ?pos, "hint refused by its stream");
                        windows.give_back(target, channel);
                        self.refuse(target, &hint);
                    }
                }
            }
        }
        if !self.replaying.is_empty() {
            self.blocked = false; // acks are coming back: keep the fast tick
        }
    }

    /// `hint`'s channel to `target` takes no acked hint this run: passed over (it stays
    /// pending in the store); warned once per target and channel.
    fn refuse(&mut self, target: NodeId, hint: &Hint) {
        if self.refused.insert((target, hint.channel)) {
            tracing::warn!(
                %target, channel = ?hint.channel, guarantee = ?hint.guarantee,
                "an earlier run's hints cannot be replayed on this channel while this run sends at-most-once there; they stay in the store for a later run that uses the channel at-least-once or effectively-once, or until their TTL"
            );
        }
    }

    /// Tell `target` the settled floor of every stream of an earlier run of this node
    /// whose hints for it are pending here, when it rose or was last told
    /// [`SETTLED_AGAIN`] ago. That run is over (this run holds its hint store), so every
    /// seq of its stream below its lowest pending hint is settled: delivered, or never
    /// to be sent. Without it, a target whose dedup window for that stream sits below
    /// a seq it never saw (acked by a previous run of the target that forgot it, or
    /// lost with the earlier run) refuses every replay more than a window above it,
    /// forever. (Regression: 8 171 of 9 000 hints replayed, the rest refused as window
    /// overruns until their TTL.)
    fn tell_settled(&mut self, endpoint: &mut Endpoint, target: NodeId, now: Instant) {
        for (origin, channel, floor) in self.log.seq_floors(target) {
            if origin.node != self.origin.node || origin == self.origin {
                continue;
            }
            // Not past a replay in flight: its hint may have left the store (expired)
            // while its retransmissions still go.
            let floor = self
                .replaying
                .values()
                .filter_map(|(_, h)| match h.id {
                    MessageId::Seq {
                        origin: o,
                        channel: c,
                        seq,
                    } if h.target == target && o == origin && c == channel => Some(seq),
                    _ => None,
                })
                .fold(floor, u64::min);
            let key = (target, origin, channel);
            let due = self
                .told
                .get(&key)
                .is_none_or(|&(told, at)| floor != told || now >= at + SETTLED_AGAIN);
            if due && endpoint.send_settled(target, origin.incarnation, channel, floor) {
                self.told.insert(key, (floor, now));
            }
        }
    }

    /// Drop every hint for `peer` (decommissioned). Returns how many were dropped.
    pub(crate) fn decommission(
        &mut self,
        peer: NodeId,
        endpoint: &mut Endpoint,
    ) -> Result<u64, HintError> {
        let n = self.log.decommission(peer)?;
        self.queued.remove(&peer);
        self.refused.retain(|k| k.0 != peer);
        self.told.retain(|k, _| k.0 != peer);
        // Replays in flight are taken out of their streams too (their queued frames
        // withdrawn): otherwise they would be retransmitted to the next process with
        // the peer's id. (Regression: all 20 were processed there.)
        let in_flight: Vec<SendRef> = self
            .replaying
            .keys()
            .filter(|s| s.peer == peer)
            .copied()
            .collect();
        for send in in_flight {
            self.replaying.remove(&send);
            endpoint.abandon(send);
        }
        self.outstanding.remove(&peer);
        let own: Vec<_> = self
            .own_hinted
            .keys()
            .filter(|k| k.0 == peer)
            .copied()
            .collect();
        for k in own {
            self.own_hinted.remove(&k);
            endpoint.hint_settled(SendRef {
                peer,
                channel: ChannelId(k.1),
                seq: k.2,
            });
        }
        Ok(n)
    }

    fn release_floor(&mut self, endpoint: &mut Endpoint, peer: NodeId, id: MessageId) {
        if let MessageId::Seq {
            origin,
            channel,
            seq,
        } = id
        {
            if origin == self.origin && self.own_hinted.remove(&(peer, channel.0, seq)).is_some() {
                endpoint.hint_settled(SendRef { peer, channel, seq });
            }
        }
    }

    /// A replayed `send` is done: acked, or (`rejected`) refused for good.
    fn replay_done(&mut self, send: SendRef, endpoint: &mut Endpoint, rejected: bool) -> bool {
        let Some((pos, hint)) = self.replaying.remove(&send) else {
            return false;
        };
        if !rejected {
            self.backoff.remove(&send.peer); // it takes replays again
        }
        if let Some(n) = self.outstanding.get_mut(&send.peer) {
            *n = n.saturating_sub(1);
        }
        let marked = if rejected {
            self.log.mark_rejected(send.peer, pos)
        } else {
            self.log.mark_delivered(send.peer, pos)
        };
        if let Err(e) = marked {
            tracing::warn!(target = %send.peer, error = %e, "marking a hint delivered failed; it may replay again");
        }
        self.release_floor(endpoint, send.peer, hint.id);
        true
    }
}

/// The handoff decisions ([`crate::proto::sends`]) reach the store through this.
impl<L: HintLog> Hints for Replay<L> {
    fn on_down(&self) -> bool {
        self.cfg.on_down
    }

    fn on_give_up(&self) -> bool {
        self.cfg.on_give_up
    }

    /// Store `payload` (sent as `send` with `id`) as a hint for `send.peer`.
    fn store(
        &mut self,
        send: SendRef,
        id: MessageId,
        guarantee: Guarantee,
        payload: Bytes,
        down_for: Option<Duration>,
        now: Instant,
    ) -> Result<(), HintError> {
        let hint = Hint {
            target: send.peer,
            id,
            channel: send.channel,
            guarantee,
            created_unix_ms: self.unix_ms_at(now),
            ttl_ms: 0,
            payload,
        };
        let ttl_ms = u64::try_from(self.cfg.ttl.as_millis()).unwrap_or(u64::MAX);
        let expires = hint.created_unix_ms.saturating_add(ttl_ms);
        self.log.append(hint, down_for, now)?;
        if let MessageId::Seq {
            origin,
            channel,
            seq,
        } = id
        {
            if origin == self.origin {
                self.own_hinted.insert((send.peer, channel.0, seq), expires);
            }
        }
        Ok(())
    }

    fn has_replay_work(&self) -> bool {
        Replay::has_replay_work(self)
    }

    /// The log's group commit, hint expiry (which also releases the id floor of this
    /// run's expired hints), then replay to the `ready` targets (not Down, connected)
    /// as far as the throttle, the per-target concurrency bound and the windows allow.
    fn handle_timeout(
        &mut self,
        endpoint: &mut Endpoint,
        ready: &[NodeId],
        windows: &mut dyn Windows,
        now: Instant,
    ) {
        if let Err(e) = self.log.sync_if_due(now) {
            tracing::warn!(error = %e, "hint store sync failed");
        }
        if now >= self.next_expire {
            self.expire(endpoint, now);
        }
        if Replay::has_replay_work(self) {
            self.replay(endpoint, ready, windows, now);
        }
    }

    /// `send` was acknowledged. Returns whether it was a replayed hint.
    fn on_settled(&mut self, send: SendRef, endpoint: &mut Endpoint) -> bool {
        self.replay_done(send, endpoint, false)
    }

    /// `send` was rejected by its receiver. If it was a replay: a refusal for now (no
    /// receiver on the channel yet, or its key table full until keys expire) sends the
    /// hint back to its queue; any other reason is final, so the hint is dropped from
    /// the store, counted in `HintStats::rejected` (logged at warn: the receiver's
    /// dead letters hold what it dead-lettered). (Regression: a hint refused because
    /// the key table was full was dropped and counted delivered, never processed.)
    /// Returns `true` for a replay.
    fn on_rejected(
        &mut self,
        send: SendRef,
        reason: RejectReason,
        endpoint: &mut Endpoint,
    ) -> bool {
        // Refused for now: back in its queue, and the target waits (backed off) before
        // the next replay, rather than being sent the hint again every tick.
        if refused_for_now(reason) {
            // Doubled once per round of refusals (several replays in flight may be
            // refused at once).
            let wait = match self.backoff.get(&send.peer) {
                None => REFUSED_BACKOFF,
                Some((None, w)) => *w,
                Some((Some(_), w)) => (*w * 2).min(REFUSED_BACKOFF_MAX),
            };
            if self.replaying.contains_key(&send) {
                self.backoff.insert(send.peer, (None, wait));
            }
            return self.on_gave_up(send);
        }
        let Some(id) = self.replaying.get(&send).map(|(_, h)| h.id) else {
            return false;
        };
        tracing::warn!(target = %send.peer, %id, %reason, "hint rejected by its target; dropped from the store");
        self.replay_done(send, endpoint, true)
    }

    /// `send` was given up. If it was a replay, it goes back into its queue (still
    /// in the store), in the store's order, and `true` is returned.
    fn on_gave_up(&mut self, send: SendRef) -> bool {
        let Some((pos, hint)) = self.replaying.remove(&send) else {
            return false;
        };
        if let Some(n) = self.outstanding.get_mut(&send.peer) {
            *n = n.saturating_sub(1);
        }
        // Where it was, not at the front: replays given up (or refused) together come
        // back in ascending order, and each at the front reversed them. (Regression:
        // a backlog replayed again after its target flapped went out newest first.)
        let queue = self.queued.entry(send.peer).or_default();
        let at = queue.partition_point(|(p, _)| *p < pos);
        queue.insert(at, (pos, hint));
        true
    }

    /// When the owner must call [`Hints::handle_timeout`]: the fsync deadline; the
    /// replay tick while hints can be replayed; the expiry check while hints (or this
    /// run's handed-off ids) await their TTL.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let work = self.has_replay_work();
        let tick = if work && !self.blocked {
            Some(now + REPLAY_TICK)
        } else if work || !self.own_hinted.is_empty() {
            Some(self.next_expire.max(now))
        } else {
            None
        };
        match (self.log.next_sync_deadline(), tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The replay policy against an in-memory log, on a virtual clock.
    use super::*;
    use crate::dedup::{Dedup, DedupConfig};
    use crate::proto::ProtoConfig;
    use std::sync::Arc;

    const ME: Origin = Origin {
        node: NodeId(1),
        incarnation: 1,
    };
    const PEER: NodeId = NodeId(2);
    const OTHER: NodeId = NodeId(3);
    const CH: ChannelId = ChannelId(7);
    const T0_UNIX_MS: u64 = 1_700_000_000_000;

    /// Hints per target in memory; records what the policy asked of it.
    #[derive(Debug, Default)]
    struct MemLog {
        waiting: BTreeMap<NodeId, VecDeque<(HintPos, Hint)>>,
        out: usize,
        next: u64,
        delivered: Vec<HintPos>,
        rejected: Vec<HintPos>,
        expired_at: Vec<u64>,
        handed: BTreeMap<HintPos, Hint>,
    }

    impl HintLog for MemLog {
        fn append(
            &mut self,
            mut h: Hint,
            _: Option<Duration>,
            _: Instant,
        ) -> Result<(), HintError> {
            // As the store does: a TTL of 0 is its default (the tests' config: 60 s).
            if h.ttl_ms == 0 {
                h.ttl_ms = 60_000;
            }
            self.next += 1;
            let pos = HintPos {
                segment: 1,
                offset: self.next,
            };
            self.waiting
                .entry(h.target)
                .or_default()
                .push_back((pos, h));
            Ok(())
        }
        fn next_batch(
            &mut self,
            target: NodeId,
            max_bytes: u64,
            _: u64,
        ) -> Result<Vec<(HintPos, Hint)>, HintError> {
            let q = self.waiting.entry(target).or_default();
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(h) = q.front() {
                // Counted as the store counts: record bytes, a header and the payload.
                let len = 32 + h.1.payload.len() as u64;
                if !batch.is_empty() && bytes + len > max_bytes {
                    break;
                }
                bytes += len;
                batch.extend(q.pop_front());
            }
            self.out += batch.len();
            self.handed.extend(batch.iter().cloned());
            Ok(batch)
        }
        fn mark_delivered(&mut self, _: NodeId, pos: HintPos) -> Result<bool, HintError> {
            // A hint dropped meanwhile (expired) is unknown, as in the store.
            let known = self.handed.remove(&pos).is_some();
            self.out -= usize::from(known);
            self.delivered.push(pos);
            Ok(known)
        }
        fn mark_rejected(&mut self, _: NodeId, pos: HintPos) -> Result<bool, HintError> {
            let known = self.handed.remove(&pos).is_some();
            self.out -= usize::from(known);
            self.rejected.push(pos);
            Ok(known)
        }
        fn expire(&mut self, now_unix_ms: u64) -> Result<u64, HintError> {
            // As the store does: expired hints go, also those handed out in a batch.
            self.expired_at.push(now_unix_ms);
            let live = |h: &Hint| h.expires_unix_ms() > now_unix_ms;
            let before = self.pending();
            for q in self.waiting.values_mut() {
                q.retain(|(_, h)| live(h));
            }
            let handed = self.handed.len();
            self.handed.retain(|_, h| live(h));
            self.out -= handed - self.handed.len();
            Ok(before - self.pending())
        }
        fn decommission(&mut self, target: NodeId) -> Result<u64, HintError> {
            let out = if target == PEER {
                std::mem::take(&mut self.out) // the tests' handed-out hints are PEER's
            } else {
                0
            };
            Ok(self.waiting.remove(&target).map_or(0, |q| q.len()) as u64 + out as u64)
        }
        fn pending(&self) -> u64 {
            (self.waiting.values().map(VecDeque::len).sum::<usize>() + self.out) as u64
        }
        fn pending_targets(&self) -> Vec<NodeId> {
            let mut t: Vec<_> = self
                .waiting
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(t, _)| *t)
                .collect();
            if self.out > 0 {
                t.push(PEER); // the tests' hints handed out are all PEER's
            }
            t
        }
        fn seq_floors(&self, target: NodeId) -> Vec<(Origin, ChannelId, u64)> {
            let mut floors: BTreeMap<(Origin, ChannelId), u64> = BTreeMap::new();
            let waiting = self
                .waiting
                .get(&target)
                .into_iter()
                .flatten()
                .map(|e| &e.1);
            let handed = self.handed.values().filter(|h| h.target == target);
            for h in waiting.chain(handed) {
                if h.guarantee != Guarantee::EffectivelyOnce {
                    continue;
                }
                if let MessageId::Seq {
                    origin,
                    channel,
                    seq,
                } = h.id
                {
                    let f = floors.entry((origin, channel)).or_insert(seq);
                    *f = (*f).min(seq);
                }
            }
            floors.into_iter().map(|((o, c), f)| (o, c, f)).collect()
        }
        fn sync_if_due(&mut self, _: Instant) -> Result<(), HintError> {
            Ok(())
        }
        fn next_sync_deadline(&self) -> Option<Instant> {
            None
        }
    }

    /// Windows of `cap` slots each, counting what was taken and given back.
    struct Slots {
        cap: usize,
        held: HashMap<(NodeId, ChannelId), usize>,
    }

    impl Windows for Slots {
        fn try_take(&mut self, peer: NodeId, channel: ChannelId) -> bool {
            let n = self.held.entry((peer, channel)).or_default();
            if *n >= self.cap {
                return false;
            }
            *n += 1;
            true
        }
        fn give_back(&mut self, peer: NodeId, channel: ChannelId) {
            let n = self.held.entry((peer, channel)).or_default();
            *n = n.checked_sub(1).expect("gave back a slot never taken");
        }
    }

    fn slots(cap: usize) -> Slots {
        Slots {
            cap,
            held: HashMap::new(),
        }
    }

    fn endpoint(now: Instant) -> Endpoint {
        let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap());
        Endpoint::new(ME, ProtoConfig::default(), dedup, 1)
    }

    fn config() -> ReplayConfig {
        ReplayConfig {
            on_down: true,
            on_give_up: true,
            bytes_per_sec: NonZeroU64::new(1_000_000).unwrap(),
            burst: 1_000_000,
            concurrency: 1024,
            batch_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            max_payload: 1 << 20,
        }
    }

    /// `n` hints of `len` bytes for `target` in the log, ids from another node's run
    /// (so they hold no floor here); payload byte `i` tells them apart.
    fn log_with(target: NodeId, n: u8, len: usize) -> MemLog {
        let mut log = MemLog::default();
        for i in 0..n {
            let id = MessageId::Seq {
                origin: Origin {
                    node: NodeId(9),
                    incarnation: 1,
                },
                channel: CH,
                seq: u64::from(i) + 1,
            };
            let hint = Hint {
                target,
                id,
                channel: CH,
                guarantee: Guarantee::EffectivelyOnce,
                created_unix_ms: T0_UNIX_MS,
                ttl_ms: 0,
                payload: Bytes::from(vec![i; len]),
            };
            log.append(hint, None, Instant::now()).unwrap();
        }
        log
    }

    /// The payload bytes of the hints being replayed, in send order.
    fn in_flight(r: &Replay<MemLog>) -> Vec<(SendRef, u8)> {
        let mut v: Vec<_> = r
            .replaying
            .iter()
            .map(|(s, (_, h))| (*s, h.payload[0]))
            .collect();
        v.sort_by_key(|(s, _)| s.seq);
        v
    }

    /// The throttle paces replay (bytes per second over all targets), the per-target
    /// concurrency bound caps what awaits an ack, and a settled replay frees a place.
    #[test]
    fn replay_is_paced_by_the_throttle_and_bounded_per_target() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let cfg = ReplayConfig {
            bytes_per_sec: NonZeroU64::new(1000).unwrap(),
            burst: 100,
            concurrency: 3,
            ..config()
        };
        let mut r = Replay::new(log_with(PEER, 10, 50), cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        assert_eq!(
            in_flight(&r).len(),
            2,
            "a 100-byte burst is two 50-byte hints"
        );
        // 50 ms later the bucket holds 50 more bytes: one more.
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0 + Duration::from_millis(50));
        assert_eq!(in_flight(&r).len(), 3);
        // Plenty of tokens later, the concurrency bound (3) holds.
        let t1 = t0 + Duration::from_secs(1);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1);
        assert_eq!(in_flight(&r).len(), 3);
        assert!(r.next_deadline(t1).is_some_and(|d| d <= t1 + REPLAY_TICK));
        // One acked: it is marked delivered and the next hint goes.
        let (first, byte) = in_flight(&r)[0];
        assert_eq!(byte, 0, "hints replay in log order");
        assert!(r.on_settled(first, &mut ep));
        assert_eq!(r.log.delivered.len(), 1);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1);
        let bytes: Vec<u8> = in_flight(&r).iter().map(|(_, b)| *b).collect();
        assert_eq!(bytes, vec![1, 2, 3]);
        assert_eq!(w.held[&(PEER, CH)], 4, "every replay took a window slot");
    }

    /// Replays given up together (their target dropped out again) go back in the
    /// store's order: the next round replays them oldest first, as the first did.
    /// The same for replays refused for now (no receiver yet). (Regression: each was
    /// put at the front of the queue, reversing them.)
    #[test]
    fn replays_given_up_or_refused_together_come_back_in_order() {
        for refused in [false, true] {
            let t0 = Instant::now();
            let mut ep = endpoint(t0);
            let cfg = ReplayConfig {
                concurrency: 4,
                ..config()
            };
            let mut r = Replay::new(log_with(PEER, 10, 10), cfg, ME, t0, T0_UNIX_MS);
            let mut w = slots(100);
            r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
            let sent = in_flight(&r);
            assert_eq!(
                sent.iter().map(|(_, b)| *b).collect::<Vec<_>>(),
                [0, 1, 2, 3]
            );
            for (send, _) in &sent {
                let back = if refused {
                    r.on_rejected(*send, RejectReason::NoReceiver, &mut ep)
                } else {
                    r.on_gave_up(*send)
                };
                assert!(back);
                w.give_back(PEER, CH);
            }
            // (A refusal backs the target off 100 ms from the next round.)
            let later = t0 + Duration::from_secs(10);
            r.handle_timeout(&mut ep, &[PEER], &mut w, later);
            r.handle_timeout(&mut ep, &[PEER], &mut w, later + Duration::from_secs(1));
            let again: Vec<u8> = in_flight(&r).iter().map(|(_, b)| *b).collect();
            assert_eq!(again, [0, 1, 2, 3], "refused: {refused}");
        }
    }

    /// The shared throttle serves every returning target in turn: a large backlog of
    /// one (lower id, acking fast) does not keep another's single hint waiting until
    /// it is empty. (Regression: the lowest id always went first and took every
    /// token, about 100 s here.)
    #[test]
    fn the_throttle_serves_every_target_in_turn() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let cfg = ReplayConfig {
            bytes_per_sec: NonZeroU64::new(10_000).unwrap(),
            burst: 10_000,
            ..config()
        };
        let mut log = log_with(PEER, 200, 1000);
        let mut other = log_with(OTHER, 1, 1000);
        for (_, hint) in other.waiting.remove(&OTHER).unwrap() {
            log.append(hint, None, t0).unwrap();
        }
        let mut r = Replay::new(log, cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(usize::MAX);
        for tick in 0..100u32 {
            let now = t0 + Duration::from_millis(10) * tick;
            r.handle_timeout(&mut ep, &[PEER, OTHER], &mut w, now);
            if r.replaying.keys().any(|s| s.peer == OTHER) {
                return; // within the second
            }
            let to_peer: Vec<SendRef> = r.replaying.keys().copied().collect();
            for send in to_peer {
                r.on_settled(send, &mut ep);
            }
        }
        panic!("the other target's hint was not replayed within 1 s");
    }

    /// A channel other than `CH`, for the passed-over tests.
    const OTHER_CH: ChannelId = ChannelId(8);

    /// An endpoint whose peer is up and whose run sends at-most-once on `CH`, and a
    /// log of an earlier run's at-least-once hints: `(channel, payload)` each.
    fn amo_run_with_hints(
        t0: Instant,
        hints: impl IntoIterator<Item = (ChannelId, Bytes)>,
    ) -> (Endpoint, MemLog) {
        let mut ep = endpoint(t0);
        ep.handle_peer_up(
            t0,
            Origin {
                node: PEER,
                incarnation: 1,
            },
            4,
        );
        let mut log = MemLog::default();
        for (i, (channel, payload)) in hints.into_iter().enumerate() {
            let hint = Hint {
                target: PEER,
                id: MessageId::Key(crate::id::IdKey(i as u128)),
                channel,
                guarantee: Guarantee::AtLeastOnce,
                created_unix_ms: T0_UNIX_MS,
                ttl_ms: 0,
                payload,
            };
            log.append(hint, None, t0).unwrap();
        }
        ep.send(
            t0,
            Outgoing {
                peer: PEER,
                channel: CH,
                guarantee: Guarantee::AtMostOnce,
                payload: Bytes::from_static(b"this run"),
                id: None,
                deadline: None,
                schema: 0,
            },
        )
        .unwrap();
        (ep, log)
    }

    /// Hints whose channel this run sends at-most-once cannot go on its stream: they
    /// are passed over (left pending in the store, for a later run), warned once, and
    /// the target's hints for other channels, queued behind them, are replayed
    /// meanwhile; a backlog of them is read a batch per tick, not all at once.
    /// (Regression: the first such hint stayed at the front of the target's queue and
    /// held up all of them until its TTL.)
    #[test]
    fn hints_a_channel_cannot_take_are_passed_over_and_the_others_replay() {
        let t0 = Instant::now();
        let (mut ep, log) = amo_run_with_hints(
            t0,
            (0..6u8).map(|i| {
                let channel = if i % 2 == 0 { CH } else { OTHER_CH };
                (channel, Bytes::from(vec![i; 100]))
            }),
        );
        let cfg = ReplayConfig {
            batch_bytes: 150,
            ..config()
        };
        let mut r = Replay::new(log, cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        let mut t = t0;
        for _ in 0..10 {
            r.handle_timeout(&mut ep, &[PEER], &mut w, t);
            t += REPLAY_TICK;
        }
        let bytes: Vec<u8> = in_flight(&r).iter().map(|(_, b)| *b).collect();
        assert_eq!(bytes, [1, 3, 5], "the other channel's hints go");
        assert_eq!(r.refused.len(), 1);
        assert!(r.refused.contains(&(PEER, CH)));
        assert_eq!(w.held.get(&(PEER, CH)).copied().unwrap_or(0), 0);
        for (send, _) in in_flight(&r) {
            assert!(r.on_settled(send, &mut ep));
        }
        assert_eq!(r.log.delivered.len(), 3);
        assert_eq!(
            r.log.pending(),
            3,
            "the passed-over hints stay in the store"
        );
        assert!(r.queued.values().all(|q| q.is_empty()), "and not in memory");
        r.handle_timeout(&mut ep, &[PEER], &mut w, t);
        assert!(
            r.next_deadline(t).is_some_and(|d| d > t + REPLAY_TICK),
            "no fast tick for hints that cannot go"
        );
        // The run's at-most-once stream takes none; a stream claimed at-least-once
        // takes effectively-once hints as well.
        assert!(!ep.takes_hint(PEER, CH, Guarantee::AtLeastOnce));
        assert!(ep.takes_hint(PEER, OTHER_CH, Guarantee::EffectivelyOnce));
    }

    /// Hints passed over are read a batch per tick however small they are: 200 empty
    /// hints for a channel this run sends at-most-once on, then one for another
    /// channel. One tick reads one batch (10 hints of `batch_bytes`), and the other
    /// channel's hint still goes, a few ticks later.
    #[test]
    fn hints_passed_over_are_read_a_batch_per_tick_even_when_empty() {
        let t0 = Instant::now();
        let (mut ep, log) = amo_run_with_hints(
            t0,
            (0..201).map(|i| (if i < 200 { CH } else { OTHER_CH }, Bytes::new())),
        );
        let cfg = ReplayConfig {
            batch_bytes: 320,
            ..config()
        };
        let mut r = Replay::new(log, cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        assert_eq!(r.log.out, 10, "one batch read in the first tick");
        assert!(
            r.next_deadline(t0).is_some_and(|d| d <= t0 + REPLAY_TICK),
            "and the next tick comes soon"
        );
        let mut t = t0;
        for _ in 0..25 {
            t += REPLAY_TICK;
            r.handle_timeout(&mut ep, &[PEER], &mut w, t);
        }
        assert_eq!(r.log.out, 201, "all read, a batch at a time");
        assert_eq!(r.replaying.len(), 1, "the other channel's hint goes");
        assert_eq!(r.log.pending(), 201, "nothing dropped from the store");
    }

    /// Replaying hints of an earlier run of this node, the policy tells the target the
    /// lowest seq of that run's stream still pending (`Frame::Settled`): when it rises,
    /// and again a second later; never for this run's own hints or another node's.
    #[test]
    fn an_earlier_runs_settled_floor_is_told_when_it_rises_and_again_later() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        ep.handle_peer_up(
            t0,
            Origin {
                node: PEER,
                incarnation: 1,
            },
            4,
        );
        let earlier = Origin {
            node: ME.node,
            incarnation: 5,
        };
        let stranger = Origin {
            node: NodeId(9),
            incarnation: 1,
        };
        let mut log = MemLog::default();
        for (origin, seq) in [
            (earlier, 20),
            (earlier, 40),
            (earlier, 30),
            (earlier, 50),
            (ME, 3),
            (stranger, 1),
        ] {
            let hint = Hint {
                target: PEER,
                id: MessageId::Seq {
                    origin,
                    channel: CH,
                    seq,
                },
                channel: CH,
                guarantee: Guarantee::EffectivelyOnce,
                // 50 is stored 30 s later: it outlives the others.
                created_unix_ms: T0_UNIX_MS + if seq == 50 { 30_000 } else { 0 },
                ttl_ms: 0,
                payload: Bytes::from_static(b"h"),
            };
            log.append(hint, None, t0).unwrap();
        }
        let cfg = ReplayConfig {
            concurrency: 1,
            ..config()
        };
        let mut r = Replay::new(log, cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        let told = |ep: &mut Endpoint, now| -> Vec<crate::wire::Settled> {
            let mut v = Vec::new();
            while let Some((peer, f)) = ep.poll_transmit(now) {
                if let crate::wire::Frame::Settled(s) = f {
                    assert_eq!(peer, PEER);
                    v.push(s);
                }
            }
            v
        };
        let settled = |id_floor| crate::wire::Settled {
            incarnation: 5,
            channel: CH,
            id_floor,
        };
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        assert_eq!(told(&mut ep, t0), vec![settled(20)]);
        let t1 = t0 + REPLAY_TICK;
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1);
        assert_eq!(told(&mut ep, t1), vec![], "unchanged: not told again yet");
        let (first, _) = in_flight(&r)[0];
        assert!(r.on_settled(first, &mut ep)); // seq 20 delivered
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1);
        assert_eq!(told(&mut ep, t1), vec![settled(30)], "rose");
        let t2 = t1 + SETTLED_AGAIN;
        r.handle_timeout(&mut ep, &[PEER], &mut w, t2);
        assert_eq!(told(&mut ep, t2), vec![settled(30)], "told again");
        // The TTL (60 s) passes with the replay of 40 (the store's order) unanswered:
        // the store drops 30 and 40 but keeps a later hint, 50. The floor told is 40,
        // not past the replay in flight, whose retransmissions still go. (Regression:
        // 50 was told, and the target would ack 40 as a duplicate it never processed.)
        assert_eq!(in_flight(&r).len(), 1);
        let t3 = t0 + Duration::from_secs(61);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t3);
        assert!(r.log.pending() > 0, "50 is still pending");
        assert_eq!(told(&mut ep, t3), vec![settled(40)]);
    }

    /// A target that is not reachable gets nothing, and while every pending target is
    /// away the policy asks for no fast tick (only the expiry check).
    #[test]
    fn an_unreachable_target_gets_nothing_and_no_fast_tick() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let mut r = Replay::new(log_with(PEER, 3, 10), config(), ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        r.handle_timeout(&mut ep, &[OTHER], &mut w, t0);
        assert!(in_flight(&r).is_empty());
        assert!(r.has_replay_work());
        assert_eq!(r.next_deadline(t0), Some(t0 + EXPIRE_EVERY));
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        assert_eq!(in_flight(&r).len(), 3);
    }

    /// A full window stops a target's replay until a slot is free; nothing is given
    /// back that was not taken, a hint stays queued, in order, meanwhile, and ticks
    /// against the full window take nothing from the throttle. (Regression: each
    /// took the hint's bytes and kept them, starving other targets' replays.)
    #[test]
    fn a_full_window_holds_replay_back_in_order() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let mut r = Replay::new(log_with(PEER, 4, 10), config(), ME, t0, T0_UNIX_MS);
        let mut w = slots(1);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        let sent = in_flight(&r);
        assert_eq!(sent.len(), 1);
        assert!(r.on_settled(sent[0].0, &mut ep));
        w.give_back(PEER, CH); // the stream's window slid
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        assert_eq!(
            in_flight(&r).iter().map(|(_, b)| *b).collect::<Vec<_>>(),
            [1]
        );
        let tokens = r.throttle.available(t0);
        for _ in 0..3 {
            r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        }
        assert_eq!(
            r.throttle.available(t0),
            tokens,
            "the full window took no bytes"
        );
    }

    /// A replay given up (or refused for now: no receiver yet) goes back to the front
    /// of its queue and is replayed first — after a refusal, once the target's backoff
    /// (100 ms, doubling) has passed; a final refusal drops it from the log as
    /// rejected, never as delivered. (Regression: a hint refused for now was sent
    /// again every 10 ms tick for as long as its target's key table stayed full.)
    #[test]
    fn a_given_up_replay_goes_first_again_and_a_final_refusal_is_dropped() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let cfg = ReplayConfig {
            concurrency: 2,
            ..config()
        };
        let mut r = Replay::new(log_with(PEER, 4, 10), cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        let sent = in_flight(&r);
        assert_eq!(sent.iter().map(|(_, b)| *b).collect::<Vec<_>>(), [0, 1]);
        assert!(r.on_rejected(sent[0].0, RejectReason::NoReceiver, &mut ep));
        assert!(r.on_rejected(sent[1].0, RejectReason::Unauthorized, &mut ep));
        assert_eq!(r.log.rejected.len(), 1);
        assert!(r.log.delivered.is_empty());
        // Refused for now: the target waits out a backoff (100 ms) before the next
        // replay, instead of getting the hint again every tick.
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        assert!(in_flight(&r).is_empty(), "backing off");
        let t1 = t0 + Duration::from_millis(100);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1);
        let again = in_flight(&r);
        assert_eq!(
            again.iter().map(|(_, b)| *b).collect::<Vec<_>>(),
            [0, 2],
            "the refused-for-now hint goes first, then the next"
        );
        // Refused again (a full key table; a reason this build does not know): the
        // wait doubles, and nothing is dropped from the store.
        assert!(r.on_rejected(again[0].0, RejectReason::KeyTableFull, &mut ep));
        assert!(r.on_rejected(again[1].0, RejectReason::Other(200), &mut ep));
        assert_eq!(r.log.rejected.len(), 1);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1 + Duration::from_millis(199));
        assert!(in_flight(&r).is_empty(), "200 ms now");
        r.handle_timeout(&mut ep, &[PEER], &mut w, t1 + Duration::from_millis(200));
        assert_eq!(in_flight(&r).len(), 2);
        // A send that is not a replay is not the policy's.
        let unknown = SendRef {
            peer: PEER,
            channel: CH,
            seq: 999,
        };
        assert!(!r.on_settled(unknown, &mut ep));
        assert!(!r.on_gave_up(unknown));
    }

    /// This run's own handed-off message holds its id floor until its TTL passes on the
    /// owner's clock; hint times are the wall clock given at the start plus that clock.
    #[test]
    fn an_own_hint_is_stamped_on_the_owners_clock_and_released_at_its_ttl() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let mut r = Replay::new(MemLog::default(), config(), ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        let send = SendRef {
            peer: PEER,
            channel: CH,
            seq: 1,
        };
        let id = MessageId::Seq {
            origin: ME,
            channel: CH,
            seq: 1,
        };
        let later = t0 + Duration::from_secs(5);
        r.store(
            send,
            id,
            Guarantee::AtLeastOnce,
            Bytes::from_static(b"x"),
            None,
            later,
        )
        .unwrap();
        let stored = &r.log.waiting[&PEER][0].1;
        assert_eq!(stored.created_unix_ms, T0_UNIX_MS + 5_000);
        assert_eq!(r.own_hinted.len(), 1);
        // The target never returns: at the TTL (60 s after `later`) the floor goes.
        r.handle_timeout(&mut ep, &[], &mut w, later + Duration::from_secs(59));
        assert_eq!(r.own_hinted.len(), 1);
        r.handle_timeout(&mut ep, &[], &mut w, later + Duration::from_secs(61));
        assert!(r.own_hinted.is_empty());
        assert_eq!(r.log.expired_at.last(), Some(&(T0_UNIX_MS + 66_000)));
    }

    /// A hint that reaches its TTL while its replay is in flight keeps its message's id
    /// floor until the replay is done (its retransmissions carry the floor; past it
    /// the receiver would ack as a duplicate a copy it never processed), and hints
    /// read but not sent yet are dropped at their TTL, never replayed after it.
    /// (Regression: the floor was released at the TTL under the replay in flight.)
    #[test]
    fn a_hint_expiring_in_flight_keeps_its_floor_and_queued_ones_expire() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let cfg = ReplayConfig {
            concurrency: 1,
            ..config()
        };
        let mut r = Replay::new(MemLog::default(), cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        for seq in 1..=3 {
            let send = SendRef {
                peer: PEER,
                channel: CH,
                seq,
            };
            let id = MessageId::Seq {
                origin: ME,
                channel: CH,
                seq,
            };
            r.store(
                send,
                id,
                Guarantee::AtLeastOnce,
                Bytes::from_static(b"x"),
                None,
                t0,
            )
            .unwrap();
        }
        assert_eq!(r.own_hinted.len(), 3);
        // The target is back: one replay in flight (concurrency 1), two read and queued.
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        let sent = in_flight(&r);
        assert_eq!(sent.len(), 1);
        assert_eq!(r.queued[&PEER].len(), 2);
        // The TTL (60 s) passes with the replay still unanswered.
        let late = t0 + Duration::from_secs(61);
        r.handle_timeout(&mut ep, &[], &mut w, late);
        assert!(r.queued[&PEER].is_empty(), "queued hints expired");
        assert_eq!(
            r.own_hinted.len(),
            1,
            "the replay in flight holds its floor"
        );
        // Its ack releases it.
        assert!(r.on_settled(sent[0].0, &mut ep));
        assert!(r.own_hinted.is_empty());
    }

    /// Decommissioning a target drops its hints, queued and in flight: a replay
    /// awaiting its ack leaves its stream (no retransmission to the next process with
    /// that id), and the target's concurrency count starts from zero.
    #[test]
    fn decommission_takes_replays_in_flight_out_of_their_streams() {
        let t0 = Instant::now();
        let mut ep = endpoint(t0);
        let cfg = ReplayConfig {
            concurrency: 2,
            ..config()
        };
        let mut r = Replay::new(log_with(PEER, 4, 10), cfg, ME, t0, T0_UNIX_MS);
        let mut w = slots(100);
        r.handle_timeout(&mut ep, &[PEER], &mut w, t0);
        let sent = in_flight(&r);
        assert_eq!(sent.len(), 2);
        r.decommission(PEER, &mut ep).unwrap();
        assert!(in_flight(&r).is_empty());
        assert!(!r.outstanding.contains_key(&PEER));
        assert!(!r.has_replay_work());
        // The endpoint no longer holds them: nothing to retransmit, ever.
        for (send, _) in sent {
            assert!(!ep.abandon(send), "{send:?} still in its stream");
        }
    }
}
