//! Entry points for fuzzers and property tests — **for fuzzers and tests only**, not a
//! stable API (hidden from the docs, may change in any release).
//!
//! Owns thin wrappers that feed arbitrary bytes to the crate's real parsers — the frame
//! decoder, the hint segment scan and store recovery, the durable dedup log — and check
//! their invariants, **panicking when an invariant is violated** (that panic is what a
//! fuzzer reports). Must not contain parsing logic of its own, and must not panic on
//! input the parsers are allowed to reject: rejection is checked to be a typed outcome.
//!
//! The `fuzz_*` functions take one undifferentiated byte string (what a fuzzer hands
//! out) and use its first byte as a mode selector; the other functions are the building
//! blocks they call.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::dedup::{Dedup, DedupConfig, DedupError, DedupStats, DurableDedup, FsyncPolicy};
use crate::handoff::format::{self, CursorState, ScanItem, SegmentCursor};
use crate::handoff::{Hint, HintStore, HintStoreConfig, MemSegmentIo, SegmentIo};
use crate::rng::SplitMix64;
use crate::wire::{DecodeError, Frame, FrameDecoder, FrameEncoder, DEFAULT_MAX_FRAME_LEN};
use crate::NodeId;

/// Target whose segment the hint wrappers scan.
pub const HINT_TARGET: NodeId = NodeId(7);
/// Segment id the hint wrappers use.
pub const HINT_SEGMENT: u64 = 3;
/// The record salt of the salted (version 2) segments the hint fuzz entries build.
pub const HINT_SALT: u64 = 0x0123_4567_89AB_CDEF;

/// How the records of `segment` are framed: as its header says, or (for a bad
/// header) as a salted segment of [`HINT_SALT`].
fn hint_frame(segment: &[u8]) -> format::Frame {
    format::check_segment_header(segment, HINT_TARGET, HINT_SEGMENT)
        .unwrap_or(format::Frame::Salted(HINT_SALT))
}

// ---------------------------------------------------------------------------------------
// Frame decoder

/// Fuzz entry for the frame decoder.
///
/// `data[0]` is the mode: bit 0 set → the rest is a list of frame *bodies* wrapped with
/// correct length and crc prefixes by [`frame_stream_from_bodies`] (so the fuzzer reaches
/// the body decoder); clear → the rest is the raw stream. Bits 1–2 pick the decoder's
/// bound (8 MiB, 9, 64 or 1024 bytes). The chunk sizes are seeded from a crc of `data`.
/// Returns the number of frames decoded.
pub fn fuzz_frame_decoder(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let max = [DEFAULT_MAX_FRAME_LEN, 9, 64, 1024][usize::from((mode >> 1) & 3)];
    let seed = u64::from(crc32c::crc32c(data));
    if mode & 1 == 1 {
        decode_frames_chunked(&frame_stream_from_bodies(rest), seed, max)
    } else {
        decode_frames_chunked(rest, seed, max)
    }
}

/// Wraps bodies in valid frame prefixes: reads a body length byte `n`, then up to `n`
/// body bytes, and writes `[n as u32 LE][crc32c(body)][body]`, repeatedly. A last body
/// cut short by the end of `data` keeps its announced length (a torn frame).
pub fn frame_stream_from_bodies(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 2 + 8);
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let body = &tail[..usize::from(n).min(tail.len())];
        out.extend_from_slice(&u32::from(n).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out.extend_from_slice(body);
        rest = &tail[body.len()..];
    }
    out
}

/// Decodes `stream` with a [`FrameDecoder`] bounded at `max_frame_len`, feeding it in
/// chunks of pseudo-random sizes (1 byte to 4 KiB, from `chunk_seed`). Returns the number
/// of frames decoded.
///
/// # Panics
/// When an invariant fails: `Ok(None)` consumed bytes; a frame's bytes were not exactly
/// its prefix plus announced body; a decoded frame does not re-encode under the same
/// bound or does not decode back to itself; chunked decoding disagrees (frames or final
/// outcome) with decoding the whole stream at once.
pub fn decode_frames_chunked(stream: &[u8], chunk_seed: u64, max_frame_len: usize) -> usize {
    let (whole_frames, whole_end) = decode_all(&mut BytesMut::from(stream), max_frame_len);

    let mut dec = FrameDecoder::new(max_frame_len);
    let mut rng = SplitMix64::new(chunk_seed);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut end = Ok(0);
    'feed: while fed < stream.len() {
        let n = match rng.range_u64(0, 3) {
            0 => 1,
            1 | 2 => rng.range_u64(1, 16),
            _ => rng.range_u64(1, 4096),
        } as usize;
        let n = n.min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            match decode_one(&mut dec, &mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {
                    end = Ok(buf.len());
                    continue 'feed;
                }
                Err(e) => {
                    end = Err(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(frames, whole_frames, "chunked and whole decoding differ");
    assert_eq!(end, whole_end, "chunked and whole decoding end differently");
    frames.len()
}

/// Decodes everything in `buf`: the frames and how it ended (`Ok(bytes left)` or the
/// error).
fn decode_all(buf: &mut BytesMut, max: usize) -> (Vec<Frame>, Result<usize, DecodeError>) {
    let mut dec = FrameDecoder::new(max);
    let mut frames = Vec::new();
    loop {
        match decode_one(&mut dec, buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, Ok(buf.len())),
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// One `decode` call with its per-call invariants checked.
fn decode_one(dec: &mut FrameDecoder, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    let before = buf.len();
    let announced = (before >= 4).then(|| u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
    let r = dec.decode(buf);
    match &r {
        Ok(None) => assert_eq!(buf.len(), before, "Ok(None) consumed bytes"),
        Ok(Some(f)) => {
            let used = before - buf.len();
            assert_eq!(
                Some(used as u64),
                announced.map(|a| u64::from(a) + 8),
                "frame used other bytes than its prefix announced"
            );
            check_frame_round_trip(f, dec.max_frame_len(), used);
        }
        Err(_) => {}
    }
    r
}

/// A decoded frame re-encodes under the same bound, no longer than it arrived (canonical
/// varints are minimal), and decodes back to itself.
fn check_frame_round_trip(frame: &Frame, max: usize, arrived_len: usize) {
    let mut out = BytesMut::new();
    FrameEncoder::new(max)
        .encode(frame, &mut out)
        .expect("a decoded frame must re-encode under the bound it was decoded with");
    assert!(
        out.len() <= arrived_len,
        "re-encoding grew the frame: {} > {arrived_len}",
        out.len()
    );
    let again = FrameDecoder::new(max)
        .decode(&mut out)
        .expect("a re-encoded frame must decode");
    assert_eq!(
        again.as_ref(),
        Some(frame),
        "re-encoded frame decodes differently"
    );
    assert!(out.is_empty(), "re-encoded frame left bytes behind");
}

// ---------------------------------------------------------------------------------------
// Hint segments

/// Fuzz entry for the hint record reader.
///
/// `data[0]` is the mode: bit 0 set → a valid segment header for
/// ([`HINT_TARGET`], [`HINT_SEGMENT`]) is put in front of the rest; clear → the rest is the
/// whole segment file. Bit 7 set → the rest is first turned into records with valid
/// magic, length and crc by [`hint_records_from_bodies`] (so the fuzzer reaches the
/// record body decoder). Bit 1 set → a valid cursor marking some records done (chosen by
/// bits 3–5) is stored with the segment. Bit 2 set → replay in batches of one hint, else
/// all at once. Bit 6 set → the header and the records are of a version 1 segment
/// (plain records), else of a version 2 one (salted with [`HINT_SALT`]). The rest is
/// also given to the cursor decoder as is. Returns the number of hints replayed.
pub fn fuzz_hint_segment(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    check_cursor_decode(rest);
    let plain = mode & 0x40 != 0;
    let body = if mode & 0x80 != 0 {
        hint_records_from_bodies(rest, plain)
    } else {
        rest.to_vec()
    };
    let segment = if mode & 1 == 1 {
        let mut s = if plain {
            format::encode_plain_segment_header(HINT_TARGET, HINT_SEGMENT).to_vec()
        } else {
            format::encode_segment_header(HINT_TARGET, HINT_SEGMENT, HINT_SALT).to_vec()
        };
        s.extend_from_slice(&body);
        s
    } else {
        body
    };
    scan_hint_segment(&segment);
    let cursor = (mode & 2 == 2).then(|| cursor_for(&segment, (mode >> 3) & 7));
    let max_bytes = if mode & 4 == 4 { 1 } else { u64::MAX };
    replay_hint_segment(&segment, cursor.as_deref(), max_bytes)
}

/// Wraps record bodies in valid record prefixes: reads a body length `n` (one byte, then
/// up to `n` bytes of body) and writes magic, `n` and the record's checks (`plain`: the
/// crc of version 1 segments; else the prefix check for [`HINT_SALT`] and the body
/// crc), repeatedly. A body cut short by the end of `data` keeps its announced length
/// (a torn record). The body itself (`header_len u16 LE | bincode header | payload`) is
/// left to the fuzzer.
pub fn hint_records_from_bodies(data: &[u8], plain: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 2);
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let body = &tail[..usize::from(n).min(tail.len())];
        let len = u32::from(n).to_le_bytes();
        let start = out.len();
        out.extend_from_slice(&format::RECORD_MAGIC.to_le_bytes());
        out.extend_from_slice(&len);
        if plain {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&len), body);
            out.extend_from_slice(&crc.to_le_bytes());
        } else {
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
            crate::storage::salt_record(&mut out[start..], HINT_SALT);
        }
        out.extend_from_slice(body);
        rest = &tail[body.len()..];
    }
    out
}

/// A segment file for ([`HINT_TARGET`], [`HINT_SEGMENT`]) holding `hints` (each hint
/// keeps its own target; hints too large for a record are left out), salted with
/// [`HINT_SALT`]. For building valid inputs to mutate.
pub fn hint_segment_bytes(hints: &[Hint]) -> Vec<u8> {
    let frame = format::Frame::Salted(HINT_SALT);
    let mut s = format::encode_segment_header(HINT_TARGET, HINT_SEGMENT, HINT_SALT).to_vec();
    for h in hints {
        if let Some(r) = format::encode_record(h, frame) {
            s.extend_from_slice(&r);
        }
    }
    s
}

/// Runs the recovery scan over a whole segment file and returns its valid record count.
///
/// # Panics
/// When an invariant fails: the scan's regions are not contiguous from the header to
/// `keep_len`, `keep_len` exceeds the input, a corrupt region is not followed by a
/// record, a record does not decode (or does not survive encode → decode), or scanning
/// the kept prefix (what recovery truncates to) finds something else.
pub fn scan_hint_segment(segment: &[u8]) -> usize {
    let frame = hint_frame(segment);
    let scan = format::scan_segment(segment, frame);
    assert!(
        scan.keep_len as usize <= segment.len(),
        "keep_len past the end"
    );
    let span = Bytes::copy_from_slice(segment);
    let mut at = format::header_len(frame).min(segment.len()) as u64;
    let mut records = 0;
    for (i, item) in scan.items.iter().enumerate() {
        match *item {
            ScanItem::Record { offset, len } => {
                assert_eq!(offset, at, "scan regions not contiguous");
                let hint = format::decode_record_in(&span, offset as usize, len as usize, frame)
                    .expect("a record the scan kept must decode");
                let again = format::encode_record(&hint, frame).and_then(|r| {
                    format::decode_record_in(&Bytes::from(r.clone()), 0, r.len(), frame)
                });
                assert_eq!(again.as_ref(), Some(&hint), "hint record round trip");
                at += u64::from(len);
                records += 1;
            }
            ScanItem::Corrupt { offset, len } => {
                assert_eq!(offset, at, "scan regions not contiguous");
                assert!(len > 0, "empty corrupt region");
                assert!(
                    matches!(scan.items.get(i + 1), Some(ScanItem::Record { .. })),
                    "corrupt region not followed by a record"
                );
                at += len;
            }
        }
    }
    assert_eq!(
        at, scan.keep_len,
        "keep_len is not the end of the last region"
    );
    let kept = format::scan_segment(&segment[..scan.keep_len as usize], frame);
    assert_eq!(
        kept, scan,
        "scanning the truncated segment finds something else"
    );
    records
}

/// Opens a [`HintStore`] on an in-memory backend holding `segment` as
/// ([`HINT_TARGET`], [`HINT_SEGMENT`]) (and `cursor` as the target's cursor file), then
/// replays every hint with `next_batch(.., max_bytes, 0)`, marking each delivered.
/// Returns the number of hints replayed.
///
/// # Panics
/// When an invariant fails: opening fails; recovery counts disagree with the scan;
/// a replayed hint is not the decoding of a record the scan found at its position, or is
/// replayed twice; replay does not finish within one batch per pending hint; replayed
/// plus expired hints are not exactly the pending ones.
pub fn replay_hint_segment(segment: &[u8], cursor: Option<&[u8]>, max_bytes: u64) -> usize {
    let mut io = MemSegmentIo::new();
    io.set_segment_bytes(HINT_TARGET, HINT_SEGMENT, segment.to_vec());
    if let Some(c) = cursor {
        io.write_cursor(HINT_TARGET, c, false)
            .expect("memory backend write");
    }
    let (mut store, report) = HintStore::open_with(HintStoreConfig::default(), io)
        .expect("opening a memory-backed store must not fail on any bytes");

    let header = format::check_segment_header(segment, HINT_TARGET, HINT_SEGMENT);
    let span = Bytes::copy_from_slice(segment);
    // Records the store may hand out: valid and of the segment's target.
    let mut expected: BTreeMap<u64, Hint> = BTreeMap::new();
    if let Ok(frame) = header {
        let scan = format::scan_segment(segment, frame);
        assert_eq!(report.segments, 1);
        assert_eq!(report.torn_bytes, segment.len() as u64 - scan.keep_len);
        for item in &scan.items {
            if let ScanItem::Record { offset, len } = *item {
                let h = format::decode_record_in(&span, offset as usize, len as usize, frame)
                    .expect("scanned record decodes");
                if h.target == HINT_TARGET {
                    expected.insert(offset, h);
                }
            }
        }
        assert_eq!(
            report.records,
            expected.len() as u64,
            "recovered record count"
        );
    } else {
        assert_eq!(report.segments, 0, "a bad-header segment was opened");
        assert_eq!(report.records, 0);
    }
    assert!(report.pending <= report.records);

    let mut seen = BTreeSet::new();
    let mut finished = false;
    for _ in 0..=report.pending {
        let batch = store
            .next_batch(HINT_TARGET, max_bytes, 0)
            .expect("memory-backed replay must not fail");
        if batch.is_empty() {
            finished = true;
            break;
        }
        for (pos, hint) in batch {
            assert_eq!(pos.segment, HINT_SEGMENT, "hint from an unknown segment");
            let want = expected.get(&pos.offset);
            assert_eq!(
                want,
                Some(&hint),
                "replayed hint is not the record at its offset"
            );
            assert!(seen.insert(pos.offset), "hint replayed twice");
            assert_eq!(store.mark_delivered(HINT_TARGET, pos).ok(), Some(true));
        }
    }
    assert!(
        finished,
        "replay did not finish within one batch per pending hint"
    );
    let stats = store.stats();
    assert_eq!(
        seen.len() as u64 + stats.expired,
        report.pending,
        "replayed + expired != pending"
    );
    assert_eq!(stats.pending, 0, "hints left pending after a full replay");
    seen.len()
}

/// A valid cursor for ([`HINT_TARGET`], [`HINT_SEGMENT`]) marking records done: those
/// below the `selector % 4`-th record, plus every other record after it if bit 2 is set.
fn cursor_for(segment: &[u8], selector: u8) -> Vec<u8> {
    let offsets: Vec<u64> = format::scan_segment(segment, hint_frame(segment))
        .items
        .iter()
        .filter_map(|i| match *i {
            ScanItem::Record { offset, .. } => Some(offset),
            ScanItem::Corrupt { .. } => None,
        })
        .collect();
    let k = usize::from(selector % 4).min(offsets.len());
    let done_below = offsets.get(k).copied().unwrap_or(segment.len() as u64);
    let done = if selector & 4 == 4 {
        offsets.iter().skip(k + 1).step_by(2).copied().collect()
    } else {
        Vec::new()
    };
    format::encode_cursor(&CursorState {
        next_segment: HINT_SEGMENT + 1,
        segments: vec![SegmentCursor {
            segment: HINT_SEGMENT,
            done_below,
            done,
        }],
    })
}

/// The cursor decoder accepts or rejects any bytes, and what it accepts round-trips.
fn check_cursor_decode(bytes: &[u8]) {
    if let Some(c) = format::decode_cursor(bytes) {
        assert_eq!(format::decode_cursor(&format::encode_cursor(&c)), Some(c));
    }
}

// ---------------------------------------------------------------------------------------
// Dedup log

/// Length of the current dedup log format's header (the record area starts there).
pub const DEDUP_HEADER_LEN: usize = crate::dedup::log::HEADER_LEN;
/// The record salt of the current-format (version 4) dedup logs the fuzz entries build.
pub const DEDUP_SALT: u64 = 0x0FED_CBA9_8765_4321;

/// Fuzz entry for the durable dedup state reader, with `dir` an empty scratch directory
/// reused between calls.
///
/// `data[0]` is the mode: bit 1 set → the rest is first turned into records with valid
/// prefixes by [`dedup_records_from_payloads`] (bits 2 and 3 pick the format: bit 2 set
/// → formats 1 and 2; else bit 3 set → format 3, plain records; else format 4, salted
/// with [`DEDUP_SALT`]); bit 0 set → a valid log header of that format is put in front;
/// clear → the result is the whole file. The bytes after the mode and the file's
/// record area are also parsed directly ([`parse_dedup_log`]). Returns what
/// [`open_dedup_log`] returned.
pub fn fuzz_dedup_state(dir: &Path, data: &[u8]) -> Result<DedupStats, DedupError> {
    use crate::dedup::log::{
        header, legacy_header, plain_header, HEADER_LEN, LEGACY_HEADER_LEN, PLAIN_HEADER_LEN,
    };
    let (mode, rest) = data.split_first().map_or((0, data), |(&m, r)| (m, r));
    let version = match (mode & 4 == 4, mode & 8 == 8) {
        (true, _) => 2,
        (false, true) => 3,
        (false, false) => 4,
    };
    let body = if mode & 2 == 2 {
        dedup_records_from_payloads(rest, version)
    } else {
        rest.to_vec()
    };
    let (mut file, header_len) = match (mode & 1 == 1, version) {
        (false, _) => (Vec::new(), HEADER_LEN),
        (true, 2) => (legacy_header(2).to_vec(), LEGACY_HEADER_LEN),
        (true, 3) => (plain_header().to_vec(), PLAIN_HEADER_LEN),
        (true, _) => (header(DEDUP_SALT).to_vec(), HEADER_LEN),
    };
    file.extend_from_slice(&body);
    if file.len() >= header_len {
        parse_dedup_log(&file[header_len..]);
    }
    parse_dedup_log(rest);
    open_dedup_log(dir, &file)
}

/// Wraps record payloads in valid dedup log prefixes: reads a payload length `n` (one
/// byte, then up to `n` bytes) and frames it in format `version` (4: record magic, `n`
/// as u32 LE, the prefix check for [`DEDUP_SALT`], crc32c of the payload; 3: record
/// magic, `n` as u32 LE, crc32c of the length and payload; 1 or 2: `n` as u32 LE,
/// crc32c of the payload), repeatedly (a payload cut short keeps its announced length:
/// a torn record).
pub fn dedup_records_from_payloads(data: &[u8], version: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 2);
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let payload = &tail[..usize::from(n).min(tail.len())];
        let len = u32::from(n).to_le_bytes();
        let start = out.len();
        match version {
            ..=2 => {
                out.extend_from_slice(&len);
                out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
            }
            3 => {
                out.extend_from_slice(b"AKWD");
                out.extend_from_slice(&len);
                let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
                out.extend_from_slice(&crc.to_le_bytes());
            }
            _ => {
                out.extend_from_slice(b"AKWD");
                out.extend_from_slice(&len);
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
                crate::storage::salt_record(&mut out[start..], DEDUP_SALT);
            }
        }
        out.extend_from_slice(payload);
        rest = &tail[payload.len()..];
    }
    out
}

/// A valid dedup log file (header included, current format, salted with
/// [`DEDUP_SALT`]) of `n` pseudo-random records from `seed`, for building valid inputs
/// to mutate.
pub fn dedup_log_bytes(seed: u64, n: usize) -> Vec<u8> {
    use crate::dedup::log::{encode, header, Record};
    use crate::{ChannelId, IdKey, Origin};
    let mut rng = SplitMix64::new(seed);
    let mut out = header(DEDUP_SALT).to_vec();
    for _ in 0..n {
        let o = Origin {
            node: NodeId(rng.range_u64(0, 3)),
            incarnation: rng.range_u64(0, 2),
        };
        let c = ChannelId(rng.range_u64(0, 2) as u32);
        let r = match rng.range_u64(0, 2) {
            0 => Record::SeqDone(o, c, rng.range_u64(0, 300)),
            1 => Record::Floor(o, c, rng.range_u64(0, 300)),
            _ => Record::KeyDone(IdKey(u128::from(rng.next_u64())), rng.next_u64()),
        };
        encode(&r, crate::storage::Frame::Salted(DEDUP_SALT), &mut out);
    }
    out
}

/// Parses `records` as a dedup log's record area (the bytes after the header) in the
/// current format (salted with [`DEDUP_SALT`]), in format 3 and in the format of
/// versions 1 and 2, and returns the number of records the current format recovers.
///
/// # Panics
/// When an invariant fails, for any format: the kept length exceeds the input or
/// disagrees with the torn byte count; parsing the kept prefix (what recovery truncates
/// to) finds different records or corruption counts, or a torn tail; the recovered
/// records do not re-encode into a log that parses back to exactly them.
pub fn parse_dedup_log(records: &[u8]) -> usize {
    use crate::dedup::log::{encode, encode_legacy, parse, parse_legacy};
    use crate::storage::Frame;
    check_dedup_parser(records, parse_legacy, encode_legacy);
    check_dedup_parser(
        records,
        |b| parse(b, Frame::Plain),
        |r, out| encode(r, Frame::Plain, out),
    );
    let salted = Frame::Salted(DEDUP_SALT);
    check_dedup_parser(
        records,
        |b| parse(b, salted),
        |r, out| encode(r, salted, out),
    )
}

fn check_dedup_parser(
    records: &[u8],
    parse: impl Fn(&[u8]) -> (crate::dedup::log::Recovered, usize),
    encode: impl Fn(&crate::dedup::log::Record, &mut Vec<u8>),
) -> usize {
    let (rec, keep) = parse(records);
    assert!(keep <= records.len(), "keep past the end");
    assert_eq!(rec.torn_bytes, (records.len() - keep) as u64, "torn bytes");
    let (kept, keep2) = parse(&records[..keep]);
    assert_eq!(keep2, keep, "re-parse of the kept prefix");
    assert_eq!(kept.records, rec.records, "kept prefix holds other records");
    assert_eq!(kept.corrupt_skipped, rec.corrupt_skipped, "corrupt count");
    assert_eq!(kept.torn_bytes, 0, "the kept prefix has a torn tail");
    let mut clean = Vec::new();
    for r in &rec.records {
        encode(r, &mut clean);
    }
    let (again, keep3) = parse(&clean);
    assert_eq!(again.records, rec.records, "record round trip");
    assert_eq!((keep3, again.corrupt_skipped), (clean.len(), 0));
    rec.records.len()
}

/// Writes `file` as the dedup log in `dir` (replacing any), opens a durable [`Dedup`] on
/// it (small tables, no fsync), then reopens it.
///
/// Returns the first open's result: `Ok` with its stats, or the typed error.
///
/// # Panics
/// When an invariant fails: the open fails other than by `BadHeader` on a file without
/// a valid header (or succeeds on one); the torn/corrupt counts disagree with
/// [`parse_dedup_log`]'s parsers; a current-format file is not truncated to its intact
/// part; an older-format file is not rewritten as exactly its recovered records in the
/// current format; a rejected file was modified; the reopen finds a torn tail or other
/// counts.
pub fn open_dedup_log(dir: &Path, file: &[u8]) -> Result<DedupStats, DedupError> {
    use crate::dedup::log::{
        encode, header, is_fresh, legacy_header, parse, parse_legacy, plain_header, HEADER_LEN,
        LEGACY_HEADER_LEN, LOG_NAME, PLAIN_HEADER_LEN,
    };
    use crate::storage::{check_salt, Frame};
    let path = dir.join(LOG_NAME);
    std::fs::write(&path, file).expect("writing the scratch log");
    let cfg = DedupConfig {
        window: 64,
        max_streams: 8,
        table_capacity: 64,
        durable: Some(DurableDedup {
            dir: dir.to_path_buf(),
            fsync: FsyncPolicy::Never,
            compact_after_bytes: u64::MAX,
        }),
        ..DedupConfig::default()
    };
    let now = Instant::now();
    // A format 4 header: the known first 32 bytes and an intact salt.
    let salt_of = |b: &[u8]| {
        (b.len() >= HEADER_LEN && b[..PLAIN_HEADER_LEN] == header(0)[..PLAIN_HEADER_LEN])
            .then(|| check_salt(b).ok())
            .flatten()
    };
    let fresh = is_fresh(file);
    let current = if fresh { None } else { salt_of(file) };
    let plain = file.len() >= PLAIN_HEADER_LEN && file[..PLAIN_HEADER_LEN] == plain_header();
    let legacy = file.len() >= LEGACY_HEADER_LEN
        && (file[..LEGACY_HEADER_LEN] == legacy_header(1)
            || file[..LEGACY_HEADER_LEN] == legacy_header(2))
        && !crate::dedup::log::damaged_current_header(file);
    let r = Dedup::open_at(cfg.clone(), now).map(|d| d.stats());
    let on_disk = std::fs::read(&path).expect("reading the scratch log");
    // An older format rewritten in the current one: exactly `records`, salted with the
    // new file's salt.
    let rewritten = |records: &[crate::dedup::log::Record]| {
        let salt = salt_of(&on_disk).expect("rewritten with a format 4 header");
        let mut want = header(salt).to_vec();
        records
            .iter()
            .for_each(|r| encode(r, Frame::Salted(salt), &mut want));
        assert_eq!(on_disk, want, "not rewritten in the current format");
    };
    match &r {
        Err(DedupError::BadHeader { .. }) if !fresh && current.is_none() && !plain && !legacy => {
            assert_eq!(on_disk, file, "a rejected log was modified");
            return r;
        }
        Ok(s) if fresh => {
            assert_eq!((s.torn_bytes_truncated, s.corrupt_records_skipped), (0, 0));
            assert!(
                on_disk.len() == HEADER_LEN && salt_of(&on_disk).is_some(),
                "a new log must hold just the header"
            );
        }
        Ok(s) if current.is_some() => {
            let salt = current.unwrap_or_default();
            let (rec, keep) = parse(&file[HEADER_LEN..], Frame::Salted(salt));
            assert_eq!(s.torn_bytes_truncated, rec.torn_bytes, "torn bytes");
            assert_eq!(s.corrupt_records_skipped, rec.corrupt_skipped, "corrupt");
            assert_eq!(
                on_disk,
                file[..HEADER_LEN + keep],
                "not truncated to intact"
            );
        }
        Ok(s) if plain => {
            let (rec, _) = parse(&file[PLAIN_HEADER_LEN..], Frame::Plain);
            assert_eq!(s.torn_bytes_truncated, rec.torn_bytes, "torn bytes");
            assert_eq!(s.corrupt_records_skipped, rec.corrupt_skipped, "corrupt");
            rewritten(&rec.records);
        }
        Ok(s) if legacy => {
            let (rec, _) = parse_legacy(&file[LEGACY_HEADER_LEN..]);
            assert_eq!(s.torn_bytes_truncated, rec.torn_bytes, "torn bytes");
            assert_eq!(s.corrupt_records_skipped, rec.corrupt_skipped, "corrupt");
            rewritten(&rec.records);
        }
        other => panic!(
            "unexpected open outcome {other:?} (fresh {fresh}, current {current:?}, plain \
             {plain}, legacy {legacy})"
        ),
    }
    let before = r.as_ref().map(|s| s.corrupt_records_skipped).unwrap_or(0);
    let again = Dedup::open_at(cfg, now)
        .expect("reopening a recovered log must succeed")
        .stats();
    assert_eq!(again.torn_bytes_truncated, 0, "recovery left a torn tail");
    assert_eq!(
        again.corrupt_records_skipped, before,
        "reopen corrupt count"
    );
    r
}

// ---------------------------------------------------------------------------------------
// Peer trust: inbound authorization and TLS identity inputs

/// Fuzz entry for what issue 12 added on the inbound path.
///
/// `data[0]` is the mode. Bit 0 clear: `data[1]` names the connection's peer
/// (`NodeId(data[1] % 4)`), the rest is a list of frame bodies wrapped by
/// [`frame_stream_from_bodies`]; every decoded `Data` frame goes through
/// [`check_authorization`]. Bit 0 set (feature `tls`): the rest is split in three at
/// its first two `0xff` bytes and fed to `TlsConfig::from_pem` (chain, key, roots),
/// which must return a typed result; the whole rest is also checked as a peer's
/// certificate DER for every node id 0..4, which must not panic and must be
/// deterministic. Returns the number of inputs checked.
pub fn fuzz_peer_trust(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    if mode & 1 == 0 {
        let Some((&peer, bodies)) = rest.split_first() else {
            return 0;
        };
        let peer = NodeId(u64::from(peer % 4));
        let stream = frame_stream_from_bodies(bodies);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut buf = BytesMut::from(&stream[..]);
        let mut n = 0;
        while let Ok(Some(frame)) = dec.decode(&mut buf) {
            if let Frame::Data(d) = frame {
                check_authorization(peer, &d);
                n += 1;
            }
        }
        n
    } else {
        check_tls_inputs(rest)
    }
}

/// Check the authorization invariants for `data` arriving from `peer`: by default a
/// frame is refused exactly when its explicit id is a `Seq` naming another node; with
/// every peer allowed to relay nothing is refused; a channel restricted to others
/// refuses it (as `Channel`, before any relay question). Panics on a violation.
pub fn check_authorization(peer: NodeId, data: &crate::wire::Data) {
    use crate::proto::{Authorization, Refusal, RelayPolicy};
    let foreign =
        matches!(data.id, Some(crate::MessageId::Seq { origin, .. }) if origin.node != peer);
    let default = Authorization::default().check(peer, data);
    assert_eq!(default.is_err(), foreign, "{peer} {data:?}: {default:?}");
    if foreign {
        assert_eq!(default, Err(Refusal::Relay));
    }
    let open = Authorization::default().relay(RelayPolicy::Anyone);
    assert_eq!(open.check(peer, data), Ok(()));
    let relay_peer = Authorization::default().relay(RelayPolicy::Peers([peer].into()));
    assert_eq!(relay_peer.check(peer, data), Ok(()));
    let closed = Authorization::default()
        .relay(RelayPolicy::Anyone)
        .restrict_channel(data.channel, [NodeId(peer.0.wrapping_add(1))]);
    assert_eq!(closed.check(peer, data), Err(Refusal::Channel));
}

#[cfg(feature = "tls")]
fn check_tls_inputs(rest: &[u8]) -> usize {
    use crate::transport::tls::{cert_names_node, TlsConfig};
    let mut parts = rest.splitn(3, |b| *b == 0xff);
    let chain = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let roots = parts.next().unwrap_or_default();
    // Arbitrary bytes are never a usable certificate + matching key: a typed error.
    let _typed: Result<TlsConfig, _> = TlsConfig::from_pem(chain, key, roots);
    let der = rustls::pki_types::CertificateDer::from(rest);
    for id in 0..4 {
        let first = cert_names_node(&der, NodeId(id));
        assert_eq!(
            first,
            cert_names_node(&der, NodeId(id)),
            "not deterministic"
        );
    }
    4
}

#[cfg(not(feature = "tls"))]
fn check_tls_inputs(_rest: &[u8]) -> usize {
    0
}
