//! `p2p-peer`: our node agent in a Dragonfly swarm, in place of `dfdaemon`.
//!
//! * It announces its host to every scheduler of its `--dynconfig` file
//!   (`scheduler.v2.Scheduler/AnnounceHost`, every `scheduler.announceInterval`).
//! * It downloads tasks as dfdaemon does ([`download`]): registered with the scheduler
//!   the task is assigned to, pieces from the candidate parents or, for a seed peer (and
//!   when no seed can serve), from the origin.
//! * It serves what it holds to other peers, real dfdaemons among them:
//!   `dfdaemon.v2.DfdaemonUpload` and `grpc.health.v1` ([`upload`]) on
//!   `host.ip:upload.server.port`, and the pieces over Vortex ([`vortex`]) on
//!   `host.ip:storage.server.tcpPort`.
//! * Its clients read through its HTTP proxy ([`proxy`]) on `host.ip:proxy.server.port`.
//! * Pieces live on disk ([`storage`]) and are served again after a restart.
//!
//! Metrics (Prometheus text, `metrics.server.port`): `peer_origin_bytes_total`,
//! `peer_from_peers_bytes_total`, `peer_served_bytes_total`, each also per task
//! (`peer_origin_task_bytes_total{task}` and so on), `peer_tasks`, and
//! `peer_piece_failures_total{reason}` (`transfer`, `digest`, `blob-digest`, `origin`,
//! `reported`), `peer_children` (connected to fetch pieces now), `peer_parents` (of the
//! downloads under way), `peer_rss_bytes`.

pub mod buffers;
pub mod config;
pub mod download;
pub mod proxy;
pub mod storage;
pub mod upload;
pub mod vortex;

use config::{Config, Dynconfig};
use dragonfly_api::common::v2::{Download, Host};
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::AnnounceHostRequest;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use storage::{Storage, TaskData};
use tokio::sync::watch;

type Labeled = Family<Vec<(String, String)>, Counter>;

/// The peer's counters.
#[derive(Clone)]
pub struct PeerMetrics {
    registry: Arc<Registry>,
    origin: Counter,
    origin_task: Labeled,
    peers: Counter,
    peers_task: Labeled,
    served: Counter,
    served_task: Labeled,
    failures: Labeled,
    /// Whole blobs hashed to verify pieces that no digest of our seeds' verified.
    pub blob_hashes: Counter,
    tasks: Gauge,
    /// Children connected to the Vortex server now.
    pub children: Arc<std::sync::atomic::AtomicI64>,
    children_gauge: Gauge,
    /// Parents of the downloads under way.
    pub parents: Gauge,
    rss: Gauge,
}

fn label(k: &str, v: &str) -> Vec<(String, String)> {
    vec![(k.to_string(), v.to_string())]
}

impl Default for PeerMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("peer");
        let m = PeerMetrics {
            registry: Arc::new(Registry::default()),
            origin: Counter::default(),
            origin_task: Family::default(),
            peers: Counter::default(),
            peers_task: Family::default(),
            served: Counter::default(),
            served_task: Family::default(),
            failures: Family::default(),
            blob_hashes: Counter::default(),
            tasks: Gauge::default(),
            children: Arc::default(),
            children_gauge: Gauge::default(),
            parents: Gauge::default(),
            rss: Gauge::default(),
        };
        r.register(
            "origin_bytes",
            "Bytes fetched from the origin",
            m.origin.clone(),
        );
        r.register(
            "origin_task_bytes",
            "Bytes fetched from the origin, per task",
            m.origin_task.clone(),
        );
        r.register(
            "from_peers_bytes",
            "Piece bytes fetched from other peers",
            m.peers.clone(),
        );
        r.register(
            "from_peers_task_bytes",
            "Piece bytes fetched from other peers, per task",
            m.peers_task.clone(),
        );
        r.register(
            "served_bytes",
            "Piece bytes served to other peers",
            m.served.clone(),
        );
        r.register(
            "served_task_bytes",
            "Piece bytes served to other peers, per task",
            m.served_task.clone(),
        );
        r.register(
            "piece_failures",
            "Pieces that failed, by reason (transfer, digest, blob-digest, origin)",
            m.failures.clone(),
        );
        r.register(
            "blob_hashes",
            "Whole blobs hashed to verify pieces that no digest of our seeds' verified",
            m.blob_hashes.clone(),
        );
        r.register("tasks", "Tasks in storage", m.tasks.clone());
        r.register(
            "children",
            "Children connected to fetch pieces now",
            m.children_gauge.clone(),
        );
        r.register(
            "parents",
            "Parents of the downloads under way",
            m.parents.clone(),
        );
        r.register("rss_bytes", "Resident memory of this peer", m.rss.clone());
        PeerMetrics {
            registry: Arc::new(r),
            ..m
        }
    }
}

/// Adds `n` bytes of `task` to a total and to its per-task family.
fn add(total: &Counter, per_task: &Labeled, task: &str, n: u64) {
    total.inc_by(n);
    per_task.get_or_create(&label("task", task)).inc_by(n);
}

impl PeerMetrics {
    /// `n` bytes of `task` from the origin.
    pub fn from_origin(&self, task: &str, n: u64) {
        add(&self.origin, &self.origin_task, task, n);
    }

    /// `n` bytes of `task` from other peers.
    pub fn from_peers(&self, task: &str, n: u64) {
        add(&self.peers, &self.peers_task, task, n);
    }

    /// `n` bytes of `task` served to other peers.
    pub fn served(&self, task: &str, n: u64) {
        add(&self.served, &self.served_task, task, n);
    }

    /// A piece failed for `reason`.
    pub fn piece_failure(&self, reason: &str) {
        self.failures.get_or_create(&label("reason", reason)).inc();
    }

    /// The text of every metric.
    pub fn render(&self, tasks: usize) -> String {
        self.tasks.set(tasks as i64);
        self.children_gauge
            .set(self.children.load(Ordering::Relaxed));
        // `VmRSS:  123456 kB` of /proc/self/status.
        if let Some(kb) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .split_whitespace()
                    .next()?
                    .parse::<i64>()
                    .ok()
            })
        {
            self.rss.set(kb * 1024);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A download under way, shared by everyone waiting on its task.
#[derive(Clone)]
pub struct Running {
    /// The task, once its length is known.
    pub task: watch::Receiver<Option<Arc<TaskData>>>,
    /// The outcome, once ended.
    pub done: watch::Receiver<Option<Result<(), String>>>,
}

type TaskSender = watch::Sender<Option<Arc<TaskData>>>;

/// Whether a client's header `name` may go on to the origin: not a hop-by-hop header
/// or this proxy's (`Proxy-Authorization`; see [`private_header`]), `Host` (the URL
/// says where) or `X-Dragonfly-*` (for this proxy). Its own `Authorization` and
/// `Cookie` do.
pub(crate) fn for_the_origin(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let hop = private_header(&lower) && lower != "authorization" && lower != "cookie";
    !(hop || lower == "host" || lower.starts_with("x-dragonfly-"))
}

/// Whether a client's header `name` is about its one request, not the task: its range
/// (a piece has its own) or a conditional (`If-*`: a piece must come whole, never as
/// `304 Not Modified` or `412`). Such headers are neither registered with the scheduler
/// nor sent with a task's requests to the origin.
pub(crate) fn of_one_request(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "range" || lower.starts_with("if-")
}

/// Whether request header `name` is a client's own: its credentials (for the origin, or
/// for this proxy), cookies, or a hop-by-hop header. Such headers never go to the
/// scheduler, so they never reach another peer.
pub fn private_header(name: &str) -> bool {
    const PRIVATE: &[&str] = &[
        "authorization",
        "proxy-authorization",
        "cookie",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    PRIVATE.iter().any(|p| name.eq_ignore_ascii_case(p))
}

/// What the peer's servers share.
pub struct PeerInner {
    /// The config.
    pub config: Config,
    /// The host id announced.
    pub host_id: String,
    /// The pieces.
    pub storage: Arc<Storage>,
    /// The counters.
    pub metrics: PeerMetrics,
    dynconfig: Option<PathBuf>,
    schedulers: RwLock<Vec<String>>,
    pub(crate) http: reqwest::Client,
    ids: AtomicU64,
    running: Mutex<HashMap<String, (TaskSender, Running)>>,
    /// Per task, the peers (peer or host ids) that sent bad bytes of it.
    suspects: Mutex<HashMap<String, std::collections::HashSet<String>>>,
    /// Credentials per registry for this peer's own requests to the origin.
    docker_credentials: Option<std::collections::BTreeMap<String, crate::registry::Credentials>>,
    /// `Authorization` negotiated with them, by `registry/repository`.
    own_auth: Mutex<HashMap<String, String>>,
    /// Schedulers whose last host announcement failed.
    down: RwLock<std::collections::HashSet<String>>,
    /// MiB of pieces being fetched from parents (see [`download::PIECE_MEMORY_MIB`]).
    pub(crate) piece_memory: Arc<tokio::sync::Semaphore>,
    /// `proxy.prefetchRateLimit`, for the pieces of a range read's task no reader
    /// waits on.
    pub(crate) prefetch_limit: Option<Arc<vortex::RateLimit>>,
}

impl PeerInner {
    /// A peer of `config`, the schedulers listed in `dynconfig`.
    pub fn new(config: Config, dynconfig: Option<PathBuf>) -> Result<Arc<PeerInner>, String> {
        let storage = Storage::open(&config.storage.dir)
            .map_err(|e| format!("opening storage {}: {e}", config.storage.dir.display()))?;
        let docker_credentials = match &config.back_to_source.docker_config {
            Some(p) => {
                let text = std::fs::read(p)
                    .map_err(|e| format!("backToSource.dockerConfig {}: {e}", p.display()))?;
                Some(
                    crate::registry::docker_config_entries(&text)
                        .map_err(|e| format!("backToSource.dockerConfig {}: {e}", p.display()))?,
                )
            }
            None => None,
        };
        let schedulers = match &dynconfig {
            Some(p) => Dynconfig::load(p)?.scheduler.addrs,
            None => Vec::new(),
        };
        // reqwest is built with rustls and no default provider (as the registry client).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Arc::new(PeerInner {
            host_id: config.host_id(),
            storage: Arc::new(storage),
            metrics: PeerMetrics::default(),
            dynconfig,
            schedulers: RwLock::new(schedulers),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| e.to_string())?,
            ids: AtomicU64::new(0),
            running: Mutex::default(),
            suspects: Mutex::default(),
            down: RwLock::default(),
            docker_credentials,
            own_auth: Mutex::default(),
            piece_memory: Arc::new(tokio::sync::Semaphore::new(download::PIECE_MEMORY_MIB)),
            prefetch_limit: config
                .proxy
                .prefetch_rate_limit
                .map(|r| Arc::new(vortex::RateLimit::new(r))),
            config,
        }))
    }

    /// `senders` (peer or host ids) sent bad bytes of `task`: not asked for it again.
    pub fn suspect(&self, task: &str, senders: &[String]) {
        let mut s = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        s.entry(task.to_string())
            .or_default()
            .extend(senders.iter().cloned());
    }

    /// The peers that sent bad bytes of `task`.
    pub fn suspects_of(&self, task: &str) -> Vec<String> {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether the parent `peer_id` on `host_id` sent bad bytes of `task`.
    pub fn is_suspect(&self, task: &str, peer_id: &str, host_id: &str) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task)
            .is_some_and(|s| s.contains(peer_id) || (!host_id.is_empty() && s.contains(host_id)))
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The schedulers listed now.
    pub fn schedulers(&self) -> Vec<String> {
        self.schedulers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether no scheduler can be reached: none is listed, or the last host
    /// announcement to each failed.
    pub fn schedulers_down(&self) -> bool {
        let listed = self.schedulers();
        let down = self.down.read().unwrap_or_else(|e| e.into_inner());
        listed.iter().all(|a| down.contains(a))
    }

    /// The scheduler task `task_id` goes to, by dfdaemon's consistent hash ring (its own
    /// crate, `dragonfly-hashring`: 512 virtual nodes per scheduler, named by
    /// `ip:port` as dfdaemon names the schedulers of a dynconfig file), so that our
    /// peers and dfdaemons listing the same schedulers meet on one for each task. As
    /// dfdaemon's, the ring holds the schedulers that answer (here: whose last host
    /// announcement succeeded), all of them when none does.
    pub fn scheduler_for(&self, task_id: &str) -> Option<String> {
        let listed = self.schedulers();
        let down = self.down.read().unwrap_or_else(|e| e.into_inner()).clone();
        let up: Vec<&String> = listed.iter().filter(|a| !down.contains(*a)).collect();
        let pool: Vec<&String> = if up.is_empty() {
            listed.iter().collect()
        } else {
            up
        };
        let mut addrs: Vec<std::net::SocketAddr> =
            pool.iter().filter_map(|a| a.parse().ok()).collect();
        addrs.sort();
        addrs.dedup();
        let mut ring = dragonfly_hashring::VNodeHashRing::new();
        for a in &addrs {
            ring.add(a.to_string());
        }
        ring.get(task_id).map(|v| v.name().to_string())
    }

    /// The host as announced.
    pub fn host(&self) -> Host {
        Host {
            id: self.host_id.clone(),
            r#type: u32::from(self.config.seed_peer.enable),
            hostname: self.config.host.hostname.clone(),
            ip: self.config.host.ip.to_string(),
            port: self.config.upload.server.port as i32,
            download_port: self.config.storage.server.tcp_port as i32,
            proxy_port: self.config.proxy.server.port as i32,
            os: std::env::consts::OS.into(),
            ..Default::default()
        }
    }

    /// The download of `download`'s task: the one under way, or a new one.
    pub fn download(self: &Arc<Self>, download: Download) -> Running {
        let task_id = storage::task_id(&download.url);
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, r)) = running.get(&task_id) {
            if r.done.borrow().is_none() {
                return r.clone();
            }
        }
        let (task_tx, task_rx) = watch::channel(None);
        let (done_tx, done_rx) = watch::channel(None);
        let r = Running {
            task: task_rx,
            done: done_rx,
        };
        running.insert(task_id.clone(), (task_tx, r.clone()));
        drop(running);
        let me = self.clone();
        tokio::spawn(async move {
            // A panic in the download still ends it (as failed) for everyone waiting.
            let run = tokio::spawn(download::run(me.clone(), task_id.clone(), download, None));
            let outcome = run
                .await
                .unwrap_or_else(|e| Err(format!("the download ended abnormally: {e}")));
            if let Ok(t) = &outcome {
                me.running(t);
            }
            let _ = done_tx.send(Some(outcome.map(|_| ())));
            if let Some(t) = me.storage.get(&task_id) {
                t.wake();
            }
        });
        r
    }

    /// The task of a download under way is known.
    fn running(&self, t: &Arc<TaskData>) {
        if let Some((tx, _)) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&t.id)
        {
            tx.send_replace(Some(t.clone()));
        }
    }

    /// Removes old tasks from storage (see [`Storage::gc`]), never one being
    /// downloaded, and forgets the ended downloads of those removed (so their files
    /// close and their space is freed).
    pub fn gc(&self) -> Vec<String> {
        let policy = &self.config.gc.policy;
        let removed = self
            .storage
            .gc(policy.task_ttl, policy.capacity, |id| self.is_running(id));
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for id in &removed {
            if running
                .get(id)
                .is_some_and(|(_, r)| r.done.borrow().is_some())
            {
                running.remove(id);
            }
        }
        removed
    }

    /// Checks the tasks found complete at start but not all verified against their blob
    /// digests (see [`TaskData::check_stored`]), one at a time, off the threads that
    /// serve requests: pieces stored unhashed while nydusd read, before the peer
    /// stopped, are served to other peers again once the blob matches.
    pub async fn check_stored_tasks(self: Arc<Self>) {
        for t in self.storage.tasks() {
            if self.is_running(&t.id) {
                continue;
            }
            let t2 = t.clone();
            match tokio::task::spawn_blocking(move || t2.check_stored()).await {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(matched))) => {
                    self.metrics.blob_hashes.inc();
                    if matched {
                        tracing::info!("task {}: the stored blob matches its digest", t.id);
                    } else {
                        tracing::warn!(
                            "task {}: the stored blob does not match its digest: its \
                             unverified pieces were dropped",
                            t.id
                        );
                    }
                }
                Ok(Err(e)) => tracing::warn!("task {}: checking the stored blob: {e}", t.id),
                Err(e) => tracing::warn!("task {}: checking the stored blob: {e}", t.id),
            }
        }
    }

    /// Whether a download of `task_id` is under way.
    pub fn is_running(&self, task_id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task_id)
            .is_some_and(|(_, r)| r.done.borrow().is_none())
    }

    fn origin_request(&self, d: &Download, range: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.get(&d.url).header("Range", range);
        for (k, v) in &d.request_header {
            if !for_the_origin(k) || of_one_request(k) {
                continue;
            }
            req = req.header(k, v);
        }
        req
    }

    /// This peer's own `Authorization` for the registry blob `url`, from
    /// `backToSource.dockerConfig`: pull access to the blob's repository, negotiated
    /// (a bearer token, or basic auth) and kept; `fresh` negotiates again.
    async fn own_authorization(&self, url: &str, fresh: bool) -> Option<String> {
        let entries = self.docker_credentials.as_ref()?;
        let u = reqwest::Url::parse(url).ok()?;
        let host = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str()?),
            None => u.host_str()?.to_string(),
        };
        let repo = u.path().strip_prefix("/v2/")?.split("/blobs/").next()?;
        let credentials = crate::registry::credentials_for(entries, &host)?;
        let key = format!("{host}/{repo}");
        if !fresh {
            if let Some(h) = self
                .own_auth
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
            {
                return Some(h.clone());
            }
        }
        let opts = crate::registry::RegistryOptions {
            insecure: u.scheme() == "http",
            credentials: Some(credentials),
            ..Default::default()
        };
        let client = crate::registry::RegistryClient::new(&key, &opts).ok()?;
        match client.pull_authorization().await {
            Ok(Some(h)) => {
                self.own_auth
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, h.clone());
                Some(h)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("{url}: negotiating pull access with our credentials: {e}");
                None
            }
        }
    }

    /// `GET` of `range` of `d` from the origin: with the request's own `Authorization`,
    /// or else this peer's own credentials (negotiated again once on a 401).
    async fn origin_get(&self, d: &Download, range: &str) -> Result<reqwest::Response, String> {
        let brought = d
            .request_header
            .keys()
            .any(|k| k.eq_ignore_ascii_case("authorization"));
        let mut fresh = false;
        loop {
            let mut req = self.origin_request(d, range);
            let own = match brought {
                true => None,
                false => self.own_authorization(&d.url, fresh).await,
            };
            if let Some(h) = &own {
                req = req.header("Authorization", h);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| format!("the origin {} ({range}): {e}", d.url))?;
            if resp.status().as_u16() == 401 && own.is_some() && !fresh {
                fresh = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// The length of `d`'s content, from the origin (a 1-byte range request).
    pub async fn origin_length(&self, d: &Download) -> Result<u64, String> {
        let task = storage::task_id(&d.url);
        let resp = self.origin_get(d, "bytes=0-0").await?;
        let status = resp.status();
        let total = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|n| n.parse::<u64>().ok());
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        self.metrics.from_origin(&task, body.len() as u64);
        match (status.as_u16(), total) {
            (206, Some(n)) => Ok(n),
            (200, _) => Ok(body.len() as u64),
            (416, _) => Ok(0),
            (s, _) => Err(format!("the origin {} answered {s}", d.url)),
        }
    }

    /// `len` bytes at `offset` of `d`'s content, from the origin: exactly those, or an
    /// error.
    pub async fn origin_range(
        &self,
        d: &Download,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, String> {
        let task = storage::task_id(&d.url);
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let resp = self.origin_get(d, &range).await?;
        let status = resp.status().as_u16();
        let content_range = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status == 206
            && !content_range
                .as_deref()
                .is_some_and(|c| c.starts_with(&format!("bytes {offset}-{}/", offset + len - 1)))
        {
            self.metrics.piece_failure("origin");
            return Err(format!(
                "the origin {} answered {range} with Content-Range {content_range:?}",
                d.url
            ));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("the origin {} ({range}): {e}", d.url))?;
        self.metrics.from_origin(&task, body.len() as u64);
        let data = match status {
            206 if body.len() as u64 == len => body.to_vec(),
            200 if body.len() as u64 >= offset + len => {
                body[offset as usize..(offset + len) as usize].to_vec()
            }
            s => {
                self.metrics.piece_failure("origin");
                return Err(format!(
                    "the origin {} answered {s} with {} bytes for {range}",
                    d.url,
                    body.len()
                ));
            }
        };
        Ok(data)
    }

    /// Announces the host to every scheduler, now and every `announceInterval`; reads
    /// the dynconfig file again every `refreshInterval`.
    pub async fn announce_forever(self: Arc<Self>) {
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            if let Some(p) = &self.dynconfig {
                if last_refresh.elapsed() >= self.config.dynconfig.refresh_interval {
                    last_refresh = tokio::time::Instant::now();
                    match Dynconfig::load(p) {
                        Ok(d) => {
                            *self.schedulers.write().unwrap_or_else(|e| e.into_inner()) =
                                d.scheduler.addrs
                        }
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
            }
            // All at once: an unreachable scheduler does not delay the others.
            let all = self.schedulers();
            let me: &PeerInner = &self;
            let rounds = all.iter().map(|s| async move {
                let result = me.announce(s).await;
                let mut down = me.down.write().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(()) => {
                        down.remove(s);
                    }
                    Err(e) => {
                        if down.insert(s.clone()) {
                            tracing::warn!("announcing the host to {s}: {e}; left out of the ring");
                        }
                    }
                }
            });
            futures_util::future::join_all(rounds).await;
            tokio::time::sleep(self.config.scheduler.announce_interval).await;
        }
    }

    async fn announce(&self, scheduler: &str) -> Result<(), String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{scheduler}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        SchedulerClient::new(channel)
            .announce_host(AnnounceHostRequest {
                host: Some(self.host()),
                interval: prost_wkt_types::Duration::try_from(
                    self.config.scheduler.announce_interval,
                )
                .ok(),
            })
            .await
            .map_err(|e| e.message().to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_go_where_dfdaemons_ring_sends_them_and_never_to_a_scheduler_that_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let dyn_path = dir.path().join("dyn.yaml");
        let addrs = ["127.0.0.9:8002", "127.0.0.7:8002", "127.0.0.8:8002"];
        std::fs::write(
            &dyn_path,
            format!("scheduler:\n  addrs: [{}]\n", addrs.join(", ")),
        )
        .unwrap();
        let mut config = Config::default();
        config.storage.dir = dir.path().join("storage");
        let peer = PeerInner::new(config, Some(dyn_path)).unwrap();
        let mut ring = dragonfly_hashring::VNodeHashRing::new();
        for a in addrs {
            ring.add(a.to_string());
        }
        let ids: Vec<String> = (0..64).map(|i| format!("{i:064x}")).collect();
        for id in &ids {
            assert_eq!(
                peer.scheduler_for(id).as_deref(),
                Some(ring.get(id).unwrap().name())
            );
        }
        peer.down.write().unwrap().insert(addrs[0].to_string());
        assert!(ids
            .iter()
            .all(|id| peer.scheduler_for(id).as_deref() != Some(addrs[0])));
        for a in addrs {
            peer.down.write().unwrap().insert(a.to_string());
        }
        assert!(
            peer.scheduler_for(&ids[0]).is_some(),
            "all down: all of them"
        );
    }

    #[test]
    fn gc_forgets_the_ended_downloads_of_the_tasks_it_removes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.storage.dir = dir.path().join("storage");
        config.gc.policy.task_ttl = std::time::Duration::ZERO;
        let peer = PeerInner::new(config, None).unwrap();
        let t = peer.storage.create("done", "u", 10, 4).unwrap();
        let (task_tx, task_rx) = watch::channel(Some(t.clone()));
        let (_done_tx, done_rx) = watch::channel(Some(Ok(())));
        peer.running.lock().unwrap().insert(
            "done".into(),
            (
                task_tx,
                Running {
                    task: task_rx,
                    done: done_rx,
                },
            ),
        );
        drop(t);
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert_eq!(peer.gc(), ["done"]);
        assert!(peer.running.lock().unwrap().is_empty());
        assert!(!dir.path().join("storage/tasks/done").exists());
    }
}
