//! A bearer-token server for docker-registry's `auth: token` mode, so that tests cover
//! the token flow of real registries (Docker Hub, Harbor, GitLab): the registry answers
//! `401` with a `Bearer realm=…,service=…,scope=…` challenge, the client asks this server
//! for a token with its basic credentials, and presents the token to the registry, which
//! checks its RS256 signature against the certificate in its `rootcertbundle`.
//!
//! Keys and signatures come from the `openssl` command; the token is a JWT carrying the
//! certificate in `x5c`, signed at start for the one user it knows, granting pull and
//! push on the repositories it was started with.

use base64::Engine;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "rafs-test-registry";
/// The service name after [`TokenServer::rotate`].
const SERVICE_ROTATED: &str = "rafs-test-registry-rotated";
const ISSUER: &str = "rafs-test-token-issuer";

/// A running token server; stopped when dropped.
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    keys: Arc<Keys>,
    cert: PathBuf,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: String,
    accept: Option<JoinHandle<()>>,
}

struct Keys {
    key: PathBuf,
    x5c: String,
    user: String,
    password: String,
    /// Signed at start: no process is spawned while serving, since the client may be
    /// a FUSE daemon that the test process itself is blocked on.
    token: String,
    /// The token for the rotated service, and whether it is the one handed out.
    rotated_token: String,
    rotated: AtomicBool,
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Keys {
    /// A signed token granting `scopes` (`repository:NAME:ACTIONS`).
    fn token(&self, scopes: &[String], jti: usize, service: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind,
                    "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": self.user,
            "aud": service,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": jti.to_string(),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-binary", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running openssl dgst");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl dgst -sign failed");
        format!("{input}.{}", b64url(&out.stdout))
    }

    fn authorized(&self, header: &str) -> bool {
        let Some(v) = header.strip_prefix("Basic ") else {
            return false;
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(v.trim()) else {
            return false;
        };
        raw == format!("{}:{}", self.user, self.password).as_bytes()
    }
}

fn serve(
    conn: TcpStream,
    keys: &Keys,
    issued: &AtomicUsize,
    refused: &AtomicUsize,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut authorization = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = v.trim().to_string();
            }
        }
    }
    let mut conn = conn;
    if !keys.authorized(&authorization) {
        refused.fetch_add(1, Ordering::SeqCst);
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"wrong credentials"}]}"#;
        return write!(
            conn,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
             WWW-Authenticate: Basic realm=\"rafs-test-token\"\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
    }
    // The token was signed at start for every repository of the test, whatever the
    // request's `scope` asks.
    issued.fetch_add(1, Ordering::SeqCst);
    let token = if keys.rotated.load(Ordering::SeqCst) {
        &keys.rotated_token
    } else {
        &keys.token
    };
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": 600,
    })
    .to_string();
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

impl TokenServer {
    /// Starts a token server in `dir` (its key and certificate live there) for the one
    /// user `user` with `password`; its tokens grant pull and push on `repositories`.
    ///
    /// # Panics
    /// When `openssl` fails or no loopback port can be bound.
    pub fn start(dir: &Path, user: &str, password: &str, repositories: &[&str]) -> TokenServer {
        std::fs::create_dir_all(dir).unwrap();
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        crate::run_ok(
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=rafs-test-token-issuer", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stderr(Stdio::null()),
        );
        let der = crate::run_ok(
            Command::new("openssl")
                .args(["x509", "-outform", "DER", "-in"])
                .arg(&cert),
        )
        .stdout;
        let mut keys = Keys {
            key,
            x5c: base64::engine::general_purpose::STANDARD.encode(der),
            user: user.into(),
            password: password.into(),
            token: String::new(),
            rotated_token: String::new(),
            rotated: AtomicBool::new(false),
        };
        let scopes: Vec<String> = repositories
            .iter()
            .map(|r| format!("repository:{r}:pull,push"))
            .collect();
        keys.token = keys.token(&scopes, 0, SERVICE);
        keys.rotated_token = keys.token(&scopes, 1, SERVICE_ROTATED);
        let keys = Arc::new(keys);
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let accept = {
            let (stop, issued, refused) = (stop.clone(), issued.clone(), refused.clone());
            let keys = keys.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let (keys, issued, refused) =
                                (keys.clone(), issued.clone(), refused.clone());
                            std::thread::spawn(move || {
                                let _ = serve(conn, &keys, &issued, &refused);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        TokenServer {
            realm: format!("http://{addr}/token"),
            keys: keys.clone(),
            cert,
            issued,
            refused,
            stop,
            addr,
            accept: Some(accept),
        }
    }

    /// The registry configuration that sends clients here (for
    /// [`crate::Registry::start_in`]'s `extra`).
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    \
             rootcertbundle: {}\n",
            self.realm,
            self.cert.display()
        )
    }

    /// Restarts `reg` (configured with [`TokenServer::registry_config`]) under another
    /// service name, so that it refuses every token issued so far, and from then on
    /// issues tokens for the new name: a client must notice the 401s and get a new token.
    pub fn rotate(&self, reg: &mut crate::Registry) {
        let config = std::fs::read_to_string(reg.config_path()).unwrap();
        let from = format!("service: {SERVICE}\n");
        assert!(
            config.contains(&from),
            "the registry is not configured for this server"
        );
        std::fs::write(
            reg.config_path(),
            config.replace(&from, &format!("service: {SERVICE_ROTATED}\n")),
        )
        .unwrap();
        self.keys.rotated.store(true, Ordering::SeqCst);
        reg.down();
        reg.up();
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// Token requests refused (wrong or missing credentials) so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent token requests are all answered; wrong credentials are refused.
    #[test]
    fn concurrent_requests_get_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenServer::start(dir.path(), "u", "p", &["a"]);
        let url = format!("{}?scope=repository%3Aa%3Apull%2Cpush&service=x", s.realm);
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || {
                    Command::new("curl")
                        .args(["-fsS", "-m", "10", "-u", "u:p", &url])
                        .output()
                        .unwrap()
                })
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let token = v["token"].as_str().unwrap();
            let claims = token.split('.').nth(1).unwrap();
            let claims: serde_json::Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(claims)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(claims["access"][0]["name"], "a");
            assert_eq!(claims["access"][0]["actions"][1], "push");
        }
        assert_eq!(s.issued(), 6);
        let out = Command::new("curl")
            .args([
                "-sS",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-u",
                "u:q",
                &url,
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
        assert_eq!(s.refused(), 1);
    }
}
