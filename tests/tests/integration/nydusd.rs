//! Our `nydusd` on real FUSE mounts: the varied tree shown exactly, warm reads and
//! restarts without backend traffic, `kill -9` and restart, corrupt and missing blobs
//! (EIO, never wrong bytes, daemon stays up), 16 concurrent readers, and bad bootstraps
//! and configs refused with the reason. Needs root (FUSE, device nodes).

use rafs::read::Bootstrap;
use rafs_e2e::*;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const EIO: i32 = 5;

/// An image built by our `nydus-image create`, with a cache directory next to it.
pub(crate) struct Image {
    pub(crate) boot: PathBuf,
    pub(crate) blobs: PathBuf,
    pub(crate) cache: PathBuf,
    pub(crate) work: PathBuf,
}

pub(crate) fn build(src: &Path, work: &Path, flags: &[&str]) -> Image {
    let mut all = vec!["-t", "dir-rafs", "--log-level", "warn"];
    all.extend_from_slice(flags);
    let BuiltImage { boot, blobs } = build_image(src, work, &all);
    Image {
        boot,
        blobs,
        cache: work.join("cache"),
        work: work.to_path_buf(),
    }
}

impl Image {
    pub(crate) fn blob_path(&self) -> PathBuf {
        let bs = Bootstrap::open(&self.boot).unwrap();
        self.blobs.join(&bs.blobs()[0].id)
    }

    pub(crate) fn config(&self, extra: &str) -> PathBuf {
        let cfg = self.work.join("nydusd.json");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"device":{{"backend":{{"type":"localfs","config":{{"dir":"{}"}}}},
                "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}}{extra}}}"#,
                self.blobs.display(),
                self.cache.display()
            ),
        )
        .unwrap();
        cfg
    }
}

/// A running nydusd with its mount; the mount is undone before the daemon is killed.
pub(crate) struct Daemon {
    mount: Option<Mount>,
    child: Option<ChildGuard>,
    pub(crate) mnt: PathBuf,
    pub(crate) sock: PathBuf,
    log: PathBuf,
}

impl Daemon {
    pub(crate) fn start(img: &Image, name: &str, config_extra: &str) -> Daemon {
        Daemon::start_config(img, name, &img.config(config_extra))
    }

    /// [`Daemon::start`] with the config file `cfg`.
    pub(crate) fn start_config(img: &Image, name: &str, cfg: &Path) -> Daemon {
        let mnt = img.work.join(format!("mnt-{name}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let sock = img.work.join(format!("api-{name}.sock"));
        let log = img.work.join(format!("nydusd-{name}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let child = ChildGuard::spawn(
            Command::new(bin("nydusd"))
                .arg("fuse")
                .arg("--bootstrap")
                .arg(&img.boot)
                .arg("--mountpoint")
                .arg(&mnt)
                .arg("--config")
                .arg(cfg)
                .arg("--apisock")
                .arg(&sock)
                .args(["--fuse-threads", "4", "--log-level", "info"])
                .stdout(logf.try_clone().unwrap())
                .stderr(logf),
        )
        .unwrap();
        let mut d = Daemon {
            mount: None,
            child: Some(child),
            mnt: mnt.clone(),
            sock,
            log,
        };
        let up = wait_until(Duration::from_secs(20), || {
            is_mounted(&mnt) || d.child.as_mut().unwrap().try_wait().unwrap().is_some()
        });
        assert!(
            up && is_mounted(&mnt),
            "nydusd did not mount:\n{}",
            d.log_text()
        );
        d.mount = Some(Mount::adopt(&mnt));
        // Mounted comes a moment before the daemon calls itself RUNNING.
        let running = wait_until(Duration::from_secs(20), || {
            UnixStream::connect(&d.sock).is_ok()
                && d.api("GET", "/api/v1/daemon")
                    .contains("\"state\":\"RUNNING\"")
        });
        assert!(running, "nydusd is not RUNNING:\n{}", d.log_text());
        d
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// GET `path` on the API socket; the body.
    pub(crate) fn api(&self, method: &str, path: &str) -> String {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: nydusd\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 2"),
            "{method} {path}: {head}\n{body}"
        );
        body.to_string()
    }

    /// A numeric field of a metrics JSON object.
    pub(crate) fn metric(&self, path: &str, field: &str) -> u64 {
        number(&self.api("GET", path), field)
    }

    /// The daemon's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub(crate) fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.child_mut().kill().unwrap();
        let _ = child.child_mut().wait();
        drop(self.mount.take());
    }

    /// SIGTERM; the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let child = self.child.take().unwrap();
        let status = child.terminate(Duration::from_secs(10)).unwrap();
        if !is_mounted(&self.mnt) {
            // Unmounted by the daemon itself: nothing left for the guard.
            std::mem::forget(self.mount.take());
        }
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.mount.take());
        drop(self.child.take());
    }
}

pub(crate) fn number(json: &str, field: &str) -> u64 {
    let key = format!("\"{field}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {field} in {json}"))
        + key.len();
    json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a number in {json}"))
}

/// Reads every regular file below `dir` (not following symlinks); the bytes read.
fn read_all(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            total += read_all(&e.path());
        } else if ft.is_file() {
            total += std::fs::read(e.path()).unwrap().len() as u64;
        }
    }
    total
}

#[test]
fn nydusd_shows_the_varied_tree_exactly() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_varied_tree(&src).unwrap();
    for (name, flags) in [
        ("zstd-toc", &["--features", "blob-toc"][..]),
        (
            "lz4-64k",
            &["--compressor", "lz4_block", "--chunk-size", "0x10000"][..],
        ),
    ] {
        let img = build(&src, &tmp.path().join(name), flags);
        let d = Daemon::start(&img, name, "");
        assert_same_tree(&src, &d.mnt);
        assert_eq!(d.metric("/api/v1/metrics/blobcache", "digest_errors"), 0);
        let status = d.terminate();
        assert!(status.success(), "{name}: nydusd exited with {status}");
    }
}

#[test]
fn warm_reads_and_a_restart_cause_no_backend_reads() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_varied_tree(&src).unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Daemon::start(&img, "a", "");
    let bytes = read_all(&d.mnt);
    assert!(bytes > 5 << 20);
    let cold = d.metric("/api/v1/metrics/backend", "read_count");
    assert!(cold > 0);
    drop_caches();
    read_all(&d.mnt);
    assert_eq!(
        d.metric("/api/v1/metrics/backend", "read_count"),
        cold,
        "warm reads reached the backend"
    );
    assert!(d.metric("/api/v1/metrics/blobcache", "whole_hits") > 0);
    d.terminate();
    // A new daemon on the same cache fetches nothing (and verifies what it serves).
    let d = Daemon::start(&img, "b", "");
    assert_eq!(read_all(&d.mnt), bytes);
    assert_eq!(d.metric("/api/v1/metrics/backend", "read_count"), 0);
    assert_eq!(
        d.metric("/api/v1/metrics/blobcache", "cache_corruptions"),
        0
    );
    // Prometheus text carries the same counters.
    assert!(d
        .api("GET", "/metrics")
        .contains("nydusd_backend_read_count{backend=\"localfs\"} 0"));
}

#[test]
fn kill_9_during_reads_then_restart_keeps_contents_and_cached_chunks() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4u64 {
        std::fs::write(src.join(format!("f{i}")), noise(24 << 20, i)).unwrap();
    }
    let img = build(&src, &tmp.path().join("img"), &["--compressor", "none"]);
    let total_chunks = 4 * 24;
    let d = Daemon::start(&img, "a", r#","amplify_io":0"#);
    let mnt = d.mnt.clone();
    let reader = std::thread::spawn(move || {
        // Slow, chunk-sized reads until the mount dies.
        for i in 0..4 {
            let Ok(f) = std::fs::File::open(mnt.join(format!("f{i}"))) else {
                return;
            };
            let mut buf = vec![0u8; 1 << 20];
            for c in 0..24u64 {
                if f.read_exact_at(&mut buf, c << 20).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    assert!(wait_until(Duration::from_secs(30), || d
        .metric("/api/v1/metrics/blobcache", "ready_chunks")
        >= 10));
    d.kill9();
    let _ = reader.join();

    let d = Daemon::start(&img, "b", r#","amplify_io":0"#);
    let ready = d.metric("/api/v1/metrics/blobcache", "ready_chunks");
    assert!(
        (10..total_chunks).contains(&ready),
        "{ready} chunks cached at restart"
    );
    assert_same_tree(&src, &d.mnt);
    let fetched = d.metric("/api/v1/metrics/blobcache", "misses");
    assert_eq!(
        fetched + ready,
        total_chunks,
        "only chunks missing at restart are fetched, each once"
    );
    assert_eq!(
        d.metric("/api/v1/metrics/blobcache", "cache_corruptions"),
        0
    );
}

#[test]
fn a_corrupt_blob_chunk_gives_eio_until_the_blob_is_restored() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let content = noise(3 << 20, 7);
    std::fs::write(src.join("data"), &content).unwrap();
    let img = build(&src, &tmp.path().join("img"), &["--compressor", "none"]);
    let blob = img.blob_path();
    // Flip one byte in the middle of the second chunk, in place.
    let at = (1 << 20) + 4321;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&blob)
        .unwrap();
    let mut orig = [0u8; 1];
    f.read_exact_at(&mut orig, at).unwrap();
    f.write_all_at(&[orig[0] ^ 0xff], at).unwrap();

    let d = Daemon::start(&img, "a", "");
    let err = std::fs::read(d.path("data")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    // The other chunks are served.
    let g = std::fs::File::open(d.path("data")).unwrap();
    let mut head = vec![0u8; 4096];
    g.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, content[..4096]);
    assert!(d.metric("/api/v1/metrics/blobcache", "digest_errors") >= 1);
    assert!(
        d.log_text().contains("is corrupt"),
        "no log line names the corrupt chunk:\n{}",
        d.log_text()
    );
    // Restored: the same daemon now serves the right bytes.
    f.write_all_at(&orig, at).unwrap();
    assert_eq!(std::fs::read(d.path("data")).unwrap(), content);
}

#[test]
fn a_missing_blob_gives_eio_with_a_log_line_and_the_daemon_recovers() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    std::fs::write(src.join("dir/file"), noise(100_000, 3)).unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    let blob = img.blob_path();
    let aside = img.work.join("blob-aside");
    std::fs::rename(&blob, &aside).unwrap();

    let mut d = Daemon::start(&img, "a", "");
    // Metadata needs no blob.
    assert_eq!(
        std::fs::metadata(d.path("dir/file")).unwrap().len(),
        100_000
    );
    let err = std::fs::read(d.path("dir/file")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    let id = blob.file_name().unwrap().to_str().unwrap();
    assert!(
        d.log_text()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(id) && l.contains("not found")),
        "no clear log line:\n{}",
        d.log_text()
    );
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
    let info = d.api("GET", "/api/v1/daemon");
    assert!(info.contains("\"state\":\"RUNNING\""), "{info}");
    std::fs::rename(&aside, &blob).unwrap();
    assert_eq!(
        std::fs::read(d.path("dir/file")).unwrap(),
        std::fs::read(src.join("dir/file")).unwrap()
    );
}

#[test]
fn sixteen_threads_reading_random_ranges_get_every_byte_right() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let sizes: Vec<usize> = (0..120u64)
        .map(|i| (noise(8, i + 1000)[0] as usize * 7919 * (1 + i as usize % 9)) % (3 << 20))
        .collect();
    for (i, size) in sizes.iter().enumerate() {
        std::fs::write(src.join(format!("f{i:03}")), noise(*size, i as u64)).unwrap();
    }
    let img = build(&src, &tmp.path().join("img"), &["--chunk-size", "0x40000"]);
    let d = Daemon::start(&img, "a", "");
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (src, mnt) = (&src, &d.mnt);
            let sizes = &sizes;
            s.spawn(move || {
                let mut x = t + 1;
                for _ in 0..150 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x % sizes.len() as u64) as usize;
                    let size = sizes[i] as u64;
                    let off = if size == 0 { 0 } else { (x >> 8) % size };
                    let len = ((x >> 32) % (600 << 10)).min(size - off) as usize;
                    let name = format!("f{i:03}");
                    let mut got = vec![0u8; len];
                    let f = std::fs::File::open(mnt.join(&name)).unwrap();
                    f.read_exact_at(&mut got, off).unwrap();
                    let mut want = vec![0u8; len];
                    std::fs::File::open(src.join(&name))
                        .unwrap()
                        .read_exact_at(&mut want, off)
                        .unwrap();
                    assert!(got == want, "{name} at {off}+{len} differs");
                }
            });
        }
    });
    assert_eq!(d.metric("/api/v1/metrics/blobcache", "digest_errors"), 0);
}

#[test]
fn corrupt_or_truncated_bootstraps_are_refused_with_the_reason() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"hello").unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    let good = std::fs::read(&img.boot).unwrap();
    let cfg = img.config("");
    let mnt = img.work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut bad_magic = good.clone();
    bad_magic[1024] ^= 0xff;
    for (name, bytes, reason) in [
        ("truncated", good[..good.len() / 2].to_vec(), "unusable"),
        ("bad-magic", bad_magic, "magic"),
        ("empty", Vec::new(), "unusable"),
    ] {
        let boot = img.work.join(format!("{name}.boot"));
        std::fs::write(&boot, bytes).unwrap();
        let out = Command::new(bin("nydusd"))
            .arg("--bootstrap")
            .arg(&boot)
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: nydusd accepted it");
        assert!(!is_mounted(&mnt), "{name}: mounted anyway");
        assert!(
            err.contains(&boot.display().to_string()) && err.contains(reason),
            "{name}: stderr does not say why:\n{err}"
        );
    }
}

#[test]
fn an_invalid_config_is_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.json");
    std::fs::write(
        &cfg,
        r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/x"}},
           "cache":{"type":"blobcache","config":{"work_dir":"/y"}}},
           "fs_prefetch":{"enable":true,"threads_count":"many"}}"#,
    )
    .unwrap();
    let out = Command::new(bin("nydusd"))
        .args([
            "--bootstrap",
            "/nonexistent",
            "--mountpoint",
            "/nonexistent",
        ])
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fs_prefetch.threads_count"),
        "stderr does not name the field:\n{err}"
    );
}

#[test]
fn upstream_nydusd_serves_from_a_cache_our_nydusd_filled() {
    // The cache files have upstream's names and bitmap format: upstream 2.2 reuses them
    // (its blob copy is zeroed where the chunks are, so any fetch would show).
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big"), noise(3_000_000, 11)).unwrap();
    std::fs::write(src.join("small"), b"small file\n").unwrap();
    let img = build(&src, &tmp.path().join("img"), &["--compressor", "none"]);
    let d = Daemon::start(&img, "ours", "");
    read_all(&d.mnt);
    d.terminate();

    let blob = img.blob_path();
    let zeroed = img.work.join("zeroed");
    std::fs::create_dir_all(&zeroed).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[..3_000_000].fill(0);
    std::fs::write(zeroed.join(blob.file_name().unwrap()), bytes).unwrap();
    let cfg = img.work.join("upstream.json");
    std::fs::write(&cfg, localfs_config(&zeroed, &img.cache, false)).unwrap();
    let d = start_upstream_nydusd(
        &img.boot,
        &cfg,
        &img.work.join("mnt-upstream"),
        &img.work.join("upstream.log"),
    );
    assert_same_tree(&src, &d.mnt);
}

#[test]
fn api_exit_unmounts_and_prefetch_fills_the_cache_in_the_background() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("f{i}")), noise(2 << 20, i + 50)).unwrap();
    }
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Daemon::start(
        &img,
        "a",
        r#","fs_prefetch":{"enable":true,"threads_count":2,"merging_size":524288,"prefetch_all":true}"#,
    );
    assert!(
        wait_until(Duration::from_secs(30), || d
            .api("GET", "/api/v1/metrics/blobcache")
            .contains("\"prefetch_done\":true")),
        "prefetch did not finish: {}",
        d.api("GET", "/api/v1/metrics/blobcache")
    );
    let cache = d.api("GET", "/api/v1/metrics/blobcache");
    assert_eq!(
        number(&cache, "ready_chunks"),
        number(&cache, "total_chunks")
    );
    assert!(number(&cache, "prefetch_data_amount") >= 12 << 20);
    let requests = d.metric("/api/v1/metrics/backend", "read_count");
    assert_same_tree(&src, &d.mnt);
    assert_eq!(
        d.metric("/api/v1/metrics/backend", "read_count"),
        requests,
        "reads after prefetch reached the backend"
    );

    // PUT /api/v1/daemon/exit: the daemon unmounts and exits cleanly.
    let mut d = d;
    let mut s = UnixStream::connect(&d.sock).unwrap();
    write!(
        s,
        "PUT /api/v1/daemon/exit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
    let mut child = d.child.take().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || child
            .try_wait()
            .unwrap()
            .is_some_and(|s| s.success())),
        "the daemon did not exit cleanly:\n{}",
        d.log_text()
    );
    assert!(!is_mounted(&d.mnt), "still mounted after exit");
    std::mem::forget(d.mount.take());
}

#[test]
fn registry_backend_reads_lazily_and_survives_a_registry_outage() {
    require_root_tools(&["umount", "docker-registry", "curl"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4u64 {
        std::fs::write(src.join(format!("f{i}")), noise(1_500_000, i + 90)).unwrap();
    }
    let img = build(&src, &tmp.path().join("img"), &["--compressor", "none"]);
    let blob = img.blob_path();
    let id = blob.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(
        sha256_file(&blob).unwrap(),
        id,
        "blob id is the blob's sha256"
    );
    let mut reg = Registry::start_in(tmp.path(), "");
    reg.push_blob("test/lazy", &id, &blob);

    let cfg = img.work.join("registry.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http",
            "host":"{}","repo":"test/lazy","retry_limit":2}}}},
            "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}},"amplify_io":0}}"#,
            reg.addr,
            img.cache.display()
        ),
    )
    .unwrap();
    let mnt = img.work.join("mnt-registry");
    std::fs::create_dir_all(&mnt).unwrap();
    let sock = img.work.join("api-registry.sock");
    let log = img.work.join("nydusd-registry.log");
    let logf = std::fs::File::create(&log).unwrap();
    let child = ChildGuard::spawn(
        Command::new(bin("nydusd"))
            .arg("--bootstrap")
            .arg(&img.boot)
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--config")
            .arg(&cfg)
            .arg("--apisock")
            .arg(&sock)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || is_mounted(&mnt)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let mut d = Daemon {
        mount: Some(Mount::adopt(&mnt)),
        child: Some(child),
        mnt,
        sock,
        log,
    };
    // Lazy: one file read fetches only its chunks.
    assert_eq!(
        std::fs::read(d.path("f1")).unwrap_or_else(|e| panic!("{e}:\n{}", d.log_text())),
        std::fs::read(src.join("f1")).unwrap()
    );
    let fetched = d.metric("/api/v1/metrics/backend", "read_amount_total");
    assert!(
        (1_500_000..3_000_000).contains(&fetched),
        "{fetched} bytes fetched for one 1.5 MB file"
    );
    // Registry down: EIO after the retries, a log line, the daemon stays up.
    reg.down();
    let err = std::fs::read(d.path("f2")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(
        d.log_text().contains("registry backend read"),
        "{}",
        d.log_text()
    );
    // Back up: the same daemon recovers.
    reg.up();
    assert_same_tree(&src, &d.mnt);
}

/// The mount's kernel readahead window is opened to 16 MiB (`--readahead-kb`), well
/// past the 128 KiB the kernel would keep for a FUSE mount.
#[test]
fn the_mount_reads_ahead_sixteen_mib() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), vec![7u8; 3 << 20]).unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Daemon::start(&img, "ra", "");
    let dev = std::fs::metadata(&d.mnt).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let read = || std::fs::read_to_string(&knob).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), || read().trim() == "16384"),
        "{knob}: {}",
        read()
    );
    assert_eq!(std::fs::read(d.mnt.join("f")).unwrap(), vec![7u8; 3 << 20]);
    d.terminate();
}
