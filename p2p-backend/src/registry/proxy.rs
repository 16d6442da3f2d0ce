//! Blob range reads through the node's P2P peer: nydusd's `proxy` section of the
//! `registry` backend (upstream's fields: `url`, `ping_url`, `fallback`,
//! `check_interval`, `use_http`).
//!
//! The peer is an HTTP proxy in dfdaemon's style (ours, `p2p-peer`, or a dfdaemon): a
//! blob's ranged `GET` goes to it with the blob's absolute URL, and it answers from the
//! swarm. Each request says how much it matters, as upstream nydusd does:
//! `X-Dragonfly-Priority: 6` for a read a reader waits on, `3` for prefetch, and
//! `X-Dragonfly-Use-P2P: true`. When the daemon checks every chunk's digest, requests
//! also carry `X-P2P-Verifies-Chunks: true` (our peer then answers with pieces it has
//! not verified yet), and a chunk that fails its digest is reported to the peer
//! (`POST /api/v1/bad-range`), which drops the piece, keeps its sender out and fetches
//! it again: the caller reads once more.
//!
//! Health, as upstream: with a `ping_url`, a thread `GET`s it every `check_interval`;
//! while it fails, reads go straight to the registry, and they go back through the peer
//! once it answers `200` again. A read through the peer that fails (no answer, an error
//! status, a short body) goes to the registry too when `fallback` is set (the default),
//! and fails otherwise.

use super::Registry;
use crate::{BackendError, Result};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `proxy` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `url`: the peer's HTTP proxy, e.g. `http://127.0.0.1:4001`.
    pub url: String,
    /// `ping_url`: checked every `check_interval`; none: the peer counts as healthy.
    pub ping_url: Option<String>,
    /// `fallback`: a read the peer fails goes to the registry (default true).
    pub fallback: bool,
    /// `check_interval` (default 5 s).
    pub check_interval: Duration,
    /// `use_http`: blob URLs are asked for with `http://` (a peer that cannot look
    /// into TLS still serves them from the swarm).
    pub use_http: bool,
    /// The daemon checks every chunk's digest itself (`X-P2P-Verifies-Chunks`).
    pub verifies: bool,
    /// Retries of a read the peer failed (no answer, a 5xx), before it counts as
    /// failed: the registry backend's `retry_limit`.
    pub retries: u32,
}

/// What a [`PeerProxy`] has done, for metrics and tests.
#[derive(Default, Debug)]
pub struct ProxyCounters {
    /// Reads answered by the peer.
    pub through_peer: AtomicU64,
    /// Reads that went to the registry while the peer was unhealthy or failed.
    pub fallbacks: AtomicU64,
    /// Bad ranges reported to the peer.
    pub reported: AtomicU64,
}

/// Range reads through the peer, with its health checked.
pub struct PeerProxy {
    config: ProxyConfig,
    /// Requests through the peer.
    client: reqwest::Client,
    /// Requests to the peer itself (ping, reports).
    direct: reqwest::Client,
    healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// The registry's `Authorization` for blobs (negotiated once, again on a 401):
    /// used by the peer only if it goes to the registry itself; it never reaches
    /// another peer.
    authorization: Mutex<Option<Option<String>>>,
    /// Counters.
    pub counters: Arc<ProxyCounters>,
}

/// `url` as it may be shown in messages and logs: a password in it (the proxy's
/// `basicAuth`, as `http://user:password@host:port`) masked.
fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

impl PeerProxy {
    /// A proxy for `config`, each request bounded by `timeout` (connecting by
    /// `connect_timeout`); starts the health checks when there is a `ping_url`.
    pub fn new(config: ProxyConfig, timeout: Duration, connect_timeout: Duration) -> Result<Self> {
        let bad = |e: reqwest::Error| {
            BackendError::Config(format!("proxy.url {}: {e}", shown(&config.url)))
        };
        let client = reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(&config.url).map_err(bad)?)
            .connect_timeout(connect_timeout)
            .read_timeout(timeout)
            .build()
            .map_err(bad)?;
        let direct = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .build()
            .map_err(bad)?;
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(ping) = config.ping_url.clone() {
            let (healthy, stop, client) = (healthy.clone(), stop.clone(), direct.clone());
            let every = config.check_interval.max(Duration::from_millis(100));
            let rt = super::shared_runtime().map_err(|e| BackendError::Config(e.to_string()))?;
            std::thread::Builder::new()
                .name("proxy-health".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let ok = super::block_on(rt, async {
                            client
                                .get(&ping)
                                .send()
                                .await
                                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
                        });
                        if ok != healthy.swap(ok, Ordering::AcqRel) {
                            if ok {
                                tracing::info!("the P2P proxy answers {ping} again: reads go through it");
                            } else {
                                tracing::warn!("the P2P proxy does not answer {ping}: reads go to the registry");
                            }
                        }
                        let mut slept = Duration::ZERO;
                        while slept < every && !stop.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(50));
                            slept += Duration::from_millis(50);
                        }
                    }
                })
                .map_err(|e| BackendError::Config(format!("a health check thread: {e}")))?;
        }
        Ok(PeerProxy {
            config,
            client,
            direct,
            healthy,
            stop,
            authorization: Mutex::new(None),
            counters: Arc::default(),
        })
    }

    /// Forgets the negotiated `Authorization` (new credentials).
    pub fn forget_authorization(&self) {
        *self.authorization.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The configuration.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Whether reads go through the peer now.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The URL the peer is asked for: the registry's, `http://` with `use_http`.
    fn url(&self, registry: &Registry, digest: &str) -> String {
        let url = registry.client().blob_url(digest);
        match url.strip_prefix("https://") {
            Some(rest) if self.config.use_http => format!("http://{rest}"),
            _ => url,
        }
    }

    fn authorization(&self, registry: &Registry, renew: bool) -> Result<Option<String>> {
        let mut held = self.authorization.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(a), false) = (&*held, renew) {
            return Ok(a.clone());
        }
        // A registry (or its token server) that cannot be reached does not keep reads
        // from the peer: they go without credentials, and a 401 tries again.
        let a = match registry.block(registry.client().pull_authorization()) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(
                    "negotiating registry access for the P2P proxy: {}; reading without \
                     credentials",
                    crate::error_chain(&e)
                );
                None
            }
        };
        *held = Some(a.clone());
        Ok(a)
    }

    /// Reads `buf.len()` bytes of blob `digest` at `offset` through the peer
    /// (`prefetch`: a background read). Exactly those bytes, or an error.
    pub fn read(
        &self,
        registry: &Registry,
        digest: &str,
        offset: u64,
        buf: &mut [u8],
        prefetch: bool,
    ) -> Result<()> {
        let url = self.url(registry, digest);
        let what = || {
            format!(
                "blob {digest} through the P2P proxy {}",
                shown(&self.config.url)
            )
        };
        let fail = |reason: String| BackendError::Remote {
            what: what(),
            reason,
        };
        if buf.is_empty() {
            return Ok(());
        }
        let (mut renew, mut retries) = (false, self.config.retries);
        loop {
            let auth = self.authorization(registry, renew)?;
            let status = registry.block(self.read_once(&url, auth, offset, &mut *buf, prefetch));
            match status {
                Ok(()) => {
                    self.counters.through_peer.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(ReadError::Unauthorized) if !renew => renew = true,
                Err(ReadError::Unauthorized) => return Err(fail("401 Unauthorized".into())),
                // A peer restarting, a connection reset: again, a little later.
                Err(ReadError::Transient(e)) if retries > 0 => {
                    retries -= 1;
                    tracing::warn!("{}: {e}; trying again", what());
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(ReadError::Transient(e) | ReadError::Other(e)) => return Err(fail(e)),
            }
        }
    }

    async fn read_once(
        &self,
        url: &str,
        auth: Option<String>,
        offset: u64,
        buf: &mut [u8],
        prefetch: bool,
    ) -> std::result::Result<(), ReadError> {
        let last = offset + buf.len() as u64 - 1;
        let mut req = self
            .client
            .get(url)
            .header("Range", format!("bytes={offset}-{last}"))
            .header("X-Dragonfly-Priority", if prefetch { "3" } else { "6" })
            .header("X-Dragonfly-Use-P2P", "true");
        if self.config.verifies {
            req = req.header("X-P2P-Verifies-Chunks", "true");
        }
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ReadError::Transient(chain(&e)))?;
        let skip = match resp.status().as_u16() {
            206 => 0,
            // A registry that ignores ranges, passed on: the whole blob, from its start.
            200 => offset,
            401 => return Err(ReadError::Unauthorized),
            s if s >= 500 => return Err(ReadError::Transient(format!("status {s}"))),
            s => {
                let kind = resp
                    .headers()
                    .get("X-Dragonfly-Error-Type")
                    .and_then(|v| v.to_str().ok())
                    .map(|k| format!(" ({k} error)"))
                    .unwrap_or_default();
                return Err(ReadError::Other(format!("status {s}{kind}")));
            }
        };
        if skip == 0 {
            let want = format!("bytes {offset}-{last}/");
            let range = resp
                .headers()
                .get("Content-Range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !range.starts_with(&want) {
                return Err(ReadError::Other(format!(
                    "Content-Range {range:?} for bytes {offset}-{last}"
                )));
            }
        }
        let mut stream = resp.bytes_stream();
        let (mut filled, mut skipped) = (0, 0u64);
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk.map_err(|e| ReadError::Transient(chain(&e)))?;
            if skipped < skip {
                let n = (skip - skipped).min(chunk.len() as u64) as usize;
                skipped += n as u64;
                let _ = chunk.split_to(n);
            }
            let n = chunk.len().min(buf.len() - filled);
            if skip == 0 && n < chunk.len() {
                return Err(ReadError::Other("more bytes than asked for".into()));
            }
            buf[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == buf.len() && skip > 0 {
                break;
            }
        }
        if filled != buf.len() {
            return Err(ReadError::Other(format!("{filled} of {} bytes", buf.len())));
        }
        Ok(())
    }

    /// Tells the peer that `len` bytes at `offset` of blob `digest` failed their
    /// digest; true when it took the report (the next read may bring other bytes).
    pub fn report_bad(&self, registry: &Registry, digest: &str, offset: u64, len: u64) -> bool {
        let body = serde_json::json!({
            "url": self.url(registry, digest),
            "offset": offset,
            "length": len,
        });
        let endpoint = format!("{}/api/v1/bad-range", self.config.url.trim_end_matches('/'));
        let sent = registry.block(async {
            self.direct
                .post(&endpoint)
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .send()
                .await
        });
        match sent {
            Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT => {
                self.counters.reported.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "blob {digest}: {len} bytes at {offset} failed their digest: reported to \
                     the P2P proxy, reading them again"
                );
                true
            }
            Ok(r) => {
                tracing::warn!(
                    "blob {digest}: reporting bad bytes at {offset} to {}: status {}",
                    shown(&endpoint),
                    r.status()
                );
                false
            }
            Err(e) => {
                // The error's own copy of the URL may hold the password.
                let e = e.without_url();
                tracing::warn!(
                    "blob {digest}: reporting bad bytes to {}: {}",
                    shown(&endpoint),
                    chain(&e)
                );
                false
            }
        }
    }
}

impl Drop for PeerProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

enum ReadError {
    Unauthorized,
    /// No answer, a cut answer, a 5xx: may go right if tried again.
    Transient(String),
    Other(String),
}

fn chain(e: &reqwest::Error) -> String {
    crate::error_chain(e)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_password_in_the_proxy_url_is_never_shown() {
        let s = super::shown("http://node:s3cret@127.0.0.1:4001/api/v1/bad-range");
        assert_eq!(s, "http://node:***@127.0.0.1:4001/api/v1/bad-range");
        assert_eq!(
            super::shown("http://127.0.0.1:4001"),
            "http://127.0.0.1:4001"
        );
    }
}
