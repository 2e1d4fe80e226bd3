//! Review of the session's diff (a reviewer's tests, each failing before its fix):
//! recovery must restore every stream whatever the limits (a processed message was
//! `Fresh` again after a reopen with a lower `max_streams_per_node`), and a group's
//! `rerouted` counts re-sends made, not re-sends begun and cancelled.
#![cfg(not(ackwire_loom))]
use crate::support::ports;
use ackwire::group::{GroupConfig, GroupSender, Member, Membership, Spread};
use ackwire::{ChannelId, Delivery, Guarantee, IdKey, MessageId, Node, NodeConfig, NodeId};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
const CH: ChannelId = ChannelId(5);
const SENDER: NodeId = NodeId(1);
use ackwire::dedup::{Admit, Dedup, DedupConfig, DurableDedup};
use ackwire::Origin;

fn id(o: Origin, seq: u64) -> MessageId {
    MessageId::Seq {
        origin: o,
        channel: ChannelId(1),
        seq,
    }
}

/// A log holding more live streams of one node than the (new, lower) per-node limit
/// allows: recovery drops the extra streams' done seqs, and a processed message is
/// then Fresh again.
#[test]
fn recovery_over_the_per_node_limit_keeps_processed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |per_node| DedupConfig {
        durable: Some(DurableDedup::new(dir.path())),
        max_streams_per_node: per_node,
        ..DedupConfig::default()
    };
    let now = Instant::now();
    let origins: Vec<Origin> = (1..=3)
        .map(|inc| Origin {
            node: NodeId(7),
            incarnation: inc,
        })
        .collect();
    {
        let d = Dedup::open_at(cfg(100), now).unwrap();
        for &o in &origins {
            assert_eq!(d.begin(&id(o, 1), now).unwrap(), Admit::Fresh);
            d.complete(&id(o, 1), now).unwrap();
        }
        d.close().unwrap();
    }
    let d = Dedup::open_at(cfg(2), now).unwrap();
    eprintln!("stats after reopen: {:?}", d.stats());
    // A sender run that finished cleanly: its stream retires and makes room.
    for &o in &origins {
        if d.watermark_of(o, ChannelId(1)).is_some() {
            d.finish_stream(o, ChannelId(1), 1, now).unwrap();
            break;
        }
    }
    let answers: Vec<_> = origins.iter().map(|&o| d.begin(&id(o, 1), now)).collect();
    eprintln!("answers: {answers:?}");
    for a in answers {
        assert!(
            matches!(a, Ok(Admit::Duplicate)),
            "a processed message is not a duplicate: {a:?}"
        );
    }
}

fn lo() -> SocketAddr {
    ports::restartable_addr()
}

async fn within<F: Future>(secs: f64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs_f64(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// A replica that holds every delivery until `release` acks them.
struct Replica {
    id: NodeId,
    addr: SocketAddr,
    _node: Node,
    held: Arc<Mutex<Vec<Delivery<u64>>>>,
}

impl Replica {
    fn release(&self) {
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        for d in held {
            d.ack();
        }
    }
}

async fn holding_replica(id: NodeId) -> Replica {
    let node = Node::builder(id)
        .bind(lo())
        .allow_peer(SENDER)
        .build()
        .await
        .unwrap();
    let addr = node.local_addr().unwrap();
    let mut rx = node.receiver::<u64>(CH, false).unwrap();
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    let h = held.clone();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            h.lock().unwrap().push(d);
        }
    });
    Replica {
        id,
        addr,
        _node: node,
        held,
    }
}

fn config(spread: Spread) -> GroupConfig {
    let mut c = GroupConfig::new(CH);
    c.spread = spread;
    c
}

/// A membership the test changes at will, re-read every 100 ms.
#[derive(Clone)]
struct Live(Arc<Mutex<Vec<Member>>>);
impl Membership for Live {
    async fn members(&mut self) -> std::io::Result<Vec<Member>> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn refresh_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
}

/// A re-route whose send never happened (the earlier attempt was acked while the
/// new one waited for window room) is counted in `rerouted` although no re-send was
/// made: `rerouted` exceeds `attempts - messages`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_rerouted_counts_only_resends_made() {
    let a = holding_replica(NodeId(10)).await;
    let b = holding_replica(NodeId(11)).await;
    let mut cfg = NodeConfig::default();
    cfg.proto.max_in_flight = 4;
    let node = Arc::new(
        Node::builder(SENDER)
            .bind(lo())
            .peer(b.id, b.addr)
            .config(cfg)
            .build()
            .await
            .unwrap(),
    );
    let plain = node
        .sender::<u64>(
            b.id,
            ackwire::ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let mut plain_receipts = vec![];
    for v in 100..104u64 {
        plain_receipts.push(within(5.0, "fill B", plain.send(&v)).await.unwrap());
    }
    within(5.0, "B to hold 4", async {
        while b.held.lock().unwrap().len() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let live = Live(Arc::new(Mutex::new(vec![Member {
        id: a.id,
        addr: a.addr,
    }])));
    let g = GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), live.clone())
        .await
        .unwrap();
    let r = within(5.0, "send", g.send_with_key(&1, IdKey(1)))
        .await
        .unwrap();
    within(5.0, "A to hold it", async {
        while a.held.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    *live.0.lock().unwrap() = vec![Member {
        id: b.id,
        addr: b.addr,
    }];
    within(3.0, "membership change", async {
        while g.members().iter().map(|(m, _)| m.id).collect::<Vec<_>>() != vec![b.id] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.release();
    let o = within(5.0, "receipt", r).await.unwrap();
    let s = g.stats();
    eprintln!("outcome {o:?} stats {s:?}");
    assert_eq!(o.attempts, 1);
    assert!(
        s.rerouted <= s.attempts - s.messages,
        "rerouted counts a re-send that was never made: {s:?}"
    );
    b.release();
}
