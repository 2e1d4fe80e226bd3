//! Hinted handoff inside the driver: stores messages for unreachable targets as hints,
//! and replays them, throttled, through the normal at-least-once path when the target is
//! back.
//!
//! Owns the [`HintStore`], the replay queues, the replay throttle, and the bookkeeping
//! that keeps a handed-off message's library-assigned id unsettled at the receiver's
//! dedup (the id floor) until its hint is delivered, expires or is dropped. Must not
//! touch sockets; the driver feeds it and sends what it asks for.

use crate::handoff::ReplayThrottle;
use crate::handoff::{unix_ms, Hint, HintError, HintPos, HintStats, HintStore, HintStoreConfig};
use crate::id::{MessageId, NodeId, Origin};
use crate::proto::sends::Hints;
use crate::proto::{Endpoint, Outgoing, SendRef};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU64;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

/// Hinted-handoff settings of a node. Every default is written on its field.
///
/// ```
/// let cfg = ackwire::HandoffConfig::new("/var/lib/myservice");
/// assert!(cfg.on_give_up && cfg.on_down);
/// ```
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default = "crate::config_serde::handoff_defaults", deny_unknown_fields)]
#[non_exhaustive]
pub struct HandoffConfig {
    /// Where and how hints are stored: directory, fsync policy (default group commit
    /// every 10 ms), TTL (6 h), max hint window (3 h), byte limits (1 GiB per target,
    /// 4 GiB in total). See [`HintStoreConfig`].
    pub store: HintStoreConfig,
    /// Store a message whose retries ran out (deadline or attempts) as a hint instead of
    /// failing its receipt. Default `true`.
    pub on_give_up: bool,
    /// When the failure detector declares a target Down, move its unacknowledged
    /// messages to the hint store, and store new messages for it directly. Default
    /// `true`.
    pub on_down: bool,
    /// Replay throttle, bytes of payload per second over all targets. Default 16 MiB/s.
    pub replay_bytes_per_sec: u64,
    /// Burst allowed above the replay rate. Default 1 MiB.
    pub replay_burst: u64,
    /// Replayed hints awaiting their ack, per target. Default `1024`.
    pub replay_concurrency: usize,
    /// Bytes read from a target's log at a time. Default 256 KiB.
    pub replay_batch_bytes: u64,
}

impl HandoffConfig {
    /// Defaults, with hints stored under `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        HandoffConfig {
            store: HintStoreConfig::new(dir),
            on_give_up: true,
            on_down: true,
            replay_bytes_per_sec: 16 << 20,
            replay_burst: 1 << 20,
            replay_concurrency: 1024,
            replay_batch_bytes: 256 << 10,
        }
    }

    /// Longest accepted `store.default_ttl` (and so `store.max_hint_window`): 10 years.
    pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
    /// Longest accepted `FsyncPolicy::Every` interval: 1 hour.
    pub const MAX_FSYNC_INTERVAL: Duration = Duration::from_secs(3600);
    /// Largest accepted `replay_concurrency`: `2^20`.
    pub const MAX_REPLAY_CONCURRENCY: usize = 1 << 20;

    /// Check every value: `store` as [`HintStoreConfig::validate`], plus
    /// `store.default_ttl <= 10 years`, a `FsyncPolicy::Every` interval `<= 1 h`,
    /// `replay_bytes_per_sec >= 1`, `replay_concurrency` in `1..=2^20`,
    /// `replay_batch_bytes >= 1`. `replay_burst` may be anything (0 is taken as 1).
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::error::check::{count, duration, u};
        self.store
            .validate()
            .map_err(crate::ConfigError::HintStore)?;
        duration(
            "handoff.store.default_ttl",
            self.store.default_ttl,
            Duration::from_nanos(1),
            Self::MAX_TTL,
        )?;
        if let crate::handoff::FsyncPolicy::Every(d) = self.store.fsync {
            duration(
                "handoff.store.fsync",
                d,
                Duration::from_nanos(1),
                Self::MAX_FSYNC_INTERVAL,
            )?;
        }
        count(
            "handoff.replay_bytes_per_sec",
            self.replay_bytes_per_sec,
            1,
            u64::MAX,
        )?;
        count(
            "handoff.replay_concurrency",
            u(self.replay_concurrency),
            1,
            u(Self::MAX_REPLAY_CONCURRENCY),
        )?;
        count(
            "handoff.replay_batch_bytes",
            self.replay_batch_bytes,
            1,
            u64::MAX,
        )?;
        Ok(())
    }
}

/// How often replay and hint expiry are looked at while hints are pending.
const REPLAY_TICK: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub(crate) struct Spool {
    store: HintStore,
    cfg: HandoffConfig,
    origin: Origin,
    throttle: ReplayThrottle,
    queued: HashMap<NodeId, VecDeque<(HintPos, Hint)>>,
    replaying: HashMap<SendRef, (HintPos, Hint)>,
    outstanding: HashMap<NodeId, usize>,
    /// This run's own handed-off messages, holding the id floor, with their expiry.
    own_hinted: BTreeMap<(NodeId, u32, u64), u64>,
    next_expire: Instant,
    /// The wall clock at `base`: hint times are `base_unix_ms` plus the node clock's
    /// time since `base`, so a virtual clock (`testing`) moves them too, and a wall
    /// clock step does not.
    base: Instant,
    base_unix_ms: u64,
    /// The last replay round sent nothing and nothing is outstanding: every pending
    /// target is away. No fast tick then; the peer's return wakes the driver anyway.
    blocked: bool,
}

impl Spool {
    pub(crate) fn open(
        cfg: HandoffConfig,
        origin: Origin,
        now: Instant,
    ) -> Result<Self, HintError> {
        let (store, report) = HintStore::open(cfg.store.clone())?;
        if report.corrupt_regions > 0 || report.torn_tails > 0 || !report.quarantined.is_empty() {
            tracing::warn!(?report, "hint store recovered with damage");
        } else {
            tracing::info!(pending = report.pending, "hint store opened");
        }
        let rate = NonZeroU64::new(cfg.replay_bytes_per_sec).unwrap_or(NonZeroU64::MIN);
        Ok(Spool {
            throttle: ReplayThrottle::new(rate, cfg.replay_burst, now),
            store,
            cfg,
            origin,
            queued: HashMap::new(),
            replaying: HashMap::new(),
            outstanding: HashMap::new(),
            own_hinted: BTreeMap::new(),
            next_expire: now,
            base: now,
            base_unix_ms: unix_ms(SystemTime::now()),
            blocked: false,
        })
    }

    /// The wall clock (Unix ms) at the node clock's `now`.
    fn unix_ms_at(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.base).as_millis();
        self.base_unix_ms
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    pub(crate) fn stats(&self) -> HintStats {
        self.store.stats()
    }

    /// Replay what the throttle, the windows and the concurrency bound allow to targets
    /// for which `ready` holds.
    pub(crate) fn replay(
        &mut self,
        endpoint: &mut Endpoint,
        window: impl Fn(NodeId, crate::ChannelId) -> std::sync::Arc<Semaphore>,
        ready: impl Fn(NodeId) -> bool,
        now: Instant,
    ) {
        let targets: Vec<NodeId> = self
            .store
            .targets()
            .iter()
            .filter(|t| t.pending > 0)
            .map(|t| t.target)
            .chain(self.queued.keys().copied())
            .collect();
        let now_ms = self.unix_ms_at(now);
        self.blocked = true;
        for target in targets {
            if !ready(target) {
                continue;
            }
            loop {
                if self.outstanding.get(&target).copied().unwrap_or(0)
                    >= self.cfg.replay_concurrency
                {
                    break;
                }
                let queue = self.queued.entry(target).or_default();
                if queue.is_empty() {
                    match self
                        .store
                        .next_batch(target, self.cfg.replay_batch_bytes, now_ms)
                    {
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
                let channel = hint.channel;
                if self
                    .throttle
                    .try_take(hint.payload.len() as u64, now)
                    .is_err()
                {
                    self.blocked = false; // throttled, not blocked: come back soon
                    return; // the throttle covers every target
                }
                let Ok(permit) = window(target, channel).try_acquire_owned() else {
                    break; // the stream's window is full; next tick
                };
                let Some((pos, hint)) = queue.pop_front() else {
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
                match endpoint.send(now, msg) {
                    Ok(send) => {
                        permit.forget(); // given back when the window slides
                        *self.outstanding.entry(target).or_default() += 1;
                        self.replaying.insert(send, (pos, hint));
                    }
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "hint cannot be replayed on its channel");
                        queue_front(&mut self.queued, target, pos, hint);
                        break;
                    }
                }
            }
        }
        if !self.replaying.is_empty() {
            self.blocked = false; // acks are coming back: keep the fast tick
        }
    }

    /// Are there hints to replay (queued here or pending in the store)?
    pub(crate) fn has_replay_work(&self) -> bool {
        self.store.stats().pending > 0 || self.queued.values().any(|q| !q.is_empty())
    }

    /// Drop every hint for `peer` (decommissioned). Returns how many were dropped.
    pub(crate) fn decommission(
        &mut self,
        peer: NodeId,
        endpoint: &mut Endpoint,
    ) -> Result<u64, HintError> {
        let n = self.store.decommission(peer)?;
        self.queued.remove(&peer);
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
                channel: crate::ChannelId(k.1),
                seq: k.2,
            });
        }
        Ok(n)
    }

    /// Housekeeping due at `now`: group-commit fsync, hint expiry (which also releases
    /// the id floor of expired own hints).
    pub(crate) fn tick(&mut self, endpoint: &mut Endpoint, now: Instant) {
        if let Err(e) = self.store.sync_if_due(now) {
            tracing::warn!(error = %e, "hint store sync failed");
        }
        if now >= self.next_expire {
            self.next_expire = now + Duration::from_secs(1);
            let now_ms = self.unix_ms_at(now);
            if let Err(e) = self.store.expire(now_ms) {
                tracing::warn!(error = %e, "hint expiry failed");
            }
            let expired: Vec<_> = self
                .own_hinted
                .iter()
                .filter(|(_, exp)| **exp <= now_ms)
                .map(|(k, _)| *k)
                .collect();
            for k in expired {
                self.own_hinted.remove(&k);
                endpoint.hint_settled(SendRef {
                    peer: k.0,
                    channel: crate::ChannelId(k.1),
                    seq: k.2,
                });
            }
        }
    }

    /// Flush everything to disk and release the hint directory (the end of a run).
    pub(crate) fn close(&mut self) {
        self.store.close();
    }

    /// Flush everything to disk (shutdown).
    pub(crate) fn sync(&mut self) {
        if let Err(e) = self.store.sync() {
            tracing::warn!(error = %e, "hint store sync failed");
        }
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
}

fn queue_front(
    queued: &mut HashMap<NodeId, VecDeque<(HintPos, Hint)>>,
    target: NodeId,
    pos: HintPos,
    hint: Hint,
) {
    queued.entry(target).or_default().push_front((pos, hint));
}

/// The handoff decisions ([`crate::proto::sends`]) reach the store through this.
impl Spool {
    /// A replayed `send` is done: acked, or (`rejected`) refused for good.
    fn replay_done(&mut self, send: SendRef, endpoint: &mut Endpoint, rejected: bool) -> bool {
        let Some((pos, hint)) = self.replaying.remove(&send) else {
            return false;
        };
        if let Some(n) = self.outstanding.get_mut(&send.peer) {
            *n = n.saturating_sub(1);
        }
        let marked = if rejected {
            self.store.mark_rejected(send.peer, pos)
        } else {
            self.store.mark_delivered(send.peer, pos)
        };
        if let Err(e) = marked {
            tracing::warn!(target = %send.peer, error = %e, "marking a hint delivered failed; it may replay again");
        }
        self.release_floor(endpoint, send.peer, hint.id);
        true
    }
}

impl Hints for Spool {
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
        guarantee: crate::Guarantee,
        payload: bytes::Bytes,
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
        let ttl_ms = self.cfg.store.default_ttl.as_millis() as u64;
        let expires = hint.created_unix_ms.saturating_add(ttl_ms);
        self.store.append(hint, down_for, now)?;
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
        reason: crate::wire::RejectReason,
        endpoint: &mut Endpoint,
    ) -> bool {
        use crate::wire::RejectReason;
        if matches!(
            reason,
            RejectReason::NoReceiver | RejectReason::KeyTableFull
        ) {
            return self.on_gave_up(send);
        }
        let Some(id) = self.replaying.get(&send).map(|(_, h)| h.id) else {
            return false;
        };
        tracing::warn!(target = %send.peer, %id, %reason, "hint rejected by its target; dropped from the store");
        self.replay_done(send, endpoint, true)
    }

    /// `send` was given up. If it was a replay, it goes back to its queue (still in the
    /// store) and `true` is returned.
    fn on_gave_up(&mut self, send: SendRef) -> bool {
        let Some((pos, hint)) = self.replaying.remove(&send) else {
            return false;
        };
        if let Some(n) = self.outstanding.get_mut(&send.peer) {
            *n = n.saturating_sub(1);
        }
        queue_front(&mut self.queued, send.peer, pos, hint);
        true
    }

    /// When the driver must call back: the fsync deadline; the replay tick while hints
    /// can be replayed; the expiry check while this run's hints await their TTL.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let tick = if self.has_replay_work() && !self.blocked {
            Some(now + REPLAY_TICK)
        } else if self.has_replay_work() || !self.own_hinted.is_empty() {
            Some(self.next_expire.max(now))
        } else {
            None
        };
        match (self.store.next_sync_deadline(), tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
