//! Phi-accrual failure detection: is a peer Up, Suspect or Down?
//!
//! This module owns the suspicion level of each peer, computed from the arrival times
//! of its heartbeats (Hayashibara et al., "The φ Accrual Failure Detector", 2004, as
//! implemented by Akka and Cassandra). It is sans-IO: it never reads a clock, sends a
//! heartbeat or arms a timer. The node feeds it arrivals ([`FailureDetector::heartbeat`]
//! for heartbeats, [`FailureDetector::observe`] for any other frame or ack from the
//! peer), calls [`FailureDetector::poll`] (when [`FailureDetector::poll_timeout`]
//! says, or periodically) and reacts to the [`HealthChange`]s — e.g. hinted handoff
//! starts hinting for a Down target, and stops accepting new hints once
//! [`FailureDetector::down_since`] is older than its max hint window.
//!
//! It must not decide what to do about a failure; it only reports.
//!
//! # The model
//!
//! Per peer, a bounded window of heartbeat inter-arrival intervals gives a mean `μ` and
//! standard deviation `σ`. Given the time `Δ` since the peer was last heard from,
//!
//! ```text
//! y   = (Δ − (μ + acceptable_heartbeat_pause)) / max(σ, min_std_dev)
//! phi = −log10(1 − F(y)),   F ≈ logistic approximation of the normal CDF:
//! phi = log10(1 + exp(y · (1.5976 + 0.070566 · y²)))
//! ```
//!
//! which is Akka's formula, evaluated in a form that never overflows, never returns
//! NaN or infinity, and is non-decreasing in `Δ`. `phi = 8` (the default threshold)
//! means roughly a 10⁻⁸ chance that a heartbeat is merely late.
//!
//! # Health rule
//!
//! * **Down** when `phi ≥ threshold` (default 8, as Akka and Cassandra);
//! * **Suspect** when `suspect_threshold ≤ phi < threshold` (default 4 = threshold / 2);
//! * **Up** otherwise.
//!
//! Only [`FailureDetector::poll`] moves a peer towards Down (Up → Suspect → Down, or
//! straight Up → Down if a poll comes late); only an arrival from the peer
//! ([`heartbeat`](FailureDetector::heartbeat) or [`observe`](FailureDetector::observe))
//! brings it back Up. So a peer's health never flaps without an input from the peer.
//!
//! ```
//! use ackwire::detector::{DetectorConfig, FailureDetector, Health};
//! use ackwire::NodeId;
//! use std::time::{Duration, Instant};
//!
//! let mut fd = FailureDetector::new(DetectorConfig::default()).unwrap();
//! let peer = NodeId(7);
//! let t0 = Instant::now();
//! for i in 0..30 {
//!     fd.heartbeat(peer, t0 + Duration::from_secs(i));
//! }
//! let last = t0 + Duration::from_secs(29);
//! assert!(fd.poll(last + Duration::from_millis(500)).is_empty());
//! assert_eq!(fd.state(peer), Some(Health::Up));
//!
//! // Silence: ten seconds later the peer is Down.
//! let changes = fd.poll(last + Duration::from_secs(10));
//! assert_eq!(changes.len(), 1);
//! assert_eq!((changes[0].from, changes[0].to), (Health::Up, Health::Down));
//! assert_eq!(fd.down_since(peer), Some(last + Duration::from_secs(10)));
//!
//! // It speaks again: Up, and the change is reported by the next poll.
//! fd.heartbeat(peer, last + Duration::from_secs(11));
//! let changes = fd.poll(last + Duration::from_secs(11));
//! assert_eq!((changes[0].from, changes[0].to), (Health::Down, Health::Up));
//! assert_eq!(fd.down_since(peer), None);
//! ```

use crate::id::NodeId;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

/// Health of a peer as seen by the [`FailureDetector`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// Heard from recently enough: `phi < suspect_threshold`.
    Up,
    /// Late: `suspect_threshold ≤ phi < threshold`. Keep sending, expect trouble.
    Suspect,
    /// Presumed failed: `phi ≥ threshold`. Hand off instead of retrying.
    Down,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Suspect => "suspect",
            Health::Down => "down",
        })
    }
}

/// One transition of a peer's [`Health`], reported by [`FailureDetector::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthChange {
    /// The peer.
    pub peer: NodeId,
    /// Health before.
    pub from: Health,
    /// Health after.
    pub to: Health,
    /// When the change was decided: the `now` of the poll (towards Down) or of the
    /// arrival (back to Up).
    pub at: Instant,
}

/// Errors from [`DetectorConfig::validate`]. Each means the named field must be fixed;
/// none is transient.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DetectorConfigError {
    /// `threshold` is not a finite number > 0. Use e.g. the default 8.
    #[error("threshold {0} must be finite and > 0")]
    Threshold(f64),
    /// `suspect_threshold` is not finite, not > 0, or above `threshold`. Use a value in
    /// `(0, threshold]` (equal to `threshold` disables the Suspect state).
    #[error("suspect_threshold {suspect} must be finite, > 0 and <= threshold {threshold}")]
    SuspectThreshold {
        /// The configured suspect threshold.
        suspect: f64,
        /// The configured threshold.
        threshold: f64,
    },
    /// `max_samples` is 0: there would be no history. Use at least 1 (default 1000).
    #[error("max_samples must be at least 1")]
    ZeroMaxSamples,
    /// `min_std_dev` is zero: a perfectly regular peer would make phi jump from 0 to
    /// "certainly dead" on the first late heartbeat. Use a positive floor.
    #[error("min_std_dev must be positive")]
    ZeroMinStdDev,
    /// `first_heartbeat_estimate` is zero. Use roughly the heartbeat interval.
    #[error("first_heartbeat_estimate must be positive")]
    ZeroFirstHeartbeatEstimate,
}

/// Configuration of the [`FailureDetector`].
///
/// | field | default | meaning |
/// |---|---|---|
/// | `threshold` | 8.0 | phi at or above which a peer is Down (Akka's and Cassandra's default) |
/// | `suspect_threshold` | 4.0 | phi at or above which a peer is Suspect (threshold / 2) |
/// | `max_samples` | 1000 | intervals kept per peer (Akka's and Cassandra's window) |
/// | `min_std_dev` | 100 ms | floor of σ, so very regular heartbeats do not make phi hair-triggered (Akka's default) |
/// | `acceptable_heartbeat_pause` | 1 s | extra silence tolerated on top of the mean interval (GC pauses, hiccups) |
/// | `first_heartbeat_estimate` | 1 s | assumed interval before real ones are measured (seeds the window with `est ± est/4`) |
///
/// The defaults assume heartbeats about once a second (a node raises
/// `first_heartbeat_estimate` to its `heartbeat_interval`). With them a peer that stops
/// sending is Suspect about 2.4 s and Down about 2.5 s after its last heartbeat (a
/// peer never heard from at all: about 3.3 s, as the seeded window is wider). Akka
/// tolerates a 3 s pause; ackwire takes 1 s because its peers share a LAN. A Down
/// target is not free, though: with the node's defaults (no handoff,
/// `NodeConfig::fail_fast_when_down`) new sends to it fail with `PeerDown` until it is
/// heard again, while messages already in flight keep retrying. A pause of the
/// watching node itself (its runtime blocked, a long fsync) is not taken for its
/// peers' silence: a node counts its live peers as heard after a gap of more than one
/// and a half heartbeat intervals between its own checks. Feeding
/// data frames through [`FailureDetector::observe`] resets the silence but does not
/// enter the interval window, so busy traffic does not shrink the expected interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Down at `phi ≥ threshold`. Default 8.0.
    pub threshold: f64,
    /// Suspect at `phi ≥ suspect_threshold`. Default 4.0.
    pub suspect_threshold: f64,
    /// Intervals kept per peer. Default 1000.
    pub max_samples: usize,
    /// Floor of the interval standard deviation. Default 100 ms.
    #[serde(with = "crate::config_serde::duration")]
    pub min_std_dev: Duration,
    /// Silence tolerated on top of the mean interval. Default 1 s.
    #[serde(with = "crate::config_serde::duration")]
    pub acceptable_heartbeat_pause: Duration,
    /// Assumed heartbeat interval before any is measured. Default 1 s.
    #[serde(with = "crate::config_serde::duration")]
    pub first_heartbeat_estimate: Duration,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            threshold: 8.0,
            suspect_threshold: 4.0,
            max_samples: 1000,
            min_std_dev: Duration::from_millis(100),
            acceptable_heartbeat_pause: Duration::from_secs(1),
            first_heartbeat_estimate: Duration::from_secs(1),
        }
    }
}

impl DetectorConfig {
    /// Check thresholds are finite with `0 < suspect_threshold <= threshold`, and
    /// `max_samples`, `min_std_dev`, `first_heartbeat_estimate` are positive.
    pub fn validate(&self) -> Result<(), DetectorConfigError> {
        if !self.threshold.is_finite() || self.threshold <= 0.0 {
            return Err(DetectorConfigError::Threshold(self.threshold));
        }
        if !self.suspect_threshold.is_finite()
            || self.suspect_threshold <= 0.0
            || self.suspect_threshold > self.threshold
        {
            return Err(DetectorConfigError::SuspectThreshold {
                suspect: self.suspect_threshold,
                threshold: self.threshold,
            });
        }
        if self.max_samples == 0 {
            return Err(DetectorConfigError::ZeroMaxSamples);
        }
        if self.min_std_dev.is_zero() {
            return Err(DetectorConfigError::ZeroMinStdDev);
        }
        if self.first_heartbeat_estimate.is_zero() {
            return Err(DetectorConfigError::ZeroFirstHeartbeatEstimate);
        }
        Ok(())
    }

    fn health_for(&self, phi: f64) -> Health {
        if phi >= self.threshold {
            Health::Down
        } else if phi >= self.suspect_threshold {
            Health::Suspect
        } else {
            Health::Up
        }
    }
}

/// The phi-accrual estimator of one peer: interval window, last arrival, phi.
///
/// [`FailureDetector`] keeps one per peer; use this directly to watch a single peer
/// without the health bookkeeping.
///
/// ```
/// use ackwire::detector::{DetectorConfig, PhiAccrual};
/// use std::time::{Duration, Instant};
///
/// let cfg = DetectorConfig::default();
/// let t0 = Instant::now();
/// let mut p = PhiAccrual::new(&cfg, t0);
/// for i in 1..=20 {
///     p.heartbeat(t0 + Duration::from_secs(i));
/// }
/// let last = t0 + Duration::from_secs(20);
/// assert!(p.phi(last + Duration::from_secs(1)) < 1.0);
/// assert!(p.phi(last + Duration::from_secs(5)) > cfg.threshold);
/// ```
#[derive(Debug, Clone)]
pub struct PhiAccrual {
    threshold: f64,
    max_samples: usize,
    min_std_dev: Duration,
    pause: Duration,
    intervals: VecDeque<u64>,
    /// Sum of `intervals` in nanoseconds (exact).
    sum: u128,
    /// Sum of squares of `intervals` (exact: each interval ≤ MAX_INTERVAL_NANOS).
    sum_sq: u128,
    last_heartbeat: Option<Instant>,
    last_seen: Instant,
}

/// Intervals are clamped to one day before entering the window, which keeps the exact
/// integer sums far from overflow (1000 · (8.64e13)² ≪ u128::MAX).
const MAX_INTERVAL_NANOS: u64 = 86_400 * 1_000_000_000;

impl PhiAccrual {
    /// Start watching a peer first heard from at `now` (its first heartbeat, or any
    /// frame). The window is seeded, as in Akka, with two intervals
    /// `first_heartbeat_estimate ± first_heartbeat_estimate / 4`, which scroll out as
    /// real intervals arrive. A config that fails [`DetectorConfig::validate`] still
    /// works without panics (e.g. σ is floored at 1 ns).
    pub fn new(config: &DetectorConfig, now: Instant) -> Self {
        let mut p = PhiAccrual {
            threshold: config.threshold,
            max_samples: config.max_samples.max(1),
            min_std_dev: config.min_std_dev,
            pause: config.acceptable_heartbeat_pause,
            // Grown as intervals arrive, not reserved: a peer seen for a moment (a
            // client that connected once) costs a few bytes, not the 8 KiB of a full
            // window.
            intervals: VecDeque::new(),
            sum: 0,
            sum_sq: 0,
            last_heartbeat: None,
            last_seen: now,
        };
        let est = clamp_nanos(config.first_heartbeat_estimate);
        p.push_interval(est - est / 4);
        p.push_interval(est + est / 4);
        p
    }

    /// A heartbeat arrived at `now`: record the interval since the previous heartbeat
    /// (unless phi had reached `threshold` by then — as in Akka, the first heartbeat
    /// after a failure would skew the window, so it is not recorded) and reset the
    /// silence. An arrival earlier than the latest one seen counts as simultaneous.
    pub fn heartbeat(&mut self, now: Instant) {
        let now = now.max(self.last_seen);
        if let Some(prev) = self.last_heartbeat {
            if self.phi(now) < self.threshold {
                let interval = clamp_nanos(now.saturating_duration_since(prev));
                self.push_interval(interval);
            }
        }
        self.last_heartbeat = Some(now);
        self.last_seen = now;
    }

    /// Some other frame from the peer arrived at `now`: reset the silence without
    /// recording an interval.
    pub fn observe(&mut self, now: Instant) {
        if self.phi(now) >= self.threshold {
            // Back from a failure through another frame: the next heartbeat starts a
            // new interval, rather than recording the outage as one (which slowed
            // detection for the rest of the window). (Regression.)
            self.last_heartbeat = None;
        }
        self.last_seen = self.last_seen.max(now);
    }

    /// Suspicion level at `now`: finite, `>= 0`, non-decreasing in `now`.
    pub fn phi(&self, now: Instant) -> f64 {
        let since = now.saturating_duration_since(self.last_seen).as_secs_f64();
        let (mean, std) = self.effective_mean_std();
        phi_of(since, mean, std)
    }

    /// How long after the last arrival phi reaches `target` (for `target > 0`);
    /// `Duration::ZERO` if it already has at zero silence, `None` if `target` is not
    /// a positive finite number. Rounded up by 1 ms so that polling at
    /// `last_seen + time_to_phi(t)` is sure to see `phi ≥ t` despite float rounding.
    pub fn time_to_phi(&self, target: f64) -> Option<Duration> {
        if !target.is_finite() || target <= 0.0 {
            return None;
        }
        let (mean, std) = self.effective_mean_std();
        // log10(1 + e^a) = target  ⇔  a = ln(10^target − 1)
        let a = target * std::f64::consts::LN_10 + (-(10f64.powf(-target))).ln_1p();
        if !a.is_finite() {
            // +inf: a target so large (above about 3e307) that no phi reaches it:
            // never. (Regression: taken for "now", so a Suspect peer's timer was always
            // due and the node's driver spun until the peer spoke.) Otherwise a target
            // so small that phi already exceeds it at any silence.
            return Some(if a == f64::INFINITY {
                Duration::MAX
            } else {
                Duration::ZERO
            });
        }
        let y = solve_logistic_exponent(a);
        let secs = mean + y * std;
        if secs <= 0.0 {
            return Some(Duration::ZERO);
        }
        let d = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
        Some(d.saturating_add(Duration::from_millis(1)))
    }

    /// When the peer was last heard from (heartbeat or other frame).
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// Mean of the interval window.
    pub fn mean(&self) -> Duration {
        Duration::try_from_secs_f64(self.mean_secs()).unwrap_or(Duration::ZERO)
    }

    /// Standard deviation of the interval window (before the `min_std_dev` floor).
    pub fn std_dev(&self) -> Duration {
        Duration::try_from_secs_f64(self.std_secs()).unwrap_or(Duration::ZERO)
    }

    /// Number of intervals in the window (including the two seeds until they scroll
    /// out).
    pub fn samples(&self) -> usize {
        self.intervals.len()
    }

    fn push_interval(&mut self, nanos: u64) {
        if self.intervals.len() >= self.max_samples {
            if let Some(old) = self.intervals.pop_front() {
                self.sum -= u128::from(old);
                self.sum_sq -= u128::from(old) * u128::from(old);
            }
        }
        self.intervals.push_back(nanos);
        self.sum += u128::from(nanos);
        self.sum_sq += u128::from(nanos) * u128::from(nanos);
    }

    fn mean_secs(&self) -> f64 {
        let n = self.intervals.len().max(1) as f64;
        self.sum as f64 / n / 1e9
    }

    fn std_secs(&self) -> f64 {
        let n = self.intervals.len() as u128;
        if n == 0 {
            return 0.0;
        }
        // n·Σx² − (Σx)² is exact in u128 and ≥ 0 (Cauchy–Schwarz).
        let num = (n * self.sum_sq).saturating_sub(self.sum * self.sum);
        (num as f64).sqrt() / n as f64 / 1e9
    }

    /// (μ + pause, max(σ, min_std_dev, 1 ns)) in seconds.
    fn effective_mean_std(&self) -> (f64, f64) {
        let mean = self.mean_secs() + self.pause.as_secs_f64();
        let std = self
            .std_secs()
            .max(self.min_std_dev.as_secs_f64())
            .max(1e-9);
        (mean, std)
    }
}

/// Failure detector for many peers, keyed by [`NodeId`].
///
/// Call order, driven by the node:
/// 1. [`heartbeat`](Self::heartbeat) for every heartbeat frame,
///    [`observe`](Self::observe) for every other frame or ack from a peer (both start
///    watching an unknown peer, as Up, without reporting a change);
/// 2. [`poll`](Self::poll) at [`poll_timeout`](Self::poll_timeout) (or periodically) to
///    re-evaluate every peer and collect the [`HealthChange`]s since the last poll;
/// 3. [`remove`](Self::remove) a decommissioned peer.
///
/// Peers are kept in `NodeId` order, so the changes of one poll come out in a
/// deterministic order.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    config: DetectorConfig,
    peers: BTreeMap<NodeId, PeerEntry>,
    pending: Vec<HealthChange>,
}

#[derive(Debug, Clone)]
struct PeerEntry {
    phi: PhiAccrual,
    health: Health,
    down_since: Option<Instant>,
}

impl FailureDetector {
    /// A detector with no peers, if `config` passes [`DetectorConfig::validate`].
    pub fn new(config: DetectorConfig) -> Result<Self, DetectorConfigError> {
        config.validate()?;
        Ok(FailureDetector {
            config,
            peers: BTreeMap::new(),
            pending: Vec::new(),
        })
    }

    /// A heartbeat from `peer` arrived at `now`. Records the interval, and brings a
    /// Suspect or Down peer back Up (the change is reported by the next
    /// [`poll`](Self::poll)).
    pub fn heartbeat(&mut self, peer: NodeId, now: Instant) {
        self.arrival(peer, now, true);
    }

    /// Any other frame or ack from `peer` arrived at `now`: proof of life that resets
    /// the silence and brings the peer back Up, without entering the interval window.
    pub fn observe(&mut self, peer: NodeId, now: Instant) {
        self.arrival(peer, now, false);
    }

    /// Suspicion level of `peer` at `now` (`None` for an unknown peer).
    pub fn phi(&self, peer: NodeId, now: Instant) -> Option<f64> {
        self.peers.get(&peer).map(|e| e.phi.phi(now))
    }

    /// Health of `peer` as of the last [`poll`](Self::poll) or arrival (`None` for an
    /// unknown peer).
    pub fn state(&self, peer: NodeId) -> Option<Health> {
        self.peers.get(&peer).map(|e| e.health)
    }

    /// When `peer` was found Down, if it is Down now. Hinted handoff compares this
    /// with its max hint window.
    pub fn down_since(&self, peer: NodeId) -> Option<Instant> {
        self.peers.get(&peer).and_then(|e| e.down_since)
    }

    /// Re-evaluate every peer at `now` and return all health changes since the last
    /// poll: recoveries recorded by arrivals, then (in `NodeId` order) the peers whose
    /// phi crossed a threshold. A peer that crossed both thresholds since the last poll
    /// is reported once, Up → Down.
    pub fn poll(&mut self, now: Instant) -> Vec<HealthChange> {
        for (&peer, entry) in self.peers.iter_mut() {
            let target = self.config.health_for(entry.phi.phi(now));
            if target > entry.health {
                self.pending.push(HealthChange {
                    peer,
                    from: entry.health,
                    to: target,
                    at: now,
                });
                entry.health = target;
                if target == Health::Down {
                    entry.down_since = Some(now);
                }
            }
        }
        std::mem::take(&mut self.pending)
    }

    /// The earliest instant at which a [`poll`](Self::poll) would find a peer worse off
    /// (its next threshold crossing, assuming silence until then); `None` when every
    /// peer is Down or there are none. Arm one timer for it; re-ask after every
    /// arrival or poll.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|e| {
                let target = match e.health {
                    Health::Up => self.config.suspect_threshold,
                    Health::Suspect => self.config.threshold,
                    Health::Down => return None,
                };
                let d = e.phi.time_to_phi(target)?;
                Some(e.phi.last_seen().checked_add(d).unwrap_or_else(|| {
                    // Unrepresentable: as far ahead as a timer can meaningfully go.
                    e.phi.last_seen() + Duration::from_secs(86_400 * 365)
                }))
            })
            .min()
    }

    /// Stop watching `peer` (e.g. decommissioned). Returns its last health, `None`
    /// if it was unknown. Changes already recorded for it are still reported by the
    /// next poll.
    pub fn remove(&mut self, peer: NodeId) -> Option<Health> {
        self.peers.remove(&peer).map(|e| e.health)
    }

    /// The watched peers and their health (as of the last poll or arrival), in
    /// `NodeId` order.
    pub fn peers(&self) -> impl Iterator<Item = (NodeId, Health)> + '_ {
        self.peers.iter().map(|(&p, e)| (p, e.health))
    }

    /// The per-peer estimator, for inspection (mean, σ, samples).
    pub fn estimator(&self, peer: NodeId) -> Option<&PhiAccrual> {
        self.peers.get(&peer).map(|e| &e.phi)
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    fn arrival(&mut self, peer: NodeId, now: Instant, is_heartbeat: bool) {
        let config = &self.config;
        let entry = self.peers.entry(peer).or_insert_with(|| PeerEntry {
            phi: PhiAccrual::new(config, now),
            health: Health::Up,
            down_since: None,
        });
        if is_heartbeat {
            entry.phi.heartbeat(now);
        } else {
            entry.phi.observe(now);
        }
        if entry.health != Health::Up {
            self.pending.push(HealthChange {
                peer,
                from: entry.health,
                to: Health::Up,
                at: now,
            });
            entry.health = Health::Up;
            entry.down_since = None;
        }
    }
}

/// phi for `since` seconds of silence, effective mean and σ in seconds (σ > 0):
/// `log10(1 + e^a)` with `a = y(1.5976 + 0.070566 y²)`, `y = (since − mean)/σ`.
/// Stable softplus: finite and non-negative for any finite input.
fn phi_of(since: f64, mean: f64, std: f64) -> f64 {
    let y = (since - mean) / std;
    let a = logistic_exponent(y);
    let softplus = if a > 0.0 {
        a + (-a).exp().ln_1p()
    } else {
        a.exp().ln_1p()
    };
    let phi = softplus / std::f64::consts::LN_10;
    if phi.is_nan() {
        0.0
    } else {
        phi.min(f64::MAX)
    }
}

fn logistic_exponent(y: f64) -> f64 {
    y * (1.5976 + 0.070566 * y * y)
}

/// Solve `logistic_exponent(y) = a` (strictly increasing in `y`) by bisection.
fn solve_logistic_exponent(a: f64) -> f64 {
    let bound = (a.abs() / 1.5976).min((a.abs() / 0.070566).cbrt()) + 1.0;
    let (mut lo, mut hi) = (-bound, bound);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if logistic_exponent(mid) < a {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            break;
        }
    }
    hi
}

fn clamp_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos())
        .unwrap_or(u64::MAX)
        .min(MAX_INTERVAL_NANOS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Akka's formula written literally (the two-branch form), for comparison.
    fn akka_phi(time_diff: f64, mean: f64, std: f64) -> f64 {
        let y = (time_diff - mean) / std;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        if time_diff > mean {
            -(e / (1.0 + e)).log10()
        } else {
            -(1.0 - 1.0 / (1.0 + e)).log10()
        }
    }

    #[test]
    fn phi_matches_akka_formula_where_akka_is_finite() {
        for &(d, m, s) in &[
            (1.0, 1.0, 0.1),
            (1.5, 1.0, 0.1),
            (2.0, 1.0, 0.2),
            (0.2, 1.0, 0.1),
            (3.0, 2.0, 0.5),
        ] {
            let ours = phi_of(d, m, s);
            let theirs = akka_phi(d, m, s);
            assert!(
                (ours - theirs).abs() < 1e-9,
                "{d} {m} {s}: {ours} vs {theirs}"
            );
        }
        // Akka's form gives inf here; ours stays finite and large.
        assert!(akka_phi(100.0, 1.0, 0.01).is_infinite());
        let big = phi_of(100.0, 1.0, 0.01);
        assert!(big.is_finite() && big > 1e6);
        // Far in the past: ~0, never negative or NaN.
        let small = phi_of(0.0, 1e9, 1e-9);
        assert!((0.0..1e-300).contains(&small) || small == 0.0);
    }

    #[test]
    fn phi_at_mean_is_log10_2() {
        assert!((phi_of(1.0, 1.0, 0.1) - 2f64.log10()).abs() < 1e-12);
    }

    #[test]
    fn time_to_phi_inverts_phi() {
        let cfg = DetectorConfig::default();
        let t0 = Instant::now();
        let mut p = PhiAccrual::new(&cfg, t0);
        for i in 1..=50 {
            p.heartbeat(t0 + Duration::from_millis(1000 * i + (i % 3) * 40));
        }
        for target in [0.5, 1.0, 4.0, 8.0, 16.0, 300.0] {
            let d = p.time_to_phi(target).unwrap();
            let at = p.last_seen() + d;
            assert!(p.phi(at) >= target, "target {target}: phi {}", p.phi(at));
            let before = at - Duration::from_millis(3);
            assert!(p.phi(before) < target, "target {target} reached too early");
        }
        assert_eq!(p.time_to_phi(0.0), None);
        assert_eq!(p.time_to_phi(f64::NAN), None);
        // A threshold no phi reaches (config accepts any finite one): never, not now.
        assert_eq!(p.time_to_phi(1e308), Some(Duration::MAX));
        assert!(p.phi(p.last_seen() + Duration::from_secs(86_400 * 365)) < 1e308);
    }

    /// A peer back from an outage through a data frame, before its first heartbeat:
    /// that heartbeat starts a new interval, and the outage does not enter the window
    /// (it slowed the next detection for the rest of the window).
    #[test]
    fn an_outage_ended_by_another_frame_is_not_recorded_as_an_interval() {
        let cfg = DetectorConfig::default();
        let t0 = Instant::now();
        let mut p = PhiAccrual::new(&cfg, t0);
        let mut now = t0;
        for _ in 0..30 {
            now += Duration::from_secs(1);
            p.heartbeat(now);
        }
        let n = p.samples();
        now += Duration::from_secs(8);
        assert!(p.phi(now) >= cfg.threshold, "down after 8 s");
        p.observe(now);
        p.heartbeat(now + Duration::from_millis(1));
        assert_eq!(p.samples(), n, "the outage was recorded");
        let d = p.time_to_phi(cfg.threshold).unwrap();
        assert!(d < Duration::from_secs(4), "next detection in {d:?}");
    }

    #[test]
    fn window_is_bounded_and_stats_exact() {
        let cfg = DetectorConfig {
            max_samples: 4,
            ..DetectorConfig::default()
        };
        let t0 = Instant::now();
        let mut p = PhiAccrual::new(&cfg, t0);
        assert_eq!(p.samples(), 2);
        assert_eq!(p.mean(), Duration::from_secs(1));
        let mut t = t0;
        for _ in 0..10 {
            t += Duration::from_millis(500);
            p.heartbeat(t); // first one only sets last_heartbeat
        }
        assert_eq!(p.samples(), 4);
        assert_eq!(p.mean(), Duration::from_millis(500));
        assert_eq!(p.std_dev(), Duration::ZERO);
    }

    /// A peer seen once (a short-lived client) costs a few bytes of window, not a
    /// full one: the window grows with the intervals it holds, up to `max_samples`.
    /// (Regression: 8 KiB were reserved per peer at first sight, kept for as long as
    /// the node ran — 10 KiB per departed client in all.)
    #[test]
    fn the_window_grows_with_its_intervals() {
        let cfg = DetectorConfig::default();
        let t0 = Instant::now();
        let mut p = PhiAccrual::new(&cfg, t0);
        assert!(p.intervals.capacity() <= 8, "{}", p.intervals.capacity());
        let mut t = t0;
        for _ in 0..3 * cfg.max_samples {
            t += Duration::from_secs(1);
            p.heartbeat(t);
        }
        assert_eq!(p.samples(), cfg.max_samples);
    }

    #[test]
    fn heartbeat_after_down_is_not_recorded() {
        let cfg = DetectorConfig::default();
        let t0 = Instant::now();
        let mut p = PhiAccrual::new(&cfg, t0);
        p.heartbeat(t0);
        p.heartbeat(t0 + Duration::from_secs(1));
        let n = p.samples();
        p.heartbeat(t0 + Duration::from_secs(60));
        assert_eq!(p.samples(), n, "a 59 s gap must not enter the window");
        p.heartbeat(t0 + Duration::from_secs(61));
        assert_eq!(p.samples(), n + 1);
    }

    #[test]
    fn config_validation() {
        assert_eq!(DetectorConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut DetectorConfig)| {
            let mut c = DetectorConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(
            bad(|c| c.threshold = f64::NAN),
            DetectorConfigError::Threshold(_)
        ));
        assert!(matches!(
            bad(|c| c.threshold = 0.0),
            DetectorConfigError::Threshold(_)
        ));
        assert!(matches!(
            bad(|c| c.suspect_threshold = 9.0),
            DetectorConfigError::SuspectThreshold { .. }
        ));
        assert!(matches!(
            bad(|c| c.suspect_threshold = -1.0),
            DetectorConfigError::SuspectThreshold { .. }
        ));
        assert_eq!(
            bad(|c| c.max_samples = 0),
            DetectorConfigError::ZeroMaxSamples
        );
        assert_eq!(
            bad(|c| c.min_std_dev = Duration::ZERO),
            DetectorConfigError::ZeroMinStdDev
        );
        assert_eq!(
            bad(|c| c.first_heartbeat_estimate = Duration::ZERO),
            DetectorConfigError::ZeroFirstHeartbeatEstimate
        );
        assert!(FailureDetector::new(DetectorConfig {
            max_samples: 0,
            ..DetectorConfig::default()
        })
        .is_err());
    }

    #[test]
    fn invalid_config_used_directly_never_panics_or_nans() {
        let cfg = DetectorConfig {
            min_std_dev: Duration::ZERO,
            max_samples: 0,
            first_heartbeat_estimate: Duration::ZERO,
            acceptable_heartbeat_pause: Duration::MAX,
            ..DetectorConfig::default()
        };
        let t0 = Instant::now();
        let mut p = PhiAccrual::new(&cfg, t0);
        p.heartbeat(t0);
        p.heartbeat(t0);
        for s in [0, 1, 1_000_000] {
            let phi = p.phi(t0 + Duration::from_secs(s));
            assert!(phi.is_finite() && phi >= 0.0);
        }
    }
}
