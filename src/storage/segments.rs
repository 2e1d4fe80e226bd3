//! Many log files in one directory: the backend of the hint store, which keeps one
//! segmented log per target plus a small cursor file. The [`SegmentIo`] trait, on disk
//! ([`FileSegmentIo`], one [`DiskFile`] per open segment) and in memory
//! ([`MemSegmentIo`], one [`MemFile`] per segment), built from the single-file
//! handles of [`super::file`] so both stores fsync, replace and lose power the same
//! way.
//!
//! Owns only moving bytes: listing, creating, appending, reading, truncating, syncing and
//! removing segment files and the per-target cursor file. Must not interpret the bytes
//! (that is the hint store's `format`) nor decide what to keep (that is the store).

use super::file::{self, DiskFile, LogFile, MemFile};
use crate::id::NodeId;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where the hint store keeps its segments and cursors.
///
/// Segments are identified by `(target, segment id)`; each target also has one small
/// cursor file replaced atomically. Implementations: [`FileSegmentIo`] (real files) and
/// [`MemSegmentIo`] (in memory, for tests and simulations). The store's behavioural tests
/// run against both.
pub trait SegmentIo: fmt::Debug {
    /// Targets that have a directory/namespace, in any order.
    fn list_targets(&mut self) -> io::Result<Vec<NodeId>>;
    /// Segment ids of `target`, in any order (quarantined segments are not listed).
    fn list_segments(&mut self, target: NodeId) -> io::Result<Vec<u64>>;
    /// The whole content of a segment (used by recovery).
    fn read_segment(&mut self, target: NodeId, segment: u64) -> io::Result<Vec<u8>>;
    /// Fills `buf` from `offset` of a segment; an error if the segment is shorter.
    fn read_at(
        &mut self,
        target: NodeId,
        segment: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()>;
    /// Creates a new segment holding `header` (fails if it already exists).
    fn create_segment(&mut self, target: NodeId, segment: u64, header: &[u8]) -> io::Result<()>;
    /// Appends `bytes` at the end of a segment.
    fn append(&mut self, target: NodeId, segment: u64, bytes: &[u8]) -> io::Result<()>;
    /// Cuts a segment to `len` bytes.
    fn truncate(&mut self, target: NodeId, segment: u64, len: u64) -> io::Result<()>;
    /// Makes a segment's content durable (fdatasync).
    fn sync(&mut self, target: NodeId, segment: u64) -> io::Result<()>;
    /// Makes creations, removals and renames in `target`'s namespace durable.
    fn sync_dir(&mut self, target: NodeId) -> io::Result<()>;
    /// Deletes a segment (no error if it is already gone).
    fn remove_segment(&mut self, target: NodeId, segment: u64) -> io::Result<()>;
    /// Moves a damaged segment aside so it is no longer listed but kept for inspection.
    fn quarantine_segment(&mut self, target: NodeId, segment: u64) -> io::Result<()>;
    /// The cursor file of `target`, if any.
    fn read_cursor(&mut self, target: NodeId) -> io::Result<Option<Vec<u8>>>;
    /// Replaces the cursor file atomically (all old or all new after a crash); with
    /// `durable` the new content is synced before this returns.
    fn write_cursor(&mut self, target: NodeId, bytes: &[u8], durable: bool) -> io::Result<()>;
    /// Removes everything of `target` except quarantined segments.
    fn remove_target(&mut self, target: NodeId) -> io::Result<()>;
}

/// [`SegmentIo`] on real files: `<root>/<target>/<segment:020>.log` and
/// `<root>/<target>/cursor`; quarantined segments become `<segment>.log.corrupt`.
///
/// Keeps one open handle per segment it has written or read, closed on removal.
#[derive(Debug)]
pub struct FileSegmentIo {
    root: PathBuf,
    open: HashMap<(NodeId, u64), DiskFile>,
}

impl FileSegmentIo {
    /// A backend rooted at `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(FileSegmentIo {
            root,
            open: HashMap::new(),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a segment file.
    pub fn segment_path(&self, target: NodeId, segment: u64) -> PathBuf {
        self.target_dir(target).join(segment_name(segment))
    }

    fn target_dir(&self, target: NodeId) -> PathBuf {
        self.root.join(target.0.to_string())
    }

    fn handle(&mut self, target: NodeId, segment: u64) -> io::Result<&mut DiskFile> {
        if !self.open.contains_key(&(target, segment)) {
            let f = DiskFile::open_existing(self.segment_path(target, segment))?;
            self.open.insert((target, segment), f);
        }
        self.open
            .get_mut(&(target, segment))
            .ok_or_else(|| io::Error::other("segment handle vanished"))
    }
}

fn segment_name(segment: u64) -> String {
    format!("{segment:020}.log")
}

impl SegmentIo for FileSegmentIo {
    fn list_targets(&mut self) -> io::Result<Vec<NodeId>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                if let Some(id) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                    out.push(NodeId(id));
                }
            }
        }
        Ok(out)
    }

    fn list_segments(&mut self, target: NodeId) -> io::Result<Vec<u64>> {
        let dir = self.target_dir(target);
        let mut out = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in rd {
            let name = e?.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|s| s.strip_suffix(".log"))
                .and_then(|s| s.parse().ok())
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    fn read_segment(&mut self, target: NodeId, segment: u64) -> io::Result<Vec<u8>> {
        self.handle(target, segment)?.read_all()
    }

    fn read_at(
        &mut self,
        target: NodeId,
        segment: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        self.handle(target, segment)?.read_at(offset, buf)
    }

    fn create_segment(&mut self, target: NodeId, segment: u64, header: &[u8]) -> io::Result<()> {
        let dir = self.target_dir(target);
        let f = DiskFile::create_new(&dir, &segment_name(segment), header)?;
        self.open.insert((target, segment), f);
        Ok(())
    }

    fn append(&mut self, target: NodeId, segment: u64, bytes: &[u8]) -> io::Result<()> {
        self.handle(target, segment)?.append(bytes)
    }

    fn truncate(&mut self, target: NodeId, segment: u64, len: u64) -> io::Result<()> {
        self.handle(target, segment)?.truncate(len)
    }

    fn sync(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        self.handle(target, segment)?.sync()
    }

    fn sync_dir(&mut self, target: NodeId) -> io::Result<()> {
        file::sync_dir(&self.target_dir(target))?;
        file::sync_dir(&self.root)
    }

    fn remove_segment(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        self.open.remove(&(target, segment));
        match fs::remove_file(self.segment_path(target, segment)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn quarantine_segment(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        self.open.remove(&(target, segment));
        let from = self.segment_path(target, segment);
        let mut to = from.clone().into_os_string();
        to.push(".corrupt");
        fs::rename(from, to)
    }

    fn read_cursor(&mut self, target: NodeId) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.target_dir(target).join("cursor")) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_cursor(&mut self, target: NodeId, bytes: &[u8], durable: bool) -> io::Result<()> {
        let dir = self.target_dir(target);
        fs::create_dir_all(&dir)?;
        file::replace_file(&dir.join("cursor"), bytes, durable)
    }

    fn remove_target(&mut self, target: NodeId) -> io::Result<()> {
        self.open.retain(|(t, _), _| *t != target);
        let dir = self.target_dir(target);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut kept = false;
        for e in rd {
            let e = e?;
            let name = e.file_name();
            if name.to_str().is_some_and(|n| n.ends_with(".corrupt")) {
                kept = true;
            } else {
                fs::remove_file(e.path())?;
            }
        }
        if !kept {
            fs::remove_dir(&dir)?;
        }
        Ok(())
    }
}

/// [`SegmentIo`] in memory. Cloning shares the same storage, so a test can drop a store and
/// reopen another one on the same "disk".
///
/// It tracks how much of each segment was synced: [`MemSegmentIo::lose_unsynced`] cuts
/// every segment back to its synced length, simulating a power loss.
#[derive(Clone, Debug, Default)]
pub struct MemSegmentIo {
    inner: Arc<Mutex<MemDisk>>,
}

#[derive(Debug, Default)]
struct MemDisk {
    segments: BTreeMap<(NodeId, u64), MemFile>,
    quarantined: Vec<(NodeId, u64, Vec<u8>)>,
    cursors: BTreeMap<NodeId, Vec<u8>>,
}

impl MemSegmentIo {
    /// An empty in-memory disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn disk(&self) -> MutexGuard<'_, MemDisk> {
        // A poisoned lock only means another test thread panicked; the data is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on a segment's file, with the disk locked (so no other handle
    /// removes the segment meanwhile).
    fn with_file<T>(
        &self,
        target: NodeId,
        segment: u64,
        op: impl FnOnce(&mut MemFile) -> io::Result<T>,
    ) -> io::Result<T> {
        match self.disk().segments.get_mut(&(target, segment)) {
            Some(f) => op(f),
            None => Err(not_found()),
        }
    }

    /// A copy of a segment's bytes (for fault-injection tests).
    pub fn segment_bytes(&self, target: NodeId, segment: u64) -> Option<Vec<u8>> {
        self.with_file(target, segment, |f| Ok(f.contents())).ok()
    }

    /// Replaces a segment's bytes (for fault-injection tests); counts as synced.
    pub fn set_segment_bytes(&self, target: NodeId, segment: u64, bytes: Vec<u8>) {
        self.disk()
            .segments
            .insert((target, segment), MemFile::synced(bytes));
    }

    /// Number of quarantined segments.
    pub fn quarantined(&self) -> usize {
        self.disk().quarantined.len()
    }

    /// Simulates a power loss: every segment loses what was appended after its last sync.
    pub fn lose_unsynced(&self) {
        for f in self.disk().segments.values() {
            f.lose_unsynced();
        }
    }
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such segment")
}

impl SegmentIo for MemSegmentIo {
    fn list_targets(&mut self) -> io::Result<Vec<NodeId>> {
        let d = self.disk();
        let mut t: Vec<NodeId> = d.segments.keys().map(|(t, _)| *t).collect();
        t.extend(d.cursors.keys().copied());
        t.sort();
        t.dedup();
        Ok(t)
    }

    fn list_segments(&mut self, target: NodeId) -> io::Result<Vec<u64>> {
        Ok(self
            .disk()
            .segments
            .keys()
            .filter(|(t, _)| *t == target)
            .map(|(_, s)| *s)
            .collect())
    }

    fn read_segment(&mut self, target: NodeId, segment: u64) -> io::Result<Vec<u8>> {
        self.with_file(target, segment, |f| f.read_all())
    }

    fn read_at(
        &mut self,
        target: NodeId,
        segment: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        self.with_file(target, segment, |f| f.read_at(offset, buf))
    }

    fn create_segment(&mut self, target: NodeId, segment: u64, header: &[u8]) -> io::Result<()> {
        let mut d = self.disk();
        if d.segments.contains_key(&(target, segment)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "segment exists",
            ));
        }
        let mut f = MemFile::default();
        f.append(header)?;
        d.segments.insert((target, segment), f);
        Ok(())
    }

    fn append(&mut self, target: NodeId, segment: u64, bytes: &[u8]) -> io::Result<()> {
        self.with_file(target, segment, |f| f.append(bytes))
    }

    fn truncate(&mut self, target: NodeId, segment: u64, len: u64) -> io::Result<()> {
        self.with_file(target, segment, |f| f.truncate(len))
    }

    fn sync(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        self.with_file(target, segment, |f| f.sync())
    }

    fn sync_dir(&mut self, _target: NodeId) -> io::Result<()> {
        Ok(())
    }

    fn remove_segment(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        self.disk().segments.remove(&(target, segment));
        Ok(())
    }

    fn quarantine_segment(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        let mut d = self.disk();
        let f = d
            .segments
            .remove(&(target, segment))
            .ok_or_else(not_found)?;
        d.quarantined.push((target, segment, f.contents()));
        Ok(())
    }

    fn read_cursor(&mut self, target: NodeId) -> io::Result<Option<Vec<u8>>> {
        Ok(self.disk().cursors.get(&target).cloned())
    }

    fn write_cursor(&mut self, target: NodeId, bytes: &[u8], _durable: bool) -> io::Result<()> {
        self.disk().cursors.insert(target, bytes.to_vec());
        Ok(())
    }

    fn remove_target(&mut self, target: NodeId) -> io::Result<()> {
        let mut d = self.disk();
        d.segments.retain(|(t, _), _| *t != target);
        d.cursors.remove(&target);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: NodeId = NodeId(7);

    /// The disk backend makes a segment durable through the same function as a
    /// single log file, and its cursor replace is the one `DiskFile::replace` uses:
    /// every one of these fsyncs is counted by `file::sync_data`, the only place a
    /// storage file is fdatasynced (under `blocking::run`).
    #[test]
    fn disk_segments_and_a_log_file_fsync_through_the_same_call() {
        let dir = tempfile::tempdir().unwrap();
        let mut io = FileSegmentIo::new(dir.path().join("hints")).unwrap();
        io.create_segment(T, 1, b"HEADER").unwrap();
        io.append(T, 1, b"record").unwrap();
        let before = file::data_syncs();
        io.sync(T, 1).unwrap();
        assert_eq!(file::data_syncs() - before, 1, "segment sync");

        let mut log = DiskFile::open(dir.path(), "one.log").unwrap();
        log.append(b"record").unwrap();
        let before = file::data_syncs();
        log.sync().unwrap();
        assert_eq!(file::data_syncs() - before, 1, "log file sync");

        let before = file::data_syncs();
        io.write_cursor(T, b"lazy", false).unwrap();
        assert_eq!(
            file::data_syncs() - before,
            0,
            "a lazy cursor is not synced"
        );
        io.write_cursor(T, b"durable", true).unwrap();
        assert_eq!(file::data_syncs() - before, 1, "a durable cursor is");
        log.replace(b"compacted").unwrap();
        assert_eq!(file::data_syncs() - before, 2, "a replaced log file is");

        // Same layout as before the backends were shared.
        let t = dir.path().join("hints").join("7");
        assert_eq!(
            fs::read(t.join("00000000000000000001.log")).unwrap(),
            b"HEADERrecord"
        );
        assert_eq!(fs::read(t.join("cursor")).unwrap(), b"durable");
        assert!(!t.join("cursor.tmp").exists());
        assert_eq!(log.read_all().unwrap(), b"compacted");
    }

    /// A memory segment is a `MemFile`, not a copy of one: a power loss of the
    /// segment store is `MemFile::lose_unsynced` on each, seen through either handle.
    #[test]
    fn a_memory_segment_is_a_mem_file_and_loses_power_the_same_way() {
        let mut io = MemSegmentIo::new();
        io.create_segment(T, 1, b"H").unwrap();
        io.append(T, 1, b"synced").unwrap();
        io.sync(T, 1).unwrap();
        io.append(T, 1, b"+lost").unwrap();
        let mut file = io.with_file(T, 1, |f| Ok(f.clone())).unwrap();
        assert_eq!(file.contents(), b"Hsynced+lost");

        io.lose_unsynced();
        assert_eq!(
            file.contents(),
            b"Hsynced",
            "the store's power loss, seen by the file"
        );

        file.append(b"+torn").unwrap();
        file.tear(3);
        assert_eq!(
            io.read_segment(T, 1).unwrap(),
            b"Hsynced+t",
            "the file's torn write, seen by the store"
        );
        let mut buf = [0u8; 2];
        io.read_at(T, 1, 7, &mut buf).unwrap();
        assert_eq!(&buf, b"+t");
        assert_eq!(
            io.read_at(T, 1, 8, &mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
