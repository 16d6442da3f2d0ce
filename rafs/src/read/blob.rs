//! Reading data blobs: the ci array and header, the chunk digest array, the TOC, and single
//! chunks (decompressed and verified). Also expanding a blob into its uncompressed layout,
//! the shape of nydusd's cache file and of an EROFS extra device.

use super::bootstrap::Bootstrap;
use super::source::{read_vec, ReadAt};
use super::superblock::read_struct;
use crate::error::{Error, Result};
use crate::format::*;
use crate::types::{sha256, BlobInfo, ChunkInfo, Compressor};
use std::io::{Seek, SeekFrom, Write};
use zerocopy::FromBytes;

/// Decodes a v1 ci entry into a chunk descriptor (digest left zero).
pub fn decode_ci_v1(e: &CiEntryV1, blob_index: u32, ci_index: u32) -> ChunkInfo {
    let u = e.uncomp_info.get();
    let c = e.comp_info.get();
    let usize_ = (((u >> 8) & 0xF) << 20 | (u >> 44)) + 1;
    let csize = (((c >> 40) & 0xF) << 20 | (c >> 44)) + 1;
    ChunkInfo {
        digest: [0; 32],
        blob_index,
        ci_index,
        compressed_offset: c & 0xFF_FFFF_FFFF,
        compressed_size: csize as u32,
        uncompressed_offset: u & 0x0000_0FFF_FFFF_F000,
        uncompressed_size: usize_ as u32,
        compressed: csize != usize_,
        file_offset: 0,
    }
}

/// Decodes a v2 ci entry.
pub fn decode_ci_v2(e: &CiEntryV2, blob_index: u32, ci_index: u32) -> Result<ChunkInfo> {
    let u = e.uncomp_info.get();
    let c = e.comp_info.get();
    let flags = (u >> 56) as u8;
    if flags & !(0x01 | 0x10) != 0 {
        return Err(Error::invalid(
            format!("ci entry {ci_index}"),
            format!("unsupported flags {flags:#x}"),
        ));
    }
    Ok(ChunkInfo {
        digest: [0; 32],
        blob_index,
        ci_index,
        compressed_offset: c & 0xFF_FFFF_FFFF,
        compressed_size: (c >> 40) as u32,
        uncompressed_offset: (u & 0xFFFF_FFFF) << 12,
        uncompressed_size: (((u >> 32) & 0xFF_FFFF) + 1) as u32,
        compressed: flags & 0x01 != 0,
        file_offset: 0,
    })
}

/// The ci entries of a blob, read and validated.
pub fn read_ci_array(
    blob: &(impl ReadAt + ?Sized),
    info: &BlobInfo,
    blob_index: u32,
) -> Result<Vec<ChunkInfo>> {
    let what = format!("ci array of blob {}", info.id);
    let bytes = read_vec(
        blob,
        info.ci_offset,
        info.ci_compressed_size + BLOB_CCT_HEADER_SIZE,
        &what,
    )?;
    parse_ci_array(&bytes, info, blob_index)
}

/// Parses `ci array ‖ header` bytes as fetched from `[ci_offset, +ci_compressed_size+4096)`.
pub fn parse_ci_array(bytes: &[u8], info: &BlobInfo, blob_index: u32) -> Result<Vec<ChunkInfo>> {
    let stored = info.ci_compressed_size as usize;
    let field = |f: &str| format!("ci header of blob {}.{f}", info.id);
    let h: CiHeader = read_struct(bytes, stored as u64, "ci header")?;
    let check = |ok: bool, f: &str, why: String| {
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(field(f), why))
        }
    };
    check(
        h.magic.get() == BLOB_CCT_MAGIC && h.magic2.get() == BLOB_CCT_MAGIC,
        "s_magic",
        "bad magic".into(),
    )?;
    check(
        h.ci_entries.get() == info.chunk_count,
        "s_ci_entries",
        format!(
            "{} differs from the blob table's {}",
            h.ci_entries.get(),
            info.chunk_count
        ),
    )?;
    check(
        h.ci_compressor.get() == info.ci_compressor.to_disk(),
        "s_ci_compressor",
        "differs from the blob table".into(),
    )?;
    check(
        h.ci_offset.get() == info.ci_offset,
        "s_ci_offset",
        "differs from the blob table".into(),
    )?;
    check(
        h.ci_compressed_size.get() == info.ci_compressed_size,
        "s_ci_compressed_size",
        "differs from the blob table".into(),
    )?;
    check(
        h.ci_uncompressed_size.get() == info.ci_uncompressed_size,
        "s_ci_uncompressed_size",
        "differs from the blob table".into(),
    )?;
    let raw = match info.ci_compressor {
        Compressor::None => bytes[..stored].to_vec(),
        c => c.decompress(
            &bytes[..stored],
            info.ci_uncompressed_size as usize,
            &format!("ci array of blob {}", info.id),
        )?,
    };
    let v2 = info.has(blob_features::CHUNK_INFO_V2);
    let size = if v2 { 24 } else { 16 };
    let mut out = Vec::with_capacity(info.chunk_count as usize);
    for i in 0..info.chunk_count {
        let at = i as usize * size;
        let entry = &raw[at..at + size];
        let c = if v2 {
            decode_ci_v2(
                &CiEntryV2::read_from_bytes(entry).expect("24 bytes"),
                blob_index,
                i,
            )?
        } else {
            decode_ci_v1(
                &CiEntryV1::read_from_bytes(entry).expect("16 bytes"),
                blob_index,
                i,
            )
        };
        if c.uncompressed_size > info.chunk_size
            || c.uncompressed_offset % BLOCK_SIZE != 0
            || c.uncompressed_offset + c.uncompressed_size as u64 > info.uncompressed_size
            || c.compressed_offset + c.compressed_size as u64 > info.ci_offset
        {
            return Err(Error::invalid(
                format!("ci entry {i} of blob {}", info.id),
                "offsets or sizes out of range",
            ));
        }
        out.push(c);
    }
    Ok(out)
}

/// One entry of a blob's TOC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocItem {
    /// Section name.
    pub name: String,
    /// Compression flags.
    pub flags: u32,
    /// sha256 of the uncompressed section.
    pub digest: [u8; 32],
    /// Offset in the blob.
    pub offset: u64,
    /// Stored size.
    pub compressed_size: u64,
    /// Uncompressed size.
    pub uncompressed_size: u64,
}

fn parse_tar_size(h: &TarHeader) -> Option<u64> {
    let s = std::str::from_utf8(&h.size).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(s, 8).ok()
}

fn tar_name(h: &TarHeader) -> String {
    let end = h.name.iter().position(|b| *b == 0).unwrap_or(h.name.len());
    String::from_utf8_lossy(&h.name[..end]).into_owned()
}

/// Walks the "reverse tar" sections from the end of a blob: (name, data offset, size),
/// last section first.
pub fn tar_sections(blob: &(impl ReadAt + ?Sized)) -> Result<Vec<(String, u64, u64)>> {
    let mut end = blob.size().map_err(|e| Error::io("Reading blob size", e))?;
    let mut out = Vec::new();
    while end >= TAR_BLOCK_SIZE {
        let hb = read_vec(
            blob,
            end - TAR_BLOCK_SIZE,
            TAR_BLOCK_SIZE,
            "blob tar header",
        )?;
        let h = TarHeader::read_from_bytes(&hb).expect("512 bytes");
        let size = parse_tar_size(&h)
            .filter(|s| *s <= end - TAR_BLOCK_SIZE)
            .ok_or_else(|| {
                Error::invalid(
                    "blob tar header",
                    format!("bad size field before offset {end}"),
                )
            })?;
        let start = end - TAR_BLOCK_SIZE - size;
        out.push((tar_name(&h), start, size));
        end = start;
    }
    Ok(out)
}

/// Reads a blob's TOC from its tail (spec §13.4), checking `toc_digest` when known.
pub fn read_toc(blob: &(impl ReadAt + ?Sized), info: &BlobInfo) -> Result<Vec<TocItem>> {
    let size = blob.size().map_err(|e| Error::io("Reading blob size", e))?;
    let toc_len = if info.toc_size > 0 {
        info.toc_size as u64
    } else {
        size.min(4096) / 128 * 128
    };
    if toc_len < TAR_BLOCK_SIZE || toc_len > size {
        return Err(Error::invalid(
            format!("TOC of blob {}", info.id),
            "blob too small for a TOC",
        ));
    }
    let bytes = read_vec(blob, size - toc_len, toc_len, "blob TOC")?;
    let hdr = TarHeader::read_from_bytes(&bytes[bytes.len() - 512..]).expect("512 bytes");
    if tar_name(&hdr) != TOC_NAME_TOC {
        return Err(Error::invalid(
            format!("TOC of blob {}", info.id),
            format!("last tar entry is '{}', not {TOC_NAME_TOC}", tar_name(&hdr)),
        ));
    }
    let n = parse_tar_size(&hdr)
        .filter(|n| n % 128 == 0 && *n <= toc_len - 512)
        .ok_or_else(|| Error::invalid(format!("TOC of blob {}", info.id), "bad TOC size"))?;
    let start = bytes.len() - 512 - n as usize;
    if info.toc_digest != [0; 32] && info.toc_size > 0 && sha256(&bytes[start..]) != info.toc_digest
    {
        return Err(Error::invalid(
            format!("TOC of blob {}", info.id),
            "digest mismatch",
        ));
    }
    let mut out = Vec::new();
    for chunk in bytes[start..bytes.len() - 512].chunks_exact(128) {
        let e = TocEntry::read_from_bytes(chunk).expect("128 bytes");
        let end = e.name.iter().position(|b| *b == 0).unwrap_or(16);
        out.push(TocItem {
            name: String::from_utf8_lossy(&e.name[..end]).into_owned(),
            flags: e.flags.get(),
            digest: e.uncompressed_digest,
            offset: e.compressed_offset.get(),
            compressed_size: e.compressed_size.get(),
            uncompressed_size: e.uncompressed_size.get(),
        });
    }
    Ok(out)
}

/// Extracts the bootstrap embedded in an inline-meta blob (`image.boot` section).
pub fn read_inline_bootstrap(blob: &(impl ReadAt + ?Sized)) -> Result<Vec<u8>> {
    for (name, off, size) in tar_sections(blob)? {
        if name == TOC_NAME_BOOTSTRAP {
            let data = read_vec(blob, off, size, "inline bootstrap")?;
            if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                use std::io::Read;
                let fail = |reason: String| Error::Decompress {
                    what: "inline bootstrap".into(),
                    reason,
                };
                let dec = zstd::stream::Decoder::new(&data[..]).map_err(|e| fail(e.to_string()))?;
                let mut out = Vec::new();
                dec.take(MAX_METADATA_SIZE + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| fail(e.to_string()))?;
                if out.len() as u64 > MAX_METADATA_SIZE {
                    return Err(fail("larger than 2 GiB".into()));
                }
                return Ok(out);
            }
            return Ok(data);
        }
    }
    Err(Error::NotFound("image.boot section in blob".into()))
}

/// The chunk digest array of a blob with `INLINED_CHUNK_DIGEST`.
pub fn read_digest_array(blob: &(impl ReadAt + ?Sized), info: &BlobInfo) -> Result<Vec<[u8; 32]>> {
    let section = tar_sections(blob)?
        .into_iter()
        .find(|(n, _, _)| n == TOC_NAME_DIGEST)
        .ok_or_else(|| Error::NotFound(format!("blob.digest section in blob {}", info.id)))?;
    if section.2 != info.chunk_count as u64 * 32 {
        return Err(Error::invalid(
            format!("digest array of blob {}", info.id),
            "size does not match chunk count",
        ));
    }
    let bytes = read_vec(blob, section.1, section.2, "chunk digest array")?;
    Ok(bytes
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect())
}

/// Decompresses the stored bytes of `chunk` and verifies its digest. Never returns data
/// that does not match the digest.
pub fn decode_chunk(info: &BlobInfo, chunk: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>> {
    decode_chunk_cow(info, chunk, stored).map(std::borrow::Cow::into_owned)
}

/// [`decode_chunk`] without a copy for a chunk stored uncompressed: its verified bytes
/// are `stored` itself.
pub fn decode_chunk_cow<'a>(
    info: &BlobInfo,
    chunk: &ChunkInfo,
    stored: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let data = decompress_chunk(info, chunk, stored)?;
    verify_chunk(info, chunk, &data)?;
    Ok(data)
}

/// The uncompressed bytes of `chunk` from its stored bytes (`stored` itself when it is
/// stored uncompressed), **not** checked against its digest: for readers that were told
/// not to ([`decode_chunk_cow`] checks).
pub fn decompress_chunk<'a>(
    info: &BlobInfo,
    chunk: &ChunkInfo,
    stored: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let what = || format!("chunk {} of blob {}", chunk.ci_index, info.id);
    if chunk.compressed {
        Ok(std::borrow::Cow::Owned(info.compressor.decompress(
            stored,
            chunk.uncompressed_size as usize,
            &what(),
        )?))
    } else if stored.len() == chunk.uncompressed_size as usize {
        Ok(std::borrow::Cow::Borrowed(stored))
    } else {
        Err(Error::Decompress {
            what: what(),
            reason: "stored size differs from uncompressed size".into(),
        })
    }
}

/// Checks `data` against `chunk.digest`.
pub fn verify_chunk(info: &BlobInfo, chunk: &ChunkInfo, data: &[u8]) -> Result<()> {
    let actual = info.digester.digest(data);
    if actual != chunk.digest {
        return Err(Error::DigestMismatch {
            blob_id: info.id.clone(),
            ci_index: chunk.ci_index,
            expected: hex::encode(chunk.digest),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

/// Reads, decompresses and verifies one chunk from a blob.
pub fn read_chunk(
    blob: &(impl ReadAt + ?Sized),
    info: &BlobInfo,
    chunk: &ChunkInfo,
) -> Result<Vec<u8>> {
    let stored = read_vec(
        blob,
        chunk.compressed_offset,
        chunk.compressed_size as u64,
        &format!("chunk {} of blob {}", chunk.ci_index, info.id),
    )?;
    decode_chunk(info, chunk, &stored)
}

/// Resolves every chunk of blob `blob_index` with its expected digest: offsets from the
/// blob's ci array, digests from the bootstrap's chunk table (the root of trust), or, for
/// chunks the table lacks, from the blob's digest array when present.
pub fn blob_chunks(
    bs: &Bootstrap,
    blob_index: u32,
    blob: &(impl ReadAt + ?Sized),
) -> Result<Vec<(ChunkInfo, bool)>> {
    let info = &bs.blobs()[blob_index as usize];
    let mut chunks = read_ci_array(blob, info, blob_index)?;
    let mut known = vec![false; chunks.len()];
    for i in 0..bs.chunk_table_len() {
        let rec = bs.chunk_record(i)?;
        if rec.blob_index != blob_index {
            continue;
        }
        let c = &mut chunks[rec.ci_index as usize];
        if (
            c.compressed_offset,
            c.compressed_size,
            c.uncompressed_offset,
            c.uncompressed_size,
        ) != (
            rec.compressed_offset,
            rec.compressed_size,
            rec.uncompressed_offset,
            rec.uncompressed_size,
        ) {
            return Err(Error::invalid(
                format!("chunk {} of blob {}", rec.ci_index, info.id),
                "bootstrap chunk table and blob ci array disagree",
            ));
        }
        c.digest = rec.digest;
        known[rec.ci_index as usize] = true;
    }
    if known.iter().any(|k| !k) && info.has(blob_features::INLINED_CHUNK_DIGEST) {
        let digests = read_digest_array(blob, info)?;
        for (i, c) in chunks.iter_mut().enumerate() {
            if !known[i] {
                c.digest = digests[i];
                known[i] = true;
            }
        }
    }
    Ok(chunks.into_iter().zip(known).collect())
}

/// Writes blob `blob_index` in its uncompressed layout (every chunk at its uncompressed
/// offset, file length = `uncompressed_size`) after verifying every chunk. Chunks whose
/// digest is known nowhere are left as zeros (no file refers to them).
pub fn expand_blob<W: Write + Seek>(
    bs: &Bootstrap,
    blob_index: u32,
    blob: &(impl ReadAt + ?Sized),
    out: &mut W,
) -> Result<()> {
    let info = &bs.blobs()[blob_index as usize];
    let mut end = 0u64;
    for (chunk, known) in blob_chunks(bs, blob_index, blob)? {
        if !known {
            continue;
        }
        let data = read_chunk(blob, info, &chunk)?;
        out.seek(SeekFrom::Start(chunk.uncompressed_offset))
            .map_err(|e| Error::io("Seeking output", e))?;
        out.write_all(&data)
            .map_err(|e| Error::io("Writing expanded blob", e))?;
        end = end.max(chunk.uncompressed_offset + data.len() as u64);
    }
    // Zero-fill up to the full uncompressed size so the result is a whole block device.
    out.seek(SeekFrom::Start(end))
        .map_err(|e| Error::io("Seeking output", e))?;
    let mut left = info.uncompressed_size.saturating_sub(end);
    let zeros = vec![0u8; left.min(1 << 20) as usize];
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..n])
            .map_err(|e| Error::io("Writing expanded blob", e))?;
        left -= n as u64;
    }
    Ok(())
}
