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
//!
//! Every open is also written to an [`OpenTable`], a memory file that outlives the
//! daemon: a successor that takes the FUSE session over (see [`crate::handover`]) reads
//! which files the kernel holds open, in which mode and with which backing id, and goes
//! on from there. Each open gets a file handle of its own (its slot in the table and the
//! slot's generation), so that a `RELEASE` the kernel resends to a successor, after the
//! dead daemon had counted it, finds its slot already free and counts nothing twice.

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

/// How a file is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Through the page cache, read by the daemon.
    Cached = 1,
    /// Passed through to a backing file.
    Passthrough = 2,
}

/// One open file, as the [`OpenTable`] records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenRecord {
    /// The image's mount index.
    pub index: u16,
    /// The file's nid in its image.
    pub nid: u64,
    /// Its mode.
    pub mode: OpenMode,
    /// Its backing id (passthrough only).
    pub backing_id: u32,
}

/// First bytes of an [`OpenTable`]'s file (its layout's version is the last digit).
const TABLE_MAGIC: &[u8; 8] = b"NYDOPEN1";
/// Bytes before the first slot.
const TABLE_HEADER: u64 = 32;
/// Bytes of a slot: generation (u32), mode (u32, 0 when free), key (u64: index << 48 |
/// nid), backing id (u32), unused (12 bytes), little-endian. A power of two, so that no
/// slot crosses a page: a write to memory files stops between pages when the writer is
/// killed.
const SLOT: u64 = 32;
/// Most slots a table file is read with (a successor refuses a larger one).
pub const MAX_OPEN_SLOTS: u64 = 1 << 24;

/// The open files of a FUSE session, in a memory file (`memfd`) handed to the supervisor
/// with the FUSE device, so that it outlives the daemon. Each slot is written with one
/// `pwrite` within one page, which a `SIGKILL` does not cut in half. An open is recorded
/// before the kernel hears of it and forgotten before its backing id is closed: a daemon
/// killed in between leaves at worst a record the kernel no longer needs (the file then
/// stays in its open mode, and its backing id and chunk pins are kept, until the daemon
/// restarts), never an open the successor does not know about.
pub struct OpenTable {
    file: std::fs::File,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// Each slot's generation and record (`None` when free).
    all: Vec<(u32, Option<OpenRecord>)>,
    free: Vec<u32>,
}

impl OpenTable {
    /// An empty table in a new memory file.
    pub fn new() -> io::Result<OpenTable> {
        let fd = rustix::fs::memfd_create("nydusd-opens", rustix::fs::MemfdFlags::CLOEXEC)?;
        let file = std::fs::File::from(fd);
        let mut head = [0u8; TABLE_HEADER as usize];
        head[..8].copy_from_slice(TABLE_MAGIC);
        std::os::unix::fs::FileExt::write_all_at(&file, &head, 0)?;
        Ok(OpenTable {
            file,
            slots: Mutex::default(),
        })
    }

    /// The table a predecessor left in `file`.
    pub fn load(file: std::fs::File) -> io::Result<OpenTable> {
        use std::os::unix::fs::FileExt;
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let len = file.metadata()?.len();
        let mut head = [0u8; TABLE_HEADER as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| bad(format!("the open-file table has no header: {e}")))?;
        if &head[..8] != TABLE_MAGIC {
            return Err(bad(format!(
                "the open-file table starts with {:02x?}, not {:?} (another nydusd version?)",
                &head[..8],
                String::from_utf8_lossy(TABLE_MAGIC)
            )));
        }
        let n = len.saturating_sub(TABLE_HEADER) / SLOT;
        if n > MAX_OPEN_SLOTS {
            return Err(bad(format!("the open-file table has {n} slots")));
        }
        let mut bytes = vec![0u8; (n * SLOT) as usize];
        file.read_exact_at(&mut bytes, TABLE_HEADER)?;
        let mut slots = Slots::default();
        for (i, s) in bytes.chunks_exact(SLOT as usize).enumerate() {
            let word = |a: usize| u32::from_le_bytes(s[a..a + 4].try_into().expect("4 bytes"));
            let key = u64::from_le_bytes(s[8..16].try_into().expect("8 bytes"));
            let mode = match word(4) {
                1 => Some(OpenMode::Cached),
                2 => Some(OpenMode::Passthrough),
                _ => None,
            };
            let rec = mode.map(|mode| OpenRecord {
                index: (key >> 48) as u16,
                nid: key & ((1 << 48) - 1),
                mode,
                backing_id: word(16),
            });
            if rec.is_none() {
                slots.free.push(i as u32);
            }
            slots.all.push((word(0), rec));
        }
        // Lowest slots first.
        slots.free.reverse();
        Ok(OpenTable {
            file,
            slots: Mutex::new(slots),
        })
    }

    /// The memory file (what the supervisor keeps).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Every open recorded, with its handle.
    pub fn records(&self) -> Vec<(u64, OpenRecord)> {
        let slots = self.lock();
        slots
            .all
            .iter()
            .enumerate()
            .filter_map(|(i, (gen, rec))| rec.map(|r| (handle(i as u32, *gen), r)))
            .collect()
    }

    /// The files open passed through (image index, nid).
    pub fn passed_through(&self) -> std::collections::BTreeSet<(u16, u64)> {
        self.records()
            .into_iter()
            .filter(|(_, r)| r.mode == OpenMode::Passthrough)
            .map(|(_, r)| (r.index, r.nid))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, slot: u32, gen: u32, rec: Option<OpenRecord>) -> io::Result<()> {
        let mut b = [0u8; SLOT as usize];
        b[..4].copy_from_slice(&gen.to_le_bytes());
        if let Some(r) = rec {
            b[4..8].copy_from_slice(&(r.mode as u32).to_le_bytes());
            b[8..16].copy_from_slice(&((r.index as u64) << 48 | r.nid).to_le_bytes());
            b[16..20].copy_from_slice(&r.backing_id.to_le_bytes());
        }
        std::os::unix::fs::FileExt::write_all_at(&self.file, &b, TABLE_HEADER + slot as u64 * SLOT)
    }

    /// Records an open; its file handle.
    pub fn add(&self, rec: OpenRecord) -> io::Result<u64> {
        let mut slots = self.lock();
        let slot = match slots.free.pop() {
            Some(s) => s,
            None => {
                if slots.all.len() as u64 >= MAX_OPEN_SLOTS {
                    return Err(io::Error::other("too many open files"));
                }
                slots.all.push((0, None));
                (slots.all.len() - 1) as u32
            }
        };
        let gen = slots.all[slot as usize].0.wrapping_add(1).max(1);
        if let Err(e) = self.write(slot, gen, Some(rec)) {
            slots.free.push(slot);
            return Err(e);
        }
        slots.all[slot as usize] = (gen, Some(rec));
        Ok(handle(slot, gen))
    }

    /// Forgets the open with handle `fh`, if it is recorded and of image `index`; what
    /// it was.
    pub fn remove(&self, fh: u64, index: u16) -> Option<OpenRecord> {
        let (slot, gen) = ((fh >> 32) as u32, fh as u32);
        let mut slots = self.lock();
        let (g, rec) = *slots.all.get(slot as usize)?;
        let rec = rec.filter(|r| g == gen && r.index == index)?;
        if let Err(e) = self.write(slot, gen, None) {
            error!("forgetting open file handle {fh:#x}: {e}");
        }
        slots.all[slot as usize].1 = None;
        slots.free.push(slot);
        Some(rec)
    }

    /// Forgets every open of image `index` (it is unmounted).
    pub fn remove_image(&self, index: u16) {
        for (fh, _) in self.records().into_iter().filter(|(_, r)| r.index == index) {
            self.remove(fh, index);
        }
    }
}

/// The file handle of generation `gen` of `slot` (never 0: generations start at 1).
fn handle(slot: u32, gen: u32) -> u64 {
    (slot as u64) << 32 | gen as u64
}

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
    /// Dropped without closing the backing ids (a takeover that failed: they are
    /// still the predecessor's, and the next successor's).
    keep_backing: AtomicBool,
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
        table: &OpenTable,
        index: u16,
    ) -> io::Result<OpenReply> {
        let i = fs.open_checked(inode, flags)?;
        // O_DIRECT readers stay with the daemon: passed through, their reads would have
        // to be aligned to EROFS' 4 KiB blocks.
        if !i.is_reg() || i.size == 0 || flags as i32 & libc::O_DIRECT != 0 {
            return Ok((None, crate::passthrough::cached_open_options(), None));
        }
        {
            let mut modes = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
            let m = modes.entry(i.nid).or_default();
            if let Some(mode) = join_mode(m) {
                return record(fs, m, mode, table, index, i.nid);
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
        if let Some(mode) = join_mode(m) {
            unpin();
            return record(fs, m, mode, table, index, i.nid);
        }
        if let Some(id) = file.and_then(|f| dev.open(&f)) {
            m.backing_id = id;
            m.dev = Some(dev.clone());
            let mode = join_mode(m).expect("open passed through");
            return record(fs, m, mode, table, index, i.nid);
        }
        unpin();
        m.cached += 1;
        record(fs, m, OpenMode::Cached, table, index, i.nid)
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

    /// A release of the open `rec` of `fs` (already gone from the table).
    fn release(&self, fs: &RafsFs, rec: OpenRecord) {
        let nid = rec.nid;
        // The kernel has left the file's io mode before it sends RELEASE: counting
        // down here never lags behind it into a mode it would refuse.
        let mut modes = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = modes.get_mut(&nid) else {
            return;
        };
        match rec.mode {
            OpenMode::Cached => m.cached = m.cached.saturating_sub(1),
            OpenMode::Passthrough => {
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
        }
        if m.cached == 0 && m.passthrough == 0 {
            modes.remove(&nid);
        }
    }

    /// Takes on the opens a predecessor recorded for this image (`fs`): their counts,
    /// backing ids (still the connection's), and pins on the chunks of files passed
    /// through (the predecessor's went with it).
    fn adopt(&self, fs: &RafsFs, records: &[OpenRecord], dev: &Arc<FuseBacking>) {
        let mut modes = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let m = modes.entry(r.nid).or_default();
            match r.mode {
                OpenMode::Cached => m.cached += 1,
                OpenMode::Passthrough => {
                    if m.dev.is_none() {
                        m.backing_id = r.backing_id;
                        m.dev = Some(dev.clone());
                        match fs.bootstrap().inode(r.nid) {
                            Ok(i) => {
                                if let Err(e) = fs.cache().pin_file(&i, true) {
                                    fs.fail(&format!("pinning the chunks of nid {}", r.nid), e);
                                }
                            }
                            Err(e) => error!("nid {} of an open file: {e}", r.nid),
                        }
                    }
                    m.passthrough += 1;
                }
            }
        }
    }
}

impl Drop for ImageOpens {
    /// An image unmounted while files of it are open passed through: their backing
    /// files stay with them in the kernel; only the ids go.
    fn drop(&mut self) {
        if self.keep_backing.load(Ordering::Relaxed) {
            return;
        }
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
fn join_mode(m: &mut IoMode) -> Option<OpenMode> {
    if m.dev.is_some() {
        m.passthrough += 1;
        Some(OpenMode::Passthrough)
    } else if m.cached > 0 {
        m.cached += 1;
        Some(OpenMode::Cached)
    } else {
        None
    }
}

/// Records an open just counted in `m` (in `mode`) in the table: the kernel's answer.
/// When the table cannot take it, the count is undone and the open fails.
fn record(
    fs: &RafsFs,
    m: &mut IoMode,
    mode: OpenMode,
    table: &OpenTable,
    index: u16,
    nid: u64,
) -> io::Result<OpenReply> {
    let backing_id = if mode == OpenMode::Passthrough {
        m.backing_id
    } else {
        0
    };
    let rec = OpenRecord {
        index,
        nid,
        mode,
        backing_id,
    };
    match table.add(rec) {
        Ok(fh) => Ok(match mode {
            OpenMode::Passthrough => {
                Metrics::add(&fs.metrics().fs.passthrough_opens, 1);
                (Some(fh), passthrough_open_options(), Some(backing_id))
            }
            OpenMode::Cached => (Some(fh), crate::passthrough::cached_open_options(), None),
        }),
        Err(e) => {
            error!("recording an open of nid {nid}: {e}");
            match mode {
                OpenMode::Passthrough => m.passthrough -= 1,
                OpenMode::Cached => m.cached -= 1,
            }
            if m.passthrough == 0 {
                if let Some(dev) = m.dev.take() {
                    let _ = dev.close(m.backing_id);
                    if let Ok(i) = fs.bootstrap().inode(nid) {
                        let _ = fs.cache().pin_file(&i, false);
                    }
                }
            }
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }
}

/// The FUSE session's passthrough: its backing-file table, the opens of each image by
/// mount index, and the [`OpenTable`] they are recorded in.
pub struct Passthrough {
    dev: Arc<FuseBacking>,
    table: Arc<OpenTable>,
    images: Mutex<HashMap<u16, Arc<ImageOpens>>>,
}

impl Passthrough {
    /// Passthrough over the session's backing-file table, recording opens in `table`.
    pub fn new(dev: FuseBacking, table: Arc<OpenTable>) -> Passthrough {
        Passthrough {
            dev: Arc::new(dev),
            table,
            images: Mutex::new(HashMap::new()),
        }
    }

    /// The readahead (KiB) of backing mounts.
    pub fn readahead_kb(&self) -> u32 {
        self.dev.readahead_kb()
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
        self.image(index)
            .open(fs, inode, flags, &self.dev, &self.table, index)
    }

    /// Releases `handle` of image `index` (`fs`). A handle not in the table (released
    /// already, by a predecessor, or never passed through) changes nothing.
    pub fn release(&self, index: u16, fs: &RafsFs, handle: u64) {
        let Some(rec) = self.table.remove(handle, index) else {
            return;
        };
        let image = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&index)
            .cloned();
        if let Some(image) = image {
            image.release(fs, rec);
        }
    }

    /// Takes on the opens a predecessor recorded for image `index` (`fs`).
    pub fn adopt(&self, index: u16, fs: &RafsFs) {
        let records: Vec<OpenRecord> = self
            .table
            .records()
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| r.index == index)
            .collect();
        if !records.is_empty() {
            info!(
                "taking on {} open files of image {index} from the previous daemon",
                records.len()
            );
            self.image(index).adopt(fs, &records, &self.dev);
        }
    }

    /// Leaves the backing ids of every image open when this is dropped (a takeover
    /// that failed after taking on a predecessor's open files).
    pub fn keep_backing(&self) {
        for image in self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            image.keep_backing.store(true, Ordering::Relaxed);
        }
    }

    /// Image `index` is unmounted: its backing ids go (with its last release in flight).
    pub fn forget(&self, index: u16) {
        self.table.remove_image(index);
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(index: u16, nid: u64, mode: OpenMode, backing_id: u32) -> OpenRecord {
        OpenRecord {
            index,
            nid,
            mode,
            backing_id,
        }
    }

    #[test]
    fn a_successor_reads_the_opens_and_a_resent_release_counts_nothing() {
        let t = OpenTable::new().unwrap();
        let a = t.add(rec(1, 42, OpenMode::Passthrough, 7)).unwrap();
        let b = t.add(rec(1, 43, OpenMode::Cached, 0)).unwrap();
        let c = t.add(rec(2, 42, OpenMode::Cached, 0)).unwrap();
        assert_eq!(t.remove(b, 1), Some(rec(1, 43, OpenMode::Cached, 0)));
        // The same release again (resent), or for another image: nothing.
        assert_eq!(t.remove(b, 1), None);
        assert_eq!(t.remove(c, 1), None);
        // The slot is reused with a new generation: the old handle still means nothing.
        let d = t.add(rec(1, 44, OpenMode::Cached, 0)).unwrap();
        assert_ne!(d, b);
        assert_eq!(d >> 32, b >> 32, "the freed slot is reused");
        assert_eq!(t.remove(b, 1), None);

        // A successor loads the same file.
        let copy = t.file().try_clone().unwrap();
        let s = OpenTable::load(copy).unwrap();
        let mut got = s.records();
        got.sort_by_key(|(fh, _)| *fh);
        let mut want = vec![
            (a, rec(1, 42, OpenMode::Passthrough, 7)),
            (c, rec(2, 42, OpenMode::Cached, 0)),
            (d, rec(1, 44, OpenMode::Cached, 0)),
        ];
        want.sort_by_key(|(fh, _)| *fh);
        assert_eq!(got, want);
        // Its handles are the predecessor's; a new open never takes a live slot.
        assert_eq!(s.remove(a, 1), Some(rec(1, 42, OpenMode::Passthrough, 7)));
        let e = s.add(rec(3, 1, OpenMode::Cached, 0)).unwrap();
        assert!(![c, d].contains(&e));
        s.remove_image(1);
        assert_eq!(s.records().len(), 2, "image 2's and 3's opens stay");
    }

    #[test]
    fn tables_of_another_layout_are_refused() {
        let f = tempfile::tempfile().unwrap();
        let err = OpenTable::load(f.try_clone().unwrap()).err().unwrap();
        assert!(err.to_string().contains("no header"), "{err}");
        std::os::unix::fs::FileExt::write_all_at(&f, &[b'x'; 64], 0).unwrap();
        let err = OpenTable::load(f).err().unwrap();
        assert!(err.to_string().contains("another nydusd version"), "{err}");
    }
}
