//! FUSE passthrough of fully cached files: the kernel reads them from its own EROFS mount
//! of the image over the cache files, without the daemon — and only once every chunk of
//! the file is cached and verified. Needs root and Linux 6.9+ (FUSE passthrough).

use super::nydusd::{build, Daemon};
use rafs_e2e::*;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `/api/v1/metrics` counters of the daemon's image.
fn opens_passed_through(d: &Daemon) -> u64 {
    d.metric("/api/v1/metrics", "nr_passthrough_opens")
}

/// FUSE read requests the daemon answered.
fn daemon_reads(d: &Daemon) -> u64 {
    d.metric("/api/v1/metrics", "read")
}

/// Reads `rel` through the mount in 128 KiB reads and compares it with `expected`.
fn read_and_check(d: &Daemon, rel: &str, expected: &[u8]) {
    let mut f = File::open(d.path(rel)).unwrap();
    let mut got = Vec::with_capacity(expected.len());
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == expected, "{rel}: wrong bytes through the mount");
}

/// Writes back every dirty page (chunks just fetched are passed through only once
/// written back).
fn sync() {
    run_ok(&mut Command::new("sync"));
}

/// Writes back the cache, then opens and reads `rel` until an open is passed through
/// (the kernel answers a close with an asynchronous RELEASE: until the daemon has it,
/// the file counts as open through the page cache). Each round writes back again: on
/// a busy machine the daemon may still be writing chunks of the file to its cache
/// when the first round starts. Returns the passthrough opens counted then.
fn read_until_passed_through(d: &Daemon, rel: &str, expected: &[u8]) -> u64 {
    let before = opens_passed_through(d);
    let passed = wait_until(Duration::from_secs(20), || {
        sync();
        read_and_check(d, rel, expected);
        opens_passed_through(d) > before
    });
    assert!(passed, "{rel} was never passed through:\n{}", d.log_text());
    opens_passed_through(d)
}

/// Loop devices whose backing file lies in `dir`.
fn loops_over(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(f) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if f.trim().starts_with(&dir) {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn fully_cached_files_are_read_by_the_kernel_not_the_daemon() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    let big = noise((6 << 20) + 12345, 1);
    let half = noise(24 << 20, 2);
    let held = noise((3 << 20) + 7, 3);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("half.bin"), &half).unwrap();
    std::fs::write(src.join("held.bin"), &held).unwrap();
    std::fs::copy("/bin/busybox", src.join("bin/busybox")).unwrap();
    let busybox = std::fs::read(src.join("bin/busybox")).unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Daemon::start(&img, "a", "");

    // Files are laid out in the blob in path order, and the daemon reads ahead along
    // the blob: each part below reads files before the ones it reads first.
    //
    // The kernel refuses one inode open both ways: a file open through the page cache
    // keeps its later opens there, even once it is all cached...
    let first_open = File::open(d.path("held.bin")).unwrap();
    let mut all = vec![0u8; held.len()];
    first_open.read_exact_at(&mut all, 0).unwrap();
    assert!(all == held);
    let opens = opens_passed_through(&d);
    read_and_check(&d, "held.bin", &held);
    assert_eq!(opens_passed_through(&d), opens);
    // ...and is passed through once they are closed; an open meanwhile joins it.
    drop(first_open);
    read_until_passed_through(&d, "held.bin", &held);
    let a = File::open(d.path("held.bin")).unwrap();
    let b = File::open(d.path("held.bin")).unwrap();
    let mut tail = [0u8; 7];
    b.read_exact_at(&mut tail, 3 << 20).unwrap();
    assert!(tail == held[3 << 20..]);
    drop((a, b));

    // A file partly cached is served by the daemon, the missing chunks fetched.
    let f = File::open(d.path("half.bin")).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact_at(&mut first, 0).unwrap();
    drop(f);
    assert!(d.metric("/api/v1/metrics/blobcache", "ready_chunks") < 20);
    let (reads, opens) = (daemon_reads(&d), opens_passed_through(&d));
    read_and_check(&d, "half.bin", &half);
    assert_eq!(opens_passed_through(&d), opens);
    assert!(daemon_reads(&d) > reads);

    // Nothing cached: the daemon fetches, verifies and serves.
    let (reads, opens) = (daemon_reads(&d), opens_passed_through(&d));
    read_and_check(&d, "big.bin", &big);
    assert_eq!(opens_passed_through(&d), opens);
    assert!(daemon_reads(&d) > reads);
    // All cached now, but not yet written back: the kernel's direct reads of the cache
    // file would wait for that, so the daemon goes on serving the file.
    std::thread::sleep(Duration::from_millis(200));
    read_and_check(&d, "big.bin", &big);
    assert_eq!(opens_passed_through(&d), opens);

    // Every chunk cached and verified: the next open is passed through, and with the
    // page cache dropped the kernel reads the whole file without asking the daemon.
    read_until_passed_through(&d, "big.bin", &big);
    drop_caches();
    let (reads, opens) = (daemon_reads(&d), opens_passed_through(&d));
    read_and_check(&d, "big.bin", &big);
    assert_eq!(opens_passed_through(&d), opens + 1);
    assert_eq!(
        daemon_reads(&d),
        reads,
        "the daemon served a passed-through file"
    );

    // O_DIRECT opens stay with the daemon, which takes any alignment (EROFS would want
    // 4 KiB): a 4 KiB read at offset 512.
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(d.path("big.bin"))
        .unwrap();
    let mut space = vec![0u8; 3 * 4096];
    let at = space.as_ptr().align_offset(4096);
    let buf = &mut space[at..at + 4096];
    direct.read_exact_at(buf, 512).unwrap();
    assert!(buf[..] == big[512..512 + 4096]);
    drop(direct);
    assert_eq!(opens_passed_through(&d), opens + 1);
    assert!(daemon_reads(&d) > reads);

    // A program runs from a passed-through file (exec maps it from the backing file).
    read_until_passed_through(&d, "bin/busybox", &busybox);
    drop_caches();
    let out = Command::new(d.path("bin/busybox"))
        .args(["echo", "passed through"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"passed through\n");

    // The EROFS mount lives on loop devices over the cache files. After kill -9 the FUSE
    // connection still holds the backing files until its dead mount is unmounted (as
    // `kill9` does); then the mount, never attached anywhere, and the loops are gone.
    assert!(
        !loops_over(&img.cache).is_empty(),
        "no loop device over the cache"
    );
    assert!(
        !d.log_text().contains(" ERROR ") && !d.log_text().contains(" WARN "),
        "{}",
        d.log_text()
    );
    d.kill9();
    assert!(
        wait_until(Duration::from_secs(10), || loops_over(&img.cache)
            .is_empty()),
        "loop devices left over the cache: {:?}",
        loops_over(&img.cache)
    );
}

#[test]
fn a_restarted_daemon_passes_files_through_only_after_verifying_their_chunks() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = noise(3 << 20, 7);
    std::fs::write(src.join("f.bin"), &data).unwrap();
    let img = build(&src, &tmp.path().join("img"), &["--compressor", "none"]);
    let d = Daemon::start(&img, "a", "");
    read_and_check(&d, "f.bin", &data);
    read_until_passed_through(&d, "f.bin", &data);
    d.kill9();

    // Corrupt the cached copy of the file's second chunk while the daemon is down.
    let cache_file = std::fs::read_dir(&img.cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".blob.data"))
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cache_file)
        .unwrap();
    f.write_all_at(&[0xAA; 64], (1 << 20) + 100).unwrap();
    drop(f);

    // The restarted daemon has not verified the cached chunks: it serves the first open
    // itself, finds the corruption, fetches the chunk again; then passes it through.
    let d = Daemon::start(&img, "b", "");
    drop_caches();
    read_and_check(&d, "f.bin", &data);
    assert_eq!(opens_passed_through(&d), 0);
    assert!(d.metric("/api/v1/metrics/blobcache", "cache_corruptions") > 0);
    read_until_passed_through(&d, "f.bin", &data);
    drop_caches();
    read_and_check(&d, "f.bin", &data);
}

#[test]
fn a_file_the_kernel_would_map_elsewhere_is_never_passed_through() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // b.bin's chunks are a.bin's, deduplicated, in the other order: not contiguous.
    let (x, y) = (noise(1 << 20, 11), noise(1 << 20, 12));
    let a = [x.clone(), y.clone()].concat();
    let b = [y, x].concat();
    std::fs::write(src.join("a.bin"), &a).unwrap();
    std::fs::write(src.join("b.bin"), &b).unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    // Claim in b.bin's chunk format that it is one 2 MiB chunk (as builders do for
    // contiguous files): the kernel would read it from its first chunk on.
    let bs = rafs::read::Bootstrap::open(&img.boot).unwrap();
    let inode = bs.lookup_path("/b.bin").unwrap();
    assert_eq!(bs.kernel_chunk_size(&inode), 1 << 20);
    drop(bs);
    let boot = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.boot)
        .unwrap();
    boot.write_all_at(&(0x20u32 | 9).to_le_bytes(), inode.offset + 16)
        .unwrap();
    drop(boot);

    let d = Daemon::start(&img, "a", "");
    read_and_check(&d, "a.bin", &a);
    read_and_check(&d, "b.bin", &b);
    read_until_passed_through(&d, "a.bin", &a);
    let opens = opens_passed_through(&d);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        drop_caches();
        read_and_check(&d, "b.bin", &b);
    }
    assert_eq!(opens_passed_through(&d), opens, "b.bin was passed through");
}
