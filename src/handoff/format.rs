//! On-disk byte formats of the hint log: segment header, hint records, ack cursor.
//!
//! Owns encoding, decoding and the recovery scan of one segment's bytes. Must not do IO,
//! keep state across calls, or panic on any input: every decoder returns `None`/a scan
//! outcome for bad bytes.
//!
//! Segment file = header (48 bytes; 32 in version 1) followed by records:
//!
//! ```text
//! header : magic "ACKWHINT" | version u16 LE (2) | reserved u16 | target u64 LE
//!          | segment id u64 LE | crc32c u32 LE (of the 28 bytes before it)
//!          | salt u64 LE | reserved u32 | crc32c u32 LE (of the 44 bytes before it)
//! record : REC_MAGIC u32 LE | body_len u32 LE | prefix check u32 LE | body crc u32 LE
//!          | body
//!          prefix check = crc32c of the salt (u64 LE), REC_MAGIC and body_len;
//!          body crc = crc32c of the body
//! body   : header_len u16 LE | bincode-2 RecordHeader | payload (raw)
//! ```
//!
//! The header and the record framing are the shared [`crate::storage`] ones (this log's
//! own header fields: target and segment id; the salted header and records,
//! [`Frame::Salted`]). The salt is random per segment, so a payload (which a peer
//! chose) cannot hold bytes that pass as a record of the segment: recovery never
//! takes a record out of a payload, and runs in linear time.
//!
//! Version 1 segments (a 32-byte header without the salt; records `REC_MAGIC | body_len
//! | crc32c of body_len and body | body`, [`Frame::Plain`]) are still read and replayed;
//! nothing is appended to them (new hints go to a new, version 2 segment), and they are
//! deleted once delivered.

use super::Hint;
use crate::id::{ChannelId, Guarantee, MessageId, NodeId};
pub(crate) use crate::storage::Frame;
use crate::storage::{self, Framing};
pub(crate) use crate::storage::{HeaderProblem, RecordAt, Scan, ScanItem};
use bincode::{Decode, Encode};
use bytes::Bytes;

/// Magic bytes opening every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"ACKWHINT";
/// Segment format version written by this code (salted records).
pub(crate) const SEGMENT_VERSION: u16 = 2;
/// The first segment format version (plain records), read only; other versions are
/// quarantined.
pub(crate) const SEGMENT_VERSION_PLAIN: u16 = 1;
/// Length of the header of a segment this code writes, in bytes.
pub(crate) const SEGMENT_HEADER_LEN: usize = storage::SALTED_HEADER_LEN;
/// Magic opening every record ("AKWH" read as little-endian u32).
pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"AKWH");
/// Largest record body accepted (64 MiB); larger length fields are treated as corrupt.
pub(crate) const MAX_RECORD_BODY: usize = 64 << 20;
/// The hint log's record framing.
const FRAMING: Framing = Framing {
    magic: RECORD_MAGIC,
    min_body: 2,
    max_body: MAX_RECORD_BODY,
};

const CURSOR_MAGIC: [u8; 4] = *b"AWHC";
const CURSOR_VERSION: u16 = 1;
const CURSOR_PREFIX_LEN: usize = 16;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<4096>()
}

/// The per-record metadata, bincode-encoded in front of the raw payload.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
struct RecordHeader {
    target: NodeId,
    id: MessageId,
    channel: ChannelId,
    guarantee: Guarantee,
    created_unix_ms: u64,
    ttl_ms: u64,
}

/// Encodes the header of `target`'s segment `segment` whose records are salted with
/// `salt`.
pub(crate) fn encode_segment_header(
    target: NodeId,
    segment: u64,
    salt: u64,
) -> [u8; SEGMENT_HEADER_LEN] {
    storage::salted_header(
        &SEGMENT_MAGIC,
        SEGMENT_VERSION,
        fields(target, segment),
        salt,
    )
}

/// Encodes a version 1 segment header (plain records), to build old segments in tests.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn encode_plain_segment_header(target: NodeId, segment: u64) -> [u8; 32] {
    storage::header(
        &SEGMENT_MAGIC,
        SEGMENT_VERSION_PLAIN,
        fields(target, segment),
    )
}

/// Length of the header of a segment whose records are framed by `frame`.
pub(crate) fn header_len(frame: Frame) -> usize {
    match frame {
        Frame::Plain => storage::HEADER_LEN,
        Frame::Salted(_) => storage::SALTED_HEADER_LEN,
    }
}

/// The header fields of `target`'s segment `segment`.
fn fields(target: NodeId, segment: u64) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[0..8].copy_from_slice(&target.0.to_le_bytes());
    f[8..16].copy_from_slice(&segment.to_le_bytes());
    f
}

/// Checks a segment header against the expected target and segment id; returns how
/// the segment's records are framed (by its version).
pub(crate) fn check_segment_header(
    bytes: &[u8],
    target: NodeId,
    segment: u64,
) -> Result<Frame, HeaderProblem> {
    let (version, got) = storage::check_header(bytes, &SEGMENT_MAGIC)?;
    let want = fields(target, segment);
    if got[0..8] != want[0..8] {
        return Err(HeaderProblem::Bad("segment belongs to another target"));
    }
    if got[8..16] != want[8..16] {
        return Err(HeaderProblem::Bad("segment id does not match file name"));
    }
    match version {
        SEGMENT_VERSION => Ok(Frame::Salted(storage::check_salt(bytes)?)),
        SEGMENT_VERSION_PLAIN => Ok(Frame::Plain),
        _ => Err(HeaderProblem::Bad("unsupported format version")),
    }
}

/// Encodes `hint` as one complete record (prefix + body) framed by `frame`. `None` if
/// the encoded body would exceed [`MAX_RECORD_BODY`].
pub(crate) fn encode_record(hint: &Hint, frame: Frame) -> Option<Vec<u8>> {
    let header = RecordHeader {
        target: hint.target,
        id: hint.id,
        channel: hint.channel,
        guarantee: hint.guarantee,
        created_unix_ms: hint.created_unix_ms,
        ttl_ms: hint.ttl_ms,
    };
    let hdr = bincode::encode_to_vec(&header, bincode_config()).ok()?;
    let hdr_len = u16::try_from(hdr.len()).ok()?;
    if 2 + hdr.len() + hint.payload.len() > MAX_RECORD_BODY {
        return None;
    }
    let mut out = Vec::with_capacity(frame.prefix_len() + 2 + hdr.len() + hint.payload.len());
    FRAMING
        .encode(frame, &mut out, |b| {
            b.extend_from_slice(&hdr_len.to_le_bytes());
            b.extend_from_slice(&hdr);
            b.extend_from_slice(&hint.payload);
        })
        .then_some(out)
}

/// Checks the record starting at `bytes[0]` without allocating the payload.
pub(crate) fn check_record(bytes: &[u8], frame: Frame) -> RecordAt {
    FRAMING.check(frame, bytes, |body| decode_body(body).is_some())
}

/// Re-keys a record encoded for a segment of another salt for a segment of `frame`
/// (only its prefix check changes).
pub(crate) fn salt_record(record: &mut [u8], frame: Frame) {
    if let Frame::Salted(salt) = frame {
        storage::salt_record(record, salt);
    }
}

/// Decodes one complete record (prefix + body, exactly `len` bytes as found by the scan),
/// re-checking the crc. `None` if anything is wrong.
#[cfg(test)]
pub(crate) fn decode_record(bytes: &[u8], frame: Frame) -> Option<Hint> {
    decode_record_in(&Bytes::copy_from_slice(bytes), 0, bytes.len(), frame)
}

/// Decodes the record of `len` bytes at `at` in `span` (a segment's records framed by
/// `frame`), re-checking the crc; the payload shares `span`'s buffer (no copy). `None`
/// if anything is wrong.
pub(crate) fn decode_record_in(span: &Bytes, at: usize, len: usize, frame: Frame) -> Option<Hint> {
    let bytes = span.get(at..at.checked_add(len)?)?;
    match check_record(bytes, frame) {
        RecordAt::Valid { len: l } if l == len => {}
        _ => return None,
    }
    let (header, payload) = decode_body(&bytes[frame.prefix_len()..])?;
    let payload_start = at + len - payload.len();
    Some(Hint {
        target: header.target,
        id: header.id,
        channel: header.channel,
        guarantee: header.guarantee,
        created_unix_ms: header.created_unix_ms,
        ttl_ms: header.ttl_ms,
        payload: span.slice(payload_start..at + len),
    })
}

/// The record header fields the store indexes.
pub(crate) struct RecordMeta {
    pub(crate) target: NodeId,
    pub(crate) created_unix_ms: u64,
    pub(crate) ttl_ms: u64,
    pub(crate) id: MessageId,
    pub(crate) guarantee: Guarantee,
}

/// Reads the record header fields the store indexes from a record (framed by `frame`)
/// the scan has validated.
pub(crate) fn record_meta(bytes: &[u8], frame: Frame) -> Option<RecordMeta> {
    let (h, _) = decode_body(bytes.get(frame.prefix_len()..)?)?;
    Some(RecordMeta {
        target: h.target,
        created_unix_ms: h.created_unix_ms,
        ttl_ms: h.ttl_ms,
        id: h.id,
        guarantee: h.guarantee,
    })
}

fn decode_body(body: &[u8]) -> Option<(RecordHeader, &[u8])> {
    let hdr_len = u16::from_le_bytes([*body.first()?, *body.get(1)?]) as usize;
    let hdr = body.get(2..2 + hdr_len)?;
    let (header, used): (RecordHeader, usize) =
        bincode::decode_from_slice(hdr, bincode_config()).ok()?;
    if used != hdr_len {
        return None;
    }
    Some((header, &body[2 + hdr_len..]))
}

/// Scans the records after the header of a segment whose records are framed by
/// `frame` (see [`storage::Framing::scan`]): keeps every valid record, skips corrupt
/// ones, and reports where the intact part ends.
pub(crate) fn scan_segment(bytes: &[u8], frame: Frame) -> Scan {
    FRAMING.scan(frame, bytes, header_len(frame), |body| {
        decode_body(body).is_some()
    })
}

/// Persisted delivery progress of one segment: every record at an offset below
/// `done_below` is done, plus the records at the offsets in `done`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub(crate) struct SegmentCursor {
    pub(crate) segment: u64,
    pub(crate) done_below: u64,
    pub(crate) done: Vec<u64>,
}

/// Persisted delivery progress of one target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub(crate) struct CursorState {
    /// Segment ids below this were used once and must never be reused.
    pub(crate) next_segment: u64,
    pub(crate) segments: Vec<SegmentCursor>,
}

/// Encodes a cursor file: magic, version, body length, crc32c, bincode body.
pub(crate) fn encode_cursor(state: &CursorState) -> Vec<u8> {
    let body = bincode::encode_to_vec(state, bincode::config::standard()).unwrap_or_default();
    let mut out = Vec::with_capacity(CURSOR_PREFIX_LEN + body.len());
    out.extend_from_slice(&CURSOR_MAGIC);
    out.extend_from_slice(&CURSOR_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a cursor file; `None` if it is damaged in any way.
pub(crate) fn decode_cursor(bytes: &[u8]) -> Option<CursorState> {
    if bytes.len() < CURSOR_PREFIX_LEN || bytes[0..4] != CURSOR_MAGIC {
        return None;
    }
    if u16::from_le_bytes([bytes[4], bytes[5]]) != CURSOR_VERSION || bytes[6..8] != [0, 0] {
        return None;
    }
    let len = u32_at(bytes, 8) as usize;
    let body = bytes.get(CURSOR_PREFIX_LEN..CURSOR_PREFIX_LEN.checked_add(len)?)?;
    if CURSOR_PREFIX_LEN + len != bytes.len() || crc32c::crc32c(body) != u32_at(bytes, 12) {
        return None;
    }
    let (state, used) = bincode::decode_from_slice(body, bincode::config::standard()).ok()?;
    (used == len).then_some(state)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{IdKey, Origin};

    fn hint(n: u64, payload: &[u8]) -> Hint {
        Hint {
            target: NodeId(7),
            id: MessageId::Seq {
                origin: Origin {
                    node: NodeId(1),
                    incarnation: 9,
                },
                channel: ChannelId(2),
                seq: n,
            },
            channel: ChannelId(2),
            guarantee: Guarantee::EffectivelyOnce,
            created_unix_ms: 1_000 + n,
            ttl_ms: 60_000,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    const S: Frame = Frame::Salted(0xFEED);

    #[test]
    fn record_roundtrips_and_crc_catches_a_flipped_bit() {
        for frame in [S, Frame::Plain] {
            let h = hint(3, b"hello");
            let rec = encode_record(&h, frame).unwrap();
            assert_eq!(
                check_record(&rec, frame),
                RecordAt::Valid { len: rec.len() }
            );
            assert_eq!(decode_record(&rec, frame).unwrap(), h);
            for i in 0..rec.len() {
                let mut bad = rec.clone();
                bad[i] ^= 0x10;
                assert!(decode_record(&bad, frame).is_none(), "flip at {i} accepted");
            }
            let k = Hint {
                id: MessageId::Key(IdKey(u128::MAX)),
                ..hint(1, b"")
            };
            assert_eq!(
                decode_record(&encode_record(&k, frame).unwrap(), frame).unwrap(),
                k
            );
        }
        let mut rec = encode_record(&hint(3, b"x"), S).unwrap();
        let other = Frame::Salted(7);
        assert!(
            decode_record(&rec, other).is_none(),
            "another segment's salt"
        );
        salt_record(&mut rec, other);
        assert!(decode_record(&rec, other).is_some());
    }

    #[test]
    fn scan_resyncs_after_a_corrupt_record_and_stops_at_a_torn_tail() {
        let plain = encode_plain_segment_header(NodeId(7), 0).to_vec();
        let salted = encode_segment_header(NodeId(7), 0, 0xFEED).to_vec();
        for (header, frame) in [(plain, Frame::Plain), (salted, S)] {
            assert_eq!(check_segment_header(&header, NodeId(7), 0), Ok(frame));
            let mut seg = header;
            let r: Vec<Vec<u8>> = (0..3)
                .map(|i| encode_record(&hint(i, b"abc"), frame).unwrap())
                .collect();
            for x in &r {
                seg.extend_from_slice(x);
            }
            let mid = header_len(frame) + r[0].len() + 18;
            seg[mid] ^= 0xff;
            seg.extend_from_slice(&r[0][..5]);
            let scan = scan_segment(&seg, frame);
            assert_eq!(scan.items.len(), 3, "{frame:?}");
            assert!(matches!(scan.items[1], ScanItem::Corrupt { .. }));
            assert_eq!(
                scan.keep_len as usize,
                seg.len() - 5,
                "torn 5-byte tail must be cut"
            );
        }
    }

    #[test]
    fn header_and_cursor_reject_damage() {
        let h = encode_segment_header(NodeId(7), 4, 99);
        assert_eq!(
            check_segment_header(&h, NodeId(7), 4),
            Ok(Frame::Salted(99))
        );
        assert_eq!(
            check_segment_header(&h[..40], NodeId(7), 4),
            Err(HeaderProblem::Short)
        );
        for i in 0..h.len() {
            let mut bad = h;
            bad[i] ^= 1;
            assert!(
                check_segment_header(&bad, NodeId(7), 4).is_err(),
                "byte {i}"
            );
        }
        assert!(check_segment_header(&h, NodeId(8), 4).is_err());
        assert!(check_segment_header(&h, NodeId(7), 5).is_err());
        assert_eq!(
            check_segment_header(&h[..10], NodeId(7), 4),
            Err(HeaderProblem::Short)
        );
        let st = CursorState {
            next_segment: 5,
            segments: vec![SegmentCursor {
                segment: 4,
                done_below: 100,
                done: vec![200, 300],
            }],
        };
        let enc = encode_cursor(&st);
        assert_eq!(decode_cursor(&enc), Some(st));
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 1;
            assert_eq!(decode_cursor(&bad), None, "flip at {i}");
        }
        assert_eq!(decode_cursor(&enc[..enc.len() - 1]), None);
    }
}
