//! Guards that undo what a test set up — a loop device, a mount, a daemon — when they
//! are dropped, including when the test panics.
//!
//! Drop order matters: Rust drops locals in reverse order of declaration, so declare a
//! daemon's [`ChildGuard`] or a [`LoopDevice`] *before* the [`Mount`] that uses it;
//! the mount is then undone first.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

/// Runs `cmd` to completion and turns a failure into an error naming the command and
/// quoting its stderr.
fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let output = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", describe(cmd))))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(io::Error::other(format!(
            "{} failed ({}): {}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// `program arg1 arg2 ...`, for messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A file attached to a free loop device (`losetup -f --show`), detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` read-write to the first free loop device.
    pub fn attach(file: &Path) -> io::Result<Self> {
        Self::attach_with(file, false)
    }

    /// Attaches `file` read-only (`losetup -r`) to the first free loop device.
    pub fn attach_read_only(file: &Path) -> io::Result<Self> {
        Self::attach_with(file, true)
    }

    fn attach_with(file: &Path, read_only: bool) -> io::Result<Self> {
        let mut cmd = Command::new("losetup");
        if read_only {
            cmd.arg("-r");
        }
        cmd.args(["-f", "--show"]).arg(file);
        let output = run_checked(&mut cmd)?;
        let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !device.starts_with("/dev/") {
            return Err(io::Error::other(format!(
                "{} printed no device: {device:?}",
                describe(&cmd)
            )));
        }
        Ok(Self {
            device: PathBuf::from(device),
        })
    }

    /// The loop device, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.device
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = run_checked(Command::new("losetup").arg("-d").arg(&self.device)) {
            eprintln!("warning: {e}");
        }
    }
}

/// A mounted filesystem, lazily unmounted (`umount -l`) on drop.
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
}

impl Mount {
    /// Runs the mount command `cmd` (which mounts something on `target`) and guards the
    /// mount once it succeeded.
    pub fn run(cmd: &mut Command, target: &Path) -> io::Result<Self> {
        run_checked(cmd)?;
        Ok(Self::adopt(target))
    }

    /// `mount -t FSTYPE [-o OPTIONS] SOURCE TARGET`; `options` may be empty.
    ///
    /// For example a RAFS v6 bootstrap with one expanded blob on the kernel's EROFS:
    /// `Mount::kernel("erofs", bootstrap_loop.path(), dir, "ro,device=/dev/loop4")`.
    pub fn kernel(fstype: &str, source: &Path, target: &Path, options: &str) -> io::Result<Self> {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        cmd.arg(source).arg(target);
        Self::run(&mut cmd, target)
    }

    /// Guards a mount made by someone else on `target`, e.g. by a FUSE daemon (see
    /// [`is_mounted`] and [`wait_until`] to wait for it).
    pub fn adopt(target: &Path) -> Self {
        Self {
            target: target.to_path_buf(),
        }
    }

    /// The mount point.
    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = run_checked(Command::new("umount").arg("-l").arg(&self.target)) {
            eprintln!("warning: {e}");
        }
    }
}

/// A child process (typically a daemon) that is killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    reaped: bool,
}

impl ChildGuard {
    /// Spawns `cmd` and guards the child.
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot start {}: {e}", describe(cmd)))
        })?;
        Ok(Self::new(child))
    }

    /// Guards an already spawned child.
    pub fn new(child: Child) -> Self {
        Self {
            child,
            reaped: false,
        }
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child, e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    /// Stops the child gracefully: SIGTERM, then SIGKILL if it has not exited within
    /// `grace`. Returns its exit status.
    pub fn terminate(mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        let status = self.child.wait()?;
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // Killing a child that already exited (but is not reaped yet) is harmless.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` every 20 ms until it holds (returns `true`) or `timeout` passes
/// (returns `false`).
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `path` (absolute, as the mount table spells it) is a mount point, from
/// `/proc/self/mountinfo` (nydusd's client reads it the same way for the snapshotter).
/// Does not touch the path itself, so it never blocks on a dead FUSE mount.
pub fn is_mounted(path: &Path) -> bool {
    nydusd::client::launcher::is_mountpoint(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_mounted() {
        assert!(is_mounted(Path::new("/")));
        assert!(!is_mounted(Path::new("/no/such/mount/point")));
    }

    #[test]
    fn wait_until_times_out() {
        assert!(!wait_until(Duration::from_millis(50), || false));
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
    }

    #[test]
    fn child_guard_kills_on_drop() {
        let guard = ChildGuard::spawn(Command::new("sleep").arg("60")).unwrap();
        let pid = guard.id();
        drop(guard);
        // Reaped, so no /proc entry remains (or, at worst, a new process reused the id).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
    }

    #[test]
    fn child_guard_terminates_gracefully() {
        let guard = ChildGuard::spawn(Command::new("sleep").arg("60")).unwrap();
        let status = guard.terminate(Duration::from_secs(5)).unwrap();
        assert!(!status.success());
    }
}
