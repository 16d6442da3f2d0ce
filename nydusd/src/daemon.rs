//! Wiring shared by both transports: backend, bootstrap, cache and filesystem of an
//! image, the daemon's state, and the events that end it (signal, API exit, the FUSE
//! mount or the VMM going away). The transports are [`crate::fuse`] and
//! [`crate::virtiofs`].

use crate::cache::{ChunkCache, OpenBlobs};
use crate::config::{BackendConfig, Config};
use crate::error::{Chain, Error, Result};
use crate::fs::RafsFs;
use crate::metrics::{FileStats, Metrics};
use crate::prefetch::{Prefetch, PrefetchList};
use crate::vfs::Mounted;
use p2p_backend::localfs::LocalFs;
use p2p_backend::BlobBackend;
use rafs::read::Bootstrap;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use tracing::warn;

/// Why the daemon stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// `PUT /api/v1/daemon/exit`.
    ApiExit,
    /// A FUSE thread ended (the filesystem was unmounted, or the channel failed).
    FuseEnded,
    /// The VMM of a virtio-fs guest disconnected.
    TransportEnded,
}

/// Daemon states reported by `GET /api/v1/daemon` (upstream's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Setting up.
    Init = 0,
    /// Serving.
    Running = 1,
    /// Shutting down or stopped.
    Stopped = 2,
}

impl State {
    /// Upstream's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Init => "INIT",
            State::Running => "RUNNING",
            State::Stopped => "STOPPED",
        }
    }
}

/// The daemon's state, shared with the API.
#[derive(Debug, Default)]
pub struct StateCell(AtomicU8);

impl StateCell {
    /// Current state.
    pub fn get(&self) -> State {
        match self.0.load(Ordering::Acquire) {
            0 => State::Init,
            1 => State::Running,
            _ => State::Stopped,
        }
    }
    /// Sets the state.
    pub fn set(&self, s: State) {
        self.0.store(s as u8, Ordering::Release);
    }
}

/// The backend a config names.
pub fn backend(cfg: &BackendConfig) -> Result<Arc<dyn BlobBackend>> {
    match cfg {
        BackendConfig::Localfs {
            dir: Some(dir),
            blob_file: None,
        } => {
            if !dir.is_dir() {
                return Err(Error::config(
                    "device.backend.config.dir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
            Ok(Arc::new(LocalFs::new(dir)))
        }
        BackendConfig::Localfs {
            blob_file: Some(f), ..
        } => Ok(Arc::new(LocalFs::single_file(f))),
        BackendConfig::Localfs { .. } => Err(Error::config(
            "device.backend.config",
            "needs `dir` or `blob_file`",
        )),
        BackendConfig::Registry(r) => {
            use p2p_backend::registry::{Credentials, Registry, RegistryBackend, RegistryOptions};
            let opts = RegistryOptions {
                insecure: r.scheme == "http" || r.skip_verify,
                credentials: r
                    .auth
                    .clone()
                    .map(|(username, password)| Credentials { username, password }),
                // Attempts: the first try and `retry_limit` retries.
                retries: r.retry_limit + 1,
                backoff: std::time::Duration::ZERO,
                timeout: Some(r.timeout),
                connect_timeout: Some(r.connect_timeout),
            };
            let reference = format!("{}/{}", r.host, r.repo);
            let registry = Registry::new(&reference, &opts).map_err(|e| {
                Error::config(
                    "device.backend.config",
                    format!("registry {reference}: {}", Chain(&e)),
                )
            })?;
            let mut b = RegistryBackend::new(registry);
            if let Some(p) = &r.proxy {
                let proxy = p2p_backend::registry::proxy::PeerProxy::new(
                    p.clone(),
                    r.timeout,
                    r.connect_timeout,
                )
                .map_err(|e| Error::config("device.backend.config.proxy", e.to_string()))?;
                b = b.with_proxy(proxy);
            }
            Ok(Arc::new(b))
        }
        BackendConfig::Other { kind, .. } => Err(Error::config(
            "device.backend.type",
            format!("'{kind}' is not supported by this build (supported: localfs, registry)"),
        )),
    }
}

/// Opens and fully validates a bootstrap: the superblock and tables, then every inode,
/// directory, symlink, xattr area and chunk index reachable from the root, so that a
/// corrupt bootstrap is refused at mount with the reason instead of failing later.
pub fn open_bootstrap(path: &Path) -> Result<Arc<Bootstrap>> {
    let err = |source| Error::Bootstrap {
        path: path.display().to_string(),
        source,
    };
    let bs = Bootstrap::open(path).map_err(err)?;
    bs.walk(|_, _, inode| {
        if inode.is_symlink() {
            bs.readlink(inode)?;
        }
        bs.xattrs(inode)?;
        if inode.is_reg() {
            for i in 0..bs.chunk_count(inode) {
                bs.chunk(inode, i)?;
            }
        }
        Ok(())
    })
    .map_err(err)?;
    Ok(Arc::new(bs))
}

/// Builds the filesystem of `bootstrap` with `config` as mount `index`: backend, cache
/// files, filesystem, and the per-file records the config asks for.
pub fn build_fs(
    bootstrap: &Path,
    config: &Config,
    metrics: Arc<Metrics>,
    index: u16,
    open: &Arc<OpenBlobs>,
) -> Result<Arc<RafsFs>> {
    let bs = open_bootstrap(bootstrap)?;
    let backend = backend(&config.backend)?;
    let cache = Arc::new(
        ChunkCache::new(bs, backend, config, metrics.clone(), open).map_err(|e| match e {
            Error::Metadata(source) => Error::Bootstrap {
                path: bootstrap.display().to_string(),
                source,
            },
            e => e,
        })?,
    );
    let mut fs = RafsFs::new(cache, config.enable_xattr, metrics, index);
    if config.file_stats.any() {
        fs = fs.with_file_stats(Arc::new(FileStats::new(config.file_stats)));
    }
    Ok(Arc::new(fs))
}

/// What an image is mounted from: enough to mount it again the same way (a successor
/// taking the FUSE session over does, see [`crate::handover`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSpec {
    /// Where it is, upstream's `mountpoint`: `/` for `--bootstrap`, `/sub` for API mounts.
    pub mountpoint: String,
    /// Its bootstrap file.
    pub source: std::path::PathBuf,
    /// Its mount index (the high bits of its inode numbers).
    pub index: u16,
    /// Its config, the v1 JSON text it was given.
    pub config: String,
    /// Files to prefetch first (absolute paths in the image), instead of the
    /// bootstrap's prefetch table.
    pub prefetch_files: Option<Vec<String>>,
}

/// Mounts the image `spec` describes, with `config` (its `spec.config`, parsed), and
/// starts its background prefetch (see [`start_prefetch`]).
pub fn mount_image(spec: ImageSpec, config: &Config, open: &Arc<OpenBlobs>) -> Result<Mounted> {
    let m = mount_image_quiet(spec, config, open)?;
    start_prefetch(&m, config);
    Ok(m)
}

/// [`mount_image`] without the background prefetch (a successor starts it only once it
/// serves: until then the predecessor's files passed through hold no pins, see
/// [`crate::handover`]).
pub fn mount_image_quiet(
    spec: ImageSpec,
    config: &Config,
    open: &Arc<OpenBlobs>,
) -> Result<Mounted> {
    let metrics = Arc::new(Metrics::default());
    let fs = build_fs(&spec.source, config, metrics.clone(), spec.index, open)?;
    if !config.digest_validate {
        warn!(
            "{}: digest_validate is off: chunks are served without verification",
            spec.mountpoint
        );
    }
    Ok(Mounted {
        mountpoint: spec.mountpoint.clone(),
        source: spec.source.clone(),
        index: spec.index,
        spec: std::sync::Mutex::new(spec),
        fs,
        metrics,
        prefetch: std::sync::Mutex::new(None),
    })
}

/// Starts the background prefetch of `m` when `config` (its config) enables it: of its
/// `prefetch_files` if given, else of the bootstrap's prefetch table.
pub fn start_prefetch(m: &Mounted, config: &Config) {
    let spec = m.spec();
    if !config.prefetch.enable {
        if spec.prefetch_files.is_some() {
            warn!(
                "{}: the prefetch list is ignored: fs_prefetch.enable is false",
                spec.mountpoint
            );
        }
        return;
    }
    let cache = m.fs.cache().clone();
    let list = match &spec.prefetch_files {
        Some(paths) => PrefetchList::from_paths(&cache, &paths.join("\n")),
        None => PrefetchList::from_bootstrap(&cache),
    };
    *m.prefetch.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Prefetch::start(cache, list, config.prefetch.clone()));
}
