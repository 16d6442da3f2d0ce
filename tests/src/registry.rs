//! A private Debian `docker-registry` (distribution 2.8) on a free loopback port, or on
//! an address inside a network namespace of the test's own ([`Registry::start_in_netns`]).

use crate::daemons::run_ok;
use crate::guards::{wait_until, ChildGuard};
use crate::netns::NetNs;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A docker-registry serving `127.0.0.1:<free port>` from a storage directory of its own.
///
/// It is stopped when dropped, and can be stopped ([`Registry::down`]) and started again
/// ([`Registry::up`]) on the same port and storage, to simulate an outage.
pub struct Registry {
    child: Option<ChildGuard>,
    config: PathBuf,
    /// The namespace it runs in (`None`: the root namespace).
    netns: Option<String>,
    /// `127.0.0.1:PORT`, the registry's host part of image references.
    pub addr: String,
    /// Its output: the access log (one line per request, Apache's combined format).
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Registry {
    /// Starts a registry whose storage lives in a temporary directory removed on drop.
    ///
    /// # Panics
    /// When the registry does not listen within 10 s.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().expect("temporary directory for the registry");
        let mut r = Registry::start_in(dir.path(), "");
        r._dir = Some(dir);
        r
    }

    /// Starts a registry with its config and storage in `dir`. `extra` is appended to the
    /// generated YAML config as top-level sections (e.g. an `auth:` section); a
    /// `storage:` entry can be added through `extra_storage` in [`Registry::start_with`].
    ///
    /// # Panics
    /// When the registry does not listen within 10 s.
    pub fn start_in(dir: &Path, extra: &str) -> Registry {
        Registry::start_with(dir, "", extra)
    }

    /// Like [`Registry::start_in`], with `extra_storage` (indented YAML lines, e.g.
    /// `"  maintenance:\n    readonly:\n      enabled: true\n"`) added to the `storage:`
    /// section.
    ///
    /// # Panics
    /// When the registry does not listen within 10 s.
    pub fn start_with(dir: &Path, extra_storage: &str, extra: &str) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("a free loopback port")
            .local_addr()
            .expect("its address")
            .port();
        Registry::start_at(dir, extra_storage, extra, format!("127.0.0.1:{port}"), None)
    }

    /// A registry inside the network namespace `ns`, listening on its address, port 5000
    /// (the namespace is the test's own, so the port is free), with its config and
    /// storage in `dir`. Clients in the root namespace reach it at [`Registry::addr`]; it
    /// must be dropped before `ns`.
    ///
    /// # Panics
    /// When the registry does not listen within 10 s.
    pub fn start_in_netns(dir: &Path, ns: &NetNs) -> Registry {
        let addr = format!("{}:5000", ns.addr());
        Registry::start_at(dir, "", "", addr, Some(ns.name().to_string()))
    }

    fn start_at(
        dir: &Path,
        extra_storage: &str,
        extra: &str,
        addr: String,
        netns: Option<String>,
    ) -> Registry {
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 {extra_storage}http:\n  addr: {addr}\n{extra}",
                dir.join("registry-data").display()
            ),
        )
        .expect("writing the registry config");
        let mut r = Registry {
            child: None,
            log: dir.join("registry.log"),
            config,
            netns,
            addr,
            _dir: None,
        };
        r.up();
        r
    }

    /// Starts the registry (again) on its port and storage.
    ///
    /// # Panics
    /// When it cannot be started or does not listen within 10 s.
    pub fn up(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => crate::netns::exec_in(ns, "docker-registry"),
            None => Command::new("docker-registry"),
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the registry log");
        self.child = Some(
            ChildGuard::spawn(
                cmd.arg("serve")
                    .arg(&self.config)
                    .stdout(log.try_clone().expect("cloning the log file"))
                    .stderr(Stdio::null()),
            )
            .expect("starting docker-registry (package docker-registry)"),
        );
        let addr = self.addr.clone();
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(&addr)
                .is_ok()),
            "docker-registry did not listen on {addr}"
        );
    }

    /// The registry's configuration file (read again by [`Registry::up`]).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Stops the registry; its storage is kept for [`Registry::up`].
    pub fn down(&mut self) {
        drop(self.child.take());
    }

    /// The requests served so far, from the registry's own access log.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter_map(AccessEntry::parse).collect()
    }

    /// Waits until the registry has served no request for 2 s (at most `limit`): e.g.
    /// a swarm's background fetches are over. Panics if it never goes quiet.
    pub fn wait_quiet(&self, limit: Duration) {
        let mut last = self.access_log().len();
        let quiet = wait_until(limit, || {
            std::thread::sleep(Duration::from_secs(2));
            let now = self.access_log().len();
            std::mem::replace(&mut last, now) == now
        });
        assert!(quiet, "the registry never went quiet in {limit:?}");
    }

    /// Uploads `file` as blob `sha256:<hex>` of `repo` (POST for a session, then one PUT).
    ///
    /// # Panics
    /// When the registry refuses either request.
    pub fn push_blob(&self, repo: &str, hex: &str, file: &Path) {
        let out = Command::new("curl")
            .args(["-fsS", "-X", "POST", "-D", "-", "-o", "/dev/null"])
            .arg(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .output()
            .expect("running curl");
        assert!(out.status.success(), "{out:?}");
        let headers = String::from_utf8_lossy(&out.stdout);
        let location = headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no Location in {headers}"));
        let url = if location.starts_with("http") {
            location
        } else {
            format!("http://{}{location}", self.addr)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        run_ok(
            Command::new("curl")
                .args([
                    "-fsS",
                    "-X",
                    "PUT",
                    "-H",
                    "Content-Type: application/octet-stream",
                ])
                // Streamed from the file (`--data-binary @` reads it all into memory
                // first, and fails for blobs of more than 2 GiB).
                .arg("-T")
                .arg(file)
                .arg(format!("{url}{sep}digest=sha256:{hex}")),
        );
    }
}

/// One line of the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request path (with query).
    pub path: String,
    /// The response status.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
}

impl AccessEntry {
    /// Parses `... "GET /v2/x/blobs/sha256:ab HTTP/1.1" 206 4096 "-" "ua"`.
    fn parse(line: &str) -> Option<AccessEntry> {
        let (_, rest) = line.split_once('"')?;
        let (request, rest) = rest.split_once('"')?;
        let mut req = request.split_whitespace();
        let method = req.next()?.to_string();
        let path = req.next()?.to_string();
        let mut nums = rest.split_whitespace();
        let status = nums.next()?.parse().ok()?;
        let bytes = nums.next().and_then(|b| b.parse().ok()).unwrap_or(0);
        Some(AccessEntry {
            method,
            path,
            status,
            bytes,
        })
    }

    /// The blob digest (`sha256:...`) of a `/v2/<repo>/blobs/<digest>` request.
    pub fn blob(&self) -> Option<&str> {
        let (_, digest) = self.path.split_once("/blobs/")?;
        (!digest.starts_with("uploads")).then_some(digest.split('?').next().unwrap_or(digest))
    }
}
