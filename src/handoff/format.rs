//! On-disk byte formats of the hint log: segment header, hint records, ack cursor.
//!
//! Owns encoding, decoding and the recovery scan of one segment's bytes. Must not do IO,
//! keep state across calls, or panic on any input: every decoder returns `None`/a scan
//! outcome for bad bytes.
//!
//! Segment file = header (32 bytes) followed by records:
//!
//! ```text
//! header : magic "ACKWHINT" | version u16 LE | reserved u16 | target u64 LE
//!          | segment id u64 LE | crc32c u32 LE (of the 28 bytes before it)
//! record : REC_MAGIC u32 LE | body_len u32 LE | crc32c u32 LE | body
//!          crc32c covers the body_len bytes and the body
//! body   : header_len u16 LE | bincode-2 RecordHeader | payload (raw)
//! ```
//!
//! The record magic plus crc lets the scan resynchronise after a corrupt record: it looks
//! for the next offset where a complete record with a matching crc starts.

use super::Hint;
use crate::id::{ChannelId, Guarantee, MessageId, NodeId};
use bincode::{Decode, Encode};
use bytes::Bytes;

/// Magic bytes opening every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"ACKWHINT";
/// Segment format version written by this code; other versions are quarantined.
pub(crate) const SEGMENT_VERSION: u16 = 1;
/// Length of the segment header in bytes.
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
/// Magic opening every record ("AKWH" read as little-endian u32).
pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"AKWH");
/// Bytes before the record body: magic, body length, crc.
pub(crate) const RECORD_PREFIX_LEN: usize = 12;
/// Largest record body accepted (64 MiB); larger length fields are treated as corrupt.
pub(crate) const MAX_RECORD_BODY: usize = 64 << 20;

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

/// Encodes a segment header for `target`'s segment `segment`.
pub(crate) fn encode_segment_header(target: NodeId, segment: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&target.0.to_le_bytes());
    h[20..28].copy_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a segment header was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    /// Fewer bytes than a header: the segment was torn while being created.
    Short,
    /// Magic, crc, version, target or segment id do not match.
    Bad(&'static str),
}

/// Checks a segment header against the expected target and segment id.
pub(crate) fn check_segment_header(
    bytes: &[u8],
    target: NodeId,
    segment: u64,
) -> Result<(), HeaderProblem> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderProblem::Short);
    }
    let h = &bytes[..SEGMENT_HEADER_LEN];
    if h[0..8] != SEGMENT_MAGIC {
        return Err(HeaderProblem::Bad("bad magic"));
    }
    if crc32c::crc32c(&h[0..28]) != u32_at(h, 28) {
        return Err(HeaderProblem::Bad("header crc mismatch"));
    }
    if u16::from_le_bytes([h[8], h[9]]) != SEGMENT_VERSION {
        return Err(HeaderProblem::Bad("unsupported format version"));
    }
    if u64_at(h, 12) != target.0 {
        return Err(HeaderProblem::Bad("segment belongs to another target"));
    }
    if u64_at(h, 20) != segment {
        return Err(HeaderProblem::Bad("segment id does not match file name"));
    }
    Ok(())
}

/// Encodes `hint` as one complete record (prefix + body). `None` if the encoded body
/// would exceed [`MAX_RECORD_BODY`].
pub(crate) fn encode_record(hint: &Hint) -> Option<Vec<u8>> {
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
    let body_len = 2 + hdr.len() + hint.payload.len();
    if body_len > MAX_RECORD_BODY {
        return None;
    }
    let mut out = Vec::with_capacity(RECORD_PREFIX_LEN + body_len);
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&hdr_len.to_le_bytes());
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&hint.payload);
    let crc = record_crc(&out[4..8], &out[RECORD_PREFIX_LEN..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    Some(out)
}

/// Outcome of looking at the bytes starting at one offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecordAt {
    /// A complete record whose crc matches and whose body decodes; `len` bytes long.
    Valid { len: usize },
    /// Not enough bytes for the record the prefix announces (or for a prefix).
    Incomplete,
    /// Magic, length, crc or body decoding is wrong.
    Corrupt,
}

/// Checks the record starting at `bytes[0]` without allocating the payload.
pub(crate) fn check_record(bytes: &[u8]) -> RecordAt {
    if bytes.len() < RECORD_PREFIX_LEN {
        return RecordAt::Incomplete;
    }
    if u32_at(bytes, 0) != RECORD_MAGIC {
        return RecordAt::Corrupt;
    }
    let body_len = u32_at(bytes, 4) as usize;
    if !(2..=MAX_RECORD_BODY).contains(&body_len) {
        return RecordAt::Corrupt;
    }
    let total = RECORD_PREFIX_LEN + body_len;
    if bytes.len() < total {
        return RecordAt::Incomplete;
    }
    if record_crc(&bytes[4..8], &bytes[RECORD_PREFIX_LEN..total]) != u32_at(bytes, 8) {
        return RecordAt::Corrupt;
    }
    match decode_body(&bytes[RECORD_PREFIX_LEN..total]) {
        Some(_) => RecordAt::Valid { len: total },
        None => RecordAt::Corrupt,
    }
}

/// Decodes one complete record (prefix + body, exactly `len` bytes as found by the scan),
/// re-checking the crc. `None` if anything is wrong.
#[cfg(test)]
pub(crate) fn decode_record(bytes: &[u8]) -> Option<Hint> {
    decode_record_in(&Bytes::copy_from_slice(bytes), 0, bytes.len())
}

/// Decodes the record of `len` bytes at `at` in `span`, re-checking the crc; the payload
/// shares `span`'s buffer (no copy). `None` if anything is wrong.
pub(crate) fn decode_record_in(span: &Bytes, at: usize, len: usize) -> Option<Hint> {
    let bytes = span.get(at..at.checked_add(len)?)?;
    match check_record(bytes) {
        RecordAt::Valid { len: l } if l == len => {}
        _ => return None,
    }
    let (header, payload) = decode_body(&bytes[RECORD_PREFIX_LEN..])?;
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

/// Reads the record header fields the store indexes (target, created, ttl) from a record
/// the scan has validated.
pub(crate) fn record_meta(bytes: &[u8]) -> Option<(NodeId, u64, u64)> {
    let (h, _) = decode_body(bytes.get(RECORD_PREFIX_LEN..)?)?;
    Some((h.target, h.created_unix_ms, h.ttl_ms))
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

fn record_crc(len_bytes: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_bytes), body)
}

/// One region the recovery scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanItem {
    /// A valid record at `offset`, `len` bytes long.
    Record { offset: u64, len: u32 },
    /// `len` corrupt bytes at `offset`, followed by a valid record (skipped).
    Corrupt { offset: u64, len: u64 },
}

/// Result of scanning one segment's bytes (header included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Valid records and skipped corrupt regions in file order.
    pub(crate) items: Vec<ScanItem>,
    /// Length of the intact part; bytes after it are a torn/corrupt tail with no valid
    /// record after them and should be truncated.
    pub(crate) keep_len: u64,
}

/// Scans records after the header: keeps every valid record, resynchronises after a corrupt
/// region on the next valid record, and reports where the intact part ends.
pub(crate) fn scan_segment(bytes: &[u8]) -> Scan {
    let mut scan = Scan::default();
    let mut at = SEGMENT_HEADER_LEN.min(bytes.len());
    loop {
        if at >= bytes.len() {
            scan.keep_len = at as u64;
            return scan;
        }
        match check_record(&bytes[at..]) {
            RecordAt::Valid { len } => {
                scan.items.push(ScanItem::Record {
                    offset: at as u64,
                    len: len as u32,
                });
                at += len;
            }
            RecordAt::Incomplete | RecordAt::Corrupt => match resync(bytes, at + 1) {
                Some(next) => {
                    scan.items.push(ScanItem::Corrupt {
                        offset: at as u64,
                        len: (next - at) as u64,
                    });
                    at = next;
                }
                None => {
                    scan.keep_len = at as u64;
                    return scan;
                }
            },
        }
    }
}

/// The first offset `>= from` where a valid record starts.
fn resync(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut at = from;
    while at + RECORD_PREFIX_LEN <= bytes.len() {
        let rel = bytes[at..].windows(4).position(|w| w == magic)?;
        at += rel;
        if let RecordAt::Valid { .. } = check_record(&bytes[at..]) {
            return Some(at);
        }
        at += 1;
    }
    None
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

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
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

    #[test]
    fn record_roundtrips_and_crc_catches_a_flipped_bit() {
        let h = hint(3, b"hello");
        let rec = encode_record(&h).unwrap();
        assert_eq!(check_record(&rec), RecordAt::Valid { len: rec.len() });
        assert_eq!(decode_record(&rec).unwrap(), h);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            assert!(decode_record(&bad).is_none(), "flip at {i} accepted");
        }
        let k = Hint {
            id: MessageId::Key(IdKey(u128::MAX)),
            ..hint(1, b"")
        };
        assert_eq!(decode_record(&encode_record(&k).unwrap()).unwrap(), k);
    }

    #[test]
    fn scan_resyncs_after_a_corrupt_record_and_stops_at_a_torn_tail() {
        let mut seg = encode_segment_header(NodeId(7), 0).to_vec();
        let r: Vec<Vec<u8>> = (0..3)
            .map(|i| encode_record(&hint(i, b"abc")).unwrap())
            .collect();
        for x in &r {
            seg.extend_from_slice(x);
        }
        let mid = SEGMENT_HEADER_LEN + r[0].len() + 14;
        seg[mid] ^= 0xff;
        seg.extend_from_slice(&r[0][..5]);
        let scan = scan_segment(&seg);
        assert_eq!(scan.items.len(), 3);
        assert!(matches!(scan.items[1], ScanItem::Corrupt { .. }));
        assert_eq!(
            scan.keep_len as usize,
            seg.len() - 5,
            "torn 5-byte tail must be cut"
        );
    }

    #[test]
    fn header_and_cursor_reject_damage() {
        let h = encode_segment_header(NodeId(7), 4);
        assert_eq!(check_segment_header(&h, NodeId(7), 4), Ok(()));
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
