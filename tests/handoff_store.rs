//! Behavioural and recovery tests of the hint store, run against both storage backends
//! (`FileSegmentIo` on a temp dir and `MemSegmentIo`).

use ackwire::handoff::{
    FileSegmentIo, FsyncPolicy, Hint, HintError, HintPos, HintStore, HintStoreConfig, MemSegmentIo,
    SegmentIo,
};
use ackwire::{ChannelId, Guarantee, MessageId, NodeId, Origin};
use proptest::prelude::*;
use std::time::{Duration, Instant};

/// A "disk" the store can be opened on repeatedly, with raw access for fault injection.
trait Disk {
    type Io: SegmentIo;
    fn fresh() -> Self;
    fn io(&self) -> Self::Io;
    fn raw(&self, target: NodeId, segment: u64) -> Option<Vec<u8>>;
    fn set_raw(&self, target: NodeId, segment: u64, bytes: Vec<u8>);
    fn quarantined(&self) -> usize;
    fn set_raw_cursor(&self, target: NodeId, bytes: Vec<u8>) {
        self.io().write_cursor(target, &bytes, false).unwrap();
    }
    fn segments(&self, target: NodeId) -> Vec<u64> {
        let mut s = self.io().list_segments(target).unwrap();
        s.sort_unstable();
        s
    }
}

struct FileDisk(tempfile::TempDir);

impl Disk for FileDisk {
    type Io = FileSegmentIo;
    fn fresh() -> Self {
        FileDisk(tempfile::tempdir().unwrap())
    }
    fn io(&self) -> FileSegmentIo {
        FileSegmentIo::new(self.0.path().join("hints")).unwrap()
    }
    fn raw(&self, target: NodeId, segment: u64) -> Option<Vec<u8>> {
        std::fs::read(self.io().segment_path(target, segment)).ok()
    }
    fn set_raw(&self, target: NodeId, segment: u64, bytes: Vec<u8>) {
        let p = self.io().segment_path(target, segment);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    fn quarantined(&self) -> usize {
        walk(self.0.path())
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".corrupt"))
            .count()
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

struct MemDisk(MemSegmentIo);

impl Disk for MemDisk {
    type Io = MemSegmentIo;
    fn fresh() -> Self {
        MemDisk(MemSegmentIo::new())
    }
    fn io(&self) -> MemSegmentIo {
        self.0.clone()
    }
    fn raw(&self, target: NodeId, segment: u64) -> Option<Vec<u8>> {
        self.0.segment_bytes(target, segment)
    }
    fn set_raw(&self, target: NodeId, segment: u64, bytes: Vec<u8>) {
        self.0.set_segment_bytes(target, segment, bytes)
    }
    fn quarantined(&self) -> usize {
        self.0.quarantined()
    }
}

/// Generates `#[test] fn file()` and `#[test] fn mem()` running `$name::<Disk>`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn file() {
                super::$name::<super::FileDisk>();
            }
            #[test]
            fn mem() {
                super::$name::<super::MemDisk>();
            }
        }
    )*};
}

on_both_backends!(
    append_then_replay_returns_hints_in_order_with_ids_intact,
    batches_respect_max_bytes_and_rewind_hands_out_unacked_again,
    expired_hints_are_never_returned_and_are_counted,
    window_refusal_is_typed_and_counted,
    per_target_and_total_byte_limits_refuse_and_free_up,
    segments_rotate_and_delivered_segments_are_deleted,
    decommission_drops_everything_of_the_target,
    restart_keeps_undelivered_and_drops_delivered,
    segment_ids_are_never_reused_after_a_drained_target,
    truncation_at_every_byte_recovers_exactly_the_intact_prefix,
    corrupt_record_in_the_middle_is_skipped_and_the_rest_kept,
    bit_rot_after_open_is_caught_on_replay,
    bad_header_quarantines_the_segment,
    damaged_cursor_replays_everything_again,
);

const T: NodeId = NodeId(7);
const T2: NodeId = NodeId(8);

fn hint(target: NodeId, seq: u64, len: usize) -> Hint {
    Hint {
        target,
        id: MessageId::Seq {
            origin: Origin {
                node: NodeId(1),
                incarnation: 0xabc,
            },
            channel: ChannelId(3),
            seq,
        },
        channel: ChannelId(3),
        guarantee: Guarantee::EffectivelyOnce,
        created_unix_ms: 1_000_000 + seq,
        ttl_ms: 3_600_000,
        payload: (0..len)
            .map(|i| (seq as usize * 31 + i) as u8)
            .collect::<Vec<u8>>()
            .into(),
    }
}

fn cfg(fsync: FsyncPolicy) -> HintStoreConfig {
    HintStoreConfig {
        fsync,
        ..HintStoreConfig::default()
    }
}

fn open<D: Disk>(disk: &D, cfg: HintStoreConfig) -> HintStore<D::Io> {
    HintStore::open_with(cfg, disk.io()).unwrap().0
}

const NOW_MS: u64 = 1_100_000;

/// Everything pending for `target`, in order (one big batch after a rewind).
fn drain_view<B: SegmentIo>(store: &mut HintStore<B>, target: NodeId) -> Vec<(HintPos, Hint)> {
    store.rewind(target);
    let mut all = Vec::new();
    loop {
        let b = store.next_batch(target, 1 << 20, NOW_MS).unwrap();
        if b.is_empty() {
            break;
        }
        all.extend(b);
    }
    store.rewind(target);
    all
}

fn append_then_replay_returns_hints_in_order_with_ids_intact<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Always));
    let now = Instant::now();
    let mut sent = Vec::new();
    for i in 0..20 {
        let h = hint(T, i, i as usize * 10);
        let pos = s
            .append(h.clone(), Some(Duration::from_secs(1)), now)
            .unwrap();
        sent.push((pos, h));
    }
    let mut zero_ttl = hint(T, 99, 3);
    zero_ttl.ttl_ms = 0;
    let pos = s.append(zero_ttl.clone(), None, now).unwrap();
    zero_ttl.ttl_ms = 6 * 3600 * 1000;
    sent.push((pos, zero_ttl));
    assert_eq!(drain_view(&mut s, T), sent);
    assert_eq!(s.stats().stored, 21);
    assert_eq!(s.stats().pending, 21);
    let t = s.targets();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].pending, 21);
    assert!(s.next_batch(T2, 100, NOW_MS).unwrap().is_empty());
}

fn batches_respect_max_bytes_and_rewind_hands_out_unacked_again<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let now = Instant::now();
    for i in 0..10 {
        s.append(hint(T, i, 100), None, now).unwrap();
    }
    let rec = s.targets()[0].pending_bytes / 10;
    let b1 = s.next_batch(T, rec * 3, NOW_MS).unwrap();
    assert_eq!(b1.len(), 3);
    // A budget smaller than one record still yields one record.
    let b2 = s.next_batch(T, 1, NOW_MS).unwrap();
    assert_eq!(b2.len(), 1);
    assert_eq!(b2[0].1, hint(T, 3, 100));
    for (pos, _) in &b1 {
        assert!(s.mark_delivered(T, *pos).unwrap());
        assert!(!s.mark_delivered(T, *pos).unwrap(), "marks are idempotent");
    }
    s.rewind(T);
    let b3 = s.next_batch(T, u64::MAX, NOW_MS).unwrap();
    assert_eq!(b3.len(), 7, "un-acked hint 3 and the rest");
    assert_eq!(b3[0].1, hint(T, 3, 100));
    assert_eq!(s.stats().replayed, 11);
    assert_eq!(s.stats().delivered, 3);
}

fn expired_hints_are_never_returned_and_are_counted<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let now = Instant::now();
    for i in 0..6 {
        let mut h = hint(T, i, 10);
        h.created_unix_ms = 1_000;
        h.ttl_ms = if i % 2 == 0 { 500 } else { 10_000 };
        s.append(h, None, now).unwrap();
    }
    // At 1_500 the short ones have expired (expiry is inclusive).
    let got = s.next_batch(T, u64::MAX, 1_500).unwrap();
    let seqs: Vec<u64> = got
        .iter()
        .map(|(_, h)| match h.id {
            MessageId::Seq { seq, .. } => seq,
            MessageId::Key(_) => unreachable!(),
        })
        .collect();
    assert_eq!(seqs, vec![1, 3, 5]);
    assert_eq!(s.stats().expired, 3);
    assert_eq!(s.stats().pending, 3);
    // A sweep later drops the rest and deletes the now-empty segment.
    assert_eq!(s.expire(11_000).unwrap(), 3);
    assert_eq!(s.stats().expired, 6);
    assert_eq!(s.stats().pending, 0);
    assert!(s.targets().is_empty());
    assert_eq!(disk.segments(T), Vec::<u64>::new());
    s.rewind(T);
    assert!(s.next_batch(T, u64::MAX, 11_000).unwrap().is_empty());
}

fn window_refusal_is_typed_and_counted<D: Disk>() {
    let disk = D::fresh();
    let mut c = cfg(FsyncPolicy::Never);
    c.max_hint_window = Duration::from_secs(60);
    c.default_ttl = Duration::from_secs(60);
    let mut s = open(&disk, c);
    let now = Instant::now();
    s.append(hint(T, 1, 1), Some(Duration::from_secs(60)), now)
        .unwrap();
    let err = s
        .append(hint(T, 2, 1), Some(Duration::from_secs(61)), now)
        .unwrap_err();
    assert!(matches!(
        err,
        HintError::TargetDownTooLong { target, down_for, max }
            if target == T && down_for == Duration::from_secs(61) && max == Duration::from_secs(60)
    ));
    assert_eq!(s.stats().refused_window, 1);
    assert_eq!(s.stats().stored, 1);
    assert_eq!(drain_view(&mut s, T).len(), 1);
}

fn small_cfg() -> HintStoreConfig {
    HintStoreConfig {
        segment_bytes: 4096,
        max_bytes_per_target: 8192,
        max_total_bytes: 12288,
        fsync: FsyncPolicy::Never,
        ..HintStoreConfig::default()
    }
}

fn per_target_and_total_byte_limits_refuse_and_free_up<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, small_cfg());
    let now = Instant::now();
    let mut n = 0;
    let err = loop {
        match s.append(hint(T, n, 900), None, now) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, HintError::TargetFull { target, max: 8192, .. } if target == T));
    assert!(s.targets()[0].disk_bytes <= 8192);
    assert!(
        n >= 6,
        "two 4 KiB segments hold at least 6 records, got {n}"
    );
    // Another target fills the rest of the store.
    let err = loop {
        match s.append(hint(T2, n, 900), None, now) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, HintError::StoreFull { max: 12288, .. }));
    assert!(s.stats().bytes_total <= 12288);
    assert_eq!(s.stats().refused_full, 2);
    // Delivering T's hints deletes its segments and frees room.
    for (pos, _) in drain_view(&mut s, T) {
        s.mark_delivered(T, pos).unwrap();
    }
    assert_eq!(disk.segments(T), Vec::<u64>::new());
    s.append(hint(T, 1000, 900), None, now).unwrap();
    s.append(hint(T2, 1001, 900), None, now).unwrap();
    // An oversized payload is refused with a typed error, not stored.
    let mut big = hint(T, 2000, 0);
    big.payload = vec![0u8; 65 << 20].into();
    assert!(matches!(
        s.append(big, None, now),
        Err(HintError::HintTooLarge { .. })
    ));
}

fn segments_rotate_and_delivered_segments_are_deleted<D: Disk>() {
    let disk = D::fresh();
    let mut c = small_cfg();
    c.max_bytes_per_target = 1 << 20;
    c.max_total_bytes = 1 << 20;
    let mut s = open(&disk, c);
    let now = Instant::now();
    let mut pos = Vec::new();
    for i in 0..20 {
        pos.push(s.append(hint(T, i, 1000), None, now).unwrap());
    }
    let segs = disk.segments(T);
    assert!(segs.len() >= 5, "20 KiB in 4 KiB segments: {segs:?}");
    for id in &segs {
        let len = disk.raw(T, *id).unwrap().len();
        assert!(len <= 4096, "segment {id} is {len} bytes");
    }
    // Deliver the first segment's hints out of order: it is deleted only after the last.
    let first: Vec<HintPos> = pos
        .iter()
        .copied()
        .filter(|p| p.segment == segs[0])
        .collect();
    for p in first[1..].iter().rev() {
        s.mark_delivered(T, *p).unwrap();
    }
    assert_eq!(disk.segments(T), segs);
    s.mark_delivered(T, first[0]).unwrap();
    assert_eq!(disk.segments(T), segs[1..].to_vec());
    let bytes_before = s.stats().bytes_total;
    // Deliver everything: all segments go, including the active one.
    for p in &pos {
        s.mark_delivered(T, *p).unwrap();
    }
    assert!(disk.segments(T).is_empty());
    assert_eq!(s.stats().bytes_total, 0);
    assert!(bytes_before > 0);
    assert_eq!(s.stats().delivered, 20);
}

fn decommission_drops_everything_of_the_target<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let now = Instant::now();
    for i in 0..5 {
        s.append(hint(T, i, 10), None, now).unwrap();
        s.append(hint(T2, i, 10), None, now).unwrap();
    }
    assert_eq!(s.decommission(T).unwrap(), 5);
    assert_eq!(s.decommission(T).unwrap(), 0);
    assert_eq!(s.stats().decommissioned, 5);
    assert_eq!(s.stats().pending, 5);
    assert_eq!(s.targets().len(), 1);
    drop(s);
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    assert!(drain_view(&mut s, T).is_empty());
    assert_eq!(drain_view(&mut s, T2).len(), 5);
}

fn restart_keeps_undelivered_and_drops_delivered<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Always));
    let now = Instant::now();
    let mut pos = Vec::new();
    for i in 0..10 {
        pos.push(s.append(hint(T, i, 50), None, now).unwrap());
    }
    for i in [0, 1, 2, 3, 4, 7] {
        s.mark_delivered(T, pos[i]).unwrap();
    }
    drop(s);
    let (mut s, report) = HintStore::open_with(cfg(FsyncPolicy::Always), disk.io()).unwrap();
    assert_eq!(report.pending, 4);
    assert_eq!(report.torn_tails + report.corrupt_regions, 0);
    let left: Vec<Hint> = drain_view(&mut s, T).into_iter().map(|(_, h)| h).collect();
    let want: Vec<Hint> = [5, 6, 8, 9].iter().map(|&i| hint(T, i, 50)).collect();
    assert_eq!(left, want);
    // Progress persisted by next_batch (no clean shutdown needed): mark 5, fetch, crash.
    s.mark_delivered(T, pos[5]).unwrap();
    let _ = s.next_batch(T, 1, NOW_MS).unwrap();
    std::mem::forget(s); // no Drop: simulates a crash
    let (mut s, _) = HintStore::open_with(cfg(FsyncPolicy::Always), disk.io()).unwrap();
    assert_eq!(drain_view(&mut s, T).len(), 3);
}

fn segment_ids_are_never_reused_after_a_drained_target<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let now = Instant::now();
    let p0 = s.append(hint(T, 0, 10), None, now).unwrap();
    s.mark_delivered(T, p0).unwrap();
    assert!(disk.segments(T).is_empty());
    drop(s);
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let p1 = s.append(hint(T, 1, 10), None, now).unwrap();
    assert!(p1.segment > p0.segment, "{p1:?} reuses {p0:?}");
}

/// Builds one segment of `n` records; returns its bytes and each record's end offset.
fn build_segment<D: Disk>(n: u64, payload: usize) -> (Vec<u8>, Vec<Hint>, Vec<u64>) {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let now = Instant::now();
    let hints: Vec<Hint> = (0..n).map(|i| hint(T, i, payload + i as usize)).collect();
    let mut offsets = Vec::new();
    for h in &hints {
        offsets.push(s.append(h.clone(), None, now).unwrap().offset);
    }
    drop(s);
    let bytes = disk.raw(T, 0).unwrap();
    let mut ends: Vec<u64> = offsets[1..].to_vec();
    ends.push(bytes.len() as u64);
    (bytes, hints, ends)
}

/// Property: cutting the log at any byte offset and reopening recovers exactly the
/// records that end at or before the cut, counts a torn tail iff the cut is inside a
/// record (or the header), and leaves a log that accepts appends.
fn truncation_at_every_byte_recovers_exactly_the_intact_prefix<D: Disk>() {
    let (bytes, hints, ends) = build_segment::<D>(4, 20);
    let header_len = 48u64; // the salted (version 2) segment header
    for cut in 0..=bytes.len() as u64 {
        let disk = D::fresh();
        disk.set_raw(T, 0, bytes[..cut as usize].to_vec());
        let (mut s, report) = HintStore::open_with(cfg(FsyncPolicy::Never), disk.io()).unwrap();
        let intact = ends.iter().filter(|&&e| e <= cut).count();
        let got: Vec<Hint> = drain_view(&mut s, T).into_iter().map(|(_, h)| h).collect();
        assert_eq!(got, hints[..intact].to_vec(), "cut at {cut}");
        let on_boundary = cut == header_len || ends.contains(&cut);
        assert_eq!(report.torn_tails, u64::from(!on_boundary), "cut at {cut}");
        assert_eq!(s.stats().torn_tail_truncated, u64::from(!on_boundary));
        assert_eq!(report.corrupt_regions, 0, "cut at {cut}");
        // The repaired log takes new appends and keeps them across a reopen.
        let extra = hint(T, 100, 5);
        s.append(extra.clone(), None, Instant::now()).unwrap();
        drop(s);
        let mut s = open(&disk, cfg(FsyncPolicy::Never));
        let got: Vec<Hint> = drain_view(&mut s, T).into_iter().map(|(_, h)| h).collect();
        let mut want = hints[..intact].to_vec();
        want.push(extra);
        assert_eq!(got, want, "append after cut at {cut}");
    }
    println!("reliability: hint store | log truncated at every byte offset ({} offsets, {}) | {} reopens | exactly the intact prefix recovered; torn tail truncated; the log accepts appends again", bytes.len() + 1, std::any::type_name::<D>().rsplit("::").next().unwrap_or("disk"), bytes.len() + 1);
}

fn corrupt_record_in_the_middle_is_skipped_and_the_rest_kept<D: Disk>() {
    let (mut bytes, hints, ends) = build_segment::<D>(5, 40);
    // Flip a payload byte of record 2 (records 0..5 end at `ends`).
    bytes[(ends[1] + 30) as usize] ^= 0x55;
    let disk = D::fresh();
    disk.set_raw(T, 0, bytes);
    let (mut s, report) = HintStore::open_with(cfg(FsyncPolicy::Never), disk.io()).unwrap();
    assert_eq!(report.corrupt_regions, 1);
    assert_eq!(report.corrupt_bytes, ends[2] - ends[1]);
    assert_eq!(report.torn_tails, 0);
    assert_eq!(s.stats().corrupt_skipped, 1);
    let got: Vec<Hint> = drain_view(&mut s, T).into_iter().map(|(_, h)| h).collect();
    let want: Vec<Hint> = [0, 1, 3, 4].iter().map(|&i| hints[i].clone()).collect();
    assert_eq!(got, want);
}

fn bit_rot_after_open_is_caught_on_replay<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let now = Instant::now();
    let pos: Vec<HintPos> = (0..3)
        .map(|i| s.append(hint(T, i, 64), None, now).unwrap())
        .collect();
    let mut raw = disk.raw(T, 0).unwrap();
    raw[pos[1].offset as usize + 40] ^= 1;
    disk.set_raw(T, 0, raw);
    let got: Vec<Hint> = drain_view(&mut s, T).into_iter().map(|(_, h)| h).collect();
    assert_eq!(got, vec![hint(T, 0, 64), hint(T, 2, 64)]);
    assert_eq!(s.stats().corrupt_skipped, 1);
    assert_eq!(s.stats().pending, 2);

    // A tiny budget whose only pick is corrupt still returns the next good hint.
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Never));
    let pos: Vec<HintPos> = (0..2)
        .map(|i| s.append(hint(T, i, 64), None, now).unwrap())
        .collect();
    let mut raw = disk.raw(T, 0).unwrap();
    raw[pos[0].offset as usize + 40] ^= 1;
    disk.set_raw(T, 0, raw);
    let got = s.next_batch(T, 1, NOW_MS).unwrap();
    assert_eq!(got, vec![(pos[1], hint(T, 1, 64))]);
    assert_eq!(s.stats().corrupt_skipped, 1);
}

fn bad_header_quarantines_the_segment<D: Disk>() {
    let disk = D::fresh();
    let mut c = small_cfg();
    c.max_bytes_per_target = 1 << 20;
    c.max_total_bytes = 1 << 20;
    let mut s = open(&disk, c.clone());
    let now = Instant::now();
    for i in 0..8 {
        s.append(hint(T, i, 1000), None, now).unwrap();
    }
    drop(s);
    let segs = disk.segments(T);
    assert!(segs.len() >= 2);
    let mut raw = disk.raw(T, segs[0]).unwrap();
    raw[0] = b'X';
    disk.set_raw(T, segs[0], raw);
    let (mut s, report) = HintStore::open_with(c, disk.io()).unwrap();
    assert_eq!(report.quarantined.len(), 1);
    assert_eq!(report.quarantined[0].0, T);
    assert_eq!(report.quarantined[0].1, segs[0]);
    assert_eq!(s.stats().segments_quarantined, 1);
    assert_eq!(disk.quarantined(), 1);
    assert_eq!(disk.segments(T), segs[1..].to_vec());
    let got = drain_view(&mut s, T);
    assert!(!got.is_empty());
    assert!(got.iter().all(|(p, _)| p.segment != segs[0]));
}

fn damaged_cursor_replays_everything_again<D: Disk>() {
    let disk = D::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Always));
    let now = Instant::now();
    let pos: Vec<HintPos> = (0..4)
        .map(|i| s.append(hint(T, i, 8), None, now).unwrap())
        .collect();
    s.mark_delivered(T, pos[0]).unwrap();
    s.sync().unwrap();
    drop(s);
    disk.set_raw_cursor(T, b"garbage".to_vec());
    let (mut s, report) = HintStore::open_with(cfg(FsyncPolicy::Always), disk.io()).unwrap();
    assert_eq!(report.cursors_reset, 1);
    assert_eq!(
        drain_view(&mut s, T).len(),
        4,
        "at-least-once: hint 0 comes again"
    );
}

#[test]
fn every_policy_syncs_by_deadline_and_power_loss_keeps_only_synced() {
    let disk = MemDisk::fresh();
    let every = cfg(FsyncPolicy::Every(Duration::from_millis(10)));
    let mut s = open(&disk, every.clone());
    let t0 = Instant::now();
    s.append(hint(T, 0, 10), None, t0).unwrap();
    assert_eq!(s.next_sync_deadline(), Some(t0 + Duration::from_millis(10)));
    s.sync_if_due(t0 + Duration::from_millis(5)).unwrap();
    assert!(s.next_sync_deadline().is_some());
    s.sync_if_due(t0 + Duration::from_millis(10)).unwrap();
    assert_eq!(s.next_sync_deadline(), None);
    // An append after the interval passed since the first unsynced write group-commits.
    s.append(hint(T, 1, 10), None, t0 + Duration::from_millis(20))
        .unwrap();
    s.append(hint(T, 2, 10), None, t0 + Duration::from_millis(31))
        .unwrap();
    assert_eq!(s.next_sync_deadline(), None, "synced at the second append");
    s.append(hint(T, 3, 10), None, t0 + Duration::from_millis(32))
        .unwrap();
    disk.0.lose_unsynced();
    std::mem::forget(s);
    let mut s = open(&disk, every);
    assert_eq!(
        drain_view(&mut s, T).len(),
        3,
        "hint 3 was within the window"
    );

    // Always: nothing acknowledged is lost.
    let disk = MemDisk::fresh();
    let mut s = open(&disk, cfg(FsyncPolicy::Always));
    for i in 0..5 {
        s.append(hint(T, i, 10), None, t0).unwrap();
    }
    disk.0.lose_unsynced();
    std::mem::forget(s);
    let mut s = open(&disk, cfg(FsyncPolicy::Always));
    assert_eq!(drain_view(&mut s, T).len(), 5);
}

#[test]
fn config_validation_rejects_inconsistent_limits() {
    assert!(HintStoreConfig::default().validate().is_ok());
    let bad = [
        HintStoreConfig {
            segment_bytes: 100,
            ..HintStoreConfig::default()
        },
        HintStoreConfig {
            max_bytes_per_target: 1024 * 1024,
            ..HintStoreConfig::default()
        },
        HintStoreConfig {
            max_total_bytes: 1 << 20,
            ..HintStoreConfig::default()
        },
        HintStoreConfig {
            default_ttl: Duration::from_secs(60),
            ..HintStoreConfig::default()
        },
        HintStoreConfig {
            fsync: FsyncPolicy::Every(Duration::ZERO),
            ..HintStoreConfig::default()
        },
    ];
    for c in bad {
        assert!(
            matches!(c.validate(), Err(HintError::InvalidConfig { .. })),
            "{c:?}"
        );
        assert!(HintStore::open_with(c, MemSegmentIo::new()).is_err());
    }
}

#[test]
fn file_store_lays_out_hints_per_target_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = HintStore::open(HintStoreConfig::new(dir.path())).unwrap();
    s.append(hint(T, 0, 1), None, Instant::now()).unwrap();
    s.sync().unwrap();
    assert!(dir
        .path()
        .join("hints")
        .join("7")
        .join(format!("{:020}.log", 0))
        .is_file());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Property: flipping arbitrary bytes of a segment never panics, never yields a hint
    /// that was not written (so never one whose crc fails), and every record whose bytes
    /// were not touched is still recovered (if the header survived).
    #[test]
    fn flipped_bytes_never_panic_never_yield_corrupt_hints_and_keep_untouched_records(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
    ) {
        let (mut bytes, hints, ends) = build_segment::<MemDisk>(6, 30);
        let mut touched = Vec::new();
        for (idx, x) in &flips {
            let i = idx.index(bytes.len());
            bytes[i] ^= x;
            touched.push(i as u64);
        }
        let disk = MemDisk::fresh();
        disk.set_raw(T, 0, bytes);
        let (mut s, report) = HintStore::open_with(cfg(FsyncPolicy::Never), disk.io()).unwrap();
        let got: Vec<Hint> = drain_view(&mut s, T).into_iter().map(|(_, h)| h).collect();
        for h in &got {
            prop_assert!(hints.contains(h), "returned a hint never written: {h:?}");
        }
        let header_hit = touched.iter().any(|&t| t < 48);
        if header_hit {
            prop_assert_eq!(report.quarantined.len(), 1);
        } else {
            let mut start = 48;
            let mut any_hit = false;
            for (k, &end) in ends.iter().enumerate() {
                let hit = touched.iter().any(|&t| t >= start && t < end);
                any_hit |= hit;
                if !hit {
                    prop_assert!(got.contains(&hints[k]), "untouched record {k} lost");
                }
                start = end;
            }
            if any_hit {
                prop_assert!(report.corrupt_regions + report.torn_tails >= 1);
            }
        }
    }
}

/// A stray file in a target's directory named with the largest segment id (left by an
/// operator or another tool) leaves no id for the next segment: the append that needs
/// one fails with a typed `HintError::Io`, never an overflow panic (which, in a node,
/// killed its driver).
#[test]
fn a_segment_named_with_the_largest_id_gives_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let target_dir = dir.path().join("hints").join("7");
    std::fs::create_dir_all(&target_dir).unwrap();
    std::fs::write(target_dir.join(format!("{}.log", u64::MAX)), b"").unwrap();
    let (mut s, _) = HintStore::open(HintStoreConfig::new(dir.path())).unwrap();
    let r = s.append(hint(T, 0, 1), None, Instant::now());
    assert!(matches!(r, Err(HintError::Io { .. })), "{r:?}");
}

/// A [`MemSegmentIo`] whose segment removals and cursor writes fail while `broken` is
/// set (a full disk, a read-only remount).
#[derive(Debug, Clone)]
struct Breaking {
    io: MemSegmentIo,
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Breaking {
    fn check(&self) -> std::io::Result<()> {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other("no space left on device"));
        }
        Ok(())
    }
}

impl SegmentIo for Breaking {
    fn list_targets(&mut self) -> std::io::Result<Vec<NodeId>> {
        self.io.list_targets()
    }
    fn list_segments(&mut self, target: NodeId) -> std::io::Result<Vec<u64>> {
        self.io.list_segments(target)
    }
    fn read_segment(&mut self, target: NodeId, segment: u64) -> std::io::Result<Vec<u8>> {
        self.io.read_segment(target, segment)
    }
    fn read_at(&mut self, t: NodeId, s: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.io.read_at(t, s, offset, buf)
    }
    fn create_segment(&mut self, t: NodeId, s: u64, header: &[u8]) -> std::io::Result<()> {
        self.io.create_segment(t, s, header)
    }
    fn append(&mut self, t: NodeId, s: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.io.append(t, s, bytes)
    }
    fn truncate(&mut self, t: NodeId, s: u64, len: u64) -> std::io::Result<()> {
        self.io.truncate(t, s, len)
    }
    fn sync(&mut self, t: NodeId, s: u64) -> std::io::Result<()> {
        self.io.sync(t, s)
    }
    fn sync_dir(&mut self, t: NodeId) -> std::io::Result<()> {
        self.io.sync_dir(t)
    }
    fn remove_segment(&mut self, t: NodeId, s: u64) -> std::io::Result<()> {
        self.check()?;
        self.io.remove_segment(t, s)
    }
    fn quarantine_segment(&mut self, t: NodeId, s: u64) -> std::io::Result<()> {
        self.io.quarantine_segment(t, s)
    }
    fn read_cursor(&mut self, t: NodeId) -> std::io::Result<Option<Vec<u8>>> {
        self.io.read_cursor(t)
    }
    fn write_cursor(&mut self, t: NodeId, bytes: &[u8], durable: bool) -> std::io::Result<()> {
        self.check()?;
        self.io.write_cursor(t, bytes, durable)
    }
    fn remove_target(&mut self, t: NodeId) -> std::io::Result<()> {
        self.io.remove_target(t)
    }
}

/// A batch whose clean-up fails (the segment its expired hint emptied cannot be
/// deleted) is still handed out: its hints were read and the replay position moved
/// past them. (Regression: the error dropped the batch, and its hints stayed pending
/// without being read again in this run: stored, never replayed.) And a sweep that
/// fails half-way still counts what it dropped.
#[test]
fn a_failed_clean_up_neither_strands_a_batch_nor_skews_the_counts() {
    let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = Breaking {
        io: MemSegmentIo::new(),
        broken: broken.clone(),
    };
    let (mut s, _) = HintStore::open_with(small_cfg(), io).unwrap();
    let now = Instant::now();
    // One hint per segment (3000 B in 4 KiB segments); the first expires at 1_500.
    let mut first = hint(T, 0, 3000);
    first.created_unix_ms = 1_000;
    first.ttl_ms = 500;
    s.append(first, None, now).unwrap();
    let live = hint(T, 1, 3000);
    s.append(live.clone(), None, now).unwrap();
    broken.store(true, std::sync::atomic::Ordering::Relaxed);
    let batch = s
        .next_batch(T, u64::MAX, 2_000)
        .expect("the batch is handed out");
    assert_eq!(
        batch.iter().map(|(_, h)| h.clone()).collect::<Vec<_>>(),
        [live]
    );
    assert_eq!((s.stats().expired, s.stats().pending), (1, 1));
    // The second expires too; the sweep cannot delete its segment, but counts it.
    assert!(s.expire(u64::MAX).is_err());
    assert_eq!((s.stats().expired, s.stats().pending), (2, 0));
    broken.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(s.expire(u64::MAX).unwrap(), 0);
    assert_eq!(s.stats().pending, 0);
}
