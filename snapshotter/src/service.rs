//! containerd's snapshots API over the store and the daemon manager.
//!
//! * Ordinary layers and containers behave as with containerd's overlayfs
//!   snapshotter: a snapshot is a directory `<root>/snapshots/<id>/fs`; an active one
//!   over parents is an overlay of the parents' directories with its own as upperdir.
//! * A layer prepared for a pull (`containerd.io/snapshot.ref`) that the image marks
//!   as nydus data (`containerd.io/snapshot/nydus-blob`) is committed at once, empty,
//!   and answered `ALREADY_EXISTS`: containerd then skips downloading it.
//! * The nydus bootstrap layer is unpacked by containerd as usual (its
//!   `image/image.boot`).
//! * A snapshot over a chain holding a bootstrap layer is a nydus container rootfs: the
//!   image is mounted by nydusd (see [`crate::daemons`]) and the overlay's only
//!   lowerdir is that mount, which shows the whole merged image.

use crate::config::Config;
use crate::daemons::{snapshot_dir, Manager};
use crate::filters;
use crate::metrics::Metrics;
use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::proto::snapshots::*;
use crate::proto::types::Mount;
use crate::store::{Kind as StoreKind, Record, Store};
use crate::{NYDUS_BLOB_LABEL, NYDUS_BOOTSTRAP_LABEL, SNAPSHOT_REF_LABEL};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

/// The snapshotter: what every request works on.
pub struct Snapshotter {
    config: Arc<Config>,
    store: Arc<Store>,
    manager: Arc<Manager>,
    metrics: Metrics,
}

fn is_true(labels: &BTreeMap<String, String>, key: &str) -> bool {
    labels.get(key).is_some_and(|v| v == "true")
}

fn io_status(what: String) -> impl FnOnce(std::io::Error) -> Status {
    move |e| Status::internal(format!("{what}: {e}"))
}

impl Snapshotter {
    /// A snapshotter over `store`, with images served through `manager`.
    pub fn new(
        config: Arc<Config>,
        store: Arc<Store>,
        manager: Arc<Manager>,
        metrics: Metrics,
    ) -> Self {
        Snapshotter {
            config,
            store,
            manager,
            metrics,
        }
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        snapshot_dir(&self.config.root, id).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        snapshot_dir(&self.config.root, id).join("work")
    }

    /// The parents of a snapshot, nearest first.
    fn ancestors(&self, mut parent: String) -> Result<Vec<(String, Record)>, Status> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        while !parent.is_empty() {
            if !seen.insert(parent.clone()) {
                return Err(Status::internal(format!(
                    "snapshot parents loop at {parent}"
                )));
            }
            let rec = self.store.must_get(&parent)?;
            let next = rec.parent.clone();
            out.push((parent, rec));
            parent = next;
        }
        Ok(out)
    }

    /// Whether `rec` is the meta layer of a nydus image: committed, and marked so by
    /// the image (or, without the label, holding `image/image.boot` over a nydus data
    /// layer).
    fn is_meta(&self, rec: &Record) -> bool {
        rec.kind == StoreKind::Committed
            && (is_true(&rec.labels, NYDUS_BOOTSTRAP_LABEL)
                || (crate::daemons::has_bootstrap(&self.config.root, rec.id)
                    && self
                        .store
                        .get(&rec.parent)
                        .ok()
                        .flatten()
                        .is_some_and(|p| is_true(&p.labels, NYDUS_BLOB_LABEL))))
    }

    /// The mounts of snapshot `key`.
    fn mounts(&self, key: &str, rec: &Record) -> Result<Vec<Mount>, Status> {
        let fs = self.fs_dir(rec.id);
        std::fs::create_dir_all(&fs).map_err(io_status(format!("creating {}", fs.display())))?;
        if rec.kind == StoreKind::Active {
            let work = self.work_dir(rec.id);
            std::fs::create_dir_all(&work)
                .map_err(io_status(format!("creating {}", work.display())))?;
        }
        let parents = self.ancestors(rec.parent.clone())?;
        // A layer being unpacked for a pull is an ordinary directory, whatever the image.
        let unpacking = rec.labels.contains_key(SNAPSHOT_REF_LABEL);
        if !unpacking {
            if let Some(at) = parents.iter().position(|(_, p)| self.is_meta(p)) {
                let (meta_key, meta) = &parents[at];
                let lower = self.manager.ensure(meta_key, meta)?;
                debug!(snapshot = %key, image_snapshot = %meta_key, "nydus rootfs over {}", lower.display());
                // Layers committed over the image (a container committed as a new image)
                // stay above it.
                let mut lowers: Vec<PathBuf> = parents[..at]
                    .iter()
                    .map(|(_, p)| self.fs_dir(p.id))
                    .collect();
                lowers.push(lower);
                return Ok(self.overlay(rec, lowers, true));
            }
            if let Some((blob_key, _)) = parents
                .iter()
                .find(|(_, p)| is_true(&p.labels, NYDUS_BLOB_LABEL))
            {
                return Err(Status::failed_precondition(format!(
                    "snapshot {key}: its image has nydus data layers ({blob_key}) but no bootstrap layer \
                     ({NYDUS_BOOTSTRAP_LABEL}): the image is incomplete or not a nydus image"
                )));
            }
        }
        let lowers: Vec<PathBuf> = parents.iter().map(|(_, p)| self.fs_dir(p.id)).collect();
        Ok(self.overlay(rec, lowers, false))
    }

    /// containerd's overlayfs snapshotter's mounts for `rec` over `lowers` (nearest
    /// first); over a nydus mount (`nydus`), a view keeps its own directory on top, as
    /// upstream's does.
    fn overlay(&self, rec: &Record, lowers: Vec<PathBuf>, nydus: bool) -> Vec<Mount> {
        let fs = self.fs_dir(rec.id);
        let bind = |source: &Path, rw: bool| Mount {
            r#type: "bind".into(),
            source: source.display().to_string(),
            target: String::new(),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        let overlay = |mut options: Vec<String>, dirs: &[PathBuf]| {
            let joined: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            options.insert(0, "index=off".into());
            options.push(format!("lowerdir={}", joined.join(":")));
            Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options,
            }
        };
        match rec.kind {
            StoreKind::Active if lowers.is_empty() => vec![bind(&fs, true)],
            StoreKind::Active => {
                let mut options = vec![
                    format!("workdir={}", self.work_dir(rec.id).display()),
                    format!("upperdir={}", fs.display()),
                ];
                if self.config.overlay_volatile {
                    options.push("volatile".into());
                }
                vec![overlay(options, &lowers)]
            }
            _ if lowers.is_empty() => vec![bind(&fs, false)],
            _ if nydus => {
                let mut dirs = vec![fs];
                dirs.extend(lowers);
                vec![overlay(Vec::new(), &dirs)]
            }
            _ if lowers.len() == 1 => vec![bind(&lowers[0], false)],
            _ => vec![overlay(Vec::new(), &lowers)],
        }
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: StoreKind,
    ) -> Result<Vec<Mount>, Status> {
        if let Some(target) = labels.get(SNAPSHOT_REF_LABEL) {
            if self.store.get(target)?.is_some() {
                return Err(Status::already_exists(format!(
                    "target snapshot {target} already exists"
                )));
            }
            if kind == StoreKind::Active && is_true(&labels, NYDUS_BLOB_LABEL) {
                let rec =
                    self.store
                        .create(target, StoreKind::Committed, parent, labels.clone())?;
                let fs = self.fs_dir(rec.id);
                std::fs::create_dir_all(&fs)
                    .map_err(io_status(format!("creating {}", fs.display())))?;
                self.metrics.remote_layers.inc();
                info!(snapshot = %target, image = %labels.get(crate::IMAGE_REF_LABEL).map_or("?", |s| s.as_str()),
                      "nydus data layer: committed without download");
                return Err(Status::already_exists(format!(
                    "target snapshot {target} (a nydus data layer) already exists"
                )));
            }
        }
        let rec = self.store.create(key, kind, parent, labels)?;
        match self.mounts(key, &rec) {
            Ok(m) => Ok(m),
            Err(e) => {
                // Nothing of a failed Prepare stays behind (and nothing else: the key may
                // have been removed and prepared again meanwhile).
                if let Err(r) = self.store.remove_if(key, rec.id) {
                    warn!(snapshot = %key, "rolling back a failed prepare: {r}");
                }
                let _ = std::fs::remove_dir_all(snapshot_dir(&self.config.root, rec.id));
                Err(e)
            }
        }
    }

    /// Prepare: a writable snapshot over `parent`.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        self.create(key, parent, labels, StoreKind::Active)
    }

    /// View: a read-only snapshot over `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        self.create(key, parent, labels, StoreKind::View)
    }

    /// Mounts: the same mounts Prepare or View gave.
    pub fn mounts_of(&self, key: &str) -> Result<Vec<Mount>, Status> {
        let rec = self.store.must_get(key)?;
        if rec.kind == StoreKind::Committed {
            return Err(Status::failed_precondition(format!(
                "snapshot {key} is committed: committed snapshots have no mounts"
            )));
        }
        self.mounts(key, &rec)
    }

    /// Commit: active `key` becomes committed `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Status> {
        let rec = self.store.must_get(key)?;
        let usage = disk_usage(&self.fs_dir(rec.id));
        let rec = self.store.commit(key, name, labels, usage)?;
        if is_true(&rec.labels, NYDUS_BOOTSTRAP_LABEL) {
            info!(snapshot = %name, image = %rec.labels.get(crate::IMAGE_REF_LABEL).map_or("?", |s| s.as_str()),
                  "nydus bootstrap layer unpacked");
        }
        Ok(())
    }

    /// Remove: the snapshot, its directory, and the image's daemon if it was the
    /// image's meta snapshot.
    pub fn remove(&self, key: &str) -> Result<(), Status> {
        let rec = self.store.remove(key)?;
        // Decided before the directory goes: without the label, a meta snapshot is known
        // by the bootstrap in it.
        let meta = self.is_meta(&rec);
        if meta {
            self.manager.release(rec.id)?;
        }
        let dir = snapshot_dir(&self.config.root, rec.id);
        nydusd::client::launcher::detach_mount(&dir.join("mnt"));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(snapshot = %key, "removing {}: {e}", dir.display());
            }
        }
        if meta {
            self.gc_cache()?;
        }
        Ok(())
    }

    fn gc_cache(&self) -> Result<usize, Status> {
        let metas: Vec<Record> = self
            .store
            .list()?
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| self.is_meta(r))
            .collect();
        Ok(self.manager.gc_cache(&metas))
    }

    /// Stat.
    pub fn stat(&self, key: &str) -> Result<Info, Status> {
        Ok(info(key, &self.store.must_get(key)?))
    }

    /// Update: the labels (all, or those named `labels.<key>` in the mask).
    pub fn update(&self, new: Info, mask: Vec<String>) -> Result<Info, Status> {
        let rec = self.store.must_get(&new.name)?;
        let mut labels = rec.labels.clone();
        if mask.is_empty() {
            labels = new.labels.into_iter().collect();
        } else {
            for path in &mask {
                if path == "labels" {
                    labels = new.labels.clone().into_iter().collect();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match new.labels.get(k) {
                        Some(v) => labels.insert(k.to_string(), v.clone()),
                        None => labels.remove(k),
                    };
                } else {
                    return Err(Status::invalid_argument(format!(
                        "cannot update field {path} of snapshot {}: only labels are mutable",
                        new.name
                    )));
                }
            }
        }
        let rec = self.store.set_labels(&new.name, labels)?;
        Ok(info(&new.name, &rec))
    }

    /// Walk with filters.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, Status> {
        let parsed = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| filters::parse(f).map_err(Status::invalid_argument))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|(k, r)| filters::any_matches(&parsed, k, r))
            .map(|(k, r)| info(&k, &r))
            .collect())
    }

    /// Usage: measured now for active snapshots, at commit for committed ones.
    pub fn usage(&self, key: &str) -> Result<UsageResponse, Status> {
        let rec = self.store.must_get(key)?;
        let (size, inodes) = match rec.kind {
            StoreKind::Committed => (rec.size, rec.inodes),
            _ => disk_usage(&self.fs_dir(rec.id)),
        };
        Ok(UsageResponse { size, inodes })
    }

    /// Cleanup: directories no snapshot owns, daemons of images no longer present,
    /// cache blobs no image uses.
    pub fn cleanup(&self) -> Result<(), Status> {
        let ids: HashSet<u64> = self.store.list()?.into_iter().map(|(_, r)| r.id).collect();
        self.manager.drop_orphans()?;
        if let Ok(dir) = std::fs::read_dir(self.config.root.join("snapshots")) {
            for entry in dir.flatten() {
                let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                if !ids.contains(&id) {
                    nydusd::client::launcher::detach_mount(&entry.path().join("mnt"));
                    info!(
                        "cleanup: removing {} (no snapshot owns it)",
                        entry.path().display()
                    );
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.gc_cache()?;
        Ok(())
    }
}

fn info(name: &str, r: &Record) -> Info {
    Info {
        name: name.to_string(),
        parent: r.parent.clone(),
        kind: match r.kind {
            StoreKind::View => Kind::View,
            StoreKind::Active => Kind::Active,
            StoreKind::Committed => Kind::Committed,
        } as i32,
        created_at: Some(r.created.into()),
        updated_at: Some(r.updated.into()),
        labels: r.labels.clone().into_iter().collect(),
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, hard links counted once.
pub fn disk_usage(dir: &Path) -> (i64, i64) {
    let mut seen = HashSet::new();
    let (mut size, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if seen.insert((md.dev(), md.ino())) {
                size += (md.blocks() * 512) as i64;
                inodes += 1;
            }
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (size, inodes)
}

/// The gRPC face of a [`Snapshotter`]: each call runs on a blocking thread (the store
/// and nydusd's API are synchronous), counted and logged.
#[derive(Clone)]
pub struct Service(pub Arc<Snapshotter>);

impl Service {
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        key: String,
        f: impl FnOnce(&Snapshotter) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let s = self.0.clone();
        let result = tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| Status::internal(format!("{op}: {e}")))?;
        let code = result
            .as_ref()
            .map_or_else(|e| e.code(), |_| tonic::Code::Ok);
        self.0.metrics.request(op, code);
        match &result {
            Err(e)
                if e.code() != tonic::Code::AlreadyExists && e.code() != tonic::Code::NotFound =>
            {
                warn!(snapshot = %key, "{op}: {}", e.message())
            }
            Err(e) => debug!(snapshot = %key, "{op}: {}", e.message()),
            Ok(_) => debug!(snapshot = %key, "{op}"),
        }
        result.map(Response::new)
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        r: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        self.run("prepare", r.key.clone(), move |s| {
            let mounts = s.prepare(&r.key, &r.parent, labels(r.labels))?;
            Ok(PrepareSnapshotResponse { mounts })
        })
        .await
    }

    async fn view(
        &self,
        r: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        self.run("view", r.key.clone(), move |s| {
            let mounts = s.view(&r.key, &r.parent, labels(r.labels))?;
            Ok(ViewSnapshotResponse { mounts })
        })
        .await
    }

    async fn mounts(&self, r: Request<MountsRequest>) -> Result<Response<MountsResponse>, Status> {
        let r = r.into_inner();
        self.run("mounts", r.key.clone(), move |s| {
            Ok(MountsResponse {
                mounts: s.mounts_of(&r.key)?,
            })
        })
        .await
    }

    async fn commit(&self, r: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run("commit", r.key.clone(), move |s| {
            s.commit(&r.name, &r.key, labels(r.labels))
        })
        .await
    }

    async fn remove(&self, r: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run("remove", r.key.clone(), move |s| s.remove(&r.key))
            .await
    }

    async fn stat(
        &self,
        r: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = r.into_inner();
        self.run("stat", r.key.clone(), move |s| {
            Ok(StatSnapshotResponse {
                info: Some(s.stat(&r.key)?),
            })
        })
        .await
    }

    async fn update(
        &self,
        r: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let mask = r.update_mask.map(|m| m.paths).unwrap_or_default();
        self.run("update", info.name.clone(), move |s| {
            Ok(UpdateSnapshotResponse {
                info: Some(s.update(info, mask)?),
            })
        })
        .await
    }

    type ListStream =
        futures_util::stream::Iter<std::vec::IntoIter<Result<ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        r: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = r.into_inner();
        let all = self
            .run("list", String::new(), move |s| s.list(&r.filters))
            .await?
            .into_inner();
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| Ok(ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(futures_util::stream::iter(batches)))
    }

    async fn usage(&self, r: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let r = r.into_inner();
        self.run("usage", r.key.clone(), move |s| s.usage(&r.key))
            .await
    }

    async fn cleanup(&self, _r: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.run("cleanup", String::new(), |s| s.cleanup()).await
    }
}
