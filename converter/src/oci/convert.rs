//! `nydusify convert`: an OCI image into a nydus image.
//!
//! Per image manifest: every layer is streamed (tar, tar+gzip or tar+zstd, its digest
//! checked as it is read) into one data blob with its own inline bootstrap and TOC
//! (`create --blob-inline-meta --features blob-toc --whiteout-spec none`), several layers
//! at a time; the layer bootstraps are merged with OCI whiteout rules ([`crate::merge`])
//! using the blobs' sha256 as blob ids; the result is packaged as upstream does (§6):
//! one `nydus.blob.v1` layer per referenced blob, then a `tar+gzip` bootstrap layer with
//! `image/image.boot`, a config with new diff ids (history kept) and a manifest.
//!
//! Each blob is uploaded while the next layers convert, once its source layer is verified;
//! the bootstrap layer, config and manifests follow when every image is converted, and
//! the tag is set last. The output depends only on the input and options.

use super::store::{open_source, open_target, verify, BlobProgressRx, ImageRef, Source, Target};
use super::*;
use crate::merge::{merge_layers, open_layer_as};
use crate::source::tar::{read_tar, LayerCompression};
use crate::whiteout::WhiteoutSpec;
use p2p_backend::registry::BlobProgress;
use p2p_backend::registry::RegistryOptions;
use rafs::write::{write_bootstrap, write_chunks, BlobOptions, BootstrapOptions, ChunkArena};
use rafs::{BlobInfo, Compressor, Digester};
use std::io::{self, BufRead, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::sync::watch;

/// What to convert and how.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The OCI image.
    pub source: ImageRef,
    /// Where the nydus image goes.
    pub target: ImageRef,
    /// How to reach the source registry.
    pub source_registry: RegistryOptions,
    /// How to reach the target registry.
    pub target_registry: RegistryOptions,
    /// `os/arch[/variant]` chosen from an index.
    pub platform: String,
    /// Convert every platform of an index.
    pub all_platforms: bool,
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk size.
    pub chunk_size: u32,
    /// Prefetch patterns for the merged bootstrap.
    pub prefetch: Vec<String>,
    /// Directory for temporary blobs (a fresh temporary directory inside it is used).
    pub work_dir: PathBuf,
    /// Threads compressing chunks (0: number of CPUs). Layers are converted one after
    /// the other (see `build_layers`).
    pub jobs: usize,
    /// A bootstrap whose chunks the new image may reference instead of storing them
    /// again (`--chunk-dict bootstrap=PATH`); its blobs must be in the target already.
    pub chunk_dict: Option<PathBuf>,
    /// Told how far each layer's conversion is (a progress bar on a terminal).
    pub progress: Option<std::sync::Arc<dyn Progress>>,
}

/// Hooks called while layers are converted, lowest first (see
/// [`ConvertOptions::progress`]). `index` counts from 0 within one image.
pub trait Progress: Send + Sync + std::fmt::Debug {
    /// Layer `index` of `count`, `digest`, of `size` source bytes, starts.
    fn layer_started(&self, index: usize, count: usize, digest: &str, size: u64);
    /// `bytes` more source bytes of layer `index` were read.
    fn layer_read(&self, index: usize, bytes: u64);
    /// Layer `index` is converted (also called when it failed).
    fn layer_done(&self, index: usize);
}

/// Reports what passes through to a [`Progress`].
struct Counted<'a, R> {
    inner: R,
    progress: Option<&'a dyn Progress>,
    index: usize,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = self.progress {
            p.layer_read(self.index, n as u64);
        }
        Ok(n)
    }
}

impl ConvertOptions {
    /// Upstream's defaults (linux/amd64, zstd, 1 MiB chunks) for `source` → `target`.
    pub fn new(source: ImageRef, target: ImageRef) -> Self {
        ConvertOptions {
            source,
            target,
            source_registry: RegistryOptions::default(),
            target_registry: RegistryOptions::default(),
            platform: "linux/amd64".into(),
            all_platforms: false,
            compressor: Compressor::Zstd,
            chunk_size: rafs::format::DEFAULT_CHUNK_SIZE,
            prefetch: Vec::new(),
            work_dir: std::env::temp_dir(),
            jobs: 0,
            chunk_dict: None,
            progress: None,
        }
    }
}

/// One converted layer in the report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// Digest of the source layer.
    pub source_digest: String,
    /// Size of the source layer.
    pub source_size: u64,
    /// Digest of the nydus blob built from it.
    pub blob_digest: String,
    /// Size of that blob.
    pub blob_size: u64,
    /// Chunks in the blob.
    pub chunks: u32,
    /// Chunks of the layer's files (before deduplication).
    pub file_chunks: u32,
    /// Chunks not written because an identical one was already stored: earlier in this
    /// layer, in a lower layer or in the chunk dictionary.
    pub dedup_chunks: u32,
    /// Of those, chunks found in lower layers' blobs or the chunk dictionary.
    pub dedup_chunks_other_blobs: u32,
    /// Uncompressed bytes of the deduplicated chunks.
    pub dedup_bytes: u64,
    /// Whether the merged bootstrap references the blob (else it is left out).
    pub referenced: bool,
}

/// One converted image (platform).
#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    /// Platform, when the source was an index.
    pub platform: Option<String>,
    /// Digest of the nydus manifest.
    pub manifest_digest: String,
    /// Digest of the bootstrap layer.
    pub bootstrap_digest: String,
    /// Size of the merged bootstrap.
    pub bootstrap_size: u64,
    /// The layers.
    pub layers: Vec<LayerReport>,
    /// Blobs of the chunk dictionary the image references (`sha256:` digests).
    pub reference_blobs: Vec<String>,
}

/// What `convert` did (`--output-json`).
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    /// The source.
    pub source: String,
    /// The target.
    pub target: String,
    /// Digest of the top-level manifest or index written.
    pub digest: String,
    /// Media type of it.
    pub media_type: String,
    /// Per image.
    pub images: Vec<ImageReport>,
    /// Bytes of source layers read.
    pub source_bytes: u64,
    /// Bytes of nydus layers produced.
    pub target_bytes: u64,
    /// Chunks deduplicated over all layers (see [`LayerReport::dedup_chunks`]).
    pub dedup_chunks: u64,
    /// Uncompressed bytes those chunks hold.
    pub dedup_bytes: u64,
    /// Wall time until every image is converted, seconds (blobs are uploaded meanwhile).
    pub convert_seconds: f64,
    /// Wall time after that until the tag is set (the rest of the upload), seconds.
    pub push_seconds: f64,
}

/// A blob built from one layer, waiting in the work directory.
struct BuiltLayer {
    path: PathBuf,
    /// Tells the blob's uploader how far it is written; taken by `build_layers`, which
    /// declares the blob complete (or drops it unsent: no blob is wanted).
    progress: Option<watch::Sender<BlobProgress>>,
    digest: String,
    size: u64,
    chunks: u32,
    file_chunks: u32,
    dedup_chunks: u32,
    dedup_chunks_other_blobs: u32,
    dedup_bytes: u64,
}

/// Chunks the next layer deduplicates against: those of the chunk dictionary and of
/// every lower layer, with the blob table they index (final ids, lowest first).
#[derive(Clone, Default)]
struct Known {
    arena: ChunkArena,
    table: Vec<BlobInfo>,
}

impl Known {
    /// The chunks and blobs of a chunk-dictionary bootstrap.
    fn from_dict(path: &Path, opts: &ConvertOptions) -> Result<Known> {
        let what = format!("chunk dict {}", path.display());
        let bs = rafs::read::Bootstrap::open(path)?;
        let sb = bs.superblock();
        if sb.chunk_size != opts.chunk_size || sb.digester != Digester::Blake3 {
            return Err(OciError::invalid(
                what,
                format!(
                    "its chunks ({:#x}, {}) cannot be shared with this conversion ({:#x}, blake3)",
                    sb.chunk_size, sb.digester, opts.chunk_size
                ),
            ));
        }
        let mut known = Known::default();
        for b in bs.blobs() {
            if !crate::merge::is_blob_id(&b.id) {
                return Err(OciError::invalid(
                    what,
                    format!("blob id '{}' is not a digest", b.id),
                ));
            }
            let mut b = b.clone();
            b.features &= !rafs::format::blob_features::INLINED_FS_META;
            b.mapped_blkaddr = 0;
            known.table.push(b);
        }
        for i in 0..bs.chunk_table_len() {
            known.arena.push(bs.chunk_record(i)?);
        }
        Ok(known)
    }
}

/// Decompressed blocks of a layer queued ahead of the tar reader (256 KiB each).
const INFLATED_QUEUE: usize = 16;
const INFLATED_BLOCK: usize = 256 * 1024;

/// Reads a layer to its end, sending its decompressed bytes in blocks to `tx` (an error
/// is sent on as the last item); returns the reader, which hashed every byte, for the
/// digest check. Stops early, without error, when the receiver is gone.
fn inflate_layer<R: Read>(
    raw: Hashing<R>,
    tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
    spent: std::sync::mpsc::Receiver<Vec<u8>>,
) -> io::Result<Hashing<R>> {
    let mut buffered = BufReader::with_capacity(INFLATED_BLOCK, raw);
    let head = buffered.fill_buf()?;
    let decoded = {
        let mut stream: Box<dyn Read + '_> = match LayerCompression::detect(head) {
            LayerCompression::None => Box::new(&mut buffered),
            LayerCompression::Gzip => {
                // The bufread decoder reads from `buffered` in place (the read one
                // would copy it into a buffer of its own first).
                Box::new(flate2::bufread::MultiGzDecoder::new(&mut buffered))
            }
            LayerCompression::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(&mut buffered)?)
            }
        };
        loop {
            // A block the reader is done with, when there is one: not zeroed again.
            let mut block = spent.try_recv().unwrap_or_default();
            block.resize(INFLATED_BLOCK, 0);
            let mut n = 0;
            let r = loop {
                match stream.read(&mut block[n..]) {
                    Ok(0) => break Ok(()),
                    Ok(k) => {
                        n += k;
                        if n == block.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            block.truncate(n);
            match r {
                Ok(()) if n == 0 => break Ok(()),
                Ok(()) => {
                    if tx.send(Ok(block)).is_err() {
                        break Ok(());
                    }
                }
                Err(e) => {
                    let kind = e.kind();
                    let msg = e.to_string();
                    let _ = tx.send(Err(e));
                    break Err(io::Error::new(kind, msg));
                }
            }
        }
    };
    decoded?;
    // Whatever follows the compressed stream is part of the blob's digest too.
    io::copy(&mut buffered, &mut io::sink())?;
    Ok(buffered.into_inner())
}

/// The reading end of [`inflate_layer`]'s queue.
struct Inflated {
    rx: Option<std::sync::mpsc::Receiver<io::Result<Vec<u8>>>>,
    /// Read blocks go back to the inflater.
    spent: std::sync::mpsc::SyncSender<Vec<u8>>,
    block: Vec<u8>,
    at: usize,
}

impl Read for Inflated {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.block.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(block) => {
                    let done = std::mem::replace(&mut self.block, block?);
                    if done.capacity() > 0 {
                        let _ = self.spent.try_send(done);
                    }
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The blob file, telling its uploader how many bytes it holds after each write.
struct Reporting {
    file: std::fs::File,
    written: u64,
    progress: watch::Sender<BlobProgress>,
}

impl io::Write for Reporting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        self.progress
            .send_replace(BlobProgress::Writing(self.written));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Streams one layer into an inline-meta blob in `dir`; the blob is handed to
/// `upload` as soon as its file exists, to be sent while it is written.
fn build_layer(
    source: &dyn Source,
    (index, desc): (usize, &Descriptor),
    opts: &ConvertOptions,
    threads: usize,
    dir: &Path,
    known: &mut Known,
    upload: &Uploads,
) -> Result<BuiltLayer> {
    let layer_err = |source: crate::Error| OciError::Layer {
        layer: desc.digest.clone(),
        source: Box::new(source),
    };
    let raw = Hashing::new(Counted {
        inner: source.open_blob(desc)?,
        progress: opts.progress.as_deref(),
        index,
    });
    let tmp = tempfile::Builder::new()
        .prefix("layer-")
        .tempfile_in(dir)
        .map_err(|e| OciError::io(format!("Creating a temporary blob in {}", dir.display()), e))?;
    let file = tmp
        .reopen()
        .map_err(|e| OciError::io("Opening the temporary blob", e))?;
    let (progress, watcher) = watch::channel(BlobProgress::Writing(0));
    upload.begin(
        tmp.path(),
        format!("the blob of layer {}", desc.digest),
        watcher,
    )?;
    let file = Reporting {
        file,
        written: 0,
        progress,
    };
    let blob_opts = BlobOptions {
        chunk_size: opts.chunk_size,
        compressor: opts.compressor,
        digester: Digester::Blake3,
        blob_index: known.table.len() as u32,
        toc: true,
        inline_meta: true,
        threads,
    };
    let mut arena = known.arena.clone();
    let base = arena.len();
    // Downloading, hashing and decompressing the layer run on a thread of their own,
    // feeding the tar reader (which hands chunks to the compressing workers) through a
    // bounded queue: each stage works while the others do.
    let (blocks_tx, blocks_rx) = std::sync::mpsc::sync_channel(INFLATED_QUEUE);
    let (spent_tx, spent_rx) = std::sync::mpsc::sync_channel(INFLATED_QUEUE);
    let (written, raw) = std::thread::scope(|s| {
        let inflater = s.spawn(move || inflate_layer(raw, blocks_tx, spent_rx));
        let mut stream = Inflated {
            rx: Some(blocks_rx),
            spent: spent_tx,
            block: Vec::new(),
            at: 0,
        };
        let written = write_chunks(
            BufWriter::with_capacity(1 << 20, file),
            &blob_opts,
            &mut arena,
            |sink| {
                let tree = read_tar(&mut stream, WhiteoutSpec::None, sink);
                if tree.is_ok() {
                    // The rest of the stream (tar padding, compression trailer) is
                    // checked too.
                    io::copy(&mut stream, &mut io::sink())
                        .map_err(|e| rafs::Error::io("Reading layer", e))?;
                }
                Ok(tree)
            },
        );
        // Unblocks the inflater if the tar reader stopped early.
        stream.rx = None;
        let raw = inflater
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the layer decompression thread panicked")));
        (written, raw)
    });
    let (tree, body) = written.map_err(|e| layer_err(e.into()))?;
    let tree = tree.map_err(layer_err)?;
    let raw = raw.map_err(|e| OciError::io(format!("Reading layer {}", desc.digest), e))?;
    raw.verify("layer", desc)?;
    let boot_opts = BootstrapOptions {
        chunk_size: opts.chunk_size,
        compressor: opts.compressor,
        digester: Digester::Blake3,
        explicit_uidgid: true,
        prefetch: Vec::new(),
    };
    let with_meta = body.write_meta().map_err(|e| layer_err(e.into()))?;
    let provisional = with_meta.provisional_info();
    let mut table = known.table.clone();
    if provisional.chunk_count > 0 {
        table.push(provisional);
    }
    let boot =
        write_bootstrap(&tree, &arena, &table, &boot_opts).map_err(|e| layer_err(e.into()))?;
    // The blob's digest was taken as it was written.
    let finished = with_meta
        .finish_file(Some(&boot))
        .map_err(|e| layer_err(e.into()))?;
    let (mut info, size) = (finished.info, finished.size);
    let digest = format!("sha256:{}", hex::encode(finished.sha256));
    let progress = finished
        .out
        .into_inner()
        .map_err(|e| OciError::io("Writing the temporary blob", e.into_error()))?
        .progress;
    let path = tmp
        .into_temp_path()
        .keep()
        .map_err(|e| OciError::io("Keeping the temporary blob", e.error))?;

    // What deduplication saved, and what the next layers may reuse.
    let own = blob_opts.blob_index;
    let mut stored = std::collections::HashSet::new();
    let (mut dedup_chunks, mut other, mut dedup_bytes) = (0u32, 0u32, 0u64);
    for c in arena.iter().skip(base) {
        if c.blob_index != own || !stored.insert(c.ci_index) {
            dedup_chunks += 1;
            dedup_bytes += c.uncompressed_size as u64;
            other += u32::from(c.blob_index != own);
        }
    }
    let file_chunks = (arena.len() - base) as u32;
    if info.chunk_count > 0 {
        info.id = digest_hex(&digest)?.to_string();
        info.compressed_size = size;
        info.features &= !rafs::format::blob_features::INLINED_FS_META;
        info.mapped_blkaddr = 0;
        known.table.push(info.clone());
    }
    known.arena = arena;
    Ok(BuiltLayer {
        path,
        progress: Some(progress),
        digest,
        size,
        chunks: info.chunk_count,
        file_chunks,
        dedup_chunks,
        dedup_chunks_other_blobs: other,
        dedup_bytes,
    })
}

/// Converts the layers of one manifest, lowest first.
///
/// Deduplication decides the order of work. A chunk already stored by a lower layer (or
/// the chunk dictionary) is referenced, never written again, so layer N can only be
/// built once layers 0..N-1 are known: layers are converted one after the other, and
/// each uses every CPU where the work is (digesting and compressing chunks, in
/// parallel inside `write_chunks`, whose output order is the input order). Building
/// layers concurrently and deduplicating in a second pass would either make the
/// result depend on which layer finished first or write (and hash) every duplicated
/// chunk twice; this order is deterministic (same input, same digests) and does the
/// work once.
///
/// Each blob is handed to `upload` as soon as its layer is built and verified, so that
/// it is uploaded while the next layers are converted.
fn build_layers(
    source: &dyn Source,
    layers: &[Descriptor],
    opts: &ConvertOptions,
    dir: &Path,
    upload: &Uploads,
) -> Result<(Vec<BuiltLayer>, Known)> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = if opts.jobs == 0 { cpus } else { opts.jobs }.max(1);
    let mut known = match &opts.chunk_dict {
        Some(p) => Known::from_dict(p, opts)?,
        None => Known::default(),
    };
    let dict_blobs = known.table.len();
    let mut out = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let started = Instant::now();
        if let Some(p) = &opts.progress {
            p.layer_started(i, layers.len(), &layer.digest, layer.size);
        }
        let b = build_layer(source, (i, layer), opts, threads, dir, &mut known, upload);
        if let Some(p) = &opts.progress {
            p.layer_done(i);
        }
        let mut b = b?;
        tracing::info!(
            "layer {}/{} {} -> blob {} ({} bytes, {} chunks, {} deduplicated) in {:.2}s",
            i + 1,
            layers.len(),
            layer.digest,
            b.digest,
            b.size,
            b.chunks,
            b.dedup_chunks,
            started.elapsed().as_secs_f64()
        );
        if let Some(p) = b.progress.take() {
            if b.chunks > 0 {
                // Built and its source verified: the upload may be committed.
                p.send_replace(BlobProgress::Complete {
                    digest: b.digest.clone(),
                    size: b.size,
                });
            }
        }
        out.push(b);
    }
    known.table.truncate(dict_blobs);
    Ok((out, known))
}

/// Threads uploading blobs: a large blob need not hold up the next one (each upload is
/// a series of request round trips, which leave the wire idle in between).
const UPLOADERS: usize = 2;

/// A blob to upload: its file, its name for messages, its writer's progress.
type Upload = (PathBuf, String, BlobProgressRx);

type UploadQueue = std::sync::Mutex<std::sync::mpsc::Receiver<Upload>>;

/// The queue of blobs to upload while conversion goes on; see [`convert`].
struct Uploads<'a> {
    tx: std::sync::mpsc::Sender<Upload>,
    /// Set when an upload failed or the conversion did.
    stop: &'a std::sync::atomic::AtomicBool,
}

impl Uploads<'_> {
    /// Queues the blob about to be written to `path`; `progress` tells its uploader how
    /// far the file is written, and whether the blob is complete (built, and its
    /// source layer verified) or abandoned.
    fn begin(&self, path: &Path, name: String, progress: BlobProgressRx) -> Result<()> {
        // An upload failed; `convert` reports its error instead.
        let stopped =
            OciError::invalid(format!("{name} ({})", path.display()), "the upload stopped");
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(stopped);
        }
        self.tx
            .send((path.to_path_buf(), name, progress))
            .map_err(|_| stopped)
    }
}

/// Uploads queued blobs until the queue closes or `stop` is set (which a failed upload
/// sets); returns the seconds spent uploading.
fn upload_blobs(
    target: &dyn Target,
    queue: &UploadQueue,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<f64> {
    use std::sync::atomic::Ordering;
    let mut busy = 0.0;
    loop {
        let next = queue
            .lock()
            .map_err(|_| OciError::invalid("upload queue", "an upload thread panicked"))?;
        let Ok((path, name, progress)) = next.recv() else {
            break;
        };
        drop(next);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let t = Instant::now();
        if let Err(e) = target.put_growing_blob(&path, &name, progress) {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
        busy += t.elapsed().as_secs_f64();
    }
    Ok(busy)
}

/// A converted image, ready to be written.
struct Converted {
    platform: Option<Platform>,
    manifest: Vec<u8>,
    manifest_desc: Descriptor,
    config: (Descriptor, Vec<u8>),
    /// Blob layers; those without a file are referenced chunk-dictionary blobs.
    blobs: Vec<(Descriptor, Option<PathBuf>)>,
    bootstrap_layer: (Descriptor, Vec<u8>),
    report: ImageReport,
}

/// The bootstrap layer: a deterministic tar.gz holding `image/image.boot`; returns the
/// compressed bytes and the diff id.
pub fn bootstrap_layer(bootstrap: &[u8]) -> Result<(Vec<u8>, String)> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_mtime(0);
    let io = |e| OciError::io("Packing the bootstrap layer", e);
    b.append_data(&mut h, "image", &[][..]).map_err(io)?;
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(bootstrap.len() as u64);
    h.set_mtime(0);
    b.append_data(&mut h, BOOTSTRAP_PATH, bootstrap)
        .map_err(io)?;
    let tar = b.into_inner().map_err(io)?;
    let diff_id = digest_of(&tar);
    // The fastest level: the bootstrap is written at the end of a conversion, on its
    // critical path, and is small next to the blobs either way.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut gz, &tar).map_err(io)?;
    Ok((gz.finish().map_err(io)?, diff_id))
}

pub(crate) fn descriptor(media_type: &str, digest: String, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest,
        size,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    }
}

fn convert_image(
    source: &dyn Source,
    manifest: &Manifest,
    platform: Option<Platform>,
    opts: &ConvertOptions,
    dir: &Path,
    upload: &Uploads,
) -> Result<Converted> {
    if manifest.layers.is_empty() {
        return Err(OciError::invalid(
            format!("source image (config {})", manifest.config.digest),
            "it has no layers: there is no filesystem to convert",
        ));
    }
    for l in &manifest.layers {
        if LayerMedia::of(&l.media_type).is_none() {
            return Err(OciError::MediaType {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
            });
        }
    }
    let config_bytes = source.read_blob(&manifest.config, "config")?;
    let mut config: Value =
        serde_json::from_slice(&config_bytes).map_err(|source| OciError::Document {
            what: format!("config {}", manifest.config.digest),
            source,
        })?;
    let (built, dict) = build_layers(source, &manifest.layers, opts, dir, upload)?;
    let mut merge_inputs = Vec::with_capacity(built.len());
    for (i, (b, source_layer)) in built.iter().zip(&manifest.layers).enumerate() {
        // The blob's id is its digest, taken as it was written (not hashed again); its
        // size is the file's. A layer whose chunks were all deduplicated has no blob of
        // its own: every blob in its table is a lower one, already named.
        let mut layer = open_layer_as(&b.path, Some(digest_hex(&b.digest)?))?;
        // Errors of the merge name the source layer, as the user knows it.
        layer.name = format!(
            "{}/{} {}",
            i + 1,
            manifest.layers.len(),
            source_layer.digest
        );
        merge_inputs.push(layer);
    }
    let merged = merge_layers(&merge_inputs, &opts.prefetch)?;
    let referenced: Vec<String> = merged
        .blobs
        .iter()
        .map(|b| format!("sha256:{}", b.id))
        .collect();
    let mut blobs = Vec::new();
    let mut layers_report = Vec::new();
    for (src, b) in manifest.layers.iter().zip(&built) {
        let used = referenced.contains(&b.digest);
        layers_report.push(LayerReport {
            source_digest: src.digest.clone(),
            source_size: src.size,
            blob_digest: b.digest.clone(),
            blob_size: b.size,
            chunks: b.chunks,
            file_chunks: b.file_chunks,
            dedup_chunks: b.dedup_chunks,
            dedup_chunks_other_blobs: b.dedup_chunks_other_blobs,
            dedup_bytes: b.dedup_bytes,
            referenced: used,
        });
    }
    // Blob layers in the merged blob table's order (a blob shared by layers is listed
    // once). Blobs of the chunk dictionary have no local file: they must be in the
    // target already (checked before anything is pushed).
    let mut reference_blobs = Vec::new();
    for (id, info) in referenced.iter().zip(&merged.blobs) {
        let (size, path) = match built.iter().find(|b| &b.digest == id) {
            Some(b) => (b.size, Some(b.path.clone())),
            None if dict.table.iter().any(|d| d.id == info.id) => {
                reference_blobs.push(id.clone());
                (info.compressed_size, None)
            }
            None => {
                return Err(OciError::invalid(
                    "merged bootstrap",
                    format!("blob {id} comes from no layer and no chunk dict"),
                ))
            }
        };
        let mut d = descriptor(MEDIA_NYDUS_BLOB, id.clone(), size);
        d.annotations
            .insert(ANNOTATION_NYDUS_BLOB.into(), "true".into());
        blobs.push((d, path));
    }
    let (boot_gz, diff_id) = bootstrap_layer(&merged.bootstrap)?;
    let mut boot_desc = descriptor(MEDIA_LAYER_GZIP, digest_of(&boot_gz), boot_gz.len() as u64);
    boot_desc
        .annotations
        .insert(ANNOTATION_NYDUS_BOOTSTRAP.into(), "true".into());
    boot_desc
        .annotations
        .insert(ANNOTATION_NYDUS_FS_VERSION.into(), "6".into());
    boot_desc
        .annotations
        .insert(ANNOTATION_UNCOMPRESSED.into(), diff_id.clone());
    if !reference_blobs.is_empty() {
        let ids: Vec<&str> = reference_blobs.iter().map(|d| &d[7..]).collect();
        boot_desc.annotations.insert(
            ANNOTATION_NYDUS_REFERENCE_BLOB_IDS.into(),
            serde_json::to_string(&ids).expect("ids serialize"),
        );
    }

    let mut diff_ids: Vec<Value> = blobs
        .iter()
        .map(|(d, _)| Value::String(d.digest.clone()))
        .collect();
    diff_ids.push(Value::String(diff_id));
    match config.as_object_mut() {
        Some(obj) => {
            obj.insert(
                "rootfs".into(),
                serde_json::json!({"type": "layers", "diff_ids": diff_ids}),
            );
        }
        None => {
            return Err(OciError::invalid(
                format!("config {}", manifest.config.digest),
                "not a JSON object",
            ))
        }
    }
    let config_out = serde_json::to_vec(&config).expect("config serializes");
    let config_desc = descriptor(
        MEDIA_OCI_CONFIG,
        digest_of(&config_out),
        config_out.len() as u64,
    );
    let mut layers: Vec<Descriptor> = blobs.iter().map(|(d, _)| d.clone()).collect();
    layers.push(boot_desc.clone());
    let out = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_OCI_MANIFEST.into()),
        config: config_desc.clone(),
        layers,
        annotations: Default::default(),
        extra: Default::default(),
    };
    let manifest_bytes = serde_json::to_vec(&out).expect("manifest serializes");
    let mut manifest_desc = descriptor(
        MEDIA_OCI_MANIFEST,
        digest_of(&manifest_bytes),
        manifest_bytes.len() as u64,
    );
    manifest_desc.platform = platform.clone();
    Ok(Converted {
        report: ImageReport {
            platform: platform.as_ref().map(Platform::name),
            manifest_digest: manifest_desc.digest.clone(),
            bootstrap_digest: boot_desc.digest.clone(),
            bootstrap_size: merged.bootstrap.len() as u64,
            layers: layers_report,
            reference_blobs,
        },
        platform,
        manifest: manifest_bytes,
        manifest_desc,
        config: (config_desc, config_out),
        blobs,
        bootstrap_layer: (boot_desc, boot_gz),
    })
}

/// Picks the manifests to convert from an index.
fn select(index: &Index, opts: &ConvertOptions) -> Result<Vec<Descriptor>> {
    let wanted: Vec<Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            // Skip attestation manifests and existing nydus manifests.
            let p = d.platform.as_ref();
            let is_nydus =
                p.is_some_and(|p| p.os_features.iter().any(|f| f == "nydus.remoteimage.v1"));
            let unknown = p.is_some_and(|p| p.os == "unknown");
            !is_nydus && !unknown
        })
        .filter(|d| {
            opts.all_platforms
                || d.platform.as_ref().is_some_and(|p| {
                    let name = p.name();
                    name == opts.platform || format!("{}/{}", p.os, p.architecture) == opts.platform
                })
        })
        .cloned()
        .collect();
    if wanted.is_empty() {
        return Err(index.no_platform(if opts.all_platforms {
            "any"
        } else {
            &opts.platform
        }));
    }
    Ok(if opts.all_platforms {
        wanted
    } else {
        wanted.into_iter().take(1).collect()
    })
}

/// Converts every selected image of `top`; blobs go to `upload` as they are built.
fn convert_images(
    source: &dyn Source,
    top: &[u8],
    opts: &ConvertOptions,
    dir: &Path,
    upload: &Uploads,
) -> Result<(Vec<Converted>, bool)> {
    Ok(match parse_top_level(top, "source manifest")? {
        TopLevel::Manifest(m) => (
            vec![convert_image(source, &m, None, opts, dir, upload)?],
            false,
        ),
        TopLevel::Index(idx) => {
            let mut out = Vec::new();
            for d in select(&idx, opts)? {
                let bytes = source.manifest(&d.digest)?;
                let m = match parse_top_level(&bytes, &format!("manifest {}", d.digest))? {
                    TopLevel::Manifest(m) => m,
                    TopLevel::Index(_) => {
                        return Err(OciError::invalid(
                            format!("manifest {}", d.digest),
                            "nested indexes are not supported",
                        ))
                    }
                };
                out.push(convert_image(
                    source,
                    &m,
                    d.platform.clone(),
                    opts,
                    dir,
                    upload,
                )?);
            }
            (out, true)
        }
    })
}

/// Converts `opts.source` into a nydus image at `opts.target`.
///
/// Layers are converted one after the other (see `build_layers`) while a second thread
/// uploads each finished blob to the target. A blob is queued only once its source
/// layer's digest has been verified, and the bootstrap layer, config, manifests and
/// finally the tag are written after every image is converted: a failed conversion can
/// leave untagged blobs at the target, never a tagged image.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let started = Instant::now();
    super::store::check_target(Some(&opts.source), &opts.target)?;
    // The target's client is set up while the source's index is fetched.
    let (source, target) = std::thread::scope(|s| {
        let target = s.spawn(|| open_target(&opts.target, &opts.target_registry));
        let source = open_source(&opts.source, &opts.source_registry)
            .and_then(|source| Ok((source.top()?.0, source)));
        let target = target.join().unwrap_or_else(|_| {
            Err(OciError::invalid(
                format!("target {}", opts.target),
                "opening it panicked",
            ))
        });
        (source, target)
    });
    let (top, source) = source?;
    let target = target?;
    let work = tempfile::Builder::new()
        .prefix("nydusify-")
        .tempdir_in(&opts.work_dir)
        .map_err(|e| {
            OciError::io(
                format!("Creating a work directory in {}", opts.work_dir.display()),
                e,
            )
        })?;
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel();
    let queue: UploadQueue = std::sync::Mutex::new(rx);
    let (converted, uploaded, convert_seconds, pushed) = std::thread::scope(|s| {
        let uploaders: Vec<_> = (0..UPLOADERS)
            .map(|_| s.spawn(|| upload_blobs(target.as_ref(), &queue, &stop)))
            .collect();
        let uploads = Uploads { tx, stop: &stop };
        let converted = convert_images(source.as_ref(), &top, opts, work.path(), &uploads);
        let convert_seconds = started.elapsed().as_secs_f64();
        let pushed = Instant::now();
        drop(uploads);
        if converted.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let mut uploaded = Ok(0.0);
        for u in uploaders {
            let r = u.join().unwrap_or_else(|_| {
                Err(OciError::invalid(
                    format!("target {}", opts.target),
                    "an upload thread panicked",
                ))
            });
            uploaded = match (uploaded, r) {
                (Ok(a), Ok(b)) => Ok(a + b),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        (converted, uploaded, convert_seconds, pushed)
    });
    // An upload error is the cause of a conversion stopped by it.
    let upload_busy = uploaded?;
    let (images, is_index) = converted?;
    tracing::info!(
        "all blobs uploaded {:.2}s after the start ({upload_busy:.2}s of uploads on {UPLOADERS} threads)",
        convert_seconds + pushed.elapsed().as_secs_f64()
    );

    // Everything is converted and verified: now the rest, tag last.
    for img in &images {
        for (d, path) in &img.blobs {
            if path.is_none() && !target.has_blob(d)? {
                return Err(OciError::invalid(
                    format!("chunk dict blob {}", d.digest),
                    format!(
                        "not in {}: push the chunk-dict image to the target repository first",
                        opts.target
                    ),
                ));
            }
        }
    }
    // The bootstrap layers and configs, two at a time (each is a few round trips).
    let small: Vec<(&Descriptor, &[u8])> = images
        .iter()
        .flat_map(|i| {
            [
                (&i.bootstrap_layer.0, &i.bootstrap_layer.1[..]),
                (&i.config.0, &i.config.1[..]),
            ]
        })
        .collect();
    let target = target.as_ref();
    let (mine, theirs) = small.split_at(small.len() / 2);
    std::thread::scope(|s| {
        let other = s.spawn(move || -> Result<()> {
            theirs
                .iter()
                .try_for_each(|(d, b)| target.put_blob_bytes(d, b))
        });
        let mine: Result<()> = mine
            .iter()
            .try_for_each(|(d, b)| target.put_blob_bytes(d, b));
        let theirs = other.join().unwrap_or_else(|_| {
            Err(OciError::invalid(
                format!("target {}", opts.target),
                "an upload thread panicked",
            ))
        });
        mine.and(theirs)
    })?;
    let (top_desc, top_bytes) = if is_index {
        for img in &images {
            target.put_manifest(&img.manifest_desc, &img.manifest)?;
        }
        let index = Index {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_INDEX.into()),
            manifests: images
                .iter()
                .map(|i| {
                    let mut d = i.manifest_desc.clone();
                    d.platform = i.platform.clone();
                    d
                })
                .collect(),
            annotations: Default::default(),
            extra: Default::default(),
        };
        let bytes = serde_json::to_vec(&index).expect("index serializes");
        (
            descriptor(MEDIA_OCI_INDEX, digest_of(&bytes), bytes.len() as u64),
            bytes,
        )
    } else {
        let mut d = images[0].manifest_desc.clone();
        d.platform = None;
        (d, images[0].manifest.clone())
    };
    target.tag(&top_desc, &top_bytes)?;
    let source_bytes = images
        .iter()
        .flat_map(|i| &i.report.layers)
        .map(|l| l.source_size)
        .sum();
    let target_bytes = images
        .iter()
        .map(|i| {
            i.blobs
                .iter()
                .filter(|(_, p)| p.is_some())
                .map(|(d, _)| d.size)
                .sum::<u64>()
                + i.bootstrap_layer.0.size
        })
        .sum();
    let layers = || images.iter().flat_map(|i| &i.report.layers);
    let dedup_chunks = layers().map(|l| l.dedup_chunks as u64).sum();
    let dedup_bytes = layers().map(|l| l.dedup_bytes).sum();
    Ok(ConvertReport {
        source: opts.source.to_string(),
        target: opts.target.to_string(),
        digest: top_desc.digest,
        media_type: top_desc.media_type,
        images: images.into_iter().map(|i| i.report).collect(),
        source_bytes,
        target_bytes,
        dedup_chunks,
        dedup_bytes,
        convert_seconds,
        push_seconds: pushed.elapsed().as_secs_f64(),
    })
}

/// Verifies bytes of a small document against a descriptor (re-exported for checks).
pub fn verify_document(what: &str, desc: &Descriptor, data: &[u8]) -> Result<()> {
    verify(what, desc, data)
}
