//! Black-box tests: peers that lie on the wire, against nodes with DEFAULT settings
//! (plain TCP, configured peers), over real TCP on loopback, through the public API
//! and `ackwire::wire` only.
//!
//! What `tests/blackbox_adversary.rs`, `blackbox/acceptance.rs`, `blackbox/trust.rs`,
//! `blackbox_links.rs` and `integration/trust.rs` already cover is not repeated here (lying acks,
//! credit floods, handshake abuse, slowloris, identity conflicts, a never-reading peer
//! that pings every 200 ms). This file looks at what they miss:
//!
//! - a peer that makes the node *answer* (pongs) and never reads the answers (1);
//! - a peer that keeps its stream floor at 1 so the node keeps every reject, then asks
//!   for them all again with one tiny credit probe (2);
//! - an outsider claiming the node's *own* id, which skips the stranger check (3);
//! - node-wide tables one admitted peer can fill for everyone: the dedup stream
//!   registry (4) and the no-receiver grace clocks (5);
//! - a receiver that nacks one message in a loop and never reads (6; holds).
//!
//! Tests 1 to 5 failed when written (every run) and pass since the fixes: a stalled
//! peer is disconnected at `4 × queue_bound` queued frames; kept rejections count
//! against the stream's hold and are re-sent at most every 100 ms; a handshake
//! claiming the node's own id is refused at once; `max_streams_per_node`; a full
//! no-receiver table no longer answers "past the grace".
//!
//! A failing test reports the numbers it measured; the tests run one at a time (they
//! measure this process's memory).

// Each test holds a process-wide lock for its whole run (they measure this process's
// memory, so they must not overlap); each test has its own runtime, so holding a std
// mutex across its awaits blocks nothing but the other tests.
#![allow(clippy::await_holding_lock)]

#[path = "support/ports.rs"]
mod ports;
use ackwire::wire::{
    CreditProbe, Data, Frame, FrameDecoder, FrameEncoder, Heartbeat, Negotiation, NegotiationStep,
    VersionRange,
};
use ackwire::{ChannelId, Guarantee, Node, NodeId, Origin};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

fn frame_bytes(frame: &Frame, version: u16) -> BytesMut {
    let mut out = BytesMut::new();
    FrameEncoder::default()
        .with_version(version)
        .encode(frame, &mut out)
        .unwrap();
    out
}

/// Give freed heap back to the OS first (glibc), so memory an earlier test freed does
/// not hide this one's growth.
fn rss_kib() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free memory.
        unsafe {
            malloc_trim(0);
        }
    }
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of this process, in clock ticks (1/100 s on Linux).
fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The tests measure this process's memory and CPU: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

async fn within<F: std::future::Future>(secs: u64, what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {secs} s"))
}

/// A raw peer after the handshake.
struct Raw {
    s: TcpStream,
    version: u16,
    peer: Origin,
    buf: BytesMut,
    early: Vec<Frame>,
}

impl Raw {
    async fn connect(addr: SocketAddr, origin: Origin) -> Option<Raw> {
        let mut s = TcpStream::connect(addr).await.ok()?;
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
                    Ok(NegotiationStep::Done {
                        version,
                        origin: peer,
                        early,
                    }) => {
                        return Some(Raw {
                            s,
                            version,
                            peer,
                            buf,
                            early,
                        })
                    }
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
}

/// A node with default settings that admits `allow`.
async fn node(id: u64, allow: &[u64]) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(any_addr());
    for p in allow {
        b = b.allow_peer(NodeId(*p));
    }
    b.build().await.expect("node builds")
}

// -------------------------------------------------------------------------------------
// 1. A configured peer that pings as fast as it can and never reads the pongs.
// -------------------------------------------------------------------------------------

/// Standard: "Bad input gets a clear, typed error or a counted drop, never a panic or
/// a hang"; SECURITY.md: an authenticated peer can send "any amount of valid traffic
/// ... within the protocol's per-peer limits". A ping needs an answer; a peer that
/// does not read its answers must not make the node hold them without bound. The
/// transport never trims a connected peer's queue ("the protocol above already bounds
/// it") — but nothing bounds pongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_without_reading_does_not_grow_the_node_without_bound() {
    let _serial = serial();
    let (b_id, x_id) = (21_001, 21_002);
    let b = node(b_id, &[x_id]).await;
    let mut x = within(
        5,
        "handshake",
        Raw::connect(
            b.local_addr().unwrap(),
            Origin {
                node: NodeId(x_id),
                incarnation: 77,
            },
        ),
    )
    .await
    .expect("x is admitted");
    let v = x.version;
    // 64 KiB of pings per write; never read from the socket again.
    let mut batch = BytesMut::new();
    let one = frame_bytes(&Frame::Ping(Heartbeat { nonce: 1 }), v).len();
    let per_batch = (64 * 1024) / one;
    for n in 0..per_batch as u64 {
        batch.extend_from_slice(&frame_bytes(
            &Frame::Ping(Heartbeat {
                nonce: n | (1 << 40),
            }),
            v,
        ));
    }
    let batch = batch.freeze();
    let rss0 = rss_kib();
    let cpu0 = cpu_ticks();
    let t0 = Instant::now();
    let mut sent_pings = 0u64;
    let limit_kib = 1536 * 1024; // stop the attack at +1.5 GiB, whatever happens
    let mut stop_reason = "time";
    while t0.elapsed() < Duration::from_secs(8) {
        match tokio::time::timeout(Duration::from_secs(2), x.s.write_all(&batch)).await {
            Ok(Ok(())) => sent_pings += per_batch as u64,
            Ok(Err(_)) => {
                stop_reason = "connection closed by the node";
                break;
            }
            Err(_) => {
                stop_reason = "node stopped reading (backpressure)";
                break;
            }
        }
        if rss_kib().saturating_sub(rss0) > limit_kib {
            stop_reason = "memory limit of the test";
            break;
        }
    }
    let attack = t0.elapsed();
    // Let the node catch up with what it read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss1 = rss_kib();
    let cpu = cpu_ticks() - cpu0;
    let stats = b.tcp_stats().unwrap();
    eprintln!(
        "[ping flood] {sent_pings} pings ({one} B each, {} MiB) in {attack:?}, stopped: {stop_reason}; \
         node RSS {rss0} -> {rss1} KiB (+{} MiB); CPU {cpu} ticks; frames_received {} frames_sent {} \
         connections_closed {}",
        (sent_pings * one as u64) >> 20,
        rss1.saturating_sub(rss0) >> 10,
        stats.frames_received,
        stats.frames_sent,
        stats.connections_closed,
    );
    drop(x);
    within(10, "shutdown", b.shutdown()).await;
    let grew_mib = rss1.saturating_sub(rss0) >> 10;
    // Every ping read was answered with a pong queued for X: what was not written is
    // held by the node.
    let queued = stats.frames_received.saturating_sub(stats.frames_sent);
    // Bounded either way: few pongs left unwritten, or the peer was disconnected for
    // not reading (its queue cut; pongs of pings still in flight then meet the
    // disconnected bound).
    assert!(
        (queued < 100_000 || stats.stalled_peers_disconnected > 0) && grew_mib < 256,
        "a peer that pings and never reads grew the node by {grew_mib} MiB, {queued} pongs \
         queued ({sent_pings} pings of {one} B = {} MiB sent; {} frames received, {} written)",
        (sent_pings * one as u64) >> 20,
        stats.frames_received,
        stats.frames_sent
    );
}

// -------------------------------------------------------------------------------------
// 2. Rejects kept forever, and all of them re-sent for one credit probe.
// -------------------------------------------------------------------------------------

fn lying_data(seq: u64) -> Frame {
    Frame::Data(Data {
        channel: ChannelId(1),
        seq,
        // The lie: "nothing is settled", forever. Valid (floor <= seq).
        floor: 1,
        id_floor: 1,
        id: None,
        guarantee: Guarantee::AtLeastOnce,
        // Not the typed receiver's type: rejected with TypeMismatch, never delivered.
        schema: 0x5EED_F00D,
        payload: Bytes::new(),
    })
}

/// Standard: SECURITY.md, "What bounds one peer's memory": a stream holds at most its
/// window plus `CREDIT_SLACK` (4 352) of messages; and "bad input gets ... a counted
/// drop". A sender that never moves its floor past seqs the receiver rejected makes
/// the receiver keep every reject (`InboundStream::rejected`), without bound — and a
/// credit probe (one ~10-byte frame) makes it send *all* of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_kept_for_a_floor_that_never_moves_are_bounded_and_not_amplified() {
    let _serial = serial();
    const N: u64 = 60_000;
    let (b_id, x_id) = (21_101, 21_102);
    let b = node(b_id, &[x_id]).await;
    // A typed receiver (type check on: the default).
    let _inbox = b.receiver::<u32>(ChannelId(1), false).unwrap();
    let mut x = within(
        5,
        "handshake",
        Raw::connect(
            b.local_addr().unwrap(),
            Origin {
                node: NodeId(x_id),
                incarnation: 78,
            },
        ),
    )
    .await
    .expect("x is admitted");
    assert!(x.version >= 3, "rejects need protocol 3, got {}", x.version);
    let v = x.version;
    let _ = x.peer;
    // Send N mismatched frames in order, reading the rejects as they come, so the
    // node's writer never backs up (this is not test 1 again).
    let early = std::mem::take(&mut x.early);
    let early_rejects = early
        .iter()
        .filter(|f| matches!(f, Frame::Reject(_)))
        .count() as u64;
    let carry = std::mem::take(&mut x.buf);
    let (rd, mut wr) = x.s.into_split();
    let rejects_seen = Arc::new(AtomicU64::new(early_rejects));
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let rejects_seen = rejects_seen.clone();
        let reading = reading.clone();
        let mut buf = carry;
        tokio::spawn(async move {
            let mut rd = rd;
            let mut dec = FrameDecoder::new(8 << 20).with_version(v);
            while reading.load(Ordering::Relaxed) {
                while let Ok(Some(f)) = dec.decode(&mut buf) {
                    if matches!(f, Frame::Reject(_)) {
                        rejects_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match tokio::time::timeout(Duration::from_millis(100), rd.read_buf(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
            rd
        })
    };
    let mut out = BytesMut::new();
    for seq in 1..=N {
        out.extend_from_slice(&frame_bytes(&lying_data(seq), v));
        if out.len() > 64 * 1024 {
            within(5, "write", wr.write_all(&out)).await.unwrap();
            out.clear();
        }
    }
    within(5, "write", wr.write_all(&out)).await.unwrap();
    // Wait until the node rejected all of them.
    let t0 = Instant::now();
    while rejects_seen.load(Ordering::Relaxed) < N && t0.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = rejects_seen.load(Ordering::Relaxed);
    let s1 = within(5, "stats", b.stats()).await.unwrap();
    // One credit probe: how many rejects come back for it?
    let probe = frame_bytes(
        &Frame::CreditProbe(CreditProbe {
            channel: ChannelId(1),
        }),
        v,
    );
    let before = rejects_seen.load(Ordering::Relaxed);
    within(5, "probe", wr.write_all(&probe)).await.unwrap();
    let t1 = Instant::now();
    let mut last = before;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = rejects_seen.load(Ordering::Relaxed);
        if now == last || t1.elapsed() > Duration::from_secs(5) {
            break;
        }
        last = now;
    }
    let per_probe = rejects_seen.load(Ordering::Relaxed) - before;
    // Now stop reading and send 40 more probes (400 bytes): what does the node hold?
    reading.store(false, Ordering::Relaxed);
    let rd = within(5, "reader", reader).await.unwrap();
    let rss0 = rss_kib();
    let cpu0 = cpu_ticks();
    let mut probes = BytesMut::new();
    for _ in 0..40 {
        probes.extend_from_slice(&probe);
    }
    within(5, "probes", wr.write_all(&probes)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rss1 = rss_kib();
    let cpu = cpu_ticks() - cpu0;
    let s2 = within(5, "stats", b.stats()).await.unwrap();
    eprintln!(
        "[rejects kept] {N} mismatched frames with floor 1 -> {first} rejects \
         (type_mismatches {}, rejects_sent {}); ONE credit probe ({} B) -> {per_probe} rejects; \
         40 probes ({} B) unread -> rejects_sent +{}, node RSS {rss0} -> {rss1} KiB (+{} MiB), CPU {cpu} ticks",
        s1.proto.type_mismatches,
        s1.proto.rejects_sent,
        probe.len(),
        probes.len(),
        s2.proto.rejects_sent - s1.proto.rejects_sent,
        rss1.saturating_sub(rss0) >> 10,
    );
    drop((rd, wr));
    within(10, "shutdown", b.shutdown()).await;
    // An honest sender's floor passes a rejected seq within one window: the node need
    // never keep, or resend, more than one window's rejects per stream.
    let window = 4_096 + 256;
    assert!(
        per_probe <= window,
        "one {}-byte credit probe made the node send {per_probe} reject frames \
         (it keeps every reject of a stream whose floor never moves: {N} sent, {first} rejected)",
        probe.len()
    );
    assert!(
        rss1.saturating_sub(rss0) < 128 * 1024,
        "40 credit probes grew the node by {} MiB",
        rss1.saturating_sub(rss0) >> 10
    );
}

// -------------------------------------------------------------------------------------
// 3. A stranger claiming the node's OWN id gets the version-1 large-first-frame path.
// -------------------------------------------------------------------------------------

/// Open `n` connections to `addr`, each sending a version-1 handshake claiming
/// `claim`, then all but the last byte of a data frame of ~`frame_len` bytes (never
/// completed), read in the background so the node's writes never block. The tasks
/// keep the sockets open for 30 s.
async fn big_first_frames(
    addr: SocketAddr,
    claim: NodeId,
    n: usize,
    frame_len: usize,
    closed: Arc<AtomicU64>,
) -> usize {
    let mut hs = BytesMut::new();
    ackwire::wire::encode(
        &Frame::Handshake(ackwire::wire::Handshake {
            version: 1,
            origin: Origin {
                node: claim,
                incarnation: 99,
            },
        }),
        &mut hs,
    )
    .unwrap();
    let mut big = BytesMut::new();
    ackwire::wire::encode(
        &Frame::Data(Data {
            channel: ChannelId(1),
            seq: 1,
            floor: 1,
            id_floor: 1,
            id: None,
            guarantee: Guarantee::AtLeastOnce,
            schema: 0,
            payload: Bytes::from(vec![7u8; frame_len - 1024]),
        }),
        &mut big,
    )
    .unwrap();
    hs.extend_from_slice(&big[..big.len() - 1]);
    let bytes = hs.freeze();
    let mut opened = 0;
    for _ in 0..n {
        let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        else {
            continue;
        };
        opened += 1;
        let (mut r, mut w) = s.into_split();
        let bytes = bytes.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(6), w.write_all(&bytes)).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(w);
        });
        let closed = closed.clone();
        tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            loop {
                match tokio::time::timeout(Duration::from_secs(30), r.read(&mut sink)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Err(_) => break,
                }
            }
        });
    }
    opened
}

/// Standard: SECURITY.md, "Without TLS, an outsider using an unknown node id is
/// refused (`rejected_unknown_peer`) as soon as its handshake frame (at most 1 KiB) is
/// read, before anything after it ... only a peer claiming version 1 and a configured
/// id may send a first frame up to `max_frame_len`". An outsider that claims the
/// node's *own* id is not a configured peer, yet the node reads and holds its first
/// frame up to `max_frame_len` (8 MiB) before it refuses it as a self-connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_claiming_the_nodes_own_id_is_refused_before_a_large_first_frame() {
    let _serial = serial();
    const CONNS: usize = 60; // under the default 64 per address
    const FRAME: usize = 8 << 20; // the default max_frame_len
    let b_id = 21_201;
    let b = node(b_id, &[21_202]).await;
    let addr = b.local_addr().unwrap();
    // Control: the same bytes under an unknown id.
    let rss0 = rss_kib();
    let closed_stranger = Arc::new(AtomicU64::new(0));
    let opened =
        big_first_frames(addr, NodeId(55_555), CONNS, FRAME, closed_stranger.clone()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let closed_stranger = closed_stranger.load(Ordering::Relaxed);
    let rss_stranger = rss_kib();
    let st_stranger = b.tcp_stats().unwrap();
    // Wait until those are gone (refused at once), then the self-claim.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = rss_kib();
    let closed_self = Arc::new(AtomicU64::new(0));
    let opened_self = big_first_frames(addr, NodeId(b_id), CONNS, FRAME, closed_self.clone()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rss_self = rss_kib();
    let closed_self_early = closed_self.load(Ordering::Relaxed);
    let st_mid = b.tcp_stats().unwrap();
    // After the handshake timeout they are all refused.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let st_end = b.tcp_stats().unwrap();
    eprintln!(
        "[self-claim] unknown id x{opened}: RSS {rss0} -> {rss_stranger} KiB (+{} MiB), \
         rejected_unknown_peer {}, closed within 2.5 s {closed_stranger}; own id \
         (closed within 2.5 s {closed_self_early}) x{opened_self}: RSS {rss1} -> {rss_self} KiB (+{} MiB), \
         after 2.5 s handshakes_failed {} (wrong_peer {}, timeout {}, too_large {}), \
         after 6.5 s handshakes_failed {} (wrong_peer {}, timeout {}, unexpected {})",
        rss_stranger.saturating_sub(rss0) >> 10,
        st_stranger.rejected_unknown_peer,
        rss_self.saturating_sub(rss1) >> 10,
        st_mid.handshakes_failed - st_stranger.handshakes_failed,
        st_mid.rejected_wrong_peer,
        st_mid.rejected_handshake_timeout,
        st_mid.rejected_too_large,
        st_end.handshakes_failed - st_stranger.handshakes_failed,
        st_end.rejected_wrong_peer,
        st_end.rejected_handshake_timeout,
        st_end.rejected_unexpected_frame,
    );
    within(10, "shutdown", b.shutdown()).await;
    let grew = rss_self.saturating_sub(rss1) >> 10;
    assert!(
        grew < 64 && closed_self_early as usize == opened_self,
        "{opened_self} outsiders claiming the node's own id made it hold {grew} MiB \
         ({} refused, {closed_self_early} closed after 2.5 s); the same bytes under an unknown id: +{} MiB, all {} \
         refused at the handshake",
        st_mid.handshakes_failed - st_stranger.handshakes_failed,
        rss_stranger.saturating_sub(rss0) >> 10,
        st_stranger.rejected_unknown_peer
    );
}

/// The same bytes claiming a *configured* peer's id, which without TLS anyone can
/// claim: the node read and held a version-1 first frame of up to `max_frame_len`
/// (8 MiB) on each of 60 connections from one address, about 540 MiB until the
/// handshake timeout. Now at most four handshakes node-wide may read a first frame
/// that large; the others are refused at 1 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_claiming_a_configured_peer_cannot_make_the_node_hold_large_first_frames() {
    let _serial = serial();
    const CONNS: usize = 60; // under the default 64 per address
    const FRAME: usize = 8 << 20; // the default max_frame_len
    let b = node(21_301, &[21_302]).await;
    let addr = b.local_addr().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss0 = rss_kib();
    let closed = Arc::new(AtomicU64::new(0));
    let opened = big_first_frames(addr, NodeId(21_302), CONNS, FRAME, closed.clone()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rss1 = rss_kib();
    let st = b.tcp_stats().unwrap();
    let closed_early = closed.load(Ordering::Relaxed);
    within(10, "shutdown", b.shutdown()).await;
    let grew = rss1.saturating_sub(rss0) >> 10;
    eprintln!(
        "[configured-claim] x{opened}: RSS {rss0} -> {rss1} KiB (+{grew} MiB), closed within \
         2.5 s {closed_early}, too_large {}, handshakes_failed {}",
        st.rejected_too_large, st.handshakes_failed
    );
    // Four frames of 8 MiB, each buffer's capacity up to about twice that: < 128 MiB
    // (about 500 MiB before).
    assert!(
        grew < 128,
        "{opened} outsiders claiming a configured peer's id made the node hold {grew} MiB"
    );
    assert!(
        closed_early as usize + 4 >= opened,
        "only {closed_early} of {opened} refused within 2.5 s"
    );
}

// -------------------------------------------------------------------------------------
// 4. One peer fills the node-wide dedup stream registry with its own fake incarnations.
// -------------------------------------------------------------------------------------

/// Standard: SECURITY.md, an authenticated peer "can send any amount of valid traffic
/// ... within the protocol's *per-peer* limits", and "Ids that name X itself, in any
/// incarnation, are allowed". The dedup registry's `max_streams` (16 384 live sequence
/// windows, retired only after `retention`, 24 h) is one limit for the whole node. One
/// admitted peer that sends effectively-once frames whose explicit ids name 16 384
/// made-up incarnations of itself fills it; then every new effectively-once stream of
/// every *other* peer (a sender that restarted, a new channel) is refused
/// (`TooManyStreams`: not processed, not acked) until the fake ones retire a day later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_fill_the_nodes_dedup_streams_for_everyone() {
    let _serial = serial();
    const FAKE: u64 = 16_384 + 64;
    let (b_id, x_id, a_id) = (21_301, 21_302, 21_303);
    let b = node(b_id, &[x_id, a_id]).await;
    let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
    let legit_seen = Arc::new(AtomicU64::new(0));
    let fake_seen = Arc::new(AtomicU64::new(0));
    {
        let (l, f) = (legit_seen.clone(), fake_seen.clone());
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                if d.message().starts_with(b"legit") {
                    l.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                }
                d.ack();
            }
        });
    }
    let x = within(
        5,
        "handshake",
        Raw::connect(
            b.local_addr().unwrap(),
            Origin {
                node: NodeId(x_id),
                incarnation: 79,
            },
        ),
    )
    .await
    .expect("x is admitted");
    let v = x.version;
    let (mut rd, mut wr) = x.s.into_split();
    // Drain B's acks so its writer never backs up.
    tokio::spawn(async move {
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(Ok(k)) =
            tokio::time::timeout(Duration::from_secs(30), rd.read(&mut sink)).await
        {
            if k == 0 {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let mut out = BytesMut::new();
    for i in 1..=FAKE {
        out.extend_from_slice(&frame_bytes(
            &Frame::Data(Data {
                channel: ChannelId(1),
                seq: i,
                floor: i,
                id_floor: 0,
                // "A hint of my run number 1_000_000 + i": an id naming X itself.
                id: Some(ackwire::MessageId::Seq {
                    origin: Origin {
                        node: NodeId(x_id),
                        incarnation: 1_000_000 + i,
                    },
                    channel: ChannelId(1),
                    seq: 1,
                }),
                guarantee: Guarantee::EffectivelyOnce,
                schema: 0,
                payload: Bytes::from_static(b"x"),
            }),
            v,
        ));
        if i % 1000 == 0 {
            within(5, "write", wr.write_all(&out)).await.unwrap();
            out.clear();
            // Stay well within the stream's credit while B's application keeps up.
            while fake_seen.load(Ordering::Relaxed) + 2000 < i
                && t0.elapsed() < Duration::from_secs(8)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    within(5, "write", wr.write_all(&out)).await.unwrap();
    // Wait until B has taken in every frame of X's (each is delivered or refused):
    // on a loaded machine its driver is seconds behind, and a stats command queues
    // behind that backlog. The legitimate peer then meets the fullest table X makes.
    let s1 = loop {
        let s = within(30, "stats", b.stats()).await.unwrap();
        if fake_seen.load(Ordering::Relaxed) + s.proto.dedup_refused >= FAKE
            || t0.elapsed() > Duration::from_secs(60)
        {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = t0.elapsed();
    // Now a legitimate peer starts and sends 20 effectively-once messages.
    let a = Node::builder(NodeId(a_id))
        .bind(any_addr())
        .peer(NodeId(b_id), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let mut opts = ackwire::ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce);
    opts.deadline = Some(Duration::from_secs(4));
    let out_a = a.raw_sender(NodeId(b_id), opts).unwrap();
    let mut receipts = Vec::new();
    for i in 0..20u32 {
        let r = within(
            5,
            "legit send",
            out_a.send(Bytes::from(format!("legit {i}").into_bytes())),
        )
        .await
        .unwrap();
        receipts.push(r);
    }
    let mut tally: std::collections::BTreeMap<String, u32> = Default::default();
    for r in receipts {
        let o = tokio::time::timeout(Duration::from_secs(7), r).await;
        *tally.entry(format!("{o:?}")).or_default() += 1;
    }
    let s2 = within(5, "stats", b.stats()).await.unwrap();
    eprintln!(
        "[dedup streams] X sent {FAKE} frames naming {FAKE} incarnations of itself in {took:?}: \
         delivered {}, dedup streams live {} (fresh {}), dedup memory {} MiB; \
         legit A: receipts {tally:?}, processed {}; B dedup_refused {} -> {}",
        fake_seen.load(Ordering::Relaxed),
        s1.dedup.streams,
        s1.dedup.fresh,
        s1.dedup.memory_bytes >> 20,
        legit_seen.load(Ordering::Relaxed),
        s1.proto.dedup_refused,
        s2.proto.dedup_refused,
    );
    drop(wr);
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
    assert_eq!(
        legit_seen.load(Ordering::Relaxed),
        20,
        "after one peer named {FAKE} incarnations of itself ({} dedup streams live), a \
         legitimate peer's 20 effectively-once messages: processed {}, receipts {tally:?}",
        s1.dedup.streams,
        legit_seen.load(Ordering::Relaxed)
    );
}

// -------------------------------------------------------------------------------------
// 5. One peer uses up the node-wide table of channels waiting for a receiver.
// -------------------------------------------------------------------------------------

/// Send one at-least-once message from `a` to `b` on `ch` (no receiver yet), register
/// `b`'s receiver 1 s later (well within the 5 s `no_receiver_grace`), and return the
/// receipt's outcome.
async fn late_receiver_roundtrip(a: &Node, b: &Node, b_id: u64, ch: u32) -> String {
    let out = a
        .raw_sender(
            NodeId(b_id),
            ackwire::ChannelOptions::new(ChannelId(ch), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = within(5, "send", out.send(Bytes::from_static(b"late")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut inbox = b.raw_receiver(ChannelId(ch), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.ack();
        }
    });
    format!(
        "{:?}",
        tokio::time::timeout(Duration::from_secs(5), r).await
    )
}

/// Standard: `RejectReason::NoReceiver` — "No receiver is registered for the channel on
/// the target node, and none appeared within the grace period
/// (`ProtoConfig::no_receiver_grace`, 5 s)". The grace clocks live in one node-wide
/// table of 4 096 channels that is never pruned; once full, every further channel
/// counts as past its grace. One admitted peer fills it with 4 096 at-least-once frames on
/// made-up channels; from then on any peer's message to a receiver that registers a second
/// late is rejected at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_take_away_the_no_receiver_grace_of_others() {
    let (b_id, x_id, a_id) = (21_401, 21_402, 21_403);
    let b = node(b_id, &[x_id, a_id]).await;
    let a = Node::builder(NodeId(a_id))
        .bind(any_addr())
        .peer(NodeId(b_id), b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    // Control: before the attack, a receiver registered 1 s late gets the message.
    let before = late_receiver_roundtrip(&a, &b, b_id, 7).await;
    let x = within(
        5,
        "handshake",
        Raw::connect(
            b.local_addr().unwrap(),
            Origin {
                node: NodeId(x_id),
                incarnation: 80,
            },
        ),
    )
    .await
    .expect("x is admitted");
    let v = x.version;
    let (mut rd, mut wr) = x.s.into_split();
    tokio::spawn(async move {
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(Ok(k)) =
            tokio::time::timeout(Duration::from_secs(30), rd.read(&mut sink)).await
        {
            if k == 0 {
                break;
            }
        }
    });
    let mut out = BytesMut::new();
    for ch in 0..4_096u32 {
        out.extend_from_slice(&frame_bytes(
            &Frame::Data(Data {
                channel: ChannelId(1_000_000 + ch),
                seq: 1,
                floor: 1,
                id_floor: 1,
                id: None,
                guarantee: Guarantee::AtLeastOnce,
                schema: 0,
                payload: Bytes::new(),
            }),
            v,
        ));
    }
    within(5, "write", wr.write_all(&out)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = late_receiver_roundtrip(&a, &b, b_id, 8).await;
    let st = within(5, "stats", b.stats()).await.unwrap();
    eprintln!(
        "[grace] receiver registered 1 s late: before X's 4096 frames {before}; after {after}; \
         B rejected {} frames_ignored {}",
        st.proto.rejected, st.proto.frames_ignored
    );
    drop(wr);
    within(10, "a shutdown", a.shutdown()).await;
    within(10, "b shutdown", b.shutdown()).await;
    assert!(before.contains("Acked"), "control failed: {before}");
    assert!(
        after.contains("Acked"),
        "after one peer sent 4 096 at-least-once frames on made-up channels, another \
         peer's message to a receiver registered 1 s late (grace 5 s): {after}"
    );
}

// -------------------------------------------------------------------------------------
// 6. A lying receiver that nacks one message in a loop and never reads.
// -------------------------------------------------------------------------------------

/// Standard: "Bad input gets ... a counted drop, never a panic or a hang"; the
/// transport's "a connected peer's queue is never trimmed: the protocol above already
/// bounds it (each stream's receiver credit and in-flight window)". A nack queues a
/// retransmission with no retry budget and no bound: a receiver that nacks the same
/// seq in a loop (granting itself node credit) and never reads makes the *sending*
/// node queue one retransmitted data frame per nack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_loop_from_a_receiver_that_never_reads_does_not_grow_the_sender() {
    let _serial = serial();
    let (a_id, x_id) = (21_501, 21_502);
    let listener = tokio::net::TcpListener::bind(any_addr()).await.unwrap();
    let a = Node::builder(NodeId(a_id))
        .bind(any_addr())
        .peer(NodeId(x_id), listener.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let out = a
        .raw_sender(
            NodeId(x_id),
            ackwire::ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let receipt = within(5, "send", out.send(Bytes::from(vec![1u8; 1024])))
        .await
        .unwrap();
    let (s, _) = within(5, "accept", listener.accept()).await.unwrap();
    // Answer A's handshake from the accepted socket (A dialed us).
    let mut neg = Negotiation::new(
        Origin {
            node: NodeId(x_id),
            incarnation: 81,
        },
        VersionRange::SUPPORTED,
    );
    let mut s = s;
    let mut opening = BytesMut::new();
    for f in neg.opening() {
        opening.extend_from_slice(&frame_bytes(&f, 1));
    }
    s.write_all(&opening).await.unwrap();
    let mut dec = FrameDecoder::new(8 << 20).with_version(1);
    let mut buf = BytesMut::new();
    let (v, a_origin) = 'hs: loop {
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            match neg.on_frame(f) {
                Ok(NegotiationStep::NeedFrame) => {}
                Ok(NegotiationStep::Done {
                    version, origin, ..
                }) => break 'hs (version, origin),
                Err(e) => panic!("negotiation: {e:?}"),
            }
        }
        let n = within(5, "handshake read", s.read_buf(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "A closed during the handshake");
    };
    // Read what A sends for a moment (its first transmission), then never again.
    let _ = tokio::time::timeout(Duration::from_millis(300), s.read_buf(&mut buf)).await;
    let mut flood = BytesMut::new();
    flood.extend_from_slice(&frame_bytes(
        &Frame::NodeCredit(ackwire::wire::NodeCredit {
            limit: u64::MAX / 2,
            received: 0,
        }),
        v,
    ));
    let nack = frame_bytes(
        &Frame::Nack(ackwire::wire::Nack {
            channel: ChannelId(1),
            incarnation: a_origin.incarnation,
            seq: 1,
        }),
        v,
    );
    let mut batch = BytesMut::new();
    while batch.len() < 64 * 1024 {
        batch.extend_from_slice(&nack);
    }
    let per_batch = batch.len() / nack.len();
    let batch = batch.freeze();
    let s0 = within(5, "stats", a.stats()).await.unwrap();
    let rss0 = rss_kib();
    s.write_all(&flood).await.unwrap();
    let t0 = Instant::now();
    let mut nacks = 0u64;
    while t0.elapsed() < Duration::from_secs(6) {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&batch)).await {
            Ok(Ok(())) => nacks += per_batch as u64,
            _ => break,
        }
        if rss_kib().saturating_sub(rss0) > 1536 * 1024 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss1 = rss_kib();
    let s1 = within(5, "stats", a.stats()).await.unwrap();
    let tcp = s1.tcp.unwrap();
    let retrans = s1.proto.retransmitted - s0.proto.retransmitted;
    eprintln!(
        "[nack loop] {nacks} nacks of seq 1 ({} B each) in {:?}; sender A: retransmitted +{retrans}, \
         frames_sent {}, RSS {rss0} -> {rss1} KiB (+{} MiB)",
        nack.len(),
        t0.elapsed(),
        tcp.frames_sent,
        rss1.saturating_sub(rss0) >> 10,
    );
    drop(receipt);
    drop(s);
    within(10, "shutdown", a.shutdown()).await;
    let grew = rss1.saturating_sub(rss0) >> 10;
    assert!(
        retrans < 100_000 && grew < 256,
        "a receiver that nacked one message {nacks} times and never read made the sender \
         retransmit it {retrans} times ({} frames written) and grow by {grew} MiB",
        tcp.frames_sent
    );
}
