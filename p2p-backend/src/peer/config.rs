//! The peer's YAML config, with dfdaemon's field names where they exist, and the
//! dynconfig file that lists the schedulers.
//!
//! ```yaml
//! host:
//!   ip: 10.0.0.7             # the address other peers and the scheduler reach it at
//!   hostname: node-7         # the host id is "<ip>-<hostname>" ("-seed" for seed peers)
//! upload:
//!   server:
//!     port: 4000             # dfdaemon.v2.DfdaemonUpload and grpc.health.v1, on host.ip
//!   rateLimit: 200MiB        # bytes per second served to other peers (none: no limit)
//! storage:
//!   dir: /var/lib/p2p-peer   # pieces, one directory per task
//!   server:
//!     tcpPort: 4005          # Vortex piece transfer, on host.ip
//! proxy:
//!   server:
//!     port: 4001             # the HTTP proxy, on host.ip
//!     basicAuth:             # when given, every request to the proxy (CONNECT too, all
//!       username: node       # but those for its own /healthy) must carry these credentials
//!       password: secret     # (Proxy-Authorization: Basic, or dfdaemon's Authorization)
//!   rules:
//!     - regex: 'blobs/sha256.*'   # GETs of matching URLs go through the swarm
//!   registryMirror:
//!     addr: http://10.0.0.2:5000   # a mirror request (no host in its URI: containerd's
//!                            # hosts.toml) is for this registry; containerd's ns= names
//!                            # the registry too (https unless it is this one)
//!   prefetchRateLimit: 100MiB # a range read fetches the rest of its task in the
//!                            # background, at most this fast over all tasks (none: no
//!                            # limit); pieces a client waits on always go first
//! seedPeer:
//!   enable: false            # a seed peer fetches from the origin when the scheduler
//!                            # asks it (DfdaemonUpload/DownloadTask)
//! scheduler:
//!   announceInterval: 5s     # how often the host is announced to every scheduler
//! dynconfig:
//!   refreshInterval: 10s     # how often the --dynconfig file is read again
//! metrics:
//!   server:
//!     port: 4002             # Prometheus text at GET /metrics, on host.ip
//! backToSource:
//!   dockerConfig: /etc/p2p-peer/config.json   # credentials per registry, for this
//!                            # peer's own requests to the origin (a seed's)
//! gc:
//!   interval: 15m            # how often old tasks are removed
//!   policy:
//!     taskTTL: 6h            # a task not used for this long goes
//!     capacity: 100GiB       # beyond it, the least recently used tasks go
//! ```
//!
//! The `--dynconfig` file: `scheduler: {addrs: ["ip:port", ...]}`, as dfdaemon's.

use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// `host`.
    #[serde(default)]
    pub host: HostConfig,
    /// `upload`.
    #[serde(default)]
    pub upload: UploadConfig,
    /// `storage`.
    #[serde(default)]
    pub storage: StorageConfig,
    /// `proxy`.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// `seedPeer`.
    #[serde(default)]
    pub seed_peer: SeedPeerConfig,
    /// `scheduler`.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// `dynconfig`.
    #[serde(default)]
    pub dynconfig: DynconfigConfig,
    /// `metrics`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `backToSource`.
    #[serde(default)]
    pub back_to_source: BackToSourceConfig,
    /// `gc`.
    #[serde(default)]
    pub gc: GcConfig,
}

/// `gc`: old tasks leave storage.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GcConfig {
    /// `interval`: how often.
    #[serde(with = "crate::scheduler::config::human_duration")]
    pub interval: Duration,
    /// `policy`.
    pub policy: GcPolicy,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval: Duration::from_secs(900),
            policy: GcPolicy::default(),
        }
    }
}

/// `gc.policy`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GcPolicy {
    /// `taskTTL`: a task not used for this long is removed (dfdaemon's field).
    #[serde(rename = "taskTTL", with = "crate::scheduler::config::human_duration")]
    pub task_ttl: Duration,
    /// `capacity`: the bytes the tasks may hold; beyond it the least recently used
    /// go (none: no bound).
    #[serde(deserialize_with = "human_size")]
    pub capacity: Option<u64>,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            task_ttl: Duration::from_secs(6 * 3600),
            capacity: None,
        }
    }
}

/// `backToSource`: how this peer reaches the origin itself.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct BackToSourceConfig {
    /// `dockerConfig`: a docker `config.json` whose credentials (one per registry) this
    /// peer uses for registry blobs when the request brings none of its own — how a
    /// seed peer fetches from a private registry with its own credentials.
    pub docker_config: Option<PathBuf>,
}

/// `metrics`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsConfig {
    /// `server`: Prometheus text at `GET /metrics`.
    pub server: PortConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            server: PortConfig {
                ip: None,
                port: 4002,
            },
        }
    }
}

/// `host`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct HostConfig {
    /// `ip`.
    pub ip: IpAddr,
    /// `hostname`.
    pub hostname: String,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            hostname: "localhost".into(),
        }
    }
}

/// A server's port (its address is `host.ip`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortConfig {
    /// `ip`: accepted as dfdaemon writes it; it must equal `host.ip` when given.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// `port`.
    pub port: u16,
}

/// `upload`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct UploadConfig {
    /// `server`.
    pub server: PortConfig,
    /// `rateLimit`: bytes per second served to other peers, over all of them (a
    /// number, or with a unit: `KiB`, `MiB`, `GiB`, `KB`, `MB`, `GB`); none: no limit.
    #[serde(deserialize_with = "human_rate")]
    pub rate_limit: Option<u64>,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            server: PortConfig {
                ip: None,
                port: 4000,
            },
            rate_limit: None,
        }
    }
}

/// A size with an optional unit (`10GiB`, `200MB`, `4096`), in bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" | "Ki" => 1024.0,
        "MiB" | "Mi" => 1024.0 * 1024.0,
        "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 1.0).then_some(v as u64)
}

fn human_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    human_rate(d)
}

fn human_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Rate {
        N(u64),
        S(String),
    }
    match Option::<Rate>::deserialize(d)? {
        None => Ok(None),
        Some(Rate::N(n)) if n > 0 => Ok(Some(n)),
        Some(Rate::N(_)) => Err(serde::de::Error::custom("a size of 0")),
        Some(Rate::S(s)) => parse_size(&s).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{s}' is not a size (a number, or with KiB, MiB, GiB, KB, MB, GB)"
            ))
        }),
    }
}

/// `storage`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct StorageConfig {
    /// `dir`.
    pub dir: PathBuf,
    /// `server`.
    pub server: StorageServerConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: "/var/lib/p2p-peer".into(),
            server: StorageServerConfig::default(),
        }
    }
}

/// `storage.server`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct StorageServerConfig {
    /// `ip`: must equal `host.ip` when given.
    pub ip: Option<IpAddr>,
    /// `tcpPort`: Vortex over TCP.
    pub tcp_port: u16,
}

impl Default for StorageServerConfig {
    fn default() -> Self {
        StorageServerConfig {
            ip: None,
            tcp_port: 4005,
        }
    }
}

/// `proxy.server`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyServerConfig {
    /// `ip`: accepted as dfdaemon writes it; it must equal `host.ip` when given.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// `port`.
    pub port: u16,
    /// `basicAuth`: dfdaemon's field. When given, the proxy serves only requests that
    /// carry these credentials; without it, anyone who reaches `host.ip` may use it
    /// (to the origin and through `CONNECT` too), as dfdaemon's.
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
}

/// `proxy.server.basicAuth`: the credentials a client of the proxy must send, as
/// `Proxy-Authorization: Basic base64(username:password)` (what HTTP clients send to
/// a proxy: curl's `--proxy-user`), or as `Authorization` with the same value (what
/// dfdaemon checks). Neither goes on to the origin or to another peer.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BasicAuth {
    /// `username` (no `:`).
    pub username: String,
    /// `password`.
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl BasicAuth {
    /// Whether `value`, a header's, is `Basic` with these credentials.
    pub fn admits(&self, value: &[u8]) -> bool {
        use base64::Engine as _;
        let Ok(v) = std::str::from_utf8(value) else {
            return false;
        };
        let Some((scheme, encoded)) = v.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        use sha2::Digest as _;
        let want = format!("{}:{}", self.username, self.password);
        // Digests compared, not the values: the time taken tells nothing of how much of
        // a guess was right.
        sha2::Sha256::digest(&raw) == sha2::Sha256::digest(want.as_bytes())
    }
}

/// `proxy`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyConfig {
    /// `server`.
    pub server: ProxyServerConfig,
    /// `rules`.
    pub rules: Vec<ProxyRule>,
    /// `prefetchRateLimit`: bytes per second, over all tasks, for the pieces of a task
    /// that a range read started and that no reader waits on (the rest of the task,
    /// fetched in the background); none: no limit beyond the pieces' concurrency.
    #[serde(deserialize_with = "human_rate")]
    pub prefetch_rate_limit: Option<u64>,
    /// `registryMirror`.
    pub registry_mirror: RegistryMirrorConfig,
}

/// `proxy.registryMirror`: the registry that a request without a host (a registry
/// mirror's) is for.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryMirrorConfig {
    /// `addr`: `scheme://host[:port]`. Used when a request names no registry
    /// (`X-Dragonfly-Registry`, or containerd's `ns=`), and for its scheme when `ns=`
    /// names its host (`ns=` alone means `https`).
    pub addr: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            server: ProxyServerConfig {
                ip: None,
                port: 4001,
                basic_auth: None,
            },
            rules: vec![ProxyRule {
                regex: "blobs/sha256.*".into(),
            }],
            prefetch_rate_limit: None,
            registry_mirror: RegistryMirrorConfig::default(),
        }
    }
}

/// One of `proxy.rules`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyRule {
    /// `regex`: GETs of URLs (without query) matching it go through the swarm.
    pub regex: String,
}

/// `seedPeer`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SeedPeerConfig {
    /// `enable`.
    pub enable: bool,
    /// `type`: `super` (the only kind here).
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// `scheduler`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SchedulerConfig {
    /// `announceInterval`.
    #[serde(with = "crate::scheduler::config::human_duration")]
    pub announce_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            announce_interval: Duration::from_secs(5),
        }
    }
}

/// `dynconfig`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DynconfigConfig {
    /// `refreshInterval`.
    #[serde(with = "crate::scheduler::config::human_duration")]
    pub refresh_interval: Duration,
}

impl Default for DynconfigConfig {
    fn default() -> Self {
        DynconfigConfig {
            refresh_interval: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the config {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("the config {}: {e}", path.display()))
    }

    /// Parses and checks a config.
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        for (what, ip) in [
            ("upload.server.ip", c.upload.server.ip),
            ("storage.server.ip", c.storage.server.ip),
            ("proxy.server.ip", c.proxy.server.ip),
            ("metrics.server.ip", c.metrics.server.ip),
        ] {
            if ip.is_some_and(|ip| ip != c.host.ip) {
                return Err(format!(
                    "{what} must be host.ip ({}): the peer serves on one address",
                    c.host.ip
                ));
            }
        }
        if let Some(a) = &c.proxy.server.basic_auth {
            if a.username.is_empty() || a.username.contains(':') || a.password.is_empty() {
                return Err(
                    "proxy.server.basicAuth needs a username (without ':') and a password".into(),
                );
            }
        }
        for r in &c.proxy.rules {
            regex::Regex::new(&r.regex)
                .map_err(|e| format!("proxy.rules regex {:?}: {e}", r.regex))?;
        }
        Ok(c)
    }

    /// The host id the scheduler knows this peer by (dfdaemon's rule).
    pub fn host_id(&self) -> String {
        let id = format!("{}-{}", self.host.ip, self.host.hostname);
        if self.seed_peer.enable {
            format!("{id}-seed")
        } else {
            id
        }
    }
}

/// The `--dynconfig` file.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Dynconfig {
    /// `scheduler`.
    pub scheduler: DynScheduler,
}

/// `scheduler` of the dynconfig file.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DynScheduler {
    /// `addrs`: `ip:port` of each scheduler.
    pub addrs: Vec<String>,
}

impl Dynconfig {
    /// Reads the dynconfig file.
    pub fn load(path: &Path) -> Result<Dynconfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the dynconfig {}: {e}", path.display()))?;
        serde_yaml_ng::from_str(&text).map_err(|e| format!("the dynconfig {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxys_credentials_admit_only_themselves() {
        let c = Config::parse(
            "proxy:\n  server:\n    port: 4001\n    basicAuth:\n      username: node\n      password: s3cret\n",
        )
        .unwrap();
        let a = c.proxy.server.basic_auth.expect("basicAuth");
        // base64("node:s3cret"), any case of the scheme.
        assert!(a.admits(b"Basic bm9kZTpzM2NyZXQ="));
        assert!(a.admits(b"basic  bm9kZTpzM2NyZXQ= "));
        for bad in [
            &b"Bearer bm9kZTpzM2NyZXQ="[..],
            b"Basic bm9kZTpzM2NyZXQ",
            b"Basic bm9kZTpzM2NyZXR4",
            b"Basic bm9kZTo=",
            // node:s3creT: as long, one byte off.
            b"Basic bm9kZTpzM2NyZVQ=",
            b"Basic",
            b"bm9kZTpzM2NyZXQ=",
            b"\xff",
        ] {
            assert!(!a.admits(bad), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!format!("{a:?}").contains("s3cret"));
        for bad in [
            "proxy:\n  server:\n    port: 1\n    basicAuth:\n      username: a:b\n      password: p\n",
            "proxy:\n  server:\n    port: 1\n    basicAuth:\n      username: a\n      password: ''\n",
        ] {
            let e = Config::parse(bad).unwrap_err();
            assert!(e.contains("proxy.server.basicAuth"), "{e}");
        }
    }

    #[test]
    fn dfdaemon_shaped_configs_parse_and_bad_ones_say_why() {
        let c = Config::parse(
            "host:\n  ip: 127.0.0.9\n  hostname: n1\nupload:\n  server:\n    ip: 127.0.0.9\n    port: 4100\n\
             storage:\n  dir: /tmp/x\n  server:\n    tcpPort: 4105\nseedPeer:\n  enable: true\n  type: super\n\
             scheduler:\n  announceInterval: 1s\n",
        )
        .unwrap();
        assert_eq!(c.host_id(), "127.0.0.9-n1-seed");
        assert_eq!(c.upload.server.port, 4100);
        assert_eq!(c.scheduler.announce_interval, Duration::from_secs(1));
        assert_eq!(c.upload.rate_limit, None);
        let c = Config::parse(
            "upload:\n  rateLimit: 16MiB\ngc:\n  policy:\n    taskTTL: 2h\n    capacity: 1GiB\n",
        )
        .unwrap();
        assert_eq!(c.upload.rate_limit, Some(16 << 20));
        assert_eq!(c.gc.policy.task_ttl, Duration::from_secs(7200));
        assert_eq!(c.gc.policy.capacity, Some(1 << 30));
        let err = Config::parse("upload:\n  rateLimit: fast\n").unwrap_err();
        assert!(err.contains("not a size"), "{err}");
        let err = Config::parse(
            "host:\n  ip: 127.0.0.9\nupload:\n  server:\n    ip: 127.0.0.8\n    port: 1\n",
        )
        .unwrap_err();
        assert!(err.contains("upload.server.ip must be host.ip"), "{err}");
        let err = Config::parse("proxy:\n  rules:\n    - regex: '('\n").unwrap_err();
        assert!(err.contains("proxy.rules regex"), "{err}");
        let err = Config::parse("hots: {}\n").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }
}
