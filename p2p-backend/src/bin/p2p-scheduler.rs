//! `p2p-scheduler`: serves Dragonfly's `scheduler.v2` (see `p2p_backend::scheduler`).

use clap::Parser;
use p2p_backend::scheduler::config::Config;
use std::path::PathBuf;

/// Dragonfly's scheduler.v2 for real dfdaemons (dragonfly-client 1.5.10) and our peers:
/// it hands each downloading peer candidate parents, sends seed peers (and, only when no
/// seed can serve, ordinary peers) to the origin, and triggers a seed peer for a task no
/// peer has. dfdaemons find it through their `--dynconfig` file
/// (`scheduler: {addrs: ["IP:PORT"]}`).
#[derive(Parser, Debug)]
#[command(name = "p2p-scheduler", version, verbatim_doc_comment)]
#[command(after_help = CONFIG_HELP)]
struct Args {
    /// The YAML config (Dragonfly's scheduler field names; see below). Without one, the
    /// defaults: gRPC on 0.0.0.0:8002, seed peers triggered, no metrics.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: String,
}

const CONFIG_HELP: &str = "\
Config (YAML; every field optional, defaults shown):
  server:
    listenIP: 0.0.0.0          address the gRPC server binds
    advertiseIP: <listenIP>    address peers use to reach it
    port: 8002                 gRPC port (scheduler.v2 and grpc.health.v1)
  scheduler:
    candidateParentLimit: 4    parents handed out per answer
    retryLimit: 5              answers per AnnouncePeer stream (dfdaemon's maxScheduleCount)
    backToSourceCount: 200     ordinary peers per task that may go to the origin when no
                               seed peer can serve
    peerBackToSource: false    true: ordinary peers go to the origin instead of waiting
                               for a seed peer (the origin then serves more copies)
    seedPeerWaitTimeout: 20s   how long a child waits for a triggered seed peer (a
                               first answer waits at most 8 s: dfdaemon gives up at 10)
    gc:
      hostGCInterval: 1m       how often stale hosts and failed peers are dropped
      hostTTL: 1h              a host not announced for this long is dropped (a host
                               silent for three announce intervals is no longer
                               handed out as a parent)
  seedPeer:
    enable: true               ask seed peers (DfdaemonUpload/DownloadTask) to fetch tasks
  metrics:
    enable: false              Prometheus text at GET /metrics
    addr: 127.0.0.1:8000

Several schedulers: list them all in every dfdaemon's dynconfig; each task goes to one
of them by dfdaemon's consistent hash ring, so its peers meet there.";

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|e| {
        eprintln!("p2p-scheduler: bad --log-level '{}': {e}", args.log_level);
        std::process::exit(2)
    });
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    }
    .unwrap_or_else(|e| {
        eprintln!("p2p-scheduler: {e}");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| {
        eprintln!("p2p-scheduler: starting the runtime: {e}");
        std::process::exit(1)
    });
    let result = runtime.block_on(async move {
        let addr = config.server.listen_addr();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding {addr}: {e}"))?;
        tracing::info!("scheduler.v2 listening on {addr}");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        p2p_backend::scheduler::serve(config, listener, shutdown).await
    });
    if let Err(e) = result {
        eprintln!("p2p-scheduler: {e}");
        std::process::exit(1);
    }
}
