//! The cache's `size_limit`: the work dir stays under it (plus the chunks in flight) by
//! evicting what was read least recently, a file passed through to the kernel keeps its
//! chunks, daemons sharing a work dir never evict under each other, and every byte read
//! is right throughout.

use super::nydusd::{build, Daemon, Image};
use rafs_e2e::*;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Bytes the files directly in `dir` take on disk.
fn usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// `n` files of 1 MiB (one chunk each) under `dir` of `src`, seeded from `seed`.
fn files(src: &Path, dir: &str, n: u64, seed: u64) {
    std::fs::create_dir_all(src.join(dir)).unwrap();
    for i in 0..n {
        let data = noise(MIB as usize, seed + i);
        std::fs::write(src.join(format!("{dir}/f{i:02}")), data).unwrap();
    }
}

fn read_file_checked(d: &Daemon, src: &Path, rel: &str) {
    let got = std::fs::read(d.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}\n{}", d.log_text()));
    assert!(
        got == std::fs::read(src.join(rel)).unwrap(),
        "{rel}: wrong bytes"
    );
}

/// The config of `img` with `size_limit` in its cache section (and no amplification, so
/// that one file read fetches one chunk).
fn config_with_limit(img: &Image, limit: u64) -> std::path::PathBuf {
    let cfg = img.work.join("limit.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"device":{{"backend":{{"type":"localfs","config":{{"dir":"{}"}}}},
            "cache":{{"type":"blobcache","config":{{"work_dir":"{}","size_limit":{limit}}}}}}},
            "amplify_io":0}}"#,
            img.blobs.display(),
            img.cache.display()
        ),
    )
    .unwrap();
    cfg
}

/// Opens `rel` until the open is passed through (after writing the cache back); returns
/// the open file.
fn open_passed_through(d: &Daemon, rel: &str) -> File {
    let opens = || d.metric("/api/v1/metrics", "nr_passthrough_opens");
    let mut held = None;
    let passed = wait_until(Duration::from_secs(20), || {
        run_ok(&mut Command::new("sync"));
        let before = opens();
        let f = File::open(d.path(rel)).unwrap();
        if opens() > before {
            held = Some(f);
            true
        } else {
            drop(f);
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(passed, "{rel} was never passed through:\n{}", d.log_text());
    held.unwrap()
}

/// 13 MiB read through a 4 MiB cache: the work dir never takes more than the limit plus
/// the chunk in flight, chunks read least recently go first, and a file passed through
/// to the kernel keeps its chunks while open (read back right with the page cache
/// dropped); once closed it may be evicted, and reads right again from the backend.
#[test]
fn the_cache_stays_under_its_limit_and_keeps_passed_through_files() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    files(&src, "d", 12, 700);
    files(&src, "p", 1, 900);
    let img = build(&src, &tmp.path().join("img"), &[]);
    let limit = 4 * MIB;
    let d = Daemon::start_config(&img, "limit", &config_with_limit(&img, limit));

    read_file_checked(&d, &src, "p/f00");
    let pinned = open_passed_through(&d, "p/f00");
    let want = std::fs::read(src.join("p/f00")).unwrap();

    let mut most = 0;
    for round in 0..2 {
        for i in 0..12 {
            read_file_checked(&d, &src, &format!("d/f{i:02}"));
            most = most.max(usage(&img.cache));
        }
        // The kernel reads the pinned file from the cache files: right bytes only if
        // its chunk was never evicted.
        drop_caches();
        let mut got = vec![0u8; want.len()];
        pinned.read_exact_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "round {round}: a passed-through file read wrong bytes"
        );
    }
    let evicted = d.metric("/api/v1/metrics/blobcache", "evicted_chunks");
    assert!(evicted >= 8, "{evicted} chunks evicted:\n{}", d.log_text());
    // The limit, plus the one chunk being fetched (and the chunk map's pages).
    assert!(
        most <= limit + MIB + 64 * 1024,
        "the work dir took {most} bytes with a limit of {limit}"
    );
    let cache_bytes = d.metric("/api/v1/metrics/blobcache", "cache_bytes");
    assert!(
        cache_bytes > 0 && cache_bytes <= limit + MIB,
        "{cache_bytes}"
    );

    // Closed: its chunk may go now, and it reads right (fetched again) after.
    drop(pinned);
    for i in 0..12 {
        read_file_checked(&d, &src, &format!("d/f{i:02}"));
    }
    drop_caches();
    read_file_checked(&d, &src, "p/f00");
    assert_same_tree(&src, &d.mnt);
    println!(
        "13 MiB read through a {} MiB cache: at most {most} bytes on disk, {evicted} chunks evicted",
        limit / MIB
    );
}

/// Three daemons on one work dir with one limit: `a` and `c` serve image X (one blob,
/// open in both, as the old and new daemon of an upgrade have it), `b` serves image Y.
/// Reading all three at once, they stay under the limit plus the chunks in flight, each
/// evicting chunks of the blobs it has open — also of the blob it shares — and every
/// byte read is right. Once `b` is gone, Y's blob is open nowhere and goes whole.
#[test]
fn daemons_share_a_work_dir_and_its_limit() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let (src_x, src_y) = (tmp.path().join("x"), tmp.path().join("y"));
    files(&src_x, "d", 8, 100);
    files(&src_y, "d", 8, 200);
    let x = build(&src_x, &tmp.path().join("img-x"), &[]);
    let mut y = build(&src_y, &tmp.path().join("img-y"), &[]);
    y.cache = x.cache.clone();
    let limit = 6 * MIB;
    let a = Daemon::start_config(&x, "a", &config_with_limit(&x, limit));
    let b = Daemon::start_config(&y, "b", &config_with_limit(&y, limit));
    let c = Daemon::start_config(&x, "c", &config_with_limit(&x, limit));

    let mut most = 0;
    for round in 0..3 {
        std::thread::scope(|s| {
            let readers = [(&a, &src_x, false), (&b, &src_y, false), (&c, &src_x, true)].map(
                |(d, src, backwards)| {
                    s.spawn(move || {
                        for i in 0..8 {
                            // c goes the other way: the shared blob's chunks are read by
                            // both daemons at different times.
                            let i = if backwards { 7 - i } else { i };
                            read_file_checked(d, src, &format!("d/f{i:02}"));
                        }
                    })
                },
            );
            while !readers.iter().all(|t| t.is_finished()) {
                most = most.max(usage(&x.cache));
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        drop_caches();
        println!("round {round}: at most {most} bytes");
    }
    let evicted = |d: &Daemon| d.metric("/api/v1/metrics/blobcache", "evicted_chunks");
    let (ea, eb, ec) = (evicted(&a), evicted(&b), evicted(&c));
    assert!(
        ea + ec >= 4,
        "chunks of the shared blob evicted: {ea} by a, {ec} by c"
    );
    assert!(
        ea + eb + ec >= 12,
        "evicted: {ea} by a, {eb} by b, {ec} by c"
    );
    // The limit, plus a chunk in flight in each daemon and the chunk maps.
    assert!(
        most <= limit + 3 * MIB + 64 * 1024,
        "the work dir took {most} bytes with a limit of {limit}"
    );

    // b is gone: its blob is open nowhere, and is removed whole when room is needed.
    drop(b);
    for d in [&a, &c] {
        for i in 0..8 {
            read_file_checked(d, &src_x, &format!("d/f{i:02}"));
        }
        drop_caches();
    }
    let blobs = a.metric("/api/v1/metrics/blobcache", "evicted_blobs")
        + c.metric("/api/v1/metrics/blobcache", "evicted_blobs");
    assert_eq!(blobs, 1, "{}", a.log_text());
    assert!(usage(&x.cache) <= limit + 2 * MIB + 64 * 1024);
    println!(
        "three daemons (two sharing a blob) on one {} MiB work dir: at most {most} bytes, \
         {ea} + {eb} + {ec} chunks evicted, then b's blob whole",
        limit / MIB
    );
}
