//! Mutual TLS on the TCP transport, with certificates generated at test time (rcgen):
//! impostors are refused each with its own counted reason while a good peer keeps
//! delivering, a dialer refuses a server that is not the node it dialed, and payload
//! bytes never cross the wire in clear.

use crate::support;

use ackwire::transport::tcp::TcpConfig;
use ackwire::transport::tls::{node_dns_name, rustls, TlsConfig};
use ackwire::wire::{encode, probe, Frame, Handshake, VersionRange, MIN_PROTOCOL_VERSION};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Origin, Outcome};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::pki::{raw_client, Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);
const CH: ChannelId = ChannelId(1);
const WAIT: Duration = Duration::from_secs(10);

fn any_port() -> SocketAddr {
    support::ports::restartable_addr()
}

fn quick() -> TcpConfig {
    TcpConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        handshake_timeout: Duration::from_secs(2),
        ..TcpConfig::default()
    }
}

macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = Instant::now() + WAIT;
        while !$cond {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {}",
                $what
            );
            sleep(Duration::from_millis(10)).await;
        }
    }};
}

async fn tls_node(id: NodeId, tls: TlsConfig, peer: Option<(NodeId, SocketAddr)>) -> Node {
    let mut b = Node::builder(id).tcp(any_port(), quick()).tls(tls);
    if let Some((p, addr)) = peer {
        b = b.peer(p, addr);
    }
    b.build().await.unwrap()
}

type Seen = Arc<Mutex<HashMap<u32, u32>>>;

fn count_processed(mut inbox: ackwire::Receiver<u32>) -> Seen {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *s.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    });
    seen
}

/// Dial `addr` (expecting node B's certificate) with `client`, and if TLS completes,
/// claim `claim` in the ackwire handshake; then wait (bounded) for the server to close.
async fn impostor(addr: SocketAddr, client: Arc<rustls::ClientConfig>, claim: NodeId) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(node_dns_name(B)).unwrap();
    let Ok(Ok(mut tls)) = timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(client).connect(name, tcp),
    )
    .await
    else {
        return;
    };
    let mut out = BytesMut::new();
    encode(
        &Frame::Handshake(Handshake {
            version: MIN_PROTOCOL_VERSION,
            origin: Origin {
                node: claim,
                incarnation: 7,
            },
        }),
        &mut out,
    )
    .unwrap();
    // A current node's opening: the handshake, then the version probe.
    encode(&probe(VersionRange::default()), &mut out).unwrap();
    let _ = tls.write_all(&out).await;
    let _ = tls.flush().await;
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + WAIT;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostors_are_refused_each_with_its_own_reason_while_a_good_peer_delivers() {
    let ca = Ca::new("ackwire test ca");
    let rogue = Ca::new("rogue ca");
    let b = tls_node(B, ca.node(B), None).await;
    let b_addr = b.local_addr().unwrap();
    let seen = count_processed(b.receiver::<u32>(CH, false).unwrap());
    let a = tls_node(A, ca.node(A), Some((B, b_addr))).await;
    let out = a
        .sender::<u32>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    // The good peer sends throughout the attacks.
    let good = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for i in 0..300u32 {
            receipts.push(out.send(&i).await.unwrap());
            sleep(Duration::from_millis(3)).await;
        }
        for r in receipts {
            assert_eq!(timeout(WAIT, r).await.unwrap(), Ok(Outcome::Acked));
        }
    });
    let stats = || b.tcp_stats().unwrap();

    // 1. No certificate at all.
    impostor(b_addr, raw_client(&ca, None), A).await;
    eventually!("no-cert refusal", stats().rejected_tls_no_certificate == 1);
    // 2. A valid certificate, but for node C, while claiming to be A.
    impostor(b_addr, raw_client(&ca, Some(ca.issue(C))), A).await;
    eventually!("identity refusal", stats().rejected_identity_mismatch == 1);
    // 3. A certificate for A from a CA that B does not trust.
    impostor(b_addr, raw_client(&ca, Some(rogue.issue(A))), A).await;
    eventually!("untrusted refusal", stats().rejected_tls_untrusted == 1);
    // 4. A certificate for A from the right CA, expired.
    impostor(b_addr, raw_client(&ca, Some(ca.issue_expired(A))), A).await;
    eventually!("expired refusal", stats().rejected_tls_expired == 1);

    good.await.unwrap();
    let s = stats();
    // Each impostor counted once, under its own reason only.
    assert_eq!(
        (
            s.rejected_tls_no_certificate,
            s.rejected_identity_mismatch,
            s.rejected_tls_untrusted,
            s.rejected_tls_expired,
            s.rejected_tls_other,
        ),
        (1, 1, 1, 1, 0),
        "{s:?}"
    );
    // The good peer's one connection was never disturbed.
    assert_eq!(
        (s.connections_opened, s.connections_closed),
        (1, 0),
        "{s:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 300);
    assert!(seen.values().all(|n| *n == 1));
    a.shutdown().await;
    b.shutdown().await;
}

/// A TLS 1.3 session resumed from a ticket is accepted without checking the
/// certificate again (rustls copies the chain out of the ticket), so a node that
/// issued tickets let a certificate that expired since the last connection keep
/// connecting, for as long as the node ran. Here a client's certificate expires
/// between its first connection and its second (the same rustls client config,
/// holding whatever tickets the node gave it): the second is refused as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expired_since_the_last_connection_is_refused() {
    let ca = Ca::new("ackwire test ca");
    let b = tls_node(B, ca.node(B), None).await;
    let b_addr = b.local_addr().unwrap();
    let client = raw_client(&ca, Some(ca.issue_expiring(A, Duration::from_secs(2))));
    let name = || rustls::pki_types::ServerName::try_from(node_dns_name(B)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(client);
    // Valid now: the handshake completes; a read takes in any tickets sent after it.
    let tcp = TcpStream::connect(b_addr).await.unwrap();
    let mut tls = timeout(WAIT, connector.connect(name(), tcp))
        .await
        .unwrap()
        .expect("a valid certificate is accepted");
    let _ = timeout(Duration::from_millis(500), tls.read(&mut [0u8; 256])).await;
    drop(tls);
    assert_eq!(b.tcp_stats().unwrap().rejected_tls_expired, 0);
    // Past its not_after (webpki counts whole seconds).
    sleep(Duration::from_millis(3500)).await;
    let tcp = TcpStream::connect(b_addr).await.unwrap();
    if let Ok(Ok(mut tls)) = timeout(WAIT, connector.connect(name(), tcp)).await {
        // TLS 1.3: the server's verdict on the client's certificate comes after the
        // client's side of the handshake; a read sees it.
        let _ = timeout(Duration::from_secs(2), tls.read(&mut [0u8; 256])).await;
    }
    eventually!(
        "the expired certificate refused",
        b.tcp_stats().unwrap().rejected_tls_expired == 1
    );
    b.shutdown().await;
}

/// A dialer verifies the server too: dialing "B" at an address where node C (a valid
/// certificate from the same CA, for C) answers is refused, counted as an identity
/// mismatch; nothing is delivered to C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialer_refuses_a_server_that_is_not_the_dialed_node() {
    let ca = Ca::new("ackwire test ca");
    let c = tls_node(C, ca.node(C), None).await;
    let seen = count_processed(c.receiver::<u32>(CH, false).unwrap());
    let a = tls_node(A, ca.node(A), Some((B, c.local_addr().unwrap()))).await;
    let out = a
        .sender::<u32>(B, ChannelOptions::new(CH, Guarantee::AtMostOnce))
        .unwrap();
    drop(out.send(&1).await.unwrap());
    eventually!(
        "dialer refuses",
        a.tcp_stats().unwrap().rejected_identity_mismatch >= 1
    );
    assert_eq!(a.tcp_stats().unwrap().connections_opened, 0);
    assert!(seen.lock().unwrap().is_empty());
    a.shutdown().await;
    c.shutdown().await;
}

/// A node refuses to start with a certificate that does not name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_will_not_start_with_another_nodes_certificate() {
    let ca = Ca::new("ackwire test ca");
    let r = Node::builder(A)
        .bind(any_port())
        .tls(ca.node(B))
        .build()
        .await;
    assert!(r.is_err());
    assert!(ca.node(A).certifies(A) && !ca.node(A).certifies(B));
}

/// A pass-through proxy that records every byte from the sender's side.
async fn capturing_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let captured: Arc<Mutex<Vec<u8>>> = Arc::default();
    let cap = captured.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let (mut ri, mut wi) = inbound.into_split();
            let (mut ro, mut wo) = outbound.into_split();
            let cap = cap.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = ri.read(&mut buf).await {
                    if n == 0 || wo.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    cap.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut ro, &mut wi).await;
            });
        }
    });
    (addr, captured)
}

/// Send a recognizable payload through a capturing proxy; return whether it was seen.
async fn marker_visible_on_wire(ca: Option<&Ca>) -> bool {
    const MARKER: &str = "ackwire-secret-payload-4f7c1e";
    let mut b = Node::builder(B).tcp(any_port(), quick()).allow_peer(A);
    if let Some(ca) = ca {
        b = b.tls(ca.node(B));
    }
    let b = b.build().await.unwrap();
    let mut inbox = b.receiver::<String>(CH, false).unwrap();
    let (proxy, captured) = capturing_proxy(b.local_addr().unwrap()).await;
    let mut a = Node::builder(A).tcp(any_port(), quick()).peer(B, proxy);
    if let Some(ca) = ca {
        a = a.tls(ca.node(A));
    }
    let a = a.build().await.unwrap();
    let out = a
        .sender::<String>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let r = out.send(&MARKER.repeat(4)).await.unwrap();
    let d = timeout(WAIT, inbox.recv()).await.unwrap().unwrap();
    assert_eq!(d.message(), &MARKER.repeat(4));
    d.ack();
    assert_eq!(timeout(WAIT, r).await.unwrap(), Ok(Outcome::Acked));
    a.shutdown().await;
    b.shutdown().await;
    let wire = captured.lock().unwrap().clone();
    assert!(wire.len() > 100, "nothing captured");
    wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_bytes_are_not_visible_on_the_wire_with_tls() {
    // Control: the capture does see the payload over plain TCP.
    assert!(marker_visible_on_wire(None).await);
    let ca = Ca::new("ackwire test ca");
    assert!(!marker_visible_on_wire(Some(&ca)).await);
}
