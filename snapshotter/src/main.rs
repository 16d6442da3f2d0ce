//! `containerd-nydus-grpc`: the snapshotter's binary. Flags override the config file.

use anyhow::{Context as _, Result};
use clap::Parser;
use snapshotter::config::Config;
use snapshotter::daemons::Manager;
use snapshotter::metrics::Metrics;
use snapshotter::proto::snapshots::snapshots_server::SnapshotsServer;
use snapshotter::service::{Service, Snapshotter};
use snapshotter::store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

/// A containerd proxy snapshotter for nydus images (and ordinary OCI images).
///
/// Pulled through CRI, a nydus image's data layers are never downloaded: containers
/// start from a nydusd FUSE mount of the image under an overlay, and file data is
/// fetched from the registry when read.
///
/// containerd's config:
///
///   [proxy_plugins.nydus]
///     type = "snapshot"
///     address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
///   [plugins."io.containerd.grpc.v1.cri".containerd]
///     snapshotter = "nydus"
///     disable_snapshot_annotations = false
///
/// The config file (TOML; upstream nydus-snapshotter's names; defaults shown):
///
///   version = 1
///   root = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus"
///   address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
///   daemon_mode = "multiple"     # = "dedicated": one nydusd per image; or "shared"
///   cleanup_on_close = false     # stop every nydusd when the snapshotter exits
///   [daemon]
///   nydusd_path = "nydusd"       # default: next to this binary, else from PATH
///   nydusd_config = ""           # JSON template of each image's nydusd config (default:
///                                # digest_validate true, amplify_io 65536,
///                                # readahead_window 262144)
///   threads_number = 0           # FUSE threads per nydusd (0: nydusd's default)
///   recover_policy = "restart"   # or "none", or "failover": what to do about a dead
///                                # nydusd (failover: a successor takes its FUSE session
///                                # over; running containers only wait)
///   ready_timeout = 30           # (ours) seconds a new nydusd may take to serve
///   fs_driver = "fusedev"        # the only driver built
///   [system]
///   enable = false               # the system controller (live upgrade of nydusd)
///   address = "/run/containerd-nydus/system.sock"
///   [log]
///   level = "info"
///   [metrics]
///   address = ""                 # e.g. "127.0.0.1:9110": Prometheus text at /metrics
///   [remote.auth]
///   docker_config = ""           # (ours) default $DOCKER_CONFIG/config.json or ~/.docker/config.json
///   refresh_interval = 10        # (ours) seconds between reads of it; changes reach nydusd live
///   [cache_manager]
///   disable = false              # false: delete cache blobs no image uses on Remove/Cleanup
///   cache_dir = ""               # default <root>/cache, shared by every nydusd
///   [snapshot]
///   enable_overlayfs_volatile = false
///
/// Fields of upstream's config not built here are logged as ignored.
#[derive(Parser, Debug)]
#[command(name = "containerd-nydus-grpc", version, verbatim_doc_comment)]
struct Opt {
    /// The TOML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The gRPC socket containerd dials (overrides `address`).
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// State directory (overrides `root`).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// trace, debug, info, warn or error (overrides `log.level`).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// The nydusd binary (overrides `daemon.nydusd_path`).
    #[arg(long, value_name = "FILE")]
    nydusd_path: Option<PathBuf>,
    /// dedicated, multiple or shared (overrides `daemon_mode`).
    #[arg(long, value_name = "MODE")]
    daemon_mode: Option<String>,
}

fn main() -> Result<()> {
    let opt = Opt::parse();
    let (mut config, ignored) = Config::load(opt.config.as_deref())?;
    if let Some(a) = opt.address {
        config.address = a;
    }
    if let Some(r) = opt.root {
        anyhow::ensure!(
            r.is_absolute(),
            "--root {}: must be an absolute path",
            r.display()
        );
        if config.cache_dir == config.root.join("cache") {
            config.cache_dir = r.join("cache");
        }
        config.root = r;
    }
    if let Some(l) = opt.log_level {
        config.log_level = l;
    }
    if let Some(n) = opt.nydusd_path {
        config.nydusd_path = n;
    }
    if let Some(m) = opt.daemon_mode {
        let (parsed, _) =
            Config::parse(&format!("daemon_mode = {m:?}")).map_err(anyhow::Error::msg)?;
        config.daemon_mode = parsed.daemon_mode;
    }
    // The gRPC stack's own debug lines (every HTTP/2 frame) drown ours.
    let filter = tracing_subscriber::EnvFilter::try_new(format!(
        "{},h2=info,tower=info,hyper=info,tonic=info",
        config.log_level
    ))
    .with_context(|| format!("log level {:?}", config.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    for field in ignored {
        warn!("config: `{field}` is not built here; ignored");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(Arc::new(config)))
}

async fn serve(config: Arc<Config>) -> Result<()> {
    // Root only: configs hold credentials, and the snapshots' files (setuid binaries of
    // images included) must not be reachable by other users.
    std::fs::create_dir_all(&config.root)
        .with_context(|| format!("creating {}", config.root.display()))?;
    std::fs::set_permissions(
        &config.root,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .with_context(|| format!("making {} private", config.root.display()))?;
    for dir in ["snapshots", "socket", "logs", "config", "bootstraps"] {
        let d = config.root.join(dir);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::create_dir_all(&config.cache_dir)
        .with_context(|| format!("creating {}", config.cache_dir.display()))?;
    let store =
        Arc::new(Store::open(&config.root.join("metadata.redb")).map_err(anyhow::Error::msg)?);
    let metrics = Metrics::default();
    let manager = Arc::new(
        Manager::new(config.clone(), store.clone(), metrics.clone()).map_err(anyhow::Error::msg)?,
    );
    {
        let m = manager.clone();
        tokio::task::spawn_blocking(move || m.recover())
            .await?
            .map_err(|s| anyhow::anyhow!("recovering daemons: {}", s.message()))?;
    }
    if config.recover_policy == snapshotter::config::RecoverPolicy::Failover {
        let m = manager.clone();
        std::thread::Builder::new()
            .name("failover".into())
            .spawn(move || loop {
                std::thread::sleep(snapshotter::daemons::WATCH_EVERY);
                m.watch();
            })
            .context("starting the failover watcher")?;
    }
    if let Some(addr) = &config.system_address {
        snapshotter::system::start(addr, manager.clone())?;
    }
    let mut background = tokio::task::JoinSet::new();
    {
        let (m, every) = (manager.clone(), config.auth_refresh);
        background.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let m = m.clone();
                let _ = tokio::task::spawn_blocking(move || m.refresh_auth()).await;
            }
        });
    }
    if let Some(addr) = &config.metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics address {addr}"))?;
        let (m, mgr) = (metrics.clone(), manager.clone());
        background.spawn(async move {
            p2p_backend::scheduler::metrics::serve(listener, move || {
                m.daemons.set(mgr.running() as i64);
                m.render()
            })
            .await
        });
        info!("metrics at http://{addr}/metrics");
    }
    if let Some(dir) = config.address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&config.address);
    let listener = tokio::net::UnixListener::bind(&config.address)
        .with_context(|| format!("binding {}", config.address.display()))?;
    let service = Service(Arc::new(Snapshotter::new(
        config.clone(),
        store,
        manager.clone(),
        metrics,
    )));
    info!(
        "serving containerd's snapshots API on {} (root {}, {:?} daemons, nydusd {})",
        config.address.display(),
        config.root.display(),
        config.daemon_mode,
        config.nydusd_path.display()
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("stopping");
    };
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server")?;
    background.abort_all();
    let _ = std::fs::remove_file(&config.address);
    if config.cleanup_on_close {
        let m = manager.clone();
        tokio::task::spawn_blocking(move || m.stop_all()).await?;
    }
    Ok(())
}
