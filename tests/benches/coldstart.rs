//! Cold start of the python fixture on several nodes at once, through the swarm and as
//! an OCI image (`cargo bench -p rafs-e2e --bench coldstart`, as root, after
//! `tests/run.sh` has built the binaries).
//!
//! The origin is one loopback `docker-registry` behind a shaping proxy
//! ([`FaultProxy::shape`]) that lets all its answers share 200 Mbit/s. A node is its own
//! containerd, our snapshotter and, for the swarm, our `p2p-peer` on its own loopback
//! address; the swarm also has our scheduler and our seed peer. Six rows, each run
//! from scratch (fresh daemons and directories, page cache dropped):
//!
//! - **OCI, 1 node** and **OCI, N nodes at once**: the python fixture as an ordinary OCI
//!   image, pulled by CRI (`PullImage`) into containerd's overlayfs snapshotter;
//! - **nydus, 1 node** and **nydus, N nodes at once**: its nydus conversion through our
//!   snapshotter, every nydusd reading the registry itself (for comparison);
//! - **swarm, 1 node** and **swarm, N nodes at once**: the nydus image through our
//!   snapshotter, whose nydusd config template points every nydusd at the node's peer
//!   (upstream's `proxy` section), and containerd with the peer as its registry mirror
//!   (`hosts.toml`) for what it pulls itself (the bootstrap layer).
//!
//! Every node pulls and then runs `python3 -c ...` with `ctr run` until it prints; the
//! nodes of a row start together. Printed per row: the seconds until each node printed
//! (the slowest first), and the origin's bytes in blob `GET`s (its access log), counted
//! once the origin has been quiet for 2 s (the swarm's background fetches included).
//! Targets (issue 17): every swarm node ready sooner than one OCI node alone; the
//! swarm's origin bytes for N nodes ≤ 1.1 × those for one node.
//!
//! `COLDSTART_N` (default 4) nodes, `RUNS` (default 3) runs of each row (medians);
//! `RAFS_BENCH_DIR` (default `/var/tmp/rafs-bench`) holds the work directories.

use rafs_e2e::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the containers run, and what they must print.
const COMMAND: &[&str] = &[
    "python3",
    "-c",
    "import json; print(json.dumps({'ok': 2 + 3}))",
];
const EXPECTED: &str = "{\"ok\": 5}";

/// The origin's bandwidth, bytes per second (200 Mbit/s).
const RATE: u64 = 200_000_000 / 8;

/// How a node gets the image.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// The OCI image, containerd's overlayfs snapshotter.
    Oci,
    /// The nydus image, our snapshotter, nydusd from the registry.
    Nydus,
    /// The nydus image, our snapshotter, nydusd and containerd through the node's peer.
    Swarm,
}

/// One row's run: each node's seconds to its output, and the origin's blob bytes.
struct Sample {
    secs: Vec<f64>,
    origin: u64,
}

/// A node's daemons; dropped (stopped, unmounted) in field order.
struct Node {
    ctd: Containerd,
    _snap: NydusSnapshotter,
    _peer: Option<OurPeer>,
}

/// The swarm's shared part: a scheduler and a seed peer.
struct Swarm {
    _seed: OurPeer,
    sched: Scheduler,
}

/// Sums the blob `GET` bytes of the registry's access log from entry `from` on.
fn blob_bytes(reg: &Registry, from: usize) -> u64 {
    reg.access_log()[from..]
        .iter()
        .filter(|e| e.method == "GET" && e.blob().is_some())
        .map(|e| e.bytes)
        .sum()
}

/// Starts a node without a peer in `dir`: containerd pulling into `snapshotter`
/// (containerd's overlayfs, or ours with its default nydusd config).
fn plain_node(dir: &Path, snapshotter: &str) -> Node {
    let snap = NydusSnapshotter::start(&dir.join("snap"), "");
    let ctd = Containerd::start_with(&dir.join("ctd"), &snap.sock, snapshotter);
    Node {
        ctd,
        _snap: snap,
        _peer: None,
    }
}

/// Starts a swarm node in `dir`: its peer on a fresh loopback address (a child of
/// `swarm`), our snapshotter with every nydusd reading through the peer, containerd with
/// the peer as its mirror of `origin` (`host:port`).
fn swarm_node(dir: &Path, name: &str, swarm: &Swarm, origin: &str) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let mirror = format!("  registryMirror:\n    addr: http://{origin}\n");
    let peer = OurPeer::start_with_proxy(
        dir,
        name,
        std::slice::from_ref(&swarm.sched.addr),
        false,
        &mirror,
    );
    let template = dir.join("nydusd.json");
    peer.write_nydusd_template(&template, true);
    let hosts = dir.join("hosts");
    mirror_hosts(&hosts, origin, &peer.proxy());
    let snap = NydusSnapshotter::start(
        &dir.join("snap"),
        &format!("[daemon]\nnydusd_config = \"{}\"\n", template.display()),
    );
    let ctd = Containerd::start_with_hosts(&dir.join("ctd"), &snap.sock, SNAPSHOTTER, &hosts);
    Node {
        ctd,
        _snap: snap,
        _peer: Some(peer),
    }
}

/// Pulls and runs `image` on every node at once; each node's seconds from the start to
/// its container's exit, the output checked.
fn start_all(nodes: &[Node], image: &str, snapshotter: &str) -> Vec<f64> {
    drop_caches();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let runs: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                s.spawn(move || {
                    n.ctd
                        .cri_pull(image)
                        .unwrap_or_else(|e| panic!("node {i}: CRI pull of {image}: {e}"));
                    let out = n
                        .ctd
                        .run_with(snapshotter, image, &format!("cold{i}"), COMMAND);
                    let secs = t0.elapsed().as_secs_f64();
                    assert_eq!(
                        String::from_utf8_lossy(&out.stdout).trim(),
                        EXPECTED,
                        "node {i}: {out:?}"
                    );
                    secs
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// One row: `n` fresh nodes (with [`Mode::Swarm`], of a fresh swarm) start `image`
/// together.
fn row(dir: &Path, reg: &Registry, origin: &str, image: &str, n: usize, mode: Mode) -> Sample {
    let swarm = mode == Mode::Swarm;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let sw = swarm.then(|| {
        let sched = Scheduler::start(dir, "scheduler", "");
        let mirror = format!("  registryMirror:\n    addr: http://{origin}\n");
        let seed = OurPeer::start_with_proxy(
            dir,
            "seed",
            std::slice::from_ref(&sched.addr),
            true,
            &mirror,
        );
        Swarm { _seed: seed, sched }
    });
    let nodes: Vec<Node> = (0..n)
        .map(|i| {
            let d = dir.join(format!("node{i}"));
            match &sw {
                Some(sw) => swarm_node(&d, &format!("node{i}"), sw, origin),
                None if mode == Mode::Oci => plain_node(&d, "overlayfs"),
                None => plain_node(&d, SNAPSHOTTER),
            }
        })
        .collect();
    if let Some(sw) = &sw {
        let ok = wait_until(Duration::from_secs(60), || {
            sw.sched.metric("scheduler_hosts") as usize > n
        });
        assert!(ok, "the scheduler did not see {} hosts", n + 1);
    }
    let from = reg.access_log().len();
    let snapshotter = if mode == Mode::Oci {
        "overlayfs"
    } else {
        SNAPSHOTTER
    };
    let mut secs = start_all(&nodes, image, snapshotter);
    if std::env::var_os("COLDSTART_LOGS").is_some() {
        let peers = nodes.iter().filter_map(|n| n._peer.as_ref());
        for p in sw.iter().map(|s| &s._seed).chain(peers) {
            eprintln!("--- {}:\n{}", p.ip, p.log());
        }
    }
    reg.wait_quiet(Duration::from_secs(120));
    let origin = blob_bytes(reg, from);
    drop(nodes);
    drop(sw);
    let _ = std::fs::remove_dir_all(dir);
    secs.sort_by(|a, b| b.total_cmp(a));
    Sample { secs, origin }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "umoci",
        "debootstrap",
        "containerd",
        "ctr",
        "runc",
    ]);
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (n, runs) = (env("COLDSTART_N", 4), env("RUNS", 3));
    let (base, reg, oci, nydus) = python_images("coldstart");
    let proxy = FaultProxy::start(&reg.addr);
    proxy.shape(Duration::ZERO, RATE);
    let via = |r: &str| r.replacen(&reg.addr, &proxy.addr, 1);
    let rows: [(&str, usize, Mode); 6] = [
        ("OCI, 1 node", 1, Mode::Oci),
        ("nydus, 1 node", 1, Mode::Nydus),
        ("swarm, 1 node", 1, Mode::Swarm),
        ("OCI, N nodes at once", n, Mode::Oci),
        ("nydus, N nodes at once", n, Mode::Nydus),
        ("swarm, N nodes at once", n, Mode::Swarm),
    ];
    let mut samples: Vec<Vec<Sample>> = rows.iter().map(|_| Vec::new()).collect();
    let only = std::env::var("COLDSTART_ONLY").unwrap_or_default();
    for run in 0..runs {
        for (i, &(name, count, mode)) in rows.iter().enumerate() {
            if !name.contains(&only) {
                continue;
            }
            let image = via(if mode == Mode::Oci { &oci } else { &nydus });
            let s = row(&base.join("row"), &reg, &proxy.addr, &image, count, mode);
            eprintln!(
                "run {run}: {name}: {:?} s, origin {:.1} MiB",
                s.secs,
                s.origin as f64 / 1048576.0
            );
            samples[i].push(s);
        }
    }
    println!(
        "\nCold start of the python fixture (pull to the command's output), the origin at \
         200 Mbit/s, N = {n}; medians of {runs} run(s): the slowest node and the fastest, \
         origin blob bytes"
    );
    println!("| nodes | slowest | fastest | origin MiB |");
    println!("|---|---|---|---|");
    let mut med = Vec::new();
    for (i, &(name, _, _)) in rows.iter().enumerate() {
        let v = &samples[i];
        if v.is_empty() {
            med.push((f64::NAN, f64::NAN));
            continue;
        }
        let slowest = median(v.iter().map(|s| s.secs[0]).collect());
        let fastest = median(v.iter().map(|s| *s.secs.last().unwrap()).collect());
        let origin = median(v.iter().map(|s| s.origin as f64).collect());
        println!(
            "| {name} | {slowest:.2} s | {fastest:.2} s | {:.1} |",
            origin / 1048576.0
        );
        med.push((slowest, origin));
    }
    println!(
        "swarm, {n} nodes: the slowest ready after {:.2}x the time of one OCI node alone \
         (target < 1); origin bytes {:.3}x those of one swarm node alone (target <= 1.1); \
         {n} OCI nodes: {:.2}x one alone",
        med[5].0 / med[0].0,
        med[5].1 / med[2].1,
        med[3].0 / med[0].0
    );
}
