//! The node's hint store: its configuration ([`HandoffConfig`]), opening it, and the
//! [`HintStore`] as the sans-IO replay policy's [`HintLog`].
//!
//! Owns only the store's IO and the one wall-clock reading the policy's hint times
//! start from. What is stored, when and what is replayed, the throttle and the id
//! floor of handed-off messages are the core's (`proto/replay.rs`).

use crate::handoff::{unix_ms, Hint, HintError, HintPos, HintStore, HintStoreConfig};
use crate::id::{ChannelId, NodeId, Origin};
use crate::proto::replay::{HintLog, Replay, ReplayConfig};
use std::num::NonZeroU64;
use std::time::{Duration, Instant, SystemTime};

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

/// The node's hinted handoff: the core's replay policy over the hint store.
pub(crate) type Spool = Replay<HintStore>;

/// Opens the hint store of `cfg` for the run `origin`, with the policy's clock
/// starting at `now`.
pub(crate) fn open(
    cfg: HandoffConfig,
    max_payload: usize,
    origin: Origin,
    now: Instant,
) -> Result<Spool, HintError> {
    let (store, report) = HintStore::open(cfg.store.clone())?;
    if report.corrupt_regions > 0 || report.torn_tails > 0 || !report.quarantined.is_empty() {
        tracing::warn!(?report, "hint store recovered with damage");
    } else {
        tracing::info!(pending = report.pending, "hint store opened");
    }
    let policy = ReplayConfig {
        on_down: cfg.on_down,
        on_give_up: cfg.on_give_up,
        bytes_per_sec: NonZeroU64::new(cfg.replay_bytes_per_sec).unwrap_or(NonZeroU64::MIN),
        burst: cfg.replay_burst,
        concurrency: cfg.replay_concurrency,
        batch_bytes: cfg.replay_batch_bytes,
        ttl: cfg.store.default_ttl,
        max_payload,
    };
    Ok(Replay::new(
        store,
        policy,
        origin,
        now,
        unix_ms(SystemTime::now()),
    ))
}

impl HintLog for HintStore {
    fn append(
        &mut self,
        hint: Hint,
        down_for: Option<Duration>,
        now: Instant,
    ) -> Result<(), HintError> {
        HintStore::append(self, hint, down_for, now).map(|_| ())
    }

    fn next_batch(
        &mut self,
        target: NodeId,
        max_bytes: u64,
        now_unix_ms: u64,
    ) -> Result<Vec<(HintPos, Hint)>, HintError> {
        HintStore::next_batch(self, target, max_bytes, now_unix_ms)
    }

    fn mark_delivered(&mut self, target: NodeId, pos: HintPos) -> Result<bool, HintError> {
        HintStore::mark_delivered(self, target, pos)
    }

    fn mark_rejected(&mut self, target: NodeId, pos: HintPos) -> Result<bool, HintError> {
        HintStore::mark_rejected(self, target, pos)
    }

    fn expire(&mut self, now_unix_ms: u64) -> Result<u64, HintError> {
        HintStore::expire(self, now_unix_ms)
    }

    fn decommission(&mut self, target: NodeId) -> Result<u64, HintError> {
        HintStore::decommission(self, target)
    }

    fn pending(&self) -> u64 {
        self.stats().pending
    }

    fn pending_targets(&self) -> Vec<NodeId> {
        self.targets()
            .iter()
            .filter(|t| t.pending > 0)
            .map(|t| t.target)
            .collect()
    }

    fn seq_floors(&self, target: NodeId) -> Vec<(Origin, ChannelId, u64)> {
        HintStore::seq_floors(self, target)
    }

    fn sync_if_due(&mut self, now: Instant) -> Result<(), HintError> {
        HintStore::sync_if_due(self, now)
    }

    fn next_sync_deadline(&self) -> Option<Instant> {
        HintStore::next_sync_deadline(self)
    }
}
