//! Black-box tests of concurrency and odd runtime setups, written from the docs alone
//! (README, rustdoc of the public items) against real TCP on loopback with default
//! settings: many tasks and plain threads sharing one sender, deliveries finished on
//! other threads long after (after their receiver, their node or their runtime is
//! gone), receivers polled from several tasks and cancelled in `select!` loops,
//! `recv_many` limits, `current_thread` and one-worker runtimes, a node used from
//! other runtimes and plain threads, a runtime dropped under a live node, shutdown
//! racing sends and acks, cancellation of every async method, and slow handlers with
//! thousands of messages in flight.
//!
//! Every await that could hang is bounded, so a hang fails the test with its name.
//! No assertion is about a timing figure.
//!
//! Found when written (each failed on every run against the code it was written for):
//!
//! * `c07b_ack_durable_during_the_shutdown_grace_is_applied`: deliveries finished with
//!   `ack_durable()` while the node waits for held deliveries during `shutdown` are
//!   never applied (the grace only drains the lock-free completion stack, not the
//!   command channel `ack_durable` uses): every call fails `NodeStopped` after the
//!   whole 1 s grace, no ack is sent, and the sender's receipts fail `Deadline`;
//!   the same deliveries finished with `ack()` are all `Acked` (`c07a`).
//! * `c15_closed_resolves_when_the_nodes_runtime_is_dropped`,
//!   `c16_send_waiting_on_a_full_window_returns_when_the_nodes_runtime_is_dropped`,
//!   `c24_dead_letters_end_when_the_nodes_runtime_is_dropped`: when the runtime that
//!   runs a node's driver is dropped, the driver's future is dropped without the
//!   clean-up of `supervise` (state, windows, dead letters): `Node::closed()` never
//!   resolves, a `send` waiting for window space hangs for good, and `DeadLetters::recv`
//!   never ends, although every other call already fails with `Shutdown`.
//! * `c18_nodes_dropped_in_spawn_blocking_and_on_a_plain_thread` (when merged, 2 of 6
//!   runs): a send made after the dropped node's receipts had failed could still be
//!   taken, as the windows closed only after the driver ended; they now close before
//!   any receipt fails.

use crate::support::ports;
use ackwire::dedup::DurableDedup;
use ackwire::group::{GroupConfig, GroupSender, StaticMembers};
use ackwire::{
    AckError, ChannelId, ChannelOptions, Delivery, Guarantee, Node, NodeConfig, NodeError, NodeId,
    Outcome, Receipt, SendError,
};
use bytes::Bytes;
use futures::FutureExt;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------- helpers

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

/// The default in-flight window (`ProtoConfig::max_in_flight`).
fn window() -> usize {
    NodeConfig::default().proto.max_in_flight
}

async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("hang: {what} did not finish within {secs} s"),
    }
}

/// Run `f` on a plain thread and wait for it at most `secs` (a hang fails the test).
fn on_thread_within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("hang: {what} did not finish within {secs} s"),
    }
}

async fn receiver_node_cfg(id: u64, allow: &[u64], cfg: NodeConfig) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(any_addr()).config(cfg);
    for a in allow {
        b = b.allow_peer(NodeId(*a));
    }
    within(10, "build receiver", b.build()).await.unwrap()
}

async fn receiver_node(id: u64, allow: &[u64]) -> Node {
    receiver_node_cfg(id, allow, NodeConfig::default()).await
}

async fn sender_node(id: u64, peer: u64, addr: SocketAddr) -> Node {
    within(
        10,
        "build sender",
        Node::builder(NodeId(id))
            .bind(any_addr())
            .peer(NodeId(peer), addr)
            .build(),
    )
    .await
    .unwrap()
}

/// `(sender node a, receiver node b)`; a knows b, b admits a.
async fn pair(a: u64, b: u64) -> (Node, Node) {
    let rb = receiver_node(b, &[a]).await;
    let ra = sender_node(a, b, rb.local_addr().unwrap()).await;
    (ra, rb)
}

fn opts(ch: u32, g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(ChannelId(ch), g)
}

type Counts = Arc<Mutex<HashMap<u64, u32>>>;

fn counts() -> Counts {
    Arc::new(Mutex::new(HashMap::new()))
}

fn bump(c: &Counts, v: u64) {
    *c.lock().unwrap().entry(v).or_default() += 1;
}

fn rnd(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Await every receipt (bounded) and return the outcomes in order.
async fn settle(
    receipts: Vec<(u64, Receipt)>,
    secs: u64,
) -> Vec<(u64, Result<Outcome, SendError>)> {
    within(secs, "receipts", async move {
        let mut out = Vec::with_capacity(receipts.len());
        for (v, r) in receipts {
            out.push((v, r.await));
        }
        out
    })
    .await
}

fn assert_all_acked(res: &[(u64, Result<Outcome, SendError>)], what: &str) {
    let bad: Vec<_> = res
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(Outcome::Acked)))
        .take(5)
        .collect();
    let nbad = res
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(Outcome::Acked)))
        .count();
    assert_eq!(nbad, 0, "{what}: {nbad} receipts not Acked, e.g. {bad:?}");
}

fn assert_each_once(c: &Counts, n: u64, what: &str) {
    let c = c.lock().unwrap();
    let missing: Vec<u64> = (0..n).filter(|v| !c.contains_key(v)).take(10).collect();
    let twice: Vec<(u64, u32)> = c
        .iter()
        .filter(|(_, k)| **k != 1)
        .map(|(v, k)| (*v, *k))
        .take(10)
        .collect();
    let extra: Vec<u64> = c.keys().filter(|v| **v >= n).copied().take(10).collect();
    assert!(
        missing.is_empty() && twice.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}, processed more than once {twice:?}, unknown {extra:?} ({} distinct of {n})",
        c.len()
    );
}

/// Ack every delivery of `inbox` in its own task; counts processing per value and
/// deliveries seen.
fn ack_in_tasks(
    mut inbox: ackwire::Receiver<u64>,
    seen: Counts,
    deliveries: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            deliveries.fetch_add(1, Ordering::Relaxed);
            let seen = seen.clone();
            tokio::spawn(async move {
                bump(&seen, *d.message());
                d.ack();
            });
        }
    })
}

async fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    within(secs, what, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ------------------------------------------------------------- many senders at once

/// README: `send` "waits only while the stream's window is full; the receipt resolves
/// when the receiver's handler has acked"; `Sender` is "Cheap to clone";
/// effectively-once: "the handler sees each message exactly once if the receipt was
/// `Ok`"; `ProtoStats::sent` = "Messages accepted by `send`", `acked` = "Messages
/// acknowledged by their receiver", `delivered` = "Messages handed to the
/// application".
///
/// 16 tasks send 500 values each on clones of one sender (twice the window in total)
/// while the handler acks each delivery in its own task: every receipt `Acked`, each
/// value processed exactly once, and the counters equal what the application saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c01_sixteen_tasks_on_clones_of_one_sender_exact_counts() {
    let (a, b) = pair(1101, 1102).await;
    let seen = counts();
    let deliveries = Arc::new(AtomicU64::new(0));
    let _h = ack_in_tasks(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
        deliveries.clone(),
    );
    let out = a
        .sender::<u64>(NodeId(1102), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    const TASKS: u64 = 16;
    const PER: u64 = 500;
    let mut joins = Vec::new();
    for t in 0..TASKS {
        let out = out.clone();
        joins.push(tokio::spawn(async move {
            let mut rs = Vec::new();
            for i in 0..PER {
                let v = t * PER + i;
                rs.push((v, out.send(&v).await.expect("send on a healthy link")));
            }
            settle(rs, 20).await
        }));
    }
    let mut all = Vec::new();
    for j in joins {
        all.extend(within(25, "sending task", j).await.unwrap());
    }
    assert_all_acked(&all, "concurrent clones");
    let n = TASKS * PER;
    wait_until(5, "all processed", || {
        seen.lock().unwrap().len() as u64 >= n
    })
    .await;
    assert_each_once(&seen, n, "concurrent clones");
    let sa = within(5, "stats a", a.stats()).await.unwrap();
    assert_eq!(sa.proto.sent, n, "sender: sent");
    assert_eq!(sa.proto.acked, n, "sender: acked");
    assert_eq!(sa.proto.gave_up, 0, "sender: gave up");
    let sb = within(5, "stats b", b.stats()).await.unwrap();
    assert_eq!(
        sb.proto.delivered,
        deliveries.load(Ordering::Relaxed),
        "receiver: delivered equals the deliveries the application got"
    );
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
}

/// `Sender`, `Receipt`, `Receiver` and `Node::stats` / `Node::shutdown` are plain
/// futures (a oneshot, a semaphore, a channel): usable from plain threads with any
/// executor while the node's runtime runs elsewhere. "Every call waits for the stop".
///
/// Four plain threads send 250 at-least-once values each with
/// `futures::executor::block_on`, a plain thread receives and acks, stats and shutdown
/// are called from plain threads.
#[test]
fn c02_plain_threads_send_receive_stats_and_shutdown_with_block_on() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt.block_on(pair(1201, 1202));
    let a = Arc::new(a);
    let inbox = b.receiver::<u64>(ChannelId(2), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(1202), opts(2, Guarantee::AtLeastOnce))
        .unwrap();
    const THREADS: u64 = 4;
    const PER: u64 = 250;
    let n = THREADS * PER;
    let seen = counts();
    let seen2 = seen.clone();
    let consumer = std::thread::spawn(move || {
        futures::executor::block_on(async move {
            let mut inbox = inbox;
            while let Some(d) = inbox.recv().await {
                bump(&seen2, *d.message());
                d.ack();
                if seen2.lock().unwrap().len() as u64 == n {
                    break;
                }
            }
            inbox
        })
    });
    let mut senders = Vec::new();
    for t in 0..THREADS {
        let out = out.clone();
        senders.push(std::thread::spawn(move || {
            futures::executor::block_on(async move {
                let mut rs = Vec::new();
                for i in 0..PER {
                    let v = t * PER + i;
                    rs.push((v, out.send(&v).await));
                }
                let mut res = Vec::new();
                for (v, r) in rs {
                    let r = r.expect("send");
                    res.push((v, r.await));
                }
                res
            })
        }));
    }
    let all = on_thread_within(20, "plain-thread senders", move || {
        senders
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_all_acked(&all, "plain threads");
    let _inbox = on_thread_within(10, "plain-thread receiver", move || {
        consumer.join().unwrap()
    });
    let c = seen.lock().unwrap();
    assert_eq!(c.len() as u64, n, "every value processed");
    drop(c);
    let a2 = a.clone();
    let st = on_thread_within(10, "stats from a plain thread", move || {
        futures::executor::block_on(a2.stats())
    })
    .unwrap();
    assert_eq!((st.proto.sent, st.proto.acked), (n, n));
    let a2 = a.clone();
    on_thread_within(15, "shutdown from a plain thread", move || {
        futures::executor::block_on(a2.shutdown())
    });
    let r = futures::executor::block_on(out.send(&1));
    assert!(
        matches!(r, Err(SendError::Shutdown)),
        "send after shutdown: {r:?}"
    );
    rt.block_on(async { within(15, "shutdown b", b.shutdown()).await });
}

// ---------------------------------------------------- deliveries on other threads

/// `Delivery`: "Finish it with `ack` after processing, or `nack` to have it
/// redelivered; dropping it unfinished is a nack." Effectively-once: "a nacked message
/// is redelivered", "exactly once if the receipt was Ok".
///
/// 2 000 effectively-once messages; every delivery goes to one of four plain worker
/// threads in reversed batches; a value's first delivery is nacked or dropped there,
/// the next one acked. Every receipt `Acked`, every value acked exactly once and never
/// delivered again after its ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c03_deliveries_nacked_dropped_and_acked_on_plain_threads_out_of_order() {
    let (a, b) = pair(1301, 1302).await;
    let mut inbox = b.receiver::<u64>(ChannelId(3), false).unwrap();
    #[derive(Default)]
    struct St {
        sightings: HashMap<u64, u32>,
        acked: HashMap<u64, u32>,
        after_ack: Vec<u64>,
    }
    let st = Arc::new(Mutex::new(St::default()));
    let mut workers = Vec::new();
    let mut txs = Vec::new();
    for w in 0..4u64 {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Delivery<u64>>>();
        txs.push(tx);
        let st = st.clone();
        workers.push(std::thread::spawn(move || {
            while let Ok(batch) = rx.recv() {
                for d in batch {
                    let v = *d.message();
                    let mut s = st.lock().unwrap();
                    if s.acked.contains_key(&v) {
                        s.after_ack.push(v);
                    }
                    let k = {
                        let e = s.sightings.entry(v).or_default();
                        *e += 1;
                        *e
                    };
                    if k == 1 {
                        drop(s);
                        if (v + w) % 2 == 0 {
                            d.nack();
                        } else {
                            drop(d);
                        }
                    } else {
                        *s.acked.entry(v).or_default() += 1;
                        drop(s);
                        d.ack();
                    }
                }
            }
        }));
    }
    let fan = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut i = 0usize;
        loop {
            buf.clear();
            let got = inbox.recv_many(&mut buf, 64).await;
            if got == 0 {
                break;
            }
            let mut batch: Vec<Delivery<u64>> = std::mem::take(&mut buf);
            batch.reverse();
            if txs[i % txs.len()].send(batch).is_err() {
                break;
            }
            i += 1;
        }
    });
    let out = a
        .sender::<u64>(NodeId(1302), opts(3, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 2000u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let res = settle(rs, 25).await;
    assert_all_acked(&res, "nack-then-ack on plain threads");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total: u32 = {
        let s = st.lock().unwrap();
        let not_once: Vec<_> = (0..n)
            .filter(|v| s.acked.get(v).copied().unwrap_or(0) != 1)
            .take(10)
            .collect();
        assert!(
            not_once.is_empty(),
            "values not acked exactly once: {not_once:?}"
        );
        assert!(
            s.after_ack.is_empty(),
            "delivered again after their ack: {:?}",
            &s.after_ack[..s.after_ack.len().min(10)]
        );
        s.sightings.values().sum()
    };
    let sb = within(5, "stats b", b.stats()).await.unwrap();
    assert_eq!(sb.proto.delivered, u64::from(total), "delivered counter");
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "fan-out ends", fan).await.unwrap();
    for w in workers {
        w.join().unwrap();
    }
}

/// `Delivery::ack`: "Processed: acknowledge to the sender"; a delivery is an owned
/// value: moved into `spawn_blocking` and acked there seconds later, in reverse order,
/// effectively-once receipts resolve `Acked` and nothing is delivered twice; the
/// slow handler causes no error at the sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c04_deliveries_held_seconds_then_acked_in_reverse_in_spawn_blocking() {
    let (a, b) = pair(1401, 1402).await;
    let mut inbox = b.receiver::<u64>(ChannelId(4), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(1402), opts(4, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 300u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let mut held = Vec::new();
    let seen = counts();
    while (held.len() as u64) < n {
        let d = within(10, "recv", inbox.recv()).await.unwrap();
        bump(&seen, *d.message());
        held.push(d);
    }
    let acker = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(3));
        for d in held.into_iter().rev() {
            d.ack();
        }
    });
    // Anything delivered again meanwhile is a duplicate.
    let seen2 = seen.clone();
    let extra = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            bump(&seen2, *d.message());
            d.ack();
        }
    });
    let res = settle(rs, 15).await;
    within(5, "acker", acker).await.unwrap();
    assert_all_acked(&res, "held then acked in spawn_blocking");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_each_once(&seen, n, "held then acked");
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "extra", extra).await.unwrap();
}

/// `RawReceiver` drop: "Messages still queued when the receiver goes ... are taken
/// back" — deliveries already handed out are the application's: acking one after its
/// receiver is dropped still acknowledges it, and a nacked or dropped one comes back
/// to "the channel's next receiver".
///
/// 200 effectively-once deliveries are taken, the receiver dropped, then 100 acked on
/// a plain thread, 50 nacked and 50 dropped on another; a new receiver gets exactly the
/// 100 unfinished ones, never an acked one, and every receipt ends `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c05_deliveries_outliving_their_receiver_are_finished_on_plain_threads() {
    let (a, b) = pair(1501, 1502).await;
    let mut inbox = b.receiver::<u64>(ChannelId(5), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(1502), opts(5, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 200u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let mut held = Vec::new();
    while (held.len() as u64) < n {
        held.push(within(10, "recv", inbox.recv()).await.unwrap());
    }
    drop(inbox);
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.sort_by_key(|d| *d.message());
    let unfinished: Vec<Delivery<u64>> = held.split_off(100);
    let acked: HashSet<u64> = held.iter().map(|d| *d.message()).collect();
    let t1 = std::thread::spawn(move || {
        for d in held {
            d.ack();
        }
    });
    let t2 = std::thread::spawn(move || {
        for d in unfinished {
            if *d.message() % 2 == 0 {
                d.nack();
            } else {
                drop(d);
            }
        }
    });
    t1.join().unwrap();
    t2.join().unwrap();
    let mut inbox = b.receiver::<u64>(ChannelId(5), false).unwrap();
    let again = counts();
    let again2 = again.clone();
    let h = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            bump(&again2, *d.message());
            d.ack();
        }
    });
    let res = settle(rs, 15).await;
    assert_all_acked(&res, "finished after the receiver was dropped");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = again.lock().unwrap().clone();
    let acked_again: Vec<_> = c.keys().filter(|v| acked.contains(v)).collect();
    assert!(
        acked_again.is_empty(),
        "acked after their receiver was dropped, yet delivered again: {acked_again:?}"
    );
    let expect: HashSet<u64> = (100..n).collect();
    let got: HashSet<u64> = c.keys().copied().collect();
    assert_eq!(
        got, expect,
        "the new receiver gets exactly the unfinished ones"
    );
    assert!(c.values().all(|k| *k == 1), "each once: {c:?}");
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "receiver task", h).await.unwrap();
}

/// `Delivery::ack_durable`: "[`AckError::NodeStopped`] when the node stopped first";
/// `ack`, `nack` and drop are synchronous calls on an owned value. Deliveries finished
/// after their node shut down, and again after the node's runtime was dropped, on
/// plain threads and in `spawn_blocking`: no panic, no hang, `ack_durable` fails typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c06_deliveries_finished_after_shutdown_and_after_the_runtime_is_gone() {
    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = rt_b
        .spawn(async { receiver_node(1602, &[1601]).await })
        .await
        .unwrap();
    let b = Arc::new(b);
    let a = sender_node(1601, 1602, b.local_addr().unwrap()).await;
    let mut inbox = b.receiver::<u64>(ChannelId(6), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(1602), opts(6, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 40u64;
    let mut _rs = Vec::new();
    for v in 0..n {
        _rs.push(within(10, "send", out.send(&v)).await.unwrap());
    }
    let mut held = Vec::new();
    while (held.len() as u64) < n {
        held.push(within(10, "recv", inbox.recv()).await.unwrap());
    }
    within(15, "shutdown b", b.shutdown()).await;
    let mut second = held.split_off(20);
    // After the stop: ack / nack / drop on plain threads and in spawn_blocking.
    let first = held;
    let mut it = first.into_iter();
    let acks: Vec<_> = it.by_ref().take(5).collect();
    let nacks: Vec<_> = it.by_ref().take(5).collect();
    let drops: Vec<_> = it.by_ref().take(5).collect();
    let durables: Vec<_> = it.collect();
    std::thread::spawn(move || acks.into_iter().for_each(|d| d.ack()))
        .join()
        .unwrap();
    within(
        5,
        "nack in spawn_blocking",
        tokio::task::spawn_blocking(move || nacks.into_iter().for_each(|d| d.nack())),
    )
    .await
    .unwrap();
    std::thread::spawn(move || drop(drops)).join().unwrap();
    for d in durables {
        let r = within(5, "ack_durable after shutdown", d.ack_durable()).await;
        assert_eq!(r, Err(AckError::NodeStopped), "ack_durable after shutdown");
    }
    // Now drop the node's runtime and finish the rest.
    within(
        10,
        "drop runtime",
        tokio::task::spawn_blocking(move || drop(rt_b)),
    )
    .await
    .unwrap();
    let durables = second.split_off(10);
    std::thread::spawn(move || {
        for (i, d) in second.into_iter().enumerate() {
            match i % 3 {
                0 => d.ack(),
                1 => d.nack(),
                _ => drop(d),
            }
        }
    })
    .join()
    .unwrap();
    for d in durables {
        let r = on_thread_within(5, "ack_durable after the runtime is gone", move || {
            futures::executor::block_on(d.ack_durable())
        });
        assert_eq!(
            r,
            Err(AckError::NodeStopped),
            "ack_durable after runtime drop"
        );
    }
    drop(b);
    within(15, "shutdown a", a.shutdown()).await;
}

/// `Node::shutdown`: "give deliveries the application still holds up to 1 s to finish
/// (so their acks and dedup records are not lost with the stop)". Control case for
/// `c07b`: deliveries acked with `ack()` from many tasks while the receiving node is
/// in that grace get their acks to the sender: every receipt `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c07a_acks_from_many_tasks_during_the_shutdown_grace_reach_the_sender() {
    shutdown_grace_case(1701, false).await;
}

/// `Node::shutdown`: "give deliveries the application still holds up to 1 s to finish
/// (so their acks and dedup records are not lost with the stop)"; `ack_durable`:
/// "Processed: acknowledge, and resolve once the acknowledgement is durable … the ack
/// frame is handed to the transport", `NodeStopped` only "when the node stopped
/// first". A delivery finished with `ack_durable()` in the grace is finished like one
/// finished with `ack()`: it resolves `Ok(())` and the sender's receipt is `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c07b_ack_durable_during_the_shutdown_grace_is_applied() {
    shutdown_grace_case(1711, true).await;
}

async fn shutdown_grace_case(base: u64, durable: bool) {
    let (a, b) = pair(base, base + 1).await;
    let b = Arc::new(b);
    let mut inbox = b.receiver::<u64>(ChannelId(7), false).unwrap();
    let mut o = opts(7, Guarantee::EffectivelyOnce);
    o.deadline = Some(Duration::from_secs(6));
    let out = a.sender::<u64>(NodeId(base + 1), o).unwrap();
    let n = 50u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let mut held = Vec::new();
    while (held.len() as u64) < n {
        held.push(within(10, "recv", inbox.recv()).await.unwrap());
    }
    let b2 = b.clone();
    let stopping = tokio::spawn(async move { b2.shutdown().await });
    // The stop has begun; the node now waits (up to 1 s) for the held deliveries.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut acks = Vec::new();
    for d in held {
        acks.push(tokio::spawn(async move {
            if durable {
                d.ack_durable().await
            } else {
                d.ack();
                Ok(())
            }
        }));
    }
    let mut durable_results = Vec::new();
    for h in acks {
        durable_results.push(within(10, "ack task", h).await.unwrap());
    }
    within(15, "shutdown b", stopping).await.unwrap();
    let res = settle(rs, 12).await;
    let failed_acks = durable_results.iter().filter(|r| r.is_err()).count();
    let not_acked = res
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(Outcome::Acked)))
        .count();
    assert!(
        failed_acks == 0 && not_acked == 0,
        "acks during the shutdown grace (durable: {durable}): {failed_acks} of {n} acks failed \
         (e.g. {:?}); {not_acked} of {n} receipts not Acked (e.g. {:?})",
        durable_results.iter().find(|r| r.is_err()),
        res.iter().find(|(_, r)| !matches!(r, Ok(Outcome::Acked)))
    );
    within(15, "shutdown a", a.shutdown()).await;
}

// ---------------------------------------------------------- receivers and recv

/// `Receiver::recv`: "The next message"; a `Receiver` is a `Stream` and `recv` is
/// built on `poll_recv` (cancel-safe). One receiver shared by 8 tasks behind a
/// `tokio::sync::Mutex`, each `recv` under a short timeout (cancelled often): 4 000
/// effectively-once messages from 4 sending tasks are each processed exactly once,
/// every receipt `Acked`, and `delivered` equals what the tasks got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c08_one_receiver_polled_by_eight_tasks_behind_a_mutex() {
    let (a, b) = pair(1801, 1802).await;
    let inbox = Arc::new(tokio::sync::Mutex::new(
        b.receiver::<u64>(ChannelId(8), false).unwrap(),
    ));
    let seen = counts();
    let got = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..8 {
        let (inbox, seen, got, done) = (inbox.clone(), seen.clone(), got.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut cancelled = 0u64;
            while !done.load(Ordering::Relaxed) {
                let r = {
                    let mut g = inbox.lock().await;
                    tokio::time::timeout(Duration::from_millis(2), g.recv()).await
                };
                match r {
                    Ok(Some(d)) => {
                        got.fetch_add(1, Ordering::Relaxed);
                        bump(&seen, *d.message());
                        d.ack();
                    }
                    Ok(None) => break,
                    Err(_) => cancelled += 1,
                }
            }
            cancelled
        }));
    }
    let out = a
        .sender::<u64>(NodeId(1802), opts(8, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 4000u64;
    let mut senders = Vec::new();
    for t in 0..4u64 {
        let out = out.clone();
        senders.push(tokio::spawn(async move {
            let mut rs = Vec::new();
            for i in 0..n / 4 {
                let v = t * (n / 4) + i;
                rs.push((v, out.send(&v).await.unwrap()));
            }
            settle(rs, 20).await
        }));
    }
    let mut all = Vec::new();
    for s in senders {
        all.extend(within(25, "senders", s).await.unwrap());
    }
    assert_all_acked(&all, "mutex-shared receiver");
    done.store(true, Ordering::Relaxed);
    let mut cancelled = 0;
    for r in readers {
        cancelled += within(5, "reader", r).await.unwrap();
    }
    assert_each_once(&seen, n, "mutex-shared receiver");
    let sb = within(5, "stats", b.stats()).await.unwrap();
    assert_eq!(sb.proto.delivered, got.load(Ordering::Relaxed), "delivered");
    eprintln!("recv calls cancelled by the timeout: {cancelled}");
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
}

/// `recv` cancelled by `select!` against a short random sleep, and by
/// `now_or_never`, in a loop, for an at-most-once and an effectively-once channel
/// at once: nothing lost ("nothing on a healthy link" for at-most-once), nothing
/// duplicated; at-most-once receipts `Sent`, effectively-once ones `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c09_recv_cancelled_by_select_and_now_or_never_loses_nothing() {
    let (a, b) = pair(1901, 1902).await;
    let n = 3000u64;
    let mut tallies = Vec::new();
    let mut readers = Vec::new();
    for (ch, seed) in [(91u32, 7u64), (92, 11)] {
        let mut inbox = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let seen = counts();
        tallies.push(seen.clone());
        readers.push(tokio::spawn(async move {
            let mut s = seed;
            let mut total = 0u64;
            while total < n {
                let d = if rnd(&mut s).is_multiple_of(3) {
                    match inbox.recv().now_or_never() {
                        Some(d) => d,
                        None => {
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                } else {
                    let us = rnd(&mut s) % 400;
                    tokio::select! {
                        d = inbox.recv() => d,
                        _ = tokio::time::sleep(Duration::from_micros(us)) => continue,
                    }
                };
                let Some(d) = d else { break };
                total += 1;
                bump(&seen, *d.message());
                d.ack();
            }
            inbox
        }));
    }
    let amo = a
        .sender::<u64>(NodeId(1902), opts(91, Guarantee::AtMostOnce))
        .unwrap();
    let eo = a
        .sender::<u64>(NodeId(1902), opts(92, Guarantee::EffectivelyOnce))
        .unwrap();
    let s1 = tokio::spawn(async move {
        let mut rs = Vec::new();
        for v in 0..n {
            rs.push((v, amo.send(&v).await.unwrap()));
        }
        settle(rs, 20).await
    });
    let s2 = tokio::spawn(async move {
        let mut rs = Vec::new();
        for v in 0..n {
            rs.push((v, eo.send(&v).await.unwrap()));
        }
        settle(rs, 20).await
    });
    let r1 = within(25, "amo sender", s1).await.unwrap();
    let r2 = within(25, "eo sender", s2).await.unwrap();
    let bad1 = r1
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(Outcome::Sent)))
        .count();
    assert_eq!(bad1, 0, "at-most-once receipts not Sent");
    assert_all_acked(&r2, "effectively-once with cancelled recv");
    for (i, r) in readers.into_iter().enumerate() {
        let _inbox = within(15, "reader", r).await.unwrap();
        assert_each_once(
            &tallies[i],
            n,
            if i == 0 {
                "at-most-once, recv cancelled"
            } else {
                "effectively-once, recv cancelled"
            },
        );
    }
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
}

/// `recv_many`: "Move up to `limit` deliveries into `buf` at once, waiting for the
/// first one. Returns how many were added; `0` once the node has shut down (or for a
/// `limit` of 0)." Typed and raw: a limit of 0 returns 0 at once and takes nothing, a
/// limit of 1 takes exactly one, `usize::MAX` takes what is queued; together every
/// message exactly once; after shutdown 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_recv_many_with_limits_zero_one_and_huge() {
    let (a, b) = pair(2001, 2002).await;
    let b = Arc::new(b);
    let mut typed = b.receiver::<u64>(ChannelId(10), false).unwrap();
    let mut raw = b.raw_receiver(ChannelId(11), false).unwrap();
    // Limit 0 before anything is queued: returns at once.
    let mut tb: Vec<Delivery<u64>> = Vec::new();
    let mut rb: Vec<Delivery<Bytes>> = Vec::new();
    assert_eq!(
        within(2, "typed recv_many(0)", typed.recv_many(&mut tb, 0)).await,
        0
    );
    assert_eq!(
        within(2, "raw recv_many(0)", raw.recv_many(&mut rb, 0)).await,
        0
    );
    let n = 600u64;
    let t_out = a
        .sender::<u64>(NodeId(2002), opts(10, Guarantee::EffectivelyOnce))
        .unwrap();
    let r_out = a
        .raw_sender(NodeId(2002), opts(11, Guarantee::EffectivelyOnce))
        .unwrap();
    let vals: Vec<u64> = (0..n).collect();
    let rt = within(15, "typed send_many", t_out.send_many(vals.iter()))
        .await
        .unwrap();
    let rr = within(
        15,
        "raw send_many",
        r_out.send_many(
            vals.iter()
                .map(|v| Bytes::copy_from_slice(&v.to_le_bytes())),
        ),
    )
    .await
    .unwrap();
    let seen_t = counts();
    let seen_r = counts();
    // Limit 1: exactly one each time.
    for _ in 0..50 {
        let before = tb.len();
        assert_eq!(
            within(10, "typed recv_many(1)", typed.recv_many(&mut tb, 1)).await,
            1
        );
        assert_eq!(tb.len(), before + 1);
        let before = rb.len();
        assert_eq!(
            within(10, "raw recv_many(1)", raw.recv_many(&mut rb, 1)).await,
            1
        );
        assert_eq!(rb.len(), before + 1);
    }
    // Limit 0 with messages queued: 0, nothing taken.
    assert_eq!(
        within(2, "typed recv_many(0) queued", typed.recv_many(&mut tb, 0)).await,
        0
    );
    assert_eq!(
        within(2, "raw recv_many(0) queued", raw.recv_many(&mut rb, 0)).await,
        0
    );
    assert_eq!((tb.len(), rb.len()), (50, 50));
    for d in tb.drain(..) {
        bump(&seen_t, *d.message());
        d.ack();
    }
    for d in rb.drain(..) {
        bump(
            &seen_r,
            u64::from_le_bytes(d.message()[..8].try_into().unwrap()),
        );
        d.ack();
    }
    // Huge limit until all are in.
    while (seen_t.lock().unwrap().values().sum::<u32>() as u64) < n {
        let k = within(
            10,
            "typed recv_many(MAX)",
            typed.recv_many(&mut tb, usize::MAX),
        )
        .await;
        assert_eq!(k, tb.len(), "returned count equals added");
        for d in tb.drain(..) {
            bump(&seen_t, *d.message());
            d.ack();
        }
    }
    while (seen_r.lock().unwrap().values().sum::<u32>() as u64) < n {
        let k = within(10, "raw recv_many(MAX)", raw.recv_many(&mut rb, usize::MAX)).await;
        assert_eq!(k, rb.len(), "returned count equals added");
        for d in rb.drain(..) {
            bump(
                &seen_r,
                u64::from_le_bytes(d.message()[..8].try_into().unwrap()),
            );
            d.ack();
        }
    }
    let res_t = settle(
        rt.into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect(),
        15,
    )
    .await;
    let res_r = settle(
        rr.into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect(),
        15,
    )
    .await;
    assert_all_acked(&res_t, "typed");
    assert_all_acked(&res_r, "raw");
    assert_each_once(&seen_t, n, "typed recv_many");
    assert_each_once(&seen_r, n, "raw recv_many");
    within(15, "shutdown b", b.shutdown()).await;
    assert_eq!(
        within(
            5,
            "typed recv_many after shutdown",
            typed.recv_many(&mut tb, usize::MAX)
        )
        .await,
        0
    );
    assert_eq!(
        within(5, "raw recv_many after shutdown", raw.recv_many(&mut rb, 1)).await,
        0
    );
    within(15, "shutdown a", a.shutdown()).await;
}

// ------------------------------------------------------------------- runtimes

/// `NodeBuilder::build`: "Must run inside a tokio runtime" — any tokio runtime: both
/// nodes on a `current_thread` runtime, handlers acking from `spawn_blocking` and plain
/// threads: 1 500 effectively-once messages, every receipt `Acked`, each processed once.
#[tokio::test(flavor = "current_thread")]
async fn c11_current_thread_runtime_with_acks_from_blocking_threads() {
    let (a, b) = pair(2101, 2102).await;
    let mut inbox = b.receiver::<u64>(ChannelId(12), false).unwrap();
    let seen = counts();
    let seen2 = seen.clone();
    let h = tokio::spawn(async move {
        let mut i = 0u64;
        while let Some(d) = inbox.recv().await {
            let seen = seen2.clone();
            i += 1;
            if i.is_multiple_of(2) {
                tokio::task::spawn_blocking(move || {
                    bump(&seen, *d.message());
                    d.ack();
                });
            } else {
                std::thread::spawn(move || {
                    bump(&seen, *d.message());
                    d.ack();
                });
            }
        }
    });
    let out = a
        .sender::<u64>(NodeId(2102), opts(12, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 1500u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let res = settle(rs, 20).await;
    assert_all_acked(&res, "current_thread runtime");
    wait_until(5, "processed", || seen.lock().unwrap().len() as u64 >= n).await;
    assert_each_once(&seen, n, "current_thread runtime");
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "receiver task", h).await.unwrap();
}

/// A multi-thread runtime with a single worker, durable dedup (whose fsync runs under
/// `block_in_place` on that worker) and `ack_durable` from 1 000 concurrent tasks:
/// every `ack_durable` resolves `Ok(())`, every receipt `Acked`, each processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn c12_one_worker_runtime_durable_dedup_ack_durable_from_many_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::default();
    cfg.dedup.durable = Some(DurableDedup::new(dir.path()));
    let b = receiver_node_cfg(2202, &[2201], cfg).await;
    let a = sender_node(2201, 2202, b.local_addr().unwrap()).await;
    let mut inbox = b.receiver::<u64>(ChannelId(13), false).unwrap();
    let seen = counts();
    let fails = Arc::new(Mutex::new(Vec::new()));
    let (seen2, fails2) = (seen.clone(), fails.clone());
    let h = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            let (seen, fails) = (seen2.clone(), fails2.clone());
            tokio::spawn(async move {
                let v = *d.message();
                bump(&seen, v);
                if let Err(e) = d.ack_durable().await {
                    fails.lock().unwrap().push((v, e));
                }
            });
        }
    });
    let out = a
        .sender::<u64>(NodeId(2202), opts(13, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 1000u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let res = settle(rs, 20).await;
    assert_all_acked(&res, "one worker, durable dedup");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fails.lock().unwrap().is_empty(),
        "ack_durable failed: {:?}",
        fails.lock().unwrap()
    );
    assert_each_once(&seen, n, "one worker, durable dedup");
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "receiver task", h).await.unwrap();
}

/// Nodes built on runtime A; a `current_thread` runtime B on another thread sends, a
/// one-worker runtime C receives, a plain thread reads stats; B shuts the sender down
/// ("Every call waits for the stop"). Everything resolves; effectively-once processed
/// exactly once.
#[test]
fn c13_node_built_on_one_runtime_used_from_two_others() {
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt_a.block_on(pair(2301, 2302));
    let a = Arc::new(a);
    let inbox = b.receiver::<u64>(ChannelId(14), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(2302), opts(14, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 800u64;
    let seen = counts();
    let seen2 = seen.clone();
    let receiver = std::thread::spawn(move || {
        let rt_c = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt_c.block_on(async move {
            let mut inbox = inbox;
            while seen2.lock().unwrap().len() < n as usize {
                let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(15), inbox.recv()).await
                else {
                    break;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    bump(&seen, *d.message());
                    d.ack();
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
    });
    let a2 = a.clone();
    let res = on_thread_within(25, "runtime B sends", move || {
        let rt_b = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt_b.block_on(async move {
            let mut rs = Vec::new();
            for v in 0..n {
                rs.push((v, out.send(&v).await.unwrap()));
            }
            let res = settle(rs, 20).await;
            let st = a2.stats().await.unwrap();
            (res, st.proto.sent, st.proto.acked)
        })
    });
    assert_all_acked(&res.0, "sent from runtime B");
    assert_eq!((res.1, res.2), (n, n), "sent / acked counters");
    on_thread_within(20, "runtime C receives", move || receiver.join().unwrap());
    assert_each_once(&seen, n, "received on runtime C");
    let a2 = a.clone();
    let st = on_thread_within(10, "stats from a plain thread", move || {
        futures::executor::block_on(a2.stats())
    });
    assert!(st.is_ok(), "{st:?}");
    let a2 = a.clone();
    on_thread_within(20, "shutdown from runtime B", move || {
        let rt_b = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt_b.block_on(async move {
            a2.shutdown().await;
            assert!(a2.closed().await.is_ok());
        })
    });
    rt_a.block_on(async { within(15, "shutdown b", b.shutdown()).await });
}

/// A runtime dropped while its node is alive is the node's driver gone. The docs: a
/// receipt fails with a `SendError` "that ended it"; a send after the stop fails with
/// `SendError::Shutdown` / `NodeFailed`; `Receiver::recv` is `None` "once the node has
/// shut down"; `Node::stats` / `sender` / `receiver` fail with `NodeError`;
/// `ack_durable` fails with `NodeStopped`; `Node::shutdown` "waits for the driver to
/// finish". None of them may hang or panic.
#[test]
fn c14_runtime_dropped_under_a_live_node_handles_fail_typed() {
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rt_t = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt_a.block_on(pair(2401, 2402));
    let mut inbox = b.receiver::<u64>(ChannelId(15), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(2402), opts(15, Guarantee::EffectivelyOnce))
        .unwrap();
    let (pending, mut held, queued) = rt_t.block_on(async {
        // A healthy round first.
        let r = within(10, "send", out.send(&0)).await.unwrap();
        let d = within(10, "recv", inbox.recv()).await.unwrap();
        d.ack();
        assert_eq!(within(10, "receipt", r).await, Ok(Outcome::Acked));
        // Then 30 held by the application, unacked.
        let mut rs = Vec::new();
        for v in 1..=30u64 {
            rs.push(within(10, "send", out.send(&v)).await.unwrap());
        }
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(within(10, "recv", inbox.recv()).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        (rs, held, 10usize)
    });
    // The runtime of both nodes goes away.
    drop(rt_a);
    rt_t.block_on(async {
        for r in pending {
            let r = within(10, "pending receipt after runtime drop", r).await;
            assert!(
                matches!(
                    r,
                    Err(SendError::Shutdown | SendError::NodeFailed(_)) | Ok(Outcome::Acked)
                ),
                "pending receipt: {r:?}"
            );
        }
        let r = within(10, "send after runtime drop", out.send(&99)).await;
        assert!(
            matches!(r, Err(SendError::Shutdown | SendError::NodeFailed(_))),
            "send after runtime drop: {r:?}"
        );
        let r = out.try_send(&99);
        assert!(r.is_err(), "try_send after runtime drop: {r:?}");
        let st = within(10, "stats after runtime drop", a.stats()).await;
        assert!(
            matches!(st, Err(NodeError::Shutdown | NodeError::Failed(_))),
            "stats: {st:?}"
        );
        let s = a.sender::<u64>(NodeId(2402), opts(16, Guarantee::AtLeastOnce));
        assert!(s.is_err(), "sender after runtime drop: {s:?}");
        let rcv = b.receiver::<u64>(ChannelId(16), false);
        assert!(rcv.is_err(), "receiver after runtime drop: {rcv:?}");
        // The receiver yields what was queued, then ends.
        let mut rest = 0;
        while let Some(d) = within(10, "recv after runtime drop", inbox.recv()).await {
            rest += 1;
            held.push(d);
        }
        assert!(rest <= queued, "{rest} queued deliveries");
        let durable = held.pop().unwrap();
        let r = within(5, "ack_durable after runtime drop", durable.ack_durable()).await;
        assert_eq!(r, Err(AckError::NodeStopped));
        for (i, d) in held.into_iter().enumerate() {
            match i % 3 {
                0 => d.ack(),
                1 => d.nack(),
                _ => drop(d),
            }
        }
        within(10, "shutdown a after runtime drop", a.shutdown()).await;
        within(10, "shutdown b after runtime drop", b.shutdown()).await;
        drop(a);
        drop(b);
    });
}

/// `Node::closed`: "Resolves when the node has stopped: `Ok(())` after
/// `Node::shutdown` (or once the last handle is gone), `NodeError::Failed` with the
/// cause if its driver died unexpectedly. Await it next to your service's other tasks
/// to notice a dead node at once." A node whose runtime was dropped has stopped (its
/// driver is gone and every other call fails): `closed()` must resolve, not hang.
#[test]
fn c15_closed_resolves_when_the_nodes_runtime_is_dropped() {
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rt_t = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt_a.block_on(pair(2501, 2502));
    let a = Arc::new(a);
    let a2 = a.clone();
    // Someone awaits closed() on another runtime, as the doc advises.
    let watcher = rt_t.spawn(async move { a2.closed().await });
    drop(rt_a);
    rt_t.block_on(async {
        let st = within(10, "stats", a.stats()).await;
        assert!(st.is_err(), "the node is stopped: stats {st:?}");
        let r = tokio::time::timeout(Duration::from_secs(10), watcher).await;
        assert!(
            r.is_ok(),
            "Node::closed() never resolved although the node's driver is gone \
             (every other call already fails)"
        );
        let r = tokio::time::timeout(Duration::from_secs(5), a.closed()).await;
        assert!(r.is_ok(), "a fresh Node::closed() call hangs too");
    });
    drop(b);
}

/// As c15, with the node's runtime dropped before its driver task ever ran: a
/// `current_thread` runtime runs spawned tasks only while `block_on` waits, so the
/// node built last in `block_on` has a driver that was never polled. (Regression: the
/// end was recorded by a guard made inside the driver task, so an unstarted task
/// recorded nothing and `closed()` hung; c15 failed so under load.)
#[test]
fn c15b_closed_resolves_when_the_runtime_goes_before_the_driver_ever_ran() {
    for round in 0..20 {
        let rt_a = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let net = ackwire::transport::mem::MemNetwork::new(Default::default()).unwrap();
        let a = rt_a.block_on(async {
            Node::builder(NodeId(2551))
                .transport(net.transport(NodeId(2551)))
                .build()
                .await
                .unwrap()
        });
        drop(rt_a);
        let rt_t = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt_t.block_on(async {
            let r = tokio::time::timeout(Duration::from_secs(5), a.closed()).await;
            assert!(r.is_ok(), "round {round}: closed() hangs");
        });
    }
}

/// The regression noted in `supervise` ("a send waiting on a full window hung for
/// good") for a runtime dropped instead of a node dropped: `send` "Waits while the
/// stream's window is full"; once the node is gone it must fail
/// (`SendError::Shutdown` / `NodeFailed`), not wait forever.
#[test]
fn c16_send_waiting_on_a_full_window_returns_when_the_nodes_runtime_is_dropped() {
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rt_t = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let b = rt_t.block_on(receiver_node(2602, &[2601]));
    let addr = b.local_addr().unwrap();
    let a = rt_a.block_on(sender_node(2601, 2602, addr));
    let out = a
        .raw_sender(NodeId(2602), opts(17, Guarantee::AtLeastOnce))
        .unwrap();
    let mut inbox = b.raw_receiver(ChannelId(17), false).unwrap();
    // The receiver holds everything: the window fills.
    let holder = rt_t.spawn(async move {
        let mut held = Vec::new();
        while let Some(d) = inbox.recv().await {
            held.push(d);
        }
        held.len()
    });
    let mut accepted = 0usize;
    let mut _receipts = Vec::new();
    loop {
        match out.try_send(Bytes::from_static(b"x")) {
            Ok(r) => {
                _receipts.push(r);
                accepted += 1;
            }
            Err(SendError::WindowFull { .. }) => break,
            Err(e) => panic!("try_send: {e:?}"),
        }
        assert!(accepted <= window(), "window larger than documented");
    }
    assert_eq!(accepted, window());
    let out2 = out.clone();
    let waiting = rt_t.spawn(async move { out2.send(Bytes::from_static(b"y")).await.map(|_| ()) });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiting.is_finished(),
        "send waits while the window is full"
    );
    drop(rt_a);
    rt_t.block_on(async {
        let r = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        match r {
            Ok(Ok(r)) => assert!(
                matches!(r, Err(SendError::Shutdown | SendError::NodeFailed(_))),
                "waiting send: {r:?}"
            ),
            Ok(Err(e)) => panic!("task: {e:?}"),
            Err(_) => panic!(
                "hang: a send waiting on the full window never returned after the node's \
                 runtime was dropped"
            ),
        }
        within(15, "shutdown b", b.shutdown()).await;
        within(5, "holder", holder).await.unwrap();
    });
    drop(a);
}

// ------------------------------------------------------------------- shutdown

/// `Node::shutdown`: "refuse new sends (`SendError::Shutdown`), wait up to
/// `shutdown_drain` for unacknowledged messages, then ... without handoff they fail
/// with `SendError::Shutdown` ... Every call waits for the stop, also one made while
/// another is in progress." 12 tasks sending with `send`, `try_send` and `send_many`
/// while the receiver acks from many tasks; three tasks call `shutdown` at once. Every
/// call returns, every receipt resolves `Acked` or `Shutdown`, every `Acked` value was
/// processed, and sends after the stop fail `Shutdown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c17_shutdown_from_three_tasks_while_twelve_tasks_send_and_many_ack() {
    let (a, b) = pair(2701, 2702).await;
    let a = Arc::new(a);
    let seen = counts();
    let deliveries = Arc::new(AtomicU64::new(0));
    let mut inbox = b.receiver::<u64>(ChannelId(18), false).unwrap();
    let (seen2, del2) = (seen.clone(), deliveries.clone());
    let consumer = tokio::spawn(async move {
        let mut s = 5u64;
        while let Some(d) = inbox.recv().await {
            del2.fetch_add(1, Ordering::Relaxed);
            let seen = seen2.clone();
            let wait = rnd(&mut s) % 5;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                bump(&seen, *d.message());
                d.ack();
            });
        }
    });
    let out = a
        .sender::<u64>(NodeId(2702), opts(18, Guarantee::AtLeastOnce))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..12u64 {
        let (out, stop) = (out.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rs: Vec<(u64, Receipt)> = Vec::new();
            let mut i = 0u64;
            let mut refused_after_stop = 0u64;
            loop {
                let v = t * 1_000_000 + i;
                i += 1;
                let r = match t % 3 {
                    0 => out.send(&v).await.map(|r| vec![(v, r)]),
                    1 => match out.try_send(&v) {
                        Err(SendError::WindowFull { .. }) => {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        r => r.map(|r| vec![(v, r)]),
                    },
                    _ => {
                        let vs = [v, v + 500_000];
                        out.send_many(vs.iter())
                            .await
                            .map(|rs| vs.iter().copied().zip(rs).collect())
                    }
                };
                match r {
                    Ok(mut more) => rs.append(&mut more),
                    Err(SendError::Shutdown) => {
                        refused_after_stop += 1;
                        if refused_after_stop >= 3 {
                            break;
                        }
                    }
                    Err(e) => panic!("send: {e:?}"),
                }
                if stop.load(Ordering::Relaxed) && refused_after_stop == 0 && i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            settle(rs, 20).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut stoppers = Vec::new();
    for _ in 0..3 {
        let a = a.clone();
        stoppers.push(tokio::spawn(async move { a.shutdown().await }));
    }
    for s in stoppers {
        within(20, "concurrent shutdown", s).await.unwrap();
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within(25, "sending task", t).await.unwrap());
    }
    let mut acked = 0;
    for (v, r) in &all {
        match r {
            Ok(Outcome::Acked) => {
                acked += 1;
                assert!(
                    seen.lock().unwrap().contains_key(v),
                    "{v} Acked but never processed"
                );
            }
            Err(SendError::Shutdown) => {}
            other => panic!("receipt of {v}: {other:?}"),
        }
    }
    assert!(acked > 0, "something was acked before the stop");
    assert!(within(5, "closed", a.closed()).await.is_ok());
    let r = out.send(&1).await;
    assert!(matches!(r, Err(SendError::Shutdown)), "after stop: {r:?}");
    // The handlers may still be draining B's queue on a loaded machine: wait (bounded)
    // for them to catch up with B's count instead of a fixed 200 ms.
    let give_up = std::time::Instant::now() + Duration::from_secs(15);
    let sb = loop {
        let sb = within(5, "stats b", b.stats()).await.unwrap();
        if sb.proto.delivered == deliveries.load(Ordering::Relaxed)
            || std::time::Instant::now() > give_up
        {
            break sb;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        sb.proto.delivered,
        deliveries.load(Ordering::Relaxed),
        "delivered"
    );
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "consumer", consumer).await.unwrap();
}

/// "Dropping a `Node` instead stops it at once"; the stop must resolve receipts and
/// end receivers whichever thread drops it: the last `Arc<Node>` of a sender dropped
/// inside `spawn_blocking`, a receiving node dropped on a plain thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c18_nodes_dropped_in_spawn_blocking_and_on_a_plain_thread() {
    let (a, b) = pair(2801, 2802).await;
    let a = Arc::new(a);
    let mut inbox = b.receiver::<u64>(ChannelId(19), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(2802), opts(19, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut rs = Vec::new();
    for v in 0..20u64 {
        rs.push(within(10, "send", out.send(&v)).await.unwrap());
    }
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(within(10, "recv", inbox.recv()).await.unwrap());
    }
    // The sender node's last handle goes in spawn_blocking.
    within(
        5,
        "drop in spawn_blocking",
        tokio::task::spawn_blocking(move || drop(a)),
    )
    .await
    .unwrap();
    for r in rs {
        let r = within(10, "receipt after drop", r).await;
        assert!(
            matches!(r, Err(SendError::Shutdown | SendError::NodeFailed(_))),
            "{r:?}"
        );
    }
    let r = within(10, "send after drop", out.send(&1)).await;
    assert!(
        matches!(r, Err(SendError::Shutdown | SendError::NodeFailed(_))),
        "{r:?}"
    );
    // The receiving node is dropped on a plain thread.
    std::thread::spawn(move || drop(b)).join().unwrap();
    let end = within(10, "receiver ends after its node is dropped", inbox.recv()).await;
    assert!(end.is_none(), "nothing more queued");
    let d = held.pop().unwrap();
    assert_eq!(
        within(5, "ack_durable", d.ack_durable()).await,
        Err(AckError::NodeStopped)
    );
    std::thread::spawn(move || held.into_iter().for_each(|d| d.ack()))
        .join()
        .unwrap();
}

// --------------------------------------------------------------- cancellation

/// `ack_durable` is an `async fn` taking the delivery: dropped before its first poll
/// the delivery is dropped unfinished ("dropping it unfinished is a nack": redelivered);
/// polled once and then dropped, the ack was given ("Processed: acknowledge") and the
/// message is done. `stats()` futures dropped after one poll leave the node working;
/// a `shutdown()` future dropped after one poll still stops the node, and a second
/// `shutdown()` waits for the stop ("Every call waits for the stop").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c19_cancelled_ack_durable_stats_and_shutdown_futures() {
    let (a, b) = pair(2901, 2902).await;
    let a = Arc::new(a);
    let mut inbox = b.receiver::<u64>(ChannelId(20), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(2902), opts(20, Guarantee::EffectivelyOnce))
        .unwrap();
    // (1) never polled: a nack.
    let r1 = within(10, "send", out.send(&1)).await.unwrap();
    let d = within(10, "recv", inbox.recv()).await.unwrap();
    assert_eq!(*d.message(), 1);
    drop(d.ack_durable());
    let d = within(10, "redelivery after an unpolled ack_durable", inbox.recv())
        .await
        .unwrap();
    assert_eq!(*d.message(), 1);
    d.ack();
    assert_eq!(within(10, "receipt 1", r1).await, Ok(Outcome::Acked));
    // (2) polled once, then dropped: acked, not delivered again.
    let r2 = within(10, "send", out.send(&2)).await.unwrap();
    let d = within(10, "recv", inbox.recv()).await.unwrap();
    assert_eq!(*d.message(), 2);
    let fut = d.ack_durable();
    let _ = fut.now_or_never(); // one poll: the ack command is sent, then cancelled
    assert_eq!(within(10, "receipt 2", r2).await, Ok(Outcome::Acked));
    let again = tokio::time::timeout(Duration::from_millis(800), inbox.recv()).await;
    assert!(
        again.is_err(),
        "acked message delivered again: {:?}",
        again.map(|d| d.map(|d| *d.message()))
    );
    // (3) stats futures cancelled.
    for _ in 0..300 {
        let _ = a.stats().now_or_never();
        let _ = b.stats().now_or_never();
    }
    let st = within(5, "stats", a.stats()).await.unwrap();
    assert_eq!((st.proto.sent, st.proto.acked), (2, 2));
    let r3 = within(10, "send", out.send(&3)).await.unwrap();
    within(10, "recv", inbox.recv()).await.unwrap().ack();
    assert_eq!(within(10, "receipt 3", r3).await, Ok(Outcome::Acked));
    // (4) shutdown cancelled after one poll, then again.
    let _ = tokio::time::timeout(Duration::from_millis(1), a.shutdown()).await;
    within(15, "second shutdown", a.shutdown()).await;
    assert!(within(5, "closed", a.closed()).await.is_ok());
    let r = out.send(&4).await;
    assert!(matches!(r, Err(SendError::Shutdown)), "{r:?}");
    within(15, "shutdown b", b.shutdown()).await;
}

/// `send_many`: "Waits for window space like `RawSender::send`, a window's worth at a
/// time; each chunk reaches the driver as one step." A `send_many` of three windows
/// cancelled while it waits for the second chunk: the first window's messages, handed
/// to the node, are delivered (nothing accepted is lost), nothing of the later chunks
/// is sent, and no window slot leaks: afterwards exactly a window of `try_send`s fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c20_send_many_cancelled_midway_loses_nothing_accepted_and_leaks_no_slot() {
    let (a, b) = pair(3001, 3002).await;
    let w = window() as u64;
    let mut inbox = b.receiver::<u64>(ChannelId(21), false).unwrap();
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::new(Mutex::new(Vec::new()));
    let seen = counts();
    let (held2, seen2) = (held.clone(), seen.clone());
    let holder = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            bump(&seen2, *d.message());
            held2.lock().unwrap().push(d);
        }
    });
    let out = a
        .sender::<u64>(NodeId(3002), opts(21, Guarantee::EffectivelyOnce))
        .unwrap();
    let vals: Vec<u64> = (0..3 * w).collect();
    {
        let fut = out.send_many(vals.iter());
        tokio::pin!(fut);
        // Run it until the first window is with the receiver, then cancel.
        let full = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                tokio::select! {
                    r = &mut fut => panic!("send_many finished with the window full: {:?}", r.map(|v| v.len())),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                if seen.lock().unwrap().len() as u64 >= w {
                    break;
                }
            }
        })
        .await;
        assert!(full.is_ok(), "hang: the first window never arrived");
        tokio::time::sleep(Duration::from_millis(300)).await;
    } // dropped here
      // Release the first window.
    let first: Vec<_> = std::mem::take(&mut *held.lock().unwrap());
    assert_eq!(first.len() as u64, w);
    for d in first {
        d.ack();
    }
    let a_ref = &a;
    within(10, "first window acked", async {
        loop {
            let st = a_ref.stats().await.unwrap();
            if st.proto.acked >= w {
                break st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let c = seen.lock().unwrap();
        let beyond: Vec<_> = c.keys().filter(|v| **v >= w).take(5).collect();
        assert!(
            beyond.is_empty(),
            "later chunks of the cancelled batch were sent: {beyond:?}"
        );
        assert_eq!(c.len() as u64, w, "the first window delivered");
    }
    // No slot leaked: exactly a window of try_sends fits (the receiver holds them).
    let mut fit = 0u64;
    let mut rs = Vec::new();
    loop {
        match out.try_send(&(10 * w + fit)) {
            Ok(r) => {
                rs.push(r);
                fit += 1;
            }
            Err(SendError::WindowFull { .. }) => break,
            Err(e) => panic!("{e:?}"),
        }
        assert!(fit <= w);
    }
    assert_eq!(fit, w, "window slots after a cancelled send_many");
    for d in std::mem::take(&mut *held.lock().unwrap()) {
        d.ack();
    }
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "holder", holder).await.unwrap();
}

// ---------------------------------------------------------------- slow handlers

/// README: "`send` waits only while the stream's window is full"; flow control: a
/// receiver "never refuses one for lack of room"; effectively-once: a duplicate "is
/// not delivered". 6 000 effectively-once messages (half again the window) from six
/// tasks to a handler that takes 2.5 s per message (concurrently), default settings:
/// every send succeeds (back-pressure, not errors), every receipt `Acked`, each value
/// processed exactly once, nothing given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c21_thousands_in_flight_to_a_seconds_slow_handler() {
    let (a, b) = pair(3101, 3102).await;
    let mut inbox = b.receiver::<u64>(ChannelId(22), false).unwrap();
    let seen = counts();
    let seen2 = seen.clone();
    let h = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                bump(&seen, *d.message());
                tokio::time::sleep(Duration::from_millis(2500)).await;
                d.ack();
            });
        }
    });
    let out = a
        .sender::<u64>(NodeId(3102), opts(22, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 6000u64;
    let per = n / 6;
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            let mut rs = Vec::new();
            for i in 0..per {
                let v = t * per + i;
                match out.send(&v).await {
                    Ok(r) => rs.push((v, r)),
                    Err(e) => panic!("send of {v} failed instead of waiting: {e:?}"),
                }
            }
            settle(rs, 25).await
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within(30, "sending task", t).await.unwrap());
    }
    assert_all_acked(&all, "slow handler");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_each_once(&seen, n, "slow handler");
    let st = within(5, "stats", a.stats()).await.unwrap();
    assert_eq!(st.proto.gave_up, 0);
    eprintln!(
        "slow handler: retransmitted {} of {n}",
        st.proto.retransmitted
    );
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "handler", h).await.unwrap();
}

/// A serial handler that stalls 6 s on its first message while 3 000 more are queued
/// behind it (default settings), then works fast; the first delivery is handed to a
/// plain thread that sleeps. "Acks also say which messages the receiver already
/// holds ... so a slow handler does not cause retransmissions"; effectively-once
/// duplicates are not delivered: every receipt `Acked`, each value processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c22_serial_handler_stalled_seconds_with_thousands_queued() {
    let (a, b) = pair(3201, 3202).await;
    let mut inbox = b.receiver::<u64>(ChannelId(23), false).unwrap();
    let seen = counts();
    let seen2 = seen.clone();
    let h = tokio::spawn(async move {
        let mut first = true;
        while let Some(d) = inbox.recv().await {
            bump(&seen2, *d.message());
            if first {
                first = false;
                tokio::task::spawn_blocking(move || {
                    std::thread::sleep(Duration::from_secs(6));
                    d.ack();
                })
                .await
                .unwrap();
            } else {
                d.ack();
            }
        }
    });
    let out = a
        .sender::<u64>(NodeId(3202), opts(23, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 3000u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let res = settle(rs, 20).await;
    assert_all_acked(&res, "stalled serial handler");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_each_once(&seen, n, "stalled serial handler");
    let st = within(5, "stats", a.stats()).await.unwrap();
    eprintln!(
        "stalled handler: retransmitted {} of {n}",
        st.proto.retransmitted
    );
    within(15, "shutdown a", a.shutdown()).await;
    within(15, "shutdown b", b.shutdown()).await;
    within(5, "handler", h).await.unwrap();
}

// ---------------------------------------------------------------------- groups

/// Replica groups: "the first ack from any attempt settles it"; `GroupStats::messages`
/// = "Messages accepted by `send`", `acked` = "Messages acked"; fresh keys are "unique
/// within the run". Eight tasks share clones of one `GroupSender` over two members:
/// every receipt `Ok`, keys unique, each message processed once in all, and the
/// counters equal the receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c23_one_group_sender_shared_by_eight_tasks() {
    let r1 = receiver_node(3302, &[3301]).await;
    let r2 = receiver_node(3303, &[3301]).await;
    let node = Arc::new(
        within(
            10,
            "build",
            Node::builder(NodeId(3301)).bind(any_addr()).build(),
        )
        .await
        .unwrap(),
    );
    let ch = ChannelId(24);
    let seen = counts();
    let d1 = Arc::new(AtomicU64::new(0));
    let _h1 = ack_in_tasks(
        r1.receiver::<u64>(ch, false).unwrap(),
        seen.clone(),
        d1.clone(),
    );
    let _h2 = ack_in_tasks(
        r2.receiver::<u64>(ch, false).unwrap(),
        seen.clone(),
        d1.clone(),
    );
    let members = StaticMembers::new([
        (NodeId(3302), r1.local_addr().unwrap()),
        (NodeId(3303), r2.local_addr().unwrap()),
    ])
    .unwrap();
    let group = within(
        10,
        "group",
        GroupSender::<u64>::new(node.clone(), GroupConfig::new(ch), members),
    )
    .await
    .unwrap();
    let per = 150u64;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let g = group.clone();
        tasks.push(tokio::spawn(async move {
            let mut rs = Vec::new();
            for i in 0..per {
                rs.push(g.send(&(t * per + i)).await.expect("group send"));
            }
            let mut out = Vec::new();
            for r in rs {
                let key = r.key();
                out.push((key, r.await));
            }
            out
        }));
    }
    let mut keys = HashSet::new();
    let mut bad = Vec::new();
    for t in tasks {
        for (k, r) in within(25, "group task", t).await.unwrap() {
            assert!(keys.insert(k), "key {k:?} handed out twice");
            if r.is_err() {
                bad.push(r);
            }
        }
    }
    assert!(
        bad.is_empty(),
        "group receipts failed: {:?}",
        &bad[..bad.len().min(5)]
    );
    let n = 8 * per;
    wait_until(5, "processed", || seen.lock().unwrap().len() as u64 >= n).await;
    assert_each_once(&seen, n, "group");
    let st = group.stats();
    assert_eq!((st.messages, st.acked), (n, n), "group counters: {st:?}");
    drop(group);
    within(15, "shutdown node", node.shutdown()).await;
    within(15, "shutdown r1", r1.shutdown()).await;
    within(15, "shutdown r2", r2.shutdown()).await;
}

/// `DeadLetters`: "Ends once the node has stopped and the queue is empty";
/// `DeadLetters::recv`: "`None` once the node has stopped and none are left". A node
/// whose runtime was dropped has stopped (every call fails with `Shutdown`): a task
/// reading its dead letters on another runtime must see the end, not wait forever.
#[test]
fn c24_dead_letters_end_when_the_nodes_runtime_is_dropped() {
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rt_t = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let node = rt_a.block_on(receiver_node(3402, &[]));
    let mut letters = node.dead_letters();
    let reader = rt_t.spawn(async move { letters.recv().await.is_none() });
    drop(rt_a);
    rt_t.block_on(async {
        let st = within(10, "stats", node.stats()).await;
        assert!(st.is_err(), "the node is stopped: stats {st:?}");
        let r = tokio::time::timeout(Duration::from_secs(10), reader).await;
        match r {
            Ok(Ok(ended)) => assert!(ended, "a dead letter appeared from nowhere"),
            Ok(Err(e)) => panic!("reader task: {e:?}"),
            Err(_) => panic!(
                "hang: DeadLetters::recv never returned None although the node's driver is gone"
            ),
        }
    });
    drop(node);
}
