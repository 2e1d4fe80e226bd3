//! Durable dedup: restart keeps duplicates out; torn and corrupt logs recover.
#![cfg(not(ackwire_loom))] // real threads and files; the loom models are in loom_dedup.rs

use ackwire::dedup::{Admit, Dedup, DedupConfig, DedupError, DurableDedup, FsyncPolicy};
use ackwire::{ChannelId, IdKey, MessageId, NodeId, Origin};
use std::path::Path;
use std::time::{Duration, Instant};

/// Prints its line when dropped without a panic in flight (the test passed).
struct Report(&'static str);

impl Drop for Report {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            println!("{}", self.0);
        }
    }
}

fn origin(n: u64) -> Origin {
    Origin {
        node: NodeId(n),
        incarnation: 0xABCD + n,
    }
}

fn cfg(dir: &Path, fsync: FsyncPolicy) -> DedupConfig {
    DedupConfig {
        window: 256,
        table_capacity: 1024,
        durable: Some(DurableDedup {
            fsync,
            ..DurableDedup::new(dir)
        }),
        ..DedupConfig::default()
    }
}

/// N ids: seq ids on two streams (delivered out of order) and application keys.
fn ids(n: u64) -> Vec<MessageId> {
    (1..=n)
        .map(|i| match i % 3 {
            0 => MessageId::Key(IdKey((i as u128) << 70 | 5)),
            1 => MessageId::Seq {
                origin: origin(1),
                channel: ChannelId(0),
                seq: n + 1 - i, // descending: holes until the end
            },
            _ => MessageId::Seq {
                origin: origin(2),
                channel: ChannelId(7),
                seq: i,
            },
        })
        .collect()
}

fn process_all(d: &Dedup, ids: &[MessageId], now: Instant) {
    for id in ids {
        assert_eq!(d.begin(id, now).unwrap(), Admit::Fresh, "{id}");
        d.complete(id, now).unwrap();
    }
}

/// Process N messages, drop, reopen, replay all N: none is delivered again.
#[test]
fn restart_then_replay_delivers_nothing_again() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Never] {
        let dir = tempfile::tempdir().unwrap();
        let all = ids(150);
        let now = Instant::now();
        {
            let d = Dedup::open_at(cfg(dir.path(), fsync), now).unwrap();
            process_all(&d, &all, now);
            // an in-progress (never completed) one must come back after a restart
            let pending = MessageId::Key(IdKey(99));
            assert_eq!(d.begin(&pending, now).unwrap(), Admit::Fresh);
        }
        let d = Dedup::open(cfg(dir.path(), fsync)).unwrap();
        let now = Instant::now();
        for id in &all {
            assert_eq!(d.begin(id, now).unwrap(), Admit::Duplicate, "{id}");
        }
        assert_eq!(
            d.begin(&MessageId::Key(IdKey(99)), now).unwrap(),
            Admit::Fresh
        );
        let s = d.stats();
        assert_eq!(
            (s.duplicates, s.fresh, s.corrupt_records_skipped),
            (150, 1, 0)
        );
    }
}

/// Floors persist too, and compaction (forced by a tiny threshold) keeps everything.
#[test]
fn floors_and_compaction_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), FsyncPolicy::Never);
    c.durable.as_mut().unwrap().compact_after_bytes = 600;
    let now = Instant::now();
    // a contiguous stream (its live state is one floor record) plus a few keys
    let mut all: Vec<MessageId> = (1..=80)
        .map(|s| MessageId::Seq {
            origin: origin(4),
            channel: ChannelId(0),
            seq: s,
        })
        .collect();
    all.extend((0..10u128).map(|k| MessageId::Key(IdKey(k << 100))));
    {
        let d = Dedup::open_at(c.clone(), now).unwrap();
        process_all(&d, &all, now);
        d.advance_floor(origin(3), ChannelId(1), 500, now).unwrap();
    }
    let len = std::fs::metadata(dir.path().join("dedup.log"))
        .unwrap()
        .len();
    assert!(len <= 1200, "log was compacted, len {len}");
    let d = Dedup::open_at(c, now + Duration::from_secs(1)).unwrap();
    for id in &all {
        assert_eq!(d.begin(id, now).unwrap(), Admit::Duplicate, "{id}");
    }
    let below = MessageId::Seq {
        origin: origin(3),
        channel: ChannelId(1),
        seq: 499,
    };
    let above = MessageId::Seq {
        origin: origin(3),
        channel: ChannelId(1),
        seq: 500,
    };
    assert_eq!(d.begin(&below, now).unwrap(), Admit::Duplicate);
    assert_eq!(d.begin(&above, now).unwrap(), Admit::Fresh);
}

/// Keys whose horizon passed while the receiver was down are not resurrected.
#[test]
fn expired_keys_are_not_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), FsyncPolicy::Never);
    c.horizon = Duration::from_millis(50);
    let key = MessageId::Key(IdKey(1));
    {
        let d = Dedup::open(c.clone()).unwrap();
        let now = Instant::now();
        assert_eq!(d.begin(&key, now).unwrap(), Admit::Fresh);
        d.complete(&key, now).unwrap();
    }
    std::thread::sleep(Duration::from_millis(120));
    let d = Dedup::open(c).unwrap();
    assert_eq!(d.begin(&key, Instant::now()).unwrap(), Admit::Fresh);
}

/// Writes a small log of `n` completed seq ids and returns its bytes plus the ids.
fn small_log(dir: &Path, n: u64) -> (Vec<u8>, Vec<MessageId>) {
    let now = Instant::now();
    let ids: Vec<_> = (1..=n)
        .map(|i| MessageId::Seq {
            origin: origin(1),
            channel: ChannelId(0),
            seq: i * 2, // never contiguous: each record matters on its own
        })
        .collect();
    let d = Dedup::open_at(cfg(dir, FsyncPolicy::Never), now).unwrap();
    process_all(&d, &ids, now);
    drop(d);
    (std::fs::read(dir.join("dedup.log")).unwrap(), ids)
}

/// Truncation at every byte offset: open succeeds and exactly the records wholly
/// before the cut are kept (48-byte header, 45-byte records: the stream's activity
/// stamp, then one per completed seq).
#[test]
fn truncation_at_every_offset_keeps_the_intact_prefix() {
    let _report = Report("reliability: dedup | durable dedup log truncated at every byte offset | 320 reopens | whole records before the cut kept; their messages still rejected as duplicates");
    let src = tempfile::tempdir().unwrap();
    let (bytes, ids) = small_log(src.path(), 6);
    assert_eq!(bytes.len(), 48 + 7 * 45);
    for cut in 0..=bytes.len() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dedup.log"), &bytes[..cut]).unwrap();
        let d = Dedup::open(cfg(dir.path(), FsyncPolicy::Never))
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        let records = cut.saturating_sub(48) / 45;
        // the torn tail was truncated, so appends continue cleanly
        let len = std::fs::metadata(dir.path().join("dedup.log"))
            .unwrap()
            .len();
        assert_eq!(len as usize, 48 + records * 45, "cut {cut}");
        let intact = records.saturating_sub(1);
        let now = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let want = if i < intact {
                Admit::Duplicate
            } else {
                Admit::Fresh
            };
            assert_eq!(d.begin(id, now).unwrap(), want, "cut {cut} id {i}");
        }
        assert_eq!(d.stats().corrupt_records_skipped, 0, "cut {cut}");
    }
}

/// Random byte flips: a flip in the (crc-checked) header is a clear `BadHeader`; anywhere else
/// open succeeds, at most the hit record is lost (counted) and all others are kept.
#[test]
fn random_byte_flips_lose_at_most_the_hit_record() {
    let _report = Report("reliability: dedup | random byte flips in the durable dedup log | 400 flips | bad header refused with a typed error; otherwise at most the hit record lost, counted");
    let src = tempfile::tempdir().unwrap();
    let (bytes, ids) = small_log(src.path(), 6);
    let mut x: u64 = 0x1234_5678_9ABC_DEF1;
    for _ in 0..400 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pos = (x % bytes.len() as u64) as usize;
        let bit = 1u8 << ((x >> 32) % 8);
        let mut b = bytes.clone();
        b[pos] ^= bit;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dedup.log"), &b).unwrap();
        let r = Dedup::open(cfg(dir.path(), FsyncPolicy::Never));
        if pos < 48 {
            assert!(matches!(r, Err(DedupError::BadHeader { .. })), "pos {pos}");
            continue;
        }
        let d = r.unwrap_or_else(|e| panic!("pos {pos}: {e}"));
        // Record 0 is the stream's activity stamp; record r > 0 is id r - 1.
        let hit_record = pos.checked_sub(48).map(|p| p / 45);
        let hit = hit_record.and_then(|r| r.checked_sub(1));
        let now = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let got = d.begin(id, now).unwrap();
            if Some(i) != hit {
                assert_eq!(got, Admit::Duplicate, "pos {pos} id {i}");
            }
        }
        let s = d.stats();
        match hit_record {
            Some(6) => assert_eq!(s.corrupt_records_skipped, 0, "tail damage is torn"),
            Some(_) => assert_eq!(s.corrupt_records_skipped, 1, "pos {pos}"),
            None => assert_eq!(s.corrupt_records_skipped, 0),
        }
    }
}

/// One lost record early in a long stream (a corrupted byte; a failed write cuts a
/// batch the same way) loses that record only. The records are replayed in seq order,
/// sliding the stream's window (256 here) from its last floor; the lost one used to
/// stop the slide, and every record more than a window above it was dropped at
/// recovery (counted in `recovery_dropped`, nothing else): those messages, acked
/// durably, were then processed again if resent. The floor checkpoints the log now
/// carries restart the slide above the loss.
#[test]
fn one_lost_record_does_not_drop_the_records_a_window_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let ids: Vec<_> = (1..=1000)
        .map(|seq| MessageId::Seq {
            origin: origin(1),
            channel: ChannelId(0),
            seq,
        })
        .collect();
    {
        let d = Dedup::open_at(cfg(dir.path(), FsyncPolicy::Always), now).unwrap();
        process_all(&d, &ids, now);
    }
    // The 48-byte header, then 45-byte records: the activity stamp, then seq 1, 2, …
    // (the first checkpoint comes after seq 31): flip a byte inside seq 10's.
    let path = dir.path().join("dedup.log");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[48 + 10 * 45 + 30] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let d = Dedup::open(cfg(dir.path(), FsyncPolicy::Always)).unwrap();
    let s = d.stats();
    assert_eq!(s.corrupt_records_skipped, 1, "{s:?}");
    assert_eq!(s.recovery_dropped, 0, "{s:?}");
    let fresh: Vec<u64> = ids
        .iter()
        .filter(|id| d.begin(id, now).unwrap() != Admit::Duplicate)
        .map(|id| match id {
            MessageId::Seq { seq, .. } => *seq,
            MessageId::Key(_) => unreachable!(),
        })
        .collect();
    assert!(
        fresh.is_empty(),
        "processed again after the restart: {fresh:?}"
    );
}

/// A file that is not a dedup log is refused with a clear error, not overwritten.
#[test]
fn foreign_file_is_a_bad_header() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dedup.log"),
        b"hello, this is not a log at all",
    )
    .unwrap();
    let err = Dedup::open(cfg(dir.path(), FsyncPolicy::Never)).unwrap_err();
    assert!(matches!(err, DedupError::BadHeader { .. }), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("dedup.log")).unwrap(),
        b"hello, this is not a log at all"
    );
}

/// One `FsyncPolicy` for both durable stores; the dedup log refuses `Every` (its acks
/// wait for the fsync, so a timed fsync would hold them) with a typed error, and
/// creates no file.
#[test]
fn the_dedup_log_refuses_a_timed_fsync_with_a_typed_error() {
    let same: ackwire::handoff::FsyncPolicy = FsyncPolicy::Every(Duration::from_millis(10));
    let dir = tempfile::tempdir().unwrap();
    let err = Dedup::open(cfg(dir.path(), same)).unwrap_err();
    assert!(
        matches!(err, DedupError::InvalidConfig(m) if m.contains("Every")),
        "{err}"
    );
    assert!(!dir.path().join("dedup.log").exists());
    assert_eq!(FsyncPolicy::default(), FsyncPolicy::Always);
}

/// Every single-bit flip in the 48-byte header is a typed `BadHeader`, never a log
/// read in another format (a flipped version bit would read a format 4 log as format 2
/// and lose every record); the file is left as it was.
#[test]
fn every_single_bit_flip_in_the_header_is_a_bad_header() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, _) = small_log(src.path(), 3);
    for pos in 0..48 {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[pos] ^= 1 << bit;
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("dedup.log"), &b).unwrap();
            let r = Dedup::open(cfg(dir.path(), FsyncPolicy::Never));
            assert!(
                matches!(r, Err(DedupError::BadHeader { .. })),
                "byte {pos} bit {bit}: {:?}",
                r.map(|d| d.stats())
            );
            assert_eq!(std::fs::read(dir.path().join("dedup.log")).unwrap(), b);
        }
    }
}
