//! Builder throughput benchmark (`cargo bench -p converter --bench create`).
//!
//! Builds a deterministic ~1 GiB mixed tree (many small files, a few large ones; half of
//! each file compressible) once into `$RAFS_BENCH_DIR` (default `/var/tmp/rafs-bench`),
//! then prints, in the same run:
//! * the limit: a minimal loop that only reads, blake3-digests and zstd-compresses (at the builder's level) the
//!   same bytes in 1 MiB chunks, on one thread and spread over all cores;
//! * `nydus-image create` (this project): MiB/s of source, ratio to the limit, peak RSS,
//!   and whether two runs gave identical output;
//! * upstream `nydus-image create` 2.2 when installed (`$NYDUS_UPSTREAM_BIN`).
//!
//! Environment: `RAFS_BENCH_GIB` (tree size, default 1), `RAFS_BENCH_RUNS` (default 3,
//! median reported).

use rafs_e2e::median;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: f64 = 1024.0 * 1024.0;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Fills `buf` with a mix resembling real image content, in 4 KiB blocks: 40% text
/// (words from a fixed vocabulary), 30% low-entropy "binary" (small values with repeats,
/// like code and tables), 30% incompressible (already-compressed assets).
fn fill(rng: &mut Rng, buf: &mut [u8]) {
    const VOCAB: usize = 2048;
    thread_local! {
        static WORDS: Vec<Vec<u8>> = {
            let mut r = Rng(0x1234_5678_9ABC_DEF1);
            (0..VOCAB)
                .map(|_| {
                    let len = 2 + (r.next() % 9) as usize;
                    (0..len).map(|_| b'a' + (r.next() % 26) as u8).collect()
                })
                .collect()
        };
    }
    for block in buf.chunks_mut(4096) {
        match rng.next() % 10 {
            0..=3 => WORDS.with(|w| {
                let mut i = 0;
                while i < block.len() {
                    let v = rng.next();
                    // Zipf-like: frequent words are picked far more often.
                    let word = &w
                        [((v % VOCAB as u64) * ((v >> 32) % VOCAB as u64) / VOCAB as u64) as usize];
                    for &c in word.iter().chain(if v & 0xF == 0 { b"\n" } else { b" " }) {
                        if i < block.len() {
                            block[i] = c;
                            i += 1;
                        }
                    }
                }
            }),
            4..=6 => {
                let mut v = rng.next();
                for (j, b) in block.iter_mut().enumerate() {
                    if j % 16 == 0 {
                        v = rng.next();
                    }
                    *b = if (v >> (j % 16)) & 3 == 0 {
                        (v >> 20) as u8
                    } else {
                        ((v >> (j % 13 * 4)) & 0x0F) as u8
                    };
                }
            }
            _ => {
                for chunk in block.chunks_mut(8) {
                    let v = rng.next().to_le_bytes();
                    chunk.copy_from_slice(&v[..chunk.len()]);
                }
            }
        }
    }
}

fn make_tree(root: &Path, gib: u64) -> u64 {
    let stamp = root.join(".complete");
    if stamp.exists() {
        return std::fs::read_to_string(&stamp)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    }
    let _ = std::fs::remove_dir_all(root);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let total_target = gib << 30;
    let small_budget = total_target * 35 / 100;
    let mut total = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    let mut i = 0u64;
    while total < small_budget {
        let dir = root.join(format!("small/d{:03}", i / 500));
        std::fs::create_dir_all(&dir).unwrap();
        let size = (rng.next() % (64 << 10)) as usize + 1;
        fill(&mut rng, &mut buf[..size]);
        std::fs::write(dir.join(format!("f{i:06}")), &buf[..size]).unwrap();
        total += size as u64;
        i += 1;
    }
    let large = root.join("large");
    std::fs::create_dir_all(&large).unwrap();
    let mut j = 0;
    while total < total_target {
        let size = ((total_target - total).min(160 << 20)) as usize;
        let mut f = std::fs::File::create(large.join(format!("blob{j}"))).unwrap();
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len());
            fill(&mut rng, &mut buf[..n]);
            std::io::Write::write_all(&mut f, &buf[..n]).unwrap();
            left -= n;
        }
        total += size as u64;
        j += 1;
    }
    std::fs::write(&stamp, total.to_string()).unwrap();
    total
}

fn list_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != ".complete" {
                out.push(p);
            }
        }
    }
    out
}

/// The limit loop ([`rafs_e2e::limit_loop`]) on `threads` threads; returns wall seconds
/// and CPU seconds.
fn limit_loop(files: &[PathBuf], threads: usize) -> (f64, f64) {
    let cpu = self_cpu();
    let wall = rafs_e2e::limit_loop(files, threads);
    (wall, self_cpu() - cpu)
}

struct Run {
    secs: f64,
    cpu_secs: f64,
    max_rss_kib: i64,
}

fn tv_secs(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

/// User + system CPU seconds of this process so far (all threads).
fn self_cpu() -> f64 {
    let mut usage = rusage_zeroed();
    #[allow(unsafe_code)]
    // SAFETY: `usage` is a valid, writable rusage; RUSAGE_SELF is a valid selector.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(r, 0, "getrusage failed");
    tv_secs(usage.ru_utime) + tv_secs(usage.ru_stime)
}

/// Runs a command, returning wall time and the child's peak RSS.
// The child is reaped by `wait4`, which also reports its resource usage.
#[allow(clippy::zombie_processes)]
fn run(cmd: &mut Command) -> Run {
    let start = Instant::now();
    let child = cmd.spawn().expect("spawn builder");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = rusage_zeroed();
    #[allow(unsafe_code)]
    // SAFETY:
    // - `pid` is our own child, not yet waited for (we never call `child.wait`);
    // - `status` and `usage` are valid, writable locals of the right types.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "builder failed: {cmd:?}"
    );
    Run {
        secs,
        cpu_secs: tv_secs(usage.ru_utime) + tv_secs(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
    }
}

fn rusage_zeroed() -> libc::rusage {
    #[allow(unsafe_code)]
    // SAFETY: `rusage` is a plain C struct of integers; all-zero bytes are a valid value.
    unsafe {
        std::mem::zeroed()
    }
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let gib: u64 = std::env::var("RAFS_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let runs: usize = std::env::var("RAFS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let base = PathBuf::from(
        std::env::var("RAFS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/rafs-bench".into()),
    );
    let tree = base.join(format!("tree-v2-{gib}g"));
    let t = Instant::now();
    let total = make_tree(&tree, gib);
    let files = list_files(&tree);
    let mib = total as f64 / MIB;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "tree: {} files, {:.0} MiB ({:.1}s to prepare)",
        files.len(),
        mib,
        t.elapsed().as_secs_f64()
    );

    // Warm the page cache so every contender reads from memory.
    limit_loop(&files, cores);
    let one = median((0..runs).map(|_| limit_loop(&files, 1).0).collect());
    let limit_runs: Vec<(f64, f64)> = (0..runs).map(|_| limit_loop(&files, cores)).collect();
    let all = median(limit_runs.iter().map(|r| r.0).collect());
    let limit_cpu = median(limit_runs.iter().map(|r| r.1).collect());
    println!(
        "limit (read+blake3+zstd-{}, 1 MiB chunks): 1 thread {:.0} MiB/s, {cores} threads {:.0} MiB/s, {:.2} CPU-s",
        rafs::write::ZSTD_LEVEL,
        mib / one,
        mib / all,
        limit_cpu
    );

    let ours = env!("CARGO_BIN_EXE_nydus-image");
    let out = base.join("out");
    let mut times = Vec::new();
    let mut cpus = Vec::new();
    let mut rss = 0;
    let mut digests = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(out.join("blobs")).unwrap();
        let r = run(Command::new(ours)
            .args(["create", "-t", "dir-rafs", "--features", "blob-toc", "-B"])
            .arg(out.join("image.boot"))
            .arg("-D")
            .arg(out.join("blobs"))
            .arg(&tree));
        times.push(r.secs);
        cpus.push(r.cpu_secs);
        rss = rss.max(r.max_rss_kib);
        digests.push(sha256_file(&out.join("image.boot")));
    }
    let ours_t = median(times);
    let ours_cpu = median(cpus);
    let same = digests.windows(2).all(|w| w[0] == w[1]);
    let blob_bytes: u64 = std::fs::read_dir(out.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "ours  nydus-image create: {:.0} MiB/s, {:.2}x of the {cores}-thread limit, {:.2}x of 1 thread, {:.2} CPU-s ({:.2}x the limit's CPU), peak RSS {:.1} MiB, output {:.0} MiB, deterministic: {}",
        mib / ours_t,
        all / ours_t,
        one / ours_t,
        ours_cpu,
        ours_cpu / limit_cpu,
        rss as f64 / 1024.0,
        blob_bytes as f64 / MIB,
        if same { "yes" } else { "NO" }
    );

    let upstream = PathBuf::from(
        std::env::var("NYDUS_UPSTREAM_BIN")
            .unwrap_or_else(|_| "/var/cache/nydus-upstream-2.2/bin".into()),
    )
    .join("nydus-image");
    if upstream.exists() {
        let mut times = Vec::new();
        let mut cpus = Vec::new();
        let mut rss = 0;
        for _ in 0..runs {
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir_all(out.join("blobs")).unwrap();
            let r = run(Command::new(&upstream)
                .args([
                    "create",
                    "-t",
                    "dir-rafs",
                    "--features",
                    "blob-toc",
                    "--compressor",
                    "zstd",
                    "--log-level",
                    "warn",
                    "-B",
                ])
                .arg(out.join("image.boot"))
                .arg("-D")
                .arg(out.join("blobs"))
                .arg(&tree));
            times.push(r.secs);
            cpus.push(r.cpu_secs);
            rss = rss.max(r.max_rss_kib);
        }
        let t = median(times);
        println!(
            "upstream nydus-image 2.2 create: {:.0} MiB/s, {:.2}x of the {cores}-thread limit, {:.2} CPU-s, peak RSS {:.1} MiB; ours/upstream throughput = {:.2}x",
            mib / t,
            all / t,
            median(cpus),
            rss as f64 / 1024.0,
            t / ours_t
        );
    } else {
        println!(
            "upstream nydus-image not found at {}; skipped",
            upstream.display()
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
