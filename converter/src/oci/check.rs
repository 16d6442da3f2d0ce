//! `nydusify check`: does a nydus image show exactly the filesystem of its source?
//!
//! The source side is built by [`FlatTree`] (OCI layers applied one by one with the
//! overlay rules, or a directory walked), independently of the converter's own tar
//! reader and merge code. The nydus side is read from the target's merged bootstrap and
//! blobs: every blob is downloaded and checked against its layer digest, every chunk of
//! every blob is decompressed and checked against its digest, and every regular file is
//! read back chunk by chunk to get its content digest. Then every path is compared:
//! type, permission bits, uid/gid, size, mtime (with nanoseconds), xattrs, symlink
//! target, device number, hard-link sets and content digest. The manifest is checked
//! against the packaging rules of `spec/upstream-interfaces.md` §6 on the way.

use super::flat::{Entry, FlatTree, Kind};
use super::store::{open_source, ImageRef, Source};
use super::*;
use p2p_backend::registry::RegistryOptions;
use rafs::read::{self, Bootstrap};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// What the nydus image is compared with.
#[derive(Clone, Debug)]
pub enum CheckSource {
    /// An OCI image (its layers are applied in order).
    Image(ImageRef),
    /// A directory (what `nydusify build --source-dir` packed).
    Dir(PathBuf),
}

/// What to check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// The original.
    pub source: CheckSource,
    /// The nydus image.
    pub target: ImageRef,
    /// How to reach the source registry.
    pub source_registry: RegistryOptions,
    /// How to reach the target registry.
    pub target_registry: RegistryOptions,
    /// `os/arch[/variant]` chosen from indexes.
    pub platform: String,
    /// Where blobs are downloaded (a temporary directory inside it is used).
    pub work_dir: PathBuf,
}

/// What a successful check saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Paths compared (the root included).
    pub entries: u64,
    /// Regular files (each inode once).
    pub files: u64,
    /// Bytes of regular files read back and hashed.
    pub file_bytes: u64,
    /// Blobs downloaded and checked.
    pub blobs: u64,
    /// Chunks decompressed and checked against their digests.
    pub chunks: u64,
}

/// Compares the nydus image `opts.target` with `opts.source`. Every difference found is
/// returned at once in [`OciError::Differs`], one line each.
pub fn check(opts: &CheckOptions) -> Result<CheckReport> {
    let expected = match &opts.source {
        CheckSource::Image(r) => {
            let source = open_source(r, &opts.source_registry)?;
            let manifest = pick_manifest(source.as_ref(), &opts.platform, "source")?;
            source_tree(source.as_ref(), &manifest)?
        }
        CheckSource::Dir(d) => FlatTree::from_dir(d)?,
    };
    let target = open_source(&opts.target, &opts.target_registry)?;
    let manifest = pick_manifest(target.as_ref(), &opts.platform, "target")?;
    let work = tempfile::Builder::new()
        .prefix("nydusify-check-")
        .tempdir_in(&opts.work_dir)
        .map_err(|e| {
            OciError::io(
                format!("Creating a work directory in {}", opts.work_dir.display()),
                e,
            )
        })?;
    let (actual, mut report, mut diffs) = nydus_tree(target.as_ref(), &manifest, work.path())?;
    diffs.extend(compare(&expected, &actual));
    report.entries = actual.entries.len() as u64;
    if diffs.is_empty() {
        Ok(report)
    } else {
        Err(OciError::Differs(diffs))
    }
}

/// The platforms (`os/arch[/variant]`) of the nydus image `opts.target` when it is an
/// image index, in its order; `None` for a single manifest. `nydusify check
/// --all-platforms` checks each of them against the same platform of the source.
pub fn target_platforms(opts: &CheckOptions) -> Result<Option<Vec<String>>> {
    let target = open_source(&opts.target, &opts.target_registry)?;
    let (top, digest) = target.top()?;
    Ok(
        match parse_top_level(&top, &format!("target manifest {digest}"))? {
            TopLevel::Manifest(_) => None,
            TopLevel::Index(idx) => Some(
                idx.manifests
                    .iter()
                    .map(|d| {
                        d.platform.as_ref().map(Platform::name).ok_or_else(|| {
                            OciError::invalid(
                                format!("target index entry {}", d.digest),
                                "no platform",
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
        },
    )
}

/// The manifest of `platform` (or the only manifest) of an image.
pub fn pick_manifest(source: &dyn Source, platform: &str, what: &str) -> Result<Manifest> {
    let (top, digest) = source.top()?;
    match parse_top_level(&top, &format!("{what} manifest {digest}"))? {
        TopLevel::Manifest(m) => Ok(*m),
        TopLevel::Index(idx) => {
            let d = idx
                .manifests
                .iter()
                .find(|d| {
                    d.platform.as_ref().is_some_and(|p| {
                        p.name() == platform || format!("{}/{}", p.os, p.architecture) == platform
                    })
                })
                .ok_or_else(|| idx.no_platform(platform))?;
            let bytes = source.manifest(&d.digest)?;
            match parse_top_level(&bytes, &format!("{what} manifest {}", d.digest))? {
                TopLevel::Manifest(m) => Ok(*m),
                TopLevel::Index(_) => Err(OciError::invalid(
                    format!("{what} manifest {}", d.digest),
                    "nested indexes are not supported",
                )),
            }
        }
    }
}

/// The source image's filesystem: its layers applied in order.
fn source_tree(source: &dyn Source, manifest: &Manifest) -> Result<FlatTree> {
    let mut tree = FlatTree::default();
    for desc in &manifest.layers {
        if LayerMedia::of(&desc.media_type).is_none() {
            return Err(OciError::MediaType {
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
            });
        }
        let mut r = Hashing::new(source.open_blob(desc)?);
        tree.apply_layer(&mut r)
            .map_err(|e| OciError::SourceLayer {
                layer: desc.digest.clone(),
                source: Box::new(e),
            })?;
        io::copy(&mut r, &mut io::sink())
            .map_err(|e| OciError::io(format!("Reading layer {}", desc.digest), e))?;
        r.verify("layer", desc)?;
    }
    Ok(tree)
}

/// The merged bootstrap from the bootstrap layer (`image/image.boot`).
pub fn read_bootstrap_layer(source: &dyn Source, desc: &Descriptor) -> Result<Vec<u8>> {
    let gz = source.read_blob(desc, "bootstrap layer")?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
    let io = |e| OciError::io(format!("Reading bootstrap layer {}", desc.digest), e);
    for entry in tar.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let path = entry.path_bytes().into_owned();
        if path == BOOTSTRAP_PATH.as_bytes()
            || path.strip_prefix(b"./") == Some(BOOTSTRAP_PATH.as_bytes())
        {
            let mut out = Vec::new();
            entry.read_to_end(&mut out).map_err(io)?;
            return Ok(out);
        }
    }
    Err(OciError::invalid(
        format!("bootstrap layer {}", desc.digest),
        format!("no {BOOTSTRAP_PATH} in it"),
    ))
}

/// Downloads `desc` into `path`, checking its digest.
fn download(source: &dyn Source, desc: &Descriptor, path: &Path) -> Result<()> {
    let io = |e| {
        OciError::io(
            format!("Downloading blob {} to {}", desc.digest, path.display()),
            e,
        )
    };
    let mut r = Hashing::new(source.open_blob(desc)?);
    let mut f = io::BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    io::copy(&mut r, &mut f).map_err(io)?;
    f.flush().map_err(io)?;
    r.verify("blob", desc)
}

/// The nydus image's filesystem, the check's counters and packaging rule violations.
fn nydus_tree(
    target: &dyn Source,
    manifest: &Manifest,
    work: &Path,
) -> Result<(FlatTree, CheckReport, Vec<String>)> {
    let mut diffs = Vec::new();
    let boot_at = manifest
        .layers
        .iter()
        .position(|l| {
            l.annotations
                .get(ANNOTATION_NYDUS_BOOTSTRAP)
                .map(String::as_str)
                == Some("true")
        })
        .ok_or_else(|| {
            OciError::invalid(
                "target manifest",
                format!("no layer annotated {ANNOTATION_NYDUS_BOOTSTRAP} (not a nydus image?)"),
            )
        })?;
    if boot_at + 1 != manifest.layers.len() {
        diffs.push("manifest: the bootstrap layer is not the last layer".to_string());
    }
    let boot_desc = &manifest.layers[boot_at];
    if boot_desc.media_type != MEDIA_LAYER_GZIP {
        diffs.push(format!(
            "manifest: bootstrap layer has media type {}, expected {MEDIA_LAYER_GZIP}",
            boot_desc.media_type
        ));
    }
    if boot_desc
        .annotations
        .get(ANNOTATION_NYDUS_FS_VERSION)
        .map(String::as_str)
        != Some("6")
    {
        diffs.push(format!(
            "manifest: bootstrap layer lacks {ANNOTATION_NYDUS_FS_VERSION}=6"
        ));
    }
    for (i, l) in manifest
        .layers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != boot_at)
    {
        if l.media_type != MEDIA_NYDUS_BLOB
            || l.annotations.get(ANNOTATION_NYDUS_BLOB).map(String::as_str) != Some("true")
        {
            diffs.push(format!(
                "manifest: layer {i} ({}) is not a nydus blob layer ({}, {ANNOTATION_NYDUS_BLOB} missing?)",
                l.digest, l.media_type
            ));
        }
    }
    let bs = Bootstrap::from_bytes(read_bootstrap_layer(target, boot_desc)?)?;
    let mut report = CheckReport::default();
    let mut files = Vec::with_capacity(bs.blobs().len());
    for (i, info) in bs.blobs().iter().enumerate() {
        let digest = format!("sha256:{}", info.id);
        let Some(desc) = manifest.layers.iter().find(|l| l.digest == digest) else {
            return Err(OciError::invalid(
                "target manifest",
                format!("blob {digest} of the bootstrap has no layer"),
            ));
        };
        let path = work.join(&info.id);
        download(target, desc, &path)?;
        let file = File::open(&path)
            .map_err(|e| OciError::io(format!("Opening {}", path.display()), e))?;
        for (chunk, known) in read::blob_chunks(&bs, i as u32, &file)? {
            if known {
                read::read_chunk(&file, info, &chunk)?;
                report.chunks += 1;
            }
        }
        report.blobs += 1;
        files.push(file);
    }

    let mut tree = FlatTree::default();
    let mut digests: HashMap<u64, [u8; 32]> = HashMap::new();
    let root = bs.root()?;
    let mut all = vec![(b"/".to_vec(), root)];
    bs.walk(|path, _, inode| {
        all.push((path.to_vec(), inode.clone()));
        Ok(())
    })?;
    for (path, inode) in all {
        let kind = match inode.file_type() {
            0o040000 => Kind::Dir,
            0o100000 => {
                let d = match digests.get(&inode.nid) {
                    Some(d) => *d,
                    None => {
                        let mut h = sha2::Sha256::new();
                        for i in 0..bs.chunk_count(&inode) {
                            let c = bs.file_chunk(&inode, i)?;
                            let info = &bs.blobs()[c.blob_index as usize];
                            h.update(read::read_chunk(&files[c.blob_index as usize], info, &c)?);
                        }
                        let d: [u8; 32] = h.finalize().into();
                        digests.insert(inode.nid, d);
                        report.files += 1;
                        report.file_bytes += inode.size;
                        d
                    }
                };
                Kind::Reg(d)
            }
            0o120000 => Kind::Symlink(bs.readlink(&inode)?),
            0o020000 => Kind::Char(inode.rdev()),
            0o060000 => Kind::Block(inode.rdev()),
            0o010000 => Kind::Fifo,
            _ => Kind::Socket,
        };
        let size = if matches!(kind, Kind::Reg(_)) {
            inode.size
        } else {
            0
        };
        tree.entries.insert(
            path,
            Entry {
                kind,
                perm: inode.mode & 0o7777,
                uid: inode.uid,
                gid: inode.gid,
                mtime: inode.mtime as i64,
                mtime_nsec: inode.mtime_nsec,
                size,
                xattrs: bs.xattrs(&inode)?.into_iter().collect(),
                inode: inode.nid,
                defined: true,
            },
        );
    }
    Ok((tree, report, diffs))
}

fn show(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ => format!("0x{}", hex::encode(b)),
    }
}

fn show_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let parts: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{}={}", show(k), show(v)))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Every difference between the trees, one line each (`PATH: WHAT: source X, nydus Y`).
/// A path missing on one side is reported once, with the number of entries below it.
pub fn compare(expected: &FlatTree, actual: &FlatTree) -> Vec<String> {
    let mut diffs = Vec::new();
    let p = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let below = |t: &FlatTree, path: &[u8]| {
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        t.entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .count()
    };
    let under = |path: &[u8], dir: &Option<Vec<u8>>| {
        dir.as_ref()
            .is_some_and(|d| path.len() > d.len() && path.starts_with(d) && path[d.len()] == b'/')
    };
    let mut gone: Option<Vec<u8>> = None;
    for (path, e) in &expected.entries {
        let Some(a) = actual.entries.get(path) else {
            if !under(path, &gone) {
                let n = below(expected, path);
                let extra = if n > 0 {
                    format!(" (and {n} entries below it)")
                } else {
                    String::new()
                };
                diffs.push(format!("{}: missing from the nydus image{extra}", p(path)));
                gone = Some(path.clone());
            }
            continue;
        };
        let mut d = |what: &str, s: String, n: String| {
            diffs.push(format!("{}: {what}: source {s}, nydus {n}", p(path)));
        };
        if std::mem::discriminant(&e.kind) != std::mem::discriminant(&a.kind) {
            d("type", e.kind.name().into(), a.kind.name().into());
            continue;
        }
        match (&e.kind, &a.kind) {
            (Kind::Reg(x), Kind::Reg(y)) if x != y => {
                d("content sha256", hex::encode(x), hex::encode(y))
            }
            (Kind::Symlink(x), Kind::Symlink(y)) if x != y => d("symlink target", show(x), show(y)),
            (Kind::Char(x), Kind::Char(y)) | (Kind::Block(x), Kind::Block(y)) if x != y => {
                d("device number", format!("{x:#x}"), format!("{y:#x}"))
            }
            _ => {}
        }
        if !e.defined {
            continue;
        }
        if e.perm != a.perm {
            d("mode", format!("{:04o}", e.perm), format!("{:04o}", a.perm));
        }
        if e.uid != a.uid {
            d("uid", e.uid.to_string(), a.uid.to_string());
        }
        if e.gid != a.gid {
            d("gid", e.gid.to_string(), a.gid.to_string());
        }
        if e.size != a.size {
            d("size", e.size.to_string(), a.size.to_string());
        }
        if (e.mtime, e.mtime_nsec) != (a.mtime, a.mtime_nsec) {
            d(
                "mtime",
                format!("{}.{:09}", e.mtime, e.mtime_nsec),
                format!("{}.{:09}", a.mtime, a.mtime_nsec),
            );
        }
        if e.xattrs != a.xattrs {
            d("xattrs", show_xattrs(&e.xattrs), show_xattrs(&a.xattrs));
        }
    }
    let mut extra: Option<Vec<u8>> = None;
    for path in actual.entries.keys() {
        if !expected.entries.contains_key(path) && !under(path, &extra) {
            let n = below(actual, path);
            let more = if n > 0 {
                format!(" (and {n} entries below it)")
            } else {
                String::new()
            };
            diffs.push(format!("{}: not in the source{more}", p(path)));
            extra = Some(path.clone());
        }
    }
    let (le, la) = (expected.link_sets(), actual.link_sets());
    for path in expected
        .entries
        .keys()
        .filter(|k| actual.entries.contains_key(*k))
    {
        let alone = vec![path.clone()];
        let (x, y) = (
            le.get(path).unwrap_or(&alone),
            la.get(path).unwrap_or(&alone),
        );
        if x != y {
            let names = |v: &Vec<Vec<u8>>| v.iter().map(|n| p(n)).collect::<Vec<_>>().join(" ");
            diffs.push(format!(
                "{}: hard links: source [{}], nydus [{}]",
                p(path),
                names(x),
                names(y)
            ));
        }
    }
    diffs
}
