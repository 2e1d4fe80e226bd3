//! RTT estimation (RFC 6298): [`RttConfig`] and [`RttEstimator`].
//!
//! Owns the smoothed RTT, its variation, the retransmission timeout derived from them
//! and the RTO kept backed off after a timeout until the next valid sample (RFC 6298
//! §5.5–5.7, for first transmissions only: a retransmission's own exponential backoff
//! is [`super::Backoff`]'s job). Must not read a clock: every sample and instant comes
//! from the caller.

use super::{nanos_to_duration, RetryConfigError};
use std::time::{Duration, Instant};

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
/// The exponential backoff of one message's retransmissions is
/// [`Backoff`](super::Backoff)'s job, so one lost message does not slow every other
/// message of the stream. But a first transmission that timed out says the RTO may be
/// too short, and Karn's rule then gives no sample to correct it (every message of a
/// burst retransmitted, every ack ambiguous): so [`on_timeout`](Self::on_timeout)
/// keeps a backed-off RTO, twice what the expired message waited, that
/// [`first_rto`](Self::first_rto) gives new messages until the next valid sample
/// (RFC 6298 §5.5 and §5.7, as TCP keeps its backed-off RTO). (Regression: over a
/// 300 ms round trip, with the 200 ms defaults, every burst was sent twice, forever.)
#[derive(Debug, Clone)]
pub struct RttEstimator {
    config: RttConfig,
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    /// The RTO backed off by timeouts since the last valid sample (zero: none).
    backed_off: Duration,
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
            backed_off: Duration::ZERO,
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
        self.backed_off = Duration::ZERO;
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

    /// A message transmitted once found no ack after `waited` and is retransmitted:
    /// until the next valid sample, [`first_rto`](Self::first_rto) is at least twice
    /// `waited` (within `[min_rto, max_rto]`). Many messages of one burst timing out
    /// together back it off once, not once each: each waited about the same.
    pub fn on_timeout(&mut self, waited: Duration) {
        let doubled = clamp(
            waited.saturating_mul(2),
            self.config.min_rto,
            self.config.max_rto,
        );
        self.backed_off = self.backed_off.max(doubled);
    }

    /// Forget the backed-off RTO of [`on_timeout`](Self::on_timeout) (the path
    /// changed: a new connection).
    pub fn clear_backoff(&mut self) {
        self.backed_off = Duration::ZERO;
    }

    /// The timeout of a message's first transmission: [`rto`](Self::rto), or the
    /// backed-off RTO of [`on_timeout`](Self::on_timeout) until the next valid sample.
    /// Always within `[min_rto, max_rto]`.
    pub fn first_rto(&self) -> Duration {
        self.rto.max(self.backed_off)
    }

    /// The configuration this estimator was built with.
    pub fn config(&self) -> &RttConfig {
        &self.config
    }
}

fn clamp(d: Duration, min: Duration, max: Duration) -> Duration {
    // `max` wins over `min` for an invalid config, so the RTO is never above `max`.
    d.max(min).min(max)
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

    /// A timeout backs off the first-transmission RTO to twice what the message
    /// waited (once per burst, not per message), up to `max_rto`, and the next valid
    /// sample ends it; `rto` itself (the retransmissions' base) is not backed off.
    #[test]
    fn a_timeout_backs_off_first_transmissions_until_a_clean_sample() {
        let ms = Duration::from_millis;
        let mut e = RttEstimator::new(RttConfig::default());
        assert_eq!(e.first_rto(), ms(200));
        for _ in 0..500 {
            e.on_timeout(ms(200)); // a whole burst timed out together
        }
        assert_eq!(e.first_rto(), ms(400));
        assert_eq!(e.rto(), ms(200));
        e.on_timeout(ms(400));
        assert_eq!(e.first_rto(), ms(800));
        e.on_timeout(ms(5_000));
        assert_eq!(e.first_rto(), ms(2_000), "clamped to max_rto");
        e.clear_backoff(); // a new connection
        assert_eq!(e.first_rto(), ms(200));
        e.on_timeout(ms(200));
        e.on_sample(ms(300)); // a message of the next burst, sent once
        assert_eq!(e.first_rto(), e.rto());
        assert_eq!(e.rto(), ms(300) + ms(600), "SRTT + 4 RTTVAR");
    }
}
