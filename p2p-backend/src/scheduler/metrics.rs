//! Prometheus metrics of the scheduler, served as text at `GET /metrics`.
//!
//! Gauges (read from the state at each scrape): `scheduler_hosts`,
//! `scheduler_seed_hosts`, `scheduler_tasks`, `scheduler_peers{state}`,
//! `scheduler_origin_piece_digests` (pieces whose digest a seed reported from the
//! origin, over all tasks). Counters:
//! `scheduler_answers_total{kind}` (`normal_task`, `need_back_to_source`,
//! `metadata_only`), `scheduler_back_to_source_total{reason}`,
//! `scheduler_child_failures_total{kind}` (`piece`, `origin_piece`, `reschedule`,
//! `peer`), `scheduler_seed_triggers_total{result}` (`started`, `failed`).

use super::state::State;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Labeled<M> = Family<Vec<(String, String)>, M>;

/// The scheduler's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    hosts: Gauge,
    seed_hosts: Gauge,
    tasks: Gauge,
    origin_piece_digests: Gauge,
    peers: Labeled<Gauge>,
    answers: Labeled<Counter>,
    back_to_source: Labeled<Counter>,
    child_failures: Labeled<Counter>,
    seed_triggers: Labeled<Counter>,
}

fn label(key: &str, value: &str) -> Vec<(String, String)> {
    vec![(key.to_string(), value.to_string())]
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("scheduler");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            hosts: Gauge::default(),
            seed_hosts: Gauge::default(),
            tasks: Gauge::default(),
            origin_piece_digests: Gauge::default(),
            peers: Family::default(),
            answers: Family::default(),
            back_to_source: Family::default(),
            child_failures: Family::default(),
            seed_triggers: Family::default(),
        };
        registry.register("hosts", "Announced hosts", m.hosts.clone());
        registry.register(
            "seed_hosts",
            "Announced seed peer hosts",
            m.seed_hosts.clone(),
        );
        registry.register("tasks", "Tasks with peers", m.tasks.clone());
        registry.register(
            "origin_piece_digests",
            "Pieces whose digest a seed peer reported from the origin",
            m.origin_piece_digests.clone(),
        );
        registry.register("peers", "Peers by state", m.peers.clone());
        registry.register("answers", "AnnouncePeer answers by kind", m.answers.clone());
        registry.register(
            "back_to_source",
            "Peers sent to the origin, by reason",
            m.back_to_source.clone(),
        );
        registry.register(
            "child_failures",
            "Failures children reported, by kind",
            m.child_failures.clone(),
        );
        registry.register(
            "seed_triggers",
            "Seed peers asked to download a task, by result",
            m.seed_triggers.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }
}

impl Metrics {
    /// Counts an answer on an `AnnouncePeer` stream.
    pub fn answer(&self, kind: &str) {
        self.answers.get_or_create(&label("kind", kind)).inc();
    }

    /// Counts a peer sent to the origin.
    pub fn back_to_source(&self, reason: &str) {
        self.back_to_source
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// Counts a failure a child reported.
    pub fn child_failure(&self, kind: &str) {
        self.child_failures
            .get_or_create(&label("kind", kind))
            .inc();
    }

    /// Counts a seed trigger.
    pub fn seed_trigger(&self, result: &str) {
        self.seed_triggers
            .get_or_create(&label("result", result))
            .inc();
    }

    /// The text exposition, with gauges read from `state`.
    pub fn render(&self, state: &State) -> String {
        self.hosts.set(state.hosts.len() as i64);
        self.seed_hosts
            .set(state.hosts.values().filter(|h| h.is_seed()).count() as i64);
        self.tasks.set(state.tasks.len() as i64);
        self.origin_piece_digests.set(
            state
                .tasks
                .values()
                .map(|t| t.origin_pieces.len() as i64)
                .sum(),
        );
        for (s, n) in state.peers_by_state() {
            self.peers
                .get_or_create(&label("state", s.name()))
                .set(n as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped; `render` makes the
/// text. A failed accept (e.g. out of file descriptors) is logged and retried.
pub async fn serve(listener: TcpListener, render: impl Fn() -> String + Send + Sync + 'static) {
    let render = Arc::new(render);
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                tracing::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head, bounded in size and time.
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = conn.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}
