//! Counters the daemon keeps per mounted image, shared by its filesystem, its cache and
//! the API.
//!
//! All counters are relaxed atomics: they are statistics, never used for
//! synchronisation. [`Metrics`] renders them as the JSON of the upstream API paths and,
//! with [`prometheus`], as Prometheus text. [`FileStats`] records which files were read
//! (`/api/v1/metrics/files`) and in which order (`/api/v1/metrics/pattern`), when the
//! config asks for it.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::SystemTime;

/// Backend traffic (`/api/v1/metrics/backend`).
#[derive(Default, Debug)]
pub struct BackendMetrics {
    /// Backend requests made.
    pub read_count: AtomicU64,
    /// Requests that failed.
    pub read_errors: AtomicU64,
    /// Bytes received.
    pub read_amount_total: AtomicU64,
    /// Sum of request latencies in microseconds.
    pub read_latency_us_total: AtomicU64,
}

/// Chunk cache behaviour (`/api/v1/metrics/blobcache`).
#[derive(Default, Debug)]
pub struct CacheMetrics {
    /// Chunk reads served from the cache.
    pub hits: AtomicU64,
    /// Chunks fetched from the backend for on-demand reads (including amplification).
    pub misses: AtomicU64,
    /// Chunks that arrived from the backend and failed decompression or digest checks.
    pub digest_errors: AtomicU64,
    /// Cached chunks found corrupt on verification (refetched, never served).
    pub cache_corruptions: AtomicU64,
    /// Chunks fetched by prefetch.
    pub prefetch_chunks: AtomicU64,
    /// Uncompressed bytes fetched by prefetch.
    pub prefetch_bytes: AtomicU64,
    /// Prefetch requests (merged backend reads) made.
    pub prefetch_requests: AtomicU64,
    /// Chunks the prefetcher planned to fetch.
    pub prefetch_planned_chunks: AtomicU64,
    /// Whether prefetch has finished (1) or not (0).
    pub prefetch_done: AtomicU64,
    /// Chunks served straight from the backend because they could not be written to
    /// the cache (a full cache disk).
    pub uncached_chunks: AtomicU64,
    /// Chunks evicted to keep the work dir under `size_limit`.
    pub evicted_chunks: AtomicU64,
    /// Whole blobs evicted (no daemon had them open).
    pub evicted_blobs: AtomicU64,
    /// Bytes freed on disk by eviction.
    pub evicted_bytes: AtomicU64,
    /// Bytes the work dir's files took on disk when last looked at (with `size_limit`).
    pub cache_bytes: AtomicU64,
}

/// Filesystem operations (`/api/v1/metrics`).
#[derive(Default, Debug)]
pub struct FsMetrics {
    /// Files opened.
    pub nr_opens: AtomicU64,
    /// Opens passed through to a backing file: their reads never reach the daemon.
    pub passthrough_opens: AtomicU64,
    /// Bytes returned by `read`.
    pub data_read: AtomicU64,
    /// `read` requests.
    pub reads: AtomicU64,
    /// Requests answered with an error other than ENOENT/ENODATA.
    pub fop_errors: AtomicU64,
}

/// Every counter of one daemon.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Backend traffic.
    pub backend: BackendMetrics,
    /// Chunk cache.
    pub cache: CacheMetrics,
    /// Filesystem operations.
    pub fs: FsMetrics,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// JSON of `/api/v1/metrics/backend`.
    pub fn backend_json(&self, kind: &str) -> Value {
        let b = &self.backend;
        json!({
            "backend_type": kind,
            "read_count": get(&b.read_count),
            "read_errors": get(&b.read_errors),
            "read_amount_total": get(&b.read_amount_total),
            "read_latency_us_total": get(&b.read_latency_us_total),
        })
    }

    /// JSON of `/api/v1/metrics/blobcache`.
    pub fn cache_json(&self, underlying_files: &[String]) -> Value {
        let c = &self.cache;
        json!({
            "underlying_files": underlying_files,
            "partial_hits": 0,
            "whole_hits": get(&c.hits),
            "total": get(&c.hits) + get(&c.misses),
            "misses": get(&c.misses),
            "digest_errors": get(&c.digest_errors),
            "cache_corruptions": get(&c.cache_corruptions),
            "prefetch_data_amount": get(&c.prefetch_bytes),
            "prefetch_requests_count": get(&c.prefetch_requests),
            "prefetch_chunks": get(&c.prefetch_chunks),
            "prefetch_planned_chunks": get(&c.prefetch_planned_chunks),
            "prefetch_done": get(&c.prefetch_done) == 1,
            "uncached_chunks": get(&c.uncached_chunks),
            "evicted_chunks": get(&c.evicted_chunks),
            "evicted_blobs": get(&c.evicted_blobs),
            "evicted_bytes": get(&c.evicted_bytes),
            "cache_bytes": get(&c.cache_bytes),
        })
    }

    /// JSON of `/api/v1/metrics`.
    pub fn fs_json(&self) -> Value {
        let f = &self.fs;
        json!({
            "nr_opens": get(&f.nr_opens),
            "nr_passthrough_opens": get(&f.passthrough_opens),
            "data_read": get(&f.data_read),
            "fop_hits": {"read": get(&f.reads)},
            "fop_errors": get(&f.fop_errors),
        })
    }
}

/// Prometheus text exposition of every counter of every mount: one `# HELP`/`# TYPE`
/// block per counter, one sample per mount labelled `labels` (e.g.
/// `backend="localfs",id="/sub"`).
pub fn prometheus(mounts: &[(String, &Metrics)]) -> String {
    type Get = fn(&Metrics) -> u64;
    let counters: [(&str, &str, Get); 16] = [
        ("backend_read_count", "Backend requests made.", |m| {
            get(&m.backend.read_count)
        }),
        (
            "backend_read_errors",
            "Backend requests that failed.",
            |m| get(&m.backend.read_errors),
        ),
        (
            "backend_read_bytes",
            "Bytes received from the backend.",
            |m| get(&m.backend.read_amount_total),
        ),
        ("cache_hits", "Chunk reads served from the cache.", |m| {
            get(&m.cache.hits)
        }),
        ("cache_misses", "Chunks fetched for on-demand reads.", |m| {
            get(&m.cache.misses)
        }),
        (
            "cache_digest_errors",
            "Fetched chunks that failed verification.",
            |m| get(&m.cache.digest_errors),
        ),
        ("cache_corruptions", "Cached chunks found corrupt.", |m| {
            get(&m.cache.cache_corruptions)
        }),
        (
            "cache_uncached_chunks",
            "Chunks served from the backend without caching (the cache disk is full).",
            |m| get(&m.cache.uncached_chunks),
        ),
        (
            "cache_evicted_chunks",
            "Chunks evicted to keep the cache under size_limit.",
            |m| get(&m.cache.evicted_chunks),
        ),
        (
            "cache_evicted_bytes",
            "Bytes freed on disk by eviction.",
            |m| get(&m.cache.evicted_bytes),
        ),
        (
            "cache_bytes",
            "Bytes the cache work dir took on disk when last looked at (with size_limit).",
            |m| get(&m.cache.cache_bytes),
        ),
        ("prefetch_bytes", "Bytes fetched by prefetch.", |m| {
            get(&m.cache.prefetch_bytes)
        }),
        ("fs_opens", "Files opened.", |m| get(&m.fs.nr_opens)),
        (
            "fs_passthrough_opens",
            "Opens passed through to the kernel's EROFS mount of the cache.",
            |m| get(&m.fs.passthrough_opens),
        ),
        ("fs_read_bytes", "Bytes returned by read.", |m| {
            get(&m.fs.data_read)
        }),
        ("fs_errors", "Failed filesystem requests.", |m| {
            get(&m.fs.fop_errors)
        }),
    ];
    let mut out = String::new();
    for (name, help, value) in counters {
        // The one value that goes down as well as up.
        let kind = if name == "cache_bytes" {
            "gauge"
        } else {
            "counter"
        };
        out.push_str(&format!(
            "# HELP nydusd_{name} {help}\n# TYPE nydusd_{name} {kind}\n"
        ));
        for (labels, m) in mounts {
            out.push_str(&format!("nydusd_{name}{{{labels}}} {}\n", value(m)));
        }
    }
    out
}

/// What [`FileStats`] records, from the config flags of upstream's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStatsConfig {
    /// `iostats_files`: per-file opens, reads and bytes (`/api/v1/metrics/files`).
    pub iostats_files: bool,
    /// `access_pattern`: files in the order of their first read
    /// (`/api/v1/metrics/pattern`).
    pub access_pattern: bool,
    /// `latest_read_files`: files read since the last
    /// `/api/v1/metrics/files?latest=true`.
    pub latest_read_files: bool,
}

impl FileStatsConfig {
    /// Whether anything is recorded.
    pub fn any(&self) -> bool {
        self.iostats_files || self.access_pattern || self.latest_read_files
    }
}

/// What is known about one file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRecord {
    /// Opens.
    pub nr_open: u64,
    /// `read` requests.
    pub nr_read: u64,
    /// Bytes returned by `read`.
    pub data_read: u64,
    /// Position of the first read among all files' first reads (0 = not read yet).
    pub first_read_seq: u64,
    /// Wall time of the first read.
    pub first_read_time: Option<SystemTime>,
}

#[derive(Default)]
struct FileStatsInner {
    files: HashMap<u64, FileRecord>,
    next_seq: u64,
    latest: Vec<u64>,
}

/// Per-file records of one mount, keyed by nid (the image's inode number).
pub struct FileStats {
    config: FileStatsConfig,
    inner: Mutex<FileStatsInner>,
}

impl FileStats {
    /// Records what `config` asks for.
    pub fn new(config: FileStatsConfig) -> Self {
        FileStats {
            config,
            inner: Mutex::new(FileStatsInner::default()),
        }
    }

    /// What is recorded.
    pub fn config(&self) -> FileStatsConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FileStatsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// File `nid` was opened.
    pub fn opened(&self, nid: u64) {
        self.lock().files.entry(nid).or_default().nr_open += 1;
    }

    /// File `nid` was read, `bytes` returned.
    pub fn read(&self, nid: u64, bytes: u64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let rec = inner.files.entry(nid).or_default();
        rec.nr_read += 1;
        rec.data_read += bytes;
        if rec.first_read_seq == 0 {
            inner.next_seq += 1;
            rec.first_read_seq = inner.next_seq;
            rec.first_read_time = Some(SystemTime::now());
            if self.config.latest_read_files {
                inner.latest.push(nid);
            }
        } else if self.config.latest_read_files && !inner.latest.contains(&nid) {
            inner.latest.push(nid);
        }
    }

    /// Every file read or opened, with its record.
    pub fn files(&self) -> Vec<(u64, FileRecord)> {
        let mut v: Vec<_> = self.lock().files.iter().map(|(n, r)| (*n, *r)).collect();
        v.sort_unstable_by_key(|(n, _)| *n);
        v
    }

    /// Files in the order of their first read.
    pub fn pattern(&self) -> Vec<(u64, FileRecord)> {
        let mut v: Vec<_> = self
            .lock()
            .files
            .iter()
            .filter(|(_, r)| r.first_read_seq != 0)
            .map(|(n, r)| (*n, *r))
            .collect();
        v.sort_unstable_by_key(|(_, r)| r.first_read_seq);
        v
    }

    /// Files read since the previous call, in the order of their first read since then.
    pub fn take_latest(&self) -> Vec<u64> {
        std::mem::take(&mut self.lock().latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_first_read_order_and_latest_is_drained() {
        let s = FileStats::new(FileStatsConfig {
            iostats_files: true,
            access_pattern: true,
            latest_read_files: true,
        });
        s.opened(30);
        s.read(30, 10);
        s.read(10, 5);
        s.read(30, 7);
        s.opened(20);
        s.read(20, 1);
        let order: Vec<u64> = s.pattern().iter().map(|(n, _)| *n).collect();
        assert_eq!(order, [30, 10, 20]);
        let f: HashMap<u64, FileRecord> = s.files().into_iter().collect();
        assert_eq!(
            (f[&30].nr_open, f[&30].nr_read, f[&30].data_read),
            (1, 2, 17)
        );
        assert_eq!(s.take_latest(), [30, 10, 20]);
        assert!(s.take_latest().is_empty());
        s.read(10, 1);
        assert_eq!(s.take_latest(), [10]);
    }

    #[test]
    fn prometheus_groups_samples_of_several_mounts_under_one_header() {
        let (a, b) = (Metrics::default(), Metrics::default());
        Metrics::add(&b.fs.nr_opens, 3);
        let text = prometheus(&[("id=\"/a\"".to_string(), &a), ("id=\"/b\"".to_string(), &b)]);
        assert_eq!(text.matches("# TYPE nydusd_fs_opens counter").count(), 1);
        assert_eq!(text.matches("# TYPE nydusd_cache_bytes gauge").count(), 1);
        assert!(text.contains("nydusd_fs_opens{id=\"/a\"} 0\nnydusd_fs_opens{id=\"/b\"} 3\n"));
    }
}
