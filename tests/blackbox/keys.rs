//! Black-box tests of application keys (`IdKey`) together with hinted handoff, over
//! time: keyed effectively-once messages handed off and replayed (with direct copies
//! and application resends of the same key, across sender and receiver restarts), the
//! key horizon, in-progress duplicates, one key namespace per receiving node across
//! channels, senders and batches, hint-store limits with keyed messages, and
//! `ack_durable` with keys across a receiver restart. Public API only (README.md, crate
//! docs), real TCP on loopback, default configuration unless a test says otherwise.
//! Senders that must see a target Down use a 100 ms heartbeat so the detector decides
//! within the test's time budget.
//!
//! Found when written (failed every run; fixed since: a `KeyTableFull` refusal sends
//! the hint back to its queue, and a hint refused for good counts in
//! `HintStats::rejected`, not `delivered`):
//! - `keyed_hints_replayed_into_a_full_key_table_are_not_lost`: a replayed hint that
//!   the receiver rejects with `RejectReason::KeyTableFull` (documented as "nothing was
//!   processed; resending the same key after the horizon is safe", i.e. not final) is
//!   dropped from the hint store and counted in `HintStats::delivered`: messages whose
//!   receipts said `HandedOff` are never processed (10 of 10, every run).

use crate::support::ports;
use ackwire::dedup::DurableDedup;
use ackwire::detector::Health;
use ackwire::handoff::HintError;
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, IdKey, MessageId, Node, NodeConfig,
    NodeId, Outcome, Receipt, Receiver, SendError,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// value -> times the handler processed (acked) it.
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

const EO: ChannelId = ChannelId(1);
const EO2: ChannelId = ChannelId(2);

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

async fn within<F: std::future::Future>(secs: u64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

async fn settle(
    receipts: Vec<(u64, Receipt)>,
    secs: u64,
) -> Vec<(u64, Result<Outcome, SendError>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    for (v, r) in receipts {
        match tokio::time::timeout_at(deadline, r).await {
            Ok(res) => out.push((v, res)),
            Err(_) => panic!("receipt of message {v} did not resolve within {secs} s"),
        }
    }
    out
}

/// Records every delivery and acks it (durably if asked).
fn consume(mut inbox: Receiver<u64>, seen: Seen, durable: bool) {
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            let v = *d.message();
            if durable {
                if d.ack_durable().await.is_ok() {
                    *seen.lock().unwrap().entry(v).or_default() += 1;
                }
            } else {
                *seen.lock().unwrap().entry(v).or_default() += 1;
                d.ack();
            }
        }
    });
}

async fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not reached within {secs} s");
}

async fn wait_health(node: &Node, peer: NodeId, want: Health, secs: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if node.health(peer) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{peer} never became {want:?} (is {:?})", node.health(peer));
}

fn count(seen: &Seen, v: u64) -> u32 {
    seen.lock().unwrap().get(&v).copied().unwrap_or(0)
}

/// A sender config with hinted handoff in `dir` and a fast heartbeat (so a stopped
/// target is Down within about a second).
fn handoff_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.handoff = Some(HandoffConfig::new(dir));
    c.heartbeat_interval = Duration::from_millis(100);
    c
}

fn durable_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.dedup.durable = Some(DurableDedup::new(dir));
    c
}

async fn receiver_at(id: u64, addr: SocketAddr, allow: &[u64], cfg: NodeConfig) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(addr).config(cfg);
    for p in allow {
        b = b.allow_peer(NodeId(*p));
    }
    within(10, "receiver build", b.build())
        .await
        .expect("receiver builds")
}

async fn sender_to(id: u64, peer: u64, addr: SocketAddr, cfg: NodeConfig) -> Node {
    within(
        10,
        "sender build",
        Node::builder(NodeId(id))
            .bind(any_addr())
            .peer(NodeId(peer), addr)
            .config(cfg)
            .build(),
    )
    .await
    .expect("sender builds")
}

fn eo_sender(node: &Node, peer: u64, ch: ChannelId) -> ackwire::Sender<u64> {
    node.sender::<u64>(
        NodeId(peer),
        ChannelOptions::new(ch, Guarantee::EffectivelyOnce),
    )
    .unwrap()
}

async fn keyed(out: &ackwire::Sender<u64>, v: u64, key: u128) -> Receipt {
    within(10, "send_with_key", out.send_with_key(&v, IdKey(key)))
        .await
        .expect("send_with_key accepted")
}

fn assert_once(seen: &Seen, values: &[u64]) {
    let bad: Vec<(u64, u32)> = values
        .iter()
        .map(|v| (*v, count(seen, *v)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        bad.is_empty(),
        "processed other than once (value, times): {bad:?}"
    );
}

fn hints(st: &ackwire::Stats) -> ackwire::handoff::HintStats {
    st.hints.expect("hint stats with handoff on")
}

/// README: "`EffectivelyOnce` ... dedup by message ID: duplicates are acked, not
/// delivered"; `Outcome::HandedOff`: "will be replayed, under its original ID, when the
/// target is back"; `send_with_key`: "any two sends with the same key are processed
/// once within the receiver's dedup horizon". A key handed off twice (the application
/// resent it after `HandedOff`), a key already processed before the target went away
/// and handed off again, and a key also sent directly by another node once the target
/// is back: each processed exactly once, across a clean receiver restart with durable
/// dedup; every receipt `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_off_keys_with_resends_and_direct_copies_are_processed_once() {
    let hints_dir = tempfile::tempdir().unwrap();
    let dedup_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(2, any_addr(), &[1, 3], durable_cfg(dedup_dir.path())).await;
    consume(b.receiver(EO, false).unwrap(), seen.clone(), true);
    let addr = b.local_addr().unwrap();
    let a = sender_to(1, 2, addr, handoff_cfg(hints_dir.path())).await;
    let out = eo_sender(&a, 2, EO);

    // Key 1 processed (durably) before the target goes away.
    let r = keyed(&out, 1, 1).await;
    assert_eq!(within(10, "key 1", r).await, Ok(Outcome::Acked));

    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    wait_health(&a, NodeId(2), Health::Down, 10).await;

    let mut r = Vec::new();
    r.push((2, keyed(&out, 2, 2).await));
    r.push((2, keyed(&out, 2, 2).await)); // application resend of a handed-off key
    r.push((1, keyed(&out, 1, 1).await)); // resend of a key processed before
    r.push((4, keyed(&out, 4, 4).await));
    for (v, res) in settle(r, 10).await {
        assert_eq!(
            res,
            Ok(Outcome::HandedOff),
            "key {v} while the target is Down"
        );
    }

    // The target returns (same id, address, dedup directory); another node sends key 2
    // and key 4 directly at once, racing the replay.
    let b2 = receiver_at(2, addr, &[1, 3], durable_cfg(dedup_dir.path())).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), true);
    consume(b2.receiver(EO2, false).unwrap(), seen.clone(), true);
    let c = sender_to(3, 2, addr, NodeConfig::default()).await;
    // Another channel: keys are one namespace per receiving node.
    let out_c = eo_sender(&c, 2, EO2);
    let direct = vec![
        (2, keyed(&out_c, 2, 2).await),
        (4, keyed(&out_c, 4, 4).await),
    ];
    for (v, res) in settle(direct, 10).await {
        assert_eq!(res, Ok(Outcome::Acked), "direct copy of key {v}");
    }
    wait_hints_drained(&a, 12).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_once(&seen, &[1, 2, 4]);
    let h = hints(&within(5, "stats", a.stats()).await.unwrap());
    assert_eq!(h.pending, 0, "{h:?}");
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "c shutdown", c.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// Waits until `node`'s hint store has nothing pending.
async fn wait_hints_drained(node: &Node, secs: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while tokio::time::Instant::now() < end {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), node.stats()).await {
            last = st.hints;
            if last.is_some_and(|h| h.pending == 0) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("hints not drained within {secs} s: {last:?}");
}

/// README (durability): hints "survive" a sender restart and are replayed by the next
/// run; `Outcome::HandedOff`: "replayed, under its original ID". Keyed hints stored by
/// the first sender run, the target back, and the *second* run's application resending
/// some of the same keys directly (it cannot know whether the hints got there): every
/// key processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_hints_of_a_previous_sender_run_and_its_resends_are_processed_once() {
    let hints_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(12, any_addr(), &[11], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    // Start the receiver without a channel receiver first: we need its address only.
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);

    let a1 = sender_to(11, 12, addr, handoff_cfg(hints_dir.path())).await;
    let out1 = eo_sender(&a1, 12, EO);
    wait_health(&a1, NodeId(12), Health::Down, 10).await;
    let mut r = Vec::new();
    for k in 10..20u64 {
        r.push((k, keyed(&out1, k, 1000 + u128::from(k)).await));
    }
    for (v, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "key {v}");
    }
    within(10, "sender run 1 shutdown", a1.shutdown()).await;
    drop((out1, a1));

    let b2 = receiver_at(12, addr, &[11], NodeConfig::default()).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), false);
    let a2 = sender_to(11, 12, addr, handoff_cfg(hints_dir.path())).await;
    let out2 = eo_sender(&a2, 12, EO);
    let mut r = Vec::new();
    for k in (10..20u64).step_by(2) {
        r.push((k, keyed(&out2, k, 1000 + u128::from(k)).await));
    }
    for (v, res) in settle(r, 12).await {
        assert_eq!(
            res,
            Ok(Outcome::Acked),
            "resend of key {v} by the second run"
        );
    }
    wait_until(12, "every key processed", || {
        (10..20u64).all(|k| count(&seen, k) >= 1)
    })
    .await;
    wait_hints_drained(&a2, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_once(&seen, &(10..20).collect::<Vec<_>>());
    within(10, "a2 shutdown", a2.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// README Dedup limits: "key horizon | ... | a key is forgotten; a resend after it is
/// processed again"; `DedupConfig::horizon`: "How long a completed application key is
/// remembered". With a 4 s horizon: resends at 0.6, 2.0 and 3.2 s after completion are
/// acked and not delivered; a resend 2 s after the horizon is processed again. (A 2 s
/// horizon left a loaded 2-core machine 300 ms to judge it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_remembered_for_the_horizon_and_processed_again_after_it() {
    let seen: Seen = Arc::default();
    let mut cfg = NodeConfig::default();
    cfg.dedup.horizon = Duration::from_secs(4);
    let b = receiver_at(22, any_addr(), &[21], cfg).await;
    consume(b.receiver(EO, false).unwrap(), seen.clone(), false);
    let a = sender_to(21, 22, b.local_addr().unwrap(), NodeConfig::default()).await;
    let out = eo_sender(&a, 22, EO);

    let r = keyed(&out, 7, 77).await;
    assert_eq!(within(10, "first", r).await, Ok(Outcome::Acked));
    let t0 = tokio::time::Instant::now();
    for at in [600u64, 2000, 3200] {
        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
        let r = keyed(&out, 7, 77).await;
        assert_eq!(
            within(10, "resend", r).await,
            Ok(Outcome::Acked),
            "resend at {at} ms"
        );
        assert!(
            t0.elapsed() < Duration::from_millis(3800),
            "test too slow to check inside the horizon"
        );
        assert_eq!(
            count(&seen, 7),
            1,
            "resend {at} ms after completion, within the 4 s horizon, was processed again"
        );
    }
    tokio::time::sleep_until(t0 + Duration::from_millis(6000)).await;
    let r = keyed(&out, 7, 77).await;
    assert_eq!(within(10, "after horizon", r).await, Ok(Outcome::Acked));
    wait_until(3, "resend after the horizon processed again", || {
        count(&seen, 7) == 2
    })
    .await;
    let st = within(5, "stats", b.stats()).await.unwrap();
    assert!(st.proto.duplicates_dropped >= 3, "{:?}", st.proto);
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
}

/// README: "a duplicate arriving while the original is still processing is not
/// delivered"; "A duplicate of a message still being processed is answered when the
/// original finishes: acked with it, or delivered in its place if it fails"; keys are
/// "one namespace per receiving node, shared by all senders and channels". The same
/// key from a second node on a second channel while the first delivery is held: not
/// delivered, not acked while held; acked (and never delivered) once the original is
/// acked. Then, with a nack: processed exactly once more in all, both receipts `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_key_during_processing_is_answered_with_the_original() {
    let b = receiver_at(32, any_addr(), &[31, 33], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let mut in1 = b.receiver::<u64>(EO, false).unwrap();
    let mut in2 = b.receiver::<u64>(EO2, false).unwrap();
    let a = sender_to(31, 32, addr, NodeConfig::default()).await;
    let c = sender_to(33, 32, addr, NodeConfig::default()).await;
    let out_a = eo_sender(&a, 32, EO);
    let out_c = eo_sender(&c, 32, EO2);

    // Part 1: the original is acked.
    let ra = keyed(&out_a, 1, 500).await;
    let d = within(10, "original delivered", in1.recv()).await.unwrap();
    assert_eq!(d.id(), MessageId::Key(IdKey(500)));
    let mut rc = keyed(&out_c, 1, 500).await;
    // While the original is held: no delivery on channel 2, no answer to the copy.
    let held = tokio::time::timeout(Duration::from_millis(1000), in2.recv()).await;
    assert!(
        held.is_err(),
        "the in-progress duplicate was delivered: {:?}",
        held.map(|d| d.map(|d| d.id()))
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut rc)
            .await
            .is_err(),
        "the duplicate's receipt resolved while the original was still in the handler"
    );
    d.ack();
    assert_eq!(within(10, "original receipt", ra).await, Ok(Outcome::Acked));
    assert_eq!(
        within(10, "duplicate receipt", rc).await,
        Ok(Outcome::Acked)
    );
    let late = tokio::time::timeout(Duration::from_millis(500), in2.recv()).await;
    assert!(
        late.is_err(),
        "the duplicate was delivered after the original was acked"
    );

    // Part 2: the original is nacked: the key is processed once more in all.
    let ra = keyed(&out_a, 2, 501).await;
    let d = within(10, "original 2 delivered", in1.recv())
        .await
        .unwrap();
    let rc = keyed(&out_c, 2, 501).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.nack();
    let next = within(10, "redelivery after nack", async {
        tokio::select! {
            d = in1.recv() => d.unwrap(),
            d = in2.recv() => d.unwrap(),
        }
    })
    .await;
    assert_eq!(next.id(), MessageId::Key(IdKey(501)));
    next.ack();
    assert_eq!(within(10, "receipt a", ra).await, Ok(Outcome::Acked));
    assert_eq!(within(10, "receipt c", rc).await, Ok(Outcome::Acked));
    let extra = tokio::time::timeout(Duration::from_millis(700), async {
        tokio::select! {
            d = in1.recv() => d.map(|d| d.id()),
            d = in2.recv() => d.map(|d| d.id()),
        }
    })
    .await;
    assert!(
        extra.is_err(),
        "key 501 delivered again after it was acked: {extra:?}"
    );
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "c shutdown", c.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
}

/// README: "Application keys are one namespace per receiving node, shared by all
/// senders and channels: the same key on two channels is one message";
/// `RawSender::send_many_with_keys`: keyed as `send_with_key`. Two senders on two
/// channels send concurrent batches that repeat keys within and across batches: each
/// key is processed exactly once, every receipt `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_repeated_keys_across_senders_and_channels_process_each_key_once() {
    let b = receiver_at(42, any_addr(), &[41, 43], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let ids: Arc<Mutex<HashMap<MessageId, u32>>> = Arc::default();
    for ch in [EO, EO2] {
        let mut inbox = b.raw_receiver(ch, false).unwrap();
        let ids = ids.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                *ids.lock().unwrap().entry(d.id()).or_default() += 1;
                d.ack();
            }
        });
    }
    let a = sender_to(41, 42, addr, NodeConfig::default()).await;
    let c = sender_to(43, 42, addr, NodeConfig::default()).await;
    let ra = a
        .raw_sender(
            NodeId(42),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let rc = c
        .raw_sender(
            NodeId(42),
            ChannelOptions::new(EO2, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    const N: u128 = 300;
    let p = |i: u128| Bytes::from(i.to_le_bytes().to_vec());
    // a: every key 0..N, each twice in the batch; c: the odd keys, plus N..N+50 twice.
    let batch_a: Vec<(Bytes, IdKey)> = (0..N)
        .flat_map(|k| [(p(k), IdKey(k)), (p(k), IdKey(k))])
        .collect();
    let mut batch_c: Vec<(Bytes, IdKey)> = (0..N)
        .filter(|k| k % 2 == 1)
        .map(|k| (p(k), IdKey(k)))
        .collect();
    batch_c.extend((N..N + 50).flat_map(|k| [(p(k), IdKey(k)), (p(k), IdKey(k))]));
    let (xa, xc) = within(10, "batches accepted", async {
        tokio::join!(
            ra.send_many_with_keys(batch_a),
            rc.send_many_with_keys(batch_c)
        )
    })
    .await;
    let receipts: Vec<(u64, Receipt)> = xa
        .unwrap()
        .into_iter()
        .chain(xc.unwrap())
        .enumerate()
        .map(|(i, r)| (i as u64, r))
        .collect();
    for (i, res) in settle(receipts, 12).await {
        assert_eq!(res, Ok(Outcome::Acked), "receipt {i}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = ids.lock().unwrap().clone();
    let bad: Vec<_> = (0..N + 50)
        .map(|k| (k, ids.get(&MessageId::Key(IdKey(k))).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        bad.is_empty(),
        "keys processed other than once (key, times): {bad:?}"
    );
    assert_eq!(ids.len() as u128, N + 50, "unexpected ids delivered");
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "c shutdown", c.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
}

/// README: "hint window, TTL and bytes (`SendError::HandoffRefused`)";
/// `HintStoreConfig::max_hint_window`: "Targets down longer than this get no new hints
/// (`HintError::TargetDownTooLong`)". A keyed send to a target Down longer than a 1 s
/// window fails with that typed error (counted in `handoff_refused` and
/// `refused_window`), never `HandedOff`; the key was not consumed: resent once the
/// target is back it is processed exactly once. A later outage gets a fresh window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_send_beyond_the_hint_window_is_refused_typed_and_the_key_stays_usable() {
    let hints_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(52, any_addr(), &[51], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let mut cfg = handoff_cfg(hints_dir.path());
    let h = cfg.handoff.as_mut().unwrap();
    h.store.max_hint_window = Duration::from_secs(1);
    h.store.default_ttl = Duration::from_secs(60);
    let a = sender_to(51, 52, addr, cfg).await;
    let out = eo_sender(&a, 52, EO);
    wait_health(&a, NodeId(52), Health::Down, 10).await;
    // Inside the window: handed off.
    let r = keyed(&out, 1, 9001).await;
    assert_eq!(within(10, "inside window", r).await, Ok(Outcome::HandedOff));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let res = match out.send_with_key(&2, IdKey(9002)).await {
        Err(e) => Err(e),
        Ok(r) => within(10, "beyond window", r).await,
    };
    match &res {
        Err(SendError::HandoffRefused { reason }) => assert!(
            matches!(
                reason.hint_error(),
                Some(HintError::TargetDownTooLong { .. })
            ),
            "wrong refusal: {reason:?}"
        ),
        other => panic!("a keyed send beyond the hint window: {other:?}"),
    }
    let st = within(5, "stats", a.stats()).await.unwrap();
    assert!(
        st.handoff_refused >= 1,
        "handoff_refused {}",
        st.handoff_refused
    );
    assert!(hints(&st).refused_window >= 1, "{:?}", hints(&st));
    assert_eq!(hints(&st).pending, 1, "{:?}", hints(&st));

    let b2 = receiver_at(52, addr, &[51], NodeConfig::default()).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), false);
    wait_health(&a, NodeId(52), Health::Up, 10).await;
    let r = keyed(&out, 2, 9002).await;
    assert_eq!(
        within(10, "resend of the refused key", r).await,
        Ok(Outcome::Acked)
    );
    wait_until(10, "hint replayed", || count(&seen, 1) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_once(&seen, &[1, 2]);

    // The target goes away again: a new outage starts a new window, so a keyed send
    // inside it is handed off again (and replayed once when the target is back).
    within(10, "b2 shutdown", b2.shutdown()).await;
    drop(b2);
    wait_health(&a, NodeId(52), Health::Down, 10).await;
    let r = keyed(&out, 3, 9003).await;
    assert_eq!(
        within(10, "inside the second outage's window", r).await,
        Ok(Outcome::HandedOff)
    );
    let b3 = receiver_at(52, addr, &[51], NodeConfig::default()).await;
    consume(b3.receiver(EO, false).unwrap(), seen.clone(), false);
    wait_hints_drained(&a, 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_once(&seen, &[1, 2, 3]);
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b3 shutdown", b3.shutdown()).await;
}

/// `Outcome::HandedOff`: "replayed ... when the target is back — until the hint TTL";
/// `HintStats::expired`: "Hints dropped because their TTL passed (never returned)". A
/// keyed hint with a 1 s TTL whose target returns after 2.5 s is never delivered, is
/// counted expired, and leaves nothing pending; the application's resend under the same
/// key is then processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keyed_hints_are_never_replayed() {
    let hints_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(62, any_addr(), &[61], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let mut cfg = handoff_cfg(hints_dir.path());
    let h = cfg.handoff.as_mut().unwrap();
    h.store.max_hint_window = Duration::from_secs(1);
    h.store.default_ttl = Duration::from_secs(1);
    let a = sender_to(61, 62, addr, cfg).await;
    let out = eo_sender(&a, 62, EO);
    wait_health(&a, NodeId(62), Health::Down, 10).await;
    let mut r = Vec::new();
    for k in 0..5u64 {
        r.push((k, keyed(&out, k, 7000 + u128::from(k)).await));
    }
    for (v, res) in settle(r, 5).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "key {v}");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b2 = receiver_at(62, addr, &[61], NodeConfig::default()).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), false);
    wait_health(&a, NodeId(62), Health::Up, 10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let delivered: Vec<(u64, u32)> = (0..5)
        .map(|k| (k, count(&seen, k)))
        .filter(|x| x.1 > 0)
        .collect();
    assert!(
        delivered.is_empty(),
        "hints replayed after their TTL: {delivered:?}"
    );
    let h = hints(&within(5, "stats", a.stats()).await.unwrap());
    assert_eq!(h.pending, 0, "{h:?}");
    assert_eq!(h.expired, 5, "{h:?}");
    assert_eq!(h.delivered, 0, "{h:?}");
    let mut r = Vec::new();
    for k in 0..5u64 {
        r.push((k, keyed(&out, k, 7000 + u128::from(k)).await));
    }
    for (v, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::Acked), "resend of key {v}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_once(&seen, &[0, 1, 2, 3, 4]);
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// README: "hint window, TTL and bytes (`SendError::HandoffRefused`)"; `HintError::
/// TargetFull`: "The target's hints would exceed `max_bytes_per_target`; the hint was
/// not stored". With an 8 KiB per-target budget, 1.5 KiB keyed messages to a Down
/// target: the first few are `HandedOff`, later ones fail with `TargetFull` (counted in
/// `handoff_refused` and `refused_full`); when the target returns, exactly the stored
/// keys are replayed once, and the refused keys resent are processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_hints_beyond_the_byte_limit_are_refused_typed_and_the_rest_replayed_once() {
    let hints_dir = tempfile::tempdir().unwrap();
    let b = receiver_at(72, any_addr(), &[71], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let mut cfg = handoff_cfg(hints_dir.path());
    let h = cfg.handoff.as_mut().unwrap();
    h.store.segment_bytes = 4096;
    h.store.max_bytes_per_target = 8192;
    h.store.max_total_bytes = 8192;
    let a = sender_to(71, 72, addr, cfg).await;
    let out = a
        .raw_sender(
            NodeId(72),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    wait_health(&a, NodeId(72), Health::Down, 10).await;
    let mut stored = Vec::new();
    let mut refused = Vec::new();
    for k in 0..12u128 {
        let mut p = vec![0u8; 1536];
        p[..16].copy_from_slice(&k.to_le_bytes());
        let res = match out.send_with_key(Bytes::from(p), IdKey(k)).await {
            Err(e) => Err(e),
            Ok(r) => within(10, "hint", r).await,
        };
        match res {
            Ok(Outcome::HandedOff) => stored.push(k),
            Err(SendError::HandoffRefused { reason }) => {
                assert!(
                    matches!(
                        reason.hint_error(),
                        Some(HintError::TargetFull { .. } | HintError::StoreFull { .. })
                    ),
                    "key {k}: wrong refusal {reason:?}"
                );
                refused.push(k);
            }
            other => panic!("key {k}: {other:?}"),
        }
    }
    assert!(
        !stored.is_empty() && !refused.is_empty(),
        "stored {stored:?} refused {refused:?}"
    );
    let st = within(5, "stats", a.stats()).await.unwrap();
    assert_eq!(st.handoff_refused, refused.len() as u64, "handoff_refused");
    assert!(
        hints(&st).refused_full >= refused.len() as u64,
        "{:?}",
        hints(&st)
    );
    assert_eq!(hints(&st).pending, stored.len() as u64, "{:?}", hints(&st));

    let b2 = receiver_at(72, addr, &[71], NodeConfig::default()).await;
    let ids: Arc<Mutex<HashMap<MessageId, u32>>> = Arc::default();
    {
        let mut inbox = b2.raw_receiver(EO, false).unwrap();
        let ids = ids.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                *ids.lock().unwrap().entry(d.id()).or_default() += 1;
                d.ack();
            }
        });
    }
    wait_until(12, "stored hints replayed", || {
        let ids = ids.lock().unwrap();
        stored
            .iter()
            .all(|k| ids.contains_key(&MessageId::Key(IdKey(*k))))
    })
    .await;
    let mut r = Vec::new();
    for k in &refused {
        let rr = within(
            10,
            "resend",
            out.send_with_key(Bytes::from(vec![1u8; 64]), IdKey(*k)),
        )
        .await
        .unwrap();
        r.push((*k as u64, rr));
    }
    for (v, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::Acked), "resend of refused key {v}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = ids.lock().unwrap().clone();
    let bad: Vec<_> = (0..12u128)
        .map(|k| (k, ids.get(&MessageId::Key(IdKey(k))).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        bad.is_empty(),
        "keys processed other than once (key, times): {bad:?}"
    );
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// README: "`ack_durable()` ... exactly once, also across a receiver killed at any
/// point after it resolved". Keys acked with `ack_durable`, the receiver dropped
/// without shutdown right after, the sender (handoff on) resending the same keys while
/// the target is Down (hints), the target restarted on the same dedup directory: the
/// replayed hints are acked and not processed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_durable_keys_are_not_reprocessed_when_replayed_as_hints_after_a_kill() {
    let hints_dir = tempfile::tempdir().unwrap();
    let dedup_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(82, any_addr(), &[81], durable_cfg(dedup_dir.path())).await;
    consume(b.receiver(EO, false).unwrap(), seen.clone(), true);
    let addr = b.local_addr().unwrap();
    let a = sender_to(81, 82, addr, handoff_cfg(hints_dir.path())).await;
    let out = eo_sender(&a, 82, EO);
    let mut r = Vec::new();
    for k in 0..20u64 {
        r.push((k, keyed(&out, k, 4000 + u128::from(k)).await));
    }
    for (v, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::Acked), "key {v}");
    }
    wait_until(5, "all durably acked", || {
        (0..20).all(|k| count(&seen, k) == 1)
    })
    .await;
    drop(b); // killed: no shutdown, no drain
    wait_health(&a, NodeId(82), Health::Down, 10).await;
    let mut r = Vec::new();
    for k in 0..20u64 {
        r.push((k, keyed(&out, k, 4000 + u128::from(k)).await));
    }
    for (v, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "resend of key {v}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b2 = receiver_at(82, addr, &[81], durable_cfg(dedup_dir.path())).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), true);
    wait_hints_drained(&a, 12).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_once(&seen, &(0..20).collect::<Vec<_>>());
    let h = hints(&within(5, "stats", a.stats()).await.unwrap());
    assert!(h.delivered >= 20, "{h:?}");
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// README Dedup limits: "key horizon | ... | a key is forgotten; a resend after it is
/// processed again" and `send_with_key`: "processed once within the receiver's dedup
/// horizon". Keys completed at staggered times (a new one every 80 ms for 3.2 s, so
/// the key table's generations turn over while they live) are each resent 3.4 s after
/// their own ack with a 4 s horizon: none may be processed a second time. (A 2 s
/// horizon left a loaded 2-core machine 250 ms to judge it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staggered_keys_are_each_remembered_for_their_whole_horizon() {
    let seen: Seen = Arc::default();
    let mut cfg = NodeConfig::default();
    cfg.dedup.horizon = Duration::from_secs(4);
    let b = receiver_at(92, any_addr(), &[91], cfg).await;
    consume(b.receiver(EO, false).unwrap(), seen.clone(), false);
    let a = sender_to(91, 92, b.local_addr().unwrap(), NodeConfig::default()).await;
    let out = eo_sender(&a, 92, EO);
    let mut tasks = Vec::new();
    for k in 0..40u64 {
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(80 * k)).await;
            let r = keyed(&out, k, 20_000 + u128::from(k)).await;
            assert_eq!(within(10, "first", r).await, Ok(Outcome::Acked), "key {k}");
            let acked = tokio::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(3400)).await;
            let r = keyed(&out, k, 20_000 + u128::from(k)).await;
            assert_eq!(within(10, "resend", r).await, Ok(Outcome::Acked), "key {k}");
            acked.elapsed()
        }));
    }
    for t in tasks {
        let took = within(15, "key task", t).await.unwrap();
        assert!(
            took < Duration::from_millis(3900),
            "resend acked {took:?} after the first ack: too slow to judge the horizon"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_once(&seen, &(0..40).collect::<Vec<_>>());
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
}

/// README Dedup limits, key table budget: "only at the budget are new keys refused
/// (`TableFull`, counted, warned): the sender's receipt fails at once with `Rejected {
/// reason: KeyTableFull }` (nothing was processed; resending the same key after the
/// horizon is safe)"; `DedupConfig::table_budget_bytes`: "Set it to `table_capacity ×
/// BYTES_PER_SLOT` for a fixed-size table". A 64-slot table, a 2 s horizon, 200
/// distinct keys: some are refused with `KeyTableFull` and none of those is processed;
/// every accepted key is processed once; after the horizon every refused key resent is
/// processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_refused_by_a_full_table_are_unprocessed_and_safe_to_resend_after_the_horizon() {
    let seen: Seen = Arc::default();
    let mut cfg = NodeConfig::default();
    cfg.dedup.horizon = Duration::from_secs(2);
    cfg.dedup.table_capacity = 64;
    cfg.dedup.table_budget_bytes = 64 * ackwire::dedup::BYTES_PER_SLOT;
    let b = receiver_at(102, any_addr(), &[101], cfg).await;
    consume(b.receiver(EO, false).unwrap(), seen.clone(), false);
    let a = sender_to(101, 102, b.local_addr().unwrap(), NodeConfig::default()).await;
    let out = eo_sender(&a, 102, EO);
    let mut r = Vec::new();
    for k in 0..200u64 {
        r.push((k, keyed(&out, k, 30_000 + u128::from(k)).await));
    }
    let mut refused = Vec::new();
    let mut accepted = Vec::new();
    for (k, res) in settle(r, 12).await {
        match res {
            Ok(Outcome::Acked) => accepted.push(k),
            Err(SendError::Rejected {
                reason: ackwire::RejectReason::KeyTableFull,
            }) => refused.push(k),
            other => panic!("key {k}: {other:?}"),
        }
    }
    assert!(
        !refused.is_empty(),
        "a 64-slot table took 200 keys within the horizon"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_once(&seen, &accepted);
    let processed_refused: Vec<u64> = refused
        .iter()
        .copied()
        .filter(|k| count(&seen, *k) > 0)
        .collect();
    assert!(
        processed_refused.is_empty(),
        "refused keys were processed: {processed_refused:?}"
    );
    let st = within(5, "stats", b.stats()).await.unwrap();
    assert!(
        st.dedup.table_full >= refused.len() as u64,
        "{:?}",
        st.dedup
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    for chunk in refused.chunks(40) {
        let mut r = Vec::new();
        for k in chunk {
            r.push((*k, keyed(&out, *k, 30_000 + u128::from(*k)).await));
        }
        for (k, res) in settle(r, 10).await {
            assert_eq!(
                res,
                Ok(Outcome::Acked),
                "resend of refused key {k} after the horizon"
            );
        }
        // Let this chunk's keys expire before the next one.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        if chunk.len() < 40 {
            break;
        }
    }
    assert_once(&seen, &refused);
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
}

/// README: "without `DurableDedup` a receiver restart forgets"; with it, "durable dedup
/// never reprocesses a completed message"; `DedupConfig::horizon`: "How long a
/// completed application key is remembered"; key horizon: "a resend after it is
/// processed again". With durable dedup and a 3 s horizon, a key acked durably, the
/// receiver restarted cleanly: a resend 1 s after the ack is a duplicate; a resend
/// 1 s after the horizon is processed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_keys_keep_their_horizon_across_a_receiver_restart() {
    let dedup_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let mut cfg = durable_cfg(dedup_dir.path());
    cfg.dedup.horizon = Duration::from_secs(3);
    let b = receiver_at(112, any_addr(), &[111], cfg.clone()).await;
    consume(b.receiver(EO, false).unwrap(), seen.clone(), true);
    let addr = b.local_addr().unwrap();
    let a = sender_to(111, 112, addr, NodeConfig::default()).await;
    let out = eo_sender(&a, 112, EO);
    let r = keyed(&out, 5, 555).await;
    assert_eq!(within(10, "first", r).await, Ok(Outcome::Acked));
    let t0 = tokio::time::Instant::now();
    wait_until(5, "processed", || count(&seen, 5) == 1).await;
    within(10, "receiver shutdown", b.shutdown()).await;
    drop(b);
    let b2 = receiver_at(112, addr, &[111], cfg.clone()).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), true);
    tokio::time::sleep_until(t0 + Duration::from_millis(1000)).await;
    let r = keyed(&out, 5, 555).await;
    assert_eq!(
        within(10, "resend inside horizon", r).await,
        Ok(Outcome::Acked)
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2800),
        "too slow to check inside the horizon"
    );
    assert_eq!(
        count(&seen, 5),
        1,
        "a durable key was processed again within its horizon after a restart"
    );
    tokio::time::sleep_until(t0 + Duration::from_millis(4000)).await;
    let r = keyed(&out, 5, 555).await;
    assert_eq!(
        within(10, "resend after horizon", r).await,
        Ok(Outcome::Acked)
    );
    wait_until(3, "processed again after the horizon", || {
        count(&seen, 5) == 2
    })
    .await;
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// README: "a duplicate arriving while the original is still processing is not
/// delivered"; `DedupConfig::horizon`: "How long a *completed* application key is
/// remembered". With a 1 s horizon and a handler that holds the original for 2.5 s: a
/// copy of the key from another node on another channel 1.5 s in (past the horizon
/// measured from the arrival) is not delivered while the original is held; after the
/// original is acked, the copy is acked without delivery, and a resend 0.5 s after the
/// ack (inside the horizon measured from completion) is not processed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_longer_than_the_horizon_is_still_in_progress_then_remembered() {
    let mut cfg = NodeConfig::default();
    cfg.dedup.horizon = Duration::from_secs(1);
    let b = receiver_at(122, any_addr(), &[121, 123], cfg).await;
    let addr = b.local_addr().unwrap();
    let mut in1 = b.receiver::<u64>(EO, false).unwrap();
    let mut in2 = b.receiver::<u64>(EO2, false).unwrap();
    let a = sender_to(121, 122, addr, NodeConfig::default()).await;
    let c = sender_to(123, 122, addr, NodeConfig::default()).await;
    let out_a = eo_sender(&a, 122, EO);
    let out_c = eo_sender(&c, 122, EO2);

    let ra = keyed(&out_a, 1, 600).await;
    let d = within(10, "original delivered", in1.recv()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rc = keyed(&out_c, 1, 600).await;
    let dup = tokio::time::timeout(Duration::from_millis(1000), async {
        tokio::select! {
            d = in1.recv() => d.map(|d| (1, d.id())),
            d = in2.recv() => d.map(|d| (2, d.id())),
        }
    })
    .await;
    assert!(
        dup.is_err(),
        "a copy of a key still in the handler (held past the horizon) was delivered: {dup:?}"
    );
    d.ack();
    assert_eq!(within(10, "original receipt", ra).await, Ok(Outcome::Acked));
    assert_eq!(within(10, "copy receipt", rc).await, Ok(Outcome::Acked));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = keyed(&out_c, 1, 600).await;
    assert_eq!(within(10, "resend", r).await, Ok(Outcome::Acked));
    let again = tokio::time::timeout(Duration::from_millis(300), async {
        tokio::select! {
            d = in1.recv() => d.map(|d| (1, d.id())),
            d = in2.recv() => d.map(|d| (2, d.id())),
        }
    })
    .await;
    assert!(
        again.is_err(),
        "a resend 0.3 s after completion (1 s horizon) was processed again: {again:?}"
    );
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "c shutdown", c.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
}

/// `Outcome::HandedOff`: "will be replayed, under its original ID, when the target is
/// back"; README: "a duplicate arriving while the original is still processing is not
/// delivered ... answered when the original finishes: acked with it". A key handed off
/// while the target is Down; when it returns, another node sends the same key directly
/// and the handler holds that delivery while the hint is replayed: the hint is not
/// delivered, stays pending until the held original is acked, then is acked; the key
/// is processed once and the hint store drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_keyed_hint_meeting_an_in_progress_original_is_settled_with_it() {
    let hints_dir = tempfile::tempdir().unwrap();
    let b = receiver_at(132, any_addr(), &[131, 133], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let a = sender_to(131, 132, addr, handoff_cfg(hints_dir.path())).await;
    let out_a = eo_sender(&a, 132, EO);
    wait_health(&a, NodeId(132), Health::Down, 10).await;
    let r = keyed(&out_a, 9, 909).await;
    assert_eq!(within(10, "handoff", r).await, Ok(Outcome::HandedOff));

    let b2 = receiver_at(132, addr, &[131, 133], NodeConfig::default()).await;
    let mut in1 = b2.receiver::<u64>(EO, false).unwrap();
    let mut in2 = b2.receiver::<u64>(EO2, false).unwrap();
    let c = sender_to(133, 132, addr, NodeConfig::default()).await;
    let out_c = eo_sender(&c, 132, EO2);
    let rc = keyed(&out_c, 9, 909).await;
    // Whichever copy arrives first is held; the other must not be delivered.
    let first = within(10, "first copy delivered", async {
        tokio::select! {
            d = in1.recv() => d.unwrap(),
            d = in2.recv() => d.unwrap(),
        }
    })
    .await;
    assert_eq!(first.id(), MessageId::Key(IdKey(909)));
    wait_health(&a, NodeId(132), Health::Up, 10).await;
    let second = tokio::time::timeout(Duration::from_millis(2000), async {
        tokio::select! {
            d = in1.recv() => d.map(|d| (1, d.id())),
            d = in2.recv() => d.map(|d| (2, d.id())),
        }
    })
    .await;
    assert!(
        second.is_err(),
        "second copy delivered while the first was held: {second:?}"
    );
    first.ack();
    assert_eq!(within(10, "direct receipt", rc).await, Ok(Outcome::Acked));
    wait_hints_drained(&a, 10).await;
    let again = tokio::time::timeout(Duration::from_millis(500), async {
        tokio::select! {
            d = in1.recv() => d.map(|d| (1, d.id())),
            d = in2.recv() => d.map(|d| (2, d.id())),
        }
    })
    .await;
    assert!(
        again.is_err(),
        "key delivered again after it was acked: {again:?}"
    );
    let h = hints(&within(5, "stats", a.stats()).await.unwrap());
    assert_eq!((h.pending, h.delivered), (0, 1), "{h:?}");
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "c shutdown", c.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// `Outcome::HandedOff`: "will be replayed ... when the target is back — until the hint
/// TTL"; Dedup limits: key table budget: "nothing was processed; resending the same key
/// after the horizon is safe". Keyed hints replayed into a receiver whose fixed key
/// table is full of live keys are not lost: once the table's keys expire, every
/// handed-off key is processed exactly once (before the hint TTL), and none is reported
/// delivered without having been processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_hints_replayed_into_a_full_key_table_are_not_lost() {
    let hints_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let mut rcfg = NodeConfig::default();
    rcfg.dedup.horizon = Duration::from_secs(2);
    rcfg.dedup.table_capacity = 64;
    rcfg.dedup.table_budget_bytes = 64 * ackwire::dedup::BYTES_PER_SLOT;
    let b = receiver_at(142, any_addr(), &[141, 143], rcfg.clone()).await;
    let addr = b.local_addr().unwrap();
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let a = sender_to(141, 142, addr, handoff_cfg(hints_dir.path())).await;
    let out_a = eo_sender(&a, 142, EO);
    wait_health(&a, NodeId(142), Health::Down, 10).await;
    let mut r = Vec::new();
    for k in 0..10u64 {
        r.push((k, keyed(&out_a, k, 50_000 + u128::from(k)).await));
    }
    for (k, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "key {k}");
    }
    // The target returns and another node fills its key table first.
    let b2 = receiver_at(142, addr, &[141, 143], rcfg).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), false);
    let c = sender_to(143, 142, addr, NodeConfig::default()).await;
    let out_c = eo_sender(&c, 142, EO);
    let mut r = Vec::new();
    for k in 100..300u64 {
        r.push((k, keyed(&out_c, k, 60_000 + u128::from(k)).await));
    }
    let _ = settle(r, 10).await;
    wait_hints_drained(&a, 12).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = hints(&within(5, "stats", a.stats()).await.unwrap());
    let missing: Vec<u64> = (0..10).filter(|k| count(&seen, *k) != 1).collect();
    assert!(
        missing.is_empty(),
        "handed-off keys not processed exactly once (hint store says {h:?}): {missing:?}"
    );
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "c shutdown", c.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// `Outcome::HandedOff`: "replayed ... when the target is back — until the hint TTL";
/// `HintStats::expired`: "Hints dropped because their TTL passed (never returned)".
/// Keyed hints with a 1 s TTL stored by one sender run are recovered by the next run
/// (same hint directory); the target returns 2.5 s after they were stored: none is
/// replayed, all are counted expired, nothing stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_hints_of_a_previous_run_expire_by_their_ttl() {
    let hints_dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(152, any_addr(), &[151], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let cfg = || {
        let mut cfg = handoff_cfg(hints_dir.path());
        let h = cfg.handoff.as_mut().unwrap();
        h.store.max_hint_window = Duration::from_secs(1);
        h.store.default_ttl = Duration::from_secs(1);
        cfg
    };
    let a1 = sender_to(151, 152, addr, cfg()).await;
    let out1 = eo_sender(&a1, 152, EO);
    wait_health(&a1, NodeId(152), Health::Down, 10).await;
    let mut r = Vec::new();
    for k in 0..5u64 {
        r.push((k, keyed(&out1, k, 80_000 + u128::from(k)).await));
    }
    for (k, res) in settle(r, 5).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "key {k}");
    }
    let stored_at = tokio::time::Instant::now();
    within(10, "run 1 shutdown", a1.shutdown()).await;
    drop((out1, a1));
    let a2 = sender_to(151, 152, addr, cfg()).await;
    tokio::time::sleep_until(stored_at + Duration::from_millis(2500)).await;
    let b2 = receiver_at(152, addr, &[151], NodeConfig::default()).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), false);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let delivered: Vec<(u64, u32)> = (0..5)
        .map(|k| (k, count(&seen, k)))
        .filter(|x| x.1 > 0)
        .collect();
    let h = hints(&within(5, "stats", a2.stats()).await.unwrap());
    assert!(
        delivered.is_empty(),
        "hints of the previous run replayed after their TTL: {delivered:?} ({h:?})"
    );
    assert_eq!((h.pending, h.expired), (0, 5), "{h:?}");
    within(10, "a2 shutdown", a2.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}

/// `RawSender::send_many_with_keys` (keys as `send_with_key`: "any two sends with the
/// same key are processed once within the receiver's dedup horizon") and
/// `Outcome::HandedOff` ("replayed, under its original ID"). A batch to a Down target
/// that repeats each key: every receipt `HandedOff`; when the target returns, each key
/// is processed exactly once and the store drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_off_batch_repeating_keys_is_processed_once_per_key() {
    let hints_dir = tempfile::tempdir().unwrap();
    let b = receiver_at(162, any_addr(), &[161], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let a = sender_to(161, 162, addr, handoff_cfg(hints_dir.path())).await;
    let out = a
        .raw_sender(
            NodeId(162),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    wait_health(&a, NodeId(162), Health::Down, 10).await;
    let batch: Vec<(Bytes, IdKey)> = (0..50u128)
        .flat_map(|k| {
            let p = Bytes::from(k.to_le_bytes().to_vec());
            [(p.clone(), IdKey(k)), (p, IdKey(k))]
        })
        .collect();
    let receipts = within(10, "batch", out.send_many_with_keys(batch))
        .await
        .unwrap();
    let receipts: Vec<(u64, Receipt)> = receipts
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i as u64, r))
        .collect();
    for (i, res) in settle(receipts, 10).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "receipt {i}");
    }
    let b2 = receiver_at(162, addr, &[161], NodeConfig::default()).await;
    let ids: Arc<Mutex<HashMap<MessageId, u32>>> = Arc::default();
    {
        let mut inbox = b2.raw_receiver(EO, false).unwrap();
        let ids = ids.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                *ids.lock().unwrap().entry(d.id()).or_default() += 1;
                d.ack();
            }
        });
    }
    wait_hints_drained(&a, 12).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = ids.lock().unwrap().clone();
    let bad: Vec<_> = (0..50u128)
        .map(|k| (k, ids.get(&MessageId::Key(IdKey(k))).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        bad.is_empty(),
        "keys processed other than once (key, times): {bad:?}"
    );
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b2 shutdown", b2.shutdown()).await;
}
