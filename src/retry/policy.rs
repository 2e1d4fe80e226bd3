//! When to stop retrying and when to fire the next retry timer: [`RetryPolicy`],
//! [`GiveUp`], [`RetryDecision`].
//!
//! Owns the attempt limit and the deadline and how they combine with [`Backoff`].
//! Must not know about frames, streams or budgets, nor read a clock.

use super::{far_future, Backoff, RetryConfigError};
use std::time::{Duration, Instant};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
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
}
