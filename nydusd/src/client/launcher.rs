//! Starting a nydusd, waiting until it serves, and stopping it.
//!
//! A [`Daemon`] is either started here ([`DaemonCommand::start`], its `Child` kept and
//! reaped) or adopted by pid and socket ([`Daemon::adopt`]), e.g. by a snapshotter that
//! restarted while its daemons went on serving. Either way it is stopped the same way:
//! the API's exit, then `SIGKILL` after a bound, then a lazy unmount of what it left.

use super::api::{ApiClient, MountRequest};
use super::ClientError;
use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a daemon is started: upstream nydusd's flags.
#[derive(Clone, Debug)]
pub struct DaemonCommand {
    /// The nydusd binary.
    pub nydusd: PathBuf,
    /// The FUSE mountpoint (`--mountpoint`).
    pub mountpoint: PathBuf,
    /// The API socket (`--apisock`).
    pub apisock: PathBuf,
    /// The image served at the mountpoint (`--bootstrap`); without it images are
    /// mounted through the API.
    pub bootstrap: Option<PathBuf>,
    /// The config of the `--bootstrap` image (`--config`).
    pub config: Option<PathBuf>,
    /// `--id`.
    pub id: Option<String>,
    /// `--log-file`; without it the daemon's stderr is inherited.
    pub log_file: Option<PathBuf>,
    /// `--log-level`.
    pub log_level: String,
    /// `--fuse-threads` (0: the daemon's default).
    pub threads: usize,
    /// `--supervisor`: the socket the daemon hands its FUSE session to.
    pub supervisor: Option<PathBuf>,
    /// `--upgrade`: start as a successor, taking the session from the supervisor.
    pub upgrade: bool,
    /// Flags added at the end.
    pub extra_args: Vec<OsString>,
    /// Start the daemon in a process group of its own, so that it outlives its starter
    /// (a snapshotter restart must not take its mounts down).
    pub detach: bool,
}

impl DaemonCommand {
    /// A command for `nydusd` serving `mountpoint` with its API on `apisock`.
    pub fn new(
        nydusd: impl Into<PathBuf>,
        mountpoint: impl Into<PathBuf>,
        apisock: impl Into<PathBuf>,
    ) -> DaemonCommand {
        DaemonCommand {
            nydusd: nydusd.into(),
            mountpoint: mountpoint.into(),
            apisock: apisock.into(),
            bootstrap: None,
            config: None,
            id: None,
            log_file: None,
            log_level: "info".into(),
            threads: 0,
            supervisor: None,
            upgrade: false,
            extra_args: Vec::new(),
            detach: false,
        }
    }

    /// The command line.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.nydusd);
        cmd.arg("--mountpoint")
            .arg(&self.mountpoint)
            .arg("--apisock")
            .arg(&self.apisock)
            .arg("--log-level")
            .arg(&self.log_level);
        if let Some(b) = &self.bootstrap {
            cmd.arg("--bootstrap").arg(b);
        }
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(id) = &self.id {
            cmd.arg("--id").arg(id);
        }
        if let Some(l) = &self.log_file {
            cmd.arg("--log-file").arg(l);
        }
        if self.threads > 0 {
            cmd.arg("--fuse-threads").arg(self.threads.to_string());
        }
        if let Some(s) = &self.supervisor {
            cmd.arg("--supervisor").arg(s);
        }
        if self.upgrade {
            cmd.arg("--upgrade");
        }
        cmd.args(&self.extra_args);
        if self.detach {
            cmd.process_group(0);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Starts the daemon (creating the mountpoint and the socket's directory). It is
    /// not serving yet: see [`Daemon::wait_running`].
    pub fn start(&self) -> Result<Daemon, ClientError> {
        let io = |what: String| move |e| ClientError::Io { what, source: e };
        // A successor's mountpoint is a mount whose daemon may be dead: looking at it
        // would wait for the successor itself.
        if !self.upgrade {
            std::fs::create_dir_all(&self.mountpoint).map_err(io(format!(
                "Creating mountpoint {}",
                self.mountpoint.display()
            )))?;
        }
        if let Some(dir) = self.apisock.parent() {
            std::fs::create_dir_all(dir)
                .map_err(io(format!("Creating socket directory {}", dir.display())))?;
        }
        // A stale socket of an earlier daemon would answer nothing and confuse waiting.
        let _ = std::fs::remove_file(&self.apisock);
        let mut cmd = self.command();
        if self.log_file.is_some() {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("Starting {}", self.nydusd.display())))?;
        Ok(Daemon {
            pid: child.id(),
            start_time: process_start_time(child.id()).unwrap_or(0),
            api: ApiClient::new(&self.apisock),
            mountpoint: self.mountpoint.clone(),
            log_file: self.log_file.clone(),
            child: Some(child),
        })
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// Its pid.
    pub pid: u32,
    /// When the process started (clock ticks after boot, `/proc/<pid>/stat` field 22):
    /// with the pid, what tells this daemon from a later process given the same pid.
    pub start_time: u64,
    /// Its API.
    pub api: ApiClient,
    /// Its FUSE mountpoint.
    pub mountpoint: PathBuf,
    log_file: Option<PathBuf>,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon started by someone else (an earlier process), known by pid, process start
    /// time and socket. If the pid now names another process (a reboot, a reused pid), the
    /// daemon counts as dead and is never signalled.
    pub fn adopt(
        pid: u32,
        start_time: u64,
        apisock: impl Into<PathBuf>,
        mountpoint: impl Into<PathBuf>,
    ) -> Daemon {
        Daemon {
            pid,
            start_time,
            api: ApiClient::new(apisock),
            mountpoint: mountpoint.into(),
            log_file: None,
            child: None,
        }
    }

    /// Whether the process is still running (a zombie is not).
    pub fn is_alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => pid_alive(self.pid) && process_start_time(self.pid) == Some(self.start_time),
        }
    }

    /// Waits until the daemon answers with state `RUNNING`, for at most `timeout`.
    /// Fails at once when it exits, with the end of its log.
    pub fn wait_running(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.wait_state(timeout, |s| s == "RUNNING")
    }

    /// Waits until the daemon's API answers, in any state (an `--upgrade` daemon waits
    /// in `INIT` for its takeover), for at most `timeout`.
    pub fn wait_api(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.wait_state(timeout, |_| true)
    }

    fn wait_state(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("its API socket never answered");
        loop {
            if !self.is_alive() {
                return Err(self.failure(format!("exited before serving ({last})")));
            }
            // Each question within what is left of the wait (a daemon that accepts and
            // never answers must not stretch it).
            let left = deadline.saturating_duration_since(Instant::now());
            let api = self
                .api
                .clone()
                .with_timeout(left.clamp(Duration::from_millis(100), Duration::from_secs(2)));
            match api.daemon_info() {
                Ok(info) if wanted(&info.state) => return Ok(()),
                Ok(info) => last = format!("state {}", info.state),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(self.failure(format!("was not serving after {timeout:?} ({last})")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Mounts an image at `mountpoint` (`/sub`) inside the daemon's mountpoint.
    pub fn mount(&self, mountpoint: &str, req: &MountRequest) -> Result<(), ClientError> {
        self.api.mount(mountpoint, req)
    }

    /// Unmounts the image at `mountpoint`.
    pub fn umount(&self, mountpoint: &str) -> Result<(), ClientError> {
        self.api.umount(mountpoint)
    }

    /// Stops the daemon: the API's exit, `SIGKILL` when it has not exited within
    /// `grace`, then a lazy unmount of its mountpoint if the mount is still there.
    pub fn stop(mut self, grace: Duration) -> Result<(), ClientError> {
        if !self.is_alive() {
            // Gone, or the pid is someone else's now: nothing to signal.
            if let Some(c) = &mut self.child {
                let _ = c.wait();
            }
            detach_mount(&self.mountpoint);
            let _ = std::fs::remove_file(self.api.socket());
            return Ok(());
        }
        let _ = self.api.clone().with_timeout(grace).exit();
        let deadline = Instant::now() + grace;
        while self.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let gone = self.sigkill_and_wait();
        detach_mount(&self.mountpoint);
        let _ = std::fs::remove_file(self.api.socket());
        if !gone {
            return Err(ClientError::Daemon {
                pid: self.pid,
                reason: "did not exit within 5 s of SIGKILL".into(),
            });
        }
        Ok(())
    }

    /// `SIGKILL` unless it is gone already, then waits until it is (reaped, when it is
    /// our child), for at most 5 s: a process stuck in the kernel does not hold its
    /// killer. Whether it is gone.
    fn sigkill_and_wait(&mut self) -> bool {
        if self.is_alive() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(self.pid as i32).expect("pid is positive"),
                rustix::process::Signal::KILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        !self.is_alive()
    }

    /// Kills the daemon with `SIGKILL` and waits until it is gone, leaving its mount
    /// (a successor takes the session over, see [`super::supervisor`]).
    pub fn kill(mut self) -> Result<(), ClientError> {
        if !self.sigkill_and_wait() {
            return Err(ClientError::Daemon {
                pid: self.pid,
                reason: "did not exit within 5 s of SIGKILL".into(),
            });
        }
        Ok(())
    }

    fn failure(&self, reason: String) -> ClientError {
        let tail = self
            .log_file
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|log| {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(5)..].join("\n")
            })
            .filter(|t| !t.is_empty());
        ClientError::Daemon {
            pid: self.pid,
            reason: match tail {
                Some(t) => format!("{reason}; its log ends:\n{t}"),
                None => reason,
            },
        }
    }
}

/// Whether `pid` names a live process (not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Lazily unmounts `path` if something is mounted there (a daemon killed by signal
/// leaves its FUSE mount behind, answering `ENOTCONN`).
pub fn detach_mount(path: &Path) {
    if is_mountpoint(path) {
        let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Whether `path` is a mountpoint (by `/proc/self/mountinfo`, compared as bytes: a
/// mount elsewhere whose path is not UTF-8 must not hide this one).
pub fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.split(|&b| b == b'\n')
        .filter_map(|l| l.split(|&b| b == b' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want)
}

/// When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat` field 22).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (in parentheses, which may hold anything): the
    // state is field 3, so the start time is the 20th of these.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Decodes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_exits_fails_the_wait_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "line 1\nerror: bootstrap is corrupt\n").unwrap();
        let mut cmd = DaemonCommand::new(
            "/bin/false",
            dir.path().join("mnt"),
            dir.path().join("s/api.sock"),
        );
        cmd.log_file = Some(log);
        let mut d = cmd.start().unwrap();
        let e = d
            .wait_running(Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exited before serving") && e.contains("bootstrap is corrupt"),
            "{e}"
        );
        assert!(dir.path().join("mnt").is_dir());
    }

    #[test]
    fn a_silent_daemon_times_out_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        // A process that never answers on the socket.
        let child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        let mut d = Daemon {
            pid: child.id(),
            start_time: process_start_time(child.id()).unwrap(),
            api: ApiClient::new(dir.path().join("api.sock")),
            mountpoint: dir.path().join("mnt"),
            log_file: None,
            child: Some(child),
        };
        let t = Instant::now();
        let e = d
            .wait_running(Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("was not serving after"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let (pid, start) = (d.pid, d.start_time);
        // Adopted with another start time, the same pid is not this daemon: not signalled.
        let mut other = Daemon::adopt(
            pid,
            start + 1,
            dir.path().join("api.sock"),
            dir.path().join("mnt"),
        );
        assert!(!other.is_alive());
        other.stop(Duration::from_millis(10)).unwrap();
        assert!(
            pid_alive(pid),
            "a process that is not the daemon was killed"
        );
        d.stop(Duration::from_millis(100)).unwrap();
        assert!(!pid_alive(pid));
    }

    #[test]
    fn mountinfo_escapes_are_read() {
        assert_eq!(unescape_mountinfo(b"/a\\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(br"/x\134y\"), b"/x\\y\\");
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
    }
}
