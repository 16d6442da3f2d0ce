//! Our `p2p-scheduler` judged by real Dragonfly peers: dfdaemons (dragonfly-client
//! 1.5.10), each on its own loopback address, download blobs from docker-registry
//! through their HTTP proxies, a seed peer among them, and the bytes the origin serves
//! are counted by a proxy in front of it. Every copy must have the blob's digest, and
//! the origin must serve about one copy: dfdaemon falls back to the origin whenever
//! scheduling fails, so right bytes alone prove nothing.

use rafs_e2e::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A blob in docker-registry behind a byte-counting proxy.
pub(crate) struct Origin {
    _registry: Registry,
    pub(crate) proxy: FaultProxy,
    pub(crate) hex: String,
    pub(crate) len: u64,
}

impl Origin {
    pub(crate) fn start(dir: &Path, blobs: &[(u64, u64)]) -> (Origin, Vec<String>) {
        let registry = Registry::start();
        let mut urls = Vec::new();
        let mut first = None;
        for (i, (len, seed)) in blobs.iter().enumerate() {
            let data = noise(*len as usize, *seed);
            let path = dir.join(format!("blob{i}"));
            fs::write(&path, &data).unwrap();
            let hex = sha256_file(&path).unwrap();
            registry.push_blob("swarm", &hex, &path);
            fs::remove_file(&path).unwrap();
            urls.push(hex.clone());
            first.get_or_insert((hex, *len));
        }
        let proxy = FaultProxy::start(&registry.addr);
        let urls = urls
            .iter()
            .map(|hex| format!("http://{}/v2/swarm/blobs/sha256:{hex}", proxy.addr))
            .collect();
        let (hex, len) = first.unwrap();
        (
            Origin {
                _registry: registry,
                proxy,
                hex,
                len,
            },
            urls,
        )
    }

    pub(crate) fn url(&self) -> String {
        format!(
            "http://{}/v2/swarm/blobs/sha256:{}",
            self.proxy.addr, self.hex
        )
    }
}

/// What the origin may serve for `copies` full copies of `len` bytes: 5% over, plus the
/// 1-byte probe each download makes and the response heads.
pub(crate) fn origin_bound(len: u64, copies: u64, downloads: u64) -> u64 {
    len * copies * 105 / 100 + downloads * 2048 + 64 * 1024
}

/// Prints what the origin served, in copies of the blobs, for the record.
pub(crate) fn report(what: &str, served: u64, len: u64, copies: u64) {
    eprintln!(
        "{what}: the origin served {served} bytes = {:.3} copies of {copies} blob(s) of {len} bytes",
        served as f64 / (len * copies) as f64
    );
}

/// Two nodes read one after the other: reports what the origin served (`served` in
/// all, `after_a` once the first was done), and asserts it is about one copy of `len`
/// bytes (`downloads` requests) and at most `slack` bytes more for the second node.
pub(crate) fn assert_second_node_free(
    what: &str,
    (served, after_a): (u64, u64),
    len: u64,
    downloads: u64,
    slack: u64,
    context: &dyn Fn() -> String,
) {
    report(what, served, len, 1);
    assert!(
        served <= origin_bound(len, 1, downloads),
        "{what}: the origin served {served} bytes for {len} bytes\n{}",
        context()
    );
    assert!(
        served - after_a <= slack,
        "{what}: the second node cost the origin {} bytes\n{}",
        served - after_a,
        context()
    );
}

pub(crate) fn assert_copy(path: &Path, hex: &str, what: &str) {
    let got = sha256_file(path).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got, hex, "{what}: wrong bytes");
}

/// A body's sha256 (from [`rafs_e2e::dragonfly::HashedFetch`]) against the blob's.
pub(crate) fn assert_hex(got: &str, hex: &str, what: &str) {
    assert_eq!(got, hex, "{what}: wrong bytes");
}

pub(crate) fn wait_for_hosts(s: &Scheduler, n: usize) {
    let ok = wait_until(Duration::from_secs(30), || {
        s.metric("scheduler_hosts") as usize >= n
    });
    assert!(ok, "the scheduler did not see {n} hosts:\n{}", s.metrics());
}

/// Fetches `url` through each dfdaemon at once; waits for all and returns the sha256 of
/// each body (hashed as it arrives, not stored).
fn fetch_all(peers: &[&Dfdaemon], url: &str, tag: &str) -> Vec<String> {
    let fetches: Vec<_> = peers.iter().map(|p| p.spawn_hashed_fetch(url)).collect();
    fetches
        .into_iter()
        .enumerate()
        .map(|(i, f)| f.finish(&format!("{tag}: peer {i} ({})", peers[i].ip)))
        .collect()
}

/// Taken by each swarm test: five or six dfdaemons moving 128 MiB are a heavy load
/// for the machine, so the swarms run one at a time (the other tests go on beside).
static SWARM: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn require() -> std::sync::MutexGuard<'static, ()> {
    require_root_tools(&["docker-registry", "curl"]);
    dfdaemon_bin();
    SWARM.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn a_seed_and_four_dfdaemons_share_a_blob_and_the_origin_serves_one_copy() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(128 << 20, 41)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let seed = Dfdaemon::start(t.path(), "seed", &list, true);
    let peers: Vec<Dfdaemon> = (0..4)
        .map(|i| Dfdaemon::start(t.path(), &format!("peer{i}"), &list, false))
        .collect();
    wait_for_hosts(&sched, 5);

    let refs: Vec<&Dfdaemon> = peers.iter().collect();
    let outs = fetch_all(&refs, &origin.url(), "got");
    for (i, out) in outs.iter().enumerate() {
        assert_hex(out, &origin.hex, &format!("peer {i}"));
    }
    let served = origin.proxy.relayed_bytes();
    report("seed + 4 peers", served, origin.len, 1);
    let metrics = sched.metrics();
    let logs = || format!("scheduler metrics:\n{metrics}\nseed:\n{}", seed.log_tail());
    assert!(
        served <= origin_bound(origin.len, 1, 5),
        "the origin served {served} bytes for a {}-byte blob\n{}",
        origin.len,
        logs()
    );
    // One seed fetched from the origin; the four peers were handed parents.
    assert_eq!(
        metric_value(
            &metrics,
            "scheduler_seed_triggers_total{result=\"started\"}"
        ),
        1.0,
        "{}",
        logs()
    );
    assert!(
        metric_value(&metrics, "scheduler_answers_total{kind=\"normal_task\"}") >= 4.0,
        "{}",
        logs()
    );
    assert_eq!(
        metric_value(&metrics, "scheduler_peers{state=\"Succeeded\"}"),
        5.0,
        "{}",
        logs()
    );
    // The seed reported a digest for each of the 32 pieces (4 MiB) it fetched from the
    // origin; they go out with the parents that hold them.
    assert_eq!(
        metric_value(&metrics, "scheduler_origin_piece_digests"),
        32.0,
        "{}",
        logs()
    );
}

#[test]
fn a_killed_parent_costs_the_origin_nothing_and_after_a_scheduler_restart_only_the_download_in_flight_does(
) {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(128 << 20, 43)]);
    let mut sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let _seed = Dfdaemon::start(t.path(), "seed", &list, true);
    let mut first = Dfdaemon::start(t.path(), "first", &list, false);
    let second = Dfdaemon::start(t.path(), "second", &list, false);
    let third = Dfdaemon::start(t.path(), "third", &list, false);
    let fourth = Dfdaemon::start(t.path(), "fourth", &list, false);
    let fifth = Dfdaemon::start(t.path(), "fifth", &list, false);
    wait_for_hosts(&sched, 6);

    // 1. `first` fetches the blob (through the seed).
    let out = fetch_all(&[&first], &origin.url(), "first");
    assert_hex(&out[0], &origin.hex, "first");

    // 2. `second` and `third` fetch it while `first`, one of their parents, is killed.
    let outs: Vec<PathBuf> = ["second", "third"]
        .iter()
        .map(|n| t.path().join(format!("{n}.out")))
        .collect();
    let fetches = [
        second.spawn_fetch(&origin.url(), &outs[0]),
        third.spawn_fetch(&origin.url(), &outs[1]),
    ];
    std::thread::sleep(Duration::from_millis(300));
    first.kill();
    for (f, n) in fetches.into_iter().zip(["second", "third"]) {
        finish_fetch(f, n);
    }
    for (o, n) in outs.iter().zip(["second", "third"]) {
        assert_copy(o, &origin.hex, n);
    }

    let before_restart = origin.proxy.relayed_bytes();
    report("parent killed", before_restart, origin.len, 1);
    assert!(
        before_restart <= origin_bound(origin.len, 1, 3),
        "the origin served {before_restart} bytes for a {}-byte blob\nscheduler log:\n{}",
        origin.len,
        sched.log()
    );

    // 3. The scheduler is killed in the middle of `fifth`'s download and restarted:
    //    dfdaemon fetches the rest of a download whose scheduler failed from the origin
    //    (its own rule), so `fifth` must end with right bytes, at the cost of at most one
    //    more copy from the origin.
    let out = t.path().join("fifth.out");
    let fetch = fifth.spawn_fetch(&origin.url(), &out);
    std::thread::sleep(Duration::from_millis(200));
    sched.kill();
    sched.restart();
    finish_fetch(fetch, "fifth");
    assert_copy(&out, &origin.hex, "fifth");
    let after_inflight = origin.proxy.relayed_bytes();
    report(
        "a download in flight when the scheduler died",
        after_inflight - before_restart,
        origin.len,
        1,
    );
    assert!(after_inflight <= origin_bound(origin.len, 2, 4));

    // 4. The restarted scheduler knows nothing; the hosts announce themselves again,
    //    and `fourth` starts a download of the same blob: it costs the origin nothing
    //    but the 1-byte probe.
    wait_for_hosts(&sched, 5);
    let out = fetch_all(&[&fourth], &origin.url(), "fourth");
    assert_hex(&out[0], &origin.hex, "fourth");
    let after_restart = origin.proxy.relayed_bytes() - after_inflight;
    report("a download after the restart", after_restart, origin.len, 1);
    assert!(
        after_restart <= 64 * 1024,
        "the origin served {after_restart} bytes for a download after the restart\n\
         scheduler log:\n{}",
        sched.log()
    );
    assert!(
        sched.metric("scheduler_answers_total{kind=\"normal_task\"}") >= 1.0,
        "{}",
        sched.metrics()
    );
}

#[test]
fn three_schedulers_share_the_tasks_and_each_task_meets_on_one() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let blobs: Vec<(u64, u64)> = (0..8).map(|i| (8 << 20, 50 + i)).collect();
    let (origin, urls) = Origin::start(t.path(), &blobs);
    let scheds: Vec<Scheduler> = (0..3)
        .map(|i| Scheduler::start(t.path(), &format!("scheduler{i}"), ""))
        .collect();
    let list: Vec<String> = scheds.iter().map(|s| s.addr.clone()).collect();
    let _seed = Dfdaemon::start(t.path(), "seed", &list, true);
    let peers: Vec<Dfdaemon> = (0..3)
        .map(|i| Dfdaemon::start(t.path(), &format!("peer{i}"), &list, false))
        .collect();
    for s in &scheds {
        wait_for_hosts(s, 4);
    }
    // Each blob by two peers at once.
    let mut fetches = Vec::new();
    for (b, url) in urls.iter().enumerate() {
        for k in 0..2 {
            let p = &peers[(b + k) % peers.len()];
            let out = t.path().join(format!("blob{b}-{k}"));
            fetches.push((p.spawn_fetch(url, &out), out, b));
        }
    }
    let hexes: Vec<String> = urls
        .iter()
        .map(|u| u.rsplit_once("sha256:").unwrap().1.to_string())
        .collect();
    for (f, out, b) in fetches {
        finish_fetch(f, &format!("blob {b}"));
        assert_copy(&out, &hexes[b], &format!("blob {b}"));
    }
    let tasks: Vec<f64> = scheds.iter().map(|s| s.metric("scheduler_tasks")).collect();
    // Every task on exactly one scheduler (a task split over two would count twice),
    // and more than one scheduler used (all eight on one: 3 in 3^8).
    assert_eq!(
        tasks.iter().sum::<f64>(),
        8.0,
        "tasks per scheduler: {tasks:?}"
    );
    assert!(
        tasks.iter().filter(|n| **n > 0.0).count() >= 2,
        "tasks per scheduler: {tasks:?}"
    );
    let served = origin.proxy.relayed_bytes();
    report("three schedulers", served, origin.len, 8);
    assert!(
        served <= origin_bound(origin.len, 8, 16),
        "the origin served {served} bytes for 8 blobs of {} bytes",
        origin.len
    );
}
