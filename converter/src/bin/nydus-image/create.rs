//! `nydus-image create`: flags, their validation into `CreateOptions`, and the run.

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use converter::{CreateOptions, SourceType, WhiteoutSpec};
use rafs::{Compressor, Digester};
use std::path::PathBuf;

pub const EXAMPLES: &str = "\
Examples:
  # A directory into blobs/ (blob named by its id) and a separate bootstrap:
  nydus-image create -B rootfs.boot -D blobs/ rootfs/

  # An OCI layer (tar, tar.gz or tar.zst) into one self-contained blob, as nydusify does:
  nydus-image create -t tar-rafs --blob-inline-meta --features blob-toc \\
      --whiteout-spec none -b layer.blob layer.tar.gz

  # Lay out and prefetch /usr/bin first (patterns come from stdin, one per line):
  echo /usr/bin | nydus-image create --prefetch-policy fs -B boot -b blob rootfs/";

/// Flags of `nydus-image create`, named as in upstream nydus.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The directory or tar file to build the image from.
    #[arg(value_name = "SOURCE")]
    source: PathBuf,

    /// What SOURCE is: dir-rafs (alias directory) for a directory, tar-rafs or targz-rafs
    /// for a layer tar. Tars may be plain, gzip or zstd compressed with either type (the
    /// compression is detected from the file).
    #[arg(
        short = 't',
        long = "type",
        alias = "source-type",
        value_name = "TYPE",
        default_value = "dir-rafs",
        value_parser = parse_source_type
    )]
    source_type: SourceType,

    /// Write the bootstrap (filesystem metadata) to this file. Without it the bootstrap
    /// goes into --blob-dir, named by its sha256.
    #[arg(
        short = 'B',
        long,
        value_name = "FILE",
        conflicts_with = "blob_inline_meta"
    )]
    bootstrap: Option<PathBuf>,

    /// Write the data blob into this existing directory, named by its blob id.
    #[arg(short = 'D', long, value_name = "DIR")]
    blob_dir: Option<PathBuf>,

    /// Write the data blob to this file (takes precedence over --blob-dir for the blob).
    #[arg(short = 'b', long, value_name = "FILE")]
    blob: Option<PathBuf>,

    /// Store the bootstrap and blob metadata inside the data blob instead of a separate
    /// bootstrap file (needs --blob or --blob-dir).
    #[arg(long, alias = "inline-bootstrap")]
    blob_inline_meta: bool,

    /// Chunk compression: none, lz4_block or zstd.
    #[arg(long, value_name = "ALGO", default_value = "zstd", value_parser = parse_compressor)]
    compressor: Compressor,

    /// Chunk digest: blake3 or sha256.
    #[arg(long, value_name = "ALGO", default_value = "blake3", value_parser = parse_digester)]
    digester: Digester,

    /// Size of data chunks: a power of two from 0x1000 to 0x1000000, hex (0x100000) or
    /// decimal.
    #[arg(long, value_name = "SIZE", default_value = "0x100000", value_parser = parse_chunk_size)]
    chunk_size: u32,

    /// Extra blob features, comma separated. blob-toc adds a table of contents, tar
    /// headers and the chunk digest array to the blob (needed by lazy-loading runtimes).
    #[arg(long, value_name = "FEATURES", value_enum, value_delimiter = ',')]
    features: Vec<Feature>,

    /// How deleted files are marked in SOURCE. For a single-layer build the markers are
    /// dropped: oci drops `.wh.*` entries, overlayfs drops character devices 0:0 and the
    /// trusted.overlay.opaque xattr, none keeps everything as is.
    #[arg(long, value_name = "SPEC", value_enum, default_value_t = WhiteoutArg::Oci)]
    whiteout_spec: WhiteoutArg,

    /// fs: read prefetch patterns from stdin (one absolute path per line); the files they
    /// name are laid out first and listed in the bootstrap's prefetch table. none: no
    /// prefetch.
    #[arg(
        long,
        value_name = "POLICY",
        default_value = "none",
        value_parser = parse_prefetch_policy
    )]
    prefetch_policy: PrefetchPolicy,

    /// Write a JSON summary of the build (bootstrap path, blob ids and sizes) to this file.
    #[arg(short = 'J', long, value_name = "FILE")]
    output_json: Option<PathBuf>,

    /// RAFS format version; only 6 is supported.
    #[arg(short = 'v', long, value_name = "VERSION", default_value = "6", value_parser = parse_fs_version)]
    fs_version: u32,

    /// Reproducible metadata: do not record file owners (all files become 0:0).
    #[arg(long)]
    repeatable: bool,
}

/// `--features` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Feature {
    /// TOC, tar headers and chunk digests in the blob.
    BlobToc,
}

/// `--whiteout-spec` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum WhiteoutArg {
    /// `.wh.<name>` files and `.wh..wh..opq` (OCI image spec).
    Oci,
    /// Character device 0:0 and the trusted.overlay.opaque xattr.
    Overlayfs,
    /// Keep whiteout markers as ordinary files.
    None,
}

impl From<WhiteoutArg> for WhiteoutSpec {
    fn from(w: WhiteoutArg) -> Self {
        match w {
            WhiteoutArg::Oci => WhiteoutSpec::Oci,
            WhiteoutArg::Overlayfs => WhiteoutSpec::Overlayfs,
            WhiteoutArg::None => WhiteoutSpec::None,
        }
    }
}

/// `--prefetch-policy` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrefetchPolicy {
    Fs,
    None,
}

fn parse_source_type(s: &str) -> Result<SourceType, String> {
    s.parse()
}

fn parse_compressor(s: &str) -> Result<Compressor, String> {
    s.parse().map_err(|e: rafs::Error| e.to_string())
}

fn parse_digester(s: &str) -> Result<Digester, String> {
    s.parse().map_err(|e: rafs::Error| e.to_string())
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("'{s}' is not a number (use hex like 0x100000 or decimal)"))?;
    if !v.is_power_of_two() || !(0x1000..=0x100_0000).contains(&v) {
        return Err(format!(
            "{v:#x} is not a power of two between 0x1000 and 0x1000000"
        ));
    }
    Ok(v)
}

fn parse_prefetch_policy(s: &str) -> Result<PrefetchPolicy, String> {
    match s {
        "fs" => Ok(PrefetchPolicy::Fs),
        "none" => Ok(PrefetchPolicy::None),
        "blob" => Err("prefetch policy 'blob' is not supported (use fs or none)".into()),
        _ => Err(format!("unknown prefetch policy '{s}' (use fs or none)")),
    }
}

fn parse_fs_version(s: &str) -> Result<u32, String> {
    match s {
        "6" => Ok(6),
        "5" => Err("RAFS v5 is not supported: only --fs-version 6 can be built".into()),
        _ => Err(format!("unknown RAFS version '{s}' (only 6 is supported)")),
    }
}

impl CreateArgs {
    /// Turns the flags into library options; reads prefetch patterns from stdin for
    /// `--prefetch-policy fs`.
    fn into_options(self) -> Result<(CreateOptions, Option<PathBuf>)> {
        if self.blob_inline_meta && self.blob.is_none() && self.blob_dir.is_none() {
            bail!("--blob-inline-meta needs --blob or --blob-dir to store the blob");
        }
        let prefetch = match self.prefetch_policy {
            PrefetchPolicy::Fs => converter::prefetch::read_patterns(std::io::stdin().lock())
                .context("Reading prefetch patterns from stdin")?,
            PrefetchPolicy::None => Vec::new(),
        };
        let opts = CreateOptions {
            source: self.source,
            source_type: self.source_type,
            bootstrap: self.bootstrap,
            blob: self.blob,
            blob_dir: self.blob_dir,
            inline_meta: self.blob_inline_meta,
            compressor: self.compressor,
            digester: self.digester,
            chunk_size: self.chunk_size,
            blob_toc: self.features.contains(&Feature::BlobToc),
            whiteout: self.whiteout_spec.into(),
            prefetch,
            explicit_uidgid: !self.repeatable,
            threads: 0,
        };
        opts.validate()?;
        Ok((opts, self.output_json))
    }
}

/// Runs `nydus-image create`.
pub fn run(args: CreateArgs) -> Result<()> {
    let (opts, output_json) = args.into_options()?;
    tracing::info!(
        "building RAFS v6 from {} ({})",
        opts.source.display(),
        opts.source_type
    );
    let out = converter::create(&opts)?;
    match &out.blob {
        Some(b) => tracing::info!(
            "blob {} at {}: {} chunks, {} bytes",
            b.info.id,
            b.path.display(),
            b.info.chunk_count,
            b.info.compressed_size
        ),
        None => tracing::info!("no file data: no blob written"),
    }
    if let Some(p) = &out.bootstrap {
        tracing::info!(
            "bootstrap at {}: {} inodes, {} bytes",
            p.display(),
            out.stats.inodes,
            out.stats.bootstrap_size
        );
    }
    tracing::info!("built in {:.2}s", out.stats.total_build.as_secs_f64());
    if let Some(path) = output_json {
        out.write_json(&path)?;
    }
    Ok(())
}
