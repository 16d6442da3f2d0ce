//! nydusd over virtio-fs (issue 16) with a real guest: QEMU (TCG) boots Debian's kernel
//! with a busybox initramfs (`fixtures/make-virtiofs-guest.sh`), mounts the share over
//! `vhost-user-fs-pci` and reads it, while our nydusd serves the image from a lazily
//! filled, verified cache.

use nydusd::client::supervisor::Supervisor;
use rafs_e2e::{
    build_image, localfs_config, require_root_tools, wait_until, BuiltImage, ChildGuard, Fault,
    FaultProxy, Guest, Registry,
};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIG: usize = 8 << 20;

/// A small tree: nested directories, a symlink, many small files and one 8 MiB file of
/// incompressible bytes.
fn source_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir_all(src.join("many")).unwrap();
    fs::write(
        src.join("hello.txt"),
        b"hello from the host, over virtio-fs\n",
    )
    .unwrap();
    fs::write(src.join("a/b/c/deep.txt"), b"deep\n").unwrap();
    std::os::unix::fs::symlink("hello.txt", src.join("link")).unwrap();
    for i in 0..64 {
        fs::write(
            src.join(format!("many/f{i:03}")),
            format!("file {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    fs::write(src.join("big.bin"), rafs_e2e::noise(BIG, 0x9E37_79B9)).unwrap();
    src
}

/// The tools a guest test needs (and `more`), a temporary directory, the source tree in
/// it and its image.
fn guest_fixture(more: &[&str]) -> (tempfile::TempDir, PathBuf, BuiltImage) {
    let mut tools = vec!["qemu-system-x86_64", "busybox"];
    tools.extend_from_slice(more);
    require_root_tools(&tools);
    let t = tempfile::tempdir().unwrap();
    let src = source_tree(t.path());
    let img = build_image(&src, &t.path().join("img"), &[]);
    (t, src, img)
}

/// `sha256sum` lines (`HASH  ./path`) of every regular file under `root`, sorted by path.
fn host_sums(root: &Path) -> String {
    let mut lines = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let md = p.symlink_metadata().unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                lines.push((
                    rel.clone(),
                    format!(
                        "{}  ./{rel}",
                        hex::encode(Sha256::digest(fs::read(&p).unwrap()))
                    ),
                ));
            }
        }
    }
    lines.sort();
    lines
        .into_iter()
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `nydusd virtiofs` serving `img` on `dir/vfs.sock`, its API on `dir/api.sock`.
struct VirtioFsDaemon {
    child: ChildGuard,
    sock: PathBuf,
    api: nydusd::client::ApiClient,
    log: PathBuf,
}

impl VirtioFsDaemon {
    fn start(img: &BuiltImage, dir: &Path) -> VirtioFsDaemon {
        let cache = dir.join("cache");
        fs::create_dir_all(&cache).unwrap();
        VirtioFsDaemon::start_config(img, dir, &localfs_config(&img.blobs, &cache, true))
    }

    /// [`VirtioFsDaemon::start`] with the nydusd config `config`.
    fn start_config(img: &BuiltImage, dir: &Path, config: &str) -> VirtioFsDaemon {
        let cfg = dir.join("nydusd.json");
        fs::write(&cfg, config).unwrap();
        VirtioFsDaemon::spawn(
            dir,
            Some("virtiofs"),
            &[
                "--bootstrap".as_ref(),
                img.boot.as_os_str(),
                "--config".as_ref(),
                cfg.as_os_str(),
            ],
        )
    }

    /// A daemon with no image of its own, started as Kata starts it (no subcommand, no
    /// mountpoint: `--sock` selects virtio-fs): images are mounted through its API.
    fn start_empty(dir: &Path) -> VirtioFsDaemon {
        VirtioFsDaemon::spawn(dir, None, &[])
    }

    fn spawn(dir: &Path, mode: Option<&str>, image_args: &[&std::ffi::OsStr]) -> VirtioFsDaemon {
        VirtioFsDaemon::spawn_named(dir, "", mode, image_args, true)
    }

    /// A daemon whose API socket and log are named after `name`; with `running`, once it
    /// serves (an `--upgrade` daemon waits for its takeover instead).
    fn spawn_named(
        dir: &Path,
        name: &str,
        mode: Option<&str>,
        image_args: &[&std::ffi::OsStr],
        running: bool,
    ) -> VirtioFsDaemon {
        let (sock, apisock, log) = (
            dir.join("vfs.sock"),
            dir.join(format!("api{name}.sock")),
            dir.join(format!("nydusd{name}.log")),
        );
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = ChildGuard::spawn(
            Command::new(rafs_e2e::bin("nydusd"))
                .args(mode)
                .arg("--sock")
                .arg(&sock)
                .arg("--apisock")
                .arg(&apisock)
                .args(image_args)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf),
        )
        .unwrap();
        let api = nydusd::client::ApiClient::new(&apisock);
        assert!(
            wait_until(Duration::from_secs(10), || (!running || sock.exists())
                && api
                    .daemon_info()
                    .is_ok_and(|i| !running || i.state == "RUNNING")),
            "nydusd virtiofs did not start; log:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        VirtioFsDaemon {
            child,
            sock,
            api,
            log,
        }
    }

    /// Bytes read from the backend so far.
    fn backend_bytes(&self) -> u64 {
        let (_, body) = self
            .api
            .request("GET", "/api/v1/metrics/backend", None)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["read_amount_total"].as_u64().unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The guest mounts the share, lists the tree (`.` and `..` included), reads one small
/// file lazily (the backend sends little more than it), then every file, each equal to
/// the source. When QEMU goes, the daemon notices and exits; a new daemon serves a new
/// guest on the same socket path.
#[test]
fn guest_reads_the_image_over_virtiofs() {
    let (t, src, img) = guest_fixture(&[]);
    let dir = t.path();
    let mut d = VirtioFsDaemon::start(&img, dir);
    let mut g = Guest::boot(&d.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    let ls = g.run("ls -la /mnt");
    let names: Vec<&str> = ls
        .lines()
        .filter_map(|l| l.split_whitespace().nth(8))
        .collect();
    for want in [".", "..", "hello.txt", "a", "many", "big.bin", "link"] {
        assert!(
            names.contains(&want),
            "{want} missing from the listing:\n{ls}"
        );
    }
    assert_eq!(
        g.run("cat /mnt/hello.txt"),
        "hello from the host, over virtio-fs"
    );
    assert_eq!(g.run("readlink /mnt/link"), "hello.txt");
    // Lazy: one small file read, the 8 MiB file untouched.
    let fetched = d.backend_bytes();
    assert!(
        fetched < (BIG / 4) as u64,
        "{fetched} bytes fetched for one small file"
    );
    let sums = g.run("cd /mnt && find . -type f | sort | xargs sha256sum");
    assert_eq!(sums, host_sums(&src));
    assert!(
        d.backend_bytes() >= BIG as u64,
        "the big file was not read through the backend"
    );
    g.run("cd / && umount /mnt");

    // QEMU gone: the daemon sees the disconnect and exits by itself.
    drop(g);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .child
            .try_wait()
            .unwrap()
            .is_some()),
        "nydusd did not exit after QEMU went; log:\n{}",
        d.log()
    );
    assert!(d.log().contains("disconnected"), "{}", d.log());
    // Started again on the same socket path, it serves a new guest (from its cache).
    let d2 = VirtioFsDaemon::start(&img, dir);
    let mut g = Guest::boot(&d2.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    assert_eq!(
        g.run("sha256sum /mnt/a/b/c/deep.txt | cut -d' ' -f1"),
        hex::encode(Sha256::digest(b"deep\n"))
    );
}

/// The image's blobs in a registry behind a [`FaultProxy`], and a nydusd config reading
/// them through the proxy (2 s per try, no amplification), its cache in `dir/cache`.
fn registry_image(img: &BuiltImage, dir: &Path) -> (Registry, FaultProxy, String) {
    let reg_dir = dir.join("reg");
    fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in(&reg_dir, "");
    for blob in fs::read_dir(&img.blobs).unwrap().flatten() {
        let id = blob.file_name().to_string_lossy().into_owned();
        reg.push_blob("test/vfs", &id, &blob.path());
    }
    let proxy = FaultProxy::start(&reg.addr);
    let mut config = nydusd::client::NydusdConfig::for_image(
        None,
        &format!("{}/test/vfs", proxy.addr),
        &nydusd::client::ImageConfigOptions {
            cache_dir: dir.join("cache"),
            ..Default::default()
        },
    )
    .unwrap();
    config.amplify_io = Some(0);
    let mut registry = config.device.backend.as_registry().unwrap();
    registry.timeout = Some(2);
    config.device.backend = nydusd::client::config::BackendV1::registry(&registry);
    (reg, proxy, config.to_json())
}

/// A backend failure during a guest read gives the guest EIO, within the backend's
/// timeout, not a hang; once the registry answers again, the same read succeeds.
#[test]
fn backend_failure_is_eio_in_the_guest_then_heals() {
    let (t, src, img) = guest_fixture(&["docker-registry", "curl"]);
    let dir = t.path();
    let (_reg, proxy, config) = registry_image(&img, dir);
    let d = VirtioFsDaemon::start_config(&img, dir, &config);
    let mut g = Guest::boot(&d.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    assert_eq!(g.run("cat /mnt/many/f000"), "file 0");
    proxy.fault(Fault::Unavailable, "/blobs/", usize::MAX);
    let t0 = std::time::Instant::now();
    let (out, status) = g
        .try_run("cat /mnt/big.bin > /dev/null", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the guest read hung: {e}\n{}", d.log()));
    assert_ne!(
        status, 0,
        "the read succeeded with the registry down: {out}"
    );
    assert!(out.contains("Input/output error"), "{out}");
    eprintln!("EIO in the guest after {:?}", t0.elapsed());
    proxy.fault(Fault::Unavailable, "", 0);
    // Failed chunks are not asked for again for a second (nydusd's failure memory).
    std::thread::sleep(Duration::from_millis(1500));
    let sum = g.run("sha256sum /mnt/big.bin | cut -d' ' -f1");
    assert_eq!(
        sum,
        hex::encode(Sha256::digest(fs::read(src.join("big.bin")).unwrap()))
    );
}

/// Two images mounted through the API at nested paths, as Kata mounts them
/// (`/rafs/<id>/lowerdir`), in a daemon with no image of its own; one is unmounted while
/// the guest watches: it leaves the guest's view within a bound (virtio-fs has no
/// invalidation here: short entry timeouts), and the other stays readable.
#[test]
fn nested_api_mounts_come_and_go_in_the_guest() {
    let (t, _src, img) = guest_fixture(&[]);
    let dir = t.path();
    let d = VirtioFsDaemon::start_empty(dir);
    for (i, id) in ["i1", "i2"].iter().enumerate() {
        let cache = dir.join(format!("cache-{i}"));
        let req = nydusd::client::MountRequest {
            source: img.boot.display().to_string(),
            fs_type: "rafs".into(),
            config: localfs_config(&img.blobs, &cache, true),
            prefetch_files: None,
        };
        d.api.mount(&format!("/rafs/{id}/lowerdir"), &req).unwrap();
    }
    let mut g = Guest::boot(&d.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    assert_eq!(g.run("ls -a /mnt/rafs | tr '\\n' ' '"), ". .. i1 i2 ");
    for id in ["i1", "i2"] {
        assert_eq!(
            g.run(&format!(
                "sha256sum /mnt/rafs/{id}/lowerdir/a/b/c/deep.txt | cut -d' ' -f1"
            )),
            hex::encode(Sha256::digest(b"deep\n"))
        );
    }
    d.api.umount("/rafs/i1/lowerdir").unwrap();
    let t0 = std::time::Instant::now();
    g.run("i=0; while [ -e /mnt/rafs/i1/lowerdir ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ ! -e /mnt/rafs/i1/lowerdir ]");
    let gone = t0.elapsed();
    eprintln!("the unmounted image left the guest's view after {gone:?}");
    assert!(gone < Duration::from_secs(5), "{gone:?}");
    assert_eq!(g.run("ls -a /mnt/rafs | tr '\\n' ' '"), ". .. i2 ");
    assert_eq!(
        g.run("cat /mnt/rafs/i2/lowerdir/hello.txt"),
        "hello from the host, over virtio-fs"
    );
    // Bad API mounts are refused with the reason; the guest keeps its view.
    let bad = nydusd::client::MountRequest {
        source: img.boot.display().to_string(),
        fs_type: "passthrough_fs".into(),
        config: localfs_config(&img.blobs, &dir.join("cache-x"), true),
        prefetch_files: None,
    };
    let e = d.api.mount("/rafs/i3/lowerdir", &bad).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let e = d.api.mount("/rafs/../x", &bad).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert_eq!(g.run("ls -a /mnt/rafs | tr '\\n' ' '"), ". .. i2 ");
}

/// The guest's VMM killed in the middle of a cold read: the daemon exits cleanly, and
/// a new daemon on the same cache serves a new guest the whole file, right.
#[test]
fn vmm_killed_mid_request_leaves_the_cache_usable() {
    let (t, src, img) = guest_fixture(&["docker-registry", "curl"]);
    let dir = t.path();
    let (_reg, proxy, config) = registry_image(&img, dir);
    let mut d = VirtioFsDaemon::start_config(&img, dir, &config);
    let mut g = Guest::boot(&d.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    // 8 MiB at 1 MB/s: the read is under way when QEMU goes.
    proxy.shape(Duration::ZERO, 1_000_000);
    let _ = g.try_run("cat /mnt/big.bin > /dev/null", Duration::from_secs(2));
    assert!(
        d.backend_bytes() < BIG as u64,
        "the read finished before QEMU was killed"
    );
    drop(g);
    assert!(
        wait_until(Duration::from_secs(15), || d
            .child
            .try_wait()
            .unwrap()
            .is_some()),
        "nydusd did not exit after QEMU was killed; log:\n{}",
        d.log()
    );
    let status = d.child.try_wait().unwrap().unwrap();
    assert!(
        status.success(),
        "nydusd exited with {status}; log:\n{}",
        d.log()
    );
    proxy.shape(Duration::ZERO, 0);
    let d = VirtioFsDaemon::start_config(&img, dir, &config);
    let mut g = Guest::boot(&d.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    assert_eq!(
        g.run("sha256sum /mnt/big.bin | cut -d' ' -f1"),
        hex::encode(Sha256::digest(fs::read(src.join("big.bin")).unwrap()))
    );
}

/// One cold read waiting on a registry that does not answer does not stall the guest's
/// other requests: cached files and directory listings are served meanwhile.
#[test]
fn a_hung_cold_read_does_not_stall_the_guest() {
    let (t, _src, img) = guest_fixture(&["docker-registry", "curl"]);
    let dir = t.path();
    let (_reg, proxy, config) = registry_image(&img, dir);
    let d = VirtioFsDaemon::start_config(&img, dir, &config);
    let mut g = Guest::boot(&d.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    g.run("cat /mnt/hello.txt /mnt/many/* > /dev/null");
    proxy.fault(Fault::Hang, "/blobs/", usize::MAX);
    g.run("(cat /mnt/big.bin > /dev/null 2>&1 &)");
    std::thread::sleep(Duration::from_millis(300));
    for cmd in [
        "cat /mnt/hello.txt",
        "ls /mnt/many | wc -l",
        "stat -c %s /mnt/big.bin",
    ] {
        let t0 = std::time::Instant::now();
        let (out, status) = g
            .try_run(cmd, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("`{cmd}` stalled behind the hung read: {e}\n{}", d.log()));
        assert_eq!(status, 0, "{cmd}: {out}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "`{cmd}` took {:?}",
            t0.elapsed()
        );
    }
    assert!(
        proxy.faulted() >= 1,
        "the cold read never reached the registry"
    );
}

/// Reads `file` of the guest until it is not empty (a background job's output).
fn guest_output(g: &mut Guest, file: &str, within: Duration) -> Result<String, String> {
    let (out, status) = g.try_run(
        &format!("while [ ! -s {file} ]; do sleep 0.1; done; cat {file}"),
        within,
    )?;
    match status {
        0 => Ok(out),
        _ => Err(format!("exit status {status}: {out}")),
    }
}

/// nydusd killed (`SIGKILL`) under a running guest three times, supervised by the test
/// (`--supervisor`): each time a successor (`--upgrade`) takes the device over, and the
/// guest goes on. The first kill comes while the daemon waits on the registry for a
/// cold read the guest made: the successor answers that request, with the right
/// bytes. A loop of reads in the guest runs through all three kills with no error, and
/// every file's sha256 is right after them. (Without a supervisor the guest waits for
/// ever: see the next test.)
#[test]
fn nydusd_killed_under_the_guest_is_taken_over_by_a_successor() {
    let (t, src, img) = guest_fixture(&["docker-registry", "curl"]);
    let dir = t.path();
    let (_reg, proxy, config) = registry_image(&img, dir);
    let cfg = dir.join("nydusd.json");
    fs::write(&cfg, &config).unwrap();
    let sup_path = dir.join("supervisor.sock");
    let supervisor = Supervisor::bind(&sup_path).unwrap();
    let first = VirtioFsDaemon::spawn_named(
        dir,
        "0",
        Some("virtiofs"),
        &[
            "--bootstrap".as_ref(),
            img.boot.as_os_str(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--supervisor".as_ref(),
            sup_path.as_os_str(),
        ],
        true,
    );
    let mut g = Guest::boot(&first.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    let first_read = g.try_run("cat /mnt/many/f001", Duration::from_secs(20));
    assert_eq!(
        first_read.as_ref().map(|(out, _)| out.as_str()),
        Ok("file 1\nfile 1"),
        "{}",
        first.log()
    );
    let state = String::from_utf8(supervisor.state().expect("no session was handed over")).unwrap();
    assert!(state.contains("\"complete\":true"), "{state}");

    // A loop of reads and listings in the guest, across the kills.
    g.run(
        "( (i=0; while [ $i -lt 100000 ]; do cat /mnt/many/* > /dev/null 2>/tmp/err || \
         echo FAIL >> /tmp/fail; ls -la /mnt/a/b > /dev/null || echo FAIL >> /tmp/fail; \
         i=$((i+1)); echo $i > /tmp/n; [ -e /tmp/stop ] && break; done; echo $i > /tmp/loop) \
         > /dev/null 2>&1 & )",
    );
    let loops = |g: &mut Guest| -> u64 {
        g.run("cat /tmp/n 2>/dev/null || echo 0")
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let big_sum = hex::encode(Sha256::digest(fs::read(src.join("big.bin")).unwrap()));
    let mut daemons = vec![first];
    let mut answered_left = 0;
    for round in 1..=3 {
        let before = loops(&mut g);
        assert!(
            wait_until(Duration::from_secs(30), || loops(&mut g) > before + 3),
            "round {round}: the guest's reads made no progress before the kill"
        );
        if round == 1 {
            // A cold read under way when the daemon dies: registry requests wait 5 s.
            proxy.shape(Duration::from_secs(5), 0);
            let sent = proxy.requests();
            g.run("( (sha256sum /mnt/big.bin | cut -d' ' -f1 > /tmp/sum) > /dev/null 2>&1 & )");
            assert!(
                wait_until(Duration::from_secs(20), || proxy.requests() > sent),
                "the cold read never reached the registry"
            );
            // Meanwhile the loop's requests pass it: more than a queue holds (QEMU's
            // default queue size is 128; a loop is over 200 requests).
            let at = loops(&mut g);
            assert!(
                wait_until(Duration::from_secs(4), || loops(&mut g) >= at + 2),
                "the guest's reads stalled behind the cold read"
            );
        }
        let old = daemons.last_mut().unwrap();
        let killed = std::time::Instant::now();
        old.child.child_mut().kill().unwrap();
        old.child.child_mut().wait().unwrap();
        proxy.shape(Duration::ZERO, 0);
        let next = VirtioFsDaemon::spawn_named(
            dir,
            &round.to_string(),
            Some("virtiofs"),
            &[
                "--supervisor".as_ref(),
                sup_path.as_os_str(),
                "--upgrade".as_ref(),
            ],
            false,
        );
        next.api
            .takeover()
            .unwrap_or_else(|e| panic!("takeover {round}: {e}\n{}", next.log()));
        next.api
            .start()
            .unwrap_or_else(|e| panic!("start {round}: {e}\n{}", next.log()));
        eprintln!("round {round}: kill to serving {:?}", killed.elapsed());
        if round == 1 {
            let sum =
                guest_output(&mut g, "/tmp/sum", Duration::from_secs(60)).unwrap_or_else(|e| {
                    panic!("the cold read was never answered: {e}\n{}", next.log())
                });
            assert_eq!(sum.trim(), big_sum, "the cold read returned wrong bytes");
        }
        answered_left += next
            .log()
            .lines()
            .filter(|l| l.contains("request(s) the previous daemon left"))
            .filter_map(|l| {
                l.split("answering ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
            .sum::<u32>();
        daemons.push(next);
    }
    assert!(
        answered_left >= 1,
        "no successor answered a request its predecessor had taken"
    );
    let before = loops(&mut g);
    assert!(
        wait_until(Duration::from_secs(30), || loops(&mut g) > before + 3),
        "the guest's reads made no progress after the last takeover"
    );
    g.run("touch /tmp/stop");
    let done = guest_output(&mut g, "/tmp/loop", Duration::from_secs(60)).unwrap_or_else(|e| {
        // QEMU exits when the guest kernel panics (`panic=-1`, `-no-reboot`): its console
        // says why.
        let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
        panic!(
            "the guest's loop did not end: {e}\nconsole:\n{}\nnydusd logs:\n{}",
            g.console(),
            logs.join("\n----\n")
        )
    });
    let fails = g.run("cat /tmp/fail 2>/dev/null | wc -l; cat /tmp/err");
    assert_eq!(fails.trim(), "0", "reads failed in the guest: {fails}");
    eprintln!(
        "virtio-fs failover: {} loops of reads in the guest across 3 kills, none failed; \
         {answered_left} request(s) left in flight answered by successors",
        done.trim()
    );
    let sums = g.run("cd /mnt && find . -type f | sort | xargs sha256sum");
    assert_eq!(sums, host_sums(&src));
    // The last daemon goes with the VMM.
    drop(g);
    let last = daemons.last_mut().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || last
            .child
            .try_wait()
            .unwrap()
            .is_some()),
        "the last nydusd did not exit after QEMU was killed; log:\n{}",
        last.log()
    );
    drop(supervisor);
}

/// What QEMU 7.2 does when nydusd dies under a guest with nobody holding the device:
/// it does not connect again, so a new nydusd on the same socket is never used and the
/// guest's next request on the share waits (here: no answer within 5 s). The test pins
/// this, the reason for the supervisor of the test above.
#[test]
fn without_a_supervisor_qemu_never_reconnects() {
    let (t, _src, img) = guest_fixture(&[]);
    let dir = t.path();
    let mut d = VirtioFsDaemon::start(&img, dir);
    let mut g = Guest::boot(&d.sock, "myfs");
    g.run("mount -t virtiofs myfs /mnt");
    g.run("cat /mnt/hello.txt");
    d.child.child_mut().kill().unwrap();
    d.child.child_mut().wait().unwrap();
    let cfg = dir.join("nydusd.json");
    let again = VirtioFsDaemon::spawn_named(
        dir,
        "1",
        Some("virtiofs"),
        &[
            "--bootstrap".as_ref(),
            img.boot.as_os_str(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ],
        true,
    );
    let r = g.try_run("cat /mnt/many/f002", Duration::from_secs(5));
    assert!(r.is_err(), "the guest's read was answered: {r:?}");
    assert!(
        !again.log().contains("the VMM connected"),
        "QEMU connected to the new daemon:\n{}",
        again.log()
    );
}
