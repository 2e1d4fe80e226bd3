//! Each delivery guarantee's property, checked by deterministic simulation over random
//! fault schedules: loss up to 50 %, duplication, reordering, delay, a temporary
//! partition, a connection reset, and application nacks. 256 cases per property.

mod support;

use ackwire::transport::mem::FaultPlan;
use ackwire::Guarantee;
use proptest::prelude::*;
use std::time::Duration;
use support::reliability::case_passed;
use support::sim::{run, Seen, SimConfig, SimReport};

/// A random fault schedule applied to a base config.
fn faults(guarantee: Guarantee) -> impl Strategy<Value = SimConfig> {
    (
        any::<u64>(),
        0.0..0.5f64,                                // loss
        0.0..0.3f64,                                // duplication
        0.0..0.5f64,                                // reordering
        (0u64..3, 0u64..20),                        // delay range, ms
        prop::option::of((0u64..1500, 1u64..3000)), // partition start, length (ms)
        prop::option::of(0u64..2000),               // connection reset (ms)
        0.0..0.2f64,                                // nack probability
        1u64..=2,                                   // senders
    )
        .prop_map(
            move |(seed, loss, dup, reorder, (dlo, dspan), part, reset, nack, senders)| {
                let mut c = SimConfig::new(guarantee, seed);
                c.plan = FaultPlan::new(seed)
                    .loss(loss)
                    .duplicate(dup)
                    .reorder(reorder)
                    .delay(
                        Duration::from_millis(dlo),
                        Duration::from_millis(dlo + dspan),
                    );
                c.partition =
                    part.map(|(s, l)| (Duration::from_millis(s), Duration::from_millis(s + l)));
                c.reset_at = reset.map(Duration::from_millis);
                c.nack_prob = nack;
                c.senders = senders;
                c
            },
        )
}

const SIM: &str = "simulation (sans-IO core, virtual clock)";
const FAULTS: &str =
    "loss 0-50%, duplication 0-30%, reordering, delay, partition, connection reset, nacks";

fn describe(r: &SimReport) -> String {
    format!(
        "ended {:?} quiescent {} unresolved {:?}",
        r.ended,
        r.quiescent,
        r.unresolved()
    )
}

/// After faults heal, every message is acked or reported failed: none hangs.
fn assert_none_hangs(r: &SimReport) -> Result<(), TestCaseError> {
    prop_assert!(r.unresolved().is_empty(), "hung: {}", describe(r));
    Ok(())
}

/// Every message whose receipt resolved Ok was processed by the handler, and the
/// handler finished it before the sender saw the ack.
fn assert_ack_after_processing(r: &SimReport) -> Result<(), TestCaseError> {
    for (key, m) in &r.msgs {
        if let Some(Ok(acked_at)) = m.outcome {
            let first_done = m.acks.iter().min();
            prop_assert!(
                first_done.is_some_and(|d| *d <= acked_at),
                "{key:?} acked at {acked_at:?} but handler finished at {first_done:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Property (AtMostOnce): the handler never sees a message twice, and nothing is
    /// ever retransmitted.
    #[test]
    fn at_most_once_never_twice_never_retransmits(cfg in faults(Guarantee::AtMostOnce)) {
        let r = run(&cfg);
        prop_assert_eq!(r.retransmitted, 0);
        for (key, m) in &r.msgs {
            prop_assert!(m.deliveries <= 1, "{:?} delivered {} times", key, m.deliveries);
            prop_assert!(m.transmissions <= 1, "{:?} transmitted {} times", key, m.transmissions);
        }
        assert_none_hangs(&r)?;
        case_passed("amo", 256, || (SIM.into(), FAULTS.into(), "AtMostOnce: never delivered twice, never retransmitted, none hangs".into()));
    }

    /// Property (AtLeastOnce): every Ok receipt's message reached the handler at least
    /// once and its ack came after the handler finished; none hangs.
    #[test]
    fn at_least_once_acked_means_processed(cfg in faults(Guarantee::AtLeastOnce)) {
        let r = run(&cfg);
        assert_none_hangs(&r)?;
        assert_ack_after_processing(&r)?;
        case_passed("alo", 256, || (SIM.into(), FAULTS.into(), "AtLeastOnce: every Ok receipt processed first, ack after the handler, none hangs".into()));
    }

    /// Property (EffectivelyOnce): as at-least-once, and the handler processed each
    /// message ID at most once (exactly once when its receipt was Ok); a duplicate is
    /// never delivered while the original is still being processed.
    #[test]
    fn effectively_once_processed_exactly_once(cfg in faults(Guarantee::EffectivelyOnce)) {
        let r = run(&cfg);
        assert_none_hangs(&r)?;
        assert_ack_after_processing(&r)?;
        for (key, m) in &r.msgs {
            prop_assert!(m.acks.len() <= 1, "{:?} processed {} times", key, m.acks.len());
            if matches!(m.outcome, Some(Ok(_))) {
                prop_assert_eq!(m.acks.len(), 1, "{:?} acked but not processed once", key);
            }
            prop_assert_eq!(m.concurrent, 0, "{:?} delivered while in progress", key);
        }
        case_passed("eo", 256, || (SIM.into(), FAULTS.into(), "EffectivelyOnce: each ID processed at most once, exactly once if Ok; no duplicate while in progress".into()));
    }

    /// Property (EffectivelyOnce with application keys): when the application sends a
    /// message twice, or re-sends it under the same idempotency key after a give-up,
    /// the handler still processes it at most once, exactly once if any send was acked.
    #[test]
    fn effectively_once_keys_survive_app_resends(
        cfg in faults(Guarantee::EffectivelyOnce),
        dup in 0.0..0.5f64,
        short_deadline in any::<bool>(),
    ) {
        let mut cfg = cfg;
        cfg.keyed = true;
        cfg.app_resend = true;
        cfg.app_duplicate = dup;
        if short_deadline {
            // Give-ups (and so app re-sends) happen often.
            cfg.proto.retry.deadline = Some(Duration::from_millis(300));
        }
        let r = run(&cfg);
        assert_none_hangs(&r)?;
        assert_ack_after_processing(&r)?;
        for (key, m) in &r.msgs {
            prop_assert!(m.acks.len() <= 1, "{:?} processed {} times ({} sends)", key, m.acks.len(), m.sends);
            if matches!(m.outcome, Some(Ok(_))) {
                prop_assert_eq!(m.acks.len(), 1, "{:?} acked but not processed once", key);
            }
            prop_assert_eq!(m.concurrent, 0, "{:?} delivered while in progress", key);
        }
        case_passed("eo-keys", 256, || (SIM.into(), format!("{FAULTS}, app duplicate sends and re-sends under one key"), "EffectivelyOnce (keys): processed at most once per key, exactly once if any send acked".into()));
    }

    /// Property (ordered contract, see `proto::inbound`): (1) the handler first sees
    /// each stream's messages in send order (gaps only where the sender gave a message
    /// up), and (2) after a nack, the nacked message is redelivered before any message
    /// the stream had not handed out yet — through every refusal path: slow handlers,
    /// nacks, a receiver refusing deliveries it has no room for, duplicates of a
    /// message still in progress (application keys sent twice), and network faults.
    #[test]
    fn ordered_contract_holds_through_every_refusal_path(
        cfg in faults(Guarantee::EffectivelyOnce),
        alo in any::<bool>(),
        capacity in prop::option::of(1u32..6),
        keyed_dups in prop::option::of(0.0..0.5f64),
        slow in any::<bool>(),
    ) {
        let mut cfg = cfg;
        cfg.ordered = true;
        cfg.app_capacity = capacity;
        if slow {
            cfg.process = (Duration::ZERO, Duration::from_millis(40));
        }
        if alo {
            cfg.guarantee = Guarantee::AtLeastOnce;
        } else if let Some(dup) = keyed_dups {
            cfg.keyed = true;
            cfg.app_duplicate = dup;
        }
        let r = run(&cfg);
        assert_none_hangs(&r)?;
        for (sender, seqs) in &r.first_delivery_seqs {
            prop_assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "sender {} first deliveries out of stream order: {:?}", sender, seqs
            );
        }
        if !cfg.keyed {
            // One send per index: index order is stream order, and an index's fate is
            // its one seq's (with application duplicates an index has several seqs,
            // one of which may be given up while another is delivered).
            for (sender, order) in &r.first_delivery_order {
                prop_assert!(
                    order.windows(2).all(|w| w[0] < w[1]),
                    "sender {} first deliveries out of order: {:?}", sender, order
                );
            }
            assert_redelivery_before_new(&r)?;
        }
        case_passed("ordered", 256, || (SIM.into(), format!("{FAULTS}, slow handlers, receiver refusals, in-progress duplicates"), "ordered channels: first deliveries in send order; a nacked message redelivered before anything new".into()));
    }
}

/// Ordered contract rule 2: after the application nacks index `i`, no index it had
/// not been handed yet is delivered before `i` is delivered again (unless the sender
/// gave `i` up, which settles it for good).
fn assert_redelivery_before_new(r: &SimReport) -> Result<(), TestCaseError> {
    for (sender, timeline) in &r.timeline {
        for (p, ev) in timeline.iter().enumerate() {
            let Seen::Nack { index } = *ev else { continue };
            let handed: std::collections::HashSet<u64> = timeline[..p]
                .iter()
                .filter_map(|e| match e {
                    Seen::Deliver { index, .. } => Some(*index),
                    _ => None,
                })
                .collect();
            let given_up = matches!(r.msgs[&(*sender, index)].outcome, Some(Err(_)));
            for later in &timeline[p + 1..] {
                match *later {
                    Seen::Deliver { index: j, .. } if j == index => break,
                    Seen::Deliver { index: j, .. } if !handed.contains(&j) => {
                        prop_assert!(
                            given_up,
                            "sender {sender}: {j} delivered before the redelivery of nacked {index}"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// With no faults at all every message of every guarantee is delivered and acked, in a
/// bounded virtual time, with no retransmission.
#[test]
fn clean_network_delivers_everything_once() {
    for g in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ] {
        let mut cfg = SimConfig::new(g, 1);
        cfg.messages = 500;
        let r = run(&cfg);
        assert!(r.unresolved().is_empty(), "{g:?}: {}", describe(&r));
        assert_eq!(r.retransmitted, 0, "{g:?}");
        for (key, m) in &r.msgs {
            assert_eq!(m.deliveries, 1, "{g:?} {key:?}");
            assert_eq!(m.outcome.map(|o| o.is_ok()), Some(true), "{g:?} {key:?}");
        }
    }
}

/// Under heavy loss at-least-once still delivers every message (the deadline is long
/// enough), which proves retransmission actually happens.
#[test]
fn heavy_loss_is_recovered_by_retransmission() {
    let mut cfg = SimConfig::new(Guarantee::AtLeastOnce, 7);
    cfg.plan = FaultPlan::new(7).loss(0.5);
    cfg.faults_until = Duration::from_secs(5);
    let r = run(&cfg);
    assert!(r.retransmitted > 0);
    for (key, m) in &r.msgs {
        assert_eq!(
            m.outcome.map(|o| o.is_ok()),
            Some(true),
            "{key:?}: {}",
            describe(&r)
        );
        assert!(m.deliveries >= 1);
    }
}
