//! The read-only filesystem over one bootstrap, written once against fuse-backend-rs'
//! [`FileSystem`] trait so that FUSE and virtio-fs are two transports over the same
//! code. FUSE passthrough, which only the FUSE transport has, is not here: see
//! [`crate::fuse_opens`].
//!
//! Inodes are plain data decoded from the bootstrap on every request (nothing is kept per
//! inode, so `forget` has nothing to release). Inode numbers are nids — hard links share
//! one — mapped by [`InodeMap`]. File data comes from the verified [`ChunkCache`]; any
//! metadata or integrity failure is `EIO`, never wrong bytes.

use crate::cache::{ChunkCache, Piece};
use crate::metrics::{FileStats, Metrics};
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, Attr, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter,
};
use rafs::read::{Bootstrap, DirEntry as RafsDirEntry, Inode};
use std::ffi::CStr;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::error;

/// How long the kernel may cache attributes and names: the image never changes.
pub const TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Bits of a FUSE inode number below the per-mount index.
pub const MOUNT_SHIFT: u32 = 48;
const NID_MASK: u64 = (1 << MOUNT_SHIFT) - 1;
/// The FUSE root inode number.
pub const ROOT_ID: u64 = 1;

/// Maps the nids of one bootstrap to FUSE inode numbers and back:
/// `(mount_index << MOUNT_SHIFT) | nid`, with the root nid and nid 1 swapped so that the
/// root of mount 0 is FUSE's root inode 1. The mount index leaves room for several
/// bootstraps under a pseudo-root in one daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InodeMap {
    root_nid: u64,
    index: u64,
}

impl InodeMap {
    /// The map of mount `index` whose bootstrap's root is `root_nid`.
    pub fn new(root_nid: u64, index: u16) -> Self {
        InodeMap {
            root_nid,
            index: index as u64,
        }
    }

    fn swap(&self, n: u64) -> u64 {
        if n == self.root_nid {
            ROOT_ID
        } else if n == ROOT_ID {
            self.root_nid
        } else {
            n
        }
    }

    /// FUSE inode number of `nid`.
    pub fn to_fuse(&self, nid: u64) -> u64 {
        (self.index << MOUNT_SHIFT) | self.swap(nid & NID_MASK)
    }

    /// nid of a FUSE inode number, if it belongs to this mount.
    pub fn to_nid(&self, ino: u64) -> Option<u64> {
        (ino >> MOUNT_SHIFT == self.index).then(|| self.swap(ino & NID_MASK))
    }
}

/// Directories whose decoded entries are kept for the next readdir calls.
const RECENT_DIRS: usize = 8;

/// Decoded directories, most recent last.
type RecentDirs = Vec<(u64, Arc<Vec<RafsDirEntry>>)>;

/// The filesystem of one bootstrap.
pub struct RafsFs {
    bs: Arc<Bootstrap>,
    cache: Arc<ChunkCache>,
    map: InodeMap,
    enable_xattr: bool,
    metrics: Arc<Metrics>,
    /// The last directories read: a directory listed in several readdir calls is decoded
    /// once. (There are no directory handles: see `opendir`.)
    recent_dirs: Mutex<RecentDirs>,
    /// Per-file records, when the config asks for them.
    file_stats: Option<Arc<FileStats>>,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// `DT_*` of a mode.
fn dtype(mode: u32) -> u32 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_UNKNOWN,
    }
    .into()
}

/// The FUSE options a read-only image filesystem asks for, among those the kernel offers.
pub fn fuse_options(capable: FsOptions) -> FsOptions {
    let want = FsOptions::ASYNC_READ
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::DO_READDIRPLUS
        | FsOptions::READDIRPLUS_AUTO
        | FsOptions::MAX_PAGES
        | FsOptions::CACHE_SYMLINKS
        | FsOptions::BIG_WRITES;
    want & capable
}

/// Zero-initialised `statvfs64` without unsafe code: the trait's default `statfs` of a
/// filesystem that implements nothing.
pub(crate) fn empty_statvfs() -> statvfs64 {
    struct Nothing;
    impl FileSystem for Nothing {
        type Inode = u64;
        type Handle = u64;
    }
    Nothing
        .statfs(&Context::default(), 0)
        .expect("the default statfs cannot fail")
}

impl RafsFs {
    /// The filesystem of `cache`'s bootstrap as mount `index`.
    pub fn new(
        cache: Arc<ChunkCache>,
        enable_xattr: bool,
        metrics: Arc<Metrics>,
        index: u16,
    ) -> Self {
        let bs = cache.bootstrap().clone();
        let map = InodeMap::new(bs.superblock().root_nid, index);
        RafsFs {
            bs,
            cache,
            map,
            enable_xattr,
            metrics,
            recent_dirs: Mutex::new(Vec::new()),
            file_stats: None,
        }
    }

    /// Records opens and reads of files in `stats`.
    pub fn with_file_stats(mut self, stats: Arc<FileStats>) -> Self {
        self.file_stats = Some(stats);
        self
    }

    /// The per-file records, if kept.
    pub fn file_stats(&self) -> Option<&Arc<FileStats>> {
        self.file_stats.as_ref()
    }

    /// The FUSE inode number of the bootstrap's root.
    pub fn root_ino(&self) -> u64 {
        self.map.to_fuse(self.bs.superblock().root_nid)
    }

    /// The inode map.
    pub fn inode_map(&self) -> InodeMap {
        self.map
    }

    /// The chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Opens `inode` for reading (read-only, not a directory), counting the open; the
    /// inode, for a transport that decides how the kernel reads it (FUSE passthrough).
    pub fn open_checked(&self, inode: u64, flags: u32) -> io::Result<Inode> {
        if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(errno(libc::EROFS));
        }
        let i = self.inode(inode)?;
        if i.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        Metrics::add(&self.metrics.fs.nr_opens, 1);
        if let Some(s) = &self.file_stats {
            s.opened(i.nid);
        }
        Ok(i)
    }

    /// The image's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The bootstrap.
    pub fn bootstrap(&self) -> &Arc<Bootstrap> {
        &self.bs
    }

    /// Logs `e` about `what`, counts a failed operation, and returns `EIO`.
    pub fn fail(&self, what: &str, e: impl std::fmt::Display) -> io::Error {
        Metrics::add(&self.metrics.fs.fop_errors, 1);
        error!("{what}: {e}");
        eio()
    }

    fn inode(&self, ino: u64) -> io::Result<Inode> {
        let nid = self.map.to_nid(ino).ok_or_else(|| errno(libc::ENOENT))?;
        self.bs
            .inode(nid)
            .map_err(|e| self.fail(&format!("inode {ino}"), e))
    }

    fn attr(&self, inode: &Inode) -> stat64 {
        let rdev = if inode.is_device() { inode.u } else { 0 };
        Attr {
            ino: self.map.to_fuse(inode.nid),
            size: inode.size,
            blocks: inode.size.div_ceil(512),
            atime: inode.mtime,
            mtime: inode.mtime,
            ctime: inode.mtime,
            atimensec: inode.mtime_nsec,
            mtimensec: inode.mtime_nsec,
            ctimensec: inode.mtime_nsec,
            mode: inode.mode,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
        .into()
    }

    fn entry(&self, inode: &Inode) -> Entry {
        Entry {
            inode: self.map.to_fuse(inode.nid),
            generation: 0,
            attr: self.attr(inode),
            attr_flags: 0,
            attr_timeout: TIMEOUT,
            entry_timeout: TIMEOUT,
        }
    }

    fn dir_entries(&self, ino: u64) -> io::Result<Arc<Vec<RafsDirEntry>>> {
        {
            let recent = self.recent_dirs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, entries)) = recent.iter().rev().find(|(i, _)| *i == ino) {
                return Ok(entries.clone());
            }
        }
        let dir = self.inode(ino)?;
        if !dir.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let entries = Arc::new(
            self.bs
                .read_dir(&dir)
                .map_err(|e| self.fail(&format!("directory {ino}"), e))?,
        );
        let mut recent = self.recent_dirs.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT_DIRS {
            recent.remove(0);
        }
        recent.push((ino, entries.clone()));
        Ok(entries)
    }

    fn xattrs(&self, inode: &Inode) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if !self.enable_xattr {
            return Ok(Vec::new());
        }
        self.bs
            .xattrs(inode)
            .map_err(|e| self.fail(&format!("xattrs of inode {}", inode.nid), e))
    }
}

impl FileSystem for RafsFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        Ok(fuse_options(capable))
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let dir = self.inode(parent)?;
        if !dir.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let found = self
            .bs
            .lookup(&dir, name.to_bytes())
            .map_err(|e| self.fail(&format!("lookup in directory {parent}"), e))?;
        match found {
            Some(e) => {
                let inode = self
                    .bs
                    .inode(e.nid)
                    .map_err(|err| self.fail(&format!("inode {}", e.nid), err))?;
                Ok(self.entry(&inode))
            }
            // A negative entry the kernel may cache as long as positive ones.
            None => Ok(Entry {
                inode: 0,
                generation: 0,
                attr: Attr::default().into(),
                attr_flags: 0,
                attr_timeout: TIMEOUT,
                entry_timeout: TIMEOUT,
            }),
        }
    }

    fn forget(&self, _ctx: &Context, _inode: u64, _count: u64) {}

    fn batch_forget(&self, _ctx: &Context, _requests: Vec<(u64, u64)>) {}

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let i = self.inode(inode)?;
        Ok((self.attr(&i), TIMEOUT))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let i = self.inode(inode)?;
        if !i.is_symlink() {
            return Err(errno(libc::EINVAL));
        }
        self.bs
            .readlink(&i)
            .map_err(|e| self.fail(&format!("symlink {inode}"), e))
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.open_checked(inode, flags)?;
        Ok((None, crate::passthrough::cached_open_options(), None))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let i = self.inode(inode)?;
        if !i.is_reg() {
            return Err(errno(libc::EINVAL));
        }
        Metrics::add(&self.metrics.fs.reads, 1);
        if offset >= i.size || size == 0 {
            return Ok(0);
        }
        // Straight from the cache file into the reply (no buffer in between).
        let n = self
            .cache
            .read_with(&i, offset, size as u64, &mut |piece| match piece {
                Piece::File { file, offset, len } => w.write_all_from(file, len, offset),
                Piece::Bytes(b) => w.write_all(b),
            })
            .map_err(|e| {
                self.fail(
                    &format!("read of inode {inode} at {offset}+{size}"),
                    crate::error::Chain(&e),
                )
            })?;
        Metrics::add(&self.metrics.fs.data_read, n);
        if let Some(s) = &self.file_stats {
            s.read(i.nid, n);
        }
        Ok(n as usize)
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        let mut st = empty_statvfs();
        let sb = self.bs.superblock();
        let blocks: u64 = self
            .bs
            .blobs()
            .iter()
            .map(|b| b.uncompressed_size.div_ceil(4096))
            .sum();
        st.f_bsize = 4096;
        st.f_frsize = 4096;
        st.f_blocks = blocks.max(sb.blocks as u64);
        st.f_bfree = 0;
        st.f_bavail = 0;
        st.f_files = sb.inodes;
        st.f_ffree = 0;
        st.f_favail = 0;
        st.f_namemax = 255;
        st.f_flag = libc::ST_RDONLY;
        Ok(st)
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let i = self.inode(inode)?;
        let value = self
            .xattrs(&i)?
            .into_iter()
            .find(|(n, _)| n == name.to_bytes())
            .map(|(_, v)| v)
            .ok_or_else(|| errno(libc::ENODATA))?;
        if size == 0 {
            Ok(GetxattrReply::Count(value.len() as u32))
        } else if (size as usize) < value.len() {
            Err(errno(libc::ERANGE))
        } else {
            Ok(GetxattrReply::Value(value))
        }
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let i = self.inode(inode)?;
        let mut names = Vec::new();
        for (n, _) in self.xattrs(&i)? {
            names.extend_from_slice(&n);
            names.push(0);
        }
        if size == 0 {
            Ok(ListxattrReply::Count(names.len() as u32))
        } else if (size as usize) < names.len() {
            Err(errno(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(names))
        }
    }

    /// Directories need no handle: `ENOSYS` tells the kernel (from then on, for every
    /// directory of this mount) to skip OPENDIR and RELEASEDIR and to keep directory
    /// listings cached (`FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR`, its default without
    /// opendir): two round trips fewer per directory of a walk.
    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        if !self.inode(inode)?.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        Err(errno(libc::ENOSYS))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let entries = self.dir_entries(inode)?;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let mode = self
                .bs
                .inode(e.nid)
                .map(|i| i.mode)
                .map_err(|err| self.fail(&format!("inode {}", e.nid), err))?;
            let n = add_entry(DirEntry {
                ino: self.map.to_fuse(e.nid),
                offset: i as u64 + 1,
                type_: dtype(mode),
                name: &e.name,
            })?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let entries = self.dir_entries(inode)?;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let child = self
                .bs
                .inode(e.nid)
                .map_err(|err| self.fail(&format!("inode {}", e.nid), err))?;
            let n = add_entry(
                DirEntry {
                    ino: self.map.to_fuse(e.nid),
                    offset: i as u64 + 1,
                    type_: dtype(child.mode),
                    name: &e.name,
                },
                self.entry(&child),
            )?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let i = self.inode(inode)?;
        let mask = mask as i32;
        if mask == libc::F_OK {
            return Ok(());
        }
        if mask & libc::W_OK != 0 {
            return Err(errno(libc::EROFS));
        }
        let mode = i.mode;
        if ctx.uid == 0 {
            // Root may read anything and execute what anyone may execute.
            if mask & libc::X_OK != 0 && !i.is_dir() && mode & 0o111 == 0 {
                return Err(errno(libc::EACCES));
            }
            return Ok(());
        }
        let bits = if ctx.uid == i.uid {
            (mode >> 6) & 7
        } else if ctx.gid == i.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        if (mask as u32) & !bits & 7 != 0 {
            return Err(errno(libc::EACCES));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_map_puts_the_root_at_one_and_is_a_bijection() {
        let m = InodeMap::new(128, 0);
        assert_eq!(m.to_fuse(128), ROOT_ID);
        assert_eq!(m.to_fuse(1), 128);
        assert_eq!(m.to_fuse(500), 500);
        for nid in [0, 1, 2, 127, 128, 129, 1 << 40] {
            assert_eq!(m.to_nid(m.to_fuse(nid)), Some(nid));
        }
        let m2 = InodeMap::new(128, 3);
        assert_eq!(m2.to_fuse(500), (3 << MOUNT_SHIFT) | 500);
        assert_eq!(m2.to_nid(500), None, "another mount's inode");
        assert_eq!(m.to_nid(m2.to_fuse(500)), None);
    }
}
