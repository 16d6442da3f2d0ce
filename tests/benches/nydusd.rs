//! nydusd benchmark (`cargo bench -p rafs-e2e --bench nydusd [-- warm|cold]`, as root).
//!
//! `warm`: for each daemon — this project's `nydusd` twice (by default, where files
//! whose every chunk is cached are passed through to the kernel, and with
//! `--passthrough false`, where the daemon serves every read) and upstream nydusd 2.2
//! when installed — and next to native reads of the source files in the same run,
//! prints:
//! 1. sequential 128 KiB reads of a 256 MiB file with the page cache dropped, the daemon
//!    serving from its (already filled) chunk cache;
//! 2. 4 KiB random reads, same conditions (IOPS);
//! 4. a walk + lstat of a 100k-file image, warm (stat/s);
//! 5. the daemon's RSS after that walk.
//!
//! `cold` (3.): a cold read of every file of an image through a daemon with the
//! `registry` backend, from docker-registry in a network namespace of the bench's own (a
//! veth pair, `tc tbf` on both ends when shaped; daemons and curl run in the root
//! namespace, where the FUSE mount must live). Images: ~250 MiB of mixed files, and a
//! 4 GiB model folder (two 2 GiB weight files, each half incompressible, half
//! compressible). For each, unshaped, in the same run: our nydusd (cache on disk, and for
//! the model on tmpfs too, apart from the VM's disk), `curl` of the same blobs, upstream
//! nydusd 2.2 the same way, and the limit — every chunk decompressed and digest-checked
//! from memory on two threads; then the mixed image through 200 Mbit/s against curl
//! (`RAFS_BENCH_SHAPED=0` skips that). Each daemon's peak RSS during its read is printed.
//! The page cache is dropped and the registry's blobs read back into it before each read.
//! The `cpu` row is what the registry and curl cost the machine in CPU for the blobs,
//! and the limit's decoding likewise (less the background's), and the rate two cores
//! doing only those two could read at, against ours.
//! `RAFS_BENCH_COLD=mixed|model` reads that image only; `RAFS_BENCH_QUICK=1` skips the
//! tmpfs, prefetch and upstream rows; `RAFS_BENCH_CONFIG=',"key":value'` is added to
//! our daemon's config; `RAFS_BENCH_PERF=<file>` records a system-wide `perf` profile of
//! each cold read of ours to `<file>.<image>` (`.shaped`, `.model-tmpfs`), which slows it.
//!
//! Ours runs with digest validation on (its default); upstream 2.2 cannot validate RAFS v6
//! and runs with it off. `RAFS_BENCH_DIR` (default `/var/tmp/rafs-bench`) holds the
//! generated sources and images between runs. Without arguments both parts run.

use rafs_e2e::*;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: u64 = 1 << 20;
const BIG: u64 = 256 * MIB;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The sources: one 256 MiB file (mixed compressibility) and 100k small files.
fn prepare(base: &Path) -> (PathBuf, PathBuf) {
    let big = base.join("nydusd-big");
    let many = base.join("nydusd-many");
    if !big.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&big);
        std::fs::create_dir_all(&big).unwrap();
        let mut rng = Rng(0xA076_1D64_78BD_642F);
        let mut f = std::io::BufWriter::new(File::create(big.join("file.bin")).unwrap());
        let mut block = vec![0u8; 4096];
        for i in 0..BIG / 4096 {
            for (j, c) in block.chunks_mut(8).enumerate() {
                let v = if i % 3 == 0 {
                    rng.next()
                } else {
                    (i * 31 + j as u64 % 97) * 0x0101_0101
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
            std::io::Write::write_all(&mut f, &block).unwrap();
        }
        drop(f);
        std::fs::write(big.join(".complete"), "").unwrap();
    }
    if !many.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&many);
        for d in 0..1000 {
            let dir = many.join(format!("d{d:04}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..100 {
                std::fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}\n")).unwrap();
            }
        }
        std::fs::write(many.join(".complete"), "").unwrap();
    }
    (big, many)
}

fn build(src: &Path, out: &Path) {
    if out.join("image.boot").exists() {
        return;
    }
    build_image(src, out, &["-l", "warn", "-t", "dir-rafs"]);
}

/// Mounts `image` with `daemon` (ours gets `extra` flags).
fn mount(daemon: &Path, image: &Path, work: &Path, validate: bool, extra: &[&str]) -> FuseDaemon {
    let cache = work.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let cfg = work.join("config.json");
    std::fs::write(&cfg, localfs_config(&image.join("blobs"), &cache, validate)).unwrap();
    let mnt = work.join("mnt");
    let log = work.join("daemon.log");
    let upstream = PathBuf::from(
        std::env::var("NYDUS_UPSTREAM_BIN").unwrap_or_else(|_| UPSTREAM_BIN_DEFAULT.into()),
    );
    if daemon.starts_with(&upstream) {
        return start_upstream_nydusd(&image.join("image.boot"), &cfg, &mnt, &log);
    }
    start_fuse_daemon(
        Command::new(daemon)
            .arg("--config")
            .arg(&cfg)
            .arg("--bootstrap")
            .arg(image.join("image.boot"))
            .arg("--mountpoint")
            .arg(&mnt)
            .args(["--log-level", "warn"])
            .args(extra),
        &mnt,
        &log,
    )
}

fn seq_read(path: &Path) -> f64 {
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    let t = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, BIG);
    total as f64 / MIB as f64 / t.elapsed().as_secs_f64()
}

fn random_reads(path: &Path, n: usize) -> f64 {
    let f = File::open(path).unwrap();
    let mut rng = Rng(42);
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    for _ in 0..n {
        let off = rng.next() % (BIG / 4096) * 4096;
        f.read_exact_at(&mut buf, off).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn walk(root: &Path) -> u64 {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            count += 1;
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    count
}

/// One timed walk of a tree already walked (warm).
fn stat_rate(root: &Path) -> f64 {
    let t = Instant::now();
    let n = walk(root);
    n as f64 / t.elapsed().as_secs_f64()
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `cargo bench` passes `--bench`; other words select parts.
    let parts: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |p: &str| parts.is_empty() || parts.contains(&p);
    require_root_tools(&["fusermount3"]);
    let base = PathBuf::from(
        std::env::var("RAFS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/rafs-bench".into()),
    );
    if wants("warm") {
        warm(&base);
    }
    if wants("cold") {
        cold(&base);
    }
}

/// Benchmarks 1, 2, 4 and 5: reads from a filled chunk cache and a warm walk.
///
/// Native reads of this machine's disk swing by 3x from one run to the next (the host
/// caches the virtual disk, or not), so the contenders take turns: every round reads
/// natively, then through each daemon, all mounted at once, and the medians of
/// `RAFS_BENCH_RUNS` rounds (default 5) are compared, with every round's figures shown.
fn warm(base: &Path) {
    let (big, many) = prepare(base);
    let big_img = base.join("nydusd-big-img");
    let many_img = base.join("nydusd-many-img");
    build(&big, &big_img);
    build(&many, &many_img);
    let runs: usize = std::env::var("RAFS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);

    let mut daemons: Vec<(&str, PathBuf, bool, &[&str])> = Vec::new();
    let ours = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("nydusd");
    if ours.exists() {
        daemons.push((
            "ours (digest validation on, passthrough)",
            ours.clone(),
            true,
            &[],
        ));
        daemons.push((
            "ours (digest validation on, --passthrough false)",
            ours,
            true,
            &["--passthrough", "false"],
        ));
    } else {
        println!("ours: target/release/nydusd not built; skipped");
    }
    if let Some(up) = upstream_nydusd() {
        daemons.push(("upstream nydusd 2.2 (validation off)", up, false, &[]));
    }
    let work = base.join("nydusd-work");
    let _ = std::fs::remove_dir_all(&work);
    let mounted: Vec<FuseDaemon> = daemons
        .iter()
        .enumerate()
        .map(|(i, (_, daemon, validate, extra))| {
            let d = mount(
                daemon,
                &big_img,
                &work.join(format!("big{i}")),
                *validate,
                extra,
            );
            // Fill the chunk cache; every measured read starts with the page cache
            // dropped, so it is served from the chunk cache.
            seq_read(&d.mnt.join("file.bin"));
            d
        })
        .collect();
    let native = big.join("file.bin");
    let files: Vec<PathBuf> = std::iter::once(native.clone())
        .chain(mounted.iter().map(|d| d.mnt.join("file.bin")))
        .collect();
    let mut seq = vec![Vec::new(); files.len()];
    let mut iops = vec![Vec::new(); files.len()];
    for _ in 0..runs {
        for (i, f) in files.iter().enumerate() {
            drop_caches();
            seq[i].push(seq_read(f));
        }
        for (i, f) in files.iter().enumerate() {
            drop_caches();
            iops[i].push(random_reads(f, 20_000));
        }
    }
    drop(mounted);
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let native_seq = median(seq[0].clone());
    let native_iops = median(iops[0].clone());
    // The walks, interleaved as the reads: every image mounted, each walked once to
    // warm the kernel's caches, then timed walks round by round.
    let many_mounted: Vec<FuseDaemon> = daemons
        .iter()
        .enumerate()
        .map(|(i, (_, daemon, validate, extra))| {
            mount(
                daemon,
                &many_img,
                &work.join(format!("many{i}")),
                *validate,
                extra,
            )
        })
        .collect();
    let roots: Vec<PathBuf> = std::iter::once(many.clone())
        .chain(many_mounted.iter().map(|d| d.mnt.clone()))
        .collect();
    let mut stats = vec![Vec::new(); roots.len()];
    for r in &roots {
        walk(r);
    }
    for _ in 0..runs {
        for (i, r) in roots.iter().enumerate() {
            stats[i].push(stat_rate(r));
        }
    }
    let native_stat = median(stats[0].clone());
    println!(
        "native: sequential {native_seq:.0} MiB/s (runs: {}), random 4K {native_iops:.0} IOPS (runs: {}), walk+lstat {native_stat:.0} stat/s (runs: {})",
        list(&seq[0]),
        list(&iops[0]),
        list(&stats[0])
    );
    for (i, (name, ..)) in daemons.iter().enumerate() {
        let (s, r) = (median(seq[i + 1].clone()), median(iops[i + 1].clone()));
        let stat = median(stats[i + 1].clone());
        let rss = rss_mib(many_mounted[i].pid());
        // The native file sits on a virtual disk the host caches or not, and the whole
        // machine is shared, from one round to the next: ratios within each round show
        // what medians blur.
        let ratios = |ours: &[f64], native: &[f64]| -> Vec<f64> {
            ours.iter().zip(native).map(|(o, n)| o / n).collect()
        };
        let worst_round = ratios(&seq[i + 1], &seq[0])
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        let walk_by_round = median(ratios(&stats[i + 1], &stats[0]));
        println!(
            "{name}: sequential {s:.0} MiB/s ({:.2}x native, {worst_round:.2}x in its worst round; runs: {}), random 4K {r:.0} IOPS ({:.2}x; runs: {}), walk+lstat {stat:.0} stat/s ({:.2}x, median of round ratios {walk_by_round:.2}x; runs: {}), RSS after the walks {rss:.1} MiB",
            s / native_seq,
            list(&seq[i + 1]),
            r / native_iops,
            list(&iops[i + 1]),
            stat / native_stat,
            list(&stats[i + 1])
        );
    }
}

/// The image of benchmark 3: a few large files of mixed compressibility and a few
/// thousand small ones (about 250 MiB in all).
fn prepare_mixed(base: &Path) -> PathBuf {
    let dir = base.join("nydusd-mixed");
    if dir.join(".complete").exists() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut rng = Rng(0x5DEE_CE66_D1CE_5EED);
    let mut fill = |buf: &mut [u8], random: bool, tag: u64| {
        for (j, c) in buf.chunks_mut(8).enumerate() {
            let v = if random {
                rng.next()
            } else {
                (tag * 131 + j as u64 % 61) * 0x0001_0001_0001_0001
            };
            let n = c.len();
            c.copy_from_slice(&v.to_le_bytes()[..n]);
        }
    };
    for b in 0..3u64 {
        let d = dir.join(format!("large{b}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut f = std::io::BufWriter::new(File::create(d.join("data.bin")).unwrap());
        let mut block = vec![0u8; 64 << 10];
        for i in 0..(48 * MIB) / block.len() as u64 {
            fill(&mut block, i % 3 == b % 3, i);
            std::io::Write::write_all(&mut f, &block).unwrap();
        }
    }
    let mut sizes = Rng(7);
    let mut buf = vec![0u8; 64 << 10];
    for i in 0..3000u64 {
        let d = dir.join(format!("small{:02}", i % 30));
        std::fs::create_dir_all(&d).unwrap();
        let len = 1024 + (sizes.next() % (63 << 10)) as usize;
        fill(&mut buf[..len], i % 2 == 0, i);
        std::fs::write(d.join(format!("f{i:04}")), &buf[..len]).unwrap();
    }
    std::fs::write(dir.join(".complete"), "").unwrap();
    dir
}

/// Reads every regular file under `root` with 128 KiB reads, depth first in name order
/// (the order `nydus-image create` lays files out in the blob, as `tar` would read them);
/// returns the bytes read.
fn read_all(root: &Path) -> u64 {
    let mut total = 0;
    let mut buf = vec![0u8; 128 << 10];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        let mut dirs = Vec::new();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                dirs.push(p);
            } else if m.is_file() {
                let mut f = File::open(&p).unwrap();
                loop {
                    let n = f
                        .read(&mut buf)
                        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
            }
        }
        stack.extend(dirs.into_iter().rev());
    }
    total
}

/// A JSON document from our nydusd's API socket.
fn api_get(sock: &Path, path: &str) -> serde_json::Value {
    let out = run_ok(
        Command::new("curl")
            .args(["-fsS", "--max-time", "10", "--unix-socket"])
            .arg(sock)
            .arg(format!("http://localhost{path}")),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The model-like source: two 2 GiB weight files, each half incompressible (random)
/// and half compressible about 2:1 (random low nibbles), as safetensors shards are
/// laid out in a model folder: 4 GiB in all.
fn prepare_model(base: &Path) -> PathBuf {
    let dir = base.join("nydusd-model");
    if dir.join(".complete").exists() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for shard in 1..=2u64 {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ shard);
        let name = format!("model-{shard:05}-of-00002.safetensors");
        let mut f = std::io::BufWriter::new(File::create(dir.join(name)).unwrap());
        let mut block = vec![0u8; 1 << 20];
        for i in 0..MODEL_SHARD / block.len() as u64 {
            let compressible = i >= MODEL_SHARD / block.len() as u64 / 2;
            for c in block.chunks_mut(8) {
                let v = rng.next();
                let v = if compressible {
                    v & 0x0F0F_0F0F_0F0F_0F0F
                } else {
                    v
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
            std::io::Write::write_all(&mut f, &block).unwrap();
        }
    }
    std::fs::write(dir.join(".complete"), "").unwrap();
    dir
}

/// Upstream nydusd 2.2, when installed.
fn upstream_nydusd() -> Option<PathBuf> {
    let up = PathBuf::from(
        std::env::var("NYDUS_UPSTREAM_BIN").unwrap_or_else(|_| UPSTREAM_BIN_DEFAULT.into()),
    )
    .join("nydusd");
    up.exists().then_some(up)
}

/// Bytes of each model shard.
const MODEL_SHARD: u64 = 2 << 30;

/// A daemon's peak RSS, sampled every 50 ms until the returned flag is set.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            peak.max(rss_mib(pid))
        });
        RssSampler { stop, handle }
    }

    /// The peak, in MiB.
    fn peak(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// What one cold read of an image measured.
struct Cold {
    secs: f64,
    /// File bytes read through the mount.
    read: u64,
    /// Backend bytes and requests (ours only).
    fetched: Option<(u64, u64)>,
    /// The daemon's peak RSS during the read, MiB.
    rss: f64,
    /// Seconds of the same read again from the filled cache, the page cache dropped.
    warm_secs: f64,
    /// The machine's busy CPU-seconds during the cold read (everything: the registry,
    /// the kernel, the reader), less the background's.
    cpu: f64,
}

/// One cold read of the whole image `repo` (bootstrap `image/image.boot`) through a
/// daemon with the registry backend at `host`: ours (validating digests, its default),
/// or upstream 2.2 (which cannot validate RAFS v6). The page cache is dropped and the
/// registry's blobs read back into it first, so that every contender starts alike.
fn cold_read(
    daemon: &Path,
    image: &Path,
    dirs: (&Path, &Path),
    link: (&str, &str),
    reg_dir: &Path,
    tag: &str,
) -> Cold {
    let (d, sock, upstream) = start_cold(daemon, image, dirs, link, reg_dir, "");
    let rss = RssSampler::start(d.pid());
    let perf = std::env::var("RAFS_BENCH_PERF")
        .ok()
        .filter(|_| !upstream)
        .map(|out| PerfRecord::start(&format!("{out}.{tag}")));
    let (t, busy) = (Instant::now(), CpuBusy::now());
    let read = read_all(&d.mnt);
    let secs = t.elapsed().as_secs_f64();
    let cpu = busy.since() - background_cpu() * secs;
    drop(perf);
    let rss = rss.peak();
    let fetched = (!upstream).then(|| {
        let m = api_get(&sock, "/api/v1/metrics/backend");
        (
            m["read_amount_total"].as_u64().unwrap_or(0),
            m["read_count"].as_u64().unwrap_or(0),
        )
    });
    // Read again from the filled cache, the page cache dropped (files wholly cached are
    // passed through to the kernel): no network, decompression or verification.
    drop_caches();
    let t = Instant::now();
    assert_eq!(read_all(&d.mnt), read);
    let warm_secs = t.elapsed().as_secs_f64();
    drop(d);
    let _ = std::fs::remove_dir_all(dirs.0);
    let _ = std::fs::remove_dir_all(dirs.1);
    Cold {
        secs,
        read,
        fetched,
        rss,
        warm_secs,
        cpu,
    }
}

/// Starts `daemon` on `image` with the registry backend at `host`/`repo` and its cache in
/// `cache` (both dirs emptied first), `extra` (and for ours `RAFS_BENCH_CONFIG`) added to its config, after dropping the
/// page cache and reading the registry's blobs back into it. Returns the daemon, its API
/// socket and whether it is upstream's.
fn start_cold(
    daemon: &Path,
    image: &Path,
    (work, cache): (&Path, &Path),
    (host, repo): (&str, &str),
    reg_dir: &Path,
    extra: &str,
) -> (FuseDaemon, PathBuf, bool) {
    let _ = std::fs::remove_dir_all(work);
    let _ = std::fs::remove_dir_all(cache);
    std::fs::create_dir_all(work).unwrap();
    std::fs::create_dir_all(cache).unwrap();
    let upstream = Some(daemon.to_path_buf()) == upstream_nydusd();
    // `RAFS_BENCH_CONFIG=<json>`: added to our daemon's config (`,"key":value,...`).
    let extra = match std::env::var("RAFS_BENCH_CONFIG") {
        Ok(more) if !upstream => format!("{extra}{more}"),
        _ => extra.to_string(),
    };
    let cfg = work.join("registry.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http","host":"{host}","repo":"{repo}"}}}},"cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}},"mode":"direct","digest_validate":{}{extra}}}"#,
            cache.display(),
            !upstream
        ),
    )
    .unwrap();
    drop_caches();
    warm_registry(reg_dir);
    let mnt = work.join("mnt");
    let sock = work.join("api.sock");
    let boot = image.join("image.boot");
    let d = if upstream {
        start_upstream_nydusd(&boot, &cfg, &mnt, &work.join("daemon.log"))
    } else {
        start_fuse_daemon(
            Command::new(daemon)
                .arg("--config")
                .arg(&cfg)
                .arg("--bootstrap")
                .arg(&boot)
                .arg("--mountpoint")
                .arg(&mnt)
                .arg("--apisock")
                .arg(&sock)
                .args(["--log-level", "warn"]),
            &mnt,
            &work.join("daemon.log"),
        )
    };
    (d, sock, upstream)
}

/// On-demand reads while a model image is prefetched: ten 4 KiB reads of chunks of the
/// second shard (which prefetch reaches last), 100 ms apart, each timed. Returns the
/// seconds until prefetch was done, and the reads' latencies in ms.
fn cold_prefetch(
    ours: &Path,
    image: &Path,
    dirs: (&Path, &Path),
    link: (&str, &str),
    reg_dir: &Path,
    prefetch: bool,
) -> (f64, Vec<f64>) {
    let extra = if prefetch {
        r#","fs_prefetch":{"enable":true,"prefetch_all":true}"#
    } else {
        ""
    };
    let t = Instant::now();
    let (d, sock, _) = start_cold(ours, image, dirs, link, reg_dir, extra);
    let shard = d.mnt.join("model-00002-of-00002.safetensors");
    let f = File::open(&shard).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::new();
    for k in 0..10u64 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let at = Instant::now();
        f.read_exact_at(&mut buf, k * 197 * MIB + 12345).unwrap();
        lat.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    let done = loop {
        let m = api_get(&sock, "/api/v1/metrics/blobcache");
        if !prefetch || m["prefetch_done"].as_bool() == Some(true) {
            break t.elapsed().as_secs_f64();
        }
        assert!(t.elapsed().as_secs() < 600, "prefetch did not finish");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(f);
    drop(d);
    let _ = std::fs::remove_dir_all(dirs.0);
    let _ = std::fs::remove_dir_all(dirs.1);
    (done, lat)
}

/// Reads every file the registry stores into the page cache (curl and the daemons
/// then all find the blobs there, as a registry serving a hot image has them).
fn warm_registry(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut f = File::open(&p).unwrap();
                while f.read(&mut buf).unwrap() > 0 {}
            }
        }
    }
}

/// Downloads every blob with curl, one after the other; returns the seconds taken.
fn cold_curl(host: &str, repo: &str, blobs: &[(String, u64)]) -> f64 {
    let t = Instant::now();
    for (id, size) in blobs {
        let out = run_ok(
            Command::new("curl")
                .args(["-fsS", "--max-time", "300", "-o", "/dev/null", "-w"])
                .arg("%{size_download}")
                .arg(format!("http://{host}/v2/{repo}/blobs/sha256:{id}")),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            size.to_string()
        );
    }
    t.elapsed().as_secs_f64()
}

/// An image of the cold benchmark, pushed to the registry.
struct ColdImage {
    name: &'static str,
    repo: String,
    image: PathBuf,
    blobs: Vec<(String, u64)>,
    blob_bytes: u64,
    file_bytes: u64,
}

impl ColdImage {
    fn new(name: &'static str, src: &Path, image: PathBuf, reg: &Registry) -> ColdImage {
        build(src, &image);
        let mut blobs: Vec<(String, u64)> = std::fs::read_dir(image.join("blobs"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        blobs.sort();
        let repo = format!("bench/{name}");
        for (id, _) in &blobs {
            reg.push_blob(&repo, id, &image.join("blobs").join(id));
        }
        ColdImage {
            name,
            repo,
            blob_bytes: blobs.iter().map(|b| b.1).sum(),
            file_bytes: read_all(src),
            image,
            blobs,
        }
    }
}

/// Benchmark 3: cold reads through the registry backend next to curl, upstream nydusd
/// 2.2 and the decode limit; the mixed image through 200 Mbit/s too.
fn cold(base: &Path) {
    require_root_tools(&["docker-registry", "curl", "ip", "tc"]);
    let ours = bin("nydusd");
    let upstream = upstream_nydusd();
    // `RAFS_BENCH_COLD=mixed` or `=model`: that image only (the shaped read is the
    // mixed image's); `RAFS_BENCH_QUICK=1`: ours and its limit and curl only.
    let only = std::env::var("RAFS_BENCH_COLD").ok();
    assert!(
        only.as_deref().is_none_or(|o| o == "mixed" || o == "model"),
        "RAFS_BENCH_COLD is mixed or model"
    );
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let quick = std::env::var("RAFS_BENCH_QUICK").as_deref() == Ok("1");
    let mut sources = Vec::new();
    if wanted("mixed") {
        sources.push(("mixed", prepare_mixed(base)));
    }
    if wanted("model") {
        sources.push(("model", prepare_model(base)));
    }

    // Guards in drop order: the daemons (inside cold_read), the registry, the namespace.
    let ns = NetNs::create("bench");
    let reg_dir = tempfile::tempdir_in(base).unwrap();
    let reg = Registry::start_in_netns(reg_dir.path(), &ns);
    let images: Vec<ColdImage> = sources
        .iter()
        .map(|(name, src)| ColdImage::new(name, src, base.join(format!("nydusd-{name}-img")), &reg))
        .collect();
    let upstream = upstream.filter(|_| !quick);
    let (work, cache) = (base.join("nydusd-cold"), base.join("nydusd-cold-cache"));
    let shm_cache = PathBuf::from("/dev/shm/rafs-bench-cold-cache");
    let (disk, shm) = (
        (work.as_path(), cache.as_path()),
        (work.as_path(), shm_cache.as_path()),
    );
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "cold reads from docker-registry in a network namespace (rates in MiB/s of files read):"
    );
    let shaped = std::env::var("RAFS_BENCH_SHAPED").as_deref() != Ok("0");
    if let Some(img) = images.iter().find(|i| shaped && i.name == "mixed") {
        let link = (reg.addr.as_str(), img.repo.as_str());
        ns.shape(200);
        let curl_s = cold_curl(&reg.addr, &img.repo, &img.blobs);
        let c = cold_read(&ours, &img.image, disk, link, reg_dir.path(), "shaped");
        assert_eq!(c.read, img.file_bytes, "bytes read through the mount");
        println!(
            "  {} through 200 Mbit/s: ours {:.1} MiB/s of blob vs curl {:.1} MiB/s -> {:.2}x curl",
            img.name,
            mib(img.blob_bytes) / c.secs,
            mib(img.blob_bytes) / curl_s,
            curl_s / c.secs
        );
        ns.unshape();
    }
    for img in &images {
        let link = (reg.addr.as_str(), img.repo.as_str());
        let (limit_s, limit_bytes, decode_cpu) =
            decode_limit(&img.image.join("image.boot"), &img.image.join("blobs"), 2);
        let decode_cpu = decode_cpu - background_cpu() * limit_s;
        drop_caches();
        warm_registry(reg_dir.path());
        let busy = CpuBusy::now();
        let curl_s = cold_curl(&reg.addr, &img.repo, &img.blobs);
        let wire_cpu = busy.since() - background_cpu() * curl_s;
        let c = cold_read(&ours, &img.image, disk, link, reg_dir.path(), img.name);
        assert_eq!(c.read, img.file_bytes, "bytes read through the mount");
        let tmpfs = (img.name == "model" && !quick).then(|| {
            let tag = format!("{}-tmpfs", img.name);
            let c = cold_read(&ours, &img.image, shm, link, reg_dir.path(), &tag);
            assert_eq!(c.read, img.file_bytes, "bytes read through the mount");
            c
        });
        let up = upstream.as_ref().map(|u| {
            let c = cold_read(u, &img.image, disk, link, reg_dir.path(), "");
            assert_eq!(
                c.read, img.file_bytes,
                "bytes read through upstream's mount"
            );
            c
        });
        let rate = |s: f64| mib(img.file_bytes) / s;
        let (fetched, requests) = c.fetched.unwrap_or_default();
        println!(
            "  {} ({:.0} MiB of files, {} blob(s), {:.0} MiB), unshaped:",
            img.name,
            mib(img.file_bytes),
            img.blobs.len(),
            mib(img.blob_bytes)
        );
        println!(
            "    ours      {:>7.1} MiB/s  ({:.0} MiB fetched in {requests} requests, peak RSS {:.0} MiB; read again from its cache: {:.1} MiB/s)",
            rate(c.secs),
            mib(fetched),
            c.rss,
            rate(c.warm_secs)
        );
        if let Some(t) = &tmpfs {
            println!(
                "    ours      {:>7.1} MiB/s  with its cache on tmpfs (peak RSS {:.0} MiB)",
                rate(t.secs),
                t.rss
            );
        }
        println!(
            "    limit     {:>7.1} MiB/s  (its {:.0} MiB of chunks decompressed and verified from memory on 2 threads) -> ours {:.2}x (target >= 0.8x)",
            mib(limit_bytes) / limit_s,
            mib(limit_bytes),
            rate(c.secs) / (mib(limit_bytes) / limit_s)
        );
        println!(
            "    curl      {:>7.1} MiB/s  (the blobs, {:.1} MiB/s of blob) -> ours {:.2}x",
            rate(curl_s),
            mib(img.blob_bytes) / curl_s,
            curl_s / c.secs
        );
        // The registry shares the two cores: a cold read costs at least the wire's CPU
        // (the registry, the kernel, a client's receive) and the decoder's, so two
        // cores doing nothing else could read no faster than this (and a daemon must
        // also hand the bytes over, which this leaves out).
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
        let limit = mib(limit_bytes) / limit_s;
        let bound = cores * mib(limit_bytes) / (wire_cpu + decode_cpu);
        println!(
            "    cpu       {:>7.1} MiB/s  (the wire {wire_cpu:.1} CPU-s (registry and curl), decoding {decode_cpu:.1} CPU-s: their sum on {cores} cores) = {:.2}x the limit; the machine was busy {:.1} CPU-s during ours' read -> ours {:.2}x",
            bound,
            bound / limit,
            c.cpu,
            rate(c.secs) / bound,
        );
        if img.name == "model" && !quick {
            let (done, during) = cold_prefetch(&ours, &img.image, disk, link, reg_dir.path(), true);
            let (_, idle) = cold_prefetch(&ours, &img.image, disk, link, reg_dir.path(), false);
            let stats = |v: &[f64]| (median(v.to_vec()), v.iter().cloned().fold(0.0, f64::max));
            let ((dm, dx), (im, ix)) = (stats(&during), stats(&idle));
            println!(
                "    prefetch  {:>7.1} MiB/s  (prefetch_all from mount to done: {done:.1} s) -> {:.2}x ours' read; 4 KiB reads of chunks it had not reached: median {dm:.1} ms, max {dx:.1} ms (without prefetch: {im:.1}, {ix:.1})",
                mib(img.file_bytes) / done,
                (mib(img.file_bytes) / done) / rate(c.secs)
            );
        }
        match up {
            Some(u) => println!(
                "    upstream  {:>7.1} MiB/s  (nydusd 2.2, digests not validated, peak RSS {:.0} MiB) -> ours {:.2}x (target > 1x)",
                rate(u.secs),
                u.rss,
                u.secs / c.secs
            ),
            None if quick => {}
            None => println!("    upstream  not installed (run tests/run.sh)"),
        }
    }
    drop(reg);
    drop(ns);
}
