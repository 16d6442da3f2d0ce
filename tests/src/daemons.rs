//! Running commands and FUSE daemons in tests: a checked command runner, dropping the
//! page cache, the nydusd
//! configuration with the `localfs` backend, and a daemon mounted and guarded.

use crate::guards::{is_mounted, wait_until, ChildGuard, Mount};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Writes dirty pages back and drops the page cache (as root), so that the next reads
/// reach their filesystem (a FUSE daemon, a disk) again.
///
/// # Panics
/// When `sync` fails or the caches cannot be dropped (not root).
pub fn drop_caches() {
    run_ok(&mut Command::new("sync"));
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping caches needs root");
}

/// Runs `cmd` to completion; panics, showing its status and both output streams, unless
/// it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A nydusd v1 JSON config (the shape upstream and ours accept): blobs from the
/// directory `blobs` (`localfs`), a `blobcache` in `cache`, digest validation as given.
pub fn localfs_config(blobs: &Path, cache: &Path, digest_validate: bool) -> String {
    nydusd::client::NydusdConfig::localfs(blobs, cache, digest_validate).to_json()
}

/// A FUSE daemon serving a mount; dropping it unmounts, then stops the daemon.
pub struct FuseDaemon {
    // Field order is drop order: unmount first, then kill the daemon.
    _mount: Mount,
    child: ChildGuard,
    /// The mount point.
    pub mnt: PathBuf,
}

impl FuseDaemon {
    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts `cmd` (a nydusd command line mounting on `mnt`) with its output in `log`, and
/// waits up to 20 s for the mount; panics with the log when it does not appear.
pub fn start_fuse_daemon(cmd: &mut Command, mnt: &Path, log: &Path) -> FuseDaemon {
    std::fs::create_dir_all(mnt).unwrap();
    let file = std::fs::File::create(log).unwrap();
    let child = ChildGuard::spawn(cmd.stdout(file.try_clone().unwrap()).stderr(file))
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        wait_until(Duration::from_secs(20), || is_mounted(mnt)),
        "{cmd:?} did not mount {}; log:\n{}",
        mnt.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
    FuseDaemon {
        _mount: Mount::adopt(mnt),
        child,
        mnt: mnt.to_path_buf(),
    }
}

/// Upstream nydusd 2.2 mounting `bootstrap` on `mnt` with `config` (a file), as a judge.
/// Digest validation must be off in `config`: 2.2 refuses it for RAFS v6.
pub fn start_upstream_nydusd(
    bootstrap: &Path,
    config: &Path,
    mnt: &Path,
    log: &Path,
) -> FuseDaemon {
    start_fuse_daemon(
        &mut upstream_nydusd_command(bootstrap, config, mnt),
        mnt,
        log,
    )
}

/// The command line of [`start_upstream_nydusd`], for a test to add flags to (then
/// started with [`start_fuse_daemon`]).
pub fn upstream_nydusd_command(bootstrap: &Path, config: &Path, mnt: &Path) -> Command {
    let mut cmd = Command::new(crate::upstream_bin("nydusd"));
    cmd.arg("--config")
        .arg(config)
        .arg("--bootstrap")
        .arg(bootstrap)
        .arg("--mountpoint")
        .arg(mnt)
        // 2.2's default (1,000,000) exceeds the hard limit of these machines.
        .args(["--rlimit-nofile", "0", "--log-level", "warn"]);
    cmd
}
