//! Keeping a work dir under `size_limit` (`device.cache.config.size_limit`).
//!
//! # What is counted
//! The bytes the work dir's files take on disk (their allocated blocks): every daemon
//! sharing the work dir sees the same figure, whoever wrote what. A daemon counts what it
//! writes as it goes and looks at the disk again when its count passes the limit (or a
//! second after it last looked), then evicts down to [`LOW_WATER`] of the limit.
//!
//! # What is evicted, in order
//! 1. Whole blobs no daemon has open (an image unmounted, a daemon gone), least recently
//!    written first: their data file and chunk map are removed.
//! 2. Chunks of blobs this daemon alone has open, read least recently first: the chunk's
//!    ready bit is cleared (and persisted), then a hole is punched in the data file.
//!
//! # Never a wrong byte
//! - A reader of a chunk holds the blob's `evict_lock` for reading from checking its ready
//!   bit to reading its bytes; eviction takes it for writing: a reader sees the chunk
//!   ready and whole, or not ready (and fetches it again, verified).
//! - Every image's verified bit of an evicted chunk is cleared: the bytes written when it
//!   is fetched again are checked against each image's own digest before it serves them.
//! - Chunks of files passed through to the kernel are pinned (see
//!   `ChunkCache::pin_file`) from before the file is found cached until its last open is
//!   released: the kernel reads them from the cache files unchecked, and a hole reads as
//!   zeros. An evicted chunk makes its files ineligible for passthrough (they are not
//!   wholly cached) until they are fetched and verified again.
//! - Only blobs no other process has open are touched. Each process holds a read lock
//!   (POSIX, whole file) on the chunk map of every blob it has open; an evicting process
//!   upgrades its own to a write lock without waiting — which succeeds only when no other
//!   process holds one — and downgrades it after (both atomic for POSIX locks). Blobs
//!   open in two daemons (the old and new daemon of an upgrade, dedicated daemons sharing
//!   a base layer) are left alone until one closes them: neither can see what the other
//!   reads. One process evicts at a time (a write lock on `.evict.lock` in the work dir).
//! - A hole covers whole pages of the chunk only: chunks start on 4 KiB boundaries
//!   (`rafs` checks), and a blob whose chunks' pages overlap is never punched.

use super::{BlobState, ChunkCache, OpenBlobs};
use crate::error::Result;
use crate::metrics::Metrics;
use rustix::fs::{fcntl_lock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Eviction goes down to this share of the limit (in percent), so that it does not run
/// again at the next chunk.
pub const LOW_WATER: u64 = 90;
/// How long a daemon trusts its own count of the work dir before looking again.
const RESCAN: Duration = Duration::from_secs(1);
const PAGE: u64 = 4096;

/// Now, as a tick of 10 ms since the process started: when a chunk was last used.
pub(super) fn tick() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    (start.elapsed().as_millis() / 10).min(u32::MAX as u128) as u32
}

/// Opens (creating) the chunk map at `path` and takes this process's read lock on it,
/// waiting while another process evicts the blob. A file that was removed meanwhile (its
/// blob evicted whole) is opened again.
pub(super) fn lock_in_use(path: &Path) -> std::io::Result<File> {
    for _ in 0..16 {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        fcntl_lock(&f, FlockOperation::LockShared)?;
        if f.metadata()?.nlink() > 0 {
            return Ok(f);
        }
    }
    Err(std::io::Error::other(
        "the chunk map keeps being removed by eviction while it is opened",
    ))
}

/// The eviction of one image's cache (each image of a daemon has its own limit).
pub(super) struct Evictor {
    work: PathBuf,
    limit: u64,
    open: Arc<OpenBlobs>,
    /// The work dir's size when last looked at, plus what this image wrote since.
    estimate: AtomicU64,
    scanned: Mutex<Instant>,
    /// Held while evicting (one thread of the process at a time).
    running: Mutex<()>,
    /// Said once: the limit cannot be kept (blobs open elsewhere, pinned chunks).
    warned: AtomicBool,
}

impl Evictor {
    pub(super) fn new(work: &Path, limit: u64, open: Arc<OpenBlobs>) -> Evictor {
        Evictor {
            work: work.canonicalize().unwrap_or_else(|_| work.to_path_buf()),
            limit,
            open,
            estimate: AtomicU64::new(u64::MAX),
            scanned: Mutex::new(Instant::now() - RESCAN),
            running: Mutex::new(()),
            warned: AtomicBool::new(false),
        }
    }

    /// Counts `n` bytes just written to the cache.
    pub(super) fn wrote(&self, n: u64) {
        let _ = self
            .estimate
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                Some(e.saturating_add(n))
            });
    }

    /// Whether the work dir should be looked at: the count passed the limit, or it is
    /// older than [`RESCAN`].
    fn due(&self) -> bool {
        self.estimate.load(Ordering::Acquire) > self.limit
            || self
                .scanned
                .lock()
                .map(|t| t.elapsed() >= RESCAN)
                .unwrap_or(true)
    }

    /// Looks at the work dir when due, and evicts when it is over the limit. Returns
    /// without waiting when another thread or process is evicting.
    pub(super) fn check(&self, cache: &ChunkCache) {
        if !self.due() {
            return;
        }
        let Ok(_running) = self.running.try_lock() else {
            return;
        };
        if let Err(e) = self.run(cache) {
            warn!(
                "evicting from {}: {}",
                self.work.display(),
                crate::error::Chain(&e)
            );
        }
    }

    fn run(&self, cache: &ChunkCache) -> Result<()> {
        let m = cache.metrics();
        let io = |source| crate::Error::CacheIo {
            path: self.work.display().to_string(),
            source,
        };
        // One evicting process at a time; the others go on and look again later.
        let lock_path = self.work.join(".evict.lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        if fcntl_lock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Ok(());
        }
        let mut usage = dir_usage(&self.work).map_err(io)?;
        *self.scanned.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.estimate.store(usage, Ordering::Release);
        m.cache.cache_bytes.store(usage, Ordering::Relaxed);
        if usage <= self.limit {
            return Ok(());
        }
        let target = self.limit / 100 * LOW_WATER;
        let before = usage;
        usage = self.evict_unused_blobs(usage, target, m);
        if usage > target {
            usage = self.evict_chunks(usage, target, m);
        }
        // The figure the disk gives, not the estimate of what was freed.
        let after = dir_usage(&self.work).map_err(io)?;
        self.estimate.store(after, Ordering::Release);
        m.cache.cache_bytes.store(after, Ordering::Relaxed);
        debug!(
            "{}: {before} bytes over the limit of {}; evicted down to {after} (estimated {usage})",
            self.work.display(),
            self.limit
        );
        if after > self.limit && !self.warned.swap(true, Ordering::AcqRel) {
            warn!(
                "cache {} takes {after} bytes, over its size_limit of {}: what is left is open \
                 in other daemons, passed through to the kernel or being fetched \
                 (said once)",
                self.work.display(),
                self.limit
            );
        }
        Ok(())
    }

    /// Removes blobs no process has open, least recently written first, until `usage`
    /// is at most `target`. Returns the new usage.
    fn evict_unused_blobs(&self, mut usage: u64, target: u64, m: &Metrics) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.work) else {
            return usage;
        };
        let open = self.open.data_paths();
        let mut candidates = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".blob.data")) else {
                continue;
            };
            let data = e.path();
            if open.contains(&data) {
                // Never open another handle of a chunk map this process has locked:
                // closing it would drop the process's lock.
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            candidates.push((md.mtime(), id.to_string(), data, md.blocks() * 512));
        }
        candidates.sort();
        for (_, id, data, bytes) in candidates {
            if usage <= target {
                break;
            }
            let map = self.work.join(format!("{id}.chunk_map"));
            // Locked for writing only when no process has the blob open; removed while
            // locked, so that a daemon opening it meanwhile makes new files.
            let Ok(f) = OpenOptions::new().read(true).write(true).open(&map) else {
                continue;
            };
            if fcntl_lock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
                continue;
            }
            let map_bytes = f.metadata().map(|md| md.blocks() * 512).unwrap_or(0);
            if std::fs::remove_file(&data).is_ok() {
                let _ = std::fs::remove_file(&map);
                usage = usage.saturating_sub(bytes + map_bytes);
                Metrics::add(&m.cache.evicted_blobs, 1);
                Metrics::add(&m.cache.evicted_bytes, bytes);
                info!("evicted blob {id} from the cache: no daemon has it open");
            }
            drop(f);
        }
        usage
    }

    /// Evicts chunks of the blobs of this work dir this process alone has open, least
    /// recently used first, until `usage` is at most `target`. Returns the new usage.
    fn evict_chunks(&self, mut usage: u64, target: u64, m: &Metrics) -> u64 {
        let mut exclusive = Vec::new();
        for state in self.open.states_in(&self.work) {
            // Upgraded only when no other process holds the blob (atomic, not waiting).
            if fcntl_lock(&state.lock, FlockOperation::NonBlockingLockExclusive).is_ok() {
                exclusive.push(state);
            }
        }
        let mut candidates = Vec::new();
        for (i, state) in exclusive.iter().enumerate() {
            let Some(layout) = layout_of(state) else {
                continue;
            };
            for (ci, (offset, len)) in layout.into_iter().enumerate() {
                let ci = ci as u32;
                if len > 0 && state.map.is_ready(ci) {
                    let at = state.last_use[ci as usize].load(Ordering::Relaxed);
                    candidates.push((at, i, ci, offset, len));
                }
            }
        }
        candidates.sort_unstable();
        for (_, i, ci, offset, len) in candidates {
            if usage <= target {
                break;
            }
            match exclusive[i].evict_chunk(ci, offset, len) {
                Ok(Some(freed)) => {
                    usage = usage.saturating_sub(freed);
                    Metrics::add(&m.cache.evicted_chunks, 1);
                    Metrics::add(&m.cache.evicted_bytes, freed);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!("evicting a chunk: {}", crate::error::Chain(&e));
                    break;
                }
            }
        }
        for state in &exclusive {
            if let Err(e) = fcntl_lock(&state.lock, FlockOperation::LockShared) {
                warn!("keeping the lock of {}: {e}", state.data_path.display());
            }
        }
        usage
    }
}

/// The bytes the regular files directly in `dir` take on disk.
fn dir_usage(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)?.flatten() {
        if let Ok(md) = e.metadata() {
            if md.is_file() {
                total += md.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// Each chunk's (uncompressed offset, size) in `state`'s blob, from an image that has it
/// open (size 0 for a chunk no record describes); `None` when no image is left or the
/// blob must not be punched (see the module docs).
fn layout_of(state: &BlobState) -> Option<Vec<(u64, u64)>> {
    let (bs, blob_index) = {
        let images = state.images.lock().unwrap_or_else(|e| e.into_inner());
        images
            .iter()
            .find_map(|i| Some((i.bs.upgrade()?, i.blob_index)))?
    };
    let layout: Vec<(u64, u64)> = (0..state.map.count())
        .map(|ci| match bs.chunk_by_ci(blob_index, ci) {
            Ok(Some(c)) => (c.uncompressed_offset, c.uncompressed_size as u64),
            _ => (0, 0),
        })
        .collect();
    let punchable = *state.punchable.get_or_init(|| {
        let mut pages: Vec<(u64, u64)> = layout
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|(off, len)| (off / PAGE, (off + len).div_ceil(PAGE)))
            .collect();
        pages.sort_unstable();
        let ok = pages.windows(2).all(|w| w[0].1 <= w[1].0);
        if !ok {
            warn!(
                "blob {}: chunks share pages; its chunks are never evicted",
                state.data_path.display()
            );
        }
        ok
    });
    punchable.then_some(layout)
}

impl BlobState {
    /// Evicts chunk `ci` (bytes `offset..offset+len` of the data file) unless it is
    /// pinned, being fetched or not ready. Returns the bytes freed, if evicted.
    fn evict_chunk(&self, ci: u32, offset: u64, len: u64) -> Result<Option<u64>> {
        let _readers = self.evict_lock.write().unwrap_or_else(|e| e.into_inner());
        // Held throughout: a file found wholly cached under it keeps its chunks (see
        // `ChunkCache::pin_file`).
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if pins.contains_key(&ci) || !self.map.is_ready(ci) {
            return Ok(None);
        }
        if self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ci)
        {
            return Ok(None);
        }
        self.map.clear(ci)?;
        for image in self.images.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Some(v) = image.verified.upgrade() {
                v[(ci / 8) as usize].fetch_and(!(0x80 >> (ci & 7)), Ordering::AcqRel);
            }
        }
        let end = (offset + len).div_ceil(PAGE) * PAGE;
        let start = offset.div_ceil(PAGE) * PAGE;
        if end > start {
            rustix::fs::fallocate(
                &self.data,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                start,
                end - start,
            )
            .map_err(|e| self.io(e.into()))?;
        }
        drop(pins);
        Ok(Some(end.saturating_sub(start)))
    }
}
