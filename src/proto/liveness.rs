//! The node's liveness policy, sans-IO: which peers are watched, when each is pinged,
//! and the health the failure detector gives them.
//!
//! [`Liveness`] owns the [`FailureDetector`] and the heartbeat schedule (one ping per
//! watched peer every `heartbeat_interval`, each with a fresh nonce). It never reads a
//! clock or arms a timer: the driver arms one timer for [`Liveness::poll_timeout`],
//! calls [`Liveness::handle_timeout`] when it fires, and reacts to the
//! [`HealthChange`]s it returns (publish them; hand a Down peer's messages off).

use crate::detector::{FailureDetector, Health, HealthChange};
use crate::id::NodeId;
use crate::retry::later;
use std::time::{Duration, Instant};

/// Heartbeat schedule and failure detector of one node.
#[derive(Debug)]
pub(crate) struct Liveness {
    detector: FailureDetector,
    every: Duration,
    next_ping: Instant,
    nonce: u64,
    /// The last [`handle_timeout`](Self::handle_timeout): a much longer gap to the
    /// next one is a pause of this node (see there).
    last_poll: Option<Instant>,
}

/// A gap between two [`Liveness::handle_timeout`] calls longer than this (and than
/// one and a half heartbeat intervals) is this node's own pause, not its peers'
/// silence.
const MIN_LOCAL_PAUSE: Duration = Duration::from_millis(500);

impl Liveness {
    /// Pings every `every`, the first round one interval after `now`.
    pub(crate) fn new(detector: FailureDetector, every: Duration, now: Instant) -> Self {
        Liveness {
            detector,
            every,
            next_ping: later(now, every),
            nonce: 0,
            last_poll: None,
        }
    }

    /// Watch `peer` (as if heard from at `now`). Returns whether it is new: a new peer
    /// starts Up.
    pub(crate) fn watch(&mut self, peer: NodeId, now: Instant) -> bool {
        let new = self.detector.state(peer).is_none();
        self.detector.heartbeat(peer, now);
        new
    }

    /// A frame or ack from `peer`: proof of life.
    pub(crate) fn heard(&mut self, peer: NodeId, now: Instant) {
        self.detector.observe(peer, now);
    }

    /// The answer to one of our pings from `peer`.
    pub(crate) fn heartbeat(&mut self, peer: NodeId, now: Instant) {
        self.detector.heartbeat(peer, now);
    }

    /// Stop watching `peer` (decommissioned).
    pub(crate) fn forget(&mut self, peer: NodeId) {
        self.detector.remove(peer);
    }

    /// `peer`'s health (`None` if not watched).
    pub(crate) fn state(&self, peer: NodeId) -> Option<Health> {
        self.detector.state(peer)
    }

    /// How long `peer` has been Down at `now` (`None` unless it is Down).
    pub(crate) fn down_for(&self, peer: NodeId, now: Instant) -> Option<Duration> {
        self.detector
            .down_since(peer)
            .map(|t| now.saturating_duration_since(t))
    }

    /// The watched peers that are not Down.
    pub(crate) fn not_down(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.detector
            .peers()
            .filter(|(_, h)| *h != Health::Down)
            .map(|(p, _)| p)
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work: the next ping
    /// round or the next health change the detector expects, whichever is first.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        Some(match self.detector.poll_timeout() {
            Some(t) => t.min(self.next_ping),
            None => self.next_ping,
        })
    }

    /// At `now`: if a ping round is due, `ping(peer, nonce)` for every watched peer;
    /// then the health changes since the last call (see [`FailureDetector::poll`]).
    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        mut ping: impl FnMut(NodeId, u64),
    ) -> Vec<HealthChange> {
        // Called at least once a heartbeat interval while the node runs; a much longer
        // gap means this node was not scheduled (a blocked runtime, a long fsync) and
        // its peers' frames may be waiting unread. Its peers' silence over the pause is
        // its own: peers not Down count as heard now, as Cassandra's detector skips
        // convicting after a local pause. (Regression: a node whose runtime a handler
        // blocked for 4 s declared its live peers Down, failing new sends to them.)
        let guard = (self.every + self.every / 2).max(MIN_LOCAL_PAUSE);
        if let Some(last) = self.last_poll {
            if now.saturating_duration_since(last) > guard {
                let live: Vec<NodeId> = self
                    .detector
                    .peers()
                    .filter(|(_, h)| *h != Health::Down)
                    .map(|(p, _)| p)
                    .collect();
                tracing::debug!(paused = ?now.saturating_duration_since(last), peers = live.len(), "liveness: this node was paused; its peers' silence over the pause is not counted");
                for peer in live {
                    self.detector.observe(peer, now);
                }
            }
        }
        self.last_poll = Some(now);
        if now >= self.next_ping {
            self.next_ping = later(now, self.every);
            for (peer, _) in self.detector.peers() {
                self.nonce += 1;
                ping(peer, self.nonce);
            }
        }
        self.detector.poll(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::DetectorConfig;

    fn liveness(now: Instant) -> Liveness {
        let fd = FailureDetector::new(DetectorConfig::default()).unwrap();
        Liveness::new(fd, Duration::from_secs(1), now)
    }

    #[test]
    fn every_watched_peer_is_pinged_once_per_interval_with_a_fresh_nonce() {
        let t0 = Instant::now();
        let mut l = liveness(t0);
        assert!(l.watch(NodeId(2), t0));
        assert!(l.watch(NodeId(3), t0));
        assert!(!l.watch(NodeId(2), t0));
        let mut pings = Vec::new();
        l.handle_timeout(t0 + Duration::from_millis(999), |p, n| pings.push((p, n)));
        assert!(pings.is_empty(), "no round before the interval");
        assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        for s in 1..=3 {
            let now = t0 + Duration::from_secs(s);
            l.heartbeat(NodeId(2), now);
            l.heartbeat(NodeId(3), now);
            l.handle_timeout(now, |p, n| pings.push((p, n)));
            l.handle_timeout(now, |p, n| pings.push((p, n)));
        }
        let nonces: Vec<u64> = pings.iter().map(|(_, n)| *n).collect();
        assert_eq!(nonces, (1..=6).collect::<Vec<_>>());
        let peers: Vec<NodeId> = pings.iter().map(|(p, _)| *p).collect();
        assert_eq!(peers, [2, 3, 2, 3, 2, 3].map(NodeId));
    }

    /// This node paused (its driver not scheduled for 4 s, its peers' frames waiting
    /// unread): the gap is not its peers' silence, so none goes Down for it; a peer
    /// that stays silent once the node runs again still does, a few seconds later.
    #[test]
    fn a_pause_of_this_node_does_not_make_its_peers_down() {
        let t0 = Instant::now();
        let mut l = liveness(t0);
        l.watch(NodeId(2), t0);
        let mut now = t0;
        for _ in 0..10 {
            now += Duration::from_secs(1);
            l.heartbeat(NodeId(2), now);
            l.handle_timeout(now, |_, _| {});
        }
        now += Duration::from_secs(4);
        let changes = l.handle_timeout(now, |_, _| {});
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(l.state(NodeId(2)), Some(Health::Up));
        // Still silent while the node runs: Down within a few seconds.
        let resumed = now;
        while l.state(NodeId(2)) != Some(Health::Down) {
            now = l.poll_timeout().unwrap().max(now);
            assert!(now - resumed < Duration::from_secs(5), "never Down");
            l.handle_timeout(now, |_, _| {});
        }
    }

    #[test]
    fn a_silent_peer_goes_down_by_the_timeout_it_announced_and_back_up_when_heard() {
        let t0 = Instant::now();
        let mut l = liveness(t0);
        l.watch(NodeId(2), t0);
        let mut now = t0;
        for _ in 0..10 {
            now += Duration::from_secs(1);
            l.heartbeat(NodeId(2), now);
            l.handle_timeout(now, |_, _| {});
        }
        assert_eq!(l.state(NodeId(2)), Some(Health::Up));
        // Silence: follow the announced timeouts until Down.
        let mut changes = Vec::new();
        for _ in 0..1000 {
            let t = l.poll_timeout().unwrap();
            assert!(t > now, "the timeout moves forward");
            now = t;
            changes.extend(l.handle_timeout(now, |_, _| {}));
            if l.state(NodeId(2)) == Some(Health::Down) {
                break;
            }
        }
        assert_eq!(l.state(NodeId(2)), Some(Health::Down));
        assert_eq!(changes.last().map(|c| c.to), Some(Health::Down));
        assert_eq!(l.not_down().count(), 0);
        assert_eq!(l.down_for(NodeId(2), now), Some(Duration::ZERO));
        l.heard(NodeId(2), now + Duration::from_secs(1));
        let back = l.handle_timeout(now + Duration::from_secs(1), |_, _| {});
        assert_eq!(back.last().map(|c| c.to), Some(Health::Up));
        assert_eq!(l.not_down().collect::<Vec<_>>(), [NodeId(2)]);
        l.forget(NodeId(2));
        assert_eq!(l.state(NodeId(2)), None);
    }
}
