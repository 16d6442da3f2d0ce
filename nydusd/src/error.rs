//! The error type of the `nydusd` crate.

use std::io;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong setting up or serving a filesystem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("Reading config {path}")]
    ConfigRead {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A configuration field is missing, has the wrong type or an invalid value.
    #[error("Invalid config field `{field}`: {reason}")]
    Config {
        /// Dotted path of the field, e.g. `fs_prefetch.threads_count`.
        field: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A session state handed over by a predecessor (through the supervisor) is
    /// unusable.
    #[error("The state of the FUSE session to take over is unusable: {0}")]
    State(String),
    /// The bootstrap could not be opened or failed validation.
    #[error("Bootstrap {path} is unusable")]
    Bootstrap {
        /// The file.
        path: String,
        /// The validation error.
        #[source]
        source: rafs::Error,
    },
    /// A cache file could not be created, opened or written.
    #[error("Cache file {path}")]
    CacheIo {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The backend failed to deliver bytes.
    #[error("Backend read of blob {blob_id} ({offset}+{len})")]
    Backend {
        /// Blob id.
        blob_id: String,
        /// Offset of the request in the blob.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Why.
        #[source]
        source: p2p_backend::BackendError,
    },
    /// A chunk failed decompression or digest verification.
    #[error("Chunk {ci_index} of blob {blob_id} is corrupt")]
    Integrity {
        /// Blob id.
        blob_id: String,
        /// ci index.
        ci_index: u32,
        /// The decode or digest error.
        #[source]
        source: rafs::Error,
    },
    /// A chunk could not be fetched: the fetch the read waited for failed, or one failed
    /// after the backend's timeout a moment ago (it is not asked again so soon).
    #[error("Chunk {ci_index} of blob {blob_id} is unavailable: {reason}")]
    Unavailable {
        /// Blob id.
        blob_id: String,
        /// ci index.
        ci_index: u32,
        /// Why.
        reason: String,
    },
    /// The bootstrap's metadata (inode, chunk index, chunk table) is inconsistent.
    #[error("Corrupt metadata")]
    Metadata(#[source] rafs::Error),
    /// The bootstrap's chunk table has no record of a chunk a file refers to.
    #[error("Chunk {ci_index} of blob {blob_id} has no chunk table record (no digest to trust)")]
    UnknownChunk {
        /// Blob id.
        blob_id: String,
        /// ci index.
        ci_index: u32,
    },
    /// Mounting or serving FUSE failed.
    #[error("FUSE: {0}")]
    Fuse(String),
    /// Another I/O failure (API socket, signals, threads).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Builds an [`Error::Config`].
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Io`].
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The errno a FUSE request failing with this error returns: `EIO` for data and
    /// metadata failures (never wrong bytes).
    pub fn errno(&self) -> i32 {
        libc::EIO
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::from_raw_os_error(e.errno())
    }
}

/// Displays an error followed by its sources, `outer: inner: innermost`, for log lines.
pub struct Chain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
