//! The durable-log primitive the on-disk stores share: when a log is fsynced
//! ([`FsyncPolicy`]), its checked file header, its record framing with the recovery
//! scan (torn tail cut, corrupt record skipped), and the IO backends under them.
//!
//! Owns byte layouts and the scan (no state across calls), and the IO, on disk or in
//! memory (for power-loss and torn-write tests): in [`file`](mod@file) one log file
//! ([`file::LogFile`]: `DiskFile`, `MemFile`), the atomic replace and the fsyncs (all
//! under `blocking::run`); in [`segments`] a directory of per-target segment files
//! plus a cursor file ([`segments::SegmentIo`]: `FileSegmentIo`, `MemSegmentIo`),
//! built from those same file handles. The dedup log (`dedup`, one `LogFile`) and the
//! hint store (`handoff`, a `SegmentIo`, public there) are record codecs on top: each
//! knows its header fields, record bodies and what to keep, and nothing of the IO.
//!
//! ```text
//! header : magic [u8; 8] | version u16 LE | reserved u16 | 16 bytes of the log's own
//!          fields | crc32c u32 LE of the 28 bytes before it
//! record : magic u32 LE | body_len u32 LE | crc32c u32 LE of body_len's 4 bytes and
//!          the body | body
//! ```
//!
//! The per-record magic lets the scan resynchronise after a corrupt record: it looks
//! for the next offset where a complete record with a matching crc (and a body the
//! log's codec accepts) starts.

use std::time::Duration;

pub(crate) mod file;
pub(crate) mod segments;

/// An exclusive lock on a store directory, held while this value lives: two live
/// nodes (in one process or two) must never write one durable store, or a compaction
/// of one would drop the other's records. An advisory lock (`flock`) on the file
/// `LOCK` in the directory; the OS releases it when the process exits, `kill -9`
/// included, so a crashed node's directory is never left locked.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: std::fs::File,
}

/// Takes `dir`'s lock (creating `dir` and `dir/LOCK` if needed), without waiting: an
/// error of kind [`std::io::ErrorKind::WouldBlock`] if another holder has it.
pub(crate) fn lock_dir(dir: &std::path::Path) -> std::io::Result<DirLock> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("{} is in use by another live node", dir.display()),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// When appended records are made durable with `fsync` (fdatasync).
///
/// Every policy survives a process crash (`kill -9`) once a record is written: the
/// hint store writes each record to the OS before its append returns; the durable
/// dedup log buffers a batch of completions and writes it (one `write`) at its group
/// commit, before any ack of the batch leaves. The policies differ on power loss /
/// kernel crash. The hint store takes all three (default `Every(10 ms)`); the durable
/// dedup log takes `Always` (default: one fsync per batch of completions, before
/// their acks) and `Never`, and refuses `Every` when its config is validated, because
/// its acks wait for the fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum FsyncPolicy {
    /// fsync before an append (or a batch, where the store groups appends) returns.
    /// Nothing acknowledged is lost even on power loss; throughput is bounded by the
    /// device's fsync latency (≈ 0.1–10 ms). On a tokio multi-thread runtime the fsync
    /// runs under `block_in_place`, so the worker's other tasks move to another thread
    /// meanwhile.
    #[default]
    Always,
    /// Group commit (hint store only): an append fsyncs when the last fsync is older
    /// than the interval, and
    /// [`HintStore::sync_if_due`](crate::handoff::HintStore::sync_if_due) must be called
    /// at [`HintStore::next_sync_deadline`](crate::handoff::HintStore::next_sync_deadline)
    /// so an idle log is synced too. Power loss loses at most the last interval of
    /// appends; throughput is close to `Never`. Cassandra flushes hints every 10 s
    /// (without fsync).
    Every(#[serde(with = "crate::config_serde::duration")] Duration),
    /// Never fsync (except on an explicit sync); the OS writes back when it likes
    /// (≈ 30 s on Linux). Fastest; power loss can lose the last tens of seconds.
    Never,
}

/// Length of a [`header`].
pub(crate) const HEADER_LEN: usize = 32;

/// A file header: `magic`, `version`, the log's own `fields`, and a crc over them.
pub(crate) fn header(magic: &[u8; 8], version: u16, fields: [u8; 16]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(magic);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    h[12..28].copy_from_slice(&fields);
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a file header was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    /// Fewer bytes than a header: the file was torn while being created.
    Short,
    /// Magic, crc, version or the log's own fields do not match.
    Bad(&'static str),
}

/// Checks the header at the start of `bytes` against `magic`; returns its version and
/// the log's own fields (for the caller to check).
pub(crate) fn check_header(
    bytes: &[u8],
    magic: &[u8; 8],
) -> Result<(u16, [u8; 16]), HeaderProblem> {
    let Some(h) = bytes.get(..HEADER_LEN) else {
        return Err(HeaderProblem::Short);
    };
    if h[0..8] != magic[..] {
        return Err(HeaderProblem::Bad("bad magic"));
    }
    if crc32c::crc32c(&h[0..28]) != u32_at(h, 28) {
        return Err(HeaderProblem::Bad("header crc mismatch"));
    }
    let mut fields = [0u8; 16];
    fields.copy_from_slice(&h[12..28]);
    Ok((u16::from_le_bytes([h[8], h[9]]), fields))
}

/// Bytes before a record's body: magic, body length, crc.
pub(crate) const PREFIX_LEN: usize = 12;

/// One log's record framing: its record magic and the body lengths it accepts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Framing {
    /// Opens every record.
    pub(crate) magic: u32,
    /// Shortest body accepted.
    pub(crate) min_body: usize,
    /// Longest body accepted; a longer length field is corruption.
    pub(crate) max_body: usize,
}

/// Outcome of looking at the bytes starting at one offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecordAt {
    /// A complete record whose crc matches and whose body the codec accepts; `len`
    /// bytes long.
    Valid { len: usize },
    /// Not enough bytes for the record the prefix announces (or for a prefix).
    Incomplete,
    /// Magic, length, crc or body is wrong.
    Corrupt,
}

/// One region the recovery scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanItem {
    /// A valid record at `offset`, `len` bytes long.
    Record { offset: u64, len: u32 },
    /// `len` corrupt bytes at `offset`, followed by a valid record (skipped).
    Corrupt { offset: u64, len: u64 },
}

/// Result of scanning one file's bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Valid records and skipped corrupt regions in file order.
    pub(crate) items: Vec<ScanItem>,
    /// Length of the intact part; bytes after it are a torn/corrupt tail with no valid
    /// record after them and should be truncated.
    pub(crate) keep_len: u64,
}

impl Framing {
    /// Appends one record to `out`, its body written by `body`. `false` (and `out`
    /// unchanged) if the body is outside the accepted lengths.
    pub(crate) fn encode(&self, out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) -> bool {
        let start = out.len();
        out.extend_from_slice(&self.magic.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]);
        body(out);
        let len = out.len() - start - PREFIX_LEN;
        if !(self.min_body..=self.max_body).contains(&len) {
            out.truncate(start);
            return false;
        }
        out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = record_crc(&out[start + 4..start + 8], &out[start + PREFIX_LEN..]);
        out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
        true
    }

    /// Checks the record starting at `bytes[0]`; `body_ok` is the codec's check of a
    /// body whose crc matched.
    pub(crate) fn check(&self, bytes: &[u8], body_ok: impl Fn(&[u8]) -> bool) -> RecordAt {
        if bytes.len() < PREFIX_LEN {
            return RecordAt::Incomplete;
        }
        if u32_at(bytes, 0) != self.magic {
            return RecordAt::Corrupt;
        }
        let body_len = u32_at(bytes, 4) as usize;
        if !(self.min_body..=self.max_body).contains(&body_len) {
            return RecordAt::Corrupt;
        }
        let total = PREFIX_LEN + body_len;
        if bytes.len() < total {
            return RecordAt::Incomplete;
        }
        let body = &bytes[PREFIX_LEN..total];
        if record_crc(&bytes[4..8], body) != u32_at(bytes, 8) || !body_ok(body) {
            return RecordAt::Corrupt;
        }
        RecordAt::Valid { len: total }
    }

    /// Scans the records of `bytes` from offset `from`: keeps every valid record,
    /// resynchronises after a corrupt region on the next valid record, and reports
    /// where the intact part ends.
    pub(crate) fn scan(&self, bytes: &[u8], from: usize, body_ok: impl Fn(&[u8]) -> bool) -> Scan {
        let mut scan = Scan::default();
        let mut at = from.min(bytes.len());
        loop {
            if at >= bytes.len() {
                scan.keep_len = at as u64;
                return scan;
            }
            match self.check(&bytes[at..], &body_ok) {
                RecordAt::Valid { len } => {
                    scan.items.push(ScanItem::Record {
                        offset: at as u64,
                        len: len as u32,
                    });
                    at += len;
                }
                RecordAt::Incomplete | RecordAt::Corrupt => {
                    match self.resync(bytes, at + 1, &body_ok) {
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
                    }
                }
            }
        }
    }

    /// The first offset `>= from` where a valid record starts.
    fn resync(&self, bytes: &[u8], from: usize, body_ok: impl Fn(&[u8]) -> bool) -> Option<usize> {
        let magic = self.magic.to_le_bytes();
        let mut at = from;
        while at + PREFIX_LEN <= bytes.len() {
            let rel = bytes[at..].windows(4).position(|w| w == magic)?;
            at += rel;
            if let RecordAt::Valid { .. } = self.check(&bytes[at..], &body_ok) {
                return Some(at);
            }
            at += 1;
        }
        None
    }
}

fn record_crc(len_bytes: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_bytes), body)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Framing = Framing {
        magic: u32::from_le_bytes(*b"TEST"),
        min_body: 1,
        max_body: 64,
    };

    fn record(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(F.encode(&mut out, |b| b.extend_from_slice(body)));
        out
    }

    #[test]
    fn a_record_round_trips_and_every_flipped_bit_is_caught() {
        let r = record(b"hello");
        assert_eq!(F.check(&r, |_| true), RecordAt::Valid { len: r.len() });
        for i in 0..r.len() {
            for bit in 0..8 {
                let mut bad = r.clone();
                bad[i] ^= 1 << bit;
                assert_ne!(
                    F.check(&bad, |_| true),
                    RecordAt::Valid { len: r.len() },
                    "byte {i}"
                );
            }
        }
        assert_eq!(F.check(&r[..r.len() - 1], |_| true), RecordAt::Incomplete);
        assert_eq!(
            F.check(&r, |b| b != b"hello"),
            RecordAt::Corrupt,
            "the codec's veto"
        );
        let mut out = vec![9];
        assert!(
            !F.encode(&mut out, |_| {}),
            "an empty body is below min_body"
        );
        assert!(!F.encode(&mut out, |b| b.extend_from_slice(&[0; 65])));
        assert_eq!(out, [9], "a refused record leaves nothing behind");
    }

    #[test]
    fn the_scan_skips_a_corrupt_record_and_stops_before_a_torn_tail() {
        let recs: Vec<Vec<u8>> = (0..4u8).map(|i| record(&[i; 7])).collect();
        let mut file = vec![0xAA; 5]; // a header the scan starts after
        for r in &recs {
            file.extend_from_slice(r);
        }
        let second = 5 + recs[0].len();
        file[second + PREFIX_LEN + 2] ^= 0x40; // inside record 1's body
        let torn = recs[0][..9].to_vec();
        file.extend_from_slice(&torn);
        let scan = F.scan(&file, 5, |_| true);
        let records = scan
            .items
            .iter()
            .filter(|i| matches!(i, ScanItem::Record { .. }))
            .count();
        assert_eq!(records, 3);
        assert_eq!(
            scan.items[1],
            ScanItem::Corrupt {
                offset: second as u64,
                len: recs[1].len() as u64
            }
        );
        assert_eq!(scan.keep_len as usize, file.len() - torn.len());
        // The kept part scans to the same records, with no tail.
        let again = F.scan(&file[..scan.keep_len as usize], 5, |_| true);
        assert_eq!(again, scan);
    }

    #[test]
    fn a_header_is_checked_by_magic_and_crc_and_returns_version_and_fields() {
        let mut fields = [0u8; 16];
        fields[3] = 7;
        let h = header(b"TESTLOG\0", 2, fields);
        assert_eq!(check_header(&h, b"TESTLOG\0"), Ok((2, fields)));
        assert_eq!(
            check_header(&h[..31], b"TESTLOG\0"),
            Err(HeaderProblem::Short)
        );
        assert_eq!(
            check_header(&h, b"OTHERLOG"),
            Err(HeaderProblem::Bad("bad magic"))
        );
        for i in 8..HEADER_LEN {
            let mut bad = h;
            bad[i] ^= 1;
            assert!(check_header(&bad, b"TESTLOG\0").is_err(), "byte {i}");
        }
    }
}
