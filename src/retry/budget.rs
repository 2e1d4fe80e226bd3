//! The retry budget: [`RetryBudgetConfig`] and [`RetryBudget`].
//!
//! Owns the sliding-window accounting of fresh sends against retries. Must not drop
//! or delay a message itself: it only answers whether a retry may go now, and the
//! caller defers a refused retry.

use super::RetryConfigError;
use std::time::{Duration, Instant};

/// Configuration of a [`RetryBudget`] (Finagle's and tower's defaults).
///
/// | field | default | meaning |
/// |---|---|---|
/// | `ttl` | 10 s | how long a deposit (or a withdrawal) counts |
/// | `min_retries_per_sec` | 10 | retries always allowed even with no fresh traffic, so a quiet stream can still recover a lost message |
/// | `retry_ratio` | 0.2 | retries allowed per deposit (fresh send): at most 20 % extra load on a struggling target from each budget |
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Window during which deposits and withdrawals count. Default 10 s.
    #[serde(with = "crate::config_serde::duration")]
    pub ttl: Duration,
    /// Floor of retries per second allowed regardless of deposits. Default 10. `0`
    /// removes the floor: a stream whose retries have used up what its own sends
    /// deposited then retransmits only as new sends deposit more, so a quiet stream's
    /// lost message may wait until its deadline (or for ever without one).
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

/// A budget that keeps retries to a fraction of fresh traffic.
///
/// ackwire keeps one per outbound stream, not one per target: a target that several
/// streams send to gets at most the sum of their budgets (each with its own
/// `min_retries_per_sec` floor).
///
/// Every fresh send [`deposit`](Self::deposit)s (ackwire's streams also deposit for
/// every message acked, so a target that keeps up earns retries for its backlog);
/// every retry must [`try_withdraw`](Self::try_withdraw). Within the sliding window of `ttl`, successful
/// withdrawals never exceed `retry_ratio · deposits + min_retries_per_sec · ttl`. The
/// window slides in [`SLOTS`](Self::SLOTS) steps of `ttl / SLOTS`: an event counts
/// for between `ttl − ttl/SLOTS` and `ttl`.
///
/// **When the budget refuses**, the caller keeps the message in flight and re-arms
/// its retry timer (ackwire's streams ask again one RTO later); the retry is
/// *deferred*, never dropped. Only the [`RetryPolicy`](super::RetryPolicy) deadline or
/// attempt limit ends a message's retries. This is what keeps at-least-once intact
/// while a struggling target is not buried in retries.
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
    /// Where slot `current` ends: an earlier `now` needs no division (most calls).
    current_end: Option<Instant>,
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
            current_end: slot_end(now, 0, slot_nanos),
            deposits: [0; Self::SLOTS],
            withdrawals: [0; Self::SLOTS],
            deposit_units,
            reserve_units,
        }
    }

    /// Record one fresh (non-retry) send at `now`.
    pub fn deposit(&mut self, now: Instant) {
        self.deposit_n(now, 1);
    }

    /// Record `n` deposits at `now` at once (e.g. the messages one ack settled):
    /// the same as `n` calls of [`deposit`](Self::deposit).
    pub fn deposit_n(&mut self, now: Instant, n: u64) {
        if n == 0 {
            return;
        }
        let i = self.advance(now);
        self.deposits[i] = self.deposits[i].saturating_add(n);
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
        if self.current_end.is_some_and(|end| now < end) {
            // Within the current slot (or before it, which counts as the current
            // slot too): nothing to clear.
            return (self.current % Self::SLOTS as u64) as usize;
        }
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
            self.current_end = slot_end(self.epoch, idx, self.slot_nanos);
        }
        (self.current % Self::SLOTS as u64) as usize
    }
}

/// The end of slot `idx` (`epoch + (idx + 1) · slot_nanos`); `None` if not
/// representable (every call then takes the exact path).
fn slot_end(epoch: Instant, idx: u64, slot_nanos: u128) -> Option<Instant> {
    let nanos = u128::from(idx).checked_add(1)?.checked_mul(slot_nanos)?;
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    let sub = (nanos % 1_000_000_000) as u32;
    epoch.checked_add(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The slot-end shortcut picks the slot the division would: the latest slot any
    /// `now` seen so far falls in (an earlier `now` counts in the current slot), over
    /// instants that mostly advance by less than a slot, sometimes jump several slots
    /// or the whole window, and sometimes go back.
    #[test]
    fn the_slot_shortcut_agrees_with_the_division() {
        let cfg = RetryBudgetConfig {
            ttl: Duration::from_millis(1000),
            min_retries_per_sec: 0,
            retry_ratio: 1.0,
        };
        let t0 = Instant::now();
        let mut b = RetryBudget::new(cfg, t0);
        let slot = cfg.ttl.as_nanos() / RetryBudget::SLOTS as u128;
        let (mut x, mut at, mut want) = (0x9E37_79B9_7F4A_7C15_u64, 0u64, 0u64);
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            at = match x % 100 {
                0 => at + 3_000_000_000,
                1..=4 => at + (x >> 8) % 500_000_000,
                5..=9 => at.saturating_sub((x >> 8) % 200_000_000),
                _ => at + (x >> 8) % 2_000_000,
            };
            let now = t0 + Duration::from_nanos(at);
            want = want.max((u128::from(at) / slot) as u64);
            assert_eq!(b.advance(now), (want % RetryBudget::SLOTS as u64) as usize);
            assert_eq!(b.current, want);
        }
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
