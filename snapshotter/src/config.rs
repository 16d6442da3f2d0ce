//! The snapshotter's TOML config: upstream nydus-snapshotter's field names
//! (`spec/upstream-interfaces.md` §7.5) for what is implemented, a few of ours (marked),
//! and every default documented. Fields this build does not know are logged as ignored,
//! naming each, so that an upstream config works and a typo is visible.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Upstream's default root.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus";
/// Upstream's default gRPC socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd-nydus/containerd-nydus-grpc.sock";

/// How images are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonMode {
    /// One nydusd per image, mounted at `<root>/snapshots/<meta id>/mnt`
    /// (`"dedicated"`, and upstream's default `"multiple"`).
    Dedicated,
    /// One nydusd for every image, at `<root>/mnt`; images at `<root>/mnt/<meta id>`.
    Shared,
}

/// What to do about a nydusd found dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverPolicy {
    /// Nothing: its images stay unserved until their snapshots are mounted again.
    None,
    /// Start a new nydusd for its images (new containers see them again; containers
    /// running over the dead mount keep failing).
    Restart,
    /// The snapshotter supervises each nydusd (`--supervisor`): when one dies, a
    /// successor takes its FUSE session over, and running containers only wait.
    Failover,
}

/// The whole config, with defaults applied.
#[derive(Clone, Debug)]
pub struct Config {
    /// `root`: metadata, snapshot directories, mountpoints, sockets, logs, cache.
    pub root: PathBuf,
    /// `address`: the gRPC socket containerd dials.
    pub address: PathBuf,
    /// `daemon_mode`.
    pub daemon_mode: DaemonMode,
    /// `cleanup_on_close`: stop every nydusd (and unmount) when the snapshotter exits.
    pub cleanup_on_close: bool,
    /// `daemon.nydusd_path`: default `nydusd` next to this binary, else from `PATH`.
    pub nydusd_path: PathBuf,
    /// `daemon.nydusd_config`: the JSON template of every image's nydusd config (the
    /// registry host, repository, auth and cache dir are filled in per image); default
    /// `daemons::DEFAULT_AMPLIFY_IO` and digest validation.
    pub nydusd_config: Option<PathBuf>,
    /// `daemon.threads_number`: FUSE threads per nydusd (0: nydusd's default).
    pub threads_number: usize,
    /// `daemon.recover_policy`: `none`, `restart` or `failover` (default `restart`).
    pub recover_policy: RecoverPolicy,
    /// `system.enable` and `system.address`: the system controller's HTTP socket
    /// (`GET /api/v1/daemons`, `PUT /api/v1/daemons/upgrade`); upstream's default
    /// address is `/run/containerd-nydus/system.sock`.
    pub system_address: Option<PathBuf>,
    /// `daemon.ready_timeout` (ours, seconds, default 30): how long a new nydusd may
    /// take to serve before Prepare fails.
    pub ready_timeout: Duration,
    /// `log.level` (default `info`).
    pub log_level: String,
    /// `metrics.address`: serve Prometheus text at `http://ADDRESS/metrics` (default:
    /// off).
    pub metrics_address: Option<String>,
    /// `remote.auth.docker_config` (ours): a docker `config.json` holding registry
    /// credentials (`auths.<host>.auth`); default `$DOCKER_CONFIG/config.json`, else
    /// `$HOME/.docker/config.json`.
    pub docker_config: PathBuf,
    /// `remote.auth.refresh_interval` (ours, seconds, default 10): how often the
    /// credentials file is read again; changed credentials go to the running daemons.
    pub auth_refresh: Duration,
    /// `cache_manager.disable` (default false): when false, cache blobs that no image
    /// references any more are deleted on Remove and Cleanup.
    pub cache_gc: bool,
    /// `cache_manager.cache_dir` (default `<root>/cache`): one cache for every daemon.
    pub cache_dir: PathBuf,
    /// `snapshot.enable_overlayfs_volatile`: add `volatile` to overlay mounts.
    pub overlay_volatile: bool,
}

#[derive(Deserialize, Default)]
struct Raw {
    version: Option<u32>,
    root: Option<PathBuf>,
    address: Option<PathBuf>,
    daemon_mode: Option<String>,
    cleanup_on_close: Option<bool>,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    remote: RawRemote,
    #[serde(default)]
    cache_manager: RawCacheManager,
    #[serde(default)]
    snapshot: RawSnapshot,
    #[serde(default)]
    system: RawSystem,
}

#[derive(Deserialize, Default)]
struct RawSystem {
    enable: Option<bool>,
    address: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
struct RawDaemon {
    nydusd_path: Option<PathBuf>,
    nydusd_config: Option<PathBuf>,
    threads_number: Option<usize>,
    recover_policy: Option<String>,
    fs_driver: Option<String>,
    ready_timeout: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RawLog {
    level: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawMetrics {
    address: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawRemote {
    #[serde(default)]
    auth: RawAuth,
}

#[derive(Deserialize, Default)]
struct RawAuth {
    docker_config: Option<PathBuf>,
    refresh_interval: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RawCacheManager {
    disable: Option<bool>,
    cache_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
struct RawSnapshot {
    enable_overlayfs_volatile: Option<bool>,
}

/// A config error naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config {file}: {reason}")]
pub struct ConfigError {
    file: String,
    reason: String,
}

impl Config {
    /// Reads `path` (or takes every default without one). Returns the config and the
    /// fields that were ignored.
    pub fn load(path: Option<&Path>) -> Result<(Config, Vec<String>), ConfigError> {
        let file = path.map_or("(defaults)".to_string(), |p| p.display().to_string());
        let err = |reason: String| ConfigError {
            file: file.clone(),
            reason,
        };
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| err(format!("reading: {e}")))?,
            None => String::new(),
        };
        Self::parse(&text).map_err(err)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<(Config, Vec<String>), String> {
        let mut ignored = Vec::new();
        let de = toml::Deserializer::new(text);
        let raw: Raw = serde_ignored::deserialize(de, |path| ignored.push(path.to_string()))
            .map_err(|e| e.to_string())?;
        if let Some(v) = raw.version {
            if v != 1 {
                return Err(format!("version = {v}: only version 1 is known"));
            }
        }
        let root = raw.root.unwrap_or_else(|| DEFAULT_ROOT.into());
        if !root.is_absolute() {
            return Err(format!(
                "root = {}: must be an absolute path",
                root.display()
            ));
        }
        let daemon_mode = match raw.daemon_mode.as_deref().unwrap_or("multiple") {
            "multiple" | "dedicated" => DaemonMode::Dedicated,
            "shared" => DaemonMode::Shared,
            other => {
                return Err(format!(
                    "daemon_mode = \"{other}\": not one of dedicated, multiple, shared (\"none\" is not built yet)"
                ))
            }
        };
        let d = raw.daemon;
        if let Some(fs) = d.fs_driver.as_deref() {
            if fs != "fusedev" {
                return Err(format!(
                    "daemon.fs_driver = \"{fs}\": only fusedev is built"
                ));
            }
        }
        let recover_policy = match d.recover_policy.as_deref().unwrap_or("restart") {
            "none" => RecoverPolicy::None,
            "restart" => RecoverPolicy::Restart,
            "failover" => RecoverPolicy::Failover,
            other => {
                return Err(format!(
                    "daemon.recover_policy = \"{other}\": not one of none, restart, failover"
                ))
            }
        };
        let nydusd_path = d.nydusd_path.unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|p| p.join("nydusd")))
                .filter(|p| p.exists())
                .unwrap_or_else(|| "nydusd".into())
        });
        let docker_config = raw.remote.auth.docker_config.unwrap_or_else(|| {
            p2p_backend::registry::docker_config_path()
                .unwrap_or_else(|| "/root/.docker/config.json".into())
        });
        let refresh = raw.remote.auth.refresh_interval.unwrap_or(10);
        if refresh == 0 {
            return Err("remote.auth.refresh_interval = 0: must be at least 1 (seconds)".into());
        }
        let ready = d.ready_timeout.unwrap_or(30);
        if ready == 0 {
            return Err("daemon.ready_timeout = 0: must be at least 1 (seconds)".into());
        }
        Ok((
            Config {
                cache_dir: raw
                    .cache_manager
                    .cache_dir
                    .unwrap_or_else(|| root.join("cache")),
                address: raw.address.unwrap_or_else(|| DEFAULT_ADDRESS.into()),
                root,
                daemon_mode,
                cleanup_on_close: raw.cleanup_on_close.unwrap_or(false),
                nydusd_path,
                nydusd_config: d.nydusd_config.filter(|p| !p.as_os_str().is_empty()),
                threads_number: d.threads_number.unwrap_or(0),
                recover_policy,
                system_address: raw.system.enable.unwrap_or(false).then(|| {
                    raw.system
                        .address
                        .filter(|a| !a.as_os_str().is_empty())
                        .unwrap_or_else(|| "/run/containerd-nydus/system.sock".into())
                }),
                ready_timeout: Duration::from_secs(ready),
                log_level: raw.log.level.unwrap_or_else(|| "info".into()),
                metrics_address: raw.metrics.address.filter(|a| !a.is_empty()),
                docker_config,
                auth_refresh: Duration::from_secs(refresh),
                cache_gc: !raw.cache_manager.disable.unwrap_or(false),
                overlay_volatile: raw.snapshot.enable_overlayfs_volatile.unwrap_or(false),
            },
            ignored,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_upstream_names() {
        let (c, ignored) = Config::parse("").unwrap();
        assert_eq!(c.root, Path::new(DEFAULT_ROOT));
        assert_eq!(c.daemon_mode, DaemonMode::Dedicated);
        assert_eq!(c.cache_dir, Path::new(DEFAULT_ROOT).join("cache"));
        assert!(c.cache_gc && ignored.is_empty());
        let (c, ignored) = Config::parse(
            "version = 1\nroot = \"/r\"\ndaemon_mode = \"shared\"\n[daemon]\nrecover_policy = \"none\"\nfs_driver = \"fusedev\"\n[cgroup]\nenable = true\n[snapshot]\nsync_remove = true\n",
        )
        .unwrap();
        assert_eq!(c.daemon_mode, DaemonMode::Shared);
        assert_eq!(c.recover_policy, RecoverPolicy::None);
        assert_eq!(c.system_address, None);
        let (c, _) =
            Config::parse("[daemon]\nrecover_policy = \"failover\"\n[system]\nenable = true\n")
                .unwrap();
        assert_eq!(c.recover_policy, RecoverPolicy::Failover);
        assert_eq!(
            c.system_address.as_deref(),
            Some(Path::new("/run/containerd-nydus/system.sock"))
        );
        assert_eq!(
            ignored,
            vec!["cgroup".to_string(), "snapshot.sync_remove".to_string()]
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        for (text, want) in [
            ("daemon_mode = \"bogus\"", "daemon_mode = \"bogus\""),
            ("root = \"rel\"", "root = rel"),
            ("[daemon]\nfs_driver = \"fscache\"", "daemon.fs_driver"),
            (
                "[daemon]\nrecover_policy = \"flush\"",
                "daemon.recover_policy",
            ),
            ("version = 2", "version = 2"),
            ("daemon_mode = 3", "daemon_mode"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
