//! Raw RAFS v6 on-disk structures and constants, exactly as laid out on disk.
//!
//! Every struct here is `#[repr(C)]`, made only of byte arrays and little-endian integer
//! types, so it has no padding and alignment 1; its size is asserted at compile time.
//! Nothing in this module interprets or validates values: see [`crate::read`] and
//! [`crate::write`] for that. Section numbers refer to `shared/spec/rafs-v6.md`.

mod blob;
mod meta;

pub use blob::*;
pub use meta::*;

/// Metadata block size used by RAFS v6 (`s_blkszbits` = 12).
pub const BLOCK_SIZE: u64 = 4096;

/// Longest symlink target, in bytes, that the builder writes and the reader accepts
/// (Linux's `PATH_MAX`).
pub const SYMLINK_MAX: usize = 4096;
/// log2 of [`BLOCK_SIZE`].
pub const BLOCK_BITS: u8 = 12;
/// log2 of the block size used by tarfs images (accepted by readers).
pub const BLOCK_BITS_TARFS: u8 = 9;
/// Byte offset of the EROFS superblock.
pub const SUPER_OFFSET: u64 = 1024;
/// Byte offset of the RAFS extended superblock.
pub const EXT_SUPER_OFFSET: u64 = 1152;
/// Byte offset of the device table.
pub const DEVTABLE_OFFSET: u64 = 1408;
/// `s_devt_slotoff` value: device table offset in 128-byte units.
pub const DEVT_SLOTOFF: u16 = 11;
/// EROFS superblock magic.
pub const EROFS_SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Size of one nid unit.
pub const INODE_SLOT_SIZE: u64 = 32;
/// Root nid written by the builder (root inode at `meta_addr + 4096`).
pub const ROOT_NID: u64 = 128;

/// `s_feature_compat` bit marking a RAFS v6 image.
pub const FEATURE_COMPAT_RAFS_V6: u32 = 0x4000_0000;
/// `s_feature_compat` bit for superblock checksums (never set by nydus).
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x0000_0001;
/// `s_feature_incompat` bit: chunk-based files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;
/// `s_feature_incompat` bit: device table.
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x0000_0008;
/// The exact `s_feature_incompat` value RAFS v6 requires.
pub const FEATURE_INCOMPAT_RAFS_V6: u32 =
    FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;

/// Inode layout bit (bit 0 of `i_format`): compact, 32 bytes.
pub const INODE_LAYOUT_COMPACT: u16 = 0;
/// Inode layout bit (bit 0 of `i_format`): extended, 64 bytes.
pub const INODE_LAYOUT_EXTENDED: u16 = 1;
/// Data layout (bits 1..3 of `i_format`): data in consecutive blocks at `i_u`.
pub const INODE_FLAT_PLAIN: u16 = 0;
/// Data layout: full blocks at `i_u`, tail inline after the inode.
pub const INODE_FLAT_INLINE: u16 = 2;
/// Data layout: chunk indexes follow the inode.
pub const INODE_CHUNK_BASED: u16 = 4;
/// Chunk format flag: 8-byte chunk index entries.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x0020;
/// Chunk format mask: chunk bits minus block bits.
pub const CHUNK_FORMAT_SIZE_MASK: u16 = 0x001F;

/// Default chunk size (1 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 0x10_0000;
/// Smallest accepted chunk size (4 KiB).
pub const MIN_CHUNK_SIZE: u32 = 0x1000;
/// Largest accepted chunk size (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 0x100_0000;
/// Largest number of chunks in one blob (24-bit ci index).
pub const MAX_CHUNKS_PER_BLOB: u32 = 1 << 24;
/// Largest bootstrap size.
pub const MAX_METADATA_SIZE: u64 = 0x8000_0000;
/// Largest uncompressed blob size checked by readers.
pub const BLOB_MAX_SIZE_UNCOMPRESSED: u64 = 1 << 44;
/// Largest compressed blob size checked by readers.
pub const BLOB_MAX_SIZE_COMPRESSED: u64 = 1 << 40;
/// Length of a blob id (hex sha256).
pub const BLOB_ID_LEN: usize = 64;
/// Alignment of `mapped_blkaddr` used by the current upstream builder.
pub const BLOCK_SEG_ALIGNMENT: u64 = 0x8_0000;

/// `RafsSuperFlags` bits (`s_flags` of the extended superblock).
pub mod flags {
    /// Chunks are not compressed.
    pub const COMPRESSION_NONE: u64 = 0x0000_0001;
    /// Chunks are compressed with lz4_block.
    pub const COMPRESSION_LZ4: u64 = 0x0000_0002;
    /// Chunk digests are blake3.
    pub const HASH_BLAKE3: u64 = 0x0000_0004;
    /// Chunk digests are sha256.
    pub const HASH_SHA256: u64 = 0x0000_0008;
    /// Inodes carry explicit uid/gid.
    pub const EXPLICIT_UID_GID: u64 = 0x0000_0010;
    /// Some inode has xattrs.
    pub const HAS_XATTR: u64 = 0x0000_0020;
    /// Chunks are compressed with gzip (ref blobs only).
    pub const COMPRESSION_GZIP: u64 = 0x0000_0040;
    /// Chunks are compressed with zstd.
    pub const COMPRESSION_ZSTD: u64 = 0x0000_0080;
    /// Every blob carries an inlined chunk digest array.
    pub const INLINED_CHUNK_DIGEST: u64 = 0x0000_0100;
    /// tarfs mode.
    pub const TARTFS_MODE: u64 = 0x0000_0200;
    /// No encryption.
    pub const ENCRYPTION_NONE: u64 = 0x0100_0000;
    /// AES-128-XTS encryption.
    pub const ENCRYPTION_AES_128_XTS: u64 = 0x0200_0000;
    /// Reserved compat bits, accepted by readers.
    pub const PRESERVED_COMPAT: u64 = 0xFC00_0000;
    /// Every bit a reader knows.
    pub const KNOWN: u64 = 0x3FF | ENCRYPTION_NONE | ENCRYPTION_AES_128_XTS | PRESERVED_COMPAT;
    /// All compression bits.
    pub const COMPRESSION_MASK: u64 =
        COMPRESSION_NONE | COMPRESSION_LZ4 | COMPRESSION_GZIP | COMPRESSION_ZSTD;
    /// All digest bits.
    pub const HASH_MASK: u64 = HASH_BLAKE3 | HASH_SHA256;
}

/// `BlobFeatures` bits (blob table `features`, ci header `s_features`).
pub mod blob_features {
    /// Uncompressed chunks are 4 KiB aligned.
    pub const ALIGNED: u32 = 0x0000_0001;
    /// The blob embeds its bootstrap.
    pub const INLINED_FS_META: u32 = 0x0000_0002;
    /// ci entries are 24-byte v2.
    pub const CHUNK_INFO_V2: u32 = 0x0000_0004;
    /// gzip random-access contexts present.
    pub const ZRAN: u32 = 0x0000_0008;
    /// Data and meta in different blobs.
    pub const SEPARATE: u32 = 0x0000_0010;
    /// Chunk digest array present.
    pub const INLINED_CHUNK_DIGEST: u32 = 0x0000_0020;
    /// tarfs mode.
    pub const TARFS: u32 = 0x0000_0040;
    /// Batch chunks.
    pub const BATCH: u32 = 0x0000_0080;
    /// Encrypted chunks.
    pub const ENCRYPTED: u32 = 0x0000_0100;
    /// Generated chunk dictionary.
    pub const IS_CHUNKDICT_GENERATED: u32 = 0x0000_0200;
    /// Separated with prefetch files.
    pub const IS_SEPARATED_WITH_PREFETCH_FILES: u32 = 0x0000_0400;
    /// Chunks live in an external store.
    pub const EXTERNAL: u32 = 0x0000_0800;
    /// Sections are followed by tar headers.
    pub const HAS_TAR_HEADER: u32 = 0x1000_0000;
    /// TOC at the tail.
    pub const HAS_TOC: u32 = 0x2000_0000;
    /// Built by a TOC-capable builder (always set by current builders).
    pub const CAP_TAR_TOC: u32 = 0x4000_0000;
    /// Internal bit that must be zero on disk.
    pub const V5_NO_EXT_BLOB_TABLE: u32 = 0x8000_0000;
    /// Bits that must be zero on disk (unknown incompatible features).
    pub const UNKNOWN_INCOMPAT: u32 = 0x0000_F000;
}

/// Compression algorithm numbers used in the blob table and ci header.
pub mod compressor {
    /// Stored as is.
    pub const NONE: u32 = 0;
    /// Raw LZ4 block.
    pub const LZ4_BLOCK: u32 = 1;
    /// gzip.
    pub const GZIP: u32 = 2;
    /// One zstd frame.
    pub const ZSTD: u32 = 3;
}

/// Digest algorithm numbers used in the blob table.
pub mod digester {
    /// blake3-256.
    pub const BLAKE3: u32 = 0;
    /// sha256.
    pub const SHA256: u32 = 1;
}

/// Chunk flags of the chunk-info table (`BlobChunkFlags`).
pub mod chunk_flags {
    /// The stored chunk is compressed.
    pub const COMPRESSED: u32 = 0x1;
    /// Unused hole chunk flag.
    pub const HOLECHUNK: u32 = 0x2;
    /// Encrypted.
    pub const ENCRYPTED: u32 = 0x4;
    /// Part of a batch.
    pub const BATCH: u32 = 0x8;
    /// `crc32` holds the CRC-32C of the uncompressed data.
    pub const HAS_CRC32: u32 = 0x10;
}

/// EROFS directory entry file types.
pub mod file_type {
    /// Unknown.
    pub const UNKNOWN: u8 = 0;
    /// Regular file.
    pub const REG: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHRDEV: u8 = 3;
    /// Block device.
    pub const BLKDEV: u8 = 4;
    /// FIFO.
    pub const FIFO: u8 = 5;
    /// Socket.
    pub const SOCK: u8 = 6;
    /// Symbolic link.
    pub const SYMLINK: u8 = 7;
}

/// EROFS xattr name prefix indexes and the prefixes they stand for.
pub mod xattr_index {
    /// `user.`
    pub const USER: u8 = 1;
    /// `system.posix_acl_access` (whole name)
    pub const POSIX_ACL_ACCESS: u8 = 2;
    /// `system.posix_acl_default` (whole name)
    pub const POSIX_ACL_DEFAULT: u8 = 3;
    /// `trusted.`
    pub const TRUSTED: u8 = 4;
    /// `security.`
    pub const SECURITY: u8 = 6;
    /// (index, prefix) pairs, longest-match-free: each name matches at most one.
    pub const PREFIXES: [(u8, &[u8]); 5] = [
        (USER, b"user."),
        (POSIX_ACL_ACCESS, b"system.posix_acl_access"),
        (POSIX_ACL_DEFAULT, b"system.posix_acl_default"),
        (TRUSTED, b"trusted."),
        (SECURITY, b"security."),
    ];
}
