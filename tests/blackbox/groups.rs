//! Black-box tests of replica groups (`ackwire::group`) over real TCP on 127.0.0.1,
//! written from the docs only (README "Replica groups", `group` module docs).
//!
//! The "shared inbox" of the replicas is an in-process map keyed by `MessageId`
//! (claim + effect in one step, as an inbox transaction does).
//!
//! Bugs found (fixed; each test failed before the fix):
//! * a membership answer listing the sending node itself stopped `apply` at that id:
//!   later members never joined, departures were never announced (`a_new_member_*`,
//!   `a_refresh_that_lists_the_sender_itself_*`);
//! * an ack from a member that left did not settle a message waiting for a member or
//!   for window room (`an_ack_from_a_departed_member_*`);
//! * a send or receipt on a stopped node waited out `member_wait` instead of failing
//!   `Shutdown` (`a_send_on_a_stopped_node_*`, `an_in_flight_receipt_*`);
//! * `member_wait` counted from the start of the send, not from when no member was
//!   live, and a cancelled send counted as an attempt (`member_wait_starts_*`);
//! * an encode failure counted in `failed` but not in `messages`.

use crate::support::ports;
use ackwire::detector::Health;
use ackwire::group::{
    DnsMembers, GroupConfig, GroupError, GroupSendError, GroupSender, Member, Membership,
    RawGroupSender, Spread, StaticMembers,
};
use ackwire::{
    ChannelId, Delivery, Guarantee, IdKey, MessageId, Node, NodeConfig, NodeId, RejectReason,
    SendError,
};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CH: ChannelId = ChannelId(5);
const SENDER: NodeId = NodeId(1);

fn lo() -> SocketAddr {
    ports::restartable_addr()
}

async fn within<F: Future>(secs: f64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs_f64(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

#[derive(Default)]
struct Shared {
    claims: HashSet<MessageId>,
    /// effects applied per payload value
    effects: HashMap<u64, u32>,
}
type Inbox = Arc<Mutex<Shared>>;

fn inbox() -> Inbox {
    Arc::default()
}

struct Replica {
    id: NodeId,
    addr: SocketAddr,
    node: Option<Node>,
    /// (id, value) of every delivery handed to the handler
    seen: Arc<Mutex<Vec<(MessageId, u64)>>>,
    acks: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<Delivery<u64>>>>,
    inbox: Inbox,
}

impl Replica {
    fn seen_values(&self) -> Vec<u64> {
        self.seen.lock().unwrap().iter().map(|(_, v)| *v).collect()
    }
    fn kill(&mut self) {
        self.held.lock().unwrap().clear();
        drop(self.node.take());
    }
    fn release(&self) {
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        for d in held {
            d.ack();
        }
    }
}

async fn replica_at(id: NodeId, addr: SocketAddr, inbox: Inbox, acks: bool) -> Replica {
    let node = Node::builder(id)
        .bind(addr)
        .allow_peer(SENDER)
        .build()
        .await
        .unwrap();
    let addr = node.local_addr().unwrap();
    let mut rx = node.receiver::<u64>(CH, false).unwrap();
    let seen: Arc<Mutex<Vec<(MessageId, u64)>>> = Arc::default();
    let acks = Arc::new(AtomicBool::new(acks));
    let held: Arc<Mutex<Vec<Delivery<u64>>>> = Arc::default();
    {
        let (seen, acks, held, inbox) = (seen.clone(), acks.clone(), held.clone(), inbox.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                seen.lock().unwrap().push((d.id(), *d.message()));
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
        addr,
        node: Some(node),
        seen,
        acks,
        held,
        inbox,
    }
}

async fn replica(id: NodeId, inbox: Inbox) -> Replica {
    replica_at(id, lo(), inbox, true).await
}

async fn restart(r: &Replica, acks: bool) -> Replica {
    replica_at(r.id, r.addr, r.inbox.clone(), acks).await
}

async fn sender_with(config: NodeConfig) -> Arc<Node> {
    Arc::new(
        Node::builder(SENDER)
            .bind(lo())
            .config(config)
            .build()
            .await
            .unwrap(),
    )
}

async fn sender() -> Arc<Node> {
    sender_with(NodeConfig::default()).await
}

fn static_members(rs: &[&Replica]) -> StaticMembers {
    StaticMembers::new(rs.iter().map(|r| (r.id, r.addr))).unwrap()
}

fn config(spread: Spread) -> GroupConfig {
    let mut c = GroupConfig::new(CH);
    c.spread = spread;
    c
}

async fn group(node: &Arc<Node>, c: GroupConfig, rs: &[&Replica]) -> GroupSender<u64> {
    GroupSender::<u64>::new(node.clone(), c, static_members(rs))
        .await
        .unwrap()
}

async fn wait_health(node: &Node, peer: NodeId, want: Health, secs: f64) -> Duration {
    let start = Instant::now();
    let mut ev = node.health_events();
    within(secs, &format!("{peer} to become {want:?}"), async {
        loop {
            if node.health(peer) == Some(want) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), ev.recv()).await;
        }
    })
    .await;
    start.elapsed()
}

fn each_once(inbox: &Inbox, values: impl IntoIterator<Item = u64>) {
    let i = inbox.lock().unwrap();
    let wrong: Vec<(u64, u32)> = values
        .into_iter()
        .map(|v| (v, i.effects.get(&v).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "effects not applied exactly once (value, times): {wrong:?}"
    );
}

// ---------------------------------------------------------------------------------
// Misuse and typed setup errors

struct Scripted {
    answers: Arc<Mutex<Vec<std::io::Result<Vec<Member>>>>>,
    last: Vec<Member>,
    every: Option<Duration>,
}
impl Membership for Scripted {
    async fn members(&mut self) -> std::io::Result<Vec<Member>> {
        let next = {
            let mut a = self.answers.lock().unwrap();
            if a.is_empty() {
                None
            } else {
                Some(a.remove(0))
            }
        };
        match next {
            Some(Ok(m)) => {
                self.last = m.clone();
                Ok(m)
            }
            Some(Err(e)) => Err(e),
            None => Ok(self.last.clone()),
        }
    }
    fn refresh_every(&self) -> Option<Duration> {
        self.every
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misuse_is_refused_with_typed_errors() {
    let a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    assert!(matches!(
        StaticMembers::new(Vec::<(NodeId, SocketAddr)>::new()),
        Err(GroupError::NoMembers)
    ));
    assert!(matches!(
        StaticMembers::new([(NodeId(10), a), (NodeId(11), a), (NodeId(10), a)]),
        Err(GroupError::DuplicateMember(NodeId(10)))
    ));
    assert!(matches!(
        DnsMembers::new(Vec::<(NodeId, String)>::new()),
        Err(GroupError::NoMembers)
    ));
    assert!(matches!(
        DnsMembers::new([(NodeId(10), "a:1"), (NodeId(10), "b:1")]),
        Err(GroupError::DuplicateMember(NodeId(10)))
    ));
    for bad in ["nohost", ":7000", "host:", "host:port", "host:70000", ""] {
        assert!(
            matches!(
                DnsMembers::new([(NodeId(10), bad)]),
                Err(GroupError::BadName { id: NodeId(10), .. })
            ),
            "{bad:?} accepted"
        );
    }
    let dns = DnsMembers::new([(NodeId(10), "localhost:7000")]).unwrap();
    assert!(matches!(
        dns.clone().refresh_every(Duration::from_millis(99)),
        Err(GroupError::Config(_))
    ));
    assert!(matches!(
        dns.clone().refresh_every(Duration::from_secs(3601)),
        Err(GroupError::Config(_))
    ));
    assert!(dns
        .clone()
        .refresh_every(Duration::from_millis(100))
        .is_ok());

    let node = sender().await;
    let members = || StaticMembers::new([(NodeId(10), a)]).unwrap();
    let mut c = GroupConfig::new(CH);
    c.channel.guarantee = Guarantee::AtMostOnce;
    assert!(matches!(
        GroupSender::<u64>::new(node.clone(), c, members()).await,
        Err(GroupError::AtMostOnce)
    ));
    for n in [0, 1001] {
        let mut c = GroupConfig::new(CH);
        c.max_attempts = n;
        assert!(
            matches!(
                GroupSender::<u64>::new(node.clone(), c, members()).await,
                Err(GroupError::Config(_))
            ),
            "max_attempts {n} accepted"
        );
    }
    let mut c = GroupConfig::new(CH);
    c.member_wait = Duration::from_secs(3601);
    assert!(matches!(
        GroupSender::<u64>::new(node.clone(), c, members()).await,
        Err(GroupError::Config(_))
    ));
    let mut c = GroupConfig::new(CH);
    c.channel.deadline = Some(Duration::ZERO);
    assert!(matches!(
        GroupSender::<u64>::new(node.clone(), c, members()).await,
        Err(GroupError::Config(_))
    ));
    // First resolution fails: Resolve.
    let failing = Scripted {
        answers: Arc::new(Mutex::new(vec![Err(std::io::Error::other("dns down"))])),
        last: vec![],
        every: None,
    };
    assert!(matches!(
        GroupSender::<u64>::new(node.clone(), GroupConfig::new(CH), failing).await,
        Err(GroupError::Resolve(_))
    ));
    // DNS names of which none resolves: Resolve.
    let nowhere = DnsMembers::new([(NodeId(10), "no-such-host.invalid:7000")]).unwrap();
    let r = within(
        12.0,
        "a DNS group with no resolvable name",
        GroupSender::<u64>::new(node.clone(), GroupConfig::new(CH), nowhere),
    )
    .await;
    assert!(matches!(r, Err(GroupError::Resolve(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_on_a_stopped_node_is_a_node_error() {
    let node = sender().await;
    node.shutdown().await;
    let r = GroupSender::<u64>::new(
        node.clone(),
        GroupConfig::new(CH),
        StaticMembers::new([(NodeId(10), "127.0.0.1:7000".parse().unwrap())]).unwrap(),
    )
    .await;
    assert!(matches!(r, Err(GroupError::Node(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_custom_membership_fails_sends_with_no_live_member() {
    let node = sender().await;
    let mut c = GroupConfig::new(CH);
    c.member_wait = Duration::ZERO;
    let g = GroupSender::<u64>::new(node.clone(), c, Live(Arc::default()))
        .await
        .unwrap();
    let t0 = Instant::now();
    let r = within(
        5.0,
        "a send to an empty group",
        g.send_with_key(&1, IdKey(77)),
    )
    .await;
    match r {
        Err(GroupSendError::NoLiveMember { key, .. }) => assert_eq!(key, IdKey(77)),
        other => panic!("expected NoLiveMember, got {other:?}"),
    }
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "member_wait zero waited {:?}",
        t0.elapsed()
    );
    assert_eq!(g.stats().no_live_member, 1);
}

// ---------------------------------------------------------------------------------
// Spreading

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_keeps_each_key_on_one_member_and_uses_all() {
    let ib = inbox();
    let rs = [
        replica(NodeId(10), ib.clone()).await,
        replica(NodeId(11), ib.clone()).await,
        replica(NodeId(12), ib.clone()).await,
    ];
    let node = sender().await;
    let g = group(&node, config(Spread::Affinity), &[&rs[0], &rs[1], &rs[2]]).await;
    let mut first = BTreeMap::new();
    for round in 0..2 {
        for k in 0..60u64 {
            let receipt = within(10.0, "send", g.send_with_key(&k, IdKey(1000 + k as u128)))
                .await
                .unwrap();
            assert_eq!(receipt.key(), IdKey(1000 + k as u128));
            let out = within(10.0, "receipt", receipt).await.unwrap();
            assert_eq!(out.key, IdKey(1000 + k as u128));
            assert_eq!(out.attempts, 1);
            if round == 0 {
                first.insert(k, out.member);
            } else {
                assert_eq!(first[&k], out.member, "key {k} moved in a stable group");
            }
        }
    }
    let used: HashSet<NodeId> = first.values().copied().collect();
    assert_eq!(used.len(), 3, "not every member used: {first:?}");
    // The second round was a repeat of each key at the same member: deduped.
    let total: usize = rs.iter().map(|r| r.seen_values().len()).sum();
    assert_eq!(total, 60, "repeats under one key were delivered again");
    each_once(&ib, 0..60);
    let s = g.stats();
    assert_eq!(
        (s.messages, s.acked, s.attempts, s.rerouted),
        (120, 120, 120, 0),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_takes_turns_in_id_order() {
    let ib = inbox();
    let rs = [
        replica(NodeId(12), ib.clone()).await,
        replica(NodeId(10), ib.clone()).await,
        replica(NodeId(11), ib.clone()).await,
    ];
    let node = sender().await;
    let g = group(&node, config(Spread::RoundRobin), &[&rs[0], &rs[1], &rs[2]]).await;
    let mut order = vec![];
    for v in 0..30u64 {
        let receipt = within(10.0, "send", g.send(&v)).await.unwrap();
        order.push(within(10.0, "receipt", receipt).await.unwrap().member);
    }
    let mut count: BTreeMap<NodeId, usize> = BTreeMap::new();
    for m in &order {
        *count.entry(*m).or_default() += 1;
    }
    assert_eq!(
        count.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{count:?}"
    );
    for w in order.windows(3) {
        let s: HashSet<_> = w.iter().collect();
        assert_eq!(
            s.len(),
            3,
            "three consecutive sends not on three members: {order:?}"
        );
    }
    each_once(&ib, 0..30);
}

// ---------------------------------------------------------------------------------
// Re-routing

/// Round-robin over A (commits, never acks), B, C; A is killed: its messages go to B
/// or C under the same id, and with the shared inbox each effect is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_members_unacked_messages_are_rerouted_under_the_same_id() {
    let ib = inbox();
    let mut a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let c = replica(NodeId(12), ib.clone()).await;
    let node = sender().await;
    let g = group(&node, config(Spread::RoundRobin), &[&a, &b, &c]).await;
    let mut receipts = vec![];
    for v in 0..30u64 {
        receipts.push(within(10.0, "send", g.send(&v)).await.unwrap());
    }
    // A has received (and "committed") its share.
    within(5.0, "A to receive its 10", async {
        while a.held.lock().unwrap().len() < 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let a_seen: Vec<(MessageId, u64)> = a.seen.lock().unwrap().clone();
    let t0 = Instant::now();
    a.kill();
    let mut outs = vec![];
    for r in receipts {
        outs.push(within(10.0, "receipts after A's kill", r).await);
    }
    let took = t0.elapsed();
    for (v, o) in outs.iter().enumerate() {
        let o = o
            .as_ref()
            .unwrap_or_else(|e| panic!("message {v} failed: {e}"));
        assert_ne!(
            o.member,
            NodeId(10),
            "message {v} settled by the killed member"
        );
    }
    let mut others: Vec<(MessageId, u64)> = b.seen.lock().unwrap().clone();
    others.extend(c.seen.lock().unwrap().iter().copied());
    for (id, v) in &a_seen {
        assert!(
            others.contains(&(*id, *v)),
            "A's message {v} ({id}) not re-sent under the same id to B or C"
        );
        let o = outs[*v as usize].as_ref().unwrap();
        assert!(
            o.attempts >= 2,
            "re-routed message {v} says {} attempt(s)",
            o.attempts
        );
        assert!(matches!(id, MessageId::Key(_)), "group id not a key: {id}");
    }
    each_once(&ib, 0..30);
    let s = g.stats();
    assert!(s.rerouted >= 10, "{s:?}");
    assert_eq!(s.acked, 30, "{s:?}");
    assert_eq!(
        s.attempts,
        outs.iter()
            .map(|o| o.as_ref().unwrap().attempts as u64)
            .sum::<u64>(),
        "{s:?}"
    );
    eprintln!("rerouted after {took:?}");
}

/// Without a shared inbox: at-least-once across members (A's committed messages are
/// processed again elsewhere) but never lost, and each member dedups its own repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_shared_inbox_reroutes_are_at_least_once() {
    let mut a = replica_at(NodeId(10), lo(), inbox(), false).await;
    let b = replica(NodeId(11), inbox()).await;
    let node = sender().await;
    let g = group(&node, config(Spread::RoundRobin), &[&a, &b]).await;
    let mut receipts = vec![];
    for v in 0..20u64 {
        receipts.push(within(10.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "A to receive its 10", async {
        while a.held.lock().unwrap().len() < 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.kill();
    for r in receipts {
        let o = within(10.0, "receipt", r).await.unwrap();
        assert_eq!(o.member, NodeId(11));
    }
    let bv = b.seen_values();
    let mut sorted = bv.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..20).collect::<Vec<_>>(),
        "B did not process each exactly once"
    );
}

/// Affinity: while A is Down, keys of B and C stay where they were and A's keys move;
/// when A is back (same address), its keys return to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_moves_only_a_down_members_keys_and_they_come_back() {
    let ib = inbox();
    let mut a = replica(NodeId(10), ib.clone()).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let c = replica(NodeId(12), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let g = group(&node, config(Spread::Affinity), &[&a, &b, &c]).await;
    let send_round = |g: GroupSender<u64>, base: u64| async move {
        let mut m = BTreeMap::new();
        for k in 0..45u64 {
            let r = g
                .send_with_key(&(base + k), IdKey(5000 + k as u128))
                .await
                .unwrap();
            m.insert(k, r.await.unwrap().member);
        }
        m
    };
    let before = within(10.0, "round 1", send_round(g.clone(), 0)).await;
    wait_health(&node, NodeId(10), Health::Up, 5.0).await;
    a.kill();
    let down = wait_health(&node, NodeId(10), Health::Down, 8.0).await;
    eprintln!("A Down after {down:?}");
    let during = within(10.0, "round 2", send_round(g.clone(), 100)).await;
    for k in 0..45 {
        if before[&k] == NodeId(10) {
            assert_ne!(during[&k], NodeId(10), "key {k} still on Down A");
        } else {
            assert_eq!(before[&k], during[&k], "key {k} of a live member moved");
        }
    }
    let a2 = restart(&a, true).await;
    wait_health(&node, NodeId(10), Health::Up, 8.0).await;
    let after = within(10.0, "round 3", send_round(g.clone(), 200)).await;
    assert_eq!(
        before, after,
        "keys did not return to their member after it came back"
    );
    assert!(!a2.seen_values().is_empty());
}

// ---------------------------------------------------------------------------------
// All members down, and coming back

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_down_fails_with_no_live_member() {
    let ib = inbox();
    let mut a = replica(NodeId(10), ib.clone()).await;
    let mut b = replica(NodeId(11), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let mut gc = config(Spread::RoundRobin);
    gc.member_wait = Duration::from_secs(1);
    let g = group(&node, gc, &[&a, &b]).await;
    // Both heard from.
    for v in 0..4u64 {
        within(10.0, "warm up", async {
            g.send(&v).await.unwrap().await.unwrap()
        })
        .await;
    }
    a.acks.store(false, Ordering::SeqCst);
    b.acks.store(false, Ordering::SeqCst);
    let r1 = within(5.0, "send", g.send_with_key(&10, IdKey(10)))
        .await
        .unwrap();
    let r2 = within(5.0, "send", g.send_with_key(&11, IdKey(11)))
        .await
        .unwrap();
    within(5.0, "both held", async {
        while a.held.lock().unwrap().len() + b.held.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.kill();
    b.kill();
    // In-flight receipts resolve (typed) once no member is live for member_wait.
    for (r, k) in [(r1, 10u128), (r2, 11)] {
        match within(9.0, "in-flight receipt with every member down", r).await {
            Err(GroupSendError::NoLiveMember { key, attempts }) => {
                assert_eq!(key, IdKey(k));
                assert!(attempts >= 1);
            }
            Err(GroupSendError::AttemptsExhausted { key, .. }) => assert_eq!(key, IdKey(k)),
            other => panic!("expected a typed give-up, got {other:?}"),
        }
    }
    wait_health(&node, NodeId(10), Health::Down, 5.0).await;
    wait_health(&node, NodeId(11), Health::Down, 5.0).await;
    let t0 = Instant::now();
    match within(
        5.0,
        "new send with every member down",
        g.send_with_key(&12, IdKey(12)),
    )
    .await
    {
        Err(GroupSendError::NoLiveMember { key, attempts }) => {
            assert_eq!(key, IdKey(12));
            assert_eq!(attempts, 0);
        }
        other => panic!("expected NoLiveMember, got {other:?}"),
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "waited {waited:?} for member_wait 1 s"
    );
    let s = g.stats();
    assert_eq!(s.acked, 4, "{s:?}");
    assert_eq!(
        s.messages,
        s.acked + s.no_live_member + s.attempts_exhausted + s.failed,
        "counters do not add up: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_within_member_wait_takes_the_waiting_send() {
    let ib = inbox();
    let mut a = replica(NodeId(10), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let mut gc = config(Spread::Affinity);
    gc.member_wait = Duration::from_secs(8);
    let g = group(&node, gc, &[&a]).await;
    within(10.0, "warm up", async {
        g.send(&0).await.unwrap().await.unwrap()
    })
    .await;
    a.kill();
    wait_health(&node, NodeId(10), Health::Down, 6.0).await;
    let g2 = g.clone();
    let pending = tokio::spawn(async move { g2.send_with_key(&1, IdKey(1)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "send did not wait for a live member"
    );
    let a2 = restart(&a, true).await;
    let receipt = within(8.0, "waiting send after the member came back", pending)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("send failed: {e}"));
    let out = within(8.0, "receipt", receipt).await.unwrap();
    assert_eq!(out.member, NodeId(10));
    assert!(a2.seen_values().contains(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_gets_traffic_again() {
    let ib = inbox();
    let mut a = replica(NodeId(10), ib.clone()).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let g = group(&node, config(Spread::RoundRobin), &[&a, &b]).await;
    for v in 0..4u64 {
        within(10.0, "warm up", async {
            g.send(&v).await.unwrap().await.unwrap()
        })
        .await;
    }
    a.kill();
    wait_health(&node, NodeId(10), Health::Down, 6.0).await;
    for v in 4..10u64 {
        let o = within(10.0, "send while A down", async {
            g.send(&v).await.unwrap().await
        })
        .await
        .unwrap();
        assert_eq!(o.member, NodeId(11), "a message went to the Down member");
    }
    let a2 = restart(&a, true).await;
    wait_health(&node, NodeId(10), Health::Up, 8.0).await;
    let mut by = BTreeMap::<NodeId, u32>::new();
    for v in 10..20u64 {
        let o = within(10.0, "send after A back", async {
            g.send(&v).await.unwrap().await
        })
        .await
        .unwrap();
        *by.entry(o.member).or_default() += 1;
    }
    assert!(
        by.get(&NodeId(10)).copied().unwrap_or(0) >= 4,
        "restarted member got {by:?}"
    );
    assert!(!a2.seen_values().is_empty());
    each_once(&ib, 0..20);
}

// ---------------------------------------------------------------------------------
// Shutdown, drop, cancellation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_shutdown_resolves_pending_receipts_and_fails_later_sends() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let mut cfg = NodeConfig::default();
    cfg.shutdown_drain = Duration::from_millis(500);
    let node = sender_with(cfg).await;
    let g = group(&node, config(Spread::Affinity), &[&a]).await;
    let mut receipts = vec![];
    for v in 0..5u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "held", async {
        while a.held.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within(8.0, "sender shutdown", node.shutdown()).await;
    for r in receipts {
        let out = within(5.0, "receipt after sender shutdown", r).await;
        assert!(
            out.is_err(),
            "unacked message reported {out:?} after shutdown"
        );
    }
    let t0 = Instant::now();
    let r = within(5.0, "send after shutdown", g.send(&99)).await;
    match r {
        Err(GroupSendError::Failed {
            error: SendError::Shutdown,
            ..
        }) => {}
        Err(GroupSendError::Failed {
            error: SendError::NodeFailed(_),
            ..
        }) => {}
        other => panic!("expected Failed(Shutdown), got {other:?}"),
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "send on a stopped node waited {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_group_keeps_unsettled_messages_then_releases_the_node() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let node = sender().await;
    let g = group(&node, config(Spread::Affinity), &[&a]).await;
    let mut receipts = vec![];
    for v in 0..3u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "held", async {
        while a.held.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(g);
    a.release();
    for r in receipts {
        let o = within(5.0, "receipt after group drop", r).await.unwrap();
        assert_eq!(o.member, NodeId(10));
    }
    within(5.0, "the group to let go of its node", async {
        while Arc::strong_count(&node) > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cancelled_while_waiting_is_never_sent() {
    let ib = inbox();
    let mut a = replica(NodeId(10), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let mut gc = config(Spread::Affinity);
    gc.member_wait = Duration::from_secs(5);
    let g = group(&node, gc, &[&a]).await;
    within(10.0, "warm up", async {
        g.send(&0).await.unwrap().await.unwrap()
    })
    .await;
    a.kill();
    wait_health(&node, NodeId(10), Health::Down, 6.0).await;
    let r = tokio::time::timeout(Duration::from_millis(300), g.send_with_key(&1, IdKey(1))).await;
    assert!(r.is_err(), "send returned while no member was live: {r:?}");
    let a2 = restart(&a, true).await;
    wait_health(&node, NodeId(10), Health::Up, 8.0).await;
    let o = within(5.0, "later send", async {
        g.send_with_key(&2, IdKey(2)).await.unwrap().await
    })
    .await
    .unwrap();
    assert_eq!(o.member, NodeId(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !a2.seen_values().contains(&1),
        "a cancelled send was delivered"
    );
    let s = g.stats();
    assert_eq!(s.messages, 2, "cancelled send counted: {s:?}");
}

// ---------------------------------------------------------------------------------
// Typed failures of one message

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_mismatch_fails_the_message_typed() {
    // Member 10 takes Strings on the channel; the group sends u64.
    let m = Node::builder(NodeId(10))
        .bind(lo())
        .allow_peer(SENDER)
        .build()
        .await
        .unwrap();
    let mut rx = m.receiver::<String>(CH, false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            d.ack();
        }
    });
    let node = sender().await;
    let g = GroupSender::<u64>::new(
        node.clone(),
        GroupConfig::new(CH),
        StaticMembers::new([(NodeId(10), m.local_addr().unwrap())]).unwrap(),
    )
    .await
    .unwrap();
    let r = within(5.0, "send", g.send_with_key(&7, IdKey(7)))
        .await
        .unwrap();
    match within(8.0, "receipt of a mistyped message", r).await {
        Err(GroupSendError::Failed { key, member, error }) => {
            assert_eq!(key, IdKey(7));
            assert_eq!(member, Some(NodeId(10)));
            assert!(
                matches!(
                    error,
                    SendError::Rejected {
                        reason: RejectReason::TypeMismatch
                    }
                ),
                "{error:?}"
            );
        }
        other => panic!("expected Failed(TypeMismatch), got {other:?}"),
    }
    assert_eq!(g.stats().failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_payload_fails_at_once() {
    let a = replica(NodeId(10), inbox()).await;
    let mut cfg = NodeConfig::default();
    cfg.max_payload = 1024;
    let node = sender_with(cfg).await;
    let g = RawGroupSender::new(node.clone(), GroupConfig::new(CH), static_members(&[&a]))
        .await
        .unwrap();
    let r = within(
        3.0,
        "oversized send",
        g.send_with_key(Bytes::from(vec![0u8; 4096]), IdKey(3)),
    )
    .await;
    match r {
        Err(GroupSendError::Failed {
            key,
            error: SendError::TooLarge { .. },
            ..
        }) => assert_eq!(key, IdKey(3)),
        other => panic!("expected Failed(TooLarge), got {other:?}"),
    }
}

/// max_attempts 1 and a member that dies holding the message: the only attempt is
/// spent, so the receipt fails with AttemptsExhausted (typed), within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_attempt_and_a_dead_member_is_attempts_exhausted() {
    let ib = inbox();
    let mut a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let node = sender().await;
    let mut gc = config(Spread::RoundRobin);
    gc.max_attempts = 1;
    gc.channel.deadline = Some(Duration::from_secs(4));
    let g = group(&node, gc, &[&a, &b]).await;
    let r0 = within(5.0, "send", g.send_with_key(&0, IdKey(100)))
        .await
        .unwrap();
    let r1 = within(5.0, "send", g.send_with_key(&1, IdKey(101)))
        .await
        .unwrap();
    within(5.0, "held", async {
        while a.held.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let held_value = *a.held.lock().unwrap()[0].message();
    a.kill();
    let (held_r, other_r) = if held_value == 0 { (r0, r1) } else { (r1, r0) };
    assert_eq!(
        within(5.0, "other receipt", other_r).await.unwrap().member,
        NodeId(11)
    );
    match within(9.0, "receipt with its one attempt on a dead member", held_r).await {
        Err(GroupSendError::AttemptsExhausted { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected AttemptsExhausted, got {other:?}"),
    }
    assert!(
        !b.seen_values().contains(&held_value),
        "max_attempts 1 but re-sent"
    );
}

// ---------------------------------------------------------------------------------
// Membership and identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_itself_listed_as_a_member_does_not_lose_messages() {
    let ib = inbox();
    let b = replica(NodeId(11), ib.clone()).await;
    let node = sender().await;
    let members =
        StaticMembers::new([(SENDER, node.local_addr().unwrap()), (b.id, b.addr)]).unwrap();
    let mut gc = config(Spread::RoundRobin);
    gc.member_wait = Duration::from_secs(2);
    let g = match GroupSender::<u64>::new(node.clone(), gc, members).await {
        Err(e) => {
            eprintln!("refused at build: {e}");
            return; // a typed refusal is fine
        }
        Ok(g) => g,
    };
    let mut res = vec![];
    for v in 0..6u64 {
        let r = within(9.0, "send with self as a member", async {
            match g.send(&v).await {
                Ok(r) => r.await,
                Err(e) => Err(e),
            }
        })
        .await;
        res.push(r);
    }
    let bad: Vec<_> = res.iter().filter(|r| r.is_err()).collect();
    assert!(
        bad.is_empty(),
        "messages failed because the sender is in its own group: {bad:?}"
    );
    each_once(&ib, 0..6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_id_at_another_nodes_address_gets_nothing() {
    let ib = inbox();
    // Node 12 listens where the group expects node 10.
    let impostor = replica(NodeId(12), ib.clone()).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let members = StaticMembers::new([(NodeId(10), impostor.addr), (b.id, b.addr)]).unwrap();
    let g = GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), members)
        .await
        .unwrap();
    let mut receipts = vec![];
    for v in 0..10u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    for r in receipts {
        let o = within(9.0, "receipt", r).await.unwrap();
        assert_eq!(o.member, NodeId(11));
    }
    assert!(
        impostor.seen_values().is_empty(),
        "the node at the wrong address got {:?}",
        impostor.seen_values()
    );
    assert_ne!(node.health(NodeId(10)), Some(Health::Up));
    each_once(&ib, 0..10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_members_resolve_localhost_and_skip_names_that_do_not_resolve() {
    let ib = inbox();
    let a = replica(NodeId(10), ib.clone()).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let node = sender().await;
    let dns = DnsMembers::new([
        (NodeId(10), format!("localhost:{}", a.addr.port())),
        (NodeId(11), format!("127.0.0.1:{}", b.addr.port())),
        (NodeId(12), "no-such-host.invalid:7000".to_string()),
    ])
    .unwrap();
    let g = within(
        8.0,
        "DNS group",
        GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), dns),
    )
    .await
    .unwrap();
    let ids: Vec<NodeId> = g.members().iter().map(|(m, _)| m.id).collect();
    assert_eq!(ids, vec![NodeId(10), NodeId(11)]);
    let mut by = BTreeMap::<NodeId, u32>::new();
    for v in 0..10u64 {
        let o = within(8.0, "send", async { g.send(&v).await.unwrap().await })
            .await
            .unwrap();
        *by.entry(o.member).or_default() += 1;
    }
    assert_eq!(by.len(), 2, "{by:?}");
    each_once(&ib, 0..10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_leave_join_and_move_over_a_live_membership() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let node = sender().await;
    let live = Live(Arc::new(Mutex::new(vec![
        Member {
            id: a.id,
            addr: a.addr,
        },
        Member {
            id: b.id,
            addr: b.addr,
        },
    ])));
    let g = GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), live.clone())
        .await
        .unwrap();
    let mut receipts = vec![];
    for v in 0..10u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "A to hold its share", async {
        while a.held.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // A leaves the membership (still running, never acking): its messages move to B.
    live.0.lock().unwrap().retain(|m| m.id != a.id);
    for r in receipts {
        let o = within(5.0, "receipt after A left", r).await.unwrap();
        assert_eq!(o.member, NodeId(11));
    }
    each_once(&ib, 0..10);
    // C joins.
    let c = replica(NodeId(12), ib.clone()).await;
    live.0.lock().unwrap().push(Member {
        id: c.id,
        addr: c.addr,
    });
    within(5.0, "C to be a member", async {
        while !g.members().iter().any(|(m, _)| m.id == NodeId(12)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut by = BTreeMap::<NodeId, u32>::new();
    for v in 10..20u64 {
        let o = within(8.0, "send", async { g.send(&v).await.unwrap().await })
            .await
            .unwrap();
        *by.entry(o.member).or_default() += 1;
    }
    assert!(
        !by.contains_key(&NodeId(10)),
        "departed member got traffic: {by:?}"
    );
    assert!(
        by.get(&NodeId(12)).copied().unwrap_or(0) >= 3,
        "joined member got {by:?}"
    );
    // C moves: a new process with id 12 on another port.
    let mut c = c;
    c.kill();
    let c2 = replica_at(NodeId(12), lo(), ib.clone(), true).await;
    assert_ne!(c2.addr, c.addr);
    for m in live.0.lock().unwrap().iter_mut() {
        if m.id == NodeId(12) {
            m.addr = c2.addr;
        }
    }
    within(5.0, "C's new address", async {
        while !g
            .members()
            .iter()
            .any(|(m, _)| m.id == NodeId(12) && m.addr == c2.addr)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut by = BTreeMap::<NodeId, u32>::new();
    for v in 20..30u64 {
        let o = within(9.0, "send after move", async {
            g.send(&v).await.unwrap().await
        })
        .await
        .unwrap();
        *by.entry(o.member).or_default() += 1;
    }
    assert!(
        by.get(&NodeId(12)).copied().unwrap_or(0) >= 3,
        "moved member got {by:?}"
    );
    each_once(&ib, 0..30);
    let s = g.stats();
    assert_eq!(
        (s.members_added, s.members_removed, s.members_moved),
        (3, 1, 1),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_listed_twice_by_a_membership_counts_once_the_first_entry() {
    let ib = inbox();
    let a = replica(NodeId(10), ib.clone()).await;
    let other = replica(NodeId(13), ib.clone()).await; // sits at the second address
    let node = sender().await;
    let m = Scripted {
        answers: Arc::new(Mutex::new(vec![Ok(vec![
            Member {
                id: NodeId(10),
                addr: a.addr,
            },
            Member {
                id: NodeId(10),
                addr: other.addr,
            },
        ])])),
        last: vec![],
        every: None,
    };
    let g = GroupSender::<u64>::new(node.clone(), GroupConfig::new(CH), m)
        .await
        .unwrap();
    let ms = g.members();
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].0.addr, a.addr, "not the first entry");
    for v in 0..5u64 {
        let o = within(8.0, "send", async { g.send(&v).await.unwrap().await })
            .await
            .unwrap();
        assert_eq!(o.member, NodeId(10));
    }
    assert_eq!(a.seen_values().len(), 5);
}

// ---------------------------------------------------------------------------------
// Load with a kill mid-stream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_with_a_member_killed_mid_stream_apply_each_once() {
    let ib = inbox();
    let mut a = replica(NodeId(10), ib.clone()).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let c = replica(NodeId(12), ib.clone()).await;
    let node = sender().await;
    let g = group(&node, config(Spread::Affinity), &[&a, &b, &c]).await;
    const N: u64 = 600;
    let mut tasks = vec![];
    for w in 0..4u64 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let mut rs = vec![];
            for v in (w..N).step_by(4) {
                rs.push((v, g.send(&v).await));
                if v % 40 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            let mut out = vec![];
            for (v, r) in rs {
                match r {
                    Ok(r) => out.push((v, r.await)),
                    Err(e) => out.push((v, Err(e))),
                }
            }
            out
        }));
    }
    within(5.0, "A to have some", async {
        while a.seen_values().len() < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    a.acks.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.kill();
    let mut failed = vec![];
    for t in tasks {
        for (v, r) in within(10.0, "all receipts", t).await.unwrap() {
            if let Err(e) = r {
                failed.push((v, e));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    each_once(&ib, 0..N);
    let s = g.stats();
    assert_eq!(s.acked, N, "{s:?}");
}

// ---------------------------------------------------------------------------------
// Second round: edge cases of membership refreshes and of a stopped sender node

/// A membership answer that lists the sending node itself next to real replicas (a
/// replica of a service addressing its own service's group, from one DNS list). The
/// node ignores its own id (`Node::add_peer`); the rest of the answer must still be
/// applied: the departed member's messages re-routed, the new member added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_lists_the_sender_itself_still_applies_the_other_changes() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let c = replica(NodeId(12), ib.clone()).await;
    let node = sender().await;
    let live = Live(Arc::new(Mutex::new(vec![
        Member {
            id: a.id,
            addr: a.addr,
        },
        Member {
            id: b.id,
            addr: b.addr,
        },
    ])));
    let g = GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), live.clone())
        .await
        .unwrap();
    let mut receipts = vec![];
    for v in 0..6u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "A to hold its share", async {
        while a.held.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // A leaves, C joins, and the answer also lists the sender's own id.
    *live.0.lock().unwrap() = vec![
        Member {
            id: SENDER,
            addr: node.local_addr().unwrap(),
        },
        Member {
            id: b.id,
            addr: b.addr,
        },
        Member {
            id: c.id,
            addr: c.addr,
        },
    ];
    let t0 = Instant::now();
    let mut outs = vec![];
    for r in receipts {
        outs.push(within(9.0, "receipts after A left (sender listed too)", r).await);
    }
    eprintln!("receipts settled after {:?}", t0.elapsed());
    for o in &outs {
        assert_ne!(o.as_ref().unwrap().member, NodeId(10));
    }
    within(3.0, "C to join", async {
        while !g.members().iter().any(|(m, _)| m.id == NodeId(12)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The same, without any departure: a new member listed after the sender's own id
/// must join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_joins_even_when_the_answer_lists_the_sender_itself() {
    let ib = inbox();
    let b = replica(NodeId(11), ib.clone()).await;
    let c = replica(NodeId(12), ib.clone()).await;
    let node = sender().await;
    let live = Live(Arc::new(Mutex::new(vec![Member {
        id: b.id,
        addr: b.addr,
    }])));
    let g = GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), live.clone())
        .await
        .unwrap();
    live.0.lock().unwrap().push(Member {
        id: SENDER,
        addr: node.local_addr().unwrap(),
    });
    live.0.lock().unwrap().push(Member {
        id: c.id,
        addr: c.addr,
    });
    let r = tokio::time::timeout(Duration::from_secs(3), async {
        while !g.members().iter().any(|(m, _)| m.id == NodeId(12)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let ids: Vec<NodeId> = g.members().iter().map(|(m, _)| m.id).collect();
    assert!(r.is_ok(), "member 12 never joined; members now {ids:?}");
}

/// Every member Down, then the sending node stops: a send is documented to fail with
/// `Failed` for a node that has shut down, not wait `member_wait` for a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_on_a_stopped_node_with_members_down_fails_at_once() {
    let ib = inbox();
    let mut a = replica(NodeId(10), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let mut gc = config(Spread::Affinity);
    gc.member_wait = Duration::from_secs(6);
    let g = group(&node, gc, &[&a]).await;
    within(10.0, "warm up", async {
        g.send(&0).await.unwrap().await.unwrap()
    })
    .await;
    a.kill();
    wait_health(&node, NodeId(10), Health::Down, 6.0).await;
    within(5.0, "sender shutdown", node.shutdown()).await;
    let t0 = Instant::now();
    let r = within(9.0, "send on a stopped node", g.send_with_key(&1, IdKey(1))).await;
    let took = t0.elapsed();
    assert!(
        matches!(
            r,
            Err(GroupSendError::Failed {
                error: SendError::Shutdown,
                ..
            })
        ),
        "send on a stopped node gave {r:?} after {took:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "send on a stopped node waited {took:?}"
    );
}

/// A message waiting for a live member (its member went Down) when the sending node
/// stops: its receipt should fail as Shutdown, not wait out member_wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_receipt_waiting_for_a_member_fails_when_the_node_stops() {
    let ib = inbox();
    let mut a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.shutdown_drain = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let mut gc = config(Spread::Affinity);
    gc.member_wait = Duration::from_secs(8);
    let g = group(&node, gc, &[&a]).await;
    let r = within(5.0, "send", g.send_with_key(&1, IdKey(1)))
        .await
        .unwrap();
    within(5.0, "held", async {
        while a.held.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.kill();
    wait_health(&node, NodeId(10), Health::Down, 6.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // the flight is waiting now
    within(5.0, "sender shutdown", node.shutdown()).await;
    let t0 = Instant::now();
    let out = within(9.5, "receipt after shutdown", r).await;
    let took = t0.elapsed();
    eprintln!("receipt {out:?} after {took:?}");
    assert!(out.is_err());
    assert!(
        matches!(
            out,
            Err(GroupSendError::Failed {
                error: SendError::Shutdown,
                ..
            })
        ),
        "receipt of a stopped node: {out:?} after {took:?}"
    );
}

// ---------------------------------------------------------------------------------
// Third round: ids, restarts before Down, refusals

/// Every group message's id at the replica is `MessageId::Key(receipt.key())`, on
/// effectively-once and at-least-once group channels alike (the shared inbox claims
/// that id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_sees_the_receipts_key_as_the_message_id_for_both_guarantees() {
    for (i, guarantee) in [Guarantee::EffectivelyOnce, Guarantee::AtLeastOnce]
        .into_iter()
        .enumerate()
    {
        let ib = inbox();
        let a = replica(NodeId(10), ib.clone()).await;
        let node = sender().await;
        let mut gc = config(Spread::Affinity);
        gc.channel.guarantee = guarantee;
        let g = group(&node, gc, &[&a]).await;
        let mut keys = vec![];
        for v in 0..5u64 {
            let r = within(5.0, "send", async {
                if v % 2 == 0 {
                    g.send(&(v + 10 * i as u64)).await
                } else {
                    g.send_with_key(&(v + 10 * i as u64), IdKey(900 + v as u128))
                        .await
                }
            })
            .await
            .unwrap();
            let k = r.key();
            let o = within(5.0, "receipt", r).await.unwrap();
            assert_eq!(o.key, k);
            keys.push(MessageId::Key(k));
        }
        let seen: Vec<MessageId> = a.seen.lock().unwrap().iter().map(|(id, _)| *id).collect();
        assert_eq!(
            seen, keys,
            "{guarantee:?}: ids at the replica are not the receipts' keys"
        );
    }
}

/// A replica killed while holding committed-but-unacked messages and restarted on the
/// same address before the detector holds it Down: the sender's retries reach the new
/// process; with the shared inbox every message settles and is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_before_it_is_down_settles_its_messages_once() {
    let ib = inbox();
    let mut a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let node = sender().await;
    let g = group(&node, config(Spread::Affinity), &[&a]).await;
    let mut receipts = vec![];
    for v in 0..10u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "held", async {
        while a.held.lock().unwrap().len() < 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.kill();
    let a2 = restart(&a, true).await;
    for r in receipts {
        let o = within(9.0, "receipt after a quick restart", r)
            .await
            .unwrap();
        assert_eq!(o.member, NodeId(10));
    }
    each_once(&ib, 0..10);
    assert_eq!(
        a2.seen_values().len(),
        10,
        "the restarted replica did not get the retries"
    );
}

/// A member with no receiver on the channel rejects with NoReceiver after its grace
/// period; the group re-routes such messages to a member that has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_a_receiver_has_its_messages_rerouted() {
    let ib = inbox();
    let bare = Node::builder(NodeId(10))
        .bind(lo())
        .allow_peer(SENDER)
        .build()
        .await
        .unwrap();
    let b = replica(NodeId(11), ib.clone()).await;
    let node = sender().await;
    let members =
        StaticMembers::new([(NodeId(10), bare.local_addr().unwrap()), (b.id, b.addr)]).unwrap();
    let g = GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), members)
        .await
        .unwrap();
    let mut receipts = vec![];
    for v in 0..6u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    for r in receipts {
        let o = within(9.5, "receipt", r).await.unwrap();
        assert_eq!(o.member, NodeId(11));
    }
    each_once(&ib, 0..6);
    assert!(g.stats().rerouted >= 3);
}

/// Two group senders on one node: fresh keys never collide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_keys_of_two_group_senders_do_not_collide() {
    let ib = inbox();
    let a = replica(NodeId(10), ib.clone()).await;
    let node = sender().await;
    let g1 = group(&node, config(Spread::Affinity), &[&a]).await;
    let g2 = group(&node, config(Spread::Affinity), &[&a]).await;
    let mut keys = HashSet::new();
    for v in 0..50u64 {
        for g in [&g1, &g2] {
            let r = within(5.0, "send", g.send(&v)).await.unwrap();
            assert!(keys.insert(r.key()), "key {:?} reused", r.key());
            within(5.0, "receipt", r).await.unwrap();
        }
    }
    assert_eq!(
        a.seen_values().len(),
        100,
        "a fresh message was deduped as a repeat"
    );
}

/// "The first ack from any attempt settles it": a member that leaves the membership
/// (scaled down) while holding a message, finishes it and acks it. With no other live
/// member the message is waiting for one; the ack must still settle its receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_a_departed_member_settles_a_message_waiting_for_a_member() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let node = sender().await;
    let live = Live(Arc::new(Mutex::new(vec![Member {
        id: a.id,
        addr: a.addr,
    }])));
    let mut gc = config(Spread::Affinity);
    gc.member_wait = Duration::from_secs(6);
    let g = GroupSender::<u64>::new(node.clone(), gc, live.clone())
        .await
        .unwrap();
    let r = within(5.0, "send", g.send_with_key(&1, IdKey(1)))
        .await
        .unwrap();
    within(5.0, "held", async {
        while a.held.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    live.0.lock().unwrap().clear(); // A is scaled down
    within(3.0, "A to leave", async {
        while !g.members().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acked_before = node.stats().await.unwrap().proto.acked;
    let t0 = Instant::now();
    a.release(); // A finishes its in-flight work and acks it
    let n = node.clone();
    within(3.0, "the sending node to record A's ack", async move {
        while n.stats().await.unwrap().proto.acked <= acked_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let out = within(9.0, "receipt", r).await;
    let took = t0.elapsed();
    match out {
        Ok(o) => {
            assert_eq!(o.member, NodeId(10));
            assert!(took < Duration::from_secs(2), "ack took {took:?} to settle");
        }
        Err(e) => panic!("message acked by member 10 but its receipt failed after {took:?}: {e:?}"),
    }
    each_once(&ib, [1]);
}

/// A value that cannot be encoded.
struct Unencodable;
impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no"))
    }
}

/// An encode failure is a typed `Failed` and the counters still add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unencodable_value_is_a_typed_failure_and_counted_consistently() {
    let a = replica(NodeId(10), inbox()).await;
    let node = sender().await;
    let g =
        GroupSender::<Unencodable>::new(node.clone(), GroupConfig::new(CH), static_members(&[&a]))
            .await
            .unwrap();
    let r = within(3.0, "send", g.send_with_key(&Unencodable, IdKey(4))).await;
    assert!(
        matches!(
            r,
            Err(GroupSendError::Failed {
                key: IdKey(4),
                error: SendError::Encode(_),
                ..
            })
        ),
        "{r:?}"
    );
    let s = g.stats();
    assert_eq!(
        s.messages,
        s.acked + s.no_live_member + s.attempts_exhausted + s.failed,
        "counters do not add up after an encode failure: {s:?}"
    );
}

/// The same, while the re-sent copy waits for window room at the other member (its
/// window full with other traffic on the channel): the departed member's ack must
/// settle the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_a_departed_member_settles_a_message_waiting_for_window_room() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let b = replica_at(NodeId(11), lo(), ib.clone(), false).await;
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
    // Fill B's window on the channel with plain sends that B holds.
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
    // A leaves, B joins: the message is re-sent to B and waits for B's window.
    *live.0.lock().unwrap() = vec![Member {
        id: b.id,
        addr: b.addr,
    }];
    // (`rerouted` counts re-sends made; this one waits for B's window, so wait
    // for the membership change instead.)
    within(3.0, "membership change", async {
        while g.members().iter().map(|(m, _)| m.id).collect::<Vec<_>>() != vec![b.id] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked_before = node.stats().await.unwrap().proto.acked;
    let t0 = Instant::now();
    a.release();
    let n = node.clone();
    within(3.0, "the sending node to record A's ack", async move {
        while n.stats().await.unwrap().proto.acked <= acked_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let out = tokio::time::timeout(Duration::from_secs(5), r).await;
    let took = t0.elapsed();
    match out {
        Ok(Ok(o)) => assert_eq!(o.member, NodeId(10)),
        Ok(Err(e)) => panic!("acked by member 10 but failed: {e:?}"),
        Err(_) => panic!("acked by member 10 {took:?} ago but the receipt is still pending"),
    }
    b.release();
}

/// member_wait is how long a send waits "when no member is live". A send that first
/// waited for window room at its member (longer than member_wait) and then lost that
/// member must still get member_wait to find another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_wait_starts_when_no_member_is_live_not_when_the_send_started() {
    let ib = inbox();
    let b = replica_at(NodeId(11), lo(), ib.clone(), false).await;
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
        id: b.id,
        addr: b.addr,
    }])));
    let mut gc = config(Spread::Affinity);
    gc.member_wait = Duration::from_secs(2);
    let g = GroupSender::<u64>::new(node.clone(), gc, live.clone())
        .await
        .unwrap();
    let g2 = g.clone();
    let pending = tokio::spawn(async move { g2.send_with_key(&1, IdKey(1)).await });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!pending.is_finished(), "send did not wait for window room");
    // B leaves; no member is live now. A new member arrives 500 ms later.
    live.0.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = replica(NodeId(10), ib.clone()).await;
    live.0.lock().unwrap().push(Member {
        id: a.id,
        addr: a.addr,
    });
    let r = within(5.0, "the send", pending).await.unwrap();
    match r {
        Ok(receipt) => {
            let o = within(5.0, "receipt", receipt).await.unwrap();
            assert_eq!(o.member, NodeId(10));
        }
        Err(e) => panic!(
            "send gave up {e:?} although a member came 0.5 s after none was live (member_wait 2 s)"
        ),
    }
    b.release();
}

/// With hinted handoff on the group's node (discouraged, but documented): a Down
/// member's messages are re-routed, its hints replayed when it returns, and with the
/// shared inbox each effect is still applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_handoff_on_tcp_a_down_members_messages_are_rerouted_and_hints_harmless() {
    let ib = inbox();
    let dir = tempfile::tempdir().unwrap();
    let mut a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.handoff = Some(ackwire::HandoffConfig::new(dir.path()));
    let node = sender_with(cfg).await;
    let g = group(&node, config(Spread::RoundRobin), &[&a, &b]).await;
    let mut receipts = vec![];
    for v in 0..20u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "A to hold its share", async {
        while a.held.lock().unwrap().len() < 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.kill();
    for r in receipts {
        let o = within(9.0, "receipt", r).await.unwrap();
        assert_eq!(o.member, NodeId(11));
    }
    each_once(&ib, 0..20);
    let a2 = restart(&a, true).await;
    within(8.0, "hints replayed to A", async {
        while a2.seen_values().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    each_once(&ib, 0..20);
    let s = g.stats();
    assert_eq!(s.acked, 20, "{s:?}");
}

/// A TCP proxy in front of a member that can cut it off (partition) and heal.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    kill: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (kill, _) = tokio::sync::watch::channel(0u64);
        let (cut2, kill2) = (cut.clone(), kill.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut stop = kill2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, kill }
    }
    fn partition(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.kill.send_modify(|v| *v += 1);
    }
    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A member commits, is partitioned before its acks get out, the group re-routes its
/// messages; the partition heals and the held-back copies reach it again. With the
/// shared inbox every effect is applied once, every receipt is Ok, and the healed
/// member gets traffic again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_member_with_committed_unacked_messages_then_healed() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let b = replica(NodeId(11), ib.clone()).await;
    let proxy = Proxy::start(a.addr).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let members = StaticMembers::new([(a.id, proxy.addr), (b.id, b.addr)]).unwrap();
    let g = GroupSender::<u64>::new(node.clone(), config(Spread::RoundRobin), members)
        .await
        .unwrap();
    let mut receipts = vec![];
    for v in 0..10u64 {
        receipts.push(within(5.0, "send", g.send(&v)).await.unwrap());
    }
    within(5.0, "A to hold its share", async {
        while a.held.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    proxy.partition();
    a.release(); // the acks are lost with the partition
    for r in receipts {
        let o = within(9.0, "receipt during the partition", r)
            .await
            .unwrap();
        let _ = o;
    }
    each_once(&ib, 0..10);
    proxy.heal();
    wait_health(&node, NodeId(10), Health::Up, 8.0).await;
    a.acks.store(true, Ordering::SeqCst);
    let mut by = BTreeMap::<NodeId, u32>::new();
    for v in 10..20u64 {
        let o = within(5.0, "send after heal", async {
            g.send(&v).await.unwrap().await
        })
        .await
        .unwrap();
        *by.entry(o.member).or_default() += 1;
    }
    assert!(
        by.get(&NodeId(10)).copied().unwrap_or(0) >= 3,
        "healed member got {by:?}"
    );
    each_once(&ib, 0..20);
}

/// The first ack from any attempt settles a group message (README), also when the
/// attempts are used up: one attempt (`max_attempts` 1) on the only member, which is
/// partitioned while its handler holds the message (Down: nowhere to re-route), then
/// healed, and its handler acks. The receipt is `Ok` from that member, not
/// `AttemptsExhausted`. (Regression: the message failed `AttemptsExhausted` as soon as
/// the member went Down, and the ack that followed was ignored.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_attempts_late_ack_settles_the_message() {
    let ib = inbox();
    let a = replica_at(NodeId(10), lo(), ib.clone(), false).await;
    let proxy = Proxy::start(a.addr).await;
    let mut cfg = NodeConfig::default();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let node = sender_with(cfg).await;
    let members = StaticMembers::new([(a.id, proxy.addr)]).unwrap();
    let mut gc = config(Spread::RoundRobin);
    gc.max_attempts = 1;
    gc.channel.deadline = Some(Duration::from_secs(20));
    let g = GroupSender::<u64>::new(node.clone(), gc, members)
        .await
        .unwrap();
    let r = within(5.0, "send", g.send_with_key(&7, IdKey(700)))
        .await
        .unwrap();
    within(5.0, "A to hold it", async {
        while a.held.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    proxy.partition();
    wait_health(&node, a.id, Health::Down, 10.0).await;
    proxy.heal();
    wait_health(&node, a.id, Health::Up, 10.0).await;
    a.release();
    let o = within(15.0, "the receipt", r).await;
    match o {
        Ok(o) => assert_eq!(o.member, a.id),
        Err(e) => panic!("the late ack of the only attempt was ignored: {e}"),
    }
    each_once(&ib, 7..8);
}

/// A refresh that fails keeps the last known members and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_keeps_the_last_members_and_is_counted() {
    let ib = inbox();
    let a = replica(NodeId(10), ib.clone()).await;
    let node = sender().await;
    let m = Scripted {
        answers: Arc::new(Mutex::new(vec![
            Ok(vec![Member {
                id: a.id,
                addr: a.addr,
            }]),
            Err(std::io::Error::other("resolver down")),
            Err(std::io::Error::other("resolver down")),
        ])),
        last: vec![],
        every: Some(Duration::from_millis(100)),
    };
    let g = GroupSender::<u64>::new(node.clone(), GroupConfig::new(CH), m)
        .await
        .unwrap();
    within(3.0, "two failed refreshes", async {
        while g.stats().resolve_errors < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(g.members().len(), 1);
    let o = within(5.0, "send", async { g.send(&1).await.unwrap().await })
        .await
        .unwrap();
    assert_eq!(o.member, NodeId(10));
    assert_eq!(g.stats().members_removed, 0);
}
