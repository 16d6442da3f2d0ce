//! virtio-fs benchmark (`cargo bench -p rafs-e2e --bench virtiofs`, as root): in a QEMU
//! TCG guest (`fixtures/make-virtiofs-guest.sh`), a sequential read of a 256 MiB file
//! and an `ls -lR` (a walk with a stat of every entry) of a 10k-file tree, served by our
//! `nydusd virtiofs` from its chunk cache, against `virtiofsd` sharing the same tree
//! unpacked on the host (`--cache always`, as our long entry and attribute timeouts and
//! kept page cache), same guest, same run.
//!
//! Each figure is the second pass, after the guest's page cache is dropped: the first
//! pass fills nydusd's chunk cache (and the host's page cache for virtiofsd). `RUNS`
//! (default 3) rounds, alternating; medians. virtiofsd comes from `VIRTIOFSD` (default
//! `/var/cache/virtiofsd/bin/virtiofsd`: `cargo install virtiofsd --root
//! /var/cache/virtiofsd`, needs Debian's `libseccomp-dev libcap-ng-dev`).

use rafs_e2e::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIG: u64 = 256 << 20;
const FILES: usize = 10_000;

/// The source tree (made once): `big.bin` and `tree/dNN/fNNNN`.
fn source(base: &Path) -> PathBuf {
    let src = base.join("src");
    if src.join(".complete").exists() {
        return src;
    }
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big.bin"), noise(BIG as usize, 0x2545_F491)).unwrap();
    for i in 0..FILES {
        let d = src.join(format!("tree/d{:02}", i % 100));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i:05}")), format!("{i}\n")).unwrap();
    }
    std::fs::write(src.join(".complete"), b"").unwrap();
    src
}

/// Seconds `cmd` takes in the guest (from `/proc/uptime`, 10 ms steps), with the
/// guest's page cache dropped first.
fn timed(g: &mut Guest, cmd: &str) -> f64 {
    let out = g.run(&format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; a=$(cut -d' ' -f1 /proc/uptime); {cmd} >/dev/null; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
    ));
    let v: Vec<f64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    v[1] - v[0]
}

/// One round with the backend behind `sock`: (MiB/s sequential, entries/s walked).
fn round(sock: &Path, mnt_dir: &str) -> (f64, f64) {
    let mut g = Guest::boot(sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    let big = format!("/mnt/{mnt_dir}big.bin");
    let tree = format!("/mnt/{mnt_dir}tree");
    // First passes fill the daemon's cache.
    g.run(&format!("cat {big} > /dev/null; ls -lR {tree} > /dev/null"));
    let read = timed(&mut g, &format!("cat {big}"));
    let walk = timed(&mut g, &format!("ls -lR {tree}"));
    let entries = FILES + 100 + 1;
    ((BIG >> 20) as f64 / read, entries as f64 / walk)
}

fn main() {
    require_root_tools(&["qemu-system-x86_64", "busybox"]);
    let virtiofsd = PathBuf::from(
        std::env::var("VIRTIOFSD").unwrap_or_else(|_| "/var/cache/virtiofsd/bin/virtiofsd".into()),
    );
    assert!(
        virtiofsd.exists(),
        "{} is missing (see the module's doc)",
        virtiofsd.display()
    );
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let base = PathBuf::from(
        std::env::var("RAFS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/rafs-bench".into()),
    )
    .join("virtiofs");
    std::fs::create_dir_all(&base).unwrap();
    let src = source(&base);
    let work = base.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let img = build_image(&src, &work.join("img"), &[]);
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cfg = work.join("nydusd.json");
    std::fs::write(&cfg, localfs_config(&img.blobs, &cache, true)).unwrap();
    let sock = work.join("vfs.sock");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let _ = std::fs::remove_file(&sock);
        let nydusd = ChildGuard::spawn(
            Command::new(bin("nydusd"))
                .args(["virtiofs", "--sock"])
                .arg(&sock)
                .arg("--bootstrap")
                .arg(&img.boot)
                .arg("--config")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap();
        assert!(wait_until(Duration::from_secs(10), || sock.exists()));
        ours.push(round(&sock, ""));
        drop(nydusd);
        let _ = std::fs::remove_file(&sock);
        let vfsd = ChildGuard::spawn(
            Command::new(&virtiofsd)
                .arg("--socket-path")
                .arg(&sock)
                .arg("--shared-dir")
                .arg(&src)
                .args(["--cache", "always", "--sandbox", "none"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap();
        assert!(wait_until(Duration::from_secs(10), || sock.exists()));
        theirs.push(round(&sock, ""));
        drop(vfsd);
    }
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
    let (or, ow) = (med(&ours, |x| x.0), med(&ours, |x| x.1));
    let (tr, tw) = (med(&theirs, |x| x.0), med(&theirs, |x| x.1));
    println!("virtio-fs in a QEMU TCG guest, {runs} rounds alternating, medians (second pass, guest page cache dropped)");
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "nydusd", "virtiofsd", "ratio"
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>7.2}x",
        "sequential read 256 MiB (MiB/s)",
        or,
        tr,
        or / tr
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>7.2}x",
        "ls -lR of 10k files (entries/s)",
        ow,
        tw,
        ow / tw
    );
    println!("rounds: nydusd {ours:.1?}; virtiofsd {theirs:.1?}");
}
