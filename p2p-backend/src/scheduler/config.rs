//! The scheduler's YAML config, with Dragonfly's scheduler field names where they exist.
//!
//! ```yaml
//! server:
//!   listenIP: 0.0.0.0        # address the gRPC server binds
//!   advertiseIP: 10.0.0.5    # address peers are told (logs only here: dfdaemons find
//!                            # schedulers through their dynconfig file)
//!   port: 8002               # gRPC port (Dragonfly's default)
//! scheduler:
//!   candidateParentLimit: 4  # parents per answer
//!   retryLimit: 5            # answers per AnnouncePeer stream (dfdaemon's maxScheduleCount)
//!   backToSourceCount: 200   # ordinary peers per task that may go to the origin when no
//!                            # seed peer can serve
//!   peerBackToSource: false  # true: ordinary peers go to the origin instead of waiting
//!                            # for a seed peer (the origin then serves more than one copy)
//!   seedPeerWaitTimeout: 20s # how long a child waits for a triggered seed peer (a
//!                            # first answer waits at most 8 s: dfdaemon gives up at 10)
//!   gc:
//!     hostGCInterval: 1m     # how often stale hosts and failed peers are dropped
//!     hostTTL: 1h            # a host not announced for this long is dropped
//! seedPeer:
//!   enable: true             # trigger seed peers (DfdaemonUpload/DownloadTask)
//! metrics:
//!   enable: true
//!   addr: 127.0.0.1:8000     # Prometheus text at GET /metrics
//! ```

use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// The whole config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// The gRPC server.
    #[serde(default, deserialize_with = "null_as_default")]
    pub server: ServerConfig,
    /// Scheduling rules.
    #[serde(default, deserialize_with = "null_as_default")]
    pub scheduler: SchedulingConfig,
    /// Seed peers.
    #[serde(default, deserialize_with = "null_as_default")]
    pub seed_peer: SeedPeerConfig,
    /// Prometheus metrics.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metrics: MetricsConfig,
}

/// A section left empty (`scheduler:` with every key commented out is YAML null)
/// takes the defaults.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `server`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerConfig {
    /// `listenIP`: the address bound.
    #[serde(rename = "listenIP")]
    pub listen_ip: IpAddr,
    /// `advertiseIP`: the address peers reach (defaults to `listenIP`).
    #[serde(rename = "advertiseIP")]
    pub advertise_ip: Option<IpAddr>,
    /// `port`.
    pub port: u16,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            advertise_ip: None,
            port: 8002,
        }
    }
}

impl ServerConfig {
    /// The address the gRPC server binds.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen_ip, self.port)
    }
}

/// `scheduler`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SchedulingConfig {
    /// Parents handed out per answer.
    pub candidate_parent_limit: usize,
    /// Answers per `AnnouncePeer` stream; dfdaemon stops listening after 5.
    pub retry_limit: u32,
    /// Ordinary peers per task that may go back to the origin when no seed can serve.
    pub back_to_source_count: u32,
    /// Whether ordinary peers go to the origin instead of waiting for a seed peer.
    pub peer_back_to_source: bool,
    /// How long a child waits for a seed peer the scheduler triggered.
    #[serde(with = "human_duration")]
    pub seed_peer_wait_timeout: Duration,
    /// Garbage collection.
    #[serde(deserialize_with = "null_as_default")]
    pub gc: GcConfig,
}

/// `scheduler.gc`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GcConfig {
    /// How often stale hosts, their peers and failed peers are dropped.
    #[serde(rename = "hostGCInterval", with = "human_duration")]
    pub host_gc_interval: Duration,
    /// A host not announced for this long is dropped.
    #[serde(rename = "hostTTL", with = "human_duration")]
    pub host_ttl: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            host_gc_interval: Duration::from_secs(60),
            host_ttl: Duration::from_secs(3600),
        }
    }
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        SchedulingConfig {
            candidate_parent_limit: 4,
            retry_limit: 5,
            back_to_source_count: 200,
            peer_back_to_source: false,
            seed_peer_wait_timeout: Duration::from_secs(20),
            gc: GcConfig::default(),
        }
    }
}

/// `seedPeer`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SeedPeerConfig {
    /// Whether seed peers are triggered to fetch tasks no peer has.
    pub enable: bool,
}

impl Default for SeedPeerConfig {
    fn default() -> Self {
        SeedPeerConfig { enable: true }
    }
}

/// `metrics`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsConfig {
    /// Whether to serve them.
    pub enable: bool,
    /// Where (`GET /metrics`).
    pub addr: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enable: false,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8000),
        }
    }
}

impl Config {
    /// Reads a YAML config; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading config {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Parses YAML text (empty text is the default config).
    pub fn parse(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        if config.scheduler.candidate_parent_limit == 0 {
            return Err("scheduler.candidateParentLimit must be at least 1".into());
        }
        if config.scheduler.retry_limit == 0 {
            return Err("scheduler.retryLimit must be at least 1".into());
        }
        let sch = &config.scheduler;
        if sch.gc.host_gc_interval.is_zero() || sch.gc.host_ttl.is_zero() {
            return Err("scheduler.gc.hostGCInterval and hostTTL must be more than 0".into());
        }
        let day = Duration::from_secs(24 * 3600);
        if sch.seed_peer_wait_timeout > Duration::from_secs(3600)
            || sch.gc.host_gc_interval > day
            || sch.gc.host_ttl > 365 * day
        {
            return Err(
                "scheduler.seedPeerWaitTimeout is at most 1h, gc.hostGCInterval at most 24h, \
                 gc.hostTTL at most 365 days"
                    .into(),
            );
        }
        Ok(config)
    }
}

/// Durations as Dragonfly writes them: `500ms`, `20s`, `5m`, `1h`.
pub(crate) mod human_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{s}' is not a duration (a number with ms, s, m or h)"
            ))
        })
    }

    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let (n, unit) = s.split_at(split);
        let n: f64 = n.parse().ok()?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return None,
        };
        Duration::try_from_secs_f64(secs).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dragonfly_field_names_and_defaults() {
        let c = Config::parse(
            "server:\n  listenIP: 127.0.0.9\n  port: 9002\nscheduler:\n  candidateParentLimit: 2\n  retryLimit: 5\n  backToSourceCount: 1\n  peerBackToSource: false\n  seedPeerWaitTimeout: 1500ms\nmetrics:\n  enable: true\n  addr: 127.0.0.9:9000\n",
        )
        .unwrap();
        assert_eq!(c.server.listen_addr().to_string(), "127.0.0.9:9002");
        assert_eq!(c.scheduler.candidate_parent_limit, 2);
        assert_eq!(
            c.scheduler.seed_peer_wait_timeout,
            Duration::from_millis(1500)
        );
        assert!(c.seed_peer.enable);
        assert!(c.metrics.enable);
        assert_eq!(Config::parse("").unwrap().server.port, 8002);
        let c = Config::parse("scheduler:\n  gc:\n    hostTTL: 2m\n").unwrap();
        assert_eq!(c.scheduler.gc.host_ttl, Duration::from_secs(120));
        assert_eq!(c.scheduler.gc.host_gc_interval, Duration::from_secs(60));
        assert_eq!(c.scheduler.retry_limit, 5);
        let c = Config::parse("server:\nscheduler:\n  # all commented out\nmetrics:\n").unwrap();
        assert_eq!(c.server.port, 8002);
        assert!(Config::parse("scheduler:\n  gc:\n    hostTTL: 0s\n").is_err());
        assert!(Config::parse("scheduler:\n  seedPeerWaitTimeout: 100000h\n").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let e = Config::parse("server:\n  listenIp: 1.2.3.4\n").unwrap_err();
        assert!(e.contains("listenIp"), "{e}");
        let e = Config::parse(
            "scheduler:\n  candidateParentLimit: 4\n  retryLimit: 5\n  backToSourceCount: 1\n  peerBackToSource: false\n  seedPeerWaitTimeout: soon\n",
        )
        .unwrap_err();
        assert!(e.contains("soon"), "{e}");
        assert!(Config::parse("scheduler:\n  candidateParentLimit: 0\n  retryLimit: 5\n  backToSourceCount: 1\n  peerBackToSource: false\n  seedPeerWaitTimeout: 1s\n").is_err());
    }
}
