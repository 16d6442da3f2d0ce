//! Background prefetch: at mount, fetch the chunks of the bootstrap's prefetch table (or
//! of `--prefetch-files`), then, with `prefetch_all`, the rest of every blob.
//!
//! One planner thread walks the list in order and cuts it into batches of
//! compressed-contiguous chunks of one blob, at most `merging_size` bytes each, which
//! `threads_count` workers fetch through the same cache (and single-flight) as on-demand
//! reads. Workers yield while on-demand fetches are running, and all but two pause for a
//! moment after one, so reads that a process waits for go first; the whole prefetch is
//! paced to `bandwidth_rate` bytes per second.

use crate::cache::{ChunkCache, Priority};
use crate::config::PrefetchConfig;
use crate::error::Chain;
use crate::metrics::Metrics;
use rafs::read::Inode;
use rafs::ChunkInfo;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Workers that go on fetching while readers have waited for the backend within
/// [`READER_ACTIVE`]: fewer prefetch requests in flight leave more of the link and the
/// CPUs to the next read.
const BUSY_WORKERS: usize = 2;
/// How recently a read waited for the backend for prefetch to hold back.
const READER_ACTIVE: Duration = Duration::from_millis(250);

/// What to prefetch first.
#[derive(Clone, Debug, Default)]
pub struct PrefetchList {
    /// nids of files or directories (a directory stands for everything below it).
    pub nids: Vec<u64>,
}

impl PrefetchList {
    /// The bootstrap's own prefetch table.
    pub fn from_bootstrap(cache: &ChunkCache) -> PrefetchList {
        let nids = cache.bootstrap().prefetch_table().unwrap_or_default();
        PrefetchList { nids }
    }

    /// Absolute paths, one per line (`--prefetch-files`); paths not in the image are
    /// reported and skipped.
    pub fn from_paths(cache: &ChunkCache, text: &str) -> PrefetchList {
        let bs = cache.bootstrap();
        let mut nids = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match bs.lookup_path(line.as_bytes()) {
                Ok(inode) => nids.push(inode.nid),
                Err(e) => warn!("prefetch: skipping {line}: {e}"),
            }
        }
        PrefetchList { nids }
    }
}

/// A running prefetch; [`Prefetch::stop`] ends it early.
pub struct Prefetch {
    stop: Arc<AtomicBool>,
    planner: Option<JoinHandle<()>>,
}

type Batch = (u32, Vec<ChunkInfo>);

impl Prefetch {
    /// Starts prefetching `list` (then everything, with `prefetch_all`) in the background.
    pub fn start(cache: Arc<ChunkCache>, list: PrefetchList, cfg: PrefetchConfig) -> Prefetch {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let planner = thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || run(cache, list, cfg, stop2))
            .ok();
        Prefetch { stop, planner }
    }

    /// Asks the workers to stop and waits for them.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.planner.take() {
            let _ = h.join();
        }
    }

    /// Waits until prefetch has finished.
    pub fn wait(mut self) {
        if let Some(h) = self.planner.take() {
            let _ = h.join();
        }
    }
}

fn run(cache: Arc<ChunkCache>, list: PrefetchList, cfg: PrefetchConfig, stop: Arc<AtomicBool>) {
    let started = Instant::now();
    let (tx, rx) = crossbeam_channel::bounded::<Batch>(cfg.threads_count * 2);
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for i in 0..cfg.threads_count {
        let rx = rx.clone();
        let cache = cache.clone();
        let stop = stop.clone();
        let sent = sent_bytes.clone();
        let rate = cfg.bandwidth_rate;
        let w = thread::Builder::new()
            .name(format!("prefetch-{i}"))
            .spawn(move || {
                while let Ok((blob, chunks)) = rx.recv() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    // Reads go first: every worker waits while on-demand or readahead
                    // fetches run, and after a read waited for the backend all but the
                    // first [`BUSY_WORKERS`] wait a while longer.
                    while (cache.ondemand_busy()
                        || (i >= BUSY_WORKERS && cache.ondemand_recent(READER_ACTIVE)))
                        && !stop.load(Ordering::Acquire)
                    {
                        thread::sleep(Duration::from_millis(1));
                    }
                    let bytes: u64 = chunks.iter().map(|c| c.compressed_size as u64).sum();
                    if rate > 0 {
                        // Pace: the bytes sent so far may not exceed rate × elapsed.
                        let total = sent.fetch_add(bytes, Ordering::AcqRel) + bytes;
                        let due = Duration::from_secs_f64(total as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            thread::sleep(wait);
                        }
                    }
                    if let Err(e) = cache.ensure(blob, &chunks, Priority::Prefetch) {
                        warn!("prefetch: {}", Chain(&e));
                    }
                }
            });
        if let Ok(w) = w {
            workers.push(w);
        }
    }
    drop(rx);
    let mut planner = Planner {
        cache: &cache,
        merging: cfg.merging_size,
        seen: HashSet::new(),
        batch: None,
        tx,
        planned: 0,
    };
    let bs = cache.bootstrap().clone();
    'list: for nid in &list.nids {
        let mut stack = vec![*nid];
        let mut dirs = HashSet::new();
        while let Some(nid) = stack.pop() {
            if stop.load(Ordering::Acquire) {
                break 'list;
            }
            let Ok(inode) = bs.inode(nid) else { continue };
            if inode.is_dir() {
                if dirs.insert(nid) {
                    if let Ok(entries) = bs.read_dir(&inode) {
                        stack.extend(
                            entries
                                .iter()
                                .rev()
                                .filter(|e| e.name != b"." && e.name != b"..")
                                .map(|e| e.nid),
                        );
                    }
                }
            } else if inode.is_reg() && !planner.file(&inode) {
                break 'list;
            }
        }
    }
    if cfg.prefetch_all && !stop.load(Ordering::Acquire) {
        'blobs: for blob in 0..bs.blobs().len() as u32 {
            for ci in 0..cache.chunk_count(blob) {
                if stop.load(Ordering::Acquire) {
                    break 'blobs;
                }
                if let Some(c) = cache.chunk_by_ci(blob, ci) {
                    if !planner.push(blob, c) {
                        break 'blobs;
                    }
                }
            }
        }
    }
    planner.flush();
    let planned = planner.planned;
    drop(planner);
    for w in workers {
        let _ = w.join();
    }
    Metrics::add(&cache.metrics().cache.prefetch_done, 1);
    info!(
        "prefetch finished: {planned} chunks planned in {:.2}s",
        started.elapsed().as_secs_f64()
    );
}

struct Planner<'a> {
    cache: &'a ChunkCache,
    merging: u64,
    seen: HashSet<(u32, u32)>,
    batch: Option<Batch>,
    tx: crossbeam_channel::Sender<Batch>,
    planned: u64,
}

impl Planner<'_> {
    /// Plans every chunk of a file; false when the workers are gone.
    fn file(&mut self, inode: &Inode) -> bool {
        let bs = self.cache.bootstrap().clone();
        for i in 0..bs.chunk_count(inode) {
            let Ok(addr) = bs.chunk(inode, i) else {
                return true;
            };
            let Ok(c) = self.cache.chunk_info(&addr) else {
                continue;
            };
            if !self.push(addr.blob_index, c) {
                return false;
            }
        }
        true
    }

    /// Adds a chunk to the current batch (or starts a new one); false when the workers
    /// are gone.
    fn push(&mut self, blob: u32, c: ChunkInfo) -> bool {
        if !self.seen.insert((blob, c.ci_index)) || self.cache.is_ready(blob, c.ci_index) {
            return true;
        }
        self.planned += 1;
        Metrics::add(&self.cache.metrics().cache.prefetch_planned_chunks, 1);
        if let Some((b, chunks)) = &mut self.batch {
            let last = chunks.last().expect("batches are never empty");
            let first = chunks[0].compressed_offset;
            let end = last.compressed_offset + last.compressed_size as u64;
            if *b == blob
                && c.compressed_offset == end
                && end + c.compressed_size as u64 - first <= self.merging
            {
                chunks.push(c);
                return true;
            }
        }
        let full = self.batch.replace((blob, vec![c]));
        match full {
            Some(b) => self.tx.send(b).is_ok(),
            None => true,
        }
    }

    fn flush(&mut self) {
        if let Some(b) = self.batch.take() {
            let _ = self.tx.send(b);
        }
    }
}
