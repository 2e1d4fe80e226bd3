//! Storage backends for the hint log: the [`SegmentIo`] trait, a file implementation and an
//! in-memory implementation.
//!
//! Owns only moving bytes: listing, creating, appending, reading, truncating, syncing and
//! removing segment files and the per-target cursor file. Must not interpret the bytes
//! (that is `format`) nor decide what to keep (that is the store).

use crate::id::NodeId;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
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
    open: HashMap<(NodeId, u64), File>,
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
        self.target_dir(target).join(format!("{segment:020}.log"))
    }

    fn target_dir(&self, target: NodeId) -> PathBuf {
        self.root.join(target.0.to_string())
    }

    fn handle(&mut self, target: NodeId, segment: u64) -> io::Result<&mut File> {
        if !self.open.contains_key(&(target, segment)) {
            let f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(self.segment_path(target, segment))?;
            self.open.insert((target, segment), f);
        }
        self.open
            .get_mut(&(target, segment))
            .ok_or_else(|| io::Error::other("segment handle vanished"))
    }
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
        let f = self.handle(target, segment)?;
        let mut buf = Vec::new();
        let mut r: &File = f;
        r.seek(SeekFrom::Start(0))?;
        r.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn read_at(
        &mut self,
        target: NodeId,
        segment: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let f = self.handle(target, segment)?;
        let mut r: &File = f;
        r.seek(SeekFrom::Start(offset))?;
        r.read_exact(buf)
    }

    fn create_segment(&mut self, target: NodeId, segment: u64, header: &[u8]) -> io::Result<()> {
        fs::create_dir_all(self.target_dir(target))?;
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(self.segment_path(target, segment))?;
        f.write_all(header)?;
        self.open.insert((target, segment), f);
        Ok(())
    }

    fn append(&mut self, target: NodeId, segment: u64, bytes: &[u8]) -> io::Result<()> {
        self.handle(target, segment)?.write_all(bytes)
    }

    fn truncate(&mut self, target: NodeId, segment: u64, len: u64) -> io::Result<()> {
        self.handle(target, segment)?.set_len(len)
    }

    fn sync(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        let file = self.handle(target, segment)?;
        crate::blocking::run(|| file.sync_data())
    }

    fn sync_dir(&mut self, target: NodeId) -> io::Result<()> {
        sync_dir(&self.target_dir(target))?;
        sync_dir(&self.root)
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
        let tmp = dir.join("cursor.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            crate::blocking::run(|| f.sync_data())?;
        }
        drop(f);
        fs::rename(&tmp, dir.join("cursor"))?;
        if durable {
            sync_dir(&dir)?;
        }
        Ok(())
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

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    crate::blocking::run(|| d.sync_all())
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
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
    segments: BTreeMap<(NodeId, u64), MemSegment>,
    quarantined: Vec<(NodeId, u64, Vec<u8>)>,
    cursors: BTreeMap<NodeId, Vec<u8>>,
}

#[derive(Debug, Default)]
struct MemSegment {
    data: Vec<u8>,
    synced: usize,
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

    /// A copy of a segment's bytes (for fault-injection tests).
    pub fn segment_bytes(&self, target: NodeId, segment: u64) -> Option<Vec<u8>> {
        self.disk()
            .segments
            .get(&(target, segment))
            .map(|s| s.data.clone())
    }

    /// Replaces a segment's bytes (for fault-injection tests); counts as synced.
    pub fn set_segment_bytes(&self, target: NodeId, segment: u64, bytes: Vec<u8>) {
        let synced = bytes.len();
        self.disk().segments.insert(
            (target, segment),
            MemSegment {
                data: bytes,
                synced,
            },
        );
    }

    /// Number of quarantined segments.
    pub fn quarantined(&self) -> usize {
        self.disk().quarantined.len()
    }

    /// Simulates a power loss: every segment loses what was appended after its last sync.
    pub fn lose_unsynced(&self) {
        for s in self.disk().segments.values_mut() {
            s.data.truncate(s.synced);
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
        self.segment_bytes(target, segment).ok_or_else(not_found)
    }

    fn read_at(
        &mut self,
        target: NodeId,
        segment: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let d = self.disk();
        let s = d.segments.get(&(target, segment)).ok_or_else(not_found)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| s.data.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short segment"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn create_segment(&mut self, target: NodeId, segment: u64, header: &[u8]) -> io::Result<()> {
        let mut d = self.disk();
        if d.segments.contains_key(&(target, segment)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "segment exists",
            ));
        }
        d.segments.insert(
            (target, segment),
            MemSegment {
                data: header.to_vec(),
                synced: 0,
            },
        );
        Ok(())
    }

    fn append(&mut self, target: NodeId, segment: u64, bytes: &[u8]) -> io::Result<()> {
        let mut d = self.disk();
        let s = d
            .segments
            .get_mut(&(target, segment))
            .ok_or_else(not_found)?;
        s.data.extend_from_slice(bytes);
        Ok(())
    }

    fn truncate(&mut self, target: NodeId, segment: u64, len: u64) -> io::Result<()> {
        let mut d = self.disk();
        let s = d
            .segments
            .get_mut(&(target, segment))
            .ok_or_else(not_found)?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        s.data.resize(len, 0);
        s.synced = s.synced.min(len);
        Ok(())
    }

    fn sync(&mut self, target: NodeId, segment: u64) -> io::Result<()> {
        let mut d = self.disk();
        let s = d
            .segments
            .get_mut(&(target, segment))
            .ok_or_else(not_found)?;
        s.synced = s.data.len();
        Ok(())
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
        let s = d
            .segments
            .remove(&(target, segment))
            .ok_or_else(not_found)?;
        d.quarantined.push((target, segment, s.data));
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
