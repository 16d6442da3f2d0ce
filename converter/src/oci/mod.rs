//! OCI images: the manifest, index and config documents, where images live
//! ([`store`]: OCI layout directories, docker archives, registries), converting an OCI
//! image into a nydus image ([`convert`], `nydusify convert`) and checking the result
//! against its source ([`check`] on the independent [`flat`] model, `nydusify check`).
//!
//! Media types and annotations are those of `spec/upstream-interfaces.md` §6, so that the
//! rest of the nydus ecosystem recognises the images made here.

pub mod build;
pub mod check;
pub mod convert;
pub mod flat;
pub mod mount;
pub mod store;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Errors of OCI image handling and conversion.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// An image reference or option is unusable.
    #[error("Invalid {what}: {reason}")]
    Invalid {
        /// What was given.
        what: String,
        /// Why it is unusable.
        reason: String,
    },
    /// A manifest, index or config document is malformed.
    #[error("Malformed {what}")]
    Document {
        /// Which document.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The source image has no manifest for the requested platform.
    #[error(
        "No manifest for platform {wanted} in the image index (it has: {available}; \
         use --platform or --all-platforms)"
    )]
    Platform {
        /// The platform asked for (`any` for `--all-platforms`).
        wanted: String,
        /// The platforms the index has, comma-separated.
        available: String,
    },
    /// A layer's media type cannot be converted.
    #[error("Layer {digest} has unsupported media type {media_type}")]
    MediaType {
        /// The layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// Bytes read from the source do not match their descriptor.
    #[error("{what} {digest}: content has digest {actual} and {size} bytes")]
    DigestMismatch {
        /// What was read (layer, config, manifest).
        what: String,
        /// The expected digest.
        digest: String,
        /// What arrived.
        actual: String,
        /// How many bytes arrived.
        size: u64,
    },
    /// A file of an image store could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The registry client failed.
    #[error(transparent)]
    Registry(Box<p2p_backend::registry::RegistryError>),
    /// Building or merging RAFS layers failed.
    #[error("Converting layer {layer}")]
    Layer {
        /// The source layer digest.
        layer: String,
        /// What went wrong.
        #[source]
        source: Box<crate::Error>,
    },
    /// Applying a source layer failed (`nydusify check`).
    #[error("Applying source layer {layer}")]
    SourceLayer {
        /// The layer digest.
        layer: String,
        /// What went wrong.
        #[source]
        source: Box<OciError>,
    },
    /// The nydus image's bootstrap or blobs are unreadable or corrupt.
    #[error("Reading the nydus image")]
    Nydus(#[from] rafs::Error),
    /// Other converter failures (merge, options).
    #[error(transparent)]
    Converter(Box<crate::Error>),
    /// The nydus image differs from its source (`nydusify check`).
    #[error("The nydus image differs from its source in {} place(s)", .0.len())]
    Differs(Vec<String>),
}

impl From<p2p_backend::registry::RegistryError> for OciError {
    fn from(e: p2p_backend::registry::RegistryError) -> Self {
        OciError::Registry(Box::new(e))
    }
}

impl From<crate::Error> for OciError {
    fn from(e: crate::Error) -> Self {
        OciError::Converter(Box::new(e))
    }
}

impl OciError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        OciError::Io {
            what: what.into(),
            source,
        }
    }
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        OciError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = OciError> = std::result::Result<T, E>;

/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// A nydus data blob layer.
pub const MEDIA_NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// gzip-compressed tar layer (also the nydus bootstrap layer).
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation on nydus blob layers.
pub const ANNOTATION_NYDUS_BLOB: &str = "containerd.io/snapshot/nydus-blob";
/// The annotation on the nydus bootstrap layer.
pub const ANNOTATION_NYDUS_BOOTSTRAP: &str = "containerd.io/snapshot/nydus-bootstrap";
/// RAFS version of the bootstrap layer.
pub const ANNOTATION_NYDUS_FS_VERSION: &str = "containerd.io/snapshot/nydus-fs-version";
/// Blobs of a chunk dictionary referenced by the image (JSON list of ids), on the
/// bootstrap layer.
pub const ANNOTATION_NYDUS_REFERENCE_BLOB_IDS: &str =
    "containerd.io/snapshot/nydus-reference-blob-ids";
/// Diff id of a compressed layer.
pub const ANNOTATION_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// The tag of a manifest in an OCI layout's index.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Path of the bootstrap inside the bootstrap layer.
pub const BOOTSTRAP_PATH: &str = "image/image.boot";

/// How a source layer is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerMedia {
    /// Plain tar.
    Tar,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl LayerMedia {
    /// The compression of a layer media type, or `None` if it is not a convertible layer
    /// (encrypted, foreign, already nydus).
    pub fn of(media_type: &str) -> Option<Self> {
        Some(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => LayerMedia::Tar,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => LayerMedia::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd" => LayerMedia::Zstd,
            _ => return None,
        })
    }
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Fields not modelled here, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A platform of an index entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version.
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features (`nydus.remoteimage.v1` for nydus manifests in merged indexes).
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// An image manifest (OCI or docker schema 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// Media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// Layers, lowest first.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// An image index (or docker manifest list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// Media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Index {
    /// The platforms of the index's manifests (`os/arch[/variant]`, `none` for entries
    /// without one), comma-separated, for messages.
    pub fn platform_names(&self) -> String {
        let names: Vec<String> = self
            .manifests
            .iter()
            .map(|d| d.platform.as_ref().map_or("none".into(), Platform::name))
            .collect();
        if names.is_empty() {
            "no manifests".into()
        } else {
            names.join(", ")
        }
    }

    /// The error for a platform this index lacks.
    pub fn no_platform(&self, wanted: &str) -> OciError {
        OciError::Platform {
            wanted: wanted.to_string(),
            available: self.platform_names(),
        }
    }
}

/// What a top-level document is.
pub enum TopLevel {
    /// A single image.
    Manifest(Box<Manifest>),
    /// Several images.
    Index(Index),
}

/// Parses a manifest or index, telling them apart by media type or shape.
pub fn parse_top_level(bytes: &[u8], what: &str) -> Result<TopLevel> {
    let v: Value = serde_json::from_slice(bytes).map_err(|source| OciError::Document {
        what: what.to_string(),
        source,
    })?;
    let mt = v.get("mediaType").and_then(Value::as_str).unwrap_or("");
    let is_index = mt == MEDIA_OCI_INDEX
        || mt == MEDIA_DOCKER_LIST
        || (mt.is_empty() && v.get("manifests").is_some());
    let doc = |source| OciError::Document {
        what: what.to_string(),
        source,
    };
    Ok(if is_index {
        TopLevel::Index(serde_json::from_value(v).map_err(doc)?)
    } else {
        TopLevel::Manifest(Box::new(serde_json::from_value(v).map_err(doc)?))
    })
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// The hex part of a `sha256:` digest, checked.
pub fn digest_hex(digest: &str) -> Result<&str> {
    p2p_backend::registry::sha256_hex(digest).ok_or_else(|| {
        OciError::invalid(format!("digest '{digest}'"), "not sha256:<64 hex digits>")
    })
}

/// A reader that hashes (sha256) and counts what passes through.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
    size: u64,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: sha2::Digest::new(),
            size: 0,
        }
    }

    /// `sha256:<hex>` and the byte count of what was read.
    pub(crate) fn finish(self) -> (String, u64) {
        let digest = sha2::Digest::finalize(self.hasher);
        (format!("sha256:{}", hex::encode(digest)), self.size)
    }

    /// Checks what was read against `desc` (digest and size).
    pub(crate) fn verify(self, what: &str, desc: &Descriptor) -> Result<()> {
        let (actual, size) = self.finish();
        if actual != desc.digest || size != desc.size {
            return Err(OciError::DigestMismatch {
                what: what.into(),
                digest: desc.digest.clone(),
                actual,
                size,
            });
        }
        Ok(())
    }
}
