//! Failover and live upgrade: a FUSE daemon started with `--supervisor SOCK` hands its
//! session to the supervisor (see [`crate::client::supervisor`]) — the FUSE device, the
//! [`OpenTable`] of the files the kernel holds open, and a [`SessionState`] — whenever
//! what a successor must know changes: after INIT, after each mount and unmount, and on
//! `PUT /api/v1/daemon/fuse/sendfd`. A successor started with `--upgrade` takes the
//! session on `PUT /api/v1/daemon/fuse/takeover`: it mounts the same images with the
//! same mount indices and pseudo directories (so every inode number the kernel holds
//! means what it meant), takes on the open files and their passthrough backing ids
//! (which belong to the connection, not to the daemon that registered them), serves the
//! device without mounting, and asks the kernel to resend the requests its predecessor
//! had read but not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9+).
//!
//! What a successor cannot learn again is all here: the kernel's INIT happened once per
//! connection, and its outcome (passthrough, and the readahead of backing mounts) is in
//! the state. File handles are slots of the open-file table; directory handles do not
//! exist (`opendir` answers `ENOSYS`, which the kernel remembers per connection); lookup
//! counts need no keeping (inodes are computed, `forget` does nothing).
//!
//! [`Takeover`] is the part both transports share; a virtio-fs device is handed over by
//! [`crate::virtiofs::handover`].

use crate::cache::OpenBlobs;
use crate::client::supervisor;
use crate::config::Config;
use crate::daemon::{self, StateCell};
use crate::error::{Chain, Error, Result};
use crate::fuse::{FuseOptions, FuseService, FuseSource};
use crate::fuse_opens::OpenTable;
use crate::passthrough::FuseBacking;
use crate::vfs::{TreeState, Vfs};
use crate::virtiofs::VirtioFsService;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use tracing::{info, warn};

/// The version of [`SessionState`] this nydusd writes and reads.
pub const STATE_VERSION: u32 = 1;

/// What a successor needs besides the FUSE device and the open-file table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// [`STATE_VERSION`] of the daemon that wrote it.
    pub version: u32,
    /// Its nydusd version, for messages.
    pub nydusd: String,
    /// The FUSE mountpoint.
    pub mountpoint: PathBuf,
    /// When the kernel's INIT negotiated passthrough: the readahead (KiB) of backing
    /// mounts.
    pub passthrough: Option<u32>,
    /// Whether the kernel offered `FUSE_HAS_RESEND` at INIT: it requeues the requests a
    /// dead daemon read and did not answer (Linux 6.9+).
    pub resend: bool,
    /// The images and pseudo directories served.
    pub tree: TreeState,
}

impl SessionState {
    /// Parses a state, refusing other versions by name.
    pub fn parse(bytes: &[u8]) -> Result<SessionState> {
        parse_state(bytes)
    }
}

/// Parses a state a daemon handed over (a FUSE session's or a virtio-fs device's),
/// refusing other versions by name.
pub fn parse_state<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let bad = |why: String| Error::State(why);
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("{} bytes that are not JSON: {e}", bytes.len())))?;
    let version = v.get("version").and_then(|v| v.as_u64());
    if version != Some(STATE_VERSION as u64) {
        let by = v
            .get("nydusd")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown");
        return Err(bad(format!(
            "state version {} (written by nydusd {by}); this nydusd {} reads version \
             {STATE_VERSION}",
            version.map_or("none".into(), |v| v.to_string()),
            env!("CARGO_PKG_VERSION")
        )));
    }
    serde_json::from_value(v).map_err(|e| bad(format!("{e}")))
}

/// A transport a daemon serves a session on.
pub enum Transport {
    /// A FUSE session.
    Fuse(FuseService),
    /// A virtio-fs device.
    Virtio(VirtioFsService),
}

/// A supervised daemon's side of failover and live upgrade, for either transport.
pub trait Takeover: Send + Sync {
    /// The supervisor's socket.
    fn supervisor(&self) -> &Path;

    /// Hands the session as `vfs` serves it now to the supervisor.
    fn save(&self, vfs: &Vfs) -> Result<()>;

    /// `PUT /api/v1/daemon/fuse/sendfd`: [`Takeover::save`], refused when there is no
    /// session to hand over yet.
    fn sendfd(&self, vfs: &Vfs) -> Result<()> {
        self.save(vfs)
    }

    /// [`Takeover::save`], with a failure logged: the session goes on serving, only a
    /// successor would not know the latest change.
    fn save_or_warn(&self, vfs: &Vfs) {
        if let Err(e) = self.save(vfs) {
            warn!("{}", Chain(&e));
        }
    }

    /// Takes the session the supervisor holds and mounts its images again (with their
    /// mount indices and pseudo directories), without serving it yet: the predecessor
    /// may still serve (a live upgrade) until it is stopped and [`Takeover::serve`]
    /// called. An image that cannot be mounted again is left out (its files fail with
    /// `ENOENT`), unless none can.
    fn prepare(&self, open: &Arc<OpenBlobs>) -> Result<()>;

    /// Serves the session [`Takeover::prepare`] took, once the predecessor is gone.
    fn serve(self: Arc<Self>, events: Sender<daemon::Event>) -> Result<(Arc<Vfs>, Transport)>;
}

/// The images of `tree` mounted again, with the config of each (its prefetch starts
/// when the session is served); an image that cannot be is left out, unless none can.
pub fn mount_again(tree: &TreeState, open: &Arc<OpenBlobs>) -> Result<(Vfs, Vec<(u16, Config)>)> {
    let mut left_out = Vec::new();
    let images = tree.mounts.len() + usize::from(tree.root.is_some());
    let mut configs = Vec::new();
    let vfs = Vfs::restore(tree, |spec| {
        let mounted = Config::from_json(&spec.config).and_then(|config| {
            let m = daemon::mount_image_quiet(spec.clone(), &config, open)?;
            configs.push((spec.index, config));
            Ok(m)
        });
        mounted.map_err(|e| {
            let e = Error::State(format!(
                "mounting {} again at {}: {}",
                spec.source.display(),
                spec.mountpoint,
                Chain(&e)
            ));
            left_out.push(e.to_string());
            e
        })
    })?;
    if images > 0 && left_out.len() == images {
        return Err(Error::State(left_out.join("; ")));
    }
    for e in &left_out {
        warn!("left out of the takeover: {e}");
    }
    Ok((vfs, configs))
}

/// A supervised FUSE daemon's side of the hand-over.
pub struct Handover {
    supervisor: PathBuf,
    mountpoint: PathBuf,
    /// The FUSE device, once mounted or taken over.
    fuse: OnceLock<File>,
    table: RwLock<Arc<OpenTable>>,
    /// Whether the kernel can resend (see [`SessionState::resend`]).
    resend: std::sync::atomic::AtomicBool,
    /// One save at a time, each made under it (the supervisor keeps the latest).
    saving: Mutex<()>,
    /// A session taken from the supervisor and not served yet.
    prepared: Mutex<Option<Prepared>>,
    /// How a session taken over is served (`--upgrade`).
    options: OnceLock<FuseOptions>,
}

/// A session taken over, its images mounted again, not served yet.
struct Prepared {
    state: SessionState,
    vfs: Arc<Vfs>,
    fuse: File,
    table: std::os::fd::OwnedFd,
    /// Files passed through when the session was taken (image index, nid), their
    /// chunks pinned by this daemon already.
    pinned: BTreeSet<(u16, u64)>,
    /// The config of each image mounted again, by index (its prefetch starts in
    /// `serve`).
    configs: Vec<(u16, Config)>,
}

/// Pins (or unpins) the chunks of the files `which` (image index, nid) of `vfs`.
fn pin<'a>(vfs: &Vfs, which: impl IntoIterator<Item = &'a (u16, u64)>, on: bool) {
    let mounts = vfs.mounts();
    for (index, nid) in which {
        let Some(m) = mounts.iter().find(|m| m.index == *index) else {
            continue;
        };
        if let Ok(i) = m.fs.bootstrap().inode(*nid) {
            if let Err(e) = m.fs.cache().pin_file(&i, on) {
                warn!(
                    "{}: pinning the chunks of nid {nid}: {}",
                    m.mountpoint,
                    Chain(&e)
                );
            }
        }
    }
}

impl Handover {
    /// The hand-over of the FUSE session at `mountpoint` to the supervisor at
    /// `supervisor`, with a new open-file table.
    pub fn new(supervisor: &Path, mountpoint: &Path) -> Result<Handover> {
        let table = OpenTable::new().map_err(|e| Error::io("Making the open-file table", e))?;
        Ok(Handover {
            supervisor: supervisor.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            fuse: OnceLock::new(),
            table: RwLock::new(Arc::new(table)),
            resend: Default::default(),
            saving: Mutex::new(()),
            prepared: Mutex::new(None),
            options: OnceLock::new(),
        })
    }

    /// How a session taken over is to be served (the daemon's own FUSE options).
    pub fn set_options(&self, options: FuseOptions) {
        let _ = self.options.set(options);
    }

    fn options(&self) -> Result<&FuseOptions> {
        self.options
            .get()
            .ok_or_else(|| Error::State("no FUSE options to serve a session with".into()))
    }

    /// The open-file table the session records opens in.
    pub fn table(&self) -> Arc<OpenTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The kernel's INIT was answered on `fuse`, offering resend or not.
    pub fn initialized(&self, fuse: &File, resend: bool) -> Result<()> {
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        self.resend
            .store(resend, std::sync::atomic::Ordering::Release);
        self.set_fuse(fuse)
    }

    /// A directory of this daemon's own, next to the supervisor's socket (root's
    /// only), for the session object of a takeover (see [`FuseSource::Adopt`]).
    fn scratch(&self) -> PathBuf {
        self.supervisor
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!(".takeover-{}", std::process::id()))
    }

    /// The FUSE device of the session (from the mount, or taken over).
    fn set_fuse(&self, fuse: &File) -> Result<()> {
        let dup = fuse
            .try_clone()
            .map_err(|e| Error::io("Duplicating the FUSE device", e))?;
        let _ = self.fuse.set(dup);
        Ok(())
    }
}

impl Takeover for Handover {
    fn supervisor(&self) -> &Path {
        &self.supervisor
    }

    /// Hands the session as `vfs` serves it now to the supervisor.
    /// Before the kernel's INIT there is nothing to hand over: the save made after INIT
    /// (under the same lock) will carry what changed meanwhile.
    fn save(&self, vfs: &Vfs) -> Result<()> {
        // Made under the lock: a save never overtakes a later change's.
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fuse) = self.fuse.get() else {
            return Ok(());
        };
        let state = SessionState {
            version: STATE_VERSION,
            nydusd: env!("CARGO_PKG_VERSION").into(),
            mountpoint: self.mountpoint.clone(),
            passthrough: vfs.passthrough_readahead(),
            resend: self.resend.load(std::sync::atomic::Ordering::Acquire),
            tree: vfs.export(),
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| Error::State(e.to_string()))?;
        let table = self.table();
        supervisor::save(
            &self.supervisor,
            &bytes,
            &[fuse.as_fd(), table.file().as_fd()],
        )
        .map_err(|e| {
            Error::io(
                format!(
                    "Handing the FUSE session to the supervisor {}",
                    self.supervisor.display()
                ),
                e,
            )
        })
    }

    /// The FUSE session: checks the mountpoint, the kernel's resend and the device, and
    /// pins the chunks of the files passed through (during a live upgrade the
    /// predecessor's pins go when it is killed).
    fn prepare(&self, open: &Arc<OpenBlobs>) -> Result<()> {
        let opts = self.options()?;
        let saved = supervisor::restore(&self.supervisor).map_err(|e| {
            Error::io(
                format!(
                    "Taking the FUSE session from the supervisor {}",
                    self.supervisor.display()
                ),
                e,
            )
        })?;
        let state = SessionState::parse(&saved.state)?;
        if state.mountpoint != self.mountpoint {
            return Err(Error::State(format!(
                "the session is of {}, not of --mountpoint {}",
                state.mountpoint.display(),
                self.mountpoint.display()
            )));
        }
        if opts.resend && !state.resend {
            return Err(Error::State(
                "the kernel offered no FUSE_HAS_RESEND at INIT (Linux 6.9+): the requests \
                 the previous daemon read and did not answer would never be answered"
                    .into(),
            ));
        }
        let mut fds = saved.fds.into_iter();
        let fuse = File::from(
            fds.next()
                .ok_or_else(|| Error::State("no FUSE device came with it".into()))?,
        );
        check_fuse_device(&fuse)?;
        let table = fds
            .next()
            .ok_or_else(|| Error::State("no open-file table came with it".into()))?;
        let (vfs, configs) = mount_again(&state.tree, open)?;
        // The files passed through now keep their chunks from here on, not only from
        // `serve`: during a live upgrade the predecessor's pins go when it is killed.
        let snapshot = table
            .try_clone()
            .map(File::from)
            .and_then(OpenTable::load)
            .map_err(|e| Error::State(format!("the open-file table: {e}")))?;
        let pinned = snapshot.passed_through();
        pin(&vfs, &pinned, true);
        *self.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some(Prepared {
            state,
            vfs: Arc::new(vfs),
            fuse,
            table,
            pinned,
            configs,
        });
        Ok(())
    }

    /// The FUSE session: its open files taken on (the table read now, when nobody writes it any more),
    /// FUSE threads on the device, the requests it left unanswered resent, prefetch
    /// started.
    fn serve(self: Arc<Self>, events: Sender<daemon::Event>) -> Result<(Arc<Vfs>, Transport)> {
        let opts = self.options()?;
        let Prepared {
            state,
            vfs,
            fuse,
            table,
            pinned,
            configs,
        } = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                Error::State("no session taken over yet (PUT /api/v1/daemon/fuse/takeover)".into())
            })?;
        let table = OpenTable::load(File::from(table))
            .map_err(|e| Error::State(format!("the open-file table: {e}")))?;
        let table = Arc::new(table);
        if let Some(readahead_kb) = state.passthrough {
            let dev = fuse
                .try_clone()
                .map_err(|e| Error::io("Duplicating the FUSE device", e))?;
            vfs.set_passthrough(FuseBacking::new(dev, readahead_kb), table.clone());
            vfs.adopt_opens();
        }
        // Files pinned at the takeover and closed since: their pins go.
        pin(&vfs, pinned.difference(&table.passed_through()), false);
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table.clone();
        self.resend
            .store(state.resend, std::sync::atomic::Ordering::Release);
        self.set_fuse(&fuse)?;
        let mut opts = opts.clone();
        opts.table = table;
        let service = FuseService::start(
            vfs.clone(),
            FuseSource::Adopt {
                mountpoint: self.mountpoint.clone(),
                file: fuse,
                scratch: self.scratch(),
            },
            opts,
            events,
        )
        .inspect_err(|_| vfs.keep_backing())?;
        let mounts = vfs.mounts();
        for (index, config) in &configs {
            if let Some(m) = mounts.iter().find(|m| m.index == *index) {
                daemon::start_prefetch(m, config);
            }
        }
        info!(
            "took over the FUSE session of {} from nydusd {} ({} images)",
            self.mountpoint.display(),
            state.nydusd,
            vfs.mounts().len()
        );
        // The supervisor's copy is of the predecessor's table; ours is the same file.
        self.save_or_warn(&vfs);
        Ok((vfs, Transport::Fuse(service)))
    }
}

/// Refuses a descriptor that is not the FUSE device.
fn check_fuse_device(f: &File) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = f
        .metadata()
        .map_err(|e| Error::io("Inspecting the FUSE device handed over", e))?;
    let rdev = md.rdev();
    if !md.file_type().is_char_device() || libc::major(rdev) != 10 || libc::minor(rdev) != 229 {
        return Err(Error::State(
            "the descriptor handed over is not /dev/fuse".into(),
        ));
    }
    Ok(())
}

/// What the API and the main thread share about the filesystem served: replaced once,
/// when an `--upgrade` daemon takes a session over.
pub struct Serving {
    vfs: RwLock<Arc<Vfs>>,
    transport: Mutex<Option<Transport>>,
    /// The daemon's state.
    pub state: Arc<StateCell>,
    busy: Mutex<()>,
}

impl Serving {
    /// Serving `vfs` (before any transport starts).
    pub fn new(vfs: Arc<Vfs>, state: Arc<StateCell>) -> Serving {
        Serving {
            vfs: RwLock::new(vfs),
            transport: Mutex::new(None),
            state,
            busy: Mutex::new(()),
        }
    }

    /// Held by a takeover (one at a time).
    pub fn busy(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serving on `transport` (started at the daemon's start).
    pub fn set_transport(&self, transport: Transport) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = Some(transport);
    }

    /// The tree served now.
    pub fn vfs(&self) -> Arc<Vfs> {
        self.vfs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the tree and the transport (a takeover).
    pub fn set(&self, vfs: Arc<Vfs>, transport: Transport) {
        *self.vfs.write().unwrap_or_else(|e| e.into_inner()) = vfs;
        self.set_transport(transport);
    }

    /// Whether a transport serves (started or taken over).
    pub fn serves(&self) -> bool {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The transport, to stop it.
    pub fn take_transport(&self) -> Option<Transport> {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_of_other_versions_or_cut_short_are_refused_by_name() {
        let state = SessionState {
            version: STATE_VERSION,
            nydusd: "x".into(),
            mountpoint: "/mnt".into(),
            passthrough: Some(128),
            resend: true,
            tree: Vfs::pseudo().export(),
        };
        let bytes = serde_json::to_vec(&state).unwrap();
        assert_eq!(SessionState::parse(&bytes).unwrap(), state);
        let err = SessionState::parse(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["version"] = 99.into();
        v["nydusd"] = "9.9.9".into();
        let err = SessionState::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("state version 99 (written by nydusd 9.9.9)"),
            "{err}"
        );
    }
}
