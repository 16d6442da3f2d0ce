//! `nydusd`: mounts a RAFS v6 bootstrap read-only through FUSE, or an empty directory
//! that images are mounted into through the API. Flags are parsed and validated here;
//! everything else is the `nydusd` library.

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use nydusd::api::{ApiContext, ApiServer};
use nydusd::cache::OpenBlobs;
use nydusd::config::Config;
use nydusd::daemon::{self, Event, ImageSpec, State, StateCell};
use nydusd::fuse::{FuseOptions, FuseService, FuseSource};
use nydusd::fuse_opens::OpenTable;
use nydusd::handover::{Handover, Serving, Takeover, Transport};
use nydusd::vfs::Vfs;
use nydusd::virtiofs::handover::VirtioHandover;
use nydusd::virtiofs::VirtioFsService;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use tracing::info;

/// Serve a nydus (RAFS v6) image as a read-only FUSE filesystem, fetching file data
/// lazily from a blob backend into a verified local chunk cache.
///
/// Example: nydusd --bootstrap image.boot --mountpoint /mnt --config nydusd.json
/// (the optional first word `fuse` selects the FUSE mode, as upstream's nydusd).
///
/// For a VM guest: nydusd virtiofs --sock /run/vfs.sock --apisock /run/api.sock serves
/// the same filesystem over vhost-user-fs (QEMU's `vhost-user-fs-pci`); without a
/// subcommand, --sock and no --mountpoint select it too (as Kata starts nydusd).
///
/// Without --bootstrap, the mountpoint shows an empty directory and images are mounted
/// into it at run time: `POST /api/v1/mount?mountpoint=/sub` on the --apisock socket
/// with body {"source": "image.boot", "fs_type": "rafs", "config": "<JSON string>"}
/// shows the image at MOUNTPOINT/sub; `DELETE` with the same query removes it.
#[derive(Parser, Debug)]
#[command(name = "nydusd", version)]
struct Opt {
    /// The RAFS v6 bootstrap (metadata) to serve at the mountpoint. Without it, the
    /// mountpoint is an empty directory that images are mounted into through the API.
    #[arg(short = 'B', long, value_name = "FILE")]
    bootstrap: Option<PathBuf>,
    /// Directory to mount the filesystem on (FUSE).
    #[arg(short = 'M', long, value_name = "DIR")]
    mountpoint: Option<PathBuf>,
    /// The vhost-user socket a VMM connects to (virtio-fs).
    #[arg(long, value_name = "SOCKET")]
    sock: Option<PathBuf>,
    /// Configuration in upstream nydusd's v1 JSON shape (backend, cache, prefetch) of
    /// the --bootstrap image (API mounts bring their own). Needed with --bootstrap.
    #[arg(short = 'C', long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve the HTTP API (state, exit, mount, metrics) on this unix socket.
    #[arg(short = 'A', long, value_name = "SOCKET")]
    apisock: Option<PathBuf>,
    /// Files to prefetch first, one absolute path per line (overrides the bootstrap's
    /// prefetch table; needs `fs_prefetch.enable`).
    #[arg(long, value_name = "FILE")]
    prefetch_files: Option<PathBuf>,
    /// Threads serving FUSE requests.
    #[arg(long, alias = "thread-num", default_value_t = 4, value_name = "N")]
    fuse_threads: usize,
    /// The mount's kernel readahead window in KiB (0: the kernel's 128 KiB). Large
    /// windows speed up sequential reads of the image's files.
    #[arg(long, default_value_t = 16384, value_name = "KIB")]
    readahead_kb: u32,
    /// Pass files whose every chunk is cached and verified through to the kernel (FUSE
    /// passthrough, Linux 6.9+, as root): their reads and mmaps then go to a private
    /// kernel EROFS mount of the image over the cache files, at native speed, without
    /// the daemon. Off, or where the kernel cannot, the daemon serves every read.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    passthrough: bool,
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
    /// Hand the session to the supervisor listening on this unix socket, so that a
    /// successor can take it over when this daemon dies or is upgraded: a FUSE session
    /// (device, open files, mounted images) after INIT and after every mount and
    /// unmount (the snapshotter's `recover_policy = "failover"` runs the supervisor);
    /// a virtio-fs device (the VMM's connection, the device's setup, the requests in
    /// flight, mounted images) as the VMM sets it up and after every mount and unmount.
    #[arg(long, value_name = "SOCKET")]
    supervisor: Option<PathBuf>,
    /// Start as a successor: mount nothing (bind no --sock), and take the session from
    /// --supervisor on `PUT /api/v1/daemon/fuse/takeover` (the images come from the session's state;
    /// --bootstrap and --config are not read).
    #[arg(long, requires = "supervisor")]
    upgrade: bool,
    /// What a successor does with the requests its predecessor read and did not answer:
    /// `resend` asks the kernel to queue them again (Linux 6.9+); `none` leaves them
    /// unanswered (their callers wait for ever).
    #[arg(long, default_value = "resend", value_name = "POLICY",
          value_parser = ["resend", "none"])]
    failover_policy: String,
}

/// The transport the daemon serves on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    /// A FUSE mount at this directory.
    Fuse(PathBuf),
    /// vhost-user-fs on this socket.
    Virtiofs(PathBuf),
}

/// Drops upstream's optional mode word (`fuse` or `virtiofs`), saying which was given;
/// refuses modes not built here.
fn args() -> Result<(Vec<std::ffi::OsString>, Option<&'static str>)> {
    let mut args: Vec<_> = std::env::args_os().collect();
    let word = match args.get(1).and_then(|a| a.to_str()) {
        Some("fuse") => Some("fuse"),
        Some("virtiofs") => Some("virtiofs"),
        Some(mode @ ("singleton" | "nbd" | "uffd")) => {
            bail!("mode '{mode}' is not supported by this build (supported: fuse, virtiofs)")
        }
        _ => None,
    };
    if word.is_some() {
        args.remove(1);
    }
    Ok((args, word))
}

/// The mode from the mode word and the flags.
fn mode(opt: &Opt, word: Option<&str>) -> Result<Mode> {
    match (word, &opt.mountpoint, &opt.sock) {
        (Some("virtiofs"), _, Some(s)) | (None, None, Some(s)) => Ok(Mode::Virtiofs(s.clone())),
        (Some("virtiofs"), _, None) => bail!("virtiofs needs --sock (the vhost-user socket)"),
        (_, Some(m), None) => Ok(Mode::Fuse(m.clone())),
        (_, Some(_), Some(_)) => bail!("give --mountpoint (FUSE) or --sock (virtio-fs), not both"),
        (_, None, _) => bail!("give --mountpoint (FUSE) or --sock (virtio-fs)"),
    }
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

/// The filesystem to serve: the --bootstrap image at the root, or an empty pseudo-root.
fn build_vfs(opt: &Opt, open: &Arc<OpenBlobs>) -> Result<Vfs> {
    let Some(bootstrap) = &opt.bootstrap else {
        if opt.apisock.is_none() {
            bail!("without --bootstrap, give --apisock to mount images through the API");
        }
        if opt.prefetch_files.is_some() {
            bail!("--prefetch-files needs --bootstrap (API mounts take `prefetch_files`)");
        }
        if let Some(c) = &opt.config {
            // Checked, so that a broken file is reported at start.
            Config::load(c)?;
        }
        return Ok(Vfs::pseudo());
    };
    let Some(config) = &opt.config else {
        bail!("--bootstrap needs --config (the backend and cache of the image)");
    };
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("reading --config {}", config.display()))?;
    let parsed =
        Config::from_json(&text).with_context(|| format!("--config {}", config.display()))?;
    let files = match &opt.prefetch_files {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --prefetch-files {}", p.display()))?;
            Some(text.lines().map(str::to_string).collect::<Vec<_>>())
        }
        None => None,
    };
    let spec = ImageSpec {
        mountpoint: "/".into(),
        source: bootstrap.clone(),
        index: 0,
        config: text,
        prefetch_files: files,
    };
    let image = daemon::mount_image(spec, &parsed, open)?;
    info!(
        "serving {} ({} blobs, digest validation {})",
        bootstrap.display(),
        image.fs.cache().bootstrap().blobs().len(),
        if parsed.digest_validate { "on" } else { "off" }
    );
    Ok(Vfs::single(image))
}

fn run(opt: Opt, mode: Mode) -> Result<()> {
    let open_blobs = OpenBlobs::new();
    let (handover, virtio_handover) = match (&opt.supervisor, &mode) {
        (Some(s), Mode::Fuse(m)) => (Some(Arc::new(Handover::new(s, m)?)), None),
        (Some(s), Mode::Virtiofs(sock)) => (
            None,
            Some(Arc::new(VirtioHandover::new(s, sock, opt.fuse_threads))),
        ),
        (None, _) => (None, None),
    };
    if opt.upgrade && opt.apisock.is_none() {
        bail!("--upgrade needs --apisock (the takeover is asked for through the API)");
    }
    let vfs = if opt.upgrade {
        if opt.bootstrap.is_some() {
            info!(
                "--upgrade: the images come from the session taken over; --bootstrap is not read"
            );
        }
        Arc::new(Vfs::pseudo())
    } else {
        Arc::new(build_vfs(&opt, &open_blobs)?)
    };

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
    let serving = Arc::new(Serving::new(vfs.clone(), state.clone()));
    let table = match &handover {
        Some(h) => h.table(),
        None => Arc::new(OpenTable::new().context("making the open-file table")?),
    };
    let on_init = handover.clone().map(|h| {
        let serving = serving.clone();
        Arc::new(move |dev: &std::fs::File, resend: bool| {
            if let Err(e) = h.initialized(dev, resend) {
                tracing::warn!("{e}");
            }
            h.save_or_warn(&serving.vfs());
        }) as nydusd::fuse::OnInit
    });
    let fuse_opts = FuseOptions {
        threads: opt.fuse_threads,
        readahead_kb: opt.readahead_kb,
        passthrough: opt.passthrough,
        resend: opt.failover_policy == "resend",
        table,
        on_init,
    };
    if let Some(h) = &handover {
        h.set_options(fuse_opts.clone());
    }
    if let Some(h) = &virtio_handover {
        h.save_or_warn(&vfs);
    }
    let takeover: Option<Arc<dyn Takeover>> = match (&handover, &virtio_handover) {
        (Some(h), _) => Some(h.clone()),
        (_, Some(h)) => Some(h.clone()),
        _ => None,
    };
    let api = match &opt.apisock {
        Some(path) => Some(ApiServer::start(
            path,
            ApiContext {
                id: opt.id.clone().unwrap_or_else(|| match &mode {
                    Mode::Fuse(m) | Mode::Virtiofs(m) => m.display().to_string(),
                }),
                serving: serving.clone(),
                handover: takeover,
                upgrade: opt.upgrade,
                events: tx.clone(),
                open_blobs: open_blobs.clone(),
            },
        )?),
        None => None,
    };

    let what = match &opt.bootstrap {
        Some(b) => b.display().to_string(),
        None => "an empty directory for API mounts".into(),
    };
    match &mode {
        Mode::Fuse(m) | Mode::Virtiofs(m) if opt.upgrade => {
            info!(
                "waiting to take over the session of {} (PUT /api/v1/daemon/fuse/takeover)",
                m.display()
            );
        }
        Mode::Fuse(mountpoint) => {
            let fuse = FuseService::start(
                vfs.clone(),
                FuseSource::Mount(mountpoint.clone()),
                fuse_opts,
                tx.clone(),
            )?;
            serving.set_transport(Transport::Fuse(fuse));
            info!("mounted {what} on {}", mountpoint.display());
            state.set(State::Running);
        }
        Mode::Virtiofs(sock) => {
            let service = VirtioFsService::start(
                vfs.clone(),
                sock,
                opt.fuse_threads,
                tx.clone(),
                virtio_handover.clone(),
            )?;
            serving.set_transport(Transport::Virtio(service));
            info!("serving {what} over virtio-fs on {}", sock.display());
            state.set(State::Running);
        }
    }

    let event = if opt.upgrade {
        // A successor nobody hands a session to does not wait for ever.
        let deadline = std::time::Instant::now() + UPGRADE_WAIT;
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(e) => break e,
                Err(mpsc::RecvTimeoutError::Disconnected) => break Event::FuseEnded,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if state.get() == State::Init && std::time::Instant::now() > deadline {
                        bail!("--upgrade: no session was taken over within {UPGRADE_WAIT:?}");
                    }
                }
            }
        }
    } else {
        rx.recv().unwrap_or(Event::FuseEnded)
    };
    info!("stopping: {event:?}");
    state.set(State::Stopped);
    for m in serving.vfs().mounts() {
        m.stop_prefetch();
    }
    match serving.take_transport() {
        // A session that ended (unmounted or aborted) leaves nothing to unmount.
        Some(Transport::Fuse(f)) => f.stop(event != Event::FuseEnded),
        Some(Transport::Virtio(v)) => v.stop(),
        None => {}
    }
    if let Some(api) = api {
        api.close();
    }
    info!("stopped");
    Ok(())
}

/// How long an `--upgrade` daemon waits for its takeover before it gives up.
const UPGRADE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Allocations of at least this many bytes that no free block fits are mapped afresh,
/// and unmapped when freed. glibc's default raises its threshold to the size of each mapped block freed, so the
/// multi-MiB request buffers of readahead end up in per-thread arenas that keep them:
/// a 2 GiB cold read peaked at about 200 MiB of RSS instead of about 110.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 4 << 20;

fn main() {
    // SAFETY: mallopt only tunes glibc's allocator, before any other thread exists.
    #[cfg(target_env = "gnu")]
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    let (opt, mode) = match args().and_then(|(a, word)| {
        let opt = Opt::parse_from(a);
        let mode = mode(&opt, word)?;
        Ok((opt, mode))
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nydusd: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = init_logging(&opt) {
        eprintln!("nydusd: {e:#}");
        std::process::exit(2);
    }
    if let Err(e) = run(opt, mode) {
        tracing::error!("{e:#}");
        eprintln!("nydusd: {e:#}");
        std::process::exit(1);
    }
}
