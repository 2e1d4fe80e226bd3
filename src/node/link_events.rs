//! How the driver takes what the transport link reports: connections up and down,
//! identity conflicts, and frames, fed to the core with their connection's proven
//! origin. Counts and traces what the core ignores (frames for channels without a
//! receiver, nacks, dropped duplicates); decides nothing.

use super::driver::Driver;
use super::IdentityConflict;
use crate::id::Origin;
use crate::transport::LinkEvent;

impl Driver {
    /// One event of the transport link.
    pub(super) fn on_link(&mut self, ev: LinkEvent) {
        let now = self.clock;
        match ev {
            LinkEvent::Up { origin, version } => {
                tracing::debug!(peer = %origin, version, "peer up");
                self.observe.spans.peer_up(origin);
                self.shared
                    .versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(origin.node, version);
                self.core.peer_up(now, origin, version);
                if let Some(h) = self.core.health(origin.node) {
                    self.shared.seen(origin.node, h);
                }
            }
            LinkEvent::Down { peer } => {
                tracing::debug!(%peer, "peer down");
                self.core.endpoint.handle_peer_down(now, peer);
            }
            LinkEvent::Conflict { live, refused } => {
                self.shared
                    .conflict_tx
                    .send(IdentityConflict { live, refused });
            }
            LinkEvent::Frame {
                peer,
                incarnation,
                frame,
            } => {
                let from = Origin {
                    node: peer,
                    incarnation,
                };
                self.on_frame(now, from, frame);
            }
            LinkEvent::Frames {
                peer,
                incarnation,
                frames,
            } => {
                let from = Origin {
                    node: peer,
                    incarnation,
                };
                for frame in frames {
                    self.on_frame(now, from, frame);
                }
            }
        }
    }

    /// A frame from the run `from` (its connection's handshake says which).
    fn on_frame(&mut self, now: std::time::Instant, from: Origin, frame: crate::wire::Frame) {
        let peer = from.node;
        // Visibility only (the endpoint ignores it): count and warn.
        let mut data = None;
        if let crate::wire::Frame::Data(d) = &frame {
            if !self.receivers.has(d.channel) {
                self.shared.no_receiver(peer, d.channel);
            }
            data = Some((d.channel, d.seq, d.id));
        }
        if let crate::wire::Frame::Nack(n) = &frame {
            self.observe.nack_received(peer, n.channel, n.seq);
        }
        let endpoint = &mut self.core.endpoint;
        let duplicates = endpoint.duplicates_dropped();
        endpoint.handle_frame_from(now, from, frame);
        let duplicates = endpoint.duplicates_dropped() - duplicates;
        if let (Some((channel, seq, id)), 1..) = (data, duplicates) {
            self.observe
                .duplicate_dropped(peer, channel, seq, id, duplicates);
        }
    }
}
