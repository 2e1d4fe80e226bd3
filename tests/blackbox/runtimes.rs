//! Black-box tests of runtimes, time and cancellation, written from the docs (README,
//! rustdoc of the public items, `ackwire::testing`) against real TCP on loopback with
//! default settings: tokio's paused clock under real TCP nodes (every guarantee, a
//! virtual idle minute, handlers working in `spawn_blocking` or on a plain thread),
//! `current_thread` runtimes with the batch API and shutdown, nodes on runtimes of
//! their own with one runtime dropped under sends in flight (receipts on the other
//! side, a receiver restarted on a fresh runtime, at-most-once messages waiting for
//! credit, a sender's new run resending under the same keys), handlers on a runtime
//! of their own that is dropped with deliveries held, `send`, receipts and
//! `recv_many` cancelled at their await points, a sink and a tower service after
//! their node's runtime is gone, the node's event streams after it stopped, durable
//! acks from plain threads with the node on one thread, a group sender used from a
//! plain thread, runtimes missing a driver, and `build()` cancelled after it started
//! its transport. (`tests/blackbox/concurrency.rs` already covers plain threads
//! sharing handles, `recv` cancelled in `select!`, `send_many` cancelled, one runtime
//! running both nodes dropped, `closed()`, `DeadLetters` and window waits after a
//! runtime drop; not repeated here.)
//!
//! Every await that could hang is bounded (`within` on tokio's clock; tests on the
//! paused clock are bounded by the wall clock instead, `on_thread_within`, as a
//! timeout on a paused clock fires at once when the runtime idles). No assertion is
//! about a timing figure.
//!
//! Found:
//!
//! * `r10_event_streams_end_when_the_node_stops` (fixed): `Node::health_events()` and
//!   `Node::identity_conflicts()` never ended. Their `broadcast::Sender`s lived in the
//!   node's shared state, which every handle (the `Node` the application keeps to call
//!   `shutdown`, senders, receivers) holds, so a monitoring loop
//!   `while let Ok(ev) = events.recv().await` waited for good after `shutdown()`, a
//!   driver failure or a dropped runtime (10 s bound hit on every run), unlike a
//!   `Receiver` (ends at shutdown) and `DeadLetters::recv`. Fix: the senders sit in an
//!   `EventTx` (`src/node/shared.rs`) that `EndGuard` (`src/node/supervise.rs`, which
//!   runs however the node stops) closes; a subscription taken after the stop is
//!   closed at once; the two methods' docs say so. The group sender's background task
//!   already treated `Closed` (it stops listening).
//! * `r17_group_send_from_a_plain_thread` (fixed): a node's `Sender` works from a
//!   plain thread with no tokio context (`futures::executor::block_on`), but
//!   `GroupSender::send` from one panicked ("there is no reactor running") in
//!   `tokio::spawn` of its re-route task (`src/group.rs`, `send_with_key`) — after its
//!   first attempt had already been made, so the message went out and the caller got
//!   a panic instead of a receipt; with no live member the `member_wait` timer
//!   (`place`, `tokio::time::sleep_until`) panicked the same way. Fix: the group
//!   keeps the handle of the runtime `GroupSender::new` ran on (it must run inside
//!   one) and, only for a caller on no runtime, spawns the re-route task and runs the
//!   `member_wait` timer there (`Inner::spawn`, `Inner::sleep_until`, the timer
//!   aborted when its waiter goes); a caller on a runtime is served exactly as
//!   before.
//! * `r18_recv_ends_when_the_nodes_runtime_is_dropped_with_deliveries_queued`
//!   (fixed): after the node's runtime was dropped, its `Receiver`, used from another
//!   runtime, kept handing out the deliveries queued in it, whose acks reached no one.
//!   Fix: `EndGuard` stops the receivers however the node ends.
//! * `r13_build_on_a_runtime_without_io_or_time_fails_typed` (fixed: `build()` probes
//!   for a timer and, over TCP, an IO registration, and returns
//!   `NodeError::RuntimeDriver`; was): `build()` does
//!   not check the runtime's drivers. On a `current_thread` runtime built with
//!   `enable_io()` only, `build()` returns `Ok` and the driver task panics on its first
//!   timer (`src/node/driver.rs`, "timers are disabled"), so the node is dead from the
//!   start: `stats()` and every later call fail `NodeError::Failed` naming the cause.
//!   With `enable_time()` only, `build()` itself panics in the application's task at
//!   `TcpListener::from_std` (`src/transport/tcp.rs`, `TcpTransport::start`: "IO is
//!   disabled"). Expected: a typed `NodeError` from `build()` (README: misuse fails
//!   loud with a typed error; no value panics the library), or at least the
//!   requirement in `build()`'s docs ("must run inside a tokio runtime" does not say
//!   with IO and time enabled). tokio offers no public way to ask a handle which
//!   drivers it has, so the probes catch the panic a missing driver raises (under
//!   `panic = "abort"` the process still aborts, as before).
//!
//! Observed and documented, not defects:
//!
//! * On tokio's paused clock a handler that works on a plain thread (one the runtime
//!   does not know about) leaves the runtime idle, so tokio jumps the clock from timer
//!   to timer: with 30 ms of real work per message, 59 or 60 of the 60 at-least-once
//!   receipts failed `Deadline { attempts: 1 }` (30 virtual seconds in about 50 ms of
//!   wall clock) although every message was processed (`r02b`, which asserts only the
//!   typed outcomes). The same work in `spawn_blocking` (tokio holds the clock while
//!   blocking tasks run) gives 60 × `Acked` (`r02a`). The `testing` module docs said
//!   the clock moves whenever every task is idle, but not this consequence for
//!   handlers that do their work off the runtime: a paragraph under "Virtual time"
//!   now does (`src/testing.rs`, docs only).
//! * A receiver whose runtime is dropped with at-least-once messages in flight is not
//!   told apart from a slow one: the sender's in-flight receipts retry until their
//!   deadline and fail `Deadline` (about 30 s), as `NodeConfig::fail_fast_when_down`
//!   documents ("messages already in flight keep retrying until their deadline"),
//!   while at-most-once messages still waiting for credit fail `PeerDown` once the
//!   peer is Down (`r03`, `r11`).

use crate::support::ports;
use ackwire::{ChannelId, ChannelOptions, Delivery, Guarantee, Node, NodeId, Outcome, SendError};
use futures::FutureExt;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

/// `f`'s output, or a panic naming `what` after `secs` of tokio's clock.
async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("hang: {what} did not finish within {secs} s"),
    }
}

/// Run `f` on a plain thread and wait for it at most `secs` of wall-clock time (a
/// hang fails the test; a panic in `f` is the test's panic).
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
        Err(_) => panic!("hang: {what} did not finish within {secs} s (wall clock)"),
    }
}

/// Polls `f` (tokio's clock) until it holds; panics naming `what` after `secs` of wall-clock time.
async fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() >= end {
            panic!("{what}: not reached within {secs} s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pair(a: u64, b: u64) -> (Node, Node) {
    let rb = Node::builder(NodeId(b))
        .bind(any_addr())
        .allow_peer(NodeId(a))
        .build()
        .await
        .unwrap();
    let ra = Node::builder(NodeId(a))
        .bind(any_addr())
        .peer(NodeId(b), rb.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    (ra, rb)
}

fn opts(ch: u32, g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(ChannelId(ch), g)
}

type Counts = Arc<Mutex<HashMap<u64, u32>>>;

fn bump(c: &Counts, v: u64) {
    *c.lock().unwrap().entry(v).or_default() += 1;
}

fn paused_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

fn counts() -> Counts {
    Arc::new(Mutex::new(HashMap::new()))
}

fn assert_each_once(c: &Counts, n: u64, what: &str) {
    let c = c.lock().unwrap();
    let missing: Vec<u64> = (0..n).filter(|v| !c.contains_key(v)).take(10).collect();
    let twice: Vec<(u64, u32)> = c
        .iter()
        .filter(|(_, k)| **k > 1)
        .map(|(v, k)| (*v, *k))
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && twice.is_empty() && c.len() as u64 == n,
        "{what}: {} distinct of {n}; missing (first 10) {missing:?}; more than once {twice:?}",
        c.len()
    );
}

/// A handler task: counts each delivery's value, then acks it.
fn ack_all(mut inbox: ackwire::Receiver<u64>, seen: Counts) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            bump(&seen, *d.message());
            d.ack();
        }
    })
}

// ------------------------------------------------------------------ paused tokio clock

/// The node reads tokio's clock (`tokio::time::Instant`), so a user who tests a
/// service built on real TCP nodes inside `#[tokio::test(start_paused = true)]` gets
/// the same behaviour as on a real clock: every guarantee's receipts settle `Ok`,
/// each effectively-once message is processed once, and a virtual minute of idleness
/// (heartbeats, idle timeouts, detector) leaves the peer `Up` and the next round
/// delivered. Bounded by the wall clock (a `timeout` on the paused clock would fire
/// at once in virtual time).
#[test]
fn r01_paused_clock_tcp_pair_every_guarantee_and_a_virtual_idle_minute() {
    on_thread_within(120, "paused clock over tcp", || {
        paused_rt().block_on(async {
            let (a, b) = pair(5001, 5002).await;
            let gs = [
                (1u32, Guarantee::AtMostOnce, Outcome::Sent),
                (2, Guarantee::AtLeastOnce, Outcome::Acked),
                (3, Guarantee::EffectivelyOnce, Outcome::Acked),
            ];
            let mut seen = Vec::new();
            let mut outs = Vec::new();
            for (ch, g, _) in gs {
                let c = counts();
                ack_all(b.receiver::<u64>(ChannelId(ch), false).unwrap(), c.clone());
                seen.push(c);
                outs.push(a.sender::<u64>(NodeId(5002), opts(ch, g)).unwrap());
            }
            let n = 300u64;
            for round in 0..2u64 {
                for (i, (_, g, want)) in gs.iter().enumerate() {
                    let mut rs = Vec::new();
                    for v in round * n..(round + 1) * n {
                        rs.push(outs[i].send(&v).await.unwrap());
                    }
                    for (k, r) in rs.into_iter().enumerate() {
                        assert_eq!(r.await, Ok(*want), "{g:?} round {round} receipt {k}");
                    }
                }
                if round == 0 {
                    let t0 = tokio::time::Instant::now();
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    assert!(t0.elapsed() >= Duration::from_secs(60));
                    assert_eq!(
                        a.health(NodeId(5002)),
                        Some(ackwire::detector::Health::Up),
                        "after a virtual idle minute"
                    );
                }
            }
            for (i, (_, g, _)) in gs.iter().enumerate() {
                if *g == Guarantee::AtMostOnce {
                    // Nothing is lost on a healthy link; wait for the tail.
                    let c = seen[i].clone();
                    wait_until(20, "at-most-once tail", || {
                        c.lock().unwrap().len() as u64 == 2 * n
                    })
                    .await;
                }
                if *g == Guarantee::EffectivelyOnce || *g == Guarantee::AtMostOnce {
                    assert_each_once(&seen[i], 2 * n, &format!("{g:?} on a paused clock"));
                } else {
                    assert_eq!(seen[i].lock().unwrap().len() as u64, 2 * n, "{g:?}");
                }
            }
            a.shutdown().await;
            b.shutdown().await;
        })
    });
}

/// Where a handler does its work while the test runs on tokio's paused clock.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Worker {
    /// `spawn_blocking`: tokio knows blocking work is running.
    SpawnBlocking,
    /// A plain thread the runtime does not know about.
    PlainThread,
}

/// 60 at-least-once messages to a handler that works 30 ms (real time) per message
/// off the runtime; returns `(values acked per the receipts, outcome counts, values
/// the handler processed)`.
fn paused_clock_off_runtime_handler(
    base: u64,
    worker: Worker,
) -> (Vec<u64>, HashMap<String, u32>, Counts) {
    on_thread_within(150, "paused clock, handler off the runtime", move || {
        paused_rt().block_on(async move {
            let (a, b) = pair(base, base + 1).await;
            let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
            let seen = counts();
            let s2 = seen.clone();
            let work = move |d: Delivery<u64>| {
                std::thread::sleep(Duration::from_millis(30));
                bump(&s2, *d.message());
                d.ack();
            };
            match worker {
                Worker::PlainThread => {
                    let (tx, rx) = std::sync::mpsc::channel::<Delivery<u64>>();
                    std::thread::spawn(move || rx.into_iter().for_each(work));
                    tokio::spawn(async move {
                        while let Some(d) = inbox.recv().await {
                            if tx.send(d).is_err() {
                                break;
                            }
                        }
                    });
                }
                Worker::SpawnBlocking => {
                    tokio::spawn(async move {
                        while let Some(d) = inbox.recv().await {
                            let work = work.clone();
                            let _ = tokio::task::spawn_blocking(move || work(d)).await;
                        }
                    });
                }
            }
            let out = a
                .sender::<u64>(NodeId(base + 1), opts(1, Guarantee::AtLeastOnce))
                .unwrap();
            let n = 60u64;
            let mut rs = Vec::new();
            for v in 0..n {
                rs.push((v, out.send(&v).await.unwrap()));
            }
            let mut outcomes: HashMap<String, u32> = HashMap::new();
            let mut acked = Vec::new();
            for (v, r) in rs {
                let o = r.await;
                assert!(
                    matches!(o, Ok(Outcome::Acked) | Err(SendError::Deadline { .. })),
                    "{worker:?}: value {v}: {o:?}"
                );
                if o == Ok(Outcome::Acked) {
                    acked.push(v);
                }
                *outcomes.entry(format!("{o:?}")).or_default() += 1;
            }
            // The handler finishes what it took (wall clock).
            let s = seen.clone();
            let w0 = Instant::now();
            while (s.lock().unwrap().len() as u64) < n && w0.elapsed() < Duration::from_secs(30) {
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_millis(5));
            }
            a.shutdown().await;
            b.shutdown().await;
            (acked, outcomes, seen)
        })
    })
}

/// A handler that does its (blocking) work in `spawn_blocking` while the test runs on
/// tokio's paused clock: tokio does not move the clock while blocking work runs, so
/// every at-least-once receipt is `Acked`, each for a processed message.
#[test]
fn r02a_paused_clock_handler_in_spawn_blocking_all_acked() {
    let (acked, outcomes, seen) = paused_clock_off_runtime_handler(5011, Worker::SpawnBlocking);
    for v in &acked {
        assert!(
            seen.lock().unwrap().contains_key(v),
            "{v} acked, never processed"
        );
    }
    assert_eq!(acked.len(), 60, "outcomes: {outcomes:?}");
}

/// The same handler on a plain thread the runtime does not know about: the runtime is
/// idle while the thread works, so tokio jumps the clock from timer to timer and the
/// 30 s deadline passes in tens of milliseconds of real time. What the user gets is
/// still a documented outcome, not a hang or a panic: every receipt settles, `Acked`
/// (and then processed) or `Deadline` ("not known to be delivered"); every message is
/// processed in the end. (How many fail is not asserted: it is the point of the
/// paused clock, and the testing docs say the clock moves whenever every task is
/// idle; see the module doc.)
#[test]
fn r02b_paused_clock_handler_on_a_plain_thread_settles_typed() {
    let (acked, outcomes, seen) = paused_clock_off_runtime_handler(5013, Worker::PlainThread);
    eprintln!("plain-thread handler on a paused clock: {outcomes:?}");
    for v in &acked {
        assert!(
            seen.lock().unwrap().contains_key(v),
            "{v} acked, never processed"
        );
    }
    assert_eq!(outcomes.values().sum::<u32>(), 60);
    assert_eq!(seen.lock().unwrap().len(), 60, "processed in the end");
}

// ------------------------------------------------------------- two runtimes, one dropped

/// Sender and receiver each on a runtime of their own (on plain threads), over TCP.
/// The receiver's runtime is dropped (not shut down) while 40 at-least-once messages
/// are in flight, 10 of them held unacked by its application: every one of the
/// sender's receipts settles with a documented outcome within the deadline (not a
/// hang), the sender's node keeps working, and the receiver-side handles (receiver,
/// held deliveries, `closed`) give typed results on the other runtime, without a panic.
#[test]
fn r03_receivers_runtime_dropped_with_sends_in_flight() {
    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = rt_b.block_on(async {
        Node::builder(NodeId(5022))
            .bind(any_addr())
            .allow_peer(NodeId(5021))
            .build()
            .await
            .unwrap()
    });
    let b_addr = b.local_addr().unwrap();
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let a = rt_a.block_on(async {
        Node::builder(NodeId(5021))
            .bind(any_addr())
            .peer(NodeId(5022), b_addr)
            .build()
            .await
            .unwrap()
    });
    let out = a
        .sender::<u64>(NodeId(5022), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let (receipts, held) = rt_a.block_on(async {
        let r = within(10, "send", out.send(&0)).await.unwrap();
        let d = within(10, "recv", inbox.recv()).await.unwrap();
        d.ack();
        assert_eq!(within(10, "first receipt", r).await, Ok(Outcome::Acked));
        let mut rs = Vec::new();
        for v in 1..=40u64 {
            rs.push(within(10, "send", out.send(&v)).await.unwrap());
        }
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(within(10, "recv", inbox.recv()).await.unwrap());
        }
        (rs, held)
    });
    // The receiver's runtime goes away under its node, sends in flight.
    drop(rt_b);
    rt_a.block_on(async {
        let mut outcomes: HashMap<String, u32> = HashMap::new();
        for r in receipts {
            let o = within(60, "receipt after the receiver's runtime dropped", r).await;
            assert!(
                matches!(
                    o,
                    Ok(Outcome::Acked)
                        | Err(SendError::Deadline { .. })
                        | Err(SendError::PeerDown { .. })
                        | Ok(Outcome::HandedOff)
                ),
                "receipt: {o:?}"
            );
            *outcomes.entry(format!("{o:?}")).or_default() += 1;
        }
        eprintln!("outcomes {outcomes:?}");
        // The receiver side, used from another runtime.
        let mut rest = 0;
        while let Some(d) = within(10, "recv after its runtime dropped", inbox.recv()).await {
            rest += 1;
            d.ack();
        }
        assert!(rest <= 40, "{rest}");
        for (i, d) in held.into_iter().enumerate() {
            match i % 3 {
                0 => d.ack(),
                1 => d.nack(),
                _ => drop(d),
            }
        }
        let closed = within(
            10,
            "closed() of the node whose runtime was dropped",
            b.closed(),
        )
        .await;
        eprintln!("closed {closed:?}");
        within(10, "shutdown of b", b.shutdown()).await;
        // The sender's node still works: a new receiver node on this runtime.
        assert!(a.stats().await.is_ok());
        within(20, "shutdown of a", a.shutdown()).await;
    });
}

// -------------------------------------------------------------- current-thread runtime

/// The batch API on a `current_thread` runtime: `send_many` in batches of 64 on all
/// three guarantees, `recv_many` with a limit of 50, acks from `spawn_blocking`:
/// every receipt `Ok`, each effectively-once and at-most-once message seen once, then
/// both nodes shut down (nothing deadlocks on the single thread).
#[tokio::test(flavor = "current_thread")]
async fn r04_current_thread_send_many_recv_many_and_shutdown() {
    let (a, b) = within(20, "pair", pair(5031, 5032)).await;
    let gs = [
        (1u32, Guarantee::AtMostOnce, Outcome::Sent),
        (2, Guarantee::AtLeastOnce, Outcome::Acked),
        (3, Guarantee::EffectivelyOnce, Outcome::Acked),
    ];
    let n = 2000u64;
    let mut tasks = Vec::new();
    let mut seen = Vec::new();
    for (ch, _, _) in gs {
        let mut inbox = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let c = counts();
        seen.push(c.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            while inbox.recv_many(&mut buf, 50).await > 0 {
                let batch = std::mem::take(&mut buf);
                let c = c.clone();
                tokio::task::spawn_blocking(move || {
                    for d in batch {
                        bump(&c, *d.message());
                        d.ack();
                    }
                });
            }
        }));
    }
    for (i, (ch, g, want)) in gs.iter().enumerate() {
        let out = a.sender::<u64>(NodeId(5032), opts(*ch, *g)).unwrap();
        let vals: Vec<u64> = (0..n).collect();
        let mut rs = Vec::new();
        for chunk in vals.chunks(64) {
            rs.extend(within(20, "send_many", out.send_many(chunk)).await.unwrap());
        }
        assert_eq!(rs.len() as u64, n);
        for (k, r) in rs.into_iter().enumerate() {
            assert_eq!(within(40, "receipt", r).await, Ok(*want), "{g:?} #{k}");
        }
        let c = seen[i].clone();
        wait_until(20, "all processed", || c.lock().unwrap().len() as u64 == n).await;
        if *g != Guarantee::AtLeastOnce {
            assert_each_once(&seen[i], n, &format!("{g:?}"));
        }
    }
    within(20, "shutdown a", a.shutdown()).await;
    within(20, "shutdown b", b.shutdown()).await;
    for t in tasks {
        within(10, "receiver task ends", t).await.unwrap();
    }
}

// ------------------------------------------------------------------------ cancellation

/// `send` dropped at its only await point (the window is full): polled once with
/// `now_or_never` and dropped, and raced in `select!` against a short timeout while
/// the handler frees slots. Per the docs `send` waits only for window space, so a
/// dropped `send` sent nothing and a completed one was sent: the set of values the
/// handler sees is exactly the set of accepted sends, each once (effectively-once),
/// and every accepted receipt is `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r05_send_dropped_while_waiting_for_the_window_sends_nothing() {
    let (a, b) = within(20, "pair", pair(5041, 5042)).await;
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(5042), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    // Fill the window; hold the deliveries.
    let mut accepted = Vec::new();
    let mut v = 0u64;
    loop {
        match out.try_send(&v) {
            Ok(r) => accepted.push((v, r)),
            Err(SendError::WindowFull { .. }) => break,
            Err(e) => panic!("try_send: {e:?}"),
        }
        v += 1;
    }
    let full = accepted.len();
    // A send polled once while the window is full, then dropped.
    for _ in 0..50 {
        assert!(
            out.send(&v).now_or_never().is_none(),
            "window full, yet send completed"
        );
        v += 1;
    }
    let seen = counts();
    let s2 = seen.clone();
    // A slow handler frees slots one at a time while sends race a 1 ms timeout.
    let h = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            bump(&s2, *d.message());
            if d.message() % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            d.ack();
        }
    });
    let mut cancelled = 0u64;
    let began = Instant::now();
    while accepted.len() < full + 3000 {
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "sends stopped being accepted: {} of {}",
            accepted.len(),
            full + 3000
        );
        tokio::select! {
            r = out.send(&v) => accepted.push((v, r.unwrap())),
            _ = tokio::time::sleep(Duration::from_micros(500)) => cancelled += 1,
        }
        v += 1;
    }
    eprintln!("accepted {} cancelled {cancelled}", accepted.len());
    let want: std::collections::HashSet<u64> = accepted.iter().map(|(v, _)| *v).collect();
    for (v, r) in accepted {
        assert_eq!(
            within(40, "receipt", r).await,
            Ok(Outcome::Acked),
            "value {v}"
        );
    }
    // Give a cancelled send that was wrongly transmitted a chance to show up.
    let probe = out.send(&u64::MAX).await.unwrap();
    assert_eq!(within(40, "probe", probe).await, Ok(Outcome::Acked));
    let got: std::collections::HashSet<u64> = seen
        .lock()
        .unwrap()
        .keys()
        .copied()
        .filter(|v| *v != u64::MAX)
        .collect();
    let extra: Vec<u64> = got.difference(&want).copied().take(10).collect();
    let missing: Vec<u64> = want.difference(&got).copied().take(10).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "delivered but cancelled: {extra:?}; accepted but missing: {missing:?}"
    );
    assert!(seen.lock().unwrap().values().all(|n| *n == 1));
    within(20, "shutdown a", a.shutdown()).await;
    within(20, "shutdown b", b.shutdown()).await;
    within(10, "handler", h).await.unwrap();
}

/// Receipts dropped unpolled (fire-and-forget) do not stop the message: each of
/// 500 effectively-once messages is processed once and counted as acked by the
/// sender.
#[tokio::test(flavor = "current_thread")]
async fn r06_dropped_receipts_still_deliver_and_count() {
    let (a, b) = within(20, "pair", pair(5051, 5052)).await;
    let seen = counts();
    let h = ack_all(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let out = a
        .sender::<u64>(NodeId(5052), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 500u64;
    for v in 0..n {
        let r = within(20, "send", out.send(&v)).await.unwrap();
        if v % 2 == 0 {
            drop(r);
        } else {
            // Polled once, then dropped.
            let mut r = r;
            let _ = (&mut r).now_or_never();
        }
    }
    wait_until(30, "all processed", || {
        seen.lock().unwrap().len() as u64 == n
    })
    .await;
    let mut acked = 0;
    for _ in 0..200 {
        acked = within(10, "stats", a.stats()).await.unwrap().proto.acked;
        if acked == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(acked, n, "sender's acked count");
    assert_each_once(&seen, n, "dropped receipts");
    within(20, "shutdown a", a.shutdown()).await;
    within(20, "shutdown b", b.shutdown()).await;
    within(10, "handler", h).await.unwrap();
}

/// Typed `recv_many` cancelled in a `select!` against a 200 µs timer while 3 000
/// messages per guarantee arrive: no delivery is swallowed by a cancelled call (exact
/// counts per value; at-least-once at least once), every receipt `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r07_recv_many_cancelled_in_select_loses_nothing() {
    let (a, b) = within(20, "pair", pair(5061, 5062)).await;
    let gs = [
        (1u32, Guarantee::AtMostOnce, Outcome::Sent),
        (2, Guarantee::EffectivelyOnce, Outcome::Acked),
    ];
    let n = 3000u64;
    for (ch, g, want) in gs {
        let mut inbox = b.receiver::<u64>(ChannelId(ch), false).unwrap();
        let seen = counts();
        let s2 = seen.clone();
        let h = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut cancels = 0u64;
            loop {
                tokio::select! {
                    k = inbox.recv_many(&mut buf, 16) => {
                        if k == 0 { break; }
                        for d in buf.drain(..) {
                            bump(&s2, *d.message());
                            d.ack();
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_micros(200)) => cancels += 1,
                }
            }
            cancels
        });
        let out = a.sender::<u64>(NodeId(5062), opts(ch, g)).unwrap();
        let mut rs = Vec::new();
        for v in 0..n {
            rs.push(within(20, "send", out.send(&v)).await.unwrap());
        }
        for (k, r) in rs.into_iter().enumerate() {
            assert_eq!(within(40, "receipt", r).await, Ok(want), "{g:?} #{k}");
        }
        let c = seen.clone();
        wait_until(20, "all processed", || c.lock().unwrap().len() as u64 == n).await;
        assert_each_once(&seen, n, &format!("{g:?}"));
        h.abort();
    }
    within(20, "shutdown a", a.shutdown()).await;
    within(20, "shutdown b", b.shutdown()).await;
}

/// The receiver's runtime is dropped (not shut down) with 60 effectively-once
/// messages in flight, 15 of them held by its application (10 acked on the dead
/// node, after its runtime is gone), and the receiver is started again, same id and
/// address, on a fresh runtime: every receipt ends `Acked` (the restarted node gets
/// what the dead one never acked: an ack on a node whose driver is gone must not
/// reach the sender as a false "processed"), and every value is processed by the
/// restarted node or was acked by the first one before its runtime went.
#[test]
fn r08_receiver_restarted_on_a_new_runtime_after_its_runtime_was_dropped() {
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b_addr = any_addr();
    let build_b = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            within(
                20,
                "build receiver",
                Node::builder(NodeId(5072))
                    .bind(b_addr)
                    .allow_peer(NodeId(5071))
                    .build(),
            )
            .await
            .unwrap()
        })
    };
    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = build_b(&rt_b);
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let a = rt_a.block_on(async {
        within(
            20,
            "build sender",
            Node::builder(NodeId(5071))
                .bind(any_addr())
                .peer(NodeId(5072), b_addr)
                .build(),
        )
        .await
        .unwrap()
    });
    let out = a
        .sender::<u64>(NodeId(5072), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let first_acked = counts();
    let n = 60u64;
    let (receipts, held) = rt_a.block_on(async {
        let mut rs = Vec::new();
        for v in 0..n {
            rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
        }
        // The first 5 are acked while the node runs; then 15 are held.
        for _ in 0..5 {
            let d = within(10, "recv", inbox.recv()).await.unwrap();
            bump(&first_acked, *d.message());
            d.ack();
        }
        let mut held = Vec::new();
        for _ in 0..15 {
            held.push(within(10, "recv", inbox.recv()).await.unwrap());
        }
        (rs, held)
    });
    let firsts: Vec<u64> = first_acked.lock().unwrap().keys().copied().collect();
    drop(rt_b);
    // Acked (10) and dropped (5) on the node whose runtime is gone.
    for (i, d) in held.into_iter().enumerate() {
        if i < 10 {
            d.ack();
        } else {
            drop(d);
        }
    }
    drop(inbox);
    drop(b);
    let rt_b2 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b2 = build_b(&rt_b2);
    let seen = counts();
    let _h = {
        let _on_b2 = rt_b2.enter();
        ack_all(
            b2.receiver::<u64>(ChannelId(1), false).unwrap(),
            seen.clone(),
        )
    };
    rt_a.block_on(async {
        for (v, r) in receipts {
            let o = within(60, "receipt after the receiver restarted", r).await;
            assert_eq!(o, Ok(Outcome::Acked), "value {v}");
        }
        let seen = seen.lock().unwrap().clone();
        let missing: Vec<u64> = (0..n)
            .filter(|v| !seen.contains_key(v) && !firsts.contains(v))
            .collect();
        assert!(
            missing.is_empty(),
            "acked to the sender but processed by no run of the receiver: {missing:?} (the first run acked {firsts:?})"
        );
        within(20, "shutdown a", a.shutdown()).await;
    });
    rt_b2.block_on(async { within(20, "shutdown b2", b2.shutdown()).await });
}

/// Handlers on a runtime of their own: the receiver and 20 held deliveries live on a
/// handler runtime that is dropped (the node's runtime stays up). Per the docs a
/// dropped delivery is redelivered and a dropped receiver's queued messages come back
/// to the channel's next receiver: a new receiver on the node's runtime gets every
/// message the handler runtime did not ack, and every at-least-once receipt is
/// `Acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r09_handler_runtime_dropped_with_held_deliveries() {
    let (a, b) = within(20, "pair", pair(5081, 5082)).await;
    let inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(5082), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let n = 200u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    let first = counts();
    let f2 = first.clone();
    // The handler runtime: acks 30, then holds 20 and stops polling; dropped.
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut inbox = inbox;
        rt.block_on(async {
            for _ in 0..30 {
                let d = within(10, "recv on the handler runtime", inbox.recv())
                    .await
                    .unwrap();
                bump(&f2, *d.message());
                d.ack();
            }
        });
        // Held by tasks of the handler runtime when it goes.
        for _ in 0..20 {
            let d = rt.block_on(within(10, "recv", inbox.recv())).unwrap();
            rt.spawn(async move {
                let _d = d;
                std::future::pending::<()>().await;
            });
        }
        rt.spawn(async move {
            let _inbox = inbox;
            std::future::pending::<()>().await;
        });
        drop(rt);
        tx.send(()).unwrap();
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)).unwrap())
        .await
        .unwrap();
    t.join().unwrap();
    let seen = counts();
    let h = ack_all(
        b.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    for (v, r) in rs {
        assert_eq!(
            within(60, "receipt", r).await,
            Ok(Outcome::Acked),
            "value {v}"
        );
    }
    let first = first.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    let missing: Vec<u64> = (0..n)
        .filter(|v| !first.contains_key(v) && !seen.contains_key(v))
        .collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
    within(20, "shutdown a", a.shutdown()).await;
    within(20, "shutdown b", b.shutdown()).await;
    within(10, "handler", h).await.unwrap();
}

// ------------------------------------------------------------ event streams of a stopped node

/// `Node::health_events()` and `Node::identity_conflicts()` are the node's event
/// streams; like a `Receiver` ("ends when the node shuts down") and
/// `DeadLetters::recv`, a monitoring loop `while let Ok(ev) = events.recv().await`
/// must end once the node has stopped — after `shutdown()`, and after its runtime was
/// dropped — while the application still holds the `Node` handle (to call
/// `shutdown`, `stats`, …). A subscription taken after the stop ends at once.
#[test]
fn r10_event_streams_end_when_the_node_stops() {
    // After a graceful shutdown.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, b) = within(20, "pair", pair(5091, 5092)).await;
        let mut health = a.health_events();
        let mut conflicts = a.identity_conflicts();
        within(20, "shutdown a", a.shutdown()).await;
        loop {
            match within(10, "health_events after shutdown", health.recv()).await {
                Ok(_) => continue, // a transition made while stopping
                Err(e) => {
                    assert_eq!(e, tokio::sync::broadcast::error::RecvError::Closed);
                    break;
                }
            }
        }
        let e = within(10, "identity_conflicts after shutdown", conflicts.recv()).await;
        assert!(e.is_err(), "{e:?}");
        let e = within(
            10,
            "health_events subscribed after shutdown",
            a.health_events().recv(),
        )
        .await;
        assert!(e.is_err(), "{e:?}");
        within(20, "shutdown b", b.shutdown()).await;
        drop(a);
    });
    // After the node's runtime was dropped under it.
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt_a.block_on(async { within(20, "pair", pair(5093, 5094)).await });
    let mut health = a.health_events();
    drop(rt_a);
    rt.block_on(async {
        loop {
            match within(10, "health_events after the runtime dropped", health.recv()).await {
                Ok(_) => continue,
                Err(e) => {
                    assert_eq!(e, tokio::sync::broadcast::error::RecvError::Closed);
                    break;
                }
            }
        }
        within(10, "shutdown a", a.shutdown()).await;
        within(10, "shutdown b", b.shutdown()).await;
    });
}

// ------------------------------------------------- at-most-once waiting for credit, peer gone

/// At-most-once has no deadline: a message waiting for the receiver's credit waits
/// until "the receiver goes Down" (then `SendError::PeerDown`, README table). The
/// receiver's application never takes a delivery, so its credit runs out, and then
/// the receiver's runtime is dropped (not shut down): every receipt settles, `Sent`
/// for those transmitted and `PeerDown` for those still waiting — none hangs — and a
/// send after that fails `PeerDown` at once.
#[test]
fn r11_at_most_once_waiting_for_credit_when_the_receivers_runtime_is_dropped() {
    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = rt_b.block_on(async {
        within(
            20,
            "build receiver",
            Node::builder(NodeId(5112))
                .bind(any_addr())
                .allow_peer(NodeId(5111))
                .build(),
        )
        .await
        .unwrap()
    });
    let b_addr = b.local_addr().unwrap();
    let _inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let a = rt_a.block_on(async {
        within(
            20,
            "build sender",
            Node::builder(NodeId(5111))
                .bind(any_addr())
                .peer(NodeId(5112), b_addr)
                .build(),
        )
        .await
        .unwrap()
    });
    let out = a
        .sender::<u64>(NodeId(5112), opts(1, Guarantee::AtMostOnce))
        .unwrap();
    let (receipts, sent_before) = rt_a.block_on(async {
        let mut rs = Vec::new();
        let mut v = 0u64;
        // Sends go out until the receiver's credit is used up; then the window fills.
        let mut full_since: Option<Instant> = None;
        loop {
            match out.try_send(&v) {
                Ok(r) => {
                    rs.push(r);
                    v += 1;
                    full_since = None;
                }
                Err(SendError::WindowFull { .. }) => {
                    // Full for a while (not just a burst the link has not taken yet).
                    let t = *full_since.get_or_insert_with(Instant::now);
                    if t.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("try_send: {e:?}"),
            }
            assert!(v < 1_000_000, "the window never filled");
        }
        let mut sent = 0;
        let mut waiting = Vec::new();
        for mut r in rs {
            match (&mut r).now_or_never() {
                Some(o) => {
                    assert_eq!(o, Ok(Outcome::Sent));
                    sent += 1;
                }
                None => waiting.push(r),
            }
        }
        (waiting, sent)
    });
    let waiting = receipts.len();
    eprintln!("{sent_before} transmitted, {waiting} waiting when the receiver's runtime went");
    assert!(waiting > 0, "nothing waited for credit");
    drop(rt_b);
    rt_a.block_on(async {
        let mut outcomes: HashMap<String, u32> = HashMap::new();
        for r in receipts {
            let o = within(60, "an at-most-once receipt waiting for credit", r).await;
            assert!(
                matches!(o, Ok(Outcome::Sent) | Err(SendError::PeerDown { .. })),
                "{o:?}"
            );
            *outcomes.entry(format!("{o:?}")).or_default() += 1;
        }
        eprintln!("outcomes of the waiting ones: {outcomes:?}");
        let r = within(10, "send to a Down peer", out.send(&u64::MAX)).await;
        assert!(
            matches!(r, Err(SendError::PeerDown { .. })),
            "{:?}",
            r.map(|_| ())
        );
        within(20, "shutdown a", a.shutdown()).await;
        within(20, "shutdown b", b.shutdown()).await;
    });
}

// ---------------------------------------------- sink and tower service, runtime dropped

/// A `Sink` with receipts outstanding and a tower service holding a reserved window
/// slot, when their node's runtime is dropped (both nodes on it): used from another
/// runtime, `SinkExt::send`, `flush` and `close` and the service's `ready`/`call`
/// fail with a typed error (`Shutdown` or `NodeFailed`) or settle as the receipt
/// would, never hang or panic.
#[test]
fn r12_sink_and_service_after_the_nodes_runtime_is_dropped() {
    use futures::SinkExt;
    use tower::{Service, ServiceExt};
    let rt_n = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rt_t = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt_n.block_on(async { within(20, "pair", pair(5121, 5122)).await });
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let out = a
        .sender::<u64>(NodeId(5122), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let mut sink = out.sink();
    let mut svc = out.service();
    let held = rt_t.block_on(async {
        for v in 0..20u64 {
            within(10, "sink feed", sink.feed(v)).await.unwrap();
        }
        // A slot reserved by the service, not yet used.
        within(10, "service ready", svc.ready()).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(within(10, "recv", inbox.recv()).await.unwrap());
        }
        held
    });
    drop(rt_n);
    rt_t.block_on(async {
        let typed_stop =
            |e: &SendError| matches!(e, SendError::Shutdown | SendError::NodeFailed(_));
        // The reserved slot: the call fails typed (or settles).
        let r = within(10, "service call after the runtime dropped", svc.call(99)).await;
        assert!(
            r.as_ref().err().is_none_or(typed_stop),
            "service call: {r:?}"
        );
        let r = within(10, "service ready after the runtime dropped", svc.ready()).await;
        assert!(
            r.as_ref().err().is_some_and(typed_stop),
            "service ready: {:?}",
            r.map(|_| ())
        );
        let r = within(10, "sink flush after the runtime dropped", sink.flush()).await;
        assert!(r.as_ref().err().is_none_or(typed_stop), "sink flush: {r:?}");
        let r = within(10, "sink send after the runtime dropped", sink.send(100)).await;
        assert!(r.as_ref().err().is_some_and(typed_stop), "sink send: {r:?}");
        let r = within(10, "sink close after the runtime dropped", sink.close()).await;
        assert!(r.as_ref().err().is_none_or(typed_stop), "sink close: {r:?}");
        eprintln!("sink: settled {} failed {}", sink.settled(), sink.failed());
        for d in held {
            d.ack();
        }
        within(10, "shutdown a", a.shutdown()).await;
        within(10, "shutdown b", b.shutdown()).await;
    });
}

// ------------------------------------------------------- runtimes without a driver

/// `NodeBuilder::build` "must run inside a tokio runtime"; a service's own runtime is
/// often built with only the drivers it uses (`enable_io()` alone, or
/// `enable_time()` alone). Expected per "misuse fails loud, with a typed error" and
/// "no value panics the library": `build()` refuses such a runtime with a
/// `NodeError`, or the node works. What happens: without the IO driver `build()`
/// panics inside the TCP transport (`TcpListener::from_std`); without the time
/// driver `build()` returns `Ok` and the node's driver panics on its first timer, so
/// the node is dead from the start (every call `NodeError::Failed("... timers are
/// disabled ...")`).
#[test]
fn r13_build_on_a_runtime_without_io_or_time_fails_typed() {
    for (io, time) in [(true, false), (false, true)] {
        let outcome = on_thread_within(30, "build on a partial runtime", move || {
            std::panic::catch_unwind(move || {
                let mut b = tokio::runtime::Builder::new_current_thread();
                if io {
                    b.enable_io();
                }
                if time {
                    b.enable_time();
                }
                let rt = b.build().unwrap();
                rt.block_on(async {
                    let node = Node::builder(NodeId(5201))
                        .bind(any_addr())
                        .allow_peer(NodeId(5202))
                        .build()
                        .await;
                    match node {
                        Err(e) => format!("typed error: {e}"),
                        Ok(n) => {
                            tokio::task::yield_now().await;
                            let st = n.stats().await;
                            assert!(
                                st.is_ok(),
                                "io {io}, time {time}: build() returned Ok, then the node was dead: {:?}",
                                st.map(|_| ())
                            );
                            n.shutdown().await;
                            "works".to_string()
                        }
                    }
                })
            })
        });
        match outcome {
            Ok(what) => eprintln!("io {io}, time {time}: {what}"),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("io {io}, time {time}: build() or the node panicked: {msg}");
            }
        }
    }
}

// ------------------------------------------- durable acks from plain threads, one thread

/// Durable dedup on a `current_thread` runtime (its group-commit fsync runs inline on
/// the only thread), deliveries finished on plain threads that have no tokio context:
/// `futures::executor::block_on(d.ack_durable())` resolves `Ok(())` for each, every
/// receipt is `Acked`, each message processed once; shutdown completes.
#[tokio::test(flavor = "current_thread")]
async fn r14_ack_durable_from_plain_threads_with_the_node_on_a_current_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ackwire::NodeConfig::default();
    cfg.dedup.durable = Some(ackwire::dedup::DurableDedup::new(dir.path()));
    let b = within(
        20,
        "build receiver",
        Node::builder(NodeId(5142))
            .bind(any_addr())
            .allow_peer(NodeId(5141))
            .config(cfg)
            .build(),
    )
    .await
    .unwrap();
    let a = within(
        20,
        "build sender",
        Node::builder(NodeId(5141))
            .bind(any_addr())
            .peer(NodeId(5142), b.local_addr().unwrap())
            .build(),
    )
    .await
    .unwrap();
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let seen = counts();
    let fails: Arc<Mutex<Vec<(u64, ackwire::AckError)>>> = Arc::default();
    let resolved = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<Delivery<u64>>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (rx, seen, fails) = (rx.clone(), seen.clone(), fails.clone());
        let resolved = resolved.clone();
        workers.push(std::thread::spawn(move || loop {
            let next = rx.lock().unwrap().recv();
            let Ok(d) = next else { return };
            let v = *d.message();
            bump(&seen, v);
            if let Err(e) = futures::executor::block_on(d.ack_durable()) {
                fails.lock().unwrap().push((v, e));
            }
            resolved.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    let h = tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            if tx.send(d).is_err() {
                break;
            }
        }
    });
    let out = a
        .sender::<u64>(NodeId(5142), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let n = 800u64;
    let mut rs = Vec::new();
    for v in 0..n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    for (v, r) in rs {
        assert_eq!(
            within(40, "receipt", r).await,
            Ok(Outcome::Acked),
            "value {v}"
        );
    }
    let r2 = resolved.clone();
    wait_until(20, "every ack_durable resolved", || {
        r2.load(std::sync::atomic::Ordering::SeqCst) == n
    })
    .await;
    assert!(
        fails.lock().unwrap().is_empty(),
        "{:?}",
        fails.lock().unwrap()
    );
    assert_each_once(&seen, n, "durable acks from plain threads");
    within(20, "shutdown a", a.shutdown()).await;
    within(20, "shutdown b", b.shutdown()).await;
    within(10, "receiver task", h).await.unwrap();
    for w in workers {
        w.join().unwrap();
    }
}

// ---------------------------------------------------------------- build() cancelled

/// `build()` cancelled by a timeout while it waits for a store directory (the durable
/// dead-letter log, opened after the transport) held by a live node of the same id
/// (it waits up to 2 s, then fails "in use"): the cancelled build had already
/// started its TCP transport (bound its address, dialled
/// its peers as that id). Expected: nothing of it outlives the cancelled future —
/// its address can be bound again, and the live node's peer keeps delivering to the
/// live node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r15_build_cancelled_while_waiting_for_a_store_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let durable_cfg = || {
        let mut cfg = ackwire::NodeConfig::default();
        cfg.dead_letter_dir = Some(dir.path().to_path_buf());
        cfg
    };
    let x = within(
        20,
        "build x",
        Node::builder(NodeId(5301))
            .bind(any_addr())
            .allow_peer(NodeId(5303))
            .config(durable_cfg())
            .build(),
    )
    .await
    .unwrap();
    let p = within(
        20,
        "build p",
        Node::builder(NodeId(5303))
            .bind(any_addr())
            .peer(NodeId(5301), x.local_addr().unwrap())
            .build(),
    )
    .await
    .unwrap();
    let seen = counts();
    let h = ack_all(
        x.receiver::<u64>(ChannelId(1), false).unwrap(),
        seen.clone(),
    );
    let out = p
        .sender::<u64>(NodeId(5301), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = within(10, "send", out.send(&0)).await.unwrap();
    assert_eq!(within(20, "first receipt", r).await, Ok(Outcome::Acked));
    // A second run of x's id, on another address, on x's directory: cancelled.
    let addr_y = any_addr();
    let y = tokio::time::timeout(
        Duration::from_millis(700),
        Node::builder(NodeId(5301))
            .bind(addr_y)
            .peer(NodeId(5303), p.local_addr().unwrap())
            .config(durable_cfg())
            .build(),
    )
    .await;
    assert!(
        y.is_err(),
        "build on a directory in use finished: {:?}",
        y.map(|r| r.map(|_| ()))
    );
    // Its address is free again (bounded: build itself retries a bind in use for 2 s).
    let mut z = None;
    let w0 = Instant::now();
    while z.is_none() && w0.elapsed() < Duration::from_secs(15) {
        match within(
            10,
            "build z",
            Node::builder(NodeId(5304)).bind(addr_y).build(),
        )
        .await
        {
            Ok(n) => z = Some(n),
            Err(e) => {
                eprintln!("bind after the cancelled build: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let z = z.expect("the cancelled build's address stayed bound");
    // The live node still gets its peer's messages.
    let n = 200u64;
    let mut rs = Vec::new();
    for v in 1..=n {
        rs.push((v, within(10, "send", out.send(&v)).await.unwrap()));
    }
    for (v, r) in rs {
        assert_eq!(
            within(40, "receipt", r).await,
            Ok(Outcome::Acked),
            "value {v}"
        );
    }
    let s = seen.clone();
    wait_until(20, "processed", || s.lock().unwrap().len() as u64 == n + 1).await;
    assert_each_once(&seen, n + 1, "x after a cancelled build of its id");
    // Nothing of the cancelled build keeps dialling p under x's id: the count of
    // refused connections claiming x's id settles (a handshake that was under way
    // when the build was cancelled may still be counted late on a loaded machine)
    // and then stays put.
    let refused = |st: ackwire::Stats| st.tcp.map(|t| t.rejected_duplicate_node).unwrap_or(0);
    let w0 = Instant::now();
    let mut last = refused(within(10, "stats", p.stats()).await.unwrap());
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(4) {
        assert!(
            w0.elapsed() < Duration::from_secs(40),
            "connections claiming x's id kept coming after its cancelled build: {last} so far"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = refused(within(10, "stats", p.stats()).await.unwrap());
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    within(20, "shutdown z", z.shutdown()).await;
    within(20, "shutdown p", p.shutdown()).await;
    within(20, "shutdown x", x.shutdown()).await;
    within(10, "handler", h).await.unwrap();
}

// ------------------------------------------------------------ sender's runtime dropped

/// The sending node's runtime is dropped (not shut down) with 80 keyed
/// effectively-once sends in flight, the receiver (on a runtime of its own) holding
/// 20 of them unacked. The receiver is not disturbed (no panic, its held deliveries
/// ack normally), and the application's documented recovery works: a new run of the
/// sender, on a fresh runtime, resends all 80 under the same `IdKey`s; every receipt
/// is `Acked` and each key is processed exactly once across both runs.
#[test]
fn r16_senders_runtime_dropped_then_a_new_run_resends_under_the_same_keys() {
    use ackwire::IdKey;
    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = rt_b.block_on(async {
        within(
            20,
            "build receiver",
            Node::builder(NodeId(5162))
                .bind(any_addr())
                .allow_peer(NodeId(5161))
                .build(),
        )
        .await
        .unwrap()
    });
    let b_addr = b.local_addr().unwrap();
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let seen = counts();
    let build_a = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            within(
                20,
                "build sender",
                Node::builder(NodeId(5161))
                    .bind(any_addr())
                    .peer(NodeId(5162), b_addr)
                    .build(),
            )
            .await
            .unwrap()
        })
    };
    let n = 80u64;
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = build_a(&rt_a);
    let out = a
        .sender::<u64>(NodeId(5162), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let _receipts = rt_a.block_on(async {
        let mut rs = Vec::new();
        for v in 0..n {
            rs.push(
                within(
                    10,
                    "send",
                    out.send_with_key(&v, IdKey(1_000 + u128::from(v))),
                )
                .await
                .unwrap(),
            );
        }
        rs
    });
    // The receiver takes 40: acks 20, holds 20.
    let held = rt_b.block_on(async {
        let mut held = Vec::new();
        for i in 0..40 {
            let d = within(10, "recv", inbox.recv()).await.unwrap();
            bump(&seen, *d.message());
            if i % 2 == 0 {
                d.ack();
            } else {
                held.push(d);
            }
        }
        held
    });
    drop(rt_a);
    drop(out);
    drop(a);
    // The receiver acks what it held (the sender is gone) and keeps taking.
    let s2 = seen.clone();
    let h = rt_b.spawn(async move {
        for d in held {
            d.ack();
        }
        while let Some(d) = inbox.recv().await {
            bump(&s2, *d.message());
            d.ack();
        }
    });
    // A new run of the sender resends everything under the same keys.
    let rt_a2 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a2 = build_a(&rt_a2);
    rt_a2.block_on(async {
        let out = a2
            .sender::<u64>(NodeId(5162), opts(1, Guarantee::EffectivelyOnce))
            .unwrap();
        let mut rs = Vec::new();
        for v in 0..n {
            rs.push((
                v,
                within(
                    10,
                    "resend",
                    out.send_with_key(&v, IdKey(1_000 + u128::from(v))),
                )
                .await
                .unwrap(),
            ));
        }
        for (v, r) in rs {
            assert_eq!(
                within(60, "resent receipt", r).await,
                Ok(Outcome::Acked),
                "value {v}"
            );
        }
        let s = seen.clone();
        wait_until(20, "every key processed", || {
            s.lock().unwrap().len() as u64 == n
        })
        .await;
        assert_each_once(
            &seen,
            n,
            "keys across a sender run whose runtime was dropped",
        );
        within(20, "shutdown a2", a2.shutdown()).await;
    });
    rt_b.block_on(async {
        within(20, "shutdown b", b.shutdown()).await;
        within(10, "handler", h).await.unwrap();
    });
}

// ------------------------------------------------------- group sender off the runtime

/// A `Sender` works from a plain thread without a tokio context
/// (`futures::executor::block_on(out.send(..))`, `tests/blackbox/concurrency.rs` c02);
/// `GroupSender::new` says it "must run inside a tokio runtime", `send` says nothing
/// of the kind. A group sender built on the node's runtime, used from a plain thread
/// the same way: 20 sends whose receipts resolve `Acked`, each processed; then, with
/// the only member Down, a send that waits `member_wait` (a timer) and fails
/// `NoLiveMember` — no panic.
#[test]
fn r17_group_send_from_a_plain_thread() {
    use ackwire::group::{GroupConfig, GroupSender, StaticMembers};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (node, r1, group, seen) = rt.block_on(async {
        let r1 = within(
            20,
            "build member",
            Node::builder(NodeId(5172))
                .bind(any_addr())
                .allow_peer(NodeId(5171))
                .build(),
        )
        .await
        .unwrap();
        let node = Arc::new(
            within(
                20,
                "build sender",
                Node::builder(NodeId(5171)).bind(any_addr()).build(),
            )
            .await
            .unwrap(),
        );
        let seen = counts();
        ack_all(
            r1.receiver::<u64>(ChannelId(1), false).unwrap(),
            seen.clone(),
        );
        let members = StaticMembers::new([(NodeId(5172), r1.local_addr().unwrap())]).unwrap();
        let group = within(
            20,
            "group",
            GroupSender::<u64>::new(node.clone(), GroupConfig::new(ChannelId(1)), members),
        )
        .await
        .unwrap();
        (node, r1, group, seen)
    });
    let g = group.clone();
    let res = on_thread_within(60, "group send from a plain thread", move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(async move {
                let mut out = Vec::new();
                for v in 0..20u64 {
                    let r = g.send(&v).await.map_err(|e| format!("{e:?}"))?;
                    out.push(r.await.map(|_| ()).map_err(|e| format!("{e:?}")));
                }
                Ok::<_, String>(out)
            })
        }))
    });
    let res = match res {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("GroupSender::send from a plain thread panicked: {msg}");
        }
    };
    let outcomes = res.expect("a typed error is acceptable only if documented");
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    rt.block_on(async {
        let s = seen.clone();
        wait_until(20, "processed", || s.lock().unwrap().len() == 20).await;
        // The only member goes away and is held Down.
        within(20, "shutdown r1", r1.shutdown()).await;
        let n2 = node.clone();
        wait_until(30, "member Down", move || {
            n2.health(NodeId(5172)) == Some(ackwire::detector::Health::Down)
        })
        .await;
    });
    // A send from a plain thread now waits `member_wait` for a live member (a timer),
    // then fails typed.
    let g = group.clone();
    let res = on_thread_within(60, "group send without a live member", move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(async move { g.send(&99).await.map(|_| ()) })
        }))
    });
    let res = res.unwrap_or_else(|_| panic!("GroupSender::send waiting for a member panicked"));
    assert!(
        matches!(
            res,
            Err(ackwire::group::GroupSendError::NoLiveMember { .. })
        ),
        "{res:?}"
    );
    rt.block_on(async {
        drop(group);
        within(20, "shutdown node", node.shutdown()).await;
    });
}

/// The receiver's runtime is dropped with effectively-once deliveries queued in its
/// `Receiver`, which the application keeps using from another runtime: `recv` ends
/// (`None`, as its docs say once the node has shut down) instead of handing out the
/// queued deliveries, whose acks could reach no one. (Regression: the queued ones
/// were handed out after the node was `Closed` and their acks dropped without an
/// error, so the sender's next delivery to the node's next run was processed a
/// second time. A graceful stop already ended `recv`; a dropped runtime or a driver
/// panic did not.)
#[test]
fn r18_recv_ends_when_the_nodes_runtime_is_dropped_with_deliveries_queued() {
    let rt = |n| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()
            .unwrap()
    };
    let (rt_a, rt_b) = (rt(1), rt(1));
    let b = rt_b.block_on(async {
        Node::builder(NodeId(5182))
            .bind(any_addr())
            .allow_peer(NodeId(5181))
            .build()
            .await
            .unwrap()
    });
    let b_addr = b.local_addr().unwrap();
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let a = rt_a.block_on(async {
        Node::builder(NodeId(5181))
            .bind(any_addr())
            .peer(NodeId(5182), b_addr)
            .build()
            .await
            .unwrap()
    });
    let out = a
        .sender::<u64>(NodeId(5182), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let receipts = rt_a.block_on(async {
        let mut rs = Vec::new();
        for v in 0..20u64 {
            rs.push(within(10, "send", out.send(&v)).await.unwrap());
        }
        rs
    });
    rt_b.block_on(async {
        wait_until(20, "20 deliveries queued at b", || {
            futures::executor::block_on(b.stats()).is_ok_and(|s| s.proto.delivered >= 20)
        })
        .await;
    });
    drop(rt_b);
    rt_a.block_on(async {
        let got = within(10, "recv after the node's runtime dropped", inbox.recv()).await;
        assert!(
            got.is_none(),
            "a queued delivery was handed out after the node stopped: {:?}",
            got.map(|d| *d.message())
        );
        drop(receipts);
        within(10, "shutdown of b", b.shutdown()).await;
        within(20, "shutdown of a", a.shutdown()).await;
    });
}
