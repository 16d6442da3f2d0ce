//! Keeping a work dir under `size_limit` (`device.cache.config.size_limit`), with every
//! daemon that shares the work dir.
//!
//! # What is counted
//! The bytes the work dir's files take on disk (their allocated blocks): every daemon
//! sharing the work dir sees the same figure, whoever wrote what. The daemons keep a
//! shared count in `.evict.lock` — the size when last looked at, plus every chunk any of
//! them wrote since — and the first to see it pass the limit (or a second after it last
//! looked) looks at the disk again and evicts down to [`LOW_WATER`] percent of the limit.
//!
//! # What is evicted, in order
//! 1. Whole blobs no daemon has open (an image unmounted, a daemon gone), least recently
//!    written first: their files are removed.
//! 2. Chunks of the blobs this daemon has open — also those other daemons have open —
//!    used least recently by any daemon first: the chunk's ready bit is cleared in the
//!    chunk map, its generation moves on, and a hole is punched in the data file.
//!
//! # Shared state: `<blob_id>.chunk_meta`
//! Next to upstream's two files, ours: a header with the digest of the blob's chunk
//! layout ([`layout_digest`]: daemons share a blob's cache files only when their
//! bootstraps agree on it), then 8 bytes per chunk — its eviction generation and when a
//! daemon last used it (seconds, for the least-recently-used order across daemons) —
//! and, as open-file-description byte-range locks on it:
//! - chunk `ci`'s record: a daemon *holds* chunk `ci` (read lock) while it looks at and
//!   reads the chunk, while it writes it and marks it ready, and while a file passed
//!   through to the kernel has it (the kernel reads it unchecked: a hole reads as zeros).
//!   Eviction takes the write lock without waiting, so it passes over held chunks; a
//!   daemon that wants to hold one being evicted waits the moment that takes;
//! - bytes [`MAP_LOCKS`] `+ i`: byte `i` of the chunk map's bitmap is read, changed and
//!   written back under it, so that no daemon writes back a bit another one changed.
//!
//! # Never a wrong byte
//! - A chunk is served only while held, ready, and at the generation this daemon last saw
//!   it at: a chunk evicted by another daemon is forgotten (ready and verified bits) and
//!   fetched again, verified against this image's own digests.
//! - Within a daemon, holds are counted (the lock belongs to the daemon's open file, not
//!   to a thread), and eviction passes over chunks it holds itself.
//! - A hole covers whole pages of the chunk only: chunks start on 4 KiB boundaries
//!   (`rafs` checks), and a blob whose chunks' pages overlap is never punched.
//! - One process evicts at a time (a write lock on a byte of `.evict.lock`); a
//!   whole blob is removed only under a write lock on its chunk map, which no daemon that
//!   has the blob open lets it have.

use super::{range_lock, BlobState, ChunkCache, Lock, OpenBlobs};
use crate::error::Result;
use crate::metrics::Metrics;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Eviction goes down to this share of the limit (in percent), so that it does not run
/// again at the next chunk.
pub const LOW_WATER: u64 = 90;
/// How long a daemon trusts its own count of the work dir before looking again.
const RESCAN: Duration = Duration::from_secs(1);
const PAGE: u64 = 4096;
/// Where the locks of the chunk map's bitmap bytes start in `chunk_meta` (past any
/// chunk's record).
pub const MAP_LOCKS: u64 = 1 << 40;
/// Bytes per chunk in `chunk_meta`: the generation, then the last use.
const RECORD: u64 = 8;
/// The header of `chunk_meta`: [`META_MAGIC`], then the digest of the blob's chunk layout
/// ([`layout_digest`]); the chunks' records follow it.
const META_HEADER: u64 = 4096;
const META_MAGIC: &[u8; 8] = b"RAFSMET1";

/// Where chunk `ci`'s record is in `chunk_meta`.
fn record_at(ci: u32) -> u64 {
    META_HEADER + ci as u64 * RECORD
}

/// The digest of how a bootstrap lays out a blob's chunks: for each ci, where its stored
/// bytes are, how they decode, and where they go in the data file. Daemons share a
/// blob's cache files only when their bootstraps agree on it: then a chunk any of them
/// writes holds the bytes every one of them would write (each writes only what its own
/// digest check passed), and a hole one punches covers the chunk it means for all.
pub fn layout_digest(bs: &rafs::read::Bootstrap, blob_index: u32, count: u32) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for ci in 0..count {
        match bs.chunk_by_ci(blob_index, ci) {
            Ok(Some(c)) => {
                h.update([1]);
                h.update(c.compressed_offset.to_le_bytes());
                h.update(c.compressed_size.to_le_bytes());
                h.update(c.uncompressed_offset.to_le_bytes());
                h.update(c.uncompressed_size.to_le_bytes());
                h.update([c.compressed as u8]);
            }
            _ => h.update([0]),
        }
    }
    h.finalize().into()
}

/// Seconds since the epoch, as stored for a chunk's last use.
fn now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().min(u32::MAX as u64) as u32)
        .unwrap_or(0)
}

/// The header `chunk_meta` has for a blob laid out as `layout` says.
fn meta_header(layout: &[u8; 32]) -> Vec<u8> {
    let mut h = META_MAGIC.to_vec();
    h.extend_from_slice(layout);
    h
}

/// Opens (creating, or making anew when it is for another chunk count or layout) the
/// `chunk_meta` of a blob of `count` chunks laid out as `layout` says; returns it and
/// each chunk's generation in it. The caller makes sure that nobody else has it open
/// when it is made anew (see [`shape_mismatch`]).
pub(super) fn open_meta(
    path: &Path,
    count: u32,
    layout: &[u8; 32],
) -> std::io::Result<(File, Vec<std::sync::atomic::AtomicU32>)> {
    let f = super::open_or_create(path)?;
    let want = record_at(count);
    let header = meta_header(layout);
    let mut have = vec![0u8; header.len()];
    let same =
        f.metadata()?.len() == want && f.read_exact_at(&mut have, 0).is_ok() && have == header;
    if !same {
        f.set_len(0)?;
        f.set_len(want)?;
        f.write_all_at(&header, 0)?;
    }
    let mut bytes = vec![0u8; (want - META_HEADER) as usize];
    f.read_exact_at(&mut bytes, META_HEADER)?;
    let gens = bytes
        .chunks_exact(RECORD as usize)
        .map(|r| std::sync::atomic::AtomicU32::new(u32::from_le_bytes([r[0], r[1], r[2], r[3]])))
        .collect();
    Ok((f, gens))
}

/// A hold of one chunk (see the module docs), released when dropped.
pub(super) struct Hold<'a> {
    state: &'a BlobState,
    ci: u32,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.state.release_raw(self.ci);
    }
}

impl BlobState {
    /// Holds chunk `ci` until the hold is dropped.
    pub(super) fn hold(&self, ci: u32) -> std::io::Result<Hold<'_>> {
        self.hold_raw(ci)?;
        Ok(Hold { state: self, ci })
    }

    /// Holds chunk `ci` until [`BlobState::release_raw`]: locks its record when this
    /// process holds it no other way (waiting while another process evicts it).
    pub(super) fn hold_raw(&self, ci: u32) -> std::io::Result<()> {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        let n = holds.entry(ci).or_insert(0);
        if *n == 0 {
            if let Err(e) = range_lock(&self.meta, Lock::Read, record_at(ci), RECORD, true) {
                holds.remove(&ci);
                return Err(e);
            }
        }
        *holds.get_mut(&ci).expect("just counted") += 1;
        Ok(())
    }

    /// Releases one hold of chunk `ci` (the lock goes with the last one).
    pub(super) fn release_raw(&self, ci: u32) {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = holds.get_mut(&ci) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            holds.remove(&ci);
            if let Err(e) = range_lock(&self.meta, Lock::Unlock, record_at(ci), RECORD, true) {
                warn!("releasing chunk {ci} of {}: {e}", self.data_path.display());
            }
        }
    }

    fn generation(&self, ci: u32) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.meta.read_exact_at(&mut b, record_at(ci))?;
        Ok(u32::from_le_bytes(b))
    }

    /// Whether chunk `ci` is at the generation this process last saw it at. If another
    /// process evicted it since, this process forgets it was ready and verified (it is
    /// fetched again) and returns false. Call with the chunk held.
    pub(super) fn fresh(&self, ci: u32) -> std::io::Result<bool> {
        let Some(seen) = self.seen_gen.get(ci as usize) else {
            return Ok(true);
        };
        let now = self.generation(ci)?;
        if now == seen.load(Ordering::Acquire) {
            return Ok(true);
        }
        self.map.forget(ci);
        self.clear_verified(ci);
        seen.store(now, Ordering::Release);
        Ok(false)
    }

    /// Notes, with chunk `ci` held and just written, the generation it was written at.
    pub(super) fn note_written(&self, ci: u32) -> std::io::Result<()> {
        if let Some(seen) = self.seen_gen.get(ci as usize) {
            seen.store(self.generation(ci)?, Ordering::Release);
        }
        Ok(())
    }

    /// Records that chunk `ci` is being used now (written at most once a second).
    pub(super) fn touch(&self, ci: u32) {
        let Some(last) = self.last_written.get(ci as usize) else {
            return;
        };
        let now = now_secs();
        if last.swap(now, Ordering::AcqRel) != now {
            let _ = self
                .meta
                .write_all_at(&now.to_le_bytes(), record_at(ci) + 4);
        }
    }

    /// Clears chunk `ci`'s verified bit in every image of this process.
    fn clear_verified(&self, ci: u32) {
        for image in self.images.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Some(v) = image.verified.upgrade() {
                v[(ci / 8) as usize].fetch_and(!(0x80 >> (ci & 7)), Ordering::AcqRel);
            }
        }
    }
}

/// Opens (creating) the chunk map at `path` and takes this process's read lock on it,
/// waiting while another process evicts the blob. A file that was removed meanwhile (its
/// blob evicted whole) is opened again.
///
/// The lock is an open-file-description lock of the whole file: the other handles of the
/// process (another image opening the blob, a handle closed) neither share nor drop it.
pub(super) fn lock_in_use(path: &Path) -> std::io::Result<File> {
    for _ in 0..16 {
        let f = super::open_or_create(path)?;
        lock_shared(&f)?;
        if f.metadata()?.nlink() > 0 {
            return Ok(f);
        }
    }
    Err(std::io::Error::other(
        "the chunk map keeps being removed by eviction while it is opened",
    ))
}

/// Takes (or turns a held read lock into, atomically) the write lock of the whole of
/// `f`, without waiting: false when any other open file holds a lock on it.
pub(super) fn lock_exclusive(f: &File) -> std::io::Result<bool> {
    range_lock(f, Lock::Write, 0, 0, false)
}

/// Takes the read lock of the whole of `f` (turning a held write lock into it).
pub(super) fn lock_shared(f: &File) -> std::io::Result<()> {
    range_lock(f, Lock::Read, 0, 0, true).map(|_| ())
}

/// What differs, if anything, between a blob of `size` bytes in `chunks` chunks and the
/// shape of its existing cache files (an empty or missing file is no difference: it is
/// made).
pub(super) fn shape_mismatch(
    data: &Path,
    map: &Path,
    meta: &Path,
    size: u64,
    chunks: u32,
    layout: &[u8; 32],
) -> std::io::Result<Option<String>> {
    let len = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    };
    let map_len = super::chunk_map::HEADER_SIZE + (chunks as u64).div_ceil(8);
    for (p, want, what) in [
        (data, size, "data file"),
        (map, map_len, "chunk map"),
        (meta, record_at(chunks), "chunk meta"),
    ] {
        let have = len(p)?;
        if have != 0 && have != want {
            return Ok(Some(format!("its {what} has {have} bytes, not {want}")));
        }
    }
    if len(meta)? != 0 {
        let header = meta_header(layout);
        let mut have = vec![0u8; header.len()];
        File::open(meta)?.read_exact_at(&mut have, 0)?;
        if have != header {
            return Ok(Some(
                "another bootstrap lays its chunks out otherwise".to_string(),
            ));
        }
    }
    Ok(None)
}

/// The eviction of one image's cache (each image of a daemon has its own limit).
pub(super) struct Evictor {
    work: PathBuf,
    limit: u64,
    open: Arc<OpenBlobs>,
    /// `.evict.lock` in the work dir, shared by every daemon: bytes 0..8 hold the work
    /// dir's size when last looked at plus what every daemon wrote since (updated under
    /// a lock of those bytes); a lock of byte 8 is held by the process evicting.
    shared: File,
    scanned: Mutex<Instant>,
    /// Held while evicting (one thread of the process at a time).
    running: Mutex<()>,
    /// Said once: the limit cannot be kept.
    warned: AtomicBool,
}

/// Bytes of `.evict.lock`: the shared count, and the evicting process's lock.
const COUNT: (u64, u64) = (0, 8);
const EVICTING: (u64, u64) = (8, 1);

impl Evictor {
    pub(super) fn new(work: &Path, limit: u64, open: Arc<OpenBlobs>) -> std::io::Result<Evictor> {
        let work = work.canonicalize()?;
        let shared = super::open_or_create(&work.join(".evict.lock"))?;
        Ok(Evictor {
            work,
            limit,
            open,
            shared,
            scanned: Mutex::new(Instant::now() - RESCAN),
            running: Mutex::new(()),
            warned: AtomicBool::new(false),
        })
    }

    /// The shared count, changed by `f` under its lock.
    fn update_count(&self, f: impl FnOnce(u64) -> std::io::Result<u64>) -> std::io::Result<u64> {
        range_lock(&self.shared, Lock::Write, COUNT.0, COUNT.1, true)?;
        let res = (|| {
            let mut b = [0u8; 8];
            // A new file reads short: a count of 0.
            let n = self.shared.read_at(&mut b, COUNT.0)?;
            let old = if n == 8 { u64::from_le_bytes(b) } else { 0 };
            let new = f(old)?;
            self.shared.write_all_at(&new.to_le_bytes(), COUNT.0)?;
            Ok(new)
        })();
        range_lock(&self.shared, Lock::Unlock, COUNT.0, COUNT.1, true)?;
        res
    }

    /// Counts `n` bytes just written to the cache, in the count every daemon of the work
    /// dir shares.
    pub(super) fn wrote(&self, n: u64) {
        if let Err(e) = self.update_count(|c| Ok(c.saturating_add(n))) {
            debug!("counting cache bytes in {}: {e}", self.work.display());
        }
    }

    /// Whether the shared count is over the limit.
    fn over(&self) -> bool {
        let mut b = [0u8; 8];
        self.shared.read_at(&mut b, COUNT.0).is_ok_and(|n| n == 8)
            && u64::from_le_bytes(b) > self.limit
    }

    /// Looks at the work dir when the shared count passed the limit (or this daemon last
    /// looked more than [`RESCAN`] ago), and evicts when it is over the limit. Over the
    /// limit, a writer waits for an eviction under way (in this process or another), then
    /// looks again: so the work dir exceeds the limit by at most the chunks being written
    /// at that moment.
    pub(super) fn check(&self, cache: &ChunkCache) {
        let over = self.over();
        let stale = self
            .scanned
            .lock()
            .map(|t| t.elapsed() >= RESCAN)
            .unwrap_or(true);
        if !over && !stale {
            return;
        }
        let _running = if over {
            self.running.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            match self.running.try_lock() {
                Ok(g) => g,
                Err(_) => return,
            }
        };
        match range_lock(&self.shared, Lock::Write, EVICTING.0, EVICTING.1, over) {
            Ok(true) => {}
            // Another process evicts; this one looks again at its next write.
            Ok(false) => return,
            Err(e) => {
                warn!("locking {}/.evict.lock: {e}", self.work.display());
                return;
            }
        }
        // Released however `run` ends (a panic included): writers of other daemons may
        // be waiting for it.
        struct Evicting<'a>(&'a File);
        impl Drop for Evicting<'_> {
            fn drop(&mut self) {
                let _ = range_lock(self.0, Lock::Unlock, EVICTING.0, EVICTING.1, true);
            }
        }
        let _evicting = Evicting(&self.shared);
        if let Err(e) = self.run(cache) {
            warn!(
                "evicting from {}: {}",
                self.work.display(),
                crate::error::Chain(&e)
            );
        }
    }

    /// Looks at the work dir's size (under the count's lock: writes meanwhile are
    /// counted on top of it) and makes it the shared count.
    fn rescan(&self) -> std::io::Result<u64> {
        *self.scanned.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.update_count(|_| dir_usage(&self.work))
    }

    fn run(&self, cache: &ChunkCache) -> Result<()> {
        let m = cache.metrics();
        let io = |source| crate::Error::CacheIo {
            path: self.work.display().to_string(),
            source,
        };
        let mut usage = self.rescan().map_err(io)?;
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
        let after = self.rescan().map_err(io)?;
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
                // Open here: not a candidate (its lock would refuse anyway).
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
            if !lock_exclusive(&f).unwrap_or(false) {
                continue;
            }
            let map_bytes = f.metadata().map(|md| md.blocks() * 512).unwrap_or(0);
            // The map last: a daemon opening the blob meanwhile waits on its lock and,
            // finding it removed, makes all three files anew.
            if std::fs::remove_file(&data).is_ok() {
                let _ = std::fs::remove_file(self.work.join(format!("{id}.chunk_meta")));
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

    /// Evicts chunks of the blobs of this work dir this process has open, used least
    /// recently by any process first, until `usage` is at most `target`. Returns the new
    /// usage.
    fn evict_chunks(&self, mut usage: u64, target: u64, m: &Metrics) -> u64 {
        let states = self.open.states_in(&self.work);
        let mut candidates = Vec::new();
        for (i, state) in states.iter().enumerate() {
            let Some(layout) = layout_of(state) else {
                continue;
            };
            let Some((ready, last_use)) = shared_view(state) else {
                continue;
            };
            for (ci, &(offset, len)) in layout.iter().enumerate() {
                if len > 0
                    && ready
                        .get(ci / 8)
                        .is_some_and(|b| b & (0x80 >> (ci & 7)) != 0)
                {
                    candidates.push((last_use[ci], i, ci as u32, offset, len));
                }
            }
        }
        candidates.sort_unstable();
        for (_, i, ci, offset, len) in candidates {
            if usage <= target {
                break;
            }
            match states[i].evict_chunk(ci, offset, len) {
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
        usage
    }
}

/// The chunk map's bitmap as the file has it, and each chunk's last use, as every
/// process sees them.
fn shared_view(state: &BlobState) -> Option<(Vec<u8>, Vec<u32>)> {
    let count = state.map.count() as usize;
    let mut bits = vec![0u8; count.div_ceil(8)];
    state.map.read_disk_bits(&mut bits).ok()?;
    let mut meta = vec![0u8; count * RECORD as usize];
    state.meta.read_exact_at(&mut meta, META_HEADER).ok()?;
    let last_use = meta
        .chunks_exact(RECORD as usize)
        .map(|r| u32::from_le_bytes([r[4], r[5], r[6], r[7]]))
        .collect();
    Some((bits, last_use))
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

/// Each chunk's (uncompressed offset, size) in `state`'s blob (size 0 for a chunk no
/// record describes), found once from an image that has it open; `None` while no image
/// is left, or when the blob must not be punched (see the module docs).
fn layout_of(state: &BlobState) -> Option<&[(u64, u64)]> {
    if let Some(layout) = state.punch_layout.get() {
        return layout.as_deref();
    }
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
    let mut pages: Vec<(u64, u64)> = layout
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|(off, len)| (off / PAGE, (off + len).div_ceil(PAGE)))
        .collect();
    pages.sort_unstable();
    let punchable = pages.windows(2).all(|w| w[0].1 <= w[1].0);
    if !punchable {
        warn!(
            "blob {}: chunks share pages; its chunks are never evicted",
            state.data_path.display()
        );
    }
    state
        .punch_layout
        .get_or_init(|| punchable.then_some(layout))
        .as_deref()
}

impl BlobState {
    /// Evicts chunk `ci` (bytes `offset..offset+len` of the data file) unless a process
    /// holds it or it is not ready. Returns the bytes freed, if evicted.
    fn evict_chunk(&self, ci: u32, offset: u64, len: u64) -> Result<Option<u64>> {
        let io = |e: std::io::Error| self.io(e);
        // This process's holds are counted under this lock; the others' are locks.
        let holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        if holds.contains_key(&ci) {
            return Ok(None);
        }
        let record = record_at(ci);
        if !range_lock(&self.meta, Lock::Write, record, RECORD, false).map_err(io)? {
            return Ok(None);
        }
        let res = (|| -> Result<Option<u64>> {
            if !self.map.ready_on_disk(ci)? {
                return Ok(None);
            }
            self.map.clear(ci)?;
            let next = self.generation(ci).map_err(io)?.wrapping_add(1);
            self.meta
                .write_all_at(&next.to_le_bytes(), record)
                .map_err(io)?;
            if let Some(seen) = self.seen_gen.get(ci as usize) {
                seen.store(next, Ordering::Release);
            }
            self.clear_verified(ci);
            let end = (offset + len).div_ceil(PAGE) * PAGE;
            let start = offset.div_ceil(PAGE) * PAGE;
            if end > start {
                rustix::fs::fallocate(
                    &self.data,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    start,
                    end - start,
                )
                .map_err(|e| io(e.into()))?;
            }
            Ok(Some(end.saturating_sub(start)))
        })();
        let _ = range_lock(&self.meta, Lock::Unlock, record, RECORD, true);
        drop(holds);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_use_lock_belongs_to_its_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.chunk_map");
        let a = lock_in_use(&p).unwrap();
        // Another open file of the same process is another holder: no write lock.
        let b = lock_in_use(&p).unwrap();
        assert!(!lock_exclusive(&a).unwrap());
        // Closing some other handle of the file drops nobody's lock.
        drop(File::open(&p).unwrap());
        drop(b);
        assert!(lock_exclusive(&a).unwrap());
        // Held for writing, nobody else gets it even for reading.
        let c = File::open(&p).unwrap();
        assert!(!range_lock(&c, Lock::Read, 0, 0, false).unwrap());
        lock_shared(&a).unwrap();
        assert!(range_lock(&c, Lock::Read, 0, 0, false).unwrap());
    }

    #[test]
    fn cache_files_of_another_shape_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (data, map, meta) = (
            dir.path().join("b.blob.data"),
            dir.path().join("b.chunk_map"),
            dir.path().join("b.chunk_meta"),
        );
        // Missing or empty files are made, not a difference.
        let layout = [7u8; 32];
        let check = |layout: &[u8; 32]| shape_mismatch(&data, &map, &meta, 40960, 10, layout);
        assert_eq!(check(&layout).unwrap(), None);
        std::fs::write(&data, vec![0u8; 40960]).unwrap();
        std::fs::write(&map, vec![0u8; 4096 + 2]).unwrap();
        let (f, gens) = open_meta(&meta, 10, &layout).unwrap();
        assert_eq!(gens.len(), 10);
        drop(f);
        assert_eq!(check(&layout).unwrap(), None);
        // Another bootstrap's layout of the same blob.
        let what = check(&[8; 32]).unwrap().unwrap();
        assert!(what.contains("lays its chunks out otherwise"), "{what}");
        std::fs::write(&meta, vec![0u8; 88]).unwrap();
        let what = check(&layout).unwrap().unwrap();
        assert!(what.contains("chunk meta has 88 bytes, not 4176"), "{what}");
        std::fs::write(&data, vec![0u8; 4096]).unwrap();
        let what = check(&layout).unwrap().unwrap();
        assert!(what.contains("data file"), "{what}");
    }
}
