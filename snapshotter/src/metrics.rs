//! The snapshotter's own counters, as Prometheus text at `GET /metrics` on
//! `[metrics] address`:
//!
//! * `snapshotter_requests_total{op, code}`: gRPC calls by method and result code;
//! * `snapshotter_remote_layers_total`: nydus data layers answered `ALREADY_EXISTS`
//!   (never downloaded);
//! * `snapshotter_instances_mounted_total`: images mounted through nydusd;
//! * `snapshotter_daemons_started_total`, `snapshotter_daemon_failures_total`: nydusd
//!   processes started, and those that never served;
//! * `snapshotter_auth_refreshes_total`: credentials handed to running daemons;
//! * `snapshotter_failovers_total`: dead daemons whose FUSE session a successor took
//!   over (`recover_policy = "failover"`);
//! * `snapshotter_daemons`: nydusd processes running now (read at each scrape).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The counters (cheap to clone; clones share them).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Requests by op and code.
    pub requests: Family<Vec<(String, String)>, Counter>,
    /// Remote layers.
    pub remote_layers: Counter,
    /// Images mounted.
    pub instances_mounted: Counter,
    /// Daemons started.
    pub daemons_started: Counter,
    /// Daemons that never served.
    pub daemon_failures: Counter,
    /// Credentials refreshed.
    pub auth_refreshes: Counter,
    /// Dead daemons whose session a successor took over.
    pub failovers: Counter,
    /// Daemons running (set before each scrape).
    pub daemons: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("snapshotter");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            requests: Family::default(),
            remote_layers: Counter::default(),
            instances_mounted: Counter::default(),
            daemons_started: Counter::default(),
            daemon_failures: Counter::default(),
            auth_refreshes: Counter::default(),
            failovers: Counter::default(),
            daemons: Gauge::default(),
        };
        registry.register(
            "requests",
            "gRPC requests by method and result code",
            m.requests.clone(),
        );
        registry.register(
            "remote_layers",
            "nydus data layers answered ALREADY_EXISTS without download",
            m.remote_layers.clone(),
        );
        registry.register(
            "instances_mounted",
            "Images mounted through nydusd",
            m.instances_mounted.clone(),
        );
        registry.register(
            "daemons_started",
            "nydusd processes started",
            m.daemons_started.clone(),
        );
        registry.register(
            "daemon_failures",
            "nydusd processes that never served",
            m.daemon_failures.clone(),
        );
        registry.register(
            "auth_refreshes",
            "Credentials handed to running nydusd",
            m.auth_refreshes.clone(),
        );
        registry.register(
            "failovers",
            "Dead nydusd whose FUSE session a successor took over",
            m.failovers.clone(),
        );
        registry.register("daemons", "nydusd processes running", m.daemons.clone());
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }
}

impl Metrics {
    /// Counts one request.
    pub fn request(&self, op: &str, code: tonic::Code) {
        self.requests
            .get_or_create(&vec![
                ("op".to_string(), op.to_string()),
                ("code".to_string(), format!("{code:?}")),
            ])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
