//! When to stop retrying and when to fire the next retry timer: [`RetryPolicy`],
//! [`GiveUp`], [`RetryDecision`].
//!
//! Owns the attempt limit and the deadline and how they combine with [`Backoff`]:
//! the one place that decides whether a message is retried or given up, used by every
//! stream. Must not know about frames, streams, receivers or budgets, nor read a clock.

use super::{later, Backoff, RetryConfigError};
use std::time::{Duration, Instant};

/// When to stop retrying a message, and how its retry timers grow.
///
/// | field | default | meaning |
/// |---|---|---|
/// | `max_attempts` | `None` | transmissions (the first included) after which a retry timer gives the message up; `None` = no limit (the deadline ends retries). A reconnection or a nack resends unacked messages at once, outside this count |
/// | `deadline` | `Some(30 s)` | time since the first send after which the message is given up (and typically handed off) |
/// | `backoff_cap` | 2 s | no retry timer is ever longer than this |
/// | `jitter` | `true` | randomise each retransmission's timer to `[d/2, d]` ("equal jitter") so retries of many senders do not synchronise (a node's first timer per message is exactly one RTO, as TCP's) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Transmissions (first send included) after which the retry timer gives the
    /// message up. Not a hard cap on copies sent: after a reconnection or a nack the
    /// unacked messages are resent at once whatever their count, since the copies sent
    /// before may have been lost with the connection. Default `None`.
    pub max_attempts: Option<u32>,
    /// Give up this long after the first send. Default `Some(30 s)`.
    // No field-level `default` here: it would make a missing key `None` (no deadline)
    // instead of the struct's `Some(30 s)`. (Regression: `[proto.retry] jitter = false`
    // retried for ever.)
    #[serde(with = "crate::config_serde::option_duration")]
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

/// Why a message's retries ended (see [`RetryPolicy::on_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUp {
    /// `max_attempts` transmissions were made and the timer after the last one
    /// fired without an ack.
    MaxAttempts,
    /// The message's deadline passed.
    Deadline,
}

/// What a message's retry timer means when it fires, from [`RetryPolicy::on_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryDecision {
    /// The policy allows another transmission: retransmit (if the retry budget allows;
    /// otherwise defer it) and arm the next timer with [`RetryPolicy::schedule`].
    Retransmit,
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

    /// When to arm a message's retry timer after its transmission number
    /// `transmissions` (1 = the first send), made at `now`.
    ///
    /// The timer after the first send is exactly one RTO (`backoff.upper(rto, 0)`, no
    /// jitter, as TCP's: first transmissions are already spread by when they were
    /// sent); the timer after transmission `n >= 2` is `backoff.delay(rto, n - 1)`,
    /// backed off and jittered. The instant is never later than `deadline` (the
    /// message's absolute deadline, if any), so the timer also fires when the deadline
    /// passes and [`on_timeout`](Self::on_timeout) then reports [`GiveUp::Deadline`].
    /// A delay past the clock's range gives an instant about a century ahead ("never").
    /// `transmissions == 0` is taken as 1.
    pub fn schedule(
        &self,
        backoff: &mut Backoff,
        rto: Duration,
        transmissions: u32,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Instant {
        let delay = if transmissions <= 1 {
            backoff.upper(rto, 0)
        } else {
            backoff.delay(rto, transmissions - 1)
        };
        let at = later(now, delay);
        deadline.map_or(at, |d| at.min(d))
    }

    /// A message's retry timer fired at `now`: may it be transmitted again, or are its
    /// retries over? `transmissions` is how often it was sent so far, `deadline` its
    /// absolute deadline (`None`: none; typically first send + [`deadline`](Self::deadline),
    /// unless the message carries its own).
    ///
    /// The deadline comes first: [`GiveUp::Deadline`] once `now >= deadline`. Then
    /// [`GiveUp::MaxAttempts`] once `transmissions >= max_attempts`: the limit counts
    /// transmissions, and the timer after the last one gives its ack time to arrive.
    /// Otherwise [`RetryDecision::Retransmit`].
    ///
    /// A caller that finds the message needs no retransmission at this timer (the
    /// receiver holds it, say) acts on [`GiveUp::Deadline`] only: the attempt limit
    /// bounds transmissions, not waiting.
    pub fn on_timeout(
        &self,
        transmissions: u32,
        deadline: Option<Instant>,
        now: Instant,
    ) -> RetryDecision {
        if deadline.is_some_and(|d| now >= d) {
            return RetryDecision::GiveUp(GiveUp::Deadline);
        }
        if self.max_attempts.is_some_and(|max| transmissions >= max) {
            return RetryDecision::GiveUp(GiveUp::MaxAttempts);
        }
        RetryDecision::Retransmit
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
    fn schedule_backs_off_after_the_first_rto_and_clamps_to_the_deadline() {
        let policy = RetryPolicy {
            max_attempts: Some(3),
            deadline: Some(ms(100)),
            backoff_cap: ms(1000),
            jitter: false,
        };
        let mut b = Backoff::new(&policy, 1);
        let t0 = Instant::now();
        let dl = Some(t0 + ms(100));
        assert_eq!(policy.schedule(&mut b, ms(10), 1, dl, t0), t0 + ms(10));
        assert_eq!(policy.schedule(&mut b, ms(10), 0, dl, t0), t0 + ms(10));
        assert_eq!(
            policy.schedule(&mut b, ms(10), 2, dl, t0 + ms(10)),
            t0 + ms(30)
        );
        // An 80 ms backoff from t0+60 would pass the 100 ms deadline: clamped to it.
        assert_eq!(
            policy.schedule(&mut b, ms(10), 4, dl, t0 + ms(60)),
            t0 + ms(100)
        );
        let forever = RetryPolicy {
            max_attempts: None,
            deadline: None,
            backoff_cap: Duration::MAX,
            jitter: false,
        };
        let mut b = Backoff::new(&forever, 1);
        assert!(forever.schedule(&mut b, ms(10), u32::MAX, None, t0) > t0);
        assert!(forever.schedule(&mut b, Duration::MAX, 1, None, t0) > t0);
    }

    #[test]
    fn schedule_never_jitters_the_first_timer() {
        let policy = RetryPolicy::default();
        assert!(policy.jitter);
        let mut b = Backoff::new(&policy, 9);
        let t0 = Instant::now();
        for _ in 0..32 {
            assert_eq!(policy.schedule(&mut b, ms(200), 1, None, t0), t0 + ms(200));
        }
        let second = policy.schedule(&mut b, ms(200), 2, None, t0) - t0;
        assert!(second >= ms(200) && second <= ms(400), "{second:?}");
    }

    #[test]
    fn on_timeout_checks_the_deadline_before_the_attempt_limit() {
        let policy = RetryPolicy {
            max_attempts: Some(3),
            ..RetryPolicy::default()
        };
        let t0 = Instant::now();
        let dl = Some(t0 + ms(100));
        assert_eq!(policy.on_timeout(0, dl, t0), RetryDecision::Retransmit);
        assert_eq!(
            policy.on_timeout(2, dl, t0 + ms(99)),
            RetryDecision::Retransmit
        );
        assert_eq!(
            policy.on_timeout(3, dl, t0 + ms(99)),
            RetryDecision::GiveUp(GiveUp::MaxAttempts)
        );
        assert_eq!(
            policy.on_timeout(3, dl, t0 + ms(100)),
            RetryDecision::GiveUp(GiveUp::Deadline)
        );
        assert_eq!(
            policy.on_timeout(1, dl, t0 + ms(100)),
            RetryDecision::GiveUp(GiveUp::Deadline)
        );
        let unlimited = RetryPolicy {
            max_attempts: None,
            deadline: None,
            ..RetryPolicy::default()
        };
        assert_eq!(
            unlimited.on_timeout(u32::MAX, None, t0 + ms(1_000_000)),
            RetryDecision::Retransmit
        );
    }
}
