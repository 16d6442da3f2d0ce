//! Counters the daemon keeps, shared by the filesystem, the cache and the API.
//!
//! All counters are relaxed atomics: they are statistics, never used for
//! synchronisation. [`Metrics`] renders them as the JSON of the upstream API paths and as
//! Prometheus text.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
}

/// Filesystem operations (`/api/v1/metrics`).
#[derive(Default, Debug)]
pub struct FsMetrics {
    /// Files opened.
    pub nr_opens: AtomicU64,
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
        })
    }

    /// JSON of `/api/v1/metrics`.
    pub fn fs_json(&self) -> Value {
        let f = &self.fs;
        json!({
            "nr_opens": get(&f.nr_opens),
            "data_read": get(&f.data_read),
            "fop_hits": {"read": get(&f.reads)},
            "fop_errors": get(&f.fop_errors),
        })
    }

    /// Prometheus text exposition of every counter.
    pub fn prometheus(&self, backend_kind: &str) -> String {
        let mut out = String::new();
        let mut put = |name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP nydusd_{name} {help}\n# TYPE nydusd_{name} counter\nnydusd_{name}{{backend=\"{backend_kind}\"}} {v}\n"
            ));
        };
        let b = &self.backend;
        put(
            "backend_read_count",
            "Backend requests made.",
            get(&b.read_count),
        );
        put(
            "backend_read_errors",
            "Backend requests that failed.",
            get(&b.read_errors),
        );
        put(
            "backend_read_bytes",
            "Bytes received from the backend.",
            get(&b.read_amount_total),
        );
        let c = &self.cache;
        put(
            "cache_hits",
            "Chunk reads served from the cache.",
            get(&c.hits),
        );
        put(
            "cache_misses",
            "Chunks fetched for on-demand reads.",
            get(&c.misses),
        );
        put(
            "cache_digest_errors",
            "Fetched chunks that failed verification.",
            get(&c.digest_errors),
        );
        put(
            "cache_corruptions",
            "Cached chunks found corrupt.",
            get(&c.cache_corruptions),
        );
        put(
            "prefetch_bytes",
            "Bytes fetched by prefetch.",
            get(&c.prefetch_bytes),
        );
        let f = &self.fs;
        put("fs_opens", "Files opened.", get(&f.nr_opens));
        put(
            "fs_read_bytes",
            "Bytes returned by read.",
            get(&f.data_read),
        );
        put(
            "fs_errors",
            "Failed filesystem requests.",
            get(&f.fop_errors),
        );
        out
    }
}
