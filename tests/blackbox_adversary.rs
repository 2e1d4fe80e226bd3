//! Black-box adversary tests, round 3: a hostile peer on the network and a stressed
//! operator, against the public API only (README.md, docs/SECURITY.md, the rustdoc,
//! `ackwire::wire`). Real TCP on loopback. `tests/blackbox/acceptance.rs` already covers
//! junk from strangers, huge length prefixes, truncated frames, slowloris and single
//! absurd `Data` frames; this file goes further:
//!
//! - a hostile *receiver* that a real sending node dials (it lies in its acks),
//! - resource exhaustion from an admitted *sender* (floods within one connection),
//! - handshake abuse (versions, identity conflicts, reconnect loops).

#[path = "support/ports.rs"]
mod ports;
use ackwire::wire::{
    Ack, CreditProbe, Data, Finish, Frame, FrameDecoder, FrameEncoder, Negotiation,
    NegotiationStep, NodeCredit, Reject, RejectReason, SeqRange, VersionRange,
};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, IdKey, MessageId, Node, NodeId, Origin, Outcome, Receipt,
    ReceiverOptions, SendError,
};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

async fn receiver_node(id: u64, allow: &[u64]) -> Node {
    let mut b = Node::builder(NodeId(id)).bind(any_addr());
    for p in allow {
        b = b.allow_peer(NodeId(*p));
    }
    b.build().await.expect("receiver node builds")
}

fn frame_bytes(frame: &Frame, version: u16) -> BytesMut {
    let mut out = BytesMut::new();
    FrameEncoder::default()
        .with_version(version)
        .encode(frame, &mut out)
        .unwrap();
    out
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A raw peer connection after the handshake: the stream, the negotiated version, the
/// node's origin, bytes already read past the handshake, frames sent during it.
struct Raw {
    s: TcpStream,
    version: u16,
    peer: Origin,
    buf: BytesMut,
    early: Vec<Frame>,
}

impl Raw {
    async fn negotiate(mut s: TcpStream, origin: Origin, ours: VersionRange) -> Option<Raw> {
        let mut neg = Negotiation::new(origin, ours);
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

    async fn connect(addr: SocketAddr, origin: Origin) -> Option<Raw> {
        let s = TcpStream::connect(addr).await.ok()?;
        Raw::negotiate(s, origin, VersionRange::SUPPORTED).await
    }

    async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let b = frame_bytes(f, self.version);
        self.s.write_all(&b).await
    }

    /// Read frames for `dur` (or until the connection closes), answering pings.
    async fn read_for(&mut self, dur: Duration) -> Vec<Frame> {
        let mut out: Vec<Frame> = std::mem::take(&mut self.early);
        let mut dec = FrameDecoder::new(8 << 20).with_version(self.version);
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            while let Ok(Some(f)) = dec.decode(&mut self.buf) {
                if let Frame::Ping(hb) = &f {
                    let _ = self.send(&Frame::Pong(*hb)).await;
                }
                out.push(f);
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return out,
            }
        }
    }
}

/// A legit receiving node `b` that acks everything on channel 1, and a sending node
/// `a` that knows both `b` and the hostile receiver `x` (listening on `listener`).
async fn sender_with_hostile_receiver(
    a_id: u64,
    b_id: u64,
    x_id: u64,
) -> (Node, Node, TcpListener) {
    let listener = TcpListener::bind(any_addr()).await.unwrap();
    let b = receiver_node(b_id, &[a_id]).await;
    let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
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
        .expect("sender builds");
    (a, b, listener)
}

/// Spawn a watcher per receipt: index -> outcome once resolved.
type Outcomes = Arc<Mutex<HashMap<u64, Result<Outcome, SendError>>>>;
fn watch(receipts: Vec<(u64, Receipt)>) -> Outcomes {
    let out: Outcomes = Arc::default();
    for (i, r) in receipts {
        let out = out.clone();
        tokio::spawn(async move {
            let res = r.await;
            out.lock().unwrap().insert(i, res);
        });
    }
    out
}

fn payload_index(p: &Bytes) -> u64 {
    u64::from_be_bytes(p[..8].try_into().unwrap())
}

async fn legit_roundtrip(a: &Node, b_id: u64, secs: u64) -> Result<Duration, String> {
    let out = a
        .raw_sender(
            NodeId(b_id),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(secs),
        out.send(Bytes::from_static(b"legit")),
    )
    .await
    .map_err(|_| format!("send() did not return within {secs} s"))?
    .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(secs), r).await {
        Ok(Ok(Outcome::Acked)) => Ok(t0.elapsed()),
        Ok(other) => Err(format!("legit receipt: {other:?}")),
        Err(_) => Err(format!("legit receipt not resolved within {secs} s")),
    }
}

// -------------------------------------------------------------------------------------
// Attack 3: a receiver that lies in its acks to a real sending node
// -------------------------------------------------------------------------------------

/// The hostile receiver `x` grants no credit beyond the initial one, so of 400
/// at-least-once messages only the first ~256 go on the wire; the rest wait for
/// credit. Then it acks cumulatively up to 400 (and rejects a seq it never saw).
/// Promise (README table: Acked means the receiver acknowledged it; a receiver can only
/// acknowledge what it received): a message that was never transmitted must not
/// resolve `Ok(Acked)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_receiver_cannot_ack_messages_never_transmitted() {
    const N: u64 = 400;
    let (a, _b, listener) = sender_with_hostile_receiver(3101, 3102, 3103).await;
    let out = a
        .raw_sender(
            NodeId(3103),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..N {
        let r = out
            .send(Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
        receipts.push((i, r));
    }
    let outcomes = watch(receipts);
    let (s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("the sender dials the hostile receiver")
        .unwrap();
    let mut x = Raw::negotiate(
        s,
        Origin {
            node: NodeId(3103),
            incarnation: 77,
        },
        VersionRange::SUPPORTED,
    )
    .await
    .expect("handshake with the sender");
    eprintln!("negotiated version {}", x.version);
    let frames = x.read_for(Duration::from_millis(1500)).await;
    let mut transmitted = BTreeSet::new();
    let mut max_seq = 0;
    for f in &frames {
        if let Frame::Data(d) = f {
            transmitted.insert(payload_index(&d.payload));
            max_seq = max_seq.max(d.seq);
        }
    }
    eprintln!(
        "hostile receiver saw {} distinct messages (max seq {max_seq}) of {N}",
        transmitted.len()
    );
    assert!(
        (transmitted.len() as u64) < N,
        "precondition: some messages must still wait for credit"
    );
    // The lie: everything up to N acked, no new credit.
    x.send(&Frame::Ack(Ack {
        channel: ChannelId(1),
        incarnation: x.peer.incarnation,
        cumulative: N,
        ranges: vec![],
        credit: Some(0),
        received: N,
        held: Vec::new(),
    }))
    .await
    .unwrap();
    let later = x.read_for(Duration::from_millis(1500)).await;
    for f in &later {
        if let Frame::Data(d) = f {
            transmitted.insert(payload_index(&d.payload));
        }
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let mut phantom = Vec::new();
    for i in 0..N {
        if outcomes.get(&i) == Some(&Ok(Outcome::Acked)) && !transmitted.contains(&i) {
            phantom.push(i);
        }
    }
    eprintln!(
        "resolved {} receipts; Acked without ever being transmitted: {}",
        outcomes.len(),
        phantom.len()
    );
    assert!(
        phantom.is_empty(),
        "{} messages resolved Ok(Acked) although the sender never put them on the wire \
         (first: {:?})",
        phantom.len(),
        &phantom[..phantom.len().min(10)]
    );
}

/// The same for rejects: a Reject for a seq the sender never transmitted must not
/// resolve that message (the receiver cannot have judged a message it never saw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_receiver_cannot_reject_messages_never_transmitted() {
    const N: u64 = 300;
    let (a, _b, listener) = sender_with_hostile_receiver(3201, 3202, 3203).await;
    let out = a
        .raw_sender(
            NodeId(3203),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push((
            i,
            out.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .unwrap(),
        ));
    }
    let outcomes = watch(receipts);
    let (s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut x = Raw::negotiate(
        s,
        Origin {
            node: NodeId(3203),
            incarnation: 78,
        },
        VersionRange::SUPPORTED,
    )
    .await
    .unwrap();
    let frames = x.read_for(Duration::from_millis(1500)).await;
    let mut seq_of = HashMap::new();
    for f in &frames {
        if let Frame::Data(d) = f {
            seq_of.insert(d.seq, payload_index(&d.payload));
        }
    }
    let max_seen = seq_of.keys().copied().max().unwrap_or(0);
    eprintln!("saw {} data frames, max seq {max_seen}", seq_of.len());
    assert!(max_seen < N);
    for seq in (max_seen + 1)..=N {
        x.send(&Frame::Reject(Reject {
            channel: ChannelId(1),
            incarnation: x.peer.incarnation,
            seq,
            reason: RejectReason::NoReceiver,
        }))
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let outcomes = outcomes.lock().unwrap().clone();
    let resolved_unseen: Vec<_> = outcomes
        .iter()
        .filter(|(i, _)| **i >= max_seen)
        .map(|(i, r)| (*i, r.clone()))
        .collect();
    eprintln!(
        "rejected-before-transmission receipts resolved: {}",
        resolved_unseen.len()
    );
    assert!(
        resolved_unseen.is_empty(),
        "{} never-transmitted messages were resolved by a Reject, e.g. {:?}",
        resolved_unseen.len(),
        resolved_unseen.first()
    );
}

/// Acks with very many ranges: the hostile receiver holds the window (acks nothing,
/// grants credit 5000), lets the sender put ~4000 messages in flight, then sends ack
/// frames each carrying 200 000 ranges that all span the whole window. The sending
/// node's driver must not stall: its messages to the legitimate peer b keep being
/// acked within a couple of seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_with_many_overlapping_ranges_does_not_stall_the_sender() {
    const N: u64 = 4000;
    // The nodes run on a runtime of their own, so a stalled driver can be abandoned.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (a, _b, listener) = rt
        .spawn(sender_with_hostile_receiver(3301, 3302, 3303))
        .await
        .unwrap();
    let base = legit_roundtrip(&a, 3302, 10).await.expect("warm-up");
    eprintln!("legit warm-up round trip {base:?}");
    let out = a
        .raw_sender(
            NodeId(3303),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let sends = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..N {
            receipts.push(
                out.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                    .await
                    .unwrap(),
            );
        }
        (out, receipts)
    });
    let (s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut x = Raw::negotiate(
        s,
        Origin {
            node: NodeId(3303),
            incarnation: 79,
        },
        VersionRange::SUPPORTED,
    )
    .await
    .unwrap();
    let inc = x.peer.incarnation;
    x.send(&Frame::Ack(Ack {
        channel: ChannelId(1),
        incarnation: inc,
        cumulative: 0,
        ranges: vec![],
        credit: Some(N + 100),
        received: 0,
        held: Vec::new(),
    }))
    .await
    .unwrap();
    x.send(&Frame::NodeCredit(NodeCredit {
        limit: 1 << 20,
        received: 0,
    }))
    .await
    .unwrap();
    let frames = x.read_for(Duration::from_millis(2500)).await;
    let n_data = frames
        .iter()
        .filter(|f| matches!(f, Frame::Data(_)))
        .count();
    eprintln!("hostile receiver holds {n_data} data frames in flight");
    // Ranges that cover everything but seq 1 (so the window base stays at 1).
    let ranges: Vec<SeqRange> = (0..200_000)
        .map(|_| SeqRange {
            start: 2,
            end: u64::MAX,
        })
        .collect();
    let lie = frame_bytes(
        &Frame::Ack(Ack {
            channel: ChannelId(1),
            incarnation: inc,
            cumulative: 0,
            ranges,
            credit: Some(N + 100),
            received: 0,
            held: Vec::new(),
        }),
        x.version,
    );
    eprintln!("lying ack frame: {} bytes", lie.len());
    // Keep reading in the background so the sender's writes never block.
    let (rd, mut wr) = x.s.into_split();
    let drain = tokio::spawn(async move {
        let mut rd = rd;
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        // A steady trickle: one such frame every 200 ms (2 MB each, 10 MB/s).
        for _ in 0..50 {
            if wr.write_all(&lie).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "lying acks (200k ranges each) written by {:?}",
            t0.elapsed()
        );
        wr
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = legit_roundtrip(&a, 3302, 10).await;
    eprintln!(
        "legit round trip during the lie: {r:?} (at {:?})",
        t0.elapsed()
    );
    let stats_t = Instant::now();
    let st = tokio::time::timeout(Duration::from_secs(3), a.stats()).await;
    eprintln!("stats answered in {:?}: {}", stats_t.elapsed(), st.is_ok());
    drain.abort();
    writer.abort();
    sends.abort();
    drop(a);
    drop(_b);
    rt.shutdown_background();
    let took =
        r.expect("the legit peer is still served (driver stalled by ack frames with many ranges)");
    assert!(
        took < Duration::from_secs(4),
        "a legit message took {took:?} to be acked while receiving ack frames of 200k ranges \
         (driver stalled)"
    );
}

/// Credit of u64::MAX, received watermark far beyond what was sent, nacks in a loop:
/// the sending node must not panic, must not spin, must keep serving b; messages the
/// hostile receiver never acked must not resolve Acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_receiver_credit_max_and_nack_loop_sender_keeps_working() {
    const N: u64 = 50;
    let (a, _b, listener) = sender_with_hostile_receiver(3401, 3402, 3403).await;
    let out = a
        .raw_sender(
            NodeId(3403),
            ChannelOptions::new(ChannelId(1), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push((
            i,
            out.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .unwrap(),
        ));
    }
    let outcomes = watch(receipts);
    let (s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut x = Raw::negotiate(
        s,
        Origin {
            node: NodeId(3403),
            incarnation: 80,
        },
        VersionRange::SUPPORTED,
    )
    .await
    .unwrap();
    let inc = x.peer.incarnation;
    let _ = x.read_for(Duration::from_millis(500)).await;
    x.send(&Frame::Ack(Ack {
        channel: ChannelId(1),
        incarnation: inc,
        cumulative: 0,
        ranges: vec![],
        credit: Some(u64::MAX),
        received: u64::MAX,
        held: Vec::new(),
    }))
    .await
    .unwrap();
    x.send(&Frame::NodeCredit(NodeCredit {
        limit: u64::MAX,
        received: u64::MAX,
    }))
    .await
    .unwrap();
    x.send(&Frame::CreditProbe(CreditProbe {
        channel: ChannelId(1),
    }))
    .await
    .unwrap();
    // Nack loop: every seq, many times, plus seqs never sent.
    let mut batch = BytesMut::new();
    for round in 0..200u64 {
        for seq in [1, 2, N, N + 1, u64::MAX, round] {
            batch.extend_from_slice(&frame_bytes(
                &Frame::Nack(ackwire::wire::Nack {
                    channel: ChannelId(1),
                    incarnation: inc,
                    seq,
                }),
                x.version,
            ));
        }
    }
    x.s.write_all(&batch).await.unwrap();
    // Finish for streams that do not exist, in both directions.
    x.send(&Frame::Finish(Finish {
        channel: ChannelId(999),
        last_seq: 5,
        id_floor: 0,
    }))
    .await
    .unwrap();
    let frames = x.read_for(Duration::from_millis(1500)).await;
    let retrans = frames
        .iter()
        .filter(|f| matches!(f, Frame::Data(_)))
        .count();
    eprintln!("data frames after the nack loop: {retrans}");
    let r = legit_roundtrip(&a, 3402, 10).await;
    eprintln!("legit after: {r:?}");
    r.expect("the legit peer is still served");
    let outcomes = outcomes.lock().unwrap().clone();
    let acked: Vec<_> = outcomes
        .iter()
        .filter(|(_, r)| **r == Ok(Outcome::Acked))
        .collect();
    assert!(
        acked.is_empty(),
        "no ack ever acknowledged a message, yet {} resolved Acked",
        acked.len()
    );
    // The sender did not spin on the nack loop: bounded retransmissions.
    assert!(
        retrans < 200 * 6 * (N as usize),
        "retransmission storm: {retrans}"
    );
}

// -------------------------------------------------------------------------------------
// Attack 2: resource exhaustion from an admitted sender
// -------------------------------------------------------------------------------------

/// An admitted peer floods at-most-once frames (1 KiB each, 150 000 of them ≈ 150 MB)
/// on a channel whose receiver is registered but not (yet) consuming: the node keeps
/// serving a legitimate peer, and queues at most one stream window (plus
/// `CREDIT_SLACK`) of the flood; the rest is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_flood_to_a_busy_receiver_keeps_legit_traffic_flowing() {
    const N: u64 = 150_000;
    let b = receiver_node(3502, &[3501, 3503]).await;
    let addr = b.local_addr().unwrap();
    let _inbox = b.raw_receiver(ChannelId(1), false).unwrap(); // registered, never read
    let mut legit_inbox = b.raw_receiver(ChannelId(2), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = legit_inbox.recv().await {
            d.ack();
        }
    });
    let rss0 = rss_kib();
    let x = Raw::connect(
        addr,
        Origin {
            node: NodeId(3501),
            incarnation: 9,
        },
    )
    .await
    .expect("admitted");
    let (rd, mut wr) = x.s.into_split();
    let drain = tokio::spawn(async move {
        let mut rd = rd;
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let payload = Bytes::from(vec![0x5a; 1024]);
    let mut batch = BytesMut::new();
    let t0 = Instant::now();
    for seq in 1..=N {
        batch.extend_from_slice(&frame_bytes(
            &Frame::Data(Data {
                channel: ChannelId(1),
                seq,
                floor: seq.saturating_sub(100).max(1),
                id_floor: 0,
                id: None,
                guarantee: Guarantee::AtMostOnce,
                schema: 0,
                payload: payload.clone(),
            }),
            x.version,
        ));
        if batch.len() > 1 << 20 {
            if wr.write_all(&batch).await.is_err() {
                break;
            }
            batch.clear();
        }
        if t0.elapsed() > Duration::from_secs(12) {
            eprintln!("flood stopped at seq {seq} (time)");
            break;
        }
    }
    let _ = wr.write_all(&batch).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss1 = rss_kib();
    let grew_mb = rss1.saturating_sub(rss0) / 1024;
    let st = b.stats().await.unwrap();
    eprintln!(
        "AMO flood: RSS {} MB -> {} MB (+{grew_mb} MB); delivered (queued to a receiver that never reads) {}; frames_ignored {} credit_exceeded {} streams_refused {}",
        rss0 / 1024,
        rss1 / 1024,
        st.proto.delivered,
        st.proto.frames_ignored,
        st.proto.credit_exceeded,
        st.proto.streams_refused
    );
    // Legit traffic still flows.
    let a = Node::builder(NodeId(3503))
        .bind(any_addr())
        .peer(NodeId(3502), addr)
        .build()
        .await
        .unwrap();
    let out = a
        .raw_sender(
            NodeId(3502),
            ChannelOptions::new(ChannelId(2), Guarantee::AtLeastOnce),
        )
        .unwrap();
    let r = out.send(Bytes::from_static(b"x")).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), r).await;
    eprintln!("legit after AMO flood: {res:?}");
    drain.abort();
    assert!(matches!(res, Ok(Ok(Outcome::Acked))), "legit: {res:?}");
    // The flood is held to one stream window (plus the slack); RSS is printed, not
    // asserted (cargo test runs other tests in this process).
    let _ = grew_mb;
    let bound = 4096 + ackwire::proto::CREDIT_SLACK;
    assert!(
        st.proto.delivered <= bound,
        "{} flood messages queued for a receiver that never reads (bound {bound})",
        st.proto.delivered
    );
    assert!(
        st.proto.credit_exceeded > 0,
        "the flood's excess is counted"
    );
}

/// An admitted peer switches the guarantee mid-stream: effectively-once frames up to the
/// credit, then the same channel's frames claim at-most-once (no credit check), then
/// effectively-once again far beyond the credit. Bounded per-stream memory must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarantee_flip_does_not_bypass_stream_credit() {
    let b = receiver_node(3602, &[3601]).await;
    let addr = b.local_addr().unwrap();
    let _inbox = b.raw_receiver(ChannelId(1), false).unwrap(); // never read
    let x = Raw::connect(
        addr,
        Origin {
            node: NodeId(3601),
            incarnation: 10,
        },
    )
    .await
    .expect("admitted");
    let (rd, mut wr) = x.s.into_split();
    let drain = tokio::spawn(async move {
        let mut rd = rd;
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let payload = Bytes::from(vec![0x11; 512]);
    let mut batch = BytesMut::new();
    const N: u64 = 40_000;
    for seq in 1..=N {
        // Every other frame claims at-most-once: the stream's mode flips each frame.
        let g = if seq % 2 == 0 {
            Guarantee::AtMostOnce
        } else {
            Guarantee::AtLeastOnce
        };
        batch.extend_from_slice(&frame_bytes(
            &Frame::Data(Data {
                channel: ChannelId(1),
                seq,
                floor: 1,
                id_floor: 0,
                id: None,
                guarantee: g,
                schema: 0,
                payload: payload.clone(),
            }),
            x.version,
        ));
    }
    wr.write_all(&batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = b.stats().await.unwrap();
    let delivered_or_held = st.proto.delivered;
    eprintln!(
        "guarantee flip: received {} credit_exceeded {} frames_ignored {} (stream_credit 4096)",
        st.proto.delivered, st.proto.credit_exceeded, st.proto.frames_ignored
    );
    drain.abort();
    assert!(
        delivered_or_held <= 4096 + 1024,
        "{delivered_or_held} messages of one stream accepted into a receiver that never \
         consumed (stream_credit 4096 documented as the per-stream memory bound)"
    );
}

/// Effectively-once messages with 300 000 distinct application keys from an admitted
/// peer (acked by the receiver): the dedup memory reported by `Node::stats()` must
/// stay within its documented budget and the legit peer must still be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_idkeys_keep_dedup_memory_bounded() {
    let b = receiver_node(3702, &[3701, 3703]).await;
    let addr = b.local_addr().unwrap();
    let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.ack();
        }
    });
    let x = Raw::connect(
        addr,
        Origin {
            node: NodeId(3701),
            incarnation: 11,
        },
    )
    .await
    .expect("admitted");
    // Answer the credit by reading acks; send in windows of 2000.
    let version = x.version;
    let (rd, mut wr) = x.s.into_split();
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked2 = acked.clone();
    let credit = Arc::new(std::sync::atomic::AtomicU64::new(256));
    let credit2 = credit.clone();
    let reader = tokio::spawn(async move {
        let mut rd = rd;
        let mut dec = FrameDecoder::new(8 << 20).with_version(version);
        let mut buf = BytesMut::new();
        loop {
            while let Ok(Some(f)) = dec.decode(&mut buf) {
                if let Frame::Ack(a) = f {
                    acked2.fetch_max(a.cumulative, std::sync::atomic::Ordering::Relaxed);
                    if let Some(c) = a.credit {
                        credit2.fetch_max(c, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    });
    let m0 = b.stats().await.unwrap();
    eprintln!("dedup before: {:?}", m0.dedup);
    const N: u64 = 300_000;
    let t0 = Instant::now();
    let mut seq = 1u64;
    while seq <= N && t0.elapsed() < Duration::from_secs(12) {
        let top = credit.load(std::sync::atomic::Ordering::Relaxed).min(N);
        let mut batch = BytesMut::new();
        while seq <= top {
            batch.extend_from_slice(&frame_bytes(
                &Frame::Data(Data {
                    channel: ChannelId(1),
                    seq,
                    floor: acked.load(std::sync::atomic::Ordering::Relaxed) + 1,
                    id_floor: 0,
                    id: Some(MessageId::Key(IdKey(0xabcd_0000_0000 + u128::from(seq)))),
                    guarantee: Guarantee::EffectivelyOnce,
                    schema: 0,
                    payload: Bytes::from_static(b"k"),
                }),
                version,
            ));
            seq += 1;
        }
        if !batch.is_empty() {
            wr.write_all(&batch).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m1 = b.stats().await.unwrap();
    eprintln!(
        "sent {} keyed messages in {:?}; acked {}; dedup after: {:?}",
        seq - 1,
        t0.elapsed(),
        acked.load(std::sync::atomic::Ordering::Relaxed),
        m1.dedup
    );
    let a = Node::builder(NodeId(3703))
        .bind(any_addr())
        .peer(NodeId(3702), addr)
        .build()
        .await
        .unwrap();
    let r = legit_roundtrip(&a, 3702, 10).await;
    eprintln!("legit: {r:?}");
    reader.abort();
    r.expect("legit served");
    let bytes = m1.dedup.memory_bytes;
    let budget = ackwire::dedup::DEFAULT_TABLE_BUDGET_BYTES as u64;
    let n = seq - 1;
    eprintln!(
        "dedup memory_bytes {bytes} for {n} keys ({} B/key), budget {budget}",
        bytes / n.max(1)
    );
    assert!(
        bytes <= budget + (1 << 20),
        "dedup memory {bytes} above its documented budget {budget}"
    );
}

// -------------------------------------------------------------------------------------
// Attack 1: handshake abuse
// -------------------------------------------------------------------------------------

/// Handshakes that lie about versions: disjoint, reversed, huge, zero, a probe that
/// disagrees with the handshake, a second handshake in place of the probe. Each must
/// be refused or served, never kill the node; the legit peer keeps delivering; the
/// node is still accepting new connections afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_version_handshakes_do_not_disturb_the_node() {
    let b = receiver_node(3802, &[3801, 3803]).await;
    let addr = b.local_addr().unwrap();
    let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            d.ack();
        }
    });
    let a = Node::builder(NodeId(3803))
        .bind(any_addr())
        .peer(NodeId(3802), addr)
        .build()
        .await
        .unwrap();
    legit_roundtrip(&a, 3802, 10).await.expect("warm-up");
    let liar = Origin {
        node: NodeId(3801),
        incarnation: 5,
    };
    let hs = |version: u16| {
        Frame::Handshake(ackwire::wire::Handshake {
            version,
            origin: liar,
        })
    };
    let probe = |min: u16, max: u16| ackwire::wire::probe(VersionRange { min, max });
    let cases: Vec<(&str, Vec<Frame>)> = vec![
        ("v0", vec![hs(0)]),
        ("v65535", vec![hs(u16::MAX)]),
        ("probe reversed", vec![hs(2), probe(2, 1)]),
        ("probe 1..65535", vec![hs(1), probe(1, u16::MAX)]),
        ("probe min mismatch", vec![hs(1), probe(3, 3)]),
        ("probe 0..0", vec![hs(1), probe(0, 0)]),
        ("two handshakes", vec![hs(1), hs(1)]),
        ("probe only", vec![probe(1, 3)]),
        (
            "handshake then a pong before probe",
            vec![hs(1), Frame::Pong(ackwire::wire::Heartbeat { nonce: 7 })],
        ),
        ("handshake then 10k early frames", {
            let mut v = vec![hs(1)];
            for _ in 0..10_000 {
                v.push(Frame::Pong(ackwire::wire::Heartbeat { nonce: 1 }));
            }
            v
        }),
    ];
    let mut tasks = Vec::new();
    for (name, frames) in cases {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut bytes = BytesMut::new();
            for f in &frames {
                bytes.extend_from_slice(&frame_bytes(f, 1));
            }
            let _ = s.write_all(&bytes).await;
            let mut buf = vec![0u8; 4096];
            let mut total = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
            let closed = loop {
                match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(n)) => total += n,
                    Err(_) => break false,
                }
            };
            format!("{name}: read {total} B, closed={closed}")
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let dead = tokio::time::timeout(Duration::from_millis(5), b.closed()).await;
    assert!(dead.is_err(), "the node stopped: {dead:?}");
    for r in &results {
        eprintln!("{r}");
    }
    legit_roundtrip(&a, 3802, 10)
        .await
        .expect("legit still served after version lies");
    // New connections are still accepted (a fresh legit node handshakes fine).
    let fresh = Raw::connect(
        addr,
        Origin {
            node: NodeId(3801),
            incarnation: 6,
        },
    )
    .await;
    assert!(fresh.is_some(), "a normal handshake is refused afterwards");
}

/// Identity conflict: while the real node 3903 is connected, an impostor claims id 3903
/// with another incarnation (documented: refused, counted in rejected_duplicate_node,
/// an event on identity_conflicts, no replacement) — 200 times in a tight loop. The
/// real node's messages keep flowing, each acked, none processed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostor_reconnect_loop_does_not_displace_the_live_peer() {
    let b = receiver_node(3902, &[3903]).await;
    let addr = b.local_addr().unwrap();
    let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let mut inbox = b.receiver::<u64>(ChannelId(1), false).unwrap();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *s2.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    });
    let a = Node::builder(NodeId(3903))
        .bind(any_addr())
        .peer(NodeId(3902), addr)
        .build()
        .await
        .unwrap();
    let out = a
        .sender::<u64>(
            NodeId(3902),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let r = out.send(&0).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .unwrap(),
        Ok(Outcome::Acked)
    );
    let real_inc = a.origin().incarnation;
    let impostor = tokio::spawn(async move {
        let mut served = 0;
        for i in 0..200u64 {
            let inc = if i % 2 == 0 {
                real_inc + 1 + i
            } else {
                real_inc.saturating_sub(1 + i)
            };
            if let Some(mut raw) = Raw::connect(
                addr,
                Origin {
                    node: NodeId(3903),
                    incarnation: inc,
                },
            )
            .await
            {
                // If admitted, try to be harmful: ack/nack nonsense and a finish.
                served += 1;
                let _ = raw
                    .send(&Frame::Finish(Finish {
                        channel: ChannelId(1),
                        last_seq: 1,
                        id_floor: 0,
                    }))
                    .await;
            }
        }
        served
    });
    let mut receipts = Vec::new();
    for v in 1..=300u64 {
        receipts.push((v, out.send(&v).await.unwrap()));
        if v % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let served = impostor.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut bad = Vec::new();
    for (v, r) in receipts {
        match tokio::time::timeout_at(deadline, r).await {
            Ok(Ok(Outcome::Acked)) => {}
            other => bad.push(format!("{v}: {other:?}")),
        }
    }
    // A connection from another incarnation is held back briefly (`RESTART_GRACE`:
    // a clean restart's old connection may still be closing) before it is refused,
    // so the last refusals are counted a little after the loop; while held, each
    // keeps its IP slot, so part of a fast loop is refused by the per-IP limit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let ts = loop {
        let ts = b.tcp_stats().unwrap();
        if ts.rejected_duplicate_node + ts.rejected_ip_limit >= 200
            || tokio::time::Instant::now() > deadline
        {
            break ts;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "impostor handshakes served: {served}; rejected_duplicate_node {}, rejected_ip_limit {}",
        ts.rejected_duplicate_node, ts.rejected_ip_limit
    );
    assert!(
        bad.is_empty(),
        "legit receipts not acked: {:?}",
        &bad[..bad.len().min(5)]
    );
    // `served` counts completed ackwire handshakes; the duplicate check comes after
    // the handshake (then the connection is closed), so count the documented refusals.
    assert_eq!(
        ts.rejected_duplicate_node, served,
        "every impostor handshake must be refused as a duplicate while the real node is live"
    );
    assert_eq!(
        ts.rejected_duplicate_node + ts.rejected_ip_limit,
        200,
        "every impostor connection refused"
    );
    let seen = seen.lock().unwrap();
    for v in 0..=300u64 {
        assert_eq!(seen.get(&v).copied(), Some(1), "message {v}");
    }
}

/// Reconnect in a tight loop as the same admitted id with a fresh incarnation each time
/// (a peer that "restarts" 300 times), each run opening 256 streams with a frame on an
/// ordered channel held out of order. Stream state of previous runs is documented as
/// dropped on restart; RSS must stay bounded and a legit peer served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loop_with_max_streams_each_is_bounded() {
    let b = receiver_node(4002, &[4001, 4003]).await;
    let addr = b.local_addr().unwrap();
    for ch in 1..=300u32 {
        let mut inbox = b
            .raw_receiver_with(ChannelId(ch), ReceiverOptions::ordered())
            .unwrap();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                d.ack();
            }
        });
    }
    let a = Node::builder(NodeId(4003))
        .bind(any_addr())
        .peer(NodeId(4002), addr)
        .build()
        .await
        .unwrap();
    legit_roundtrip(&a, 4002, 10).await.expect("warm-up");
    let rss0 = rss_kib();
    let payload = Bytes::from(vec![7u8; 2048]);
    let t0 = Instant::now();
    let mut runs = 0;
    let mut prev: Option<Raw> = None;
    for inc in 1000..1300u64 {
        if t0.elapsed() > Duration::from_secs(12) {
            break;
        }
        let Some(mut x) = Raw::connect(
            addr,
            Origin {
                node: NodeId(4001),
                incarnation: inc,
            },
        )
        .await
        else {
            continue;
        };
        drop(prev.take());
        runs += 1;
        let mut batch = BytesMut::new();
        for ch in 1..=300u32 {
            for seq in 2..=20u64 {
                batch.extend_from_slice(&frame_bytes(
                    &Frame::Data(Data {
                        channel: ChannelId(ch),
                        seq,
                        floor: 1,
                        id_floor: 0,
                        id: None,
                        guarantee: Guarantee::AtLeastOnce,
                        schema: 0,
                        payload: payload.clone(),
                    }),
                    x.version,
                ));
            }
        }
        let _ = x.s.write_all(&batch).await;
        prev = Some(x);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss1 = rss_kib();
    let st = b.stats().await.unwrap();
    let grew = rss1.saturating_sub(rss0) / 1024;
    eprintln!(
        "{runs} runs; RSS +{grew} MB; streams_refused {} reorder_overflow {}",
        st.proto.streams_refused, st.proto.reorder_overflow
    );
    let r = legit_roundtrip(&a, 4002, 10).await;
    eprintln!("legit: {r:?}");
    r.expect("legit served");
    // One run may hold 256 streams x 19 frames x 2 KiB ≈ 10 MB.
    assert!(grew < 150, "RSS grew {grew} MB over {runs} restarts");
}

/// Property: a receiver that does not read holds at most one stream window (plus
/// `CREDIT_SLACK`) of one flooding peer's messages, whatever the guarantee and however
/// the flood lies about its floor (`floor = seq`: "everything before was settled").
/// The flood's frames past that are dropped and counted in `credit_exceeded`.
/// (Regression: at-most-once was never held, and a lying floor let acked guarantees
/// past their credit; a receiver that did not read grew with the flood.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_flood_is_held_to_one_window_for_every_guarantee() {
    const N: u64 = 30_000;
    let window = 4096 + ackwire::proto::CREDIT_SLACK;
    for (i, g) in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let me = 3600 + 10 * i as u64;
        let b = receiver_node(me, &[me + 1]).await;
        let addr = b.local_addr().unwrap();
        let _inbox = b.raw_receiver(ChannelId(1), false).unwrap(); // never read
        let x = Raw::connect(
            addr,
            Origin {
                node: NodeId(me + 1),
                incarnation: 3,
            },
        )
        .await
        .expect("admitted");
        let (rd, mut wr) = x.s.into_split();
        let drain = tokio::spawn(async move {
            let mut rd = rd;
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let mut batch = BytesMut::new();
        for seq in 1..=N {
            batch.extend_from_slice(&frame_bytes(
                &Frame::Data(Data {
                    channel: ChannelId(1),
                    seq,
                    floor: seq,
                    id_floor: if g == Guarantee::EffectivelyOnce {
                        seq
                    } else {
                        0
                    },
                    id: None,
                    guarantee: g,
                    schema: 0,
                    payload: Bytes::from_static(b"flood"),
                }),
                x.version,
            ));
            if batch.len() > 1 << 20 {
                wr.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        wr.write_all(&batch).await.unwrap();
        // Until the receiver has looked at every frame: delivered + dropped = N.
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            let st = b.stats().await.unwrap().proto;
            if st.delivered + st.credit_exceeded >= N || Instant::now() > deadline {
                break st;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        drain.abort();
        assert_eq!(st.delivered + st.credit_exceeded, N, "{g:?}: {st:?}");
        assert!(
            st.delivered <= window,
            "{g:?}: {} messages held for a receiver that does not read (bound {window})",
            st.delivered
        );
        b.shutdown().await;
    }
}

/// Property: one sending node cannot make a receiver that does not read hold more than
/// twice its node credit plus 1 024 of its messages (34 816 by default), however many
/// incarnations it claims (each restart brings fresh streams and fresh credit). The
/// rest is dropped and counted in `credit_exceeded`. (Regression: with the per-stream
/// hold alone, each claimed incarnation queued one more stream window: 12 runs, 52 224
/// messages.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cycling_incarnations_is_held_to_its_node_bound() {
    const RUNS: u64 = 12;
    const PER_RUN: u64 = 6_000;
    let bound = 2 * 16_384 + 1_024;
    let b = receiver_node(3700, &[3701]).await;
    let addr = b.local_addr().unwrap();
    let _inbox = b.raw_receiver(ChannelId(1), false).unwrap(); // never read
    for run in 1..=RUNS {
        let origin = Origin {
            node: NodeId(3701),
            incarnation: run,
        };
        let x = Raw::connect(addr, origin).await.expect("admitted");
        let (rd, mut wr) = x.s.into_split();
        let drain = tokio::spawn(async move {
            let mut rd = rd;
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let mut batch = BytesMut::new();
        for seq in 1..=PER_RUN {
            batch.extend_from_slice(&frame_bytes(
                &Frame::Data(Data {
                    channel: ChannelId(1),
                    seq,
                    floor: seq,
                    id_floor: 0,
                    id: None,
                    guarantee: if seq % 2 == 0 {
                        Guarantee::AtMostOnce
                    } else {
                        Guarantee::AtLeastOnce
                    },
                    schema: 0,
                    payload: Bytes::from_static(b"flood"),
                }),
                x.version,
            ));
        }
        wr.write_all(&batch).await.unwrap();
        // Until the receiver has looked at this run's frames.
        let want = run * PER_RUN;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = b.stats().await.unwrap().proto;
            if st.delivered + st.credit_exceeded >= want || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drain.abort();
        drop(wr);
        // The next run is a restart: wait until this connection is gone (a second
        // live connection of the same node is refused, which is not what this tests).
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.tcp_stats().is_some_and(|t| t.connections_closed < run) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let st = b.stats().await.unwrap().proto;
    assert!(
        st.delivered + st.credit_exceeded > bound,
        "enough of the flood arrived to test the bound: {st:?}"
    );
    assert!(
        st.delivered <= bound,
        "{} messages of one peer held for a receiver that does not read (bound {bound})",
        st.delivered
    );
    assert!(
        st.delivered >= 16_384,
        "an honest window still gets through: {}",
        st.delivered
    );
    b.shutdown().await;
}

/// Promise (README, rolling upgrades): a node speaking the newest version serves a
/// version-1 peer. A version-1 peer does not know the version probe that follows the
/// node's handshake and need not answer it before it sends: its first data frame
/// settles the version. (Regression: the node waited for the probe's answer, so a
/// version-1 client that sent data and read acks without answering pings was never
/// served.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_client_that_never_answers_pings_is_served() {
    let me = 3900;
    let b = receiver_node(me, &[me + 1]).await;
    let addr = b.local_addr().unwrap();
    let mut inbox = b.raw_receiver(ChannelId(1), false).unwrap();
    let consumer = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(d) = inbox.recv().await {
            got.push(u64::from_be_bytes(d.message()[..8].try_into().unwrap()));
            d.ack();
            if got.len() == 20 {
                break;
            }
        }
        got
    });
    let s = TcpStream::connect(addr).await.unwrap();
    let origin = Origin {
        node: NodeId(me + 1),
        incarnation: 7,
    };
    let mut x = Raw::negotiate(s, origin, VersionRange { min: 1, max: 1 })
        .await
        .expect("a version-1 client is admitted");
    assert_eq!(x.version, 1);
    const N: u64 = 20;
    for seq in 1..=N {
        x.send(&Frame::Data(Data {
            channel: ChannelId(1),
            seq,
            floor: 1,
            id_floor: 1,
            id: None,
            guarantee: Guarantee::AtLeastOnce,
            schema: 0,
            payload: Bytes::from(seq.to_be_bytes().to_vec()),
        }))
        .await
        .unwrap();
    }
    // Read the node's frames, never answering a ping, until every seq is acked.
    let mut dec = FrameDecoder::new(8 << 20).with_version(1);
    let mut acked = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (acked.len() as u64) < N {
        while let Ok(Some(f)) = dec.decode(&mut x.buf) {
            if let Frame::Ack(a) = f {
                acked.extend(1..=a.cumulative);
                for r in a.ranges {
                    acked.extend(r.start..=r.end);
                }
            }
        }
        match tokio::time::timeout_at(deadline, x.s.read_buf(&mut x.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            other => panic!("acked {} of {N} before {other:?}", acked.len()),
        }
    }
    assert_eq!(acked, (1..=N).collect());
    let mut got = tokio::time::timeout(Duration::from_secs(5), consumer)
        .await
        .expect("delivered")
        .unwrap();
    got.sort_unstable();
    assert_eq!(got, (1..=N).collect::<Vec<_>>());
    b.shutdown().await;
}
