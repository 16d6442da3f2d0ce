//! Finding the binaries under test, upstream's judge binaries and the system tools.

use std::env;
use std::path::{Path, PathBuf};

/// Where `tests/run.sh` installs upstream Nydus 2.2 (`nydus-image`, `nydusd`,
/// `nydusctl`) when `NYDUS_UPSTREAM_BIN` is not set.
pub const UPSTREAM_BIN_DEFAULT: &str = "/var/cache/nydus-upstream-2.2/bin";

/// Directories searched for system tools besides `PATH` (root's tools live in `sbin`,
/// which a non-login `PATH` may lack).
const EXTRA_TOOL_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The path of the workspace binary `name`, built in the same profile as the running
/// test (`target/<profile>/<name>`, found from [`std::env::current_exe`]).
///
/// # Panics
/// When the binary does not exist: it is built by `cargo test --workspace` (or
/// `cargo build -p <crate>`), not by testing this crate alone.
pub fn bin(name: &str) -> PathBuf {
    let exe = env::current_exe().expect("cannot find the running test executable");
    let profile_dir = profile_dir(&exe)
        .unwrap_or_else(|| panic!("cannot find target/<profile> above {}", exe.display()));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "workspace binary {} is missing: build it first (`cargo build --release --workspace`, \
         or run `bash tests/run.sh`, which runs `cargo test --workspace --release`)",
        path.display()
    );
    path
}

/// `target/<profile>` for a test executable in `target/<profile>/deps/` (or directly in
/// `target/<profile>/`).
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    if dir.file_name()? == "deps" {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// The path of upstream Nydus 2.2's binary `name` (`nydus-image`, `nydusd`,
/// `nydusctl`), from the directory in `NYDUS_UPSTREAM_BIN`, else
/// [`UPSTREAM_BIN_DEFAULT`].
///
/// # Panics
/// When the binary does not exist, saying how to install it.
pub fn upstream_bin(name: &str) -> PathBuf {
    let dir = env::var_os("NYDUS_UPSTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(UPSTREAM_BIN_DEFAULT));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "upstream nydus binary {} is missing: run `bash tests/run.sh`, which installs \
         nydus-rs 2.2.0 there (or set NYDUS_UPSTREAM_BIN to a directory holding it)",
        path.display()
    );
    path
}

/// Asserts that the test runs as root and that every command in `tools` is found in
/// `PATH` (or in the `sbin` directories).
///
/// End-to-end tests call this first: on a machine that lacks what they need they fail
/// with one clear message instead of skipping silently.
///
/// # Panics
/// When not root, or naming every missing command.
pub fn require_root_tools(tools: &[&str]) {
    assert!(
        rustix::process::geteuid().is_root(),
        "this end-to-end test needs root (loop devices, mounts, mknod, chown): \
         run it as root, e.g. through `bash tests/run.sh`"
    );
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| find_tool(tool).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "commands needed by this test are missing: {}; run `bash tests/run.sh`, which \
         installs them (erofs-utils, fuse3, util-linux, ...)",
        missing.join(", ")
    );
}

/// The first executable named `tool` in `PATH` or the `sbin` directories.
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(EXTRA_TOOL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_skips_deps() {
        let exe = Path::new("/w/target/release/deps/integration-0123");
        assert_eq!(profile_dir(exe).unwrap(), Path::new("/w/target/release"));
        let exe = Path::new("/w/target/debug/tool");
        assert_eq!(profile_dir(exe).unwrap(), Path::new("/w/target/debug"));
    }

    #[test]
    fn finds_a_shell() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("no-such-tool-rafs-e2e").is_none());
    }
}
