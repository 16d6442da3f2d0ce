//! The API's request and reply types (upstream's JSON shapes), and a small blocking
//! HTTP/1.1 client over the daemon's unix socket.

use super::ClientError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Body of `POST /api/v1/mount?mountpoint=/sub`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MountRequest {
    /// The bootstrap.
    pub source: String,
    /// `rafs` (the default).
    #[serde(default = "rafs")]
    pub fs_type: String,
    /// The v1 config, as a JSON string.
    pub config: String,
    /// Files to prefetch first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_files: Option<Vec<String>>,
}

fn rafs() -> String {
    "rafs".into()
}

/// One image in [`DaemonInfo::mounts`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MountInfo {
    /// Where it is mounted inside the daemon's mountpoint (`/sub`).
    pub mountpoint: String,
    /// `rafs`.
    pub fs_type: String,
    /// The bootstrap.
    pub source: String,
}

/// Reply of `GET /api/v1/daemon`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// `--id`, or the mountpoint.
    #[serde(default)]
    pub id: String,
    /// `INIT`, `RUNNING`, `READY`, `STOPPED`.
    pub state: String,
    /// Build information.
    #[serde(default)]
    pub version: serde_json::Value,
    /// Images mounted through the API, by their mountpoint (ours; upstream has none).
    #[serde(default)]
    pub mounts: BTreeMap<String, MountInfo>,
}

/// Body of `PUT /api/v1/config`: settings changed on a running daemon.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    /// base64 of `user:password` for the registry backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<String>,
}

/// Error reply: `{"code", "message"}`.
#[derive(Clone, Debug, Default, Deserialize)]
struct ErrorReply {
    #[serde(default)]
    message: String,
}

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one daemon's API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            socket: socket.into(),
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same client with each request bounded by `timeout` (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; returns the status and body of the reply. Statuses of 400
    /// and above are errors carrying the daemon's message.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let request = format!("{method} {path}");
        let io = |e: std::io::Error| ClientError::Io {
            what: format!("nydusd API {request} on {}", self.socket.display()),
            source: e,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io)?;
        let malformed = || {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "malformed HTTP reply",
            ))
        };
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(malformed)?;
        let head = std::str::from_utf8(&raw[..split]).map_err(|_| malformed())?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(malformed)?;
        let body = raw[split + 4..].to_vec();
        if status >= 400 {
            let message = serde_json::from_slice::<ErrorReply>(&body)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api {
                socket: self.socket.display().to_string(),
                request,
                status,
                message,
            });
        }
        Ok((status, body))
    }

    /// `PUT /api/v1/daemon/fuse/takeover`: an `--upgrade` daemon takes the FUSE session
    /// its supervisor holds, and serves it.
    pub fn takeover(&self) -> Result<(), ClientError> {
        self.request("PUT", "/api/v1/daemon/fuse/takeover", None)
            .map(|_| ())
    }

    /// `PUT /api/v1/daemon/fuse/sendfd`: the daemon hands its session to its supervisor.
    pub fn sendfd(&self) -> Result<(), ClientError> {
        self.request("PUT", "/api/v1/daemon/fuse/sendfd", None)
            .map(|_| ())
    }

    /// `PUT /api/v1/daemon/start`.
    pub fn start(&self) -> Result<(), ClientError> {
        self.request("PUT", "/api/v1/daemon/start", None)
            .map(|_| ())
    }

    /// `GET /api/v1/daemon`.
    pub fn daemon_info(&self) -> Result<DaemonInfo, ClientError> {
        let (_, body) = self.request("GET", "/api/v1/daemon", None)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Io {
            what: format!("nydusd API GET /api/v1/daemon on {}", self.socket.display()),
            source: e.into(),
        })
    }

    /// `POST /api/v1/mount?mountpoint=...`.
    pub fn mount(&self, mountpoint: &str, req: &MountRequest) -> Result<(), ClientError> {
        let body = serde_json::to_vec(req).expect("plain struct serializes");
        self.request(
            "POST",
            &format!("/api/v1/mount?mountpoint={}", encode(mountpoint)),
            Some(&body),
        )
        .map(drop)
    }

    /// `DELETE /api/v1/mount?mountpoint=...`.
    pub fn umount(&self, mountpoint: &str) -> Result<(), ClientError> {
        self.request(
            "DELETE",
            &format!("/api/v1/mount?mountpoint={}", encode(mountpoint)),
            None,
        )
        .map(drop)
    }

    /// `PUT /api/v1/config[?id=/sub]`: new settings for the image mounted at `id`, or
    /// for every image the daemon serves.
    pub fn update_config(
        &self,
        id: Option<&str>,
        update: &ConfigUpdate,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(update).expect("plain struct serializes");
        let path = match id {
            Some(id) => format!("/api/v1/config?id={}", encode(id)),
            None => "/api/v1/config".to_string(),
        };
        self.request("PUT", &path, Some(&body)).map(drop)
    }

    /// `PUT /api/v1/daemon/exit`.
    pub fn exit(&self) -> Result<(), ClientError> {
        self.request("PUT", "/api/v1/daemon/exit", None).map(drop)
    }
}

/// Percent-encodes what a query value cannot hold as is.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("/snap 1&x=%"), "/snap%201%26x%3D%25");
    }

    #[test]
    fn error_replies_carry_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).unwrap();
            let body = br#"{"code":"UNDEFINED","message":"mountpoint /a is taken"}"#;
            let head = format!(
                "HTTP/1.1 409 Conflict\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(body).unwrap();
        });
        let err = ApiClient::new(&sock).umount("/a").unwrap_err();
        server.join().unwrap();
        assert_eq!(err.status(), Some(409));
        assert!(err.to_string().contains("mountpoint /a is taken"), "{err}");
    }
}
