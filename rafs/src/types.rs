//! Domain types shared by the reader and the writer: algorithms, blob and chunk descriptors.

use crate::error::{Error, Result};
use crate::format::{compressor, digester};
use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

/// Chunk compression algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compressor {
    /// Stored as is.
    None,
    /// Raw LZ4 block (no frame, no size prefix).
    Lz4Block,
    /// gzip (ref blobs only; readable, never written here).
    Gzip,
    /// One zstd frame.
    Zstd,
}

impl Compressor {
    /// On-disk number (blob table `compression_algo`).
    pub fn to_disk(self) -> u32 {
        match self {
            Compressor::None => compressor::NONE,
            Compressor::Lz4Block => compressor::LZ4_BLOCK,
            Compressor::Gzip => compressor::GZIP,
            Compressor::Zstd => compressor::ZSTD,
        }
    }

    /// From the on-disk number.
    pub fn from_disk(v: u32, field: &str) -> Result<Self> {
        Ok(match v {
            compressor::NONE => Compressor::None,
            compressor::LZ4_BLOCK => Compressor::Lz4Block,
            compressor::GZIP => Compressor::Gzip,
            compressor::ZSTD => Compressor::Zstd,
            _ => return Err(Error::invalid(field, format!("unknown compressor {v}"))),
        })
    }

    /// The superblock flag for this compressor.
    pub fn sb_flag(self) -> u64 {
        use crate::format::flags::*;
        match self {
            Compressor::None => COMPRESSION_NONE,
            Compressor::Lz4Block => COMPRESSION_LZ4,
            Compressor::Gzip => COMPRESSION_GZIP,
            Compressor::Zstd => COMPRESSION_ZSTD,
        }
    }

    /// Compresses `data`; returns `None` when the result would not be smaller (store raw).
    pub fn compress(self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let out = match self {
            Compressor::None => return Ok(None),
            Compressor::Lz4Block => lz4_flex::block::compress(data),
            Compressor::Zstd => zstd::bulk::compress(data, 3)
                .map_err(|e| Error::io("zstd compression failed", e))?,
            Compressor::Gzip => {
                return Err(Error::invalid(
                    "compressor",
                    "gzip is not supported for writing",
                ))
            }
        };
        Ok((out.len() < data.len()).then_some(out))
    }

    /// Decompresses `data` into exactly `size` bytes.
    pub fn decompress(self, data: &[u8], size: usize, what: &str) -> Result<Vec<u8>> {
        let fail = |reason: String| Error::Decompress {
            what: what.to_string(),
            reason,
        };
        let out = match self {
            Compressor::None => data.to_vec(),
            Compressor::Lz4Block => {
                lz4_flex::block::decompress(data, size).map_err(|e| fail(e.to_string()))?
            }
            Compressor::Zstd => {
                let mut out = Vec::with_capacity(size);
                let mut dec = zstd::bulk::Decompressor::new().map_err(|e| fail(e.to_string()))?;
                dec.decompress_to_buffer(data, &mut out)
                    .map_err(|e| fail(e.to_string()))?;
                out
            }
            Compressor::Gzip => {
                return Err(fail("gzip chunks are not supported".into()));
            }
        };
        if out.len() != size {
            return Err(fail(format!("got {} bytes, expected {size}", out.len())));
        }
        Ok(out)
    }
}

impl FromStr for Compressor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Compressor::None,
            "lz4_block" => Compressor::Lz4Block,
            "zstd" => Compressor::Zstd,
            _ => {
                return Err(Error::invalid(
                    "compressor",
                    format!("'{s}' is not one of none, lz4_block, zstd"),
                ))
            }
        })
    }
}

impl fmt::Display for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compressor::None => "none",
            Compressor::Lz4Block => "lz4_block",
            Compressor::Gzip => "gzip",
            Compressor::Zstd => "zstd",
        })
    }
}

/// Chunk digest algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Digester {
    /// blake3-256 (default).
    Blake3,
    /// sha256.
    Sha256,
}

impl Digester {
    /// On-disk number (blob table `digest_algo`).
    pub fn to_disk(self) -> u32 {
        match self {
            Digester::Blake3 => digester::BLAKE3,
            Digester::Sha256 => digester::SHA256,
        }
    }

    /// From the on-disk number.
    pub fn from_disk(v: u32, field: &str) -> Result<Self> {
        Ok(match v {
            digester::BLAKE3 => Digester::Blake3,
            digester::SHA256 => Digester::Sha256,
            _ => return Err(Error::invalid(field, format!("unknown digester {v}"))),
        })
    }

    /// The superblock flag for this digester.
    pub fn sb_flag(self) -> u64 {
        match self {
            Digester::Blake3 => crate::format::flags::HASH_BLAKE3,
            Digester::Sha256 => crate::format::flags::HASH_SHA256,
        }
    }

    /// Digest of `data`.
    pub fn digest(self, data: &[u8]) -> [u8; 32] {
        match self {
            Digester::Blake3 => *blake3::hash(data).as_bytes(),
            Digester::Sha256 => sha2::Sha256::digest(data).into(),
        }
    }
}

impl FromStr for Digester {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "blake3" => Digester::Blake3,
            "sha256" => Digester::Sha256,
            _ => {
                return Err(Error::invalid(
                    "digester",
                    format!("'{s}' is not one of blake3, sha256"),
                ))
            }
        })
    }
}

impl fmt::Display for Digester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Digester::Blake3 => "blake3",
            Digester::Sha256 => "sha256",
        })
    }
}

/// sha256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// One data blob as described by a bootstrap's blob table (spec §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Blob id (normally 64 hex chars).
    pub id: String,
    /// Number of chunks (ci entries).
    pub chunk_count: u32,
    /// Chunk size of the filesystem.
    pub chunk_size: u32,
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk digester.
    pub digester: Digester,
    /// `BlobFeatures` bits.
    pub features: u32,
    /// Blob file size as known by the builder.
    pub compressed_size: u64,
    /// Size of the 4 KiB-aligned uncompressed space.
    pub uncompressed_size: u64,
    /// TOC bytes plus its tar header (0 if none).
    pub toc_size: u32,
    /// sha256 of TOC entries and TOC tar header (zero if unknown).
    pub toc_digest: [u8; 32],
    /// Compressor of the ci array.
    pub ci_compressor: Compressor,
    /// Offset of the ci array.
    pub ci_offset: u64,
    /// Stored size of the ci array.
    pub ci_compressed_size: u64,
    /// Decompressed size of the ci array.
    pub ci_uncompressed_size: u64,
    /// Digest of a separate meta blob.
    pub meta_digest: [u8; 32],
    /// Size of a separate meta blob.
    pub meta_size: u64,
    /// `mapped_blkaddr` from the device slot (0 when written: computed by the writer).
    pub mapped_blkaddr: u32,
}

impl BlobInfo {
    /// Whether the blob has the given feature bit(s).
    pub fn has(&self, feature: u32) -> bool {
        self.features & feature == feature
    }
}

/// Where one chunk lives and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkInfo {
    /// Digest of the uncompressed data.
    pub digest: [u8; 32],
    /// Index of the blob in the bootstrap's blob table.
    pub blob_index: u32,
    /// ci index in the blob.
    pub ci_index: u32,
    /// Offset in the blob file.
    pub compressed_offset: u64,
    /// Stored size.
    pub compressed_size: u32,
    /// Offset in the blob's uncompressed space (4 KiB aligned).
    pub uncompressed_offset: u64,
    /// Uncompressed size.
    pub uncompressed_size: u32,
    /// Whether the stored bytes are compressed.
    pub compressed: bool,
    /// Offset of the chunk in the first file that produced it.
    pub file_offset: u64,
}
