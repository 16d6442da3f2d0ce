//! `nydus-image check`: validate a bootstrap and, given its blobs, every chunk's digest.

use crate::blobs::BlobLocator;
use crate::error::Result;
use rafs::read::{self, Bootstrap};
use serde::Serialize;
use std::path::Path;

/// What a check found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Inodes reachable from the root (hard links counted once).
    pub inodes: u64,
    /// Directory entries below the root.
    pub entries: u64,
    /// Regular files (hard links counted once).
    pub files: u64,
    /// Sum of regular file sizes (hard links counted once).
    pub file_bytes: u64,
    /// Per blob results.
    pub blobs: Vec<BlobCheck>,
    /// Every path (only with `verbose`).
    pub paths: Vec<String>,
}

/// Result for one blob.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BlobCheck {
    /// Blob id.
    pub id: String,
    /// Chunks in the blob.
    pub chunks: u32,
    /// Chunks whose data was read and verified (0 without blobs).
    pub verified_chunks: u32,
    /// Uncompressed bytes verified.
    pub verified_bytes: u64,
}

/// Checks `bootstrap`: every inode, directory, symlink, xattr area and chunk index must
/// decode, and every chunk a file uses must be in the chunk table. With `blobs`, every
/// chunk of every blob is read, decompressed and checked against its digest.
pub fn check(bootstrap: &Path, blobs: &BlobLocator, verbose: bool) -> Result<CheckReport> {
    let bs = Bootstrap::open(bootstrap)?;
    let mut report = CheckReport::default();
    let mut seen = std::collections::HashSet::new();
    seen.insert(bs.root()?.nid);
    bs.walk(|path, _entry, inode| {
        report.entries += 1;
        if verbose {
            report
                .paths
                .push(String::from_utf8_lossy(path).into_owned());
        }
        if !seen.insert(inode.nid) {
            return Ok(());
        }
        bs.xattrs(inode)?;
        if inode.is_symlink() {
            bs.readlink(inode)?;
        } else if inode.is_reg() {
            report.files += 1;
            report.file_bytes += inode.size;
            for i in 0..bs.chunk_count(inode) {
                bs.file_chunk(inode, i)?;
            }
        }
        Ok(())
    })?;
    report.inodes = seen.len() as u64;
    for (index, info) in bs.blobs().iter().enumerate() {
        let mut b = BlobCheck {
            id: info.id.clone(),
            chunks: info.chunk_count,
            ..Default::default()
        };
        if blobs.is_set() {
            let file = blobs.open(info)?;
            for (chunk, known) in read::blob_chunks(&bs, index as u32, &file)? {
                if known {
                    read::read_chunk(&file, info, &chunk)?;
                    b.verified_chunks += 1;
                    b.verified_bytes += chunk.uncompressed_size as u64;
                }
            }
        }
        report.blobs.push(b);
    }
    Ok(report)
}
