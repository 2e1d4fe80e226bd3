//! Rolling upgrades: a node limited to the oldest protocol version this build speaks
//! (version 1, byte for byte what the 0.1 release sends; see `tests/integration/compat.rs`) and a
//! node speaking the newest exchange messages under every guarantee over real TCP, in
//! both directions, with the receiver restarted mid-stream; and nodes that share no
//! version refuse each other with a counted reason.
#![cfg(not(ackwire_loom))]

use crate::support;

use ackwire::dedup::{DedupConfig, DurableDedup};
use ackwire::transport::tcp::{TcpConfig, TcpTransport};
use ackwire::transport::{LinkEvent, Transport};
use ackwire::wire::{VersionRange, PROTOCOL_VERSION};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Origin, Outcome, Receiver,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(3);
const OLD: VersionRange = VersionRange { min: 1, max: 1 };
type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn tcp(versions: VersionRange) -> TcpConfig {
    TcpConfig {
        versions,
        ..TcpConfig::default()
    }
}

async fn node(
    id: u64,
    addr: SocketAddr,
    versions: VersionRange,
    peer: Option<(u64, SocketAddr)>,
    dedup_dir: Option<&Path>,
) -> Node {
    let mut config = NodeConfig::default();
    if let Some(dir) = dedup_dir {
        config.dedup = DedupConfig {
            durable: Some(DurableDedup::new(dir)),
            ..config.dedup
        };
    }
    // The senders of this file (nodes 1 and 5) are known to every receiver.
    let mut b = Node::builder(NodeId(id))
        .tcp(addr, tcp(versions))
        .config(config)
        .allow_peer(NodeId(1))
        .allow_peer(NodeId(5));
    if let Some((p, a)) = peer {
        b = b.peer(NodeId(p), a);
    }
    b.build().await.unwrap()
}

fn consume(mut inbox: Receiver<u64>, seen: Seen) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            *seen.lock().unwrap().entry(*d.message()).or_default() += 1;
            d.ack();
        }
    })
}

/// `sender_versions` sends 2 000 messages to `receiver_versions`; the receiver is
/// restarted (same address, same durable dedup directory) after the first half.
async fn mixed_pair(g: Guarantee, sender_versions: VersionRange, receiver_versions: VersionRange) {
    const N: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let dedup_dir = (g == Guarantee::EffectivelyOnce).then(|| dir.path());
    let rx_id = 2;
    let b = node(
        rx_id,
        support::ports::restartable_addr(),
        receiver_versions,
        None,
        dedup_dir,
    )
    .await;
    let addr = b.local_addr().unwrap();
    let a = node(
        1,
        support::ports::restartable_addr(),
        sender_versions,
        Some((rx_id, addr)),
        None,
    )
    .await;
    let seen: Seen = Arc::default();
    let consumer = consume(b.receiver(CH, false).unwrap(), seen.clone());
    let out = a
        .sender::<u64>(NodeId(rx_id), ChannelOptions::new(CH, g))
        .unwrap();
    let want_version = sender_versions
        .negotiate(receiver_versions)
        .expect("the ranges overlap");

    let mut receipts = Vec::new();
    for v in 0..N / 2 {
        receipts.push(out.send(&v).await.unwrap());
    }
    for r in receipts.drain(..) {
        r.await.unwrap();
    }
    assert_eq!(a.protocol_version(NodeId(rx_id)), Some(want_version));
    // At-most-once receipts resolve on transmission: the receiver may not have seen
    // the connection yet.
    assert_eq!(
        eventually(|| b.protocol_version(NodeId(1))).await,
        Some(want_version)
    );

    // Restart the receiver in the middle of the stream.
    b.shutdown().await;
    consumer.await.unwrap();
    drop(b);
    let b = node(rx_id, addr, receiver_versions, None, dedup_dir).await;
    let consumer = consume(b.receiver(CH, false).unwrap(), seen.clone());
    for v in N / 2..N {
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
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        eventually(|| b.protocol_version(NodeId(1))).await,
        Some(want_version)
    );
    b.shutdown().await;
    consumer.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    match g {
        Guarantee::AtMostOnce => assert!(seen.values().all(|n| *n == 1), "duplicate"),
        Guarantee::AtLeastOnce => {
            assert_eq!(seen.len() as u64, N, "{g:?}: lost messages")
        }
        Guarantee::EffectivelyOnce => {
            assert_eq!(seen.len() as u64, N, "{g:?}: lost messages");
            assert!(seen.values().all(|n| *n == 1), "{g:?}: processed twice");
        }
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_nodes_deliver_to_each_other_under_every_guarantee() {
    let new = VersionRange::default();
    for g in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ] {
        mixed_pair(g, OLD, new).await;
        mixed_pair(g, new, OLD).await;
        support::reliability::report(
            &format!("{g:?}"),
            "v1 node <-> current node, receiver restarted",
            "2 directions x 2 000 msgs",
            match g {
                Guarantee::AtMostOnce => "no duplicate",
                Guarantee::AtLeastOnce => "nothing lost",
                _ => "nothing lost, no duplicate",
            },
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_current_nodes_speak_the_newest_version() {
    let new = VersionRange::default();
    mixed_pair(Guarantee::EffectivelyOnce, new, new).await;
    let b = node(6, support::ports::restartable_addr(), new, None, None).await;
    let a = node(
        5,
        support::ports::restartable_addr(),
        new,
        Some((6, b.local_addr().unwrap())),
        None,
    )
    .await;
    let out = a
        .sender::<u64>(NodeId(6), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let r = out.send(&1).await.unwrap();
    inbox.recv().await.unwrap().ack();
    r.await.unwrap();
    assert_eq!(a.protocol_version(NodeId(6)), Some(PROTOCOL_VERSION));
}

/// A protocol-3 node (1..=3, the build before the settled floor) and this build
/// deliver effectively-once to each other both ways, across a receiver restart, over
/// version 3: this build sends no `Settled` frame to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_node_and_this_build_deliver_to_each_other() {
    const V3: VersionRange = VersionRange { min: 1, max: 3 };
    let new = VersionRange::default();
    mixed_pair(Guarantee::EffectivelyOnce, V3, new).await;
    mixed_pair(Guarantee::EffectivelyOnce, new, V3).await;
}

/// A protocol-2 sender (a node limited to 1..=2, what the flow-control release
/// speaks) gets none of version 3's frames: a message the current receiver
/// dead-letters is acked (the old sender cannot be told), a typed sender's type is not
/// checked (version 2 data frames carry none), and a channel without receiver is never
/// rejected (the message retries until its deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_sender_gets_the_old_behaviour_from_a_version_3_receiver() {
    use ackwire::{ReceiverOptions, SendError};
    const V2: VersionRange = VersionRange { min: 1, max: 2 };
    let b = node(
        6,
        support::ports::restartable_addr(),
        VersionRange::default(),
        None,
        None,
    )
    .await;
    let a = node(
        5,
        support::ports::restartable_addr(),
        V2,
        Some((6, b.local_addr().unwrap())),
        None,
    )
    .await;
    let mut inbox = b
        .receiver_with::<u64>(CH, ReceiverOptions::unordered().max_deliveries(Some(2)))
        .unwrap();
    let out = a
        .sender::<u64>(NodeId(6), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let poison = out.send(&13).await.unwrap();
    for _ in 0..2 {
        inbox.recv().await.unwrap().nack();
    }
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), poison)
            .await
            .unwrap(),
        Ok(Outcome::Acked),
        "a v2 sender's dead-lettered message is acked"
    );
    assert_eq!(a.protocol_version(NodeId(6)), Some(2));
    let letter = b
        .dead_letters()
        .try_recv()
        .expect("dead-lettered on the receiver");
    assert_eq!(letter.deliveries, 2);
    // No type on a version-2 data frame: a u32 reaches the u64 receiver's decoder.
    let other = a
        .sender::<u32>(NodeId(6), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let r = other.send(&7).await.unwrap();
    let d = inbox.recv().await.unwrap();
    assert_eq!(*d.message(), 7);
    d.ack();
    assert_eq!(r.await, Ok(Outcome::Acked));
    // No receiver: no reject, the deadline ends it.
    let nowhere = a
        .sender::<u64>(
            NodeId(6),
            ChannelOptions {
                deadline: Some(Duration::from_secs(7)),
                ..ChannelOptions::new(ChannelId(9), Guarantee::AtLeastOnce)
            },
        )
        .unwrap();
    let r = nowhere.send(&1).await.unwrap();
    assert!(matches!(r.await, Err(SendError::Deadline { .. })));
    assert_eq!(b.stats().await.unwrap().proto.rejects_sent, 0);
    a.shutdown().await;
    b.shutdown().await;
    support::reliability::report(
        "upgrade",
        "protocol-2 sender -> current receiver: dead letter, other type, no receiver",
        "1",
        "no v3 frame is sent: dead letter acked, type unchecked, no-receiver retried to the deadline",
    );
}

/// A node that stopped speaking version 1 and a node that speaks only version 1 never
/// connect: each side closes with a counted version rejection, and no `Up` is seen.
#[tokio::test]
async fn nodes_without_a_common_version_refuse_each_other_with_a_counted_reason() {
    let old = TcpTransport::new(support::ports::restartable_addr(), tcp(OLD))
        .unwrap()
        .allow_peer(NodeId(2));
    let old_stats = old.stats();
    let mut old_link = Box::new(old).start(origin(1)).unwrap();
    let new_only = VersionRange {
        min: 2,
        max: PROTOCOL_VERSION,
    };
    let new = TcpTransport::new(support::ports::restartable_addr(), tcp(new_only))
        .unwrap()
        .with_peer(NodeId(1), old_link.local_addr.unwrap());
    let new_stats = new.stats();
    let mut new_link = Box::new(new).start(origin(2)).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        tokio::select! {
            ev = old_link.events.recv() => {
                assert!(!matches!(ev, Some(LinkEvent::Up { .. })), "old node saw {ev:?}")
            }
            ev = new_link.events.recv() => {
                assert!(!matches!(ev, Some(LinkEvent::Up { .. })), "new node saw {ev:?}")
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    assert!(new_stats.snapshot().rejected_unsupported_version >= 1);
    assert!(old_stats.snapshot().rejected_unsupported_version >= 1);
    support::reliability::report(
        "versions",
        "peer without a common protocol version",
        "1 run",
        "refused and counted on both sides",
    );
}

/// `f()` once it is `Some`, or `None` after 5 s.
async fn eventually<T>(f: impl Fn() -> Option<T>) -> Option<T> {
    for _ in 0..500 {
        if let Some(v) = f() {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn origin(n: u64) -> Origin {
    Origin {
        node: NodeId(n),
        incarnation: 1000 + n,
    }
}
