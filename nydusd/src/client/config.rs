//! nydusd's v1 JSON configuration as types (`spec/upstream-interfaces.md` §3.1), with
//! upstream's field names: what the daemon parses, and what `nydusify mount`, the
//! snapshotter and the tests write.
//!
//! These are the config as written, not as validated: every optional field stays an
//! `Option` and is left out when `None`, so that a config read and written again says
//! the same. The daemon's checks and defaults are in `nydusd::config`.

use super::ClientError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole v1 config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NydusdConfig {
    /// Backend and cache.
    pub device: DeviceConfig,
    /// `direct` or `cached` (RAFS v5 only; v6 is always direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Verify every chunk's digest (ours defaults to true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_validate: Option<bool>,
    /// Per-file counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iostats_files: Option<bool>,
    /// Serve extended attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_xattr: Option<bool>,
    /// Record the order of first reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_pattern: Option<bool>,
    /// Record files read since the last query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_read_files: Option<bool>,
    /// Bytes an on-demand read is extended to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amplify_io: Option<u64>,
    /// Bytes of sequential readahead in flight at most (this project's; upstream has
    /// no such field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readahead_window: Option<u64>,
    /// Background prefetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_prefetch: Option<FsPrefetchConfig>,
}

/// `device`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Where blobs come from.
    pub backend: BackendV1,
    /// Where fetched chunks are kept.
    pub cache: CacheV1,
}

/// `device.backend`: a type and its config, which is typed by [`BackendV1::registry`]
/// and [`BackendV1::localfs`] (and by the daemon when it validates).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendV1 {
    /// `registry`, `localfs`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The type's own fields.
    #[serde(default)]
    pub config: serde_json::Value,
}

impl BackendV1 {
    /// A `registry` backend.
    pub fn registry(c: &RegistryBackendConfig) -> BackendV1 {
        BackendV1 {
            kind: "registry".into(),
            config: serde_json::to_value(c).expect("plain struct serializes"),
        }
    }

    /// A `localfs` backend.
    pub fn localfs(c: &LocalfsBackendConfig) -> BackendV1 {
        BackendV1 {
            kind: "localfs".into(),
            config: serde_json::to_value(c).expect("plain struct serializes"),
        }
    }

    /// The `registry` config, if this is one.
    pub fn as_registry(&self) -> Option<RegistryBackendConfig> {
        (self.kind == "registry")
            .then(|| serde_json::from_value(self.config.clone()).ok())
            .flatten()
    }
}

/// `device.backend.config` of type `localfs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalfsBackendConfig {
    /// Blob `<id>` is `dir/<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// One file answering for every blob id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_file: Option<PathBuf>,
    /// Other directories (refused when non-empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alt_dirs: Option<Vec<PathBuf>>,
    /// Accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readahead: Option<bool>,
    /// Accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readahead_sec: Option<u32>,
}

/// `device.backend.config` of type `registry`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryBackendConfig {
    /// `http` or `https` (empty: https, plain HTTP for loopback hosts).
    #[serde(default)]
    pub scheme: String,
    /// `host[:port]`.
    pub host: String,
    /// Repository, e.g. `library/busybox`.
    pub repo: String,
    /// base64 of `user:password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// A bearer token (refused by the daemon when non-empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_token: Option<String>,
    /// Accept plain HTTP / unverified TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_verify: Option<bool>,
    /// Seconds one try may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Seconds connecting may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<u64>,
    /// Retries after the first try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_limit: Option<u32>,
    /// Refused when non-empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_url_scheme: Option<String>,
    /// Refused when non-empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_redirected_host: Option<String>,
    /// The node's P2P proxy (upstream's `ProxyConfig`: `url`, `ping_url`, `fallback`,
    /// `check_interval`, `use_http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<serde_json::Value>,
    /// Registry mirrors (refused when non-empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<serde_json::Value>,
}

/// `device.cache`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheV1 {
    /// `blobcache` (or `filecache`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed: Option<bool>,
    /// Accepted: cached chunks are always verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate: Option<bool>,
    /// Where and how much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<CacheDirConfig>,
}

/// `device.cache.config`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheDirConfig {
    /// The cache directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
    /// Refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_indexed_map: Option<bool>,
    /// Ours: the most bytes the cache may take (a number or `"10G"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<serde_json::Value>,
    /// Refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_encryption: Option<bool>,
    /// Refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_convergent_encryption: Option<bool>,
    /// Accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<String>,
}

/// `fs_prefetch`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsPrefetchConfig {
    /// Prefetch at mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<bool>,
    /// Worker threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_count: Option<u64>,
    /// Largest merged request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merging_size: Option<u64>,
    /// Bytes per second, 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_rate: Option<u64>,
    /// Continue with every blob after the listed files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_all: Option<bool>,
    /// Accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_prefetch: Option<bool>,
}

/// A registry image reference split the way nydusd's registry backend needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`; Docker Hub's images are at `registry-1.docker.io`.
    pub host: String,
    /// Repository (Docker Hub's single names get `library/`).
    pub repo: String,
    /// What follows the repository: `:tag`, `@digest`, both or nothing.
    pub tail: String,
}

impl ImageRef {
    /// Parses `[host[:port]/]repo[:tag][@digest]` with Docker's rules: the first
    /// component is a host when it has a `.` or `:` or is `localhost`.
    pub fn parse(reference: &str) -> Result<ImageRef, ClientError> {
        let bad = |why: &str| ClientError::ImageRef {
            reference: reference.to_string(),
            reason: why.to_string(),
        };
        if reference.is_empty() || reference.chars().any(|c| c.is_whitespace()) {
            return Err(bad("empty or contains white space"));
        }
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, format!("@{d}")),
            None => (reference, String::new()),
        };
        let (host, rest) = match name.split_once('/') {
            Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (h.to_string(), r.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        // A tag is a `:` after the last `/`.
        let last = rest.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match rest[last..].find(':') {
            Some(i) => (rest[..last + i].to_string(), rest[last + i..].to_string()),
            None => (rest.clone(), String::new()),
        };
        if repo.is_empty() || repo.split('/').any(str::is_empty) {
            return Err(bad("no repository name"));
        }
        let (host, repo) = if host == "docker.io" || host == "index.docker.io" {
            let repo = if repo.contains('/') {
                repo
            } else {
                format!("library/{repo}")
            };
            ("registry-1.docker.io".to_string(), repo)
        } else {
            (host, repo)
        };
        Ok(ImageRef {
            host,
            repo,
            tail: format!("{tag}{digest}"),
        })
    }

    /// Whether the host is a loopback address (served over plain HTTP).
    pub fn is_loopback(&self) -> bool {
        let h = self.host.as_str();
        h.starts_with("127.") || h.starts_with("localhost") || h.starts_with("[::1]")
    }
}

/// What a registry-backed config needs beyond the image reference.
#[derive(Clone, Debug, Default)]
pub struct ImageConfigOptions {
    /// The cache directory (shared by every daemon of one node).
    pub cache_dir: PathBuf,
    /// Registry credentials, `(user, password)`.
    pub auth: Option<(String, String)>,
    /// Plain HTTP even for non-loopback hosts.
    pub insecure: bool,
}

/// base64 of `user:password`, upstream's `auth` and `registry_auth`.
pub fn encode_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

impl NydusdConfig {
    /// The config for serving image `reference` from its registry: `template` (e.g. the
    /// snapshotter's `nydusd_config`) with the registry backend's host, repository,
    /// scheme and auth, and the cache directory, filled in from `reference` and `opts`.
    /// Without a template: a `blobcache`, digest validation on, everything else default.
    pub fn for_image(
        template: Option<&NydusdConfig>,
        reference: &str,
        opts: &ImageConfigOptions,
    ) -> Result<NydusdConfig, ClientError> {
        let image = ImageRef::parse(reference)?;
        let mut config = template.cloned().unwrap_or_else(|| NydusdConfig {
            mode: Some("direct".into()),
            digest_validate: Some(true),
            enable_xattr: Some(true),
            ..Default::default()
        });
        let mut registry = config.device.backend.as_registry().unwrap_or_default();
        registry.host = image.host.clone();
        registry.repo = image.repo.clone();
        registry.scheme = if opts.insecure || image.is_loopback() {
            "http".into()
        } else {
            "https".into()
        };
        if let Some((user, password)) = &opts.auth {
            registry.auth = Some(encode_auth(user, password));
        }
        config.device.backend = BackendV1::registry(&registry);
        if config.device.cache.kind.is_empty() {
            config.device.cache.kind = "blobcache".into();
        }
        config
            .device
            .cache
            .config
            .get_or_insert_with(Default::default)
            .work_dir = Some(opts.cache_dir.clone());
        Ok(config)
    }

    /// A `localfs` config: blobs in `blobs`, cache in `cache_dir`, digest validation as
    /// given.
    pub fn localfs(blobs: &Path, cache_dir: &Path, digest_validate: bool) -> NydusdConfig {
        NydusdConfig {
            device: DeviceConfig {
                id: None,
                backend: BackendV1::localfs(&LocalfsBackendConfig {
                    dir: Some(blobs.to_path_buf()),
                    ..Default::default()
                }),
                cache: CacheV1 {
                    kind: "blobcache".into(),
                    config: Some(CacheDirConfig {
                        work_dir: Some(cache_dir.to_path_buf()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            },
            mode: Some("direct".into()),
            digest_validate: Some(digest_validate),
            enable_xattr: Some(true),
            ..Default::default()
        }
    }

    /// Reads a config file (JSON).
    pub fn load(path: &Path) -> Result<NydusdConfig, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::Io {
            what: format!("Reading {}", path.display()),
            source: e,
        })?;
        serde_json::from_str(&text).map_err(|e| ClientError::Config {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The config as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain structs serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_like_docker() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str()),
            ("127.0.0.1:5000", "team/app")
        );
        assert_eq!(r.tail, ":v1");
        assert!(r.is_loopback());
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.host, "registry-1.docker.io");
        assert_eq!(r.repo, "library/busybox");
        let r = ImageRef::parse("localhost/x@sha256:ab").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.tail.as_str()),
            ("localhost", "x", "@sha256:ab")
        );
        let r = ImageRef::parse("quay.io/a/b:1@sha256:cd").unwrap();
        assert_eq!((r.repo.as_str(), r.tail.as_str()), ("a/b", ":1@sha256:cd"));
        assert!(!r.is_loopback());
        for bad in ["", "a b", "host.io/", "host.io//x"] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn image_config_fills_the_template() {
        let template: NydusdConfig = serde_json::from_str(
            r#"{"device":{"backend":{"type":"registry","config":{"host":"","repo":"","timeout":9,
                "proxy":{"url":"http://127.0.0.1:4001","ping_url":"http://127.0.0.1:4001/healthy"}}},
                "cache":{"type":"blobcache","config":{"work_dir":"/old"}}},
                "digest_validate":false,"fs_prefetch":{"enable":true}}"#,
        )
        .unwrap();
        let opts = ImageConfigOptions {
            cache_dir: "/var/cache/n".into(),
            auth: Some(("u".into(), "p:w".into())),
            insecure: false,
        };
        let c = NydusdConfig::for_image(Some(&template), "reg.io/a/b:t", &opts).unwrap();
        let r = c.device.backend.as_registry().unwrap();
        assert_eq!(
            (r.scheme.as_str(), r.host.as_str(), r.repo.as_str()),
            ("https", "reg.io", "a/b")
        );
        assert_eq!(r.timeout, Some(9));
        // The node's P2P proxy, set once in the template, reaches every image.
        assert_eq!(
            r.proxy.as_ref().and_then(|p| p["url"].as_str()),
            Some("http://127.0.0.1:4001")
        );
        assert_eq!(r.auth.as_deref(), Some(encode_auth("u", "p:w").as_str()));
        assert_eq!(
            c.device.cache.config.as_ref().unwrap().work_dir.as_deref(),
            Some(Path::new("/var/cache/n"))
        );
        assert_eq!(c.digest_validate, Some(false));
        // Written and read again, it is the same config.
        let again: NydusdConfig = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(again, c);
        let plain =
            NydusdConfig::for_image(None, "127.0.0.1:5000/x", &ImageConfigOptions::default())
                .unwrap();
        assert_eq!(plain.device.backend.as_registry().unwrap().scheme, "http");
        assert_eq!(plain.digest_validate, Some(true));
    }
}
