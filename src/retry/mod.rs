//! Retransmission timing: RTT estimation, exponential backoff with jitter, retry limits
//! and a retry budget.
//!
//! This module owns the *arithmetic* of retrying: how long to wait before a message is
//! retransmitted ([`RttEstimator`], [`Backoff`]), when to give up ([`RetryPolicy`]), and
//! whether a retry may be sent right now without feeding a retry storm
//! ([`RetryBudget`]). It is sans-IO: it never reads a clock, never sleeps and never
//! touches tokio — every input that depends on time carries a `now: Instant` or a
//! [`Duration`]. It must not know about frames, streams or peers; the protocol core
//! (`proto`) owns one [`RttEstimator`], one [`Backoff`] and one [`RetryBudget`] per
//! outbound stream, and combines them with the [`RetryPolicy`].
//!
//! One file per concept, all re-exported here: `rtt` ([`RttConfig`],
//! [`RttEstimator`]), `backoff` ([`Backoff`]), `budget` ([`RetryBudgetConfig`],
//! [`RetryBudget`]) and `policy` ([`RetryPolicy`], [`GiveUp`], [`RetryDecision`]).
//!
//! # How the pieces fit
//!
//! 1. On an ack of a message, feed [`RttEstimator::on_ack`] with the time the
//!    message was *first* sent and whether it was ever retransmitted (Karn's rule: an
//!    ack of a retransmitted message is ambiguous and gives no sample). ackwire's
//!    streams do it once per ack frame, for the newest message the frame settles that
//!    was sent only once: a cumulative ack of a whole window is one sample, not
//!    thousands.
//! 2. When a message is transmitted (the first time or again), arm its retry timer
//!    for [`RetryPolicy::schedule`]: one RTO after the first send, then
//!    `min(cap, rto · 2ⁿ)` with jitter from [`Backoff`], never past the message's
//!    deadline.
//! 3. When the retry timer fires, ask [`RetryPolicy::on_timeout`]: the deadline or the
//!    attempt limit may end the message's retries ([`GiveUp`]). If it may be
//!    retransmitted, ask the stream's [`RetryBudget::try_withdraw`]. If that refuses,
//!    **do not drop the retry**: keep the message in flight and re-arm its timer
//!    (ackwire's streams ask again one RTO later). Retries are deferred, never lost;
//!    only the policy's deadline or attempt limit ends them.
//!
//! ```
//! use ackwire::retry::{Backoff, GiveUp, RetryBudget, RetryBudgetConfig, RetryDecision,
//!     RetryPolicy, RttConfig, RttEstimator};
//! use std::time::{Duration, Instant};
//!
//! let policy = RetryPolicy { max_attempts: Some(3), ..RetryPolicy::default() };
//! policy.validate().unwrap();
//! let mut rtt = RttEstimator::new(RttConfig::default());
//! let mut backoff = Backoff::new(&policy, 42);
//! let t0 = Instant::now();
//! let mut budget = RetryBudget::new(RetryBudgetConfig::default(), t0);
//! let deadline = policy.deadline.map(|d| t0 + d);
//!
//! // First send of a message: a fresh send deposits into the budget, and its timer is
//! // one RTO.
//! budget.deposit(t0);
//! let first_timer = policy.schedule(&mut backoff, rtt.rto(), 1, deadline, t0);
//! assert_eq!(first_timer, t0 + rtt.rto());
//!
//! // The ack arrives 3 ms later; the message was never retransmitted, so it is a sample.
//! let sample = rtt.on_ack(t0, t0 + Duration::from_millis(3), false);
//! assert_eq!(sample, Some(Duration::from_millis(3)));
//! assert_eq!(rtt.srtt(), Some(Duration::from_millis(3)));
//!
//! // Had the timer fired instead, the policy allows a retry, and the budget must too:
//! assert_eq!(policy.on_timeout(1, deadline, first_timer), RetryDecision::Retransmit);
//! assert!(budget.try_withdraw(first_timer));
//! // The timer after the third transmission ends the message.
//! assert_eq!(
//!     policy.on_timeout(3, deadline, first_timer),
//!     RetryDecision::GiveUp(GiveUp::MaxAttempts)
//! );
//! ```

mod backoff;
mod budget;
mod policy;
mod rtt;

pub use backoff::Backoff;
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use policy::{GiveUp, RetryDecision, RetryPolicy};
pub use rtt::{RttConfig, RttEstimator};

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
    /// limit) or at least `Some(1)` (no timer-driven retransmission).
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

/// duration may be as long as `Duration::MAX`.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or_else(|| far_future(now))
}

/// The latest instant reachable from `now` by halving steps (about a century ahead
/// at most on common platforms); used only when `now + delay` overflows.
fn far_future(now: Instant) -> Instant {
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

/// Nanoseconds to a `Duration`, saturating at `Duration::MAX`.
fn nanos_to_duration(n: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(n / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(secs, (n % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}
