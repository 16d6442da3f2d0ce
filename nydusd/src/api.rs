//! The HTTP API on a unix socket (`--apisock`), upstream's paths and JSON shapes where
//! they exist:
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/v1/daemon` | `{"id", "version": {...}, "state": "RUNNING", ...}` |
//! | `PUT /api/v1/daemon/exit` | 204, then the daemon unmounts and exits |
//! | `GET /api/v1/metrics` | filesystem counters |
//! | `GET /api/v1/metrics/backend` | backend requests, bytes, errors, latency |
//! | `GET /api/v1/metrics/blobcache` | cache hits, misses, digest errors, prefetch |
//! | `GET /metrics` | every counter as Prometheus text |
//!
//! A deliberately small HTTP/1.1 server: one request per connection (`Connection:
//! close`), bounded header and body sizes, a read timeout, one connection at a time.

use crate::cache::ChunkCache;
use crate::daemon::{Event, StateCell};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;
use tracing::{debug, warn};

const MAX_HEADER_BYTES: usize = 16 << 10;
const MAX_BODY_BYTES: usize = 1 << 20;

/// What the API serves from.
pub struct ApiContext {
    /// Daemon id (`--id`, or the mountpoint).
    pub id: String,
    /// Daemon state.
    pub state: Arc<StateCell>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The cache (for the blobcache metrics).
    pub cache: Arc<ChunkCache>,
    /// Where `PUT /api/v1/daemon/exit` is announced.
    pub events: Sender<Event>,
}

/// A running API server; dropping it leaves the thread running until the process ends,
/// [`ApiServer::close`] removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    _thread: JoinHandle<()>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file) and serves in a thread.
    pub fn start(path: &Path, ctx: ApiContext) -> Result<ApiServer> {
        if path.exists() {
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("Removing stale socket {}", path.display()), e))?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("Binding API socket {}", path.display()), e))?;
        let ctx = Arc::new(ctx);
        let thread = thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            if let Err(e) = handle(&ctx, s) {
                                debug!("API connection: {e}");
                            }
                        }
                        Err(e) => warn!("API accept: {e}"),
                    }
                }
            })
            .map_err(|e| Error::io("Starting the API thread", e))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            _thread: thread,
        })
    }

    /// Removes the socket file.
    pub fn close(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Query string (without `?`).
    pub query: String,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Reads one request; `None` on a malformed one.
pub fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    let mut total = r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        let n = r.read_line(&mut h)?;
        total += n;
        if n == 0 || total > MAX_HEADER_BYTES {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(usize::MAX);
            }
        }
    }
    if len > MAX_BODY_BYTES {
        return Ok(None);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Ok(Some(Request {
        method,
        path,
        query,
        body,
    }))
}

/// A response: status, content type, body.
pub type Response = (u16, &'static str, Vec<u8>);

fn json_response(status: u16, v: Value) -> Response {
    (status, "application/json", v.to_string().into_bytes())
}

fn error_response(status: u16, message: &str) -> Response {
    json_response(status, json!({"code": "UNDEFINED", "message": message}))
}

/// Answers one request.
pub fn route(ctx: &ApiContext, req: &Request) -> Response {
    let m = &ctx.metrics;
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/api/v1/daemon") => json_response(
            200,
            json!({
                "id": ctx.id,
                "version": {
                    "package_ver": env!("CARGO_PKG_VERSION"),
                    "git_commit": "",
                    "build_time": "",
                    "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
                    "rustc": "",
                },
                "supervisor": null,
                "state": ctx.state.get().as_str(),
                "backend_collection": {},
            }),
        ),
        ("PUT", "/api/v1/daemon/exit") => {
            let _ = ctx.events.send(Event::ApiExit);
            (204, "application/json", Vec::new())
        }
        ("GET", "/api/v1/metrics") => json_response(200, m.fs_json()),
        ("GET", "/api/v1/metrics/backend") => {
            json_response(200, m.backend_json(ctx.cache.backend_kind()))
        }
        ("GET", "/api/v1/metrics/blobcache") => {
            let mut v = m.cache_json(&ctx.cache.underlying_files());
            let (ready, total) = ctx.cache.ready_chunks();
            v["ready_chunks"] = json!(ready);
            v["total_chunks"] = json!(total);
            json_response(200, v)
        }
        ("GET", "/metrics") => (
            200,
            "text/plain; version=0.0.4",
            m.prometheus(ctx.cache.backend_kind()).into_bytes(),
        ),
        (_, "/api/v1/daemon" | "/api/v1/daemon/exit" | "/metrics")
        | (_, "/api/v1/metrics" | "/api/v1/metrics/backend" | "/api/v1/metrics/blobcache") => {
            error_response(405, "method not allowed")
        }
        _ => error_response(404, &format!("no such endpoint: {}", req.path)),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

fn handle(ctx: &ApiContext, stream: UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let (status, ctype, body) = match read_request(&mut reader)? {
        Some(req) => route(ctx, &req),
        None => error_response(400, "malformed request"),
    };
    let mut out = stream;
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_with_query_and_body() {
        let raw = b"PUT /api/v1/mount?mountpoint=/sub HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody";
        let req = read_request(&mut &raw[..]).unwrap().unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/api/v1/mount");
        assert_eq!(req.query, "mountpoint=/sub");
        assert_eq!(req.body, b"body");
        assert!(read_request(&mut &b"\r\n"[..]).unwrap().is_none());
        let huge = b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n";
        assert!(read_request(&mut &huge[..]).unwrap().is_none());
    }
}
