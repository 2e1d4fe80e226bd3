//! Replica groups: one logical receiver served by several nodes.
//!
//! A [`GroupSender`] sends to a *group* of nodes that serve one logical receiver —
//! typically several replicas of a service that share one inbox database
//! (`ackwire-inbox` on PostgreSQL). Each message goes to one live member, chosen by
//! [`Spread`]: by key affinity (rendezvous hashing of the message's [`IdKey`] over the
//! live members) or round-robin. When the member holding a message goes Down (the
//! failure detector, [`Node::health`]), leaves the membership, or its receipt fails
//! in a way another member could fix (no ack before its deadline, or a refusal such
//! as no receiver on the channel or a full key table: [`GroupSendError::Failed`]
//! lists the refusals that are final), the message is **re-sent to another member
//! under the same [`MessageId`](crate::MessageId)** instead of waiting for the first
//! one to return.
//!
//! # Exactly-once in effect, and where it runs out
//!
//! Every group message carries an [`IdKey`] (the caller's, or a fresh one kept for its
//! re-sends: a random 64-bit prefix per group sender, then a counter), so its
//! `MessageId` is `MessageId::Key(key)` whichever member receives it. A re-routed
//! message can therefore be processed by two members (the first one may have
//! committed its effect and lost only the ack). Each member's
//! in-memory dedup does not see the other's deliveries; what makes the pair safe is a
//! dedup record shared by the members: `ackwire-inbox`'s claim on the shared database
//! (the second claim is a `Duplicate`). So:
//!
//! * with a shared inbox, each message's effect is applied exactly once (within the
//!   inbox's retention), however often it is re-routed;
//! * without one, a group is at-least-once across members (each member still dedups
//!   its own repeats);
//! * order is not kept across members, nor across a re-route;
//! * a failed group receipt ([`GroupSendError`]) means "not known to be processed":
//!   an attempt may still land (a partitioned member that comes back). Resend under
//!   [`GroupSendError::key`] to make the retry safe.
//!
//! # Re-routing, not hints
//!
//! The group never hands a message off as a hint: it moves it to a live member. A
//! message is sent at most [`GroupConfig::max_attempts`] times in all; when no member
//! is live (all Down, or the membership is empty) a send waits up to
//! [`GroupConfig::member_wait`] for one and then fails with
//! [`GroupSendError::NoLiveMember`] — a typed error, never a silent drop, and no
//! fallback to hints.
//!
//! The sending node's own settings still apply to each attempt. Give group traffic a
//! node **without hinted handoff** (the default, [`NodeConfig::handoff`] `None`): with
//! handoff on, a member that goes Down has its unacknowledged messages stored as hints
//! (their receipts say [`Outcome::HandedOff`]); the group treats that as "not
//! delivered" and re-routes, and the hint is *also* replayed to the member when it
//! returns. With a shared inbox that replay is a duplicate and is dropped, so it is
//! still exactly-once in effect, but it is wasted work (and without a shared inbox it
//! is a second processing). Without handoff, an attempt left with a Down member keeps
//! retrying until its deadline (default 30 s) and a late ack from it also counts.
//!
//! # Membership and identity
//!
//! Members come from a [`Membership`]: a fixed list ([`StaticMembers`]) or DNS
//! names resolved periodically ([`DnsMembers`], every 10 s by default), so replicas
//! can come and go; a custom source implements the trait. A member that appears is
//! added to the node ([`Node::add_peer`]) and receives traffic; one that disappears
//! gets no new messages and its unacknowledged ones are re-routed. The node itself
//! keeps knowing a departed member (its failure detector watches it and the transport
//! redials it with backoff): a node has no way to forget a peer short of
//! [`Node::decommission`], which would also drop that peer's hints of other traffic.
//!
//! DNS answers addresses, not identities. This crate's rule is that a node's identity
//! is what its connection proves (the handshake, and with TLS the certificate), never
//! what a frame or a directory claims. So a [`DnsMembers`] entry pairs the [`NodeId`]
//! the application expects with the name *where* it is (one name per replica, as a
//! Kubernetes StatefulSet behind a headless service gives `ledger-0.ledger`,
//! `ledger-1.ledger`, …). DNS moves a member (a rescheduled pod gets a new address);
//! the connection still has to prove the id: a node at that address that turns out to
//! be someone else fails the handshake (counted in `rejected_wrong_peer`, or
//! `rejected_identity_mismatch` with TLS), stays Down, and its messages go elsewhere.
//! A single service name listing every replica's address is not used on its own: it
//! would say where replicas are but not which id to demand at each address.
//!
//! # Example
//!
//! ```no_run
//! use ackwire::group::{GroupConfig, GroupSender, Spread, StaticMembers};
//! use ackwire::{ChannelId, IdKey, Node, NodeId};
//! use std::sync::Arc;
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Arc::new(Node::builder(NodeId(1)).bind("127.0.0.1:0".parse()?).build().await?);
//! let replicas = StaticMembers::new([
//!     (NodeId(10), "10.0.0.10:7000".parse()?),
//!     (NodeId(11), "10.0.0.11:7000".parse()?),
//!     (NodeId(12), "10.0.0.12:7000".parse()?),
//! ])?;
//! let mut config = GroupConfig::new(ChannelId(1)); // effectively-once
//! config.spread = Spread::Affinity; // the same key goes to the same live replica
//! let ledger = GroupSender::<(String, i64)>::new(node, config, replicas).await?;
//!
//! // Each order's key: a re-send after a crash or a re-route is the same message.
//! let receipt = ledger.send_with_key(&("alice".into(), 1999), IdKey(42)).await?;
//! let done = receipt.await?; // acked by some replica, after its handler finished
//! println!("processed by {} after {} attempt(s)", done.member, done.attempts);
//! # Ok(()) }
//! ```
//!
//! With DNS instead: `DnsMembers::new([(NodeId(10), "ledger-0.ledger:7000"), …])?`,
//! optionally `.refresh_every(Duration::from_secs(5))?`.
//!
//! # Observability
//!
//! [`GroupSender::stats`] counts sends, acks, re-routes and each way of giving up.
//! Re-routes are logged at debug level and give-ups at warn, on the tracing target
//! `ackwire::group`; membership changes at info.
//!
//! [`NodeConfig::handoff`]: crate::NodeConfig::handoff

use crate::detector::{Health, HealthChange};
use crate::id::{ChannelId, Guarantee, IdKey, NodeId};
use crate::node::{ChannelOptions, Node, NodeError, Outcome, RawSender, Receipt, SendError};
use crate::wire::RejectReason;
use crate::ConfigError;
use bytes::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;

/// The tracing target of the group's re-route, give-up and membership events.
pub const GROUP_TARGET: &str = "ackwire::group";

// ------------------------------------------------------------------ configuration

/// How a group spreads messages over its live members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Spread {
    /// By key: rendezvous (highest-random-weight) hashing of the message's [`IdKey`]
    /// over the live members, so one key always goes to the same member while the
    /// membership and its health stay the same, and a member that leaves moves only
    /// its own keys (to their next choice). The default.
    #[default]
    Affinity,
    /// Each new message to the next live member in turn (by [`NodeId`] order).
    RoundRobin,
}

/// Settings of a [`GroupSender`]. Every default is written on its field.
///
/// Serde: `channel` is required, the other fields default; durations are strings such
/// as `"10s"` (as in every config type of this crate).
///
/// ```
/// # use ackwire::group::{GroupConfig, Spread};
/// let c: GroupConfig = toml::from_str(r#"
///     spread = "RoundRobin"
///     member_wait = "30s"
///     [channel]
///     channel = 7
///     guarantee = "EffectivelyOnce"
/// "#).unwrap();
/// assert_eq!(c.spread, Spread::RoundRobin);
/// assert_eq!(c.max_attempts, 8);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupConfig {
    /// The channel and its guarantee on every member, and the per-attempt deadline.
    /// Default: [`Guarantee::EffectivelyOnce`], the node's retry deadline. At-most-once
    /// is refused: a group re-sends.
    pub channel: ChannelOptions,
    /// How messages are spread. Default [`Spread::Affinity`].
    #[serde(default)]
    pub spread: Spread,
    /// Sends of one message in all (the first one plus re-routes) before its receipt
    /// fails with [`GroupSendError::AttemptsExhausted`] — once the attempts still
    /// running have ended too (each by its deadline): the first ack from any attempt
    /// settles the message. Default `8`; `1..=1000`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// How long a message waits for a live member when none is (all Down, or no
    /// members), before failing with [`GroupSendError::NoLiveMember`]. Default 10 s;
    /// at most 1 hour; zero fails at once.
    #[serde(
        default = "default_member_wait",
        with = "crate::config_serde::duration"
    )]
    pub member_wait: Duration,
}

fn default_max_attempts() -> u32 {
    8
}

fn default_member_wait() -> Duration {
    Duration::from_secs(10)
}

impl GroupConfig {
    /// Largest accepted [`max_attempts`](Self::max_attempts).
    pub const MAX_ATTEMPTS: u32 = 1000;
    /// Longest accepted [`member_wait`](Self::member_wait): 1 hour.
    pub const MAX_MEMBER_WAIT: Duration = Duration::from_secs(3600);

    /// Defaults, on `channel`.
    pub fn new(channel: ChannelId) -> Self {
        GroupConfig {
            channel: ChannelOptions::new(channel, Guarantee::EffectivelyOnce),
            spread: Spread::Affinity,
            max_attempts: default_max_attempts(),
            member_wait: default_member_wait(),
        }
    }

    /// Check every value: the guarantee is not at-most-once, a channel deadline (if
    /// any) is positive, `max_attempts` in `1..=1000`, `member_wait <= 1 h`.
    pub fn validate(&self) -> Result<(), GroupError> {
        use crate::error::check::{count, duration};
        if self.channel.guarantee == Guarantee::AtMostOnce {
            return Err(GroupError::AtMostOnce);
        }
        if let Some(d) = self.channel.deadline {
            duration(
                "group.channel.deadline",
                d,
                Duration::from_nanos(1),
                Duration::MAX,
            )?;
        }
        count(
            "group.max_attempts",
            u64::from(self.max_attempts),
            1,
            u64::from(Self::MAX_ATTEMPTS),
        )?;
        duration(
            "group.member_wait",
            self.member_wait,
            Duration::ZERO,
            Self::MAX_MEMBER_WAIT,
        )?;
        Ok(())
    }
}

/// Why a group could not be set up. None is transient except `Resolve`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// A [`GroupConfig`] or membership value is out of range; the error names it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The channel is at-most-once; a group re-sends, so use at-least-once or (for
    /// dedup by key) effectively-once.
    #[error(
        "a replica group needs an at-least-once or effectively-once channel, not at-most-once"
    )]
    AtMostOnce,
    /// A membership list without members.
    #[error("a replica group needs at least one member")]
    NoMembers,
    /// The same [`NodeId`] is listed twice.
    #[error("member {0} is listed twice")]
    DuplicateMember(NodeId),
    /// A member's DNS name is not `host:port`.
    #[error("member {id}: {name:?} is not host:port")]
    BadName {
        /// The member.
        id: NodeId,
        /// The name given.
        name: String,
    },
    /// The first resolution of the membership failed (e.g. no DNS name resolves):
    /// check the names. Later failures keep the last known members and are counted.
    #[error("resolving the group's members: {0}")]
    Resolve(#[source] std::io::Error),
    /// The node refused (it has shut down or failed).
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Why a group message failed. Each variant carries the message's key: resend under
/// it to make a retry safe (an earlier attempt may still land).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupSendError {
    /// No member was live (all Down, or none listed) for [`GroupConfig::member_wait`].
    /// The message is not stored anywhere by the group; an attempt made before the
    /// members went down may still have been processed.
    #[error("no live member for {}", crate::MessageId::Key(*key))]
    NoLiveMember {
        /// The message's key.
        key: IdKey,
        /// Sends made.
        attempts: u32,
    },
    /// [`GroupConfig::max_attempts`] sends were made and every one ended without an
    /// ack; `last` is the last attempt's error (`None`: it was handed off as a hint by
    /// the sending node).
    #[error("no ack after {attempts} sends of {} (last: {last:?})", crate::MessageId::Key(*key))]
    AttemptsExhausted {
        /// The message's key.
        key: IdKey,
        /// Sends made.
        attempts: u32,
        /// The last attempt's error.
        last: Option<SendError>,
    },
    /// A failure another member would not fix: the payload cannot be encoded or is too
    /// large ([`SendError::Encode`], [`SendError::TooLarge`]), the sending node shut
    /// down or failed, the channel's guarantee clashes with the node's stream
    /// ([`SendError::GuaranteeMismatch`]), or a member refused the message for good
    /// with one of exactly these [`RejectReason`]s: `Unauthorized`, `Undecodable`,
    /// `TypeMismatch`, `DeadLettered`.
    ///
    /// Every other refusal is re-routed, since another member (or the same one
    /// later) may take it: `NoReceiver` and `KeyTableFull` (that member's key table
    /// is at its budget; both refused before processing), `StreamRetired` (not sent
    /// for group messages, whose keyed ids belong to no stream), and a reason this
    /// build does not know ([`RejectReason::Other`], from a newer member: re-routed as
    /// a refusal that may pass elsewhere; the receiver's key dedup still answers a
    /// copy of a message a member processed). Re-routes go to members not tried yet first; if every member keeps
    /// refusing, the message fails with [`GroupSendError::AttemptsExhausted`] after
    /// [`GroupConfig::max_attempts`] sends, its `last` error carrying the refusal.
    #[error("{} failed{}: {error}", crate::MessageId::Key(*key), member.map(|m| format!(" at {m}")).unwrap_or_default())]
    Failed {
        /// The message's key.
        key: IdKey,
        /// The member that refused it, if it got that far.
        member: Option<NodeId>,
        /// What went wrong.
        error: SendError,
    },
}

impl GroupSendError {
    /// The message's key (its `MessageId` is `MessageId::Key(key)`).
    pub fn key(&self) -> IdKey {
        match self {
            GroupSendError::NoLiveMember { key, .. }
            | GroupSendError::AttemptsExhausted { key, .. }
            | GroupSendError::Failed { key, .. } => *key,
        }
    }
}

/// How a group message settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupOutcome {
    /// The message's key.
    pub key: IdKey,
    /// The member whose ack settled it.
    pub member: NodeId,
    /// Sends made (1 unless it was re-routed).
    pub attempts: u32,
}

/// Counters of a [`GroupSender`] (since it was built).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// Messages accepted by `send` / `send_with_key`.
    pub messages: u64,
    /// Sends to members, first ones and re-routes.
    pub attempts: u64,
    /// Messages acked.
    pub acked: u64,
    /// Re-sends to another (or the same) member after the previous one went Down,
    /// left, failed or handed off.
    pub rerouted: u64,
    /// Messages failed with [`GroupSendError::NoLiveMember`].
    pub no_live_member: u64,
    /// Messages failed with [`GroupSendError::AttemptsExhausted`].
    pub attempts_exhausted: u64,
    /// Messages failed with [`GroupSendError::Failed`].
    pub failed: u64,
    /// Members added (including the first ones).
    pub members_added: u64,
    /// Members that left the membership.
    pub members_removed: u64,
    /// Members whose address changed.
    pub members_moved: u64,
    /// Membership resolutions that failed (the last known members were kept).
    pub resolve_errors: u64,
}

// ------------------------------------------------------------------ membership

/// One member of a group: its identity and where to reach it (ignored by transports
/// that dial by id, such as the in-memory one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    /// The identity its connection must prove.
    pub id: NodeId,
    /// Its address.
    pub addr: SocketAddr,
}

/// Where a group's members come from.
///
/// The group asks [`members`](Self::members) once when it is built (an error then
/// fails [`GroupSender::new`]) and again every [`refresh_every`](Self::refresh_every)
/// (an error then keeps the last known members, counted in
/// [`GroupStats::resolve_errors`]). The answer is the whole membership: ids not in it
/// any more leave the group. A `NodeId` listed twice counts once (the first entry).
pub trait Membership: Send + 'static {
    /// The members now.
    fn members(&mut self) -> impl Future<Output = std::io::Result<Vec<Member>>> + Send;
    /// How often to ask again; `None`: never (a fixed list).
    fn refresh_every(&self) -> Option<Duration>;
}

/// A fixed list of members.
#[derive(Clone, Debug)]
pub struct StaticMembers {
    members: Vec<Member>,
}

impl StaticMembers {
    /// These members. Fails with [`GroupError::NoMembers`] for an empty list and
    /// [`GroupError::DuplicateMember`] for an id listed twice.
    pub fn new(
        members: impl IntoIterator<Item = (NodeId, SocketAddr)>,
    ) -> Result<Self, GroupError> {
        let members: Vec<Member> = members
            .into_iter()
            .map(|(id, addr)| Member { id, addr })
            .collect();
        check_ids(members.iter().map(|m| m.id))?;
        Ok(StaticMembers { members })
    }
}

impl Membership for StaticMembers {
    async fn members(&mut self) -> std::io::Result<Vec<Member>> {
        Ok(self.members.clone())
    }
    fn refresh_every(&self) -> Option<Duration> {
        None
    }
}

/// Members found through DNS: each member's expected [`NodeId`] with the name where it
/// is (`host:port`), resolved with the system resolver (`tokio::net::lookup_host`)
/// every [`DEFAULT_REFRESH`](Self::DEFAULT_REFRESH) (10 s) or as set.
///
/// A member whose name does not resolve is absent (it leaves the group until its name
/// resolves again); if *no* name resolves the resolution counts as failed and the
/// last known members are kept (a resolver outage does not empty the group). A name
/// with several addresses uses the first IPv4 one (else the first). See the [module
/// docs](self) for why identities are given, not discovered.
#[derive(Clone, Debug)]
pub struct DnsMembers {
    names: Vec<(NodeId, String)>,
    every: Duration,
}

impl DnsMembers {
    /// Default re-resolution period: 10 s (a new replica gets traffic within about
    /// that; a departed one stops getting new messages once its name stops resolving
    /// or, sooner, once the failure detector holds it Down).
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(10);
    /// Shortest accepted period: 100 ms.
    pub const MIN_REFRESH: Duration = Duration::from_millis(100);
    /// Longest accepted period: 1 hour.
    pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
    /// How long one name's lookup may take before it counts as not resolving: 5 s.
    pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

    /// Members `(id, "host:port")`. Fails for an empty list, an id listed twice, or a
    /// name that is not `host:port` with a numeric port.
    pub fn new<S: Into<String>>(
        members: impl IntoIterator<Item = (NodeId, S)>,
    ) -> Result<Self, GroupError> {
        let names: Vec<(NodeId, String)> =
            members.into_iter().map(|(id, s)| (id, s.into())).collect();
        check_ids(names.iter().map(|(id, _)| *id))?;
        for (id, name) in &names {
            let ok = name
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(GroupError::BadName {
                    id: *id,
                    name: name.clone(),
                });
            }
        }
        Ok(DnsMembers {
            names,
            every: Self::DEFAULT_REFRESH,
        })
    }

    /// Re-resolve every `every` (in `[100 ms, 1 h]`).
    pub fn refresh_every(mut self, every: Duration) -> Result<Self, GroupError> {
        crate::error::check::duration(
            "group.dns.refresh_every",
            every,
            Self::MIN_REFRESH,
            Self::MAX_REFRESH,
        )?;
        self.every = every;
        Ok(self)
    }
}

impl Membership for DnsMembers {
    async fn members(&mut self) -> std::io::Result<Vec<Member>> {
        let mut out = Vec::with_capacity(self.names.len());
        let mut last_err = None;
        for (id, name) in &self.names {
            let lookup =
                tokio::time::timeout(Self::LOOKUP_TIMEOUT, tokio::net::lookup_host(name.as_str()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("{name}: no answer within {:?}", Self::LOOKUP_TIMEOUT),
                        ))
                    });
            match lookup {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    let pick = addrs
                        .iter()
                        .find(|a| a.is_ipv4())
                        .or_else(|| addrs.first())
                        .copied();
                    match pick {
                        Some(addr) => out.push(Member { id: *id, addr }),
                        None => {
                            last_err = Some(std::io::Error::other(format!("{name}: no address")))
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(target: GROUP_TARGET, member = %id, %name, error = %e, "member name does not resolve");
                    last_err = Some(e);
                }
            }
        }
        match (out.is_empty(), last_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }
    fn refresh_every(&self) -> Option<Duration> {
        Some(self.every)
    }
}

fn check_ids(ids: impl Iterator<Item = NodeId>) -> Result<(), GroupError> {
    let mut seen = std::collections::BTreeSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(GroupError::DuplicateMember(id));
        }
    }
    if seen.is_empty() {
        return Err(GroupError::NoMembers);
    }
    Ok(())
}

// ------------------------------------------------------------------ the sender

/// Sends `T` values to a replica group; see the [module docs](self). Cheap to clone.
///
/// Values are encoded as [`Sender`](crate::Sender) encodes them (the default
/// [`Bincode`](crate::codec::Bincode) codec) and carry the same payload type
/// fingerprint: a member whose typed receiver takes another type refuses them as
/// `TypeMismatch`, which fails the message (typed, [`GroupSendError::Failed`]) instead
/// of handing it a payload it would misread. [`RawGroupSender`] sends unchecked bytes.
#[derive(Debug)]
pub struct GroupSender<T> {
    raw: RawGroupSender,
    _t: PhantomData<fn(&T)>,
}

impl<T> Clone for GroupSender<T> {
    fn clone(&self) -> Self {
        GroupSender {
            raw: self.raw.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: Serialize> GroupSender<T> {
    /// A group sender on `node` (held until every clone and every unsettled message
    /// is gone), with `config` and members from `membership`, resolved once now.
    /// Must run inside a tokio runtime.
    ///
    /// Fails with [`GroupError::Config`] / [`GroupError::AtMostOnce`] for a bad config,
    /// [`GroupError::Resolve`] when the first resolution fails, and
    /// [`GroupError::Node`] when the node has stopped.
    pub async fn new<M: Membership>(
        node: Arc<Node>,
        config: GroupConfig,
        membership: M,
    ) -> Result<Self, GroupError> {
        let schema = crate::codec::fingerprint::<T, crate::codec::Bincode>();
        Ok(GroupSender {
            raw: RawGroupSender::build(node, config, membership, schema).await?,
            _t: PhantomData,
        })
    }

    /// Send `value` under a fresh key (a random 64-bit prefix drawn when the group
    /// sender was built, then a counter: unique within the run, unrelated across runs),
    /// kept for its re-sends and given in the receipt ([`GroupReceipt::key`]). Waits until the first attempt is accepted by a live member's window;
    /// see [`RawGroupSender::send_with_key`].
    pub async fn send(&self, value: &T) -> Result<GroupReceipt, GroupSendError> {
        let key = self.raw.next_key();
        self.send_with_key(value, key).await
    }

    /// Send `value` under `key`: every attempt, to whichever member, is the message
    /// `MessageId::Key(key)`.
    pub async fn send_with_key(
        &self,
        value: &T,
        key: IdKey,
    ) -> Result<GroupReceipt, GroupSendError> {
        let payload = crate::codec::Encode::<T>::encode(&crate::codec::Bincode, value)
            .map(Bytes::from)
            .map_err(|e| {
                // A message, failed: the counters add up (messages = acked + the
                // failures). (Regression: only `failed` was counted.)
                self.raw
                    .inner
                    .stats
                    .messages
                    .fetch_add(1, Ordering::Relaxed);
                self.raw.inner.stats.failed.fetch_add(1, Ordering::Relaxed);
                GroupSendError::Failed {
                    key,
                    member: None,
                    error: SendError::Encode(Arc::new(e)),
                }
            })?;
        self.raw.send_with_key(payload, key).await
    }
}

impl<T> GroupSender<T> {
    /// The underlying raw sender (its sends carry this sender's type fingerprint).
    pub fn raw(&self) -> &RawGroupSender {
        &self.raw
    }

    /// Counters.
    pub fn stats(&self) -> GroupStats {
        self.raw.stats()
    }

    /// The current members and the failure detector's view of each (`None`: not
    /// heard from yet), by id.
    pub fn members(&self) -> Vec<(Member, Option<Health>)> {
        self.raw.members()
    }
}

/// Sends raw payloads to a replica group; see [`GroupSender`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RawGroupSender {
    inner: Arc<Inner>,
}

/// Resolves when a group message settles: acked by some member, or failed.
#[derive(Debug)]
#[must_use = "a receipt tells whether the message was acknowledged"]
pub struct GroupReceipt {
    key: IdKey,
    rx: oneshot::Receiver<Result<GroupOutcome, GroupSendError>>,
}

impl GroupReceipt {
    /// The message's key.
    pub fn key(&self) -> IdKey {
        self.key
    }
}

impl Future for GroupReceipt {
    type Output = Result<GroupOutcome, GroupSendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.key;
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or(Err(GroupSendError::Failed {
                key,
                member: None,
                error: SendError::Shutdown,
            }))
        })
    }
}

#[derive(Debug)]
struct Inner {
    node: Arc<Node>,
    config: GroupConfig,
    members: Mutex<BTreeMap<NodeId, (SocketAddr, RawSender)>>,
    /// Bumped on every membership or member health change.
    changes: watch::Sender<u64>,
    /// The runtime the group sender was built on (`new` must run inside one): a send
    /// made outside any runtime (a plain thread's `futures::executor::block_on`, as a
    /// node's `Sender` allows) runs its re-route task and its `member_wait` timer here.
    runtime: tokio::runtime::Handle,
    rr: AtomicU64,
    key_prefix: u64,
    key_seq: AtomicU64,
    /// Payload type fingerprint of every member's sender (0 for a raw group sender).
    schema: u32,
    stats: Counters,
    /// Dropped with the last handle: ends the maintenance task.
    _stop: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct Counters {
    messages: AtomicU64,
    attempts: AtomicU64,
    acked: AtomicU64,
    rerouted: AtomicU64,
    no_live_member: AtomicU64,
    attempts_exhausted: AtomicU64,
    failed: AtomicU64,
    members_added: AtomicU64,
    members_removed: AtomicU64,
    members_moved: AtomicU64,
    resolve_errors: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl RawGroupSender {
    /// See [`GroupSender::new`].
    pub async fn new<M: Membership>(
        node: Arc<Node>,
        config: GroupConfig,
        membership: M,
    ) -> Result<Self, GroupError> {
        Self::build(node, config, membership, 0).await
    }

    /// [`new`](Self::new) with the payload type fingerprint `schema` on every member's
    /// sender (0: unchecked).
    async fn build<M: Membership>(
        node: Arc<Node>,
        config: GroupConfig,
        mut membership: M,
        schema: u32,
    ) -> Result<Self, GroupError> {
        config.validate()?;
        if let Some(every) = membership.refresh_every() {
            crate::error::check::duration(
                "group.membership.refresh_every",
                every,
                Duration::from_millis(1),
                Duration::MAX,
            )?;
        }
        // Subscribed before the first members are added: no transition is missed.
        let health = node.health_events();
        let first = membership.members().await.map_err(GroupError::Resolve)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let inner = Arc::new(Inner {
            node,
            config,
            members: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            runtime: tokio::runtime::Handle::current(),
            rr: AtomicU64::new(0),
            key_prefix: crate::rng::seed_from_entropy(),
            key_seq: AtomicU64::new(0),
            schema,
            stats: Counters::default(),
            _stop: stop_tx,
        });
        inner.apply(first)?;
        tokio::spawn(maintain(
            Arc::downgrade(&inner),
            membership,
            health,
            stop_rx,
        ));
        Ok(RawGroupSender { inner })
    }

    /// A fresh key: a random 64-bit prefix per group sender and a counter.
    fn next_key(&self) -> IdKey {
        let seq = self.inner.key_seq.fetch_add(1, Ordering::Relaxed);
        IdKey((u128::from(self.inner.key_prefix) << 64) | u128::from(seq))
    }

    /// Send `payload` under a fresh key; see [`GroupSender::send`].
    pub async fn send(&self, payload: Bytes) -> Result<GroupReceipt, GroupSendError> {
        let key = self.next_key();
        self.send_with_key(payload, key).await
    }

    /// Send `payload` under `key`. Waits until the first attempt is accepted by a live
    /// member (for window room, and up to [`GroupConfig::member_wait`] for a live
    /// member); the returned receipt follows the message through its re-routes.
    ///
    /// Fails at once with [`GroupSendError::NoLiveMember`] when no member became live
    /// in time, and with [`GroupSendError::Failed`] for a payload no member can take
    /// (too large) or a node that has shut down.
    pub async fn send_with_key(
        &self,
        payload: Bytes,
        key: IdKey,
    ) -> Result<GroupReceipt, GroupSendError> {
        let inner = &self.inner;
        // Counted once `place` has an answer: a send cancelled while it waits (for
        // window room or a live member) was never accepted. (Regression: it was
        // counted in `messages` and `attempts`, so they no longer added up to the
        // outcomes.)
        let mut flight = Flight {
            key,
            payload,
            attempts: 0,
            tried: Vec::new(),
            outstanding: Vec::new(),
            current: None,
            last: None,
        };
        let mut changes = inner.changes.subscribe();
        let placed = inner.place(&mut flight, &mut changes).await;
        inc(&inner.stats.messages);
        match placed {
            Err(e) => {
                inner.count_failure(&e);
                return Err(e);
            }
            // (Nothing was outstanding before the first attempt: cannot happen.)
            Ok(Some(_)) => {}
            Ok(None) => {}
        }
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            let res = inner.drive(flight, changes).await;
            match &res {
                Ok(_) => inc(&inner.stats.acked),
                Err(e) => inner.count_failure(e),
            }
            let _ = tx.send(res);
        });
        Ok(GroupReceipt { key, rx })
    }

    /// Counters.
    pub fn stats(&self) -> GroupStats {
        let s = &self.inner.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GroupStats {
            messages: g(&s.messages),
            attempts: g(&s.attempts),
            acked: g(&s.acked),
            rerouted: g(&s.rerouted),
            no_live_member: g(&s.no_live_member),
            attempts_exhausted: g(&s.attempts_exhausted),
            failed: g(&s.failed),
            members_added: g(&s.members_added),
            members_removed: g(&s.members_removed),
            members_moved: g(&s.members_moved),
            resolve_errors: g(&s.resolve_errors),
        }
    }

    /// See [`GroupSender::members`].
    pub fn members(&self) -> Vec<(Member, Option<Health>)> {
        let m = self.inner.lock_members();
        m.iter()
            .map(|(id, (addr, _))| {
                (
                    Member {
                        id: *id,
                        addr: *addr,
                    },
                    self.inner.node.health(*id),
                )
            })
            .collect()
    }
}

/// One message's journey through the group.
#[derive(Debug)]
struct Flight {
    key: IdKey,
    payload: Bytes,
    attempts: u32,
    /// Members sent to so far (preferred last when choosing again).
    tried: Vec<NodeId>,
    /// Attempts not settled yet: an ack from any of them settles the message.
    outstanding: Vec<(NodeId, Receipt)>,
    /// The member of the latest attempt.
    current: Option<NodeId>,
    /// The last attempt's error (`None` after a hand-off).
    last: Option<SendError>,
}

/// What a failed attempt means for the message.
enum Verdict {
    /// Another member (or a later attempt) may succeed.
    Reroute,
    /// No member would take it.
    Final,
}

fn verdict(e: &SendError) -> Verdict {
    match e {
        SendError::Deadline { .. }
        | SendError::AttemptsExhausted { .. }
        | SendError::PeerDown { .. }
        | SendError::HandoffRefused { .. }
        | SendError::WindowFull { .. } => Verdict::Reroute,
        // No wildcard: a reason added to `RejectReason` must be placed here (and in
        // the rustdoc of `GroupSendError::Failed`, which lists the final ones).
        SendError::Rejected { reason } => match reason {
            // Another member (or this one later) may take it. `KeyTableFull`: that
            // member's key table is at its budget (refused before processing).
            // `Other`: a reason from a newer member this build does not know;
            // `max_attempts` bounds the tries, and keyed dedup at the members answers
            // a copy of what one of them processed.
            RejectReason::NoReceiver
            | RejectReason::StreamRetired
            | RejectReason::KeyTableFull
            | RejectReason::Other(_) => Verdict::Reroute,
            // Refused for good: the payload or the sender itself is the problem.
            RejectReason::Unauthorized
            | RejectReason::Undecodable
            | RejectReason::TypeMismatch
            | RejectReason::DeadLettered => Verdict::Final,
        },
        _ => Verdict::Final,
    }
}

/// SplitMix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The rendezvous weight of `member` for `key`: a fixed function of both (the same in
/// every process and build), so every sender agrees.
fn weight(key: IdKey, member: NodeId) -> u64 {
    let lo = key.0 as u64;
    let hi = (key.0 >> 64) as u64;
    mix(mix(lo ^ mix(hi)) ^ mix(member.0.wrapping_add(0x9E37_79B9_7F4A_7C15)))
}

impl Inner {
    fn lock_members(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, (SocketAddr, RawSender)>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member that may get messages: listed, and not Down.
    fn is_live(&self, id: NodeId) -> bool {
        self.lock_members().contains_key(&id) && self.node.health(id) != Some(Health::Down)
    }

    /// Choose the member for the next attempt of `key`: among live members, those not
    /// tried yet before those tried, Up (or not heard from yet) before Suspect; then by
    /// the spread.
    fn pick(&self, key: IdKey, tried: &[NodeId]) -> Option<(NodeId, RawSender)> {
        let members = self.lock_members();
        let ranked: Vec<(u8, NodeId, &RawSender)> = members
            .iter()
            .filter_map(|(id, (_, sender))| {
                let rank = match self.node.health(*id) {
                    Some(Health::Down) => return None,
                    Some(Health::Suspect) => 1,
                    _ => 0,
                } + if tried.contains(id) { 2 } else { 0 };
                Some((rank, *id, sender))
            })
            .collect();
        let best = ranked.iter().map(|r| r.0).min()?;
        let tier: Vec<(NodeId, &RawSender)> = ranked
            .iter()
            .filter(|r| r.0 == best)
            .map(|r| (r.1, r.2))
            .collect();
        let (id, sender) = match self.config.spread {
            Spread::Affinity => tier
                .iter()
                .max_by_key(|(id, _)| (weight(key, *id), *id))
                .copied()?,
            Spread::RoundRobin => {
                let n = self.rr.fetch_add(1, Ordering::Relaxed);
                tier[(n % tier.len() as u64) as usize]
            }
        };
        Some((id, sender.clone()))
    }

    /// Make the next attempt of `flight`: on a live member, waiting for one up to
    /// `member_wait` (counted from when none is live); `Ok(None)` once a member's
    /// window took it, `Ok(Some(_))` if an earlier attempt was acked meanwhile (a late
    /// ack from a member that went Down or left counts: the message is settled).
    /// Fails `Shutdown` as soon as the node stops.
    async fn place(
        &self,
        flight: &mut Flight,
        changes: &mut watch::Receiver<u64>,
    ) -> Result<Option<GroupOutcome>, GroupSendError> {
        // When the wait for a live member began. (Regression: `member_wait` was
        // counted from the start of `place`, so time spent waiting for a member's
        // window counted against it.)
        let mut waiting_since: Option<Instant> = None;
        loop {
            changes.borrow_and_update();
            if flight.attempts >= self.config.max_attempts {
                if flight.outstanding.is_empty() {
                    return Err(GroupSendError::AttemptsExhausted {
                        key: flight.key,
                        attempts: flight.attempts,
                        last: flight.last.clone(),
                    });
                }
                // No attempt left, but the first ack from any attempt settles the
                // message: wait for those still running (each ends by its deadline)
                // before giving up. (Regression: a member going Down with the last
                // attempt failed the message at once, and its late ack was ignored.)
                tokio::select! {
                    (i, res) = any_settled(&mut flight.outstanding) => {
                        if let Some(done) = self.on_settled(flight, i, res)? {
                            return Ok(Some(done));
                        }
                    }
                    _ = self.node.closed() => return Err(stopped(flight.key)),
                }
                continue;
            }
            let Some((id, sender)) = self.pick(flight.key, &flight.tried) else {
                let give_up =
                    *waiting_since.get_or_insert_with(Instant::now) + self.config.member_wait;
                if Instant::now() >= give_up {
                    return Err(GroupSendError::NoLiveMember {
                        key: flight.key,
                        attempts: flight.attempts,
                    });
                }
                // (Regression: neither a late ack nor the node's stop ended this
                // wait: a processed message failed `NoLiveMember`, and a stopped
                // node's sends waited out `member_wait`.)
                tokio::select! {
                    r = changes.changed() => {
                        if r.is_err() {
                            // Cannot happen while `self` lives; do not spin.
                            self.sleep_until(give_up).await;
                        }
                    }
                    _ = self.sleep_until(give_up) => {}
                    (i, res) = any_settled(&mut flight.outstanding) => {
                        if let Some(done) = self.on_settled(flight, i, res)? {
                            return Ok(Some(done));
                        }
                    }
                    _ = self.node.closed() => return Err(stopped(flight.key)),
                }
                continue;
            };
            waiting_since = None;
            let sent = {
                let mut watch_it = changes.clone();
                let payload = flight.payload.clone();
                tokio::select! {
                    r = sender.send_with_key(payload, flight.key) => Some(r),
                    _ = self.until_not_live(id, &mut watch_it) => None,
                    (i, res) = any_settled(&mut flight.outstanding) => {
                        if let Some(done) = self.on_settled(flight, i, res)? {
                            return Ok(Some(done));
                        }
                        continue; // nothing was sent: choose again
                    }
                }
            };
            // Only a send that was made is an attempt. (Regression: one cancelled
            // because its member went Down while its window was full counted too,
            // in `attempts` and against `max_attempts`.)
            if sent.is_some() {
                if flight.attempts > 0 {
                    inc(&self.stats.rerouted);
                    tracing::debug!(target: GROUP_TARGET, id = %crate::MessageId::Key(flight.key), from = ?flight.current, to = %id, attempt = flight.attempts + 1, last = ?flight.last, "re-routed");
                }
                flight.attempts += 1;
                inc(&self.stats.attempts);
            }
            if !flight.tried.contains(&id) {
                flight.tried.push(id);
            }
            match sent {
                Some(Ok(receipt)) => {
                    flight.outstanding.push((id, receipt));
                    flight.current = Some(id);
                    return Ok(None);
                }
                Some(Err(e)) => match verdict(&e) {
                    Verdict::Reroute => {
                        flight.current = Some(id);
                        flight.last = Some(e);
                    }
                    Verdict::Final => {
                        return Err(GroupSendError::Failed {
                            key: flight.key,
                            member: Some(id),
                            error: e,
                        })
                    }
                },
                // The member went Down (or left) while its window was full.
                None => {
                    flight.current = Some(id);
                    flight.last = Some(SendError::PeerDown { peer: id });
                }
            }
        }
    }

    /// Attempt `i` of `flight` ended with `res`: `Some` if that settles the message
    /// (acked), `Err` if nothing can deliver it, `None` to carry on.
    fn on_settled(
        &self,
        flight: &mut Flight,
        i: usize,
        res: Result<Outcome, SendError>,
    ) -> Result<Option<GroupOutcome>, GroupSendError> {
        let (member, _) = flight.outstanding.swap_remove(i);
        match res {
            Ok(Outcome::HandedOff) => {
                flight.last = None;
                Ok(None)
            }
            Ok(_) => Ok(Some(GroupOutcome {
                key: flight.key,
                member,
                attempts: flight.attempts,
            })),
            Err(e) => match verdict(&e) {
                Verdict::Reroute => {
                    flight.last = Some(e);
                    Ok(None)
                }
                Verdict::Final => Err(GroupSendError::Failed {
                    key: flight.key,
                    member: Some(member),
                    error: e,
                }),
            },
        }
    }

    /// Spawns `task` on the caller's runtime, or on the group's own one when the
    /// caller is on none (a plain thread). (Regression: `send` from a plain thread
    /// panicked in `tokio::spawn` after its first attempt was already made.)
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        match tokio::runtime::Handle::try_current() {
            Ok(here) => drop(here.spawn(task)),
            Err(_) => drop(self.runtime.spawn(task)),
        }
    }

    /// `tokio::time::sleep_until`, also for a caller on no runtime (the timer then runs
    /// on the group's own runtime, and stops when this future is dropped).
    async fn sleep_until(&self, until: Instant) {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::time::sleep_until(until).await;
        } else {
            // Made inside the task: a `Sleep` needs the runtime's timer when created.
            let mut timer = AbortOnDrop(
                self.runtime
                    .spawn(async move { tokio::time::sleep_until(until).await }),
            );
            let _ = (&mut timer.0).await;
        }
    }

    /// Resolves once `id` is no longer live.
    async fn until_not_live(&self, id: NodeId, changes: &mut watch::Receiver<u64>) {
        loop {
            changes.borrow_and_update();
            if !self.is_live(id) {
                return;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Follow `flight` until an attempt is acked, re-routing when its member goes
    /// Down or leaves, or its attempt fails in a way another member could fix.
    async fn drive(
        &self,
        mut flight: Flight,
        mut changes: watch::Receiver<u64>,
    ) -> Result<GroupOutcome, GroupSendError> {
        loop {
            let current = flight.current;
            let settled = {
                let down = async {
                    match current {
                        Some(id) => self.until_not_live(id, &mut changes).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    s = any_settled(&mut flight.outstanding) => Some(s),
                    _ = down => None,
                }
            };
            match settled {
                Some((i, res)) => {
                    let member = flight.outstanding[i].0;
                    if let Some(done) = self.on_settled(&mut flight, i, res)? {
                        return Ok(done);
                    }
                    // An earlier attempt (whose member went Down) ending does not
                    // change where the message is now.
                    if Some(member) != current {
                        continue;
                    }
                }
                None => {
                    if let Some(id) = current {
                        flight.last = Some(SendError::PeerDown { peer: id });
                    }
                }
            }
            if let Some(done) = self.place(&mut flight, &mut changes).await? {
                return Ok(done);
            }
        }
    }

    fn count_failure(&self, e: &GroupSendError) {
        let c = match e {
            GroupSendError::NoLiveMember { .. } => &self.stats.no_live_member,
            GroupSendError::AttemptsExhausted { .. } => &self.stats.attempts_exhausted,
            GroupSendError::Failed { .. } => &self.stats.failed,
        };
        inc(c);
        tracing::warn!(target: GROUP_TARGET, error = %e, "group message given up");
    }

    /// Make the membership `members`: add new ones to the node, re-address moved ones,
    /// drop departed ones.
    fn apply(&self, members: Vec<Member>) -> Result<(), GroupError> {
        let mut next: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
        let own = self.node.id();
        for m in members {
            if m.id == own {
                // A node cannot send to itself: a membership that lists this node
                // (a replica that is also a sender, found by DNS) means the others.
                // (Regression: the refusal left `apply` early, so the members listed
                // after it never joined and departures were never announced.)
                tracing::debug!(target: GROUP_TARGET, member = %own, "the sending node itself is listed: left out");
                continue;
            }
            next.entry(m.id).or_insert(m.addr);
        }
        let mut changed = false;
        {
            let mut current = self.lock_members();
            let gone: Vec<NodeId> = current
                .keys()
                .filter(|id| !next.contains_key(id))
                .copied()
                .collect();
            for id in gone {
                current.remove(&id);
                inc(&self.stats.members_removed);
                tracing::info!(target: GROUP_TARGET, member = %id, "member left the group");
                changed = true;
            }
            for (id, addr) in next {
                match current.get_mut(&id) {
                    Some((old, _)) if *old == addr => {}
                    Some((old, _)) => {
                        tracing::info!(target: GROUP_TARGET, member = %id, from = %old, to = %addr, "member moved");
                        *old = addr;
                        self.node.add_peer(id, addr);
                        inc(&self.stats.members_moved);
                        changed = true;
                    }
                    None => {
                        self.node.add_peer(id, addr);
                        let sender = self
                            .node
                            .raw_sender(id, self.config.channel)?
                            .with_schema(self.schema);
                        current.insert(id, (addr, sender));
                        inc(&self.stats.members_added);
                        tracing::info!(target: GROUP_TARGET, member = %id, %addr, "member joined the group");
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.changes.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.lock_members().contains_key(&id)
    }
}

/// The first of `outstanding`'s receipts to resolve (pending while there is none).
async fn any_settled(outstanding: &mut [(NodeId, Receipt)]) -> (usize, Result<Outcome, SendError>) {
    std::future::poll_fn(|cx| {
        for (i, (_, r)) in outstanding.iter_mut().enumerate() {
            if let Poll::Ready(res) = Pin::new(r).poll(cx) {
                return Poll::Ready((i, res));
            }
        }
        Poll::Pending
    })
    .await
}

/// The message `key` cannot be sent: the node stopped.
fn stopped(key: IdKey) -> GroupSendError {
    GroupSendError::Failed {
        key,
        member: None,
        error: SendError::Shutdown,
    }
}

/// A spawned task aborted when its handle is dropped (a timer whose waiter went).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The group's background task: re-resolves the membership and turns the node's
/// health changes of members into wake-ups of the messages in flight. Ends with the
/// group (its last handle and unsettled message).
async fn maintain<M: Membership>(
    inner: Weak<Inner>,
    mut membership: M,
    mut health: broadcast::Receiver<HealthChange>,
    mut stop: oneshot::Receiver<()>,
) {
    let every = membership.refresh_every();
    let mut health_open = true;
    loop {
        // The next resolution runs next to the health events: a slow resolver never
        // delays a re-route.
        let resolve = async {
            match every {
                Some(every) => {
                    tokio::time::sleep(every).await;
                    membership.members().await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(resolve);
        let resolved = loop {
            tokio::select! {
                _ = &mut stop => return,
                ev = health.recv(), if health_open => {
                    let Some(inner) = inner.upgrade() else { return };
                    match ev {
                        Ok(change) => {
                            if inner.is_member(change.peer) {
                                inner.changes.send_modify(|v| *v += 1);
                            }
                        }
                        // Missed some: wake everyone to look again.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            inner.changes.send_modify(|v| *v += 1);
                        }
                        Err(broadcast::error::RecvError::Closed) => health_open = false,
                    }
                }
                r = &mut resolve => break r,
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        match resolved {
            Ok(members) => {
                if let Err(e) = inner.apply(members) {
                    tracing::warn!(target: GROUP_TARGET, error = %e, "membership change not applied");
                }
            }
            Err(e) => {
                inc(&inner.stats.resolve_errors);
                tracing::warn!(target: GROUP_TARGET, error = %e, "resolving the group's members failed; keeping the last known members");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_stable_and_spread() {
        // Fixed values: every sender process must agree on them.
        assert_eq!(weight(IdKey(1), NodeId(1)), weight(IdKey(1), NodeId(1)));
        let mut wins = [0u32; 3];
        for k in 0..3000u128 {
            let best = (0..3u64)
                .max_by_key(|m| weight(IdKey(k), NodeId(*m)))
                .unwrap();
            wins[best as usize] += 1;
        }
        for w in wins {
            assert!((800..1200).contains(&w), "uneven: {wins:?}");
        }
    }

    #[test]
    fn configs_and_lists_are_checked() {
        let mut c = GroupConfig::new(ChannelId(1));
        assert!(c.validate().is_ok());
        c.max_attempts = 0;
        assert!(matches!(c.validate(), Err(GroupError::Config(_))));
        c.max_attempts = 3;
        c.channel.guarantee = Guarantee::AtMostOnce;
        assert!(matches!(c.validate(), Err(GroupError::AtMostOnce)));
        c.channel.guarantee = Guarantee::AtLeastOnce;
        c.member_wait = Duration::from_secs(7200);
        assert!(matches!(c.validate(), Err(GroupError::Config(_))));
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(StaticMembers::new([]), Err(GroupError::NoMembers)));
        assert!(matches!(
            StaticMembers::new([(NodeId(1), a), (NodeId(1), a)]),
            Err(GroupError::DuplicateMember(NodeId(1)))
        ));
        for bad in ["nohost", ":7000", "host:", "host:99999", "host:x"] {
            assert!(
                matches!(
                    DnsMembers::new([(NodeId(1), bad)]),
                    Err(GroupError::BadName { .. })
                ),
                "{bad}"
            );
        }
        let d = DnsMembers::new([(NodeId(1), "localhost:7000")]).unwrap();
        assert!(d.clone().refresh_every(Duration::ZERO).is_err());
        assert!(d.refresh_every(Duration::from_secs(1)).is_ok());
    }
}
