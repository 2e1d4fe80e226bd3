//! The whole node under random fault schedules, on the `testing` feature's simulated
//! network and virtual clock: the failure detector, hinted handoff, replay when the
//! target returns, and shutdown drain, driven end to end (issue 10, item 2).
#![cfg(feature = "testing")]

use ackwire::testing::{runtime, NodeSetup, SimNet};
use ackwire::transport::mem::FaultPlan;
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, Node, NodeConfig, NodeId, Outcome,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(1);
const SHOP: NodeId = NodeId(1);
const BANK: NodeId = NodeId(2);

/// How often the handler ran for each message, across the bank's incarnations.
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn bank(seen: Seen) -> NodeSetup {
    slow_bank(seen, false, Vec::new())
}

/// The bank with an `ordered` or unordered receiver whose handler sleeps `ms` before
/// processing each message listed in `stalls` as `(message, ms)`.
fn slow_bank(seen: Seen, ordered: bool, stalls: Vec<(u64, u64)>) -> NodeSetup {
    NodeSetup::new(BANK).on_start(move |node: &Node| {
        let mut inbox = node.receiver::<u64>(CH, ordered).unwrap();
        let (seen, stalls) = (seen.clone(), stalls.clone());
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let m = *d.message();
                for &(_, ms) in stalls.iter().filter(|(at, _)| *at == m) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                *seen.lock().unwrap().entry(m).or_default() += 1;
                d.ack();
            }
        });
    })
}

/// Every message `0..messages` reached the handler: exactly once under
/// effectively-once, at least once under at-least-once.
fn processed(
    seen: &HashMap<u64, u32>,
    messages: u64,
    guarantee: Guarantee,
) -> Result<(), TestCaseError> {
    for i in 0..messages {
        let n = seen.get(&i).copied().unwrap_or(0);
        prop_assert!(n >= 1, "message {} lost", i);
        if guarantee == Guarantee::EffectivelyOnce {
            prop_assert_eq!(n, 1, "message {} processed {} times", i, n);
        }
    }
    Ok(())
}

/// Every receipt ended `Acked` (none at its deadline).
fn all_acked(outcomes: &[Result<Outcome, ackwire::SendError>]) -> Result<(), TestCaseError> {
    for (i, o) in outcomes.iter().enumerate() {
        prop_assert_eq!(o, &Ok(Outcome::Acked), "message {}", i);
    }
    Ok(())
}

/// The schedules' faults: `loss` and `duplicate` rates, 0.1–2 ms delay, seeded.
fn faults(seed: u64, loss: f64, duplicate: f64) -> FaultPlan {
    FaultPlan::new(seed)
        .loss(loss)
        .duplicate(duplicate)
        .delay(Duration::from_micros(100), Duration::from_millis(2))
}

/// Waits (up to 5 virtual minutes) until the shop's hint store has replayed every
/// hint, then 5 s more so late duplicates (retransmissions, replays) arrive before
/// anything is counted. Returns the hints still pending (0 unless the wait ran out).
async fn settle(sim: &SimNet) -> u64 {
    let shop = sim.node(SHOP).unwrap();
    let mut pending = u64::MAX;
    for _ in 0..600 {
        pending = shop.stats().await.unwrap().hints.unwrap().pending;
        if pending == 0 {
            break;
        }
        sim.advance(Duration::from_millis(500)).await;
    }
    sim.advance(Duration::from_secs(5)).await;
    pending
}

/// One random outage of the bank.
#[derive(Clone, Debug)]
struct Outage {
    seed: u64,
    loss: f64,
    duplicate: f64,
    /// Crash the bank (and start it again) instead of cutting it off the network.
    crash: bool,
    /// The bank keeps its dedup state in a durable log, so it survives the crash.
    durable: bool,
    /// Messages sent while it is away.
    messages: u64,
    /// How long it stays away: long enough for the shop's detector to declare it
    /// Down, up to past the messages' 30 s deadline (then they are hinted on give-up).
    away: Duration,
}

fn outage() -> impl Strategy<Value = Outage> {
    (
        any::<u64>(),
        0.0..0.3f64,
        0.0..0.2f64,
        any::<bool>(),
        any::<bool>(),
        1..25u64,
        10..40u64,
    )
        .prop_map(
            |(seed, loss, duplicate, crash, durable, messages, away)| Outage {
                seed,
                loss,
                duplicate,
                crash,
                durable,
                messages,
                away: Duration::from_secs(away),
            },
        )
}

/// Runs one outage: the shop (hinted handoff on) sends effectively-once messages while
/// the bank is away, the bank returns, hints replay. Returns the receipts' outcomes,
/// the handler counts and the shop's pending hints at the end.
fn handoff_run(
    o: &Outage,
) -> (
    Vec<Result<Outcome, ackwire::SendError>>,
    HashMap<u64, u32>,
    u64,
) {
    let hints = tempfile::tempdir().unwrap();
    runtime().unwrap().block_on(async {
        let mut sim = SimNet::new(faults(o.seed, o.loss, o.duplicate)).unwrap();
        let mut shop_cfg = NodeConfig::default();
        shop_cfg.handoff = Some(HandoffConfig::new(hints.path()));
        sim.add(NodeSetup::new(SHOP).config(shop_cfg))
            .await
            .unwrap();
        let mut bank_cfg = NodeConfig::default();
        if o.durable {
            bank_cfg.dedup.durable = Some(ackwire::dedup::DurableDedup::new(
                hints.path().join("dedup"),
            ));
        }
        let seen = Seen::default();
        sim.add(bank(seen.clone()).config(bank_cfg)).await.unwrap();
        let out = sim
            .node(SHOP)
            .unwrap()
            .sender::<u64>(BANK, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
            .unwrap();
        // One message while all is well, so the stream exists on both sides.
        out.send(&0).await.unwrap().await.unwrap();
        if o.crash {
            sim.crash(BANK).await.unwrap();
        } else {
            sim.isolate(BANK);
        }
        let mut receipts = Vec::new();
        for i in 1..=o.messages {
            receipts.push(out.send(&i).await.unwrap());
            sim.advance(Duration::from_millis(50)).await;
        }
        sim.advance(o.away).await;
        if o.crash {
            sim.start(BANK).await.unwrap();
        } else {
            sim.rejoin(BANK);
        }
        let mut outcomes = Vec::new();
        for r in receipts {
            outcomes.push(r.await);
        }
        let pending = settle(&sim).await;
        let seen = seen.lock().unwrap().clone();
        sim.shutdown().await;
        (outcomes, seen, pending)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every message sent while the target was away — handed off to the hint store on
    /// Down or on give-up, or acked — is processed by the target's handler exactly once
    /// after it returns, whether it was cut off or crashed; no receipt fails (the hint
    /// store took everything), and the store ends empty.
    ///
    /// Message 0, sent before the outage, is processed exactly once too, except when
    /// the bank crashed without durable dedup: its ack may have been lost (and the
    /// message handed off on a false Down, or retried) after the handler ran, and the
    /// crash erased the record of it, so the new incarnation runs it again. That is the
    /// documented degradation to at-least-once; it must still be processed.
    #[test]
    fn handed_off_messages_are_processed_exactly_once_after_the_target_returns(o in outage()) {
        let (outcomes, seen, pending) = handoff_run(&o);
        for (i, r) in outcomes.iter().enumerate() {
            prop_assert!(
                matches!(r, Ok(Outcome::Acked | Outcome::HandedOff)),
                "message {}: {r:?}", i + 1
            );
        }
        prop_assert_eq!(pending, 0, "hints left in the store");
        for i in 0..=o.messages {
            let n = seen.get(&i).copied().unwrap_or(0);
            if i == 0 && o.crash && !o.durable {
                prop_assert!(n >= 1, "message 0 lost");
            } else {
                prop_assert_eq!(n, 1, "message {} processed {} times", i, n);
            }
        }
        prop_assert_eq!(seen.len() as u64, o.messages + 1);
    }
}

/// The case CI found: on a 30 % lossy link the bank ran message 0 but every ack of it
/// was lost, the shop's detector declared the bank Down and handed message 0 off, and
/// then the bank crashed. With durable dedup the new incarnation knows message 0 and
/// only acks the replayed hint; without, it runs it again (at-least-once).
#[test]
fn a_message_whose_acks_were_lost_before_a_crash_is_replayed_into_durable_dedup() {
    let mut o = Outage {
        seed: 5176015580913847729,
        loss: 0.2969631699589776,
        duplicate: 0.0,
        crash: true,
        durable: true,
        messages: 1,
        away: Duration::from_secs(10),
    };
    let (outcomes, seen, pending) = handoff_run(&o);
    assert!(
        matches!(outcomes[..], [Ok(Outcome::HandedOff)]),
        "{outcomes:?}"
    );
    assert_eq!(pending, 0);
    assert_eq!(seen, HashMap::from([(0, 1), (1, 1)]));
    o.durable = false;
    let (_, seen, _) = handoff_run(&o);
    assert_eq!(
        seen,
        HashMap::from([(0, 2), (1, 1)]),
        "the schedule changed"
    );
}

/// One random clean restart in the middle of a stream.
#[derive(Clone, Debug)]
struct Restart {
    seed: u64,
    loss: f64,
    duplicate: f64,
    guarantee: Guarantee,
    /// Restart the sender (its unacked messages are spooled to its hint store on
    /// shutdown and replayed by the next run) instead of the receiver (durable dedup).
    sender: bool,
    messages: u64,
    /// The restart happens before message `at` is sent.
    at: u64,
}

fn restart() -> impl Strategy<Value = Restart> {
    (
        any::<u64>(),
        0.0..0.3f64,
        0.0..0.2f64,
        prop_oneof![
            Just(Guarantee::AtLeastOnce),
            Just(Guarantee::EffectivelyOnce)
        ],
        any::<bool>(),
        2..60u64,
    )
        .prop_flat_map(|(seed, loss, duplicate, guarantee, sender, messages)| {
            (0..messages).prop_map(move |at| Restart {
                seed,
                loss,
                duplicate,
                guarantee,
                sender,
                messages,
                at,
            })
        })
}

/// Runs one restart: the receipts' outcomes and the handler counts at the end.
fn restart_run(r: &Restart) -> (Vec<Result<Outcome, ackwire::SendError>>, HashMap<u64, u32>) {
    let dir = tempfile::tempdir().unwrap();
    runtime().unwrap().block_on(async {
        let mut sim = SimNet::new(faults(r.seed, r.loss, r.duplicate)).unwrap();
        let mut shop_cfg = NodeConfig::default();
        shop_cfg.handoff = Some(HandoffConfig::new(dir.path().join("hints")));
        sim.add(NodeSetup::new(SHOP).config(shop_cfg))
            .await
            .unwrap();
        let mut bank_cfg = NodeConfig::default();
        bank_cfg.dedup.durable = Some(ackwire::dedup::DurableDedup::new(dir.path().join("dedup")));
        let seen = Seen::default();
        sim.add(bank(seen.clone()).config(bank_cfg)).await.unwrap();
        let opts = ChannelOptions::new(CH, r.guarantee);
        let mut out = sim.node(SHOP).unwrap().sender::<u64>(BANK, opts).unwrap();
        let mut receipts = Vec::new();
        for i in 0..r.messages {
            if i == r.at {
                let who = if r.sender { SHOP } else { BANK };
                sim.restart(who).await.unwrap();
                out = sim.node(SHOP).unwrap().sender::<u64>(BANK, opts).unwrap();
            }
            receipts.push(out.send(&i).await.unwrap());
            sim.advance(Duration::from_millis(1)).await;
        }
        let mut outcomes = Vec::new();
        for rc in receipts {
            outcomes.push(rc.await);
        }
        // Hints spooled by a sender restart replay; late duplicates arrive.
        settle(&sim).await;
        let seen = seen.lock().unwrap().clone();
        sim.shutdown().await;
        (outcomes, seen)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A clean shutdown and restart of either end in the middle of a stream, under
    /// loss and duplication, loses nothing: every receipt ends `Acked` or `HandedOff`
    /// (the sender's shutdown spools what is unacked to its hint store; the next run
    /// replays it), every message reaches the handler — exactly once on an
    /// effectively-once channel (durable dedup across the receiver's restart), at
    /// least once on an at-least-once one.
    #[test]
    fn a_clean_restart_of_either_end_loses_nothing(r in restart()) {
        let (outcomes, seen) = restart_run(&r);
        for (i, o) in outcomes.iter().enumerate() {
            prop_assert!(matches!(o, Ok(Outcome::Acked | Outcome::HandedOff)), "message {}: {:?}", i, o);
        }
        processed(&seen, r.messages, r.guarantee)?;
    }
}

/// One random lossy run against a sometimes-slow handler, no outage.
#[derive(Clone, Debug)]
struct Lossy {
    seed: u64,
    loss: f64,
    duplicate: f64,
    guarantee: Guarantee,
    ordered: bool,
    messages: u64,
    /// Messages whose handler stalls, and for how long (ms): at most three stalls of
    /// at most 3 s, so the handler's total stall stays far within the 30 s deadline.
    stalls: Vec<(u64, u64)>,
}

fn lossy() -> impl Strategy<Value = Lossy> {
    (
        any::<u64>(),
        0.0..0.2f64,
        0.0..0.2f64,
        prop_oneof![
            Just(Guarantee::AtLeastOnce),
            Just(Guarantee::EffectivelyOnce)
        ],
        any::<bool>(),
        1..150u64,
    )
        .prop_flat_map(|(seed, loss, duplicate, guarantee, ordered, messages)| {
            prop::collection::vec((0..messages, 200..3000u64), 0..=3).prop_map(move |stalls| {
                Lossy {
                    seed,
                    loss,
                    duplicate,
                    guarantee,
                    ordered,
                    messages,
                    stalls: stalls.clone(),
                }
            })
        })
}

/// Runs one lossy stream with default settings (only the fault plan is chosen): the
/// receipts' outcomes and the handler counts once every receipt resolved.
fn lossy_run(l: &Lossy) -> (Vec<Result<Outcome, ackwire::SendError>>, HashMap<u64, u32>) {
    runtime().unwrap().block_on(async {
        let mut sim = SimNet::new(faults(l.seed, l.loss, l.duplicate)).unwrap();
        sim.add(NodeSetup::new(SHOP)).await.unwrap();
        let seen = Seen::default();
        sim.add(slow_bank(seen.clone(), l.ordered, l.stalls.clone()))
            .await
            .unwrap();
        let opts = ChannelOptions::new(CH, l.guarantee);
        let out = sim.node(SHOP).unwrap().sender::<u64>(BANK, opts).unwrap();
        let mut receipts = Vec::new();
        for i in 0..l.messages {
            receipts.push(out.send(&i).await.unwrap());
        }
        let mut outcomes = Vec::new();
        for r in receipts {
            outcomes.push(r.await);
        }
        let seen = seen.lock().unwrap().clone();
        sim.shutdown().await;
        (outcomes, seen)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Liveness under loss, duplication and reordering, with default settings and a
    /// handler that sometimes stalls for seconds: every receipt resolves `Acked` (none
    /// runs into its 30 s deadline), and every message is processed — exactly once on
    /// an effectively-once channel. Found a message held by the receiver whose
    /// finishing ack was lost: nothing asked again until its deadline.
    #[test]
    fn every_message_on_a_lossy_link_to_a_slow_handler_is_acked(l in lossy()) {
        let (outcomes, seen) = lossy_run(&l);
        all_acked(&outcomes)?;
        processed(&seen, l.messages, l.guarantee)?;
    }
}

/// One receiver crash while its handler holds some messages, under loss and
/// duplication.
#[derive(Clone, Debug)]
struct HeldCrash {
    seed: u64,
    loss: f64,
    duplicate: f64,
    guarantee: Guarantee,
    ordered: bool,
    messages: u64,
    /// The first run's handler holds every message `m` with `m % every == 0` (never
    /// finishes it) and finishes the others at once.
    every: u64,
    /// The second run's handler takes this long for each message the first run held
    /// (at most 8 s over all of them, so an ordered stream, which hands them out one
    /// gap at a time, stays well within the 30 s deadline).
    slow: Duration,
}

fn held_crash() -> impl Strategy<Value = HeldCrash> {
    (
        (any::<u64>(), 0.0..0.2f64, 0.0..0.2f64),
        prop_oneof![
            Just(Guarantee::AtLeastOnce),
            Just(Guarantee::EffectivelyOnce)
        ],
        any::<bool>(),
        4..60u64,
        2..8u64,
        0..=1000u64,
    )
        .prop_map(
            |((seed, loss, duplicate), guarantee, ordered, messages, every, slow)| {
                let held = messages.div_ceil(every);
                HeldCrash {
                    seed,
                    loss,
                    duplicate,
                    guarantee,
                    ordered,
                    messages,
                    every,
                    slow: Duration::from_millis(slow.min(8_000 / held)),
                }
            },
        )
}

/// The bank for [`held_crash`]: each delivery handled on its own task; the first run
/// never finishes the held ones, later runs take `slow` for them.
fn holding_bank(seen: Seen, c: &HeldCrash) -> NodeSetup {
    let (ordered, every, slow) = (c.ordered, c.every, c.slow);
    let mut runs = 0u32;
    NodeSetup::new(BANK).on_start(move |node: &Node| {
        let run = runs;
        runs += 1;
        let mut inbox = node.receiver::<u64>(CH, ordered).unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let m = *d.message();
                    if m % every == 0 {
                        if run == 0 {
                            std::future::pending::<()>().await;
                        }
                        tokio::time::sleep(slow).await;
                    }
                    *seen.lock().unwrap().entry(m).or_default() += 1;
                    d.ack();
                });
            }
        });
    })
}

/// Runs one [`HeldCrash`]: the receipts' outcomes and the handler counts.
fn held_crash_run(c: &HeldCrash) -> (Vec<Result<Outcome, ackwire::SendError>>, HashMap<u64, u32>) {
    runtime().unwrap().block_on(async {
        let mut sim = SimNet::new(faults(c.seed, c.loss, c.duplicate)).unwrap();
        sim.add(NodeSetup::new(SHOP)).await.unwrap();
        let seen = Seen::default();
        sim.add(holding_bank(seen.clone(), c)).await.unwrap();
        let opts = ChannelOptions::new(CH, c.guarantee);
        let out = sim.node(SHOP).unwrap().sender::<u64>(BANK, opts).unwrap();
        let mut receipts = Vec::new();
        for i in 0..c.messages {
            receipts.push(out.send(&i).await.unwrap());
            sim.advance(Duration::from_millis(1)).await;
        }
        // Most of what is not held is settled by the first run: the redeliveries to
        // the second run then have gaps between them.
        sim.advance(Duration::from_secs(3)).await;
        sim.crash(BANK).await.unwrap();
        sim.advance(Duration::from_millis(100)).await;
        sim.start(BANK).await.unwrap();
        let mut outcomes = Vec::new();
        for r in receipts {
            outcomes.push(r.await);
        }
        sim.advance(Duration::from_secs(1)).await;
        let seen = seen.lock().unwrap().clone();
        sim.shutdown().await;
        (outcomes, seen)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Liveness across a receiver crash: the messages its handler held are redelivered
    /// to the next run with gaps between them (the seqs the crashed run settled are
    /// never sent again), which an ordered receiver can only hand out once a frame's
    /// floor passes them, while the next run's handler is slow on them. Every receipt
    /// still ends `Acked` (none at its 30 s deadline) and every message is processed
    /// at least once (in-memory dedup does not survive the crash). Found in review: an
    /// ordered stream whose redeliveries were reported held above such a gap stalled
    /// until the deadline.
    #[test]
    fn messages_held_by_a_crashed_receiver_are_all_acked_after_its_restart(c in held_crash()) {
        let (outcomes, seen) = held_crash_run(&c);
        all_acked(&outcomes)?;
        processed(&seen, c.messages, Guarantee::AtLeastOnce)?;
    }
}

/// The cases the property above found, kept as they were found. The first three, on
/// intermediate versions of this change: ordered receivers whose handler-held and
/// buffered redeliveries were reported held stalled until the deadline (nothing, or
/// one lost copy, carried the floor). The last two failed on the
/// build before too: an ordered stream moved one gap per retransmission timer, and 26
/// gaps ran past the deadline (the sender now carries a floor that moves past seqs
/// the receiver does not hold at once); and the ack that would move the floor was
/// lost, then every answer to the sender's re-checks, 2 s apart, for 15 s (a copy of
/// a buffered message is now answered with an ack; 1 case in ~1 000 failed so).
#[test]
fn the_crashed_receiver_cases_found_stay_fixed() {
    let case = |seed, loss, duplicate, messages, every, slow| HeldCrash {
        seed,
        loss,
        duplicate,
        guarantee: Guarantee::AtLeastOnce,
        ordered: true,
        messages,
        every,
        slow: Duration::from_millis(slow),
    };
    for c in [
        case(7593848744259688904, 0.19195848361488085, 0.0, 49, 2, 0),
        case(3343707192899741437, 0.13411257769601503, 0.0, 30, 2, 381),
        case(
            3343911700350256938,
            0.13411257769601503,
            0.11421824250433397,
            56,
            3,
            333,
        ),
        case(
            7452540219069077238,
            0.13704343391404236,
            0.06139059121642493,
            52,
            2,
            307,
        ),
        case(
            4506586105017022583,
            0.16388920435467264,
            0.06535024726467314,
            40,
            2,
            94,
        ),
    ] {
        let (outcomes, seen) = held_crash_run(&c);
        all_acked(&outcomes).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        processed(&seen, c.messages, Guarantee::AtLeastOnce)
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}
