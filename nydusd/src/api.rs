//! The HTTP API on a unix socket (`--apisock`), upstream's paths and JSON shapes where
//! they exist:
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/v1/daemon` | `{"id", "version": {...}, "state": "RUNNING", "mounts": {"/sub": {"mountpoint", "fs_type", "source"}}, ...}` |
//! | `PUT /api/v1/daemon/exit` | 204, then the daemon unmounts and exits |
//! | `PUT /api/v1/daemon/fuse/sendfd` | the FUSE session handed to the supervisor now (`--supervisor`; it is also handed over after INIT and each mount and unmount): 204, 400 without a supervisor, 500 when the supervisor did not take it |
//! | `PUT /api/v1/daemon/fuse/takeover` | (`--upgrade`) takes the session (a FUSE session or a virtio-fs device) the supervisor holds and mounts its images again, not serving yet (the predecessor may still serve): 204; 409 when already serving; 500 with the reason (no session, a state of another version, a kernel that cannot resend, no image that can be mounted again) |
//! | `PUT /api/v1/daemon/start` | (`--upgrade`, once the predecessor is gone) serves the session taken over: its open files taken on, unanswered requests resent; 204, also when already serving; 409 before a takeover |
//! | `POST /api/v1/mount?mountpoint=/sub` | body `{"source": BOOTSTRAP, "fs_type": "rafs", "config": "<v1 JSON as a string>", "prefetch_files": [...]}`: 204, or 400 (bad request, bootstrap or config; the message says which), 409 (mountpoint taken, or the daemon has a `--bootstrap`) |
//! | `DELETE /api/v1/mount?mountpoint=/sub` | 204, or 404 when nothing is mounted there |
//! | `PUT /api/v1/config?id=/sub` | body `{"registry_auth": "<base64 of user:password>"}`: the registry backends of that image (without `id`: of every image) use these credentials from their next request on; 204, 400 (bad body, no registry backend), 404 (no such image) |
//! | `GET /api/v1/metrics` | filesystem counters |
//! | `GET /api/v1/metrics/backend` | backend requests, bytes, errors, latency |
//! | `GET /api/v1/metrics/blobcache` | cache hits, misses, digest errors, prefetch |
//! | `GET /api/v1/metrics/files` | files opened or read, with counts (config `iostats_files`) |
//! | `GET /api/v1/metrics/files?latest=true` | files read since the last such request (config `latest_read_files`) |
//! | `GET /api/v1/metrics/pattern` | files in the order of their first read, with `file_path` usable as a `--prefetch-files` list (config `access_pattern`) |
//! | `GET /metrics` | every counter as Prometheus text, one sample per image |
//!
//! The metrics paths take `?id=/sub` to choose an image; without it they answer for the
//! only image served (400 when there are several). The per-file paths answer 400 when
//! their config flag is off (all three are off by default, as upstream).
//!
//! A deliberately small HTTP/1.1 server: one request per connection (`Connection:
//! close`), bounded header and body sizes. Each connection is served by its own thread
//! (at most [`MAX_CONNECTIONS`] at once; more are answered 503 at once), with its own
//! deadline for the whole request ([`REQUEST_DEADLINE`]) and write timeout, so that an
//! idle or slow client, or a mount validating a large bootstrap, delays nobody else.

use crate::cache::OpenBlobs;
use crate::client::api::{ConfigUpdate, MountRequest};
use crate::config::Config;
use crate::daemon::{self, Event, State};
use crate::error::{Chain, Error, Result};
use crate::handover::{Serving, Takeover};
use crate::metrics::{self as metrics};
use crate::vfs::{MountError, Mounted};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;
use tracing::{debug, warn};

const MAX_HEADER_BYTES: usize = 16 << 10;
const MAX_BODY_BYTES: usize = 1 << 20;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long writing the answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the API serves from.
pub struct ApiContext {
    /// Daemon id (`--id`, or the mountpoint).
    pub id: String,
    /// The images served (with their caches and counters), and the daemon's state.
    pub serving: Arc<Serving>,
    /// The hand-over of the FUSE session, with `--supervisor`.
    pub handover: Option<Arc<dyn Takeover>>,
    /// Whether the daemon was started to take a session over (`--upgrade`).
    pub upgrade: bool,
    /// Where `PUT /api/v1/daemon/exit` is announced.
    pub events: Sender<Event>,
    /// The daemon's open cache files, for the images mounted through the API.
    pub open_blobs: Arc<OpenBlobs>,
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
        let active = Arc::new(AtomicUsize::new(0));
        let thread = thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => serve_connection(&ctx, &active, s),
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

/// Decodes `%XX` escapes and `+` (a space, in form encoding); `None` if malformed.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query's parameters, decoded.
fn query(req: &Request) -> std::result::Result<HashMap<String, String>, Response> {
    let mut out = HashMap::new();
    for pair in req.query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (percent_decode(k), percent_decode(v)) {
            (Some(k), Some(v)) => {
                out.insert(k, v);
            }
            _ => {
                return Err(error_response(
                    400,
                    &format!("malformed query parameter {pair:?}"),
                ))
            }
        }
    }
    Ok(out)
}

/// The image a metrics request is about: `?id=/sub`, or the only one.
fn select(ctx: &ApiContext, req: &Request) -> std::result::Result<Arc<Mounted>, Response> {
    let q = query(req)?;
    if let Some(id) = q.get("id").filter(|id| !id.is_empty()) {
        return ctx
            .serving
            .vfs()
            .get(id)
            .ok_or_else(|| error_response(404, &format!("nothing is mounted at {id}")));
    }
    let mut all = ctx.serving.vfs().mounts();
    match all.len() {
        0 => Err(error_response(404, "nothing is mounted")),
        1 => Ok(all.remove(0)),
        n => Err(error_response(
            400,
            &format!(
                "{n} images are mounted: choose one with ?id= (one of {})",
                all.iter()
                    .map(|m| m.mountpoint.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn mount_error(e: MountError) -> Response {
    let status = match e {
        MountError::Conflict(_) => 409,
        MountError::NotFound(_) => 404,
        MountError::Invalid(_) => 400,
    };
    error_response(status, &e.to_string())
}

fn mountpoint(req: &Request) -> std::result::Result<String, Response> {
    query(req)?
        .remove("mountpoint")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| error_response(400, "missing query parameter ?mountpoint=/sub"))
}

/// `PUT /api/v1/config` (`?id=/sub` for one image, else every image): upstream's
/// hot-reloadable settings, today the registry credentials (`registry_auth`, base64 of
/// `user:password`), handed to the images' registry backends for their next request.
fn put_config(ctx: &ApiContext, req: &Request) -> Response {
    let update: ConfigUpdate = match serde_json::from_slice(&req.body) {
        Ok(u) => u,
        Err(e) => return error_response(400, &format!("invalid config body: {e}")),
    };
    let Some(auth) = update.registry_auth else {
        return error_response(400, "nothing to change: the body has no registry_auth");
    };
    let credentials = match crate::config::decode_auth(&auth) {
        Some((username, password)) => p2p_backend::registry::Credentials { username, password },
        None => return error_response(400, "registry_auth is not base64 of user:password"),
    };
    let wanted = match query(req) {
        Ok(q) => q.get("id").cloned(),
        Err(r) => return r,
    };
    let mounts = ctx.serving.vfs().mounts();
    let mut changed = 0;
    for m in mounts.iter() {
        if wanted.as_ref().is_some_and(|id| *id != m.mountpoint) {
            continue;
        }
        if m.fs
            .cache()
            .backend()
            .set_credentials(Some(credentials.clone()))
        {
            m.set_auth(&auth);
            changed += 1;
        }
    }
    if changed > 0 {
        // A successor must not mount with the old credentials.
        if let Some(h) = &ctx.handover {
            h.save_or_warn(&ctx.serving.vfs());
        }
    }
    match (wanted, changed) {
        (Some(id), 0) if !mounts.iter().any(|m| m.mountpoint == id) => {
            error_response(404, &format!("no image is mounted at {id}"))
        }
        (_, 0) => error_response(400, "no registry backend to give the credentials to"),
        _ => (204, "application/json", Vec::new()),
    }
}

fn post_mount(ctx: &ApiContext, req: &Request) -> Response {
    let mountpoint = match mountpoint(req) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let body: MountRequest = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return error_response(400, &format!("invalid mount request body: {e}")),
    };
    if body.fs_type != "rafs" {
        return error_response(
            400,
            &format!(
                "fs_type {:?} is not supported (supported: rafs)",
                body.fs_type
            ),
        );
    }
    let config = match Config::from_json(&body.config) {
        Ok(c) => c,
        Err(e) => return error_response(400, &format!("config: {}", Chain(&e))),
    };
    let index = match ctx.serving.vfs().reserve(&mountpoint) {
        Ok(i) => i,
        Err(e) => return mount_error(e),
    };
    let spec = daemon::ImageSpec {
        mountpoint: mountpoint.clone(),
        source: PathBuf::from(&body.source),
        index,
        config: body.config.clone(),
        prefetch_files: body.prefetch_files.clone(),
    };
    let image = match daemon::mount_image(spec, &config, &ctx.open_blobs) {
        Ok(m) => m,
        Err(e) => {
            warn!("mounting {} at {mountpoint}: {}", body.source, Chain(&e));
            return error_response(400, &format!("source {}: {}", body.source, Chain(&e)));
        }
    };
    let vfs = ctx.serving.vfs();
    match vfs.mount(image) {
        Ok(()) => {
            // Before the answer: once the caller has it, a successor must know the image.
            // When the supervisor cannot hear of it, the mount is undone.
            if let Some(h) = &ctx.handover {
                if let Err(e) = h.save(&vfs) {
                    let _ = vfs.umount(&mountpoint);
                    h.save_or_warn(&vfs);
                    return error_response(
                        500,
                        &format!("{mountpoint} is not mounted: {}", Chain(&e)),
                    );
                }
            }
            (204, "application/json", Vec::new())
        }
        Err(e) => mount_error(e),
    }
}

fn delete_mount(ctx: &ApiContext, req: &Request) -> Response {
    let mountpoint = match mountpoint(req) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let vfs = ctx.serving.vfs();
    match vfs.umount(&mountpoint) {
        Ok(_) => {
            if let Some(h) = &ctx.handover {
                h.save_or_warn(&vfs);
            }
            (204, "application/json", Vec::new())
        }
        Err(e) => mount_error(e),
    }
}

/// `PUT /api/v1/daemon/fuse/sendfd`: the session handed to the supervisor now.
fn sendfd(ctx: &ApiContext) -> Response {
    let Some(h) = &ctx.handover else {
        return error_response(
            400,
            "this nydusd was started without --supervisor: there is no supervisor to send the \
             FUSE session to",
        );
    };
    if !ctx.serving.serves() {
        return error_response(409, "no session is served yet");
    }
    match h.sendfd(&ctx.serving.vfs()) {
        Ok(()) => (204, "application/json", Vec::new()),
        Err(e) => error_response(500, &Chain(&e).to_string()),
    }
}

/// `PUT /api/v1/daemon/fuse/takeover`: takes the session the supervisor holds and
/// mounts its images again, without serving it yet (the predecessor may still serve).
fn takeover(ctx: &ApiContext) -> Response {
    let (Some(h), true) = (&ctx.handover, ctx.upgrade) else {
        return error_response(
            400,
            "only a nydusd started with --upgrade and --supervisor takes a session over",
        );
    };
    let _one = ctx.serving.busy();
    if ctx.serving.serves() {
        return error_response(
            409,
            "this nydusd already serves a session: there is nothing to take over",
        );
    }
    match h.prepare(&ctx.open_blobs) {
        Ok(()) => (204, "application/json", Vec::new()),
        Err(e) => {
            warn!("taking the session over: {}", Chain(&e));
            error_response(500, &Chain(&e).to_string())
        }
    }
}

/// `PUT /api/v1/daemon/start`: serves the session taken over (once its predecessor is
/// gone); 204 at once for a daemon already serving.
fn start(ctx: &ApiContext) -> Response {
    let _one = ctx.serving.busy();
    match ctx.serving.state.get() {
        State::Running => return (204, "application/json", Vec::new()),
        State::Stopped => return error_response(409, "the daemon is stopping"),
        State::Init => {}
    }
    let (Some(h), true) = (&ctx.handover, ctx.upgrade) else {
        return error_response(409, "nothing to start");
    };
    match h.clone().serve(ctx.events.clone()) {
        Ok((vfs, transport)) => {
            ctx.serving.set(vfs, transport);
            ctx.serving.state.set(State::Running);
            (204, "application/json", Vec::new())
        }
        Err(e) => {
            warn!("serving the session taken over: {}", Chain(&e));
            let status = if matches!(e, crate::Error::State(_)) {
                409
            } else {
                500
            };
            error_response(status, &Chain(&e).to_string())
        }
    }
}

/// `/api/v1/metrics/files` and `/api/v1/metrics/pattern` of one image.
fn file_metrics(m: &Mounted, req: &Request, pattern: bool) -> Response {
    let latest = match query(req) {
        Ok(q) => q.get("latest").is_some_and(|v| v == "true" || v == "1"),
        Err(r) => return r,
    };
    let (flag, on) = {
        let c = m.fs.file_stats().map(|s| s.config()).unwrap_or_default();
        match (pattern, latest) {
            (true, _) => ("access_pattern", c.access_pattern),
            (false, true) => ("latest_read_files", c.latest_read_files),
            (false, false) => ("iostats_files", c.iostats_files),
        }
    };
    let Some(stats) = m.fs.file_stats().filter(|_| on) else {
        return error_response(
            400,
            &format!(
                "{flag} is off in the config of {}: set \"{flag}\": true to record it",
                m.mountpoint
            ),
        );
    };
    let paths = match m.fs.cache().bootstrap().paths() {
        Ok(p) => p,
        Err(e) => return error_response(500, &format!("walking the bootstrap: {e}")),
    };
    let map = m.fs.inode_map();
    let path = |nid: u64| {
        paths
            .get(&nid)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    };
    let list: Vec<Value> = if pattern {
        stats
            .pattern()
            .into_iter()
            .map(|(nid, r)| {
                let t = r
                    .first_read_time
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                json!({
                    "ino": map.to_fuse(nid),
                    "file_path": path(nid),
                    "nr_read": r.nr_read,
                    "first_access_time_secs": t.as_secs(),
                    "first_access_time_nanos": t.subsec_nanos(),
                })
            })
            .collect()
    } else if latest {
        stats
            .take_latest()
            .into_iter()
            .map(|nid| json!({"ino": map.to_fuse(nid), "file_path": path(nid)}))
            .collect()
    } else {
        stats
            .files()
            .into_iter()
            .map(|(nid, r)| {
                json!({
                    "ino": map.to_fuse(nid),
                    "file_path": path(nid),
                    "nr_open": r.nr_open,
                    "nr_read": r.nr_read,
                    "data_read": r.data_read,
                })
            })
            .collect()
    };
    json_response(200, Value::Array(list))
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Answers one request.
pub fn route(ctx: &ApiContext, req: &Request) -> Response {
    let one = |f: &dyn Fn(&Mounted) -> Response| match select(ctx, req) {
        Ok(m) => f(&m),
        Err(r) => r,
    };
    // A successor changes nothing before it serves: its tree is a placeholder until
    // then, and a save of it would replace the session's.
    let changes = matches!(
        (req.method.as_str(), req.path.as_str()),
        ("POST" | "DELETE", "/api/v1/mount") | ("PUT", "/api/v1/config")
    );
    if changes && ctx.upgrade && ctx.serving.state.get() != State::Running {
        return error_response(
            409,
            "this nydusd (--upgrade) does not serve yet: take a session over and start it first",
        );
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/api/v1/daemon") => {
            let collection: serde_json::Map<String, Value> = ctx
                .serving
                .vfs()
                .mounts()
                .iter()
                .map(|m| {
                    (
                        m.mountpoint.clone(),
                        json!({
                            "mountpoint": m.mountpoint,
                            "fs_type": "rafs",
                            "source": m.source.display().to_string(),
                        }),
                    )
                })
                .collect();
            json_response(
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
                    "supervisor": ctx.handover.as_ref().map(|h| h.supervisor().display().to_string()),
                    "state": ctx.serving.state.get().as_str(),
                    // Upstream fills this with its own config structures, which
                    // nydusctl 2.2 insists on parsing (it panics on anything else):
                    // the images served are listed under `mounts` instead.
                    "backend_collection": {},
                    "mounts": collection,
                }),
            )
        }
        // The exit itself is announced once the reply is out (see `handle`).
        ("PUT", "/api/v1/daemon/exit") => (204, "application/json", Vec::new()),
        ("PUT", "/api/v1/daemon/fuse/sendfd") => sendfd(ctx),
        ("PUT", "/api/v1/daemon/fuse/takeover") => takeover(ctx),
        ("PUT", "/api/v1/daemon/start") => start(ctx),
        ("POST", "/api/v1/mount") => post_mount(ctx, req),
        ("PUT", "/api/v1/config") => put_config(ctx, req),
        ("DELETE", "/api/v1/mount") => delete_mount(ctx, req),
        ("GET", "/api/v1/metrics") => one(&|m| json_response(200, m.metrics.fs_json())),
        ("GET", "/api/v1/metrics/backend") => one(&|m| {
            let cache = m.fs.cache();
            let mut v = m.metrics.backend_json(cache.backend_kind());
            for (k, n) in cache.backend().counters() {
                v[k] = json!(n);
            }
            json_response(200, v)
        }),
        ("GET", "/api/v1/metrics/blobcache") => one(&|m| {
            let cache = m.fs.cache();
            let mut v = m.metrics.cache_json(&cache.underlying_files());
            let (ready, total) = cache.ready_chunks();
            v["ready_chunks"] = json!(ready);
            v["total_chunks"] = json!(total);
            json_response(200, v)
        }),
        ("GET", "/api/v1/metrics/files") => one(&|m| file_metrics(m, req, false)),
        ("GET", "/api/v1/metrics/pattern") => one(&|m| file_metrics(m, req, true)),
        ("GET", "/metrics") => {
            let mounts = ctx.serving.vfs().mounts();
            let labelled: Vec<(String, &metrics::Metrics)> = mounts
                .iter()
                .map(|m| {
                    let kind = m.fs.cache().backend_kind();
                    let labels = if ctx.serving.vfs().is_pseudo() {
                        format!("backend=\"{kind}\",id=\"{}\"", label(&m.mountpoint))
                    } else {
                        format!("backend=\"{kind}\"")
                    };
                    (labels, &*m.metrics)
                })
                .collect();
            (
                200,
                "text/plain; version=0.0.4",
                metrics::prometheus(&labelled).into_bytes(),
            )
        }
        (
            _,
            "/api/v1/daemon"
            | "/api/v1/daemon/exit"
            | "/api/v1/daemon/fuse/sendfd"
            | "/api/v1/daemon/fuse/takeover"
            | "/api/v1/daemon/start"
            | "/metrics"
            | "/api/v1/mount"
            | "/api/v1/config",
        )
        | (
            _,
            "/api/v1/metrics"
            | "/api/v1/metrics/backend"
            | "/api/v1/metrics/blobcache"
            | "/api/v1/metrics/files"
            | "/api/v1/metrics/pattern",
        ) => error_response(405, "method not allowed"),
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
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Serves `stream` on a thread of its own, or answers 503 when [`MAX_CONNECTIONS`] are
/// being served.
fn serve_connection(ctx: &Arc<ApiContext>, active: &Arc<AtomicUsize>, stream: UnixStream) {
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::AcqRel);
        warn!("API: {MAX_CONNECTIONS} connections are being served; answering 503");
        let _ = stream.set_nonblocking(true);
        let _ = reply(
            &stream,
            error_response(503, "too many API connections; try again"),
        );
        return;
    }
    let (ctx, done) = (ctx.clone(), active.clone());
    let spawned = thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            if let Err(e) = handle(&ctx, stream) {
                debug!("API connection: {e}");
            }
            done.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        active.fetch_sub(1, Ordering::AcqRel);
        warn!("API: starting a connection thread: {e}");
    }
}

/// A connection read under one deadline for the whole request: a client sending a byte
/// now and then cannot hold its thread longer than [`REQUEST_DEADLINE`].
struct DeadlineReader {
    stream: UnixStream,
    deadline: std::time::Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the request did not arrive within {REQUEST_DEADLINE:?}"),
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Writes `response` (with `Connection: close`).
fn reply(mut out: &UnixStream, (status, ctype, body): Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    out.write_all(head.as_bytes())
        .and_then(|()| out.write_all(&body))
        .and_then(|()| out.flush())
}

fn handle(ctx: &ApiContext, stream: UnixStream) -> std::io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(DeadlineReader {
        stream: stream.try_clone()?,
        deadline: std::time::Instant::now() + REQUEST_DEADLINE,
    });
    let req = read_request(&mut reader)?;
    let response = match &req {
        Some(req) => route(ctx, req),
        None => error_response(400, "malformed request"),
    };
    let status = response.0;
    let written = reply(&stream, response);
    // Announced after the reply: the daemon may exit as soon as it hears it, and the
    // caller would otherwise see the connection closed without its 204.
    if status == 204 && req.is_some_and(|r| r.method == "PUT" && r.path == "/api/v1/daemon/exit") {
        let _ = ctx.events.send(Event::ApiExit);
    }
    written
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

    #[test]
    fn query_parameters_are_percent_decoded() {
        let req = Request {
            method: "POST".into(),
            path: "/api/v1/mount".into(),
            query: "mountpoint=%2Fsnap%201&x".into(),
            body: Vec::new(),
        };
        let q = query(&req).unwrap();
        assert_eq!(q["mountpoint"], "/snap 1");
        assert_eq!(q["x"], "");
        let bad = Request {
            query: "mountpoint=%2".into(),
            ..req
        };
        assert_eq!(query(&bad).unwrap_err().0, 400);
        assert_eq!(label("a\"b\\"), "a\\\"b\\\\");
    }
}
