//! Writing a data blob: chunking, digesting, compressing (in parallel), deduplicating and
//! writing chunks in a deterministic order, then the ci array, header, digest array,
//! optional inline bootstrap and TOC, each followed by its tar header (spec §13).

use crate::error::{Error, Result};
use crate::format::*;
use crate::types::{sha256, BlobInfo, ChunkInfo, Compressor, Digester};
use crossbeam_channel::{bounded, Receiver, Sender};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use zerocopy::IntoBytes;

/// How a blob is written.
#[derive(Clone, Debug)]
pub struct BlobOptions {
    /// Chunk size, a power of two in [4 KiB, 16 MiB].
    pub chunk_size: u32,
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk digester.
    pub digester: Digester,
    /// Index this blob gets in the bootstrap's blob table.
    pub blob_index: u32,
    /// `--features blob-toc`: tar headers, chunk digest array and TOC.
    pub toc: bool,
    /// `--blob-inline-meta`: the bootstrap is appended to the blob.
    pub inline_meta: bool,
    /// Worker threads digesting and compressing chunks.
    pub threads: usize,
}

impl Default for BlobOptions {
    fn default() -> Self {
        BlobOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compressor: Compressor::Zstd,
            digester: Digester::Blake3,
            blob_index: 0,
            toc: false,
            inline_meta: false,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

impl BlobOptions {
    /// Checks the chunk size.
    pub fn validate(&self) -> Result<()> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(Error::invalid(
                "chunk size",
                format!("{cs:#x} is not a power of two between 0x1000 and 0x1000000"),
            ));
        }
        Ok(())
    }
}

/// Every chunk a build refers to, by handle. Files hold handles; the bootstrap writer
/// resolves them. Chunks of other blobs (parent layers, chunk dictionaries) can be added
/// with [`ChunkArena::push`] so that the blob writer deduplicates against them.
#[derive(Clone, Debug, Default)]
pub struct ChunkArena {
    chunks: Vec<ChunkInfo>,
}

impl ChunkArena {
    /// Adds a chunk; returns its handle.
    pub fn push(&mut self, chunk: ChunkInfo) -> u32 {
        self.chunks.push(chunk);
        (self.chunks.len() - 1) as u32
    }

    /// A chunk by handle.
    pub fn get(&self, handle: u32) -> &ChunkInfo {
        &self.chunks[handle as usize]
    }

    /// Number of handles.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether there are no chunks.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// All chunks by handle.
    pub fn iter(&self) -> impl Iterator<Item = &ChunkInfo> {
        self.chunks.iter()
    }
}

struct Work {
    seq: u32,
    data: Vec<u8>,
    file_offset: u64,
}

struct Processed {
    seq: u32,
    digest: [u8; 32],
    stored: Vec<u8>,
    compressed: bool,
    size: u32,
    file_offset: u64,
}

/// Hands file contents to the chunk pipeline; see [`write_chunks`].
pub struct ChunkSink<'a> {
    tx: Option<Sender<Work>>,
    base: u32,
    next_seq: u32,
    chunk_size: usize,
    recycle: &'a Receiver<Vec<u8>>,
}

impl ChunkSink<'_> {
    /// Reads exactly `size` bytes of one file from `r`, queues its chunks and returns their
    /// handles in file order.
    pub fn add_file(&mut self, r: &mut dyn Read, size: u64, what: &str) -> Result<Vec<u32>> {
        let mut handles = Vec::with_capacity(size.div_ceil(self.chunk_size as u64) as usize);
        let mut offset = 0u64;
        while offset < size {
            let len = (size - offset).min(self.chunk_size as u64) as usize;
            let mut buf = self.recycle.try_recv().unwrap_or_default();
            buf.resize(len, 0);
            r.read_exact(&mut buf).map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    " (file shorter than its size?)"
                } else {
                    ""
                };
                Error::io(format!("Reading {what} at offset {offset}{hint}"), e)
            })?;
            let seq = self.next_seq;
            self.next_seq = seq
                .checked_add(1)
                .ok_or_else(|| Error::Tree("too many chunks".into()))?;
            let work = Work {
                seq,
                data: buf,
                file_offset: offset,
            };
            if let Some(tx) = &self.tx {
                if tx.send(work).is_err() {
                    // The writer stopped; its error is reported by `write_chunks`.
                    return Err(Error::Tree("blob writer stopped".into()));
                }
            }
            handles.push(self.base + seq);
            offset += len as u64;
        }
        Ok(handles)
    }
}

/// A blob whose chunks have been written; the tail sections are still to come.
pub struct BlobBody<W: Write> {
    out: W,
    opts: BlobOptions,
    pos: u64,
    hasher: Sha256,
    /// The sha256 of every byte written (the blob's OCI digest): forked from `hasher`
    /// at the first byte `hasher` skips, so that the bytes before are hashed once.
    file_hasher: Option<Sha256>,
    uncompressed_size: u64,
    /// Unique chunks in ci order.
    unique: Vec<ChunkInfo>,
}

/// Compresses `data` into `out` (a pooled buffer); true when the result is smaller.
///
/// zstd gets room for its worst case, so that its output depends on the data alone: in
/// less room (say `data.len() - 1`, or whatever a recycled buffer happens to hold,
/// which depends on thread timing) it gives up on small chunks that it does compress
/// given more, and the same image would give different blobs from run to run. lz4's
/// output does not depend on the room; it gets `data.len() - 1`, failing fast on
/// incompressible chunks.
fn compress_into(
    zstd: Option<&mut zstd::bulk::Compressor<'_>>,
    compressor: Compressor,
    data: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let room = data.len().saturating_sub(1);
    out.clear();
    match (zstd, compressor) {
        (Some(z), _) => {
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            match z.compress_to_buffer(data, out) {
                Ok(n) => n < data.len(),
                Err(_) => false,
            }
        }
        (None, Compressor::Lz4Block) => {
            if out.len() < room {
                out.resize(room, 0);
            }
            match lz4_flex::block::compress_into(data, &mut out[..room]) {
                Ok(n) => {
                    out.truncate(n);
                    true
                }
                Err(_) => false,
            }
        }
        _ => false,
    }
}

/// The zstd level chunks are compressed at: zstd's fastest regular level. Level 3
/// (zstd's default) makes blobs about 6% smaller for half again the CPU, and converting
/// is CPU-bound (`cargo bench -p rafs-e2e --bench convert`); readers do not care.
pub const ZSTD_LEVEL: i32 = 1;

fn compress_worker(
    opts: &BlobOptions,
    rx: Receiver<Work>,
    tx: Sender<Processed>,
    pool: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
) {
    let mut zstd = match opts.compressor {
        Compressor::Zstd => zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
        _ => None,
    };
    for w in rx {
        let digest = opts.digester.digest(&w.data);
        let mut out = pool.1.try_recv().unwrap_or_default();
        let size = w.data.len() as u32;
        let compressed = compress_into(zstd.as_mut(), opts.compressor, &w.data, &mut out);
        let (stored, spare) = if compressed {
            (out, w.data)
        } else {
            (w.data, out)
        };
        let _ = pool.0.try_send(spare);
        let msg = Processed {
            seq: w.seq,
            digest,
            stored,
            compressed,
            size,
            file_offset: w.file_offset,
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// Writes the chunks of every file `feed` hands to the [`ChunkSink`] into `out`:
/// digesting and compressing on `opts.threads` workers, then deduplicating (against
/// earlier chunks of this blob and every chunk already in `arena` with the same digester)
/// and writing in submission order, so the output does not depend on thread timing.
///
/// Returns what `feed` returned and the blob body, whose tail is written by
/// [`BlobBody::write_meta`] and [`BlobWithMeta::finish`]. `arena` receives one handle per
/// submitted chunk.
pub fn write_chunks<W, T, F>(
    out: W,
    opts: &BlobOptions,
    arena: &mut ChunkArena,
    feed: F,
) -> Result<(T, BlobBody<W>)>
where
    W: Write + Send,
    F: FnOnce(&mut ChunkSink) -> Result<T>,
{
    opts.validate()?;
    let threads = opts.threads.max(1);
    let base = arena.len() as u32;
    let mut dedup: HashMap<[u8; 32], ChunkInfo> = HashMap::new();
    for c in arena.iter() {
        dedup.entry(c.digest).or_insert(*c);
    }
    let (work_tx, work_rx) = bounded::<Work>(threads * 4);
    let (done_tx, done_rx) = bounded::<Processed>(threads * 8);
    let (recycle_tx, recycle_rx) = bounded::<Vec<u8>>(threads * 8 + 8);
    let mut body = BlobBody {
        out,
        opts: opts.clone(),
        pos: 0,
        hasher: Sha256::new(),
        file_hasher: None,
        uncompressed_size: 0,
        unique: Vec::new(),
    };

    let (fed, written) = std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = work_rx.clone();
            let tx = done_tx.clone();
            let pool = (recycle_tx.clone(), recycle_rx.clone());
            s.spawn(move || compress_worker(opts, rx, tx, pool));
        }
        drop(work_rx);
        drop(done_tx);
        let body = &mut body;
        let writer = s.spawn(move || -> Result<Vec<ChunkInfo>> {
            let mut pending: BTreeMap<u32, Processed> = BTreeMap::new();
            let mut resolved = Vec::new();
            for p in done_rx.iter() {
                pending.insert(p.seq, p);
                while let Some(p) = pending.remove(&(resolved.len() as u32)) {
                    let info = body.place(&mut dedup, &p)?;
                    resolved.push(info);
                    let mut buf = p.stored;
                    buf.clear();
                    let _ = recycle_tx.try_send(buf);
                }
            }
            if !pending.is_empty() {
                return Err(Error::Tree("chunk pipeline lost a chunk".into()));
            }
            Ok(resolved)
        });
        let mut sink = ChunkSink {
            tx: Some(work_tx),
            base,
            next_seq: 0,
            chunk_size: opts.chunk_size as usize,
            recycle: &recycle_rx,
        };
        let fed = feed(&mut sink);
        let submitted = sink.next_seq;
        sink.tx = None;
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Tree("blob writer thread panicked".into())));
        (fed.map(|t| (t, submitted)), written)
    });
    let resolved = written?;
    let (t, submitted) = fed?;
    if resolved.len() as u32 != submitted {
        return Err(Error::Tree(format!(
            "chunk pipeline wrote {} of {submitted} chunks",
            resolved.len()
        )));
    }
    for c in resolved {
        arena.push(c);
    }
    Ok((t, body))
}

fn tar_header(name: &str, size: u64) -> TarHeader {
    let mut h = TarHeader::default();
    h.name[..name.len()].copy_from_slice(name.as_bytes());
    h.size[..11].copy_from_slice(format!("{size:011o}").as_bytes());
    h.mtime[..11].copy_from_slice(b"00000000000");
    h.typeflag = b'0';
    h.magic = *b"ustar ";
    h.version = *b" \0";
    h.chksum = [b' '; 8];
    let sum: u32 = h.as_bytes().iter().map(|b| *b as u32).sum();
    h.chksum[..6].copy_from_slice(format!("{sum:06o}").as_bytes());
    h.chksum[6] = 0;
    h.chksum[7] = b' ';
    h
}

fn toc_flag(c: Compressor) -> u32 {
    match c {
        Compressor::Zstd => TOC_FLAG_ZSTD,
        Compressor::Lz4Block => TOC_FLAG_LZ4,
        _ => TOC_FLAG_NONE,
    }
}

fn toc_entry(
    name: &str,
    flags: u32,
    digest: [u8; 32],
    off: u64,
    csize: u64,
    usize_: u64,
) -> TocEntry {
    let mut e = TocEntry {
        flags: flags.into(),
        uncompressed_digest: digest,
        compressed_offset: off.into(),
        compressed_size: csize.into(),
        uncompressed_size: usize_.into(),
        ..Default::default()
    };
    e.name[..name.len()].copy_from_slice(name.as_bytes());
    e
}

/// Encodes a v1 ci entry (spec §13.3).
pub fn encode_ci_v1(c: &ChunkInfo) -> CiEntryV1 {
    let us = (c.uncompressed_size - 1) as u64;
    let cs = (c.compressed_size - 1) as u64;
    let uncomp = (c.uncompressed_offset & 0x0000_0FFF_FFFF_F000)
        | ((us >> 20) & 0xF) << 8
        | (us & 0xF_FFFF) << 44;
    let comp =
        (c.compressed_offset & 0xFF_FFFF_FFFF) | ((cs >> 20) & 0xF) << 40 | (cs & 0xF_FFFF) << 44;
    CiEntryV1 {
        uncomp_info: uncomp.into(),
        comp_info: comp.into(),
    }
}

/// Result of [`BlobBody::write_meta`]: what the tail needs later.
struct MetaState {
    data_end: u64,
    data_digest: [u8; 32],
    ci_offset: u64,
    ci: Vec<u8>,
    ci_stored_len: u64,
    ci_compressor: Compressor,
    header: CiHeader,
    digest_offset: u64,
    digests: Vec<u8>,
}

/// A blob whose metadata sections are written; only the inline bootstrap and TOC remain.
pub struct BlobWithMeta<W: Write> {
    body: BlobBody<W>,
    meta: MetaState,
}

impl<W: Write> BlobBody<W> {
    fn write(&mut self, bytes: &[u8], hashed: bool) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io("Writing blob", e))?;
        if !hashed && self.file_hasher.is_none() {
            self.file_hasher = Some(self.hasher.clone());
        }
        if let Some(f) = &mut self.file_hasher {
            f.update(bytes);
        }
        if hashed {
            self.hasher.update(bytes);
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn place(
        &mut self,
        dedup: &mut HashMap<[u8; 32], ChunkInfo>,
        p: &Processed,
    ) -> Result<ChunkInfo> {
        if let Some(c) = dedup.get(&p.digest) {
            if c.uncompressed_size == p.size {
                return Ok(*c);
            }
        }
        if self.unique.len() as u32 >= MAX_CHUNKS_PER_BLOB {
            return Err(Error::Tree(format!(
                "more than {MAX_CHUNKS_PER_BLOB} chunks in one blob"
            )));
        }
        let info = ChunkInfo {
            digest: p.digest,
            blob_index: self.opts.blob_index,
            ci_index: self.unique.len() as u32,
            compressed_offset: self.pos,
            compressed_size: p.stored.len() as u32,
            uncompressed_offset: self.uncompressed_size,
            uncompressed_size: p.size,
            compressed: p.compressed,
            file_offset: p.file_offset,
        };
        if info.compressed_offset >= BLOB_MAX_SIZE_COMPRESSED {
            return Err(Error::Tree("blob exceeds 2^40 bytes".into()));
        }
        self.write(&p.stored, true)?;
        self.uncompressed_size += (p.size as u64).next_multiple_of(BLOCK_SIZE);
        self.unique.push(info);
        dedup.insert(p.digest, info);
        Ok(info)
    }

    /// Number of chunks written into this blob.
    pub fn chunk_count(&self) -> u32 {
        self.unique.len() as u32
    }

    /// Blob features this blob will carry.
    pub fn features(&self) -> u32 {
        let mut f = blob_features::ALIGNED | blob_features::CAP_TAR_TOC;
        if self.opts.toc {
            f |= blob_features::HAS_TOC
                | blob_features::HAS_TAR_HEADER
                | blob_features::INLINED_CHUNK_DIGEST;
        }
        if self.opts.inline_meta {
            f |= blob_features::INLINED_FS_META | blob_features::HAS_TAR_HEADER;
        }
        f
    }

    fn tar_headers(&self) -> bool {
        self.opts.toc || self.opts.inline_meta
    }

    /// Writes the chunk data's tar header, the ci array and header, and (with a TOC) the
    /// digest array.
    pub fn write_meta(mut self) -> Result<BlobWithMeta<W>> {
        let data_end = self.pos;
        if self.tar_headers() {
            self.write(tar_header(TOC_NAME_BLOB, data_end).as_bytes(), true)?;
        }
        let data_digest: [u8; 32] = self.hasher.clone().finalize().into();
        let features = self.features();
        let mut ci = Vec::with_capacity(self.unique.len() * 16);
        for c in &self.unique {
            ci.extend_from_slice(encode_ci_v1(c).as_bytes());
        }
        let ci_offset = self.pos;
        let (ci_compressor, ci_stored) = match self.opts.compressor.compress(&ci)? {
            Some(packed) => (self.opts.compressor, packed),
            None => (Compressor::None, ci.clone()),
        };
        let header = CiHeader {
            magic: BLOB_CCT_MAGIC.into(),
            features: features.into(),
            ci_compressor: ci_compressor.to_disk().into(),
            ci_entries: (self.unique.len() as u32).into(),
            ci_offset: ci_offset.into(),
            ci_compressed_size: (ci_stored.len() as u64).into(),
            ci_uncompressed_size: (ci.len() as u64).into(),
            magic2: BLOB_CCT_MAGIC.into(),
            ..Default::default()
        };
        self.write(&ci_stored, true)?;
        self.write(header.as_bytes(), true)?;
        if self.tar_headers() {
            let h = tar_header(TOC_NAME_META, ci_stored.len() as u64 + BLOB_CCT_HEADER_SIZE);
            self.write(h.as_bytes(), true)?;
        }
        let digest_offset = self.pos;
        let mut digests = Vec::new();
        if self.opts.toc {
            digests.reserve(self.unique.len() * 32);
            for c in &self.unique {
                digests.extend_from_slice(&c.digest);
            }
            // The digest array is not part of the blob id (spec §13.5).
            self.write(&digests, false)?;
            self.write(
                tar_header(TOC_NAME_DIGEST, digests.len() as u64).as_bytes(),
                true,
            )?;
        }
        let ci_stored_len = ci_stored.len() as u64;
        Ok(BlobWithMeta {
            body: self,
            meta: MetaState {
                data_end,
                data_digest,
                ci_offset,
                ci,
                ci_stored_len,
                ci_compressor,
                header,
                digest_offset,
                digests,
            },
        })
    }
}

impl<W: Write> BlobWithMeta<W> {
    /// The blob table entry as known now: the id is a placeholder (`x` × 64) and the TOC
    /// is unknown. This is what an inline bootstrap records.
    pub fn provisional_info(&self) -> BlobInfo {
        let b = &self.body;
        BlobInfo {
            id: "x".repeat(BLOB_ID_LEN),
            chunk_count: b.unique.len() as u32,
            chunk_size: b.opts.chunk_size,
            compressor: b.opts.compressor,
            digester: b.opts.digester,
            features: b.features(),
            compressed_size: b.pos,
            uncompressed_size: b.uncompressed_size,
            toc_size: 0,
            toc_digest: [0; 32],
            ci_compressor: self.meta.ci_compressor,
            ci_offset: self.meta.ci_offset,
            ci_compressed_size: self.meta.ci_stored_len,
            ci_uncompressed_size: self.meta.ci.len() as u64,
            meta_digest: [0; 32],
            meta_size: 0,
            mapped_blkaddr: 0,
        }
    }

    /// Appends the inline bootstrap (if any) and the TOC (if enabled); returns the final
    /// blob table entry and the writer. The blob id is the sha256 of every byte of the
    /// blob except the chunk digest array.
    pub fn finish(self, inline_bootstrap: Option<&[u8]>) -> Result<(BlobInfo, W)> {
        let f = self.finish_file(inline_bootstrap)?;
        Ok((f.info, f.out))
    }

    /// [`BlobWithMeta::finish`], also returning the sha256 and size of every byte
    /// written, which is the blob's digest as an OCI layer: the writer need not hash
    /// the blob a second time.
    pub fn finish_file(self, inline_bootstrap: Option<&[u8]>) -> Result<FinishedBlob<W>> {
        let mut info = self.provisional_info();
        let BlobWithMeta { mut body, meta } = self;
        let mut toc = Vec::new();
        if body.opts.toc {
            toc.push(toc_entry(
                TOC_NAME_BLOB,
                TOC_FLAG_NONE,
                meta.data_digest,
                0,
                meta.data_end,
                meta.data_end,
            ));
            toc.push(toc_entry(
                TOC_NAME_META,
                toc_flag(meta.ci_compressor),
                sha256(&meta.ci),
                meta.ci_offset,
                meta.ci_stored_len,
                meta.ci.len() as u64,
            ));
            toc.push(toc_entry(
                TOC_NAME_META_HEADER,
                TOC_FLAG_NONE,
                sha256(meta.header.as_bytes()),
                meta.ci_offset + meta.ci_stored_len,
                BLOB_CCT_HEADER_SIZE,
                BLOB_CCT_HEADER_SIZE,
            ));
            let dlen = meta.digests.len() as u64;
            toc.push(toc_entry(
                TOC_NAME_DIGEST,
                TOC_FLAG_NONE,
                sha256(&meta.digests),
                meta.digest_offset,
                dlen,
                dlen,
            ));
        }
        if let Some(boot) = inline_bootstrap {
            let offset = body.pos;
            let (flag, stored) = match (body.opts.toc, Compressor::Zstd.compress(boot)?) {
                (true, Some(packed)) => (TOC_FLAG_ZSTD, packed),
                _ => (TOC_FLAG_NONE, boot.to_vec()),
            };
            body.write(&stored, true)?;
            body.write(
                tar_header(TOC_NAME_BOOTSTRAP, stored.len() as u64).as_bytes(),
                true,
            )?;
            if body.opts.toc {
                toc.push(toc_entry(
                    TOC_NAME_BOOTSTRAP,
                    flag,
                    sha256(boot),
                    offset,
                    stored.len() as u64,
                    boot.len() as u64,
                ));
            }
        }
        if body.opts.toc {
            let mut bytes = Vec::with_capacity(toc.len() * 128 + 512);
            for e in &toc {
                bytes.extend_from_slice(e.as_bytes());
            }
            let entries = bytes.len() as u64;
            bytes.extend_from_slice(tar_header(TOC_NAME_TOC, entries).as_bytes());
            body.write(&bytes, true)?;
            info.toc_size = bytes.len() as u32;
            info.toc_digest = sha256(&bytes);
        }
        if inline_bootstrap.is_none() {
            info.compressed_size = body.pos;
        }
        let sha256: [u8; 32] = body
            .file_hasher
            .take()
            .unwrap_or_else(|| body.hasher.clone())
            .finalize()
            .into();
        info.id = hex::encode(body.hasher.finalize());
        body.out
            .flush()
            .map_err(|e| Error::io("Flushing blob", e))?;
        Ok(FinishedBlob {
            info,
            out: body.out,
            sha256,
            size: body.pos,
        })
    }
}

/// A finished blob ([`BlobWithMeta::finish_file`]).
pub struct FinishedBlob<W> {
    /// The blob's table entry.
    pub info: BlobInfo,
    /// The writer, flushed.
    pub out: W,
    /// The sha256 of every byte written.
    pub sha256: [u8; 32],
    /// The number of bytes written.
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks from barely to fully compressible: random bytes, then a compressible tail;
    /// and a small text file, which zstd compresses only when given more room than the
    /// input's size.
    fn chunks() -> Vec<Vec<u8>> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut out = Vec::new();
        for (len, tail) in [
            (171, 171),
            (300, 150),
            (4096, 4000),
            (1 << 20, 1000),
            (1 << 20, 500_000),
        ] {
            let mut v: Vec<u8> = (0..len - tail)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            v.extend((0..tail).map(|i| (i % 7) as u8));
            out.push(v);
        }
        let text = b"# Try to hide our fsck snapshots from udev's /dev/disk linking...\n\
            ACTION==\"add|change\", ENV{DM_LV_NAME}==\"*.e2scrub\", ENV{UDISKS_IGNORE}=\"1\", \
            OPTIONS=\"link_priority=-100\"\n";
        out.push(text.to_vec());
        out
    }

    /// The zstd output of a chunk must not depend on the capacity of the pooled buffer
    /// it lands in (which depends on thread timing): else the same image gives different
    /// blobs from run to run.
    #[test]
    fn finish_file_reports_the_sha256_and_size_of_every_byte_written() {
        for (toc, inline) in [(true, true), (true, false), (false, false)] {
            let opts = BlobOptions {
                toc,
                inline_meta: inline,
                chunk_size: 0x10000,
                ..Default::default()
            };
            let mut arena = ChunkArena::default();
            let (_, body) = write_chunks(Vec::new(), &opts, &mut arena, |sink| {
                for (i, c) in chunks().iter().enumerate() {
                    sink.add_file(&mut &c[..], c.len() as u64, &format!("file {i}"))?;
                }
                Ok(())
            })
            .unwrap();
            let boot = vec![0x5au8; 8192];
            let f = body
                .write_meta()
                .unwrap()
                .finish_file(inline.then_some(&boot[..]))
                .unwrap();
            assert_eq!(f.size, f.out.len() as u64, "toc {toc} inline {inline}");
            assert_eq!(f.sha256, sha256(&f.out), "toc {toc} inline {inline}");
            if toc {
                // The blob id leaves the digest array out: it differs from the sha256.
                assert_ne!(f.info.id, hex::encode(f.sha256));
            }
        }
    }

    #[test]
    fn compressed_chunks_do_not_depend_on_the_output_buffer() {
        let mut z = zstd::bulk::Compressor::new(ZSTD_LEVEL).unwrap();
        for data in chunks() {
            let mut fresh = Vec::new();
            let a = compress_into(Some(&mut z), Compressor::Zstd, &data, &mut fresh);
            let mut roomy = Vec::with_capacity(4 << 20);
            let b = compress_into(Some(&mut z), Compressor::Zstd, &data, &mut roomy);
            assert_eq!(a, b, "compressed or not, {} bytes", data.len());
            if a {
                assert!(fresh == roomy, "same bytes");
            }
        }
    }
}
