//! The chunk cache without FUSE: exact bytes, no backend traffic when warm or after a
//! restart, single-flight fetches, merging, and corruption from the backend or in the
//! cache file never served.

use nydusd::cache::{ChunkCache, OpenBlobs};
use nydusd::config::Config;
use nydusd::metrics::Metrics;
use p2p_backend::localfs::LocalFs;
use p2p_backend::{BackendError, BlobBackend};
use rafs::read::Bootstrap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A localfs backend that counts requests and can corrupt or refuse them, or answer
/// them slowly and out of order.
struct Counting {
    inner: LocalFs,
    reads: AtomicU64,
    bytes: AtomicU64,
    corrupt_at: Mutex<Option<u64>>,
    down: AtomicBool,
    /// Each request takes 1 to 3 times this long (by its offset), microseconds: later
    /// requests often finish first.
    delay_us: AtomicU64,
    inflight: AtomicU64,
    max_inflight: AtomicU64,
}

impl Counting {
    fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Counting {
            inner: LocalFs::new(dir),
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            corrupt_at: Mutex::new(None),
            down: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            max_inflight: AtomicU64::new(0),
        })
    }
    fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
    /// Waits until no request is in flight (readahead settled), at most 10 s.
    fn settle(&self) {
        let t = std::time::Instant::now();
        while self.inflight.load(Ordering::SeqCst) > 0 {
            assert!(t.elapsed().as_secs() < 10, "requests still in flight");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(self.inflight.load(Ordering::SeqCst), 0);
    }
}

/// Counts a request in flight while alive.
struct InFlight<'a>(&'a Counting);

impl<'a> InFlight<'a> {
    fn new(c: &'a Counting) -> Self {
        let now = c.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_inflight.fetch_max(now, Ordering::SeqCst);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlobBackend for Counting {
    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> p2p_backend::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(buf.len() as u64, Ordering::SeqCst);
        let _inflight = InFlight::new(self);
        let delay = self.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            let factor = 1 + (offset / 0x10000) % 3;
            std::thread::sleep(std::time::Duration::from_micros(delay * factor));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(BackendError::Remote {
                what: blob_id.into(),
                reason: "backend down".into(),
            });
        }
        self.inner.read_at(blob_id, offset, buf)?;
        if let Some(at) = *self.corrupt_at.lock().unwrap() {
            if at >= offset && at < offset + buf.len() as u64 {
                buf[(at - offset) as usize] ^= 0x5a;
            }
        }
        Ok(())
    }
    fn blob_size(&self, blob_id: &str) -> p2p_backend::Result<u64> {
        self.inner.blob_size(blob_id)
    }
    fn kind(&self) -> &'static str {
        "counting"
    }
}

struct Image {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    boot: PathBuf,
    blobs: PathBuf,
    work: PathBuf,
}

/// Pseudo-random bytes (xorshift), compressible enough to exercise zstd a little.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                b'a'
            } else {
                x as u8
            }
        })
        .collect()
}

/// Files: 3 big ones (several 64 KiB chunks each) and 40 small ones.
fn image() -> Image {
    let mut files = Vec::new();
    for i in 0..3u64 {
        files.push((format!("big{i}"), bytes(i + 1, 300_000 + i as usize * 7)));
    }
    for i in 0..40u64 {
        files.push((format!("small/f{i:02}"), bytes(100 + i, 1000 + i as usize)));
    }
    image_of(&files)
}

/// An image of `files` (paths relative to the root, and contents), in 64 KiB chunks.
fn image_of(files: &[(String, Vec<u8>)]) -> Image {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for (path, data) in files {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let boot = tmp.path().join("image.boot");
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut o = converter::CreateOptions::new(&src, converter::SourceType::Directory);
    o.bootstrap = Some(boot.clone());
    o.blob_dir = Some(blobs.clone());
    o.chunk_size = 0x10000;
    converter::create(&o).unwrap();
    let work = tmp.path().join("cache");
    Image {
        _tmp: tmp,
        src,
        boot,
        blobs,
        work,
    }
}

fn config(img: &Image, amplify_io: u64) -> Config {
    let mut c = Config::localfs(img.blobs.clone(), img.work.clone());
    c.amplify_io = amplify_io;
    c
}

fn open(img: &Image, backend: Arc<Counting>, cfg: &Config) -> (Arc<ChunkCache>, Arc<Metrics>) {
    let bs = Arc::new(Bootstrap::open(&img.boot).unwrap());
    let metrics = Arc::new(Metrics::default());
    (
        Arc::new(ChunkCache::new(bs, backend, cfg, metrics.clone(), &OpenBlobs::new()).unwrap()),
        metrics,
    )
}

fn read_file(cache: &Arc<ChunkCache>, path: &str) -> nydusd::Result<Vec<u8>> {
    let inode = cache.bootstrap().lookup_path(path).unwrap();
    let mut out = Vec::new();
    cache.read(&inode, 0, inode.size, &mut out)?;
    Ok(out)
}

fn all_files(img: &Image) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for i in 0..3 {
        let p = format!("/big{i}");
        v.push((p.clone(), std::fs::read(img.src.join(&p[1..])).unwrap()));
    }
    for i in 0..40 {
        let p = format!("/small/f{i:02}");
        v.push((p.clone(), std::fs::read(img.src.join(&p[1..])).unwrap()));
    }
    v
}

#[test]
fn warm_reads_and_restarts_cause_no_backend_reads() {
    let img = image();
    let backend = Counting::new(&img.blobs);
    let cfg = config(&img, 1 << 20);
    let (cache, _) = open(&img, backend.clone(), &cfg);
    for (p, want) in all_files(&img) {
        assert_eq!(read_file(&cache, &p).unwrap(), want, "{p}");
    }
    let cold = backend.reads();
    assert!(cold > 0);
    for (p, want) in all_files(&img) {
        assert_eq!(read_file(&cache, &p).unwrap(), want, "{p} warm");
    }
    assert_eq!(
        backend.reads(),
        cold,
        "warm reads must not reach the backend"
    );
    drop(cache);
    // A new daemon on the same cache: verifies cached chunks, fetches nothing.
    let (cache, metrics) = open(&img, backend.clone(), &cfg);
    for (p, want) in all_files(&img) {
        assert_eq!(read_file(&cache, &p).unwrap(), want, "{p} after restart");
    }
    assert_eq!(backend.reads(), cold, "a restart must reuse the cache");
    assert_eq!(metrics.cache.cache_corruptions.load(Ordering::SeqCst), 0);
}

#[test]
fn adjacent_missing_chunks_are_merged_up_to_amplify_io() {
    let img = image();
    let backend = Counting::new(&img.blobs);
    // 1 MiB bound: a big file's chunks come in one request.
    let (cache, _) = open(&img, backend.clone(), &config(&img, 1 << 20));
    read_file(&cache, "/big1").unwrap();
    assert_eq!(backend.reads(), 1);

    // Reading one small file amplifies to its neighbours: the next ones cost nothing.
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, _) = open(&img, backend.clone(), &config(&img, 1 << 20));
    for i in 0..40 {
        read_file(&cache, &format!("/small/f{i:02}")).unwrap();
    }
    assert_eq!(backend.reads(), 1, "small reads are amplified");

    // Without amplification each chunk is its own request.
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, _) = open(&img, backend.clone(), &config(&img, 0));
    read_file(&cache, "/big0").unwrap();
    let chunks = 300_000u64.div_ceil(0x10000);
    assert_eq!(backend.reads(), chunks);
}

#[test]
fn concurrent_readers_of_missing_chunks_share_one_fetch() {
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, metrics) = open(&img, backend.clone(), &config(&img, 0));
    let want = std::fs::read(img.src.join("big2")).unwrap();
    std::thread::scope(|s| {
        for _ in 0..16 {
            let cache = cache.clone();
            let want = &want;
            s.spawn(move || assert_eq!(&read_file(&cache, "/big2").unwrap(), want));
        }
    });
    let chunks = want.len().div_ceil(0x10000) as u64;
    assert_eq!(backend.reads(), chunks, "each chunk fetched exactly once");
    assert_eq!(metrics.cache.misses.load(Ordering::SeqCst), chunks);
}

#[test]
fn a_corrupt_chunk_from_the_backend_is_an_error_until_the_backend_heals() {
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, metrics) = open(&img, backend.clone(), &config(&img, 1 << 20));
    let inode = cache.bootstrap().lookup_path("/big0").unwrap();
    let addr = cache.bootstrap().chunk(&inode, 1).unwrap();
    let c = cache.chunk_info(&addr).unwrap();
    *backend.corrupt_at.lock().unwrap() = Some(c.compressed_offset + 10);
    let err = read_file(&cache, "/big0").unwrap_err();
    assert!(
        matches!(err, nydusd::Error::Integrity { ci_index, .. } if ci_index == c.ci_index),
        "{err:?}"
    );
    assert_eq!(metrics.cache.digest_errors.load(Ordering::SeqCst), 1);
    // Chunk 0 was fine and is cached; chunk 1 is not marked ready.
    assert!(cache.is_ready(addr.blob_index, c.ci_index - 1));
    assert!(!cache.is_ready(addr.blob_index, c.ci_index));
    *backend.corrupt_at.lock().unwrap() = None;
    assert_eq!(
        read_file(&cache, "/big0").unwrap(),
        std::fs::read(img.src.join("big0")).unwrap()
    );
}

#[test]
fn a_backend_that_is_down_fails_reads_and_recovers() {
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, metrics) = open(&img, backend.clone(), &config(&img, 1 << 20));
    backend.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        read_file(&cache, "/big1"),
        Err(nydusd::Error::Backend { .. })
    ));
    assert_eq!(metrics.backend.read_errors.load(Ordering::SeqCst), 1);
    backend.down.store(false, Ordering::SeqCst);
    assert_eq!(
        read_file(&cache, "/big1").unwrap(),
        std::fs::read(img.src.join("big1")).unwrap()
    );
}

#[test]
fn a_corrupt_cache_file_is_detected_after_restart_and_refetched() {
    let img = image();
    let backend = Counting::new(&img.blobs);
    let cfg = config(&img, 0);
    let (cache, _) = open(&img, backend.clone(), &cfg);
    let want = read_file(&cache, "/big2").unwrap();
    let inode = cache.bootstrap().lookup_path("/big2").unwrap();
    let c = cache
        .chunk_info(&cache.bootstrap().chunk(&inode, 2).unwrap())
        .unwrap();
    let blob_id = cache.bootstrap().blobs()[0].id.clone();
    drop(cache);
    // Flip a byte of chunk 2 in the cache file while no daemon runs.
    let data = img.work.join(format!("{blob_id}.blob.data"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, c.uncompressed_offset + 5).unwrap();
    f.write_all_at(&[b[0] ^ 1], c.uncompressed_offset + 5)
        .unwrap();
    let before = backend.reads();
    let (cache, metrics) = open(&img, backend.clone(), &cfg);
    assert_eq!(read_file(&cache, "/big2").unwrap(), want);
    assert_eq!(metrics.cache.cache_corruptions.load(Ordering::SeqCst), 1);
    assert_eq!(
        backend.reads() - before,
        1,
        "only the corrupt chunk is fetched again"
    );
}

#[test]
fn without_validation_chunks_are_served_unchecked() {
    // The explicit opt-out: a corrupt backend chunk is served (upstream's default).
    let img = image();
    let backend = Counting::new(&img.blobs);
    let mut cfg = config(&img, 0);
    cfg.digest_validate = false;
    let (cache, _) = open(&img, backend.clone(), &cfg);
    let inode = cache.bootstrap().lookup_path("/small/f03").unwrap();
    let c = cache
        .chunk_info(&cache.bootstrap().chunk(&inode, 0).unwrap())
        .unwrap();
    if c.compressed {
        // Corrupting compressed bytes may break decompression; that is still an error.
        return;
    }
    *backend.corrupt_at.lock().unwrap() = Some(c.compressed_offset);
    let got = read_file(&cache, "/small/f03").unwrap();
    assert_ne!(got, std::fs::read(img.src.join("small/f03")).unwrap());
}

fn prefetch_cfg(all: bool, rate: u64) -> nydusd::config::PrefetchConfig {
    nydusd::config::PrefetchConfig {
        enable: true,
        threads_count: 3,
        merging_size: 256 << 10,
        bandwidth_rate: rate,
        prefetch_all: all,
    }
}

#[test]
fn prefetch_all_fills_the_cache_in_merged_requests() {
    use nydusd::prefetch::{Prefetch, PrefetchList};
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, metrics) = open(&img, backend.clone(), &config(&img, 1 << 20));
    let list = PrefetchList::from_paths(&cache, "/small/f05\n/nonexistent\n");
    Prefetch::start(cache.clone(), list, prefetch_cfg(true, 0)).wait();
    let (ready, total) = cache.ready_chunks();
    assert_eq!(ready, total, "prefetch_all caches every chunk");
    let blob_bytes = std::fs::metadata(img.blobs.join(&cache.bootstrap().blobs()[0].id))
        .unwrap()
        .len();
    let requests = backend.reads();
    assert!(
        requests <= 2 + blob_bytes / (256 << 10) + 1,
        "{requests} requests: not merged"
    );
    assert_eq!(metrics.cache.prefetch_done.load(Ordering::SeqCst), 1);
    for (p, want) in all_files(&img) {
        assert_eq!(read_file(&cache, &p).unwrap(), want, "{p}");
    }
    assert_eq!(
        backend.reads(),
        requests,
        "reads after prefetch hit the cache"
    );
}

#[test]
fn prefetch_of_listed_files_only_fetches_their_chunks() {
    use nydusd::prefetch::{Prefetch, PrefetchList};
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, _) = open(&img, backend.clone(), &config(&img, 1 << 20));
    let list = PrefetchList::from_paths(&cache, "/big1\n");
    Prefetch::start(cache.clone(), list, prefetch_cfg(false, 0)).wait();
    let bs = cache.bootstrap().clone();
    let want: HashSet<u32> = {
        let inode = bs.lookup_path("/big1").unwrap();
        (0..bs.chunk_count(&inode))
            .map(|i| bs.chunk(&inode, i).unwrap().ci_index)
            .collect()
    };
    for ci in 0..cache.chunk_count(0) {
        assert_eq!(cache.is_ready(0, ci), want.contains(&ci), "chunk {ci}");
    }
}

#[test]
fn prefetch_is_paced_to_the_bandwidth_limit() {
    use nydusd::prefetch::{Prefetch, PrefetchList};
    let img = image();
    let backend = Counting::new(&img.blobs);
    let (cache, _) = open(&img, backend.clone(), &config(&img, 1 << 20));
    let blob_bytes = std::fs::metadata(img.blobs.join(&cache.bootstrap().blobs()[0].id))
        .unwrap()
        .len();
    // About 0.5 s worth of data at this rate.
    let rate = blob_bytes * 2;
    let t = std::time::Instant::now();
    Prefetch::start(
        cache.clone(),
        PrefetchList::default(),
        prefetch_cfg(true, rate),
    )
    .wait();
    let took = t.elapsed().as_secs_f64();
    assert!(
        took >= 0.3,
        "prefetch took {took:.2}s, faster than the limit allows"
    );
    assert_eq!(cache.ready_chunks().0, cache.ready_chunks().1);
}

/// A 4 MiB file (64 chunks of 64 KiB) read from its start in 128 KiB reads, through a
/// backend that answers slowly and out of order, with a 64 KiB `amplify_io` and
/// readahead of at most `window` bytes. Returns (requests, most requests in flight at
/// once, bytes fetched, bytes of the blob's chunks).
fn sequential_read(img: &Image, want: &[u8], window: u64) -> (u64, u64, u64, u64) {
    let backend = Counting::new(&img.blobs);
    backend.delay_us.store(2000, Ordering::SeqCst);
    let mut cfg = config(img, 0x10000);
    cfg.readahead_window = window;
    cfg.cache.work_dir = img.work.join(format!("window-{window}"));
    let (cache, _) = open(img, backend.clone(), &cfg);
    let inode = cache.bootstrap().lookup_path("/model").unwrap();
    let mut out = Vec::new();
    for off in (0..want.len() as u64).step_by(0x20000) {
        cache.read(&inode, off, 0x20000, &mut out).unwrap();
    }
    assert!(out == want, "the bytes read differ from the file");
    backend.settle();
    let chunk_bytes: u64 = (0..cache.chunk_count(0))
        .map(|ci| cache.chunk_by_ci(0, ci).unwrap().compressed_size as u64)
        .sum();
    (
        backend.reads(),
        backend.max_inflight.load(Ordering::SeqCst),
        backend.bytes(),
        chunk_bytes,
    )
}

/// An image of one file `/model` of `len` bytes.
fn model_image(len: usize) -> (Image, Vec<u8>) {
    let data = bytes(7, len);
    (image_of(&[("model".to_string(), data.clone())]), data)
}

#[test]
fn a_sequential_reader_keeps_several_merged_requests_in_flight() {
    let (img, want) = model_image(4 << 20);
    // A 1 MiB window: requests of up to 256 KiB (4 chunks), up to 4 at once.
    let (reads, most, fetched, chunks) = sequential_read(&img, &want, 1 << 20);
    assert!(most >= 3, "at most {most} requests were in flight at once");
    assert!(
        reads <= 64 / 2,
        "{reads} requests for 64 chunks: not merged"
    );
    assert_eq!(fetched, chunks, "every chunk fetched exactly once");

    // The window capped at one request (`amplify_io`): the reader's own request and one
    // readahead request at a time, as before windows grew.
    let (reads, most, fetched, chunks) = sequential_read(&img, &want, 0x10000);
    assert!(most <= 2, "{most} requests in flight at once");
    assert!(
        reads >= 64 / 2,
        "{reads} requests: larger than the cap allows"
    );
    assert_eq!(fetched, chunks);

    // No readahead at all: one request at a time.
    let (_, most, fetched, chunks) = sequential_read(&img, &want, 0);
    assert_eq!(most, 1);
    assert_eq!(fetched, chunks);
}

#[test]
fn a_reader_that_jumps_pulls_at_most_one_window_ahead() {
    // 128 chunks.
    let (img, want) = model_image(8 << 20);
    let backend = Counting::new(&img.blobs);
    let mut cfg = config(&img, 0x10000);
    cfg.readahead_window = 1 << 20;
    let (cache, _) = open(&img, backend.clone(), &cfg);
    let inode = cache.bootstrap().lookup_path("/model").unwrap();
    let read = |chunk: u64, len: u64| {
        let mut out = Vec::new();
        let off = chunk * 0x10000;
        cache.read(&inode, off, len, &mut out).unwrap();
        assert!(
            out == want[off as usize..(off + len) as usize],
            "chunk {chunk}"
        );
    };
    // Sequential through 8 chunks (the window grows to its cap), then jumps around, each
    // time further than 2 MiB from where any earlier read went on.
    for chunk in 0..8 {
        read(chunk, 0x10000);
    }
    let jumps = [120, 85, 50];
    for chunk in jumps {
        read(chunk, 4096);
    }
    backend.settle();
    // What was read (each read amplified to its one chunk), plus one window at most.
    let touched = (8 + jumps.len() as u64) * 0x10000;
    assert!(
        backend.bytes() <= touched + (1 << 20),
        "{} bytes fetched for {touched} bytes of chunks read",
        backend.bytes()
    );
    let blob_index = cache.bootstrap().chunk(&inode, 0).unwrap().blob_index;
    let (ready, total) = cache.ready_chunks();
    assert!(ready < total, "the whole file was pulled in");
    // The chunks just after each jump were not read ahead (all past the first window).
    for chunk in jumps {
        let next = cache.bootstrap().chunk(&inode, chunk + 1).unwrap();
        {
            assert!(
                !cache.is_ready(blob_index, next.ci_index),
                "chunk {} after the jump to {chunk} was read ahead",
                chunk + 1
            );
        }
    }
}

#[test]
fn a_corrupt_chunk_fetched_ahead_fails_only_the_reads_that_need_it() {
    let (img, want) = model_image(4 << 20);
    let backend = Counting::new(&img.blobs);
    backend.delay_us.store(1000, Ordering::SeqCst);
    let mut cfg = config(&img, 0x10000);
    cfg.readahead_window = 1 << 20;
    let (cache, metrics) = open(&img, backend.clone(), &cfg);
    let inode = cache.bootstrap().lookup_path("/model").unwrap();
    let bad = cache.bootstrap().chunk(&inode, 20).unwrap();
    let c = cache.chunk_info(&bad).unwrap();
    *backend.corrupt_at.lock().unwrap() = Some(c.compressed_offset + 10);
    for chunk in 0..64u64 {
        let mut out = Vec::new();
        let off = chunk * 0x10000;
        let res = cache.read(&inode, off, 0x10000, &mut out);
        if chunk == 20 {
            let err = res.unwrap_err();
            assert!(
                matches!(err, nydusd::Error::Integrity { ci_index, .. } if ci_index == c.ci_index),
                "{err:?}"
            );
        } else {
            res.unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
            assert!(
                out == want[off as usize..off as usize + 0x10000],
                "chunk {chunk}"
            );
        }
    }
    backend.settle();
    assert!(
        !cache.is_ready(bad.blob_index, c.ci_index),
        "a corrupt chunk was cached"
    );
    assert!(metrics.cache.digest_errors.load(Ordering::SeqCst) >= 1);
    // Healed: the chunk is fetched again, right.
    *backend.corrupt_at.lock().unwrap() = None;
    let mut out = Vec::new();
    cache.read(&inode, 20 * 0x10000, 0x10000, &mut out).unwrap();
    assert!(out == want[20 * 0x10000..21 * 0x10000]);
}

/// A bootstrap that lays a blob's chunks out otherwise than the one whose daemon has the
/// blob's cache files open (another source of offsets, a lying bootstrap) is refused:
/// it would write and punch other bytes than the first one's chunks. Once nobody has the
/// files open, they are made anew for it.
#[test]
fn a_blob_laid_out_otherwise_does_not_share_its_cache_files() {
    let img = image();
    let backend = Counting::new(&img.blobs);
    let cfg = config(&img, 0);
    // Record 0 of the chunk table, its compressed offset moved: another layout.
    let mut other = std::fs::read(&img.boot).unwrap();
    let bs = Bootstrap::from_bytes(other.clone()).unwrap();
    let at = bs.superblock().chunk_table_offset as usize + 48;
    let off = u64::from_le_bytes(other[at..at + 8].try_into().unwrap());
    other[at..at + 8].copy_from_slice(&(off + 1).to_le_bytes());
    let other = Arc::new(Bootstrap::from_bytes(other).unwrap());

    let (first, _) = open(&img, backend.clone(), &cfg);
    assert_eq!(read_file(&first, "/big0").unwrap(), bytes(1, 300_000));
    let refused = |open_blobs: &Arc<OpenBlobs>| {
        let metrics = Arc::new(Metrics::default());
        match ChunkCache::new(other.clone(), backend.clone(), &cfg, metrics, open_blobs) {
            Ok(_) => panic!("a blob laid out otherwise shared the cache files"),
            Err(e) => nydusd::error::Chain(&e).to_string(),
        }
    };
    // Another daemon (another set of open files)...
    let msg = refused(&OpenBlobs::new());
    assert!(msg.contains("lays its chunks out otherwise"), "{msg}");
    // ...and the first daemon's own other image.
    let mine = OpenBlobs::new();
    let bs = Arc::new(Bootstrap::open(&img.boot).unwrap());
    let _also = ChunkCache::new(
        bs,
        backend.clone(),
        &cfg,
        Arc::new(Metrics::default()),
        &mine,
    )
    .unwrap();
    let msg = refused(&mine);
    assert!(msg.contains("lays its chunks out otherwise"), "{msg}");
    drop(_also);
    // Nobody has them open: made anew for the other layout; the first image, opened
    // again, reads right (the files made anew for it in turn).
    drop(first);
    let metrics = Arc::new(Metrics::default());
    let cache = ChunkCache::new(
        other.clone(),
        backend.clone(),
        &cfg,
        metrics,
        &OpenBlobs::new(),
    )
    .unwrap();
    drop(cache);
    let (first, _) = open(&img, backend.clone(), &cfg);
    assert_eq!(read_file(&first, "/big0").unwrap(), bytes(1, 300_000));
}
