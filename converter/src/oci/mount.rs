//! `nydusify mount`: lazily mount a nydus image straight from its registry.
//!
//! Only the bootstrap layer is downloaded; nydusd is started with the `registry` backend
//! for the same repository, so file data is fetched chunk by chunk when read (and every
//! chunk is verified against the bootstrap).

use super::check::{pick_manifest, read_bootstrap_layer};
use super::store::RegistryStore;
use super::{OciError, Result, ANNOTATION_NYDUS_BOOTSTRAP};
use nydusd::client::config::{FsPrefetchConfig, ImageConfigOptions, NydusdConfig};
use p2p_backend::registry::{Credentials, RegistryOptions};
use std::path::{Path, PathBuf};

/// What to mount and where the daemon's files go.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Registry reference of the nydus image (`host[:port]/name:tag`).
    pub target: String,
    /// Plain HTTP (loopback registries always use it).
    pub insecure: bool,
    /// Explicit credentials; otherwise the docker config is consulted.
    pub credentials: Option<Credentials>,
    /// Platform to pick from an index (`os/arch`).
    pub platform: String,
    /// Directory for the bootstrap, the nydusd config and the chunk cache.
    pub work_dir: PathBuf,
    /// Prefetch the whole image in the background after mounting.
    pub prefetch: bool,
}

/// Files written by [`prepare`] for nydusd.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The image's bootstrap.
    pub bootstrap: PathBuf,
    /// nydusd configuration (upstream v1 JSON) with the registry backend.
    pub config: PathBuf,
    /// The registry host.
    pub host: String,
    /// The repository.
    pub repo: String,
}

/// Downloads the bootstrap of `opts.target` into `opts.work_dir` and writes a nydusd
/// config that reads blobs from the same repository.
pub fn prepare(opts: &MountOptions) -> Result<Prepared> {
    let ropts = RegistryOptions {
        insecure: opts.insecure,
        credentials: opts.credentials.clone(),
        ..Default::default()
    };
    let store = RegistryStore::new(&opts.target, &ropts)?;
    let manifest = pick_manifest(&store, &opts.platform, "target")?;
    let desc = manifest
        .layers
        .iter()
        .find(|l| {
            l.annotations
                .get(ANNOTATION_NYDUS_BOOTSTRAP)
                .map(String::as_str)
                == Some("true")
        })
        .ok_or_else(|| {
            OciError::invalid(
                format!("image {}", opts.target),
                format!("no layer annotated {ANNOTATION_NYDUS_BOOTSTRAP}: not a nydus image"),
            )
        })?;
    let bootstrap = read_bootstrap_layer(&store, desc)?;
    // Refuse a bad bootstrap here, with the reason, rather than in the daemon.
    rafs::read::Bootstrap::from_bytes(bootstrap.clone())?;
    let io = |what: &Path, e| OciError::io(format!("Writing {}", what.display()), e);
    std::fs::create_dir_all(opts.work_dir.join("cache")).map_err(|e| io(&opts.work_dir, e))?;
    let boot_path = opts.work_dir.join("image.boot");
    std::fs::write(&boot_path, &bootstrap).map_err(|e| io(&boot_path, e))?;

    let mut config = NydusdConfig::for_image(
        None,
        &opts.target,
        &ImageConfigOptions {
            cache_dir: opts.work_dir.join("cache"),
            auth: opts
                .credentials
                .as_ref()
                .map(|c| (c.username.clone(), c.password.clone())),
            insecure: opts.insecure,
        },
    )
    .map_err(|e| OciError::invalid(format!("image {}", opts.target), e.to_string()))?;
    config.fs_prefetch = Some(FsPrefetchConfig {
        enable: Some(opts.prefetch),
        prefetch_all: Some(opts.prefetch),
        ..Default::default()
    });
    let registry = config
        .device
        .backend
        .as_registry()
        .expect("for_image makes a registry backend");
    let config_path = opts.work_dir.join("nydusd.json");
    let text = serde_json::to_vec_pretty(&config).expect("plain structs serialize");
    std::fs::write(&config_path, text).map_err(|e| io(&config_path, e))?;
    Ok(Prepared {
        bootstrap: boot_path,
        config: config_path,
        host: registry.host,
        repo: registry.repo,
    })
}
