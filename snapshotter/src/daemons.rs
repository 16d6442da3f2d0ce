//! The nydusd instances behind nydus images: started on the first mount of an image,
//! found again after a snapshotter restart, given refreshed credentials, stopped when
//! their image goes.
//!
//! An *instance* is one image served by a daemon, keyed by the id of the image's meta
//! (bootstrap) snapshot. In dedicated mode each instance has its own daemon, mounted at
//! `<root>/snapshots/<meta id>/mnt`; in shared mode one daemon at `<root>/mnt` serves
//! every instance at `<root>/mnt/<meta id>`, mounted through its API. All daemons share
//! one cache directory, so a blob common to two images is fetched once.
//!
//! Daemons run in process groups of their own: a restarted (or killed) snapshotter
//! leaves them serving, and finds them again by the pids and sockets in the store.
//!
//! With `recover_policy = "failover"` the snapshotter supervises each daemon: it holds
//! the daemon's FUSE session (see `nydusd::client::supervisor`), notices within
//! [`WATCH_EVERY`] when the daemon dies, and starts a successor that takes the session
//! over; containers reading meanwhile wait, and their reads the dead daemon had taken
//! are resent to the successor. A live upgrade ([`Manager::upgrade`]) does the same
//! with a new nydusd binary, killing the old daemon once its successor is ready.

use crate::auth::{self, Auths};
use crate::config::{Config, DaemonMode, RecoverPolicy};
use crate::metrics::Metrics;
use crate::store::{DaemonRecord, InstanceRecord, Record, Store};
use crate::{IMAGE_REF_LABEL, SHARED_DAEMON_ID};
use nydusd::client::api::ConfigUpdate;
use nydusd::client::config::{encode_auth, ImageConfigOptions, ImageRef, NydusdConfig};
use nydusd::client::launcher::{detach_mount, is_mountpoint};
use nydusd::client::supervisor::Supervisor;
use nydusd::client::{Daemon, DaemonCommand, MountRequest};
use std::collections::{BTreeSet, HashMap};
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Status;
use tracing::{info, warn};

/// How often daemons are looked at with `recover_policy = "failover"`: the longest a
/// dead daemon goes unnoticed.
pub const WATCH_EVERY: Duration = Duration::from_millis(20);

/// How long a stopping daemon gets before `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the registry may take to accept a connection at mount time.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemons and instances of one snapshotter.
pub struct Manager {
    config: Arc<Config>,
    store: Arc<Store>,
    template: NydusdConfig,
    metrics: Metrics,
    state: Mutex<State>,
    /// `state.daemons.len()`, readable without the lock (a metrics scrape must not wait
    /// behind a daemon start).
    running: AtomicUsize,
}

#[derive(Default)]
struct State {
    daemons: HashMap<String, Daemon>,
    auths: Auths,
    /// With `recover_policy = "failover"`: each daemon's supervisor, holding its FUSE
    /// session.
    supervisors: HashMap<String, Supervisor>,
    /// The nydusd binary of new daemons (changed by a live upgrade).
    nydusd: Option<PathBuf>,
}

/// Why a successor did not take over.
struct Failed {
    why: String,
    /// The predecessor was killed (or had died): its containers wait on a session
    /// nobody serves.
    predecessor_gone: bool,
}

/// One daemon, as the system controller lists it.
#[derive(Debug, serde::Serialize)]
pub struct DaemonStatus {
    /// Its id.
    pub id: String,
    /// Its pid.
    pub pid: u32,
    /// Its mountpoint.
    pub mountpoint: PathBuf,
    /// Whether it is alive.
    pub alive: bool,
    /// Whether the snapshotter holds its FUSE session (failover possible).
    pub supervised: bool,
}

/// On-demand reads are extended to this many bytes of the following chunks when no
/// `nydusd_config` says otherwise (nydusd's own default is 1 MiB). Measured on the python
/// fixture's cold start (`cargo bench --bench snapshotter`, 5 ms per request and
/// 200 Mbit/s, OCI through containerd's overlayfs about 5.1 s): 1 MiB fetched 25% of the
/// image's bytes in 25 requests (1.25 s), 256 KiB 12.7% in 33 (1.02 s), 128 KiB 10.2% in
/// 34 (0.91 s), 64 KiB 9.5% in 39 (0.98 s), none 7.9% in 46 (1.08 s, and 1.42 s at 20 ms
/// per request against 1.12 s for 64 KiB). The kernel's readahead window made no
/// difference there (128 KiB instead of nydusd's 16 MiB: the same bytes).
pub const DEFAULT_AMPLIFY_IO: u64 = 64 << 10;

/// `readahead_window` of the snapshotter's default config. nydusd's own default (32 MiB)
/// suits large files read start to finish (model weights); a container start reads many
/// small files, most of them in part: with it the python fixture's cold start fetched
/// 11.4% of the image (7.7 MiB, 38 requests, 0.91 s at 5 ms + 200 Mbit/s) against 9.5%
/// with nydusd's earlier fixed readahead of two 128 KiB windows, which this equals.
pub const DEFAULT_READAHEAD_WINDOW: u64 = 256 << 10;

/// The nydusd config of images when the snapshotter's config names no template: a
/// verified `blobcache`, [`DEFAULT_AMPLIFY_IO`] and [`DEFAULT_READAHEAD_WINDOW`].
fn default_template() -> NydusdConfig {
    NydusdConfig {
        mode: Some("direct".into()),
        digest_validate: Some(true),
        enable_xattr: Some(true),
        amplify_io: Some(DEFAULT_AMPLIFY_IO),
        readahead_window: Some(DEFAULT_READAHEAD_WINDOW),
        ..Default::default()
    }
}

/// Where the snapshot with id `id` keeps its files.
pub fn snapshot_dir(root: &Path, id: u64) -> PathBuf {
    root.join("snapshots").join(id.to_string())
}

/// Where the bootstrap sits in a meta snapshot, as containerd unpacked it.
const BOOTSTRAP_IN_LAYER: &str = "image/image.boot";

/// The bootstrap of meta snapshot `id`, read from the layer containerd unpacked without
/// following a symbolic link anywhere below the snapshot's directory (the layer is the
/// image's to write: a link could point at another image's bootstrap or at a FIFO), and
/// only if it is a regular file of at most `rafs::read::MAX_BOOTSTRAP_SIZE` bytes.
pub fn read_bootstrap(root: &Path, id: u64) -> std::io::Result<Vec<u8>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::io::Read as _;
    let fs = snapshot_dir(root, id).join("fs");
    let dir = rustix::fs::open(
        &fs,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = rustix::fs::openat2(
        &dir,
        BOOTSTRAP_IN_LAYER,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let mut file = std::fs::File::from(fd);
    let md = file.metadata()?;
    if !md.is_file() || md.len() > rafs::read::MAX_BOOTSTRAP_SIZE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{BOOTSTRAP_IN_LAYER} is not a regular file of at most {} bytes",
                rafs::read::MAX_BOOTSTRAP_SIZE
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether meta snapshot `id`'s layer holds a bootstrap (a regular file, not a link).
pub fn has_bootstrap(root: &Path, id: u64) -> bool {
    snapshot_dir(root, id)
        .join("fs")
        .join(BOOTSTRAP_IN_LAYER)
        .symlink_metadata()
        .is_ok_and(|m| m.is_file())
}

/// Writes `bytes` to `path`, readable by root only (configs hold credentials, and
/// bootstraps describe images).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

fn chain(e: &dyn std::error::Error) -> String {
    p2p_backend::error_chain(e)
}

impl Manager {
    /// A manager; reads the nydusd config template and the credentials file.
    pub fn new(
        config: Arc<Config>,
        store: Arc<Store>,
        metrics: Metrics,
    ) -> Result<Manager, String> {
        let template = match &config.nydusd_config {
            Some(p) => NydusdConfig::load(p).map_err(|e| e.to_string())?,
            None => default_template(),
        };
        let auths = auth::load(&config.docker_config)?;
        Ok(Manager {
            config,
            store,
            template,
            metrics,
            state: Mutex::new(State {
                auths,
                ..State::default()
            }),
            running: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lowerdir of the image whose meta snapshot is `meta_key`: its instance's
    /// mountpoint, mounting the image first when no live daemon serves it.
    pub fn ensure(&self, meta_key: &str, meta: &Record) -> Result<PathBuf, Status> {
        let mut state = self.lock();
        if self.config.recover_policy == RecoverPolicy::Failover {
            // A daemon that died since the watcher last looked is taken over, not
            // replaced.
            self.fail_over_dead(&mut state);
        }
        if let Some(inst) = self
            .store
            .instances()?
            .into_iter()
            .find(|(id, _)| *id == meta.id)
            .map(|(_, i)| i)
        {
            if self.serving(&mut state, &inst) {
                return Ok(inst.mountpoint);
            }
            warn!(image = %inst.image, snapshot = %meta_key, daemon = %inst.daemon_id,
                  "the daemon of this image is gone; mounting the image again");
            self.drop_instance(&mut state, meta.id, &inst);
        }
        self.mount(&mut state, meta_key, meta)
    }

    /// Whether the instance's daemon is alive and its mount is there.
    fn serving(&self, state: &mut State, inst: &InstanceRecord) -> bool {
        let Some(d) = state.daemons.get_mut(&inst.daemon_id) else {
            return false;
        };
        if !d.is_alive() || !is_mountpoint(&d.mountpoint) {
            return false;
        }
        // A shared daemon started again holds only the images mounted since.
        inst.daemon_id != SHARED_DAEMON_ID
            || inst.mountpoint.file_name().is_some_and(|sub| {
                let sub = format!("/{}", sub.to_string_lossy());
                d.api
                    .daemon_info()
                    .is_ok_and(|i| i.mounts.contains_key(&sub))
            })
    }

    fn mount(&self, state: &mut State, meta_key: &str, meta: &Record) -> Result<PathBuf, Status> {
        let image = meta.labels.get(IMAGE_REF_LABEL).cloned().ok_or_else(|| {
            Status::failed_precondition(format!(
                "nydus image snapshot {meta_key} has no {IMAGE_REF_LABEL} label, so its registry \
                 is unknown: pull through CRI with disable_snapshot_annotations = false"
            ))
        })?;
        // The daemon gets a copy of its own: what the layer holds is checked once, and
        // nothing the image writes later is read.
        let unusable = |why: String| {
            Status::failed_precondition(format!(
                "image {image}: the bootstrap layer (snapshot {meta_key}) is unusable: {why}"
            ))
        };
        let bytes = read_bootstrap(&self.config.root, meta.id)
            .map_err(|e| unusable(format!("{BOOTSTRAP_IN_LAYER}: {e}")))?;
        rafs::read::Bootstrap::from_bytes(bytes.clone()).map_err(|e| unusable(chain(&e)))?;
        let boot_dir = self.config.root.join("bootstraps");
        std::fs::create_dir_all(&boot_dir)
            .map_err(|e| Status::internal(format!("creating {}: {e}", boot_dir.display())))?;
        let bootstrap = boot_dir.join(format!("{}.boot", meta.id));
        write_private(&bootstrap, &bytes)
            .map_err(|e| Status::internal(format!("writing {}: {e}", bootstrap.display())))?;
        let reference = ImageRef::parse(&image)
            .map_err(|e| Status::invalid_argument(format!("image {image}: {e}")))?;
        probe(&reference.host, !reference.is_loopback()).map_err(|e| {
            Status::unavailable(format!(
                "image {image}: its registry {} is unreachable: {e}",
                reference.host
            ))
        })?;
        let config = NydusdConfig::for_image(
            Some(&self.template),
            &image,
            &ImageConfigOptions {
                cache_dir: self.config.cache_dir.clone(),
                auth: state.auths.get(&reference.host),
                insecure: false,
            },
        )
        .map_err(|e| Status::invalid_argument(format!("image {image}: {e}")))?;
        let config_dir = self.config.root.join("config");
        let io = |what: String| move |e: std::io::Error| Status::internal(format!("{what}: {e}"));
        std::fs::create_dir_all(&config_dir)
            .map_err(io(format!("creating {}", config_dir.display())))?;
        let config_path = config_dir.join(format!("{}.json", meta.id));
        write_private(&config_path, config.to_json().as_bytes())
            .map_err(io(format!("writing {}", config_path.display())))?;
        let (daemon_id, mountpoint) = match self.config.daemon_mode {
            DaemonMode::Dedicated => {
                let id = format!("nydusd-{}", meta.id);
                let mut cmd = self.command(
                    state,
                    &id,
                    &snapshot_dir(&self.config.root, meta.id).join("mnt"),
                );
                cmd.bootstrap = Some(bootstrap.clone());
                cmd.config = Some(config_path.clone());
                let d = self.start(state, &id, cmd, false, &image, meta_key)?;
                (id, d)
            }
            DaemonMode::Shared => {
                let mnt = self.shared_daemon(state)?;
                let sub = format!("/{}", meta.id);
                let daemon = state.daemons.get(SHARED_DAEMON_ID).expect("just ensured");
                let req = MountRequest {
                    source: bootstrap.display().to_string(),
                    fs_type: "rafs".into(),
                    config: config.to_json(),
                    prefetch_files: None,
                };
                match daemon.mount(&sub, &req) {
                    Ok(()) => {}
                    // Mounted before a restart of ours: the same image, keep it.
                    Err(e) if e.status() == Some(409) => {
                        let info = daemon
                            .api
                            .daemon_info()
                            .map_err(|e| Status::unavailable(e.to_string()))?;
                        if info.mounts.get(&sub).map(|m| m.source.as_str())
                            != Some(req.source.as_str())
                        {
                            return Err(Status::internal(format!(
                                "image {image}: shared daemon: {e}"
                            )));
                        }
                    }
                    Err(e) => {
                        return Err(Status::failed_precondition(format!(
                            "image {image} (snapshot {meta_key}): the shared nydusd refused it: {e}"
                        )))
                    }
                }
                (SHARED_DAEMON_ID.to_string(), mnt.join(meta.id.to_string()))
            }
        };
        let inst = InstanceRecord {
            meta_key: meta_key.to_string(),
            image: image.clone(),
            daemon_id,
            mountpoint: mountpoint.clone(),
        };
        self.store.put_instance(meta.id, &inst)?;
        self.metrics.instances_mounted.inc();
        info!(image = %image, snapshot = %meta_key, mountpoint = %mountpoint.display(), "image mounted");
        Ok(mountpoint)
    }

    /// Where daemon `id`'s sockets (API, supervisor) are.
    fn socket_dir(&self, id: &str) -> PathBuf {
        self.config.root.join("socket").join(id)
    }

    /// The nydusd binary new daemons run (a live upgrade changes it).
    fn nydusd(&self, state: &State) -> PathBuf {
        state
            .nydusd
            .clone()
            .unwrap_or_else(|| self.config.nydusd_path.clone())
    }

    fn command(&self, state: &State, id: &str, mountpoint: &Path) -> DaemonCommand {
        let root = &self.config.root;
        let sockets = self.socket_dir(id);
        let mut cmd = DaemonCommand::new(self.nydusd(state), mountpoint, sockets.join("api.sock"));
        if self.config.recover_policy == RecoverPolicy::Failover {
            cmd.supervisor = Some(sockets.join("supervisor.sock"));
        }
        cmd.id = Some(id.to_string());
        cmd.log_file = Some(root.join("logs").join(format!("{id}.log")));
        cmd.log_level = self.config.log_level.clone();
        cmd.threads = self.config.threads_number;
        cmd.detach = true;
        cmd
    }

    /// Starts daemon `id`, waits until it serves, and records it; returns its mountpoint.
    fn start(
        &self,
        state: &mut State,
        id: &str,
        cmd: DaemonCommand,
        shared: bool,
        image: &str,
        snapshot: &str,
    ) -> Result<PathBuf, Status> {
        if let Some(dir) = cmd.log_file.as_ref().and_then(|l| l.parent()) {
            let _ = std::fs::create_dir_all(dir);
        }
        // A mount left by a daemon that died would make the new one fail.
        detach_mount(&cmd.mountpoint);
        if let Some(path) = &cmd.supervisor {
            // The supervisor of a daemon gone before this one lets go first.
            state.supervisors.remove(id);
            let sup = Supervisor::bind(path).map_err(|e| {
                Status::internal(format!("image {image} (snapshot {snapshot}): {e}"))
            })?;
            state.supervisors.insert(id.to_string(), sup);
        }
        let started = std::time::Instant::now();
        let mut d = match cmd.start() {
            Ok(d) => d,
            Err(e) => {
                state.supervisors.remove(id);
                return Err(Status::internal(format!(
                    "image {image} (snapshot {snapshot}): {}",
                    chain(&e)
                )));
            }
        };
        // Recorded before it is waited for: a snapshotter killed meanwhile finds it again
        // (and stops it) instead of leaving it running unknown.
        let record = DaemonRecord {
            pid: d.pid,
            start_time: d.start_time,
            apisock: cmd.apisock.clone(),
            mountpoint: cmd.mountpoint.clone(),
            shared,
        };
        if let Err(e) = self.store.put_daemon(id, &record) {
            let _ = d.stop(STOP_GRACE);
            state.supervisors.remove(id);
            return Err(e);
        }
        let fail = |d: Daemon, state: &mut State| {
            let _ = d.stop(STOP_GRACE);
            let _ = self.store.remove_daemon(id);
            state.supervisors.remove(id);
        };
        if let Err(e) = d.wait_running(self.config.ready_timeout) {
            let timed_out = e.to_string().contains("was not serving after");
            let pid = d.pid;
            fail(d, state);
            self.metrics.daemon_failures.inc();
            let msg = format!(
                "image {image} (snapshot {snapshot}): nydusd {id} (pid {pid}) did not start serving: {}",
                chain(&e)
            );
            return Err(if timed_out {
                Status::deadline_exceeded(msg)
            } else {
                Status::unavailable(msg)
            });
        }
        if !is_mountpoint(&cmd.mountpoint) {
            let pid = d.pid;
            fail(d, state);
            return Err(Status::internal(format!(
                "image {image}: nydusd {id} (pid {pid}) is RUNNING but {} is not mounted",
                cmd.mountpoint.display()
            )));
        }
        info!(image = %image, snapshot = %snapshot, daemon = %id, pid = d.pid,
              "nydusd serving after {:?}", started.elapsed());
        self.metrics.daemons_started.inc();
        state.daemons.insert(id.to_string(), d);
        self.running.store(state.daemons.len(), Ordering::Relaxed);
        Ok(cmd.mountpoint)
    }

    /// The shared daemon's mountpoint, starting it if it is not running.
    fn shared_daemon(&self, state: &mut State) -> Result<PathBuf, Status> {
        if let Some(d) = state.daemons.get_mut(SHARED_DAEMON_ID) {
            if d.is_alive() && is_mountpoint(&d.mountpoint) {
                return Ok(d.mountpoint.clone());
            }
            let d = state.daemons.remove(SHARED_DAEMON_ID).expect("present");
            let _ = d.stop(STOP_GRACE);
        }
        let cmd = self.command(state, SHARED_DAEMON_ID, &self.config.root.join("mnt"));
        self.start(state, SHARED_DAEMON_ID, cmd, true, "(shared daemon)", "-")
    }

    /// Unmounts the image whose meta snapshot has id `id` (its meta snapshot is being
    /// removed): stops its dedicated daemon, or unmounts it from the shared one.
    pub fn release(&self, id: u64) -> Result<(), Status> {
        let mut state = self.lock();
        if self.config.recover_policy == RecoverPolicy::Failover {
            // A shared daemon that died must take the image out of a live session.
            self.fail_over_dead(&mut state);
        }
        if let Some((_, inst)) = self.store.instances()?.into_iter().find(|(i, _)| *i == id) {
            info!(image = %inst.image, snapshot = %inst.meta_key, "unmounting image: its snapshot is removed");
            self.drop_instance(&mut state, id, &inst);
        }
        Ok(())
    }

    fn drop_instance(&self, state: &mut State, id: u64, inst: &InstanceRecord) {
        if inst.daemon_id == SHARED_DAEMON_ID {
            if let Some(d) = state.daemons.get(SHARED_DAEMON_ID) {
                if let Err(e) = d.umount(&format!("/{id}")) {
                    if e.status() != Some(404) {
                        warn!(image = %inst.image, snapshot = %inst.meta_key, "unmounting from the shared daemon: {e}");
                    }
                }
            }
        } else {
            self.stop_daemon(state, &inst.daemon_id);
        }
        let _ = std::fs::remove_file(self.config.root.join("config").join(format!("{id}.json")));
        let _ = std::fs::remove_file(
            self.config
                .root
                .join("bootstraps")
                .join(format!("{id}.boot")),
        );
        if let Err(e) = self.store.remove_instance(id) {
            warn!("forgetting instance {id}: {e}");
        }
    }

    fn stop_daemon(&self, state: &mut State, id: &str) {
        let d = match state.daemons.remove(id) {
            Some(d) => Some(d),
            None => self
                .store
                .daemons()
                .ok()
                .and_then(|all| all.into_iter().find(|(i, _)| i == id))
                .map(|(_, r)| Daemon::adopt(r.pid, r.start_time, r.apisock, r.mountpoint)),
        };
        if let Some(d) = d {
            let pid = d.pid;
            match d.stop(STOP_GRACE) {
                Ok(()) => info!(daemon = %id, pid, "nydusd stopped"),
                Err(e) => warn!(daemon = %id, pid, "stopping nydusd: {e}"),
            }
        }
        // After the daemon: holding its session, the supervisor kept the connection
        // alive; now the mount is gone (or detached), and so can the session be.
        state.supervisors.remove(id);
        let _ = std::fs::remove_dir_all(self.socket_dir(id));
        if let Err(e) = self.store.remove_daemon(id) {
            warn!("forgetting daemon {id}: {e}");
        }
        self.running.store(state.daemons.len(), Ordering::Relaxed);
    }

    /// After a restart of the snapshotter: adopts the daemons still serving, cleans up
    /// after dead ones and (policy `restart`) mounts their images again.
    pub fn recover(&self) -> Result<(), Status> {
        let mut state = self.lock();
        for (id, rec) in self.store.daemons()? {
            let mut d = Daemon::adopt(rec.pid, rec.start_time, &rec.apisock, &rec.mountpoint);
            let alive = d.is_alive()
                && d.api.daemon_info().is_ok_and(|i| i.state == "RUNNING")
                && is_mountpoint(&rec.mountpoint);
            if alive {
                info!(daemon = %id, pid = rec.pid, "found running nydusd");
                if self.config.recover_policy == RecoverPolicy::Failover {
                    self.resupervise(&mut state, &id, &d);
                }
                state.daemons.insert(id, d);
                self.running.store(state.daemons.len(), Ordering::Relaxed);
            } else {
                warn!(daemon = %id, pid = rec.pid, "nydusd is gone; cleaning up after it");
                self.stop_daemon(&mut state, &id);
            }
        }
        for (id, inst) in self.store.instances()? {
            if self.serving(&mut state, &inst) {
                continue;
            }
            self.drop_instance(&mut state, id, &inst);
            let meta = self.store.get(&inst.meta_key)?;
            match (self.config.recover_policy, meta) {
                // With failover too: nothing held the session of a daemon that died
                // while the snapshotter was down, so the kernel ended it.
                (RecoverPolicy::Restart | RecoverPolicy::Failover, Some(meta)) => {
                    if let Err(e) = self.mount(&mut state, &inst.meta_key, &meta) {
                        warn!(image = %inst.image, snapshot = %inst.meta_key, "mounting again: {}", e.message());
                    }
                }
                _ => info!(image = %inst.image, snapshot = %inst.meta_key,
                           "image unmounted; it is mounted again when a snapshot over it is"),
            }
        }
        Ok(())
    }

    /// Supervises again a daemon found running after a restart of the snapshotter (the
    /// sessions held by the previous snapshotter went with it): binds its supervisor
    /// socket again and asks the daemon to hand its session over.
    fn resupervise(&self, state: &mut State, id: &str, d: &Daemon) {
        let path = self.socket_dir(id).join("supervisor.sock");
        let sup = match Supervisor::bind(&path) {
            Ok(s) => s,
            Err(e) => {
                warn!(daemon = %id, "no failover for this daemon: {e}");
                return;
            }
        };
        match d.api.sendfd() {
            Ok(()) => {
                info!(daemon = %id, "holding its FUSE session again");
                state.supervisors.insert(id.to_string(), sup);
            }
            Err(e) => {
                warn!(daemon = %id, "no failover for this daemon (started without --supervisor?): {e}")
            }
        }
    }

    /// With `recover_policy = "failover"`, called every [`WATCH_EVERY`]: a successor
    /// for each daemon that died. When a successor cannot take the session over, the
    /// daemon's images are mounted again (containers over the old mount then fail, as
    /// with `restart`).
    pub fn watch(&self) {
        if self.config.recover_policy != RecoverPolicy::Failover {
            return;
        }
        let mut state = self.lock();
        self.fail_over_dead(&mut state);
    }

    fn fail_over_dead(&self, state: &mut State) {
        let dead: Vec<String> = state
            .daemons
            .iter_mut()
            .filter_map(|(id, d)| (!d.is_alive()).then(|| id.clone()))
            .collect();
        for id in dead {
            let (pid, mounted) = state
                .daemons
                .get(&id)
                .map_or((0, false), |d| (d.pid, is_mountpoint(&d.mountpoint)));
            if !mounted {
                // Its mount went away (unmounted, or the connection aborted): there is
                // no session to take over.
                warn!(daemon = %id, pid, "nydusd died and its mount is gone; its images are mounted again");
                self.remount(state, &id);
                continue;
            }
            warn!(daemon = %id, pid, "nydusd died; a successor takes its FUSE session over");
            let t = std::time::Instant::now();
            let nydusd = self.nydusd(state);
            // Once more on failure: the session is intact at the supervisor, and the
            // containers only wait.
            let done = self.succeed(state, &id, &nydusd).or_else(|f| {
                warn!(daemon = %id, "failover failed: {}; trying once more", f.why);
                self.succeed(state, &id, &nydusd)
            });
            match done {
                Ok(next) => {
                    self.metrics.failovers.inc();
                    info!(daemon = %id, pid = next, "failover done in {:?}", t.elapsed());
                }
                Err(f) => {
                    self.metrics.daemon_failures.inc();
                    warn!(daemon = %id, "failover failed: {}; its images are mounted again", f.why);
                    self.remount(state, &id);
                }
            }
        }
    }

    /// Stops daemon `id` and mounts its images again with a new one.
    fn remount(&self, state: &mut State, id: &str) {
        self.stop_daemon(state, id);
        let Ok(instances) = self.store.instances() else {
            return;
        };
        for (iid, inst) in instances.into_iter().filter(|(_, i)| i.daemon_id == id) {
            self.drop_instance(state, iid, &inst);
            if let Ok(Some(meta)) = self.store.get(&inst.meta_key) {
                if let Err(e) = self.mount(state, &inst.meta_key, &meta) {
                    warn!(image = %inst.image, snapshot = %inst.meta_key, "mounting again: {}", e.message());
                }
            }
        }
    }

    /// Starts `nydusd` as the successor of daemon `id`, with `--upgrade` and an API
    /// socket of its own: it takes the session over (mounting its images again) while
    /// the predecessor still serves, if it still runs (a live upgrade); then the
    /// predecessor is killed and the successor serves. Returns its pid, or why not and
    /// whether the predecessor is gone.
    fn succeed(&self, state: &mut State, id: &str, nydusd: &Path) -> Result<u32, Failed> {
        let kept = |why: String| Failed {
            why,
            predecessor_gone: false,
        };
        let sup = state
            .supervisors
            .get(id)
            .ok_or_else(|| kept("the snapshotter does not supervise it".into()))?;
        if !sup.has_session() {
            return Err(kept("its supervisor holds no FUSE session".into()));
        }
        let rec = self
            .store
            .daemons()
            .map_err(|e| kept(e.message().to_string()))?
            .into_iter()
            .find(|(i, _)| i == id)
            .map(|(_, r)| r)
            .ok_or_else(|| kept("it is not in the store".into()))?;
        let mut cmd = self.command(state, id, &rec.mountpoint);
        cmd.nydusd = nydusd.to_path_buf();
        cmd.upgrade = true;
        // Not the predecessor's socket: it may still answer on it.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        cmd.apisock = self.socket_dir(id).join(format!("api-{stamp}.sock"));
        let mut next = cmd.start().map_err(|e| kept(chain(&e)))?;
        let prepared = next
            .wait_api(self.config.ready_timeout)
            .and_then(|()| next.api.takeover());
        if let Err(e) = prepared {
            let _ = next.kill();
            let _ = std::fs::remove_file(&cmd.apisock);
            return Err(kept(chain(&e)));
        }
        // Recorded before the predecessor goes: a snapshotter killed from here on finds
        // the successor (and adopts it once it serves, or stops it).
        let record = DaemonRecord {
            pid: next.pid,
            start_time: next.start_time,
            apisock: cmd.apisock.clone(),
            ..rec.clone()
        };
        if let Err(e) = self.store.put_daemon(id, &record) {
            let _ = next.kill();
            return Err(kept(e.message().to_string()));
        }
        if let Some(old) = state.daemons.remove(id) {
            let (pid, sock) = (old.pid, old.api.socket().to_path_buf());
            if let Err(e) = old.kill() {
                let _ = next.kill();
                return Err(Failed {
                    why: format!("the old nydusd (pid {pid}): {}", chain(&e)),
                    predecessor_gone: true,
                });
            }
            let _ = std::fs::remove_file(sock);
        }
        let served = next
            .api
            .start()
            .and_then(|()| next.wait_running(self.config.ready_timeout));
        if let Err(e) = served {
            let _ = next.kill();
            return Err(Failed {
                why: chain(&e),
                predecessor_gone: true,
            });
        }
        let pid = next.pid;
        state.daemons.insert(id.to_string(), next);
        Ok(pid)
    }

    /// A live upgrade: every daemon handed to a successor running `nydusd`, without a
    /// failed read in the containers it serves; daemons started later run it too. Needs
    /// `recover_policy = "failover"`. Returns the ids upgraded.
    pub fn upgrade(&self, nydusd: &Path) -> Result<Vec<String>, String> {
        if self.config.recover_policy != RecoverPolicy::Failover {
            return Err(
                "a live upgrade needs daemon.recover_policy = \"failover\" (the snapshotter \
                 must hold the daemons' FUSE sessions)"
                    .into(),
            );
        }
        let mut state = self.lock();
        let ids: Vec<String> = state.daemons.keys().cloned().collect();
        let mut done = Vec::new();
        for id in ids {
            let t = std::time::Instant::now();
            match self.succeed(&mut state, &id, nydusd) {
                Ok(pid) => {
                    info!(daemon = %id, pid, "upgraded to {} in {:?}", nydusd.display(), t.elapsed());
                    done.push(id);
                }
                Err(f) if !f.predecessor_gone => {
                    warn!(daemon = %id, "upgrade refused, the daemon serves on: {}", f.why);
                    return Err(format!(
                        "daemon {id}: {} (it serves on; upgraded before it: {done:?})",
                        f.why
                    ));
                }
                Err(f) => {
                    // The old daemon is gone: its session goes back to the binary it ran.
                    let previous = self.nydusd(&state);
                    warn!(daemon = %id, "upgrade failed: {}; back to {}", f.why, previous.display());
                    if let Err(back) = self.succeed(&mut state, &id, &previous) {
                        warn!(daemon = %id, "{}; its images are mounted again", back.why);
                        self.remount(&mut state, &id);
                        return Err(format!(
                            "daemon {id}: {} (its images were mounted again; upgraded before \
                             it: {done:?})",
                            f.why
                        ));
                    }
                    return Err(format!(
                        "daemon {id}: {} (it serves on with {}; upgraded before it: {done:?})",
                        f.why,
                        previous.display()
                    ));
                }
            }
        }
        state.nydusd = Some(nydusd.to_path_buf());
        Ok(done)
    }

    /// Every daemon, for the system controller.
    pub fn daemons(&self) -> Vec<DaemonStatus> {
        let mut state = self.lock();
        let supervised: BTreeSet<String> = state
            .supervisors
            .iter()
            .filter(|(_, s)| s.has_session())
            .map(|(id, _)| id.clone())
            .collect();
        let mut v: Vec<DaemonStatus> = state
            .daemons
            .iter_mut()
            .map(|(id, d)| DaemonStatus {
                id: id.clone(),
                pid: d.pid,
                mountpoint: d.mountpoint.clone(),
                alive: d.is_alive(),
                supervised: supervised.contains(id),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Reads the credentials file again; images whose registry's credentials changed
    /// get them through their daemon's `PUT /api/v1/config`, without a restart.
    pub fn refresh_auth(&self) {
        let auths = match auth::load(&self.config.docker_config) {
            Ok(a) => a,
            Err(e) => {
                warn!("credentials: {e}");
                return;
            }
        };
        let mut state = self.lock();
        if auths == state.auths {
            return;
        }
        let Ok(instances) = self.store.instances() else {
            return;
        };
        let mut all_given = true;
        for (id, inst) in instances {
            let Ok(r) = ImageRef::parse(&inst.image) else {
                continue;
            };
            let (old, new) = (state.auths.get(&r.host), auths.get(&r.host));
            if old == new {
                continue;
            }
            let Some((user, password)) = new else {
                continue;
            };
            let (user, password) = (&user, &password);
            let Some(d) = state.daemons.get(&inst.daemon_id) else {
                continue;
            };
            let target = (inst.daemon_id == SHARED_DAEMON_ID).then(|| format!("/{id}"));
            let update = ConfigUpdate {
                registry_auth: Some(encode_auth(user, password)),
            };
            match d.api.update_config(target.as_deref(), &update) {
                Ok(()) => {
                    self.metrics.auth_refreshes.inc();
                    info!(image = %inst.image, snapshot = %inst.meta_key, "new registry credentials handed to nydusd")
                }
                Err(e) => {
                    all_given = false;
                    warn!(image = %inst.image, snapshot = %inst.meta_key,
                          "handing new credentials to nydusd (tried again at the next read of the file): {e}")
                }
            }
        }
        // Kept as the last seen only once every daemon has them: a failed hand-over is
        // tried again.
        if all_given {
            state.auths = auths;
        }
    }

    /// Drops the instances whose meta snapshot no longer exists (Cleanup).
    pub fn drop_orphans(&self) -> Result<(), Status> {
        let mut state = self.lock();
        for (id, inst) in self.store.instances()? {
            if self.store.get(&inst.meta_key)?.is_none_or(|r| r.id != id) {
                self.drop_instance(&mut state, id, &inst);
            }
        }
        Ok(())
    }

    /// Deletes cache files of blobs that no image's bootstrap names (when the cache
    /// manager is on); returns how many files went.
    pub fn gc_cache(&self, metas: &[Record]) -> usize {
        if !self.config.cache_gc {
            return 0;
        }
        let mut wanted = BTreeSet::new();
        for m in metas {
            let read = read_bootstrap(&self.config.root, m.id)
                .map_err(|e| e.to_string())
                .and_then(|b| rafs::read::Bootstrap::from_bytes(b).map_err(|e| e.to_string()));
            match read {
                Ok(b) => wanted.extend(b.blobs().iter().map(|b| b.id.clone())),
                // An unreadable bootstrap: keep everything rather than guess.
                Err(_) => return 0,
            }
        }
        let Ok(dir) = std::fs::read_dir(&self.config.cache_dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let blob = [".blob.data", ".chunk_map", ".chunk_meta"]
                .iter()
                .find_map(|s| name.strip_suffix(s));
            if let Some(blob) = blob {
                if !wanted.contains(blob) && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            info!("cache: removed {removed} files of blobs no image uses");
        }
        removed
    }

    /// Stops every daemon (`cleanup_on_close`).
    pub fn stop_all(&self) {
        let mut state = self.lock();
        if let Ok(instances) = self.store.instances() {
            for (id, inst) in instances {
                self.drop_instance(&mut state, id, &inst);
            }
        }
        let ids: Vec<String> = self
            .store
            .daemons()
            .map(|d| d.into_iter().map(|(i, _)| i).collect())
            .unwrap_or_default();
        for id in ids {
            self.stop_daemon(&mut state, &id);
        }
    }

    /// Daemons running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
}

/// Connects to the registry host (`host[:port]`; without a port, 443 for HTTPS and 80 for
/// plain HTTP), within [`PROBE_TIMEOUT`].
fn probe(host: &str, https: bool) -> Result<(), String> {
    let with_port = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else if https {
        format!("{host}:443")
    } else {
        format!("{host}:80")
    };
    let addrs: Vec<_> = with_port
        .to_socket_addrs()
        .map_err(|e| format!("resolving {with_port}: {e}"))?
        .collect();
    let mut last = format!("{with_port} has no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, PROBE_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}
