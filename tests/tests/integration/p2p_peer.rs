//! Our `p2p-peer` in swarms under our `p2p-scheduler`, with docker-registry as the origin
//! behind a byte-counting proxy, each peer on its own loopback address; real dfdaemons
//! (dragonfly-client 1.5.10) join them as children and parents. Every copy must have
//! the blob's digest and the origin must serve about one copy: a peer falls back to the
//! origin when the swarm fails, so right bytes alone prove nothing.

use super::p2p_scheduler::{
    assert_copy, assert_hex, assert_second_node_free, origin_bound, report, require,
    wait_for_hosts, Origin,
};
use rafs_e2e::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Fetches `url` through each peer's proxy at once; waits for all and returns the
/// sha256 of each body (hashed as it arrives, not stored).
fn fetch_all(peers: &[&OurPeer], url: &str, tag: &str) -> Vec<String> {
    let fetches: Vec<_> = peers.iter().map(|p| p.spawn_hashed_fetch(url)).collect();
    let mut hexes = Vec::new();
    for (i, f) in fetches.into_iter().enumerate() {
        let what = format!("{tag}: peer {i} ({})", peers[i].ip);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.finish(&what))) {
            Ok(hex) => hexes.push(hex),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "curl failed".into());
                panic!("{msg}\nits log:\n{}", peers[i].log());
            }
        }
    }
    hexes
}

/// 1 seed + 8 of our peers read one 256 MiB blob at once: every copy right, the origin
/// serves at most 1.05 copies, and the peers' bytes came from each other.
#[test]
fn a_seed_and_eight_of_our_peers_share_a_blob_and_the_origin_serves_one_copy() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(256 << 20, 43)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let seed = OurPeer::start(t.path(), "seed", &list, true);
    let peers: Vec<OurPeer> = (0..8)
        .map(|i| OurPeer::start(t.path(), &format!("peer{i}"), &list, false))
        .collect();
    wait_for_hosts(&sched, 9);
    let started = std::time::Instant::now();
    let refs: Vec<&OurPeer> = peers.iter().collect();
    let outs = fetch_all(&refs, &origin.url(), "got");
    let took = started.elapsed();
    for (i, out) in outs.iter().enumerate() {
        assert_hex(out, &origin.hex, &format!("peer {i}"));
    }
    let served = origin.proxy.relayed_bytes();
    report("our seed + 8 of our peers", served, origin.len, 1);
    eprintln!("all 8 had the blob after {took:?}");
    let logs = || {
        format!(
            "scheduler:\n{}\nseed:\n{}\npeer0:\n{}",
            sched.metrics(),
            seed.log(),
            peers[0].log()
        )
    };
    assert!(
        served <= origin_bound(origin.len, 1, 9),
        "the origin served {served} bytes for a {}-byte blob\n{}",
        origin.len,
        logs()
    );
    let from_peers: f64 = peers
        .iter()
        .map(|p| metric_value(&p.metrics(), "peer_from_peers_bytes_total"))
        .sum();
    assert_eq!(
        from_peers as u64,
        8 * origin.len,
        "the peers' bytes did not all come from other peers\n{}",
        logs()
    );
    assert!(
        metric_value(&seed.metrics(), "peer_served_bytes_total") > 0.0,
        "the seed served nothing\n{}",
        logs()
    );
}

/// Mixed swarms: real dfdaemons as children of our seed (they fetch our pieces over
/// Vortex after `SyncPieces`), and our peers as children of a dfdaemon seed. Every copy
/// right, the origin serving about one copy per blob.
#[test]
fn dfdaemons_and_our_peers_are_each_others_parents() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, urls) = Origin::start(t.path(), &[(64 << 20, 51), (64 << 20, 52)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];

    // Our seed, dfdaemon children.
    let our_seed = OurPeer::start(t.path(), "our-seed", &list, true);
    let dfs: Vec<Dfdaemon> = (0..2)
        .map(|i| Dfdaemon::start(t.path(), &format!("df{i}"), &list, false))
        .collect();
    wait_for_hosts(&sched, 3);
    let outs: Vec<PathBuf> = (0..dfs.len())
        .map(|i| t.path().join(format!("df-got-{i}")))
        .collect();
    let fetches: Vec<_> = dfs
        .iter()
        .zip(&outs)
        .map(|(d, out)| d.spawn_fetch(&urls[0], out))
        .collect();
    for (i, f) in fetches.into_iter().enumerate() {
        finish_fetch(f, &format!("dfdaemon {i}\n{}", dfs[i].log_tail()));
    }
    for (i, out) in outs.iter().enumerate() {
        assert_copy(out, &origin.hex, &format!("dfdaemon {i}"));
    }
    let served_first = origin.proxy.relayed_bytes();
    report("our seed + 2 dfdaemons", served_first, origin.len, 1);
    assert!(
        served_first <= origin_bound(origin.len, 1, 3),
        "the origin served {served_first} bytes for our seed and 2 dfdaemons\nseed:\n{}\n{}",
        our_seed.log(),
        dfs[0].log_tail()
    );
    // Counted once each piece is written out: a moment after the last one arrived.
    let served = || metric_value(&our_seed.metrics(), "peer_served_bytes_total");
    wait_until(std::time::Duration::from_secs(5), || {
        served() >= origin.len as f64
    });
    let served_by_ours = served();
    assert!(
        served_by_ours >= origin.len as f64,
        "the dfdaemons took {served_by_ours} bytes from our seed (of 2 x {})",
        origin.len
    );

    // A dfdaemon seed, our children (the second blob, which no peer has), under a
    // scheduler of their own (the first one would trigger our seed as well).
    drop(our_seed);
    let sched2 = Scheduler::start(t.path(), "scheduler2", "");
    let list2 = [sched2.addr.clone()];
    let df_seed = Dfdaemon::start(t.path(), "df-seed", &list2, true);
    let ours: Vec<OurPeer> = (0..2)
        .map(|i| OurPeer::start(t.path(), &format!("ours{i}"), &list2, false))
        .collect();
    wait_for_hosts(&sched2, 3);
    let refs: Vec<&OurPeer> = ours.iter().collect();
    let got = fetch_all(&refs, &urls[1], "ours-got");
    let hex1 = urls[1].rsplit("sha256:").next().unwrap().to_string();
    for (i, out) in got.iter().enumerate() {
        assert_hex(out, &hex1, &format!("our peer {i}"));
    }
    let served_second = origin.proxy.relayed_bytes() - served_first;
    report(
        "a dfdaemon seed + 2 of our peers",
        served_second,
        origin.len,
        1,
    );
    assert!(
        served_second <= origin_bound(origin.len, 1, 3),
        "the origin served {served_second} bytes for a dfdaemon seed and 2 of ours\n{}\n{}",
        df_seed.log_tail(),
        ours[0].log()
    );
    let from_peers: f64 = ours
        .iter()
        .map(|p| metric_value(&p.metrics(), "peer_from_peers_bytes_total"))
        .sum();
    assert_eq!(
        from_peers as u64,
        2 * origin.len,
        "{}\n{}\n{}\n{}",
        ours[0].log(),
        ours[1].log(),
        ours[0].metrics(),
        ours[1].metrics()
    );
}

/// Three schedulers and a mixed swarm (a dfdaemon seed, two dfdaemons, two of our
/// peers): each blob is read at once by a dfdaemon and one of ours, and every task is
/// on exactly one scheduler (our peers pick it with dfdaemon's hash ring), with the
/// origin serving about one copy of each.
#[test]
fn three_schedulers_and_a_mixed_swarm_meet_on_one_scheduler_per_task() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let blobs: Vec<(u64, u64)> = (0..8).map(|i| (8 << 20, 70 + i)).collect();
    let (origin, urls) = Origin::start(t.path(), &blobs);
    let scheds: Vec<Scheduler> = (0..3)
        .map(|i| Scheduler::start(t.path(), &format!("scheduler{i}"), ""))
        .collect();
    let list: Vec<String> = scheds.iter().map(|s| s.addr.clone()).collect();
    let _seed = Dfdaemon::start(t.path(), "seed", &list, true);
    let dfs: Vec<Dfdaemon> = (0..2)
        .map(|i| Dfdaemon::start(t.path(), &format!("df{i}"), &list, false))
        .collect();
    let ours: Vec<OurPeer> = (0..2)
        .map(|i| OurPeer::start(t.path(), &format!("ours{i}"), &list, false))
        .collect();
    for s in &scheds {
        wait_for_hosts(s, 5);
    }
    let hexes: Vec<String> = urls
        .iter()
        .map(|u| u.rsplit_once("sha256:").unwrap().1.to_string())
        .collect();
    let mut fetches = Vec::new();
    for (b, url) in urls.iter().enumerate() {
        let df_out = t.path().join(format!("blob{b}-df"));
        fetches.push((dfs[b % 2].spawn_fetch(url, &df_out), df_out, b));
        let our_out = t.path().join(format!("blob{b}-ours"));
        fetches.push((ours[b % 2].spawn_fetch(url, &our_out, None), our_out, b));
    }
    for (f, out, b) in fetches {
        finish_fetch(f, &format!("blob {b}\n{}", ours[b % 2].log()));
        assert_copy(&out, &hexes[b], &format!("blob {b}"));
    }
    let tasks: Vec<f64> = scheds.iter().map(|s| s.metric("scheduler_tasks")).collect();
    assert_eq!(
        tasks.iter().sum::<f64>(),
        8.0,
        "tasks per scheduler (a task split between schedulers counts twice): {tasks:?}"
    );
    assert!(
        tasks.iter().filter(|n| **n > 0.0).count() >= 2,
        "tasks per scheduler: {tasks:?}"
    );
    let served = origin.proxy.relayed_bytes();
    report("three schedulers, a mixed swarm", served, origin.len, 8);
    assert!(
        served <= origin_bound(origin.len, 8, 24),
        "the origin served {served} bytes for 8 blobs of {} bytes",
        origin.len
    );
}

/// Rewrites piece `number` (of `piece_len` bytes) of task `hex` in `peer`'s storage with
/// other bytes, and its recorded CRC-32 to match them: the peer then serves a bad piece
/// that passes Dragonfly's own check.
pub(crate) fn corrupt_consistently(peer: &OurPeer, hex: &str, number: u64, piece_len: u64) {
    use std::os::unix::fs::FileExt;
    let dir = peer.dir.join("storage/tasks").join(hex);
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("data"))
        .unwrap();
    let mut piece = vec![0u8; piece_len as usize];
    data.read_exact_at(&mut piece, number * piece_len).unwrap();
    for b in piece.iter_mut().step_by(4096) {
        *b ^= 0x5a;
    }
    data.write_all_at(&piece, number * piece_len).unwrap();
    let meta_path = dir.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    let crc = crc32fast::hash(&piece);
    for p in meta["pieces"].as_array_mut().unwrap() {
        if p["number"] == number {
            p["crc32"] = crc.into();
        }
    }
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
}

/// A parent whose stored piece was changed on disk, its CRC-32 with it (so it passes
/// Dragonfly's check): the child checks the piece against the SHA-256 our seed recorded
/// from the origin, refuses it, reports the parent to the scheduler and fetches the
/// rest elsewhere (here the origin: the seed is gone). No bad byte is stored; the bad
/// parent is not asked again. Bad reports of bad ranges are refused by name.
#[test]
fn a_parent_that_lies_consistently_is_caught_and_excluded() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(32 << 20, 61)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let mut seed = OurPeer::start(t.path(), "seed", &list, true);
    let mut liar = OurPeer::start(t.path(), "liar", &list, false);
    wait_for_hosts(&sched, 2);
    let got = fetch_all(&[&liar], &origin.url(), "liar");
    assert_hex(&got[0], &origin.hex, "the liar's own copy");
    // The liar's piece 1 changes on disk, CRC and all; it serves it after a restart.
    liar.wait_task_recorded(&origin.hex);
    liar.kill();
    corrupt_consistently(&liar, &origin.hex, 1, 4 << 20);
    liar.restart();
    seed.kill();
    // The dead seed is still a candidate parent for a while (the scheduler drops a
    // silent host after 10 s at least); the child finds it cannot say what it has.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let child = OurPeer::start(t.path(), "child", &list, false);
    wait_for_hosts(&sched, 3);
    let got = fetch_all(&[&child], &origin.url(), "child");
    assert_hex(&got[0], &origin.hex, "the child's copy");
    let m = child.metrics();
    assert!(
        metric_value(&m, "peer_piece_failures_total{reason=\"digest\"}") >= 1.0,
        "the child never refused a piece:\n{m}\n{}",
        child.log()
    );
    // Nothing of the liar's piece 1 was kept: the child's piece 1 came from the origin
    // (as its record on disk says, once the download has ended).
    child.wait_task_recorded(&origin.hex);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            child
                .dir
                .join("storage/tasks")
                .join(&origin.hex)
                .join("meta.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let piece1 = meta["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["number"] == 1)
        .unwrap();
    assert!(
        piece1["parent"].is_null(),
        "piece 1 came from {}",
        piece1["parent"]
    );
    assert!(
        sched.metric("scheduler_child_failures_total{kind=\"piece\"}") >= 1.0,
        "the scheduler never heard of the bad parent:\n{}",
        sched.metrics()
    );
    let served = origin.proxy.relayed_bytes();
    report("a lying parent", served, origin.len, 2);
    assert!(
        served <= origin_bound(origin.len, 2, 4),
        "the origin served {served} bytes"
    );

    // Bad reports: a verified piece, an unknown task, a broken body.
    let post = |body: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "--data",
            ])
            .arg(body)
            .arg(format!("{}/api/v1/bad-range", child.proxy()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = origin.url();
    assert_eq!(
        post(&format!(r#"{{"url":"{url}","offset":0,"length":10}}"#)),
        "409"
    );
    assert_eq!(
        post(r#"{"url":"http://x/v2/r/blobs/sha256:00","offset":0,"length":1}"#),
        "404"
    );
    assert_eq!(
        post(&format!(r#"{{"url":"{url}","offset":0,"length":0}}"#)),
        "416"
    );
    assert_eq!(post("{not json"), "400");
}

/// Faults in one swarm of ours: one of two seeds is dead before the downloads start; a
/// parent is killed while the others fetch from it; the scheduler is killed and
/// started again while they run. Every surviving peer ends with the right bytes, and
/// the origin still serves about one copy.
#[test]
fn a_dead_seed_a_killed_parent_and_a_restarted_scheduler_cost_the_origin_nothing_more() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(128 << 20, 81)]);
    let mut sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let a = OurPeer::start(t.path(), "seed0", &list, true);
    let b = OurPeer::start(t.path(), "seed1", &list, true);
    // The scheduler tries seeds in the order of their host ids (ip first): the one it
    // would try first dies.
    let (mut dead_seed, seed) = if format!("{}-", a.ip) < format!("{}-", b.ip) {
        (a, b)
    } else {
        (b, a)
    };
    let mut victim = OurPeer::start(t.path(), "victim", &list, false);
    let peers: Vec<OurPeer> = (0..3)
        .map(|i| OurPeer::start(t.path(), &format!("peer{i}"), &list, false))
        .collect();
    wait_for_hosts(&sched, 6);
    // Killed a moment before the downloads: the scheduler still counts it alive (a host
    // is dropped once silent for 10 s at least), so it is triggered and fails.
    dead_seed.kill();
    std::thread::sleep(std::time::Duration::from_secs(1));
    // The origin at 64 MB/s: the downloads take a few seconds.
    origin.proxy.shape(std::time::Duration::ZERO, 64_000_000);
    let _victim_fetch = victim.spawn_fetch(&origin.url(), &t.path().join("victim-got"), None);
    let outs: Vec<PathBuf> = (0..peers.len())
        .map(|i| t.path().join(format!("got-{i}")))
        .collect();
    let fetches: Vec<_> = peers
        .iter()
        .zip(&outs)
        .map(|(p, out)| p.spawn_fetch(&origin.url(), out, None))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    victim.kill();
    sched.kill();
    std::thread::sleep(std::time::Duration::from_millis(500));
    sched.restart();
    for (i, f) in fetches.into_iter().enumerate() {
        let what = format!("peer {i}");
        if let Err(e) = std::panic::catch_unwind(|| finish_fetch(f, &what)) {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("{msg}\n{}\nseed:\n{}", peers[i].log(), seed.log());
        }
    }
    for (i, out) in outs.iter().enumerate() {
        assert_copy(out, &origin.hex, &format!("peer {i}"));
    }
    let dead_id = format!("triggering a seed peer: host {}-", dead_seed.ip);
    assert!(
        sched.log().contains(&dead_id),
        "the dead seed was never tried:\n{}",
        sched.log()
    );
    let served = origin.proxy.relayed_bytes();
    report(
        "a dead seed, a killed parent, a restarted scheduler",
        served,
        origin.len,
        1,
    );
    assert!(
        served <= origin_bound(origin.len, 1, 6),
        "the origin served {served} bytes for a {}-byte blob\nscheduler:\n{}\nseed:\n{}\npeer0:\n{}",
        origin.len,
        sched.log(),
        seed.log(),
        peers[0].log()
    );
}

/// A private registry (docker-registry behind the token server): the seed fetches with
/// its own credentials (`backToSource.dockerConfig`, a bearer token negotiated from
/// them), the peers' clients bring none, and every copy is right with the origin
/// serving one copy.
#[test]
fn seeds_fetch_from_a_private_registry_with_their_own_credentials() {
    let _swarm = require();
    require_root_tools(&["openssl"]);
    let t = tempfile::tempdir().unwrap();
    let blob = t.path().join("blob");
    std::fs::write(&blob, noise(24 << 20, 91)).unwrap();
    let hex = sha256_file(&blob).unwrap();
    let rdir = t.path().join("registry");
    std::fs::create_dir_all(&rdir).unwrap();
    {
        let open = Registry::start_in(&rdir, "");
        open.push_blob("private", &hex, &blob);
    }
    let tokens = TokenServer::start(&t.path().join("token"), "tester", "s3cret", &["private"]);
    let reg = Registry::start_in(&rdir, &tokens.registry_config());
    let origin = FaultProxy::start(&reg.addr);
    let url = format!("http://{}/v2/private/blobs/sha256:{hex}", origin.addr);
    let anonymous = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&anonymous.stdout), "401");
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode("tester:s3cret")
    };
    let docker = t.path().join("docker.json");
    std::fs::write(
        &docker,
        serde_json::json!({"auths": {origin.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let seed = OurPeer::start_with(
        t.path(),
        "seed",
        &list,
        true,
        &format!("backToSource:\n  dockerConfig: {}\n", docker.display()),
    );
    let peers: Vec<OurPeer> = (0..2)
        .map(|i| OurPeer::start(t.path(), &format!("peer{i}"), &list, false))
        .collect();
    wait_for_hosts(&sched, 3);
    let issued = tokens.issued();
    let refs: Vec<&OurPeer> = peers.iter().collect();
    let got = fetch_all(&refs, &url, "got");
    for (i, out) in got.iter().enumerate() {
        assert_hex(out, &hex, &format!("peer {i}"));
    }
    assert!(
        tokens.issued() > issued,
        "the seed never asked for a token:\n{}",
        seed.log()
    );
    let served = origin.relayed_bytes();
    report("a private registry", served, 24 << 20, 1);
    assert!(
        served <= origin_bound(24 << 20, 1, 3),
        "the origin served {served} bytes\n{}",
        seed.log()
    );
}

/// `upload.rateLimit` bounds what a peer serves to others: a child fetching 48 MiB from
/// a seed limited to 16 MiB/s (with a one-second burst) takes at least two seconds; the
/// seed's metrics show its resident memory.
#[test]
fn an_upload_rate_limit_bounds_what_a_peer_serves() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(48 << 20, 95)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let mut seed = OurPeer::start(t.path(), "seed", &list, true);
    seed.kill();
    let text = std::fs::read_to_string(seed.config_path()).unwrap();
    std::fs::write(
        seed.config_path(),
        text.replace("upload:\n", "upload:\n  rateLimit: 16MiB\n"),
    )
    .unwrap();
    seed.restart();
    let child = OurPeer::start(t.path(), "child", &list, false);
    wait_for_hosts(&sched, 2);
    let started = std::time::Instant::now();
    let got = fetch_all(&[&child], &origin.url(), "child");
    let took = started.elapsed();
    assert_hex(&got[0], &origin.hex, "the child's copy");
    let rate = (48 << 20) as f64 / took.as_secs_f64() / (1 << 20) as f64;
    eprintln!("48 MiB from a seed limited to 16 MiB/s: {took:?} ({rate:.1} MiB/s)");
    assert!(
        took >= std::time::Duration::from_millis(1900),
        "48 MiB came through a 16 MiB/s limit in {took:?}\n{}",
        seed.log()
    );
    // Counted once each piece is written out: a moment after the child has it.
    let all_served = wait_until(std::time::Duration::from_secs(5), || {
        metric_value(&seed.metrics(), "peer_served_bytes_total") == (48 << 20) as f64
    });
    let m = seed.metrics();
    assert!(all_served, "{m}");
    assert!(metric_value(&m, "peer_rss_bytes") > 1e6, "{m}");
}

/// A client that checks chunks itself (`X-P2P-Verifies-Chunks: true`) reads pieces our
/// peer has from a dfdaemon seed before the blob can be verified whole; a client that
/// does not waits for the whole blob. The verifying client's report of a bad range
/// (`POST /api/v1/bad-range`) drops the piece, keeps its sender out and fetches it again
/// elsewhere (here the origin): the copy ends right.
#[test]
fn a_client_that_verifies_reads_early_and_its_report_of_a_bad_range_is_acted_on() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(64 << 20, 97)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let _df_seed = Dfdaemon::start(t.path(), "df-seed", &list, true);
    let ours = OurPeer::start(t.path(), "ours", &list, false);
    wait_for_hosts(&sched, 2);
    // The origin at 8 MB/s: the seed (and so our peer) takes about 8 s for the blob.
    origin.proxy.shape(std::time::Duration::ZERO, 8_000_000);
    let range = |verifies: bool, out: &std::path::Path| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--fail", "--max-time", "120", "-x"])
            .arg(ours.proxy())
            .args(["-H", "Range: bytes=0-1048575", "-o"])
            .arg(out);
        if verifies {
            cmd.args(["-H", "X-P2P-Verifies-Chunks: true"]);
        }
        cmd.arg(origin.url());
        cmd
    };
    let started = std::time::Instant::now();
    let mut waiting = ChildGuard::spawn(&mut range(false, &t.path().join("plain"))).unwrap();
    let early = range(true, &t.path().join("early")).output().unwrap();
    let early_took = started.elapsed();
    assert!(early.status.success(), "{early:?}\n{}", ours.log());
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the client that does not verify was answered before the blob was verified"
    );
    eprintln!("a verifying client had its first MiB after {early_took:?}");
    let expected = noise(64 << 20, 97);
    assert_eq!(
        std::fs::read(t.path().join("early")).unwrap(),
        &expected[..1 << 20]
    );
    // Reported bad (as nydusd would on a chunk digest mismatch): piece 0 is dropped and
    // fetched again without the seed.
    let report = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "--data",
        ])
        .arg(format!(
            r#"{{"url":"{}","offset":0,"length":4096}}"#,
            origin.url()
        ))
        .arg(format!("{}/api/v1/bad-range", ours.proxy()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&report.stdout),
        "204",
        "{}",
        ours.log()
    );
    let ok = wait_until(std::time::Duration::from_secs(60), || {
        waiting.try_wait().unwrap().is_some()
    });
    assert!(ok, "the plain client was never answered\n{}", ours.log());
    assert!(waiting.try_wait().unwrap().unwrap().success());
    assert_eq!(
        std::fs::read(t.path().join("plain")).unwrap(),
        &expected[..1 << 20]
    );
    let m = ours.metrics();
    assert!(
        metric_value(&m, "peer_piece_failures_total{reason=\"reported\"}") >= 1.0,
        "{m}"
    );
    let whole = fetch_all(&[&ours], &origin.url(), "whole");
    assert_hex(&whole[0], &origin.hex, "the whole copy after the report");
}

/// A read a client waits on is not queued behind a prefetch. A prefetch read
/// (`X-Dragonfly-Priority: 3`, as nydusd's prefetch) of a 96 MiB blob starts its fetch
/// from an origin limited to 16 MiB/s, 4 MiB pieces in order; a read of 64 KiB in
/// piece 15 (no priority: on-demand) then comes in. Its piece goes ahead of the ones
/// before it, so it is answered in well under half the time the prefetch still needs
/// (in order, it would come two thirds of the way through); both copies are right.
#[test]
fn a_read_a_client_waits_on_goes_ahead_of_a_prefetch() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(96 << 20, 53)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let peer = OurPeer::start(t.path(), "peer", std::slice::from_ref(&sched.addr), false);
    wait_for_hosts(&sched, 1);
    origin.proxy.shape(Duration::ZERO, 16 << 20);
    let url = origin.url();
    let (whole, tail) = (t.path().join("whole"), t.path().join("tail"));
    let started = Instant::now();
    let prefetch = peer.spawn_fetch_with(&url, &whole, &["X-Dragonfly-Priority: 3".into()]);
    assert!(
        wait_until(Duration::from_secs(30), || origin.proxy.relayed_bytes()
            > 4 << 20),
        "the prefetch did not start:\n{}",
        peer.log()
    );
    let asked = Instant::now();
    // 64 KiB in piece 15 of 24: the 16th in order.
    let at = 15 * (4 << 20) + 4096;
    let range = format!("Range: bytes={at}-{}", at + 65535);
    finish_fetch(
        peer.spawn_fetch_with(&url, &tail, &[range]),
        "the on-demand read",
    );
    let urgent = asked.elapsed();
    finish_fetch(prefetch, "the prefetch");
    let left = started.elapsed() - (asked - started);
    eprintln!("the on-demand read took {urgent:?}; the prefetch needed {left:?} more when it came");
    assert_copy(&whole, &origin.hex, "the prefetch");
    let data = std::fs::read(&whole).unwrap();
    assert_eq!(
        std::fs::read(&tail).unwrap(),
        &data[at..at + 65536],
        "the on-demand read's bytes"
    );
    assert!(
        urgent < left / 2,
        "the on-demand read took {urgent:?}, queued behind the prefetch ({left:?} left)\n{}",
        peer.log()
    );
    let served = origin.proxy.relayed_bytes();
    assert!(
        served <= origin_bound(origin.len, 1, 2),
        "the origin served {served} bytes for one {}-byte blob",
        origin.len
    );
}

/// A read a child waits on is not queued behind its seed's download from the origin. A
/// 96 MiB blob comes from an origin limited to 16 MiB/s, 4 MiB pieces, our seed fetching
/// them in order; the child's client reads 64 KiB in piece 20 of 24. The child asks the
/// seed for that piece before the seed offers it, and the seed fetches it next: the read
/// is answered in under half the time the whole blob takes (in order, it would come at
/// five sixths of it); both copies are right and the origin served one copy.
#[test]
fn a_piece_a_child_waits_on_is_fetched_by_the_seed_ahead_of_its_order() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(96 << 20, 57)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let _seed = OurPeer::start(t.path(), "seed", &list, true);
    let child = OurPeer::start(t.path(), "child", &list, false);
    wait_for_hosts(&sched, 2);
    origin.proxy.shape(Duration::ZERO, 16 << 20);
    let url = origin.url();
    let tail = t.path().join("tail");
    let at = 20 * (4 << 20) + 8192;
    let started = Instant::now();
    finish_fetch(
        child.spawn_fetch(&url, &tail, Some(&format!("bytes={at}-{}", at + 65535))),
        "the on-demand read",
    );
    let urgent = started.elapsed();
    let whole = fetch_all(&[&child], &url, "whole");
    let all = started.elapsed();
    eprintln!("the read in piece 20 took {urgent:?}, the whole blob {all:?}");
    assert_hex(&whole[0], &origin.hex, "the whole copy");
    let blob = origin.proxy.relayed_bytes();
    assert!(
        blob <= origin_bound(origin.len, 1, 2),
        "the origin served {blob} bytes for one {}-byte blob",
        origin.len
    );
    let expect = &noise(96 << 20, 57)[at..at + 65536];
    assert!(
        std::fs::read(&tail).unwrap() == expect,
        "the on-demand read's bytes are wrong"
    );
    assert!(
        urgent < all / 2,
        "the read in piece 20 took {urgent:?} of the blob's {all:?}: queued behind the \
         seed's download in order\n{}",
        child.log()
    );
    assert!(
        child
            .log()
            .contains("piece 20, which a reader waits on, asked of seed"),
        "the child did not ask the seed ahead:\n{}",
        child.log()
    );
}

/// Upstream nydusd 2.2 reads an image through our peers with its `proxy` section, as
/// Dragonfly users configure it (`url`: the node's peer's proxy; `ping_url`: its
/// `/healthy`; no fallback, so that a failure of ours shows as one). Node A's nydusd
/// reads the whole tree through peer A (our seed fetching from the origin), then node
/// B's through peer B. Both trees are right; the origin served about one copy of the
/// blob, and nothing but probes for node B, whose peer had every byte from the swarm.
#[test]
fn upstream_nydusd_reads_an_image_through_our_peers() {
    let _swarm = require();
    require_root_tools(&["fusermount3"]);
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("d/f{i}")), noise(5_000_000, 200 + i)).unwrap();
    }
    std::fs::write(src.join("small"), b"small\n").unwrap();
    let img = build_image(&src, &t.path().join("img"), &["--compressor", "zstd"]);
    let blobs: Vec<_> = std::fs::read_dir(&img.blobs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(blobs.len(), 1, "one blob: {blobs:?}");
    let id = blobs[0].file_name().unwrap().to_string_lossy().into_owned();
    let blob_len = std::fs::metadata(&blobs[0]).unwrap().len();
    let reg_dir = t.path().join("reg");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in(&reg_dir, "");
    reg.push_blob("test/p2p", &id, &blobs[0]);
    let origin = FaultProxy::start(&reg.addr);

    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let _seed = OurPeer::start(t.path(), "seed", &list, true);
    let nodes = [
        OurPeer::start(t.path(), "a", &list, false),
        OurPeer::start(t.path(), "b", &list, false),
    ];
    wait_for_hosts(&sched, 3);
    let mut after_a = 0;
    for (i, peer) in nodes.iter().enumerate() {
        let work = t.path().join(format!("node{i}"));
        std::fs::create_dir_all(work.join("cache")).unwrap();
        let cfg = work.join("nydusd.json");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http",
                "host":"{}","repo":"test/p2p","timeout":30,"retry_limit":1,
                "proxy":{{"url":"{}","ping_url":"{}/healthy","fallback":false,
                "check_interval":1}}}}}},
                "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}},
                "mode":"direct","digest_validate":false,"enable_xattr":true,
                "amplify_io":1048576}}"#,
                origin.addr,
                peer.proxy(),
                peer.proxy(),
                work.join("cache").display()
            ),
        )
        .unwrap();
        let d = start_upstream_nydusd(&img.boot, &cfg, &work.join("mnt"), &work.join("log"));
        let same = CompareOptions {
            ignore_root_mtime: true,
            ..Default::default()
        };
        let diffs = compare_trees_with(&src, &d.mnt, &same);
        assert!(
            diffs.is_empty(),
            "upstream nydusd on node {i}: {diffs:?}\nnydusd:\n{}\npeer:\n{}",
            std::fs::read_to_string(work.join("log")).unwrap_or_default(),
            peer.log()
        );
        if i == 0 {
            after_a = origin.relayed_bytes();
        }
    }
    let served = origin.relayed_bytes();
    assert_second_node_free(
        "upstream nydusd on two nodes through our peers",
        (served, after_a),
        blob_len,
        3,
        16 << 10,
        &String::new,
    );
    let from_peers = metric_value(&nodes[1].metrics(), "peer_from_peers_bytes_total");
    assert_eq!(
        from_peers as u64, blob_len,
        "peer B's bytes did not all come from the swarm"
    );
}

/// containerd 1.6 on two nodes, each with our peer as its registry mirror (a
/// `hosts.toml` naming the peer's proxy, as nodes configure dfdaemon; the peers'
/// `proxy.registryMirror.addr` names the registry), pulls an OCI image through CRI into
/// containerd's own overlayfs (every layer downloaded, its digest checked) and runs it:
/// the container reads a 24 MiB file of the image right. The layers came through the
/// swarm: the origin served about one copy of them, and node B's peer had its bytes
/// from other peers (containerd would have gone to the registry itself had the mirror
/// failed: the origin's count shows that).
#[test]
fn containerd_pulls_through_our_peers_as_its_registry_mirror() {
    let _swarm = require();
    crate::snapshotter::tools();
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("oci");
    crate::nydusify::make_busybox(&layout, "v1");
    let big = noise(24 << 20, 61);
    crate::nydusify::add_layer(&layout, "v1", &[("data/big", &big, 0o644)], t.path());
    let reg_dir = t.path().join("reg");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in(&reg_dir, "");
    run_ok(std::process::Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/mirrored/busybox:v1", reg.addr),
    ]));
    let origin = FaultProxy::start(&reg.addr);
    let image = format!("{}/mirrored/busybox:v1", origin.addr);
    let layers: u64 = {
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let m = idx["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .replace(':', "/");
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs").join(m)).unwrap()).unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum()
    };

    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let mirror = format!("  registryMirror:\n    addr: http://{}\n", origin.addr);
    let _seed = OurPeer::start_with_proxy(t.path(), "seed", &list, true, &mirror);
    let nodes = [
        OurPeer::start_with_proxy(t.path(), "a", &list, false, &mirror),
        OurPeer::start_with_proxy(t.path(), "b", &list, false, &mirror),
    ];
    wait_for_hosts(&sched, 3);
    let want = hex::encode(sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &big,
    )));
    let mut after_a = 0;
    for (i, peer) in nodes.iter().enumerate() {
        let node = t.path().join(format!("node{i}"));
        let hosts = node.join("hosts");
        mirror_hosts(&hosts, &origin.addr, &peer.proxy());
        let c = Containerd::start_with_hosts(
            &node.join("containerd"),
            &node.join("no-snapshotter.sock"),
            "overlayfs",
            &hosts,
        );
        c.cri_pull(&image)
            .unwrap_or_else(|e| panic!("node {i}: pull: {e}\npeer:\n{}", peer.log()));
        let out = c.run_with(
            "overlayfs",
            &image,
            &format!("mirror-{i}"),
            &["/bin/busybox", "sha256sum", "/data/big"],
        );
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.starts_with(&want), "node {i}: the container read {out}");
        if i == 0 {
            after_a = origin.relayed_bytes();
        }
    }
    let served = origin.relayed_bytes();
    let context = || {
        format!(
            "peer a:\n{}\ncontainerd a:\n{}",
            nodes[0].log(),
            std::fs::read_to_string(t.path().join("node0/containerd/containerd.log"))
                .unwrap_or_default()
        )
    };
    assert_second_node_free(
        "containerd on two nodes through our peers",
        (served, after_a),
        layers,
        6,
        64 << 10,
        &context,
    );
    let from_peers = metric_value(&nodes[1].metrics(), "peer_from_peers_bytes_total") as u64;
    assert!(
        from_peers >= 24 << 20,
        "node B's peer had {from_peers} bytes from other peers"
    );
}

/// Reads one Vortex packet (within 5 s); `None` when the peer closed the connection.
async fn vortex_packet(s: &mut tokio::net::TcpStream) -> Option<vortex_protocol::Vortex> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut head = [0u8; vortex_protocol::HEADER_SIZE];
        s.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize;
        let mut buf = head.to_vec();
        buf.resize(head.len() + len, 0);
        s.read_exact(&mut buf[head.len()..]).await.ok()?;
        Some(vortex_protocol::Vortex::decode(&buf).expect("a Vortex packet"))
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer (or a close) within 5 s")
}

/// Bad input to a running peer gets a clear answer at once, and the peer serves on:
/// over Vortex, an unknown task and a piece out of range are `NotFound` (the connection
/// kept, a good request on it served right), a packet of an unknown kind and one that
/// claims 4 GiB are answered or cut off, never waited on; over gRPC an unknown task is
/// `NOT_FOUND`; through the proxy a request naming no registry is `400`, a range past
/// the end `416` with the length, a request outside `proxy.rules` goes to the origin as
/// it came (no task), and `CONNECT` tunnels. A peer whose only scheduler cannot be
/// reached from the start serves a client from the origin within seconds, not after
/// its download's retries.
#[test]
fn bad_input_gets_clear_answers_and_the_peer_serves_on() {
    use tokio::io::AsyncWriteExt;
    use vortex_protocol::{tlv::download_piece::DownloadPiece, tlv::error::Code, Message, Vortex};
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(8 << 20, 59)]);
    let data = noise(8 << 20, 59);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let _seed = OurPeer::start(t.path(), "seed", &list, true);
    let peer = OurPeer::start(t.path(), "peer", &list, false);
    wait_for_hosts(&sched, 2);
    let url = origin.url();
    let got = t.path().join("got");
    finish_fetch(peer.spawn_fetch(&url, &got, None), "the first fetch");
    assert_copy(&got, &origin.hex, "the first fetch");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let vortex = format!("{}:4005", peer.ip);
    let hex = origin.hex.clone();
    rt.block_on(async {
        let request = |task: &str, n: u32| {
            let mut buf = bytes::BytesMut::new();
            DownloadPiece::new(task.to_string(), n).encode_packet(&mut buf);
            buf
        };
        let mut s = tokio::net::TcpStream::connect(&vortex).await.unwrap();
        for (task, n) in [("0".repeat(64), 0), (hex.clone(), 999)] {
            s.write_all(&request(&task, n)).await.unwrap();
            match vortex_packet(&mut s).await {
                Some(Vortex::Error(_, e)) => {
                    assert_eq!(e.code, Code::NotFound, "{}", e.message);
                    assert!(e.message.contains(&task), "{}", e.message);
                }
                other => panic!("piece {n} of task {task}: {other:?}"),
            }
        }
        // The same connection still serves: piece 0, its bytes right.
        s.write_all(&request(&hex, 0)).await.unwrap();
        let Some(Vortex::PieceContent(_, c)) = vortex_packet(&mut s).await else {
            panic!("no piece 0");
        };
        let mut bytes = vec![0u8; c.metadata.length as usize];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut bytes)
            .await
            .unwrap();
        assert!(bytes == data[..bytes.len()], "piece 0's bytes");
        // A packet of an unknown kind, then one claiming 4 GiB: each answered with an
        // error or cut off at once.
        for head in [[0u8, 0xee, 0, 0, 0, 3], [0, 0, 0xff, 0xff, 0xff, 0xff]] {
            let mut s = tokio::net::TcpStream::connect(&vortex).await.unwrap();
            s.write_all(&head).await.unwrap();
            let _ = s.write_all(b"abc").await;
            match vortex_packet(&mut s).await {
                None | Some(Vortex::Error(..)) => {}
                Some(other) => panic!("{head:?}: {other:?}"),
            }
        }
        // gRPC: an unknown task.
        let mut c =
            dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient::connect(
                format!("http://{}:4000", peer.ip),
            )
            .await
            .unwrap();
        let e = c
            .stat_task(dragonfly_api::dfdaemon::v2::StatTaskRequest {
                task_id: "0".repeat(64),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    });

    // The proxy.
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-o", "/dev/null", "-D", "-"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let head = curl(&[&format!("{}/v2/x/blobs/sha256:{hex}", peer.proxy())]);
    assert!(
        head.starts_with("HTTP/1.1 400") && head.contains("x-dragonfly-error-type: proxy"),
        "{head}"
    );
    let head = curl(&["-x", &peer.proxy(), "-H", "Range: bytes=99999999-", &url]);
    assert!(
        head.starts_with("HTTP/1.1 416") && head.contains(&format!("bytes */{}", 8 << 20)),
        "{head}"
    );
    let tasks = metric_value(&peer.metrics(), "peer_tasks");
    let outside = format!("http://{}/v2/", origin.proxy.addr);
    let head = curl(&["-x", &peer.proxy(), &outside]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(metric_value(&peer.metrics(), "peer_tasks"), tasks);
    let tunneled = t.path().join("tunneled");
    fetch_tunneled(&peer.proxy(), &[], &url, &tunneled, &hex);

    // A peer whose scheduler is not there.
    let dead = ["127.0.0.1:9".to_string()];
    let lone = OurPeer::start(t.path(), "lone", &dead, false);
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    let alone = t.path().join("alone");
    finish_fetch(lone.spawn_fetch(&url, &alone, None), "with no scheduler");
    assert_copy(&alone, &hex, "with no scheduler");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "with no scheduler, the client waited {:?}\n{}",
        started.elapsed(),
        lone.log()
    );
    // And the first peer still serves.
    let again = t.path().join("again");
    finish_fetch(peer.spawn_fetch(&url, &again, None), "the last fetch");
    assert_copy(&again, &hex, "the last fetch");
}

/// In a swarm of ours, a client that does not verify chunks itself reads a piece as
/// soon as it is verified, not when the whole blob is: the peer's pieces come from our
/// seed before the seed's SHA-256 of them reached the scheduler (the peer registered
/// first), and are checked against the scheduler's digests as the download goes on.
/// The origin is limited to 16 MiB/s (a 64 MiB blob takes 4 s); the blob's first
/// 64 KiB are read well within half the time the whole blob takes, right.
#[test]
fn pieces_from_our_seed_are_verified_as_they_come_not_once_the_blob_is_whole() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(64 << 20, 67)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let _seed = OurPeer::start(t.path(), "seed", &list, true);
    let peer = OurPeer::start(t.path(), "peer", &list, false);
    wait_for_hosts(&sched, 2);
    origin.proxy.shape(Duration::ZERO, 16 << 20);
    let url = origin.url();
    let (head, whole) = (t.path().join("head"), t.path().join("whole"));
    let started = Instant::now();
    let all = peer.spawn_fetch(&url, &whole, None);
    finish_fetch(
        peer.spawn_fetch(&url, &head, Some("bytes=0-65535")),
        "the first 64 KiB",
    );
    let first = started.elapsed();
    finish_fetch(all, "the whole blob");
    let total = started.elapsed();
    eprintln!("the first 64 KiB after {first:?}, the whole blob after {total:?}");
    assert_copy(&whole, &origin.hex, "the whole blob");
    let data = std::fs::read(&whole).unwrap();
    assert!(
        std::fs::read(&head).unwrap() == data[..65536],
        "the first 64 KiB"
    );
    assert!(
        first < total / 2,
        "the first 64 KiB came after {first:?}, the whole blob after {total:?}\n{}",
        peer.log()
    );
    // The last pieces too: they come from the seed as it stores them, before its
    // digests of them reach the scheduler, and the download waits for those rather
    // than hash the whole blob.
    let hashes = metric_value(&peer.metrics(), "peer_blob_hashes_total");
    assert_eq!(
        hashes,
        0.0,
        "the peer hashed the whole blob to verify pieces\n{}",
        peer.log()
    );
}

/// A parent that claims pieces it lacks: its data file is emptied under it while it
/// runs, so `SyncPieces` still offers every piece and Vortex cannot send one. The child
/// counts the failed transfers, does not ask that parent again, and gets the blob from
/// the origin (the seed is gone): right bytes, in bounded time.
#[test]
fn a_parent_that_claims_pieces_it_lacks_is_left_for_the_origin() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(24 << 20, 71)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let mut seed = OurPeer::start(t.path(), "seed", &list, true);
    let hollow = OurPeer::start(t.path(), "hollow", &list, false);
    wait_for_hosts(&sched, 2);
    let got = fetch_all(&[&hollow], &origin.url(), "hollow");
    assert_hex(&got[0], &origin.hex, "the hollow parent's own copy");
    let data = hollow
        .dir
        .join("storage/tasks")
        .join(&origin.hex)
        .join("data");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(0)
        .unwrap();
    seed.kill();
    let child = OurPeer::start(t.path(), "child", &list, false);
    wait_for_hosts(&sched, 3);
    let started = Instant::now();
    let got = fetch_all(&[&child], &origin.url(), "child");
    assert_hex(&got[0], &origin.hex, "the child's copy");
    eprintln!("the child had the blob after {:?}", started.elapsed());
    let m = child.metrics();
    assert!(
        metric_value(&m, "peer_piece_failures_total{reason=\"transfer\"}") >= 1.0,
        "the child never failed a transfer from the hollow parent:\n{m}\n{}",
        child.log()
    );
    assert!(
        metric_value(&m, "peer_origin_bytes_total") > 0.0,
        "the child never went to the origin:\n{m}"
    );
}

/// Fetches `url` into `to` through `peer`'s proxy (curl's `extra` arguments added) and
/// checks it was served through the swarm (`X-Dragonfly-Task-Id`) and its SHA-256 is
/// `hex`.
fn fetch_through_swarm(peer: &OurPeer, extra: &[&str], url: &str, to: &std::path::Path, hex: &str) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60", "-D", "-", "-x"])
        .arg(peer.proxy())
        .args(extra)
        .arg("-o")
        .arg(to)
        .arg(url)
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        out.status.success() && head.contains("x-dragonfly-task-id"),
        "{extra:?}: not served through the swarm: {head}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        peer.log()
    );
    assert_copy(to, hex, &format!("through the swarm with {extra:?}"));
}

/// Fetches `url` into `to` through a `CONNECT` tunnel of the proxy at `proxy` (curl's
/// `extra` arguments added) and checks its SHA-256 is `hex`.
fn fetch_tunneled(proxy: &str, extra: &[&str], url: &str, to: &std::path::Path, hex: &str) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60", "-p", "-x", proxy])
        .args(extra)
        .arg("-o")
        .arg(to)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "through a CONNECT tunnel ({extra:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_copy(to, hex, "through a CONNECT tunnel");
}

/// An origin that answers every request `200 ok` and keeps each request's head
/// (lowercase): what a proxy sent on.
struct HeadSink {
    addr: String,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HeadSink {
    fn start() -> HeadSink {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = heads.clone();
        // Ends with the test process (it only ever blocks in accept).
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => break,
                    }
                }
                kept.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).to_lowercase());
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        HeadSink { addr, heads }
    }

    fn last(&self) -> String {
        self.heads
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

/// `proxy.server.basicAuth` (dfdaemon's field): without its credentials every request
/// to the proxy is refused with `407` and goes nowhere (to the origin, through a
/// `CONNECT` tunnel, or to the bad-range endpoint); with them (`Proxy-Authorization`,
/// or dfdaemon's `Authorization`) it is served, and neither reaches the origin, while a
/// client's own `Authorization` still does.
#[test]
fn a_proxy_with_basic_auth_serves_only_clients_with_its_credentials() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, _) = Origin::start(t.path(), &[(8 << 20, 71)]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let _seed = OurPeer::start(t.path(), "seed", &list, true);
    let auth = "    basicAuth:\n      username: node\n      password: s3cret\n";
    let peer = OurPeer::start_with_proxy(t.path(), "peer", &list, false, auth);
    wait_for_hosts(&sched, 2);
    let url = origin.url();
    let sink = HeadSink::start();
    let outside = format!("http://{}/v2/", sink.addr);
    // curl's answer head (the last one: a CONNECT's comes first) and its exit status.
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "30", "-o", "/dev/null", "-D", "-"])
            .args(args)
            .output()
            .unwrap();
        let all = String::from_utf8_lossy(&out.stdout).into_owned();
        let last = all
            .rsplit("HTTP/1.1 ")
            .next()
            .map(|h| format!("HTTP/1.1 {h}"))
            .unwrap_or_default();
        (last.to_lowercase(), out.status.success())
    };
    let proxy = peer.proxy();
    let before = (origin.proxy.requests(), sink.heads.lock().unwrap().len());
    let bad_range = format!("{proxy}/api/v1/bad-range");
    let elsewhere = format!("http://{}/healthy", sink.addr);
    for (what, args) in [
        (
            "no credentials, to another host's /healthy",
            vec!["-x", &proxy, &elsewhere],
        ),
        ("no credentials", vec!["-x", &proxy, &url]),
        (
            "wrong credentials",
            vec!["-x", &proxy, "--proxy-user", "node:wrong", &url],
        ),
        (
            "no credentials, to another host",
            vec!["-x", &proxy, &outside],
        ),
        (
            "a bad-range report",
            vec!["-X", "POST", "-d", "{}", &bad_range],
        ),
    ] {
        let (head, _) = curl(&args);
        assert!(
            head.starts_with("http/1.1 407") && head.contains("proxy-authenticate: basic"),
            "{what}: {head}"
        );
    }
    let tunnel = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o", "/dev/null", "-p", "-x"])
        .args([&proxy, &url])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&tunnel.stderr);
    assert!(
        !tunnel.status.success() && said.contains("407"),
        "a CONNECT without credentials: {said}"
    );
    assert_eq!(
        (origin.proxy.requests(), sink.heads.lock().unwrap().len()),
        before,
        "a refused request reached an origin"
    );
    let (head, ok) = curl(&[&format!("{proxy}/healthy")]);
    assert!(ok && head.starts_with("http/1.1 200"), "/healthy: {head}");

    // With the credentials: through the swarm, right bytes.
    let creds = ["--proxy-user", "node:s3cret"];
    fetch_through_swarm(&peer, &creds, &url, &t.path().join("got"), &origin.hex);
    let tunneled = t.path().join("tunneled");
    fetch_tunneled(&proxy, &creds, &url, &tunneled, &origin.hex);

    // To the origin: the proxy's credentials stay here, the client's own go on.
    let sent_on = |what: &str, args: &[&str]| {
        let (head, ok) = curl(args);
        assert!(ok && head.starts_with("http/1.1 200"), "{what}: {head}");
        sink.last()
    };
    let dfdaemons_way = [
        "-H",
        "Authorization: Basic bm9kZTpzM2NyZXQ=",
        "-H",
        "X-Probe: 1",
    ];
    let sent = sent_on(
        "dfdaemon's way",
        &[
            &["-x", proxy.as_str()][..],
            &dfdaemons_way,
            &[outside.as_str()],
        ]
        .concat(),
    );
    assert!(
        sent.contains("x-probe: 1") && !sent.contains("authorization"),
        "the origin was sent: {sent}"
    );
    let own = [
        "--proxy-user",
        "node:s3cret",
        "-H",
        "Authorization: Bearer origin-token",
    ];
    let sent = sent_on(
        "a client's own token",
        &[&["-x", proxy.as_str()][..], &own, &[outside.as_str()]].concat(),
    );
    assert!(
        sent.contains("authorization: bearer origin-token")
            && !sent.contains("proxy-authorization"),
        "the origin was sent: {sent}"
    );
}

/// With `basicAuth` and no seed, the peer itself goes to the origin for a read through
/// the swarm: the proxy's credentials sent dfdaemon's way (`Authorization: Basic`) stay
/// with the proxy, while a client's own `Authorization` (its registry token) goes on
/// to the origin with the peer's requests, next to the client's other headers. A
/// client's conditional (`If-None-Match` with the blob's ETag, which docker-registry
/// would answer `304`) does not go with the pieces' requests: the blob comes whole.
#[test]
fn a_peer_going_to_the_origin_itself_keeps_the_proxys_credentials_and_sends_the_clients_own() {
    let _swarm = require();
    let t = tempfile::tempdir().unwrap();
    let (origin, urls) = Origin::start(t.path(), &[(4 << 20, 81), (4 << 20, 82), (4 << 20, 83)]);
    let hexes: Vec<&str> = urls.iter().map(|u| u.rsplit(':').next().unwrap()).collect();
    let etag = format!("If-None-Match: \"sha256:{}\"", hexes[2]);
    let sched = Scheduler::start(t.path(), "scheduler", "");
    let list = [sched.addr.clone()];
    let auth = "    basicAuth:\n      username: node\n      password: s3cret\n";
    let peer = OurPeer::start_with_proxy(t.path(), "peer", &list, false, auth);
    wait_for_hosts(&sched, 1);
    let cases = [
        // The proxy's credentials dfdaemon's way.
        vec![
            "-H",
            "Authorization: Basic bm9kZTpzM2NyZXQ=",
            "-H",
            "X-Probe: a",
        ],
        // A client's own token.
        vec![
            "--proxy-user",
            "node:s3cret",
            "-H",
            "Authorization: Bearer origin-token",
            "-H",
            "X-Probe: b",
        ],
        // A client's conditional.
        vec![
            "--proxy-user",
            "node:s3cret",
            "-H",
            &etag,
            "-H",
            "X-Probe: c",
        ],
    ];
    // The client's headers, for each blob in turn.
    for (i, args) in cases.iter().enumerate() {
        fetch_through_swarm(&peer, args, &urls[i], &t.path().join("got"), hexes[i]);
    }
    let m = peer.metrics();
    assert!(
        metric_value(&m, "peer_origin_bytes_total") >= (12 << 20) as f64,
        "the peer did not go to the origin itself:\n{m}"
    );
    let (a, b) = (origin.proxy.heads(hexes[0]), origin.proxy.heads(hexes[1]));
    assert!(
        !a.is_empty() && a.iter().all(|h| h.contains("x-probe: a")),
        "the client's headers did not reach the origin: {a:?}"
    );
    assert!(
        a.iter().all(|h| !h.contains("authorization")),
        "the proxy's credentials reached the origin: {a:?}"
    );
    assert!(
        !b.is_empty()
            && b.iter().all(|h| h.contains("x-probe: b")
                && h.contains("authorization: bearer origin-token")
                && !h.contains("proxy-authorization")),
        "the origin was not sent the client's own token alone: {b:?}"
    );
    let c = origin.proxy.heads(hexes[2]);
    assert!(
        !c.is_empty()
            && c.iter()
                .all(|h| h.contains("x-probe: c") && !h.contains("if-")),
        "a conditional went to the origin with the pieces' requests: {c:?}"
    );
}
