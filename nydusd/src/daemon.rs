//! Wiring: backend, bootstrap, cache and filesystem, then the FUSE session and its
//! threads, with one event channel that ends the daemon (signal, API exit, or the mount
//! going away).

use crate::cache::ChunkCache;
use crate::config::{BackendConfig, Config};
use crate::error::{Chain, Error, Result};
use crate::fs::RafsFs;
use crate::metrics::Metrics;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::FuseSession;
use p2p_backend::localfs::LocalFs;
use p2p_backend::BlobBackend;
use rafs::read::Bootstrap;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use tracing::{debug, error, info};

/// Why the daemon stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// `PUT /api/v1/daemon/exit`.
    ApiExit,
    /// A FUSE thread ended (the filesystem was unmounted, or the channel failed).
    FuseEnded,
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
                retries: r.retry_limit,
                backoff: std::time::Duration::ZERO,
            };
            let reference = format!("{}/{}", r.host, r.repo);
            let registry = Registry::new(&reference, &opts).map_err(|e| {
                Error::config(
                    "device.backend.config",
                    format!("registry {reference}: {}", Chain(&e)),
                )
            })?;
            Ok(Arc::new(RegistryBackend::new(registry)))
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

/// Builds the filesystem of `bootstrap` with `config`: backend, cache files, filesystem.
pub fn build_fs(bootstrap: &Path, config: &Config, metrics: Arc<Metrics>) -> Result<Arc<RafsFs>> {
    let bs = open_bootstrap(bootstrap)?;
    let backend = backend(&config.backend)?;
    let cache = Arc::new(
        ChunkCache::new(bs, backend, config, metrics.clone()).map_err(|e| match e {
            Error::Metadata(source) => Error::Bootstrap {
                path: bootstrap.display().to_string(),
                source,
            },
            e => e,
        })?,
    );
    Ok(Arc::new(RafsFs::new(
        cache,
        config.enable_xattr,
        metrics,
        0,
    )))
}

/// A mounted FUSE session served by a pool of threads.
pub struct FuseService {
    session: FuseSession,
    threads: Vec<JoinHandle<()>>,
}

impl FuseService {
    /// Mounts `fs` read-only at `mountpoint` and serves it with `threads` threads. Each
    /// thread sends [`Event::FuseEnded`] on `events` when it stops.
    pub fn start(
        fs: Arc<RafsFs>,
        mountpoint: &Path,
        threads: usize,
        events: Sender<Event>,
    ) -> Result<FuseService> {
        let mut session = FuseSession::new(mountpoint, "rafs", "nydusfs", true)
            .map_err(|e| Error::Fuse(format!("session at {}: {e}", mountpoint.display())))?;
        session.set_allow_other(true);
        session
            .mount()
            .map_err(|e| Error::Fuse(format!("mounting {}: {e}", mountpoint.display())))?;
        let server = Arc::new(Server::new(fs));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let mut channel = session
                .new_channel()
                .map_err(|e| Error::Fuse(format!("channel: {e}")))?;
            let server = server.clone();
            let events = events.clone();
            let h = thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || {
                    loop {
                        match channel.get_request() {
                            Ok(Some((reader, writer))) => {
                                if let Err(e) =
                                    server.handle_message(reader, writer.into(), None, None)
                                {
                                    debug!("FUSE request failed: {e}");
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                error!("FUSE channel: {e}");
                                break;
                            }
                        }
                    }
                    let _ = events.send(Event::FuseEnded);
                })
                .map_err(|e| Error::io("Starting a FUSE thread", e))?;
            handles.push(h);
        }
        info!(
            "serving {} with {} FUSE threads",
            mountpoint.display(),
            handles.len()
        );
        Ok(FuseService {
            session,
            threads: handles,
        })
    }

    /// Wakes the threads, unmounts and waits for the threads to end.
    pub fn stop(mut self) {
        if let Err(e) = self.session.wake() {
            error!("waking FUSE threads: {e}");
        }
        if let Err(e) = self.session.umount() {
            error!("unmounting: {}", Chain(&e));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
