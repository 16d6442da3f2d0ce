//! `nydusify`: convert OCI images into nydus images and check the result against
//! the source.
//!
//! Image syntax (source and target):
//!   `HOST[:PORT]/NAME[:TAG]` or `docker://...`  a registry repository;
//!   `oci:DIR[:TAG]`                               an OCI image layout directory;
//!   `docker-archive:FILE`                         a `docker save` tar (source only).

#![forbid(unsafe_code)]

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use converter::oci::convert::{convert, ConvertOptions};
use converter::oci::store::ImageRef;
use p2p_backend::registry::{Credentials, RegistryOptions};
use std::path::PathBuf;
use std::process::ExitCode;

const IMAGES: &str = "\
Images:
  HOST[:PORT]/NAME[:TAG], docker://...   a registry repository (loopback registries
                                          are reached over plain HTTP)
  oci:DIR[:TAG]                           an OCI image layout directory
  docker-archive:FILE                     a `docker save` tar (source only)

Credentials come from --*-username/--*-password or the docker config
($DOCKER_CONFIG/config.json or ~/.docker/config.json).

Example:
  nydusify convert --source 127.0.0.1:5000/busybox:1 --target 127.0.0.1:5000/busybox:1-nydus";

/// Convert OCI container images into nydus (RAFS v6) images.
#[derive(Debug, Parser)]
#[command(name = "nydusify", version, after_help = IMAGES)]
struct Cli {
    /// Log level (trace, debug, info, warn, error).
    #[arg(long, global = true, default_value = "info")]
    log_level: tracing::Level,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert an OCI image into a nydus image and write or push it.
    #[command(after_help = IMAGES)]
    Convert(ConvertArgs),
    /// Check that a nydus image shows exactly the files of its source image: every
    /// blob and chunk is verified, then every path is compared (type, mode, owner,
    /// size, mtime, xattrs, symlink target, device number, hard links, content).
    /// Exits non-zero listing each difference.
    #[command(after_help = IMAGES)]
    Check(CheckArgs),
    /// Build a one-layer nydus image from a plain directory (for example an AI model
    /// folder) and push it (--target) and/or write its bootstrap and blob
    /// (--output-dir). Check it with `nydusify check --source-dir DIR --target IMAGE`.
    #[command(visible_alias = "pack", after_help = IMAGES)]
    Build(BuildArgs),
    /// Mount a nydus image from its registry, lazily: only the bootstrap is downloaded,
    /// nydusd fetches (and verifies) file data chunk by chunk when it is read. Runs in the
    /// foreground until nydusd exits (Ctrl-C or `umount` of the mount path).
    #[command(visible_alias = "view")]
    Mount(MountArgs),
}

/// Flags of `nydusify mount`.
#[derive(Debug, Args)]
struct MountArgs {
    /// The nydus image in a registry (`HOST[:PORT]/NAME:TAG`).
    #[arg(long, value_name = "IMAGE")]
    target: String,

    /// Where to mount it.
    #[arg(long, default_value = "./image-fs", value_name = "DIR")]
    mount_path: PathBuf,

    /// Reach the registry over plain HTTP.
    #[arg(long)]
    target_insecure: bool,

    /// User name for the registry.
    #[arg(long, requires = "target_password")]
    target_username: Option<String>,

    /// Password for the registry.
    #[arg(long, requires = "target_username")]
    target_password: Option<String>,

    /// Platform to mount from image indexes (os/arch[/variant]).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,

    /// Prefetch the whole image in the background after mounting.
    #[arg(long)]
    prefetch: bool,

    /// Directory for the bootstrap, nydusd config and chunk cache.
    #[arg(long, default_value = "./tmp", value_name = "DIR")]
    work_dir: PathBuf,

    /// The nydusd binary (default: next to nydusify, else from PATH).
    #[arg(long, value_name = "FILE")]
    nydusd: Option<PathBuf>,
}

/// Flags of `nydusify build`.
#[derive(Debug, Args)]
struct BuildArgs {
    /// The directory to pack.
    #[arg(long, value_name = "DIR")]
    source_dir: PathBuf,

    /// Push the image here (registry reference or oci:DIR:TAG).
    #[arg(long, value_name = "IMAGE", required_unless_present = "output_dir")]
    target: Option<String>,

    /// Write `image.boot` and the blob (named by its sha256) into this directory.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,

    #[command(flatten)]
    access: Access,

    /// Platform recorded in the image config (os/arch).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,

    /// Chunk compressor: none, lz4_block or zstd.
    #[arg(long, default_value = "zstd")]
    compressor: rafs::Compressor,

    /// Chunk size: a power of two from 0x1000 to 0x1000000.
    #[arg(long, alias = "fs-chunk-size", default_value = "0x100000", value_parser = parse_chunk_size)]
    chunk_size: u32,

    /// Read prefetch patterns (absolute paths, one per line) from stdin; their files
    /// are laid out first in the blob.
    #[arg(long)]
    prefetch_patterns: bool,

    /// Directory for temporary files.
    #[arg(long, default_value = "./tmp")]
    work_dir: PathBuf,

    /// Threads compressing chunks (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    jobs: usize,

    /// Write a JSON report (digests, sizes, timings) to this file.
    #[arg(long, value_name = "FILE")]
    output_json: Option<PathBuf>,
}

/// Flags of `nydusify check`.
#[derive(Debug, Args)]
struct CheckArgs {
    /// The OCI image the nydus image was converted from.
    #[arg(long, value_name = "IMAGE", required_unless_present = "source_dir")]
    source: Option<String>,

    /// Compare with this directory instead (images made by `nydusify build`).
    #[arg(long, value_name = "DIR", conflicts_with = "source")]
    source_dir: Option<PathBuf>,

    /// The nydus image.
    #[arg(long, value_name = "IMAGE")]
    target: String,

    #[command(flatten)]
    access: Access,

    /// Platform to check from image indexes (os/arch[/variant]).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,

    /// Check every platform of the nydus image index against the same platform of
    /// the source.
    #[arg(long, conflicts_with = "platform")]
    all_platforms: bool,

    /// Directory for downloaded blobs.
    #[arg(long, default_value = "./tmp")]
    work_dir: PathBuf,

    /// Write a JSON report (entries, files, bytes, chunks verified) to this file.
    #[arg(long, value_name = "FILE")]
    output_json: Option<PathBuf>,
}

/// Registry access flags of one side.
#[derive(Debug, Args, Clone, Default)]
struct Access {
    /// Reach the source registry over plain HTTP.
    #[arg(long)]
    source_insecure: bool,
    /// Reach the target registry over plain HTTP.
    #[arg(long)]
    target_insecure: bool,
    /// User name for the source registry.
    #[arg(long, requires = "source_password")]
    source_username: Option<String>,
    /// Password for the source registry.
    #[arg(long, requires = "source_username")]
    source_password: Option<String>,
    /// User name for the target registry.
    #[arg(long, requires = "target_password")]
    target_username: Option<String>,
    /// Password for the target registry.
    #[arg(long, requires = "target_username")]
    target_password: Option<String>,
    /// Attempts for transient registry failures.
    #[arg(long, default_value_t = 3)]
    push_retry_count: u32,
}

fn creds(u: &Option<String>, p: &Option<String>) -> Option<Credentials> {
    match (u, p) {
        (Some(u), Some(p)) => Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        }),
        _ => None,
    }
}

impl Access {
    fn source(&self) -> RegistryOptions {
        RegistryOptions {
            insecure: self.source_insecure,
            credentials: creds(&self.source_username, &self.source_password),
            retries: self.push_retry_count,
            ..Default::default()
        }
    }
    fn target(&self) -> RegistryOptions {
        RegistryOptions {
            insecure: self.target_insecure,
            credentials: creds(&self.target_username, &self.target_password),
            retries: self.push_retry_count,
            ..Default::default()
        }
    }
}

/// Flags of `nydusify convert`.
#[derive(Debug, Args)]
struct ConvertArgs {
    /// The OCI image to convert.
    #[arg(long, value_name = "IMAGE")]
    source: String,

    /// Where to put the nydus image.
    #[arg(long, value_name = "IMAGE")]
    target: String,

    #[command(flatten)]
    access: Access,

    /// Platform to convert from an image index (os/arch[/variant]).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,

    /// Convert every platform of an image index.
    #[arg(long, conflicts_with = "platform")]
    all_platforms: bool,

    /// Chunk compressor: none, lz4_block or zstd.
    #[arg(long, default_value = "zstd")]
    compressor: rafs::Compressor,

    /// Chunk size: a power of two from 0x1000 to 0x1000000.
    #[arg(long, alias = "fs-chunk-size", default_value = "0x100000", value_parser = parse_chunk_size)]
    chunk_size: u32,

    /// Read prefetch patterns (absolute paths, one per line) from stdin.
    #[arg(long)]
    prefetch_patterns: bool,

    /// Directory for temporary files.
    #[arg(long, default_value = "./tmp")]
    work_dir: PathBuf,

    /// Threads compressing chunks (0: one per CPU). Layers are converted lowest
    /// first, so that each one deduplicates against the layers below it.
    #[arg(long, default_value_t = 0)]
    jobs: usize,

    /// Reference chunks of an earlier nydus image instead of storing them again:
    /// `bootstrap=PATH` names its merged bootstrap. Its blobs used by the new image
    /// become blob layers of it (listed in the bootstrap layer's
    /// containerd.io/snapshot/nydus-reference-blob-ids) and must already be in the
    /// target repository.
    #[arg(long, value_name = "bootstrap=PATH", value_parser = parse_chunk_dict)]
    chunk_dict: Option<PathBuf>,

    /// Write a JSON report (digests, sizes, timings) to this file.
    #[arg(long, value_name = "FILE")]
    output_json: Option<PathBuf>,
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("'{s}' is not a number"))?;
    if !v.is_power_of_two() || !(0x1000..=0x100_0000).contains(&v) {
        return Err(format!(
            "{v:#x} is not a power of two between 0x1000 and 0x1000000"
        ));
    }
    Ok(v)
}

fn parse_chunk_dict(s: &str) -> Result<PathBuf, String> {
    match s.split_once('=') {
        Some(("bootstrap", p)) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(format!(
            "'{s}' is not bootstrap=PATH (the only chunk dict form supported)"
        )),
    }
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    let source: ImageRef = a.source.parse()?;
    let target: ImageRef = a.target.parse()?;
    let prefetch = if a.prefetch_patterns {
        converter::prefetch::read_patterns(std::io::stdin().lock())
            .context("Reading prefetch patterns from stdin")?
    } else {
        Vec::new()
    };
    std::fs::create_dir_all(&a.work_dir)
        .with_context(|| format!("Creating work directory {}", a.work_dir.display()))?;
    let mut opts = ConvertOptions::new(source, target);
    opts.source_registry = a.access.source();
    opts.target_registry = a.access.target();
    opts.platform = a.platform;
    opts.all_platforms = a.all_platforms;
    opts.compressor = a.compressor;
    opts.chunk_size = a.chunk_size;
    opts.prefetch = prefetch;
    opts.work_dir = a.work_dir;
    opts.jobs = a.jobs;
    opts.chunk_dict = a.chunk_dict;
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        opts.progress = Some(std::sync::Arc::new(LayerBars::default()));
    }
    let report = convert(&opts).with_context(|| format!("Converting {}", a.source))?;
    tracing::info!(
        "converted {} -> {} ({}) in {:.2}s + {:.2}s upload; {} chunks ({} bytes) deduplicated",
        report.source,
        report.target,
        report.digest,
        report.convert_seconds,
        report.push_seconds,
        report.dedup_chunks,
        report.dedup_bytes
    );
    if let Some(path) = a.output_json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(&path, json).with_context(|| format!("Writing {}", path.display()))?;
    }
    Ok(())
}

/// One progress bar per layer on stderr (only set up when stderr is a terminal).
#[derive(Debug, Default)]
struct LayerBars {
    bars: indicatif::MultiProgress,
    layers: std::sync::Mutex<Vec<indicatif::ProgressBar>>,
}

impl LayerBars {
    fn bar(&self, index: usize) -> Option<indicatif::ProgressBar> {
        self.layers.lock().ok()?.get(index).cloned()
    }
}

impl converter::oci::convert::Progress for LayerBars {
    fn layer_started(&self, index: usize, count: usize, digest: &str, size: u64) {
        let Ok(mut layers) = self.layers.lock() else {
            return;
        };
        if index == 0 {
            // A new image (of an index): its layers get new bars.
            layers.clear();
        }
        let bar = self.bars.add(indicatif::ProgressBar::new(size));
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        let short = digest.get(..19).unwrap_or(digest);
        bar.set_prefix(format!("layer {}/{count} {short}", index + 1));
        while layers.len() < index {
            layers.push(indicatif::ProgressBar::hidden());
        }
        layers.push(bar);
    }

    fn layer_read(&self, index: usize, bytes: u64) {
        if let Some(b) = self.bar(index) {
            b.inc(bytes);
        }
    }

    fn layer_done(&self, index: usize) {
        if let Some(b) = self.bar(index) {
            b.finish();
        }
    }
}

fn run_check(a: CheckArgs) -> Result<()> {
    use converter::oci::check::{check, CheckOptions, CheckSource};
    let source = match (&a.source, &a.source_dir) {
        (_, Some(d)) => CheckSource::Dir(d.clone()),
        (Some(s), None) => CheckSource::Image(s.parse()?),
        (None, None) => anyhow::bail!("give --source or --source-dir"),
    };
    std::fs::create_dir_all(&a.work_dir)
        .with_context(|| format!("Creating work directory {}", a.work_dir.display()))?;
    let mut opts = CheckOptions {
        source,
        target: a.target.parse()?,
        source_registry: a.access.source(),
        target_registry: a.access.target(),
        platform: a.platform,
        work_dir: a.work_dir,
    };
    if a.all_platforms {
        let platforms = converter::oci::check::target_platforms(&opts)
            .with_context(|| format!("Checking {}", a.target))?;
        if let Some(platforms) = platforms {
            return check_platforms(&a.target, &mut opts, &platforms);
        }
    }
    match check(&opts) {
        Ok(report) => {
            println!(
                "OK: {} entries, {} files ({} bytes), {} chunks in {} blobs verified",
                report.entries, report.files, report.file_bytes, report.chunks, report.blobs
            );
            if let Some(path) = a.output_json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("Writing {}", path.display()))?;
            }
            Ok(())
        }
        Err(converter::oci::OciError::Differs(diffs)) => {
            for d in &diffs {
                println!("{d}");
            }
            anyhow::bail!(
                "{} differs from its source in {} place(s) (listed above)",
                a.target,
                diffs.len()
            )
        }
        Err(e) => Err(e).with_context(|| format!("Checking {}", a.target)),
    }
}

/// `nydusify check --all-platforms` on an index: each platform in turn, every
/// difference listed with its platform.
fn check_platforms(
    target: &str,
    opts: &mut converter::oci::check::CheckOptions,
    platforms: &[String],
) -> Result<()> {
    let mut differing = Vec::new();
    for p in platforms {
        opts.platform = p.clone();
        match converter::oci::check::check(opts) {
            Ok(r) => println!(
                "{p}: OK: {} entries, {} files ({} bytes), {} chunks in {} blobs verified",
                r.entries, r.files, r.file_bytes, r.chunks, r.blobs
            ),
            Err(converter::oci::OciError::Differs(diffs)) => {
                for d in &diffs {
                    println!("{p}: {d}");
                }
                differing.push(format!("{p} in {} place(s)", diffs.len()));
            }
            Err(e) => return Err(e).with_context(|| format!("Checking {target} ({p})")),
        }
    }
    anyhow::ensure!(
        differing.is_empty(),
        "{target} differs from its source: {} (listed above)",
        differing.join(", ")
    );
    Ok(())
}

fn run_build(a: BuildArgs) -> Result<()> {
    use converter::oci::build::{build, BuildOptions};
    let prefetch = if a.prefetch_patterns {
        converter::prefetch::read_patterns(std::io::stdin().lock())
            .context("Reading prefetch patterns from stdin")?
    } else {
        Vec::new()
    };
    std::fs::create_dir_all(&a.work_dir)
        .with_context(|| format!("Creating work directory {}", a.work_dir.display()))?;
    let opts = BuildOptions {
        source_dir: a.source_dir.clone(),
        target: a.target.as_deref().map(str::parse).transpose()?,
        output_dir: a.output_dir,
        target_registry: a.access.target(),
        platform: a.platform,
        compressor: a.compressor,
        chunk_size: a.chunk_size,
        prefetch,
        work_dir: a.work_dir,
        jobs: a.jobs,
    };
    let report = build(&opts).with_context(|| format!("Building {}", a.source_dir.display()))?;
    tracing::info!(
        "built {}: blob {} ({} bytes, {} chunks), bootstrap {} bytes, in {:.2}s",
        a.source_dir.display(),
        report.blob_digest.as_deref().unwrap_or("(none)"),
        report.blob_size,
        report.chunks,
        report.bootstrap_size,
        report.seconds
    );
    if let Some(path) = a.output_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("Writing {}", path.display()))?;
    }
    Ok(())
}

fn run_mount(a: MountArgs) -> Result<()> {
    use converter::oci::mount::{prepare, MountOptions};
    let opts = MountOptions {
        target: a.target.clone(),
        insecure: a.target_insecure,
        credentials: creds(&a.target_username, &a.target_password),
        platform: a.platform,
        work_dir: a.work_dir,
        prefetch: a.prefetch,
    };
    let prepared = prepare(&opts).with_context(|| format!("Preparing {}", a.target))?;
    std::fs::create_dir_all(&a.mount_path)
        .with_context(|| format!("Creating mount path {}", a.mount_path.display()))?;
    let nydusd = a.nydusd.unwrap_or_else(|| {
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("nydusd")));
        match sibling {
            Some(p) if p.exists() => p,
            _ => PathBuf::from("nydusd"),
        }
    });
    tracing::info!(
        "mounting {} at {} (blobs from {}/{}, cache in {})",
        a.target,
        a.mount_path.display(),
        prepared.host,
        prepared.repo,
        opts.work_dir.join("cache").display()
    );
    let mut daemon =
        nydusd::client::DaemonCommand::new(&nydusd, &a.mount_path, opts.work_dir.join("api.sock"));
    daemon.bootstrap = Some(prepared.bootstrap);
    daemon.config = Some(prepared.config);
    let status = daemon
        .command()
        .status()
        .with_context(|| format!("Starting {}", nydusd.display()))?;
    anyhow::ensure!(status.success(), "nydusd exited with {status}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.command {
        Command::Convert(a) => run_convert(a),
        Command::Check(a) => run_check(a),
        Command::Build(a) => run_build(a),
        Command::Mount(a) => run_mount(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
