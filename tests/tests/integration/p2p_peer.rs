//! Our `p2p-peer` in swarms under our `p2p-scheduler`, with docker-registry as the origin
//! behind a byte-counting proxy, each peer on its own loopback address; real dfdaemons
//! (dragonfly-client 1.5.10) join them as children and parents. Every copy must have
//! the blob's digest and the origin must serve about one copy: a peer falls back to the
//! origin when the swarm fails, so right bytes alone prove nothing.

use super::p2p_scheduler::{assert_copy, origin_bound, report, require, wait_for_hosts, Origin};
use rafs_e2e::*;
use std::path::PathBuf;

/// Fetches `url` through each peer's proxy at once; waits for all.
fn fetch_all(peers: &[&OurPeer], url: &str, dir: &std::path::Path, tag: &str) -> Vec<PathBuf> {
    let outs: Vec<PathBuf> = (0..peers.len())
        .map(|i| dir.join(format!("{tag}-{i}")))
        .collect();
    let fetches: Vec<_> = peers
        .iter()
        .zip(&outs)
        .map(|(p, out)| p.spawn_fetch(url, out, None))
        .collect();
    for (i, f) in fetches.into_iter().enumerate() {
        finish_fetch(
            f,
            &format!("{tag}: peer {i} ({})\n{}", peers[i].ip, peers[i].log()),
        );
    }
    outs
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
    let outs = fetch_all(&refs, &origin.url(), t.path(), "got");
    let took = started.elapsed();
    for (i, out) in outs.iter().enumerate() {
        assert_copy(out, &origin.hex, &format!("peer {i}"));
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
