//! Our nydusd reading through the node's P2P peer (issue 17): the registry backend's
//! `proxy` section pointed at our `p2p-peer`, under our scheduler with our seed, the
//! origin `docker-registry` behind a byte counter, each node's peer on its own loopback
//! address. Every tree read is compared with its source; the origin's count shows
//! whether the swarm or the registry served the bytes.

use super::p2p_scheduler::{assert_second_node_free, require, wait_for_hosts};
use crate::nydusd::Daemon;
use rafs_e2e::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An image of six 5 MB files and a small one (one zstd blob), in a registry behind a
/// byte-counting proxy.
struct Image {
    src: PathBuf,
    built: crate::nydusd::Image,
    blob_len: u64,
    /// The blob's digest (hex): its task's id.
    blob_hex: String,
    _registry: Registry,
    origin: FaultProxy,
}

fn image(dir: &Path) -> Image {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("d/f{i}")), noise(5_000_000, 300 + i)).unwrap();
    }
    std::fs::write(src.join("small"), b"small\n").unwrap();
    let built = crate::nydusd::build(&src, &dir.join("img"), &["--compressor", "zstd"]);
    let blob = built.blob_path();
    let id = blob.file_name().unwrap().to_string_lossy().into_owned();
    let reg_dir = dir.join("reg");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let registry = Registry::start_in(&reg_dir, "");
    registry.push_blob("test/p2p", &id, &blob);
    let origin = FaultProxy::start(&registry.addr);
    Image {
        src,
        blob_len: std::fs::metadata(&blob).unwrap().len(),
        blob_hex: id,
        built,
        _registry: registry,
        origin,
    }
}

/// The image, our scheduler and our seed under `dir`.
fn swarm(dir: &Path) -> (Image, Scheduler, OurPeer) {
    let img = image(dir);
    let sched = Scheduler::start(dir, "scheduler", "");
    let seed = OurPeer::start(dir, "seed", std::slice::from_ref(&sched.addr), true);
    (img, sched, seed)
}

/// Our nydusd (`crate::nydusd::Daemon`, named after `work`) mounting `img`, its config
/// and cache in `work`, its registry backend reading through `peer`'s proxy (`ping_url`
/// its `/healthy`, checked every second); `readahead`: the sequential read-ahead window
/// on (the default) or off (a read fetches its own chunks only).
fn nydusd_through(
    img: &Image,
    work: &Path,
    peer: &OurPeer,
    fallback: bool,
    readahead: bool,
) -> Daemon {
    let window = if readahead { 33554432 } else { 0 };
    std::fs::create_dir_all(work.join("cache")).unwrap();
    let cfg = work.join("nydusd.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http",
            "host":"{}","repo":"test/p2p","timeout":30,"retry_limit":1,
            "proxy":{{"url":"{}","ping_url":"{}/healthy","fallback":{fallback},
            "check_interval":1}}}}}},
            "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}},
            "amplify_io":1048576,"readahead_window":{window}}}"#,
            img.origin.addr,
            peer.proxy(),
            peer.proxy(),
            work.join("cache").display()
        ),
    )
    .unwrap();
    let name = work.file_name().unwrap().to_string_lossy();
    Daemon::start_config(&img.built, &name, &cfg)
}

/// A counter of `/api/v1/metrics/backend`.
fn backend_metric(d: &Daemon, name: &str) -> u64 {
    d.metric("/api/v1/metrics/backend", name)
}

fn assert_tree(img: &Image, d: &Daemon, what: &str, peer: &OurPeer) {
    let diffs = compare_trees_with(
        &img.src,
        &d.mnt,
        &CompareOptions {
            ignore_root_mtime: true,
            ..Default::default()
        },
    );
    assert!(
        diffs.is_empty(),
        "{what}: {diffs:?}\nnydusd:\n{}\npeer:\n{}",
        d.log_text(),
        peer.log()
    );
}

/// Two nodes mount one image with our nydusd reading through their own peer (no
/// fallback: a failure of the swarm shows as one). Both trees are right; the origin
/// served about one copy of the blob, and nothing for the second node: its chunks came
/// from the swarm. Every backend read went through the peer.
#[test]
fn two_nodes_read_through_their_peers_and_the_second_costs_the_origin_nothing() {
    let _swarm = require();
    require_root_tools(&["fusermount3"]);
    let t = tempfile::tempdir().unwrap();
    let (img, sched, _seed) = swarm(t.path());
    let list = [sched.addr.clone()];
    let nodes = [
        OurPeer::start(t.path(), "a", &list, false),
        OurPeer::start(t.path(), "b", &list, false),
    ];
    wait_for_hosts(&sched, 3);
    let mut after_a = 0;
    for (i, peer) in nodes.iter().enumerate() {
        let work = t.path().join(format!("node{i}"));
        let d = nydusd_through(&img, &work, peer, false, true);
        assert_tree(&img, &d, &format!("node {i}"), peer);
        let (through, fallbacks) = (
            backend_metric(&d, "proxy_reads"),
            backend_metric(&d, "proxy_fallbacks"),
        );
        assert!(
            through > 0 && fallbacks == 0,
            "node {i}: {through} reads through the peer, {fallbacks} not"
        );
        if i == 0 {
            after_a = img.origin.relayed_bytes();
        }
    }
    // Node b's pieces came from peers while nydusd, which checks each chunk itself,
    // read: the SHA-256 of those fetched while it read waited until it stopped (some
    // are on record unhashed), and the whole blob's digest then verified every one.
    let b = &nodes[1];
    b.wait_task_recorded(&img.blob_hex);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            b.dir
                .join("storage/tasks")
                .join(&img.blob_hex)
                .join("meta.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let pieces = meta["pieces"].as_array().unwrap();
    let unhashed = pieces.iter().filter(|p| p["sha256"] == "").count();
    assert!(
        unhashed > 0 && pieces.iter().all(|p| p["verified"] == true),
        "node b's pieces, {unhashed} of them stored unhashed: {pieces:?}\n{}",
        b.log()
    );
    let served = img.origin.relayed_bytes();
    assert_second_node_free(
        "our nydusd on two nodes through our peers",
        (served, after_a),
        img.blob_len,
        3,
        16 << 10,
        &String::new,
    );
}

/// The node's peer is killed while nydusd reads a file through it (the origin slowed
/// to 4 MB/s, so the swarm has not got that far yet): the read ends right, from the
/// origin; reads go to the origin while the peer is down, and through the peer again
/// once it is back (its health check passes).
#[test]
fn the_peer_killed_mid_read_reads_fall_back_to_the_origin_and_come_back() {
    let _swarm = require();
    require_root_tools(&["fusermount3"]);
    let t = tempfile::tempdir().unwrap();
    let (img, sched, _seed) = swarm(t.path());
    let list = [sched.addr.clone()];
    let mut peer = OurPeer::start(t.path(), "node", &list, false);
    wait_for_hosts(&sched, 2);
    let work = t.path().join("node");
    let d = nydusd_through(&img, &work, &peer, true, false);
    let read = |name: &str| {
        let got = std::fs::read(d.mnt.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log_text()));
        assert!(
            got == std::fs::read(img.src.join(name)).unwrap(),
            "{name}: wrong bytes"
        );
    };
    // The origin at 4 MB/s: the seed has the blob after about 8 s, in piece order.
    img.origin.shape(Duration::ZERO, 4_000_000);
    read("d/f0");
    let through = backend_metric(&d, "proxy_reads");
    assert!(through > 0, "no read went through the peer");
    let mnt = d.mnt.clone();
    let src = img.src.clone();
    let reader = std::thread::spawn(move || {
        let got = std::fs::read(mnt.join("d/f3")).map_err(|e| e.to_string())?;
        Ok::<_, String>(got == std::fs::read(src.join("d/f3")).unwrap())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reader.is_finished(),
        "d/f3 was read before the peer was killed"
    );
    peer.kill();
    let right = reader
        .join()
        .unwrap()
        .expect("the read under way when the peer died");
    assert!(right, "d/f3: wrong bytes after the peer died");
    img.origin.shape(Duration::ZERO, 0);
    read("d/f4");
    let fallbacks = backend_metric(&d, "proxy_fallbacks");
    assert!(
        fallbacks > 0,
        "no read went to the origin with the peer down"
    );
    peer.restart();
    // The health check (every second) sees it back.
    std::thread::sleep(Duration::from_millis(2500));
    let before = backend_metric(&d, "proxy_reads");
    read("d/f5");
    assert!(
        backend_metric(&d, "proxy_reads") > before,
        "reads did not go through the peer once it was back\n{}",
        d.log_text()
    );
    read("small");
}

/// A peer that serves a corrupted piece (changed on disk, its CRC-32 with it) to the
/// node's peer, in a swarm whose seed is a dfdaemon (no SHA-256 of ours to check
/// pieces against before the blob is whole): nydusd, which checks every chunk, reads
/// the bad bytes early, finds them bad, reports the range to its peer (which drops the
/// piece and keeps the sender out) and reads once more. The tree is right, no wrong
/// byte reached a reader, the report was made and taken.
#[test]
fn a_corrupt_piece_is_reported_by_nydusd_and_read_right_after_one_retry() {
    let _swarm = require();
    require_root_tools(&["fusermount3"]);
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let hex = {
        let boot = std::fs::read_dir(t.path().join("img/blobs")).unwrap();
        boot.flatten()
            .next()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .into_owned()
    };
    let url = format!("http://{}/v2/test/p2p/blobs/sha256:{hex}", img.origin.addr);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let mut df_seed = Dfdaemon::start(t.path(), "df-seed", &list, true);
    let mut liar = OurPeer::start(t.path(), "liar", &list, false);
    wait_for_hosts(&sched, 2);
    let got = t.path().join("liar-copy");
    finish_fetch(liar.spawn_fetch(&url, &got, None), "the liar's own copy");
    assert_eq!(sha256_file(&got).unwrap(), hex);
    // Piece 0 changes on disk, CRC and all; the liar serves slowly (4 MiB/s), so that
    // nydusd reads the piece long before the node's peer could check the whole blob.
    liar.wait_task_recorded(&hex);
    liar.kill();
    super::p2p_peer::corrupt_consistently(&liar, &hex, 0, 4 << 20);
    let text = std::fs::read_to_string(liar.config_path()).unwrap();
    std::fs::write(
        liar.config_path(),
        text.replace("upload:\n", "upload:\n  rateLimit: 4MiB\n"),
    )
    .unwrap();
    liar.restart();
    df_seed.kill();
    let node = OurPeer::start(t.path(), "node", &list, false);
    wait_for_hosts(&sched, 3);
    let work = t.path().join("node");
    let d = nydusd_through(&img, &work, &node, false, true);
    assert_tree(&img, &d, "the node", &node);
    let reported = backend_metric(&d, "proxy_reported");
    assert!(
        reported >= 1,
        "nydusd reported no bad range\n{}",
        d.log_text()
    );
    let m = node.metrics();
    assert!(
        metric_value(&m, "peer_piece_failures_total{reason=\"reported\"}") >= 1.0,
        "{m}"
    );
}

/// The access log's blob `GET`s from entry `from` on: (bytes, those of more than one
/// byte).
fn blob_gets_since(reg: &Registry, from: usize) -> (u64, Vec<AccessEntry>) {
    let log = reg.access_log();
    let gets: Vec<AccessEntry> = log[from.min(log.len())..]
        .iter()
        .filter(|e| e.method == "GET" && e.blob().is_some())
        .cloned()
        .collect();
    let bytes = gets.iter().map(|e| e.bytes).sum();
    (bytes, gets.into_iter().filter(|e| e.bytes > 1).collect())
}

/// Through containerd, as a node runs it: on two nodes, the python fixture's nydus image
/// is pulled by CRI and run by our snapshotter, whose nydusd config template (the one
/// setting) points every nydusd at the node's peer, and containerd has the peer as its
/// registry mirror (`hosts.toml`) for the layers it pulls itself. Both print the right
/// answer; the origin's blob bytes after both nodes are at most 1.1 × those after the
/// first alone, and the second node made it serve no blob `GET` beyond 1-byte probes.
#[test]
fn containerd_on_two_nodes_runs_python_through_the_swarm() {
    let _swarm = require();
    crate::snapshotter::tools();
    require_root_tools(&["debootstrap"]);
    let t = tempfile::tempdir().unwrap();
    let reg_dir = t.path().join("reg");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in(&reg_dir, "");
    let python_src = crate::nydusify::push_python(&reg.addr, None);
    let python = format!("{python_src}-nydus");
    let work = t.path().join("convert");
    std::fs::create_dir_all(&work).unwrap();
    crate::nydusify::nydusify_ok(
        &["convert", "--source", &python_src, "--target", &python],
        &work,
    );

    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let mirror = format!("  registryMirror:\n    addr: http://{}\n", reg.addr);
    let _seed = OurPeer::start_with_proxy(t.path(), "seed", &list, true, &mirror);
    let nodes = [
        OurPeer::start_with_proxy(t.path(), "a", &list, false, &mirror),
        OurPeer::start_with_proxy(t.path(), "b", &list, false, &mirror),
    ];
    wait_for_hosts(&sched, 3);
    let start = reg.access_log().len();
    let mut after_a = (0, 0);
    for (i, peer) in nodes.iter().enumerate() {
        let node = t.path().join(format!("node{i}"));
        let template = node.join("nydusd.json");
        std::fs::create_dir_all(&node).unwrap();
        peer.write_nydusd_template(&template, false);
        let hosts = node.join("hosts");
        mirror_hosts(&hosts, &reg.addr, &peer.proxy());
        let snap = NydusSnapshotter::start(
            &node.join("snap"),
            &format!("[daemon]\nnydusd_config = \"{}\"\n", template.display()),
        );
        let ctd = Containerd::start_with_hosts(&node.join("ctd"), &snap.sock, SNAPSHOTTER, &hosts);
        ctd.cri_pull(&python).unwrap_or_else(|e| {
            panic!(
                "node {i}: CRI pull: {e}\n{}\npeer:\n{}",
                snap.log_text(),
                peer.log()
            )
        });
        let out = ctd.run(&python, &format!("py{i}"), &["python3", "-c", "print(6*7)"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "node {i}: {out:?}"
        );
        if i == 0 {
            reg.wait_quiet(Duration::from_secs(60));
            after_a = (blob_gets_since(&reg, start).0, reg.access_log().len());
        }
    }
    reg.wait_quiet(Duration::from_secs(60));
    let (total, _) = blob_gets_since(&reg, start);
    let (_, node_b) = blob_gets_since(&reg, after_a.1);
    eprintln!(
        "origin blob bytes: {} after node A, {total} after both",
        after_a.0
    );
    assert!(
        total * 10 <= after_a.0 * 11,
        "the origin served {total} blob bytes after both nodes, {} after the first",
        after_a.0
    );
    assert!(
        node_b.is_empty(),
        "the second node made the origin serve blob GETs: {node_b:?}"
    );
}
