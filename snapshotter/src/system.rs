//! The system controller: upstream nydus-snapshotter's operator API, HTTP/1.1 on the
//! unix socket `[system] address` (root only), one request per connection:
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/v1/daemons` | 200, `[{"id", "pid", "mountpoint", "alive", "supervised"}]` |
//! | `PUT /api/v1/daemons/upgrade` | body `{"nydusd_path": "/abs/nydusd"}` (upstream's `version` and `policy` are accepted and ignored): every daemon handed live to that binary, which new daemons then run; 200 `{"upgraded": [ids]}`, 400 (bad body, no such executable, `recover_policy` is not `failover`), 500 (a daemon failed; the message says which) |

use crate::daemons::Manager;
use serde::Deserialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 64 << 10;

#[derive(Deserialize)]
struct UpgradeRequest {
    nydusd_path: PathBuf,
    #[allow(dead_code)]
    version: Option<String>,
    #[allow(dead_code)]
    policy: Option<String>,
}

/// Binds `path` (root-only) and serves it on a thread of its own.
pub fn start(path: &Path, manager: Arc<Manager>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding the system controller at {}: {e}", path.display()),
        )
    })?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    info!("system controller at {}", path.display());
    std::thread::Builder::new()
        .name("system".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let m = manager.clone();
                let _ = std::thread::Builder::new()
                    .name("system-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(conn, &m) {
                            warn!("system controller: {e}");
                        }
                    });
            }
        })?;
    Ok(())
}

fn serve(conn: UnixStream, manager: &Manager) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new((&conn).take((MAX_HEAD + MAX_BODY + 1) as u64));
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        head.push_str(&line);
        if head.len() > MAX_HEAD {
            return reply(&conn, 431, &message("request header too large"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = match v.trim().parse() {
                    Ok(n) => n,
                    Err(_) => return reply(&conn, 400, &message("bad Content-Length")),
                };
            }
        }
    }
    if len > MAX_BODY {
        return reply(&conn, 413, &message("request body too large"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (status, json) = route(manager, method, path, &body);
    reply(&conn, status, &json)
}

fn message(m: &str) -> serde_json::Value {
    serde_json::json!({ "message": m })
}

fn route(manager: &Manager, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    match (method, path) {
        ("GET", "/api/v1/daemons") => (200, serde_json::json!(manager.daemons())),
        ("PUT", "/api/v1/daemons/upgrade") => {
            let req: UpgradeRequest = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return (400, message(&format!("invalid upgrade request: {e}"))),
            };
            if let Err(e) = executable(&req.nydusd_path) {
                return (400, message(&e));
            }
            match manager.upgrade(&req.nydusd_path) {
                Ok(ids) => (200, serde_json::json!({ "upgraded": ids })),
                Err(e) if e.contains("recover_policy") => (400, message(&e)),
                Err(e) => (500, message(&e)),
            }
        }
        (_, "/api/v1/daemons" | "/api/v1/daemons/upgrade") => (405, message("method not allowed")),
        _ => (404, message(&format!("no such endpoint: {path}"))),
    }
}

/// Checks that `path` is an absolute path to an executable file.
fn executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err(format!(
            "nydusd_path {} is not an absolute path",
            path.display()
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!(
            "nydusd_path {} is not an executable file",
            path.display()
        )),
        Err(e) => Err(format!("nydusd_path {}: {e}", path.display())),
    }
}

fn reply(mut conn: &UnixStream, status: u16, json: &serde_json::Value) -> std::io::Result<()> {
    let body = json.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
