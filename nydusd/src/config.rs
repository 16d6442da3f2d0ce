//! The daemon configuration: upstream nydusd's v1 JSON shape (`spec/upstream-interfaces.md`
//! §3.1) for the parts implemented here.
//!
//! Parsing is two-staged: serde reads the raw JSON (wrong types and unknown fields are
//! errors naming the field, e.g. `fs_prefetch.threads_count`), then validation
//! turns it into a checked [`Config`]. Unlike upstream, `digest_validate` defaults to
//! **true**: every chunk is verified against the bootstrap before it is served, and only
//! an explicit `"digest_validate": false` turns that off.

use crate::error::{Error, Result};
use crate::metrics::FileStatsConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Largest `amplify_io` accepted (upstream's bound).
pub const MAX_AMPLIFY_IO: u64 = 256 << 20;
/// Default `amplify_io`: 1 MiB.
pub const DEFAULT_AMPLIFY_IO: u64 = 1 << 20;
/// Default `readahead_window`: 32 MiB.
pub const DEFAULT_READAHEAD_WINDOW: u64 = 32 << 20;
/// Largest `readahead_window` accepted.
pub const MAX_READAHEAD_WINDOW: u64 = 1 << 30;

/// A validated daemon configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where blobs are read from.
    pub backend: BackendConfig,
    /// Where fetched chunks are kept.
    pub cache: CacheConfig,
    /// Verify every chunk's digest before serving it (default true).
    pub digest_validate: bool,
    /// Serve extended attributes (default true).
    pub enable_xattr: bool,
    /// Bound in bytes of one merged backend request for on-demand reads; small reads are
    /// extended with the following chunks of the blob up to it (0 = no amplification).
    pub amplify_io: u64,
    /// Bytes of sequential readahead requests in flight at most (its memory bound; 0 =
    /// no readahead; at most `amplify_io`: one request at a time). See
    /// [`crate::cache`].
    pub readahead_window: u64,
    /// Background prefetch.
    pub prefetch: PrefetchConfig,
    /// Per-file records for `/api/v1/metrics/files` and `/api/v1/metrics/pattern`
    /// (`iostats_files`, `access_pattern`, `latest_read_files`; all off by default, as
    /// upstream).
    pub file_stats: FileStatsConfig,
}

/// `device.backend`.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendConfig {
    /// `localfs`: a directory of blobs named by id, or one blob file.
    Localfs {
        /// `dir`: blob `<id>` is `dir/<id>`.
        dir: Option<PathBuf>,
        /// `blob_file`: one file answering for every blob id.
        blob_file: Option<PathBuf>,
    },
    /// `registry`: blobs are layers of one repository, read by ranged GETs.
    Registry(RegistryConfig),
    /// A type this build parses but does not implement yet (`registry`, `p2p`, ...): the
    /// daemon refuses to start with it, naming the type.
    Other {
        /// `type`.
        kind: String,
        /// `config`, unparsed.
        config: serde_json::Value,
    },
}

/// `device.backend.config` of type `registry` (the fields implemented here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    /// `scheme`: `http` or `https` (empty: https, plain HTTP for loopback hosts).
    pub scheme: String,
    /// `host`, e.g. `registry.example.com:5000`.
    pub host: String,
    /// `repo`, e.g. `library/busybox`.
    pub repo: String,
    /// `auth`: base64 of `user:password`, decoded.
    pub auth: Option<(String, String)>,
    /// `retry_limit`: retries after the first try of a request that failed
    /// transiently (upstream's meaning; default 0).
    pub retry_limit: u32,
    /// `skip_verify`: accept plain HTTP / unverified TLS.
    pub skip_verify: bool,
    /// `timeout` (seconds, default 5): the longest one try of a request may take.
    pub timeout: std::time::Duration,
    /// `connect_timeout` (seconds, default 5): the longest connecting may take.
    pub connect_timeout: std::time::Duration,
    /// `proxy`: blob reads through the node's P2P peer (none when its `url` is empty).
    pub proxy: Option<p2p_backend::registry::proxy::ProxyConfig>,
}

/// Upstream's default `timeout` and `connect_timeout` of the registry backend.
pub const DEFAULT_REGISTRY_TIMEOUT: u64 = 5;

/// `device.cache` (type `blobcache` / `filecache`).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    /// `config.work_dir`: where `<blob_id>.blob.data` and `<blob_id>.chunk_map` live.
    pub work_dir: PathBuf,
    /// `config.size_limit` (ours; upstream has none): the most bytes the work dir's files
    /// may take on disk, in bytes or with a binary unit (`"512MiB"`, `"10G"`). Chunks
    /// read least recently are evicted to stay under it (see `cache::evict`). `None`:
    /// no limit.
    pub size_limit: Option<u64>,
}

/// `fs_prefetch`.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefetchConfig {
    /// Whether to prefetch at mount.
    pub enable: bool,
    /// Worker threads (1..=1024).
    pub threads_count: usize,
    /// Largest merged backend request in bytes.
    pub merging_size: u64,
    /// Bandwidth limit in bytes per second (0 = unlimited).
    pub bandwidth_rate: u64,
    /// After the listed files, continue with the rest of every blob.
    pub prefetch_all: bool,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enable: false,
            threads_count: 8,
            // Upstream's default is 1 MiB. Registries answer larger ranges much faster
            // per byte: prefetching a 2 GiB model image from docker-registry took 3.8 s
            // with 1 MiB requests, 1.9 s with 4 MiB (8 threads: 32 MiB in flight at most).
            merging_size: 4 << 20,
            bandwidth_rate: 0,
            prefetch_all: true,
        }
    }
}

use crate::client::config::{
    BackendV1 as RawBackend, CacheV1 as RawCache, FsPrefetchConfig as RawPrefetch,
    LocalfsBackendConfig as RawLocalfs, NydusdConfig as RawConfig,
    RegistryBackendConfig as RawRegistry,
};

/// Parses `T` from JSON, turning serde's error into one naming the field's path.
fn parse_json<'a, T: Deserialize<'a>>(text: &'a str, prefix: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = match (prefix.is_empty(), path.as_str()) {
            (true, ".") => "(top level)".to_string(),
            (true, _) => path,
            (false, ".") => prefix.to_string(),
            (false, _) => format!("{prefix}.{path}"),
        };
        Error::config(field, e.into_inner().to_string())
    })
}

impl Config {
    /// Reads and validates the JSON config at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_json(&text)
    }

    /// Parses and validates a v1 JSON config.
    pub fn from_json(text: &str) -> Result<Config> {
        let raw: RawConfig = parse_json(text, "")?;
        Config::validate(raw)
    }

    /// A config for a directory of blobs with its cache in `work_dir` (nydusd's
    /// `--localfs-dir`), everything else default.
    pub fn localfs(dir: PathBuf, work_dir: PathBuf) -> Config {
        Config {
            backend: BackendConfig::Localfs {
                dir: Some(dir),
                blob_file: None,
            },
            cache: CacheConfig {
                work_dir,
                size_limit: None,
            },
            digest_validate: true,
            enable_xattr: true,
            amplify_io: DEFAULT_AMPLIFY_IO,
            readahead_window: DEFAULT_READAHEAD_WINDOW,
            prefetch: PrefetchConfig::default(),
            file_stats: FileStatsConfig::default(),
        }
    }

    fn validate(raw: RawConfig) -> Result<Config> {
        if let Some(mode) = &raw.mode {
            if mode != "direct" && mode != "cached" {
                return Err(Error::config(
                    "mode",
                    format!("'{mode}' is not one of direct, cached"),
                ));
            }
            // `cached` only changes how RAFS v5 metadata is loaded; v6 is always direct.
        }
        let amplify_io = raw.amplify_io.unwrap_or(DEFAULT_AMPLIFY_IO);
        if amplify_io > MAX_AMPLIFY_IO {
            return Err(Error::config(
                "amplify_io",
                format!("{amplify_io} exceeds the maximum of {MAX_AMPLIFY_IO} bytes"),
            ));
        }
        let readahead_window = raw.readahead_window.unwrap_or(DEFAULT_READAHEAD_WINDOW);
        if readahead_window > MAX_READAHEAD_WINDOW {
            return Err(Error::config(
                "readahead_window",
                format!("{readahead_window} exceeds the maximum of {MAX_READAHEAD_WINDOW} bytes"),
            ));
        }
        let digest_validate = raw.digest_validate.unwrap_or(true);
        Ok(Config {
            backend: backend(raw.device.backend, digest_validate)?,
            cache: cache(raw.device.cache)?,
            digest_validate,
            enable_xattr: raw.enable_xattr.unwrap_or(true),
            amplify_io,
            readahead_window,
            prefetch: prefetch(raw.fs_prefetch)?,
            file_stats: FileStatsConfig {
                iostats_files: raw.iostats_files.unwrap_or(false),
                access_pattern: raw.access_pattern.unwrap_or(false),
                latest_read_files: raw.latest_read_files.unwrap_or(false),
            },
        })
    }
}

/// The `proxy` section of the registry backend (upstream's `ProxyConfig`); none when
/// its `url` is empty. `verifies`: the daemon checks every chunk's digest.
fn proxy_config(
    v: &serde_json::Value,
    verifies: bool,
) -> Result<Option<p2p_backend::registry::proxy::ProxyConfig>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawProxy {
        #[serde(default)]
        url: String,
        #[serde(default)]
        ping_url: String,
        fallback: Option<bool>,
        check_interval: Option<u64>,
        // Accepted: health checks are cheap enough never to pause.
        #[allow(dead_code)]
        check_pause_elapsed: Option<u64>,
        #[serde(default)]
        use_http: bool,
        #[serde(default)]
        dragonfly_scheduler_endpoint: String,
    }
    let field = |f: &str| format!("device.backend.config.proxy.{f}");
    let p: RawProxy = parse_json(&v.to_string(), "device.backend.config.proxy")?;
    if !p.dragonfly_scheduler_endpoint.is_empty() {
        return Err(Error::config(
            field("dragonfly_scheduler_endpoint"),
            "Dragonfly's SDK mode is not supported: point `url` at the node's peer",
        ));
    }
    if p.url.is_empty() {
        return Ok(None);
    }
    let http = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    if !http(&p.url) {
        return Err(Error::config(
            field("url"),
            format!("'{}' is not an http(s) URL", p.url),
        ));
    }
    if !p.ping_url.is_empty() && !http(&p.ping_url) {
        return Err(Error::config(
            field("ping_url"),
            format!("'{}' is not an http(s) URL", p.ping_url),
        ));
    }
    let check_interval = match p.check_interval.unwrap_or(5) {
        0 => {
            return Err(Error::config(
                field("check_interval"),
                "must be at least 1 (seconds)",
            ))
        }
        s if s > 3600 => {
            return Err(Error::config(
                field("check_interval"),
                format!("{s} s is over an hour"),
            ))
        }
        s => std::time::Duration::from_secs(s),
    };
    Ok(Some(p2p_backend::registry::proxy::ProxyConfig {
        retries: 0,
        url: p.url,
        ping_url: (!p.ping_url.is_empty()).then_some(p.ping_url),
        fallback: p.fallback.unwrap_or(true),
        check_interval,
        use_http: p.use_http,
        verifies,
    }))
}

fn backend(raw: RawBackend, digest_validate: bool) -> Result<BackendConfig> {
    match raw.kind.as_str() {
        "localfs" => {
            let text = raw.config.to_string();
            let c: RawLocalfs = parse_json(&text, "device.backend.config")?;
            if c.alt_dirs.as_ref().is_some_and(|d| !d.is_empty()) {
                return Err(Error::config(
                    "device.backend.config.alt_dirs",
                    "alternative directories are not supported",
                ));
            }
            match (&c.dir, &c.blob_file) {
                (Some(_), Some(_)) => Err(Error::config(
                    "device.backend.config",
                    "give either `dir` or `blob_file`, not both",
                )),
                (None, None) => Err(Error::config(
                    "device.backend.config.dir",
                    "missing: localfs needs `dir` (or `blob_file`)",
                )),
                _ => Ok(BackendConfig::Localfs {
                    dir: c.dir,
                    blob_file: c.blob_file,
                }),
            }
        }
        "registry" => {
            let text = raw.config.to_string();
            let c: RawRegistry = parse_json(&text, "device.backend.config")?;
            let field = |f: &str| format!("device.backend.config.{f}");
            if !["", "http", "https"].contains(&c.scheme.as_str()) {
                return Err(Error::config(
                    field("scheme"),
                    format!("'{}' is not http or https", c.scheme),
                ));
            }
            if c.host.is_empty() || c.host.contains('/') {
                return Err(Error::config(field("host"), "must be host[:port]"));
            }
            if c.repo.is_empty() {
                return Err(Error::config(field("repo"), "missing"));
            }
            if c.registry_token.as_deref().is_some_and(|t| !t.is_empty()) {
                return Err(Error::config(
                    field("registry_token"),
                    "bearer tokens are not supported yet; use `auth`",
                ));
            }
            let mut proxy = match c.proxy.as_ref().filter(|p| !p.is_null()) {
                Some(p) => proxy_config(p, digest_validate)?,
                None => None,
            };
            // Accepted by upstream, not implemented here: refused rather than ignored,
            // so that nobody believes blobs come from a mirror or redirected host.
            if c.mirrors
                .as_ref()
                .is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(Error::config(
                    field("mirrors"),
                    "mirrors are not supported yet",
                ));
            }
            for (name, v) in [
                ("blob_url_scheme", &c.blob_url_scheme),
                ("blob_redirected_host", &c.blob_redirected_host),
            ] {
                if v.as_deref().is_some_and(|v| !v.is_empty()) {
                    return Err(Error::config(field(name), "not supported yet"));
                }
            }
            let seconds = |name: &str, v: Option<u64>| match v.unwrap_or(DEFAULT_REGISTRY_TIMEOUT) {
                0 => Err(Error::config(field(name), "must be at least 1 (seconds)")),
                s if s > 3600 => Err(Error::config(field(name), format!("{s} s is over an hour"))),
                s => Ok(std::time::Duration::from_secs(s)),
            };
            let timeout = seconds("timeout", c.timeout)?;
            let connect_timeout = seconds("connect_timeout", c.connect_timeout)?;
            let retry_limit = c.retry_limit.unwrap_or(0);
            if retry_limit > 100 {
                return Err(Error::config(
                    field("retry_limit"),
                    format!("{retry_limit} is over 100"),
                ));
            }
            if let Some(p) = proxy.as_mut() {
                p.retries = retry_limit;
            }
            let auth = match c.auth.filter(|a| !a.is_empty()) {
                None => None,
                Some(a) => Some(decode_auth(&a).ok_or_else(|| {
                    Error::config(field("auth"), "is not base64 of user:password")
                })?),
            };
            Ok(BackendConfig::Registry(RegistryConfig {
                scheme: c.scheme,
                host: c.host,
                repo: c.repo,
                auth,
                retry_limit,
                skip_verify: c.skip_verify.unwrap_or(false),
                timeout,
                connect_timeout,
                proxy,
            }))
        }
        "" => Err(Error::config("device.backend.type", "missing")),
        _ => Ok(BackendConfig::Other {
            kind: raw.kind,
            config: raw.config,
        }),
    }
}

/// Decodes upstream's `auth`: base64 of `user:password`.
pub(crate) fn decode_auth(a: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(a).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn cache(raw: RawCache) -> Result<CacheConfig> {
    if raw.kind != "blobcache" && raw.kind != "filecache" {
        return Err(Error::config(
            "device.cache.type",
            format!("'{}' is not supported (use blobcache)", raw.kind),
        ));
    }
    if raw.compressed == Some(true) {
        return Err(Error::config(
            "device.cache.compressed",
            "compressed caches are not supported: the cache holds uncompressed chunks",
        ));
    }
    // `validate` asks upstream to verify cached chunks; here they always are (see cache).
    let _ = raw.validate;
    let inner = raw
        .config
        .ok_or_else(|| Error::config("device.cache.config", "missing (needs work_dir)"))?;
    for (set, name) in [
        (inner.disable_indexed_map, "disable_indexed_map"),
        (inner.enable_encryption, "enable_encryption"),
        (
            inner.enable_convergent_encryption,
            "enable_convergent_encryption",
        ),
    ] {
        if set == Some(true) {
            return Err(Error::config(
                format!("device.cache.config.{name}"),
                "not supported",
            ));
        }
    }
    let work_dir = inner
        .work_dir
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| Error::config("device.cache.config.work_dir", "missing"))?;
    let size_limit = match inner.size_limit {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(parse_size(&v).ok_or_else(|| {
            Error::config(
                "device.cache.config.size_limit",
                format!(
                    "{v} is not a size of at least 1 MiB (bytes, or a number with K, M, G or T, \
                     binary units: \"512MiB\", \"10G\")"
                ),
            )
        })?),
    };
    Ok(CacheConfig {
        work_dir,
        size_limit,
    })
}

/// A size in bytes: a number, or a string of a number and an optional binary unit
/// (`K`/`KiB`/`KB`, `M`, `G`, `T`; case-insensitive). At least 1 MiB.
fn parse_size(v: &serde_json::Value) -> Option<u64> {
    use serde_json::Value;
    let bytes = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let num: u64 = num.parse().ok()?;
            let shift = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 0,
                "k" | "kb" | "kib" => 10,
                "m" | "mb" | "mib" => 20,
                "g" | "gb" | "gib" => 30,
                "t" | "tb" | "tib" => 40,
                _ => return None,
            };
            num.checked_mul(1u64 << shift)?
        }
        _ => return None,
    };
    (bytes >= 1 << 20).then_some(bytes)
}

fn prefetch(raw: Option<RawPrefetch>) -> Result<PrefetchConfig> {
    let d = PrefetchConfig::default();
    let Some(raw) = raw else { return Ok(d) };
    let _ = raw.stream_prefetch;
    let threads = raw.threads_count.unwrap_or(d.threads_count as u64);
    if !(1..=1024).contains(&threads) {
        return Err(Error::config(
            "fs_prefetch.threads_count",
            format!("{threads} is not in 1..=1024"),
        ));
    }
    let merging_size = raw.merging_size.unwrap_or(d.merging_size);
    if merging_size == 0 || merging_size > 64 << 20 {
        return Err(Error::config(
            "fs_prefetch.merging_size",
            format!("{merging_size} is not in 1..=64 MiB"),
        ));
    }
    Ok(PrefetchConfig {
        enable: raw.enable.unwrap_or(d.enable),
        threads_count: threads as usize,
        merging_size,
        bandwidth_rate: raw.bandwidth_rate.unwrap_or(0),
        prefetch_all: raw.prefetch_all.unwrap_or(d.prefetch_all),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "device": {
            "backend": {"type": "localfs", "config": {"dir": "/blobs"}},
            "cache": {"type": "blobcache", "compressed": false,
                      "config": {"work_dir": "/cache"}}
        },
        "mode": "direct",
        "enable_xattr": true,
        "amplify_io": 524288,
        "readahead_window": 8388608,
        "fs_prefetch": {"enable": true, "threads_count": 4, "merging_size": 131072,
                        "bandwidth_rate": 1000000, "prefetch_all": false}
    }"#;

    fn err(json: &str) -> (String, String) {
        match Config::from_json(json) {
            Err(Error::Config { field, reason }) => (field, reason),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn upstream_shape_parses_and_digest_validation_defaults_on() {
        let c = Config::from_json(GOOD).unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::Localfs {
                dir: Some("/blobs".into()),
                blob_file: None
            }
        );
        assert_eq!(c.cache.work_dir, PathBuf::from("/cache"));
        assert!(c.digest_validate, "digest_validate must default to true");
        assert!(!c.file_stats.any(), "per-file records are off by default");
        assert_eq!(c.amplify_io, 524288);
        assert_eq!(c.readahead_window, 8 << 20);
        assert_eq!(
            c.prefetch,
            PrefetchConfig {
                enable: true,
                threads_count: 4,
                merging_size: 131072,
                bandwidth_rate: 1_000_000,
                prefetch_all: false
            }
        );
    }

    #[test]
    fn only_explicit_false_disables_digest_validation() {
        let j = GOOD.replace("\"mode\"", "\"digest_validate\": false, \"mode\"");
        assert!(!Config::from_json(&j).unwrap().digest_validate);
        let j = GOOD.replace("\"mode\"", "\"digest_validate\": true, \"mode\"");
        assert!(Config::from_json(&j).unwrap().digest_validate);
    }

    #[test]
    fn file_stats_flags_are_read() {
        let j = GOOD.replace(
            "\"mode\"",
            "\"access_pattern\": true, \"latest_read_files\": true, \"mode\"",
        );
        let f = Config::from_json(&j).unwrap().file_stats;
        assert!(f.access_pattern && f.latest_read_files && !f.iostats_files);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let (f, r) = err(&GOOD.replace("\"threads_count\": 4", "\"threads_count\": \"4\""));
        assert_eq!(f, "fs_prefetch.threads_count");
        assert!(r.contains("invalid type"), "{r}");
        let (f, _) = err(&GOOD.replace("\"enable_xattr\": true", "\"enable_xattr\": 1"));
        assert_eq!(f, "enable_xattr");
        let (f, _) = err(&GOOD.replace("\"/blobs\"", "7"));
        assert_eq!(f, "device.backend.config.dir");
        let (f, r) = err(&GOOD.replace("\"mode\"", "\"modes\""));
        assert_eq!(f, "modes");
        assert!(r.contains("unknown field `modes`"), "{r}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        assert_eq!(err(&GOOD.replace("524288", "999999999999")).0, "amplify_io");
        assert_eq!(
            err(&GOOD.replace("8388608", "4294967296")).0,
            "readahead_window"
        );
        assert_eq!(
            err(&GOOD.replace("\"threads_count\": 4", "\"threads_count\": 0")).0,
            "fs_prefetch.threads_count"
        );
        assert_eq!(
            err(&GOOD.replace("blobcache", "fscache")).0,
            "device.cache.type"
        );
        assert_eq!(
            err(&GOOD.replace("\"work_dir\": \"/cache\"", "\"work_dir\": \"\"")).0,
            "device.cache.config.work_dir"
        );
        assert_eq!(
            err(&GOOD.replace("\"dir\": \"/blobs\"", "\"readahead\": true")).0,
            "device.backend.config.dir"
        );
        assert_eq!(err("{}").0, "(top level)");
        assert_eq!(err("not json").0, "(top level)");
    }

    #[test]
    fn other_backend_types_are_kept_for_later() {
        let j = GOOD.replace(
            r#""type": "localfs", "config": {"dir": "/blobs"}"#,
            r#""type": "oss", "config": {"bucket_name": "b"}"#,
        );
        match Config::from_json(&j).unwrap().backend {
            BackendConfig::Other { kind, config } => {
                assert_eq!(kind, "oss");
                assert_eq!(config["bucket_name"], "b");
            }
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn registry_backend_config_parses_upstream_fields() {
        let j = GOOD.replace(
            r#""type": "localfs", "config": {"dir": "/blobs"}"#,
            r#""type": "registry", "config": {"scheme": "http", "host": "127.0.0.1:5000",
               "repo": "library/app", "auth": "dXNlcjpwYXNz", "timeout": 7,
               "connect_timeout": 3, "retry_limit": 2, "skip_verify": true}"#,
        );
        assert_eq!(
            Config::from_json(&j).unwrap().backend,
            BackendConfig::Registry(RegistryConfig {
                scheme: "http".into(),
                host: "127.0.0.1:5000".into(),
                repo: "library/app".into(),
                auth: Some(("user".into(), "pass".into())),
                retry_limit: 2,
                skip_verify: true,
                timeout: std::time::Duration::from_secs(7),
                connect_timeout: std::time::Duration::from_secs(3),
                proxy: None,
            })
        );
        let bad = j.replace("dXNlcjpwYXNz", "!!");
        assert_eq!(err(&bad).0, "device.backend.config.auth");
        let bad = j.replace(r#""repo": "library/app","#, "");
        assert_eq!(err(&bad).0, "device.backend.config");
        // Upstream's defaults: 5 s, 5 s, no retries.
        let defaults = j
            .replace(r#""timeout": 7,"#, "")
            .replace(r#""connect_timeout": 3, "retry_limit": 2,"#, "");
        match Config::from_json(&defaults).unwrap().backend {
            BackendConfig::Registry(r) => {
                assert_eq!(r.timeout, std::time::Duration::from_secs(5));
                assert_eq!(r.connect_timeout, std::time::Duration::from_secs(5));
                assert_eq!(r.retry_limit, 0);
            }
            b => panic!("{b:?}"),
        }
        let bad = j.replace(r#""timeout": 7"#, r#""timeout": 0"#);
        assert_eq!(err(&bad).0, "device.backend.config.timeout");
    }

    #[test]
    fn the_registry_proxy_section_is_upstreams() {
        let with = |proxy: &str| {
            GOOD.replace(
                r#""type": "localfs", "config": {"dir": "/blobs"}"#,
                &format!(
                    r#""type": "registry", "config": {{"host": "127.0.0.1:5000",
                       "repo": "library/app", "proxy": {proxy}}}"#
                ),
            )
        };
        let proxy = |j: &str| match Config::from_json(j).unwrap().backend {
            BackendConfig::Registry(r) => r.proxy,
            b => panic!("{b:?}"),
        };
        let p = proxy(&with(
            r#"{"url": "http://127.0.0.1:4001", "ping_url": "http://127.0.0.1:4001/healthy",
                "check_interval": 2, "use_http": true, "check_pause_elapsed": 300}"#,
        ))
        .expect("a proxy");
        assert_eq!(p.url, "http://127.0.0.1:4001");
        assert_eq!(p.ping_url.as_deref(), Some("http://127.0.0.1:4001/healthy"));
        assert!(p.fallback, "fallback defaults to true");
        assert!(p.use_http && p.verifies);
        assert_eq!(p.check_interval, std::time::Duration::from_secs(2));
        assert_eq!(proxy(&with(r#"{"url": ""}"#)), None);
        let off = with(r#"{"url": "http://p:4001", "fallback": false}"#)
            .replace("\"mode\"", "\"digest_validate\": false, \"mode\"");
        let p = proxy(&off).unwrap();
        assert!(!p.fallback && !p.verifies);
        for (bad, field) in [
            (r#"{"url": "p:4001"}"#, "proxy.url"),
            (
                r#"{"url": "http://p", "ping_url": "p/ping"}"#,
                "proxy.ping_url",
            ),
            (
                r#"{"url": "http://p", "check_interval": 0}"#,
                "proxy.check_interval",
            ),
            (
                r#"{"url": "http://p", "dragonfly_scheduler_endpoint": "http://s:8002"}"#,
                "proxy.dragonfly_scheduler_endpoint",
            ),
        ] {
            assert_eq!(
                err(&with(bad)).0,
                format!("device.backend.config.{field}"),
                "{bad}"
            );
        }
    }

    #[test]
    fn cache_size_limit_takes_bytes_or_binary_units() {
        let with = |v: &str| {
            GOOD.replace(
                "\"work_dir\": \"/cache\"",
                &format!("\"work_dir\": \"/cache\", \"size_limit\": {v}"),
            )
        };
        let limit = |v: &str| Config::from_json(&with(v)).unwrap().cache.size_limit;
        assert_eq!(limit("2097152"), Some(2 << 20));
        assert_eq!(limit("\"512MiB\""), Some(512 << 20));
        assert_eq!(limit("\"10G\""), Some(10 << 30));
        assert_eq!(limit("\"3 m\""), Some(3 << 20));
        assert_eq!(limit("null"), None);
        assert_eq!(Config::from_json(GOOD).unwrap().cache.size_limit, None);
        for bad in ["\"lots\"", "\"1KiB\"", "-5", "\"5X\"", "[1]"] {
            assert_eq!(err(&with(bad)).0, "device.cache.config.size_limit", "{bad}");
        }
    }

    #[test]
    fn registry_features_not_implemented_are_refused() {
        let base = GOOD.replace(
            r#""type": "localfs", "config": {"dir": "/blobs"}"#,
            r#""type": "registry", "config": {"host": "127.0.0.1:5000", "repo": "a/b" EXTRA}"#,
        );
        for (extra, field) in [
            (
                r#", "mirrors": [{"host": "http://127.0.0.1:65001"}]"#,
                "mirrors",
            ),
            (r#", "blob_url_scheme": "http""#, "blob_url_scheme"),
            (
                r#", "blob_redirected_host": "cdn.example.com""#,
                "blob_redirected_host",
            ),
        ] {
            let (f, msg) = err(&base.replace("EXTRA", extra));
            assert_eq!(f, format!("device.backend.config.{field}"));
            assert!(msg.contains("not supported yet"), "{msg}");
        }
        // Empty values are what upstream's own configs carry: accepted.
        let empty = r#", "mirrors": [], "blob_url_scheme": "", "blob_redirected_host": """#;
        assert!(Config::from_json(&base.replace("EXTRA", empty)).is_ok());
    }
}
