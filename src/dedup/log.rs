//! The durable dedup log: one append-only file of completion records.
//!
//! Owns the on-disk format, recovery (torn tail truncated, corrupt records skipped and
//! counted) and compaction (the live state rewritten as a fresh log, then renamed over
//! the old one). Must not decide what is a duplicate: it only stores and returns records.
//!
//! # Format
//!
//! Since version 3 the log is the shared durable-log layout of [`crate::storage`].
//! Version 4 (written by this build): a 48-byte salted header (magic `b"AWDEDUP\0"`,
//! version 4, no fields of its own, the file's random salt), then salted records
//! `magic "AKWD" | length | prefix check (crc32c of salt, magic, length) | crc32c of
//! the payload | payload`, recovered by the shared scan (a record is trusted for its
//! length once its salted prefix checks out). Version 3: a 32-byte header (no salt) and
//! plain records `magic "AKWD" | length | crc32c of length and payload | payload`.
//! Payloads: `1` seq done / `2` floor — `tag u8, node u64, incarnation u64,
//! channel u32, seq u64` (29 bytes); `3` key done — `tag u8, key u128, unix_ms u64`
//! (25 bytes); since version 2: `5` stream active — `tag u8, node u64, incarnation
//! u64, channel u32, unix_ms u64` (29 bytes); `4` stream retired — `tag u8, node u64,
//! incarnation u64, channel u32, watermark u64, max_seen u64, finished u8, unix_ms u64`
//! (46 bytes). All integers little-endian.
//!
//! Versions 1 and 2 had a 16-byte header (magic, version `u32` LE, 4 zero bytes) and
//! records framed as `length u32 | crc32c u32 | payload`, without a record magic
//! (version 2 only added record kinds). A log of versions 1 to 3 is read with its
//! framing and rewritten as version 4 (to a temporary file, then renamed over it) before
//! anything is appended; an older build then refuses the file instead of misreading
//! it. Every rewrite (compaction too) draws a new salt.

use std::path::Path;

use super::{DedupError, FsyncPolicy};
use crate::storage::file::{DiskFile, LogFile};
use crate::storage::{self, Frame, Framing, ScanItem};
use crate::{ChannelId, IdKey, NodeId, Origin};

pub(crate) const MAGIC: &[u8; 8] = b"AWDEDUP\0";
pub(crate) const VERSION: u16 = 4;
/// The last format version with plain (unsalted) records.
pub(crate) const PLAIN_VERSION: u16 = 3;
/// The oldest format version this build reads.
const MIN_VERSION: u32 = 1;
/// The header of format 4.
pub(crate) const HEADER_LEN: usize = storage::SALTED_HEADER_LEN;
/// The header of format 3.
pub(crate) const PLAIN_HEADER_LEN: usize = storage::HEADER_LEN;
/// The header of formats 1 and 2.
pub(crate) const LEGACY_HEADER_LEN: usize = 16;
/// The record framing since format 3 (plain in 3, salted since 4).
const FRAMING: Framing = Framing {
    magic: u32::from_le_bytes(*b"AKWD"),
    min_body: KEY_LEN,
    max_body: RETIRED_LEN,
};
const SEQ_LEN: usize = 29;
const KEY_LEN: usize = 25;
const RETIRED_LEN: usize = 46;
pub(crate) const LOG_NAME: &str = "dedup.log";

/// One durable fact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    SeqDone(Origin, ChannelId, u64),
    Floor(Origin, ChannelId, u64),
    KeyDone(IdKey, u64),
    /// The stream was active at this wall-clock time (ms).
    Active(Origin, ChannelId, u64),
    /// The stream was retired.
    Retired(Origin, ChannelId, RetiredRecord),
}

/// The payload of a stream-retired record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetiredRecord {
    pub(crate) watermark: u64,
    pub(crate) max_seen: u64,
    pub(crate) finished: bool,
    pub(crate) unix_ms: u64,
}

/// What recovery found.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    pub(crate) records: Vec<Record>,
    pub(crate) corrupt_skipped: u64,
    pub(crate) torn_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct DedupLog {
    io: Box<dyn LogFile>,
    /// The salt of the file's records.
    salt: u64,
    len: u64,
    fsync: FsyncPolicy,
    /// Records appended since the last [`DedupLog::sync`], encoded, not yet written:
    /// the next sync writes them with one `write` call.
    buf: Vec<u8>,
    /// Bytes written since the last fsync (group commit).
    unsynced: bool,
    /// A failed write may have left part of a record after `len`, and cutting it off
    /// failed too: cut it before anything else is written.
    torn: bool,
}

impl DedupLog {
    /// Opens (creating if needed) the log in `dir` and recovers its records.
    pub(crate) fn open(
        dir: &Path,
        fsync: FsyncPolicy,
    ) -> Result<(DedupLog, Recovered), DedupError> {
        Self::open_on(Box::new(DiskFile::open(dir, LOG_NAME)?), fsync)
    }

    /// Opens the log held by `io` and recovers its records: a new (or torn while
    /// created) file gets a header; a format 1, 2 or 3 log is rewritten as format 4;
    /// a torn tail is cut.
    pub(crate) fn open_on(
        mut io: Box<dyn LogFile>,
        fsync: FsyncPolicy,
    ) -> Result<(DedupLog, Recovered), DedupError> {
        let bytes = io.read_all()?;
        // `salt`: `None` for a log of an older format, rewritten before use.
        let (rec, keep, salt) = if is_fresh(&bytes) {
            // New file, or a header torn while being created: start over.
            let salt = storage::new_salt();
            io.truncate(0)?;
            io.append(&header(salt))?;
            sync(io.as_mut(), fsync)?;
            (Recovered::default(), HEADER_LEN as u64, Some(salt))
        } else {
            match check_header(&bytes, io.path())? {
                (_, Frame::Salted(salt)) => {
                    let (rec, keep) = parse(&bytes[HEADER_LEN..], Frame::Salted(salt));
                    let keep = (HEADER_LEN + keep) as u64;
                    if keep < bytes.len() as u64 {
                        io.truncate(keep)?;
                    }
                    // What a crashed run wrote but did not fsync is in the OS's cache
                    // only: make it durable before anything (an ack of a duplicate)
                    // relies on it.
                    sync(io.as_mut(), fsync)?;
                    (rec, keep, Some(salt))
                }
                (v, Frame::Plain) if v == u32::from(PLAIN_VERSION) => {
                    let (rec, _) = parse(&bytes[PLAIN_HEADER_LEN..], Frame::Plain);
                    (rec, bytes.len() as u64, None)
                }
                (_, Frame::Plain) => {
                    let (rec, _) = parse_legacy(&bytes[LEGACY_HEADER_LEN..]);
                    (rec, bytes.len() as u64, None)
                }
            }
        };
        let mut log = DedupLog {
            io,
            salt: salt.unwrap_or(0),
            len: keep,
            fsync,
            buf: Vec::with_capacity(64),
            unsynced: false,
            torn: false,
        };
        if salt.is_none() {
            // Formats 1 to 3 become format 4 before anything is appended.
            log.rewrite(&rec.records)?;
        }
        Ok((log, rec))
    }

    /// Appends one record and writes and fsyncs (per the policy) it and every record
    /// buffered before it.
    #[cfg(test)]
    pub(crate) fn append(&mut self, r: &Record) -> Result<(), DedupError> {
        self.append_unsynced(r);
        self.sync()
    }

    /// Buffers one record in memory (no IO): the next [`DedupLog::sync`] writes the
    /// buffer with one `write` call and fsyncs it (group commit).
    pub(crate) fn append_unsynced(&mut self, r: &Record) {
        encode(r, Frame::Salted(self.salt), &mut self.buf);
    }

    /// Drops the buffered records unwritten (the log was closed: its directory may
    /// be another node's now).
    pub(crate) fn discard_buffered(&mut self) {
        self.buf.clear();
    }

    /// Records buffered and not yet written.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes the buffered records (one `write`), then fsyncs (per the policy) what
    /// was written since the last sync. A failed write drops the buffer (the error
    /// says so; the caller counts it) instead of retrying it forever.
    ///
    /// A failed write is cut off the file (what it wrote of a record would otherwise
    /// sit between records: recovery skips a damaged record by its length, which
    /// would swallow the start of the next batch's first record, acknowledged once
    /// synced). If the cut fails too, nothing more is written until it succeeds.
    pub(crate) fn sync(&mut self) -> Result<(), DedupError> {
        if !self.buf.is_empty() {
            if self.torn {
                if let Err(e) = self.io.truncate(self.len) {
                    self.buf.clear();
                    return Err(e.into());
                }
                self.torn = false;
            }
            let r = self.io.append(&self.buf);
            let n = self.buf.len() as u64;
            self.buf.clear();
            if let Err(e) = r {
                self.torn = self.io.truncate(self.len).is_err();
                return Err(e.into());
            }
            self.len += n;
            self.unsynced = true;
        }
        if std::mem::take(&mut self.unsynced) {
            sync(self.io.as_mut(), self.fsync)?;
        }
        Ok(())
    }

    /// Length in bytes the file has once the buffered records are written.
    pub(crate) fn len(&self) -> u64 {
        self.len + self.buf.len() as u64
    }

    /// Replaces the log with exactly `records`, atomically (a crash leaves the old log
    /// or the new one), as a format 4 file of a new salt.
    pub(crate) fn rewrite(&mut self, records: &[Record]) -> Result<(), DedupError> {
        let salt = storage::new_salt();
        let frame = Frame::Salted(salt);
        let mut out =
            Vec::with_capacity(HEADER_LEN + records.len() * (frame.prefix_len() + SEQ_LEN));
        out.extend_from_slice(&header(salt));
        for r in records {
            encode(r, frame, &mut out);
        }
        // The whole rewrite (a large write, then its fsyncs) runs as one blocking call.
        let io = &mut self.io;
        crate::blocking::run(|| io.replace(&out))?;
        self.salt = salt;
        self.len = out.len() as u64;
        // The live state holds what the buffered records said.
        self.buf.clear();
        self.unsynced = false;
        self.torn = false;
        Ok(())
    }
}

impl Drop for DedupLog {
    /// A clean close writes and syncs what is still buffered (a crash loses it, as it
    /// loses anything not yet synced; nothing buffered has been acknowledged).
    fn drop(&mut self) {
        if self.has_buffered() {
            if let Err(e) = self.sync() {
                tracing::warn!(error = %e, "dedup records not written at close");
            }
        }
    }
}

fn sync(io: &mut dyn LogFile, p: FsyncPolicy) -> Result<(), DedupError> {
    match p {
        // `Every` is refused by `DedupConfig::validate`; were it to get here, it is
        // never synced less than asked.
        // The fsync runs under `blocking::run` inside `LogFile::sync`.
        FsyncPolicy::Always | FsyncPolicy::Every(_) => Ok(io.sync()?),
        FsyncPolicy::Never => Ok(()),
    }
}

/// The header this build writes (format 4), for a file of `salt`.
pub(crate) fn header(salt: u64) -> [u8; HEADER_LEN] {
    storage::salted_header(MAGIC, VERSION, [0; 16], salt)
}

/// The header of format 3 (no salt).
pub(crate) fn plain_header() -> [u8; PLAIN_HEADER_LEN] {
    storage::header(MAGIC, PLAIN_VERSION, [0; 16])
}

/// Is `bytes` a new file, or one whose header was torn while being created (a prefix
/// of a header; of a format 4 header, the part before its salt is known)?
pub(crate) fn is_fresh(bytes: &[u8]) -> bool {
    let known = &header(0)[..PLAIN_HEADER_LEN];
    let n = bytes.len().min(PLAIN_HEADER_LEN);
    (bytes.len() < HEADER_LEN && bytes[..n] == known[..n])
        || (bytes.len() < PLAIN_HEADER_LEN && plain_header().starts_with(bytes))
        || (bytes.len() < LEGACY_HEADER_LEN && legacy_header(2).starts_with(bytes))
}

/// The header of format `version` (1 or 2).
pub(crate) fn legacy_header(version: u32) -> [u8; LEGACY_HEADER_LEN] {
    let mut h = [0u8; LEGACY_HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h
}

/// The format version of a log whose header is intact, and its framing (`Plain` for
/// formats 1 to 3, each read with its own).
pub(crate) fn check_header(bytes: &[u8], path: &Path) -> Result<(u32, Frame), DedupError> {
    let bad = |reason| DedupError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < LEGACY_HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(bad("not an ackwire dedup log (bad magic)"));
    }
    // Formats 1 and 2 hold a u32 version there; formats 3 and 4 a u16 and a zero u16.
    let v = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(MIN_VERSION..=u32::from(VERSION)).contains(&v) {
        return Err(bad("unsupported dedup log version"));
    }
    if v >= u32::from(PLAIN_VERSION) && storage::check_header(bytes, MAGIC).is_err() {
        return Err(bad("damaged dedup log header (crc mismatch or torn)"));
    }
    if v < u32::from(PLAIN_VERSION) && damaged_current_header(bytes) {
        // A format 3 or 4 header whose version bits flipped: read as an older format,
        // its records would all be lost.
        return Err(bad("damaged dedup log header (version)"));
    }
    if v == u32::from(VERSION) {
        return match storage::check_salt(bytes) {
            Ok(salt) => Ok((v, Frame::Salted(salt))),
            Err(_) => Err(bad("damaged dedup log header (salt crc mismatch or torn)")),
        };
    }
    Ok((v, Frame::Plain))
}

/// Is this a format 3 or 4 header with only its version field damaged (its crc
/// matches once the version is put back)?
pub(crate) fn damaged_current_header(bytes: &[u8]) -> bool {
    let Some(h) = bytes.get(..PLAIN_HEADER_LEN) else {
        return false;
    };
    [PLAIN_VERSION, VERSION].iter().any(|&v| {
        let mut h = h.to_vec();
        h[8..12].copy_from_slice(&u32::from(v).to_le_bytes());
        storage::check_header(&h, MAGIC).is_ok()
    })
}

/// Appends `r` as one framed record (format 3: `Plain`; format 4: `Salted`).
pub(crate) fn encode(r: &Record, frame: Frame, out: &mut Vec<u8>) {
    let framed = FRAMING.encode(frame, out, |b| payload(r, b));
    debug_assert!(framed, "every payload is within the framing's lengths");
}

/// Appends `r` in the framing of formats 1 and 2 (length, crc, payload), to build
/// legacy logs in tests and fuzz inputs.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn encode_legacy(r: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    payload(r, out);
    let len = (out.len() - start - 8) as u32;
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn payload(r: &Record, out: &mut Vec<u8>) {
    match *r {
        Record::SeqDone(o, c, s) | Record::Floor(o, c, s) => {
            out.push(if matches!(r, Record::SeqDone(..)) {
                1
            } else {
                2
            });
            out.extend_from_slice(&o.node.0.to_le_bytes());
            out.extend_from_slice(&o.incarnation.to_le_bytes());
            out.extend_from_slice(&c.0.to_le_bytes());
            out.extend_from_slice(&s.to_le_bytes());
        }
        Record::KeyDone(k, ms) => {
            out.push(3);
            out.extend_from_slice(&k.0.to_le_bytes());
            out.extend_from_slice(&ms.to_le_bytes());
        }
        Record::Active(o, c, ms) => {
            out.push(5);
            out.extend_from_slice(&o.node.0.to_le_bytes());
            out.extend_from_slice(&o.incarnation.to_le_bytes());
            out.extend_from_slice(&c.0.to_le_bytes());
            out.extend_from_slice(&ms.to_le_bytes());
        }
        Record::Retired(o, c, r) => {
            out.push(4);
            out.extend_from_slice(&o.node.0.to_le_bytes());
            out.extend_from_slice(&o.incarnation.to_le_bytes());
            out.extend_from_slice(&c.0.to_le_bytes());
            out.extend_from_slice(&r.watermark.to_le_bytes());
            out.extend_from_slice(&r.max_seen.to_le_bytes());
            out.push(u8::from(r.finished));
            out.extend_from_slice(&r.unix_ms.to_le_bytes());
        }
    }
}

fn decode(p: &[u8]) -> Option<Record> {
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    let stream = || {
        (
            Origin {
                node: NodeId(u64_at(1)),
                incarnation: u64_at(9),
            },
            ChannelId(u32::from_le_bytes(p[17..21].try_into().expect("4 bytes"))),
        )
    };
    match (p.first()?, p.len()) {
        (5, SEQ_LEN) => {
            let (o, c) = stream();
            Some(Record::Active(o, c, u64_at(21)))
        }
        (4, RETIRED_LEN) if p[37] <= 1 => {
            let (o, c) = stream();
            Some(Record::Retired(
                o,
                c,
                RetiredRecord {
                    watermark: u64_at(21),
                    max_seen: u64_at(29),
                    finished: p[37] == 1,
                    unix_ms: u64_at(38),
                },
            ))
        }
        (1 | 2, SEQ_LEN) => {
            let o = Origin {
                node: NodeId(u64_at(1)),
                incarnation: u64_at(9),
            };
            let c = ChannelId(u32::from_le_bytes(p[17..21].try_into().expect("4 bytes")));
            let s = u64_at(21);
            Some(if p[0] == 1 {
                Record::SeqDone(o, c, s)
            } else {
                Record::Floor(o, c, s)
            })
        }
        (3, KEY_LEN) => Some(Record::KeyDone(
            IdKey(u128::from_le_bytes(p[1..17].try_into().expect("16 bytes"))),
            u64_at(17),
        )),
        _ => None,
    }
}

/// Parses the record area of a format 3 (`Plain`) or 4 (`Salted`) log (after the
/// header); returns the records and how many bytes to keep (everything up to the end
/// of the last intact record; the rest is a torn or garbage tail).
pub(crate) fn parse(b: &[u8], frame: Frame) -> (Recovered, usize) {
    let scan = FRAMING.scan(frame, b, 0, |p| decode(p).is_some());
    let mut rec = Recovered::default();
    for item in &scan.items {
        match *item {
            ScanItem::Record { offset, len } => {
                let at = offset as usize + frame.prefix_len();
                rec.records
                    .extend(decode(&b[at..offset as usize + len as usize]));
            }
            ScanItem::Corrupt { .. } => rec.corrupt_skipped += 1,
        }
    }
    let keep = scan.keep_len as usize;
    rec.torn_bytes = (b.len() - keep) as u64;
    (rec, keep)
}

/// A well-formed record of formats 1 and 2 at the start of `b`: its length on disk and
/// value.
fn record_at(b: &[u8]) -> Option<(usize, Option<Record>)> {
    if b.len() < 8 {
        return None;
    }
    let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    if len != SEQ_LEN && len != KEY_LEN && len != RETIRED_LEN {
        return Some((0, None));
    }
    if b.len() < 8 + len {
        return None;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    let p = &b[8..8 + len];
    if crc32c::crc32c(p) != crc {
        return Some((8 + len, None));
    }
    Some((8 + len, decode(p)))
}

/// Parses the record area of a format 1 or 2 log; returns the records and how many
/// bytes to keep (everything up to the end of the last intact record; the rest is a
/// torn or garbage tail).
pub(crate) fn parse_legacy(b: &[u8]) -> (Recovered, usize) {
    let mut rec = Recovered::default();
    let mut pos = 0;
    let mut keep = 0;
    let mut in_corruption = false;
    while pos < b.len() {
        match record_at(&b[pos..]) {
            Some((n, Some(r))) => {
                rec.records.push(r);
                pos += n;
                keep = pos;
                in_corruption = false;
            }
            Some((_, None)) | None => {
                // Bad length, bad crc, or incomplete: resync byte by byte so one flipped
                // bit costs one record, not the rest of the log.
                if !in_corruption {
                    rec.corrupt_skipped += 1;
                    in_corruption = true;
                }
                pos += 1;
            }
        }
    }
    if in_corruption {
        // The trailing damage was a torn tail, not a skipped record.
        rec.corrupt_skipped -= 1;
    }
    rec.torn_bytes = (b.len() - keep) as u64;
    (rec, keep)
}

#[cfg(all(test, not(ackwire_loom)))]
mod tests {
    use super::*;

    #[test]
    fn encode_parse_round_trip_and_flip_costs_one_record() {
        let o = Origin {
            node: NodeId(1),
            incarnation: 9,
        };
        let recs = [
            Record::SeqDone(o, ChannelId(2), 3),
            Record::Floor(o, ChannelId(2), 10),
            Record::KeyDone(IdKey(u128::MAX - 5), 1234),
            Record::Active(o, ChannelId(2), 99),
            Record::Retired(
                o,
                ChannelId(2),
                RetiredRecord {
                    watermark: 10,
                    max_seen: 12,
                    finished: true,
                    unix_ms: 77,
                },
            ),
        ];
        for frame in [Frame::Salted(0xABC), Frame::Plain] {
            let mut b = Vec::new();
            for r in &recs {
                encode(r, frame, &mut b);
            }
            let (rec, keep) = parse(&b, frame);
            assert_eq!(rec.records, recs);
            assert_eq!(keep, b.len());
            b[frame.prefix_len() + 5] ^= 0x10; // inside the first payload
            let (rec, _) = parse(&b, frame);
            assert_eq!(rec.records, recs[1..]);
            assert_eq!(rec.corrupt_skipped, 1);
        }
    }

    use crate::storage::file::MemFile;

    fn seq(n: u64) -> Record {
        let o = Origin {
            node: NodeId(1),
            incarnation: 2,
        };
        Record::SeqDone(o, ChannelId(3), n)
    }

    fn open(disk: &MemFile, fsync: FsyncPolicy) -> (DedupLog, Recovered) {
        DedupLog::open_on(Box::new(disk.clone()), fsync).unwrap()
    }

    /// With `Always`, every record `append` returned for survives a power loss.
    #[test]
    fn with_always_every_appended_record_survives_a_power_loss() {
        let disk = MemFile::default();
        let (mut log, rec) = open(&disk, FsyncPolicy::Always);
        assert!(rec.records.is_empty());
        for n in 1..=5 {
            log.append(&seq(n)).unwrap();
        }
        drop(log);
        disk.lose_unsynced();
        let (_, rec) = open(&disk, FsyncPolicy::Always);
        assert_eq!(rec.records, (1..=5).map(seq).collect::<Vec<_>>());
        assert_eq!((rec.torn_bytes, rec.corrupt_skipped), (0, 0));
    }

    /// Group commit: a power loss or a process crash keeps exactly the records up to
    /// the last `sync` (the ones appended after it are only buffered); a clean close
    /// writes and syncs them.
    #[test]
    fn a_crash_keeps_what_the_last_group_commit_synced() {
        let disk = MemFile::default();
        let (mut log, _) = open(&disk, FsyncPolicy::Always);
        for n in 1..=3 {
            log.append_unsynced(&seq(n));
        }
        log.sync().unwrap();
        for n in 4..=6 {
            log.append_unsynced(&seq(n));
        }
        assert!(log.has_buffered());
        std::mem::forget(log); // a process crash: no destructor runs
        let (_, crashed) = open(&disk, FsyncPolicy::Always);
        assert_eq!(crashed.records, (1..=3).map(seq).collect::<Vec<_>>());
        let disk = MemFile::default();
        let (mut log, _) = open(&disk, FsyncPolicy::Always);
        for n in 1..=3 {
            log.append_unsynced(&seq(n));
        }
        log.sync().unwrap();
        log.append_unsynced(&seq(4));
        drop(log);
        disk.lose_unsynced();
        let (_, rec) = open(&disk, FsyncPolicy::Always);
        assert_eq!(
            rec.records,
            (1..=4).map(seq).collect::<Vec<_>>(),
            "a clean close syncs"
        );
    }

    /// A group commit is one write: however many records are buffered, `sync` hands
    /// the file one `append`.
    #[test]
    fn a_group_commit_writes_its_records_in_one_append() {
        #[derive(Debug)]
        struct Counting(MemFile, std::sync::Arc<std::sync::atomic::AtomicUsize>);
        impl LogFile for Counting {
            fn path(&self) -> &Path {
                self.0.path()
            }
            fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
                self.0.read_all()
            }
            fn append(&mut self, b: &[u8]) -> std::io::Result<()> {
                self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.0.append(b)
            }
            fn truncate(&mut self, len: u64) -> std::io::Result<()> {
                self.0.truncate(len)
            }
            fn sync(&mut self) -> std::io::Result<()> {
                self.0.sync()
            }
            fn replace(&mut self, b: &[u8]) -> std::io::Result<()> {
                self.0.replace(b)
            }
        }
        let disk = MemFile::default();
        let appends = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let io = Counting(disk.clone(), appends.clone());
        let (mut log, _) = DedupLog::open_on(Box::new(io), FsyncPolicy::Always).unwrap();
        let before = appends.load(std::sync::atomic::Ordering::Relaxed);
        for n in 1..=100 {
            log.append_unsynced(&seq(n));
        }
        assert_eq!(
            appends.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "buffered: no IO"
        );
        log.sync().unwrap();
        assert_eq!(
            appends.load(std::sync::atomic::Ordering::Relaxed),
            before + 1
        );
        disk.lose_unsynced();
        let (_, rec) = open(&disk, FsyncPolicy::Always);
        assert_eq!(rec.records, (1..=100).map(seq).collect::<Vec<_>>());
    }

    /// A write that fails half-way (a full disk: part of the batch reached the file)
    /// is cut off again, so the next batch, written once space is back, is whole at
    /// recovery. (Regression: the partial record stayed; recovery skipped it by its
    /// length and took the next batch's first record with it — a record whose ack had
    /// gone out as durable.) And if the cut fails too, nothing is written after the
    /// partial bytes until a cut succeeds.
    #[test]
    fn a_write_that_fails_half_way_does_not_cost_the_next_batch() {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        use std::sync::Arc;
        #[derive(Debug)]
        struct Full(MemFile, Arc<AtomicBool>, Arc<AtomicBool>);
        impl LogFile for Full {
            fn path(&self) -> &Path {
                self.0.path()
            }
            fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
                self.0.read_all()
            }
            fn append(&mut self, b: &[u8]) -> std::io::Result<()> {
                if self.1.load(Relaxed) {
                    self.0.append(&b[..b.len() / 2 + 3])?;
                    return Err(std::io::Error::other("no space left on device"));
                }
                self.0.append(b)
            }
            fn truncate(&mut self, len: u64) -> std::io::Result<()> {
                if self.2.load(Relaxed) {
                    return Err(std::io::Error::other("no space left on device"));
                }
                self.0.truncate(len)
            }
            fn sync(&mut self) -> std::io::Result<()> {
                self.0.sync()
            }
            fn replace(&mut self, b: &[u8]) -> std::io::Result<()> {
                self.0.replace(b)
            }
        }
        for cut_fails_once in [false, true] {
            let disk = MemFile::default();
            let (full, no_cut) = (
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicBool::new(false)),
            );
            let io = Full(disk.clone(), full.clone(), no_cut.clone());
            let (mut log, _) = DedupLog::open_on(Box::new(io), FsyncPolicy::Always).unwrap();
            for n in 1..=3 {
                log.append_unsynced(&seq(n));
            }
            log.sync().unwrap();
            full.store(true, Relaxed);
            no_cut.store(cut_fails_once, Relaxed);
            for n in 4..=6 {
                log.append_unsynced(&seq(n));
            }
            assert!(log.sync().is_err(), "the failed write is reported");
            full.store(false, Relaxed);
            if cut_fails_once {
                log.append_unsynced(&seq(7));
                assert!(
                    log.sync().is_err(),
                    "nothing written after the partial bytes"
                );
                no_cut.store(false, Relaxed);
            }
            for n in 8..=10 {
                log.append_unsynced(&seq(n));
            }
            log.sync().unwrap();
            drop(log);
            let (_, rec) = open(&disk, FsyncPolicy::Always);
            let want: Vec<Record> = [1, 2, 3, 8, 9, 10].into_iter().map(seq).collect();
            assert_eq!(rec.records, want, "cut fails once: {cut_fails_once}");
        }
    }

    /// A legacy log is rewritten as format 3 in one atomic step: a power loss right
    /// after the upgrade keeps every record, in format 4 (salted). Format 3 (plain
    /// records) likewise.
    #[test]
    fn the_upgrade_from_formats_2_and_3_survives_a_power_loss() {
        let mut v2 = legacy_header(2).to_vec();
        let mut v3 = plain_header().to_vec();
        for n in 1..=4 {
            encode_legacy(&seq(n), &mut v2);
            encode(&seq(n), Frame::Plain, &mut v3);
        }
        for old in [v2, v3] {
            let disk = MemFile::default();
            let mut io: Box<dyn LogFile> = Box::new(disk.clone());
            io.replace(&old).unwrap();
            let (_, rec) = open(&disk, FsyncPolicy::Never);
            assert_eq!(rec.records.len(), 4);
            disk.lose_unsynced();
            let now = disk.contents();
            let (v, frame) = check_header(&now, Path::new("x")).unwrap();
            assert_eq!(v, u32::from(VERSION));
            let Frame::Salted(salt) = frame else {
                panic!("not salted")
            };
            assert_eq!(&now[..HEADER_LEN], &header(salt)[..]);
            let (mut log, rec) = open(&disk, FsyncPolicy::Never);
            assert_eq!(rec.records, (1..=4).map(seq).collect::<Vec<_>>());
            log.append(&seq(5)).unwrap();
            drop(log);
            let (_, rec) = open(&disk, FsyncPolicy::Never);
            assert_eq!(rec.records, (1..=5).map(seq).collect::<Vec<_>>());
        }
    }

    /// Every new file and every rewrite draws its own salt.
    #[test]
    fn new_files_and_rewrites_are_salted_afresh() {
        let salt_of = |disk: &MemFile| check_header(&disk.contents(), Path::new("x")).unwrap().1;
        let (a, b) = (MemFile::default(), MemFile::default());
        let (mut la, _) = open(&a, FsyncPolicy::Never);
        let (_lb, _) = open(&b, FsyncPolicy::Never);
        assert_ne!(salt_of(&a), salt_of(&b));
        let before = salt_of(&a);
        la.append(&seq(1)).unwrap();
        la.rewrite(&[seq(1), seq(2)]).unwrap();
        assert_ne!(salt_of(&a), before);
        la.append(&seq(3)).unwrap();
        drop(la);
        let (_, rec) = open(&a, FsyncPolicy::Never);
        assert_eq!(rec.records, (1..=3).map(seq).collect::<Vec<_>>());
    }

    /// What can happen to the log between two opens.
    #[derive(Clone, Debug)]
    enum Step {
        Append(u64),
        Sync,
        /// Power loss, then reopen.
        PowerLoss,
        /// A crash tearing the last `n` unsynced bytes, then reopen.
        Tear(usize),
        /// A compaction rewriting the log as its records so far.
        Rewrite,
    }

    fn steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
        use proptest::prelude::*;
        let step = prop_oneof![
            6 => (1u64..1000).prop_map(Step::Append),
            2 => Just(Step::Sync),
            1 => Just(Step::PowerLoss),
            1 => (1usize..60).prop_map(Step::Tear),
            1 => Just(Step::Rewrite),
        ];
        proptest::collection::vec(step, 1..60)
    }

    proptest::proptest! {
        /// Property: after any mix of appends, group commits, compactions, power
        /// losses and torn writes (a crash part-way through a group commit), a reopened log holds exactly the records that
        /// reached the disk whole — all it synced, in order, and never a torn one —
        /// and reports the torn bytes it cut.
        #[test]
        fn the_log_recovers_exactly_what_reached_the_disk_whole(steps in steps()) {
            let disk = MemFile::default();
            let (mut log, _) = open(&disk, FsyncPolicy::Always);
            // The model: records written, and how many of them an fsync covered.
            let (mut written, mut synced) = (Vec::<Record>::new(), 0usize);
            for step in steps {
                match step {
                    Step::Append(n) => {
                        log.append_unsynced(&seq(n));
                        written.push(seq(n));
                    }
                    Step::Sync => {
                        log.sync().unwrap();
                        synced = written.len();
                    }
                    Step::Rewrite => {
                        log.rewrite(&written).unwrap();
                        synced = written.len();
                    }
                    Step::PowerLoss | Step::Tear(_) => {
                        if matches!(step, Step::Tear(_)) {
                            // A crash inside a group commit: the buffered records
                            // were written, the fsync never came.
                            let mut io = disk.clone();
                            io.append(&log.buf).unwrap();
                        }
                        std::mem::forget(log); // a crash: no destructor runs
                        let torn = match step {
                            Step::PowerLoss => {
                                disk.lose_unsynced();
                                written.truncate(synced);
                                0
                            }
                            Step::Tear(n) => {
                                let before = disk.contents().len();
                                disk.tear(n);
                                let cut = before - disk.contents().len();
                                // Records wholly inside what is left survive.
                                let mut left = disk.contents().len() - HEADER_LEN;
                                let whole = written
                                    .iter()
                                    .take_while(|r| {
                                        let mut b = Vec::new();
                                        encode(r, Frame::Salted(0), &mut b);
                                        let fits = b.len() <= left;
                                        if fits {
                                            left -= b.len();
                                        }
                                        fits
                                    })
                                    .count();
                                written.truncate(whole);
                                usize::from(cut > 0) * left
                            }
                            _ => unreachable!(),
                        };
                        let (l, rec) = open(&disk, FsyncPolicy::Always);
                        proptest::prop_assert_eq!(&rec.records, &written);
                        proptest::prop_assert_eq!(rec.torn_bytes, torn as u64);
                        proptest::prop_assert_eq!(rec.corrupt_skipped, 0);
                        // Reopening cut the tail and synced: the state is durable.
                        synced = written.len();
                        log = l;
                    }
                }
            }
            drop(log);
            let (_, rec) = open(&disk, FsyncPolicy::Always);
            proptest::prop_assert_eq!(rec.records, written);
        }
    }
}
