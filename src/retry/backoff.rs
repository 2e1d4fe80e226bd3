//! Exponential backoff with equal jitter: [`Backoff`].
//!
//! Owns the delay arithmetic `min(cap, base · 2ⁿ)` and the jitter PRNG, for message
//! retry timers and the TCP transport's redials alike. Must not decide whether to retry
//! at all (that is [`super::RetryPolicy`]'s job) nor sleep: it only returns durations.

use super::{nanos_to_duration, RetryPolicy};
use crate::rng::SplitMix64;
use std::time::Duration;

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
        Self::with_cap(policy.backoff_cap, policy.jitter, seed)
    }

    /// Backoff capped at `cap`, with equal jitter if `jitter`, drawn from a PRNG seeded
    /// with `seed`: for backoffs that are not a message's retry timers (the TCP
    /// transport's redial uses it with its `backoff_min` as the base delay and
    /// `backoff_max` as the cap).
    pub fn with_cap(cap: Duration, jitter: bool, seed: u64) -> Self {
        Backoff {
            cap,
            jitter,
            rng: SplitMix64::new(seed),
        }
    }

    /// The un-jittered delay `min(cap, rto · 2^attempt)`: the upper bound of
    /// [`delay`](Self::delay).
    pub fn upper(&self, rto: Duration, attempt: u32) -> Duration {
        if rto.is_zero() {
            return Duration::ZERO;
        }
        if attempt == 0 {
            // Every first transmission's timer: no 128-bit arithmetic.
            return rto.min(self.cap);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
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
}
