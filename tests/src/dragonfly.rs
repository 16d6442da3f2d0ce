//! Real Dragonfly peers in tests: `dfdaemon` (dragonfly-client 1.5.10, built once into
//! `/var/cache/dragonfly-client` by `tests/run.sh`) on its own loopback address, with
//! its own ports, storage and logs, listing the schedulers it uses in a dynconfig file
//! (no manager); and our `p2p-scheduler`. Both are stopped when dropped.

use crate::bins::bin;
use crate::guards::{wait_until, ChildGuard};
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Where `tests/run.sh` installs dragonfly-client (override: `DRAGONFLY_ROOT`).
pub const DRAGONFLY_ROOT_DEFAULT: &str = "/var/cache/dragonfly-client";

/// The `dfdaemon` binary under test.
pub fn dfdaemon_bin() -> PathBuf {
    let root = std::env::var("DRAGONFLY_ROOT").unwrap_or_else(|_| DRAGONFLY_ROOT_DEFAULT.into());
    let bin = Path::new(&root).join("bin/dfdaemon");
    assert!(
        bin.exists(),
        "{} is missing: `bash tests/run.sh` builds dragonfly-client 1.5.10 there",
        bin.display()
    );
    bin
}

/// A loopback address no other test of this process uses (127.<pid>.<n>), so that
/// each daemon has its own ports: a dfdaemon's piece port stays taken for about a
/// minute after it stops.
pub fn fresh_loopback_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(2);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    format!("127.{}.{}.{}", 100 + pid % 150, n / 250, 2 + n % 250)
}

/// A fresh loopback address and the work directory `dir/<name>` of a peer (ours or a
/// dfdaemon), with its dynconfig file listing `schedulers`.
fn peer_dir(dir: &Path, name: &str, schedulers: &[String]) -> (String, PathBuf) {
    let ip = fresh_loopback_ip();
    let dir = dir.join(name);
    fs::create_dir_all(&dir).unwrap();
    let addrs: Vec<String> = schedulers.iter().map(|s| format!("\"{s}\"")).collect();
    fs::write(
        dir.join("dynconfig.yaml"),
        format!("scheduler:\n  addrs: [{}]\n", addrs.join(", ")),
    )
    .unwrap();
    (ip, dir)
}

/// A running dfdaemon.
pub struct Dfdaemon {
    child: Option<ChildGuard>,
    /// Its address.
    pub ip: String,
    /// Its work directory (config, storage, logs).
    pub dir: PathBuf,
}

impl Dfdaemon {
    /// Starts a dfdaemon on a fresh loopback address in `dir/<name>`, using the
    /// schedulers at `schedulers` (`ip:port`), announcing its host every second; waits
    /// until it is healthy.
    pub fn start(dir: &Path, name: &str, schedulers: &[String], seed: bool) -> Dfdaemon {
        let (ip, dir) = peer_dir(dir, name, schedulers);
        let seed_peer = if seed {
            "seedPeer:\n  enable: true\n  type: super\n"
        } else {
            ""
        };
        let d = dir.display();
        fs::write(
            dir.join("dfdaemon.yaml"),
            format!(
                "host:\n  hostname: {name}-{ip}\n  ip: {ip}\n\
                 server:\n  pluginDir: {d}/plugins\n  cacheDir: {d}/cache\n\
                 download:\n  server:\n    socketPath: {d}/dfdaemon.sock\n\
                 upload:\n  server:\n    ip: {ip}\n    port: 4000\n\
                 storage:\n  dir: {d}/storage\n  server:\n    ip: {ip}\n    tcpPort: 4005\n    quicPort: 4006\n\
                 proxy:\n  server:\n    ip: {ip}\n    port: 4001\n  rules:\n    - regex: 'blobs/sha256.*'\n\
                 health:\n  server:\n    ip: {ip}\n    port: 4003\n\
                 metrics:\n  server:\n    ip: {ip}\n    port: 4002\n\
                 stats:\n  server:\n    ip: {ip}\n    port: 4004\n\
                 scheduler:\n  announceInterval: 1s\n\
                 dynconfig:\n  refreshInterval: 2s\n\
                 {seed_peer}"
            ),
        )
        .unwrap();
        let console = fs::File::create(dir.join("console.log")).unwrap();
        let child = ChildGuard::spawn(
            Command::new(dfdaemon_bin())
                .arg("--config")
                .arg(dir.join("dfdaemon.yaml"))
                .arg("--dynconfig")
                .arg(dir.join("dynconfig.yaml"))
                .arg("--log-dir")
                .arg(dir.join("log"))
                .stdout(console.try_clone().unwrap())
                .stderr(console),
        )
        .unwrap();
        let mut me = Dfdaemon {
            child: Some(child),
            ip,
            dir,
        };
        let up = wait_until(Duration::from_secs(60), || {
            me.child_exited().is_none() && TcpStream::connect((me.ip.as_str(), 4001)).is_ok()
        });
        assert!(
            up,
            "dfdaemon {name} did not come up ({:?}); console:\n{}",
            me.child_exited(),
            me.log_tail()
        );
        me
    }

    fn child_exited(&mut self) -> Option<String> {
        match self.child.as_mut()?.try_wait() {
            Ok(Some(status)) => Some(format!("exited: {status}")),
            _ => None,
        }
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// Its HTTP proxy (`http://ip:4001`).
    pub fn proxy(&self) -> String {
        format!("http://{}:4001", self.ip)
    }

    /// The last lines of its console and log files, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        let mut files = vec![self.dir.join("console.log")];
        if let Ok(entries) = fs::read_dir(self.dir.join("log")) {
            files.extend(entries.flatten().map(|e| e.path()));
        }
        for f in files {
            if let Ok(text) = fs::read_to_string(&f) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(15)..];
                out.push_str(&format!("--- {}\n{}\n", f.display(), tail.join("\n")));
            }
        }
        out
    }

    /// Starts `curl` fetching `url` through this daemon's proxy into `out`, with
    /// `X-Dragonfly-Scheduling-Policy: always` (small tasks too go through the
    /// scheduler).
    pub fn spawn_fetch(&self, url: &str, out: &Path) -> ChildGuard {
        ChildGuard::spawn(
            Command::new("curl")
                .args(["-sS", "--fail", "--max-time", "300", "-x"])
                .arg(self.proxy())
                .args(["-H", "X-Dragonfly-Scheduling-Policy: always", "-o"])
                .arg(out)
                .arg(url)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .unwrap()
    }

    /// [`Dfdaemon::spawn_fetch`] with the body hashed, not stored.
    pub fn spawn_hashed_fetch(&self, url: &str) -> HashedFetch {
        HashedFetch::spawn(
            Command::new("curl")
                .args(["-sS", "--fail", "--max-time", "300", "-x"])
                .arg(self.proxy())
                .args(["-H", "X-Dragonfly-Scheduling-Policy: always"])
                .arg(url),
        )
    }

    /// Kills the daemon at once (`SIGKILL`), as a crash would.
    pub fn kill(&mut self) {
        kill_now(&mut self.child);
    }
}

impl Drop for Dfdaemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = c.terminate(Duration::from_secs(5));
        }
    }
}

/// A `curl` fetch whose body is hashed as it arrives and never stored: the swarm tests'
/// N copies of a large blob would otherwise take N × the blob of disk at once (a CI
/// machine ran out of space with eight 256 MiB copies next to nine peers' stores).
pub struct HashedFetch {
    curl: ChildGuard,
    hasher: std::thread::JoinHandle<std::io::Result<String>>,
}

impl HashedFetch {
    /// Starts `cmd` (a `curl` writing the body to stdout) and hashes what it writes.
    fn spawn(cmd: &mut Command) -> Self {
        let mut curl =
            ChildGuard::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped())).unwrap();
        let mut body = curl
            .child_mut()
            .stdout
            .take()
            .expect("curl's stdout is piped");
        let hasher = std::thread::spawn(move || {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = std::io::Read::read(&mut body, &mut buf)?;
                if n == 0 {
                    return Ok(hex::encode(h.finalize()));
                }
                h.update(&buf[..n]);
            }
        });
        HashedFetch { curl, hasher }
    }

    /// Waits for the fetch; returns the body's sha256 (hex). Panics with curl's error.
    pub fn finish(self, what: &str) -> String {
        let HashedFetch { curl, hasher } = self;
        finish_fetch(curl, what);
        hasher
            .join()
            .expect("the hashing thread panicked")
            .unwrap_or_else(|e| panic!("{what}: reading curl's output: {e}"))
    }
}

/// Waits for a fetch started by [`Dfdaemon::spawn_fetch`]; panics with curl's error.
pub fn finish_fetch(fetch: ChildGuard, what: &str) {
    let mut fetch = fetch;
    let ok = wait_until(Duration::from_secs(310), || {
        matches!(fetch.try_wait(), Ok(Some(_)))
    });
    assert!(ok, "{what}: curl did not finish");
    let status = fetch.try_wait().unwrap().unwrap();
    let mut err = String::new();
    if let Some(mut e) = fetch.child_mut().stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(status.success(), "{what}: curl failed ({status}): {err}");
}

/// A running `p2p-scheduler` on `ip:port`, with metrics on `ip:port+1`.
pub struct Scheduler {
    child: Option<ChildGuard>,
    /// `ip:port` of its gRPC server.
    pub addr: String,
    /// `ip:port` of its metrics.
    pub metrics_addr: String,
    /// Its config file.
    pub config: PathBuf,
    log: PathBuf,
}

impl Scheduler {
    /// Starts a scheduler on a fresh loopback address; `extra` is appended to the
    /// `scheduler:` section of its config (e.g. `"  seedPeerWaitTimeout: 5s\n"`).
    pub fn start(dir: &Path, name: &str, extra: &str) -> Scheduler {
        let ip = fresh_loopback_ip();
        let dir = dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("scheduler.yaml");
        fs::write(
            &config,
            format!(
                "server:\n  listenIP: {ip}\n  port: 8002\nscheduler:\n  candidateParentLimit: 4\n{extra}\
                 metrics:\n  enable: true\n  addr: {ip}:8003\n"
            ),
        )
        .unwrap();
        let mut s = Scheduler {
            child: None,
            addr: format!("{ip}:8002"),
            metrics_addr: format!("{ip}:8003"),
            config,
            log: dir.join("scheduler.log"),
        };
        s.restart();
        s
    }

    /// Starts it (again, after [`Scheduler::kill`]), appending to its log.
    pub fn restart(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            ChildGuard::spawn(
                Command::new(bin("p2p-scheduler"))
                    .arg("--config")
                    .arg(&self.config)
                    .args(["--log-level", "info"])
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
            )
            .unwrap(),
        );
        let addr = self.addr.clone();
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect(&addr)
                .is_ok()),
            "p2p-scheduler did not listen on {addr}:\n{}",
            self.log()
        );
    }

    /// Kills it at once (`SIGKILL`).
    pub fn kill(&mut self) {
        kill_now(&mut self.child);
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its Prometheus text.
    pub fn metrics(&self) -> String {
        scrape(&self.metrics_addr)
    }

    /// The value of one metric line (`name` with its labels, e.g.
    /// `scheduler_answers_total{kind="normal_task"}`), 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics(), name)
    }
}

/// The most resident memory process `pid` has had (`VmHWM`), in bytes; 0 when it is
/// gone.
pub fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Kills `child` at once (`SIGKILL`) and reaps it, if it runs.
fn kill_now(child: &mut Option<ChildGuard>) {
    if let Some(mut c) = child.take() {
        let _ = c.child_mut().kill();
        let _ = c.child_mut().wait();
    }
}

/// The Prometheus text served at `http://<addr>/metrics` (empty when none answers).
fn scrape(addr: &str) -> String {
    let out: Output = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of `name` (with its labels) in a Prometheus text, 0 when absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = c.terminate(Duration::from_secs(5));
        }
    }
}

/// A running `p2p-peer` (ours), laid out as [`Dfdaemon`] is: its own loopback address,
/// the same ports (upload 4000, proxy 4001, metrics 4002, Vortex 4005), storage and log
/// in `dir/<name>`, the schedulers in a dynconfig file.
pub struct OurPeer {
    child: Option<ChildGuard>,
    /// Its address.
    pub ip: String,
    /// Its work directory.
    pub dir: PathBuf,
    config: PathBuf,
}

impl OurPeer {
    /// Starts a peer on a fresh loopback address in `dir/<name>`, using the schedulers
    /// at `schedulers`, announcing its host every second; waits until it serves.
    pub fn start(dir: &Path, name: &str, schedulers: &[String], seed: bool) -> OurPeer {
        OurPeer::start_with(dir, name, schedulers, seed, "")
    }

    /// [`OurPeer::start`] with `extra` appended to its config (top-level YAML).
    pub fn start_with(
        dir: &Path,
        name: &str,
        schedulers: &[String],
        seed: bool,
        extra: &str,
    ) -> OurPeer {
        OurPeer::start_configured(dir, name, schedulers, seed, "", extra)
    }

    /// [`OurPeer::start`] with `proxy` added to its config's `proxy` section (lines
    /// indented by two spaces, e.g. `"  registryMirror:\n    addr: http://r\n"`).
    pub fn start_with_proxy(
        dir: &Path,
        name: &str,
        schedulers: &[String],
        seed: bool,
        proxy: &str,
    ) -> OurPeer {
        OurPeer::start_configured(dir, name, schedulers, seed, proxy, "")
    }

    fn start_configured(
        dir: &Path,
        name: &str,
        schedulers: &[String],
        seed: bool,
        proxy: &str,
        extra: &str,
    ) -> OurPeer {
        let (ip, dir) = peer_dir(dir, name, schedulers);
        let d = dir.display();
        let config = dir.join("peer.yaml");
        fs::write(
            &config,
            format!(
                "host:\n  hostname: {name}-{ip}\n  ip: {ip}\n\
                 upload:\n  server:\n    port: 4000\n\
                 storage:\n  dir: {d}/storage\n  server:\n    tcpPort: 4005\n\
                 proxy:\n  server:\n    port: 4001\n{proxy}\
                 metrics:\n  server:\n    port: 4002\n\
                 scheduler:\n  announceInterval: 1s\n\
                 dynconfig:\n  refreshInterval: 2s\n\
                 seedPeer:\n  enable: {seed}\n{extra}"
            ),
        )
        .unwrap();
        let mut me = OurPeer {
            child: None,
            ip,
            dir,
            config,
        };
        me.restart();
        me
    }

    /// Starts it (again, after [`OurPeer::kill`]), appending to its log.
    pub fn restart(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("peer.log"))
            .unwrap();
        self.child = Some(
            ChildGuard::spawn(
                Command::new(bin("p2p-peer"))
                    .arg("--config")
                    .arg(&self.config)
                    .arg("--dynconfig")
                    .arg(self.dir.join("dynconfig.yaml"))
                    .args(["--log-level", "info"])
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
            )
            .unwrap(),
        );
        let ip = self.ip.clone();
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect((
                ip.as_str(),
                4001
            ))
            .is_ok()),
            "p2p-peer did not listen on {ip}:4001:\n{}",
            self.log()
        );
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// Its HTTP proxy.
    pub fn proxy(&self) -> String {
        format!("http://{}:4001", self.ip)
    }

    /// Its config file (edit it, then [`OurPeer::kill`] and [`OurPeer::restart`]).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("peer.log")).unwrap_or_default()
    }

    /// Waits (at most 20 s) until its download of task `hex` has ended, its pieces
    /// recorded on disk: the peer records pieces in batches, so a kill before that may
    /// lose the record of the last ones (they would be fetched again).
    pub fn wait_task_recorded(&self, hex: &str) {
        let done = format!("task {hex}: complete in");
        assert!(
            // A blob read by nydusd is checked whole up to 30 s after it stops.
            wait_until(Duration::from_secs(40), || self.log().contains(&done)),
            "{}'s download of {hex} did not end:\n{}",
            self.dir.display(),
            self.log()
        );
    }

    /// Its Prometheus text.
    pub fn metrics(&self) -> String {
        scrape(&format!("{}:4002", self.ip))
    }

    /// Starts `curl` fetching `url` through this peer's proxy into `out` (`range`: a
    /// `Range` header value).
    pub fn spawn_fetch(&self, url: &str, out: &Path, range: Option<&str>) -> ChildGuard {
        let range = range.map(|r| format!("Range: {r}"));
        self.spawn_fetch_with(url, out, range.as_slice())
    }

    /// [`OurPeer::spawn_fetch`] with these request headers (`Name: value`).
    pub fn spawn_fetch_with(&self, url: &str, out: &Path, headers: &[String]) -> ChildGuard {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail", "--max-time", "300", "-x"])
            .arg(self.proxy())
            .arg("-o")
            .arg(out);
        for h in headers {
            cmd.args(["-H", h]);
        }
        ChildGuard::spawn(cmd.arg(url).stdout(Stdio::null()).stderr(Stdio::piped())).unwrap()
    }

    /// Writes to `path` a snapshotter's nydusd config template (`[daemon] nydusd_config`)
    /// whose registry backend reads through this peer (upstream's `proxy` section, `ping_url`
    /// its `/healthy`, `fallback` as given), digests validated.
    pub fn write_nydusd_template(&self, path: &Path, fallback: bool) {
        fs::write(
            path,
            format!(
                r#"{{"device":{{"backend":{{"type":"registry","config":{{"host":"","repo":"",
                "timeout":30,"proxy":{{"url":"{p}","ping_url":"{p}/healthy","fallback":{fallback}}}}}}},
                "cache":{{"type":"blobcache","config":{{}}}}}},"mode":"direct",
                "digest_validate":true,"enable_xattr":true}}"#,
                p = self.proxy()
            ),
        )
        .unwrap();
    }

    /// [`OurPeer::spawn_fetch`] of the whole blob with the body hashed, not stored.
    pub fn spawn_hashed_fetch(&self, url: &str) -> HashedFetch {
        HashedFetch::spawn(
            Command::new("curl")
                .args(["-sS", "--fail", "--max-time", "300", "-x"])
                .arg(self.proxy())
                .arg(url),
        )
    }

    /// Kills it at once (`SIGKILL`).
    pub fn kill(&mut self) {
        kill_now(&mut self.child);
    }
}

impl Drop for OurPeer {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = c.terminate(Duration::from_secs(5));
        }
    }
}
