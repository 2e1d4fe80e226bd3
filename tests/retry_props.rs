//! Property tests of `ackwire::retry`: backoff bounds, the retry timers the policy
//! arms, RTO clamps and convergence, and the retry budget's bound. Each test's name states the property it checks.

use ackwire::retry::{
    Backoff, RetryBudget, RetryBudgetConfig, RetryPolicy, RttConfig, RttEstimator,
};
use proptest::prelude::*;
use std::time::{Duration, Instant};

fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..10_000_000).prop_map(Duration::from_nanos),
        (0u64..100_000).prop_map(Duration::from_millis),
        (0u64..u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        Just(Duration::ZERO),
        Just(Duration::MAX),
    ]
}

fn any_rtt_config() -> impl Strategy<Value = RttConfig> {
    (
        1u64..50_000,  // min_rto µs
        0u64..500_000, // extra for max_rto µs
        0u64..100,     // initial position (percent between min and max)
        0u64..5_000,   // granularity µs
    )
        .prop_map(|(min, extra, pos, g)| {
            let min_rto = Duration::from_micros(min);
            let max_rto = Duration::from_micros(min + extra);
            RttConfig {
                initial_rto: Duration::from_micros(min + extra * pos / 100),
                min_rto,
                max_rto,
                granularity: Duration::from_micros(g),
            }
        })
}

proptest! {
    /// Property: every jittered delay lies within [lower, upper], lower = upper/2 with
    /// jitter (upper without), and upper = min(cap, rto·2^n) never exceeds the cap.
    #[test]
    fn backoff_delay_within_bounds_and_never_above_cap(
        rto in any_duration(),
        cap in any_duration().prop_filter("cap > 0", |c| !c.is_zero()),
        attempt in prop_oneof![0u32..70, any::<u32>()],
        jitter in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let policy = RetryPolicy { backoff_cap: cap, jitter, ..RetryPolicy::default() };
        let mut b = Backoff::new(&policy, seed);
        let upper = b.upper(rto, attempt);
        let lower = b.lower(rto, attempt);
        prop_assert!(upper <= cap);
        prop_assert!(lower <= upper);
        if jitter {
            prop_assert_eq!(lower, upper / 2);
        } else {
            prop_assert_eq!(lower, upper);
        }
        for _ in 0..16 {
            let d = b.delay(rto, attempt);
            prop_assert!(d >= lower && d <= upper, "{:?} not in [{:?}, {:?}]", d, lower, upper);
        }
        // Exact value when it is representable and below the cap.
        if attempt < 64 {
            if let Some(exact) = rto.as_nanos().checked_mul(1u128 << attempt) {
                let exact_capped = exact.min(cap.as_nanos());
                prop_assert_eq!(upper.as_nanos(), exact_capped);
            }
        }
    }

    /// Property: the upper bound is monotone non-decreasing in the attempt number, over
    /// the whole u32 range (sampled) and without overflow or panic up to u32::MAX.
    #[test]
    fn backoff_upper_monotone_and_no_overflow_up_to_u32_max(
        rto in any_duration(),
        cap in any_duration().prop_filter("cap > 0", |c| !c.is_zero()),
        mut attempts in prop::collection::vec(any::<u32>(), 1..32),
        seed in any::<u64>(),
    ) {
        let policy = RetryPolicy { backoff_cap: cap, jitter: true, ..RetryPolicy::default() };
        let mut b = Backoff::new(&policy, seed);
        attempts.extend([0, 1, 63, 64, 65, u32::MAX - 1, u32::MAX]);
        attempts.sort_unstable();
        let mut prev = Duration::ZERO;
        for &n in &attempts {
            let u = b.upper(rto, n);
            prop_assert!(u >= prev, "upper({}) = {:?} < previous {:?}", n, u, prev);
            prev = u;
            let _ = b.delay(rto, n); // must not panic
        }
        // Consecutive attempts, a dense range.
        let mut prev = Duration::ZERO;
        for n in 0..80 {
            let u = b.upper(rto, n);
            prop_assert!(u >= prev);
            prev = u;
        }
    }

    /// Property: the timer `RetryPolicy::schedule` arms after transmission n is never
    /// before `now` nor after the deadline; short of the deadline it is exactly one RTO
    /// (`upper(rto, 0)`, unjittered) after the first send and within the backoff's
    /// [lower, upper] of attempt n − 1 after a later one.
    #[test]
    fn schedule_arms_one_rto_then_backoff_bounds_never_past_the_deadline(
        rto in any_duration(),
        cap in any_duration().prop_filter("cap > 0", |c| !c.is_zero()),
        transmissions in prop_oneof![1u32..70, 1u32..=u32::MAX],
        jitter in any::<bool>(),
        seed in any::<u64>(),
        deadline_ms in prop::option::of(0u64..10_000_000),
    ) {
        let policy = RetryPolicy { backoff_cap: cap, jitter, ..RetryPolicy::default() };
        let mut b = Backoff::new(&policy, seed);
        let now = Instant::now();
        let deadline = deadline_ms.map(|ms| now + Duration::from_millis(ms));
        let at = policy.schedule(&mut b, rto, transmissions, deadline, now);
        prop_assert!(at >= now);
        if let Some(d) = deadline {
            prop_assert!(at <= d, "{:?} after the deadline {:?}", at, d);
        }
        let (lo, hi) = if transmissions == 1 {
            (b.upper(rto, 0), b.upper(rto, 0))
        } else {
            (b.lower(rto, transmissions - 1), b.upper(rto, transmissions - 1))
        };
        // Where `now + upper` is a representable instant (else the timer is "never").
        if let Some(hi_at) = now.checked_add(hi) {
            let clamp = |t: Instant| deadline.map_or(t, |d| t.min(d));
            prop_assert!(at >= clamp(now + lo) && at <= clamp(hi_at),
                "{:?} not in [{:?}, {:?}] after now", at - now, lo, hi);
        }
    }

    /// Property: the RTO is always within [min_rto, max_rto], for any valid config and
    /// any sequence of samples (including zero and Duration::MAX), at every step.
    #[test]
    fn rto_always_within_min_max(
        cfg in any_rtt_config(),
        samples in prop::collection::vec(any_duration(), 0..64),
    ) {
        prop_assert!(cfg.validate().is_ok());
        let mut e = RttEstimator::new(cfg);
        prop_assert!(e.rto() >= cfg.min_rto && e.rto() <= cfg.max_rto);
        for s in samples {
            e.on_sample(s);
            prop_assert!(e.rto() >= cfg.min_rto && e.rto() <= cfg.max_rto,
                "rto {:?} outside [{:?}, {:?}]", e.rto(), cfg.min_rto, cfg.max_rto);
        }
    }

    /// Property: after a constant-RTT stream (following any history), SRTT converges to
    /// the RTT, RTTVAR decays towards 0, and the RTO converges to
    /// clamp(rtt + max(G, 4·rttvar)) → clamp(rtt + G) within a small tolerance.
    #[test]
    fn rto_converges_after_constant_rtt_stream(
        cfg in any_rtt_config(),
        history in prop::collection::vec((0u64..2_000_000).prop_map(Duration::from_micros), 0..16),
        rtt_us in 0u64..2_000_000,
    ) {
        let rtt = Duration::from_micros(rtt_us);
        let mut e = RttEstimator::new(cfg);
        for h in history {
            e.on_sample(h);
        }
        for _ in 0..400 {
            e.on_sample(rtt);
        }
        let srtt = e.srtt().unwrap();
        // SRTT is within 1 µs of the RTT (7/8 decay of any initial error over 400 steps,
        // plus integer-nanosecond truncation).
        prop_assert!(srtt.abs_diff(rtt) <= Duration::from_micros(1), "srtt {:?} vs {:?}", srtt, rtt);
        prop_assert!(e.rttvar() <= Duration::from_micros(1), "rttvar {:?}", e.rttvar());
        let target = (rtt + cfg.granularity.max(e.rttvar() * 4)).clamp(cfg.min_rto, cfg.max_rto);
        prop_assert!(e.rto().abs_diff(target) <= Duration::from_micros(5),
            "rto {:?}, expected about {:?}", e.rto(), target);
        let floor = (rtt + cfg.granularity).clamp(cfg.min_rto, cfg.max_rto);
        prop_assert!(e.rto().abs_diff(floor) <= Duration::from_micros(5),
            "rto {:?}, expected about rtt+G {:?}", e.rto(), floor);
    }

    /// Property: the budget never lets retries exceed ratio·deposits + floor·window.
    /// Concretely, at every successful withdrawal at time t: the withdrawals in
    /// (t − ttl + ttl/SLOTS, t] are at most ratio · (deposits in (t − ttl, t]) +
    /// min_retries_per_sec · ttl. (The window slides in SLOTS steps, hence the
    /// one-slot slack.) Also: a refused withdrawal means the bound was already reached.
    #[test]
    fn budget_retries_never_exceed_ratio_times_deposits_plus_floor(
        ttl_ms in 10u64..5_000,
        min_per_sec in 0u32..20,
        ratio_milli in 0u32..3_000,
        events in prop::collection::vec((0u64..400, any::<bool>()), 1..400),
    ) {
        let ratio = f64::from(ratio_milli) / 1000.0;
        let cfg = RetryBudgetConfig {
            ttl: Duration::from_millis(ttl_ms),
            min_retries_per_sec: min_per_sec,
            retry_ratio: ratio,
        };
        prop_assert!(cfg.validate().is_ok());
        let t0 = Instant::now();
        let mut budget = RetryBudget::new(cfg, t0);
        let ttl = cfg.ttl;
        let slot = ttl / RetryBudget::SLOTS as u32;
        // Exact floor·window (fractional retries allowed here).
        let reserve = f64::from(min_per_sec) * ttl.as_secs_f64();
        let mut now = t0;
        let mut deposits: Vec<Instant> = Vec::new();
        let mut withdrawals: Vec<Instant> = Vec::new();
        for (gap_ms, is_deposit) in events {
            now += Duration::from_millis(gap_ms) / 4;
            if is_deposit {
                budget.deposit(now);
                deposits.push(now);
                continue;
            }
            if budget.try_withdraw(now) {
                withdrawals.push(now);
                let w = withdrawals
                    .iter()
                    .filter(|&&x| x + ttl > now + slot)
                    .count() as f64;
                let d = deposits.iter().filter(|&&x| x + ttl > now).count() as f64;
                prop_assert!(w <= ratio * d + reserve + 1e-9,
                    "withdrawals {} > {} * {} + {}", w, ratio, d, reserve);
            } else {
                // Refusal only when the live window is already at the bound: the
                // withdrawals that surely still count plus this one would exceed
                // what the deposits that could still count allow.
                let w_live = withdrawals.iter().filter(|&&x| x + ttl > now).count() as f64;
                let d_sure = deposits.iter().filter(|&&x| x + ttl > now + slot).count() as f64;
                prop_assert!(w_live + 1.0 > ratio * d_sure + reserve - 1e-3,
                    "refused with w_live {} and ratio*d {} + {}", w_live, ratio * d_sure, reserve);
            }
        }
    }
}

/// Property: with no deposits the budget allows exactly `min_retries_per_sec · ttl`
/// retries per window, and the full floor is available again after a window.
#[test]
fn budget_floor_allows_exactly_reserve_per_window() {
    let cfg = RetryBudgetConfig::default();
    let t0 = Instant::now();
    let mut b = RetryBudget::new(cfg, t0);
    let allowed = (0..1000).filter(|_| b.try_withdraw(t0)).count();
    assert_eq!(allowed as u64, cfg.reserve());
    assert_eq!(allowed, 100);
    let later = t0 + cfg.ttl;
    let allowed = (0..1000).filter(|_| b.try_withdraw(later)).count();
    assert_eq!(allowed, 100);
}

/// Property: 1000 fresh sends at the default ratio allow 200 retries plus the floor.
#[test]
fn budget_default_ratio_is_twenty_percent_plus_floor() {
    let cfg = RetryBudgetConfig::default();
    let t0 = Instant::now();
    let mut b = RetryBudget::new(cfg, t0);
    for _ in 0..1000 {
        b.deposit(t0);
    }
    let allowed = (0..10_000).filter(|_| b.try_withdraw(t0)).count();
    assert_eq!(allowed, 200 + 100);
}
