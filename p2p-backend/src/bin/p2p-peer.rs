//! `p2p-peer`: our peer daemon in a Dragonfly swarm (see `p2p_backend::peer`).

use clap::Parser;
use p2p_backend::peer::config::Config;
use p2p_backend::peer::PeerInner;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A peer in a Dragonfly swarm, in place of dfdaemon: it serves the pieces it holds to
/// other peers (dfdaemon.v2.DfdaemonUpload and Vortex), downloads tasks through the
/// scheduler its --dynconfig file lists, from parents or, as a seed peer, from the
/// origin, and answers its clients through an HTTP proxy in dfdaemon's style.
#[derive(Parser, Debug)]
#[command(name = "p2p-peer", version, verbatim_doc_comment)]
#[command(after_help = CONFIG_HELP)]
struct Args {
    /// The YAML config (dfdaemon's field names; see below).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// The file listing the schedulers (`scheduler: {addrs: ["ip:port", ...]}`), read
    /// again every `dynconfig.refreshInterval`.
    #[arg(long)]
    dynconfig: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: String,
}

const CONFIG_HELP: &str = "\
Config (YAML; every field optional, defaults shown):
  host:
    ip: 127.0.0.1              the address everything is served on and announced
    hostname: localhost        the host id is <ip>-<hostname> (-seed for a seed peer)
  upload:
    server:
      port: 4000               dfdaemon.v2.DfdaemonUpload and grpc.health.v1
  storage:
    dir: /var/lib/p2p-peer     pieces, one directory per task, kept across restarts
    server:
      tcpPort: 4005            pieces over Vortex (TCP)
  proxy:
    server:
      port: 4001               the HTTP proxy (and registry mirror: ns=)
    rules:
      - regex: blobs/sha256.*  GETs of matching URLs go through the swarm
  seedPeer:
    enable: false              fetch from the origin when the scheduler asks
    type: super
  scheduler:
    announceInterval: 5s       how often the host is announced to every scheduler
  dynconfig:
    refreshInterval: 10s       how often --dynconfig is read again
  metrics:
    server:
      port: 4002               Prometheus text at GET /metrics
  backToSource:
    dockerConfig: <none>       credentials per registry (docker config.json) for this
                               peer's own requests to the origin (a seed's)
  gc:
    interval: 15m              how often old tasks are removed
    policy:
      taskTTL: 6h              a task not used for this long goes
      capacity: <none>         beyond these bytes, the least recently used tasks go";

/// Pieces (4-64 MiB) and their slices pass through memory on many threads. glibc
/// raises its mmap threshold to the size of the first large block freed, after which
/// such buffers come from per-thread arenas that keep their pages: a fixed 1 MiB
/// threshold gives them back when freed (peak RSS of a peer in a 128 MiB swarm: 22 MiB
/// instead of 45). The one `unsafe` of the crate: glibc offers no safe interface.
#[allow(unsafe_code)]
fn return_large_buffers_to_the_system() {
    // SAFETY: called first thing in main, before any other thread exists; mallopt only
    // sets an allocator parameter and touches no memory of ours.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() {
    return_large_buffers_to_the_system();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|e| {
        eprintln!("p2p-peer: bad --log-level '{}': {e}", args.log_level);
        std::process::exit(2)
    });
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let config = Config::load(&args.config).unwrap_or_else(|e| {
        eprintln!("p2p-peer: {e}");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| {
        eprintln!("p2p-peer: starting the runtime: {e}");
        std::process::exit(1)
    });
    if let Err(e) = runtime.block_on(run(config, args.dynconfig)) {
        eprintln!("p2p-peer: {e}");
        std::process::exit(1);
    }
}

async fn run(config: Config, dynconfig: Option<PathBuf>) -> Result<(), String> {
    let ip = config.host.ip;
    let bind = |port: u16| async move {
        let addr = SocketAddr::new(ip, port);
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding {addr}: {e}"))
    };
    let upload = bind(config.upload.server.port).await?;
    let vortex = bind(config.storage.server.tcp_port).await?;
    let proxy = bind(config.proxy.server.port).await?;
    let metrics = bind(config.metrics.server.port).await?;
    let peer = PeerInner::new(config, dynconfig)?;
    tracing::info!(
        "peer {} serving: upload {}, vortex {}, proxy {} (upload rate limit: {:?} bytes/s)",
        peer.host_id,
        upload.local_addr().map_err(|e| e.to_string())?,
        vortex.local_addr().map_err(|e| e.to_string())?,
        proxy.local_addr().map_err(|e| e.to_string())?,
        peer.config.upload.rate_limit
    );
    let p = peer.clone();
    tokio::spawn(p2p_backend::scheduler::metrics::serve(metrics, move || {
        p.metrics.render(p.storage.tasks().len())
    }));
    let p = peer.clone();
    let served = std::sync::Arc::new(move |task: &str, n: u64| p.metrics.served(task, n));
    let server = p2p_backend::peer::vortex::Server {
        storage: peer.storage.clone(),
        host_id: peer.host_id.clone(),
        served,
        limit: peer
            .config
            .upload
            .rate_limit
            .map(|r| std::sync::Arc::new(p2p_backend::peer::vortex::RateLimit::new(r))),
        children: peer.metrics.children.clone(),
        running: {
            let p = peer.clone();
            std::sync::Arc::new(move |task: &str| p.is_running(task))
        },
    };
    tokio::spawn(p2p_backend::peer::vortex::serve(
        vortex,
        std::sync::Arc::new(server),
    ));
    tokio::spawn(p2p_backend::peer::proxy::serve(proxy, peer.clone()));
    let p = peer.clone();
    tokio::spawn(async move {
        let gc = p.config.gc.clone();
        let mut tick = tokio::time::interval(gc.interval);
        loop {
            tick.tick().await;
            let removed = p.gc();
            if !removed.is_empty() {
                tracing::info!("gc: removed tasks {removed:?}");
            }
        }
    });
    tokio::spawn(peer.clone().check_stored_tasks());
    tokio::spawn(peer.clone().announce_forever());
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let service = dragonfly_api::dfdaemon::v2::dfdaemon_upload_server::DfdaemonUploadServer::new(
        p2p_backend::peer::upload::UploadService::new(peer.clone()),
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(p2p_backend::scheduler::incoming(upload), shutdown)
        .await
        .map_err(|e| format!("the upload server: {e}"))
}
