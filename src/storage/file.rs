//! One log file, on disk or in memory: what a single-file log (the dedup log) needs
//! from storage, so its recovery can be tested against power loss and torn writes
//! without a real disk.
//!
//! Owns the IO of one file: read it whole, append, truncate, fsync, and replace it
//! atomically (temporary file, fsync, rename, directory fsync). Knows no format.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
#[cfg(test)]
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
        let file = Self::handle(&path)?;
        Ok(DiskFile { path, file })
    }

    fn handle(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
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
        self.file.sync_data()
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = self.path.with_file_name(format!("{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.file = Self::handle(&self.path)?;
        Ok(())
    }
}

/// A [`LogFile`] in memory. Cloning shares the same "disk", so a test can drop a log
/// and reopen another on it after simulating a crash.
#[cfg(test)]
#[derive(Clone, Debug, Default)]
pub(crate) struct MemFile {
    inner: Arc<Mutex<MemBytes>>,
}

#[cfg(test)]
#[derive(Debug, Default)]
struct MemBytes {
    data: Vec<u8>,
    /// How much of `data` an fsync made durable.
    synced: usize,
}

#[cfg(test)]
impl MemFile {
    fn bytes(&self) -> MutexGuard<'_, MemBytes> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the file's bytes.
    pub(crate) fn contents(&self) -> Vec<u8> {
        self.bytes().data.clone()
    }

    /// Power loss: what was appended after the last fsync is gone.
    pub(crate) fn lose_unsynced(&self) {
        let mut b = self.bytes();
        let synced = b.synced;
        b.data.truncate(synced);
    }

    /// A write torn by a crash: the last `n` bytes not yet fsynced never reached the
    /// disk.
    pub(crate) fn tear(&self, n: usize) {
        let mut b = self.bytes();
        let keep = b.data.len().saturating_sub(n).max(b.synced);
        b.data.truncate(keep);
    }
}

#[cfg(test)]
impl LogFile for MemFile {
    fn path(&self) -> &Path {
        Path::new("<memory>")
    }

    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        Ok(self.bytes().data.clone())
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
