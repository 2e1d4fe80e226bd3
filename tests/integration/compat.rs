//! Frozen formats: the bytes of every released wire frame and on-disk file are kept
//! under `tests/fixtures/<version>/`, and this suite decodes them with the current code.
//! Changing a released format without a new version makes these tests fail.
//!
//! The fixtures were written once by the build that released the format, with
//! `ACKWIRE_WRITE_FIXTURES=1 cargo test --test integration compat:: write_fixtures -- --ignored`;
//! never regenerate the files of a released version (that would defeat the check), add
//! a new version's directory instead.
#![cfg(not(ackwire_loom))]

use ackwire::dedup::{Admit, Dedup, DedupConfig, DurableDedup};
use ackwire::handoff::{Hint, HintStore, HintStoreConfig};
use ackwire::wire::{
    Ack, CreditProbe, Data, Finish, Frame, FrameDecoder, FrameEncoder, Handshake, Heartbeat, Nack,
    NodeCredit, Reject, RejectReason, SeqRange, Settled,
};
use ackwire::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
use bytes::{Bytes, BytesMut};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support;

fn fixtures(version: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(version)
}

fn origin() -> Origin {
    Origin {
        node: NodeId(7),
        incarnation: 0x0123_4567_89AB_CDEF,
    }
}

/// One frame of every type protocol version 1 released, by fixture name.
fn v1_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "handshake",
            Frame::Handshake(Handshake {
                version: 1,
                origin: origin(),
            }),
        ),
        (
            "data_implicit_id",
            Frame::Data(Data {
                channel: ChannelId(3),
                seq: 42,
                floor: 40,
                id_floor: 38,
                id: None,
                guarantee: Guarantee::AtLeastOnce,
                schema: 0,
                payload: Bytes::from_static(b"hello v1"),
            }),
        ),
        (
            "data_key_id",
            Frame::Data(Data {
                channel: ChannelId(4),
                seq: 1,
                floor: 1,
                id_floor: 1,
                id: Some(MessageId::Key(IdKey(0xDEAD_BEEF_0000_0001))),
                guarantee: Guarantee::EffectivelyOnce,
                schema: 0,
                payload: Bytes::from_static(b"keyed"),
            }),
        ),
        (
            "data_replayed_seq_id",
            Frame::Data(Data {
                channel: ChannelId(5),
                seq: 9,
                floor: 9,
                id_floor: 9,
                id: Some(MessageId::Seq {
                    origin: Origin {
                        node: NodeId(8),
                        incarnation: 77,
                    },
                    channel: ChannelId(5),
                    seq: 3,
                }),
                guarantee: Guarantee::EffectivelyOnce,
                schema: 0,
                payload: Bytes::from_static(b"replayed"),
            }),
        ),
        (
            "data_at_most_once",
            Frame::Data(Data {
                channel: ChannelId(6),
                seq: 100_000,
                floor: 83_616,
                id_floor: 83_616,
                id: None,
                guarantee: Guarantee::AtMostOnce,
                schema: 0,
                payload: Bytes::new(),
            }),
        ),
        (
            "ack",
            Frame::Ack(Ack {
                channel: ChannelId(3),
                incarnation: 0x0123_4567_89AB_CDEF,
                cumulative: 40,
                ranges: vec![
                    SeqRange { start: 42, end: 45 },
                    SeqRange { start: 50, end: 50 },
                ],
                credit: None,
                received: 0,
                held: Vec::new(),
            }),
        ),
        (
            "nack",
            Frame::Nack(Nack {
                channel: ChannelId(3),
                incarnation: 99,
                seq: 41,
            }),
        ),
        ("ping", Frame::Ping(Heartbeat { nonce: 12345 })),
        ("pong", Frame::Pong(Heartbeat { nonce: u64::MAX })),
    ]
}

/// Every frame type protocol version 2 released: version 1's, with the ack carrying
/// credit and the held watermark, plus the credit probe.
fn v2_frames() -> Vec<(&'static str, Frame)> {
    let mut frames: Vec<(&'static str, Frame)> = v1_frames()
        .into_iter()
        .map(|(name, f)| match f {
            Frame::Ack(mut a) => {
                a.credit = Some(4136);
                a.received = 48;
                (name, Frame::Ack(a))
            }
            other => (name, other),
        })
        .collect();
    frames.push((
        "credit_probe",
        Frame::CreditProbe(CreditProbe {
            channel: ChannelId(3),
        }),
    ));
    frames
}

/// Every frame type protocol version 3 released: version 2's plus the reject (one
/// fixture per reason code it defines, and one code it does not), the finish, and a
/// data frame carrying its payload type fingerprint, and the node credit.
fn v3_frames() -> Vec<(&'static str, Frame)> {
    let mut frames = v2_frames();
    let reasons = [
        ("reject_no_receiver", RejectReason::NoReceiver),
        ("reject_unauthorized", RejectReason::Unauthorized),
        ("reject_undecodable", RejectReason::Undecodable),
        ("reject_dead_lettered", RejectReason::DeadLettered),
        ("reject_stream_retired", RejectReason::StreamRetired),
        ("reject_type_mismatch", RejectReason::TypeMismatch),
        ("reject_other", RejectReason::Other(200)),
    ];
    for (i, (name, reason)) in reasons.into_iter().enumerate() {
        frames.push((
            name,
            Frame::Reject(Reject {
                channel: ChannelId(3),
                incarnation: origin().incarnation,
                seq: 40 + i as u64,
                reason,
            }),
        ));
    }
    frames.push((
        "data_typed",
        Frame::Data(Data {
            channel: ChannelId(4),
            seq: 2,
            floor: 1,
            id_floor: 1,
            id: None,
            guarantee: Guarantee::AtLeastOnce,
            schema: 0xC0FF_EE01,
            payload: Bytes::from_static(b"typed"),
        }),
    ));
    frames.push((
        "node_credit",
        Frame::NodeCredit(NodeCredit {
            limit: 1 << 40,
            received: 1 << 39,
        }),
    ));
    frames.push((
        "finish",
        Frame::Finish(Finish {
            channel: ChannelId(3),
            last_seq: 4242,
            id_floor: 4200,
        }),
    ));
    frames
}

/// Every frame type protocol version 4 released: version 3's plus the settled floor of
/// an earlier run's stream.
fn v4_frames() -> Vec<(&'static str, Frame)> {
    let mut frames = v3_frames();
    frames.push((
        "settled",
        Frame::Settled(Settled {
            incarnation: 0x0FED_CBA9_8765_4321,
            channel: ChannelId(3),
            id_floor: 8_193,
        }),
    ));
    frames
}

/// Every frame type protocol version 5 released: version 4's, with the ack carrying
/// held ranges above its held watermark.
fn v5_frames() -> Vec<(&'static str, Frame)> {
    v4_frames()
        .into_iter()
        .map(|(name, f)| match f {
            Frame::Ack(mut a) => {
                a.held = vec![
                    SeqRange { start: 52, end: 52 },
                    SeqRange { start: 60, end: 63 },
                ];
                (name, Frame::Ack(a))
            }
            other => (name, other),
        })
        .collect()
}

/// The frames of `version`, by fixture name.
fn frames_of(version: u16) -> Vec<(&'static str, Frame)> {
    match version {
        1 => v1_frames(),
        2 => v2_frames(),
        3 => v3_frames(),
        4 => v4_frames(),
        5 => v5_frames(),
        v => panic!("no fixtures for version {v}"),
    }
}

const V1_HINTS: u64 = 3;

fn v1_hint(i: u64) -> Hint {
    Hint {
        target: NodeId(2),
        id: MessageId::Seq {
            origin: origin(),
            channel: ChannelId(1),
            seq: i + 1,
        },
        channel: ChannelId(1),
        guarantee: Guarantee::EffectivelyOnce,
        created_unix_ms: 1_700_000_000_000 + i,
        // Far future: the fixture must not expire while it guards the format.
        ttl_ms: 1 << 50,
        payload: Bytes::from(format!("hint payload {i}")),
    }
}

fn v1_dedup_ids() -> Vec<MessageId> {
    let mut ids: Vec<MessageId> = (1..=5)
        .map(|seq| MessageId::Seq {
            origin: origin(),
            channel: ChannelId(1),
            seq,
        })
        .collect();
    ids.push(MessageId::Key(IdKey(0xABCD)));
    ids
}

fn dedup_cfg(dir: &Path) -> DedupConfig {
    DedupConfig {
        // The fixture was written with a 1 h horizon; reading with the longest allowed
        // one keeps its key remembered however long ago it was written (the horizon
        // is applied to the completion time when the log is read).
        horizon: Duration::from_secs(365 * 86_400),
        durable: Some(DurableDedup::new(dir)),
        ..DedupConfig::default()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() == "LOCK" {
            continue; // a live store's lock file, not part of the format
        }
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Writes the fixtures of the version this build releases, never over a released
/// version's files. Only for a new version: see the module docs.
#[test]
#[ignore]
fn write_fixtures() {
    if std::env::var_os("ACKWIRE_WRITE_FIXTURES").is_none() {
        return;
    }
    let version = ackwire::wire::PROTOCOL_VERSION;
    let dir = fixtures(&format!("v{version}"));
    assert!(!dir.exists(), "{dir:?} is released: never rewrite it");
    std::fs::create_dir_all(dir.join("wire")).unwrap();
    for (name, frame) in frames_of(version) {
        let mut buf = BytesMut::new();
        FrameEncoder::default()
            .with_version(version)
            .encode(&frame, &mut buf)
            .unwrap();
        std::fs::write(dir.join("wire").join(format!("{name}.bin")), &buf).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _) = HintStore::open(HintStoreConfig::new(tmp.path().join("hints"))).unwrap();
    for i in 0..V1_HINTS {
        store.append(v1_hint(i), None, Instant::now()).unwrap();
    }
    store.sync().unwrap();
    drop(store);
    copy_dir(&tmp.path().join("hints"), &dir.join("hints"));
    let dd = tmp.path().join("dedup");
    let dedup = Dedup::open(dedup_cfg(&dd)).unwrap();
    let now = Instant::now();
    for id in v1_dedup_ids() {
        assert_eq!(dedup.begin(&id, now).unwrap(), Admit::Fresh);
        dedup.complete(&id, now).unwrap();
    }
    drop(dedup);
    copy_dir(&dd, &dir.join("dedup"));
}

/// Every fixture of protocol `version` decodes to `frames` (by name) and re-encodes
/// byte for byte.
fn frozen_frames_round_trip(version: u16, frames: Vec<(&'static str, Frame)>) {
    let dir = fixtures(&format!("v{version}")).join("wire");
    for (name, want) in frames {
        let bytes = std::fs::read(dir.join(format!("{name}.bin")))
            .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
        let mut buf = BytesMut::from(&bytes[..]);
        let got = FrameDecoder::default()
            .with_version(version)
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("v{version} fixture {name} no longer decodes: {e}"));
        assert_eq!(got.as_ref(), Some(&want), "v{version} fixture {name}");
        let mut again = BytesMut::new();
        FrameEncoder::default()
            .with_version(version)
            .encode(&want, &mut again)
            .unwrap();
        assert_eq!(
            &again[..],
            &bytes[..],
            "v{version} frame {name} changed its bytes"
        );
    }
}

#[test]
fn v2_wire_fixtures_decode_and_encode_to_the_same_bytes() {
    frozen_frames_round_trip(2, v2_frames());
    support::reliability::report(
        "compat",
        "frozen v2 frames",
        "1",
        "every v2 frame fixture decodes and re-encodes byte for byte",
    );
}

#[test]
fn v3_wire_fixtures_decode_and_encode_to_the_same_bytes() {
    frozen_frames_round_trip(3, v3_frames());
    support::reliability::report(
        "compat",
        "frozen v3 frames",
        "1",
        "every v3 frame fixture (rejects included) decodes and re-encodes byte for byte",
    );
}

#[test]
fn v4_wire_fixtures_decode_and_encode_to_the_same_bytes() {
    frozen_frames_round_trip(4, v4_frames());
    support::reliability::report(
        "compat",
        "frozen v4 frames",
        "1",
        "every v4 frame fixture (the settled floor included) decodes and re-encodes byte for byte",
    );
}

#[test]
fn v5_wire_fixtures_decode_and_encode_to_the_same_bytes() {
    frozen_frames_round_trip(5, v5_frames());
    support::reliability::report(
        "compat",
        "frozen v5 frames",
        "1",
        "every v5 frame fixture (held ranges in the ack included) decodes and re-encodes byte for byte",
    );
}

/// A version-5 ack's held ranges are left out for a version-4 connection, and the rest
/// of the ack is the version-4 ack byte for byte.
#[test]
fn held_ranges_are_left_out_below_version_5() {
    let find = |frames: Vec<(&'static str, Frame)>| {
        frames
            .into_iter()
            .find(|(name, _)| *name == "ack")
            .unwrap()
            .1
    };
    let (v4, v5) = (find(v4_frames()), find(v5_frames()));
    let mut a = BytesMut::new();
    let mut b = BytesMut::new();
    FrameEncoder::default()
        .with_version(4)
        .encode(&v4, &mut a)
        .unwrap();
    FrameEncoder::default()
        .with_version(4)
        .encode(&v5, &mut b)
        .unwrap();
    assert_eq!(a, b, "a v4 connection gets the v4 ack");
    let got = FrameDecoder::default()
        .with_version(4)
        .decode(&mut b)
        .unwrap();
    assert_eq!(got, Some(v4));
}

/// A settled frame is not put on a connection below version 4, and a version-3
/// decoder refuses its kind (a v3 peer never sends it).
#[test]
fn settled_frames_are_refused_below_version_4() {
    let settled = v4_frames().pop().unwrap().1;
    for version in [1, 2, 3] {
        let mut buf = BytesMut::new();
        let err = FrameEncoder::default()
            .with_version(version)
            .encode(&settled, &mut buf)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ackwire::wire::EncodeError::Unsupported { since: 4, .. }
            ),
            "{err:?}"
        );
        assert!(buf.is_empty());
    }
    let bytes = std::fs::read(fixtures("v4").join("wire").join("settled.bin")).unwrap();
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(FrameDecoder::default()
        .with_version(3)
        .decode(&mut buf)
        .is_err());
}

#[test]
fn reject_frames_are_refused_below_version_3() {
    let reject = Frame::Reject(Reject {
        channel: ChannelId(1),
        incarnation: 1,
        seq: 1,
        reason: RejectReason::DeadLettered,
    });
    for version in [1, 2] {
        let mut buf = BytesMut::new();
        let err = FrameEncoder::default()
            .with_version(version)
            .encode(&reject, &mut buf)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ackwire::wire::EncodeError::Unsupported { since: 3, .. }
            ),
            "{err:?}"
        );
        assert!(buf.is_empty());
    }
    // A version-2 decoder refuses the kind (a v2 peer never sends it).
    let bytes =
        std::fs::read(fixtures("v3").join("wire").join("reject_dead_lettered.bin")).unwrap();
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(FrameDecoder::default()
        .with_version(2)
        .decode(&mut buf)
        .is_err());
}

#[test]
fn v2_dedup_log_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures("v2").join("dedup"), tmp.path());
    let dedup = Dedup::open(dedup_cfg(tmp.path())).unwrap();
    let now = Instant::now();
    for id in v1_dedup_ids() {
        assert_eq!(dedup.begin(&id, now).unwrap(), Admit::Duplicate, "{id}");
    }
}

#[test]
fn v1_wire_fixtures_decode_to_the_same_frames() {
    let dir = fixtures("v1").join("wire");
    let frames = v1_frames();
    for (name, want) in &frames {
        let bytes = std::fs::read(dir.join(format!("{name}.bin")))
            .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
        let mut buf = BytesMut::from(&bytes[..]);
        let got = FrameDecoder::default()
            .with_version(1)
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("fixture {name} no longer decodes: {e}"));
        assert_eq!(got.as_ref(), Some(want), "fixture {name}");
        assert!(buf.is_empty(), "fixture {name}: bytes left over");
    }
    // Every v1 frame type is covered.
    let kinds: std::collections::HashSet<_> = frames
        .iter()
        .map(|(_, f)| std::mem::discriminant(f))
        .collect();
    assert_eq!(kinds.len(), 6, "one fixture per v1 frame type");
    support::reliability::report(
        "compat",
        "upgrade from v1",
        "1",
        "every v1 frame fixture decodes with this build",
    );
}

#[test]
fn v1_frames_still_encode_to_the_frozen_bytes() {
    let dir = fixtures("v1").join("wire");
    for (name, frame) in v1_frames() {
        let want = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
        let mut buf = BytesMut::new();
        FrameEncoder::default()
            .with_version(1)
            .encode(&frame, &mut buf)
            .unwrap();
        assert_eq!(&buf[..], &want[..], "v1 frame {name} changed its bytes");
    }
}

#[test]
fn v1_hint_segments_are_read_after_an_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures("v1").join("hints"), tmp.path());
    let (mut store, report) = HintStore::open(HintStoreConfig::new(tmp.path())).unwrap();
    assert_eq!(report.corrupt_regions, 0, "{report:?}");
    let batch = store
        .next_batch(NodeId(2), u64::MAX, 1_700_000_000_000)
        .unwrap();
    let hints: Vec<Hint> = batch.into_iter().map(|(_, h)| h).collect();
    let want: Vec<Hint> = (0..V1_HINTS).map(v1_hint).collect();
    assert_eq!(hints, want);
    support::reliability::report(
        "compat",
        "upgrade from v1",
        "1",
        "v1 hint segments are replayed by this build",
    );
}

#[test]
fn v1_dedup_log_is_read_after_an_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures("v1").join("dedup"), tmp.path());
    let dedup = Dedup::open(dedup_cfg(tmp.path())).unwrap();
    let now = Instant::now();
    for id in v1_dedup_ids() {
        assert_eq!(
            dedup.begin(&id, now).unwrap(),
            Admit::Duplicate,
            "{id} was completed in the v1 log"
        );
    }
    let fresh = MessageId::Seq {
        origin: origin(),
        channel: ChannelId(1),
        seq: 6,
    };
    assert_eq!(dedup.begin(&fresh, now).unwrap(), Admit::Fresh);
    drop(dedup);
    let log = std::fs::read(tmp.path().join("dedup.log")).unwrap();
    assert_eq!(
        (&log[..8], &log[8..12]),
        (&b"AWDEDUP\0"[..], &4u32.to_le_bytes()[..]),
        "rewritten in dedup log format 4"
    );
    let dedup = Dedup::open(dedup_cfg(tmp.path())).unwrap();
    for id in v1_dedup_ids() {
        assert_eq!(
            dedup.begin(&id, now).unwrap(),
            Admit::Duplicate,
            "{id} after the rewrite"
        );
    }
    support::reliability::report(
        "compat",
        "upgrade from v1",
        "1",
        "a v1 dedup log keeps its duplicates out in this build",
    );
}
