//! Protocol versions and their negotiation on a new connection.
//!
//! Owns which versions this build speaks, how two nodes agree on one, and what each
//! version may carry. Must not do IO: the transport feeds it the frames it reads and
//! sends the frames it is told to.
//!
//! # How two nodes agree
//!
//! Version 1 (the 0.1 release) opens every connection with a [`Handshake`] whose
//! `version` must be exactly 1, and its decoder refuses trailing bytes, so a version
//! range cannot ride in the handshake frame itself without cutting old nodes off. Newer
//! nodes therefore open with a handshake a version-1 node accepts, followed by a
//! *version probe*: a [`Frame::Ping`] whose nonce carries the sender's range
//! (`"ACKV"` in the high 32 bits, then `min` and `max`).
//!
//! - A newer peer answers with its own probe; both sides take the highest version in
//!   both ranges ([`VersionRange::negotiate`]), or close the connection with
//!   [`IncompatibleVersion`].
//! - A version-1 peer treats the probe as a heartbeat and answers with a
//!   [`Frame::Pong`] echoing it: the peer speaks only version 1.
//! - Frames the peer sends before either answer are kept and handed on once the
//!   version is known (they are version-1 frames: a newer peer sends nothing else
//!   before it has the answer).
//!
//! A node whose range is `1..=1` behaves exactly as the 0.1 release did: it sends no
//! probe, and a peer's probe is an ordinary ping it answers. The handshake's `version`
//! field carries the sender's *lowest* version, so a node that no longer speaks 1
//! (`min >= 2`) is refused by version-1 nodes at their first frame, as they should.
//!
//! # What each version carries
//!
//! | version | adds |
//! |---|---|
//! | 1 | handshake, data, cumulative + selective acks, nacks, heartbeats |
//! | 2 | receiver credit and the held watermark in acks ([`crate::wire::Ack::credit`], [`crate::wire::Ack::received`]), [`crate::wire::Frame::CreditProbe`]: flow control |
//! | 3 | [`crate::wire::Frame::Reject`]: a receiver refuses a message for good with a reason (no receiver, not authorized, undecodable, dead-lettered, stream retired); [`crate::wire::Frame::Finish`]: a sender run that shuts down cleanly lets its receivers retire its streams' dedup state; [`crate::wire::Frame::NodeCredit`]: credit for all of a sending node's streams together; the payload type fingerprint in data frames |
//! | 4 | [`crate::wire::Frame::Settled`]: a node replaying hints of an earlier run of itself tells the receiver which seqs of that run's streams are settled, so a dedup window stuck below a seq it will never see moves on |
//! | 5 | held ranges in acks ([`crate::wire::Ack::held`], at most [`crate::wire::MAX_HELD_RANGES`] = 64 per ack, more is a malformed frame): what a receiver is processing above its held watermark, so a receiver that restarted and holds redeliveries with gaps between them is not sent copies of them on the usual timer |
//!
//! With a peer that negotiated version 1 the encoder leaves out what version 1 lacks;
//! the protocol then falls back to the sender's own window for flow control (see the
//! crate docs' "Upgrading" section).

use super::frame::{Frame, Handshake, Heartbeat};
use crate::id::Origin;

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 5;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// An inclusive range of protocol versions.
///
/// Default: every version this build speaks ([`MIN_PROTOCOL_VERSION`]`..=`
/// [`PROTOCOL_VERSION`]). Raise `min` once every node of a cluster runs a build that
/// speaks it, so nodes stop speaking the old version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl Default for VersionRange {
    fn default() -> Self {
        VersionRange::SUPPORTED
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// Two nodes share no protocol version: the connection is closed (and counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: we speak {ours}, the peer speaks {theirs}")]
pub struct IncompatibleVersion {
    /// Our range.
    pub ours: VersionRange,
    /// The peer's range.
    pub theirs: VersionRange,
}

/// A [`VersionRange`] this build cannot speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("version range {range} is not within what this build speaks ({supported})")]
pub struct UnsupportedRange {
    /// The range asked for.
    pub range: VersionRange,
    /// What this build speaks.
    pub supported: VersionRange,
}

impl VersionRange {
    /// Everything this build speaks.
    pub const SUPPORTED: VersionRange = VersionRange {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// Check that this build can speak every version of the range and that it is not
    /// empty.
    pub fn validate(&self) -> Result<(), UnsupportedRange> {
        if self.min <= self.max && self.min >= MIN_PROTOCOL_VERSION && self.max <= PROTOCOL_VERSION
        {
            Ok(())
        } else {
            Err(UnsupportedRange {
                range: *self,
                supported: VersionRange::SUPPORTED,
            })
        }
    }

    /// Does the range hold `version`?
    pub fn contains(&self, version: u16) -> bool {
        self.min <= version && version <= self.max
    }

    /// The highest version in both ranges.
    pub fn negotiate(&self, theirs: VersionRange) -> Result<u16, IncompatibleVersion> {
        let v = self.max.min(theirs.max);
        if v >= self.min.max(theirs.min) {
            Ok(v)
        } else {
            Err(IncompatibleVersion {
                ours: *self,
                theirs,
            })
        }
    }
}

/// High 32 bits of a version probe's nonce: `"ACKV"`. Heartbeat nonces are a counter
/// from 1 and never get near it.
const PROBE_TAG: u64 = 0x4143_4B56;

/// The version probe announcing `range`.
pub fn probe(range: VersionRange) -> Frame {
    Frame::Ping(Heartbeat {
        nonce: probe_nonce(range),
    })
}

fn probe_nonce(range: VersionRange) -> u64 {
    (PROBE_TAG << 32) | (u64::from(range.min) << 16) | u64::from(range.max)
}

/// The range a ping's nonce announces, if it is a version probe.
pub fn parse_probe(nonce: u64) -> Option<VersionRange> {
    if nonce >> 32 != PROBE_TAG {
        return None;
    }
    Some(VersionRange {
        min: (nonce >> 16) as u16,
        max: nonce as u16,
    })
}

/// Why a negotiation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiationError {
    /// No common version.
    #[error(transparent)]
    Incompatible(#[from] IncompatibleVersion),
    /// The peer's first frame was not a handshake, or it sent a second handshake.
    #[error("unexpected frame during the handshake")]
    UnexpectedFrame,
}

/// What [`Negotiation::on_frame`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum NegotiationStep {
    /// Read another frame (decode it as version 1).
    NeedFrame,
    /// Agreed: speak `version` from now on. `early` are frames the peer sent before
    /// the answer, to be handed on in order after the connection is reported up.
    Done {
        /// The peer's run.
        origin: Origin,
        /// The version both speak.
        version: u16,
        /// Frames received during negotiation, oldest first.
        early: Vec<Frame>,
    },
}

/// One side's negotiation on one connection (sans-IO).
///
/// Send [`Negotiation::opening`], then feed every frame read with
/// [`Negotiation::on_frame`] until it says `Done` or fails. Frames must be decoded as
/// version 1 until then; bytes after the frame that completed it belong to the
/// negotiated version.
#[derive(Debug)]
pub struct Negotiation {
    ours: VersionRange,
    local: Origin,
    peer: Option<(Origin, u16)>,
    early: Vec<Frame>,
}

impl Negotiation {
    /// A negotiation for the node run `local` speaking `ours` (validated by the caller).
    pub fn new(local: Origin, ours: VersionRange) -> Self {
        Negotiation {
            ours,
            local,
            peer: None,
            early: Vec::new(),
        }
    }

    /// Frames to send first, in order.
    pub fn opening(&self) -> Vec<Frame> {
        let hs = Frame::Handshake(Handshake {
            version: self.ours.min,
            origin: self.local,
        });
        if self.legacy() {
            vec![hs]
        } else {
            vec![hs, probe(self.ours)]
        }
    }

    /// The run the peer's handshake claims to be and the lowest version it names,
    /// once that handshake has been read (before the version is agreed): enough to
    /// refuse a stranger before reading more of what it sends.
    pub fn claimed(&self) -> Option<(Origin, u16)> {
        self.peer
    }

    /// Speaking only version 1: behave exactly as the 0.1 release.
    fn legacy(&self) -> bool {
        self.ours.max == 1
    }

    /// Feed the next frame the peer sent.
    pub fn on_frame(&mut self, frame: Frame) -> Result<NegotiationStep, NegotiationError> {
        let Some((_, their_min)) = self.peer else {
            let Frame::Handshake(h) = frame else {
                return Err(NegotiationError::UnexpectedFrame);
            };
            // A peer's handshake names its lowest version; above our newest there is
            // nothing to talk about.
            if h.version > self.ours.max || h.version < MIN_PROTOCOL_VERSION {
                return Err(IncompatibleVersion {
                    ours: self.ours,
                    theirs: VersionRange {
                        min: h.version,
                        max: h.version,
                    },
                }
                .into());
            }
            self.peer = Some((h.origin, h.version));
            if self.legacy() {
                return self.done(VersionRange { min: 1, max: 1 });
            }
            return Ok(NegotiationStep::NeedFrame);
        };
        match frame {
            Frame::Handshake(_) => Err(NegotiationError::UnexpectedFrame),
            Frame::Ping(hb) if parse_probe(hb.nonce).is_some() => match parse_probe(hb.nonce) {
                // The probe must agree with the handshake it follows.
                Some(theirs) if theirs.min == their_min && theirs.min <= theirs.max => {
                    self.done(theirs)
                }
                _ => Err(NegotiationError::UnexpectedFrame),
            },
            Frame::Pong(hb) if hb.nonce == probe_nonce(self.ours) => {
                // A version-1 node answered our probe as a heartbeat.
                self.done(VersionRange {
                    min: their_min,
                    max: 1,
                })
            }
            // A node speaking version 2 or later sends its probe right behind its
            // handshake, before anything else. Any other frame there comes from a
            // version-1 node that went on without waiting for our probe's answer
            // (its Pong, when it comes, is an ordinary heartbeat answer).
            other if their_min == 1 => {
                self.early.push(other);
                self.done(VersionRange { min: 1, max: 1 })
            }
            // A handshake naming version 2 or later comes from a node that sends
            // its probe next: anything else there breaks the protocol.
            _ => Err(NegotiationError::UnexpectedFrame),
        }
    }

    /// The peer closed the connection before the version was agreed. If it had sent a
    /// version-1 handshake and ours asked for more, it is a version-1 node refusing
    /// us: that is an incompatibility, not a mere disconnect.
    pub fn on_closed(&self) -> Option<IncompatibleVersion> {
        match self.peer {
            Some((_, 1)) if self.ours.min > 1 => Some(IncompatibleVersion {
                ours: self.ours,
                theirs: VersionRange { min: 1, max: 1 },
            }),
            _ => None,
        }
    }

    fn done(&mut self, theirs: VersionRange) -> Result<NegotiationStep, NegotiationError> {
        let (origin, _) = self.peer.ok_or(NegotiationError::UnexpectedFrame)?;
        let version = self.ours.negotiate(theirs)?;
        Ok(NegotiationStep::Done {
            origin,
            version,
            early: std::mem::take(&mut self.early),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;

    fn origin(n: u64) -> Origin {
        Origin {
            node: NodeId(n),
            incarnation: n + 100,
        }
    }

    fn r(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    /// Run two negotiations against each other, frames crossing in order.
    fn pair(a: VersionRange, b: VersionRange) -> (Result<u16, String>, Result<u16, String>) {
        let mut na = Negotiation::new(origin(1), a);
        let mut nb = Negotiation::new(origin(2), b);
        let run = |n: &mut Negotiation, frames: Vec<Frame>| -> Option<Result<u16, String>> {
            for f in frames {
                match n.on_frame(f) {
                    Ok(NegotiationStep::Done { version, .. }) => return Some(Ok(version)),
                    Ok(NegotiationStep::NeedFrame) => {}
                    Err(e) => return Some(Err(e.to_string())),
                }
            }
            None
        };
        let (oa, ob) = (na.opening(), nb.opening());
        let mut ra = run(&mut na, ob.clone());
        let mut rb = run(&mut nb, oa.clone());
        // A legacy side answers a probe it got with a pong (its node does that).
        let answer = |opening: &[Frame], legacy: bool| -> Vec<Frame> {
            opening
                .iter()
                .filter_map(|f| match f {
                    Frame::Ping(hb) if legacy => Some(Frame::Pong(*hb)),
                    _ => None,
                })
                .collect()
        };
        if ra.is_none() {
            ra = run(&mut na, answer(&oa, b.max == 1));
        }
        if rb.is_none() {
            rb = run(&mut nb, answer(&ob, a.max == 1));
        }
        (ra.expect("a finished"), rb.expect("b finished"))
    }

    #[test]
    fn both_sides_agree_on_the_highest_common_version() {
        assert_eq!(pair(r(1, 2), r(1, 2)), (Ok(2), Ok(2)));
        assert_eq!(pair(r(1, 2), r(1, 1)), (Ok(1), Ok(1)));
        assert_eq!(pair(r(1, 1), r(1, 2)), (Ok(1), Ok(1)));
        assert_eq!(pair(r(2, 2), r(1, 2)), (Ok(2), Ok(2)));
        assert_eq!(pair(r(1, 1), r(1, 1)), (Ok(1), Ok(1)));
    }

    #[test]
    fn a_node_that_stopped_speaking_v1_refuses_a_v1_peer() {
        let (a, b) = pair(r(2, 2), r(1, 1));
        assert!(a.is_err() && b.is_err(), "{a:?} {b:?}");
    }

    #[test]
    fn a_v1_node_closing_on_our_handshake_is_an_incompatibility() {
        let hs = Frame::Handshake(Handshake {
            version: 1,
            origin: origin(2),
        });
        let mut n = Negotiation::new(origin(1), r(2, 2));
        assert_eq!(n.on_frame(hs.clone()), Ok(NegotiationStep::NeedFrame));
        assert!(n.on_closed().is_some());
        let mut n = Negotiation::new(origin(1), r(1, 2));
        assert_eq!(n.on_frame(hs), Ok(NegotiationStep::NeedFrame));
        assert_eq!(n.on_closed(), None, "a plain disconnect");
    }

    #[test]
    fn probe_round_trips_and_ordinary_nonces_are_not_probes() {
        for range in [r(1, 2), r(2, 9), r(1, 1)] {
            assert_eq!(parse_probe(probe_nonce(range)), Some(range));
        }
        for nonce in [0, 1, 12345, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(parse_probe(nonce), None);
        }
    }

    #[test]
    fn a_version_1_peer_is_known_by_its_first_frame_after_the_handshake() {
        // A node of version 2 or later sends its probe right behind its handshake; a
        // version-1 node may go on with heartbeats or data before it answers ours.
        for first in [
            Frame::Ping(Heartbeat { nonce: 1 }),
            Frame::Pong(Heartbeat { nonce: 2 }),
            Frame::Data(crate::wire::Data {
                channel: crate::id::ChannelId(3),
                seq: 1,
                floor: 1,
                id_floor: 1,
                id: None,
                guarantee: crate::id::Guarantee::AtLeastOnce,
                schema: 0,
                payload: bytes::Bytes::from_static(b"x"),
            }),
        ] {
            let mut n = Negotiation::new(origin(1), r(1, 2));
            let hs = Frame::Handshake(Handshake {
                version: 1,
                origin: origin(2),
            });
            assert_eq!(n.on_frame(hs), Ok(NegotiationStep::NeedFrame));
            assert_eq!(
                n.on_frame(first.clone()),
                Ok(NegotiationStep::Done {
                    origin: origin(2),
                    version: 1,
                    early: vec![first]
                })
            );
        }
    }

    #[test]
    fn a_peer_of_version_2_or_later_must_send_its_probe_next() {
        let hs = Frame::Handshake(Handshake {
            version: 2,
            origin: origin(2),
        });
        let mut n = Negotiation::new(origin(1), r(1, 3));
        assert_eq!(n.on_frame(hs.clone()), Ok(NegotiationStep::NeedFrame));
        assert_eq!(
            n.on_frame(Frame::Ping(Heartbeat { nonce: 1 })),
            Err(NegotiationError::UnexpectedFrame)
        );
        let mut n = Negotiation::new(origin(1), r(1, 3));
        assert_eq!(n.on_frame(hs), Ok(NegotiationStep::NeedFrame));
        assert_eq!(
            n.on_frame(probe(r(2, 3))),
            Ok(NegotiationStep::Done {
                origin: origin(2),
                version: 3,
                early: Vec::new()
            })
        );
    }

    #[test]
    fn validate_refuses_ranges_this_build_cannot_speak() {
        assert!(VersionRange::default().validate().is_ok());
        assert!(r(1, 1).validate().is_ok());
        assert!(r(2, 1).validate().is_err());
        assert!(r(0, 1).validate().is_err());
        assert!(r(1, PROTOCOL_VERSION + 1).validate().is_err());
    }
}
