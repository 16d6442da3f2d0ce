//! The HTTP proxy in dfdaemon's style: a `GET` whose URL (without its query) matches
//! one of `proxy.rules` goes through the swarm; anything else goes to the origin as it
//! came. In registry-mirror mode the request has no host in its URI and the origin is
//! named by containerd's `ns=` query parameter (or the `X-Dragonfly-Registry` header).
//!
//! Through the swarm, a request with one `Range` is answered `206` with exactly those
//! bytes, as soon as the pieces holding them are stored; without one, `200` with the
//! whole task, piece after piece as they are stored. When the swarm fails before the
//! first byte went out, the request goes to the origin instead. Responses carry
//! `X-Dragonfly-Task-ID`; errors made here carry `X-Dragonfly-Error-Type: proxy`.
//!
//! `GET /healthy` (origin-form, to the proxy's address) answers `200` while the proxy
//! serves: point nydusd's `proxy.ping_url` at it.
//!
//! With `proxy.server.basicAuth`, every request but those for the proxy's own
//! `/healthy` (`CONNECT` and `POST /api/v1/bad-range` too) without its credentials is
//! answered `407` and goes nowhere (see [`super::config::BasicAuth`]).
//!
//! `CONNECT` opens a tunnel (HTTPS through the proxy); what goes through it is not
//! looked into, so it never goes through the swarm: to share HTTPS registries' blobs,
//! use mirror mode (`proxy.registryMirror.addr: https://...`) or nydusd's `use_http`.
//!
//! While no scheduler answers (the last host announcement to each failed), a task not
//! stored or under way goes to the origin at once.
//!
//! **Priorities.** A read a client waits on (`X-Dragonfly-Priority` above 3, or none)
//! marks the piece it waits for, and the download fetches marked pieces first: at most
//! three of its four pieces under way are ones nobody waits on, so a marked piece
//! starts at once. A range read also starts the fetch of the rest of its task in the
//! background (dfdaemon's `prefetch`), at most `proxy.prefetchRateLimit` fast; a
//! prefetch read (priority 3 or below, as nydusd's prefetch sends) marks nothing. While
//! such range reads go on, that background fetch keeps just ahead of them (one piece at
//! a time, at most 4 pieces past the last one read): the reader's own work keeps its
//! share of the CPU. A read of the whole task is not paced so.
//!
//! **Clients that verify.** A client answers only with pieces verified against a
//! digest their sender did not give (see [`super::storage::PieceMeta::verified`]),
//! unless it sends `X-P2P-Verifies-Chunks: true`: it checks what it reads itself (as
//! nydusd checks every chunk against the bootstrap) and may have a piece as soon as it
//! is stored. Such a client reports the bytes it found bad with
//! `POST /api/v1/bad-range` (origin-form, to the proxy's address) and the body
//! `{"url": URL, "offset": N, "length": N}`: the pieces holding them are dropped
//! (unless verified: then `409`), their senders are not asked for the task again (and
//! are reported to the scheduler when the download meets them as parents), and the
//! pieces are fetched again; `204`. While such a client reads a blob (its URL names
//! the digest), the pieces fetched from parents are not hashed: the blob's digest
//! verifies them once the client has stopped reading (see `check_whole` in
//! `download.rs`), and until then none of them goes to another peer.

use super::buffers;
use super::storage::{self, TaskData};
use super::PeerInner;
use bytes::Bytes;
use dragonfly_api::common::v2::Download;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Body = BoxBody<Bytes, std::io::Error>;

/// `X-Dragonfly-Priority` of prefetch reads (nydusd's; on-demand reads are 6, the
/// default): at or below it a read marks no piece as waited on.
const PRIORITY_PREFETCH: i32 = 3;

/// How long a client waits for the task to start in the swarm.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn full(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

fn proxy_error(status: StatusCode, text: String) -> Response<Body> {
    let mut r = full(status, text);
    r.headers_mut().insert(
        "X-Dragonfly-Error-Type",
        "proxy".parse().expect("a header value"),
    );
    r
}

/// Whether `value`, a request's `Proxy-Authorization` or `Authorization`, carries this
/// proxy's own credentials (`proxy.server.basicAuth`).
fn proxys_credentials(peer: &PeerInner, value: &hyper::header::HeaderValue) -> bool {
    let auth = peer.config.proxy.server.basic_auth.as_ref();
    auth.is_some_and(|a| a.admits(value.as_bytes()))
}

/// Serves the proxy on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, peer: Arc<PeerInner>) {
    let rules: Vec<regex::Regex> = peer
        .config
        .proxy
        .rules
        .iter()
        .filter_map(|r| regex::Regex::new(&r.regex).ok())
        .collect();
    let rules = Arc::new(rules);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // A body's last small write is not held back for the client's delayed ACK.
        let _ = sock.set_nodelay(true);
        let (peer, rules) = (peer.clone(), rules.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (peer, rules) = (peer.clone(), rules.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(peer, &rules, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service)
                .with_upgrades()
                .await;
        });
    }
}

/// The absolute URL a request is for: its URI in proxy mode; in mirror mode (no host)
/// on the registry named by `X-Dragonfly-Registry`, else by `ns=` (with the scheme of
/// `mirror`, `proxy.registryMirror.addr`, when it names the same host; else `https`),
/// else `mirror`.
fn target(req: &Request<Incoming>, mirror: Option<&str>) -> Result<String, String> {
    let uri = req.uri();
    if uri.host().is_some() {
        return Ok(uri.to_string());
    }
    let mirror = mirror.map(|m| m.trim_end_matches('/'));
    let registry = req
        .headers()
        .get("X-Dragonfly-Registry")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim_end_matches('/').to_string())
        .or_else(|| {
            // containerd sends `ns=host%3Aport`.
            let query = reqwest::Url::parse(&format!("http://q/?{}", uri.query()?)).ok()?;
            let ns = query.query_pairs().find(|(k, _)| k == "ns")?.1.into_owned();
            let ns = ns.as_str();
            Some(match mirror {
                Some(m) if m.split_once("://").is_some_and(|(_, host)| host == ns) => m.to_string(),
                _ => format!("https://{ns}"),
            })
        })
        .or_else(|| mirror.map(str::to_string))
        .ok_or_else(|| {
            "a request without a host, without ns= or X-Dragonfly-Registry, and no \
             proxy.registryMirror.addr"
                .to_string()
        })?;
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Ok(format!("{registry}{path_and_query}"))
}

/// A single `bytes=a-b`, `bytes=a-` or `bytes=-n` range of a `len`-byte body, as
/// (first, last) inclusive; `Err` when it cannot be satisfied.
pub fn parse_range(value: &str, len: u64) -> Result<(u64, u64), String> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or_else(|| format!("range {value:?} is not in bytes"))?;
    if spec.contains(',') {
        return Err(format!("range {value:?}: several ranges are not served"));
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| format!("range {value:?} has no '-'"))?;
    let bad = || format!("range {value:?} does not fit a body of {len} bytes");
    let (first, last) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| bad())?;
            if n == 0 || len == 0 {
                return Err(bad());
            }
            (len.saturating_sub(n), len - 1)
        }
        (a, "") => (a.parse().map_err(|_| bad())?, len.saturating_sub(1)),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            (a, b.min(len.saturating_sub(1)))
        }
    };
    if first > last || first >= len {
        return Err(bad());
    }
    Ok((first, last))
}

/// The body of `POST /api/v1/bad-range`.
#[derive(serde::Deserialize)]
struct BadRange {
    url: String,
    offset: u64,
    length: u64,
}

async fn bad_range(peer: &Arc<PeerInner>, req: Request<Incoming>) -> Response<Body> {
    let body = match tokio::time::timeout(Duration::from_secs(10), req.into_body().collect()).await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => return proxy_error(StatusCode::BAD_REQUEST, "reading the body".into()),
    };
    if body.len() > 64 << 10 {
        return proxy_error(StatusCode::PAYLOAD_TOO_LARGE, "a body over 64 KiB".into());
    }
    let r: BadRange = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return proxy_error(StatusCode::BAD_REQUEST, format!("the body: {e}")),
    };
    let task_id = storage::task_id(&r.url);
    let Some(t) = peer.storage.get(&task_id) else {
        return proxy_error(StatusCode::NOT_FOUND, format!("task {task_id} is not here"));
    };
    if r.length == 0
        || r.offset
            .checked_add(r.length)
            .is_none_or(|end| end > t.content_length)
    {
        return proxy_error(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!(
                "{}+{} is not within the task's {} bytes",
                r.offset, r.length, t.content_length
            ),
        );
    }
    let first = (r.offset / t.piece_length) as u32;
    let last = ((r.offset + r.length - 1) / t.piece_length) as u32;
    let pieces: Vec<_> = (first..=last).filter_map(|n| t.piece(n)).collect();
    if pieces.iter().any(|p| p.verified) {
        return proxy_error(
            StatusCode::CONFLICT,
            format!(
                "pieces {first}..={last} of task {task_id} were verified against a digest their \
                 sender did not give: the bad bytes are not theirs"
            ),
        );
    }
    let senders: Vec<String> = pieces.iter().filter_map(|p| p.parent.clone()).collect();
    // Dropping writes the record (a sync): off the threads that serve requests.
    let (t2, numbers) = (
        t.clone(),
        pieces.iter().map(|p| p.number).collect::<Vec<_>>(),
    );
    let _ = tokio::task::spawn_blocking(move || {
        for n in numbers {
            t2.drop_piece(n);
        }
    })
    .await;
    peer.metrics.piece_failure("reported");
    peer.suspect(&task_id, &senders);
    tracing::warn!(
        "task {task_id}: a client found {}+{} bad: pieces {first}..={last} dropped, {senders:?} \
         suspected; fetching them again",
        r.offset,
        r.length
    );
    let _ = peer.download(Download {
        url: t.url.clone(),
        enable_task_id_based_blob_digest: storage::blob_digest(&t.url).is_some(),
        ..Default::default()
    });
    let mut ok = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *ok.status_mut() = StatusCode::NO_CONTENT;
    ok
}

async fn handle(
    peer: Arc<PeerInner>,
    rules: &[regex::Regex],
    req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().host().is_none() && req.uri().path() == "/healthy" {
        return full(StatusCode::OK, "OK".into());
    }
    if peer.config.proxy.server.basic_auth.is_some() {
        let admitted = [
            hyper::header::PROXY_AUTHORIZATION,
            hyper::header::AUTHORIZATION,
        ]
        .iter()
        .filter_map(|h| req.headers().get(h))
        .any(|v| proxys_credentials(&peer, v));
        if !admitted {
            let mut r = proxy_error(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "this proxy needs the credentials of proxy.server.basicAuth".into(),
            );
            r.headers_mut().insert(
                hyper::header::PROXY_AUTHENTICATE,
                "Basic realm=\"p2p-peer\"".parse().expect("a header value"),
            );
            return r;
        }
    }
    if req.method() == hyper::Method::CONNECT {
        return tunnel(req).await;
    }
    if req.uri().host().is_none() && req.uri().path() == "/api/v1/bad-range" {
        if req.method() != hyper::Method::POST {
            return proxy_error(StatusCode::METHOD_NOT_ALLOWED, "POST a bad range".into());
        }
        return bad_range(&peer, req).await;
    }
    let mirror = peer.config.proxy.registry_mirror.addr.as_deref();
    let url = match target(&req, mirror) {
        Ok(u) => u,
        Err(e) => return proxy_error(StatusCode::BAD_REQUEST, e),
    };
    let bare = url.split(['?', '#']).next().unwrap_or(&url).to_string();
    let p2p = req.method() == hyper::Method::GET
        && (rules.iter().any(|r| r.is_match(&bare))
            || req
                .headers()
                .get("X-Dragonfly-Use-P2P")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")));
    if !p2p {
        return to_origin(&peer, &url, &req).await;
    }
    match through_swarm(&peer, &url, &req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("{url}: through the swarm: {e}; going to the origin");
            to_origin(&peer, &url, &req).await
        }
    }
}

/// `CONNECT host:port`: a tunnel to it, once it is connected (`502` when it cannot be,
/// `504` after 10 s). What goes through (TLS) is not looked into, so it never goes
/// through the swarm.
async fn tunnel(req: Request<Incoming>) -> Response<Body> {
    let Some(addr) = req.uri().authority().map(|a| a.to_string()) else {
        return proxy_error(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
    };
    let target = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return proxy_error(StatusCode::BAD_GATEWAY, format!("{addr}: {e}")),
        Err(_) => {
            return proxy_error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("{addr}: no connection in 10 s"),
            )
        }
    };
    tokio::spawn(async move {
        let mut target = target;
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                let mut up = hyper_util::rt::TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut up, &mut target).await;
            }
            Err(e) => tracing::warn!("CONNECT {addr}: {e}"),
        }
    });
    full(StatusCode::OK, String::new())
}

/// The request sent on to the origin as it came (without `Host`).
async fn to_origin(peer: &PeerInner, url: &str, req: &Request<Incoming>) -> Response<Body> {
    let method = match reqwest::Method::from_bytes(req.method().as_str().as_bytes()) {
        Ok(m) => m,
        Err(e) => return proxy_error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mut out = peer.http.request(method, url);
    for (k, v) in req.headers() {
        // The client's own credentials go on; this proxy's (dfdaemon's way) do not.
        let ours = k == hyper::header::AUTHORIZATION && proxys_credentials(peer, v);
        if ours || !super::for_the_origin(k.as_str()) {
            continue;
        }
        out = out.header(k.as_str(), v.as_bytes());
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => return proxy_error(StatusCode::BAD_GATEWAY, format!("the origin {url}: {e}")),
    };
    let mut r = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        r = r.header(k.as_str(), v.as_bytes());
    }
    let task = storage::task_id(url);
    let metrics = peer.metrics.clone();
    let stream = futures_util::StreamExt::map(resp.bytes_stream(), move |c| {
        c.map(|b| {
            metrics.from_origin(&task, b.len() as u64);
            Frame::data(b)
        })
        .map_err(std::io::Error::other)
    });
    r.body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|e| proxy_error(StatusCode::BAD_GATEWAY, e.to_string()))
}

/// Waits for the task of `running` (its length known), or why it failed.
async fn started(running: &super::Running) -> Result<Arc<TaskData>, String> {
    let (mut task, mut done) = (running.task.clone(), running.done.clone());
    let wait = async {
        loop {
            if let Some(t) = task.borrow_and_update().clone() {
                return Ok(t);
            }
            if let Some(r) = done.borrow_and_update().clone() {
                return match r {
                    Ok(()) => Err("the download ended without a task".to_string()),
                    Err(e) => Err(e),
                };
            }
            tokio::select! {
                _ = task.changed() => {}
                _ = done.changed() => {}
            }
        }
    };
    tokio::time::timeout(START_TIMEOUT, wait)
        .await
        .map_err(|_| format!("the swarm did not start the task within {START_TIMEOUT:?}"))?
}

async fn through_swarm(
    peer: &Arc<PeerInner>,
    url: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, String> {
    let mut headers = std::collections::HashMap::new();
    for (k, v) in req.headers() {
        // This proxy's credentials (dfdaemon's way) are not the origin's.
        if k == hyper::header::AUTHORIZATION && proxys_credentials(peer, v) {
            continue;
        }
        if let Ok(v) = v.to_str() {
            headers.insert(k.as_str().to_string(), v.to_string());
        }
    }
    let priority = headers
        .get("x-dragonfly-priority")
        .and_then(|p| p.parse().ok())
        .unwrap_or(6);
    // A range read fetches the rest of the task too, in the background (dfdaemon's
    // `prefetch`); its own pieces go first unless it is itself a prefetch.
    let urgent = priority > PRIORITY_PREFETCH;
    let download = Download {
        url: url.to_string(),
        prefetch: req.headers().contains_key(hyper::header::RANGE)
            && !req
                .headers()
                .get("X-Dragonfly-Prefetch")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"false")),
        request_header: headers,
        priority,
        enable_task_id_based_blob_digest: storage::blob_digest(url).is_some(),
        ..Default::default()
    };
    let task_id = storage::task_id(url);
    let t = match peer.storage.get(&task_id).filter(|t| t.ready()) {
        Some(t) => t,
        // A download would wait for a scheduler to come back: the client is not kept
        // waiting (the caller goes to the origin).
        None if peer.schedulers_down() && !peer.is_running(&task_id) => {
            return Err("no scheduler answers".into());
        }
        None => started(&peer.download(download)).await?,
    };
    let range = match req.headers().get(hyper::header::RANGE) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|e| e.to_string())?;
            match parse_range(v, t.content_length) {
                Ok(r) => Some(r),
                Err(e) => {
                    let mut r = proxy_error(StatusCode::RANGE_NOT_SATISFIABLE, e);
                    r.headers_mut().insert(
                        "Content-Range",
                        format!("bytes */{}", t.content_length)
                            .parse()
                            .expect("a header value"),
                    );
                    return Ok(r);
                }
            }
        }
    };
    let verifies = req
        .headers()
        .get("X-P2P-Verifies-Chunks")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let (first, last) = range.unwrap_or((0, t.content_length.saturating_sub(1)));
    let len = if t.content_length == 0 {
        0
    } else {
        last - first + 1
    };
    // The first bytes must be there before the answer goes out: a failure before that
    // still goes to the origin.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    // Only range reads pace the rest of the task: a whole-task read is all wanted.
    let paces = urgent && range.is_some();
    let first_chunk = next_chunk(peer, &t, first, last, !verifies, urgent, paces).await?;
    let mut at = first + first_chunk.len() as u64;
    let _ = tx.send(Ok(Frame::data(first_chunk))).await;
    let (peer2, t2) = (peer.clone(), t.clone());
    tokio::spawn(async move {
        while len > 0 && at <= last {
            match next_chunk(&peer2, &t2, at, last, !verifies, urgent, paces).await {
                Ok(c) => {
                    at += c.len() as u64;
                    if tx.send(Ok(Frame::data(c))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Cut short, never silently: the client sees the body end early.
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            }
        }
    });
    let mut r = Response::builder()
        .status(if range.is_some() { 206 } else { 200 })
        .header("Content-Length", len.to_string())
        .header("X-Dragonfly-Task-ID", &t.id)
        .header("Accept-Ranges", "bytes");
    if range.is_some() {
        r = r.header(
            "Content-Range",
            format!("bytes {first}-{last}/{}", t.content_length),
        );
    }
    r.body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .map_err(|e| e.to_string())
}

/// The bytes from `at` to the end of its piece (or `last`), once that piece is stored
/// (and verified, with `verified_only`); an `urgent` reader's piece is fetched ahead of
/// those nobody waits on; a reader that `paces` keeps the rest of the task's download
/// close ahead of it (see [`TaskData::reader_at`]).
async fn next_chunk(
    peer: &PeerInner,
    t: &Arc<TaskData>,
    at: u64,
    last: u64,
    verified_only: bool,
    urgent: bool,
    paces: bool,
) -> Result<Bytes, String> {
    if t.content_length == 0 {
        return Ok(Bytes::new());
    }
    let number = (at / t.piece_length) as u32;
    let (offset, length) = t.piece_range(number).ok_or("past the end")?;
    // At most 1 MiB at a time: a slow client holds little memory.
    let end = (offset + length - 1).min(last).min(at + (1 << 20) - 1);
    let mut changes = t.subscribe();
    let mut _want = None;
    if paces {
        t.reader_at(number, !verified_only);
    }
    loop {
        changes.borrow_and_update();
        // Read on a blocking thread: a cold page cache means disk waits. Into a kept
        // buffer, which goes back when the client has been sent it.
        let t2 = t.clone();
        let mut buf = buffers::SLICES.take((end - at + 1) as usize);
        let (buf, read) = tokio::task::spawn_blocking(move || {
            let r = t2.read_into(at, &mut buf, verified_only);
            (buf, r)
        })
        .await
        .map_err(|e| e.to_string())?;
        match read {
            Ok(true) => return Ok(buffers::SLICES.bytes(buf)),
            Ok(false) => buffers::SLICES.give(buf),
            Err(e) => {
                buffers::SLICES.give(buf);
                return Err(e.to_string());
            }
        }
        let usable = t
            .piece(number)
            .is_some_and(|p| p.verified || !verified_only);
        if !peer.is_running(&t.id) && !usable {
            return Err(format!("piece {number} of task {} did not come", t.id));
        }
        if urgent && _want.is_none() {
            _want = Some(if verified_only {
                t.want_verified(number)
            } else {
                t.want(number)
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_are_exact_or_refused() {
        assert_eq!(parse_range("bytes=0-0", 10), Ok((0, 0)));
        assert_eq!(parse_range("bytes=2-", 10), Ok((2, 9)));
        assert_eq!(parse_range("bytes=-3", 10), Ok((7, 9)));
        assert_eq!(parse_range("bytes=5-100", 10), Ok((5, 9)));
        assert!(parse_range("bytes=10-", 10).is_err());
        assert!(parse_range("bytes=3-2", 10).is_err());
        assert!(parse_range("bytes=0-1,3-4", 10).is_err());
        assert!(parse_range("items=0-1", 10).is_err());
        assert!(parse_range("bytes=-0", 10).is_err());
    }
}
