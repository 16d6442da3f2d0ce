//! An opened bootstrap: inodes, directories, symlinks, xattrs and chunk maps, decoded from
//! the bytes on demand (nothing is decoded up front beyond the superblock and blob table).

use super::source::Data;
use super::superblock::{self, read_struct, SuperInfo};
use crate::error::{Error, Result};
use crate::format::*;
use crate::types::{BlobInfo, ChunkInfo};
use std::path::Path;
use std::sync::OnceLock;
use zerocopy::FromBytes;

/// `(blob_index, ci_index, chunk table record)`, sorted: the lookup index of the chunk table.
/// No chunk-table record for a ci index (see [`ChunkTableIndex`]).
const NO_RECORD: u32 = u32::MAX;

/// The chunk table by `(blob index, ci index)`: per blob, the record of each ci index
/// (the first one when several claim it), and the first such duplicate, if any.
struct ChunkTableIndex {
    records: Vec<Vec<u32>>,
    duplicate: Option<String>,
}

/// The largest bootstrap [`Bootstrap::open`] reads (4 GiB; a 100k-file image's is 19 MiB).
pub const MAX_BOOTSTRAP_SIZE: u64 = 4 << 30;

/// An opened, validated bootstrap.
pub struct Bootstrap {
    data: Data,
    sb: SuperInfo,
    blobs: Vec<BlobInfo>,
    chunk_index: OnceLock<Result<ChunkTableIndex, String>>,
}

/// A decoded inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Node id (also the inode number nydusd exposes).
    pub nid: u64,
    /// Byte offset of the inode in the bootstrap.
    pub offset: u64,
    /// Whether the inode is the 64-byte extended form.
    pub extended: bool,
    /// Data layout (`INODE_FLAT_PLAIN`, `INODE_FLAT_INLINE`, `INODE_CHUNK_BASED`).
    pub layout: u16,
    /// `st_mode`.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (0 for compact inodes).
    pub mtime: u64,
    /// Nanoseconds of `mtime`.
    pub mtime_nsec: u32,
    /// `i_ino` as written by the builder.
    pub ino: u32,
    /// Raw `i_u`.
    pub u: u32,
    /// Bytes of the inline xattr area (0 if none).
    pub xattr_size: u64,
}

/// `S_IFMT` mask.
pub const S_IFMT: u32 = 0o170000;

impl Inode {
    /// File type bits of the mode.
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type() == 0o040000
    }
    /// Whether this is a regular file.
    pub fn is_reg(&self) -> bool {
        self.file_type() == 0o100000
    }
    /// Whether this is a symlink.
    pub fn is_symlink(&self) -> bool {
        self.file_type() == 0o120000
    }
    /// Whether this is a character or block device.
    pub fn is_device(&self) -> bool {
        matches!(self.file_type(), 0o020000 | 0o060000)
    }
    /// Device number as glibc `makedev` (for device nodes).
    pub fn rdev(&self) -> u64 {
        decode_rdev(self.u)
    }
    fn header_size(&self) -> u64 {
        (if self.extended { 64 } else { 32 }) + self.xattr_size
    }
}

/// Decodes Linux `new_encode_dev` (`i_u` of device inodes) into glibc `makedev` form.
pub fn decode_rdev(u: u32) -> u64 {
    let u = u as u64;
    let major = (u & 0xfff00) >> 8;
    let minor = (u & 0xff) | ((u >> 12) & 0xfff00);
    ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff)
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Raw name bytes.
    pub name: Vec<u8>,
    /// Target nid.
    pub nid: u64,
    /// EROFS file type.
    pub file_type: u8,
}

/// A validated directory block: `count` dirents followed by their names.
struct DirBlock<'a> {
    block: &'a [u8],
    count: usize,
}

impl DirBlock<'_> {
    fn dirent(&self, k: usize) -> Dirent {
        Dirent::read_from_prefix(&self.block[k * 12..])
            .expect("validated")
            .0
    }
    /// Byte range of name `k` (not yet validated when called from `dir_block`).
    fn name_range(&self, k: usize) -> (usize, usize) {
        let start = self.dirent(k).nameoff.get() as usize;
        let end = if k + 1 < self.count {
            self.dirent(k + 1).nameoff.get() as usize
        } else {
            let rest = self.block.get(start..).unwrap_or_default();
            start + rest.iter().position(|c| *c == 0).unwrap_or(rest.len())
        };
        (start, end)
    }
    fn name(&self, k: usize) -> &[u8] {
        let (start, end) = self.name_range(k);
        &self.block[start..end]
    }
    fn entry(&self, k: usize) -> DirEntry {
        let d = self.dirent(k);
        DirEntry {
            name: self.name(k).to_vec(),
            nid: d.nid.get(),
            file_type: d.file_type,
        }
    }
}

/// Where one chunk of a file lives: the bootstrap's view (chunk index entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkAddr {
    /// Blob table index.
    pub blob_index: u32,
    /// ci index in that blob.
    pub ci_index: u32,
    /// Offset in the blob's uncompressed space.
    pub uncompressed_offset: u64,
}

/// A piece of a read request that falls into one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSlice {
    /// The chunk.
    pub chunk: ChunkAddr,
    /// Index of the chunk in the file.
    pub file_chunk: u64,
    /// Offset of the requested bytes inside the chunk's uncompressed data.
    pub offset: u32,
    /// Number of requested bytes in this chunk.
    pub len: u32,
}

/// Reason text for a corrupt field in an inode.
fn inode_err(nid: u64, what: impl Into<String>) -> Error {
    Error::invalid(format!("inode {nid}"), what.into())
}

impl Bootstrap {
    /// Validates and opens a bootstrap held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::from_data(Data::Owned(bytes))
    }

    /// Validates and opens bootstrap bytes, owned or mapped.
    pub fn from_data(data: Data) -> Result<Self> {
        let (sb, blobs) = superblock::parse(&data)?;
        let bs = Bootstrap {
            data,
            sb,
            blobs,
            chunk_index: OnceLock::new(),
        };
        let root = bs.root()?;
        if !root.is_dir() {
            return Err(Error::invalid(
                "superblock.s_root_nid",
                "root inode is not a directory",
            ));
        }
        Ok(bs)
    }

    /// Reads and opens the bootstrap at `path`.
    ///
    /// Only a regular file of at most [`MAX_BOOTSTRAP_SIZE`] bytes is read: a FIFO or a
    /// device (`/dev/zero`) is refused at once instead of blocking or reading forever.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = path.as_ref();
        let what = || format!("Reading bootstrap {}", path.display());
        // Non-blocking: opening a FIFO without a writer would wait for one.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(what(), e))?;
        let md = f.metadata().map_err(|e| Error::io(what(), e))?;
        if !md.is_file() {
            return Err(Error::invalid(
                format!("bootstrap {}", path.display()),
                "is not a regular file",
            ));
        }
        if md.len() > MAX_BOOTSTRAP_SIZE {
            return Err(Error::invalid(
                format!("bootstrap {}", path.display()),
                format!(
                    "{} bytes is more than the {MAX_BOOTSTRAP_SIZE} a bootstrap may have",
                    md.len()
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(md.len() as usize);
        f.take(md.len())
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(what(), e))?;
        Self::from_bytes(bytes)
    }

    /// Raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Validated superblock values.
    pub fn superblock(&self) -> &SuperInfo {
        &self.sb
    }

    /// The blob table.
    pub fn blobs(&self) -> &[BlobInfo] {
        &self.blobs
    }

    /// The root directory inode.
    pub fn root(&self) -> Result<Inode> {
        self.inode(self.sb.root_nid)
    }

    /// Decodes the inode `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode> {
        let len = self.data.len() as u64;
        let offset = nid
            .checked_mul(INODE_SLOT_SIZE)
            .and_then(|o| o.checked_add(self.sb.meta_addr))
            .filter(|o| *o + 32 <= len)
            .ok_or_else(|| inode_err(nid, "nid points outside the bootstrap"))?;
        let compact: InodeCompact = read_struct(&self.data, offset, "inode")?;
        let format = compact.format.get();
        if format & !0x000F != 0 {
            return Err(inode_err(
                nid,
                format!("i_format {format:#x} has unknown bits"),
            ));
        }
        let layout = (format >> 1) & 0x7;
        if ![INODE_FLAT_PLAIN, INODE_FLAT_INLINE, INODE_CHUNK_BASED].contains(&layout) {
            return Err(inode_err(
                nid,
                format!("data layout {layout} is not supported"),
            ));
        }
        let extended = format & 1 == INODE_LAYOUT_EXTENDED;
        let mut inode = if extended {
            let e: InodeExtended = read_struct(&self.data, offset, "extended inode")?;
            Inode {
                nid,
                offset,
                extended,
                layout,
                mode: e.mode.get() as u32,
                nlink: e.nlink.get(),
                size: e.size.get(),
                uid: e.uid.get(),
                gid: e.gid.get(),
                mtime: e.mtime.get(),
                mtime_nsec: e.mtime_nsec.get(),
                ino: e.ino.get(),
                u: e.u.get(),
                xattr_size: 0,
            }
        } else {
            Inode {
                nid,
                offset,
                extended,
                layout,
                mode: compact.mode.get() as u32,
                nlink: compact.nlink.get() as u32,
                size: compact.size.get() as u64,
                uid: compact.uid.get() as u32,
                gid: compact.gid.get() as u32,
                mtime: 0,
                mtime_nsec: 0,
                ino: compact.ino.get(),
                u: compact.u.get(),
                xattr_size: 0,
            }
        };
        let icount = compact.xattr_icount.get() as u64;
        if icount > 0 {
            inode.xattr_size = 12 + (icount - 1) * 4;
        }
        if !self.sb.has_flag(flags::EXPLICIT_UID_GID) {
            inode.uid = 0;
            inode.gid = 0;
        }
        if offset + inode.header_size() > len {
            return Err(inode_err(
                nid,
                "inode and xattrs extend past the end of the bootstrap",
            ));
        }
        let ty = inode.file_type();
        let ok_type = matches!(
            ty,
            0o040000 | 0o100000 | 0o120000 | 0o020000 | 0o060000 | 0o010000 | 0o140000
        );
        if !ok_type {
            return Err(inode_err(
                nid,
                format!("mode {:#o} has an unknown file type", inode.mode),
            ));
        }
        if inode.is_reg() && layout != INODE_CHUNK_BASED {
            return Err(inode_err(nid, "regular file is not chunk-based"));
        }
        if !inode.is_reg() && layout == INODE_CHUNK_BASED {
            return Err(inode_err(nid, "only regular files may be chunk-based"));
        }
        if inode.is_reg() {
            let fmt = inode.u as u16;
            if fmt & CHUNK_FORMAT_INDEXES == 0 || inode.u >> 16 != 0 {
                return Err(inode_err(
                    nid,
                    format!("chunk format {:#x} lacks 8-byte indexes", inode.u),
                ));
            }
            let n = inode.size.div_ceil(self.sb.chunk_size as u64);
            let end = self.chunk_index_offset(&inode).checked_add(n * 8);
            if end.is_none_or(|e| e > len) {
                return Err(inode_err(
                    nid,
                    "chunk indexes extend past the end of the bootstrap",
                ));
            }
        }
        if inode.is_dir() || inode.is_symlink() {
            self.check_data_range(&inode)?;
        }
        Ok(inode)
    }

    fn check_data_range(&self, inode: &Inode) -> Result<()> {
        let b = self.sb.block_size;
        let len = self.data.len() as u64;
        let (full, tail) = match inode.layout {
            INODE_FLAT_INLINE => (inode.size / b * b, inode.size % b),
            _ => (inode.size.next_multiple_of(b), 0),
        };
        let start = inode.u as u64 * b;
        if full > 0 && start.checked_add(full).is_none_or(|e| e > len) {
            return Err(inode_err(
                inode.nid,
                format!("data blocks at block {} extend past the bootstrap", inode.u),
            ));
        }
        if tail > 0 {
            let at = inode.offset + inode.header_size();
            if at % b + tail > b || at + tail > len {
                return Err(inode_err(inode.nid, "inline data crosses a block boundary"));
            }
        }
        Ok(())
    }

    /// The `i`-th data block of a directory or symlink (the last may be short).
    fn data_block(&self, inode: &Inode, i: u64) -> &[u8] {
        let b = self.sb.block_size;
        let nblocks = inode.size.div_ceil(b);
        let len = if i + 1 == nblocks && inode.size % b != 0 {
            inode.size % b
        } else {
            b
        };
        let start = if inode.layout == INODE_FLAT_INLINE && i + 1 == nblocks && inode.size % b != 0
        {
            inode.offset + inode.header_size()
        } else {
            (inode.u as u64 + i) * b
        };
        &self.data[start as usize..(start + len) as usize]
    }

    /// Target of a symlink.
    pub fn readlink(&self, inode: &Inode) -> Result<Vec<u8>> {
        if !inode.is_symlink() {
            return Err(inode_err(inode.nid, "not a symlink"));
        }
        if inode.size > crate::format::SYMLINK_MAX as u64 || inode.size == 0 {
            return Err(inode_err(
                inode.nid,
                format!("symlink target of {} bytes", inode.size),
            ));
        }
        let b = self.sb.block_size;
        let mut out = Vec::with_capacity(inode.size as usize);
        for i in 0..inode.size.div_ceil(b) {
            out.extend_from_slice(self.data_block(inode, i));
        }
        Ok(out)
    }

    /// Entries of one directory block, validated.
    /// A validated view of directory block `i`: entry `k` is `(name, nid, file type)`.
    fn dir_block(&self, dir: &Inode, i: u64) -> Result<DirBlock<'_>> {
        let block = self.data_block(dir, i);
        let bad = |what: &str| inode_err(dir.nid, format!("directory block {i}: {what}"));
        let first: Dirent = read_struct(block, 0, "dirent").map_err(|_| bad("too short"))?;
        let nameoff0 = first.nameoff.get() as usize;
        if nameoff0 < 12 || nameoff0 % 12 != 0 || nameoff0 >= block.len() {
            return Err(bad("invalid first name offset"));
        }
        let view = DirBlock {
            block,
            count: nameoff0 / 12,
        };
        // Validate every name range once, so accessors cannot go out of bounds.
        let mut prev_end = nameoff0;
        for k in 0..view.count {
            let (start, end) = view.name_range(k);
            if start != prev_end || end <= start || end > block.len() || end - start > 255 {
                return Err(bad("invalid name offset"));
            }
            prev_end = end;
        }
        Ok(view)
    }

    fn block_entries(&self, dir: &Inode, i: u64) -> Result<Vec<DirEntry>> {
        let view = self.dir_block(dir, i)?;
        Ok((0..view.count).map(|k| view.entry(k)).collect())
    }

    /// All entries of a directory, including `.` and `..`, in on-disk (sorted) order.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        if !dir.is_dir() {
            return Err(inode_err(dir.nid, "not a directory"));
        }
        let mut out = Vec::new();
        for i in 0..dir.size.div_ceil(self.sb.block_size) {
            out.extend(self.block_entries(dir, i)?);
        }
        Ok(out)
    }

    /// Looks up `name` in a directory by binary search over blocks, then within the block.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        if !dir.is_dir() {
            return Err(inode_err(dir.nid, "not a directory"));
        }
        let (mut lo, mut hi) = (0u64, dir.size.div_ceil(self.sb.block_size));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let view = self.dir_block(dir, mid)?;
            if name < view.name(0) {
                hi = mid;
            } else if name > view.name(view.count - 1) {
                lo = mid + 1;
            } else {
                let (mut a, mut b) = (0, view.count);
                while a < b {
                    let m = a + (b - a) / 2;
                    match view.name(m).cmp(name) {
                        std::cmp::Ordering::Less => a = m + 1,
                        std::cmp::Ordering::Greater => b = m,
                        std::cmp::Ordering::Equal => return Ok(Some(view.entry(m))),
                    }
                }
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Resolves an absolute or relative path from the root (symlinks are not followed).
    pub fn lookup_path(&self, path: impl AsRef<[u8]>) -> Result<Inode> {
        let path = path.as_ref();
        let mut cur = self.root()?;
        for part in path
            .split(|c| *c == b'/')
            .filter(|p| !p.is_empty() && *p != b".")
        {
            let shown = || String::from_utf8_lossy(path).into_owned();
            if !cur.is_dir() {
                return Err(Error::NotFound(shown()));
            }
            let e = self
                .lookup(&cur, part)?
                .ok_or_else(|| Error::NotFound(shown()))?;
            cur = self.inode(e.nid)?;
        }
        Ok(cur)
    }

    /// Extended attributes as (full name, value), in on-disk order.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        if inode.xattr_size == 0 {
            return Ok(out);
        }
        let base = inode.offset + if inode.extended { 64 } else { 32 };
        let area = &self.data[base as usize..(base + inode.xattr_size) as usize];
        let hdr: XattrIbodyHeader = read_struct(area, 0, "xattr header")?;
        if hdr.shared_count != 0 {
            return Err(inode_err(inode.nid, "shared xattrs are not supported"));
        }
        let mut pos = 12usize;
        while pos + 4 <= area.len() {
            let e: XattrEntry = read_struct(area, pos as u64, "xattr entry")?;
            let (nlen, vlen) = (e.name_len as usize, e.value_size.get() as usize);
            let end = pos + 4 + nlen + vlen;
            if end > area.len() {
                return Err(inode_err(
                    inode.nid,
                    "xattr entry extends past the xattr area",
                ));
            }
            let prefix = xattr_index::PREFIXES
                .iter()
                .find(|(i, _)| *i == e.name_index)
                .map(|(_, p)| *p)
                .ok_or_else(|| {
                    inode_err(
                        inode.nid,
                        format!("unknown xattr prefix index {}", e.name_index),
                    )
                })?;
            let mut name = prefix.to_vec();
            name.extend_from_slice(&area[pos + 4..pos + 4 + nlen]);
            out.push((name, area[pos + 4 + nlen..end].to_vec()));
            pos = end.next_multiple_of(4);
        }
        Ok(out)
    }

    /// One extended attribute by full name.
    pub fn get_xattr(&self, inode: &Inode, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .xattrs(inode)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v))
    }

    fn chunk_index_offset(&self, inode: &Inode) -> u64 {
        (inode.offset + inode.header_size()).next_multiple_of(8)
    }

    /// Number of chunks of a regular file.
    pub fn chunk_count(&self, inode: &Inode) -> u64 {
        inode.size.div_ceil(self.sb.chunk_size as u64)
    }

    /// The chunk size the kernel's EROFS driver uses for regular file `inode`: its chunk
    /// format's (`block size << (i_u & 0x1F)`). Builders may make it one chunk spanning
    /// the whole file when its chunks are contiguous in one blob (spec §11); then the
    /// kernel reads only the first chunk index. This reader always uses the superblock's
    /// chunk size, so the two agree only when that layout claim is true: see
    /// [`Bootstrap::kernel_maps_like_chunk_indexes`].
    pub fn kernel_chunk_size(&self, inode: &Inode) -> u64 {
        self.sb.block_size << (inode.u & 0x1F)
    }

    /// Whether the kernel's EROFS driver, mounting this bootstrap with the blobs'
    /// uncompressed data as its devices, maps every byte of regular file `inode` where
    /// the chunk indexes (what this reader serves) say. False for a chunk format smaller
    /// than the superblock's chunk size, or a larger one whose chunks are not in fact
    /// contiguous in one blob.
    pub fn kernel_maps_like_chunk_indexes(&self, inode: &Inode) -> Result<bool> {
        let cs = self.sb.chunk_size as u64;
        let k = self.kernel_chunk_size(inode);
        if k == cs {
            return Ok(true);
        }
        if k < cs {
            return Ok(false);
        }
        for i in 0..self.chunk_count(inode) {
            // Chunk sizes are powers of two: a kernel chunk holds whole fs chunks.
            let j = i * cs / k;
            let (ours, kernels) = (self.chunk(inode, i)?, self.chunk(inode, j)?);
            let at = kernels.uncompressed_offset + (i * cs - j * k);
            if ours.blob_index != kernels.blob_index || ours.uncompressed_offset != at {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The `i`-th chunk of a regular file.
    pub fn chunk(&self, inode: &Inode, i: u64) -> Result<ChunkAddr> {
        if !inode.is_reg() || i >= self.chunk_count(inode) {
            return Err(inode_err(inode.nid, format!("no chunk {i}")));
        }
        let idx: ChunkIndex = read_struct(
            &self.data,
            self.chunk_index_offset(inode) + 8 * i,
            "chunk index",
        )?;
        let hi = idx.blob_ci_hi.get();
        let dev = (hi & 0xFF) as u32;
        if dev == 0 || dev as usize > self.blobs.len() {
            return Err(inode_err(
                inode.nid,
                format!("chunk {i} refers to device {dev} of {}", self.blobs.len()),
            ));
        }
        let blob = &self.blobs[dev as usize - 1];
        let ci_index = ((hi as u32 >> 8) << 16) | idx.ci_lo.get() as u32;
        if ci_index >= blob.chunk_count {
            return Err(inode_err(
                inode.nid,
                format!(
                    "chunk {i} has ci index {ci_index} beyond {}",
                    blob.chunk_count
                ),
            ));
        }
        let uncompressed_offset = idx.blk_addr.get() as u64 * self.sb.block_size;
        if uncompressed_offset >= blob.uncompressed_size {
            return Err(inode_err(
                inode.nid,
                format!("chunk {i} lies beyond its blob's uncompressed size"),
            ));
        }
        Ok(ChunkAddr {
            blob_index: dev - 1,
            ci_index,
            uncompressed_offset,
        })
    }

    /// The chunk-table record of the `i`-th chunk of a regular file, checked against the
    /// file: it must exist, sit at the chunk index's offset, and hold exactly the bytes the
    /// file's size implies for chunk `i` (full chunk size, or the remainder for the last).
    /// Use this, not [`Self::chunk_info`], whenever file data is served.
    pub fn file_chunk(&self, inode: &Inode, i: u64) -> Result<ChunkInfo> {
        let addr = self.chunk(inode, i)?;
        let info = self.chunk_info(&addr)?.ok_or_else(|| {
            inode_err(
                inode.nid,
                format!(
                    "chunk {i} (blob {}, ci {}) is missing from the chunk table",
                    addr.blob_index, addr.ci_index
                ),
            )
        })?;
        let cs = self.sb.chunk_size as u64;
        let expected = (inode.size - i * cs).min(cs);
        if info.uncompressed_size as u64 != expected {
            return Err(inode_err(
                inode.nid,
                format!(
                    "chunk {i} holds {} bytes but the file size implies {expected}",
                    info.uncompressed_size
                ),
            ));
        }
        Ok(info)
    }

    /// Splits the byte range `offset..offset+len` of a regular file (clamped to its size)
    /// into per-chunk slices.
    pub fn map_range(&self, inode: &Inode, offset: u64, len: u64) -> Result<Vec<ChunkSlice>> {
        let cs = self.sb.chunk_size as u64;
        let end = offset.saturating_add(len).min(inode.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let in_chunk = pos % cs;
            let n = (cs - in_chunk).min(end - pos);
            out.push(ChunkSlice {
                chunk: self.chunk(inode, i)?,
                file_chunk: i,
                offset: in_chunk as u32,
                len: n as u32,
            });
            pos += n;
        }
        Ok(out)
    }

    /// The prefetch table: nids in order.
    pub fn prefetch_table(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for i in 0..self.sb.prefetch_table_size as u64 / 4 {
            let at = (self.sb.prefetch_table_offset + 4 * i) as usize;
            let nid = u32::from_le_bytes(self.data[at..at + 4].try_into().expect("4 bytes")) as u64;
            if nid == 0 {
                break;
            }
            out.push(nid);
        }
        Ok(out)
    }

    /// Number of chunk-info table records.
    pub fn chunk_table_len(&self) -> usize {
        (self.sb.chunk_table_size / 80) as usize
    }

    /// Record `i` of the chunk-info table, validated against the blob table.
    pub fn chunk_record(&self, i: usize) -> Result<ChunkInfo> {
        let field = format!("chunk table record {i}");
        let r: ChunkInfoRecord = read_struct(
            &self.data,
            self.sb.chunk_table_offset + i as u64 * 80,
            &field,
        )?;
        let bad = |what: String| Error::invalid(field.clone(), what);
        let blob_index = r.blob_index.get();
        let blob = self
            .blobs
            .get(blob_index as usize)
            .ok_or_else(|| bad(format!("blob index {blob_index} out of range")))?;
        let c = ChunkInfo {
            digest: r.digest,
            blob_index,
            ci_index: r.index.get(),
            compressed_offset: r.compressed_offset.get(),
            compressed_size: r.compressed_size.get(),
            uncompressed_offset: r.uncompressed_offset.get(),
            uncompressed_size: r.uncompressed_size.get(),
            compressed: r.flags.get() & chunk_flags::COMPRESSED != 0,
            file_offset: r.file_offset.get(),
        };
        let flags = r.flags.get();
        if flags & !(chunk_flags::COMPRESSED | chunk_flags::HAS_CRC32) != 0 {
            return Err(bad(format!("unsupported chunk flags {flags:#x}")));
        }
        if c.ci_index >= blob.chunk_count {
            return Err(bad(format!(
                "ci index {} beyond {} chunks",
                c.ci_index, blob.chunk_count
            )));
        }
        if c.uncompressed_size == 0
            || c.uncompressed_size > self.sb.chunk_size
            || c.compressed_size == 0
        {
            return Err(bad(format!(
                "chunk sizes {}/{} invalid",
                c.compressed_size, c.uncompressed_size
            )));
        }
        if c.compressed != (c.compressed_size != c.uncompressed_size) && !c.compressed {
            return Err(bad(
                "stored size differs from uncompressed size but chunk is not compressed".into(),
            ));
        }
        if c.uncompressed_offset % BLOCK_SIZE != 0
            || c.uncompressed_offset
                .checked_add(c.uncompressed_size as u64)
                .is_none_or(|end| end > blob.uncompressed_size)
        {
            return Err(bad(format!(
                "uncompressed range {}+{} invalid",
                c.uncompressed_offset, c.uncompressed_size
            )));
        }
        if c.compressed_offset
            .checked_add(c.compressed_size as u64)
            .is_none_or(|end| end > BLOB_MAX_SIZE_COMPRESSED)
        {
            return Err(bad("compressed range beyond 2^40".into()));
        }
        Ok(c)
    }

    /// The chunk index, built on first use (one pass over the chunk table).
    fn chunk_index(&self) -> Result<&ChunkTableIndex> {
        self.chunk_index
            .get_or_init(|| {
                let mut records: Vec<Vec<u32>> = self
                    .blobs
                    .iter()
                    .map(|b| vec![NO_RECORD; b.chunk_count as usize])
                    .collect();
                let mut duplicate = None;
                for i in 0..self.chunk_table_len() {
                    let c = self.chunk_record(i).map_err(|e| e.to_string())?;
                    // `chunk_record` checked both indexes against the blob table.
                    let slot = &mut records[c.blob_index as usize][c.ci_index as usize];
                    if *slot == NO_RECORD {
                        *slot = i as u32;
                    } else if duplicate.is_none() {
                        duplicate = Some(format!(
                            "chunk table record {i} duplicates record {} for chunk {} of blob {}",
                            *slot, c.ci_index, c.blob_index
                        ));
                    }
                }
                Ok(ChunkTableIndex { records, duplicate })
            })
            .as_ref()
            .map_err(|e| Error::invalid("chunk table", e.clone()))
    }

    /// Fails when two chunk-table records claim one chunk (which one holds its digest
    /// would be ambiguous); [`Self::chunk_info`] takes the first.
    pub fn check_unique_chunks(&self) -> Result<()> {
        match &self.chunk_index()?.duplicate {
            Some(d) => Err(Error::invalid("chunk table", d.clone())),
            None => Ok(()),
        }
    }

    /// The chunk-info record of chunk `ci_index` of blob `blob_index`, or `None` if the
    /// table lacks it (or the blob index is out of range).
    pub fn chunk_by_ci(&self, blob_index: u32, ci_index: u32) -> Result<Option<ChunkInfo>> {
        let index = self.chunk_index()?;
        match index
            .records
            .get(blob_index as usize)
            .and_then(|r| r.get(ci_index as usize))
        {
            Some(&i) if i != NO_RECORD => self.chunk_record(i as usize).map(Some),
            _ => Ok(None),
        }
    }

    /// The chunk-info record of `(blob_index, ci_index)`, or `None` if the table lacks it;
    /// an error when the record's uncompressed offset differs from the chunk index's.
    pub fn chunk_info(&self, addr: &ChunkAddr) -> Result<Option<ChunkInfo>> {
        let Some(info) = self.chunk_by_ci(addr.blob_index, addr.ci_index)? else {
            return Ok(None);
        };
        if info.uncompressed_offset != addr.uncompressed_offset {
            return Err(Error::invalid(
                format!(
                    "chunk table record of chunk {} of blob {}",
                    addr.ci_index, addr.blob_index
                ),
                format!(
                    "uncompressed offset {} differs from the chunk index's {}",
                    info.uncompressed_offset, addr.uncompressed_offset
                ),
            ));
        }
        Ok(Some(info))
    }

    /// Visits every entry below the root depth first, in pre-order: each entry, and for a
    /// directory everything below it, before its next sibling; siblings in name order.
    /// Calls `f(path, entry, inode)` with `path` absolute; `.` and `..` are skipped. A
    /// directory reached twice (a loop or a directory hard link in a corrupt image) is an
    /// error, so the walk always ends.
    pub fn walk(&self, mut f: impl FnMut(&[u8], &DirEntry, &Inode) -> Result<()>) -> Result<()> {
        let root = self.root()?;
        let mut seen_dirs = std::collections::HashSet::new();
        seen_dirs.insert(root.nid);
        // Each level: the directory's path and its remaining entries, reversed so that
        // `pop` yields them in name order.
        let mut stack: Vec<(Vec<u8>, Vec<DirEntry>)> = vec![(Vec::new(), self.children(&root)?)];
        while let Some((path, entries)) = stack.last_mut() {
            let Some(e) = entries.pop() else {
                stack.pop();
                continue;
            };
            let mut child = path.clone();
            child.push(b'/');
            child.extend_from_slice(&e.name);
            let inode = self.inode(e.nid)?;
            f(&child, &e, &inode)?;
            if inode.is_dir() {
                if !seen_dirs.insert(inode.nid) {
                    return Err(inode_err(
                        inode.nid,
                        "directory reached twice (loop in the tree)",
                    ));
                }
                let entries = self.children(&inode)?;
                stack.push((child, entries));
            }
        }
        Ok(())
    }

    /// Entries of a directory without `.` and `..`, in reverse name order.
    fn children(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let mut v: Vec<DirEntry> = self
            .read_dir(dir)?
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .collect();
        v.reverse();
        Ok(v)
    }

    /// Maps every nid reachable from the root to its first path (root = `/`).
    pub fn paths(&self) -> Result<std::collections::HashMap<u64, Vec<u8>>> {
        let mut out = std::collections::HashMap::new();
        out.insert(self.sb.root_nid, b"/".to_vec());
        self.walk(|path, e, _| {
            out.entry(e.nid).or_insert_with(|| path.to_vec());
            Ok(())
        })?;
        Ok(out)
    }
}
