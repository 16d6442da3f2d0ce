//! Structures of the bootstrap (metadata) file: superblocks, device slots, blob table,
//! inodes, xattrs, dirents, chunk indexes and the chunk-info table.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

macro_rules! ondisk {
    ($(#[$m:meta])* pub struct $name:ident [$size:expr] { $($(#[$fm:meta])* pub $f:ident : $t:ty,)* }) => {
        $(#[$m])*
        #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t,)* }
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        impl Default for $name {
            fn default() -> Self { <$name as zerocopy::FromZeros>::new_zeroed() }
        }
    };
}
pub(crate) use ondisk;

ondisk! {
    /// EROFS superblock, 128 bytes at offset 1024 (spec §3).
    pub struct SuperBlock [128] {
        /// `s_magic`: [`super::EROFS_SUPER_MAGIC`].
        pub magic: U32,
        /// `s_checksum`: 0.
        pub checksum: U32,
        /// `s_feature_compat`.
        pub feature_compat: U32,
        /// `s_blkszbits`: 12 (9 for tarfs).
        pub blkszbits: u8,
        /// `s_extslots`: 0.
        pub extslots: u8,
        /// `s_root_nid`.
        pub root_nid: U16,
        /// `s_inos`: number of inodes.
        pub inos: U64,
        /// `s_build_time`.
        pub build_time: U64,
        /// `s_build_time_nsec`.
        pub build_time_nsec: U32,
        /// `s_blocks`: sum of blob blocks.
        pub blocks: U32,
        /// `s_meta_blkaddr`.
        pub meta_blkaddr: U32,
        /// `s_xattr_blkaddr`: 0.
        pub xattr_blkaddr: U32,
        /// `s_uuid`.
        pub uuid: [u8; 16],
        /// `s_volume_name`.
        pub volume_name: [u8; 16],
        /// `s_feature_incompat`.
        pub feature_incompat: U32,
        /// `s_u`: 0.
        pub u: U16,
        /// `s_extra_devices`: number of blobs.
        pub extra_devices: U16,
        /// `s_devt_slotoff`: 11.
        pub devt_slotoff: U16,
        /// `s_reserved`.
        pub reserved: [u8; 38],
    }
}

ondisk! {
    /// RAFS v6 extended superblock, 256 bytes at offset 1152 (spec §4).
    pub struct SuperBlockExt [256] {
        /// `s_flags`: see [`super::flags`].
        pub flags: U64,
        /// `s_blob_table_offset`.
        pub blob_table_offset: U64,
        /// `s_blob_table_size`.
        pub blob_table_size: U32,
        /// `s_chunk_size`.
        pub chunk_size: U32,
        /// `s_chunk_table_offset`.
        pub chunk_table_offset: U64,
        /// `s_chunk_table_size`.
        pub chunk_table_size: U64,
        /// `s_prefetch_table_offset`.
        pub prefetch_table_offset: U64,
        /// `s_prefetch_table_size`.
        pub prefetch_table_size: U32,
        /// `s_padding`.
        pub padding: U32,
        /// `s_reserved`.
        pub reserved: [u8; 200],
    }
}

ondisk! {
    /// Device table slot, 128 bytes (spec §5).
    pub struct DeviceSlot [128] {
        /// Blob id as 64 ASCII hex characters.
        pub blob_id: [u8; 64],
        /// `uncompressed_size / 4096`.
        pub blocks: U32,
        /// Block address in a flattened disk image.
        pub mapped_blkaddr: U32,
        /// Zeros.
        pub reserved: [u8; 56],
    }
}

ondisk! {
    /// Blob table entry, 256 bytes (spec §6).
    pub struct BlobTableEntry [256] {
        /// Blob id as 64 ASCII hex characters.
        pub blob_id: [u8; 64],
        /// Position in the table.
        pub blob_index: U32,
        /// Chunk size, equal to `s_chunk_size`.
        pub chunk_size: U32,
        /// Number of ci entries.
        pub chunk_count: U32,
        /// Chunk compressor, see [`super::compressor`].
        pub compression_algo: U32,
        /// Chunk digester, see [`super::digester`].
        pub digest_algo: U32,
        /// See [`super::blob_features`].
        pub features: U32,
        /// Blob file size as known by the builder.
        pub compressed_size: U64,
        /// Size of the 4 KiB-aligned uncompressed space.
        pub uncompressed_size: U64,
        /// TOC bytes plus its tar header; 0 if none.
        pub blob_toc_size: U32,
        /// Compressor of the ci array.
        pub ci_compressor: U32,
        /// Offset of the ci array in the blob.
        pub ci_offset: U64,
        /// Stored size of the ci array.
        pub ci_compressed_size: U64,
        /// Decompressed size of the ci array.
        pub ci_uncompressed_size: U64,
        /// sha256 of TOC entries and TOC tar header; zero if unknown.
        pub blob_toc_digest: [u8; 32],
        /// Digest of a separate meta blob (or AES key).
        pub blob_meta_digest: [u8; 32],
        /// Size of a separate meta blob (or IV bytes 0..8).
        pub blob_meta_size: U64,
        /// IV bytes 8..16.
        pub cipher_iv: [u8; 8],
        /// Cipher algorithm; 0 = none.
        pub cipher_algo: U32,
        /// Zeros.
        pub reserved2: [u8; 36],
    }
}

ondisk! {
    /// Compact inode, 32 bytes (spec §8.1).
    pub struct InodeCompact [32] {
        /// `i_format`.
        pub format: U16,
        /// `i_xattr_icount`.
        pub xattr_icount: U16,
        /// `i_mode`.
        pub mode: U16,
        /// `i_nlink`.
        pub nlink: U16,
        /// `i_size`.
        pub size: U32,
        /// Reserved.
        pub reserved: U32,
        /// `i_u`: raw blkaddr, rdev or chunk format.
        pub u: U32,
        /// `i_ino`.
        pub ino: U32,
        /// `i_uid`.
        pub uid: U16,
        /// `i_gid`.
        pub gid: U16,
        /// Reserved.
        pub reserved2: U32,
    }
}

ondisk! {
    /// Extended inode, 64 bytes (spec §8.2).
    pub struct InodeExtended [64] {
        /// `i_format`.
        pub format: U16,
        /// `i_xattr_icount`.
        pub xattr_icount: U16,
        /// `i_mode`.
        pub mode: U16,
        /// Reserved.
        pub reserved: U16,
        /// `i_size`.
        pub size: U64,
        /// `i_u`: raw blkaddr, rdev or chunk format.
        pub u: U32,
        /// `i_ino`.
        pub ino: U32,
        /// `i_uid`.
        pub uid: U32,
        /// `i_gid`.
        pub gid: U32,
        /// `i_mtime` (seconds).
        pub mtime: U64,
        /// `i_mtime_nsec`.
        pub mtime_nsec: U32,
        /// `i_nlink`.
        pub nlink: U32,
        /// Reserved.
        pub reserved2: [u8; 16],
    }
}

ondisk! {
    /// Inline xattr body header, 12 bytes (spec §9).
    pub struct XattrIbodyHeader [12] {
        /// Reserved (0).
        pub reserved: U32,
        /// Number of shared xattrs (0).
        pub shared_count: u8,
        /// Reserved.
        pub reserved2: [u8; 7],
    }
}

ondisk! {
    /// Xattr entry header, 4 bytes, followed by the name suffix and the value (spec §9).
    pub struct XattrEntry [4] {
        /// Length of the name suffix.
        pub name_len: u8,
        /// Prefix index, see [`super::xattr_index`].
        pub name_index: u8,
        /// Length of the value.
        pub value_size: U16,
    }
}

ondisk! {
    /// Directory entry, 12 bytes (spec §10).
    pub struct Dirent [12] {
        /// Target nid.
        pub nid: U64,
        /// Offset of the name inside this block.
        pub nameoff: U16,
        /// See [`super::file_type`].
        pub file_type: u8,
        /// Reserved (0).
        pub reserved: u8,
    }
}

ondisk! {
    /// Chunk index entry of a chunk-based inode, 8 bytes (spec §11).
    pub struct ChunkIndex [8] {
        /// Bits 0..16 of the ci index.
        pub ci_lo: U16,
        /// Low byte: blob index + 1; high byte: ci index bits 16..24.
        pub blob_ci_hi: U16,
        /// Uncompressed offset in the blob, in blocks.
        pub blk_addr: U32,
    }
}

ondisk! {
    /// Chunk-info table record (`RafsV5ChunkInfo`), 80 bytes (spec §12).
    pub struct ChunkInfoRecord [80] {
        /// Chunk digest of the uncompressed data.
        pub digest: [u8; 32],
        /// Blob index (0-based).
        pub blob_index: U32,
        /// See [`super::chunk_flags`].
        pub flags: U32,
        /// Stored size.
        pub compressed_size: U32,
        /// Uncompressed size.
        pub uncompressed_size: U32,
        /// Offset in the blob file.
        pub compressed_offset: U64,
        /// Offset in the uncompressed space (4 KiB aligned).
        pub uncompressed_offset: U64,
        /// Offset in the first file that produced the chunk.
        pub file_offset: U64,
        /// ci index in the blob.
        pub index: U32,
        /// CRC-32C when `HAS_CRC32`.
        pub crc32: U32,
    }
}
