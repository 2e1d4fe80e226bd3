//! Integration tests of `ackwire::detector` with scripted heartbeat arrival times.
//!
//! Virtual time: every instant is `t0 + Duration`, nothing sleeps. With the default
//! config and heartbeats every second, the window's mean is 1 s and σ is floored at
//! 100 ms, so the effective mean is 2 s (1 s + 1 s acceptable pause); phi reaches 4
//! (Suspect) at about 2.36 s and 8 (Down) at about 2.52 s of silence.

use ackwire::detector::{DetectorConfig, FailureDetector, Health, HealthChange};
use ackwire::NodeId;
use proptest::prelude::*;
use std::time::{Duration, Instant};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn detector() -> FailureDetector {
    FailureDetector::new(DetectorConfig::default()).expect("default config is valid")
}

/// Heartbeats from `peer` every `every` for `count` beats starting at `start`,
/// polling after each one; returns the time of the last beat and every change seen.
fn regular(
    fd: &mut FailureDetector,
    peer: NodeId,
    start: Instant,
    every: Duration,
    count: u32,
) -> (Instant, Vec<HealthChange>) {
    let mut changes = Vec::new();
    let mut t = start;
    for i in 0..count {
        t = start + every * i;
        fd.heartbeat(peer, t);
        changes.extend(fd.poll(t));
    }
    (t, changes)
}

/// Poll every `step` from `from` until `until`; returns the changes with their times.
fn poll_until(
    fd: &mut FailureDetector,
    from: Instant,
    until: Instant,
    step: Duration,
) -> Vec<HealthChange> {
    let mut out = Vec::new();
    let mut t = from;
    while t <= until {
        out.extend(fd.poll(t));
        t += step;
    }
    out
}

/// A tiny deterministic PRNG for scripted jitter (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn regular_heartbeats_stay_up() {
    let mut fd = detector();
    let t0 = Instant::now();
    let mut changes = Vec::new();
    // 200 beats, 1 s apart, polls every 100 ms in between.
    for i in 0..200u32 {
        let beat = t0 + Duration::from_secs(1) * i;
        fd.heartbeat(A, beat);
        for k in 0..10u32 {
            changes.extend(fd.poll(beat + ms(100) * k));
        }
        assert!(fd.phi(A, beat + ms(999)).unwrap() < 1.0);
    }
    assert!(changes.is_empty(), "unexpected changes {changes:?}");
    assert_eq!(fd.state(A), Some(Health::Up));
    assert_eq!(fd.down_since(A), None);
}

#[test]
fn silence_goes_suspect_then_down_in_expected_range() {
    let mut fd = detector();
    let t0 = Instant::now();
    let (last, changes) = regular(&mut fd, A, t0, Duration::from_secs(1), 100);
    assert!(changes.is_empty());

    let changes = poll_until(&mut fd, last, last + Duration::from_secs(10), ms(10));
    assert_eq!(changes.len(), 2, "{changes:?}");
    let suspect = &changes[0];
    let down = &changes[1];
    assert_eq!(
        (suspect.peer, suspect.from, suspect.to),
        (A, Health::Up, Health::Suspect)
    );
    assert_eq!(
        (down.peer, down.from, down.to),
        (A, Health::Suspect, Health::Down)
    );
    let s = suspect.at - last;
    let d = down.at - last;
    assert!(s >= ms(2300) && s <= ms(2420), "suspect after {s:?}");
    assert!(d >= ms(2460) && d <= ms(2580), "down after {d:?}");
    assert_eq!(fd.state(A), Some(Health::Down));
    assert_eq!(fd.down_since(A), Some(down.at));
}

#[test]
fn phi_grows_monotonically_after_last_heartbeat() {
    let mut fd = detector();
    let t0 = Instant::now();
    let (last, _) = regular(&mut fd, A, t0, Duration::from_secs(1), 50);
    let mut prev = fd.phi(A, last).unwrap();
    assert!((0.0..0.1).contains(&prev));
    let mut strictly_grew = 0;
    for k in 1..=2_000u32 {
        let phi = fd.phi(A, last + ms(5) * k).unwrap();
        assert!(phi.is_finite(), "phi not finite at step {k}");
        assert!(phi >= prev, "phi decreased at step {k}: {phi} < {prev}");
        if phi > prev {
            strictly_grew += 1;
        }
        prev = phi;
    }
    assert!(
        strictly_grew > 1_000,
        "phi should keep growing, grew {strictly_grew} times"
    );
    // Enormous silences stay finite.
    for secs in [60, 3_600, 86_400 * 365 * 100] {
        let phi = fd.phi(A, last + Duration::from_secs(secs)).unwrap();
        assert!(phi.is_finite() && phi > 8.0);
    }
    // phi of the past (before the last heartbeat) is not negative.
    assert!(fd.phi(A, t0).unwrap() >= 0.0);
}

#[test]
fn resumption_returns_up_and_reports_transitions() {
    let mut fd = detector();
    let t0 = Instant::now();
    let (last, _) = regular(&mut fd, A, t0, Duration::from_secs(1), 30);
    let mean_before = fd.estimator(A).unwrap().mean();
    let samples_before = fd.estimator(A).unwrap().samples();

    let down = poll_until(&mut fd, last, last + Duration::from_secs(30), ms(100));
    assert_eq!(down.last().map(|c| c.to), Some(Health::Down));
    let down_at = fd.down_since(A).expect("down");
    assert!(down_at - last < Duration::from_secs(3));

    let back = last + Duration::from_secs(40);
    fd.heartbeat(A, back);
    assert_eq!(
        fd.state(A),
        Some(Health::Up),
        "a heartbeat brings it Up at once"
    );
    assert_eq!(fd.down_since(A), None);
    let changes = fd.poll(back);
    assert_eq!(
        changes,
        vec![HealthChange {
            peer: A,
            from: Health::Down,
            to: Health::Up,
            at: back
        }]
    );
    // The 40 s gap was not recorded as an interval (it would skew the window).
    assert_eq!(fd.estimator(A).unwrap().samples(), samples_before);
    assert_eq!(fd.estimator(A).unwrap().mean(), mean_before);

    // Regular heartbeats afterwards keep it Up, and nothing more is reported.
    let (_, changes) = regular(
        &mut fd,
        A,
        back + Duration::from_secs(1),
        Duration::from_secs(1),
        20,
    );
    assert!(changes.is_empty(), "{changes:?}");
    assert!(fd.poll(back + Duration::from_secs(21)).is_empty());
}

#[test]
fn suspect_recovers_without_going_down() {
    let mut fd = detector();
    let t0 = Instant::now();
    let (last, _) = regular(&mut fd, A, t0, Duration::from_secs(1), 30);
    let changes = fd.poll(last + ms(2400));
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].to, Health::Suspect);
    assert_eq!(fd.down_since(A), None);
    fd.heartbeat(A, last + ms(2450));
    let changes = fd.poll(last + ms(2450));
    assert_eq!(
        (changes[0].from, changes[0].to),
        (Health::Suspect, Health::Up)
    );
}

#[test]
fn late_poll_reports_up_to_down_once() {
    let mut fd = detector();
    let t0 = Instant::now();
    let (last, _) = regular(&mut fd, A, t0, Duration::from_secs(1), 30);
    let changes = fd.poll(last + Duration::from_secs(60));
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].from, changes[0].to), (Health::Up, Health::Down));
    assert!(fd.poll(last + Duration::from_secs(120)).is_empty());
}

#[test]
fn jittery_heartbeats_do_not_flap_at_default_threshold() {
    let mut fd = detector();
    let t0 = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut t = t0;
    let mut changes = Vec::new();
    let mut max_phi: f64 = 0.0;
    // ±30 % jitter around 1 s, 2000 beats, polls every 50 ms.
    for _ in 0..2_000 {
        let gap = ms(700) + Duration::from_secs_f64(0.6 * rng.next_f64());
        let next = t + gap;
        let mut p = t;
        while p < next {
            changes.extend(fd.poll(p));
            max_phi = max_phi.max(fd.phi(A, p).unwrap_or(0.0));
            p += ms(50);
        }
        t = next;
        fd.heartbeat(A, t);
    }
    assert!(changes.is_empty(), "flapped: {changes:?}");
    assert!(max_phi < 4.0, "max phi {max_phi}");
}

#[test]
fn jittery_heartbeats_with_occasional_loss_never_go_down() {
    let mut fd = detector();
    let t0 = Instant::now();
    let mut rng = Rng(42);
    let mut t = t0;
    let mut downs = 0;
    // ±30 % jitter, 2 % of heartbeats lost (a 2-interval gap).
    for _ in 0..2_000 {
        let mut gap = ms(700) + Duration::from_secs_f64(0.6 * rng.next_f64());
        if rng.next_f64() < 0.02 {
            gap += ms(700) + Duration::from_secs_f64(0.6 * rng.next_f64());
        }
        let next = t + gap;
        let mut p = t;
        while p < next {
            downs += fd.poll(p).iter().filter(|c| c.to == Health::Down).count();
            p += ms(50);
        }
        t = next;
        fd.heartbeat(A, t);
    }
    assert_eq!(downs, 0);
}

#[test]
fn other_frames_keep_a_peer_up_without_entering_the_window() {
    let mut fd = detector();
    let t0 = Instant::now();
    fd.heartbeat(A, t0);
    let samples = fd.estimator(A).unwrap().samples();
    let mut changes = Vec::new();
    // No heartbeats for a minute, but data frames every 300 ms.
    for k in 1..=200u32 {
        let t = t0 + ms(300) * k;
        fd.observe(A, t);
        changes.extend(fd.poll(t + ms(150)));
    }
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(fd.estimator(A).unwrap().samples(), samples);
    // An ack brings a Down peer back Up too.
    let silent = t0 + ms(300 * 200) + Duration::from_secs(30);
    assert_eq!(fd.poll(silent).last().map(|c| c.to), Some(Health::Down));
    fd.observe(A, silent + ms(1));
    assert_eq!(fd.state(A), Some(Health::Up));
    assert_eq!(fd.poll(silent + ms(1))[0].to, Health::Up);
}

#[test]
fn peers_are_independent_and_removable() {
    let mut fd = detector();
    let t0 = Instant::now();
    // New peers are watched as Up without a reported change.
    fd.heartbeat(A, t0);
    fd.heartbeat(B, t0);
    assert!(fd.poll(t0).is_empty());
    for i in 1..=20u32 {
        fd.heartbeat(A, t0 + Duration::from_secs(1) * i);
        if i <= 5 {
            fd.heartbeat(B, t0 + Duration::from_secs(1) * i);
        }
    }
    let now = t0 + Duration::from_secs(20);
    let changes = fd.poll(now);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!((changes[0].peer, changes[0].to), (B, Health::Down));
    assert_eq!(fd.state(A), Some(Health::Up));
    assert_eq!(
        fd.peers().collect::<Vec<_>>(),
        vec![(A, Health::Up), (B, Health::Down)]
    );

    assert_eq!(fd.remove(B), Some(Health::Down));
    assert_eq!(fd.remove(B), None);
    assert_eq!(fd.state(B), None);
    assert_eq!(fd.phi(B, now), None);
    assert_eq!(fd.down_since(B), None);
    assert!(fd
        .poll(now + Duration::from_secs(60))
        .iter()
        .all(|c| c.peer == A));
}

#[test]
fn poll_timeout_predicts_the_next_transition() {
    let mut fd = detector();
    assert_eq!(fd.poll_timeout(), None);
    let t0 = Instant::now();
    let (last, _) = regular(&mut fd, A, t0, Duration::from_secs(1), 40);
    // B is younger: its first suspicion comes later.
    let (_, _) = regular(&mut fd, B, t0 + ms(500), Duration::from_secs(1), 40);

    let mut seen = Vec::new();
    let mut guard = 0;
    while let Some(at) = fd.poll_timeout() {
        guard += 1;
        assert!(guard < 10, "poll_timeout must make progress");
        assert!(
            fd.poll(at - ms(2)).is_empty(),
            "nothing before the predicted time"
        );
        let changes = fd.poll(at);
        assert!(!changes.is_empty(), "a change at the predicted time");
        seen.extend(changes.into_iter().map(|c| (c.peer, c.to, c.at - last)));
    }
    let order: Vec<_> = seen.iter().map(|&(p, h, _)| (p, h)).collect();
    assert_eq!(
        order,
        vec![
            (A, Health::Suspect),
            (A, Health::Down),
            (B, Health::Suspect),
            (B, Health::Down)
        ]
    );
    let a_down = seen[1].2;
    assert!(a_down >= ms(2460) && a_down <= ms(2580), "{a_down:?}");
}

proptest! {
    /// Property: for any config that validates and any script of heartbeat / frame
    /// arrivals (including simultaneous and huge gaps), phi is finite and >= 0, is
    /// non-decreasing in `now` after the last arrival, health only worsens in polls
    /// (Up < Suspect < Down) and every arrival leaves the peer Up.
    #[test]
    fn phi_finite_monotone_and_health_rule_holds_for_any_script(
        threshold in 0.5f64..20.0,
        suspect_frac in 0.1f64..=1.0,
        max_samples in 1usize..50,
        min_std_ms in 1u64..500,
        pause_ms in 0u64..5_000,
        est_ms in 1u64..5_000,
        script in prop::collection::vec((0u64..20_000, any::<bool>(), any::<bool>()), 1..80),
        probes in prop::collection::vec(0u64..100_000_000, 1..20),
    ) {
        let cfg = DetectorConfig {
            threshold,
            suspect_threshold: threshold * suspect_frac,
            max_samples,
            min_std_dev: ms(min_std_ms),
            acceptable_heartbeat_pause: ms(pause_ms),
            first_heartbeat_estimate: ms(est_ms),
        };
        prop_assert!(cfg.validate().is_ok());
        let mut fd = FailureDetector::new(cfg).unwrap();
        let t0 = Instant::now();
        let mut t = t0;
        for (gap, is_heartbeat, poll) in script {
            t += ms(gap);
            if is_heartbeat {
                fd.heartbeat(A, t);
            } else {
                fd.observe(A, t);
            }
            prop_assert_eq!(fd.state(A), Some(Health::Up));
            if poll {
                let probe = t + ms(gap / 2);
                for c in fd.poll(probe) {
                    // Recoveries were recorded by arrivals; everything else worsens.
                    prop_assert!(c.to > c.from || (c.to == Health::Up && c.at <= t),
                        "poll may only worsen health: {:?}", c);
                }
            }
        }
        let mut probes = probes;
        probes.sort_unstable();
        let mut prev = 0.0f64;
        for p in probes {
            let phi = fd.phi(A, t + ms(p)).unwrap();
            prop_assert!(phi.is_finite() && phi >= 0.0, "phi {}", phi);
            prop_assert!(phi >= prev, "phi decreased: {} < {}", phi, prev);
            prev = phi;
            let state_before = fd.state(A).unwrap();
            for c in fd.poll(t + ms(p)) {
                prop_assert!(c.to > c.from || (c.to == Health::Up && c.at <= t), "{:?}", c);
            }
            let state = fd.state(A).unwrap();
            prop_assert!(state >= state_before);
            let expected = if phi >= cfg.threshold {
                Health::Down
            } else if phi >= cfg.suspect_threshold {
                Health::Suspect
            } else {
                Health::Up
            };
            prop_assert!(state >= expected, "state {:?} but phi {} says {:?}", state, phi, expected);
        }
    }
}
