//! Where images live: an OCI image layout directory (`oci:DIR[:TAG]`), a docker-archive
//! tar (`docker-archive:FILE`, read only) or a registry (`[docker://]HOST/NAME[:TAG]`).
//!
//! Sources hand out the top-level document (manifest or index), manifests by digest and
//! blob streams; targets take blobs and manifests and set the tag last.

use super::convert::descriptor;
use super::{digest_hex, digest_of, Descriptor, Manifest, OciError, Result};
use super::{ANNOTATION_REF_NAME, MEDIA_DOCKER_MANIFEST, MEDIA_NYDUS_BLOB, MEDIA_OCI_INDEX};
use p2p_backend::registry::{Registry, RegistryError, RegistryOptions};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// An image location as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory and an optional tag.
    Layout {
        /// The directory.
        dir: PathBuf,
        /// The tag (`org.opencontainers.image.ref.name`).
        tag: Option<String>,
    },
    /// A `docker save` archive.
    DockerArchive(PathBuf),
    /// A registry reference.
    Registry(String),
}

impl FromStr for ImageRef {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !t.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(OciError::invalid(
                    format!("image '{s}'"),
                    "no directory after oci:",
                ));
            }
            return Ok(ImageRef::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            return Ok(ImageRef::DockerArchive(PathBuf::from(rest)));
        }
        let r = s.strip_prefix("docker://").unwrap_or(s);
        if r.is_empty() || r.contains(char::is_whitespace) {
            return Err(OciError::invalid(
                format!("image '{s}'"),
                "empty or contains spaces",
            ));
        }
        Ok(ImageRef::Registry(r.to_string()))
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            ImageRef::Registry(r) => write!(f, "docker://{r}"),
        }
    }
}

/// Where an image is read from.
pub trait Source: Sync {
    /// The top-level document (manifest or index) and its digest.
    fn top(&self) -> Result<(Vec<u8>, String)>;
    /// A manifest by digest (from an index).
    fn manifest(&self, digest: &str) -> Result<Vec<u8>>;
    /// A stream of the blob's bytes; callers check the digest of what they read.
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>>;

    /// A small blob, read whole and checked against its descriptor.
    fn read_blob(&self, desc: &Descriptor, what: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_blob(desc)?
            .take(64 << 20)
            .read_to_end(&mut out)
            .map_err(|e| OciError::io(format!("Reading {what} {}", desc.digest), e))?;
        verify(what, desc, &out)?;
        Ok(out)
    }
}

/// Checks bytes against a descriptor.
pub fn verify(what: &str, desc: &Descriptor, data: &[u8]) -> Result<()> {
    let actual = digest_of(data);
    if actual != desc.digest || data.len() as u64 != desc.size {
        return Err(OciError::DigestMismatch {
            what: what.to_string(),
            digest: desc.digest.clone(),
            actual,
            size: data.len() as u64,
        });
    }
    Ok(())
}

/// The receiving end of a blob writer's progress ([`Target::put_growing_blob`]).
pub type BlobProgressRx = tokio::sync::watch::Receiver<p2p_backend::registry::BlobProgress>;

/// Where an image is written.
pub trait Target: Send + Sync {
    /// Whether the target holds the blob already.
    fn has_blob(&self, desc: &Descriptor) -> Result<bool>;
    /// Stores a blob from a file (a no-op when the target has it).
    fn put_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<()>;
    /// Stores the nydus blob being written to `path` (`name` says which it is, in
    /// messages), once `progress` says it is complete; nothing when it is abandoned.
    /// A target that can take a blob in pieces starts while the file is still written.
    fn put_growing_blob(&self, path: &Path, _name: &str, progress: BlobProgressRx) -> Result<()> {
        put_when_complete(self, path, progress)
    }
    /// Stores a blob from memory.
    fn put_blob_bytes(&self, desc: &Descriptor, data: &[u8]) -> Result<()>;
    /// Stores a manifest by digest, untagged.
    fn put_manifest(&self, desc: &Descriptor, data: &[u8]) -> Result<()>;
    /// Stores the top-level manifest or index and tags it; called last.
    fn tag(&self, desc: &Descriptor, data: &[u8]) -> Result<()>;
}

/// [`Target::put_growing_blob`] for targets that take whole files: waits until the blob
/// is complete, then stores it with [`Target::put_blob_file`] (which skips a blob the
/// target has).
fn put_when_complete<T: Target + ?Sized>(
    target: &T,
    path: &Path,
    progress: BlobProgressRx,
) -> Result<()> {
    match p2p_backend::registry::wait_complete(progress) {
        Some((digest, size)) => {
            target.put_blob_file(&descriptor(MEDIA_NYDUS_BLOB, digest, size), path)
        }
        None => Ok(()),
    }
}

/// Opens `r` as a source.
pub fn open_source(r: &ImageRef, opts: &RegistryOptions) -> Result<Box<dyn Source>> {
    Ok(match r {
        ImageRef::Layout { dir, tag } => Box::new(Layout::open(dir, tag.clone())?),
        ImageRef::DockerArchive(p) => Box::new(DockerArchive::open(p)?),
        ImageRef::Registry(s) => Box::new(RegistryStore::new(s, opts)?),
    })
}

/// Refuses, before any work, a target that cannot receive the conversion of `source`:
/// a registry reference by digest (the result is pushed under a tag, which a digest
/// reference does not name), or the source itself (its tag would move to the nydus
/// image and the original would be lost).
pub fn check_target(source: Option<&ImageRef>, target: &ImageRef) -> Result<()> {
    let invalid = |why: &str| OciError::invalid(format!("target {target}"), why);
    match (source, target) {
        (_, ImageRef::Registry(t)) => {
            let (t, by_digest) = p2p_backend::registry::canonical_reference(t)?;
            if by_digest {
                return Err(invalid(
                    "names a digest; the nydus image is pushed under a tag (HOST/NAME:TAG)",
                ));
            }
            if let Some(ImageRef::Registry(s)) = source {
                if p2p_backend::registry::canonical_reference(s)?.0 == t {
                    return Err(invalid(
                        "is the source image: its tag would move to the nydus image; \
                         choose another tag",
                    ));
                }
            }
        }
        (Some(ImageRef::Layout { dir: sd, tag: st }), ImageRef::Layout { dir: td, tag: tt }) => {
            let same_dir = match (fs::canonicalize(sd), fs::canonicalize(td)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if same_dir && st == tt {
                return Err(invalid(
                    "is the source image: its tag would move to the nydus image; \
                     choose another tag",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Opens `r` as a target.
pub fn open_target(r: &ImageRef, opts: &RegistryOptions) -> Result<Box<dyn Target>> {
    Ok(match r {
        ImageRef::Layout { dir, tag } => Box::new(Layout::create(dir, tag.clone())?),
        ImageRef::DockerArchive(p) => {
            return Err(OciError::invalid(
                format!("target docker-archive:{}", p.display()),
                "docker archives can only be read; write an OCI layout (oci:DIR:TAG) instead",
            ))
        }
        ImageRef::Registry(s) => Box::new(RegistryStore::new(s, opts)?),
    })
}

/// An OCI image layout directory.
pub struct Layout {
    dir: PathBuf,
    tag: Option<String>,
}

impl Layout {
    /// Opens an existing layout.
    pub fn open(dir: &Path, tag: Option<String>) -> Result<Self> {
        if !dir.join("index.json").is_file() {
            return Err(OciError::invalid(
                format!("OCI layout {}", dir.display()),
                "no index.json (not an OCI image layout directory)",
            ));
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
            tag,
        })
    }

    /// Opens a layout for writing, creating it if needed.
    pub fn create(dir: &Path, tag: Option<String>) -> Result<Self> {
        let io = |e| OciError::io(format!("Creating OCI layout {}", dir.display()), e);
        fs::create_dir_all(dir.join("blobs/sha256")).map_err(io)?;
        if !dir.join("oci-layout").exists() {
            fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
        }
        if !dir.join("index.json").exists() {
            let idx = serde_json::json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []});
            fs::write(dir.join("index.json"), idx.to_string()).map_err(io)?;
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
            tag,
        })
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("blobs/sha256").join(digest_hex(digest)?))
    }

    fn index(&self) -> Result<super::Index> {
        let path = self.dir.join("index.json");
        let bytes =
            fs::read(&path).map_err(|e| OciError::io(format!("Reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|source| OciError::Document {
            what: path.display().to_string(),
            source,
        })
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<()> {
        let io = |e| OciError::io(format!("Writing {}", path.display()), e);
        let dir = path.parent().unwrap_or(&self.dir);
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        std::io::Write::write_all(&mut tmp, data).map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

impl Source for Layout {
    fn top(&self) -> Result<(Vec<u8>, String)> {
        let idx = self.index()?;
        let desc = match &self.tag {
            Some(t) => idx
                .manifests
                .iter()
                .find(|d| d.annotations.get(ANNOTATION_REF_NAME) == Some(t)),
            None if idx.manifests.len() == 1 => idx.manifests.first(),
            None => {
                return Err(OciError::invalid(
                    format!("OCI layout {}", self.dir.display()),
                    format!(
                        "{} images and no tag given (use oci:DIR:TAG)",
                        idx.manifests.len()
                    ),
                ))
            }
        };
        let desc = desc.ok_or_else(|| {
            OciError::invalid(
                format!("OCI layout {}", self.dir.display()),
                format!("no image tagged '{}'", self.tag.as_deref().unwrap_or("")),
            )
        })?;
        let data = self.read_blob(desc, "manifest")?;
        Ok((data, desc.digest.clone()))
    }

    fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let data =
            fs::read(&path).map_err(|e| OciError::io(format!("Reading manifest {digest}"), e))?;
        let actual = digest_of(&data);
        if actual != digest {
            return Err(OciError::DigestMismatch {
                what: "manifest".into(),
                digest: digest.into(),
                actual,
                size: data.len() as u64,
            });
        }
        Ok(data)
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>> {
        let path = self.blob_path(&desc.digest)?;
        let f = File::open(&path).map_err(|e| {
            OciError::io(
                format!(
                    "Opening blob {} in OCI layout {}",
                    desc.digest,
                    self.dir.display()
                ),
                e,
            )
        })?;
        Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, f)))
    }
}

impl Target for Layout {
    fn has_blob(&self, desc: &Descriptor) -> Result<bool> {
        Ok(self.blob_path(&desc.digest)?.is_file())
    }

    fn put_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<()> {
        let dest = self.blob_path(&desc.digest)?;
        if dest.exists() {
            return Ok(());
        }
        let io = |e| OciError::io(format!("Copying blob {} into the layout", desc.digest), e);
        let tmp =
            tempfile::NamedTempFile::new_in(dest.parent().unwrap_or(&self.dir)).map_err(io)?;
        fs::copy(path, tmp.path()).map_err(io)?;
        tmp.persist(&dest).map_err(|e| io(e.error))?;
        Ok(())
    }

    fn put_blob_bytes(&self, desc: &Descriptor, data: &[u8]) -> Result<()> {
        self.write_atomic(&self.blob_path(&desc.digest)?, data)
    }

    fn put_manifest(&self, desc: &Descriptor, data: &[u8]) -> Result<()> {
        self.put_blob_bytes(desc, data)
    }

    fn tag(&self, desc: &Descriptor, data: &[u8]) -> Result<()> {
        self.put_blob_bytes(desc, data)?;
        let mut idx = self.index()?;
        let mut desc = desc.clone();
        if let Some(t) = &self.tag {
            idx.manifests
                .retain(|d| d.annotations.get(ANNOTATION_REF_NAME) != Some(t));
            desc.annotations
                .insert(ANNOTATION_REF_NAME.into(), t.clone());
        } else {
            idx.manifests.retain(|d| d.digest != desc.digest);
        }
        idx.manifests.push(desc);
        let bytes = serde_json::to_vec(&idx).expect("index serializes");
        self.write_atomic(&self.dir.join("index.json"), &bytes)
    }
}

/// A `docker save` archive: `manifest.json` naming the config and layer members.
pub struct DockerArchive {
    path: PathBuf,
    /// Member name → (data offset, size).
    members: BTreeMap<String, (u64, u64)>,
    manifest: Manifest,
    /// Digest → member name.
    by_digest: BTreeMap<String, String>,
}

impl DockerArchive {
    /// Indexes the archive and describes its (first) image as an OCI manifest; layer
    /// digests are computed from the members.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |e| OciError::io(format!("Reading docker archive {}", path.display()), e);
        let not_tar = |e| {
            OciError::io(
                format!(
                    "Reading docker archive {} (not a `docker save` tar?)",
                    path.display()
                ),
                e,
            )
        };
        let mut members = BTreeMap::new();
        let mut ar = tar::Archive::new(File::open(path).map_err(io)?);
        for e in ar.entries().map_err(not_tar)? {
            let e = e.map_err(not_tar)?;
            let name = String::from_utf8_lossy(&e.path_bytes())
                .trim_start_matches("./")
                .to_string();
            members.insert(name, (e.raw_file_position(), e.size()));
        }
        let mut this = DockerArchive {
            path: path.to_path_buf(),
            members,
            manifest: Manifest {
                schema_version: 2,
                media_type: Some(MEDIA_DOCKER_MANIFEST.into()),
                config: Descriptor {
                    media_type: String::new(),
                    digest: String::new(),
                    size: 0,
                    annotations: Default::default(),
                    platform: None,
                    extra: Default::default(),
                },
                layers: Vec::new(),
                annotations: Default::default(),
                extra: Default::default(),
            },
            by_digest: BTreeMap::new(),
        };
        let mut mf = Vec::new();
        this.member("manifest.json")?
            .read_to_end(&mut mf)
            .map_err(io)?;
        let v: Value = serde_json::from_slice(&mf).map_err(|source| OciError::Document {
            what: "manifest.json of the docker archive".into(),
            source,
        })?;
        let first = v.get(0).ok_or_else(|| {
            OciError::invalid(
                format!("docker archive {}", path.display()),
                "manifest.json lists no image",
            )
        })?;
        let config = first
            .get("Config")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let layers: Vec<String> = first
            .get("Layers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        this.manifest.config =
            this.describe(&config, "application/vnd.docker.container.image.v1+json")?;
        for l in layers {
            let mut head = [0u8; 4];
            let n = this.member(&l)?.read(&mut head).map_err(io)?;
            let media = match super::super::source::tar::LayerCompression::detect(&head[..n]) {
                crate::source::tar::LayerCompression::Gzip => {
                    "application/vnd.docker.image.rootfs.diff.tar.gzip"
                }
                crate::source::tar::LayerCompression::Zstd => {
                    "application/vnd.oci.image.layer.v1.tar+zstd"
                }
                crate::source::tar::LayerCompression::None => {
                    "application/vnd.docker.image.rootfs.diff.tar"
                }
            };
            let d = this.describe(&l, media)?;
            this.manifest.layers.push(d);
        }
        Ok(this)
    }

    fn member(&self, name: &str) -> Result<std::io::Take<File>> {
        let (off, size) = *self
            .members
            .get(name.trim_start_matches("./"))
            .ok_or_else(|| {
                OciError::invalid(
                    format!("docker archive {}", self.path.display()),
                    format!("member '{name}' is missing"),
                )
            })?;
        let io = |e| OciError::io(format!("Reading {name} in {}", self.path.display()), e);
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(off)).map_err(io)?;
        Ok(f.take(size))
    }

    fn describe(&mut self, name: &str, media_type: &str) -> Result<Descriptor> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut r = self.member(name)?;
        let size = std::io::copy(&mut r, &mut HashWriter(&mut h))
            .map_err(|e| OciError::io(format!("Reading {name}"), e))?;
        let digest = format!("sha256:{}", hex::encode(h.finalize()));
        self.by_digest.insert(digest.clone(), name.to_string());
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            annotations: Default::default(),
            platform: None,
            extra: Default::default(),
        })
    }
}

struct HashWriter<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(self.0, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Source for DockerArchive {
    fn top(&self) -> Result<(Vec<u8>, String)> {
        let bytes = serde_json::to_vec(&self.manifest).expect("manifest serializes");
        let digest = digest_of(&bytes);
        Ok((bytes, digest))
    }

    fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        Err(OciError::invalid(
            format!("manifest {digest}"),
            "a docker archive holds no index",
        ))
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>> {
        let name = self.by_digest.get(&desc.digest).ok_or_else(|| {
            OciError::invalid(format!("blob {}", desc.digest), "not in the docker archive")
        })?;
        Ok(Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            self.member(name)?,
        )))
    }
}

/// A registry repository as source or target.
pub struct RegistryStore {
    registry: Registry,
    /// Whether the reference's tag resolves already (asked on the first growing blob).
    retagging: std::sync::OnceLock<bool>,
}

impl RegistryStore {
    /// A client for `reference`.
    pub fn new(reference: &str, opts: &RegistryOptions) -> Result<Self> {
        Ok(RegistryStore {
            registry: Registry::new(reference, opts)?,
            retagging: std::sync::OnceLock::new(),
        })
    }

    /// The underlying registry client.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn tag_name(&self) -> String {
        let r = self.registry.reference();
        r.tag().unwrap_or("latest").to_string()
    }
}

impl Source for RegistryStore {
    fn top(&self) -> Result<(Vec<u8>, String)> {
        Ok(self.registry.pull_manifest(None)?)
    }

    fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        let (bytes, actual) = self.registry.pull_manifest(Some(digest))?;
        if digest_of(&bytes) != digest {
            return Err(OciError::DigestMismatch {
                what: "manifest".into(),
                digest: digest.into(),
                actual,
                size: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send + '_>> {
        Ok(Box::new(self.registry.open_blob(&desc.digest)?))
    }
}

impl Target for RegistryStore {
    fn has_blob(&self, desc: &Descriptor) -> Result<bool> {
        Ok(self.registry.blob_exists(&desc.digest)?)
    }

    fn put_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<()> {
        let pushed = self.registry.push_blob_file(&desc.digest, path)?;
        tracing::info!(
            "blob {} ({} bytes): {}",
            desc.digest,
            desc.size,
            if pushed {
                "uploaded"
            } else {
                "already in the registry"
            }
        );
        Ok(())
    }

    /// Streams the blob while it is written — unless the target tag exists already:
    /// converting again onto it, the registry most likely has the blob, and a `HEAD`
    /// once the digest is known saves sending it (a streamed upload learns the digest
    /// only at its end, when the bytes have gone out).
    fn put_growing_blob(&self, path: &Path, name: &str, progress: BlobProgressRx) -> Result<()> {
        use p2p_backend::registry::GrowingPush;
        let retagging = *self
            .retagging
            .get_or_init(|| self.registry.pull_manifest(None).is_ok());
        if retagging {
            return put_when_complete(self, path, progress);
        }
        match self.registry.push_growing_file(path, name, progress)? {
            GrowingPush::Uploaded(d) => tracing::info!("blob {d}: uploaded while written"),
            GrowingPush::Existed(d) => tracing::info!("blob {d}: already in the registry"),
            GrowingPush::Abandoned => {}
        }
        Ok(())
    }

    fn put_blob_bytes(&self, desc: &Descriptor, data: &[u8]) -> Result<()> {
        self.registry.push_blob_bytes(&desc.digest, data)?;
        Ok(())
    }

    fn put_manifest(&self, desc: &Descriptor, data: &[u8]) -> Result<()> {
        self.registry
            .push_manifest(&desc.digest, data, &desc.media_type)?;
        Ok(())
    }

    fn tag(&self, desc: &Descriptor, data: &[u8]) -> Result<()> {
        let tag = self.tag_name();
        self.registry
            .push_manifest(&tag, data, &desc.media_type)
            .map_err(|e| match e {
                RegistryError::NotFound(w) => RegistryError::NotFound(w),
                e => e,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(&format!(": {c}"));
            cur = c.source();
        }
        s
    }

    #[test]
    fn a_missing_layout_blob_names_the_layout() {
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::create(t.path(), None).unwrap();
        let desc = super::super::convert::descriptor(
            super::super::MEDIA_LAYER_GZIP,
            format!("sha256:{}", "1".repeat(64)),
            1,
        );
        let err = chain(&layout.open_blob(&desc).err().unwrap());
        assert!(
            err.contains(&"1".repeat(64)) && err.contains(&t.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_docker_archive_that_is_no_tar_says_so() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("x.tar");
        fs::write(&path, b"hello\n").unwrap();
        let err = chain(&DockerArchive::open(&path).err().unwrap());
        assert!(err.contains("not a `docker save` tar?"), "{err}");
        fs::write(&path, []).unwrap();
        let err = chain(&DockerArchive::open(&path).err().unwrap());
        assert!(err.contains("member 'manifest.json' is missing"), "{err}");
    }
}
