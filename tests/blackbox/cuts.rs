//! Black-box tests: killed connections and restarts, DEFAULT settings, real TCP.
//!
//! A user-space proxy sits between sender A and receiver B. Each proxied connection
//! can be cut with a FIN or an RST (SO_LINGER 0), black-holed (bytes read and
//! discarded both ways, socket kept open: a half-open / NAT-dropped connection), or
//! have only one direction shut down. Public API only.
//!
//! Found: a half-open (black-holed) connection was kept for ever: the transport never
//! redialed, the peer stayed Down and every send failed (fixed: `TcpConfig::idle_timeout`).

#![allow(clippy::type_complexity)]

use crate::support::ports;

use ackwire::dedup::DurableDedup;
use ackwire::detector::Health;
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Outcome, SendError};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

// -------------------------------------------------------------------------------------
// Proxy
// -------------------------------------------------------------------------------------

const FWD: u8 = 0;
/// Read and discard (socket stays open, nothing forwarded, nothing closed).
const HOLE: u8 = 1;
/// Close with FIN.
const FIN: u8 = 2;
/// Close with RST (SO_LINGER 0).
const RST: u8 = 3;
/// Shut down only the server -> client direction (the ack direction); keep the other.
const SHUT_DOWN_DIR: u8 = 4;
/// Forward client -> server, discard server -> client (acks and pongs black-holed).
const HOLE_DOWN: u8 = 5;
/// Forward server -> client, discard client -> server (data black-holed; the
/// receiver's pings still reach the sender).
const HOLE_UP: u8 = 6;
/// Stop reading from the client (the sender's socket buffers fill; its writes block).
const NOREAD_UP: u8 = 7;

struct Conn {
    mode: AtomicU8,
    /// bytes forwarded client -> server on this connection
    up_bytes: AtomicU64,
}

struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Conn>>>>,
    accepted: Arc<AtomicU64>,
    /// if set, a byte offset (client->server) at which each NEW connection is cut (RST)
    cut_at_byte: Arc<AtomicU64>,
    /// mode given to each new connection
    new_mode: Arc<AtomicU8>,
}

async fn pump(
    mut src: tokio::net::tcp::OwnedReadHalf,
    mut dst: tokio::net::tcp::OwnedWriteHalf,
    c: Arc<Conn>,
    up: bool,
    cut_at: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    pump_inner(&mut src, &mut dst, &c, up, cut_at, &mut buf).await;
    if c.mode.load(Ordering::Relaxed) == RST {
        let _ = src.as_ref().set_zero_linger();
    }
}

async fn pump_inner(
    src: &mut tokio::net::tcp::OwnedReadHalf,
    dst: &mut tokio::net::tcp::OwnedWriteHalf,
    c: &Conn,
    up: bool,
    cut_at: u64,
    buf: &mut [u8],
) {
    loop {
        let m = c.mode.load(Ordering::Relaxed);
        if m == FIN || m == RST {
            return;
        }
        if m == SHUT_DOWN_DIR && !up {
            let _ = dst.shutdown().await;
            // keep reading and discarding so the other side is not blocked
            loop {
                match src.read(buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let m = c.mode.load(Ordering::Relaxed);
                if m == FIN || m == RST {
                    return;
                }
            }
        }
        if m == NOREAD_UP && up {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let n = match tokio::time::timeout(Duration::from_millis(10), src.read(buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => {
                // A black hole does not pass the end on either: the far side keeps
                // its socket open (a vanished host sends no FIN).
                let m = c.mode.load(Ordering::Relaxed);
                if m == HOLE || (m == HOLE_DOWN && !up) || (m == HOLE_UP && up) {
                    while !matches!(c.mode.load(Ordering::Relaxed), FIN | RST) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                return;
            }
            Ok(Ok(n)) => n,
        };
        let m = c.mode.load(Ordering::Relaxed);
        if m == HOLE || (m == HOLE_DOWN && !up) || (m == HOLE_UP && up) {
            continue;
        }
        if m == FIN || m == RST {
            return;
        }
        let mut n = n;
        if up && cut_at > 0 {
            let before = c.up_bytes.load(Ordering::Relaxed);
            if before + n as u64 >= cut_at {
                // forward only up to the cut, then reset: a cut mid-frame
                n = (cut_at - before) as usize;
                let _ = dst.write_all(&buf[..n]).await;
                c.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
                c.mode.store(RST, Ordering::Relaxed);
                return;
            }
        }
        if up {
            c.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        if dst.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<Conn>>>> = Arc::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let cut_at_byte = Arc::new(AtomicU64::new(0));
        let new_mode = Arc::new(AtomicU8::new(FWD));
        let (c2, a2, k2) = (conns.clone(), accepted.clone(), cut_at_byte.clone());
        let nm = new_mode.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                a2.fetch_add(1, Ordering::Relaxed);
                let c = Arc::new(Conn {
                    mode: AtomicU8::new(nm.load(Ordering::Relaxed)),
                    up_bytes: AtomicU64::new(0),
                });
                c2.lock().unwrap().push(c.clone());
                let cut_at = k2.load(Ordering::Relaxed);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::spawn(pump(ir, ow, c.clone(), true, cut_at));
                    tokio::spawn(pump(or, iw, c, false, 0));
                });
            }
        });
        Proxy {
            addr,
            conns,
            accepted,
            cut_at_byte,
            new_mode,
        }
    }

    fn set_all(&self, mode: u8) {
        for c in self.conns.lock().unwrap().iter() {
            c.mode.store(mode, Ordering::Relaxed);
        }
    }
}

// -------------------------------------------------------------------------------------
// Rig: receiver B (restartable address), proxy, sender A dialing B through the proxy
// -------------------------------------------------------------------------------------

const CH_AMO: u32 = 1;
const CH_ALO: u32 = 2;
const CH_EO: u32 = 3;

type Seen = Arc<Mutex<HashMap<(u32, u64), u32>>>;

async fn start_b(id: u64, a_id: u64, addr: SocketAddr, cfg: NodeConfig, seen: &Seen) -> Node {
    let b = Node::builder(NodeId(id))
        .bind(addr)
        .allow_peer(NodeId(a_id))
        .config(cfg)
        .build()
        .await
        .unwrap();
    for ch in [CH_AMO, CH_ALO, CH_EO] {
        let mut inbox = b.raw_receiver(ChannelId(ch), false).unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut k = 0u64;
            while let Some(d) = inbox.recv().await {
                *seen
                    .lock()
                    .unwrap()
                    .entry((ch, index(d.message())))
                    .or_default() += 1;
                k += 1;
                // a sometimes-slow handler
                if k.is_multiple_of(500) {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                d.ack();
            }
        });
    }
    b
}

struct Rig {
    a: Node,
    b: Option<Node>,
    b_addr: SocketAddr,
    a_id: u64,
    b_id: u64,
    proxy: Proxy,
    seen: Seen,
}

async fn rig(base: u64) -> Rig {
    rig_with(base, NodeConfig::default(), NodeConfig::default()).await
}

async fn rig_with(base: u64, a_cfg: NodeConfig, b_cfg: NodeConfig) -> Rig {
    let (a_id, b_id) = (base + 1, base + 2);
    let b_addr = ports::restartable_addr();
    let seen: Seen = Arc::default();
    let b = start_b(b_id, a_id, b_addr, b_cfg, &seen).await;
    let proxy = Proxy::start(b_addr).await;
    let a = Node::builder(NodeId(a_id))
        .bind("127.0.0.1:0".parse().unwrap())
        .peer(NodeId(b_id), proxy.addr)
        .config(a_cfg)
        .build()
        .await
        .unwrap();
    Rig {
        a,
        b: Some(b),
        b_addr,
        a_id,
        b_id,
        proxy,
        seen,
    }
}

/// One acked round trip on channel ALO; returns how long it took.
async fn roundtrip(rig: &Rig, i: u64, secs: u64) -> Result<Duration, String> {
    let s = rig
        .a
        .raw_sender(
            NodeId(rig.b_id),
            ChannelOptions::new(ChannelId(CH_ALO), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(secs), async {
        s.send(payload(i, 16)).await?.await
    })
    .await;
    match r {
        Ok(Ok(Outcome::Acked)) => Ok(t.elapsed()),
        other => Err(format!("round trip {i}: {other:?} after {:?}", t.elapsed())),
    }
}

type Results = Arc<Mutex<Vec<(u32, u64, Result<Outcome, SendError>)>>>;

/// Send `n` messages on each of the three guarantees, `gap` between rounds.
fn spawn_stream(
    a: &Node,
    b_id: u64,
    n: u64,
    gap: Duration,
) -> (Results, tokio::task::JoinHandle<()>) {
    let results: Results = Arc::default();
    let mk = |ch: u32, g: Guarantee| {
        a.raw_sender(NodeId(b_id), ChannelOptions::new(ChannelId(ch), g))
            .unwrap()
    };
    let senders = [
        (CH_AMO, mk(CH_AMO, Guarantee::AtMostOnce)),
        (CH_ALO, mk(CH_ALO, Guarantee::AtLeastOnce)),
        (CH_EO, mk(CH_EO, Guarantee::EffectivelyOnce)),
    ];
    let r2 = results.clone();
    let h = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for i in 0..n {
            for (ch, s) in &senders {
                match s.send(payload(i, 100)).await {
                    Ok(rc) => {
                        let r3 = r2.clone();
                        let ch = *ch;
                        tasks.push(tokio::spawn(async move {
                            let res = rc.await;
                            r3.lock().unwrap().push((ch, i, res));
                        }));
                    }
                    Err(e) => r2.lock().unwrap().push((*ch, i, Err(e))),
                }
            }
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    (results, h)
}

/// Check the promises; returns problems.
fn judge(what: &str, results: &Results, seen: &Seen, expected_total: usize) -> Vec<String> {
    let res = results.lock().unwrap();
    let seen = seen.lock().unwrap();
    let mut problems = Vec::new();
    let mut tally: HashMap<String, u64> = HashMap::new();
    if res.len() != expected_total {
        problems.push(format!(
            "{} of {expected_total} receipts resolved",
            res.len()
        ));
    }
    for (ch, i, r) in res.iter() {
        let key = match r {
            Ok(o) => format!("ch{ch} Ok({o:?})"),
            Err(e) => {
                let d = format!("{e:?}");
                format!("ch{ch} Err({})", d.split([' ', '(', '{']).next().unwrap())
            }
        };
        *tally.entry(key).or_default() += 1;
        let k = seen.get(&(*ch, *i)).copied().unwrap_or(0);
        if *ch != CH_AMO && *r == Ok(Outcome::Acked) && k == 0 {
            problems.push(format!("ch{ch} msg {i}: Acked but never processed"));
        }
    }
    for ((ch, i), k) in seen.iter() {
        if *k > 1 && *ch != CH_ALO {
            problems.push(format!("ch{ch} msg {i} processed {k} times"));
        }
    }
    let dup_alo = seen
        .iter()
        .filter(|((c, _), k)| *c == CH_ALO && **k > 1)
        .count();
    let amo_delivered = seen.keys().filter(|(c, _)| *c == CH_AMO).count();
    let mut t: Vec<_> = tally.into_iter().collect();
    t.sort();
    eprintln!("[{what}] receipts {t:?}; amo delivered {amo_delivered}; alo dups {dup_alo}");
    problems.truncate(20);
    problems
}

async fn wait_connected(rig: &Rig) {
    roundtrip(rig, 9_000_000, 10).await.expect("warm-up");
}

// -------------------------------------------------------------------------------------
// 1. Cuts of the whole connection at many points
// -------------------------------------------------------------------------------------

async fn periodic_cuts(base: u64, every_ms: u64, how: &'static [u8]) {
    let rig = rig(base).await;
    wait_connected(&rig).await;
    let n = 2000;
    let (results, h) = spawn_stream(&rig.a, rig.b_id, n, Duration::from_millis(1));
    let stop = Arc::new(AtomicBool::new(false));
    let conns = rig.proxy.conns.clone();
    let st = stop.clone();
    let cutter = tokio::spawn(async move {
        let mut k = 0usize;
        while !st.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(every_ms)).await;
            let mode = how[k % how.len()];
            for c in conns.lock().unwrap().iter() {
                if c.mode.load(Ordering::Relaxed) == FWD {
                    c.mode.store(mode, Ordering::Relaxed);
                }
            }
            k += 1;
        }
        k
    });
    // cut while the stream is being sent (sends finishing), then heal
    let t0 = Instant::now();
    while rig.seen.lock().unwrap().len() < 2 * n as usize && t0.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let cuts = cutter.await.unwrap();
    within(90, "every receipt resolves", h).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let what = format!("cut every {every_ms} ms, {cuts} cuts");
    let mut problems = judge(&what, &results, &rig.seen, 3 * n as usize);
    eprintln!(
        "connections through proxy: {}",
        rig.proxy.accepted.load(Ordering::Relaxed)
    );
    // reconnects by itself: a fresh round trip works promptly
    if let Err(e) = roundtrip(&rig, 8_000_000, 10).await {
        problems.push(e);
    }
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_every_200ms_rst() {
    periodic_cuts(1100, 200, &[RST]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_every_300ms_fin() {
    periodic_cuts(1200, 300, &[FIN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_every_250ms_mixed_incl_ack_direction_shutdown() {
    periodic_cuts(1300, 250, &[RST, SHUT_DOWN_DIR, FIN]).await;
}

/// Each new connection is reset after a chosen number of client->server bytes: inside
/// or right after the handshake, and mid-frame at many offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_mid_frame_and_right_after_handshake() {
    let rig = rig(1400).await;
    wait_connected(&rig).await;
    let n = 1500;
    let (results, h) = spawn_stream(&rig.a, rig.b_id, n, Duration::from_millis(2));
    let offsets = [
        3u64, 20, 41, 64, 100, 257, 1001, 4099, 16_411, 65_537, 200_003,
    ];
    let mut k = 0;
    let t0 = Instant::now();
    while !h.is_finished() && t0.elapsed() < Duration::from_secs(60) && k < 120 {
        let off = offsets[k % offsets.len()];
        rig.proxy.cut_at_byte.store(off, Ordering::Relaxed);
        // kill the current connection so that the next one gets this offset
        rig.proxy.set_all(RST);
        k += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    rig.proxy.cut_at_byte.store(0, Ordering::Relaxed);
    rig.proxy.set_all(RST);
    within(90, "every receipt resolves", h).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let what = format!("mid-frame cuts x{k}");
    let mut problems = judge(&what, &results, &rig.seen, 3 * n as usize);
    if let Err(e) = roundtrip(&rig, 8_000_000, 15).await {
        problems.push(e);
    }
    eprintln!(
        "connections through proxy: {}",
        rig.proxy.accepted.load(Ordering::Relaxed)
    );
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

// -------------------------------------------------------------------------------------
// 2. Half-open connections: black-holed, never closed
// -------------------------------------------------------------------------------------

/// The established connection goes silent for good (as when a NAT or firewall drops
/// its state, or the peer's host vanishes): bytes are swallowed, nothing is closed.
/// New connections work. A user on defaults expects the node to notice the dead
/// connection (its heartbeats go unanswered; the detector says Down) and dial again,
/// so that a message sent now is delivered within its 30 s deadline.
async fn half_open_case(base: u64, mode: u8) {
    let rig = rig(base).await;
    wait_connected(&rig).await;
    let before = rig.proxy.accepted.load(Ordering::Relaxed);
    rig.proxy.set_all(mode);
    let t = Instant::now();
    let s = rig
        .a
        .raw_sender(
            NodeId(rig.b_id),
            ChannelOptions::new(ChannelId(CH_ALO), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = within(5, "send", s.send(payload(1, 16))).await;
    let res = match r {
        Ok(rc) => within(40, "receipt", rc).await,
        Err(e) => Err(e),
    };
    let took = t.elapsed();
    let after = rig.proxy.accepted.load(Ordering::Relaxed);
    eprintln!(
        "[half-open mode {mode}] first message: {res:?} after {took:?}; health {:?}; new connections {}",
        rig.a.health(NodeId(rig.b_id)),
        after - before
    );
    // And later: does the node ever dial again?
    let mut later = Err("not tried".to_string());
    for i in 0..3 {
        later = roundtrip(&rig, 100 + i, 10).await;
        if later.is_ok() {
            break;
        }
    }
    eprintln!(
        "[half-open mode {mode}] later: {later:?}; health {:?}; new connections {}; total {:?}",
        rig.a.health(NodeId(rig.b_id)),
        rig.proxy.accepted.load(Ordering::Relaxed) - before,
        t.elapsed()
    );
    let idle_a = rig.a.stats().await.unwrap().tcp.unwrap().idle_timeouts;
    let idle_b = rig
        .b
        .as_ref()
        .unwrap()
        .stats()
        .await
        .unwrap()
        .tcp
        .unwrap()
        .idle_timeouts;
    eprintln!("[half-open mode {mode}] idle_timeouts: sender {idle_a}, receiver {idle_b}");
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(
        idle_a + idle_b >= 1,
        "the dead connection's close is not counted"
    );
    assert_eq!(
        res,
        Ok(Outcome::Acked),
        "a message sent after the connection went half-open was not delivered within its \
         default 30 s deadline ({took:?}); the dead connection was not replaced"
    );
    assert!(later.is_ok(), "{later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_both_directions_is_replaced() {
    half_open_case(2100, HOLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_data_direction_is_replaced() {
    half_open_case(2400, HOLE_UP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_ack_direction_is_replaced() {
    half_open_case(2200, HOLE_DOWN).await;
}

/// Black hole longer than the failure detector's timeouts, then heal the SAME
/// connection: every receipt resolves, nothing acked is lost, EO once, AMO never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_beyond_detector_then_heal() {
    let rig = rig(2300).await;
    wait_connected(&rig).await;
    let n = 600;
    let (results, h) = spawn_stream(&rig.a, rig.b_id, n, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.proxy.set_all(HOLE);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during: Option<Health> = rig.a.health(NodeId(rig.b_id));
    eprintln!("health during the hole: {during:?}");
    rig.proxy.set_all(FWD);
    within(60, "every receipt resolves", h).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut problems = judge(
        "black hole 6 s then heal",
        &results,
        &rig.seen,
        3 * n as usize,
    );
    if let Err(e) = roundtrip(&rig, 8_000_000, 10).await {
        problems.push(e);
    }
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

// -------------------------------------------------------------------------------------
// 3. Restarts
// -------------------------------------------------------------------------------------

/// Receiver restarted twice on the same address while the sender keeps sending:
/// nothing acked is lost; with durable dedup effectively-once is processed once.
async fn receiver_restart_case(base: u64, durable: bool, clean: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dpath = dir.path().join("dedup");
    let mk_cfg = || {
        let mut c = NodeConfig::default();
        if durable {
            c.dedup.durable = Some(DurableDedup::new(dpath.clone()));
        }
        c
    };
    let mut rig = rig_with(base, NodeConfig::default(), mk_cfg()).await;
    wait_connected(&rig).await;
    let n = 3000;
    let (results, h) = spawn_stream(&rig.a, rig.b_id, n, Duration::from_millis(2));
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let b = rig.b.take().unwrap();
        if clean {
            within(20, "b shutdown", b.shutdown()).await;
        } else {
            drop(b);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        let b = loop {
            let seen = rig.seen.clone();
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                start_b_try(rig.b_id, rig.a_id, rig.b_addr, mk_cfg(), &seen),
            )
            .await;
            match r {
                Ok(Ok(b)) => break b,
                Ok(Err(e)) if t.elapsed() < Duration::from_secs(10) => {
                    eprintln!("restart {round}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("restart {round}: {:?}", other.map(|r| r.err())),
            }
        };
        eprintln!("restart {round} took {:?}", t.elapsed());
        rig.b = Some(b);
    }
    within(90, "every receipt resolves", h).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let what = format!("receiver restarted x2 durable={durable} clean={clean}");
    let mut problems = judge(&what, &results, &rig.seen, 3 * n as usize);
    let pre = format!("ch{CH_EO} msg");
    let eo_twice = |p: &String| p.starts_with(&pre) && p.contains("times");
    if !durable {
        // without durable dedup EO degrades to at-least-once across the restart
        problems.retain(|p| !eo_twice(p));
    } else if !clean {
        // A dropped node is a kill: the handlers here `ack()` (not `ack_durable()`),
        // so a message processed just before the drop, whose dedup record was not yet
        // written (its ack still queued, or the handler between its effect and its
        // ack), may be processed again after the restart (README, the `ack_durable`
        // row: "a receiver killed between ack() and the group commit (one batch) may
        // process that batch again"). A CI run saw one such message. Bounded, not
        // zero: a few per drop, never the stream.
        let twice = problems.iter().filter(|p| eo_twice(p)).count();
        eprintln!("[{what}] effectively-once messages processed twice across the drops: {twice}");
        if twice <= 2 * 64 {
            problems.retain(|p| !eo_twice(p));
        }
    }
    if let Err(e) = roundtrip(&rig, 8_000_000, 10).await {
        problems.push(e);
    }
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(problems.is_empty(), "[{what}] {problems:#?}");
}

async fn start_b_try(
    id: u64,
    a_id: u64,
    addr: SocketAddr,
    cfg: NodeConfig,
    seen: &Seen,
) -> Result<Node, ackwire::NodeError> {
    // probe the build first (the address or directory may still be held briefly)
    let b = Node::builder(NodeId(id))
        .bind(addr)
        .allow_peer(NodeId(a_id))
        .config(cfg.clone())
        .build()
        .await?;
    b.shutdown().await;
    Ok(start_b(id, a_id, addr, cfg, seen).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_restarted_clean_durable_dedup() {
    receiver_restart_case(3100, true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_restarted_clean_no_durable() {
    receiver_restart_case(3200, false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_dropped_and_restarted_durable_dedup() {
    receiver_restart_case(3300, true, false).await;
}

/// Sender restarted (new incarnation) with its old messages in flight: the link is
/// black-holed so nothing is acked, the sender shuts down (its unacked messages are
/// spooled to the hint store: `HandedOff`), and a new run of the same node id with the
/// same hint directory replays them. The old connection is still half-open at the
/// receiver (its peer's incarnation changes while it looks alive). Optionally the
/// receiver (durable dedup) is restarted too. Every effectively-once message whose
/// receipt was `Acked` or `HandedOff` is processed exactly once; at-least-once at
/// least once.
async fn sender_restart_case(base: u64, restart_receiver: bool) {
    let hints = tempfile::tempdir().unwrap();
    let dd = tempfile::tempdir().unwrap();
    let a_cfg = || {
        let mut c = NodeConfig::default();
        c.handoff = Some(ackwire::HandoffConfig::new(hints.path()));
        c
    };
    let b_cfg = || {
        let mut c = NodeConfig::default();
        c.dedup.durable = Some(DurableDedup::new(dd.path()));
        c
    };
    let mut rig = rig_with(base, a_cfg(), b_cfg()).await;
    wait_connected(&rig).await;
    let n = 800;
    let (results, h) = spawn_stream(&rig.a, rig.b_id, n, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(800)).await;
    rig.proxy.set_all(HOLE);
    within(60, "sending", h).await.unwrap_or(());
    // The sends finished (the receipts resolve at shutdown at the latest).
    let a = std::mem::replace(
        &mut rig.a,
        Node::builder(NodeId(base + 50))
            .bind("127.0.0.1:0".parse().unwrap())
            .build()
            .await
            .unwrap(),
    );
    let sd = Instant::now();
    within(30, "old sender shutdown", a.shutdown()).await;
    eprintln!("old sender shut down in {:?}", sd.elapsed());
    if restart_receiver {
        let b = rig.b.take().unwrap();
        within(20, "b shutdown", b.shutdown()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.b = Some(start_b(rig.b_id, rig.a_id, rig.b_addr, b_cfg(), &rig.seen).await);
    }
    // wait for the receipts collected by the stream task
    let t0 = Instant::now();
    while results.lock().unwrap().len() < 3 * n as usize && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // the new run
    let new_a = Node::builder(NodeId(rig.a_id))
        .bind("127.0.0.1:0".parse().unwrap())
        .peer(NodeId(rig.b_id), rig.proxy.addr)
        .config(a_cfg())
        .build()
        .await
        .unwrap();
    let old = std::mem::replace(&mut rig.a, new_a);
    old.shutdown().await;
    let t = Instant::now();
    // Everything Acked or HandedOff must be processed (the replay).
    let want: Vec<(u32, u64)> = results
        .lock()
        .unwrap()
        .iter()
        .filter(|(ch, _, r)| {
            *ch != CH_AMO && matches!(r, Ok(Outcome::Acked) | Ok(Outcome::HandedOff))
        })
        .map(|(ch, i, _)| (*ch, *i))
        .collect();
    let mut missing = want.len();
    while t.elapsed() < Duration::from_secs(40) {
        missing = {
            let seen = rig.seen.lock().unwrap();
            want.iter().filter(|k| !seen.contains_key(k)).count()
        };
        if missing == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "replay: {} of {} acked/handed-off messages missing after {:?}; stats {:?}",
        missing,
        want.len(),
        t.elapsed(),
        rig.a.stats().await.map(|s| s.hints)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut problems = judge(
        &format!("sender restarted (receiver restarted: {restart_receiver})"),
        &results,
        &rig.seen,
        3 * n as usize,
    );
    if missing > 0 {
        problems.push(format!(
            "{missing} of {} Acked/HandedOff messages never processed after the new run's replay",
            want.len()
        ));
    }
    if let Err(e) = roundtrip(&rig, 8_000_000, 15).await {
        problems.push(e);
    }
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_restarted_with_hints_while_old_connection_half_open() {
    sender_restart_case(4100, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_and_receiver_restarted_with_hints_and_durable_dedup() {
    sender_restart_case(4200, true).await;
}

/// The receiver's host vanishes behind a half-open connection (no FIN, no RST reaches
/// the sender) and the receiver comes back on the same address. The sender must
/// notice and dial the new run: a message sent then is acked within its default
/// 30 s deadline (before the fix: never; the sender held the dead connection and the
/// peer Down for good, every later send failing `PeerDown`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_vanishes_behind_half_open_connection_and_restarts() {
    let mut rig = rig(5100).await;
    wait_connected(&rig).await;
    rig.proxy.set_all(HOLE);
    let b = rig.b.take().unwrap();
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.b = Some(
        within(
            15,
            "restart",
            start_b_try(
                rig.b_id,
                rig.a_id,
                rig.b_addr,
                NodeConfig::default(),
                &rig.seen,
            ),
        )
        .await
        .unwrap(),
    );
    let t = Instant::now();
    let mut outcome = Err("none".to_string());
    // A user's sends: retry on PeerDown (typed, immediate) once a second.
    while t.elapsed() < Duration::from_secs(30) {
        match roundtrip(&rig, 7_000 + t.elapsed().as_secs(), 30).await {
            Ok(_) => {
                outcome = Ok(t.elapsed());
                break;
            }
            Err(e) => outcome = Err(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "[receiver vanished + restarted] {outcome:?}; health {:?}; new connections {}",
        rig.a.health(NodeId(rig.b_id)),
        rig.proxy.accepted.load(Ordering::Relaxed)
    );
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(
        outcome.is_ok(),
        "the sender never reached the restarted receiver: {outcome:?}"
    );
}

/// A peer whose host stops reading (its receive window closes; the sender's writes
/// block in the kernel) while the sender has lots unacknowledged: the sender's
/// `shutdown()` still completes (drain 5 s by default, then flush and close), and
/// every receipt resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_while_peer_stopped_reading() {
    let rig = rig(6100).await;
    wait_connected(&rig).await;
    rig.proxy.set_all(NOREAD_UP);
    let s = rig
        .a
        .raw_sender(
            NodeId(rig.b_id),
            ChannelOptions::new(ChannelId(CH_ALO), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..600u64 {
        match tokio::time::timeout(Duration::from_secs(2), s.send(payload(i, 32 * 1024))).await {
            Ok(Ok(r)) => receipts.push(r),
            Ok(Err(e)) => {
                eprintln!("send {i}: {e:?}");
                break;
            }
            Err(_) => {
                eprintln!("send {i} waits (window/credit)");
                break;
            }
        }
    }
    let n = receipts.len();
    let t = Instant::now();
    within(
        30,
        "sender shutdown while the peer does not read",
        rig.a.shutdown(),
    )
    .await;
    let took = t.elapsed();
    let mut tally: HashMap<String, u64> = HashMap::new();
    for r in receipts {
        let res = within(10, "receipt after shutdown", r).await;
        *tally.entry(format!("{res:?}")).or_default() += 1;
    }
    eprintln!("[no-read] {n} sent; shutdown took {took:?}; receipts {tally:?}");
    rig.b.unwrap().shutdown().await;
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
}

/// The receiver is away long enough for the redial backoff to reach its cap
/// (`backoff_max` 5 s by default), then returns on the same address: the sender is
/// connected again within the cap (plus a connect), not later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_within_backoff_cap_after_long_absence() {
    let mut rig = rig(7100).await;
    wait_connected(&rig).await;
    let b = rig.b.take().unwrap();
    within(20, "b shutdown", b.shutdown()).await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    rig.b = Some(
        start_b(
            rig.b_id,
            rig.a_id,
            rig.b_addr,
            NodeConfig::default(),
            &rig.seen,
        )
        .await,
    );
    let back = Instant::now();
    let mut last = Err(String::new());
    let mut i = 0;
    while back.elapsed() < Duration::from_secs(15) {
        last = roundtrip(&rig, 600 + i, 2).await;
        if last.is_ok() {
            break;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = back.elapsed();
    eprintln!(
        "[long absence] reconnected after {took:?} ({last:?}); connections {}",
        rig.proxy.accepted.load(Ordering::Relaxed)
    );
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(last.is_ok(), "{last:?}");
    assert!(
        took < Duration::from_secs(8),
        "reconnection took {took:?}, over backoff_max (5 s) + margin"
    );
}

/// Everything black-holed (the established connection and every new one) for 15 s,
/// longer than the detector's Down, the handshake timeout and the idle timeout; then
/// the network heals (the black-holed connections are dead: reset). Every receipt
/// resolves; nothing acked is lost; effectively-once processed once; at-most-once
/// never twice; the sender reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_black_hole_15s_then_heal() {
    let rig = rig(8100).await;
    wait_connected(&rig).await;
    let n = 1200;
    let (results, h) = spawn_stream(&rig.a, rig.b_id, n, Duration::from_millis(15));
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.proxy.new_mode.store(HOLE, Ordering::Relaxed);
    rig.proxy.set_all(HOLE);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let during = rig.a.health(NodeId(rig.b_id));
    rig.proxy.new_mode.store(FWD, Ordering::Relaxed);
    rig.proxy.set_all(RST);
    let healed = Instant::now();
    within(60, "every receipt resolves", h).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut problems = judge(
        "network black hole 15 s",
        &results,
        &rig.seen,
        3 * n as usize,
    );
    let mut back = Err(String::new());
    while healed.elapsed() < Duration::from_secs(20) {
        back = roundtrip(&rig, 8_000_000 + healed.elapsed().as_millis() as u64, 3).await;
        if back.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[network black hole] health during {during:?}; back {back:?} at {:?} after heal; connections {}",
        healed.elapsed(),
        rig.proxy.accepted.load(Ordering::Relaxed)
    );
    if let Err(e) = back {
        problems.push(e);
    }
    within(30, "a shutdown", rig.a.shutdown()).await;
    rig.b.unwrap().shutdown().await;
    assert!(problems.is_empty(), "{problems:#?}");
}
