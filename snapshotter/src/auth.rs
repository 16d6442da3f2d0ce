//! Registry credentials from a docker `config.json` (`{"auths": {"HOST": {"auth":
//! "<base64 user:password>"}}}`, or `username` and `password`), read again now and then
//! so that a rotated password reaches running daemons (see `daemons::refresh_auth`).

use base64::Engine as _;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Credentials by registry host (`host[:port]`).
pub type Auths = BTreeMap<String, (String, String)>;

/// The host of an `auths` key: `https://index.docker.io/v1/` → `index.docker.io`.
fn host_of(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k).to_string();
    match host.as_str() {
        "index.docker.io" | "docker.io" => "registry-1.docker.io".into(),
        _ => host,
    }
}

/// Reads `path`: the credentials in it, none when it does not exist, or an error
/// naming the file and the entry that cannot be read.
pub fn load(path: &Path) -> Result<Auths, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Auths::new()),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let config: DockerConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Auths::new();
    for (key, entry) in config.auths {
        let pair = match (&entry.auth, &entry.username, &entry.password) {
            (Some(a), _, _) if !a.is_empty() => {
                let text = base64::engine::general_purpose::STANDARD
                    .decode(a)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok());
                match text.as_deref().and_then(|t| t.split_once(':')) {
                    Some((u, p)) => (u.to_string(), p.to_string()),
                    None => {
                        return Err(format!(
                            "{}: auths.\"{key}\".auth is not base64 of user:password",
                            path.display()
                        ))
                    }
                }
            }
            (_, Some(u), Some(p)) => (u.clone(), p.clone()),
            _ => continue,
        };
        out.insert(host_of(&key), pair);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        assert!(load(&p).unwrap().is_empty());
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"d","password":"x"}},"empty.io":{{}}}},"credsStore":"x"}}"#
            ),
        )
        .unwrap();
        let a = load(&p).unwrap();
        assert_eq!(a["127.0.0.1:5000"], ("u".to_string(), "p:w".to_string()));
        assert_eq!(
            a["registry-1.docker.io"],
            ("d".to_string(), "x".to_string())
        );
        assert_eq!(a.len(), 2);
        std::fs::write(&p, r#"{"auths":{"h":{"auth":"!!"}}}"#).unwrap();
        assert!(load(&p).unwrap_err().contains("auths.\"h\".auth"));
    }
}
