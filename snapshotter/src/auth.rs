//! Registry credentials from a docker `config.json` (p2p-backend's reader of it), read
//! again now and then so that a rotated password reaches running daemons (see
//! `daemons::Manager::refresh_auth`).

use p2p_backend::registry::{credentials_for, docker_config_entries, Credentials};
use std::collections::BTreeMap;
use std::path::Path;

/// Credentials by registry host (`host[:port]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Auths(BTreeMap<String, Credentials>);

impl Auths {
    /// The credentials for `host`, as `(user, password)`.
    pub fn get(&self, host: &str) -> Option<(String, String)> {
        credentials_for(&self.0, host).map(|c| (c.username, c.password))
    }
}

/// Reads `path`: the credentials in it, none when it does not exist, or an error
/// naming the file and the entry that cannot be read.
pub fn load(path: &Path) -> Result<Auths, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Auths::default()),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    docker_config_entries(&text)
        .map(Auths)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn docker_config_entries_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        assert_eq!(load(&p).unwrap(), Auths::default());
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"d","password":"x"}},"empty.io":{{}}}},"credsStore":"x"}}"#
            ),
        )
        .unwrap();
        let a = load(&p).unwrap();
        assert_eq!(
            a.get("127.0.0.1:5000"),
            Some(("u".to_string(), "p:w".to_string()))
        );
        assert_eq!(
            a.get("registry-1.docker.io"),
            Some(("d".to_string(), "x".to_string()))
        );
        assert_eq!(a.get("empty.io"), None);
        std::fs::write(&p, r#"{"auths":{"h":{"auth":"!!"}}}"#).unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.contains("auth of h") && e.contains("config.json"), "{e}");
    }
}
