//! Cold container start through containerd (`cargo bench -p rafs-e2e --bench snapshotter`,
//! as root): the python fixture (`fixtures/make-python-image.sh`) as an ordinary OCI
//! image through containerd's own overlayfs snapshotter, against its nydus conversion
//! through ours, pulled by CRI (`PullImage`) and run with `ctr run` until the command
//! exits. `NYDUSD_CONFIG=FILE` gives the snapshotter a nydusd config template instead
//! of its default.
//!
//! Both pull from one loopback `docker-registry` behind a shaping proxy
//! ([`FaultProxy::shape`]) in three profiles: none; 20 ms per request; 5 ms per request
//! and 200 Mbit/s. Cold means: before every run containerd's content store, images and
//! snapshots, the snapshotter's state and nydusd's cache are all gone (fresh
//! directories, daemons stopped) and the page cache is dropped. `RUNS` runs of each
//! (default 5), alternating. Printed: median seconds from the pull to the command's
//! exit, and the bytes and requests the registry served up to then (from its access
//! log), with the prefetch setting used.
//!
//! `RAFS_BENCH_DIR` (default `/var/tmp/rafs-bench`) holds the work directories.

use rafs_e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the container runs: python starting and importing a few modules.
const COMMAND: &[&str] = &[
    "python3",
    "-c",
    "import json; print(json.dumps({'ok': 2 + 3}))",
];
const EXPECTED: &str = "{\"ok\": 5}";

struct Sample {
    seconds: f64,
    bytes: u64,
    requests: usize,
}

/// One cold run: fresh containerd and snapshotter, pull, run, measure.
fn cold_run(work: &Path, reg: &Registry, image: &str, nydus: bool) -> Sample {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).unwrap();
    let config = match std::env::var("NYDUSD_CONFIG") {
        Ok(c) => format!("[daemon]\nnydusd_config = \"{c}\""),
        Err(_) => String::new(),
    };
    let snap = NydusSnapshotter::start(&work.join("snap"), &config);
    let cri = if nydus { SNAPSHOTTER } else { "overlayfs" };
    let ctd = Containerd::start_with(&work.join("ctd"), &snap.sock, cri);
    drop_caches();
    let before = reg.access_log().len();
    let t0 = Instant::now();
    ctd.cri_pull(image)
        .unwrap_or_else(|e| panic!("CRI pull of {image}: {e}"));
    let out = ctd.run_with(cri, image, "bench", COMMAND);
    let seconds = t0.elapsed().as_secs_f64();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), EXPECTED);
    let log = reg.access_log()[before..].to_vec();
    drop(ctd);
    drop(snap);
    let _ = std::fs::remove_dir_all(work);
    Sample {
        seconds,
        bytes: log.iter().map(|e| e.bytes).sum(),
        requests: log.len(),
    }
}

/// Compressed bytes of the layers of `reference`'s manifest, and of its nydus bootstrap
/// layer.
fn image_bytes(reference: &str) -> (u64, u64) {
    let out = daemons_run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let layers = m["layers"].as_array().unwrap();
    let size = |l: &serde_json::Value| l["size"].as_u64().unwrap();
    let boot = layers
        .iter()
        .filter(|l| l["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true")
        .map(size)
        .sum();
    (layers.iter().map(size).sum(), boot)
}

fn daemons_run(cmd: &mut Command) -> Vec<u8> {
    run_ok(cmd).stdout
}

fn main() {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "umoci",
        "debootstrap",
        "containerd",
        "ctr",
        "runc",
    ]);
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let (base, reg, oci, nydus) = python_images("snapshotter");
    let ((oci_bytes, _), (nydus_bytes, boot_bytes)) = (image_bytes(&oci), image_bytes(&nydus));
    let proxy = FaultProxy::start(&reg.addr);
    let via = |r: &str| r.replacen(&reg.addr, &proxy.addr, 1);
    println!(
        "python fixture: OCI layers {:.1} MiB, nydus layers {:.1} MiB (bootstrap layer {:.2} MiB); {runs} cold runs each, alternating; nydusd: {}",
        oci_bytes as f64 / 1048576.0,
        nydus_bytes as f64 / 1048576.0,
        boot_bytes as f64 / 1048576.0,
        std::env::var("NYDUSD_CONFIG").map_or_else(
            |_| "the snapshotter's default config (prefetch off, amplify_io 64 KiB, readahead_window 256 KiB)".to_string(),
            |c| format!("config {c}")
        )
    );
    println!(
        "{:<22} {:>9} {:>9} {:>8} {:>20} {:>20} {:>9}",
        "profile",
        "OCI s",
        "nydus s",
        "speedup",
        "OCI MiB/requests",
        "nydus MiB/requests",
        "% image"
    );
    let profiles: [(&str, Duration, u64); 3] = [
        ("none", Duration::ZERO, 0),
        ("20 ms/request", Duration::from_millis(20), 0),
        (
            "5 ms + 200 Mbit/s",
            Duration::from_millis(5),
            200_000_000 / 8,
        ),
    ];
    for (name, delay, rate) in profiles {
        proxy.shape(delay, rate);
        let (mut o, mut n) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            o.push(cold_run(&base.join("run"), &reg, &via(&oci), false));
            n.push(cold_run(&base.join("run"), &reg, &via(&nydus), true));
        }
        let med = |v: &[Sample], f: &dyn Fn(&Sample) -> f64| median(v.iter().map(f).collect());
        let (ot, nt) = (med(&o, &|s| s.seconds), med(&n, &|s| s.seconds));
        let (ob, nb) = (med(&o, &|s| s.bytes as f64), med(&n, &|s| s.bytes as f64));
        let (or, nr) = (
            med(&o, &|s| s.requests as f64),
            med(&n, &|s| s.requests as f64),
        );
        println!(
            "{name:<22} {ot:>9.2} {nt:>9.2} {:>7.1}x {:>13.1}/{or:<6} {:>13.1}/{nr:<6} {:>8.1}%",
            ot / nt,
            ob / 1048576.0,
            nb / 1048576.0,
            100.0 * nb / oci_bytes as f64
        );
    }
}
