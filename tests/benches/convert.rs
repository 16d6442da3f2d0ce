//! `nydusify convert` benchmark (`cargo bench -p rafs-e2e --bench convert`, as root;
//! build the binaries first: `cargo build --release -p converter`).
//!
//! The python fixture image (`fixtures/make-python-image.sh`, built once into
//! /var/tmp/rafs-fixtures) is pushed with skopeo to a docker-registry on 127.0.0.1. Then,
//! `RAFS_BENCH_RUNS` times (default 3; the three contenders take turns, so load from
//! elsewhere on the machine hits them alike), the benchmark measures:
//! - `nydusify convert` from that registry to it, into a new repository each run (no
//!   blob is skipped by HEAD);
//! - (a) `skopeo copy` of the same image from that registry to a second, empty registry
//!   instance (started anew each run, so skopeo can neither skip nor mount a blob): pure
//!   transfer;
//! - (b) the rafs builder's limit ([`rafs_e2e::limit_loop`]: read + blake3 + zstd (the builder's level) of
//!   1 MiB chunks on all cores) over the image's uncompressed layer bytes, and for
//!   reference single-threaded gunzip of the layers, which the limit does not include
//!   but every conversion of a tar+gzip image has to do.
//!
//! With `RAFS_BENCH_BASELINE_NYDUSIFY=PATH`, another nydusify binary (say, an earlier
//! build) takes its turn too, into repositories of its own.
//!
//! It prints the medians: wall time and MiB/s of source (compressed layer bytes), the
//! conversion's ratio to (a) (target ≤ 2×) and to (b), output vs source size, the chunks
//! deduplication saved, and whether every run produced the same digest.

use rafs_e2e::*;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: f64 = 1024.0 * 1024.0;

/// User + system CPU seconds of the children waited for so far (`/proc/self/stat`,
/// in clock ticks of 1/100 s).
fn children_cpu() -> f64 {
    cpu_fields(13)
}

/// User + system CPU seconds of this process so far.
fn own_cpu() -> f64 {
    cpu_fields(11)
}

/// The sum of fields `at` and `at + 1` after the command name in `/proc/self/stat`
/// (utime and stime at 11, cutime and cstime at 13), in seconds.
fn cpu_fields(at: usize) -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[at].parse::<f64>().unwrap() + f[at + 1].parse::<f64>().unwrap()) / 100.0
}

/// Runs `cmd` to success; returns its wall time and CPU time (seconds).
fn timed(cmd: &mut Command) -> (f64, f64) {
    let cpu = children_cpu();
    let t = Instant::now();
    run_ok(cmd);
    (t.elapsed().as_secs_f64(), children_cpu() - cpu)
}

/// The layer blobs (path, media type, size) of the single image in an OCI layout.
fn layers(layout: &Path) -> Vec<(PathBuf, String, u64)> {
    let blobs = layout.join("blobs/sha256");
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .unwrap()
    };
    let index = json(layout.join("index.json"));
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = json(blobs.join(&m[7..]));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                blobs.join(&l["digest"].as_str().unwrap()[7..]),
                l["mediaType"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Gunzips every layer into `dir` (once) and returns the files; times one pass of
/// gunzip alone on one thread (to memory) and returns it too.
fn uncompressed(layers: &[(PathBuf, String, u64)], dir: &Path) -> (Vec<PathBuf>, f64) {
    let mut out = Vec::new();
    let mut secs = 0.0;
    for (i, (p, media, _)) in layers.iter().enumerate() {
        assert!(media.ends_with("gzip"), "fixture layer {i} is {media}");
        let dest = dir.join(format!("layer-{i}.tar"));
        let gz = fs::read(p).unwrap();
        let t = Instant::now();
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&gz[..])
            .read_to_end(&mut tar)
            .unwrap();
        secs += t.elapsed().as_secs_f64();
        fs::write(&dest, &tar).unwrap();
        out.push(dest);
    }
    (out, secs)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_root_tools(&["docker-registry", "skopeo", "umoci", "debootstrap", "tar"]);
    let runs: usize = std::env::var("RAFS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/make-python-image.sh");
    let t = Instant::now();
    let image = String::from_utf8_lossy(&run_ok(Command::new("bash").arg(script)).stdout)
        .trim()
        .to_string();
    let layout = PathBuf::from(image.rsplit_once(':').unwrap().0);
    let layers = layers(&layout);
    let source_bytes: u64 = layers.iter().map(|l| l.2).sum();
    let source_mib = source_bytes as f64 / MIB;
    let tmp = tempfile::tempdir().unwrap();
    let (raw, _) = uncompressed(&layers, tmp.path());
    let raw_mib = raw
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum::<u64>() as f64
        / MIB;
    println!(
        "python fixture {image}: {} layers, {source_mib:.1} MiB tar+gzip, {raw_mib:.1} MiB \
         uncompressed ({:.1}s to prepare)",
        layers.len(),
        t.elapsed().as_secs_f64()
    );

    let a = Registry::start();
    let src = format!("{}/python:v1", a.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{image}"),
        &format!("docker://{src}"),
    ]));
    let work = tmp.path().join("work");
    fs::create_dir_all(&work).unwrap();

    let (mut conv, mut copy, mut limit, mut gunzip) = (vec![], vec![], vec![], vec![]);
    let (mut conv_cpu, mut copy_cpu, mut limit_cpu) = (vec![], vec![], vec![]);
    let baseline = std::env::var_os("RAFS_BENCH_BASELINE_NYDUSIFY").map(PathBuf::from);
    let (mut base, mut base_cpu) = (vec![], vec![]);
    let mut reports = Vec::new();
    for run in 0..runs {
        let json = tmp.path().join(format!("report-{run}.json"));
        let (wall, cpu) = timed(
            Command::new(bin("nydusify"))
                .args(["convert", "--source", &src, "--target"])
                .arg(format!("{}/python-nydus-{run}:v1", a.addr))
                .arg("--work-dir")
                .arg(&work)
                .arg("--output-json")
                .arg(&json),
        );
        conv.push(wall);
        conv_cpu.push(cpu);
        reports
            .push(serde_json::from_slice::<serde_json::Value>(&fs::read(&json).unwrap()).unwrap());

        if let Some(exe) = &baseline {
            let (wall, cpu) = timed(
                Command::new(exe)
                    .args(["convert", "--source", &src, "--target"])
                    .arg(format!("{}/python-baseline-{run}:v1", a.addr))
                    .arg("--work-dir")
                    .arg(&work),
            );
            base.push(wall);
            base_cpu.push(cpu);
        }

        let b = Registry::start();
        let (wall, cpu) = timed(Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{src}"),
            &format!("docker://{}/python-copy:v1", b.addr),
        ]));
        drop(b);
        copy.push(wall);
        copy_cpu.push(cpu);

        let cpu = own_cpu();
        limit.push(limit_loop(&raw, cores));
        limit_cpu.push(own_cpu() - cpu);
        gunzip.push(uncompressed(&layers, tmp.path()).1);
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (c, s, l, g) = (
        median(conv.clone()),
        median(copy.clone()),
        median(limit.clone()),
        median(gunzip.clone()),
    );
    println!(
        "(a) skopeo copy registry -> second registry: {s:.2}s, {:.0} MiB/s of source (runs: {}; \
         skopeo's own CPU {:.2}s)",
        source_mib / s,
        list(&copy),
        median(copy_cpu)
    );
    println!(
        "(b) limit (read+blake3+zstd-{}, 1 MiB chunks, {cores} threads) on the uncompressed \
         layers: {l:.2}s, {:.0} MiB/s uncompressed = {:.0} MiB/s of source (runs: {}; CPU \
         {:.2}s)",
        rafs::write::ZSTD_LEVEL,
        raw_mib / l,
        source_mib / l,
        list(&limit),
        median(limit_cpu)
    );
    println!(
        "    gunzip of the layers alone, 1 thread (not in the limit): {g:.2}s, {:.0} MiB/s \
         uncompressed (runs: {})",
        raw_mib / g,
        list(&gunzip)
    );
    let r = &reports[conv.iter().position(|x| *x == c).unwrap()];
    println!(
        "nydusify convert registry -> registry: {c:.2}s, {:.0} MiB/s of source (runs: {}; \
         of the median run {:.2}s converting, {:.2}s uploading after; CPU {:.2}s); {:.2}x of \
         (a) (target <= 2x), {:.2}x of (b)",
        source_mib / c,
        list(&conv),
        r["convert_seconds"].as_f64().unwrap(),
        r["push_seconds"].as_f64().unwrap(),
        median(conv_cpu),
        c / s,
        c / l
    );
    if let Some(exe) = &baseline {
        let b = median(base.clone());
        println!(
            "baseline {}: {b:.2}s (runs: {}; CPU {:.2}s); {:.2}x of (a); this build is {:.2}x \
             as fast",
            exe.display(),
            list(&base),
            median(base_cpu),
            b / s,
            b / c
        );
    }
    let target = r["target_bytes"].as_u64().unwrap() as f64 / MIB;
    let file_chunks: u64 = r["images"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["file_chunks"].as_u64().unwrap())
        .sum();
    let digests: Vec<&str> = reports
        .iter()
        .map(|r| r["digest"].as_str().unwrap())
        .collect();
    println!(
        "output {target:.1} MiB vs source {source_mib:.1} MiB ({:.2}x); dedup saved {} of {} \
         chunks ({:.1} MiB uncompressed); same digest every run: {}",
        target / source_mib,
        r["dedup_chunks"],
        file_chunks,
        r["dedup_bytes"].as_u64().unwrap() as f64 / MIB,
        if digests.windows(2).all(|w| w[0] == w[1]) {
            "yes".to_string()
        } else {
            format!("NO: {digests:?}")
        }
    );
}
