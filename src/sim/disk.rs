//! The simulator's disk: files in memory, with what a power loss would keep
//! tracked apart from what reads see, and faults injected from the
//! simulation's seed. It is mounted under `storage::SIM_ROOT`, so the log
//! writer, snapshots and recovery run on it unchanged.
//!
//! The fault model (SIMULATION.md says what it assumes cannot happen):
//! - Data written but not yet synced (`fdatasync` / `fsync`) is volatile.
//!   A **power loss** keeps, per file, a prefix of the unsynced writes in
//!   the order they were made; the first write not kept whole may be
//!   **torn** at a sector boundary (`TORN_WRITE_ALIGN_BYTES`), with or
//!   without the file size having grown over the lost part (zeros). A
//!   **process kill** keeps everything written (the page cache survives).
//! - Directory changes (create, rename, remove) are volatile until the
//!   directory is synced; a power loss keeps a prefix of them, in order (a
//!   journaling file system commits metadata in order). A rename is atomic.
//! - `sync` can **fail** (EIO): what it was to make durable stays unknown
//!   (kept or lost at the next power loss), as on Linux after a failed
//!   fsync.
//! - The disk can be **full**: a write that would pass the capacity fails
//!   with ENOSPC and changes nothing.
//! - A `sync` can be **slow**: simulated time passes inside it (the
//!   simulator's clocks move), so a lease or a reservation can run out
//!   between a group's write and its release.
//! - A **bit flip** in synced data (latent corruption) can be injected at
//!   any time; [`SimDisk::unflip`] undoes it (the operator's restore).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::limits::TORN_WRITE_ALIGN_BYTES;
use crate::storage::Create;

/// How often the disk misbehaves, per operation, in millionths.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskFaults {
    /// A `sync` that fails with EIO.
    pub sync_fail_ppm: u32,
    /// A `sync` that is slow: it takes 1..=`slow_sync_ms_max` ms of
    /// simulated time (the clock moves while the caller waits in it).
    pub slow_sync_ppm: u32,
    pub slow_sync_ms_max: u64,
}

/// What the disk did, for the simulation's report.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskStats {
    pub writes: u64,
    pub syncs: u64,
    pub sync_failures: u64,
    /// Crashes armed to strike between a write and its sync.
    pub crashes_before_sync: u64,
    pub full_refusals: u64,
    pub power_losses: u64,
    pub torn_writes: u64,
    pub lost_writes: u64,
    pub lost_names: u64,
    pub flips: u64,
    pub slow_syncs: u64,
    /// Simulated time spent in slow syncs.
    pub stalled_ms: u64,
}

/// A flipped bit, to undo.
#[derive(Clone, Debug)]
pub struct Flip {
    pub path: PathBuf,
    pub offset: usize,
    pub bit: u8,
    /// The file flipped (a file written since under the same name is
    /// another one, and left alone by `unflip`).
    ino: u64,
}

enum Pending {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What a power loss starts from.
    durable: Vec<u8>,
    /// Changes since the last successful sync, in order.
    pending: Vec<Pending>,
}

#[derive(Clone)]
enum NameOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf, u64),
}

struct Inner {
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    pending_names: Vec<NameOp>,
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    /// Bumped by every crash: files opened before it are dead handles.
    generation: u64,
    /// The process dies at the next sync, before it reaches the disk.
    crash_at_sync: bool,
    capacity: u64,
    rng: SmallRng,
    faults: DiskFaults,
    stats: DiskStats,
    /// Moves simulated time by the given ms (a slow sync); set by the
    /// simulator, which owns the clocks.
    pass_time: Option<PassTime>,
}

/// What a slow sync calls to let simulated time pass.
pub type PassTime = Arc<dyn Fn(u64) + Send + Sync>;

pub struct SimDisk {
    inner: Mutex<Inner>,
}

/// An open file of a [`SimDisk`].
pub struct SimFile {
    disk: Arc<SimDisk>,
    ino: u64,
    generation: u64,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file (simulated disk)", path.display()))
}

fn apply(data: &mut Vec<u8>, change: &Pending) {
    match change {
        Pending::Write { offset, bytes } => {
            let end = *offset as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*offset as usize..end].copy_from_slice(bytes);
        }
        Pending::SetLen(len) => data.resize(*len as usize, 0),
    }
}

fn apply_name(names: &mut BTreeMap<PathBuf, u64>, op: &NameOp) {
    match op {
        NameOp::Link(path, ino) => {
            names.insert(path.clone(), *ino);
        }
        NameOp::Unlink(path) => {
            names.remove(path);
        }
        NameOp::Rename(from, to, ino) => {
            names.remove(from);
            names.insert(to.clone(), *ino);
        }
    }
}

impl SimDisk {
    pub fn new(seed: u64, capacity: u64, faults: DiskFaults) -> Arc<SimDisk> {
        Arc::new(SimDisk {
            inner: Mutex::new(Inner {
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                pending_names: Vec::new(),
                inodes: BTreeMap::new(),
                next_ino: 1,
                generation: 0,
                crash_at_sync: false,
                capacity,
                rng: SmallRng::seed_from_u64(seed),
                faults,
                stats: DiskStats::default(),
                pass_time: None,
            }),
        })
    }

    pub fn stats(&self) -> DiskStats {
        self.inner.lock().stats
    }

    /// Change the fault rates (and disarm a pending crash).
    /// Where slow syncs spend their time (the simulator's clocks).
    pub fn set_pass_time(&self, pass_time: PassTime) {
        self.inner.lock().pass_time = Some(pass_time);
    }

    pub fn set_faults(&self, faults: DiskFaults) {
        let mut inner = self.inner.lock();
        inner.faults = faults;
        inner.crash_at_sync = false;
    }

    /// Bytes held by the files that have names.
    pub fn used(&self) -> u64 {
        let inner = self.inner.lock();
        inner.used()
    }

    pub fn set_capacity(&self, capacity: u64) {
        self.inner.lock().capacity = capacity;
    }

    pub(crate) fn create(self: &Arc<Self>, path: &Path, how: Create) -> io::Result<SimFile> {
        let mut inner = self.inner.lock();
        if let Some(&ino) = inner.names.get(path) {
            if how == Create::New {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: exists", path.display())));
            }
            let inode = inner.inodes.get_mut(&ino).expect("named inode");
            inode.data.clear();
            inode.pending.push(Pending::SetLen(0));
            return Ok(SimFile { disk: self.clone(), ino, generation: inner.generation });
        }
        let ino = inner.next_ino;
        inner.next_ino += 1;
        inner.inodes.insert(ino, Inode::default());
        inner.names.insert(path.to_path_buf(), ino);
        inner.pending_names.push(NameOp::Link(path.to_path_buf(), ino));
        Ok(SimFile { disk: self.clone(), ino, generation: inner.generation })
    }

    pub(crate) fn open(self: &Arc<Self>, path: &Path) -> io::Result<SimFile> {
        let inner = self.inner.lock();
        let ino = *inner.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(SimFile { disk: self.clone(), ino, generation: inner.generation })
    }

    pub(crate) fn read_into(&self, path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
        let inner = self.inner.lock();
        let ino = inner.names.get(path).ok_or_else(|| not_found(path))?;
        buf.extend_from_slice(&inner.inodes[ino].data);
        Ok(())
    }

    pub(crate) fn len(&self, path: &Path) -> io::Result<u64> {
        let inner = self.inner.lock();
        let ino = inner.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(inner.inodes[ino].data.len() as u64)
    }

    pub(crate) fn list(&self, dir: &Path) -> Vec<String> {
        let inner = self.inner.lock();
        inner
            .names
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect()
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut inner = self.inner.lock();
        let ino = inner.names.remove(from).ok_or_else(|| not_found(from))?;
        inner.names.insert(to.to_path_buf(), ino);
        inner.pending_names.push(NameOp::Rename(from.to_path_buf(), to.to_path_buf(), ino));
        Ok(())
    }

    pub(crate) fn remove(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.names.remove(path).ok_or_else(|| not_found(path))?;
        inner.pending_names.push(NameOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    pub(crate) fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        // One directory per data dir: the whole namespace.
        let mut inner = self.inner.lock();
        if inner.sync_fails() {
            return Err(io::Error::other("injected EIO on directory fsync (simulated disk)"));
        }
        let ops = std::mem::take(&mut inner.pending_names);
        for op in &ops {
            apply_name(&mut inner.durable_names, op);
        }
        Ok(())
    }

    /// Make the process die at its next `sync`, after its writes and before
    /// they are durable (the sync fails; the caller then crashes the node).
    pub fn crash_at_next_sync(&self) {
        self.inner.lock().crash_at_sync = true;
    }

    /// A crash is armed and has not struck yet.
    pub fn crash_armed(&self) -> bool {
        self.inner.lock().crash_at_sync
    }

    /// The process dies: every handle is dead; written data survives (the
    /// page cache is the kernel's).
    pub fn kill(&self) {
        let mut inner = self.inner.lock();
        inner.generation += 1;
    }

    /// The power goes: every handle is dead, and what was not synced is
    /// kept or lost (see the module doc).
    pub fn power_loss(&self) {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        inner.generation += 1;
        inner.stats.power_losses += 1;
        // Names: a prefix of the pending changes, in order.
        let ops = std::mem::take(&mut inner.pending_names);
        let keep = inner.rng.gen_range(0..=ops.len());
        inner.stats.lost_names += (ops.len() - keep) as u64;
        for op in &ops[..keep] {
            apply_name(&mut inner.durable_names, op);
        }
        inner.names = inner.durable_names.clone();
        // Data: per file, a prefix of the pending writes; the next may tear.
        for inode in inner.inodes.values_mut() {
            let pending = std::mem::take(&mut inode.pending);
            let keep = inner.rng.gen_range(0..=pending.len());
            let mut data = std::mem::take(&mut inode.durable);
            for change in &pending[..keep] {
                apply(&mut data, change);
            }
            if let Some(Pending::Write { offset, bytes }) = pending.get(keep) {
                let sectors = TORN_WRITE_ALIGN_BYTES as u64;
                // Keep the sectors up to a boundary inside the write.
                let end = offset + bytes.len() as u64;
                let first_boundary = (offset / sectors + 1) * sectors;
                if first_boundary < end && inner.rng.gen_bool(0.5) {
                    let boundaries = (end - 1 - first_boundary) / sectors + 1;
                    let cut = first_boundary + inner.rng.gen_range(0..boundaries) * sectors;
                    let torn = Pending::Write { offset: *offset, bytes: bytes[..(cut - offset) as usize].to_vec() };
                    apply(&mut data, &torn);
                    // The size may have grown over the lost part (zeros).
                    if inner.rng.gen_bool(0.5) && (data.len() as u64) < end {
                        data.resize(end as usize, 0);
                    }
                    inner.stats.torn_writes += 1;
                }
            }
            inner.stats.lost_writes += (pending.len() - keep) as u64;
            inode.data = data.clone();
            inode.durable = data;
        }
    }

    /// Flip one random bit of synced data in a file whose name starts
    /// with one of `prefixes` (segments, snapshots); `None` if there is
    /// no such byte.
    pub fn flip_random_bit(&self, prefixes: &[&str]) -> Option<Flip> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let candidates: Vec<(PathBuf, u64)> = inner
            .names
            .iter()
            .filter(|(path, ino)| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                prefixes.iter().any(|p| name.starts_with(p)) && !inner.inodes[ino].durable.is_empty()
            })
            .map(|(path, ino)| (path.clone(), *ino))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let (path, ino) = candidates[inner.rng.gen_range(0..candidates.len())].clone();
        let inode = inner.inodes.get_mut(&ino).expect("named inode");
        // Only bytes that are synced and not rewritten since (a flip in
        // data still pending would be overwritten by its write).
        let len = inode.durable.len().min(inode.data.len());
        if len == 0 {
            return None;
        }
        let offset = inner.rng.gen_range(0..len);
        let bit = inner.rng.gen_range(0..8u8);
        inode.durable[offset] ^= 1 << bit;
        inode.data[offset] ^= 1 << bit;
        inner.stats.flips += 1;
        Some(Flip { path, offset, bit, ino })
    }

    /// Undo a flip (if the file is still there and that long).
    pub fn unflip(&self, flip: &Flip) {
        let mut inner = self.inner.lock();
        let Some(inode) = inner.inodes.get_mut(&flip.ino) else { return };
        for data in [&mut inode.durable, &mut inode.data] {
            if let Some(byte) = data.get_mut(flip.offset) {
                *byte ^= 1 << flip.bit;
            }
        }
    }

    /// Make this (empty) disk a copy of `other`'s durable state (a base
    /// backup taken after `other` synced), its paths moved from `from_root`
    /// to `to_root`. Inode numbers are kept, so a pending [`Flip`] of
    /// `other` can be undone here too.
    pub fn copy_from(&self, other: &SimDisk, from_root: &Path, to_root: &Path) {
        let source = other.inner.lock();
        let mut inner = self.inner.lock();
        let moved = |path: &PathBuf| to_root.join(path.strip_prefix(from_root).expect("under the root"));
        inner.names = source.durable_names.iter().map(|(path, ino)| (moved(path), *ino)).collect();
        inner.durable_names = inner.names.clone();
        inner.inodes = source
            .inodes
            .iter()
            .map(|(ino, inode)| {
                let copy = Inode { data: inode.durable.clone(), durable: inode.durable.clone(), pending: Vec::new() };
                (*ino, copy)
            })
            .collect();
        inner.next_ino = source.next_ino;
    }

    /// `(name, bytes)` of every file, for traces and failure reports.
    pub fn listing(&self) -> Vec<(String, u64)> {
        let inner = self.inner.lock();
        inner
            .names
            .iter()
            .map(|(path, ino)| (path.display().to_string(), inner.inodes[ino].data.len() as u64))
            .collect()
    }
}

impl Inner {
    fn used(&self) -> u64 {
        self.names.values().map(|ino| self.inodes[ino].data.len() as u64).sum()
    }

    /// A slow device (a congested SAN, a disk retrying a sector): the
    /// sync takes simulated time, during which leases and reservations
    /// can run out before the caller sees it return.
    fn maybe_slow(&mut self) {
        let ppm = self.faults.slow_sync_ppm;
        if ppm == 0 || self.rng.gen_range(0..1_000_000) >= ppm {
            return;
        }
        let ms = self.rng.gen_range(1..=self.faults.slow_sync_ms_max.max(1));
        self.stats.slow_syncs += 1;
        self.stats.stalled_ms += ms;
        if let Some(pass_time) = &self.pass_time {
            pass_time(ms);
        }
    }

    fn sync_fails(&mut self) -> bool {
        let ppm = self.faults.sync_fail_ppm;
        let fails = ppm > 0 && self.rng.gen_range(0..1_000_000) < ppm;
        if fails {
            self.stats.sync_failures += 1;
        }
        fails
    }
}

impl SimFile {
    fn live<'a>(&self, inner: &'a mut Inner) -> io::Result<&'a mut Inner> {
        if inner.generation != self.generation {
            return Err(io::Error::other("the process that opened this file is gone (simulated crash)"));
        }
        Ok(inner)
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut guard = self.disk.inner.lock();
        let inner = self.live(&mut guard)?;
        let inode_len = inner.inodes[&self.ino].data.len() as u64;
        let growth = (offset + buf.len() as u64).saturating_sub(inode_len);
        if growth > 0 && inner.used() + growth > inner.capacity {
            inner.stats.full_refusals += 1;
            return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left on device (simulated disk)"));
        }
        inner.stats.writes += 1;
        let inode = inner.inodes.get_mut(&self.ino).expect("open inode");
        let change = Pending::Write { offset, bytes: buf.to_vec() };
        apply(&mut inode.data, &change);
        inode.pending.push(change);
        Ok(())
    }

    /// Reads see what was written (synced or not), as the page cache does;
    /// a dead process's handle reads nothing.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut guard = self.disk.inner.lock();
        let inner = self.live(&mut guard)?;
        let data = &inner.inodes[&self.ino].data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        let mut guard = self.disk.inner.lock();
        let inner = self.live(&mut guard)?;
        let inode = inner.inodes.get_mut(&self.ino).expect("open inode");
        let change = Pending::SetLen(len);
        apply(&mut inode.data, &change);
        inode.pending.push(change);
        Ok(())
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut guard = self.disk.inner.lock();
        let inner = self.live(&mut guard)?;
        inner.stats.syncs += 1;
        if inner.crash_at_sync {
            inner.crash_at_sync = false;
            inner.stats.crashes_before_sync += 1;
            return Err(io::Error::other("the process died before this fsync (simulated crash)"));
        }
        if inner.sync_fails() {
            // Unknown: the pending changes may or may not reach the disk.
            return Err(io::Error::other("injected EIO on fsync (simulated disk)"));
        }
        inner.maybe_slow();
        let inode = inner.inodes.get_mut(&self.ino).expect("open inode");
        // What was written since the last sync, not the whole file (a
        // preallocated segment is mostly zeros that never change).
        for change in std::mem::take(&mut inode.pending) {
            apply(&mut inode.durable, &change);
        }
        debug_assert_eq!(inode.durable, inode.data);
        Ok(())
    }
}
