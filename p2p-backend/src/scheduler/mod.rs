//! `p2p-scheduler`: Dragonfly's `scheduler.v2` for real dfdaemons and our peers.
//!
//! dfdaemons (dragonfly-client 1.5.10) run under it without Dragonfly's manager: each
//! lists the scheduler in its `--dynconfig` file (`scheduler: {addrs: [ip:port]}`).
//! It serves `grpc.health.v1` (SERVING, which dfdaemon checks before it starts) and
//! `scheduler.v2.Scheduler` for standard tasks ([`service`]); the rest answer
//! UNIMPLEMENTED. The model and the choice of parents are in [`state`], the config in
//! [`config`], the peers it calls in [`seed`], the metrics in [`metrics`].
//!
//! **Several schedulers.** A dfdaemon announces its host to every scheduler it lists
//! and sends each task to one of them, by a consistent hash ring over the task id, so
//! all peers of a task meet on one scheduler as long as they list the same schedulers
//! (the same addresses, in any order). The schedulers share no state. To run three:
//! start three `p2p-scheduler`s (each with its own `server.port` or `listenIP`) and
//! list all three in every dfdaemon's dynconfig file.
//!
//! **Restarts.** The state lives in memory. A restarted scheduler serves new downloads
//! as soon as the hosts have announced themselves again (every
//! `scheduler.announceInterval` of the dfdaemon config); until then a registration
//! from an unknown host is refused and that dfdaemon goes to the origin. dfdaemons do
//! not re-announce the tasks they hold, so for a task it knows no peer of, the
//! scheduler first asks every announced host (`DfdaemonUpload/StatTask`) whether it
//! holds it, and hands those out as parents, before it triggers a seed peer: a seed
//! peer that holds the task serves it from its storage, so the origin serves no
//! second copy either way.

pub mod config;
pub mod metrics;
pub mod seed;
pub mod service;
pub mod state;

use config::Config;
use dragonfly_api::scheduler::v2::scheduler_server::SchedulerServer;
use metrics::Metrics;
use service::SchedulerService;
use std::future::Future;
use tokio::net::TcpListener;

/// Largest gRPC message taken (a register with its headers, a reschedule listing its
/// parents); tonic answers bigger ones with RESOURCE_EXHAUSTED.
pub const MAX_MESSAGE_SIZE: usize = 4 << 20;

/// The connections a gRPC server takes from `listener`, with Nagle's algorithm off
/// (a small answer is not held back until the client's delayed ACK, 40 ms on Linux)
/// and TCP keepalives (peers that vanished are found).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}

/// Serves the scheduler on `listener` (and its metrics, if enabled) until `shutdown`
/// resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let metrics = Metrics::default();
    let service = SchedulerService::new(config.clone(), metrics.clone());
    // Background tasks end with the server.
    let mut background = tokio::task::JoinSet::new();
    if config.metrics.enable {
        let listener = TcpListener::bind(config.metrics.addr)
            .await
            .map_err(|e| format!("binding metrics address {}: {e}", config.metrics.addr))?;
        let inner = service.inner();
        background.spawn(async move {
            let render = move || inner.metrics.render(&inner.state());
            metrics::serve(listener, render).await;
        });
    }
    {
        let inner = service.inner();
        let gc = config.scheduler.gc.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(gc.host_gc_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (hosts, peers) = inner.state().collect_garbage(gc.host_ttl);
                if hosts + peers > 0 {
                    tracing::info!("dropped {hosts} stale hosts and {peers} peers");
                }
            }
        });
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<SchedulerServer<SchedulerService>>()
        .await;
    let scheduler = SchedulerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // Keepalives find peers that vanished without closing their streams, so their
    // stream tasks end and their peers stop being handed out.
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(scheduler)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
        .map_err(|e| format!("gRPC server: {e}"));
    background.abort_all();
    result
}
