//! Black-box durability tests: hinted handoff with defaults, durable dedup across
//! receiver restarts, damaged on-disk state, configuration limits, dead letters, many
//! peers. Public API only (README.md, crate docs), real TCP on loopback, default
//! configuration unless a test says otherwise. Complements tests/blackbox/acceptance.rs.

use crate::support::ports;
use ackwire::dedup::{DedupConfig, DurableDedup};
use ackwire::detector::Health;
use ackwire::proto::Authorization;
use ackwire::{
    ChannelId, ChannelOptions, DeadLetterReason, Guarantee, HandoffConfig, IdKey, MessageId, Node,
    NodeConfig, NodeError, NodeId, Outcome, Receipt, Receiver, ReceiverOptions, RejectReason,
    SendError,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

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
            *seen.lock().unwrap().entry(*d.message()).or_default() += 1;
            if durable {
                let _ = d.ack_durable().await;
            } else {
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached within {secs} s");
}

async fn wait_health(node: &Node, peer: NodeId, want: Health, secs: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if node.health(peer) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{peer} never became {want:?} (is {:?})", node.health(peer));
}

fn count(seen: &Seen, v: u64) -> u32 {
    seen.lock().unwrap().get(&v).copied().unwrap_or(0)
}

fn handoff_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.handoff = Some(HandoffConfig::new(dir));
    c
}

async fn receiver_at(id: u64, addr: SocketAddr, allow: &[u64], cfg: NodeConfig) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(addr).config(cfg);
    for p in allow {
        b = b.allow_peer(NodeId(*p));
    }
    b.build().await.expect("receiver builds")
}

async fn sender_to(
    id: u64,
    peer: u64,
    addr: SocketAddr,
    cfg: NodeConfig,
) -> Result<Node, NodeError> {
    Node::builder(NodeId(id))
        .bind(any_addr())
        .peer(NodeId(peer), addr)
        .config(cfg)
        .build()
        .await
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

// -------------------------------------------------------------------------------------
// Scenario 1: hinted handoff with defaults
// -------------------------------------------------------------------------------------

const EO: ChannelId = ChannelId(1);
const ALO: ChannelId = ChannelId(2);

async fn target_node(id: u64, addr: SocketAddr, allow: u64, eo: &Seen, alo: &Seen) -> Node {
    let b = receiver_at(id, addr, &[allow], NodeConfig::default()).await;
    consume(b.receiver(EO, false).unwrap(), eo.clone(), false);
    consume(b.receiver(ALO, false).unwrap(), alo.clone(), false);
    b
}

/// The target shuts down; sends of both acked guarantees resolve `HandedOff` once it is
/// Down (stats count them); the sender restarts on the same hint directory while the
/// target is away; the target returns on the same address and id; every hint is
/// replayed by the new sender run: effectively-once exactly once, at-least-once at least
/// once; the hint store ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_handoff_defaults_sender_restart_target_returns() {
    const N: u64 = 30;
    let hints = tempfile::tempdir().unwrap();
    let eo: Seen = Arc::default();
    let alo: Seen = Arc::default();
    let b = target_node(12, any_addr(), 11, &eo, &alo).await;
    let addr = b.local_addr().unwrap();
    let a = sender_to(11, 12, addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let out_eo = a
        .sender::<u64>(
            NodeId(12),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let out_alo = a
        .sender::<u64>(NodeId(12), ChannelOptions::new(ALO, Guarantee::AtLeastOnce))
        .unwrap();
    assert_eq!(
        within(10, "first eo", out_eo.send(&0).await.unwrap()).await,
        Ok(Outcome::Acked)
    );
    assert_eq!(
        within(10, "first alo", out_alo.send(&0).await.unwrap()).await,
        Ok(Outcome::Acked)
    );

    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    wait_health(&a, NodeId(12), Health::Down, 15).await;

    let mut r = Vec::new();
    for v in 1..=N {
        r.push((
            v,
            out_eo
                .send(&v)
                .await
                .expect("send to a Down target with handoff"),
        ));
        r.push((
            1000 + v,
            out_alo
                .send(&v)
                .await
                .expect("send to a Down target with handoff"),
        ));
    }
    for (v, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "message {v}");
    }
    let st = a.stats().await.unwrap();
    let h = st.hints.expect("hint stats with handoff on");
    assert!(
        st.handed_off >= 2 * N,
        "handed_off {} < {}",
        st.handed_off,
        2 * N
    );
    assert!(h.stored >= 2 * N, "{h:?}");
    assert_eq!(h.pending, 2 * N, "{h:?}");

    // The sender restarts on the same hint directory while the target is still away.
    within(15, "sender shutdown", a.shutdown()).await;
    drop((out_eo, out_alo, a));
    let a2 = sender_to(11, 12, addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let h2 = a2.stats().await.unwrap().hints.unwrap();
    assert_eq!(
        h2.pending,
        2 * N,
        "the restarted sender recovered its hints: {h2:?}"
    );

    // The target comes back on the same address and id.
    let _b2 = target_node(12, addr, 11, &eo, &alo).await;
    wait_until(15, "every hint replayed", || {
        (1..=N).all(|v| count(&eo, v) >= 1 && count(&alo, v) >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for v in 0..=N {
        assert_eq!(count(&eo, v), 1, "effectively-once message {v}");
        assert!(count(&alo, v) >= 1, "at-least-once message {v}");
    }
    let h3 = a2.stats().await.unwrap().hints.unwrap();
    assert_eq!(h3.pending, 0, "{h3:?}");
    assert!(h3.delivered >= 2 * N, "{h3:?}");
    a2.shutdown().await;
}

/// With defaults (handoff on_give_up), messages whose deadline passes while the
/// target is unreachable but not yet Down resolve HandedOff (not Deadline), and are
/// delivered once the target returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_in_flight_at_crash_are_handed_off_and_replayed_once() {
    const N: u64 = 40;
    let hints = tempfile::tempdir().unwrap();
    let eo: Seen = Arc::default();
    let alo: Seen = Arc::default();
    let b = target_node(14, any_addr(), 13, &eo, &alo).await;
    let addr = b.local_addr().unwrap();
    let a = sender_to(13, 14, addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let out_eo = a
        .sender::<u64>(
            NodeId(14),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    assert_eq!(
        within(10, "first", out_eo.send(&0).await.unwrap()).await,
        Ok(Outcome::Acked)
    );
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    // Sent immediately: the detector does not hold the target Down yet.
    let mut r = Vec::new();
    for v in 1..=N {
        r.push((v, out_eo.send(&v).await.unwrap()));
    }
    let res = settle(r, 15).await;
    for (v, x) in &res {
        assert_eq!(*x, Ok(Outcome::HandedOff), "message {v}");
    }
    let _b2 = target_node(14, addr, 13, &eo, &alo).await;
    wait_until(15, "replayed", || (1..=N).all(|v| count(&eo, v) >= 1)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for v in 0..=N {
        assert_eq!(count(&eo, v), 1, "message {v}");
    }
    let h = a.stats().await.unwrap().hints.unwrap();
    assert_eq!(h.pending, 0, "{h:?}");
}

// -------------------------------------------------------------------------------------
// Scenario 2: durable dedup across a receiver restart
// -------------------------------------------------------------------------------------

fn durable_cfg(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.dedup.durable = Some(DurableDedup::new(dir));
    c
}

/// A node on its own runtime, killable hard (every task dropped at once).
struct Killable {
    rt: Option<tokio::runtime::Runtime>,
    node: Option<Node>,
}

impl Killable {
    async fn start(
        id: u64,
        addr: SocketAddr,
        allow: u64,
        cfg: NodeConfig,
        seen: Seen,
        processed: Arc<tokio::sync::Notify>,
        kill_after: usize,
    ) -> Killable {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let node = rt
            .spawn(async move {
                let node = receiver_at(id, addr, &[allow], cfg).await;
                let mut inbox = node.receiver::<u64>(EO, false).unwrap();
                tokio::spawn(async move {
                    let mut n = 0;
                    while let Some(d) = inbox.recv().await {
                        *seen.lock().unwrap().entry(*d.message()).or_default() += 1;
                        d.ack_durable().await.expect("ack_durable");
                        n += 1;
                        if n == kill_after {
                            processed.notify_one();
                            // Stop handling: the test kills this run now.
                            std::future::pending::<()>().await;
                        }
                    }
                });
                node
            })
            .await
            .unwrap();
        Killable {
            rt: Some(rt),
            node: Some(node),
        }
    }
    fn addr(&self) -> SocketAddr {
        self.node.as_ref().unwrap().local_addr().unwrap()
    }
    fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        drop(self.node.take());
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The receiver (durable dedup, handler using `ack_durable`) is killed hard right after
/// processing K messages; a new run on the same dedup directory and address gets the
/// sender's retransmissions. No message is processed twice; every receipt is Acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_durable_dedup_receiver_killed_after_ack_durable() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let killed = Arc::new(tokio::sync::Notify::new());
    let b1 = Killable::start(
        22,
        any_addr(),
        21,
        durable_cfg(dir.path()),
        seen.clone(),
        killed.clone(),
        60,
    )
    .await;
    let addr = b1.addr();
    let a = sender_to(21, 22, addr, NodeConfig::default())
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(22),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut r = Vec::new();
    for v in 0..N {
        r.push((v, out.send(&v).await.unwrap()));
    }
    within(10, "60 processed", killed.notified()).await;
    b1.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let never = Arc::new(tokio::sync::Notify::new());
    let b2 = Killable::start(
        22,
        addr,
        21,
        durable_cfg(dir.path()),
        seen.clone(),
        never,
        usize::MAX,
    )
    .await;
    for (v, res) in settle(r, 20).await {
        assert_eq!(res, Ok(Outcome::Acked), "message {v}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let twice: Vec<(u64, u32)> = (0..N)
        .map(|v| (v, count(&seen, v)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        twice.is_empty(),
        "processed other than once (value, times): {twice:?}"
    );
    drop(b2);
}

/// Graceful restart: keys processed (plain `ack`) before a clean shutdown are
/// recognised after it when a new sender run resends them under the same `IdKey`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_durable_dedup_keys_survive_clean_restart() {
    const N: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(24, any_addr(), &[23], durable_cfg(dir.path())).await;
    let addr = b.local_addr().unwrap();
    consume(b.receiver(EO, false).unwrap(), seen.clone(), false);
    let a = sender_to(23, 24, addr, NodeConfig::default())
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(24),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut r = Vec::new();
    for v in 0..N {
        r.push((
            v,
            out.send_with_key(&v, IdKey(0xD0_0000 + v as u128))
                .await
                .unwrap(),
        ));
    }
    for (v, res) in settle(r, 15).await {
        assert_eq!(res, Ok(Outcome::Acked), "message {v}");
    }
    within(10, "receiver shutdown", b.shutdown()).await;
    drop(b);
    let b2 = receiver_at(24, addr, &[23], durable_cfg(dir.path())).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), false);
    let mut r = Vec::new();
    for v in 0..N {
        r.push((
            v,
            out.send_with_key(&v, IdKey(0xD0_0000 + v as u128))
                .await
                .unwrap(),
        ));
    }
    for (v, res) in settle(r, 15).await {
        assert_eq!(res, Ok(Outcome::Acked), "resend {v}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for v in 0..N {
        assert_eq!(count(&seen, v), 1, "key of message {v}");
    }
    let st = b2.stats().await.unwrap();
    assert!(st.dedup.duplicates >= N, "{:?}", st.dedup);
}

// -------------------------------------------------------------------------------------
// Scenario 3: damaged on-disk state
// -------------------------------------------------------------------------------------

/// Build a receiver on a damaged dedup dir in a spawned task: must not panic; returns
/// the build result.
async fn build_on(dir: &Path, addr: SocketAddr) -> Result<Node, String> {
    let cfg = durable_cfg(dir);
    let h = tokio::spawn(async move {
        Node::builder(NodeId(32))
            .bind(addr)
            .allow_peer(NodeId(31))
            .config(cfg)
            .build()
            .await
    });
    match within(10, "build on damaged state", h).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => panic!("build panicked: {e}"),
    }
}

/// dedup.log damaged in three ways between runs: a torn tail, a garbage tail, a bad
/// header. A torn/garbage tail: the node starts, and every key whose record precedes the
/// damage is still a duplicate. A bad header: a typed error, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_damaged_dedup_log() {
    const N: u64 = 40;
    for damage in ["truncate", "garbage_tail", "flip_middle", "header"] {
        let dir = tempfile::tempdir().unwrap();
        let seen: Seen = Arc::default();
        let b = receiver_at(32, any_addr(), &[31], durable_cfg(dir.path())).await;
        let addr = b.local_addr().unwrap();
        consume(b.receiver(EO, false).unwrap(), seen.clone(), true);
        let a = sender_to(31, 32, addr, NodeConfig::default())
            .await
            .unwrap();
        let out = a
            .sender::<u64>(
                NodeId(32),
                ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
            )
            .unwrap();
        for v in 0..N {
            let r = out
                .send_with_key(&v, IdKey(0xE0_0000 + v as u128))
                .await
                .unwrap();
            assert_eq!(within(10, "send", r).await, Ok(Outcome::Acked));
        }
        within(10, "shutdown", b.shutdown()).await;
        drop(b);
        let log = dir.path().join("dedup.log");
        let bytes = std::fs::read(&log).expect("dedup.log exists in the durable dir");
        let len = bytes.len();
        match damage {
            "truncate" => {
                std::fs::write(&log, &bytes[..len - 3]).unwrap();
            }
            "garbage_tail" => {
                let mut b2 = bytes.clone();
                b2.extend_from_slice(&[0xAB; 37]);
                std::fs::write(&log, b2).unwrap();
            }
            "flip_middle" => {
                let mut b2 = bytes.clone();
                b2[len / 2] ^= 0xFF;
                std::fs::write(&log, b2).unwrap();
            }
            _ => {
                let mut b2 = bytes.clone();
                for x in b2.iter_mut().take(8) {
                    *x ^= 0x5A;
                }
                std::fs::write(&log, b2).unwrap();
            }
        }
        match build_on(dir.path(), addr).await {
            Ok(b2) => {
                assert_ne!(
                    damage, "header",
                    "a bad header must be a typed error (DedupError::BadHeader), the node started"
                );
                consume(b2.receiver(EO, false).unwrap(), seen.clone(), true);
                // Resend every key: all but (for a torn tail) the last one are duplicates.
                for v in 0..N {
                    let r = out
                        .send_with_key(&v, IdKey(0xE0_0000 + v as u128))
                        .await
                        .unwrap();
                    assert_eq!(
                        within(10, "resend", r).await,
                        Ok(Outcome::Acked),
                        "{damage}: {v}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let again: Vec<u64> = (0..N).filter(|v| count(&seen, *v) > 1).collect();
                let allowed = if damage == "truncate" || damage == "flip_middle" {
                    1
                } else {
                    0
                };
                eprintln!(
                    "s3 dedup {damage}: processed again {again:?}; {:?}",
                    b2.stats().await.unwrap().dedup
                );
                assert!(
                    again.len() <= allowed
                        && (damage == "flip_middle" || again.iter().all(|v| *v == N - 1)),
                    "{damage}: processed again after restart: {again:?} (stats {:?})",
                    b2.stats().await.unwrap().dedup
                );
                b2.shutdown().await;
            }
            Err(e) => {
                assert_eq!(damage, "header", "{damage}: the node refused to start: {e}");
                assert!(
                    e.to_lowercase().contains("header") || e.contains("dedup"),
                    "untyped/unclear error: {e}"
                );
            }
        }
        a.shutdown().await;
    }
}

/// Hint segment files damaged while the sender is down: a flipped byte inside a record,
/// a torn tail, a garbage file header. The restarted sender starts (no panic, no
/// error), replays every intact hint exactly once (effectively-once) and counts the
/// damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_damaged_hint_segments() {
    const N: u64 = 30;
    for damage in ["flip", "truncate", "header"] {
        let hints = tempfile::tempdir().unwrap();
        let eo: Seen = Arc::default();
        let alo: Seen = Arc::default();
        let b = target_node(34, any_addr(), 33, &eo, &alo).await;
        let addr = b.local_addr().unwrap();
        let a = sender_to(33, 34, addr, handoff_cfg(hints.path()))
            .await
            .unwrap();
        let out = a
            .sender::<u64>(
                NodeId(34),
                ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
            )
            .unwrap();
        assert_eq!(
            within(10, "first", out.send(&0).await.unwrap()).await,
            Ok(Outcome::Acked)
        );
        within(10, "target down", b.shutdown()).await;
        drop(b);
        wait_health(&a, NodeId(34), Health::Down, 15).await;
        let mut r = Vec::new();
        for v in 1..=N {
            r.push((v, out.send(&v).await.unwrap()));
        }
        for (v, res) in settle(r, 10).await {
            assert_eq!(res, Ok(Outcome::HandedOff), "{v}");
        }
        within(15, "sender shutdown", a.shutdown()).await;
        drop((out, a));
        let files = files_under(hints.path());
        let seg = files
            .iter()
            .filter(|p| std::fs::metadata(p).map(|m| m.len() > 64).unwrap_or(false))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap_or_else(|| panic!("no segment file under the hint dir: {files:?}"))
            .clone();
        let bytes = std::fs::read(&seg).unwrap();
        let len = bytes.len();
        let mut d = bytes.clone();
        match damage {
            "flip" => d[len / 2] ^= 0xFF,
            "truncate" => d.truncate(len - 5),
            _ => {
                for x in d.iter_mut().take(6) {
                    *x ^= 0x77;
                }
            }
        }
        std::fs::write(&seg, d).unwrap();
        let cfg = handoff_cfg(hints.path());
        let h = tokio::spawn(async move { sender_to(33, 34, addr, cfg).await });
        let a2 = match within(10, "restart on damaged hints", h).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("{damage}: sender refused to start on damaged hints: {e}"),
            Err(e) => panic!("{damage}: build panicked: {e}"),
        };
        let hs = a2.stats().await.unwrap().hints.unwrap();
        let lost_max = match damage {
            "flip" => 1,
            "truncate" => 1,
            _ => N,
        };
        assert!(
            hs.pending + lost_max >= N,
            "{damage}: lost more than documented: {hs:?}"
        );
        match damage {
            "flip" => assert!(
                hs.corrupt_skipped >= 1 || hs.pending == N,
                "{damage}: {hs:?}"
            ),
            "truncate" => assert!(hs.torn_tail_truncated >= 1, "{damage}: {hs:?}"),
            _ => assert!(hs.segments_quarantined >= 1, "{damage}: {hs:?}"),
        }
        let _b2 = target_node(34, addr, 33, &eo, &alo).await;
        let pending = hs.pending;
        wait_until(15, "replay", || eo.lock().unwrap().len() as u64 > pending).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        for v in 0..=N {
            assert!(
                count(&eo, v) <= 1,
                "{damage}: message {v} processed {} times",
                count(&eo, v)
            );
        }
        let hs2 = a2.stats().await.unwrap().hints.unwrap();
        assert_eq!(hs2.pending, 0, "{damage}: {hs2:?}");
        eprintln!("s3 hints {damage}: recovered {pending} of {N}; {hs:?}");
        a2.shutdown().await;
    }
}

/// A damaged durable dead-letter log: the node starts (or refuses with a typed error),
/// never panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_damaged_dead_letter_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = NodeConfig::default();
        c.dead_letter_dir = Some(dir.path().to_path_buf());
        c
    };
    let b = receiver_at(36, any_addr(), &[35], cfg()).await;
    let addr = b.local_addr().unwrap();
    let mut inbox = b
        .receiver_with::<u64>(EO, ReceiverOptions::default().max_deliveries(Some(1)))
        .unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.nack();
        }
    });
    let a = sender_to(35, 36, addr, NodeConfig::default())
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(36),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    for v in 0..3u64 {
        let r = within(10, "dead letter", out.send(&v).await.unwrap()).await;
        assert_eq!(
            r,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            })
        );
    }
    b.shutdown().await;
    drop(b);
    let files = files_under(dir.path());
    assert!(!files.is_empty(), "dead_letter_dir holds no file");
    for f in &files {
        let mut d = std::fs::read(f).unwrap();
        let n = d.len();
        if n > 20 {
            d[n - 10] ^= 0xFF;
        }
        std::fs::write(f, d).unwrap();
    }
    let c = cfg();
    let h = tokio::spawn(async move {
        Node::builder(NodeId(36))
            .bind(addr)
            .allow_peer(NodeId(35))
            .config(c)
            .build()
            .await
    });
    match within(10, "restart", h).await {
        Ok(Ok(b2)) => {
            let mut dl = b2.dead_letters();
            let mut got = 0;
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(300), dl.recv()).await
            {
                got += 1;
            }
            assert!(
                (2..=3).contains(&got),
                "letters reloaded after one damaged record: {got}"
            );
            b2.shutdown().await;
        }
        Ok(Err(e)) => eprintln!("s3 dead letters: refused with typed error {e:?}"),
        Err(e) => panic!("build panicked on a damaged dead-letter log: {e}"),
    }
    a.shutdown().await;
}

// -------------------------------------------------------------------------------------
// Scenario 4: configuration
// -------------------------------------------------------------------------------------

/// Every documented default is what `Default` returns.
#[test]
fn s4_documented_defaults() {
    let c = NodeConfig::default();
    assert_eq!(c.max_payload, 4 << 20);
    assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
    assert_eq!(c.shutdown_drain, Duration::from_secs(5));
    assert!(c.handoff.is_none());
    assert!(!c.allow_dynamic_peers);
    assert!(c.fail_fast_when_down);
    assert_eq!(c.dead_letter_capacity, 10_000);
    assert!(c.dead_letter_dir.is_none());
    assert_eq!(c.authorization, Authorization::default());
    let d = &c.dedup;
    assert_eq!(d.window, 8192);
    assert_eq!(d.max_streams, 16_384);
    assert_eq!(d.table_budget_bytes, 256 << 20);
    assert_eq!(d.horizon, Duration::from_secs(120));
    assert_eq!(d.retention, Duration::from_secs(24 * 3600));
    assert!(d.durable.is_none());
    assert_eq!(DedupConfig::default(), c.dedup);
    let p = &c.proto;
    assert_eq!(p.stream_credit, 4096);
    assert_eq!(p.node_credit, 16_384);
    assert_eq!(p.max_in_flight, 4096);
    assert_eq!(p.no_receiver_grace, Duration::from_secs(5));
    assert_eq!(p.retry.deadline, Some(Duration::from_secs(30)));
    let h = HandoffConfig::new("/tmp/x");
    assert!(h.on_give_up && h.on_down);
    assert_eq!(h.replay_bytes_per_sec, 16 << 20);
    assert_eq!(h.replay_burst, 1 << 20);
    assert_eq!(h.replay_concurrency, 1024);
    assert_eq!(h.replay_batch_bytes, 256 << 10);
    assert_eq!(h.store.segment_bytes, 16 << 20);
    assert_eq!(
        h.store.fsync,
        ackwire::handoff::FsyncPolicy::Every(Duration::from_millis(10))
    );
    assert_eq!(h.store.default_ttl, Duration::from_secs(6 * 3600));
    assert_eq!(h.store.max_hint_window, Duration::from_secs(3 * 3600));
    assert_eq!(h.store.max_bytes_per_target, 1 << 30);
    assert_eq!(h.store.max_total_bytes, 4 << 30);
    let dd = DurableDedup::new("/tmp/y");
    assert_eq!(dd.fsync, ackwire::dedup::FsyncPolicy::Always);
    assert_eq!(dd.compact_after_bytes, 64 << 20);
    let r = ReceiverOptions::default();
    assert!(!r.ordered && r.type_check);
    assert_eq!(r.max_deliveries, Some(20));
    // Defaults validate.
    c.validate().unwrap();
}

/// Values at and just beyond every documented limit: at the limit builds, beyond it
/// `build()` returns a typed error naming the field, within a second, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_limits_are_typed_errors_at_build() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = Box<dyn Fn(&mut NodeConfig) + Send>;
    let bad: Vec<(&str, &str, Edit)> = vec![
        (
            "heartbeat 0",
            "heartbeat",
            Box::new(|c| c.heartbeat_interval = Duration::ZERO),
        ),
        (
            "heartbeat > 1h",
            "heartbeat",
            Box::new(|c| {
                c.heartbeat_interval = Duration::from_secs(3600) + Duration::from_nanos(1)
            }),
        ),
        (
            "max_payload 0",
            "max_payload",
            Box::new(|c| c.max_payload = 0),
        ),
        (
            "max_payload > tcp frame",
            "max_payload",
            Box::new(|c| c.max_payload = NodeConfig::MAX_PAYLOAD),
        ),
        (
            "dead_letter_capacity 2^24+1",
            "dead_letter",
            Box::new(|c| c.dead_letter_capacity = (1 << 24) + 1),
        ),
        (
            "dedup.window < max_in_flight",
            "window",
            Box::new(|c| c.dedup.window = 64),
        ),
        (
            "dedup.window 2^24+1",
            "window",
            Box::new(|c| c.dedup.window = (1 << 24) + 1),
        ),
        (
            "dedup.horizon 0",
            "horizon",
            Box::new(|c| c.dedup.horizon = Duration::ZERO),
        ),
        (
            "dedup.retention 0",
            "retention",
            Box::new(|c| c.dedup.retention = Duration::ZERO),
        ),
        (
            "dedup.max_streams 0",
            "max_streams",
            Box::new(|c| c.dedup.max_streams = 0),
        ),
        (
            "durable fsync Every",
            "fsync",
            Box::new(|c| {
                c.dedup.durable = Some(DurableDedup {
                    fsync: ackwire::dedup::FsyncPolicy::Every(Duration::from_millis(5)),
                    ..DurableDedup::new("/tmp/never-created-ackwire")
                })
            }),
        ),
        (
            "detector max_samples 65537",
            "max_samples",
            Box::new(|c| c.detector.max_samples = (1 << 16) + 1),
        ),
        (
            "proto.stream_credit 255",
            "stream_credit",
            Box::new(|c| c.proto.stream_credit = 255),
        ),
    ];
    let d = dir.path().to_path_buf();
    let handoff_bad: Vec<(&str, &str, Edit)> = vec![
        (
            "ttl < window",
            "ttl",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.default_ttl = Duration::from_secs(60);
                    h.store.max_hint_window = Duration::from_secs(120);
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "ttl 0",
            "ttl",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.default_ttl = Duration::ZERO;
                    h.store.max_hint_window = Duration::ZERO;
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "fsync Every(0)",
            "",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.fsync = ackwire::handoff::FsyncPolicy::Every(Duration::ZERO);
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "fsync Every(>1h)",
            "",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.fsync = ackwire::handoff::FsyncPolicy::Every(Duration::from_secs(3601));
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "segment 4095",
            "segment",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.segment_bytes = 4095;
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "per target < segment",
            "",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.max_bytes_per_target = h.store.segment_bytes - 1;
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "total < per target",
            "",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.max_total_bytes = h.store.max_bytes_per_target - 1;
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "ttl > 10y",
            "",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.store.default_ttl = HandoffConfig::MAX_TTL + Duration::from_secs(1);
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "replay_concurrency 0",
            "replay_concurrency",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.replay_concurrency = 0;
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "replay_concurrency 2^20+1",
            "replay_concurrency",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.replay_concurrency = (1 << 20) + 1;
                    c.handoff = Some(h);
                }
            }),
        ),
        (
            "replay_bytes_per_sec 0",
            "replay",
            Box::new({
                let d = d.clone();
                move |c| {
                    let mut h = HandoffConfig::new(&d);
                    h.replay_bytes_per_sec = 0;
                    c.handoff = Some(h);
                }
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (name, field, edit) in bad.into_iter().chain(handoff_bad) {
        let mut c = NodeConfig::default();
        edit(&mut c);
        let h = tokio::spawn(async move {
            Node::builder(NodeId(41))
                .bind(any_addr())
                .config(c)
                .build()
                .await
        });
        match tokio::time::timeout(Duration::from_secs(3), h).await {
            Err(_) => failures.push(format!("{name}: build hung")),
            Ok(Err(e)) => failures.push(format!("{name}: build panicked: {e}")),
            Ok(Ok(Ok(n))) => {
                failures.push(format!("{name}: accepted"));
                n.shutdown().await;
            }
            Ok(Ok(Err(e))) => {
                let s = e.to_string();
                if !matches!(
                    e,
                    NodeError::Config(_) | NodeError::Dedup(_) | NodeError::Handoff(_)
                ) {
                    failures.push(format!("{name}: untyped error {e:?}"));
                } else if !s.to_lowercase().contains(field) {
                    failures.push(format!("{name}: error does not name `{field}`: {s}"));
                }
            }
        }
    }
    // At the limits: accepted.
    let mut c = NodeConfig::default();
    c.heartbeat_interval = Duration::from_secs(3600);
    c.dead_letter_capacity = 1 << 24;
    c.shutdown_drain = Duration::MAX;
    c.proto.stream_credit = 256;
    c.detector.max_samples = 1 << 16;
    let mut h = HandoffConfig::new(dir.path());
    h.store.default_ttl = HandoffConfig::MAX_TTL;
    h.store.max_hint_window = HandoffConfig::MAX_TTL;
    h.replay_concurrency = 1 << 20;
    c.handoff = Some(h);
    match within(
        5,
        "build at limits",
        Node::builder(NodeId(42)).bind(any_addr()).config(c).build(),
    )
    .await
    {
        Ok(n) => {
            let out = n.sender::<u64>(NodeId(42), ChannelOptions::new(EO, Guarantee::AtLeastOnce));
            assert!(matches!(out, Err(NodeError::SelfPeer(_))), "{out:?}");
            // A Duration::MAX deadline is documented as accepted.
            n.add_peer(NodeId(43), "127.0.0.1:9".parse().unwrap());
            let mut o = ChannelOptions::new(EO, Guarantee::AtLeastOnce);
            o.deadline = Some(Duration::MAX);
            let s = n.sender::<u64>(NodeId(43), o);
            if let Err(e) = s {
                failures.push(format!("deadline Duration::MAX refused: {e}"));
            }
            drop(n);
        }
        Err(e) => failures.push(format!("values at the limits refused: {e}")),
    }
    assert!(
        failures.is_empty(),
        "config limit violations:\n{}",
        failures.join("\n")
    );
}

/// serde: an empty file is the default; unknown keys and bad values are clear errors.
#[test]
fn s4_serde_config() {
    let empty: NodeConfig = toml::from_str("").unwrap();
    assert_eq!(format!("{empty:?}"), format!("{:?}", NodeConfig::default()));
    let c: NodeConfig =
        toml::from_str("heartbeat_interval = \"500ms\"\n[dedup]\nhorizon = \"5m\"\n").unwrap();
    assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
    assert_eq!(c.dedup.horizon, Duration::from_secs(300));
    assert_eq!(c.dedup.window, 8192, "unnamed keys keep their defaults");
    // A handoff section naming only the dir takes every other default.
    let c: NodeConfig = toml::from_str("[handoff.store]\ndir = \"/var/hints\"\n").unwrap();
    let h = c.handoff.expect("handoff section parsed");
    let mut want = HandoffConfig::new("/var/hints");
    want.store.dir = "/var/hints".into();
    assert_eq!(format!("{h:?}"), format!("{want:?}"));
    let c: NodeConfig = toml::from_str("[dedup.durable]\ndir = \"/var/dedup\"\n").unwrap();
    assert_eq!(c.dedup.durable, Some(DurableDedup::new("/var/dedup")));
    for (src, needle) in [
        ("heartbeat_intervall = \"1s\"", "heartbeat_intervall"),
        ("[dedup]\nhorizont = \"1s\"", "horizont"),
        ("[handoff.store]\ndir = \"/x\"\nttl = \"1s\"", "ttl"),
        ("[dedup.durable]\ndir = \"/x\"\nfsink = \"Always\"", "fsink"),
        ("heartbeat_interval = \"5 parsecs\"", "heartbeat_interval"),
        ("heartbeat_interval = 5", "heartbeat_interval"),
        ("dead_letter_capacity = -1", "dead_letter_capacity"),
        ("max_payload = \"big\"", "max_payload"),
        (
            "[handoff]\nreplay_concurency = 4\n[handoff.store]\ndir = \"/x\"",
            "replay_concurency",
        ),
        ("[proto.retry]\ndeadlin = \"1s\"", "deadlin"),
        ("[authorization]\nrelays = 1", "relays"),
    ] {
        match toml::from_str::<NodeConfig>(src) {
            Ok(c) => panic!("accepted {src:?}: {c:?}"),
            Err(e) => {
                let m = e.to_string();
                assert!(
                    m.contains(needle),
                    "error for {src:?} does not name `{needle}`: {m}"
                );
            }
        }
    }
}

// -------------------------------------------------------------------------------------
// Scenario 5: dead letters
// -------------------------------------------------------------------------------------

/// A message nacked on every delivery, default `max_deliveries` (20): it is handed out
/// exactly 20 times, becomes exactly one dead letter with its id, sender, channel,
/// delivery count, reason and payload; the receipt fails with `DeadLettered`. Another
/// message on the same channel is still processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_dead_letter_with_defaults() {
    let b = receiver_at(52, any_addr(), &[51], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let mut dl = b.dead_letters();
    #[allow(clippy::type_complexity)]
    let deliveries: Arc<Mutex<HashMap<u64, (u32, Option<MessageId>)>>> = Arc::default();
    for ch in [EO, ALO] {
        let mut inbox = b.receiver::<u64>(ch, false).unwrap();
        let d2 = deliveries.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                let v = *d.message();
                {
                    let mut m = d2.lock().unwrap();
                    let e = m.entry(v).or_default();
                    e.0 += 1;
                    e.1 = Some(d.id());
                }
                if v % 2 == 1 {
                    if v == 3 {
                        drop(d)
                    } else {
                        d.nack()
                    }
                } else {
                    d.ack();
                }
            }
        });
    }
    let a = sender_to(51, 52, addr, NodeConfig::default())
        .await
        .unwrap();
    let eo = a
        .sender::<u64>(
            NodeId(52),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let alo = a
        .sender::<u64>(NodeId(52), ChannelOptions::new(ALO, Guarantee::AtLeastOnce))
        .unwrap();
    let r1 = eo.send(&1).await.unwrap(); // nacked
    let r2 = eo.send(&2).await.unwrap(); // acked
    let r3 = alo.send(&3).await.unwrap(); // dropped
    let res = settle(vec![(1, r1), (2, r2), (3, r3)], 18).await;
    assert_eq!(
        res[0].1,
        Err(SendError::Rejected {
            reason: RejectReason::DeadLettered
        })
    );
    assert_eq!(res[1].1, Ok(Outcome::Acked));
    assert_eq!(
        res[2].1,
        Err(SendError::Rejected {
            reason: RejectReason::DeadLettered
        })
    );
    let mut letters = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(700), dl.recv()).await {
        letters.push(l);
    }
    assert_eq!(letters.len(), 2, "{letters:?}");
    let m = deliveries.lock().unwrap().clone();
    for (v, ch) in [(1u64, EO), (3u64, ALO)] {
        let l = letters
            .iter()
            .find(|l| l.channel == ch)
            .unwrap_or_else(|| panic!("no letter on {ch:?}"));
        assert_eq!(l.reason, DeadLetterReason::MaxDeliveries);
        assert_eq!(l.deliveries, 20, "letter {v}");
        assert_eq!(m[&v].0, 20, "message {v} handed out {} times", m[&v].0);
        assert_eq!(Some(l.id), m[&v].1);
        assert_eq!(l.from, a.origin());
        // bincode's varint encoding of a small u64 is the byte itself.
        assert_eq!(l.message.as_ref(), &[v as u8], "payload of letter {v}");
    }
    assert_eq!(m[&2].0, 1);
    // Nothing more: never delivered again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(deliveries.lock().unwrap()[&1].0, 20);
    assert!(dl.try_recv().is_none());
}

/// Dead letters kept in `dead_letter_dir` come back after a restart if not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_durable_dead_letters_reloaded_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = NodeConfig::default();
        c.dead_letter_dir = Some(dir.path().to_path_buf());
        c
    };
    let b = receiver_at(54, any_addr(), &[53], cfg()).await;
    let addr = b.local_addr().unwrap();
    let mut inbox = b
        .receiver_with::<u64>(EO, ReceiverOptions::default().max_deliveries(Some(2)))
        .unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.nack();
        }
    });
    let a = sender_to(53, 54, addr, NodeConfig::default())
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(54),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut ids = Vec::new();
    for v in 10..14u64 {
        let r = within(10, "dead letter", out.send(&v).await.unwrap()).await;
        assert_eq!(
            r,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            }),
            "{v}"
        );
        ids.push(v);
    }
    // Take one before the restart: it must not come back (taken letters leave the log).
    let mut dl = b.dead_letters();
    let first = within(5, "first letter", dl.recv()).await.unwrap();
    drop(dl);
    b.shutdown().await;
    drop(b);
    let b2 = receiver_at(54, addr, &[53], cfg()).await;
    let mut dl = b2.dead_letters();
    let mut got = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(500), dl.recv()).await {
        got.push(l);
    }
    assert_eq!(
        got.len(),
        3,
        "reloaded letters: {got:?} (taken before: {first:?})"
    );
    for l in &got {
        assert_eq!(l.deliveries, 2);
        assert_eq!(l.reason, DeadLetterReason::MaxDeliveries);
        assert_ne!(l.id, first.id, "a taken letter came back");
    }
    b2.shutdown().await;
    a.shutdown().await;
}

/// `NodeConfig::dead_letter_dir`: "a restarted node finds the letters it had not
/// handed out yet". A `DeadLetters` handle kept from the stopped run may still drain
/// the letters left in its memory, but the stopped node's log is closed: taking them
/// there writes nothing into the directory the next run has open. (Regression: it
/// marked them in the log the next run had open, so letters that run never handed
/// out were gone after its restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_an_old_dead_letters_handle_does_not_touch_the_next_runs_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = NodeConfig::default();
        c.dead_letter_dir = Some(dir.path().to_path_buf());
        c
    };
    let b = receiver_at(56, any_addr(), &[55], cfg()).await;
    let addr = b.local_addr().unwrap();
    let mut inbox = b
        .receiver_with::<u64>(EO, ReceiverOptions::default().max_deliveries(Some(1)))
        .unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.nack();
        }
    });
    let a = sender_to(55, 56, addr, NodeConfig::default())
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(56),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    for v in 0..3u64 {
        let r = within(10, "dead letter", out.send(&v).await.unwrap()).await;
        assert!(matches!(r, Err(SendError::Rejected { .. })), "{r:?}");
    }
    let mut old = b.dead_letters();
    b.shutdown().await;
    drop(b);
    let b2 = receiver_at(56, addr, &[55], cfg()).await;
    // The old handle drains its run's memory: the three letters, then the end.
    let mut old_taken = Vec::new();
    while let Some(l) = within(5, "old handle", old.recv()).await {
        old_taken.push(l.id);
    }
    assert_eq!(old_taken.len(), 3);
    old_taken.sort();
    // The new run hands out none of them and stops: they stay in the log...
    b2.shutdown().await;
    drop(b2);
    // ...for the run after it, which takes them for good.
    let b3 = receiver_at(56, addr, &[55], cfg()).await;
    let mut dl = b3.dead_letters();
    let mut got = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(500), dl.recv()).await {
        got.push(l.id);
    }
    got.sort();
    assert_eq!(
        got, old_taken,
        "letters no run after the stopped one handed out"
    );
    b3.shutdown().await;
    drop((dl, b3));
    let b4 = receiver_at(56, addr, &[55], cfg()).await;
    let left = tokio::time::timeout(Duration::from_millis(500), b4.dead_letters().recv()).await;
    assert!(left.is_err(), "a taken letter came back: {left:?}");
    b4.shutdown().await;
    a.shutdown().await;
}

// -------------------------------------------------------------------------------------
// Scenario 6: many peers and streams
// -------------------------------------------------------------------------------------

/// One receiver, 20 sender nodes, each sending effectively-once on 3 channels at once:
/// every message processed exactly once, every receipt Acked. A node that is not an
/// admitted peer is refused at the connection (counted); an admitted peer not
/// authorized on a channel gets `Rejected { Unauthorized }`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_twenty_senders_three_channels() {
    const PEERS: u64 = 20;
    const PER: u64 = 100;
    let chans = [ChannelId(61), ChannelId(62), ChannelId(63)];
    let mut cfg = NodeConfig::default();
    // Channel 63: senders 1..=20 only; node 21 is admitted but not authorized there.
    cfg.authorization =
        Authorization::default().restrict_channel(ChannelId(63), (1..=PEERS).map(NodeId));
    let allow: Vec<u64> = (1..=PEERS + 1).collect();
    let b = receiver_at(100, any_addr(), &allow, cfg).await;
    let addr = b.local_addr().unwrap();
    let seen: Vec<Seen> = chans.iter().map(|_| Seen::default()).collect();
    for (i, ch) in chans.iter().enumerate() {
        consume(b.receiver(*ch, false).unwrap(), seen[i].clone(), false);
    }
    let mut tasks = Vec::new();
    for p in 1..=PEERS {
        tasks.push(tokio::spawn(async move {
            let a = sender_to(p, 100, addr, NodeConfig::default())
                .await
                .unwrap();
            let mut per_ch = Vec::new();
            for ch in chans {
                let out = a
                    .sender::<u64>(
                        NodeId(100),
                        ChannelOptions::new(ch, Guarantee::EffectivelyOnce),
                    )
                    .unwrap();
                per_ch.push(tokio::spawn(async move {
                    let mut r = Vec::new();
                    for i in 0..PER {
                        let v = p * 1_000_000 + i;
                        r.push((v, out.send(&v).await.unwrap()));
                    }
                    settle(r, 18).await
                }));
            }
            let mut all = Vec::new();
            for t in per_ch {
                all.extend(t.await.unwrap());
            }
            (a, all)
        }));
    }
    // The stranger and the unauthorized peer.
    let stranger = sender_to(999, 100, addr, NodeConfig::default())
        .await
        .unwrap();
    let mut so = ChannelOptions::new(ChannelId(61), Guarantee::EffectivelyOnce);
    so.deadline = Some(Duration::from_secs(3));
    let s_receipt = stranger
        .sender::<u64>(NodeId(100), so)
        .unwrap()
        .send(&7)
        .await
        .unwrap();
    let unauth = sender_to(PEERS + 1, 100, addr, NodeConfig::default())
        .await
        .unwrap();
    let u_receipt = unauth
        .sender::<u64>(
            NodeId(100),
            ChannelOptions::new(ChannelId(63), Guarantee::EffectivelyOnce),
        )
        .unwrap()
        .send(&((PEERS + 1) * 1_000_000))
        .await
        .unwrap();
    let mut nodes = Vec::new();
    let mut bad = Vec::new();
    for t in tasks {
        let (a, all) = within(19, "sender task", t).await.unwrap();
        for (v, r) in all {
            if r != Ok(Outcome::Acked) {
                bad.push((v, r));
            }
        }
        nodes.push(a);
    }
    assert!(
        bad.is_empty(),
        "{} receipts not Acked, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    let u = within(10, "unauthorized receipt", u_receipt).await;
    assert_eq!(
        u,
        Err(SendError::Rejected {
            reason: RejectReason::Unauthorized
        })
    );
    let s = within(10, "stranger receipt", s_receipt).await;
    assert!(
        matches!(
            s,
            Err(SendError::Deadline { .. }) | Err(SendError::PeerDown { .. })
        ),
        "stranger: {s:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, ch) in chans.iter().enumerate() {
        let m = seen[i].lock().unwrap();
        assert_eq!(m.len() as u64, PEERS * PER, "{ch:?}: distinct messages");
        let dup: Vec<_> = m.iter().filter(|(_, n)| **n != 1).collect();
        assert!(dup.is_empty(), "{ch:?}: processed twice: {dup:?}");
        assert!(!m.contains_key(&7) && !m.contains_key(&((PEERS + 1) * 1_000_000)));
    }
    let tcp = b.tcp_stats().unwrap();
    assert!(tcp.rejected_unknown_peer >= 1, "{tcp:?}");
}

// -------------------------------------------------------------------------------------
// Scenario 1 (continued): a hard-killed sender, and a partition through a proxy
// -------------------------------------------------------------------------------------

/// "Every policy survives a process crash (kill -9)" and `Outcome::HandedOff` means
/// "durably stored as a hint (per the store's fsync policy)": a sender whose runtime is
/// killed right after its receipts resolved HandedOff finds every hint when restarted
/// on the same directory, and they are all delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_handed_off_hints_survive_a_hard_killed_sender() {
    const N: u64 = 50;
    let hints = tempfile::tempdir().unwrap();
    let eo: Seen = Arc::default();
    let alo: Seen = Arc::default();
    let b = target_node(16, any_addr(), 15, &eo, &alo).await;
    let addr = b.local_addr().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = hints.path().to_path_buf();
    let (a, out) = rt
        .spawn(async move {
            let a = sender_to(15, 16, addr, handoff_cfg(&dir)).await.unwrap();
            let out = a
                .sender::<u64>(
                    NodeId(16),
                    ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
                )
                .unwrap();
            (a, out)
        })
        .await
        .unwrap();
    let first = rt.spawn({
        let out = out.clone();
        async move { out.send(&0).await.unwrap().await }
    });
    assert_eq!(
        within(10, "first", first).await.unwrap(),
        Ok(Outcome::Acked)
    );
    within(10, "target down", b.shutdown()).await;
    drop(b);
    wait_health(&a, NodeId(16), Health::Down, 15).await;
    let sends = rt.spawn({
        let out = out.clone();
        async move {
            let mut r = Vec::new();
            for v in 1..=N {
                r.push((v, out.send(&v).await.unwrap()));
            }
            r
        }
    });
    let r = within(10, "sends", sends).await.unwrap();
    for (v, res) in settle(r, 10).await {
        assert_eq!(res, Ok(Outcome::HandedOff), "{v}");
    }
    // Killed at once: no shutdown, no drain, no flush.
    rt.shutdown_background();
    drop((out, a));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a2 = sender_to(15, 16, addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let h = a2.stats().await.unwrap().hints.unwrap();
    assert_eq!(h.pending, N, "hints after a hard kill: {h:?}");
    let _b2 = target_node(16, addr, 15, &eo, &alo).await;
    wait_until(15, "replay", || (1..=N).all(|v| count(&eo, v) >= 1)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    for v in 0..=N {
        assert_eq!(count(&eo, v), 1, "message {v}");
    }
}

/// A TCP proxy that can cut the path (closing every connection and refusing new ones)
/// and restore it.
struct CutProxy {
    addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    gen: Arc<tokio::sync::watch::Sender<u64>>,
}

impl CutProxy {
    async fn start(target: SocketAddr) -> CutProxy {
        use std::sync::atomic::Ordering;
        let l = tokio::net::TcpListener::bind(any_addr()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (gen, _) = tokio::sync::watch::channel(0u64);
        let gen = Arc::new(gen);
        let (up2, gen2) = (up.clone(), gen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inb, _)) = l.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inb);
                    continue;
                }
                let mut cut = gen2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outb) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inb, &mut outb) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        CutProxy { addr, up, gen }
    }
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.gen.send_modify(|g| *g += 1);
    }
    fn heal(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The target processes messages but the path is cut before their acks get through;
/// the sender declares it Down and hands the unacknowledged messages off (receipts
/// HandedOff); the path heals and the hints replay under their original ids: the
/// target's dedup recognises them, so each effectively-once message is processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_processed_but_unacked_then_partitioned_replays_once() {
    const N: u64 = 40;
    let hints = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    // The target dials the sender directly: give it no address for the sender, so
    // every connection goes through the proxy (the sender dials).
    let b = receiver_at(18, any_addr(), &[17], NodeConfig::default()).await;
    let proxy = CutProxy::start(b.local_addr().unwrap()).await;
    let held: Arc<Mutex<Vec<ackwire::Delivery<u64>>>> = Arc::default();
    let mut inbox = b.receiver::<u64>(EO, false).unwrap();
    let (seen2, held2) = (seen.clone(), held.clone());
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hold2 = hold.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *seen2.lock().unwrap().entry(*d.message()).or_default() += 1;
            if hold2.load(std::sync::atomic::Ordering::SeqCst) {
                held2.lock().unwrap().push(d);
            } else {
                d.ack();
            }
        }
    });
    let a = sender_to(17, 18, proxy.addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(18),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    assert_eq!(
        within(10, "first", out.send(&0).await.unwrap()).await,
        Ok(Outcome::Acked)
    );
    hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut r = Vec::new();
    for v in 1..=N {
        r.push((v, out.send(&v).await.unwrap()));
    }
    wait_until(10, "all processed (acks held)", || {
        held.lock().unwrap().len() as u64 == N
    })
    .await;
    proxy.cut();
    // The handler finishes now: its acks cannot reach the sender.
    for d in held.lock().unwrap().drain(..) {
        d.ack();
    }
    wait_health(&a, NodeId(18), Health::Down, 15).await;
    let res = settle(r, 15).await;
    let mut outcomes: HashMap<String, u32> = HashMap::new();
    for (_, x) in &res {
        *outcomes.entry(format!("{x:?}")).or_default() += 1;
        assert!(
            matches!(x, Ok(Outcome::HandedOff) | Ok(Outcome::Acked)),
            "{x:?}"
        );
    }
    proxy.heal();
    let hs = a.stats().await.unwrap().hints.unwrap();
    eprintln!("s1 partition outcomes {outcomes:?}; hints {hs:?}");
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let p = a.stats().await.unwrap().hints.unwrap();
        if p.pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "hints not drained: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for v in 0..=N {
        assert_eq!(
            count(&seen, v),
            1,
            "message {v} processed {} times",
            count(&seen, v)
        );
    }
}

// -------------------------------------------------------------------------------------
// More edges: a resend of a dead-lettered key; shutdown spool then replay
// -------------------------------------------------------------------------------------

/// A key dead-lettered on an effectively-once channel, resent later under the same
/// `IdKey` (the documented way to retry safely): its receipt is never `Ok(Acked)`
/// unless the handler ran ("exactly once if the receipt was Ok").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_resend_of_a_dead_lettered_key_is_not_acked_unprocessed() {
    let b = receiver_at(56, any_addr(), &[55], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let acks: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let nack_mode = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut inbox = b
        .receiver_with::<u64>(EO, ReceiverOptions::default().max_deliveries(Some(2)))
        .unwrap();
    let (acks2, nm) = (acks.clone(), nack_mode.clone());
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            if nm.load(std::sync::atomic::Ordering::SeqCst) {
                d.nack();
            } else {
                *acks2.lock().unwrap().entry(*d.message()).or_default() += 1;
                d.ack();
            }
        }
    });
    let a = sender_to(55, 56, addr, NodeConfig::default())
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(56),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let r = within(
        10,
        "poison",
        out.send_with_key(&5, IdKey(0xDEAD)).await.unwrap(),
    )
    .await;
    assert_eq!(
        r,
        Err(SendError::Rejected {
            reason: RejectReason::DeadLettered
        })
    );
    // The application fixed the handler and retries the same key.
    nack_mode.store(false, std::sync::atomic::Ordering::SeqCst);
    let r2 = within(
        10,
        "resend",
        out.send_with_key(&5, IdKey(0xDEAD)).await.unwrap(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let processed = acks.lock().unwrap().get(&5).copied().unwrap_or(0);
    eprintln!("s5 resend of a dead-lettered key: receipt {r2:?}, processed {processed} times");
    if r2 == Ok(Outcome::Acked) {
        assert_eq!(
            processed, 1,
            "receipt Ok(Acked) but the handler never processed the message"
        );
    } else {
        assert_eq!(
            r2,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            })
        );
    }
}

/// `Node::shutdown`: messages still unacknowledged after `shutdown_drain` (default 5 s)
/// are spooled to the hint store; a new run on the same directory replays them, and
/// the target (never restarted) processes each that its handler had not completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_shutdown_spool_is_replayed_by_next_run() {
    const N: u64 = 10;
    let hints = tempfile::tempdir().unwrap();
    let b = receiver_at(58, any_addr(), &[57], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let acked: Seen = Arc::default();
    let held: Arc<Mutex<Vec<ackwire::Delivery<u64>>>> = Arc::default();
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut inbox = b.receiver::<u64>(EO, false).unwrap();
    let (seen2, acked2, held2, hold2) = (seen.clone(), acked.clone(), held.clone(), hold.clone());
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            let v = *d.message();
            *seen2.lock().unwrap().entry(v).or_default() += 1;
            if hold2.load(std::sync::atomic::Ordering::SeqCst) {
                held2.lock().unwrap().push(d);
            } else {
                *acked2.lock().unwrap().entry(v).or_default() += 1;
                d.ack();
            }
        }
    });
    let a = sender_to(57, 58, addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(58),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut r = Vec::new();
    for v in 1..=N {
        r.push((v, out.send(&v).await.unwrap()));
    }
    wait_until(5, "delivered", || held.lock().unwrap().len() as u64 == N).await;
    within(12, "shutdown with drain", a.shutdown()).await;
    let res = settle(r, 2).await;
    let mut oc: HashMap<String, u32> = HashMap::new();
    for (_, x) in &res {
        *oc.entry(format!("{x:?}")).or_default() += 1;
    }
    drop((out, a));
    // The handler gives the held messages back (it could not finish them).
    hold.store(false, std::sync::atomic::Ordering::SeqCst);
    for d in held.lock().unwrap().drain(..) {
        d.nack();
    }
    let a2 = sender_to(57, 58, addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let h = a2.stats().await.unwrap().hints.unwrap();
    eprintln!("s1 spool: outcomes at shutdown {oc:?}; next run's hints {h:?}");
    let end = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < end && !(1..=N).all(|v| count(&acked, v) >= 1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h2 = a2.stats().await.unwrap().hints.unwrap();
    let st = b.stats().await.unwrap();
    let missing: Vec<u64> = (1..=N).filter(|v| count(&acked, *v) == 0).collect();
    for (v, x) in &res {
        if *x == Ok(Outcome::HandedOff) {
            assert!(!missing.contains(v), "message {v} HandedOff at shutdown but never processed after the replay; missing {missing:?}; sender hints {h2:?}; receiver dedup {:?}", st.dedup);
        }
    }
    for v in 1..=N {
        assert!(
            count(&acked, v) <= 1,
            "message {v} completed {} times",
            count(&acked, v)
        );
    }
}

/// `SendError::Rejected`: "sending it again unchanged gets the same answer" — for an
/// undecodable payload under an `IdKey` on an effectively-once channel too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_resend_of_an_undecodable_key_gets_the_same_answer() {
    let b = receiver_at(60, any_addr(), &[59], NodeConfig::default()).await;
    let addr = b.local_addr().unwrap();
    let mut inbox = b.receiver::<u64>(EO, false).unwrap();
    let got: Seen = Arc::default();
    let got2 = got.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *got2.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    });
    let a = sender_to(59, 60, addr, NodeConfig::default())
        .await
        .unwrap();
    let out = a
        .sender::<String>(
            NodeId(60),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap()
        .without_type_check();
    let msg = "not a number, definitely longer than a u64".to_string();
    let r1 = within(
        10,
        "first",
        out.send_with_key(&msg, IdKey(0xBAD)).await.unwrap(),
    )
    .await;
    assert_eq!(
        r1,
        Err(SendError::Rejected {
            reason: RejectReason::Undecodable
        })
    );
    let r2 = within(
        10,
        "again",
        out.send_with_key(&msg, IdKey(0xBAD)).await.unwrap(),
    )
    .await;
    assert_eq!(
        r2, r1,
        "the same message sent again unchanged got another answer"
    );
}

/// As `s1_processed_but_unacked_then_partitioned_replays_once`, but the target also
/// restarts (same id, address and durable dedup directory) before the hints replay:
/// durable dedup still recognises every replayed message its previous run processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_hints_replayed_to_a_restarted_durable_target_are_not_reprocessed() {
    const N: u64 = 40;
    let hints = tempfile::tempdir().unwrap();
    let ddir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let b = receiver_at(20, any_addr(), &[19], durable_cfg(ddir.path())).await;
    let baddr = b.local_addr().unwrap();
    let proxy = CutProxy::start(baddr).await;
    let held: Arc<Mutex<Vec<ackwire::Delivery<u64>>>> = Arc::default();
    let mut inbox = b.receiver::<u64>(EO, false).unwrap();
    let (seen2, held2) = (seen.clone(), held.clone());
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *seen2.lock().unwrap().entry(*d.message()).or_default() += 1;
            if *d.message() == 0 {
                d.ack();
            } else {
                held2.lock().unwrap().push(d);
            }
        }
    });
    let a = sender_to(19, 20, proxy.addr, handoff_cfg(hints.path()))
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(20),
            ChannelOptions::new(EO, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    assert_eq!(
        within(10, "first", out.send(&0).await.unwrap()).await,
        Ok(Outcome::Acked)
    );
    let mut r = Vec::new();
    for v in 1..=N {
        r.push((v, out.send(&v).await.unwrap()));
    }
    wait_until(10, "all processed (acks held)", || {
        held.lock().unwrap().len() as u64 == N
    })
    .await;
    proxy.cut();
    let ds: Vec<_> = held.lock().unwrap().drain(..).collect();
    for d in ds {
        within(5, "ack_durable", d.ack_durable())
            .await
            .expect("ack_durable");
    }
    within(10, "target shutdown", b.shutdown()).await;
    drop(b);
    let b2 = receiver_at(20, baddr, &[19], durable_cfg(ddir.path())).await;
    consume(b2.receiver(EO, false).unwrap(), seen.clone(), false);
    wait_health(&a, NodeId(20), Health::Down, 15).await;
    for (v, x) in settle(r, 15).await {
        assert!(
            matches!(x, Ok(Outcome::HandedOff) | Ok(Outcome::Acked)),
            "{v}: {x:?}"
        );
    }
    proxy.heal();
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let p = a.stats().await.unwrap().hints.unwrap();
        if p.pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "hints not drained: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again: Vec<u64> = (0..=N).filter(|v| count(&seen, *v) != 1).collect();
    assert!(
        again.is_empty(),
        "processed other than once after the target's restart: {again:?}; dedup {:?}",
        b2.stats().await.unwrap().dedup
    );
}

/// A hint directory or dedup directory that is a regular file: `build()` returns a
/// typed error (no panic, no hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_storage_path_is_a_file_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let mut results = Vec::new();
    for which in ["handoff", "dedup", "dead_letters"] {
        let mut c = NodeConfig::default();
        match which {
            "handoff" => c.handoff = Some(HandoffConfig::new(&file)),
            "dedup" => c.dedup.durable = Some(DurableDedup::new(&file)),
            _ => c.dead_letter_dir = Some(file.clone()),
        }
        let h = tokio::spawn(async move {
            Node::builder(NodeId(70))
                .bind(any_addr())
                .config(c)
                .build()
                .await
        });
        match within(5, which, h).await {
            Err(e) => panic!("{which}: build panicked: {e}"),
            Ok(Ok(n)) => {
                results.push(format!("{which}: accepted a file as its directory"));
                n.shutdown().await;
            }
            Ok(Err(e)) => eprintln!("s3 {which} on a file: {e}"),
        }
    }
    assert!(results.is_empty(), "{results:?}");
}
