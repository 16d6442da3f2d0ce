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
    assert!(
        up && d.api.daemon_info().is_ok(),
        "nydusd {name} did not answer:\n{}",
        d.log_text()
    );
    d
}

/// The image's config text.
fn config_text(img: &Image) -> String {
    std::fs::read_to_string(img.config(r#","amplify_io":131072,"readahead_window":262144"#))
        .unwrap()
}

/// The FUSE connection of the mount at `mnt` (`/sys/fs/fuse/connections/<n>`), to abort
/// it should a reader hang (so that the test fails instead of hanging).
fn abort_connection(mnt: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
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
    let mut threads = Vec::new();
    // Every file but the cold ones, again and again: cached, soon passed through.
    for worker in 0..2 {
        let (root, files, seen, stop) = (
            root.to_path_buf(),
            files.clone(),
            seen.clone(),
            stop.clone(),
        );
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
        let (root, files, seen, stop) = (
            root.to_path_buf(),
            files.clone(),
            seen.clone(),
            stop.clone(),
        );
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
        let (root, files, seen, stop) = (
            root.to_path_buf(),
            files.clone(),
            seen.clone(),
            stop.clone(),
        );
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
        let (root, files, seen, stop) = (
            root.to_path_buf(),
            files.clone(),
            seen.clone(),
            stop.clone(),
        );
        threads.push(std::thread::spawn(move || {
            for (rel, expected) in files.iter().filter(|(r, _)| r.starts_with("cold/")) {
                let f = File::open(root.join(rel)).unwrap();
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
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sup_path = work.join("supervisor.sock");
    let supervisor = Supervisor::bind(&sup_path).unwrap();

    let first = start(work, &mnt, &sup_path, "0", false);
    let _mount = Mount::adopt(&mnt);
    let req = MountRequest {
        source: img.boot.display().to_string(),
        fs_type: "rafs".into(),
        config: config_text(&img),
        prefetch_files: None,
    };
    first.api.mount("/rafs/img/lowerdir", &req).unwrap();
    assert!(supervisor.has_session(), "nydusd handed no session over");
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

    let mut daemons = vec![first];
    let mut takeovers = Vec::new();
    for round in 1..=3 {
        let before = seen.reads.load(Ordering::Relaxed);
        assert!(
            wait_until(Duration::from_secs(20), || seen
                .reads
                .load(Ordering::Relaxed)
                > before + 200),
            "the readers made no progress before kill {round}"
        );
        let old = daemons.last_mut().unwrap();
        let killed = Instant::now();
        old.child.child_mut().kill().unwrap();
        old.child.child_mut().wait().unwrap();
        let next = start(work, &mnt, &sup_path, &round.to_string(), true);
        next.api
            .takeover()
            .unwrap_or_else(|e| panic!("takeover {round}: {e}\n{}", next.log_text()));
        next.api.start().unwrap();
        takeovers.push(killed.elapsed());
        assert_eq!(next.api.daemon_info().unwrap().state, "RUNNING");
        daemons.push(next);
    }
    let before = seen.reads.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(20), || seen
            .reads
            .load(Ordering::Relaxed)
            > before + 200),
        "the readers made no progress after the last takeover"
    );
    stop.store(true, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for t in threads {
            let _ = t.join();
        }
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let log = daemons.last().unwrap().log_text();
        abort_connection(&mnt);
        panic!("a reader hung after the failovers; last daemon's log:\n{log}");
    }
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

#[test]
fn bad_takeovers_are_refused_and_the_mount_serves_on() {
    require_root_tools(&["umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let src = work.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"served on").unwrap();
    let img = build(&src, work, &[]);
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sup_path = work.join("supervisor.sock");
    let supervisor = Supervisor::bind(&sup_path).unwrap();
    let first = start(work, &mnt, &sup_path, "0", false);
    let _mount = Mount::adopt(&mnt);
    let req = MountRequest {
        source: img.boot.display().to_string(),
        fs_type: "rafs".into(),
        config: config_text(&img),
        prefetch_files: None,
    };
    first.api.mount("/sub", &req).unwrap();
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
        assert!(err.contains("take a FUSE session over first"), "{err}");
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
    // A successor that cannot open the image's cache (its work_dir is a file now).
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let blocked = work.join("not-a-dir");
    std::fs::write(&blocked, b"").unwrap();
    let config = v["tree"]["mounts"][0]["config"].as_str().unwrap().replace(
        &img.cache.display().to_string(),
        &blocked.display().to_string(),
    );
    v["tree"]["mounts"][0]["config"] = config.into();
    let fuse = File::open("/dev/fuse").unwrap();
    let table = work.join("table");
    std::fs::write(&table, b"NYDOPEN1\0\0\0\0\0\0\0\0").unwrap();
    with_state(
        serde_json::to_vec(&v).unwrap(),
        vec![fuse, File::open(&table).unwrap()],
    );
    refused("mounting");

    drop(successor);
    drop(bad);
    first.api.exit().unwrap();
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(&mnt)));
    std::mem::forget(_mount);
}
