//! Parsing and validating the superblock, extended superblock, device table and blob table
//! (spec §3–§7).

use crate::error::{Error, Result};
use crate::format::*;
use crate::types::{BlobInfo, Compressor, Digester};
use std::collections::HashSet;
use zerocopy::FromBytes;

/// Validated superblock values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuperInfo {
    /// Block size (4096, or 512 in tarfs images).
    pub block_size: u64,
    /// Root nid.
    pub root_nid: u64,
    /// `s_inos`.
    pub inodes: u64,
    /// `s_blocks`.
    pub blocks: u32,
    /// `s_meta_blkaddr` in bytes.
    pub meta_addr: u64,
    /// Number of blobs (extra devices).
    pub extra_devices: u16,
    /// `s_flags`.
    pub flags: u64,
    /// Filesystem chunk size.
    pub chunk_size: u32,
    /// Chunk compressor from the flags.
    pub compressor: Compressor,
    /// Chunk digester from the flags.
    pub digester: Digester,
    /// Blob table offset.
    pub blob_table_offset: u64,
    /// Blob table size in bytes.
    pub blob_table_size: u32,
    /// Chunk-info table offset.
    pub chunk_table_offset: u64,
    /// Chunk-info table size in bytes.
    pub chunk_table_size: u64,
    /// Prefetch table offset (0 if none).
    pub prefetch_table_offset: u64,
    /// Prefetch table size in bytes.
    pub prefetch_table_size: u32,
}

impl SuperInfo {
    /// Whether a superblock flag is set.
    pub fn has_flag(&self, flag: u64) -> bool {
        self.flags & flag == flag
    }
}

fn check(cond: bool, field: &str, reason: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::invalid(field, reason()))
    }
}

pub(crate) fn read_struct<T: FromBytes>(data: &[u8], off: u64, what: &str) -> Result<T> {
    let size = core::mem::size_of::<T>() as u64;
    let end = off.saturating_add(size);
    data.get(off as usize..end.min(usize::MAX as u64) as usize)
        .and_then(|b| T::read_from_bytes(b).ok())
        .ok_or_else(|| Error::Truncated {
            what: what.to_string(),
            start: off,
            end,
            len: data.len() as u64,
        })
}

fn in_file(off: u64, size: u64, file: u64, field: &str) -> Result<()> {
    check(
        off.checked_add(size).is_some_and(|end| end <= file),
        field,
        || format!("range {off}+{size} is outside the {file}-byte bootstrap"),
    )
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn blob_id(bytes: &[u8; 64], field: &str) -> Result<String> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(64);
    let s = std::str::from_utf8(&bytes[..end])
        .map_err(|_| Error::invalid(field, "blob id is not UTF-8"))?;
    check(!s.is_empty(), field, || "blob id is empty".into())?;
    Ok(s.to_string())
}

/// Parses and validates everything up to and including the blob table.
pub fn parse(data: &[u8]) -> Result<(SuperInfo, Vec<BlobInfo>)> {
    let size = data.len() as u64;
    check(size >= BLOCK_SIZE, "bootstrap size", || {
        format!("{size} bytes is smaller than one 4096-byte block")
    })?;
    let sb: SuperBlock = read_struct(data, SUPER_OFFSET, "superblock")?;
    check(
        sb.magic.get() == EROFS_SUPER_MAGIC,
        "superblock.s_magic",
        || {
            format!(
                "{:#x} is not the EROFS magic {EROFS_SUPER_MAGIC:#x}",
                sb.magic.get()
            )
        },
    )?;
    check(sb.checksum.get() == 0, "superblock.s_checksum", || {
        format!("{:#x} must be 0", sb.checksum.get())
    })?;
    check(
        sb.feature_compat.get() & FEATURE_COMPAT_RAFS_V6 != 0,
        "superblock.s_feature_compat",
        || {
            format!(
                "{:#x} lacks the RAFS v6 bit {FEATURE_COMPAT_RAFS_V6:#x}",
                sb.feature_compat.get()
            )
        },
    )?;
    let bits = sb.blkszbits;
    check(bits == BLOCK_BITS, "superblock.s_blkszbits", || {
        if bits == BLOCK_BITS_TARFS {
            "512-byte blocks (tarfs images) are not supported".into()
        } else {
            format!("{bits} is not 12")
        }
    })?;
    let block_size = 1u64 << bits;
    check(size % block_size == 0, "bootstrap size", || {
        format!("{size} bytes is not a multiple of the block size {block_size}")
    })?;
    check(sb.extslots == 0, "superblock.s_extslots", || {
        format!("{} must be 0", sb.extslots)
    })?;
    check(sb.inos.get() != 0, "superblock.s_inos", || {
        "0 inodes".into()
    })?;
    let meta_addr = sb.meta_blkaddr.get() as u64 * block_size;
    check(meta_addr <= size, "superblock.s_meta_blkaddr", || {
        format!(
            "block {} is beyond the end of the bootstrap",
            sb.meta_blkaddr.get()
        )
    })?;
    check(
        sb.xattr_blkaddr.get() == 0,
        "superblock.s_xattr_blkaddr",
        || "shared xattrs are not supported".into(),
    )?;
    check(
        sb.feature_incompat.get() == FEATURE_INCOMPAT_RAFS_V6,
        "superblock.s_feature_incompat",
        || {
            format!(
                "{:#x} must be {FEATURE_INCOMPAT_RAFS_V6:#x}",
                sb.feature_incompat.get()
            )
        },
    )?;
    check(sb.u.get() == 0, "superblock.s_u", || {
        format!("{} must be 0", sb.u.get())
    })?;
    check(
        sb.devt_slotoff.get() as u64 * 128 == DEVTABLE_OFFSET,
        "superblock.s_devt_slotoff",
        || format!("{} must be {DEVT_SLOTOFF}", sb.devt_slotoff.get()),
    )?;
    let ndev = sb.extra_devices.get() as u64;
    in_file(
        DEVTABLE_OFFSET,
        ndev * 128,
        size,
        "superblock.s_extra_devices",
    )?;
    if ndev == 0 {
        check(
            sb.blocks.get() == 0 || sb.blocks.get() == 4096,
            "superblock.s_blocks",
            || format!("{} with no devices", sb.blocks.get()),
        )?;
    }

    let ext: SuperBlockExt = read_struct(data, EXT_SUPER_OFFSET, "extended superblock")?;
    let flags = ext.flags.get();
    check(
        flags & !flags::KNOWN == 0,
        "extended superblock.s_flags",
        || format!("unknown bits {:#x}", flags & !flags::KNOWN),
    )?;
    let compressors = (flags & flags::COMPRESSION_MASK).count_ones();
    check(compressors == 1, "extended superblock.s_flags", || {
        format!("{compressors} compression flags set, need exactly one")
    })?;
    let digesters = (flags & flags::HASH_MASK).count_ones();
    check(digesters == 1, "extended superblock.s_flags", || {
        format!("{digesters} digest flags set, need exactly one")
    })?;
    check(
        flags & flags::TARTFS_MODE == 0,
        "extended superblock.s_flags",
        || "tarfs mode is not supported".into(),
    )?;
    let compressor = match flags & flags::COMPRESSION_MASK {
        flags::COMPRESSION_NONE => Compressor::None,
        flags::COMPRESSION_LZ4 => Compressor::Lz4Block,
        flags::COMPRESSION_GZIP => Compressor::Gzip,
        _ => Compressor::Zstd,
    };
    let digester = if flags & flags::HASH_BLAKE3 != 0 {
        Digester::Blake3
    } else {
        Digester::Sha256
    };
    let chunk_size = ext.chunk_size.get();
    check(
        chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size),
        "extended superblock.s_chunk_size",
        || format!("{chunk_size:#x} is not a power of two in [0x1000, 0x1000000]"),
    )?;
    let bt = (
        ext.blob_table_offset.get(),
        ext.blob_table_size.get() as u64,
    );
    let ct = (ext.chunk_table_offset.get(), ext.chunk_table_size.get());
    let pt = (
        ext.prefetch_table_offset.get(),
        ext.prefetch_table_size.get() as u64,
    );
    check(
        bt.1 == ndev * 256,
        "extended superblock.s_blob_table_size",
        || format!("{} bytes for {ndev} devices (need 256 each)", bt.1),
    )?;
    if bt.1 > 0 {
        check(
            bt.0 % block_size == 0 && bt.0 >= DEVTABLE_OFFSET + ndev * 128,
            "extended superblock.s_blob_table_offset",
            || format!("{} is not block aligned after the device table", bt.0),
        )?;
    }
    in_file(bt.0, bt.1, size, "extended superblock.s_blob_table_offset")?;
    check(
        ct.1 % 80 == 0,
        "extended superblock.s_chunk_table_size",
        || format!("{} is not a multiple of 80", ct.1),
    )?;
    in_file(ct.0, ct.1, size, "extended superblock.s_chunk_table_offset")?;
    check(
        pt.1 % 4 == 0,
        "extended superblock.s_prefetch_table_size",
        || format!("{} is not a multiple of 4", pt.1),
    )?;
    in_file(
        pt.0,
        pt.1,
        size,
        "extended superblock.s_prefetch_table_offset",
    )?;
    check(
        !overlap(bt, ct) && !overlap(bt, pt) && !overlap(ct, pt),
        "extended superblock",
        || "blob, chunk and prefetch tables overlap".into(),
    )?;

    let info = SuperInfo {
        block_size,
        root_nid: sb.root_nid.get() as u64,
        inodes: sb.inos.get(),
        blocks: sb.blocks.get(),
        meta_addr,
        extra_devices: ndev as u16,
        flags,
        chunk_size,
        compressor,
        digester,
        blob_table_offset: bt.0,
        blob_table_size: bt.1 as u32,
        chunk_table_offset: ct.0,
        chunk_table_size: ct.1,
        prefetch_table_offset: pt.0,
        prefetch_table_size: pt.1 as u32,
    };

    let mut blobs = Vec::with_capacity(ndev as usize);
    let mut ids = HashSet::new();
    for i in 0..ndev {
        let field = format!("device slot {i}");
        let dev: DeviceSlot = read_struct(data, DEVTABLE_OFFSET + i * 128, &field)?;
        let dev_id = blob_id(&dev.blob_id, &format!("{field}.blob_id"))?;
        check(dev.blocks.get() != 0, &format!("{field}.blocks"), || {
            "0 blocks".into()
        })?;
        check(
            ids.insert(dev_id.clone()),
            &format!("{field}.blob_id"),
            || format!("duplicated blob id {dev_id}"),
        )?;
        let field = format!("blob table entry {i}");
        let e: BlobTableEntry = read_struct(data, bt.0 + i * 256, &field)?;
        blobs.push(parse_blob_entry(
            &e,
            i as u32,
            &info,
            &field,
            dev.mapped_blkaddr.get(),
        )?);
    }
    Ok((info, blobs))
}

fn parse_blob_entry(
    e: &BlobTableEntry,
    index: u32,
    sb: &SuperInfo,
    field: &str,
    mapped: u32,
) -> Result<BlobInfo> {
    let f = |name: &str| format!("{field}.{name}");
    let id = blob_id(&e.blob_id, &f("blob_id"))?;
    check(e.blob_index.get() == index, &f("blob_index"), || {
        format!("{} is not its position {index}", e.blob_index.get())
    })?;
    check(
        e.chunk_size.get() == sb.chunk_size,
        &f("chunk_size"),
        || {
            format!(
                "{:#x} differs from the superblock's {:#x}",
                e.chunk_size.get(),
                sb.chunk_size
            )
        },
    )?;
    let chunk_count = e.chunk_count.get();
    check(
        chunk_count <= MAX_CHUNKS_PER_BLOB,
        &f("chunk_count"),
        || format!("{chunk_count} exceeds 2^24"),
    )?;
    let features = e.features.get();
    check(
        features & blob_features::UNKNOWN_INCOMPAT == 0,
        &f("features"),
        || {
            format!(
                "unknown bits {:#x}",
                features & blob_features::UNKNOWN_INCOMPAT
            )
        },
    )?;
    check(
        features & blob_features::V5_NO_EXT_BLOB_TABLE == 0,
        &f("features"),
        || "internal bit 0x80000000 set".into(),
    )?;
    for (bit, name) in [
        (blob_features::ZRAN, "zran"),
        (blob_features::BATCH, "batch"),
        (blob_features::ENCRYPTED, "encrypted"),
        (blob_features::TARFS, "tarfs"),
        (blob_features::SEPARATE, "separate"),
        (blob_features::EXTERNAL, "external"),
    ] {
        check(features & bit == 0, &f("features"), || {
            format!("{name} blobs are not supported")
        })?;
    }
    check(
        features & blob_features::ALIGNED != 0,
        &f("features"),
        || "chunks are not 4 KiB aligned (ALIGNED missing)".into(),
    )?;
    let compressed_size = e.compressed_size.get();
    let uncompressed_size = e.uncompressed_size.get();
    check(
        compressed_size <= BLOB_MAX_SIZE_COMPRESSED,
        &f("compressed_size"),
        || format!("{compressed_size} exceeds 2^40"),
    )?;
    check(
        uncompressed_size <= BLOB_MAX_SIZE_UNCOMPRESSED,
        &f("uncompressed_size"),
        || format!("{uncompressed_size} exceeds 2^44"),
    )?;
    check(
        uncompressed_size % BLOCK_SIZE == 0,
        &f("uncompressed_size"),
        || format!("{uncompressed_size} is not 4 KiB aligned"),
    )?;
    let ci_c = e.ci_compressed_size.get();
    let ci_u = e.ci_uncompressed_size.get();
    let entry_size = if features & blob_features::CHUNK_INFO_V2 != 0 {
        24
    } else {
        16
    };
    check(
        ci_u == chunk_count as u64 * entry_size,
        &f("ci_uncompressed_size"),
        || format!("{ci_u} does not match {chunk_count} chunks of {entry_size} bytes"),
    )?;
    check(ci_c <= ci_u, &f("ci_compressed_size"), || {
        format!("{ci_c} exceeds ci_uncompressed_size {ci_u}")
    })?;
    let compressor = Compressor::from_disk(e.compression_algo.get(), &f("compression_algo"))?;
    let digester = Digester::from_disk(e.digest_algo.get(), &f("digest_algo"))?;
    check(digester == sb.digester, &f("digest_algo"), || {
        format!("{digester} differs from the superblock's {}", sb.digester)
    })?;
    check(e.cipher_algo.get() == 0, &f("cipher_algo"), || {
        "encrypted blobs are not supported".into()
    })?;
    Ok(BlobInfo {
        id,
        chunk_count,
        chunk_size: e.chunk_size.get(),
        compressor,
        digester,
        features,
        compressed_size,
        uncompressed_size,
        toc_size: e.blob_toc_size.get(),
        toc_digest: e.blob_toc_digest,
        ci_compressor: Compressor::from_disk(e.ci_compressor.get(), &f("ci_compressor"))?,
        ci_offset: e.ci_offset.get(),
        ci_compressed_size: ci_c,
        ci_uncompressed_size: ci_u,
        meta_digest: e.blob_meta_digest,
        meta_size: e.blob_meta_size.get(),
        mapped_blkaddr: mapped,
    })
}
