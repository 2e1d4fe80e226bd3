//! Retransmission timing: RTT estimation, exponential backoff with jitter, retry limits
//! and a retry budget.
//!
//! This module owns the *arithmetic* of retrying: how long to wait before a message is
//! retransmitted ([`RttEstimator`], [`Backoff`]), when to give up ([`RetryPolicy`]), and
//! whether a retry may be sent right now without feeding a retry storm
//! ([`RetryBudget`]). It is sans-IO: it never reads a clock, never sleeps and never
//! touches tokio — every input that depends on time carries a `now: Instant` or a
//! [`Duration`]. It must not know about frames, streams or peers; the protocol core
//! (`proto`) owns one [`RttEstimator`] and one [`Backoff`] per stream and one
//! [`RetryBudget`] per target, and combines them.
//!
//! # How the pieces fit
//!
//! 1. On every ack of a message, feed [`RttEstimator::on_ack`] with the time the
//!    message was *first* sent and whether it was ever retransmitted (Karn's rule: an
//!    ack of a retransmitted message is ambiguous and gives no sample).
//! 2. When a message is sent (attempt 0) or retransmitted (attempt `n`), arm its retry
//!    timer with [`RetryPolicy::schedule`], which asks [`Backoff`] for
//!    `min(cap, rto * 2^n)` with jitter and clamps it to the message's deadline.
//! 3. When the retry timer fires, ask the target's [`RetryBudget::try_withdraw`]. If it
//!    refuses, **do not drop the retry**: keep the message in flight and re-arm its
//!    timer for the next backoff step (the next timer tick). Retries are deferred, never
//!    lost; only the policy's deadline or attempt limit ends them.
//!
//! ```
//! use ackwire::retry::{Backoff, RetryBudget, RetryBudgetConfig, RetryDecision, RetryPolicy,
//!     RttConfig, RttEstimator};
//! use std::time::{Duration, Instant};
//!
//! let policy = RetryPolicy::default();
//! policy.validate().unwrap();
//! let mut rtt = RttEstimator::new(RttConfig::default());
//! let mut backoff = Backoff::new(&policy, 42);
//! let t0 = Instant::now();
//! let mut budget = RetryBudget::new(RetryBudgetConfig::default(), t0);
//!
//! // First send of a message: a fresh send deposits into the budget.
//! budget.deposit(t0);
//! let first_timer = match policy.schedule(&mut backoff, rtt.rto(), 0, t0, t0) {
//!     RetryDecision::RetryAt(at) => at,
//!     RetryDecision::GiveUp(why) => panic!("{why:?}"),
//! };
//! assert!(first_timer > t0);
//!
//! // The ack arrives 3 ms later; the message was never retransmitted, so it is a sample.
//! let sample = rtt.on_ack(t0, t0 + Duration::from_millis(3), false);
//! assert_eq!(sample, Some(Duration::from_millis(3)));
//! assert_eq!(rtt.srtt(), Some(Duration::from_millis(3)));
//!
//! // Had the timer fired instead, the retry needs the budget's permission:
//! assert!(budget.try_withdraw(first_timer));
//! ```

use crate::rng::SplitMix64;
use std::time::{Duration, Instant};

/// Errors from validating [`RttConfig`], [`RetryPolicy`] or [`RetryBudgetConfig`].
///
/// All of them mean the configuration is unusable as given: fix the named field and
/// build again. None is transient.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryConfigError {
    /// `min_rto` is zero or larger than `max_rto`. Set `0 < min_rto <= max_rto`.
    #[error("RTO bounds invalid: min_rto {min:?} must be > 0 and <= max_rto {max:?}")]
    RtoBounds {
        /// The configured minimum.
        min: Duration,
        /// The configured maximum.
        max: Duration,
    },
    /// `initial_rto` lies outside `[min_rto, max_rto]`. Move it inside the bounds.
    #[error("initial_rto {initial:?} outside [min_rto {min:?}, max_rto {max:?}]")]
    InitialRtoOutOfBounds {
        /// The configured initial RTO.
        initial: Duration,
        /// The configured minimum.
        min: Duration,
        /// The configured maximum.
        max: Duration,
    },
    /// `max_attempts` is `Some(0)`: a message could never be sent. Use `None` (no
    /// limit) or at least `Some(1)` (send once, never retry).
    #[error("max_attempts must be None or at least 1")]
    ZeroMaxAttempts,
    /// `deadline` is `Some(0)`: every message would expire before its first send. Use
    /// `None` or a positive duration.
    #[error("deadline must be None or positive")]
    ZeroDeadline,
    /// `backoff_cap` is zero: every retry would fire immediately. Use a positive cap.
    #[error("backoff_cap must be positive")]
    ZeroBackoffCap,
    /// The budget's `retry_ratio` is not a finite number in `[0, 1000]`.
    #[error("retry_ratio {0} must be finite and within [0, 1000]")]
    RetryRatio(f64),
    /// The budget's `ttl` is shorter than [`RetryBudget::SLOTS`] milliseconds. Use a
    /// window of at least that (the default is 10 s).
    #[error("budget ttl {0:?} too short: at least 10 ms")]
    BudgetTtl(Duration),
}

// ---------------------------------------------------------------------------------------
// RTT estimation
// ---------------------------------------------------------------------------------------

/// Configuration of an [`RttEstimator`] (RFC 6298 constants and clamps).
///
/// RFC 6298 targets the Internet: initial RTO 1 s and minimum RTO 1 s, chosen to stay
/// clear of 200 ms delayed acks on paths with 100+ ms RTTs. ackwire runs between
/// services on a LAN, where RTTs are tens of microseconds to a few milliseconds (plus the
/// receiver's handler time, since at-least-once acks after the handler), so the defaults
/// are tighter:
///
/// | field | default | why |
/// |---|---|---|
/// | `initial_rto` | 200 ms | RTO before the first sample; ~100× a LAN RTT, yet a lost first message is retried quickly |
/// | `min_rto` | 200 ms | Linux TCP's `TCP_RTO_MIN`. It must exceed the worst ack delay, and that delay includes queueing behind a full in-flight window (a 4096-message window at ~600 k msgs/s is ~7 ms, more on a busy host). Karn's rule then starves the estimator: retransmitted messages give no sample, so a too-low floor never corrects itself. Measured: with 5 ms, two thirds of a bulk stream was retransmitted spuriously; with 200 ms, 9 of 15 M. |
/// | `max_rto` | 2 s | a LAN peer slower than this is better treated by the failure detector and handoff than by longer timers |
/// | `granularity` | 1 ms | tokio timers fire with millisecond resolution (RFC 6298 "G") |
///
/// The RFC's `alpha = 1/8`, `beta = 1/4` and `K = 4` are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RttConfig {
    /// RTO used until the first RTT sample arrives. Default 200 ms.
    #[serde(with = "crate::config_serde::duration")]
    pub initial_rto: Duration,
    /// Lower clamp of the RTO. Default 200 ms.
    #[serde(with = "crate::config_serde::duration")]
    pub min_rto: Duration,
    /// Upper clamp of the RTO. Default 2 s.
    #[serde(with = "crate::config_serde::duration")]
    pub max_rto: Duration,
    /// Clock granularity `G`: the variance term is at least this. Default 1 ms.
    #[serde(with = "crate::config_serde::duration")]
    pub granularity: Duration,
}

impl Default for RttConfig {
    fn default() -> Self {
        RttConfig {
            initial_rto: Duration::from_millis(200),
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(2),
            granularity: Duration::from_millis(1),
        }
    }
}

impl RttConfig {
    /// Check `0 < min_rto <= initial_rto <= max_rto`.
    pub fn validate(&self) -> Result<(), RetryConfigError> {
        if self.min_rto.is_zero() || self.min_rto > self.max_rto {
            return Err(RetryConfigError::RtoBounds {
                min: self.min_rto,
                max: self.max_rto,
            });
        }
        if self.initial_rto < self.min_rto || self.initial_rto > self.max_rto {
            return Err(RetryConfigError::InitialRtoOutOfBounds {
                initial: self.initial_rto,
                min: self.min_rto,
                max: self.max_rto,
            });
        }
        Ok(())
    }
}

/// Smoothed RTT and retransmission timeout per RFC 6298.
///
/// Feed it samples with [`on_sample`](Self::on_sample) (the caller applies Karn's rule)
/// or, more safely, with [`on_ack`](Self::on_ack), which applies Karn's rule itself.
/// [`rto`](Self::rto) is always within `[min_rto, max_rto]`, even for a config that did
/// not pass [`RttConfig::validate`] (then `max_rto` wins).
///
/// The estimator does not back itself off on timeouts (RFC 6298 §5.5); the exponential
/// backoff of a message's timer is [`Backoff`]'s job, so one lost message does not
/// slow every other message of the stream.
#[derive(Debug, Clone)]
pub struct RttEstimator {
    config: RttConfig,
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
}

impl RttEstimator {
    /// A fresh estimator: no SRTT yet, RTO = `initial_rto` (clamped).
    pub fn new(config: RttConfig) -> Self {
        let rto = clamp(config.initial_rto, config.min_rto, config.max_rto);
        RttEstimator {
            config,
            srtt: None,
            rttvar: Duration::ZERO,
            rto,
        }
    }

    /// Take one RTT measurement (RFC 6298 §2.2–2.3).
    ///
    /// The first sample sets `SRTT = R`, `RTTVAR = R/2`; later ones update
    /// `RTTVAR = 3/4·RTTVAR + 1/4·|SRTT − R|` then `SRTT = 7/8·SRTT + 1/8·R`. Then
    /// `RTO = SRTT + max(G, 4·RTTVAR)`, clamped to `[min_rto, max_rto]`. Never panics
    /// or overflows, whatever `rtt` is.
    ///
    /// The caller must only pass samples of messages that were never retransmitted
    /// (Karn's rule); [`on_ack`](Self::on_ack) does that check for you.
    pub fn on_sample(&mut self, rtt: Duration) {
        let r = rtt.as_nanos();
        let (srtt, rttvar) = match self.srtt {
            None => (r, r / 2),
            Some(s) => {
                let s = s.as_nanos();
                let var = self.rttvar.as_nanos();
                let new_var = (var * 3 + s.abs_diff(r)) / 4;
                let new_srtt = (s * 7 + r) / 8;
                (new_srtt, new_var)
            }
        };
        self.srtt = Some(nanos_to_duration(srtt));
        self.rttvar = nanos_to_duration(rttvar);
        let g = self.config.granularity.as_nanos();
        let rto = srtt.saturating_add(g.max(rttvar.saturating_mul(4)));
        self.rto = clamp(
            nanos_to_duration(rto),
            self.config.min_rto,
            self.config.max_rto,
        );
    }

    /// Apply Karn's rule to an ack and take the sample if it is unambiguous.
    ///
    /// `sent_at` is when the acked message was first sent, `now` when its ack arrived.
    /// If `was_retransmitted`, the ack cannot be matched to one transmission and no
    /// sample is taken. Returns the sample taken, if any. An ack "before" its send
    /// (`now < sent_at`, a caller bug or clock confusion) counts as a zero RTT.
    pub fn on_ack(
        &mut self,
        sent_at: Instant,
        now: Instant,
        was_retransmitted: bool,
    ) -> Option<Duration> {
        if was_retransmitted {
            return None;
        }
        let rtt = now.saturating_duration_since(sent_at);
        self.on_sample(rtt);
        Some(rtt)
    }

    /// Smoothed RTT, `None` before the first sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// RTT variation (`RTTVAR`); zero before the first sample.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Current retransmission timeout, always within `[min_rto, max_rto]`.
    pub fn rto(&self) -> Duration {
        self.rto
    }

    /// The configuration this estimator was built with.
    pub fn config(&self) -> &RttConfig {
        &self.config
    }
}

// ---------------------------------------------------------------------------------------
// Retry policy and backoff
// ---------------------------------------------------------------------------------------

/// When to stop retrying a message, and how its retry timers grow.
///
/// | field | default | meaning |
/// |---|---|---|
/// | `max_attempts` | `None` | total transmissions including the first; `None` = no limit (the deadline ends retries) |
/// | `deadline` | `Some(30 s)` | time since the first send after which the message is given up (and typically handed off) |
/// | `backoff_cap` | 2 s | no retry timer is ever longer than this |
/// | `jitter` | `true` | randomise each retransmission's timer to `[d/2, d]` ("equal jitter") so retries of many senders do not synchronise (a node's first timer per message is exactly one RTO, as TCP's) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Maximum number of transmissions (first send included). Default `None`.
    pub max_attempts: Option<u32>,
    /// Give up this long after the first send. Default `Some(30 s)`.
    #[serde(default, with = "crate::config_serde::option_duration")]
    pub deadline: Option<Duration>,
    /// Upper bound of any retry timer. Default 2 s.
    #[serde(with = "crate::config_serde::duration")]
    pub backoff_cap: Duration,
    /// Equal jitter on (`true`, default) or exact timers (`false`). A node jitters the
    /// timers that follow a retransmission; a message's first timer is one RTO.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: None,
            deadline: Some(Duration::from_secs(30)),
            backoff_cap: Duration::from_secs(2),
            jitter: true,
        }
    }
}

/// Why a message's retries ended (see [`RetryPolicy::schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUp {
    /// `max_attempts` transmissions were made.
    MaxAttempts,
    /// The message's deadline passed (or would pass before the next attempt could
    /// be useful: the deadline is reached with no time left).
    Deadline,
}

/// What to do after a transmission, from [`RetryPolicy::schedule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Arm the message's retry timer for this instant.
    RetryAt(Instant),
    /// Stop retrying: report failure or hand the message off.
    GiveUp(GiveUp),
}

impl RetryPolicy {
    /// Check that the policy can ever send: `max_attempts != Some(0)`,
    /// `deadline != Some(0)`, `backoff_cap > 0`.
    pub fn validate(&self) -> Result<(), RetryConfigError> {
        if self.max_attempts == Some(0) {
            return Err(RetryConfigError::ZeroMaxAttempts);
        }
        if self.deadline == Some(Duration::ZERO) {
            return Err(RetryConfigError::ZeroDeadline);
        }
        if self.backoff_cap.is_zero() {
            return Err(RetryConfigError::ZeroBackoffCap);
        }
        Ok(())
    }

    /// Decide what follows transmission number `attempt` (0 = the first send) of a
    /// message first sent at `first_sent`, transmitted at `now`.
    ///
    /// Gives up if `attempt + 1` transmissions reach `max_attempts` or if the deadline
    /// has passed; otherwise returns `now + backoff.delay(rto, attempt)`, but never
    /// later than the deadline — so the timer also fires when the deadline expires and
    /// the next call to `schedule` reports [`GiveUp::Deadline`].
    pub fn schedule(
        &self,
        backoff: &mut Backoff,
        rto: Duration,
        attempt: u32,
        first_sent: Instant,
        now: Instant,
    ) -> RetryDecision {
        if let Some(max) = self.max_attempts {
            if attempt.saturating_add(1) >= max {
                return RetryDecision::GiveUp(GiveUp::MaxAttempts);
            }
        }
        let deadline_at = self.deadline.and_then(|d| first_sent.checked_add(d));
        if let Some(dl) = deadline_at {
            if now >= dl {
                return RetryDecision::GiveUp(GiveUp::Deadline);
            }
        }
        let delay = backoff.delay(rto, attempt);
        let at = now.checked_add(delay);
        match (at, deadline_at) {
            (Some(at), Some(dl)) => RetryDecision::RetryAt(at.min(dl)),
            (Some(at), None) => RetryDecision::RetryAt(at),
            (None, Some(dl)) => RetryDecision::RetryAt(dl),
            // `now + delay` overflows Instant and there is no deadline: the furthest
            // representable timer is "never" for any practical purpose.
            (None, None) => RetryDecision::RetryAt(far_future(now)),
        }
    }
}

/// Exponential backoff with optional equal jitter.
///
/// For attempt `n` (0 = the timer armed after the first send) the un-jittered delay is
/// `d(n) = min(cap, rto · 2ⁿ)`. With jitter the delay is uniform in `[d(n)/2, d(n)]`
/// ("equal jitter": never less than half the deterministic delay, so a retry never
/// fires much earlier than the RTO suggests, while concurrent senders spread out);
/// without jitter it is exactly `d(n)`. `d(n)` is non-decreasing in `n`, and nothing
/// overflows or panics for any `n` up to `u32::MAX` or any `rto`.
///
/// Owns its PRNG, seeded by the caller, so simulations are reproducible.
///
/// ```
/// use ackwire::retry::{Backoff, RetryPolicy};
/// use std::time::Duration;
///
/// let policy = RetryPolicy { backoff_cap: Duration::from_secs(1), ..RetryPolicy::default() };
/// let mut b = Backoff::new(&policy, 7);
/// let rto = Duration::from_millis(10);
/// assert_eq!(b.upper(rto, 3), Duration::from_millis(80));
/// assert_eq!(b.upper(rto, 40), Duration::from_secs(1)); // capped
/// let d = b.delay(rto, 3);
/// assert!(d >= Duration::from_millis(40) && d <= Duration::from_millis(80));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    cap: Duration,
    jitter: bool,
    rng: SplitMix64,
}

impl Backoff {
    /// Backoff with `policy.backoff_cap` and `policy.jitter`, jitter drawn from a PRNG
    /// seeded with `seed`.
    pub fn new(policy: &RetryPolicy, seed: u64) -> Self {
        Backoff {
            cap: policy.backoff_cap,
            jitter: policy.jitter,
            rng: SplitMix64::new(seed),
        }
    }

    /// The un-jittered delay `min(cap, rto · 2^attempt)`: the upper bound of
    /// [`delay`](Self::delay).
    pub fn upper(&self, rto: Duration, attempt: u32) -> Duration {
        if rto.is_zero() {
            return Duration::ZERO;
        }
        if attempt >= 64 {
            return self.cap;
        }
        let scaled = rto.as_nanos().checked_mul(1u128 << attempt);
        match scaled {
            Some(n) => nanos_to_duration(n).min(self.cap),
            None => self.cap,
        }
    }

    /// The lower bound of [`delay`](Self::delay): `upper / 2` with jitter, else `upper`.
    pub fn lower(&self, rto: Duration, attempt: u32) -> Duration {
        let upper = self.upper(rto, attempt);
        if self.jitter {
            upper / 2
        } else {
            upper
        }
    }

    /// The delay before retry timer `attempt` fires, within
    /// `[lower(rto, attempt), upper(rto, attempt)]`.
    pub fn delay(&mut self, rto: Duration, attempt: u32) -> Duration {
        let upper = self.upper(rto, attempt);
        if !self.jitter {
            return upper;
        }
        let hi = upper.as_nanos();
        let lo = hi / 2;
        let span = hi - lo;
        // Draw in units of 2^shift ns so the span fits in a u64; lo + (r << shift) <= hi.
        let shift = 128 - span.leading_zeros();
        let shift = shift.saturating_sub(63);
        let r = self.rng.range_u64(0, (span >> shift) as u64);
        nanos_to_duration(lo + (u128::from(r) << shift))
    }

    /// The configured cap.
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

// ---------------------------------------------------------------------------------------
// Retry budget
// ---------------------------------------------------------------------------------------

/// Configuration of a [`RetryBudget`] (Finagle's and tower's defaults).
///
/// | field | default | meaning |
/// |---|---|---|
/// | `ttl` | 10 s | how long a deposit (or a withdrawal) counts |
/// | `min_retries_per_sec` | 10 | retries always allowed even with no fresh traffic, so a quiet stream can still recover a lost message |
/// | `retry_ratio` | 0.2 | retries allowed per fresh send: at most 20 % extra load on a struggling target |
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Window during which deposits and withdrawals count. Default 10 s.
    #[serde(with = "crate::config_serde::duration")]
    pub ttl: Duration,
    /// Floor of retries per second allowed regardless of deposits. Default 10.
    pub min_retries_per_sec: u32,
    /// Retries allowed per fresh send, in `[0, 1000]`. Default 0.2.
    pub retry_ratio: f64,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 10,
            retry_ratio: 0.2,
        }
    }
}

impl RetryBudgetConfig {
    /// Check `retry_ratio` is finite in `[0, 1000]` and `ttl >= 10 ms`.
    pub fn validate(&self) -> Result<(), RetryConfigError> {
        if !self.retry_ratio.is_finite() || !(0.0..=1000.0).contains(&self.retry_ratio) {
            return Err(RetryConfigError::RetryRatio(self.retry_ratio));
        }
        if self.ttl < Duration::from_millis(RetryBudget::SLOTS as u64) {
            return Err(RetryConfigError::BudgetTtl(self.ttl));
        }
        Ok(())
    }

    /// The floor: retries allowed per window with no deposits,
    /// `min_retries_per_sec · ttl` (rounded down).
    pub fn reserve(&self) -> u64 {
        (u128::from(self.min_retries_per_sec) * self.ttl.as_micros() / 1_000_000)
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

/// A budget that keeps retries to a fraction of fresh traffic, per target.
///
/// Every fresh send [`deposit`](Self::deposit)s; every retry must
/// [`try_withdraw`](Self::try_withdraw). Within the sliding window of `ttl`, successful
/// withdrawals never exceed `retry_ratio · deposits + min_retries_per_sec · ttl`. The
/// window slides in [`SLOTS`](Self::SLOTS) steps of `ttl / SLOTS`: an event counts
/// for between `ttl − ttl/SLOTS` and `ttl`.
///
/// **When the budget refuses**, the caller keeps the message in flight and re-arms
/// its retry timer (for the next backoff step); the retry is *deferred*, never dropped.
/// Only the [`RetryPolicy`] deadline or attempt limit ends a message's retries. This is
/// what keeps at-least-once intact while a struggling target is not buried in retries.
///
/// Arithmetic is in integer units (one retry = 1 000 000 units, a deposit is worth
/// `floor(retry_ratio · 1 000 000)`), so the bound holds exactly, without float drift.
/// Instants earlier than the latest one seen are treated as the latest (time never
/// runs backwards here).
///
/// ```
/// use ackwire::retry::{RetryBudget, RetryBudgetConfig};
/// use std::time::{Duration, Instant};
///
/// let cfg = RetryBudgetConfig { min_retries_per_sec: 0, ..RetryBudgetConfig::default() };
/// let t0 = Instant::now();
/// let mut budget = RetryBudget::new(cfg, t0);
/// for _ in 0..10 {
///     budget.deposit(t0);
/// }
/// // 10 fresh sends × 0.2 = 2 retries.
/// assert!(budget.try_withdraw(t0));
/// assert!(budget.try_withdraw(t0));
/// assert!(!budget.try_withdraw(t0)); // defer this retry to its next timer
/// // Once the window has passed, the deposits and withdrawals have expired.
/// budget.deposit(t0 + Duration::from_secs(11));
/// assert!(!budget.try_withdraw(t0 + Duration::from_secs(11)));
/// ```
#[derive(Debug, Clone)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    epoch: Instant,
    slot_nanos: u128,
    /// Index of the slot `now` falls in, the latest seen.
    current: u64,
    deposits: [u64; Self::SLOTS],
    withdrawals: [u64; Self::SLOTS],
    deposit_units: u128,
    reserve_units: u128,
}

const UNITS_PER_RETRY: u128 = 1_000_000;

impl RetryBudget {
    /// Number of slots the window is divided into.
    pub const SLOTS: usize = 10;

    /// A budget with an empty window starting at `now`. A config that fails
    /// [`RetryBudgetConfig::validate`] is made safe: a bad ratio counts as 0 and the
    /// window is at least `SLOTS` nanoseconds.
    pub fn new(config: RetryBudgetConfig, now: Instant) -> Self {
        let ratio = if config.retry_ratio.is_finite() {
            config.retry_ratio.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        // Round down so the bound `ratio · deposits` is never exceeded.
        let deposit_units = (ratio * UNITS_PER_RETRY as f64).floor() as u128;
        let reserve_units = u128::from(config.min_retries_per_sec) * config.ttl.as_micros();
        let slot_nanos = (config.ttl.as_nanos() / Self::SLOTS as u128).max(1);
        RetryBudget {
            config,
            epoch: now,
            slot_nanos,
            current: 0,
            deposits: [0; Self::SLOTS],
            withdrawals: [0; Self::SLOTS],
            deposit_units,
            reserve_units,
        }
    }

    /// Record one fresh (non-retry) send at `now`.
    pub fn deposit(&mut self, now: Instant) {
        let i = self.advance(now);
        self.deposits[i] = self.deposits[i].saturating_add(1);
    }

    /// Ask to send one retry at `now`. `true`: send it (the withdrawal is recorded).
    /// `false`: the budget is exhausted — re-arm the message's retry timer and try
    /// again then; do not drop the message.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let i = self.advance(now);
        if self.balance_units() >= UNITS_PER_RETRY as i128 {
            self.withdrawals[i] = self.withdrawals[i].saturating_add(1);
            true
        } else {
            false
        }
    }

    /// Whole retries currently available at `now` (0 when exhausted).
    pub fn balance(&mut self, now: Instant) -> u64 {
        self.advance(now);
        let b = self.balance_units();
        if b <= 0 {
            0
        } else {
            u64::try_from(b as u128 / UNITS_PER_RETRY).unwrap_or(u64::MAX)
        }
    }

    /// The configuration this budget was built with.
    pub fn config(&self) -> &RetryBudgetConfig {
        &self.config
    }

    fn balance_units(&self) -> i128 {
        let d: u128 = self.deposits.iter().map(|&x| u128::from(x)).sum();
        let w: u128 = self.withdrawals.iter().map(|&x| u128::from(x)).sum();
        let credit = d.saturating_mul(self.deposit_units) + self.reserve_units;
        let debit = w * UNITS_PER_RETRY;
        // Both are far below i128::MAX: counts are u64, units ≤ 1e9.
        credit as i128 - debit as i128
    }

    /// Move the window to `now`, clearing expired slots; returns the current slot.
    fn advance(&mut self, now: Instant) -> usize {
        let idx = now.saturating_duration_since(self.epoch).as_nanos() / self.slot_nanos;
        let idx = u64::try_from(idx).unwrap_or(u64::MAX);
        if idx > self.current {
            let steps = idx - self.current;
            if steps >= Self::SLOTS as u64 {
                self.deposits = [0; Self::SLOTS];
                self.withdrawals = [0; Self::SLOTS];
            } else {
                for k in 1..=steps {
                    let s = ((self.current + k) % Self::SLOTS as u64) as usize;
                    self.deposits[s] = 0;
                    self.withdrawals[s] = 0;
                }
            }
            self.current = idx;
        }
        (self.current % Self::SLOTS as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn clamp(d: Duration, min: Duration, max: Duration) -> Duration {
    // `max` wins over `min` for an invalid config, so the RTO is never above `max`.
    d.max(min).min(max)
}

/// Nanoseconds to a `Duration`, saturating at `Duration::MAX`.
fn nanos_to_duration(n: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(n / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(secs, (n % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

/// `now + d`, or [`far_future`] ("never") where that overflows the clock: a configured
/// duration may be as long as `Duration::MAX`.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or_else(|| far_future(now))
}

/// The latest instant reachable from `now` by halving steps (about a century ahead
/// at most on common platforms); used only when `now + delay` overflows.
pub(crate) fn far_future(now: Instant) -> Instant {
    let mut step = Duration::from_secs(100 * 365 * 24 * 3600);
    let mut at = now;
    while !step.is_zero() {
        if let Some(t) = at.checked_add(step) {
            at = t;
        }
        step /= 2;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A 5 ms floor, low enough that the RFC 6298 arithmetic below is not clamped.
    fn low_floor() -> RttConfig {
        RttConfig {
            min_rto: ms(5),
            ..RttConfig::default()
        }
    }

    #[test]
    fn first_sample_sets_srtt_and_half_rttvar() {
        let mut e = RttEstimator::new(low_floor());
        assert_eq!(e.rto(), ms(200));
        assert_eq!(e.srtt(), None);
        e.on_sample(ms(10));
        assert_eq!(e.srtt(), Some(ms(10)));
        assert_eq!(e.rttvar(), ms(5));
        assert_eq!(e.rto(), ms(30)); // 10 + 4*5
    }

    #[test]
    fn second_sample_follows_rfc6298_update_order() {
        let mut e = RttEstimator::new(low_floor());
        e.on_sample(ms(10));
        e.on_sample(ms(18));
        // RTTVAR = 3/4*5 + 1/4*|10-18| = 3.75 + 2 = 5.75 ms (uses the old SRTT)
        assert_eq!(e.rttvar(), Duration::from_micros(5750));
        // SRTT = 7/8*10 + 1/8*18 = 11 ms
        assert_eq!(e.srtt(), Some(ms(11)));
        assert_eq!(e.rto(), ms(11) + Duration::from_micros(23_000));
    }

    #[test]
    fn karn_rule_skips_retransmitted_acks() {
        let mut e = RttEstimator::new(RttConfig::default());
        let t0 = Instant::now();
        assert_eq!(e.on_ack(t0, t0 + ms(50), true), None);
        assert_eq!(e.srtt(), None);
        assert_eq!(e.rto(), ms(200));
        assert_eq!(e.on_ack(t0, t0 + ms(4), false), Some(ms(4)));
        assert_eq!(e.srtt(), Some(ms(4)));
    }

    #[test]
    fn rto_clamped_and_granularity_applies() {
        let mut e = RttEstimator::new(low_floor());
        for _ in 0..200 {
            e.on_sample(Duration::from_micros(100));
        }
        assert_eq!(e.rttvar(), Duration::ZERO);
        assert_eq!(e.rto(), ms(5)); // 0.1 ms + G(1 ms) < min 5 ms
        e.on_sample(Duration::MAX);
        assert_eq!(e.rto(), ms(2000));
    }

    #[test]
    fn invalid_rtt_configs_rejected() {
        let bad = RttConfig {
            min_rto: ms(0),
            ..RttConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(RetryConfigError::RtoBounds { .. })
        ));
        let bad = RttConfig {
            initial_rto: ms(3000),
            ..RttConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(RetryConfigError::InitialRtoOutOfBounds { .. })
        ));
        assert_eq!(RttConfig::default().validate(), Ok(()));
    }

    #[test]
    fn policy_validation() {
        assert_eq!(RetryPolicy::default().validate(), Ok(()));
        let p = RetryPolicy {
            max_attempts: Some(0),
            ..RetryPolicy::default()
        };
        assert_eq!(p.validate(), Err(RetryConfigError::ZeroMaxAttempts));
        let p = RetryPolicy {
            deadline: Some(Duration::ZERO),
            ..RetryPolicy::default()
        };
        assert_eq!(p.validate(), Err(RetryConfigError::ZeroDeadline));
        let p = RetryPolicy {
            backoff_cap: Duration::ZERO,
            ..RetryPolicy::default()
        };
        assert_eq!(p.validate(), Err(RetryConfigError::ZeroBackoffCap));
    }

    #[test]
    fn schedule_gives_up_on_attempts_and_deadline_and_clamps_to_deadline() {
        let policy = RetryPolicy {
            max_attempts: Some(3),
            deadline: Some(ms(100)),
            backoff_cap: ms(1000),
            jitter: false,
        };
        let mut b = Backoff::new(&policy, 1);
        let t0 = Instant::now();
        assert_eq!(
            policy.schedule(&mut b, ms(10), 0, t0, t0),
            RetryDecision::RetryAt(t0 + ms(10))
        );
        assert_eq!(
            policy.schedule(&mut b, ms(10), 1, t0, t0 + ms(10)),
            RetryDecision::RetryAt(t0 + ms(30))
        );
        // Third transmission is the last one allowed.
        assert_eq!(
            policy.schedule(&mut b, ms(10), 2, t0, t0 + ms(30)),
            RetryDecision::GiveUp(GiveUp::MaxAttempts)
        );
        let unlimited = RetryPolicy {
            max_attempts: None,
            ..policy
        };
        // 80 ms backoff from t0+60 would pass the 100 ms deadline: clamped to it.
        assert_eq!(
            unlimited.schedule(&mut b, ms(10), 3, t0, t0 + ms(60)),
            RetryDecision::RetryAt(t0 + ms(100))
        );
        assert_eq!(
            unlimited.schedule(&mut b, ms(10), 4, t0, t0 + ms(100)),
            RetryDecision::GiveUp(GiveUp::Deadline)
        );
        let forever = RetryPolicy {
            max_attempts: None,
            deadline: None,
            backoff_cap: Duration::MAX,
            jitter: false,
        };
        let mut b = Backoff::new(&forever, 1);
        match forever.schedule(&mut b, ms(10), u32::MAX, t0, t0) {
            RetryDecision::RetryAt(at) => assert!(at > t0),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_until_cap() {
        let policy = RetryPolicy {
            backoff_cap: ms(100),
            jitter: false,
            ..RetryPolicy::default()
        };
        let mut b = Backoff::new(&policy, 3);
        let got: Vec<_> = (0..6).map(|n| b.delay(ms(10), n)).collect();
        assert_eq!(got, vec![ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]);
        assert_eq!(b.upper(Duration::ZERO, 5), Duration::ZERO);
        assert_eq!(b.upper(Duration::MAX, 1), ms(100));
    }

    #[test]
    fn budget_floor_only_without_deposits() {
        let cfg = RetryBudgetConfig {
            ttl: Duration::from_secs(1),
            min_retries_per_sec: 5,
            retry_ratio: 0.2,
        };
        assert_eq!(cfg.reserve(), 5);
        let t0 = Instant::now();
        let mut b = RetryBudget::new(cfg, t0);
        for _ in 0..5 {
            assert!(b.try_withdraw(t0));
        }
        assert!(!b.try_withdraw(t0));
        assert_eq!(b.balance(t0), 0);
        // After a full window the withdrawals expired.
        assert_eq!(b.balance(t0 + Duration::from_secs(1)), 5);
    }

    #[test]
    fn budget_deposits_partially_expire_by_slot() {
        let cfg = RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 0,
            retry_ratio: 0.5,
        };
        let t0 = Instant::now();
        let mut b = RetryBudget::new(cfg, t0);
        b.deposit(t0);
        b.deposit(t0);
        b.deposit(t0 + Duration::from_secs(5));
        b.deposit(t0 + Duration::from_secs(5));
        assert_eq!(b.balance(t0 + Duration::from_secs(9)), 2);
        // The first two deposits (slot 0) expire when slot 10 begins.
        assert_eq!(b.balance(t0 + Duration::from_secs(10)), 1);
        assert_eq!(b.balance(t0 + Duration::from_secs(15)), 0);
    }

    #[test]
    fn budget_config_validation() {
        assert_eq!(RetryBudgetConfig::default().validate(), Ok(()));
        for r in [f64::NAN, -0.1, 1000.5, f64::INFINITY] {
            let c = RetryBudgetConfig {
                retry_ratio: r,
                ..RetryBudgetConfig::default()
            };
            assert!(matches!(c.validate(), Err(RetryConfigError::RetryRatio(_))));
        }
        let c = RetryBudgetConfig {
            ttl: ms(5),
            ..RetryBudgetConfig::default()
        };
        assert_eq!(c.validate(), Err(RetryConfigError::BudgetTtl(ms(5))));
    }
}
