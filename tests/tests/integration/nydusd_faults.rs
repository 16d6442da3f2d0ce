//! nydusd under faults of its registry and its cache disk: what keeps answering, how
//! soon a read that cannot be served fails, and that nothing wrong is ever served.

use crate::nydusd::{build, Daemon, Image};
use rafs_e2e::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const EIO: i32 = 5;

/// An image of `src` pushed to a local registry, and a nydusd config reading it through
/// a fault proxy with `backend_extra` added to the backend config.
pub(crate) struct RegistryImage {
    pub(crate) img: Image,
    /// Kept running for the proxy.
    _registry: Registry,
    pub(crate) proxy: FaultProxy,
}

impl RegistryImage {
    pub(crate) fn new(src: &Path, work: &Path, repo: &str) -> RegistryImage {
        let img = build(src, &work.join("img"), &["--compressor", "none"]);
        let blob = img.blob_path();
        let id = blob.file_name().unwrap().to_str().unwrap().to_string();
        let registry = Registry::start_in(work, "");
        registry.push_blob(repo, &id, &blob);
        let proxy = FaultProxy::start(&registry.addr);
        RegistryImage {
            img,
            _registry: registry,
            proxy,
        }
    }

    pub(crate) fn config(&self, repo: &str, backend_extra: &str, extra: &str) -> PathBuf {
        let cfg = self
            .img
            .work
            .join(format!("registry-{repo}.json").replace('/', "-"));
        std::fs::write(
            &cfg,
            format!(
                r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http",
                "host":"{}","repo":"{repo}"{backend_extra}}}}},
                "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}}{extra}}}"#,
                self.proxy.addr,
                self.img.cache.display()
            ),
        )
        .unwrap();
        cfg
    }
}

/// The daemon's FUSE threads (named `fuse-N`).
fn fuse_threads(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("fuse-") && !c.starts_with("fuse-watch"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Reads `path` after dropping its pages from the page cache, so that the read reaches
/// the daemon (unless the file is passed through).
fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    // SAFETY: fadvise on an open descriptor, no memory involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    let len = f.metadata()?.len() as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The registry backend's `timeout` and `retry_limit` in the hung-registry tests.
const HUNG_TIMEOUT: u64 = 2;
const HUNG_RETRY_LIMIT: u64 = 1;

/// How soon a read of a hung registry must fail: `timeout × (retry_limit + 1)`, plus
/// the 200 ms backoff, plus 1 s.
fn hung_read_bound() -> Duration {
    Duration::from_secs(HUNG_TIMEOUT * (HUNG_RETRY_LIMIT + 1))
        + Duration::from_millis(200)
        + Duration::from_secs(1)
}

/// `n` files `cold/f00`, `cold/f01`, ... of about 100 kB under `src`, seeded from `seed`.
fn cold_files(src: &Path, n: usize, seed: u64) {
    std::fs::create_dir_all(src.join("cold")).unwrap();
    for i in 0..n {
        let data = noise(100_000 + i * 1000, i as u64 + seed);
        std::fs::write(src.join(format!("cold/f{i:02}")), data).unwrap();
    }
}

/// How a timed read ended: how long it took, and the errno if it failed.
type TimedRead = std::thread::JoinHandle<(Duration, Result<(), Option<i32>>)>;

/// Reads of the `n` cold files through `d`, at once, each on a thread of its own.
fn read_cold_files(d: &Daemon, n: usize) -> Vec<TimedRead> {
    (0..n)
        .map(|i| {
            let path = d.path(&format!("cold/f{i:02}"));
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = std::fs::read(&path);
                (t.elapsed(), r.map(|_| ()).map_err(|e| e.raw_os_error()))
            })
        })
        .collect()
}

/// Waits for `readers`, each of which must have failed with EIO within `bound`;
/// returns how long the last one took.
fn assert_each_eio_within(readers: Vec<TimedRead>, bound: Duration, d: &Daemon) -> Duration {
    let mut last = Duration::ZERO;
    for (i, r) in readers.into_iter().enumerate() {
        let (took, res) = r.join().unwrap();
        assert_eq!(res, Err(Some(EIO)), "cold/f{i:02}:\n{}", d.log_text());
        assert!(
            took <= bound,
            "cold/f{i:02} failed after {took:?} (bound {bound:?}):\n{}",
            d.log_text()
        );
        last = last.max(took);
    }
    last
}

/// Lets the registry behind `ri` answer again and, once the daemon's second of memory
/// of timed-out chunks has passed, checks that every file of `src` reads right from `d`.
fn heal_and_check(ri: &RegistryImage, src: &Path, d: &Daemon) {
    ri.proxy.fault(Fault::Hang, "", 0);
    std::thread::sleep(Duration::from_millis(1100));
    assert_same_tree(src, &d.mnt);
}

/// With 64 cold reads hung on a registry that accepts connections and never answers,
/// the mount keeps answering: `stat` of paths never looked up, `ls`, and reads of cached
/// files each in under 100 ms. Every hung read fails with EIO within `timeout ×
/// (retry_limit + 1)` plus the backoff plus 1 s, and once the registry answers again
/// every file reads right.
#[test]
fn a_silent_registry_never_freezes_the_mount() {
    require_root_tools(&["umount", "docker-registry", "curl"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("other")).unwrap();
    const READERS: usize = 64;
    cold_files(&src, READERS, 300);
    for i in 0..40 {
        std::fs::write(src.join(format!("other/o{i:02}")), format!("{i}")).unwrap();
    }
    // Last in the blob (the builder goes breadth first): reading it fetches nothing else.
    std::fs::create_dir_all(src.join("zz")).unwrap();
    std::fs::write(src.join("zz/warm"), noise(300_000, 7)).unwrap();
    let ri = RegistryImage::new(&src, tmp.path(), "test/silent");
    // 2 attempts of at most 2 s, 200 ms between them.
    let bound = hung_read_bound();
    let cfg = ri.config(
        "test/silent",
        &format!(
            r#","timeout":{HUNG_TIMEOUT},"connect_timeout":{HUNG_TIMEOUT},"retry_limit":{HUNG_RETRY_LIMIT}"#
        ),
        "",
    );
    let d = Daemon::start_config(&ri.img, "silent", &cfg);
    let warm = std::fs::read(src.join("zz/warm")).unwrap();
    assert_eq!(std::fs::read(d.path("zz/warm")).unwrap(), warm);
    // Fast requests keep the pool as it is: 16 readers of a cached file at once.
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..20 {
                    assert_eq!(read_uncached(&d.path("zz/warm")).unwrap(), warm);
                }
            });
        }
    });
    assert_eq!(fuse_threads(&d), 4, "the pool grew for fast requests");

    ri.proxy.fault(Fault::Hang, "/blobs/", usize::MAX);
    let readers = read_cold_files(&d, READERS);
    assert!(
        wait_until(Duration::from_secs(2), || ri.proxy.faulted() >= 1),
        "no read reached the registry:\n{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));

    // While they hang: lookups, listings and cached reads answer at once.
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let t = Instant::now();
        let md = std::fs::metadata(d.path(&format!("other/o{i:02}"))).unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(md.len(), format!("{i}").len() as u64);
    }
    let t = Instant::now();
    assert_eq!(std::fs::read_dir(d.path("cold")).unwrap().count(), READERS);
    slowest = slowest.max(t.elapsed());
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(read_uncached(&d.path("zz/warm")).unwrap(), warm);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(100),
        "the mount answered in {slowest:?} while reads hung:\n{}",
        d.log_text()
    );
    let hung = ri.proxy.faulted();

    let grown = fuse_threads(&d);
    assert!(
        grown > READERS,
        "{grown} FUSE threads for {READERS} hung reads"
    );
    // Every hung read fails, and soon enough.
    let last = assert_each_eio_within(readers, bound, &d);
    println!(
        "{READERS} reads hung ({hung} requests): stat/ls/cached reads answered in at most \
         {slowest:?}; the last read failed (EIO) after {last:?} (bound {bound:?})"
    );

    // The threads grown for them leave once idle.
    assert!(
        wait_until(Duration::from_secs(5), || fuse_threads(&d) == 4),
        "{} FUSE threads after the hang",
        fuse_threads(&d)
    );
    // The registry answers again: everything reads right, from the same daemon.
    heal_and_check(&ri, &src, &d);
}

/// The slowest of 10 `GET /api/v1/daemon` on the API socket `sock` while 50 clients
/// hold connections sending a byte a second (ten of them a `POST /api/v1/mount` body)
/// and one more is connected and silent. Panics when an answer is not a 200 naming the
/// daemon RUNNING.
fn daemon_state_under_slow_clients(sock: &Path) -> Duration {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let _idle = UnixStream::connect(sock).unwrap();
    let slow: Vec<_> = (0..50)
        .map(|i| {
            let (sock, stop) = (sock.to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                let request = if i % 5 == 0 {
                    "POST /api/v1/mount?mountpoint=/slow HTTP/1.1\r\nContent-Length: 4096\r\n\r\n{\"source\":"
                } else {
                    "GET /api/v1/daemon HTTP/1.1\r\nHost: nydusd\r\n\r\n"
                };
                for b in request.bytes() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /api/v1/daemon HTTP/1.1\r\nHost: nydusd\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the body is whole (upstream keeps the connection open).
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if text.contains("\"state\":\"RUNNING\"") && text.trim_end().ends_with('}') {
                break;
            }
        }
        slowest = slowest.max(t.elapsed());
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains("\"state\":\"RUNNING\""),
            "{text}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        t.join().unwrap();
    }
    slowest
}

/// With 50 clients holding API connections and sending a byte a second (ten of them a
/// `POST /api/v1/mount` body), and one connected and silent, `GET /api/v1/daemon` still
/// answers in under 0.2 s — measured beside upstream nydusd 2.2 under the same load.
#[test]
fn the_api_answers_while_fifty_slow_clients_are_connected() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"api").unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Daemon::start(&img, "api", "");
    let ours = daemon_state_under_slow_clients(&d.sock);
    drop(d);

    // The baseline: upstream 2.2, same image and load (digest validation off: 2.2
    // refuses it for RAFS v6).
    let cfg = tmp.path().join("upstream.json");
    std::fs::write(
        &cfg,
        localfs_config(&img.blobs, &tmp.path().join("cache-upstream"), false),
    )
    .unwrap();
    let sock = tmp.path().join("upstream-api.sock");
    let mnt = tmp.path().join("mnt-upstream");
    let _upstream = start_fuse_daemon(
        upstream_nydusd_command(&img.boot, &cfg, &mnt)
            .arg("--apisock")
            .arg(&sock),
        &mnt,
        &tmp.path().join("upstream.log"),
    );
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let upstream = daemon_state_under_slow_clients(&sock);
    println!(
        "GET /api/v1/daemon with 51 slow or idle clients connected, slowest of 10: \
         ours {ours:?}, upstream nydusd 2.2 {upstream:?}"
    );
    assert!(
        ours < Duration::from_millis(200),
        "GET /api/v1/daemon took {ours:?}"
    );
}

/// A cache disk that fills up: every file still reads right (the chunks the cache
/// cannot take are served from the backend, verified), the metrics count them, and the
/// log says why once.
#[test]
fn a_full_cache_disk_still_serves_every_byte() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("big")).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("big/b{i}")), noise(1 << 20, i + 500)).unwrap();
    }
    std::fs::create_dir_all(src.join("z")).unwrap();
    std::fs::write(src.join("z/small"), b"6bytes").unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    std::fs::create_dir_all(&img.cache).unwrap();
    // 2 MiB of cache for 6 MiB of data.
    let _disk = Mount::kernel("tmpfs", Path::new("tmpfs"), &img.cache, "size=2m").unwrap();
    // Without amplification and readahead, then with nydusd's defaults (readahead on).
    for (name, extra) in [("full", r#","amplify_io":0"#), ("full-readahead", "")] {
        for e in std::fs::read_dir(&img.cache).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let d = Daemon::start(&img, name, extra);
        assert_same_tree(&src, &d.mnt);
        // Read again (the page cache dropped): still right, from the backend again.
        for i in 0..6u64 {
            let want = noise(1 << 20, i + 500);
            assert_eq!(read_uncached(&d.path(&format!("big/b{i}"))).unwrap(), want);
        }
        assert_eq!(read_uncached(&d.path("z/small")).unwrap(), b"6bytes");
        let uncached = d.metric("/api/v1/metrics/blobcache", "uncached_chunks");
        assert!(uncached >= 4, "{name}: {uncached} chunks uncached");
        let log = d.log_text();
        assert_eq!(log.matches("logged once").count(), 1, "{log}");
        assert!(log.contains("No space left on device"), "{log}");
        println!("{name} cache disk: every file read right, {uncached} chunks served uncached");
        drop(d);
    }
}

/// Reads that find their chunks claimed by prefetch (started at mount, before them, and
/// hung on the silent registry) fail within the same bound as their own fetch would:
/// prefetch adds nothing to the wait.
#[test]
fn prefetch_hung_on_a_silent_registry_adds_nothing_to_a_read() {
    require_root_tools(&["umount", "docker-registry", "curl"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    cold_files(&src, 32, 600);
    let ri = RegistryImage::new(&src, tmp.path(), "test/prefetch");
    let bound = hung_read_bound();
    let cfg = ri.config(
        "test/prefetch",
        &format!(r#","timeout":{HUNG_TIMEOUT},"retry_limit":{HUNG_RETRY_LIMIT}"#),
        r#","fs_prefetch":{"enable":true,"prefetch_all":true,"threads_count":4}"#,
    );
    // The registry hangs from the start: prefetch claims chunks at mount and waits.
    ri.proxy.fault(Fault::Hang, "/blobs/", usize::MAX);
    let d = Daemon::start_config(&ri.img, "prefetch", &cfg);
    assert!(
        wait_until(Duration::from_secs(5), || ri.proxy.faulted() >= 1),
        "prefetch never reached the registry:\n{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(200));
    let readers = read_cold_files(&d, 32);
    let last = assert_each_eio_within(readers, bound, &d);
    println!("32 reads behind a hung prefetch: the last failed after {last:?} (bound {bound:?})");
    heal_and_check(&ri, &src, &d);
}

/// Reads `path` in 1 MiB reads with the kernel's readahead off for it, so that the
/// daemon sees one read at a time: what it fetches meanwhile is its own readahead.
fn read_one_at_a_time(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: fadvise on an open descriptor, no memory involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_RANDOM,
        );
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// A 24 MiB file read cold from its start, one read at a time, through a registry that
/// answers slowly and out of order: every byte right, with several ranges in flight at
/// once. With the
/// readahead window capped at one request (`amplify_io`), at most the reader's own range
/// and one readahead range are in flight, as before windows grew: still right.
#[test]
fn a_cold_sequential_read_through_a_slow_out_of_order_registry_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let data: Vec<u8> = (0..24usize << 20)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Every other MiB compressible, as model weights are in part.
            if (i >> 20) % 2 == 0 {
                x as u8
            } else {
                (x as u8) & 0x0f
            }
        })
        .collect();
    std::fs::write(src.join("model.bin"), &data).unwrap();
    let ri = RegistryImage::new(&src, tmp.path(), "test/model");
    ri.proxy.shape_out_of_order(Duration::from_millis(20));
    for (name, extra) in [("wide", ""), ("capped", r#","readahead_window":1048576"#)] {
        let _ = std::fs::remove_dir_all(&ri.img.cache);
        // Ranges the previous daemon asked for may still be relayed (the proxy serves
        // them to the end): counted from when none is.
        assert!(
            wait_until(Duration::from_secs(10), || ri.proxy.take_most_concurrent()
                == 0),
            "the proxy never went idle"
        );
        let cfg = ri.config("test/model", "", extra);
        let d = Daemon::start_config(&ri.img, name, &cfg);
        ri.proxy.take_most_concurrent();
        let requests = ri.proxy.requests();
        let read = read_one_at_a_time(&d.path("model.bin"));
        assert!(
            read == data,
            "{name}: the bytes read differ:\n{}",
            d.log_text()
        );
        let most = ri.proxy.take_most_concurrent();
        let requests = ri.proxy.requests() - requests;
        println!("{name}: {most} ranges at once at most, {requests} requests");
        if name == "wide" {
            assert!(
                most >= 3,
                "{name}: at most {most} ranges in flight at once ({requests} requests)"
            );
        } else {
            assert!(
                most <= 2,
                "{name}: {most} ranges in flight at once ({requests} requests)"
            );
        }
        drop(d);
    }
}
