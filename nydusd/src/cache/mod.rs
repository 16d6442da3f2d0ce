//! The chunk cache: per blob a sparse file of *uncompressed* chunks at their uncompressed
//! offsets (`<blob_id>.blob.data`, as upstream nydusd 2.2 names it) plus a ready bitmap
//! (`<blob_id>.chunk_map`, [`chunk_map`]) in `work_dir`.
//!
//! # Reads
//! A file range maps to chunks; each chunk is looked up in the bootstrap's chunk table
//! (the root of trust for offsets, sizes and digests). Chunks that are ready are read from
//! the data file. Missing chunks are *claimed* (one in-flight set per blob, so concurrent
//! readers of one chunk wait for a single fetch), merged with adjacent missing chunks into
//! one backend request up to a bound (`amplify_io`; small reads are extended with the
//! following chunks of the blob), decompressed, verified, written to the data file and
//! only then marked ready.
//!
//! # Sequential readahead
//! A reader going through a blob in order (a large file read from its start, an image
//! read file after file) would otherwise leave the network idle while it waits for each
//! request in turn, and the CPU idle while it waits for the network. Each blob follows
//! up to [`MAX_STREAMS`] sequential readers (*streams*): an on-demand read that starts
//! within 2 MiB (at least 4 chunks) of where a stream's reads went on
//! continues that stream; any other read that missed a chunk starts a new one (a reader
//! that jumps), in the place of the stream read longest ago. Each
//! time a stream moves on to a new chunk, its *window* — the compressed bytes kept in
//! flight or ready ahead of it — grows (one `amplify_io`, then doubling, up to
//! `readahead_window`); a new stream has none, and nothing is fetched ahead of a stream
//! until it meets a chunk that is not cached. The window is fetched in the background
//! in requests of up to a quarter of it (at least `amplify_io`, at most
//! [`MAX_RA_REQUEST`]), several at once, each on a thread of its own that decompresses
//! and verifies its chunks while the others' bytes arrive: the wire, the decompressor
//! and the verifier run at once. Readahead of all streams of an image holds at most
//! `readahead_window` bytes of requests at once (the first request always goes, however
//! large; a chunk is taken whole) and [`MAX_RA_JOBS`] requests; their buffers are reused
//! from a pool of about that size: memory stays bounded per image. With
//! `readahead_window` at most `amplify_io`, one request at a time is fetched ahead of
//! the reader; `readahead_window: 0` or `amplify_io: 0` turns readahead off. A reader
//! that jumps pulls nothing after it until it reads on from where it landed; only a read
//! that missed starts a stream, and nothing is fetched ahead while a fetch of the blob
//! timed out, or the cache disk refused a chunk, less than a second ago.
//!
//! # When cached chunks are verified
//! Each chunk is verified **once per daemon lifetime**: a chunk fetched by this process is
//! verified before it is written; a chunk found ready in the bitmap at start-up (written
//! by an earlier process, which may have crashed, or left on a disk that may have been
//! tampered with while no daemon ran) is read back and verified on first use. A chunk that
//! fails is cleared from the bitmap and fetched again, never served. Verifying on every
//! read would hash a whole chunk (1 MiB by default) for every 4–128 KiB the kernel asks
//! for, costing the warm-read throughput this cache exists for. A chunk evicted (by this
//! daemon or another one sharing the work dir, see [`evict`]) is forgotten and verified
//! again once fetched. Other daemons sharing the work dir write the data file too: a
//! chunk they fetch is verified by them against their image's digests, and this daemon
//! trusts their writes of chunks it has verified already (as it trusts its own).
//!
//! # A full disk, a size limit
//! A chunk the cache file cannot take (no space) is served from memory, verified, for as
//! long as it stays among the last 64 MiB of such chunks, and fetched again
//! after that (`uncached_chunks`). With `size_limit`, chunks used least
//! recently are evicted to stay under it ([`evict`]).

pub mod chunk_map;
mod evict;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use chunk_map::ChunkMap;
use p2p_backend::BlobBackend;
use rafs::read::{Bootstrap, ChunkAddr, Inode};
use rafs::{BlobInfo, ChunkInfo};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// How often a reader re-examines a chunk whose fetches keep failing before giving up.
const MAX_ROUNDS: usize = 4;
/// How long after its start an on-demand read may still fetch a chunk itself that
/// another fetch (prefetch, readahead, another reader) failed to bring: a fetch that
/// failed at once (a corrupt chunk) is tried again; one that failed after the backend's
/// timeout is not, so that a read never waits for two timeouts (see [`ChunkCache::ensure`]).
const REFETCH_WINDOW: Duration = Duration::from_millis(500);
/// How long chunks whose fetch timed out (the backend did not answer) fail at once
/// instead of being fetched again. The kernel reads
/// a page again after its readahead failed: without this, a read of a hung backend would
/// wait for two timeouts.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// Sequential readers followed per blob (see the module docs).
pub const MAX_STREAMS: usize = 4;
/// Readahead requests in flight per image at most (each is a thread).
pub const MAX_RA_JOBS: u64 = 16;
/// Largest readahead request: registries answer large ranges much faster per byte
/// (docker-registry reads 4 MiB per range request however small the range).
pub const MAX_RA_REQUEST: u64 = 8 << 20;
/// How far (uncompressed bytes) from where a stream's reads went on a read still
/// continues it: the kernel's own readahead sends a sequential reader's requests a
/// little out of order, on several FUSE threads.
const STREAM_SLACK: u64 = 2 << 20;
/// Bytes of chunks held in memory per image when the cache disk cannot take them (at
/// least the newest chunk is held, whatever its size).
const SPILL_BYTES: usize = 64 << 20;
/// Spare data file handles kept per blob (about one per FUSE thread).
const MAX_SPARE_FILES: usize = 16;

/// Opens `path` for reading and writing, making it (empty) when missing and keeping
/// what it holds otherwise: how every cache file is opened.
pub(crate) fn open_or_create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// A byte-range lock operation (see [`range_lock`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lock {
    /// Shared.
    Read,
    /// Exclusive.
    Write,
    /// Released.
    Unlock,
}

/// Locks (or unlocks) bytes `start..start+len` of `file` with an open-file-description
/// lock (its owner is the open file, shared by the handles duplicated from it), waiting
/// when `wait`. Returns false when the range is locked elsewhere and `wait` is false.
pub(crate) fn range_lock(
    file: &File,
    op: Lock,
    start: u64,
    len: u64,
    wait: bool,
) -> std::io::Result<bool> {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsRawFd;
    let l_type = match op {
        Lock::Read => libc::F_RDLCK,
        Lock::Write => libc::F_WRLCK,
        Lock::Unlock => libc::F_UNLCK,
    };
    let fl = libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: len as libc::off_t,
        l_pid: 0,
    };
    let arg = || {
        if wait {
            FcntlArg::F_OFD_SETLKW(&fl)
        } else {
            FcntlArg::F_OFD_SETLK(&fl)
        }
    };
    loop {
        match fcntl(file.as_raw_fd(), arg()) {
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) if !wait => {
                return Ok(false)
            }
            // A work dir on a filesystem without byte-range locks: this daemon cannot
            // coordinate with others there. It goes on as if alone, except that it never
            // takes a lock it would need to be alone for (eviction, resetting files).
            Err(
                e @ (nix::errno::Errno::ENOSYS
                | nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::ENOLCK
                | nix::errno::Errno::EINVAL),
            ) => {
                static SAID: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !SAID.swap(true, Ordering::Relaxed) {
                    warn!(
                        "the cache's filesystem takes no byte-range locks ({e}): daemons \
                         sharing this work dir cannot coordinate, and nothing is evicted \
                         (said once)"
                    );
                }
                return Ok(op != Lock::Write || wait);
            }
            Err(e) => return Err(std::io::Error::from_raw_os_error(e as i32)),
        }
    }
}

/// A piece of a read, handed to the sink of [`ChunkCache::read_with`].
pub enum Piece<'a> {
    /// `len` bytes at `offset` of a cache data file.
    File {
        /// The data file (a handle of its own, positioned nowhere in particular).
        file: &'a mut File,
        /// Where the bytes are.
        offset: u64,
        /// How many.
        len: usize,
    },
    /// Bytes of a chunk the cache could not take (verified like any other).
    Bytes(&'a [u8]),
}

/// Who is asking for chunks: on-demand reads go ahead of prefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A FUSE read waiting for the bytes.
    OnDemand,
    /// Background prefetch.
    Prefetch,
    /// Sequential readahead on behalf of an on-demand reader.
    Readahead,
}

/// One blob as an image sees it: its table entry, over the blob's cache state, which
/// every image of the daemon that has this blob (in the same work directory) shares.
struct BlobCache {
    info: BlobInfo,
    /// Its index in the blob table.
    index: u32,
    /// One bit per ci: verified by this process against this image's digests (see the
    /// module docs). Per image, not shared: a chunk another image verified is checked
    /// against this image's own digest before this image serves it.
    verified: Arc<Vec<AtomicU8>>,
    state: Arc<BlobState>,
    /// The sequential readers readahead follows (see the module docs).
    streams: Mutex<Vec<Stream>>,
}

/// A sequential reader of a blob, as readahead follows it.
#[derive(Clone, Copy, Debug)]
struct Stream {
    /// The first chunk it read: reads from here on (less the slack), and within the
    /// slack of `next`, continue it.
    start: u32,
    /// The chunk after the furthest one it read.
    next: u32,
    /// The first chunk readahead has not handed out yet.
    ahead: u32,
    /// Compressed bytes kept in flight or ready past `next` (0: no readahead yet).
    window: u64,
    /// When it last read: the stream read longest ago makes room for a new one.
    used: Instant,
    /// Whether it met a chunk that was not cached: only then is readahead started.
    active: bool,
}

/// The cache state of one blob: its files, and who is fetching what. One per cache file
/// per process (see [`OpenBlobs`]): two images sharing a base layer fetch its chunks
/// once, wait for each other's fetches, and never write the same chunk map through two
/// handles.
struct BlobState {
    data: File,
    data_path: PathBuf,
    map: ChunkMap,
    /// Duplicates of `data` for readers (see [`BlobState::take_file`]).
    spare: Mutex<Vec<File>>,
    inflight: Mutex<HashSet<u32>>,
    done: Condvar,
    /// Held while a fetched chunk is written to `data` (see [`ChunkCache::fetch_run`]).
    writing: Mutex<()>,
    /// Chunks whose last fetch failed slowly, and when (see [`FAILURE_MEMORY`]).
    failed: Mutex<std::collections::HashMap<u32, Instant>>,
    /// The chunk map file, through which this process holds a read lock on it for as
    /// long as the blob is open: the sign to other processes that it is in use (see
    /// [`evict`]).
    _in_use: File,
    /// `<blob_id>.chunk_meta`, shared by the processes that have the blob open: per
    /// chunk its eviction generation and when it was last used, and the byte-range locks
    /// by which chunks are held (see [`evict`]).
    meta: File,
    /// Holds of chunks by this process (readers, fetches, files passed through): a
    /// chunk is locked in `meta` while its count is not 0.
    holds: Mutex<std::collections::HashMap<u32, u32>>,
    /// Each chunk's eviction generation when this process last saw it: a chunk whose
    /// generation moved on was evicted by another process.
    seen_gen: Vec<std::sync::atomic::AtomicU32>,
    /// The last-use time (seconds) this process last wrote for each chunk.
    last_written: Vec<std::sync::atomic::AtomicU32>,
    /// The images that have this blob open: their chunk layout (for eviction) and their
    /// verified bits (cleared when a chunk is evicted).
    images: Mutex<Vec<ImageOf>>,
    /// The digest of the chunk layout every image sharing these files agrees on
    /// ([`evict::layout_digest`]).
    layout: [u8; 32],
    /// Each chunk's (uncompressed offset, size), found on the first eviction (every image
    /// of the blob agrees on it: see `layout`); `None` when the blob must not have holes
    /// punched (see [`evict`]).
    punch_layout: std::sync::OnceLock<Option<Vec<(u64, u64)>>>,
}

/// An image that has a blob open, as the blob's state sees it.
struct ImageOf {
    bs: std::sync::Weak<Bootstrap>,
    blob_index: u32,
    verified: std::sync::Weak<Vec<AtomicU8>>,
}

impl std::ops::Deref for BlobCache {
    type Target = BlobState;

    fn deref(&self) -> &BlobState {
        &self.state
    }
}

/// The blob cache states a daemon has open, by cache data file: one per file, shared by
/// every image of the daemon that has the blob. Made once per daemon and given to each
/// of its images' [`ChunkCache`]s.
#[derive(Default)]
pub struct OpenBlobs {
    open: Mutex<Vec<(PathBuf, std::sync::Weak<BlobState>)>>,
}

impl OpenBlobs {
    /// No blob open yet.
    pub fn new() -> Arc<OpenBlobs> {
        Arc::new(OpenBlobs::default())
    }

    /// The open blobs' states.
    fn live(&self) -> Vec<(PathBuf, Arc<BlobState>)> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter()
            .filter_map(|(p, w)| Some((p.clone(), w.upgrade()?)))
            .collect()
    }

    /// The data files of the open blobs (canonical paths).
    fn data_paths(&self) -> Vec<PathBuf> {
        self.live().into_iter().map(|(p, _)| p).collect()
    }

    /// The open blobs whose files are in `work` (a canonical path).
    fn states_in(&self, work: &Path) -> Vec<Arc<BlobState>> {
        self.live()
            .into_iter()
            .filter(|(p, _)| p.parent() == Some(work))
            .map(|(_, s)| s)
            .collect()
    }

    /// The state of `info`'s blob in `work`: the one already open (by another image),
    /// or newly opened. An open blob whose shape differs from `info`'s is an error:
    /// resizing its files would pull them from under the other image.
    fn state(&self, work: &Path, info: &BlobInfo, layout: &[u8; 32]) -> Result<Arc<BlobState>> {
        let work = work.canonicalize().map_err(|source| Error::CacheIo {
            path: work.display().to_string(),
            source,
        })?;
        let key = work.join(format!("{}.blob.data", info.id));
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(state) = open
            .iter()
            .find(|(p, _)| *p == key)
            .and_then(|(_, w)| w.upgrade())
        {
            let size = state.data.metadata().map(|m| m.len()).unwrap_or(0);
            if state.layout != *layout {
                return Err(Error::Metadata(rafs::Error::invalid(
                    format!("blob {}", info.id),
                    "another image of this daemon lays its chunks out otherwise",
                )));
            }
            if state.map.count() != info.chunk_count || size != info.uncompressed_size {
                return Err(Error::Metadata(rafs::Error::invalid(
                    format!("blob {}", info.id),
                    format!(
                        "another image of this daemon has it with {} chunks and {size} bytes, \
                         this one says {} chunks and {} bytes",
                        state.map.count(),
                        info.chunk_count,
                        info.uncompressed_size
                    ),
                )));
            }
            return Ok(state);
        }
        let state = Arc::new(open_files(&work, info, layout)?);
        open.push((key, Arc::downgrade(&state)));
        Ok(state)
    }
}

/// Releases claimed chunks (and wakes waiters) when dropped, also on panic; a fetch
/// releases each chunk earlier, as soon as it is ready ([`Claims::release`]).
struct Claims<'a> {
    blob: &'a BlobCache,
    cis: Vec<u32>,
    /// Chunks of `cis` released already (no longer this fetch's to release: another
    /// fetch may have claimed them since).
    released: Mutex<HashSet<u32>>,
}

impl<'a> Claims<'a> {
    fn new(blob: &'a BlobCache, cis: Vec<u32>) -> Claims<'a> {
        Claims {
            blob,
            cis,
            released: Mutex::new(HashSet::new()),
        }
    }

    /// Releases claimed chunk `ci` now, waking the readers that wait for it.
    fn release(&self, ci: u32) {
        if !self.cis.contains(&ci) {
            return;
        }
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        if released.insert(ci) {
            let mut inflight = self.blob.inflight.lock().unwrap_or_else(|e| e.into_inner());
            inflight.remove(&ci);
            drop(inflight);
            self.blob.done.notify_all();
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let released = self.released.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut inflight = self.blob.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for ci in &self.cis {
            if !released.contains(ci) {
                inflight.remove(ci);
            }
        }
        drop(inflight);
        self.blob.done.notify_all();
    }
}

impl BlobCache {
    fn is_verified(&self, ci: u32) -> bool {
        self.verified[(ci / 8) as usize].load(Ordering::Acquire) & (0x80 >> (ci & 7)) != 0
    }

    fn set_verified(&self, ci: u32, on: bool) {
        let slot = &self.verified[(ci / 8) as usize];
        if on {
            slot.fetch_or(0x80 >> (ci & 7), Ordering::AcqRel);
        } else {
            slot.fetch_and(!(0x80 >> (ci & 7)), Ordering::AcqRel);
        }
    }
}

impl BlobState {
    /// A handle of the data file for one read (a `&mut File` is what zero-copy FUSE
    /// replies read from): a spare one, or a new duplicate.
    fn take_file(&self) -> Result<File> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match spare {
            Some(f) => Ok(f),
            None => self.data.try_clone().map_err(|e| self.io(e)),
        }
    }

    /// Returns a handle of [`BlobState::take_file`] (a few are kept).
    fn put_file(&self, f: File) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < MAX_SPARE_FILES {
            spare.push(f);
        }
    }

    /// Records an image that has this blob open.
    fn add_image(&self, bs: &Arc<Bootstrap>, blob_index: u32, verified: &Arc<Vec<AtomicU8>>) {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        images.retain(|i| i.bs.strong_count() > 0);
        images.push(ImageOf {
            bs: Arc::downgrade(bs),
            blob_index,
            verified: Arc::downgrade(verified),
        });
    }

    /// Remembers that fetching `cis` failed slowly just now.
    fn note_failed(&self, cis: impl Iterator<Item = u32>) {
        let now = Instant::now();
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.retain(|_, at| now.duration_since(*at) < FAILURE_MEMORY);
        failed.extend(cis.map(|ci| (ci, now)));
    }

    /// Whether a fetch of this blob failed slowly less than [`FAILURE_MEMORY`] ago: a
    /// backend that does not answer gets no readahead, only the reads waited for.
    fn failing(&self) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.values().any(|at| at.elapsed() < FAILURE_MEMORY)
    }

    /// The first of `cis` whose fetch failed slowly less than [`FAILURE_MEMORY`] ago,
    /// and how long ago.
    fn recently_failed(&self, cis: impl Iterator<Item = u32>) -> Option<(u32, Duration)> {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_empty() {
            return None;
        }
        cis.filter_map(|ci| Some((ci, failed.get(&ci)?.elapsed())))
            .find(|(_, ago)| *ago < FAILURE_MEMORY)
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::CacheIo {
            path: self.data_path.display().to_string(),
            source,
        }
    }
}

/// Per-blob chunk caches in front of one backend.
pub struct ChunkCache {
    bs: Arc<Bootstrap>,
    backend: Arc<dyn BlobBackend>,
    blobs: Vec<BlobCache>,
    validate: bool,
    amplify_io: u64,
    /// Bytes of readahead requests in flight at most (see the module docs).
    readahead_window: u64,
    /// Reads within this many chunks of where a stream went on continue it.
    stream_slack: u32,
    metrics: Arc<Metrics>,
    /// On-demand fetches in progress (prefetch backs off while non-zero).
    ondemand: AtomicU64,
    /// When a read last waited for the backend.
    last_ondemand: Stamp,
    /// When the cache disk last refused a chunk.
    last_spill: Stamp,
    /// Bytes of readahead requests in flight.
    readahead_bytes: AtomicU64,
    /// Readahead requests in flight (at most [`MAX_RA_JOBS`]).
    readahead_jobs: AtomicU64,
    /// Whether the first chunk the cache could not take has been logged.
    uncacheable_logged: std::sync::atomic::AtomicBool,
    /// Keeps the work dir under `size_limit`, when the config sets one.
    evictor: Option<evict::Evictor>,
    /// Chunks fetched and verified for this image that the cache disk could not take,
    /// by blob and ci, newest last, for the readers that wait for them (at most
    /// [`SPILL_BYTES`]).
    spill: Mutex<std::collections::VecDeque<Spilled>>,
    /// Request buffers for reuse (see [`Buffers`]).
    buffers: Arc<Buffers>,
}

/// A readahead request in flight: its bytes and itself counted against the image's
/// budget until dropped (also when its thread panics, or never started).
struct RaJob {
    cache: Arc<ChunkCache>,
    len: u64,
}

impl RaJob {
    /// Reserves `len` bytes and one request, unless the budget is spent (the first
    /// request always fits, however large).
    fn reserve(cache: &Arc<ChunkCache>, len: u64) -> Option<RaJob> {
        let jobs = cache.readahead_jobs.fetch_add(1, Ordering::AcqRel);
        let held = cache.readahead_bytes.fetch_add(len, Ordering::AcqRel);
        if jobs >= MAX_RA_JOBS || (held > 0 && held + len > cache.readahead_window) {
            cache.readahead_jobs.fetch_sub(1, Ordering::AcqRel);
            cache.readahead_bytes.fetch_sub(len, Ordering::AcqRel);
            return None;
        }
        Some(RaJob {
            cache: cache.clone(),
            len,
        })
    }
}

impl Drop for RaJob {
    fn drop(&mut self) {
        self.cache.readahead_jobs.fetch_sub(1, Ordering::AcqRel);
        self.cache
            .readahead_bytes
            .fetch_sub(self.len, Ordering::AcqRel);
    }
}

/// A request buffer size kept for reuse however small `amplify_io` is.
const DEFAULT_BUFFER: u64 = 1 << 20;

/// Buffers of backend requests kept for the next ones, up to a byte bound: without
/// them every request allocates (and zeroes) a fresh buffer of up to [`MAX_RA_REQUEST`],
/// and the allocator keeps the freed ones in per-thread arenas, where they add up to
/// far more than the readahead window (a 4 GiB cold read peaked at 247 MiB of RSS).
struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
    /// Bytes of capacity kept at most.
    bound: u64,
}

impl Buffers {
    fn new(bound: u64) -> Arc<Buffers> {
        Arc::new(Buffers {
            free: Mutex::new(Vec::new()),
            bound,
        })
    }

    /// A buffer of `len` bytes (their values unspecified), returned to the pool when
    /// dropped.
    fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest that fits, else a new one (growing one would copy its bytes).
        let fits = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let mut buf = match fits {
            Some(i) => free.swap_remove(i),
            // One size for every request up to the largest readahead request: any
            // buffer kept fits the next request (a buffer's pages are only touched as
            // far as its requests went).
            None => Vec::with_capacity(len.max(MAX_RA_REQUEST as usize)),
        };
        drop(free);
        // Bytes past the previous request's length are zeroed; the rest are not.
        buf.resize(len, 0);
        PooledBuf {
            buf,
            pool: self.clone(),
        }
    }
}

/// A buffer of [`Buffers`].
struct PooledBuf {
    buf: Vec<u8>,
    pool: Arc<Buffers>,
}

impl std::ops::Deref for PooledBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        let kept: u64 = free.iter().map(|b| b.capacity() as u64).sum();
        if kept + buf.capacity() as u64 <= self.pool.bound {
            free.push(buf);
        }
    }
}

/// A chunk held in memory: its blob index, ci, and bytes.
type Spilled = (u32, u32, Arc<Vec<u8>>);

/// A blob id is used as a file name in the work directory.
fn check_blob_id(id: &str) -> Result<()> {
    let ok =
        !id.is_empty() && id != "." && id != ".." && id.len() <= 200 && !id.contains(['/', '\0']);
    if ok {
        Ok(())
    } else {
        Err(Error::Metadata(rafs::Error::invalid(
            "blob table",
            format!("blob id {id:?} cannot name a cache file"),
        )))
    }
}

impl ChunkCache {
    /// Opens (or creates) the cache files of every blob of `bs` in `config.cache.work_dir`
    /// (or takes them from `open`, where another image of the daemon opened them), and
    /// checks the bootstrap's chunk table, rejecting an invalid record.
    pub fn new(
        bs: Arc<Bootstrap>,
        backend: Arc<dyn BlobBackend>,
        config: &Config,
        metrics: Arc<Metrics>,
        open: &Arc<OpenBlobs>,
    ) -> Result<ChunkCache> {
        let work = &config.cache.work_dir;
        std::fs::create_dir_all(work).map_err(|source| Error::CacheIo {
            path: work.display().to_string(),
            source,
        })?;
        // Two records for one chunk: which digest to trust would be ambiguous.
        bs.check_unique_chunks().map_err(Error::Metadata)?;
        let mut blobs = Vec::new();
        for (index, info) in bs.blobs().iter().enumerate() {
            check_blob_id(&info.id)?;
            blobs.push(BlobCache {
                info: info.clone(),
                index: index as u32,
                verified: Arc::new(bits(info.chunk_count)),
                state: open.state(
                    work,
                    info,
                    &evict::layout_digest(&bs, index as u32, info.chunk_count),
                )?,
                streams: Mutex::new(Vec::new()),
            });
            let b = blobs.last().expect("just pushed");
            b.state.add_image(&bs, b.index, &b.verified);
        }
        let chunk_size = (bs.superblock().chunk_size as u64).max(1);
        Ok(ChunkCache {
            stream_slack: (STREAM_SLACK / chunk_size).clamp(4, u32::MAX as u64) as u32,
            bs,
            backend,
            blobs,
            validate: config.digest_validate,
            amplify_io: config.amplify_io,
            readahead_window: config.readahead_window,
            metrics,
            ondemand: AtomicU64::new(0),
            last_ondemand: Stamp::default(),
            last_spill: Stamp::default(),
            readahead_bytes: AtomicU64::new(0),
            readahead_jobs: AtomicU64::new(0),
            uncacheable_logged: Default::default(),
            spill: Mutex::new(Default::default()),
            buffers: Buffers::new(
                config
                    .readahead_window
                    .saturating_add(4 * config.amplify_io.clamp(DEFAULT_BUFFER, MAX_RA_REQUEST)),
            ),
            evictor: match config.cache.size_limit {
                Some(limit) => Some(evict::Evictor::new(work, limit, open.clone()).map_err(
                    |source| Error::CacheIo {
                        path: work.join(".evict.lock").display().to_string(),
                        source,
                    },
                )?),
                None => None,
            },
        })
    }

    /// The bootstrap served.
    pub fn bootstrap(&self) -> &Arc<Bootstrap> {
        &self.bs
    }

    /// The daemon's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The backend's short name.
    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn BlobBackend> {
        &self.backend
    }

    /// The cache data files, for the metrics API.
    pub fn underlying_files(&self) -> Vec<String> {
        self.data_paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    }

    /// The cache data file of each blob, in blob-table order.
    pub fn data_paths(&self) -> Vec<&Path> {
        self.blobs.iter().map(|b| b.data_path.as_path()).collect()
    }

    /// (ready, total) chunks over all blobs.
    pub fn ready_chunks(&self) -> (u64, u64) {
        self.blobs.iter().fold((0, 0), |(r, t), b| {
            (r + b.map.ready_count() as u64, t + b.map.count() as u64)
        })
    }

    /// Whether on-demand or readahead fetches are running (prefetch yields to them).
    pub fn ondemand_busy(&self) -> bool {
        self.ondemand.load(Ordering::Acquire) > 0
    }

    /// Whether a read waited for the backend less than `within` ago (prefetch keeps
    /// fewer requests in flight then, so that the next such read shares the link and
    /// the CPUs with less of it).
    pub fn ondemand_recent(&self, within: Duration) -> bool {
        self.last_ondemand.within(within)
    }

    /// The trusted description of a chunk a file refers to.
    pub fn chunk_info(&self, addr: &ChunkAddr) -> Result<ChunkInfo> {
        self.bs
            .chunk_info(addr)
            .map_err(Error::Metadata)?
            .ok_or_else(|| Error::UnknownChunk {
                blob_id: self.blobs[addr.blob_index as usize].info.id.clone(),
                ci_index: addr.ci_index,
            })
    }

    /// The chunk `ci` of blob `blob_index`, if the chunk table knows it.
    pub fn chunk_by_ci(&self, blob_index: u32, ci: u32) -> Option<ChunkInfo> {
        self.bs.chunk_by_ci(blob_index, ci).ok().flatten()
    }

    /// Number of chunks of blob `blob_index`.
    pub fn chunk_count(&self, blob_index: u32) -> u32 {
        self.blobs[blob_index as usize].map.count()
    }

    /// Whether chunk `ci` of blob `blob_index` is ready in the cache.
    pub fn is_ready(&self, blob_index: u32, ci: u32) -> bool {
        self.blobs[blob_index as usize].map.is_ready(ci)
    }

    /// Whether every chunk of regular file `inode` is ready in the cache, verified by this
    /// image (or validation is off) and written back to the cache files (none dirty or
    /// being written in the page cache): then any read of it can be served from the cache
    /// files as they are on disk, without fetching or checking anything. Nothing is
    /// fetched or verified here: a chunk ready but not yet verified (after a restart)
    /// makes the answer false until a read has verified it. Chunks just fetched are not
    /// written back for a while: a direct-I/O read of them (a passed-through read, see
    /// [`crate::passthrough`]) would first wait for their writeback.
    pub fn file_on_disk(&self, inode: &Inode) -> Result<bool> {
        let cs = self.bs.superblock().chunk_size as u64;
        // Contiguous chunks of one blob are asked about at once.
        let mut range: Option<(u32, u64, u64)> = None;
        let pending = |(blob_index, start, end): (u32, u64, u64)| -> Result<bool> {
            let blob = &self.blobs[blob_index as usize];
            crate::passthrough::awaiting_writeback(&blob.data, start, end - start)
                .map_err(|e| blob.io(e))
        };
        for i in 0..self.bs.chunk_count(inode) {
            let addr = self.bs.chunk(inode, i).map_err(Error::Metadata)?;
            let c = self.chunk_info(&addr)?;
            // As in `read_with`: a chunk shorter than the file needs is never served.
            if (c.uncompressed_size as u64) < cs.min(inode.size - i * cs) {
                return Ok(false);
            }
            let blob = &self.blobs[addr.blob_index as usize];
            if !blob.map.is_ready(c.ci_index)
                || !blob.fresh(c.ci_index).map_err(|e| blob.io(e))?
                || (self.validate && !blob.is_verified(c.ci_index))
            {
                return Ok(false);
            }
            let (start, end) = (
                c.uncompressed_offset,
                c.uncompressed_offset + c.uncompressed_size as u64,
            );
            range = match range {
                Some((b, s, e)) if b == addr.blob_index && e.next_multiple_of(4096) == start => {
                    Some((b, s, end))
                }
                Some(r) => {
                    if pending(r)? {
                        return Ok(false);
                    }
                    Some((addr.blob_index, start, end))
                }
                None => Some((addr.blob_index, start, end)),
            };
        }
        Ok(match range {
            Some(r) => !pending(r)?,
            None => true,
        })
    }

    /// The bytes of chunk `ci` of `blob` if it is held in memory only (see `spill`).
    fn spilled(&self, blob: &BlobCache, ci: u32) -> Option<Arc<Vec<u8>>> {
        let spill = self.spill.lock().unwrap_or_else(|e| e.into_inner());
        spill
            .iter()
            .rev()
            .find(|(b, c, _)| *b == blob.index && *c == ci)
            .map(|(_, _, d)| d.clone())
    }

    /// Holds chunk `ci` of `blob` in memory, verified, dropping the oldest chunks beyond
    /// [`SPILL_BYTES`].
    fn spill(&self, blob: &BlobCache, ci: u32, data: Vec<u8>) {
        let mut spill = self.spill.lock().unwrap_or_else(|e| e.into_inner());
        spill.retain(|(b, c, _)| (*b, *c) != (blob.index, ci));
        let mut total: usize = spill.iter().map(|(_, _, d)| d.len()).sum::<usize>() + data.len();
        while total > SPILL_BYTES {
            match spill.pop_front() {
                Some((_, _, d)) => total -= d.len(),
                None => break,
            }
        }
        spill.push_back((blob.index, ci, Arc::new(data)));
        drop(spill);
        self.last_spill.mark();
    }

    /// Pins (`on`) or unpins the chunks of regular file `inode`: pinned chunks are held
    /// (see [`evict`]), never evicted by any process. A file is pinned before it is found
    /// wholly cached for passthrough, and unpinned when it is not passed through or its
    /// last passthrough open is released.
    /// Pinning either holds every chunk or, failing, none.
    pub fn pin_file(&self, inode: &Inode, on: bool) -> Result<()> {
        let mut chunks = Vec::new();
        for i in 0..self.bs.chunk_count(inode) {
            let addr = self.bs.chunk(inode, i).map_err(Error::Metadata)?;
            if (addr.blob_index as usize) < self.blobs.len() {
                chunks.push((addr.blob_index as usize, addr.ci_index));
            }
        }
        for (n, &(b, ci)) in chunks.iter().enumerate() {
            let blob = &self.blobs[b];
            if !on {
                blob.release_raw(ci);
            } else if let Err(e) = blob.hold_raw(ci) {
                for &(b, ci) in &chunks[..n] {
                    self.blobs[b].release_raw(ci);
                }
                return Err(blob.io(e));
            }
        }
        Ok(())
    }

    /// Reads `size` bytes at `offset` of a regular file (clamped to its size), appending
    /// them to `out`. Every byte comes from a verified chunk (unless validation is off).
    pub fn read(
        self: &Arc<Self>,
        inode: &Inode,
        offset: u64,
        size: u64,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.read_with(inode, offset, size, &mut |piece| match piece {
            Piece::File { file, offset, len } => {
                let at = out.len();
                out.resize(at + len, 0);
                file.read_exact_at(&mut out[at..], offset)
            }
            Piece::Bytes(b) => {
                out.extend_from_slice(b);
                Ok(())
            }
        })?;
        Ok(())
    }

    /// Like [`ChunkCache::read`], but hands each piece of the range to `sink`, once its
    /// chunk is ready and verified, as a cache data file, an offset in it and a length
    /// (so that a FUSE reply can be filled straight from the file, without a buffer in
    /// between; `sink` must consume exactly `len` bytes), or as bytes in memory when the
    /// cache could not take the chunk. Returns the bytes handed over.
    pub fn read_with(
        self: &Arc<Self>,
        inode: &Inode,
        offset: u64,
        size: u64,
        sink: &mut dyn FnMut(Piece<'_>) -> std::io::Result<()>,
    ) -> Result<u64> {
        let slices = self
            .bs
            .map_range(inode, offset, size)
            .map_err(Error::Metadata)?;
        let mut infos = Vec::with_capacity(slices.len());
        for s in &slices {
            let c = self.chunk_info(&s.chunk)?;
            if s.offset as u64 + s.len as u64 > c.uncompressed_size as u64 {
                return Err(Error::Metadata(rafs::Error::invalid(
                    format!("inode {}", inode.nid),
                    format!(
                        "chunk {} of the file is shorter ({} bytes) than the file needs",
                        s.file_chunk, c.uncompressed_size
                    ),
                )));
            }
            infos.push(c);
        }
        // Every chunk of the range is held from before it is made ready until its bytes
        // are handed over: no process evicts it in between.
        let mut holds = Vec::with_capacity(slices.len());
        for s in &slices {
            let blob = &self.blobs[s.chunk.blob_index as usize];
            holds.push(blob.hold(s.chunk.ci_index).map_err(|e| blob.io(e))?);
        }
        // A file's chunks are usually all in one blob: no grouping needed then.
        let first_blob = slices.first().map_or(0, |s| s.chunk.blob_index);
        if slices.iter().all(|s| s.chunk.blob_index == first_blob) {
            if !infos.is_empty() {
                self.ensure_for_read(first_blob, &infos)?;
            }
        } else {
            for blob_index in 0..self.blobs.len() as u32 {
                let chunks: Vec<ChunkInfo> = slices
                    .iter()
                    .zip(&infos)
                    .filter(|(s, _)| s.chunk.blob_index == blob_index)
                    .map(|(_, c)| *c)
                    .collect();
                if !chunks.is_empty() {
                    self.ensure_for_read(blob_index, &chunks)?;
                }
            }
        }
        let mut total = 0;
        for (s, c) in slices.iter().zip(&infos) {
            let blob = &self.blobs[s.chunk.blob_index as usize];
            let (at, len) = (s.offset as usize, s.len as usize);
            let mut tries = 0;
            blob.touch(c.ci_index);
            let res = loop {
                if blob.map.is_ready(c.ci_index) {
                    let mut file = blob.take_file()?;
                    let res = sink(Piece::File {
                        file: &mut file,
                        offset: c.uncompressed_offset + at as u64,
                        len,
                    });
                    blob.put_file(file);
                    break res;
                }
                // Not cached (a full disk): served from memory.
                if let Some(data) = self.spilled(blob, c.ci_index) {
                    break sink(Piece::Bytes(&data[at..at + len]));
                }
                // Dropped from memory meanwhile: fetched again, once.
                tries += 1;
                if tries > 2 {
                    return Err(Error::Unavailable {
                        blob_id: blob.info.id.clone(),
                        ci_index: c.ci_index,
                        reason: "the cache cannot hold it and other reads pushed it out".into(),
                    });
                }
                self.ensure_inner(
                    s.chunk.blob_index,
                    std::slice::from_ref(c),
                    Priority::OnDemand,
                )?;
            };
            res.map_err(|e| blob.io(e))?;
            total += s.len as u64;
        }
        drop(holds);
        Ok(total)
    }

    /// [`ChunkCache::ensure`] for an on-demand read, keeping a sequential reader's
    /// readahead window filled first (see the module docs).
    fn ensure_for_read(self: &Arc<Self>, blob_index: u32, chunks: &[ChunkInfo]) -> Result<()> {
        let first = chunks.iter().map(|c| c.ci_index).min();
        let last = chunks.iter().map(|c| c.ci_index).max();
        if let (Some(first), Some(last)) = (first, last) {
            let blob = &self.blobs[blob_index as usize];
            let missed = chunks.iter().any(|c| !blob.map.is_ready(c.ci_index));
            self.follow(blob_index, first, last, missed);
        }
        self.ensure_inner(blob_index, chunks, Priority::OnDemand)
    }

    /// Makes `chunks` (all of blob `blob_index`) ready and verified, fetching what is
    /// missing (one fetch per chunk however many readers wait for it).
    ///
    /// An on-demand read waits at most one backend request's worst case (its timeouts
    /// and retries): for its own fetch, or for the fetch it waits on, started before it;
    /// when that one failed after more than [`REFETCH_WINDOW`], the read fails too
    /// instead of starting another.
    pub fn ensure(&self, blob_index: u32, chunks: &[ChunkInfo], prio: Priority) -> Result<()> {
        self.ensure_inner(blob_index, chunks, prio)
    }

    fn ensure_inner(&self, blob_index: u32, chunks: &[ChunkInfo], prio: Priority) -> Result<()> {
        let blob = &self.blobs[blob_index as usize];
        let started = Instant::now();
        let mut pending: Vec<ChunkInfo> = chunks.to_vec();
        pending.sort_by_key(|c| c.ci_index);
        pending.dedup_by_key(|c| c.ci_index);
        for round in 0..MAX_ROUNDS {
            if round > 0 && prio == Priority::OnDemand && started.elapsed() > REFETCH_WINDOW {
                break;
            }
            // Chunks ready and verified are done; ready but unverified ones are checked.
            let mut missing = Vec::new();
            let asked = pending.len();
            for c in pending {
                if !self.usable(blob, &c)? {
                    missing.push(c);
                }
            }
            if round == 0 && prio == Priority::OnDemand {
                Metrics::add(&self.metrics.cache.hits, (asked - missing.len()) as u64);
            }
            if missing.is_empty() {
                return Ok(());
            }
            if let Some((ci, ago)) = blob.recently_failed(missing.iter().map(|c| c.ci_index)) {
                return Err(Error::Unavailable {
                    blob_id: blob.info.id.clone(),
                    ci_index: ci,
                    reason: format!(
                        "its fetch failed {} ms ago after the backend's timeout; \
                         not asked again yet",
                        ago.as_millis()
                    ),
                });
            }
            // Claim what nobody fetches; wait for the rest.
            let (mine, theirs) = self.claim(blob, &missing, prio);
            if !mine.cis.is_empty() {
                let requested: HashSet<u32> = missing.iter().map(|c| c.ci_index).collect();
                self.fetch(&mine, &requested, prio)?;
                drop(mine);
            }
            if !theirs.is_empty() {
                let mut inflight = blob.inflight.lock().unwrap_or_else(|e| e.into_inner());
                while theirs.iter().any(|ci| inflight.contains(ci)) {
                    inflight = blob.done.wait(inflight).unwrap_or_else(|e| e.into_inner());
                }
            }
            pending = missing;
        }
        // Someone else's fetches failed; a last check says which chunk is missing.
        for c in &pending {
            if !self.usable(blob, c)? {
                return Err(Error::Unavailable {
                    blob_id: blob.info.id.clone(),
                    ci_index: c.ci_index,
                    reason: "the fetch this read waited for failed".into(),
                });
            }
        }
        Ok(())
    }

    /// Follows an on-demand read of chunks `first..=last` of blob `blob_index`: finds the
    /// stream it continues (or starts one), grows that stream's window when the read
    /// moved on to a new chunk, and hands the part of the window not yet fetched to
    /// readahead (see the module docs) — once the stream has `missed` a chunk: a reader
    /// of cached (prefetched) files pulls nothing in after them.
    fn follow(self: &Arc<Self>, blob_index: u32, first: u32, last: u32, missed: bool) {
        let slack = self.stream_slack;
        // A read over distant chunks (deduplicated ones) is no sequential step.
        if self.readahead_window == 0 || self.amplify_io == 0 || last - first > slack {
            return;
        }
        let blob = &self.blobs[blob_index as usize];
        let mut streams = blob.streams.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // The stream whose reads went on closest to this one, within the slack either
        // way (reads reach the daemon a little out of order).
        let found = streams
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                first.saturating_add(slack) >= s.start
                    && first.saturating_add(slack) >= s.next
                    && first <= s.next.saturating_add(slack)
            })
            .min_by_key(|(_, s)| first.abs_diff(s.next))
            .map(|(i, _)| i);
        let Some(i) = found else {
            // Only a read that missed starts a stream: cache hits (another reader going
            // back, small files read from the cache) do not push out the streams of
            // readers waiting for the network.
            if !missed {
                return;
            }
            let stream = Stream {
                start: first,
                next: last + 1,
                ahead: last + 1,
                window: 0,
                used: now,
                active: false,
            };
            if streams.len() < MAX_STREAMS {
                streams.push(stream);
            } else if let Some(oldest) = streams.iter_mut().min_by_key(|s| s.used) {
                // The stream read longest ago makes room.
                *oldest = stream;
            }
            return;
        };
        let s = &mut streams[i];
        s.used = now;
        s.start = s.start.min(first);
        if last < s.next {
            // Still within chunks it read: nothing new to fetch ahead.
            return;
        }
        s.window = if s.window == 0 {
            self.amplify_io
        } else {
            s.window.saturating_mul(2)
        }
        .min(self.readahead_window);
        s.next = last + 1;
        s.ahead = s.ahead.max(s.next);
        s.active |= missed;
        if s.active {
            self.fill_window(blob, s);
        }
    }

    /// Claims the missing chunks of stream `s`'s window not handed out yet and fetches
    /// them in the background, in requests of compressed-contiguous chunks, while the
    /// image's readahead stays within `readahead_window` bytes and [`MAX_RA_JOBS`]
    /// requests in flight. Chunks the chunk table lacks are left to the reads that need
    /// them; nothing is read ahead for a while after the cache disk refused a chunk.
    fn fill_window(self: &Arc<Self>, blob: &BlobCache, s: &mut Stream) {
        let count = blob.map.count();
        if s.next >= count || blob.failing() || self.spilling() {
            return;
        }
        let Some(base) = self.chunk_by_ci(blob.index, s.next) else {
            return;
        };
        let limit = base.compressed_offset.saturating_add(s.window);
        let request_max =
            (s.window / 4).clamp(self.amplify_io, MAX_RA_REQUEST.max(self.amplify_io));
        let mut ci = s.ahead;
        // Requests of a full size, unless the reader has caught up with readahead: the
        // window is topped up a request at a time, not a chunk at a time.
        if ci > s.next {
            match self.chunk_by_ci(blob.index, ci.min(count - 1)) {
                Some(c) if c.compressed_offset + request_max <= limit => {}
                _ => return,
            }
        }
        while ci < count {
            // The request is chosen and, once the budget is reserved, claimed under one
            // hold of the lock: no reader sees a chunk claimed that is not fetched.
            let mut inflight = blob.inflight.lock().unwrap_or_else(|e| e.into_inner());
            let mut mine = Vec::new();
            let (mut start, mut end) = (0, 0);
            let mut past_window = false;
            while ci < count {
                let Some(c) = self.chunk_by_ci(blob.index, ci) else {
                    if mine.is_empty() {
                        ci += 1;
                        continue;
                    }
                    break;
                };
                let c_end = c.compressed_offset + c.compressed_size as u64;
                // Past the window (a chunk that starts inside it is taken whole).
                if c.compressed_offset >= limit && c.compressed_offset > base.compressed_offset {
                    past_window = true;
                    break;
                }
                if blob.map.is_ready(ci) || inflight.contains(&ci) {
                    if mine.is_empty() {
                        ci += 1;
                        continue;
                    }
                    break;
                }
                if mine.is_empty() {
                    (start, end) = (c.compressed_offset, c.compressed_offset);
                }
                if c.compressed_offset != end || (c_end - start > request_max && !mine.is_empty()) {
                    break;
                }
                mine.push(ci);
                end = c_end;
                ci += 1;
            }
            if mine.is_empty() {
                break;
            }
            let Some(job) = RaJob::reserve(self, end - start) else {
                // The budget is spent: these wait for a later read to hand them out.
                ci = mine[0];
                break;
            };
            for ci in &mine {
                inflight.insert(*ci);
            }
            drop(inflight);
            let (copy, first) = (mine.clone(), mine[0]);
            let me = self.clone();
            let blob_index = blob.index;
            let spawned = std::thread::Builder::new()
                .name("readahead".into())
                .spawn(move || {
                    let claims = Claims::new(&me.blobs[blob_index as usize], mine);
                    // Errors are logged by the fetch; readers needing these chunks
                    // fetch them again or fail on their own.
                    let _ = me.fetch(&claims, &HashSet::new(), Priority::Readahead);
                    drop(claims);
                    drop(job);
                });
            if spawned.is_err() {
                // The claims went with a closure that never ran (the budget too).
                drop(Claims::new(blob, copy));
                ci = first;
                break;
            }
            if past_window {
                break;
            }
        }
        s.ahead = ci;
    }

    /// Whether the cache disk refused a chunk less than [`FAILURE_MEMORY`] ago: readahead
    /// would push the chunks held in memory out from under the readers waiting for them.
    fn spilling(&self) -> bool {
        self.last_spill.within(FAILURE_MEMORY)
    }

    /// Whether a chunk can be served now; verifies a ready chunk not yet verified by this
    /// process and clears it when it is corrupt.
    fn usable(&self, blob: &BlobCache, c: &ChunkInfo) -> Result<bool> {
        let ci = c.ci_index;
        // Held while looked at and read: no process evicts it meanwhile.
        let _hold = blob.hold(ci).map_err(|e| blob.io(e))?;
        if !blob.map.is_ready(ci) || !blob.fresh(ci).map_err(|e| blob.io(e))? {
            return Ok(self.spilled(blob, ci).is_some());
        }
        if !self.validate || blob.is_verified(ci) {
            return Ok(true);
        }
        let mut data = vec![0u8; c.uncompressed_size as usize];
        blob.data
            .read_exact_at(&mut data, c.uncompressed_offset)
            .map_err(|e| blob.io(e))?;
        match rafs::read::verify_chunk(&blob.info, c, &data) {
            Ok(()) => {
                blob.set_verified(c.ci_index, true);
                Ok(true)
            }
            Err(e) => {
                Metrics::add(&self.metrics.cache.cache_corruptions, 1);
                warn!(
                    "cached chunk {} of blob {} is corrupt ({e}); fetching it again",
                    c.ci_index, blob.info.id
                );
                blob.map.clear(c.ci_index)?;
                Ok(false)
            }
        }
    }

    /// Claims the missing chunks nobody is fetching, plus (for on-demand reads) the
    /// following chunks of the blob up to `amplify_io`. Returns the claims and the ci
    /// indexes others are fetching.
    fn claim<'a>(
        &self,
        blob: &'a BlobCache,
        missing: &[ChunkInfo],
        prio: Priority,
    ) -> (Claims<'a>, Vec<u32>) {
        let mut inflight = blob.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        for c in missing {
            if blob.map.is_ready(c.ci_index) {
                // Became ready meanwhile: the next round verifies it.
                continue;
            }
            if inflight.insert(c.ci_index) {
                mine.push(c.ci_index);
            } else {
                theirs.push(c.ci_index);
            }
        }
        if prio == Priority::OnDemand && self.amplify_io > 0 && !mine.is_empty() {
            let last = missing
                .iter()
                .max_by_key(|c| c.ci_index)
                .expect("non-empty");
            let mut end = last.compressed_offset + last.compressed_size as u64;
            let first = missing
                .iter()
                .map(|c| c.compressed_offset)
                .min()
                .unwrap_or(end);
            let mut ci = last.ci_index + 1;
            while ci < blob.map.count() {
                let Some(next) = self.chunk_by_ci(blob.index, ci) else {
                    break;
                };
                let next_end = next.compressed_offset + next.compressed_size as u64;
                if next.compressed_offset != end
                    || next_end - first > self.amplify_io
                    || blob.map.is_ready(ci)
                    || !inflight.insert(ci)
                {
                    break;
                }
                mine.push(ci);
                end = next_end;
                ci += 1;
            }
        }
        (Claims::new(blob, mine), theirs)
    }

    /// Fetches the claimed chunks in merged requests, verifies and caches them. Fails when
    /// a chunk in `requested` could not be made ready.
    fn fetch(&self, claims: &Claims<'_>, requested: &HashSet<u32>, prio: Priority) -> Result<()> {
        let blob = claims.blob;
        let mut chunks: Vec<ChunkInfo> = claims
            .cis
            .iter()
            .filter_map(|ci| self.chunk_by_ci(blob.index, *ci))
            .collect();
        chunks.sort_by_key(|c| c.compressed_offset);
        let bound = match prio {
            Priority::OnDemand => self.amplify_io,
            Priority::Readahead | Priority::Prefetch => u64::MAX,
        };
        let _busy = (prio != Priority::Prefetch).then(|| OnDemandGuard::new(&self.ondemand));
        let _waited = (prio == Priority::OnDemand).then(|| OnDemandMark(self));
        let mut first_err = None;
        let mut i = 0;
        while i < chunks.len() {
            // One run: compressed-contiguous chunks, at most `bound` bytes (at least one).
            let start = chunks[i].compressed_offset;
            let mut end = start + chunks[i].compressed_size as u64;
            let mut j = i + 1;
            while j < chunks.len()
                && chunks[j].compressed_offset == end
                && end + chunks[j].compressed_size as u64 - start <= bound
            {
                end += chunks[j].compressed_size as u64;
                j += 1;
            }
            let run = &chunks[i..j];
            i = j;
            // A backend that failed one request (after its timeouts and retries) is not
            // asked for the next: the claims are released and waiting readers fail now.
            let t = Instant::now();
            if let Err(e) = self.fetch_run(claims, run, prio) {
                let timed_out = matches!(
                    e,
                    Error::Backend {
                        source: p2p_backend::BackendError::TimedOut { .. },
                        ..
                    }
                );
                if timed_out && t.elapsed() > REFETCH_WINDOW {
                    blob.note_failed(
                        claims
                            .cis
                            .iter()
                            .copied()
                            .filter(|ci| !blob.map.is_ready(*ci)),
                    );
                }
                first_err = Some(e);
                break;
            }
        }
        if let Some(e) = &self.evictor {
            e.check(self);
        }
        // A requested chunk that failed alone (digest) is reported by the check below.
        let unready = |ci: &u32| {
            claims.cis.contains(ci) && !blob.map.is_ready(*ci) && self.spilled(blob, *ci).is_none()
        };
        if let Some(e) = first_err {
            if requested.iter().any(unready) {
                return Err(e);
            }
        }
        for ci in requested {
            if unready(ci) {
                return Err(Error::Integrity {
                    blob_id: blob.info.id.clone(),
                    ci_index: *ci,
                    source: rafs::Error::invalid("chunk", "failed verification"),
                });
            }
        }
        Ok(())
    }

    /// One backend request for compressed-contiguous chunks; each chunk is decoded,
    /// verified and cached on its own. Returns the backend error if the request failed.
    fn fetch_run(&self, claims: &Claims<'_>, run: &[ChunkInfo], prio: Priority) -> Result<()> {
        let blob = claims.blob;
        let start = run[0].compressed_offset;
        let last = run.last().expect("non-empty run");
        let len = last.compressed_offset + last.compressed_size as u64 - start;
        let mut buf = self.buffers.take(len as usize);
        let m = &self.metrics;
        let t = Instant::now();
        Metrics::add(&m.backend.read_count, 1);
        if prio == Priority::Prefetch {
            Metrics::add(&m.cache.prefetch_requests, 1);
        }
        debug!(
            "blob {}: fetching {len} bytes at {start}: chunks {}..={} ({prio:?})",
            blob.info.id, run[0].ci_index, last.ci_index
        );
        let res =
            self.backend
                .read_at_for(&blob.info.id, start, &mut buf, prio == Priority::Prefetch);
        Metrics::add(
            &m.backend.read_latency_us_total,
            t.elapsed().as_micros() as u64,
        );
        if let Err(source) = res {
            Metrics::add(&m.backend.read_errors, 1);
            error!(
                "blob {}: {} backend read of {len} bytes at offset {start} failed: {source}",
                blob.info.id,
                self.backend.kind()
            );
            return Err(Error::Backend {
                blob_id: blob.info.id.clone(),
                offset: start,
                len,
                source,
            });
        }
        Metrics::add(&m.backend.read_amount_total, len);
        for c in run {
            let off = (c.compressed_offset - start) as usize;
            let stored = &buf[off..off + c.compressed_size as usize];
            let data = match self.decode(blob, c, stored) {
                Ok(d) => d,
                Err(e) => {
                    Metrics::add(&m.cache.digest_errors, 1);
                    error!(
                        "blob {}: chunk {} from the {} backend is corrupt: {e}",
                        blob.info.id,
                        c.ci_index,
                        self.backend.kind()
                    );
                    // A backend that can bring other bytes (a P2P peer that drops the
                    // piece and its sender) is told, and the chunk read once more.
                    match self.refetch(blob, c) {
                        Some(d) => std::borrow::Cow::Owned(d),
                        None => {
                            claims.release(c.ci_index);
                            continue;
                        }
                    }
                }
            };
            // Held from the write to the ready bit: no process evicts it in between.
            let _hold = blob.hold(c.ci_index).map_err(|e| blob.io(e))?;
            // One writer at a time, waiting asleep: concurrent writes to one file
            // serialize on its inode lock anyway, where waiters spin on the CPU the
            // other fetches need.
            let written = {
                let _one = blob.writing.lock().unwrap_or_else(|e| e.into_inner());
                blob.data.write_all_at(&data, c.uncompressed_offset)
            };
            if let Err(e) = written {
                // A full cache disk (or one failing): the chunk is served from memory,
                // verified, and fetched again next time.
                Metrics::add(&m.cache.uncached_chunks, 1);
                if !self.uncacheable_logged.swap(true, Ordering::AcqRel) {
                    warn!(
                        "cache file {}: {e}; chunks that cannot be cached are served \
                         straight from the backend (counted in uncached_chunks; logged once)",
                        blob.data_path.display()
                    );
                }
                self.spill(blob, c.ci_index, data.into_owned());
                claims.release(c.ci_index);
                continue;
            }
            blob.set_verified(c.ci_index, true);
            blob.note_written(c.ci_index).map_err(|e| blob.io(e))?;
            blob.map.set_ready(c.ci_index)?;
            blob.touch(c.ci_index);
            // Ready: its readers go on now, not when the whole request is done.
            claims.release(c.ci_index);
            if let Some(e) = &self.evictor {
                e.wrote(data.len() as u64);
            }
            match prio {
                Priority::OnDemand | Priority::Readahead => Metrics::add(&m.cache.misses, 1),
                Priority::Prefetch => {
                    Metrics::add(&m.cache.prefetch_chunks, 1);
                    Metrics::add(&m.cache.prefetch_bytes, data.len() as u64);
                }
            }
        }
        Ok(())
    }
}

impl ChunkCache {
    /// The uncompressed bytes of chunk `c` from its stored bytes, checked against its
    /// digest unless validation is off.
    fn decode<'a>(
        &self,
        blob: &BlobCache,
        c: &ChunkInfo,
        stored: &'a [u8],
    ) -> rafs::Result<std::borrow::Cow<'a, [u8]>> {
        if self.validate {
            rafs::read::decode_chunk_cow(&blob.info, c, stored)
        } else {
            rafs::read::decompress_chunk(&blob.info, c, stored)
        }
    }

    /// Chunk `c` of `blob`, which failed its digest: reported to the backend and read
    /// once more when the backend may bring other bytes; the decoded chunk, or `None`.
    fn refetch(&self, blob: &BlobCache, c: &ChunkInfo) -> Option<Vec<u8>> {
        let (offset, len) = (c.compressed_offset, c.compressed_size as u64);
        if !self.backend.report_bad(&blob.info.id, offset, len) {
            return None;
        }
        let mut buf = vec![0u8; len as usize];
        let again = self
            .backend
            .read_at(&blob.info.id, offset, &mut buf)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.decode(blob, c, &buf)
                    .map(|d| d.into_owned())
                    .map_err(|e| e.to_string())
            });
        match again {
            Ok(d) => {
                warn!(
                    "blob {}: chunk {} is right when read again",
                    blob.info.id, c.ci_index
                );
                Some(d)
            }
            Err(e) => {
                error!(
                    "blob {}: chunk {} read again: {e}",
                    blob.info.id, c.ci_index
                );
                Metrics::add(&self.metrics.cache.digest_errors, 1);
                None
            }
        }
    }
}

/// Records, when dropped, that a read waited for the backend until now.
struct OnDemandMark<'a>(&'a ChunkCache);

impl Drop for OnDemandMark<'_> {
    fn drop(&mut self) {
        self.0.last_ondemand.mark();
    }
}

/// When something last happened, readable and settable from any thread without a lock.
struct Stamp {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last time (0: never).
    last_ms: AtomicU64,
}

impl Default for Stamp {
    fn default() -> Self {
        Stamp {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Stamp {
    /// It happens now.
    fn mark(&self) {
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        self.last_ms.store(now, Ordering::Release);
    }

    /// Whether it last happened less than `d` ago.
    fn within(&self, d: Duration) -> bool {
        let last = self.last_ms.load(Ordering::Acquire);
        last > 0
            && (self.epoch.elapsed().as_millis() as u64).saturating_sub(last) < d.as_millis() as u64
    }
}

/// Counts an on-demand fetch in progress for its lifetime.
struct OnDemandGuard<'a>(&'a AtomicU64);

impl<'a> OnDemandGuard<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        OnDemandGuard(c)
    }
}

impl Drop for OnDemandGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One bit per chunk, all clear.
fn bits(count: u32) -> Vec<AtomicU8> {
    (0..count.div_ceil(8)).map(|_| AtomicU8::new(0)).collect()
}

fn open_files(work: &Path, info: &BlobInfo, layout: &[u8; 32]) -> Result<BlobState> {
    let data_path = work.join(format!("{}.blob.data", info.id));
    let map_path = work.join(format!("{}.chunk_map", info.id));
    let io = |p: &Path, source| Error::CacheIo {
        path: p.display().to_string(),
        source,
    };
    let meta_path = work.join(format!("{}.chunk_meta", info.id));
    let lock = evict::lock_in_use(&map_path).map_err(|e| io(&map_path, e))?;
    let data = open_or_create(&data_path).map_err(|e| io(&data_path, e))?;
    let len = data.metadata().map_err(|e| io(&data_path, e))?.len();
    // Files of another shape are reset below — only when no other daemon has the blob
    // open: it would go on serving from them.
    let mismatch = evict::shape_mismatch(
        &data_path,
        &map_path,
        &meta_path,
        info.uncompressed_size,
        info.chunk_count,
        layout,
    )
    .map_err(|e| io(&map_path, e))?;
    let exclusive = match &mismatch {
        Some(what) => {
            if !evict::lock_exclusive(&lock).map_err(|e| io(&map_path, e))? {
                return Err(Error::Metadata(rafs::Error::invalid(
                    format!("blob {}", info.id),
                    format!(
                        "another daemon has its cache files in {} open with another shape \
                         ({what}); they are not reset under it",
                        work.display()
                    ),
                )));
            }
            true
        }
        None => false,
    };
    if len != info.uncompressed_size {
        if len != 0 {
            warn!(
                "cache file {} has {len} bytes, expected {}: discarding its chunk map",
                data_path.display(),
                info.uncompressed_size
            );
            // Emptied, not removed: this process's lock is on this file.
            lock.set_len(0).map_err(|e| io(&map_path, e))?;
        }
        data.set_len(info.uncompressed_size)
            .map_err(|e| io(&data_path, e))?;
    }
    let (meta, seen_gen) =
        evict::open_meta(&meta_path, info.chunk_count, layout).map_err(|e| io(&meta_path, e))?;
    let (mut map, reset) = ChunkMap::open(&map_path, info.chunk_count)?;
    map.share(
        meta.try_clone().map_err(|e| io(&meta_path, e))?,
        evict::MAP_LOCKS,
    );
    if reset {
        warn!("chunk map {} was malformed: reset", map_path.display());
    }
    if exclusive {
        evict::lock_shared(&lock).map_err(|e| io(&map_path, e))?;
    }
    if map.ready_count() > 0 {
        info!(
            "blob {}: {} of {} chunks already cached",
            info.id,
            map.ready_count(),
            map.count()
        );
    }
    Ok(BlobState {
        data,
        data_path,
        map,
        spare: Mutex::new(Vec::new()),
        inflight: Mutex::new(HashSet::new()),
        done: Condvar::new(),
        writing: Mutex::new(()),
        failed: Mutex::new(Default::default()),
        _in_use: lock,
        layout: *layout,
        meta,
        holds: Mutex::new(Default::default()),
        seen_gen,
        last_written: (0..info.chunk_count)
            .map(|_| std::sync::atomic::AtomicU32::new(0))
            .collect(),
        images: Mutex::new(Vec::new()),
        punch_layout: std::sync::OnceLock::new(),
    })
}
