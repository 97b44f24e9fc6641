//! The file-system seam: every file operation of the write-ahead log, the
//! snapshots and recovery goes through this module, so the same code runs
//! on the real disk and on the simulator's disk (`sim::disk::SimDisk`,
//! which injects torn and lost writes, failed fsyncs, a full disk and bit
//! flips; SIMULATION.md).
//!
//! Why a mount table and not a `Storage` parameter on every function: the
//! log code names files by path everywhere (segments and snapshots are
//! found by listing a directory), and recovery spreads the reading over
//! threads. A simulated disk is mounted under a root of its own
//! ([`SIM_ROOT`]`/<n>`); a path under a mounted root goes to that disk,
//! every other path to the operating system. Nothing else changes for the
//! server: its data dir is never under [`SIM_ROOT`] unless a simulator
//! mounted it, and an unmounted path there is an ordinary path.
//!
//! Not behind the seam: the data dir lock (`node`), which the simulator
//! does not need (one process per simulated disk).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::sim::disk::{SimDisk, SimFile};

/// Where simulated disks are mounted (`/stampede-sim/<n>`).
pub const SIM_ROOT: &str = "/stampede-sim";

/// Mounted simulated disks: `(root, disk)`. Few (one per simulation running
/// in this process), so a list.
static MOUNTS: RwLock<Vec<(PathBuf, Arc<SimDisk>)>> = RwLock::new(Vec::new());

/// Mount `disk` under a fresh root below [`SIM_ROOT`]; the root. Unmounted
/// when the returned guard drops.
pub fn mount(disk: Arc<SimDisk>) -> Mount {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let root = Path::new(SIM_ROOT).join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    MOUNTS.write().push((root.clone(), disk));
    Mount { root }
}

/// A mounted simulated disk; unmounted on drop.
pub struct Mount {
    pub root: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        MOUNTS.write().retain(|(root, _)| root != &self.root);
    }
}

/// The simulated disk `path` lives on, if any.
fn sim(path: &Path) -> Option<Arc<SimDisk>> {
    if !path.starts_with(SIM_ROOT) {
        return None;
    }
    MOUNTS.read().iter().find(|(root, _)| path.starts_with(root)).map(|(_, disk)| disk.clone())
}

/// An open file, for writing at explicit offsets.
pub enum File {
    Os(std::fs::File),
    Sim(SimFile),
}

impl File {
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            File::Os(f) => std::os::unix::fs::FileExt::write_all_at(f, buf, offset),
            File::Sim(f) => f.write_at(buf, offset),
        }
    }

    /// `fdatasync`: the data written so far, and the size if it changed.
    pub fn sync_data(&self) -> io::Result<()> {
        match self {
            File::Os(f) => f.sync_data(),
            File::Sim(f) => f.sync(),
        }
    }

    /// `fsync`.
    pub fn sync_all(&self) -> io::Result<()> {
        match self {
            File::Os(f) => f.sync_all(),
            File::Sim(f) => f.sync(),
        }
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            File::Os(f) => f.set_len(len),
            File::Sim(f) => f.set_len(len),
        }
    }

    /// Read at `offset` (`pread`): the bytes read, 0 at the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            File::Os(f) => std::os::unix::fs::FileExt::read_at(f, buf, offset),
            File::Sim(f) => f.read_at(buf, offset),
        }
    }
}

/// Open an existing file for reading (at explicit offsets).
pub fn open_read(path: &Path) -> io::Result<File> {
    if let Some(disk) = sim(path) {
        return disk.open(path).map(File::Sim);
    }
    std::fs::File::open(path).map(File::Os)
}

/// How [`create`] treats an existing file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Create {
    /// Fail if it exists.
    New,
    /// Empty it.
    Truncate,
}

/// Create a file for writing.
pub fn create(path: &Path, how: Create) -> io::Result<File> {
    if let Some(disk) = sim(path) {
        return disk.create(path, how).map(File::Sim);
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    match how {
        Create::New => options.create_new(true),
        Create::Truncate => options.create(true).truncate(true),
    };
    options.open(path).map(File::Os)
}

/// Open an existing file for writing.
pub fn open(path: &Path) -> io::Result<File> {
    if let Some(disk) = sim(path) {
        return disk.open(path).map(File::Sim);
    }
    std::fs::OpenOptions::new().write(true).open(path).map(File::Os)
}

/// The whole file, appended to `buf`.
pub fn read_into(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    if let Some(disk) = sim(path) {
        return disk.read_into(path, buf);
    }
    std::io::Read::read_to_end(&mut std::fs::File::open(path)?, buf).map(|_| ())
}

pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_into(path, &mut buf)?;
    Ok(buf)
}

pub fn len(path: &Path) -> io::Result<u64> {
    if let Some(disk) = sim(path) {
        return disk.len(path);
    }
    Ok(std::fs::metadata(path)?.len())
}

pub fn exists(path: &Path) -> bool {
    match sim(path) {
        Some(disk) => disk.len(path).is_ok(),
        None => path.exists(),
    }
}

/// Names of the regular files in `dir`.
pub fn list(dir: &Path) -> io::Result<Vec<String>> {
    if let Some(disk) = sim(dir) {
        return Ok(disk.list(dir));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}

pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    if let Some(disk) = sim(from) {
        return disk.rename(from, to);
    }
    std::fs::rename(from, to)
}

pub fn remove(path: &Path) -> io::Result<()> {
    if let Some(disk) = sim(path) {
        return disk.remove(path);
    }
    std::fs::remove_file(path)
}

/// fsync a directory, so a created, renamed or deleted entry is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    if let Some(disk) = sim(dir) {
        return disk.sync_dir(dir);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Write a whole new file under a temporary name, sync it and rename it
/// into place (then sync the directory): a reader sees all of it or none.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!("{name}.tmp"));
    let file = create(&tmp, Create::Truncate)?;
    file.write_all_at(bytes, 0)?;
    file.sync_all()?;
    drop(file);
    rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}
