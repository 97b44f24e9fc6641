//! Snapshot files: the whole engine state at one LSN.
//!
//! # Format
//!
//! `snap-<lsn, 20 digits>.snap` in the data dir:
//! ```text
//!  0  8 magic       b"STMPSNAP"
//!  8  4 version     u32 = 1
//! 12  4 reserved    0
//! 16  8 lsn         u64: the state after applying every record <= lsn
//! 24  8 sale_count  u64
//! 32  ... sale_count sale images (engine/image.rs), sorted by sku
//! end-4 4 crc32c    CRC-32C of every byte before it
//! ```
//! Written atomically: to `*.tmp`, fsync, rename, fsync the directory. A
//! snapshot that fails its checksum is skipped (the previous one and a
//! longer replay are used instead).

use std::path::{Path, PathBuf};

use bytes::{BufMut, BytesMut};
use stampede_protocol::wire::Reader;

use crate::engine::SaleImage;
use crate::limits::SNAPSHOTS_KEPT;
use crate::wal::segment::sync_dir;

pub const SNAPSHOT_MAGIC: [u8; 8] = *b"STMPSNAP";
pub const SNAPSHOT_VERSION: u32 = 1;

pub fn snapshot_name(lsn: u64) -> String {
    format!("snap-{lsn:020}.snap")
}

/// Snapshots in `dir`, newest (highest LSN) first.
pub fn list_snapshots(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = crate::wal::list_by_lsn(dir, "snap-", ".snap")?;
    found.reverse();
    Ok(found)
}

/// Write a snapshot atomically and delete all but the newest `SNAPSHOTS_KEPT`.
pub fn write_snapshot(dir: &Path, lsn: u64, sales: &[SaleImage]) -> std::io::Result<PathBuf> {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&SNAPSHOT_MAGIC);
    buf.put_u32_le(SNAPSHOT_VERSION);
    buf.put_u32_le(0);
    buf.put_u64_le(lsn);
    buf.put_u64_le(sales.len() as u64);
    for sale in sales {
        sale.encode(&mut buf);
    }
    let crc = crc32c::crc32c(&buf);
    buf.put_u32_le(crc);

    let path = dir.join(snapshot_name(lsn));
    crate::storage::write_atomically(&path, &buf)?;
    for (_, old) in list_snapshots(dir)?.into_iter().skip(SNAPSHOTS_KEPT) {
        crate::storage::remove(&old)?;
    }
    sync_dir(dir)?;
    Ok(path)
}

/// Read and verify a snapshot: `(lsn, sales)`.
pub fn read_snapshot(path: &Path) -> Result<(u64, Vec<SaleImage>), String> {
    let mut sales = Vec::new();
    let lsn = read_snapshot_each(path, |image| {
        sales.push(image);
        Ok(())
    })?;
    Ok((lsn, sales))
}

/// Read a snapshot, verify its checksum, then hand its sale images to
/// `visit` one at a time as they are decoded (so a caller can load one
/// while the next is decoded, and never holds them all); the snapshot's
/// LSN. The checksum covers the whole file and is checked before any
/// image is decoded; an error from `visit` stops the read.
pub fn read_snapshot_each(path: &Path, mut visit: impl FnMut(SaleImage) -> Result<(), String>) -> Result<u64, String> {
    let bytes = crate::storage::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 36 {
        return Err(format!("{}: truncated ({} bytes)", path.display(), bytes.len()));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != stored {
        return Err(format!("{}: checksum mismatch", path.display()));
    }
    if body[0..8] != SNAPSHOT_MAGIC {
        return Err(format!("{}: bad magic", path.display()));
    }
    let named = |e: stampede_protocol::wire::Malformed| format!("{}: {e}", path.display());
    let mut r = Reader::new(&body[8..], "snapshot");
    let version = r.u32().map_err(named)?;
    if version != SNAPSHOT_VERSION {
        return Err(format!(
            "{}: snapshot format version {version} (this binary reads {SNAPSHOT_VERSION})",
            path.display()
        ));
    }
    let _reserved = r.u32().map_err(named)?;
    let lsn = r.u64().map_err(named)?;
    let count = r.u64().map_err(named)?;
    for _ in 0..count {
        visit(SaleImage::read(&mut r).map_err(named)?)?;
    }
    r.finish().map_err(named)?;
    Ok(lsn)
}
