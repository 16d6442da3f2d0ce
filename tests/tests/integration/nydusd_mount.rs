//! One nydusd serving several images mounted through its API (the containerd
//! snapshotter's shared mode): `POST|DELETE /api/v1/mount`, the pseudo-root that holds
//! them, per-image metrics, and the access pattern fed back as a prefetch list. Needs
//! root (FUSE).

use super::nydusd::{build, number, Image};
use rafs_e2e::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A nydusd started without `--bootstrap`: an empty pseudo-root with an API socket.
struct Shared {
    daemon: FuseDaemon,
    sock: PathBuf,
    log: PathBuf,
}

impl Shared {
    fn start(work: &Path, name: &str) -> Shared {
        let mnt = work.join(format!("mnt-{name}"));
        let sock = work.join(format!("api-{name}.sock"));
        let log = work.join(format!("nydusd-{name}.log"));
        let daemon = start_fuse_daemon(
            Command::new(bin("nydusd"))
                .arg("--mountpoint")
                .arg(&mnt)
                .arg("--apisock")
                .arg(&sock)
                .args(["--log-level", "info"]),
            &mnt,
            &log,
        );
        Shared { daemon, sock, log }
    }

    fn mnt(&self) -> &Path {
        &self.daemon.mnt
    }

    fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        api_call(&self.sock, method, path, body)
    }

    /// POST /api/v1/mount of `img` at `mountpoint` with its config plus `extra` fields.
    fn mount(&self, mountpoint: &str, img: &Image, extra: &str) -> (u16, String) {
        self.mount_body(
            mountpoint,
            &json!({"source": img.boot, "fs_type": "rafs", "config": config_text(img, extra)}),
        )
    }

    fn mount_body(&self, mountpoint: &str, body: &Value) -> (u16, String) {
        self.call(
            "POST",
            &format!("/api/v1/mount?mountpoint={mountpoint}"),
            &body.to_string(),
        )
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One HTTP request on the API socket: status and body.
fn api_call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: nydusd\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (status, body.to_string())
}

/// Asserts a status and that the (JSON) message names `what`.
fn expect(got: (u16, String), status: u16, what: &str) {
    assert!(
        got.0 == status && got.1.contains(what),
        "expected {status} naming {what:?}, got {} {}",
        got.0,
        got.1
    );
}

/// The config of `img` (localfs blobs, its cache) with `extra` top-level fields.
fn config_text(img: &Image, extra: &str) -> String {
    std::fs::read_to_string(img.config(extra)).unwrap()
}

/// `ls -a` of `dir`, sorted: unlike `read_dir`, it shows `.` and `..`.
fn ls_a(dir: &Path) -> Vec<String> {
    let out = run_ok(Command::new("ls").arg("-a1").arg(dir));
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Inode numbers of every entry below `dir` (not following symlinks).
fn inodes(dir: &Path, out: &mut HashSet<u64>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.insert(std::fs::symlink_metadata(e.path()).unwrap().ino());
        if e.file_type().unwrap().is_dir() {
            inodes(&e.path(), out);
        }
    }
}

/// A small tree unlike the varied one: data files, a directory, a symlink.
fn small_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc/conf.d")).unwrap();
    std::fs::write(dir.join("etc/conf.d/app.conf"), b"key = value\n").unwrap();
    std::fs::write(dir.join("big"), noise(700_000, 41)).unwrap();
    std::os::unix::fs::symlink("etc/conf.d/app.conf", dir.join("link")).unwrap();
}

#[test]
fn nydusd_mounts_two_images_into_one_daemon_and_unmounts_one() {
    require_root_tools(&["umount", "ls"]);
    let tmp = tempfile::tempdir().unwrap();
    let (src_a, src_b) = (tmp.path().join("src-a"), tmp.path().join("src-b"));
    make_varied_tree(&src_a).unwrap();
    small_tree(&src_b);
    let img_a = build(&src_a, &tmp.path().join("a"), &[]);
    let img_b = build(
        &src_b,
        &tmp.path().join("b"),
        &["--compressor", "lz4_block", "--chunk-size", "0x10000"],
    );
    let d = Shared::start(tmp.path(), "shared");
    assert_eq!(
        ls_a(d.mnt()),
        [".", ".."],
        "a fresh daemon shows an empty root"
    );

    expect(d.mount("/a", &img_a, ""), 204, "");
    expect(d.mount("/b", &img_b, ""), 204, "");
    assert_eq!(ls_a(d.mnt()), [".", "..", "a", "b"]);
    assert_same_tree(&src_a, &d.mnt().join("a"));
    assert_same_tree(&src_b, &d.mnt().join("b"));

    // Inode numbers are unique across the images (and the pseudo-root).
    let (mut ino_a, mut ino_b) = (HashSet::new(), HashSet::new());
    inodes(&d.mnt().join("a"), &mut ino_a);
    inodes(&d.mnt().join("b"), &mut ino_b);
    ino_a.insert(std::fs::metadata(d.mnt().join("a")).unwrap().ino());
    ino_b.insert(std::fs::metadata(d.mnt().join("b")).unwrap().ino());
    let root = std::fs::metadata(d.mnt()).unwrap().ino();
    assert!(ino_a.len() > 5000 && ino_b.len() >= 5);
    assert!(ino_a.is_disjoint(&ino_b), "images share inode numbers");
    assert!(!ino_a.contains(&root) && !ino_b.contains(&root));

    // Each image has its own counters; `?id=` chooses, no id with two is refused.
    let (s, info) = d.call("GET", "/api/v1/daemon", "");
    assert_eq!(s, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["mounts"]["/b"]["source"],
        img_b.boot.display().to_string()
    );
    let (s, b) = d.call("GET", "/api/v1/metrics/backend?id=/b", "");
    assert_eq!(s, 200, "{b}");
    let b_bytes = number(&b, "read_amount_total");
    assert!(
        b_bytes > 0 && b_bytes < 2 << 20,
        "/b fetched {b_bytes} bytes"
    );
    let (_, a) = d.call("GET", "/api/v1/metrics/backend?id=%2Fa", "");
    assert!(number(&a, "read_amount_total") > 5 << 20, "{a}");
    expect(d.call("GET", "/api/v1/metrics/backend", ""), 400, "?id=");
    let (_, prom) = d.call("GET", "/metrics", "");
    assert!(
        prom.contains("nydusd_fs_opens{backend=\"localfs\",id=\"/b\"}"),
        "{prom}"
    );

    // DELETE one: its entry vanishes, the other is still served in full.
    let held = std::fs::File::open(d.mnt().join("a").join(MULTI_CHUNK_FILE)).unwrap();
    // Read in full above, the file was opened passed through to the kernel (where it
    // can be: see `fully_cached_files_are_read_by_the_kernel_not_the_daemon`).
    let (_, fs_a) = d.call("GET", "/api/v1/metrics?id=/a", "");
    let held_passed_through = number(&fs_a, "nr_passthrough_opens") > 0;
    let held_bytes = std::fs::read(src_a.join(MULTI_CHUNK_FILE)).unwrap();
    expect(d.call("DELETE", "/api/v1/mount?mountpoint=/a", ""), 204, "");
    assert_eq!(ls_a(d.mnt()), [".", "..", "b"]);
    // Also names the kernel had cached: the image root and everything in it.
    let mut gone = vec![d.mnt().join("a")];
    for e in std::fs::read_dir(&src_a).unwrap() {
        gone.push(d.mnt().join("a").join(e.unwrap().file_name()));
    }
    for p in gone {
        let err = std::fs::symlink_metadata(&p).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::NotFound,
            "{}: {err}",
            p.display()
        );
    }
    drop_caches();
    assert_same_tree(&src_b, &d.mnt().join("b"));
    // A file still open in the unmounted image fails to read when the daemon serves it;
    // one passed through reads on from its backing file, as on a lazily unmounted
    // filesystem: its own bytes, nothing else.
    let held_reads_on = |held: &std::fs::File| {
        let mut buf = vec![0u8; 4096];
        match held.read_at(&mut buf, 2 << 20) {
            Ok(n) => {
                assert!(held_passed_through, "the daemon served an unmounted image");
                assert_eq!(n, 4096);
                assert!(buf == held_bytes[2 << 20..(2 << 20) + 4096], "wrong bytes");
            }
            Err(err) => {
                assert!(!held_passed_through, "a passed-through file failed: {err}");
                assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
            }
        }
    };
    held_reads_on(&held);
    expect(
        d.call("DELETE", "/api/v1/mount?mountpoint=/a", ""),
        404,
        "nothing is mounted at /a",
    );
    expect(d.call("GET", "/api/v1/metrics?id=/a", ""), 404, "/a");

    // The name can be used again, for another image (with a cache of its own).
    let cfg = localfs_config(&img_b.blobs, &tmp.path().join("cache-b2"), true);
    expect(
        d.mount_body("/a", &json!({"source": img_b.boot, "config": cfg})),
        204,
        "",
    );
    assert_same_tree(&src_b, &d.mnt().join("a"));
    // The old file's inode number does not lead into the new image.
    held_reads_on(&held);
    assert!(
        !d.log_text().contains(" ERROR ") && !d.log_text().contains(" WARN "),
        "errors logged:\n{}",
        d.log_text()
    );
}

#[test]
fn nydusd_mount_api_refuses_bad_requests_with_the_reason() {
    require_root_tools(&["umount", "ls"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    small_tree(&src);
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Shared::start(tmp.path(), "shared");
    expect(d.mount("/a", &img, ""), 204, "");
    expect(d.mount("/a", &img, ""), 409, "/a is already mounted");
    expect(
        d.call("DELETE", "/api/v1/mount?mountpoint=/nope", ""),
        404,
        "nothing is mounted at /nope",
    );

    let good = |source: &Path, config: String| json!({"source": source, "config": config});
    let missing = tmp.path().join("no-such.boot");
    expect(
        d.mount_body("/c", &good(&missing, config_text(&img, ""))),
        400,
        &missing.display().to_string(),
    );
    let truncated = tmp.path().join("truncated.boot");
    let bytes = std::fs::read(&img.boot).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    expect(
        d.mount_body("/c", &good(&truncated, config_text(&img, ""))),
        400,
        "unusable",
    );
    // A FIFO nobody writes and a device that never ends: refused at once, not read.
    let fifo = tmp.path().join("fifo.boot");
    run_ok(Command::new("mkfifo").arg(&fifo));
    for source in [fifo.as_path(), Path::new("/dev/zero")] {
        let t = std::time::Instant::now();
        expect(
            d.mount_body("/c", &good(source, config_text(&img, ""))),
            400,
            "is not a regular file",
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{source:?}");
    }
    expect(
        d.mount(
            "/c",
            &img,
            r#","fs_prefetch":{"enable":true,"threads_count":"many"}"#,
        ),
        400,
        "fs_prefetch.threads_count",
    );
    expect(
        d.mount_body(
            "/c",
            &json!({"source": img.boot, "fs_type": "passthrough_fs", "config": config_text(&img, "")}),
        ),
        400,
        "fs_type",
    );
    expect(
        d.call("POST", "/api/v1/mount?mountpoint=/c", "{not json"),
        400,
        "invalid mount request body",
    );
    expect(
        d.call(
            "POST",
            "/api/v1/mount",
            &good(&img.boot, config_text(&img, "")).to_string(),
        ),
        400,
        "mountpoint",
    );
    expect(
        d.mount("/x//y", &img, ""),
        400,
        "not a valid directory name",
    );
    expect(d.mount("rel", &img, ""), 400, "is not absolute");
    // Nothing half-mounted is left behind.
    assert_eq!(ls_a(d.mnt()), [".", "..", "a"]);
    // Nested mountpoints, as Kata mounts images (`/rafs/<id>/lowerdir`): the directories
    // on the way appear, and go with the last image below them.
    expect(d.mount("/rafs/i1/lowerdir", &img, ""), 204, "");
    assert_eq!(ls_a(d.mnt()), [".", "..", "a", "rafs"]);
    assert_eq!(ls_a(&d.mnt().join("rafs/i1")), [".", "..", "lowerdir"]);
    assert_same_tree(&src, &d.mnt().join("rafs/i1/lowerdir"));
    expect(d.mount("/rafs/i1", &img, ""), 409, "holds other mounts");
    expect(
        d.mount("/a/inside", &img, ""),
        409,
        "inside the image mounted at /a",
    );
    expect(
        d.call("DELETE", "/api/v1/mount?mountpoint=/rafs/i1/lowerdir", ""),
        204,
        "",
    );
    assert_eq!(ls_a(d.mnt()), [".", "..", "a"]);
    // A percent-encoded mountpoint (as Go's url.Values encodes it) works.
    let cfg = localfs_config(&img.blobs, &tmp.path().join("cache-enc"), true);
    expect(
        d.mount_body("%2Fenc", &json!({"source": img.boot, "config": cfg})),
        204,
        "",
    );
    assert_same_tree(&src, &d.mnt().join("enc"));

    // A daemon serving --bootstrap at its root takes no API mounts.
    let mnt = tmp.path().join("mnt-legacy");
    let sock = tmp.path().join("api-legacy.sock");
    let _legacy = start_fuse_daemon(
        Command::new(bin("nydusd"))
            .arg("--bootstrap")
            .arg(&img.boot)
            .arg("--config")
            .arg(img.config(""))
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--apisock")
            .arg(&sock),
        &mnt,
        &tmp.path().join("legacy.log"),
    );
    let body = json!({"source": img.boot, "config": config_text(&img, "")}).to_string();
    expect(
        api_call(&sock, "POST", "/api/v1/mount?mountpoint=/a", &body),
        409,
        "--bootstrap",
    );
    assert_same_tree(&src, &mnt);
}

/// Paths of a `/metrics/pattern` or `/metrics/files` answer, in its order.
fn paths(json: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {json}"))
        .iter()
        .map(|e| e["file_path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn nydusd_access_pattern_lists_reads_in_order_and_feeds_prefetch() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let names = ["f0", "f1", "d/f2", "f3", "f4", "d/f5"];
    for (i, n) in names.iter().enumerate() {
        std::fs::write(src.join(n), noise(2 << 20, i as u64 + 300)).unwrap();
    }
    let img = build(&src, &tmp.path().join("img"), &["--compressor", "none"]);
    let d = Shared::start(tmp.path(), "shared");
    let flags = r#","access_pattern":true,"iostats_files":true,"latest_read_files":true"#;
    expect(d.mount("/img", &img, flags), 204, "");
    let plain = localfs_config(&img.blobs, &tmp.path().join("cache-plain"), true);
    expect(
        d.mount_body("/plain", &json!({"source": img.boot, "config": plain})),
        204,
        "",
    );
    let order = ["/f3", "/f0", "/d/f5"];
    for p in order {
        let got = std::fs::read(d.mnt().join(format!("img{p}"))).unwrap();
        assert_eq!(got, std::fs::read(src.join(&p[1..])).unwrap(), "{p}");
    }

    let (s, pattern) = d.call("GET", "/api/v1/metrics/pattern?id=/img", "");
    assert_eq!(s, 200, "{pattern}");
    assert_eq!(paths(&pattern), order, "{pattern}");
    let (s, files) = d.call("GET", "/api/v1/metrics/files?id=/img", "");
    assert_eq!(s, 200, "{files}");
    let files: Value = serde_json::from_str(&files).unwrap();
    for f in files.as_array().unwrap() {
        assert!(order.contains(&f["file_path"].as_str().unwrap()), "{f}");
        assert_eq!(f["data_read"], 2 << 20, "{f}");
        assert!(f["nr_open"].as_u64().unwrap() >= 1, "{f}");
    }
    assert_eq!(files.as_array().unwrap().len(), 3);
    let (_, latest) = d.call("GET", "/api/v1/metrics/files?id=/img&latest=true", "");
    assert_eq!(paths(&latest), order);
    let (_, latest) = d.call("GET", "/api/v1/metrics/files?id=/img&latest=true", "");
    assert_eq!(paths(&latest), Vec::<String>::new(), "latest is drained");
    // Off by default, as upstream: the answer says which flag turns it on.
    expect(
        d.call("GET", "/api/v1/metrics/pattern?id=/plain", ""),
        400,
        "access_pattern",
    );

    // The pattern as a prefetch list: a new daemon on an empty cache fetches exactly
    // those files' chunks in the background.
    let list = tmp.path().join("prefetch.list");
    std::fs::write(&list, paths(&pattern).join("\n") + "\n").unwrap();
    let prefetch = r#","fs_prefetch":{"enable":true,"threads_count":2,"prefetch_all":false}"#;
    let cache2 = tmp.path().join("cache2");
    let cfg = localfs_config(&img.blobs, &cache2, true);
    let cfg = format!("{}{prefetch}}}", &cfg[..cfg.len() - 1]);
    let cfg_path = tmp.path().join("prefetch.json");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let mnt = tmp.path().join("mnt-prefetch");
    let sock = tmp.path().join("api-prefetch.sock");
    let p = start_fuse_daemon(
        Command::new(bin("nydusd"))
            .arg("--bootstrap")
            .arg(&img.boot)
            .arg("--config")
            .arg(&cfg_path)
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--apisock")
            .arg(&sock)
            .arg("--prefetch-files")
            .arg(&list),
        &mnt,
        &tmp.path().join("prefetch.log"),
    );
    let cache_of = |sock: &Path, id: &str| {
        let path = format!("/api/v1/metrics/blobcache{id}");
        assert!(
            wait_until(Duration::from_secs(30), || api_call(sock, "GET", &path, "")
                .1
                .contains("\"prefetch_done\":true")),
            "prefetch did not finish"
        );
        api_call(sock, "GET", &path, "").1
    };
    let c = cache_of(&sock, "");
    assert_eq!(
        number(&c, "ready_chunks"),
        6,
        "2 chunks of each listed file: {c}"
    );
    let before = number(
        &api_call(&sock, "GET", "/api/v1/metrics/backend", "").1,
        "read_count",
    );
    for p in order {
        std::fs::read(mnt.join(&p[1..])).unwrap();
    }
    let backend = api_call(&sock, "GET", "/api/v1/metrics/backend", "").1;
    assert_eq!(
        number(&backend, "read_count"),
        before,
        "prefetched files were fetched again"
    );
    std::fs::read(mnt.join("f1")).unwrap();
    let backend = api_call(&sock, "GET", "/api/v1/metrics/backend", "").1;
    assert!(
        number(&backend, "read_count") > before,
        "an unlisted file was prefetched"
    );
    drop(p);

    // The same list in an API mount's `prefetch_files`.
    let cache3 = tmp.path().join("cache3");
    let cfg = localfs_config(&img.blobs, &cache3, true);
    let cfg = format!("{}{prefetch}}}", &cfg[..cfg.len() - 1]);
    expect(
        d.mount_body(
            "/pre",
            &json!({"source": img.boot, "config": cfg, "prefetch_files": order}),
        ),
        204,
        "",
    );
    let c = cache_of(&d.sock, "?id=/pre");
    assert_eq!(number(&c, "ready_chunks"), 6, "{c}");
}

#[test]
fn upstream_nydusctl_mounts_images_into_our_nydusd() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    small_tree(&src);
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Shared::start(tmp.path(), "shared");
    let ctl = |args: &[&str]| {
        Command::new(upstream_bin("nydusctl"))
            .arg("--sock")
            .arg(&d.sock)
            .args(args)
            .output()
            .unwrap()
    };
    let cfg = img.config("");
    let mount = [
        "mount",
        "--type",
        "rafs",
        "--mountpoint",
        "/ctl",
        "--source",
        img.boot.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ];
    let out = ctl(&mount);
    assert!(out.status.success(), "{out:?}\n{}", d.log_text());
    assert_same_tree(&src, &d.mnt().join("ctl"));
    let out = ctl(&mount);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/ctl is already mounted"), "{err}");
    // `nydusctl info` parses our daemon answer (2.2 panics on shapes it does not know).
    let out = ctl(&["info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("RUNNING"), "{out:?}");
}

/// Two images of one daemon that share a blob and a cache directory (a base layer, as
/// in the snapshotter's shared mode) share its cache: what one read is not fetched
/// again by the other, and the ready map on disk keeps every chunk either marked.
#[test]
fn images_sharing_a_blob_fetch_it_once() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_varied_tree(&src).unwrap();
    let img = build(&src, &tmp.path().join("img"), &[]);
    let d = Shared::start(tmp.path(), "twice");
    expect(d.mount("/one", &img, ""), 204, "");
    expect(d.mount("/two", &img, ""), 204, "");
    assert_same_tree(&src, &d.mnt().join("one"));
    assert!(fetched_of(&d, "/one") > 5 << 20);
    drop_caches();
    assert_same_tree(&src, &d.mnt().join("two"));
    assert_eq!(
        fetched_of(&d, "/two"),
        0,
        "/two fetched what /one had cached"
    );

    // A fresh daemon on the same cache finds every chunk ready.
    expect(
        d.call("DELETE", "/api/v1/mount?mountpoint=/one", ""),
        204,
        "",
    );
    expect(
        d.call("DELETE", "/api/v1/mount?mountpoint=/two", ""),
        204,
        "",
    );
    drop(d);
    let d = Shared::start(tmp.path(), "again");
    expect(d.mount("/three", &img, ""), 204, "");
    assert_same_tree(&src, &d.mnt().join("three"));
    assert_eq!(
        fetched_of(&d, "/three"),
        0,
        "chunks lost from the ready map"
    );
}

fn fetched_of(d: &Shared, id: &str) -> u64 {
    let (s, m) = d.call("GET", &format!("/api/v1/metrics/backend?id={id}"), "");
    assert_eq!(s, 200, "{m}");
    number(&m, "read_amount_total")
}
