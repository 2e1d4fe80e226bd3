//! The IO of one storage file, on disk or in memory, and the one way a file or a
//! directory is made durable. The dedup log is one such file; the hint store's
//! segments (`segments`) are many, opened through the same handles.
//!
//! Owns the IO of one file: read it whole or at an offset, append, truncate, fsync,
//! and replace it atomically (temporary file, fsync, rename, directory fsync); every
//! fsync goes through [`crate::blocking::run`]. Knows no format. The in-memory
//! [`MemFile`] tracks what was fsynced, so recovery can be tested against power loss
//! and torn writes without a real disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A single append-only log file.
pub(crate) trait LogFile: std::fmt::Debug + Send {
    /// Where the file is, for errors.
    fn path(&self) -> &Path;
    /// The file's bytes.
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    /// Append `bytes` at the end (reaches the OS: survives a process crash).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Cut the file to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// fsync: what was appended survives a power loss.
    fn sync(&mut self) -> io::Result<()>;
    /// Replace the whole file with `bytes`, atomically and durably: after a crash at
    /// any point it holds either its old bytes or `bytes`.
    fn replace(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// A [`LogFile`] on disk.
#[derive(Debug)]
pub(crate) struct DiskFile {
    path: PathBuf,
    file: File,
}

impl DiskFile {
    /// Opens (creating if needed) `dir/name`.
    pub(crate) fn open(dir: &Path, name: &str) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(name);
        let file = Self::options().create(true).open(&path)?;
        Ok(DiskFile { path, file })
    }

    /// Opens the file at `path`, which must exist.
    pub(crate) fn open_existing(path: PathBuf) -> io::Result<Self> {
        let file = Self::options().open(&path)?;
        Ok(DiskFile { path, file })
    }

    /// Creates `dir/name` (creating `dir` if needed), which must not exist yet,
    /// holding `header` (written, not synced).
    pub(crate) fn create_new(dir: &Path, name: &str, header: &[u8]) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(name);
        let mut file = Self::options().create_new(true).open(&path)?;
        if let Err(e) = file.write_all(header) {
            // Not left behind: a retry (the disk had filled up, and has room again)
            // creates the same name. (Regression: the headerless file stayed, and every
            // later segment creation for the target failed with AlreadyExists for the
            // rest of the run.)
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(DiskFile { path, file })
    }

    /// Fills `buf` from `offset`; an error if the file is shorter.
    pub(crate) fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.seek(io::SeekFrom::Start(offset))?;
        self.file.read_exact(buf)
    }

    fn options() -> OpenOptions {
        let mut o = OpenOptions::new();
        o.read(true).append(true);
        o
    }
}

impl LogFile for DiskFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.file.seek(io::SeekFrom::Start(0))?;
        self.file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&mut self) -> io::Result<()> {
        sync_data(&self.file)?;
        check_linked(&self.file, &self.path)
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        // The new file's own handle (read + append), kept across the rename: once
        // renamed over, the old handle names the old, unlinked file, and reopening by
        // name could fail after the rename had happened (out of descriptors), leaving
        // every later append and sync on the unlinked file.
        self.file = replace_with(&self.path, bytes, true, Self::options())?;
        Ok(())
    }
}

/// Replaces the file at `path` with `bytes` atomically: writes `<name>.tmp` next to
/// it and renames it over `path`, so after a crash at any point `path` holds either
/// its old bytes or `bytes`. With `durable` the temporary file is fsynced before the
/// rename and the directory after it, so the new bytes also survive a power loss (a
/// failed directory fsync is logged at warn, not returned: the rename has happened).
pub(crate) fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let mut write = OpenOptions::new();
    write.write(true);
    replace_with(path, bytes, durable, write).map(drop)
}

/// [`replace_file`], returning the new file's handle, opened with `options` (plus
/// create-new on the temporary name).
fn replace_with(
    path: &Path,
    bytes: &[u8],
    durable: bool,
    mut options: OpenOptions,
) -> io::Result<File> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!("{name}.tmp"));
    // A leftover of an interrupted replace; `create_new` fails if it is still there.
    let _ = fs::remove_file(&tmp);
    let mut f = options.create_new(true).open(&tmp)?;
    if let Err(e) = f
        .write_all(bytes)
        .and_then(|()| if durable { sync_data(&f) } else { Ok(()) })
    {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)?;
    // The replace is done once the rename is: either file holds what the caller
    // needs (a compaction's live state, a cursor no newer than its log), so a
    // directory fsync that fails only leaves the rename's durability to the OS. It
    // must not fail the replace after the fact. (Regression: it did, and a dedup log
    // in the working directory, whose parent is "", failed every compaction.)
    if durable {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Err(e) = sync_dir(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "directory fsync after a replace failed");
        }
    }
    Ok(f)
}

/// Makes creations, removals and renames in `dir` durable (a no-op where directories
/// cannot be fsynced).
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    crate::blocking::run(|| d.sync_all())
}

/// Makes creations, removals and renames in `dir` durable (a no-op where directories
/// cannot be fsynced).
#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// An error if the open `file` no longer has a name (its directory or the file itself
/// was removed, or another file renamed over it): what was written through the handle
/// is gone with the last handle, so a sync of it must not count as durable.
/// (Regression: a removed hint, dedup or dead-letter directory went unnoticed, and
/// hints, `ack_durable` confirmations and dead letters written after it were lost
/// silently at the next restart.)
#[cfg(unix)]
fn check_linked(file: &File, path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if file.metadata()?.nlink() == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} was removed while open", path.display()),
        ));
    }
    Ok(())
}

/// An error if the open `file` no longer has a name (not checked on this platform).
#[cfg(not(unix))]
fn check_linked(_file: &File, _path: &Path) -> io::Result<()> {
    Ok(())
}

/// fdatasync of `file`: the one place a storage file's bytes are made durable, under
/// [`crate::blocking::run`] (a multi-thread runtime's worker hands its other tasks
/// on meanwhile).
fn sync_data(file: &File) -> io::Result<()> {
    #[cfg(test)]
    DATA_SYNCS.with(|n| n.set(n.get() + 1));
    crate::blocking::run(|| file.sync_data())
}

#[cfg(test)]
thread_local! {
    /// How many times [`sync_data`] ran on this thread.
    static DATA_SYNCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many file fsyncs this thread has made through [`sync_data`] so far.
#[cfg(test)]
pub(crate) fn data_syncs() -> u64 {
    DATA_SYNCS.with(|n| n.get())
}

/// A [`LogFile`] in memory. Cloning shares the same "disk", so a test can drop a log
/// and reopen another on it after simulating a crash.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemFile {
    inner: Arc<Mutex<MemBytes>>,
}

#[derive(Debug, Default)]
struct MemBytes {
    data: Vec<u8>,
    /// How much of `data` an fsync made durable.
    synced: usize,
}

impl MemFile {
    /// A file holding `bytes`, all of them synced.
    pub(crate) fn synced(bytes: Vec<u8>) -> Self {
        let synced = bytes.len();
        MemFile {
            inner: Arc::new(Mutex::new(MemBytes {
                data: bytes,
                synced,
            })),
        }
    }

    fn bytes(&self) -> MutexGuard<'_, MemBytes> {
        // A poisoned lock only means another test thread panicked; the data is still
        // usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the file's bytes.
    pub(crate) fn contents(&self) -> Vec<u8> {
        self.bytes().data.clone()
    }

    /// Fills `buf` from `offset`; an error if the file is shorter.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let b = self.bytes();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| b.data.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short file"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// Power loss: what was appended after the last fsync is gone.
    pub(crate) fn lose_unsynced(&self) {
        let mut b = self.bytes();
        let synced = b.synced;
        b.data.truncate(synced);
    }

    /// A write torn by a crash: the last `n` bytes not yet fsynced never reached the
    /// disk.
    #[cfg(test)]
    pub(crate) fn tear(&self, n: usize) {
        let mut b = self.bytes();
        let keep = b.data.len().saturating_sub(n).max(b.synced);
        b.data.truncate(keep);
    }
}

impl LogFile for MemFile {
    fn path(&self) -> &Path {
        Path::new("<memory>")
    }

    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        Ok(self.contents())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.bytes().data.extend_from_slice(bytes);
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut b = self.bytes();
        b.data.resize(len, 0);
        b.synced = b.synced.min(len);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut b = self.bytes();
        b.synced = b.data.len();
        Ok(())
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut b = self.bytes();
        b.data = bytes.to_vec();
        b.synced = bytes.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a replace, the handle is the new file's: appends, reads and syncs reach
    /// the file under the name, and no temporary file is left (also when one was
    /// left by an interrupted replace).
    #[test]
    fn a_replaced_file_keeps_appending_to_the_file_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = DiskFile::open(dir.path(), "log").unwrap();
        f.append(b"old records").unwrap();
        fs::write(dir.path().join("log.tmp"), b"leftover of a crash").unwrap();
        f.replace(b"compacted;").unwrap();
        f.append(b"after").unwrap();
        f.sync().unwrap();
        assert_eq!(
            fs::read(dir.path().join("log")).unwrap(),
            b"compacted;after"
        );
        assert_eq!(f.read_all().unwrap(), b"compacted;after");
        f.append(b"+more").unwrap(); // appends after a read, at the end
        assert_eq!(
            fs::read(dir.path().join("log")).unwrap(),
            b"compacted;after+more"
        );
        assert!(!dir.path().join("log.tmp").exists());
    }
}
