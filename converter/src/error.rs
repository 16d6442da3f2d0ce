//! The error type of the `converter` crate.

use std::io;
use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong converting a source into a RAFS image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options given to a build do not make sense together or have a bad value.
    #[error("Invalid options: {0}")]
    Options(String),

    /// A file or directory of the source could not be read.
    #[error("Reading {}", path.display())]
    Source {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A file of the source cannot be represented in RAFS.
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The offending file.
        path: PathBuf,
        /// Why it cannot be stored.
        reason: String,
    },

    /// A directory source's file could not be added to the image.
    #[error("Adding {}", path.display())]
    File {
        /// The file being added.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rafs::Error,
    },

    /// The tar stream itself is malformed (bad header, truncated, bad compression).
    #[error("Reading tar archive {what}")]
    TarStream {
        /// Where in the archive the failure happened.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// One tar entry is invalid or cannot be represented.
    #[error("Tar entry '{entry}': {reason}")]
    TarEntry {
        /// The entry's path as stored in the archive.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },

    /// One tar entry could not be added to the image.
    #[error("Tar entry '{entry}'")]
    TarEntryData {
        /// The entry's path as stored in the archive.
        entry: String,
        /// What went wrong.
        #[source]
        source: rafs::Error,
    },

    /// A prefetch pattern is not usable.
    #[error("Prefetch pattern '{pattern}': {reason}")]
    Prefetch {
        /// The pattern as given.
        pattern: String,
        /// Why it was rejected.
        reason: String,
    },

    /// An output file could not be written, renamed or removed.
    #[error("Writing {}", path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A temporary output file could not be created.
    #[error("Creating a temporary file in {}", dir.display())]
    TempFile {
        /// The directory it was to be created in.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A layer bootstrap given to a merge could not be read.
    #[error("Layer {layer}")]
    Layer {
        /// The layer (its source path).
        layer: String,
        /// What was wrong with it.
        #[source]
        source: rafs::Error,
    },

    /// One entry of a layer cannot be applied over the layers below it.
    #[error("Layer {layer}, entry '{path}': {reason}")]
    LayerEntry {
        /// The layer (its source path, or its digest in a conversion).
        layer: String,
        /// The entry's path in the layer.
        path: String,
        /// What is wrong.
        reason: String,
    },

    /// Layers given to a merge do not fit together (chunk size, algorithms, blob ids).
    #[error("Inconsistent layers: {0}")]
    Inconsistent(String),

    /// The RAFS writer failed.
    #[error(transparent)]
    Rafs(#[from] rafs::Error),
}

impl Error {
    /// Builds an [`Error::Options`].
    pub fn options(msg: impl Into<String>) -> Self {
        Error::Options(msg.into())
    }

    pub(crate) fn source(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Source {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn output(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Output {
            path: path.into(),
            source,
        }
    }
}
