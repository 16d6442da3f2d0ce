//! nydusd failover with a supervisor: readers in a loop — cold and cached files, passed
//! through and served by the daemon, small and large, a file held open and read at
//! random, an mmap — while nydusd is `kill -9`ed three times and a successor started
//! with `--upgrade` takes the FUSE session over each time. Not one read may fail or
//! return a wrong byte. Also the takeovers that must be refused, with the old mount
//! serving on. Needs root and Linux 6.9+ (FUSE passthrough and resend).

use super::nydusd::{build, Image};
use nydusd::client::supervisor::{Saved, Supervisor};
use nydusd::client::{ApiClient, MountRequest};
use rafs_e2e::*;
use sha2::Digest;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sizes of the files read cold, once each, while the daemons are killed.
const COLD_FILES: usize = 6;
const COLD_SIZE: usize = 6 << 20;

/// The source tree: small files in directories, large files, and the files read cold.
fn source(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..120u64 {
        files.insert(
            format!("small/d{}/f{i}", i % 7),
            noise(500 + (i as usize * 977) % 30_000, i + 1),
        );
    }
    for i in 0..3u64 {
        files.insert(format!("large/l{i}.bin"), noise(5 << 20, 1000 + i));
    }
    files.insert("mmap/m.bin".into(), noise(3 << 20, 2000));
    for i in 0..COLD_FILES as u64 {
        files.insert(format!("cold/c{i}.bin"), noise(COLD_SIZE, 3000 + i));
    }
    for (rel, bytes) in &files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    files
}

/// A nydusd of the failover tests: its child, API and log.
struct Nydusd {
    child: ChildGuard,
    api: ApiClient,
    log: PathBuf,
}

impl Nydusd {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts nydusd on `mnt` with `--supervisor sup` (and `--upgrade`), its API on a socket
/// named after `name`; waits until the API answers.
fn start(work: &Path, mnt: &Path, sup: &Path, name: &str, upgrade: bool) -> Nydusd {
    let sock = work.join(format!("api-{name}.sock"));
    let log = work.join(format!("nydusd-{name}.log"));
    let mut cmd = Command::new(bin("nydusd"));
    cmd.arg("--mountpoint")
        .arg(mnt)
        .arg("--apisock")
        .arg(&sock)
        .arg("--supervisor")
        .arg(sup)
        .args(["--log-level", "info", "--log-file"])
        .arg(&log);
    if upgrade {
        cmd.arg("--upgrade");
    }
    let child = ChildGuard::spawn(&mut cmd).unwrap();
    let api = ApiClient::new(&sock);
    let mut d = Nydusd { child, api, log };
    let up = wait_until(Duration::from_secs(20), || {
        d.api.daemon_info().is_ok() || d.child.try_wait().unwrap().is_some()
    });
    if !(up && d.api.daemon_info().is_ok()) {
        let pid = d.child.id();
        let mut stacks = String::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            stacks.push_str(&std::fs::read_to_string(t.path().join("stack")).unwrap_or_default());
        }
        panic!(
            "nydusd {name} did not answer:\n{}\nits stacks:\n{stacks}",
            d.log_text()
        );
    }
    d
}

/// A supervised first daemon with `img` mounted through its API at `at`: the daemon, a
/// guard of its mount, and the supervisor holding its session.
fn supervised(
    work: &Path,
    img: &Image,
    at: &str,
    config: String,
) -> (Nydusd, Mount, Supervisor, PathBuf) {
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sup_path = work.join("supervisor.sock");
    let supervisor = Supervisor::bind(&sup_path).unwrap();
    let first = start(work, &mnt, &sup_path, "0", false);
    let mount = Mount::adopt(&mnt);
    let req = MountRequest {
        source: img.boot.display().to_string(),
        fs_type: "rafs".into(),
        config,
        prefetch_files: None,
    };
    // Mounted once the kernel's INIT handed the session over.
    assert!(
        wait_until(Duration::from_secs(10), || supervisor.has_session()),
        "nydusd handed no session over after INIT"
    );
    first.api.mount(at, &req).unwrap();
    assert!(supervisor.has_session(), "nydusd handed no session over");
    (first, mount, supervisor, sup_path)
}

/// The image's config text.
fn config_text(img: &Image) -> String {
    std::fs::read_to_string(img.config(r#","amplify_io":131072,"readahead_window":262144"#))
        .unwrap()
}

/// Aborts the FUSE connection of the mount at `mnt` (`/sys/fs/fuse/connections/<n>`,
/// mounting fusectl if needed), so that readers blocked on it fail instead of hanging.
fn abort_connection(mnt: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    if !Path::new("/sys/fs/fuse/connections/").join(".").exists()
        || std::fs::read_dir("/sys/fs/fuse/connections").is_ok_and(|mut d| d.next().is_none())
    {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status();
    }
    let mnt = mnt.display().to_string();
    for line in info.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(4) == Some(&mnt.as_str()) {
            if let Some((_, minor)) = f[2].split_once(':') {
                let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
            }
        }
    }
}

/// Aborts the FUSE connection at its mountpoint when dropped: a test that fails while
/// its supervisor holds a session nobody serves must not leave its own threads (or its
/// exit, which flushes open files) waiting on it for ever.
struct AbortOnDrop(PathBuf);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            abort_connection(&self.0);
        }
    }
}

/// What the readers saw.
#[derive(Default)]
struct Seen {
    reads: AtomicU64,
    longest_us: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Seen {
    /// Times `f`, a read that returns whether its bytes were right (or why not).
    fn read(&self, what: &str, f: impl FnOnce() -> Result<(), String>) {
        let t = Instant::now();
        let r = f();
        let us = t.elapsed().as_micros() as u64;
        self.longest_us.fetch_max(us, Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r {
            let mut f = self.failures.lock().unwrap();
            if f.len() < 20 {
                f.push(format!("{what}: {e}"));
            }
        }
    }
}

fn whole(path: &Path, expected: &[u8]) -> Result<(), String> {
    let mut got = Vec::with_capacity(expected.len());
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut got))
        .map_err(|e| e.to_string())?;
    if got != expected {
        return Err(format!("wrong bytes ({} read)", got.len()));
    }
    Ok(())
}

/// A read-only shared mapping of a whole file.
struct Map {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until drop.
#[allow(unsafe_code)]
unsafe impl Send for Map {}

impl Map {
    fn new(f: &File, len: usize) -> Map {
        // SAFETY: a fresh read-only mapping of an open file; checked for failure.
        #[allow(unsafe_code)]
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Map { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, and outlives the borrow.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr as *const u8, self.len)
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Starts the readers over `root` (the image's directory in the mount); they stop when
/// `stop` is set.
fn readers(
    root: &Path,
    files: &Arc<BTreeMap<String, Vec<u8>>>,
    seen: &Arc<Seen>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let shared = || {
        (
            root.to_path_buf(),
            files.clone(),
            seen.clone(),
            stop.clone(),
        )
    };
    let mut threads = Vec::new();
    // Every file but the cold ones, again and again: cached, soon passed through.
    for worker in 0..2 {
        let (root, files, seen, stop) = shared();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (rel, bytes) in files.iter().filter(|(r, _)| !r.starts_with("cold/")) {
                    if (rel.len() + worker) % 2 == 0 {
                        seen.read(rel, || whole(&root.join(rel), bytes));
                    }
                }
            }
        }));
    }
    // One large file held open across the failovers, read at random offsets.
    {
        let (root, files, seen, stop) = shared();
        threads.push(std::thread::spawn(move || {
            let rel = "large/l0.bin";
            let expected = &files[rel];
            let f = File::open(root.join(rel)).unwrap();
            let mut x = 12345u64;
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (expected.len() - buf.len()) as u64) as usize;
                seen.read("pread of the held large file", || {
                    f.read_exact_at(&mut buf, off as u64)
                        .map_err(|e| e.to_string())?;
                    (buf[..] == expected[off..off + buf.len()])
                        .then_some(())
                        .ok_or_else(|| format!("wrong bytes at {off}"))
                });
            }
        }));
    }
    // An mmap, its pages dropped from the page cache now and then.
    {
        let (root, files, seen, stop) = shared();
        threads.push(std::thread::spawn(move || {
            let rel = "mmap/m.bin";
            let expected = &files[rel];
            let f = File::open(root.join(rel)).unwrap();
            let map = Map::new(&f, expected.len());
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                if round % 8 == 0 {
                    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
                }
                let page = (round as usize * 7919) % (expected.len() / 4096);
                let at = page * 4096;
                seen.read("a page of the mmap", || {
                    (map.bytes()[at..at + 4096] == expected[at..at + 4096])
                        .then_some(())
                        .ok_or_else(|| format!("wrong bytes at {at}"))
                });
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    // Cache files written back now and then: only then are fully cached files passed
    // through (see `nydusd::fuse_opens`).
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::sync();
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }
    // The cold files, each byte read once, slowly enough to span the failovers.
    {
        let (root, files, seen, stop) = shared();
        threads.push(std::thread::spawn(move || {
            for (rel, expected) in files.iter().filter(|(r, _)| r.starts_with("cold/")) {
                let f = match File::open(root.join(rel)) {
                    Ok(f) => f,
                    Err(e) => {
                        seen.read(rel, || Err(format!("open: {e}")));
                        continue;
                    }
                };
                let mut buf = vec![0u8; 128 << 10];
                for off in (0..expected.len()).step_by(buf.len()) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    seen.read(rel, || {
                        f.read_exact_at(&mut buf, off as u64)
                            .map_err(|e| e.to_string())?;
                        (buf[..] == expected[off..off + buf.len()])
                            .then_some(())
                            .ok_or_else(|| format!("wrong bytes at {off}"))
                    });
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        }));
    }
    threads
}

#[test]
fn readers_see_no_failed_read_while_nydusd_is_killed_three_times() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let src = work.join("src");
    let files = Arc::new(source(&src));
    let img = build(&src, work, &[]);
    let (first, _mount, supervisor, sup_path) =
        supervised(work, &img, "/rafs/img/lowerdir", config_text(&img));
    let _abort = AbortOnDrop(work.join("mnt"));
    let mnt = work.join("mnt");
    let state = String::from_utf8(supervisor.state().unwrap()).unwrap();
    assert!(state.contains("/rafs/img/lowerdir"), "{state}");

    let root = mnt.join("rafs/img/lowerdir");
    // A file passed through and held open across the failovers: it must stay passed
    // through, with the same backing file, in every successor.
    let pt_rel = "large/l1.bin";
    let passthrough_opens = |d: &Nydusd| {
        let (_, body) = d
            .api
            .request("GET", "/api/v1/metrics?id=/rafs/img/lowerdir", None)
            .unwrap();
        super::nydusd::number(&String::from_utf8_lossy(&body), "nr_passthrough_opens")
    };
    let mut held = None;
    let passed = wait_until(Duration::from_secs(20), || {
        rustix::fs::sync();
        let before = passthrough_opens(&first);
        let f = File::open(root.join(pt_rel)).unwrap();
        let mut got = Vec::new();
        (&f).read_to_end(&mut got).unwrap();
        assert!(got == files[pt_rel], "{pt_rel}: wrong bytes");
        if passthrough_opens(&first) > before {
            held = Some(f);
        }
        held.is_some()
    });
    assert!(
        passed,
        "{pt_rel} was never passed through:\n{}",
        first.log_text()
    );
    let held = held.unwrap();
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let threads = readers(&root, &files, &seen, &stop);

    let progress = |when: &str| {
        let before = seen.reads.load(Ordering::Relaxed);
        assert!(
            wait_until(Duration::from_secs(20), || seen
                .reads
                .load(Ordering::Relaxed)
                > before + 200),
            "the readers made no progress {when}"
        );
    };
    let mut daemons = vec![first];
    let mut takeovers = Vec::new();
    for round in 1..=3 {
        progress(&format!("before kill {round}"));
        let old = daemons.last_mut().unwrap();
        let killed = Instant::now();
        old.child.child_mut().kill().unwrap();
        old.child.child_mut().wait().unwrap();
        let next = start(work, &mnt, &sup_path, &round.to_string(), true);
        next.api
            .takeover()
            .unwrap_or_else(|e| panic!("takeover {round}: {e}\n{}", next.log_text()));
        next.api
            .start()
            .unwrap_or_else(|e| panic!("start {round}: {e}\n{}", next.log_text()));
        takeovers.push(killed.elapsed());
        daemons.push(next);
    }
    progress("after the last takeover");
    stop.store(true, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let panicked = threads
            .into_iter()
            .map(|t| t.join().is_err())
            .filter(|p| *p)
            .count();
        let _ = tx.send(panicked);
    });
    let panicked = rx.recv_timeout(Duration::from_secs(30));
    if panicked.is_err() {
        let log = daemons.last().unwrap().log_text();
        abort_connection(&mnt);
        panic!("a reader hung after the failovers; last daemon's log:\n{log}");
    }
    assert_eq!(panicked, Ok(0), "a reader panicked");
    let last = daemons.last().unwrap();
    let failures = seen.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "failed reads: {failures:#?}\nlast daemon's log:\n{}",
        last.log_text()
    );
    // Every byte right once more, through the last daemon.
    for (rel, bytes) in files.iter() {
        whole(&root.join(rel), bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
    }
    let log = last.log_text();
    assert!(log.contains("took over the FUSE session"), "{log}");
    assert!(
        log.contains("asked the kernel to resend")
            && !log.contains("did not take FUSE_NOTIFY_RESEND"),
        "{log}"
    );
    // The file held open since the first daemon is still passed through: a new open
    // joins it (the kernel refuses an open in another mode or with another backing
    // file), and both read right.
    assert!(log.contains("open files of image"), "{log}");
    let before = passthrough_opens(last);
    let again = File::open(root.join(pt_rel)).unwrap();
    assert_eq!(
        passthrough_opens(last),
        before + 1,
        "a new open of {pt_rel}, held open passed through since the first daemon, was not \
         passed through by the last one:\n{log}"
    );
    for f in [&held, &again] {
        let mut got = vec![0u8; files[pt_rel].len()];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got == files[pt_rel], "{pt_rel}: wrong bytes");
    }
    let passed = passthrough_opens(last);
    drop((held, again));
    println!(
        "failover: {} reads, none failed; longest read {:.0} ms; kill to takeover {:?}; \
         the last daemon passed {passed} opens through",
        seen.reads.load(Ordering::Relaxed),
        seen.longest_us.load(Ordering::Relaxed) as f64 / 1000.0,
        takeovers
    );
    last.api.exit().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !is_mounted(&mnt)),
        "the last daemon did not unmount on exit"
    );
    std::mem::forget(_mount);
    drop(supervisor);
}

/// A read the dead daemon had taken (its registry request under way) is resent by the
/// kernel to the successor, which answers it: the reader only waits.
#[test]
fn a_read_the_dead_daemon_had_taken_is_answered_by_its_successor() {
    require_root_tools(&["umount", "docker-registry"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let src = work.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let expected = noise(3 << 20, 77);
    std::fs::write(src.join("big.bin"), &expected).unwrap();
    let ri = super::nydusd_faults::RegistryImage::new(&src, work, "resend/img");
    let config = std::fs::read_to_string(ri.config(
        "resend/img",
        "",
        r#","amplify_io":0,"readahead_window":0"#,
    ))
    .unwrap();
    let (first, _mount, supervisor, sup_path) = supervised(work, &ri.img, "/img", config);
    let _abort = AbortOnDrop(work.join("mnt"));
    let mnt = work.join("mnt");
    // Every registry request waits 2 s before it is forwarded.
    ri.proxy.shape(Duration::from_secs(2), 0);
    let before = ri.proxy.requests();
    let (tx, rx) = std::sync::mpsc::channel();
    let path = mnt.join("img/big.bin");
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let r = File::open(&path).and_then(|mut f| f.read_to_end(&mut got));
        let _ = tx.send(r.map(|_| got));
    });
    assert!(
        wait_until(Duration::from_secs(10), || ri.proxy.requests() > before),
        "the read never reached the registry"
    );
    // The daemon has read the FUSE request and waits on the registry: killed now.
    let mut first = first;
    first.child.child_mut().kill().unwrap();
    first.child.child_mut().wait().unwrap();
    ri.proxy.shape(Duration::ZERO, 0);
    let next = start(work, &mnt, &sup_path, "1", true);
    next.api.takeover().unwrap();
    next.api.start().unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            let log = next.log_text();
            abort_connection(&mnt);
            panic!("the read the dead daemon had taken was never answered:\n{log}")
        })
        .expect("the read failed");
    assert!(got == expected, "wrong bytes");
    next.api.exit().unwrap();
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(&mnt)));
    std::mem::forget(_mount);
    drop(supervisor);
}

#[test]
fn bad_takeovers_are_refused_and_the_mount_serves_on() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let src = work.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"served on").unwrap();
    let img = build(&src, work, &[]);
    let (first, _mount, supervisor, sup_path) = supervised(work, &img, "/sub", config_text(&img));
    let _abort = AbortOnDrop(work.join("mnt"));
    let mnt = work.join("mnt");
    let good = supervisor.state().unwrap();

    // A daemon already serving has nothing to take over.
    let err = first.api.takeover().unwrap_err().to_string();
    assert!(
        err.contains("only a nydusd started with --upgrade"),
        "{err}"
    );

    // A second supervisor, fed broken sessions; the successor asks it.
    let bad_path = work.join("bad.sock");
    let bad = Supervisor::bind(&bad_path).unwrap();
    let successor = start(work, &mnt, &bad_path, "s", true);
    let refused = |why: &str| {
        let err = successor.api.takeover().unwrap_err().to_string();
        assert!(err.contains(why), "expected {why:?} in: {err}");
        assert_eq!(successor.api.daemon_info().unwrap().state, "INIT");
        let err = successor.api.start().unwrap_err().to_string();
        assert!(err.contains("no session taken over yet"), "{err}");
        assert_eq!(
            std::fs::read(mnt.join("sub/f")).unwrap(),
            b"served on",
            "the mount stopped serving after a refused takeover ({why})"
        );
    };
    refused("holds no session to take over");
    let fuse_file = || File::open("/dev/null").unwrap();
    let with_state = |state: Vec<u8>, fds: Vec<File>| {
        bad.set(Some(Saved {
            state,
            fds: fds.into_iter().map(Into::into).collect(),
        }))
    };
    with_state(good[..good.len() / 2].to_vec(), vec![fuse_file()]);
    refused("not JSON");
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["version"] = 7.into();
    with_state(serde_json::to_vec(&v).unwrap(), vec![fuse_file()]);
    refused("state version 7");
    with_state(good.clone(), vec![fuse_file(), fuse_file()]);
    refused("not /dev/fuse");
    // The real session (a dup of the live FUSE device and table the first daemon
    // serves) with broken parts: the successor must neither serve nor unmount it.
    let real = || nydusd::client::supervisor::restore(&sup_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["resend"] = false.into();
    bad.set(Some(Saved {
        state: serde_json::to_vec(&v).unwrap(),
        fds: real().fds,
    }));
    refused("offered no FUSE_HAS_RESEND");
    // A successor that cannot open the image's cache (its work_dir is a file now).
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let blocked = work.join("not-a-dir");
    std::fs::write(&blocked, b"").unwrap();
    let config = v["tree"]["mounts"][0]["config"].as_str().unwrap().replace(
        &img.cache.display().to_string(),
        &blocked.display().to_string(),
    );
    v["tree"]["mounts"][0]["config"] = config.into();
    bad.set(Some(Saved {
        state: serde_json::to_vec(&v).unwrap(),
        fds: real().fds,
    }));
    refused("mounting");
    // An open-file table of another layout.
    let table = work.join("table");
    let mut bytes = b"NYDOPEN9".to_vec();
    bytes.resize(32, 0);
    std::fs::write(&table, bytes).unwrap();
    let mut fds = real().fds;
    fds[1] = File::open(&table).unwrap().into();
    bad.set(Some(Saved {
        state: good.clone(),
        fds,
    }));
    refused("the open-file table starts with");
    assert!(
        is_mounted(&mnt),
        "the refused successor unmounted the session"
    );

    drop(successor);
    drop(bad);
    first.api.exit().unwrap();
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(&mnt)));
    std::mem::forget(_mount);
}

/// The container's loop: every round checks the warm files (small ones, a large one),
/// runs `/bin/busybox` from the image (mapped, its pages faulted in through the mount)
/// and checks one cold file never read before, and prints `ok N` or `FAIL N`.
const LOOP: &str = r#"i=0
while true; do
  r=ok
  sha256sum -c -s /data/warm.sums 2>/dev/null || r=FAIL
  /bin/busybox true || r=FAIL
  if [ -e /data/cold/c$i ]; then
    grep "/data/cold/c$i\$" /data/cold.sums | sha256sum -c -s 2>/dev/null || r=FAIL
  fi
  echo "$r $i"
  i=$((i+1))
done"#;

/// Pushes busybox with a layer of data files (and their checksums) as `fo:v1`, and its
/// nydus conversion as `fo:v1-nydus`.
fn data_image(reg: &Registry, dir: &Path) -> String {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..40u64 {
        files.push((
            format!("data/small/s{i}"),
            noise(300 + (i as usize * 733) % 20_000, 50 + i),
        ));
    }
    files.push(("data/large.bin".into(), noise(6 << 20, 99)));
    let warm: String = files
        .iter()
        .map(|(p, b)| format!("{}  /{p}\n", hex::encode(sha2::Sha256::digest(b))))
        .collect();
    let mut cold = String::new();
    for i in 0..400u64 {
        let b = noise(256 << 10, 500 + i);
        cold.push_str(&format!(
            "{}  /data/cold/c{i}\n",
            hex::encode(sha2::Sha256::digest(&b))
        ));
        files.push((format!("data/cold/c{i}"), b));
    }
    files.push(("data/warm.sums".into(), warm.into_bytes()));
    files.push(("data/cold.sums".into(), cold.into_bytes()));
    let layout = dir.join("oci-fo");
    super::nydusify::make_busybox(&layout, "v1");
    let entries: Vec<(&str, &[u8], u32)> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice(), 0o644))
        .collect();
    super::nydusify::add_layer(&layout, "v1", &entries, dir);
    super::snapshotter::push_and_convert(reg, &layout, "fo", "v1", dir);
    format!("{}/fo:v1-nydus", reg.addr)
}

/// A container running [`LOOP`], its lines collected with the time each arrived.
struct Looper {
    child: ChildGuard,
    stderr: PathBuf,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    id: String,
}

impl Looper {
    fn start(ctd: &Containerd, image: &str, id: &str, dir: &Path) -> Looper {
        let stderr = dir.join(format!("{id}.stderr"));
        let mut child = ChildGuard::spawn(
            ctd.ctr()
                .args([
                    "-n",
                    "k8s.io",
                    "run",
                    "--rm",
                    "--snapshotter",
                    "nydus",
                    image,
                    id,
                ])
                .args(["sh", "-c", LOOP])
                .stdout(std::process::Stdio::piped())
                .stderr(File::create(&stderr).unwrap()),
        )
        .unwrap();
        let out = child.child_mut().stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Looper {
            child,
            stderr,
            lines: rx,
            seen: Vec::new(),
            id: id.into(),
        }
    }

    /// Waits for `n` more rounds (at most `within`); whether they came.
    fn rounds(&mut self, n: usize, within: Duration) -> bool {
        let want = self.seen.len() + n;
        let deadline = Instant::now() + within;
        while self.seen.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => return false,
            }
        }
        true
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn failures(&self) -> Vec<&str> {
        self.seen
            .iter()
            .filter(|(_, l)| !l.starts_with("ok "))
            .map(|(_, l)| l.as_str())
            .collect()
    }

    /// The longest time between two rounds.
    fn longest_gap(&self) -> Duration {
        self.seen
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default()
    }

    fn stop(&mut self, ctd: &Containerd) {
        let _ = ctd
            .ctr()
            .args(["-n", "k8s.io", "task", "kill", "-s", "KILL", &self.id])
            .output();
        let done = wait_until(Duration::from_secs(20), || {
            self.child.try_wait().unwrap().is_some()
        });
        assert!(done, "container {} did not stop", self.id);
    }
}

/// An HTTP request on a unix socket; status and body.
fn unix_http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The snapshotter's log and the ends of its daemons' logs.
fn logs(snap: &NydusSnapshotter) -> String {
    let mut out = snap.log_text();
    if let Ok(dir) = std::fs::read_dir(snap.root.join("logs")) {
        for e in dir.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains("DEBUG")).collect();
            out.push_str(&format!(
                "\n--- {}:\n{}",
                e.path().display(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            ));
        }
    }
    out
}

/// The one nydusd of the snapshotter (one image, or the shared daemon).
fn only_nydusd(snap: &NydusSnapshotter) -> u32 {
    let pids = snap.nydusd_pids();
    assert_eq!(
        pids.len(),
        1,
        "nydusd processes: {pids:?}\n{}",
        snap.log_text()
    );
    pids[0]
}

fn snapshotter_failover(mode: &str) {
    super::snapshotter::tools();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let reg_dir = dir.join("reg");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in(&reg_dir, "");
    let image = data_image(&reg, dir);
    let system = dir.join("system.sock");
    let mut snap = NydusSnapshotter::start(
        &dir.join("snap"),
        &format!(
            "daemon_mode = \"{mode}\"\n[daemon]\nrecover_policy = \"failover\"\n\
             [system]\nenable = true\naddress = \"{}\"\n",
            system.display()
        ),
    );
    let ctd = Containerd::start(&dir.join("ctd"), &snap.sock);
    ctd.cri_pull(&image)
        .unwrap_or_else(|e| panic!("CRI pull: {e}\n{}", snap.log_text()));

    // 1. A container reading in a loop while its nydusd is killed three times.
    let mut looper = Looper::start(&ctd, &image, &format!("loop1-{mode}"), dir);
    assert!(
        looper.rounds(3, Duration::from_secs(60)),
        "the loop did not start: {:?}\n{}\n{}",
        looper.seen,
        looper.stderr(),
        logs(&snap)
    );
    let mut pid = only_nydusd(&snap);
    for round in 1..=3 {
        // Fully cached files are passed through once written back; dropped pages are
        // read again (the kernel's or the daemon's way).
        drop_caches();
        kill_pid(pid);
        let replaced = wait_until(Duration::from_secs(20), || {
            snap.log_text().matches("failover done").count() == round
        });
        assert!(
            replaced,
            "no successor after kill {round}:\n{}",
            logs(&snap)
        );
        assert!(
            looper.rounds(5, Duration::from_secs(30)),
            "the loop stalled after kill {round}: {:?}\n{}\n{}",
            looper.seen.last(),
            looper.stderr(),
            logs(&snap)
        );
        pid = only_nydusd(&snap);
    }
    let log = snap.log_text();
    assert!(!log.contains("failover failed"), "{}", logs(&snap));

    // 2. A live upgrade to another nydusd binary under the same load.
    let v2 = dir.join("nydusd-v2");
    // Copied by `cp`, not by this process: a child another test forks while this
    // process holds the copy open for writing keeps it open, and the exec of the copy
    // then fails with ETXTBSY ("Text file busy", seen in a full run).
    run_ok(std::process::Command::new("cp").arg(bin("nydusd")).arg(&v2));
    let (status, body) = unix_http(
        &system,
        "PUT",
        "/api/v1/daemons/upgrade",
        &format!(
            r#"{{"nydusd_path":"{}","version":"v2","policy":"rolling"}}"#,
            v2.display()
        ),
    );
    assert_eq!(status, 200, "{body}\n{}", snap.log_text());
    let upgraded = only_nydusd(&snap);
    assert_ne!(upgraded, pid);
    assert_eq!(
        std::fs::read_link(format!("/proc/{upgraded}/exe")).unwrap(),
        v2,
        "the daemon does not run the new binary"
    );
    assert!(
        looper.rounds(5, Duration::from_secs(30)),
        "the loop stalled after the upgrade"
    );
    // An upgrade to a binary that cannot take over is refused; the daemon serves on.
    let (status, body) = unix_http(
        &system,
        "PUT",
        "/api/v1/daemons/upgrade",
        r#"{"nydusd_path":"/bin/false"}"#,
    );
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("it serves on"), "{body}");
    assert_eq!(only_nydusd(&snap), upgraded, "the daemon was replaced");
    assert!(
        looper.rounds(5, Duration::from_secs(30)),
        "the loop stalled after a refused upgrade"
    );
    let (status, body) = unix_http(&system, "GET", "/api/v1/daemons", "");
    assert_eq!(status, 200);
    assert!(body.contains("\"supervised\":true"), "{body}");
    let (status, body) = unix_http(
        &system,
        "PUT",
        "/api/v1/daemons/upgrade",
        r#"{"nydusd_path":"relative/nydusd"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not an absolute path"), "{body}");
    // Files were passed through by the last daemon (their chunks verified by it, after
    // the page cache was dropped) while the loop ran.
    let passed = wait_until(Duration::from_secs(30), || {
        drop_caches();
        looper.rounds(1, Duration::from_secs(10));
        super::snapshotter::prom_sum(
            &super::snapshotter::nydusd_metrics(&snap),
            "fs_passthrough_opens",
        ) > 0
    });
    assert!(
        passed,
        "no open passed through after the upgrade:\n{}",
        logs(&snap)
    );
    looper.stop(&ctd);
    let failures = looper.failures();
    assert!(
        failures.is_empty(),
        "failed rounds: {failures:?}\n{}",
        snap.log_text()
    );
    println!(
        "[{mode}] {} rounds through 3 kills and a live upgrade, none failed; longest gap \
         between rounds {:?}",
        looper.seen.len(),
        looper.longest_gap()
    );

    // 3. New containers start from the image; no mount or daemon leaked.
    let out = ctd.run(
        &image,
        &format!("after-{mode}"),
        &["sh", "-c", "sha256sum -c -s /data/warm.sums"],
    );
    assert!(out.status.success());
    only_nydusd(&snap);
    assert_eq!(snap.fuse_mounts().len(), 1, "{:?}", snap.fuse_mounts());

    // 4. A snapshotter restart (SIGKILL) takes the sessions it held with it: the one it
    // starts asks the running daemon for its session again, and a failover after that
    // works as before.
    let mut looper = Looper::start(&ctd, &image, &format!("loop2-{mode}"), dir);
    assert!(
        looper.rounds(2, Duration::from_secs(60)),
        "loop2 did not start"
    );
    snap.kill();
    let logged = snap.log_text().len();
    snap.up();
    assert!(
        ctd.reaches_snapshotter(),
        "containerd did not reach the restarted snapshotter"
    );
    let later = |snap: &NydusSnapshotter| snap.log_text()[logged..].to_string();
    assert!(
        later(&snap).contains("holding its FUSE session again"),
        "{}",
        logs(&snap)
    );
    kill_pid(only_nydusd(&snap));
    assert!(
        wait_until(Duration::from_secs(20), || later(&snap)
            .contains("failover done")),
        "no failover after the snapshotter's restart:\n{}",
        logs(&snap)
    );
    assert!(
        looper.rounds(5, Duration::from_secs(30)),
        "the loop stalled after a failover by the restarted snapshotter"
    );
    assert!(
        looper.failures().is_empty(),
        "failed rounds: {:?}",
        looper.failures()
    );

    // 5. The supervisor gone too: the snapshotter killed, then nydusd. Nothing holds
    // the session: the kernel ends it, and the running container's reads fail at once
    // (no hang). The snapshotter, back, mounts the image again for new containers.
    snap.kill();
    let t0 = Instant::now();
    kill_pid(only_nydusd(&snap));
    let ended = wait_until(Duration::from_secs(20), || {
        while let Ok(l) = looper.lines.try_recv() {
            looper.seen.push(l);
        }
        !looper.failures().is_empty() || looper.child.try_wait().unwrap().is_some()
    });
    assert!(
        ended,
        "with its nydusd and the snapshotter dead, the container's reads hung"
    );
    println!(
        "[{mode}] nydusd and the snapshotter dead: the container's reads failed {:?} after the kill",
        t0.elapsed()
    );
    looper.stop(&ctd);
    snap.up();
    assert!(
        ctd.reaches_snapshotter(),
        "containerd did not reach the restarted snapshotter"
    );
    let out = ctd.run(
        &image,
        &format!("after2-{mode}"),
        &["sh", "-c", "sha256sum -c -s /data/warm.sums"],
    );
    assert!(out.status.success(), "{}", snap.log_text());
    drop(ctd);
    drop(snap);
}

#[test]
fn containers_read_through_nydusd_failovers_and_a_live_upgrade_dedicated() {
    snapshotter_failover("dedicated");
}

#[test]
fn containers_read_through_nydusd_failovers_and_a_live_upgrade_shared() {
    snapshotter_failover("shared");
}
