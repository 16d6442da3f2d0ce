//! `nydus-image create`: build one RAFS v6 layer (a data blob and its bootstrap) from a
//! directory or a layer tar.
//!
//! Outputs are written to temporary files next to their final paths and renamed into
//! place only when everything succeeded, so a failed build leaves nothing behind.

use crate::error::{Error, Result};
use crate::prefetch;
use crate::source::dir::DirSource;
use crate::source::tar::{open_layer, read_tar};
use crate::whiteout::WhiteoutSpec;
use rafs::format::DEFAULT_CHUNK_SIZE;
use rafs::write::{
    write_bootstrap, write_chunks, BlobBody, BlobOptions, BootstrapOptions, ChunkArena, NodeId,
    NodeKind, Tree,
};
use rafs::{BlobInfo, Compressor, Digester};
use serde::Serialize;
use sha2::Digest as _;
use std::fmt;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};
use tempfile::NamedTempFile;

/// What the source of a build is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceType {
    /// A directory (`dir-rafs`, alias `directory`).
    Directory,
    /// A tar file, plain or compressed (`tar-rafs`).
    Tar,
    /// A gzip-compressed tar file (`targz-rafs`); plain and zstd tars are accepted too.
    TarGz,
}

/// Source types upstream `nydus-image` knows but this one does not build.
pub const UNSUPPORTED_SOURCE_TYPES: [&str; 7] = [
    "estargz-rafs",
    "estargz-ref",
    "estargztoc-ref",
    "stargz_index",
    "targz-ref",
    "tar-ref",
    "tar-tarfs",
];

impl FromStr for SourceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dir-rafs" | "directory" => Ok(SourceType::Directory),
            "tar-rafs" => Ok(SourceType::Tar),
            "targz-rafs" => Ok(SourceType::TarGz),
            _ if UNSUPPORTED_SOURCE_TYPES.contains(&s) => Err(format!(
                "source type '{s}' is not supported (supported: dir-rafs, tar-rafs, targz-rafs)"
            )),
            _ => Err(format!(
                "unknown source type '{s}' (supported: dir-rafs, tar-rafs, targz-rafs)"
            )),
        }
    }
}

impl fmt::Display for SourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceType::Directory => "dir-rafs",
            SourceType::Tar => "tar-rafs",
            SourceType::TarGz => "targz-rafs",
        })
    }
}

/// Everything a build needs to know. [`CreateOptions::new`] gives upstream's defaults.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// The directory or tar file to build from.
    pub source: PathBuf,
    /// What `source` is.
    pub source_type: SourceType,
    /// Where the bootstrap goes (`-B`). Without it (and without inline meta) the
    /// bootstrap is written into `blob_dir`, named by its sha256.
    pub bootstrap: Option<PathBuf>,
    /// Where the data blob goes (`-b`).
    pub blob: Option<PathBuf>,
    /// Directory for the data blob (named by its blob id) when `blob` is not given (`-D`).
    pub blob_dir: Option<PathBuf>,
    /// Append the bootstrap to the blob instead of writing a separate file.
    pub inline_meta: bool,
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk digester.
    pub digester: Digester,
    /// Chunk size: a power of two from 0x1000 to 0x1000000.
    pub chunk_size: u32,
    /// `--features blob-toc`: chunk digest array, tar headers and TOC in the blob.
    pub blob_toc: bool,
    /// How whiteout markers in the source are treated.
    pub whiteout: WhiteoutSpec,
    /// Prefetch patterns: absolute paths in the image.
    pub prefetch: Vec<String>,
    /// Record owners (uid/gid); `false` stores 0:0 for every file (`--repeatable`).
    pub explicit_uidgid: bool,
    /// Threads compressing chunks; 0 means one per CPU.
    pub threads: usize,
}

impl CreateOptions {
    /// Options with upstream's defaults for `source` (zstd, blake3, 1 MiB chunks, OCI
    /// whiteouts, owners recorded) and no outputs set.
    pub fn new(source: impl Into<PathBuf>, source_type: SourceType) -> Self {
        CreateOptions {
            source: source.into(),
            source_type,
            bootstrap: None,
            blob: None,
            blob_dir: None,
            inline_meta: false,
            compressor: Compressor::Zstd,
            digester: Digester::Blake3,
            chunk_size: DEFAULT_CHUNK_SIZE,
            blob_toc: false,
            whiteout: WhiteoutSpec::Oci,
            prefetch: Vec::new(),
            explicit_uidgid: true,
            threads: 0,
        }
    }

    /// Checks that the options make sense together.
    pub fn validate(&self) -> Result<()> {
        if self.inline_meta && self.bootstrap.is_some() {
            return Err(Error::options(
                "--bootstrap conflicts with --blob-inline-meta: with inline meta the bootstrap \
                 is stored inside the blob",
            ));
        }
        if self.blob.is_none() && self.blob_dir.is_none() {
            return Err(Error::options(
                "both --blob and --blob-dir are missing: give one to store the data blob",
            ));
        }
        if !self.inline_meta && self.bootstrap.is_none() && self.blob_dir.is_none() {
            return Err(missing_bootstrap());
        }
        for (flag, out) in [("--bootstrap", &self.bootstrap), ("--blob", &self.blob)] {
            if let Some(out) = out {
                let dir = parent_dir(out);
                if !dir.is_dir() {
                    return Err(Error::options(format!(
                        "directory {} of {flag} {} does not exist",
                        dir.display(),
                        out.display()
                    )));
                }
            }
        }
        if let Some(dir) = &self.blob_dir {
            if !dir.is_dir() {
                return Err(Error::options(format!(
                    "blob directory {} does not exist",
                    dir.display()
                )));
            }
        }
        if self.compressor == Compressor::Gzip {
            return Err(Error::options(
                "gzip chunks are not supported: use none, lz4_block or zstd",
            ));
        }
        self.blob_options().validate()?;
        let source = fs::metadata(&self.source).map_err(|e| Error::source(&self.source, e))?;
        for out in [&self.bootstrap, &self.blob].into_iter().flatten() {
            if let Ok(m) = fs::metadata(out) {
                if m.dev() == source.dev() && m.ino() == source.ino() {
                    return Err(Error::options(format!(
                        "output {} is the source itself",
                        out.display()
                    )));
                }
                if m.is_dir() {
                    return Err(Error::options(format!(
                        "output {} is a directory (use --blob-dir for a directory)",
                        out.display()
                    )));
                }
            }
        }
        if let (Some(b), Some(bl)) = (&self.bootstrap, &self.blob) {
            if b == bl {
                return Err(Error::options("--bootstrap and --blob name the same file"));
            }
        }
        prefetch::normalize(&self.prefetch)?;
        Ok(())
    }

    fn blob_options(&self) -> BlobOptions {
        let defaults = BlobOptions::default();
        BlobOptions {
            chunk_size: self.chunk_size,
            compressor: self.compressor,
            digester: self.digester,
            blob_index: 0,
            toc: self.blob_toc,
            inline_meta: self.inline_meta,
            threads: if self.threads == 0 {
                defaults.threads
            } else {
                self.threads
            },
        }
    }
}

fn missing_bootstrap() -> Error {
    Error::options(
        "both --bootstrap and --blob-dir are missing: give one to store the bootstrap, \
         or use --blob-inline-meta",
    )
}

/// The data blob a build wrote.
#[derive(Clone, Debug)]
pub struct BlobOutput {
    /// Where it was written.
    pub path: PathBuf,
    /// Its blob table entry (id, sizes, chunk count, ...).
    pub info: BlobInfo,
}

/// Counts and timings of a build.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BuildStats {
    /// Inodes in the image (hard links counted once).
    pub inodes: u64,
    /// Regular files (hard links counted once).
    pub regular_files: u64,
    /// Bytes of regular file data.
    pub file_bytes: u64,
    /// Size of the bootstrap.
    pub bootstrap_size: u64,
    /// Time spent reading the source and writing chunks.
    #[serde(serialize_with = "secs")]
    pub load_source: Duration,
    /// Time spent writing the blob metadata and bootstrap.
    #[serde(serialize_with = "secs")]
    pub dump_meta: Duration,
    /// Total build time.
    #[serde(serialize_with = "secs")]
    pub total_build: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What a build produced.
#[derive(Clone, Debug)]
pub struct CreateOutput {
    /// The bootstrap file, unless it is inline in the blob.
    pub bootstrap: Option<PathBuf>,
    /// The data blob, unless the source had no file data (and meta is not inline).
    pub blob: Option<BlobOutput>,
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk digester.
    pub digester: Digester,
    /// Chunk size.
    pub chunk_size: u32,
    /// Counts and timings.
    pub stats: BuildStats,
}

#[derive(Serialize)]
struct JsonBlob<'a> {
    id: &'a str,
    path: String,
    compressed_size: u64,
    uncompressed_size: u64,
    chunk_count: u32,
    features: u32,
    toc_size: u32,
    toc_digest: String,
}

#[derive(Serialize)]
struct Json<'a> {
    version: &'a str,
    bootstrap: String,
    blobs: Vec<&'a str>,
    fs_version: &'a str,
    compressor: String,
    digester: String,
    chunk_size: String,
    blob_details: Vec<JsonBlob<'a>>,
    stats: &'a BuildStats,
    trace: serde_json::Value,
}

impl CreateOutput {
    /// The `--output-json` document: upstream's `{version, bootstrap, blobs, fs_version,
    /// compressor, trace}` plus blob details and counts.
    pub fn to_json(&self) -> serde_json::Value {
        let blobs: Vec<_> = self.blob.iter().collect();
        let doc = Json {
            version: env!("CARGO_PKG_VERSION"),
            bootstrap: self
                .bootstrap
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            blobs: blobs.iter().map(|b| b.info.id.as_str()).collect(),
            fs_version: "6",
            compressor: self.compressor.to_string(),
            digester: self.digester.to_string(),
            chunk_size: format!("{:#x}", self.chunk_size),
            blob_details: blobs
                .iter()
                .map(|b| JsonBlob {
                    id: &b.info.id,
                    path: b.path.display().to_string(),
                    compressed_size: b.info.compressed_size,
                    uncompressed_size: b.info.uncompressed_size,
                    chunk_count: b.info.chunk_count,
                    features: b.info.features,
                    toc_size: b.info.toc_size,
                    toc_digest: hex::encode(b.info.toc_digest),
                })
                .collect(),
            stats: &self.stats,
            trace: serde_json::json!({
                "load_source": self.stats.load_source.as_secs_f64(),
                "dump_meta": self.stats.dump_meta.as_secs_f64(),
                "total_build": self.stats.total_build.as_secs_f64(),
            }),
        };
        serde_json::to_value(doc).unwrap_or_default()
    }

    /// Writes [`CreateOutput::to_json`] to `path`.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_vec_pretty(&self.to_json())
            .map_err(|e| Error::output(path, e.into()))?;
        text.push(b'\n');
        fs::write(path, text).map_err(|e| Error::output(path, e))
    }
}

/// The directory an output file is created in (for its temporary file).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn temp_in(dir: &Path) -> Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".nydus-image-")
        .suffix(".tmp")
        // Like a plain `File::create`: 0666 less the umask (tempfile defaults to 0600).
        .permissions(fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|source| Error::TempFile {
            dir: dir.to_path_buf(),
            source,
        })
}

fn persist(tmp: NamedTempFile, path: &Path) -> Result<()> {
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::output(path, e))?;
    tmp.persist(path)
        .map_err(|e| Error::output(path, e.error))?;
    Ok(())
}

type BlobWriter = BufWriter<File>;

/// The temporary blob file and a buffered writer into it.
fn blob_temp(dir: &Path) -> Result<(NamedTempFile, BlobWriter)> {
    let tmp = temp_in(dir)?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| Error::output(tmp.path(), e))?;
    Ok((tmp, BufWriter::with_capacity(1 << 20, file)))
}

/// Reads the source into a tree while writing chunks into a temporary file in `blob_dir`.
fn load_source(
    opts: &CreateOptions,
    prefetch_patterns: &[String],
    blob_dir: &Path,
    arena: &mut ChunkArena,
) -> Result<(Tree, Vec<NodeId>, NamedTempFile, BlobBody<BlobWriter>)> {
    let blob_opts = opts.blob_options();
    match opts.source_type {
        SourceType::Directory => {
            // Scan before creating the temporary file: the output directory may lie
            // inside the source.
            let mut src = DirSource::scan(&opts.source, opts.whiteout)?;
            let (tmp, out) = blob_temp(blob_dir)?;
            let prefetch = prefetch::resolve(src.tree(), prefetch_patterns);
            let order = src.data_order(&prefetch);
            let (fed, body) = write_chunks(out, &blob_opts, arena, |sink| {
                Ok(src.write_data(sink, &order))
            })?;
            fed?;
            Ok((src.into_tree(), prefetch, tmp, body))
        }
        SourceType::Tar | SourceType::TarGz => {
            let (stream, compression) = open_layer(&opts.source)?;
            tracing::debug!("{}: {compression:?} layer", opts.source.display());
            let (tmp, out) = blob_temp(blob_dir)?;
            let (tree, body) = write_chunks(out, &blob_opts, arena, |sink| {
                Ok(read_tar(stream, opts.whiteout, sink))
            })?;
            let tree = tree?;
            let prefetch = prefetch::resolve(&tree, prefetch_patterns);
            Ok((tree, prefetch, tmp, body))
        }
    }
}

fn stats_of(tree: &Tree) -> BuildStats {
    let mut stats = BuildStats::default();
    let mut seen = vec![false; tree.arena_len()];
    let mut stack = vec![tree.root()];
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut seen[id], true) {
            continue;
        }
        stats.inodes += 1;
        match &tree.node(id).kind {
            NodeKind::Regular(f) => {
                stats.regular_files += 1;
                stats.file_bytes += f.size;
            }
            NodeKind::Directory(_) => stack.extend(tree.children(id).map(|(_, c)| c)),
            _ => {}
        }
    }
    stats
}

/// Builds one RAFS v6 layer from `opts.source`.
///
/// The blob is written to a temporary file in its output directory. If the source has no
/// file data and meta is not inline, no blob is produced and the bootstrap's blob table is
/// empty. Otherwise the blob gets its metadata sections and is renamed to `opts.blob` or
/// `<blob_dir>/<blob id>`; the bootstrap is written to `opts.bootstrap` (or into
/// `blob_dir`, named by its sha256), or appended to the blob with `inline_meta`.
/// On error no output file is left behind.
pub fn create(opts: &CreateOptions) -> Result<CreateOutput> {
    let started = Instant::now();
    opts.validate()?;
    let prefetch_patterns = prefetch::normalize(&opts.prefetch)?;
    let blob_dir: &Path = match (&opts.blob, &opts.blob_dir) {
        (Some(b), _) => parent_dir(b),
        (None, Some(d)) => d,
        (None, None) => unreachable!("validate requires --blob or --blob-dir"),
    };
    let mut arena = ChunkArena::default();
    let (tree, prefetch, blob_tmp, body) =
        load_source(opts, &prefetch_patterns, blob_dir, &mut arena)?;
    let load_source = started.elapsed();

    let boot_opts = BootstrapOptions {
        chunk_size: opts.chunk_size,
        compressor: opts.compressor,
        digester: opts.digester,
        explicit_uidgid: opts.explicit_uidgid,
        prefetch,
    };
    let (bootstrap, blob_info) = if body.chunk_count() == 0 && !opts.inline_meta {
        (write_bootstrap(&tree, &arena, &[], &boot_opts)?, None)
    } else {
        let with_meta = body.write_meta()?;
        if opts.inline_meta {
            // As upstream: a blob without chunks is not in its own bootstrap's blob table.
            let provisional = with_meta.provisional_info();
            let table: &[BlobInfo] = if provisional.chunk_count == 0 {
                &[]
            } else {
                std::slice::from_ref(&provisional)
            };
            let boot = write_bootstrap(&tree, &arena, table, &boot_opts)?;
            let (info, _) = with_meta.finish(Some(&boot))?;
            (boot, Some(info))
        } else {
            let (info, _) = with_meta.finish(None)?;
            let boot = write_bootstrap(&tree, &arena, std::slice::from_ref(&info), &boot_opts)?;
            (boot, Some(info))
        }
    };

    // Everything is computed: write the bootstrap next to its final path, then rename
    // both files into place.
    let bootstrap_path = if opts.inline_meta {
        None
    } else {
        Some(match (&opts.bootstrap, &opts.blob_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => d.join(hex::encode(sha2::Sha256::digest(&bootstrap))),
            (None, None) => return Err(missing_bootstrap()),
        })
    };
    let boot_tmp = match &bootstrap_path {
        Some(path) => {
            let mut tmp = temp_in(parent_dir(path))?;
            tmp.write_all(&bootstrap)
                .map_err(|e| Error::output(path, e))?;
            Some(tmp)
        }
        None => None,
    };
    let blob = match blob_info {
        Some(info) => {
            let path = match &opts.blob {
                Some(p) => p.clone(),
                None => blob_dir.join(&info.id),
            };
            persist(blob_tmp, &path)?;
            Some(BlobOutput { path, info })
        }
        None => None,
    };
    if let (Some(tmp), Some(path)) = (boot_tmp, &bootstrap_path) {
        if let Err(e) = persist(tmp, path) {
            if let Some(b) = &blob {
                let _ = fs::remove_file(&b.path);
            }
            return Err(e);
        }
    }

    let mut stats = stats_of(&tree);
    stats.bootstrap_size = bootstrap.len() as u64;
    stats.load_source = load_source;
    stats.total_build = started.elapsed();
    stats.dump_meta = stats.total_build - load_source;
    Ok(CreateOutput {
        bootstrap: bootstrap_path,
        blob,
        compressor: opts.compressor,
        digester: opts.digester,
        chunk_size: opts.chunk_size,
        stats,
    })
}
