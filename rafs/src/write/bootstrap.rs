//! Writing a bootstrap: node order, metadata layout and serialization (spec §2–§12).
//!
//! Layout rules: the root inode sits at `meta_addr + 4096` (nid 128); nodes are placed in
//! upstream's pre-order (a directory, its non-directory children by name, then its
//! subdirectories recursively); every inode record is 32-byte aligned and never straddles
//! a 4 KiB block (records larger than a block start where at least the inode and its xattrs
//! fit); directory and symlink data is inlined after the inode when the tail fits, full
//! blocks are block aligned. Xattrs are written sorted by name, so the output only depends
//! on the tree.

use super::blob::ChunkArena;
use super::tree::{NodeId, NodeKind, Tree};
use crate::error::{Error, Result};
use crate::format::*;
use crate::types::{BlobInfo, ChunkInfo, Compressor, Digester};
use std::collections::{BTreeMap, HashMap};
use zerocopy::IntoBytes;

/// How a bootstrap is written.
#[derive(Clone, Debug)]
pub struct BootstrapOptions {
    /// Filesystem chunk size.
    pub chunk_size: u32,
    /// Compressor recorded in the superblock flags.
    pub compressor: Compressor,
    /// Digester recorded in the superblock flags.
    pub digester: Digester,
    /// Record uid/gid (upstream default); otherwise all owners are 0.
    pub explicit_uidgid: bool,
    /// Nodes whose nids go into the prefetch table, in order.
    pub prefetch: Vec<NodeId>,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compressor: Compressor::Zstd,
            digester: Digester::Blake3,
            explicit_uidgid: true,
            prefetch: Vec::new(),
        }
    }
}

/// Bytes of the inline xattr area for `xattrs` (0 if none).
fn xattr_area(xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<Vec<u8>> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = XattrIbodyHeader::default().as_bytes().to_vec();
    for (name, value) in xattrs {
        let shown = String::from_utf8_lossy(name);
        let (index, prefix) = xattr_index::PREFIXES
            .iter()
            .find(|(_, p)| name.starts_with(p))
            .ok_or_else(|| Error::Tree(format!("xattr '{shown}' has an unsupported namespace")))?;
        let suffix = &name[prefix.len()..];
        if (*index == xattr_index::POSIX_ACL_ACCESS || *index == xattr_index::POSIX_ACL_DEFAULT)
            && !suffix.is_empty()
        {
            return Err(Error::Tree(format!(
                "xattr '{shown}' has an unsupported namespace"
            )));
        }
        if suffix.len() > 255 || value.len() > 65535 {
            return Err(Error::Tree(format!(
                "xattr '{shown}' name or value too long"
            )));
        }
        let e = XattrEntry {
            name_len: suffix.len() as u8,
            name_index: *index,
            value_size: (value.len() as u16).into(),
        };
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    if out.len() > 12 + 4 * (u16::MAX as usize - 1) {
        return Err(Error::Tree("xattrs of one inode too large".into()));
    }
    Ok(out)
}

fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::Directory(_) => file_type::DIR,
        NodeKind::Regular(_) => file_type::REG,
        NodeKind::Symlink(_) => file_type::SYMLINK,
        NodeKind::CharDevice => file_type::CHRDEV,
        NodeKind::BlockDevice => file_type::BLKDEV,
        NodeKind::Fifo => file_type::FIFO,
        NodeKind::Socket => file_type::SOCK,
    }
}

/// Packs sorted `(name, nid, type)` entries into EROFS directory blocks; returns the
/// blocks' bytes, with the last block truncated to its used length (so `len()` = `i_size`).
fn pack_dirents(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let b = BLOCK_SIZE as usize;
    let mut out = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut used = 0;
        let mut end = start;
        while end < entries.len() && used + 12 + entries[end].0.len() <= b {
            used += 12 + entries[end].0.len();
            end += 1;
        }
        let block_start = out.len();
        let mut nameoff = 12 * (end - start);
        for (name, nid, ft) in &entries[start..end] {
            let d = Dirent {
                nid: (*nid).into(),
                nameoff: (nameoff as u16).into(),
                file_type: *ft,
                reserved: 0,
            };
            out.extend_from_slice(d.as_bytes());
            nameoff += name.len();
        }
        for (name, _, _) in &entries[start..end] {
            out.extend_from_slice(name);
        }
        if end < entries.len() {
            out.resize(block_start + b, 0);
        }
        start = end;
    }
    out
}

struct Placed {
    node: NodeId,
    parent: NodeId,
    /// Offset relative to `meta_addr`.
    off: u64,
    xattrs: Vec<u8>,
    layout: u16,
    /// First data block relative to `meta_addr`, for directories and symlinks.
    blk: u64,
    data_size: u64,
    ino: u32,
}

/// Visits unique nodes in upstream's pre-order; returns (node, parent) pairs and, per
/// arena slot, how many directory entries name the node.
fn order(tree: &Tree) -> (Vec<(NodeId, NodeId)>, Vec<u32>) {
    let mut out = Vec::new();
    let mut seen = vec![false; tree.arena_len()];
    let mut names = vec![0u32; tree.arena_len()];
    let mut stack = vec![(tree.root(), tree.root())];
    while let Some((dir, parent)) = stack.pop() {
        out.push((dir, parent));
        seen[dir] = true;
        let mut subdirs = Vec::new();
        for (_, child) in tree.children(dir) {
            names[child] += 1;
            if tree.node(child).is_dir() {
                subdirs.push(child);
            } else if !seen[child] {
                seen[child] = true;
                out.push((child, dir));
            }
        }
        stack.extend(subdirs.into_iter().rev().map(|c| (c, dir)));
    }
    (out, names)
}

fn dir_entries<'t>(
    tree: &'t Tree,
    dir: NodeId,
    parent: NodeId,
    nids: &HashMap<NodeId, u64>,
) -> Vec<(&'t [u8], u64, u8)> {
    let mut entries: Vec<(&[u8], u64, u8)> = vec![
        (b".", nids[&dir], file_type::DIR),
        (b"..", nids[&parent], file_type::DIR),
    ];
    for (name, child) in tree.children(dir) {
        entries.push((name, nids[&child], file_type(&tree.node(child).kind)));
    }
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

/// Size in bytes of the directory data of `dir` (names only matter, so nids are dummies).
fn dir_size(tree: &Tree, dir: NodeId) -> u64 {
    let mut names: Vec<&[u8]> = vec![b".", b".."];
    names.extend(tree.children(dir).map(|(n, _)| n));
    names.sort();
    let b = BLOCK_SIZE;
    let mut size = 0u64;
    for n in names {
        let cost = 12 + n.len() as u64;
        if size % b + cost > b {
            size = size.next_multiple_of(b);
        }
        size += cost;
    }
    size
}

/// Writes the bootstrap of `tree`. `arena` resolves the chunk handles of regular files,
/// `blobs` is the blob table (chunk `blob_index` values index it).
pub fn write_bootstrap(
    tree: &Tree,
    arena: &ChunkArena,
    blobs: &[BlobInfo],
    opts: &BootstrapOptions,
) -> Result<Vec<u8>> {
    let b = BLOCK_SIZE;
    if blobs.len() >= 255 {
        return Err(Error::Tree(format!(
            "{} blobs; at most 254 fit in a bootstrap",
            blobs.len()
        )));
    }
    let chunk_bits = opts.chunk_size.trailing_zeros();
    let (nodes, names) = order(tree);

    // Pass 1: layout.
    let mut placed: Vec<Placed> = Vec::with_capacity(nodes.len());
    let mut nids: HashMap<NodeId, u64> = HashMap::with_capacity(nodes.len());
    let mut off = b;
    let fits = |off: u64, len: u64| off % b + len <= b;
    for (i, (id, parent)) in nodes.iter().enumerate() {
        let node = tree.node(*id);
        let xattrs = xattr_area(&node.xattrs)?;
        let isz = 64 + xattrs.len() as u64;
        let (mut layout, mut blk, mut data_size) = (INODE_FLAT_PLAIN, 0, 0);
        let inode_off;
        match &node.kind {
            NodeKind::Directory(_) | NodeKind::Symlink(_) => {
                data_size = match &node.kind {
                    NodeKind::Symlink(t) => t.len() as u64,
                    _ => dir_size(tree, *id),
                };
                let tail = data_size % b;
                if tail != 0 && isz + tail <= b {
                    layout = INODE_FLAT_INLINE;
                    if !fits(off, isz + tail) {
                        off = off.next_multiple_of(b);
                    }
                    inode_off = off;
                    off += isz + tail;
                    if data_size > tail {
                        off = off.next_multiple_of(b);
                        blk = off / b;
                        off += data_size - tail;
                    } else {
                        blk = off / b;
                    }
                } else {
                    if !fits(off, isz) {
                        off = off.next_multiple_of(b);
                    }
                    inode_off = off;
                    off = (off + isz).next_multiple_of(b);
                    blk = off / b;
                    off += data_size.next_multiple_of(b);
                }
            }
            NodeKind::Regular(f) => {
                layout = INODE_CHUNK_BASED;
                let n = f.size.div_ceil(opts.chunk_size as u64);
                if n != f.chunks.len() as u64 {
                    return Err(Error::Tree(format!(
                        "file of {} bytes has {} chunks, expected {n}",
                        f.size,
                        f.chunks.len()
                    )));
                }
                let rec = isz.next_multiple_of(8) + 8 * n;
                if !fits(off, rec.min(isz)) || (rec <= b && !fits(off, rec)) {
                    off = off.next_multiple_of(b);
                }
                inode_off = off;
                off += rec;
            }
            _ => {
                if !fits(off, isz) {
                    off = off.next_multiple_of(b);
                }
                inode_off = off;
                off += isz;
            }
        }
        off = off.next_multiple_of(32);
        nids.insert(*id, inode_off / INODE_SLOT_SIZE);
        placed.push(Placed {
            node: *id,
            parent: *parent,
            off: inode_off,
            xattrs,
            layout,
            blk,
            data_size,
            ino: (i + 1) as u32,
        });
    }
    let meta_size = off.next_multiple_of(b);

    // Chunk table: every referenced chunk once, sorted by (digest, blob index).
    let mut table: BTreeMap<([u8; 32], u32), ChunkInfo> = BTreeMap::new();
    for p in &placed {
        if let NodeKind::Regular(f) = &tree.node(p.node).kind {
            for h in &f.chunks {
                let c = arena.get(*h);
                if c.blob_index as usize >= blobs.len() {
                    return Err(Error::Tree(format!(
                        "chunk refers to blob {} of {}",
                        c.blob_index,
                        blobs.len()
                    )));
                }
                table.entry((c.digest, c.blob_index)).or_insert(*c);
            }
        }
    }

    // Global layout.
    let n = blobs.len() as u64;
    let prefetch: Vec<u32> = if n > 0 {
        opts.prefetch
            .iter()
            .filter_map(|id| nids.get(id))
            .map(|nid| *nid as u32)
            .collect()
    } else {
        Vec::new()
    };
    let blob_table_offset = (DEVTABLE_OFFSET + n * 128).next_multiple_of(b);
    let prefetch_offset = blob_table_offset + n * 256;
    let meta_addr = if n > 0 {
        (prefetch_offset + prefetch.len() as u64 * 4).next_multiple_of(b)
    } else {
        0
    };
    let chunk_table_offset = meta_addr + meta_size;
    let chunk_table_size = table.len() as u64 * 80;
    let total = (chunk_table_offset + chunk_table_size).next_multiple_of(b);
    if total > MAX_METADATA_SIZE {
        return Err(Error::Tree(format!(
            "bootstrap of {total} bytes exceeds 2 GiB"
        )));
    }
    let mut img = vec![0u8; total as usize];
    let put = |img: &mut Vec<u8>, at: u64, bytes: &[u8]| {
        img[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    };

    // Pass 2: inodes and their data.
    let mut has_xattr = false;
    for p in &placed {
        let node = tree.node(p.node);
        let at = meta_addr + p.off;
        has_xattr |= !p.xattrs.is_empty();
        let (size, u, nlink) = match &node.kind {
            NodeKind::Directory(_) => {
                let entries = dir_entries(tree, p.node, p.parent, &nids);
                let data = pack_dirents(&entries);
                debug_assert_eq!(data.len() as u64, p.data_size);
                let subdirs = tree
                    .children(p.node)
                    .filter(|(_, c)| tree.node(*c).is_dir())
                    .count();
                write_data(&mut img, meta_addr, p, &data);
                (
                    p.data_size,
                    (meta_addr / b + p.blk) as u32,
                    2 + subdirs as u32,
                )
            }
            NodeKind::Symlink(target) => {
                write_data(&mut img, meta_addr, p, target);
                (p.data_size, (meta_addr / b + p.blk) as u32, 1)
            }
            NodeKind::Regular(f) => {
                let mut at_idx = (at + 64 + p.xattrs.len() as u64).next_multiple_of(8);
                for h in &f.chunks {
                    let c = arena.get(*h);
                    let idx = ChunkIndex {
                        ci_lo: ((c.ci_index & 0xFFFF) as u16).into(),
                        blob_ci_hi: (((c.blob_index + 1) & 0xFF) as u16
                            | (((c.ci_index >> 16) & 0xFF) as u16) << 8)
                            .into(),
                        blk_addr: u32::try_from(c.uncompressed_offset / b)
                            .map_err(|_| Error::Tree("chunk offset beyond 16 TiB".into()))?
                            .into(),
                    };
                    put(&mut img, at_idx, idx.as_bytes());
                    at_idx += 8;
                }
                let format = CHUNK_FORMAT_INDEXES | (chunk_bits - BLOCK_BITS as u32) as u16;
                (f.size, format as u32, names[p.node].max(1))
            }
            NodeKind::CharDevice | NodeKind::BlockDevice | NodeKind::Fifo | NodeKind::Socket => {
                (0, encode_rdev(node.meta.rdev), 1)
            }
        };
        let (uid, gid) = if opts.explicit_uidgid {
            (node.meta.uid, node.meta.gid)
        } else {
            (0, 0)
        };
        let inode = InodeExtended {
            format: (INODE_LAYOUT_EXTENDED | (p.layout << 1)).into(),
            xattr_icount: (if p.xattrs.is_empty() {
                0
            } else {
                ((p.xattrs.len() - 12) / 4 + 1) as u16
            })
            .into(),
            mode: (node.mode() as u16).into(),
            size: size.into(),
            u: u.into(),
            ino: p.ino.into(),
            uid: uid.into(),
            gid: gid.into(),
            mtime: node.meta.mtime.into(),
            mtime_nsec: node.meta.mtime_nsec.into(),
            nlink: nlink.into(),
            ..Default::default()
        };
        put(&mut img, at, inode.as_bytes());
        put(&mut img, at + 64, &p.xattrs);
    }

    // Chunk table.
    for (i, c) in table.values().enumerate() {
        let rec = ChunkInfoRecord {
            digest: c.digest,
            blob_index: c.blob_index.into(),
            flags: (if c.compressed {
                chunk_flags::COMPRESSED
            } else {
                0
            })
            .into(),
            compressed_size: c.compressed_size.into(),
            uncompressed_size: c.uncompressed_size.into(),
            compressed_offset: c.compressed_offset.into(),
            uncompressed_offset: c.uncompressed_offset.into(),
            file_offset: c.file_offset.into(),
            index: c.ci_index.into(),
            crc32: 0.into(),
        };
        put(&mut img, chunk_table_offset + i as u64 * 80, rec.as_bytes());
    }

    // Device slots, blob table, prefetch table.
    let mut pos = total;
    let mut sum_blocks = 0u64;
    for (i, blob) in blobs.iter().enumerate() {
        let id = blob.id.as_bytes();
        if id.len() > BLOB_ID_LEN {
            return Err(Error::Tree(format!(
                "blob id '{}' longer than 64 bytes",
                blob.id
            )));
        }
        let blocks = blob.uncompressed_size / b;
        if blocks == 0 || blob.chunk_count == 0 {
            return Err(Error::Tree(format!(
                "blob {} has no chunks; leave it out of the blob table",
                blob.id
            )));
        }
        let mapped = pos.next_multiple_of(BLOCK_SEG_ALIGNMENT) / b;
        pos = (mapped + blocks) * b;
        sum_blocks += blocks;
        let mut slot = DeviceSlot {
            blocks: u32::try_from(blocks)
                .map_err(|_| Error::Tree("blob too large".into()))?
                .into(),
            mapped_blkaddr: u32::try_from(mapped)
                .map_err(|_| Error::Tree("image too large".into()))?
                .into(),
            ..Default::default()
        };
        slot.blob_id[..id.len()].copy_from_slice(id);
        put(&mut img, DEVTABLE_OFFSET + i as u64 * 128, slot.as_bytes());
        let mut e = BlobTableEntry {
            blob_index: (i as u32).into(),
            chunk_size: opts.chunk_size.into(),
            chunk_count: blob.chunk_count.into(),
            compression_algo: blob.compressor.to_disk().into(),
            digest_algo: blob.digester.to_disk().into(),
            features: blob.features.into(),
            compressed_size: blob.compressed_size.into(),
            uncompressed_size: blob.uncompressed_size.into(),
            blob_toc_size: blob.toc_size.into(),
            ci_compressor: blob.ci_compressor.to_disk().into(),
            ci_offset: blob.ci_offset.into(),
            ci_compressed_size: blob.ci_compressed_size.into(),
            ci_uncompressed_size: blob.ci_uncompressed_size.into(),
            blob_toc_digest: blob.toc_digest,
            blob_meta_digest: blob.meta_digest,
            blob_meta_size: blob.meta_size.into(),
            ..Default::default()
        };
        e.blob_id[..id.len()].copy_from_slice(id);
        put(&mut img, blob_table_offset + i as u64 * 256, e.as_bytes());
    }
    for (i, nid) in prefetch.iter().enumerate() {
        put(&mut img, prefetch_offset + i as u64 * 4, &nid.to_le_bytes());
    }

    let mut flags = opts.compressor.sb_flag() | opts.digester.sb_flag();
    if opts.explicit_uidgid {
        flags |= flags::EXPLICIT_UID_GID;
    }
    if has_xattr {
        flags |= flags::HAS_XATTR;
    }
    if n > 0
        && blobs
            .iter()
            .all(|b| b.has(blob_features::INLINED_CHUNK_DIGEST))
    {
        flags |= flags::INLINED_CHUNK_DIGEST;
    }
    let ext = SuperBlockExt {
        flags: flags.into(),
        blob_table_offset: blob_table_offset.into(),
        blob_table_size: ((n * 256) as u32).into(),
        chunk_size: opts.chunk_size.into(),
        chunk_table_offset: chunk_table_offset.into(),
        chunk_table_size: chunk_table_size.into(),
        prefetch_table_offset: (if prefetch.is_empty() {
            0
        } else {
            prefetch_offset
        })
        .into(),
        prefetch_table_size: ((prefetch.len() * 4) as u32).into(),
        ..Default::default()
    };
    let sb = SuperBlock {
        magic: EROFS_SUPER_MAGIC.into(),
        feature_compat: FEATURE_COMPAT_RAFS_V6.into(),
        blkszbits: BLOCK_BITS,
        root_nid: (ROOT_NID as u16).into(),
        inos: (placed.len() as u64).into(),
        blocks: u32::try_from(sum_blocks)
            .map_err(|_| Error::Tree("image too large".into()))?
            .into(),
        meta_blkaddr: ((meta_addr / b) as u32).into(),
        feature_incompat: FEATURE_INCOMPAT_RAFS_V6.into(),
        extra_devices: (n as u16).into(),
        devt_slotoff: DEVT_SLOTOFF.into(),
        ..Default::default()
    };
    put(&mut img, SUPER_OFFSET, sb.as_bytes());
    put(&mut img, EXT_SUPER_OFFSET, ext.as_bytes());
    Ok(img)
}

/// Writes directory or symlink data: inline tail after the inode, full blocks at `blk`.
fn write_data(img: &mut [u8], meta_addr: u64, p: &Placed, data: &[u8]) {
    let b = BLOCK_SIZE as usize;
    let base = (meta_addr + p.blk * BLOCK_SIZE) as usize;
    if p.layout == INODE_FLAT_INLINE {
        let full = data.len() / b * b;
        img[base..base + full].copy_from_slice(&data[..full]);
        let tail_at = (meta_addr + p.off) as usize + 64 + p.xattrs.len();
        img[tail_at..tail_at + data.len() - full].copy_from_slice(&data[full..]);
    } else {
        img[base..base + data.len()].copy_from_slice(data);
    }
}

/// Linux `new_encode_dev`, truncated to 32 bits (spec §8.3).
pub fn encode_rdev(rdev: u64) -> u32 {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)) as u32
}
