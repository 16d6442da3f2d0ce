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
use crate::fuse_opens::{OpenTable, Passthrough};
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
    /// How it was mounted (what a successor mounts again), with the credentials
    /// handed over since (see [`Mounted::set_auth`]).
    pub spec: Mutex<crate::daemon::ImageSpec>,
    /// Its filesystem (and through it, its cache).
    pub fs: Arc<RafsFs>,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Its background prefetch, if running.
    pub prefetch: Mutex<Option<Prefetch>>,
}

impl Mounted {
    /// How it was mounted, with the latest credentials.
    pub fn spec(&self) -> crate::daemon::ImageSpec {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records new registry credentials (`auth`: base64 of `user:password`) in the
    /// config a successor mounts the image with.
    pub fn set_auth(&self, auth: &str) {
        let mut spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&spec.config) {
            if let Some(c) = v
                .pointer_mut("/device/backend/config")
                .and_then(|c| c.as_object_mut())
            {
                c.insert("auth".into(), auth.into());
                spec.config = v.to_string();
            }
        }
    }

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

/// Tells the kernel to forget a cached name (in the directory with the given inode).
pub type Notifier = Box<dyn Fn(u64, &CStr) -> io::Result<()> + Send + Sync>;

/// Deepest mountpoint accepted (`/rafs/<id>/lowerdir` is 3).
pub const MAX_MOUNT_DEPTH: usize = 16;

/// A pseudo directory, as a successor rebuilds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirState {
    /// Its inode.
    pub ino: u64,
    /// Its parent's inode.
    pub parent: u64,
    /// Its name in the parent.
    pub name: String,
}

/// The tree a [`Vfs`] serves, for a successor: its images and pseudo directories, and
/// the numbers it hands out next (inode numbers the kernel holds are never reused).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeState {
    /// The `--bootstrap` image, if the daemon has one.
    pub root: Option<crate::daemon::ImageSpec>,
    /// The images mounted through the API.
    pub mounts: Vec<crate::daemon::ImageSpec>,
    /// The pseudo directories but the root, parents first.
    pub dirs: Vec<DirState>,
    /// The next mount index.
    pub next_index: u32,
    /// The next pseudo directory inode.
    pub next_dir: u64,
}

/// An entry of a pseudo directory.
#[derive(Clone)]
enum Child {
    /// Another pseudo directory (its inode).
    Dir(u64),
    /// An image's root.
    Image(Arc<Mounted>),
}

/// A directory of the pseudo tree above the images: the root, and the directories on
/// the way to nested mountpoints (`/rafs/<id>` of `/rafs/<id>/lowerdir`). They exist
/// while something is mounted below them.
struct Dir {
    parent: u64,
    children: BTreeMap<String, Child>,
}

struct Table {
    /// Images by mountpoint (`/sub`, `/rafs/<id>/lowerdir`).
    by_name: BTreeMap<String, Arc<Mounted>>,
    by_index: HashMap<u16, Arc<Mounted>>,
    /// The pseudo directory each image's root is in, by index (its `..`).
    parent_of: HashMap<u16, u64>,
    /// Pseudo directories by inode; the root is [`ROOT_ID`].
    dirs: HashMap<u64, Dir>,
    /// Next index never handed out.
    next_index: u32,
    /// Next pseudo directory inode never handed out (they live below the first image
    /// index's inodes, and are never reused either).
    next_dir: u64,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            by_name: BTreeMap::new(),
            by_index: HashMap::new(),
            parent_of: HashMap::new(),
            dirs: HashMap::from([(
                ROOT_ID,
                Dir {
                    parent: ROOT_ID,
                    children: BTreeMap::new(),
                },
            )]),
            next_index: 0,
            next_dir: ROOT_ID + 1,
        }
    }
}

impl Table {
    /// Walks `parts` but the last from the root: the pseudo directory holding the last
    /// part, or why there can be none (an image on the way).
    fn walk(&self, parts: &[&str], mountpoint: &str) -> Result<Option<u64>, MountError> {
        let mut dir = ROOT_ID;
        for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
            match self.dirs[&dir].children.get(*part) {
                None => return Ok(None),
                Some(Child::Dir(ino)) => dir = *ino,
                Some(Child::Image(_)) => {
                    return Err(MountError::Conflict(format!(
                        "mountpoint {mountpoint} is inside the image mounted at /{}",
                        parts[..=i].join("/")
                    )))
                }
            }
        }
        Ok(Some(dir))
    }
}

/// The root of the FUSE session.
pub struct Vfs {
    /// The `--bootstrap` image at the root; `None` for a pseudo-root.
    root: Option<Arc<Mounted>>,
    table: RwLock<Table>,
    notifier: OnceLock<Notifier>,
    /// The session's backing-file table, once it negotiated passthrough.
    passthrough: OnceLock<Passthrough>,
    started: SystemTime,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The components of an API mountpoint: `/sub` → `[sub]`, `/rafs/x/lowerdir` →
/// `[rafs, x, lowerdir]`. Absolute, at most [`MAX_MOUNT_DEPTH`] levels, each a valid
/// name (not empty, `.` or `..`, no NUL, at most 255 bytes).
pub fn mount_path(mountpoint: &str) -> Result<Vec<&str>, MountError> {
    let bad = |why: &str| {
        MountError::Invalid(format!(
            "mountpoint {mountpoint:?} {why} (expected an absolute path of directories, like \
             /sub or /rafs/<id>/lowerdir)"
        ))
    };
    let Some(rest) = mountpoint.strip_prefix('/') else {
        return Err(bad("is not absolute"));
    };
    if rest.is_empty() {
        return Err(bad("names no directory"));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() > MAX_MOUNT_DEPTH {
        return Err(bad(&format!("is deeper than {MAX_MOUNT_DEPTH} levels")));
    }
    for p in &parts {
        if p.is_empty() || *p == "." || *p == ".." || p.contains('\0') || p.len() > 255 {
            return Err(bad("has a component that is not a valid directory name"));
        }
    }
    Ok(parts)
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

    /// An empty pseudo-root, to mount images into (at any depth).
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
    pub fn set_passthrough(&self, backing: FuseBacking, table: Arc<OpenTable>) {
        let _ = self.passthrough.set(Passthrough::new(backing, table));
    }

    /// The readahead (KiB) of passthrough's backing mounts, once the session negotiated
    /// passthrough.
    pub fn passthrough_readahead(&self) -> Option<u32> {
        self.passthrough.get().map(|p| p.readahead_kb())
    }

    /// Takes on the open files a predecessor recorded, for every image served (after
    /// [`Vfs::set_passthrough`] with the predecessor's table).
    pub fn adopt_opens(&self) {
        if let Some(p) = self.passthrough.get() {
            for m in self.mounts() {
                p.adopt(m.index, &m.fs);
            }
        }
    }

    /// A takeover failed after [`Vfs::adopt_opens`]: dropping this must not close the
    /// backing ids it took on.
    pub fn keep_backing(&self) {
        if let Some(p) = self.passthrough.get() {
            p.keep_backing();
        }
    }

    /// What a successor needs to serve the same tree with the same inode numbers.
    pub fn export(&self) -> TreeState {
        let t = self.read_table();
        let mut dirs: Vec<DirState> = Vec::new();
        for (ino, d) in &t.dirs {
            for (name, c) in &d.children {
                if let Child::Dir(child) = c {
                    dirs.push(DirState {
                        ino: *child,
                        parent: *ino,
                        name: name.clone(),
                    });
                }
            }
        }
        dirs.sort_by_key(|d| d.ino);
        TreeState {
            root: self.root.as_ref().map(|r| r.spec()),
            mounts: t.by_name.values().map(|m| m.spec()).collect(),
            dirs,
            next_index: t.next_index,
            next_dir: t.next_dir,
        }
    }

    /// The tree `state` describes, its images mounted again through `mount` (which
    /// gets each image's spec). An image `mount` fails for is left out (the caller
    /// hears of it from `mount`), but the one at the root.
    pub fn restore(
        state: &TreeState,
        mut mount: impl FnMut(&crate::daemon::ImageSpec) -> crate::Result<Mounted>,
    ) -> crate::Result<Vfs> {
        let bad = |why: String| crate::Error::State(why);
        if let Some(root) = &state.root {
            if !state.mounts.is_empty() || !state.dirs.is_empty() {
                return Err(bad("an image at the root and images below it".into()));
            }
            return Ok(Vfs::single(mount(root)?));
        }
        let vfs = Vfs::pseudo();
        {
            let mut t = vfs.write_table();
            t.next_index = state.next_index.clamp(1, MAX_MOUNT_INDEX + 1);
            t.next_dir = state.next_dir.clamp(ROOT_ID + 1, 1 << MOUNT_SHIFT);
            for d in &state.dirs {
                let ok = d.ino > ROOT_ID
                    && d.ino < t.next_dir
                    && !t.dirs.contains_key(&d.ino)
                    && t.dirs
                        .get(&d.parent)
                        .is_some_and(|p| !p.children.contains_key(&d.name))
                    && mount_path(&format!("/{}", d.name)).is_ok_and(|p| p.len() == 1);
                if !ok {
                    return Err(bad(format!(
                        "directory {:?} (inode {} in {})",
                        d.name, d.ino, d.parent
                    )));
                }
                t.dirs.insert(
                    d.ino,
                    Dir {
                        parent: d.parent,
                        children: BTreeMap::new(),
                    },
                );
                t.dirs
                    .get_mut(&d.parent)
                    .expect("checked")
                    .children
                    .insert(d.name.clone(), Child::Dir(d.ino));
            }
        }
        for spec in &state.mounts {
            if spec.index == 0 || spec.index as u32 >= state.next_index {
                return Err(bad(format!(
                    "{} has index {}, beyond those handed out",
                    spec.mountpoint, spec.index
                )));
            }
            let Ok(image) = mount(spec) else {
                continue;
            };
            let image = Arc::new(image);
            let parts = mount_path(&spec.mountpoint).map_err(|e| bad(e.to_string()))?;
            let mut t = vfs.write_table();
            let dir = t
                .walk(&parts, &spec.mountpoint)
                .map_err(|e| bad(e.to_string()))?
                .ok_or_else(|| bad(format!("no directory holds {}", spec.mountpoint)))?;
            let name = parts.last().expect("not empty").to_string();
            if t.dirs[&dir].children.contains_key(&name) || t.by_index.contains_key(&spec.index) {
                return Err(bad(format!("{} is listed twice", spec.mountpoint)));
            }
            t.dirs
                .get_mut(&dir)
                .expect("walked")
                .children
                .insert(name, Child::Image(image.clone()));
            t.parent_of.insert(image.index, dir);
            t.by_index.insert(image.index, image.clone());
            t.by_name.insert(spec.mountpoint.clone(), image);
        }
        Ok(vfs)
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
            None => self.read_table().by_name.get(mountpoint).cloned(),
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
        let parts = mount_path(mountpoint)?;
        let mut t = self.write_table();
        Self::check_free(&t, &parts, mountpoint)?;
        if t.next_index > MAX_MOUNT_INDEX {
            return Err(MountError::Conflict(format!(
                "this daemon has handed out all {MAX_MOUNT_INDEX} mount indices; restart it"
            )));
        }
        let index = t.next_index as u16;
        t.next_index += 1;
        Ok(index)
    }

    /// Whether `parts` can take an image: nothing there, and no image on the way.
    fn check_free(t: &Table, parts: &[&str], mountpoint: &str) -> Result<(), MountError> {
        let Some(dir) = t.walk(parts, mountpoint)? else {
            return Ok(());
        };
        match t.dirs[&dir].children.get(*parts.last().expect("not empty")) {
            None => Ok(()),
            Some(Child::Image(_)) => Err(MountError::Conflict(format!(
                "mountpoint {mountpoint} is already mounted"
            ))),
            Some(Child::Dir(_)) => Err(MountError::Conflict(format!(
                "mountpoint {mountpoint} holds other mounts below it"
            ))),
        }
    }

    /// Adds an image built with an index from [`Vfs::reserve`], making the pseudo
    /// directories on the way.
    pub fn mount(&self, image: Mounted) -> Result<(), MountError> {
        let mountpoint = image.mountpoint.clone();
        let parts = mount_path(&mountpoint)?;
        let mut t = self.write_table();
        Self::check_free(&t, &parts, &mountpoint)?;
        let mut dir = ROOT_ID;
        for part in &parts[..parts.len() - 1] {
            dir = match t.dirs[&dir].children.get(*part) {
                Some(Child::Dir(ino)) => *ino,
                _ => {
                    if t.next_dir >= 1 << MOUNT_SHIFT {
                        return Err(MountError::Conflict(
                            "this daemon has made all the directories it can; restart it".into(),
                        ));
                    }
                    let ino = t.next_dir;
                    t.next_dir += 1;
                    t.dirs.insert(
                        ino,
                        Dir {
                            parent: dir,
                            children: BTreeMap::new(),
                        },
                    );
                    t.dirs
                        .get_mut(&dir)
                        .expect("walked")
                        .children
                        .insert(part.to_string(), Child::Dir(ino));
                    ino
                }
            };
        }
        let image = Arc::new(image);
        t.dirs.get_mut(&dir).expect("made").children.insert(
            parts.last().expect("not empty").to_string(),
            Child::Image(image.clone()),
        );
        t.parent_of.insert(image.index, dir);
        t.by_index.insert(image.index, image.clone());
        t.by_name.insert(mountpoint, image.clone());
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
        let parts = mount_path(mountpoint)?;
        let (image, gone_dir, gone_name) = {
            let mut t = self.write_table();
            let image = t.by_name.remove(mountpoint).ok_or_else(|| {
                MountError::NotFound(format!("nothing is mounted at {mountpoint}"))
            })?;
            t.by_index.remove(&image.index);
            let mut dir = t.parent_of.remove(&image.index).unwrap_or(ROOT_ID);
            let mut name = parts.last().expect("not empty").to_string();
            t.dirs
                .get_mut(&dir)
                .expect("the image's directory")
                .children
                .remove(&name);
            // Directories left empty go too; the kernel is told about the highest.
            while dir != ROOT_ID && t.dirs[&dir].children.is_empty() {
                let parent = t.dirs.remove(&dir).expect("present").parent;
                let dir_name = t.dirs[&parent]
                    .children
                    .iter()
                    .find(|(_, c)| matches!(c, Child::Dir(i) if *i == dir))
                    .map(|(n, _)| n.clone())
                    .expect("listed in its parent");
                t.dirs
                    .get_mut(&parent)
                    .expect("present")
                    .children
                    .remove(&dir_name);
                dir = parent;
                name = dir_name;
            }
            (image, dir, name)
        };
        image.stop_prefetch();
        if let Some(p) = self.passthrough.get() {
            p.forget(image.index);
        }
        if let (Some(notify), Ok(cname)) = (
            self.notifier.get(),
            std::ffi::CString::new(gone_name.as_bytes()),
        ) {
            match notify(gone_dir, &cname) {
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

    /// The mount index of the image `ino` belongs to (0: the `--bootstrap` image).
    fn index_of(&self, ino: u64) -> u16 {
        if self.root.is_some() {
            0
        } else {
            (ino >> MOUNT_SHIFT) as u16
        }
    }

    /// Whether `ino` is a pseudo directory (the pseudo-root or one on the way to a
    /// nested mountpoint).
    fn is_root(&self, ino: u64) -> bool {
        self.root.is_none() && ino >> MOUNT_SHIFT == 0 && self.read_table().dirs.contains_key(&ino)
    }

    /// How long the guest or kernel may keep pseudo directories' entries and image
    /// roots: for ever where unmounts are told to the kernel (FUSE), else
    /// [`UNNOTIFIED_ENTRY_TIMEOUT`].
    fn mount_entry_timeout(&self) -> Duration {
        if self.notifier.get().is_some() {
            TIMEOUT
        } else {
            UNNOTIFIED_ENTRY_TIMEOUT
        }
    }

    fn dir_attr(&self, ino: u64) -> stat64 {
        let t = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let n = self
            .read_table()
            .dirs
            .get(&ino)
            .map_or(0, |d| d.children.len() as u32);
        Attr {
            ino,
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

    /// Pseudo directory `ino`'s parent and entries after `.` and `..`, by name.
    fn dir_entries(&self, ino: u64) -> io::Result<(u64, Vec<(String, Child)>)> {
        let t = self.read_table();
        let d = t.dirs.get(&ino).ok_or_else(|| errno(libc::ENOENT))?;
        Ok((
            d.parent,
            d.children
                .iter()
                .map(|(n, c)| (n.clone(), c.clone()))
                .collect(),
        ))
    }

    fn child_entry(&self, ctx: &Context, child: &Child) -> io::Result<Entry> {
        let (inode, attr) = match child {
            Child::Image(m) => {
                let ino = m.fs.root_ino();
                (ino, m.fs.getattr(ctx, ino, None)?.0)
            }
            Child::Dir(ino) => (*ino, self.dir_attr(*ino)),
        };
        let timeout = self.mount_entry_timeout();
        Ok(Entry {
            inode,
            generation: 0,
            attr,
            attr_flags: 0,
            attr_timeout: timeout,
            entry_timeout: timeout,
        })
    }

    /// Lists pseudo directory `dir` from `offset`: `.`, `..`, then its entries.
    fn root_readdir(
        &self,
        ctx: &Context,
        dir: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let (parent, children) = self.dir_entries(dir)?;
        let dots = [(".", dir), ("..", parent)];
        let dot_entries = dots.iter().map(|(n, ino)| (n.as_bytes(), *ino, None));
        let child_entries = children.iter().map(|(n, c)| {
            let ino = match c {
                Child::Image(m) => m.fs.root_ino(),
                Child::Dir(i) => *i,
            };
            (n.as_bytes(), ino, Some(c))
        });
        for (i, (name, ino, child)) in dot_entries
            .chain(child_entries)
            .enumerate()
            .skip(offset as usize)
        {
            let entry = match child {
                Some(c) => Some(self.child_entry(ctx, c)?),
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

/// How long entries of pseudo directories and image roots are kept where no unmount is
/// told to the kernel (virtio-fs): an unmounted image leaves the guest's view within it.
pub const UNNOTIFIED_ENTRY_TIMEOUT: Duration = Duration::from_secs(1);

impl Vfs {
    /// The pseudo directory holding the root of the image inode `ino` belongs to.
    fn image_parent(&self, ino: u64) -> u64 {
        let index = (ino >> MOUNT_SHIFT) as u16;
        self.read_table()
            .parent_of
            .get(&index)
            .copied()
            .unwrap_or(ROOT_ID)
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
        let child = std::str::from_utf8(name.to_bytes()).ok().and_then(|n| {
            self.read_table()
                .dirs
                .get(&parent)
                .and_then(|d| d.children.get(n).cloned())
        });
        match child {
            Some(c) => self.child_entry(ctx, &c),
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
            return Ok((self.dir_attr(inode), Duration::ZERO));
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
        let fs = self.image(inode)?;
        match self.passthrough.get() {
            Some(p) => p.open(self.index_of(inode), &fs, inode, flags),
            None => {
                fs.open_checked(inode, flags)?;
                Ok((None, crate::passthrough::cached_open_options(), None))
            }
        }
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
        match (self.image(inode), self.passthrough.get()) {
            (Ok(fs), Some(p)) => {
                p.release(self.index_of(inode), &fs, handle);
                Ok(())
            }
            (Ok(fs), None) => {
                fs.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
            }
            // Unmounted while open: nothing left to release.
            (Err(_), _) => Ok(()),
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
            return self.root_readdir(ctx, inode, offset, &mut |d, _| add_entry(d));
        }
        let fs = self.image(inode)?;
        if self.root.is_some() || inode != fs.root_ino() {
            return fs.readdir(ctx, inode, handle, size, offset, add_entry);
        }
        // An image's root: its `..` is the pseudo directory it is in.
        let up = self.image_parent(inode);
        fs.readdir(ctx, inode, handle, size, offset, &mut |mut d| {
            if d.name == b".." {
                d.ino = up;
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
            return self.root_readdir(ctx, inode, offset, &mut |d, e| {
                add_entry(d, e.unwrap_or_else(bare_entry))
            });
        }
        let fs = self.image(inode)?;
        if self.root.is_some() || inode != fs.root_ino() {
            return fs.readdirplus(ctx, inode, handle, size, offset, add_entry);
        }
        let up = self.image_parent(inode);
        fs.readdirplus(ctx, inode, handle, size, offset, &mut |mut d, e| {
            if d.name == b".." {
                d.ino = up;
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
    fn restored_trees_keep_their_numbers_and_bad_ones_are_refused() {
        let dir = |ino, parent, name: &str| DirState {
            ino,
            parent,
            name: name.into(),
        };
        let tree = |dirs: Vec<DirState>, mounts: Vec<crate::daemon::ImageSpec>| TreeState {
            root: None,
            mounts,
            dirs,
            next_index: 3,
            next_dir: 10,
        };
        let never = |_: &crate::daemon::ImageSpec| -> crate::Result<Mounted> {
            panic!("no image is mounted in these cases")
        };
        let good = tree(vec![dir(2, ROOT_ID, "rafs"), dir(5, 2, "x")], vec![]);
        let v = Vfs::restore(&good, never).unwrap();
        let back = v.export();
        assert_eq!(back.dirs, good.dirs, "pseudo directories keep their inodes");
        assert_eq!((back.next_index, back.next_dir), (3, 10));
        for (bad, why) in [
            (
                tree(vec![dir(2, 7, "rafs")], vec![]),
                "a parent that does not exist",
            ),
            (
                tree(vec![dir(2, ROOT_ID, "a"), dir(3, ROOT_ID, "a")], vec![]),
                "a name twice",
            ),
            (
                tree(vec![dir(12, ROOT_ID, "a")], vec![]),
                "an inode beyond those handed out",
            ),
            (
                tree(vec![dir(2, ROOT_ID, "a/b")], vec![]),
                "a name with a slash",
            ),
            (
                tree(vec![dir(ROOT_ID, ROOT_ID, "a")], vec![]),
                "the root again",
            ),
            (
                tree(
                    vec![],
                    vec![crate::daemon::ImageSpec {
                        mountpoint: "/m".into(),
                        source: "/nonexistent".into(),
                        index: 9,
                        config: String::new(),
                        prefetch_files: None,
                    }],
                ),
                "a mount index beyond those handed out",
            ),
        ] {
            assert!(
                matches!(Vfs::restore(&bad, never), Err(crate::Error::State(_))),
                "a tree with {why} was restored"
            );
        }
    }

    #[test]
    fn mountpoints_are_absolute_paths_of_names() {
        assert_eq!(mount_path("/sub").unwrap(), ["sub"]);
        assert_eq!(
            mount_path("/rafs/x/lowerdir").unwrap(),
            ["rafs", "x", "lowerdir"]
        );
        let deep = "/a".repeat(MAX_MOUNT_DEPTH + 1);
        for bad in [
            "",
            "/",
            "sub",
            "/a//b",
            "/a/",
            "/..",
            "/a/./b",
            "/a\0b",
            deep.as_str(),
        ] {
            assert!(
                matches!(mount_path(bad), Err(MountError::Invalid(_))),
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
        assert!(matches!(v.reserve("/a//b"), Err(MountError::Invalid(_))));
    }
}
