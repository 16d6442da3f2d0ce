//! One blob to N nodes at once (`cargo bench -p rafs-e2e --bench p2p`, as root, after
//! `tests/run.sh` has built dfdaemon): the origin, `docker-registry` in a network
//! namespace of its own behind a 200 Mbit/s `tbf` link, serves a 512 MiB blob to N = 2,
//! 4 and 8 nodes on their own loopback addresses, three ways in the same run:
//!
//! - **direct**: N `curl`s from the registry;
//! - **dfdaemon**: N real dfdaemons (dragonfly-client 1.5.10) and a dfdaemon seed
//!   under our scheduler, each node's `curl` through its dfdaemon's proxy;
//! - **ours**: N of our `p2p-peer`s and our seed under our scheduler, likewise.
//!
//! Every swarm is fresh (new scheduler, seed and peers, empty storage). Printed per
//! row: seconds from the N requests to the last node having every byte (each copy's
//! SHA-256 checked), the origin's blob bytes (its access log) in copies of the blob,
//! and the highest peak RSS (`VmHWM`) of the N peers and of the seed. `RUNS` runs of
//! the swarms (default 3; medians, with the spread of the times), one of direct (N
//! pulls sharing the link take the link's time); `P2P_BENCH_MIB` (default
//! 512) and `P2P_BENCH_N` (default `2,4,8`) change the blob and the swarm sizes;
//! `RAFS_BENCH_DIR` (default `/var/tmp/rafs-bench`) holds the work directories.
//!
//! `-- nydusd`: our nydusd's cold read of a whole image through the node's peer, when
//! another peer already has the blob, against the same read from the registry without
//! a limit (see `nydusd_part`). `P2P_BENCH_WARM=1` also reads it again through the same
//! peer once it holds the blob; `P2P_BENCH_PERF=<file>` records a system-wide `perf`
//! profile of each read (`<file>.direct`, `<file>.peer`); `P2P_BENCH_LOGS=all` prints the
//! node's whole log after each run (any other value, its download's summary).

use rafs_e2e::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The origin's link, Mbit/s.
const MBIT: u32 = 200;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Dfdaemon,
    Ours,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Dfdaemon => "dfdaemon",
            Kind::Ours => "ours",
        }
    }
}

struct Sample {
    secs: f64,
    origin: u64,
    rss_peer: u64,
    rss_seed: u64,
}

/// Fetches `url` once per entry of `proxies` at once (`None`: straight from the
/// origin), checks every copy's SHA-256; the seconds until the last one ended.
fn fetch_all(proxies: &[Option<String>], url: &str, hex: &str) -> f64 {
    if std::env::var_os("P2P_BENCH_LOGS").is_some() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        eprintln!(
            "fetches start at {:.3} (seconds since the epoch)",
            now.as_secs_f64()
        );
    }
    let t0 = Instant::now();
    let kids: Vec<_> = proxies
        .iter()
        .map(|p| {
            let via = p.as_ref().map(|p| format!("-x {p}")).unwrap_or_default();
            Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "set -o pipefail; curl -sS --fail --max-time 1200 {via} '{url}' | openssl dgst -sha256 -r"
                ))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && got.starts_with(hex),
            "node {i} ({:?}): {} {got}",
            proxies[i],
            out.status
        );
    }
    t0.elapsed().as_secs_f64()
}

fn wait_for_hosts(s: &Scheduler, n: usize) {
    let ok = wait_until(Duration::from_secs(60), || {
        s.metric("scheduler_hosts") as usize >= n
    });
    assert!(ok, "the scheduler did not see {n} hosts:\n{}", s.metrics());
}

fn blob_bytes(reg: &Registry, from: usize) -> (u64, usize) {
    let log = reg.access_log();
    let bytes = log[from.min(log.len())..]
        .iter()
        .filter(|e| e.method == "GET" && e.blob().is_some())
        .map(|e| e.bytes)
        .sum();
    (bytes, log.len())
}

fn run(kind: Kind, n: usize, dir: &Path, reg: &Registry, url: &str, hex: &str) -> Sample {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let (_, before) = blob_bytes(reg, 0);
    let mut sample = Sample {
        secs: 0.0,
        origin: 0,
        rss_peer: 0,
        rss_seed: 0,
    };
    let max_rss = |pids: &[Option<u32>]| pids.iter().flatten().map(|p| peak_rss(*p)).max();
    match kind {
        Kind::Direct => sample.secs = fetch_all(&vec![None; n], url, hex),
        Kind::Dfdaemon => {
            let sched = Scheduler::start(dir, "scheduler", "");
            let list = [sched.addr.clone()];
            let seed = Dfdaemon::start(dir, "seed", &list, true);
            let peers: Vec<Dfdaemon> = (0..n)
                .map(|i| Dfdaemon::start(dir, &format!("peer{i}"), &list, false))
                .collect();
            wait_for_hosts(&sched, n + 1);
            let proxies: Vec<_> = peers.iter().map(|p| Some(p.proxy())).collect();
            sample.secs = fetch_all(&proxies, url, hex);
            let pids: Vec<_> = peers.iter().map(Dfdaemon::pid).collect();
            sample.rss_peer = max_rss(&pids).unwrap_or(0);
            sample.rss_seed = max_rss(&[seed.pid()]).unwrap_or(0);
        }
        Kind::Ours => {
            let sched = Scheduler::start(dir, "scheduler", "");
            let list = [sched.addr.clone()];
            let seed = OurPeer::start(dir, "seed", &list, true);
            let peers: Vec<OurPeer> = (0..n)
                .map(|i| OurPeer::start(dir, &format!("peer{i}"), &list, false))
                .collect();
            wait_for_hosts(&sched, n + 1);
            let proxies: Vec<_> = peers.iter().map(|p| Some(p.proxy())).collect();
            sample.secs = fetch_all(&proxies, url, hex);
            if std::env::var_os("P2P_BENCH_LOGS").is_some() {
                for (i, p) in peers.iter().enumerate() {
                    for l in p.log().lines().filter(|l| l.contains("complete in")) {
                        eprintln!("peer{i}: {l}");
                    }
                }
                for (what, log) in [("seed", seed.log()), ("peer0", peers[0].log())] {
                    for l in log.lines().filter(|l| l.contains("task")) {
                        eprintln!("{what}: {l}");
                    }
                }
            }
            let pids: Vec<_> = peers.iter().map(OurPeer::pid).collect();
            sample.rss_peer = max_rss(&pids).unwrap_or(0);
            sample.rss_seed = max_rss(&[seed.pid()]).unwrap_or(0);
        }
    }
    sample.origin = blob_bytes(reg, before).0;
    let _ = std::fs::remove_dir_all(dir);
    sample
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds to read every file under `root` (1 MiB reads), and the bytes read.
fn read_all(root: &Path) -> (f64, u64) {
    fn walk(p: &Path, total: &mut u64, buf: &mut [u8]) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&path, total, buf);
            } else if ft.is_file() {
                let mut f = std::fs::File::open(&path).unwrap();
                loop {
                    let n = std::io::Read::read(&mut f, buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    *total += n as u64;
                }
            }
        }
    }
    let t0 = Instant::now();
    let mut total = 0;
    walk(root, &mut total, &mut vec![0u8; 1 << 20]);
    (t0.elapsed().as_secs_f64(), total)
}

/// Our nydusd mounting `boot` from the registry at `reg` (repo `bench`), through
/// `proxy` when given; returns the seconds and bytes of a cold read of every file.
fn nydusd_cold(dir: &Path, boot: &Path, reg: &str, proxy: Option<&str>) -> (f64, u64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    let proxy_given = proxy.is_some();
    let proxy = proxy
        .map(|p| format!(r#","proxy":{{"url":"{p}","fallback":false}}"#))
        .unwrap_or_default();
    let cfg = dir.join("nydusd.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http",
            "host":"{reg}","repo":"bench","timeout":60{proxy}}}}},
            "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}}}}"#,
            dir.join("cache").display()
        ),
    )
    .unwrap();
    let mnt = dir.join("mnt");
    let d = start_fuse_daemon(
        Command::new(bin("nydusd"))
            .arg("--bootstrap")
            .arg(boot)
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--config")
            .arg(&cfg),
        &mnt,
        &dir.join("nydusd.log"),
    );
    drop_caches();
    // `P2P_BENCH_PERF=<file>`: a system-wide `perf record` of each read, to
    // `<file>.direct` and `<file>.peer`.
    let perf = std::env::var("P2P_BENCH_PERF").ok().map(|out| {
        PerfRecord::start(&format!(
            "{out}.{}",
            if proxy_given { "peer" } else { "direct" }
        ))
    });
    let r = read_all(&d.mnt);
    drop(perf);
    drop(d);
    let _ = std::fs::remove_dir_all(dir);
    r
}

/// `-- nydusd`: our nydusd's cold read of a whole image (four 64 MiB files, half
/// incompressible) from a loopback registry without a limit, against the same read
/// through the node's peer when another peer already has the blob (a fresh peer each
/// run, so it fetches the blob from the swarm).
fn nydusd_part(root: &Path, runs: usize) {
    let src = root.join("nsrc");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4u64 {
        let mut data = noise(32 << 20, 500 + i);
        data.extend(
            std::iter::repeat_n(b"compressible text, ".as_slice(), (32 << 20) / 19).flatten(),
        );
        data.truncate(64 << 20);
        std::fs::write(src.join(format!("w{i}.bin")), data).unwrap();
    }
    let img = build_image(&src, &root.join("nimg"), &["--compressor", "zstd"]);
    let reg_dir = root.join("nreg");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in(&reg_dir, "");
    let mut urls = Vec::new();
    for b in std::fs::read_dir(&img.blobs).unwrap().flatten() {
        let id = b.file_name().to_string_lossy().into_owned();
        reg.push_blob("bench", &id, &b.path());
        urls.push((
            format!("http://{}/v2/bench/blobs/sha256:{id}", reg.addr),
            id,
        ));
    }
    let swarm = root.join("nswarm");
    let _ = std::fs::remove_dir_all(&swarm);
    std::fs::create_dir_all(&swarm).unwrap();
    let sched = Scheduler::start(&swarm, "scheduler", "");
    let list = [sched.addr.clone()];
    let _seed = OurPeer::start(&swarm, "seed", &list, true);
    let holder = OurPeer::start(&swarm, "holder", &list, false);
    wait_for_hosts(&sched, 2);
    for (url, id) in &urls {
        fetch_all(&[Some(holder.proxy())], url, id);
    }
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    for run in 0..runs {
        let (s, n) = nydusd_cold(&root.join("nd-direct"), &img.boot, &reg.addr, None);
        bytes = n;
        direct.push(n as f64 / s / (1 << 20) as f64);
        let node = OurPeer::start(&swarm, &format!("node{run}"), &list, false);
        wait_for_hosts(&sched, 3 + run);
        let (s, _) = nydusd_cold(
            &root.join("nd-peer"),
            &img.boot,
            &reg.addr,
            Some(&node.proxy()),
        );
        through.push(n as f64 / s / (1 << 20) as f64);
        if std::env::var_os("P2P_BENCH_WARM").is_some() {
            let (s2, _) = nydusd_cold(
                &root.join("nd-peer"),
                &img.boot,
                &reg.addr,
                Some(&node.proxy()),
            );
            eprintln!(
                "run {run}: again through the same peer (it holds the blob) {:.0} MiB/s",
                n as f64 / s2 / (1 << 20) as f64
            );
        }
        if std::env::var_os("P2P_BENCH_LOGS").is_some() {
            let all = std::env::var("P2P_BENCH_LOGS").is_ok_and(|v| v == "all");
            for l in node
                .log()
                .lines()
                .filter(|l| all || l.contains("complete in"))
            {
                eprintln!("node{run}: {l}");
            }
        }
        eprintln!(
            "run {run}: direct {:.0} MiB/s, through the node's peer {:.0} MiB/s",
            direct[run], through[run]
        );
    }
    let (d, p) = (median(direct.clone()), median(through.clone()));
    println!(
        "\nnydusd cold read of {} MiB of files, medians of {runs} runs: from the registry \
         {d:.0} MiB/s; through the node's peer, another peer holding the blob, {p:.0} MiB/s \
         ({:.2}x)",
        bytes >> 20,
        p / d
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::args().any(|a| a == "nydusd") {
        let root = std::path::PathBuf::from(
            std::env::var("RAFS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/rafs-bench".into()),
        )
        .join("p2p-nydusd");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let runs = std::env::var("RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3);
        nydusd_part(&root, runs);
        let _ = std::fs::remove_dir_all(&root);
        return;
    }
    require_root_tools(&["docker-registry", "curl", "ip", "tc"]);
    dfdaemon_bin();
    let mib: u64 = std::env::var("P2P_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let ns_sizes: Vec<usize> = std::env::var("P2P_BENCH_N")
        .unwrap_or_else(|_| "2,4,8".into())
        .split(',')
        .map(|s| s.trim().parse().expect("P2P_BENCH_N: numbers"))
        .collect();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let root = std::path::PathBuf::from(
        std::env::var("RAFS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/rafs-bench".into()),
    )
    .join("p2p");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();

    let ns = NetNs::create("p2pb");
    let reg_dir = root.join("registry");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in_netns(&reg_dir, &ns);
    let len = mib << 20;
    let blob = root.join("blob");
    std::fs::write(&blob, noise(len as usize, 71)).unwrap();
    let hex = sha256_file(&blob).unwrap();
    reg.push_blob("bench", &hex, &blob);
    std::fs::remove_file(&blob).unwrap();
    let url = format!("http://{}/v2/bench/blobs/sha256:{hex}", reg.addr);
    ns.shape(MBIT);

    let kinds = [Kind::Direct, Kind::Dfdaemon, Kind::Ours];
    // results[n index][kind index] = samples
    let mut results: Vec<Vec<Vec<Sample>>> = ns_sizes
        .iter()
        .map(|_| kinds.iter().map(|_| Vec::new()).collect())
        .collect();
    for run_no in 0..runs {
        for (ni, &n) in ns_sizes.iter().enumerate() {
            for (ki, &kind) in kinds.iter().enumerate() {
                // N direct pulls share the link: their time is the link's, run to run.
                if kind == Kind::Direct && run_no > 0 {
                    continue;
                }
                let dir = root.join(format!("{}-{n}-{run_no}", kind.name()));
                let s = run(kind, n, &dir, &reg, &url, &hex);
                eprintln!(
                    "run {run_no}: {:>8} N={n}: {:.1} s, origin {:.3} copies, peak RSS peer {} MiB, seed {} MiB",
                    kind.name(),
                    s.secs,
                    s.origin as f64 / len as f64,
                    s.rss_peer >> 20,
                    s.rss_seed >> 20
                );
                results[ni][ki].push(s);
            }
        }
    }
    ns.unshape();

    println!(
        "\nOne {mib} MiB blob to N nodes at once, the origin at {MBIT} Mbit/s; medians of \
         {runs} run(s): seconds until all N have it (min-max), origin blob bytes in copies, \
         highest peak RSS of the peers / of the seed"
    );
    println!(
        "| N | direct | dfdaemon | ours | dfdaemon origin | ours origin | dfdaemon RSS peer/seed | ours RSS peer/seed |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut ours_secs = Vec::new();
    for (ni, &n) in ns_sizes.iter().enumerate() {
        let secs = |ki: usize| {
            let v: Vec<f64> = results[ni][ki].iter().map(|s| s.secs).collect();
            let (lo, hi) = (
                v.iter().copied().fold(f64::MAX, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            );
            (median(v), lo, hi)
        };
        let copies = |ki: usize| {
            median(
                results[ni][ki]
                    .iter()
                    .map(|s| s.origin as f64 / len as f64)
                    .collect(),
            )
        };
        let rss = |ki: usize| {
            let peer = results[ni][ki]
                .iter()
                .map(|s| s.rss_peer)
                .max()
                .unwrap_or(0);
            let seed = results[ni][ki]
                .iter()
                .map(|s| s.rss_seed)
                .max()
                .unwrap_or(0);
            format!("{} / {} MiB", peer >> 20, seed >> 20)
        };
        let show = |(m, lo, hi): (f64, f64, f64)| format!("{m:.1} s ({lo:.1}-{hi:.1})");
        let (d, f, o) = (secs(0), secs(1), secs(2));
        ours_secs.push(o.0);
        println!(
            "| {n} | {} | {} | {} | {:.3} | {:.3} | {} | {} |",
            show(d),
            show(f),
            show(o),
            copies(1),
            copies(2),
            rss(1),
            rss(2)
        );
        let apart = if o.2 < f.1 {
            "ours faster, beyond the spread"
        } else if o.0 < f.0 {
            "ours faster by the median, within the spread"
        } else {
            "dfdaemon faster"
        };
        println!(
            "  N={n}: ours/dfdaemon {:.2}x the time ({apart}); ours/direct {:.2}x",
            o.0 / f.0,
            o.0 / d.0
        );
    }
    if ours_secs.len() > 1 {
        println!(
            "ours at N={} / ours at N={}: {:.2}x",
            ns_sizes[ns_sizes.len() - 1],
            ns_sizes[0],
            ours_secs[ours_secs.len() - 1] / ours_secs[0]
        );
    }
}
