//! The error type of the `rafs` crate.

use std::io;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading or writing RAFS data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A field of an on-disk structure holds a value the format does not allow.
    #[error("Invalid {field}: {reason}")]
    Invalid {
        /// Which field (e.g. `superblock.s_magic`).
        field: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A structure extends past the end of the data that holds it.
    #[error("Truncated {what}: needs bytes {start}..{end} but only {len} exist")]
    Truncated {
        /// What was being read.
        what: String,
        /// Start offset.
        start: u64,
        /// End offset.
        end: u64,
        /// Available length.
        len: u64,
    },
    /// A chunk's data does not match its recorded digest.
    #[error(
        "Chunk {ci_index} of blob {blob_id}: digest mismatch (expected {expected}, got {actual})"
    )]
    DigestMismatch {
        /// Blob id.
        blob_id: String,
        /// ci index of the chunk.
        ci_index: u32,
        /// Recorded digest, hex.
        expected: String,
        /// Computed digest, hex.
        actual: String,
    },
    /// Compressed data could not be decompressed to the recorded size.
    #[error("Decompressing {what}: {reason}")]
    Decompress {
        /// What was being decompressed.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A path or name was not found.
    #[error("No such file or directory: {0}")]
    NotFound(String),
    /// The in-memory tree cannot be written (bad name, wrong node type, limits exceeded).
    #[error("Invalid tree: {0}")]
    Tree(String),
}

impl Error {
    /// Builds an [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Io`] with context.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
