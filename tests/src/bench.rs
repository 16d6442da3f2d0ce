//! What the benchmarks share: the builder's limit loop, the cold-read limit and medians.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The chunk size of the limit loop, the builders' default.
pub const LIMIT_CHUNK: u64 = 1 << 20;

/// The rafs builder's limit: reads every file in 1 MiB chunks, blake3-digests and
/// zstd-compresses each chunk (at the builder's [`rafs::write::ZSTD_LEVEL`]), and nothing else, on `threads` threads (chunks are
/// handed out in order, so one large file is spread over all threads). Returns the wall
/// seconds.
///
/// # Panics
/// When a file cannot be read or zstd fails.
pub fn limit_loop(files: &[PathBuf], threads: usize) -> f64 {
    let mut work: Vec<(usize, u64, usize)> = Vec::new();
    for (i, p) in files.iter().enumerate() {
        let size = std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .len();
        let mut off = 0;
        while off < size {
            let len = (size - off).min(LIMIT_CHUNK) as usize;
            work.push((i, off, len));
            off += len as u64;
        }
    }
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut z =
                    zstd::bulk::Compressor::new(rafs::write::ZSTD_LEVEL).expect("zstd compressor");
                let mut buf = vec![0u8; LIMIT_CHUNK as usize];
                let mut open: Option<(usize, File)> = None;
                while let Some(&(i, off, len)) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if open.as_ref().is_none_or(|(j, _)| *j != i) {
                        let f = File::open(&files[i])
                            .unwrap_or_else(|e| panic!("{}: {e}", files[i].display()));
                        open = Some((i, f));
                    }
                    let (_, f) = open.as_ref().expect("opened above");
                    f.read_exact_at(&mut buf[..len], off)
                        .unwrap_or_else(|e| panic!("{}: {e}", files[i].display()));
                    std::hint::black_box(blake3::hash(&buf[..len]));
                    std::hint::black_box(z.compress(&buf[..len]).expect("zstd"));
                }
            });
        }
    });
    start.elapsed().as_secs_f64()
}

/// The cold-read limit of an image: every chunk of every blob (read into memory first,
/// not timed) decompressed and digest-checked with [`rafs::read::decode_chunk`], on
/// `threads` threads taking chunks in order, and nothing else. Returns (wall seconds,
/// uncompressed bytes, the machine's busy CPU-seconds meanwhile).
///
/// # Panics
/// When the bootstrap or a blob cannot be read, or a chunk fails to decode.
pub fn decode_limit(bootstrap: &Path, blobs_dir: &Path, threads: usize) -> (f64, u64, f64) {
    let bs = rafs::read::Bootstrap::open(bootstrap)
        .unwrap_or_else(|e| panic!("{}: {e}", bootstrap.display()));
    let mut blobs = Vec::new();
    let mut work = Vec::new();
    for (index, info) in bs.blobs().iter().enumerate() {
        let path = blobs_dir.join(&info.id);
        blobs.push(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        for ci in 0..info.chunk_count {
            let c = bs
                .chunk_by_ci(index as u32, ci)
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("blob {}: no chunk {ci}", info.id));
            work.push((index, c));
        }
    }
    let bytes = work.iter().map(|(_, c)| c.uncompressed_size as u64).sum();
    let next = AtomicUsize::new(0);
    let (start, busy) = (Instant::now(), CpuBusy::now());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                while let Some((index, c)) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let at = c.compressed_offset as usize;
                    let stored = &blobs[*index][at..at + c.compressed_size as usize];
                    let data = rafs::read::decode_chunk(&bs.blobs()[*index], c, stored)
                        .unwrap_or_else(|e| panic!("chunk {}: {e}", c.ci_index));
                    std::hint::black_box(data);
                }
            });
        }
    });
    (start.elapsed().as_secs_f64(), bytes, busy.since())
}

/// The median of `v` (the upper middle value for an even count).
///
/// # Panics
/// When `v` is empty or holds a NaN.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// A bench's registry with the python fixture as an OCI image and its nydus conversion
/// (our `nydusify convert`), under a fresh `$RAFS_BENCH_DIR/<name>` (default
/// `/var/tmp/rafs-bench`). Returns (that directory, the registry, the OCI reference, the
/// nydus reference).
pub fn python_images(name: &str) -> (std::path::PathBuf, crate::Registry, String, String) {
    let base = std::path::PathBuf::from(
        std::env::var("RAFS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/rafs-bench".into()),
    )
    .join(name);
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(base.join("reg")).unwrap();
    let reg = crate::Registry::start_in(&base.join("reg"), "");
    let oci = crate::push_python_image(&reg.addr, None);
    let nydus = format!("{oci}-nydus");
    let work = base.join("convert");
    std::fs::create_dir_all(&work).unwrap();
    crate::run_ok(
        std::process::Command::new(crate::bin("nydusify"))
            .current_dir(&work)
            .args(["convert", "--source", &oci, "--target", &nydus]),
    );
    (base, reg, oci, nydus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_three_is_the_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 3.0);
    }

    #[test]
    fn limit_loop_reads_every_chunk_of_every_file() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, vec![7u8; (LIMIT_CHUNK * 2 + 5) as usize]).unwrap();
        std::fs::write(&b, b"x").unwrap();
        assert!(limit_loop(&[a, b.clone()], 2) > 0.0);
        // A missing file is a panic naming it, not a silently cheaper loop.
        let missing = d.path().join("missing");
        let r = std::panic::catch_unwind(|| limit_loop(&[b, missing], 1));
        assert!(r.is_err());
    }
}

/// A system-wide `perf record -a -g` (the `cpu-clock` software event, 1999 Hz: virtual
/// machines here have no cycle counter) running until dropped,
/// which stops it with SIGINT so that it writes its profile: for a bench's
/// `..._PERF=<file>` option.
pub struct PerfRecord(std::process::Child);

impl PerfRecord {
    /// Starts recording to `out`, and gives perf half a second to start.
    ///
    /// # Panics
    /// When `perf` cannot be started.
    pub fn start(out: &str) -> PerfRecord {
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-a",
                "-g",
                "-F",
                "1999",
                "-o",
                out,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf");
        std::thread::sleep(std::time::Duration::from_millis(500));
        PerfRecord(child)
    }
}

impl Drop for PerfRecord {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// The machine's busy CPU time (every process and the kernel, all cores) from
/// `/proc/stat`, for what a part of a bench cost in CPU rather than in wall time.
#[derive(Clone, Copy)]
pub struct CpuBusy(u64);

impl CpuBusy {
    /// The busy ticks so far: user, nice, system, irq and softirq time (not idle,
    /// iowait or steal).
    ///
    /// # Panics
    /// When `/proc/stat` cannot be read.
    pub fn now() -> CpuBusy {
        let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .expect("the cpu line of /proc/stat")
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().expect("a tick count"))
            .collect();
        // user nice system idle iowait irq softirq steal ...
        CpuBusy(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
    }

    /// CPU-seconds of busy time since `self` (`/proc/stat` counts in USER_HZ, 100 on
    /// Linux).
    pub fn since(self) -> f64 {
        (CpuBusy::now().0 - self.0) as f64 / 100.0
    }
}

/// The machine's busy CPU-seconds per second while the bench itself does nothing
/// (other processes, the kernel): measured over one second, the first time it is asked
/// for, to be taken off what a part of a bench is charged.
pub fn background_cpu() -> f64 {
    static BACKGROUND: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *BACKGROUND.get_or_init(|| {
        let busy = CpuBusy::now();
        std::thread::sleep(std::time::Duration::from_secs(1));
        busy.since()
    })
}
