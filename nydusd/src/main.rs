//! `nydusd`: mounts a RAFS v6 bootstrap read-only through FUSE. Flags are parsed and
//! validated here; everything else is the `nydusd` library.

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use nydusd::api::{ApiContext, ApiServer};
use nydusd::config::Config;
use nydusd::daemon::{self, Event, FuseService, State, StateCell};
use nydusd::metrics::Metrics;
use nydusd::prefetch::{Prefetch, PrefetchList};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use tracing::{info, warn};

/// Serve a nydus (RAFS v6) image as a read-only FUSE filesystem, fetching file data
/// lazily from a blob backend into a verified local chunk cache.
///
/// Example: nydusd --bootstrap image.boot --mountpoint /mnt --config nydusd.json
/// (the optional first word `fuse` selects the FUSE mode, as upstream's nydusd).
#[derive(Parser, Debug)]
#[command(name = "nydusd", version)]
struct Opt {
    /// The RAFS v6 bootstrap (metadata) to serve.
    #[arg(short = 'B', long, value_name = "FILE")]
    bootstrap: PathBuf,
    /// Directory to mount the filesystem on.
    #[arg(short = 'M', long, value_name = "DIR")]
    mountpoint: PathBuf,
    /// Configuration in upstream nydusd's v1 JSON shape (backend, cache, prefetch).
    #[arg(short = 'C', long, value_name = "FILE")]
    config: PathBuf,
    /// Serve the HTTP API (state, exit, metrics) on this unix socket.
    #[arg(short = 'A', long, value_name = "SOCKET")]
    apisock: Option<PathBuf>,
    /// Files to prefetch first, one absolute path per line (overrides the bootstrap's
    /// prefetch table; needs `fs_prefetch.enable`).
    #[arg(long, value_name = "FILE")]
    prefetch_files: Option<PathBuf>,
    /// Threads serving FUSE requests.
    #[arg(long, alias = "thread-num", default_value_t = 4, value_name = "N")]
    fuse_threads: usize,
    /// Log level: trace, debug, info, warn or error.
    #[arg(short = 'l', long, default_value = "info")]
    log_level: String,
    /// Write the log to this file instead of stderr.
    #[arg(short = 'L', long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Daemon id reported by the API (default: the mountpoint).
    #[arg(long)]
    id: Option<String>,
    /// Accepted for compatibility with upstream's command line; ignored.
    #[arg(long, value_name = "N", hide = true)]
    rlimit_nofile: Option<u64>,
}

/// Drops upstream's optional `fuse` mode word; refuses modes not built here.
fn args() -> Result<Vec<std::ffi::OsString>> {
    let mut args: Vec<_> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("fuse") => {
            args.remove(1);
        }
        Some(mode @ ("virtiofs" | "singleton" | "nbd" | "uffd")) => {
            bail!("mode '{mode}' is not supported by this build (supported: fuse)")
        }
        _ => {}
    }
    Ok(args)
}

fn init_logging(opt: &Opt) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&opt.log_level)
        .with_context(|| format!("invalid --log-level '{}'", opt.log_level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &opt.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(Arc::new(file)).init();
        }
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init()
        }
    }
    Ok(())
}

fn run(opt: Opt) -> Result<()> {
    let config = Config::load(&opt.config)?;
    let metrics = Arc::new(Metrics::default());
    let fs = daemon::build_fs(&opt.bootstrap, &config, metrics.clone())?;
    let cache = fs.cache().clone();
    if !config.digest_validate {
        warn!("digest_validate is off: chunks are served without verification");
    }

    let (tx, rx) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    let sig_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = sig_tx.send(Event::Signal(sig));
            }
        })
        .context("starting the signal thread")?;

    let state = Arc::new(StateCell::default());
    let api = match &opt.apisock {
        Some(path) => Some(ApiServer::start(
            path,
            ApiContext {
                id: opt
                    .id
                    .clone()
                    .unwrap_or_else(|| opt.mountpoint.display().to_string()),
                state: state.clone(),
                metrics: metrics.clone(),
                cache: cache.clone(),
                events: tx.clone(),
            },
        )?),
        None => None,
    };

    let fuse = FuseService::start(fs, &opt.mountpoint, opt.fuse_threads, tx.clone())?;
    state.set(State::Running);
    info!(
        "mounted {} on {} ({} blobs, digest validation {})",
        opt.bootstrap.display(),
        opt.mountpoint.display(),
        cache.bootstrap().blobs().len(),
        if config.digest_validate { "on" } else { "off" }
    );

    let prefetch = if config.prefetch.enable {
        let list = match &opt.prefetch_files {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading --prefetch-files {}", p.display()))?;
                PrefetchList::from_paths(&cache, &text)
            }
            None => PrefetchList::from_bootstrap(&cache),
        };
        Some(Prefetch::start(
            cache.clone(),
            list,
            config.prefetch.clone(),
        ))
    } else {
        if opt.prefetch_files.is_some() {
            warn!("--prefetch-files is ignored: fs_prefetch.enable is false");
        }
        None
    };

    let event = rx.recv().unwrap_or(Event::FuseEnded);
    info!("stopping: {event:?}");
    state.set(State::Stopped);
    if let Some(p) = prefetch {
        p.stop();
    }
    fuse.stop();
    if let Some(api) = api {
        api.close();
    }
    info!("stopped");
    Ok(())
}

fn main() {
    let opt = match args() {
        Ok(a) => Opt::parse_from(a),
        Err(e) => {
            eprintln!("nydusd: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = init_logging(&opt) {
        eprintln!("nydusd: {e:#}");
        std::process::exit(2);
    }
    if let Err(e) = run(opt) {
        tracing::error!("{e:#}");
        eprintln!("nydusd: {e:#}");
        std::process::exit(1);
    }
}
