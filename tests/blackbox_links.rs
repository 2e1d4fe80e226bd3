//! Black-box tests, round 4: link faults between two real nodes (a controllable TCP
//! proxy on loopback: pauses, a side that stops reading, flapping, data delayed while
//! heartbeats pass), a raw peer that never reads its socket, and misuse of node
//! handles. Default settings, public API only (README.md, rustdoc, `ackwire::wire`).
//!
//! Found when written (fixed):
//! - Retransmissions queued behind node credit had no deadline timer (only the head of
//!   the queue did): against a peer that stopped granting node credit, 255 to 1 620
//!   receipts stayed unresolved past their deadline for as long as the link lived
//!   (`never_reading_*`, `draining_peer_that_never_acks_*`,
//!   `black_hole_many_messages_receipts_fail_by_their_deadline`).
//! - A `send` or `send_many` waiting on a full window hung for good once its `Node` was
//!   dropped (the drop stops the node without the drain that closes the windows):
//!   `*_when_node_dropped`, `drop_node_with_sends_in_flight`.

#![allow(clippy::type_complexity)] // test bookkeeping shared across tasks

#[path = "support/ports.rs"]
mod ports;
use ackwire::wire::{
    Data, Frame, FrameDecoder, FrameEncoder, Heartbeat, Negotiation, NegotiationStep, VersionRange,
};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, Node, NodeId, Origin, Outcome, Receipt, SendError,
};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

fn payload(i: u64, size: usize) -> Bytes {
    let mut v = vec![0u8; size.max(8)];
    v[..8].copy_from_slice(&i.to_be_bytes());
    Bytes::from(v)
}

fn index(p: &Bytes) -> u64 {
    u64::from_be_bytes(p[..8].try_into().unwrap())
}

fn frame_bytes(frame: &Frame, version: u16) -> BytesMut {
    let mut out = BytesMut::new();
    FrameEncoder::default()
        .with_version(version)
        .encode(frame, &mut out)
        .unwrap();
    out
}

// -------------------------------------------------------------------------------------
// A controllable proxy
// -------------------------------------------------------------------------------------

const FORWARD: u8 = 0;
/// Read from the source but hold the bytes (no forwarding) until the mode changes.
const HOLD: u8 = 1;
/// Stop reading from the source (its writer's socket buffer fills).
const NO_READ: u8 = 2;
/// Forward every frame at once except `Data` frames, which are delayed.
const DELAY_DATA: u8 = 3;

struct Ctl {
    /// mode of the direction client (sender node) -> server (receiver node)
    up: AtomicU8,
    /// mode of the direction server -> client
    down: AtomicU8,
    refuse: AtomicBool,
    data_delay_ms: AtomicU64,
    conns: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    accepted: AtomicU64,
}

struct LinkProxy {
    addr: SocketAddr,
    ctl: Arc<Ctl>,
}

/// The kind byte of a frame: byte 9 of the encoding (after len, crc, format version).
fn kind_of(frame: &Frame) -> u8 {
    frame_bytes(frame, 3)[9]
}

async fn pump(
    mut src: tokio::net::tcp::OwnedReadHalf,
    mut dst: tokio::net::tcp::OwnedWriteHalf,
    ctl: Arc<Ctl>,
    up: bool,
    data_kind: u8,
) {
    let mode = |c: &Ctl| {
        if up {
            c.up.load(Ordering::Relaxed)
        } else {
            c.down.load(Ordering::Relaxed)
        }
    };
    let mut held: Vec<u8> = Vec::new();
    // DELAY_DATA: bytes parsed into frames; delayed data frames with release instants.
    let mut parse: Vec<u8> = Vec::new();
    let mut delayed: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let m = mode(&ctl);
        // Release delayed frames that are due (or all, once not in DELAY_DATA).
        while let Some((t, _)) = delayed.front() {
            if m != DELAY_DATA || *t <= Instant::now() {
                let (_, f) = delayed.pop_front().unwrap();
                if dst.write_all(&f).await.is_err() {
                    return;
                }
            } else {
                break;
            }
        }
        if m != DELAY_DATA && !parse.is_empty() {
            if dst.write_all(&parse).await.is_err() {
                return;
            }
            parse.clear();
        }
        if m == FORWARD && !held.is_empty() {
            if dst.write_all(&held).await.is_err() {
                return;
            }
            held.clear();
        }
        if m == NO_READ {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let n = match tokio::time::timeout(Duration::from_millis(10), src.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => {
                // flush what we have, then close
                let _ = dst.write_all(&held).await;
                return;
            }
            Ok(Ok(n)) => n,
        };
        match mode(&ctl) {
            FORWARD => {
                if dst.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            HOLD | NO_READ => held.extend_from_slice(&buf[..n]),
            _ => {
                // DELAY_DATA: split into frames; the handshake frames are small and not
                // data, so they pass. Keep order among data frames; others overtake.
                if !held.is_empty() {
                    parse.extend_from_slice(&held);
                    held.clear();
                }
                parse.extend_from_slice(&buf[..n]);
                let delay = Duration::from_millis(ctl.data_delay_ms.load(Ordering::Relaxed));
                loop {
                    if parse.len() < 10 {
                        break;
                    }
                    let len = u32::from_le_bytes(parse[..4].try_into().unwrap()) as usize;
                    if parse.len() < 8 + len {
                        break;
                    }
                    let f: Vec<u8> = parse.drain(..8 + len).collect();
                    if f[9] == data_kind {
                        delayed.push_back((Instant::now() + delay, f));
                    } else if dst.write_all(&f).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl LinkProxy {
    async fn start(target: SocketAddr) -> LinkProxy {
        let l = TcpListener::bind(any_addr()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let ctl = Arc::new(Ctl {
            up: AtomicU8::new(FORWARD),
            down: AtomicU8::new(FORWARD),
            refuse: AtomicBool::new(false),
            data_delay_ms: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let data_kind = kind_of(&Frame::Data(Data {
            channel: ChannelId(1),
            seq: 1,
            floor: 0,
            id_floor: 0,
            id: None,
            guarantee: Guarantee::AtLeastOnce,
            schema: 0,
            payload: Bytes::from_static(b"x"),
        }));
        let c2 = ctl.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                if c2.refuse.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                c2.accepted.fetch_add(1, Ordering::Relaxed);
                let c3 = c2.clone();
                let h = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    let a = tokio::spawn(pump(ir, ow, c3.clone(), true, data_kind));
                    let b = tokio::spawn(pump(or, iw, c3, false, data_kind));
                    struct Abort(tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>);
                    impl Drop for Abort {
                        fn drop(&mut self) {
                            self.0.abort();
                            self.1.abort();
                        }
                    }
                    let guard = Abort(a, b);
                    loop {
                        if guard.0.is_finished() || guard.1.is_finished() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                c2.conns.lock().unwrap().push(h);
            }
        });
        LinkProxy { addr, ctl }
    }

    fn set(&self, up: u8, down: u8) {
        self.ctl.up.store(up, Ordering::Relaxed);
        self.ctl.down.store(down, Ordering::Relaxed);
    }
}

// -------------------------------------------------------------------------------------
// The rig: sender A, receiver B behind the proxy, bystander C directly connected
// -------------------------------------------------------------------------------------

struct Rig {
    a: Node,
    b: Node,
    c: Node,
    proxy: LinkProxy,
    seen_al: Seen,
    seen_eo: Seen,
    b_id: u64,
    c_id: u64,
}

async fn rig(base: u64) -> Rig {
    let (a_id, b_id, c_id) = (base + 1, base + 2, base + 3);
    let b = Node::builder(NodeId(b_id))
        .bind(any_addr())
        .allow_peer(NodeId(a_id))
        .allow_peer(NodeId(base + 4))
        .build()
        .await
        .unwrap();
    let c = Node::builder(NodeId(c_id))
        .bind(any_addr())
        .allow_peer(NodeId(a_id))
        .build()
        .await
        .unwrap();
    let seen_al: Seen = Arc::default();
    let seen_eo: Seen = Arc::default();
    for (ch, seen) in [(1u32, seen_al.clone()), (2, seen_eo.clone())] {
        let mut inbox = b.raw_receiver(ChannelId(ch), false).unwrap();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                *seen.lock().unwrap().entry(index(d.message())).or_default() += 1;
                d.ack();
            }
        });
    }
    let mut cin = c.raw_receiver(ChannelId(1), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = cin.recv().await {
            d.ack();
        }
    });
    let proxy = LinkProxy::start(b.local_addr().unwrap()).await;
    let a = Node::builder(NodeId(a_id))
        .bind(any_addr())
        .peer(NodeId(b_id), proxy.addr)
        .peer(NodeId(c_id), c.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    Rig {
        a,
        b,
        c,
        proxy,
        seen_al,
        seen_eo,
        b_id,
        c_id,
    }
}

type Outcomes =
    Arc<Mutex<HashMap<(u32, u64), (Instant, Option<(Instant, Result<Outcome, SendError>)>)>>>;

/// Send `n` messages per guarantee (channel 1 at-least-once, 2 effectively-once), one
/// pair every `gap`, each of `size` bytes. Returns the outcomes map (filled as receipts
/// resolve) and the send errors.
fn spawn_sends(
    a: &Node,
    b_id: u64,
    n: u64,
    gap: Duration,
    size: usize,
) -> (
    Outcomes,
    Arc<Mutex<Vec<(u32, u64, SendError)>>>,
    tokio::task::JoinHandle<()>,
) {
    let outcomes: Outcomes = Arc::default();
    let errs: Arc<Mutex<Vec<(u32, u64, SendError)>>> = Arc::default();
    let al = a
        .raw_sender(
            NodeId(b_id),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let eo = a
        .raw_sender(
            NodeId(b_id),
            ChannelOptions::new(ChannelId(2), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let (o2, e2) = (outcomes.clone(), errs.clone());
    let h = tokio::spawn(async move {
        for i in 0..n {
            for (ch, s) in [(1u32, &al), (2, &eo)] {
                let t = Instant::now();
                match s.send(payload(i, size)).await {
                    Ok(r) => {
                        o2.lock().unwrap().insert((ch, i), (t, None));
                        let o3 = o2.clone();
                        tokio::spawn(async move {
                            let res = r.await;
                            if let Some(e) = o3.lock().unwrap().get_mut(&(ch, i)) {
                                e.1 = Some((Instant::now(), res));
                            }
                        });
                    }
                    Err(e) => e2.lock().unwrap().push((ch, i, e)),
                }
            }
            tokio::time::sleep(gap).await;
        }
    });
    (outcomes, errs, h)
}

/// Round trips to the bystander C every 100 ms until `stop`; returns the worst latency
/// and the failures.
fn spawn_bystander(
    a: &Node,
    c_id: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Duration, Vec<String>, u64)> {
    let s = a
        .raw_sender(
            NodeId(c_id),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut fails = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                s.send(payload(n, 16)).await?.await
            })
            .await;
            match r {
                Ok(Ok(Outcome::Acked)) => {}
                other => fails.push(format!("{other:?}")),
            }
            worst = worst.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (worst, fails, n)
    })
}

struct Verdict {
    problems: Vec<String>,
}

/// Wait until every receipt resolved (up to `settle`), then check the promises.
async fn judge(
    rig: &Rig,
    what: &str,
    outcomes: &Outcomes,
    errs: &Arc<Mutex<Vec<(u32, u64, SendError)>>>,
    settle: Duration,
) -> Verdict {
    let t0 = Instant::now();
    loop {
        let pending = outcomes
            .lock()
            .unwrap()
            .values()
            .filter(|v| v.1.is_none())
            .count();
        if pending == 0 || t0.elapsed() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut problems = Vec::new();
    let o = outcomes.lock().unwrap();
    let al = rig.seen_al.lock().unwrap().clone();
    let eo = rig.seen_eo.lock().unwrap().clone();
    let mut tally: HashMap<String, u64> = HashMap::new();
    let mut pending = Vec::new();
    let mut early_deadline = Vec::new();
    for ((ch, i), (sent, res)) in o.iter() {
        match res {
            None => pending.push((*ch, *i)),
            Some((at, r)) => {
                *tally.entry(format!("ch{ch} {r:?}")).or_default() += 1;
                if *r == Ok(Outcome::Acked) {
                    let seen = if *ch == 1 { &al } else { &eo };
                    let k = seen.get(i).copied().unwrap_or(0);
                    if k == 0 {
                        problems.push(format!(
                            "ch{ch} msg {i}: receipt Acked but the handler never saw it"
                        ));
                    }
                }
                if matches!(r, Err(SendError::Deadline { .. }))
                    && at.duration_since(*sent) < Duration::from_secs(29)
                {
                    early_deadline.push((*ch, *i, at.duration_since(*sent)));
                }
            }
        }
    }
    for (i, k) in &eo {
        if *k > 1 {
            problems.push(format!("effectively-once msg {i} processed {k} times"));
        }
    }
    if !pending.is_empty() {
        problems.push(format!(
            "{} receipts unresolved {:?} after the link healed (first {:?})",
            pending.len(),
            settle,
            &pending[..pending.len().min(5)]
        ));
    }
    if !early_deadline.is_empty() {
        problems.push(format!(
            "{} receipts failed Deadline before the 30 s deadline (first {:?})",
            early_deadline.len(),
            &early_deadline[..early_deadline.len().min(3)]
        ));
    }
    let e = errs.lock().unwrap();
    let mut etally: HashMap<String, u64> = HashMap::new();
    for (ch, _, err) in e.iter() {
        *etally.entry(format!("ch{ch} {err:?}")).or_default() += 1;
    }
    let dup_al = al.values().filter(|k| **k > 1).count();
    eprintln!(
        "[{what}] receipts: {tally:?}; send errors: {etally:?}; handler saw al={} eo={} (al dups {dup_al}); settle took {:?}",
        al.len(),
        eo.len(),
        t0.elapsed()
    );
    Verdict { problems }
}

/// A fresh message to B after healing must be acked promptly.
async fn fresh_roundtrip(rig: &Rig, secs: u64) -> Result<Duration, String> {
    let s = rig
        .a
        .raw_sender(
            NodeId(rig.b_id),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(secs), async {
        s.send(payload(1_000_000, 16)).await?.await
    })
    .await;
    match r {
        Ok(Ok(Outcome::Acked)) => Ok(t.elapsed()),
        other => Err(format!("fresh message to B after healing: {other:?}")),
    }
}

async fn link_fault_case(
    base: u64,
    what: &str,
    n: u64,
    size: usize,
    fault: impl std::future::Future<Output = ()>,
    rig: Rig,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let by = spawn_bystander(&rig.a, rig.c_id, stop.clone());
    let (outcomes, errs, sends) = spawn_sends(&rig.a, rig.b_id, n, Duration::from_millis(20), size);
    fault.await;
    let healed = Instant::now();
    within(30, "sending finishes", sends).await.unwrap();
    let v = judge(&rig, what, &outcomes, &errs, Duration::from_secs(12)).await;
    let fresh = fresh_roundtrip(&rig, 5).await;
    stop.store(true, Ordering::Relaxed);
    let (worst, fails, probes) = within(15, "bystander", by).await.unwrap();
    eprintln!(
        "[{what}] bystander: {probes} probes, worst {worst:?}, failures {fails:?}; fresh: {fresh:?}; since heal {:?}; connections through the proxy {}",
        healed.elapsed(),
        rig.proxy.ctl.accepted.load(Ordering::Relaxed)
    );
    let mut problems = v.problems;
    if let Err(e) = fresh {
        problems.push(e);
    }
    if worst > Duration::from_secs(2) || !fails.is_empty() {
        problems.push(format!(
            "the bystander peer C was disturbed: worst round trip {worst:?}, failures {:?}",
            &fails[..fails.len().min(3)]
        ));
    }
    let _ = base;
    within(20, "a shutdown", rig.a.shutdown()).await;
    rig.b.shutdown().await;
    rig.c.shutdown().await;
    assert!(problems.is_empty(), "[{what}] {problems:#?}");
}

// (a) forwarding paused in one direction for a few seconds, then resumed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_data_direction_4s_then_resume() {
    let rig = rig(9100).await;
    let p = rig.proxy.ctl.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.up.store(HOLD, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(4)).await;
        p.up.store(FORWARD, Ordering::Relaxed);
    };
    link_fault_case(9100, "pause A->B 4s", 300, 64, fault, rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_ack_direction_4s_then_resume() {
    let rig = rig(9110).await;
    let p = rig.proxy.ctl.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.down.store(HOLD, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(4)).await;
        p.down.store(FORWARD, Ordering::Relaxed);
    };
    link_fault_case(9110, "pause B->A 4s", 300, 64, fault, rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_both_directions_6s_then_resume() {
    let rig = rig(9120).await;
    let p = rig.proxy.ctl.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.up.store(HOLD, Ordering::Relaxed);
        p.down.store(HOLD, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(6)).await;
        p.up.store(FORWARD, Ordering::Relaxed);
        p.down.store(FORWARD, Ordering::Relaxed);
    };
    link_fault_case(9120, "pause both 6s", 350, 64, fault, rig).await;
}

// (b) the proxy stops reading from the sender (its socket buffer fills)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reading_from_sender_5s_big_payloads() {
    let rig = rig(9130).await;
    let p = rig.proxy.ctl.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.up.store(NO_READ, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        p.up.store(FORWARD, Ordering::Relaxed);
    };
    link_fault_case(9130, "no-read A->B 5s, 32 KiB", 300, 32 * 1024, fault, rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reading_from_receiver_5s() {
    let rig = rig(9140).await;
    let p = rig.proxy.ctl.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.down.store(NO_READ, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        p.down.store(FORWARD, Ordering::Relaxed);
    };
    link_fault_case(9140, "no-read B->A 5s", 300, 1024, fault, rig).await;
}

// (c) flapping: cut and restore every ~300 ms for 10 s

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_link_10s() {
    let rig = rig(9150).await;
    let p = rig.proxy.ctl.clone();
    let proxy_cut = {
        let ctl = rig.proxy.ctl.clone();
        move || {
            for h in ctl.conns.lock().unwrap().drain(..) {
                h.abort();
            }
        }
    };
    let fault = async move {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            p.refuse.store(true, Ordering::Relaxed);
            proxy_cut();
            tokio::time::sleep(Duration::from_millis(150)).await;
            p.refuse.store(false, Ordering::Relaxed);
        }
    };
    link_fault_case(9150, "flap 10s", 500, 256, fault, rig).await;
}

// (d) pings and pongs pass, data is delayed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_delayed_3s_while_heartbeats_pass() {
    let rig = rig(9160).await;
    let p = rig.proxy.ctl.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.data_delay_ms.store(3000, Ordering::Relaxed);
        p.up.store(DELAY_DATA, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(6)).await;
        p.up.store(FORWARD, Ordering::Relaxed);
    };
    link_fault_case(9160, "delay data 3s", 300, 64, fault, rig).await;
}

// -------------------------------------------------------------------------------------
// 2. A raw peer that completes the handshake, then never reads its socket
// -------------------------------------------------------------------------------------

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Handshake as `origin` on `s`; returns the stream and the negotiated version.
async fn handshake(mut s: TcpStream, origin: Origin) -> Option<(TcpStream, u16)> {
    let mut neg = Negotiation::new(origin, VersionRange::SUPPORTED);
    let mut out = BytesMut::new();
    for f in neg.opening() {
        out.extend_from_slice(&frame_bytes(&f, 1));
    }
    s.write_all(&out).await.ok()?;
    let mut dec = FrameDecoder::new(8 << 20).with_version(1);
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            match neg.on_frame(f) {
                Ok(NegotiationStep::NeedFrame) => {}
                Ok(NegotiationStep::Done { version, .. }) => return Some((s, version)),
                Err(_) => return None,
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read_buf(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}

/// Node A knows a legit receiver B and a raw peer X that handshakes and then never
/// reads (optionally sending its own pings so that A's failure detector keeps it Up).
/// A sends X many 16 KiB at-least-once messages with a 6 s channel deadline while it
/// round-trips to B. Promise: A stays responsive to B, memory stays bounded, every
/// receipt to X fails with a typed error by its deadline (+ slack), shutdown finishes.
async fn never_reading_peer_case(base: u64, x_pings: bool, x_drains: bool, grant: bool) {
    let (a_id, b_id, x_id) = (base + 1, base + 2, base + 3);
    let listener = TcpListener::bind(any_addr()).await.unwrap();
    let b = Node::builder(NodeId(b_id))
        .bind(any_addr())
        .allow_peer(NodeId(a_id))
        .build()
        .await
        .unwrap();
    let mut bin = b.raw_receiver(ChannelId(1), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = bin.recv().await {
            d.ack();
        }
    });
    let a = Node::builder(NodeId(a_id))
        .bind(any_addr())
        .peer(NodeId(b_id), b.local_addr().unwrap())
        .peer(NodeId(x_id), listener.local_addr().unwrap())
        .allow_peer(NodeId(x_id))
        .build()
        .await
        .unwrap();
    let rss0 = rss_kib();
    // X: accept every connection, handshake, never read again.
    let xs: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let xs2 = xs.clone();
    let conns = Arc::new(AtomicU64::new(0));
    let conns2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let origin = Origin {
                node: NodeId(x_id),
                incarnation: 4242,
            };
            if let Some((mut s, v)) = handshake(s, origin).await {
                conns2.fetch_add(1, Ordering::Relaxed);
                if x_pings {
                    let (mut r, mut w) = s.into_split();
                    if x_drains {
                        tokio::spawn(async move {
                            let mut sink = vec![0u8; 1 << 16];
                            while let Ok(n) = r.read(&mut sink).await {
                                if n == 0 {
                                    return;
                                }
                            }
                        });
                    } else {
                        std::mem::forget(r);
                    }
                    let keep = tokio::spawn(async move {
                        if grant {
                            let f = frame_bytes(
                                &Frame::NodeCredit(ackwire::wire::NodeCredit {
                                    limit: 1 << 40,
                                    received: 0,
                                }),
                                v,
                            );
                            let _ = w.write_all(&f).await;
                        }
                        let mut n = 0u64;
                        loop {
                            n += 1;
                            let f = frame_bytes(&Frame::Ping(Heartbeat { nonce: n }), v);
                            if w.write_all(&f).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    });
                    std::mem::forget(keep);
                } else {
                    let _ = s.flush().await;
                    xs2.lock().unwrap().push(s);
                }
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let by = spawn_bystander(&a, b_id, stop.clone());
    let mut opts = ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce);
    opts.deadline = Some(Duration::from_secs(6));
    let out = a.raw_sender(NodeId(x_id), opts).unwrap();
    let outcomes: Arc<
        Mutex<HashMap<u64, (Instant, Option<(Instant, Result<Outcome, SendError>)>)>>,
    > = Arc::default();
    let mut send_errs: HashMap<String, u64> = HashMap::new();
    let mut blocked = None;
    let t_start = Instant::now();
    let (count, size) = (3000u64, 16 * 1024);
    for i in 0..count {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(8), out.send(payload(i, size))).await {
            Err(_) => {
                blocked = Some(i);
                break;
            }
            Ok(Err(e)) => *send_errs.entry(format!("{e:?}")).or_default() += 1,
            Ok(Ok(r)) => {
                outcomes.lock().unwrap().insert(i, (t, None));
                let o = outcomes.clone();
                tokio::spawn(async move {
                    let res = r.await;
                    o.lock().unwrap().get_mut(&i).unwrap().1 = Some((Instant::now(), res));
                });
            }
        }
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if t_start.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let rss_peak_send = rss_kib();
    // Wait for every receipt: deadline 6 s + 3 s slack after the last send.
    let t0 = Instant::now();
    let wait = 9;
    while t0.elapsed() < Duration::from_secs(wait)
        && outcomes.lock().unwrap().values().any(|v| v.1.is_none())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_end = rss_kib();
    stop.store(true, Ordering::Relaxed);
    let (worst, fails, probes) = within(15, "bystander", by).await.unwrap();
    let o = outcomes.lock().unwrap().clone();
    let mut tally: HashMap<String, u64> = HashMap::new();
    let mut late = Vec::new();
    let mut pending = 0;
    let mut worst_took = Duration::ZERO;
    for (i, (sent, res)) in &o {
        if let Some((at, _)) = res {
            worst_took = worst_took.max(at.duration_since(*sent));
        }
        match res {
            None => pending += 1,
            Some((at, r)) => {
                *tally.entry(format!("{r:?}")).or_default() += 1;
                let took = at.duration_since(*sent);
                if took > Duration::from_secs(6) + Duration::from_secs(3) {
                    late.push((*i, took));
                }
            }
        }
    }
    eprintln!(
        "[never-reading x_pings={x_pings} x_drains={x_drains} grant={grant}] sent {} (blocked at {blocked:?}), send errors {send_errs:?}; receipts {tally:?}, pending {pending}, late {}; bystander {probes} probes worst {worst:?} fails {:?}; rss {rss0} -> {rss_peak_send} -> {rss_end} KiB; x connections {}; slowest receipt {worst_took:?}",
        o.len(),
        late.len(),
        &fails[..fails.len().min(3)],
        conns.load(Ordering::Relaxed)
    );
    let t_sd = Instant::now();
    let sd = tokio::time::timeout(Duration::from_secs(15), a.shutdown()).await;
    eprintln!("shutdown took {:?}", t_sd.elapsed());
    b.shutdown().await;
    let mut problems = Vec::new();
    if pending > 0 {
        problems.push(format!(
            "{pending} receipts to X unresolved 9 s after the last send (deadline 6 s)"
        ));
    }
    if !late.is_empty() {
        late.sort_by_key(|l| l.1);
        problems.push(format!(
            "{} receipts resolved more than 3 s after their deadline (worst {:?})",
            late.len(),
            late.last()
        ));
    }
    if tally.contains_key("Ok(Acked)") {
        problems.push("a receipt to a peer that never read resolved Acked".into());
    }
    if worst > Duration::from_secs(2) || !fails.is_empty() {
        problems.push(format!(
            "bystander B disturbed: worst {worst:?}, fails {:?}",
            &fails[..fails.len().min(3)]
        ));
    }
    if sd.is_err() {
        problems.push("A's shutdown did not finish within 15 s".into());
    }
    if rss_end.saturating_sub(rss0) > 512 * 1024 {
        problems.push(format!("memory grew by {} MiB", (rss_end - rss0) / 1024));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_peer_that_pings() {
    never_reading_peer_case(9200, true, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_silent_peer() {
    never_reading_peer_case(9210, false, false, false).await;
}

/// Variant: X reads (and discards) everything but never acks nor grants credit.
/// Receipts should fail with `Deadline` at 6 s (+ 3 s slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_peer_that_never_acks_receipts_fail_by_deadline() {
    never_reading_peer_case(9220, true, true, false).await;
}

/// Contrast: the same draining peer, but it grants a huge node credit
/// (`NodeCredit { limit: 2^40 }`) right after the handshake. Then every receipt fails
/// with `Deadline` on time, which points at messages waiting for node credit to be
/// retransmitted as the ones that never reach their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_peer_granting_node_credit_receipts_fail_by_deadline() {
    never_reading_peer_case(9230, true, true, true).await;
}

/// A black hole: the proxy holds every byte in both directions (the TCP connection stays
/// open) for 10 s while A sends 40 messages per guarantee with a 3 s channel deadline.
/// Promise (README table): at-least-once "retries ... until acked or the deadline: the
/// receipt then fails with `SendError::Deadline`". Every receipt must resolve by its
/// deadline + 2 s, while the hole is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_receipts_fail_by_their_deadline() {
    black_hole_case(9300, 40, true).await;
}

/// A black hole that opens right after the connection is made, before any message was
/// acked on the stream, with 300 at-least-once and effectively-once messages (more than
/// a fresh stream's initial credit). Every receipt must fail by its deadline + 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_on_fresh_stream_beyond_credit_receipts_fail_by_their_deadline() {
    black_hole_case(9320, 300, false).await;
}

/// The same black hole with 400 messages per guarantee: more than the receiver's
/// initial stream credit (256 on a fresh stream), so the stream is also credit-blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_beyond_credit_receipts_fail_by_their_deadline() {
    black_hole_case(9310, 400, true).await;
}

/// A black hole after warm-up with 4000 messages per guarantee: retransmissions over 3 s
/// put more than the default node credit (16 384 data frames per connection) on the
/// held connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_many_messages_receipts_fail_by_their_deadline() {
    black_hole_case(9330, 4000, true).await;
}

async fn black_hole_case(base: u64, n: u64, warm: bool) {
    let rig = rig(base).await;
    if warm {
        // warm up: one acked round trip so the connection is established
        fresh_roundtrip(&rig, 5).await.expect("warm-up");
        let eo = rig
            .a
            .raw_sender(
                NodeId(rig.b_id),
                ChannelOptions::new(ChannelId(2), Guarantee::EffectivelyOnce),
            )
            .unwrap();
        let r = within(5, "warm-up eo", eo.send(payload(2_000_000, 16)))
            .await
            .unwrap();
        assert_eq!(within(5, "warm-up eo receipt", r).await, Ok(Outcome::Acked));
        tokio::time::sleep(Duration::from_millis(200)).await;
    } else {
        let t = Instant::now();
        while rig.proxy.ctl.accepted.load(Ordering::Relaxed) == 0
            && t.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        eprintln!(
            "connections through the proxy before the hole: {}",
            rig.proxy.ctl.accepted.load(Ordering::Relaxed)
        );
    }
    rig.proxy.set(HOLD, HOLD);
    let mut receipts = Vec::new();
    for g in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
        let mut opts = ChannelOptions::new(
            ChannelId(if g == Guarantee::AtLeastOnce { 1 } else { 2 }),
            g,
        );
        opts.deadline = Some(Duration::from_secs(3));
        let s = rig.a.raw_sender(NodeId(rig.b_id), opts).unwrap();
        for i in 0..n {
            let t = Instant::now();
            let r: Receipt = within(5, "send", s.send(payload(i, 64))).await.unwrap();
            receipts.push((g, i, t, r));
        }
    }
    let mut tally: HashMap<String, u64> = HashMap::new();
    let mut hung = Vec::new();
    let mut worst = Duration::ZERO;
    for (g, i, t, mut r) in receipts {
        let left = (t + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, &mut r).await {
            Ok(res) => {
                worst = worst.max(t.elapsed());
                *tally.entry(format!("{g:?} {res:?}")).or_default() += 1;
            }
            Err(_) => hung.push((g, i, t, r)),
        }
    }
    // How long do the late ones hang (the hole stays open)? Up to 10 s more.
    let late_wait = Instant::now();
    let mut still = Vec::new();
    let mut late_tally: HashMap<String, u64> = HashMap::new();
    for (_, _, _, r) in hung.iter_mut() {
        let left = (late_wait + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, &mut *r).await {
            Ok(res) => *late_tally.entry(format!("{res:?}")).or_default() += 1,
            Err(_) => still.push(r),
        }
    }
    eprintln!("[black hole] of the late ones, within 5 s more (hole open): {late_tally:?}, still unresolved {}", still.len());
    // Heal, and see how the stuck ones end.
    rig.proxy.set(FORWARD, FORWARD);
    let healed = Instant::now();
    let mut after: HashMap<String, u64> = HashMap::new();
    for r in still {
        let left = (healed + Duration::from_secs(4)).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r).await {
            Ok(res) => *after.entry(format!("{res:?}")).or_default() += 1,
            Err(_) => *after.entry("unresolved".into()).or_default() += 1,
        }
    }
    if !after.is_empty() {
        eprintln!("[black hole] after healing, within 4 s: {after:?}");
    }
    let hung: Vec<(Guarantee, u64)> = hung.into_iter().map(|(g, i, _, _)| (g, i)).collect();
    eprintln!(
        "[black hole] resolved {tally:?}; slowest {worst:?}; unresolved at deadline+2s: {}",
        hung.len()
    );
    rig.proxy.set(FORWARD, FORWARD);
    within(20, "a shutdown", rig.a.shutdown()).await;
    rig.b.shutdown().await;
    rig.c.shutdown().await;
    assert!(
        hung.is_empty(),
        "{} of {} receipts (3 s deadline) still unresolved 5 s after their send while the link \
         black-holed (first {:?}); resolved: {tally:?}",
        hung.len(),
        2 * n,
        &hung[..hung.len().min(5)]
    );
}

// -------------------------------------------------------------------------------------
// 3. Misuse
// -------------------------------------------------------------------------------------

async fn direct_pair(a_id: u64, b_id: u64) -> (Node, Node) {
    let b = Node::builder(NodeId(b_id))
        .bind(any_addr())
        .allow_peer(NodeId(a_id))
        .build()
        .await
        .unwrap();
    let a = Node::builder(NodeId(a_id))
        .bind(any_addr())
        .peer(NodeId(b_id), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    (a, b)
}

/// Two tasks keep sending (at-least-once and effectively-once) while the sending Node
/// is dropped without shutdown. Every receipt resolves promptly, `send` calls after the
/// drop fail (or their receipts do) with a typed error, and no receipt is `Acked` for a
/// message the handler never saw; effectively-once never processed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_node_with_sends_in_flight() {
    let (a, b) = direct_pair(9401, 9402).await;
    let seen: [Seen; 2] = [Arc::default(), Arc::default()];
    for (k, ch) in [1u32, 2].into_iter().enumerate() {
        let mut inbox = b.raw_receiver(ChannelId(ch), false).unwrap();
        let s = seen[k].clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(d) = inbox.recv().await {
                *s.lock().unwrap().entry(index(d.message())).or_default() += 1;
                n += 1;
                if n.is_multiple_of(50) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                d.ack();
            }
        });
    }
    let mut tasks = Vec::new();
    for (ch, g) in [
        (1u32, Guarantee::AtLeastOnce),
        (2, Guarantee::EffectivelyOnce),
    ] {
        let s = a
            .raw_sender(NodeId(9402), ChannelOptions::new(ChannelId(ch), g))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            let mut errs: HashMap<String, u64> = HashMap::new();
            let mut i = 0u64;
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(2) {
                match tokio::time::timeout(Duration::from_secs(5), s.send(payload(i, 64))).await {
                    Err(_) => {
                        *errs.entry("send hung 5 s".into()).or_default() += 1;
                        break;
                    }
                    Ok(Ok(r)) => receipts.push((i, r)),
                    Ok(Err(e)) => *errs.entry(format!("{e:?}")).or_default() += 1,
                }
                i += 1;
                if i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            (receipts, errs)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(a);
    let mut problems = Vec::new();
    for (k, t) in tasks.into_iter().enumerate() {
        let (receipts, errs) = within(15, "sender task", t).await.unwrap();
        let n = receipts.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let mut tally: HashMap<String, u64> = HashMap::new();
        let mut phantom = Vec::new();
        let mut hung = 0;
        for (i, r) in receipts {
            match tokio::time::timeout_at(deadline, r).await {
                Err(_) => hung += 1,
                Ok(res) => {
                    if res == Ok(Outcome::Acked) && !seen[k].lock().unwrap().contains_key(&i) {
                        phantom.push(i);
                    }
                    let key = match &res {
                        Ok(o) => format!("Ok({o:?})"),
                        Err(e) => format!("{e:?}"),
                    };
                    *tally.entry(key).or_default() += 1;
                }
            }
        }
        let dups = seen[k].lock().unwrap().values().filter(|c| **c > 1).count();
        eprintln!("[drop node] ch{} receipts {n}: {tally:?}; send errors {errs:?}; hung {hung}; phantom {}; handler dups {dups}", k + 1, phantom.len());
        if hung > 0 {
            problems.push(format!(
                "ch{}: {hung} receipts unresolved 8 s after the node was dropped",
                k + 1
            ));
        }
        if !phantom.is_empty() {
            problems.push(format!(
                "ch{}: {} receipts Acked but never processed (first {:?})",
                k + 1,
                phantom.len(),
                &phantom[..phantom.len().min(5)]
            ));
        }
        if errs.contains_key("send hung 5 s") {
            problems.push(format!(
                "ch{}: a send() hung after the node was dropped",
                k + 1
            ));
        }
        if k == 1 && dups > 0 {
            problems.push(format!("effectively-once: {dups} messages processed twice"));
        }
    }
    b.shutdown().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

/// `send` blocked on a full window (the receiver holds every delivery unacked), then
/// the node is shut down (and, in the second half, another node is dropped): the blocked
/// `send` returns a typed error, pending receipts resolve, shutdown finishes within
/// `shutdown_drain` (5 s) + slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_blocked_on_full_window_returns_at_shutdown() {
    blocked_send_case(9410, false).await;
}

/// "Dropping a `Node` instead stops it at once" (`Node::shutdown` docs), and handles of a
/// dropped node fail with a typed error: a `send` waiting on a full window must return
/// `Err(Shutdown)` once the node is dropped, like it does at `shutdown()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_blocked_on_full_window_returns_when_node_dropped() {
    blocked_send_case(9420, true).await;
}

async fn blocked_send_case(base: u64, by_drop: bool) {
    {
        let (a, b) = direct_pair(base + 1, base + 2).await;
        let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(d) = inbox.recv().await {
                held.push(d);
            }
        });
        let s = a
            .raw_sender(
                NodeId(base + 2),
                ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
            )
            .unwrap();
        let mut receipts = Vec::new();
        let mut full_at = None;
        for i in 0..100_000u64 {
            match s.try_send(payload(i, 16)) {
                Ok(r) => receipts.push(r),
                Err(SendError::WindowFull { .. }) => {
                    full_at = Some(i);
                    break;
                }
                Err(e) => panic!("try_send: {e:?}"),
            }
        }
        let full_at = full_at.expect("the window fills");
        let s2 = s.clone();
        let blocked = tokio::spawn(async move { s2.send(payload(u64::MAX, 16)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !blocked.is_finished(),
            "precondition: send waits on a full window"
        );
        let t0 = Instant::now();
        if by_drop {
            drop(a);
        } else {
            let a = Arc::new(a);
            let a2 = a.clone();
            tokio::spawn(async move { a2.shutdown().await });
            tokio::time::sleep(Duration::from_millis(100)).await;
            // during the drain: new sends are refused
            let during = s.try_send(payload(1, 16)).err();
            eprintln!("[blocked send] try_send during drain: {during:?}");
            assert!(
                matches!(during, Some(SendError::Shutdown)),
                "try_send during drain: {during:?}"
            );
        }
        let r = tokio::time::timeout(Duration::from_secs(8), blocked).await;
        eprintln!("[blocked send] by_drop={by_drop}: window full at {full_at}; blocked send -> {r:?} after {:?}", t0.elapsed());
        let r = r.unwrap_or_else(|_| panic!("by_drop={by_drop}: a send blocked on a full window did not return within 8 s of the node stopping"));
        assert!(
            matches!(r, Ok(Err(SendError::Shutdown))),
            "by_drop={by_drop}: blocked send -> {r:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let mut hung = 0;
        for r in receipts {
            if tokio::time::timeout_at(deadline, r).await.is_err() {
                hung += 1;
            }
        }
        assert_eq!(
            hung, 0,
            "by_drop={by_drop}: receipts unresolved after the node stopped"
        );
        b.shutdown().await;
        hold.abort();
    }
}

/// The receiving side's writer is blocked: B sends A many 32 KiB messages over the one
/// connection A made (through the proxy) while the proxy stops reading from B for 5 s,
/// so B's socket buffer fills. Meanwhile another sender D round-trips to B every 100 ms:
/// B must stay responsive to D; after healing every message B sent is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_side_writer_blocked_other_peers_keep_flowing() {
    let rig = rig(9500).await;
    let a_id = 9501;
    let d_id = 9504;
    // A receives on channel 5.
    let mut ain = rig.a.raw_receiver(ChannelId(5), false).unwrap();
    let got: Seen = Arc::default();
    let g2 = got.clone();
    tokio::spawn(async move {
        while let Some(d) = ain.recv().await {
            *g2.lock().unwrap().entry(index(d.message())).or_default() += 1;
            d.ack();
        }
    });
    fresh_roundtrip(&rig, 5)
        .await
        .expect("warm-up (A dials B through the proxy)");
    let back = match rig.b.raw_sender(
        NodeId(a_id),
        ChannelOptions::new(ChannelId(5), Guarantee::AtLeastOnce),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("B cannot send to A without A's address ({e:?}); skipping");
            return;
        }
    };
    // D: another peer of B.
    let d = Node::builder(NodeId(d_id))
        .bind(any_addr())
        .peer(NodeId(rig.b_id), rig.b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    // (the rig's B admits base + 4, which is D)
    let stop = Arc::new(AtomicBool::new(false));
    let by = spawn_bystander(&d, rig.b_id, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.proxy.set(FORWARD, NO_READ);
    let mut receipts = Vec::new();
    let t0 = Instant::now();
    let mut i = 0u64;
    while t0.elapsed() < Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_millis(500), back.send(payload(i, 32 * 1024)))
            .await
        {
            Ok(Ok(r)) => receipts.push((i, r)),
            Ok(Err(e)) => {
                eprintln!("B->A send {i}: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => {} // window full: keep trying until the 5 s are over
        }
        i += 1;
    }
    rig.proxy.set(FORWARD, FORWARD);
    let healed = Instant::now();
    let mut tally: HashMap<String, u64> = HashMap::new();
    let mut hung = 0;
    for (_, r) in receipts.iter_mut() {
        let left = (healed + Duration::from_secs(10)).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r).await {
            Ok(res) => *tally.entry(format!("{res:?}")).or_default() += 1,
            Err(_) => hung += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (worst, fails, probes) = within(15, "bystander", by).await.unwrap();
    eprintln!(
        "[B writer blocked] B->A sent {} ({i} attempts): {tally:?}, hung {hung}; A got {}; D->B: {probes} probes, worst {worst:?}, fails {:?}",
        receipts.len(),
        got.lock().unwrap().len(),
        &fails[..fails.len().min(3)]
    );
    d.shutdown().await;
    within(20, "a shutdown", rig.a.shutdown()).await;
    rig.b.shutdown().await;
    rig.c.shutdown().await;
    assert_eq!(hung, 0, "B->A receipts unresolved 10 s after healing");
    assert!(
        worst < Duration::from_secs(2) && fails.is_empty(),
        "D->B disturbed while B's writer to A was blocked: worst {worst:?}, fails {:?}",
        &fails[..fails.len().min(3)]
    );
}

/// (d) with a longer data delay (8 s, several RTOs): retransmissions pile up behind the
/// delayed originals; pings pass, so the peer stays Up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_delayed_8s_while_heartbeats_pass() {
    let rig = rig(9170).await;
    let p = rig.proxy.ctl.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.data_delay_ms.store(8000, Ordering::Relaxed);
        p.up.store(DELAY_DATA, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(3)).await;
        p.data_delay_ms.store(0, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(6)).await;
        p.up.store(FORWARD, Ordering::Relaxed);
    };
    link_fault_case(9170, "delay data 8s", 200, 64, fault, rig).await;
}

/// `send_many` and the sink, blocked on a full window (the receiver holds every
/// delivery), must return a typed error when the node shuts down or is dropped.
async fn blocked_batch_case(base: u64, by_drop: bool, use_sink: bool) -> Result<String, String> {
    use futures::SinkExt;
    let (a, b) = direct_pair(base + 1, base + 2).await;
    let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(d) = inbox.recv().await {
            held.push(d);
        }
    });
    let s = a
        .raw_sender(
            NodeId(base + 2),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let blocked = if use_sink {
        let mut sink = s.sink();
        tokio::spawn(async move {
            for i in 0..10_000u64 {
                if let Err(e) = sink.feed(payload(i, 16)).await {
                    return format!("sink.feed {i}: Err({e:?})");
                }
            }
            "sink took 10 000".to_string()
        })
    } else {
        let s2 = s.clone();
        tokio::spawn(async move {
            match s2.send_many((0..10_000u64).map(|i| payload(i, 16))).await {
                Ok(v) => format!("send_many Ok({} receipts)", v.len()),
                Err(e) => format!("send_many Err({e:?})"),
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    if blocked.is_finished() {
        return Err(format!(
            "precondition: the call did not block: {:?}",
            blocked.await
        ));
    }
    let t0 = Instant::now();
    let keep;
    if by_drop {
        drop(a);
        keep = None;
    } else {
        let a = Arc::new(a);
        let a2 = a.clone();
        tokio::spawn(async move { a2.shutdown().await });
        keep = Some(a);
    }
    let r = tokio::time::timeout(Duration::from_secs(8), blocked).await;
    drop(keep);
    b.shutdown().await;
    hold.abort();
    match r {
        Ok(Ok(s)) => Ok(format!("{s} after {:?}", t0.elapsed())),
        _ => Err(format!(
            "{} blocked on a full window did not return within 8 s of the node being {}",
            if use_sink { "sink.feed" } else { "send_many" },
            if by_drop { "dropped" } else { "shut down" }
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_many_and_sink_blocked_return_at_shutdown() {
    for (base, sink) in [(9600u64, false), (9610, true)] {
        let r = blocked_batch_case(base, false, sink).await;
        eprintln!("[blocked batch shutdown] sink={sink}: {r:?}");
        let s = r.unwrap();
        assert!(s.contains("Shutdown"), "sink={sink}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_many_blocked_returns_when_node_dropped() {
    let r = blocked_batch_case(9620, true, false).await;
    eprintln!("[blocked batch drop] {r:?}");
    let s = r.unwrap();
    assert!(s.contains("Shutdown"), "{s}");
}

/// An ordered effectively-once receiver dropped mid-stream (2000 messages in flight, a
/// few taken and unfinished) and registered again: every receipt Acked, each message
/// processed exactly once. (The new receiver's order is printed, not asserted: see
/// the end.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_receiver_dropped_and_reregistered_under_load() {
    let (a, b) = direct_pair(9701, 9702).await;
    let opts = ackwire::ReceiverOptions::ordered();
    let mut r1 = b.raw_receiver_with(ChannelId(1), opts).unwrap();
    let out = a
        .raw_sender(
            NodeId(9702),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let seen: Seen = Arc::default();
    let mut receipts = Vec::new();
    for i in 0..2000u64 {
        receipts.push((
            i,
            within(5, "send", out.send(payload(i, 32))).await.unwrap(),
        ));
    }
    // The first receiver processes 300, then takes 3 more without finishing them.
    let mut taken = Vec::new();
    for k in 0..303 {
        let d = within(5, "r1 recv", r1.recv()).await.unwrap();
        if k < 300 {
            *seen.lock().unwrap().entry(index(d.message())).or_default() += 1;
            d.ack();
        } else {
            taken.push(d);
        }
    }
    drop(r1);
    drop(taken);
    let mut r2 = b
        .raw_receiver_with(ChannelId(1), opts)
        .expect("a new receiver after the old one is dropped");
    let s2 = seen.clone();
    let order: Arc<Mutex<Vec<u64>>> = Arc::default();
    let o2 = order.clone();
    tokio::spawn(async move {
        while let Some(d) = r2.recv().await {
            let i = index(d.message());
            o2.lock().unwrap().push(i);
            *s2.lock().unwrap().entry(i).or_default() += 1;
            d.ack();
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut tally: HashMap<String, u64> = HashMap::new();
    let mut hung = 0;
    for (_, r) in receipts {
        match tokio::time::timeout_at(deadline, r).await {
            Ok(res) => *tally.entry(format!("{res:?}")).or_default() += 1,
            Err(_) => hung += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.lock().unwrap().clone();
    let order = order.lock().unwrap().clone();
    let missing: Vec<u64> = (0..2000).filter(|i| !seen.contains_key(i)).collect();
    let twice: Vec<u64> = (0..2000)
        .filter(|i| seen.get(i).copied().unwrap_or(0) > 1)
        .collect();
    // 300..=302 were first delivered to r1 (taken, dropped unfinished): their
    // redeliveries may come after messages already handed out (README, ordered
    // contract (2)); first deliveries must follow send order.
    let firsts: Vec<u64> = order.iter().copied().filter(|i| *i >= 303).collect();
    let inversions = firsts.windows(2).filter(|w| w[1] < w[0]).count();
    eprintln!(
        "[ordered re-register] receipts {tally:?}, hung {hung}; missing {}, twice {}, order inversions on r2 {inversions} (first of r2: {:?})",
        missing.len(),
        twice.len(),
        &order[..order.len().min(5)]
    );
    a.shutdown().await;
    b.shutdown().await;
    assert_eq!(hung, 0, "receipts unresolved");
    assert_eq!(
        tally.get("Ok(Acked)").copied().unwrap_or(0),
        2000,
        "{tally:?}"
    );
    assert!(
        missing.is_empty() && twice.is_empty(),
        "missing {:?} twice {:?}",
        &missing[..missing.len().min(5)],
        &twice[..twice.len().min(5)]
    );
    // Not asserted: the order of r2's deliveries. Everything the node had queued for
    // r1 (up to the stream's credit, here all 2 000) was handed out, and r1's drop
    // returned it unfinished; such redeliveries may come in any order among
    // themselves (README, ordered contract (2): "messages already handed out ... may
    // come first"), as their senders' resends arrive. A CI run saw one inversion
    // ([300, 301, 302, 389, 303, ...]); it is printed above.
    let _ = inversions;
}

/// The receiving node is dropped (no shutdown) while its handler is working through a
/// queue: no receipt is `Acked` for a message its handler did not see, and every receipt
/// (4 s channel deadline) resolves by its deadline + 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiving_node_dropped_mid_stream_nothing_acked_unprocessed() {
    let (a, b) = direct_pair(9801, 9802).await;
    let seen: [Seen; 2] = [Arc::default(), Arc::default()];
    for (k, ch) in [1u32, 2].into_iter().enumerate() {
        let mut inbox = b.raw_receiver(ChannelId(ch), false).unwrap();
        let s = seen[k].clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                tokio::time::sleep(Duration::from_millis(1)).await;
                *s.lock().unwrap().entry(index(d.message())).or_default() += 1;
                d.ack();
            }
        });
    }
    let mut receipts = Vec::new();
    for (ch, g) in [
        (1u32, Guarantee::AtLeastOnce),
        (2, Guarantee::EffectivelyOnce),
    ] {
        let mut o = ChannelOptions::new(ChannelId(ch), g);
        o.deadline = Some(Duration::from_secs(4));
        let s = a.raw_sender(NodeId(9802), o).unwrap();
        for i in 0..1500u64 {
            receipts.push((
                ch,
                i,
                Instant::now(),
                within(5, "send", s.send(payload(i, 32))).await.unwrap(),
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(b);
    let mut tally: HashMap<String, u64> = HashMap::new();
    let mut phantom = Vec::new();
    let mut late = 0;
    for (ch, i, t, r) in receipts {
        let dl = tokio::time::Instant::from_std(t + Duration::from_secs(7));
        match tokio::time::timeout_at(dl, r).await {
            Err(_) => late += 1,
            Ok(res) => {
                if res == Ok(Outcome::Acked)
                    && !seen[(ch - 1) as usize].lock().unwrap().contains_key(&i)
                {
                    phantom.push((ch, i));
                }
                *tally.entry(format!("ch{ch} {res:?}")).or_default() += 1;
            }
        }
    }
    let dups = seen[1].lock().unwrap().values().filter(|c| **c > 1).count();
    eprintln!(
        "[receiver dropped] {tally:?}; phantom {}; late {late}; eo dups {dups}",
        phantom.len()
    );
    a.shutdown().await;
    assert!(
        phantom.is_empty(),
        "Acked but never processed: {:?}",
        &phantom[..phantom.len().min(5)]
    );
    assert_eq!(late, 0, "receipts unresolved 3 s after their deadline");
    assert_eq!(dups, 0);
}

/// README: a channel is just a `ChannelId` and any number may be used; the per-peer
/// stream limit (`max_streams_per_peer`, 256) bounds what one peer holds, not how many
/// channels it may use. With defaults over TCP, one sender uses 600 channels at once
/// (every guarantee, ordered and unordered receivers), then each of them again: every
/// acked-guarantee receipt is acked, and its message processed (effectively-once:
/// exactly once). (Regression: a peer's streams were
/// never dropped, so channels past the 256th were refused until their deadline:
/// 3 440 of 6 000 receipts failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_using_more_channels_than_the_stream_limit_is_served_on_all() {
    const CHANNELS: u32 = 600;
    const PER: u64 = 5;
    let b = Node::builder(NodeId(7801))
        .bind(any_addr())
        .allow_peer(NodeId(7800))
        .build()
        .await
        .unwrap();
    let a = Node::builder(NodeId(7800))
        .bind(any_addr())
        .peer(NodeId(7801), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let guarantee = |c: u32| match c % 3 {
        0 => Guarantee::AtMostOnce,
        1 => Guarantee::AtLeastOnce,
        _ => Guarantee::EffectivelyOnce,
    };
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let mut consumers = Vec::new();
    for c in 0..CHANNELS {
        let mut rx = b.raw_receiver(ChannelId(c), c % 2 == 0).unwrap();
        let seen = seen.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let i = u64::from(c) * 1_000 + index(d.message());
                *seen.lock().unwrap().entry(i).or_insert(0) += 1;
                d.ack();
            }
        }));
    }
    for round in 0..2u64 {
        let mut receipts = Vec::new();
        for c in 0..CHANNELS {
            let s = a
                .raw_sender(
                    NodeId(7801),
                    ChannelOptions::new(ChannelId(c), guarantee(c)),
                )
                .unwrap();
            for k in 0..PER {
                let i = round * PER + k;
                receipts.push((c, within(10, "send", s.send(payload(i, 16))).await.unwrap()));
            }
        }
        for (c, r) in receipts {
            let out = within(60, "receipt", r).await;
            if guarantee(c) == Guarantee::AtMostOnce {
                assert!(out.is_ok(), "channel {c}: {out:?}");
            } else {
                assert_eq!(out, Ok(Outcome::Acked), "channel {c}, round {round}");
            }
        }
    }
    // Every acked receipt was processed (at least) once, effectively-once exactly
    // once; at-most-once messages at most once (a burst that finds all of a peer's
    // streams busy is dropped and counted, as at-most-once may be).
    let seen = seen.lock().unwrap().clone();
    for c in 0..CHANNELS {
        for i in 0..PER * 2 {
            let n = seen.get(&(u64::from(c) * 1_000 + i)).copied().unwrap_or(0);
            match guarantee(c) {
                Guarantee::AtMostOnce => assert!(n <= 1, "channel {c} message {i}: {n}"),
                Guarantee::AtLeastOnce => assert!(n >= 1, "channel {c} message {i}: {n}"),
                _ => assert_eq!(n, 1, "channel {c} message {i}"),
            }
        }
    }
    let st = b.stats().await.unwrap().proto;
    assert!(st.streams_recycled > 0, "{st:?}");
    a.shutdown().await;
    b.shutdown().await;
    for c in consumers {
        c.abort();
    }
}
