//! Replay pacing: a token bucket in bytes per second.
//!
//! Owns only arithmetic on `now: Instant` values passed in; must not read the clock or
//! sleep (the driver sleeps for the duration it is told).

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// A token bucket limiting replay to `rate` bytes/s with bursts up to `burst` bytes.
///
/// The bucket starts full. A request larger than the burst is allowed when the bucket is
/// full and leaves it in debt, so huge hints are paced instead of blocked forever.
///
/// ```
/// use ackwire::handoff::ReplayThrottle;
/// use std::num::NonZeroU64;
/// use std::time::{Duration, Instant};
///
/// let t0 = Instant::now();
/// let mut th = ReplayThrottle::new(NonZeroU64::new(1000).unwrap(), 500, t0);
/// assert!(th.try_take(500, t0).is_ok());
/// assert_eq!(th.try_take(100, t0), Err(Duration::from_millis(100)));
/// assert!(th.try_take(100, t0 + Duration::from_millis(100)).is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct ReplayThrottle {
    rate: u64,
    burst: u64,
    /// Available tokens in millionths of a byte (negative = debt).
    micro_tokens: i128,
    last: Instant,
}

const MICRO: i128 = 1_000_000;

impl ReplayThrottle {
    /// A full bucket refilling at `bytes_per_sec`, holding at most `burst` bytes (at
    /// least 1), starting at `now`.
    pub fn new(bytes_per_sec: NonZeroU64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1);
        ReplayThrottle {
            rate: bytes_per_sec.get(),
            burst,
            micro_tokens: i128::from(burst) * MICRO,
            last: now,
        }
    }

    /// Takes `bytes` tokens at `now`, or says how long to wait before retrying. Time going
    /// backwards is treated as no time passing.
    pub fn try_take(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let need = i128::from(bytes.min(self.burst)) * MICRO;
        if self.micro_tokens >= need {
            self.micro_tokens -= i128::from(bytes) * MICRO;
            return Ok(());
        }
        let missing = need - self.micro_tokens;
        // micro-bytes / (bytes/s) = microseconds; round up so the retry succeeds.
        let micros = (missing + i128::from(self.rate) - 1) / i128::from(self.rate);
        Err(Duration::from_micros(
            u64::try_from(micros).unwrap_or(u64::MAX),
        ))
    }

    /// Tokens (bytes) available at `now` (negative while in debt).
    pub fn available(&mut self, now: Instant) -> i64 {
        self.refill(now);
        i64::try_from(self.micro_tokens / MICRO).unwrap_or(i64::MIN)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let add = i128::from(self.rate) * elapsed.as_micros() as i128;
        self.micro_tokens = (self.micro_tokens + add).min(i128::from(self.burst) * MICRO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_rate_in_virtual_time() {
        let t0 = Instant::now();
        let rate = NonZeroU64::new(10_000).unwrap();
        let mut th = ReplayThrottle::new(rate, 2_000, t0);
        let mut now = t0;
        let mut sent = 0u64;
        // Send 1 KiB chunks for 10 virtual seconds, sleeping exactly as told.
        while now < t0 + Duration::from_secs(10) {
            match th.try_take(1024, now) {
                Ok(()) => sent += 1024,
                Err(wait) => {
                    assert!(wait > Duration::ZERO);
                    now += wait;
                }
            }
        }
        // 10 s * 10 kB/s + the 2 kB initial burst, within one chunk.
        assert!(sent <= 102_000 + 1024, "sent {sent}");
        assert!(sent >= 102_000 - 2048, "sent {sent}");
    }

    #[test]
    fn oversized_request_passes_on_full_bucket_then_waits_off_the_debt() {
        let t0 = Instant::now();
        let mut th = ReplayThrottle::new(NonZeroU64::new(1000).unwrap(), 100, t0);
        assert!(th.try_take(1000, t0).is_ok());
        assert_eq!(th.available(t0), -900);
        assert_eq!(th.try_take(10, t0), Err(Duration::from_millis(910)));
        // Time going backwards refills nothing and does not panic.
        assert!(th.try_take(10, t0 - Duration::from_millis(1)).is_err());
        assert!(th.try_take(10, t0 + Duration::from_millis(910)).is_ok());
    }
}
