//! Registry credentials: explicit, or from a docker `config.json`.

use super::{RegistryError, Result};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A user name and password (or token) for HTTP basic auth and the token exchange.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or identity token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.username)
    }
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The docker config file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials the docker config holds for `host` (`registry:port`), if any. A
/// missing config file means no credentials; a malformed one is an error.
pub fn credentials_from_docker_config(host: &str) -> Result<Option<Credentials>> {
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RegistryError::Config {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        }
    };
    parse_docker_config(&text, host).map_err(|reason| RegistryError::Config {
        path: path.display().to_string(),
        reason,
    })
}

/// Every registry's credentials in the text of a docker config, by host (a key's scheme
/// and path dropped: `https://index.docker.io/v1/` is `index.docker.io`). Entries
/// without credentials are left out; one that cannot be decoded is an error naming it.
pub fn docker_config_entries(
    text: &[u8],
) -> std::result::Result<BTreeMap<String, Credentials>, String> {
    let cfg: DockerConfig = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (k, a) in &cfg.auths {
        let host = k
            .strip_prefix("https://")
            .or_else(|| k.strip_prefix("http://"))
            .unwrap_or(k);
        let host = host.split('/').next().unwrap_or(host).to_string();
        let credentials = if let (Some(u), Some(p)) = (&a.username, &a.password) {
            Credentials {
                username: u.clone(),
                password: p.clone(),
            }
        } else if let Some(auth) = a.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| format!("auth of {k} is not base64: {e}"))?;
            let raw = String::from_utf8(raw).map_err(|_| format!("auth of {k} is not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| format!("auth of {k} is not user:password"))?;
            Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }
        } else {
            continue;
        };
        out.insert(host, credentials);
    }
    Ok(out)
}

/// The credentials for `host` among `entries` (Docker Hub answers to `docker.io`,
/// `index.docker.io` and `registry-1.docker.io` alike).
pub fn credentials_for(entries: &BTreeMap<String, Credentials>, host: &str) -> Option<Credentials> {
    const HUB: [&str; 3] = ["index.docker.io", "docker.io", "registry-1.docker.io"];
    if HUB.contains(&host) {
        HUB.iter().find_map(|h| entries.get(*h)).cloned()
    } else {
        entries.get(host).cloned()
    }
}

/// Looks `host` up in the text of a docker config (keys may carry a scheme and path,
/// as `https://index.docker.io/v1/`).
pub fn parse_docker_config(
    text: &[u8],
    host: &str,
) -> std::result::Result<Option<Credentials>, String> {
    Ok(credentials_for(&docker_config_entries(text)?, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auth_is_decoded_per_host() {
        let cfg = br#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"},
            "https://index.docker.io/v1/":{"username":"d","password":"p"}}}"#;
        let c = parse_docker_config(cfg, "127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pass"));
        let c = parse_docker_config(cfg, "docker.io").unwrap().unwrap();
        assert_eq!(c.username, "d");
        assert_eq!(parse_docker_config(cfg, "other:1").unwrap(), None);
        assert!(parse_docker_config(b"{", "x").is_err());
    }
}
