//! Review round 4 (storage backends shared, replay policy in the core, withdrawal of
//! the queued frames of messages taken back): what the review found, as failing tests.
#![cfg(not(ackwire_loom))]

use ackwire::dedup::{Admit, Dedup, DedupConfig, DurableDedup, FsyncPolicy};
use ackwire::proto::{Endpoint, Outgoing, SendRef};
use ackwire::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin, ProtoConfig};
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

fn endpoint(now: Instant) -> Endpoint {
    let dedup = Arc::new(Dedup::open_at(DedupConfig::default(), now).unwrap());
    let origin = Origin {
        node: NodeId(1),
        incarnation: 1,
    };
    Endpoint::new(origin, ProtoConfig::default(), dedup, 1)
}

/// A target found Down has every unacknowledged message handed off at once
/// (`Sends::peer_down` calls `Endpoint::hand_off` for each, in one housekeeping call),
/// and the driver drains the withdrawals only afterwards, in `flush`. With more than
/// `Endpoint::MAX_WITHDRAWN` (2^16) messages in flight to that target — 17 channels at
/// the default `max_in_flight` of 4096 are enough — `withdraw` throws away the oldest
/// half of the list before the driver ever sees it. Those messages' data frames stay
/// in the TCP peer queue and reach the target when it comes back, although the
/// messages were handed off: exactly the stale delivery the withdrawal exists to stop.
/// The cap is meant for owners that never drain; it fires for one that drains every
/// burst.
#[test]
fn every_message_handed_off_in_one_burst_is_withdrawn() {
    let t0 = Instant::now();
    let mut a = endpoint(t0);
    let peer = NodeId(2);
    let per_channel = 4000u32;
    let channels = 18u32; // 72 000 messages in flight to one peer
    let mut sent = Vec::new();
    for c in 0..channels {
        for i in 0..per_channel {
            let send = a
                .send(
                    t0,
                    Outgoing {
                        peer,
                        channel: ChannelId(c + 1),
                        guarantee: Guarantee::AtLeastOnce,
                        payload: Bytes::from(i.to_le_bytes().to_vec()),
                        id: None,
                        deadline: None,
                        schema: 0,
                    },
                )
                .unwrap();
            sent.push(send);
        }
    }
    // What `Sends::peer_down` does for a Down target whose store takes everything.
    let in_flight = a.in_flight_to(peer);
    assert_eq!(in_flight.len(), sent.len());
    for (send, _, _) in in_flight {
        assert!(a.hand_off(send));
    }
    // What the driver's `flush` does next.
    let withdrawn: HashSet<SendRef> = a.drain_withdrawn().collect();
    let missing = sent.iter().filter(|s| !withdrawn.contains(s)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} handed-off messages were never reported to the driver: their \
         queued frames are not withdrawn and reach the target when it returns",
        sent.len()
    );
}

/// `DiskFile::replace` (the dedup log's compaction, and the format 1/2 → 3 upgrade at
/// open) now fsyncs the parent directory through `storage::file::sync_dir` and returns
/// its error, where it used to be best effort. For a log in the current directory
/// (`DurableDedup::new("")`), `Path::parent` is `""`, `File::open("")` fails with
/// NotFound — after the rename has already replaced the log. `DedupLog::rewrite`
/// then returns before updating its length, so `next_compaction` is never moved:
/// every later `Dedup::sync` rewrites the whole live state again and fails again
/// ("the buffered records are then dropped"). Before `6c243bf` compaction worked in
/// that configuration.
#[test]
fn dedup_compaction_in_the_current_directory_does_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_current_dir(dir.path()).unwrap();
    let cfg = DedupConfig {
        window: 256,
        table_capacity: 1024,
        durable: Some(DurableDedup {
            fsync: FsyncPolicy::Always,
            compact_after_bytes: 200,
            ..DurableDedup::new("")
        }),
        ..DedupConfig::default()
    };
    let now = Instant::now();
    let d = Dedup::open_at(cfg, now).unwrap();
    let mut errors = Vec::new();
    for k in 0..64u128 {
        let id = MessageId::Key(IdKey(k << 90 | 1));
        assert_eq!(d.begin(&id, now).unwrap(), Admit::Fresh);
        if let Err(e) = d.complete(&id, now) {
            errors.push(e.to_string());
        }
        if let Err(e) = d.sync() {
            errors.push(e.to_string());
        }
    }
    assert!(
        dir.path().join("dedup.log").exists(),
        "the log is in the current directory"
    );
    assert!(
        errors.is_empty(),
        "{} durable writes failed once compaction was due, first: {}",
        errors.len(),
        errors[0]
    );
}
