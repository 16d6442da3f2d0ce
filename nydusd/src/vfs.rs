//! What the FUSE session serves: one image at the root (`--bootstrap`), or a pseudo-root
//! directory whose entries are images mounted and unmounted at run time through
//! `POST|DELETE /api/v1/mount?mountpoint=/sub` (nydus-snapshotter's shared mode: one
//! daemon, one directory per image).
//!
//! Each image is a [`RafsFs`] with its own backend, cache, metrics and prefetch; [`Vfs`]
//! only dispatches requests to it by the *mount index* in the top bits of the inode
//! number ([`InodeMap`](crate::fs::InodeMap)), so inode numbers never collide between
//! images. The `--bootstrap` image has index 0 and the FUSE root inode; API mounts get
//! indices from 1 up, never reused in one daemon's life (the kernel may still hold inode
//! numbers of an unmounted image; reusing its index would hand them another image's
//! files), which bounds a daemon to 65,535 API mounts.
//!
//! Every [`FileSystem`] method [`RafsFs`] implements is forwarded here; a method added
//! there must be forwarded here too, or the FUSE session never calls it.
//!
//! The pseudo-root is ours rather than fuse-backend-rs' `Vfs` so that its `readdir` lists
//! `.` and `..` like any directory. Its entries are cached by the kernel as long as image
//! entries are; an unmount removes the image from the table first (new lookups get
//! `ENOENT`, requests on its inodes `ENOENT`) and then tells the kernel to drop the cached
//! entry (`FUSE_NOTIFY_INVAL_ENTRY`).

use crate::fs::{empty_statvfs, fuse_options, RafsFs, MOUNT_SHIFT, ROOT_ID, TIMEOUT};
use crate::metrics::Metrics;
use crate::passthrough::FuseBacking;
use crate::prefetch::Prefetch;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, Attr, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// Largest mount index (16 bits above [`MOUNT_SHIFT`]).
pub const MAX_MOUNT_INDEX: u32 = (1 << (64 - MOUNT_SHIFT)) - 1;

/// One image being served.
pub struct Mounted {
    /// Where it is, upstream's `mountpoint`: `/` for `--bootstrap`, `/sub` for API mounts.
    pub mountpoint: String,
    /// Its bootstrap file.
    pub source: PathBuf,
    /// Its mount index.
    pub index: u16,
    /// Its filesystem (and through it, its cache).
    pub fs: Arc<RafsFs>,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Its background prefetch, if running.
    pub prefetch: Mutex<Option<Prefetch>>,
}

impl Mounted {
    /// Stops the background prefetch, if any, and waits for it.
    pub fn stop_prefetch(&self) {
        let p = self
            .prefetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(p) = p {
            p.stop();
        }
    }
}

/// Why a mount or unmount was refused.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint is taken, or this daemon has no pseudo-root.
    #[error("{0}")]
    Conflict(String),
    /// Nothing is mounted there.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed (mountpoint, source, config).
    #[error("{0}")]
    Invalid(String),
}

/// Tells the kernel to forget a cached name in the root directory.
pub type Notifier = Box<dyn Fn(&CStr) -> io::Result<()> + Send + Sync>;

#[derive(Default)]
struct Table {
    by_name: BTreeMap<String, Arc<Mounted>>,
    by_index: HashMap<u16, Arc<Mounted>>,
    /// Next index never handed out.
    next_index: u32,
}

/// The root of the FUSE session.
pub struct Vfs {
    /// The `--bootstrap` image at the root; `None` for a pseudo-root.
    root: Option<Arc<Mounted>>,
    table: RwLock<Table>,
    notifier: OnceLock<Notifier>,
    /// The session's backing-file table, once it negotiated passthrough.
    passthrough: OnceLock<Arc<FuseBacking>>,
    started: SystemTime,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The directory name of an API mountpoint: `/sub` → `sub`. One level below the root,
/// not `.` or `..`, at most 255 bytes.
pub fn mount_name(mountpoint: &str) -> Result<&str, MountError> {
    let name = mountpoint.strip_prefix('/').unwrap_or("");
    let bad = |why: &str| {
        MountError::Invalid(format!(
            "mountpoint {mountpoint:?} {why} (expected one directory below the root, like /sub)"
        ))
    };
    if name.is_empty() {
        return Err(bad("names no directory"));
    }
    if name.contains('/') {
        return Err(bad("has more than one level"));
    }
    if name == "." || name == ".." || name.contains('\0') || name.len() > 255 {
        return Err(bad("is not a valid directory name"));
    }
    Ok(name)
}

impl Vfs {
    /// Serves `image` (index 0) at the root.
    pub fn single(image: Mounted) -> Vfs {
        Vfs {
            root: Some(Arc::new(image)),
            table: RwLock::new(Table::default()),
            notifier: OnceLock::new(),
            passthrough: OnceLock::new(),
            started: SystemTime::now(),
        }
    }

    /// An empty pseudo-root, to mount images into.
    pub fn pseudo() -> Vfs {
        Vfs {
            root: None,
            table: RwLock::new(Table {
                next_index: 1,
                ..Table::default()
            }),
            notifier: OnceLock::new(),
            passthrough: OnceLock::new(),
            started: SystemTime::now(),
        }
    }

    /// Whether images are mounted through the API (no `--bootstrap`).
    pub fn is_pseudo(&self) -> bool {
        self.root.is_none()
    }

    /// Sets how unmounts reach the kernel's cache (once the FUSE session is up).
    pub fn set_notifier(&self, n: Notifier) {
        let _ = self.notifier.set(n);
    }

    /// Lets files whose chunks are all cached be passed through (the session negotiated
    /// it; see [`crate::passthrough`]).
    pub fn set_passthrough(&self, backing: FuseBacking) {
        let _ = self.passthrough.set(Arc::new(backing));
    }

    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_table(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every image served, the root one first, then API mounts by name.
    pub fn mounts(&self) -> Vec<Arc<Mounted>> {
        let mut v: Vec<_> = self.root.iter().cloned().collect();
        v.extend(self.read_table().by_name.values().cloned());
        v
    }

    /// The image at `mountpoint` (`/` is the `--bootstrap` image).
    pub fn get(&self, mountpoint: &str) -> Option<Arc<Mounted>> {
        match &self.root {
            Some(r) => (mountpoint == r.mountpoint).then(|| r.clone()),
            None => {
                let name = mountpoint.strip_prefix('/')?;
                self.read_table().by_name.get(name).cloned()
            }
        }
    }

    /// Checks that `mountpoint` can take an image and hands out the index for it.
    pub fn reserve(&self, mountpoint: &str) -> Result<u16, MountError> {
        if self.root.is_some() {
            return Err(MountError::Conflict(
                "this daemon serves its --bootstrap at the root; start nydusd without \
                 --bootstrap to mount images through the API"
                    .into(),
            ));
        }
        let name = mount_name(mountpoint)?;
        let mut t = self.write_table();
        if t.by_name.contains_key(name) {
            return Err(MountError::Conflict(format!(
                "mountpoint {mountpoint} is already mounted"
            )));
        }
        if t.next_index > MAX_MOUNT_INDEX {
            return Err(MountError::Conflict(format!(
                "this daemon has handed out all {MAX_MOUNT_INDEX} mount indices; restart it"
            )));
        }
        let index = t.next_index as u16;
        t.next_index += 1;
        Ok(index)
    }

    /// Adds an image built with an index from [`Vfs::reserve`].
    pub fn mount(&self, image: Mounted) -> Result<(), MountError> {
        let name = mount_name(&image.mountpoint)?.to_string();
        let mut t = self.write_table();
        if t.by_name.contains_key(&name) {
            return Err(MountError::Conflict(format!(
                "mountpoint {} is already mounted",
                image.mountpoint
            )));
        }
        let image = Arc::new(image);
        t.by_index.insert(image.index, image.clone());
        t.by_name.insert(name, image.clone());
        info!(
            "mounted {} at {} (index {})",
            image.source.display(),
            image.mountpoint,
            image.index
        );
        Ok(())
    }

    /// Removes the image at `mountpoint`: its entry vanishes, its prefetch stops, the
    /// kernel is told to drop the cached name.
    pub fn umount(&self, mountpoint: &str) -> Result<Arc<Mounted>, MountError> {
        if self.root.is_some() {
            return Err(MountError::Conflict(
                "this daemon serves its --bootstrap at the root; there is nothing to unmount \
                 (use PUT /api/v1/daemon/exit)"
                    .into(),
            ));
        }
        let name = mount_name(mountpoint)?;
        let image = {
            let mut t = self.write_table();
            let image = t.by_name.remove(name).ok_or_else(|| {
                MountError::NotFound(format!("nothing is mounted at {mountpoint}"))
            })?;
            t.by_index.remove(&image.index);
            image
        };
        image.stop_prefetch();
        if let (Some(notify), Ok(cname)) =
            (self.notifier.get(), std::ffi::CString::new(name.as_bytes()))
        {
            match notify(&cname) {
                Ok(()) => {}
                // Not in the kernel's cache: nothing to drop.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => warn!("telling the kernel {mountpoint} is gone: {e}"),
            }
        }
        info!("unmounted {mountpoint}");
        Ok(image)
    }

    /// The image serving inode `ino` (not the pseudo-root). The `--bootstrap` image is
    /// borrowed, so that requests of a single-image daemon share no reference count.
    fn image(&self, ino: u64) -> io::Result<ImageRef<'_>> {
        if let Some(r) = &self.root {
            return Ok(ImageRef::Root(&r.fs));
        }
        let index = (ino >> MOUNT_SHIFT) as u16;
        self.read_table()
            .by_index
            .get(&index)
            .map(|m| ImageRef::Mounted(m.fs.clone()))
            .ok_or_else(|| errno(libc::ENOENT))
    }

    /// Whether `ino` is the pseudo-root.
    fn is_root(&self, ino: u64) -> bool {
        self.root.is_none() && ino == ROOT_ID
    }

    fn root_attr(&self) -> stat64 {
        let t = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let n = self.read_table().by_name.len() as u32;
        Attr {
            ino: ROOT_ID,
            size: 4096,
            blocks: 8,
            atime: t.as_secs(),
            mtime: t.as_secs(),
            ctime: t.as_secs(),
            atimensec: t.subsec_nanos(),
            mtimensec: t.subsec_nanos(),
            ctimensec: t.subsec_nanos(),
            mode: libc::S_IFDIR | 0o755,
            nlink: 2 + n,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
        .into()
    }

    /// The pseudo-root's entries after `.` and `..`: (name, image) by name.
    fn root_entries(&self) -> Vec<(String, Arc<RafsFs>)> {
        self.read_table()
            .by_name
            .iter()
            .map(|(n, m)| (n.clone(), m.fs.clone()))
            .collect()
    }

    fn image_entry(ctx: &Context, fs: &RafsFs) -> io::Result<Entry> {
        let ino = fs.root_ino();
        let (attr, _) = fs.getattr(ctx, ino, None)?;
        Ok(Entry {
            inode: ino,
            generation: 0,
            attr,
            attr_flags: 0,
            attr_timeout: TIMEOUT,
            entry_timeout: TIMEOUT,
        })
    }

    /// Lists the pseudo-root from `offset`: `.`, `..`, then the images.
    fn root_readdir(
        &self,
        ctx: &Context,
        offset: u64,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let images = self.root_entries();
        let dots = [(".", ROOT_ID), ("..", ROOT_ID)];
        let dot_entries = dots.iter().map(|(n, ino)| (n.as_bytes(), *ino, None));
        let image_entries = images
            .iter()
            .map(|(n, fs)| (n.as_bytes(), fs.root_ino(), Some(fs)));
        for (i, (name, ino, fs)) in dot_entries
            .chain(image_entries)
            .enumerate()
            .skip(offset as usize)
        {
            let entry = match fs {
                Some(fs) => Some(Self::image_entry(ctx, fs)?),
                None => None,
            };
            let n = add(
                DirEntry {
                    ino,
                    offset: i as u64 + 1,
                    type_: libc::DT_DIR.into(),
                    name,
                },
                entry,
            )?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// The image a request goes to.
enum ImageRef<'a> {
    /// The `--bootstrap` image.
    Root(&'a RafsFs),
    /// An API mount, held for the request (it may be unmounted meanwhile).
    Mounted(Arc<RafsFs>),
}

impl std::ops::Deref for ImageRef<'_> {
    type Target = RafsFs;
    fn deref(&self) -> &RafsFs {
        match self {
            ImageRef::Root(fs) => fs,
            ImageRef::Mounted(fs) => fs,
        }
    }
}

/// An entry without attributes (for `.` and `..` in readdirplus, which the kernel skips).
fn bare_entry() -> Entry {
    Entry {
        inode: 0,
        generation: 0,
        attr: Attr::default().into(),
        attr_flags: 0,
        attr_timeout: Duration::ZERO,
        entry_timeout: Duration::ZERO,
    }
}

impl FileSystem for Vfs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        match &self.root {
            Some(r) => r.fs.init(capable),
            None => Ok(fuse_options(capable)),
        }
    }

    fn destroy(&self) {
        for m in self.mounts() {
            m.fs.destroy();
        }
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        if !self.is_root(parent) {
            return self.image(parent)?.lookup(ctx, parent, name);
        }
        let fs = std::str::from_utf8(name.to_bytes())
            .ok()
            .and_then(|n| self.read_table().by_name.get(n).map(|m| m.fs.clone()));
        match fs {
            Some(fs) => Self::image_entry(ctx, &fs),
            // An error, not a negative entry: the kernel must ask again after a mount.
            None => Err(errno(libc::ENOENT)),
        }
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        if !self.is_root(inode) {
            if let Ok(fs) = self.image(inode) {
                fs.forget(ctx, inode, count)
            }
        }
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        if self.is_root(inode) {
            return Ok((self.root_attr(), Duration::ZERO));
        }
        self.image(inode)?.getattr(ctx, inode, handle)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        if self.is_root(inode) {
            return Err(errno(libc::EINVAL));
        }
        self.image(inode)?.readlink(ctx, inode)
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if self.is_root(inode) {
            return Err(errno(libc::EISDIR));
        }
        self.image(inode)?
            .open_file(inode, flags, self.passthrough.get())
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        if self.is_root(inode) {
            return Err(errno(libc::EISDIR));
        }
        self.image(inode)?
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        if self.is_root(inode) {
            return Ok(());
        }
        match self.image(inode) {
            Ok(fs) => fs.release(ctx, inode, flags, handle, flush, flock_release, lock_owner),
            // Unmounted while open: nothing left to release.
            Err(_) => Ok(()),
        }
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        if self.is_root(inode) {
            let mut st = empty_statvfs();
            st.f_bsize = 4096;
            st.f_frsize = 4096;
            st.f_namemax = 255;
            st.f_flag = libc::ST_RDONLY;
            return Ok(st);
        }
        self.image(inode)?.statfs(ctx, inode)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        if self.is_root(inode) {
            return Err(errno(libc::ENODATA));
        }
        self.image(inode)?.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        if self.is_root(inode) {
            return Ok(if size == 0 {
                ListxattrReply::Count(0)
            } else {
                ListxattrReply::Names(Vec::new())
            });
        }
        self.image(inode)?.listxattr(ctx, inode, size)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        if self.is_root(inode) {
            // No CACHE_DIR: the listing changes with every mount.
            return Ok((Some(0), OpenOptions::empty()));
        }
        self.image(inode)?.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if self.is_root(inode) {
            return self.root_readdir(ctx, offset, &mut |d, _| add_entry(d));
        }
        let fs = self.image(inode)?;
        if self.root.is_some() || inode != fs.root_ino() {
            return fs.readdir(ctx, inode, handle, size, offset, add_entry);
        }
        // An image's root: its `..` is the pseudo-root.
        fs.readdir(ctx, inode, handle, size, offset, &mut |mut d| {
            if d.name == b".." {
                d.ino = ROOT_ID;
            }
            add_entry(d)
        })
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if self.is_root(inode) {
            return self.root_readdir(ctx, offset, &mut |d, e| {
                add_entry(d, e.unwrap_or_else(bare_entry))
            });
        }
        let fs = self.image(inode)?;
        if self.root.is_some() || inode != fs.root_ino() {
            return fs.readdirplus(ctx, inode, handle, size, offset, add_entry);
        }
        fs.readdirplus(ctx, inode, handle, size, offset, &mut |mut d, e| {
            if d.name == b".." {
                d.ino = ROOT_ID;
            }
            add_entry(d, e)
        })
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        if self.is_root(inode) {
            return Ok(());
        }
        match self.image(inode) {
            Ok(fs) => fs.releasedir(ctx, inode, flags, handle),
            Err(_) => Ok(()),
        }
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.is_root(inode) {
            return if mask as i32 & libc::W_OK != 0 {
                Err(errno(libc::EROFS))
            } else {
                Ok(())
            };
        }
        self.image(inode)?.access(ctx, inode, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountpoints_are_one_level_below_the_root() {
        assert_eq!(mount_name("/sub").unwrap(), "sub");
        for bad in ["", "/", "sub", "/a/b", "/..", "/.", "/a\0b"] {
            assert!(
                matches!(mount_name(bad), Err(MountError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn reserve_refuses_a_bootstrap_root_and_hands_out_fresh_indices() {
        let v = Vfs::pseudo();
        assert_eq!(v.reserve("/a").unwrap(), 1);
        assert_eq!(v.reserve("/a").unwrap(), 2, "indices are never reused");
        assert!(matches!(v.umount("/a"), Err(MountError::NotFound(_))));
        assert!(matches!(v.reserve("/a/b"), Err(MountError::Invalid(_))));
    }
}
