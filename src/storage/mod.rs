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
//! header        : magic [u8; 8] | version u16 LE | reserved u16 | 16 bytes of the
//!                 log's own fields | crc32c u32 LE of the 28 bytes before it
//! salted header : the 32-byte header | salt u64 LE | reserved u32 (zero)
//!                 | crc32c u32 LE of the 44 bytes before it        (48 bytes)
//! plain record  : magic u32 LE | body_len u32 LE | crc32c u32 LE of body_len's 4
//!                 bytes and the body | body
//! salted record : magic u32 LE | body_len u32 LE | prefix check u32 LE | body crc u32
//!                 LE | body
//!                 prefix check = crc32c of salt (u64 LE), magic and body_len
//!                 body crc     = crc32c of the body
//! ```
//!
//! Which framing a file's records use follows from its header's version (each log
//! numbers its own versions); new files, and files rewritten by compaction, are
//! salted ([`Frame::Salted`]), files of the earlier versions are read with the plain
//! framing ([`Frame::Plain`]).
//!
//! The salt is random per file (never derived from anything a peer sends), so record
//! bytes inside a payload (a hint's or a dead letter's, which come from the network)
//! cannot pass as records of the file. The salted scan trusts a record's length once
//! its prefix checks out: a record running past the end of the file is a torn tail,
//! cut without looking inside it; a record whose body crc fails is skipped whole. Only
//! after a bad prefix does it look for the next offset whose prefix checks out, at
//! O(1) per offset, so recovery is linear in the file's length. The plain scan (kept
//! for reading old files) resynchronises after a bad or torn record on the next offset
//! where a complete record with a matching crc starts, inside the bad record too.

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

/// Name of the file recording which node a store directory belongs to.
pub(crate) const OWNER_FILE: &str = "OWNER";
const OWNER_MAGIC: &[u8; 8] = b"AWOWNER\0";

/// Claims `dir` (created if missing) for `node`: records it in [`OWNER_FILE`] (a
/// checksummed [`header`], written atomically) if the directory has no owner yet, as
/// one from before this file existed does. Called before the store takes the
/// directory's lock: two nodes racing on a fresh directory both pass, and the lock
/// then refuses the second. `Ok(Some(other))`:
/// the directory belongs to node `other`, whose records would be taken for this
/// node's (a library-assigned message id names the sending run, channel and seq, not
/// the receiver).
pub(crate) fn claim_owner(dir: &std::path::Path, node: u64) -> std::io::Result<Option<u64>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(OWNER_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bad = |why: &str| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {why}", path.display()),
                )
            };
            let (version, fields) = check_header(&bytes, OWNER_MAGIC).map_err(|p| match p {
                HeaderProblem::Short => bad("torn owner file"),
                HeaderProblem::Bad(why) => bad(why),
            })?;
            if version != 1 || bytes.len() != HEADER_LEN {
                return Err(bad("unknown owner file version"));
            }
            let owner = u64::from_le_bytes(fields[0..8].try_into().unwrap_or([0; 8]));
            Ok((owner != node).then_some(owner))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut fields = [0u8; 16];
            fields[0..8].copy_from_slice(&node.to_le_bytes());
            file::replace_file(&path, &header(OWNER_MAGIC, 1, fields), true)?;
            Ok(None)
        }
        Err(e) => Err(e),
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
/// Length of a [`salted_header`].
pub(crate) const SALTED_HEADER_LEN: usize = 48;

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

/// A salted file header: the [`header`] of `magic`, `version` and `fields`, then the
/// file's record `salt`, 4 reserved zero bytes and a crc over the 44 bytes before it.
pub(crate) fn salted_header(
    magic: &[u8; 8],
    version: u16,
    fields: [u8; 16],
    salt: u64,
) -> [u8; SALTED_HEADER_LEN] {
    let mut h = [0u8; SALTED_HEADER_LEN];
    h[..HEADER_LEN].copy_from_slice(&header(magic, version, fields));
    h[32..40].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A fresh record salt for a new file: 64 bits from the OS-seeded random source (never
/// from anything a peer sends), so a payload cannot forge a record prefix of the file.
pub(crate) fn new_salt() -> u64 {
    crate::rng::seed_from_entropy()
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

/// Checks the salt part (bytes 32..48) of a [`salted_header`] whose first 32 bytes
/// [`check_header`] accepted; returns the salt.
pub(crate) fn check_salt(bytes: &[u8]) -> Result<u64, HeaderProblem> {
    let Some(h) = bytes.get(..SALTED_HEADER_LEN) else {
        return Err(HeaderProblem::Short);
    };
    if crc32c::crc32c(&h[0..44]) != u32_at(h, 44) {
        return Err(HeaderProblem::Bad("header salt crc mismatch"));
    }
    if h[40..44] != [0; 4] {
        return Err(HeaderProblem::Bad("reserved header bytes set"));
    }
    Ok(u64::from_le_bytes(h[32..40].try_into().unwrap_or([0; 8])))
}

/// Bytes before a record's body in the plain framing: magic, body length, crc.
pub(crate) const PREFIX_LEN: usize = 12;
/// Bytes before a record's body in the salted framing: magic, body length, prefix
/// check, body crc.
pub(crate) const SALTED_PREFIX_LEN: usize = 16;

/// How one file's records are framed, as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// The first framing (hint segments version 1, dedup log version 3): `magic |
    /// body_len | crc32c(body_len, body) | body`. Read only.
    Plain,
    /// The salted framing, with the file's salt: `magic | body_len | crc32c(salt,
    /// magic, body_len) | crc32c(body) | body`.
    Salted(u64),
}

impl Frame {
    /// Bytes before a record's body.
    pub(crate) fn prefix_len(self) -> usize {
        match self {
            Frame::Plain => PREFIX_LEN,
            Frame::Salted(_) => SALTED_PREFIX_LEN,
        }
    }
}

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

/// What a salted record's prefix says about the bytes at one offset.
#[derive(Debug, PartialEq, Eq)]
enum SaltedAt {
    /// Fewer bytes than a prefix, or a prefix whose record runs past the end: a torn
    /// tail (the prefix, when there is one, is trusted; nothing inside is looked at).
    Torn,
    /// No record starts here: magic, length or prefix check is wrong.
    BadPrefix,
    /// The prefix checks out but the body crc or the codec does not: exactly this
    /// record (`len` bytes) is corrupt.
    BadBody { len: usize },
    /// A valid record of `len` bytes.
    Valid { len: usize },
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

impl Scan {
    /// Adds a corrupt region, merged with a corrupt region right before it.
    fn corrupt(&mut self, offset: usize, len: usize) {
        if let Some(ScanItem::Corrupt { offset: o, len: l }) = self.items.last_mut() {
            if *o + *l == offset as u64 {
                *l += len as u64;
                return;
            }
        }
        self.items.push(ScanItem::Corrupt {
            offset: offset as u64,
            len: len as u64,
        });
    }

    /// Ends the scan at `at`: a corrupt region with no valid record after it is part
    /// of the tail to truncate.
    fn end(mut self, at: usize) -> Scan {
        self.keep_len = at as u64;
        if let Some(&ScanItem::Corrupt { offset, .. }) = self.items.last() {
            self.items.pop();
            self.keep_len = offset;
        }
        self
    }
}

/// The work a scan did, to check that it is linear in the file's length: candidate
/// offsets whose prefix was checked, and body bytes whose crc was computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ScanWork {
    pub(crate) prefixes: u64,
    pub(crate) body_bytes: u64,
}

impl Framing {
    /// Appends one record in `frame` to `out`, its body written by `body`. `false`
    /// (and `out` unchanged) if the body is outside the accepted lengths.
    pub(crate) fn encode(
        &self,
        frame: Frame,
        out: &mut Vec<u8>,
        body: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        let start = out.len();
        let prefix = frame.prefix_len();
        out.extend_from_slice(&self.magic.to_le_bytes());
        out.resize(start + prefix, 0);
        body(out);
        let len = out.len() - start - prefix;
        if !(self.min_body..=self.max_body).contains(&len) {
            out.truncate(start);
            return false;
        }
        out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
        match frame {
            Frame::Plain => {
                let crc = record_crc(&out[start + 4..start + 8], &out[start + PREFIX_LEN..]);
                out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
            }
            Frame::Salted(salt) => {
                let body_crc = crc32c::crc32c(&out[start + SALTED_PREFIX_LEN..]);
                out[start + 12..start + 16].copy_from_slice(&body_crc.to_le_bytes());
                salt_record(&mut out[start..], salt);
            }
        }
        true
    }

    /// Checks the record starting at `bytes[0]`; `body_ok` is the codec's check of a
    /// body whose crc matched.
    pub(crate) fn check(
        &self,
        frame: Frame,
        bytes: &[u8],
        body_ok: impl Fn(&[u8]) -> bool,
    ) -> RecordAt {
        match frame {
            Frame::Plain => self.check_plain(bytes, body_ok),
            Frame::Salted(salt) => {
                match self.check_salted(salt, bytes, body_ok, &mut ScanWork::default()) {
                    SaltedAt::Valid { len } => RecordAt::Valid { len },
                    SaltedAt::Torn => RecordAt::Incomplete,
                    SaltedAt::BadPrefix | SaltedAt::BadBody { .. } => RecordAt::Corrupt,
                }
            }
        }
    }

    fn check_plain(&self, bytes: &[u8], body_ok: impl Fn(&[u8]) -> bool) -> RecordAt {
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

    /// Is there a salted prefix at `bytes[0]`? Its body length if so. O(1).
    fn salted_prefix(&self, salt: u64, bytes: &[u8], work: &mut ScanWork) -> Option<usize> {
        let p = bytes.get(..SALTED_PREFIX_LEN)?;
        if u32_at(p, 0) != self.magic {
            return None;
        }
        work.prefixes += 1;
        if prefix_check(salt, &p[0..8]) != u32_at(p, 8) {
            return None;
        }
        let body_len = u32_at(p, 4) as usize;
        (self.min_body..=self.max_body)
            .contains(&body_len)
            .then_some(body_len)
    }

    fn check_salted(
        &self,
        salt: u64,
        bytes: &[u8],
        body_ok: impl Fn(&[u8]) -> bool,
        work: &mut ScanWork,
    ) -> SaltedAt {
        if bytes.len() < SALTED_PREFIX_LEN {
            return SaltedAt::Torn;
        }
        let Some(body_len) = self.salted_prefix(salt, bytes, work) else {
            return SaltedAt::BadPrefix;
        };
        let total = SALTED_PREFIX_LEN + body_len;
        let Some(body) = bytes.get(SALTED_PREFIX_LEN..total) else {
            return SaltedAt::Torn;
        };
        work.body_bytes += body.len() as u64;
        if crc32c::crc32c(body) != u32_at(bytes, 12) || !body_ok(body) {
            return SaltedAt::BadBody { len: total };
        }
        SaltedAt::Valid { len: total }
    }

    /// Scans the records of `bytes` in `frame` from offset `from`: keeps every valid
    /// record, skips corrupt ones, and reports where the intact part ends.
    ///
    /// Plain: after a bad or incomplete record, resynchronises on the next offset
    /// where a valid record starts (looking inside the bad record too). Salted: a
    /// record whose prefix checks out is trusted for its length: if it runs past the
    /// end it is the torn tail (cut there, never looked inside); if its body is bad,
    /// exactly that record is skipped. Only after a bad prefix does the scan look at
    /// the following offsets one by one, each rejected in O(1) by the salted prefix
    /// check (which a payload cannot forge without the file's salt): linear time.
    pub(crate) fn scan(
        &self,
        frame: Frame,
        bytes: &[u8],
        from: usize,
        body_ok: impl Fn(&[u8]) -> bool,
    ) -> Scan {
        self.scan_counted(frame, bytes, from, body_ok).0
    }

    /// [`Framing::scan`], with the work it did.
    pub(crate) fn scan_counted(
        &self,
        frame: Frame,
        bytes: &[u8],
        from: usize,
        body_ok: impl Fn(&[u8]) -> bool,
    ) -> (Scan, ScanWork) {
        match frame {
            Frame::Plain => (self.scan_plain(bytes, from, body_ok), ScanWork::default()),
            Frame::Salted(salt) => self.scan_salted(salt, bytes, from, body_ok),
        }
    }

    fn scan_salted(
        &self,
        salt: u64,
        bytes: &[u8],
        from: usize,
        body_ok: impl Fn(&[u8]) -> bool,
    ) -> (Scan, ScanWork) {
        let mut scan = Scan::default();
        let mut work = ScanWork::default();
        let mut at = from.min(bytes.len());
        while at < bytes.len() {
            match self.check_salted(salt, &bytes[at..], &body_ok, &mut work) {
                SaltedAt::Valid { len } => {
                    scan.items.push(ScanItem::Record {
                        offset: at as u64,
                        len: len as u32,
                    });
                    at += len;
                }
                SaltedAt::BadBody { len } => {
                    scan.corrupt(at, len);
                    at += len;
                }
                SaltedAt::Torn => break,
                SaltedAt::BadPrefix => {
                    let next = self.resync_salted(salt, bytes, at + 1, &mut work);
                    scan.corrupt(at, next - at);
                    at = next;
                }
            }
        }
        (scan.end(at), work)
    }

    /// The first offset `>= from` where a salted prefix checks out, or the end of
    /// `bytes` if none does.
    fn resync_salted(&self, salt: u64, bytes: &[u8], from: usize, work: &mut ScanWork) -> usize {
        let magic = self.magic.to_le_bytes();
        let mut at = from;
        while at + SALTED_PREFIX_LEN <= bytes.len() {
            let Some(rel) = bytes[at..].windows(4).position(|w| w == magic) else {
                break;
            };
            at += rel;
            if self.salted_prefix(salt, &bytes[at..], work).is_some() {
                return at;
            }
            at += 1;
        }
        bytes.len()
    }

    fn scan_plain(&self, bytes: &[u8], from: usize, body_ok: impl Fn(&[u8]) -> bool) -> Scan {
        let mut scan = Scan::default();
        let mut at = from.min(bytes.len());
        loop {
            if at >= bytes.len() {
                scan.keep_len = at as u64;
                return scan;
            }
            match self.check_plain(&bytes[at..], &body_ok) {
                RecordAt::Valid { len } => {
                    scan.items.push(ScanItem::Record {
                        offset: at as u64,
                        len: len as u32,
                    });
                    at += len;
                }
                RecordAt::Incomplete | RecordAt::Corrupt => {
                    match self.resync_plain(bytes, at + 1, &body_ok) {
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

    /// The first offset `>= from` where a valid plain record starts.
    fn resync_plain(
        &self,
        bytes: &[u8],
        from: usize,
        body_ok: impl Fn(&[u8]) -> bool,
    ) -> Option<usize> {
        let magic = self.magic.to_le_bytes();
        let mut at = from;
        while at + PREFIX_LEN <= bytes.len() {
            let rel = bytes[at..].windows(4).position(|w| w == magic)?;
            at += rel;
            if let RecordAt::Valid { .. } = self.check_plain(&bytes[at..], &body_ok) {
                return Some(at);
            }
            at += 1;
        }
        None
    }
}

/// Re-keys an encoded salted record (its first 16 bytes at least) for a file of
/// `salt`: only the prefix check depends on the salt.
pub(crate) fn salt_record(record: &mut [u8], salt: u64) {
    if let Some(p) = record.get_mut(..SALTED_PREFIX_LEN) {
        let check = prefix_check(salt, &p[0..8]);
        p[8..12].copy_from_slice(&check.to_le_bytes());
    }
}

/// The salted prefix check: crc32c of the salt (u64 LE), then the record's magic and
/// body length.
fn prefix_check(salt: u64, magic_and_len: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&salt.to_le_bytes()), magic_and_len)
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
        assert!(F.encode(Frame::Plain, &mut out, |b| b.extend_from_slice(body)));
        out
    }

    #[test]
    fn a_record_round_trips_and_every_flipped_bit_is_caught() {
        let r = record(b"hello");
        assert_eq!(
            F.check(Frame::Plain, &r, |_| true),
            RecordAt::Valid { len: r.len() }
        );
        for i in 0..r.len() {
            for bit in 0..8 {
                let mut bad = r.clone();
                bad[i] ^= 1 << bit;
                assert_ne!(
                    F.check(Frame::Plain, &bad, |_| true),
                    RecordAt::Valid { len: r.len() },
                    "byte {i}"
                );
            }
        }
        assert_eq!(
            F.check(Frame::Plain, &r[..r.len() - 1], |_| true),
            RecordAt::Incomplete
        );
        assert_eq!(
            F.check(Frame::Plain, &r, |b| b != b"hello"),
            RecordAt::Corrupt,
            "the codec's veto"
        );
        let mut out = vec![9];
        assert!(
            !F.encode(Frame::Plain, &mut out, |_| {}),
            "an empty body is below min_body"
        );
        assert!(!F.encode(Frame::Plain, &mut out, |b| b.extend_from_slice(&[0; 65])));
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
        let scan = F.scan(Frame::Plain, &file, 5, |_| true);
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
        let again = F.scan(Frame::Plain, &file[..scan.keep_len as usize], 5, |_| true);
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

    const SALT: u64 = 0x5EED_0FF1_CE00_u64;
    const S: Frame = Frame::Salted(SALT);

    fn salted(body: &[u8]) -> Vec<u8> {
        salted_with(S, body)
    }

    fn salted_with(frame: Frame, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(F.encode(frame, &mut out, |b| b.extend_from_slice(body)));
        out
    }

    fn records_of(scan: &Scan) -> Vec<u64> {
        scan.items
            .iter()
            .filter_map(|i| match *i {
                ScanItem::Record { offset, .. } => Some(offset),
                ScanItem::Corrupt { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_salted_record_round_trips_and_every_flipped_bit_is_caught() {
        let r = salted(b"hello");
        assert_eq!(r.len(), SALTED_PREFIX_LEN + 5);
        assert_eq!(F.check(S, &r, |_| true), RecordAt::Valid { len: r.len() });
        assert_eq!(&r[SALTED_PREFIX_LEN..], b"hello");
        for i in 0..r.len() {
            for bit in 0..8 {
                let mut bad = r.clone();
                bad[i] ^= 1 << bit;
                assert_ne!(
                    F.check(S, &bad, |_| true),
                    RecordAt::Valid { len: r.len() },
                    "byte {i} bit {bit}"
                );
            }
        }
        assert_eq!(
            F.check(S, &r[..r.len() - 1], |_| true),
            RecordAt::Incomplete
        );
        assert_eq!(F.check(S, &r, |b| b != b"hello"), RecordAt::Corrupt);
        // Another file's salt: not a record of this file.
        assert_eq!(
            F.check(Frame::Salted(SALT + 1), &r, |_| true),
            RecordAt::Corrupt
        );
        // Re-keyed for that salt, it is.
        let mut other = r.clone();
        salt_record(&mut other, SALT + 1);
        assert_eq!(
            F.check(Frame::Salted(SALT + 1), &other, |_| true),
            RecordAt::Valid { len: r.len() }
        );
        let mut out = vec![9];
        assert!(!F.encode(S, &mut out, |_| {}));
        assert!(!F.encode(S, &mut out, |b| b.extend_from_slice(&[0; 65])));
        assert_eq!(out, [9], "a refused record leaves nothing behind");
    }

    #[test]
    fn a_salted_header_holds_its_salt_and_rejects_damage() {
        let h = salted_header(b"TESTLOG\0", 2, [3; 16], SALT);
        assert_eq!(check_header(&h, b"TESTLOG\0"), Ok((2, [3; 16])));
        assert_eq!(check_salt(&h), Ok(SALT));
        assert_eq!(check_salt(&h[..47]), Err(HeaderProblem::Short));
        for i in 0..SALTED_HEADER_LEN {
            let mut bad = h;
            bad[i] ^= 1;
            assert!(
                check_header(&bad, b"TESTLOG\0").is_err() || check_salt(&bad).is_err(),
                "byte {i}"
            );
        }
        assert_ne!(new_salt(), new_salt());
    }

    /// A torn record's length is trusted: the scan cuts the file at its start and
    /// never looks at its payload, even when the payload holds a valid record of
    /// this very file.
    #[test]
    fn a_torn_salted_record_is_cut_without_looking_inside() {
        let inner = salted(&[7; 10]);
        let mut payload = vec![0x11; 5];
        payload.extend_from_slice(&inner);
        payload.extend_from_slice(&[0x22; 5]);
        let hostile = salted(&payload);
        let mut file = vec![0xAA; 5];
        file.extend_from_slice(&salted(&[1; 8]));
        let hostile_at = file.len();
        file.extend_from_slice(&hostile);
        // Cut anywhere inside the hostile record, its prefix included.
        for cut in hostile_at + 1..file.len() {
            let scan = F.scan(S, &file[..cut], 5, |_| true);
            assert_eq!(records_of(&scan), vec![5], "cut at {cut}");
            assert_eq!(scan.keep_len as usize, hostile_at, "cut at {cut}");
            assert_eq!(scan.items.len(), 1, "cut at {cut}: no corrupt region");
        }
        let whole = F.scan(S, &file, 5, |_| true);
        assert_eq!(records_of(&whole), vec![5, hostile_at as u64]);
    }

    /// A complete record whose body is bad is skipped by its trusted length: the
    /// record embedded in its payload is not recovered, the record after it is.
    #[test]
    fn a_corrupt_salted_body_is_skipped_by_its_length() {
        let inner = salted(&[7; 10]);
        let mut payload = vec![0x11; 5];
        payload.extend_from_slice(&inner);
        payload.extend_from_slice(&[0x22; 5]);
        let hostile = salted(&payload);
        let mut file = salted(&[1; 8]);
        let hostile_at = file.len();
        file.extend_from_slice(&hostile);
        let after = file.len();
        file.extend_from_slice(&salted(&[2; 8]));
        let end = file.len();
        for flip in [
            hostile_at + 12,                    // the body crc
            hostile_at + SALTED_PREFIX_LEN,     // the body, before the embedded record
            hostile_at + SALTED_PREFIX_LEN + 9, // inside the embedded record
            after - 1,                          // the body's last byte
        ] {
            let mut bad = file.clone();
            bad[flip] ^= 0x40;
            let scan = F.scan(S, &bad, 0, |_| true);
            assert_eq!(records_of(&scan), vec![0, after as u64], "flip at {flip}");
            assert_eq!(
                scan.items[1],
                ScanItem::Corrupt {
                    offset: hostile_at as u64,
                    len: hostile.len() as u64
                },
                "flip at {flip}"
            );
            assert_eq!(scan.keep_len as usize, end);
        }
        let vetoed = F.scan(S, &file, 0, |b| b != &payload[..]);
        assert_eq!(records_of(&vetoed), vec![0, after as u64]);
        // A corrupt last record with nothing valid after it is the tail to cut.
        let mut last_bad = file[..after].to_vec();
        last_bad[after - 1] ^= 1;
        let scan = F.scan(S, &last_bad, 0, |_| true);
        assert_eq!(records_of(&scan), vec![0]);
        assert_eq!(scan.keep_len as usize, hostile_at);
    }

    /// Only a bad prefix makes the scan look at the next offsets; a record of
    /// another salt (what a peer could put in a payload) never passes there.
    #[test]
    fn after_a_bad_prefix_the_scan_finds_the_next_record_but_not_a_foreign_one() {
        let foreign = salted_with(Frame::Salted(!SALT), &[7; 10]);
        let mut payload = vec![0x11; 5];
        payload.extend_from_slice(&foreign);
        let hostile = salted(&payload);
        let mut file = salted(&[1; 8]);
        let hostile_at = file.len();
        file.extend_from_slice(&hostile);
        let after = file.len();
        file.extend_from_slice(&salted(&[2; 8]));
        for flip in hostile_at..hostile_at + 12 {
            let mut bad = file.clone();
            bad[flip] ^= 0x04; // magic, length or prefix check
            let scan = F.scan(S, &bad, 0, |_| true);
            assert_eq!(records_of(&scan), vec![0, after as u64], "flip at {flip}");
            assert_eq!(scan.items.len(), 3, "flip at {flip}");
            assert_eq!(scan.keep_len as usize, file.len());
            // Torn as well: nothing after the bad prefix is a record.
            let scan = F.scan(S, &bad[..after - 1], 0, |_| true);
            assert_eq!(records_of(&scan), vec![0], "flip at {flip}, torn");
            assert_eq!(scan.keep_len as usize, hostile_at);
        }
    }

    /// A file of record-like garbage (record magic and a large length, repeated) is
    /// scanned with work linear in its length, torn, corrupt or with a bad prefix.
    #[test]
    fn record_like_garbage_scans_in_linear_time() {
        const BIG: Framing = Framing {
            magic: u32::from_le_bytes(*b"TEST"),
            min_body: 1,
            max_body: 64 << 20,
        };
        let mut unit = b"TEST".to_vec();
        unit.extend_from_slice(&(1u32 << 20).to_le_bytes());
        unit.extend_from_slice(&[0; 4]);
        let garbage: Vec<u8> = unit.iter().copied().cycle().take(4 << 20).collect();
        let n = garbage.len() as u64;
        // Bare garbage: every offset has a bad prefix.
        let (scan, work) = BIG.scan_counted(S, &garbage, 0, |_| true);
        assert!(records_of(&scan).is_empty());
        assert_eq!(scan.keep_len, 0);
        assert!(work.prefixes <= n / 12 + 1, "{work:?}");
        assert_eq!(work.body_bytes, 0);
        // The garbage as the payload of a record, torn, or complete with a bad body.
        let mut file = Vec::new();
        assert!(BIG.encode(S, &mut file, |b| b.extend_from_slice(&garbage)));
        let len = file.len();
        let (scan, work) = BIG.scan_counted(S, &file[..len - 100], 0, |_| true);
        assert_eq!((scan.items.len(), scan.keep_len), (0, 0));
        assert_eq!(
            work,
            ScanWork {
                prefixes: 1,
                body_bytes: 0
            }
        );
        let mut bad = file.clone();
        bad[len - 1] ^= 1;
        bad.extend_from_slice(&salted(&[5; 9]));
        let (scan, work) = BIG.scan_counted(S, &bad, 0, |_| true);
        assert_eq!(records_of(&scan), vec![len as u64]);
        assert!(work.prefixes <= 3 && work.body_bytes <= n + 9, "{work:?}");
        // With its prefix damaged: the scan looks at the offsets, each in O(1).
        let mut bad = file.clone();
        bad[5] ^= 1;
        let (scan, work) = BIG.scan_counted(S, &bad, 0, |_| true);
        assert_eq!((scan.items.len(), scan.keep_len), (0, 0));
        assert!(work.prefixes <= n / 12 + 2, "{work:?}");
        assert_eq!(work.body_bytes, 0);
    }

    /// A plain-framed file (the format before the salt) still scans as before.
    #[test]
    fn a_plain_file_still_scans_as_before() {
        let recs: Vec<Vec<u8>> = (0..3u8).map(|i| record(&[i; 7])).collect();
        let mut file = recs.concat();
        let scan = F.scan(Frame::Plain, &file, 0, |_| true);
        assert_eq!(records_of(&scan), vec![0, 19, 38]);
        file.extend_from_slice(&recs[0][..5]);
        let scan = F.scan(Frame::Plain, &file, 0, |_| true);
        assert_eq!(scan.keep_len, 57);
        // A salted scan does not take plain records.
        assert!(records_of(&F.scan(S, &recs.concat(), 0, |_| true)).is_empty());
    }
}
