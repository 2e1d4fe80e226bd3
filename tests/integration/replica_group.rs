//! Replica groups ([`ackwire::group`]) over the in-memory network (paused time), plus
//! one real DNS lookup of `localhost` over TCP.
//!
//! The replicas of a group share one dedup record, as replicas sharing an inbox
//! database do: here an in-process map `MessageId -> effects applied`. A replica's
//! handler applies the effect only if the id is not in the map yet, then acks; so a
//! message re-routed to another replica after its effect was applied is recognised
//! there and only acked.

use crate::support::ports;
use ackwire::detector::Health;
use ackwire::group::{
    DnsMembers, GroupConfig, GroupSendError, GroupSender, Member, Membership, RawGroupSender,
    Spread, StaticMembers,
};
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{ChannelId, Delivery, IdKey, MessageId, Node, NodeId};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(9);

/// A `reliability:` line for RELIABILITY.md (`scripts/reliability.sh`), printed once
/// the checks before it passed.
fn reliability(fault: &str, runs: &str, held: &str) {
    println!("reliability: replica group | {fault} | {runs} | {held}");
}
const SENDER: NodeId = NodeId(1);

/// The shared dedup record (claims by message id) and the effects applied, per
/// payload value: a message processed twice under two different ids would show as an
/// effect applied twice.
#[derive(Default)]
struct Shared {
    claims: HashSet<MessageId>,
    effects: HashMap<u64, u32>,
}
type SharedInbox = Arc<Mutex<Shared>>;

/// Each of `0..n` applied exactly once.
fn assert_each_applied_once(inbox: &SharedInbox, n: u64) {
    let i = inbox.lock().unwrap();
    let wrong: Vec<_> = (0..n)
        .filter(|v| i.effects.get(v) != Some(&1))
        .map(|v| (v, i.effects.get(&v).copied().unwrap_or(0)))
        .collect();
    assert!(
        wrong.is_empty(),
        "effects not applied exactly once: {wrong:?}"
    );
    assert_eq!(i.effects.len() as u64, n);
}

/// One replica: its node, the ids it was handed (in order), and whether its handler
/// acks (a replica that does not ack has "committed and then hung").
struct Replica {
    id: NodeId,
    node: Node,
    seen: Arc<Mutex<Vec<MessageId>>>,
    acks: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<Delivery<u64>>>>,
}

async fn replica(net: &MemNetwork, id: NodeId, inbox: SharedInbox) -> Replica {
    let node = Node::builder(id)
        .transport(net.transport(id))
        .seed(id.0)
        .build()
        .await
        .unwrap();
    let mut rx = node.receiver::<u64>(CH, false).unwrap();
    let seen: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let acks = Arc::new(AtomicBool::new(true));
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    {
        let (seen, acks, held) = (seen.clone(), acks.clone(), held.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                seen.lock().unwrap().push(d.id());
                // Claim and apply in one step (the inbox transaction): the effect
                // (counted per payload) is applied only by a fresh claim.
                {
                    let mut i = inbox.lock().unwrap();
                    if i.claims.insert(d.id()) {
                        *i.effects.entry(*d.message()).or_default() += 1;
                    }
                }
                if acks.load(Ordering::SeqCst) {
                    d.ack();
                } else {
                    held.lock().unwrap().push(d);
                }
            }
        });
    }
    Replica {
        id,
        node,
        seen,
        acks,
        held,
    }
}

async fn sender(net: &MemNetwork) -> Arc<Node> {
    Arc::new(
        Node::builder(SENDER)
            .transport(net.transport(SENDER))
            .seed(1)
            .build()
            .await
            .unwrap(),
    )
}

/// The mem transport dials by id; the address is not used.
fn addr(id: NodeId) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + id.0 as u16))
}

fn members(ids: &[NodeId]) -> StaticMembers {
    StaticMembers::new(ids.iter().map(|id| (*id, addr(*id)))).unwrap()
}

fn config(spread: Spread) -> GroupConfig {
    let mut c = GroupConfig::new(CH);
    c.spread = spread;
    c.member_wait = Duration::from_secs(5);
    c
}

async fn wait_health(node: &Node, peer: NodeId, want: Health) {
    for _ in 0..600 {
        if node.health(peer) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{peer} never became {want:?} (is {:?})", node.health(peer));
}

/// Who acked each message, by key.
async fn send_all(
    group: &GroupSender<u64>,
    keys: impl IntoIterator<Item = u128>,
) -> BTreeMap<u128, NodeId> {
    let mut receipts = Vec::new();
    for k in keys {
        receipts.push((k, group.send_with_key(&(k as u64), IdKey(k)).await.unwrap()));
    }
    let mut by = BTreeMap::new();
    for (k, r) in receipts {
        let out = r.await.unwrap();
        assert_eq!(out.key, IdKey(k));
        by.insert(k, out.member);
    }
    by
}

fn per_member(by: &BTreeMap<u128, NodeId>) -> BTreeMap<NodeId, usize> {
    let mut m = BTreeMap::new();
    for id in by.values() {
        *m.entry(*id).or_default() += 1;
    }
    m
}

#[tokio::test(start_paused = true)]
async fn affinity_is_stable_per_key_and_uses_every_member() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let ids = [NodeId(2), NodeId(3), NodeId(4)];
    let mut replicas = Vec::new();
    for id in ids {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let a = sender(&net).await;
    let group = GroupSender::<u64>::new(a.clone(), config(Spread::Affinity), members(&ids))
        .await
        .unwrap();
    let first = send_all(&group, 0..300).await;
    let counts = per_member(&first);
    println!("affinity: 300 keys over 3 members: {counts:?}");
    assert_eq!(counts.len(), 3, "every member gets keys: {counts:?}");
    assert!(counts.values().all(|n| *n >= 50), "{counts:?}");
    // The same keys again go to the same members (and are only acked: duplicates).
    let again = send_all(&group, 0..300).await;
    assert_eq!(first, again, "a key's member is stable");
    // And a second sender (another process) agrees: the weights are a fixed function.
    let other = GroupSender::<u64>::new(a, config(Spread::Affinity), members(&ids))
        .await
        .unwrap();
    assert_eq!(first, send_all(&other, 0..300).await);
    // Each message processed once in all.
    assert_each_applied_once(&inbox, 300);
    let delivered: usize = replicas.iter().map(|r| r.seen.lock().unwrap().len()).sum();
    assert_eq!(delivered, 300, "repeats of a key are deduped by its member");
    assert_eq!(group.stats().rerouted, 0);
}

#[tokio::test(start_paused = true)]
async fn round_robin_spreads_evenly() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let ids = [NodeId(2), NodeId(3), NodeId(4)];
    let mut replicas = Vec::new();
    for id in ids {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let a = sender(&net).await;
    let group = GroupSender::<u64>::new(a, config(Spread::RoundRobin), members(&ids))
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for n in 0..300u64 {
        receipts.push(group.send(&n).await.unwrap());
    }
    let mut keys = std::collections::HashSet::new();
    let mut by = BTreeMap::new();
    for r in receipts {
        let key = r.key();
        let out = r.await.unwrap();
        assert!(keys.insert(key), "fresh keys are distinct");
        *by.entry(out.member).or_insert(0) += 1;
    }
    println!("round-robin: 300 messages over 3 members: {by:?}");
    assert_eq!(
        by.values().copied().collect::<Vec<_>>(),
        vec![100, 100, 100]
    );
    for r in &replicas {
        assert_eq!(r.seen.lock().unwrap().len(), 100, "{}", r.id);
    }
}

/// A replica applies its messages' effects, stops acking ("hangs after the commit"),
/// and is then killed: its unacked messages go to the other replicas under the same
/// `MessageId`, which find them applied and only ack them. Every message's effect is
/// applied exactly once and every receipt is `Ok`.
#[tokio::test(start_paused = true)]
async fn a_killed_replicas_unacked_messages_are_rerouted_under_the_same_id() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let ids = [NodeId(2), NodeId(3), NodeId(4)];
    let mut replicas = Vec::new();
    for id in ids {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let a = sender(&net).await;
    let group = GroupSender::<u64>::new(a.clone(), config(Spread::RoundRobin), members(&ids))
        .await
        .unwrap();
    // First 60 messages: all acked.
    let mut settled = send_all(&group, 0..60).await;
    // Replica 2 hangs after applying: 60 more messages, a third of them held there.
    replicas[0].acks.store(false, Ordering::SeqCst);
    let mut receipts = Vec::new();
    for k in 60..120u128 {
        receipts.push((k, group.send_with_key(&(k as u64), IdKey(k)).await.unwrap()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held: Vec<MessageId> = replicas[0]
        .held
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.id())
        .collect();
    assert_eq!(held.len(), 20, "replica 2 holds its share unacked");
    // Kill it (its node is dropped with the unacked deliveries; the network drops
    // anything still addressed to it).
    let dead = replicas.remove(0);
    net.isolate(dead.id);
    drop(dead.node);
    drop(dead.held);
    // Meanwhile more traffic; the group notices the Down member and re-routes.
    for k in 120..180u128 {
        receipts.push((k, group.send_with_key(&(k as u64), IdKey(k)).await.unwrap()));
    }
    for (k, r) in receipts {
        let out = r.await.unwrap_or_else(|e| panic!("message {k}: {e}"));
        settled.insert(k, out.member);
    }
    assert_eq!(a.health(NodeId(2)), Some(Health::Down));
    let stats = group.stats();
    println!("kill: 180 messages, 20 held by the killed replica; {stats:?}");
    assert_eq!(settled.len(), 180);
    // Every held message came back at a live replica, under the same MessageId.
    let survivors: Vec<MessageId> = replicas
        .iter()
        .flat_map(|r| r.seen.lock().unwrap().clone())
        .collect();
    for id in &held {
        assert!(
            survivors.contains(id),
            "{id} held by the dead replica was never re-sent under the same id"
        );
        let MessageId::Key(k) = id else {
            panic!("group messages carry keys: {id}")
        };
        assert_ne!(settled[&k.0], NodeId(2));
    }
    assert!(stats.rerouted >= 20, "{stats:?}");
    assert_eq!(stats.acked, 180);
    // Exactly once in effect: each message's effect applied once.
    assert_each_applied_once(&inbox, 180);
    reliability(
        "a replica applies 20 messages, never acks them and is killed (mem network)",
        "180 messages, 3 replicas",
        &format!(
            "each held message re-sent to a live replica under the same MessageId ({} re-routes); every receipt Ok; each effect applied once through the shared dedup record",
            stats.rerouted
        ),
    );
}

/// A membership whose answer the test changes.
#[derive(Clone)]
struct FakeMembers(Arc<Mutex<Vec<Member>>>);

impl Membership for FakeMembers {
    async fn members(&mut self) -> std::io::Result<Vec<Member>> {
        let m = self.0.lock().unwrap().clone();
        if m.is_empty() {
            return Err(std::io::Error::other("no answer"));
        }
        Ok(m)
    }
    fn refresh_every(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
}

fn member(id: NodeId) -> Member {
    Member { id, addr: addr(id) }
}

#[tokio::test(start_paused = true)]
async fn members_that_come_and_go_get_traffic_and_stop_getting_it() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let mut replicas = Vec::new();
    for id in [NodeId(2), NodeId(3), NodeId(4)] {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let a = sender(&net).await;
    let list = Arc::new(Mutex::new(vec![member(NodeId(2)), member(NodeId(3))]));
    let group = GroupSender::<u64>::new(a, config(Spread::RoundRobin), FakeMembers(list.clone()))
        .await
        .unwrap();
    let before = per_member(&send_all(&group, 0..40).await);
    assert_eq!(
        before.keys().copied().collect::<Vec<_>>(),
        [NodeId(2), NodeId(3)]
    );
    // Replica 4 appears.
    list.lock().unwrap().push(member(NodeId(4)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_4 = per_member(&send_all(&group, 40..100).await);
    println!("member added: {with_4:?}");
    assert_eq!(with_4.get(&NodeId(4)), Some(&20), "{with_4:?}");
    // Replica 3 leaves; a failed resolution (empty answer) keeps the last members.
    list.lock().unwrap().retain(|m| m.id != NodeId(3));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let without_3 = per_member(&send_all(&group, 100..140).await);
    println!("member removed: {without_3:?}");
    assert_eq!(
        without_3.keys().copied().collect::<Vec<_>>(),
        [NodeId(2), NodeId(4)]
    );
    list.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_outage = per_member(&send_all(&group, 140..160).await);
    assert_eq!(
        after_outage.keys().copied().collect::<Vec<_>>(),
        [NodeId(2), NodeId(4)]
    );
    let stats = group.stats();
    println!("come and go: {stats:?}");
    assert_eq!(stats.members_added, 3);
    assert_eq!(stats.members_removed, 1);
    assert!(stats.resolve_errors >= 1);
    let members: Vec<NodeId> = group.members().iter().map(|(m, _)| m.id).collect();
    assert_eq!(members, [NodeId(2), NodeId(4)]);
    assert_each_applied_once(&inbox, 160);
}

#[tokio::test(start_paused = true)]
async fn every_member_down_is_a_typed_error_not_a_drop() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let ids = [NodeId(2), NodeId(3)];
    let mut replicas = Vec::new();
    for id in ids {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let a = sender(&net).await;
    let mut cfg = config(Spread::Affinity);
    cfg.member_wait = Duration::from_secs(3);
    let group = GroupSender::<u64>::new(a.clone(), cfg, members(&ids))
        .await
        .unwrap();
    send_all(&group, 0..10).await;
    // Both hang, then both are cut off: the in-flight messages have nowhere to go.
    for r in &replicas {
        r.acks.store(false, Ordering::SeqCst);
    }
    let mut receipts = Vec::new();
    for k in 10..20u128 {
        receipts.push(group.send_with_key(&(k as u64), IdKey(k)).await.unwrap());
    }
    for id in ids {
        net.isolate(id);
    }
    for r in receipts {
        let key = r.key();
        match r.await {
            Err(GroupSendError::NoLiveMember { key: k, attempts }) => {
                assert_eq!(k, key);
                assert!(attempts >= 1);
            }
            other => panic!("expected NoLiveMember, got {other:?}"),
        }
    }
    for id in ids {
        wait_health(&a, id, Health::Down).await;
    }
    // A new send waits member_wait for a live member, then fails, typed.
    let e = group.send_with_key(&99, IdKey(99)).await.unwrap_err();
    assert_eq!(
        e,
        GroupSendError::NoLiveMember {
            key: IdKey(99),
            attempts: 0
        }
    );
    assert_eq!(e.key(), IdKey(99));
    let stats = group.stats();
    println!("all down: {stats:?}");
    assert_eq!(stats.no_live_member, 11);
    // A member coming back within member_wait takes a waiting send.
    let waiting = {
        let group = group.clone();
        tokio::spawn(async move { group.send_with_key(&100, IdKey(100)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    replicas[1].acks.store(true, Ordering::SeqCst);
    net.rejoin(NodeId(3));
    let out = waiting.await.unwrap().unwrap().await.unwrap();
    assert_eq!(out.member, NodeId(3));
    reliability(
        "every member Down with messages in flight, and a send while they are",
        "11 messages, 2 replicas",
        "each fails with GroupSendError::NoLiveMember (with its key) after member_wait, none dropped silently; a member back within member_wait takes a waiting send",
    );
}

#[tokio::test(start_paused = true)]
async fn bad_configs_are_refused_with_typed_errors() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let a = sender(&net).await;
    let mut cfg = GroupConfig::new(CH);
    cfg.max_attempts = 0;
    let e = GroupSender::<u64>::new(a.clone(), cfg, members(&[NodeId(2)]))
        .await
        .unwrap_err();
    assert!(matches!(e, ackwire::group::GroupError::Config(_)), "{e}");
    cfg = GroupConfig::new(CH);
    cfg.channel.guarantee = ackwire::Guarantee::AtMostOnce;
    let e = GroupSender::<u64>::new(a.clone(), cfg, members(&[NodeId(2)]))
        .await
        .unwrap_err();
    assert!(matches!(e, ackwire::group::GroupError::AtMostOnce), "{e}");
    // A first resolution that fails is an error at build time.
    let e = GroupSender::<u64>::new(
        a,
        GroupConfig::new(CH),
        FakeMembers(Arc::new(Mutex::new(Vec::new()))),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ackwire::group::GroupError::Resolve(_)), "{e}");
    assert!(DnsMembers::new([(NodeId(2), "no-port")]).is_err());
}

/// The DNS membership with a real lookup: `localhost:<port>` resolves to the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_members_find_a_replica_by_name() {
    let b = Node::builder(NodeId(2))
        .bind(ports::restartable_addr())
        .allow_peer(SENDER)
        .build()
        .await
        .unwrap();
    let port = b.local_addr().unwrap().port();
    let mut rx = b.receiver::<u64>(CH, false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            d.ack();
        }
    });
    let a = Arc::new(
        Node::builder(SENDER)
            .bind(ports::restartable_addr())
            .build()
            .await
            .unwrap(),
    );
    let dns = DnsMembers::new([(NodeId(2), format!("localhost:{port}"))])
        .unwrap()
        .refresh_every(Duration::from_millis(500))
        .unwrap();
    let group = GroupSender::<u64>::new(a, GroupConfig::new(CH), dns)
        .await
        .unwrap();
    let members = group.members();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].0.id, NodeId(2));
    assert_eq!(members[0].0.addr.port(), port);
    assert!(members[0].0.addr.ip().is_loopback());
    for n in 0..10u64 {
        let out = tokio::time::timeout(Duration::from_secs(30), async {
            group.send(&n).await.unwrap().await
        })
        .await
        .expect("acked within 30 s")
        .unwrap();
        assert_eq!(out.member, NodeId(2));
    }
    // A name that does not resolve fails the first resolution, typed.
    let bad = DnsMembers::new([(NodeId(3), "no-such-host.invalid:7000")]).unwrap();
    let e = GroupSender::<u64>::new(
        Arc::new(
            Node::builder(NodeId(5))
                .bind(ports::restartable_addr())
                .build()
                .await
                .unwrap(),
        ),
        GroupConfig::new(CH),
        bad,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ackwire::group::GroupError::Resolve(_)), "{e}");
}

/// With hinted handoff on the sending node (not recommended for group traffic), a Down
/// member's unacked messages become hints — the group treats `HandedOff` as "not
/// delivered" and re-routes them — and the hints are *also* replayed to the member
/// when it returns. The shared dedup record keeps each effect at one.
#[tokio::test(start_paused = true)]
async fn with_handoff_on_a_down_members_messages_are_rerouted_and_its_hints_are_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let ids = [NodeId(2), NodeId(3)];
    let mut replicas = Vec::new();
    for id in ids {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let mut cfg = ackwire::NodeConfig::default();
    cfg.handoff = Some(ackwire::HandoffConfig::new(dir.path()));
    let a = Arc::new(
        Node::builder(SENDER)
            .transport(net.transport(SENDER))
            .config(cfg)
            .seed(1)
            .build()
            .await
            .unwrap(),
    );
    let group = GroupSender::<u64>::new(a.clone(), config(Spread::RoundRobin), members(&ids))
        .await
        .unwrap();
    // Replica 2 applies and hangs; then it is cut off.
    replicas[0].acks.store(false, Ordering::SeqCst);
    let mut receipts = Vec::new();
    for k in 0..20u128 {
        receipts.push(group.send_with_key(&(k as u64), IdKey(k)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(replicas[0].held.lock().unwrap().len(), 10);
    net.isolate(NodeId(2));
    for r in receipts {
        assert_eq!(
            r.await.unwrap().member,
            NodeId(3),
            "re-routed, not left as a hint"
        );
    }
    let hints = a.stats().await.unwrap().hints.unwrap();
    assert!(hints.stored >= 10, "{hints:?}");
    // Replica 2 recovers (its held deliveries are released and acked) and returns:
    // the hints are replayed to it.
    replicas[0].acks.store(true, Ordering::SeqCst);
    drop(std::mem::take(&mut *replicas[0].held.lock().unwrap()));
    net.rejoin(NodeId(2));
    wait_health(&a, NodeId(2), Health::Up).await;
    for _ in 0..600 {
        if a.stats().await.unwrap().hints.unwrap().pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hints = a.stats().await.unwrap().hints.unwrap();
    println!("handoff on: {:?}; hints {hints:?}", group.stats());
    assert_eq!(hints.pending, 0, "{hints:?}");
    assert!(hints.delivered >= 10, "{hints:?}");
    assert!(group.stats().rerouted >= 10);
    assert_each_applied_once(&inbox, 20);
    reliability(
        "hinted handoff on the group's node: a Down member's messages become hints",
        "20 messages, 2 replicas",
        "HandedOff counts as not delivered: re-routed and acked elsewhere; the 10 hints replayed to the returning member change no effect",
    );
}

/// A member without a receiver on the channel refuses with `NoReceiver` (after its
/// grace period): another member may have one, so the message is re-routed. A member
/// that cannot decode the payload refuses for good: the group fails the message,
/// typed, rather than trying it everywhere.
#[tokio::test(start_paused = true)]
async fn refusals_reroute_or_fail_by_their_reason() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let ok = replica(&net, NodeId(2), inbox.clone()).await;
    let no_receiver = Node::builder(NodeId(3))
        .transport(net.transport(NodeId(3)))
        .build()
        .await
        .unwrap();
    let a = sender(&net).await;
    let group = GroupSender::<u64>::new(
        a.clone(),
        config(Spread::RoundRobin),
        members(&[NodeId(2), NodeId(3)]),
    )
    .await
    .unwrap();
    let by = per_member(&send_all(&group, 0..10).await);
    assert_eq!(
        by,
        BTreeMap::from([(NodeId(2), 10)]),
        "NoReceiver re-routes"
    );
    assert_eq!(group.stats().rerouted, 5);
    assert_eq!(ok.seen.lock().unwrap().len(), 10);
    drop(no_receiver);

    // A member whose typed receiver takes another type: the typed group sender's
    // fingerprint does not match (TypeMismatch, final); raw bytes it cannot decode
    // are Undecodable, final.
    let wrong = Node::builder(NodeId(4))
        .transport(net.transport(NodeId(4)))
        .build()
        .await
        .unwrap();
    let mut rx = wrong.receiver::<String>(CH, false).unwrap();
    tokio::spawn(async move {
        // Decoding happens here; an undecodable payload is never handed out.
        while let Some(d) = rx.recv().await {
            d.ack();
        }
    });
    let group =
        GroupSender::<u64>::new(a.clone(), config(Spread::RoundRobin), members(&[NodeId(4)]))
            .await
            .unwrap();
    let raw_group = RawGroupSender::new(a, config(Spread::RoundRobin), members(&[NodeId(4)]))
        .await
        .unwrap();
    let typed = group
        .send_with_key(&300, IdKey(77))
        .await
        .unwrap()
        .await
        .unwrap_err();
    // 300 as bincode: read as a String, a length with no bytes after it.
    let raw = raw_group
        .send_with_key(Bytes::from_static(&[0xFB, 0x2C, 0x01]), IdKey(78))
        .await
        .unwrap()
        .await
        .unwrap_err();
    for (e, want_key, want) in [
        (typed, IdKey(77), ackwire::RejectReason::TypeMismatch),
        (raw, IdKey(78), ackwire::RejectReason::Undecodable),
    ] {
        match e {
            GroupSendError::Failed {
                key,
                member,
                error: ackwire::SendError::Rejected { reason },
            } => {
                assert_eq!(key, want_key);
                assert_eq!(member, Some(NodeId(4)));
                assert_eq!(reason, want);
            }
            other => panic!("expected a final refusal, got {other:?}"),
        }
    }
    assert_eq!(group.stats().failed, 1);
    assert_eq!(raw_group.stats().failed, 1);
}

/// A resolver that answers once, then hangs.
struct HangingMembers(Vec<Member>, bool);

impl Membership for HangingMembers {
    async fn members(&mut self) -> std::io::Result<Vec<Member>> {
        if self.1 {
            tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        }
        self.1 = true;
        Ok(self.0.clone())
    }
    fn refresh_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
}

/// A resolution that hangs does not hold up re-routing: health changes are handled
/// next to it.
#[tokio::test(start_paused = true)]
async fn a_hanging_resolver_does_not_delay_rerouting() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let mut replicas = Vec::new();
    for id in [NodeId(2), NodeId(3)] {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let a = sender(&net).await;
    let list = vec![member(NodeId(2)), member(NodeId(3))];
    let group = GroupSender::<u64>::new(a, config(Spread::RoundRobin), HangingMembers(list, false))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // the resolver is hanging now
    replicas[0].acks.store(false, Ordering::SeqCst);
    let mut receipts = Vec::new();
    for k in 0..10u128 {
        receipts.push(group.send_with_key(&(k as u64), IdKey(k)).await.unwrap());
    }
    net.isolate(NodeId(2));
    // Well before the attempts' own 30 s deadline would re-route them anyway.
    let settled = tokio::time::timeout(Duration::from_secs(20), async {
        for r in receipts {
            assert_eq!(r.await.unwrap().member, NodeId(3));
        }
    })
    .await;
    assert!(settled.is_ok(), "re-routes waited for the resolver");
    assert_eq!(group.stats().rerouted, 5);
    assert_each_applied_once(&inbox, 10);
}

/// Identity is what the connection proves: a member whose address answers with
/// another node id fails the handshake (`rejected_wrong_peer`), never becomes a way
/// in, and its share of the messages goes to the members that are who they claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_address_that_answers_as_another_node_gets_nothing() {
    let mut nodes = Vec::new();
    for id in [NodeId(2), NodeId(4)] {
        let n = Node::builder(id)
            .bind(ports::restartable_addr())
            .allow_peer(SENDER)
            .build()
            .await
            .unwrap();
        let mut rx = n.receiver::<u64>(CH, false).unwrap();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                d.ack();
            }
        });
        nodes.push(n);
    }
    let mut cfg = ackwire::NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.detector.acceptable_heartbeat_pause = Duration::from_millis(400);
    cfg.detector.first_heartbeat_estimate = Duration::from_millis(200);
    let a = Arc::new(
        Node::builder(SENDER)
            .bind(ports::restartable_addr())
            .config(cfg)
            .build()
            .await
            .unwrap(),
    );
    // Member 3's address is node 4's.
    let list = StaticMembers::new([
        (NodeId(2), nodes[0].local_addr().unwrap()),
        (NodeId(3), nodes[1].local_addr().unwrap()),
    ])
    .unwrap();
    let group = GroupSender::<u64>::new(a.clone(), config(Spread::RoundRobin), list)
        .await
        .unwrap();
    let by = tokio::time::timeout(Duration::from_secs(60), send_all(&group, 0..20))
        .await
        .expect("acked within 60 s");
    assert_eq!(per_member(&by), BTreeMap::from([(NodeId(2), 20)]));
    let tcp = a.tcp_stats().unwrap();
    assert!(tcp.rejected_wrong_peer > 0, "{tcp:?}");
    assert_eq!(a.health(NodeId(4)), None, "node 4 never became a peer");
    assert_eq!(a.health(NodeId(3)), Some(Health::Down));
    reliability(
        "a member's address answers with another node id (plain TCP)",
        "20 messages, 2 members",
        "the handshake refuses it (rejected_wrong_peer), nothing reaches the impostor; the member is held Down and its share re-routed to the other member",
    );
}

/// A member that leaves the membership with messages unacked has them re-routed (it
/// is not Down: leaving is enough); a member whose address changes is re-addressed.
#[tokio::test(start_paused = true)]
async fn a_member_leaving_with_unacked_messages_has_them_rerouted() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let mut replicas = Vec::new();
    for id in [NodeId(2), NodeId(3)] {
        replicas.push(replica(&net, id, inbox.clone()).await);
    }
    let a = sender(&net).await;
    let list = Arc::new(Mutex::new(vec![member(NodeId(2)), member(NodeId(3))]));
    let group = GroupSender::<u64>::new(
        a.clone(),
        config(Spread::RoundRobin),
        FakeMembers(list.clone()),
    )
    .await
    .unwrap();
    replicas[1].acks.store(false, Ordering::SeqCst);
    let mut receipts = Vec::new();
    for k in 0..10u128 {
        receipts.push(group.send_with_key(&(k as u64), IdKey(k)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(replicas[1].held.lock().unwrap().len(), 5);
    // Replica 3 leaves the membership (still Up); replica 2 moves.
    *list.lock().unwrap() = vec![Member {
        id: NodeId(2),
        addr: SocketAddr::from(([127, 0, 0, 2], 7000)),
    }];
    for r in receipts {
        assert_eq!(r.await.unwrap().member, NodeId(2));
    }
    assert_eq!(a.health(NodeId(3)), Some(Health::Up));
    let stats = group.stats();
    assert_eq!((stats.members_removed, stats.members_moved), (1, 1));
    assert_eq!(stats.rerouted, 5);
    assert_each_applied_once(&inbox, 10);
}

#[test]
fn group_config_reads_from_toml_with_defaults_and_refuses_unknown_keys() {
    let c: GroupConfig = toml::from_str(
        r#"
        [channel]
        channel = 9
        guarantee = "AtLeastOnce"
        deadline = "5s"
        "#,
    )
    .unwrap();
    assert_eq!(c.channel.channel, CH);
    assert_eq!(c.channel.deadline, Some(Duration::from_secs(5)));
    assert_eq!(c.spread, Spread::Affinity);
    assert_eq!(c.member_wait, Duration::from_secs(10));
    assert!(c.validate().is_ok());
    let back: GroupConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(toml::from_str::<GroupConfig>(
        "max_attemps = 3\n[channel]\nchannel = 1\nguarantee = \"AtLeastOnce\""
    )
    .is_err());
    let bad: GroupConfig =
        toml::from_str("max_attempts = 0\n[channel]\nchannel = 1\nguarantee = \"AtLeastOnce\"")
            .unwrap();
    assert!(bad.validate().is_err());
}

/// A replica whose application-key table holds only `slots` keys: once they are
/// taken (until its dedup horizon), it refuses further keys with `KeyTableFull`.
async fn replica_with_key_slots(
    net: &MemNetwork,
    id: NodeId,
    slots: usize,
    inbox: SharedInbox,
) -> Node {
    let mut cfg = ackwire::NodeConfig::default();
    cfg.dedup.table_capacity = slots;
    cfg.dedup.table_budget_bytes = slots * ackwire::dedup::BYTES_PER_SLOT;
    let node = Node::builder(id)
        .transport(net.transport(id))
        .seed(id.0)
        .config(cfg)
        .build()
        .await
        .unwrap();
    let mut rx = node.receiver::<u64>(CH, false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            {
                let mut i = inbox.lock().unwrap();
                if i.claims.insert(d.id()) {
                    *i.effects.entry(*d.message()).or_default() += 1;
                }
            }
            d.ack();
        }
    });
    node
}

/// A member whose key table is full refuses with `KeyTableFull` ("not processed;
/// resending under the same key later is safe"): another member with room can take the
/// message, so the group re-routes it instead of failing it. (Regression: the refusal
/// was final, and about a third of the keyed sends failed `Failed { Rejected {
/// KeyTableFull } }` although the other member had room.) When every member's table is
/// full, the message ends typed after `max_attempts` sends, the refusal in `last`.
#[tokio::test(start_paused = true)]
async fn a_full_key_table_reroutes_and_every_member_full_ends_typed() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let inbox = SharedInbox::default();
    let _full = replica_with_key_slots(&net, NodeId(2), 64, inbox.clone()).await;
    let roomy = replica(&net, NodeId(3), inbox.clone()).await;
    let a = sender(&net).await;
    let group = GroupSender::<u64>::new(
        a.clone(),
        config(Spread::Affinity),
        members(&[NodeId(2), NodeId(3)]),
    )
    .await
    .unwrap();
    const N: u64 = 400;
    let mut receipts = Vec::new();
    for n in 0..N {
        let key = IdKey(u128::from(n) + 1);
        receipts.push(group.send_with_key(&n, key).await.unwrap());
    }
    let mut failed = Vec::new();
    let mut by: BTreeMap<NodeId, usize> = BTreeMap::new();
    for r in receipts {
        match r.await {
            Ok(out) => *by.entry(out.member).or_default() += 1,
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {N} failed although member 3 had room: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_each_applied_once(&inbox, N);
    let stats = group.stats();
    assert!(
        by[&NodeId(2)] <= 64,
        "the full member acked at most its 64 keys: {by:?}"
    );
    assert_eq!(by.values().sum::<usize>() as u64, N);
    assert!(stats.rerouted > 0, "{stats:?}");
    assert_eq!(stats.failed, 0);
    drop(roomy);

    // Every member full: each message that finds no room is tried on each member
    // (untried ones first) and ends `AttemptsExhausted`, never looping, never dropped.
    let inbox = SharedInbox::default();
    let _b = replica_with_key_slots(&net, NodeId(4), 4, inbox.clone()).await;
    let _c = replica_with_key_slots(&net, NodeId(5), 4, inbox.clone()).await;
    let mut cfg = config(Spread::Affinity);
    cfg.max_attempts = 3;
    let group = GroupSender::<u64>::new(a, cfg, members(&[NodeId(4), NodeId(5)]))
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for n in 0..20u64 {
        let key = IdKey(u128::from(n) + 1000);
        receipts.push(group.send_with_key(&n, key).await.unwrap());
    }
    let (mut acked, mut exhausted) = (0, 0);
    for r in receipts {
        match tokio::time::timeout(Duration::from_secs(600), r)
            .await
            .expect("a receipt with every member full never resolved")
        {
            Ok(_) => acked += 1,
            Err(GroupSendError::AttemptsExhausted {
                attempts: 3,
                last:
                    Some(ackwire::SendError::Rejected {
                        reason: ackwire::RejectReason::KeyTableFull,
                    }),
                ..
            }) => exhausted += 1,
            Err(other) => panic!("expected AttemptsExhausted after KeyTableFull: {other:?}"),
        }
    }
    // (The table may round its capacity up: count, don't predict, what was taken.)
    assert!(
        acked > 0 && exhausted > 0,
        "acked {acked}, exhausted {exhausted}"
    );
    assert_eq!(acked + exhausted, 20);
    assert_eq!(inbox.lock().unwrap().effects.len(), acked);
    assert_eq!(group.stats().attempts_exhausted, exhausted as u64);
}
