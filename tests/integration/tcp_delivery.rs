//! Delivery guarantees over real TCP on loopback: bulk transfer, connections killed
//! mid-stream, and a receiver node restarted on the same address.

use crate::support;

use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome, Receiver};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::proxy::{Chaos, Proxy};

const CH: ChannelId = ChannelId(9);
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn any_addr() -> SocketAddr {
    support::ports::restartable_addr()
}

/// Count every message the handler processes, then ack it.
fn consume(mut inbox: Receiver<u64>, seen: Seen) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *seen.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    })
}

/// Receiver `id`; its sender in every test is `id + 1`, admitted explicitly (plain TCP
/// refuses peers a node was not configured with).
async fn receiver_node(id: u64, addr: SocketAddr) -> Node {
    Node::builder(NodeId(id))
        .bind(addr)
        .allow_peer(NodeId(id + 1))
        .build()
        .await
        .unwrap()
}

async fn sender_node(id: u64, peer: NodeId, peer_addr: SocketAddr) -> Node {
    Node::builder(NodeId(id))
        .bind(any_addr())
        .peer(peer, peer_addr)
        .build()
        .await
        .unwrap()
}

/// 100 000 messages per guarantee cross TCP loopback. Nothing is lost by at-least-once
/// or effectively-once; effectively-once processes each exactly once; at-most-once
/// never delivers twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_per_guarantee() {
    const N: u64 = 100_000;
    for (i, g) in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let b = receiver_node(10 + i as u64 * 2, any_addr()).await;
        let bid = b.id();
        let a = sender_node(11 + i as u64 * 2, bid, b.local_addr().unwrap()).await;
        let seen: Seen = Arc::default();
        let consumer = consume(b.receiver(CH, false).unwrap(), seen.clone());
        let out = a.sender::<u64>(bid, ChannelOptions::new(CH, g)).unwrap();
        let mut receipts = Vec::with_capacity(N as usize);
        for v in 0..N {
            receipts.push(out.send(&v).await.unwrap());
        }
        for r in receipts {
            let outcome = r.await.unwrap_or_else(|e| panic!("{g:?}: {e}"));
            let want = if g == Guarantee::AtMostOnce {
                Outcome::Sent
            } else {
                Outcome::Acked
            };
            assert_eq!(outcome, want);
        }
        if g == Guarantee::AtMostOnce {
            // Transmitted is not delivered: give the last frames time to arrive.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let stats = a.stats().await.unwrap();
        let acks = b.stats().await.unwrap().proto.acks_sent;
        eprintln!("{g:?}: {acks} ack frames for {N} messages");
        if g != Guarantee::AtMostOnce {
            // Acks are cumulative + ranges, flushed once per burst of work: a bulk
            // stream costs far fewer ack frames than messages.
            assert!(
                acks > 0 && acks * 4 < N,
                "{g:?}: {acks} ack frames for {N} messages"
            );
        }
        b.shutdown().await;
        consumer.await.unwrap();
        let seen = seen.lock().unwrap();
        assert!(seen.values().all(|n| *n == 1) || g == Guarantee::AtLeastOnce);
        match g {
            Guarantee::AtMostOnce => assert!(seen.len() as u64 <= N),
            _ => assert_eq!(seen.len() as u64, N, "{g:?} lost messages"),
        }
        assert!(
            stats.proto.acked >= N,
            "{g:?}: acked {} of {N}",
            stats.proto.acked
        );
        support::reliability::report(
            &format!("{g:?}"),
            "TCP loopback bulk transfer",
            "1 run x 100 000 msgs",
            match g {
                Guarantee::AtMostOnce => "no duplicate",
                Guarantee::AtLeastOnce => "nothing lost",
                _ => "nothing lost, no duplicate",
            },
        );
    }
}

/// The connection is killed repeatedly mid-stream; at-least-once and effectively-once
/// lose nothing, and effectively-once still processes each message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_lose_nothing() {
    const N: u64 = 20_000;
    for (i, g) in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce]
        .into_iter()
        .enumerate()
    {
        let b = receiver_node(30 + i as u64 * 2, any_addr()).await;
        let bid = b.id();
        let proxy = Proxy::start(b.local_addr().unwrap(), Chaos::none()).await;
        let a = sender_node(31 + i as u64 * 2, bid, proxy.addr).await;
        let seen: Seen = Arc::default();
        let consumer = consume(b.receiver(CH, false).unwrap(), seen.clone());
        let out = a.sender::<u64>(bid, ChannelOptions::new(CH, g)).unwrap();
        let mut receipts = Vec::new();
        for v in 0..N {
            receipts.push(out.send(&v).await.unwrap());
            if v % 2_000 == 1_000 {
                proxy.kill_all();
            }
        }
        for r in receipts {
            assert_eq!(r.await, Ok(Outcome::Acked), "{g:?}");
        }
        assert!(proxy.stats.kills.load(std::sync::atomic::Ordering::Relaxed) >= 10);
        b.shutdown().await;
        consumer.await.unwrap();
        let seen = seen.lock().unwrap();
        for v in 0..N {
            let n = seen.get(&v).copied().unwrap_or(0);
            assert!(n >= 1, "{g:?}: message {v} lost");
            if g == Guarantee::EffectivelyOnce {
                assert_eq!(n, 1, "message {v} processed {n} times");
            }
        }
        support::reliability::report(
            &format!("{g:?}"),
            "TCP connection killed every 2 000 messages (proxy)",
            "1 run x 20 000 msgs, 10 kills",
            if g == Guarantee::EffectivelyOnce {
                "nothing lost; each processed exactly once"
            } else {
                "nothing lost"
            },
        );
    }
}

/// The receiver node is dropped and started again on the same address mid-stream:
/// at-least-once loses nothing (every message is processed by one run or the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_restart_on_same_address_loses_nothing() {
    const N: u64 = 10_000;
    let b1 = receiver_node(50, any_addr()).await;
    let addr = b1.local_addr().unwrap();
    let a = sender_node(51, NodeId(50), addr).await;
    let seen: Seen = Arc::default();
    let c1 = consume(b1.receiver(CH, false).unwrap(), seen.clone());
    let out = a
        .sender::<u64>(NodeId(50), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for v in 0..N / 2 {
        receipts.push(out.send(&v).await.unwrap());
    }
    // Stop the receiver while messages are in flight, then start it again.
    drop(b1);
    c1.await.unwrap();
    let b2 = receiver_node(50, addr).await;
    let c2 = consume(b2.receiver(CH, false).unwrap(), seen.clone());
    for v in N / 2..N {
        receipts.push(out.send(&v).await.unwrap());
    }
    for (v, r) in receipts.into_iter().enumerate() {
        assert_eq!(r.await, Ok(Outcome::Acked), "message {v}");
    }
    b2.shutdown().await;
    c2.await.unwrap();
    let seen = seen.lock().unwrap();
    for v in 0..N {
        assert!(seen.contains_key(&v), "message {v} lost across the restart");
    }
    support::reliability::report(
        "AtLeastOnce",
        "receiver node dropped and restarted on the same address mid-stream",
        "1 run x 10 000 msgs",
        "nothing lost",
    );
}
