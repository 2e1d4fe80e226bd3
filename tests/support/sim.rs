//! Deterministic simulation: sans-IO endpoints on a virtual clock, frames carried by a
//! simulated network that applies `mem`'s seeded fault decisions (loss, duplication,
//! delay, reordering) plus a partition window and a connection reset, and a simulated
//! application that processes each delivery for a while and then acks or nacks it.
//!
//! Everything is a function of the `SimConfig` (seed included): a failing proptest case
//! replays exactly.

#![allow(dead_code)]

use ackwire::dedup::{Dedup, DedupConfig};
use ackwire::proto::{Completion, DeliveryRef, Endpoint, Event, Outgoing, ProtoConfig, SendRef};
use ackwire::transport::mem::{FaultDecision, FaultInjector, FaultPlan};
use ackwire::wire::Frame;
use ackwire::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The receiving node.
pub const RECEIVER: NodeId = NodeId(100);
/// The channel every simulated message uses.
pub const CHANNEL: ChannelId = ChannelId(1);

/// One simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub guarantee: Guarantee,
    pub ordered: bool,
    /// Sending nodes (ids 1..=senders), all to [`RECEIVER`].
    pub senders: u64,
    /// Messages per sender.
    pub messages: u64,
    /// Virtual time between two sends of one sender.
    pub send_spacing: Duration,
    /// Faults applied to every link until `faults_until`.
    pub plan: FaultPlan,
    pub faults_until: Duration,
    /// Every frame on every link is dropped in `[start, end)`.
    pub partition: Option<(Duration, Duration)>,
    /// At this time every connection is reset (peer down, then up again).
    pub reset_at: Option<Duration>,
    /// Probability the application nacks a delivery instead of acking it.
    pub nack_prob: f64,
    /// Application processing time range.
    pub process: (Duration, Duration),
    pub proto: ProtoConfig,
    pub seed: u64,
    /// Messages carry an application idempotency key derived from (sender, index).
    pub keyed: bool,
    /// With `keyed`: the application re-sends a given-up message under its key (up to
    /// 3 times), as a caller retrying an idempotent request would.
    pub app_resend: bool,
    /// With `keyed`: probability the application sends a message twice at once.
    pub app_duplicate: f64,
    /// The receiving application takes at most this many deliveries at once; beyond
    /// it a delivery is refused before the application sees it
    /// ([`Completion::Refuse`], as a driver whose receiver is gone does).
    pub app_capacity: Option<u32>,
}

impl SimConfig {
    pub fn new(guarantee: Guarantee, seed: u64) -> Self {
        let mut proto = ProtoConfig::default();
        proto.max_in_flight = 32;
        proto.retry.deadline = Some(Duration::from_secs(20));
        SimConfig {
            guarantee,
            ordered: false,
            senders: 1,
            messages: 60,
            send_spacing: Duration::from_millis(1),
            plan: FaultPlan::new(seed),
            faults_until: Duration::from_secs(2),
            partition: None,
            reset_at: None,
            nack_prob: 0.0,
            process: (Duration::ZERO, Duration::from_millis(2)),
            proto,
            seed,
            keyed: false,
            app_resend: false,
            app_duplicate: 0.0,
            app_capacity: None,
        }
    }
}

/// What one message went through.
#[derive(Clone, Debug, Default)]
pub struct MsgRecord {
    /// Settled at the sender: `Some(Ok(t))` acked at `t`, `Some(Err(t))` given up at `t`.
    pub outcome: Option<Result<Duration, Duration>>,
    /// Times the handler was given the message.
    pub deliveries: u32,
    /// Times the handler finished it with an ack, and when.
    pub acks: Vec<Duration>,
    /// Times the handler nacked it.
    pub nacks: u32,
    /// Times a delivery started while another of the same message was still in progress.
    pub concurrent: u32,
    /// Data frames the sender transmitted for it.
    pub transmissions: u32,
    /// Sends of it not yet settled.
    pub pending_sends: u32,
    /// Sends of it made by the application.
    pub sends: u32,
}

/// One thing the receiving application saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A delivery of an index; `first` if it had never been delivered before.
    Deliver { index: u64, first: bool },
    /// The application nacked the index.
    Nack { index: u64 },
}

/// Everything observed in a run.
#[derive(Debug, Default)]
pub struct SimReport {
    /// Keyed by (sender, index).
    pub msgs: HashMap<(u64, u64), MsgRecord>,
    /// First-delivery order of each sender's indices at the receiver.
    pub first_delivery_order: HashMap<u64, Vec<u64>>,
    /// Stream seqs of each sender's first deliveries, in delivery order (an index sent
    /// again by the application travels under a later seq, so stream order is what
    /// ordered delivery promises).
    pub first_delivery_seqs: HashMap<u64, Vec<u64>>,
    /// What the receiving application saw of each sender, in order.
    pub timeline: HashMap<u64, Vec<Seen>>,
    /// Deliveries refused before the application saw them.
    pub refused: u64,
    pub retransmitted: u64,
    /// Virtual time when the run ended.
    pub ended: Duration,
    /// The run stopped because nothing was left to do (rather than hitting the limit).
    pub quiescent: bool,
}

impl SimReport {
    pub fn unresolved(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<_> = self
            .msgs
            .iter()
            .filter(|(_, r)| r.outcome.is_none())
            .map(|(k, _)| *k)
            .collect();
        v.sort();
        v
    }
}

#[derive(Debug)]
enum Action {
    Arrive {
        from: NodeId,
        to: NodeId,
        frame: Frame,
    },
    Finish {
        delivery: DeliveryRef,
        key: (u64, u64),
        how: Completion,
    },
    SendNext {
        sender: u64,
    },
    Resend {
        key: (u64, u64),
    },
    Reset,
}

struct Node {
    endpoint: Endpoint,
    window: u64,
    next_index: u64,
}

pub fn run(cfg: &SimConfig) -> SimReport {
    let start = Instant::now();
    let mut sim = Sim {
        cfg: cfg.clone(),
        start,
        now: start,
        queue: BinaryHeap::new(),
        actions: HashMap::new(),
        next_action: 0,
        nodes: HashMap::new(),
        injectors: HashMap::new(),
        rng: cfg.seed ^ 0x5eed,
        report: SimReport::default(),
        in_progress: HashMap::new(),
        seq_to_key: HashMap::new(),
    };
    sim.setup();
    sim.run_loop();
    sim.report.retransmitted = sim
        .nodes
        .values()
        .map(|n| n.endpoint.stats().retransmitted)
        .sum();
    sim.report.ended = sim.now - start;
    sim.report
}

struct Sim {
    cfg: SimConfig,
    start: Instant,
    now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    actions: HashMap<u64, Action>,
    next_action: u64,
    nodes: HashMap<NodeId, Node>,
    injectors: HashMap<(NodeId, NodeId), FaultInjector>,
    rng: u64,
    report: SimReport,
    in_progress: HashMap<(u64, u64), u32>,
    /// (sender, stream seq) → message key, for transmission counts.
    seq_to_key: HashMap<(u64, u64), (u64, u64)>,
}

impl Sim {
    fn setup(&mut self) {
        let mut ids: Vec<NodeId> = (1..=self.cfg.senders).map(NodeId).collect();
        ids.push(RECEIVER);
        for (i, id) in ids.iter().enumerate() {
            let origin = Origin {
                node: *id,
                incarnation: 1000 + i as u64,
            };
            let dedup = Arc::new(Dedup::open(DedupConfig::default()).expect("dedup"));
            let mut endpoint =
                Endpoint::new(origin, self.cfg.proto.clone(), dedup, self.cfg.seed ^ id.0);
            if *id == RECEIVER {
                endpoint.accept_channel(CHANNEL, self.cfg.ordered);
            }
            self.nodes.insert(
                *id,
                Node {
                    endpoint,
                    window: self.cfg.proto.max_in_flight as u64,
                    next_index: 0,
                },
            );
        }
        self.connect_all();
        for s in 1..=self.cfg.senders {
            for i in 0..self.cfg.messages {
                self.report.msgs.insert((s, i), MsgRecord::default());
            }
            self.schedule(Duration::ZERO, Action::SendNext { sender: s });
        }
        if let Some(t) = self.cfg.reset_at {
            self.schedule(t, Action::Reset);
        }
        for (from, to) in self.links() {
            self.injectors
                .insert((from, to), FaultInjector::new(&self.cfg.plan, from, to));
        }
    }

    fn links(&self) -> Vec<(NodeId, NodeId)> {
        let mut v = Vec::new();
        for s in 1..=self.cfg.senders {
            v.push((NodeId(s), RECEIVER));
            v.push((RECEIVER, NodeId(s)));
        }
        v
    }

    fn connect_all(&mut self) {
        let now = self.now;
        for (from, to) in self.links() {
            let origin = self.nodes[&to].endpoint.origin();
            self.nodes.get_mut(&from).unwrap().endpoint.handle_peer_up(
                now,
                origin,
                ackwire::wire::PROTOCOL_VERSION,
            );
        }
    }

    fn rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn rand_f64(&mut self) -> f64 {
        (self.rand() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn rand_between(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.rand() % (span + 1))
    }

    fn schedule(&mut self, after: Duration, action: Action) {
        let id = self.next_action;
        self.next_action += 1;
        self.actions.insert(id, action);
        self.queue.push(Reverse((self.now + after, id)));
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn limit(&self) -> Duration {
        let deadline = self
            .cfg
            .proto
            .retry
            .deadline
            .unwrap_or(Duration::from_secs(60));
        self.cfg.faults_until + deadline * 3 + Duration::from_secs(10)
    }

    fn all_resolved(&self) -> bool {
        self.report.msgs.values().all(|r| r.outcome.is_some()) && self.in_progress_total() == 0
    }

    fn in_progress_total(&self) -> u32 {
        self.in_progress.values().sum()
    }

    fn run_loop(&mut self) {
        loop {
            if self.all_resolved() {
                self.report.quiescent = true;
                return;
            }
            let next_action = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_timer = self
                .nodes
                .values()
                .filter_map(|n| n.endpoint.poll_timeout())
                .min();
            let next = match (next_action, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => {
                    self.report.quiescent = true;
                    return;
                }
            };
            if next > self.now {
                self.now = next;
            }
            if self.elapsed() > self.limit() {
                return;
            }
            while let Some(Reverse((t, id))) = self.queue.peek().copied() {
                if t > self.now {
                    break;
                }
                self.queue.pop();
                let action = self.actions.remove(&id).expect("action");
                self.apply(action);
            }
            let now = self.now;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in &ids {
                let n = self.nodes.get_mut(id).unwrap();
                if n.endpoint.poll_timeout().is_some_and(|t| t <= now) {
                    n.endpoint.handle_timeout(now);
                }
            }
            for id in ids {
                self.drain(id);
            }
        }
    }

    fn apply(&mut self, action: Action) {
        let now = self.now;
        match action {
            Action::Arrive { from, to, frame } => {
                self.nodes
                    .get_mut(&to)
                    .unwrap()
                    .endpoint
                    .handle_frame(now, from, frame);
                self.drain(to);
            }
            Action::Finish { delivery, key, how } => {
                let t = self.elapsed();
                let rec = self.report.msgs.get_mut(&key).unwrap();
                match how {
                    Completion::Ack => rec.acks.push(t),
                    _ => rec.nacks += 1,
                }
                if how == Completion::Nack {
                    self.report
                        .timeline
                        .entry(key.0)
                        .or_default()
                        .push(Seen::Nack { index: key.1 });
                }
                *self.in_progress.get_mut(&key).unwrap() -= 1;
                self.nodes
                    .get_mut(&RECEIVER)
                    .unwrap()
                    .endpoint
                    .complete(now, delivery, how);
                self.drain(RECEIVER);
            }
            Action::SendNext { sender } => self.try_send(sender),
            Action::Resend { key } => self.send_message(key),
            Action::Reset => {
                for (from, to) in self.links() {
                    self.nodes
                        .get_mut(&from)
                        .unwrap()
                        .endpoint
                        .handle_peer_down(now, to);
                }
                self.connect_all();
                let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                for id in ids {
                    self.drain(id);
                }
            }
        }
    }

    fn try_send(&mut self, sender: u64) {
        let now = self.now;
        let g = self.cfg.guarantee;
        let n = self.nodes.get_mut(&NodeId(sender)).unwrap();
        if n.next_index >= self.cfg.messages || n.window == 0 {
            return; // resumed by WindowOpened
        }
        let index = n.next_index;
        n.next_index += 1;
        let _ = (now, g);
        self.send_message((sender, index));
        if self.cfg.keyed && self.rand_f64() < self.cfg.app_duplicate {
            self.send_message((sender, index));
        }
        let spacing = self.cfg.send_spacing;
        self.schedule(spacing, Action::SendNext { sender });
    }

    /// One send of message `key` (a first send, an app duplicate or an app re-send).
    /// Waits for window space like `Sender::send` does.
    fn send_message(&mut self, key: (u64, u64)) {
        let now = self.now;
        let (sender, index) = key;
        let g = self.cfg.guarantee;
        let keyed = self.cfg.keyed;
        let n = self.nodes.get_mut(&NodeId(sender)).unwrap();
        if n.window == 0 {
            self.schedule(Duration::from_millis(1), Action::Resend { key });
            return;
        }
        n.window -= 1;
        let mut payload = Vec::with_capacity(16);
        payload.extend_from_slice(&sender.to_le_bytes());
        payload.extend_from_slice(&index.to_le_bytes());
        let id_key = keyed.then_some(IdKey(((sender as u128) << 64) | index as u128));
        let r = n
            .endpoint
            .send(
                now,
                Outgoing {
                    peer: RECEIVER,
                    channel: CHANNEL,
                    guarantee: g,
                    schema: 0,
                    payload: Bytes::from(payload),
                    id: id_key.map(MessageId::Key),
                    deadline: None,
                },
            )
            .expect("send");
        self.seq_to_key.insert((sender, r.seq), key);
        let rec = self.report.msgs.get_mut(&key).unwrap();
        rec.pending_sends += 1;
        rec.sends += 1;
        self.drain(NodeId(sender));
    }

    fn drain(&mut self, id: NodeId) {
        let now = self.now;
        loop {
            let Some((to, frame)) = self.nodes.get_mut(&id).unwrap().endpoint.poll_transmit(now)
            else {
                break;
            };
            if let Frame::Data(d) = &frame {
                if id != RECEIVER {
                    if let Some(key) = self.seq_to_key.get(&(id.0, d.seq)) {
                        self.report.msgs.get_mut(key).unwrap().transmissions += 1;
                    }
                }
            }
            self.transmit(id, to, frame);
        }
        while let Some(ev) = self.nodes.get_mut(&id).unwrap().endpoint.poll_event() {
            self.on_event(id, ev);
        }
    }

    fn transmit(&mut self, from: NodeId, to: NodeId, frame: Frame) {
        let t = self.elapsed();
        if let Some((a, b)) = self.cfg.partition {
            if t >= a && t < b {
                return;
            }
        }
        let decision = if t < self.cfg.faults_until {
            self.injectors.get_mut(&(from, to)).unwrap().decide()
        } else {
            FaultDecision::Deliver {
                copies: 1,
                delay: Duration::from_micros(50),
            }
        };
        match decision {
            FaultDecision::Drop => {}
            FaultDecision::Deliver { copies, delay } => {
                for c in 0..copies {
                    let extra = Duration::from_micros(c as u64 * 7);
                    self.schedule(
                        delay + extra,
                        Action::Arrive {
                            from,
                            to,
                            frame: frame.clone(),
                        },
                    );
                }
            }
        }
    }

    fn on_event(&mut self, id: NodeId, ev: Event) {
        let t = self.elapsed();
        match ev {
            Event::Deliver { delivery, payload } => {
                let sender = u64::from_le_bytes(payload[0..8].try_into().unwrap());
                let index = u64::from_le_bytes(payload[8..16].try_into().unwrap());
                let key = (sender, index);
                if self
                    .cfg
                    .app_capacity
                    .is_some_and(|cap| self.in_progress_total() >= cap)
                {
                    // Refused before the application saw it.
                    self.report.refused += 1;
                    self.nodes.get_mut(&id).unwrap().endpoint.complete(
                        self.now,
                        delivery,
                        Completion::Refuse,
                    );
                    return;
                }
                let rec = self.report.msgs.get_mut(&key).unwrap();
                let first = rec.deliveries == 0;
                if first {
                    self.report
                        .first_delivery_order
                        .entry(sender)
                        .or_default()
                        .push(index);
                    self.report
                        .first_delivery_seqs
                        .entry(sender)
                        .or_default()
                        .push(delivery.seq);
                }
                self.report
                    .timeline
                    .entry(sender)
                    .or_default()
                    .push(Seen::Deliver { index, first });
                let rec = self.report.msgs.get_mut(&key).unwrap();
                rec.deliveries += 1;
                let busy = self.in_progress.entry(key).or_insert(0);
                if *busy > 0 {
                    rec.concurrent += 1;
                }
                *busy += 1;
                // At-most-once deliveries are finished too (that frees credit), never
                // nacked: there is no redelivery to ask for.
                let amo = delivery.guarantee == Guarantee::AtMostOnce;
                let how = if !amo && self.rand_f64() < self.cfg.nack_prob {
                    Completion::Nack
                } else {
                    Completion::Ack
                };
                let (lo, hi) = self.cfg.process;
                let d = self.rand_between(lo, hi);
                self.schedule(d, Action::Finish { delivery, key, how });
            }
            Event::Settled(SendRef { seq, .. }) => {
                let key = self.seq_to_key[&(id.0, seq)];
                let rec = self.report.msgs.get_mut(&key).unwrap();
                rec.pending_sends -= 1;
                if !matches!(rec.outcome, Some(Ok(_))) {
                    rec.outcome = Some(Ok(t));
                }
            }
            Event::GaveUp { send, .. } => {
                let key = self.seq_to_key[&(id.0, send.seq)];
                let resend = self.cfg.keyed && self.cfg.app_resend;
                let rec = self.report.msgs.get_mut(&key).unwrap();
                rec.pending_sends -= 1;
                if resend && rec.sends < 4 && !matches!(rec.outcome, Some(Ok(_))) {
                    self.schedule(Duration::from_millis(1), Action::Resend { key });
                } else if rec.pending_sends == 0 && rec.outcome.is_none() {
                    rec.outcome = Some(Err(t));
                }
            }
            Event::WindowOpened { n, .. } => {
                let node = self.nodes.get_mut(&id).unwrap();
                let was_closed = node.window == 0;
                node.window += n;
                if was_closed {
                    self.schedule(Duration::ZERO, Action::SendNext { sender: id.0 });
                }
            }
            _ => {}
        }
    }
}
