//! Structures found inside data blobs: the compression-context (ci) header and entries,
//! TOC entries and the GNU tar headers placed after each section (spec §13).

use super::meta::ondisk;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic at both ends of the ci header.
pub const BLOB_CCT_MAGIC: u32 = 0xB10B_B10B;
/// Size of the ci header.
pub const BLOB_CCT_HEADER_SIZE: u64 = 4096;
/// Size of a tar header block.
pub const TAR_BLOCK_SIZE: u64 = 512;
/// Tar entry name of the chunk data section.
pub const TOC_NAME_BLOB: &str = "image.blob";
/// Tar entry name of the ci array + header section.
pub const TOC_NAME_META: &str = "blob.meta";
/// TOC entry name of the ci header alone.
pub const TOC_NAME_META_HEADER: &str = "blob.meta.header";
/// Tar entry name of the chunk digest array section.
pub const TOC_NAME_DIGEST: &str = "blob.digest";
/// Tar entry name of the inlined bootstrap.
pub const TOC_NAME_BOOTSTRAP: &str = "image.boot";
/// Tar entry name of the TOC.
pub const TOC_NAME_TOC: &str = "rafs.blob.toc";
/// TOC entry flag: stored uncompressed.
pub const TOC_FLAG_NONE: u32 = 0x1;
/// TOC entry flag: zstd.
pub const TOC_FLAG_ZSTD: u32 = 0x2;
/// TOC entry flag: lz4_block.
pub const TOC_FLAG_LZ4: u32 = 0x4;
/// TOC entry compression mask.
pub const TOC_FLAG_COMPRESSION_MASK: u32 = 0xF;

ondisk! {
    /// Compression-context header, 4096 bytes, right after the ci array (spec §13.3).
    pub struct CiHeader [4096] {
        /// [`BLOB_CCT_MAGIC`].
        pub magic: U32,
        /// Blob features.
        pub features: U32,
        /// Compressor of the ci array.
        pub ci_compressor: U32,
        /// Number of ci entries.
        pub ci_entries: U32,
        /// Offset of the ci array in the blob.
        pub ci_offset: U64,
        /// Stored size of the ci array.
        pub ci_compressed_size: U64,
        /// Decompressed size of the ci array.
        pub ci_uncompressed_size: U64,
        /// Offset of the zran/batch table in the decompressed ci buffer.
        pub ci_zran_offset: U64,
        /// Size of that table.
        pub ci_zran_size: U64,
        /// Number of contexts in it.
        pub ci_zran_count: U32,
        /// Zeros.
        pub reserved: [u8; 4032],
        /// [`BLOB_CCT_MAGIC`].
        pub magic2: U32,
    }
}

ondisk! {
    /// ci entry v1, 16 bytes (spec §13.3). Sizes are stored minus one.
    pub struct CiEntryV1 [16] {
        /// Uncompressed offset and size bits.
        pub uncomp_info: U64,
        /// Compressed offset and size bits.
        pub comp_info: U64,
    }
}

ondisk! {
    /// ci entry v2, 24 bytes (spec §13.3).
    pub struct CiEntryV2 [24] {
        /// Uncompressed offset >> 12, size − 1 and flags.
        pub uncomp_info: U64,
        /// Compressed offset and size.
        pub comp_info: U64,
        /// zran/batch context or CRC-32C.
        pub data: U64,
    }
}

ondisk! {
    /// TOC entry, 128 bytes (spec §13.4).
    pub struct TocEntry [128] {
        /// Compression flags.
        pub flags: U32,
        /// Reserved.
        pub reserved1: U32,
        /// NUL-padded name.
        pub name: [u8; 16],
        /// sha256 of the uncompressed content.
        pub uncompressed_digest: [u8; 32],
        /// Offset of the section in the blob.
        pub compressed_offset: U64,
        /// Stored size of the section.
        pub compressed_size: U64,
        /// Uncompressed size of the section.
        pub uncompressed_size: U64,
        /// Reserved.
        pub reserved2: [u8; 48],
    }
}

ondisk! {
    /// GNU tar header, 512 bytes, as placed after each blob section (spec §13.1).
    pub struct TarHeader [512] {
        /// NUL-padded name.
        pub name: [u8; 100],
        /// Mode (NUL bytes).
        pub mode: [u8; 8],
        /// uid (NUL bytes).
        pub uid: [u8; 8],
        /// gid (NUL bytes).
        pub gid: [u8; 8],
        /// Size, 11 octal digits and NUL.
        pub size: [u8; 12],
        /// mtime, `"00000000000\0"`.
        pub mtime: [u8; 12],
        /// Checksum, 6 octal digits, NUL, space.
        pub chksum: [u8; 8],
        /// `'0'`.
        pub typeflag: u8,
        /// Link name (NUL bytes).
        pub linkname: [u8; 100],
        /// `"ustar "`.
        pub magic: [u8; 6],
        /// `" \0"`.
        pub version: [u8; 2],
        /// User name (NUL bytes).
        pub uname: [u8; 32],
        /// Group name (NUL bytes).
        pub gname: [u8; 32],
        /// Device major (NUL bytes).
        pub devmajor: [u8; 8],
        /// Device minor (NUL bytes).
        pub devminor: [u8; 8],
        /// GNU extension area (NUL bytes).
        pub pad: [u8; 167],
    }
}
