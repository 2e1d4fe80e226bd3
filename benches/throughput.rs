//! End-to-end throughput over TCP loopback: one sender node → one receiver node, per
//! guarantee and message size, against two baselines in the same process:
//!
//! * `<guarantee>_tls`: the same ackwire streams over mutual TLS 1.3 (rustls + ring,
//!   certificates made at start-up), run in the same process as the plain rows.
//! * `<guarantee>_batch`: the batch API: the whole batch in one `send_many` call, the
//!   receiving handler takes up to [`RECV_MANY`] deliveries per `recv_many` and acks
//!   each one.
//! * `raw_tcp`: the same messages length-prefixed over one tokio TCP connection, no
//!   IDs, no acks; the receiving task counts them.
//! * `nats_jetstream`: a local `nats-server -js` (skipped with a message when the
//!   binary is absent): publish with a `Nats-Msg-Id` header and up to 256 outstanding
//!   publish acks, a durable pull consumer acks every message.
//!
//! Each iteration sends a batch of [`BATCH`] messages and stops the clock when the last
//! one was processed: for at-least-once and effectively-once when every receipt resolved
//! (the receiver's handler acked it and the ack came back); for at-most-once and raw TCP
//! when the receiving handler counted all of them. Run with
//! `cargo bench -p ackwire-benches --bench throughput -- --warm-up-time 1 --measurement-time 5`.

use ackwire::transport::tcp::{TcpConfig, TcpStats, TcpTransport};
use ackwire::transport::tls::TlsConfig;
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, RawSender};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// Messages per measured iteration.
const BATCH: u64 = 20_000;
/// At-most-once: arrivals stopping this long end a batch; the rest count as lost.
const QUIET: Duration = Duration::from_millis(200);
const SIZES: [usize; 2] = [64, 1024];
/// The batch rows' receiving handler takes up to this many deliveries per `recv_many`.
const RECV_MANY: usize = 1024;
const GUARANTEES: [Guarantee; 3] = [
    Guarantee::AtMostOnce,
    Guarantee::AtLeastOnce,
    Guarantee::EffectivelyOnce,
];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Counts messages processed by a receiving handler and wakes the bench once a target
/// count is reached; remembers when the last one arrived.
struct Counter {
    seen: AtomicU64,
    target: AtomicU64,
    reached: Notify,
    epoch: Instant,
    /// Nanoseconds after `epoch` of the latest arrival.
    last: AtomicU64,
    /// Messages that never arrived (at-most-once only).
    lost: AtomicU64,
}

impl Counter {
    fn new() -> Self {
        Counter {
            seen: AtomicU64::new(0),
            target: AtomicU64::new(0),
            reached: Notify::new(),
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    fn add(&self, n: u64) {
        let at = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(at, Ordering::Relaxed);
        let now = self.seen.fetch_add(n, Ordering::AcqRel) + n;
        if now >= self.target.load(Ordering::Acquire) {
            self.reached.notify_one();
        }
    }

    /// Set the next target `BATCH` above the current count; returns it.
    fn arm(&self) -> u64 {
        let t = self.seen.load(Ordering::Acquire) + BATCH;
        self.target.store(t, Ordering::Release);
        t
    }

    /// Wait until `target` messages were counted. If arrivals stop for `quiet` first,
    /// count the rest as lost and return the time of the last arrival.
    async fn wait(&self, start: Instant, target: u64, quiet: Duration) -> Duration {
        loop {
            let seen = self.seen.load(Ordering::Acquire);
            if seen >= target {
                return start.elapsed();
            }
            tokio::select! {
                _ = self.reached.notified() => {}
                _ = tokio::time::sleep(quiet) => {
                    if self.seen.load(Ordering::Acquire) == seen {
                        self.lost.fetch_add(target - seen, Ordering::Relaxed);
                        // Re-sync so the next batch counts from here.
                        self.target.store(0, Ordering::Release);
                        let last = self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed));
                        return last.saturating_duration_since(start);
                    }
                }
            }
        }
    }
}

/// The sender's settings: defaults, except that `ACKWIRE_BENCH_MIN_RTO_MS` (a
/// diagnostic, unset in the published numbers) raises the retransmission timeout
/// floor to show how much of the cost is spurious retransmission.
fn sender_config() -> NodeConfig {
    let mut config = NodeConfig::default();
    if let Some(ms) = std::env::var("ACKWIRE_BENCH_MIN_RTO_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let rto = Duration::from_millis(ms);
        config.proto.rtt.min_rto = rto;
        config.proto.rtt.initial_rto = config.proto.rtt.initial_rto.max(rto);
        config.proto.rtt.max_rto = config.proto.rtt.max_rto.max(rto);
        eprintln!("sender min_rto = {rto:?} (ACKWIRE_BENCH_MIN_RTO_MS)");
    }
    config
}

/// One ackwire stream under test.
struct Stream {
    guarantee: Guarantee,
    /// Sent with `send_many` and received with `recv_many` (the batch API rows).
    batched: bool,
    sender: RawSender,
    counter: Arc<Counter>,
    payload: Bytes,
}

/// The two nodes, one channel per (guarantee, size).
struct Pair {
    a: Node,
    b: Node,
    streams: Vec<Stream>,
    a_tcp: Arc<TcpStats>,
    b_tcp: Arc<TcpStats>,
}

/// TLS configurations for nodes 1 and 2 from a CA made now (rcgen).
fn tls_configs() -> (TlsConfig, TlsConfig) {
    use ackwire::transport::tls::{node_dns_name, rustls::pki_types::PrivateKeyDer};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let node = |id: u64| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![node_dns_name(NodeId(id))])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("cert");
        TlsConfig::new(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            vec![ca.der().clone()],
        )
        .expect("tls config")
    };
    (node(1), node(2))
}

async fn pair(tls: Option<(TlsConfig, TlsConfig)>) -> Pair {
    // The default configuration: receiver credit bounds what every guarantee queues.
    let config = NodeConfig::default();
    let (tls_a, tls_b) = tls.unzip();
    let mut tb = TcpTransport::new(loopback(), TcpConfig::default())
        .expect("tcp config")
        .allow_peer(NodeId(1));
    if let Some(t) = tls_b {
        tb = tb.with_tls(t);
    }
    let b_tcp = tb.stats();
    let b = Node::builder(NodeId(2))
        .transport(tb)
        .config(config)
        .build()
        .await
        .expect("receiver node");
    let mut ta = TcpTransport::new(loopback(), TcpConfig::default()).expect("tcp config");
    if let Some(t) = tls_a {
        ta = ta.with_tls(t);
    }
    let a_tcp = ta.stats();
    let a = Node::builder(NodeId(1))
        .transport(ta)
        .peer(NodeId(2), b.local_addr().expect("bound"))
        .config(sender_config())
        .build()
        .await
        .expect("sender node");
    let mut streams = Vec::new();
    let mut ch = 100;
    for batched in [false, true] {
        for &g in &GUARANTEES {
            for &size in &SIZES {
                ch += 1;
                let counter = Arc::new(Counter::new());
                let mut inbox = b.raw_receiver(ChannelId(ch), false).expect("receiver");
                let c = counter.clone();
                if batched {
                    tokio::spawn(async move {
                        let mut buf = Vec::with_capacity(RECV_MANY);
                        while inbox.recv_many(&mut buf, RECV_MANY).await > 0 {
                            let n = buf.len() as u64;
                            for d in buf.drain(..) {
                                std::hint::black_box(d.message());
                                d.ack();
                            }
                            c.add(n);
                        }
                    });
                } else {
                    tokio::spawn(async move {
                        while let Some(d) = inbox.recv().await {
                            std::hint::black_box(d.message());
                            d.ack();
                            c.add(1);
                        }
                    });
                }
                let sender = a
                    .raw_sender(NodeId(2), ChannelOptions::new(ChannelId(ch), g))
                    .expect("sender");
                streams.push(Stream {
                    guarantee: g,
                    batched,
                    sender,
                    counter,
                    payload: Bytes::from(vec![0xA5; size]),
                });
            }
        }
    }
    Pair {
        a,
        b,
        streams,
        a_tcp,
        b_tcp,
    }
}

/// Send one batch; return the elapsed time until it was processed.
async fn ackwire_batch(s: &Stream) -> Duration {
    let target = s.counter.arm();
    let start = Instant::now();
    let receipts = if s.batched {
        let payloads = (0..BATCH).map(|_| s.payload.clone());
        s.sender.send_many(payloads).await.expect("send_many")
    } else {
        let mut receipts = Vec::with_capacity(BATCH as usize);
        for _ in 0..BATCH {
            receipts.push(s.sender.send(s.payload.clone()).await.expect("send"));
        }
        receipts
    };
    if s.guarantee == Guarantee::AtMostOnce {
        drop(receipts);
        s.counter.wait(start, target, QUIET).await
    } else {
        for r in receipts {
            r.await.expect("acked");
        }
        start.elapsed()
    }
}

/// Application keys for `effectively_once_keyed`: distinct across the whole run, so
/// every send is a new key in the receiver's key table (none is a duplicate).
static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// [`ackwire_batch`] with an application key per message (`send_with_key`).
async fn ackwire_keyed_batch(s: &Stream) -> Duration {
    let start = Instant::now();
    let mut receipts = Vec::with_capacity(BATCH as usize);
    for _ in 0..BATCH {
        let k = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        // Spread the keys over the 128 bits the way hashed business ids would be.
        let key =
            ackwire::IdKey(u128::from(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)) << 64 | u128::from(k));
        receipts.push(
            s.sender
                .send_with_key(s.payload.clone(), key)
                .await
                .expect("send"),
        );
    }
    for r in receipts {
        r.await.expect("acked");
    }
    start.elapsed()
}

/// The raw TCP baseline: one connection, `u32` length prefix, a counting reader.
struct Raw {
    writer: tokio::sync::Mutex<BufWriter<TcpStream>>,
    counter: Arc<Counter>,
}

async fn raw() -> Raw {
    let listener = TcpListener::bind(loopback()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counter = Arc::new(Counter::new());
    let c = counter.clone();
    tokio::spawn(async move {
        let (sock, _) = listener.accept().await.expect("accept");
        sock.set_nodelay(true).ok();
        let mut r = BufReader::with_capacity(64 << 10, sock);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let Ok(len) = r.read_u32().await else { return };
            let len = len as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            if r.read_exact(&mut buf[..len]).await.is_err() {
                return;
            }
            std::hint::black_box(&buf[..len]);
            c.add(1);
        }
    });
    let sock = TcpStream::connect(addr).await.expect("connect");
    sock.set_nodelay(true).ok();
    Raw {
        writer: tokio::sync::Mutex::new(BufWriter::with_capacity(64 << 10, sock)),
        counter,
    }
}

async fn raw_batch(raw: &Raw, payload: &[u8]) -> Duration {
    let target = raw.counter.arm();
    let start = Instant::now();
    let mut w = raw.writer.lock().await;
    for _ in 0..BATCH {
        w.write_u32(payload.len() as u32).await.expect("write");
        w.write_all(payload).await.expect("write");
    }
    w.flush().await.expect("flush");
    raw.counter.wait(start, target, QUIET).await
}

fn guarantee_name(g: Guarantee) -> &'static str {
    match g {
        Guarantee::AtMostOnce => "at_most_once",
        Guarantee::AtLeastOnce => "at_least_once",
        Guarantee::EffectivelyOnce => "effectively_once",
    }
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let tls_pair = rt.block_on(pair(Some(tls_configs())));
    let pair = rt.block_on(pair(None));
    let raw = rt.block_on(raw());
    let mut group = c.benchmark_group("throughput");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH));
    for &size in &SIZES {
        let payload = vec![0xA5u8; size];
        group.bench_with_input(BenchmarkId::new("raw_tcp", size), &size, |b, _| {
            b.to_async(&rt).iter_custom(|iters| {
                let (raw, payload) = (&raw, &payload);
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += raw_batch(raw, payload).await;
                    }
                    total
                }
            })
        });
        for s in pair.streams.iter().filter(|s| s.payload.len() == size) {
            let name = if s.batched {
                format!("{}_batch", guarantee_name(s.guarantee))
            } else {
                guarantee_name(s.guarantee).to_string()
            };
            let id = BenchmarkId::new(name, size);
            group.bench_with_input(id, &size, |b, _| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += ackwire_batch(s).await;
                    }
                    total
                })
            });
        }
        // Keyed next to unkeyed effectively-once, same stream, same run (issue 17's
        // sustained-rate comparison). 64 B only: every key stays in the receiver's
        // key table for the 2-minute horizon, and the default 256 MiB budget admitted
        // ~3 M of them in a minute but not ~4.5 M (BENCHMARKS.md): one 64 B run's worth.
        for s in pair.streams.iter().filter(|s| {
            size == SIZES[0]
                && s.payload.len() == size
                && s.guarantee == Guarantee::EffectivelyOnce
                && !s.batched
        }) {
            let id = BenchmarkId::new("effectively_once_keyed", size);
            group.bench_with_input(id, &size, |b, _| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += ackwire_keyed_batch(s).await;
                    }
                    total
                })
            });
        }
        for s in tls_pair
            .streams
            .iter()
            .filter(|s| s.payload.len() == size && !s.batched)
        {
            let id = BenchmarkId::new(format!("{}_tls", guarantee_name(s.guarantee)), size);
            group.bench_with_input(id, &size, |b, _| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += ackwire_batch(s).await;
                    }
                    total
                })
            });
        }
    }
    group.finish();
    let (sa, sb) = rt.block_on(async { (pair.a.stats().await, pair.b.stats().await) });
    if let (Ok(sa), Ok(sb)) = (sa, sb) {
        eprintln!(
            "sender: sent {} retransmitted {} acked {} credit waits {}; receiver: delivered {} \
             duplicates {} dedup_refused {}",
            sa.proto.sent,
            sa.proto.retransmitted,
            sa.proto.acked,
            sa.proto.credit_waits,
            sb.proto.delivered,
            sb.proto.duplicates_dropped,
            sb.proto.dedup_refused
        );
    }
    for s in &pair.streams {
        let lost = s.counter.lost.load(Ordering::Relaxed);
        let seen = s.counter.seen.load(Ordering::Relaxed);
        eprintln!(
            "{}{} {} B: received {seen}, lost {lost}",
            guarantee_name(s.guarantee),
            if s.batched { "_batch" } else { "" },
            s.payload.len()
        );
    }
    eprintln!("raw tcp lost: {}", raw.counter.lost.load(Ordering::Relaxed));
    eprintln!("sender tcp: {:?}", pair.a_tcp.snapshot());
    eprintln!("receiver tcp: {:?}", pair.b_tcp.snapshot());
    eprintln!("tls sender tcp: {:?}", tls_pair.a_tcp.snapshot());
    rt.block_on(async {
        pair.a.shutdown().await;
        pair.b.shutdown().await;
        tls_pair.a.shutdown().await;
        tls_pair.b.shutdown().await;
    });
}

mod nats {
    //! The NATS JetStream peer: a throwaway `nats-server -js` on loopback.

    use super::{runtime, BATCH};
    use async_nats::jetstream::{self, consumer, stream};
    use bytes::Bytes;
    use criterion::{BenchmarkId, Criterion, Throughput};
    use futures::StreamExt;
    use std::collections::VecDeque;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// Outstanding publish acks before the publisher waits for the oldest.
    const ACK_WINDOW: usize = 256;
    /// Payload size, the same as the effectively-once 64 B run.
    const SIZE: usize = 64;

    struct Server {
        child: Child,
        _dir: tempfile::TempDir,
        port: u16,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    fn start() -> Option<Server> {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(Server {
                child,
                _dir: dir,
                port,
            }),
            Err(e) => {
                eprintln!(
                    "SKIP nats_jetstream: cannot run `nats-server` ({e}); install it \
                     (Debian: apt-get install nats-server) to compare against JetStream"
                );
                None
            }
        }
    }

    async fn connect(port: u16) -> async_nats::Client {
        let url = format!("nats://127.0.0.1:{port}");
        for _ in 0..100 {
            if let Ok(c) = async_nats::connect(&url).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nats-server did not come up on {url}");
    }

    /// One iteration: publish `BATCH` messages with ids, consume and ack them all.
    async fn batch(
        js: &jetstream::Context,
        messages: &tokio::sync::Mutex<consumer::pull::Stream>,
        subject: &str,
        next_id: &AtomicU64,
    ) -> Duration {
        let payload = Bytes::from(vec![0xA5u8; SIZE]);
        let mut messages = messages.lock().await;
        let start = Instant::now();
        let consume = async {
            let mut n = 0;
            while n < BATCH {
                let m = messages
                    .next()
                    .await
                    .expect("stream open")
                    .expect("message");
                std::hint::black_box(&m.payload);
                m.ack().await.expect("ack");
                n += 1;
            }
        };
        let publish = async {
            let mut acks = VecDeque::with_capacity(ACK_WINDOW);
            for _ in 0..BATCH {
                if acks.len() == ACK_WINDOW {
                    let f: jetstream::context::PublishAckFuture =
                        acks.pop_front().expect("non-empty");
                    f.await.expect("publish ack");
                }
                let id = next_id.fetch_add(1, Ordering::Relaxed).to_string();
                let p = jetstream::context::Publish::build()
                    .payload(payload.clone())
                    .message_id(id);
                acks.push_back(
                    js.send_publish(subject.to_string(), p)
                        .await
                        .expect("publish"),
                );
            }
            for f in acks {
                f.await.expect("publish ack");
            }
        };
        tokio::join!(consume, publish);
        start.elapsed()
    }

    pub(super) fn bench(c: &mut Criterion) {
        let Some(server) = start() else { return };
        let rt = runtime();
        // async-nats spawns from its subscribers' `Drop`: keep a runtime context.
        let _enter = rt.enter();
        let next_id = AtomicU64::new(1);
        let mut group = c.benchmark_group("nats_jetstream");
        group.sample_size(10);
        group.throughput(Throughput::Elements(BATCH));
        let client = rt.block_on(connect(server.port));
        let js = jetstream::new(client);
        for (name, storage) in [
            ("file", stream::StorageType::File),
            ("memory", stream::StorageType::Memory),
        ] {
            let subject = format!("bench.{name}");
            let messages = rt.block_on(async {
                let s = js
                    .get_or_create_stream(stream::Config {
                        name: format!("BENCH_{name}"),
                        subjects: vec![subject.clone()],
                        storage,
                        ..Default::default()
                    })
                    .await
                    .expect("create stream");
                s.create_consumer(consumer::pull::Config {
                    durable_name: Some(format!("c_{name}")),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                })
                .await
                .expect("create consumer")
                .stream()
                .max_messages_per_batch(1000)
                .messages()
                .await
                .expect("pull messages")
            });
            let messages = tokio::sync::Mutex::new(messages);
            group.bench_with_input(BenchmarkId::new(name, SIZE), &SIZE, |b, _| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (js, messages, subject, next_id) = (&js, &messages, &subject, &next_id);
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += batch(js, messages, subject, next_id).await;
                        }
                        total
                    }
                })
            });
        }
        group.finish();
        drop(js);
        drop(_enter);
        drop(rt);
        drop(server);
    }
}

criterion_group!(benches, throughput, nats::bench);
criterion_main!(benches);
