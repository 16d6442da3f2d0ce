//! `nydusify build`: a plain directory (an AI model folder, a rootfs) into a one-layer
//! nydus image, pushed to a registry or OCI layout (`--target`) and/or written as a
//! bootstrap and blob file (`--output-dir`).
//!
//! The directory becomes one inline-meta data blob with a TOC, exactly like a converted
//! layer; its bootstrap is then "merged" alone so that the blob id is the blob's sha256
//! (the digest of its blob layer), and the image is packaged as `convert` packages one:
//! the blob layer, then the `tar+gzip` bootstrap layer, and a minimal config.

use super::convert::{bootstrap_layer, descriptor};
use super::store::{open_target, ImageRef};
use super::*;
use crate::create::{create, CreateOptions, SourceType};
use crate::merge::{merge_layers, open_layer_as, sha256_file};
use crate::whiteout::WhiteoutSpec;
use p2p_backend::registry::RegistryOptions;
use rafs::Compressor;
use std::path::PathBuf;
use std::time::Instant;

/// What to build and where it goes.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The directory.
    pub source_dir: PathBuf,
    /// Push the image here.
    pub target: Option<ImageRef>,
    /// Also write `image.boot` and the blob (named by its id) here.
    pub output_dir: Option<PathBuf>,
    /// How to reach the target registry.
    pub target_registry: RegistryOptions,
    /// Platform written into the config (`os/arch`).
    pub platform: String,
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk size.
    pub chunk_size: u32,
    /// Prefetch patterns (their files are laid out first in the blob).
    pub prefetch: Vec<String>,
    /// Directory for temporary files.
    pub work_dir: PathBuf,
    /// Threads compressing chunks (0: one per CPU).
    pub jobs: usize,
}

/// What `build` made (`--output-json`).
#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    /// Digest of the manifest (when pushed).
    pub manifest_digest: Option<String>,
    /// Digest of the data blob (absent for a directory without file data).
    pub blob_digest: Option<String>,
    /// Size of the data blob.
    pub blob_size: u64,
    /// Chunks in the blob.
    pub chunks: u32,
    /// Size of the bootstrap.
    pub bootstrap_size: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Builds `opts.source_dir` into a nydus image.
pub fn build(opts: &BuildOptions) -> Result<BuildReport> {
    let started = Instant::now();
    if opts.target.is_none() && opts.output_dir.is_none() {
        return Err(OciError::invalid(
            "build",
            "give --target or --output-dir (or both)",
        ));
    }
    if let Some(t) = &opts.target {
        super::store::check_target(None, t)?;
    }
    let (os, arch) = opts
        .platform
        .split_once('/')
        .ok_or_else(|| OciError::invalid(format!("platform '{}'", opts.platform), "not os/arch"))?;
    let work = tempfile::Builder::new()
        .prefix("nydusify-build-")
        .tempdir_in(&opts.work_dir)
        .map_err(|e| {
            OciError::io(
                format!("Creating a work directory in {}", opts.work_dir.display()),
                e,
            )
        })?;
    let blob_path = work.path().join("blob");
    let mut c = CreateOptions::new(&opts.source_dir, SourceType::Directory);
    c.blob = Some(blob_path.clone());
    c.inline_meta = true;
    c.blob_toc = true;
    // A plain directory has no layers below it: `.wh.` names are ordinary files.
    c.whiteout = WhiteoutSpec::None;
    c.compressor = opts.compressor;
    c.chunk_size = opts.chunk_size;
    c.prefetch = opts.prefetch.clone();
    c.threads = opts.jobs;
    create(&c)?;
    let digest = format!("sha256:{}", sha256_file(&blob_path)?);
    let size = std::fs::metadata(&blob_path)
        .map_err(|e| OciError::io("Reading the built blob", e))?
        .len();
    let mut layer = open_layer_as(&blob_path, Some(digest_hex(&digest)?))?;
    layer.blob.id = Some(digest_hex(&digest)?.to_string());
    layer.blob.size = Some(size);
    layer.name = opts.source_dir.display().to_string();
    let merged = merge_layers(&[layer], &opts.prefetch)?;
    let has_blob = !merged.blobs.is_empty();
    let chunks = merged.blobs.first().map_or(0, |b| b.chunk_count);

    if let Some(dir) = &opts.output_dir {
        let io = |e| OciError::io(format!("Writing into {}", dir.display()), e);
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(dir.join("image.boot"), &merged.bootstrap).map_err(io)?;
        if has_blob {
            std::fs::copy(&blob_path, dir.join(digest_hex(&digest)?)).map_err(io)?;
        }
    }

    let mut manifest_digest = None;
    if let Some(target_ref) = &opts.target {
        let (boot_gz, boot_diff) = bootstrap_layer(&merged.bootstrap)?;
        let mut boot = descriptor(MEDIA_LAYER_GZIP, digest_of(&boot_gz), boot_gz.len() as u64);
        for (k, v) in [
            (ANNOTATION_NYDUS_BOOTSTRAP, "true"),
            (ANNOTATION_NYDUS_FS_VERSION, "6"),
            (ANNOTATION_UNCOMPRESSED, boot_diff.as_str()),
        ] {
            boot.annotations.insert(k.into(), v.into());
        }
        let mut layers = Vec::new();
        if has_blob {
            let mut d = descriptor(MEDIA_NYDUS_BLOB, digest.clone(), size);
            d.annotations
                .insert(ANNOTATION_NYDUS_BLOB.into(), "true".into());
            layers.push(d);
        }
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|d| d.digest.clone())
            .chain([boot_diff.clone()])
            .collect();
        layers.push(boot.clone());
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": os,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("config serializes");
        let config_desc = descriptor(MEDIA_OCI_CONFIG, digest_of(&config), config.len() as u64);
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_MANIFEST.into()),
            config: config_desc.clone(),
            layers,
            annotations: Default::default(),
            extra: Default::default(),
        };
        let bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
        let mdesc = descriptor(MEDIA_OCI_MANIFEST, digest_of(&bytes), bytes.len() as u64);
        let target = open_target(target_ref, &opts.target_registry)?;
        if has_blob {
            target.put_blob_file(&manifest.layers[0], &blob_path)?;
        }
        target.put_blob_bytes(&boot, &boot_gz)?;
        target.put_blob_bytes(&config_desc, &config)?;
        target.tag(&mdesc, &bytes)?;
        manifest_digest = Some(mdesc.digest);
    }
    Ok(BuildReport {
        manifest_digest,
        blob_digest: has_blob.then_some(digest),
        blob_size: if has_blob { size } else { 0 },
        chunks,
        bootstrap_size: merged.bootstrap.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}
