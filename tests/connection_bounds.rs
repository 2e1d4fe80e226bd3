//! The node-wide bound on inbound connections in their handshake
//! (`TcpConfig::max_handshaking`), over real TCP on loopback.
//!
//! An outsider that sends nothing holds idle connections from many source addresses
//! (127.0.0.x are all local on Linux; they stand for an IPv6 prefix, a botnet or a NAT
//! pool). The per-address limit (`max_connections_per_ip`, 64) holds for each address,
//! but before the node-wide bound nothing limited the total: the node kept a descriptor
//! for each until its handshake timeout, and at a common 1 024-descriptor limit the
//! process could no longer open sockets or files. Now at most `max_handshaking` are
//! held: each connection past the bound closes the oldest one still in its handshake
//! (counted in `evicted_handshakes`), established peers keep delivering, and a new
//! peer is served even while an outsider keeps reopening its connections.
//!
//! The tests count this process's open descriptors (`/proc/self/fd`; skipped with a
//! note where it does not exist), so they run one at a time.

use ackwire::transport::tcp::{TcpConfig, TcpConfigError, TcpTransport};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// This process's open descriptors, or `None` without `/proc`.
fn fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

/// This process's soft descriptor limit, if `/proc` tells.
fn nofile_soft_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

/// Node `id` (bounded by `tcp`, `allow`ing the sender) acking everything on channel 1
/// and counting each delivery.
async fn receiver(id: u64, allow: &[u64], tcp: TcpConfig) -> (Node, Seen) {
    let mut builder = Node::builder(NodeId(id)).tcp(any_addr(), tcp);
    for p in allow {
        builder = builder.allow_peer(NodeId(*p));
    }
    let node = builder.build().await.unwrap();
    let seen: Seen = Arc::default();
    let mut inbox = node.receiver::<u64>(ChannelId(1), false).unwrap();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *s2.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    });
    (node, seen)
}

async fn sender(id: u64, to: u64, addr: SocketAddr) -> Node {
    Node::builder(NodeId(id))
        .bind(any_addr())
        .peer(NodeId(to), addr)
        .build()
        .await
        .unwrap()
}

/// Send `vals` effectively-once from `a` to `to`; the values not acked within 20 s.
async fn send_all(a: &Node, to: u64, vals: std::ops::Range<u64>) -> Vec<u64> {
    let out = a
        .sender::<u64>(
            NodeId(to),
            ChannelOptions::new(ChannelId(1), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut receipts = Vec::new();
    let mut bad = Vec::new();
    for v in vals {
        match tokio::time::timeout_at(deadline, out.send(&v)).await {
            Ok(Ok(r)) => receipts.push((v, r)),
            _ => bad.push(v),
        }
    }
    for (v, r) in receipts {
        if !matches!(
            tokio::time::timeout_at(deadline, r).await,
            Ok(Ok(Outcome::Acked))
        ) {
            bad.push(v);
        }
    }
    bad
}

async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    s.connect(to).await
}

/// Open `n` idle connections to `to`, `per_ip` from each of 127.0.0.2, 127.0.0.3, …
/// (below the per-address limit, so only the node-wide bound refuses them).
async fn flood(to: SocketAddr, n: usize, per_ip: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let src = Ipv4Addr::new(127, 0, 0, 2 + (i / per_ip) as u8);
        held.push(connect_from(src, to).await.expect("connect"));
    }
    held
}

/// Wait (up to 3 s, below the 5 s handshake timeout that would close them anyway)
/// until the node has dealt with all `n` connections of the flood: the node holds
/// `bound` of them (descriptors of the node's beyond `base` and our own `n`) and has
/// evicted the others. Returns the most descriptors the node held meanwhile and the
/// evictions counted.
async fn settle(node: &Node, base: usize, n: usize, bound: usize) -> (usize, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut most = 0;
    loop {
        let node_fds = fds().unwrap().saturating_sub(base + n);
        most = most.max(node_fds);
        let evicted = node.tcp_stats().unwrap().evicted_handshakes;
        if evicted as usize + bound >= n || tokio::time::Instant::now() >= deadline {
            return (most, evicted);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many of `held` the node still holds and how many it closed (each is read to
/// its end, all at once, for 1 s: the node's handshake frame, then end of stream for
/// a closed one).
async fn open_and_closed(held: &mut [TcpStream]) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let reads = held.iter_mut().map(|s| async move {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => continue,
                Ok(_) => return true, // closed
                Err(_) => return false,
            }
        }
    });
    let closed = futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    (held.len() - closed, closed)
}

/// Run the flood against a receiver bounded by `tcp` (its `max_handshaking` is the
/// bound checked) while an established honest pair delivers; then check that a new
/// honest peer is served once the flood's connections are gone.
async fn bounded_flood(tcp: TcpConfig, n: usize, per_ip: usize, base: u64) {
    let bound = tcp.max_handshaking;
    let slack = 16;
    let Some(fd_start) = fds() else {
        eprintln!("note: /proc/self/fd does not exist here; test skipped");
        return;
    };
    // Our side of the flood holds `n` descriptors itself, the node up to `bound` more.
    if let Some(limit) = nofile_soft_limit().filter(|l| *l < fd_start + n + bound + 256) {
        eprintln!(
            "note: the descriptor limit {limit} is too low for {n} connections; test skipped"
        );
        return;
    }
    let (b, seen) = receiver(base, &[base + 1, base + 2], tcp).await;
    let addr = b.local_addr().unwrap();
    let a = sender(base + 1, base, addr).await;
    assert_eq!(send_all(&a, base, 0..10).await, Vec::<u64>::new());
    let fd0 = fds().unwrap();

    let mut held = flood(addr, n, per_ip).await;
    assert_eq!(held.len(), n);
    // Our side holds one descriptor per connection; what is left is the node's.
    let (node_fds, evicted) = settle(&b, fd0, n, bound).await;
    let (open, closed) = open_and_closed(&mut held).await;
    // The established pair is served meanwhile.
    let bad = send_all(&a, base, 10..110).await;
    let ts = b.tcp_stats().unwrap();
    eprintln!(
        "{n} idle connections from {} addresses, max_handshaking {bound}: node-side \
         descriptors +{node_fds} (from {fd_start}); open {open}, closed {closed}; \
         evicted_handshakes {evicted}, rejected_ip_limit {}; honest not acked {}",
        n.div_ceil(per_ip),
        ts.rejected_ip_limit,
        bad.len()
    );
    assert!(
        node_fds <= bound + slack,
        "the node holds {node_fds} descriptors for {n} idle connections (bound {bound})"
    );
    assert_eq!(
        evicted,
        (n - bound) as u64,
        "every connection past the bound evicts one and is counted, and only those"
    );
    assert_eq!(
        ts.rejected_ip_limit, 0,
        "the per-address limit is not what refused"
    );
    assert_eq!(open, bound, "the bound's worth of connections is held");
    assert_eq!(closed, n - bound, "the others are closed");
    assert!(bad.is_empty(), "established peer starved: {bad:?}");

    // The flood goes away: its handshake slots free at once, and a new honest peer
    // (dialing now, so through the accept loop) is served.
    drop(held);
    let c = sender(base + 2, base, addr).await;
    assert_eq!(
        send_all(&c, base, 1000..1050).await,
        Vec::<u64>::new(),
        "a new peer was not served after the flood"
    );
    assert!(
        seen.lock().unwrap().values().all(|k| *k == 1),
        "a duplicate"
    );
    assert_eq!(seen.lock().unwrap().len(), 160);
    c.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Run `f` alone, on a runtime of its own that is gone (with every socket it held)
/// before the next test starts counting descriptors, even if `f` panicked.
fn alone(f: impl std::future::Future<Output = ()>) {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(f);
}

/// `max_handshaking` = 32: 200 idle connections from 8 addresses (25 each) cost the
/// node at most ~32 descriptors; the oldest 168 are evicted and counted.
#[test]
fn idle_connections_beyond_max_handshaking_evict_the_oldest_and_are_counted() {
    let tcp = TcpConfig {
        max_handshaking: 32,
        ..TcpConfig::default()
    };
    alone(bounded_flood(tcp, 200, 25, 7100));
}

/// Default settings (`max_handshaking` 256): 1 000 idle connections from 20 addresses
/// (50 each, below the per-address 64) cost the node at most ~256 descriptors.
#[test]
fn default_bound_keeps_a_thousand_idle_connections_to_256_descriptors() {
    let tcp = TcpConfig::default();
    assert_eq!(tcp.max_handshaking, 256);
    alone(bounded_flood(tcp, 1000, 50, 7200));
}

/// An outsider keeps 20 idle connections (5 from each of 127.0.0.2-5) against
/// `max_handshaking` = 16 and reopens each one 20 ms after the node closes it, so the
/// node is held at the bound throughout. A NEW honest peer dialing it is served within
/// a few seconds: its connection evicts the oldest idle one and completes its
/// handshake before 16 newer connections evict it in turn. (Regression: at the bound
/// the new connection was refused, so the outsider kept every new peer out for as long
/// as it kept reopening.)
#[test]
fn a_new_peer_is_served_while_an_outsider_keeps_the_handshake_slots_full() {
    alone(async {
        let base = 7300;
        let tcp = TcpConfig {
            max_handshaking: 16,
            ..TcpConfig::default()
        };
        let (b, seen) = receiver(base, &[base + 1], tcp).await;
        let addr = b.local_addr().unwrap();
        let attackers: Vec<_> = (0..20u8)
            .map(|i| {
                tokio::spawn(async move {
                    let src = Ipv4Addr::new(127, 0, 0, 2 + i / 5);
                    let mut buf = [0u8; 256];
                    loop {
                        if let Ok(mut s) = connect_from(src, addr).await {
                            // Send nothing; read until the node closes it.
                            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        // Let the outsider fill the node's handshake slots.
        let filled = tokio::time::Instant::now() + Duration::from_secs(3);
        while b.tcp_stats().unwrap().evicted_handshakes < 50 {
            assert!(
                tokio::time::Instant::now() < filled,
                "the flood never reached the bound"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = sender(base + 1, base, addr).await;
        let bad = tokio::time::timeout(Duration::from_secs(4), send_all(&c, base, 0..20))
            .await
            .unwrap_or_else(|_| (0..20).collect());
        let ts = b.tcp_stats().unwrap();
        eprintln!(
            "outsider reopening 20 idle connections, max_handshaking 16: evicted_handshakes \
             {}, honest not acked {}",
            ts.evicted_handshakes,
            bad.len()
        );
        for t in &attackers {
            t.abort();
        }
        assert!(bad.is_empty(), "the new peer was kept out: {bad:?}");
        assert_eq!(seen.lock().unwrap().len(), 20);
        c.shutdown().await;
        b.shutdown().await;
    });
}

/// The bound is a setting like the others: zero is refused, and it reads from TOML.
#[test]
fn max_handshaking_zero_is_a_config_error_and_the_field_reads_from_toml() {
    let zero = TcpConfig {
        max_handshaking: 0,
        ..TcpConfig::default()
    };
    assert_eq!(
        zero.validate(),
        Err(TcpConfigError::Zero("max_handshaking"))
    );
    assert!(TcpTransport::new(any_addr(), zero).is_err());
    let t: TcpConfig = toml::from_str("max_handshaking = 12").unwrap();
    assert_eq!(t.max_handshaking, 12);
    assert_eq!(t.max_connections_per_ip, 64);
}
