//! FUSE passthrough of opens, the part of serving files that only the FUSE transport
//! has: a file whose every chunk is cached and verified is opened passed through to the
//! image's [`BackingMount`] (the kernel's EROFS mount of the cache files), so that the
//! kernel reads it without asking the daemon (see [`crate::passthrough`]).
//!
//! The kernel refuses (with `EIO` to the opener) to have one inode open both through its
//! page cache and passed through, so an inode stays in the mode of its open files until
//! they are all released; and it passes through to one backing file at a time. That
//! state is kept here per image ([`ImageOpens`]), by the FUSE session's [`Passthrough`],
//! which [`crate::vfs::Vfs`] consults only once the session negotiated passthrough.

use crate::fs::RafsFs;
use crate::metrics::Metrics;
use crate::passthrough::{passthrough_open_options, BackingMount, FuseBacking};
use fuse_backend_rs::abi::fuse_abi::OpenOptions;
use rafs::read::Inode;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tracing::{debug, error, info};

/// Handle of a file open through the page cache.
const HANDLE_CACHED: u64 = 1;
/// Handle of a file open in passthrough mode.
const HANDLE_PASSTHROUGH: u64 = 2;

/// What `open` answers: handle, options, backing id.
type OpenReply = (Option<u64>, OpenOptions, Option<u32>);

/// The opens of one regular file.
#[derive(Debug, Default)]
struct IoMode {
    cached: u32,
    passthrough: u32,
    backing_id: u32,
    /// The connection `backing_id` belongs to, while passthrough opens last.
    dev: Option<Arc<FuseBacking>>,
}

/// The passthrough state of one image.
#[derive(Default)]
pub struct ImageOpens {
    /// How each open regular file is open, by nid.
    io_modes: Mutex<HashMap<u64, IoMode>>,
    /// The kernel's EROFS mount of this image over its cache files, made at the first
    /// passthrough open; `None` when it could not be made (said once in the log).
    backing: OnceLock<Option<BackingMount>>,
    /// Opening a file in the backing mount failed once (said once in the log).
    backing_open_failed: AtomicBool,
}

impl ImageOpens {
    /// Opens `inode` of `fs`: through the page cache, or passed through when every
    /// chunk of the file is cached, verified and written back.
    fn open(
        &self,
        fs: &RafsFs,
        inode: u64,
        flags: u32,
        dev: &Arc<FuseBacking>,
    ) -> io::Result<OpenReply> {
        let i = fs.open_checked(inode, flags)?;
        // O_DIRECT readers stay with the daemon: passed through, their reads would have
        // to be aligned to EROFS' 4 KiB blocks.
        if !i.is_reg() || i.size == 0 || flags as i32 & libc::O_DIRECT != 0 {
            return Ok((None, OpenOptions::KEEP_CACHE, None));
        }
        {
            let mut modes = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
            let m = modes.entry(i.nid).or_default();
            if let Some(reply) = join_mode(fs, m) {
                return Ok(reply);
            }
        }
        // The first open: whether the file can be passed through is found out without
        // the lock (the first one of an image mounts it); opens meanwhile are counted.
        // Its chunks are pinned first (never evicted while the kernel may read them),
        // and unpinned unless it is passed through.
        let pinned = fs.cache().pin_file(&i, true);
        let file = match &pinned {
            Ok(()) => self.backing_file(fs, &i, dev),
            Err(e) => {
                fs.fail(&format!("pinning the chunks of inode {}", i.nid), e);
                None
            }
        };
        let unpin = || {
            if pinned.is_ok() {
                let _ = fs.cache().pin_file(&i, false);
            }
        };
        let mut modes = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
        let m = modes.entry(i.nid).or_default();
        if let Some(reply) = join_mode(fs, m) {
            unpin();
            return Ok(reply);
        }
        if let Some(id) = file.and_then(|f| dev.open(&f)) {
            m.backing_id = id;
            m.dev = Some(dev.clone());
            return Ok(join_mode(fs, m).expect("open passed through"));
        }
        unpin();
        m.cached += 1;
        Ok((Some(HANDLE_CACHED), OpenOptions::KEEP_CACHE, None))
    }

    /// The file of regular file `i` in this image's [`BackingMount`], if all of it is
    /// cached, verified and written back, and the kernel maps it as the daemon does.
    fn backing_file(&self, fs: &RafsFs, i: &Inode, dev: &FuseBacking) -> Option<std::fs::File> {
        // Just-fetched chunks stay with the daemon until written back: the kernel's
        // direct reads of the cache files would wait for that writeback first.
        let ready = fs.cache().file_on_disk(i).and_then(|ready| {
            Ok(ready
                && fs
                    .bootstrap()
                    .kernel_maps_like_chunk_indexes(i)
                    .map_err(crate::Error::Metadata)?)
        });
        match ready {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                fs.fail(&format!("chunks of inode {}", i.nid), e);
                return None;
            }
        }
        let mount = self
            .backing
            .get_or_init(|| {
                let paths = fs.cache().data_paths();
                match BackingMount::new(fs.bootstrap().bytes(), &paths, dev.readahead_kb()) {
                    Ok(m) => {
                        info!("cached files are passed through to an EROFS mount of the image");
                        Some(m)
                    }
                    Err(e) => {
                        info!("files of this image are not passed through: mounting it with EROFS over its cache files failed: {e}");
                        None
                    }
                }
            })
            .as_ref()?;
        match mount.open(i.nid, i.size) {
            Ok(f) => Some(f),
            Err(e) => {
                // Said once per image: the next files would most likely say the same.
                if !self.backing_open_failed.swap(true, Ordering::Relaxed) {
                    error!("nid {} in the EROFS mount of the image: {e}", i.nid);
                } else {
                    debug!("nid {} in the EROFS mount of the image: {e}", i.nid);
                }
                None
            }
        }
    }

    /// A release of `handle` on `inode` of `fs`.
    fn release(&self, fs: &RafsFs, inode: u64, handle: u64) {
        if handle != HANDLE_CACHED && handle != HANDLE_PASSTHROUGH {
            return;
        }
        let Some(nid) = fs.inode_map().to_nid(inode) else {
            return;
        };
        // The kernel has left the file's io mode before it sends RELEASE: counting
        // down here never lags behind it into a mode it would refuse.
        let mut modes = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = modes.get_mut(&nid) else {
            return;
        };
        if handle == HANDLE_CACHED {
            m.cached = m.cached.saturating_sub(1);
        } else {
            m.passthrough = m.passthrough.saturating_sub(1);
            if m.passthrough == 0 {
                if let Some(dev) = m.dev.take() {
                    if let Err(e) = dev.close(m.backing_id) {
                        error!("closing backing file {} of nid {nid}: {e}", m.backing_id);
                    }
                    if let Ok(i) = fs.bootstrap().inode(nid) {
                        let _ = fs.cache().pin_file(&i, false);
                    }
                }
            }
        }
        if m.cached == 0 && m.passthrough == 0 {
            modes.remove(&nid);
        }
    }
}

impl Drop for ImageOpens {
    /// An image unmounted while files of it are open passed through: their backing
    /// files stay with them in the kernel; only the ids go.
    fn drop(&mut self) {
        let modes = self.io_modes.get_mut().unwrap_or_else(|e| e.into_inner());
        for m in modes.values() {
            if let Some(dev) = &m.dev {
                let _ = dev.close(m.backing_id);
            }
        }
    }
}

/// Counts one more open of a file already open, in the mode of its other opens (the
/// kernel refuses mixed modes); `None` when the file is not open.
fn join_mode(fs: &RafsFs, m: &mut IoMode) -> Option<OpenReply> {
    if m.dev.is_some() {
        m.passthrough += 1;
        Metrics::add(&fs.metrics().fs.passthrough_opens, 1);
        Some((
            Some(HANDLE_PASSTHROUGH),
            passthrough_open_options(),
            Some(m.backing_id),
        ))
    } else if m.cached > 0 {
        m.cached += 1;
        Some((Some(HANDLE_CACHED), OpenOptions::KEEP_CACHE, None))
    } else {
        None
    }
}

/// The FUSE session's passthrough: its backing-file table, and the opens of each image
/// by mount index.
pub struct Passthrough {
    dev: Arc<FuseBacking>,
    images: Mutex<HashMap<u16, Arc<ImageOpens>>>,
}

impl Passthrough {
    /// Passthrough over the session's backing-file table.
    pub fn new(dev: FuseBacking) -> Passthrough {
        Passthrough {
            dev: Arc::new(dev),
            images: Mutex::new(HashMap::new()),
        }
    }

    fn image(&self, index: u16) -> Arc<ImageOpens> {
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(index)
            .or_default()
            .clone()
    }

    /// Opens `inode` of image `index` (`fs`).
    pub fn open(&self, index: u16, fs: &RafsFs, inode: u64, flags: u32) -> io::Result<OpenReply> {
        self.image(index).open(fs, inode, flags, &self.dev)
    }

    /// Releases `handle` of `inode` of image `index` (`fs`).
    pub fn release(&self, index: u16, fs: &RafsFs, inode: u64, handle: u64) {
        let image = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&index)
            .cloned();
        if let Some(image) = image {
            image.release(fs, inode, handle);
        }
    }

    /// Image `index` is unmounted: its backing ids go (with its last release in flight).
    pub fn forget(&self, index: u16) {
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&index);
    }
}
